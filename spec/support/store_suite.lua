-- The store contract, shared by every backend (SQLite forge.store, etcd forge.etcd).
--
--   require("support.store_suite")(open_fn, label)
--
-- open_fn() must return a fresh, empty db and optionally a context table:
--   ctx.reopen()      -> a second, independent connection to the same store
--                        (enables the persistence and two-connection cases)
--   ctx.child_open    -> Lua source of an expression that opens the same store in
--                        another OS process (enables the multi-process case)
--   ctx.cleanup()     -> called after each case
-- Only relative revisions are asserted, so a backend may start at any revision.

local unpack = table.unpack

-- busted's functions are not globals of a required module: take them from its API.
local busted = require "busted"
local describe, it, pending = busted.describe, busted.it, busted.pending
local before_each, after_each = busted.before_each, busted.after_each
local assert = busted.assert

local function keys_of(kvs)
  local out = {}
  for i, kv in ipairs(kvs) do out[i] = kv.key end
  return out
end

local function put_all(db, list)
  for _, k in ipairs(list) do assert(db:put(k, "v:" .. k)) end
end

-- Quote s as one word for /bin/sh.
local function shell_quote(s)
  return "'" .. s:gsub("'", "'\\''") .. "'"
end

return function(open_fn, label)
  describe(label, function()
    local db, ctx

    before_each(function()
      db, ctx = open_fn()
      ctx = ctx or {}
      assert.is_not_nil(db)
    end)

    after_each(function()
      if db then db:close() end
      if ctx.cleanup then ctx.cleanup() end
      db, ctx = nil, nil
    end)

    describe("get/put/delete", function()
      it("puts and gets a full record", function()
        local r0 = db:revision()
        local rev = db:put("svc/a", "hello")
        assert.equal(r0 + 1, rev)
        assert.same({ key = "svc/a", value = "hello", create_revision = rev, mod_revision = rev, version = 1 },
          db:get("svc/a"))
      end)

      it("returns a single nil for an absent key", function()
        assert.equal(1, select("#", db:get("nope")))
        assert.is_nil(db:get("nope"))
      end)

      it("counts versions and keeps create_revision across puts", function()
        local r1 = db:put("k", "1")
        local r2 = db:put("k", "2")
        local r3 = db:put("k", "3")
        assert.same({ r1 + 1, r1 + 2 }, { r2, r3 })
        local kv = db:get("k")
        assert.equal("3", kv.value)
        assert.equal(3, kv.version)
        assert.equal(r1, kv.create_revision)
        assert.equal(r3, kv.mod_revision)
      end)

      it("deletes, reporting the count, and a re-created key starts over", function()
        local r1 = db:put("k", "1")
        db:put("k", "2")
        local rev, n = db:delete("k")
        assert.equal(r1 + 2, rev)
        assert.equal(1, n)
        assert.is_nil(db:get("k"))
        local rev2, n2 = db:delete("k")
        assert.equal(rev, rev2)
        assert.equal(0, n2)
        assert.equal(rev, db:revision())
        local r4 = db:put("k", "again")
        local kv = db:get("k")
        assert.equal(1, kv.version)
        assert.equal(r4, kv.create_revision)
      end)

      it("delete removes only the exact key", function()
        put_all(db, { "a", "ab", "a/b" })
        local _, n = db:delete("a")
        assert.equal(1, n)
        assert.same({ "a/b", "ab" }, keys_of((db:range(""))))
      end)

      it("stores binary values byte for byte", function()
        local bytes = {}
        for i = 0, 255 do bytes[#bytes + 1] = string.char(i) end
        local all = table.concat(bytes)
        assert(db:put("bin", all))
        assert.equal(all, db:get("bin").value)
        assert(db:put("nul", "a\0b\0"))
        assert.equal("a\0b\0", db:get("nul").value)
        assert(db:put("empty", ""))
        assert.equal("", db:get("empty").value)
        assert(db:put("hi\255\254\1", "x"))
        assert.equal("x", db:get("hi\255\254\1").value)
      end)

      it("accepts a 1024-byte key and an 8 MiB value", function()
        local k = string.rep("k", 1024)
        local v = string.rep("\0\255", 4 * 1024 * 1024)
        assert(db:put(k, v))
        local kv = db:get(k)
        assert.equal(#v, #kv.value)
        assert.is_true(kv.value == v)
      end)
    end)

    describe("range", function()
      local all = { "b", "a", "a/", "a/b", "ab", "a\255", "a\255\255", "a\255x", "\255", "\255\255x", "\1", "app",
        "apple", "application" }

      before_each(function() put_all(db, all) end)

      it("returns everything sorted by bytes for the empty prefix, with the revision", function()
        local kvs, rev = db:range("")
        assert.same({ "\1", "a", "a/", "a/b", "ab", "app", "apple", "application", "a\255", "a\255x", "a\255\255",
          "b", "\255", "\255\255x" }, keys_of(kvs))
        assert.equal(db:revision(), rev)
        assert.equal("v:a/b", kvs[4].value)
        assert.equal(1, kvs[4].version)
      end)

      it("matches prefixes byte-exactly", function()
        assert.same({ "a", "a/", "a/b", "ab", "app", "apple", "application", "a\255", "a\255x", "a\255\255" },
          keys_of((db:range("a"))))
        assert.same({ "a/", "a/b" }, keys_of((db:range("a/"))))
        assert.same({ "app", "apple", "application" }, keys_of((db:range("app"))))
        assert.same({ "apple", "application" }, keys_of((db:range("appl"))))
        assert.same({ "apple" }, keys_of((db:range("apple"))))
        assert.same({}, keys_of((db:range("applf"))))
        assert.same({}, keys_of((db:range("c"))))
      end)

      it("handles 0xFF bytes in the prefix", function()
        assert.same({ "a\255", "a\255x", "a\255\255" }, keys_of((db:range("a\255"))))
        assert.same({ "a\255\255" }, keys_of((db:range("a\255\255"))))
        assert.same({ "\255", "\255\255x" }, keys_of((db:range("\255"))))
        assert.same({ "\255\255x" }, keys_of((db:range("\255\255"))))
        assert.same({}, keys_of((db:range("\255\255\255"))))
      end)

      it("honours limit", function()
        assert.same({ "a", "a/" }, keys_of((db:range("a", { limit = 2 }))))
        assert.equal(#all, #db:range("", { limit = 0 }))
        assert.equal(#all, #db:range("", { limit = 1000 }))
        assert.same({ "\1" }, keys_of((db:range("", { limit = 1 }))))
      end)

      it("starts at `from`, so a long range reads page by page", function()
        assert.same({ "apple", "application", "a\255" }, keys_of((db:range("a", { from = "apple", limit = 3 }))))
        assert.same({ "application", "a\255", "a\255x", "a\255\255" }, keys_of((db:range("a", { from = "apple\1" }))))
        assert.same({ "b", "\255", "\255\255x" }, keys_of((db:range("", { from = "b" }))))
        assert.same({ "a\255\255" }, keys_of((db:range("a\255", { from = "a\255y" }))))
        local pages, from = {}, nil
        repeat
          local page = db:range("a", { limit = 4, from = from })
          for _, kv in ipairs(page) do pages[#pages + 1] = kv.key end
          from = page[#page] and page[#page].key .. "\1"
        until #page < 4
        assert.same(keys_of((db:range("a"))), pages)
        assert.has_error(function() db:range("a", { from = "b" }) end)
        assert.has_error(function() db:range("a", { from = 1 }) end)
      end)
    end)

    describe("revisions", function()
      it("bump once per write and never on reads or no-ops", function()
        local r0 = db:revision()
        db:get("x")
        db:range("")
        assert.equal(r0, db:revision())
        db:put("x", "1")
        assert.equal(r0 + 1, db:revision())
        db:delete("missing")
        assert.equal(r0 + 1, db:revision())
        assert.is_nil(db:put("x", "2", { prev_revision = 999999 }))
        assert.equal(r0 + 1, db:revision())
        local ok, rev = db:txn { success = { { op = "delete", key = "missing" } } }
        assert.is_true(ok)
        assert.equal(r0 + 1, rev)
        assert.equal(r0 + 1, db:revision())
      end)

      it("give every key of one txn the same new mod_revision", function()
        local r0 = db:revision()
        local ok, rev = db:txn { success = {
          { op = "put", key = "t/1", value = "a" },
          { op = "put", key = "t/2", value = "b" },
          { op = "put", key = "t/3", value = "c" },
        } }
        assert.is_true(ok)
        assert.equal(r0 + 1, rev)
        for _, kv in ipairs((db:range("t/"))) do
          assert.equal(rev, kv.mod_revision)
          assert.equal(rev, kv.create_revision)
        end
      end)
    end)

    describe("compare-and-swap", function()
      it("put with prev_revision=0 creates only if absent", function()
        local rev = db:put("lock", "me", { prev_revision = 0 })
        assert.is_number(rev)
        local nothing, err = db:put("lock", "you", { prev_revision = 0 })
        assert.is_nil(nothing)
        assert.equal("store.conflict", err.code)
        assert.is_false(err.retryable)
        assert.matches("lock", err.message, 1, true)
        assert.matches(tostring(rev), err.message, 1, true)
        assert.matches("store.conflict", tostring(err), 1, true)
        assert.equal("me", db:get("lock").value)
      end)

      it("put with the current mod_revision succeeds, a stale one conflicts", function()
        local r1 = db:put("c", "1")
        local r2 = assert(db:put("c", "2", { prev_revision = r1 }))
        local nothing, err = db:put("c", "3", { prev_revision = r1 })
        assert.is_nil(nothing)
        assert.equal("store.conflict", err.code)
        assert.matches(tostring(r1), err.message, 1, true)
        assert.matches(tostring(r2), err.message, 1, true)
        assert.equal("2", db:get("c").value)
        assert.equal(r2, db:revision())
      end)

      it("put with a non-zero prev_revision on an absent key conflicts", function()
        local _, err = db:put("ghost", "x", { prev_revision = 1 })
        assert.equal("store.conflict", err.code)
        assert.is_nil(db:get("ghost"))
      end)

      it("delete with prev_revision", function()
        local r1 = db:put("d", "1")
        db:put("d", "2")
        local nothing, err = db:delete("d", { prev_revision = r1 })
        assert.is_nil(nothing)
        assert.equal("store.conflict", err.code)
        assert.is_not_nil(db:get("d"))
        local _, err0 = db:delete("d", { prev_revision = 0 })
        assert.equal("store.conflict", err0.code)
        local rev, n = db:delete("d", { prev_revision = db:get("d").mod_revision })
        assert.equal(1, n)
        assert.equal(db:revision(), rev)
        assert.is_nil(db:get("d"))
        local rev2, n2 = db:delete("d", { prev_revision = 0 })
        assert.equal(rev, rev2)
        assert.equal(0, n2)
      end)
    end)

    describe("txn", function()
      local r1
      before_each(function()
        r1 = db:put("x", "one")
      end)

      local function run(compare)
        return db:txn {
          compare = compare,
          success = { { op = "put", key = "result", value = "success" } },
          failure = { { op = "put", key = "result", value = "failure" } },
        }
      end

      local cases = {
        { "mod_revision equal", function() return { { key = "x", mod_revision = r1 } } end, true },
        { "mod_revision different", function() return { { key = "x", mod_revision = r1 + 1 } } end, false },
        { "mod_revision 0 on absent", function() return { { key = "y", mod_revision = 0 } } end, true },
        { "mod_revision 0 on present", function() return { { key = "x", mod_revision = 0 } } end, false },
        { "exists=true on present", function() return { { key = "x", exists = true } } end, true },
        { "exists=true on absent", function() return { { key = "y", exists = true } } end, false },
        { "exists=false on absent", function() return { { key = "y", exists = false } } end, true },
        { "exists=false on present", function() return { { key = "x", exists = false } } end, false },
        { "value equal", function() return { { key = "x", value = "one" } } end, true },
        { "value different", function() return { { key = "x", value = "two" } } end, false },
        { "value prefix only", function() return { { key = "x", value = "on" } } end, false },
        { "value on absent", function() return { { key = "y", value = "" } } end, false },
        { "all compares hold", function()
          return { { key = "x", exists = true }, { key = "y", exists = false }, { key = "x", value = "one" } }
        end, true },
        { "one of several fails", function()
          return { { key = "x", exists = true }, { key = "y", exists = true }, { key = "x", value = "one" } }
        end, false },
        { "no compares", function() return {} end, true },
      }
      for _, case in ipairs(cases) do
        local name, compare, expect = unpack(case)
        it(name .. " -> " .. (expect and "success" or "failure"), function()
          local ok, rev = run(compare())
          assert.equal(expect, ok)
          assert.equal(r1 + 1, rev)
          assert.equal(expect and "success" or "failure", db:get("result").value)
          assert.equal(rev, db:get("result").mod_revision)
        end)
      end

      it("applies put, delete and delete_prefix together", function()
        put_all(db, { "p/1", "p/2", "p/3/x", "q", "p" })
        local r0 = db:revision()
        local ok, rev = db:txn {
          compare = { { key = "x", value = "one" } },
          success = {
            { op = "delete_prefix", prefix = "p/" },
            { op = "delete", key = "q" },
            { op = "put", key = "new", value = "n" },
          },
        }
        assert.is_true(ok)
        assert.equal(r0 + 1, rev)
        assert.same({ "new", "p", "x" }, keys_of((db:range(""))))
      end)

      it("delete_prefix respects 0xFF bytes and the empty prefix", function()
        put_all(db, { "a\255", "a\255\255", "b", "\255", "\255\255" })
        assert.is_true((db:txn { success = { { op = "delete_prefix", prefix = "a\255" } } }))
        assert.same({ "b", "x", "\255", "\255\255" }, keys_of((db:range(""))))
        assert.is_true((db:txn { success = { { op = "delete_prefix", prefix = "\255" } } }))
        assert.same({ "b", "x" }, keys_of((db:range(""))))
        local r0 = db:revision()
        local ok, rev = db:txn { success = { { op = "delete_prefix", prefix = "" } } }
        assert.is_true(ok)
        assert.equal(r0 + 1, rev)
        assert.same({}, db:range(""))
      end)

      it("a failed compare writes nothing of the success branch", function()
        local r0 = db:revision()
        local ok, rev = db:txn {
          compare = { { key = "x", value = "nope" } },
          success = {
            { op = "put", key = "s1", value = "1" },
            { op = "delete", key = "x" },
            { op = "put", key = "s2", value = "2" },
          },
        }
        assert.is_false(ok)
        assert.equal(r0, rev)
        assert.equal(r0, db:revision())
        assert.is_nil(db:get("s1"))
        assert.is_nil(db:get("s2"))
        assert.equal("one", db:get("x").value)
      end)

      it("a txn rejected half-way through validation writes nothing", function()
        local r0 = db:revision()
        assert.has_error(function()
          db:txn { success = {
            { op = "put", key = "first", value = "1" },
            { op = "delete", key = "x" },
            { op = "frobnicate", key = "x" },
          } }
        end)
        assert.has_error(function()
          db:txn { success = {
            { op = "put", key = "first", value = "1" },
            { op = "put", key = "second", value = string.rep("v", 8 * 1024 * 1024 + 1) },
          } }
        end)
        assert.equal(r0, db:revision())
        assert.is_nil(db:get("first"))
        assert.equal("one", db:get("x").value)
      end)

      it("an empty txn succeeds without writing", function()
        local r0 = db:revision()
        local ok, rev = db:txn {}
        assert.is_true(ok)
        assert.equal(r0, rev)
      end)

      it("CAS through txn: only the holder of the current revision wins", function()
        local kv = db:get("x")
        local ok1 = db:txn { compare = { { key = "x", mod_revision = kv.mod_revision } },
          success = { { op = "put", key = "x", value = "A" } } }
        local ok2 = db:txn { compare = { { key = "x", mod_revision = kv.mod_revision } },
          success = { { op = "put", key = "x", value = "B" } } }
        assert.is_true(ok1)
        assert.is_false(ok2)
        assert.equal("A", db:get("x").value)
        assert.equal(2, db:get("x").version)
      end)
    end)

    describe("misuse raises", function()
      it("on bad keys", function()
        for _, bad in ipairs({ 1, true, {}, "", "a\0b", string.rep("k", 1025) }) do
          assert.has_error(function() db:get(bad) end)
          assert.has_error(function() db:put(bad, "v") end)
          assert.has_error(function() db:delete(bad) end)
        end
        assert.has_error(function() db:get() end)
        assert.has_error(function() db:range(nil) end)
        assert.has_error(function() db:range(string.rep("p", 1025)) end)
        assert.error_matches(function() db:get("a\0b") end, "NUL")
        assert.error_matches(function() db:get(string.rep("k", 1025)) end, "1024")
      end)

      it("on bad values and options", function()
        assert.has_error(function() db:put("k") end)
        assert.has_error(function() db:put("k", 42) end)
        assert.has_error(function() db:put("k", string.rep("v", 8 * 1024 * 1024 + 1)) end)
        assert.has_error(function() db:put("k", "v", { prev_revison = 1 }) end)
        assert.has_error(function() db:put("k", "v", { prev_revision = -1 }) end)
        assert.has_error(function() db:put("k", "v", { prev_revision = 1.5 }) end)
        assert.has_error(function() db:delete("k", { prev = 1 }) end)
        assert.has_error(function() db:range("", { limit = -1 }) end)
        assert.has_error(function() db:range("", { max = 1 }) end)
        assert.is_nil(db:get("k"))
      end)

      it("on malformed txns", function()
        local bad = {
          "not a table",
          { compare = "x" },
          { whatever = {} },
          { success = { { op = "frobnicate", key = "k" } } },
          { success = { { key = "k", value = "v" } } },
          { success = { { op = "put", key = "k" } } },
          { success = { { op = "put", key = "k", value = 1 } } },
          { success = { { op = "put", key = "k\0", value = "v" } } },
          { success = { { op = "delete", prefix = "k" } } },
          { success = { { op = "delete_prefix", key = "k" } } },
          { success = { "put" } },
          { success = { [2] = { op = "delete", key = "k" } } },
          { compare = { { key = "k" } } },
          { compare = { { key = "k", exists = true, value = "v" } } },
          { compare = { { key = "k", exists = "yes" } } },
          { compare = { { key = "k", mod_revision = -1 } } },
          { compare = { { key = "k", version = 1 } } },
          { compare = { { mod_revision = 0 } } },
          { failure = { { op = "put", key = "k", value = "1" }, { op = "put", key = "k", value = "2" } } },
          { success = { { op = "put", key = "k/1", value = "1" }, { op = "delete_prefix", prefix = "k/" } } },
        }
        for i, t in ipairs(bad) do
          assert.has_error(function() db:txn(t) end, nil, "case " .. i)
        end
        assert.error_matches(function() db:txn { success = { { op = "frobnicate", key = "k" } } } end,
          "unknown op")
        assert.same({}, db:range(""))
      end)
    end)

    describe("a closed db", function()
      it("raises 'store is closed' and closes idempotently", function()
        db:close()
        for _, call in ipairs({
          function() return db:get("k") end,
          function() return db:put("k", "v") end,
          function() return db:delete("k") end,
          function() return db:range("") end,
          function() return db:txn {} end,
          function() return db:revision() end,
        }) do
          assert.error_matches(call, "store is closed")
        end
        db:close()
      end)
    end)

    describe("two connections", function()
      it("persist across close and reopen", function()
        if not ctx.reopen then return pending("backend cannot reopen") end
        local rev = db:put("keep", "me")
        db:put("other", "x")
        db:delete("other")
        local r_end = db:revision()
        db:close()
        db = ctx.reopen()
        assert.same({ key = "keep", value = "me", create_revision = rev, mod_revision = rev, version = 1 },
          db:get("keep"))
        assert.is_nil(db:get("other"))
        assert.equal(r_end, db:revision())
      end)

      it("see each other's writes and race CAS with one winner", function()
        if not ctx.reopen then return pending("backend cannot reopen") end
        local db2 = ctx.reopen()
        local r = db:put("shared", "0")
        assert.equal("0", db2:get("shared").value)
        assert.equal(r, db2:revision())
        -- both read the same revision, both try to swap
        local a, b = db:get("shared"), db2:get("shared")
        assert(db:put("shared", "from1", { prev_revision = a.mod_revision }))
        local nothing, err = db2:put("shared", "from2", { prev_revision = b.mod_revision })
        assert.is_nil(nothing)
        assert.equal("store.conflict", err.code)
        local ok = db2:txn { compare = { { key = "shared", mod_revision = b.mod_revision } },
          success = { { op = "put", key = "shared", value = "from2" } } }
        assert.is_false(ok)
        assert.equal("from1", db2:get("shared").value)
        db2:close()
      end)

      it("interleave CAS increments without losing one", function()
        if not ctx.reopen then return pending("backend cannot reopen") end
        local db2 = ctx.reopen()
        local conns, conflicts = { db, db2 }, 0
        local pending_reads = {}
        -- each connection reads, then the other writes in between, then it tries
        for round = 1, 100 do
          for i, c in ipairs(conns) do pending_reads[i] = c:get("n") end
          for i, c in ipairs(conns) do
            local kv = pending_reads[i]
            local cur = kv and tonumber(kv.value) or 0
            local rev = c:put("n", tostring(cur + 1), { prev_revision = kv and kv.mod_revision or 0 })
            if not rev then conflicts = conflicts + 1 end
          end
          assert.equal(round, tonumber(db:get("n").value))
        end
        assert.equal(100, conflicts)
        assert.equal(100, db2:get("n").version)
        db2:close()
      end)
    end)

    describe("several processes", function()
      it("do 200 CAS increments each on one key without a lost update", function()
        if not ctx.child_open then return pending("backend cannot be opened from a child process") end
        local children, per_child = 4, 200
        local r0 = db:revision()
        local code = string.format([[
          package.cpath = %q
          local db = assert(%s)
          local done, conflicts, busy = 0, 0, 0
          while done < %d do
            local kv, gerr = db:get("counter")
            if gerr then error(tostring(gerr)) end
            local cur = kv and tonumber(kv.value) or 0
            local rev, err = db:put("counter", tostring(cur + 1), { prev_revision = kv and kv.mod_revision or 0 })
            if rev then done = done + 1
            elseif err.code == "store.conflict" then conflicts = conflicts + 1
            elseif err.retryable then busy = busy + 1
            else error(tostring(err)) end
          end
          db:close()
          io.write("done ", done, " conflicts ", conflicts, " busy ", busy, "\n")
        ]], package.cpath, ctx.child_open, per_child)
        local procs = {}
        for i = 1, children do
          procs[i] = assert(io.popen("lua5.4 -e " .. shell_quote(code) .. " 2>&1", "r"))
        end
        for i = 1, children do
          local out = procs[i]:read("a")
          local ok = procs[i]:close()
          assert.is_true(ok, out)
          assert.matches("^done " .. per_child .. " ", out)
        end
        local kv = db:get("counter")
        assert.equal(children * per_child, tonumber(kv.value))
        assert.equal(children * per_child, kv.version)
        assert.equal(r0 + children * per_child, db:revision())
      end)
    end)
  end)
end
