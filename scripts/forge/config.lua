--- Broker configuration: one YAML file (forge.yml) with environment overrides.
--
-- Precedence: built-in defaults < the YAML file < FORGE_* environment variables.
-- Unknown keys are refused (a typo must not silently fall back to a default).
local util = require "forge.util"

local M = {}

local DEFAULTS = {
  listen = "127.0.0.1:5000",
  auth = { username = "admin", password = nil },
  admin = { username = "forge-admin", password = nil }, -- admin API (/admin/*); no password: the API is off
  metrics = { token = nil },   -- GET /metrics also answers `Authorization: Bearer <token>`
  quotas = nil,                -- instance and weight limits (QUOTA_SCHEMA); none by default
  state_dir = "state",
  services_dir = "services",
  threads = 0,                 -- 0: 2 x cores
  body_limit = 1048576,        -- bytes; larger request bodies get 413
  http = {                     -- limits of the HTTP server against slow or abusive clients
    header_timeout = 5,        -- seconds for a request's headers (an idle keep-alive connection: its next one)
    request_timeout = 30,      -- seconds for its body, once the headers are in
    max_connections = 0,       -- open connections in all; 0: 4000, at most the open-file limit - 64
    max_connections_per_ip = 256, -- open connections of one client address (behind a load balancer: all)
    max_buffered_bytes = 64 * 1048576, -- request bodies held across all connections; beyond: 503
  },
  -- HTTPS (docs/tls.md): PEM files; client_ca asks clients for certificates it signed, and
  -- client_auth (require | optional | cert) says whether one is needed and stands in for Basic auth
  tls = { cert = nil, key = nil, client_ca = nil, client_auth = nil },
  log_level = "info",
  tombstone_ttl = 3600,        -- seconds a deleted instance/binding still answers last_operation
  gone_ttl = 7 * 86400,        -- seconds after that a purged id still answers 410
  reconcile_interval = 0.2,    -- seconds between reconciler passes while work is in flight
  sandbox = { memory = 64 * 1048576, cpu = 2, wall = 10 }, -- per service call: bytes, CPU s, wall s
  store = "sqlite",            -- sqlite (state_dir/forge.db) or etcd (shared by several replicas)
  etcd = { endpoints = { "http://127.0.0.1:2379" }, prefix = "forge/", timeout_ms = 5000 },
  lock_ttl = 15,               -- seconds an operation lock outlives a replica that stopped renewing it
  sync_timeout = 30,           -- seconds a request without accepts_incomplete waits for its operation
  public_url = nil,            -- base URL of this broker as platforms reach it (dashboard_url)
  supervise_interval = 2,      -- seconds between liveness checks of running instances
  targets = {
    ["local"] = {
      host = "127.0.0.1",
      ports = { from = 30000, to = 30999 },
      deploy_timeout = 60,     -- seconds for a deployment to become healthy
      stop_timeout = 10,       -- seconds between TERM and KILL
      command_timeout = 10,    -- seconds for a health check, setup, bind or unbind command
      init_timeout = 120,      -- seconds for each init command (initdb, pg_basebackup, ...)
      -- executables service scripts may start or run on this machine: names (resolved on PATH,
      -- then /usr/lib/<pkg>[/<version>]/bin) or absolute paths; a service declares what it needs
      commands = { "redis-server", "etcd", "etcdctl", "postgres", "initdb", "pg_basebackup", "pg_dump", "pg_restore",
        "sleep", "true" },
      user = "forge-svc",      -- when the broker runs as root, services run as this system user
      users = {},              -- other users a service or plan may ask for (`user = "..."`)
      -- namespaces: each process in its own mount, PID, IPC and UTS namespaces (docs/isolation.md);
      -- falls back to none, with a warning, where the kernel or a non-root broker does not allow it
      isolation = "namespaces",
      hide = {},               -- more paths (files, directories) an isolated process must not see
      -- resource limits of an instance (cgroups, open files) when its plan or service sets none,
      -- and the most a plan may ask for
      limits = { memory_mb = 1024, pids = 512, cpu_shares = 1024, files = 4096 },
      max_limits = { memory_mb = 8192, pids = 4096, cpu_shares = 8192, files = 65536 },
    },
  },
}

-- Quotas (docs/admin.md "Quotas"): live instances per plan ("service/plan"), per service, per
-- organization and per space (organizations: per-organization overrides), and summed plan
-- weights (e.g. memory_mb) over all instances and per organization.
local QUOTA_SCHEMA = {
  plans = { map = "count" }, services = { map = "count" }, organization = "count", space = "count",
  organizations = { map = "count" },
  weights = { map = { plans = { map = "amount" }, total = "amount", organization = "amount" } },
}

local check_value
-- encryption.keys: the keyring (forge.secrets); no section: one key generated in the state dir
local ENCRYPTION_SCHEMA = { keys = { list = { id = "string", file = "string", env = "string" } }, primary = "string" }
local LIMITS_SCHEMA = { memory_mb = "integer", pids = "integer", cpu_shares = "integer", files = "integer" }

local SCHEMA = {
  listen = "string", auth = { username = "string", password = "string" },
  admin = { username = "string", password = "string" }, metrics = { token = "string" },
  quotas = function(v, p, kind) return check_value(v, QUOTA_SCHEMA, p, kind) end,
  backups = function(v, p, kind) return require("forge.backups").check_config(v, p, kind) end,
  encryption = function(v, p, kind)
    local e, err = check_value(v, ENCRYPTION_SCHEMA, p, kind)
    if e == nil then return nil, err end
    return require("forge.secrets").check_config(e, p)
  end,
  state_dir = "string", services_dir = "string", threads = "integer", body_limit = "integer",
  http = { header_timeout = "number", request_timeout = "number", max_connections = "integer",
    max_connections_per_ip = "integer", max_buffered_bytes = "integer" },
  tls = { cert = "string", key = "string", client_ca = "string", client_auth = "string" },
  log_level = "string", tombstone_ttl = "number", gone_ttl = "number", reconcile_interval = "number",
  supervise_interval = "number", sync_timeout = "number", public_url = "string",
  sandbox = { memory = "integer", cpu = "number", wall = "number" },
  store = "string", lock_ttl = "number",
  etcd = { endpoints = "table", prefix = "string", timeout_ms = "integer", username = "string", password = "string",
    cacert = "string", cert = "string", key = "string" },
  -- targets.<name> (type: bosh) are checked by bosh_target against BOSH_SCHEMA
  targets = { ["local"] = { host = "string", ports = { from = "integer", to = "integer" },
    deploy_timeout = "number", stop_timeout = "number", command_timeout = "number", init_timeout = "number",
    commands = "table", user = "string", users = "table", isolation = "string", hide = "table",
    limits = LIMITS_SCHEMA, max_limits = LIMITS_SCHEMA } },
}

-- A BOSH target (targets.<name>, type: bosh). Lists are checked element by element.
local BOSH_SCHEMA = {
  type = "string", url = "string", username = "string", password = "string", client = "string",
  client_secret = "string", ca_cert = "string", insecure = "boolean", timeout_ms = "integer",
  poll_interval = "number", task_timeout = "number", stemcell = { os = "string", version = "string" },
  releases = "map:string", services = "list:string",
  networks = { list = { name = "string", cidr = "string", static = "list:string", azs = "list:string" } },
}

local bosh_target

-- Merge `src` onto `dst` following SCHEMA; returns nil, message on a bad key or type.
local function merge(dst, src, schema, path, kind)
  if type(src) ~= "table" or kind(src) ~= "map" then
    return nil, (path == "" and "the file" or path) .. " must be a map"
  end
  for k, v in pairs(src) do
    local p = path == "" and tostring(k) or path .. "." .. tostring(k)
    local want = schema[k]
    if path == "targets" and k ~= "local" then
      local ok, err = bosh_target(dst, k, v, p, kind)
      if not ok then return nil, err end
      goto continue
    end
    if want == nil then return nil, "unknown setting '" .. p .. "'" end
    if type(want) == "function" then
      local value, err = want(v, p, kind)
      if value == nil then return nil, err end
      dst[k] = value
    elseif type(want) == "table" then
      dst[k] = dst[k] or {}
      local ok, err = merge(dst[k], v, want, p, kind)
      if not ok then return nil, err end
    elseif want == "integer" then
      if math.type(v) ~= "integer" then return nil, p .. " must be an integer" end
      dst[k] = v
    elseif type(v) ~= want then
      return nil, p .. " must be a " .. want
    else
      dst[k] = v
    end
    ::continue::
  end
  return true
end

-- Check a value against a BOSH_SCHEMA or QUOTA_SCHEMA entry: a schema table (a map of those
-- keys), {list = entry}, {map = entry} (any keys), "list:string", "map:string", "count" (an
-- integer >= 0), "amount" (a number >= 0) or a Lua type. Returns the value (copied) | nil, message.
check_value = function(v, want, p, kind)
  if type(want) == "table" and want.map then
    if type(v) ~= "table" or kind(v) ~= "map" then return nil, p .. " must be a map" end
    local out = {}
    for k, e in pairs(v) do
      local ev, err = check_value(e, want.map, p .. "." .. tostring(k), kind)
      if ev == nil then return nil, err end
      out[tostring(k)] = ev
    end
    return out
  elseif type(want) == "table" and want.list then
    if type(v) ~= "table" or kind(v) ~= "seq" then return nil, p .. " must be a list" end
    local out = {}
    for i, e in ipairs(v) do
      local ev, err = check_value(e, want.list, p .. "[" .. i .. "]", kind)
      if ev == nil then return nil, err end
      out[i] = ev
    end
    return out
  elseif type(want) == "table" then
    if type(v) ~= "table" or kind(v) ~= "map" then return nil, p .. " must be a map" end
    local out = {}
    for k, e in pairs(v) do
      if want[k] == nil then return nil, "unknown setting '" .. p .. "." .. tostring(k) .. "'" end
      local ev, err = check_value(e, want[k], p .. "." .. tostring(k), kind)
      if ev == nil then return nil, err end
      out[k] = ev
    end
    return out
  elseif want == "list:string" then
    if type(v) ~= "table" or kind(v) ~= "seq" then return nil, p .. " must be a list of strings" end
    for _, e in ipairs(v) do if type(e) ~= "string" then return nil, p .. " must be a list of strings" end end
    return util.copy(v)
  elseif want == "map:string" then
    if type(v) ~= "table" or kind(v) ~= "map" then return nil, p .. " must be a map of strings" end
    local out = {}
    for k, e in pairs(v) do
      if type(e) ~= "string" and type(e) ~= "number" then return nil, p .. "." .. tostring(k) .. " must be a string" end
      out[tostring(k)] = tostring(e)
    end
    return out
  elseif want == "integer" then
    if math.type(v) ~= "integer" then return nil, p .. " must be an integer" end
  elseif want == "count" then
    if math.type(v) ~= "integer" or v < 0 then return nil, p .. " must be a whole number >= 0" end
  elseif want == "amount" then
    if type(v) ~= "number" or v < 0 then return nil, p .. " must be a number >= 0" end
  elseif type(v) ~= want then
    return nil, p .. " must be a " .. want
  end
  return v
end

bosh_target = function(dst, name, v, p, kind)
  if type(name) ~= "string" or not name:match("^[%w][%w%-_%.]*$") then
    return nil, "target name '" .. tostring(name) .. "' must use letters, digits, '-', '_' and '.'"
  end
  if type(v) ~= "table" or kind(v) ~= "map" then return nil, p .. " must be a map" end
  if v.type ~= "bosh" then return nil, p .. ".type must be 'bosh' (the only target type besides 'local')" end
  local t, err = check_value(v, BOSH_SCHEMA, p, kind)
  if not t then return nil, err end
  dst[name] = t
  return true
end

local function absolute(path)
  if path:sub(1, 1) == "/" then return path end
  return require("lfs").currentdir() .. "/" .. path
end

-- FORGE_* values: text -> value | raise with a message.
local function number(name, v) return tonumber(v) or error(name .. " must be a number", 0) end
local function integer(name, v) return math.tointeger(tonumber(v)) or error(name .. " must be an integer", 0) end
local function list(_, v)
  local out = {}
  for e in v:gmatch("[^,%s]+") do out[#out + 1] = e end
  return out
end
local function port_range(name, v)
  local from, to = v:match("^(%d+)%-(%d+)$")
  if not from then error(name .. " must look like 30000-30999", 0) end
  return { from = tonumber(from), to = tonumber(to) }
end
local function quotas(name, v)
  local yaml = require "forge.yaml"
  local doc, err = yaml.decode(v, name)
  if err then error(tostring(err), 0) end
  local q, qerr = check_value(doc, QUOTA_SCHEMA, name, yaml.kind)
  if q == nil then error(qerr, 0) end
  return q
end

-- FORGE_* overrides: variable, the setting it sets, how its text is read (default: as is), and
-- what `forge help` says of its form.
local ENV = {
  { "FORGE_LISTEN", "listen" },
  { "FORGE_USER", "auth.username" },
  { "FORGE_PASSWORD", "auth.password" },
  { "FORGE_ADMIN_USER", "admin.username" },
  { "FORGE_ADMIN_PASSWORD", "admin.password" },
  { "FORGE_METRICS_TOKEN", "metrics.token" },
  { "FORGE_STATE_DIR", "state_dir" },
  { "FORGE_SERVICES_DIR", "services_dir" },
  { "FORGE_LOG_LEVEL", "log_level" },
  { "FORGE_PUBLIC_URL", "public_url" },
  { "FORGE_THREADS", "threads", integer },
  { "FORGE_SYNC_TIMEOUT", "sync_timeout", number },
  { "FORGE_SANDBOX_CPU", "sandbox.cpu", number },
  { "FORGE_SANDBOX_MEMORY", "sandbox.memory", integer },
  { "FORGE_STORE", "store" },
  { "FORGE_ETCD_ENDPOINTS", "etcd.endpoints", list, "comma-separated URLs" },
  { "FORGE_ETCD_PREFIX", "etcd.prefix" },
  { "FORGE_LOCK_TTL", "lock_ttl", number },
  { "FORGE_PORTS", "targets.local.ports", port_range, "FROM-TO, e.g. 30000-30999" },
  { "FORGE_LOCAL_COMMANDS", "targets.local.commands", list, "comma-separated" },
  { "FORGE_LOCAL_USER", "targets.local.user" },
  { "FORGE_QUOTAS", "quotas", quotas, "the section as YAML or JSON, e.g. '{organization: 20}'" },
  { "FORGE_LOCAL_ISOLATION", "targets.local.isolation" },
  { "FORGE_TLS_CERT", "tls.cert", nil, "PEM file: serve HTTPS" },
  { "FORGE_TLS_KEY", "tls.key", nil, "PEM file" },
  { "FORGE_TLS_CLIENT_CA", "tls.client_ca", nil, "PEM file: ask clients for certificates it signed" },
  { "FORGE_TLS_CLIENT_AUTH", "tls.client_auth", nil, "require, optional or cert" },
}

-- Set the setting at dotted `path` of c (its parents exist in DEFAULTS).
local function set(c, path, value)
  local head, rest = path:match("^([^.]+)%.(.+)$")
  if head then return set(c[head], rest, value) end
  c[path] = value
end

--- The FORGE_* variables and the settings they override, in the order `forge help` lists them.
-- @return list of {name, setting, form}
function M.environment()
  local out = {}
  for i, e in ipairs(ENV) do out[i] = { name = e[1], setting = e[2], form = e[4] } end
  return out
end

local function validate_etcd(e)
  if type(e.endpoints) ~= "table" or #e.endpoints == 0 then return nil, "etcd.endpoints must list at least one URL" end
  for i, url in ipairs(e.endpoints) do
    if type(url) ~= "string" or not url:match("^https?://[^/%s]+/?$") then
      return nil, string.format("etcd.endpoints[%d] must be an http:// or https:// URL such as "
        .. "http://10.0.0.5:2379 (got '%s')", i, tostring(url))
    end
  end
  return true
end

local CLIENT_AUTH = { require = true, optional = true, cert = true }

-- How the tls settings go together; checked where they are used (forge serve), so a command
-- that only reads the config does not depend on them.
local function validate_tls(t)
  if (t.cert == nil) ~= (t.key == nil) then return nil, "tls.cert and tls.key go together: give both or neither" end
  if t.client_ca and not t.cert then
    return nil, "tls.client_ca needs tls.cert and tls.key: client certificates are asked for over HTTPS only"
  end
  if t.client_auth and not t.client_ca then return nil, "tls.client_auth needs tls.client_ca" end
  return true
end

local function validate(c)
  if c.tls.client_auth and not CLIENT_AUTH[c.tls.client_auth] then
    return nil, "tls.client_auth must be require, optional or cert"
  end
  local ports = c.targets["local"].ports
  if ports.from < 1024 or ports.to > 65535 or ports.from > ports.to then
    return nil, "targets.local.ports must be a range within 1024..65535"
  end
  if not c.auth.username or c.auth.username == "" then return nil, "auth.username must not be empty" end
  if c.auth.password == "" then return nil, "auth.password must not be empty (or leave it unset)" end
  if not ({ debug = 1, info = 1, warn = 1, error = 1 })[c.log_level] then
    return nil, "log_level must be debug, info, warn or error"
  end
  if c.body_limit <= 0 then return nil, "body_limit must be positive" end
  local h = c.http
  if not (h.header_timeout > 0 and h.request_timeout > 0) then
    return nil, "http.header_timeout and http.request_timeout must be positive"
  end
  if h.max_connections < 0 then return nil, "http.max_connections must be positive (or 0: automatic)" end
  if h.max_connections_per_ip < 1 or h.max_buffered_bytes < 1 then
    return nil, "http.max_connections_per_ip and http.max_buffered_bytes must be positive"
  end
  local lt = c.targets["local"]
  for i, cmd in ipairs(lt.commands) do
    if type(cmd) ~= "string" or cmd == "" or (cmd:find("/", 1, true) and cmd:sub(1, 1) ~= "/") then
      return nil, "targets.local.commands[" .. i .. "] must be a command name or an absolute path"
    end
  end
  for i, u in ipairs(lt.users) do
    if type(u) ~= "string" or not u:match("^[%w_][%w%-_%.]*$") or u == "root" then
      return nil, "targets.local.users[" .. i .. "] must be a user name other than root"
    end
  end
  if not lt.user:match("^[%w_][%w%-_%.]*$") or lt.user == "root" then
    return nil, "targets.local.user must be a user name other than root"
  end
  if lt.isolation ~= "namespaces" and lt.isolation ~= "none" then
    return nil, "targets.local.isolation must be namespaces or none"
  end
  for i, path in ipairs(lt.hide) do
    if type(path) ~= "string" or path:sub(1, 1) ~= "/" then
      return nil, "targets.local.hide[" .. i .. "] must be an absolute path"
    end
  end
  for _, k in ipairs({ "memory_mb", "pids", "cpu_shares", "files" }) do
    if lt.limits[k] < 1 or lt.max_limits[k] < 1 then
      return nil, "targets.local.limits." .. k .. " and targets.local.max_limits." .. k .. " must be positive"
    end
    if lt.limits[k] > lt.max_limits[k] then
      return nil, string.format("targets.local.limits.%s (%d) is above targets.local.max_limits.%s (%d)", k,
        lt.limits[k], k, lt.max_limits[k])
    end
  end
  if c.store ~= "sqlite" and c.store ~= "etcd" then return nil, "store must be sqlite or etcd" end
  if c.store == "etcd" then
    local ok, err = validate_etcd(c.etcd)
    if not ok then return nil, err end
  end
  local claims = {}
  local names = {}
  for name in pairs(c.targets) do if name ~= "local" then names[#names + 1] = name end end
  table.sort(names)
  for _, name in ipairs(names) do
    local t, p = c.targets[name], "targets." .. name
    if type(t.url) ~= "string" or not t.url:match("^https?://") then return nil, p .. ".url must be an http(s) URL" end
    if t.client then
      if not t.client_secret then return nil, p .. ": client needs client_secret" end
    elseif not (t.username and t.password) then
      return nil, p .. ": give username and password (basic) or client and client_secret (UAA)"
    end
    if type(t.networks) ~= "table" or #t.networks == 0 then return nil, p .. ".networks must list at least one network" end
    local seen = {}
    for i, n in ipairs(t.networks) do
      local np = p .. ".networks[" .. i .. "]"
      if type(n.name) ~= "string" or n.name == "" then return nil, np .. ".name must be a non-empty string" end
      if seen[n.name] then return nil, np .. ": duplicate network name '" .. n.name .. "'" end
      seen[n.name] = true
      if type(n.static) ~= "table" or #n.static == 0 then return nil, np .. ".static must list IPs or ranges" end
      local pool, perr = require("forge.targets.bosh").expand_static(n.static, n.cidr)
      if not pool then return nil, np .. ": " .. perr end
    end
    for _, claim in ipairs(t.services or {}) do
      if claims[claim] then
        return nil, p .. ".services: '" .. claim .. "' is already served by target " .. claims[claim]
      end
      claims[claim] = name
    end
  end
  return true
end

-- The settings that name services or plans: {path, name, plan_only}.
local function references(c)
  local refs = {}
  local names = {}
  for name in pairs(c.targets) do if name ~= "local" then names[#names + 1] = name end end
  table.sort(names)
  for _, name in ipairs(names) do
    for i, claim in ipairs(c.targets[name].services or {}) do
      refs[#refs + 1] = { path = "targets." .. name .. ".services[" .. i .. "]", name = claim }
    end
  end
  local function keys(map, path, plan_only)
    local sorted = {}
    for k in pairs(map or {}) do sorted[#sorted + 1] = k end
    table.sort(sorted)
    for _, k in ipairs(sorted) do refs[#refs + 1] = { path = path, name = k, plan_only = plan_only } end
  end
  local q = c.quotas or {}
  keys(q.plans, "quotas.plans", true)
  keys(q.services, "quotas.services", false)
  local weights = {}
  for w in pairs(q.weights or {}) do weights[#weights + 1] = w end
  table.sort(weights)
  for _, w in ipairs(weights) do keys(q.weights[w].plans, "quotas.weights." .. w .. ".plans", true) end
  return refs
end

--- Check the settings that name services or plans (`targets.X.services`, the quotas' plans and
-- services) against the loaded services: a name that matches nothing would otherwise leave a
-- plan silently on `local`, or a quota counting nothing.
-- @param registry  the loaded services (forge.services: by_name, errors = refused services)
-- @return errors, warnings (lists of messages; a name that may be a refused service is a warning)
function M.check_references(c, registry)
  local errors, warnings = {}, {}
  for _, ref in ipairs(references(c)) do
    local service, plan = ref.name:match("^([^/]+)/(.+)$")
    service = service or ref.name
    local svc = registry.by_name[service]
    local known = svc ~= nil and plan == nil
    for _, p in ipairs(svc and plan and svc.script.plans or {}) do known = known or p.name == plan end
    local where = ref.path .. ": '" .. ref.name .. "'"
    if ref.plan_only and not plan then
      errors[#errors + 1] = where .. " must name a plan as service/plan"
    elseif svc and not known then
      errors[#errors + 1] = where .. ": service " .. service .. " has no plan '" .. plan .. "'"
    elseif not svc and #(registry.errors or {}) > 0 then
      warnings[#warnings + 1] = where .. " names no loaded service (a refused one?)"
    elseif not svc then
      errors[#errors + 1] = where .. " names no loaded service"
    end
  end
  return errors, warnings
end

--- Load the configuration.
-- @param path  forge.yml path, or nil for defaults + environment only
-- @param getenv  optional function(name) (default os.getenv), for specs
-- @return config table | nil, message
function M.load(path, getenv)
  getenv = getenv or os.getenv
  local c = util.copy(DEFAULTS)
  if path then
    local f, ferr = io.open(path, "r")
    if not f then return nil, "cannot read config: " .. ferr end
    local text = f:read("a")
    f:close()
    local yaml = require "forge.yaml"
    local doc, err = yaml.decode(text, path)
    if err then return nil, tostring(err) end
    if doc ~= nil and doc ~= yaml.null then
      local ok, merr = merge(c, doc, SCHEMA, "", yaml.kind)
      if not ok then return nil, path .. ": " .. merr end
    end
  end
  for _, e in ipairs(ENV) do
    local v = getenv(e[1])
    if v and v ~= "" then
      local ok, value = pcall(e[3] or function(_, text) return text end, e[1], v)
      if not ok then return nil, value end
      set(c, e[2], value)
    end
  end
  local ok, err = validate(c)
  if not ok then return nil, err end
  c.state_dir = absolute(c.state_dir)
  c.services_dir = absolute(c.services_dir)
  for _, k in ipairs({ "cert", "key", "client_ca" }) do
    if c.tls[k] then c.tls[k] = absolute(c.tls[k]) end
  end
  return c
end

--- The HTTPS credentials of a loaded config with tls.cert, read from their files and checked (the
-- settings go together, the key is the certificate's, the CA holds a certificate): at start and on
-- every reload. A config with tls.client_ca or tls.key but no tls.cert gets its message too.
-- @return pem {cert, key, client_ca, client_auth} (PEM text), info {serial, subject, not_after}
--   | nil, message
function M.tls_credentials(c)
  local ok, err = validate_tls(c.tls)
  if not ok then return nil, err end
  local pem = { client_auth = c.tls.client_auth }
  for _, k in ipairs({ "cert", "key", "client_ca" }) do
    if c.tls[k] then
      local f, ferr = io.open(c.tls[k], "rb")
      if not f then return nil, "tls." .. k .. ": cannot read " .. ferr end
      pem[k] = f:read("a")
      f:close()
    end
  end
  local info, cerr = require("forge.http").tls_check { cert = pem.cert, key = pem.key, client_ca = pem.client_ca }
  if not info then return nil, cerr.message .. " (" .. c.tls.cert .. ", " .. c.tls.key .. ")" end
  return pem, info
end

return M
