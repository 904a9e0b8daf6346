-- Backups end to end (docs/backups.md): real brokers back real redis, postgres and etcd
-- servers up through the admin API and restore them into a second instance (the data is
-- there, the bindings work); corrupt and truncated backups are refused before anything
-- changes; scheduled backups keep the newest; the broker's store is copied while it runs and
-- a fresh broker started on the copy serves every instance.
local Broker = require "spec.support.broker"
local backups = require "forge.backups"
local cjson = require "cjson"
local config = require "forge.config"
local etcd_server = require "support.etcd"
local files = require "spec.support.files"
local lfs = require "lfs"
local proc = require "forge.proc"

local R = Broker.redis
local PG = { service = "2ce35a84-27f5-4ed2-982d-2e23db02f9cf", one = "90e77abd-a3e9-4bb2-b1e4-5de0e19609ed",
  two = "26fdce70-03d0-40ea-8e6f-37a29c7455cf" }
local ETCD = { service = "2f3b8f3e-7a51-4b8e-9f5e-0c1d2e3f4a5b", one = "6a7b8c9d-0e1f-4a2b-8c3d-4e5f6a7b8c9d" }

-- the default approved commands, and the two backups of postgres need
local COMMANDS = "redis-server,etcd,etcdctl,postgres,initdb,pg_basebackup,sleep,true,pg_dump,pg_restore"

local function run(argv, env)
  local e = { PATH = os.getenv("PATH") }
  for k, v in pairs(env or {}) do e[k] = v end
  local res = assert(proc.run { argv = argv, env = e, timeout = 20 })
  local out = res.code == 0 and res.stdout or (res.stderr ~= "" and res.stderr or res.stdout)
  return (out:gsub("%s+$", "")), res.code == 0
end

local function redis_cli(creds, ...)
  return (run({ "redis-cli", "-h", creds.host, "-p", tostring(creds.port), "--user", creds.username,
    "--no-auth-warning", ... }, { REDISCLI_AUTH = creds.password }))
end

local function psql(uri, sql)
  return run({ "psql", "-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", uri, "-c", sql }, { PGCONNECT_TIMEOUT = "5" })
end

local function etcdctl(endpoint, user, password, ...)
  return run({ "etcdctl", "--endpoints=" .. endpoint, "--dial-timeout=3s", ... },
    { ETCDCTL_API = "3", ETCDCTL_USER = user .. ":" .. password })
end

local function provisioned(b, id, service, plan, timeout)
  local status, _, _, body = b:call("PUT", "/v2/service_instances/" .. id .. "?accepts_incomplete=true",
    { service_id = service, plan_id = plan, organization_guid = "org", space_guid = "space" })
  assert.equal(202, status, cjson.encode(body or {}))
  local op = b:wait_operation("/v2/service_instances/" .. id, timeout or 60)
  assert.equal("succeeded", op.state, op.description)
end

-- Bind (asynchronously where the plan does) and return the credentials.
local function bound(b, id, bid, service, plan, params)
  local path = "/v2/service_instances/" .. id .. "/service_bindings/" .. bid
  local status, _, _, body = b:call("PUT", path .. "?accepts_incomplete=true",
    { service_id = service, plan_id = plan, parameters = params })
  if status == 202 then
    assert.equal("succeeded", b:wait_operation(path, 30).state)
    status, _, _, body = b:call("GET", path)
    assert.equal(200, status)
    return body.credentials
  end
  assert.equal(201, status, cjson.encode(body or {}))
  return body.credentials
end

-- Poll the admin view of an instance until operation `op_id` ends; returns it.
local function settled(b, id, op_id, timeout)
  local deadline = proc.monotonic() + (timeout or 60)
  repeat
    local _, _, _, body = b:call("GET", "/admin/instances/" .. id)
    for _, op in ipairs(body.operations or {}) do
      if op.id == op_id and op.state ~= "in progress" then return op end
    end
    proc.sleep(0.1)
  until proc.monotonic() > deadline
  error("operation " .. op_id .. " of " .. id .. " still in progress:\n" .. b:read_log())
end

-- Back instance `id` up; returns the backup's summary from GET /admin/backups.
local function backed_up(b, id)
  local status, _, _, body = b:call("POST", "/admin/instances/" .. id .. "/backup")
  assert.equal(202, status, cjson.encode(body or {}))
  assert.equal("backup", body.type)
  local op = settled(b, id, body.operation)
  assert.equal("succeeded", op.state, op.description)
  local _, _, _, list = b:call("GET", "/admin/backups?instance=" .. id)
  for _, bk in ipairs(list.backups) do
    if bk.id == body.backup then return bk end
  end
  error("backup " .. body.backup .. " is not listed")
end

-- Restore backup `bid` into instance `to`; returns the finished operation.
local function restored(b, bid, to)
  local status, _, _, body = b:call("POST", "/admin/backups/" .. bid .. "/restore", { to = to })
  assert.equal(202, status, cjson.encode(body or {}))
  return settled(b, to, body.operation, 90)
end

local function backup_dir(b, bk) return b.state_dir .. "/backups/" .. bk.instance .. "/" .. bk.id end

describe("backups of redis", function()
  local b
  setup(function() b = Broker.start { pool = 12, env = { FORGE_LOCAL_COMMANDS = COMMANDS } } end)
  teardown(function() if b then b:cleanup() end end)

  it("restores a backup into a second instance: the data is there, its bindings keep working", function()
    provisioned(b, "r1", R.service, R.one)
    local c1 = bound(b, "r1", "r1-b", R.service, R.one)
    assert.equal("OK", redis_cli(c1, "SET", "greeting", "hello"))
    assert.equal("OK", redis_cli(c1, "SET", "counter", "41"))
    local bk = backed_up(b, "r1")
    assert.equal("r1", bk.instance)
    assert.equal("redis", bk.service)
    assert.equal("1-server", bk.plan)
    assert.equal(b:instance("r1").script_hash, bk.version)
    assert.equal(1, #bk.files)
    assert.equal("dump.rdb", bk.files[1].name)
    assert.equal(lfs.attributes(backup_dir(b, bk) .. "/files/dump.rdb", "size"), bk.size)
    assert.matches("^%x+$", bk.sha256)
    assert.equal("rw-------", lfs.attributes(backup_dir(b, bk) .. "/manifest.json", "permissions"))
    assert.equal("rw-------", lfs.attributes(backup_dir(b, bk) .. "/files/dump.rdb", "permissions"))
    assert.is_nil(cjson.encode(select(4, b:call("GET", "/admin/backups"))):find(b:instance("r1").secrets
      .admin_password, 1, true))
    -- the manifest carries the instance's secrets sealed (the restore below opens them)
    local manifest = files.read(backup_dir(b, bk) .. "/manifest.json")
    assert.matches('"sealed":1', manifest, 1, true)
    assert.is_nil(manifest:find(b:instance("r1").secrets.admin_password, 1, true))

    -- a second instance, with data of its own and a binding, gets r1's data; its binding works
    provisioned(b, "r2", R.service, R.three)
    local c2 = bound(b, "r2", "r2-b", R.service, R.three)
    assert.equal("OK", redis_cli(c2, "SET", "greeting", "overwritten"))
    assert.equal("OK", redis_cli(c2, "SET", "only-in-r2", "x"))
    local op = restored(b, bk.id, "r2")
    assert.equal("succeeded", op.state, op.description)
    assert.matches("restored backup " .. bk.id .. " of instance r1", op.description, 1, true)
    assert.equal("hello", redis_cli(c2, "GET", "greeting"))
    assert.equal("42", redis_cli(c2, "INCR", "counter"))
    assert.equal("", redis_cli(c2, "GET", "only-in-r2"))
    assert.equal("running", b:instance("r2").state)
    -- the replicas copy the restored primary
    local replica = { host = c2.host, port = b:instance("r2").resources.ports[3], username = c2.username,
      password = c2.password }
    local deadline = proc.monotonic() + 15
    while redis_cli(replica, "GET", "greeting") ~= "hello" and proc.monotonic() < deadline do proc.sleep(0.1) end
    assert.equal("hello", redis_cli(replica, "GET", "greeting"))
    -- r1 is untouched, and its binding is not one of r2's
    assert.equal("hello", redis_cli(c1, "GET", "greeting"))
    local other = { host = c2.host, port = c2.port, username = c1.username, password = c1.password }
    local refused = redis_cli(other, "PING")
    assert.truthy(refused:find("NOAUTH", 1, true) or refused:find("WRONGPASS", 1, true), refused)
  end)

  it("restores into the instance the backup is of, and the restored data survives a restart", function()
    provisioned(b, "r3", R.service, R.one)
    local c = bound(b, "r3", "r3-b", R.service, R.one)
    assert.equal("OK", redis_cli(c, "SET", "k", "before"))
    local bk = backed_up(b, "r3")
    assert.equal("OK", redis_cli(c, "SET", "k", "after"))
    local pid = b:instance("r3").processes["redis-0"].pid
    assert.equal("succeeded", restored(b, bk.id, "r3").state)
    assert.equal("before", redis_cli(c, "GET", "k"))
    assert.are_not.equal(pid, b:instance("r3").processes["redis-0"].pid)
    -- the restored data is the AOF's base now: a restart keeps it, and what was written since
    assert.equal("OK", redis_cli(c, "SET", "k2", "new"))
    local status, _, _, body = b:call("POST", "/admin/instances/r3/restart")
    assert.equal(202, status)
    assert.equal("succeeded", settled(b, "r3", body.operation).state)
    assert.equal("before", redis_cli(c, "GET", "k"))
    assert.equal("new", redis_cli(c, "GET", "k2"))
  end)

  it("backs up, lists and restores from the command line", function()
    local shell = require "spec.support.shell"
    local env = string.format("FORGE_ADMIN_USER='%s' FORGE_ADMIN_PASSWORD='%s' ", b.admin_user, b.admin_password)
    local function cli(args) return shell.run("env " .. env .. shell.FORGE .. " " .. args .. " --url " .. b:url("")) end
    provisioned(b, "rc", R.service, R.one)
    local c = bound(b, "rc", "rc-b", R.service, R.one)
    assert.equal("OK", redis_cli(c, "SET", "k", "kept"))
    local code, out = cli("backup rc")
    assert.equal(0, code, out)
    assert.matches("backup: backup %S+ succeeded", out)
    code, out = cli("backups rc --json")
    assert.equal(0, code, out)
    local list = cjson.decode(out).backups
    assert.equal(1, #list)
    assert.equal("rc", list[1].instance)
    code, out = cli("backups rc")
    assert.equal(0, code, out)
    assert.matches("\n" .. list[1].id:gsub("%p", "%%%0") .. " +rc +redis/1%-server ", out)
    assert.equal("OK", redis_cli(c, "SET", "k", "changed"))
    code, out = cli("restore " .. list[1].id)
    assert.equal(2, code, out)
    assert.matches("%-%-to INSTANCE is required", out)
    code, out = cli("restore " .. list[1].id .. " --to rc")
    assert.equal(0, code, out)
    assert.matches("restore: restore %S+ succeeded", out)
    assert.equal("kept", redis_cli(c, "GET", "k"))
    assert.equal(2, (cli("backups rc other")))
    code, out = cli("backup nope")
    assert.equal(1, code, out)
    assert.matches("404 NotFound", out)
  end)

  it("refuses a corrupt or truncated backup before anything is changed", function()
    provisioned(b, "r4", R.service, R.one)
    local c = bound(b, "r4", "r4-b", R.service, R.one)
    assert.equal("OK", redis_cli(c, "SET", "k", "r4's own"))
    local bk = backed_up(b, "r4")
    local file = backup_dir(b, bk) .. "/files/dump.rdb"
    local good = files.read(file)
    local function refused(pattern)
      local before = b:records()
      local status, _, _, body = b:call("POST", "/admin/backups/" .. bk.id .. "/restore", { to = "r4" })
      assert.equal(422, status)
      assert.equal("BackupCorrupt", body.error)
      assert.matches(pattern, body.description)
      assert.matches("nothing was changed", body.description, 1, true)
      assert.same(before, b:records())
      assert.equal("r4's own", redis_cli(c, "GET", "k"))
    end
    -- one byte changed: the operation checks every SHA-256 before it changes anything
    local flipped = good:sub(1, 20) .. string.char((good:byte(21) + 1) % 256) .. good:sub(22)
    files.write(file, flipped)
    local pids = b:instance("r4").processes
    local op = restored(b, bk.id, "r4")
    assert.equal("failed", op.state)
    assert.matches("file dump.rdb does not match its SHA-256 (corrupt); nothing was changed", op.description, 1, true)
    assert.equal("running", b:instance("r4").state)
    assert.same(pids, b:instance("r4").processes)
    assert.equal("r4's own", redis_cli(c, "GET", "k"))
    -- cut short
    files.write(file, good:sub(1, #good - 7))
    refused("truncated")
    -- gone, or a manifest that is not one
    os.remove(file)
    refused("file dump.rdb is missing")
    files.write(file, good)
    local manifest = backup_dir(b, bk) .. "/manifest.json"
    local text = files.read(manifest)
    files.write(manifest, text:sub(1, 40))
    refused("manifest.json is not a backup manifest")
    files.write(manifest, text)
    assert.equal("succeeded", restored(b, bk.id, "r4").state)
  end)

  it("answers bad input with clear errors and changes nothing", function()
    local before = b:records()
    local function refused(method, path, body, status, pattern)
      local s, _, _, answer = b:call(method, path, body)
      assert.equal(status, s, cjson.encode(answer or {}))
      assert.matches(pattern, answer.description)
    end
    refused("POST", "/admin/instances/nope/backup", nil, 404, "instance nope does not exist")
    refused("POST", "/admin/instances/a..b/backup", nil, 400, "instance id may contain only")
    refused("POST", "/admin/backups/bk-nope/restore", { to = "r1" }, 404, "backup bk%-nope does not exist")
    local _, _, _, list = b:call("GET", "/admin/backups?instance=r1")
    local id = list.backups[1].id
    refused("POST", "/admin/backups/" .. id .. "/restore", {}, 400, "to is required")
    refused("POST", "/admin/backups/" .. id .. "/restore", { to = "r2", extra = 1 }, 400, "unknown field 'extra'")
    refused("POST", "/admin/backups/" .. id .. "/restore", { to = "nope" }, 404, "instance nope does not exist")
    refused("POST", "/admin/backups/" .. id .. "/restore", "[1", 400, "")
    refused("GET", "/admin/backups?bogus=1", nil, 400, "unknown query parameter 'bogus'")
    refused("DELETE", "/admin/backups/bk-nope", nil, 404, "does not exist")
    assert.same(before, b:records())
    local s = b:call("POST", "/admin/instances/r1/backup", nil)
    assert.equal(202, s)
    -- a second action while the backup runs: the same operation, or a conflict
    local s2, _, _, again = b:call("POST", "/admin/instances/r1/backup")
    assert.equal(202, s2)
    local s3, _, _, conflict = b:call("POST", "/admin/instances/r1/restart")
    if s3 ~= 202 then
      assert.equal(409, s3)
      assert.matches("has a backup in progress", conflict.description)
    end
    settled(b, "r1", again.operation)
  end)
end)

describe("backups of postgres", function()
  local b
  setup(function() b = Broker.start { pool = 8, env = { FORGE_LOCAL_COMMANDS = COMMANDS } } end)
  teardown(function() if b then b:cleanup() end end)

  local function must(uri, sql)
    local out, ok = psql(uri, sql)
    assert(ok, out)
    return out
  end

  it("restores a pg_dump into a second instance, and into its own with the bindings' databases", function()
    provisioned(b, "p1", PG.service, PG.one)
    local shared = bound(b, "p1", "p1-shared", PG.service, PG.one, { database = "shared" })
    local own = bound(b, "p1", "p1-own", PG.service, PG.one)
    must(shared.uri, "CREATE TABLE orders (id int PRIMARY KEY, item text); INSERT INTO orders VALUES (1, 'tea'), (2, 'cake')")
    must(own.uri, "CREATE TABLE notes (t text); INSERT INTO notes VALUES ('mine')")
    local bk = backed_up(b, "p1")
    local names = {}
    for _, f in ipairs(bk.files) do names[#names + 1] = f.name end
    table.sort(names)
    assert.same({ "app.dump", own.database .. ".dump" }, names)
    assert.equal(2, bk.bindings)

    -- a second instance, with a shared binding and a table of its own, gets p1's app
    provisioned(b, "p2", PG.service, PG.one)
    local other = bound(b, "p2", "p2-shared", PG.service, PG.one, { database = "shared" })
    must(other.uri, "CREATE TABLE scratch (x int)")
    local op = restored(b, bk.id, "p2")
    assert.equal("succeeded", op.state, op.description)
    assert.matches("database " .. own.database .. " of binding p1-own was not restored: this instance has no such "
      .. "binding", op.description, 1, true)
    assert.equal("1|tea\n2|cake", must(other.uri, "SELECT id, item FROM orders ORDER BY id"))
    assert.equal("", must(other.uri, "SELECT tablename FROM pg_tables WHERE tablename = 'scratch'"))
    -- the binding's role owns what it restored into: it writes as before
    must(other.uri, "INSERT INTO orders VALUES (3, 'jam')")
    -- p1 and its bindings are untouched; p1's roles do not exist in p2
    assert.equal("2", must(shared.uri, "SELECT count(*) FROM orders"))
    local foreign = shared.uri:gsub(string.format(":%d/", shared.port), string.format(":%d/", other.port))
    local out, ok = psql(foreign, "SELECT current_user, inet_server_port()")
    assert.is_false(ok, out)

    -- back into p1 after changes: both databases as they were, both bindings work
    must(shared.uri, "DELETE FROM orders")
    must(own.uri, "DROP TABLE notes")
    op = restored(b, bk.id, "p1")
    assert.equal("succeeded", op.state, op.description)
    assert.equal("2", must(shared.uri, "SELECT count(*) FROM orders"))
    assert.equal("mine", must(own.uri, "SELECT t FROM notes"))
    must(own.uri, "INSERT INTO notes VALUES ('more')")
    must(shared.uri, "INSERT INTO orders VALUES (3, 'jam')")
    -- a role of another binding cannot reach the own database (it is closed to PUBLIC again)
    local _, reach = psql((own.uri:gsub("^postgresql://[^@]+@", "postgresql://" .. shared.username .. ":"
      .. shared.password .. "@")), "SELECT 1")
    assert.is_false(reach)
  end)

  it("refuses a backup of another service", function()
    provisioned(b, "p3", PG.service, PG.one)
    provisioned(b, "r9", R.service, R.one)
    local bk = backed_up(b, "r9")
    local before = b:records()
    local status, _, _, body = b:call("POST", "/admin/backups/" .. bk.id .. "/restore", { to = "p3" })
    assert.equal(422, status)
    assert.equal("IncompatibleBackup", body.error)
    assert.matches("backup " .. bk.id .. " is of service redis; instance p3 is of service postgres", body.description,
      1, true)
    assert.same(before, b:records())
  end)
end)

describe("backups of etcd", function()
  local b
  setup(function() b = Broker.start { pool = 8, env = { FORGE_LOCAL_COMMANDS = COMMANDS } } end)
  teardown(function() if b then b:cleanup() end end)

  it("restores a snapshot into a second instance: its root and its bindings work, the other's users are gone", function()
    provisioned(b, "e1", ETCD.service, ETCD.one)
    local c1 = bound(b, "e1", "e1-b", ETCD.service, ETCD.one)
    local _, ok = etcdctl(c1.endpoints[1], c1.username, c1.password, "put", c1.prefix .. "k", "from e1")
    assert.is_true(ok)
    local bk = backed_up(b, "e1")
    assert.equal("snapshot.db", bk.files[1].name)

    provisioned(b, "e2", ETCD.service, ETCD.one)
    local c2 = bound(b, "e2", "e2-b", ETCD.service, ETCD.one)
    local op = restored(b, bk.id, "e2")
    assert.equal("succeeded", op.state, op.description)
    local root = b:instance("e2").secrets.root_password
    assert.equal("from e1", (etcdctl(c2.endpoints[1], "root", root, "get", "--print-value-only", c1.prefix .. "k")))
    local out, put = etcdctl(c2.endpoints[1], c2.username, c2.password, "put", c2.prefix .. "k", "from e2")
    assert.is_true(put, out)
    assert.equal("from e2", (etcdctl(c2.endpoints[1], c2.username, c2.password, "get", "--print-value-only",
      c2.prefix .. "k")))
    local _, foreign = etcdctl(c2.endpoints[1], c1.username, c1.password, "get", c1.prefix .. "k")
    assert.is_false(foreign)
    -- e1 is as it was
    assert.equal("from e1", (etcdctl(c1.endpoints[1], c1.username, c1.password, "get", "--print-value-only",
      c1.prefix .. "k")))
  end)
end)

describe("scheduled backups", function()
  it("match cron expressions, and a bad schedule is a config error", function()
    local function at(y, mo, d, h, mi) return os.date("*t", os.time { year = y, month = mo, day = d, hour = h, min = mi }) end
    local nightly = assert(backups.cron("0 3 * * *"))
    assert.is_true(nightly(at(2030, 5, 6, 3, 0)))
    assert.is_false(nightly(at(2030, 5, 6, 3, 1)))
    assert.is_false(nightly(at(2030, 5, 6, 4, 0)))
    local office = assert(backups.cron("*/15 9-17 * * 1-5"))       -- 2030-05-06 is a Monday
    assert.is_true(office(at(2030, 5, 6, 9, 45)))
    assert.is_false(office(at(2030, 5, 6, 9, 50)))
    assert.is_false(office(at(2030, 5, 5, 9, 45)))                   -- Sunday
    local sundays = assert(backups.cron("30 2 * * 7"))
    assert.is_true(sundays(at(2030, 5, 5, 2, 30)))
    -- both day fields restricted: either matches (the 1st, or any Friday)
    local either = assert(backups.cron("0 0 1 * 5"))
    assert.is_true(either(at(2030, 5, 1, 0, 0)))
    assert.is_true(either(at(2030, 5, 10, 0, 0)))
    assert.is_false(either(at(2030, 5, 11, 0, 0)))
    local lists = assert(backups.cron("5,10-12,40/10 * * 1,6 *"))
    for _, m in ipairs({ 5, 10, 11, 12, 40, 50 }) do assert.is_true(lists(at(2030, 6, 3, 1, m))) end
    assert.is_false(lists(at(2030, 6, 3, 1, 13)))
    assert.is_false(lists(at(2030, 7, 3, 1, 5)))
    for expr, why in pairs({ ["0 3 * *"] = "5 fields", ["60 * * * *"] = "minute '60'", ["* 24 * * *"] = "hour",
        ["* * 0 * *"] = "day of month '0'", ["* * * 13 *"] = "month", ["* * * * 8"] = "day of week", ["5-1 * * * *"] = "5%-1",
        ["*/0 * * * *"] = "minute", ["mon * * * *"] = "minute 'mon'" }) do
      local ok, err = backups.cron(expr)
      assert.is_nil(ok)
      assert.matches(why, err)
    end
    local dir = Broker.tmpdir()
    local function load(text)
      files.write(dir .. "/forge.yml", text)
      return config.load(dir .. "/forge.yml", function() end)
    end
    local c = assert(load("backups:\n  schedule: '0 3 * * *'\n  keep: 7\n  dir: /var/backups/forge\n"))
    assert.same({ schedule = "0 3 * * *", keep = 7, dir = "/var/backups/forge" }, c.backups)
    local _, err = load("backups:\n  schedule: '0 25 * * *'\n")
    assert.matches("backups.schedule hour '25'", err)
    _, err = load("backups:\n  keep: 0\n")
    assert.matches("backups.keep must be an integer >= 1", err)
    _, err = load("backups:\n  every: 1\n")
    assert.matches("unknown setting 'backups.every'", err)
    os.execute("rm -rf " .. dir)
  end)

  it("back every instance up at the schedule's times and keep the newest", function()
    local b = Broker.start { fixtures = true, pool = 8, env = { FORGE_LOCAL_COMMANDS = COMMANDS },
      config = "backups:\n  schedule: '* * * * *'\n  keep: 2\n" }
    finally(function() b:cleanup() end)
    provisioned(b, "s1", R.service, R.one)
    provisioned(b, "d1", Broker.dummy.service, Broker.dummy.small)      -- its service has no backup hooks
    local m1 = backed_up(b, "s1")
    local m2 = backed_up(b, "s1")
    local deadline = proc.monotonic() + 100
    local list
    repeat
      proc.sleep(0.5)
      list = select(4, b:call("GET", "/admin/backups")).backups
    until list[1].by == "schedule" or proc.monotonic() > deadline
    assert.equal("schedule", list[1].by, cjson.encode(list))
    assert.equal("s1", list[1].instance)
    -- keep 2: the scheduled one and the newest before it
    assert.equal(2, #list)
    assert.equal(m2.id, list[2].id)
    assert.is_nil(lfs.attributes(backup_dir(b, m1)))
    local rec = b:instance("s1")
    assert.equal("backup", rec.operation.type)
    assert.equal("succeeded", rec.operation.state)
    assert.equal("provision", b:instance("d1").operation.type)
  end)
end)

describe("the store backup", function()
  -- The config a `forge store-backup` next to broker b reads (its FORGE_* environment).
  local function config_of(b)
    return assert(config.load(nil, function(name) return b.env[name] end))
  end

  -- What a fresh broker must serve of instance `id` with binding `bid`: the instance, its last
  -- operation, the binding's stored credentials, and a new binding.
  local function serves(b, id, bid, creds, service, plan)
    assert.equal("succeeded", select(4, b:call("GET", "/v2/service_instances/" .. id .. "/last_operation")).state)
    local status, _, _, body = b:call("GET", "/v2/service_instances/" .. id)
    assert.equal(200, status, cjson.encode(body or {}))
    status, _, _, body = b:call("GET", "/v2/service_instances/" .. id .. "/service_bindings/" .. bid)
    assert.equal(200, status)
    assert.same(creds, body.credentials)
    bound(b, id, bid .. "-after", service, plan)
  end

  it("db:backup copies a store of one moment into a new file, and never over one", function()
    local dir = Broker.tmpdir()
    finally(function() os.execute("rm -rf " .. dir) end)
    local store = require "forge.store"
    local db = assert(store.open(dir .. "/src.db"))
    for i = 1, 500 do assert(db:put(string.format("k/%03d", i), string.rep("v", i))) end
    local rev = db:revision()
    assert.equal(rev, db:backup(dir .. "/copy.db"))
    assert(db:put("k/after", "x"))
    local _, err = db:backup(dir .. "/copy.db")
    assert.equal("store.exists", err.code)
    _, err = db:backup(dir .. "/no/such/dir.db")
    assert.equal("store.io", err.code)
    assert.is_nil(lfs.attributes(dir .. "/no"))
    assert.equal("rw-------", lfs.attributes(dir .. "/copy.db", "permissions"))
    local copy = assert(store.open(dir .. "/copy.db"))
    local kvs = copy:range("k/")
    assert.equal(500, #kvs)
    assert.equal(string.rep("v", 500), kvs[500].value)
    assert.equal(rev, copy:revision())
    copy:close()
    db:close()
  end)

  it("copies the SQLite store while the broker runs; a fresh broker on the copy serves every instance", function()
    local b = Broker.start { fixtures = true, pool = 8, env = { FORGE_LOCAL_COMMANDS = COMMANDS } }
    finally(function() b:cleanup() end)
    provisioned(b, "r1", R.service, R.one)
    local rc = bound(b, "r1", "r1-b", R.service, R.one)
    assert.equal("OK", redis_cli(rc, "SET", "k", "v"))
    provisioned(b, "d1", Broker.dummy.service, Broker.dummy.small)
    local dc = bound(b, "d1", "d1-b", Broker.dummy.service, Broker.dummy.small)
    local pids = b:instance("r1").processes

    local file = b.state_dir .. "/store-backup.db"
    local info = assert(backups.store_backup(config_of(b), file))
    assert.equal("sqlite", info.kind)
    assert.is_true(info.revision > 1)
    assert.equal(lfs.attributes(file, "size"), info.size)
    assert.equal("rw-------", lfs.attributes(file, "permissions"))
    local again, err = backups.store_backup(config_of(b), file)
    assert.is_nil(again)
    assert.matches("exists: a store backup never overwrites a file", err, 1, true)

    -- the store is lost; the documented restore: stop, put the copy in place, start
    assert.equal(0, b:stop("TERM").code)
    for _, suffix in ipairs({ "", "-wal", "-shm" }) do os.remove(b.state_dir .. "/forge.db" .. suffix) end
    assert(os.execute("cp " .. file .. " " .. b.state_dir .. "/forge.db"))
    b:launch()
    serves(b, "r1", "r1-b", rc, R.service, R.one)
    serves(b, "d1", "d1-b", dc, Broker.dummy.service, Broker.dummy.small)
    assert.equal("v", redis_cli(rc, "GET", "k"))
    assert.same(pids, b:instance("r1").processes)        -- adopted, not restarted
    assert.equal(202, (b:call("DELETE", string.format("/v2/service_instances/d1?service_id=%s&plan_id=%s"
      .. "&accepts_incomplete=true", Broker.dummy.service, Broker.dummy.small))))
    assert.equal("succeeded", b:wait_operation("/v2/service_instances/d1", 30).state)
  end)

  it("snapshots an etcd store; a fresh etcd restored from it serves the broker again", function()
    local srv = etcd_server.start { fast = true }
    local b
    finally(function()
      if b then b:cleanup() end
      srv:cleanup()
    end)
    b = Broker.start { fixtures = true, pool = 4, env = { FORGE_STORE = "etcd", FORGE_ETCD_ENDPOINTS = srv.url,
      FORGE_ETCD_PREFIX = "forge-spec/" } }
    provisioned(b, "d1", Broker.dummy.service, Broker.dummy.small)
    local dc = bound(b, "d1", "d1-b", Broker.dummy.service, Broker.dummy.small)

    local file = b.state_dir .. "/etcd-snapshot.db"
    local info = assert(backups.store_backup(config_of(b), file))
    assert.equal("etcd snapshot", info.kind)
    assert.equal(srv.url, info.endpoint)
    assert.equal("rw-------", lfs.attributes(file, "permissions"))

    -- the etcd data is lost; the documented restore: a new data directory from the snapshot
    assert.equal(0, b:stop("TERM").code)
    srv:stop()
    os.execute("rm -rf " .. srv.dir .. "/data")
    local out, ok = run({ "etcdctl", "snapshot", "restore", file, "--name", srv.name, "--data-dir", srv.dir .. "/data",
      "--initial-cluster", srv.name .. "=" .. srv.peer_url, "--initial-advertise-peer-urls", srv.peer_url },
      { ETCDCTL_API = "3" })
    assert.is_true(ok, out)
    srv:start()
    b:launch()
    serves(b, "d1", "d1-b", dc, Broker.dummy.service, Broker.dummy.small)
  end)
end)
