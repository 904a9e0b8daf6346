-- forge.http over TLS against plain HTTP, side by side in one run: the same handler behind two
-- servers in this process, one plain and one HTTPS (TLS 1.3, ECDSA P-256 certificate made here
-- with openssl), measured with wrk on keep-alive connections (the request cost) and with a new
-- connection per request (`Connection: close`: a full handshake each time; the server resumes no
-- sessions). Prints requests/s, latency and the ratios TLS / plain.
--
--   lua5.4 bench/tls.lua        (run from anywhere; BENCH_SECONDS default 5, BENCH_CONNECTIONS 32)
local here = (arg and arg[0] or ""):match("^(.*)/bench/[^/]*$") or "."
package.path = here .. "/scripts/?.lua;" .. here .. "/spec/?.lua;" .. package.path
package.cpath = here .. "/build/lib/?.so;" .. package.cpath

local files = require "spec.support.files"
local http = require "forge.http"
local tls_certs = require "spec.support.tls_certs"

local SECONDS = tonumber(os.getenv("BENCH_SECONDS")) or 5
local CONNECTIONS = tonumber(os.getenv("BENCH_CONNECTIONS")) or 32
local THREADS = 4

local dir = os.tmpname()
os.remove(dir)
assert(os.execute("mkdir -p " .. dir))
local certs = tls_certs.make(dir)

local function serve(tls)
  return assert(http.serve { listen = "127.0.0.1:0", handler = "spec.support.http_echo", threads = THREADS,
    tls = tls, max_connections_per_ip = 10000 })
end

local plain = serve(nil)
local secure = serve { cert = files.read(certs.server_cert), key = files.read(certs.server_key) }

-- wrk against url: requests/s and median latency (text as wrk prints it).
local function wrk(url, connections, close)
  local p = io.popen(string.format("wrk -t2 -c%d -d%ds --latency %s %s 2>&1", connections, SECONDS,
    close and "-H 'Connection: close'" or "", url))
  local out = p:read("a")
  p:close()
  local rps = tonumber(out:match("Requests/sec:%s+([%d%.]+)"))
  if not rps then error("wrk failed:\n" .. out) end
  return rps, out:match("\n%s+50%%%s+(%S+)") or "?"
end

local function row(name, rps, p50)
  io.write(string.format("%-34s %9.0f req/s   p50 %s\n", name, rps, p50))
end

io.write(string.format("forge.http, %d server threads, wrk -t2 -d%ds, same run (TLS: %s):\n", THREADS, SECONDS,
  "TLS 1.3, ECDHE + ECDSA P-256, AES-256-GCM"))
local results = {}
for _, case in ipairs({
  { "keep-alive", CONNECTIONS, false }, { "new connection per request", 8, true } }) do
  local name, conns, close = case[1], case[2], case[3]
  local prps, pp50 = wrk("http://127.0.0.1:" .. plain:port() .. "/x", conns, close)
  local srps, sp50 = wrk("https://127.0.0.1:" .. secure:port() .. "/x", conns, close)
  row("plain " .. name .. " (-c" .. conns .. ")", prps, pp50)
  row("TLS   " .. name .. " (-c" .. conns .. ")", srps, sp50)
  results[#results + 1] = { name = name, ratio = srps / prps, per_request_us = 1e6 / srps - 1e6 / prps }
end
for _, r in ipairs(results) do
  io.write(string.format("ratio TLS/plain, %s: %.2f (%.0f us more wall time per request over all threads)\n",
    r.name, r.ratio, r.per_request_us))
end

plain:stop(5)
secure:stop(5)
os.execute("rm -rf '" .. dir .. "'")
