--- Orphans (GET /admin/orphans, POST /admin/orphans/:kind/:id/clean): what runs without a
-- record, and records whose deployment is gone.
--   process     a live process under the local instances dir that no instance record names
--   directory   an instance directory without a live record
--   deployment  a BOSH deployment named like this broker's (<service>-<instance id>) without a record
--   record      a running instance record whose directory or BOSH deployment is gone
-- Cleaning looks again first, so only what is still an orphan is touched.
local admin = require "forge.admin"
local common = require "forge.osb.common"
local lfs = require "lfs"
local log = require "forge.log"
local model = require "forge.model"
local proc = require "forge.proc"
local util = require "forge.util"

local fail, key = common.fail, model.key

local M = {}

local function live(rec) return rec ~= nil and rec.state ~= "deleted" end

local function settled(rec) return live(rec) and not common.in_progress(rec.operation) end

-- Does the record name this process (or may it be spawning it right now)?
local function owns(rec, pid)
  if not live(rec) then return false end
  if common.in_progress(rec.operation) then return true end
  for _, p in pairs(rec.processes or {}) do if p.pid == pid then return true end end
  return false
end

local function local_orphans(target, records, out)
  local root = target.dir .. "/"
  for _, p in ipairs(target:our_processes()) do
    local id = p.dir:sub(#root + 1):match("^([^/]+)")
    if not owns(records[id], p.pid) then
      out[#out + 1] = { kind = "process", id = tostring(p.pid), target = target.name, instance = id,
        start_time = p.start_time, detail = "pid " .. p.pid .. " runs in " .. p.dir .. " and no instance record names it" }
    end
  end
  if lfs.attributes(target.dir, "mode") == "directory" then
    for entry in lfs.dir(target.dir) do
      if entry ~= "." and entry ~= ".." and not live(records[entry]) then
        out[#out + 1] = { kind = "directory", id = entry, target = target.name,
          detail = target:instance_dir(entry) .. " has no live instance record" }
      end
    end
  end
  for id, rec in pairs(records) do
    if settled(rec) and rec.state == "running" and (rec.target or "local") == target.name
        and not lfs.attributes(target:instance_dir(id), "mode") then
      out[#out + 1] = { kind = "record", id = id, target = target.name,
        detail = "instance " .. id .. " is running but " .. target:instance_dir(id) .. " is gone" }
    end
  end
end

-- Deployments on the director whose name is <service>-<id> of a loaded service.
local function bosh_orphans(b, target, records, out, errors)
  local d, derr = target:director()
  local deployments, err
  if d then deployments, err = d:deployments() else err = derr end
  if not deployments then
    errors[#errors + 1] = { target = target.name, error = tostring(err and err.message or err) }
    return
  end
  local named = {}
  for _, dep in ipairs(deployments) do named[dep.name] = true end
  local by_name = {}
  for id, rec in pairs(records) do
    if live(rec) and rec.target == target.name then by_name[rec.bosh and rec.bosh.deployment or rec.deployment_name] = id end
  end
  for name in pairs(named) do
    if not by_name[name] then
      for _, svc in ipairs(b.registry.list) do
        local id = name:sub(#svc.name + 2)
        if name:sub(1, #svc.name + 1) == svc.name .. "-" and id ~= "" then
          out[#out + 1] = { kind = "deployment", id = target.name .. ":" .. name, target = target.name, instance = id,
            detail = "deployment " .. name .. " on director " .. target.name .. " has no live instance record" }
          break
        end
      end
    end
  end
  for name, id in pairs(by_name) do
    local rec = records[id]
    if settled(rec) and rec.state == "running" and not named[name] then
      out[#out + 1] = { kind = "record", id = id, target = target.name,
        detail = "instance " .. id .. " is running but deployment " .. name .. " is gone from director " .. target.name }
    end
  end
end

--- Everything that looks orphaned now. @return {orphans = [...], errors = [{target, error}]}
function M.list(b)
  local records = {}
  for _, kv in ipairs(model.range(b.db, "instance/")) do records[kv.value.id] = kv.value end
  local out, errors = util.array(), util.array()
  for _, name in ipairs(b.targets:names()) do
    local target = b.targets.by_name[name]
    if target.kind == "bosh" then bosh_orphans(b, target, records, out, errors)
    else local_orphans(target, records, out) end
  end
  table.sort(out, function(x, y)
    if x.kind ~= y.kind then return x.kind < y.kind end
    return x.id < y.id
  end)
  return { orphans = out, errors = errors }
end

local CLEAN = {}

function CLEAN.process(b, o)
  local ok, err = proc.stop(tonumber(o.id), o.start_time, b.targets.by_name[o.target].cfg.stop_timeout)
  if not ok then fail(502, "CleanFailed", "could not stop pid " .. o.id .. ": " .. tostring(err and err.message or err)) end
  return { cleaned = true, description = "stopped pid " .. o.id }
end

function CLEAN.directory(b, o, list)
  for _, other in ipairs(list) do
    if other.kind == "process" and other.instance == o.id then
      fail(409, "Conflict", "pid " .. other.id .. " still runs in " .. o.id .. "; clean that process first")
    end
  end
  b.targets.by_name[o.target]:remove_dir(o.id)
  return { cleaned = true, description = "removed " .. b.targets.by_name[o.target]:instance_dir(o.id) }
end

function CLEAN.deployment(b, o)
  local target = b.targets.by_name[o.target]
  local d, derr = target:director()
  local name = o.id:sub(#o.target + 2)
  local task, err
  if d then task, err = d:delete_deployment(name, { force = true }) else err = derr end
  if not task then
    fail(502, "CleanFailed", "director " .. o.target .. " did not delete " .. name .. ": "
      .. tostring(err and err.message or err))
  end
  return { cleaned = true, task = task, description = "BOSH task " .. tostring(task) .. " deletes deployment " .. name }
end

function CLEAN.record(b, o)
  local rec, rev = model.read(b.db, key.instance(o.id))
  if not settled(rec) then return { cleaned = false, description = "instance " .. o.id .. " changed meanwhile" } end
  admin.forget(b, rec, rev)
  return { cleaned = true, description = "forgot instance " .. o.id }
end

--- Clean one orphan (looked up again first). Repeating it answers cleaned = false.
function M.clean(b, kind, id, who)
  if not CLEAN[kind] then fail(400, "BadRequest", "kind must be process, directory, deployment or record") end
  local list = M.list(b).orphans
  for _, o in ipairs(list) do
    if o.kind == kind and o.id == id then
      local result = CLEAN[kind](b, o, list)
      log.warn("orphan cleaned", { kind = kind, id = id, target = o.target, by = who, result = result.description })
      return result
    end
  end
  return { cleaned = false, description = "no " .. kind .. " orphan " .. id .. " (already cleaned?)" }
end

return M
