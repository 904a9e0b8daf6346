-- Checks of fuzz_yaml (fuzz/README.md). Any raise, or a failed assert, is a finding.
--  1. yaml.decode(input) never raises: a value, or nil and a forge.error with a message;
--  2. a decoded value encodes, and the text decodes back to the same value (kinds, key
--     sets, integers exactly, floats within 1e-9 relative, NaN as NaN);
--  3. with a NUL in the input, yaml.merge{before, after} (operators evaluated, env given so
--     the process environment does not matter) is a value that encodes, or nil and an error.
local yaml = require "forge.yaml"

local function check_error(err, what)
  assert(type(err) == "table", what .. ": error is not a table")
  assert(type(err.message) == "string" and err.message ~= "", what .. ": error without a message")
  assert(type(err.code) == "string", what .. ": error without a code")
end

local function same(a, b, path, depth)
  if depth > 1100 then return true end
  if a == yaml.null then a = nil end
  if b == yaml.null then b = nil end
  if a == nil or b == nil then
    return a == nil and b == nil, path .. ": " .. tostring(a) .. " vs " .. tostring(b)
  end
  if type(a) == "number" and type(b) == "number" then
    if a ~= a then return b ~= b, path .. ": NaN vs " .. tostring(b) end
    if math.type(a) == "integer" and math.type(b) == "integer" then
      return a == b, path .. ": " .. a .. " vs " .. b
    end
    if a == b or math.abs(a - b) <= 1e-9 * math.max(math.abs(a), math.abs(b)) then return true end
    return false, path .. ": " .. tostring(a) .. " vs " .. tostring(b)
  end
  if type(a) ~= type(b) then return false, path .. ": " .. type(a) .. " vs " .. type(b) end
  if type(a) ~= "table" then return a == b, path .. ": " .. ("%q"):format(tostring(a)) .. " vs " ..
      ("%q"):format(tostring(b)) end
  if yaml.kind(a) ~= yaml.kind(b) then return false, path .. ": " .. yaml.kind(a) .. " vs " .. yaml.kind(b) end
  for k, v in pairs(a) do
    local ok, why = same(v, b[k], path .. "." .. tostring(k), depth + 1)
    if not ok then return false, why end
  end
  for k in pairs(b) do
    if a[k] == nil then return false, path .. "." .. tostring(k) .. ": only after the round trip" end
  end
  return true
end

local function round_trip(v, what)
  local text, err = yaml.encode(v)
  if text == nil then
    check_error(err, what .. ": encode")
    return
  end
  local back, berr = yaml.decode(text, "encoded")
  if back == nil then
    error(what .. ": yaml.encode wrote text that does not decode (" .. berr.message .. "):\n" .. text, 0)
  end
  local ok, why = same(v, back, "$", 0)
  if not ok then error(what .. ": decode(encode(v)) differs from v at " .. why .. "\n" .. text, 0) end
end

local ENV = { HOME = "/home/fuzz", NAME = "fuzz", EMPTY = "", NUM = "42" }

return function(data)
  local sep = data:find("\0", 1, true)
  local first = sep and data:sub(1, sep - 1) or data
  local v, err = yaml.decode(first, "input.yml")
  if v == nil then check_error(err, "decode") else round_trip(v, "decode") end
  if sep then
    local second = data:sub(sep + 1)
    local m, merr = yaml.merge({ first, second }, { names = { "a.yml", "b.yml" }, env = ENV })
    if m == nil then
      check_error(merr, "merge")
    else
      local text, eerr = yaml.encode(m)
      if text == nil then check_error(eerr, "merge: encode") end
    end
  end
end
