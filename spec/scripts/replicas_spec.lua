-- Several broker replicas on one real etcd: any replica answers any request, no instance is
-- driven by two replicas, a dead replica's operations are taken over, and an etcd outage is a
-- clean 503 that heals by itself.
local Broker = require "spec.support.broker"
local client = require "spec.support.client"
local etcd_server = require "support.etcd"
local cjson = require "cjson"
local proc = require "forge.proc"

local R = Broker.redis

local function provision_body(plan) return { service_id = R.service, plan_id = plan or R.one,
  organization_guid = "o", space_guid = "s" } end

describe("replicas on etcd", function()
  local etcd, shared, replicas

  local function replica(extra_env)
    local env = { FORGE_STORE = "etcd", FORGE_ETCD_ENDPOINTS = etcd.url, FORGE_ETCD_PREFIX = "replicas/",
      FORGE_STATE_DIR = shared, FORGE_LOCK_TTL = "2" }
    for k, v in pairs(extra_env or {}) do env[k] = v end
    local b = Broker.start { env = env, pool_base = 32700, pool = 40 }
    replicas[#replicas + 1] = b
    return b
  end

  setup(function()
    etcd = etcd_server.start { fast = true }
    shared = Broker.tmpdir()
    replicas = {}
  end)
  teardown(function()
    for _, b in ipairs(replicas) do b:cleanup() end
    Broker.forget_instances(shared)
    os.execute("rm -rf " .. shared)
    etcd:cleanup()
  end)

  it("answer any request on any replica", function()
    local a, b = replica(), replica()
    local _, ca = a:call("GET", "/v2/catalog")
    local _, cb = b:call("GET", "/v2/catalog")
    assert.equal(ca, cb)
    assert.equal(202, (a:call("PUT", "/v2/service_instances/any?accepts_incomplete=true", provision_body())))
    assert.equal("succeeded", b:wait_operation("/v2/service_instances/any").state)
    local status, _, _, body = b:call("PUT", "/v2/service_instances/any/service_bindings/x",
      { service_id = R.service, plan_id = R.one })
    assert.equal(201, status)
    local fs, _, _, fetched = a:call("GET", "/v2/service_instances/any/service_bindings/x")
    assert.equal(200, fs)
    assert.same(body.credentials, fetched.credentials)
  end)

  it("make exactly one deployment from 100 concurrent provisions spread over two replicas", function()
    local a, b = replicas[1], replicas[2]
    local reqs = {}
    for i = 1, 100 do
      local r = (i % 2 == 0) and a or b
      reqs[i] = { method = "PUT", url = r:url("/v2/service_instances/split?accepts_incomplete=true"),
        user = r.user, password = r.password, body = cjson.encode(provision_body()),
        headers = { ["X-Broker-API-Version"] = "2.17", ["Content-Type"] = "application/json" } }
    end
    local ops = {}
    for _, r in ipairs(client.parallel(reqs)) do
      assert.is_true(r.status == 200 or r.status == 201 or r.status == 202, r.body)
      if r.status == 202 then ops[r.json.operation] = true end
    end
    local n = 0
    for _ in pairs(ops) do n = n + 1 end
    assert.equal(1, n)
    assert.equal("succeeded", a:wait_operation("/v2/service_instances/split").state)
    assert.equal(1, #Broker.marked_pids(shared, "split"))
  end)

  it("take over the operation of a replica killed mid-provision, with no double deployment", function()
    for _, b in ipairs(replicas) do b:stop("TERM") end
    local dying = replica { FORGE_FAILPOINT = "after_spawn" }
    assert.equal(202, (dying:call("PUT", "/v2/service_instances/orphan?accepts_incomplete=true", provision_body())))
    local w = proc.wait(dying.pid, 20)
    assert.equal(99, w.code)
    dying.pid = nil
    local heir = replica()
    assert.equal("succeeded", heir:wait_operation("/v2/service_instances/orphan", 30).state)
    assert.equal(1, #Broker.marked_pids(shared, "orphan"))
  end)

  it("answer 503 with Retry-After while etcd is down, write nothing half, and recover by themselves", function()
    local b = replicas[#replicas]
    etcd:stop()
    local status, raw, hdrs, body = b:call("PUT", "/v2/service_instances/outage?accepts_incomplete=true",
      provision_body())
    assert.equal(503, status, raw)
    assert.equal("ServiceUnavailable", body.error)
    assert.matches("store", body.description)
    assert.is_string(hdrs["retry-after"])
    assert.equal(503, (b:call("GET", "/v2/service_instances/any/last_operation")))
    etcd:start()
    local deadline = proc.monotonic() + 20
    local s
    repeat
      s = b:call("GET", "/v2/service_instances/any/last_operation")
      if s ~= 200 then proc.sleep(0.2) end
    until s == 200 or proc.monotonic() > deadline
    assert.equal(200, s)
    assert.equal(404, (b:call("GET", "/v2/service_instances/outage/last_operation")))
    assert.equal(202, (b:call("PUT", "/v2/service_instances/outage?accepts_incomplete=true", provision_body())))
    assert.equal("succeeded", b:wait_operation("/v2/service_instances/outage").state)
  end)
end)
