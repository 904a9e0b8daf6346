--- The reconciler: advances every in-flight operation, supervises running instances, and
-- purges old tombstones. It runs in the main thread between signal checks, so state
-- converges whether or not anybody polls, and a restarted broker resumes where it stopped.
local log = require "forge.log"
local model = require "forge.model"
local services = require "forge.services"

local key = model.key

local Reconciler = {}
Reconciler.__index = Reconciler

function Reconciler.new(config, db, registry, target)
  return setmetatable({ config = config, db = db, registry = registry, target = target,
    next_supervise = 0 }, Reconciler)
end

-- Close the operation `op_id` of instance `id` (unless another operation replaced it).
-- change(r) sets the final state; extra txn ops come back from it.
function Reconciler:finish(id, op_id, op_state, description, change)
  return model.update(self.db, key.instance(id), function(r)
    if r.operation.id ~= op_id then return false end
    r.operation.state, r.operation.description = op_state, description
    r.operation.finished_at, r.updated_at = os.time(), os.time()
    local ops = change(r) or {}
    ops[#ops + 1] = model.delete(key.pending(id))
    return ops
  end)
end

local function release_ports(r, ops)
  if r.resources and not r.resources.released then
    for _, p in ipairs(r.resources.ports or {}) do ops[#ops + 1] = model.delete(key.port(p)) end
    r.resources.released = true
  end
  return ops
end

function Reconciler:provision(rec)
  local id, op = rec.id, rec.operation
  local function record(name, identity, files_written)
    model.update(self.db, key.instance(id), function(r)
      if files_written then r.files_written = true end
      if name then
        r.processes = r.processes or {}
        r.processes[name] = identity
      end
    end)
  end
  local status, reason = self.target:step_provision(rec, record)
  if status == "wait" and os.time() - op.started_at > self.target.cfg.deploy_timeout then
    status, reason = "failed", string.format("not healthy after %ds", self.target.cfg.deploy_timeout)
  end
  if status == "done" then
    self:finish(id, op.id, "succeeded", "instance is running", function(r) r.state = "running" end)
    log.info("provision succeeded", { instance = id, operation = op.id })
  elseif status == "failed" then
    self.target:stop_all(rec)
    self:finish(id, op.id, "failed", "provision failed: " .. reason, function(r)
      r.state = "failed"
      return release_ports(r, {})
    end)
    log.warn("provision failed", { instance = id, operation = op.id, reason = reason })
  end
end

function Reconciler:deprovision(rec)
  local ok, err = self.target:destroy(rec)
  if not ok then
    log.warn("deprovision step failed, will retry", { instance = rec.id, error = err })
    return
  end
  self:finish(rec.id, rec.operation.id, "succeeded", "instance deleted", function(r)
    r.state, r.deleted_at, r.secrets, r.processes = "deleted", os.time(), nil, nil
    return release_ports(r, { { op = "delete_prefix", prefix = key.bindings(rec.id) } })
  end)
  log.info("deprovision succeeded", { instance = rec.id, operation = rec.operation.id })
end

function Reconciler:advance(id)
  local rec = model.read(self.db, key.instance(id))
  if not rec or rec.operation.state ~= "in progress" then
    model.txn(self.db, { success = { model.delete(key.pending(id)) } })
    return
  end
  if rec.operation.type == "provision" then
    self:provision(rec)
  elseif rec.operation.type == "deprovision" then
    self:deprovision(rec)
  end
end

-- Restart dead processes of running instances; purge expired tombstones and stale bindings.
function Reconciler:housekeeping(now)
  local ttl, gone_ttl = self.config.tombstone_ttl, self.config.gone_ttl
  for _, kv in ipairs(model.range(self.db, "instance/")) do
    local r = kv.value
    if r.state == "running" and r.operation.state ~= "in progress" then
      if self.target:supervise(r, now) then
        model.update(self.db, kv.key, function(cur)
          if cur.operation.id ~= r.operation.id then return false end
          cur.processes = r.processes
        end)
      end
    elseif r.state == "deleted" and now - (r.deleted_at or now) > ttl then
      model.txn(self.db, { compare = { { key = kv.key, mod_revision = kv.rev } },
        success = { model.delete(kv.key), model.put(key.gone(r.id), { deleted_at = r.deleted_at }) } })
    end
  end
  for _, kv in ipairs(model.range(self.db, "gone/")) do
    if now - (kv.value.deleted_at or 0) > ttl + gone_ttl then
      model.txn(self.db, { compare = { { key = kv.key, mod_revision = kv.rev } }, success = { model.delete(kv.key) } })
    end
  end
  for _, kv in ipairs(model.range(self.db, "binding/")) do
    local b = kv.value
    if b.state == "creating" and now - (b.updated_at or 0) > 120 then
      -- a bind interrupted by a broker crash: undo what it may have done, then forget it
      local inst = model.read(self.db, key.instance(b.instance_id))
      local svc = inst and self.registry.by_id[inst.service_id]
      if svc and inst.state == "running" then
        local res = services.call(svc, "unbind", services.binding_context(inst, b.id, { binding = b }))
        for _, cmd in ipairs(res and res.run or {}) do self.target:run(cmd) end
      end
      model.txn(self.db, { compare = { { key = kv.key, mod_revision = kv.rev } }, success = { model.delete(kv.key) } })
      log.warn("removed an interrupted binding", { instance = b.instance_id, binding = b.id })
    end
  end
end

--- One pass: advance pending operations; supervise every supervise_interval seconds.
function Reconciler:tick(now)
  for _, kv in ipairs(model.range(self.db, "pending/")) do
    local id = kv.key:sub(#"pending/" + 1)
    local ok, err = pcall(self.advance, self, id)
    if not ok then log.error("reconciler failed on an instance", { instance = id, error = tostring(err) }) end
  end
  if now >= self.next_supervise then
    self.next_supervise = now + self.config.supervise_interval
    local ok, err = pcall(self.housekeeping, self, now)
    if not ok then log.error("reconciler housekeeping failed", { error = tostring(err) }) end
  end
end

return Reconciler
