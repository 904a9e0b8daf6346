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
