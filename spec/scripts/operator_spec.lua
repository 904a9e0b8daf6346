-- The operator's first day: /readyz that means something (a real etcd cluster losing its
-- quorum, a simulated director refusing the credentials), a broker whose etcd is down at start,
-- config validation at start, the start-up summary, and the events in the log, each line with
-- the replica id.
local Broker = require "spec.support.broker"
local boshsim = require "spec.support.boshsim"
local client = require "spec.support.client"
local etcd_server = require "support.etcd"
local files = require "spec.support.files"
local shell = require "spec.support.shell"
local cjson = require "cjson"
local proc = require "forge.proc"

local R = Broker.redis

local function inst(id) return "/v2/service_instances/" .. id end

local function provision(b, id, plan_id)
  return b:call("PUT", inst(id) .. "?accepts_incomplete=true", { service_id = R.service, plan_id = plan_id or R.one,
    organization_guid = "o", space_guid = "s" })
end

-- GET /readyz without credentials (it is public, like /healthz): status, body.
local function readyz(b)
  local status, _, _, body = client.request("GET", b:url("/readyz"))
  return status, body
end

local function check_named(body, name)
  for _, c in ipairs(body.checks or {}) do if c.name == name then return c end end
end

local function wait_until(fn, timeout, what, b)
  local deadline = proc.monotonic() + (timeout or 15)
  while proc.monotonic() < deadline do
    local v = fn()
    if v then return v end
    proc.sleep(0.1)
  end
  error("timed out waiting for " .. what .. (b and ("\n" .. b:read_log():sub(-3000)) or ""))
end

-- The JSON lines of a broker's log, decoded.
local function log_lines(b)
  local out = {}
  for line in b:read_log():gmatch("[^\n]+") do
    if line:sub(1, 1) == "{" then out[#out + 1] = cjson.decode(line) end
  end
  return out
end

-- The first log line with this msg, or false.
local function logged(b, msg)
  for _, l in ipairs(log_lines(b)) do if l.msg == msg then return l end end
  return false
end

-- A forge.yml with a BOSH target `name` on sim (its credentials unless given), taking `services`.
local function bosh_config(name, sim, services, password)
  return table.concat({
    "targets:",
    "  " .. name .. ":",
    "    type: bosh",
    "    url: " .. sim.url,
    "    username: " .. sim.user,
    "    password: " .. (password or sim.password),
    "    timeout_ms: 3000",
    "    poll_interval: 0.1",
    "    networks:",
    "    - name: services",
    "      static: ['127.30.0.10 - 127.30.0.20']",
    "    services: [" .. table.concat(services or {}, ", ") .. "]",
  }, "\n") .. "\n"
end

describe("/readyz", function()
  it("answers 200 when the store and every target answer, 503 naming a director that refuses the credentials",
    function()
      local sim = boshsim.start { subnets = { "services=127.30.0.0/24:127.30.0.2-127.30.0.50" } }
      local good, bad
      finally(function()
        if good then good:cleanup() end
        if bad then bad:cleanup() end
        sim:cleanup()
      end)
      good = Broker.start { config = bosh_config("dc1", sim) }
      local status, body = readyz(good)
      assert.equal(200, status, cjson.encode(body))
      assert.equal("ready", body.status)
      for _, name in ipairs({ "store", "targets.local", "targets.dc1" }) do
        assert.is_true(check_named(body, name).ok, name)
      end
      bad = Broker.start { config = bosh_config("dc1", sim, nil, "wrong-password") }
      status, body = readyz(bad)
      assert.equal(503, status)
      assert.equal("unavailable", body.status)
      local dc1 = check_named(body, "targets.dc1")
      assert.is_false(dc1.ok)
      assert.matches("director dc1", dc1.error)
      assert.is_nil(dc1.error:find("\n", 1, true))
      assert.is_true(check_named(body, "store").ok)
      assert.is_true(check_named(body, "targets.local").ok)
      -- liveness stays cheap and says nothing of the director
      assert.equal(200, (client.request("GET", bad:url("/healthz"))))
    end)

  it("answers 503 naming targets.local while the service user cannot reach the instances dir", function()
    -- every local provision fails then ("the service user forge-svc cannot reach ..."): not ready
    local top = Broker.tmpdir()
    local b
    finally(function()
      if b then b:cleanup() end
      os.execute("rm -rf '" .. top .. "'")
    end)
    assert(os.execute("mkdir -p " .. top .. "/closed/state && chmod 700 " .. top .. "/closed"))
    b = Broker.start { state_dir = top .. "/closed/state" }
    local status, body = readyz(b)
    assert.equal(503, status, cjson.encode(body))
    local target = check_named(body, "targets.local")
    assert.is_false(target.ok)
    assert.matches("the service user forge-svc cannot reach " .. top .. "/closed/state/instances: " .. top
      .. "/closed is closed to other users", target.error, 1, true)
    assert.is_true(check_named(body, "store").ok)
    assert(os.execute("chmod 711 " .. top .. "/closed"))
    wait_until(function() return readyz(b) == 200 end, 10, "/readyz 200 once the service user can pass", b)
  end)

  it("answers 503 while etcd has lost its quorum, logs the endpoints going down, and 200 once it is back", function()
    local cl = etcd_server.cluster { n = 3, fast = true }
    local b
    finally(function()
      if b then b:cleanup() end
      cl:cleanup()
    end)
    b = Broker.start { env = { FORGE_STORE = "etcd", FORGE_ETCD_ENDPOINTS = table.concat(cl.urls, ","),
      FORGE_ETCD_PREFIX = "readyz/" } }
    assert.equal(200, (readyz(b)))
    local stopped = {}
    for _, m in ipairs(cl:others(cl.members[1])) do
      m:stop()
      stopped[m.url] = true
    end
    local body = wait_until(function()
      local status, body = readyz(b)
      return status == 503 and body
    end, 30, "/readyz 503", b)
    assert.equal("unavailable", body.status)
    local store = check_named(body, "store")
    assert.is_false(store.ok)
    assert.is_string(store.error)
    assert.equal(200, (client.request("GET", b:url("/healthz"))))
    -- the main thread's handle fails over from each stopped member (then from the last one too)
    wait_until(function()
      local seen = {}
      for _, l in ipairs(log_lines(b)) do
        if l.msg == "store endpoint down" then seen[l.endpoint] = true end
      end
      for url in pairs(stopped) do if not seen[url] then return false end end
      return true
    end, 30, "a 'store endpoint down' line for each stopped member", b)
    for _, m in ipairs(cl:others(cl.members[1])) do m:spawn() end
    for _, m in ipairs(cl:others(cl.members[1])) do m:wait_healthy(30) end
    wait_until(function() return readyz(b) == 200 end, 30, "/readyz 200 again", b)
  end)
end)

describe("a broker whose etcd is down at start", function()
  it("listens, answers /healthz, 503 to /readyz and OSB requests, and starts its work once etcd answers", function()
    local etcd = etcd_server.start { fast = true }
    local b
    finally(function()
      if b then b:cleanup() end
      etcd:cleanup()
    end)
    etcd:stop()
    b = Broker.start { env = { FORGE_STORE = "etcd", FORGE_ETCD_ENDPOINTS = etcd.url, FORGE_ETCD_PREFIX = "late/" } }
    local status, body = readyz(b)
    assert.equal(503, status)
    assert.is_false(check_named(body, "store").ok)
    local cs, raw, hdrs = b:call("GET", "/v2/catalog")
    assert.equal(503, cs, raw)
    assert.is_string(hdrs["retry-after"])
    assert.is_truthy(logged(b, "store unavailable, retrying; /readyz and OSB requests answer 503 until it answers"),
      b:read_log())
    assert.matches("does not answer; retrying", b:read_log())
    etcd:start()
    wait_until(function() return b:call("GET", "/v2/catalog") == 200 end, 30, "the catalog", b)
    wait_until(function() return readyz(b) == 200 end, 10, "/readyz 200", b)
    wait_until(function() return logged(b, "started") end, 10, "the 'started' line", b)
    -- the reconciler runs: an async provision finishes
    assert.equal(202, (provision(b, "late")))
    assert.equal("succeeded", b:wait_operation(inst("late")).state)
  end)
end)

describe("config validation at start", function()
  local dir
  setup(function() dir = Broker.tmpdir() end)
  teardown(function() os.execute("rm -rf " .. dir) end)

  -- `forge serve` with this config text and extra environment: exit code, output.
  local function serve(config, env)
    local path = dir .. "/forge.yml"
    files.write(path, config)
    local vars = { FORGE_LISTEN = "127.0.0.1:" .. require("spec.support.net").free_port(), FORGE_STATE_DIR = dir .. "/state",
      FORGE_SERVICES_DIR = os.getenv("PWD") .. "/services", FORGE_PASSWORD = "pw" }
    for k, v in pairs(env or {}) do vars[k] = v end
    local words = {}
    for k, v in pairs(vars) do words[#words + 1] = k .. "='" .. v .. "'" end
    return shell.run("env " .. table.concat(words, " ") .. " timeout 20 " .. shell.FORGE .. " serve --config " .. path)
  end

  it("refuses settings naming no loaded service or plan, bad quotas and scheme-less etcd endpoints (exit 2)", function()
    local sim = { url = "http://127.0.0.1:1", user = "u", password = "p" }
    local cases = {
      { bosh_config("dc1", sim, { "redis/3-server" }), nil,
        "targets.dc1.services[1]: 'redis/3-server': service redis has no plan '3-server'" },
      { bosh_config("dc1", sim, { "memcached" }), nil, "targets.dc1.services[1]: 'memcached' names no loaded service" },
      { "quotas: {services: {nosuch: 3}}\n", nil, "quotas.services: 'nosuch' names no loaded service" },
      { "quotas: {plans: {redis: 3}}\n", nil, "quotas.plans: 'redis' must name a plan as service/plan" },
      { "quotas: {organization: many}\n", nil, "quotas.organization must be a whole number >= 0" },
      { "quotas: {weights: {memory_mb: {plans: {'redis/1-server': -1}}}}\n", nil,
        "quotas.weights.memory_mb.plans.redis/1-server must be a number >= 0" },
      { "store: etcd\netcd: {endpoints: ['127.0.0.1:2379']}\n", nil,
        "etcd.endpoints[1] must be an http:// or https:// URL such as http://10.0.0.5:2379 (got '127.0.0.1:2379')" },
      { "{}\n", { FORGE_STORE = "etcd", FORGE_ETCD_ENDPOINTS = "http://127.0.0.1:2379,10.0.0.6:2379" },
        "etcd.endpoints[2] must be an http:// or https:// URL" },
      { "{}\n", { FORGE_THREADS = "lots" }, "FORGE_THREADS must be an integer" },
      { "{}\n", { FORGE_QUOTAS = "{space: [1]}" }, "FORGE_QUOTAS.space must be a whole number >= 0" },
    }
    for _, case in ipairs(cases) do
      local code, out = serve(case[1], case[2])
      assert.equal(2, code, out)
      assert.matches(case[3], out, 1, true)
      assert.is_nil(out:find("traceback", 1, true), out)
      assert.is_nil(out:find("listening", 1, true), out)
    end
  end)

  it("is what forge check reports for the settings of the config (exit 1)", function()
    local path = dir .. "/check.yml"
    files.write(path, "quotas: {plans: {'redis/9-servers': 2, 'redis/1-server': 5}}\n")
    local code, out = shell.forge("check services --config " .. path)
    assert.equal(1, code, out)
    assert.matches("config: quotas.plans: 'redis/9-servers': service redis has no plan '9-servers'", out, 1, true)
    assert.is_nil(out:find("redis/1-server", 1, true), out)
    files.write(path, "quotas: {plans: {'redis/1-server': 5}}\n")
    assert.equal(0, (shell.forge("check services --config " .. path)))
  end)
end)

describe("the log", function()
  it("has one start-up summary (also on stdout), and the replica id on every line", function()
    local sim = boshsim.start { subnets = { "services=127.30.0.0/24:127.30.0.2-127.30.0.50" } }
    local b
    finally(function()
      if b then b:cleanup() end
      sim:cleanup()
    end)
    b = Broker.start { config = bosh_config("dc1", sim, { "redis/3-servers" }) }
    local started = wait_until(function() return logged(b, "started") end, 10, "the 'started' line", b)
    assert.same({ kind = "sqlite", path = b.state_dir .. "/forge.db" }, started.store)
    assert.same({ ["local"] = "local", dc1 = "bosh " .. sim.url }, started.targets)
    assert.equal("dc1", started.plans["redis/3-servers"])
    assert.equal("local", started.plans["redis/1-server"])
    assert.matches("^%x+$", started.services.redis)
    assert.equal("127.0.0.1:" .. b.port, started.listen)
    assert.equal("on", started.admin)
    local text = b:read_log()
    assert.matches("plans:    [^\n]*redis/3%-servers %-> dc1", text)
    assert.matches("admin API on %(user ops%)", text)
    local replica = text:match("listening on %S+ %(.-replica (%x+)%)")
    assert.is_string(replica)
    -- work that logs from the HTTP workers and the reconciler
    assert.equal(202, (provision(b, "logged")))
    assert.equal("succeeded", b:wait_operation(inst("logged")).state)
    local lines = log_lines(b)
    assert.is_truthy(logged(b, "provision accepted"))   -- an HTTP worker's line
    assert.is_truthy(logged(b, "provision succeeded"))  -- the reconciler's
    for _, l in ipairs(lines) do assert.equal(replica, l.replica, cjson.encode(l) .. "\n" .. text) end
    -- the id operation locks carry is the same
    local db = b:store()
    local lock = db:get("lock/housekeeping")
    db:close()
    assert.equal(replica, cjson.decode(lock.value).owner)
  end)

  it("tells of director errors, retries and task resubmits, and hands the platform one-line descriptions", function()
    local sim = boshsim.start { task_delay = 0.3, subnets = { "services=127.30.0.0/24:127.30.0.2-127.30.0.50" } }
    local b
    finally(function()
      if b then b:cleanup() end
      sim:cleanup()
    end)
    b = Broker.start { config = bosh_config("dc1", sim, { "redis/1-server" }) }
    -- a task failing with a multi-line reason
    sim:faults { task_error = 1, task_error_message = "CPI error:\n  quota exceeded\n\tfor vm_type default" }
    assert.equal(202, (provision(b, "cpi")))
    local op = b:wait_operation(inst("cpi"))
    assert.equal("failed", op.state)
    assert.matches("CPI error: quota exceeded for vm_type default", op.description, 1, true)
    assert.is_nil(op.description:find("[\n\t]"))
    -- a director answering 500 for a while: retried, and said so in the log
    sim:faults { http_500 = 1000000 }
    assert.equal(202, (provision(b, "retried")))
    local retry = wait_until(function() return logged(b, "director unreachable, retrying") end, 10,
      "a 'director unreachable' line", b)
    assert.equal("dc1", retry.target)
    assert.equal("retried", retry.instance)
    sim:clear_faults()
    assert.equal("succeeded", b:wait_operation(inst("retried")).state)
    -- a director that loses its tasks (restarted): the task is submitted again
    sim:config { task_delay = 3 }
    assert.equal(202, (provision(b, "lost")))
    wait_until(function()
      local _, _, _, seed = b:call("GET", "/service_instances/lost")
      return seed.bosh_task_id
    end, 10, "a journaled task", b)
    sim:faults { restart = true }
    sim:config { task_delay = 0.3 }
    assert.equal("succeeded", b:wait_operation(inst("lost")).state)
    local vanished = logged(b, "BOSH task vanished, resubmitting")
    assert.equal("lost", vanished and vanished.instance)
    local again = logged(b, "BOSH task resubmitted")
    assert.equal("lost", again and again.instance)
  end)
end)

describe("forge.log context", function()
  it("adds its fields to every line after msg, renames a line's own field of that name, and refuses bad keys", function()
    local log = require "forge.log"
    finally(function() log.context(nil) end)
    log.context({ replica = "r-1" })
    local line = cjson.decode(log.encode("m", { replica = "mine", n = 1 }))
    assert.equal("r-1", line.replica)
    assert.equal("mine", line._replica)
    assert.equal(1, line.n)
    log.context({})
    assert.is_nil(cjson.decode(log.encode("m")).replica)
    assert.has_error(function() log.context({ msg = "x" }) end)
    assert.has_error(function() log.context({ ["a b"] = "x" }) end)
    assert.has_error(function() log.context({ replica = string.rep("x", 600) }) end)
  end)
end)
