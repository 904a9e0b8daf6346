-- forge.http's replayed answers: a GET the handler marks with a ":replay" header is answered
-- again from C, without Lua, while forge.reload's counter stays at the answer's generation.
-- A real server in a child process; the handler writes a line to a log on every call, so the
-- spec sees which requests reached Lua.
local client = require "spec.support.client"
local files = require "spec.support.files"
local proc = require "forge.proc"

local free_port = require("spec.support.net").free_port

-- arg: port, dir (the handler's module and its call log)
local SERVER = [[
package.path = "scripts/?.lua;spec/?.lua;" .. arg[2] .. "/?.lua;" .. package.path
package.cpath = "build/lib/?.so;" .. package.cpath
local http = require "forge.http"
local reload = require "forge.reload"
http.trap_signals()
local srv = assert(http.serve { listen = "127.0.0.1:" .. arg[1], handler = "replay_handler", init = arg[2],
  threads = 4, generation = reload.counter, auth = { users = { { username = "a", password = "pa" },
    { username = "b", password = "pb" } }, public = { "/open" } } })
io.stdout:write("ready\n")
io.stdout:flush()
repeat until http.wait(0.05) == "stop"
srv:stop(5)
]]

-- /bump: publishes a new generation; /status/N: answers N (marked); /bad/<kind>: a malformed
-- mark; anything else: 200 marked replayable, varying on X-V unless X-Fresh, with the call's
-- number in its body.
local HANDLER = [[
local reload = require "forge.reload"
local M, dir = {}, nil
function M.init(arg) dir = arg end
local function called(req)
  local f = assert(io.open(dir .. "/calls", "a"))
  f:write(req.method, " ", req.uri, "\n")
  f:close()
end
local BAD = { nogen = { route = "/r" }, noroute = { generation = 0 }, unless = { generation = 0, route = "/r",
  unless = { {} } }, key = { generation = 0, route = "/r", bogus = 1 } }
function M.handle(req)
  called(req)
  if req.uri == "/bump" then return 200, nil, tostring(reload.publish()) end
  local gen = reload.generation()
  local status = tonumber(req.uri:match("^/status/(%d+)$")) or 200
  local replay = BAD[req.uri:match("^/bad/(%w+)$") or ""]
    or { generation = gen, route = "/thing", vary = "X-V", unless = { "X-Fresh" } }
  return status, { ["Content-Type"] = "text/plain", ETag = '"e' .. gen .. '"', [":replay"] = replay },
    "generation " .. gen .. " for " .. req.uri .. " " .. (req.headers["x-v"] or "-")
end
return M
]]

describe("forge.http replayed answers", function()
  local dir, s

  local function calls()
    local n = 0
    for _ in files.read(dir .. "/calls"):gmatch("\n") do n = n + 1 end
    return n
  end

  local A = { Authorization = "Basic " .. require("forge.crypto").base64_encode("a:pa") }
  local B = { Authorization = "Basic " .. require("forge.crypto").base64_encode("b:pb") }

  local function with(base, extra)
    local h = {}
    for k, v in pairs(base) do h[k] = v end
    for k, v in pairs(extra or {}) do h[k] = v end
    return h
  end

  local function get(path, headers)
    local status, raw, hdrs = client.request("GET", "http://127.0.0.1:" .. s.port .. path, { headers = headers or A })
    return status, raw, hdrs
  end

  setup(function()
    dir = files.tempdir()
    files.write(dir .. "/server.lua", SERVER)
    files.write(dir .. "/replay_handler.lua", HANDLER)
    files.write(dir .. "/calls", "")
    local port, out = free_port(), os.tmpname()
    local p = assert(proc.spawn { argv = { "lua5.4", dir .. "/server.lua", tostring(port), dir }, stdout = out,
      stderr = dir .. "/stderr", cwd = os.getenv("PWD") })
    s = { pid = p.pid, start = p.start_time, port = port, out = out }
    local deadline = proc.monotonic() + 10
    repeat proc.sleep(0.02) until files.read(out):find("ready") or proc.monotonic() > deadline
  end)

  teardown(function()
    if s then
      proc.kill(s.pid, s.start, "TERM")
      if not proc.wait(s.pid, 15) then proc.kill(s.pid, s.start, "KILL") proc.wait(s.pid, 5) end
      os.remove(s.out)
    end
    os.execute("rm -rf " .. dir)
  end)

  it("answers the same request again without the handler, with the kept headers and a new request id", function()
    local status, body, h1 = get("/same")
    assert.equal(200, status)
    local before = calls()
    local ids = { [h1["x-request-id"]] = true }
    for _ = 1, 10 do
      local st, again, h = get("/same")
      assert.equal(200, st)
      assert.equal(body, again)
      assert.equal("text/plain", h["content-type"])
      assert.equal(h1.etag, h.etag)
      assert.is_nil(h[":replay"])
      assert.is_nil(ids[h["x-request-id"]])
      ids[h["x-request-id"]] = true
    end
    assert.equal(before, calls())
  end)

  it("asks the handler again once the generation moves, and replays the new answer", function()
    local _, old = get("/gen")
    assert.equal(200, (get("/bump")))
    local before = calls()
    local _, new = get("/gen")
    assert.are_not.equal(old, new)
    assert.equal(before + 1, calls())
    local _, again = get("/gen")
    assert.equal(new, again)
    assert.equal(before + 1, calls())
  end)

  it("keeps one answer per value of the vary header, and one for its absence", function()
    local _, none = get("/vary")
    local _, one = get("/vary", with(A, { ["X-V"] = "1" }))
    local _, two = get("/vary", with(A, { ["X-V"] = "2" }))
    local before = calls()
    assert.equal(none, select(2, get("/vary")))
    assert.equal(one, select(2, get("/vary", with(A, { ["X-V"] = "1" }))))
    assert.equal(two, select(2, get("/vary", with(A, { ["X-V"] = "2" }))))
    assert.equal(before, calls())
    assert.matches(" 1$", one)
    assert.matches(" 2$", two)
    assert.matches(" %-$", none)
  end)

  it("sends a request with an unless header to the handler, and keeps nothing from it", function()
    local before = calls()
    get("/fresh", with(A, { ["X-Fresh"] = "1" }))
    get("/fresh", with(A, { ["X-Fresh"] = "1" }))
    assert.equal(before + 2, calls())
    get("/fresh")
    get("/fresh")
    assert.equal(before + 3, calls())
  end)

  it("replays only to the credentials the answer was made for", function()
    get("/who")
    local before = calls()
    get("/who")
    assert.equal(before, calls())
    assert.equal(200, (get("/who", B)))
    assert.equal(before + 1, calls())
    assert.equal(401, (get("/who", { Authorization = "Basic eDp5" })))
    assert.equal(401, (get("/who", {})))
    assert.equal(before + 1, calls())
    get("/who", B)
    assert.equal(before + 1, calls())
  end)

  it("keeps no answer but a 200 to a GET without a body, and one per target", function()
    local before = calls()
    for _ = 1, 2 do
      get("/status/201")
      client.request("POST", "http://127.0.0.1:" .. s.port .. "/post", { headers = A, body = "x" })
      client.request("GET", "http://127.0.0.1:" .. s.port .. "/body", { headers = A, body = "x" })
    end
    assert.equal(before + 6, calls())
    get("/target?a=1")
    get("/target?a=2")
    assert.equal(before + 8, calls())
  end)

  it("serves a malformed mark's answer as it is, keeps nothing from it and says why in the log", function()
    for _, kind in ipairs({ "nogen", "noroute", "unless", "key" }) do
      local before = calls()
      assert.equal(200, (get("/bad/" .. kind)))
      assert.equal(200, (get("/bad/" .. kind)))
      assert.equal(before + 2, calls())
    end
    assert.matches("a replayable answer was not kept", files.read(dir .. "/stderr"))
  end)

  it("keeps at most 16 answers and goes on answering the rest through the handler", function()
    assert.equal(200, (get("/bump")))
    for i = 1, 20 do get("/many/" .. i) end
    local before = calls()
    for i = 1, 20 do
      local st, body = get("/many/" .. i)
      assert.equal(200, st)
      assert.matches("/many/" .. i .. " ", body, 1, true)
    end
    assert.equal(before + 4, calls())
  end)

  it("refuses a generation that is not forge.reload's counter", function()
    local http = require "forge.http"
    for _, bad in ipairs({ "x", 1, {}, io.stdout }) do
      local ok, err = pcall(http.serve, { handler = "x", listen = "127.0.0.1:1", generation = bad })
      assert.is_false(ok)
      assert.matches("http%.serve: generation must be forge%.reload's counter", err)
    end
  end)
end)
