-- A real etcd for the specs and the bench: Debian's etcd-server binary on loopback, in a
-- temporary directory, on free random ports.
--
--   local etcd_server = require "support.etcd"
--   local srv = etcd_server.start { fast = true }   -- srv.url = "http://127.0.0.1:PORT"
--   srv:stop()      -- stop the process, keep the data dir (srv:start() brings it back)
--   srv:start()     -- (re)start on the same ports and data dir, wait until healthy
--   srv:signal("TERM") / srv:running() / srv:spawn() / srv:wait_healthy()
--                   -- stop or start without waiting (a drill keeps working meanwhile)
--   srv:cleanup()   -- stop and remove the directory
--
-- start{} options:
--   fast = true          --unsafe-no-fsync (specs; the bench measures with fsync)
--   tls = true           HTTPS client URL with a throw-away CA, server and client certificates
--                        (srv.tls = {cacert=, cert=, key=}); client certificates are required
--   args = {...}         extra etcd flags (e.g. "--auth-token-ttl", "1")
--
--   etcd_server.cluster { n = 3, fast = true }    -- a cluster on loopback, see "A cluster" below
--   etcd_server.hanging_port()                    -- a port where connecting hangs
--
-- The module is also a forge.http handler (handle/init): a fake gateway that answers badly
-- on purpose, selected by the first path segment of the endpoint URL, e.g. an endpoint
-- "http://127.0.0.1:PORT/garbage" answers every call with "{not json". See FAKE below.
local M = {}

local function proc() return require "forge.proc" end

local function sh_quote(s)
  return "'" .. tostring(s):gsub("'", "'\\''") .. "'"
end

local function run(argv, timeout)
  return proc().run { argv = argv, timeout = timeout or 20 }
end

local function slurp(path)
  local f = io.open(path, "rb")
  if not f then return "" end
  local s = f:read("a")
  f:close()
  return s
end

local seeded = false

-- A TCP port free on 127.0.0.1 and not in `avoid`.
function M.free_port(avoid)
  local p = proc()
  if not seeded then
    math.randomseed(os.time() + p.getpid() * 7919)
    seeded = true
  end
  for _ = 1, 500 do
    local port = math.random(20000, 60000)
    if not (avoid and avoid[port]) and p.port_free(port) then return port end
  end
  error("no free TCP port found")
end

-- A throw-away CA plus server (127.0.0.1) and client certificates in dir.
-- The client certificate has no CommonName: etcd 3.4 refuses gateway requests from a
-- client certificate with a CN while auth is enabled.
local function make_certs(dir)
  local script = [[
set -e
cd "$1"
key() { openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout "$1.key" -out "$1.csr" -subj "$2"; }
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout ca.key -out ca.pem -days 2 \
  -subj /CN=forge-spec-ca
printf 'subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n' > server.ext
printf 'extendedKeyUsage=clientAuth\n' > client.ext
key server /CN=forge-spec-etcd
key client /O=forge-spec
openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out server.pem -days 2 -extfile server.ext
openssl x509 -req -in client.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out client.pem -days 2 -extfile client.ext
]]
  local r = assert(run({ "sh", "-c", script, "make_certs", dir }))
  assert(r.code == 0, "openssl failed: " .. r.stderr)
  return { cacert = dir .. "/ca.pem", cert = dir .. "/client.pem", key = dir .. "/client.key",
    server_cert = dir .. "/server.pem", server_key = dir .. "/server.key" }
end

local Server = {}
Server.__index = Server

-- curl(1) arguments that reach this server (TLS files included).
function Server:curl_args(path, body)
  local argv = { "curl", "-s", "--max-time", "2" }
  if self.tls then
    for _, a in ipairs({ "--cacert", self.tls.cacert, "--cert", self.tls.cert, "--key", self.tls.key }) do
      argv[#argv + 1] = a
    end
  end
  argv[#argv + 1] = self.url .. path
  if body then
    argv[#argv + 1] = "-d"
    argv[#argv + 1] = body
  end
  return argv
end

-- etcdctl arguments that reach this server.
function Server:etcdctl(...)
  local argv = { "etcdctl", "--endpoints=" .. self.url, "--dial-timeout=3s", "--command-timeout=5s" }
  if self.tls then
    argv[#argv + 1] = "--cacert=" .. self.tls.cacert
    argv[#argv + 1] = "--cert=" .. self.tls.cert
    argv[#argv + 1] = "--key=" .. self.tls.key
  end
  for _, a in ipairs({ ... }) do argv[#argv + 1] = a end
  local r = assert(run(argv))
  assert(r.code == 0, "etcdctl " .. table.concat({ ... }, " ") .. ": " .. r.stdout .. r.stderr)
  return r.stdout
end

function Server:healthy()
  local r = run(self:curl_args("/health"), 5)
  return r and r.code == 0 and r.stdout:find('"health":"true"', 1, true) ~= nil
end

function Server:log_tail()
  local log = slurp(self.dir .. "/etcd.log")
  return log:sub(-2000)
end

-- etcd's command line for this server (a cluster member names its peers).
function Server:argv()
  local argv = {
    "etcd", "--name", self.name,
    "--data-dir", self.dir .. "/data",
    "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
    "--listen-peer-urls", self.peer_url, "--initial-advertise-peer-urls", self.peer_url,
    "--initial-cluster", self.initial_cluster or (self.name .. "=" .. self.peer_url),
    -- 8 MiB values travel base64-encoded (~11 MB) in one request
    "--max-request-bytes", tostring(16 * 1024 * 1024),
    -- a quick election on start, and a minimum lease TTL of 1 s
    "--heartbeat-interval", "50", "--election-timeout", "500",
  }
  if self.cluster_token then
    argv[#argv + 1] = "--initial-cluster-token"
    argv[#argv + 1] = self.cluster_token
  end
  if self.opts.fast then argv[#argv + 1] = "--unsafe-no-fsync" end
  if self.tls then
    for _, a in ipairs({ "--cert-file", self.tls.server_cert, "--key-file", self.tls.server_key,
      "--trusted-ca-file", self.tls.cacert, "--client-cert-auth" }) do
      argv[#argv + 1] = a
    end
  end
  for _, a in ipairs(self.opts.args or {}) do argv[#argv + 1] = a end
  return argv
end

-- Start the process without waiting for it (a cluster member cannot be healthy alone).
function Server:spawn()
  assert(not self.pid, "etcd already running")
  local child = assert(proc().spawn { argv = self:argv(), stdout = self.dir .. "/etcd.log" })
  self.pid, self.start_time = child.pid, child.start_time
  return self
end

-- Wait until /health answers (raises, stopping the process, when it exits or times out).
function Server:wait_healthy(timeout)
  local p = proc()
  local deadline = p.monotonic() + (timeout or 20)
  while true do
    if not p.alive(self.pid, self.start_time) then
      self.pid = nil
      error("etcd exited while starting:\n" .. self:log_tail())
    end
    if self:healthy() then return self end
    if p.monotonic() > deadline then
      self:stop()
      error("etcd did not become healthy:\n" .. self:log_tail())
    end
    p.sleep(0.05)
  end
end

-- Start (or restart) the process and wait until /health answers.
function Server:start(timeout)
  self:spawn()
  return self:wait_healthy(timeout)
end

-- Send sig (default TERM) and return at once: the caller keeps working while etcd shuts
-- down; srv:running() tells when it is gone, srv:stop() waits (and reaps).
function Server:signal(sig)
  assert(self.pid, "etcd is not running")
  assert(proc().kill(self.pid, self.start_time, sig or "TERM"))
end

function Server:running()
  return self.pid ~= nil and proc().alive(self.pid, self.start_time)
end

-- Stop the process (SIGTERM; SIGKILL after `timeout` s, default 10: a clean etcd stop may
-- wait for its request timeout) and reap it.
function Server:stop(timeout)
  if self.pid then
    assert(proc().stop(self.pid, self.start_time, timeout or 10))
    proc().wait(self.pid, 1)
    self.pid = nil
  end
end

function Server:cleanup()
  self:stop()
  if self.dir then
    os.execute("rm -rf " .. sh_quote(self.dir))
    self.dir = nil
  end
end

-- Start a fresh single-member etcd; see the header for opts.
function M.start(opts)
  opts = opts or {}
  local r = assert(run({ "mktemp", "-d", "/tmp/forge-etcd-XXXXXX" }))
  local dir = r.stdout:gsub("%s+$", "")
  local client = M.free_port()
  local peer = M.free_port({ [client] = true })
  local srv = setmetatable({ opts = opts, dir = dir, name = "spec", client_port = client, peer_port = peer }, Server)
  srv.url = (opts.tls and "https" or "http") .. "://127.0.0.1:" .. client
  srv.peer_url = "http://127.0.0.1:" .. peer
  local ok, err = pcall(function()
    if opts.tls then srv.tls = make_certs(dir) end
    srv:start()
  end)
  if not ok then
    srv:cleanup()
    error(err, 0)
  end
  return srv
end

---------------------------------------------------------------------------------------------
-- A cluster of n members (default 3) on loopback, each a Server (member:stop(), :start(),
-- :signal("TERM"), :running()), in one temporary directory. Plain HTTP only.
--
--   local cl = etcd_server.cluster { n = 3, fast = true }
--   cl.urls                 -- every member's client URL, in member order
--   cl.members[i]           -- Server objects (name "m1".."mN")
--   cl:leader()             -- the member that is the raft leader now (nil if none answers)
--   cl:others(m)            -- the members other than m
--   cl:cleanup()            -- stop every member and remove the directory

local Cluster = {}
Cluster.__index = Cluster

-- {member_id, leader} of a member from /v3/maintenance/status, or nil.
local function member_status(srv)
  local r = run(srv:curl_args("/v3/maintenance/status", "{}"), 5)
  if not (r and r.code == 0) then return nil end
  local id = r.stdout:match('"member_id":"(%d+)"')
  local leader = r.stdout:match('"leader":"(%d+)"')
  if id and leader then return { id = id, leader = leader } end
  return nil
end

function Cluster:leader()
  for _, m in ipairs(self.members) do
    if m:running() then
      local st = member_status(m)
      if st and st.id == st.leader then return m end
    end
  end
  return nil
end

-- Members other than `but` (a member or nil).
function Cluster:others(but)
  local out = {}
  for _, m in ipairs(self.members) do
    if m ~= but then out[#out + 1] = m end
  end
  return out
end

function Cluster:cleanup()
  for _, m in ipairs(self.members) do m:stop() end
  if self.dir then
    os.execute("rm -rf " .. sh_quote(self.dir))
    self.dir = nil
  end
end

function M.cluster(opts)
  opts = opts or {}
  assert(not opts.tls, "cluster: plain HTTP only")
  local n = opts.n or 3
  local r = assert(run({ "mktemp", "-d", "/tmp/forge-etcd-cluster-XXXXXX" }))
  local dir = r.stdout:gsub("%s+$", "")
  local cl = setmetatable({ dir = dir, members = {}, urls = {} }, Cluster)
  local used, peers = {}, {}
  local token = string.format("forge-spec-%d-%d", proc().getpid(), M.free_port())
  for i = 1, n do
    local client = M.free_port(used)
    used[client] = true
    local peer = M.free_port(used)
    used[peer] = true
    local m = setmetatable({ opts = opts, dir = dir .. "/m" .. i, name = "m" .. i, client_port = client,
      peer_port = peer, url = "http://127.0.0.1:" .. client, peer_url = "http://127.0.0.1:" .. peer,
      cluster_token = token }, Server)
    cl.members[i], cl.urls[i] = m, m.url
    peers[i] = m.name .. "=" .. m.peer_url
  end
  local ok, err = pcall(function()
    for _, m in ipairs(cl.members) do
      m.initial_cluster = table.concat(peers, ",")
      local mk = assert(run({ "mkdir", "-p", m.dir }))
      assert(mk.code == 0, "mkdir " .. m.dir .. ": " .. mk.stderr)
      m:spawn()
    end
    for _, m in ipairs(cl.members) do m:wait_healthy(30) end
  end)
  if not ok then
    cl:cleanup()
    error(err, 0)
  end
  return cl
end

---------------------------------------------------------------------------------------------
-- A loopback port where connecting hangs (a listener whose accept queue is full: the kernel
-- drops every new SYN), like a host that is down or behind a firewall that drops packets.
--   local h = etcd_server.hanging_port()   -- h.url = "http://127.0.0.1:PORT"; h:stop()

local HANG_PY = [[
import socket, sys, time
s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen(0)
port = s.getsockname()[1]
fill = []
for _ in range(3):
    c = socket.socket(); c.setblocking(False)
    try: c.connect(("127.0.0.1", port))
    except BlockingIOError: pass
    fill.append(c)
time.sleep(0.2)
print(port, flush=True)
time.sleep(float(sys.argv[1]))
]]

function M.hanging_port(lifetime)
  local p = proc()
  local r = assert(run({ "mktemp", "/tmp/forge-hang-XXXXXX" }))
  local out = r.stdout:gsub("%s+$", "")
  local child = assert(p.spawn { argv = { "python3", "-c", HANG_PY, tostring(lifetime or 120) }, stdout = out })
  local h = { pid = child.pid, start_time = child.start_time }
  function h:stop()
    if self.pid then
      p.stop(self.pid, self.start_time, 2)
      p.wait(self.pid, 1)
      self.pid = nil
    end
    os.remove(out)
  end
  local deadline = p.monotonic() + 10
  repeat
    local port = tonumber((slurp(out):match("%d+")))
    if port then
      h.port, h.url = port, "http://127.0.0.1:" .. port
      return h
    end
    p.sleep(0.05)
  until p.monotonic() > deadline
  h:stop()
  error("hanging_port: the listener did not start")
end

-- Lua source of an expression opening forge.etcd on srv with the given prefix (for child
-- processes).
function M.open_source(srv, prefix)
  return string.format("require('forge.etcd').open{endpoints={%q}, prefix=%q}", srv.url, prefix)
end

---------------------------------------------------------------------------------------------
-- The fake gateway (a forge.http handler). Endpoint "http://127.0.0.1:PORT/<mode>" answers:
-- the open probe (a count_only range) always well, except in "garbage" mode; every other call
-- as FAKE[mode] says.

local FAKE = {
  garbage = { 200, "{not json" },
  types = { 200, '{"header":{"revision":"x"},"kvs":"nope","succeeded":"maybe"}' },
  badkv = { 200, '{"header":{"revision":"5"},"kvs":[{"key":"!!!!","value":"@@","mod_revision":"1"}]}' },
  badvalue = { 200, '{"header":{"revision":"5"},"kvs":[{"key":"ZmFrZS9r","value":"@@","mod_revision":"1"}]}' },
  outside = { 200, '{"header":{"revision":"5"},"kvs":[{"key":"b3RoZXIvaw==","value":"eA==","mod_revision":"1"}]}' },
  nokvobj = { 200, '{"header":{"revision":"5"},"kvs":[1,2,3]}' },
  deep = { 200, string.rep("[", 5000) .. string.rep("]", 5000) },
  -- 64 levels of nesting (the object and 63 arrays) are read; 65 are too many
  nested64 = { 200, '{"header":{"revision":"5"},"x":' .. string.rep("[", 63) .. string.rep("]", 63) .. "}" },
  nested65 = { 200, '{"header":{"revision":"5"},"x":' .. string.rep("[", 64) .. string.rep("]", 64) .. "}" },
  badescape = { 200, '{"header":{"revision":"5"},"kvs":[{"key":"Zm\\u00","value":""}]}' },
  huge_int = { 200, '{"header":{"revision":"99999999999999999999999"}}' },
  trailing = { 200, '{"header":{"revision":"5"}} x' },
  empty = { 200, "" },
  html500 = { 500, "<html><body>Internal \0 Server Error</body></html>" },
  unavailable = { 503, '{"error":"etcdserver: no leader","message":"etcdserver: no leader","code":14}' },
  -- what a member that is stopping answers through its gateway (the request was not processed)
  closing = { 503, '{"error":"transport is closing","message":"transport is closing","code":14}' },
  conn_closing = { 408, '{"error":"grpc: the client connection is closing","message":' ..
    '"grpc: the client connection is closing","code":1}' },
  -- answers after which a write may have been applied
  timedout = { 503, '{"error":"etcdserver: request timed out","message":"etcdserver: request timed out","code":14}' },
  cancelled = { 408, '{"error":"etcdserver: request cancelled","message":"etcdserver: request cancelled","code":1}' },
  busy = { 429, '{"error":"etcdserver: too many requests","message":"etcdserver: too many requests","code":8}' },
  stream_error = { 200, '{"error":{"grpc_code":14,"http_code":503,"message":"stream broke","http_status":"x"}}' },
  watch_garbage = { 200, '{"result":{"header":{"revision":"5"},"created":true}}\n{"result":{"events":[{"type":"EXPLODE"' ..
    ',"kv":{"key":"ZmFrZS9r"}}]}}\n' },
}
M.FAKE_MODES = {}
for mode in pairs(FAKE) do M.FAKE_MODES[#M.FAKE_MODES + 1] = mode end
table.sort(M.FAKE_MODES)

function M.init() end

function M.handle(req)
  local mode = req.uri:match("^/([%w_]+)/") or "?"
  if req.body:find('"count_only":true', 1, true) and mode ~= "garbage" then
    return 200, { ["content-type"] = "application/json" }, '{"header":{"revision":"5"}}'
  end
  if mode == "slow" then
    proc().sleep(1)
    return 200, { ["content-type"] = "application/json" }, '{"header":{"revision":"5"}}'
  end
  local answer = FAKE[mode] or { 404, "no such fake mode" }
  return answer[1], { ["content-type"] = "application/json" }, answer[2]
end

return M
