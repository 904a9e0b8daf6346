--- The `local` target: a deployment is a set of processes on this machine.
--
-- A service's deploy hook renders {processes = {{name, argv, env, files, health}}}; this driver
-- allocates ports from the configured pool, writes the files under the instance's directory,
-- spawns each process in its own session with a FORGE_PROCESS marker in its environment,
-- waits for health, supervises (restart with backoff) and stops (TERM, wait, KILL).
-- Process identity is pid + start time, so a restarted broker adopts live processes and
-- never signals a recycled pid; a process spawned just before a crash is found by its marker.
local lfs = require "lfs"
local proc = require "forge.proc"
local resp = require "forge.resp"
local log = require "forge.log"
local model = require "forge.model"

local Local = {}
Local.__index = Local

--- New driver for the target config `cfg` (targets.local) and the broker's state dir.
function Local.new(cfg, state_dir)
  return setmetatable({ cfg = cfg, dir = state_dir .. "/instances" }, Local)
end

function Local:instance_dir(id) return self.dir .. "/" .. id end

-- mkdir -p
local function mkdirs(path)
  local cur = ""
  for part in path:gmatch("[^/]+") do
    cur = cur .. "/" .. part
    if not lfs.attributes(cur, "mode") then
      local ok, err = lfs.mkdir(cur)
      if not ok and not lfs.attributes(cur, "mode") then return nil, err end
    end
  end
  return true
end

-- rm -r (does not follow symlinks)
local function remove_tree(path)
  local mode = lfs.symlinkattributes(path, "mode")
  if not mode then return true end
  if mode == "directory" then
    for entry in lfs.dir(path) do
      if entry ~= "." and entry ~= ".." then remove_tree(path .. "/" .. entry) end
    end
    return lfs.rmdir(path)
  end
  return os.remove(path)
end

local function write_file(path, content)
  local dir = path:match("^(.*)/[^/]*$")
  local ok, err = mkdirs(dir)
  if not ok then return nil, err end
  local tmp = path .. ".tmp"
  local f, ferr = io.open(tmp, "wb")
  if not f then return nil, ferr end
  f:write(content)
  f:close()
  return os.rename(tmp, path)
end

-- The last few lines of a log file, on one line: the reason a process gave for dying.
local function tail(path)
  local f = io.open(path, "rb")
  if not f then return "" end
  local size = f:seek("end")
  f:seek("set", math.max(0, size - 600))
  local lines = {}
  for line in (f:read("a") or ""):gmatch("[^\n]+") do
    line = line:gsub("^%s+", ""):gsub("%s+$", "")
    if line ~= "" then lines[#lines + 1] = line end
  end
  f:close()
  return table.concat(lines, " / ", math.max(1, #lines - 2))
end

--- Ports needed for a deployment, as the service says (default 1).
function Local:allocate_ports(db, count)
  local used = {}
  for _, kv in ipairs(model.range(db, "port/")) do used[tonumber(kv.key:sub(6))] = true end
  local ports = {}
  for p = self.cfg.ports.from, self.cfg.ports.to do
    if #ports == count then break end
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

-- A process of ours whose spawn was never recorded (broker killed in between): find it by its
-- working directory, or by the FORGE_PROCESS marker for processes that change directory.
-- (Some servers, redis among them, overwrite their environment for the process title.)
function Local:find_unrecorded(inst, p)
  local dir = self:process_dir(inst, p)
  local needle = "FORGE_PROCESS=" .. dir .. "\0"
  for entry in lfs.dir("/proc") do
    if entry:match("^%d+$") then
      local found = lfs.symlinkattributes("/proc/" .. entry .. "/cwd", "target") == dir
      if not found then
        local f = io.open("/proc/" .. entry .. "/environ", "rb")
        if f then
          found = (f:read("a") or ""):find(needle, 1, true) ~= nil
          f:close()
        end
      end
      if found then
        local pid = tonumber(entry)
        local start = proc.identity(pid)
        if start then return { pid = pid, start_time = start } end
      end
    end
  end
end

--- Whether argv names an executable this target may start (targets.local.commands): a service
-- script only declares commands, and this list is what keeps it from declaring anything else.
-- @return true | nil, message
function Local:allowed(argv)
  local exe = type(argv) == "table" and argv[1]
  if type(exe) ~= "string" then return nil, "a command's argv must be a list of strings" end
  for _, c in ipairs(self.cfg.commands or {}) do
    if exe == c then return true end
  end
  return nil, string.format("command '%s' is not allowed on the local target (targets.local.commands)", exe)
end

--- Check every command a deployment declares (processes, health checks, setup) before anything
-- is stored. Returns true | nil, message.
function Local:check_deployment(deployment)
  for _, p in ipairs(deployment.processes) do
    local ok, err = self:allowed(p.argv)
    if not ok then return nil, "process " .. tostring(p.name) .. ": " .. err end
    if type(p.health) == "table" and p.health.argv then
      ok, err = self:allowed(p.health.argv)
      if not ok then return nil, "health check of " .. tostring(p.name) .. ": " .. err end
    end
  end
  for _, cmd in ipairs(deployment.setup or {}) do
    if cmd.argv then
      local ok, err = self:allowed(cmd.argv)
      if not ok then return nil, "setup: " .. err end
    end
  end
  return true
end

function Local:spawn(inst, p)
  local allowed, why = self:allowed(p.argv)
  if not allowed then return nil, why end
  local dir = self:process_dir(inst, p)
  local ok, err = mkdirs(dir)
  if not ok then return nil, "cannot create " .. dir .. ": " .. tostring(err) end
  local env = { PATH = os.getenv("PATH") or "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", FORGE_PROCESS = dir }
  for k, v in pairs(p.env or {}) do env[k] = v end
  return proc.spawn { argv = p.argv, cwd = dir, env = env, stdout = self:instance_dir(inst.id) .. "/" .. p.name .. ".log" }
end

--- Write the deployment's files: `files` always, `seed_files` only where absent (state the
-- service keeps changing, e.g. redis ACL files, survives restarts and redeploys). A first
-- provision starts from an empty directory (a failed earlier attempt leaves nothing behind).
function Local:write_files(inst)
  local dir = self:instance_dir(inst.id)
  if inst.operation.type == "provision" then remove_tree(dir) end
  local ok, err = mkdirs(dir)
  if not ok then return nil, "cannot create " .. dir .. ": " .. tostring(err) end
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

--- Remove the directories of processes a redeploy dropped.
function Local:remove_stale(inst)
  local keep = {}
  for _, p in ipairs(inst.deployment.processes) do keep[p.name] = true end
  for name in pairs((inst.previous or {}).processes or {}) do
    if not keep[name] then
      remove_tree(self:process_dir(inst, { name = name }))
      os.remove(self:instance_dir(inst.id) .. "/" .. name .. ".log")
    end
  end
end

-- Commands whose second word names a subcommand ("ACL SETUSER"): part of the command's name.
local CONTAINERS = { ACL = true, CLIENT = true, CLUSTER = true, COMMAND = true, CONFIG = true, DEBUG = true,
  FUNCTION = true, LATENCY = true, MEMORY = true, MODULE = true, OBJECT = true, PUBSUB = true, SCRIPT = true,
  SLOWLOG = true, XGROUP = true, XINFO = true }

-- How messages name a redis command: its name, never its arguments (they may hold secrets).
local function redis_command_name(c)
  local name = type(c) == "table" and tostring(c[1]):upper() or "?"
  if CONTAINERS[name] and type(c[2]) == "string" then name = name .. " " .. c[2]:upper():sub(1, 32) end
  return name
end

-- A reply as the text its expect pattern is matched against: strings as they are, integers
-- via tostring, a nil reply as "(nil)", an array as its elements one per line.
local function reply_text(r)
  if type(r) == "table" then
    local parts = {}
    for i, v in ipairs(r) do parts[i] = reply_text(v) end
    return table.concat(parts, "\n")
  end
  if r == false then return "(nil)" end
  return tostring(r)
end

-- A declared redis command list, spoken natively (forge.resp): no redis-cli process.
-- r = {host (default: the target's host), port, user, password, commands = {{"PING"}, ...},
--      expect = {lua patterns, one per reply}}
function Local:run_redis(r)
  local host = r.host or self.cfg.host
  local where = string.format("redis %s:%s", tostring(host), tostring(r.port))
  local ok, replies, err = pcall(resp.call, { host = host, port = r.port, user = r.user, password = r.password,
    commands = r.commands, timeout = self.cfg.command_timeout })
  if not ok then return nil, where .. ": bad command: " .. tostring(replies) end
  if not replies then return nil, where .. ": " .. tostring(err) end
  for i, reply in ipairs(replies) do
    local want = r.expect and r.expect[i]
    if type(reply) == "table" and reply.err then
      return nil, string.format("%s: %s: error reply %q", where, redis_command_name(r.commands[i]),
        tostring(reply.err):sub(1, 200))
    end
    local text = reply_text(reply)
    if want and not text:match(want) then
      return nil, string.format("%s: %s: unexpected reply %q", where, redis_command_name(r.commands[i]),
        text:sub(1, 200))
    end
  end
  if r.expect and #replies < #r.expect then return nil, where .. ": missing replies" end
  return true
end

--- Run a command declared by a service (health check, bind/unbind step): either a helper
-- process, cmd = {argv, env, stdin, expect = {lua patterns, one per output line}}, or redis
-- commands spoken by the broker itself, cmd = {redis = {host, port, user, password, commands,
-- expect = {lua patterns, one per reply}}} (see Local:run_redis).
function Local:run(cmd)
  if cmd.redis then return self:run_redis(cmd.redis) end
  local allowed, why = self:allowed(cmd.argv)
  if not allowed then return nil, why end
  local env = { PATH = os.getenv("PATH") or "/usr/bin:/bin" }
  for k, v in pairs(cmd.env or {}) do env[k] = v end
  local res, err = proc.run { argv = cmd.argv, env = env, stdin = cmd.stdin, timeout = self.cfg.command_timeout }
  if not res then return nil, tostring(err and err.message or err) end
  if res.code ~= 0 then
    -- a failure whose output matches a `tolerate` pattern is the state already reached
    -- (idempotent setup steps: "already exists")
    for _, pattern in ipairs(cmd.tolerate or {}) do
      if (res.stderr .. res.stdout):match(pattern) then return true end
    end
    return nil, string.format("%s exited with %s: %s", cmd.argv[1], tostring(res.code or res.signal),
      (res.stderr ~= "" and res.stderr or res.stdout):sub(1, 300))
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

--- Run a list of commands in order; the first failure stops and is returned.
function Local:run_all(cmds)
  for _, cmd in ipairs(cmds or {}) do
    local ok, err = self:run(cmd)
    if not ok then return nil, err end
  end
  return true
end

local function healthy(self, p)
  local h = p.health
  if not h then return true end
  if h.tcp then return proc.tcp_check(self.cfg.host, h.tcp, 1) end
  return self:run(h) ~= nil
end

--- Advance a provision. Spawns what is not running, checks health.
-- record(name, identity) persists a spawned process at once.
-- @return "done" | "wait" | "failed", reason
function Local:step_provision(inst, record)
  inst.processes = inst.processes or {}
  if not inst.files_written then
    local ok, err = self:write_files(inst)
    if not ok then return "failed", err end
    record(nil, nil, true)
  end
  local all_healthy = true
  for _, p in ipairs(inst.deployment.processes) do
    local rec = inst.processes[p.name]
    if not rec then
      rec = self:find_unrecorded(inst, p)
      if not rec then
        local spawned, err = self:spawn(inst, p)
        if not spawned then return "failed", p.name .. ": " .. tostring(err and err.message or err) end
        rec = spawned
        -- failpoint for the crash-recovery spec: die between spawn and journal
        if os.getenv("FORGE_FAILPOINT") == "after_spawn" then os.exit(99, false) end
      end
      inst.processes[p.name] = rec
      record(p.name, rec)
    end
    if not proc.alive(rec.pid, rec.start_time) then
      local why = tail(self:instance_dir(inst.id) .. "/" .. p.name .. ".log")
      return "failed", string.format("%s exited during start-up%s", p.name, why ~= "" and (": " .. why) or "")
    end
    if not rec.healthy then
      if healthy(self, p) then
        rec.healthy = true
        record(p.name, rec)
      else
        all_healthy = false
      end
    end
  end
  if all_healthy and inst.deployment.setup then
    -- one-time setup once everything answers (idempotent: it reruns after a broker crash);
    -- a failure is retried until the deploy timeout, as servers may still be warming up
    local ok, err = self:run_all(inst.deployment.setup)
    if not ok then
      log.warn("setup not done yet, will retry", { instance = inst.id, error = err })
      return "wait", "setup: " .. err
    end
  end
  return all_healthy and "done" or "wait"
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
  for name, rec in pairs(targets) do
    if rec and proc.alive(rec.pid, rec.start_time) then
      local ok, err = proc.stop(rec.pid, rec.start_time, self.cfg.stop_timeout)
      if not ok then return nil, name .. ": " .. tostring(err and err.message or err) end
    end
  end
  return true
end

--- Stop everything and remove the instance's directory.
function Local:destroy(inst)
  local ok, err = self:stop_all(inst)
  if not ok then return nil, err end
  remove_tree(self:instance_dir(inst.id))
  return true
end

--- Restart dead processes of a running instance, with exponential backoff.
-- @return true if inst.processes changed
function Local:supervise(inst, now)
  local changed = false
  for _, p in ipairs(inst.deployment.processes) do
    local rec = inst.processes[p.name]
    if rec and not proc.alive(rec.pid, rec.start_time) and (rec.retry_at or 0) <= now then
      local restarts = (rec.restarts or 0) + 1
      local spawned, err = self:spawn(inst, p)
      log.warn("process died, restarting", { instance = inst.id, process = p.name, restarts = restarts,
        error = spawned == nil and tostring(err and err.message or err) or nil })
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
