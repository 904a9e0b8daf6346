-- The walking skeleton end to end: a real broker provisions, binds and removes real redis.
local Broker = require "spec.support.broker"
local proc = require "forge.proc"

local R = Broker.redis

local function redis_cli(creds, ...)
  local args = { "redis-cli", "-h", creds.host, "-p", tostring(creds.port), "--user", creds.username,
    "--no-auth-warning", ... }
  for i, a in ipairs(args) do args[i] = "'" .. tostring(a) .. "'" end
  local p = io.popen("REDISCLI_AUTH='" .. creds.password .. "' " .. table.concat(args, " ") .. " 2>&1")
  local out = p:read("a")
  p:close()
  return (out:gsub("%s+$", ""))
end

local function instance_record(b, id) return b:instance(id) end

local function provision(b, id, plan)
  return b:call("PUT", "/v2/service_instances/" .. id .. "?accepts_incomplete=true",
    { service_id = R.service, plan_id = plan, organization_guid = "org", space_guid = "space" })
end

local function deprovision(b, id, plan)
  return b:call("DELETE", string.format("/v2/service_instances/%s?service_id=%s&plan_id=%s&accepts_incomplete=true",
    id, R.service, plan))
end

local function bind(b, id, bid, plan)
  return b:call("PUT", "/v2/service_instances/" .. id .. "/service_bindings/" .. bid,
    { service_id = R.service, plan_id = plan })
end

local function unbind(b, id, bid, plan)
  return b:call("DELETE", string.format("/v2/service_instances/%s/service_bindings/%s?service_id=%s&plan_id=%s",
    id, bid, R.service, plan))
end

local function pids_of(rec)
  local pids = {}
  for name, p in pairs(rec.processes or {}) do pids[name] = p end
  return pids
end

describe("redis on the local target", function()
  local b

  setup(function() b = Broker.start() end)
  teardown(function() if b then b:cleanup() end end)

  it("serves the catalog with both plans", function()
    local status, _, _, body = b:call("GET", "/v2/catalog")
    assert.equal(200, status)
    local svc
    for _, s in ipairs(body.services) do if s.name == "redis" then svc = s end end
    assert.is_table(svc)
    assert.equal(R.service, svc.id)
    local names = {}
    for _, p in ipairs(svc.plans) do names[p.name] = p.id; assert.is_nil(p.nodes) end
    assert.same({ ["1-server"] = R.one, ["3-servers"] = R.three }, names)
  end)

  it("provisions, binds, unbinds and deprovisions a 1-server instance", function()
    local status, _, _, body = provision(b, "r1", R.one)
    assert.equal(202, status)
    assert.is_string(body.operation)
    assert.matches("/service_instances/r1$", body.dashboard_url)
    local op = b:wait_operation("/v2/service_instances/r1")
    assert.equal("succeeded", op.state)

    local rec = instance_record(b, "r1")
    assert.equal("running", rec.state)
    local pid = rec.processes["redis-0"]
    assert.is_true(proc.alive(pid.pid, pid.start_time))

    local bstatus, _, _, bbody = bind(b, "r1", "b1", R.one)
    assert.equal(201, bstatus)
    local creds = bbody.credentials
    assert.equal("PONG", redis_cli(creds, "PING"))
    assert.equal("OK", redis_cli(creds, "SET", "k", "v"))
    assert.equal("v", redis_cli(creds, "GET", "k"))
    -- the identical PUT answers 200 with the same credentials
    local again, _, _, abody = bind(b, "r1", "b1", R.one)
    assert.equal(200, again)
    assert.same(creds, abody.credentials)

    assert.equal(200, (unbind(b, "r1", "b1", R.one)))
    assert.matches("WRONGPASS", redis_cli(creds, "PING"))
    assert.equal(410, (unbind(b, "r1", "b1", R.one)))

    local dstatus, _, _, dbody = deprovision(b, "r1", R.one)
    assert.equal(202, dstatus)
    assert.is_string(dbody.operation)
    assert.equal("succeeded", b:wait_operation("/v2/service_instances/r1").state)
    assert.is_false(proc.alive(pid.pid, pid.start_time))
    assert.is_true(proc.port_free(rec.resources.ports[1]))
    assert.is_nil(io.open(b.state_dir .. "/instances/r1/redis-0/redis.conf"))
    assert.equal(410, (deprovision(b, "r1", R.one)))
  end)

  it("runs 3-servers as a primary with two replicas, credentials listing every host", function()
    assert.equal(202, (provision(b, "r3", R.three)))
    assert.equal("succeeded", b:wait_operation("/v2/service_instances/r3").state)
    -- 3-servers binds asynchronously: 202, poll the binding's last_operation, then fetch it
    local status = b:call("PUT", "/v2/service_instances/r3/service_bindings/b3?accepts_incomplete=true",
      { service_id = R.service, plan_id = R.three })
    assert.equal(202, status)
    assert.equal("succeeded", b:wait_operation("/v2/service_instances/r3/service_bindings/b3").state)
    local _, _, _, body = b:call("GET", "/v2/service_instances/r3/service_bindings/b3")
    local creds = body.credentials
    assert.equal(3, #creds.hosts)
    assert.equal("OK", redis_cli(creds, "SET", "rk", "replicated"))
    -- every node knows the binding's user and the replicas follow the primary
    for _, hostport in ipairs(creds.hosts) do
      local host, port = hostport:match("^(.*):(%d+)$")
      local node = { host = host, port = tonumber(port), username = creds.username, password = creds.password }
      assert.equal("PONG", redis_cli(node, "PING"))
      local deadline = proc.monotonic() + 10
      while redis_cli(node, "GET", "rk") ~= "replicated" and proc.monotonic() < deadline do proc.sleep(0.1) end
      assert.equal("replicated", redis_cli(node, "GET", "rk"))
    end
    assert.equal(200, (unbind(b, "r3", "b3", R.three)))
    assert.equal(202, (deprovision(b, "r3", R.three)))
    assert.equal("succeeded", b:wait_operation("/v2/service_instances/r3").state)
    assert.same({}, Broker.marked_pids(b.state_dir, "r3"))
  end)

  it("keeps end-user parameters out of redis.conf: every plan has a schema, values are rendered safely", function()
    local before = b:records()
    local evil = "noeviction\nenable-debug-command yes\nbind 127.0.0.1 127.0.0.2\ndir /tmp/x"
    for _, plan in ipairs({ R.one, R.three }) do
      local status, _, _, body = b:call("PUT", "/v2/service_instances/evil?accepts_incomplete=true",
        { service_id = R.service, plan_id = plan, organization_guid = "org", space_guid = "space",
          parameters = { maxmemory_policy = evil } })
      assert.equal(400, status)
      assert.matches("parameters%.maxmemory_policy", body.description)
    end
    assert.same(before, b:records())
    -- a value that passes the schema still reaches the file only as one quoted argument
    assert.equal(202, (b:call("PUT", "/v2/service_instances/mm?accepts_incomplete=true", { service_id = R.service,
      plan_id = R.one, organization_guid = "org", space_guid = "space", parameters = { maxmemory_mb = 64 } })))
    assert.equal("succeeded", b:wait_operation("/v2/service_instances/mm", 30).state)
    local conf = require("spec.support.files").read(b.state_dir .. "/instances/mm/redis-0/redis.conf")
    assert.matches("\nmaxmemory 64mb\n", conf)
    assert.matches("\nsave \"\"\n", conf)
    assert.equal(202, (deprovision(b, "mm", R.one)))
    b:wait_operation("/v2/service_instances/mm", 30)
  end)

  it("restarts a redis process that dies; its bindings outlive it and new ones work", function()
    assert.equal(202, (provision(b, "sup", R.one)))
    assert.equal("succeeded", b:wait_operation("/v2/service_instances/sup").state)
    local bstatus, _, _, bbody = bind(b, "sup", "kept", R.one)
    assert.equal(201, bstatus)
    local before = instance_record(b, "sup").processes["redis-0"]
    assert.is_true(proc.kill(before.pid, before.start_time, "KILL"))
    local deadline = proc.monotonic() + 15
    local after
    repeat
      proc.sleep(0.2)
      after = instance_record(b, "sup").processes["redis-0"]
    until (after.pid ~= before.pid and proc.alive(after.pid, after.start_time)) or proc.monotonic() > deadline
    assert.are_not.equal(before.pid, after.pid)
    assert.is_true(proc.alive(after.pid, after.start_time))
    -- the binding's user was in the ACL file before the bind answered (kill -9 lost nothing)
    local creds = bbody.credentials
    assert.is_truthy(Broker.wait_for(function() return redis_cli(creds, "PING") == "PONG" end), "the kept user works")
    -- the broker's pooled connection died with the old process: the next bind reconnects
    local status, _, _, nbody = bind(b, "sup", "after", R.one)
    assert.equal(201, status)
    assert.equal("PONG", redis_cli(nbody.credentials, "PING"))
    assert.equal(200, (unbind(b, "sup", "after", R.one)))
    assert.matches("WRONGPASS", redis_cli(nbody.credentials, "PING"))
    assert.equal(202, (deprovision(b, "sup", R.one)))
    assert.equal("succeeded", b:wait_operation("/v2/service_instances/sup").state)
  end)
end)

describe("broker restarts", function()
  local b
  before_each(function() b = Broker.start() end)
  after_each(function() if b then b:cleanup() end end)

  it("adopts running instances instead of restarting them", function()
    assert.equal(202, (provision(b, "keep", R.one)))
    assert.equal("succeeded", b:wait_operation("/v2/service_instances/keep").state)
    local before = pids_of(instance_record(b, "keep"))
    local status = b:stop("TERM")
    assert.equal(0, status.code)
    b:launch()
    proc.sleep(2.5) -- a supervise pass
    local after = pids_of(instance_record(b, "keep"))
    assert.same(before, after)
    assert.is_true(proc.alive(after["redis-0"].pid, after["redis-0"].start_time))
    local bstatus, _, _, body = bind(b, "keep", "kb", R.one)
    assert.equal(201, bstatus)
    assert.equal("PONG", redis_cli(body.credentials, "PING"))
  end)

  it("adopts a process spawned just before a crash instead of starting a second one", function()
    b:cleanup()
    b = Broker.start { env = { FORGE_FAILPOINT = "after_spawn" } }
    assert.equal(202, (provision(b, "window", R.one)))
    local w = proc.wait(b.pid, 20)
    assert.equal(99, w.code)
    b.env.FORGE_FAILPOINT = nil
    b:launch()
    assert.equal("succeeded", b:wait_operation("/v2/service_instances/window").state)
    local live = Broker.marked_pids(b.state_dir, "window")
    assert.equal(1, #live)
    assert.equal(live[1], instance_record(b, "window").processes["redis-0"].pid)
  end)

  it("finishes a provision after kill -9 mid-operation, with no orphan", function()
    assert.equal(202, (provision(b, "crash", R.three)))
    b:stop("KILL")
    b:launch()
    assert.equal("succeeded", b:wait_operation("/v2/service_instances/crash").state)
    local rec = instance_record(b, "crash")
    assert.equal("running", rec.state)
    -- exactly the three recorded processes exist for this instance
    local live = Broker.marked_pids(b.state_dir, "crash")
    assert.equal(3, #live)
    for _, p in pairs(rec.processes) do assert.is_true(proc.alive(p.pid, p.start_time)) end
  end)
end)
