--- The admin API (/admin/*, docs/admin.md): what runs, what is in flight, and the operator's
-- actions on instances (retry, cancel, restart, purge). Actions are journaled in the instance
-- record like the platform's operations, so the reconciler carries them out and a restarted
-- broker resumes them. The dashboard (forge.dashboard) renders the same data as pages.
local common = require "forge.osb.common"
local diff = require "forge.diff"
local instances = require "forge.osb.instances"
local log = require "forge.log"
local model = require "forge.model"
local proc = require "forge.proc"
local quotas = require "forge.quotas"
local util = require "forge.util"

local fail, key = common.fail, model.key

local M = {}

M.STATES = { deploying = true, running = true, failed = true, destroying = true, deleted = true }
M.OPERATION_TYPES = { provision = true, update = true, deprovision = true, bind = true, unbind = true, restart = true }

-- Query parameters: only the listed ones, each at most 255 bytes.
local function check_query(q, allowed)
  for k, v in pairs(q) do
    if not allowed[k] then fail(400, "BadRequest", "unknown query parameter '" .. k .. "'") end
    if #v > 255 then fail(400, "BadRequest", "query parameter " .. k .. " is longer than 255 bytes") end
  end
end

local function check_limit(q, default)
  if q.limit == nil then return default end
  local n = math.tointeger(tonumber(q.limit))
  if not n or n < 1 or n > 500 or not q.limit:match("^%d+$") then
    fail(400, "BadRequest", "limit must be an integer from 1 to 500")
  end
  return n
end

local function operation_summary(op)
  if not op then return nil end
  return { id = op.id, type = op.type, state = op.state, description = op.description, started_at = op.started_at,
    finished_at = op.finished_at }
end

--- The summary of an instance record every list shows.
function M.summary(rec)
  return { id = rec.id, service = rec.service, plan = rec.plan, state = rec.state, target = rec.target or "local",
    organization_guid = rec.organization_guid, space_guid = rec.space_guid, version = rec.script_hash,
    created_at = rec.created_at, updated_at = rec.updated_at, operation = operation_summary(rec.operation) }
end

local INSTANCE_FILTERS = { service = "service", plan = "plan", state = "state", org = "organization_guid",
  space = "space_guid", target = "target" }

local function matches(rec, q)
  for param, field in pairs(INSTANCE_FILTERS) do
    local want = q[param]
    local have = rec[field]
    if field == "target" then have = have or "local" end
    if want and have ~= want then return false end
  end
  return true
end

--- GET /admin/instances: one page of instance summaries in id order.
-- Records before the cursor are skipped without being decoded.
function M.list_instances(b, q)
  check_query(q, { service = 1, plan = 1, state = 1, org = 1, space = 1, target = 1, limit = 1, after = 1 })
  local limit = check_limit(q, 50)
  if q.state and not M.STATES[q.state] then
    fail(400, "BadRequest", "state must be one of deploying, running, failed, destroying, deleted")
  end
  if q.after then common.check_id(q.after, "after") end
  local kvs, err = b.db:range("instance/")
  if not kvs then fail(503, "ServiceUnavailable", "the broker's store is unavailable: " .. tostring(err.message)) end
  local skip_to = q.after and key.instance(q.after)
  local page, next_id = util.array(), nil
  for _, kv in ipairs(kvs) do
    if not skip_to or kv.key > skip_to then
      local rec = util.json_decode(kv.value)
      if type(rec) == "table" and matches(rec, q) then
        if #page == limit then
          next_id = page[#page].id
          break
        end
        page[#page + 1] = M.summary(rec)
      end
    end
  end
  return { instances = page, next = next_id }
end

local function read_instance(b, id)
  common.check_id(id, "instance id")
  local rec, rev = model.read(b.db, key.instance(id))
  if not rec then fail(404, "NotFound", "instance " .. id .. " does not exist") end
  return rec, rev
end

local function local_processes(rec)
  local list = util.array()
  for _, p in ipairs((rec.deployment or {}).processes or {}) do
    local r = (rec.processes or {})[p.name]
    list[#list + 1] = { name = p.name, pid = r and r.pid, alive = r ~= nil and proc.alive(r.pid, r.start_time),
      healthy = r and r.healthy, restarts = r and r.restarts or 0, retry_at = r and r.retry_at,
      health = r and r.health, last_exit = r and r.last_exit }
  end
  return list
end

local function bosh_vms(b, rec)
  local target, terr = b.targets:of(rec)
  if not target then return nil, terr end
  local d, err = target:director()
  if not d then return nil, tostring(err and err.message or err) end
  local vms, verr = d:vms(rec.bosh and rec.bosh.deployment or rec.deployment_name)
  if not vms then return nil, tostring(verr.message) end
  return vms
end

--- GET /admin/instances/:id: the record with its history, bindings, processes or VMs, version and
-- rendered deployment; no secret.
function M.instance_detail(b, id)
  local rec = read_instance(b, id)
  local bindings = model.range(b.db, key.bindings(id))
  local secrets = diff.secrets(rec, bindings)
  local out = M.summary(rec)
  out.parameters, out.context = diff.mask(rec.parameters, secrets), diff.mask(rec.context, secrets)
  out.maintenance_info, out.resources = rec.maintenance_info, rec.resources
  local svc = b.registry.by_id[rec.service_id]
  out.version = { pinned = rec.script_hash, current = svc and svc.hash,
    upgrade_available = svc ~= nil and rec.script_hash ~= nil and rec.script_hash ~= svc.hash }
  out.operations = util.array()
  for i, op in ipairs({ rec.operation, table.unpack(rec.history or {}) }) do
    out.operations[i] = operation_summary(op)
    out.operations[i].diff = op.diff         -- an update's or upgrade's diff (forge.diff), secrets masked
  end
  out.bindings = util.array()
  for _, kv in ipairs(bindings) do
    local bnd = kv.value
    out.bindings[#out.bindings + 1] = { id = bnd.id, state = bnd.state, created_at = bnd.created_at,
      app_guid = bnd.app_guid, operation = operation_summary(bnd.operation) }
  end
  if (rec.target or "local") == "local" then
    out.processes = local_processes(rec)
    out.deployment = diff.mask(rec.deployment, secrets)
  else
    if rec.state ~= "deleted" then out.vms, out.vms_error = bosh_vms(b, rec) end
    out.deployment = diff.mask(rec.manifest or model.manifest(b.db, rec.id), secrets)
  end
  return out
end

local function operation_row(rec, op, binding)
  return { instance = binding and rec.instance_id or rec.id, binding = binding and rec.id or nil, id = op.id,
    type = op.type, state = op.state, target = rec.target, started_at = op.started_at,
    age_seconds = op.started_at and (os.time() - op.started_at) or nil, description = op.description }
end

--- GET /admin/operations: in progress (from the reconciler's pending markers) or, for failed and
-- succeeded, the current operation of every instance and binding.
function M.operations(b, q)
  check_query(q, { state = 1, type = 1, limit = 1 })
  local limit = check_limit(q, 100)
  local state = q.state or "in_progress"
  local wanted = ({ in_progress = "in progress", failed = "failed", succeeded = "succeeded" })[state]
  if not wanted then fail(400, "BadRequest", "state must be in_progress, failed or succeeded") end
  if q.type and not M.OPERATION_TYPES[q.type] then
    fail(400, "BadRequest", "type must be provision, update, deprovision, bind, unbind or restart")
  end
  local rows = util.array()
  local function consider(rec, binding)
    local op = type(rec) == "table" and rec.operation
    if op and op.state == wanted and (not q.type or op.type == q.type) and #rows < limit then
      rows[#rows + 1] = operation_row(rec, op, binding)
    end
  end
  if wanted == "in progress" then
    for _, kv in ipairs(model.range(b.db, "pending/")) do
      local id = kv.key:sub(#"pending/" + 1)
      local iid, bid = id:match("^([^/]+)/(.+)$")
      local rec = model.read(b.db, iid and key.binding(iid, bid) or key.instance(id))
      if rec and iid then
        local inst = model.read(b.db, key.instance(iid))
        rec.target = inst and inst.target
      end
      if rec then consider(rec, iid ~= nil) end
    end
  else
    for _, kv in ipairs(model.range(b.db, "instance/")) do consider(kv.value, false) end
    for _, kv in ipairs(model.range(b.db, "binding/")) do consider(kv.value, true) end
  end
  table.sort(rows, function(x, y) return (x.started_at or 0) < (y.started_at or 0) end)
  return { operations = rows }
end

-- ---- actions ---------------------------------------------------------------------------

local function accepted(op) return 202, { operation = op.id, type = op.type } end

-- Put the new operation `op` in `rec` (the old one goes to its history) and journal it.
local function start_operation(b, rec, rev, op, claimed)
  common.begin(rec, op)
  if not instances.journal(b, rec, rev, claimed or {}) then
    fail(409, "Conflict", "instance " .. rec.id .. " changed meanwhile; try again")
  end
  return accepted(op)
end

local function service_plan(b, rec)
  local svc = b.registry.by_id[rec.service_id]
  local plan = svc and svc.plans[rec.plan_id]
  if not plan then
    fail(409, "Conflict", "the service or plan of instance " .. rec.id .. " is no longer in the catalog")
  end
  return svc, plan
end

--- POST /admin/instances/:id/retry: run the failed operation again.
function M.retry(b, id, who)
  local rec, rev = read_instance(b, id)
  local op = rec.operation
  if common.in_progress(op) then
    if op.retry_of then return accepted(op) end
    fail(409, "Conflict", "instance " .. id .. " has a " .. op.type .. " in progress")
  end
  if op.state ~= "failed" then
    fail(422, "NothingToRetry", "the last operation of instance " .. id .. " (" .. op.type .. ") did not fail")
  end
  local new = common.new_operation(op.type, op.request)
  new.retry_of, new.by = op.id, who
  if op.type == "deprovision" then
    rec.state = "destroying"
    return start_operation(b, rec, rev, new)
  end
  local svc, plan = service_plan(b, rec)
  rec.state = "deploying"
  if op.type == "provision" then rec.processes, rec.initialized = {}, {} end  -- its directory is written anew
  local claimed = instances.render(b, svc, plan, rec, rec.script_hash)
  log.info("retry accepted", { instance = id, operation = new.id, retry_of = op.id, by = who })
  return start_operation(b, rec, rev, new, claimed)
end

--- POST /admin/instances/:id/cancel: ask the reconciler to stop the operation in flight.
function M.cancel(b, id, who)
  local rec = read_instance(b, id)
  if not common.in_progress(rec.operation) then
    fail(422, "NothingToCancel", "instance " .. id .. " has no operation in progress")
  end
  local stored = model.update(b.db, key.instance(id), function(r)
    if r.operation.id ~= rec.operation.id or not common.in_progress(r.operation) then return false end
    if r.operation.cancel_requested then return false end
    r.operation.cancel_requested, r.operation.cancelled_by = os.time(), who
    return { model.put(key.pending(id), "") }
  end)
  if stored then log.info("cancel requested", { instance = id, operation = rec.operation.id, by = who }) end
  return accepted(rec.operation)
end

--- POST /admin/instances/:id/restart: restart a running local instance's processes.
function M.restart(b, id, who)
  local rec, rev = read_instance(b, id)
  if common.in_progress(rec.operation) then
    if rec.operation.type == "restart" then return accepted(rec.operation) end
    fail(409, "Conflict", "instance " .. id .. " has a " .. rec.operation.type .. " in progress")
  end
  if (rec.target or "local") ~= "local" then
    fail(409, "Conflict", "instance " .. id .. " runs on BOSH target " .. rec.target .. "; restart is for local instances")
  end
  if rec.state ~= "running" then fail(409, "Conflict", "instance " .. id .. " is " .. rec.state .. ", not running") end
  local op = common.new_operation("restart")
  op.by = who
  log.info("restart accepted", { instance = id, operation = op.id, by = who })
  return start_operation(b, rec, rev, op)
end

-- Is the deployment of `rec` gone? true | false, why (| nil, err when the director does not answer)
function M.deployment_gone(b, rec)
  local target, terr = b.targets:of(rec)
  if not target then return nil, terr end
  if target.kind == "local" then
    for name, p in pairs(rec.processes or {}) do
      if proc.alive(p.pid, p.start_time) then return false, "process " .. name .. " (pid " .. p.pid .. ") is alive" end
    end
    return true
  end
  local d, derr = target:director()
  if not d then return nil, tostring(derr and derr.message or derr) end
  local name = rec.bosh and rec.bosh.deployment or rec.deployment_name
  local dep, err = d:deployment(name)
  if dep then return false, "deployment " .. name .. " exists on director " .. target.name end
  if err.code == "bosh.not_found" then return true end
  return nil, tostring(err.message)
end

--- Forget `rec` (its deployment is gone): record, bindings, markers, ports or IPs, directory.
function M.forget(b, rec, rev)
  local target = b.targets:of(rec)
  local ops = { model.delete(key.instance(rec.id)), model.delete(key.pending(rec.id)),
    { op = "delete_prefix", prefix = key.bindings(rec.id) }, { op = "delete_prefix", prefix = key.pending(rec.id .. "/") },
    model.put(key.gone(rec.id), { deleted_at = os.time(), purged = true }) }
  if target and target.kind == "local" then
    for _, p in ipairs(not (rec.resources or {}).released and (rec.resources or {}).ports or {}) do
      ops[#ops + 1] = model.delete(key.port(p))
    end
  elseif target then
    target:release_ops(b.db, rec, ops)
  end
  if not model.txn(b.db, { compare = { { key = key.instance(rec.id), mod_revision = rev } }, success = ops }) then
    fail(409, "Conflict", "instance " .. rec.id .. " changed meanwhile; try again")
  end
  if target and target.kind == "local" then target:remove_dir(rec.id) end
  quotas.release(b, rec)
end

--- DELETE /admin/instances/:id?purge=true
function M.purge(b, id, q, who)
  check_query(q, { purge = 1 })
  if q.purge ~= "true" then fail(400, "BadRequest", "purge=true is required: this forgets the record for good") end
  common.check_id(id, "instance id")
  local rec, rev = model.read(b.db, key.instance(id))
  if not rec then
    if model.read(b.db, key.gone(id)) then
      return 200, { purged = false, description = "instance " .. id .. " is already gone" }
    end
    fail(404, "NotFound", "instance " .. id .. " does not exist")
  end
  if common.in_progress(rec.operation) then
    fail(409, "Conflict", "instance " .. id .. " has a " .. rec.operation.type .. " in progress; cancel it first")
  end
  local gone, why = M.deployment_gone(b, rec)
  if gone == nil then fail(503, "ServiceUnavailable", "cannot tell whether the deployment is gone: " .. why) end
  if not gone then fail(409, "Conflict", why .. "; deprovision the instance instead") end
  M.forget(b, rec, rev)
  log.warn("instance record purged", { instance = id, by = who, service = rec.service, state = rec.state })
  return 200, { purged = true }
end

return M
