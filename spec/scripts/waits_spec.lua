-- Sync operations (no accepts_incomplete) wait for the reconciler without holding an HTTP
-- worker: forge.http parks the connection and its waiter thread polls forge.app.poll until the
-- operation ends or sync_timeout passes. Real broker with 4 worker threads, and a fixture
-- service whose deploy takes seconds (spec/fixtures/waits/slow: its health check fails until
-- the process has slept `delay` seconds).
local Broker = require "spec.support.broker"
local cjson = require "cjson"
local files = require "spec.support.files"
local lfs = require "lfs"
local proc = require "forge.proc"

local SVC, PLAN = "5a0e5a0e-0000-4000-8000-000000000001", "5a0e5a0e-0000-4000-8000-000000000010"
local SYNC_TIMEOUT = 15

local b

local function q(s) return "'" .. tostring(s):gsub("'", "'\\''") .. "'" end

local function inst(id) return "/v2/service_instances/" .. id end

local function provision_body(delay, crash)
  return cjson.encode { service_id = SVC, plan_id = PLAN, organization_guid = "org", space_guid = "space",
    parameters = { delay = delay, crash = crash } }
end

-- Sync provisions of `ids` (each healthy after `delay` s), all at once, in the background: one
-- curl with a connection per request. Returns {pid=, start=, out=, dir=}.
local function spawn_provisions(ids, delay, max_time)
  local dir = Broker.tmpdir()
  files.write(dir .. "/body", provision_body(delay))
  local cfg = {}
  for i, id in ipairs(ids) do
    if i > 1 then cfg[#cfg + 1] = "next" end
    cfg[#cfg + 1] = string.format('url = "%s"', b:url(inst(id)))
    cfg[#cfg + 1] = 'request = "PUT"'
    cfg[#cfg + 1] = string.format('user = "%s:%s"', b.user, b.password)
    cfg[#cfg + 1] = 'header = "X-Broker-API-Version: 2.17"'
    cfg[#cfg + 1] = 'header = "Content-Type: application/json"'
    cfg[#cfg + 1] = string.format('data-binary = "@%s/body"', dir)
    cfg[#cfg + 1] = string.format('output = "%s/%s.json"', dir, id)
    cfg[#cfg + 1] = string.format('write-out = "%s %%{http_code} %%{time_total}\\n"', id)
    cfg[#cfg + 1] = string.format('max-time = "%s"', max_time or 60)
  end
  files.write(dir .. "/config", table.concat(cfg, "\n") .. "\n")
  local p = assert(proc.spawn { argv = { "curl", "-s", "--parallel", "--parallel-immediate", "--parallel-max", "64",
    "-K", dir .. "/config" }, stdout = dir .. "/out" })
  return { pid = p.pid, start = p.start_time, out = dir .. "/out", dir = dir }
end

-- Wait for the background provisions; id -> {status=, took=, body=}.
local function finish(c, seconds)
  if not proc.wait(c.pid, seconds) then
    proc.kill(c.pid, c.start, "KILL")
    proc.wait(c.pid, 5)
  end
  local results = {}
  for id, code, took in files.read(c.out):gmatch("(%S+) (%d+) ([%d.]+)\n") do
    local raw = files.read(c.dir .. "/" .. id .. ".json")
    results[id] = { status = tonumber(code), took = tonumber(took), body = raw ~= "" and cjson.decode(raw) or nil }
  end
  os.execute("rm -rf " .. q(c.dir))
  return results
end

-- How many of `ids` have a provision in progress in the store.
local function in_progress(ids)
  local db = b:store()
  local n = 0
  for _, id in ipairs(ids) do
    local kv = db:get("instance/" .. id)
    local rec = kv and cjson.decode(kv.value)
    if rec and rec.operation.type == "provision" and rec.operation.state == "in progress" then n = n + 1 end
  end
  db:close()
  return n
end

local function eventually(cond, seconds)
  local deadline = proc.monotonic() + seconds
  repeat
    if cond() then return true end
    proc.sleep(0.05)
  until proc.monotonic() > deadline
  return cond()
end

-- GET /v2/catalog as curl measures it: status, seconds.
local function timed_catalog()
  local p = io.popen("curl -s -o /dev/null --max-time 60 -w '%{http_code} %{time_total}' -u " ..
    q(b.user .. ":" .. b.password) .. " -H 'X-Broker-API-Version: 2.17' " .. q(b:url("/v2/catalog")))
  local code, took = p:read("a"):match("(%d+) ([%d.]+)")
  p:close()
  return tonumber(code), tonumber(took)
end

-- The broker's open sockets.
local function sockets()
  local n = 0
  for fd in lfs.dir("/proc/" .. b.pid .. "/fd") do
    if (lfs.symlinkattributes("/proc/" .. b.pid .. "/fd/" .. fd, "target") or ""):match("^socket:") then n = n + 1 end
  end
  return n
end

-- The broker's open sockets once the count holds still for 0.3 s (earlier clients' are closed).
local function settled_sockets()
  local n, since = sockets(), proc.monotonic()
  while proc.monotonic() - since < 0.3 do
    proc.sleep(0.05)
    local now = sockets()
    if now ~= n then n, since = now, proc.monotonic() end
  end
  return n
end

local function ids(prefix, n)
  local t = {}
  for i = 1, n do t[i] = prefix .. "-" .. i end
  return t
end

setup(function()
  b = Broker.start { services_dir = os.getenv("PWD") .. "/spec/fixtures/waits", pool = 40,
    env = { FORGE_THREADS = "4", FORGE_SYNC_TIMEOUT = tostring(SYNC_TIMEOUT), FORGE_LOCAL_COMMANDS = "sh,sleep" } }
end)
teardown(function() if b then b:cleanup() end end)

describe("sync operations", function()
  it("leave the workers free: the catalog answers while 16 wait on 4 threads, and each gets its 201", function()
    local wanted = ids("sync", 16)
    local c = spawn_provisions(wanted, 3)
    local pending = eventually(function() return in_progress(wanted) == 16 end, 10)
    local worst, statuses = 0, {}
    for i = 1, 5 do
      local status, took = timed_catalog()
      statuses[i], worst = status, math.max(worst, took)
    end
    local still = in_progress(wanted)
    local results = finish(c, 60)
    print(string.format("\n  waits: GET /v2/catalog took at most %.1f ms (5 tries) with %d sync provisions waiting",
      worst * 1000, still))
    assert.is_true(pending, "the 16 provisions were not all in progress at once")
    assert.equal(16, still, "some provisions ended before the catalog was measured")
    assert.same({ 200, 200, 200, 200, 200 }, statuses)
    for _, id in ipairs(wanted) do
      local r = results[id]
      assert.is_table(r, id .. " got no answer")
      assert.equal(201, r.status, id)
      assert.equal(b:url("/service_instances/" .. id), r.body.dashboard_url)
      assert.is_nil(r.body.operation)
      assert.is_true(r.took >= 1.5, id .. " answered after " .. r.took .. " s, before its operation ended")
    end
  end)

  it("keep the connection alive after the answer", function()
    local body = files.temp(provision_body(1))
    finally(function() os.remove(body) end)
    local auth = " -u " .. q(b.user .. ":" .. b.password) .. " -H 'X-Broker-API-Version: 2.17'"
    local p = io.popen("curl -sv" .. auth .. " -H 'Content-Type: application/json' -X PUT --data-binary @" .. body ..
      " -o /dev/null " .. q(b:url(inst("alive"))) .. " --next -s" .. auth .. " -o /dev/null " ..
      q(b:url("/v2/catalog")) .. " 2>&1")
    local out = p:read("a")
    p:close()
    assert.matches("< HTTP/1.1 201", out)
    assert.matches("Re%-using existing connection", out)
    assert.is_nil(out:lower():find("connection: close", 1, true), out)
  end)

  it("answer a sync deprovision with 200 once it is done", function()
    assert.equal(201, (b:call("PUT", inst("gone"), provision_body(0))))
    local status, raw = b:call("DELETE", inst("gone") .. "?service_id=" .. SVC .. "&plan_id=" .. PLAN)
    assert.equal(200, status, raw)
    assert.equal("{}", raw)
    local _, _, _, op = b:call("GET", inst("gone") .. "/last_operation")
    assert.equal("succeeded", op.state)
  end)

  it("answer a failed operation with 500 OperationFailed, as forge.broker answers any request", function()
    local status, _, hdrs, json = b:call("PUT", inst("crash"), provision_body(600, true),
      { ["X-Broker-API-Request-Identity"] = "rid-crash" })
    assert.equal(500, status)
    assert.equal("OperationFailed", json.error)
    assert.matches("exited during start%-up", json.description)
    assert.equal("rid-crash", hdrs["x-broker-api-request-identity"])
    assert.is_string(hdrs["x-request-id"])
  end)

  it("answer 504 once the operation outlives sync_timeout; the operation goes on", function()
    local status, _, _, json = b:call("PUT", inst("late"), provision_body(600))
    assert.equal(504, status)
    assert.equal("Timeout", json.error)
    assert.matches("still running after " .. SYNC_TIMEOUT .. "s", json.description)
    local _, _, _, op = b:call("GET", inst("late") .. "/last_operation")
    assert.equal("in progress", op.state)
  end)

  it("forget a client that gives up mid-wait", function()
    local before = settled_sockets()
    local r = proc.run { argv = { "curl", "-s", "--max-time", "1", "-u", b.user .. ":" .. b.password, "-X", "PUT",
      "-H", "X-Broker-API-Version: 2.17", "-H", "Content-Type: application/json", "--data-binary",
      provision_body(600), b:url(inst("quitter")) }, timeout = 10 }
    assert.equal(28, r.code) -- curl: operation timed out
    -- its socket is closed long before sync_timeout would have ended the wait
    assert.is_true(eventually(function() return sockets() <= before end, SYNC_TIMEOUT / 3),
      "the broker kept the connection")
    assert.equal(200, (timed_catalog()))
    local _, _, _, op = b:call("GET", inst("quitter") .. "/last_operation")
    assert.equal("in progress", op.state)
    assert.is_nil(b:read_log():find("request handler raised", 1, true))
  end)

  it("are answered when the broker stops, and do not hold the stop up", function()
    local wanted = ids("stop", 3)
    local c = spawn_provisions(wanted, 600)
    assert.is_true(eventually(function() return in_progress(wanted) == 3 end, 10))
    proc.sleep(0.2) -- parked
    local t0 = proc.monotonic()
    local w = b:stop("TERM")
    local took = proc.monotonic() - t0
    local results = finish(c, 10)
    print(string.format("\n  waits: the broker stopped in %.2f s with 3 sync provisions waiting", took))
    assert.equal(0, w.code)
    for _, id in ipairs(wanted) do
      assert.equal(504, results[id].status, id)
      assert.equal("Timeout", results[id].body.error)
      assert.matches("the broker is stopping", results[id].body.description)
    end
    assert.matches('"in_flight":3', b:read_log())
  end)
end)
