-- Checks of fuzz_sandbox (fuzz/README.md). The input's first byte picks a service function
-- of fuzz/sandbox_service.lua; fuzz_sandbox.c builds the argument from the other bytes.
-- Any raise, or a failed assert, is a finding. For each call, this script predicts what
-- runtime/sandbox.c's copy_value must do with the argument (and with what the function
-- returns), following docs/sandbox.md: a copy fails exactly when a table is nested deeper
-- than 64 levels, a table contains itself, or the estimate passes 16 MiB; otherwise the
-- value comes back equal to the argument less functions, userdata, threads (dropped, with
-- their keys) and keys that are not strings, numbers or booleans.
local sandbox = require "forge.sandbox"
local VERBOSE = os.getenv("FUZZ_VERBOSE")

local MAX_DEPTH, MAX_COPY, CP_ENTRY, CP_TABLE = 64, 16 * 1024 * 1024, 16, 64

local f = assert(io.open(FUZZ_ROOT .. "/fuzz/sandbox_service.lua"))
local source = f:read("a")
f:close()
local sb = assert(sandbox.new { name = "fuzz", memory = 256 * 1024 * 1024 })
assert(sb:load(source, "@fuzz/sandbox_service.lua"))
FUZZ_SANDBOX = sb -- fuzz_sandbox*.c collects its garbage after every input

local SKIP = {} -- a value the copy drops
local NULL = require("cjson").null -- the NULL light userdata: json null

-- What copy_value produces from v at depth (mode CP_SKIP), or nil, reason.
local function predict(c, v, depth, path)
  local t = type(v)
  if t == "nil" or t == "boolean" then return v end
  if t == "number" then
    c.size = c.size + CP_ENTRY
    if c.size > MAX_COPY then return nil, "size" end
    return v
  end
  if t == "string" then
    c.size = c.size + #v + CP_ENTRY
    if c.size > MAX_COPY then return nil, "size" end
    return v
  end
  if v == NULL then return v end
  if t ~= "table" then return SKIP end
  if depth > MAX_DEPTH then return nil, "deep" end
  for i = 0, depth - 1 do if path[i] == v then return nil, "cyclic" end end
  path[depth] = v
  c.size = c.size + CP_TABLE
  if c.size > MAX_COPY then return nil, "size" end
  local out = {}
  for k, x in next, v do
    local kt = type(k)
    if kt == "string" or kt == "number" or kt == "boolean" then
      local ck, why = predict(c, k, depth + 1, path)
      if ck == nil then return nil, why end
      local cx, why2 = predict(c, x, depth + 1, path)
      if cx == nil and why2 then return nil, why2 end
      if cx ~= SKIP then out[ck] = cx end
    end
  end
  return out
end

local function expect(v)
  local out, why = predict({ size = 0 }, v, 0, {})
  if out == nil and why then return nil, why end
  if out == SKIP then return nil end -- a top-level function: nil
  return out
end

local function bits(x) return string.pack("<d", x) end

local function same(a, b, path, budget)
  budget.n = budget.n + 1
  if budget.n > 2000000 then return true end
  if type(a) == "number" and type(b) == "number" then
    if math.type(a) ~= math.type(b) then return false, path .. ": " .. math.type(a) .. " vs " .. math.type(b) end
    if math.type(a) == "float" then
      if a ~= a then return b ~= b, path .. ": NaN vs " .. tostring(b) end
      return bits(a) == bits(b), path .. ": " .. ("%a"):format(a) .. " vs " .. ("%a"):format(b)
    end
    return a == b, path .. ": " .. a .. " vs " .. b
  end
  if type(a) ~= "table" or type(b) ~= "table" then
    return rawequal(a, b), path .. ": " .. tostring(a) .. " vs " .. tostring(b)
  end
  for k, x in pairs(a) do
    local ok, why = same(x, rawget(b, k), path .. "." .. tostring(k), budget)
    if not ok then return false, why end
  end
  for k in pairs(b) do
    if rawget(a, k) == nil then return false, path .. "." .. tostring(k) .. ": not expected" end
  end
  return true
end

local REASON = { deep = "nested deeper than 64", cyclic = "cyclic table", size = "too large to copy" }

local function check_failed(err, why, what)
  assert(type(err) == "table" and type(err.message) == "string", what .. ": error is not a forge.error")
  if err.code == "sandbox.memory" then return end -- the 256 MiB state limit: allowed
  assert(err.code == "sandbox.error", what .. ": unexpected error code " .. tostring(err.code) .. ": " .. err.message)
  if why then
    local found = false
    for _, r in pairs(REASON) do found = found or err.message:find(r, 1, true) ~= nil end
    assert(found, what .. ": copy failed with an unexpected message: " .. err.message)
  end
end

local FUNCS = { "echo", "echo", "echo", "wrap", "cycle", "deep", "ctx" }

-- Entries a copy of v would visit (shared subtables count each time), memoised; a cycle
-- counts once. Values past BIG take ~0.1 s to copy under ASan: only 1 input in 16 (the first
-- byte >= 0xF0) runs them, so the fuzzer spends its time on the other paths.
local BIG = 100000
local function visits(v, memo)
  if type(v) ~= "table" then return 1 end
  if memo[v] then return memo[v] end
  memo[v] = 1
  local n = 1
  for k, x in next, v do
    n = n + visits(k, memo) + visits(x, memo)
    if n > BIG then break end
  end
  memo[v] = n
  return n
end

return function(selector, value)
  local fn = FUNCS[(selector:byte(1) or 0) % #FUNCS + 1]
  if (selector:byte(1) or 0) < 0xF0 and visits(value, {}) > BIG then return end
  local want, why = expect(value)
  local res, ctx = sb:call(fn, {}, value)
  if VERBOSE then print(fn, why, res, ctx and (ctx.message or ctx)) end
  if why then -- the argument cannot be copied in
    assert(res == nil and getmetatable(ctx), fn .. ": an argument that fails to copy (" .. why .. ") was copied")
    return check_failed(ctx, why, fn)
  end
  if fn == "cycle" or fn == "deep" then
    assert(res == nil and getmetatable(ctx), fn .. ": a " .. fn .. " result was copied out")
    return check_failed(ctx, true, fn)
  end
  -- what the function returns (or leaves in ctx) is copied out: predict that copy too
  if fn == "wrap" or fn == "ctx" then
    local out = fn == "wrap" and { v = want, list = { want, want } } or { v = want, secret = print }
    want, why = expect(out)
    if why then
      assert(res == nil and getmetatable(ctx), fn .. ": a result that fails to copy (" .. why .. ") was copied")
      return check_failed(ctx, why, fn)
    end
  end
  if res == nil and getmetatable(ctx) ~= nil then -- nil, forge.error (a result nil has a plain ctx)
    check_failed(ctx, nil, fn)
    assert(ctx.code == "sandbox.memory", fn .. ": a copyable value failed: " .. tostring(ctx.message))
    return
  end
  assert(type(ctx) == "table" and ctx.secret == nil, fn .. ": ctx came back with its secret")
  if fn == "ctx" then
    assert(res == true, "ctx: result")
    res = ctx
  end
  local ok, diff = same(want, res, "$", { n = 0 })
  assert(ok, fn .. ": the value came back different at " .. tostring(diff))
end
