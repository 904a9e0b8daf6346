--- Service registry: each service script runs in its own forge.sandbox state (capped memory,
-- CPU and wall time per call, only capability APIs), one per worker thread and per version.
--
-- Versions are content hashes of the script and its templates. Every version that was
-- accepted is kept in the store (script/<name>/<hash>), and services/current names the
-- versions in force; workers load exactly what the main thread validated and published, and
-- an instance's hooks run on the version it was rendered with (ctx.script_hash).
local cjson = require "cjson"
local contract = require "forge.contract"
local crypto = require "forge.crypto"
local lfs = require "lfs"
local log = require "forge.log"
local sandbox = require "forge.sandbox"
local schema = require "forge.schema"
local telemetry = require "forge.telemetry"
local util = require "forge.util"

local M = {}

M.CURRENT_KEY = "services/current"
local function script_key(name, hash) return "script/" .. name .. "/" .. hash end

local function read_file(path)
  local mode, merr = lfs.attributes(path, "mode")
  if mode ~= "file" then return nil, mode and ("not a regular file (" .. mode .. ")") or merr end
  local f, err = io.open(path, "rb")
  if not f then return nil, err end
  local s, rerr = f:read("a")
  f:close()
  if not s then return nil, rerr or "read failed" end
  return s
end

-- A catalog error "services/x/service.lua: plans[2].id must ..." with the line of the field it
-- names (its first mention in the script), as every validator message has.
local function with_line(msg, where, source)
  local rest = type(msg) == "string" and msg:sub(#where + 3)
  if not rest or msg:sub(1, #where) ~= where then return msg end
  local path = rest:match("^([%w_%.%[%]]+)%s") or rest:match("^([%w_%.%[%]]+):")
  local field = path and path:match("([%a_][%w_]*)%]?$")
  local line = field and contract.locate(source, nil, field)
  local quoted = not line and rest:match("'([^']+)'")
  line = line or (quoted and contract.locate_literal(source, quoted))
  return line and (where .. ":" .. line .. ": " .. rest) or msg
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
  -- functions come out of the sandbox as `true`
  for _, hook in ipairs({ "deploy", "bind", "unbind" }) do
    if s[hook] ~= true then bad(where, "service.%s must be a function", hook) end
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

--- Read a service folder: its script and templates/*.yml, and their content hash.
-- @return {name, source, templates, hash} | nil, message
function M.read_folder(dir, name)
  local path = dir .. "/" .. name .. "/service.lua"
  local source, err = read_file(path)
  if not source then return nil, "services/" .. name .. ": cannot read " .. path .. ": " .. err end
  local templates, names = {}, {}
  local tdir = dir .. "/" .. name .. "/templates"
  local tmode, _, terrno = lfs.attributes(tdir, "mode")
  if not tmode and terrno ~= 2 then return nil, "services/" .. name .. ": cannot read " .. tdir end
  if tmode == "directory" then
    local ok, iter, state = pcall(lfs.dir, tdir)
    if not ok then return nil, "services/" .. name .. ": cannot read " .. tdir .. ": " .. tostring(iter) end
    for entry in iter, state do
      if entry:match("%.ya?ml$") and lfs.attributes(tdir .. "/" .. entry, "mode") == "file" then
        local text, terr = read_file(tdir .. "/" .. entry)
        if not text then return nil, "services/" .. name .. ": cannot read " .. tdir .. "/" .. entry .. ": " .. terr end
        templates[entry] = text
        names[#names + 1] = entry
      end
    end
  end
  table.sort(names)
  local parts = { source }
  for _, n in ipairs(names) do parts[#parts + 1] = n .. "\0" .. templates[n] end
  return { name = name, source = source, templates = templates,
    hash = crypto.sha256_hex(table.concat(parts, "\0")):sub(1, 32) }
end

--- Build a service version in a fresh sandbox and check its catalog entry.
-- @param src {name, source, templates, hash}
-- @param limits {memory, cpu, wall} (defaults from forge.sandbox)
-- @return svc | nil, message
function M.build(src, limits)
  limits = limits or {}
  local where = "services/" .. src.name .. "/service.lua"
  local sb = sandbox.new { name = src.name, memory = limits.memory, cpu = limits.cpu, wall = limits.wall }
  local ok, err = sb:load(src.source, "@" .. where)
  if not ok then
    sb:close()
    return nil, tostring(err.message or err)
  end
  local data, ferr = sb:field()
  if not data then
    sb:close()
    return nil, tostring(ferr.message or ferr)
  end
  local vok, verr = pcall(check_service, data, where)
  if not vok then
    sb:close()
    return nil, with_line(verr, where, src.source)
  end
  local plans = {}
  for _, p in ipairs(data.plans) do plans[p.id] = p end
  return { name = data.name, folder = src.name, hash = src.hash, source = src.source, templates = src.templates,
    sandbox = sb, script = data, plans = plans, catalog = catalog_entry(data) }
end

--- Build a version and validate it (forge.validate): what check, install, reload and the broker's
-- start accept, so hot reload refuses exactly what `forge check` refuses.
-- @param opts {local_cfg = targets.local config} (commands and users are then checked too)
-- @return svc, warnings | nil, message (every problem, one per line), problems
function M.accept(src, limits, opts)
  local svc, err = M.build(src, limits)
  if not svc then return nil, err, { err } end
  local problems, warnings = require("forge.validate").service(svc, opts)
  if #problems > 0 then
    svc.sandbox:close()
    return nil, table.concat(problems, "\n"), problems
  end
  for _, w in ipairs(warnings) do log.warn("service check warning", { service = src.name, warning = w }) end
  return svc, warnings
end

local function all_ids(s)
  local l = { s.id }
  for _, p in ipairs(s.plans) do l[#l + 1] = p.id end
  return l
end

-- Why `svc` cannot join services already in reg (ids and names are unique catalog-wide).
local function conflict(reg, svc)
  if reg.by_name[svc.name] then return "service name '" .. svc.name .. "' is already used" end
  local seen = {}
  for _, id in ipairs(all_ids(svc.script)) do
    local owner = reg.ids[id] or seen[id]
    if owner then return string.format("id '%s' is already used by %s", id, owner) end
    seen[id] = svc.name
  end
end

local function new_registry()
  return { by_id = {}, by_name = {}, plans = {}, ids = {}, list = {}, errors = {} }
end

local function add(reg, svc)
  local why = conflict(reg, svc)
  if why then return nil, why end
  reg.ids[svc.script.id] = svc.name
  reg.by_id[svc.script.id] = svc
  reg.by_name[svc.name] = svc
  reg.list[#reg.list + 1] = svc
  for _, p in ipairs(svc.script.plans) do
    reg.ids[p.id] = svc.name .. "/" .. p.name
    reg.plans[p.id] = { service = svc, plan = p }
  end
  return true
end

--- The catalog body of a list of catalog entries, byte-stable (keys sorted), and its ETag.
function M.catalog_body(entries)
  local json = #entries > 0 and util.json_encode_sorted({ services = entries }) or '{"services":[]}'
  return json, '"' .. crypto.sha256_hex(json):sub(1, 32) .. '"'
end

local function finish(reg)
  table.sort(reg.list, function(a, b) return a.name < b.name end)
  local services = {}
  for i, svc in ipairs(reg.list) do services[i] = svc.catalog end
  reg.catalog_json, reg.catalog_etag = M.catalog_body(services)
  return reg
end

-- Whether entry `name` of the services dir is (or may be) a service folder: it holds a
-- service.lua, or it cannot be read to tell. An unreadable folder, an unreadable service.lua or
-- a link to nowhere is listed, so that reading it fails loudly (a refused edit that keeps the
-- running version) instead of the service silently leaving the catalog.
local function service_folder(dir, name)
  local path = dir .. "/" .. name
  local mode = lfs.attributes(path, "mode")
  if not mode then return lfs.symlinkattributes(path, "mode") == "link" end
  if mode ~= "directory" then return false end
  local smode, _, errno = lfs.attributes(path .. "/service.lua", "mode")
  if smode then return true end
  return errno ~= 2          -- anything but ENOENT (EACCES, ELOOP, ...): we cannot tell
end

-- Folders under dir that are services (see service_folder), sorted.
local function folders(dir, errors)
  local names = {}
  local ok, iter, state = pcall(lfs.dir, dir)
  if not ok then
    errors[#errors + 1] = { service = dir, message = "cannot list services: " .. tostring(iter) }
    return names, false
  end
  for entry in iter, state do
    if entry:sub(1, 1) ~= "." and service_folder(dir, entry) then names[#names + 1] = entry end
  end
  table.sort(names)
  return names, true
end

--- Scan the services directory. A service whose content is unchanged keeps its running version
-- (and sandbox) from `previous`; a changed or new one is built in a fresh sandbox and replaces
-- the old only if it is valid — otherwise the old version stays and the error is reported.
-- @return registry {by_id, by_name, plans, list, errors, catalog_json, catalog_etag}
function M.scan(dir, limits, previous, opts)
  local reg = new_registry()
  local names, listed = folders(dir, reg.errors)
  if not listed and previous then
    -- the directory itself cannot be read: keep every running version, report it
    for _, old in ipairs(previous.list or {}) do
      if add(reg, old) then
        reg.errors[#reg.errors + 1] = { service = old.folder, kept = old.hash,
          message = "services/" .. old.folder .. ": the services directory cannot be read; kept the running version" }
      end
    end
  end
  for _, name in ipairs(names) do
    local src, err = M.read_folder(dir, name)
    local old = previous and previous.by_folder and previous.by_folder[name]
    local svc
    if src and old and old.hash == src.hash then
      svc = old
    elseif src then
      svc, err = M.accept(src, limits, opts)
    end
    if svc then
      local ok, why = add(reg, svc)
      if not ok then svc, err = nil, "services/" .. name .. ": " .. why end
    end
    if not svc then
      reg.errors[#reg.errors + 1] = { service = name, message = err }
      if old and old ~= svc and add(reg, old) then
        reg.errors[#reg.errors].kept = old.hash
      end
    end
  end
  reg.by_folder = {}
  for _, svc in ipairs(reg.list) do reg.by_folder[svc.folder] = svc end
  return finish(reg)
end

--- Load every service under dir (no previous versions): forge check/render and specs.
function M.load(dir, limits, opts) return M.scan(dir, limits, nil, opts) end

--- Publish local versions into the store's current set (services/current), keeping what other
-- replicas published for other services. `changes` maps folder -> true (publish the version in
-- reg) or false (the service was removed); nil publishes every service in reg. The current set
-- is updated by compare-and-swap, so replicas publishing at once lose nothing.
-- @return the new generation
function M.publish(db, reg, changes)
  local model = require "forge.model"
  for _ = 1, 20 do
    local current, rev = model.read(db, M.CURRENT_KEY)
    current = current or { generation = 0, services = {} }
    local ops = {}
    for _, svc in ipairs(reg.list) do
      if changes == nil or changes[svc.folder] then
        current.services[svc.folder] = svc.hash
        local k = script_key(svc.folder, svc.hash)
        if not db:get(k) then
          ops[#ops + 1] = model.put(k, { name = svc.folder, source = svc.source, templates = svc.templates })
        end
      end
    end
    for folder, keep in pairs(changes or {}) do
      if keep == false then current.services[folder] = nil end
    end
    current.generation, current.errors, current.published_at = (current.generation or 0) + 1, reg.errors, os.time()
    ops[#ops + 1] = model.put(M.CURRENT_KEY, current)
    if model.txn(db, { compare = { { key = M.CURRENT_KEY, mod_revision = rev } }, success = ops }) then
      return current.generation
    end
  end
  error("could not publish service versions: too much contention on " .. M.CURRENT_KEY)
end

--- The generation named current in the store (0 when nothing was published yet).
function M.published_generation(db)
  local model = require "forge.model"
  local current = model.read(db, M.CURRENT_KEY)
  return current and current.generation or 0, current
end

--- A version from the store (script/<folder>/<hash>), built in a fresh sandbox.
local function from_store(db, folder, hash, limits)
  local model = require "forge.model"
  local src = model.read(db, script_key(folder, hash))
  if not src then return nil, "version " .. hash .. " of service " .. folder .. " is not in the store" end
  src.hash = src.hash or hash
  src.name = folder
  return M.build(src, limits)
end

--- The registry of the versions named current in the store, reusing sandboxes from `previous`
-- for unchanged versions. Used by every worker when the generation changes.
-- @return registry, generation
function M.load_published(db, limits, previous)
  local model = require "forge.model"
  local current = model.read(db, M.CURRENT_KEY) or { services = {}, errors = {}, generation = 0 }
  local reg = new_registry()
  local names = {}
  for folder in pairs(current.services) do names[#names + 1] = folder end
  table.sort(names)
  for _, folder in ipairs(names) do
    local hash = current.services[folder]
    local old = previous and previous.by_folder and previous.by_folder[folder]
    local svc, err = old, nil
    if not old or old.hash ~= hash then svc, err = from_store(db, folder, hash, limits) end
    if svc then add(reg, svc) else reg.errors[#reg.errors + 1] = { service = folder, message = err } end
  end
  for _, e in ipairs(current.errors or {}) do reg.errors[#reg.errors + 1] = e end
  reg.by_folder = {}
  for _, svc in ipairs(reg.list) do reg.by_folder[svc.folder] = svc end
  telemetry.services(reg)
  return finish(M.attach(reg, db, limits, previous)), current.generation
end

--- Give a registry the store it loads pinned versions from (and keep the version cache).
function M.attach(reg, db, limits, previous)
  reg.db, reg.limits, reg.versions = db, limits, previous and previous.versions or {}
  for _, svc in ipairs(reg.list) do svc.registry = reg end
  return reg
end

--- The version of `svc`'s service with content hash `hash` (an instance's pinned version).
function M.version(svc, hash, reg)
  if not hash or hash == svc.hash or not reg or not reg.db then return svc end
  local cache = reg.versions
  local k = svc.folder .. "/" .. hash
  if not cache[k] then
    local v, err = from_store(reg.db, svc.folder, hash, reg.limits)
    if not v then return nil, err end
    cache[k] = v
  end
  return cache[k]
end

--- The context handed to bind/unbind hooks: the live topology and the instance's secrets.
function M.binding_context(inst, bid, extra)
  local ctx = { instance_id = inst.id, binding_id = bid, host = inst.resources.host,
    ports = inst.resources.ports, parameters = {}, secrets = inst.secrets or {}, script_hash = inst.script_hash }
  for k, v in pairs(extra or {}) do ctx[k] = v end
  return ctx
end

--- Call a service hook in its sandbox. ctx (plain data) is copied in; ctx.secret(name) works
-- there and new secrets come back into ctx.secrets. With ctx.script_hash, the call runs on that
-- version of the service (an instance's pinned version).
-- @return result | nil, message (the script's file:line included)
function M.call(svc, hook, ctx, ...)
  if type(ctx) == "table" and ctx.script_hash then
    local v, err = M.version(svc, ctx.script_hash, svc.registry)
    if not v then return nil, err end
    svc = v
  end
  if svc.script[hook] == nil then return nil, "service " .. svc.name .. " has no " .. hook .. " hook" end
  local res, after = svc.sandbox:call(hook, ctx, ...)
  local failed = res == nil and getmetatable(after) and after.message
  telemetry.sandbox_call(svc.name, hook, failed)
  if failed then return nil, after.message end
  if type(ctx) == "table" and type(ctx.secrets) == "table" and type(after) == "table"
      and type(after.secrets) == "table" then
    for k, v in pairs(after.secrets) do ctx.secrets[k] = v end
  end
  return res, nil, svc
end

--- Call a hook whose result has a contract shape (deploy, bind, unbind, manifest) and check the
-- result against it (on the version that ran): each problem names the field's path and the
-- script's line.
-- @return result | nil, {messages}
function M.checked(svc, hook, ctx, ...)
  local res, err, version = M.call(svc, hook, ctx, ...)
  if res == nil then
    return nil, { err or contract.format(version or svc, hook, { path = "", message = "must return a table (got nil)" }) }
  end
  local problems = contract.all(version, hook, res)
  if #problems > 0 then return nil, problems end
  return res
end

--- M.checked at request time: result | nil, one line (the first problem, and how many more).
function M.hook(svc, hook, ctx, ...)
  local res, problems = M.checked(svc, hook, ctx, ...)
  if res then return res end
  return nil, problems[1] .. (#problems > 1 and string.format(" (and %d more)", #problems - 1) or "")
end

return M
