-- The broker on BOSH targets: two simulated directors (basic auth and UAA), redis 1-server on
-- dc1 and 3-servers on dc2 by the operator's mapping in forge.yml. Full lifecycles, the rendered
-- manifests, pool exhaustion, task errors, a director outage and a broker killed mid-task.
local Broker = require "spec.support.broker"
local boshsim = require "spec.support.boshsim"
local proc = require "forge.proc"
local yaml = require "forge.yaml"

local R = Broker.redis
local b, dc1, dc2

local function inst(id) return "/v2/service_instances/" .. id end
local function bnd(id, bid) return inst(id) .. "/service_bindings/" .. bid end

local function provision(id, plan_id)
  return b:call("PUT", inst(id) .. "?accepts_incomplete=true", { service_id = R.service, plan_id = plan_id,
    organization_guid = "org-1", space_guid = "space-1" })
end

local function deprovision(id, plan_id)
  return b:call("DELETE", inst(id) .. "?accepts_incomplete=true&service_id=" .. R.service .. "&plan_id=" .. plan_id)
end

local function seed(id)
  local status, raw, _, body = b:call("GET", "/service_instances/" .. id)
  assert.equal(200, status, raw)
  return body
end

local function store_dump(prefix)
  local db = b:store()
  local kvs = db:range(prefix or "")
  db:close()
  local t = {}
  for _, kv in ipairs(kvs) do t[kv.key] = kv.value end
  return t
end

local function count(t)
  local n = 0
  for _ in pairs(t) do n = n + 1 end
  return n
end

-- The manifest the sim holds for a deployment (decoded), or nil.
local function sim_manifest(sim, name)
  local d = sim:director()
  local text = d:deployment(name)
  d:close()
  return text and assert(yaml.decode(text))
end

-- The director's error code for a deployment that should not exist.
local function sim_missing(sim, name)
  local d = sim:director()
  local m, err = d:deployment(name)
  d:close()
  return m == nil and err and err.code
end

local function posts(sim, path)
  local n = 0
  for _, r in ipairs(sim:requests()) do
    if r.method == "POST" and r.path == path then n = n + 1 end
  end
  return n
end

local function wait_ok(path, what)
  local op = b:wait_operation(path, 30)
  assert.equal("succeeded", op.state, (what or path) .. ": " .. tostring(op.description))
  return op
end

local function wait_until(fn, timeout, what)
  local deadline = proc.monotonic() + (timeout or 10)
  while proc.monotonic() < deadline do
    local v = fn()
    if v then return v end
    proc.sleep(0.05)
  end
  error("timed out waiting for " .. what .. "\n" .. b:read_log():sub(-3000))
end

-- The VMs of a deployment, played by real redis servers on their (loopback) IPs, configured as
-- the BOSH job would be: the manifest's password for the default user, a config file (so
-- CONFIG REWRITE persists ACL users). Returns a stop function.
local function start_vms(ips, password)
  local dir = Broker.tmpdir()
  local procs = {}
  for i, ip in ipairs(ips) do
    local conf = dir .. "/redis-" .. i .. ".conf"
    local f = assert(io.open(conf, "w"))
    f:write("bind ", ip, "\nport 6379\nrequirepass ", password, "\nsave \"\"\nappendonly no\ndir ", dir, "\n")
    f:close()
    procs[i] = assert(proc.spawn { argv = { "/usr/bin/redis-server", conf }, stdout = dir .. "/redis-" .. i .. ".log" })
  end
  for _, ip in ipairs(ips) do
    wait_until(function() return proc.tcp_check(ip, 6379, 1) end, 10, "redis on " .. ip)
  end
  return function()
    for _, p in ipairs(procs) do proc.stop(p.pid, p.start_time, 5) end
    os.execute("rm -rf " .. dir)
  end
end

-- PING as a binding's user on ip: "PONG", or redis-cli's complaint.
local function ping_as(ip, creds)
  local p = io.popen(string.format("REDISCLI_AUTH='%s' redis-cli -h %s -p 6379 --user %s --no-auth-warning PING 2>&1",
    creds.password, ip, creds.username))
  local out = p:read("a")
  p:close()
  return (out:gsub("%s+$", ""))
end

local function delete_and_check(id, plan_id, sim, prefix)
  local status, raw = deprovision(id, plan_id)
  assert.equal(202, status, raw)
  wait_ok(inst(id), "deprovision " .. id)
  assert.is_nil(sim_manifest(sim, "redis-" .. id))
  for k, v in pairs(store_dump(prefix)) do assert.is_not.equal(id, v, k .. " still points at " .. id) end
end

setup(function()
  math.randomseed(os.time() + proc.getpid())
  dc1 = boshsim.start { auth = "basic", task_delay = 0.3, subnets = { "services=127.10.0.0/24:127.10.0.2-127.10.0.50" } }
  dc2 = boshsim.start { auth = "uaa", task_delay = 0.3, subnets = { "services=127.20.0.0/24:127.20.0.2-127.20.0.50" } }
  local config = table.concat({
    "targets:",
    "  dc1:",
    "    type: bosh",
    "    url: " .. dc1.url,
    "    username: " .. dc1.user,
    "    password: " .. dc1.password,
    "    timeout_ms: 3000",
    "    poll_interval: 0.1",
    "    stemcell: {os: ubuntu-jammy, version: '1.500'}",
    "    releases: {redis: '18.0.0'}",
    "    networks:",
    "    - name: services",
    "      cidr: 127.10.0.0/24",
    "      static: ['127.10.0.10 - 127.10.0.13']",
    "      azs: [z1]",
    "    services: [redis/1-server]",
    "  dc2:",
    "    type: bosh",
    "    url: " .. dc2.url,
    "    client: " .. dc2.client,
    "    client_secret: " .. dc2.secret,
    "    timeout_ms: 3000",
    "    task_timeout: 3",
    "    poll_interval: 0.1",
    "    networks:",
    "    - name: services",
    "      static: ['127.20.0.10 - 127.20.0.15']",
    "    services: [redis/3-servers]",
  }, "\n") .. "\n"
  b = Broker.start { config = config }
end)

teardown(function()
  if b then b:cleanup() end
  if dc1 then dc1:cleanup() end
  if dc2 then dc2:cleanup() end
end)

describe("BOSH targets", function()
  it("runs the lifecycle of redis 1-server on dc1 (basic auth)", function()
    local status, raw = provision("one", R.one)
    assert.equal(202, status, raw)
    local view = seed("one")
    assert.equal("dc1", view.target)
    assert.equal("services", view.network)
    assert.same({ "127.10.0.10" }, view.ips)
    assert.equal("redis-one", view.deployment_name)
    wait_ok(inst("one"))
    view = seed("one")
    assert.equal("running", view.state)
    assert.is_number(view.bosh_task_id)

    local m = sim_manifest(dc1, "redis-one")
    assert.equal("redis-one", m.name)
    assert.is_nil(m.networks)
    assert.is_nil(m.meta)
    assert.equal(1, #m.instance_groups)
    local g = m.instance_groups[1]
    assert.equal(1, g.instances)
    assert.same({ "z1" }, g.azs)
    assert.same({ { name = "services", static_ips = { "127.10.0.10" } } }, g.networks)
    assert.same({ name = "redis", version = "18.0.0" }, m.releases[1])
    assert.equal("1.500", m.stemcells[1].version)
    local props = g.jobs[1].properties
    assert.is_string(props.password)
    assert.is_true(#props.password >= 16)

    -- bind: a per-binding ACL user created on the VM over the Redis protocol, as the admin
    local stop_vms = start_vms({ "127.10.0.10" }, props.password)
    finally(stop_vms)
    local st, braw, _, bbody = b:call("PUT", bnd("one", "b1"), { service_id = R.service, plan_id = R.one })
    assert.equal(201, st, braw)
    assert.equal("127.10.0.10", bbody.credentials.host)
    assert.equal(6379, bbody.credentials.port)
    assert.not_equal(props.password, bbody.credentials.password)
    assert.same({ "127.10.0.10:6379" }, bbody.credentials.hosts)
    assert.equal("PONG", ping_as("127.10.0.10", bbody.credentials))
    st, braw = b:call("DELETE", bnd("one", "b1") .. "?service_id=" .. R.service .. "&plan_id=" .. R.one)
    assert.equal(200, st, braw)
    assert.matches("WRONGPASS", ping_as("127.10.0.10", bbody.credentials))

    -- update: a redeploy of the re-rendered manifest on the same IP; moving targets is refused
    st, braw = b:call("PATCH", inst("one") .. "?accepts_incomplete=true", { service_id = R.service,
      parameters = { maxmemory_mb = 512 } })
    assert.equal(202, st, braw)
    wait_ok(inst("one"), "update")
    m = sim_manifest(dc1, "redis-one")
    assert.equal(512, m.instance_groups[1].jobs[1].properties.maxmemory_mb)
    assert.same({ "127.10.0.10" }, m.instance_groups[1].networks[1].static_ips)
    assert.equal(props.password, m.instance_groups[1].jobs[1].properties.password)
    local _, praw, _, pbody = b:call("PATCH", inst("one") .. "?accepts_incomplete=true", { service_id = R.service,
      plan_id = R.three })
    assert.equal("PlanChangeNotSupported", pbody.error, praw)

    assert.equal("one", store_dump("ip/dc1/")["ip/dc1/services/127.10.0.10"])
    delete_and_check("one", R.one, dc1, "ip/")
    assert.equal(0, count(store_dump("ip/")))
  end)

  it("speaks the director contract: context lookup, one upload (302), task polling, forced delete", function()
    dc2:clear_requests()
    assert.equal(202, (provision("contract", R.three)))
    wait_ok(inst("contract"))
    delete_and_check("contract", R.three, dc2, "ip/")
    local seq = {}
    for _, r in ipairs(dc2:requests()) do
      if r.path ~= "/oauth/token" and r.path ~= "/info" then
        local step = r.method .. " " .. r.path:gsub("/tasks/%d+$", "/tasks/N")
        if seq[#seq] ~= step then seq[#seq + 1] = step end
        if r.method == "POST" and r.path == "/deployments" then assert.equal(302, r.status) end
        if r.method == "DELETE" then
          assert.equal(302, r.status)
          assert.matches("force=true", r.query or "")
        end
        if r.method == "GET" and r.path == "/tasks" then assert.matches("context_id=", r.query or "") end
      end
    end
    -- reads of the deployment by the spec itself (GET /deployments/NAME) are left out
    local calls = {}
    for _, step in ipairs(seq) do if not step:match("^GET /deployments/") then calls[#calls + 1] = step end end
    assert.same({ "GET /tasks", "POST /deployments", "GET /tasks/N", "GET /tasks", "DELETE /deployments/redis-contract",
      "GET /tasks/N" }, calls)
  end)

  it("runs the lifecycle of redis 3-servers on dc2 (UAA), async bindings carrying every VM's IP", function()
    local status, raw = provision("three", R.three)
    assert.equal(202, status, raw)
    wait_ok(inst("three"))
    local view = seed("three")
    assert.equal("dc2", view.target)
    -- three addresses of the static range (where in it depends on the worker's allocation cursor)
    local ips = view.ips
    assert.equal(3, #ips)
    for _, ip in ipairs(ips) do
      local last = tonumber(ip:match("^127%.20%.0%.(%d+)$"))
      assert.is_true(last and last >= 10 and last <= 15, ip)
    end

    local m = sim_manifest(dc2, "redis-three")
    local g = m.instance_groups[1]
    assert.equal(3, g.instances)
    assert.same({ { name = "services", static_ips = ips } }, g.networks)
    assert.equal(ips[1], g.jobs[1].properties.replication.primary)

    finally(start_vms(ips, g.jobs[1].properties.password))
    local st, braw = b:call("PUT", bnd("three", "b3") .. "?accepts_incomplete=true",
      { service_id = R.service, plan_id = R.three })
    assert.equal(202, st, braw)
    wait_ok(bnd("three", "b3"), "bind")
    local _, _, _, got = b:call("GET", bnd("three", "b3"))
    assert.equal(ips[1], got.credentials.host)
    assert.same({ ips[1] .. ":6379", ips[2] .. ":6379", ips[3] .. ":6379" }, got.credentials.hosts)
    for _, ip in ipairs(ips) do assert.equal("PONG", ping_as(ip, got.credentials)) end
    st, braw = b:call("DELETE", bnd("three", "b3") .. "?accepts_incomplete=true&service_id=" .. R.service ..
      "&plan_id=" .. R.three)
    assert.equal(202, st, braw)
    wait_ok(bnd("three", "b3"), "unbind")
    for _, ip in ipairs(ips) do assert.matches("WRONGPASS", ping_as(ip, got.credentials)) end

    delete_and_check("three", R.three, dc2, "ip/")
    assert.equal(0, count(store_dump("ip/dc2/")))
  end)

  it("refuses a provision when the pool is exhausted, with nothing half-created", function()
    assert.equal(202, (provision("p1", R.three)))
    assert.equal(202, (provision("p2", R.three)))
    assert.equal(6, count(store_dump("ip/dc2/")))
    local status, raw, hdrs, body = provision("p3", R.three)
    assert.equal(503, status, raw)
    assert.equal("ServiceUnavailable", body.error)
    assert.matches("IP pool of network services on BOSH target dc2", body.description)
    assert.is_truthy(hdrs["retry-after"])
    assert.is_nil(store_dump("instance/p3")["instance/p3"])
    assert.is_nil(store_dump("pending/p3")["pending/p3"])
    assert.equal(6, count(store_dump("ip/dc2/")))
    assert.equal("bosh.not_found", sim_missing(dc2, "redis-p3"))
    wait_ok(inst("p1"))
    wait_ok(inst("p2"))
    local ips = {}
    for _, id in ipairs({ "p1", "p2" }) do
      for _, ip in ipairs(seed(id).ips) do
        assert.is_nil(ips[ip], "IP " .. ip .. " given twice")
        ips[ip] = id
      end
    end
    assert.equal(6, count(ips))
    delete_and_check("p1", R.three, dc2, "ip/")
    -- freed addresses are used again
    assert.equal(202, (provision("p3", R.three)))
    wait_ok(inst("p3"))
    delete_and_check("p2", R.three, dc2, "ip/")
    delete_and_check("p3", R.three, dc2, "ip/")
    assert.equal(0, count(store_dump("ip/dc2/")))
  end)

  it("fails the operation with the task's reason and id when the BOSH task fails", function()
    dc1:faults { task_error = 1, task_error_message = "CPI error: quota exceeded for vm_type default" }
    assert.equal(202, (provision("bad", R.one)))
    local op = b:wait_operation(inst("bad"), 30)
    assert.equal("failed", op.state)
    assert.matches("quota exceeded", op.description)
    local task = math.tointeger(seed("bad").bosh_task_id)
    assert.matches("BOSH task " .. task, op.description, 1, true)
    assert.equal("failed", seed("bad").state)
    delete_and_check("bad", R.one, dc1, "ip/")
    assert.equal(0, count(store_dump("ip/dc1/")))
  end)

  it("fails an operation whose BOSH task outlives task_timeout, cancelling the task", function()
    dc2:config { task_delay = 60 }
    finally(function() dc2:config { task_delay = 0.3 } end)
    assert.equal(202, (provision("stuck", R.three)))
    local op = b:wait_operation(inst("stuck"), 30)
    assert.equal("failed", op.state)
    assert.matches("after 3s; cancelled", op.description, 1, true)
    dc2:config { task_delay = 0.3 }
    assert.equal(202, (deprovision("stuck", R.three)))
    assert.equal("succeeded", b:wait_operation(inst("stuck"), 30).state)
  end)

  it("keeps the operation in progress while the director is unreachable, and resumes", function()
    dc1:faults { http_500 = 1000000 }
    assert.equal(202, (provision("out", R.one)))
    local desc = wait_until(function()
      local _, _, _, op = b:call("GET", inst("out") .. "/last_operation")
      return op.state == "in progress" and op.description and op.description:match("unreachable") and op.description
    end, 10, "an 'unreachable' description")
    assert.matches("director dc1 unreachable", desc)
    proc.sleep(0.5)
    local _, _, _, op = b:call("GET", inst("out") .. "/last_operation")
    assert.equal("in progress", op.state)
    dc1:clear_faults()
    wait_ok(inst("out"))
    assert.equal(1, sim_manifest(dc1, "redis-out").instance_groups[1].instances)
    delete_and_check("out", R.one, dc1, "ip/")
  end)

  it("a delete while the deploy task runs cancels that task, then deletes the deployment", function()
    dc1:config { task_delay = 2 }
    dc1:clear_requests()
    assert.equal(202, (provision("early", R.one)))
    local task = wait_until(function() return math.tointeger(seed("early").bosh_task_id) end, 10, "the task id")
    dc1:config { task_delay = 0.3 }
    delete_and_check("early", R.one, dc1, "ip/")
    local cancelled = false
    for _, r in ipairs(dc1:requests()) do
      if r.method == "DELETE" and r.path == "/task/" .. task then cancelled = true end
    end
    assert.is_true(cancelled)
    assert.equal(0, count(store_dump("ip/dc1/")))
  end)

  it("after kill -9 mid-task, polls the same task again and never deploys twice", function()
    dc1:config { task_delay = 3 }
    dc1:clear_requests()
    assert.equal(202, (provision("crash", R.one)))
    local task = wait_until(function() return math.tointeger(seed("crash").bosh_task_id) end, 10, "the journaled task id")
    b:stop("KILL")
    local before = #dc1:requests()
    b:launch()
    wait_ok(inst("crash"))
    dc1:config { task_delay = 0.3 }
    assert.equal(task, math.tointeger(seed("crash").bosh_task_id))
    assert.equal(1, posts(dc1, "/deployments"))
    -- the restarted broker polled the journaled task (GET /tasks/N after the kill), uploaded nothing
    local polls = 0
    for i, r in ipairs(dc1:requests()) do
      if i > before and r.method == "GET" and r.path == "/tasks/" .. task then polls = polls + 1 end
    end
    assert.is_true(polls >= 1, "task " .. task .. " was not polled after the restart")
    delete_and_check("crash", R.one, dc1, "ip/")
  end)
end)
