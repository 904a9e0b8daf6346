--- Broker configuration: one YAML file (forge.yml) with environment overrides.
--
-- Precedence: built-in defaults < the YAML file < FORGE_* environment variables.
-- Unknown keys are refused (a typo must not silently fall back to a default).
local util = require "forge.util"

local M = {}

local DEFAULTS = {
  listen = "127.0.0.1:5000",
  auth = { username = "admin", password = nil },
  state_dir = "state",
  services_dir = "services",
  threads = 0,                 -- 0: 2 x cores
  body_limit = 1048576,        -- bytes; larger request bodies get 413
  log_level = "info",
  tombstone_ttl = 3600,        -- seconds a deleted instance/binding still answers last_operation
  gone_ttl = 7 * 86400,        -- seconds after that a purged id still answers 410
  reconcile_interval = 0.2,    -- seconds between reconciler passes
  sandbox = { memory = 64 * 1048576, cpu = 2, wall = 10 }, -- per service call: bytes, CPU s, wall s
  sync_timeout = 30,           -- seconds a request without accepts_incomplete waits for its operation
  public_url = nil,            -- base URL of this broker as platforms reach it (dashboard_url)
  supervise_interval = 2,      -- seconds between liveness checks of running instances
  targets = {
    ["local"] = {
      host = "127.0.0.1",
      ports = { from = 30000, to = 30999 },
      deploy_timeout = 60,     -- seconds for a deployment to become healthy
      stop_timeout = 10,       -- seconds between TERM and KILL
      command_timeout = 10,    -- seconds for a bind/unbind command
    },
  },
}

local SCHEMA = {
  listen = "string", auth = { username = "string", password = "string" },
  state_dir = "string", services_dir = "string", threads = "integer", body_limit = "integer",
  log_level = "string", tombstone_ttl = "number", gone_ttl = "number", reconcile_interval = "number",
  supervise_interval = "number", sync_timeout = "number", public_url = "string",
  sandbox = { memory = "integer", cpu = "number", wall = "number" },
  targets = { ["local"] = { host = "string", ports = { from = "integer", to = "integer" },
    deploy_timeout = "number", stop_timeout = "number", command_timeout = "number" } },
}

-- Merge `src` onto `dst` following SCHEMA; returns nil, message on a bad key or type.
local function merge(dst, src, schema, path, kind)
  if type(src) ~= "table" or kind(src) ~= "map" then
    return nil, (path == "" and "the file" or path) .. " must be a map"
  end
  for k, v in pairs(src) do
    local p = path == "" and tostring(k) or path .. "." .. tostring(k)
    local want = schema[k]
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
  end
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
  { "FORGE_STATE_DIR", function(c, v) c.state_dir = v end },
  { "FORGE_SERVICES_DIR", function(c, v) c.services_dir = v end },
  { "FORGE_LOG_LEVEL", function(c, v) c.log_level = v end },
  { "FORGE_PUBLIC_URL", function(c, v) c.public_url = v end },
  { "FORGE_SYNC_TIMEOUT", function(c, v) c.sync_timeout = tonumber(v) end },
  { "FORGE_SANDBOX_CPU", function(c, v) c.sandbox.cpu = tonumber(v) end },
  { "FORGE_SANDBOX_MEMORY", function(c, v) c.sandbox.memory = math.tointeger(tonumber(v)) end },
  { "FORGE_THREADS", function(c, v) c.threads = tonumber(v) end },
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
