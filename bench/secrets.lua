-- The cost of sealing the store's values (forge.secrets, AES-256-GCM), side by side in one run:
--   1. seal + open of one record alone, for a binding record and an instance record as the
--      broker stores them (sizes below), against the JSON encode + decode every record pays anyway;
--   2. the store calls a bind makes (read the instance, write the binding in a CAS txn, read it
--      back) on the embedded SQLite store, plain (forge.store) and sealed (storage's wrapper);
--   3. a real broker's bind + unbind of a real redis instance: its CPU time per pair, and the
--      share sealing takes of it (store writes counted, reads taken as two per write).
--
--   lua5.4 bench/secrets.lua [n]        (default 2000; run from the repository root)
--
-- Sealing cannot be turned off in the broker, so 3 is measured with it on, and the ratio of a
-- bind with sealing to one without is its CPU time over that time less the sealing in it.
local here = (arg and arg[0] or ""):match("^(.*)/bench/[^/]*$") or "."
package.path = here .. "/?.lua;" .. here .. "/spec/?.lua;" .. here .. "/scripts/?.lua;" .. package.path
package.cpath = here .. "/build/lib/?.so;" .. package.cpath

local crypto = require "forge.crypto"
local proc = require "forge.proc"
local secrets = require "forge.secrets"
local store = require "forge.store"
local util = require "forge.util"

local N = tonumber(arg and arg[1]) or 2000

-- Records shaped like the broker's (a 1-server redis instance with its rendered deployment; a binding).
local BINDING = { id = "b-0001", instance_id = "i-0001", service = "redis", state = "created",
  credentials = { host = "127.0.0.1", port = 30001, hosts = { "127.0.0.1:30001" }, username = "b-" .. crypto.token(12),
    password = crypto.password(32), uri = "redis://b-x:" .. crypto.password(32) .. "@127.0.0.1:30001" },
  operation = { id = crypto.uuid(), type = "bind", state = "succeeded", started_at = os.time() } }
local INSTANCE = { id = "i-0001", service = "redis", plan = "1-server", state = "running",
  secrets = { admin_password = crypto.password(32) }, parameters = { maxmemory_mb = 256 },
  context = { platform = "cloudfoundry", organization_guid = crypto.uuid(), space_guid = crypto.uuid() },
  resources = { host = "127.0.0.1", ports = { 30001 } }, script_hash = crypto.sha256_hex("x"),
  deployment = { processes = { { name = "redis-0", argv = { "redis-server", "redis.conf" },
    files = { ["redis-0/redis.conf"] = string.rep("setting value\n", 60) } } } },
  operation = { id = crypto.uuid(), type = "provision", state = "succeeded", description = "running on 1 node" },
  history = {} }
for i = 1, 5 do INSTANCE.history[i] = { id = crypto.uuid(), type = "update", state = "succeeded" } end

local ring = { keys = { k1 = crypto.random_bytes(32) }, ids = { "k1" }, primary = "k1" }

-- Microseconds per call of fn(i), best of 3 rounds of n calls.
local function us_per_call(n, fn)
  local best = math.huge
  for _ = 1, 3 do
    local t0 = proc.monotonic()
    for i = 1, n do fn(i) end
    best = math.min(best, (proc.monotonic() - t0) / n * 1e6)
  end
  return best
end

print(string.format("secrets bench: n = %d, %s", N, io.popen("openssl version"):read("l")))
print()
print("1. one record: JSON encode + decode, and seal + open on top (microseconds)")
print(string.format("%-9s %7s %12s %12s %8s", "record", "bytes", "json", "seal+open", "ratio"))
local seal_open_binding
for _, r in ipairs({ { "binding", BINDING, "binding/i-0001/b-0001" }, { "instance", INSTANCE, "instance/i-0001" } }) do
  local text = util.json_encode(r[2])
  local json = us_per_call(N, function() util.json_decode(util.json_encode(r[2])) end)
  local sealed = us_per_call(N, function() assert(secrets.open(ring, r[3], secrets.seal(ring, r[3], text))) end)
  print(string.format("%-9s %7d %12.2f %12.2f %7.2fx", r[1], #text, json, sealed, (json + sealed) / json))
  seal_open_binding = seal_open_binding or sealed
end

-- The store calls of one bind: read the instance, CAS-put the binding, read it back.
local function bind_calls(db, i)
  local inst = assert(db:get("instance/i-0001"))
  util.json_decode(inst.value)
  local k = string.format("binding/i-0001/b-%06d", i)
  BINDING.id = k
  assert(db:txn { compare = { { key = k, mod_revision = 0 } }, success = { { op = "put", key = k,
    value = util.json_encode(BINDING) } } })
  util.json_decode(assert(db:get(k)).value)
end

local tmp = assert(proc.run { argv = { "mktemp", "-d", "/tmp/forge-bench-XXXXXX" } }).stdout:gsub("%s+$", "")
local per = {}
for _, kind in ipairs({ "plain", "sealed", "plain", "sealed" }) do    -- interleaved: the disk warms for both
  local raw = assert(store.open(tmp .. "/" .. kind .. ".db"))
  local db = kind == "sealed" and secrets.wrap(raw, ring) or raw
  assert(db:put("instance/i-0001", util.json_encode(INSTANCE)))
  local t0 = proc.monotonic()
  local n = math.max(100, N // 4)
  for i = 1, n do bind_calls(db, i + (per[kind] and n or 0)) end
  local ms = (proc.monotonic() - t0) / n * 1000
  per[kind] = per[kind] and math.min(per[kind], ms) or ms
  raw:close()
end
print()
print("2. the store calls of a bind on SQLite (WAL, synchronous=FULL), milliseconds per bind")
print(string.format("plain %.3f   sealed %.3f   ratio %.3fx   sealing's share %.3f ms", per.plain, per.sealed,
  per.sealed / per.plain, per.sealed - per.plain))

-- 3. a real broker
-- CPU seconds (user + system) the process `pid` used so far.
local function cpu_seconds(pid)
  local stat = io.open("/proc/" .. pid .. "/stat"):read("a"):gsub("^.*%) ", "")
  local fields = {}
  for f in stat:gmatch("%S+") do fields[#fields + 1] = f end
  return (tonumber(fields[12]) + tonumber(fields[13])) / 100        -- utime, stime (after pid and comm)
end

local function store_revision(b)
  local db = b:store()
  local rev = db:revision()
  db:close()
  return rev
end

local Broker = require "spec.support.broker"
local b = Broker.start { log_level = "warn" }
local ok, err = pcall(function()
  local R = Broker.redis
  assert(b:call("PUT", "/v2/service_instances/r1?accepts_incomplete=true",
    { service_id = R.service, plan_id = R.one, organization_guid = "o", space_guid = "s" }) == 202)
  assert(b:wait_operation("/v2/service_instances/r1").state == "succeeded")
  local pairs_n = math.max(50, N // 20)
  local rev0, cpu0, t0 = store_revision(b), cpu_seconds(b.pid), proc.monotonic()
  for i = 1, pairs_n do
    local path = "/v2/service_instances/r1/service_bindings/b" .. i
    assert(b:call("PUT", path, { service_id = R.service, plan_id = R.one }) == 201)
    assert(b:call("DELETE", path .. "?service_id=" .. R.service .. "&plan_id=" .. R.one) == 200)
  end
  local ms = (proc.monotonic() - t0) / pairs_n * 1000
  local cpu_ms = (cpu_seconds(b.pid) - cpu0) / pairs_n * 1000
  local writes = (store_revision(b) - rev0) / pairs_n
  -- the seal + open of a binding record per write, and as many reads again (the reads of a
  -- bind are not counted: two per write is what the bind and unbind paths do)
  local sealing = writes * 3 * seal_open_binding / 2 / 1000
  print()
  print(string.format("3. a broker's bind + unbind of real redis, one client, %d pairs: %.1f ms per pair "
    .. "(waits on the reconciler), %.2f ms of broker CPU, %.1f store writes", pairs_n, ms, cpu_ms, writes))
  print(string.format("   sealing's share of the broker's CPU about %.3f ms (%.1f %%): with / without about %.3fx",
    sealing, 100 * sealing / cpu_ms, cpu_ms / (cpu_ms - sealing)))
end)
b:cleanup()
os.execute("rm -rf '" .. tmp .. "'")
if not ok then error(err, 0) end
