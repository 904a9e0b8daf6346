-- forge.proc: spawn, identity, supervision, helper commands, probes.
local lfs = require "lfs"
local proc = require "forge.proc"

local function tmpdir()
  local r = assert(proc.run { argv = { "mktemp", "-d" } })
  return (r.stdout:gsub("%s+$", ""))
end

local function slurp(path)
  local f = io.open(path, "rb")
  if not f then return nil end
  local s = f:read("a")
  f:close()
  return s
end

local function exists(path)
  local f = io.open(path, "r")
  if f then f:close() return true end
  return false
end

-- wait until pred() or the deadline; returns pred's last value
local function eventually(pred, timeout)
  local deadline = proc.monotonic() + (timeout or 5)
  repeat
    local v = pred()
    if v then return v end
    proc.sleep(0.02)
  until proc.monotonic() > deadline
  return pred()
end

local free_port = require("spec.support.net").free_port

-- one field of /proc/<pid>/status, e.g. status_field(pid, "Uid") == "0\t0\t0\t0"
local function status_field(pid, key)
  local v = slurp("/proc/" .. pid .. "/status"):match("\n" .. key .. ":[ \t]*([^\n]*)")
  return (v:gsub("%s+$", ""))
end

-- "uid:gid" of each path, symlinks themselves (not their targets)
local function owners(paths)
  local r = assert(proc.run { argv = { "stat", "-c", "%u:%g", table.unpack(paths) } })
  local t = {}
  for l in r.stdout:gmatch("[^\n]+") do t[#t + 1] = l end
  return t
end

-- the user specs switch ids, which only root may do
local as_root = proc.geteuid() == 0 and it or pending
-- a user namespace where we are root but may not setgroups (unshare -r), when the kernel allows one
local in_userns = (function()
  local r = proc.geteuid() == 0 and proc.run { argv = { "unshare", "-Ur", "true" } }
  return r and r.code == 0
end)() and it or pending

describe("forge.proc", function()
  local dir

  setup(function()
    math.randomseed(os.time() + proc.getpid())
    dir = tmpdir()
  end)

  teardown(function()
    if dir then proc.run { argv = { "rm", "-rf", dir } } end
  end)

  it("has module info", function()
    assert.equal("forge.proc", proc._NAME)
    assert.is_string(proc._VERSION)
  end)

  describe("spawn / identity / alive / stop", function()
    it("spawns sleep, knows its identity and stops it without leaving a zombie", function()
      local p = assert(proc.spawn { argv = { "sleep", "30" } })
      assert.equal("integer", math.type(p.pid))
      assert.equal("integer", math.type(p.start_time))
      assert.equal(p.start_time, proc.identity(p.pid))
      assert.is_true(proc.alive(p.pid, p.start_time))
      assert.is_true(exists("/proc/" .. p.pid .. "/stat"))
      local t0 = proc.monotonic()
      assert.is_true(proc.stop(p.pid, p.start_time))
      assert.is_true(proc.monotonic() - t0 < 2)
      assert.is_false(proc.alive(p.pid, p.start_time))
      assert.is_nil(proc.identity(p.pid))
      assert.is_false(exists("/proc/" .. p.pid .. "/stat"))   -- reaped, no zombie
      -- already gone: still true
      assert.is_true(proc.stop(p.pid, p.start_time))
    end)

    it("runs the child in its own session and process group", function()
      local p = assert(proc.spawn { argv = { "sleep", "30" } })
      local stat = slurp("/proc/" .. p.pid .. "/stat")
      local rest = stat:match("%) (.*)$")
      local fields = {}
      for w in rest:gmatch("%S+") do fields[#fields + 1] = w end
      -- fields[1] = state (3), [3] = pgrp (5), [4] = session (6)
      assert.equal(tostring(p.pid), fields[3])
      assert.equal(tostring(p.pid), fields[4])
      assert.is_true(proc.stop(p.pid, p.start_time))
    end)

    it("escalates to KILL when TERM is ignored", function()
      local p = assert(proc.spawn {
        argv = { "sh", "-c", "trap '' TERM; while :; do sleep 0.05; done" },
      })
      proc.sleep(0.1)  -- let the shell install its trap
      local t0 = proc.monotonic()
      assert.is_true(proc.stop(p.pid, p.start_time, 0.3))
      local dt = proc.monotonic() - t0
      assert.is_true(dt >= 0.3, "stopped before the timeout: " .. dt)
      assert.is_true(dt < 3, "took " .. dt)
      assert.is_false(proc.alive(p.pid, p.start_time))
      assert.is_false(exists("/proc/" .. p.pid .. "/stat"))
    end)

    it("stop() sends the given signal first, KILL only after the timeout", function()
      local out = dir .. "/int.log"
      local p = assert(proc.spawn {
        argv = { "sh", "-c", "trap 'echo got INT; exit 0' INT; echo ready; while :; do sleep 0.05; done" },
        stdout = out,
      })
      finally(function() proc.stop(p.pid, p.start_time, 0) end)
      assert.truthy(eventually(function() return (slurp(out) or ""):match("ready\n") end))
      local t0 = proc.monotonic()
      assert.is_true(proc.stop(p.pid, p.start_time, 5, "INT"))
      assert.is_true(proc.monotonic() - t0 < 2)
      assert.equal("ready\ngot INT\n", slurp(out))
      assert.is_false(exists("/proc/" .. p.pid .. "/stat"))
    end)

    it("stop() takes a signal name in any case, with or without SIG, or a number", function()
      for _, sig in ipairs { "SIGHUP", "usr1", "QUIT", 15 } do
        local p = assert(proc.spawn { argv = { "sleep", "30" } })
        finally(function() proc.stop(p.pid, p.start_time, 0) end)
        assert.is_true(proc.stop(p.pid, p.start_time, 5, sig))
        assert.is_false(proc.alive(p.pid, p.start_time))
      end
    end)

    it("stop() raises on a bad signal and leaves the process alone", function()
      local p = assert(proc.spawn { argv = { "sleep", "30" } })
      finally(function() proc.stop(p.pid, p.start_time, 0) end)
      assert.has_error(function() proc.stop(p.pid, p.start_time, 1, "NOPE") end)
      assert.has_error(function() proc.stop(p.pid, p.start_time, 1, 0) end)
      assert.has_error(function() proc.stop(p.pid, p.start_time, 1, {}) end)
      assert.is_true(proc.alive(p.pid, p.start_time))
      assert.is_true(proc.stop(p.pid, p.start_time))
    end)

    it("signal_number() validates a signal early", function()
      assert.equal(15, proc.signal_number("TERM"))
      assert.equal(2, proc.signal_number("SIGINT"))
      assert.equal(9, proc.signal_number("kill"))
      assert.equal(1, proc.signal_number("Hup"))
      assert.equal(10, proc.signal_number(10))
      assert.is_nil(proc.signal_number("NOPE"))
      assert.is_nil(proc.signal_number("SIG"))
      assert.is_nil(proc.signal_number(0))
      assert.is_nil(proc.signal_number(4096))
      assert.has_error(function() proc.signal_number({}) end)
    end)

    it("reports exec failure of a missing binary", function()
      local p, err = proc.spawn { argv = { "forge-no-such-binary-xyz", "x" } }
      assert.is_nil(p)
      assert.equal("proc.exec", err.code)
      assert.equal("forge-no-such-binary-xyz: No such file or directory", err.message)
      assert.matches("^proc.exec: ", tostring(err))
    end)

    it("reports exec failure of a non-executable file and a bad cwd", function()
      local path = dir .. "/notexec"
      local f = assert(io.open(path, "w")); f:write("#!/bin/sh\n"); f:close()
      local p, err = proc.spawn { argv = { path } }
      assert.is_nil(p)
      assert.equal("proc.exec", err.code)
      assert.matches("Permission denied", err.message)
      p, err = proc.spawn { argv = { "true" }, cwd = dir .. "/missing" }
      assert.is_nil(p)
      assert.equal("proc.exec", err.code)
      assert.matches("chdir", err.message)
    end)

    it("redirects output to files (appending, 0600), stderr defaulting to stdout", function()
      local out, errf = dir .. "/out.log", dir .. "/err.log"
      local p = assert(proc.spawn { argv = { "sh", "-c", "echo one; echo two >&2" }, stdout = out, stderr = errf })
      assert.same({ code = 0 }, proc.wait(p.pid, 5))
      assert.equal("one\n", slurp(out))
      assert.equal("two\n", slurp(errf))
      p = assert(proc.spawn { argv = { "sh", "-c", "echo three; echo four >&2" }, stdout = out })
      assert.same({ code = 0 }, proc.wait(p.pid, 5))
      local s = slurp(out)
      assert.equal("one\n", s:sub(1, 4))
      assert.matches("three\n", s)
      assert.matches("four\n", s)
      local r = assert(proc.run { argv = { "stat", "-c", "%a", out } })
      assert.equal("600\n", r.stdout)
    end)

    it("gives the child /dev/null as stdin and closes our other fds", function()
      local out = dir .. "/fds.log"
      local p = assert(proc.spawn {
        argv = { "sh", "-c", "readlink /proc/self/fd/0; ls /proc/self/fd | wc -l" },
        stdout = out,
      })
      assert.same({ code = 0 }, proc.wait(p.pid, 5))
      local s = slurp(out)
      assert.matches("^/dev/null\n", s)
      -- 0, 1, 2 and the fd ls itself opens to read the directory
      assert.equal("4", s:match("\n(%d+)\n$"))
    end)

    it("replaces the environment when env is given, inherits it otherwise", function()
      local out = dir .. "/env.log"
      local p = assert(proc.spawn { argv = { "/usr/bin/env" }, env = { FOO = "bar", N = 42 }, stdout = out })
      assert.same({ code = 0 }, proc.wait(p.pid, 5))
      local lines = {}
      for l in slurp(out):gmatch("[^\n]+") do lines[#lines + 1] = l end
      table.sort(lines)
      assert.same({ "FOO=bar", "N=42" }, lines)
      local r = assert(proc.run { argv = { "sh", "-c", 'echo "$HOME"' } })
      assert.equal((os.getenv("HOME") or "") .. "\n", r.stdout)
    end)

    it("resets ignored signals and runs in cwd", function()
      local out = dir .. "/sig.log"
      local p = assert(proc.spawn {
        argv = { "sh", "-c", "pwd; grep -E '^Sig(Ign|Blk)' /proc/self/status" },
        cwd = dir, stdout = out,
      })
      assert.same({ code = 0 }, proc.wait(p.pid, 5))
      local s = slurp(out)
      assert.matches(dir, s, 1, true)
      assert.matches("SigBlk:%s+0+\n", s)
      assert.matches("SigIgn:%s+0+\n", s)
    end)

    it("alive() is false for a wrong start time and kill() refuses it", function()
      local p = assert(proc.spawn { argv = { "sleep", "30" } })
      assert.is_false(proc.alive(p.pid, p.start_time + 1))
      local ok, err = proc.kill(p.pid, p.start_time - 1, "TERM")
      assert.is_nil(ok)
      assert.equal("proc.gone", err.code)
      assert.is_true(proc.alive(p.pid, p.start_time))   -- untouched
      assert.is_true(proc.kill(p.pid, p.start_time, "STOP"))
      assert.is_true(proc.kill(p.pid, p.start_time, "SIGCONT"))
      assert.is_true(proc.kill(p.pid, p.start_time, 0))
      assert.is_true(proc.kill(p.pid, p.start_time, "KILL"))
      assert.truthy(eventually(function() return not proc.alive(p.pid, p.start_time) end))
      assert.is_false(exists("/proc/" .. p.pid .. "/stat"))
      ok, err = proc.kill(p.pid, p.start_time, "TERM")
      assert.is_nil(ok)
      assert.equal("proc.gone", err.code)
    end)

    it("identity is nil for a missing pid and alive() false", function()
      assert.is_nil(proc.identity(4194000))
      assert.is_false(proc.alive(4194000, 1))
      assert.equal("integer", math.type(proc.identity(proc.getpid())))
    end)

    it("trim_heap() gives the free memory a burst of work left back to the kernel", function()
      local function burst()                  -- small blocks: the heap, not mmap
        local t = {}
        for i = 1, 200000 do t[i] = string.rep("x", 80) .. i end
        return #t
      end
      assert.equal(200000, burst())
      collectgarbage("collect")
      local function rss_kb() return tonumber(slurp("/proc/self/status"):match("VmRSS:%s*(%d+)")) end
      local before = rss_kb()
      assert.is_true(proc.trim_heap())
      assert.is_true(rss_kb() < before - 8 * 1024, "RSS " .. before .. " kB -> " .. rss_kb() .. " kB")
    end)

    it("kill() signals the whole group", function()
      local out = dir .. "/grp.log"
      local p = assert(proc.spawn { argv = { "sh", "-c", "sleep 30 & echo $!; wait" }, stdout = out })
      local child = tonumber(eventually(function() return (slurp(out) or ""):match("(%d+)\n") end))
      assert.equal("integer", math.type(child))
      local cst = proc.identity(child)
      assert.equal("integer", math.type(cst))
      assert.is_true(proc.kill(p.pid, p.start_time, "TERM"))
      assert.truthy(eventually(function() return proc.identity(child) == nil end))
      assert.truthy(proc.wait(p.pid, 5))
    end)

    it("wait() returns the exit status, nil while running", function()
      local p = assert(proc.spawn { argv = { "sh", "-c", "sleep 0.2; exit 7" } })
      assert.is_nil(proc.wait(p.pid, 0))
      assert.same({ code = 7 }, proc.wait(p.pid, 5))
      local ok, err = proc.wait(p.pid, 0)
      assert.is_nil(ok)
      assert.equal("proc.not_child", err.code)
      p = assert(proc.spawn { argv = { "sleep", "30" } })
      assert.is_true(proc.kill(p.pid, p.start_time, "KILL"))
      assert.same({ signal = 9 }, proc.wait(p.pid))
    end)

    it("raises on misuse", function()
      assert.has_error(function() proc.spawn {} end)
      assert.has_error(function() proc.spawn { argv = {} } end)
      assert.has_error(function() proc.spawn { argv = { "true" }, bogus = 1 } end)
      assert.has_error(function() proc.spawn { argv = { "true" }, env = { [1] = "x" } } end)
      assert.has_error(function() proc.spawn { argv = { "true", {} } } end)
      assert.has_error(function() proc.kill(1, 1, "TERM") end)
      assert.has_error(function() proc.kill(12345, 1, "NOPE") end)
      assert.has_error(function() proc.run { argv = { "true" }, timeout = -1 } end)
      assert.has_error(function() proc.port_free(70000) end)
    end)
  end)

  describe("run", function()
    it("feeds stdin and captures stdout, stderr and the exit code", function()
      local r = assert(proc.run { argv = { "sh", "-c", "tr a-z A-Z; echo err >&2; exit 3" }, stdin = "hello\n" })
      assert.equal("HELLO\n", r.stdout)
      assert.equal("err\n", r.stderr)
      assert.equal(3, r.code)
      assert.is_nil(r.signal)
    end)

    it("handles large stdin and output", function()
      local big = string.rep("0123456789abcdef", 65536)  -- 1 MiB
      local r = assert(proc.run { argv = { "cat" }, stdin = big, max_output = 2 * 1024 * 1024 })
      assert.equal(#big, #r.stdout)
      assert.equal(big, r.stdout)
    end)

    it("survives a child that does not read its stdin", function()
      local r = assert(proc.run { argv = { "true" }, stdin = string.rep("x", 1024 * 1024) })
      assert.equal(0, r.code)
    end)

    it("reports signals", function()
      local r = assert(proc.run { argv = { "sh", "-c", "kill -KILL $$" } })
      assert.equal(9, r.signal)
      assert.is_nil(r.code)
    end)

    it("passes env and cwd", function()
      local r = assert(proc.run { argv = { "sh", "-c", "echo $X; pwd" }, env = { X = "y", PATH = "/usr/bin:/bin" },
        cwd = "/" })
      assert.equal("y\n/\n", r.stdout)
    end)

    it("times out and kills the process group, grandchildren included", function()
      local out = dir .. "/gc.pid"
      local t0 = proc.monotonic()
      local r, err = proc.run { argv = { "sh", "-c", "sleep 100 & echo $! > " .. out .. "; sleep 100" }, timeout = 0.5 }
      local dt = proc.monotonic() - t0
      assert.is_nil(r)
      assert.equal("proc.timeout", err.code)
      assert.is_true(err.retryable)
      assert.is_true(dt < 2, "took " .. dt)
      local gc = tonumber(slurp(out):match("%d+"))
      assert.truthy(eventually(function() return proc.identity(gc) == nil end, 2))
    end)

    it("does not wait for a grandchild holding the pipes after the command exits", function()
      local t0 = proc.monotonic()
      local r = assert(proc.run { argv = { "sh", "-c", "echo hi; sleep 3 & exit 0" }, timeout = 5 })
      assert.equal("hi\n", r.stdout)
      assert.is_true(proc.monotonic() - t0 < 2)
    end)

    it("reports a missing binary and enforces max_output", function()
      local r, err = proc.run { argv = { "forge-no-such-binary-xyz" } }
      assert.is_nil(r)
      assert.equal("proc.exec", err.code)
      r, err = proc.run { argv = { "yes" }, max_output = 1000 }
      assert.is_nil(r)
      assert.equal("proc.output", err.code)
    end)
  end)

  describe("users", function()
    it("user() looks a user up by name or uid", function()
      assert.same({ name = "root", uid = 0, gid = 0, home = "/root" }, proc.user("root"))
      assert.equal("root", proc.user(0).name)
      local nobody = assert(proc.user("nobody"))
      assert.equal(65534, nobody.uid)
      assert.equal("nobody", proc.user(65534).name)
      assert.equal("nobody", proc.user("65534").name)
      assert.equal("integer", math.type(proc.geteuid()))
    end)

    it("reports an unknown user, and raises on a value that is no user", function()
      local u, err = proc.user("forge-no-such-user")
      assert.is_nil(u)
      assert.equal("proc.user", err.code)
      assert.equal("no such user 'forge-no-such-user'", err.message)
      u, err = proc.user(4000000000)
      assert.is_nil(u)
      assert.equal("no such user '4000000000'", err.message)
      local p
      p, err = proc.spawn { argv = { "sleep", "30" }, user = "forge-no-such-user" }
      assert.is_nil(p)
      assert.equal("proc.user", err.code)
      p, err = proc.run { argv = { "true" }, user = 4000000000 }
      assert.is_nil(p)
      assert.equal("proc.user", err.code)
      assert.has_error(function() proc.user(-1) end)
      assert.has_error(function() proc.user(1.5) end)
      assert.has_error(function() proc.user() end)
      assert.has_error(function() proc.spawn { argv = { "true" }, user = {} } end)
      assert.has_error(function() proc.run { argv = { "true" }, user = true } end)
    end)

    as_root("spawns as another user: its uid, gid and groups only, no_new_privs", function()
      local nobody = assert(proc.user("nobody"))
      local p = assert(proc.spawn { argv = { "sleep", "30" }, user = "nobody" })
      finally(function() proc.stop(p.pid, p.start_time, 0) end)
      local uid, gid = tostring(nobody.uid), tostring(nobody.gid)
      assert.equal(table.concat({ uid, uid, uid, uid }, "\t"), status_field(p.pid, "Uid"))
      assert.equal(table.concat({ gid, gid, gid, gid }, "\t"), status_field(p.pid, "Gid"))
      assert.equal(gid, status_field(p.pid, "Groups"))
      assert.equal("1", status_field(p.pid, "NoNewPrivs"))
      assert.is_true(proc.stop(p.pid, p.start_time))
    end)

    as_root("runs as a user given by name or by uid", function()
      for _, user in ipairs { "nobody", 65534, "65534" } do
        local r = assert(proc.run { argv = { "id", "-u" }, user = user })
        assert.equal("65534\n", r.stdout)
        assert.equal(0, r.code)
      end
    end)

    as_root("changes nothing for the user we already are", function()
      local p = assert(proc.spawn { argv = { "sleep", "30" }, user = "root" })
      finally(function() proc.stop(p.pid, p.start_time, 0) end)
      assert.equal("0", status_field(p.pid, "NoNewPrivs"))
      assert.equal(status_field("self", "Groups"), status_field(p.pid, "Groups"))
      assert.is_true(proc.stop(p.pid, p.start_time))
    end)

    as_root("a broker that is not root may only run as itself", function()
      local script = [[
        package.cpath = arg[1]
        local proc = require "forge.proc"
        local none, err = proc.run { argv = { "true" }, user = "root" }
        local r = assert(proc.run { argv = { "id", "-u" }, user = "nobody" })
        io.write(proc.geteuid(), "|", tostring(none), "|", err.code, "|", err.message, "|", r.stdout)
      ]]
      local r = assert(proc.run { argv = { "lua5.4", "-", package.cpath }, stdin = script, user = "nobody" })
      assert.equal("", r.stderr)
      assert.equal("65534|nil|proc.user|cannot run as user 'root': the broker is not root|65534\n", r.stdout)
    end)

    in_userns("reports a switch that fails in the child", function()
      local script = [[
        package.cpath = arg[1]
        local proc = require "forge.proc"
        local none, err = proc.spawn { argv = { "sleep", "30" }, user = "nobody" }
        io.write(proc.geteuid(), "|", tostring(none), "|", err.code, "|", err.message)
      ]]
      local r = assert(proc.run { argv = { "unshare", "-Ur", "lua5.4", "-", package.cpath }, stdin = script })
      assert.equal("", r.stderr)
      assert.equal("0|nil|proc.user|sleep: cannot switch to user 'nobody': setgroups: Operation not permitted",
        r.stdout)
    end)

    as_root("output files stay ours", function()
      local out = dir .. "/as_nobody.log"
      local p = assert(proc.spawn { argv = { "id", "-un" }, user = "nobody", stdout = out })
      assert.same({ code = 0 }, proc.wait(p.pid, 5))
      assert.equal("nobody\n", slurp(out))
      assert.same({ "0:0" }, owners { out })
    end)

    as_root("chown() changes a tree, never what its symlinks point to", function()
      local t, outside = dir .. "/tree", dir .. "/outside"
      assert.same({ code = 0, stdout = "", stderr = "" }, proc.run {
        argv = { "sh", "-c", 'mkdir -p "$1/sub" "$2/d" && touch "$1/a" "$1/sub/b" "$2/f" "$2/d/g" && '
          .. 'ln -s "$2/f" "$1/link" && ln -s "$2/d" "$1/dirlink"', "sh", t, outside },
      })
      local inside = { t, t .. "/a", t .. "/sub", t .. "/sub/b", t .. "/link", t .. "/dirlink" }
      local out = { outside, outside .. "/f", outside .. "/d", outside .. "/d/g" }
      local function all(v, n) local l = {} for i = 1, n do l[i] = v end return l end

      assert.is_true(proc.chown(t .. "/link", "nobody"))            -- the link itself
      assert.same({ "65534:65534" }, owners { t .. "/link" })
      assert.same(all("0:0", #out), owners(out))

      assert.is_true(proc.chown(t, "nobody", true))
      assert.same(all("65534:65534", #inside), owners(inside))
      assert.same(all("0:0", #out), owners(out))

      assert.is_true(proc.chown(t, 0))                              -- not recursive: the top only
      assert.same({ "0:0", "65534:65534" }, owners { t, t .. "/a" })
    end)

    it("chown() errors name the path", function()
      local ok, err = proc.chown(dir .. "/missing", "root")
      assert.is_nil(ok)
      assert.equal("proc.chown", err.code)
      assert.equal("chown " .. dir .. "/missing: No such file or directory", err.message)
      ok, err = proc.chown(dir, "forge-no-such-user", true)
      assert.is_nil(ok)
      assert.equal("proc.user", err.code)
      assert.has_error(function() proc.chown(dir, "root", "yes") end)
      assert.has_error(function() proc.chown("", "root") end)
    end)

    as_root("run() as another user can read its own stdin as /dev/stdin (the pipe is handed over)", function()
      local r = assert(proc.run { argv = { "sh", "-c", "cat /dev/stdin" }, stdin = "pw\n", user = "nobody" })
      assert.equal(0, r.code, r.stderr)
      assert.equal("pw\n", r.stdout)
      assert.same({ "0:0" }, owners { "/dev/null" })
    end)

    it("run()'s command dies with its broker (no initdb left running after a kill -9)", function()
      local pidfile = dir .. "/run-child.pid"
      local parent = assert(proc.spawn { argv = { "lua5.4", "-e", "package.cpath = 'build/lib/?.so;' .. package.cpath; "
        .. "require('forge.proc').run { argv = { 'sh', '-c', 'echo $$ > " .. pidfile .. "; exec sleep 30' }, "
        .. "timeout = 60 }" }, cwd = os.getenv("PWD") })
      local deadline = proc.monotonic() + 5
      while not tonumber(slurp(pidfile) or "") and proc.monotonic() < deadline do proc.sleep(0.05) end
      local child = assert(tonumber(slurp(pidfile)))
      local start = assert(proc.identity(child))
      proc.kill(parent.pid, parent.start_time, "KILL")
      proc.wait(parent.pid, 5)
      deadline = proc.monotonic() + 5
      while proc.alive(child, start) and proc.monotonic() < deadline do proc.sleep(0.05) end
      local alive = proc.alive(child, start)
      if alive then proc.kill(child, start, "KILL") end
      assert.is_false(alive)
    end)

    it("chmod() sets the mode of a file or directory, never through a symlink", function()
      local f, l = dir .. "/mode-file", dir .. "/mode-link"
      assert.same({ code = 0, stdout = "", stderr = "" }, proc.run {
        argv = { "sh", "-c", 'touch "$1" && chmod 644 "$1" && ln -s "$1" "$2"', "sh", f, l } })
      assert.is_true(proc.chmod(f, tonumber("600", 8)))
      assert.equal("rw-------", lfs.attributes(f, "permissions"))
      local ok, err = proc.chmod(l, tonumber("777", 8))
      assert.is_nil(ok)
      assert.equal("proc.chmod", err.code)
      assert.equal("chmod " .. l .. ": is a symbolic link", err.message)
      assert.equal("rw-------", lfs.attributes(f, "permissions"))
      ok, err = proc.chmod(dir .. "/missing", 384)
      assert.is_nil(ok)
      assert.matches("No such file", err.message)
      assert.has_error(function() proc.chmod(f, 8 ^ 5) end)
      assert.has_error(function() proc.chmod("", 384) end)
    end)
  end)

  describe("sandboxes", function()
    local function link(pid, ns) return lfs.symlinkattributes("/proc/" .. pid .. "/ns/" .. ns, "target") end

    it("refuses bad isolation options with a usage error", function()
      assert.has_error(function() proc.spawn { argv = { "true" }, namespaces = { writable = "rel" } } end)
      assert.has_error(function() proc.spawn { argv = { "true" }, namespaces = { writable = "/tmp", hide = { "x" } } } end)
      assert.has_error(function() proc.spawn { argv = { "true" }, namespaces = { writable = "/tmp", colour = 1 } } end)
      assert.has_error(function() proc.spawn { argv = { "true" }, cgroups = "/sys/fs/cgroup" } end)
      assert.has_error(function() proc.run { argv = { "true" }, nofile = -1 } end)
      assert.has_error(function() proc.run { argv = { "true" }, join = { pid = 1 } } end)
      assert.has_error(function()
        proc.run { argv = { "true" }, join = { pid = 2, start_time = 0 }, namespaces = { writable = "/tmp" } }
      end)
    end)

    as_root("can isolate here", function() assert.is_true(proc.can_isolate()) end)

    as_root("starts a process alone in new namespaces, seeing a read-only tree but its own box", function()
      local box, hidden = tmpdir(), tmpdir()
      assert(io.open(hidden .. "/secret", "w")):close()
      assert(proc.chown(box, "nobody"))
      local p = assert(proc.spawn { argv = { "sleep", "30" }, user = "nobody", cwd = box,
        namespaces = { writable = box, hide = { hidden }, hostname = "box" } })
      finally(function()
        proc.kill(p.pid, p.start_time, "KILL")
        proc.wait(p.pid, 5)
        os.execute("rm -rf " .. box .. " " .. hidden)
      end)
      for _, ns in ipairs({ "mnt", "pid", "ipc", "uts" }) do assert.are_not.equal(link("self", ns), link(p.pid, ns)) end
      assert.equal(link("self", "net"), link(p.pid, "net"))
      assert.equal(box, lfs.symlinkattributes("/proc/" .. p.pid .. "/cwd", "target"))
      -- a command inside it: a member of its PID namespace, no capability, its view
      local r = assert(proc.run { argv = { "sh", "-c", "ls /proc | grep -c '^[0-9]'; hostname; id -u; "
        .. "grep -E '^(CapEff|CapBnd|NoNewPrivs)' /proc/self/status; ls " .. hidden .. "; touch /etc/nope; "
        .. "touch " .. box .. "/yes /tmp/private && echo wrote" }, user = "nobody", join = p, cwd = box })
      assert.equal(0, r.code)
      local count, host, uid = r.stdout:match("^(%d+)\n(%S+)\n(%d+)\n")
      assert.is_true(tonumber(count) >= 3 and tonumber(count) <= 5, r.stdout)   -- sleep, sh, its pipeline
      assert.equal("box", host)
      assert.equal(tostring(proc.user("nobody").uid), uid)
      assert.matches("CapEff:%s+0000000000000000\nCapBnd:%s+0000000000000000\nNoNewPrivs:%s+1", r.stdout)
      assert.matches("wrote", r.stdout)
      assert.is_nil(r.stdout:find("secret", 1, true))
      assert.matches("/etc/nope': Read-only file system", r.stderr, 1, true)
      assert.is_true(exists(box .. "/yes"))
      assert.is_false(exists("/tmp/private"))
      -- the first process of a PID namespace gets no TERM it has no handler for: stop() sends
      -- KILL at once instead of waiting out its timeout for a signal the kernel dropped
      local started = proc.monotonic()
      assert.is_true(proc.stop(p.pid, p.start_time, 60))
      assert.is_true(proc.monotonic() - started < 30)
      assert.is_false(proc.alive(p.pid, p.start_time))
      local none, err = proc.run { argv = { "true" }, join = p }
      assert.is_nil(none)
      assert.equal("proc.gone", err.code)
    end)

    as_root("runs a command in a sandbox of its own, with its exit status and output", function()
      local box = tmpdir()
      finally(function() os.execute("rm -rf " .. box) end)
      local r = assert(proc.run { argv = { "sh", "-c", "echo $$; ls /proc | grep -c '^[0-9]'; exit 3" },
        namespaces = { writable = box }, user = "nobody" })
      assert.equal(3, r.code)
      assert.equal("1\n3\n", r.stdout)       -- the shell is pid 1; /proc shows it, ls and grep
      local bad, err = proc.run { argv = { "true" }, namespaces = { writable = box .. "/missing" } }
      assert.is_nil(bad)
      assert.equal("proc.isolate", err.code)
      assert.matches("sandbox: opening the writable directory", err.message, 1, true)
    end)

    as_root("joins cgroups and sets the open-file limit before exec", function()
      local cg = "/sys/fs/cgroup/pids/forge-proc-spec-" .. proc.getpid()
      assert(lfs.mkdir(cg))
      finally(function() lfs.rmdir(cg) end)
      local r = assert(proc.run { argv = { "sh", "-c", "cat /proc/self/cgroup; ulimit -n" }, cgroups = { cg },
        nofile = 123, user = "nobody" })
      assert.matches("pids:/forge%-proc%-spec%-" .. proc.getpid() .. "\n", r.stdout)
      assert.matches("\n123\n$", r.stdout)
      local none, err = proc.run { argv = { "true" }, cgroups = { cg .. "-missing" } }
      assert.is_nil(none)
      assert.equal("proc.limits", err.code)
      assert.matches("joining " .. cg .. "-missing/cgroup.procs", err.message, 1, true)
    end)
  end)

  describe("time", function()
    it("sleeps, and reads the clocks", function()
      local t0 = proc.monotonic()
      proc.sleep(0.05)
      local dt = proc.monotonic() - t0
      assert.is_true(dt >= 0.05 and dt < 1)
      assert.is_true(math.abs(proc.time() - os.time()) < 2)
      assert.equal("integer", math.type(proc.getpid()))
    end)
  end)

  describe("network probes", function()
    it("port_free and tcp_check against a listener", function()
      local port = free_port()
      assert.is_true(proc.port_free(port))
      local ok, err = proc.tcp_check("127.0.0.1", port, 0.5)
      assert.is_false(ok)
      assert.equal("proc.net", err.code)
      local srv = assert(proc.spawn {
        argv = { "/usr/bin/python3", "-c", [[
import socket, sys, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1])))
s.listen(8)
time.sleep(60)
]], tostring(port) },
      })
      assert.truthy(eventually(function() return proc.tcp_check("127.0.0.1", port, 0.2) end, 10))
      assert.is_false(proc.port_free(port))
      assert.is_true(proc.tcp_check("localhost", port))
      assert.is_true(proc.stop(srv.pid, srv.start_time))
      assert.truthy(eventually(function() return proc.port_free(port) end))
      assert.is_false(proc.tcp_check("127.0.0.1", port, 0.2))
    end)

    it("tcp_check reports an unresolvable host", function()
      local ok, err = proc.tcp_check("no-such-host.invalid", 80, 0.5)
      assert.is_false(ok)
      assert.equal("proc.net", err.code)
    end)
  end)
end)
