-- Secrets at rest (docs/security.md): real brokers provision and bind real redis instances, and
-- no password they handed out is anywhere in the SQLite file, its WAL, an etcd dump or snapshot,
-- the log or the admin API; the files the services write are 0600 and the service user's; the
-- keyring is checked at start; `forge rotate-key` re-seals, resumes after a kill, and loses no
-- concurrent write.
local Broker = require "spec.support.broker"
local crypto = require "forge.crypto"
local etcd_server = require "support.etcd"
local files = require "spec.support.files"
local lfs = require "lfs"
local proc = require "forge.proc"
local secrets = require "forge.secrets"
local shell = require "spec.support.shell"
local util = require "forge.util"

local R = Broker.redis

local function new_key() return crypto.base64_encode(crypto.random_bytes(32)) end

local function provision(b, id, plan)
  local status, raw = b:call("PUT", "/v2/service_instances/" .. id .. "?accepts_incomplete=true",
    { service_id = R.service, plan_id = plan, organization_guid = "org", space_guid = "space" })
  assert.equal(202, status, raw)
  assert.equal("succeeded", b:wait_operation("/v2/service_instances/" .. id, 60).state)
end

-- Bind (waiting for an async binding), or bind again, and return the credentials.
local function bind(b, id, bid, plan)
  local path = "/v2/service_instances/" .. id .. "/service_bindings/" .. bid
  local status, raw, _, body = b:call("PUT", path .. "?accepts_incomplete=true", { service_id = R.service, plan_id = plan })
  if status == 202 then
    assert.equal("succeeded", b:wait_operation(path).state)
    status, raw, _, body = b:call("GET", path)
    assert.equal(200, status, raw)
  else
    assert.is_true(status == 201 or status == 200, raw)   -- 200: the same binding again
  end
  return body.credentials
end

-- Every password the broker handed out or keeps for instance `id`: its secrets (the admin
-- password redis.conf carries) and its bindings' passwords and URIs.
local function secrets_of(b, id, creds_list)
  local found = {}
  for _, v in pairs(b:instance(id).secrets or {}) do found[#found + 1] = v end
  for _, c in ipairs(creds_list) do
    found[#found + 1] = c.password
    if c.uri then found[#found + 1] = c.uri end
  end
  assert.is_true(#found >= 1 + #creds_list)
  return found
end

local function assert_absent(where, text, list)
  assert.is_true(#text > 0, where .. " is empty")
  for _, s in ipairs(list) do
    assert.is_nil(text:find(s, 1, true), where .. " holds a secret in plain text")
  end
end

-- A started broker that runs instances r1 (1-server) and r3 (3-servers) with two bindings
-- each; returns the secrets.
local function run_instances(b)
  provision(b, "r1", R.one)
  provision(b, "r3", R.three)
  local list = {}
  for _, id in ipairs({ "r1", "r3" }) do
    local plan = id == "r1" and R.one or R.three
    local creds = { bind(b, id, id .. "-b1", plan), bind(b, id, id .. "-b2", plan) }
    for _, s in ipairs(secrets_of(b, id, creds)) do list[#list + 1] = s end
  end
  return list
end

local function config_text(keys, primary)
  local lines = { "encryption:", "  primary: " .. primary, "  keys:" }
  for _, k in ipairs(keys) do lines[#lines + 1] = "    - {id: " .. k.id .. ", file: " .. k.file .. "}" end
  return table.concat(lines, "\n") .. "\n"
end

local function write_key(dir, id, text)
  local path = dir .. "/" .. id .. ".key"
  files.write(path, text or new_key())
  return { id = id, file = path }
end

-- The key ids the broker's stored values are sealed under: id -> count (nil: plain text).
-- The key ids the stored values are sealed under, with counts ("plain": not sealed), and the
-- store's usage record (plain JSON: key ids and sealed probes, which a start checks the ring against).
local function kids(b)
  local db = assert(require("forge.store").open(b.state_dir .. "/forge.db"))
  local out, usage = {}, nil
  for _, kv in ipairs(assert(db:range(""))) do
    if kv.key == "keyring/usage" then
      usage = require("cjson").decode(kv.value)
    else
      local kid = secrets.kid(kv.value) or "plain"
      out[kid] = (out[kid] or 0) + 1
    end
  end
  db:close()
  return out, usage
end

local function forge_cli(b, args)
  local env = {}
  for k, v in pairs(b.env) do env[#env + 1] = k .. "='" .. v .. "'" end
  return shell.run("env " .. table.concat(env, " ") .. " " .. shell.FORGE .. " " .. args)
end

describe("secrets at rest", function()
  describe("the encryption section", function()
    local function load(text)
      local path = files.temp(text)
      local c, err = require("forge.config").load(path, function() return nil end)
      os.remove(path)
      return c, err
    end

    it("takes keys with an id and a file or env, and a primary among them (optional with one key)", function()
      local c = assert(load("encryption:\n  keys:\n    - {id: k1, file: /k1}\n"))
      assert.same({ keys = { { id = "k1", file = "/k1" } }, primary = "k1" }, c.encryption)
      c = assert(load("encryption:\n  primary: b\n  keys: [{id: a, env: A}, {id: b, file: /b}]\n"))
      assert.equal("b", c.encryption.primary)
    end)

    it("refuses what would leave the keyring ambiguous", function()
      for text, message in pairs({
        ["encryption: {keys: []}"] = "encryption.keys must list at least one key",
        ["encryption: {keys: [{id: a, file: /a}, {id: a, file: /b}], primary: a}"] = "duplicate key id 'a'",
        ["encryption: {keys: [{id: a, file: /a, env: A}]}"] = "needs one of file (a path) or env",
        ["encryption: {keys: [{id: a}]}"] = "needs one of file (a path) or env",
        ["encryption: {keys: [{id: 'a b', file: /a}]}"] = "encryption.keys[1].id must use letters",
        ["encryption: {keys: [{id: a, file: /a}, {id: b, file: /b}]}"] = "encryption.primary must be the id of one",
        ["encryption: {keys: [{id: a, file: /a}], primary: z}"] = "encryption.primary must be the id of one",
        ["encryption: {keys: [{id: a, path: /a}]}"] = "unknown setting 'encryption.keys[1].path'",
      }) do
        local c, err = load(text)
        assert.is_nil(c, text)
        assert.matches(message, err, 1, true)
      end
    end)
  end)

  describe("the sealing store", function()
    local dir, raw, db
    local ring = { keys = { k1 = crypto.random_bytes(32), k2 = crypto.random_bytes(32) }, ids = { "k1", "k2" },
      primary = "k1" }
    before_each(function()
      dir = Broker.tmpdir()
      raw = assert(require("forge.store").open(dir .. "/s.db"))
      db = secrets.wrap(raw, ring)
    end)
    after_each(function()
      raw:close()
      os.execute("rm -rf " .. dir)
    end)

    it("seals on put, txn and batch, opens on get and range; the stored value is an envelope", function()
      assert(db:put("a", "secret-a"))
      assert(db:txn { success = { { op = "put", key = "b", value = "secret-b" } } })
      assert(db:batch { { success = { { op = "put", key = "c", value = "secret-c" } } },
        { success = { { op = "put", key = "d", value = "secret-d" } } } })
      assert.equal("secret-a", db:get("a").value)
      local kvs = assert(db:range(""))
      assert.same({ "secret-a", "secret-b", "secret-c", "secret-d" }, { kvs[1].value, kvs[2].value, kvs[3].value,
        kvs[4].value })
      for _, k in ipairs({ "a", "b", "c", "d" }) do
        local stored = raw:get(k).value
        assert.equal("k1", secrets.kid(stored))
        assert.is_nil(stored:find("secret", 1, true))
      end
      assert.is_true(db:revision() > 0)       -- other methods reach the store as they are
    end)

    it("reads a plain value shaped almost like an envelope as plain text", function()
      for _, plain in ipairs({ '{"sealed":1,"kid":"k1","data":"AAAA","more":"x"}', '{"sealed":1,"kid":"k 1","data":""}',
        '{"sealed":1,"kid":"","data":"AAAA"}', '{"sealed":1,"kid":"k1","data":"AAAA"} ', '{"sealed":1,"kid":"k1"}' }) do
        assert(raw:put("plain", plain))
        assert.is_nil(secrets.kid(plain), plain)
        assert.equal(plain, db:get("plain").value)
      end
    end)

    it("refuses a value copied to another key, changed, or sealed under a key it lacks", function()
      assert(db:put("instance/a", "x"))
      assert(raw:put("instance/b", raw:get("instance/a").value))
      local v, err = db:get("instance/b")
      assert.is_nil(v)
      assert.equal("secrets.open", err.code)
      assert.matches("cannot open instance/b with encryption key 'k1'", err.message, 1, true)
      local other = secrets.wrap(raw, { keys = { k2 = ring.keys.k2 }, ids = { "k2" }, primary = "k2" })
      v, err = other:range("instance/")
      assert.is_nil(v)
      assert.equal("secrets.unknown_key", err.code)
      assert.has_error(function()
        db:txn { compare = { { key = "instance/a", value = "x" } }, success = {} }
      end, "db:txn: a sealed store cannot compare values (compare mod_revision)")
      assert.has_error(function()
        db:batch { { compare = { { key = "instance/a", value = "x" } }, success = {} } }
      end, "db:batch: a sealed store cannot compare values (compare mod_revision)")
    end)

    it("counts the store once at start, then checks the ring against its usage record alone", function()
      for i = 1, 20 do assert(db:put("instance/i" .. i, "v" .. i)) end
      assert.same({}, (secrets.check_store(db)))        -- no record yet: every value read once
      local rows = 0
      local counted = setmetatable({ range = function(_, ...)
        local kvs, err = raw:range(...)
        rows = rows + (kvs and #kvs or 0)
        return kvs, err
      end }, { __index = function(_, name) return function(_, ...) return raw[name](raw, ...) end end })
      local again = secrets.wrap(counted, ring)
      assert.same({}, (secrets.check_store(again)))
      assert.equal(0, rows)
      -- a process with another primary notes it before it writes; a ring without a noted key is refused
      local k2 = secrets.wrap(raw, { keys = ring.keys, ids = ring.ids, primary = "k2" })
      assert(secrets.note_primary(k2))
      assert(k2:put("instance/j", "w"))
      local problems = secrets.check_store(secrets.wrap(raw, { keys = { k1 = ring.keys.k1 }, ids = { "k1" },
        primary = "k1" }))
      assert.equal(1, #problems)
      assert.matches("e.g. keyring/probe/k2, are sealed under encryption key 'k2', which the keyring does not hold",
        problems[1], 1, true)
      -- the same id with other key material does not open the probe
      problems = secrets.check_store(secrets.wrap(raw, { keys = { k1 = ring.keys.k1, k2 = crypto.random_bytes(32) },
        ids = { "k1", "k2" }, primary = "k1" }))
      assert.equal(1, #problems)
      assert.matches("with encryption key 'k2'", problems[1], 1, true)
    end)

    it("completes a usage record that was only noted, counting what was stored before it", function()
      assert(raw:put("instance/p", "plain from before"))
      local k2 = secrets.wrap(raw, { keys = ring.keys, ids = ring.ids, primary = "k2" })
      assert(k2:put("instance/old", "under k2, before any record"))
      assert(secrets.note_primary(db))                  -- a record that names only k1, not complete
      local problems, plain, first = secrets.check_store(secrets.wrap(raw, { keys = { k1 = ring.keys.k1 },
        ids = { "k1" }, primary = "k1" }))
      assert.equal(1, #problems)
      assert.matches("e.g. instance/old, are sealed under encryption key 'k2'", problems[1], 1, true)
      assert.equal(1, plain)
      assert.equal("instance/p", first)
      assert.same({}, (secrets.check_store(db)))
    end)

    it("reads values from before sealing as they are, and rotation seals them", function()
      assert(raw:put("old", '{"password":"plain"}'))
      assert.equal('{"password":"plain"}', db:get("old").value)
      local problems, plain = secrets.check_store(db)
      assert.same({}, problems)
      assert.equal(1, plain)
      local rotated = secrets.wrap(raw, { keys = ring.keys, ids = ring.ids, primary = "k2" })
      local job = assert(secrets.rotate(rotated))
      assert.equal(1, job.resealed)
      assert.equal("k2", secrets.kid(raw:get("old").value))
      assert.equal('{"password":"plain"}', rotated:get("old").value)
    end)
  end)

  it("no password handed out is in the SQLite file, its WAL, the log or the admin API; service files are 0600",
    function()
    local b = Broker.start()
    finally(function() b:cleanup() end)
    local list = run_instances(b)
    -- the store's files are read as they are; the keys (ids) are there in clear, the secrets not
    local db_file, wal = files.read(b.state_dir .. "/forge.db"), files.read(b.state_dir .. "/forge.db-wal")
    assert.truthy(wal:find("instance/r1", 1, true), "the WAL holds the records")
    assert_absent("forge.db", db_file, list)
    assert_absent("forge.db-wal", wal, list)
    assert_absent("the broker's log", b:read_log(), list)
    local _, raw = b:call("GET", "/admin/instances/r1")
    assert_absent("the admin API", raw, list)
    -- every stored value is sealed, under the key the broker generated at its first start
    local sealed, usage = kids(b)
    assert.same({ generated = sealed.generated }, sealed)
    assert.same({ "generated" }, util.sorted_keys(usage.kids))
    assert.is_true(usage.complete)
    local key = lfs.attributes(b.state_dir .. "/forge.key")
    assert.equal("rw-------", key.permissions)
    assert.matches("generated an encryption key", b:read_log(), 1, true)
    -- the files of the services that carry a secret: 0600, owned by the service user
    local svc = proc.user("forge-svc")
    for _, rel in ipairs({ "r1/redis-0/redis.conf", "r1/redis-0/users.acl", "r3/redis-1/redis.conf",
      "r3/redis-2/users.acl" }) do
      local a = assert(lfs.attributes(b.state_dir .. "/instances/" .. rel), rel)
      assert.equal("rw-------", a.permissions, rel)
      assert.equal(svc.uid, a.uid, rel)
    end
    assert.truthy(files.read(b.state_dir .. "/instances/r3/redis-1/redis.conf"):find("masterauth", 1, true))
    -- and a restarted broker opens its store with the same key
    b:stop()
    b:launch()
    assert.equal(200, (b:call("GET", "/v2/service_instances/r1/service_bindings/r1-b1")))
  end)

  it("no password handed out is in an etcd dump or an etcd snapshot", function()
    local etcd = etcd_server.start { fast = true }
    local b
    finally(function()
      if b then b:cleanup() end
      etcd:cleanup()
    end)
    b = Broker.start { env = { FORGE_STORE = "etcd", FORGE_ETCD_ENDPOINTS = etcd.url, FORGE_ETCD_PREFIX = "sealed/" } }
    local list = run_instances(b)
    local dump = etcd:etcdctl("get", "--prefix", "")
    assert.truthy(dump:find("sealed/instance/r1", 1, true))
    assert_absent("the etcd dump", dump, list)
    local snap = b.state_dir .. "/etcd.snapshot"
    etcd:etcdctl("snapshot", "save", snap)
    assert_absent("the etcd snapshot", files.read(snap), list)
    assert_absent("the broker's log", b:read_log(), list)
  end)

  describe("the keyring", function()
    local dir
    before_each(function() dir = Broker.tmpdir() end)
    after_each(function() os.execute("rm -rf " .. dir) end)

    local function refused(opts, pattern)
      opts.state_dir = dir .. "/state-" .. math.random(1e9)
      assert(os.execute("mkdir " .. opts.state_dir))
      local ok, err = pcall(Broker.start, opts)
      assert.is_false(ok, "the broker started")
      assert.matches(pattern, tostring(err), 1, true)
    end

    it("refuses to start with a key file that is missing, unreadable or not 32 bytes of base64", function()
      refused({ config = config_text({ { id = "k1", file = dir .. "/none.key" } }, "k1") },
        "encryption key 'k1' (" .. dir .. "/none.key) cannot be read")
      refused({ config = config_text({ write_key(dir, "short", crypto.base64_encode(("x"):rep(16))) }, "short") },
        "encryption key 'short' (" .. dir .. "/short.key) must hold 32 random bytes in base64")
      refused({ env = { FORGE_ENCRYPTION_KEY = "not base64!" } }, "encryption key 'env' ($FORGE_ENCRYPTION_KEY)")
    end)

    it("refuses a key that does not open the store, and a ring without a key the store needs", function()
      local k1 = write_key(dir, "k1")
      local b = Broker.start { config = config_text({ k1 }, "k1") }
      finally(function() b:cleanup() end)
      provision(b, "r1", R.one)
      b:stop()
      -- the same id, other key material
      files.write(k1.file, new_key() .. "\n")
      local ok, err = pcall(b.launch, b)
      assert.is_false(ok)
      assert.matches("with encryption key 'k1': authentication failed", tostring(err), 1, true)
    end)
  end)

  describe("forge rotate-key", function()
    local dir, b
    before_each(function() dir = Broker.tmpdir() end)
    after_each(function()
      if b then b:cleanup() end
      b = nil
      os.execute("rm -rf " .. dir)
    end)

    -- Rewrite the spec config to `text` (the broker reads it on its next start).
    local function reconfigure(text) files.write(b.config_path, text) end

    it("re-seals every record under the new primary; the old key may go only after that", function()
      local k1, k2 = write_key(dir, "k1"), write_key(dir, "k2")
      b = Broker.start { config = config_text({ k1 }, "k1") }
      provision(b, "r1", R.one)
      local creds = bind(b, "r1", "b1", R.one)
      b:stop()
      -- a ring without k1 is refused while records need it, naming the key and a record
      reconfigure(config_text({ k2 }, "k2"))
      local ok, err = pcall(b.launch, b)
      assert.is_false(ok)
      assert.matches("are sealed under encryption key 'k1', which the keyring does not hold", tostring(err), 1, true)
      assert.matches("e.g. [%w/%-]+", tostring(err))
      -- both keys, k2 primary: new writes use k2, old records still open
      reconfigure(config_text({ k1, k2 }, "k2"))
      b:launch()
      assert.same(creds, bind(b, "r1", "b1", R.one))
      local before = kids(b)
      assert.is_true(before.k1 > 0 and before.k2 > 0)
      local code, out = forge_cli(b, "rotate-key --config " .. b.config_path)
      assert.equal(0, code, out)
      assert.matches("re-sealing every record under key 'k2'", out, 1, true)
      assert.matches("no record is sealed under k1 any more", out, 1, true)
      assert.is_nil(kids(b).k1)
      b:stop()
      reconfigure(config_text({ k2 }, "k2"))
      b:launch()
      assert.same(creds, bind(b, "r1", "b1", R.one))
    end)

    it("resumes after a kill, and keeps the writes made while it runs", function()
      local k1, k2 = write_key(dir, "k1"), write_key(dir, "k2")
      b = Broker.start { config = config_text({ k1 }, "k1") }
      local db = b:store()
      for i = 1, 400 do assert(db:put(string.format("spec/%04d", i), "v1-" .. i)) end
      db:close()
      b:stop()
      reconfigure(config_text({ k1, k2 }, "k2"))
      b:launch()
      local old = kids(b).k1
      -- a slow run (100 records/s), killed once it has saved its cursor
      local env = { PATH = os.getenv("PATH") }
      for k, v in pairs(b.env) do env[k] = v end
      local p = assert(proc.spawn { argv = { shell.FORGE, "rotate-key", "--config", b.config_path, "--rate", "100" },
        env = env, stdout = dir .. "/rotate.out" })
      local job = Broker.wait_for(function()
        local sdb = b:store()
        local j = secrets.job(sdb)
        sdb:close()
        return j and j.cursor ~= "" and j
      end, 20)
      assert.is_table(job, files.read(dir .. "/rotate.out"))
      -- meanwhile, new values for records the run has not reached yet
      db = b:store()
      for i = 301, 400 do assert(db:put(string.format("spec/%04d", i), "v2-" .. i)) end
      db:close()
      proc.kill(p.pid, p.start_time, "KILL")
      proc.wait(p.pid, 10)
      local halfway = kids(b)
      assert.is_true(halfway.k1 > 0 and halfway.k1 < old, "killed half way")
      local code, out = forge_cli(b, "rotate-key --config " .. b.config_path)
      assert.equal(0, code, out)
      assert.matches("resuming the rotation to key 'k2' after ", out, 1, true)
      assert.is_nil(kids(b).k1)
      db = b:store()
      for i = 1, 400 do
        local want = (i > 300 and "v2-" or "v1-") .. i
        assert.equal(want, db:get(string.format("spec/%04d", i)).value)
      end
      local final = secrets.job(db)
      db:close()
      assert.equal("done", final.state)
      assert.equal("k2", final.primary)
    end)
  end)
end)
