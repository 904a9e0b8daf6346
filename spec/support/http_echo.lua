-- A forge.http handler for the http specs: echoes the request; a few paths misbehave on purpose.
local cjson = require "cjson"
local proc = require "forge.proc"

local M = {}
local state_id = tostring({}):match("0x%x+") -- differs per worker lua_State
local init_arg

function M.init(arg) init_arg = arg end

function M.handle(req)
  if req.uri == "/raise" then error("handler raised on purpose") end
  if req.uri:match("^/sleep") then proc.sleep(tonumber(req.uri:match("(%d+%.?%d*)$")) or 1) end
  if req.uri == "/text" then return 201, { ["Content-Type"] = "text/plain", ["X-Extra"] = "yes" }, "plain" end
  return 200, nil, cjson.encode({ method = req.method, uri = req.uri, headers = req.headers, body = req.body,
    id = req.id, remote = req.remote, state = state_id, init = init_arg, client_cert = req.client_cert })
end

return M
