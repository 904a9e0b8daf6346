-- The reconciler's housekeeping reads only what is due: tombstones and gone markers expire by
-- an index of their times, ports held by an outsider by their hold's end, interrupted sync
-- binds from the index of binds in flight, and local processes are supervised per instance on
-- a due-time schedule. Records stored before the indexes existed are indexed once at start.
local Broker = require "spec.support.broker"
local Reconciler = require "forge.reconciler"
local Schedule = require "forge.schedule"
local model = require "forge.model"
local proc = require "forge.proc"
local store = require "forge.store"
local targets = require "forge.targets"
local util = require "forge.util"

local D = Broker.dummy

-- The defaults, with the TTLs the cases count from.
local function config(dir)
  local c = assert(require("forge.config").load(nil, function(name)
    return ({ FORGE_STATE_DIR = dir })[name]
  end))
  c.tombstone_ttl, c.gone_ttl = 3600, 600
  return c
end

local function keys(db, prefix)
  local out = {}
  for _, kv in ipairs(assert(db:range(prefix))) do out[#out + 1] = kv.key end
  return out
end

local function put(db, k, rec) assert(model.txn(db, { success = { model.put(k, rec) } })) end

local function instance(id, state, extra)
  local r = { id = id, service = "dummy", plan = "small", target = "local", state = state,
    operation = { id = "op-" .. id, type = "provision", state = "succeeded" } }
  for k, v in pairs(extra or {}) do r[k] = v end
  return r
end

-- A store wrapper counting the rows every read returns (what a pass costs).
local function counting(db)
  local counter = { rows = 0 }
  counter.db = setmetatable({}, { __index = function(_, name)
    return function(_, ...)
      local a, b = db[name](db, ...)
      if name == "range" and a then counter.rows = counter.rows + #a end
      if name == "get" then counter.rows = counter.rows + 1 end
      return a, b
    end
  end })
  return counter
end

describe("schedule", function()
  it("hands out members due by now, earliest first, once each", function()
    local s = Schedule.new()
    s:set("c", 30); s:set("a", 10); s:set("b", 20); s:set("d", 40)
    s:set("d", 5)                                   -- moved earlier
    s:remove("b")
    assert.equal("d", s:pop(25)); assert.equal("a", s:pop(25)); assert.is_nil(s:pop(25))
    assert.equal("c", s:pop(30)); assert.is_nil(s:pop(100))
    assert.is_false(s:has("c"))
  end)

  it("keeps order over many members", function()
    local s = Schedule.new()
    for i = 1, 500 do s:set("m" .. i, (i * 7919) % 1000) end
    local last = -1
    for _ = 1, 500 do
      local m = assert(s:pop(1000))
      local t = (tonumber(m:sub(2)) * 7919) % 1000
      assert.is_true(t >= last)
      last = t
    end
    assert.is_nil(s:pop(1000))
  end)
end)

describe("housekeeping", function()
  local dir, db, r

  before_each(function()
    dir = Broker.tmpdir()
    db = assert(store.open(dir .. "/forge.db"))
    r = Reconciler.new(config(dir), db, { by_id = {} }, targets.new(config(dir), dir))
    r:start_up()
  end)

  after_each(function()
    db:close()
    os.execute("rm -rf '" .. dir .. "'")
  end)

  it("turns a tombstone past its TTL into a gone marker, and expires the marker", function()
    local t0 = os.time()
    put(db, "instance/i1", instance("i1", "deleted", { deleted_at = t0 }))
    put(db, "binding/i1/b1", { id = "b1", instance_id = "i1", state = "deleted", deleted_at = t0,
      operation = { state = "succeeded" } })
    r:housekeeping(t0 + 3600)
    assert.is_table(db:get("instance/i1"))          -- not yet
    r:housekeeping(t0 + 3601)
    assert.is_nil(db:get("instance/i1"))
    assert.is_nil(db:get("binding/i1/b1"))
    assert.same({ "gone/i1", "gone/i1/b1" }, keys(db, "gone/"))
    assert.same({}, keys(db, "due/tombstone/"))
    r:housekeeping(t0 + 3600 + 600)
    assert.equal(2, #keys(db, "gone/"))
    r:housekeeping(t0 + 3600 + 601)
    assert.same({}, keys(db, "gone/"))
    assert.same({}, keys(db, "due/"))
  end)

  it("keeps a record provisioned again over its tombstone, and drops the stale entry", function()
    local t0 = os.time()
    put(db, "instance/i2", instance("i2", "deleted", { deleted_at = t0 }))
    put(db, "instance/i2", instance("i2", "running"))
    r:housekeeping(t0 + 4000)
    assert.equal("running", model.read(db, "instance/i2").state)
    assert.same({}, keys(db, "due/"))
  end)

  it("keeps an instance's manifest out of its record, and drops it with the tombstone", function()
    put(db, "instance/m1", instance("m1", "running", { manifest = "name: m1\n" }))
    assert.is_nil(model.read(db, "instance/m1").manifest)
    assert.equal("name: m1\n", model.manifest(db, "m1"))
    model.update(db, "instance/m1", function(rec) rec.state = "failed" end)
    assert.equal("name: m1\n", model.manifest(db, "m1"))
    model.update(db, "instance/m1", function(rec) rec.state, rec.deleted_at = "deleted", os.time() end)
    assert.is_nil(model.manifest(db, "m1"))
  end)

  it("frees a port held by an outsider when its hold ends", function()
    local t0 = os.time()
    put(db, model.key.port(31000), { outsider = true, until_ = t0 + 10 })
    r:housekeeping(t0 + 10)
    assert.is_table(db:get(model.key.port(31000)))
    r:housekeeping(t0 + 11)
    assert.is_nil(db:get(model.key.port(31000)))
    assert.same({}, keys(db, "due/"))
  end)

  it("undoes a sync bind whose broker died, and forgets binds that finished", function()
    local t0 = os.time()
    local function bind(bid, state, age)
      return { id = bid, instance_id = "gone-instance", state = state, updated_at = t0 - age,
        operation = { type = "bind", state = state == "creating" and "in progress" or "succeeded" } }
    end
    put(db, "binding/gone-instance/old", bind("old", "creating", 300))
    put(db, "binding/gone-instance/young", bind("young", "creating", 10))
    put(db, "binding/gone-instance/done", bind("done", "creating", 300))
    put(db, "binding/gone-instance/done", bind("done", "created", 300))   -- the same txn drops its entry
    assert.same({ "creating/gone-instance/old", "creating/gone-instance/young" }, keys(db, "creating/"))
    r:housekeeping(t0)
    assert.is_nil(db:get("binding/gone-instance/old"))
    assert.same({ "creating/gone-instance/young" }, keys(db, "creating/"))
    assert.is_table(db:get("binding/gone-instance/done"))
  end)

  it("indexes records stored before the indexes existed, once", function()
    local t0 = os.time()
    db:close()
    os.execute("rm -rf '" .. dir .. "' && mkdir -p '" .. dir .. "'")
    db = assert(store.open(dir .. "/forge.db"))
    local old = instance("i3", "deleted", { deleted_at = t0 })
    assert(db:txn { success = { { op = "put", key = "instance/i3", value = util.json_encode(old) },
      { op = "put", key = "gone/i4", value = util.json_encode({ deleted_at = t0 }) } } })
    r = Reconciler.new(config(dir), db, { by_id = {} }, targets.new(config(dir), dir))
    r:start_up()
    assert.same({ model.key.due("gone", t0, "i4"), model.key.due("tombstone", t0, "instance/i3") }, keys(db, "due/"))
    assert.is_table(db:get("index/housekeeping"))
    r:housekeeping(t0 + 3601)
    assert.same({ "gone/i3", "gone/i4" }, keys(db, "gone/"))
  end)

  it("reads a bounded number of rows per pass however much is stored", function()
    local t0 = os.time()
    local ops = {}
    for i = 1, 3000 do
      ops[#ops + 1] = model.put("instance/n" .. i, instance("n" .. i, i % 3 == 0 and "deleted" or "running",
        { deleted_at = t0, target = "bosh" }))
      ops[#ops + 1] = model.put("binding/n" .. i .. "/b", { id = "b", instance_id = "n" .. i, state = "created",
        operation = { state = "succeeded" } })
      if #ops >= 100 then assert(model.txn(db, { success = ops })); ops = {} end
    end
    local c = counting(db)
    r.db = c.db
    r:housekeeping(t0 + 60)                          -- 1,000 tombstones, none due
    assert.is_true(c.rows <= 3 * 16, "rows read: " .. c.rows)
    c.rows = 0
    r:housekeeping(t0 + 3601)                        -- all due: one sweep's worth per pass
    assert.is_true(c.rows <= 256 * 17 + 3 * 16, "rows read: " .. c.rows)
    assert.equal(1000 - 256, #keys(db, "due/tombstone/"))
  end)
end)

describe("supervision", function()
  local b
  setup(function() b = Broker.start { fixtures = true } end)
  teardown(function() if b then b:stop() end end)

  it("restarts a killed process of a running local instance, and stops watching it once deleted", function()
    local status = b:call("PUT", "/v2/service_instances/sv1", { service_id = D.service, plan_id = D.small,
      organization_guid = "o", space_guid = "s" })
    assert.equal(201, status)
    local before = b:instance("sv1")
    local name, p = next(before.processes)
    assert.is_string(b:records(true)["supervised/sv1"])
    assert.is_true(proc.kill(p.pid, p.start_time, "KILL"))
    local after = Broker.wait_for(function()
      local rec = b:instance("sv1")
      local np = rec.processes[name]
      return np.pid ~= p.pid and np.pid ~= 0 and proc.alive(np.pid, np.start_time) and rec
    end, 15)
    assert.is_table(after, "not restarted:\n" .. b:read_log())
    assert.matches("restarted %(1 restart%)", after.operation.description)
    assert.equal(200, (b:call("DELETE", "/v2/service_instances/sv1?service_id=" .. D.service .. "&plan_id=" .. D.small)))
    assert.is_truthy(Broker.wait_for(function() return b:records(true)["supervised/sv1"] == nil end, 10))
  end)
end)

describe("an idle broker", function()
  local files = require "spec.support.files"
  local lfs = require "lfs"

  -- The voluntary context switches of every thread of process pid: how often its threads slept.
  local function wakeups(pid)
    local n = 0
    for task in lfs.dir("/proc/" .. pid .. "/task") do
      if task:match("^%d+$") then
        local status = files.read("/proc/" .. pid .. "/task/" .. task .. "/status")
        n = n + tonumber(status:match("voluntary_ctxt_switches:%s*(%d+)") or 0)
      end
    end
    return n
  end

  it("sleeps between its supervision passes instead of polling", function()
    local b = Broker.start()
    finally(function() b:cleanup() end)
    proc.sleep(1)                                    -- past the start-up passes
    local before = wakeups(b.pid)
    proc.sleep(4)
    local woke = wakeups(b.pid) - before
    -- two passes of supervise_interval = 2 s; the polling loops woke about 400 times
    assert.is_true(woke < 40, "its threads woke " .. woke .. " times in 4 s")
  end)

  it("starts a requested operation at once, not at its next supervision pass", function()
    local b = Broker.start { fixtures = true, config = "supervise_interval: 3600\n" }
    finally(function() b:cleanup() end)
    proc.sleep(1)
    b:provision_async("kick1", D.service, D.small)
    assert.equal("succeeded", b:settle("kick1", 30).operation.state)
  end)
end)
