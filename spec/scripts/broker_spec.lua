-- Bad input and faults against a real broker: every case answers a clear OSB error and
-- leaves the store unchanged.
local Broker = require "spec.support.broker"
local client = require "spec.support.client"

local R = Broker.redis

local function provision_body(plan)
  return { service_id = R.service, plan_id = plan or R.one, organization_guid = "o", space_guid = "s" }
end

describe("broker input checks", function()
  local b, rev

  setup(function() b = Broker.start() end)
  teardown(function() if b then b:cleanup() end end)
  before_each(function() rev = b:records() end)
  after_each(function() assert.same(rev, b:records(), "a refused request changed the store") end)

  local function expect_error(status, code, method, path, body, headers)
    local got, raw, hdrs, json = b:call(method, path, body, headers)
    assert.equal(status, got, raw)
    assert.is_table(json, raw)
    assert.equal(code, json.error)
    assert.is_string(json.description)
    assert.is_true(#json.description > 0)
    assert.equal("application/json", hdrs["content-type"])
    return json, hdrs
  end

  it("401 on missing or wrong credentials, before anything else", function()
    for _, creds in ipairs({ {}, { user = "admin", password = "wrong" }, { user = "x", password = b.password } }) do
      local status, _, hdrs, json = client.request("PUT", b:url("/v2/service_instances/x"),
        { user = creds.user, password = creds.password, body = "" })
      assert.equal(401, status)
      assert.equal("Unauthorized", json.error)
      assert.matches("Basic", hdrs["www-authenticate"])
    end
  end)

  it("412 on a missing, empty or non-2.x version header", function()
    for _, v in ipairs({ "", "1.0", "3.0", "two" }) do
      local status, _, _, json = client.request("GET", b:url("/v2/catalog"),
        { user = b.user, password = b.password, headers = { ["X-Broker-API-Version"] = v } })
      assert.equal(412, status)
      assert.equal("PreconditionFailed", json.error)
    end
    local status = client.request("GET", b:url("/v2/catalog"), { user = b.user, password = b.password })
    assert.equal(412, status)
  end)

  it("accepts every 2.x version seen in the field", function()
    for _, v in ipairs({ "2.13", "2.14", "2.15", "2.16", "2.17" }) do
      assert.equal(200, (b:call("GET", "/v2/catalog", nil, { ["X-Broker-API-Version"] = v })))
    end
  end)

  it("answers a 2.13 client a catalog in 2.13's shape, with its own ETag", function()
    local _, _, h17, new = b:call("GET", "/v2/catalog")
    local _, _, h13, old = b:call("GET", "/v2/catalog", nil, { ["X-Broker-API-Version"] = "2.13" })
    assert.is_true(new.services[1].instances_retrievable)
    assert.is_table(new.services[1].plans[1].maintenance_info)
    for _, svc in ipairs(old.services) do
      assert.is_nil(svc.instances_retrievable)
      assert.is_nil(svc.bindings_retrievable)
      assert.is_nil(svc.allow_context_updates)
      for _, plan in ipairs(svc.plans) do
        assert.is_nil(plan.maintenance_info)
        assert.is_nil(plan.maximum_polling_duration)
        assert.is_nil(plan.plan_updateable)
        assert.is_table(plan.schemas)        -- 2.13 has schemas
      end
    end
    assert.not_equal(h17.etag, h13.etag)
    assert.equal(304, (b:call("GET", "/v2/catalog", nil, { ["X-Broker-API-Version"] = "2.13",
      ["If-None-Match"] = h13.etag })))
  end)

  it("400 on malformed JSON and non-object bodies", function()
    expect_error(400, "MalformedJSON", "PUT", "/v2/service_instances/m1?accepts_incomplete=true", "{")
    for _, body in ipairs({ "[]", "null", "42", '"x"', "" }) do
      expect_error(400, "BadRequest", "PUT", "/v2/service_instances/m1?accepts_incomplete=true", body)
    end
  end)

  it("400 on JSON that lenient decoders take: hex, leading zeros, NaN, Infinity, huge numbers, bad UTF-8, depth",
    function()
      local base = '{"service_id":"' .. R.service .. '","plan_id":"' .. R.one .. '","organization_guid":"o",'
        .. '"space_guid":"s","parameters":{"maxmemory_mb":%s}}'
      for _, v in ipairs({ "0x10", "016", "NaN", "Infinity", "-Infinity", "1e999" }) do
        local status, raw, _, body = b:call("PUT", "/v2/service_instances/j1?accepts_incomplete=true", base:format(v))
        assert.equal(400, status, v .. ": " .. raw)
        assert.matches("^Malformed", body.error, 1, false)
      end
      local status, raw = b:call("PUT", "/v2/service_instances/j1?accepts_incomplete=true",
        base:format("\"\255\254\""))
      assert.equal(400, status, raw)
      assert.matches("invalid UTF%-8", raw)
      local deep = ("{\"a\":"):rep(990) .. "1" .. ("}"):rep(990)
      status, raw = b:call("PUT", "/v2/service_instances/j1?accepts_incomplete=true",
        base:format(deep))
      assert.equal(400, status, raw)
      assert.matches("nested", raw)
    end)

  it("400 on missing fields, unknown service or plan", function()
    local cases = {
      { plan_id = R.one, organization_guid = "o", space_guid = "s" },
      { service_id = R.service, organization_guid = "o", space_guid = "s" },
      { service_id = R.service, plan_id = R.one, space_guid = "s" },
      { service_id = R.service, plan_id = R.one, organization_guid = "o" },
      { service_id = "nope", plan_id = R.one, organization_guid = "o", space_guid = "s" },
      { service_id = R.service, plan_id = "nope", organization_guid = "o", space_guid = "s" },
      { service_id = R.service, plan_id = R.one, organization_guid = "", space_guid = "s" },
      { service_id = R.service, plan_id = R.one, organization_guid = "o", space_guid = "s", parameters = "x" },
    }
    for _, body in ipairs(cases) do
      expect_error(400, "BadRequest", "PUT", "/v2/service_instances/m2?accepts_incomplete=true", body)
    end
  end)

  it("413 on a body over the limit", function()
    local status = b:call("PUT", "/v2/service_instances/big?accepts_incomplete=true", string.rep("x", 1048577))
    assert.equal(413, status)
  end)

  it("400 on ids with '/', '..', NUL or 300+ characters", function()
    for _, id in ipairs({ "a%2Fb", "..", "a..b", "a%00b", string.rep("i", 300), "%2e%2e", "a%20b" }) do
      expect_error(400, "BadRequest", "PUT", "/v2/service_instances/" .. id .. "?accepts_incomplete=true",
        provision_body())
    end
    expect_error(400, "BadRequest", "PUT", "/v2/service_instances/ok/service_bindings/..%2Fx", { service_id = R.service,
      plan_id = R.one })
  end)

  it("422 AsyncRequired without accepts_incomplete for an async-only plan", function()
    expect_error(422, "AsyncRequired", "PUT", "/v2/service_instances/sync1", provision_body(R.three))
    expect_error(422, "AsyncRequired", "PUT", "/v2/service_instances/sync1?accepts_incomplete=false",
      provision_body(R.three))
  end)

  it("410 for deletes of unknown instances and bindings, 404 for unknown last_operation", function()
    expect_error(410, "Gone", "DELETE", "/v2/service_instances/none?service_id=" .. R.service .. "&plan_id=" .. R.one
      .. "&accepts_incomplete=true")
    expect_error(410, "Gone", "DELETE", "/v2/service_instances/none/service_bindings/b?service_id=" .. R.service
      .. "&plan_id=" .. R.one)
    expect_error(404, "NotFound", "GET", "/v2/service_instances/none/last_operation")
  end)

  it("400 for deletes without service_id or plan_id", function()
    expect_error(400, "BadRequest", "DELETE", "/v2/service_instances/none?plan_id=" .. R.one)
    expect_error(400, "BadRequest", "DELETE", "/v2/service_instances/none?service_id=&plan_id=" .. R.one)
  end)

  it("checks the version header before parsing the body", function()
    local status, _, _, json = client.request("PUT", b:url("/v2/service_instances/v1?accepts_incomplete=true"),
      { user = b.user, password = b.password, body = "{not json" })
    assert.equal(412, status)
    assert.equal("PreconditionFailed", json.error)
  end)

  it("400 for a malformed query string and for unbinds without service_id or plan_id", function()
    expect_error(400, "BadRequest", "GET", "/v2/service_instances/x/last_operation?operation=%zz")
    expect_error(400, "BadRequest", "DELETE", "/v2/service_instances/x/service_bindings/y?plan_id=" .. R.one)
    expect_error(400, "BadRequest", "DELETE", "/v2/service_instances/x/service_bindings/y?service_id=" .. R.service)
  end)

  it("404 on a bind to an unknown instance", function()
    expect_error(404, "NotFound", "PUT", "/v2/service_instances/none/service_bindings/b1",
      { service_id = R.service, plan_id = R.one })
  end)

  it("404 for unknown endpoints and 405 for wrong methods", function()
    expect_error(404, "NotFound", "GET", "/v2/nothing")
    expect_error(405, "MethodNotAllowed", "POST", "/v2/catalog", "{}")
  end)

  it("echoes X-Broker-API-Request-Identity and gives every response a request id", function()
    local _, _, hdrs = b:call("GET", "/v2/catalog", nil, { ["X-Broker-API-Request-Identity"] = "req-42" })
    assert.equal("req-42", hdrs["x-broker-api-request-identity"])
    assert.is_string(hdrs["x-request-id"])
  end)
end)

describe("broker faults", function()
  it("answers a clear error when the port pool is exhausted, creating nothing", function()
    local b = Broker.start { pool = 1 }
    finally(function() b:cleanup() end)
    assert.equal(202, (b:call("PUT", "/v2/service_instances/p1?accepts_incomplete=true", provision_body())))
    assert.equal("succeeded", b:wait_operation("/v2/service_instances/p1").state)
    local rev = b:records()
    local status, raw, hdrs, json = b:call("PUT", "/v2/service_instances/p2?accepts_incomplete=true", provision_body())
    assert.equal(503, status, raw)
    assert.matches("port pool", json.description)
    assert.is_string(hdrs["retry-after"])
    assert.same(rev, b:records())
    assert.equal(404, (b:call("GET", "/v2/service_instances/p2/last_operation")))
  end)

  it("fails the operation with the reason when redis-server cannot start, releasing its ports", function()
    local dir = Broker.tmpdir()
    os.execute("cp -r services/redis " .. dir .. "/badredis && printf '  no-such-directive: \"yes\"\\n' >> " .. dir ..
      "/badredis/templates/local.yml && sed " ..
      "-e 's/6f0f3c1e-3b5e-4c2a-9a43-1f6b7f3f2f01/0b9e0f39-0000-4000-8000-000000000001/' " ..
      "-e 's/name = \"redis\"/name = \"badredis\"/' " ..
      "-e 's/68ec5c0f-7289-47a5-87ba-aff068f3aa2f/0b9e0f39-0000-4000-8000-000000000002/' " ..
      "-e 's/8ff52a10-1314-4a33-8127-68d8c4961c05/0b9e0f39-0000-4000-8000-000000000003/' " ..
      "-i " .. dir .. "/badredis/service.lua")
    local b = Broker.start { services_dir = dir, pool = 1 }
    finally(function() b:cleanup(); os.execute("rm -rf " .. dir) end)
    local body = { service_id = "0b9e0f39-0000-4000-8000-000000000001", plan_id = "0b9e0f39-0000-4000-8000-000000000002",
      organization_guid = "o", space_guid = "s" }
    assert.equal(202, (b:call("PUT", "/v2/service_instances/bad?accepts_incomplete=true", body)))
    local op = b:wait_operation("/v2/service_instances/bad")
    assert.equal("failed", op.state)
    assert.matches("redis%-0 exited during start%-up", op.description)
    assert.matches("no%-such%-directive", op.description)
    -- the only port in the pool is free again: a second instance gets it
    assert.equal(202, (b:call("PUT", "/v2/service_instances/bad2?accepts_incomplete=true", body)))
  end)

  it("refuses to start commands outside targets.local.commands, storing nothing", function()
    local dir = Broker.tmpdir()
    os.execute("mkdir -p " .. dir .. "/rogue")
    local f = io.open(dir .. "/rogue/service.lua", "w")
    f:write([[
local service = { id = "70000000-0000-4000-8000-000000000001", name = "rogue", description = "d", bindable = false,
  commands = { "touch" },
  plans = { { id = "70000000-0000-4000-8000-000000000002", name = "p", description = "d" } } }
function service.deploy(ctx)
  return { processes = { { name = "x", argv = { "touch", ctx.dir .. "/../../pwned" } } } }
end
function service.bind() return {} end
function service.unbind() return {} end
return service
]])
    f:close()
    local b = Broker.start { services_dir = dir }
    finally(function() b:cleanup(); os.execute("rm -rf " .. dir) end)
    local before = b:records()
    local status, raw, _, json = b:call("PUT", "/v2/service_instances/r?accepts_incomplete=true",
      { service_id = "70000000-0000-4000-8000-000000000001", plan_id = "70000000-0000-4000-8000-000000000002",
        organization_guid = "o", space_guid = "s" })
    assert.equal(500, status, raw)
    assert.equal("ServiceScriptError", json.error)
    assert.matches("command 'touch' is not approved on the local target", json.description, 1, true)
    assert.same(before, b:records())
    assert.is_nil(io.open(b.state_dir .. "/pwned"))
  end)

  it("guards the admin API with its own credentials when they are configured", function()
    local b = Broker.start { env = { FORGE_ADMIN_USER = "ops", FORGE_ADMIN_PASSWORD = "ops-secret" } }
    finally(function() b:cleanup() end)
    local admin = { user = "ops", password = "ops-secret" }
    local status = client.request("GET", b:url("/admin/services"), { user = b.user, password = b.password })
    assert.equal(401, status)
    local s2, _, _, body = client.request("GET", b:url("/admin/services"), admin)
    assert.equal(200, s2)
    assert.is_table(body.services)
    assert.equal(401, (client.request("GET", b:url("/v2/catalog"), { user = "ops", password = "ops-secret",
      headers = { ["X-Broker-API-Version"] = "2.17" } })))
  end)

  it("has no admin API without admin credentials: the broker's own never open it", function()
    local b = Broker.start { env = { FORGE_ADMIN_PASSWORD = "" } }
    finally(function() b:cleanup() end)
    for _, path in ipairs({ "/admin/services", "/admin/instances", "/admin/instances/x", "/admin/operations",
        "/admin/orphans", "/admin/quotas" }) do
      local status, raw, _, body = client.request("GET", b:url(path), { user = b.user, password = b.password })
      assert.equal(404, status, raw)
      assert.matches("the admin API is off", body.description)
    end
  end)

  it("prints the broker password at start only when it generated it", function()
    local b = Broker.start()
    local g = Broker.start { env = { FORGE_PASSWORD = "" } }
    finally(function() b:cleanup(); g:cleanup() end)      -- busted keeps one finally per test
    assert.is_nil(b:read_log():find(b.password, 1, true))
    assert.matches("password as configured", b:read_log())
    assert.matches("generated password %S+", g:read_log())
  end)

  it("stops gracefully on SIGTERM", function()
    local b = Broker.start()
    finally(function() b:cleanup() end)
    local w = b:stop("TERM")
    assert.equal(0, w.code)
    assert.matches('"stopped"', b:read_log())
  end)
end)
