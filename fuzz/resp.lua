-- Checks of fuzz_resp (fuzz/README.md). The input's first line: options — auth (AUTH with a
-- password first), user (AUTH user password), cmds=N (1..8 commands pipelined, default 2),
-- max=N (max_reply bytes, default 16 MiB); the rest of the input is every byte the server
-- sends before it closes. Any raise, or a failed assert, is a finding. Checked: a result is
-- one reply per command, each a string, an integer, false, {err = string} or an array of
-- those; an error is a forge.error with one of the documented codes.
local resp = require "forge.resp"
local VERBOSE = os.getenv("FUZZ_VERBOSE")

local CODES = { ["resp.connect"] = true, ["resp.timeout"] = true, ["resp.io"] = true, ["resp.auth"] = true,
  ["resp.protocol"] = true }

local function check_reply(r, depth, what)
  local t = type(r)
  if t == "string" or r == false or math.type(r) == "integer" then return end
  assert(t == "table", what .. ": reply of type " .. t)
  assert(depth <= 33, what .. ": replies nested deeper than the scanner allows")
  if r.err ~= nil then
    assert(type(r.err) == "string" and next(r, next(r)) == nil, what .. ": malformed error reply")
    return
  end
  local n = 0
  for k, v in pairs(r) do
    n = n + 1
    assert(math.type(k) == "integer" and k >= 1, what .. ": array with a non-index key")
    check_reply(v, depth + 1, what .. "[" .. k .. "]")
  end
  assert(n == #r, what .. ": array with holes")
end

return function(line)
  local opts = { host = "127.0.0.1", port = 6379, timeout = 2, commands = {} }
  local ncmd = 2
  for w in line:gmatch("%S+") do
    if w == "auth" then
      opts.password = "secret"
    elseif w == "user" then
      opts.user, opts.password = "broker", "secret"
    elseif w:match("^cmds=%d+$") then
      ncmd = math.max(1, math.min(8, tonumber(w:sub(6))))
    elseif w:match("^max=%d+$") then
      opts.max_reply = math.max(1, math.min(2 ^ 30, tonumber(w:sub(5)) // 1))
    end
  end
  for i = 1, ncmd do opts.commands[i] = { "GET", "key" .. i, 42 } end
  local replies, err = resp.call(opts)
  if VERBOSE then print(replies, err and err.code, err and err.message) end
  if replies == nil then
    assert(type(err) == "table" and CODES[err.code], "undocumented error code " .. tostring(err and err.code))
    assert(type(err.message) == "string" and err.message ~= "", "error without a message")
    return
  end
  assert(type(replies) == "table" and #replies == ncmd, "not one reply per command")
  for i = 1, ncmd do check_reply(replies[i], 1, "reply " .. i) end
end
