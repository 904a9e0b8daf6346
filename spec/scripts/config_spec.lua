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

  it("reads quotas in the documented shape and refuses wrong types", function()
    local p = write(table.concat({
      "quotas:",
      "  plans: {'redis/1-server': 100}",
      "  services: {redis: 200}",
      "  organization: 20",
      "  space: 10",
      "  organizations: {org-a: 50}",
      "  weights: {memory_mb: {plans: {'redis/1-server': 256, 'redis/3-servers': 768.5}, total: 65536, organization: 8192}}",
    }, "\n") .. "\n")
    finally(function() os.remove(p) end)
    local c = assert(config.load(p, env {}))
    assert.same({ plans = { ["redis/1-server"] = 100 }, services = { redis = 200 }, organization = 20, space = 10,
      organizations = { ["org-a"] = 50 }, weights = { memory_mb = { plans = { ["redis/1-server"] = 256,
      ["redis/3-servers"] = 768.5 }, total = 65536, organization = 8192 } } }, c.quotas)
    assert.is_nil(assert(config.load(nil, env {})).quotas)
    local q = assert(config.load(nil, env { FORGE_QUOTAS = '{"space": 3}' })).quotas
    assert.same({ space = 3 }, q)
    for text, msg in pairs({
      ["quotas: {space: 1.5}\n"] = "quotas.space must be a whole number >= 0",
      ["quotas: {plans: [1]}\n"] = "quotas.plans must be a map",
      ["quotas: {services: {redis: x}}\n"] = "quotas.services.redis must be a whole number >= 0",
      ["quotas: {weights: {m: {total: -1}}}\n"] = "quotas.weights.m.total must be a number >= 0",
      ["quotas: {weights: {m: {space: 1}}}\n"] = "unknown setting 'quotas.weights.m.space'",
      ["quotas: {per_org: 1}\n"] = "unknown setting 'quotas.per_org'",
      ["quotas: 5\n"] = "quotas must be a map",
    }) do
      local f = write(text)
      local cfg, err = config.load(f, env {})
      os.remove(f)
      assert.is_nil(cfg)
      assert.matches(msg, err, 1, true)
    end
    local cfg, err = config.load(nil, env { FORGE_QUOTAS = "{space: [" })
    assert.is_nil(cfg)
    assert.is_string(err)
  end)

  it("takes the metrics token from the file or FORGE_METRICS_TOKEN, and checks numbers in FORGE_* values", function()
    local p = write("metrics: {token: from-file}\n")
    finally(function() os.remove(p) end)
    assert.equal("from-file", assert(config.load(p, env {})).metrics.token)
    assert.equal("from-env", assert(config.load(p, env { FORGE_METRICS_TOKEN = "from-env" })).metrics.token)
    assert.is_nil(assert(config.load(nil, env {})).metrics.token)
    for name, value in pairs({ FORGE_THREADS = "2.5", FORGE_SYNC_TIMEOUT = "soon", FORGE_LOCK_TTL = "x",
      FORGE_SANDBOX_MEMORY = "lots" }) do
      local c, err = config.load(nil, env { [name] = value })
      assert.is_nil(c)
      assert.matches(name .. " must be a", err, 1, true)
    end
    assert.equal(7, assert(config.load(nil, env { FORGE_LOCK_TTL = "7" })).lock_ttl)
  end)

  it("refuses etcd endpoints without a scheme", function()
    local c, err = config.load(nil, env { FORGE_STORE = "etcd", FORGE_ETCD_ENDPOINTS = "10.0.0.5:2379" })
    assert.is_nil(c)
    assert.matches("etcd.endpoints[1] must be an http:// or https:// URL", err, 1, true)
    assert.is_truthy(config.load(nil, env { FORGE_STORE = "etcd",
      FORGE_ETCD_ENDPOINTS = "http://10.0.0.5:2379,https://10.0.0.6:2379/" }))
  end)

  it("checks the settings naming services and plans against the loaded ones", function()
    local registry = { by_name = { redis = { script = { plans = { { name = "1-server" }, { name = "3-servers" } } } } },
      errors = {} }
    local c = assert(config.load(nil, env { FORGE_QUOTAS = "{plans: {'redis/1-server': 1, 'redis/9': 1}, "
      .. "services: {redis: 2, nosuch: 1}, weights: {m: {plans: {redis: 3}}}}" }))
    c.targets.dc1 = { type = "bosh", services = { "redis/3-servers", "redis/3-server", "memcached" } }
    local errors, warnings = config.check_references(c, registry)
    assert.same({
      "targets.dc1.services[2]: 'redis/3-server': service redis has no plan '3-server'",
      "targets.dc1.services[3]: 'memcached' names no loaded service",
      "quotas.plans: 'redis/9': service redis has no plan '9'",
      "quotas.services: 'nosuch' names no loaded service",
      "quotas.weights.m.plans: 'redis' must name a plan as service/plan",
    }, errors)
    assert.same({}, warnings)
    -- with a refused service around, an unknown service name may be that one: a warning
    registry.errors = { { service = "memcached" } }
    errors, warnings = config.check_references(c, registry)
    assert.equal(3, #errors)
    assert.same({ "targets.dc1.services[3]: 'memcached' names no loaded service (a refused one?)",
      "quotas.services: 'nosuch' names no loaded service (a refused one?)" }, warnings)
  end)

  it("lists every FORGE_* variable it reads, each overriding its setting", function()
    local samples = { FORGE_LISTEN = "127.0.0.1:1", FORGE_PORTS = "40000-40010", FORGE_THREADS = "3",
      FORGE_SYNC_TIMEOUT = "3", FORGE_SANDBOX_CPU = "3", FORGE_SANDBOX_MEMORY = "3000000", FORGE_LOCK_TTL = "3",
      FORGE_STORE = "etcd", FORGE_ETCD_ENDPOINTS = "http://127.0.0.1:1", FORGE_LOG_LEVEL = "debug",
      FORGE_QUOTAS = "{space: 1}", FORGE_LOCAL_COMMANDS = "sleep", FORGE_LOCAL_USER = "someone",
      FORGE_LOCAL_ISOLATION = "none", FORGE_TLS_CLIENT_AUTH = "optional" }
    local default = assert(config.load(nil, env {}))
    local function at(c, path)
      for part in path:gmatch("[^.]+") do c = c and c[part] end
      return c
    end
    local names = {}
    for _, e in ipairs(config.environment()) do
      names[#names + 1] = e.name
      local c = assert(config.load(nil, env { [e.name] = samples[e.name] or "/sample" }))
      assert.is_false(require("forge.util").deep_equal(at(default, e.setting), at(c, e.setting)), e.name)
    end
    -- every FORGE_ name in the config module is in the list
    local src = require("spec.support.files").read("scripts/forge/config.lua")
    local listed = " " .. table.concat(names, " ") .. " "
    for name in src:gmatch("FORGE_[A-Z_]*[A-Z]") do assert.is_truthy(listed:find(" " .. name .. " ", 1, true), name) end
  end)
end)
