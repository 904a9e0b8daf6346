--- Shared pieces of the OSB handlers: responses, request checks, operations, sync waits.
local crypto = require "forge.crypto"
local model = require "forge.model"
local request = require "forge.request"
local schema = require "forge.schema"
local util = require "forge.util"

local M = {}
local fail = model.fail
M.fail = fail

--- A JSON response.
function M.reply(status, body, headers)
  local h = { ["Content-Type"] = "application/json" }
  for k, v in pairs(headers or {}) do h[k] = v end
  return status, h, type(body) == "string" and body or util.json_answer(body or {})
end

--- An OSB error response from a broker error table.
function M.error_reply(e)
  local body = { error = e.error, description = e.description }
  for _, k in ipairs({ "instance_usable", "update_repeatable" }) do
    if e[k] ~= nil then body[k] = e[k] end
  end
  local headers = e.status == 401 and { ["WWW-Authenticate"] = 'Basic realm="forge"' } or {}
  if e.retry_after then headers["Retry-After"] = tostring(e.retry_after) end
  return M.reply(e.status, body, headers)
end

--- Ids are opaque to OSB, but they become store keys and directory names here.
function M.check_id(id, what)
  if #id == 0 or #id > 255 then fail(400, "BadRequest", what .. " must be 1 to 255 characters") end
  if not id:match("^[%w][%w%.%-_~:]*$") or id:find("..", 1, true) then
    fail(400, "BadRequest", what .. " may contain only letters, digits and . - _ ~ : (no '..', no '/')")
  end
end

--- The request body as a table; 400 when it is not an object.
function M.body(req)
  local body, err, code = request.body(req)
  if not body then fail(400, code or "BadRequest", err) end
  return body
end

function M.need_string(t, field, where)
  local v = t[field]
  if type(v) ~= "string" or v == "" then fail(400, "BadRequest", (where or "") .. field .. " is required") end
  return v
end

--- An optional object field: nil when absent, null or {} where `empty_is_absent`.
function M.optional_object(t, field, empty_is_absent)
  local v = t[field]
  if v == nil or v == util.null then return nil end
  if type(v) ~= "table" or v[1] ~= nil then fail(400, "BadRequest", field .. " must be an object") end
  if empty_is_absent and next(v) == nil then return nil end
  return v
end

function M.truthy(q, name) return q[name] == "true" end

--- The service and plan named by ids; 400 when unknown.
function M.lookup_plan(registry, service_id, plan_id)
  local svc = registry.by_id[service_id]
  if not svc then fail(400, "BadRequest", "unknown service_id '" .. service_id .. "'") end
  if plan_id == nil then return svc end
  local plan = svc.plans[plan_id]
  if not plan then fail(400, "BadRequest", "unknown plan_id '" .. plan_id .. "' for service " .. svc.name) end
  return svc, plan
end

--- Validate parameters against the plan's schema at schemas.<kind>.<action>.parameters; a plan
-- without that schema accepts no parameters.
function M.check_parameters(plan, kind, action, params)
  local s = plan.schemas and plan.schemas[kind] and plan.schemas[kind][action]
  s = s and s.parameters
  if not s then
    -- no schema: nothing could say which values are safe to hand to the service
    if type(params) == "table" and next(params) ~= nil then
      fail(400, "BadRequest", "parameters are not accepted by plan " .. plan.name .. " (it has no " .. kind .. " "
        .. action .. " parameter schema)")
    end
    return
  end
  local ok, msg = schema.validate(s, params or {}, "parameters")
  if not ok then fail(400, "BadRequest", "invalid parameters: " .. msg) end
end

--- maintenance_info.version must match the plan's (an empty object counts as absent).
function M.check_maintenance(plan, mi)
  if mi == nil or mi.version == nil then return end
  local current = plan.maintenance_info and plan.maintenance_info.version
  if mi.version ~= current then
    fail(422, "MaintenanceInfoConflict", string.format("maintenance_info.version %s does not match the catalog's %s",
      tostring(mi.version), tostring(current or "(none)")))
  end
end

--- A new operation record.
function M.new_operation(kind, request_fingerprint)
  return { id = kind .. "-" .. crypto.token(6), type = kind, state = "in progress", started_at = os.time(),
    request = request_fingerprint }
end

--- Make `op` the operation of record `rec`; the current one goes first in its history (the
-- last 20 are kept).
function M.begin(rec, op)
  rec.history = rec.history or {}
  table.insert(rec.history, 1, rec.operation)
  while #rec.history > 20 do table.remove(rec.history) end
  rec.operation, rec.updated_at = op, os.time()
end

function M.in_progress(op) return op ~= nil and op.state == "in progress" end

--- last_operation body of an operation.
function M.operation_body(op)
  local body = { state = op.state }
  if op.description and op.description ~= "" then body.description = op.description end
  if op.state == "failed" then
    body.instance_usable = op.instance_usable
    body.update_repeatable = op.update_repeatable
  end
  return body
end

--- A sync request's wait, at most `timeout` seconds, for the reconciler to finish operation
-- `op_id` of the record at `key`, as the handler's answer (status M.WAIT): forge.app parks the
-- request, so no worker is held, and polls it with M.poll_wait until the operation ends, the
-- timeout passes or the broker stops; then M.settle builds the answer with the function named
-- by done = {module, name}: done(final, ctx, why).
function M.wait_for(key, op_id, timeout, done, ctx)
  return M.WAIT, {}, { key = key, op_id = op_id, timeout = timeout, done = done, ctx = ctx }
end

M.WAIT = "wait"

--- One look at a wait (M.wait_for): the record once the operation is no longer in progress
-- (false: the record is gone), nil while it is.
function M.poll_wait(db, wait)
  local rec = model.read(db, wait.key)
  if not rec or not rec.operation or rec.operation.id ~= wait.op_id or not M.in_progress(rec.operation) then
    return rec or false
  end
end

--- The answer to a wait that ended: `final` as M.poll_wait found it, nil when the wait ended first
-- (`why`: "timeout", or "stop" when the broker stops).
function M.settle(wait, final, why)
  return require(wait.done[1])[wait.done[2]](final, wait.ctx, why)
end

return M
