--- JSON Schema validation for plan `schemas` (drafts 04, 06 and 07, as OSB catalogs use them).
--
-- Values are JSON as decoded by lua-cjson: objects and arrays are Lua tables (an empty table is
-- accepted as either), JSON null is cjson.null (any userdata counts as null; so does Lua nil).
--
--   schema.check(s)                      -> true | nil, message
--   schema.validate(s, value [, root])   -> true | nil, message, path
--   schema.pattern_match(pattern, str)   -> true | false | nil, message   (the ECMA regex subset)
--
-- Paths look like `parameters.tags[2]` (array indices are 0-based, as in JSON Pointer) and
-- `parameters["odd key"]`. The first error is reported, in a deterministic order: keywords in a
-- fixed order, object members by sorted name, array items by index.
--
-- Pure functions over string/table/math/utf8 only: no global state, no io/os, no require.

local type, pairs, ipairs, tostring, tonumber = type, pairs, ipairs, tostring, tonumber
local mtype, floor, huge = math.type, math.floor, math.huge
local sfmt, schar, srep = string.format, string.char, string.rep
local concat, sort = table.concat, table.sort
local ulen, ucodes = utf8.len, utf8.codes

local M = {}

local MAX_REFS = 64          -- $ref hops on the current evaluation path
local MAX_DEPTH = 512        -- nested schema applications (deep data, deep schemas)
local MAX_CHECK_DEPTH = 128  -- nesting of a schema document
local RE_MAX_STEPS = 1000000 -- backtracking budget for one pattern test
local RE_MAX_DEPTH = 40000   -- matcher recursion
local RE_MAX_COUNT = 10000   -- largest {n,m} bound
local INF = huge

---------------------------------------------------------------------------------------------
-- JSON values
---------------------------------------------------------------------------------------------

--- JSON kind of a Lua value: "null", "boolean", "string", "number", "object", "array", or
-- "empty" (a table without keys, which is both an empty object and an empty array).
local function kind(v)
  local t = type(v)
  if t == "table" then
    local n = 0
    for k in pairs(v) do
      if mtype(k) ~= "integer" or k < 1 then return "object" end
      n = n + 1
    end
    if n == 0 then return "empty" end
    for i = 1, n do
      if v[i] == nil then return "object" end
    end
    return "array"
  end
  if v == nil or t == "userdata" then return "null" end
  return t
end

local function is_integer(x)
  return mtype(x) == "integer" or (x == floor(x) and x ~= huge and x ~= -huge)
end

local function is_object(v)
  local k = kind(v)
  return k == "object" or k == "empty"
end

local function is_array(v)
  local k = kind(v)
  return k == "array" or k == "empty"
end

local function key_lt(a, b)
  local ta, tb = type(a), type(b)
  if ta ~= tb then return ta < tb end
  if ta == "string" or ta == "number" then return a < b end
  return tostring(a) < tostring(b)
end

local function sorted_keys(t)
  local keys = {}
  for k in pairs(t) do keys[#keys + 1] = k end
  sort(keys, key_lt)
  return keys
end

local ESC = { ['"'] = '\\"', ["\\"] = "\\\\", ["\n"] = "\\n", ["\r"] = "\\r", ["\t"] = "\\t" }

local function quote(s)
  return '"' .. s:gsub('[%c"\\]', function(ch) return ESC[ch] or sfmt("\\u%04x", ch:byte()) end) .. '"'
end

local function fmt_num(x)
  if mtype(x) == "integer" then return tostring(x) end
  if x ~= x then return "NaN" end
  if x == floor(x) and x > -2 ^ 63 and x < 2 ^ 63 then return sfmt("%d", x) end
  if x == huge then return "Infinity" elseif x == -huge then return "-Infinity" end
  local s = sfmt("%.15g", x)
  if tonumber(s) ~= x then s = sfmt("%.17g", x) end
  return s
end

--- Canonical JSON text (sorted keys, 1 and 1.0 alike): used for messages and uniqueItems.
local function encode(v)
  local k = kind(v)
  if k == "string" then return quote(v)
  elseif k == "number" then return fmt_num(v)
  elseif k == "boolean" then return tostring(v)
  elseif k == "null" then return "null"
  elseif k == "empty" then return "{}"
  elseif k == "array" then
    local parts = {}
    for i = 1, #v do parts[i] = encode(v[i]) end
    return "[" .. concat(parts, ",") .. "]"
  elseif k == "object" then
    local parts = {}
    for _, key in ipairs(sorted_keys(v)) do
      parts[#parts + 1] = quote(tostring(key)) .. ":" .. encode(v[key])
    end
    return "{" .. concat(parts, ",") .. "}"
  end
  return "<" .. k .. ">"
end

local function short(v)
  local s = encode(v)
  if #s > 60 then s = s:sub(1, 57) .. "..." end
  return s
end

local function deep_equal(a, b)
  if a == b then return true end
  local ka, kb = kind(a), kind(b)
  if ka == "null" and kb == "null" then return true end
  if type(a) ~= "table" or type(b) ~= "table" then return false end
  for k, x in pairs(a) do
    if b[k] == nil or not deep_equal(x, b[k]) then return false end
  end
  for k in pairs(b) do
    if a[k] == nil then return false end
  end
  return true
end

---------------------------------------------------------------------------------------------
-- Paths
---------------------------------------------------------------------------------------------

local function key_path(path, key)
  key = tostring(key)
  if key:match("^[%w_$-]+$") then
    if path == "" then return key end
    return path .. "." .. key
  end
  return path .. "[" .. quote(key) .. "]"
end

local function index_path(path, i) -- i is the Lua index; shown 0-based
  return path .. "[" .. (i - 1) .. "]"
end

local function at(path, msg)
  if path == "" then return msg end
  return path .. ": " .. msg
end

---------------------------------------------------------------------------------------------
-- ECMA 262 regex subset: parser + backtracking matcher over code points
---------------------------------------------------------------------------------------------

local function codepoints(s)
  local out = {}
  if ulen(s) then
    local n = 0
    for _, cp in ucodes(s) do n = n + 1; out[n] = cp end
    return out, n
  end
  for i = 1, #s do out[i] = s:byte(i) end
  return out, #s
end

local CLS_D = { t = "class", r = { 48, 57 } }
local CLS_W = { t = "class", r = { 48, 57, 65, 90, 95, 95, 97, 122 } }
local CLS_S = { t = "class", r = { 9, 13, 32, 32, 160, 160, 5760, 5760, 8192, 8202, 8232, 8233, 8239, 8239,
  8287, 8287, 12288, 12288, 65279, 65279 } }
local CLS_ND = { t = "class", neg = true, r = CLS_D.r }
local CLS_NW = { t = "class", neg = true, r = CLS_W.r }
local CLS_NS = { t = "class", neg = true, r = CLS_S.r }
local CLS_DOT = { t = "class", neg = true, r = { 10, 10, 13, 13, 8232, 8233 } }
local CLASS_ESC = { d = CLS_D, w = CLS_W, s = CLS_S, D = CLS_ND, W = CLS_NW, S = CLS_NS }
local CHAR_ESC = { t = 9, n = 10, v = 11, f = 12, r = 13 }

local function class_has(cl, cp)
  local hit = false
  local r = cl.r
  for i = 1, #r, 2 do
    if cp >= r[i] and cp <= r[i + 1] then hit = true; break end
  end
  if not hit and cl.sub then
    for _, sc in ipairs(cl.sub) do
      if class_has(sc, cp) then hit = true; break end
    end
  end
  if cl.neg then return not hit end
  return hit
end

local function hexval(p, pos, n)
  local v = 0
  for i = pos, pos + n - 1 do
    local c = p[i]
    local d
    if not c then return nil end
    if c >= 48 and c <= 57 then d = c - 48
    elseif c >= 65 and c <= 70 then d = c - 55
    elseif c >= 97 and c <= 102 then d = c - 87
    else return nil end
    v = v * 16 + d
  end
  return v
end

--- Compile an ECMA pattern: returns a compiled regex, or nil and the reason it is unsupported.
local function compile(src)
  local p, np = codepoints(src)
  local pos, err = 1, nil
  local function bad(msg)
    err = err or msg
    return nil
  end

  local function parse_int()
    local v
    while p[pos] and p[pos] >= 48 and p[pos] <= 57 do
      v = (v or 0) * 10 + p[pos] - 48
      if v > RE_MAX_COUNT then return bad("repetition count above " .. RE_MAX_COUNT) end
      pos = pos + 1
    end
    return v
  end

  -- At '{': a {n}, {n,} or {n,m} quantifier? Returns min, max and moves past it, else nil.
  local function braces()
    local save = pos
    pos = pos + 1
    local lo = parse_int()
    if lo then
      local hi = lo
      if p[pos] == 44 then
        pos = pos + 1
        hi = parse_int() or INF
        if err then return nil end
      end
      if p[pos] == 125 then
        pos = pos + 1
        return lo, hi
      end
    end
    pos = save
    return nil
  end

  -- After a backslash. Returns a code point, or a class node, or {assert = true, neg = bool}.
  local function escape(in_class)
    local ch = p[pos]
    if not ch then return bad("pattern ends with a backslash") end
    pos = pos + 1
    local c = ch < 128 and schar(ch) or ""
    if CLASS_ESC[c] then return CLASS_ESC[c] end
    if CHAR_ESC[c] then return CHAR_ESC[c] end
    if c == "b" then
      if in_class then return 8 end
      return { assert = true, neg = false }
    elseif c == "B" then
      if in_class then return bad("\\B inside a character class") end
      return { assert = true, neg = true }
    elseif c == "0" then
      if p[pos] and p[pos] >= 48 and p[pos] <= 57 then return bad("octal escapes are not supported") end
      return 0
    elseif c:match("^[1-9]$") then
      return bad("backreferences are not supported")
    elseif c == "x" then
      local v = hexval(p, pos, 2)
      if not v then return bad("malformed \\x escape") end
      pos = pos + 2
      return v
    elseif c == "u" then
      if p[pos] == 123 then return bad("\\u{...} escapes are not supported") end
      local v = hexval(p, pos, 4)
      if not v then return bad("malformed \\u escape") end
      pos = pos + 4
      if v >= 0xD800 and v <= 0xDBFF and p[pos] == 92 and p[pos + 1] == 117 then
        local lo = hexval(p, pos + 2, 4)
        if lo and lo >= 0xDC00 and lo <= 0xDFFF then
          pos = pos + 6
          v = 0x10000 + (v - 0xD800) * 0x400 + (lo - 0xDC00)
        end
      end
      return v
    elseif c == "c" then
      local l = p[pos]
      if l and ((l >= 65 and l <= 90) or (l >= 97 and l <= 122)) then
        pos = pos + 1
        return l % 32
      end
      return bad("malformed \\c escape")
    elseif c == "p" or c == "P" then
      return bad("unicode property escapes are not supported")
    elseif c == "k" then
      return bad("named backreferences are not supported")
    elseif c:match("^%w$") then
      return bad("unsupported escape '\\" .. c .. "'")
    end
    return ch -- identity escape: \. \\ \/ \- \[ ...
  end

  local function class_atom()
    local ch = p[pos]
    if ch == 92 then
      pos = pos + 1
      return escape(true)
    end
    pos = pos + 1
    return ch
  end

  local function parse_class()
    pos = pos + 1
    local node = { t = "class", neg = false, r = {} }
    local r = node.r
    local function add(a)
      if type(a) == "number" then
        r[#r + 1] = a; r[#r + 1] = a
      else
        node.sub = node.sub or {}
        node.sub[#node.sub + 1] = a
      end
    end
    if p[pos] == 94 then node.neg = true; pos = pos + 1 end
    while true do
      local ch = p[pos]
      if not ch then return bad("unterminated character class") end
      if ch == 93 then pos = pos + 1; break end
      local a = class_atom()
      if err then return nil end
      if p[pos] == 45 and p[pos + 1] and p[pos + 1] ~= 93 then
        pos = pos + 1
        local b = class_atom()
        if err then return nil end
        if type(a) == "number" and type(b) == "number" then
          if a > b then return bad("character class range out of order") end
          r[#r + 1] = a; r[#r + 1] = b
        else -- [\d-x]: the '-' is a literal (ECMA Annex B)
          add(a); add(45); add(b)
        end
      else
        add(a)
      end
    end
    return node
  end

  local parse_alt

  -- Returns node, is_assertion.
  local function parse_atom()
    local ch = p[pos]
    if ch == 40 then -- (
      pos = pos + 1
      local look
      if p[pos] == 63 then -- (?
        local n = p[pos + 1]
        if n == 58 then pos = pos + 2
        elseif n == 61 or n == 33 then look = n; pos = pos + 2
        elseif n == 60 then
          if p[pos + 2] == 61 or p[pos + 2] == 33 then return bad("lookbehind is not supported") end
          pos = pos + 2
          while p[pos] and p[pos] ~= 62 do
            if p[pos] >= 128 or not schar(p[pos]):match("[%w_$]") then return bad("malformed group name") end
            pos = pos + 1
          end
          if not p[pos] then return bad("unterminated group name") end
          pos = pos + 1
        else
          return bad("unsupported group syntax '(?'")
        end
      end
      local inner = parse_alt()
      if err then return nil end
      if p[pos] ~= 41 then return bad("missing ')'") end
      pos = pos + 1
      if look then return { t = "look", node = inner, neg = look == 33 }, true end
      return inner
    elseif ch == 91 then return parse_class()
    elseif ch == 46 then pos = pos + 1; return CLS_DOT
    elseif ch == 94 then pos = pos + 1; return { t = "bol" }, true
    elseif ch == 36 then pos = pos + 1; return { t = "eol" }, true
    elseif ch == 92 then
      pos = pos + 1
      local e = escape(false)
      if err then return nil end
      if type(e) == "number" then return { t = "char", cp = e } end
      if e.assert then return { t = "wordb", neg = e.neg }, true end
      return e
    elseif ch == 42 or ch == 43 or ch == 63 then return bad("nothing to repeat")
    elseif ch == 123 then
      if braces() then return bad("nothing to repeat") end
      if err then return nil end
    end
    pos = pos + 1
    return { t = "char", cp = ch }
  end

  local function parse_seq()
    local list = {}
    while p[pos] and p[pos] ~= 124 and p[pos] ~= 41 do
      local atom, assertion = parse_atom()
      if err then return nil end
      local q, lo, hi = p[pos], nil, nil
      if q == 42 then lo, hi = 0, INF; pos = pos + 1
      elseif q == 43 then lo, hi = 1, INF; pos = pos + 1
      elseif q == 63 then lo, hi = 0, 1; pos = pos + 1
      elseif q == 123 then
        lo, hi = braces()
        if err then return nil end
        if lo and hi < lo then return bad("numbers out of order in {} quantifier") end
      end
      if lo then
        if assertion then return bad("nothing to repeat") end
        if p[pos] == 63 then pos = pos + 1 end -- lazy: same answer for a yes/no test
        atom = { t = "rep", node = atom, min = lo, max = hi, single = atom.t == "char" or atom.t == "class" }
      end
      list[#list + 1] = atom
    end
    if #list == 1 then return list[1] end
    return { t = "seq", list = list }
  end

  parse_alt = function()
    local alts = { parse_seq() }
    if err then return nil end
    while p[pos] == 124 do
      pos = pos + 1
      alts[#alts + 1] = parse_seq()
      if err then return nil end
    end
    if #alts == 1 then return alts[1] end
    return { t = "alt", list = alts }
  end

  local root = parse_alt()
  if not err and pos <= np then bad("unmatched ')'") end
  if err then return nil, err end
  local first = root.t == "seq" and root.list[1] or root
  return { node = root, anchored = first ~= nil and first.t == "bol", source = src }
end

local function is_word(cp)
  return cp ~= nil and class_has(CLS_W, cp)
end

--- Unanchored search of a compiled regex in s: true/false, or nil and a message when the
-- backtracking budget runs out.
local function search(re, s)
  local t, n = codepoints(s)
  local steps, depth, abort = 0, 0, false
  local m

  local function single(node, cp)
    if not cp then return false end
    if node.t == "char" then return cp == node.cp end
    return class_has(node, cp)
  end

  local function inner(node, i, k)
    local tt = node.t
    if tt == "char" or tt == "class" then
      if single(node, t[i]) then return k(i + 1) end
      return false
    elseif tt == "seq" then
      local list, len = node.list, #node.list
      local function step(idx, j)
        if idx > len then return k(j) end
        return m(list[idx], j, function(j2) return step(idx + 1, j2) end)
      end
      return step(1, i)
    elseif tt == "alt" then
      for _, a in ipairs(node.list) do
        if m(a, i, k) then return true end
        if abort then return false end
      end
      return false
    elseif tt == "rep" then
      local sub, lo, hi = node.node, node.min, node.max
      if node.single then
        local cnt = 0
        while cnt < hi and single(sub, t[i + cnt]) do cnt = cnt + 1 end
        steps = steps + cnt
        for c = cnt, lo, -1 do
          if k(i + c) then return true end
          if abort then return false end
        end
        return false
      end
      local function rec(count, j)
        if count < hi then
          local ok = m(sub, j, function(j2)
            if j2 == j and count >= lo then return false end -- an empty iteration ends the loop
            return rec(count + 1, j2)
          end)
          if ok then return true end
          if abort then return false end
        end
        if count >= lo then return k(j) end
        return false
      end
      return rec(0, i)
    elseif tt == "bol" then
      if i == 1 then return k(i) end
      return false
    elseif tt == "eol" then
      if i == n + 1 then return k(i) end
      return false
    elseif tt == "wordb" then
      if (is_word(t[i - 1]) ~= is_word(t[i])) ~= node.neg then return k(i) end
      return false
    elseif tt == "look" then
      local found = m(node.node, i, function() return true end)
      if abort then return false end
      if found ~= node.neg then return k(i) end
      return false
    end
    return false
  end

  m = function(node, i, k)
    steps = steps + 1
    if steps > RE_MAX_STEPS or depth > RE_MAX_DEPTH then abort = true end
    if abort then return false end
    depth = depth + 1
    local r = inner(node, i, k)
    depth = depth - 1
    return r
  end

  local accept = function() return true end
  local last = re.anchored and 1 or n + 1
  for start = 1, last do
    if m(re.node, start, accept) then return true end
    if abort then break end
  end
  if abort then return nil, "pattern '" .. re.source .. "' is too expensive to evaluate on this value" end
  return false
end

function M.pattern_match(pattern, s)
  local re, err = compile(pattern)
  if not re then return nil, "unsupported pattern '" .. pattern .. "': " .. err end
  return search(re, s)
end

---------------------------------------------------------------------------------------------
-- Formats
---------------------------------------------------------------------------------------------

local function is_email(s)
  local loc, dom = s:match("^(.+)@([^@]+)$")
  if not loc or #loc > 64 or #dom > 253 then return false end
  for atom in (loc .. "."):gmatch("(.-)%.") do
    if not atom:match("^[%w!#$%%&'*+/=?^_`{|}~-]+$") then return false end
  end
  local labels = 0
  for label in (dom .. "."):gmatch("(.-)%.") do
    if #label > 63 or not label:match("^%w[%w-]*$") or label:match("%-$") then return false end
    labels = labels + 1
  end
  return labels >= 2
end

local function is_ipv4(s)
  local parts = { s:match("^(%d+)%.(%d+)%.(%d+)%.(%d+)$") }
  if #parts ~= 4 then return false end
  for _, x in ipairs(parts) do
    if #x > 3 or (#x > 1 and x:sub(1, 1) == "0") or tonumber(x) > 255 then return false end
  end
  return true
end

local function is_uri(s)
  local rest = s:match("^%a[%w+.-]*:(.*)$")
  if not rest then return false end
  if rest:find("[%s%c<>\"{}|\\^`\128-\255]") then return false end
  if rest:find("%%%X") or rest:find("%%%x%X") or rest:find("%%%x?$") then return false end
  return true
end

local function is_date_time(s)
  local y, mo, d, h, mi, sec, rest = s:match("^(%d%d%d%d)%-(%d%d)%-(%d%d)[Tt](%d%d):(%d%d):(%d%d)(.*)$")
  if not y then return false end
  y, mo, d, h, mi, sec = tonumber(y), tonumber(mo), tonumber(d), tonumber(h), tonumber(mi), tonumber(sec)
  rest = rest:gsub("^%.%d+", "", 1)
  if rest ~= "Z" and rest ~= "z" then
    local oh, om = rest:match("^[+-](%d%d):(%d%d)$")
    if not oh or tonumber(oh) > 23 or tonumber(om) > 59 then return false end
  end
  local mdays = { 31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31 }
  if y % 4 == 0 and (y % 100 ~= 0 or y % 400 == 0) then mdays[2] = 29 end
  return mo >= 1 and mo <= 12 and d >= 1 and d <= mdays[mo] and h <= 23 and mi <= 59 and sec <= 60
end

local UUID = "^" .. srep("%x", 8) .. "%-" .. srep("%x", 4) .. "%-" .. srep("%x", 4) .. "%-" .. srep("%x", 4)
  .. "%-" .. srep("%x", 12) .. "$"

local FORMATS = {
  email = { is_email, "a valid email address" },
  ipv4 = { is_ipv4, "a valid IPv4 address" },
  uri = { is_uri, "a valid URI" },
  ["date-time"] = { is_date_time, "a valid RFC 3339 date-time" },
  uuid = { function(s) return s:match(UUID) ~= nil end, "a valid UUID" },
}

---------------------------------------------------------------------------------------------
-- Schema documents: drafts, $ref, structural check
---------------------------------------------------------------------------------------------

local TYPES = { string = true, number = true, integer = true, boolean = true, object = true, array = true,
  null = true }

local function draft_of(s)
  local uri = type(s) == "table" and s["$schema"]
  if type(uri) ~= "string" then return 7 end
  if uri:find("draft%-04") then return 4 end
  if uri:find("draft%-06") then return 6 end
  if uri:find("2019%-09") or uri:find("2020%-12") then return 2019 end
  return 7
end

--- Resolve a local $ref against the root schema.
local function resolve(root, ref)
  if ref == "#" then return root end
  if ref:sub(1, 2) ~= "#/" then
    return nil, "unsupported reference '" .. ref .. "' (only '#' and JSON pointers '#/...')"
  end
  local ptr = ref:sub(3):gsub("%%(%x%x)", function(h) return schar(tonumber(h, 16)) end)
  local node = root
  for tok in (ptr .. "/"):gmatch("(.-)/") do
    tok = tok:gsub("~1", "/"):gsub("~0", "~")
    if type(node) ~= "table" then return nil, "cannot resolve reference '" .. ref .. "'" end
    local nxt = node[tok]
    if nxt == nil and tok:match("^%d+$") and (tok == "0" or tok:sub(1, 1) ~= "0") then
      nxt = node[(tonumber(tok) or -1) + 1]
    end
    if nxt == nil then return nil, "cannot resolve reference '" .. ref .. "'" end
    node = nxt
  end
  if type(node) ~= "table" and type(node) ~= "boolean" then
    return nil, "reference '" .. ref .. "' does not point to a schema"
  end
  return node
end

local function pointer_path(ref)
  local path = ""
  for tok in (ref:sub(3) .. "/"):gmatch("(.-)/") do
    path = key_path(path, (tok:gsub("~1", "/"):gsub("~0", "~")))
  end
  return path
end

local function new_ctx(root)
  return { root = root, draft = draft_of(root), re = {}, seen = {}, pending = {}, refs = 0 }
end

local function get_re(c, src)
  local r = c.re[src]
  if not r then
    local re, err = compile(src)
    r = re or { err = err }
    c.re[src] = r
  end
  return r
end

local ck_schema

local function is_nonneg_int(v)
  return type(v) == "number" and is_integer(v) and v >= 0
end

local function ck_pattern(c, src, path)
  local r = get_re(c, src)
  if r.err and c.strict then return at(path, "unsupported pattern '" .. src .. "': " .. r.err) end
end

local function ck_map(c, v, p, depth)
  if not is_object(v) then return at(p, "must be an object") end
  for _, k in ipairs(sorted_keys(v)) do
    local e = ck_schema(c, v[k], key_path(p, k), depth + 1)
    if e then return e end
  end
end

local function ck_list(c, v, p, depth)
  if kind(v) ~= "array" then return at(p, "must be a non-empty array of schemas") end
  for i, sub in ipairs(v) do
    local e = ck_schema(c, sub, index_path(p, i), depth + 1)
    if e then return e end
  end
end

local function ck_strings(v, p)
  if not is_array(v) then return at(p, "must be an array of strings") end
  for i, x in ipairs(v) do
    if type(x) ~= "string" then return at(index_path(p, i), "must be a string") end
  end
end

local function ck_one(c, v, p, depth) return ck_schema(c, v, p, depth + 1) end
local function ck_one_bool(c, v, p, depth) return ck_schema(c, v, p, depth + 1, true) end
local function ck_number(_, v, p)
  if type(v) ~= "number" then return at(p, "must be a number") end
end
local function ck_count(_, v, p)
  if not is_nonneg_int(v) then return at(p, "must be a non-negative integer") end
end
local function ck_string(_, v, p)
  if type(v) ~= "string" then return at(p, "must be a string") end
end
local function ck_exclusive(c, v, p)
  if c.draft == 4 then
    if type(v) ~= "boolean" then return at(p, "must be a boolean in draft-04") end
  elseif type(v) ~= "number" then
    return at(p, "must be a number (a boolean here is draft-04 syntax)")
  end
end

local CHECKS = {
  { "$schema", ck_string },
  { "$id", ck_string },
  { "$ref", function(c, v, p)
    if type(v) ~= "string" then return at(p, "must be a string") end
    if v:sub(1, 1) ~= "#" then
      return at(p, "external reference '" .. v .. "' is not allowed (only local references starting with '#')")
    end
    local target, err = resolve(c.root, v)
    if not target then return at(p, err) end
    c.pending[#c.pending + 1] = { target, v }
  end },
  { "title", ck_string },
  { "description", ck_string },
  { "type", function(_, v, p)
    if type(v) == "string" then
      if not TYPES[v] then return at(p, "unknown type '" .. v .. "'") end
      return nil
    end
    if kind(v) ~= "array" then return at(p, "must be a type name or a non-empty array of type names") end
    local seen = {}
    for i, x in ipairs(v) do
      if type(x) ~= "string" then return at(index_path(p, i), "must be a string") end
      if not TYPES[x] then return at(index_path(p, i), "unknown type '" .. x .. "'") end
      if seen[x] then return at(index_path(p, i), "duplicate type '" .. x .. "'") end
      seen[x] = true
    end
  end },
  { "enum", function(_, v, p)
    if kind(v) ~= "array" then return at(p, "must be a non-empty array") end
  end },
  { "multipleOf", function(_, v, p)
    if type(v) ~= "number" or v <= 0 then return at(p, "must be a number greater than 0") end
  end },
  { "minimum", ck_number },
  { "maximum", ck_number },
  { "exclusiveMinimum", ck_exclusive },
  { "exclusiveMaximum", ck_exclusive },
  { "minLength", ck_count },
  { "maxLength", ck_count },
  { "pattern", function(c, v, p)
    if type(v) ~= "string" then return at(p, "must be a string") end
    return ck_pattern(c, v, p)
  end },
  { "format", ck_string },
  { "items", function(c, v, p, depth)
    if kind(v) == "array" then return ck_list(c, v, p, depth) end
    return ck_schema(c, v, p, depth + 1)
  end },
  { "additionalItems", ck_one_bool },
  { "minItems", ck_count },
  { "maxItems", ck_count },
  { "uniqueItems", function(_, v, p)
    if type(v) ~= "boolean" then return at(p, "must be a boolean") end
  end },
  { "contains", ck_one },
  { "required", function(_, v, p) return ck_strings(v, p) end },
  { "minProperties", ck_count },
  { "maxProperties", ck_count },
  { "properties", ck_map },
  { "patternProperties", function(c, v, p, depth)
    if not is_object(v) then return at(p, "must be an object") end
    for _, k in ipairs(sorted_keys(v)) do
      local e = ck_pattern(c, tostring(k), key_path(p, k))
      if e then return e end
    end
    return ck_map(c, v, p, depth)
  end },
  { "additionalProperties", ck_one_bool },
  { "propertyNames", ck_one },
  { "dependencies", function(c, v, p, depth)
    if not is_object(v) then return at(p, "must be an object") end
    for _, k in ipairs(sorted_keys(v)) do
      local dep, e = v[k]
      if kind(dep) == "array" then e = ck_strings(dep, key_path(p, k))
      else e = ck_schema(c, dep, key_path(p, k), depth + 1) end
      if e then return e end
    end
  end },
  { "dependentRequired", function(_, v, p)
    if not is_object(v) then return at(p, "must be an object") end
    for _, k in ipairs(sorted_keys(v)) do
      local e = ck_strings(v[k], key_path(p, k))
      if e then return e end
    end
  end },
  { "dependentSchemas", ck_map },
  { "allOf", ck_list },
  { "anyOf", ck_list },
  { "oneOf", ck_list },
  { "not", ck_one },
  { "if", ck_one },
  { "then", ck_one },
  { "else", ck_one },
  { "definitions", ck_map },
  { "$defs", ck_map },
}

ck_schema = function(c, s, path, depth, bool_ok)
  if type(s) == "boolean" then
    if c.draft >= 6 or bool_ok then return nil end
    return at(path, "must be a schema object (boolean schemas need draft-06 or later)")
  end
  if type(s) ~= "table" or kind(s) == "array" then
    return at(path, c.draft >= 6 and "must be a schema (an object or a boolean)" or "must be a schema object")
  end
  if depth > MAX_CHECK_DEPTH then return at(path, "schema too deep") end
  if c.seen[s] then return nil end
  c.seen[s] = true
  for _, entry in ipairs(CHECKS) do
    local v = s[entry[1]]
    if v ~= nil then
      local e = entry[2](c, v, key_path(path, entry[1]), depth, s)
      if e then return e end
    end
  end
end

local function check_all(c)
  local e = ck_schema(c, c.root, "", 0)
  if e then return e end
  local i = 1
  while c.pending[i] do -- targets of $ref that sit outside the keywords walked above
    local target, ref = c.pending[i][1], c.pending[i][2]
    e = ck_schema(c, target, pointer_path(ref), 0)
    if e then return e end
    i = i + 1
  end
end

--- Check a schema document as the catalog needs it: true, or nil and a message naming the path.
function M.check(s)
  if type(s) ~= "table" or kind(s) == "array" then return nil, "schema must be a JSON object" end
  local uri = s["$schema"]
  if uri == nil then return nil, "$schema: missing (a schema must declare its draft)" end
  if type(uri) ~= "string" then return nil, "$schema: must be a string" end
  if uri:find("draft%-0[0-3]") then return nil, "$schema: unsupported draft '" .. uri .. "' (use draft-04, 06 or 07)" end
  local c = new_ctx(s)
  c.strict = true
  local e = check_all(c)
  if e then return nil, e end
  return true
end

---------------------------------------------------------------------------------------------
-- Validation
---------------------------------------------------------------------------------------------

local TYPE_WORDS = { string = "a string", number = "a number", integer = "an integer", boolean = "a boolean",
  object = "an object", array = "an array", null = "null" }

local function type_ok(name, v, k)
  if name == "integer" then return k == "number" and is_integer(v) end
  if name == "object" or name == "array" then return k == name or k == "empty" end
  return k == name
end

local function plural(n, one, many)
  return fmt_num(n) .. " " .. (n == 1 and one or many or one .. "s")
end

local v_node

-- Each validator returns nil when the value passes, else message, path, fatal.
-- Fatal errors (unsupported pattern, depth) escape anyOf/oneOf/not instead of counting as a mismatch.

local function v_number(s, v, path)
  local min, max = s.minimum, s.maximum
  if min ~= nil then
    if s.exclusiveMinimum == true then
      if v <= min then return "must be greater than " .. fmt_num(min), path end
    elseif v < min then
      return "must be at least " .. fmt_num(min), path
    end
  end
  local emin = s.exclusiveMinimum
  if type(emin) == "number" and v <= emin then return "must be greater than " .. fmt_num(emin), path end
  if max ~= nil then
    if s.exclusiveMaximum == true then
      if v >= max then return "must be less than " .. fmt_num(max), path end
    elseif v > max then
      return "must be at most " .. fmt_num(max), path
    end
  end
  local emax = s.exclusiveMaximum
  if type(emax) == "number" and v >= emax then return "must be less than " .. fmt_num(emax), path end
  local mo = s.multipleOf
  if mo ~= nil then
    local ok
    if mtype(v) == "integer" and mtype(mo) == "integer" then
      ok = v % mo == 0
    else
      local q = v / mo
      ok = q == floor(q) or math.abs(q - floor(q + 0.5)) < 1e-9 * math.max(1, math.abs(q))
    end
    if not ok then return "must be a multiple of " .. fmt_num(mo), path end
  end
end

local function v_pattern(c, src, str, path)
  local re = get_re(c, src)
  if re.err then return "unsupported pattern '" .. src .. "': " .. re.err, path, true end
  local ok, err = search(re, str)
  if ok == nil then return err, path, true end
  return nil, nil, nil, ok
end

local function v_string(c, s, v, path)
  if s.minLength ~= nil or s.maxLength ~= nil then
    local len = ulen(v) or #v
    if s.minLength and len < s.minLength then
      return "must be at least " .. plural(s.minLength, "character") .. " long", path
    end
    if s.maxLength and len > s.maxLength then
      return "must be at most " .. plural(s.maxLength, "character") .. " long", path
    end
  end
  if s.pattern ~= nil then
    local m, p, f, ok = v_pattern(c, s.pattern, v, path)
    if m then return m, p, f end
    if not ok then return "must match pattern '" .. s.pattern .. "'", path end
  end
  local fmt = FORMATS[s.format]
  if fmt and not fmt[1](v) then return "must be " .. fmt[2], path end
end

local function v_array(c, s, v, path, depth)
  local n = #v
  if s.minItems and n < s.minItems then return "must have at least " .. plural(s.minItems, "item"), path end
  if s.maxItems and n > s.maxItems then return "must have at most " .. plural(s.maxItems, "item"), path end
  if s.uniqueItems == true then
    local seen = {}
    for i = 1, n do
      local key = encode(v[i])
      if seen[key] then
        return "must not contain duplicates (items [" .. (seen[key] - 1) .. "] and [" .. (i - 1) .. "] are equal)", path
      end
      seen[key] = i
    end
  end
  local items = s.items
  if items ~= nil then
    if kind(items) == "array" then
      for i = 1, n do
        local sub = items[i]
        local ip = index_path(path, i)
        if sub == nil then
          local ai = s.additionalItems
          if ai == false then return "item is not allowed (at most " .. plural(#items, "item") .. ")", ip end
          sub = ai
        end
        if sub ~= nil then
          local m, p, f = v_node(c, sub, v[i], ip, depth + 1)
          if m then return m, p, f end
        end
      end
    else
      for i = 1, n do
        local m, p, f = v_node(c, items, v[i], index_path(path, i), depth + 1)
        if m then return m, p, f end
      end
    end
  end
  if s.contains ~= nil then
    local found = false
    for i = 1, n do
      local m, p, f = v_node(c, s.contains, v[i], index_path(path, i), depth + 1)
      if m and f then return m, p, f end
      if not m then found = true; break end
    end
    if not found then return "must contain at least one matching item", path end
  end
end

local function v_object(c, s, v, path, depth)
  local names = sorted_keys(v)
  local n = #names
  if s.minProperties and n < s.minProperties then
    return "must have at least " .. plural(s.minProperties, "property", "properties"), path
  end
  if s.maxProperties and n > s.maxProperties then
    return "must have at most " .. plural(s.maxProperties, "property", "properties"), path
  end
  if s.required then
    for _, name in ipairs(s.required) do
      if v[name] == nil then return "missing required property '" .. name .. "'", path end
    end
  end
  local function dep_required(list, name)
    for _, other in ipairs(list) do
      if v[other] == nil then return "property '" .. name .. "' requires property '" .. other .. "'", path end
    end
  end
  for _, kw in ipairs({ "dependencies", "dependentRequired", "dependentSchemas" }) do
    local deps = s[kw]
    if deps ~= nil then
      for _, name in ipairs(sorted_keys(deps)) do
        if v[name] ~= nil then
          local dep = deps[name]
          local m, p, f
          if kw == "dependentRequired" or (kw == "dependencies" and kind(dep) == "array") then
            m, p = dep_required(dep, name)
          else
            m, p, f = v_node(c, dep, v, path, depth + 1)
          end
          if m then return m, p, f end
        end
      end
    end
  end
  if s.propertyNames ~= nil then
    for _, name in ipairs(names) do
      local m, p, f = v_node(c, s.propertyNames, tostring(name), path, depth + 1)
      if m then return "invalid property name '" .. tostring(name) .. "': " .. m, p, f end
    end
  end
  local props, pprops, addl = s.properties, s.patternProperties, s.additionalProperties
  if props == nil and pprops == nil and addl == nil then return nil end
  local pnames = pprops and sorted_keys(pprops) or {}
  for _, name in ipairs(names) do
    local sname = tostring(name)
    local np = key_path(path, sname)
    local matched = false
    local sub = props and props[sname]
    if sub ~= nil then
      matched = true
      local m, p, f = v_node(c, sub, v[name], np, depth + 1)
      if m then return m, p, f end
    end
    for _, pat in ipairs(pnames) do
      local m, p, f, ok = v_pattern(c, pat, sname, np)
      if m then return m, p, f end
      if ok then
        matched = true
        m, p, f = v_node(c, pprops[pat], v[name], np, depth + 1)
        if m then return m, p, f end
      end
    end
    if not matched and addl ~= nil then
      if addl == false then return "property is not allowed", np end
      local m, p, f = v_node(c, addl, v[name], np, depth + 1)
      if m then return m, p, f end
    end
  end
end

local function type_desc(t)
  if type(t) == "string" then return TYPE_WORDS[t] or t end
  local words = {}
  for i, x in ipairs(t) do words[i] = TYPE_WORDS[x] or tostring(x) end
  return concat(words, " or ")
end

v_node = function(c, s, v, path, depth)
  if s == true then return nil end
  if s == false then return "is not allowed", path end
  if depth > MAX_DEPTH then return "schema too deep", path, true end
  local ref = s["$ref"]
  if ref ~= nil then
    if c.refs >= MAX_REFS then return "schema too deep", path, true end
    local target, err = resolve(c.root, ref)
    if not target then return "invalid schema: " .. err, path, true end
    c.refs = c.refs + 1
    local m, p, f = v_node(c, target, v, path, depth + 1)
    c.refs = c.refs - 1
    if m or c.draft < 2019 then return m, p, f end -- drafts up to 07 ignore keywords next to $ref
  end
  local k = kind(v)

  local t = s.type
  if t ~= nil then
    local ok = false
    if type(t) == "string" then
      ok = type_ok(t, v, k)
    else
      for _, name in ipairs(t) do
        if type_ok(name, v, k) then ok = true; break end
      end
    end
    if not ok then return "must be " .. type_desc(t), path end
  end

  if s.enum ~= nil then
    local ok = false
    for _, x in ipairs(s.enum) do
      if deep_equal(x, v) then ok = true; break end
    end
    if not ok then
      local list = {}
      for i, x in ipairs(s.enum) do list[i] = short(x) end
      local text = concat(list, ", ")
      if #text > 200 then text = text:sub(1, 197) .. "..." end
      return "must be one of " .. text, path
    end
  end
  if s.const ~= nil and not deep_equal(s.const, v) then return "must be equal to " .. short(s.const), path end

  local m, p, f
  if k == "number" then
    m, p = v_number(s, v, path)
  elseif k == "string" then
    m, p, f = v_string(c, s, v, path)
  end
  if m then return m, p, f end
  if k == "array" or k == "empty" then
    m, p, f = v_array(c, s, v, path, depth)
    if m then return m, p, f end
  end
  if k == "object" or k == "empty" then
    m, p, f = v_object(c, s, v, path, depth)
    if m then return m, p, f end
  end

  if s.allOf then
    for _, sub in ipairs(s.allOf) do
      m, p, f = v_node(c, sub, v, path, depth + 1)
      if m then return m, p, f end
    end
  end
  if s.anyOf then
    local ok = false
    for _, sub in ipairs(s.anyOf) do
      m, p, f = v_node(c, sub, v, path, depth + 1)
      if m and f then return m, p, f end
      if not m then ok = true; break end
    end
    if not ok then return "must match at least one schema in anyOf", path end
  end
  if s.oneOf then
    local hits = {}
    for i, sub in ipairs(s.oneOf) do
      m, p, f = v_node(c, sub, v, path, depth + 1)
      if m and f then return m, p, f end
      if not m then
        hits[#hits + 1] = i - 1
        if #hits == 2 then break end
      end
    end
    if #hits == 0 then return "must match exactly one schema in oneOf (matched none)", path end
    if #hits > 1 then
      return "must match exactly one schema in oneOf (matched [" .. hits[1] .. "] and [" .. hits[2] .. "])", path
    end
  end
  if s["not"] ~= nil then
    m, p, f = v_node(c, s["not"], v, path, depth + 1)
    if m and f then return m, p, f end
    if not m then return "must not match the schema in not", path end
  end
  if s["if"] ~= nil then
    m, p, f = v_node(c, s["if"], v, path, depth + 1)
    if m and f then return m, p, f end
    local branch
    if m then branch = s["else"] else branch = s["then"] end
    if branch ~= nil then
      m, p, f = v_node(c, branch, v, path, depth + 1)
      if m then return m, p, f end
    end
  end
  return nil
end

--- Validate a JSON value against a schema: true, or nil, "path: message", path.
function M.validate(s, value, root_name)
  root_name = root_name or "parameters"
  local c = new_ctx(s)
  local e = check_all(c)
  if e then return nil, root_name .. ": invalid schema: " .. e, root_name end
  local m, p = v_node(c, s, value, root_name, 0)
  if m then return nil, p .. ": " .. m, p end
  return true
end

return M
