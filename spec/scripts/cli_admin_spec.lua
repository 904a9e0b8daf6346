-- The admin commands of the forge CLI against a real broker: status, instances, instance, ops,
-- retry, cancel, restart, orphans, metrics; tables, --json, progress lines, bad ids and filters,
-- wrong or missing credentials, an admin API that is off, a broker that does not answer.
local Broker = require "spec.support.broker"
local shell = require "spec.support.shell"
local cjson = require "cjson"
local lfs = require "lfs"
local proc = require "forge.proc"

local D = Broker.dummy
local STUCK = Broker.stuck

-- The environment words giving the CLI broker b's admin credentials (or `password`).
local function creds(b, password)
  return "FORGE_ADMIN_USER='" .. b.admin_user .. "' FORGE_ADMIN_PASSWORD='" .. (password or b.admin_password) .. "'"
end

-- `forge ARGS --url <b>` with b's admin credentials: exit code, output (stderr included).
local function cli(b, args, password)
  return shell.run("env " .. creds(b, password) .. " " .. shell.FORGE .. " " .. args .. " --url " .. b:url(""))
end

local function json_of(out) return cjson.decode(out) end

describe("the forge admin commands", function()
  local b
  setup(function()
    b = Broker.start { fixtures = true, pool = 20, config = "targets:\n  local:\n    deploy_timeout: 4\n" }
    b:provision_async("a1", D.service, D.small, "o1", "s1")
    b:provision_async("a2", D.service, D.small, "o1", "s2")
    b:provision_async("a3", D.service, D.small, "o2", "s3")
    for _, id in ipairs({ "a1", "a2", "a3" }) do b:wait_operation("/v2/service_instances/" .. id, 30) end
  end)
  teardown(function() b:cleanup() end)

  it("forge instances: a table, filters, pages, --json, and clear refusals", function()
    local code, out = cli(b, "instances")
    assert.equal(0, code, out)
    assert.matches("^ID +SERVICE +PLAN +STATE +TARGET +ORG +SPACE +UPDATED +OPERATION\n", out)
    assert.matches("\na1 +dummy +small +running +local +o1 +s1 +%d+s +provision succeeded\n", out)
    assert.is_nil(out:find("more:", 1, true))
    code, out = cli(b, "instances --org o1 --state running")
    assert.equal(0, code, out)
    assert.matches("\na2 ", out)
    assert.is_nil(out:find("\na3 ", 1, true))
    code, out = cli(b, "instances --limit 2")
    assert.equal(0, code, out)
    assert.matches("more: forge instances --after a2\n", out, 1, true)
    code, out = cli(b, "instances --after a2")
    assert.equal(0, code, out)
    assert.matches("\na3 ", out)
    assert.is_nil(out:find("\na1 ", 1, true))
    code, out = cli(b, "instances --json --space s3")
    assert.equal(0, code, out)
    local _, _, _, api = b:call("GET", "/admin/instances?space=s3")
    assert.same(api, json_of(out))
    code, out = cli(b, "instances --state sleeping")
    assert.equal(1, code)
    assert.matches("forge instances: the broker refused: 400 BadRequest: state must be one of", out, 1, true)
    assert.equal(1, (cli(b, "instances --limit ten")))
    assert.equal(2, (cli(b, "instances --colour blue")))
    assert.equal(2, (cli(b, "instances a1")))
  end)

  it("forge instance: the record, its bindings and processes; bad and unknown ids", function()
    local status, _, _, bind = b:call("PUT", "/v2/service_instances/a1/service_bindings/k1",
      { service_id = D.service, plan_id = D.small })
    assert.equal(201, status)
    local code, out = cli(b, "instance a1")
    assert.equal(0, code, out)
    assert.matches("^instance a1\n  service  dummy / small on local, running\n", out)
    assert.matches("\noperations\nID +TYPE +STATE +STARTED +TOOK +DESCRIPTION\nprovision%-%S+ +provision +succeeded", out)
    assert.matches("\nbindings\nID +STATE +CREATED +OPERATION\nk1 +created ", out)
    assert.matches("\nprocesses\nNAME +PID +ALIVE +HEALTHY +RESTARTS +LAST EXIT\nsleeper +%d+ +true", out)
    assert.is_nil(out:find(bind.credentials.password, 1, true))
    code, out = cli(b, "instance a1 --json")
    assert.equal(0, code, out)
    local detail = json_of(out)
    assert.equal("a1", detail.id)
    assert.equal("sleep", detail.deployment.processes[1].argv[1])
    assert.is_nil(out:find(bind.credentials.password, 1, true))
    code, out = cli(b, "instance nope")
    assert.equal(1, code)
    assert.matches("404 NotFound: instance nope does not exist", out, 1, true)
    code, out = cli(b, "instance 'a b'")
    assert.equal(1, code)
    assert.matches("400 BadRequest", out, 1, true)
    assert.equal(2, (cli(b, "instance")))
    assert.equal(2, (cli(b, "instance a1 a2")))
  end)

  it("forge restart: waits for the restart and says how it ended; refuses what cannot be restarted", function()
    local code, out = cli(b, "restart a2")
    assert.equal(0, code, out)
    assert.matches("restart: restart restart%-%S+ succeeded: instance restarted\n", out)
    code, out = cli(b, "restart a2 --json")
    assert.equal(0, code, out)
    local answers = {}                              -- stdout: JSON lines; stderr: the progress lines
    for line in out:gmatch("[^\n]+") do if line:sub(1, 1) == "{" then answers[#answers + 1] = json_of(line) end end
    assert.equal(2, #answers, out)
    assert.equal(answers[1].operation, answers[2].id)
    assert.equal("succeeded", answers[2].state)
    code, out = cli(b, "restart nope")
    assert.equal(1, code)
    assert.matches("404 NotFound", out, 1, true)
    code, out = cli(b, "retry a2")
    assert.equal(1, code)
    assert.matches("forge retry: the broker refused: 422 NothingToRetry", out, 1, true)
    code, out = cli(b, "cancel a2")
    assert.equal(1, code)
    assert.matches("422 NothingToCancel", out, 1, true)
  end)

  it("forge ops, cancel and retry on an operation in flight, with a progress line and no password on any argv",
    function()
      b:provision_async("st1", STUCK.service, STUCK.plan)
      local code, out = cli(b, "ops")
      assert.equal(0, code, out)
      assert.matches("\nst1 +%- +provision%-%S+ +provision +in progress +local +%d+s", out)
      code, out = cli(b, "ops --json --type provision")
      assert.equal(0, code, out)
      assert.equal("st1", json_of(out).operations[1].instance)
      assert.equal(1, (cli(b, "ops --type dance")))
      assert.equal(1, (cli(b, "restart st1")))                       -- 409: not running
      assert.is_true(Broker.wait_for(function() return #Broker.marked_pids(b.state_dir, "st1") > 0 end))
      code, out = cli(b, "cancel st1")
      assert.equal(0, code, out)
      assert.matches("cancel: provision provision%-%S+ failed: provision cancelled by the operator\n", out)
      assert.same({}, Broker.marked_pids(b.state_dir, "st1"))
      code, out = cli(b, "ops --state failed")
      assert.equal(0, code, out)
      assert.matches("\nst1 .* provision +failed ", out)

      -- retry waits (deploy_timeout: 4 s) with a progress line on stderr; curl never sees the
      -- password on its command line
      local log = os.tmpname()
      local p = assert(proc.spawn { argv = { shell.FORGE, "retry", "st1", "--url", b:url("") }, stdout = log,
        env = { PATH = os.getenv("PATH"), FORGE_ADMIN_USER = b.admin_user, FORGE_ADMIN_PASSWORD = b.admin_password } })
      local leaked, w = false
      repeat
        for entry in lfs.dir("/proc") do
          local f = entry:match("^%d+$") and io.open("/proc/" .. entry .. "/cmdline")
          if f then
            leaked = leaked or (f:read("a") or ""):find(b.admin_password, 1, true) ~= nil
            f:close()
          end
        end
        w = proc.wait(p.pid, 0.05)
      until w
      out = require("spec.support.files").read(log)
      os.remove(log)
      assert.is_false(leaked)
      assert.equal(1, w.code, out)                                  -- the retried provision failed again
      assert.matches("forge retry: provision in progress: ", out, 1, true)
      assert.matches("retry: provision provision%-%S+ failed: provision failed: not healthy after 4s", out)

      code, out = cli(b, "retry st1 --no-wait")
      assert.equal(0, code, out)
      assert.matches("^retry: operation provision%-%S+ started on instance st1\n$", out)
      assert.equal(0, (cli(b, "cancel st1")))
    end)

  it("forge orphans lists what no record owns, and --clean cleans it", function()
    local dir = b.state_dir .. "/instances/ghost/p"
    os.execute("mkdir -p '" .. dir .. "'")
    local pid, start
    finally(function() if pid and proc.identity(pid) then proc.kill(pid, start, "KILL") end end)
    local p = assert(proc.spawn { argv = { "/bin/sleep", "1000" }, cwd = dir })
    pid, start = p.pid, p.start_time
    local code, out = cli(b, "orphans")
    assert.equal(0, code, out)
    assert.matches("^KIND +ID +TARGET +DETAIL\n", out)
    assert.matches("\ndirectory +ghost +local ", out)
    assert.matches("\nprocess +" .. pid .. " +local ", out)
    code, out = cli(b, "orphans --json")
    assert.equal(0, code, out)
    assert.is_table(json_of(out).orphans)
    code, out = cli(b, "orphans --clean")
    assert.equal(0, code, out)
    -- the process first: a directory holding a live process cannot go
    assert.matches("^cleaned process " .. pid .. ": [^\n]*\ncleaned directory ghost: ", out)
    assert.is_nil(proc.identity(pid))
    assert.is_nil(lfs.attributes(b.state_dir .. "/instances/ghost"))
    code, out = cli(b, "orphans")
    assert.equal(0, code, out)
    assert.equal("no orphans\n", out)
  end)

  it("forge metrics prints the Prometheus text; --json does not apply", function()
    local code, out = cli(b, "metrics")
    assert.equal(0, code, out)
    assert.matches("# TYPE ", out, 1, true)
    assert.equal(2, (cli(b, "metrics --json")))
  end)

  it("forge status shows the versions and the readiness", function()
    local code, out = cli(b, "status")
    assert.equal(0, code, out)
    assert.matches("^generation %d+\n", out)
    assert.matches("\n  dummy +version %x+", out)
    assert.matches("\nready\n", out)
    code, out = cli(b, "status --json")
    assert.equal(0, code, out)
    local st = json_of(out)
    assert.is_table(st.services.services)
    assert.equal("ready", st.readiness.status)
  end)

  it("refuses wrong credentials (1), missing ones (2), and says when the broker does not answer (1)", function()
    local code, out = cli(b, "instances", "wrong")
    assert.equal(1, code)
    assert.matches("401 Unauthorized", out, 1, true)
    code, out = shell.run("env -u FORGE_ADMIN_PASSWORD " .. shell.FORGE .. " instances --url " .. b:url(""))
    assert.equal(2, code)
    assert.matches("no admin credentials configured", out, 1, true)
    code, out = shell.run("env " .. creds(b) .. " " .. shell.FORGE .. " ops --url http://127.0.0.1:1")
    assert.equal(1, code)
    assert.matches("forge ops: no answer from http://127.0.0.1:1: ", out, 1, true)
    code, out = shell.run("env " .. creds(b) .. " " .. shell.FORGE .. " instances --url ftp://x")
    assert.equal(2, code)
    assert.matches("--url must be an http:// or https:// URL", out, 1, true)
  end)
end)

describe("the forge admin commands against a broker whose admin API is off", function()
  it("exit 1 with the broker's word for it", function()
    local b = Broker.start { env = { FORGE_ADMIN_PASSWORD = "" } }
    finally(function() b:cleanup() end)
    -- even with the broker's own credentials (the only ones it knows)
    local code, out = shell.run("env FORGE_ADMIN_USER='" .. b.user .. "' FORGE_ADMIN_PASSWORD='" .. b.password .. "' "
      .. shell.FORGE .. " instances --url " .. b:url(""))
    assert.equal(1, code)
    assert.matches("404 NotFound: the admin API is off", out, 1, true)
    code, out = shell.run("env FORGE_ADMIN_USER=ops FORGE_ADMIN_PASSWORD=anything " .. shell.FORGE
      .. " ops --url " .. b:url(""))
    assert.equal(1, code)
    assert.matches("401 Unauthorized", out, 1, true)
  end)
end)
