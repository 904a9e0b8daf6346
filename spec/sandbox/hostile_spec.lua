-- forge.sandbox against hostile service scripts. Each case runs one attack in its own
-- sandbox and asserts that: the call fails cleanly with the expected code (and message),
-- the same sandbox still answers its next call, and a second, fresh sandbox works.
local sandbox = require "forge.sandbox"

-- Small limits keep the suite fast; the defaults are exercised in sandbox_spec.lua.
local LIMITS = { name = "hostile", memory = 16 * 1024 * 1024, cpu = 0.2, wall = 2 }

local function new(opts)
  local o = {}
  for k, v in pairs(LIMITS) do o[k] = v end
  for k, v in pairs(opts or {}) do o[k] = v end
  return sandbox.new(o)
end

-- A service whose `attack` runs `body` and whose `ok` proves the sandbox still works
-- (string methods, the forge table and ctx copying included).
local function script(body, top)
  return table.concat({
    "local s = {}",
    top or "",
    "function s.ok(ctx)",
    "  return { n = ctx.n + 1, rep = ('ab'):rep(2), up = string.upper('x'), id = #forge.crypto.uuid() }",
    "end",
    "function s.attack(ctx)",
    body,
    "end",
    "return s",
  }, "\n")
end

local function still_works(sb)
  local r = assert(sb:call("ok", { n = 41 }))
  assert.same({ n = 42, rep = "abab", up = "X", id = 36 }, r)
end

local function second_sandbox_works()
  local sb2 = new()
  assert(sb2:load(script("return 1"), "@services/second/service.lua"))
  still_works(sb2)
  sb2:close()
end

-- Run the attack; `codes` is one code or a set of acceptable codes.
local function contained(body, codes, pattern, opts, top)
  local sb = new(opts)
  assert(sb:load(script(body, top), "@services/evil/service.lua"))
  local t0 = os.clock()
  local res, err = sb:call("attack", { n = 1 })
  assert.is_nil(res)
  assert.is_table(err)
  if type(codes) == "string" then codes = { codes } end
  local known = false
  for _, c in ipairs(codes) do known = known or err.code == c end
  assert(known, "unexpected code " .. tostring(err.code) .. ": " .. tostring(err.message))
  assert.is_false(err.retryable)
  if pattern then assert.matches(pattern, err.message) end
  assert(#err.message < 5000, "error message not capped")
  assert(os.clock() - t0 < 5, "the call was not stopped in time")
  still_works(sb)
  second_sandbox_works()
  sb:close()
  return err
end

describe("forge.sandbox hostile scripts", function()
  it("io is not reachable", function()
    contained("return io.open('/etc/passwd')", "sandbox.error", "services/evil/service.lua:7: undefined global 'io'")
  end)

  it("os is not reachable (no os.execute, os.exit, os.getenv)", function()
    contained("return os.execute('id')", "sandbox.error", "undefined global 'os'")
  end)

  it("package and require are not reachable", function()
    contained("return require('os')", "sandbox.error", "undefined global 'require'")
    contained("return package.loaded", "sandbox.error", "undefined global 'package'")
  end)

  it("debug is not reachable", function()
    contained("return debug.getregistry()", "sandbox.error", "undefined global 'debug'")
  end)

  it("dofile and loadfile are not reachable", function()
    contained("return dofile('/etc/passwd')", "sandbox.error", "undefined global 'dofile'")
    contained("return loadfile('/etc/passwd')", "sandbox.error", "undefined global 'loadfile'")
  end)

  it("string.dump is unavailable, so no bytecode can be made", function()
    contained("return string.dump(function() end)", "sandbox.error", "attempt to call a nil value %(field 'dump'%)")
    contained("return (''):dump()", "sandbox.error", "attempt to call a nil value %(method 'dump'%)")
  end)

  it("load refuses a crafted bytecode string, even with mode 'b'", function()
    local bytecode = "\27LuaT\0\25\147\13\10\26\10\4\8\8\120\86\0\0\0\0\0\0\0\0\0\0\0\40\119\64\1"
    contained(string.format("return assert(load(%q))", bytecode), "sandbox.error", "attempt to load a binary chunk")
    contained(string.format("return assert(load(%q, 'x', 'b'))", bytecode), "sandbox.error",
      "attempt to load a binary chunk")
  end)

  it("load of text gets the locked environment by default", function()
    contained("return load('return io')()", "sandbox.error", "undefined global 'io'")
    contained("return load('x = 1')()", "sandbox.error", "cannot assign global 'x'")
  end)

  it("assigning a new global is an error", function()
    contained("leaked = ctx", "sandbox.error", "services/evil/service.lua:7: cannot assign global 'leaked'")
  end)

  it("overwriting an existing global is an error", function()
    contained("pairs = nil", "sandbox.error", "cannot assign global 'pairs'")
    contained("_G.tostring = print", "sandbox.error", "undefined global 'print'")
    contained("_G.tostring = error", "sandbox.error", "cannot assign global 'tostring'")
  end)

  it("reading an undefined global is an error", function()
    contained("return undefined_thing", "sandbox.error", "services/evil/service.lua:7: undefined global 'undefined_thing'")
  end)

  it("setmetatable on a shared library table is refused", function()
    contained("setmetatable(string, { __index = function() return 1 end })", "sandbox.error",
      "cannot change a protected metatable")
    contained("setmetatable(forge, nil)", "sandbox.error", "cannot change a protected metatable")
    contained("setmetatable(_G, nil)", "sandbox.error", "cannot change a protected metatable")
  end)

  it("the string metatable is hidden: getmetatable('').__index fails", function()
    contained("return getmetatable('').__index", "sandbox.error", "attempt to index a boolean value")
  end)

  it("shared tables are read-only: no assignment, no rawset", function()
    contained("forge.crypto.password = function() return 'x' end", "sandbox.error",
      "cannot assign field 'password' of a read%-only table")
    contained("rawset(forge.crypto, 'password', print)", "sandbox.error", "undefined global 'rawset'")
    contained("return rawget(forge, 'crypto')", "sandbox.error", "undefined global 'rawget'")
    contained("table.insert = nil", "sandbox.error", "read%-only table")
  end)

  it("string.rep cannot be replaced through the string metatable or the string table", function()
    contained("string.rep = function() return 'pwned' end", "sandbox.error", "read%-only table")
    contained("local mt = getmetatable('') ; mt.__index.rep = nil", "sandbox.error", "attempt to index a boolean")
    contained("local _, backing = pairs(string) ; backing.rep = nil", "sandbox.error", "read%-only table")
    -- still_works() checks ('ab'):rep(2) after each attempt
  end)

  it("string.rep memory bomb fails cleanly", function()
    contained("return string.rep('x', 2^40)", "sandbox.error", "string.rep: result larger than")
    contained("return ('x'):rep(2^20, ('y'):rep(2^20))", "sandbox.error", "string.rep: result larger than")
    -- an empty result returns at once instead of spinning 2^50 times
    local sb = new()
    assert(sb:load(script("return { s = string.rep('', 2^50) }")))
    assert.same({ s = "" }, sb:call("attack", { n = 1 }))
  end)

  it("a pathological pattern fails that call with the step limit, well within the cpu limit", function()
    local top = "local long = ('a'):rep(20000)"
    local limit = "^services/evil/service.lua:%d+: pattern too complex %(step limit%)"
    contained("return long:find('.-.-.-b')", "sandbox.error", limit, nil, top)
    contained("return string.gsub(long, 'a*a*a*b', 'x')", "sandbox.error", limit, nil, top)
    contained("return long:match('(.-)(.-)(.-)b')", "sandbox.error", limit, nil, top)
    contained("for _ in long:gmatch('.-.-.-b') do end", "sandbox.error", limit, nil, top)
    -- a script's pcall sees the error, and matching keeps working in the same call
    local sb = new()
    assert(sb:load(script([[
      local ok, e = pcall(string.find, long, '.-.-.-b')
      return { ok = ok, e = e, k = ('x=1'):match('(%w)=(%d)'), n = select(2, long:gsub('a', 'b')) }
    ]], top)))
    local t0 = os.clock()
    assert.same({ ok = false, e = "pattern too complex (step limit)", k = "x", n = 20000 }, sb:call("attack", { n = 1 }))
    assert(os.clock() - t0 < LIMITS.cpu, "the step limit took longer than the cpu limit")
    still_works(sb)
  end)

  it("string concatenation memory bomb hits the memory limit", function()
    local err = contained("local s = ('x'):rep(2^20) ; for _ = 1, 40 do s = s .. s end ; return s", "sandbox.memory",
      "memory limit exceeded")
    assert.matches("services/evil/service.lua", err.message)
  end)

  it("table-growth memory bomb hits the memory limit", function()
    contained("local t = {} ; for i = 1, 1e9 do t[i] = { i } end ; return #t", "sandbox.memory")
  end)

  it("memory bomb caught by the script's own pcall still leaves a usable sandbox", function()
    local sb = new()
    assert(sb:load(script([[
      local ok, e = pcall(function() local t = {} ; for i = 1, 1e9 do t[i] = i end end)
      return { ok = ok, e = tostring(e) }
    ]])))
    for _ = 1, 3 do     -- the garbage of each round is reclaimed (emergency collection)
      assert.same({ ok = false, e = "not enough memory" }, sb:call("attack", { n = 1 }))
      still_works(sb)
    end
  end)

  it("infinite loop is stopped by the cpu limit, with file:line", function()
    local err = contained("while true do end", "sandbox.cpu", "^services/evil/service.lua:7: cpu time limit exceeded")
    assert.matches("stack traceback", err.traceback)
  end)

  it("infinite loop inside pcall cannot swallow the limit", function()
    contained("while true do pcall(function() while true do end end) end", "sandbox.cpu")
  end)

  it("infinite loop inside xpcall with a looping error handler cannot swallow the limit", function()
    contained([[
      while true do
        xpcall(function() while true do end end, function() while true do end end)
      end
    ]], "sandbox.cpu")
  end)

  it("error handler loops via error(setmetatable({}, {__tostring = loop}))", function()
    contained("error(setmetatable({}, { __tostring = function() while true do end end }))", "sandbox.cpu")
  end)

  it("coroutine.wrap loops that catch the limit are stopped", function()
    contained([[
      local f = coroutine.wrap(function()
        while true do pcall(function() while true do end end) ; pcall(coroutine.yield) end
      end)
      while true do pcall(f) end
    ]], "sandbox.cpu")
  end)

  it("coroutine.create loops that try to outlive the deadline are stopped, also on later calls", function()
    local sb = new()
    assert(sb:load(script([[
      if not s.co then
        s.co = coroutine.create(function()
          while true do pcall(function() while true do end end) ; coroutine.yield() end
        end)
      end
      while true do pcall(coroutine.resume, s.co) end
    ]])))
    for _ = 1, 3 do
      local t0 = os.clock()
      local res, err = sb:call("attack", { n = 1 })
      assert.is_nil(res)
      assert.equals("sandbox.cpu", err.code)
      assert(os.clock() - t0 < 1)
      still_works(sb)
    end
    second_sandbox_works()
  end)

  it("wall-clock limit fires when it is the tighter one", function()
    contained("while true do end", "sandbox.timeout", "wall time limit exceeded", { cpu = 10, wall = 0.2 })
  end)

  it("deep Lua recursion is a clean error", function()
    contained("local function f(n) return 1 + f(n + 1) end ; return f(1)", { "sandbox.error", "sandbox.memory" })
  end)

  it("C stack overflow through metamethods is a clean error", function()
    contained("local t = setmetatable({}, { __index = function(t, k) return t[k] end }) ; return t.x",
      "sandbox.error", "stack overflow")
    contained("local function f(s) return (s:gsub('.', f)) end ; return f('abc')", "sandbox.error", "stack overflow")
  end)

  it("a huge error string is cut in the message", function()
    local err = contained("local s = ('x'):rep(2^20) ; for _ = 1, 3 do s = s .. s end ; error(s)", "sandbox.error",
      "^services/evil/service.lua:7: xxxx", { memory = 64 * 1024 * 1024 })
    assert.matches("more bytes%]$", err.message)
  end)

  it("a table error object without __tostring is described, not copied", function()
    contained("error({ huge = ('x'):rep(2^20) })", "sandbox.error", "error object is a table value")
  end)

  it("returning a cyclic table fails the call", function()
    contained("local t = {} ; t.self = t ; return t", "sandbox.error", "result: cyclic table")
  end)

  it("returning a 100 MB structure (shared references) fails the call", function()
    contained("local s = ('x'):rep(2^20) ; local t = {} ; for i = 1, 100 do t[i] = s end ; return t",
      "sandbox.error", "result: value too large to copy")
  end)

  it("returning a structure nested deeper than 64 fails the call", function()
    contained("local t = {} ; for _ = 1, 100 do t = { t } end ; return t", "sandbox.error", "deeper than 64")
  end)

  it("collectgarbage is reduced to 'count'", function()
    contained("collectgarbage('stop') ; local t = {} ; for i = 1, 1e9 do t[i] = i end", "sandbox.error",
      "only \"count\"")
    contained("collectgarbage('step', 1e9)", "sandbox.error", "only \"count\"")
    contained("collectgarbage('generational')", "sandbox.error", "only \"count\"")
    local sb = new()
    assert(sb:load(script("return { kb = collectgarbage('count') }")))
    assert.is_number(sb:call("attack", { n = 1 }).kb)
  end)

  it("__gc finalizers are refused (they would run outside any call's limits)", function()
    contained("setmetatable({}, { __gc = function() while true do end end })", "sandbox.error",
      "__gc metamethods are not allowed")
  end)

  it("table.move/insert/remove cannot spin in C over a huge range", function()
    contained("table.move({}, 1, math.maxinteger, 2, {})", "sandbox.error", "table.move: more than")
    contained("table.insert(setmetatable({}, { __len = function() return 2^60 end }), 1, 'x')", "sandbox.error",
      "table.insert: more than")
    contained("table.remove(setmetatable({}, { __len = function() return 2^60 end }), 1)", "sandbox.error",
      "table.remove: more than")
  end)

  it("forge.yaml input is bounded (libyaml allocates outside the cap)", function()
    contained("local s = ('x'):rep(2^20) ; local t = {} ; for i = 1, 64 do t[i] = s end ; return forge.yaml.encode(t)",
      "sandbox.error", "forge.yaml.encode: argument 1 is larger than")
  end)

  it("forge.json.encode of a cyclic table fails cleanly", function()
    contained("local t = {} ; t[1] = t ; return forge.json.encode(t)", "sandbox.error", "json.encode: nesting deeper")
  end)

  it("a cyclic ctx from the broker fails that call, not the broker", function()
    local sb = new()
    assert(sb:load(script("return 1")))
    local ctx = { n = 1 }
    ctx.me = ctx
    local res, err = sb:call("ok", ctx)
    assert.is_nil(res)
    assert.equals("sandbox.error", err.code)
    assert.matches("argument 1: cyclic table", err.message)
    still_works(sb)
  end)

  it("a script that errors at load time reports its file:line", function()
    local sb = new()
    local ok, err = sb:load("local s = {}\n\nlocal x = nil + 1\nreturn s", "@services/broken/service.lua")
    assert.is_nil(ok)
    assert.equals("sandbox.error", err.code)
    assert.matches("^services/broken/service.lua:3: attempt to perform arithmetic on a nil value", err.message)
    local sb2 = new()
    ok, err = sb2:load("local s = {\nreturn s", "@services/broken/service.lua")
    assert.is_nil(ok)
    assert.matches("^services/broken/service.lua:2: unexpected symbol near 'return'", err.message)
    local sb3 = new()
    ok, err = sb3:load("return 42", "@services/broken/service.lua")
    assert.is_nil(ok)
    assert.matches("must return a table", err.message)
    second_sandbox_works()
  end)

  it("a script that loops at load time is stopped", function()
    local sb = new()
    local ok, err = sb:load("while true do end", "@services/slow/service.lua")
    assert.is_nil(ok)
    assert.equals("sandbox.cpu", err.code)
    assert.matches("^services/slow/service.lua:1:", err.message)
    second_sandbox_works()
  end)
end)
