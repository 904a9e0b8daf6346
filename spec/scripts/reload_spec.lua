-- Hot reload and sandboxed services in a running broker: edits are picked up without dropping
-- anything, broken edits keep the running version, instances stay on their version, and a
-- hostile hook fails only its own request.
local Broker = require "spec.support.broker"
local proc = require "forge.proc"

local SVC = "5e5e5e5e-0000-4000-8000-000000000001"
local PLAN = "5e5e5e5e-0000-4000-8000-000000000002"
local HOSTILE = "5e5e5e5e-0000-4000-8000-0000000000f1"
local HOSTILE_PLAN = "5e5e5e5e-0000-4000-8000-0000000000f2"

local function script(version, extra)
  return ([[
local service = {
  id = "%s", name = "versioned", description = "version %s", bindable = true, commands = { "sleep" },
  plans = { { id = "%s", name = "only", description = "the plan", schemas = { service_instance = { update = {
    parameters = { ["$schema"] = "http://json-schema.org/draft-07/schema#", type = "object" } } } } } },
}
function service.deploy() return { processes = { { name = "p", argv = { "sleep", "100000" } } } } end
function service.bind(ctx)
  return { credentials = { version = "%s", binding = ctx.binding_id }, run = { { argv = { "sleep", "%s" } } } }
end
function service.unbind() return { run = {} } end
%s
return service
]]):format(SVC, version, PLAN, version, extra and extra.sleep or "0", extra and extra.tail or "")
end

local HOSTILE_SCRIPT = ([[
local service = {
  id = "%s", name = "hostile", description = "misbehaves on purpose", bindable = true, commands = { "sleep" },
  plans = { { id = "%s", name = "only", description = "the plan" } },
}
function service.deploy() return { processes = { { name = "p", argv = { "sleep", "100000" } } } } end
function service.bind(ctx)
  if ctx.binding_id == "loop" then while true do end end
  if ctx.binding_id == "pcall-loop" then while true do pcall(function() while true do end end) end end
  if ctx.binding_id == "memory" then local t = {} for i = 1, 1e9 do t[i] = ("x"):rep(1000000) .. i end end
  if ctx.binding_id == "escape" then return { credentials = { out = io.open("/etc/passwd"):read("a") } } end
  if ctx.binding_id == "plain" then error("bind refused on purpose") end
  return { credentials = {} }      -- what forge check's sample binding gets
end
function service.unbind() return { run = {} } end
return service
]]):format(HOSTILE, HOSTILE_PLAN)

local write = require("spec.support.files").write

describe("hot reload", function()
  local b, dir

  local function catalog_description()
    local _, _, _, body = b:call("GET", "/v2/catalog")
    for _, s in ipairs(body.services) do if s.id == SVC then return s.description end end
  end

  local function wait_description(want, timeout)
    local deadline = proc.monotonic() + (timeout or 10)
    while catalog_description() ~= want and proc.monotonic() < deadline do proc.sleep(0.05) end
    return catalog_description()
  end

  local function provision(id)
    return b:call("PUT", "/v2/service_instances/" .. id, { service_id = SVC, plan_id = PLAN,
      organization_guid = "o", space_guid = "s" })
  end

  local function bind(id, bid)
    return b:call("PUT", "/v2/service_instances/" .. id .. "/service_bindings/" .. bid,
      { service_id = SVC, plan_id = PLAN })
  end

  setup(function()
    dir = Broker.tmpdir()
    os.execute("mkdir -p " .. dir .. "/versioned " .. dir .. "/hostile")
    write(dir .. "/versioned/service.lua", script("v1"))
    write(dir .. "/hostile/service.lua", HOSTILE_SCRIPT)
    b = Broker.start { services_dir = dir }
  end)
  teardown(function()
    if b then b:cleanup() end
    os.execute("rm -rf " .. dir)
  end)

  it("serves an edited service on the next catalog fetch", function()
    assert.equal("version v1", catalog_description())
    assert.equal(201, (provision("old")))
    write(dir .. "/versioned/service.lua", script("v2"))
    assert.equal("version v2", wait_description("version v2"))
  end)

  it("keeps the running version when an edit is broken, and reports it", function()
    write(dir .. "/versioned/service.lua", "local service = {\n  id = 'x',\n  oops oops\n")
    proc.sleep(0.6)
    assert.equal("version v2", catalog_description())
    local _, _, _, status = b:call("GET", "/admin/services")
    local found
    for _, e in ipairs(status.errors) do
      if e.service == "versioned" then found = e end
    end
    assert.is_table(found)
    assert.matches("services/versioned/service.lua:3:", found.message)
    assert.is_string(found.kept_version)
    assert.matches("service refused", b:read_log())
    -- forge status shows the same, and exits 1
    local p = io.popen(string.format("FORGE_ADMIN_USER=%s FORGE_ADMIN_PASSWORD=%s build/bin/forge status --url %s 2>&1",
      b.admin_user, b.admin_password, b:url("")))
    local out = p:read("a")
    local _, _, code = p:close()
    assert.equal(1, code, out)
    assert.matches("REFUSED versioned: services/versioned/service.lua:3:", out, 1, true)
    assert.matches("versioned%s+version %x+", out)
  end)

  it("rescans on SIGHUP", function()
    write(dir .. "/versioned/service.lua", script("v3"))
    proc.kill(b.pid, b.start_time, "HUP")
    assert.equal("version v3", wait_description("version v3"))
  end)

  it("binds an instance with the version that rendered it; new instances get the new one", function()
    local status, _, _, body = bind("old", "b-old")
    assert.equal(201, status)
    assert.equal("v1", body.credentials.version)
    assert.equal(201, (provision("new")))
    local _, _, _, nbody = bind("new", "b-new")
    assert.equal("v3", nbody.credentials.version)
    -- an update that is not a maintenance_info upgrade keeps the instance's version
    local us, uraw = b:call("PATCH", "/v2/service_instances/old", { service_id = SVC, parameters = { x = 1 } })
    assert.equal(200, us, uraw)
    local _, _, _, after = bind("old", "b-old-2")
    assert.equal("v1", after.credentials.version)
  end)

  it("finishes a request in flight on the version it started with", function()
    write(dir .. "/versioned/service.lua", script("v4", { sleep = "1" }))
    assert.equal("version v4", wait_description("version v4"))
    assert.equal(201, (provision("slow")))
    local out = os.tmpname()
    local cmd = string.format("curl -s -o %s -u %s:%s -H 'X-Broker-API-Version: 2.17' -X PUT "
      .. "-H 'Content-Type: application/json' -d '{\"service_id\":\"%s\",\"plan_id\":\"%s\"}' "
      .. "%s/v2/service_instances/slow/service_bindings/inflight", out, b.user, b.password, SVC, PLAN, b:url(""))
    local p = io.popen(cmd)
    proc.sleep(0.3)
    write(dir .. "/versioned/service.lua", script("v5"))
    p:close()
    local f = io.open(out)
    local text = f:read("a")
    f:close()
    os.remove(out)
    assert.matches('"version":"v4"', text)
    assert.equal("version v5", wait_description("version v5"))
  end)
end)

describe("sandboxed service hooks", function()
  local b, dir
  setup(function()
    dir = Broker.tmpdir()
    os.execute("mkdir -p " .. dir .. "/hostile && ln -s " .. os.getenv("PWD") .. "/spec/fixtures/services/dummy " .. dir)
    write(dir .. "/hostile/service.lua", HOSTILE_SCRIPT)
    b = Broker.start { services_dir = dir, env = { FORGE_SANDBOX_CPU = "0.5" } }
    assert.equal(201, (b:call("PUT", "/v2/service_instances/h", { service_id = HOSTILE, plan_id = HOSTILE_PLAN,
      organization_guid = "o", space_guid = "s" })))
  end)
  teardown(function()
    if b then b:cleanup() end
    os.execute("rm -rf " .. dir)
  end)

  for _, case in ipairs({ { "loop", "cpu time" }, { "pcall-loop", "cpu time" }, { "memory", "memory" },
    { "escape", "undefined global 'io'" }, { "plain", "bind refused on purpose" } }) do
    it("fails only the request whose hook misbehaves: " .. case[1], function()
      local t0 = proc.monotonic()
      local status, raw, _, body = b:call("PUT", "/v2/service_instances/h/service_bindings/" .. case[1],
        { service_id = HOSTILE, plan_id = HOSTILE_PLAN })
      assert.equal(500, status, raw)
      assert.equal("ServiceScriptError", body.error)
      assert.matches(case[2], body.description, 1, true)
      assert.matches("services/hostile/service.lua:", body.description, 1, true)
      assert.is_true(proc.monotonic() - t0 < 10)
      -- the broker and the other services go on
      assert.equal(200, (b:call("GET", "/v2/catalog")))
      assert.equal(201, (b:call("PUT", "/v2/service_instances/ok-" .. case[1], { service_id = Broker.dummy.service,
        plan_id = Broker.dummy.small, organization_guid = "o", space_guid = "s" })))
    end)
  end
end)
