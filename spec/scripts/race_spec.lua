-- Races: many identical or distinct requests at once against a real broker.
local Broker = require "spec.support.broker"
local client = require "spec.support.client"
local cjson = require "cjson"

local R = Broker.redis

describe("concurrent requests", function()
  local b
  setup(function() b = Broker.start { pool = 8 } end)
  teardown(function() if b then b:cleanup() end end)

  local function request(method, path, body)
    return { method = method, url = b:url(path), user = b.user, password = b.password,
      headers = { ["X-Broker-API-Version"] = "2.17", ["Content-Type"] = "application/json" },
      body = body and cjson.encode(body) }
  end

  it("100 identical provisions of one id make exactly one deployment", function()
    local reqs = {}
    for i = 1, 100 do
      reqs[i] = request("PUT", "/v2/service_instances/race?accepts_incomplete=true",
        { service_id = R.service, plan_id = R.one, organization_guid = "o", space_guid = "s" })
    end
    local results = client.parallel(reqs)
    assert.equal(100, #results)
    local ops = {}
    for _, r in ipairs(results) do
      assert.is_true(r.status == 200 or r.status == 201 or r.status == 202, r.body)
      if r.status == 202 then ops[r.json.operation] = true end
    end
    local n = 0
    for _ in pairs(ops) do n = n + 1 end
    assert.equal(1, n, "every 202 names the same operation")
    assert.equal("succeeded", b:wait_operation("/v2/service_instances/race").state)
    assert.equal(1, #Broker.marked_pids(b.state_dir, "race"))
    local db = b:store()
    local ports = db:range("port/")
    db:close()
    assert.equal(1, #ports, "exactly one port allocated")
  end)

  it("100 concurrent binds of distinct ids give 100 distinct working credentials", function()
    local reqs = {}
    for i = 1, 100 do
      reqs[i] = request("PUT", "/v2/service_instances/race/service_bindings/b" .. i, { service_id = R.service,
        plan_id = R.one })
    end
    local results = client.parallel(reqs)
    local seen = {}
    for i, r in ipairs(results) do
      assert.equal(201, r.status, r.body)
      local c = r.json.credentials
      assert.is_nil(seen[c.username], "binding " .. i .. " reuses a username")
      assert.is_nil(seen[c.password], "binding " .. i .. " reuses a password")
      seen[c.username], seen[c.password] = true, true
    end
    local sample = results[37].json.credentials
    local p = io.popen(string.format("REDISCLI_AUTH='%s' redis-cli -h %s -p %d --user %s --no-auth-warning PING",
      sample.password, sample.host, sample.port, sample.username))
    assert.equal("PONG", (p:read("a"):gsub("%s+$", "")))
    p:close()
  end)
end)
