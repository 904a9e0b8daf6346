-- Checks of fuzz_request (fuzz/README.md). Input: "<request target>\n<content-type>\n<body>"
-- (no second line: no Content-Type header). Any raise, or a failed assert, is a finding:
-- the broker turns a raise into a 500, and a client's bytes must never cause one.
local request = require "forge.request"
local util = require "forge.util"

local OBJECT_FIELDS = { "parameters", "context", "maintenance_info", "bind_resource", "previous_values" }

local function check_target(uri)
  local segs, q, path = request.target(uri)
  if segs == nil then
    assert(type(q) == "string" and q ~= "", "target: refused without a message")
    return
  end
  assert(type(segs) == "table" and type(q) == "table" and type(path) == "string", "target: bad result types")
  assert(not path:find("[?#]"), "target: path keeps a query or fragment")
  for i, s in ipairs(segs) do
    assert(type(s) == "string" and s ~= "", "target: empty or non-string segment " .. i)
  end
  for k, v in pairs(q) do
    assert(type(k) == "string" and k ~= "" and type(v) == "string" and v ~= "", "target: empty query name or value")
  end
end

local function check_body(text, ctype)
  local headers = {}
  if ctype then headers["content-type"] = ctype end
  local body, err, code = request.body({ body = text, headers = headers })
  if body == nil then
    assert(type(err) == "string" and err ~= "", "body: refused without a message")
    assert(code == nil or code == "MalformedJSON", "body: unknown error code")
    return
  end
  assert(type(body) == "table", "body: not a table")
  local lc = (ctype or ""):lower()
  local form = lc:find("application/x-www-form-urlencoded", 1, true) or lc:find("multipart/form-data", 1, true)
  if form then
    -- a form's object fields are tables (bracketed keys or JSON objects), never strings
    for _, f in ipairs(OBJECT_FIELDS) do
      assert(body[f] == nil or type(body[f]) == "table", "body: form field " .. f .. " is a " .. type(body[f]))
    end
  else
    -- a JSON body is an object, and what the broker would store encodes
    assert(body[1] == nil, "body: a JSON array was accepted")
    assert(util.json_encode(body), "body: the accepted body does not encode")
  end
end

return function(data)
  local nl1 = data:find("\n", 1, true)
  local uri = nl1 and data:sub(1, nl1 - 1) or data
  check_target(uri)
  if not nl1 then return end
  local rest = data:sub(nl1 + 1)
  local nl2 = rest:find("\n", 1, true)
  local ctype, text
  if nl2 then ctype, text = rest:sub(1, nl2 - 1), rest:sub(nl2 + 1) else ctype, text = nil, rest end
  check_body(text, ctype)
end
