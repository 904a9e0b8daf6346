-- forge.etcd against a real 3-member etcd cluster on loopback: a member that stops cleanly
-- (SIGTERM) while a client works through it, then comes back. While quorum holds the client
-- must not slow down nor fail a read: it marks the member down, skips it, and finds it again
-- by a probe once it is back. A write fails only when the member may have applied it (no
-- answer, or "transport is closing": see not_processed[] in runtime/etcd.c), as the
-- retryable etcd.unavailable, and the next call succeeds. Figures (latency per phase, who
-- answered, failures) are printed.
local etcd = require "forge.etcd"
local proc = require "forge.proc"
local etcd_server = require "support.etcd"

local DRILL_S = 10              -- length of the request loop
local STOP_AT, RESTART_AT = 3, 6.5

local function percentile(samples, p)
  if #samples == 0 then return 0 end
  local sorted = {}
  for i, v in ipairs(samples) do sorted[i] = v end
  table.sort(sorted)
  return sorted[math.max(1, math.ceil(#sorted * p))]
end

local function ms(s) return s * 1e3 end

local function phase_line(name, samples)
  return string.format("%-9s %5d calls  p50 %6.2f ms  p99 %6.2f ms  max %7.2f ms", name, #samples,
    ms(percentile(samples, 0.5)), ms(percentile(samples, 0.99)), ms(percentile(samples, 1)))
end

describe("forge.etcd failover on a 3-member cluster", function()
  local cl
  local serial = 0

  local function new_prefix()
    serial = serial + 1
    return string.format("failover/%d/%d/", proc.getpid(), serial)
  end

  setup(function()
    cl = etcd_server.cluster { n = 3, fast = true }
  end)

  teardown(function()
    if cl then cl:cleanup() end
  end)

  -- Bring a member back if a drill left it stopped, and wait for the cluster to have a leader.
  local function heal()
    for _, m in ipairs(cl.members) do
      if not m:running() then
        m:stop()
        m:start(30)
      end
    end
    local deadline = proc.monotonic() + 10
    while not cl:leader() and proc.monotonic() < deadline do proc.sleep(0.1) end
    assert(cl:leader(), "no leader")
  end

  -- One op of the steady loop, by its number: read the counter, bump it by compare-and-swap
  -- on the revision just read, write a log key. Returns ok, err, kind.
  local function make_ops(db)
    local last_kv
    return function(i)
      local kind = i % 3
      if kind == 0 then
        local kv, err = db:get("counter")
        if err then return nil, err, "get" end
        last_kv = kv
        return true, nil, "get"
      elseif kind == 1 then
        local n = last_kv and tonumber(last_kv.value) or 0
        local ok, err = db:txn { compare = { { key = "counter", mod_revision = last_kv and last_kv.mod_revision or 0 } },
          success = { { op = "put", key = "counter", value = tostring(n + 1) } } }
        if ok == nil then return nil, err, "txn" end
        return ok, nil, "txn"                  -- false would mean a txn was applied twice
      else
        local rev, err = db:put("log/" .. (i % 50), tostring(i))
        if not rev then return nil, err, "put" end
        return true, nil, "put"
      end
    end
  end

  --[[
    The drill: a client with all three endpoints, the victim first (so it is the one the
    client talks to), runs get/txn/put for DRILL_S seconds. At STOP_AT the victim gets
    SIGTERM (the loop does not wait for it); once it has exited and RESTART_AT has passed
    it is started again (again without waiting). Returns the figures.
  ]]
  local function drill(victim)
    local eps, names = { victim.url }, { [victim.url] = victim.name }
    for _, m in ipairs(cl:others(victim)) do
      eps[#eps + 1] = m.url
      names[m.url] = m.name
    end
    local db = assert(etcd.open { endpoints = eps, prefix = new_prefix(), timeout_ms = 5000 })
    assert.matches(victim.url, tostring(db), 1, true)
    local op = make_ops(db)
    local f = { lat = { healthy = {}, down = {}, restart = {} }, answered = { healthy = {}, down = {}, restart = {} },
      failures = {}, ghost = 0, txn_ok = 0, txn_false = 0, txn_failed = 0, calls = 0 }
    local phase = "healthy"
    local t0 = proc.monotonic()
    local stopped_at, exited_at, restarted_at
    local i = 0
    local next_check = 0
    local last_failed = false
    while true do
      local now = proc.monotonic() - t0
      if now >= DRILL_S then break end
      if not stopped_at and now >= STOP_AT then
        victim:signal("TERM")
        stopped_at, phase = now, "down"
      end
      if stopped_at and not exited_at and now >= next_check then
        next_check = now + 0.05
        if not victim:running() then exited_at = now end
      end
      if exited_at and not restarted_at and now >= math.max(RESTART_AT, exited_at + 0.5) then
        victim:stop()                           -- reap
        victim:spawn()
        restarted_at, phase = now, "restart"
      end
      i = i + 1
      local t = proc.monotonic()
      local ok, err, kind = op(i)
      local took = proc.monotonic() - t
      f.calls = f.calls + 1
      local lat = f.lat[phase]
      lat[#lat + 1] = took
      if ok ~= nil then                         -- who answered: the endpoint the db names now
        local who = names[tostring(db):match("%((http://[^,]+),")] or "?"
        f.answered[phase][who] = (f.answered[phase][who] or 0) + 1
        if who == victim.name and exited_at and not restarted_at then f.ghost = f.ghost + 1 end
      end
      if kind == "txn" then
        if ok == true then f.txn_ok = f.txn_ok + 1
        elseif ok == false then f.txn_false = f.txn_false + 1
        else f.txn_failed = f.txn_failed + 1 end
      end
      if ok == nil then
        f.failures[#f.failures + 1] = { at = now, kind = kind, code = err.code, retryable = err.retryable,
          message = err.message, took = took }
      elseif last_failed then
        f.failures[#f.failures].next_ok = true
      end
      last_failed = ok == nil
    end
    f.stopped_at, f.exited_at, f.restarted_at = stopped_at, exited_at, restarted_at
    -- the victim is back: a read probes it within the backoff and finds it up again
    victim:wait_healthy(30)
    local deadline = proc.monotonic() + 40
    local back
    repeat
      assert(db:get("counter"))
      for _, ep in ipairs(db:endpoints()) do
        if ep.url == victim.url then back = ep end
      end
      if not back.up then proc.sleep(0.05) end
    until back.up or proc.monotonic() > deadline
    f.victim_state = back
    f.counter = tonumber(assert(db:get("counter")).value)
    f.db = db
    return f
  end

  local function report(title, f)
    local lines = { "", "  " .. title .. string.format(": %d calls in %d s; SIGTERM at %.2f s, exited at %.2f s, " ..
      "restarted at %.2f s", f.calls, DRILL_S, f.stopped_at or -1, f.exited_at or -1, f.restarted_at or -1) }
    for _, phase in ipairs({ "healthy", "down", "restart" }) do
      local who = {}
      for name, n in pairs(f.answered[phase]) do who[#who + 1] = name .. "=" .. n end
      table.sort(who)
      lines[#lines + 1] = "    " .. phase_line(phase, f.lat[phase]) .. "  answered by " .. table.concat(who, " ")
    end
    lines[#lines + 1] = string.format("    p99 down - p99 healthy = %+.2f ms; txns ok %d, false %d, failed %d; " ..
      "counter %d; failures %d", ms(percentile(f.lat.down, 0.99) - percentile(f.lat.healthy, 0.99)), f.txn_ok,
      f.txn_false, f.txn_failed, f.counter, #f.failures)
    for _, fl in ipairs(f.failures) do
      lines[#lines + 1] = string.format("    failure at %.3f s (%s, %.0f ms, %s%s): %s", fl.at, fl.kind, ms(fl.took),
        fl.code, fl.retryable and ", retryable" or "", fl.message)
    end
    print(table.concat(lines, "\n"))
  end

  -- What every drill must show. A read never fails. A write fails only as etcd.unavailable,
  -- retryable, when the member may have applied it (it answered "transport is closing", or
  -- never answered), at most max_failures times, and the call after it succeeds. No txn was
  -- resent after it had been applied (its compare would have failed: txn_false), and the
  -- counter moved once per txn that succeeded (plus those that failed but were applied).
  -- The stopped member answered nothing once gone, and a read found it again once back.
  local function check(f, victim, max_failures)
    assert.is_truthy(f.exited_at, "the member did not exit")
    assert.is_truthy(f.restarted_at, "the member was not restarted")
    assert.is_true(#f.failures <= max_failures, #f.failures .. " failed calls")
    for _, fl in ipairs(f.failures) do
      assert.is_not.equal("get", fl.kind, fl.message)
      assert.equal("etcd.unavailable", fl.code)
      assert.is_true(fl.retryable)
      assert.is_true(fl.next_ok, "the call after a failure failed too")
    end
    assert.equal(0, f.txn_false)
    assert.is_true(f.counter >= f.txn_ok and f.counter <= f.txn_ok + f.txn_failed, "counter " .. f.counter)
    assert.equal(0, f.ghost, "the member answered after it exited")
    -- once a call saw the member go, the others skipped it: it answered at most the calls in
    -- flight when it got SIGTERM
    assert.is_true((f.answered.down[victim.name] or 0) <= 2)
    assert.is_true(#f.lat.down > 100, #f.lat.down .. " calls while down")
    assert.is_true(percentile(f.lat.down, 0.99) < 0.2, "p99 while down")
    assert.is_true(percentile(f.lat.restart, 0.99) < 0.2, "p99 after the restart")
    assert.is_true(f.victim_state.up, "the member is not up again")
  end

  it("loses no request and no speed when a follower it talks to stops cleanly, and finds it again", function()
    heal()
    local victim = cl:others(cl:leader())[1]
    local f = drill(victim)
    report("follower " .. victim.name .. " stopped", f)
    check(f, victim, 1)
    f.db:close()
  end)

  it("loses no read and no speed when the leader it talks to stops cleanly", function()
    -- A leader that stops hands leadership over first; etcd 3.4 drops a proposal that a
    -- follower forwards during the handover, and that follower answers only when its
    -- request timeout is over (after our 5 s budget): one write may fail that way too.
    heal()
    local victim = cl:leader()
    local f = drill(victim)
    report("leader " .. victim.name .. " stopped", f)
    check(f, victim, 2)
    f.db:close()
  end)

  it("does not pay for a dead endpoint (a closed port) first in the list after the first call", function()
    heal()
    local dead = "http://127.0.0.1:" .. etcd_server.free_port()
    local prefix = new_prefix()
    local with = assert(etcd.open { endpoints = { dead, cl.urls[1], cl.urls[2], cl.urls[3] }, prefix = prefix })
    local without = assert(etcd.open { endpoints = { cl.urls[1], cl.urls[2], cl.urls[3] }, prefix = prefix })
    local lat = { with = {}, without = {} }
    local t_end = proc.monotonic() + 2
    local i = 0
    while proc.monotonic() < t_end do
      i = i + 1
      for name, db in pairs({ with = with, without = without }) do
        local t = proc.monotonic()
        local res, err
        if i % 2 == 0 then res, err = db:put("k", tostring(i)) else res, err = db:get("k") end
        assert(res or not err, err and err.message)
        local l = lat[name]
        l[#l + 1] = proc.monotonic() - t
      end
    end
    local d = with:endpoints()[1]
    print(string.format("\n  closed port first: %s\n  %s\n  dead endpoint: %d attempt(s) in %d calls (1 at open, " ..
      "then read probes after 0.5 s, 1 s, ...)", phase_line("with", lat.with), phase_line("without", lat.without),
      d.attempts, #lat.with + 1))
    assert.is_false(d.up)
    assert.is_true(d.attempts <= 3, d.attempts .. " attempts")            -- open, probes at ~0.5 s and ~1.5 s
    assert.is_true(percentile(lat.with, 0.99) < percentile(lat.without, 0.99) + 0.05)
    with:close(); without:close()
  end)
end)
