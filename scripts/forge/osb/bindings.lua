--- OSB service bindings: bind, unbind (sync, or async where the plan says so and the platform
-- accepts it), fetch, last_operation.
--
-- A sync bind journals the binding ("creating"), runs the service's commands on the instance,
-- then records it "created"; an interrupted one is undone by the reconciler. An async bind
-- journals the operation and leaves the work to the reconciler.
local common = require "forge.osb.common"
local log = require "forge.log"
local model = require "forge.model"
local services = require "forge.services"
local telemetry = require "forge.telemetry"
local util = require "forge.util"

local fail, key, reply = common.fail, model.key, common.reply

local M = {}

local function live(rec) return rec ~= nil and rec.state ~= "deleted" end

local function fingerprint(body)
  return { service_id = body.service_id, plan_id = body.plan_id, parameters = body.parameters or {},
    bind_resource = body.bind_resource or {}, app_guid = body.app_guid }
end

-- The instance a binding belongs to: it must exist, be running and have no operation going on.
-- Returns it and its mod_revision.
local function bindable_instance(b, iid)
  local inst, rev = model.read(b.db, key.instance(iid))
  if not live(inst) then fail(404, "NotFound", "instance " .. iid .. " does not exist") end
  if common.in_progress(inst.operation) then
    fail(422, "ConcurrencyError", "Service Instance not ready for binding; state " .. inst.state)
  end
  if inst.state ~= "running" then
    fail(422, "InstanceNotReady", "Service Instance not ready for binding; state " .. inst.state)
  end
  return inst, rev
end

local function binding_async(svc, plan) return (plan and plan.bindings_async) or svc.script.bindings_async end

--- Run the bind hook for `rec` and its commands. Returns credentials | nil, message. A new
-- binding whose commands fail is undone (unbind); a `reapply` of a live binding (after a
-- redeploy) is not, since that would delete what its application uses.
function M.apply(b, svc, inst, rec, reapply)
  local target, terr = b.targets:of(inst)
  if not target then return nil, terr end
  local extra = { parameters = rec.parameters or {}, credentials = rec.credentials }
  if target.binding_info then                      -- BOSH: the live VMs' IPs (ctx.vms, ctx.ips)
    local info, ierr = target:binding_info(inst)
    if not info then return nil, "could not read the VMs of instance " .. inst.id .. ": " .. ierr end
    extra.vms, extra.ips = info.vms, info.ips
  end
  local result, err = services.hook(svc, "bind", services.binding_context(inst, rec.id, extra))
  if not result then return nil, "service " .. svc.name .. " bind failed: " .. tostring(err), "script" end
  local ok, rerr = target:run_all(result.run, inst)
  if not ok then
    if not reapply then
      target:run_all((services.hook(svc, "unbind", services.binding_context(inst, rec.id, { binding = rec })) or {})
        .run, inst)
    end
    return nil, "could not create the binding on instance " .. inst.id .. ": " .. rerr
  end
  return result.credentials
end

--- Run the unbind hook for `rec`. Returns true | nil, message, "script" when the script failed.
function M.remove(b, svc, inst, rec)
  local target, terr = b.targets:of(inst)
  if not target then return nil, terr end
  local result, err = services.hook(svc, "unbind", services.binding_context(inst, rec.id, { binding = rec,
    parameters = rec.parameters or {}, ips = inst.resources and inst.resources.ips }))
  if not result then return nil, "service " .. svc.name .. " unbind failed: " .. err, "script" end
  local ok, rerr = target:run_all(result.run, inst)
  if not ok then return nil, "could not remove the binding from instance " .. inst.id .. ": " .. rerr end
  return true
end

function M.bind(b, iid, bid, req, q)
  local body = common.body(req)
  common.need_string(body, "service_id")
  common.need_string(body, "plan_id")
  body.parameters = common.optional_object(body, "parameters")
  body.bind_resource = common.optional_object(body, "bind_resource", true)
  local context = common.optional_object(body, "context")
  if body.app_guid ~= nil and type(body.app_guid) ~= "string" then fail(400, "BadRequest", "app_guid must be a string") end
  local svc, plan = common.lookup_plan(b.registry, body.service_id, body.plan_id)
  local bindable = plan.bindable
  if bindable == nil then bindable = svc.script.bindable end
  if not bindable then fail(400, "BadRequest", "plan " .. plan.name .. " of service " .. svc.name .. " is not bindable") end
  if body.predecessor_binding_id ~= nil and not plan.binding_rotatable then
    fail(400, "BadRequest", "plan " .. plan.name .. " does not support binding rotation (predecessor_binding_id)")
  end
  local fp = fingerprint(body)

  local bkey = key.binding(iid, bid)
  local existing, rev = model.read(b.db, bkey)
  if live(existing) and existing.state ~= "failed" then
    if not util.deep_equal(existing.operation.request, fp) then
      fail(409, "Conflict", "binding " .. bid .. " already exists with different attributes")
    end
    if common.in_progress(existing.operation) and existing.operation.async then
      return reply(202, { operation = existing.operation.id })
    end
    if existing.state == "created" then return reply(200, { credentials = existing.credentials }) end
    fail(422, "ConcurrencyError", "binding " .. bid .. " is being " .. existing.state)
  end
  local inst, irev = bindable_instance(b, iid)
  if inst.service_id ~= body.service_id then fail(400, "BadRequest", "service_id does not match the instance's service") end
  if body.predecessor_binding_id ~= nil and not live(model.read(b.db, key.binding(iid, body.predecessor_binding_id))) then
    fail(400, "BadRequest", "predecessor binding " .. tostring(body.predecessor_binding_id) .. " does not exist")
  end
  common.check_parameters(plan, "service_binding", "create", body.parameters)
  local async = common.truthy(q, "accepts_incomplete") and binding_async(svc, plan)
  if binding_async(svc, plan) and plan.async_only and not async then
    fail(422, "AsyncRequired", "bindings of plan " .. plan.name .. " are created asynchronously; add accepts_incomplete=true")
  end

  local now = os.time()
  local rec = { id = bid, instance_id = iid, service_id = body.service_id, service = svc.name, plan_id = body.plan_id,
    parameters = body.parameters, bind_resource = body.bind_resource, app_guid = body.app_guid, context = context,
    state = "creating", operation = common.new_operation("bind", fp), created_at = now, updated_at = now }
  rec.operation.async = async or nil
  local ops = { model.put(bkey, rec), model.delete(key.gone(iid .. "/" .. bid)) }
  if async then ops[#ops + 1] = model.put(key.pending(iid .. "/" .. bid), "") end
  -- the instance as checked above: a deprovision or update started since then fails this txn
  local journaled, brev = model.txn(b.db, { compare = { { key = bkey, mod_revision = rev },
    { key = key.instance(iid), mod_revision = irev } }, success = ops })
  if not journaled then
    fail(422, "ConcurrencyError", "binding " .. bid .. " or its instance changed meanwhile; try again")
  end
  if async then
    log.info("bind accepted", { instance = iid, binding = bid, operation = rec.operation.id, request_id = req.id,
      origin = req.origin })
    return reply(202, { operation = rec.operation.id })
  end

  local creds, err, kind = M.apply(b, svc, inst, rec)
  if not creds then
    model.txn(b.db, { compare = { { key = bkey, mod_revision = brev } }, success = { model.delete(bkey) } })
    if kind == "script" then fail(500, "ServiceScriptError", err) end
    fail(502, "BindFailed", err)
  end
  rec.credentials, rec.state, rec.updated_at = creds, "created", os.time()
  rec.operation.state, rec.operation.finished_at = "succeeded", os.time()
  if not model.txn(b.db, { compare = { { key = bkey, mod_revision = brev } }, success = { model.put(bkey, rec) } }) then
    M.remove(b, svc, inst, rec)
    fail(409, "Conflict", "instance " .. iid .. " was deleted while binding " .. bid .. " was being created")
  end
  telemetry.finished("bind", "succeeded")
  log.info("binding created", { instance = iid, binding = bid, request_id = req.id, origin = req.origin })
  return reply(201, { credentials = creds })
end

function M.unbind(b, iid, bid, req, q)
  local service_id = common.need_string(q, "service_id", "query parameter ")
  common.need_string(q, "plan_id", "query parameter ")
  local bkey = key.binding(iid, bid)
  local rec, rev = model.read(b.db, bkey)
  if not live(rec) then fail(410, "Gone", "binding " .. bid .. " does not exist") end
  if rec.service_id ~= service_id then fail(400, "BadRequest", "service_id does not match the binding's service") end
  if common.in_progress(rec.operation) then
    if rec.operation.type == "unbind" then return reply(202, { operation = rec.operation.id }) end
    fail(422, "ConcurrencyError", "binding " .. bid .. " is being created")
  end
  local inst = model.read(b.db, key.instance(iid))
  if live(inst) and common.in_progress(inst.operation) then
    fail(422, "ConcurrencyError", "instance " .. iid .. " has a " .. inst.operation.type .. " in progress")
  end
  local svc = inst and b.registry.by_id[inst.service_id]
  local plan = svc and svc.plans[rec.plan_id]
  local async = common.truthy(q, "accepts_incomplete") and svc and binding_async(svc, plan)
  if async then
    rec.operation = common.new_operation("unbind")
    rec.operation.async, rec.state, rec.updated_at = true, "deleting", os.time()
    if not model.txn(b.db, { compare = { { key = bkey, mod_revision = rev } },
        success = { model.put(bkey, rec), model.put(key.pending(iid .. "/" .. bid), "") } }) then
      fail(422, "ConcurrencyError", "binding " .. bid .. " changed meanwhile; try again")
    end
    log.info("unbind accepted", { instance = iid, binding = bid, operation = rec.operation.id, request_id = req.id })
    return reply(202, { operation = rec.operation.id })
  end
  if live(inst) and inst.state == "running" and svc then
    local ok, err, kind = M.remove(b, svc, inst, rec)
    if not ok then fail(kind == "script" and 500 or 502, kind == "script" and "ServiceScriptError" or "UnbindFailed", err) end
  end
  if not model.txn(b.db, { compare = { { key = bkey, mod_revision = rev } }, success = { model.delete(bkey) } }) then
    fail(422, "ConcurrencyError", "binding " .. bid .. " changed while it was being deleted")
  end
  telemetry.finished("unbind", "succeeded")
  log.info("binding deleted", { instance = iid, binding = bid, request_id = req.id, origin = req.origin })
  return reply(200, {})
end

function M.fetch(b, iid, bid)
  local rec = model.read(b.db, key.binding(iid, bid))
  if not live(rec) or rec.state ~= "created" then
    fail(404, "NotFound", "binding " .. bid .. (live(rec) and " is being created" or " does not exist"))
  end
  local body = { credentials = rec.credentials, parameters = rec.parameters or {} }
  return reply(200, body)
end

function M.last_operation(b, iid, bid)
  local rec = model.read(b.db, key.binding(iid, bid))
  if not rec then
    if model.read(b.db, key.gone(iid .. "/" .. bid)) then fail(410, "Gone", "binding " .. bid .. " was deleted") end
    fail(404, "NotFound", "binding " .. bid .. " does not exist")
  end
  local headers = common.in_progress(rec.operation) and { ["Retry-After"] = "1" } or nil
  return reply(200, common.operation_body(rec.operation), headers)
end

return M
