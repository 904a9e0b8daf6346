-- forge.http over TLS against plain HTTP, side by side in one run: the same handler behind two
-- servers in this process, one plain and one HTTPS (TLS 1.3, ECDSA P-256 certificate made here
-- with openssl), measured with wrk on keep-alive connections (the request cost) and with a new
-- connection per request (`Connection: close`: a full handshake each time; the server resumes no
-- sessions). Prints requests/s, median latency and this process's CPU time per request (the
-- servers' threads only: wrk runs apart), and the ratios TLS / plain.
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

-- CPU seconds (user + system) this process has used: the servers' threads.
local function cpu_seconds()
  local f = assert(io.open("/proc/self/stat"))
  local stat = f:read("a")
  f:close()
  local fields = {}
  for v in stat:match("%) (.*)$"):gmatch("%S+") do fields[#fields + 1] = v end
  return (tonumber(fields[12]) + tonumber(fields[13])) / 100 -- utime, stime in clock ticks (USER_HZ)
end

-- wrk against url: {rps, p50 (as wrk prints it), cpu_us (server CPU per request)}.
local function wrk(url, connections, close)
  local cpu0 = cpu_seconds()
  local p = io.popen(string.format("wrk -t2 -c%d -d%ds --latency %s %s 2>&1", connections, SECONDS,
    close and "-H 'Connection: close'" or "", url))
  local out = p:read("a")
  p:close()
  local cpu = cpu_seconds() - cpu0
  local rps, n = tonumber(out:match("Requests/sec:%s+([%d%.]+)")), tonumber(out:match("(%d+) requests in"))
  if not rps or not n or n == 0 then error("wrk failed:\n" .. out) end
  return { rps = rps, p50 = out:match("\n%s+50%%%s+(%S+)") or "?", cpu_us = cpu / n * 1e6 }
end

local function row(name, r)
  io.write(string.format("%-40s %8.0f req/s   p50 %-9s server CPU %6.1f us/request\n", name, r.rps, r.p50, r.cpu_us))
end

local function loadavg()
  local f = io.open("/proc/loadavg")
  local text = f and f:read("l") or "?"
  if f then f:close() end
  return text:match("^%S+") or "?"
end

io.write(string.format("forge.http, %d server threads, wrk -t2 -d%ds, same run (TLS: %s; load average %s: on a\n"
  .. "busy machine the handshake waits for the CPU, and requests/s with it; CPU per request holds better):\n",
  THREADS, SECONDS, "TLS 1.3, X25519 + ECDSA P-256, AES-256-GCM", loadavg()))
local results = {}
for _, case in ipairs({
  { "keep-alive", CONNECTIONS, false }, { "new connection per request", 8, true } }) do
  local name, conns, close = case[1], case[2], case[3]
  local p = wrk("http://127.0.0.1:" .. plain:port() .. "/x", conns, close)
  local t = wrk("https://127.0.0.1:" .. secure:port() .. "/x", conns, close)
  row("plain " .. name .. " (-c" .. conns .. ")", p)
  row("TLS   " .. name .. " (-c" .. conns .. ")", t)
  results[#results + 1] = { name = name, rps = t.rps / p.rps, cpu = t.cpu_us / p.cpu_us, extra = t.cpu_us - p.cpu_us }
end
for _, r in ipairs(results) do
  io.write(string.format("ratio TLS/plain, %s: requests/s %.2f, server CPU per request %.1f (+%.0f us)\n",
    r.name, r.rps, r.cpu, r.extra))
end

plain:stop(5)
secure:stop(5)
os.execute("rm -rf '" .. dir .. "'")
