-- The service script fuzz_sandbox and fuzz_sandbox_json load into their sandbox
-- (fuzz/sandbox.lua, fuzz/sandbox_json.lua): plain functions whose results exercise the
-- value copy out of the sandbox, and forge.json inside it.
local json = forge.json

local function same(a, b, depth)
  if depth > 70 then return false end
  if type(a) == "number" and type(b) == "number" then return a == b or (a ~= a and b ~= b) end
  if type(a) ~= "table" or type(b) ~= "table" then return a == b end
  for k, x in pairs(a) do if not same(x, b[k], depth + 1) then return false end end
  for k in pairs(b) do if a[k] == nil then return false end end
  return true
end

return {
  echo = function(_, v) return v end,
  -- the value three times (a DAG: copied out as three trees) two levels down
  wrap = function(_, v) return { v = v, list = { v, v } } end,
  cycle = function(_, v) local t = { v = v } t.self = t return t end,
  deep = function(_, v)
    local t = v
    for _ = 1, 70 do t = { t } end
    return t
  end,
  -- the ctx table (with its secret function) comes back as the second result
  ctx = function(ctx, v) ctx.v = v return true end,
  -- forge.json.decode, then encode and decode again: the same value (numbers compared
  -- as numbers: 1.0 may come back as 1)
  json = function(_, text)
    local v, err = json.decode(text)
    if v == nil then return { ok = false, err = err } end
    local ok, enc = pcall(json.encode, v)
    if not ok then return { ok = true, value = v, encode_error = tostring(enc) } end
    local back, berr = json.decode(enc)
    if back == nil then return { ok = true, value = v, text = enc, redecode_error = berr } end
    return { ok = true, value = v, text = enc, same = same(v, back, 0) }
  end,
}
