-- Start and stop simulated BOSH directors (scripts/forge/boshsim.lua) as child processes for specs.
local proc = require "forge.proc"
local files = require "spec.support.files"
local client = require "spec.support.client"
local cjson = require "cjson"

local M = {}
M.__index = M

local free_port = require("spec.support.net").free_port

local function tmpdir()
  local p = os.tmpname()
  os.remove(p)
  assert(os.execute("mkdir -p '" .. p .. "'"))
  return p
end

--- Start a sim. opts: auth ("basic"|"uaa"), user, password, client, secret, token_ttl, task_delay,
-- vms_delay, subnets = {"[name=]CIDR:FIRST-LAST", ...}, args = {extra argv}.
function M.start(opts)
  opts = opts or {}
  local self = setmetatable({ opts = opts }, M)
  self.dir = tmpdir()
  self.auth = opts.auth or "basic"
  self.user, self.password = opts.user or "admin", opts.password or ("pw-" .. math.random(1e6))
  self.client, self.secret = opts.client or "forge-broker", opts.secret or ("sec-" .. math.random(1e6))
  local pwd = os.getenv("PWD")
  local argv = { pwd .. "/build/bin/forge", "lua", pwd .. "/scripts/forge/boshsim_main.lua",
    "--state", self.dir, "--auth", self.auth, "--user", self.user, "--password", self.password,
    "--client", self.client, "--secret", self.secret,
    "--task-delay", tostring(opts.task_delay or 0.3), "--vms-delay", tostring(opts.vms_delay or 0.05),
    "--token-ttl", tostring(opts.token_ttl or 120), "--threads", "4" }
  for _, s in ipairs(opts.subnets or {}) do
    argv[#argv + 1] = "--subnet"
    argv[#argv + 1] = s
  end
  for _, a in ipairs(opts.args or {}) do argv[#argv + 1] = a end
  self.argv = argv
  self.log = self.dir .. "/sim.log"
  for _ = 1, 5 do                                    -- a port taken between probe and bind: try another
    self.port = free_port()
    self.url = "http://127.0.0.1:" .. self.port
    argv[#argv + 1] = "--listen"
    argv[#argv + 1] = "127.0.0.1:" .. self.port
    local p = assert(proc.spawn { argv = argv, stdout = self.log })
    self.pid, self.start_time = p.pid, p.start_time
    local deadline = proc.monotonic() + 10
    while proc.monotonic() < deadline and proc.alive(self.pid, self.start_time) do
      if client.request("GET", self.url .. "/info", { timeout = 2 }) == 200 then return self end
      proc.sleep(0.05)
    end
    self:stop()
    argv[#argv], argv[#argv - 1] = nil, nil
  end
  error("boshsim did not come up:\n" .. self:read_log())
end

function M:read_log() return files.read(self.log) end

--- A forge.bosh handle for this sim (opts override the credentials).
function M:director(opts)
  local bosh = require "forge.bosh"
  local o = { url = self.url, timeout_ms = 5000 }
  if self.auth == "uaa" then
    o.client, o.client_secret = self.client, self.secret
  else
    o.username, o.password = self.user, self.password
  end
  for k, v in pairs(opts or {}) do o[k] = v end
  return assert(bosh.new(o))
end

--- An admin call (no auth): returns status, decoded JSON.
function M:admin(method, path, body)
  local status, _, _, json = client.request(method, self.url .. "/_sim/" .. path,
    { body = body and cjson.encode(body) or nil, headers = body and { ["Content-Type"] = "application/json" } or nil })
  return status, json
end

function M:faults(f) return self:admin("POST", "faults", f) end
function M:clear_faults() return self:admin("DELETE", "faults") end
function M:config(c) return self:admin("POST", "config", c) end

--- Recorded requests {method, path, query?, status} in order.
function M:requests()
  local _, list = self:admin("GET", "requests")
  return list
end

function M:clear_requests() return self:admin("DELETE", "requests") end

function M:stop()
  if not self.pid then return end
  proc.stop(self.pid, self.start_time, 5)
  self.pid = nil
end

function M:cleanup()
  self:stop()
  os.execute("rm -rf '" .. self.dir .. "'")
end

return M
