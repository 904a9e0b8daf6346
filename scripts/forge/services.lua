--- Service registry: loads services/<name>/service.lua, validates the catalog, and calls the
-- service's hooks. A broken service is refused with a clear message; the others still serve.
--
-- Service scripts run in a restricted environment (no io, os, package, debug, load of files):
-- only pure Lua libraries and the capabilities in the `forge` table.
local cjson = require "cjson"
local crypto = require "forge.crypto"
local flog = require "forge.log"
local lfs = require "lfs"
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

-- OSB catalog rules for one service (ids/names uniqueness across services checked later).
local function check_service(s, where)
  local function need_string(t, k, what)
    if type(t[k]) ~= "string" or t[k] == "" then
      error(string.format("%s: %s.%s must be a non-empty string", where, what, k), 0)
    end
  end
  if type(s) ~= "table" then error(where .. ": service.lua must return a table", 0) end
  for _, k in ipairs({ "id", "name", "description" }) do need_string(s, k, "service") end
  if type(s.bindable) ~= "boolean" then error(where .. ": service.bindable must be true or false", 0) end
  if s.name:find("[^%w%.%-_]") then
    error(where .. ": service.name '" .. s.name .. "' must use only letters, digits, '.', '-' and '_'", 0)
  end
  if type(s.plans) ~= "table" or #s.plans == 0 then
    error(where .. ": service.plans must list at least one plan", 0)
  end
  local names = {}
  for i, p in ipairs(s.plans) do
    local what = "plans[" .. i .. "]"
    if type(p) ~= "table" then error(where .. ": " .. what .. " must be a table", 0) end
    for _, k in ipairs({ "id", "name", "description" }) do need_string(p, k, what) end
    if names[p.name] then error(where .. ": duplicate plan name '" .. p.name .. "'", 0) end
    names[p.name] = true
  end
  for _, hook in ipairs({ "deploy", "bind", "unbind" }) do
    if type(s[hook]) ~= "function" then error(where .. ": service." .. hook .. " must be a function", 0) end
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
  reg.catalog_json = #services > 0 and cjson.encode({ services = services }) or '{"services":[]}'
  return reg
end

--- The context handed to bind/unbind hooks: the live topology and the instance's secrets.
function M.binding_context(inst, bid, extra)
  local ctx = { instance_id = inst.id, binding_id = bid, host = inst.resources.host,
    ports = inst.resources.ports, parameters = {}, secret = function(name) return inst.secrets[name] end }
  for k, v in pairs(extra or {}) do ctx[k] = v end
  return ctx
end

--- Call a service hook in protected mode.
-- @return result | nil, message (the script's file:line included)
function M.call(svc, hook, ...)
  local fn = svc.script[hook]
  if type(fn) ~= "function" then return nil, "service " .. svc.name .. " has no " .. hook .. " hook" end
  local ok, res = xpcall(fn, function(e) return tostring(e) end, ...)
  if not ok then return nil, res end
  return res
end

return M
