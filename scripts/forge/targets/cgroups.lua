--- Resource limits of local instances with cgroups: one cgroup per instance, `forge/<name>`, in
-- each controller it needs (memory, pids, cpu). Works with cgroup v1 (each controller mounted on
-- its own under /sys/fs/cgroup) and v2 (the unified tree at /sys/fs/cgroup with those
-- controllers available). The processes join the cgroup themselves before exec (forge.proc's
-- `cgroups` option), so nothing they start can escape it.
local lfs = require "lfs"
local proc = require "forge.proc"
local util = require "forge.util"

local M = {}
M.__index = M

local ROOT = "/sys/fs/cgroup"
local CONTROLLERS = { "memory", "pids", "cpu" }

local function write(path, value)
  local f, err = io.open(path, "w")
  if not f then return nil, err end
  local ok, werr = f:write(tostring(value))
  local cok, cerr = f:close()
  if not (ok and cok) then return nil, path .. ": " .. tostring(werr or cerr) end
  return true
end

local function exists(path) return lfs.attributes(path, "mode") ~= nil end

--- The cgroup hierarchy of this machine: {version = 1 | 2, dirs = {controller -> mount}} | nil,
-- why limits cannot be enforced.
function M.detect()
  if proc.geteuid() ~= 0 then return nil, "the broker does not run as root" end
  local v2 = util.read_file(ROOT .. "/cgroup.controllers")
  if v2 then
    for _, c in ipairs(CONTROLLERS) do
      if not (" " .. v2 .. " "):find("%s" .. c .. "%s") then
        return nil, "the cgroup v2 hierarchy at " .. ROOT .. " has no " .. c .. " controller"
      end
    end
    return setmetatable({ version = 2, dirs = { unified = ROOT } }, M)
  end
  local dirs = {}
  for _, c in ipairs(CONTROLLERS) do
    dirs[c] = ROOT .. "/" .. c
    if not exists(dirs[c] .. "/cgroup.procs") then
      return nil, "no cgroup v1 " .. c .. " controller mounted at " .. dirs[c]
    end
  end
  return setmetatable({ version = 1, dirs = dirs }, M)
end

-- The cgroup directories of `name`, one per mount.
function M:paths(name)
  local list = {}
  for _, mount in pairs(self.dirs) do list[#list + 1] = mount .. "/forge/" .. name end
  table.sort(list)
  return list
end

-- v2 shares CPU by weight (1..10000), v1 by shares (2..262144): the conversion runc and systemd use.
local function weight(shares)
  shares = math.max(2, math.min(262144, shares))
  return 1 + (shares - 2) * 9999 // 262142
end

-- The files and values that set `limits` in the cgroup of controller `c` (v1), or of the unified
-- tree: in order; `optional` files may not exist, a `try` may fail.
local function settings(version, c, limits)
  local mem = limits.memory_mb * 1048576
  if version == 2 then
    return { { "memory.max", mem }, { "memory.swap.max", 0, optional = true }, { "pids.max", limits.pids },
      { "cpu.weight", weight(limits.cpu_shares) } }
  end
  -- v1 keeps memory <= memory+swap at every step: a raised limit is refused until memsw is raised
  return ({
    memory = { { "memory.limit_in_bytes", mem, try = true }, { "memory.memsw.limit_in_bytes", mem, optional = true },
      { "memory.limit_in_bytes", mem } },
    pids = { { "pids.max", limits.pids } },
    cpu = { { "cpu.shares", math.max(2, math.min(262144, limits.cpu_shares)) } },
  })[c]
end

-- v2: a cgroup's controllers must be enabled in every parent's subtree_control.
local function enable_controllers(dir)
  local want = {}
  for _, c in ipairs(CONTROLLERS) do want[#want + 1] = "+" .. c end
  return write(dir .. "/cgroup.subtree_control", table.concat(want, " "))
end

--- Create (or update) the cgroups of `name` with `limits` {memory_mb, pids, cpu_shares}.
-- Returns the list of directories to join | nil, message.
function M:create(name, limits)
  local dirs = {}
  for c, mount in pairs(self.dirs) do
    local parent, dir = mount .. "/forge", mount .. "/forge/" .. name
    for _, d in ipairs({ parent, dir }) do
      if not exists(d) then
        local ok, err = lfs.mkdir(d)
        if not ok and not exists(d) then return nil, "cannot create cgroup " .. d .. ": " .. tostring(err) end
      end
    end
    if self.version == 2 then
      for _, d in ipairs({ mount, parent }) do
        local ok, err = enable_controllers(d)
        if not ok then return nil, "cannot enable the memory, pids and cpu controllers: " .. tostring(err) end
      end
    end
    for _, s in ipairs(settings(self.version, c, limits)) do
      local path = dir .. "/" .. s[1]
      if exists(path) or not s.optional then
        local ok, err = write(path, s[2])
        if not ok and not s.try then return nil, "cannot set " .. path .. " to " .. s[2] .. ": " .. tostring(err) end
      end
    end
    dirs[#dirs + 1] = dir
  end
  table.sort(dirs)
  return dirs
end

--- How many times the kernel's OOM killer killed a process of cgroup `name` (0 when it does
-- not exist).
function M:oom_kills(name)
  local mount = self.dirs.memory or self.dirs.unified
  local file = self.version == 2 and "memory.events" or "memory.oom_control"
  local text = util.read_file(mount .. "/forge/" .. name .. "/" .. file) or ""
  return tonumber(text:match("oom_kill (%d+)")) or 0
end

--- The processes in cgroup `name`.
function M:pids(name)
  local seen, list = {}, {}
  for _, dir in ipairs(self:paths(name)) do
    for pid in (util.read_file(dir .. "/cgroup.procs") or ""):gmatch("%d+") do
      if not seen[pid] then seen[pid], list[#list + 1] = true, tonumber(pid) end
    end
  end
  return list
end

--- Kill whatever still runs in cgroup `name` (a process that left its process group), then
-- remove the cgroup. Returns true | nil, message.
function M:remove(name)
  local deadline = proc.monotonic() + 5
  for _, dir in ipairs(self:paths(name)) do
    while exists(dir) do
      for _, pid in ipairs(self:pids(name)) do
        local start = proc.identity(pid)
        if start then proc.kill(pid, start, "KILL") end
      end
      local ok, err = lfs.rmdir(dir)
      if not ok and exists(dir) then
        -- killed processes leave their cgroup only once they have exited
        if proc.monotonic() > deadline then return nil, "cannot remove cgroup " .. dir .. ": " .. tostring(err) end
        proc.sleep(0.02)
      end
    end
  end
  return true
end

return M
