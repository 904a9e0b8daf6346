-- The forge command line: help, check, render, new (and a running broker picking up a scaffold
-- installed with forge install; install itself: spec/scripts/install_spec.lua).
local Broker = require "spec.support.broker"
local proc = require "forge.proc"

local shell = require "spec.support.shell"

local run = shell.run

local forge = shell.forge

local function tmpdir()
  local d = Broker.tmpdir()
  return d
end

describe("forge help", function()
  it("prints usage for --help and each command's --help", function()
    local code, out = forge("--help")
    assert.equal(0, code)
    for _, cmd in ipairs({ "serve", "check", "render", "new", "install", "bosh-sim" }) do
      assert.is_truthy(out:find(cmd, 1, true), cmd)
    end
    for _, cmd in ipairs({ "check", "render", "new", "install", "serve" }) do
      local c, o = forge(cmd .. " --help")
      assert.equal(0, c, o)
      assert.matches("usage: forge " .. cmd, o)
    end
  end)

  it("lists every command and every FORGE_* variable with the setting it overrides", function()
    local _, out = forge("help")
    for _, cmd in ipairs({ "status", "instances", "instance ID", "ops", "retry ID", "cancel ID", "restart ID",
      "orphans", "metrics" }) do
      assert.is_truthy(out:find(" " .. cmd .. " ", 1, true), cmd)
    end
    local readme = require("spec.support.files").read("README.md")
    for _, e in ipairs(require("forge.config").environment()) do
      assert.matches("\n  " .. e.name .. " +" .. e.setting:gsub("%p", "%%%0"), out)
      assert.is_truthy(readme:find("`" .. e.name .. "`", 1, true), e.name .. " in README.md")
    end
    -- the variables that are no setting of forge.yml too: the README's and the admin commands'
    local named = { FORGE_CACERT = true, FORGE_CLIENT_CERT = true, FORGE_CLIENT_KEY = true }
    for name in readme:gmatch("`(FORGE_[%u_]+)`") do named[name] = true end
    for name in pairs(named) do
      assert.matches("\n  " .. name:gsub("%p", "%%%0") .. " ", out)
    end
    for _, cmd in ipairs({ "status", "instances", "instance", "ops", "retry", "cancel", "restart", "orphans",
      "metrics" }) do
      local c, o = forge(cmd .. " --help")
      assert.equal(0, c, o)
      assert.matches("usage: forge " .. cmd, o)
      assert.matches("exit status: 0 ok, 1 ", o, 1, true)
    end
  end)

  it("shows bosh-sim's real usage, and its exit codes match it", function()
    local code, out = forge("bosh-sim --help")
    assert.equal(0, code)
    assert.matches("^usage: forge bosh%-sim %[options%]", out)
    assert.matches("exit status: 0 stopped by a signal, 1 cannot listen, 2 usage error", out, 1, true)
    assert.equal(2, (forge("bosh-sim --bogus")))
    assert.equal(2, (forge("bosh-sim --auth kerberos")))
    local dir = tmpdir()
    finally(function() os.execute("rm -rf " .. dir) end)
    assert.equal(1, (forge("bosh-sim --listen 192.0.2.1:1 --state " .. dir)))
  end)

  it("exits 2 with the usage on unknown commands and options", function()
    local code, out = forge("frobnicate")
    assert.equal(2, code)
    assert.matches("unknown command 'frobnicate'", out)
    code = forge("check --bogus")
    assert.equal(2, code)
    code = forge("render redis")
    assert.equal(2, code)
  end)
end)

describe("forge check and render", function()
  it("passes the shipped services", function()
    local code, out = forge("check services")
    assert.equal(0, code, out)
    assert.matches("ok  services/redis", out)
  end)

  it("reports broken services with file:line and exits 1", function()
    local dir = tmpdir()
    finally(function() os.execute("rm -rf " .. dir) end)
    os.execute("mkdir -p " .. dir .. "/broken " .. dir .. "/noplans " .. dir .. "/badschema")
    local function write(path, text) local f = io.open(path, "w") f:write(text) f:close() end
    write(dir .. "/broken/service.lua", "local s = {}\nreturn s +\n")
    write(dir .. "/noplans/service.lua", "return { id = 'a', name = 'noplans', description = 'd', bindable = true,"
      .. " plans = {}, deploy = function() end, bind = function() end, unbind = function() end }\n")
    write(dir .. "/badschema/service.lua", "return { id = 'b', name = 'badschema', description = 'd', bindable = true,"
      .. " plans = { { id = 'p', name = 'p', description = 'd', schemas = { service_instance = { create = {"
      .. " parameters = { type = 'object' } } } } } }, deploy = function() end, bind = function() end,"
      .. " unbind = function() end }\n")
    local code, out = forge("check " .. dir)
    assert.equal(1, code)
    assert.matches("services/broken/service.lua:3:", out)
    assert.matches("services/noplans/service.lua:1: service.plans must list at least one plan", out, 1, true)
    assert.matches("services/badschema/service.lua:1: plans%[1%]%.schemas%.service_instance%.create%.parameters", out)
    assert.matches("3 service%(s%) checked, 3 with problems", out)
  end)

  it("warns about a plan whose limits are above the local target's caps, as the config sets them", function()
    local dir = tmpdir()
    finally(function() os.execute("rm -rf " .. dir) end)
    assert.equal(0, (forge("new cache --services " .. dir)))
    local path = dir .. "/cache/service.lua"
    local files = require "spec.support.files"
    local text = files.read(path)
    files.write(path, (text:gsub('\n  commands = ', '\n  limits = { memory_mb = 9000 },\n  commands = ', 1)))
    local code, out = forge("check " .. dir .. " --config /dev/null")
    assert.equal(0, code, out)
    assert.matches("warning: services/cache/service.lua:%d+: plan default: limits.memory_mb = 9000 is above what "
      .. "the local target allows %(targets.local.max_limits.memory_mb = 8192%)", out)
    files.write(dir .. "/forge.yml", "targets: {local: {max_limits: {memory_mb: 16384}}}\n")
    code, out = forge("check " .. dir .. " --config " .. dir .. "/forge.yml")
    assert.equal(0, code, out)
    assert.is_nil(out:find("max_limits", 1, true), out)
  end)

  it("renders a plan as YAML without touching any state", function()
    local code, out = forge("render redis 3-servers --params '{\"maxmemory_mb\": 32}'")
    assert.equal(0, code, out)
    local state = os.getenv("PWD") .. "/state"
    assert.matches("# state_dir: " .. state .. " (the instance's files go under " .. state .. "/instances/<id>)", out,
      1, true)
    assert.is_nil(io.open(state .. "/forge.db"))
    assert.matches("redis%-2/redis.conf", out)
    assert.matches("replicaof 127.0.0.1 30000", out)
    local c2, o2 = forge("render redis 1-server --params '{\"maxmemory_mb\": 1}'")
    assert.equal(1, c2)
    assert.matches("parameters.maxmemory_mb: must be at least 16", o2, 1, true)
    assert.equal(1, (forge("render redis 9-servers")))
    assert.equal(1, (forge("render nope 1-server")))
    assert.equal(2, (forge("render redis 1-server --params '[1'")))
  end)

  it("renders the BOSH manifest of a plan with --target", function()
    local code, out = forge("render redis 3-servers --target sample --params '{\"maxmemory_mb\": 64}'")
    assert.equal(0, code, out)
    assert.matches("instances: 3", out, 1, true)
    assert.matches("10.244.0.12", out, 1, true)
    assert.matches("maxmemory_mb: 64", out, 1, true)
    local c2, o2 = forge("render redis 1-server --target nowhere")
    assert.equal(1, c2)
    assert.matches("no BOSH target 'nowhere'", o2, 1, true)
  end)
end)

describe("forge new and install", function()
  local dir, pkgs
  setup(function()
    dir, pkgs = tmpdir(), tmpdir()
  end)
  teardown(function() os.execute("rm -rf " .. dir .. " " .. pkgs) end)

  it("scaffolds a service that passes check at once, with fresh ids", function()
    local code, out = forge("new cache --services " .. dir)
    assert.equal(0, code, out)
    for _, f in ipairs({ "service.lua", "templates/settings.yml", "README.md", "spec/cache_spec.lua" }) do
      assert.is_not_nil(io.open(dir .. "/cache/" .. f), f)
    end
    -- neutral: nothing of any shipped service in it
    for _, f in ipairs({ "service.lua", "templates/settings.yml", "README.md", "spec/cache_spec.lua" }) do
      assert.is_nil(io.open(dir .. "/cache/" .. f):read("a"):lower():find("redis", 1, true), f)
    end
    local again = forge("new cache --services " .. dir)
    assert.equal(1, again)
    assert.equal(2, (forge("new 'Bad Name' --services " .. dir)))
    forge("new other --services " .. dir)
    local a = io.open(dir .. "/cache/service.lua"):read("a"):match('id = "([%x%-]+)"')
    local b = io.open(dir .. "/other/service.lua"):read("a"):match('id = "([%x%-]+)"')
    assert.are_not.equal(a, b)
  end)

  local function pack(name, folder, extra)
    return run(string.format("cd %s && tar -czf %s/%s.tgz %s %s", dir, pkgs, name, extra or "", folder))
  end

  it("is picked up by a running broker", function()
    local target = tmpdir()
    os.execute("ln -s " .. os.getenv("PWD") .. "/services/redis " .. target .. "/redis")
    local b = Broker.start { services_dir = target }
    finally(function() b:cleanup(); os.execute("rm -rf " .. target) end)
    pack("cache", "cache")
    assert.equal(0, (forge("install " .. pkgs .. "/cache.tgz --services " .. target)))
    local deadline = proc.monotonic() + 10
    local names
    repeat
      proc.sleep(0.1)
      local _, _, _, body = b:call("GET", "/v2/catalog")
      names = {}
      for _, s in ipairs(body.services) do names[#names + 1] = s.name end
    until #names == 2 or proc.monotonic() > deadline
    table.sort(names)
    assert.same({ "cache", "redis" }, names)
    -- the scaffold's own spec runs its whole lifecycle through a broker, as `make test` runs it
    local code, out = run("lua5.4 /usr/bin/busted " .. dir .. "/cache/spec/cache_spec.lua")
    assert.equal(0, code, out)
    assert.matches("2 tests", out)
  end)
end)
