-- forge.pattern: Lua 5.4 patterns with a step budget. Every case runs the same call on the
-- string library and on forge.pattern and asserts the same outcome: equal results, or both
-- raising with the same message. Then the budget: pathological patterns stop quickly.
local pattern = require "forge.pattern"

local unpack = table.unpack

-- Outcome of f(...): {true, results...} or {false, message}. gmatch is drained into a list.
-- Argument errors name the function: 'string.find' and 'forge.pattern.find' both become 'find'.
local function outcome(f, ...)
  local r = table.pack(pcall(f, ...))
  if not r[1] and type(r[2]) == "string" then
    r[2] = r[2]:gsub("'string%.(%a+)'", "'%1'"):gsub("'forge%.pattern%.(%a+)'", "'%1'")
  end
  return { n = r.n, unpack(r, 1, r.n) }
end

local function drain(gmatch, s, p, init)
  return outcome(function()
    local all = {}
    for a, b, c in gmatch(s, p, init) do
      all[#all + 1] = { a, b, c }
      if #all > 1000 then error("runaway gmatch") end
    end
    return all
  end)
end

local function show(v)
  if type(v) == "string" then return string.format("%q", v) end
  return tostring(v)
end

local function same(fn, ...)
  local args = table.pack(...)
  local want, got
  if fn == "gmatch" then
    want, got = drain(string.gmatch, ...), drain(pattern.gmatch, ...)
  else
    want, got = outcome(string[fn], ...), outcome(pattern[fn], ...)
  end
  local label = {}
  for i = 1, args.n do label[#label + 1] = show(args[i]) end
  assert.same(want, got, fn .. "(" .. table.concat(label, ", ") .. ")")
end

local SUBJECTS = {
  "", "a", "aaa", "hello world", "  Hello, World! 123  ", "key = value; other=42",
  "THE (quick) [brown] {fox}", "f(a(b)c)d(e", "x=1,y=22,z=333", "\0a\0b\0", "tab\tnew\nline\r",
  "caf\195\169 na\195\175ve", "--[[ comment ]]--", "%d%s%%", "aaa bbb ccc", "a.b.c", "ab$cd^ef",
}

local PATTERNS = {
  -- literals and specials
  "", "a", "o w", "xyz", "^", "$", "^$", "^a", "a$", "^aaa$", "%.", "%%", "%$", "%^", "%(", "%[", "%]",
  "a.b", ".", "..", "^.", ".$", "$a", "a^", "%-", "-", "^-", "\0", "%z",
  -- classes and their complements
  "%a", "%A", "%c", "%C", "%d", "%D", "%g", "%G", "%l", "%L", "%p", "%P", "%s", "%S", "%u", "%U",
  "%w", "%W", "%x", "%X", "%z", "%Z", "%a+", "%d+", "%s*", "%S+", "%w-", "%p?", "%x+$",
  -- sets
  "[abc]", "[^abc]", "[a-z]+", "[A-Z]", "[^%s]+", "[%a_][%w_]*", "[%d.]+", "[]]", "[^]]", "[a-]", "[-a]",
  "[%]]", "[%-]", "[a%-z]", "[z-a]", "[%a-z]", "[^%a%d]", "[.]", "[%%]", "[=;,]", "[\0]", "[^\0a]",
  -- quantifiers
  "a*", "a+", "a-", "a?", "aa?a", ".-", ".*", ".+", ".-b", "a-b", "(a*)", "(a-)", "b*$", "^a*", "a+$",
  "%s*(.-)%s*$", "^%s*(.-)%s*$", "(%w+)%s*=%s*(%w+)", "(h)(e)(l)(l)(o)",
  -- balance and frontier
  "%b()", "%b[]", "%b{}", "%bxy", "%b((", "(%b())", "f%b()", "%f[%w]%w+", "%f[%W]", "%f[%a]", "%f[^%z]",
  "%f[%z]", "%f[%l]%a", "%f[%S]", "%f[.]",
  -- captures, positions, back references
  "()", "()a()", "(a)()", "((a)(b))", "(a(b)c)", "(%a+)%s(%a+)", "(.)%1", "(a*).%1", "()%1", "(%d)(%d)%2",
  "((%w+)=(%w+))", "(()a)", "(.-)$", "()$", "^()",
  -- malformed
  "%", "a%", "[a", "[", "[^", "[%", "[a-", "%b", "%ba", "%f", "%fa", "%f[a", "(", "(a", ")", "a)", "%1",
  "(a)%2", "%0", "(()", "((a)", "%g%", "[]", "[^]",
}

describe("forge.pattern", function()
  it("has the module fields and the budget API", function()
    assert.equal("forge.pattern", pattern._NAME)
    assert.equal(10000000, pattern.DEFAULT_BUDGET)
    assert.equal(pattern.DEFAULT_BUDGET, pattern.budget())
    assert.equal(pattern.DEFAULT_BUDGET, pattern.set_budget(1000))
    assert.equal(1000, pattern.set_budget(pattern.DEFAULT_BUDGET))
    assert.has_error(function() pattern.set_budget(0) end)
    assert.has_error(function() pattern.set_budget("x") end)
  end)

  describe("matches the string library", function()
    it("find and match, every pattern on every subject", function()
      for _, s in ipairs(SUBJECTS) do
        for _, p in ipairs(PATTERNS) do
          same("find", s, p)
          same("match", s, p)
        end
      end
    end)

    it("gmatch, every pattern on every subject (a leading '^' is a plain char)", function()
      for _, s in ipairs(SUBJECTS) do
        for _, p in ipairs(PATTERNS) do same("gmatch", s, p) end
      end
      same("gmatch", "^a^a", "^a")
      same("gmatch", "aaa", "^a")
    end)

    it("init arguments, negative and out of range", function()
      local inits = { -100, -12, -3, -1, 0, 1, 2, 5, 11, 12, 13, 100, math.mininteger, math.maxinteger }
      for _, s in ipairs({ "", "hello world" }) do
        for _, p in ipairs({ "", "o", "l+", "^h", "^l", "()", "$", "d$", "%w*" }) do
          for _, i in ipairs(inits) do
            same("find", s, p, i)
            same("match", s, p, i)
            same("gmatch", s, p, i)
          end
        end
      end
    end)

    it("plain find and patterns without magic characters", function()
      for _, s in ipairs(SUBJECTS) do
        for _, p in ipairs({ "", "o w", "a.b", "(a", "a)", "]", "%d", "[a", ".", "\0b", "123  " }) do
          same("find", s, p, 1, true)
          same("find", s, p, 3, true)
          same("find", s, p, -4, 1)
          same("find", s, p, 1, false)
        end
      end
    end)

    it("gsub with string replacements: %0-%9, %%, position captures, errors", function()
      local repls = { "", "x", "[%0]", "%1", "<%1|%2>", "%%", "%%1", "%2", "%", "%x", "a%", "%0%0", 7, 1.5 }
      for _, s in ipairs(SUBJECTS) do
        for _, p in ipairs({ "", "a", "%w+", "(%w+)", "(%w)(%w)", "()", "(o)()", "%s*", "^%s*", "x*", "[^%w]",
                             "%b()", "(", "%" }) do
          for _, r in ipairs(repls) do same("gsub", s, p, r) end
        end
      end
    end)

    it("gsub with table and function replacements, false/nil keeping the match", function()
      local t = { hello = "HI", world = false, a = 1, b = 2.5, c = {} }
      local function f(...)
        local n = select("#", ...)
        if n == 0 then return "none" end
        local a = ...
        if a == "world" then return nil end
        if a == "o" then return false end
        if a == "c" then return {} end
        local parts = {}
        for i = 1, n do parts[i] = tostring((select(i, ...))) end
        return table.concat(parts, "|")
      end
      for _, s in ipairs(SUBJECTS) do
        for _, p in ipairs({ "%w+", "(%w+)", "(%w)()", "()", "%a", "(h)(e)", "o", "", "(a)(b)" }) do
          same("gsub", s, p, t)
          same("gsub", s, p, f)
        end
      end
      same("gsub", "abc", "%w", true)
      same("gsub", "abc", "%w")
    end)

    it("gsub's max n", function()
      for _, n in ipairs({ -1, 0, 1, 2, 3, 100, 2.0, math.maxinteger, math.mininteger }) do
        for _, p in ipairs({ "a", "", "^a", "%w+", "x*" }) do
          same("gsub", "aaa bbb aaa", p, "-", n)
          same("gsub", "", p, "-", n)
        end
      end
      same("gsub", "aaa", "a", "-", 1.5)
      same("gsub", "aaa", "a", "-", "2")
    end)

    it("non-string subjects and patterns (numbers coerce, others raise)", function()
      same("find", 12345, 3)
      same("match", 3.5, "%.")
      same("gsub", 100, 0, 1)
      same("find", nil, "a")
      same("match", "a", {})
      same("gmatch", "a", nil)
    end)

    it("the recursion limit ('pattern too complex') at the same depth", function()
      for _, n in ipairs({ 150, 198, 199, 200, 201, 300 }) do
        same("find", ("a"):rep(n), ("a?"):rep(n))
        same("match", ("a"):rep(n), ("a*"):rep(n))
      end
      same("find", "a", ("()"):rep(32))
      same("find", "a", ("()"):rep(33))
    end)
  end)

  it("random patterns: same results or same errors (seeded fuzz)", function()
    local tokens = { "a", "b", "a", "b", ".", "%a", "%d", "%s", "%W", "%", "(", ")", "()", "[ab]", "[^a]",
                     "[a-", "[", "]", "^", "$", "*", "+", "-", "?", "%b()", "%bab", "%f[a]", "%f[%s]", "%1",
                     "%2", "%0", " ", "1", "%%", "[%a]", "[]]", "[^]", "%f[^a]", "%z", "[%]", "a-", "b*", "()" }
    local chars = { "a", "b", " ", "1", "(", ")", "a", "b", "-" }
    local rng = 20240611
    local function rand(n) -- a small LCG: the same sequence on every run and platform
      rng = (rng * 1103515245 + 12345) % 2147483648
      return rng % n + 1
    end
    local cases, raised, matched = 0, 0, 0
    for _ = 1, 4000 do
      local p, s = {}, {}
      for i = 1, rand(7) - 1 do p[i] = tokens[rand(#tokens)] end
      for i = 1, rand(13) - 1 do s[i] = chars[rand(#chars)] end
      local ps, ss = table.concat(p), table.concat(s)
      local init = rand(5) - 2
      same("find", ss, ps, init)
      same("match", ss, ps)
      same("gmatch", ss, ps)
      same("gsub", ss, ps, "<%0>")
      same("gsub", ss, ps, "%1", rand(3) - 1)
      cases = cases + 5
      local ok, r = pcall(string.find, ss, ps, init)
      if not ok then raised = raised + 1 elseif r then matched = matched + 1 end
    end
    assert.equal(20000, cases)
    assert.is_true(raised > 400 and matched > 400, raised .. " raised, " .. matched .. " matched")
  end)

  describe("step budget", function()
    local LIMIT = "pattern too complex (step limit)"

    local function fails_fast(f, ...)
      local t0 = os.clock()
      local ok, err = pcall(f, ...)
      local dt = os.clock() - t0
      assert.is_false(ok)
      assert.equal(LIMIT, err:sub(-#LIMIT))                -- a Lua caller's file:line may come first
      assert.is_true(dt < 5, "took " .. dt .. " s")       -- ~30 ms; slack for valgrind/ASan
    end

    local long = ("a"):rep(20000)

    it("stops a pathological find, match, gmatch and gsub quickly", function()
      fails_fast(pattern.find, long, ".-.-.-b")
      fails_fast(pattern.match, long, "(.-)(.-)(.-)b")
      fails_fast(pattern.gsub, long, ".-.-.-b", "")
      fails_fast(pattern.gsub, long, "a*a*a*b", "x")
      fails_fast(function()
        for _ in pattern.gmatch(long, ".*.*.*b") do end
      end)
      fails_fast(pattern.find, long, ("a*"):rep(20) .. "b")
    end)

    it("counts steps across a whole gsub, not per match", function()
      local old = pattern.set_budget(1000)
      local ok, err = pcall(pattern.gsub, ("a"):rep(5000), "a", "b")
      pattern.set_budget(old)
      assert.is_false(ok)
      assert.equal(LIMIT, err)
    end)

    it("a small budget limits ordinary work; the default allows big ordinary work", function()
      local old = pattern.set_budget(50)
      assert.equal(LIMIT, select(2, pcall(pattern.match, ("x"):rep(100), "x+y")))
      pattern.set_budget(old)
      local big = ("word "):rep(200000)                     -- 1 MB
      local out, n = pattern.gsub(big, "%s+", "_")
      assert.equal(200000, n)
      assert.equal(#big, #out)
      assert.equal(200000, select(2, pattern.gsub(big, "(%w+)", "%1")))
      local count = 0
      for _ in pattern.gmatch(big, "%a+") do count = count + 1 end
      assert.equal(200000, count)
    end)

    it("plain finds are linear (memmem), without a budget", function()
      local hay = ("a"):rep(1000000)
      local needle = ("a"):rep(500000) .. "b"
      local t0 = os.clock()
      assert.is_nil(pattern.find(hay, needle, 1, true))
      assert.is_nil(pattern.find(hay, needle))
      assert.is_true(os.clock() - t0 < 1)
    end)

    it("a gmatch budget is per iteration", function()
      local old = pattern.set_budget(200)
      local n = 0
      local ok = pcall(function()
        for _ in pattern.gmatch(("ab"):rep(1000), "a") do n = n + 1 end
      end)
      pattern.set_budget(old)
      assert.is_true(ok)
      assert.equal(1000, n)
    end)
  end)
end)
