-- Serve the files of one directory over HTTP (GET /NAME), for specs that need a URL to download:
-- a forge.http handler run by spec/support/http_server.lua in a child process, and start() for it.
local util = require "forge.util"

local M = {}
local root

function M.init(dir) root = dir end

function M.handle(req)
  local name = req.method == "GET" and req.uri:match("^/([%w][%w%._%-]*)$")
  local body = name and util.read_file(root .. "/" .. name)
  if not body then return 404, { ["Content-Type"] = "text/plain" }, "not found" end
  return 200, { ["Content-Type"] = "application/x-compressed" }, body
end

--- Serve `dir` on a free loopback port. Returns {url = "http://127.0.0.1:PORT", stop = function}.
function M.start(dir)
  local client = require "spec.support.client"
  local proc = require "forge.proc"
  local port = require("spec.support.net").free_port()
  local p = assert(proc.spawn { argv = { "lua5.4", "spec/support/http_server.lua", tostring(port),
    "spec.support.http_files", "1024", dir }, stdout = "/dev/null", cwd = os.getenv("PWD") })
  local server = { url = "http://127.0.0.1:" .. port }
  function server.stop() proc.stop(p.pid, p.start_time, 5) end
  local deadline = proc.monotonic() + 10
  while client.request("GET", server.url .. "/", { timeout = 2 }) ~= 404 do
    if proc.monotonic() > deadline or not proc.alive(p.pid, p.start_time) then
      server.stop()
      error("the file server did not come up on port " .. port)
    end
    proc.sleep(0.05)
  end
  return server
end

return M
