-- IP allocation on a BOSH target under concurrency: provisions that all want the lowest free
-- IPs of the pool retry from a random point, so none gives up with 503.
local Broker = require "spec.support.broker"
local boshsim = require "spec.support.boshsim"
local concurrently = require("spec.support.shell").concurrently

local R = Broker.redis

describe("a BOSH target's IP pool under concurrency", function()
  local b, sim
  setup(function()
    sim = boshsim.start { auth = "basic", task_delay = 0.05, subnets = { "services=127.30.0.0/24:127.30.0.2-127.30.0.250" } }
    b = Broker.start { env = { FORGE_THREADS = "32" }, config = table.concat({
      "targets:", "  dc:", "    type: bosh", "    url: " .. sim.url, "    username: " .. sim.user,
      "    password: " .. sim.password, "    poll_interval: 0.1", "    networks:", "    - name: services",
      "      static: ['127.30.0.10 - 127.30.0.200']", "    services: [redis/1-server]" }, "\n") .. "\n" }
  end)
  teardown(function()
    if b then b:cleanup() end
    if sim then sim:cleanup() end
  end)

  it("gives 48 concurrent provisions distinct IPs without a 503", function()
    local codes = concurrently(b, 48, function(i)
      return string.format("-X PUT -d '{\"service_id\":\"%s\",\"plan_id\":\"%s\",\"organization_guid\":\"o\","
        .. "\"space_guid\":\"s\"}' '%s'", R.service, R.one, b:url("/v2/service_instances/ip" .. i .. "?accepts_incomplete=true"))
    end)
    local counts = {}
    for _, c in ipairs(codes) do counts[c] = (counts[c] or 0) + 1 end
    assert.same({ [202] = 48 }, counts)
    local seen = {}
    for i = 1, 48 do
      local _, _, _, view = b:call("GET", "/service_instances/ip" .. i)
      assert.equal(1, #view.ips)
      assert.is_nil(seen[view.ips[1]], view.ips[1] .. " given twice")
      seen[view.ips[1]] = true
    end
  end)
end)
