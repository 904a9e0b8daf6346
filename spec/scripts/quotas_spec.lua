-- Quotas (docs/admin.md): limits per organization, space, plan, service and on summed plan
-- weights; racing provisions never overshoot; deprovisions give their share back; the counters
-- are recounted from the records at start.
local Broker = require "spec.support.broker"
local concurrently = require("spec.support.shell").concurrently

local D = Broker.dummy

local CONFIG = [[
quotas:
  organization: 10
  organizations: { big: 30 }
  space: 25
  plans: { "dummy/unbindable": 2 }
  weights:
    memory_mb:
      plans: { "dummy/large": 300 }
      organization: 700
]]

local function put(b, id, plan, org, space)
  return b:call("PUT", "/v2/service_instances/" .. id .. "?accepts_incomplete=true", { service_id = D.service,
    plan_id = plan, organization_guid = org, space_guid = space or "s-" .. org })
end

local function usage(b, scope, name, resource)
  local _, _, _, body = b:call("GET", "/admin/quotas")
  for _, q in ipairs(body.quotas) do
    if q.scope == scope and q.name == name and q.resource == (resource or "instances") then return q end
  end
end

local function live_in(b, org)
  local _, _, _, body = b:call("GET", "/admin/instances?limit=500&org=" .. org)
  return #body.instances
end

describe("quotas", function()
  local b
  setup(function() b = Broker.start { fixtures = true, pool = 200, config = CONFIG } end)
  teardown(function() b:cleanup() end)

  it("let 100 racing provisions in one organization create exactly its limit", function()
    local codes = concurrently(b, 100, function(i)
      return string.format("-X PUT -d '{\"service_id\":\"%s\",\"plan_id\":\"%s\",\"organization_guid\":\"race\","
        .. "\"space_guid\":\"s%d\"}' '%s'", D.service, D.small, i % 5, b:url("/v2/service_instances/race" .. i
        .. "?accepts_incomplete=true"))
    end)
    local counts = {}
    for _, c in ipairs(codes) do counts[c] = (counts[c] or 0) + 1 end
    assert.equal(10, counts[202])
    assert.equal(90, counts[403])
    assert.equal(10, live_in(b, "race"))
    assert.same({ scope = "organization", name = "race", resource = "instances", used = 10, limit = 10 },
      usage(b, "organization", "race"))
  end)

  it("refuses with a clear QuotaExceeded, and gives the share back on deprovision", function()
    local status, _, _, body = put(b, "race-more", D.small, "race")
    assert.equal(403, status)
    assert.equal("QuotaExceeded", body.error)
    assert.equal("organization race has 10 of 10 instances", body.description)
    assert.is_nil(b:instance("race-more"))

    local victim
    for i = 1, 100 do if b:instance("race" .. i) then victim = "race" .. i break end end
    b:wait_operation("/v2/service_instances/" .. victim, 30)
    assert.equal(202, (b:call("DELETE", "/v2/service_instances/" .. victim .. "?accepts_incomplete=true&service_id="
      .. D.service .. "&plan_id=" .. D.small)))
    b:wait_operation("/v2/service_instances/" .. victim, 30)
    assert.equal(9, usage(b, "organization", "race").used)
    assert.equal(202, (put(b, "race-more", D.small, "race")))
    assert.equal(10, usage(b, "organization", "race").used)
  end)

  it("limits a plan broker-wide and a space, with per-organization overrides", function()
    assert.equal(202, (put(b, "u1", D.unbindable, "big", "sp")))
    assert.equal(202, (put(b, "u2", D.unbindable, "big", "sp")))
    local status, _, _, body = put(b, "u3", D.unbindable, "other")
    assert.equal(403, status)
    assert.equal("plan dummy/unbindable has 2 of 2 instances", body.description)
    for i = 1, 23 do assert.equal(202, (put(b, "sp" .. i, D.small, "big", "sp"))) end
    status, _, _, body = put(b, "sp-over", D.small, "big", "sp")
    assert.equal(403, status)
    assert.equal("space sp has 25 of 25 instances", body.description)
    assert.equal(25, usage(b, "organization", "big").used)
    assert.equal(30, usage(b, "organization", "big").limit)
  end)

  it("sums plan weights per organization", function()
    assert.equal(202, (put(b, "w1", D.large, "heavy")))
    assert.equal(202, (put(b, "w2", D.large, "heavy")))
    local status, _, _, body = put(b, "w3", D.large, "heavy")
    assert.equal(403, status)
    assert.equal("organization heavy has 600 of 700 memory_mb (plan dummy/large needs 300)", body.description)
    assert.equal(600, usage(b, "organization", "heavy", "memory_mb").used)
  end)

  it("recounts the usage from the records when the broker starts", function()
    b:stop()
    local db = b:store()
    assert(db:txn { success = { { op = "put", key = "usage/org/race", value = '{"count":0}' },
      { op = "delete", key = "usage/space/sp" } } })
    db:close()
    b:launch()
    assert.equal(10, usage(b, "organization", "race").used)
    assert.equal(25, usage(b, "space", "sp").used)
    assert.equal(403, (put(b, "race-again", D.small, "race")))
  end)
end)
