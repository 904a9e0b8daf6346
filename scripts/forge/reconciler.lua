--- The reconciler: advances every journaled operation (provision, update, deprovision, async
-- bind and unbind), supervises running instances, and purges old tombstones. It runs in the
-- main thread between signal checks, so state converges whether or not anybody polls, and a
-- restarted broker resumes where it stopped.
local backups = require "forge.backups"
local bindings = require "forge.osb.bindings"
local crypto = require "forge.crypto"
local instances = require "forge.osb.instances"
local log = require "forge.log"
local model = require "forge.model"
local proc = require "forge.proc"
local quotas = require "forge.quotas"
local Schedule = require "forge.schedule"
local telemetry = require "forge.telemetry"
local upgrades = require "forge.upgrades"
local util = require "forge.util"

local key = model.key

local Reconciler = {}
Reconciler.__index = Reconciler

-- Records stored before the housekeeping indexes existed get their entries once (batches of
-- 100 ops: etcd's default limit per transaction), then a marker says it is done.
local INDEXED = "index/housekeeping"

local function index_existing(db)
  if model.read(db, INDEXED) then return end
  local ops = {}
  local function flush()
    if #ops > 0 then model.txn(db, { success = ops }) end
    ops = {}
  end
  for _, prefix in ipairs({ "instance/", "binding/", "gone/", "port/" }) do
    model.each(db, prefix, function(kv)
      for _, op in ipairs(model.index_ops({ op = "put", key = kv.key }, kv.value, {})) do
        if op.op == "put" then ops[#ops + 1] = op end
      end
      if #ops >= 100 then flush() end
    end)
  end
  flush()
  model.txn(db, { success = { model.put(INDEXED, { version = 1 }) } })
end

--- targets: the registry of target drivers (forge.targets); each record names its target.
function Reconciler.new(config, db, registry, targets)
  -- this replica's identity in operation locks
  local f = io.open("/proc/sys/kernel/hostname")
  local host = f and f:read("l") or "unknown"
  if f then f:close() end
  local pid = proc.getpid()
  quotas.recount(db, config.quotas)
  local r = setmetatable({ config = config, db = db, registry = registry, targets = targets,
    next_supervise = 0, replica = crypto.token(8), host = host, pid = pid,
    start_time = proc.identity(pid), schedule = Schedule.new() }, Reconciler)
  -- a record this thread stores running with processes is supervised from its next pass on
  model.on_instance = function(id, rec)
    if rec and rec.state == "running" and rec.processes and not r.schedule:has(id) then r.schedule:set(id, 0) end
  end
  return r
end

--- The start-up work that reads every record, once the broker already serves (forge.serve
-- calls it after listening; the first pass otherwise), so the first answer does not wait for
-- it: indexing a store from before the indexes (once in a store's life), then the metrics'
-- seed, which passes advance page by page for at most SEED_SLICE seconds each, so signals and
-- operations are not held up by it.
function Reconciler:start_up()
  if self.started then return end
  index_existing(self.db)
  self:seed_metrics()
  self.started = true
  self:advance_seed(os.time())                 -- a small store is seeded at once
end

local SEED_SLICE = 0.05

-- Start the metrics' seed over (advanced by advance_seed).
function Reconciler:seed_metrics()
  local db = self.db
  self.seeding = coroutine.create(function() telemetry.seed(db, coroutine.yield) end)
end

-- Advance the metrics' seed by a slice; a failed seed starts over next pass.
function Reconciler:advance_seed(now)
  local deadline = proc.monotonic() + SEED_SLICE
  repeat
    local ok, err = coroutine.resume(self.seeding)
    if not ok then
      self:seed_metrics()
      return self:report("the metrics' seed failed", err, now)
    end
    if coroutine.status(self.seeding) == "dead" then self.seeding = nil end
  until not self.seeding or proc.monotonic() >= deadline
end

-- The driver of an instance record; raises when its target is not configured (the operation
-- stays pending and the error is logged each pass).
function Reconciler:target_of(rec)
  local d, err = self.targets:of(rec)
  if not d then error(err, 0) end
  return d
end

-- Close operation `op_id` of the record at `rkey` (unless another operation replaced it).
-- change(r) sets the final state and may return extra txn ops.
function Reconciler:finish(rkey, pending, op_id, op_state, description, change)
  local stored = model.update(self.db, rkey, function(r)
    if r.operation.id ~= op_id then return false end
    r.operation.state, r.operation.description = op_state, description
    r.operation.finished_at, r.updated_at = os.time(), os.time()
    local ops = change(r) or {}
    ops[#ops + 1] = model.delete(pending)
    return ops
  end)
  if stored then telemetry.finished(stored.operation.type, op_state) end
  return stored
end

-- How long a pool port that another program was found holding stays out of allocation.
local OUTSIDER_HOLD = 600
local PORT_MOVES = 3

-- A provision whose process could not bind its port: another program took it after it was
-- allocated. Mark the ports that are taken as held by an outsider for a while, render the
-- instance again on other ports, and start over. Returns true when the provision goes on.
function Reconciler:move_ports(rec, target)
  local op = rec.operation
  local svc = self.registry.by_id[rec.service_id]
  local plan = svc and svc.plans[rec.plan_id]
  if not plan or (op.port_moves or 0) >= PORT_MOVES then return false end
  target:stop_all(rec)
  local cur, rev = model.read(self.db, key.instance(rec.id))
  if not cur or cur.operation.id ~= op.id then return true end
  local keep, held = {}, {}
  for _, p in ipairs(cur.resources.ports) do
    if proc.port_free(p, target.cfg.host) then keep[#keep + 1] = p else held[#held + 1] = p end
  end
  cur.resources.ports = keep
  cur.processes, cur.initialized = {}, {}
  local ok, added = pcall(instances.render, self, svc, plan, cur, cur.script_hash, true)
  if not ok then return false end
  cur.operation.port_moves = (op.port_moves or 0) + 1
  cur.operation.started_at = os.time()        -- the deploy timeout counts from the new start
  cur.operation.description = "port(s) " .. table.concat(held, ", ") .. " taken by another program; moved to "
    .. table.concat(cur.resources.ports, ", ")
  local marks, held_until = {}, os.time() + OUTSIDER_HOLD
  for _, p in ipairs(held) do marks[#marks + 1] = model.put(key.port(p), { outsider = true, until_ = held_until }) end
  if instances.journal(self, cur, rev, added, marks) then
    log.warn("ports taken by another program, provision moved", { instance = rec.id, held = held,
      ports = cur.resources.ports })
  end
  return true
end

local function release_ports(ports, ops)
  for _, p in ipairs(ports or {}) do ops[#ops + 1] = model.delete(key.port(p)) end
  return ops
end

local function in_list(list, v)
  for _, x in ipairs(list or {}) do if x == v then return true end end
  return false
end

-- Persist a spawned process (or that the files are written) at once, before anything else.
function Reconciler:recorder(id)
  return function(name, identity, files_written, initialized)
    model.update(self.db, key.instance(id), function(r)
      if files_written then r.files_written = true end
      if initialized then
        r.initialized = r.initialized or {}
        r.initialized[initialized] = true
      end
      if name then
        r.processes = r.processes or {}
        r.processes[name] = identity
      end
    end)
  end
end

-- Re-create every binding on a redeployed instance (new nodes need the binding's user too).
function Reconciler:reapply_bindings(inst)
  local svc = self.registry.by_id[inst.service_id]
  for _, kv in ipairs(model.range(self.db, key.bindings(inst.id))) do
    if kv.value.state == "created" then
      local creds, err = bindings.apply(self, svc, inst, kv.value, true)
      if not creds then return nil, "binding " .. kv.value.id .. ": " .. err end
      -- the topology may have changed (a grown cluster lists more endpoints): keep what bind said
      if not util.deep_equal(creds, kv.value.credentials) then
        model.update(self.db, kv.key, function(r)
          if r.state ~= "created" then return false end
          r.credentials, r.updated_at = creds, os.time()
        end)
      end
    end
  end
  return true
end

-- Save fn's change to the record of `rec` while it still has the same operation.
function Reconciler:saver(rec)
  return function(fn)
    return model.update(self.db, key.instance(rec.id), function(r)
      if r.operation.id ~= rec.operation.id then return false end
      return fn(r)
    end)
  end
end

-- An in-progress operation's description, stored when it changed (BOSH task state, outage).
function Reconciler:describe(rec, description)
  if not description or description == rec.operation.description then return end
  self:saver(rec)(function(r) r.operation.description = description end)
end

-- A BOSH deploy (provision or update): the driver starts or finds the task and polls it.
function Reconciler:deploy_bosh(rec, target)
  local id, op = rec.id, rec.operation
  rec.manifest = rec.manifest or model.manifest(self.db, id)
  local status, reason = target:advance(rec, "deploy", self:saver(rec), proc.monotonic())
  if status == "wait" then return self:describe(rec, reason) end
  target:forget(id)
  if status == "done" then
    self:finish(key.instance(id), key.pending(id), op.id, "succeeded",
      (op.type == "update" and "instance updated" or "instance is running") .. " (" .. reason .. ")", function(r)
        r.state = "running"
        local ops = {}
        if r.previous then
          local old = r.previous.resources or {}
          if old.network then target:release_unused(old.network, old.ips, r.resources.ips, ops) end
          r.previous = nil
        end
        return ops
      end)
    log.info(op.type .. " succeeded", { instance = id, operation = op.id, target = target.name })
  else
    -- the IPs stay reserved: the deployment may hold them; deprovision releases them
    self:finish(key.instance(id), key.pending(id), op.id, "failed", op.type .. " failed: " .. reason, function(r)
      r.state = "failed"
      r.operation.instance_usable = false
      if op.type == "update" then r.operation.update_repeatable = true end
    end)
    log.warn(op.type .. " failed", { instance = id, operation = op.id, target = target.name, reason = reason })
  end
end

local DONE = { update = "instance updated", restart = "instance restarted" }

function Reconciler:deploy(rec)
  local id, op = rec.id, rec.operation
  local ikey, pending = key.instance(id), key.pending(id)
  local target = self:target_of(rec)
  if target.kind == "bosh" then return self:deploy_bosh(rec, target) end
  if (op.type == "update" or op.type == "restart") and not op.stopped then
    -- redeploy (or an operator's restart): stop what runs now, then start the deployment like a provision
    local ok, err = target:stop_all(rec)
    if not ok then return log.warn("update: stopping failed, will retry", { instance = id, error = err }) end
    rec = model.update(self.db, ikey, function(r)
      if r.operation.id ~= op.id then return false end
      r.processes, r.operation.stopped = {}, true
    end)
    if not rec then return end
  end
  -- a step that raises fails its operation (it would otherwise be retried, and hang, for ever)
  local sok, status, reason, log_tail = pcall(target.step_provision, target, rec, self:recorder(id))
  if not sok then
    log.error("provision step raised", { instance = id, error = tostring(status) })
    status, reason = "failed", "internal error: " .. tostring(status)
  end
  if status == "wait" and os.time() - op.started_at > target.cfg.deploy_timeout then
    status, reason = "failed", string.format("not healthy after %ds%s%s", target.cfg.deploy_timeout,
      reason and (": " .. reason) or "", log_tail and ("; " .. log_tail) or "")
  elseif status == "wait" then
    self:describe(rec, reason)
  end
  if status == "done" and op.type == "update" then
    local ok, err = self:reapply_bindings(rec)
    if not ok then status, reason = "failed", err end
  end
  if status == "done" then
    self:finish(ikey, pending, op.id, "succeeded", DONE[op.type] or "instance is running",
      function(r)
        r.state = "running"
        local ops = {}
        if r.previous then
          local old = r.previous.resources and r.previous.resources.ports or {}
          for _, p in ipairs(old) do
            if not in_list(r.resources.ports, p) then release_ports({ p }, ops) end
          end
          target:remove_stale(r)
          r.previous = nil
        end
        return ops
      end)
    log.info(op.type .. " succeeded", { instance = id, operation = op.id })
  elseif status == "failed" and op.type == "provision" and tostring(reason):find("Address already in use", 1, true)
      and self:move_ports(rec, target) then
    return
  elseif status == "failed" then
    target:stop_all(rec)
    self:finish(ikey, pending, op.id, "failed", op.type .. " failed: " .. reason, function(r)
      r.state = "failed"
      r.operation.instance_usable = false
      if op.type == "provision" then
        r.resources.released = true
        return release_ports(r.resources.ports, {})
      end
      r.operation.update_repeatable = true
    end)
    log.warn(op.type .. " failed", { instance = id, operation = op.id, reason = reason })
  end
end

-- A BOSH deprovision: delete the deployment (force), poll, then release the IPs.
function Reconciler:deprovision_bosh(rec, target)
  local status, reason = target:advance(rec, "delete", self:saver(rec), proc.monotonic())
  if status == "wait" then return self:describe(rec, reason) end
  target:forget(rec.id)
  if status == "failed" then
    self:finish(key.instance(rec.id), key.pending(rec.id), rec.operation.id, "failed", "deprovision failed: " .. reason,
      function(r) r.state = "failed" end)
    log.warn("deprovision failed", { instance = rec.id, operation = rec.operation.id, reason = reason })
    return
  end
  self:finish(key.instance(rec.id), key.pending(rec.id), rec.operation.id, "succeeded", "instance deleted (" .. reason .. ")",
    function(r)
      r.state, r.deleted_at, r.secrets, r.manifest = "deleted", os.time(), nil, nil
      r.resources.released = true
      local ops = { { op = "delete_prefix", prefix = key.bindings(rec.id) },
        { op = "delete_prefix", prefix = key.pending(rec.id .. "/") } }
      return target:release_ops(self.db, r, ops)
    end)
  quotas.release(self, rec)
  log.info("deprovision succeeded", { instance = rec.id, operation = rec.operation.id, target = target.name })
end

function Reconciler:deprovision(rec)
  local target = self:target_of(rec)
  if target.kind == "bosh" then return self:deprovision_bosh(rec, target) end
  local ok, err = target:destroy(rec)
  if not ok then
    log.warn("deprovision step failed, will retry", { instance = rec.id, error = err })
    return
  end
  self:finish(key.instance(rec.id), key.pending(rec.id), rec.operation.id, "succeeded", "instance deleted", function(r)
    r.state, r.deleted_at, r.secrets, r.processes, r.deployment = "deleted", os.time(), nil, nil, nil
    local ops = { { op = "delete_prefix", prefix = key.bindings(rec.id) },
      { op = "delete_prefix", prefix = key.pending(rec.id .. "/") } }
    if not r.resources.released then
      r.resources.released = true
      release_ports(r.resources.ports, ops)
    end
    return ops
  end)
  quotas.release(self, rec)
  log.info("deprovision succeeded", { instance = rec.id, operation = rec.operation.id })
end

function Reconciler:advance_instance(id)
  local rec = model.read(self.db, key.instance(id))
  if not rec or rec.operation.state ~= "in progress" then
    model.txn(self.db, { success = { model.delete(key.pending(id)) } })
    return
  end
  if backups.handles(rec.operation) then return backups.advance(self, rec) end
  if rec.operation.cancel_requested then return self:cancel(rec) end
  if rec.operation.type == "deprovision" then return self:deprovision(rec) end
  return self:deploy(rec)
end

-- An operation the operator cancelled (forge.admin): stop what it started (local processes, or
-- the BOSH task; a later operation waits for that task to end), and fail it.
function Reconciler:cancel(rec)
  local op, target = rec.operation, self:target_of(rec)
  if target.kind == "bosh" then
    local b = rec.bosh or {}
    local d = b.task and b.task_op == op.id and target:director()
    if d then d:cancel_task(b.task) end
    target:forget(rec.id)
  else
    local ok, err = target:stop_all(rec)
    if not ok then return log.warn("cancel: stopping failed, will retry", { instance = rec.id, error = err }) end
  end
  self:finish(key.instance(rec.id), key.pending(rec.id), op.id, "failed", op.type .. " cancelled by the operator",
    function(r)
      r.state = "failed"
      r.operation.instance_usable = false
      r.operation.update_repeatable = op.type == "update" or nil
      if target.kind == "bosh" then return end
      r.processes = {}
      if op.type == "provision" then
        r.resources.released = true
        return release_ports(r.resources.ports, {})
      end
    end)
  log.warn(op.type .. " cancelled", { instance = rec.id, operation = op.id, by = op.cancelled_by })
end

function Reconciler:advance_binding(iid, bid)
  local bkey, pending = key.binding(iid, bid), key.pending(iid .. "/" .. bid)
  local rec = model.read(self.db, bkey)
  if not rec or rec.operation.state ~= "in progress" then
    model.txn(self.db, { success = { model.delete(pending) } })
    return
  end
  local inst = model.read(self.db, key.instance(iid))
  local svc = inst and self.registry.by_id[inst.service_id]
  local op = rec.operation
  if op.type == "bind" then
    local creds, err
    if not svc or inst.state ~= "running" then
      err = "instance " .. iid .. " is not running"
    else
      creds, err = bindings.apply(self, svc, inst, rec)
    end
    self:finish(bkey, pending, op.id, creds and "succeeded" or "failed", creds and "binding created" or err, function(r)
      r.state, r.credentials = creds and "created" or "failed", creds
    end)
  else
    if svc and inst.state == "running" then
      local ok, err = bindings.remove(self, svc, inst, rec)
      if not ok then return log.warn("unbind failed, will retry", { instance = iid, binding = bid, error = err }) end
    end
    self:finish(bkey, pending, op.id, "succeeded", "binding deleted", function(r)
      r.state, r.deleted_at, r.credentials = "deleted", os.time(), nil
    end)
  end
  log.info(op.type .. " finished", { instance = iid, binding = bid, operation = op.id })
end

-- Index entries handled per index and pass (a pass stays short, a backlog drains over
-- passes), read PAGE at a time (a pass with nothing due reads one page of each index).
local SWEEP, PAGE = 256, 16

-- Call fn({key=, t=, rest=}) for the entries of index `kind` due by `cutoff` (time <= cutoff),
-- earliest first; fn removes the entry.
function Reconciler:each_due(kind, cutoff, fn)
  local done = 0
  while done < SWEEP do
    local page = model.range(self.db, model.due_prefix(kind), PAGE)
    for _, kv in ipairs(page) do
      local t, rest = model.parse_due(kv.key)
      if not t or t > cutoff then return end
      fn({ key = kv.key, t = t, rest = rest })
      done = done + 1
    end
    if #page < PAGE then return end
  end
end

-- Expire what index entry `e` points at when check(record) holds, with `extra` ops; drop the
-- entry either way (a record that changed since has its own entry, or none).
function Reconciler:expire(e, k, check, extra)
  local r, rev = model.read(self.db, k)
  local ops = { model.delete(e.key) }
  if not (r and check(r)) then return model.txn(self.db, { success = ops }) end
  ops[#ops + 1] = model.delete(k)
  for _, op in ipairs(extra and extra(r) or {}) do ops[#ops + 1] = op end
  model.txn(self.db, { compare = { { key = k, mod_revision = rev } }, success = ops })
end

local function deleted_at(t)
  return function(r) return r.deleted_at ~= nil and math.floor(r.deleted_at) == t end
end

-- Tombstones older than the TTL become `gone/` markers; markers expire after gone_ttl; ports
-- held by an outsider are free again after their hold.
function Reconciler:expire_due(now)
  self:each_due("tombstone", now - self.config.tombstone_ttl - 1, function(e)
    local check = deleted_at(e.t)
    self:expire(e, e.rest, function(r) return r.state == "deleted" and check(r) end, function(r)
      return { model.put(key.gone(e.rest:match("^%a+/(.+)$")), { deleted_at = r.deleted_at }) }
    end)
  end)
  self:each_due("gone", now - self.config.tombstone_ttl - self.config.gone_ttl - 1, function(e)
    self:expire(e, key.gone(e.rest), deleted_at(e.t))
  end)
  self:each_due("port", now - 1, function(e)
    self:expire(e, "port/" .. e.rest, function(p)
      return type(p) == "table" and p.outsider and math.floor(p.until_ or 0) == e.t
    end)
  end)
end

-- A sync bind interrupted by a broker crash: undo what it may have done, then forget it.
function Reconciler:undo_interrupted_bind(bkey, b, rev, now)
  if now - (b.updated_at or 0) <= 120 then return end
  local inst = model.read(self.db, key.instance(b.instance_id))
  local svc = inst and self.registry.by_id[inst.service_id]
  if svc and inst.state == "running" then bindings.remove(self, svc, inst, b) end
  model.txn(self.db, { compare = { { key = bkey, mod_revision = rev } }, success = { model.delete(bkey) } })
  log.warn("removed an interrupted binding", { instance = b.instance_id, binding = b.id })
end

-- The sync binds in flight (creating/ index): undo those whose broker died.
function Reconciler:interrupted_binds(now)
  for _, kv in ipairs(model.range(self.db, "creating/", SWEEP)) do
    local bkey = "binding/" .. kv.key:sub(#"creating/" + 1)
    local b, rev = model.read(self.db, bkey)
    if b and b.state == "creating" and not b.operation.async then
      self:undo_interrupted_bind(bkey, b, rev, now)
    else
      model.txn(self.db, { success = { model.delete(kv.key) } })
    end
  end
end

--- Schedule supervision of every instance in the supervised/ index that is not scheduled yet.
function Reconciler:schedule_supervision(now)
  for _, kv in ipairs(model.range(self.db, "supervised/")) do
    local id = kv.key:sub(#"supervised/" + 1)
    if not self.schedule:has(id) then self.schedule:set(id, now) end
  end
end

-- Check the processes of instance `id`, then schedule its next check. An instance that is gone
-- or failed leaves the index (a later running record puts it back).
function Reconciler:supervise(id, now)
  self.schedule:set(id, now + self.config.supervise_interval)  -- first: a store outage retries it
  local r, rev = model.read(self.db, key.instance(id))
  local idle = r and r.operation.state ~= "in progress"
  if not r or r.state == "deleted" or (idle and r.state ~= "running") then
    local compare = r and { { key = key.instance(id), mod_revision = rev } } or nil
    model.txn(self.db, { compare = compare, success = { model.delete(key.supervised(id)) } })
    self.schedule:remove(id)
    return
  end
  local target = idle and self.targets:of(r)
  if target and target.supervise and target:supervise(r, now) then
    model.update(self.db, key.instance(id), function(cur)
      if cur.operation.id ~= r.operation.id then return false end
      cur.processes, cur.health = r.processes, r.health
      cur.operation.description = r.operation.description
    end)
  end
end

function Reconciler:housekeeping(now)
  for _ = 1, SWEEP do
    local id = self.schedule:pop(now)
    if not id then break end
    self:supervise(id, now)
  end
  self:expire_due(now)
  self:interrupted_binds(now)
end

--- One pass: advance pending operations; housekeeping every supervise_interval seconds.
--- Take or renew the lock `name` for this replica. Locks are compare-and-swap records with an
-- expiry, so they work the same on SQLite and etcd; a replica that dies stops renewing, and
-- after lock_ttl another replica takes its operations over.
-- @return true if this replica holds the lock now
function Reconciler:lock(name, now)
  local k = "lock/" .. name
  local cur, rev = model.read(self.db, k)
  if cur and cur.owner ~= self.replica and (cur.expires or 0) > now and not self:owner_gone(cur) then
    return false
  end
  -- held and far from expiry: no write (renewals are bookkeeping, not state changes)
  if cur and cur.owner == self.replica and cur.expires - now > self.config.lock_ttl / 2 then return true end
  local value = { owner = self.replica, expires = now + self.config.lock_ttl, host = self.host, pid = self.pid,
    start_time = self.start_time }
  local taken = model.txn(self.db, { compare = { { key = k, mod_revision = rev } }, success = { model.put(k, value) } })
  if taken and cur and cur.owner ~= self.replica then
    log.warn("lock taken over from another replica", { lock = name, from = cur.owner, from_host = cur.host,
      from_pid = cur.pid, expired = (cur.expires or 0) <= now })
  end
  return taken
end

-- A lock whose owner ran on this host and is no longer alive (a broker restarted after a
-- crash) is taken over at once instead of after lock_ttl.
function Reconciler:owner_gone(lock)
  return lock.host == self.host and lock.pid ~= nil and not proc.alive(lock.pid, lock.start_time or 0)
end

function Reconciler:unlock(name)
  local k = "lock/" .. name
  local cur, rev = model.read(self.db, k)
  if cur and cur.owner == self.replica then
    model.txn(self.db, { compare = { { key = k, mod_revision = rev } }, success = { model.delete(k) } })
  end
end

-- Log a failure, but a store outage only once every 10 s (it is retried every pass anyway).
function Reconciler:report(what, err, now)
  if type(err) == "table" and err.status == 503 then
    if now < (self.quiet_until or 0) then return end
    self.quiet_until = now + 10
    return log.warn(what .. ": the store is unavailable, retrying", { error = tostring(err.description) })
  end
  log.error(what, { error = tostring(err) })
end

--- One pass: advance the pending operations this replica holds (or can take), then
-- housekeeping every supervise_interval seconds by whichever replica holds its lock.
-- Returns whether work is in flight (operations, upgrade runs, the metrics' seed, a pass that
-- failed), which the caller looks at again soon rather than at the next supervision.
function Reconciler:tick(now)
  local started = proc.monotonic()
  local busy = self:pass(now)
  telemetry.pass(proc.monotonic() - started)
  return busy
end

-- Other replicas' writes are not seen by this one's metrics (nor its supervision schedule):
-- every RESEED seconds, when the store changed since, count the records again.
local RESEED = 60

function Reconciler:reseed(now)
  self.next_seed = self.next_seed or now + RESEED
  if now < self.next_seed then return end
  self.next_seed = now + RESEED
  local rev = self.db:revision()
  if not rev or rev == self.seeded_revision or self.seeding then return end
  self.seeded_revision = rev
  self:seed_metrics()
  pcall(self.schedule_supervision, self, now)
end

-- Housekeeping, by whichever replica holds its lock; one that just took it schedules the
-- supervision of every instance in the index first.
function Reconciler:keep_house(now)
  local held = self:lock("housekeeping", now)
  if held and not self.housekeeper then self:schedule_supervision(now) end
  self.housekeeper = held
  if held then self:housekeeping(now) end
end

function Reconciler:pass(now)
  if not self.started then
    local ok, err = pcall(self.start_up, self)
    if not ok then
      self:report("reconciler start-up failed", err, now)
      return true
    end
  end
  if self.seeding then self:advance_seed(now) end
  if self.config.store == "etcd" then self:reseed(now) end
  local ok, pending = pcall(model.range, self.db, "pending/")
  if not ok then
    self:report("reconciler pass failed", pending, now)
    return true
  end
  for _, kv in ipairs(pending) do
    local id = kv.key:sub(#"pending/" + 1)
    local iid, bid = id:match("^([^/]+)/(.+)$")
    local aok, err = pcall(function()
      if not self:lock("op/" .. id, now) then return end
      if iid then self:advance_binding(iid, bid) else self:advance_instance(id) end
      if not self.db:get(kv.key) then self:unlock("op/" .. id) end
    end)
    if not aok then self:report("reconciler failed on " .. kv.key, err, now) end
  end
  local bok, berr = pcall(backups.due, self, now)
  if not bok then self:report("scheduled backups failed", berr, now) end
  local uok, runs = pcall(upgrades.advance_all, self, now)
  if not uok then self:report("fleet upgrades failed", runs, now) end
  if now >= self.next_supervise then
    self.next_supervise = now + self.config.supervise_interval
    local hok, err = pcall(self.keep_house, self, now)
    if not hok then self:report("reconciler housekeeping failed", err, now) end
  end
  return #pending > 0 or not uok or runs > 0 or self.seeding ~= nil
end

return Reconciler
