-- Checks of fuzz_json (fuzz/README.md). Any raise, or a failed assert, is a finding.
--  1. util.json_decode never raises: a value, or nil and a message;
--  2. an accepted value keeps the documented limits: at most 64 levels of tables, no NaN or
--     infinity, integral numbers as integers, strings and keys valid UTF-8;
--  3. what decodes also encodes (util.json_encode, util.json_encode_sorted), and the text
--     decodes back to the same value (numbers within 1e-13 relative: lua-cjson writes
--     14 significant digits) — the store writes JSON and reads it back.
local util = require "forge.util"

local function check_value(v, depth, path)
  local t = type(v)
  if t == "number" then
    assert(v == v and v ~= math.huge and v ~= -math.huge, path .. ": NaN or infinity accepted")
    if math.type(v) == "float" then
      assert(v ~= math.floor(v) or math.abs(v) >= 2 ^ 63, path .. ": integral float not made an integer")
    end
  elseif t == "string" then
    assert(utf8.len(v), path .. ": invalid UTF-8 accepted")
  elseif t == "table" then
    assert(depth <= 64, path .. ": nested deeper than 64")
    for k, x in pairs(v) do
      assert(type(k) == "string" or math.type(k) == "integer", path .. ": key of type " .. type(k))
      if type(k) == "string" then assert(utf8.len(k), path .. ": invalid UTF-8 in a key") end
      check_value(x, depth + 1, path .. "." .. tostring(k))
    end
  else
    assert(v == util.null or t == "boolean", path .. ": unexpected " .. t)
  end
end

local function close(a, b)
  if a == b then return true end
  if type(a) == "number" and type(b) == "number" then
    return math.abs(a - b) <= 1e-13 * math.max(math.abs(a), math.abs(b))
  end
  if type(a) ~= "table" or type(b) ~= "table" then return false end
  for k, x in pairs(a) do if not close(x, b[k]) then return false end end
  for k in pairs(b) do if a[k] == nil then return false end end
  return true
end

return function(data)
  local v, err = util.json_decode(data)
  if v == nil then
    assert(err == nil or type(err) == "string", "decode: error is not a message")
    return
  end
  check_value(v, 1, "$")
  local text, eerr = util.json_encode(v)
  assert(text, "encode of a decoded value failed: " .. tostring(eerr))
  local back, berr = util.json_decode(text)
  assert(back ~= nil, "decode(encode(v)) failed: " .. tostring(berr) .. "\n" .. text)
  assert(close(v, back), "decode(encode(v)) differs from v:\n" .. text)
  local sorted = util.json_encode_sorted(v)
  local back2, serr = util.json_decode(sorted)
  assert(back2 ~= nil, "decode(json_encode_sorted(v)) failed: " .. tostring(serr) .. "\n" .. sorted)
  assert(close(v, back2), "decode(json_encode_sorted(v)) differs from v:\n" .. sorted)
end
