-- The admin API end to end (docs/admin.md): listing, detail without secrets, operations in
-- flight, retry, cancel, restart, purge, orphans; bad ids, bad filters, wrong credentials.
local Broker = require "spec.support.broker"
local client = require "spec.support.client"
local lfs = require "lfs"
local proc = require "forge.proc"

local D = Broker.dummy
local STUCK = Broker.stuck

describe("the admin API", function()
  local b
  setup(function()
    b = Broker.start { fixtures = true, pool = 20, config = "targets:\n  local:\n    deploy_timeout: 4\n" }
    b:provision_async("a1", D.service, D.small, "o1", "s1")
    b:provision_async("a2", D.service, D.small, "o1", "s2")
    b:provision_async("a3", D.service, D.small, "o2", "s3")
    for _, id in ipairs({ "a1", "a2", "a3" }) do b:wait_operation("/v2/service_instances/" .. id, 30) end
  end)
  teardown(function() b:cleanup() end)

  it("answers only the admin credentials", function()
    local url = b:url("/admin/instances")
    assert.equal(401, (client.request("GET", url)))
    assert.equal(401, (client.request("GET", url, { user = b.user, password = b.password })))
    assert.equal(401, (client.request("GET", url, { user = b.admin_user, password = "wrong" })))
    assert.equal(200, (client.request("GET", url, { user = b.admin_user, password = b.admin_password })))
  end)

  it("lists instances with filters and pages", function()
    local status, _, _, body = b:call("GET", "/admin/instances")
    assert.equal(200, status)
    local ids = {}
    for _, i in ipairs(body.instances) do ids[#ids + 1] = i.id end
    assert.same({ "a1", "a2", "a3" }, ids)
    assert.equal("dummy", body.instances[1].service)
    assert.equal("small", body.instances[1].plan)
    assert.equal("running", body.instances[1].state)
    assert.equal("local", body.instances[1].target)
    assert.equal("succeeded", body.instances[1].operation.state)
    assert.is_nil(body.next)

    local _, _, _, o1 = b:call("GET", "/admin/instances?org=o1")
    assert.equal(2, #o1.instances)
    local _, _, _, s3 = b:call("GET", "/admin/instances?space=s3&service=dummy&plan=small&state=running&target=local")
    assert.equal(1, #s3.instances)
    assert.equal("a3", s3.instances[1].id)
    local _, _, _, none = b:call("GET", "/admin/instances?state=failed")
    assert.same({}, none.instances)

    local _, _, _, p1 = b:call("GET", "/admin/instances?limit=2")
    assert.equal(2, #p1.instances)
    assert.equal("a2", p1.next)
    local _, _, _, p2 = b:call("GET", "/admin/instances?limit=2&after=" .. p1.next)
    assert.equal(1, #p2.instances)
    assert.equal("a3", p2.instances[1].id)
    assert.is_nil(p2.next)
  end)

  it("writes an empty list as a JSON array, as docs/admin.md shows it, never as an object", function()
    for _, case in ipairs({ { "/admin/instances?state=failed", "instances" }, { "/admin/instances/a1", "bindings" },
      { "/admin/operations?state=failed&type=restart", "operations" }, { "/admin/orphans", "errors" },
      { "/admin/quotas", "quotas" }, { "/admin/services", "warnings" }, { "/admin/services", "errors" } }) do
      local path, field = case[1], case[2]
      local status, raw = b:call("GET", path)
      assert.equal(200, status, raw)
      assert.is_truthy(raw:find('"' .. field .. '":[]', 1, true), path .. ": " .. raw)
    end
  end)

  it("refuses bad filters and bad ids with a 400", function()
    for _, q in ipairs({ "state=sleeping", "limit=0", "limit=501", "limit=ten", "colour=blue", "after=..%2Fx" }) do
      local status, _, _, body = b:call("GET", "/admin/instances?" .. q)
      assert.equal(400, status, q)
      assert.equal("BadRequest", body.error, q)
    end
    assert.equal(400, (b:call("GET", "/admin/operations?state=sleeping")))
    assert.equal(400, (b:call("GET", "/admin/operations?type=dance")))
    assert.equal(400, (b:call("GET", "/admin/instances/a%20b")))
    assert.equal(404, (b:call("GET", "/admin/instances/nope")))
    assert.equal(404, (b:call("POST", "/admin/instances/nope/retry")))
    assert.equal(405, (b:call("PUT", "/admin/instances/a1/retry")))
    assert.equal(400, (b:call("POST", "/admin/orphans/teapot/x/clean")))
  end)

  it("shows an instance with its bindings, processes and version, and no secret", function()
    local status, _, _, bind = b:call("PUT", "/v2/service_instances/a1/service_bindings/k1",
      { service_id = D.service, plan_id = D.small })
    assert.equal(201, status)
    local password = bind.credentials.password
    local _, raw, _, body = b:call("GET", "/admin/instances/a1")
    assert.equal("a1", body.id)
    assert.equal(1, #body.bindings)
    assert.equal("k1", body.bindings[1].id)
    assert.equal("created", body.bindings[1].state)
    assert.is_nil(raw:find(password, 1, true))
    assert.equal(1, #body.processes)
    assert.equal("sleeper", body.processes[1].name)
    assert.is_true(body.processes[1].alive)
    assert.is_string(body.version.pinned)
    assert.equal(body.version.pinned, body.version.current)
    assert.is_false(body.version.upgrade_available)
    assert.equal("sleep", body.deployment.processes[1].argv[1])
    assert.equal("provision", body.operations[1].type)
  end)

  it("restarts a local instance's processes as a journaled operation", function()
    local _, _, _, before = b:call("GET", "/admin/instances/a2")
    local status, _, _, op = b:call("POST", "/admin/instances/a2/restart")
    assert.equal(202, status)
    assert.equal("restart", op.type)
    local again_status, _, _, again = b:call("POST", "/admin/instances/a2/restart")
    assert.is_true(again_status == 202 or again_status == 409)
    if again_status == 202 then assert.equal(op.operation, again.operation) end
    local after = b:settle("a2")
    assert.equal("succeeded", after.operation.state)
    assert.equal("instance restarted", after.operation.description)
    assert.equal("running", after.state)
    assert.is_true(after.processes[1].alive)
    assert.are_not.equal(before.processes[1].pid, after.processes[1].pid)
    assert.is_false(proc.alive(before.processes[1].pid, 0) and proc.identity(before.processes[1].pid) ~= nil)
    assert.equal("restart", after.operations[1].type)
    assert.equal("provision", after.operations[2].type)
    -- nothing failed: nothing to retry or cancel
    assert.equal(422, (b:call("POST", "/admin/instances/a2/retry")))
    assert.equal(422, (b:call("POST", "/admin/instances/a2/cancel")))
  end)

  it("lists operations in flight, cancels one, retries it and purges what it left", function()
    b:provision_async("st1", STUCK.service, STUCK.plan)
    local _, _, _, ops = b:call("GET", "/admin/operations")
    local found
    for _, o in ipairs(ops.operations) do if o.instance == "st1" then found = o end end
    assert.is_table(found)
    assert.equal("provision", found.type)
    assert.equal("in progress", found.state)
    assert.equal("local", found.target)
    assert.is_number(found.age_seconds)
    assert.equal(409, (b:call("POST", "/admin/instances/st1/restart")))
    assert.equal(409, (b:call("DELETE", "/admin/instances/st1?purge=true")))

    assert.is_true(Broker.wait_for(function() return #Broker.marked_pids(b.state_dir, "st1") > 0 end))
    local status, _, _, c = b:call("POST", "/admin/instances/st1/cancel")
    assert.equal(202, status)
    assert.equal(202, (b:call("POST", "/admin/instances/st1/cancel")))   -- idempotent
    local after = b:settle("st1")
    assert.equal(c.operation, after.operation.id)
    assert.equal("failed", after.operation.state)
    assert.equal("provision cancelled by the operator", after.operation.description)
    assert.equal("failed", after.state)
    assert.same({}, Broker.marked_pids(b.state_dir, "st1"))
    local _, _, _, lo = b:call("GET", "/v2/service_instances/st1/last_operation")
    assert.equal("failed", lo.state)
    local _, _, _, failed = b:call("GET", "/admin/operations?state=failed&type=provision")
    assert.equal("st1", failed.operations[1].instance)

    status, _, _, c = b:call("POST", "/admin/instances/st1/retry")
    assert.equal(202, status)
    local _, _, _, again = b:call("POST", "/admin/instances/st1/retry")
    assert.equal(c.operation, again.operation)                            -- idempotent
    local retried = b:settle("st1", 30)                                 -- deploy_timeout: 4 s
    assert.equal("failed", retried.operation.state)
    assert.truthy(retried.operation.description:find("not healthy after 4s", 1, true))
    assert.same({}, Broker.marked_pids(b.state_dir, "st1"))

    assert.equal(400, (b:call("DELETE", "/admin/instances/st1")))
    status = b:call("DELETE", "/admin/instances/st1?purge=true")
    assert.equal(200, status)
    assert.equal(404, (b:call("GET", "/admin/instances/st1")))
    assert.equal(410, (b:call("GET", "/v2/service_instances/st1/last_operation")))
    local _, _, _, twice = b:call("DELETE", "/admin/instances/st1?purge=true")
    assert.is_false(twice.purged)
    assert.is_nil(lfs.attributes(b.state_dir .. "/instances/st1"))
  end)

  it("refuses to purge an instance whose processes run", function()
    local status, _, _, body = b:call("DELETE", "/admin/instances/a3?purge=true")
    assert.equal(409, status)
    assert.truthy(body.description:find("alive", 1, true))
    assert.equal("running", b:instance("a3").state)
  end)

  it("finds orphan directories and processes, and cleans them", function()
    local dir = b.state_dir .. "/instances/ghost/p"
    os.execute("mkdir -p '" .. dir .. "'")
    local pid, start
    finally(function() if pid and proc.identity(pid) then proc.kill(pid, start, "KILL") end end)
    local p = assert(proc.spawn { argv = { "/bin/sleep", "1000" }, cwd = dir })
    pid, start = p.pid, p.start_time
    local _, _, _, body = b:call("GET", "/admin/orphans")
    local kinds = {}
    for _, o in ipairs(body.orphans) do kinds[o.kind .. ":" .. o.id] = o end
    assert.is_table(kinds["directory:ghost"])
    assert.is_table(kinds["process:" .. pid])
    assert.is_nil(kinds["directory:a1"])
    assert.equal(409, (b:call("POST", "/admin/orphans/directory/ghost/clean")))
    local status, _, _, res = b:call("POST", "/admin/orphans/process/" .. pid .. "/clean")
    assert.equal(200, status)
    assert.is_true(res.cleaned)
    assert.is_nil(proc.identity(pid))
    status, _, _, res = b:call("POST", "/admin/orphans/directory/ghost/clean")
    assert.equal(200, status)
    assert.is_true(res.cleaned)
    assert.is_nil(lfs.attributes(b.state_dir .. "/instances/ghost"))
    local _, _, _, again = b:call("POST", "/admin/orphans/directory/ghost/clean")
    assert.is_false(again.cleaned)
    local _, _, _, later = b:call("GET", "/admin/orphans")
    assert.same({}, later.orphans)
  end)
end)
