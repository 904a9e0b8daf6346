-- forge.pg: statements against a real PostgreSQL 15 server, started here (initdb as the
-- postgres system user in a temp dir, SCRAM authentication, a free loopback port).
local proc = require "forge.proc"
local pg = require "forge.pg"
local crypto = require "forge.crypto"
local files = require "spec.support.files"
local free_port = require("spec.support.net").free_port

local BIN = "/usr/lib/postgresql/15/bin/"

local function tmpdir()
  local r = assert(proc.run { argv = { "mktemp", "-d" } })
  return (r.stdout:gsub("%s+$", ""))
end

-- our open file descriptors, as "fd -> target" lines (the listing's own fd left out)
local function fds()
  local lfs = require "lfs"
  local dir, out = "/proc/" .. proc.getpid() .. "/fd", {}
  for fd in lfs.dir(dir) do
    local target = fd:match("^%d+$") and lfs.symlinkattributes(dir .. "/" .. fd, "target")
    if target and not target:match("^/proc/%d+/fd$") then out[#out + 1] = fd .. " -> " .. target end
  end
  table.sort(out)
  return table.concat(out, "\n")
end

describe("forge.pg", function()
  local dir, port, server, silent, silent_port
  local password

  -- pg.exec as the superuser `forge`, on the server started in setup
  local function exec(statements, opts)
    opts = opts or {}
    opts.host = opts.host or "127.0.0.1"
    opts.port = opts.port or port
    opts.user = opts.user or "forge"
    if opts.password == nil then opts.password = password end
    opts.statements = statements
    return pg.exec(opts)
  end

  local function unique(prefix)
    return prefix .. "_" .. math.random(1e9)
  end

  setup(function()
    math.randomseed(os.time() + proc.getpid())
    password = "adm1n-" .. math.random(1e9)
    dir = tmpdir()
    files.write(dir .. "/pwfile", password .. "\n")
    assert(proc.chown(dir, "postgres", true))
    local r = assert(proc.run { argv = { BIN .. "initdb", "-D", dir .. "/data", "-A", "scram-sha-256", "-U", "forge",
      "--pwfile=" .. dir .. "/pwfile", "-E", "UTF8", "--locale=C", "--no-sync" },
      user = "postgres", cwd = dir, timeout = 120 })
    assert(r.code == 0, "initdb: " .. r.stdout .. r.stderr)
    port = free_port()
    server = assert(proc.spawn { argv = { BIN .. "postgres", "-D", dir .. "/data", "-k", dir,
      "-c", "listen_addresses=127.0.0.1", "-p", tostring(port), "-c", "fsync=off" },
      user = "postgres", cwd = dir, stdout = dir .. "/postgres.log" })
    local deadline = proc.monotonic() + 30
    local ok, err = exec { { "SELECT 1" } }
    while not ok and proc.monotonic() < deadline do
      proc.sleep(0.1)
      ok, err = exec { { "SELECT 1" } }
    end
    assert(ok, "postgres did not start: " .. tostring(err) .. "\n" .. files.read(dir .. "/postgres.log"))
    -- a listener that accepts connections (in the kernel's backlog) and never answers
    repeat silent_port = free_port() until silent_port ~= port
    files.write(dir .. "/silent.py", "import socket, sys, time\ns = socket.socket()\n" ..
      "s.bind(('127.0.0.1', int(sys.argv[1])))\ns.listen(16)\ntime.sleep(3600)\n")
    silent = assert(proc.spawn { argv = { "/usr/bin/python3", dir .. "/silent.py", tostring(silent_port) },
      stdout = dir .. "/silent.log" })
    deadline = proc.monotonic() + 10
    while not proc.tcp_check("127.0.0.1", silent_port, 0.2) do
      assert(proc.monotonic() < deadline, "the silent listener did not start: " .. files.read(dir .. "/silent.log"))
      proc.sleep(0.02)
    end
  end)

  teardown(function()
    if server then proc.stop(server.pid, server.start_time, 10, "INT") end
    if silent then proc.stop(silent.pid, silent.start_time, 5) end
    if dir then proc.run { argv = { "rm", "-rf", dir } } end
  end)

  it("has module info and no quoting functions (libpq quotes only on a connection)", function()
    assert.equal("forge.pg", pg._NAME)
    assert.is_string(pg._VERSION)
    assert.is_nil(pg.quote_ident)
    assert.is_nil(pg.quote_literal)
  end)

  it("runs SELECT with text parameters; rows are text, SQL NULL is false", function()
    local r = assert(exec {
      { "SELECT $1::int + $2::int AS s, $3::text AS t, NULL::text AS n", 40, 2.0, "h\195\169llo 'x' \\" },
      { "SELECT g, CASE WHEN g % 2 = 0 THEN NULL ELSE 'odd' END FROM generate_series(1, 3) g" },
      { "SELECT 1 WHERE false" },
    })
    assert.same({ command = "SELECT 1", rows = { { "42", "h\195\169llo 'x' \\", false } }, affected = 1 }, r[1])
    assert.same({ { "1", "odd" }, { "2", false }, { "3", "odd" } }, r[2].rows)
    assert.equal(3, r[2].affected)
    assert.same({ command = "SELECT 0", rows = {}, affected = 0 }, r[3])
    assert.equal("integer", math.type(r[1].affected))
  end)

  it("runs the statements in order on one connection (SET then SHOW, a temp table)", function()
    local r = assert(exec {
      { "SHOW application_name" }, { "SHOW client_encoding" }, { "SHOW statement_timeout" },
      { "SET application_name = 'pg_spec'" }, { "SHOW application_name" },
      { "CREATE TEMP TABLE t (a int)" }, { "INSERT INTO t SELECT generate_series(1, 5)" },
      { "UPDATE t SET a = a + 1 WHERE a > $1", 2 }, { "SELECT sum(a) FROM t" },
    })
    assert.same({ { "forge" } }, r[1].rows)
    assert.same({ { "UTF8" } }, r[2].rows)
    assert.same({ { "10s" } }, r[3].rows)
    assert.same({ command = "SET", rows = {}, affected = 0 }, r[4])
    assert.same({ { "pg_spec" } }, r[5].rows)
    assert.same({ command = "CREATE TABLE", rows = {}, affected = 0 }, r[6])
    assert.same({ command = "INSERT 0 5", rows = {}, affected = 5 }, r[7])
    assert.same({ command = "UPDATE 3", rows = {}, affected = 3 }, r[8])
    assert.same({ { "18" } }, r[9].rows)
    -- the timeout is the session's statement_timeout
    assert.same({ { "2500ms" } }, assert(exec({ { "SHOW statement_timeout" } }, { timeout = 2.5 }))[1].rows)
  end)

  it("fills %I, %L and %% in the format form with libpq's escaping", function()
    local r = assert(exec {
      { format = "SELECT %L AS %I, '100%%' AS pct", args = { "it's a \\ test", "Weird \"Col\"" } },
      { format = "SELECT 1" },
      { format = "SELECT %L::int + 1", args = { 41 } },
    })
    assert.same({ { "it's a \\ test", "100%" } }, r[1].rows)
    assert.same({ { "1" } }, r[2].rows)
    assert.same({ { "42" } }, r[3].rows)
  end)

  describe("roles and databases", function()
    local role, role_pw, verifier = unique("svc"), "r0le-" .. math.random(1e9), nil

    setup(function()
      verifier = crypto.scram_sha256 and assert(crypto.scram_sha256(role_pw)) or role_pw
      assert.same({ command = "CREATE ROLE", rows = {}, affected = 0 },
        assert(exec { { format = "CREATE ROLE %I LOGIN PASSWORD %L", args = { role, verifier } } })[1])
    end)

    it("creates a role that logs in with its password", function()
      local r = assert(exec({ { "SELECT current_user" } }, { user = role, password = role_pw }))
      assert.same({ { role } }, r[1].rows)
      local _, err = exec({ { "SELECT 1" } }, { user = role, password = role_pw .. "x" })
      assert.equal("pg.connect", err.code)
    end)

    if crypto.scram_sha256 then
      it("stores the SCRAM verifier from forge.crypto as it is", function()
        local r = assert(exec { { "SELECT rolpassword FROM pg_authid WHERE rolname = $1", role } })
        assert.matches("^SCRAM%-SHA%-256%$4096:", verifier)
        assert.equal(verifier, r[1].rows[1][1])
      end)
    else
      pending("stores the SCRAM verifier from forge.crypto (crypto.scram_sha256 is missing)")
    end

    it("creates a database owned by the role, which the role can use", function()
      local db = unique("Db")
      assert.same({ command = "CREATE DATABASE", rows = {}, affected = 0 },
        assert(exec { { format = "CREATE DATABASE %I OWNER %I", args = { db, role } } })[1])
      local r = assert(exec({ { "SELECT current_database(), pg_get_userbyid(datdba) FROM pg_database " ..
        "WHERE datname = current_database()" }, { "CREATE TABLE mine (a int)" } },
        { user = role, password = role_pw, database = db }))
      assert.same({ { db, role } }, r[1].rows)
    end)

    it("returns pg.error for a refused statement, without the statement text, and stops there", function()
      local after = unique("after")
      local r, err = exec {
        { "SELECT 1" },
        { format = "CREATE ROLE %I LOGIN PASSWORD %L", args = { role, "s3cret-verifier-value" } },
        { format = "CREATE ROLE %I", args = { after } },
      }
      assert.is_nil(r)
      assert.equal("pg.error", err.code)
      assert.is_false(err.retryable)
      assert.equal("42710", err.sqlstate)
      assert.equal(2, err.statement)
      assert.equal('statement 2: 42710: role "' .. role .. '" already exists', err.message)
      assert.equal("pg.error: " .. err.message, tostring(err))
      assert.same({}, assert(exec { { "SELECT 1 FROM pg_roles WHERE rolname = $1", after } })[1].rows)
    end)

    it("tolerates a refusal whose '<SQLSTATE> <message>' matches a pattern, and goes on", function()
      local after = unique("after")
      local r = assert(exec({
        { format = "CREATE ROLE %I LOGIN PASSWORD %L", args = { role, "x" } },
        { format = "CREATE ROLE %I", args = { after } },
        { format = "CREATE ROLE %I", args = { after } },
      }, { tolerate = { "^42P01 ", "^42710 role .* already exists$" } }))
      assert.same({ command = "TOLERATED", rows = {}, affected = 0, sqlstate = "42710" }, r[1])
      assert.same({ command = "CREATE ROLE", rows = {}, affected = 0 }, r[2])
      assert.equal("TOLERATED", r[3].command)
      local _, err = exec({ { format = "CREATE ROLE %I", args = { after } } }, { tolerate = { "^42P01 " } })
      assert.equal("42710", err.sqlstate)
    end)
  end)

  it("keeps the values of a statement out of the server's messages", function()
    local _, err = exec { { format = "CREATE ROLE %I PASSWORD %L %L", args = { "x", "s3cret-one", "s3cret-two" } } }
    assert.equal("42601", err.sqlstate)
    assert.matches("^statement 1: 42601: syntax error at or near", err.message)
    assert.not_matches("s3cret", err.message)
    _, err = exec { { "SELECT $1::int", "not-a-number-s3cret" } }
    assert.equal("statement 1: 22P02: invalid input syntax for type integer: \"***\"", err.message)
  end)

  it("returns pg.error when libpq cannot escape an argument", function()
    local _, err = exec { { format = "SELECT %L", args = { "abc\226" } } }
    assert.equal("pg.error", err.code)
    assert.is_nil(err.sqlstate)
    assert.equal("statement 1: incomplete multibyte character", err.message)
  end)

  it("raises on a malformed tolerate pattern when it is tried, leaking nothing", function()
    collectgarbage()
    local before = fds()
    local ok, err = pcall(exec, { { "SELECT 1/0" } }, { tolerate = { "(" } })
    assert.is_false(ok)
    assert.matches("unfinished capture", tostring(err))
    collectgarbage()
    assert.equal(before, fds())
  end)

  it("runs one statement per entry: two in one string are refused", function()
    local _, err = exec { { "SELECT 1; SELECT 2" } }
    assert.equal("pg.error", err.code)
    assert.equal("42601", err.sqlstate)
    assert.matches("cannot insert multiple commands", err.message)
  end)

  it("refuses COPY instead of waiting for data", function()
    local _, err = exec { { "COPY (SELECT 1) TO STDOUT" } }
    assert.equal("pg.error", err.code)
    assert.matches("^statement 1: unsupported result PGRES_COPY_OUT", err.message)
  end)

  it("fails with pg.connect, without the password, for a wrong password", function()
    local r, err = exec({ { "SELECT 1" } }, { password = "wr0ng-pa55word" })
    assert.is_nil(r)
    assert.equal("pg.connect", err.code)
    assert.is_true(err.retryable)
    assert.equal("127.0.0.1:" .. port .. ": ", err.message:sub(1, #tostring(port) + 12))
    assert.matches('password authentication failed for user "forge"', err.message, 1, true)
    assert.not_matches("wr0ng", err.message)
    assert.not_matches("\n", err.message)
  end)

  it("fails fast with pg.connect (retryable) on a closed port", function()
    local closed
    repeat closed = free_port() until closed ~= port and closed ~= silent_port
    local t0 = proc.monotonic()
    local r, err = exec({ { "SELECT 1" } }, { port = closed })
    assert.is_nil(r)
    assert.equal("pg.connect", err.code)
    assert.is_true(err.retryable)
    assert.matches("^127%.0%.0%.1:" .. closed .. ": .*Connection refused", err.message)
    assert.not_matches(password, err.message, 1, true)
    assert.is_true(proc.monotonic() - t0 < 1)
  end)

  it("fails with pg.connect when the server never answers (connect_timeout, at least 2 s)", function()
    local t0 = proc.monotonic()
    local _, err = exec({ { "SELECT 1" } }, { port = silent_port, timeout = 1 })
    local took = proc.monotonic() - t0
    assert.equal("pg.connect", err.code)
    assert.is_true(err.retryable)
    assert.matches("timeout expired", err.message)
    assert.is_true(took >= 1.5 and took < 4, "took " .. took)
  end)

  it("times out with pg.timeout (retryable) through statement_timeout", function()
    local t0 = proc.monotonic()
    local r, err = exec({ { "SELECT pg_sleep(5)" } }, { timeout = 1 })
    local took = proc.monotonic() - t0
    assert.is_nil(r)
    assert.equal("pg.timeout", err.code)
    assert.is_true(err.retryable)
    assert.equal("57014", err.sqlstate)
    assert.equal("statement 1: 57014: canceling statement due to statement timeout", err.message)
    assert.is_true(took < 2.5, "took " .. took)
  end)

  it("times out on the client too, 1 s after the timeout, when the server does not stop the statement", function()
    local t0 = proc.monotonic()
    local _, err = exec({ { "SET statement_timeout = 0" }, { "SELECT pg_sleep(3)" } }, { timeout = 0.5 })
    local took = proc.monotonic() - t0
    assert.equal("pg.timeout", err.code)
    assert.is_true(err.retryable)
    assert.equal(2, err.statement)
    assert.is_nil(err.sqlstate)
    assert.equal("statement 2: no answer within 1.5 s", err.message)
    assert.is_true(took >= 1.4 and took < 2.5, "took " .. took)
  end)

  it("fails with pg.io (retryable) when the connection is lost during a statement", function()
    local _, err = exec { { "SELECT 1" }, { "SELECT pg_terminate_backend(pg_backend_pid())" } }
    assert.equal("pg.io", err.code)
    assert.is_true(err.retryable)
    assert.equal(2, err.statement)
    assert.matches("terminating connection", err.message)
    assert.not_matches("\n", err.message)
  end)

  it("raises on misuse, before connecting", function()
    local function raises(opts, pattern)
      local ok, err = pcall(pg.exec, opts)
      assert.is_false(ok)
      assert.matches(pattern, tostring(err))
    end
    local function with(statements, extra)
      local o = { host = "127.0.0.1", port = port, user = "forge", statements = statements }
      for k, v in pairs(extra or {}) do o[k] = v end
      return o
    end
    local ok1 = { { "SELECT 1" } }
    raises(nil, "table expected")
    raises({ port = port, user = "forge", statements = ok1 }, "option 'host' is required")
    raises(with(ok1, { port = 70000 }), "'port' must be an integer in 1..65535")
    raises({ host = "127.0.0.1", user = "forge", statements = ok1 }, "'port' must be an integer")
    raises({ host = "127.0.0.1", port = port, statements = ok1 }, "option 'user' is required")
    raises(with(ok1, { password = "" }), "'password' must be a non%-empty string")
    raises(with(ok1, { database = 5 }), "'database' must be a string")
    raises(with(ok1, { timeout = 0 }), "'timeout' must be in")
    raises(with(ok1, { timeout = "1" }), "'timeout' must be a number")
    raises(with(ok1, { hots = "x" }), "unknown option 'hots'")
    raises(with(ok1, { tolerate = { 1 } }), "'tolerate' must be an array of patterns")
    raises(with(ok1, { tolerate = "^42710" }), "'tolerate' must be an array of patterns")
    raises(with(nil), "'statements' must be a non%-empty array")
    raises(with {}, "'statements' must be a non%-empty array")
    raises(with { "SELECT 1" }, "statements%[1%] must be a table")
    raises(with { {} }, "statements%[1%] must be {sql, param...}")
    raises(with { { sql = "SELECT 1" } }, "statements%[1%] must be {sql, param...}")
    raises(with { { "SELECT $1, $2", nil, "x" } }, "statements%[1%] must be {sql, param...} %(no holes%)")
    raises(with { { "" } }, "statements%[1%]%[1%] must be SQL text")
    raises(with { { "SELECT 1\0" } }, "statements%[1%]%[1%] must be SQL text without NUL")
    raises(with { ok1[1], { "SELECT $1", {} } }, "statements%[2%]%[2%] must be a string")
    raises(with { { "SELECT $1", true } }, "statements%[1%]%[2%] must be a string")
    raises(with { { "SELECT $1", "a\0b" } }, "statements%[1%]%[2%] must be a string %(without NUL bytes%)")
    raises(with { { format = "SELECT %s", args = { "x" } } }, "unknown directive '%%s'")
    raises(with { { format = "SELECT 1 %" } }, "ends in a lone '%%'")
    raises(with { { format = "CREATE ROLE %I" } }, "the format takes 1 arguments, args has 0")
    raises(with { { format = "CREATE ROLE %I", args = { "a", "b" } } }, "the format takes 1 arguments, args has 2")
    raises(with { { format = "CREATE ROLE %I", args = { {} } } }, "statements%[1%]%.args%[1%] must be a string")
    raises(with { { format = "SELECT 1", args = "x" } }, "statements%[1%]%.args must be an array")
    raises(with { { format = 1 } }, "statements%[1%]%.format must be a string")
    raises(with { { format = "SELECT 1", argz = {} } }, "statements%[1%]: unknown option 'argz'")
  end)

  it("closes every connection: no file descriptors left behind", function()
    collectgarbage()
    local before = fds()
    for _ = 1, 20 do
      assert(exec { { "SELECT 1" }, { format = "SELECT %L", args = { "x" } } })
      exec { { "SELECT 1/0" } }
      exec({ { "SELECT 1" } }, { password = "wrong" })
      exec({ { "SELECT 1" } }, { port = free_port() })
      exec({ { "SELECT 1" } }, { tolerate = { "^22012" } })
    end
    collectgarbage()
    assert.equal(before, fds())
  end)
end)
