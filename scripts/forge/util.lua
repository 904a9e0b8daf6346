--- Small shared helpers for the broker library: URL decoding, query strings, JSON, time.
local cjson = require "cjson.safe"

-- Strict JSON in: no hex, leading zeros, NaN or Infinity (lua-cjson accepts them by default),
-- and no nesting deeper than a service script's sandbox copies (64 levels).
cjson.decode_invalid_numbers(false)
cjson.decode_max_depth(64)

local M = {}

M.null = cjson.null

--- Percent-decode a URL component; returns nil for malformed escapes.
function M.url_decode(s, plus_is_space)
  if plus_is_space then s = s:gsub("+", " ") end
  if s:find("%%[^%x]") or s:find("%%%x[^%x]") or s:find("%%%x?$") then return nil end
  return (s:gsub("%%(%x%x)", function(h) return string.char(tonumber(h, 16)) end))
end

--- Parse a query string into {name = value}; an empty value counts as absent.
-- Returns nil, message on a malformed escape.
function M.parse_query(qs)
  local q = {}
  for pair in (qs or ""):gmatch("[^&;]+") do
    local k, v = pair:match("^([^=]*)=?(.*)$")
    k, v = M.url_decode(k, true), M.url_decode(v, true)
    if not k or not v then return nil, "malformed percent-escape in the query string" end
    if k ~= "" and v ~= "" then q[k] = v end
  end
  return q
end

--- Split a raw request path into decoded segments (trailing slash ignored).
-- Returns nil, message when a segment is not valid percent-encoding.
function M.split_path(path)
  local segs = {}
  for raw in path:gmatch("[^/]+") do
    local seg = M.url_decode(raw)
    if not seg then return nil, "malformed percent-escape in the path" end
    segs[#segs + 1] = seg
  end
  return segs
end

-- lua-cjson 2.1 always writes "/" as "\/" (it has no option to stop): undo exactly those escapes,
-- i.e. a run of backslashes before "/" of odd length loses one (an even run is escaped backslashes).
local function unescape_slashes(s)
  return (s:gsub("(\\+)/", function(bs) if #bs % 2 == 1 then return bs:sub(2) .. "/" end end))
end

--- JSON text of a value (URLs and ids without escaped slashes); nil, message on failure.
function M.json_encode(v)
  local s, err = cjson.encode(v)
  if not s then return nil, err end
  return unescape_slashes(s)
end

-- lua-cjson 2.1 writes every empty table as {}: a list that may be empty is marked with
-- M.array, and M.json_answer writes it as [] (through a placeholder string in its place).
local ARRAY = { __name = "forge.array" }
local EMPTY_ARRAY = "\0forge.empty-array\0"
local EMPTY_ARRAY_JSON = '"\\u0000forge.empty-array\\u0000"'

--- Mark list `t` (a new one when nil) as a JSON array, so an empty one is answered as [] by
-- M.json_answer; the table is otherwise unchanged. @return t
function M.array(t) return setmetatable(t or {}, ARRAY) end

-- v with each empty marked list in it replaced by the placeholder; tables are copied only on
-- the way to a replacement, so the caller's value is never changed.
local function placehold(v)
  if next(v) == nil then return getmetatable(v) == ARRAY and EMPTY_ARRAY or v end
  local copy
  for k, x in pairs(v) do
    if type(x) == "table" then
      local y = placehold(x)
      if y ~= x then
        if not copy then
          copy = {}
          for k2, x2 in pairs(v) do copy[k2] = x2 end
        end
        copy[k] = y
      end
    end
  end
  return copy or v
end

--- JSON text of an answer: as M.json_encode, with the empty lists marked by M.array as [].
function M.json_answer(v)
  if type(v) ~= "table" then return M.json_encode(v) end
  local s, err = M.json_encode(placehold(v))
  if not s then return nil, err end
  if s == EMPTY_ARRAY_JSON then return "[]" end
  return (s:gsub(EMPTY_ARRAY_JSON:gsub("%p", "%%%0"), "[]"))
end

local function is_array(t)
  local n = #t
  if n == 0 then return false end
  local count = 0
  for _ in pairs(t) do count = count + 1 end
  return count == n
end

--- JSON with object keys sorted: the same value always encodes to the same bytes (the
-- catalog is built in every worker state, and platforms compare it across fetches).
function M.json_encode_sorted(v)
  return unescape_slashes(M.sorted_raw(v))
end

-- json_encode_sorted before the slashes are unescaped (once, at the top).
function M.sorted_raw(v)
  if type(v) ~= "table" then return cjson.encode(v) end
  local parts = {}
  if is_array(v) then
    for i = 1, #v do parts[i] = M.sorted_raw(v[i]) end
    return "[" .. table.concat(parts, ",") .. "]"
  end
  local keys = {}
  for k in pairs(v) do keys[#keys + 1] = tostring(k) end
  table.sort(keys)
  for i, k in ipairs(keys) do
    local x = v[k]
    if x == nil then x = v[tonumber(k)] end
    parts[i] = cjson.encode(k) .. ":" .. M.sorted_raw(x)
  end
  return "{" .. table.concat(parts, ",") .. "}"
end

-- lua-cjson 2.1 decodes every number as a float; integral values become integers again
-- so ports, counts and revisions print as "30000", not "30000.0". Numbers too large for a
-- double (1e999) and strings that are not UTF-8 are refused. Every stored record is decoded
-- here, so the walk allocates nothing: the path of a refused value is built on the way out.
-- Returns the value | nil, message, path below v.
local tointeger, utf8_len, huge = math.tointeger, utf8.len, math.huge

local function scalar(x)
  local tx = type(x)
  if tx == "number" then
    if x ~= x or x == huge or x == -huge then return nil, "number out of range" end
    return tointeger(x) or x
  elseif tx == "string" and not utf8_len(x) then
    return nil, "invalid UTF-8 in a string"
  end
  return x
end

local function normalize(v)
  if type(v) ~= "table" then
    local nv, err = scalar(v)
    return nv, err, ""
  end
  for k, x in next, v do
    if type(k) == "string" and not utf8_len(k) then return nil, "invalid UTF-8 in a key", "" end
    local nv, err, where
    if type(x) == "table" then nv, err, where = normalize(x) else nv, err = scalar(x) end
    if err then
      return nil, err, (type(k) == "string" and ("." .. k) or ("[" .. tostring(k) .. "]")) .. (where or "")
    end
    if type(x) == "number" then v[k] = nv end   -- 30000.0 == 30000: compare types, not values
  end
  return v
end

--- Decode JSON text strictly; nil, message on failure.
function M.json_decode(text)
  local v, err = cjson.decode(text)
  if v == nil and err then return nil, err end
  local nv, nerr, where = normalize(v)
  if nerr then return nil, "$" .. where .. ": " .. nerr end
  return nv
end

--- Deep equality of JSON-like values (tables compared by content).
--- Call fn(kv) for every key of store `db` under prefix, 500 keys per read, so memory stays
-- bounded however many are stored; between() (optional) after each read page.
-- @return true | nil, err (the store failed)
function M.each_kv(db, prefix, fn, between)
  local page, from = 500, nil
  repeat
    local kvs, err = db:range(prefix, { limit = page, from = from })
    if not kvs then return nil, err end
    for _, kv in ipairs(kvs) do fn(kv) end
    from = kvs[#kvs] and kvs[#kvs].key .. "\1"    -- keys hold no NUL: nothing sorts in between
    if between then between() end
  until #kvs < page
  return true
end

function M.deep_equal(a, b)
  if a == b then return true end
  if type(a) ~= "table" or type(b) ~= "table" then return false end
  for k, v in pairs(a) do
    if not M.deep_equal(v, b[k]) then return false end
  end
  for k in pairs(b) do
    if a[k] == nil then return false end
  end
  return true
end

--- Deep copy of a JSON-like value.
function M.copy(v)
  if type(v) ~= "table" then return v end
  local t = {}
  for k, x in pairs(v) do t[k] = M.copy(x) end
  return setmetatable(t, getmetatable(v))
end

--- UTC timestamp as RFC 3339 with milliseconds.
function M.iso_time(t)
  local secs = math.floor(t)
  return os.date("!%Y-%m-%dT%H:%M:%S", secs) .. string.format(".%03dZ", math.floor((t - secs) * 1000))
end

-- Files. lfs and forge.proc are loaded on first use: the JSON and request helpers above are
-- also used where only lua-cjson is at hand (the fuzz harnesses).

--- mkdir -p; each directory it creates gets `mode` (e.g. tonumber("700", 8)) when given.
-- @return true | nil, "cannot create DIR: why"
function M.mkdirs(path, mode)
  local lfs = require "lfs"
  local cur = ""
  for part in path:gmatch("[^/]+") do
    cur = cur .. "/" .. part
    if not lfs.symlinkattributes(cur, "mode") then
      local ok, err = lfs.mkdir(cur)
      if not ok and not lfs.symlinkattributes(cur, "mode") then return nil, "cannot create " .. cur .. ": " .. tostring(err) end
      if ok and mode then require("forge.proc").chmod(cur, mode) end
    end
  end
  return true
end

--- rm -r, never following a symlink: removes what it can.
-- @return true | nil, the first "cannot remove PATH: why"
function M.remove_tree(path)
  local lfs = require "lfs"
  local mode = lfs.symlinkattributes(path, "mode")
  if not mode then return true end
  local first
  if mode == "directory" then
    for entry in lfs.dir(path) do
      if entry ~= "." and entry ~= ".." then
        local ok, err = M.remove_tree(path .. "/" .. entry)
        if not ok then first = first or err end
      end
    end
  end
  local ok, err = (mode == "directory" and lfs.rmdir or os.remove)(path)
  if not ok then first = first or ("cannot remove " .. path .. ": " .. tostring(err)) end
  if first then return nil, first end
  return true
end

--- The keys of `t`, sorted (by their string form, so mixed key types sort too).
function M.sorted_keys(t)
  local keys = {}
  for k in pairs(t) do keys[#keys + 1] = k end
  table.sort(keys, function(a, b) return tostring(a) < tostring(b) end)
  return keys
end

--- The whole content of a file, or nil when it cannot be read.
function M.read_file(path)
  local f = io.open(path, "rb")
  if not f then return nil end
  local text = f:read("a")
  f:close()
  return text
end

return M
