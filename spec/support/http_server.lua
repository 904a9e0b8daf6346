-- Child process for the http specs: serve spec/support/http_echo.lua until SIGTERM.
--   lua5.4 spec/support/http_server.lua PORT HANDLER [BODY_LIMIT [INIT]]   (INIT: the handler's init argument)
package.path = "scripts/?.lua;spec/?.lua;" .. package.path
package.cpath = "build/lib/?.so;" .. package.cpath
local http = require "forge.http"
http.trap_signals()
local srv = assert(http.serve { listen = "127.0.0.1:" .. arg[1], handler = arg[2], init = arg[4] or "hello",
  threads = 4, body_limit = tonumber(arg[3]) or 1024 })
io.stdout:write("ready\n")
io.stdout:flush()
repeat until http.wait(0.1) == "stop"
srv:stop(10)
io.stdout:write("stopped\n")
