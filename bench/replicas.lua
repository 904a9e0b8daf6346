-- bench/replicas: 1 vs 3 broker replicas on a 3-member etcd cluster on loopback. Bind+unbind
-- throughput (wrk, bench/bind_unbind.lua, on one local redis instance) of one replica, then of
-- three at once (one wrk each), and the etcd requests per bind+unbind and per second of idle
-- (the reconcilers' lock and lease traffic), from the members' own /metrics.
--   lua5.4 bench/replicas.lua      (from the repository root, after make)
--   BENCH_SECONDS=5 (each wrk run)  BENCH_CONNECTIONS=16 (per replica)  BENCH_IDLE_SECONDS=10
package.path = "scripts/?.lua;spec/?.lua;" .. package.path
package.cpath = "build/lib/?.so;" .. package.cpath
local Broker = require "spec.support.broker"
local etcd_server = require "support.etcd"
local proc = require "forge.proc"

local R = Broker.redis
local SECONDS = tonumber(os.getenv("BENCH_SECONDS") or 5)
local CONNS = tonumber(os.getenv("BENCH_CONNECTIONS") or 16)
local IDLE = tonumber(os.getenv("BENCH_IDLE_SECONDS") or 10)

local sh = require("spec.support.shell").output

-- etcd's gRPC requests handled, by method, summed over the members.
local function etcd_requests(cluster)
  local by = {}
  for _, url in ipairs(cluster.urls) do
    for method, n in sh("curl -s " .. url .. "/metrics"):gmatch(
        'grpc_server_handled_total{[^}]*grpc_method="(%w+)"[^}]*} (%d+)') do
      by[method] = (by[method] or 0) + tonumber(n)
    end
  end
  return by
end

local function delta(after, before)
  local out = {}
  for m, n in pairs(after) do
    if n - (before[m] or 0) > 0 then out[m] = n - (before[m] or 0) end
  end
  return out
end

local function describe(counts, per)
  local names = {}
  for m in pairs(counts) do names[#names + 1] = m end
  table.sort(names)
  local parts = {}
  for _, m in ipairs(names) do parts[#parts + 1] = string.format("%s %.2f", m, counts[m] / per) end
  return table.concat(parts, ", ")
end

-- Start wrk bind+unbind on each broker at once; returns total req/s and total requests.
local function load(brokers)
  local outs, procs = {}, {}
  for i, b in ipairs(brokers) do
    local auth = sh("printf '%s' '" .. b.user .. ":" .. b.password .. "' | base64"):gsub("%s", "")
    outs[i] = os.tmpname()
    procs[i] = io.popen(string.format("BENCH_SERVICE=%s BENCH_PLAN=%s BENCH_INSTANCE=bench BENCH_PREFIX=r%d "
      .. "wrk -t1 -c%d -d%ds -s bench/bind_unbind.lua -H 'Authorization: Basic %s' -H 'X-Broker-API-Version: 2.17' "
      .. "'%s' > %s 2>&1", R.service, R.one, i, CONNS, SECONDS, auth, b:url(""), outs[i]))
  end
  local rps, total = 0, 0
  for i, p in ipairs(procs) do
    p:close()
    local f = assert(io.open(outs[i]))
    local text = f:read("a")
    f:close()
    os.remove(outs[i])
    rps = rps + (tonumber(text:match("Requests/sec:%s*([%d%.]+)")) or 0)
    total = total + (tonumber(text:match("(%d+) requests in")) or 0)
  end
  return rps, total
end

local cluster = etcd_server.cluster { n = 3, fast = true }
local shared = Broker.tmpdir()
local brokers = {}
local ok, err = pcall(function()
  local env = { FORGE_STORE = "etcd", FORGE_ETCD_ENDPOINTS = table.concat(cluster.urls, ","),
    FORGE_ETCD_PREFIX = "bench/", FORGE_STATE_DIR = shared, FORGE_LOG_LEVEL = "warn" }
  brokers[1] = Broker.start { env = env, pool_base = 32600, pool = 20 }
  brokers[1]:provision_async("bench", R.service, R.one)
  brokers[1]:wait_operation("/v2/service_instances/bench", 60)

  local function idle_traffic(n)
    local before = etcd_requests(cluster)
    proc.sleep(IDLE)
    return delta(etcd_requests(cluster), before), n
  end

  local idle1 = idle_traffic(1)
  local before = etcd_requests(cluster)
  local rps1, n1 = load({ brokers[1] })
  local per1 = delta(etcd_requests(cluster), before)

  brokers[2] = Broker.start { env = env, pool_base = 32600, pool = 20 }
  brokers[3] = Broker.start { env = env, pool_base = 32600, pool = 20 }
  proc.sleep(2)
  local idle3 = idle_traffic(3)
  before = etcd_requests(cluster)
  local rps3, n3 = load(brokers)
  local per3 = delta(etcd_requests(cluster), before)

  print(string.format("bind+unbind, wrk -c%d -d%ds per replica, one redis instance, 3-member etcd on loopback:",
    CONNS, SECONDS))
  print(string.format("  1 replica:  %8.0f req/s", rps1))
  print(string.format("  3 replicas: %8.0f req/s (sum)   ratio 3/1: %.2f", rps3, rps3 / rps1))
  print("etcd requests per bind or unbind request (all members):")
  print("  1 replica:  " .. describe(per1, math.max(n1, 1)))
  print("  3 replicas: " .. describe(per3, math.max(n3, 1)))
  print(string.format("etcd requests per second while idle (locks, leases, passes), per replica, over %ds:", IDLE))
  print("  1 replica:  " .. describe(idle1, IDLE))
  print("  3 replicas: " .. describe(idle3, IDLE * 3))
end)
for _, b in ipairs(brokers) do b:cleanup() end
Broker.forget_instances(shared)
os.execute("rm -rf " .. shared)
cluster:cleanup()
if not ok then error(err, 0) end
