-- forge.releases.targets: the BOSH targets a service's releases go to are the ones the broker
-- would pick for its plans (config claims, plan.target, service.target; any target for a
-- target_for hook), never the local target or a name the config does not define.
local releases = require "forge.releases"

local function bosh(services) return { type = "bosh", url = "http://127.0.0.1:1", services = services } end

local function script(fields)
  local s = { name = "cache", plans = { { name = "small" }, { name = "large" } } }
  for k, v in pairs(fields or {}) do s[k] = v end
  return s
end

describe("forge.releases.targets", function()
  it("follows the config's claims of the service and of single plans", function()
    local targets = { ["local"] = {}, a = bosh { "cache/small" }, b = bosh { "cache/large" }, c = bosh { "other" } }
    assert.same({ "a", "b" }, releases.targets(script(), targets))
    targets = { a = bosh { "cache" }, b = bosh {} }
    assert.same({ "a" }, releases.targets(script(), targets))
  end)

  it("uses plan.target and service.target for plans the config does not claim", function()
    local targets = { a = bosh {}, b = bosh { "cache/large" }, c = bosh {} }
    local s = script { target = "c" }
    s.plans[1].target = "a"
    assert.same({ "a", "b" }, releases.targets(s, targets))
    s.plans[1].target = nil
    assert.same({ "b", "c" }, releases.targets(s, targets))
    s.target = "local"
    assert.same({ "b" }, releases.targets(s, targets))
    s.target = "nowhere"
    assert.same({ "b" }, releases.targets(s, targets))
  end)

  it("sends a service with a target_for hook to every BOSH target, and none without BOSH targets", function()
    local targets = { ["local"] = {}, a = bosh {}, b = bosh {} }
    assert.same({ "a", "b" }, releases.targets(script { target_for = true }, targets))
    assert.same({}, releases.targets(script(), targets))
    assert.same({}, releases.targets(script { target_for = true }, { ["local"] = {} }))
  end)
end)
