-- forge install: a .tgz of one service folder, checked like `forge check`, installed atomically
-- (file modes kept minus group/other write and setuid/setgid/sticky), --replace, refusals that
-- leave the installed set untouched, and the exit codes (0 installed, 1 refused, 2 unreadable);
-- the BOSH releases and stemcells a package carries, uploaded to simulated directors first.
-- Every spec runs the real binary (build/bin/forge) on packages built here with tar.
local Broker = require "spec.support.broker"
local boshsim = require "spec.support.boshsim"
local http_files = require "spec.support.http_files"
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

  describe("with BOSH releases and stemcells", function()
    local sims, cfg_path
    before_each(function() sims = { a = boshsim.start { task_delay = 0.1 }, b = boshsim.start { task_delay = 0.1 } } end)
    after_each(function() for _, sim in pairs(sims) do sim:cleanup() end end)

    -- forge.yml with one BOSH target per name of `claims` (name -> list of claims), each to its sim;
    -- `override` (name -> {url=, password=}) changes what a target's entry says.
    local function config(claims, override)
      local lines = { "targets:" }
      for _, name in ipairs({ "a", "b" }) do
        if claims[name] then
          local sim, o = sims[name], (override or {})[name] or {}
          lines[#lines + 1] = string.format("  %s: {type: bosh, url: '%s', username: %s, password: '%s', timeout_ms: 3000,"
            .. " services: [%s], networks: [{name: services, static: ['10.244.0.10 - 10.244.0.20']}]}",
            name, o.url or sim.url, sim.user, o.password or sim.password, table.concat(claims[name], ", "))
        end
      end
      cfg_path = work .. "/forge.yml"
      write(cfg_path, table.concat(lines, "\n") .. "\n")
    end

    -- A tarball at src/<rel> holding ./<kind>.MF for name/version; returns its sha1.
    local function tarball(rel, kind, name, version)
      local dir = work .. "/mf-" .. name
      write(dir .. "/" .. kind .. ".MF", string.format("name: %s\nversion: \"%s\"\n", name, version))
      write(dir .. "/payload", string.rep(name, 100))
      sh("mkdir -p " .. q(src .. "/" .. rel:match("^(.*)/")) .. " && tar -czf " .. q(src .. "/" .. rel)
        .. " -C " .. q(dir) .. " ./" .. kind .. ".MF ./payload")
      local _, out = run("sha1sum " .. q(src .. "/" .. rel))
      return out:match("^(%x+)")
    end

    -- The cache service with a release and a stemcell in the package, listed in releases.yml;
    -- `entries` (kind -> text after "name, version") changes what the manifest says of each.
    local function package(pkg, manifest)
      manifest = manifest or {}
      folder("cache", { plans = { "small", "large" } })
      local rsha = tarball("cache/releases/cache-9.1.tgz", "release", "cache-rel", "9.1")
      local ssha = tarball("cache/stemcells/jammy.tgz", "stemcell", "bosh-sim-jammy", "1.500")
      write(src .. "/cache/releases.yml", string.format(
        "releases:\n- {name: cache-rel, version: '9.1', %s}\nstemcells:\n- {name: bosh-sim-jammy, version: '1.500', %s}\n",
        manifest.release or "file: releases/cache-9.1.tgz, sha1: " .. rsha, manifest.stemcell or "file: stemcells/jammy.tgz"))
      pack(pkg, "cache")
      return rsha, ssha
    end

    local function install_with_config(pkg, extra) return install(pkg, "--config " .. q(cfg_path) .. " " .. (extra or "")) end

    -- "release NAME/V" and "stemcell NAME/V" the sim lists.
    local function on(sim)
      local d = sim:director()
      local have = {}
      for _, r in ipairs(assert(d:releases())) do
        for _, v in ipairs(r.release_versions) do have[#have + 1] = "release " .. r.name .. "/" .. v.version end
      end
      for _, s in ipairs(assert(d:stemcells())) do have[#have + 1] = "stemcell " .. s.name .. "/" .. s.version end
      d:close()
      table.sort(have)
      return have
    end
    local BOTH = { "release cache-rel/9.1", "stemcell bosh-sim-jammy/1.500" }

    -- The upload requests a sim got ("POST /releases"), in order.
    local function uploads(sim)
      local l = {}
      for _, r in ipairs(sim:requests()) do
        if r.method == "POST" and (r.path == "/releases" or r.path == "/stemcells") then l[#l + 1] = "POST " .. r.path end
      end
      return l
    end

    it("uploads them once to the director the plans map to, installs without the tarballs, skips them on a re-run", function()
      config({ a = { "cache" } })
      package("cache")
      local code, out = install_with_config("cache")
      assert.equal(0, code, out)
      assert.matches("uploading 1 stemcell and 1 release to a", out, 1, true)
      assert.matches("uploading stemcell bosh-sim-jammy/1.500 (", out, 1, true)
      assert.matches("release cache-rel/9.1 uploaded (task ", out, 1, true)
      assert.matches("installed " .. target .. "/cache", out, 1, true)
      assert.same(BOTH, on(sims.a))
      assert.same({}, on(sims.b))
      assert.same({ "POST /stemcells", "POST /releases" }, uploads(sims.a))
      assert.same({ "README.md", "releases.yml", "service.lua", "templates" }, entries(target .. "/cache"))

      sims.a:clear_requests()
      code, out = install_with_config("cache", "--replace")
      assert.equal(0, code, out)
      assert.matches("release cache-rel/9.1 is there already, skipped", out, 1, true)
      assert.matches("stemcell bosh-sim-jammy/1.500 is there already, skipped", out, 1, true)
      assert.same({}, uploads(sims.a))
    end)

    it("uploads to both directors when the plans map to two", function()
      config({ a = { "cache/small" }, b = { "cache/large" } })
      package("cache")
      local code, out = install_with_config("cache")
      assert.equal(0, code, out)
      assert.matches("uploading 1 stemcell and 1 release to a, b", out, 1, true)
      assert.same(BOTH, on(sims.a))
      assert.same(BOTH, on(sims.b))
    end)

    it("uploads nothing when no plan is mapped to a BOSH director, and says so", function()
      config({ b = { "other" } })
      package("cache")
      local code, out = install_with_config("cache")
      assert.equal(0, code, out)
      assert.matches("no plan of cache is mapped to a BOSH director: its 1 stemcell and 1 release are not uploaded",
        out, 1, true)
      assert.same({}, uploads(sims.b))
      assert.same({}, on(sims.b))
    end)

    it("checks files, sha1s and release.MF before any upload; a fixed package then installs", function()
      config({ a = { "cache" } })
      local cases = {
        { { release = "file: releases/cache-9.1.tgz, sha1: " .. string.rep("a", 40) }, "sha1 mismatch: the manifest says aaaa" },
        { { stemcell = "file: stemcells/gone.tgz" }, "file stemcells/gone.tgz is missing from the package" },
        { { release = "file: releases/../service.lua" }, "file must be a path under releases/ in the package" },
        { { release = "url: 'https://example.com/r.tgz'" }, "needs the sha1 of https://example.com/r.tgz" },
      }
      for i, c in ipairs(cases) do
        package("bad" .. i, c[1])
        local code, out = install_with_config("bad" .. i)
        assert.equal(1, code, out)
        assert.matches(c[2], out, 1, true)
        assert.matches("nothing was installed", out, 1, true)
      end
      -- the manifest's name/version must be the tarball's (the director lists what release.MF says)
      folder("cache")
      tarball("cache/releases/r.tgz", "release", "other-rel", "2")
      write(src .. "/cache/releases.yml", "releases:\n- {name: cache-rel, version: '9.1', file: releases/r.tgz}\n")
      pack("mf", "cache")
      local code, out = install_with_config("mf")
      assert.equal(1, code, out)
      assert.matches("releases/r.tgz is other-rel/2 by its release.MF", out, 1, true)
      assert.same({}, uploads(sims.a))
      only({})

      package("cache")
      code, out = install_with_config("cache")
      assert.equal(0, code, out)
      assert.same(BOTH, on(sims.a))
    end)

    it("a failing upload task installs nothing; the re-run uploads the rest and installs", function()
      config({ a = { "cache" }, b = { "cache/large" } })
      package("cache")
      sims.a:faults { task_error = 1, task_error_message = "no space left on the blobstore" }
      local code, out = install_with_config("cache")
      assert.equal(1, code, out)
      assert.matches("director a (" .. sims.a.url .. "): stemcell bosh-sim-jammy/1.500: task 1 ended error: "
        .. "no space left on the blobstore", out, 1, true)
      assert.matches("run forge install again once this is fixed", out, 1, true)
      assert.matches("nothing was installed", out, 1, true)
      only({})
      assert.same({ "release cache-rel/9.1" }, on(sims.a))   -- the other uploads went on
      assert.same(BOTH, on(sims.b))

      sims.a:clear_requests()
      sims.b:clear_requests()
      code, out = install_with_config("cache")
      assert.equal(0, code, out)
      assert.same({ "POST /stemcells" }, uploads(sims.a))
      assert.same({}, uploads(sims.b))
      assert.same(BOTH, on(sims.a))
      only({ "cache" })
    end)

    it("an upload the director refuses installs nothing; the next upload is still tried", function()
      config({ a = { "cache" } })
      package("cache")
      sims.a:faults { upload_refuse = 1 }
      local code, out = install_with_config("cache")
      assert.equal(1, code, out)
      assert.matches("director a (" .. sims.a.url .. "): stemcell bosh-sim-jammy/1.500: refused the upload: "
        .. "POST /stemcells: HTTP 400: Upload refused", out, 1, true)
      assert.same({ "release cache-rel/9.1" }, on(sims.a))
      only({})
    end)

    it("sends URL references as {location, sha1}; the director downloads them and checks the sha1", function()
      config({ a = { "cache" } })
      local rsha, ssha = package("local")
      local blobs = work .. "/blobs"
      sh("mkdir -p " .. q(blobs) .. " && cp " .. q(src .. "/cache/releases/cache-9.1.tgz") .. " "
        .. q(src .. "/cache/stemcells/jammy.tgz") .. " " .. q(blobs))
      local server = http_files.start(blobs)
      finally(server.stop)
      local function by_url(pkg, stemcell_sha1)
        package(pkg, { release = "url: '" .. server.url .. "/cache-9.1.tgz', sha1: " .. rsha,
          stemcell = "url: '" .. server.url .. "/jammy.tgz', sha1: " .. stemcell_sha1 })
        sh("rm -rf " .. q(src .. "/cache/releases") .. " " .. q(src .. "/cache/stemcells"))
        pack(pkg, "cache")
      end
      by_url("badsha", string.rep("b", 40))
      local code, out = install_with_config("badsha")
      assert.equal(1, code, out)
      assert.matches("stemcell bosh-sim-jammy/1.500: task 1 ended error: SHA1 mismatch", out, 1, true)
      only({})
      by_url("url", ssha)
      code, out = install_with_config("url")
      assert.equal(0, code, out)
      assert.matches("uploading stemcell bosh-sim-jammy/1.500 from " .. server.url .. "/jammy.tgz", out, 1, true)
      assert.same(BOTH, on(sims.a))
    end)

    it("an unreachable director or refused credentials install nothing, with the reason", function()
      package("cache")
      config({ a = { "cache" } }, { a = { url = "http://127.0.0.1:" .. require("spec.support.net").free_port() } })
      local code, out = install_with_config("cache")
      assert.equal(1, code, out)
      assert.matches("director a %(http://127%.0%.0%.1:%d+%) unreachable: ", out)
      config({ a = { "cache" } }, { a = { password = "wrong" } })
      code, out = install_with_config("cache")
      assert.equal(1, code, out)
      assert.matches("director a (" .. sims.a.url .. ") refused the credentials", out, 1, true)
      only({})
    end)
  end)
end)
