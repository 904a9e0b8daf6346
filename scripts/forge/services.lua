--- Service registry: loads services/<name>/service.lua, validates the catalog, and calls the
-- service's hooks. A broken service is refused with a clear message; the others still serve.
--
-- Service scripts run in a restricted environment (no io, os, package, debug, load of files):
-- only pure Lua libraries and the capabilities in the `forge` table.
local cjson = require "cjson"
local crypto = require "forge.crypto"
local flog = require "forge.log"
local lfs = require "lfs"
local schema = require "forge.schema"
local util = require "forge.util"

local M = {}

-- Library functions a service script may use, by name (data, not code: see STYLE.md §2).
local SAFE_GLOBALS = { "assert", "error", "ipairs", "next", "pairs", "pcall", "select", "tonumber",
  "tostring", "type", "xpcall", "rawequal", "rawlen", "setmetatable", "getmetatable" }
local SAFE_LIBS = { "string", "table", "math", "utf8" }

local function readonly_copy(t)
  local c = {}
  for k, v in pairs(t) do c[k] = v end
  return c
end

-- The capabilities handed to every service script.
local function forge_api(service_name)
  local log = {}
  for _, level in ipairs({ "debug", "info", "warn", "error" }) do
    log[level] = function(msg, fields)
      local f = util.copy(fields or {})
      f.service = service_name
      flog[level](tostring(msg), f)
    end
  end
  return {
    json = { encode = cjson.encode, decode = util.json_decode, null = cjson.null },
    crypto = {
      password = crypto.password, uuid = crypto.uuid, token = crypto.token,
      sha256_hex = crypto.sha256_hex, hex = crypto.hex,
      base64_encode = crypto.base64_encode, base64_decode = crypto.base64_decode,
    },
    log = log,
  }
end

local function new_env(service_name)
  local env = {}
  for _, name in ipairs(SAFE_GLOBALS) do env[name] = _G[name] end
  for _, name in ipairs(SAFE_LIBS) do env[name] = readonly_copy(_G[name]) end
  env.forge = forge_api(service_name)
  env._G = env
  return setmetatable(env, {
    __index = function(_, k) error("undefined global '" .. tostring(k) .. "'", 2) end,
  })
end

local function read_file(path)
  local f, err = io.open(path, "rb")
  if not f then return nil, err end
  local s = f:read("a")
  f:close()
  return s
end

-- Raise a catalog error naming the script.
local function bad(where, fmt, ...) error(where .. ": " .. string.format(fmt, ...), 0) end

local REQUIRES = { syslog_drain = true, route_forwarding = true, volume_mount = true }
local SCHEMA_SLOTS = { service_instance = { "create", "update" }, service_binding = { "create" } }

local function check_optional(t, what, where, fields)
  for field, want in pairs(fields) do
    local v = t[field]
    if v ~= nil and type(v) ~= want then bad(where, "%s.%s must be a %s", what, field, want) end
  end
end

local function check_schemas(p, what, where)
  if p.schemas == nil then return end
  if type(p.schemas) ~= "table" then bad(where, "%s.schemas must be a table", what) end
  for kind, slots in pairs(p.schemas) do
    if not SCHEMA_SLOTS[kind] then bad(where, "%s.schemas.%s is not an OSB schema kind", what, tostring(kind)) end
    for action, entry in pairs(slots) do
      local path = string.format("%s.schemas.%s.%s", what, kind, tostring(action))
      local known = false
      for _, a in ipairs(SCHEMA_SLOTS[kind]) do known = known or a == action end
      if not known then bad(where, "%s is not an OSB schema slot", path) end
      if type(entry) ~= "table" or type(entry.parameters) ~= "table" then
        bad(where, "%s must be {parameters = <JSON schema>}", path)
      end
      local ok, err = schema.check(entry.parameters)
      if not ok then bad(where, "%s.parameters: %s", path, err) end
      local size = #cjson.encode(entry.parameters)
      if size > 65536 then bad(where, "%s.parameters is %d bytes; OSB allows 64 kB", path, size) end
    end
  end
end

local function check_plan(p, i, where, names)
  local what = "plans[" .. i .. "]"
  if type(p) ~= "table" then bad(where, "%s must be a table", what) end
  for _, k in ipairs({ "id", "name", "description" }) do
    if type(p[k]) ~= "string" or p[k] == "" then bad(where, "%s.%s must be a non-empty string", what, k) end
  end
  if names[p.name] then bad(where, "duplicate plan name '%s'", p.name) end
  names[p.name] = true
  check_optional(p, what, where, { free = "boolean", bindable = "boolean", plan_updateable = "boolean",
    binding_rotatable = "boolean", metadata = "table", async_only = "boolean", bindings_async = "boolean" })
  if p.maximum_polling_duration ~= nil and (math.type(p.maximum_polling_duration) ~= "integer"
      or p.maximum_polling_duration <= 0) then
    bad(where, "%s.maximum_polling_duration must be a positive integer (seconds)", what)
  end
  local mi = p.maintenance_info
  if mi ~= nil then
    if type(mi) ~= "table" or type(mi.version) ~= "string" or
       not mi.version:match("^%d+%.%d+%.%d+[%-%+]?[%w%.%-%+]*$") then
      bad(where, "%s.maintenance_info.version must be a semantic version (e.g. 1.2.3)", what)
    end
  end
  check_schemas(p, what, where)
end

-- OSB catalog rules for one service (ids/names uniqueness across services checked later).
local function check_service(s, where)
  if type(s) ~= "table" then bad(where, "service.lua must return a table") end
  for _, k in ipairs({ "id", "name", "description" }) do
    if type(s[k]) ~= "string" or s[k] == "" then bad(where, "service.%s must be a non-empty string", k) end
  end
  if type(s.bindable) ~= "boolean" then bad(where, "service.bindable must be true or false") end
  if s.name:find("[^%w%.%-_]") then
    bad(where, "service.name '%s' must use only letters, digits, '.', '-' and '_'", s.name)
  end
  check_optional(s, "service", where, { tags = "table", requires = "table", metadata = "table",
    instances_retrievable = "boolean", bindings_retrievable = "boolean", allow_context_updates = "boolean",
    plan_updateable = "boolean", dashboard_client = "table", bindings_async = "boolean" })
  for _, r in ipairs(s.requires or {}) do
    if not REQUIRES[r] then bad(where, "service.requires: '%s' is not one of syslog_drain, route_forwarding, "
      .. "volume_mount", tostring(r)) end
  end
  if type(s.plans) ~= "table" or #s.plans == 0 then bad(where, "service.plans must list at least one plan") end
  local names = {}
  for i, p in ipairs(s.plans) do check_plan(p, i, where, names) end
  for _, hook in ipairs({ "deploy", "bind", "unbind" }) do
    if type(s[hook]) ~= "function" then bad(where, "service.%s must be a function", hook) end
  end
end

-- The OSB catalog entry of a service: only OSB fields, never the author's internal data.
local SERVICE_FIELDS = { "id", "name", "description", "bindable", "tags", "requires", "metadata",
  "instances_retrievable", "bindings_retrievable", "allow_context_updates", "plan_updateable",
  "dashboard_client" }
local PLAN_FIELDS = { "id", "name", "description", "free", "bindable", "plan_updateable", "metadata",
  "maximum_polling_duration", "maintenance_info", "schemas", "binding_rotatable" }

local function pick(t, fields)
  local out = {}
  for _, k in ipairs(fields) do
    if t[k] ~= nil then out[k] = util.copy(t[k]) end
  end
  return out
end

local function catalog_entry(s)
  local entry = pick(s, SERVICE_FIELDS)
  entry.plans = {}
  for i, p in ipairs(s.plans) do entry.plans[i] = pick(p, PLAN_FIELDS) end
  return entry
end

--- Load one service folder. Returns the service record | nil, message.
function M.load_one(dir, name)
  local path = dir .. "/" .. name .. "/service.lua"
  local src, err = read_file(path)
  if not src then return nil, "cannot read " .. path .. ": " .. err end
  local where = "services/" .. name .. "/service.lua"
  local chunk, cerr = load(src, "@" .. where, "t", new_env(name))
  if not chunk then return nil, cerr end
  local ok, s = pcall(chunk)
  if not ok then return nil, tostring(s) end
  local vok, verr = pcall(check_service, s, where)
  if not vok then return nil, verr end
  local plans = {}
  for _, p in ipairs(s.plans) do plans[p.id] = p end
  return { name = s.name, dir = dir .. "/" .. name, script = s, plans = plans,
    hash = crypto.sha256_hex(src), catalog = catalog_entry(s) }
end

local function all_ids(s)
  local l = { s.id }
  for _, p in ipairs(s.plans) do l[#l + 1] = p.id end
  return l
end

--- Load every service under dir.
-- @return registry {by_id, by_name, plans (plan id -> {service, plan}), errors, catalog_json}
function M.load(dir)
  local reg = { by_id = {}, by_name = {}, plans = {}, errors = {}, list = {} }
  local names = {}
  local ok, iter, state = pcall(lfs.dir, dir)
  if not ok then
    reg.errors[#reg.errors + 1] = { service = dir, message = "cannot list services: " .. tostring(iter) }
  else
    for entry in iter, state do
      if entry:sub(1, 1) ~= "." and lfs.attributes(dir .. "/" .. entry .. "/service.lua", "mode") == "file" then
        names[#names + 1] = entry
      end
    end
  end
  table.sort(names)
  local ids = {}
  for _, name in ipairs(names) do
    local svc, err = M.load_one(dir, name)
    if svc then
      -- ids are unique across the whole catalog, names across services
      if reg.by_name[svc.name] then err = "service name '" .. svc.name .. "' is already used" end
      local seen = {}
      for _, id in ipairs(all_ids(svc.script)) do
        local owner = ids[id] or seen[id]
        if owner then
          err = string.format("services/%s: id '%s' is already used by %s", name, id, owner)
          break
        end
        seen[id] = svc.name
      end
    end
    if svc and not err then
      ids[svc.script.id] = svc.name
      reg.by_id[svc.script.id] = svc
      reg.by_name[svc.name] = svc
      reg.list[#reg.list + 1] = svc
      for _, p in ipairs(svc.script.plans) do
        ids[p.id] = svc.name .. "/" .. p.name
        reg.plans[p.id] = { service = svc, plan = p }
      end
    else
      reg.errors[#reg.errors + 1] = { service = name, message = err }
    end
  end
  local services = {}
  for i, svc in ipairs(reg.list) do services[i] = svc.catalog end
  reg.catalog_json = #services > 0 and util.json_encode_sorted({ services = services }) or '{"services":[]}'
  reg.catalog_etag = '"' .. crypto.sha256_hex(reg.catalog_json):sub(1, 32) .. '"'
  return reg
end

--- The context handed to bind/unbind hooks: the live topology and the instance's secrets.
function M.binding_context(inst, bid, extra)
  local ctx = { instance_id = inst.id, binding_id = bid, host = inst.resources.host,
    ports = inst.resources.ports, parameters = {}, secrets = inst.secrets or {} }
  for k, v in pairs(extra or {}) do ctx[k] = v end
  return ctx
end

--- Call a service hook in protected mode.
-- @return result | nil, message (the script's file:line included)
-- ctx.secret(name): the instance's secret `name`, generated (and kept in ctx.secrets) if new.
local function with_secret(ctx)
  if type(ctx) == "table" and type(ctx.secrets) == "table" then
    ctx.secret = function(name)
      ctx.secrets[name] = ctx.secrets[name] or crypto.password(32)
      return ctx.secrets[name]
    end
  end
  return ctx
end

function M.call(svc, hook, ctx, ...)
  local fn = svc.script[hook]
  if type(fn) ~= "function" then return nil, "service " .. svc.name .. " has no " .. hook .. " hook" end
  local ok, res = xpcall(fn, function(e) return tostring(e) end, with_secret(ctx), ...)
  if not ok then return nil, res end
  return res
end

return M
