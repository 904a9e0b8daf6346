-- Store backends side by side: put, get and CAS txn throughput and latency for the embedded
-- SQLite store (forge.store, a file in a temp dir, WAL + synchronous=FULL) and a real etcd
-- (forge.etcd through the v3 JSON gateway; Debian's etcd started on loopback as the specs do,
-- with fsync on, its data dir in a temp dir on the same file system).
--
--   lua5.4 bench/store.lua [ops-per-test]        (default 2000; run from anywhere)
--
-- One client, one operation at a time: the figures are per-call latency, the sequential
-- rate that follows from it, and the client's own CPU time per call (this process only: the
-- cost of the client library, request building and answer decoding, without etcd's). "range"
-- reads all KEYS keys in one call. No assertions.
local here = (arg and arg[0] or ""):match("^(.*)/bench/[^/]*$") or "."
package.path = here .. "/spec/?.lua;" .. here .. "/scripts/?.lua;" .. package.path
package.cpath = here .. "/build/lib/?.so;" .. package.cpath

local proc = require "forge.proc"
local store = require "forge.store"
local etcd = require "forge.etcd"
local etcd_server = require "support.etcd"

local N = tonumber(arg and arg[1]) or 2000
local KEYS = 1000
local VALUE = string.rep("v", 256)

local function percentile(sorted, p)
  local i = math.max(1, math.min(#sorted, math.ceil(#sorted * p)))
  return sorted[i]
end

-- Time n calls of fn(i); returns {rate=ops/s, p50=ms, p99=ms, cpu=client CPU µs per call}.
local function measure(n, fn)
  for i = 1, math.min(50, n) do fn(i) end          -- warm up connections and caches
  local lat = {}
  local cpu0, t0 = os.clock(), proc.monotonic()
  for i = 1, n do
    local s = proc.monotonic()
    fn(i)
    lat[i] = (proc.monotonic() - s) * 1000
  end
  local total, cpu = proc.monotonic() - t0, os.clock() - cpu0
  table.sort(lat)
  return { rate = n / total, p50 = percentile(lat, 0.50), p99 = percentile(lat, 0.99), cpu = cpu / n * 1e6 }
end

local function key(i) return string.format("bench/k%04d", i % KEYS) end

-- put, get, txn (CAS on a counter key whose mod_revision we track) on one db.
local function run_backend(db)
  local res = {}
  res.put = measure(N, function(i) assert(db:put(key(i), VALUE)) end)
  res.get = measure(N, function(i) assert(db:get(key(i))) end)
  res.range = measure(math.max(1, N // 20), function() assert(#db:range("bench/k") == KEYS) end)
  local rev = assert(db:put("bench/counter", "0"))
  res.txn = measure(N, function(i)
    local ok, r = db:txn {
      compare = { { key = "bench/counter", mod_revision = rev } },
      success = { { op = "put", key = "bench/counter", value = tostring(i) } },
    }
    assert(ok, "CAS lost: nobody else writes")
    rev = r
  end)
  return res
end

local tmp = assert(proc.run { argv = { "mktemp", "-d", "/tmp/forge-bench-XXXXXX" } }).stdout:gsub("%s+$", "")
local results = {}

local sdb = assert(store.open(tmp .. "/bench.db"))
results.sqlite = run_backend(sdb)
sdb:close()

local srv = etcd_server.start {}                    -- fsync on, as in production
local ok, err = pcall(function()
  local edb = assert(etcd.open { endpoints = { srv.url }, prefix = "bench/" })
  results.etcd = run_backend(edb)
  edb:close()
end)
srv:cleanup()
os.execute("rm -rf '" .. tmp .. "'")
if not ok then error(err, 0) end

local function info(cmd)
  local p = io.popen(cmd .. " 2>/dev/null")
  local s = p and p:read("l") or "?"
  if p then p:close() end
  return s or "?"
end

print(string.format("store bench: %d ops per test, one client, %d-byte values, %d keys; %s; %s", N, #VALUE, KEYS,
  info("etcd --version | head -n 1"), "sqlite " .. info("sqlite3 --version | cut -d' ' -f1")))
print()
local OPS = { "put", "get", "range", "txn" }
print(string.format("%-5s %-8s %12s %10s %10s %12s", "op", "backend", "ops/s", "p50 ms", "p99 ms", "client µs"))
for _, op in ipairs(OPS) do
  for _, backend in ipairs({ "sqlite", "etcd" }) do
    local r = results[backend][op]
    print(string.format("%-5s %-8s %12.0f %10.3f %10.3f %12.1f", op, backend, r.rate, r.p50, r.p99, r.cpu))
  end
end
print()
print("etcd/sqlite ratios (throughput < 1 and latency > 1 mean etcd is slower):")
print(string.format("%-5s %12s %10s %10s", "op", "ops/s", "p50", "p99"))
for _, op in ipairs(OPS) do
  local s, e = results.sqlite[op], results.etcd[op]
  print(string.format("%-5s %12.2f %10.2f %10.2f", op, e.rate / s.rate, e.p50 / s.p50, e.p99 / s.p99))
end
