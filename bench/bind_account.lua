-- bench/bind_account: where a binding's microseconds go. bench/run gives bind+unbind req/s;
-- this accounts for them, on one redis 1-server instance of a real broker, in one run:
--   1. each step a bind and an unbind wait on, measured alone on the same machine and file
--      system: a durable store commit (forge.store, WAL + synchronous=FULL), a store read, and
--      redis's ACL SETUSER / ACL DELUSER each followed by ACL SAVE (forge.resp, pooled, on a
--      redis-server started here with an ACL file);
--   2. one connection: the mean bind and unbind latency, and what is left of each once the
--      steps it waits on are taken out (the broker's own work: HTTP, Lua, the service's
--      sandboxed hook, sealing, JSON);
--   3. 32 connections: req/s, the CPU per request of the broker (user, system), of redis and of
--      the load generator, context switches per request, and the rate the machine's cores
--      would allow at that CPU per request; with perf, the broker's CPU by library.
-- No assertions.
--   lua5.4 bench/bind_account.lua     (from the repository root, after make)
--   BENCH_SECONDS=5 BENCH_CONNECTIONS=32
package.path = "scripts/?.lua;spec/?.lua;" .. package.path
package.cpath = "build/lib/?.so;" .. package.cpath
local Broker = require "spec.support.broker"
local net = require "spec.support.net"
local proc = require "forge.proc"
local resp = require "forge.resp"
local store = require "forge.store"

local R = Broker.redis
local SECONDS = tonumber(os.getenv("BENCH_SECONDS") or 5)
local CONNS = tonumber(os.getenv("BENCH_CONNECTIONS") or 32)
local TICK = 100                               -- clock ticks per second (USER_HZ)
local N = 2000                                 -- calls per step measured alone
local sh = require("spec.support.shell").output

-- {utime, stime} of a process in seconds, and its threads' context switches.
local function usage(pid)
  local f = assert(io.open("/proc/" .. pid .. "/stat"))
  local fields = {}
  for x in f:read("a"):match("%) (.*)$"):gmatch("%S+") do fields[#fields + 1] = x end
  f:close()
  local switches = 0
  for tid in sh("ls /proc/" .. pid .. "/task 2>/dev/null"):gmatch("%d+") do
    local s = io.open("/proc/" .. pid .. "/task/" .. tid .. "/status")
    if s then
      for n in s:read("a"):gmatch("ctxt_switches:%s*(%d+)") do switches = switches + tonumber(n) end
      s:close()
    end
  end
  return { user = tonumber(fields[12]) / TICK, sys = tonumber(fields[13]) / TICK, switches = switches }
end

-- Mean µs of n calls of fn(i) (after a warm-up).
local function mean_us(fn)
  for i = 1, 50 do fn(-i) end
  local t0 = proc.monotonic()
  for i = 1, N do fn(i) end
  return (proc.monotonic() - t0) / N * 1e6
end

-- Steps measured alone -------------------------------------------------------------------------

local function store_steps(dir)
  local db = assert(store.open(dir .. "/account.db"))
  local value = string.rep("v", 2600)            -- a sealed binding record's size
  local out = {
    commit = mean_us(function(i)
      assert(db:txn { compare = { { key = "b/" .. i, mod_revision = 0 } },
        success = { { op = "put", key = "b/" .. i, value = value } } })
    end),
    read = mean_us(function(i) assert(db:get("b/" .. math.abs(i))) end),
  }
  db:close()
  return out
end

local function redis_steps(dir)
  local port = net.free_port()
  local f = assert(io.open(dir .. "/users.acl", "w"))
  f:close()
  local srv = assert(proc.spawn { argv = { "redis-server", "--port", tostring(port), "--bind", "127.0.0.1",
    "--save", "", "--appendonly", "no", "--aclfile", dir .. "/users.acl", "--dir", dir },
    stdout = dir .. "/redis.log" })
  local function call(commands, flush)
    local replies, err = resp.call { host = "127.0.0.1", port = port, commands = commands, flush = flush,
      timeout = 5, pool = true }
    assert(replies, err and (err.message or tostring(err)))
  end
  assert(Broker.wait_for(function() return proc.tcp_check("127.0.0.1", port, 1) end, 10), "redis did not start")
  local out = {
    setuser = mean_us(function(i)
      call({ { "ACL", "SETUSER", "u" .. i, "reset", "on", "#" .. string.rep("ab", 32), "~*", "&*", "+@all" } },
        { "ACL", "SAVE" })
    end),
    deluser = mean_us(function(i) call({ { "ACL", "DELUSER", "u" .. i } }, { "ACL", "SAVE" }) end),
    ping = mean_us(function() call { { "PING" } } end),
  }
  proc.stop(srv.pid, srv.start_time)
  return out
end

-- The broker under bindload ---------------------------------------------------------------

local function bindload(b, bin, conns, mode, secs)
  local auth = sh("printf '%s' '" .. b.user .. ":" .. b.password .. "' | base64"):gsub("%s", "")
  local out = sh(string.format("%s 127.0.0.1 %d %s bench %s %s %d %g %s", bin, b.port, auth, R.service, R.one,
    conns, secs, mode))
  local n, took = out:match("(%d+) requests in ([%d.]+)s")
  return { n = tonumber(n) or 0, took = tonumber(took) or 0, p50 = out:match("50%%%s+(%S+)"),
    p99 = out:match("99%%%s+(%S+)"), statuses = out:match("statuses:[^\n]*") }
end

local function redis_pids(b)
  local _, _, _, body = b:call("GET", "/admin/instances/bench")
  local pids = {}
  for _, p in ipairs(body.processes or {}) do pids[#pids + 1] = math.tointeger(p.pid) end
  return pids
end

local function cpu_of(pids)
  local t = 0
  for _, pid in ipairs(pids) do
    local u = usage(pid)
    t = t + u.user + u.sys
  end
  return t
end

local function perf_split(pid, secs)
  if sh("command -v perf"):gsub("%s", "") == "" then return nil end
  local data = os.tmpname()
  local p = proc.spawn { argv = { "perf", "record", "-F", "499", "-p", tostring(pid), "-o", data, "--", "sleep",
    tostring(secs) }, stdout = "/dev/null" }
  return function()
    proc.wait(p.pid, secs + 30)
    local rep = sh("perf report -i " .. data .. " --no-children --sort dso --stdio -g none 2>/dev/null")
    os.remove(data)
    local rows = {}
    for pct, dso in rep:gmatch("\n%s+([%d.]+)%%%s+(%S+)") do
      if tonumber(pct) >= 0.5 then rows[#rows + 1] = string.format("%s %s%%", dso, pct) end
    end
    return table.concat(rows, ", ")
  end
end

local function main()
  local work = Broker.tmpdir()
  local bin = work .. "/bindload"
  assert(os.execute("cc -O2 -Wall -Wextra -Werror -o " .. bin .. " bench/bindload.c -lpthread"))
  local alone = store_steps(work)
  for k, v in pairs(redis_steps(work)) do alone[k] = v end

  local b = Broker.start { log_level = "warn" }
  local ok, err = pcall(function()
    b:provision_async("bench", R.service, R.one)
    assert(b:wait_operation("/v2/service_instances/bench", 60).state == "succeeded")
    bindload(b, bin, CONNS, "bind_unbind", 2)                 -- warm up
    local one_bind = bindload(b, bin, 1, "bind", SECONDS)
    local one_pair = bindload(b, bin, 1, "bind_unbind", SECONDS)
    local bind_us = one_bind.took / one_bind.n * 1e6
    local unbind_us = 2 * one_pair.took / one_pair.n * 1e6 - bind_us

    local rp = redis_pids(b)
    local u0, r0 = usage(b.pid), cpu_of(rp)
    local perf = perf_split(b.pid, SECONDS - 1)
    local load = bindload(b, bin, CONNS, "bind_unbind", SECONDS)
    local u1, r1 = usage(b.pid), cpu_of(rp)
    local by_lib = perf and perf()
    local per = function(x) return x / load.n * 1e6 end
    local broker_user, broker_sys = per(u1.user - u0.user), per(u1.sys - u0.sys)
    local redis_cpu = per(r1 - r0)
    local cores = tonumber(sh("nproc"))
    return { bind_us = bind_us, unbind_us = unbind_us, one_bind = one_bind, load = load, broker_user = broker_user,
      broker_sys = broker_sys, redis_cpu = redis_cpu, switches = (u1.switches - u0.switches) / load.n,
      cores = cores, by_lib = by_lib }
  end)
  b:cleanup()
  os.execute("rm -rf " .. work)
  if not ok then error(err, 0) end
  return alone, err
end

local alone, r = main()
print(string.format("steps alone (mean of %d calls each):", N))
print(string.format("  store commit (one durable txn)     %7.0f us", alone.commit))
print(string.format("  store read                         %7.0f us", alone.read))
print(string.format("  redis ACL SETUSER + ACL SAVE       %7.0f us", alone.setuser))
print(string.format("  redis ACL DELUSER + ACL SAVE       %7.0f us", alone.deluser))
print(string.format("  redis PING (pooled connection)     %7.0f us", alone.ping))
local function account(name, total, commits, reads, redis)
  local waits = commits * alone.commit + reads * alone.read + redis
  print(string.format("%-7s %6.0f us = %d commits %5.0f + %d reads %4.0f + redis %5.0f + the broker's own work %5.0f",
    name, total, commits, commits * alone.commit, reads, reads * alone.read, redis, total - waits))
end
print("one connection (mean latency):")
account("bind", r.bind_us, 2, 2, alone.setuser)
account("unbind", r.unbind_us, 1, 2, alone.deluser)
local l = r.load
print(string.format("%d connections, bind+unbind: %.0f req/s, p50 %s, p99 %s (%s)", CONNS, l.n / l.took, l.p50,
  l.p99, l.statuses))
local total = r.broker_user + r.broker_sys + r.redis_cpu
print(string.format("  CPU per request: broker %.0f us (user %.0f, system %.0f), redis %.0f us; %.1f context "
  .. "switches of the broker per request", r.broker_user + r.broker_sys, r.broker_user, r.broker_sys, r.redis_cpu,
  r.switches))
print(string.format("  %d cores at %.0f us of broker + redis CPU per request allow at most %.0f req/s "
  .. "(the load generator shares the cores)", r.cores, total, r.cores * 1e6 / total))
if r.by_lib then print("  broker CPU by library (perf): " .. r.by_lib) end
