-- bench/isolation: what isolation costs. For `isolation: namespaces` and `none`, a broker provisions
-- BENCH_INSTANCES (default 10) redis 1-server instances one after another (sync PUT, the time until
-- 201) and reports the median provision time and, per instance, the memory its cgroup is charged
-- (processes and the kernel memory of their namespaces) and the redis process's RSS. Then the cost
-- of one command: proc.run of `true` as the service user, plain, in a sandbox of its own, and
-- inside a running sandbox (join, as health checks and bind commands run).
--   sudo lua5.4 bench/isolation.lua    (from the repository root, after make; needs root)
package.path = "scripts/?.lua;spec/?.lua;" .. package.path
package.cpath = "build/lib/?.so;" .. package.cpath
local Broker = require "spec.support.broker"
local crypto = require "forge.crypto"
local files = require "spec.support.files"
local proc = require "forge.proc"

assert(proc.geteuid() == 0, "bench/isolation needs root (instances run as the service user)")
local COUNT = tonumber(os.getenv("BENCH_INSTANCES") or 10)
local RUNS = tonumber(os.getenv("BENCH_RUNS") or 200)
local R = Broker.redis

local function median(list)
  table.sort(list)
  return list[(#list + 1) // 2]
end

local function kib(path, field) return tonumber(files.read(path):match(field .. ":%s*(%d+) kB")) or 0 end

local function provision_all(mode)
  local b = Broker.start { pool = COUNT, log_level = "warn", env = { FORGE_LOCAL_ISOLATION = mode } }
  local times, charged, rss = {}, {}, {}
  local ok, err = pcall(function()
    for i = 1, COUNT do
      local id = mode .. "-" .. i
      local t0 = proc.monotonic()
      local status, _, _, body = b:call("PUT", "/v2/service_instances/" .. id, { service_id = R.service,
        plan_id = R.one, organization_guid = "o", space_guid = "s" })
      assert(status == 201, tostring(status) .. " " .. tostring(body and body.description))
      times[i] = proc.monotonic() - t0
    end
    proc.sleep(1)                        -- let every redis settle
    for i = 1, COUNT do
      local id = mode .. "-" .. i
      local cg = "/sys/fs/cgroup/memory/forge/" .. id .. "-" .. crypto.sha256_hex(b.state_dir .. "\0" .. id):sub(1, 12)
      charged[i] = tonumber(files.read(cg .. "/memory.usage_in_bytes")) / 1024
      rss[i] = kib(string.format("/proc/%d/status", b:instance(id).processes["redis-0"].pid), "VmRSS")
    end
  end)
  b:cleanup()
  assert(ok, err)
  return { provision = median(times), charged = median(charged), rss = median(rss) }
end

local function per_run(opts)
  local t0 = proc.monotonic()
  for _ = 1, RUNS do assert(proc.run(opts).code == 0) end
  return (proc.monotonic() - t0) / RUNS * 1000
end

local function command_costs()
  local dir = Broker.tmpdir()
  assert(proc.chown(dir, "forge-svc"))
  local box = assert(proc.spawn { argv = { "sleep", "600" }, user = "forge-svc", cwd = dir,
    namespaces = { writable = dir } })
  local costs = {
    plain = per_run { argv = { "true" }, user = "forge-svc" },
    sandbox = per_run { argv = { "true" }, user = "forge-svc", namespaces = { writable = dir } },
    join = per_run { argv = { "true" }, user = "forge-svc", join = box },
  }
  proc.kill(box.pid, box.start_time, "KILL")
  proc.wait(box.pid, 5)
  os.execute("rm -rf " .. dir)
  return costs
end

local iso, none = provision_all("namespaces"), provision_all("none")
io.write(string.format("isolation: %d redis 1-server instances each way (median)\n", COUNT))
io.write(string.format("  %-11s provision %6.0f ms   cgroup memory %7.0f KiB   redis RSS %6.0f KiB\n", "namespaces",
  iso.provision * 1000, iso.charged, iso.rss))
io.write(string.format("  %-11s provision %6.0f ms   cgroup memory %7.0f KiB   redis RSS %6.0f KiB\n", "none",
  none.provision * 1000, none.charged, none.rss))
local c = command_costs()
io.write(string.format("one command (true, as forge-svc, %d runs): plain %.2f ms, own sandbox %.2f ms, "
  .. "joining a sandbox %.2f ms\n", RUNS, c.plain, c.sandbox, c.join))
