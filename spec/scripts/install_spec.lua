-- forge install: a .tgz of one service folder, checked like `forge check`, installed atomically
-- (file modes kept minus group/other write and setuid/setgid/sticky), --replace, refusals that
-- leave the installed set untouched, and the exit codes (0 installed, 1 refused, 2 unreadable).
-- Every spec runs the real binary (build/bin/forge) on packages built here with tar.
local Broker = require "spec.support.broker"
local lfs = require "lfs"
local proc = require "forge.proc"

local shell = require "spec.support.shell"

local function q(s) return "'" .. s:gsub("'", "'\\''") .. "'" end

local run = shell.run

local function sh(cmd) assert(os.execute(cmd), cmd) end

local function write(path, text)
  sh("mkdir -p " .. q(path:match("^(.*)/[^/]+$")))
  local f = assert(io.open(path, "w"))
  f:write(text)
  f:close()
end

local function read(path)
  local f = io.open(path, "r")
  if not f then return nil end
  local s = f:read("a")
  f:close()
  return s
end

-- The octal mode of a path, setuid/setgid/sticky included ("4755"), as stat prints it.
local function mode(path)
  local _, out = run("stat -c %a " .. q(path))
  return (out:gsub("%s+$", ""))
end

-- Entries of a directory, sorted, without . and ..
local function entries(dir)
  local l = {}
  for e in lfs.dir(dir) do if e ~= "." and e ~= ".." then l[#l + 1] = e end end
  table.sort(l)
  return l
end

-- A service.lua that passes the check: one `sleep` process per instance, static credentials.
-- opts: name, id (service id suffix), plan (plan id suffix), description, plans (list of names),
-- deploy (the body of deploy(ctx)).
local function service_lua(opts)
  local plans = {}
  for i, p in ipairs(opts.plans or { "small" }) do
    plans[i] = string.format('{ id = "22222222-0000-4000-8000-%012d", name = "%s", description = "d" }',
      (opts.plan or 100) + i, p)
  end
  return string.format([[
return {
  id = "11111111-0000-4000-8000-%012d",
  name = "%s",
  description = "%s",
  bindable = true,
  commands = { "sleep" },
  plans = { %s },
  deploy = function(ctx)
    %s
  end,
  bind = function(ctx) return { credentials = { host = ctx.host, port = ctx.ports[1] } } end,
  unbind = function() return {} end,
}
]], opts.id or 1, opts.name or "cache", opts.description or "v1", table.concat(plans, ", "),
    opts.deploy or 'return { processes = { { name = "main", argv = { "sleep", "1000" } } } }')
end

describe("forge install", function()
  local work, src, pkgs, target
  before_each(function()
    work = Broker.tmpdir()
    src, pkgs, target = work .. "/src", work .. "/pkgs", work .. "/services"
    sh("mkdir -p " .. q(src) .. " " .. q(pkgs) .. " " .. q(target))
  end)
  after_each(function() os.execute("rm -rf " .. q(work)) end)

  local forge = shell.forge
  local function install(pkg, extra)
    return forge("install " .. q(pkgs .. "/" .. pkg .. ".tgz") .. " --services " .. q(target) .. " " .. (extra or ""))
  end
  -- A service folder src/<folder> (service.lua from opts, a template, a README).
  local function folder(name, opts)
    opts = opts or {}
    opts.name = opts.name or name
    write(src .. "/" .. name .. "/service.lua", service_lua(opts))
    write(src .. "/" .. name .. "/templates/settings.yml", "maxmemory: 16\n")
    write(src .. "/" .. name .. "/README.md", "# " .. name .. "\n")
  end
  -- pkgs/<pkg>.tgz of src/<paths> (tar options in `extra`).
  local function pack(pkg, paths, extra)
    sh(string.format("cd %s && tar -czf %s %s %s", q(src), q(pkgs .. "/" .. pkg .. ".tgz"), extra or "", paths))
  end
  local function version_of(out) return out:match("%(version (%x+)%)") end
  -- Nothing but these folders in the services dir (no leftover .install-* dirs).
  local function only(list) assert.same(list, entries(target)) end

  it("--help shows the usage with --replace and the exit codes; usage errors exit 2", function()
    local code, out = forge("install --help")
    assert.equal(0, code, out)
    assert.matches("usage: forge install PKG.tgz [--replace] [--services DIR]", out, 1, true)
    assert.matches("--replace", out, 1, true)
    assert.matches("exit status: 0 installed, 1 refused (nothing was installed), 2 usage error", out, 1, true)
    for _, args in ipairs({ "", "a.tgz b.tgz", "a.tgz --bogus", "a.tgz --services", "a.tgz --params '{}'" }) do
      local c, o = forge("install " .. args)
      assert.equal(2, c, args .. ": " .. o)
      assert.matches("usage: forge install", o, 1, true)
    end
  end)

  it("installs a package keeping its file modes minus group/other write and setuid/setgid/sticky", function()
    folder("cache")
    local d = src .. "/cache"
    write(d .. "/bin/start.sh", "#!/bin/sh\nexec sleep 1000\n")
    write(d .. "/bin/suid", "#!/bin/sh\n")
    write(d .. "/private.txt", "secret\n")
    write(d .. "/ro/file", "x\n")
    write(d .. "/shared/file", "x\n")
    sh("chmod 0755 " .. q(d .. "/bin/start.sh") .. " && chmod 4755 " .. q(d .. "/bin/suid")
      .. " && chmod 0664 " .. q(d .. "/templates/settings.yml") .. " && chmod 0600 " .. q(d .. "/private.txt")
      .. " && chmod 2775 " .. q(d .. "/templates") .. " && chmod 1777 " .. q(d .. "/shared")
      .. " && chmod 0666 " .. q(d .. "/shared/file") .. " && chmod 0555 " .. q(d .. "/ro")
      .. " && ln -s README.md " .. q(d .. "/readme-link"))
    pack("cache", "cache")
    sh("chmod 0755 " .. q(d .. "/ro")) -- so that the teardown can remove it as any user

    local code, out = install("cache")
    assert.equal(0, code, out)
    assert.matches("installed " .. target .. "/cache (version " .. version_of(out) .. ")", out, 1, true)
    local t = target .. "/cache"
    assert.equal("755", mode(t .. "/bin/start.sh"))
    assert.equal("755", mode(t .. "/bin/suid"))
    assert.equal("644", mode(t .. "/templates/settings.yml"))
    assert.equal("644", mode(t .. "/service.lua"))
    assert.equal("600", mode(t .. "/private.txt"))
    assert.equal("755", mode(t .. "/templates"))
    assert.equal("755", mode(t .. "/shared"))
    assert.equal("644", mode(t .. "/shared/file"))
    assert.equal("755", mode(t .. "/ro"))       -- folders stay usable by their owner
    assert.equal("755", mode(t))
    assert.equal("link", lfs.symlinkattributes(t .. "/readme-link", "mode"))
    assert.equal("README.md", lfs.symlinkattributes(t .. "/readme-link", "target"))
    assert.equal(read(d .. "/bin/start.sh"), read(t .. "/bin/start.sh"))
    only({ "cache" })
  end)

  it("refuses a folder that is already installed without --replace, leaving it untouched", function()
    folder("cache")
    pack("v1", "cache")
    local code, out = install("v1")
    assert.equal(0, code, out)
    local v1 = version_of(out)
    local before = read(target .. "/cache/service.lua")

    folder("cache", { description = "v2" })
    pack("v2", "cache")
    local c, o = install("v2")
    assert.equal(1, c, o)
    assert.matches(target .. "/cache is already installed (version " .. v1 .. "); use --replace to replace it", o,
      1, true)
    assert.matches("nothing was installed", o, 1, true)
    assert.equal(before, read(target .. "/cache/service.lua"))
    only({ "cache" })
    -- the same package again is refused too
    assert.equal(1, (install("v1")))
    only({ "cache" })
  end)

  it("--replace replaces the folder as a whole and says which version it replaced", function()
    folder("cache")
    write(src .. "/cache/templates/old-only.yml", "gone: true\n")
    pack("v1", "cache")
    local _, out = install("v1")
    local v1 = version_of(out)
    assert.truthy(v1, out)

    os.remove(src .. "/cache/templates/old-only.yml")
    folder("cache", { description = "v2" })
    write(src .. "/cache/bin/run.sh", "#!/bin/sh\n")
    sh("chmod 0775 " .. q(src .. "/cache/bin/run.sh"))
    pack("v2", "cache")
    local code, o = install("v2", "--replace")
    assert.equal(0, code, o)
    local v2 = o:match("with version (%x+)")
    assert.truthy(v2, o)
    assert.are_not.equal(v1, v2)
    assert.matches("replaced " .. target .. "/cache version " .. v1 .. " with version " .. v2, o, 1, true)
    assert.matches('description = "v2"', read(target .. "/cache/service.lua"), 1, true)
    assert.is_nil(read(target .. "/cache/templates/old-only.yml"))
    assert.equal("755", mode(target .. "/cache/bin/run.sh"))
    only({ "cache" })

    -- --replace on a folder that is not installed yet just installs it
    folder("other", { id = 2, plan = 200 })
    pack("other", "other")
    local c2, o2 = install("other", "--replace")
    assert.equal(0, c2, o2)
    assert.matches("installed " .. target .. "/other", o2, 1, true)
    only({ "cache", "other" })
  end)

  it("refuses ids and service names another installed folder uses, even with --replace", function()
    folder("cache")
    pack("cache", "cache")
    assert.equal(0, (install("cache")))
    folder("other", { id = 2, plan = 200 })
    pack("other", "other")
    assert.equal(0, (install("other")))
    local cache_before = read(target .. "/cache/service.lua")
    local other_before = read(target .. "/other/service.lua")

    folder("sameid", { id = 1, plan = 300 })
    folder("sameplan", { id = 3, plan = 100 })
    folder("samename", { name = "cache", id = 4, plan = 400 })
    pack("sameid", "sameid")
    pack("sameplan", "sameplan")
    pack("samename", "samename")
    local cases = {
      sameid = "id 11111111-0000-4000-8000-000000000001 is used by cache (" .. target .. "/cache)",
      sameplan = "plan id 22222222-0000-4000-8000-000000000101 is used by cache (" .. target .. "/cache)",
      samename = "service name 'cache' is already installed in " .. target .. "/cache",
    }
    for pkg, why in pairs(cases) do
      local c, o = install(pkg, "--replace")
      assert.equal(1, c, pkg .. ": " .. o)
      assert.matches(why, o, 1, true)
      assert.matches("nothing was installed", o, 1, true)
    end
    -- replacing a folder with a version that takes another folder's plan id is refused too
    folder("cache", { plan = 200, description = "v2" })
    pack("cache2", "cache")
    local c, o = install("cache2", "--replace")
    assert.equal(1, c, o)
    assert.matches("plan id 22222222-0000-4000-8000-000000000201 is used by other (" .. target .. "/other)", o, 1, true)
    assert.equal(cache_before, read(target .. "/cache/service.lua"))
    assert.equal(other_before, read(target .. "/other/service.lua"))
    only({ "cache", "other" })
  end)

  it("gives a clear error for every bad package and leaves the installed set untouched", function()
    folder("cache")
    pack("cache", "cache")
    assert.equal(0, (install("cache")))
    local before = read(target .. "/cache/service.lua")

    -- packages that are not readable .tgz files: exit 2
    write(pkgs .. "/text.tgz", "not a tarball\n")
    write(pkgs .. "/zero.tgz", "")
    sh("head -c 60 " .. q(pkgs .. "/cache.tgz") .. " > " .. q(pkgs .. "/truncated.tgz"))
    sh("mkdir " .. q(pkgs .. "/dir.tgz"))
    -- readable packages that are refused: exit 1
    sh("tar -czf " .. q(pkgs .. "/empty.tgz") .. " -T /dev/null")
    pack("traversal", "cache", "-P --transform 's,^cache,../cache,'")
    folder("linky", { id = 5, plan = 500 })
    sh("ln -s /etc/passwd " .. q(src .. "/linky/templates/x.yml"))
    pack("symlink", "linky")
    folder("huge", { id = 6, plan = 600 })
    sh("dd if=/dev/zero of=" .. q(src .. "/huge/blob") .. " bs=1M count=51 2>/dev/null")
    pack("huge", "huge")
    folder("two", { id = 7, plan = 700 })
    pack("twofolders", "cache two")
    write(src .. "/lonefile", "x\n")
    pack("file", "lonefile")
    write(src .. "/nosvc/README.md", "no service here\n")
    pack("nosvc", "nosvc")
    write(src .. "/syntax/service.lua", "local s = {}\nreturn s +\n")
    pack("syntax", "syntax")
    folder("failing", { id = 8, plan = 800, plans = { "one", "two" },
      deploy = 'error("no deploy for plan " .. ctx.plan.name)' })
    pack("failing", "failing")

    local cases = {
      missing = { 2, "missing.tgz: no such file" },
      dir = { 2, "dir.tgz is a directory, not a .tgz file" },
      text = { 2, "text.tgz is not a readable .tgz" },
      zero = { 2, "zero.tgz is empty (0 bytes), not a .tgz" },
      truncated = { 2, "truncated.tgz is not a readable .tgz" },
      empty = { 1, "empty.tgz is an empty archive: it holds no service folder" },
      traversal = { 1, "a path leaves the package" },
      symlink = { 1, "symlink linky/templates/x.yml points outside the service folder" },
      huge = { 1, "unpacks to more than" },
      twofolders = { 1, "the package must hold exactly one service folder" },
      file = { 1, "lonefile must be a folder, not a file" },
      nosvc = { 1, "the package has no nosvc/service.lua" },
      syntax = { 1, "services/syntax/service.lua:3: unexpected symbol" },
      failing = { 1, "no deploy for plan one", "no deploy for plan two" },
    }
    for pkg, want in pairs(cases) do
      local c, o = install(pkg)
      assert.equal(want[1], c, pkg .. ": " .. o)
      for i = 2, #want do assert.matches(want[i], o, 1, true) end
      assert.matches("forge install: nothing was installed", o, 1, true)
    end
    -- a services dir that does not exist: exit 2
    local c, o = forge("install " .. q(pkgs .. "/cache.tgz") .. " --services " .. q(work .. "/nowhere"))
    assert.equal(2, c, o)
    assert.matches("nowhere: no such directory", o, 1, true)
    assert.is_nil(lfs.attributes(work .. "/nowhere"))

    only({ "cache" })
    assert.equal(before, read(target .. "/cache/service.lua"))
  end)

  it("is picked up by a running broker, and --replace swaps the version it serves", function()
    local b = Broker.start { services_dir = target }
    finally(function() b:cleanup() end)
    local function description()
      local _, _, _, body = b:call("GET", "/v2/catalog")
      for _, s in ipairs(body and body.services or {}) do if s.name == "cache" then return s.description end end
    end
    local function wait_for(want)
      local deadline = proc.monotonic() + 10
      local got = description()
      while got ~= want and proc.monotonic() < deadline do
        proc.sleep(0.1)
        got = description()
      end
      return got
    end
    folder("cache")
    pack("v1", "cache")
    local code, out = install("v1")
    assert.equal(0, code, out)
    assert.equal("v1", wait_for("v1"))
    folder("cache", { description = "v2" })
    pack("v2", "cache")
    assert.equal(1, (install("v2")))
    code, out = install("v2", "--replace")
    assert.equal(0, code, out)
    assert.equal("v2", wait_for("v2"))
  end)
end)
