-- forge.etcd: the etcd v3 backend of the store, run through the shared backend-independent
-- suite (spec/support/store_suite.lua) against a real etcd, plus etcd specifics: failover,
-- an etcd that stops and comes back, leases, watch, TLS and auth, and hostile answers.
local etcd = require "forge.etcd"
local proc = require "forge.proc"
local etcd_server = require "support.etcd"
local store_suite = require "support.store_suite"

local function elapsed_since(t0) return proc.monotonic() - t0 end

-- wait until pred() or the deadline; returns pred's last value
local function eventually(pred, timeout)
  local deadline = proc.monotonic() + (timeout or 5)
  repeat
    local v = pred()
    if v then return v end
    proc.sleep(0.05)
  until proc.monotonic() > deadline
  return pred()
end

local function keys_of(list)
  local out = {}
  for i, kv in ipairs(list) do out[i] = kv.key end
  return out
end

describe("forge.etcd", function()
  local srv
  local serial = 0

  -- A fresh namespace per case: cases share one etcd but never see each other's keys.
  local function new_prefix()
    serial = serial + 1
    return string.format("spec/%d/%d/", proc.getpid(), serial)
  end

  local function open(opts)
    opts = opts or {}
    opts.endpoints = opts.endpoints or { srv.url }
    return assert(etcd.open(opts))
  end

  setup(function()
    srv = etcd_server.start { fast = true }
  end)

  teardown(function()
    if srv then srv:cleanup() end
  end)

  it("has module info", function()
    assert.equal("forge.etcd", etcd._NAME)
    assert.is_string(etcd._VERSION)
  end)

  store_suite(function()
    local prefix = new_prefix()
    local opts = { endpoints = { srv.url }, prefix = prefix }
    local db = assert(etcd.open(opts))
    return db, {
      reopen = function() return assert(etcd.open(opts)) end,
      child_open = etcd_server.open_source(srv, prefix),
    }
  end, "forge.etcd (etcd v3 gateway)")

  describe("namespaces", function()
    it("keep prefixes apart and strip theirs from every key", function()
      local a = open { prefix = new_prefix() }
      local b = open { prefix = new_prefix() }
      local whole = open {}
      a:put("k", "from a")
      b:put("k", "from b")
      assert.equal("from a", a:get("k").value)
      assert.same({ "k" }, keys_of((a:range(""))))
      assert.is_true((a:txn { success = { { op = "delete_prefix", prefix = "" } } }))
      assert.is_nil(a:get("k"))
      assert.equal("from b", b:get("k").value)
      -- without a prefix the raw keys are visible
      local raw = whole:range("spec/")
      local found = false
      for _, kv in ipairs(raw) do
        if kv.value == "from b" then found = kv.key:match("/k$") ~= nil end
      end
      assert.is_true(found)
      a:close(); b:close(); whole:close()
    end)
  end)

  describe("endpoints", function()
    it("fail over from a dead endpoint and remember the live one", function()
      local dead = "http://127.0.0.1:" .. etcd_server.free_port()
      local db = open { endpoints = { dead, srv.url }, prefix = new_prefix(), timeout_ms = 2000 }
      assert.matches(srv.url, tostring(db), 1, true)
      local rev = assert(db:put("k", "v"))
      assert.equal(rev, db:get("k").mod_revision)
      assert.matches(srv.url, tostring(db), 1, true)
      db:close()
      assert.equal("forge.etcd.db (closed)", tostring(db))
    end)

    it("skip an endpoint marked down: one dead first in the list costs the first call only", function()
      local dead = "http://127.0.0.1:" .. etcd_server.free_port()
      local db = open { endpoints = { dead, srv.url }, prefix = new_prefix(), timeout_ms = 2000 }
      local eps = db:endpoints()
      assert.same({ dead, false, false, 1, 1, 1 },
        { eps[1].url, eps[1].up, eps[1].current, eps[1].attempts, eps[1].failures, eps[1].fails_in_a_row })
      assert.matches(dead .. ": .*connect", eps[1].last_error)
      assert.is_true(eps[2].up and eps[2].current)
      for i = 1, 30 do
        assert(db:put("k", tostring(i)))
        assert.equal(tostring(i), db:get("k").value)
      end
      assert.equal(1, db:endpoints()[1].attempts)           -- not tried again within the backoff
      -- once the backoff is over, one read probes it (and it stays down, with a longer backoff)
      proc.sleep(0.55)
      assert(db:put("k", "w"))                               -- writes do not probe
      assert.equal(1, db:endpoints()[1].attempts)
      assert.equal("w", db:get("k").value)
      eps = db:endpoints()
      assert.same({ 2, 2, false }, { eps[1].attempts, eps[1].fails_in_a_row, eps[1].up })
      assert.is_true(eps[1].retry_in_ms > 500 and eps[1].retry_in_ms <= 1000)
      assert.is_true(eps[1].down_ms >= 500)
      assert.equal(1, #(db:range("")))
      assert.equal(2, db:endpoints()[1].attempts)           -- the next probe is 1 s away
      db:close()
    end)

    it("skip an endpoint where connecting hangs: a connect timeout for the first call, not for each", function()
      local hang = etcd_server.hanging_port()
      local ok, err = pcall(function()
        local t0 = proc.monotonic()
        local db = open { endpoints = { hang.url, srv.url }, prefix = new_prefix(), timeout_ms = 2000 }
        local first = elapsed_since(t0)
        assert.is_true(first >= 0.9 and first < 1.5, "open took " .. first)   -- half the budget to connect
        assert.matches("Timeout", db:endpoints()[1].last_error)
        -- 1.6 s of calls: past the 0.5 s backoff once, so one read probes the endpoint again
        local worst, total, slow, calls = 0, 0, 0, 0
        local t_end = proc.monotonic() + 1.6
        while proc.monotonic() < t_end do
          calls = calls + 1
          local t = proc.monotonic()
          if calls % 3 == 0 then
            assert(db:txn { success = { { op = "put", key = "t", value = tostring(calls) } } })
          elseif calls % 3 == 1 then
            assert(db:put("k", tostring(calls)))
          else
            assert.equal(tostring(calls - 1), db:get("k").value)
          end
          local took = elapsed_since(t)
          worst, total = math.max(worst, took), total + took
          if took > 0.1 then slow = slow + 1 end
        end
        -- a probe costs at most its own 200 ms limit, once per backoff; no other call waits
        local probes = db:endpoints()[1].attempts - 1
        print(string.format("\n  hanging first endpoint: open %.0f ms, then %d calls in %.0f ms " ..
          "(worst %.1f ms, %d probe(s), %d call(s) over 100 ms)", first * 1e3, calls, total * 1e3, worst * 1e3,
          probes, slow))
        assert.equal(1, probes)
        assert.is_true(slow <= probes)
        assert.is_true(worst < 0.2 + 0.1, "worst call " .. worst)
        assert.is_true(calls > 100, calls .. " calls")
        assert.is_false(db:endpoints()[1].up)
        db:close()
      end)
      hang:stop()
      assert(ok, err)
    end)

    it("report etcd.unavailable (retryable) when no endpoint answers", function()
      local dead1 = "http://127.0.0.1:" .. etcd_server.free_port()
      local dead2 = "http://127.0.0.1:" .. etcd_server.free_port()
      local t0 = proc.monotonic()
      local db, err = etcd.open { endpoints = { dead1, dead2 }, timeout_ms = 500 }
      assert.is_nil(db)
      assert.equal("etcd.unavailable", err.code)
      assert.is_true(err.retryable)
      assert.matches(dead2, err.message, 1, true)
      assert.is_true(elapsed_since(t0) < 1)
    end)
  end)

  describe("an etcd that stops and comes back", function()
    it("fails fast with etcd.unavailable, writes nothing, and the same db recovers", function()
      local db = open { prefix = new_prefix(), timeout_ms = 1500 }
      local r1 = assert(db:put("before", "1"))
      srv:stop()
      local calls = {
        function() return db:put("during", "x") end,
        function() return db:put("before", "2", { prev_revision = r1 }) end,
        function() return db:delete("before") end,
        function()
          return db:txn { compare = { { key = "before", exists = true } },
            success = { { op = "put", key = "t1", value = "1" }, { op = "put", key = "t2", value = "2" },
              { op = "delete", key = "before" } } }
        end,
        function() return db:get("before") end,
        function() return db:range("") end,
        function() return db:revision() end,
        function() return db:lease_grant(5) end,
        function() return db:watch("", 0, 300) end,
      }
      for i, call in ipairs(calls) do
        local t0 = proc.monotonic()
        local res, err = call()
        assert.is_nil(res, "call " .. i)
        assert.equal("etcd.unavailable", err.code, "call " .. i)
        assert.is_true(err.retryable)
        assert.is_true(elapsed_since(t0) < 1.5 + 0.5, "call " .. i .. " took too long")
        assert.matches("etcd.unavailable", tostring(err), 1, true)
      end
      srv:start()
      assert.equal("1", db:get("before").value)
      assert.equal(r1, db:revision())          -- nothing was written while it was down
      assert.is_nil(db:get("during"))
      assert.is_nil(db:get("t1"))
      assert.equal(r1 + 1, db:put("after", "ok"))
      db:close()
    end)
  end)

  describe("an etcd that hangs", function()
    it("times out within timeout_ms: reads are etcd.unavailable, writes say their outcome is unknown", function()
      local db = open { prefix = new_prefix(), timeout_ms = 400 }
      local r1 = assert(db:put("k", "1"))
      assert(proc.kill(srv.pid, srv.start_time, "STOP"))
      local ok, err = pcall(function()
        local t0 = proc.monotonic()
        local nothing, gerr = db:get("k")
        assert.is_nil(nothing)
        assert.equal("etcd.unavailable", gerr.code)
        assert.is_true(gerr.retryable)
        assert.is_true(elapsed_since(t0) < 0.4 + 0.4)
        t0 = proc.monotonic()
        local nothing2, perr = db:put("k", "2", { prev_revision = r1 })
        assert.is_nil(nothing2)
        assert.equal("etcd.unavailable", perr.code)
        assert.matches("may or may not have been applied", perr.message)
        assert.is_true(elapsed_since(t0) < 0.4 + 0.4)
      end)
      assert(proc.kill(srv.pid, srv.start_time, "CONT"))
      assert(ok, err)
      -- the CAS that timed out was applied after all once etcd resumed, or not: either way once
      local kv = eventually(function() return db:get("k") end, 3)
      assert.is_true(kv.value == "1" or (kv.value == "2" and kv.version == 2))
      db:close()
    end)
  end)

  describe("leases", function()
    it("grant, keep alive, attach keys and revoke", function()
      local db = open { prefix = new_prefix() }
      local id, ttl = assert(db:lease_grant(30))
      assert.is_true(math.type(id) == "integer" and id > 0)
      assert.is_true(ttl >= 30)
      assert.is_true(db:lease_keepalive(id) >= 29)
      local rev = assert(db:put("owned", "me", { lease = id }))
      assert.equal(id, db:get("owned").lease)
      assert.is_true((db:txn { success = { { op = "put", key = "owned2", value = "x", lease = id } } }))
      db:put("plain", "no lease")
      assert.is_nil(db:get("plain").lease)
      local rrev = assert(db:lease_revoke(id))
      assert.is_true(rrev > rev)
      assert.is_nil(db:get("owned"))
      assert.is_nil(db:get("owned2"))
      assert.equal("no lease", db:get("plain").value)
      local nothing, err = db:lease_keepalive(id)
      assert.is_nil(nothing)
      assert.equal("etcd.lease_not_found", err.code)
      assert.is_false(err.retryable)
      local _, err2 = db:lease_revoke(id)
      assert.equal("etcd.lease_not_found", err2.code)
      assert.equal(404, err2.status)
      local _, err3 = db:put("k", "v", { lease = 123456789 })
      assert.equal("etcd.lease_not_found", err3.code)
      db:close()
    end)

    it("expire, taking their keys with them", function()
      local db = open { prefix = new_prefix() }
      local id, ttl = assert(db:lease_grant(1))
      assert.is_true(ttl >= 1 and ttl <= 2)
      assert(db:put("ephemeral", "x", { lease = id }))
      assert(db:put("lock", "me", { prev_revision = 0, lease = id }))
      assert.is_truthy(eventually(function() return db:get("ephemeral") == nil end, 6))
      assert.is_nil(db:get("lock"))
      local _, err = db:lease_keepalive(id)
      assert.equal("etcd.lease_not_found", err.code)
      db:close()
    end)
  end)

  describe("watch", function()
    it("reports puts and deletes from a start revision, with values and revisions", function()
      local prefix = new_prefix()
      local db = open { prefix = prefix }
      local other = open { prefix = prefix }
      local start = db:revision() + 1
      local r1 = other:put("w/a", "1")
      local r2 = other:put("w/b", "2")
      local r3 = other:delete("w/a")
      other:put("elsewhere", "not watched")
      local events, rev = assert(db:watch("w/", start, 2000))
      assert.same({
        { type = "put", key = "w/a", value = "1", mod_revision = r1 },
        { type = "put", key = "w/b", value = "2", mod_revision = r2 },
        { type = "delete", key = "w/a", value = "", mod_revision = r3 },
      }, events)
      assert.is_true(rev >= r3)
      db:close(); other:close()
    end)

    it("waits for live events, and returns none when the time runs out", function()
      local prefix = new_prefix()
      local db = open { prefix = prefix }
      local t0 = proc.monotonic()
      local events, rev = db:watch("", 0, 300)
      assert.same({}, events)
      assert.is_true(rev > 0)
      local took = elapsed_since(t0)
      assert.is_true(took >= 0.25 and took < 1, "took " .. took)
      -- a child process writes after 0.3 s while we are watching
      local code = string.format([[
        package.cpath = %q
        require("forge.proc").sleep(0.3)
        local db = assert(%s)
        assert(db:put("live", "hello"))
      ]], package.cpath, etcd_server.open_source(srv, prefix))
      local child = assert(io.popen("lua5.4 -e '" .. code:gsub("'", "'\\''") .. "' 2>&1", "r"))
      t0 = proc.monotonic()
      local live = assert(db:watch("", 0, 5000))
      local out = child:read("a")
      assert.is_true(child:close(), out)
      assert.equal(1, #live)
      assert.same({ "put", "live", "hello" }, { live[1].type, live[1].key, live[1].value })
      assert.is_true(elapsed_since(t0) < 3)
      db:close()
    end)

    it("reports a compacted start revision as etcd.compacted", function()
      local db = open { prefix = new_prefix() }
      local r1 = db:put("c", "1")
      local r2 = db:put("c", "2")
      srv:etcdctl("compact", tostring(r2))
      local nothing, err = db:watch("", r1, 2000)
      assert.is_nil(nothing)
      assert.equal("etcd.compacted", err.code)
      assert.equal(r2, err.compact_revision)
      local events = assert(db:watch("", r2, 2000))
      assert.equal("2", events[1].value)
      db:close()
    end)
  end)

  describe("misuse raises", function()
    it("on bad open options", function()
      local url = srv.url
      local many = {}
      for i = 1, 17 do many[i] = url end
      for i, opts in ipairs({
        {},
        { endpoints = url },
        { endpoints = {} },
        { endpoints = { 42 } },
        { endpoints = { "ftp://127.0.0.1:1" } },
        { endpoints = { "http://" } },
        { endpoints = { "http://127.0.0.1:1 /x" } },
        { endpoints = { [2] = url } },
        { endpoints = many },
        { endpoints = { url }, prefix = 1 },
        { endpoints = { url }, prefix = "a\0b" },
        { endpoints = { url }, prefix = string.rep("p", 1025) },
        { endpoints = { url }, timeout_ms = 0 },
        { endpoints = { url }, timeout_ms = 1.5 },
        { endpoints = { url }, timeout = 100 },
        { endpoints = { url }, username = "u" },
        { endpoints = { url }, password = "p" },
        { endpoints = { url }, username = "", password = "p" },
        { endpoints = { url }, key = "/k.pem" },
        { endpoints = { url }, cacert = "a\0b" },
      }) do
        assert.has_error(function() etcd.open(opts) end, nil, "case " .. i)
      end
      assert.has_error(function() etcd.open() end)
      assert.has_error(function() etcd.open(url) end)
      assert.error_matches(function() etcd.open { endpoints = { url }, frobnicate = 1 } end, "unknown option")
    end)

    it("on bad lease, watch and put options", function()
      local db = open { prefix = new_prefix() }
      for _, bad in ipairs({ 0, -1, 1.5, "10", nil }) do
        assert.has_error(function() db:lease_grant(bad) end)
      end
      assert.has_error(function() db:lease_grant(9000000001) end)
      for _, bad in ipairs({ 0, -5, 1.5, "7", {} }) do
        assert.has_error(function() db:lease_keepalive(bad) end)
        assert.has_error(function() db:lease_revoke(bad) end)
        assert.has_error(function() db:put("k", "v", { lease = bad }) end)
        assert.has_error(function() db:txn { success = { { op = "put", key = "k", value = "v", lease = bad } } } end)
      end
      assert.has_error(function() db:delete("k", { lease = 5 }) end)
      assert.has_error(function() db:txn { success = { { op = "delete", key = "k", lease = 5 } } } end)
      assert.has_error(function() db:watch(nil) end)
      assert.has_error(function() db:watch("a\0") end)
      assert.has_error(function() db:watch(string.rep("w", 1025)) end)
      assert.has_error(function() db:watch("", -1) end)
      assert.has_error(function() db:watch("", 0, 0) end)
      assert.has_error(function() db:watch("", 0, 3600001) end)
      assert.has_error(function() db:txn { compare = { { key = "k", value = string.rep("v", 8 * 1024 * 1024 + 1) } } } end)
      assert.same({}, db:range(""))
      db:close()
      for _, call in ipairs({
        function() return db:lease_grant(5) end,
        function() return db:lease_keepalive(5) end,
        function() return db:lease_revoke(5) end,
        function() return db:watch("") end,
      }) do
        assert.error_matches(call, "store is closed")
      end
    end)
  end)

  describe("hostile or broken answers", function()
    local fake

    setup(function()
      local http = require "forge.http"
      fake = assert(http.serve { listen = "127.0.0.1:0", handler = "support.etcd", threads = 4 })
    end)

    teardown(function()
      if fake then fake:stop(1) end
    end)

    local function fake_url(mode) return "http://127.0.0.1:" .. fake:port() .. "/" .. mode end

    it("become nil, err (never a crash or a raise)", function()
      for _, mode in ipairs(etcd_server.FAKE_MODES) do
        if mode ~= "garbage" then
          local db = assert(etcd.open { endpoints = { fake_url(mode) }, prefix = "fake/", timeout_ms = 2000 })
          for name, call in pairs({
            get = function() return db:get("k") end,
            range = function() return db:range("") end,
            put = function() return db:put("k", "v") end,
            cas = function() return db:put("k", "v", { prev_revision = 3 }) end,
            delete = function() return db:delete("k") end,
            txn = function() return db:txn { success = { { op = "put", key = "k", value = "v" } } } end,
            grant = function() return db:lease_grant(5) end,
            keepalive = function() return db:lease_keepalive(5) end,
            watch = function() return db:watch("", 0, 300) end,
          }) do
            local ok, res, err = pcall(call)
            assert.is_true(ok, mode .. "/" .. name .. " raised: " .. tostring(res))
            if type(err) == "table" then       -- an error (txn and delete return two values)
              assert.is_nil(res, mode .. "/" .. name)
              assert.is_string(err.code)
              assert.is_string(err.message)
            end
          end
          db:close()
        end
      end
    end)

    it("name the problem", function()
      local db, err = etcd.open { endpoints = { fake_url("garbage") } }
      assert.is_nil(db)
      assert.equal("etcd.error", err.code)
      assert.matches("malformed", err.message)

      local function first_error(mode, call)
        local d = assert(etcd.open { endpoints = { fake_url(mode) }, prefix = "fake/", timeout_ms = 2000 })
        local res, e = call(d)
        d:close()
        assert.is_nil(res, mode)
        return e
      end
      local get = function(d) return d:get("k") end
      assert.matches("kv", first_error("nokvobj", get).message)
      assert.matches("key", first_error("badkv", get).message)
      assert.matches("value", first_error("badvalue", get).message)
      assert.matches("outside the prefix", first_error("outside", get).message)
      assert.matches("too many nested", first_error("deep", get).message)
      assert.matches("revision", first_error("huge_int", function(d) return d:range("") end).message)
      local e500 = first_error("html500", get)
      assert.equal("etcd.error", e500.code)
      assert.equal(500, e500.status)
      assert.matches("HTTP 500", e500.message)
      local e503 = first_error("unavailable", function(d) return d:put("k", "v") end)
      assert.equal("etcd.unavailable", e503.code)
      assert.is_true(e503.retryable)
      assert.matches("no leader", e503.message)
      local e429 = first_error("busy", get)
      assert.equal("store.busy", e429.code)
      assert.is_true(e429.retryable)
      local es = first_error("stream_error", function(d) return d:lease_keepalive(5) end)
      assert.equal("etcd.unavailable", es.code)
      assert.matches("stream broke", es.message)
      assert.matches("watch event", first_error("watch_garbage", function(d) return d:watch("", 0, 2000) end).message)
    end)

    it("read answers nested up to 64 levels deep, and no deeper", function()
      local db = assert(etcd.open { endpoints = { fake_url("nested64") }, timeout_ms = 2000 })
      local list, rev = db:range("")
      assert.same({}, list)
      assert.equal(5, rev)
      db:close()
      db = assert(etcd.open { endpoints = { fake_url("nested65") }, timeout_ms = 2000 })
      local nothing, err = db:range("")
      db:close()
      assert.is_nil(nothing)
      assert.equal("etcd.error", err.code)
      assert.matches("too many nested data structures (65)", err.message, 1, true)
    end)

    -- the state db:endpoints() reports for the endpoint with this URL
    local function ep_state(db, url)
      for _, ep in ipairs(db:endpoints()) do
        if ep.url == url then return ep end
      end
      error("no endpoint " .. url)
    end

    it("resend reads and writes to the next endpoint when etcd says it did not process them", function()
      for _, mode in ipairs({ "unavailable", "conn_closing", "busy" }) do
        local prefix = new_prefix()
        local db = open { endpoints = { fake_url(mode), srv.url }, prefix = prefix }
        assert.matches(fake_url(mode), tostring(db), 1, true)     -- the fake answered the open probe
        assert.is_nil(db:get("k"), mode)                          -- refused by the fake, then answered
        assert.matches(srv.url, tostring(db), 1, true)
        local db2 = open { endpoints = { fake_url(mode), srv.url }, prefix = prefix }
        local rev = assert(db2:put("k", "v"), mode)               -- a write too: it was not processed
        assert.is_true((db2:txn { compare = { { key = "k", mod_revision = rev } },
          success = { { op = "put", key = "k", value = "w" } } }), mode)
        assert.equal("w", db:get("k").value)
        local fake_ep = ep_state(db2, fake_url(mode))
        assert.is_false(fake_ep.up, mode)
        assert.equal(1, fake_ep.failures, mode)
        assert.is_true(fake_ep.retry_in_ms > 0 and fake_ep.retry_in_ms <= 500, mode)
        assert.matches("HTTP", fake_ep.last_error, 1, true)
        local real = ep_state(db2, srv.url)
        assert.is_true(real.up and real.current, mode)
        assert.equal(2, real.attempts, mode)                      -- the put, the txn: the fake was skipped
        db:close(); db2:close()
      end
    end)

    it("do not resend a write to the next endpoint when etcd may have applied it, but move on", function()
      for _, mode in ipairs({ "closing", "timedout", "cancelled" }) do
        local prefix = new_prefix()
        local db = open { endpoints = { fake_url(mode), srv.url }, prefix = prefix }
        local _, err = db:put("k", "v")
        assert.equal("etcd.unavailable", err.code, mode)
        assert.is_true(err.retryable)
        assert.matches(fake_url(mode), err.message, 1, true)     -- names the endpoint that answered
        assert.is_false(ep_state(db, fake_url(mode)).up)
        assert(db:put("k", "v2"))                                 -- the next call starts elsewhere
        assert.equal("v2", db:get("k").value)                     -- reads are always resent
        assert.matches(srv.url, tostring(db), 1, true)
        db:close()
      end
    end)

    it("resend a watch whose stream a member broke to the next endpoint", function()
      local prefix = new_prefix()
      local db = open { endpoints = { fake_url("stream_error"), srv.url }, prefix = prefix }
      local other = open { prefix = prefix }
      local r1 = assert(other:put("w", "1"))
      local events = assert(db:watch("", r1, 2000))
      assert.equal(1, #events)
      assert.same({ "w", "1", r1 }, { events[1].key, events[1].value, events[1].mod_revision })
      assert.is_false(ep_state(db, fake_url("stream_error")).up)
      assert.matches("stream broke", ep_state(db, fake_url("stream_error")).last_error, 1, true)
      db:close(); other:close()
    end)

    it("do not resend a write whose answer timed out", function()
      local db = assert(etcd.open { endpoints = { fake_url("slow"), srv.url }, timeout_ms = 400 })
      local t0 = proc.monotonic()
      local nothing, err = db:put("k", "v")
      assert.is_nil(nothing)
      assert.equal("etcd.unavailable", err.code)
      assert.is_true(err.retryable)
      assert.matches("may or may not have been applied", err.message)
      assert.is_true(elapsed_since(t0) < 1)
      db:close()
    end)
  end)

  describe("TLS and auth", function()
    local tsrv

    setup(function()
      tsrv = etcd_server.start { fast = true, tls = true, args = { "--auth-token-ttl", "1" } }
      tsrv:etcdctl("user", "add", "root:rootpw")
      tsrv:etcdctl("user", "grant-role", "root", "root")
      tsrv:etcdctl("user", "add", "forge:s3cret\"'\\")
      tsrv:etcdctl("role", "add", "forge")
      tsrv:etcdctl("role", "grant-permission", "forge", "--prefix=true", "readwrite", "brokers/")
      tsrv:etcdctl("user", "grant-role", "forge", "forge")
      tsrv:etcdctl("auth", "enable")
    end)

    teardown(function()
      if tsrv then tsrv:cleanup() end
    end)

    local function topts(extra)
      local o = { endpoints = { tsrv.url }, prefix = "brokers/a/", cacert = tsrv.tls.cacert, cert = tsrv.tls.cert,
        key = tsrv.tls.key, username = "forge", password = "s3cret\"'\\", timeout_ms = 3000 }
      for k, v in pairs(extra or {}) do o[k] = v end
      return o
    end

    it("works with client certificates and a user, re-authenticating when the token expires", function()
      local db = assert(etcd.open(topts()))
      local rev = assert(db:put("k", "v"))
      assert.equal(rev, db:get("k").mod_revision)
      local id = assert(db:lease_grant(10))
      proc.sleep(2.5)                                 -- the 1 s token is gone by now
      assert.equal("v", db:get("k").value)
      assert(db:lease_keepalive(id))
      local r2 = assert(db:put("k", "w", { prev_revision = rev }))
      proc.sleep(2.5)
      local events = assert(db:watch("", r2, 2000))   -- a watch re-authenticates too
      assert.equal("w", events[1].value)
      db:close()
    end)

    it("reports permission denied and bad credentials as etcd.error", function()
      local db = assert(etcd.open(topts { prefix = "elsewhere/" }))
      local _, err = db:put("k", "v")
      assert.equal("etcd.error", err.code)
      assert.is_false(err.retryable)
      assert.matches("permission denied", err.message)
      assert.equal(403, err.status)
      db:close()
      local nothing, err2 = etcd.open(topts { password = "wrong" })
      assert.is_nil(nothing)
      assert.equal("etcd.error", err2.code)
      assert.matches("authentication as 'forge' failed", err2.message, 1, true)
    end)

    it("verifies the server and needs the client certificate", function()
      local nothing, err = etcd.open(topts { cacert = tsrv.tls.cert })   -- not the CA
      assert.is_nil(nothing)
      assert.equal("etcd.error", err.code)
      assert.is_false(err.retryable)
      assert.matches("TLS", err.message)
      local no_cert = topts()
      no_cert.cert, no_cert.key = nil, nil
      local nothing2, err2 = etcd.open(no_cert)
      assert.is_nil(nothing2)
      assert.is_string(err2.code)
      local nothing3, err3 = etcd.open(topts { cert = "/nonexistent.pem", key = "/nonexistent.key" })
      assert.is_nil(nothing3)
      assert.equal("etcd.error", err3.code)
    end)
  end)
end)
