-- forge.http under abuse: slow clients (slowloris), unauthenticated uploads, the shared body
-- budget, connection caps and raw control bytes in the path. The server runs in a child
-- process (lua5.4), the abusive clients in another (python3); all traffic stays on 127.0.0.x
-- and every client loop is bounded in count and time.
local cjson = require "cjson"
local client = require "spec.support.client"
local crypto = require "forge.crypto"
local files = require "spec.support.files"
local proc = require "forge.proc"

local free_port = require("spec.support.net").free_port

-- The server child: http.serve with the options given as JSON, until SIGTERM.
--   lua5.4 server.lua PORT OPTIONS_JSON MODULE_DIR
local SERVER = [[
package.path = "scripts/?.lua;spec/?.lua;" .. arg[3] .. "/?.lua;" .. package.path
package.cpath = "build/lib/?.so;" .. package.cpath
local http = require "forge.http"
http.trap_signals()
local opts = require("cjson").decode(arg[2])
opts.listen = "127.0.0.1:" .. arg[1]
local srv = assert(http.serve(opts))
io.stdout:write("ready\n")
io.stdout:flush()
repeat until http.wait(0.1) == "stop"
srv:stop(5)
]]

-- A handler that checks Basic auth itself, as forge.broker does, after the body was read.
local AUTH_HANDLER = [[
local M = {}
function M.handle(req)
  if req.headers.authorization ~= "Basic dTpw" then
    return 401, { ["WWW-Authenticate"] = 'Basic realm="forge"' }, '{"error":"Unauthorized"}'
  end
  return 200, nil, '{"length":' .. #req.body .. '}'
end
return M
]]

-- The clients. Every mode prints one JSON line (slow also prints "held" once connected).
local CLIENTS = [==[
import json, os, resource, select, socket, sys, time

soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
mode, port = sys.argv[1], int(sys.argv[2])

def connect(src="127.0.0.1"):
    s = socket.socket()
    s.bind((src, 0))
    s.setblocking(False)
    s.connect_ex(("127.0.0.1", port))
    return s

def gone(s):
    """True when the server closed (EOF or reset); reads and drops what it sent."""
    try:
        return s.recv(65536) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True

def exchange(data, src="127.0.0.1", timeout=5):
    """Send data on a new connection; the status of the answer (0: closed without one)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout, source_address=(src, 0))
    out = b""
    try:
        s.sendall(data)
        while b"\r\n" not in out:
            d = s.recv(65536)
            if not d:
                break
            out += d
    except OSError:
        pass
    s.close()
    return int(out.split(b" ")[1]) if out.startswith(b"HTTP/") else 0

def slow(n, every, limit):
    # n connections, each sending one more header byte every `every` seconds: never complete
    conns = [[connect(), time.monotonic(), None] for _ in range(n)]
    print("held", flush=True)
    head = b"GET /slow HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 100000
    poller = select.poll()
    byfd = {}
    for c in conns:
        poller.register(c[0], select.POLLIN)
        byfd[c[0].fileno()] = c
    sent, next_round, end = 0, time.monotonic(), time.monotonic() + limit
    while time.monotonic() < end and any(c[2] is None for c in conns):
        for fd, _ in poller.poll(50):
            c = byfd[fd]
            if c[2] is None and gone(c[0]):
                c[2] = time.monotonic() - c[1]
                poller.unregister(fd)
        if time.monotonic() >= next_round:
            for c in conns:
                if c[2] is None:
                    try:
                        c[0].send(head[sent:sent + 1])
                    except OSError:
                        pass
            sent, next_round = sent + 1, next_round + every
    closed = [c[2] for c in conns if c[2] is not None]
    print(json.dumps({"opened": n, "closed": len(closed), "first": min(closed, default=-1),
                      "last": max(closed, default=-1)}), flush=True)

def upload(n, size, limit):
    # n concurrent POSTs with wrong credentials and a body of `size` bytes each
    body = memoryview(b"x" * size)
    head = ("POST /v2/catalog HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Basic d3Jvbmc6d3Jvbmc=\r\n"
            "X-Broker-API-Version: 2.17\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
            % size).encode()
    conns = {}
    poller = select.poll()
    for _ in range(n):
        s = connect()
        conns[s.fileno()] = {"s": s, "head": 0, "body": 0, "reply": b""}
        poller.register(s, select.POLLIN | select.POLLOUT)
    statuses, resets, end = {}, 0, time.monotonic() + limit
    while conns and time.monotonic() < end:
        for fd, ev in poller.poll(100):
            c = conns[fd]
            done = False
            if ev & (select.POLLIN | select.POLLHUP | select.POLLERR):
                try:
                    d = c["s"].recv(65536)
                    c["reply"] += d
                    done = d == b"" or b"\r\n" in c["reply"]
                except BlockingIOError:
                    pass
                except OSError:
                    done = True
            if not done and ev & select.POLLOUT:
                try:
                    if c["head"] < len(head):
                        c["head"] += c["s"].send(head[c["head"]:])
                    elif c["body"] < size:
                        c["body"] += c["s"].send(body[c["body"]:])
                    else:
                        poller.modify(fd, select.POLLIN)
                except BlockingIOError:
                    pass
                except OSError:
                    poller.modify(fd, select.POLLIN)
            if done:
                r = c["reply"]
                if r.startswith(b"HTTP/") and b"\r\n" in r:
                    code = r.split(b" ")[1].decode()
                    statuses[code] = statuses.get(code, 0) + 1
                else:
                    resets += 1
                poller.unregister(fd)
                c["s"].close()
                del conns[fd]
    print(json.dumps({"statuses": statuses, "closed_without_reply": resets, "unfinished": len(conns)}), flush=True)

def hold_body(declared, send, hold):
    # authorized uploads that declare `declared` bytes but send only `send` of them, then wait
    head = ("POST /hold HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Basic dTpw\r\nContent-Length: %d\r\n\r\n"
            % declared).encode()
    conns = []
    for _ in range(2):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(head + b"x" * send)
        conns.append(s)
    print("held", flush=True)
    time.sleep(hold)
    for s in conns:
        s.close()
    print(json.dumps({"held": len(conns)}), flush=True)

def slow_body(every, limit):
    # complete headers, then a body trickled one byte every `every` seconds
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"POST /slowbody HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Basic dTpw\r\nContent-Length: 1000\r\n\r\n")
    t0, reply = time.monotonic(), b""
    s.setblocking(False)
    while time.monotonic() - t0 < limit:
        try:
            s.send(b"x")
        except OSError:
            pass
        r, _, _ = select.select([s], [], [], every)
        if r:
            try:
                d = s.recv(65536)
            except OSError:
                d = b""
            reply += d
            if d == b"":
                break
    print(json.dumps({"closed_after": time.monotonic() - t0, "reply": reply.decode("latin-1")}), flush=True)

def per_ip(n):
    # n idle connections from 127.0.0.1; how many the server closed; then a request from 127.0.0.2
    conns = [connect() for _ in range(n)]
    time.sleep(0.5)
    closed = sum(1 for s in conns if gone(s))
    other = exchange(b"GET /other HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n", "127.0.0.2")
    print(json.dumps({"closed": closed, "other": other}), flush=True)

def raw(hexdata):
    print(json.dumps({"status": exchange(bytes.fromhex(hexdata))}), flush=True)

{"slow": lambda: slow(int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5])),
 "upload": lambda: upload(int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])),
 "hold_body": lambda: hold_body(int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])),
 "slow_body": lambda: slow_body(float(sys.argv[3]), float(sys.argv[4])),
 "per_ip": lambda: per_ip(int(sys.argv[3])),
 "raw": lambda: raw(sys.argv[3])}[mode]()
]==]

local dir
local function path(name) return dir .. "/" .. name end

local function wait_for(file, text, seconds)
  local deadline = proc.monotonic() + seconds
  while proc.monotonic() < deadline do
    if files.read(file):find(text, 1, true) then return true end
    proc.sleep(0.02)
  end
  return false
end

local function last_json(file)
  local line = files.read(file):match("(%b{})%s*$")
  return line and cjson.decode(line)
end

-- Start a server child with http.serve options `opts` (listen is added); returns its handle.
local function start(opts, shell_prefix)
  local port = free_port()
  local out = os.tmpname()
  local argv = { "lua5.4", path("server.lua"), tostring(port), cjson.encode(opts), dir }
  if shell_prefix then
    argv = { "sh", "-c", shell_prefix .. ' && exec "$@"', "sh", table.unpack(argv) }
  end
  local p = assert(proc.spawn { argv = argv, stdout = out, cwd = os.getenv("PWD") })
  assert(wait_for(out, "ready", 10), files.read(out))
  return { pid = p.pid, start = p.start_time, port = port, out = out,
    url = function(p_) return "http://127.0.0.1:" .. port .. p_ end }
end

local function stop(s)
  proc.kill(s.pid, s.start, "TERM")
  proc.wait(s.pid, 15)
  os.remove(s.out)
end

-- Run a client mode to completion; its JSON line.
local function run_client(s, ...)
  local r = assert(proc.run { argv = { "/usr/bin/python3", path("clients.py"), (...), tostring(s.port),
    select(2, ...) }, timeout = 90 })
  assert(r.code == 0, r.stderr)
  return cjson.decode(r.stdout:match("(%b{})%s*$"))
end

-- Start a client mode in the background; returns {pid=, start=, out=}.
local function spawn_client(s, ...)
  local out = os.tmpname()
  local p = assert(proc.spawn { argv = { "/usr/bin/python3", path("clients.py"), (...), tostring(s.port),
    select(2, ...) }, stdout = out })
  return { pid = p.pid, start = p.start_time, out = out }
end

local function finish_client(c, seconds)
  local w = proc.wait(c.pid, seconds)
  if not w then proc.kill(c.pid, c.start, "KILL") proc.wait(c.pid, 5) end
  local result = last_json(c.out)
  os.remove(c.out)
  return result
end

local function timed_get(s, p_)
  local t0 = proc.monotonic()
  local status = client.request("GET", s.url(p_), { timeout = 5 })
  return status, proc.monotonic() - t0
end

local function rss_kb(pid, field)
  return tonumber(files.read("/proc/" .. pid .. "/status"):match(field .. ":%s*(%d+)"))
end

local BASIC = "Basic " .. crypto.base64_encode("u:p")
local AUTH = { realm = "forge", users = { { username = "u", password = "p" }, { username = "a", password = "q" } },
  public = { "/healthz" } }
local VERSION = { header = "X-Broker-API-Version", major = 2, under = { "/v2" } }

setup(function()
  dir = os.tmpname()
  os.remove(dir)
  assert(os.execute("mkdir -p " .. dir))
  files.write(path("server.lua"), SERVER)
  files.write(path("auth_handler.lua"), AUTH_HANDLER)
  files.write(path("clients.py"), CLIENTS)
end)

teardown(function() os.execute("rm -rf " .. dir) end)

describe("forge.http slow clients", function()
  it("keeps answering while 1,100 connections trickle their headers, and closes them at the header deadline",
    function()
      local s = start { handler = "spec.support.http_echo", threads = 4, header_timeout = 3,
        max_connections_per_ip = 5000 }
      finally(function() stop(s) end)
      local status, idle = timed_get(s, "/")
      assert.equal(200, status)
      local slow = spawn_client(s, "slow", "1100", "1", "12")
      assert.is_true(wait_for(slow.out, "held", 10))
      proc.sleep(0.5) -- every connection accepted and sending
      local held_status, held = timed_get(s, "/")
      local result = finish_client(slow, 20)
      print(string.format("\n  slowloris: normal request %.3f s idle, %.3f s with 1,100 trickling connections; "
        .. "they were closed %.2f .. %.2f s after connecting", idle, held, result.first, result.last))
      assert.equal(200, held_status)
      assert.is_true(held < 1, "a normal request took " .. held .. " s")
      assert.equal(1100, result.closed)
      assert.is_true(result.first >= 2.5, "closed before the header deadline")
      assert.is_true(result.last <= 5, "closed " .. result.last .. " s after connecting")
      assert.equal(200, (timed_get(s, "/")))
    end)

  it("closes a connection whose body trickles past the request deadline, before the handler", function()
    local s = start { handler = "spec.support.http_echo", threads = 2, request_timeout = 2 }
    finally(function() stop(s) end)
    local r = run_client(s, "slow_body", "0.5", "10")
    assert.is_true(r.closed_after >= 1.5 and r.closed_after <= 4, "closed after " .. r.closed_after .. " s")
    assert.equal("", r.reply)
    assert.equal(200, (timed_get(s, "/")))
  end)

  it("caps the connections of one client address", function()
    local s = start { handler = "spec.support.http_echo", threads = 2, max_connections_per_ip = 4 }
    finally(function() stop(s) end)
    local r = run_client(s, "per_ip", "6")
    assert.equal(2, r.closed)
    assert.equal(200, r.other)
  end)

  it("caps the connections in all, queueing the rest until the header deadline frees a slot", function()
    local s = start { handler = "spec.support.http_echo", threads = 2, max_connections = 4, header_timeout = 1 }
    finally(function() stop(s) end)
    local slow = spawn_client(s, "slow", "4", "0.2", "3")
    assert.is_true(wait_for(slow.out, "held", 10))
    proc.sleep(0.2)
    local status, took = timed_get(s, "/")
    finish_client(slow, 10)
    assert.equal(200, status)
    assert.is_true(took > 0.5 and took < 3, "answered after " .. took .. " s")
  end)

  it("raises its soft open-file limit to the hard one", function()
    local s = start({ handler = "spec.support.http_echo", threads = 1 }, "ulimit -Sn 256")
    finally(function() stop(s) end)
    local soft, hard = files.read("/proc/" .. s.pid .. "/limits"):match("Max open files%s+(%d+)%s+(%d+)")
    assert.equal(hard, soft)
  end)
end)

describe("forge.http checks before the body", function()
  local s
  setup(function()
    s = start { handler = "spec.support.http_echo", threads = 2, body_limit = 1048576, auth = AUTH,
      version = VERSION, max_buffered_bytes = 300000, max_connections_per_ip = 5000 }
  end)
  teardown(function() if s then stop(s) end end)

  local function get(p_, headers)
    local status, _, hdrs, json = client.request("GET", s.url(p_), { headers = headers })
    return status, hdrs, json
  end

  it("answers 401 with a Basic challenge, and closes, without the right credentials", function()
    for _, h in ipairs({ {}, { Authorization = "Basic " .. crypto.base64_encode("u:wrong") },
      { Authorization = "Bearer " .. crypto.base64_encode("u:p") }, { Authorization = "Basic" } }) do
      local status, hdrs, json = get("/v2/catalog", h)
      assert.equal(401, status)
      assert.equal('Basic realm="forge"', hdrs["www-authenticate"])
      assert.equal("close", hdrs["connection"])
      assert.equal("Unauthorized", json.error)
      assert.is_string(hdrs["x-request-id"])
    end
  end)

  it("accepts the broker's and the admin credentials, the scheme in any case (RFC 7617)", function()
    for _, auth in ipairs({ BASIC, "basic " .. BASIC:sub(7), "BASIC  " .. BASIC:sub(7),
      "bAsIc " .. crypto.base64_encode("a:q") }) do
      assert.equal(200, (get("/service_instances/x", { Authorization = auth })), auth)
    end
  end)

  it("lets the public paths through without credentials, however Lua would spell them", function()
    for _, p_ in ipairs({ "/healthz", "/healthz/", "//healthz", "/%68ealthz", "/healthz?x=1" }) do
      assert.equal(200, (get(p_)), p_)
    end
    for _, p_ in ipairs({ "/healthz/x", "/healthzz", "/%2Fhealthz", "/x/healthz", "/health%7" }) do
      assert.equal(401, (get(p_)), p_)
    end
  end)

  it("answers 412 under /v2 without a 2.x X-Broker-API-Version, after the credentials", function()
    for _, v in ipairs({ false, "", "1.0", "3.0", "2.", "2.x", "2.17 x", "12.1" }) do
      local status, hdrs, json = get("/v2/catalog", { Authorization = BASIC, ["X-Broker-API-Version"] = v or nil })
      assert.equal(412, status, tostring(v))
      assert.equal("PreconditionFailed", json.error)
      assert.equal("close", hdrs["connection"])
    end
    assert.equal(200, (get("/v2/catalog", { Authorization = BASIC, ["X-Broker-API-Version"] = "2.17" })))
    assert.equal(200, (get("/v2x", { Authorization = BASIC })))
    assert.equal(401, (get("/v2/catalog", { ["X-Broker-API-Version"] = "2.17" })))
  end)

  it("refuses a wrong-credentials upload without reading its 1 MiB body", function()
    local status, _, _, json = client.request("PUT", s.url("/v2/service_instances/x"),
      { body = string.rep("x", 1048576), headers = { Authorization = "Basic d3Jvbmc=", ["X-Broker-API-Version"] = "2.17" } })
    assert.equal(401, status)
    assert.equal("Unauthorized", json.error)
  end)

  it("answers 503 with Retry-After beyond the bytes buffered across all connections", function()
    local function post(n, headers)
      headers = headers or {}
      headers.Authorization = BASIC
      local status, _, hdrs, json = client.request("POST", s.url("/"), { body = string.rep("x", n), headers = headers })
      return status, hdrs, json
    end
    local held = spawn_client(s, "hold_body", "140000", "70000", "3")  -- 2 x 140000 of the 300000 reserved
    assert.is_true(wait_for(held.out, "held", 10))
    proc.sleep(0.2)
    local status, hdrs, json = post(40000)
    assert.equal(503, status)
    assert.equal("ServiceUnavailable", json.error)
    assert.is_string(hdrs["retry-after"])
    assert.equal(200, (post(10000)))
    finish_client(held, 10)
    proc.sleep(0.2) -- the server has seen them close
    assert.equal(200, (post(40000)))
    -- a chunked body is counted as it arrives
    assert.equal(503, (post(400000, { ["Transfer-Encoding"] = "chunked" })))
    assert.equal(200, (post(200000)))
  end)
end)

describe("forge.http memory under unauthenticated uploads", function()
  it("1,000 concurrent wrong-credentials 1 MiB uploads add less than 50 MB to the server", function()
    local s = start { handler = "auth_handler", threads = 4, body_limit = 2 * 1048576, auth = AUTH,
      max_connections_per_ip = 5000 }
    finally(function() stop(s) end)
    local warm = {}
    for i = 1, 16 do warm[i] = { method = "GET", url = s.url("/"), user = "u", password = "p" } end
    client.parallel(warm, 16) -- every worker state loaded
    local before = rss_kb(s.pid, "VmRSS")
    local r = run_client(s, "upload", "1000", "1048576", "60")
    local after, peak = rss_kb(s.pid, "VmRSS"), rss_kb(s.pid, "VmHWM")
    print(string.format("\n  uploads: VmRSS %d -> %d kB (+%.1f MB), peak %d kB; answers %s, %d closed without one",
      before, after, (after - before) / 1024, peak, cjson.encode(r.statuses), r.closed_without_reply))
    assert.equal(0, r.unfinished)
    assert.is_true((r.statuses["401"] or 0) > 0)
    assert.is_nil(r.statuses["200"])
    assert.is_true((after - before) / 1024 < 50, "added " .. (after - before) / 1024 .. " MB")
  end)
end)

describe("forge.http request paths", function()
  local s
  setup(function() s = start { handler = "spec.support.http_echo", threads = 2 } end)
  teardown(function() if s then stop(s) end end)

  local function raw(request)
    return run_client(s, "raw", (request:gsub(".", function(c) return string.format("%02x", c:byte()) end))).status
  end

  it("answers 400 for a raw NUL or other control byte in the path, before the handler", function()
    for _, p_ in ipairs({ "/a\0b", "/a\0", "/\1", "/a\tb", "/a\27[1m", "/a\127", "/v2/catalog?x=\0" }) do
      assert.equal(400, raw("GET " .. p_ .. " HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"), p_)
    end
    local status, _, _, json = client.request("GET", s.url("/a%00b"))
    assert.equal(200, status)
    assert.equal("/a%00b", json.uri)
    assert.equal(200, raw("GET /a%20b HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"))
  end)
end)

describe("forge.broker Basic auth", function()
  it("takes the scheme in any case", function()
    local Broker = require "forge.broker"
    local b = Broker.new({ auth = { username = "u", password = "p" }, admin = {}, listen = "127.0.0.1:1" }, nil,
      { catalog_etag = '"e"', catalog_json = "{}" })
    for _, scheme in ipairs({ "Basic", "basic", "BASIC" }) do
      local status = b:handle { method = "GET", uri = "/v2/catalog", id = "t", headers = {
        authorization = scheme .. " " .. BASIC:sub(7), ["x-broker-api-version"] = "2.17" } }
      assert.equal(200, status, scheme)
    end
    assert.equal(401, (b:handle { method = "GET", uri = "/v2/catalog", id = "t", headers = {
      authorization = "Basicx " .. BASIC:sub(7), ["x-broker-api-version"] = "2.17" } }))
  end)
end)
