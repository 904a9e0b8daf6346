-- Start and stop a real `forge serve` for specs: temp state dir, free ports, own port pool.
local proc = require "forge.proc"
local client = require "spec.support.client"
local cjson = require "cjson"
local files = require "spec.support.files"
local tls_certs = require "spec.support.tls_certs"

local M = {}
M.__index = M

local REDIS_SERVICE = "6f0f3c1e-3b5e-4c2a-9a43-1f6b7f3f2f01"
M.redis = { service = REDIS_SERVICE, one = "68ec5c0f-7289-47a5-87ba-aff068f3aa2f",
  three = "8ff52a10-1314-4a33-8127-68d8c4961c05" }

local function free_port()
  for _ = 1, 200 do
    local p = math.random(20000, 29999)
    if proc.port_free(p) and proc.port_free(p + 1) then return p end
  end
  error("no free port")
end

--- A temp directory (removed by :cleanup()).
M.tmpdir = files.tempdir

--- A services dir holding the shipped services plus the spec fixtures (spec/fixtures/services).
function M.services_with_fixtures(state_dir)
  local dir = state_dir .. "/services"
  local pwd = os.getenv("PWD")
  assert(os.execute("mkdir -p " .. dir .. " && ln -s " .. pwd .. "/services/* " .. pwd ..
    "/spec/fixtures/services/* " .. dir .. "/"))
  return dir
end

M.dummy = { service = "d0d0d0d0-0000-4000-8000-000000000001", small = "d0d0d0d0-0000-4000-8000-000000000010",
  large = "d0d0d0d0-0000-4000-8000-000000000020", unbindable = "d0d0d0d0-0000-4000-8000-000000000030" }

-- The fixture service whose instance never becomes healthy (spec/fixtures/services/stuck).
M.stuck = { service = "5c0c0c0c-0000-4000-8000-000000000001", plan = "5c0c0c0c-0000-4000-8000-000000000010" }

--- Call fn every 0.1 s until it returns a true value (returned) or `timeout` seconds (default 10) pass (nil).
function M.wait_for(fn, timeout)
  local deadline = proc.monotonic() + (timeout or 10)
  repeat
    local v = fn()
    if v then return v end
    proc.sleep(0.1)
  until proc.monotonic() > deadline
end

-- HTTPS for a broker: certificates made under its state dir (self.certs), FORGE_TLS_* in env.
-- tls: true, or {client_auth = "require" | "optional" | "cert"} to ask for client certificates too.
local function use_tls(self, tls, env)
  local dir = self.state_dir .. "/tls"
  assert(os.execute("mkdir -p " .. dir))
  self.certs = tls_certs.make(dir)
  env.FORGE_TLS_CERT, env.FORGE_TLS_KEY = self.certs.server_cert, self.certs.server_key
  if type(tls) == "table" and tls.client_auth then
    env.FORGE_TLS_CLIENT_CA, env.FORGE_TLS_CLIENT_AUTH = self.certs.ca, tls.client_auth
    self.client_cert = true
  end
end

--- Start a broker. opts: services_dir, fixtures (add spec fixtures), pool (port count), env, state_dir,
-- config (YAML text of a forge.yml, written to <state_dir>/forge-spec.yml and passed as --config;
-- the FORGE_* environment still overrides it), tls (HTTPS: see use_tls; b:url and b:call follow).
function M.start(opts)
  opts = opts or {}
  local self = setmetatable({}, M)
  self.state_dir = opts.state_dir or M.tmpdir()
  if opts.fixtures then opts.services_dir = M.services_with_fixtures(self.state_dir) end
  self.port = free_port()
  self.user, self.password = "admin", "s3cret-" .. math.random(1e6)
  self.admin_user, self.admin_password = "ops", "ops-" .. math.random(1e6)
  local pool = opts.pool or 8
  -- below the kernel's ephemeral range (32768-60999): a client's local port never sits in the pool
  local base = opts.pool_base or (30000 + math.random(0, 260) * 10)
  self.pool = { from = base, to = base + pool - 1 }
  local env = {
    PATH = os.getenv("PATH"), HOME = os.getenv("HOME") or "/root",
    FORGE_LISTEN = "127.0.0.1:" .. self.port, FORGE_USER = self.user, FORGE_PASSWORD = self.password,
    FORGE_ADMIN_USER = self.admin_user, FORGE_ADMIN_PASSWORD = self.admin_password,
    FORGE_STATE_DIR = self.state_dir, FORGE_SERVICES_DIR = opts.services_dir or (os.getenv("PWD") .. "/services"),
    FORGE_PORTS = self.pool.from .. "-" .. self.pool.to, FORGE_LOG_LEVEL = opts.log_level or "info",
  }
  if opts.tls then use_tls(self, opts.tls, env) end
  for k, v in pairs(opts.env or {}) do env[k] = v end
  self.env = env
  self.admin_user, self.admin_password = env.FORGE_ADMIN_USER, env.FORGE_ADMIN_PASSWORD
  self.bin = opts.bin
  if opts.config then
    self.config_path = self.state_dir .. "/forge-spec.yml"
    local f = assert(io.open(self.config_path, "w"))
    f:write(opts.config)
    f:close()
  end
  self.log = self.state_dir .. "/broker.log"
  return self:launch()
end

--- (Re)start the broker process on the same state dir and port.
function M:launch()
  -- run in the state dir: no forge.yml there, so defaults + the FORGE_* environment apply
  local argv = { os.getenv("PWD") .. "/" .. (self.bin or "build/bin/forge"), "serve" }
  if self.config_path then argv[3], argv[4] = "--config", self.config_path end
  local p = assert(proc.spawn { argv = argv, env = self.env, stdout = self.log, cwd = self.state_dir })
  self.pid, self.start_time = p.pid, p.start_time
  local deadline = proc.monotonic() + 15
  while proc.monotonic() < deadline do
    if not proc.alive(self.pid, self.start_time) then
      error("broker exited at start:\n" .. self:read_log())
    end
    local status = client.request("GET", self:url("/healthz"), self:client_opts())
    if status == 200 then return self end
    proc.sleep(0.05)
  end
  error("broker did not come up:\n" .. self:read_log())
end

function M:read_log() return files.read(self.log) end

--- The broker's store as the broker opens it: values opened with its keyring (its config and
-- environment: the generated <state_dir>/forge.key unless they name keys). Close it after use.
function M:store()
  local config = assert(require("forge.config").load(self.config_path, function(name) return self.env[name] end))
  return assert(require("forge.storage").open(config))
end

--- The stored records as key -> "mod_revision:value", without the reconciler's lock
-- bookkeeping (lock/ keys): what a refused request must leave unchanged.
-- Keys the broker changes in the background whatever a request does: locks, and the
-- reconciler's indexes, which its housekeeping trims.
local BACKGROUND = { "^lock/", "^supervised/", "^due/", "^creating/" }

local function background(key)
  for _, p in ipairs(BACKGROUND) do
    if key:match(p) then return true end
  end
end

--- Every stored record, key -> "revision:value", without the background keys unless `all`.
function M:records(all)
  local db = self:store()
  local kvs = db:range("")
  db:close()
  local t = {}
  for _, kv in ipairs(kvs) do
    if all or not background(kv.key) then t[kv.key] = kv.mod_revision .. ":" .. kv.value end
  end
  return t
end

function M:url(path) return (self.certs and "https" or "http") .. "://127.0.0.1:" .. self.port .. path end

--- spec.support.client options (opts, or a new table) with what this broker's TLS needs: the
-- test CA, and the client certificate when the broker asks for one.
function M:client_opts(opts)
  opts = opts or {}
  if self.certs then
    opts.cacert = self.certs.ca
    if self.client_cert then opts.cert, opts.key = self.certs.client_cert, self.certs.client_key end
  end
  return opts
end

--- The stored record of instance `id` (decoded), or nil.
function M:instance(id)
  local db = self:store()
  local kv = db:get("instance/" .. id)
  db:close()
  return kv and cjson.decode(kv.value)
end

--- An authenticated OSB request with the version header (admin credentials for /admin/...);
-- body tables are JSON-encoded.
function M:call(method, path, body, headers)
  local h = { ["X-Broker-API-Version"] = "2.17" }
  if body ~= nil then h["Content-Type"] = "application/json" end
  for k, v in pairs(headers or {}) do h[k] = v end
  if type(body) == "table" then body = cjson.encode(body) end
  local admin = path:match("^/admin/") ~= nil
  return client.request(method, self:url(path), self:client_opts { body = body, headers = h,
    user = admin and self.admin_user or self.user, password = admin and self.admin_password or self.password })
end

--- An async provision of instance `id` (org "o" and space "s" unless given); asserts the 202.
function M:provision_async(id, service, plan, org, space, context)
  local status, raw = self:call("PUT", "/v2/service_instances/" .. id .. "?accepts_incomplete=true",
    { service_id = service, plan_id = plan, organization_guid = org or "o", space_guid = space or "s", context = context })
  if status ~= 202 then error(string.format("provision of %s: expected 202, got %s: %s", id, tostring(status), raw), 2) end
end

--- Poll the admin view of instance `id` until its operation is no longer in progress; returns it.
function M:settle(id, timeout)
  local found = M.wait_for(function()
    local _, _, _, body = self:call("GET", "/admin/instances/" .. id)
    return body.operation.state ~= "in progress" and body
  end, timeout or 30)
  return found or error("instance " .. id .. " still in progress:\n" .. self:read_log())
end

--- Poll last_operation until it is no longer in progress; returns the final body.
function M:wait_operation(path, timeout)
  local deadline = proc.monotonic() + (timeout or 30)
  while proc.monotonic() < deadline do
    local status, _, _, body = self:call("GET", path .. "/last_operation")
    if status ~= 200 then return nil, status end
    if body.state ~= "in progress" then return body end
    proc.sleep(0.1)
  end
  error("operation still in progress after timeout:\n" .. self:read_log())
end

--- Stop with SIGTERM (graceful) or `sig`; returns the exit status.
function M:stop(sig)
  if not self.pid then return end
  if sig == "KILL" then
    proc.kill(self.pid, self.start_time, "KILL")
    local w = proc.wait(self.pid, 10)
    self.pid = nil
    return w
  end
  proc.kill(self.pid, self.start_time, sig or "TERM")
  local w = proc.wait(self.pid, 40)
  self.pid = nil
  return w
end

--- Stop the broker and every process it started (found by their FORGE_PROCESS marker), remove the
-- cgroups of instances still there (named as the local target names them) and the state.
function M:cleanup()
  self:stop("TERM")
  M.forget_instances(self.state_dir)
  os.execute("rm -rf '" .. self.state_dir .. "'")
end

--- Kill every process of the instances under state_dir and remove their cgroups (the broker
-- that ran them is stopped; a spec whose replicas share one state dir calls this once for it).
function M.forget_instances(state_dir)
  for _, pid in ipairs(M.marked_pids(state_dir)) do
    local start = proc.identity(pid)           -- nil when it exited meanwhile
    if start then proc.kill(pid, start, "KILL") end
  end
  local lfs = require "lfs"
  local crypto = require "forge.crypto"
  local instances = state_dir .. "/instances"
  local ids = {}
  if lfs.attributes(instances, "mode") then
    for id in lfs.dir(instances) do ids[#ids + 1] = id end
  end
  for _, id in ipairs(ids) do
    if id ~= "." and id ~= ".." and lfs.attributes(instances .. "/" .. id, "mode") == "directory" then
      local name = id:sub(1, 200) .. "-" .. crypto.sha256_hex(state_dir .. "\0" .. id):sub(1, 12)
      for _, c in ipairs({ "memory", "pids", "cpu", "." }) do
        local dir = "/sys/fs/cgroup/" .. c .. "/forge/" .. name
        local deadline = proc.monotonic() + 5   -- killed processes leave it once they have exited
        while lfs.attributes(dir, "mode") and not lfs.rmdir(dir) and proc.monotonic() < deadline do proc.sleep(0.02) end
      end
    end
  end
end

--- Pids of live processes spawned for instances under state_dir (by their working directory).
function M.marked_pids(state_dir, instance_id)
  local lfs = require "lfs"
  local pids = {}
  local prefix = state_dir .. "/instances/" .. (instance_id and (instance_id .. "/") or "")
  for entry in lfs.dir("/proc") do
    if entry:match("^%d+$") then
      local cwd = lfs.symlinkattributes("/proc/" .. entry .. "/cwd", "target") or ""
      if cwd:sub(1, #prefix) == prefix and proc.identity(tonumber(entry)) then pids[#pids + 1] = tonumber(entry) end
    end
  end
  return pids
end

return M
