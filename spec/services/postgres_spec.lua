-- PostgreSQL end to end: a real broker provisions, binds, updates and removes real postgres
-- servers; psql, the server's own client, uses the credentials.
local Broker = require "spec.support.broker"
local proc = require "forge.proc"
local cjson = require "cjson"
local lfs = require "lfs"

local PG = { service = "2ce35a84-27f5-4ed2-982d-2e23db02f9cf", one = "90e77abd-a3e9-4bb2-b1e4-5de0e19609ed",
  two = "26fdce70-03d0-40ea-8e6f-37a29c7455cf" }

-- psql as a client: -X (no psqlrc), unaligned tuples only, stop at the first error.
-- Returns the trimmed output (stdout, else stderr) and whether psql exited 0.
local function psql(uri, sql)
  local res = assert(proc.run { argv = { "psql", "-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", uri, "-c", sql },
    env = { PATH = os.getenv("PATH"), PGCONNECT_TIMEOUT = "5", PGAPPNAME = "postgres_spec" }, timeout = 20 })
  local out = res.code == 0 and res.stdout or (res.stderr ~= "" and res.stderr or res.stdout)
  return (out:gsub("%s+$", "")), res.code == 0
end

-- psql that must succeed (a write the rest of the test relies on).
local function must(uri, sql)
  local out, ok = psql(uri, sql)
  assert(ok, out)
  return out
end

-- psql until it answers `want` (replication is asynchronous, restarts take a moment).
local function eventually(uri, sql, want, timeout)
  local deadline = proc.monotonic() + (timeout or 15)
  local out
  repeat
    out = psql(uri, sql)
    if out == want then return out end
    proc.sleep(0.1)
  until proc.monotonic() > deadline
  return out
end

local function instance_record(b, id)
  local db = b:store()
  local kv = db:get("instance/" .. id)
  db:close()
  return kv and cjson.decode(kv.value)
end

local function provision(b, id, plan, params)
  return b:call("PUT", "/v2/service_instances/" .. id .. "?accepts_incomplete=true",
    { service_id = PG.service, plan_id = plan, organization_guid = "org", space_guid = "space", parameters = params })
end

local function update(b, id, plan, params)
  return b:call("PATCH", "/v2/service_instances/" .. id .. "?accepts_incomplete=true",
    { service_id = PG.service, plan_id = plan, parameters = params })
end

local function deprovision(b, id, plan)
  return b:call("DELETE", string.format("/v2/service_instances/%s?service_id=%s&plan_id=%s&accepts_incomplete=true",
    id, PG.service, plan))
end

local function bind(b, id, bid, plan, params)
  return b:call("PUT", "/v2/service_instances/" .. id .. "/service_bindings/" .. bid,
    { service_id = PG.service, plan_id = plan, parameters = params })
end

local function unbind(b, id, bid, plan)
  return b:call("DELETE", string.format("/v2/service_instances/%s/service_bindings/%s?service_id=%s&plan_id=%s",
    id, bid, PG.service, plan))
end

-- Provision and wait; returns the seconds it took (request to succeeded).
local function provisioned(b, id, plan, params)
  local t0 = proc.monotonic()
  local status, _, _, body = provision(b, id, plan, params)
  assert.equal(202, status, cjson.encode(body or {}))
  local op = b:wait_operation("/v2/service_instances/" .. id, 60)
  assert.equal("succeeded", op.state, op.description)
  return proc.monotonic() - t0
end

local function deprovisioned(b, id, plan)
  assert.equal(202, (deprovision(b, id, plan)))
  assert.equal("succeeded", b:wait_operation("/v2/service_instances/" .. id, 60).state)
end

-- Bind and return the credentials and the seconds the (synchronous) bind took.
local function bound(b, id, bid, plan, params)
  local t0 = proc.monotonic()
  local status, _, _, body = bind(b, id, bid, plan, params)
  assert.equal(201, status, cjson.encode(body or {}))
  return body.credentials, proc.monotonic() - t0
end

local function ppid(pid)
  local f = io.open("/proc/" .. pid .. "/stat")
  if not f then return nil end
  local stat = f:read("a")
  f:close()
  return tonumber(stat:match("^%d+ %b() %S+ (%d+)"))
end

-- The postmasters of an instance, by server name: the processes working in a server's data
-- directory whose parent is not itself one of them (backends, checkpointer, ... are children).
local function postmasters(b, id)
  local pids = Broker.marked_pids(b.state_dir, id)
  local set = {}
  for _, pid in ipairs(pids) do set[pid] = true end
  local by_server = {}
  local prefix = b.state_dir .. "/instances/" .. id .. "/"
  for _, pid in ipairs(pids) do
    local cwd = lfs.symlinkattributes("/proc/" .. pid .. "/cwd", "target") or ""
    local server = cwd:sub(#prefix + 1):match("^([^/]+)/data$")
    if server and not set[ppid(pid) or 0] then
      by_server[server] = by_server[server] or {}
      table.insert(by_server[server], pid)
    end
  end
  return by_server, pids
end

-- Pids of live processes working in the instance's directory or below: init commands run in
-- the directory itself, which Broker.marked_pids (below it only) does not list.
local function instance_pids(b, id)
  local dir, pids = b.state_dir .. "/instances/" .. id, {}
  for entry in lfs.dir("/proc") do
    if entry:match("^%d+$") then
      local cwd = lfs.symlinkattributes("/proc/" .. entry .. "/cwd", "target") or ""
      if cwd == dir or cwd:sub(1, #dir + 1) == dir .. "/" then pids[#pids + 1] = tonumber(entry) end
    end
  end
  return pids
end

local function comm(pid)
  local f = io.open("/proc/" .. pid .. "/comm")
  if not f then return "" end
  local c = f:read("l") or ""
  f:close()
  return c
end

-- The helper commands (initdb, pg_basebackup) running for the instance.
local function helpers(b, id)
  local left = {}
  for _, pid in ipairs(instance_pids(b, id)) do
    local c = comm(pid)
    if c == "initdb" or c == "pg_basebackup" then left[#left + 1] = c end
  end
  return left
end

-- Wait until the instance runs `command` (an init step), for at most `timeout` seconds;
-- false when the operation ended first.
local function wait_for_helper(b, id, command, timeout)
  local deadline, n = proc.monotonic() + (timeout or 20), 0
  while proc.monotonic() < deadline do
    for _, pid in ipairs(instance_pids(b, id)) do
      if comm(pid) == command then return true end
    end
    n = n + 1
    if n % 20 == 0 then
      local rec = instance_record(b, id)
      if rec and rec.operation and rec.operation.state ~= "in progress" then return false end
    end
    proc.sleep(0.01)
  end
  return false
end

local timings = {}

describe("postgres on the local target", function()
  local b

  setup(function() b = Broker.start { pool = 16 } end)
  teardown(function()
    local names = {}
    for k in pairs(timings) do names[#names + 1] = k end
    table.sort(names)
    for _, k in ipairs(names) do io.stderr:write(string.format("postgres timing: %-36s %6.2f s\n", k, timings[k])) end
    if not b then return end
    -- what a failed test left running: the postmasters first, so their children are gone
    -- (not racing) by the time cleanup kills every marked process
    local left = Broker.marked_pids(b.state_dir)
    local set = {}
    for _, pid in ipairs(left) do set[pid] = true end
    for _, pid in ipairs(left) do
      local start = proc.identity(pid)
      if start and not set[ppid(pid) or 0] then proc.kill(pid, start, "KILL") end
    end
    local deadline = proc.monotonic() + 5
    while #Broker.marked_pids(b.state_dir) > 0 and proc.monotonic() < deadline do proc.sleep(0.1) end
    b:cleanup()
  end)

  it("serves the catalog with both plans and their schemas", function()
    local status, _, _, body = b:call("GET", "/v2/catalog")
    assert.equal(200, status)
    local svc
    for _, s in ipairs(body.services) do if s.name == "postgres" then svc = s end end
    assert.is_table(svc)
    assert.equal(PG.service, svc.id)
    assert.is_true(svc.plan_updateable)
    local names = {}
    for _, p in ipairs(svc.plans) do
      names[p.name] = p.id
      assert.is_nil(p.servers)                       -- the plan's own data stays out of the catalog
      assert.equal("15.0.0", p.maintenance_info.version)
      local props = p.schemas.service_instance.create.parameters.properties
      assert.same({ 10, 1000, 100 }, { props.max_connections.minimum, props.max_connections.maximum,
        props.max_connections.default })
      assert.same({ "own", "shared" }, p.schemas.service_binding.create.parameters.properties.database.enum)
    end
    assert.same({ ["1-server"] = PG.one, ["2-servers"] = PG.two }, names)
  end)

  it("provisions, binds, isolates, unbinds and deprovisions a 1-server instance", function()
    timings["provision 1-server"] = provisioned(b, "p1", PG.one)
    local rec = instance_record(b, "p1")
    assert.equal("running", rec.state)
    assert.same({ "primary" }, (function()
      local n = {}
      for name in pairs(postmasters(b, "p1")) do n[#n + 1] = name end
      return n
    end)())

    local c1, t_bind = bound(b, "p1", "b1", PG.one)
    timings["bind 1-server"] = t_bind
    assert.equal(c1.username, c1.database)              -- its own database
    assert.equal(string.format("postgresql://%s:%s@%s:%d/%s", c1.username, c1.password, c1.host, c1.port, c1.database),
      c1.uri)
    assert.equal(string.format("jdbc:postgresql://%s:%d/%s?user=%s&password=%s", c1.host, c1.port, c1.database,
      c1.username, c1.password), c1.jdbcUrl)
    assert.same({ string.format("%s:%d", c1.host, c1.port) }, c1.hosts)
    assert.is_nil(c1.read_only_uri)

    assert.equal("", select(1, psql(c1.uri, "CREATE TABLE notes (id int PRIMARY KEY, body text)")))
    must(c1.uri, "INSERT INTO notes VALUES (1, 'hello'), (2, 'world')")
    assert.equal("hello world", (psql(c1.uri, "SELECT string_agg(body, ' ' ORDER BY id) FROM notes")))
    assert.equal(c1.username, (psql(c1.uri, "SELECT current_user")))
    -- the identical PUT answers 200 with the same credentials
    local again, _, _, abody = bind(b, "p1", "b1", PG.one)
    assert.equal(200, again)
    assert.same(c1, abody.credentials)

    -- a second binding has its own database and cannot reach the first's
    local c2 = bound(b, "p1", "b2", PG.one)
    assert.are_not.equal(c1.database, c2.database)
    local other = c2.uri:gsub("/[^/]+$", "/" .. c1.database)
    local out, ok = psql(other, "SELECT body FROM notes")
    assert.is_false(ok)
    assert.matches("permission denied for database", out)
    -- nor the admin databases, nor the shared one
    assert.matches("permission denied for database", (psql((c2.uri:gsub("/[^/]+$", "/postgres")), "SELECT 1")))
    assert.matches("permission denied for database", (psql((c2.uri:gsub("/[^/]+$", "/app")), "SELECT 1")))
    assert.matches("permission denied", (psql(c2.uri, "CREATE ROLE sneaky")))

    assert.equal(200, (unbind(b, "p1", "b1", PG.one)))
    out, ok = psql(c1.uri, "SELECT 1")
    assert.is_false(ok)
    assert.matches("password authentication failed", out)
    assert.equal(410, (unbind(b, "p1", "b1", PG.one)))
    assert.equal(200, (unbind(b, "p1", "b2", PG.one)))
    assert.is_false(select(2, psql(c2.uri, "SELECT 1")))

    local ports = rec.resources.ports
    deprovisioned(b, "p1", PG.one)
    assert.same({}, Broker.marked_pids(b.state_dir, "p1"))
    assert.same({}, instance_pids(b, "p1"))
    for _, port in ipairs(ports) do assert.is_true(proc.port_free(port), "port " .. port .. " still listening") end
    assert.is_nil(lfs.attributes(b.state_dir .. "/instances/p1"))
    assert.equal(410, (deprovision(b, "p1", PG.one)))
  end)

  it("refuses parameters outside their schema, naming the path", function()
    local cases = {
      { { max_connections = 5 }, "max_connections" },
      { { max_connections = 1001 }, "max_connections" },
      { { shared_buffers_mb = "128MB" }, "shared_buffers_mb" },
      { { work_mem_mb = 1.5 }, "work_mem_mb" },
      { { work_mem_mb = 2048 }, "work_mem_mb" },
      { { fsync = "off" }, "fsync" },
    }
    for _, c in ipairs(cases) do
      local status, _, _, body = provision(b, "bad", PG.one, c[1])
      assert.equal(400, status, cjson.encode(c[1]))
      assert.matches(c[2], body.description, 1, true)
    end
    assert.is_nil(instance_record(b, "bad"))
  end)

  it("updates 1-server -> 2-servers keeping the data, the standby replaying it; 2 -> 1 drops the standby; "
    .. "1 -> 2 copies a new one", function()
    provisioned(b, "u1", PG.one, { max_connections = 50 })
    local own = bound(b, "u1", "own", PG.one)
    local shared = bound(b, "u1", "sh1", PG.one, { database = "shared" })
    assert.equal("app", shared.database)
    must(own.uri, "CREATE TABLE t (v text); INSERT INTO t VALUES ('before')")
    must(shared.uri, "CREATE TABLE shared_t (v text); INSERT INTO shared_t VALUES ('shared before')")
    assert.equal("50", (psql(own.uri, "SHOW max_connections")))
    -- bindings with a value outside the schema are refused
    local bstatus, _, _, bbody = bind(b, "u1", "bad", PG.one, { database = "yours" })
    assert.equal(400, bstatus)
    assert.matches("database", bbody.description)
    local ustatus, _, _, ubody = update(b, "u1", PG.two, { shared_buffers_mb = 8 })
    assert.equal(400, ustatus)
    assert.matches("shared_buffers_mb", ubody.description)

    local t0 = proc.monotonic()
    assert.equal(202, (update(b, "u1", PG.two, { max_connections = 60, shared_buffers_mb = 32 })))
    local op = b:wait_operation("/v2/service_instances/u1", 60)
    assert.equal("succeeded", op.state, op.description)
    timings["update 1-server -> 2-servers"] = proc.monotonic() - t0
    local rec = instance_record(b, "u1")
    assert.equal(2, #rec.resources.ports)
    local servers = postmasters(b, "u1")
    assert.equal(1, #servers.primary)
    assert.equal(1, #servers.standby)

    -- the re-applied bindings keep their passwords and now list the standby too
    local _, _, _, got = b:call("GET", "/v2/service_instances/u1/service_bindings/own")
    assert.equal(own.password, got.credentials.password)
    assert.equal(2, #got.credentials.hosts)
    assert.equal(own.uri:gsub(":%d+/", string.format(":%d/", rec.resources.ports[2])), got.credentials.read_only_uri)
    -- the data and the re-applied bindings survived the redeploy, with the new parameters
    assert.equal("before", (psql(own.uri, "SELECT v FROM t")))
    assert.equal("60", (psql(own.uri, "SHOW max_connections")))
    assert.equal("32MB", (psql(own.uri, "SHOW shared_buffers")))
    -- a binding made now lists both servers and reads the shared database from the standby
    local sh2, t_bind = bound(b, "u1", "sh2", PG.two, { database = "shared" })
    timings["bind 2-servers"] = t_bind
    assert.same({ string.format("%s:%d", sh2.host, rec.resources.ports[1]),
      string.format("%s:%d", sh2.host, rec.resources.ports[2]) }, sh2.hosts)
    assert.equal(string.format("postgresql://%s:%s@%s:%d/app", sh2.username, sh2.password, sh2.host,
      rec.resources.ports[2]), sh2.read_only_uri)
    assert.equal("shared before", eventually(sh2.read_only_uri, "SELECT v FROM shared_t", "shared before"))
    assert.equal("t", (psql(sh2.read_only_uri, "SELECT pg_is_in_recovery()")))
    local out, ok = psql(sh2.read_only_uri, "INSERT INTO shared_t VALUES ('nope')")
    assert.is_false(ok)
    assert.matches("read%-only transaction", out)
    -- streaming goes on: a row written on the primary now shows up on the standby
    must(sh2.uri, "INSERT INTO shared_t VALUES ('after')")
    assert.equal("after", eventually(sh2.read_only_uri, "SELECT v FROM shared_t WHERE v = 'after'", "after"))
    -- and the first binding's own database is replicated too (its role included)
    local own_standby = own.uri:gsub(":%d+/", string.format(":%d/", rec.resources.ports[2]))
    assert.equal("before", eventually(own_standby, "SELECT v FROM t", "before"))

    -- 2 -> 1: the standby goes, with its directory and port; the primary keeps everything
    local standby_port = rec.resources.ports[2]
    assert.equal(202, (update(b, "u1", PG.one, { max_connections = 60, shared_buffers_mb = 32 })))
    op = b:wait_operation("/v2/service_instances/u1", 60)
    assert.equal("succeeded", op.state, op.description)
    servers = postmasters(b, "u1")
    assert.is_nil(servers.standby)
    assert.equal(1, #servers.primary)
    assert.is_nil(lfs.attributes(b.state_dir .. "/instances/u1/standby"))
    assert.is_true(proc.port_free(standby_port))
    assert.equal("before", (psql(own.uri, "SELECT v FROM t")))
    assert.equal("shared before,after", (psql(sh2.uri, "SELECT string_agg(v, ',' ORDER BY v DESC) FROM shared_t")))

    -- 1 -> 2 again: a new standby, copied afresh from the primary (its init runs again)
    assert.equal(202, (update(b, "u1", PG.two, { max_connections = 60, shared_buffers_mb = 32 })))
    op = b:wait_operation("/v2/service_instances/u1", 60)
    assert.equal("succeeded", op.state, op.description)
    assert.equal(1, #postmasters(b, "u1").standby)
    rec = instance_record(b, "u1")
    local again = own.uri:gsub(":%d+/", string.format(":%d/", rec.resources.ports[2]))
    assert.equal("before", eventually(again, "SELECT v FROM t", "before"))
    assert.equal(202, (update(b, "u1", PG.one, { max_connections = 60, shared_buffers_mb = 32 })))
    assert.equal("succeeded", b:wait_operation("/v2/service_instances/u1", 60).state)

    -- unbinding one shared binding leaves the shared tables to the others
    assert.equal(200, (unbind(b, "u1", "sh1", PG.one)))
    assert.is_false(select(2, psql(shared.uri, "SELECT 1")))
    assert.equal("2", (psql(sh2.uri, "SELECT count(*) FROM shared_t")))
    deprovisioned(b, "u1", PG.one)
    assert.same({}, instance_pids(b, "u1"))
  end)

  it("provisions 2-servers; a postgres killed with SIGKILL is restarted and still has the data", function()
    timings["provision 2-servers"] = provisioned(b, "p2", PG.two)
    local rec = instance_record(b, "p2")
    local c, t_bind = bound(b, "p2", "b", PG.two)
    timings["bind 2-servers"] = t_bind
    assert.equal(2, #c.hosts)
    assert.is_string(c.read_only_uri)
    must(c.uri, "CREATE TABLE survives (v text); INSERT INTO survives VALUES ('committed')")
    assert.equal("committed", eventually(c.read_only_uri, "SELECT v FROM survives", "committed"))

    local before = rec.processes.primary
    assert.is_true(proc.kill(before.pid, before.start_time, "KILL"))
    local deadline = proc.monotonic() + 20
    local after
    repeat
      proc.sleep(0.2)
      after = instance_record(b, "p2").processes.primary
    until (after.pid ~= before.pid and proc.alive(after.pid, after.start_time)) or proc.monotonic() > deadline
    assert.are_not.equal(before.pid, after.pid)
    assert.equal("committed", eventually(c.uri, "SELECT v FROM survives", "committed", 20))
    -- the standby reconnects to the restarted primary and goes on replaying
    must(c.uri, "INSERT INTO survives VALUES ('after the crash')")
    assert.equal("2", eventually(c.read_only_uri, "SELECT count(*) FROM survives", "2", 20))
    local servers = postmasters(b, "p2")
    assert.equal(1, #servers.primary)
    assert.equal(1, #servers.standby)

    -- a session open on the standby when the binding goes is ended there too
    local session = assert(proc.spawn { argv = { "psql", "-X", "-q", c.read_only_uri, "-c", "SELECT pg_sleep(30)" },
      env = { PATH = os.getenv("PATH"), PGCONNECT_TIMEOUT = "5" }, stdout = b.state_dir .. "/session.log" })
    assert.equal("1", eventually(c.read_only_uri,
      "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(30)'", "1"))
    assert.equal(200, (unbind(b, "p2", "b", PG.two)))
    local ended = proc.wait(session.pid, 5)
    if not ended then proc.kill(session.pid, session.start_time, "KILL") end
    assert.is_table(ended, "the standby session outlived the binding")
    assert.are_not.equal(0, ended.code)
    assert.is_false(select(2, psql(c.read_only_uri, "SELECT 1")))
    deprovisioned(b, "p2", PG.two)
    assert.same({}, instance_pids(b, "p2"))
    for _, port in ipairs(rec.resources.ports) do assert.is_true(proc.port_free(port)) end
    assert.is_nil(lfs.attributes(b.state_dir .. "/instances/p2"))
  end)

  it("finishes a 2-servers provision after the broker is killed mid-operation (three times), with no orphan",
    function()
      local t0 = proc.monotonic()
      assert.equal(202, (provision(b, "crash", PG.two)))
      b:stop("KILL")                                  -- before anything ran, most likely
      b:launch()
      -- while initdb runs (it dies with the broker; the restarted one runs it again on an empty
      -- data directory), then while pg_basebackup copies the primary for the standby
      local hits = 0
      for _, helper in ipairs({ "initdb", "pg_basebackup" }) do
        if wait_for_helper(b, "crash", helper) then
          hits = hits + 1
          b:stop("KILL")
          b:launch()
        end
      end
      assert.is_true(hits >= 1, "the broker was never killed while a helper ran")
      local op = b:wait_operation("/v2/service_instances/crash", 60)
      assert.equal("succeeded", op.state, op.description)
      timings["provision 2-servers (3 broker kills)"] = proc.monotonic() - t0
      local rec = instance_record(b, "crash")
      assert.equal("running", rec.state)
      local servers = postmasters(b, "crash")
      assert.equal(1, #servers.primary)
      assert.equal(1, #servers.standby)
      for _, name in ipairs({ "primary", "standby" }) do
        assert.equal(servers[name][1], rec.processes[name].pid)
        assert.is_true(proc.alive(rec.processes[name].pid, rec.processes[name].start_time))
      end
      assert.same({}, helpers(b, "crash"))
      local c = bound(b, "crash", "cb", PG.two)
      must(c.uri, "CREATE TABLE x (v int); INSERT INTO x VALUES (42)")
      assert.equal("42", eventually(c.read_only_uri, "SELECT v FROM x", "42"))
      deprovisioned(b, "crash", PG.two)
      assert.same({}, instance_pids(b, "crash"))
    end)
end)
