--- The broker's metrics (GET /metrics, docs/metrics.md): every family it exposes is described
-- here, and the broker's code reports through these functions. forge.metrics keeps one
-- registry per process, shared by the HTTP workers, the waiter and the reconciler, so counters
-- move where things happen and rendering never scans the store.
--
-- Instances, bindings and operations in flight are tracked: each store write of an instance or
-- binding record (forge.model) moves that record's member to its current labels. The main
-- thread seeds them from the store once at start (and, with etcd, again every 60 seconds when
-- the store's revision moved, since other replicas' writes are not seen here).
local metrics = require "forge.metrics"
local util = require "forge.util"

local M = {}

local LATENCY = { 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30 }
local PASS = { 0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10 }

local FAMILIES = {
  { "forge_http_requests_total", "counter", "HTTP requests answered, by route template, method and status" },
  { "forge_http_request_duration_seconds", "histogram", "Time from a request's arrival to its answer, by route",
    { buckets = LATENCY } },
  { "forge_http_requests_in_flight", "gauge",
    "Requests the broker's handler holds (parked sync waits included; a catalog answered again from C is not held)" },
  { "forge_http_refused_total", "counter",
    "Requests refused before a handler ran (the HTTP edge or the credentials check), by status" },
  { "forge_instances", "gauge", "Instance records by service, plan, target and state" },
  { "forge_bindings", "gauge", "Binding records by service and state" },
  { "forge_operations_in_flight", "gauge", "Operations in progress by type and target",
    { oldest = "forge_operation_oldest_age_seconds" } },
  { "forge_operation_oldest_age_seconds", "gauge", "Age of the oldest operation in progress, by type and target" },
  { "forge_operations_finished_total", "counter", "Operations that ended, by type and result" },
  { "forge_reconciler_pass_seconds", "histogram", "Duration of one reconciler pass", { buckets = PASS } },
  { "forge_store_txn_seconds", "histogram", "Store transaction latency", { buckets = LATENCY } },
  { "forge_store_txn_conflicts_total", "counter", "Store transactions whose compares failed (retried or refused)" },
  { "forge_sandbox_calls_total", "counter", "Service script hook calls, by service and hook" },
  { "forge_sandbox_errors_total", "counter", "Service script hook calls that failed, by service, hook and kind "
    .. "(error, or limit for a memory, CPU or time limit)" },
  { "forge_service_versions", "gauge", "Loaded service versions (1 per service and version)" },
  { "forge_service_refused_edits", "gauge", "Service edits refused by the validator and not yet fixed" },
  { "forge_local_process_restarts_total", "counter", "Local processes restarted by supervision, by service and reason" },
  { "forge_bosh_director_calls_total", "counter", "BOSH director API calls, by director URL and outcome (2xx to 5xx, "
    .. "unreachable, tls, too_large)" },
  { "forge_quota_used", "gauge", "Use of a configured quota, by scope, name and resource" },
  { "forge_quota_limit", "gauge", "A configured quota, by scope, name and resource" },
}

for _, f in ipairs(FAMILIES) do metrics.describe(f[1], f[2], f[3], f[4]) end

function M.request(route, method, status, seconds)
  metrics.inc("forge_http_requests_total", { route = route, method = method, status = tostring(status) })
  metrics.observe("forge_http_request_duration_seconds", { route = route }, seconds)
end

function M.in_flight(delta) metrics.add("forge_http_requests_in_flight", nil, delta) end

function M.refused(status) metrics.inc("forge_http_refused_total", { status = tostring(status) }) end

local function op_member(rec, target)
  local op = rec.operation
  if type(op) == "table" and op.state == "in progress" then
    return { type = op.type, target = target or "local" }, op.started_at
  end
end

--- An instance record as stored now (nil: deleted).
function M.instance(id, rec)
  if not rec then
    metrics.track("forge_instances", id, nil)
    metrics.track("forge_operations_in_flight", id, nil)
    return
  end
  local target = rec.target or "local"
  metrics.track("forge_instances", id, { service = rec.service or "?", plan = rec.plan or "?", target = target,
    state = rec.state or "?" })
  metrics.track("forge_operations_in_flight", id, op_member(rec, target))
end

--- A binding record as stored now (nil: deleted). `service`: its instance's service name.
function M.binding(iid, bid, rec, service)
  local id = iid .. "/" .. bid
  if not rec or rec.state == "deleted" then
    metrics.track("forge_bindings", id, nil)
    metrics.track("forge_operations_in_flight", "binding/" .. id, nil)
    return
  end
  metrics.track("forge_bindings", id, { service = service or "?", state = rec.state or "?" })
  metrics.track("forge_operations_in_flight", "binding/" .. id, op_member(rec, nil))
end

function M.finished(op_type, result) metrics.inc("forge_operations_finished_total", { type = op_type, result = result }) end

function M.pass(seconds) metrics.observe("forge_reconciler_pass_seconds", nil, seconds) end

function M.txn(seconds, ok)
  metrics.observe("forge_store_txn_seconds", nil, seconds)
  if not ok then metrics.inc("forge_store_txn_conflicts_total") end
end

function M.sandbox_call(service, hook, err)
  metrics.inc("forge_sandbox_calls_total", { service = service, hook = hook })
  if err then
    local kind = tostring(err):find("limit exceeded", 1, true) and "limit" or "error"
    metrics.inc("forge_sandbox_errors_total", { service = service, hook = hook, kind = kind })
  end
end

--- The loaded registry: one series per service at its version; refused edits.
function M.services(registry)
  metrics.forget("forge_service_versions")
  for _, svc in ipairs(registry.list) do
    metrics.track("forge_service_versions", svc.name, { service = svc.name, version = svc.hash })
  end
  metrics.set("forge_service_refused_edits", nil, #registry.errors)
end

--- A local process restarted by supervision; reason: why it died ("memory_limit" or "exited").
function M.restarted(service, reason)
  metrics.inc("forge_local_process_restarts_total", { service = service or "?", reason = reason or "exited" })
end

-- Call fn(record) for each decoded record under prefix, a page at a time, and between() after
-- each page; raises on a store failure.
local function each_record(db, prefix, fn, between)
  assert(util.each_kv(db, prefix, function(kv)
    local rec = util.json_decode(kv.value)
    if type(rec) == "table" then fn(rec) end
  end, between))
end

--- Track every instance and binding record of the store from scratch (paged: memory stays
-- bounded however many are stored). between() (optional) runs after each page read: the
-- reconciler yields there, so a seed of many records spreads over passes.
function M.seed(db, between)
  for _, name in ipairs({ "forge_instances", "forge_bindings", "forge_operations_in_flight" }) do metrics.forget(name) end
  local names = {}                  -- instance id -> service name, for the bindings
  each_record(db, "instance/", function(rec)
    names[rec.id] = rec.service
    M.instance(rec.id, rec)
  end, between)
  each_record(db, "binding/", function(rec) M.binding(rec.instance_id, rec.id, rec, names[rec.instance_id]) end,
    between)
end

--- The text of GET /metrics: quota gauges refreshed from their counters, then everything.
function M.render(quota_rows)
  for _, q in ipairs(quota_rows or {}) do
    local labels = { scope = q.scope, name = q.name, resource = q.resource }
    metrics.set("forge_quota_used", labels, q.used)
    metrics.set("forge_quota_limit", labels, q.limit)
  end
  return metrics.render()
end

return M
