-- Isolated local instances: a real broker (as root) runs redis and the `limited` fixture in
-- sandboxes (new mount, PID, IPC and UTS namespaces, read-only root, cgroup limits), and with
-- `isolation: none`.
local Broker = require "spec.support.broker"
local client = require "spec.support.client"
local crypto = require "forge.crypto"
local files = require "spec.support.files"
local lfs = require "lfs"
local proc = require "forge.proc"

local R = Broker.redis
local LIMITED = { service = "1150a7ed-0000-4000-8000-000000000001", memory = "1150a7ed-0000-4000-8000-000000000064",
  forks = "1150a7ed-0000-4000-8000-000000000032" }
local CGROUP = "/sys/fs/cgroup"

-- A services dir with the shipped redis and the isolation fixture.
local function services_dir(state_dir)
  local dir = state_dir .. "/services"
  local pwd = os.getenv("PWD")
  assert(os.execute("mkdir -p " .. dir .. " && ln -s " .. pwd .. "/services/redis " .. pwd
    .. "/spec/fixtures/isolation/limited " .. dir .. "/"))
  return dir
end

local function start(env)
  local state_dir = Broker.tmpdir()
  local e = { FORGE_LOCAL_COMMANDS = "redis-server,sh" }
  for k, v in pairs(env or {}) do e[k] = v end
  return Broker.start { state_dir = state_dir, services_dir = services_dir(state_dir), env = e }
end

local function provision(b, id, service, plan)
  assert.equal(202, (b:call("PUT", "/v2/service_instances/" .. id .. "?accepts_incomplete=true",
    { service_id = service, plan_id = plan, organization_guid = "org", space_guid = "space" })))
  local op = b:wait_operation("/v2/service_instances/" .. id, 60)
  assert.equal("succeeded", op.state, op.description)
  return b:instance(id)
end

local function deprovision(b, id, service, plan)
  assert.equal(202, (b:call("DELETE", string.format(
    "/v2/service_instances/%s?service_id=%s&plan_id=%s&accepts_incomplete=true", id, service, plan))))
  assert.equal("succeeded", b:wait_operation("/v2/service_instances/" .. id, 60).state)
end

local function link(path) return assert(lfs.symlinkattributes(path, "target")) end

-- A pid from a stored record (JSON numbers decode as floats).
local function pid_of(rec) return string.format("%d", rec.pid) end

local function status_of(pid)
  local t = {}
  for k, v in files.read("/proc/" .. pid .. "/status"):gmatch("([%w_]+):%s*([^\n]*)") do t[k] = v end
  return t
end

-- The pids a process sees in its own /proc (read through its root).
local function visible_pids(pid)
  local seen = {}
  for e in lfs.dir("/proc/" .. pid .. "/root/proc") do
    if e:match("^%d+$") then seen[#seen + 1] = tonumber(e) end
  end
  table.sort(seen)
  return seen
end

-- The instance's cgroup directories (as the local target names them).
local function cgroup_dirs(b, id)
  local name = id .. "-" .. crypto.sha256_hex(b.state_dir .. "\0" .. id):sub(1, 12)
  return { CGROUP .. "/memory/forge/" .. name, CGROUP .. "/pids/forge/" .. name, CGROUP .. "/cpu/forge/" .. name }
end

local function exists(path) return lfs.attributes(path, "mode") ~= nil end

-- Processes whose mount table holds a mount at or below `dir`.
local function mounts_under(dir)
  local holders = {}
  for e in lfs.dir("/proc") do
    if e:match("^%d+$") then
      local info = io.open("/proc/" .. e .. "/mountinfo")
      if info then
        for line in info:lines() do
          local point = line:match("^%S+ %S+ %S+ %S+ (%S+)")
          if point and point:sub(1, #dir) == dir then holders[#holders + 1] = tonumber(e) end
        end
        info:close()
      end
    end
  end
  return holders
end

-- What a shell as the service user says inside the namespaces of the live process `rec`.
local function inside(rec, script, user)
  local res = assert(proc.run { argv = { "sh", "-c", script }, join = rec, user = user or "forge-svc" })
  return res.stdout .. res.stderr, res.code
end

-- Wait until fn() is true (polling), at most `s` seconds.
local function eventually(s, fn)
  local deadline = proc.monotonic() + s
  while proc.monotonic() < deadline do
    if fn() then return true end
    proc.sleep(0.1)
  end
  return fn()
end

describe("isolated local instances", function()
  local b

  setup(function() b = start() end)
  teardown(function() if b then b:cleanup() end end)

  it("says in /admin/services that instances run in namespaces under cgroup limits", function()
    local status, _, _, body = b:call("GET", "/admin/services")
    assert.equal(200, status)
    assert.same({ mode = "namespaces", limits = "cgroup v1", warnings = {} }, body.isolation)
  end)

  it("runs each process in its own namespaces, as the service user with no capability, seeing only its instance",
    function()
      local a = provision(b, "iso-a", R.service, R.one)
      local other = provision(b, "iso-b", R.service, R.one)
      local rec = a.processes["redis-0"]
      local pid = pid_of(rec)
      for _, ns in ipairs({ "mnt", "pid", "ipc", "uts" }) do
        assert.are_not.equal(link("/proc/" .. b.pid .. "/ns/" .. ns), link("/proc/" .. pid .. "/ns/" .. ns), ns)
      end
      assert.equal(link("/proc/" .. b.pid .. "/ns/net"), link("/proc/" .. pid .. "/ns/net"))
      local st = status_of(pid)
      assert.are_not.equal("0", st.Uid:match("^%d+"))
      assert.equal(proc.user("forge-svc").uid, tonumber(st.Uid:match("^%d+")))
      for _, set in ipairs({ "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb" }) do
        assert.equal("0000000000000000", st[set], set)
      end
      assert.equal("1", st.NoNewPrivs)

      -- its view: its own directory, not the other instance's nor the store; its own processes only
      local root = "/proc/" .. pid .. "/root"
      local own = b.state_dir .. "/instances/iso-a"
      local theirs = b.state_dir .. "/instances/iso-b/redis-0/redis.conf"
      assert.is_true(exists(root .. own .. "/redis-0/redis.conf"))
      assert.is_true(exists(theirs))
      assert.is_false(exists(root .. theirs))
      assert.is_false(exists(root .. b.state_dir .. "/forge.db"))
      assert.same({ 1 }, visible_pids(pid))
      assert.equal("iso-a\n", (inside(rec, "cat /proc/sys/kernel/hostname")))

      -- a command in its namespaces as the service user can write its own dir and private /tmp only
      local out, code = inside(rec, "cat " .. theirs .. " " .. b.state_dir .. "/forge.db; "
        .. "touch /etc/forge-iso /usr/forge-iso /var/tmp/forge-iso; touch " .. own .. "/written /tmp/written && ls /proc")
      assert.equal(0, code)
      assert.matches(theirs .. ": No such file or directory", out, 1, true)
      assert.matches(b.state_dir .. "/forge.db: No such file or directory", out, 1, true)
      for _, path in ipairs({ "/etc/forge-iso", "/usr/forge-iso", "/var/tmp/forge-iso" }) do
        assert.matches("cannot touch '" .. path .. "': Read-only file system", out, 1, true)
        assert.is_false(exists(path))
      end
      assert.is_true(exists(own .. "/written"))
      assert.is_false(exists("/tmp/written"))
      local listed = {}
      for n in out:gmatch("\n(%d+)") do listed[#listed + 1] = n end
      for n in out:gmatch("^(%d+)") do listed[#listed + 1] = n end
      assert.is_true(#listed >= 2 and #listed <= 4, out)   -- redis, the shell, ls (and the go-between: outside)

      -- the other instance sees neither this one nor its processes
      local opid = pid_of(other.processes["redis-0"])
      assert.is_false(exists("/proc/" .. opid .. "/root" .. own .. "/redis-0/redis.conf"))
      assert.same({ 1 }, visible_pids(opid))

      deprovision(b, "iso-a", R.service, R.one)
      deprovision(b, "iso-b", R.service, R.one)
    end)

  it("kills a redis filled past memory_mb = 64, says so, restarts it, and leaves the rest alone", function()
    local bystander = provision(b, "bystander", R.service, R.one)
    local by = bystander.processes["redis-0"]
    local inst = provision(b, "mem", LIMITED.service, LIMITED.memory)
    local before = inst.processes.redis
    local limit = files.read(cgroup_dirs(b, "mem")[1] .. "/memory.limit_in_bytes")
    assert.equal(64 * 1048576, tonumber(limit))
    -- 200 values of 1 MiB: the script never finishes, the kernel kills redis at 64 MiB
    local p = io.popen("redis-cli -h 127.0.0.1 -p " .. inst.resources.ports[1]
      .. " EVAL \"for i = 1, 200 do redis.call('set', 'k' .. i, string.rep('x', 1048576)) end\" 0 2>&1")
    local out = p:read("a")
    p:close()
    assert.is_false(out:find("OK", 1, true) ~= nil and not out:find("rror", 1, true), out)
    assert.is_true(eventually(20, function()
      local r = b:instance("mem")
      local now = r.processes.redis
      return now.pid ~= before.pid and proc.alive(now.pid, now.start_time)
        and (r.operation.description or ""):find("killed by its memory limit", 1, true) ~= nil
    end), b:read_log())
    local _, _, _, op = b:call("GET", "/v2/service_instances/mem/last_operation")
    assert.equal("process redis killed by its memory limit (memory_mb = 64); restarted (1 restart)", op.description)
    assert.matches('"reason":"killed by its memory limit', b:read_log())
    -- and in the metrics: the restart counted under its reason
    local status, text = client.request("GET", b:url("/metrics"), { user = b.admin_user, password = b.admin_password })
    assert.equal(200, status)
    assert.matches('\nforge_local_process_restarts_total{reason="memory_limit",service="limited"} 1\n', text, 1, true)
    -- the broker and the other instance go on
    assert.equal(200, (b:call("GET", "/v2/catalog")))
    assert.is_true(proc.alive(by.pid, by.start_time))
    assert.equal(by.pid, b:instance("bystander").processes["redis-0"].pid)
    deprovision(b, "mem", LIMITED.service, LIMITED.memory)
    deprovision(b, "bystander", R.service, R.one)
  end)

  it("contains a fork bomb in pids = 32, and a deprovision leaves no cgroup, mount or process", function()
    local inst = provision(b, "bomb", LIMITED.service, LIMITED.forks)
    local pids_dir = cgroup_dirs(b, "bomb")[2]
    assert.equal("32", (files.read(pids_dir .. "/pids.max"):gsub("%s+$", "")))
    local peak = 0
    assert.is_true(eventually(10, function()
      peak = math.max(peak, tonumber(files.read(pids_dir .. "/pids.current")))
      return tonumber(files.read(pids_dir .. "/pids.events"):match("max (%d+)")) > 0
    end))
    assert.is_true(peak <= 32, tostring(peak))
    -- the machine still forks, the broker still answers
    assert.equal(0, proc.run({ argv = { "true" } }).code)
    assert.equal(200, (b:call("GET", "/v2/catalog")))
    local rec = inst.processes.bomb
    assert.is_true(proc.alive(rec.pid, rec.start_time))
    deprovision(b, "bomb", LIMITED.service, LIMITED.forks)
    assert.is_false(proc.alive(rec.pid, rec.start_time))
    for _, dir in ipairs(cgroup_dirs(b, "bomb")) do assert.is_false(exists(dir), dir) end
    assert.same({}, mounts_under(b.state_dir .. "/instances/bomb"))
    assert.same({}, Broker.marked_pids(b.state_dir, "bomb"))
  end)
end)

describe("isolation: none", function()
  local b

  setup(function() b = start { FORGE_LOCAL_ISOLATION = "none" } end)
  teardown(function() if b then b:cleanup() end end)

  it("runs processes in the broker's namespaces, as the service user, still under the cgroup limits", function()
    local _, _, _, body = b:call("GET", "/admin/services")
    assert.same({ mode = "none", limits = "cgroup v1", warnings = {} }, body.isolation)
    local inst = provision(b, "plain", LIMITED.service, LIMITED.memory)
    local pid = pid_of(inst.processes.redis)
    for _, ns in ipairs({ "mnt", "pid" }) do
      assert.equal(link("/proc/" .. b.pid .. "/ns/" .. ns), link("/proc/" .. pid .. "/ns/" .. ns))
    end
    assert.equal(proc.user("forge-svc").uid, tonumber(status_of(pid).Uid:match("^%d+")))
    local procs = files.read(cgroup_dirs(b, "plain")[1] .. "/cgroup.procs")
    assert.matches("%f[%d]" .. pid .. "%f[%D]", procs)
    deprovision(b, "plain", LIMITED.service, LIMITED.memory)
    for _, dir in ipairs(cgroup_dirs(b, "plain")) do assert.is_false(exists(dir), dir) end
  end)
end)
