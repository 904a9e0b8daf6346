-- forge.resp: RESP2 against a real redis-server (started here, on a free loopback port in a
-- temp dir), plus a tiny fake server (python3) for replies redis would never send.
local proc = require "forge.proc"
local resp = require "forge.resp"
local files = require "spec.support.files"

local function tmpdir()
  local r = assert(proc.run { argv = { "mktemp", "-d" } })
  return (r.stdout:gsub("%s+$", ""))
end

local free_port = require("spec.support.net").free_port

local function wait_port(port, what, log)
  local deadline = proc.monotonic() + 10
  while not proc.tcp_check("127.0.0.1", port, 0.2) do
    if proc.monotonic() > deadline then error(what .. " did not start: " .. files.read(log)) end
    proc.sleep(0.02)
  end
end

-- Answers every connection with the bytes of <dir>/reply (read anew per connection), once
-- it has read something; then closes, unless the file is empty (then it keeps the socket).
local FAKE = [[
import socket, sys, os
port, path = int(sys.argv[1]), sys.argv[2]
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", port))
s.listen(16)
held = []
while True:
    c, _ = s.accept()
    c.recv(65536)
    data = open(path, "rb").read()
    if data:
        c.sendall(data)
        c.close()
    else:
        held.append(c)
]]

describe("forge.resp", function()
  local dir, port, server, fake, fake_port

  local function call(commands, opts)
    opts = opts or {}
    opts.host = opts.host or "127.0.0.1"
    opts.port = opts.port or port
    opts.commands = commands
    return resp.call(opts)
  end

  -- the fake server answers the next connections with `bytes`
  local function fake_call(bytes, commands, opts)
    files.write(dir .. "/reply", bytes)
    opts = opts or {}
    opts.port = fake_port
    return call(commands or { { "PING" } }, opts)
  end

  setup(function()
    math.randomseed(os.time() + proc.getpid())
    dir = tmpdir()
    port = free_port()
    server = assert(proc.spawn { argv = { "redis-server", "--port", tostring(port), "--bind", "127.0.0.1",
      "--dir", dir, "--save", "", "--appendonly", "no", "--enable-debug-command", "yes" },
      cwd = dir, stdout = dir .. "/redis.log" })
    wait_port(port, "redis-server", dir .. "/redis.log")
    files.write(dir .. "/fake.py", FAKE)
    files.write(dir .. "/reply", "+PONG\r\n")
    repeat fake_port = free_port() until fake_port ~= port
    fake = assert(proc.spawn { argv = { "/usr/bin/python3", dir .. "/fake.py", tostring(fake_port), dir .. "/reply" },
      stdout = dir .. "/fake.log" })
    wait_port(fake_port, "the fake server", dir .. "/fake.log")
  end)

  teardown(function()
    if server then proc.stop(server.pid, server.start_time, 5) end
    if fake then proc.stop(fake.pid, fake.start_time, 5) end
    if dir then proc.run { argv = { "rm", "-rf", dir } } end
  end)

  it("has module info", function()
    assert.equal("forge.resp", resp._NAME)
    assert.is_string(resp._VERSION)
    assert.equal(16 * 1024 * 1024, resp.MAX_REPLY)
  end)

  it("sets and gets strings; simple strings, integers and nil replies", function()
    local r = assert(call { { "SET", "k", "v" }, { "GET", "k" }, { "INCR", "n" }, { "INCRBY", "n", 41 },
      { "GET", "missing" }, { "PING" }, { "DECRBY", "neg", 5 } })
    assert.same({ "OK", "v", 1, 42, false, "PONG", -5 }, r)
    assert.equal("integer", math.type(r[4]))
  end)

  it("is binary safe: CR, LF and NUL in keys and values", function()
    local v = "a\r\nb\0c\r\n\0" .. string.rep("\255", 300)
    local r = assert(call { { "SET", "bin\0\r\nkey", v }, { "GET", "bin\0\r\nkey" }, { "STRLEN", "bin\0\r\nkey" },
      { "SET", "empty", "" }, { "GET", "empty" } })
    assert.same({ "OK", v, #v, "OK", "" }, r)
  end)

  it("returns arrays (nested, empty and nil elements) as tables", function()
    assert(call { { "DEL", "l" }, { "RPUSH", "l", "a", "b", "c" } })
    local r = assert(call { { "LRANGE", "l", 0, -1 }, { "LRANGE", "nolist", 0, -1 }, { "MGET", "k", "missing", "l2" },
      { "EVAL", "return {1, {'x', {2}}, 'y'}", 0 } })
    assert.same({ { "a", "b", "c" }, {}, { "v", false, false }, { 1, { "x", { 2 } }, "y" } }, r)
    -- integral floats (numbers that went through JSON) are sent as integers
    assert.same({ { "b", "c" } }, assert(call { { "LRANGE", "l", 1.0, -1.0 } }))
  end)

  it("returns error replies as {err=} tables, in place, without failing the call", function()
    local r = assert(call { { "NOSUCHCOMMAND" }, { "INCR", "k" }, { "PING" } })
    assert.matches("^ERR unknown command", r[1].err)
    assert.matches("^ERR value is not an integer", r[2].err)
    assert.equal("PONG", r[3])
  end)

  it("returns an empty array for no commands (a connection check)", function()
    assert.same({}, assert(call {}))
  end)

  it("pipelines 1000 commands, one reply each, in order", function()
    local cmds = {}
    for i = 1, 1000 do cmds[i] = { "SET", "p" .. i, string.rep("x", i) } end
    cmds[1001] = { "DBSIZE" }
    local r = assert(call(cmds))
    assert.equal(1001, #r)
    for i = 1, 1000 do assert.equal("OK", r[i]) end
    local gets = {}
    for i = 1, 1000 do gets[i] = { "GET", "p" .. i } end
    local g = assert(call(gets))
    for i = 1, 1000 do assert.equal(string.rep("x", i), g[i]) end
  end)

  it("reads a large value and enforces max_reply", function()
    local big = string.rep("0123456789abcdef", 65536)      -- 1 MiB
    assert.same({ "OK", big }, assert(call { { "SET", "big", big }, { "GET", "big" } }))
    local r, err = call({ { "GET", "big" } }, { max_reply = 1000 })
    assert.is_nil(r)
    assert.equal("resp.protocol", err.code)
    assert.is_false(err.retryable)
    assert.matches("max_reply", err.message)
    r, err = call({ { "LRANGE", "l", 0, -1 }, { "GET", "k" } }, { max_reply = 5 })
    assert.is_nil(r)
    assert.equal("resp.protocol", err.code)
  end)

  describe("AUTH", function()
    setup(function()
      local r = assert(call { { "ACL", "SETUSER", "alice", "reset", "on", ">al1ce pass", "~a:*", "+@all" } })
      assert.equal("OK", r[1])
    end)

    it("authenticates as an ACL user before the commands", function()
      local r = assert(call({ { "ACL", "WHOAMI" }, { "SET", "a:1", "x" }, { "SET", "b:1", "x" } },
        { user = "alice", password = "al1ce pass" }))
      assert.equal("alice", r[1])
      assert.equal("OK", r[2])
      assert.matches("^NOPERM", r[3].err)
    end)

    it("fails with resp.auth and the server's message, running nothing", function()
      local r, err = call({ { "SET", "a:never", "x" } }, { user = "alice", password = "wrong" })
      assert.is_nil(r)
      assert.equal("resp.auth", err.code)
      assert.is_false(err.retryable)
      assert.matches("^WRONGPASS", err.message)
      assert.matches("^resp.auth: WRONGPASS", tostring(err))
      assert.same({ false }, assert(call { { "GET", "a:never" } }))
      -- a password alone authenticates the default user (which has none here)
      r, err = call({ { "PING" } }, { password = "x" })
      assert.is_nil(r)
      assert.equal("resp.auth", err.code)
    end)
  end)

  describe("pool=true", function()
    local function connections()
      local info = assert(call { { "INFO", "stats" } })[1]
      return tonumber(info:match("total_connections_received:(%d+)"))
    end
    setup(function()
      assert(call { { "ACL", "SETUSER", "alice", "reset", "on", ">al1ce pass", "~a:*", "+@all" } })
    end)

    it("reuses one authenticated connection per host, port and credentials", function()
      local before = connections()
      for i = 1, 20 do
        local r = assert(call({ { "ACL", "WHOAMI" }, { "SET", "a:pool", i } },
          { user = "alice", password = "al1ce pass", pool = true }))
        assert.same({ "alice", "OK" }, r)
      end
      assert.same({ "default" }, assert(call({ { "ACL", "WHOAMI" } }, { pool = true })))
      -- one connection for alice, one for default, and the one of this count
      assert.equal(before + 3, connections())
      -- the wrong password does not get alice's connection
      local r, err = call({ { "PING" } }, { user = "alice", password = "wrong", pool = true })
      assert.is_nil(r)
      assert.equal("resp.auth", err.code)
    end)

    it("does not keep a connection whose state a command changed", function()
      assert(call({ { "SELECT", 1 }, { "SET", "in-db-1", "x" } }, { pool = true }))
      assert.same({ false }, assert(call({ { "GET", "in-db-1" } }, { pool = true })), "back on database 0")
      assert(call { { "SELECT", 1 }, { "DEL", "in-db-1" } })
    end)

    it("survives a server restart: the connection it closed is replaced by a new one", function()
      local p2 = free_port()
      local function start()
        local s = assert(proc.spawn { argv = { "redis-server", "--port", tostring(p2), "--bind", "127.0.0.1",
          "--dir", dir, "--save", "", "--appendonly", "no" }, cwd = dir, stdout = dir .. "/redis2.log" })
        wait_port(p2, "redis-server", dir .. "/redis2.log")
        return s
      end
      local s = start()
      finally(function() proc.stop(s.pid, s.start_time, 5) end)
      assert.same({ "PONG" }, assert(call({ { "PING" } }, { port = p2, pool = true })))
      proc.stop(s.pid, s.start_time, 5)
      s = start()
      assert.same({ "PONG" }, assert(call({ { "PING" } }, { port = p2, pool = true })))
      proc.stop(s.pid, s.start_time, 5)
      local r, err = call({ { "PING" } }, { port = p2, pool = true })
      assert.is_nil(r, "nobody listens")
      assert.equal("resp.connect", err.code)
      s = start()
      assert.same({ "PONG" }, assert(call({ { "PING" } }, { port = p2, pool = true })))
    end)

    it("closes a connection whose call failed instead of keeping it", function()
      local r, err = call({ { "DEBUG", "SLEEP", "0.5" } }, { pool = true, timeout = 0.1 })
      assert.is_nil(r)
      assert.equal("resp.timeout", err.code)
      -- a kept connection would deliver the late +OK of DEBUG SLEEP as the reply to this GET
      assert.same({ false }, assert(call({ { "GET", "nothing-here" } }, { pool = true })))
    end)
  end)

  describe("flush", function()
    it("runs after the commands; its reply is not returned", function()
      assert.same({ "OK", "v" }, assert(call({ { "SET", "fk", "v" }, { "GET", "fk" } }, { flush = { "PING" } })))
      assert.same({ "OK" }, assert(call({ { "SET", "fk", "w" } }, { flush = { "PING" }, pool = true })))
    end)

    it("fails the call with resp.flush and the server's words when the flush fails", function()
      -- this server has no ACL file: ACL SAVE is refused
      local r, err = call({ { "ACL", "SETUSER", "flushed", "on" } }, { flush = { "ACL", "SAVE" }, pool = true })
      assert.is_nil(r)
      assert.equal("resp.flush", err.code)
      assert.is_true(err.retryable)
      assert.matches("ACL file", err.message)
      assert.same({ "PONG" }, assert(call({ { "PING" } }, { pool = true })), "the pool goes on")
    end)

    it("persists ACL users to the server's ACL file before answering", function()
      local p2 = free_port()
      files.write(dir .. "/users.acl", "user default on nopass ~* &* +@all\n")
      local s = assert(proc.spawn { argv = { "redis-server", "--port", tostring(p2), "--bind", "127.0.0.1",
        "--dir", dir, "--save", "", "--appendonly", "no", "--aclfile", dir .. "/users.acl" },
        cwd = dir, stdout = dir .. "/redis3.log" })
      finally(function() proc.stop(s.pid, s.start_time, 5) end)
      wait_port(p2, "redis-server", dir .. "/redis3.log")
      assert.same({ "OK" }, assert(call({ { "ACL", "SETUSER", "kept", "on", ">pw", "+@all" } },
        { port = p2, flush = { "ACL", "SAVE" }, pool = true })))
      assert.matches("user kept on", files.read(dir .. "/users.acl"))
    end)

    it("raises on a bad flush command", function()
      assert.has_error(function() call({}, { flush = {} }) end)
      assert.has_error(function() call({}, { flush = { {} } }) end)
      assert.has_error(function() call({}, { flush = "ACL SAVE" }) end)
    end)
  end)

  it("fails fast and retryable when the connection is refused", function()
    local closed = free_port()
    local t0 = proc.monotonic()
    local r, err = call({ { "PING" } }, { port = closed })
    assert.is_nil(r)
    assert.equal("resp.connect", err.code)
    assert.is_true(err.retryable)
    assert.matches("127.0.0.1:" .. closed .. ": Connection refused", err.message, 1, true)
    assert.is_true(proc.monotonic() - t0 < 0.5)
  end)

  it("fails on an unresolvable host", function()
    local r, err = call({ { "PING" } }, { host = "no-such-host.invalid" })
    assert.is_nil(r)
    assert.equal("resp.connect", err.code)
  end)

  it("times out (retryable) when the server does not answer within the deadline", function()
    local t0 = proc.monotonic()
    local r, err = call({ { "DEBUG", "SLEEP", "2" } }, { timeout = 0.5 })
    local took = proc.monotonic() - t0
    assert.is_nil(r)
    assert.equal("resp.timeout", err.code)
    assert.is_true(err.retryable)
    assert.is_true(took >= 0.45 and took < 1.5, "took " .. took)
    -- redis comes back after its sleep
    assert.same({ "PONG" }, assert(call({ { "PING" } }, { timeout = 5 })))
  end)

  it("times out against a listener that never answers", function()
    local r, err = fake_call("", nil, { timeout = 0.3 })
    assert.is_nil(r)
    assert.equal("resp.timeout", err.code)
  end)

  describe("malformed replies", function()
    local function protocol(bytes, pattern, commands, opts)
      local r, err = fake_call(bytes, commands, opts)
      assert.is_nil(r)
      assert.equal("resp.protocol", err.code, tostring(err))
      assert.is_false(err.retryable)
      assert.matches(pattern, err.message)
    end

    it("are resp.protocol errors", function()
      assert.same({ "PONG" }, assert(fake_call("+PONG\r\n")))
      protocol("HTTP/1.1 400 Bad Request\r\n\r\n", "unexpected reply type byte")
      protocol(":12x\r\n", "malformed integer")
      protocol(":99999999999999999999\r\n", "malformed integer")
      protocol("$-2\r\n", "malformed bulk string length")
      protocol("$3\r\nabcde\r\n", "not terminated by CRLF")
      protocol("*x\r\n", "malformed array length")
      protocol(string.rep("*1\r\n", 40) .. ":1\r\n", "nested too deep")
      protocol("$100000\r\n", "longer than max_reply", nil, { max_reply = 1000 })
      protocol("*100000\r\n", "longer than max_reply allows", nil, { max_reply = 1000 })
    end)

    it("a connection closed early is resp.io (retryable)", function()
      local r, err = fake_call("+OK\r\n", { { "PING" }, { "PING" } })
      assert.is_nil(r)
      assert.equal("resp.io", err.code)
      assert.is_true(err.retryable)
      assert.matches("after 1 of 2 replies", err.message)
      r, err = fake_call("$10\r\nabc", { { "GET", "x" } })
      assert.is_nil(r)
      assert.equal("resp.io", err.code)
    end)

    it("nil arrays and RESP edge cases decode", function()
      assert.same({ false, {}, "", 0, -9223372036854775807 - 1 },
        assert(fake_call("*-1\r\n*0\r\n+\r\n:0\r\n:-9223372036854775808\r\n",
          { { "A" }, { "B" }, { "C" }, { "D" }, { "E" } })))
    end)
  end)

  describe("redis commands declared for the local target", function()
    local Local = require "forge.targets.local"
    local target

    setup(function()
      target = Local.new({ host = "127.0.0.1", command_timeout = 2, commands = { "printf" } }, dir)
      assert(call { { "ACL", "SETUSER", "admin2", "reset", "on", ">adm1n", "~*", "&*", "+@all" } })
    end)

    local function redis(commands, expect, extra)
      local r = { port = port, user = "admin2", password = "adm1n", commands = commands, expect = expect }
      for k, v in pairs(extra or {}) do r[k] = v end
      return { redis = r }
    end

    it("runs them and matches each reply (integers as text) against its pattern", function()
      assert.is_true(target:run(redis({ { "PING" } }, { "^PONG$" })))
      assert.is_true(target:run(redis({ { "SET", "t:1", "x" }, { "DEL", "t:1" }, { "GET", "t:1" } },
        { "^OK$", "^1$", "^%(nil%)$" })))
      assert.is_true(target:run_all { redis({ { "PING" } }), redis({ { "ACL", "WHOAMI" } }, { "^admin2$" }) })
    end)

    it("fails on an error reply, naming the command and the reply", function()
      local ok, err = target:run(redis({ { "PING" }, { "ACL", "SETUSER", "u", "nonsense-modifier" } }, { "^PONG$" }))
      assert.is_nil(ok)
      assert.matches("^redis 127.0.0.1:" .. port .. ": ACL SETUSER: error reply \"ERR", err)
    end)

    it("fails on a reply that does not match, naming the command and the reply", function()
      local ok, err = target:run(redis({ { "ECHO", "hello" }, { "INCR", "t:n" } }, { "^hello$", "^0$" }))
      assert.is_nil(ok)
      assert.matches(": INCR: unexpected reply \"%d+\"$", err)
    end)

    it("fails with the reason when the server cannot be reached or refuses the credentials", function()
      local ok, err = target:run(redis({ { "PING" } }, nil, { port = free_port() }))
      assert.is_nil(ok)
      assert.matches("resp.connect: .*Connection refused", err)
      ok, err = target:run(redis({ { "PING" } }, nil, { password = "wrong" }))
      assert.is_nil(ok)
      assert.matches("resp.auth: WRONGPASS", err)
      assert.not_matches("wrong", err)
      ok, err = target:run(redis({ { "PING", {} } }))
      assert.is_nil(ok)
      assert.matches("bad command: resp.call: commands%[1%]%[2%] must be a string", err)
    end)

    it("keeps argv commands working", function()
      assert.is_true(target:run { argv = { "printf", "a\\nb\\n" }, expect = { "^a$", "^b$" } })
      local ok, err = target:run { argv = { "printf", "a\\n" }, expect = { "^x$" } }
      assert.is_nil(ok)
      assert.matches("unexpected reply", err)
    end)
  end)

  it("raises on misuse", function()
    local function raises(opts, pattern)
      local ok, err = pcall(resp.call, opts)
      assert.is_false(ok)
      assert.matches(pattern, tostring(err))
    end
    raises(nil, "table expected")
    raises({ port = port, commands = {} }, "'host' is required")
    raises({ host = "127.0.0.1", commands = {} }, "'port' must be an integer")
    raises({ host = "127.0.0.1", port = 70000, commands = {} }, "'port' must be an integer")
    raises({ host = "127.0.0.1", port = port }, "'commands' must be an array")
    raises({ host = "127.0.0.1", port = port, commands = { "PING" } }, "commands%[1%] must be an array")
    raises({ host = "127.0.0.1", port = port, commands = { {} } }, "commands%[1%] must be a non%-empty")
    raises({ host = "127.0.0.1", port = port, commands = { { "GET", {} } } }, "commands%[1%]%[2%] must be a string")
    raises({ host = "127.0.0.1", port = port, commands = {}, timeout = 0 }, "'timeout' must be in")
    raises({ host = "127.0.0.1", port = port, commands = {}, timeout = "1" }, "'timeout' must be a number")
    raises({ host = "127.0.0.1", port = port, commands = {}, user = "u" }, "'user' needs 'password'")
    raises({ host = "127.0.0.1", port = port, commands = {}, password = 1 }, "'password' must be a string")
    raises({ host = "127.0.0.1", port = port, commands = {}, max_reply = 0 }, "'max_reply' must be in")
    raises({ host = "127.0.0.1", port = port, commands = {}, hots = "x" }, "unknown option 'hots'")
  end)

  it("leaves no file descriptors behind", function()
    local function fds()
      local n = 0
      for _ in io.popen("ls /proc/" .. proc.getpid() .. "/fd"):lines() do n = n + 1 end
      return n
    end
    collectgarbage()
    local before = fds()
    for _ = 1, 50 do
      assert(call { { "PING" } })
      call({ { "PING" } }, { port = free_port() })
      fake_call("+PONG\r\n")
      fake_call(":x\r\n")
    end
    collectgarbage()
    assert.equal(before, fds())
  end)
end)
