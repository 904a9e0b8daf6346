-- bench/scale: what N stored instances cost one broker. For each N, seeds N redis instances on
-- a BOSH target (a `forge bosh-sim` with a short task delay) THROUGH THE OSB API, lets them
-- settle, then measures: idle broker CPU (% of one core), RSS, catalog, last_operation and
-- bind+unbind req/s (wrk; the binds on one local redis instance), a new BOSH provision's
-- latency, restart to the first 200, SIGTERM to exit, RSS again after the restart (without
-- the heap the seeding left), and the store's size per instance.
-- Prints one row per N and the ratios to N = 0.
--   lua5.4 bench/scale.lua     (from the repository root, after make)
--   BENCH_SCALE_N="0,1000,10000"   the Ns (default 0,1000,5000; 100000 works, given the time)
--   BENCH_IDLE_SECONDS=30  BENCH_SECONDS=5 (each wrk run)  BENCH_CONNECTIONS=32
package.path = "scripts/?.lua;spec/?.lua;" .. package.path
package.cpath = "build/lib/?.so;" .. package.cpath
local Broker = require "spec.support.broker"
local boshsim = require "spec.support.boshsim"
local cjson = require "cjson"
local proc = require "forge.proc"

local R = Broker.redis
local NS = {}
for n in (os.getenv("BENCH_SCALE_N") or "0,1000,5000"):gmatch("%d+") do NS[#NS + 1] = tonumber(n) end
local IDLE = tonumber(os.getenv("BENCH_IDLE_SECONDS") or 30)
local SECONDS = tonumber(os.getenv("BENCH_SECONDS") or 5)
local CONNS = tonumber(os.getenv("BENCH_CONNECTIONS") or 32)
local TICK = 100                               -- clock ticks per second (USER_HZ)

local sh = require("spec.support.shell").output

-- utime + stime of a process, in seconds.
local function cpu_seconds(pid)
  local f = assert(io.open("/proc/" .. pid .. "/stat"))
  local stat = f:read("a")
  f:close()
  local fields = {}
  for x in stat:match("%) (.*)$"):gmatch("%S+") do fields[#fields + 1] = x end
  return (tonumber(fields[12]) + tonumber(fields[13])) / TICK
end

local function rss_mb(pid)
  local f = assert(io.open("/proc/" .. pid .. "/status"))
  local kb = f:read("a"):match("VmRSS:%s*(%d+)")
  f:close()
  return tonumber(kb) / 1024
end

local function file_size(path)
  local f = io.open(path, "rb")
  if not f then return 0 end
  local n = f:seek("end")
  f:close()
  return n
end

-- A network pool of at least n addresses, as /16-sized static entries (the broker's limit per entry).
local function statics(n)
  local out = {}
  for b = 0, (n + 1000) // 65000 do
    out[#out + 1] = string.format("'10.%d.0.10 - 10.%d.253.250'", 100 + b, 100 + b)
  end
  return "[" .. table.concat(out, ", ") .. "]"
end

local function config(sim, n)
  return table.concat({ "targets:", "  dc:", "    type: bosh", "    url: " .. sim.url, "    username: " .. sim.user,
    "    password: " .. sim.password, "    poll_interval: 0.05", "    networks:", "    - name: services",
    "      static: " .. statics(n), "    services: [redis/3-servers]" }, "\n") .. "\n"
end

local function provision_body(plan)
  return cjson.encode { service_id = R.service, plan_id = plan, organization_guid = "o", space_guid = "s" }
end

-- PUT n async provisions of BOSH instances s1..sn with one curl process, 8 in parallel.
local function seed(b, n)
  if n == 0 then return end
  local body, cfg = os.tmpname(), os.tmpname()
  local f = assert(io.open(body, "w"))
  f:write(provision_body(R.three))
  f:close()
  f = assert(io.open(cfg, "w"))
  for i = 1, n do
    f:write(string.format('url = "%s"\noutput = "/dev/null"\n', b:url("/v2/service_instances/s" .. i
      .. "?accepts_incomplete=true")))
  end
  f:close()
  local out = sh(string.format("curl -s --no-progress-meter --parallel --parallel-max 8 -X PUT -u '%s:%s' "
    .. "-H 'X-Broker-API-Version: 2.17' -H 'Content-Type: application/json' --data-binary @%s -K %s "
    .. "-w '%%{http_code}\\n'", b.user, b.password, body, cfg))
  os.remove(body)
  os.remove(cfg)
  local codes = {}
  for c in out:gmatch("%d+") do codes[c] = (codes[c] or 0) + 1 end
  if codes["202"] ~= n then error("seeding: " .. cjson.encode(codes)) end
end

-- Wait until no operation is in flight; returns the seconds it took.
local function settle(b)
  local t0 = proc.monotonic()
  repeat
    local _, _, _, body = b:call("GET", "/admin/operations?limit=1")
    if #body.operations == 0 then return proc.monotonic() - t0 end
    proc.sleep(1)
  until false
end

local function wrk(b, path, script, env)
  local auth = sh("printf '%s' '" .. b.user .. ":" .. b.password .. "' | base64"):gsub("%s", "")
  local out = sh(string.format("%s wrk -t2 -c%d -d%ds --latency -H 'Authorization: Basic %s' "
    .. "-H 'X-Broker-API-Version: 2.17' %s '%s' 2>&1", env or "", CONNS, SECONDS, auth,
    script and ("-s " .. script) or "", b:url(path)))
  return tonumber(out:match("Requests/sec:%s*([%d%.]+)")) or 0, out:match("\n%s+99%%%s+(%S+)") or "?"
end

-- A new BOSH provision: seconds from the PUT to last_operation succeeded.
local function provision_latency(b, id)
  local t0 = proc.monotonic()
  local status = b:call("PUT", "/v2/service_instances/" .. id .. "?accepts_incomplete=true",
    cjson.decode(provision_body(R.three)))
  assert(status == 202, "provision " .. id .. ": " .. tostring(status))
  repeat
    local _, _, _, body = b:call("GET", "/v2/service_instances/" .. id .. "/last_operation")
    if body.state == "succeeded" then return proc.monotonic() - t0 end
    assert(body.state == "in progress", id .. ": " .. tostring(body.state) .. " " .. tostring(body.description))
    proc.sleep(0.02)
  until false
end

local function median(t)
  table.sort(t)
  return t[(#t + 1) // 2]
end

-- SIGTERM to exit, then restart to the first 200 of GET /v2/catalog (seconds each).
local function restart(b)
  local t0 = proc.monotonic()
  b:stop("TERM")
  local stop = proc.monotonic() - t0
  local client = require "spec.support.client"
  t0 = proc.monotonic()
  local argv = { os.getenv("PWD") .. "/build/bin/forge", "serve", "--config", b.config_path }
  local p = assert(proc.spawn { argv = argv, env = b.env, stdout = b.log, cwd = b.state_dir })
  b.pid, b.start_time = p.pid, p.start_time
  repeat
    local status = client.request("GET", b:url("/v2/catalog"), { user = b.user, password = b.password,
      headers = { ["X-Broker-API-Version"] = "2.17" }, timeout = 2 })
    if status == 200 then break end
    proc.sleep(0.01)
  until proc.monotonic() - t0 > 120
  return stop, proc.monotonic() - t0
end

local function measure(n)
  local shm = "/dev/shm/forge-bench-scale-" .. proc.getpid()
  os.execute("mkdir -p " .. shm)
  -- the sim's own state on tmpfs: its fsyncs are not what is measured
  local sim = boshsim.start { task_delay = 0.02, vms_delay = 0.01, args = { "--state", shm, "--threads", "4" },
    subnets = { "10.96.0.0/11:10.96.0.2-10.127.255.250" } }
  local b = Broker.start { config = config(sim, 3 * n + 10), pool = 20, log_level = "warn" }
  local row = { n = n }
  local ok, err = pcall(function()
    local t0 = proc.monotonic()
    seed(b, n)
    row.seed_s = proc.monotonic() - t0
    settle(b)
    row.seed_s = proc.monotonic() - t0
    b:provision_async("bindhere", R.service, R.one)   -- the instance binds go to: a local redis
    b:wait_operation("/v2/service_instances/bindhere", 60)
    proc.sleep(3)                              -- past the start-up work
    local c0 = cpu_seconds(b.pid)
    proc.sleep(IDLE)
    row.idle_cpu = (cpu_seconds(b.pid) - c0) / IDLE * 100
    row.rss = rss_mb(b.pid)
    row.catalog, row.catalog_p99 = wrk(b, "/v2/catalog")
    row.last_op, row.last_op_p99 = wrk(b, "/v2/service_instances/" .. (n > 0 and "s1" or "bindhere") .. "/last_operation")
    row.bind, row.bind_p99 = wrk(b, "", "bench/bind_unbind.lua", string.format("BENCH_SERVICE=%s BENCH_PLAN=%s "
      .. "BENCH_INSTANCE=bindhere", R.service, R.one))
    local lat = {}
    for i = 1, 3 do lat[i] = provision_latency(b, "new" .. i) end
    row.provision = median(lat)
    row.sigterm, row.restart = restart(b)
    proc.sleep(5)                              -- the metrics' seed and the first passes
    row.rss_restarted = rss_mb(b.pid)          -- what the stored records cost, without the seeding's heap
    local db = b.state_dir .. "/forge.db"
    row.store_mb = (file_size(db) + file_size(db .. "-wal")) / 1e6
    row.per_instance = n > 0 and (file_size(db) + file_size(db .. "-wal")) / n or nil
  end)
  b:cleanup()
  sim:cleanup()
  os.execute("rm -rf " .. shm)
  if not ok then error(err, 0) end
  return row
end

local COLS = {
  { "idle_cpu", "idle CPU %", "%.2f" }, { "rss", "RSS MB", "%.1f" }, { "rss_restarted", "RSS restarted", "%.1f" },
  { "catalog", "catalog/s", "%.0f" },
  { "last_op", "last_op/s", "%.0f" }, { "bind", "bind+unbind/s", "%.0f" }, { "provision", "provision s", "%.3f" },
  { "restart", "restart s", "%.3f" }, { "sigterm", "SIGTERM s", "%.3f" }, { "store_mb", "store MB", "%.1f" },
}

local rows = {}
for _, n in ipairs(NS) do
  io.stderr:write("N = ", n, " ...\n")
  rows[#rows + 1] = measure(n)
  io.stderr:write(string.format("  seeded and settled in %.0f s\n", rows[#rows].seed_s))
end

local header = { string.format("%8s", "N") }
for _, c in ipairs(COLS) do header[#header + 1] = string.format("%13s", c[2]) end
header[#header + 1] = string.format("%14s", "bytes/instance")
print(table.concat(header, " "))
for _, r in ipairs(rows) do
  local line = { string.format("%8d", r.n) }
  for _, c in ipairs(COLS) do line[#line + 1] = string.format("%13s", string.format(c[3], r[c[1]])) end
  line[#line + 1] = string.format("%14s", r.per_instance and string.format("%.0f", r.per_instance) or "-")
  print(table.concat(line, " "))
end
print("ratios to N = " .. rows[1].n .. ":")
for i = 2, #rows do
  local line = { string.format("%8d", rows[i].n) }
  for _, c in ipairs(COLS) do
    local base = rows[1][c[1]]
    line[#line + 1] = string.format("%13s", base and base > 0 and string.format("%.2f", rows[i][c[1]] / base) or "-")
  end
  print(table.concat(line, " "))
end
print(string.format("p99: catalog %s, last_operation %s, bind+unbind %s (last N); wrk -t2 -c%d -d%ds",
  rows[#rows].catalog_p99, rows[#rows].last_op_p99, rows[#rows].bind_p99, CONNS, SECONDS))
