--- Quotas (config `quotas:`, docs/admin.md): limits on live instances per plan, service,
-- organization and space, and on summed plan weights (memory MB, ...).
--
-- Usage is kept in counter records `usage/<scope>` = {count = n}, one per limited scope. A
-- provision or plan change compares and moves them in the same transaction that journals the
-- instance, so racing provisions never overshoot; a deprovision gives its share back when it
-- ends. The counters are recounted from the instance records when the broker starts (a crash
-- between a deprovision and its give-back leaves a counter high until then).
local common = require "forge.osb.common"
local log = require "forge.log"
local model = require "forge.model"
local util = require "forge.util"

local fail = common.fail

local M = {}

local PREFIX = "usage/"

local function live(rec) return rec ~= nil and rec.state ~= "deleted" end

-- The limited scopes an instance record counts in: key -> {amount=, limit=, what=, unit=}.
local function scopes(q, rec)
  local out = {}
  if not q or not live(rec) then return out end
  local plan = rec.service .. "/" .. rec.plan
  local function add(k, amount, limit, what, unit)
    if limit and amount and amount > 0 then out[PREFIX .. k] = { amount = amount, limit = limit, what = what, unit = unit } end
  end
  add("plan/" .. plan, 1, (q.plans or {})[plan], "plan " .. plan, "instances")
  add("service/" .. rec.service, 1, (q.services or {})[rec.service], "service " .. rec.service, "instances")
  local org, space = rec.organization_guid or "", rec.space_guid or ""
  add("org/" .. org, 1, (q.organizations or {})[org] or q.organization, "organization " .. org, "instances")
  add("space/" .. space, 1, q.space, "space " .. space, "instances")
  for name, w in pairs(q.weights or {}) do
    local amount = (w.plans or {})[plan]
    add("weight/" .. name .. "/total", amount, w.total, "the broker", name)
    add("weight/" .. name .. "/org/" .. org, amount, w.organization, "organization " .. org, name)
  end
  return out
end

local function used(db, k)
  local v, rev = model.read(db, k)
  return type(v) == "table" and tonumber(v.count) or 0, rev
end

--- The counter changes for a record going from `old` to `new` (either may be nil or deleted):
-- compares and ops for the journal transaction. Raises 403 QuotaExceeded when a limit would
-- be passed.
-- @return {compare = {...}, ops = {...}}
function M.change(b, old, new)
  local q = b.config.quotas
  local out = { compare = {}, ops = {} }
  if not q then return out end
  local before, after = scopes(q, old), scopes(q, new)
  local keys = {}
  for k in pairs(before) do keys[k] = true end
  for k in pairs(after) do keys[k] = true end
  for k in pairs(keys) do
    local delta = (after[k] and after[k].amount or 0) - (before[k] and before[k].amount or 0)
    if delta ~= 0 then
      local n, rev = used(b.db, k)
      local s = after[k]
      if delta > 0 and n + delta > s.limit then
        local need = s.unit == "instances" and "" or string.format(" (plan %s/%s needs %s)", new.service, new.plan,
          tostring(s.amount))
        fail(403, "QuotaExceeded", string.format("%s has %s of %s %s%s", s.what, tostring(n), tostring(s.limit),
          s.unit, need))
      end
      out.compare[#out.compare + 1] = { key = k, mod_revision = rev }
      out.ops[#out.ops + 1] = model.put(k, { count = math.max(0, n + delta) })
    end
  end
  return out
end

--- Give back what a record counted (its deprovision ended, or it was purged).
function M.release(b, rec)
  if not b.config.quotas then return end
  for k, s in pairs(scopes(b.config.quotas, rec)) do
    for _ = 1, 50 do
      local n, rev = used(b.db, k)
      if model.txn(b.db, { compare = { { key = k, mod_revision = rev } },
          success = { model.put(k, { count = math.max(0, n - s.amount) }) } }) then
        break
      end
    end
  end
end

--- Count every limited scope again from the instance records (at start).
function M.recount(db, q)
  for _ = 1, 20 do
    local counts = {}
    if q then
      model.each(db, "instance/", function(kv)
        for k, s in pairs(scopes(q, kv.value)) do counts[k] = (counts[k] or 0) + s.amount end
      end)
    end
    local compare, ops = {}, {}
    for _, kv in ipairs(model.range(db, PREFIX)) do
      compare[#compare + 1] = { key = kv.key, mod_revision = kv.rev }
      if not counts[kv.key] then ops[#ops + 1] = model.delete(kv.key) end
    end
    for k, n in pairs(counts) do ops[#ops + 1] = model.put(k, { count = n }) end
    if #ops == 0 or model.txn(db, { compare = compare, success = ops }) then return end
  end
  log.warn("quota usage could not be recounted: the store kept changing; the counters stay as they are")
end

--- Configured limits and their use (GET /admin/quotas, the dashboard, metrics).
function M.usage(b)
  local q, list = b.config.quotas, util.array()
  if not q then return list end
  local counts = {}
  for _, kv in ipairs(model.range(b.db, PREFIX)) do counts[kv.key:sub(#PREFIX + 1)] = kv.value.count end
  local function row(scope, name, resource, limit, k)
    list[#list + 1] = { scope = scope, name = name, resource = resource, limit = limit, used = counts[k] or 0 }
  end
  for plan, limit in pairs(q.plans or {}) do row("plan", plan, "instances", limit, "plan/" .. plan) end
  for svc, limit in pairs(q.services or {}) do row("service", svc, "instances", limit, "service/" .. svc) end
  for org, limit in pairs(q.organizations or {}) do row("organization", org, "instances", limit, "org/" .. org) end
  for k in pairs(counts) do
    local org = k:match("^org/(.+)$")
    if org and q.organization and not (q.organizations or {})[org] then
      row("organization", org, "instances", q.organization, k)
    end
    local space = k:match("^space/(.+)$")
    if space and q.space then row("space", space, "instances", q.space, k) end
    local w, worg = k:match("^weight/([^/]+)/org/(.+)$")
    if w and q.weights[w] and q.weights[w].organization then row("organization", worg, w, q.weights[w].organization, k) end
  end
  for name, w in pairs(q.weights or {}) do
    if w.total then row("broker", "total", name, w.total, "weight/" .. name .. "/total") end
  end
  table.sort(list, function(x, y)
    if x.scope ~= y.scope then return x.scope < y.scope end
    if x.name ~= y.name then return x.name < y.name end
    return x.resource < y.resource
  end)
  return list
end

return M
