-- forge.store: the embedded SQLite backend of the store, run through the shared
-- backend-independent suite (spec/support/store_suite.lua) plus SQLite specifics.
local store = require "forge.store"
local store_suite = require "support.store_suite"

local dir = os.tmpname()
os.remove(dir)
assert(os.execute("mkdir -p '" .. dir .. "'"))
local serial = 0

local function new_path()
  serial = serial + 1
  return string.format("%s/store-%d.db", dir, serial)
end

local function remove_db(path)
  for _, suffix in ipairs({ "", "-wal", "-shm", "-journal" }) do os.remove(path .. suffix) end
end

local function file_exists(path)
  local f = io.open(path, "rb")
  if f then f:close() end
  return f ~= nil
end

-- Run a sqlite3 shell command line (for checks the Lua API cannot make).
local function sqlite3(path, ...)
  local args = { "sqlite3", "'" .. path .. "'" }
  for _, a in ipairs({ ... }) do args[#args + 1] = "'" .. a .. "'" end
  local p = assert(io.popen(table.concat(args, " ") .. " 2>&1"))
  local out = p:read("a")
  p:close()
  return out
end

describe("forge.store", function()
  teardown(function()
    os.execute("rm -rf '" .. dir .. "'")
  end)

  store_suite(function()
    local path = new_path()
    local db = assert(store.open(path))
    return db, {
      reopen = function() return assert(store.open(path)) end,
      child_open = string.format("require('forge.store').open(%q)", path),
      cleanup = function() remove_db(path) end,
    }
  end, "forge.store (SQLite)")

  describe("SQLite specifics", function()
    it("has module info", function()
      assert.equal("forge.store", store._NAME)
      assert.is_string(store._VERSION)
    end)

    it("creates the file in WAL mode, starting at revision 1 like etcd", function()
      local path = new_path()
      local db = assert(store.open(path, { busy_timeout_ms = 100 }))
      assert.is_true(file_exists(path))
      assert.equal(1, db:revision())
      assert.equal(2, db:put("k", "v"))
      assert.matches("forge.store.db", tostring(db), 1, true)
      db:close()
      assert.equal("wal\n", sqlite3(path, "PRAGMA journal_mode"))
      assert.equal("closed", tostring(db):match("%((%a+)%)"))
      remove_db(path)
    end)

    it("returns nil, store.io when the file cannot be opened", function()
      local db, err = store.open(dir .. "/no/such/dir/x.db")
      assert.is_nil(db)
      assert.equal("store.io", err.code)
      assert.matches("no/such/dir", err.message, 1, true)
    end)

    it("rejects bad open arguments", function()
      assert.has_error(function() store.open() end)
      assert.has_error(function() store.open(new_path(), { busy_timeout = 1 }) end)
      assert.has_error(function() store.open(new_path(), { busy_timeout_ms = -1 }) end)
      assert.has_error(function() store.open(new_path(), "fast") end)
    end)

    it("closes through <close> and __gc", function()
      local path = new_path()
      local outer
      do
        local db <close> = assert(store.open(path))
        outer = db
        db:put("k", "v")
      end
      assert.error_matches(function() outer:get("k") end, "store is closed")
      outer = nil -- luacheck: ignore 311
      for _ = 1, 3 do
        assert(store.open(path)) -- dropped: collected by __gc
      end
      collectgarbage()
      collectgarbage()
      local db = assert(store.open(path))
      assert.equal("v", db:get("k").value)
      db:close()
      remove_db(path)
    end)

    it("reports store.busy (retryable) when another process holds the write lock, writing nothing", function()
      local path = new_path()
      local db = assert(store.open(path, { busy_timeout_ms = 100 }))
      local r0 = assert(db:put("k", "before"))
      -- a sqlite3 shell holds a write transaction for 1.5 s; it touches `held` once it has it
      local held = path .. ".held"
      local holder = assert(io.popen(string.format(
        "sqlite3 '%s' 'BEGIN IMMEDIATE;' 'SELECT 1;' '.shell touch %s' '.shell sleep 1.5' 'COMMIT;' 2>&1", path, held)))
      for _ = 1, 1500 do        -- however long the shell takes to start (a loaded machine)
        local f = io.open(held)
        if f then f:close() break end
        os.execute("sleep 0.02")
      end
      os.remove(held)
      local rev, err = db:put("k", "during")
      assert.is_nil(rev)
      assert.equal("store.busy", err.code)
      assert.is_true(err.retryable)
      holder:read("a")
      holder:close()
      assert.equal(r0, db:revision())
      local ok, trev = db:txn { success = { { op = "put", key = "k", value = "after" } } }
      assert.is_true(ok)
      assert.equal(r0 + 1, trev)
      assert.equal("after", db:get("k").value)
      db:close()
      remove_db(path)
    end)

    describe("db:batch (one commit for several txns, as the broker's threads share)", function()
      it("judges each txn on its own compares, in order, each with its own revision", function()
        local path = new_path()
        local db = assert(store.open(path))
        local r0 = assert(db:put("a", "1"))
        local res = assert(db:batch {
          { compare = { { key = "a", mod_revision = r0 } }, success = { { op = "put", key = "a", value = "2" } } },
          { compare = { { key = "a", mod_revision = r0 } }, success = { { op = "put", key = "x", value = "lost" } },
            failure = { { op = "put", key = "a-conflict", value = "seen" } } },
          { compare = { { key = "b", mod_revision = 0 } }, success = { { op = "put", key = "b", value = "new" } } },
          { compare = { { key = "nothing", exists = true } }, success = { { op = "put", key = "y", value = "no" } } },
        })
        assert.same({ { succeeded = true, revision = r0 + 1 }, { succeeded = false, revision = r0 + 2 },
          { succeeded = true, revision = r0 + 3 }, { succeeded = false, revision = r0 + 3 } }, res)
        assert.equal("2", db:get("a").value)
        assert.equal(r0 + 1, db:get("a").mod_revision)
        assert.equal("seen", db:get("a-conflict").value)
        assert.equal(r0 + 3, db:get("b").mod_revision)
        assert.is_nil(db:get("x"))
        assert.is_nil(db:get("y"))
        assert.equal(r0 + 3, db:revision())
        db:close()
        local again = assert(store.open(path))
        assert.equal("new", again:get("b").value, "the batch is on disk")
        again:close()
        remove_db(path)
      end)

      it("fails every txn of a batch whose write fails, writing none of them, with the reason", function()
        local path = new_path()
        local db = assert(store.open(path))
        local r0 = assert(db:put("a", "1"))
        -- a trigger makes SQLite refuse one key (keys are BLOBs: 'boom' is X'626f6f6d')
        local sql = assert(io.open(path .. ".sql", "w"))
        sql:write("CREATE TRIGGER refuse BEFORE INSERT ON kv WHEN NEW.key = X'626f6f6d' ",
          "BEGIN SELECT RAISE(FAIL, 'refused by the spec'); END;\n")
        sql:close()
        assert.equal("", sqlite3(path, ".read " .. path .. ".sql"))
        os.remove(path .. ".sql")
        local res, err = db:batch {
          { success = { { op = "put", key = "a", value = "2" } } },
          { success = { { op = "put", key = "boom", value = "x" } } },
          { success = { { op = "put", key = "c", value = "3" } } },
        }
        assert.is_nil(res)
        assert.equal("store.io", err.code)
        assert.matches("refused by the spec", err.message)
        assert.matches("the 2 writes committed together with it fail too", err.message, 1, true)
        assert.equal("1", db:get("a").value)
        assert.is_nil(db:get("c"))
        assert.equal(r0, db:revision())
        local ok = db:txn { success = { { op = "put", key = "c", value = "3" } } }
        assert.is_true(ok, "the store goes on after a failed batch")
        db:close()
        remove_db(path)
      end)

      it("rejects bad batches", function()
        local db = assert(store.open(new_path()))
        assert.has_error(function() db:batch {} end)
        assert.has_error(function() db:batch { 1 } end)
        assert.has_error(function() db:batch { { success = { { op = "nope" } } } } end)
        assert.has_error(function() db:batch { { succes = {} } } end)
        db:close()
      end)
    end)

    it("stores keys as BLOBs so byte order holds for every key", function()
      local path = new_path()
      local db = assert(store.open(path))
      db:put("b", "1")
      db:put("a", "2")
      db:close()
      assert.equal("blob\nblob\n", sqlite3(path, "SELECT typeof(key) FROM kv ORDER BY key"))
      remove_db(path)
    end)
  end)
end)
