--- Backups (docs/backups.md): of an instance, through its service's backup and restore hooks
-- (docs/authoring.md), as operations journaled in the instance record like the operator's other
-- actions; on a schedule (`backups:` in forge.yml); and of the broker's own store.
--
-- A backup is a directory <backups.dir>/<instance>/<backup id>/ holding files/<name> and
-- manifest.json (instance, service, plan, service version, time, bindings, each file's size and
-- SHA-256, the instance's secrets sealed with the store's keyring). It is written under a hidden
-- name and renamed into place once complete, so a listed backup is always whole. A restore checks every checksum before it
-- changes anything.
local common = require "forge.osb.common"
local contract = require "forge.contract"
local crypto = require "forge.crypto"
local instances = require "forge.osb.instances"
local lfs = require "lfs"
local log = require "forge.log"
local model = require "forge.model"
local proc = require "forge.proc"
local secrets = require "forge.secrets"
local services = require "forge.services"
local util = require "forge.util"

local fail, key = common.fail, model.key

local M = {}

--- The directory, relative to the instance's, that the broker hands the hooks empty (as
-- ctx.scratch) for dumps and the files a restore puts back, and removes afterwards. No process
-- name starts with a dot, so it is never a process's directory.
M.SCRATCH = ".forge-backup"

local DEFAULT_TIMEOUT = 600
local FORMAT = 1               -- of manifest.json

-- Settings ------------------------------------------------------------------------------------

-- Cron fields: name, lowest, highest (day of week 7 is Sunday too, as cron has it).
local CRON_FIELDS = { { "minute", 0, 59 }, { "hour", 0, 23 }, { "day of month", 1, 31 }, { "month", 1, 12 },
  { "day of week", 0, 7 } }

-- One cron field ("*", "5", "1-5", "*/15", "10-40/10", "5/15", or a comma-separated list of
-- these) as the set of values it names. Returns set | nil, message.
local function cron_field(text, spec)
  local name, lo, hi = spec[1], spec[2], spec[3]
  local set = {}
  for part in (text .. ","):gmatch("([^,]*),") do
    local range, step = part:match("^([^/]+)/(%d+)$")
    range, step = range or part, tonumber(step or "1")
    local a, b
    if range == "*" then
      a, b = lo, hi
    else
      a, b = range:match("^(%d+)%-(%d+)$")
      if not a then
        a = range:match("^(%d+)$")
        b = a and (part:find("/", 1, true) and hi or a)
      end
      a, b = tonumber(a), tonumber(b)
    end
    if not a or a < lo or b > hi or a > b or step < 1 then
      return nil, string.format("%s '%s' is not a value, range or step of %d-%d", name, part, lo, hi)
    end
    for i = a, b, step do set[i] = true end
  end
  return set
end

--- A cron expression ("minute hour day-of-month month day-of-week", numbers only) as a
-- function(t) telling whether the minute of os.date("*t") table t matches. As in cron, when
-- both day fields are restricted a day matching either matches.
-- @return matcher | nil, message
function M.cron(expr)
  local parts = {}
  for f in tostring(expr):gmatch("%S+") do parts[#parts + 1] = f end
  if #parts ~= 5 then
    return nil, "a schedule has 5 fields (minute hour day-of-month month day-of-week), e.g. \"0 3 * * *\""
  end
  local sets = {}
  for i, spec in ipairs(CRON_FIELDS) do
    local set, err = cron_field(parts[i], spec)
    if not set then return nil, err end
    sets[i] = set
  end
  if sets[5][7] then sets[5][0] = true end
  local any_dom, any_dow = parts[3]:sub(1, 1) == "*", parts[5]:sub(1, 1) == "*"
  return function(t)
    local dom, dow = sets[3][t.day] == true, sets[5][t.wday - 1] == true
    local day
    if any_dom or any_dow then day = dom and dow else day = dom or dow end
    return (sets[1][t.min] and sets[2][t.hour] and sets[4][t.month] and day) == true
  end
end

local CONFIG_CHECKS = {
  schedule = function(v)
    if type(v) ~= "string" then return "must be a cron expression (a string)" end
    local ok, err = M.cron(v)
    return not ok and err or nil
  end,
  keep = function(v) return not (math.type(v) == "integer" and v >= 1) and "must be an integer >= 1" or nil end,
  dir = function(v) return not (type(v) == "string" and v ~= "") and "must be a directory path" or nil end,
  timeout = function(v) return not (type(v) == "number" and v > 0) and "must be a number of seconds > 0" or nil end,
}

--- Check the `backups` section of forge.yml ({schedule, keep, dir, timeout}), as forge.config
-- checks a section: (value, path, yaml.kind) -> the section | nil, message.
function M.check_config(v, p, kind)
  if type(v) ~= "table" or kind(v) ~= "map" then return nil, p .. " must be a map" end
  local out = {}
  for k, x in pairs(v) do
    local check = CONFIG_CHECKS[k]
    if not check then return nil, "unknown setting '" .. p .. "." .. tostring(k) .. "'" end
    local err = check(x)
    if err then return nil, p .. "." .. k .. " " .. err end
    out[k] = x
  end
  return out
end

-- The backups settings of a broker config: dir (absolute; relative ones are under the state
-- dir), keep, schedule, timeout.
local function settings(config)
  local s = config.backups or {}
  local dir = s.dir or "backups"
  if dir:sub(1, 1) ~= "/" then dir = config.state_dir .. "/" .. dir end
  return { dir = dir, keep = s.keep, schedule = s.schedule, timeout = s.timeout or DEFAULT_TIMEOUT }
end

-- Files -----------------------------------------------------------------------------------------

local function exists(path) return lfs.symlinkattributes(path, "mode") ~= nil end

-- Copy file `from` to `to` (created with mode 0600). Returns its size | nil, message.
local function copy_file(from, to)
  local src, err = io.open(from, "rb")
  if not src then return nil, "cannot read " .. from .. ": " .. tostring(err) end
  local dst, derr = io.open(to, "wb")
  if not dst then
    src:close()
    return nil, "cannot write " .. to .. ": " .. tostring(derr)
  end
  proc.chmod(to, tonumber("600", 8))
  local size = 0
  while true do
    local chunk = src:read(1048576)
    if not chunk then break end
    local ok, werr = dst:write(chunk)
    if not ok then
      src:close()
      dst:close()
      return nil, "cannot write " .. to .. ": " .. tostring(werr)
    end
    size = size + #chunk
  end
  src:close()
  local ok, cerr = dst:close()
  if not ok then return nil, "cannot write " .. to .. ": " .. tostring(cerr) end
  return size
end

-- The SHA-256 of a file, in hex (sha256sum: forge.crypto hashes strings, not streams).
local function sha256_file(path, timeout)
  local res, err = proc.run { argv = { "sha256sum", "--", path }, env = { PATH = os.getenv("PATH") or "/usr/bin:/bin" },
    timeout = timeout }
  if not res or res.code ~= 0 then
    return nil, "cannot checksum " .. path .. ": " .. tostring(res and res.stderr or (err and err.message or err))
  end
  return res.stdout:match("^(%x+)")
end

-- Write `text` to `path` through a temporary file renamed into place (mode 0600).
local function write_atomically(path, text)
  local tmp = path .. ".tmp"
  local f, err = io.open(tmp, "wb")
  if not f then return nil, "cannot write " .. tmp .. ": " .. tostring(err) end
  proc.chmod(tmp, tonumber("600", 8))
  local ok, werr = f:write(text)
  f:close()
  if not ok then return nil, "cannot write " .. tmp .. ": " .. tostring(werr) end
  local rok, rerr = os.rename(tmp, path)
  if not rok then return nil, "cannot rename " .. tmp .. ": " .. tostring(rerr) end
  return true
end

-- The instance's files, through its local target ---------------------------------------------
--
-- The one place backups reach into an instance's directory: each function takes the target
-- (its instance_dir) and the instance record (its run_as user), so a target that keeps its
-- processes elsewhere can offer the same functions. Paths come from the hooks (relative, no
-- "..", checked by forge.contract); a path through a symlink is refused, since the service's
-- user owns the directory and the broker may run as root.
local Instance = {}

-- Create the parent directories of `rel` that are missing, owned by the instance's user.
function Instance.parents(target, inst, rel)
  local cur = target:instance_dir(inst.id)
  local parts = {}
  for part in rel:gmatch("[^/]+") do parts[#parts + 1] = part end
  for i = 1, #parts - 1 do
    cur = cur .. "/" .. parts[i]
    if not exists(cur) then
      local ok, err = lfs.mkdir(cur)
      if not ok then return nil, "cannot create " .. cur .. ": " .. tostring(err) end
      if inst.run_as then proc.chown(cur, inst.run_as) end
      proc.chmod(cur, tonumber("700", 8))
    end
  end
  return true
end

-- Copy the regular file `rel` of the instance to `dest`. Returns its size | nil, message.
function Instance.copy_out(target, inst, rel, dest)
  local path, err = target:path_in(inst, rel)
  if not path then return nil, err end
  local mode = lfs.symlinkattributes(path, "mode")
  if mode ~= "file" then return nil, rel .. " is " .. (mode and ("a " .. mode) or "missing") .. ", not a file" end
  return copy_file(path, dest)
end

-- Put `content` (a file `from`, or text) at `rel` in the instance's directory, owned by its user.
function Instance.put(target, inst, rel, from, text)
  local path, err = target:path_in(inst, rel)
  if not path then return nil, err end
  local ok, perr = Instance.parents(target, inst, rel)
  if not ok then return nil, perr end
  util.remove_tree(path)
  if from then
    ok, perr = copy_file(from, path)
  else
    ok, perr = write_atomically(path, text)
  end
  if not ok then return nil, perr end
  if inst.run_as then
    local cok, cerr = proc.chown(path, inst.run_as)
    if not cok then return nil, tostring(cerr.message or cerr) end
  end
  return true
end

-- Remove `rel` (a file or a directory tree) from the instance's directory.
function Instance.remove(target, inst, rel)
  local path, err = target:path_in(inst, rel)
  if not path then return nil, err end
  return util.remove_tree(path)
end

-- The scratch directory, emptied and owned by the instance's user.
function Instance.fresh_scratch(target, inst)
  local ok, err = Instance.remove(target, inst, M.SCRATCH)
  if ok then ok, err = Instance.parents(target, inst, M.SCRATCH .. "/x") end
  return ok, err
end

-- Stored backups ------------------------------------------------------------------------------

local function new_id() return "bk-" .. os.date("!%Y%m%dT%H%M%SZ") .. "-" .. crypto.token(3) end

local function instance_backups_dir(cfg, iid) return cfg.dir .. "/" .. iid end

local function entries(dir)
  local list = {}
  if lfs.attributes(dir, "mode") ~= "directory" then return list end
  for e in lfs.dir(dir) do
    if e:sub(1, 1) ~= "." then list[#list + 1] = e end
  end
  table.sort(list)
  return list
end

-- The manifest of the backup in `dir` | nil, message.
local function read_manifest(dir)
  local text = util.read_file(dir .. "/manifest.json")
  if not text then return nil, "its manifest.json is missing" end
  local m = util.json_decode(text)
  if type(m) ~= "table" or m.format ~= FORMAT or type(m.files) ~= "table" or type(m.id) ~= "string" then
    return nil, "its manifest.json is not a backup manifest (corrupt?)"
  end
  return m
end

-- The digest of a backup: the SHA-256 of its file list, one "<sha256>  <name>" line per file in
-- name order (the sha256sum format), so one value names the whole content.
local function digest(files)
  local lines = {}
  for i, f in ipairs(files) do lines[i] = f.sha256 .. "  " .. f.name .. "\n" end
  return crypto.sha256_hex(table.concat(lines))
end

-- Check the files of the backup in `dir` against its manifest: each present with the size it
-- says, and the list matching the manifest's digest; with `timeout`, each file's SHA-256 too
-- (a request checks sizes only, the reconciler everything before it changes anything).
-- Returns true | nil, what is wrong.
local function verify(dir, m, timeout)
  for _, f in ipairs(m.files) do
    if type(f.name) ~= "string" or f.name:find("/", 1, true) or f.name:sub(1, 1) == "." or type(f.sha256) ~= "string" then
      return nil, "its manifest names a bad file '" .. tostring(f.name) .. "'"
    end
  end
  if digest(m.files) ~= m.sha256 then return nil, "its file list does not match the manifest's SHA-256" end
  for _, f in ipairs(m.files) do
    local path = dir .. "/files/" .. f.name
    local size = lfs.symlinkattributes(path, "mode") == "file" and lfs.attributes(path, "size")
    if not size then return nil, "file " .. f.name .. " is missing" end
    if size ~= f.size then
      return nil, string.format("file %s has %d bytes, the manifest says %s (truncated?)", f.name, size, tostring(f.size))
    end
    if timeout then
      local sum, err = sha256_file(path, timeout)
      if not sum then return nil, err end
      if sum ~= f.sha256 then return nil, "file " .. f.name .. " does not match its SHA-256 (corrupt)" end
    end
  end
  return true
end

-- The directory of backup `id`, or nil.
local function locate(cfg, id)
  for _, iid in ipairs(entries(cfg.dir)) do
    local dir = instance_backups_dir(cfg, iid) .. "/" .. id
    if lfs.attributes(dir, "mode") == "directory" then return dir end
  end
end

-- The backup `id`: its directory and manifest | nil, message, "missing" or "corrupt".
local function find(cfg, id)
  local dir = locate(cfg, id)
  if not dir then return nil, "backup " .. id .. " does not exist", "missing" end
  local m, err = read_manifest(dir)
  if not m then return nil, "backup " .. id .. " is refused: " .. err .. "; nothing was changed", "corrupt" end
  return dir, m
end

-- What the admin API shows of a manifest (no secrets, no binding parameters).
local function summary(m)
  local files = {}
  for i, f in ipairs(m.files) do files[i] = { name = f.name, size = f.size, sha256 = f.sha256 } end
  return { id = m.id, instance = m.instance_id, service = m.service, plan = m.plan, version = m.version,
    created_at = m.created_at, by = m.by, size = m.size, sha256 = m.sha256, files = files,
    bindings = #(m.bindings or {}) }
end

-- Every readable backup, of one instance or of all, newest first.
local function all_backups(cfg, iid)
  local list = {}
  for _, inst in ipairs(iid and { iid } or entries(cfg.dir)) do
    local idir = instance_backups_dir(cfg, inst)
    for _, id in ipairs(entries(idir)) do
      local m = read_manifest(idir .. "/" .. id)
      if m then list[#list + 1] = m end
    end
  end
  -- created_at is fractional: two backups made in one second still list newest first
  table.sort(list, function(a, b)
    if a.created_at ~= b.created_at then return (a.created_at or 0) > (b.created_at or 0) end
    return a.id > b.id
  end)
  return list
end

-- Keep the `keep` newest backups of instance `iid`; remove the others.
local function prune(cfg, iid)
  if not cfg.keep then return end
  for i, m in ipairs(all_backups(cfg, iid)) do
    if i > cfg.keep then
      util.remove_tree(instance_backups_dir(cfg, iid) .. "/" .. m.id)
      log.info("old backup removed", { instance = iid, backup = m.id, keep = cfg.keep })
    end
  end
end

-- Hooks ---------------------------------------------------------------------------------------

-- The live bindings of an instance, as hooks see them: {id, parameters}.
local function bindings_of(db, iid)
  local list = {}
  for _, kv in ipairs(model.range(db, key.bindings(iid))) do
    if kv.value.state == "created" then list[#list + 1] = { id = kv.value.id, parameters = kv.value.parameters or {} } end
  end
  return list
end

-- The service of an instance, at the version the instance is pinned to | nil, message.
local function service_of(b, rec)
  local svc = b.registry.by_id[rec.service_id]
  if not svc then return nil, "the service of instance " .. rec.id .. " is no longer in the catalog" end
  local version, err = services.version(svc, rec.script_hash, svc.registry)
  if not version then return nil, err end
  return svc, version
end

-- The context of a backup or restore hook (docs/authoring.md).
local function hook_ctx(b, target, rec, svc)
  return { instance_id = rec.id, plan = svc.plans[rec.plan_id], parameters = rec.parameters or {},
    context = rec.context or {}, host = rec.resources.host, ports = rec.resources.ports,
    dir = target:instance_dir(rec.id), secrets = util.copy(rec.secrets or {}), script_hash = rec.script_hash,
    bindings = bindings_of(b.db, rec.id), scratch = M.SCRATCH }
end

-- Its commands must be declared by the service and approved by the operator.
local function check_commands(target, version, result)
  return target:check_commands(version.script.commands, nil, contract.backup_commands(result))
end

-- What the service's backup hook says to do for `rec`: result, ctx | nil, message.
local function backup_plan(b, target, rec)
  local svc, version = service_of(b, rec)
  if not svc then return nil, version end
  local ctx = hook_ctx(b, target, rec, svc)
  local result, err = services.hook(svc, "backup", ctx)
  if not result then return nil, "service " .. svc.name .. " backup failed: " .. err end
  local ok, cerr = check_commands(target, version, result)
  if not ok then return nil, "service " .. svc.name .. ": " .. cerr end
  return result, ctx
end

-- What a restore of backup `m` into `rec` needs to know of the backup (ctx.backup).
-- The manifest's secrets are sealed with the broker's keyring (`ring`, forge.secrets).
local function backup_info(m, ring)
  local names = {}
  for i, f in ipairs(m.files) do names[i] = f.name end
  local sealed, err = secrets.open_table(ring, "backup/" .. m.id, m.secrets or {})
  if not sealed then error("backup " .. m.id .. ": " .. tostring(err), 0) end
  return { id = m.id, instance_id = m.instance_id, service = m.service, plan = m.plan, version = m.version,
    created_at = m.created_at, files = names, bindings = m.bindings or {}, secrets = sealed }
end

-- What the service's restore hook says to do to put backup `m` into `rec`:
-- result | nil, message, "refused" (the hook refused) or "script" (it failed).
local function restore_plan(b, target, rec, m)
  local svc, version = service_of(b, rec)
  if not svc then return nil, version, "script" end
  local ctx = hook_ctx(b, target, rec, svc)
  ctx.backup = backup_info(m, b.db.ring)
  local result, err, ran = services.call(svc, "restore", ctx)
  if type(result) == "string" then return nil, result, "refused" end
  if result == nil then return nil, "service " .. svc.name .. " restore failed: " .. tostring(err), "script" end
  local problems = contract.all(ran or version, "restore", result, ctx.backup.files)
  if #problems > 0 then
    return nil, "service " .. svc.name .. " restore failed: " .. problems[1]
      .. (#problems > 1 and string.format(" (and %d more)", #problems - 1) or ""), "script"
  end
  local ok, cerr = check_commands(target, version, result)
  if not ok then return nil, "service " .. svc.name .. ": " .. cerr, "script" end
  return result
end

-- Run `cmds` in order in the instance's directory (helper processes for at most `timeout`
-- seconds each); the first failure stops them. Returns true | nil, message.
local function run_commands(target, rec, cmds, timeout)
  for _, cmd in ipairs(cmds or {}) do
    local ok, err = target:run(cmd, rec, target:instance_dir(rec.id), timeout)
    if not ok then return nil, err end
  end
  return true
end

-- Who may be backed up or restored into: a local instance whose pinned service version has the
-- hooks. Returns svc | raises a 409 or 422.
local function eligible(b, rec, what)
  if (rec.target or "local") ~= "local" then
    fail(409, "Conflict", "instance " .. rec.id .. " runs on BOSH target " .. rec.target .. "; " .. what
      .. " is for local instances (back a BOSH deployment up with the director's tools)")
  end
  local svc, version = service_of(b, rec)
  if not svc then fail(409, "Conflict", version) end
  if not version.script.backup or not version.script.restore then
    fail(422, "NotSupported", "service " .. svc.name .. " has no backup and restore hooks")
  end
  return svc
end

-- Operations ----------------------------------------------------------------------------------

local function read_instance(b, id)
  common.check_id(id, "instance id")
  local rec, rev = model.read(b.db, key.instance(id))
  if not rec or rec.state == "deleted" then fail(404, "NotFound", "instance " .. id .. " does not exist") end
  return rec, rev
end

-- Put operation `op` in `rec` (the current one goes to its history) and journal it, with
-- `extra` txn ops. Returns true when the record was still at revision `rev`.
local function journal(b, rec, rev, op, extra)
  common.begin(rec, op)
  return instances.journal(b, rec, rev, {}, extra)
end

local function busy(rec)
  fail(409, "Conflict", "instance " .. rec.id .. " has a " .. rec.operation.type .. " in progress")
end

-- A new backup operation of `rec` (by: who asked, or "schedule").
local function backup_operation(by)
  local op = common.new_operation("backup")
  op.by, op.backup = by, new_id()
  op.description = "writing backup " .. op.backup
  return op
end

--- POST /admin/instances/:id/backup: back the instance up (an operation of type `backup`).
-- @return status, body
function M.backup(b, id, who)
  local rec, rev = read_instance(b, id)
  if common.in_progress(rec.operation) then
    if rec.operation.type == "backup" then
      return 202, { operation = rec.operation.id, type = "backup", backup = rec.operation.backup }
    end
    busy(rec)
  end
  eligible(b, rec, "backup")
  if rec.state ~= "running" then fail(409, "Conflict", "instance " .. id .. " is " .. rec.state .. ", not running") end
  local op = backup_operation(who)
  if not journal(b, rec, rev, op) then fail(409, "Conflict", "instance " .. id .. " changed meanwhile; try again") end
  log.info("backup accepted", { instance = id, operation = op.id, backup = op.backup, by = who })
  return 202, { operation = op.id, type = "backup", backup = op.backup }
end

--- GET /admin/backups[?instance=ID]: the backups, newest first.
function M.list(b, q)
  for k, v in pairs(q) do
    if k ~= "instance" then fail(400, "BadRequest", "unknown query parameter '" .. k .. "'") end
    common.check_id(v, "instance")
  end
  local list = {}
  for i, m in ipairs(all_backups(settings(b.config), q.instance)) do list[i] = summary(m) end
  return 200, { backups = list }
end

-- A restore in flight that reads backup `id`: its instance id, or nil.
local function restoring_from(b, id)
  for _, kv in ipairs(model.range(b.db, "pending/")) do
    local iid = kv.key:sub(#"pending/" + 1)
    local rec = not iid:find("/", 1, true) and model.read(b.db, key.instance(iid))
    local op = rec and rec.operation
    if op and op.type == "restore" and common.in_progress(op) and op.request.backup == id then return iid end
  end
end

--- DELETE /admin/backups/:id: remove a backup (refused while a restore reads it).
function M.delete(b, id)
  common.check_id(id, "backup id")
  local dir = locate(settings(b.config), id)
  if not dir then fail(404, "NotFound", "backup " .. id .. " does not exist") end
  local reader = restoring_from(b, id)
  if reader then fail(409, "Conflict", "instance " .. reader .. " is being restored from backup " .. id) end
  local ok, err = util.remove_tree(dir)
  if not ok then fail(500, "InternalError", err) end
  log.info("backup deleted", { backup = id })
  return 200, { deleted = id }
end

-- Whether a restore may go into `rec`: running, or failed by an earlier restore (which may be
-- repeated, or replaced by another backup).
local function restorable(rec)
  return rec.state == "running" or (rec.state == "failed" and rec.operation.type == "restore")
end

--- POST /admin/backups/:id/restore {to = INSTANCE}: put the backup into an instance of the same
-- service, the one it was taken of or another (an operation of type `restore` on the target).
-- Refused, with nothing changed, when a file is missing or of another size, the service differs
-- or the target's restore hook refuses it; the operation checks every SHA-256 before it changes
-- anything (a request does not wait on hashing a large backup).
function M.restore(b, id, req, who)
  common.check_id(id, "backup id")
  local body = common.body(req)
  for k in pairs(body) do
    if k ~= "to" then fail(400, "BadRequest", "unknown field '" .. tostring(k) .. "' (a restore takes: to)") end
  end
  local to = common.need_string(body, "to")
  common.check_id(to, "to")
  local cfg = settings(b.config)
  local dir, m, missing = find(cfg, id)
  if not dir then fail(missing == "corrupt" and 422 or 404, missing == "corrupt" and "BackupCorrupt" or "NotFound", m) end
  local rec, rev = read_instance(b, to)
  if common.in_progress(rec.operation) then
    if rec.operation.type == "restore" and rec.operation.request.backup == id then
      return 202, { operation = rec.operation.id, type = "restore" }
    end
    busy(rec)
  end
  local svc = eligible(b, rec, "restore")
  if m.service_id ~= rec.service_id then
    fail(422, "IncompatibleBackup", string.format("backup %s is of service %s; instance %s is of service %s",
      id, tostring(m.service), to, svc.name))
  end
  if not restorable(rec) then fail(409, "Conflict", "instance " .. to .. " is " .. rec.state .. ", not running") end
  local ok, why = verify(dir, m)
  if not ok then fail(422, "BackupCorrupt", "backup " .. id .. " is refused: " .. why .. "; nothing was changed") end
  local target = b.targets:of(rec)
  local _, err, kind = restore_plan(b, target, rec, m)
  if kind == "refused" then fail(422, "RestoreRefused", "service " .. svc.name .. " refuses backup " .. id .. ": " .. err) end
  if kind then fail(500, "ServiceScriptError", err) end
  local op = common.new_operation("restore", { backup = id, from = m.instance_id })
  op.by, op.description = who, "restoring backup " .. id .. " of instance " .. m.instance_id
  if not journal(b, rec, rev, op) then fail(409, "Conflict", "instance " .. to .. " changed meanwhile; try again") end
  log.info("restore accepted", { instance = to, operation = op.id, backup = id, from = m.instance_id, by = who })
  return 202, { operation = op.id, type = "restore" }
end

-- The reconciler's side ------------------------------------------------------------------------

local function size_text(n)
  for _, u in ipairs({ { 1073741824, "GiB" }, { 1048576, "MiB" }, { 1024, "KiB" } }) do
    if n >= u[1] then return string.format("%.1f %s", n / u[1], u[2]) end
  end
  return n .. " bytes"
end

-- Copy the files the hook named out of the instance into a new backup, then its manifest, then
-- rename it into place. Returns the manifest | nil, message (nothing is left behind).
local function write_backup(cfg, target, rec, op, result, ctx, ring)
  local idir = instance_backups_dir(cfg, rec.id)
  local partial = idir .. "/." .. op.backup .. ".partial"
  local ok, err = util.mkdirs(partial .. "/files", tonumber("700", 8))
  if not ok then return nil, err end
  local names = {}
  for name in pairs(result.files) do names[#names + 1] = name end
  table.sort(names)
  local files, total = {}, 0
  local function failed(e)
    util.remove_tree(partial)
    return nil, e
  end
  for i, name in ipairs(names) do
    local path = partial .. "/files/" .. name
    local size, cerr = Instance.copy_out(target, rec, result.files[name], path)
    if not size then return failed("copying " .. result.files[name] .. ": " .. cerr) end
    local sum, serr = sha256_file(path, cfg.timeout)
    if not sum then return failed(serr) end
    files[i], total = { name = name, size = size, sha256 = sum }, total + size
  end
  local m = { format = FORMAT, id = op.backup, instance_id = rec.id, service = rec.service, service_id = rec.service_id,
    plan = ctx.plan and ctx.plan.name, plan_id = rec.plan_id, version = rec.script_hash, created_at = proc.time(),
    by = op.by, size = total, sha256 = digest(files), files = files, bindings = ctx.bindings,
    secrets = secrets.seal_table(ring, "backup/" .. op.backup, rec.secrets or {}) }
  ok, err = write_atomically(partial .. "/manifest.json", util.json_encode(m))
  if not ok then return failed(err) end
  ok, err = os.rename(partial, idir .. "/" .. op.backup)
  if not ok then return failed("cannot move the backup into place: " .. tostring(err)) end
  return m
end

-- End backup or restore operation `op` of `rec`: description, and change(r) for the record.
local function finish(r, rec, state, description, change)
  r:finish(key.instance(rec.id), key.pending(rec.id), rec.operation.id, state, description, change or function() end)
  local fields = { instance = rec.id, operation = rec.operation.id, backup = rec.operation.backup
    or rec.operation.request.backup }
  if state == "succeeded" then
    log.info(rec.operation.type .. " succeeded", fields)
  else
    fields.reason = description
    log.warn(rec.operation.type .. " failed", fields)
  end
end

-- A backup: the hook's commands (once), its ready check (polled), the copy. A failed backup
-- leaves the instance as it was.
local function advance_backup(r, rec)
  local op, target, cfg = rec.operation, r:target_of(rec), settings(r.config)
  local function failed(why)
    Instance.remove(target, rec, M.SCRATCH)
    return finish(r, rec, "failed", "backup failed: " .. why)
  end
  if op.cancel_requested then return failed("cancelled by the operator") end
  local result, ctx = backup_plan(r, target, rec)
  if not result then return failed(ctx) end
  if not op.ran_at then
    local ok, err = Instance.fresh_scratch(target, rec)
    if ok then ok, err = run_commands(target, rec, result.run, cfg.timeout) end
    if not ok then return failed(err) end
    rec = r:saver(rec)(function(x) x.operation.ran_at = os.time() end)
    if not rec then return end
  end
  if result.ready then
    local ok, err = target:healthy(rec, { health = result.ready })
    if not ok then
      if os.time() - rec.operation.ran_at > cfg.timeout then
        return failed(string.format("not ready after %ds: %s", cfg.timeout, tostring(err)))
      end
      return r:describe(rec, "waiting for the service to be ready: " .. tostring(err))
    end
  end
  local m, err = write_backup(cfg, target, rec, rec.operation, result, ctx, r.db.ring)
  Instance.remove(target, rec, M.SCRATCH)
  if not m then return failed(err) end
  prune(cfg, rec.id)
  finish(r, rec, "succeeded", string.format("backup %s written: %d file(s), %s", m.id, #m.files, size_text(m.size)))
end

-- A restore that fails: before it changed anything the instance is as it was; after, it is
-- failed (it may hold part of the backup) until a restore succeeds.
local function fail_restore(r, rec, why)
  local changed = rec.operation.changed
  local target = r:target_of(rec)
  Instance.remove(target, rec, M.SCRATCH)
  finish(r, rec, "failed", "restore failed: " .. why .. (changed
    and "; the instance may hold part of the backup: restore it again, or another backup" or "; nothing was changed"),
    function(x)
      if changed then
        x.state = "failed"
        x.operation.instance_usable = false
      end
    end)
end

-- Put the backup's files in place (remove, put, write) and run the prepare commands.
local function place(target, rec, dir, plan, timeout)
  local ok, err = Instance.fresh_scratch(target, rec)
  for _, rel in ipairs(ok and plan.remove or {}) do
    ok, err = Instance.remove(target, rec, rel)
    if not ok then break end
  end
  for rel, name in pairs(ok and plan.put or {}) do
    ok, err = Instance.put(target, rec, rel, dir .. "/files/" .. name)
    if not ok then break end
  end
  for rel, text in pairs(ok and plan.write or {}) do
    ok, err = Instance.put(target, rec, rel, nil, text)
    if not ok then break end
  end
  if ok then ok, err = run_commands(target, rec, plan.prepare, timeout) end
  return ok, err
end

-- A restore, each step journaled: checks (nothing changed yet), stop, files, start, run, and
-- the bindings re-applied.
local function advance_restore(r, rec)
  local op, target, cfg = rec.operation, r:target_of(rec), settings(r.config)
  local save = r:saver(rec)
  if op.cancel_requested and not op.changed then return fail_restore(r, rec, "cancelled by the operator") end
  local dir, m = find(cfg, op.request.backup)
  if not dir then return fail_restore(r, rec, m) end
  if not op.changed then
    local ok, why = verify(dir, m, cfg.timeout)
    if not ok then return fail_restore(r, rec, "backup " .. m.id .. " is refused: " .. why) end
  end
  local plan, err = restore_plan(r, target, rec, m)
  if not plan then return fail_restore(r, rec, err) end
  if plan.stop and not op.stopped then
    rec = save(function(x) x.operation.changed = true end)
    if not rec then return end
    local ok, serr = target:stop_all(rec)
    if not ok then return log.warn("restore: stopping failed, will retry", { instance = rec.id, error = serr }) end
    rec = save(function(x) x.processes, x.operation.stopped = {}, true end)
    if not rec then return end
  end
  if not rec.operation.placed_at then
    rec = save(function(x) x.operation.changed = true end)
    if not rec then return end
    local ok, perr = place(target, rec, dir, plan, cfg.timeout)
    if not ok then return fail_restore(r, rec, perr) end
    rec = save(function(x) x.operation.placed_at = os.time() end)
    if not rec then return end
  end
  local status, reason, log_tail = "done", nil, nil
  if plan.stop then
    local sok, s, why, tail = pcall(target.step_provision, target, rec, r:recorder(rec.id))
    if not sok then return fail_restore(r, rec, "internal error: " .. tostring(s)) end
    if s == "failed" then return fail_restore(r, rec, why) end
    status, reason, log_tail = s, why, tail
  end
  if not rec.operation.ran then
    local ok, rerr = run_commands(target, rec, plan.run, cfg.timeout)
    if not ok and not plan.stop then return fail_restore(r, rec, rerr) end
    if ok then
      rec = save(function(x) x.operation.ran = true end)
      if not rec then return end
    elseif status == "done" then
      status, reason = "wait", rerr
    end
  end
  if status ~= "done" then
    if os.time() - rec.operation.placed_at > cfg.timeout then
      return fail_restore(r, rec, string.format("not healthy after %ds: %s%s", cfg.timeout, tostring(reason),
        log_tail and ("; " .. log_tail) or ""))
    end
    return r:describe(rec, reason)
  end
  local ok, berr = r:reapply_bindings(rec)
  if not ok then return fail_restore(r, rec, "re-creating the bindings: " .. berr) end
  Instance.remove(target, rec, M.SCRATCH)
  local notes = #(plan.notes or {}) > 0 and (" (" .. table.concat(plan.notes, "; ") .. ")") or ""
  finish(r, rec, "succeeded", string.format("restored backup %s of instance %s (%s)%s", m.id, m.instance_id,
    util.iso_time(m.created_at), notes), function(x) x.state = "running" end)
end

--- Whether the reconciler hands operation `op` to M.advance.
function M.handles(op) return op.type == "backup" or op.type == "restore" end

--- Advance a backup or restore operation of instance record `rec` (the reconciler `r` calls it
-- for every pending one, cancel requests included).
function M.advance(r, rec)
  if rec.operation.type == "backup" then return advance_backup(r, rec) end
  return advance_restore(r, rec)
end

-- The schedule ------------------------------------------------------------------------------------

local SCHEDULE_KEY = "backups/schedule"      -- {minute = the last minute the schedule was looked at}
local DUE_PREFIX = "backups/due/"            -- an instance the schedule wants backed up
local CATCH_UP = 1440                        -- minutes a broker that was down makes up for
local LOOK_EVERY = 2                         -- seconds between looks at the schedule

-- Whether `match` names a minute after `last` up to `now_minute` (at most CATCH_UP of them).
local function missed(match, last, now_minute)
  for m = math.max(last + 1, now_minute - CATCH_UP + 1), now_minute do
    if match(os.date("*t", m * 60)) then return true end
  end
  return false
end

-- Mark every running local instance whose service backs up as due, once per schedule time
-- (the compare-and-swap on SCHEDULE_KEY makes one replica do it).
local function mark_due(r, match, now_minute)
  local cur, rev = model.read(r.db, SCHEDULE_KEY)
  if cur and cur.minute >= now_minute then return end
  local ops = { model.put(SCHEDULE_KEY, { minute = now_minute }) }
  -- as cron: the first look only starts the count (the minute it is in began before it)
  if cur and missed(match, cur.minute, now_minute) then
    for _, kv in ipairs(model.range(r.db, "instance/")) do
      local rec = kv.value
      local _, version
      if rec.state == "running" and (rec.target or "local") == "local" then _, version = service_of(r, rec) end
      if version and version.script.backup and version.script.restore then
        ops[#ops + 1] = model.put(DUE_PREFIX .. rec.id, { since = now_minute * 60 })
      end
    end
  end
  model.txn(r.db, { compare = { { key = SCHEDULE_KEY, mod_revision = rev } }, success = ops })
end

-- Start the backups that are due on instances that are free now; a busy one waits for the next look.
local function start_due(r)
  for _, kv in ipairs(model.range(r.db, DUE_PREFIX)) do
    local iid = kv.key:sub(#DUE_PREFIX + 1)
    local rec, rev = model.read(r.db, key.instance(iid))
    local done = { model.delete(kv.key) }
    if not rec or rec.state ~= "running" then
      model.txn(r.db, { success = done })
    elseif not common.in_progress(rec.operation) then
      local op = backup_operation("schedule")
      if journal(r, rec, rev, op, done) then
        log.info("scheduled backup started", { instance = iid, operation = op.id, backup = op.backup })
      end
    end
  end
end

--- The scheduled backups (backups.schedule): the reconciler calls this every pass; every few
-- seconds it marks the instances due at a schedule time that passed and starts the backups of
-- those that have no operation in flight.
function M.due(r, now)
  local cfg = settings(r.config)
  if not cfg.schedule or now < (r.backups_next_look or 0) then return end
  r.backups_next_look = now + LOOK_EVERY
  mark_due(r, assert(M.cron(cfg.schedule)), now // 60)
  start_due(r)
end

-- The broker's store -----------------------------------------------------------------------------

-- etcdctl's flags for the configured etcd (credentials go in its environment).
local function etcdctl(config, endpoint, args)
  local e = config.etcd
  local argv = { "etcdctl", "--endpoints=" .. endpoint, "--dial-timeout=5s", "--command-timeout=600s" }
  for flag, field in pairs({ cacert = "cacert", cert = "cert", key = "key" }) do
    if e[field] then argv[#argv + 1] = "--" .. flag .. "=" .. e[field] end
  end
  for _, a in ipairs(args) do argv[#argv + 1] = a end
  local env = { PATH = os.getenv("PATH") or "/usr/bin:/bin", ETCDCTL_API = "3" }
  if e.username then env.ETCDCTL_USER = e.username .. ":" .. (e.password or "") end
  return { argv = argv, env = env, timeout = 660 }
end

-- A snapshot of the etcd store into `tmp`, from the first endpoint that gives one.
local function etcd_snapshot(config, tmp)
  local errors = {}
  for _, endpoint in ipairs(config.etcd.endpoints) do
    local res, err = proc.run(etcdctl(config, endpoint, { "snapshot", "save", tmp }))
    if res and res.code == 0 then return { kind = "etcd snapshot", endpoint = endpoint } end
    errors[#errors + 1] = endpoint .. ": " .. (res and (res.stderr ~= "" and res.stderr or res.stdout):gsub("%s+$", "")
      or tostring(err and err.message or err))
  end
  return nil, "no endpoint gave a snapshot: " .. table.concat(errors, "; ")
end

--- forge store-backup FILE: a consistent copy of the broker's store, taken while it runs. The
-- SQLite store is copied with SQLite's online backup API; an etcd store is snapshot with
-- etcdctl (the whole etcd keyspace). FILE must not exist; it gets mode 0600.
-- @return {kind, file, size, revision or endpoint} | nil, message
function M.store_backup(config, file)
  if exists(file) then return nil, file .. " exists: a store backup never overwrites a file" end
  local tmp = file .. ".partial"
  util.remove_tree(tmp)
  local info, err
  if config.store == "etcd" then
    info, err = etcd_snapshot(config, tmp)
  else
    local path = config.state_dir .. "/forge.db"
    if not exists(path) then return nil, "there is no store at " .. path .. " (state_dir " .. config.state_dir .. ")" end
    local db, oerr = require("forge.store").open(path)
    if not db then return nil, "cannot open " .. path .. ": " .. tostring(oerr.message) end
    local rev, berr = db:backup(tmp)
    db:close()
    info, err = rev and { kind = "sqlite", revision = rev }, berr and berr.message
  end
  if not info then
    util.remove_tree(tmp)
    return nil, err
  end
  proc.chmod(tmp, tonumber("600", 8))
  local ok, rerr = os.rename(tmp, file)
  if not ok then return nil, "cannot move the backup to " .. file .. ": " .. tostring(rerr) end
  info.file, info.size = file, lfs.attributes(file, "size")
  return info
end

return M
