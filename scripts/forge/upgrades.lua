--- Fleet upgrades (docs/upgrades.md): move instances pinned to older versions of their service to
-- the current one, canaries first, then at most max_in_flight at a time, through the same path as
-- a platform's maintenance_info update (forge.osb.instances.start_update). An instance whose
-- rendering does not change is skipped for real: its pin moves in the store, nothing restarts.
--
-- A run is a journaled job: the record upgrades/<id> lists every instance with its state
-- (pending, in flight, upgraded, skipped, failed, not started), and the marker upgrading/<id>
-- has the reconciler advance it (M.advance_all), so a restarted broker goes on where it stopped.
-- A failure pauses the run (POST .../resume retries the failed instances, .../abort ends it).
-- Also here: GET /admin/instances/:id/diff, the diff of one update or upgrade before it runs.
local common = require "forge.osb.common"
local crypto = require "forge.crypto"
local diff = require "forge.diff"
local instances = require "forge.osb.instances"
local log = require "forge.log"
local model = require "forge.model"
local util = require "forge.util"

local fail, key = common.fail, model.key

local M = {}

local JOBS, MARKS = "upgrades/", "upgrading/"
local function job_key(id) return JOBS .. id end
local function mark_key(id) return MARKS .. id end

-- How long an instance with another operation in flight is waited for before it is skipped.
local WAIT_SECONDS = 300

local function short(hash) return hash and hash:sub(1, 12) or "?" end

local function live_instance(b, id)
  common.check_id(id, "instance id")
  local rec, rev = model.read(b.db, key.instance(id))
  if not rec or rec.state == "deleted" then fail(404, "NotFound", "instance " .. id .. " does not exist") end
  return rec, rev
end

local function plan_named(svc, name)
  if svc.plans[name] then return svc.plans[name] end
  for _, p in pairs(svc.plans) do if p.name == name then return p end end
  fail(404, "NotFound", "service " .. svc.name .. " has no plan " .. name)
end

-- The content hash `to` names for `rec`: current, pinned, or a stored version (a unique prefix).
local function version_named(b, svc, rec, to)
  if to == "current" then return svc.hash end
  if to == "pinned" then return rec.script_hash or svc.hash end
  if not to:match("^%x+$") or #to < 6 then fail(400, "BadRequest", "to must be current, pinned or a version hash") end
  local found = model.range(b.db, "script/" .. svc.folder .. "/" .. to:lower())
  if #found ~= 1 then
    fail(404, "NotFound", string.format("%s versions of service %s start with %s", #found == 0 and "no" or "several",
      svc.name, to))
  end
  return found[1].key:match("([^/]+)$")
end

local function check_query(q, allowed)
  for k in pairs(q) do
    if not allowed[k] then fail(400, "BadRequest", "unknown query parameter '" .. k .. "'") end
  end
end

--- GET /admin/instances/:id/diff?to=current|pinned|VERSION&plan=P&params=JSON: what an update or
-- upgrade would change (nothing is stored). `to` defaults to current, or to pinned when a plan or
-- parameters are given (a platform's update keeps the version).
function M.diff(b, id, q)
  check_query(q, { to = 1, plan = 1, params = 1 })
  local rec = live_instance(b, id)
  local svc = b.registry.by_id[rec.service_id]
  if not svc then fail(409, "Conflict", "the service of instance " .. id .. " is no longer loaded") end
  local plan = q.plan and plan_named(svc, q.plan) or svc.plans[rec.plan_id]
  if not plan then fail(409, "Conflict", "the plan of instance " .. id .. " is no longer in the catalog; name one") end
  local params
  if q.params then
    params = util.json_decode(q.params)
    if type(params) ~= "table" or params[1] ~= nil then fail(400, "BadRequest", "params must be a JSON object") end
    common.check_parameters(plan, "service_instance", "update", params)
  end
  local to = version_named(b, svc, rec, q.to or ((q.plan or q.params) and "pinned" or "current"))
  local updated, _, changed, text = instances.prepare_update(b, svc, plan, rec, { parameters = params, to = to })
  return { instance = id, from = rec.script_hash, to = updated.script_hash, plan = plan.name, changed = changed,
    diff = text }
end

-- ---- jobs ------------------------------------------------------------------------------

local FILTERS = { service = "service", plan = "plan", org = "organization_guid", space = "space_guid" }

-- Does `rec` match the request's selection (--all, filters, ids)?
local function selected(rec, sel, ids)
  if ids and not ids[rec.id] then return false end
  for param, field in pairs(FILTERS) do
    if sel[param] ~= nil and rec[field] ~= sel[param] then return false end
  end
  return true
end

-- The body of POST /admin/upgrades, checked.
local function selection(req)
  local body = common.body(req)
  for k in pairs(body) do
    if not (FILTERS[k] or k == "all" or k == "instances" or k == "canaries" or k == "max_in_flight"
        or k == "dry_run" or k == "wait_seconds") then
      fail(400, "BadRequest", "unknown field '" .. k .. "'")
    end
  end
  for param in pairs(FILTERS) do
    if body[param] ~= nil and type(body[param]) ~= "string" then fail(400, "BadRequest", param .. " must be a string") end
  end
  local ids
  if body.instances ~= nil then
    if type(body.instances) ~= "table" or next(body.instances) == nil then
      fail(400, "BadRequest", "instances must be a non-empty list of ids")
    end
    ids = {}
    for _, id in ipairs(body.instances) do
      common.check_id(tostring(id), "instance id")
      ids[id] = true
    end
  end
  local narrowed = ids or body.service or body.plan or body.org or body.space
  if not narrowed and body.all ~= true then
    fail(400, "BadRequest", "say which instances: all=true, service, plan, org, space or instances")
  end
  local function count(name, default, min)
    local n = body[name] == nil and default or math.tointeger(body[name])
    if not n or n < min or n > 1000 then fail(400, "BadRequest", name .. " must be an integer from " .. min .. " to 1000") end
    return n
  end
  return body, ids, count("canaries", 1, 0), count("max_in_flight", 1, 1), count("wait_seconds", WAIT_SECONDS, 0)
end

-- The instances a run takes, in id order: {id, service, plan, from, to}; listed ids that cannot
-- be upgraded are refused (404), or named in `left` (already current, not loaded).
local function candidates(b, sel, ids)
  local list, left, seen = {}, {}, {}
  for _, kv in ipairs(model.range(b.db, "instance/")) do
    local rec = kv.value
    if type(rec) == "table" and rec.state ~= "deleted" and selected(rec, sel, ids) then
      seen[rec.id] = true
      local svc = b.registry.by_id[rec.service_id]
      if not svc then
        left[#left + 1] = { id = rec.id, reason = "its service is no longer loaded" }
      elseif rec.script_hash == svc.hash then
        if ids then left[#left + 1] = { id = rec.id, reason = "already on the current version" } end
      else
        list[#list + 1] = { id = rec.id, service = rec.service, plan = rec.plan, from = rec.script_hash, to = svc.hash,
          state = "pending" }
      end
    end
  end
  for id in pairs(ids or {}) do
    if not seen[id] then fail(404, "NotFound", "instance " .. id .. " does not exist") end
  end
  return list, left
end

local function failure_text(err)
  return type(err) == "table" and tostring(err.description or err.message) or tostring(err)
end

-- What a run would do to entry `e`, changing nothing: upgrade (with the diff), skip, or wait.
local function preview(b, e)
  local rec = model.read(b.db, key.instance(e.id))
  local svc = rec and b.registry.by_id[rec.service_id]
  local plan = svc and svc.plans[rec.plan_id]
  if not plan then return { action = "fail", reason = "it or its plan is gone" } end
  if rec.state ~= "running" then return { action = "skip", reason = "instance is " .. rec.state } end
  local ok, err, _, changed, text = pcall(instances.prepare_update, b, svc, plan, rec, { to = e.to })
  if not ok then return { action = "fail", reason = failure_text(err) } end
  local busy = common.in_progress(rec.operation) and ("waits for its " .. rec.operation.type .. " in flight") or nil
  return { action = changed and "upgrade" or "skip", diff = diff.capped(text), reason = busy
    or (not changed and "nothing it runs changes: the pin moves, no redeploy" or nil) }
end

local function busy_job(b)
  local marks = model.range(b.db, MARKS, 1)
  return marks[1] and marks[1].key:sub(#MARKS + 1)
end

--- POST /admin/upgrades: start a run (202 with the job), or with dry_run=true say what it would do.
function M.start(b, req, who)
  local sel, ids, canaries, max_in_flight, wait_seconds = selection(req)
  local list, left = candidates(b, sel, ids)
  if sel.dry_run == true then
    for _, e in ipairs(list) do
      for k, v in pairs(preview(b, e)) do e[k] = v end
    end
    return 200, { dry_run = true, instances = list, left = left }
  end
  local running = busy_job(b)
  if running then fail(409, "Conflict", "upgrade " .. running .. " has not ended; resume or abort it first") end
  local now = os.time()
  local job = { id = "upg-" .. crypto.token(6), state = "running", created_at = now, updated_at = now, by = who,
    selection = { all = sel.all, service = sel.service, plan = sel.plan, org = sel.org, space = sel.space,
      instances = sel.instances }, canaries = canaries, max_in_flight = max_in_flight, wait_seconds = wait_seconds,
    instances = list, left = left }
  if #list == 0 then
    job.state, job.finished_at, job.description = "succeeded", now, "no instance is pinned to an older version"
    model.txn(b.db, { success = { model.put(job_key(job.id), job) } })
    return 202, job
  end
  if not model.txn(b.db, { compare = { { key = mark_key(job.id), exists = false } },
      success = { model.put(job_key(job.id), job), model.put(mark_key(job.id), "") } }) then
    fail(409, "Conflict", "upgrade " .. job.id .. " exists; try again")
  end
  log.info("upgrade started", { upgrade = job.id, instances = #list, canaries = canaries,
    max_in_flight = max_in_flight, by = who })
  return 202, job
end

local function counts(job)
  local n = { pending = 0, ["in flight"] = 0, upgraded = 0, skipped = 0, failed = 0, ["not started"] = 0 }
  for _, e in ipairs(job.instances) do n[e.state] = (n[e.state] or 0) + 1 end
  return n
end

local function summary(job)
  return { id = job.id, state = job.state, created_at = job.created_at, finished_at = job.finished_at, by = job.by,
    description = job.description, counts = counts(job), total = #job.instances }
end

--- GET /admin/upgrades: every run, newest first.
function M.list(b)
  local list = {}
  for _, kv in ipairs(model.range(b.db, JOBS)) do list[#list + 1] = summary(kv.value) end
  table.sort(list, function(x, y)
    if x.created_at ~= y.created_at then return x.created_at > y.created_at end
    return x.id > y.id
  end)
  return 200, { upgrades = list }
end

local function read_job(b, id)
  common.check_id(id, "upgrade id")
  local job = model.read(b.db, job_key(id))
  if not job then fail(404, "NotFound", "upgrade " .. id .. " does not exist") end
  return job
end

--- GET /admin/upgrades/:id: the run with every instance's state.
function M.get(b, id)
  local job = read_job(b, id)
  job.counts = counts(job)
  return 200, job
end

-- The end of a job once nothing is in flight and nothing more will start.
local function settle(job, now)
  local n = counts(job)
  if n["in flight"] > 0 or (job.state ~= "aborted" and n.pending > 0) then return false end
  if job.state ~= "aborted" then job.state = n.failed > 0 and "failed" or "succeeded" end
  if job.state == "succeeded" then job.description = string.format("%d upgraded, %d skipped", n.upgraded, n.skipped) end
  job.finished_at = now
  log.info("upgrade ended", { upgrade = job.id, state = job.state, upgraded = n.upgraded, skipped = n.skipped,
    failed = n.failed })
  return true
end

-- Change job `id` with fn(job) -> extra ops | false; 409 with `why` when fn refuses.
local function act(b, id, why, fn)
  read_job(b, id)
  local refused
  local stored = model.update(b.db, job_key(id), function(job)
    local extra = fn(job)
    if extra == false then refused = job.state end
    job.updated_at = os.time()
    return extra
  end)
  if not stored then fail(409, "Conflict", "upgrade " .. id .. " is " .. tostring(refused) .. ": " .. why) end
  stored.counts = counts(stored)
  return 202, stored
end

--- POST /admin/upgrades/:id/resume: a paused (or failed) run goes on; its failed instances are
-- tried again. What is left moves to the current version now (a fix may have been released).
function M.resume(b, id, who)
  return act(b, id, "only a paused or failed upgrade resumes", function(job)
    if job.state ~= "paused" and job.state ~= "failed" then return false end
    for _, e in ipairs(job.instances) do
      if e.state == "failed" then e.state, e.reason, e.operation, e.failed_operation = "pending", nil, nil, e.operation end
      local svc = e.state == "pending" and b.registry.by_name[e.service]
      if svc then e.to = svc.hash end
    end
    job.state, job.finished_at = "running", nil
    job.description = "resumed by " .. tostring(who)
    log.info("upgrade resumed", { upgrade = id, by = who })
    return { model.put(mark_key(id), "") }
  end)
end

--- POST /admin/upgrades/:id/pause: no further instance is started until a resume; those in flight finish.
function M.pause(b, id, who)
  return act(b, id, "only a running upgrade pauses", function(job)
    if job.state ~= "running" then return false end
    job.state, job.description = "paused", "paused by " .. tostring(who)
    log.info("upgrade paused", { upgrade = id, by = who })
  end)
end

--- POST /admin/upgrades/:id/abort: no further instance is started; those in flight finish.
function M.abort(b, id, who)
  return act(b, id, "only a running or paused upgrade can be aborted", function(job)
    if job.state ~= "running" and job.state ~= "paused" then return false end
    for _, e in ipairs(job.instances) do
      if e.state == "pending" then e.state = "not started" end
    end
    job.state, job.description = "aborted", "aborted by " .. tostring(who)
    log.warn("upgrade aborted", { upgrade = id, by = who })
    -- with nothing in flight it ends now, so the next run may start at once
    if settle(job, os.time()) then return { model.delete(mark_key(id)) } end
  end)
end

-- ---- the reconciler's side ---------------------------------------------------------------

-- Operation `op_id` of `rec`: the current one or one in its history.
local function find_operation(rec, op_id)
  if rec.operation and rec.operation.id == op_id then return rec.operation end
  for _, op in ipairs(rec.history or {}) do if op.id == op_id then return op end end
end

-- An entry in flight: has its operation ended?
local function check(r, e)
  local rec = model.read(r.db, key.instance(e.id))
  local op = rec and find_operation(rec, e.operation)
  if not op then
    e.state, e.reason = "failed", "its upgrade operation " .. tostring(e.operation) .. " is gone"
  elseif op.state == "succeeded" then
    e.state = op.skipped and "skipped" or "upgraded"
    e.reason = op.skipped and "nothing it runs changes: the pin moved, no redeploy" or nil
  elseif op.state == "failed" then
    e.state, e.reason = "failed", op.description or "update failed"
  end
end

-- Start the upgrade of entry `e`: it ends in flight, skipped or failed, or stays pending (an
-- operation of its own in flight: waited for up to job.wait_seconds; or the record changed).
local function launch(r, job, e, now)
  local rec, rev = model.read(r.db, key.instance(e.id))
  if not rec or rec.state == "deleted" then
    e.state, e.reason = "skipped", "deleted meanwhile"
    return
  end
  -- resumed after its upgrade failed: the same update runs again (a failed instance is redeployed)
  local retry = e.failed_operation ~= nil and rec.operation.id == e.failed_operation and rec.state == "failed"
  if rec.operation.upgrade == job.id and not retry then   -- journaled by a pass that did not record it
    e.state, e.operation = "in flight", rec.operation.id
    return check(r, e)
  end
  if rec.script_hash == e.to and not retry then
    e.state, e.reason = "skipped", "already on version " .. short(e.to)
    return
  end
  local busy = common.in_progress(rec.operation) and ("its " .. rec.operation.type)
    or (instances.binding_busy(r, e.id) and "an operation of one of its bindings")
  if busy then
    e.waiting_since = e.waiting_since or now
    e.reason = "waiting for " .. busy .. " in flight"
    if now - e.waiting_since >= job.wait_seconds then
      e.state, e.reason = "skipped", busy .. " was still in flight after " .. job.wait_seconds .. "s"
    end
    return
  end
  if rec.state ~= "running" and not retry then
    e.state, e.reason = "skipped", "instance is " .. rec.state .. ": retry or update it first"
    return
  end
  local svc = r.registry.by_id[rec.service_id]
  local plan = svc and svc.plans[rec.plan_id]
  if not plan then
    e.state, e.reason = "failed", "its service or plan is no longer in the catalog"
    return
  end
  local op = common.new_operation("update", { service_id = rec.service_id, plan_id = rec.plan_id,
    maintenance_info = plan.maintenance_info })
  op.by, op.upgrade = job.by, job.id
  local ok, outcome, stored = pcall(instances.start_update, r, svc, plan, rec, rev,
    { to = e.to, skip_unchanged = not retry }, op)
  if not ok then
    e.state, e.reason = "failed", failure_text(outcome)
  elseif outcome then
    e.operation, e.waiting_since, e.failed_operation = op.id, nil, nil
    e.state = outcome == "skipped" and "skipped" or "in flight"
    e.reason = outcome == "skipped" and stored.operation.description or nil
    log.info(outcome == "skipped" and "upgrade skipped: nothing changes" or "upgrade started",
      { upgrade = job.id, instance = e.id, operation = op.id, to = e.to })
  end
end

local function upgraded_canaries(job)
  local n = 0
  for _, e in ipairs(job.instances) do if e.canary and e.state == "upgraded" then n = n + 1 end end
  return n
end

-- Start pending entries: one canary at a time until job.canaries have been upgraded, then at
-- most job.max_in_flight at once.
local function launch_more(r, job, now)
  local n = counts(job)
  local in_flight = n["in flight"]
  for _, e in ipairs(job.instances) do
    local canary = upgraded_canaries(job) < job.canaries
    if in_flight >= (canary and 1 or job.max_in_flight) or job.state ~= "running" then return end
    if e.state == "pending" then
      launch(r, job, e, now)
      if e.state == "in flight" then
        in_flight = in_flight + 1
        e.canary = canary or nil
      elseif e.state == "failed" then
        return
      end
    end
  end
end

-- A failed entry pauses a running job.
local function pause_on_failure(job)
  if job.state ~= "running" then return end
  for _, e in ipairs(job.instances) do
    if e.state == "failed" then
      job.state = "paused"
      job.description = string.format("paused: %s %s failed: %s", e.canary and "canary" or "instance", e.id,
        tostring(e.reason))
      return log.warn("upgrade paused", { upgrade = job.id, instance = e.id, reason = e.reason })
    end
  end
end

--- One step of job `id`: look at its instances in flight, pause on a failure, start more, end it.
function M.advance(r, id, now)
  local job, rev = model.read(r.db, job_key(id))
  if not job or (job.state ~= "running" and job.state ~= "paused" and job.state ~= "aborted") then
    return model.txn(r.db, { success = { model.delete(mark_key(id)) } })
  end
  local before = util.json_encode(job)
  for _, e in ipairs(job.instances) do
    if e.state == "in flight" then check(r, e) end
  end
  pause_on_failure(job)
  if job.state == "running" then launch_more(r, job, now) end
  pause_on_failure(job)
  local ended = settle(job, now)
  if util.json_encode(job) == before then return end
  job.updated_at = now
  local ops = { model.put(job_key(id), job), ended and model.delete(mark_key(id)) or nil }
  -- lost to an operator's resume or abort: the next pass looks again (a started instance is adopted)
  model.txn(r.db, { compare = { { key = job_key(id), mod_revision = rev } }, success = ops })
end

--- Advance every job that has not ended (the reconciler, each pass), under a lock per job;
-- returns how many had not ended.
function M.advance_all(r, now)
  local marks = model.range(r.db, MARKS)
  for _, kv in ipairs(marks) do
    local id = kv.key:sub(#MARKS + 1)
    if r:lock("upgrade/" .. id, now) then
      M.advance(r, id, now)
      if not r.db:get(kv.key) then r:unlock("upgrade/" .. id) end
    end
  end
  return #marks
end

return M
