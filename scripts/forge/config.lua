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
  log_level = "info",
  tombstone_ttl = 3600,        -- seconds a deleted instance/binding still answers last_operation
  gone_ttl = 7 * 86400,        -- seconds after that a purged id still answers 410
  reconcile_interval = 0.2,    -- seconds between reconciler passes
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
      commands = { "redis-server", "etcd", "etcdctl", "postgres", "initdb", "pg_basebackup", "sleep", "true" },
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

local LIMITS_SCHEMA = { memory_mb = "integer", pids = "integer", cpu_shares = "integer", files = "integer" }

local SCHEMA = {
  listen = "string", auth = { username = "string", password = "string" },
  admin = { username = "string", password = "string" },
  state_dir = "string", services_dir = "string", threads = "integer", body_limit = "integer",
  http = { header_timeout = "number", request_timeout = "number", max_connections = "integer",
    max_connections_per_ip = "integer", max_buffered_bytes = "integer" },
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
    if type(want) == "table" then
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

-- Check a value against a BOSH_SCHEMA entry; returns the value (copied) | nil, message.
local function check_value(v, want, p, kind)
  if type(want) == "table" and want.list then
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

-- FORGE_* overrides: variable, setter.
local ENV = {
  { "FORGE_LISTEN", function(c, v) c.listen = v end },
  { "FORGE_USER", function(c, v) c.auth.username = v end },
  { "FORGE_PASSWORD", function(c, v) c.auth.password = v end },
  { "FORGE_ADMIN_USER", function(c, v) c.admin.username = v end },
  { "FORGE_ADMIN_PASSWORD", function(c, v) c.admin.password = v end },
  { "FORGE_STATE_DIR", function(c, v) c.state_dir = v end },
  { "FORGE_SERVICES_DIR", function(c, v) c.services_dir = v end },
  { "FORGE_LOG_LEVEL", function(c, v) c.log_level = v end },
  { "FORGE_PUBLIC_URL", function(c, v) c.public_url = v end },
  { "FORGE_SYNC_TIMEOUT", function(c, v) c.sync_timeout = tonumber(v) end },
  { "FORGE_SANDBOX_CPU", function(c, v) c.sandbox.cpu = tonumber(v) end },
  { "FORGE_STORE", function(c, v) c.store = v end },
  { "FORGE_ETCD_ENDPOINTS", function(c, v)
      c.etcd.endpoints = {}
      for e in v:gmatch("[^,%s]+") do c.etcd.endpoints[#c.etcd.endpoints + 1] = e end
    end },
  { "FORGE_ETCD_PREFIX", function(c, v) c.etcd.prefix = v end },
  { "FORGE_LOCK_TTL", function(c, v) c.lock_ttl = tonumber(v) end },
  { "FORGE_SANDBOX_MEMORY", function(c, v) c.sandbox.memory = math.tointeger(tonumber(v)) end },
  { "FORGE_THREADS", function(c, v) c.threads = tonumber(v) end },
  { "FORGE_LOCAL_COMMANDS", function(c, v)
      local list = {}
      for e in v:gmatch("[^,%s]+") do list[#list + 1] = e end
      c.targets["local"].commands = list
    end },
  { "FORGE_LOCAL_USER", function(c, v) c.targets["local"].user = v end },
  { "FORGE_LOCAL_ISOLATION", function(c, v) c.targets["local"].isolation = v end },
  { "FORGE_PORTS", function(c, v)
      local from, to = v:match("^(%d+)%-(%d+)$")
      if not from then error("FORGE_PORTS must look like 30000-30999", 0) end
      c.targets["local"].ports = { from = tonumber(from), to = tonumber(to) }
    end },
}

local function validate(c)
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
  if c.store == "etcd" and (#c.etcd.endpoints == 0 or type(c.etcd.endpoints[1]) ~= "string") then
    return nil, "etcd.endpoints must list at least one URL"
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
      local ok, err = pcall(e[2], c, v)
      if not ok then return nil, err end
    end
  end
  local ok, err = validate(c)
  if not ok then return nil, err end
  c.state_dir = absolute(c.state_dir)
  c.services_dir = absolute(c.services_dir)
  return c
end

return M
