-- BOSH target config (forge.yml targets.<name>), IP pool expansion, and the choice of target.
local Bosh = require "forge.targets.bosh"
local config = require "forge.config"
local targets = require "forge.targets"

local write = require("spec.support.files").temp

local function load(text)
  local p = write(text)
  local c, err = config.load(p, function() end)
  os.remove(p)
  return c, err
end

local DC1 = [[
targets:
  dc1:
    type: bosh
    url: https://10.0.0.6:25555
    client: broker
    client_secret: s
    insecure: true
    networks:
    - {name: services, cidr: 10.0.1.0/24, static: ["10.0.1.10 - 10.0.1.12", 10.0.1.20], azs: [z1, z2]}
    stemcell: {os: ubuntu-jammy, version: "1.500"}
    releases: {redis: 18.0.0}
    services: [redis/3-servers]
]]

describe("BOSH target config", function()
  it("reads a BOSH target next to the local one", function()
    local c = assert(load(DC1))
    local t = c.targets.dc1
    assert.equal("bosh", t.type)
    assert.equal("broker", t.client)
    assert.same({ "10.0.1.10 - 10.0.1.12", "10.0.1.20" }, t.networks[1].static)
    assert.same({ redis = "18.0.0" }, t.releases)
    assert.equal(30000, c.targets["local"].ports.from)
  end)

  it("refuses bad targets with a message naming the setting", function()
    local cases = {
      { "targets: {dc1: {type: vsphere}}", "targets.dc1.type must be 'bosh'" },
      { "targets: {dc1: {type: bosh, url: x}}", "url must be an http" },
      { "targets: {dc1: {type: bosh, url: 'https://d', networks: [{name: net, static: [10.0.0.1]}]}}", "username and password" },
      { "targets: {dc1: {type: bosh, url: 'https://d', client: c, networks: [{name: net, static: [10.0.0.1]}]}}",
        "client needs client_secret" },
      { "targets: {dc1: {type: bosh, url: 'https://d', username: u, password: p}}", "at least one network" },
      { "targets: {dc1: {type: bosh, url: 'https://d', username: u, password: p, networks: [{name: net, static: "
        .. "['10.0.0.9 - 10.0.0.1']}]}}", "bad static entry" },
      { "targets: {dc1: {type: bosh, url: 'https://d', username: u, password: p, networks: [{name: net, cidr: "
        .. "10.0.0.0/30, static: [10.0.0.9]}]}}", "outside 10.0.0.0/30" },
      { "targets: {dc1: {type: bosh, url: 'https://d', username: u, password: p, colour: red}}",
        "unknown setting 'targets.dc1.colour'" },
      { "targets: {dc1: {type: bosh, url: 'https://d', username: u, password: p, networks: {name: net}}}",
        "networks must be a list" },
    }
    for _, case in ipairs(cases) do
      local c, err = load(case[1])
      assert.is_nil(c, case[1])
      assert.matches(case[2], err, 1, true)
    end
  end)

  it("refuses one plan claimed by two targets", function()
    local text = DC1 .. DC1:gsub("^targets:\n", ""):gsub("dc1", "dc2")
    local c, err = load(text)
    assert.is_nil(c)
    assert.matches("'redis/3-servers' is already served by target dc1", err, 1, true)
  end)
end)

describe("IP pools", function()
  it("expands static entries in order, without duplicates", function()
    assert.same({ "10.0.1.254", "10.0.1.255", "10.0.2.0", "10.0.2.1", "10.0.3.5" },
      Bosh.expand_static({ "10.0.1.254 - 10.0.2.1", "10.0.3.5", "10.0.2.0" }))
  end)
end)

describe("target choice", function()
  local function svc(script) return { name = "redis", script = script } end
  local c = assert(load(DC1))
  local reg = targets.new(c, "/tmp/forge-targets-spec")

  it("has local plus one driver per BOSH target", function()
    assert.same({ "dc1", "local" }, reg:names())
    assert.equal("bosh", reg.by_name.dc1.kind)
    assert.equal("local", reg.default)
  end)

  it("follows the operator's mapping, then plan.target, service.target, then local", function()
    assert.equal("dc1", reg:choose(svc {}, { name = "3-servers" }))
    assert.equal("local", reg:choose(svc {}, { name = "1-server" }))
    assert.equal("dc1", reg:choose(svc { target = "local" }, { name = "x", target = "dc1" }))
    assert.equal("dc1", reg:choose(svc { target = "dc1" }, { name = "x" }))
    local none, err = reg:choose(svc {}, { name = "x", target = "nowhere" })
    assert.is_nil(none)
    assert.matches("wants target 'nowhere', which is not configured", err, 1, true)
  end)

  it("finds the driver of a record, local for records without a target", function()
    assert.equal("local", reg:of({ id = "a" }).kind)
    assert.equal("dc1", reg:of({ id = "a", target = "dc1" }).name)
    assert.is_nil((reg:of({ id = "a", target = "gone" })))
  end)
end)
