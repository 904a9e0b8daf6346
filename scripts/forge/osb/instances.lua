--- OSB service instances: provision, update, deprovision, fetch, last_operation; and the
-- 2014 Service Forge's own GET /service_instances/:id.
--
-- A request validates, journals the new operation in the instance record (with a pending/
-- marker for the reconciler) in one compare-and-swap transaction, and answers 202 — or, for a
-- plan that allows it and a platform that did not send accepts_incomplete=true, waits (bounded)
-- for the reconciler and answers 201/200.
local common = require "forge.osb.common"
local diff = require "forge.diff"
local log = require "forge.log"
local model = require "forge.model"
local quotas = require "forge.quotas"
local services = require "forge.services"
local util = require "forge.util"

local fail, key, reply = common.fail, model.key, common.reply

local M = {}

local function live(rec) return rec ~= nil and rec.state ~= "deleted" end

-- A failed provision may be retried by the same PUT: the record is replaced.
local function replaceable(rec)
  return not live(rec) or (rec.state == "failed" and rec.operation.type == "provision")
end

local function dashboard_url(b, id)
  return b.public_url .. "/service_instances/" .. id
end

local function provision_fingerprint(body, params)
  return { service_id = body.service_id, plan_id = body.plan_id, organization_guid = body.organization_guid,
    space_guid = body.space_guid, parameters = params or {} }
end

-- Any binding of the instance with an operation in progress blocks instance operations.
function M.binding_busy(b, id)
  for _, kv in ipairs(model.range(b.db, key.bindings(id))) do
    if common.in_progress(kv.value.operation) then return kv.value.id end
  end
end

-- The driver of `rec` (its `target`), or a 503 when that target is no longer configured.
local function driver_of(b, rec)
  local d, err = b.targets:of(rec)
  if not d then fail(503, "ServiceUnavailable", err, { retry_after = 30 }) end
  return d
end

--- Render the deployment of `rec` for `plan` on its target. Local: ports (existing ones kept, in
-- order), secrets, and the service's deploy hook. BOSH: IPs from the target's pool and the
-- manifest (forge.targets.bosh). Returns the store keys newly claimed (port/ or ip/ keys), which
-- the journal compares absent and points at the instance in the same transaction.
-- An instance keeps the service version (content hash) that rendered it; only a provision or
-- a maintenance_info upgrade moves it to the current version (`pinned` = the hash to keep).
-- `spread`: a retry after a lost race for ports or IPs, which then come from a random point.
function M.render(b, svc, plan, rec, pinned, spread)
  local target = driver_of(b, rec)
  if target.kind == "bosh" then
    local claim, status, code, msg = target:render(b.db, svc, plan, rec, function(hook, ...)
      if hook == "manifest" then return services.hook(svc, hook, ...) end
      return services.call(svc, hook, ...)
    end, spread)
    if not claim then fail(status, code, msg, status == 503 and { retry_after = 30 } or nil) end
    return claim
  end
  local count = 1
  if svc.script.ports then
    local n, err = services.call(svc, "ports", plan, rec.parameters or {})
    count = math.tointeger(n)
    if not count or count < 1 then
      fail(500, "ServiceScriptError", "service " .. svc.name .. ": ports() must return a positive integer"
        .. (err and (": " .. err) or ""))
    end
  end
  local old = rec.resources and not rec.resources.released and rec.resources.ports or {}
  local ports, added = {}, {}
  for i = 1, math.min(count, #old) do ports[i] = old[i] end
  if count > #ports then
    local more, perr = target:allocate_ports(b.db, count - #ports, spread)
    if not more then fail(503, "ServiceUnavailable", perr, { retry_after = 30 }) end
    for _, p in ipairs(more) do
      ports[#ports + 1] = p
      added[#added + 1] = key.port(p)
    end
  end
  rec.resources = { ports = ports, host = target.cfg.host }
  rec.secrets = rec.secrets or {}
  local ctx = {
    instance_id = rec.id, plan = plan, parameters = rec.parameters or {}, context = rec.context or {},
    host = target.cfg.host, ports = ports, dir = target:instance_dir(rec.id), secrets = rec.secrets,
    templates = svc.templates, script_hash = pinned,
  }
  if rec.previous then      -- an update: what runs now
    ctx.previous = { plan = svc.plans[rec.previous.plan_id], parameters = rec.previous.parameters or {},
      ports = rec.previous.resources and rec.previous.resources.ports }
  end
  local deployment, err = services.hook(svc, "deploy", ctx)
  if not deployment then fail(500, "ServiceScriptError", "service " .. svc.name .. " failed to render: " .. err) end
  local version = services.version(svc, pinned, svc.registry) or svc
  local allowed, why = target:check_commands(version.script.commands, deployment)
  if not allowed then fail(500, "ServiceScriptError", "service " .. svc.name .. ": " .. why) end
  local run_as, uerr = target:run_as(svc.script, plan)
  if run_as == false then fail(500, "ServiceScriptError", "service " .. svc.name .. ": " .. uerr) end
  rec.run_as = run_as
  local limits, lerr = target:limits(svc.script, plan)
  if not limits then fail(500, "ServiceScriptError", "service " .. svc.name .. ": plan " .. plan.name .. ": " .. lerr) end
  rec.limits = limits
  rec.deployment = deployment
  rec.files_written, rec.script_hash = false, pinned or svc.hash
  return added
end

--- Journal `rec` (new operation) with a compare on the record revision and on newly claimed
-- resource keys (port/, ip/); `extra` ops and `extra_compares` (quota counters) go in the same
-- transaction.
function M.journal(b, rec, rev, claimed, extra, extra_compares)
  local ikey = key.instance(rec.id)
  local compares = { { key = ikey, mod_revision = rev }, table.unpack(extra_compares or {}) }
  local ops = { model.put(ikey, rec), model.put(key.pending(rec.id), ""), model.delete(key.gone(rec.id)) }
  for _, k in ipairs(claimed) do
    compares[#compares + 1] = { key = k, exists = false }
    ops[#ops + 1] = model.put(k, rec.id)
  end
  for _, op in ipairs(extra or {}) do ops[#ops + 1] = op end
  return model.txn(b.db, { compare = compares, success = ops })
end

-- Answer an accepted operation: 202 when async, else wait for it (bounded, without holding a
-- worker: common.wait_for) and answer `done_status` (M.settle).
local function accepted(b, rec, async, extra, done_status)
  local body = { operation = rec.operation.id }
  for k, v in pairs(extra or {}) do body[k] = v end
  if async then return reply(202, body) end
  body.operation = nil
  return common.wait_for(key.instance(rec.id), rec.operation.id, b.config.sync_timeout,
    { "forge.osb.instances", "settle" }, { id = rec.id, body = body, status = done_status,
      operation = { id = rec.operation.id, type = rec.operation.type }, timeout = b.config.sync_timeout })
end

--- The answer to a sync operation once its wait ended (common.settle): `final` is the record
-- once the operation ended (false: gone), nil when the wait ended first (`why`).
function M.settle(final, ctx, why)
  local op = ctx.operation
  if final == nil then
    fail(504, "Timeout", string.format("%s of instance %s is still running %s; it goes on: poll last_operation "
      .. "or retry with accepts_incomplete=true", op.type, ctx.id,
      why == "stop" and "as the broker is stopping" or string.format("after %ds", ctx.timeout)))
  end
  if final and final.operation.id == op.id and final.operation.state == "failed" then
    fail(500, "OperationFailed", final.operation.description or (op.type .. " failed"),
      { instance_usable = final.operation.instance_usable, update_repeatable = final.operation.update_repeatable })
  end
  return reply(ctx.status, ctx.body)
end

local function require_async(plan, q, what)
  if plan.async_only and not common.truthy(q, "accepts_incomplete") then
    fail(422, "AsyncRequired", "plan " .. plan.name .. " " .. what .. " asynchronously only; add accepts_incomplete=true")
  end
  return common.truthy(q, "accepts_incomplete")
end

function M.provision(b, id, req, q)
  local body = common.body(req)
  for _, f in ipairs({ "service_id", "plan_id", "organization_guid", "space_guid" }) do common.need_string(body, f) end
  local params = common.optional_object(body, "parameters")
  local context = common.optional_object(body, "context")
  local mi = common.optional_object(body, "maintenance_info", true)
  local svc, plan = common.lookup_plan(b.registry, body.service_id, body.plan_id)
  local fingerprint = provision_fingerprint(body, params)

  local ikey = key.instance(id)
  for attempt = 1, 12 do
    local rec, rev = model.read(b.db, ikey)
    if not replaceable(rec) then
      if not util.deep_equal(rec.operation.request or {}, fingerprint) and
         not util.deep_equal(provision_fingerprint(rec, rec.parameters), fingerprint) then
        fail(409, "Conflict", "instance " .. id .. " already exists with different attributes")
      end
      if common.in_progress(rec.operation) then
        if rec.operation.type == "provision" then
          return reply(202, { operation = rec.operation.id, dashboard_url = dashboard_url(b, id) })
        end
        fail(422, "ConcurrencyError", "instance " .. id .. " has a " .. rec.operation.type .. " in progress")
      end
      return reply(200, { dashboard_url = dashboard_url(b, id) })
    end
    common.check_parameters(plan, "service_instance", "create", params)
    common.check_maintenance(plan, mi)
    local async = require_async(plan, q, "is provisioned")
    local target, terr = b.targets:choose(svc, plan, params)
    if not target then fail(500, "ServiceScriptError", terr) end
    local now = os.time()
    local new = { id = id, service_id = svc.script.id, plan_id = plan.id, service = svc.name, plan = plan.name,
      organization_guid = body.organization_guid, space_guid = body.space_guid, parameters = params,
      context = context, maintenance_info = plan.maintenance_info, state = "deploying", target = target,
      deployment_name = svc.name .. "-" .. id, operation = common.new_operation("provision", fingerprint),
      created_at = now, updated_at = now }
    local usage = quotas.change(b, rec, new)
    local added = M.render(b, svc, plan, new, nil, attempt > 1)
    if M.journal(b, new, rev, added, usage.ops, usage.compare) then
      log.info("provision accepted", { instance = id, service = svc.name, plan = plan.name, target = target,
        operation = new.operation.id, ports = new.resources.ports, ips = new.resources.ips, request_id = req.id,
        origin = req.origin })
      return accepted(b, new, async, { dashboard_url = dashboard_url(b, id) }, 201)
    end
    -- lost a race: the instance was created concurrently, or a port or IP was taken; look again
  end
  fail(503, "ServiceUnavailable", "too many concurrent changes to instance " .. id .. "; try again", { retry_after = 1 })
end

local function updateable(svc, plan)
  if plan and plan.plan_updateable ~= nil then return plan.plan_updateable end
  return svc.script.plan_updateable == true
end

function M.update(b, id, req, q)
  local body = common.body(req)
  common.need_string(body, "service_id")
  local svc = common.lookup_plan(b.registry, body.service_id)
  local new_plan = body.plan_id ~= nil and select(2, common.lookup_plan(b.registry, body.service_id,
    common.need_string(body, "plan_id"))) or nil
  local params = common.optional_object(body, "parameters")
  local context = common.optional_object(body, "context")
  local mi = common.optional_object(body, "maintenance_info", true)
  common.optional_object(body, "previous_values")
  local fingerprint = { service_id = body.service_id, plan_id = body.plan_id, parameters = params,
    maintenance_info = mi, context = context }

  local ikey = key.instance(id)
  local rec, rev = model.read(b.db, ikey)
  if not live(rec) then fail(404, "NotFound", "instance " .. id .. " does not exist") end
  if rec.service_id ~= body.service_id then
    fail(400, "BadRequest", "service_id does not match the instance's service")
  end
  if common.in_progress(rec.operation) then
    if rec.operation.type == "update" and util.deep_equal(rec.operation.request, fingerprint) then
      return reply(202, { operation = rec.operation.id })
    end
    fail(422, "ConcurrencyError", "instance " .. id .. " has a " .. rec.operation.type .. " in progress")
  end
  local busy = M.binding_busy(b, id)
  if busy then fail(422, "ConcurrencyError", "binding " .. busy .. " of instance " .. id .. " has an operation in progress") end

  local cur_plan = svc.plans[rec.plan_id]
  local plan = new_plan or cur_plan
  if not plan then fail(400, "BadRequest", "the instance's plan is no longer in the catalog; name a plan_id") end
  local plan_change = plan.id ~= rec.plan_id
  if plan_change and not updateable(svc, cur_plan) then
    fail(422, "PlanChangeNotSupported", "plan " .. (cur_plan and cur_plan.name or rec.plan_id) ..
      " cannot be changed", { instance_usable = true, update_repeatable = false })
  end
  if plan_change then
    local want = b.targets:choose(svc, plan, params or rec.parameters)
    if want and want ~= (rec.target or "local") then
      fail(422, "PlanChangeNotSupported", "plan " .. plan.name .. " deploys to target " .. want .. ", the instance "
        .. "runs on " .. (rec.target or "local") .. ": moving between targets is not supported",
        { instance_usable = true, update_repeatable = false })
    end
  end
  if plan_change and svc.script.plan_change then
    -- the service's own rule: plan_change(from, to, parameters) -> true, or why not (a string)
    local verdict, err = services.call(svc, "plan_change", cur_plan, plan, params or rec.parameters or {})
    if err then fail(500, "ServiceScriptError", "service " .. svc.name .. ": plan_change failed: " .. err) end
    if verdict ~= true then
      fail(422, "PlanChangeNotSupported", type(verdict) == "string" and verdict or ("plan " .. cur_plan.name ..
        " cannot change to " .. plan.name), { instance_usable = true, update_repeatable = false })
    end
  end
  if params then common.check_parameters(plan, "service_instance", "update", params) end
  common.check_maintenance(plan, mi)
  local params_change = params ~= nil and not util.deep_equal(params, rec.parameters or {})
  local upgrade = mi ~= nil and mi.version ~= nil and mi.version ~= (rec.maintenance_info or {}).version
  local context_change = context ~= nil and not util.deep_equal(context, rec.context or {})
  -- an async-only plan refuses every update without accepts_incomplete, a no-op one included
  local async = require_async(plan, q, "is updated")

  -- a failed instance is redeployed by the same update again (update_repeatable)
  if not plan_change and not params_change and not upgrade and rec.state ~= "failed" then
    if context_change then
      if not svc.script.allow_context_updates then
        fail(422, "ContextUpdateNotSupported", "service " .. svc.name .. " does not take context-only updates",
          { instance_usable = true, update_repeatable = false })
      end
      model.update(b.db, ikey, function(r)
        if common.in_progress(r.operation) then return false end
        r.context, r.updated_at = context, os.time()
      end)
    end
    return reply(200, {})
  end

  -- a maintenance_info upgrade alone skips the redeploy when nothing the instance runs changes
  local only_upgrade = upgrade and not plan_change and not params_change and rec.state ~= "failed"
  local outcome, updated = M.start_update(b, svc, plan, rec, rev, { parameters = params, context = context,
    to = upgrade and svc.hash or nil, skip_unchanged = only_upgrade }, common.new_operation("update", fingerprint))
  if not outcome then
    fail(422, "ConcurrencyError", "instance " .. id .. " changed while the update was being prepared")
  end
  log.info(outcome == "skipped" and "upgrade without a redeploy" or "update accepted", { instance = id,
    plan = plan.name, operation = updated.operation.id, request_id = req.id, origin = req.origin })
  if outcome == "skipped" then return reply(200, {}) end
  return accepted(b, updated, async, nil, 200)
end

local function short(hash) return hash and hash:sub(1, 12) or "?" end

--- The record `rec` would become after an update to `plan`: a rendered copy, the store keys it
-- would claim, whether what it runs changes, and the masked unified diff (forge.diff). Nothing
-- is stored. change: parameters, context (nil: kept), to (the version to move to: an upgrade;
-- nil keeps the instance's pinned version).
function M.prepare_update(b, svc, plan, rec, change)
  -- a BOSH instance's manifest lives in its own key: the diff compares it
  if (rec.target or "local") ~= "local" then rec.manifest = rec.manifest or model.manifest(b.db, rec.id) end
  local updated = util.copy(rec)
  -- after a failed update, what runs is still what ran before it
  updated.previous = rec.state == "failed" and rec.previous or { plan_id = rec.plan_id, parameters = rec.parameters,
    resources = rec.resources, maintenance_info = rec.maintenance_info, processes = rec.processes }
  updated.plan_id, updated.plan = plan.id, plan.name
  if change.parameters then updated.parameters = change.parameters end
  if change.context then updated.context = change.context end
  if change.to or plan.id ~= rec.plan_id then updated.maintenance_info = plan.maintenance_info end
  updated.state, updated.updated_at = "deploying", os.time()
  local added = M.render(b, svc, plan, updated, change.to or rec.script_hash)
  -- the secrets of both: a new version may generate one, a rotation replaces one
  local secrets = diff.secrets({ secrets = { rec.secrets, updated.secrets } }, model.range(b.db, key.bindings(rec.id)))
  local changed, text = diff.between(rec, updated, secrets, { "running (version " .. short(rec.script_hash) .. ")",
    "after (version " .. short(updated.script_hash) .. ")" })
  if changed == nil then fail(500, "InternalError", text) end
  return updated, added, changed, text
end

-- An upgrade that changes nothing the instance runs: its pin (and maintenance_info) moves in
-- the store only, recorded as a succeeded operation; no process is stopped or started.
local function move_pin(b, rec, rev, updated, op)
  local moved = util.copy(rec)
  moved.script_hash, moved.maintenance_info = updated.script_hash, updated.maintenance_info
  moved.context = updated.context
  op.state, op.finished_at, op.diff, op.skipped = "succeeded", os.time(), "", true
  op.description = "upgraded to version " .. short(updated.script_hash) .. " without a redeploy: nothing it runs changes"
  common.begin(moved, op)
  local ikey = key.instance(rec.id)
  return model.txn(b.db, { compare = { { key = ikey, mod_revision = rev } }, success = { model.put(ikey, moved) } })
    and moved
end

--- Start update operation `op` on `rec` (read at revision `rev`), or with change.skip_unchanged
-- skip it when nothing the instance runs changes (move_pin). The one path of a platform's update
-- or maintenance_info upgrade and of the fleet upgrade (forge.upgrades); op.diff holds the diff.
-- @return "started" | "skipped", the stored record | nil when the record changed meanwhile
function M.start_update(b, svc, plan, rec, rev, change, op)
  local updated, added, changed, text = M.prepare_update(b, svc, plan, rec, change)
  if change.skip_unchanged and not changed then
    local moved = move_pin(b, rec, rev, updated, op)
    return moved and "skipped", moved
  end
  op.diff = diff.capped(text)
  common.begin(updated, op)
  local usage = quotas.change(b, rec, updated)
  if not M.journal(b, updated, rev, added, usage.ops, usage.compare) then return nil end
  return "started", updated
end

function M.deprovision(b, id, req, q)
  local service_id = common.need_string(q, "service_id", "query parameter ")
  local plan_id = common.need_string(q, "plan_id", "query parameter ")
  -- the reconciler may write the record meanwhile (progress of an operation): read it again
  for _ = 1, 5 do
    local status, headers, body = M.try_deprovision(b, id, req, q, service_id, plan_id)
    if status then return status, headers, body end
  end
  fail(422, "ConcurrencyError", "instance " .. id .. " kept changing while the delete was being prepared; try again")
end

-- One attempt at a deprovision: the answer, or nothing when the record changed meanwhile.
function M.try_deprovision(b, id, req, q, service_id, plan_id)
  local ikey = key.instance(id)
  local rec, rev = model.read(b.db, ikey)
  if not live(rec) then fail(410, "Gone", "instance " .. id .. " does not exist") end
  if rec.service_id ~= service_id then fail(400, "BadRequest", "service_id does not match the instance's service") end
  local svc = b.registry.by_id[rec.service_id]
  local plan = svc and (svc.plans[plan_id] or svc.plans[rec.plan_id]) or {}
  local async = require_async(plan, q, "is deprovisioned")
  if common.in_progress(rec.operation) and rec.operation.type == "deprovision" then
    return reply(202, { operation = rec.operation.id })
  end
  if common.in_progress(rec.operation) and rec.operation.type == "update" then
    fail(422, "ConcurrencyError", "instance " .. id .. " has an update in progress")
  end
  local busy = M.binding_busy(b, id)
  if busy then fail(422, "ConcurrencyError", "binding " .. busy .. " of instance " .. id .. " has an operation in progress") end
  local op = common.new_operation("deprovision")
  -- a delete during provisioning halts the provision: the reconciler now stops the processes
  common.begin(rec, op)
  rec.state = "destroying"
  if not model.txn(b.db, { compare = { { key = ikey, mod_revision = rev } },
      success = { model.put(ikey, rec), model.put(key.pending(id), "") } }) then
    return nil
  end
  log.info("deprovision accepted", { instance = id, operation = op.id, request_id = req.id, origin = req.origin })
  return accepted(b, rec, async, nil, 200)
end

--- The maintenance_info of the plan in the version the instance is pinned to: a platform
-- compares it with the catalog's and sees a pending upgrade.
function M.pinned_maintenance_info(b, rec)
  local svc = b.registry.by_id[rec.service_id]
  local version = svc and services.version(svc, rec.script_hash, svc.registry)
  local plan = version and version.plans and version.plans[rec.plan_id]
  return plan and plan.maintenance_info or rec.maintenance_info
end

function M.fetch(b, id)
  local rec = model.read(b.db, key.instance(id))
  if not live(rec) then fail(404, "NotFound", "instance " .. id .. " does not exist") end
  if common.in_progress(rec.operation) then
    if rec.operation.type == "provision" then fail(404, "NotFound", "instance " .. id .. " is being provisioned") end
    fail(422, "ConcurrencyError", "instance " .. id .. " has a " .. rec.operation.type .. " in progress")
  end
  return reply(200, { service_id = rec.service_id, plan_id = rec.plan_id, dashboard_url = dashboard_url(b, id),
    parameters = rec.parameters or {}, maintenance_info = M.pinned_maintenance_info(b, rec),
    metadata = { labels = { deployment_name = rec.deployment_name } } })
end

function M.last_operation(b, id)
  local rec = model.read(b.db, key.instance(id))
  if not rec then
    if model.read(b.db, key.gone(id)) then fail(410, "Gone", "instance " .. id .. " was deleted") end
    fail(404, "NotFound", "instance " .. id .. " does not exist")
  end
  local headers = common.in_progress(rec.operation) and { ["Retry-After"] = "1" } or nil
  return reply(200, common.operation_body(rec.operation), headers)
end

--- The 2014 Service Forge's instance view: GET /service_instances/:id.
function M.seed_view(b, id)
  local rec = model.read(b.db, key.instance(id))
  if not live(rec) then fail(404, "NotFound", "instance " .. id .. " does not exist") end
  local processes = {}
  for name, p in pairs(rec.processes or {}) do processes[name] = { pid = p.pid, healthy = p.healthy } end
  local res = rec.resources or {}
  local bosh = rec.bosh and { task_id = rec.bosh.task or (rec.bosh.tasks and rec.bosh.tasks[1] and rec.bosh.tasks[1].id),
    tasks = rec.bosh.tasks, deployment = rec.bosh.deployment } or nil
  return reply(200, { service_id = rec.service_id, service_instance_id = rec.id, service_plan_id = rec.plan_id,
    deployment_name = rec.deployment_name, state = rec.state, organization_guid = rec.organization_guid,
    space_guid = rec.space_guid, target = rec.target or "local", host = res.host, ports = res.ports,
    network = res.network, ips = res.ips, bosh_task_id = bosh and bosh.task_id, bosh = bosh,
    processes = rec.bosh == nil and processes or nil,
    last_operation = { type = rec.operation.type, state = rec.operation.state,
      description = rec.operation.description, id = rec.operation.id } })
end

return M
