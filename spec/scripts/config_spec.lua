local config = require "forge.config"

local write = require("spec.support.files").temp

local function env(t) return function(name) return t[name] end end

describe("forge.config", function()
  it("has sane defaults", function()
    local c = assert(config.load(nil, env {}))
    assert.equal("127.0.0.1:5000", c.listen)
    assert.equal("admin", c.auth.username)
    assert.is_nil(c.auth.password)
    assert.equal(30000, c.targets["local"].ports.from)
    assert.equal(1048576, c.body_limit)
    assert.matches("^/", c.state_dir)
  end)

  it("reads the shipped forge.yml", function()
    local c = assert(config.load("forge.yml", env {}))
    assert.equal("127.0.0.1:5000", c.listen)
    assert.equal(30999, c.targets["local"].ports.to)
    assert.equal("namespaces", c.targets["local"].isolation)
    assert.same({ memory_mb = 1024, pids = 512, cpu_shares = 1024, files = 4096 }, c.targets["local"].limits)
  end)

  it("takes the local target's isolation from FORGE_LOCAL_ISOLATION, and limits from the file", function()
    local p = write("targets: {local: {limits: {memory_mb: 64}, max_limits: {memory_mb: 128}}}\n")
    finally(function() os.remove(p) end)
    local c = assert(config.load(p, env { FORGE_LOCAL_ISOLATION = "none" }))
    local lt = c.targets["local"]
    assert.equal("none", lt.isolation)
    assert.same({ memory_mb = 64, pids = 512, cpu_shares = 1024, files = 4096 }, lt.limits)
    assert.equal(128, lt.max_limits.memory_mb)
    -- a plan's limits override the defaults field by field; one above the cap is refused
    local target = require("forge.targets.local").new(lt, "/nonexistent")
    assert.same({ memory_mb = 96, pids = 16, cpu_shares = 1024, files = 4096 },
      target:limits({ limits = { pids = 16 } }, { limits = { memory_mb = 96 } }))
    local none, err = target:limits({}, { limits = { memory_mb = 256 } })
    assert.is_nil(none)
    assert.equal("limits.memory_mb = 256 is above what the local target allows (targets.local.max_limits.memory_mb "
      .. "= 128)", err)
  end)

  it("lets FORGE_* variables override the file", function()
    local p = write("listen: 127.0.0.1:6000\nauth: {username: u, password: p}\n")
    finally(function() os.remove(p) end)
    local c = assert(config.load(p, env { FORGE_LISTEN = "127.0.0.1:7000", FORGE_PASSWORD = "pw",
      FORGE_PORTS = "41000-41010", FORGE_STATE_DIR = "/tmp/st" }))
    assert.equal("127.0.0.1:7000", c.listen)
    assert.equal("u", c.auth.username)
    assert.equal("pw", c.auth.password)
    assert.same({ from = 41000, to = 41010 }, c.targets["local"].ports)
    assert.equal("/tmp/st", c.state_dir)
  end)

  it("refuses unknown keys, wrong types and bad ranges with a clear message", function()
    local cases = {
      { "listne: x\n", "unknown setting 'listne'" },
      { "threads: many\n", "threads must be an integer" },
      { "targets: {local: {ports: {from: 9000, to: 100}}}\n", "ports must be a range" },
      { "log_level: loud\n", "log_level" },
      { "- a\n- b\n", "must be a map" },
      { "listen: [\n", "" },
      { "targets: {local: {isolation: docker}}\n", "targets.local.isolation must be namespaces or none" },
      { "targets: {local: {hide: [etc]}}\n", "targets.local.hide[1] must be an absolute path" },
      { "targets: {local: {limits: {memory_mb: 0}}}\n", "targets.local.limits.memory_mb and" },
      { "targets: {local: {limits: {pids: 9000}}}\n", "targets.local.limits.pids (9000) is above "
        .. "targets.local.max_limits.pids (4096)" },
      { "targets: {local: {limits: {files: lots}}}\n", "targets.local.limits.files must be an integer" },
    }
    for _, case in ipairs(cases) do
      local p = write(case[1])
      local c, err = config.load(p, env {})
      os.remove(p)
      assert.is_nil(c)
      assert.matches(case[2], err, 1, true)
    end
    local c, err = config.load(nil, env { FORGE_PORTS = "lots" })
    assert.is_nil(c)
    assert.matches("FORGE_PORTS", err)
    assert.is_nil((config.load("/nonexistent/forge.yml", env {})))
  end)
end)
