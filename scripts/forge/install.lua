--- forge install: a service package (.tgz of one service folder) checked in the sandbox, exactly as
-- `forge check` checks a folder, then moved into the services dir atomically (hot-reloaded).
--
-- The package is listed and vetted before anything is extracted (one folder, no path out of it,
-- no special files, bounded size), extracted into services/.install-<token> with its own file
-- modes minus group/other write and setuid/setgid/sticky, then checked. A folder of the same name
-- that is already installed is refused unless --replace; ids and service names another folder
-- uses are refused always. The swap: old folder aside, new one in, old removed (restored on failure).
--
-- A package may carry BOSH releases and stemcells (forge.releases: releases.yml, releases/,
-- stemcells/). After the check they are uploaded to every BOSH director the service's plans are
-- mapped to, and the service is swapped in only when every upload succeeded; the tarballs are not
-- kept in the services dir. A re-run after a failure skips what the directors already have.
--
-- Exit status: 0 installed, 1 refused (nothing was installed), 2 usage error or unreadable input
-- (no such file, not a .tgz, no services dir). On any refusal the installed set is untouched.
local authoring = require "forge.authoring"
local crypto = require "forge.crypto"
local lfs = require "lfs"
local releases = require "forge.releases"
local services = require "forge.services"

local M = {}

local INSTALLED, REFUSED, UNREADABLE = 0, 1, 2

local function say(...) io.stdout:write(...) io.stdout:write("\n") end
local function complain(...) io.stderr:write("forge install: ", ...) io.stderr:write("\n") end

-- Print each message, then that nothing changed; returns the exit status.
local function refuse(code, ...)
  for _, msg in ipairs({ ... }) do complain(msg) end
  complain("nothing was installed")
  return code
end

local MAX_PACKAGE = 10 * 1048576      -- bytes of the .tgz, besides the release and stemcell tarballs
local MAX_UNPACKED = 50 * 1048576     -- bytes once extracted, the same
local MAX_TARBALLS = 64 * 1073741824  -- bytes of the files under releases/ and stemcells/
local MAX_ENTRIES = 1000

local function shell_quote(s) return "'" .. s:gsub("'", "'\\''") .. "'" end

-- List a tgz: entries {type, size, name, link} | nil, message, exit status.
local function list_package(pkg)
  local p = io.popen("tar -tzvf " .. shell_quote(pkg) .. " 2>&1")
  local entries = {}
  for line in p:lines() do
    local kind, size, rest = line:match("^(%S)%S*%s+%S+%s+(%d+)%s+%S+%s+%S+%s+(.*)$")
    if line:find("Removing leading", 1, true) then
      p:close()
      return nil, "a path leaves the package (" .. line .. ")", REFUSED
    end
    if not kind then
      p:close()
      return nil, pkg .. " is not a readable .tgz: " .. line, UNREADABLE
    end
    local name, link = rest:match("^(.-) %-> (.*)$")
    if not name then name, link = rest:match("^(.-) link to (.*)$") end
    entries[#entries + 1] = { type = kind, size = tonumber(size), name = name or rest, link = link }
    if #entries > MAX_ENTRIES then
      p:close()
      return nil, "more than " .. MAX_ENTRIES .. " entries", REFUSED
    end
  end
  if not p:close() then return nil, pkg .. " is not a readable .tgz (tar could not read it)", UNREADABLE end
  return entries
end

-- Whether a package path (without ./) is a file in the folder's releases/ or stemcells/.
local function is_tarball(name, kind)
  return kind == "-" and (name:match("^[^/]+/releases/.") or name:match("^[^/]+/stemcells/.")) ~= nil
end

-- Refuse anything that could land outside the service folder.
-- Returns folder name, bytes of release and stemcell tarballs | nil, message.
local function vet_package(entries)
  local top, total, tarballs = nil, 0, 0
  for _, e in ipairs(entries) do
    local name = e.name:gsub("^%./", "")
    if name:sub(1, 1) == "/" then return nil, "absolute path " .. e.name end
    for part in name:gmatch("[^/]+") do
      if part == ".." then return nil, "a path leaves the package: " .. e.name end
    end
    if e.type ~= "-" and e.type ~= "d" and e.type ~= "l" then return nil, "special file " .. e.name end
    if e.type == "l" then
      if not e.link or e.link:sub(1, 1) == "/" or e.link:find("..", 1, true) then
        return nil, "symlink " .. e.name .. " points outside the service folder"
      end
    end
    local first = name:match("^([^/]+)")
    if first then
      if top and first ~= top then return nil, "the package must hold exactly one service folder" end
      top = first
      if name:gsub("/+$", "") == first and e.type ~= "d" then
        return nil, first .. " must be a folder, not a " .. (e.type == "l" and "symlink" or "file")
      end
    end
    if is_tarball(name, e.type) then
      tarballs = tarballs + (e.size or 0)
      if tarballs > MAX_TARBALLS then return nil, "holds more than " .. MAX_TARBALLS .. " bytes of tarballs" end
    else
      total = total + (e.size or 0)
      if total > MAX_UNPACKED then return nil, "unpacks to more than " .. MAX_UNPACKED .. " bytes" end
    end
  end
  if not top or not top:match("^[%w][%w%-_%.]*$") then return nil, "no service folder in the package" end
  return top, tarballs
end

-- The package's own modes, minus group/other write and setuid/setgid/sticky; folders stay usable
-- by their owner (rwx) and files readable by it. Symlinks are left alone (find does not follow
-- them, and -type d/f never matches one). Folders are fixed one by one before find descends into
-- them; the second find proves nothing was missed. Returns true | nil, message.
local function fix_modes(root)
  local q = shell_quote(root)
  os.execute("find " .. q .. " -type d -exec chmod u+rwx,go-w,a-st {} \\; -o -type f -exec chmod u+r,go-w,a-st {} +"
    .. " 2>/dev/null")
  local p = io.popen("find " .. q .. " ! -type l \\( -perm /7022 -o ! -type d ! -type f -o -type d ! -perm -700"
    .. " -o -type f ! -perm -400 \\) -print 2>&1")
  local left = p:read("l")
  local ok = p:close()
  if left or not ok then return nil, "could not set the file modes" .. (left and (" of " .. left) or "") end
  return true
end

-- Ids and names of svc that another installed folder already uses: a list of problems.
local function clashes(svc, dir, folder, limits)
  local problems = {}
  local mine = { [svc.script.id] = true }
  for _, p in ipairs(svc.script.plans) do mine[p.id] = true end
  local reg = services.load(dir, limits)
  for _, other in ipairs(reg.list) do
    if other.folder ~= folder then
      local where = other.name .. " (" .. dir .. "/" .. other.folder .. ")"
      if other.name == svc.name then
        problems[#problems + 1] = "service name '" .. svc.name .. "' is already installed in " .. dir .. "/" .. other.folder
      end
      if mine[other.script.id] then problems[#problems + 1] = "id " .. other.script.id .. " is used by " .. where end
      for _, p in ipairs(other.script.plans) do
        if mine[p.id] then problems[#problems + 1] = "plan id " .. p.id .. " is used by " .. where end
      end
    end
    other.sandbox:close()
  end
  return problems
end

-- Build and check the extracted folder as `forge check` does, and look for clashes with other
-- installed folders; adds to `problems`. Returns the version's {hash, ...} (nil when it does not build)
-- and the script's data (plans, targets) when it builds.
local function check_package(tmp, folder, dir, limits, check_opts, problems)
  if lfs.attributes(tmp .. "/" .. folder .. "/service.lua", "mode") ~= "file" then
    problems[#problems + 1] = "the package has no " .. folder .. "/service.lua"
    return nil
  end
  local src, err = services.read_folder(tmp, folder)
  local svc
  if src then svc, err = services.build(src, limits) end
  if not svc then
    problems[#problems + 1] = err
    return src
  end
  local ok, perr = pcall(function()
    local found, warnings = authoring.check_service(svc, check_opts)
    for _, p in ipairs(found or {}) do problems[#problems + 1] = tostring(p) end
    for _, w in ipairs(type(warnings) == "table" and warnings or {}) do complain("warning: ", tostring(w)) end
    for _, p in ipairs(clashes(svc, dir, folder, limits)) do problems[#problems + 1] = p end
  end)
  svc.sandbox:close()
  if not ok then error(perr, 0) end
  return src, svc.script
end

-- Upload the package's releases and stemcells (entries) to the directors the service is mapped to.
-- Returns true | nil, problems.
local function upload_releases(entries, script, targets_cfg)
  if #entries == 0 then return true end
  local names = releases.targets(script, targets_cfg)
  if #names == 0 then
    say("no plan of ", script.name, " is mapped to a BOSH director: its ", releases.count(entries), " are not uploaded")
    return true
  end
  say("uploading ", releases.count(entries), " to ", table.concat(names, ", "), " ...")
  local ok, problems = releases.upload(entries, targets_cfg, names, say)
  if ok then return true end
  problems[#problems + 1] = "what was uploaded stays there: run forge install again once this is fixed, it is skipped"
  return nil, problems
end

-- The version (content hash) of an installed folder, for messages.
local function installed_version(dir, folder)
  local src = services.read_folder(dir, folder)
  return src and src.hash or "unknown: no readable service.lua"
end

--- forge install <pkg.tgz> [--replace] [--services DIR]: validate and install atomically (hot-reloaded).
-- @param opts {replace = true: replace an installed folder of the same name, check = options of
--   authoring.check_service (the local target's config), targets = config.targets (the BOSH
--   directors the package's releases go to)}
-- @return exit status (0 installed, 1 refused, 2 usage or unreadable input)
function M.install(pkg, dir, limits, opts)
  dir, opts = dir or "services", opts or {}
  local mode = lfs.attributes(pkg or "", "mode")
  if not mode then return refuse(UNREADABLE, tostring(pkg) .. ": no such file") end
  if mode ~= "file" then return refuse(UNREADABLE, pkg .. " is a " .. mode .. ", not a .tgz file") end
  local f, oerr = io.open(pkg, "rb")
  if not f then return refuse(UNREADABLE, "cannot read " .. oerr) end
  f:close()
  local size = lfs.attributes(pkg, "size")
  if size == 0 then return refuse(UNREADABLE, pkg .. " is empty (0 bytes), not a .tgz") end
  local entries, lerr, lcode = list_package(pkg)
  if not entries then return refuse(lcode, lcode == REFUSED and ("refused: " .. lerr) or lerr) end
  if #entries == 0 then return refuse(REFUSED, pkg .. " is an empty archive: it holds no service folder") end
  local folder, tarballs = vet_package(entries)
  if not folder then return refuse(REFUSED, "refused: " .. tarballs) end
  if size > MAX_PACKAGE + tarballs then
    return refuse(REFUSED, pkg .. " is " .. size .. " bytes; packages may be " .. MAX_PACKAGE
      .. " at most, besides their release and stemcell tarballs")
  end
  if lfs.attributes(dir, "mode") ~= "directory" then return refuse(UNREADABLE, dir .. ": no such directory") end

  local target = dir .. "/" .. folder
  local problems = {}
  local old_version
  if lfs.symlinkattributes(target, "mode") then
    old_version = installed_version(dir, folder)
    if not opts.replace then
      problems[1] = target .. " is already installed (version " .. old_version .. "); use --replace to replace it"
    end
  end

  local tmp = dir .. "/.install-" .. crypto.token(6)
  local function cleanup() return os.execute("rm -rf " .. shell_quote(tmp)) end
  local ok, merr = lfs.mkdir(tmp)
  if not ok then return refuse(REFUSED, "cannot create " .. tmp .. ": " .. tostring(merr)) end
  say("checking ", folder, " from ", pkg, " ...")
  if not os.execute("tar -xzf " .. shell_quote(pkg) .. " -C " .. shell_quote(tmp)
      .. " --no-same-owner --same-permissions 1>&2") then
    cleanup()
    return refuse(REFUSED, "extraction failed")
  end
  local new = tmp .. "/" .. folder
  if lfs.symlinkattributes(new, "mode") ~= "directory" then
    cleanup()
    return refuse(REFUSED, "refused: " .. folder .. " in the package is not a folder")
  end
  local fixed, ferr = fix_modes(new)
  if not fixed then
    cleanup()
    return refuse(REFUSED, ferr)
  end

  local checked, src, script = pcall(check_package, tmp, folder, dir, limits, opts.check, problems)
  if not checked then problems[#problems + 1] = "the check failed: " .. tostring(src) end
  local tgz, rproblems = releases.read(new)
  for _, p in ipairs(rproblems or {}) do problems[#problems + 1] = p end
  if #problems > 0 then
    cleanup()
    return refuse(REFUSED, table.unpack(problems))
  end
  local uploaded, uproblems = upload_releases(tgz, script, opts.targets)
  if uploaded and #tgz > 0 then uploaded, uproblems = releases.drop_tarballs(new) end
  if not uploaded then
    cleanup()
    return refuse(REFUSED, table.unpack(type(uproblems) == "table" and uproblems or { uproblems }))
  end

  -- the swap: old version aside (same filesystem: tmp is inside dir), new one in, old removed
  local old
  if old_version then
    old = tmp .. "/.previous"
    local moved, rerr = os.rename(target, old)
    if not moved then
      cleanup()
      return refuse(REFUSED, "cannot move " .. target .. " aside: " .. tostring(rerr))
    end
  end
  local moved, rename_err = os.rename(new, target)
  if not moved then
    if old then
      local restored, back_err = os.rename(old, target)
      if not restored then
        os.execute("rm -rf " .. shell_quote(new))
        return refuse(REFUSED, "cannot move the new version in: " .. tostring(rename_err),
          "cannot restore the previous version either (" .. tostring(back_err) .. "): it is kept in " .. old
          .. "; move it back to " .. target)
      end
    end
    cleanup()
    return refuse(REFUSED, "cannot move the new version in: " .. tostring(rename_err))
  end
  if not cleanup() then complain("warning: could not remove ", tmp) end
  if old then
    say("replaced ", target, " version ", old_version, " with version ", src.hash, "; a running broker loads it now")
  else
    say("installed ", target, " (version ", src.hash, "); a running broker loads it now")
  end
  return INSTALLED
end

return M
