-- The service author's contract: one validator for forge check and hot reload, hook results
-- checked at request time, parameters refused without a schema, unreadable folders kept, and
-- the local target's process primitives (init, user, stop_signal, health reports).
local Broker = require "spec.support.broker"
local contract = require "forge.contract"
local files = require "spec.support.files"
local lfs = require "lfs"
local proc = require "forge.proc"

local SVC = "c0c0c0c0-0000-4000-8000-000000000001"
local PLAN = "c0c0c0c0-0000-4000-8000-000000000002"

-- A service script; `parts` replaces pieces of the good one.
local function script(parts)
  parts = parts or {}
  return ([[
local service = {
  id = "%s", name = "contract", description = "%s", bindable = true,
  commands = { "sleep" },
  plans = { { id = "%s", name = "only", description = "the plan",
    schemas = { service_instance = { create = { parameters = {
      ["$schema"] = "http://json-schema.org/draft-07/schema#", type = "object", additionalProperties = false,
      properties = { evil = { type = "boolean", default = false } } } } } } } },
}

function service.deploy(ctx)
  local p = { name = "p", argv = { "sleep", "100000" } }
  %s
  return { processes = { p } }
end

function service.bind(ctx)
  %s
  return { credentials = { binding = ctx.binding_id } }
end

function service.unbind() return { run = {} } end
return service
]]):format(SVC, parts.description or "good", PLAN, parts.deploy or "", parts.bind or "")
end

local run = require("spec.support.shell").run

local function new_services(text)
  local dir = Broker.tmpdir()
  assert(lfs.mkdir(dir .. "/contract"))
  files.write(dir .. "/contract/service.lua", text)
  return dir
end

local function line_of(text, needle)
  local n = 0
  for line in (text .. "\n"):gmatch("([^\n]*)\n") do
    n = n + 1
    if line:find(needle, 1, true) then return n end
  end
end

describe("the contract", function()
  it("names unknown fields, wrong types and missing fields with their path", function()
    local problems = contract.problems("deploy", { processes = { { name = "p", argv = "sleep", bogus_field = 1,
      health = { tcp = 1, argv = { "x" } }, files = { ["/etc/passwd"] = "x" }, stop_signal = "STOP" } } })
    local by_path = {}
    for _, p in ipairs(problems) do by_path[p.path] = p.message end
    assert.matches("unknown field", by_path["processes[1].bogus_field"])
    assert.matches("must be a list", by_path["processes[1].argv"])
    assert.matches("exactly one of argv, redis, pg, tcp", by_path["processes[1].health"])
    assert.matches("relative path", by_path['processes[1].files["/etc/passwd"]'])
    assert.matches("signal name", by_path["processes[1].stop_signal"])
    local msgs = contract.all({ name = "x" }, "deploy", { processes = { { name = "a", argv = { "x" },
      after = { "b" } }, { name = "b", argv = { "x" } } } })
    assert.equal(1, #msgs)
    assert.matches("processes%[1%]%.after%[1%]: 'b' is not a process listed before a", msgs[1])
    assert.same({}, contract.problems("bind", { credentials = {}, run = { { redis = { port = 1, commands = {
      { "PING" } } } } } }))
    assert.matches("is required", contract.problems("bind", { run = {} })[1].message)
    assert.matches("unknown field", contract.problems("unbind", { credentials = {} })[1].message)
  end)

  it("checks the limits of a service and of its plans", function()
    local msgs = contract.script_problems({ name = "x", script = { limits = { memory_mb = 0.5, disk_mb = 1 },
      plans = { { limits = { pids = "many" } }, { limits = { memory_mb = 64, pids = 32, cpu_shares = 2, files = 64 } } } } })
    table.sort(msgs)
    assert.equal(3, #msgs)
    assert.matches("limits%.disk_mb: unknown field %(a limits has: cpu_shares, files, memory_mb, pids%)", msgs[1])
    assert.matches("limits%.memory_mb: must be a positive integer", msgs[2])
    assert.matches("plans%[1%]%.limits%.pids: must be a positive integer", msgs[3])
  end)

  it("is documented field by field in docs/authoring.md", function()
    local doc = files.read("docs/authoring.md")
    for _, name in ipairs(contract.field_names()) do
      assert.truthy(doc:find("`" .. name .. "`", 1, true), "docs/authoring.md does not describe `" .. name .. "`")
    end
  end)

  it("forge check names file:line and the field of a bad deploy result", function()
    local text = script { deploy = "p.bogus_field = 1" }
    local dir = new_services(text)
    local code, out = run("build/bin/forge check " .. dir .. "/contract")
    assert.equal(1, code, out)
    assert.matches("services/contract/service.lua:" .. line_of(text, "bogus_field") ..
      ": deploy: processes%[1%]%.bogus_field: unknown field", out)
    os.execute("rm -rf " .. dir)
  end)

  it("forge check names undeclared commands and an undefined global in bind", function()
    local text = script { deploy = 'p.argv = { "redis-server" }', bind = "local x = undefined_thing" }
    local dir = new_services(text)
    local code, out = run("build/bin/forge check " .. dir .. "/contract")
    assert.equal(1, code, out)
    assert.matches("service.lua:" .. line_of(text, "redis-server") .. ": command 'redis%-server' is run but not "
      .. "declared", out)
    assert.matches("service.lua:" .. line_of(text, "undefined_thing") .. ":.*undefined global 'undefined_thing'", out)
    os.execute("rm -rf " .. dir)
  end)

  it("checks backup and restore results: shapes, the files a restore puts back, the pair", function()
    assert.same({}, contract.problems("backup", { run = { { argv = { "sleep", "0" } } }, ready = { tcp = 1 },
      files = { ["dump.rdb"] = "p/dump.rdb" } }))
    local by_path = {}
    for _, p in ipairs(contract.problems("backup", { files = { ["../x"] = "/etc/passwd" }, ready = { argv = "x" } })) do
      by_path[p.path] = p.message
    end
    assert.matches("key must be a simple name", by_path['files["../x"]'])
    assert.matches("must be a list", by_path["ready.argv"])
    assert.matches("is required", contract.problems("backup", { run = {} })[1].message)
    local msgs = contract.all({ name = "x" }, "backup", { files = {} })
    assert.matches("files: must name at least one file", msgs[1])
    msgs = contract.all({ name = "x" }, "restore", { stop = "yes", put = { ["p/a"] = "a", ["p/b"] = "b" } }, { "a" })
    assert.equal(2, #msgs)
    assert.matches('put%["p/b"%]: the backup holds no file \'b\' %(it holds: a%)', table.concat(msgs, "\n"))
    assert.matches("stop: must be a boolean", table.concat(msgs, "\n"))

    local hooks = {
      pair = 'function service.backup() return { files = { d = "p/d" } } end',
      unknown = 'function service.backup() return { files = { d = "p/d" } } end\n'
        .. 'function service.restore() return { put = { ["p/d"] = "other" } } end',
      refuses = 'function service.backup() return { files = { d = "p/d" } } end\n'
        .. 'function service.restore() return "never" end',
      undeclared = 'function service.backup(ctx) return { run = { { argv = { "pg_dump" } } }, files = { d = "p/d" } } end\n'
        .. 'function service.restore() return {} end',
      good = 'function service.backup(ctx)\n'
        .. '  return { run = { { argv = { "sleep", "0" } } }, files = { d = ctx.scratch .. "/d" } }\nend\n'
        .. 'function service.restore(ctx) return { stop = true, put = { ["p/d"] = ctx.backup.files[1] } } end',
    }
    local want = {
      pair = "backup and restore come as a pair: define restore too",
      unknown = "restore: put%[\"p/d\"%]: the backup holds no file 'other'",
      refuses = "restore: refuses a backup of its own instance: never",
      undeclared = "command 'pg_dump' is run but not declared",
    }
    for name, code in pairs(hooks) do
      local text = script():gsub("return service\n$", code .. "\nreturn service\n")
      local dir = new_services(text)
      local status, out = run("build/bin/forge check " .. dir .. "/contract")
      os.execute("rm -rf " .. dir)
      if want[name] then
        assert.equal(1, status, out)
        assert.matches(want[name], out)
      else
        assert.equal(0, status, out)
      end
    end
  end)

  it("forge check warns when a free-form parameter reaches a file", function()
    local dir = Broker.tmpdir()
    assert(lfs.mkdir(dir .. "/contract"))
    local text = script { deploy = 'p.files = { ["p/motd"] = "motd " .. (ctx.parameters.motd or "") }' }
    files.write(dir .. "/contract/service.lua", (text:gsub('evil = { type = "boolean", default = false }',
      'motd = { type = "string", default = "hi" }')))
    local code, out = run("build/bin/forge check " .. dir .. "/contract")
    assert.equal(0, code, out)
    assert.matches("warning: .*parameter 'motd' reaches p/motd unescaped", out)
    os.execute("rm -rf " .. dir)
  end)
end)

describe("a running broker holds services to the same contract", function()
  local b, dir

  local function admin_services()
    local _, _, _, body = b:call("GET", "/admin/services")
    return body
  end

  local function wait_refused(timeout)
    local deadline = proc.monotonic() + (timeout or 10)
    repeat
      local body = admin_services()
      if body and body.errors and body.errors[1] then return body.errors[1] end
      proc.sleep(0.05)
    until proc.monotonic() > deadline
  end

  local function wait_description(want)
    local deadline = proc.monotonic() + 10
    repeat
      local _, _, _, body = b:call("GET", "/v2/catalog")
      if body.services[1] and body.services[1].description == want then return true end
      proc.sleep(0.05)
    until proc.monotonic() > deadline
  end

  local function provision(id, params)
    return b:call("PUT", "/v2/service_instances/" .. id, { service_id = SVC, plan_id = PLAN,
      organization_guid = "o", space_guid = "s", parameters = params })
  end

  before_each(function()
    dir = new_services(script())
    b = Broker.start { services_dir = dir }
  end)
  after_each(function()
    b:cleanup()
    os.execute("rm -rf " .. dir)
  end)

  it("hot reload refuses an undefined global in bind exactly as forge check does", function()
    assert.equal(201, (provision("i1")))
    local text = script { description = "broken", bind = "local x = undefined_thing" }
    files.write(dir .. "/contract/service.lua", text)
    local _, check_out = run("build/bin/forge check " .. dir .. "/contract")
    local check_line = check_out:match("([^\n]*undefined global[^\n]*)")
    assert.truthy(check_line, check_out)
    proc.kill(b.pid, b.start_time, "HUP")
    local refused = wait_refused()
    assert.truthy(refused, "the edit was not refused")
    assert.equal(check_line, refused.message)
    assert.truthy(refused.kept_version)
    -- new instances are pinned to the version still served, and bind works on them
    assert.equal(201, (provision("i2")))
    local status = b:call("PUT", "/v2/service_instances/i2/service_bindings/b2", { service_id = SVC, plan_id = PLAN })
    assert.equal(201, status)
    assert.matches("undefined global", b:read_log())
  end)

  it("a hook result that breaks the contract at request time fails that request, storing nothing", function()
    files.write(dir .. "/contract/service.lua", script { description = "evil",
      deploy = "if ctx.parameters.evil then p.bogus_field = 1 end" })
    proc.kill(b.pid, b.start_time, "HUP")
    assert.truthy(wait_description("evil"))
    local before = b:records()
    local status, _, _, body = provision("i3", { evil = true })
    assert.equal(500, status)
    assert.equal("ServiceScriptError", body.error)
    assert.matches("service.lua:%d+: deploy: processes%[1%]%.bogus_field: unknown field", body.description)
    local after = b:records()
    assert.is_nil(after["instance/i3"])
    for k in pairs(after) do
      if not k:match("^services/") and not k:match("^script/") then assert.equal(before[k], after[k], k) end
    end
  end)

  it("a plan without a parameter schema accepts no parameters", function()
    files.write(dir .. "/contract/service.lua", script { description = "no-schema" }:gsub("schemas = .-} } } } } } ",
      ""), nil)
    proc.kill(b.pid, b.start_time, "HUP")
    assert.truthy(wait_description("no-schema"))
    local status, _, _, body = provision("i4", { anything = 1 })
    assert.equal(400, status)
    assert.matches("parameters are not accepted by plan only", body.description)
    assert.equal(201, (provision("i5", {})))
  end)

  it("an unreadable service.lua or a folder link to nowhere is a refused edit, not a delete", function()
    os.remove(dir .. "/contract/service.lua")
    assert(lfs.mkdir(dir .. "/contract/service.lua"))     -- there, but not a readable file
    proc.kill(b.pid, b.start_time, "HUP")
    local refused = wait_refused()
    assert.truthy(refused)
    assert.matches("cannot read", refused.message)
    local _, _, _, catalog = b:call("GET", "/v2/catalog")
    assert.equal(1, #catalog.services)
    assert(lfs.rmdir(dir .. "/contract/service.lua"))
    assert(os.rename(dir .. "/contract", dir .. "/moved"))
    assert(lfs.link(dir .. "/nowhere", dir .. "/contract", true))
    proc.kill(b.pid, b.start_time, "HUP")
    proc.sleep(0.5)
    refused = wait_refused()
    assert.matches("contract", refused.service)
    _, _, _, catalog = b:call("GET", "/v2/catalog")
    assert.equal(1, #catalog.services)
  end)
end)

describe("process primitives of the local target", function()
  local PROBE = "7e0b7a10-0000-4000-8000-0000000000"
  local b, mark_dir

  local function provision(id, plan, params)
    return b:call("PUT", "/v2/service_instances/" .. id, { service_id = PROBE .. "01", plan_id = PROBE .. plan,
      organization_guid = "o", space_guid = "s", parameters = params })
  end

  setup(function()
    mark_dir = Broker.tmpdir()
    proc.chmod(mark_dir, tonumber("777", 8))
    -- the probe reports the signal that stopped it in mark_dir, outside its instance directory,
    -- where an isolated process cannot write (spec/targets/isolation_spec.lua covers isolation)
    b = Broker.start { services_dir = os.getenv("PWD") .. "/spec/fixtures/contract",
      env = { FORGE_LOCAL_COMMANDS = "sh,sleep,redis-server" },
      config = "targets:\n  local:\n    deploy_timeout: 3\n    isolation: none\n" }
  end)
  teardown(function()
    b:cleanup()
    os.execute("rm -rf " .. mark_dir)
  end)

  it("runs init once, then the process, as the service user in a closed directory; stops it with its signal",
    function()
      local svc_user = assert(proc.user("forge-svc"))
      local status, _, _, body = provision("p1", "10", { mark = mark_dir .. "/stopped" })
      assert.equal(201, status, body and body.description)
      local idir = b.state_dir .. "/instances/p1"
      assert.equal(tostring(svc_user.uid), (files.read(idir .. "/init-uid"):gsub("%s+$", "")))
      assert.equal(tostring(svc_user.uid), (files.read(idir .. "/main/uid"):gsub("%s+$", "")))
      assert.equal("ran\n", files.read(idir .. "/init-runs"))
      assert.equal("rwx------", lfs.attributes(idir, "permissions"))
      assert.equal(svc_user.uid, lfs.attributes(idir, "uid"))
      -- the service user cannot read the store; another user cannot read the instance
      local res = assert(proc.run { argv = { "/bin/cat", b.state_dir .. "/forge.db" }, user = "forge-svc" })
      assert.not_equal(0, res.code)
      res = assert(proc.run { argv = { "/bin/ls", idir }, user = "nobody" })
      assert.not_equal(0, res.code)
      -- bind's helper command runs as the service user too (its expect checks the output)
      assert.equal(201, (b:call("PUT", "/v2/service_instances/p1/service_bindings/x", { service_id = PROBE .. "01",
        plan_id = PROBE .. "10" })))
      local q = "?service_id=" .. PROBE .. "01&plan_id=" .. PROBE .. "10"
      assert.equal(200, (b:call("DELETE", "/v2/service_instances/p1/service_bindings/x" .. q)))
      assert.equal(200, (b:call("DELETE", "/v2/service_instances/p1" .. q)))
      assert.equal("got-INT\n", files.read(mark_dir .. "/stopped"))
    end)

  it("fails a provision whose init fails with the command's last output", function()
    local status, _, _, body = provision("p2", "20")
    assert.equal(500, status)
    assert.matches("main: init%[1%]: sh exited with 1: initdb: cannot be run as root", body.description)
  end)

  it("starts an init command the broker's death cut short on an empty `fresh` path, never through a symlink",
    function()
      local q = "?service_id=" .. PROBE .. "01&plan_id=" .. PROBE .. "60"
      local function half_made(id)
        assert.equal(202, (b:call("PUT", "/v2/service_instances/" .. id .. "?accepts_incomplete=true",
          { service_id = PROBE .. "01", plan_id = PROBE .. "60", organization_guid = "o", space_guid = "s" })))
        local idir = b.state_dir .. "/instances/" .. id
        assert.truthy(Broker.wait_for(function() return lfs.attributes(idir .. "/tried") end, 20))
        b:stop("KILL")
        assert.equal("half\n", files.read(idir .. "/work/part"))
        return idir
      end
      -- a link the service's user planted where the half-made directory was is not followed
      local idir = half_made("p6")
      local victim = mark_dir .. "/victim"
      assert(lfs.mkdir(victim))
      files.write(victim .. "/keep", "keep\n")
      assert(os.execute("rm -rf " .. idir .. "/work && ln -s " .. victim .. " " .. idir .. "/work"))
      b:launch()
      local op = b:wait_operation("/v2/service_instances/p6", 20)
      assert.equal("failed", op.state)
      assert.matches("fresh: work: .* is a symlink", op.description)
      assert.equal("keep\n", files.read(victim .. "/keep"))
      assert.equal(202, (b:call("DELETE", "/v2/service_instances/p6" .. q .. "&accepts_incomplete=true")))
      -- the half-made directory is removed, and the command runs again to its end
      idir = half_made("p7")
      b:launch()
      op = b:wait_operation("/v2/service_instances/p7", 20)
      assert.equal("succeeded", op.state, op.description)
      assert.is_string(lfs.attributes(idir .. "/work/done", "mode"))
      assert.equal(200, (b:call("DELETE", "/v2/service_instances/p7" .. q)))
    end)

  it("fails a provision that never gets healthy with the last check's answer and the process's log", function()
    local status, _, _, body = provision("p3", "30")
    assert.equal(500, status)
    assert.matches("not healthy after 3s: main not healthy yet: .*not accepting connections", body.description)
    assert.matches("hello from main", body.description)
    assert.same({}, Broker.marked_pids(b.state_dir, "p3"))
  end)

  it("moves a provision to another port when another program takes its port before it starts", function()
    local status = b:call("PUT", "/v2/service_instances/p5?accepts_incomplete=true", { service_id = PROBE .. "01",
      plan_id = PROBE .. "50", organization_guid = "o", space_guid = "s" })
    assert.equal(202, status)
    local _, _, _, view = b:call("GET", "/service_instances/p5")
    local taken = math.tointeger(view.ports[1])
    local idir = b.state_dir .. "/instances/p5"
    assert.truthy(Broker.wait_for(function() return lfs.attributes(idir .. "/waiting") end, 20), "init to run")
    local listener = assert(proc.spawn { argv = { "python3", "-c", "import socket,time\n"
      .. "s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
      .. "s.bind(('127.0.0.1', " .. taken .. ")); s.listen(); time.sleep(30)" } })
    finally(function() os.remove(idir .. ".port-taken"); proc.stop(listener.pid, listener.start_time, 2) end)
    assert.is_true(Broker.wait_for(function() return proc.tcp_check("127.0.0.1", taken) end, 20), "the listener")
    files.write(idir .. ".port-taken", "")
    local op = b:wait_operation("/v2/service_instances/p5", 20)
    assert.equal("succeeded", op.state, op.description)
    _, _, _, view = b:call("GET", "/service_instances/p5")
    assert.not_equal(taken, view.ports[1], b:read_log():sub(-3000))
    assert.matches("ports taken by another program", b:read_log())
    -- the taken port stays out of the pool for a while, even once the instance is gone
    local q = "?service_id=" .. PROBE .. "01&plan_id=" .. PROBE .. "50"
    assert.equal(200, (b:call("DELETE", "/v2/service_instances/p5" .. q)))
    assert.truthy(b:records()[string.format("port/%05d", taken)])
  end)

  it("fails a provision clearly when the service user cannot reach the state dir", function()
    local parent = Broker.tmpdir()
    proc.chmod(parent, tonumber("700", 8))
    assert(lfs.mkdir(parent .. "/state"))
    local closed = Broker.start { state_dir = parent .. "/state", services_dir = os.getenv("PWD") .. "/spec/fixtures/contract",
      env = { FORGE_LOCAL_COMMANDS = "sh,sleep,redis-server" } }
    finally(function() closed:cleanup(); os.execute("rm -rf " .. parent) end)
    local status, _, _, body = closed:call("PUT", "/v2/service_instances/c1", { service_id = PROBE .. "01",
      plan_id = PROBE .. "10", organization_guid = "o", space_guid = "s" })
    assert.equal(500, status)
    assert.matches("the service user forge%-svc cannot reach .*: " .. parent:gsub("%p", "%%%0") .. " is closed to other users",
      body.description)
  end)

  it("refuses a user the operator did not allow", function()
    local status, _, _, body = provision("p4", "40")
    assert.equal(500, status)
    assert.matches("user 'nobody' is not allowed on the local target", body.description)
    assert.is_nil(b:records()["instance/p4"])
  end)
end)
