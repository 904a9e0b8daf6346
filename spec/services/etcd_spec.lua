-- services/etcd end to end: real etcd clusters (1, 3 and 5 members) run by a real broker,
-- used through etcdctl with the bindings' credentials.
local Broker = require "spec.support.broker"
local proc = require "forge.proc"
local lfs = require "lfs"

local SVC = "2f3b8f3e-7a51-4b8e-9f5e-0c1d2e3f4a5b"
local P1 = "6a7b8c9d-0e1f-4a2b-8c3d-4e5f6a7b8c9d"
local P3 = "0c6f4f0e-5d2b-4a8e-b3a1-7e9d1c2b3a40"
local P5 = "9e2d7b14-6c3a-4f5e-8d1b-2a7c6e5f4d30"

-- etcdctl as the binding's user (password in the environment) against `endpoints` (default:
-- every endpoint of the credentials). Returns stdout (trimmed), stdout..stderr, exit code.
local function etcdctl(creds, endpoints, ...)
  local argv = { "etcdctl", "--endpoints=" .. table.concat(endpoints or creds.endpoints, ","), "--dial-timeout=3s",
    "--command-timeout=5s", ... }
  local env = { PATH = os.getenv("PATH"), ETCDCTL_API = "3" }
  if creds.username ~= "" then env.ETCDCTL_USER = creds.username .. ":" .. creds.password end
  local r = assert(proc.run { argv = argv, env = env, timeout = 20 })
  return (r.stdout:gsub("%s+$", "")), r.stdout .. r.stderr, r.code
end

local function instance_record(b, id) return b:instance(id) end

local timings = {}
local function timed(label, fn)
  local t0 = proc.monotonic()
  local a, b2, c, d = fn()
  timings[#timings + 1] = string.format("%-26s %6.2f s", label, proc.monotonic() - t0)
  return a, b2, c, d
end

local function provision(b, id, plan)
  return b:call("PUT", "/v2/service_instances/" .. id .. "?accepts_incomplete=true",
    { service_id = SVC, plan_id = plan, organization_guid = "o", space_guid = "s" })
end

local function update(b, id, plan)
  return b:call("PATCH", "/v2/service_instances/" .. id .. "?accepts_incomplete=true",
    { service_id = SVC, plan_id = plan })
end

local function deprovision(b, id, plan)
  return b:call("DELETE", "/v2/service_instances/" .. id .. "?service_id=" .. SVC .. "&plan_id=" .. plan
    .. "&accepts_incomplete=true")
end

local function bind(b, id, bid, plan, params)
  return b:call("PUT", "/v2/service_instances/" .. id .. "/service_bindings/" .. bid,
    { service_id = SVC, plan_id = plan, parameters = params })
end

local function unbind(b, id, bid, plan)
  return b:call("DELETE", "/v2/service_instances/" .. id .. "/service_bindings/" .. bid .. "?service_id=" .. SVC
    .. "&plan_id=" .. plan)
end

-- Provision and wait for it; the instance must be running.
local function provisioned(b, id, plan, label)
  timed("provision " .. label, function()
    local status, raw = provision(b, id, plan)
    assert.equal(202, status, raw)
    local op = b:wait_operation("/v2/service_instances/" .. id, 90)
    assert.equal("succeeded", op.state, op.description)
  end)
  return instance_record(b, id)
end

local function bound(b, id, bid, plan, label)
  local status, raw, _, body = timed("bind " .. label, function() return bind(b, id, bid, plan) end)
  assert.equal(201, status, raw)
  return body.credentials
end

-- Deprovision; nothing of the instance is left: no process, port or directory.
local function gone(b, id, plan, rec)
  timed("deprovision " .. id, function()
    local status, raw = deprovision(b, id, plan)
    assert.equal(202, status, raw)
    local op = b:wait_operation("/v2/service_instances/" .. id, 60)
    assert.equal("succeeded", op.state, op.description)
  end)
  assert.same({}, Broker.marked_pids(b.state_dir, id))
  for _, p in pairs(rec.processes) do assert.is_false(proc.alive(p.pid, p.start_time)) end
  for _, port in ipairs(rec.resources.ports) do assert.is_true(proc.port_free(math.tointeger(port))) end
  assert.is_nil(require("lfs").attributes(b.state_dir .. "/instances/" .. id, "mode"))
end

-- The started members of the cluster, by name, as `member list` shows them.
local function members(creds)
  local out, all, code = etcdctl(creds, nil, "member", "list")
  assert.equal(0, code, all)
  local started = {}
  for line in out:gmatch("[^\n]+") do
    local state, name = line:match("^%x+, (%a+), ([%w-]*),")
    if state == "started" then started[#started + 1] = name end
  end
  table.sort(started)
  return started
end

local function eventually(fn, timeout, what)
  local deadline = proc.monotonic() + (timeout or 20)
  repeat
    local v = fn()
    if v then return v end
    proc.sleep(0.2)
  until proc.monotonic() > deadline
  error("timed out waiting for " .. what)
end

describe("etcd service", function()
  local b
  setup(function() b = Broker.start { pool = 24 } end)
  teardown(function()
    if b then b:cleanup() end
    io.stderr:write("\netcd timings:\n  " .. table.concat(timings, "\n  ") .. "\n")
  end)

  it("offers 1-, 3- and 5-member plans, updateable", function()
    local status, _, _, body = b:call("GET", "/v2/catalog")
    assert.equal(200, status)
    local svc
    for _, s in ipairs(body.services) do if s.id == SVC then svc = s end end
    assert.is_true(svc.plan_updateable)
    local plans = {}
    for _, p in ipairs(svc.plans) do plans[p.name] = p.id; assert.is_nil(p.members) end
    assert.same({ ["1-member"] = P1, ["3-members"] = P3, ["5-members"] = P5 }, plans)
  end)

  it("provisions one member, binds users limited to their prefix, unbinds and deprovisions", function()
    local rec = provisioned(b, "e1", P1, "1-member")
    local c1 = bound(b, "e1", "app1", P1, "1-member")
    local c2 = bound(b, "e1", "app2", P1, "1-member (2nd)")
    assert.same({ string.format("http://127.0.0.1:%d", rec.resources.ports[1]) }, c1.endpoints)
    assert.equal("/app1/", c1.prefix)
    assert.equal("OK", etcdctl(c1, nil, "put", c1.prefix .. "k", "v1"))
    assert.equal(c1.prefix .. "k\nv1", etcdctl(c1, nil, "get", c1.prefix .. "k"))
    -- the same PUT answers 200 with the same credentials
    local again, _, _, abody = bind(b, "e1", "app1", P1)
    assert.equal(200, again)
    assert.same(c1, abody.credentials)
    -- a binding cannot touch another binding's keys, nor work without credentials
    assert.matches("permission denied", select(2, etcdctl(c2, nil, "get", c1.prefix .. "k")))
    assert.matches("permission denied", select(2, etcdctl(c2, nil, "put", c1.prefix .. "k", "x")))
    assert.matches("user name is empty",
      select(2, etcdctl({ endpoints = c1.endpoints, username = "", password = "" }, nil, "get", c1.prefix .. "k")),
      1, true)
    -- a binding may choose its prefix, constrained by a pattern
    local s3, _, _, b3 = bind(b, "e1", "app3", P1, { prefix = "/shared/app3/" })
    assert.equal(201, s3)
    assert.equal("/shared/app3/", b3.credentials.prefix)
    assert.equal("OK", etcdctl(b3.credentials, nil, "put", "/shared/app3/k", "v3"))
    assert.matches("permission denied", select(2, etcdctl(b3.credentials, nil, "put", "/shared/k", "v3")))
    assert.equal(400, (bind(b, "e1", "app4", P1, { prefix = "/" })))
    assert.equal(400, (bind(b, "e1", "app4", P1, { prefix = "/a b/" })))
    assert.equal(400, (bind(b, "e1", "app4", P1, { other = 1 })))
    -- unbind: the credentials stop working, the others keep theirs
    assert.equal(200, (unbind(b, "e1", "app1", P1)))
    assert.matches("authentication failed", select(2, etcdctl(c1, nil, "get", c1.prefix .. "k")))
    assert.equal("OK", etcdctl(c2, nil, "put", c2.prefix .. "k", "v2"))
    assert.equal(200, (unbind(b, "e1", "app3", P1)))
    gone(b, "e1", P1, rec)
  end)

  it("runs 3 members: every endpoint serves, a killed member comes back with the data", function()
    local rec = provisioned(b, "e3", P3, "3-members")
    local creds = bound(b, "e3", "app", P3, "3-members")
    assert.equal(3, #creds.endpoints)
    assert.same({ "member-0", "member-1", "member-2" }, members(creds))
    for i, ep in ipairs(creds.endpoints) do
      assert.equal("OK", etcdctl(creds, { ep }, "put", creds.prefix .. "k" .. i, "v" .. i))
    end
    for _, ep in ipairs(creds.endpoints) do
      for i = 1, 3 do
        assert.equal(creds.prefix .. "k" .. i .. "\nv" .. i, etcdctl(creds, { ep }, "get", creds.prefix .. "k" .. i))
      end
    end

    -- kill -9 one member: the other two keep a quorum, writes go on
    local victim = rec.processes["etcd-1"]
    assert.is_true(proc.kill(victim.pid, victim.start_time, "KILL"))
    local survivors = { creds.endpoints[1], creds.endpoints[3] }
    for i = 1, 5 do
      assert.equal("OK", etcdctl(creds, survivors, "put", creds.prefix .. "during" .. i, "d" .. i))
    end
    assert.equal("OK", etcdctl(creds, nil, "put", creds.prefix .. "all", "endpoints"))
    -- the broker restarts it on its data dir; it catches up with what it missed
    local back = eventually(function()
      local p = instance_record(b, "e3").processes["etcd-1"]
      return p.pid ~= victim.pid and proc.alive(p.pid, p.start_time) and p
    end, 20, "etcd-1 to be restarted")
    local mine = { creds.endpoints[2] }
    eventually(function()
      return etcdctl(creds, mine, "get", "--consistency=s", creds.prefix .. "during5") == creds.prefix .. "during5\nd5"
    end, 20, "etcd-1 to catch up")
    assert.equal(creds.prefix .. "k1\nv1", etcdctl(creds, mine, "get", "--consistency=s", creds.prefix .. "k1"))
    assert.equal("OK", etcdctl(creds, mine, "put", creds.prefix .. "after", "restart"))
    assert.same({ "member-0", "member-1", "member-2" }, members(creds))
    assert.equal(back.pid, instance_record(b, "e3").processes["etcd-1"].pid)
    assert.equal(200, (unbind(b, "e3", "app", P3)))
    gone(b, "e3", P3, instance_record(b, "e3"))
  end)

  it("provisions 5 members from a static initial cluster", function()
    local rec = provisioned(b, "e5", P5, "5-members")
    local creds = bound(b, "e5", "app", P5, "5-members")
    assert.equal(5, #creds.endpoints)
    assert.same({ "member-0", "member-1", "member-2", "member-3", "member-4" }, members(creds))
    assert.equal("OK", etcdctl(creds, { creds.endpoints[5] }, "put", creds.prefix .. "k", "five"))
    assert.equal(creds.prefix .. "k\nfive", etcdctl(creds, { creds.endpoints[1] }, "get", creds.prefix .. "k"))
    gone(b, "e5", P5, rec)
  end)

  it("grows 1 -> 3 -> 5 members keeping the data, and refuses to shrink", function()
    provisioned(b, "eg", P1, "1-member (to grow)")
    local creds = bound(b, "eg", "app", P1, "1-member (to grow)")
    assert.equal("OK", etcdctl(creds, nil, "put", creds.prefix .. "k", "before"))

    local function grow(plan, n)
      timed("update to " .. n .. " members", function()
        local status, raw = update(b, "eg", plan)
        assert.equal(202, status, raw)
        local op = b:wait_operation("/v2/service_instances/eg", 90)
        assert.equal("succeeded", op.state, op.description)
      end)
      local rec = instance_record(b, "eg")
      assert.equal(2 * n, #rec.resources.ports)
      local eps = {}
      for i = 1, n do eps[i] = string.format("http://127.0.0.1:%d", rec.resources.ports[2 * i - 1]) end
      -- the binding was re-applied: its user works through every member, the data is there
      local all = { endpoints = eps, username = creds.username, password = creds.password }
      local want = {}
      for i = 1, n do want[i] = "member-" .. (i - 1) end
      assert.same(want, members(all))
      for _, ep in ipairs(eps) do
        assert.equal(creds.prefix .. "k\nbefore", etcdctl(all, { ep }, "get", creds.prefix .. "k"))
      end
      assert.equal("OK", etcdctl(all, nil, "put", creds.prefix .. "k" .. n, "at " .. n))
      assert.equal(n, #Broker.marked_pids(b.state_dir, "eg"))
      return all
    end
    grow(P3, 3)
    local all = grow(P5, 5)
    assert.equal(creds.prefix .. "k3\nat 3", etcdctl(all, nil, "get", creds.prefix .. "k3"))
    -- a new binding lists all five members
    local fresh = bound(b, "eg", "app5", P5, "5-members (grown)")
    assert.same(all.endpoints, fresh.endpoints)
    -- each joining member's init is safe to run again (a broker crash before its record):
    -- etcd refuses the second `member add` with an answer the init tolerates
    local grown = instance_record(b, "eg")
    for i = 4, 5 do
      local cmd = grown.deployment.processes[i].init[1]
      assert.matches("/data/member/wal$", cmd.creates)
      local env = { PATH = os.getenv("PATH") }
      for k, v in pairs(cmd.env) do env[k] = v end
      local r = assert(proc.run { argv = cmd.argv, env = env, timeout = 20 })
      assert.are_not.equal(0, r.code)
      local out, tolerated = r.stdout .. r.stderr, false
      for _, pattern in ipairs(cmd.tolerate) do tolerated = tolerated or out:match(pattern) ~= nil end
      assert.is_true(tolerated, out)
    end
    assert.same({ "member-0", "member-1", "member-2", "member-3", "member-4" }, members(all))

    -- shrinking is refused before anything changes
    local before = instance_record(b, "eg")
    local status, raw, _, body = update(b, "eg", P3)
    assert.equal(422, status, raw)
    assert.equal("PlanChangeNotSupported", body.error)
    assert.matches("etcd cannot shrink a cluster: plan 3-members has 3 member(s), the instance runs 5", body.description,
      1, true)
    assert.equal(422, (update(b, "eg", P1)))
    local after = instance_record(b, "eg")
    assert.equal(P5, after.plan_id)
    assert.same(before.processes, after.processes)
    assert.equal("OK", etcdctl(all, nil, "put", creds.prefix .. "k", "after"))
    gone(b, "eg", P5, after)
  end)

  it("resumes a growth 1 -> 3 after the broker is killed mid-update, one etcd per member", function()
    provisioned(b, "ek", P1, "1-member (to crash)")
    local creds = bound(b, "ek", "app", P1, "1-member (to crash)")
    assert.equal("OK", etcdctl(creds, nil, "put", creds.prefix .. "k", "kept"))
    assert.equal(202, (update(b, "ek", P3)))
    -- kill -9 the broker as the first member is back: the second one is being added
    eventually(function()
      local r = instance_record(b, "ek")
      return r.operation.stopped and r.processes["etcd-0"] and r.processes["etcd-0"].healthy
    end, 20, "etcd-0 to be healthy in the new deployment")
    b:stop("KILL")
    b:launch()
    local op = b:wait_operation("/v2/service_instances/ek", 90)
    assert.equal("succeeded", op.state, op.description)
    local rec = instance_record(b, "ek")
    local live = Broker.marked_pids(b.state_dir, "ek")
    assert.equal(3, #live)
    local recorded = {}
    for name, p in pairs(rec.processes) do
      assert.is_true(proc.alive(p.pid, p.start_time), name)
      recorded[p.pid] = name
    end
    for _, pid in ipairs(live) do assert.is_string(recorded[pid]) end
    local eps = {}
    for i = 1, 3 do eps[i] = string.format("http://127.0.0.1:%d", rec.resources.ports[2 * i - 1]) end
    local all = { endpoints = eps, username = creds.username, password = creds.password }
    assert.same({ "member-0", "member-1", "member-2" }, members(all))
    for _, ep in ipairs(eps) do
      assert.equal(creds.prefix .. "k\nkept", etcdctl(all, { ep }, "get", creds.prefix .. "k"))
    end
    gone(b, "ek", P3, rec)
  end)

  it("hands a member's directory made just before a crash to the service user", function()
    -- a member's directory is made at its spawn (it has no files), under the broker's umask
    local dying = Broker.start { env = { FORGE_FAILPOINT = "after_mkdir" } }
    finally(function() dying:cleanup() end)
    assert.equal(202, (provision(dying, "gap", P1)))
    assert.equal(99, proc.wait(dying.pid, 20).code)
    local dir = dying.state_dir .. "/instances/gap/etcd-0"
    assert.equal(0, lfs.attributes(dir, "uid"))
    dying.env.FORGE_FAILPOINT = nil
    dying:launch()
    local op = dying:wait_operation("/v2/service_instances/gap", 60)
    assert.equal("succeeded", op.state, op.description)
    assert.not_equal(0, lfs.attributes(dir, "uid"))
    gone(dying, "gap", P1, instance_record(dying, "gap"))
  end)

  it("finishes a 3-member provision after the broker is killed mid-way, one etcd per member", function()
    assert.equal(202, (provision(b, "ec", P3)))
    -- kill -9 the broker once it has spawned a member, while the cluster is not ready yet
    eventually(function() return next((instance_record(b, "ec") or {}).processes or {}) end, 10,
      "a member to be spawned")
    b:stop("KILL")
    assert.equal("in progress", instance_record(b, "ec").operation.state)
    b:launch()
    local op = b:wait_operation("/v2/service_instances/ec", 90)
    assert.equal("succeeded", op.state, op.description)
    local rec = instance_record(b, "ec")
    assert.equal("running", rec.state)
    local live = Broker.marked_pids(b.state_dir, "ec")
    assert.equal(3, #live)
    local recorded = {}
    for name, p in pairs(rec.processes) do
      assert.is_true(proc.alive(p.pid, p.start_time), name)
      recorded[p.pid] = name
    end
    for _, pid in ipairs(live) do assert.is_string(recorded[pid]) end
    local creds = bound(b, "ec", "app", P3, "3-members (after crash)")
    assert.same({ "member-0", "member-1", "member-2" }, members(creds))
    assert.equal("OK", etcdctl(creds, nil, "put", creds.prefix .. "k", "v"))
    gone(b, "ec", P3, rec)
  end)
end)
