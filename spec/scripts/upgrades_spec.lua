-- Diff before change and fleet upgrades (docs/upgrades.md) on ten local redis instances: new
-- service versions come from rewriting the service script in a temp services dir (hot reload).
local Broker = require "spec.support.broker"
local cjson = require "cjson"
local client = require "spec.support.client"
local files = require "spec.support.files"
local proc = require "forge.proc"
local shell = require "spec.support.shell"

local R = Broker.redis
local IDS = {}
for i = 1, 10 do IDS[i] = string.format("u%02d", i) end

-- A version of the redis script whose rendering changes, for the instances `which(id)` picks,
-- by a line appended to every config file (`line`, a redis.conf comment or a bad directive).
local function changing(which, line)
  return ([[
local deploy_v1 = service.deploy
local picked = { %s }
function service.deploy(ctx)
  local d = deploy_v1(ctx)
  if picked[ctx.instance_id] then
    for _, p in ipairs(d.processes) do
      for name, text in pairs(p.files) do p.files[name] = text .. %q end
    end
  end
  return d
end
]]):format(table.concat((function()
    local t = {}
    for _, id in ipairs(IDS) do if which(id) then t[#t + 1] = '["' .. id .. '"] = true' end end
    return t
  end)(), ", "), line .. "\n")
end

describe("diff and fleet upgrades", function()
  local b, dir, original

  local function redis_version()
    local _, _, _, body = b:call("GET", "/admin/services")
    for _, s in ipairs(body.services) do if s.name == "redis" then return s.version end end
  end

  -- Install a new version of the redis script (`tail` goes before its `return service`); returns its hash.
  local function release(tail)
    local old = redis_version()
    files.write(dir .. "/redis/service.lua", (original:gsub("\nreturn service%s*$", "\n" .. tail .. "\nreturn service\n")))
    return Broker.wait_for(function()
      local v = redis_version()
      return v ~= old and v
    end, 30) or error("the new redis version was not loaded:\n" .. b:read_log())
  end

  local function forge(args)
    return shell.run(string.format("timeout 120 env FORGE_ADMIN_USER=%s FORGE_ADMIN_PASSWORD=%s %s %s --url %s", b.admin_user,
      b.admin_password, shell.FORGE, args, b:url("")))
  end

  local function pid(id) return b:instance(id).processes["redis-0"].pid end

  local function pins()
    local t = {}
    for _, id in ipairs(IDS) do
      local rec = b:instance(id)
      t[id] = { hash = rec.script_hash, operation = rec.operation.id, pid = rec.processes["redis-0"].pid }
    end
    return t
  end

  setup(function()
    dir = Broker.tmpdir()
    assert(os.execute("cp -R services/redis " .. dir .. "/redis"))
    original = files.read(dir .. "/redis/service.lua")
    b = Broker.start { services_dir = dir, pool = 24 }
    for _, id in ipairs(IDS) do b:provision_async(id, R.service, R.one) end
    for _, id in ipairs(IDS) do assert.equal("running", b:settle(id).state) end
  end)
  teardown(function()
    if b then b:cleanup() end
    if dir then os.execute("rm -rf " .. dir) end
  end)

  it("diff: exit 0 without change, 1 with changes (secrets masked), 2 on errors", function()
    local code, out = forge("diff u01")
    assert.equal(0, code, out)
    assert.matches("no change", out)
    local first = redis_version()
    release("-- a comment: a new version that renders the same")
    code, out = forge("diff u01")
    assert.equal(0, code, out)
    code, out = forge("diff u01 --params '{\"maxmemory_mb\":64}'")
    assert.equal(1, code, out)
    assert.matches("^%-%-%- running %(version " .. first:sub(1, 12) .. "%)", out)
    assert.matches("\n%-%s+maxmemory 256mb\n", out)
    assert.matches("\n%+%s+maxmemory 64mb\n", out)
    local _, _, _, body = b:call("GET", "/admin/instances/u01/diff?to=pinned&params=%7B%22maxmemory_mb%22%3A64%7D")
    assert.is_true(body.changed)
    assert.equal(out, body.diff)
    -- a plan change adds replicas, whose config holds the admin password: masked
    code, out = forge("diff u01 --plan 3-servers")
    assert.equal(1, code, out)
    assert.matches("\n%+%s+masterauth \"?%*%*%*%*%*%*%*%*\"?\n", out)
    assert.is_nil(out:find(b:instance("u01").secrets.admin_password, 1, true))
    for _, bad in ipairs({ "diff nosuch", "diff u01 --to 0000000000", "diff u01 --params '[1]'",
      "diff u01 --plan no-such-plan", "diff u01 --params '{\"maxmemory_mb\":1}'" }) do
      code, out = forge(bad)
      assert.equal(2, code, bad .. ": " .. out)
    end
    code, out = forge("diff")
    assert.equal(2, code, out)
    -- a secret the new version generates (never stored: the diff renders a copy) is masked too
    release("local deploy_v1 = service.deploy\nfunction service.deploy(ctx)\n  local d = deploy_v1(ctx)\n"
      .. "  local token = ctx.secret('extra_token')\n"
      .. "  local files = d.processes[1].files\n"
      .. "  for name, text in pairs(files) do files[name] = text .. '# token ' .. token .. '\\n' end\n"
      .. "  return d\nend")
    code, out = forge("diff u01")
    assert.equal(1, code, out)
    assert.matches("\n%+%s+# token %*%*%*%*%*%*%*%*\n", out)
    assert.is_nil(b:instance("u01").secrets.extra_token)
  end)

  it("a dry run says what would happen and changes nothing", function()
    local v2 = release(changing(function(id) return tonumber(id:sub(2)) % 2 == 0 end, "# v2"))
    local before = pins()
    local code, out = forge("upgrade --all --dry-run")
    assert.equal(0, code, out)
    local _, upgrades = out:gsub("\nu%d%d +redis +1%-server +upgrade ", "")
    local _, skips = out:gsub("\nu%d%d +redis +1%-server +skip ", "")
    assert.equal(5, upgrades, out)
    assert.equal(5, skips, out)
    assert.matches("dry run: nothing changed", out)
    assert.same(before, pins())
    assert.not_equal(v2, before.u01.hash)
    local _, _, _, list = b:call("GET", "/admin/upgrades")
    assert.same({}, list.upgrades)
  end)

  it("skips the instances whose rendering does not change: the pin moves, no process restarts", function()
    local v2 = redis_version()
    local before = pins()
    local code, out = forge("upgrade --all --canaries 1 --max-in-flight 3")
    assert.equal(0, code, out)
    assert.matches("succeeded: 10/10 done %(5 upgraded, 5 skipped, 0 failed%)", out)
    local after = pins()
    for i, id in ipairs(IDS) do
      assert.equal(v2, after[id].hash, id)
      if i % 2 == 1 then
        assert.equal(before[id].pid, after[id].pid, id .. " was restarted")
        assert.matches("\n" .. id .. " +redis +1%-server +skipped ", out)
      else
        assert.not_equal(before[id].pid, after[id].pid, id .. " was not redeployed")
        assert.matches("\n" .. id .. " +redis +1%-server +upgraded ", out)
      end
      assert.is_true(proc.alive(after[id].pid, proc.identity(after[id].pid)))
    end
    -- the diff went with the operation; a skipped one says why
    local _, _, _, u02 = b:call("GET", "/admin/instances/u02")
    assert.matches("\n%+%s+# v2\n", u02.operations[1].diff)
    local _, _, _, u01 = b:call("GET", "/admin/instances/u01")
    assert.equal("succeeded", u01.operations[1].state)
    assert.matches("without a redeploy", u01.operations[1].description)
    local dstatus, page = client.request("GET", b:url("/dashboard/instances/u02"),
      { user = b.admin_user, password = b.admin_password })
    assert.equal(200, dstatus)
    assert.matches("+        # v2", page, 1, true)
    local _, services_page = client.request("GET", b:url("/dashboard/services"),
      { user = b.admin_user, password = b.admin_password })
    assert.matches("5 upgraded, 5 skipped, 0 failed", services_page, 1, true)
  end)

  it("stops at a failing canary: paused, exit 1, the other instances untouched", function()
    local v3 = release(changing(function(id) return id == "u01" end, "no-such-directive yes"))
    local before = pins()
    local code, out = forge("upgrade --service redis --canaries 1 --max-in-flight 5")
    assert.equal(1, code, out)
    assert.matches("paused: canary u01 failed", out)
    assert.matches("resume: forge upgrade %-%-resume upg%-", out)
    local after = pins()
    for _, id in ipairs(IDS) do
      if id ~= "u01" then assert.same(before[id], after[id], id .. " was touched") end
    end
    assert.equal("failed", b:instance("u01").state)
    assert.equal(v3, b:instance("u01").script_hash)
    -- resume tries the canary again (it fails again and pauses again); abort ends the run
    code, out = forge("upgrade --resume")
    assert.equal(1, code, out)
    assert.matches("paused: canary u01 failed", out)
    local job_id = out:match("resume: forge upgrade %-%-resume (upg%-%x+)")
    local rec, tries = b:instance("u01"), 0
    for _, op in ipairs({ rec.operation, table.unpack(rec.history) }) do
      if op.upgrade == job_id then tries = tries + 1 end
    end
    assert.equal(2, tries, "the resumed run did not redeploy the failed canary")
    code, out = forge("upgrade --abort")
    assert.equal(1, code, out)
    assert.matches("aborted: 1/10 done %(0 upgraded, 0 skipped, 1 failed%), 0 in flight: aborted by ops", out)
    assert.same(before.u05, pins().u05)
    local _, _, _, list = b:call("GET", "/admin/upgrades")
    assert.equal("aborted", list.upgrades[1].state)
    assert.equal(9, list.upgrades[1].counts["not started"])
  end)

  it("resumes a run where it stopped when the broker is killed mid-upgrade", function()
    local v4 = release(changing(function() return true end, "# v4"))
    local targets = { "u02", "u03", "u04", "u05", "u06", "u07", "u08", "u09", "u10" }
    local code, out = forge("upgrade --canaries 0 --max-in-flight 1 --no-wait --json " .. table.concat(targets, " "))
    assert.equal(0, code, out)
    local id = assert(out:match('"id":"(upg%-[^"]+)"'), out)
    assert(Broker.wait_for(function()
      local _, _, _, job = b:call("GET", "/admin/upgrades/" .. id)
      return job.counts.upgraded >= 1
    end, 60), "no instance was upgraded")
    b:stop("KILL")
    local _, _, _, mid = b:launch():call("GET", "/admin/upgrades/" .. id)
    assert.is_true(mid.counts.pending + mid.counts["in flight"] > 0, "the run ended before the kill")
    local job = Broker.wait_for(function()
      local _, _, _, j = b:call("GET", "/admin/upgrades/" .. id)
      return j.state ~= "running" and j
    end, 120)
    assert.equal("succeeded", job and job.state, job and job.description)
    assert.equal(9, job.counts.upgraded)
    for _, iid in ipairs(targets) do
      local rec = b:instance(iid)
      assert.equal(v4, rec.script_hash, iid)
      local ups = 0
      for _, op in ipairs({ rec.operation, table.unpack(rec.history) }) do
        if op.upgrade == id then ups = ups + 1 end
      end
      assert.equal(1, ups, iid .. " was upgraded more than once")
    end
  end)

  it("shows a platform the pinned maintenance_info, and a maintenance_info update takes the same path", function()
    local v4 = redis_version()
    local v5 = release(changing(function() return true end, "# v4")
      .. '\nfor _, p in ipairs(service.plans) do p.maintenance_info = { version = "7.0.1" } end')
    local _, _, _, fetched = b:call("GET", "/v2/service_instances/u02")
    assert.equal("7.0.0", fetched.maintenance_info.version)
    local before = pid("u02")
    local status, raw = b:call("PATCH", "/v2/service_instances/u02?accepts_incomplete=true",
      { service_id = R.service, maintenance_info = { version = "7.0.1" } })
    assert.equal(200, status, raw)
    assert.equal(before, pid("u02"))
    assert.equal(v5, b:instance("u02").script_hash)
    assert.not_equal(v4, v5)
    _, _, _, fetched = b:call("GET", "/v2/service_instances/u02")
    assert.equal("7.0.1", fetched.maintenance_info.version)
  end)

  it("skips, and reports, an instance with an operation in flight; refuses bad requests", function()
    -- u11 never becomes healthy on this version: its provision stays in flight, pinned to it
    local never = changing(function() return true end, "# v4")
      .. '\nfor _, p in ipairs(service.plans) do p.maintenance_info = { version = "7.0.1" } end'
      .. '\nlocal deploy_v4 = service.deploy\nfunction service.deploy(ctx)\n  local d = deploy_v4(ctx)\n'
      .. '  if ctx.instance_id == "u11" then d.processes[1].health.redis.expect = { "^NEVER$" } end\n  return d\nend'
    release(never)
    b:provision_async("u11", R.service, R.one)
    release(never .. "\n-- one more version")
    -- a run waits for u11 (default --wait): paused and aborted by the operator meanwhile
    local code, out = forge("upgrade u11 --no-wait")
    assert.equal(0, code, out)
    assert(Broker.wait_for(function()                    -- a reconciler pass has looked at u11
      local _, _, _, list = b:call("GET", "/admin/upgrades")
      for _, u in ipairs(list.upgrades) do
        local job = u.state == "running" and select(4, b:call("GET", "/admin/upgrades/" .. u.id))
        local e = job and job.instances[1]
        if e and e.reason and e.reason:find("waiting for its provision in flight", 1, true) then return true end
      end
    end, 30), "the run never saw u11's provision in flight")
    code, out = forge("upgrade --pause")
    assert.equal(1, code, out)
    assert.matches("\nu11 +redis +1%-server +pending .* waiting for its provision in flight", out)
    assert.matches("paused: 0/1 done .*: paused by ops", out)
    code, out = forge("upgrade --abort")
    assert.equal(1, code, out)
    assert.matches("\nu11 +redis +1%-server +not started ", out)
    code, out = forge("upgrade u11 u04 --canaries 0 --wait 0 --json")
    assert.equal(0, code, out)
    local done = cjson.decode(out:match("([^\n]+)\n$"))     -- after the progress lines (stderr)
    assert.equal("succeeded", done.state)
    local by_id = {}
    for _, e in ipairs(done.instances) do by_id[e.id] = e end
    assert.equal("skipped", by_id.u11.state)
    assert.matches("its provision was still in flight", by_id.u11.reason)
    assert.equal("skipped", by_id.u04.state)
    assert.matches("nothing it runs changes", by_id.u04.reason)
    assert.equal(202, (b:call("POST", "/admin/instances/u11/cancel")))
    -- bad requests change nothing
    for _, bad in ipairs({ {}, { all = true, canaries = -1 }, { all = true, max_in_flight = 0 }, { colour = "red" },
      { instances = { "nosuch" } }, { instances = {} } }) do
      local bs = b:call("POST", "/admin/upgrades", bad)
      assert.is_true(bs == 400 or bs == 404, tostring(bs))
    end
    assert.equal(404, (b:call("GET", "/admin/upgrades/upg-nosuch")))
    assert.equal(409, (b:call("POST", "/admin/upgrades/" .. done.id .. "/resume")))
    code, out = forge("upgrade")
    assert.equal(2, code, out)
  end)
end)
