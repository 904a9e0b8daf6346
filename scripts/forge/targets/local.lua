--- The `local` target: a deployment is a set of processes on this machine.
--
-- A service's deploy hook renders {processes = {{name, argv, env, files, health}}}; this driver
-- allocates ports from the configured pool, writes the files under the instance's directory,
-- spawns each process in its own session with a FORGE_PROCESS marker in its environment,
-- waits for health, supervises (restart with backoff) and stops (TERM, wait, KILL).
-- Process identity is pid + start time, so a restarted broker adopts live processes and
-- never signals a recycled pid; a process spawned just before a crash is found by its marker.
-- Isolation (docs/isolation.md): each process starts in its own namespaces with a read-only view
-- in which its instance's directory is the only writable place; commands run inside a running
-- process's namespaces; every process and command of an instance shares its cgroups (limits).
local lfs = require "lfs"
local cgroups = require "forge.targets.cgroups"
local crypto = require "forge.crypto"
local proc = require "forge.proc"
local util = require "forge.util"
local wire = require "forge.targets.wire"
local log = require "forge.log"
local model = require "forge.model"
local contract = require "forge.contract"
local telemetry = require "forge.telemetry"

local Local = {}
Local.__index = Local

--- New driver for the target config `cfg` (targets.local) and the broker's state dir.
function Local.new(cfg, state_dir)
  return setmetatable({ cfg = cfg, state_dir = state_dir, dir = state_dir .. "/instances" }, Local)
end

--- How this target confines instances, found out once: {mode = "namespaces" | "none",
-- limits = "cgroup v1" | "cgroup v2" | "off", warnings = {...}} (the fallbacks, and why).
function Local:isolation()
  if self.iso then return self.iso end
  local iso = { mode = self.cfg.isolation, warnings = util.array() }
  if iso.mode == "namespaces" then
    local ok, why = proc.can_isolate()
    if not ok then
      iso.mode = "none"
      iso.warnings[#iso.warnings + 1] = "isolation falls back to none: " .. why
    end
  end
  local cg, why = cgroups.detect()
  iso.limits = cg and ("cgroup v" .. cg.version) or "off"
  if not cg then iso.warnings[#iso.warnings + 1] = "resource limits are not enforced: " .. why end
  self.iso, self.cgroups = iso, cg
  return iso
end

local LIMITS = { "memory_mb", "pids", "cpu_shares", "files" }

--- The limits of an instance of `plan`, each the plan's, else the service's, else the operator's
-- default (targets.local.limits); one above the operator's cap is refused. Returns limits | nil, message.
function Local:limits(script, plan)
  local out = {}
  for _, k in ipairs(LIMITS) do
    local v = (plan and plan.limits or {})[k] or (script and script.limits or {})[k] or self.cfg.limits[k]
    if v > self.cfg.max_limits[k] then
      return nil, string.format("limits.%s = %d is above what the local target allows "
        .. "(targets.local.max_limits.%s = %d)", k, v, k, self.cfg.max_limits[k])
    end
    out[k] = v
  end
  return out
end

-- The name of an instance's cgroup: unique on this machine, as several brokers may share it.
function Local:cgroup_name(inst)
  return inst.id:sub(1, 200) .. "-" .. crypto.sha256_hex(self.state_dir .. "\0" .. inst.id):sub(1, 12)
end

-- Confine the spawn/run options `opts` of a process or command of `inst`: its cgroups and open-file
-- limit, and new namespaces or, with `join` (a live isolated process's identity), those of it.
-- Only a broker that is root confines (its services run as another user). Returns true | nil, message.
function Local:confine(inst, opts, join)
  if not inst.run_as then return true end
  local iso = self:isolation()
  local limits = inst.limits or self.cfg.limits
  if self.cgroups then
    local dirs, err = self.cgroups:create(self:cgroup_name(inst), limits)
    if not dirs then return nil, err end
    opts.cgroups = dirs
  end
  opts.nofile = limits.files
  if iso.mode == "namespaces" then
    if join then
      opts.join = { pid = join.pid, start_time = join.start_time }
    else
      local hide = { self.state_dir }
      for _, path in ipairs(self.cfg.hide) do hide[#hide + 1] = path end
      opts.namespaces = { writable = self:instance_dir(inst.id), hide = hide, hostname = inst.id:sub(1, 64) }
    end
  end
  return true
end

-- Stop whatever is left in the instance's cgroups and remove them.
function Local:release(inst)
  self:isolation()
  if not self.cgroups then return true end
  return self.cgroups:remove(self:cgroup_name(inst))
end

-- Why the instance's process died, when its memory limit killed it: a reason | nil. The cgroup
-- counts the kills since it was created; inst.health.oom_kills holds the count last reported.
function Local:memory_kill(inst)
  self:isolation()
  if not self.cgroups then return nil end
  local kills = self.cgroups:oom_kills(self:cgroup_name(inst))
  local seen = (inst.health or {}).oom_kills or 0
  if kills > seen or (kills > 0 and kills < seen) then     -- fewer: a new cgroup since
    inst.health = { oom_kills = kills }
    return string.format("killed by its memory limit (memory_mb = %d)", (inst.limits or self.cfg.limits).memory_mb)
  end
end

function Local:instance_dir(id) return self.dir .. "/" .. id end

--- The absolute path of `rel` in inst's directory | nil, message when a component of it is a
-- symlink: the service's user owns the directory and the broker may act on it as root.
function Local:path_in(inst, rel)
  local path = self:instance_dir(inst.id)
  for part in rel:gmatch("[^/]+") do
    path = path .. "/" .. part
    if lfs.symlinkattributes(path, "mode") == "link" then
      return nil, rel .. ": " .. path .. " is a symlink; the broker does not follow links"
    end
  end
  return path
end

local function write_file(path, content)
  local dir = path:match("^(.*)/[^/]*$")
  local ok, err = util.mkdirs(dir)
  if not ok then return nil, err end
  local tmp = path .. ".tmp"
  local f, ferr = io.open(tmp, "wb")
  if not f then return nil, ferr end
  f:write(content)
  f:close()
  return os.rename(tmp, path)
end

-- The last `bytes` of a file.
local function last_bytes(path, bytes)
  local f = io.open(path, "rb")
  if not f then return "" end
  local size = f:seek("end")
  f:seek("set", math.max(0, size - bytes))
  local text = f:read("a") or ""
  f:close()
  return text
end

-- The last three non-empty lines of some output, trimmed, on one line: what a command or a
-- dying process said last.
local function last_lines(text)
  local lines = {}
  for line in (text or ""):gmatch("[^\n]+") do
    line = line:gsub("^%s+", ""):gsub("%s+$", "")
    if line ~= "" then lines[#lines + 1] = line end
  end
  return table.concat(lines, " / ", math.max(1, #lines - 2))
end

-- The last lines of a log file (of its last 600 bytes): the reason a process gave for dying.
local function tail(path) return last_lines(last_bytes(path, 600)) end

--- Ports needed for a deployment, as the service says (default 1): the lowest free ones, or,
-- with `spread` (a retry after another request claimed the same ports), free ones from a random
-- point of the pool on, so that concurrent provisions stop picking the same ports.
function Local:allocate_ports(db, count, spread)
  local used = {}
  for _, kv in ipairs(model.range(db, "port/")) do used[tonumber(kv.key:sub(6))] = true end
  local ports = {}
  local from, size = self.cfg.ports.from, self.cfg.ports.to - self.cfg.ports.from + 1
  local start = spread and math.random(0, size - 1) or 0
  for i = 0, size - 1 do
    if #ports == count then break end
    local p = from + (start + i) % size
    if not used[p] and proc.port_free(p, self.cfg.host) then ports[#ports + 1] = p end
  end
  if #ports < count then
    return nil, string.format("the local port pool %d-%d has no %d free port(s) left",
      self.cfg.ports.from, self.cfg.ports.to, count)
  end
  return ports
end

-- Each process runs in its own directory under this broker's state dir, which is unique on
-- this machine; it is also put in the process's environment as FORGE_PROCESS.
function Local:process_dir(inst, p) return self:instance_dir(inst.id) .. "/" .. p.name end

-- The FORGE_PROCESS marker of a process and its working directory (either may be nil).
-- (Some servers, redis among them, overwrite their environment for the process title.)
local function process_place(pid)
  local f = io.open("/proc/" .. pid .. "/environ", "rb")
  local marker = f and ("\0" .. (f:read("a") or "")):match("%zFORGE_PROCESS=([^%z]+)") or nil
  if f then f:close() end
  return { marker, lfs.symlinkattributes("/proc/" .. pid .. "/cwd", "target") }
end

--- Live processes spawned by this target (or left by an earlier broker): their working
-- directory or FORGE_PROCESS marker is a process directory under the instances dir.
-- `want(dir)` picks the process directories to report (all when nil).
-- @return array of {pid=, start_time=, dir=}
function Local:our_processes(want)
  local found, root = {}, self.dir .. "/"
  for entry in lfs.dir("/proc") do
    if entry:match("^%d+$") then
      local places = process_place(entry)
      for i = 1, 2 do
        local dir = places[i]
        if dir and dir:sub(1, #root) == root and (not want or want(dir)) then
          local pid = tonumber(entry)
          local start = proc.identity(pid)
          if start then found[#found + 1] = { pid = pid, start_time = start, dir = dir } end
          break
        end
      end
    end
  end
  return found
end

-- A process of ours whose spawn was never recorded (broker killed in between).
function Local:find_unrecorded(inst, p)
  local dir = self:process_dir(inst, p)
  return self:our_processes(function(d) return d == dir end)[1]
end

-- Directories searched for a bare command name after PATH: /usr/lib/<pkg>/bin and
-- /usr/lib/<pkg>/<version>/bin (where Debian puts postgresql's servers), newest version first.
local function lib_bins(name)
  local found = {}
  local function probe(dir)
    local path = dir .. "/" .. name
    if lfs.attributes(path, "mode") == "file" then found[#found + 1] = path end
  end
  local ok, iter, state = pcall(lfs.dir, "/usr/lib")
  if not ok then return found end
  for pkg in iter, state do
    local pdir = "/usr/lib/" .. pkg
    if pkg:sub(1, 1) ~= "." and lfs.attributes(pdir, "mode") == "directory" then
      probe(pdir .. "/bin")
      for version in lfs.dir(pdir) do
        if version:match("^%d[%w%.]*$") then probe(pdir .. "/" .. version .. "/bin") end
      end
    end
  end
  -- newest version first: compare the numeric parts
  local function key(path) return tonumber(path:match("/(%d+)[%w%.]*/bin/[^/]+$") or "-1") end
  table.sort(found, function(a, b) return key(a) > key(b) or (key(a) == key(b) and a < b) end)
  return found
end

--- The absolute path a declared command resolves to: an absolute path as it is, a bare name on
-- PATH, then under /usr/lib/<pkg>[/<version>]/bin. Returns path | nil, message.
function Local.resolve(name)
  if type(name) ~= "string" or name == "" then return nil, "a command must be a name or an absolute path" end
  if name:find("/", 1, true) then
    if name:sub(1, 1) ~= "/" then return nil, "command '" .. name .. "' must be a bare name or an absolute path" end
    if lfs.attributes(name, "mode") ~= "file" then return nil, "command '" .. name .. "' is not installed" end
    return name
  end
  for dir in (os.getenv("PATH") or "/usr/local/bin:/usr/bin:/bin"):gmatch("[^:]+") do
    if lfs.attributes(dir .. "/" .. name, "mode") == "file" then return dir .. "/" .. name end
  end
  local found = lib_bins(name)
  if found[1] then return found[1] end
  return nil, "command '" .. name .. "' is not installed (not on PATH nor under /usr/lib/*/bin)"
end

--- Whether the operator approved command `name` (targets.local.commands, FORGE_LOCAL_COMMANDS):
-- a service script only declares commands, and this list is what keeps it from running anything
-- else. Entries are names or absolute paths. Returns the path to execute | nil, message.
function Local:approved(name)
  if type(name) ~= "string" then return nil, "a command's argv must be a list of strings" end
  local path, err = Local.resolve(name)
  for _, c in ipairs(self.cfg.commands or {}) do
    if c == name or (path and c == path) then
      if not path then return nil, err end
      return path
    end
  end
  return nil, string.format("command '%s' is not approved on the local target (targets.local.commands)", name)
end

--- Check every executable a deployment (or a list of commands) names: declared by the service
-- (service.commands) and approved by the operator. Returns true | nil, message.
function Local:check_commands(declared, deployment, runs)
  local set = {}
  for _, c in ipairs(declared or {}) do set[c] = true end
  for _, exe in ipairs(contract.executables(deployment, runs)) do
    if not set[exe] then return nil, "command '" .. exe .. "' is not declared in the service's commands list" end
    local ok, err = self:approved(exe)
    if not ok then return nil, err end
  end
  return true
end

--- The user an instance's processes and commands run as: nil when the broker is not root (they
-- run as the broker's user); else the plan's or service's `user` if the operator allows it
-- (targets.local.users), else targets.local.user (a system user created on first use).
-- Returns name | nil | false, message.
function Local:run_as(script, plan)
  if proc.geteuid() ~= 0 then return nil end
  local wanted = plan and plan.user or script and script.user
  if wanted then
    if not self:allows_user(wanted) then
      return false, string.format("user '%s' is not allowed on the local target (targets.local.users)", wanted)
    end
    if wanted == "root" then return false, "services never run as root" end
    if not proc.user(wanted) then return false, "user '" .. wanted .. "' does not exist on this machine" end
    return wanted
  end
  return Local.ensure_user(self.cfg.user)
end

--- Whether the operator lets services ask for `user` (targets.local.users).
function Local:allows_user(user)
  for _, u in ipairs(self.cfg.users or {}) do
    if u == user then return true end
  end
  return false
end

--- The default service user, created as a system user (no login, no home) when missing.
-- Returns name | false, message.
function Local.ensure_user(name)
  if proc.user(name) then return name end
  local res, err = proc.run { argv = { "useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent",
    "--shell", "/usr/sbin/nologin", name }, env = { PATH = "/usr/sbin:/usr/bin:/sbin:/bin" }, timeout = 30 }
  if proc.user(name) then
    log.info("created the service user", { user = name })
    return name
  end
  return false, string.format("cannot create the service user '%s': %s", name,
    res and (res.stderr ~= "" and res.stderr or ("exit " .. tostring(res.code))) or tostring(err and err.message or err))
end

function Local:spawn(inst, p)
  local path, why = self:approved(p.argv[1])
  if not path then return nil, why end
  local dir = self:process_dir(inst, p)
  local ok, err = true, nil
  if not lfs.attributes(dir, "mode") then ok, err = util.mkdirs(dir) end
  -- failpoint for the crash-recovery spec: die between the mkdir and the chown
  if os.getenv("FORGE_FAILPOINT") == "after_mkdir" then os.exit(99, false) end
  -- handed over on every spawn: a broker killed between the mkdir (0700 under our umask) and
  -- the chown left a directory the service user cannot enter
  if ok and inst.run_as then ok, err = proc.chown(dir, inst.run_as) end
  if not ok then return nil, "cannot create " .. dir .. ": " .. tostring(err and err.message or err) end
  local env = { PATH = os.getenv("PATH") or "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", FORGE_PROCESS = dir }
  for k, v in pairs(p.env or {}) do env[k] = v end
  local opts = { argv = { path, table.unpack(p.argv, 2) }, cwd = dir, env = env, user = inst.run_as,
    stdout = self:instance_dir(inst.id) .. "/" .. p.name .. ".log" }
  ok, err = self:confine(inst, opts)
  if not ok then return nil, err end
  local rec, serr = proc.spawn(opts)
  if rec and opts.namespaces then rec.isolated = true end
  return rec, serr
end

-- The process of `inst` whose namespaces a command joins: `p`'s when it runs isolated, else the
-- first isolated one that is alive, else nil (the command gets a sandbox of its own).
local function sandbox_of(inst, p)
  local recs = inst.processes or {}
  local function live(rec) return rec and rec.isolated and proc.alive(rec.pid, rec.start_time) and rec end
  if p and live(recs[p.name]) then return recs[p.name] end
  for _, q in ipairs((inst.deployment or {}).processes or {}) do
    if live(recs[q.name]) then return recs[q.name] end
  end
end

-- The first directory above `dir` that `user` cannot pass through (no search permission for
-- others, and not the user's own), or nil.
local function closed_ancestor(dir, user)
  local path = ""
  for part in dir:gmatch("[^/]+") do
    path = path .. "/" .. part
    local perms, uid = lfs.attributes(path, "permissions"), lfs.attributes(path, "uid")
    if perms and perms:sub(9, 9) ~= "x" and uid ~= user.uid then return path end
  end
end

-- Why `user` cannot reach the instances dir (a directory above it is closed to it), or nil.
local function unreachable_by(self, user)
  local closed = closed_ancestor(self.dir, proc.user(user) or {})
  if closed then
    return string.format("the service user %s cannot reach %s: %s is closed to other users (give it o+x, "
      .. "or put state_dir elsewhere)", user, self.dir, closed)
  end
end

--- Why the service user (targets.local.user) cannot reach the instances dir, so that every
-- provision here would fail; nil when it can, or when the broker is not root (readiness).
function Local:unreachable()
  if proc.geteuid() ~= 0 then return nil end
  return unreachable_by(self, self.cfg.user)
end

-- The instance's directory belongs to the user its processes run as, and only to it.
function Local:own(inst)
  if not inst.run_as then return true end
  proc.chmod(self.dir, tonumber("711", 8))   -- instances/: passable, not listable
  local closed = unreachable_by(self, inst.run_as)
  if closed then return nil, closed end
  local dir = self:instance_dir(inst.id)
  local ok, err = proc.chown(dir, inst.run_as, true)
  if not ok then return nil, "cannot hand " .. dir .. " to user " .. inst.run_as .. ": " .. tostring(err.message or err) end
  ok, err = proc.chmod(dir, tonumber("700", 8))
  if not ok then return nil, tostring(err.message or err) end
  return true
end

--- Write the deployment's files: `files` always, `seed_files` only where absent (state the
-- service keeps changing, e.g. redis ACL files, survives restarts and redeploys). A first
-- provision starts from an empty directory (a failed earlier attempt leaves nothing behind).
function Local:write_files(inst)
  local dir = self:instance_dir(inst.id)
  if inst.operation.type == "provision" then util.remove_tree(dir) end
  local ok, err = util.mkdirs(dir)
  if not ok then return nil, err end
  for _, p in ipairs(inst.deployment.processes) do
    for kind, always in pairs({ files = true, seed_files = false }) do
      for rel, content in pairs(p[kind] or {}) do
        if type(rel) ~= "string" or rel:find("%.%.") or rel:sub(1, 1) == "/" or type(content) ~= "string" then
          return nil, "file '" .. tostring(rel) .. "' must be a relative path inside the instance dir with text content"
        end
        local path = dir .. "/" .. rel
        if always or not lfs.attributes(path, "mode") then
          local wok, werr = write_file(path, content)
          if not wok then return nil, "cannot write " .. rel .. ": " .. tostring(werr) end
        end
      end
    end
  end
  return true
end

--- Remove the directories of processes a redeploy dropped (and their init records).
function Local:remove_stale(inst)
  local keep = {}
  for _, p in ipairs(inst.deployment.processes) do keep[p.name] = true end
  for name in pairs((inst.previous or {}).processes or {}) do
    if not keep[name] then
      util.remove_tree(self:process_dir(inst, { name = name }))
      os.remove(self:instance_dir(inst.id) .. "/" .. name .. ".log")
      if inst.initialized then inst.initialized[name] = nil end   -- re-added later: init again
    end
  end
end

--- Run a command declared by a service (health check, setup, bind/unbind step, init): either a
-- helper process, cmd = {argv, env, stdin, expect = {lua patterns, one per output line},
-- tolerate = {patterns}}, or commands the broker speaks itself: cmd = {redis = {...}} or
-- cmd = {pg = {...}} (forge.targets.wire).
-- Helper processes run as `inst.run_as`, in `cwd` when given, for at most `timeout` seconds, in
-- the instance's cgroups and inside the namespaces of its process `p` (or another of its processes).
function Local:run(cmd, inst, cwd, timeout, p)
  if cmd.redis or cmd.pg then return wire.run(cmd, self.cfg.host, self.cfg.command_timeout) end
  local path, why = self:approved(type(cmd.argv) == "table" and cmd.argv[1])
  if not path then return nil, why end
  local env = { PATH = os.getenv("PATH") or "/usr/bin:/bin" }
  for k, v in pairs(cmd.env or {}) do env[k] = v end
  local opts = { argv = { path, table.unpack(cmd.argv, 2) }, env = env, stdin = cmd.stdin, cwd = cwd,
    user = inst and inst.run_as, timeout = timeout or self.cfg.command_timeout }
  if inst then
    local ok, cerr = self:confine(inst, opts, sandbox_of(inst, p))
    if not ok then return nil, cmd.argv[1] .. ": " .. cerr end
  end
  local res, err = proc.run(opts)
  if not res then return nil, cmd.argv[1] .. ": " .. tostring(err and err.message or err) end
  if res.code ~= 0 then
    -- a failure whose output matches a `tolerate` pattern is the state already reached
    -- (idempotent setup steps: "already exists")
    for _, pattern in ipairs(cmd.tolerate or {}) do
      if (res.stderr .. res.stdout):match(pattern) then return true end
    end
    return nil, string.format("%s exited with %s: %s", cmd.argv[1],
      res.code and tostring(res.code) or ("signal " .. tostring(res.signal)),
      last_lines(res.stderr ~= "" and res.stderr or res.stdout):sub(-600))
  end
  local i = 0
  for line in (res.stdout .. "\n"):gmatch("([^\n]*)\n") do
    i = i + 1
    local want = cmd.expect and cmd.expect[i]
    if want and not line:match(want) then
      return nil, string.format("%s: unexpected reply %q", cmd.argv[1], line:sub(1, 200))
    end
  end
  if cmd.expect and i < #cmd.expect then return nil, cmd.argv[1] .. ": missing replies" end
  return true
end

--- Run a list of commands in order (as inst's user); the first failure stops and is returned.
function Local:run_all(cmds, inst)
  for _, cmd in ipairs(cmds or {}) do
    local ok, err = self:run(cmd, inst)
    if not ok then return nil, err end
  end
  return true
end

-- Whether process p answers its health check. A tcp check means "the port is open"; a
-- command or redis check is the way to say "ready". Returns true | nil, what the check said.
function Local:healthy(inst, p)
  local h = p.health
  if not h then return true end
  if h.tcp then
    if proc.tcp_check(self.cfg.host, h.tcp, 1) then return true end
    return nil, string.format("port %d on %s is not open", h.tcp, self.cfg.host)
  end
  return self:run(h, inst, nil, nil, p)
end

-- The first process named in p.after that is not healthy yet (p starts, and runs its init, only
-- once all of them are), or nil.
local function waits_for(inst, p)
  for _, name in ipairs(p.after or {}) do
    local rec = inst.processes[name]
    if not (rec and rec.healthy) then return name end
  end
end

-- Remove `rel` from inst's directory: what an init command killed with the broker half-way left.
function Local:empty(inst, rel)
  local path, err = self:path_in(inst, rel)
  if path then path, err = util.remove_tree(path) end
  if not path then return nil, "fresh: " .. err end
  return true
end

-- Run p's init commands once, before its first start: each is skipped when its `creates` path
-- exists in the instance dir, and starts on an empty `fresh` path. Returns true | nil, message with the command's last output.
function Local:init(inst, p)
  local dir = self:instance_dir(inst.id)
  for i, cmd in ipairs(p.init or {}) do
    if not (cmd.creates and lfs.symlinkattributes(dir .. "/" .. cmd.creates, "mode")) then
      local ok, err = true, nil
      if cmd.fresh then ok, err = self:empty(inst, cmd.fresh) end
      if ok then ok, err = self:run(cmd, inst, dir, self.cfg.init_timeout) end
      if not ok then return nil, string.format("%s: init[%d]: %s", p.name, i, err) end
    end
  end
  return true
end

-- Start process p of inst: adopt it if it was spawned but never recorded, else run its init
-- commands (once) and spawn it. record() persists each step. Returns true | nil, reason.
function Local:start(inst, p, record)
  local rec = self:find_unrecorded(inst, p)
  if not rec then
    if not inst.initialized[p.name] and p.init then
      local ok, err = self:init(inst, p)
      if not ok then return nil, err end
      inst.initialized[p.name] = true
      record(nil, nil, nil, p.name)
    end
    local spawned, err = self:spawn(inst, p)
    if not spawned then return nil, p.name .. ": " .. tostring(err and err.message or err) end
    rec = spawned
    -- failpoint for the crash-recovery spec: die between spawn and journal
    if os.getenv("FORGE_FAILPOINT") == "after_spawn" then os.exit(99, false) end
  end
  inst.processes[p.name] = rec
  record(p.name, rec)
  return true
end

--- Advance a provision: write files, run init commands, spawn what is not running, check
-- health, then setup. record(name, identity, files_written, initialized) persists progress.
-- @return "done" | "wait" | "failed", reason [, the waiting process's last log lines]
function Local:step_provision(inst, record)
  inst.processes = inst.processes or {}
  inst.initialized = inst.initialized or {}
  if not inst.files_written then
    local ok, err = self:write_files(inst)
    if ok then ok, err = self:own(inst) end
    if not ok then return "failed", err end
    record(nil, nil, true)
  end
  -- start every process that may start, then check health: a member of a quorum cluster only
  -- gets healthy once the others run
  local waiting, waiting_log
  for _, p in ipairs(inst.deployment.processes) do
    if not inst.processes[p.name] then
      local blocker = waits_for(inst, p)
      if blocker then
        waiting = waiting or string.format("%s waits for %s to be healthy", p.name, blocker)
      else
        local ok, err = self:start(inst, p, record)
        if not ok then return "failed", err end
      end
    end
  end
  for _, p in ipairs(inst.deployment.processes) do
    local rec = inst.processes[p.name]
    local logfile = self:instance_dir(inst.id) .. "/" .. p.name .. ".log"
    if rec and not proc.alive(rec.pid, rec.start_time) then
      local why = self:memory_kill(inst) or tail(logfile)
      -- servers say it a few lines before their last words: the reconciler moves such a provision
      if not why:find("Address already in use", 1, true)
          and last_bytes(logfile, 4096):find("Address already in use", 1, true) then
        why = why .. " (Address already in use)"
      end
      return "failed", string.format("%s exited during start-up%s", p.name, why ~= "" and (": " .. why) or "")
    end
    if rec and not rec.healthy then
      local ok, err = self:healthy(inst, p)
      if ok then
        rec.healthy = true
        record(p.name, rec)
      elseif not waiting then
        waiting = string.format("%s not healthy yet: %s", p.name, tostring(err))
        local log_tail = tail(logfile)
        if log_tail ~= "" then waiting_log = p.name .. "'s log: " .. log_tail end
      end
    end
  end
  if not waiting and inst.deployment.setup then
    -- one-time setup once everything answers (idempotent: it reruns after a broker crash);
    -- a failure is retried until the deploy timeout, as servers may still be warming up
    local ok, err = self:run_all(inst.deployment.setup, inst)
    if not ok then
      log.warn("setup not done yet, will retry", { instance = inst.id, error = err })
      return "wait", "setup: " .. err
    end
  end
  if waiting then return "wait", waiting, waiting_log end
  return "done"
end

--- Stop every process of the instance (TERM, wait, KILL): the recorded ones and any of the
-- deployment's that were spawned but never recorded.
function Local:stop_all(inst)
  local targets = {}
  for name, rec in pairs(inst.processes or {}) do targets[name] = rec end
  for _, p in ipairs((inst.deployment or {}).processes or {}) do
    local rec = targets[p.name]
    if not rec or not proc.alive(rec.pid, rec.start_time) then targets[p.name] = self:find_unrecorded(inst, p) end
  end
  -- the deployment's processes last to first (a cluster's first member goes last), then any
  -- recorded process the deployment no longer names
  local order, spec = {}, {}
  local procs = (inst.deployment or {}).processes or {}
  for i = #procs, 1, -1 do order[#order + 1], spec[procs[i].name] = procs[i].name, procs[i] end
  for name in pairs(targets) do if not spec[name] then order[#order + 1] = name end end
  for _, name in ipairs(order) do
    local rec = targets[name]
    if rec and proc.alive(rec.pid, rec.start_time) then
      local p = spec[name] or {}
      local ok, err = proc.stop(rec.pid, rec.start_time, p.stop_timeout or self.cfg.stop_timeout, p.stop_signal)
      if not ok then return nil, name .. ": " .. tostring(err and err.message or err) end
    end
  end
  return self:release(inst)
end

--- Remove the directory of instance `id` (its processes are stopped).
function Local:remove_dir(id) util.remove_tree(self:instance_dir(id)) end

--- Stop everything and remove the instance's directory.
function Local:destroy(inst)
  local ok, err = self:stop_all(inst)
  if not ok then return nil, err end
  self:remove_dir(inst.id)
  return true
end

-- Why process p of inst died, for its operation's description: its memory limit, or its last
-- words; and the kind of death for the metrics ("memory_limit" or "exited").
function Local:death(inst, p)
  local reason = self:memory_kill(inst)
  if reason then return reason, "memory_limit" end
  local words = tail(self:instance_dir(inst.id) .. "/" .. p.name .. ".log")
  return "exited" .. (words ~= "" and (": " .. words) or ""), "exited"
end

--- Restart dead processes of a running instance, with exponential backoff; the instance's
-- operation description says which one died and why.
-- @return true if inst.processes (or inst.health, inst.operation.description) changed
function Local:supervise(inst, now)
  local changed = false
  for _, p in ipairs(inst.deployment.processes) do
    local rec = inst.processes[p.name]
    if rec and not proc.alive(rec.pid, rec.start_time) and (rec.retry_at or 0) <= now then
      local restarts = (rec.restarts or 0) + 1
      local why, kind = self:death(inst, p)
      local spawned, err = self:spawn(inst, p)
      inst.operation.description = string.format("process %s %s; %s (%d restart%s)", p.name, why,
        spawned and "restarted" or "restarting", restarts, restarts == 1 and "" or "s")
      log.warn("process died, restarting", { instance = inst.id, process = p.name, restarts = restarts, reason = why,
        error = spawned == nil and tostring(err and err.message or err) or nil })
      telemetry.restarted(inst.service, kind)
      local nrec = spawned or { pid = 0, start_time = 0 }
      nrec.restarts = restarts
      nrec.retry_at = now + math.min(60, 2 ^ math.min(restarts, 6))
      nrec.healthy = true
      inst.processes[p.name] = nrec
      changed = true
    end
  end
  return changed
end

return Local
