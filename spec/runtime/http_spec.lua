-- forge.http: a real server in a child process, real HTTP from curl.
local client = require "spec.support.client"
local proc = require "forge.proc"
local cjson = require "cjson"

local free_port = require("spec.support.net").free_port

local function start(handler, limit)
  local port = free_port()
  local out = os.tmpname()
  local p = assert(proc.spawn { argv = { "lua5.4", "spec/support/http_server.lua", tostring(port), handler,
    tostring(limit or 1024) }, stdout = out, cwd = os.getenv("PWD") })
  local deadline = proc.monotonic() + 10
  repeat
    proc.sleep(0.02)
    local f = io.open(out)
    local s = f and f:read("a") or ""
    if f then f:close() end
    if s:find("ready") then break end
  until proc.monotonic() > deadline
  return { pid = p.pid, start = p.start_time, port = port, out = out,
    url = function(path) return "http://127.0.0.1:" .. port .. path end }
end

local function stop(s)
  proc.kill(s.pid, s.start, "TERM")
  local w = proc.wait(s.pid, 15)
  local f = io.open(s.out)
  local out = f and f:read("a") or ""
  if f then f:close() end
  os.remove(s.out)
  return w, out
end

describe("forge.http", function()
  local s
  setup(function() s = start("spec.support.http_echo") end)
  teardown(function() if s then stop(s) end end)

  it("hands the request to Lua: method, raw uri, lowercase headers, body, id", function()
    local status, _, hdrs, body = client.request("POST", s.url("/a%2Fb/c?x=1&y=%20"),
      { body = "payload", headers = { ["X-Thing"] = "v" } })
    assert.equal(200, status)
    assert.equal("POST", body.method)
    assert.equal("/a%2Fb/c?x=1&y=%20", body.uri)
    assert.equal("payload", body.body)
    assert.equal("v", body.headers["x-thing"])
    assert.equal("127.0.0.1", body.remote)
    assert.equal("hello", body.init)
    assert.equal(hdrs["x-request-id"], body.id)
    assert.equal("application/json", hdrs["content-type"])
  end)

  it("passes handler headers and status through", function()
    local status, raw, hdrs = client.request("GET", s.url("/text"))
    assert.equal(201, status)
    assert.equal("plain", raw)
    assert.equal("text/plain", hdrs["content-type"])
    assert.equal("yes", hdrs["x-extra"])
  end)

  it("gives every request its own id", function()
    local ids = {}
    for _ = 1, 20 do
      local _, _, hdrs = client.request("GET", s.url("/"))
      assert.is_nil(ids[hdrs["x-request-id"]])
      ids[hdrs["x-request-id"]] = true
    end
  end)

  it("answers 413 for bodies over the limit, declared or chunked, and keeps serving", function()
    assert.equal(413, (client.request("POST", s.url("/"), { body = string.rep("x", 1025) })))
    assert.equal(413, (client.request("POST", s.url("/"), { body = string.rep("x", 5000),
      headers = { ["Transfer-Encoding"] = "chunked" } })))
    assert.equal(200, (client.request("POST", s.url("/"), { body = string.rep("x", 1024) })))
  end)

  it("turns a handler error into a JSON 500 and goes on", function()
    local status, _, _, body = client.request("GET", s.url("/raise"))
    assert.equal(500, status)
    assert.equal("InternalError", body.error)
    assert.equal(200, (client.request("GET", s.url("/"))))
    -- the error is logged as one line of JSON carrying the traceback
    local line = require("spec.support.files").read(s.out):match("[^\n]*request handler raised[^\n]*")
    local entry = cjson.decode(line)
    assert.equal("error", entry.level)
    assert.matches("handler raised on purpose", entry.error)
    assert.matches("stack traceback", entry.error)
  end)

  it("keeps connections alive", function()
    local p = io.popen("curl -sv -o /dev/null -o /dev/null " .. s.url("/a") .. " " .. s.url("/b") .. " 2>&1")
    local out = p:read("a")
    p:close()
    assert.matches("Re%-using existing connection", out)
    assert.is_nil(out:lower():find("connection: close", 1, true))
  end)

  it("serves requests in parallel on several worker states", function()
    local cmds = {}
    for i = 1, 4 do cmds[i] = "curl -s " .. s.url("/sleep/0.5") .. " &" end
    local t0 = proc.monotonic()
    local p = io.popen("{ " .. table.concat(cmds, " ") .. " wait; }")
    local out = p:read("a")
    p:close()
    local states = {}
    for obj in out:gmatch("%b{}") do
      local ok, v = pcall(cjson.decode, obj)
      if ok and v.state then states[v.state] = true end
    end
    local n = 0
    for _ in pairs(states) do n = n + 1 end
    assert.is_true(n >= 2, "expected several worker states")
    assert.is_true(proc.monotonic() - t0 < 1.8, "requests were serialized")
  end)
end)

describe("forge.http lifecycle", function()
  it("finishes in-flight requests on SIGTERM, then stops", function()
    local s = start("spec.support.http_echo")
    local tmp = os.tmpname()
    local p = io.popen("curl -s -o " .. tmp .. " -w '%{http_code}' " .. s.url("/sleep/1"), "r")
    proc.sleep(0.3)
    local w, out = stop(s)
    local code = p:read("a")
    p:close()
    os.remove(tmp)
    assert.equal("200", code)
    assert.equal(0, w.code)
    assert.matches("stopped", out)
  end)

  it("answers 503 while the handler module cannot load", function()
    local s = start("spec.support.no_such_handler")
    finally(function() stop(s) end)
    local status, _, _, body = client.request("GET", s.url("/"))
    assert.equal(503, status)
    assert.equal("ServiceUnavailable", body.error)
  end)

  it("refuses misuse with a usage error", function()
    local http = require "forge.http"
    assert.has_error(function() http.serve {} end)
    assert.has_error(function() http.serve { handler = "x", listen = "nonsense" } end)
    assert.has_error(function() http.serve { handler = "x", bogus = 1 } end)
    local user = { username = "u", password = "p" }
    for _, bad in ipairs({ { header_timeout = 0 }, { request_timeout = -1 }, { max_connections = -1 },
      { max_connections_per_ip = 0 }, { max_buffered_bytes = 0 }, { threads = 4, max_connections = 2 },
      { auth = { users = {} } }, { auth = { users = { { username = "u" } } } }, { auth = { users = { user }, bogus = 1 } },
      { auth = { users = { user }, realm = 'a"b' } }, { auth = { users = { user }, public = { "healthz" } } },
      { version = { major = 2 } }, { version = { header = "X-V" } }, { version = { header = "X V", major = 2 } },
      { version = { header = "X-V", major = 2, under = "/v2" } } }) do
      bad.handler = "x"
      local ok, err = pcall(http.serve, bad)
      assert.is_false(ok)
      assert.matches("^http%.serve", err)
    end
    local srv, err = http.serve { handler = "x", listen = "127.0.0.1:1" }
    if srv then srv:stop(0) else assert.equal("http.listen", err.code) end
  end)
end)

-- Waits: a handler answers {wait = token, timeout = s}; the waiter state polls the module's
-- poll(token, why). The test handler's tokens say when they are ready, and where poll logs its calls.
local WAIT_SERVER = [[
package.path = "scripts/?.lua;spec/?.lua;" .. arg[3] .. "/?.lua;" .. package.path
package.cpath = "build/lib/?.so;" .. package.cpath
local http = require "forge.http"
http.trap_signals()
local opts = require("cjson").decode(arg[2])
opts.listen, opts.handler = "127.0.0.1:" .. arg[1], "wait_handler"
local srv = assert(http.serve(opts))
io.stdout:write("ready\n")
io.stdout:flush()
repeat until http.wait(0.05) == "stop"
srv:stop(5)
io.stdout:write("stopped\n")
]]

local WAIT_HANDLER = [[
local cjson = require "cjson"
local proc = require "forge.proc"
local M = {}

-- /wait/<s>: ready after s seconds; /silent: poll never answers; /raise: poll raises; /bad: no timeout
function M.handle(req)
  local path, query = req.uri:match("^([^?]*)%??(.*)$")
  local timeout = tonumber(query:match("timeout=([%d.]+)")) or 30
  local log = query:match("log=([^&]+)")
  local secs = path:match("^/wait/([%d.]+)$")
  if secs then return { wait = cjson.encode({ ready = proc.monotonic() + tonumber(secs), log = log }), timeout = timeout } end
  if path == "/silent" then return { wait = "{}", timeout = timeout } end
  if path == "/raise" then return { wait = '{"raise":true}', timeout = timeout } end
  if path == "/bad" then return { wait = "{}" } end
  return 200, nil, cjson.encode({ uri = req.uri })
end

function M.poll(token, why)
  local w = cjson.decode(token)
  if w.raise then error("poll raised on purpose") end
  if w.log then
    local f = io.open(w.log, "a")
    f:write((why or "-") .. "\n")
    f:close()
  end
  if w.ready and (proc.monotonic() >= w.ready or why) then
    return 200, { ["X-Waited"] = "yes" }, cjson.encode({ why = why or "ready" })
  end
end

return M
]]

describe("forge.http waits", function()
  local files = require "spec.support.files"
  local dir

  local function start_waits(opts)
    local port = free_port()
    local out = os.tmpname()
    local p = assert(proc.spawn { argv = { "lua5.4", dir .. "/server.lua", tostring(port),
      cjson.encode(opts or { threads = 4 }), dir }, stdout = out, cwd = os.getenv("PWD") })
    local deadline = proc.monotonic() + 10
    repeat proc.sleep(0.02) until files.read(out):find("ready") or proc.monotonic() > deadline
    return { pid = p.pid, start = p.start_time, port = port, out = out,
      url = function(path) return "http://127.0.0.1:" .. port .. path end }
  end

  -- curls in the background, one connection each: {pid=, start=, out=}
  local function spawn_curls(urls)
    local cfg = {}
    for i, u in ipairs(urls) do
      if i > 1 then cfg[#cfg + 1] = "next" end
      cfg[#cfg + 1] = string.format('url = "%s"', u)
      cfg[#cfg + 1] = 'output = "/dev/null"'
      cfg[#cfg + 1] = 'write-out = "%{http_code}\\n"'
      cfg[#cfg + 1] = 'max-time = "30"'
    end
    local config, out = files.temp(table.concat(cfg, "\n") .. "\n"), os.tmpname()
    local p = assert(proc.spawn { argv = { "curl", "-s", "--parallel", "--parallel-immediate", "--parallel-max", "64",
      "-K", config }, stdout = out })
    return { pid = p.pid, start = p.start_time, out = out, config = config }
  end

  local function finish_curls(c, seconds)
    if not proc.wait(c.pid, seconds) then proc.kill(c.pid, c.start, "KILL") proc.wait(c.pid, 5) end
    local codes = {}
    for code in files.read(c.out):gmatch("(%d+)\n") do codes[#codes + 1] = tonumber(code) end
    os.remove(c.out)
    os.remove(c.config)
    return codes
  end

  local function timed(url)
    local p = io.popen("curl -s -o /dev/null -w '%{http_code} %{time_total}' '" .. url .. "'")
    local code, took = p:read("a"):match("(%d+) ([%d.]+)")
    p:close()
    return tonumber(code), tonumber(took)
  end

  local function sockets(pid)
    local lfs = require "lfs"
    local n = 0
    for fd in lfs.dir("/proc/" .. pid .. "/fd") do
      if (lfs.symlinkattributes("/proc/" .. pid .. "/fd/" .. fd, "target") or ""):match("^socket:") then n = n + 1 end
    end
    return n
  end

  local function lines(path)
    local n = 0
    for _ in files.read(path):gmatch("\n") do n = n + 1 end
    return n
  end

  setup(function()
    dir = files.tempdir()
    files.write(dir .. "/server.lua", WAIT_SERVER)
    files.write(dir .. "/wait_handler.lua", WAIT_HANDLER)
  end)
  teardown(function() os.execute("rm -rf " .. dir) end)

  local s
  before_each(function() s = start_waits() end)
  after_each(function() if s then stop(s) end end)

  it("answers a wait once poll does, and keeps the connection alive after it", function()
    local t0 = proc.monotonic()
    local p = io.popen("curl -sv " .. s.url("/wait/0.3") .. " " .. s.url("/after") .. " 2>&1")
    local out = p:read("a")
    p:close()
    assert.is_true(proc.monotonic() - t0 >= 0.3)
    assert.matches('{"why":"ready"}', out, 1, true)
    assert.matches("< X%-Waited: yes", out)
    assert.matches("< X%-Request%-Id: ", out)
    assert.matches('{"uri":"\\/after"}', out, 1, true) -- cjson writes / as \/
    assert.matches("Re%-using existing connection", out)
    assert.is_nil(out:lower():find("connection: close", 1, true))
  end)

  it("keeps serving while 16 requests wait on 4 threads", function()
    local urls = {}
    for i = 1, 16 do urls[i] = s.url("/wait/1.5") end
    local c = spawn_curls(urls)
    proc.sleep(0.5)
    local worst = 0
    for _ = 1, 5 do
      local code, took = timed(s.url("/"))
      assert.equal(200, code)
      worst = math.max(worst, took)
    end
    local codes = finish_curls(c, 20)
    print(string.format("\n  waits: a plain request took at most %.1f ms with 16 waits parked on 4 threads",
      worst * 1000))
    assert.is_true(worst < 0.1, "took " .. worst .. " s")
    assert.equal(16, #codes)
    for _, code in ipairs(codes) do assert.equal(200, code) end
  end)

  it("asks poll to answer at the timeout; 504 when it has nothing to say", function()
    local status, _, hdrs, json = client.request("GET", s.url("/wait/100?timeout=0.3"))
    assert.equal(200, status)
    assert.equal("timeout", json.why)
    assert.equal("yes", hdrs["x-waited"])
    local t0 = proc.monotonic()
    status, _, hdrs, json = client.request("GET", s.url("/silent?timeout=0.3"))
    assert.equal(504, status)
    assert.equal("Timeout", json.error)
    assert.is_string(hdrs["x-request-id"])
    assert.is_true(proc.monotonic() - t0 < 1)
  end)

  it("answers 500 for a poll that raises and for an invalid wait, and goes on", function()
    local status, _, _, json = client.request("GET", s.url("/raise"))
    assert.equal(500, status)
    assert.equal("InternalError", json.error)
    assert.equal(500, (client.request("GET", s.url("/bad"))))
    assert.matches("wait poll raised", files.read(s.out))
    assert.matches("poll raised on purpose", files.read(s.out))
    assert.matches("request handler returned an invalid wait", files.read(s.out))
    assert.equal(200, (client.request("GET", s.url("/"))))
  end)

  it("forgets a client that leaves mid-wait", function()
    local log = os.tmpname()
    finally(function() os.remove(log) end)
    local before = sockets(s.pid)
    local r = proc.run { argv = { "curl", "-s", "--max-time", "0.5", s.url("/wait/100?log=" .. log) }, timeout = 10 }
    assert.equal(28, r.code)
    proc.sleep(0.3)
    local polls = lines(log)
    assert.is_true(polls > 3, "polled " .. polls .. " times")
    proc.sleep(0.3)
    assert.equal(polls, lines(log), "still polled after the client left")
    assert.equal(before, sockets(s.pid))
    assert.is_nil(files.read(log):find("[ts]"))     -- never asked to answer
    assert.equal(200, (client.request("GET", s.url("/"))))
  end)

  it("leaves parked connections to their wait: neither the deadline sweeper nor the idle timeout cuts them", function()
    local short = start_waits { threads = 2, header_timeout = 0.5, request_timeout = 0.5, connection_timeout = 1 }
    finally(function() stop(short) end)
    local t0 = proc.monotonic()
    local status, _, _, json = client.request("GET", short.url("/wait/2"))
    assert.equal(200, status)
    assert.equal("ready", json.why)
    assert.is_true(proc.monotonic() - t0 >= 2)
  end)

  it("answers every wait when it stops, then stops", function()
    local urls = {}
    for i = 1, 3 do urls[i] = s.url("/wait/100") end
    local c = spawn_curls(urls)
    proc.sleep(0.5)
    local t0 = proc.monotonic()
    local w, out = stop(s)
    s = nil
    local codes = finish_curls(c, 10)
    assert.equal(0, w.code)
    assert.matches("stopped", out)
    assert.is_true(proc.monotonic() - t0 < 2, "the stop took " .. (proc.monotonic() - t0) .. " s")
    assert.same({ 200, 200, 200 }, codes)
  end)
end)

describe("http.wait", function()
  local http = require "forge.http"

  it("returns nil at its timeout, and 'kick' once http.kick() was called (one wait per kicks)", function()
    assert.is_nil(http.wait(0.05))
    assert.is_true(http.kick())
    http.kick()
    assert.equal("kick", http.wait(5))
    assert.is_nil(http.wait(0.05))
  end)

  it("returns 'kick' to a wait that a request's handler kicks from its pool thread", function()
    local files = require "spec.support.files"
    local dir = files.tempdir()
    finally(function() os.execute("rm -rf " .. dir) end)
    files.write(dir .. "/kicker.lua", [[
      local http = require "forge.http"
      return { handle = function() http.kick() return 200, nil, "kicked" end }
    ]])
    package.path = dir .. "/?.lua;" .. package.path
    local port = free_port()
    local srv = assert(http.serve { listen = "127.0.0.1:" .. port, handler = "kicker", threads = 1 })
    finally(function() srv:stop(1) end)
    local curl = assert(proc.spawn { argv = { "curl", "-s", "-o", "/dev/null", "http://127.0.0.1:" .. port .. "/" } })
    assert.equal("kick", http.wait(20))
    proc.wait(curl.pid, 10)
  end)

  it("returns 'ready' once the descriptor it watches is readable, leaving it unread", function()
    local reload = require "forge.reload"
    local dir = require("spec.support.files").tempdir()
    finally(function() os.execute("rm -rf " .. dir) end)
    local w = assert(reload.watch(dir))
    assert.is_nil(http.wait(0.05, w:fd()))
    require("spec.support.files").write(dir .. "/f", "x")
    assert.equal("ready", http.wait(5, w:fd()))
    assert.is_true(w:poll(0))
    w:close()
    assert.has_error(function() w:fd() end, "watcher:fd: the watcher is closed")
  end)
end)
