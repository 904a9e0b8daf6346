--- The Open Service Broker API (v2.x) on top of the store, the services and the local target.
--
-- Every request: basic auth (401) and the X-Broker-API-Version header (412) are checked before
-- the body is parsed or anything is looked up. A handler validates, journals its intent in the
-- store and answers; slow work (starting and stopping processes) is left to the reconciler.
-- Any 4xx leaves the store unchanged.
local crypto = require "forge.crypto"
local log = require "forge.log"
local model = require "forge.model"
local services = require "forge.services"
local util = require "forge.util"

local fail, key = model.fail, model.key

local Broker = {}
Broker.__index = Broker

--- New broker over an open store, a service registry, a config and the local target driver.
function Broker.new(config, db, registry, target)
  local user, pass = config.auth.username, config.auth.password
  return setmetatable({ config = config, db = db, registry = registry, target = target,
    auth_token = "Basic " .. crypto.base64_encode(user .. ":" .. pass) }, Broker)
end

-- ---------------------------------------------------------------------------------------
-- responses

local JSON = { ["Content-Type"] = "application/json" }

local function reply(status, body, headers)
  local h = {}
  for k, v in pairs(JSON) do h[k] = v end
  for k, v in pairs(headers or {}) do h[k] = v end
  return status, h, type(body) == "string" and body or util.json_encode(body or {})
end

local function error_reply(e)
  local body = { error = e.error, description = e.description }
  for _, k in ipairs({ "instance_usable", "update_repeatable" }) do
    if e[k] ~= nil then body[k] = e[k] end
  end
  local headers = e.status == 401 and { ["WWW-Authenticate"] = 'Basic realm="forge"' } or {}
  if e.retry_after then headers["Retry-After"] = tostring(e.retry_after) end
  return reply(e.status, body, headers)
end

-- ---------------------------------------------------------------------------------------
-- request checks

-- Ids are opaque to OSB, but they become store keys and directory names here.
local function check_id(id, what)
  if #id == 0 or #id > 255 then fail(400, "BadRequest", what .. " must be 1 to 255 characters") end
  if not id:match("^[%w][%w%.%-_~:]*$") or id:find("..", 1, true) then
    fail(400, "BadRequest", what .. " may contain only letters, digits and . - _ ~ : (no '..', no '/')")
  end
end

local function check_auth(self, req)
  local given = req.headers.authorization or ""
  if not crypto.equal(given, self.auth_token) then
    fail(401, "Unauthorized", "missing or wrong broker credentials")
  end
end

local function check_version(req)
  local v = req.headers["x-broker-api-version"]
  if not v or v == "" then fail(412, "PreconditionFailed", "the X-Broker-API-Version header is required") end
  if not v:match("^2%.%d+$") then
    fail(412, "PreconditionFailed", "X-Broker-API-Version " .. v .. " is not supported; this broker speaks 2.x")
  end
end

local function parse_body(req)
  if req.body == "" then fail(400, "BadRequest", "the request body must be a JSON object") end
  local body, err = util.json_decode(req.body)
  if type(body) ~= "table" then
    fail(400, "BadRequest", "the request body is not valid JSON: " .. tostring(err or "expected an object"))
  end
  return body
end

local function need_string(t, field, where)
  local v = t[field]
  if type(v) ~= "string" or v == "" then fail(400, "BadRequest", (where or "") .. field .. " is required") end
  return v
end

local function optional_object(t, field)
  local v = t[field]
  if v ~= nil and v ~= util.null and type(v) ~= "table" then fail(400, "BadRequest", field .. " must be an object") end
  return v ~= util.null and v or nil
end

-- The service and plan named by a request; 400 when unknown.
function Broker:lookup_plan(service_id, plan_id)
  local svc = self.registry.by_id[service_id]
  if not svc then fail(400, "BadRequest", "unknown service_id '" .. service_id .. "'") end
  local plan = svc.plans[plan_id]
  if not plan then fail(400, "BadRequest", "unknown plan_id '" .. plan_id .. "' for service " .. svc.name) end
  return svc, plan
end

local function truthy_query(q, name) return q[name] == "true" end

-- ---------------------------------------------------------------------------------------
-- catalog

function Broker:catalog()
  return reply(200, self.registry.catalog_json)
end

-- ---------------------------------------------------------------------------------------
-- instances

local function new_operation(kind)
  return { id = kind .. "-" .. crypto.token(6), type = kind, state = "in progress",
    started_at = os.time() }
end

local function live(rec) return rec and rec.state ~= "deleted" end

local function same_provision(rec, body)
  return rec.service_id == body.service_id and rec.plan_id == body.plan_id
    and rec.organization_guid == body.organization_guid and rec.space_guid == body.space_guid
    and util.deep_equal(rec.parameters or {}, body.parameters or {})
end

function Broker:dashboard_url(id)
  return "http://" .. self.config.listen .. "/service_instances/" .. id
end

-- Render a deployment for a new instance: ports, secrets, the service's deploy hook.
function Broker:render(svc, plan, rec)
  local count = 1
  if svc.script.ports then
    local n, err = services.call(svc, "ports", plan, rec.parameters or {})
    count = math.tointeger(n)
    if not count or count < 1 then
      fail(500, "ServiceScriptError", "service " .. svc.name .. ": ports() must return a positive integer"
        .. (err and (": " .. err) or ""))
    end
  end
  local ports, perr = self.target:allocate_ports(self.db, count)
  if not ports then fail(503, "ServiceUnavailable", perr, { retry_after = 30 }) end
  rec.resources = { ports = ports, host = self.target.cfg.host }
  rec.secrets = rec.secrets or {}
  local ctx = {
    instance_id = rec.id, plan = plan, parameters = rec.parameters or {}, context = rec.context or {},
    host = self.target.cfg.host, ports = ports, dir = self.target:instance_dir(rec.id),
    secret = function(name)
      rec.secrets[name] = rec.secrets[name] or crypto.password(32)
      return rec.secrets[name]
    end,
  }
  local deployment, err = services.call(svc, "deploy", ctx)
  if not deployment then fail(500, "ServiceScriptError", "service " .. svc.name .. " failed to render: " .. err) end
  if type(deployment) ~= "table" or type(deployment.processes) ~= "table" or #deployment.processes == 0 then
    fail(500, "ServiceScriptError", "service " .. svc.name .. ": deploy must return {processes = {...}}")
  end
  rec.deployment = deployment
end

function Broker:provision(id, req, q)
  local body = parse_body(req)
  for _, f in ipairs({ "service_id", "plan_id", "organization_guid", "space_guid" }) do need_string(body, f) end
  local params = optional_object(body, "parameters")
  local context = optional_object(body, "context")
  local svc, plan = self:lookup_plan(body.service_id, body.plan_id)
  body.parameters = params

  local ikey = key.instance(id)
  for _ = 1, 5 do
    local rec, rev = model.read(self.db, ikey)
    if live(rec) then
      if not same_provision(rec, body) then
        fail(409, "Conflict", "instance " .. id .. " already exists with different attributes")
      end
      if rec.operation.type == "provision" and rec.operation.state == "in progress" then
        return reply(202, { operation = rec.operation.id, dashboard_url = self:dashboard_url(id) })
      end
      return reply(200, { dashboard_url = self:dashboard_url(id) })
    end
    if not truthy_query(q, "accepts_incomplete") then
      fail(422, "AsyncRequired", "plan " .. plan.name .. " is provisioned asynchronously; add accepts_incomplete=true")
    end
    local now = os.time()
    local new = { id = id, service_id = svc.script.id, plan_id = plan.id, service = svc.name, plan = plan.name,
      organization_guid = body.organization_guid, space_guid = body.space_guid, parameters = params,
      context = context, state = "deploying", target = "local", deployment_name = svc.name .. "-" .. id,
      script_hash = svc.hash, operation = new_operation("provision"), created_at = now, updated_at = now }
    self:render(svc, plan, new)
    local compares = { { key = ikey, mod_revision = rev } }
    local ops = { model.put(ikey, new), model.put(key.pending(id), "") , model.delete(key.gone(id)) }
    for _, p in ipairs(new.resources.ports) do
      compares[#compares + 1] = { key = key.port(p), exists = false }
      ops[#ops + 1] = model.put(key.port(p), id)
    end
    if model.txn(self.db, { compare = compares, success = ops }) then
      log.info("provision accepted", { instance = id, service = svc.name, plan = plan.name,
        operation = new.operation.id, ports = new.resources.ports, request_id = req.id })
      return reply(202, { operation = new.operation.id, dashboard_url = self:dashboard_url(id) })
    end
    -- lost a race: the instance was created concurrently, or a port was taken; look again
  end
  fail(503, "ServiceUnavailable", "too many concurrent changes to instance " .. id .. "; try again",
    { retry_after = 1 })
end

function Broker:deprovision(id, req, q)
  need_string(q, "service_id", "query parameter ")
  need_string(q, "plan_id", "query parameter ")
  local ikey = key.instance(id)
  local rec = model.read(self.db, ikey)
  if not live(rec) then fail(410, "Gone", "instance " .. id .. " does not exist") end
  if rec.operation.type == "deprovision" and rec.operation.state == "in progress" then
    return reply(202, { operation = rec.operation.id })
  end
  if not truthy_query(q, "accepts_incomplete") then
    fail(422, "AsyncRequired", "instances are deprovisioned asynchronously; add accepts_incomplete=true")
  end
  local op = new_operation("deprovision")
  local stored = model.update(self.db, ikey, function(r)
    if not live(r) then return false end
    r.history = r.history or {}
    table.insert(r.history, 1, r.operation)
    while #r.history > 20 do table.remove(r.history) end
    -- a delete during provisioning halts the provision: the reconciler now stops processes
    r.operation, r.state, r.updated_at = op, "destroying", os.time()
    return { model.put(key.pending(id), "") }
  end)
  if not stored then fail(410, "Gone", "instance " .. id .. " does not exist") end
  log.info("deprovision accepted", { instance = id, operation = op.id, request_id = req.id })
  return reply(202, { operation = op.id })
end

local function operation_body(op)
  local body = { state = op.state }
  if op.description and op.description ~= "" then body.description = op.description end
  return body
end

function Broker:last_operation(id)
  local rec = model.read(self.db, key.instance(id))
  if not rec then
    if model.read(self.db, key.gone(id)) then fail(410, "Gone", "instance " .. id .. " was deleted") end
    fail(404, "NotFound", "instance " .. id .. " does not exist")
  end
  local headers = rec.operation.state == "in progress" and { ["Retry-After"] = "1" } or nil
  return reply(200, operation_body(rec.operation), headers)
end

-- ---------------------------------------------------------------------------------------
-- bindings

local function same_binding(rec, body)
  return rec.service_id == body.service_id and rec.plan_id == body.plan_id
    and util.deep_equal(rec.parameters or {}, body.parameters or {})
    and util.deep_equal(rec.bind_resource or {}, body.bind_resource or {})
end

-- The instance a binding belongs to, which must be running.
function Broker:running_instance(iid)
  local inst = model.read(self.db, key.instance(iid))
  if not live(inst) then fail(404, "NotFound", "instance " .. iid .. " does not exist") end
  if inst.state ~= "running" then
    fail(422, inst.operation.state == "in progress" and "ConcurrencyError" or "InstanceNotReady",
      "Service Instance not ready for binding; state " .. inst.state)
  end
  return inst
end

function Broker:run_all(cmds)
  for _, cmd in ipairs(cmds or {}) do
    local ok, err = self.target:run(cmd)
    if not ok then return nil, err end
  end
  return true
end

function Broker:bind(iid, bid, req)
  local body = parse_body(req)
  need_string(body, "service_id")
  need_string(body, "plan_id")
  body.parameters = optional_object(body, "parameters")
  body.bind_resource = optional_object(body, "bind_resource")
  local svc = self:lookup_plan(body.service_id, body.plan_id)
  if not svc.script.bindable then fail(400, "BadRequest", "service " .. svc.name .. " is not bindable") end
  local inst = self:running_instance(iid)
  if inst.service_id ~= body.service_id then
    fail(400, "BadRequest", "service_id does not match the instance's service")
  end

  local bkey = key.binding(iid, bid)
  local existing, rev = model.read(self.db, bkey)
  if existing then
    if not same_binding(existing, body) then
      fail(409, "Conflict", "binding " .. bid .. " already exists with different attributes")
    end
    if existing.state == "created" then return reply(200, { credentials = existing.credentials }) end
    fail(422, "ConcurrencyError", "binding " .. bid .. " is being " .. existing.state)
  end

  local result, err = services.call(svc, "bind", services.binding_context(inst, bid, { parameters = body.parameters or {} }))
  if not result then fail(500, "ServiceScriptError", "service " .. svc.name .. " bind failed: " .. err) end
  if type(result) ~= "table" or type(result.credentials) ~= "table" then
    fail(500, "ServiceScriptError", "service " .. svc.name .. ": bind must return {credentials = {...}}")
  end
  -- journal the intent (with the unbind steps) before touching the instance
  local now = os.time()
  local rec = { id = bid, instance_id = iid, service_id = body.service_id, plan_id = body.plan_id,
    parameters = body.parameters, bind_resource = body.bind_resource, state = "creating",
    credentials = result.credentials, created_at = now, updated_at = now }
  if not model.txn(self.db, { compare = { { key = bkey, mod_revision = rev } }, success = { model.put(bkey, rec) } }) then
    fail(422, "ConcurrencyError", "binding " .. bid .. " is being created by another request")
  end
  local ok, rerr = self:run_all(result.run)
  if not ok then
    self:run_all((services.call(svc, "unbind", services.binding_context(inst, bid, { binding = rec })) or {}).run)
    model.txn(self.db, { success = { model.delete(bkey) } })
    fail(502, "BindFailed", "could not create the binding on instance " .. iid .. ": " .. rerr)
  end
  rec.state = "created"
  model.txn(self.db, { success = { model.put(bkey, rec) } })
  log.info("binding created", { instance = iid, binding = bid, request_id = req.id })
  return reply(201, { credentials = rec.credentials })
end

function Broker:unbind(iid, bid, req, q)
  need_string(q, "service_id", "query parameter ")
  need_string(q, "plan_id", "query parameter ")
  local bkey = key.binding(iid, bid)
  local rec, rev = model.read(self.db, bkey)
  if not rec then fail(410, "Gone", "binding " .. bid .. " does not exist") end
  local inst = model.read(self.db, key.instance(iid))
  local svc = inst and self.registry.by_id[inst.service_id]
  if live(inst) and inst.state == "running" and svc then
    local result, err = services.call(svc, "unbind", services.binding_context(inst, bid, { binding = rec }))
    if not result then fail(500, "ServiceScriptError", "service " .. svc.name .. " unbind failed: " .. err) end
    local ok, rerr = self:run_all(result.run)
    if not ok then fail(502, "UnbindFailed", "could not remove the binding from instance " .. iid .. ": " .. rerr) end
  end
  if not model.txn(self.db, { compare = { { key = bkey, mod_revision = rev } }, success = { model.delete(bkey) } }) then
    fail(422, "ConcurrencyError", "binding " .. bid .. " changed while it was being deleted")
  end
  log.info("binding deleted", { instance = iid, binding = bid, request_id = req.id })
  return reply(200, {})
end

-- ---------------------------------------------------------------------------------------
-- routing

-- segments -> handler name; ":" marks an id segment
local ROUTES = {
  { { "v2", "catalog" }, { GET = "catalog" } },
  { { "v2", "service_instances", ":" }, { PUT = "provision", DELETE = "deprovision" } },
  { { "v2", "service_instances", ":", "last_operation" }, { GET = "last_operation" } },
  { { "v2", "service_instances", ":", "service_bindings", ":" }, { PUT = "bind", DELETE = "unbind" } },
}

local function match(segs)
  for _, r in ipairs(ROUTES) do
    local pattern, ids = r[1], {}
    if #pattern == #segs then
      local ok = true
      for i, p in ipairs(pattern) do
        if p == ":" then ids[#ids + 1] = segs[i] elseif p ~= segs[i] then ok = false break end
      end
      if ok then return r[2], ids end
    end
  end
end

function Broker:route(req)
  local path, qs = req.uri:match("^([^?#]*)%??([^#]*)")
  local segs, perr = util.split_path(path or "")
  if not segs then fail(400, "BadRequest", perr) end
  if #segs == 1 and segs[1] == "healthz" then return reply(200, { status = "ok" }) end
  check_auth(self, req)
  local methods, ids = match(segs)
  if not methods then fail(404, "NotFound", "no such endpoint: " .. req.method .. " " .. path) end
  check_version(req)
  local name = methods[req.method]
  if not name then fail(405, "MethodNotAllowed", req.method .. " is not allowed on " .. path) end
  local q, qerr = util.parse_query(qs)
  if not q then fail(400, "BadRequest", qerr) end
  check_id(ids[1] or "x", "instance id")
  check_id(ids[2] or "x", "binding id")
  if #ids == 2 then return self[name](self, ids[1], ids[2], req, q) end
  if #ids == 1 then return self[name](self, ids[1], req, q) end
  return self[name](self, req, q)
end

local function log_identity(req)
  local origin = req.headers["x-broker-api-originating-identity"]
  local fields = { request_id = req.id, method = req.method, uri = req.uri,
    platform_request = req.headers["x-broker-api-request-identity"] }
  if origin then
    local platform, value = origin:match("^(%S+)%s+(%S+)$")
    local decoded = value and crypto.base64_decode(value)
    fields.origin = platform and { platform = platform, identity = decoded and util.json_decode(decoded) or value } or origin
  end
  log.debug("request", fields)
end

--- Answer one request: status, headers, body. Never raises.
function Broker:handle(req)
  log_identity(req)
  local ok, status, headers, body = xpcall(self.route, function(e)
    if type(e) == "table" and e.status then return e end
    return { trace = debug.traceback(tostring(e), 2) }
  end, self, req)
  if not ok then
    local e = status
    if e.trace then
      log.error("request failed", { request_id = req.id, error = e.trace })
      e = { status = 500, error = "InternalError", description = "the broker failed on this request (id " .. req.id .. ")" }
    end
    status, headers, body = error_reply(e)
  end
  local rid = req.headers["x-broker-api-request-identity"]
  if rid then headers["X-Broker-API-Request-Identity"] = rid end
  return status, headers, body
end

return Broker
