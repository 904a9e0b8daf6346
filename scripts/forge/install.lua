--- forge install: a service package (.tgz of one service folder) checked in the sandbox, exactly as
-- `forge check` checks a folder, then moved into the services dir atomically (hot-reloaded).
local authoring = require "forge.authoring"
local crypto = require "forge.crypto"
local lfs = require "lfs"
local services = require "forge.services"

local M = {}

local function say(...) io.stdout:write(...) io.stdout:write("\n") end
local function complain(...) io.stderr:write(...) io.stderr:write("\n") end

local MAX_PACKAGE = 10 * 1048576      -- bytes of the .tgz
local MAX_UNPACKED = 50 * 1048576     -- bytes once extracted
local MAX_ENTRIES = 1000

local function shell_quote(s) return "'" .. s:gsub("'", "'\\''") .. "'" end

-- List a tgz: entries {type, size, name, link} | nil, message.
local function list_package(pkg)
  local p = io.popen("tar -tzvf " .. shell_quote(pkg) .. " 2>&1")
  local entries = {}
  for line in p:lines() do
    local kind, size, rest = line:match("^(%S)%S*%s+%S+%s+(%d+)%s+%S+%s+%S+%s+(.*)$")
    if line:find("Removing leading", 1, true) then
      p:close()
      return nil, "a path leaves the package (" .. line .. ")"
    end
    if not kind then
      p:close()
      return nil, "not a readable .tgz: " .. line
    end
    local name, link = rest:match("^(.-) %-> (.*)$")
    if not name then name, link = rest:match("^(.-) link to (.*)$") end
    entries[#entries + 1] = { type = kind, size = tonumber(size), name = name or rest, link = link }
    if #entries > MAX_ENTRIES then
      p:close()
      return nil, "more than " .. MAX_ENTRIES .. " entries"
    end
  end
  if not p:close() then return nil, "tar could not read the package" end
  return entries
end

-- Refuse anything that could land outside the service folder. Returns folder name | nil, message.
local function vet_package(entries)
  local top, total = nil, 0
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
    end
    total = total + (e.size or 0)
    if total > MAX_UNPACKED then return nil, "unpacks to more than " .. MAX_UNPACKED .. " bytes" end
  end
  if not top or not top:match("^[%w][%w%-_%.]*$") then return nil, "no service folder in the package" end
  return top
end

--- forge install <pkg.tgz> [--services DIR]: validate and install atomically (hot-reloaded).
function M.install(pkg, dir, limits)
  dir = dir or "services"
  local size = lfs.attributes(pkg or "", "size")
  if not size then
    complain("forge install: cannot read ", tostring(pkg))
    return 2
  end
  if size > MAX_PACKAGE then
    complain("forge install: ", pkg, " is ", size, " bytes; packages may be ", MAX_PACKAGE, " at most")
    return 1
  end
  local entries, lerr = list_package(pkg)
  local folder, verr
  if entries then folder, verr = vet_package(entries) end
  if not folder then
    complain("forge install: refused: ", lerr or verr)
    return 1
  end
  if not lfs.attributes(dir, "mode") then
    complain("forge install: ", dir, ": no such directory")
    return 2
  end
  local tmp = dir .. "/.install-" .. crypto.token(6)
  local function cleanup() os.execute("rm -rf " .. shell_quote(tmp)) end
  assert(lfs.mkdir(tmp))
  say("checking ", folder, " from ", pkg, " ...")
  if not os.execute("tar -xzf " .. shell_quote(pkg) .. " -C " .. shell_quote(tmp)
      .. " --no-same-owner --no-same-permissions 2>&1") then
    cleanup()
    complain("forge install: extraction failed")
    return 1
  end
  local src, rerr = services.read_folder(tmp, folder)
  local svc, err = nil, rerr
  if src then svc, err = services.build(src, limits) end
  local problems = svc and authoring.check_service(svc) or { err }
  if svc then
    local reg = services.load(dir, limits)
    for _, other in ipairs(reg.list) do
      if other.folder ~= folder then
        local mine = { [svc.script.id] = true }
        for _, p in ipairs(svc.script.plans) do mine[p.id] = true end
        if other.name == svc.name then problems[#problems + 1] = "service name '" .. svc.name .. "' is already installed" end
        if mine[other.script.id] then problems[#problems + 1] = "id " .. other.script.id .. " is used by " .. other.name end
        for _, p in ipairs(other.script.plans) do
          if mine[p.id] then problems[#problems + 1] = "plan id " .. p.id .. " is used by " .. other.name end
        end
      end
      other.sandbox:close()
    end
    svc.sandbox:close()
  end
  if #problems > 0 then
    cleanup()
    for _, p in ipairs(problems) do complain("forge install: ", p) end
    complain("forge install: nothing was installed")
    return 1
  end
  local target, old = dir .. "/" .. folder, nil
  if lfs.attributes(target, "mode") then
    old = tmp .. "/.previous"
    assert(os.rename(target, old))
  end
  local ok, rename_err = os.rename(tmp .. "/" .. folder, target)
  if not ok then
    if old then os.rename(old, target) end
    cleanup()
    complain("forge install: ", rename_err)
    return 1
  end
  cleanup()
  say("installed ", target, " (version ", src.hash, "); a running broker loads it now")
  return 0
end

return M
