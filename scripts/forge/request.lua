--- Request parsing for the broker: path, query and body (JSON, urlencoded or multipart forms).
--
-- Real clients are sloppy (OSB-CHECKLIST.md, last section): bodies come as JSON, as
-- `-d a=b&c=d` or `-F a=b` forms, sometimes without a Content-Type. What is unambiguous is
-- accepted; anything else is refused with a clear message.
local util = require "forge.util"

local M = {}

-- Fields whose values are JSON objects; in a form they are JSON text or bracketed keys.
local OBJECT_FIELDS = { parameters = true, context = true, maintenance_info = true, bind_resource = true,
  previous_values = true }

--- Split a raw URI into decoded path segments and a query table.
-- @return segs, query, path | nil, message
function M.target(uri)
  local path, qs = uri:match("^([^?#]*)%??([^#]*)")
  local segs, err = util.split_path(path or "")
  if not segs then return nil, err end
  local q, qerr = util.parse_query(qs)
  if not q then return nil, qerr end
  return segs, q, path
end

-- Set form field `name` (possibly `obj[key]`) to a string value.
local function set_form_field(body, name, value)
  local obj, key = name:match("^([%w_]+)%[([^%]]*)%]$")
  if obj then
    if not OBJECT_FIELDS[obj] or key == "" then return nil, "unsupported form field '" .. name .. "'" end
    if type(body[obj]) ~= "table" then body[obj] = {} end
    body[obj][key] = value
    return true
  end
  if OBJECT_FIELDS[name] then
    if value == "" then return true end
    local v, err = util.json_decode(value)
    if type(v) ~= "table" then
      return nil, "form field '" .. name .. "' must hold a JSON object: " .. tostring(err or value)
    end
    body[name] = v
    return true
  end
  body[name] = value
  return true
end

local function parse_urlencoded(text)
  local body = {}
  for pair in text:gmatch("[^&]+") do
    local k, v = pair:match("^([^=]*)=(.*)$")
    if not k then return nil, "form body: '" .. pair:sub(1, 40) .. "' is not name=value" end
    k, v = util.url_decode(k, true), util.url_decode(v, true)
    if not k or not v then return nil, "form body: malformed percent-escape" end
    local ok, err = set_form_field(body, k, v)
    if not ok then return nil, err end
  end
  return body
end

local function parse_multipart(text, ctype)
  local boundary = ctype:match('boundary="([^"]+)"') or ctype:match("boundary=([^;%s]+)")
  if not boundary then return nil, "multipart body without a boundary" end
  local body, delim = {}, "--" .. boundary
  local pos = text:find(delim, 1, true)
  if not pos then return nil, "multipart body: boundary not found" end
  pos = pos + #delim
  while true do
    if text:sub(pos, pos + 1) == "--" then return body end
    local head_end = text:find("\r\n\r\n", pos, true)
    if not head_end then return nil, "multipart body: part without headers" end
    local head = text:sub(pos, head_end)
    local name = head:match('[Cc]ontent%-[Dd]isposition:[^\r\n]-name="([^"]*)"')
    if not name then return nil, "multipart body: part without a name" end
    local next_delim = text:find("\r\n" .. delim, head_end + 4, true)
    if not next_delim then return nil, "multipart body: unterminated part '" .. name .. "'" end
    local ok, err = set_form_field(body, name, text:sub(head_end + 4, next_delim - 1))
    if not ok then return nil, err end
    pos = next_delim + 2 + #delim
  end
end

--- Parse a request body into a table.
-- @return body table | nil, message [, "MalformedJSON" when the JSON itself is broken]
function M.body(req)
  local text = req.body or ""
  local ctype = (req.headers["content-type"] or ""):lower()
  if text:match("^%s*$") then return nil, "the request body is empty; a JSON object is required" end
  if ctype:find("application/x-www-form-urlencoded", 1, true) then return parse_urlencoded(text) end
  if ctype:find("multipart/form-data", 1, true) then return parse_multipart(text, req.headers["content-type"]) end
  local v, err = util.json_decode(text)
  if type(v) == "table" and (next(v) == nil or v[1] == nil) then return v end
  if v ~= nil then return nil, "the request body must be a JSON object" end
  -- no (or a wrong) Content-Type: a body that is unmistakably a form is accepted as one
  if not ctype:find("json", 1, true) and text:match("^[%w_%[%]%%%.%-]+=[^{]*$") then
    return parse_urlencoded(text)
  end
  return nil, "the request body is not valid JSON: " .. tostring(err), "MalformedJSON"
end

return M
