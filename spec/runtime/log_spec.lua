-- forge.log: one JSON line per call, escaping, redaction, levels, truncation.
local log = require "forge.log"
local cjson = require "cjson"

local MAX = 65536

local function decode(line)
  assert.equal("\n", line:sub(-1))
  assert.is_nil(line:sub(1, -2):find("\n", 1, true), "one line only")
  return cjson.decode(line)
end

-- run a Lua snippet in a fresh lua5.4 with forge.log loadable; returns its stderr
local function stderr_of(code, env)
  local errf = os.tmpname()
  local cmd = string.format("%s lua5.4 -e %q 2>%s", env or "",
    "package.cpath = 'build/lib/?.so;' .. package.cpath; local log = require 'forge.log'; " .. code, errf)
  local ok = os.execute(cmd)
  assert.is_true(ok)
  local f = assert(io.open(errf, "rb"))
  local s = f:read("a")
  f:close()
  os.remove(errf)
  return s
end

local function lines(s)
  local t = {}
  for l in s:gmatch("[^\n]+") do t[#t + 1] = cjson.decode(l) end
  return t
end

describe("forge.log", function()
  it("has module info", function()
    assert.equal("forge.log", log._NAME)
    assert.is_string(log._VERSION)
  end)

  describe("encode", function()
    it("writes ts, level, msg and the fields", function()
      local line = log.encode("hello", { instance = "i-1", n = 3, ok = true, ratio = 0.5 })
      local t = decode(line)
      assert.matches("^%d%d%d%d%-%d%d%-%d%dT%d%d:%d%d:%d%d%.%d%d%dZ$", t.ts)
      assert.equal("info", t.level)
      assert.equal("hello", t.msg)
      assert.equal("i-1", t.instance)
      assert.equal(3, t.n)
      assert.equal(true, t.ok)
      assert.equal(0.5, t.ratio)
      assert.matches('^{"ts":"[^"]+","level":"info","msg":"hello",', line)
      assert.equal("error", decode(log.encode("x", nil, "error")).level)
      assert.equal("warn", decode(log.encode("x", {}, "warning")).level)
      assert.equal("debug", decode(log.encode("x", nil, "debug")).level)
    end)

    it("has a current timestamp", function()
      local t = decode(log.encode("x"))
      local y, mo, d, h, mi, s = t.ts:match("^(%d+)-(%d+)-(%d+)T(%d+):(%d+):(%d+)")
      local now = os.time(os.date("!*t"))
      local ts = os.time { year = y, month = mo, day = d, hour = h, min = mi, sec = s }
      assert.is_true(math.abs(now - ts) < 5)
    end)

    it("escapes per RFC 8259", function()
      local nasty = 'q"b\\s/n\nr\rt\tb\bf\f\1\31 é 日本 😀 \127'
      local line = log.encode(nasty, { [nasty] = nasty })
      local t = decode(line)
      assert.equal(nasty, t.msg)
      assert.equal(nasty, t[nasty])
      assert.is_nil(line:sub(1, -2):find("[%z\1-\31]"))   -- no raw control character
      assert.matches('\\u0001', line, 1, true)
      assert.matches('\\u001f', line, 1, true)
      assert.equal("a\0b", decode(log.encode("a\0b")).msg)
    end)

    it("replaces invalid UTF-8 with U+FFFD", function()
      for _, bad in ipairs({ "\255", "a\192\128b", "\237\160\128", "\244\144\128\128", "\226\130", "x\128" }) do
        local t = decode(log.encode(bad, { v = bad }))
        assert.is_truthy(t.msg:find("\239\191\189", 1, true), bad)
        assert.is_truthy(t.v:find("\239\191\189", 1, true))
      end
    end)

    it("encodes nested tables as objects and arrays", function()
      local t = decode(log.encode("m", {
        list = { 1, "two", { three = 3 } },
        obj = { a = { b = { c = "d" } } },
        empty = {},
        sparse = { [1] = "a", [3] = "c" },
        mixed = { 1, 2, x = "y" },
        big = 2 ^ 53, neg = -7, float = 1.25, tenth = 0.1,
      }))
      assert.same({ 1, "two", { three = 3 } }, t.list)
      assert.equal("d", t.obj.a.b.c)
      assert.same({}, t.empty)
      assert.same({ ["1"] = "a", ["3"] = "c" }, t.sparse)
      assert.same({ ["1"] = 1, ["2"] = 2, x = "y" }, t.mixed)
      assert.equal(2 ^ 53, t.big)
      assert.equal(-7, t.neg)
      assert.equal(1.25, t.float)
      assert.equal(0.1, t.tenth)
    end)

    it("stringifies non-string keys and odd values", function()
      local line = log.encode("m", {
        [1] = "one", [2.5] = "x", [true] = "t",
        fn = print, co = coroutine.create(print), nan = 0 / 0, inf = math.huge, ninf = -math.huge,
      })
      local t = decode(line)
      assert.equal("one", t["1"])
      assert.equal("x", t["2.5"])
      assert.equal("t", t["true"])
      assert.equal("<function>", t.fn)
      assert.equal("<thread>", t.co)
      assert.equal("nan", t.nan)
      assert.equal("inf", t.inf)
      assert.equal("-inf", t.ninf)
      local k = decode(log.encode("m", { [{}] = 1 }))
      local key = next(k, nil)
      while key == "ts" or key == "level" or key == "msg" do key = next(k, key) end
      assert.matches("^table: ", key)
    end)

    it("does not let fields overwrite ts, level or msg", function()
      local t = decode(log.encode("real", { msg = "fake", level = "x", ts = "y" }))
      assert.equal("real", t.msg)
      assert.equal("info", t.level)
      assert.equal("fake", t._msg)
      assert.equal("x", t._level)
      assert.equal("y", t._ts)
    end)

    it("replaces cycles and depth > 16 by '...'", function()
      local a = { name = "a" }
      a.self = a
      a.list = { a }
      local t = decode(log.encode("m", { a = a }))
      assert.equal("a", t.a.name)
      assert.equal("...", t.a.self)
      assert.equal("...", t.a.list[1])
      -- the same table twice (no cycle) is written twice
      local shared = { v = 1 }
      t = decode(log.encode("m", { x = shared, y = shared }))
      assert.same({ v = 1 }, t.x)
      assert.same({ v = 1 }, t.y)
      -- depth: fields.d1 is depth 1 ... d16 is written, d17 is "..."
      local root = {}
      local cur = root
      for i = 1, 20 do
        cur.next = { level = i }
        cur = cur.next
      end
      t = decode(log.encode("m", { d = root.next }))
      local node, depth = t.d, 1
      while type(node) == "table" do node, depth = node.next, depth + 1 end
      assert.equal("...", node)
      assert.equal(17, depth)
    end)

    it("raises on misuse", function()
      assert.has_error(function() log.encode({}) end)
      assert.has_error(function() log.encode("m", "notatable") end)
      assert.has_error(function() log.encode("m", nil, "loud") end)
      assert.has_error(function() log.level("loud") end)
      assert.has_error(function() log.info() end)
    end)
  end)

  describe("redaction", function()
    it("redacts secret-looking keys at any depth, any case", function()
      local line = log.encode("bind", {
        password = "p1",
        user = { name = "bob", Password = "p2", nested = { api_TOKEN = "t1", deeper = { { client_secret = "s1" } } } },
        credentials = { username = "u", pw = "p3" },
        Authorization = "Bearer xyz",
        db_passwd = 42,
        list = { { secretKey = { "a", "b" } } },
      })
      for _, s in ipairs({ "p1", "p2", "t1", "s1", "p3", "Bearer", "xyz" }) do
        assert.is_nil(line:find(s, 1, true), s .. " leaked")
      end
      local t = decode(line)
      assert.equal("[redacted]", t.password)
      assert.equal("bob", t.user.name)
      assert.equal("[redacted]", t.user.Password)
      assert.equal("[redacted]", t.user.nested.api_TOKEN)
      assert.equal("[redacted]", t.user.nested.deeper[1].client_secret)
      assert.equal("[redacted]", t.credentials)
      assert.equal("[redacted]", t.Authorization)
      assert.equal("[redacted]", t.db_passwd)
      assert.equal("[redacted]", t.list[1].secretKey)
    end)

    it("redact() tells which keys are redacted", function()
      for _, k in ipairs({ "password", "PASSWORD", "admin_password", "secret", "client_secret", "token",
        "refresh_token", "credential", "credentials", "passwd", "Authorization", "proxy-authorization" }) do
        assert.is_true(log.redact(k), k)
      end
      for _, k in ipairs({ "user", "name", "pass", "auth", "tok", "", "cred" }) do
        assert.is_false(log.redact(k), k)
      end
      assert.is_false(log.redact(1))
    end)
  end)

  describe("truncation", function()
    it("cuts a huge message and stays valid JSON", function()
      local line = log.encode(string.rep("x", 200000), { after = "kept?" })
      assert.is_true(#line <= MAX)
      local t = decode(line)
      assert.is_true(t.truncated)
      assert.matches("%.%.%.%[truncated%]$", t.msg)
      assert.is_true(#t.msg > 60000)
    end)

    it("cuts a huge field, with escapes and multibyte characters, at any size", function()
      for _, unit in ipairs({ "a", "\n", "é", "日", "😀", '"', "\1" }) do
        for _, n in ipairs({ 10000, 21800, 21845, 32000, 65000, 70000 }) do
          local v = string.rep(unit, n // #unit + 1)
          local line = log.encode("m", { small = 1, big = v, nested = { deep = { v, v } } })
          assert.is_true(#line <= MAX, #line)
          local t = decode(line)
          if not t.truncated then        -- then nothing was lost
            assert.equal(v, t.big)
            assert.same({ v, v }, t.nested.deep)
          end
          assert.equal("m", t.msg)
        end
      end
    end)

    it("cuts many fields and deep structures", function()
      local fields = {}
      for i = 1, 5000 do fields["key" .. i] = { i, "value " .. i, { x = i } } end
      local line = log.encode("m", fields)
      assert.is_true(#line <= MAX)
      local t = decode(line)
      assert.is_true(t.truncated)
      local root = {}
      local cur = root
      for _ = 1, 15 do
        cur.n = {}
        cur = cur.n
      end
      for i = 1, 20000 do cur[i] = "item" .. i end
      line = log.encode("m", { root = root })
      assert.is_true(#line <= MAX)
      t = decode(line)
      assert.is_true(t.truncated)
    end)

    it("is valid JSON at every size around the limit", function()
      for n = 65400, 65560, 7 do
        local line = log.encode("m", { a = string.rep("y", n - 60) })
        assert.is_true(#line <= MAX)
        decode(line)
        line = log.encode("m", { a = { string.rep("z", n - 70) } })
        assert.is_true(#line <= MAX)
        decode(line)
        line = log.encode(string.rep("\t", n // 2))
        assert.is_true(#line <= MAX)
        decode(line)
      end
    end)
  end)

  describe("writing and levels", function()
    it("writes one line to stderr per call, filtered by level", function()
      local out = stderr_of([[
        log.debug('d0'); log.info('i0', {k = 'v'}); log.warn('w0'); log.error('e0')
        assert(log.level('debug') == 'info'); log.debug('d1')
        assert(log.level('error') == 'debug'); log.warn('w1'); log.error('e1')
        assert(log.level() == 'error')
      ]])
      local got = {}
      for _, t in ipairs(lines(out)) do got[#got + 1] = t.level .. ":" .. t.msg end
      assert.same({ "info:i0", "warn:w0", "error:e0", "debug:d1", "error:e1" }, got)
      assert.equal("v", lines(out)[1].k)
    end)

    it("reads FORGE_LOG_LEVEL at first load", function()
      local out = stderr_of("log.debug('d'); log.info('i'); log.warn('w')", "FORGE_LOG_LEVEL=warn")
      assert.same({ "w" }, { lines(out)[1].msg, lines(out)[2] })
      out = stderr_of("log.debug('d'); assert(log.level() == 'debug')", "FORGE_LOG_LEVEL=DEBUG")
      assert.equal("d", lines(out)[1].msg)
      out = stderr_of("log.debug('d'); log.info('i')", "FORGE_LOG_LEVEL=bogus")
      assert.equal("i", lines(out)[1].msg)
    end)

    it("level() is shared and settable here too", function()
      local prev = log.level("warn")
      assert.equal("warn", log.level())
      log.info("filtered out")             -- not written
      assert.equal("warn", log.level(prev))
      assert.equal(prev, log.level())
    end)
  end)
end)
