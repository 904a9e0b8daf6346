-- GET /metrics on a running broker, read by the Prometheus client library's own parser
-- (Debian's python3-prometheus-client): HTTP by route template, instances, bindings and
-- operations tracked as records change, reconciler and store histograms, process metrics.
local Broker = require "spec.support.broker"
local client = require "spec.support.client"
local cjson = require "cjson"
local proc = require "forge.proc"

local D = Broker.dummy
local STUCK = Broker.stuck

-- The samples of an exposition text as the reference parser reads them: {name, labels, value}.
local PARSE = [[
import json, sys
from prometheus_client.parser import text_string_to_metric_families
out = []
for fam in text_string_to_metric_families(sys.stdin.read()):
    for s in fam.samples:
        out.append({"family": fam.name, "type": fam.type, "name": s.name, "labels": s.labels, "value": s.value})
print(json.dumps(out))
]]

local function parse(text)
  local input, script = os.tmpname(), os.tmpname()
  local f = assert(io.open(input, "w")); f:write(text); f:close()
  f = assert(io.open(script, "w")); f:write(PARSE); f:close()
  local p = assert(io.popen("/usr/bin/python3 " .. script .. " < " .. input .. " 2>&1"))
  local out = p:read("a")
  local ok = p:close()
  os.remove(input); os.remove(script)
  assert(ok, "the Prometheus parser refused the exposition:\n" .. out)
  return cjson.decode(out)
end

local function scrape(b, opts)
  local status, raw, headers = client.request("GET", b:url("/metrics"), opts or { user = b.admin_user,
    password = b.admin_password })
  return status, raw, headers
end

-- The value of the sample `name` whose labels include `labels`.
local function value(samples, name, labels)
  for _, s in ipairs(samples) do
    if s.name == name then
      local all = true
      for k, v in pairs(labels or {}) do all = all and s.labels[k] == v end
      if all then return s.value end
    end
  end
end

describe("GET /metrics", function()
  local b
  setup(function()
    b = Broker.start { fixtures = true, pool = 20 }
    b:provision_async("m-one", D.service, D.small)
    b:provision_async("m-two", D.service, D.small)
    for _, id in ipairs({ "m-one", "m-two" }) do b:wait_operation("/v2/service_instances/" .. id, 30) end
    assert.equal(201, (b:call("PUT", "/v2/service_instances/m-one/service_bindings/mb1",
      { service_id = D.service, plan_id = D.small })))
  end)
  teardown(function() b:cleanup() end)

  it("answers the admin credentials only, in the text format", function()
    local status, _, headers = scrape(b)
    assert.equal(200, status)
    assert.matches("^text/plain; version=0.0.4", headers["content-type"])
    assert.equal(401, (scrape(b, {})))
    assert.equal(401, (scrape(b, { user = b.user, password = b.password })))
  end)

  it("counts requests by route template, never by raw id", function()
    client.request("GET", b:url("/v2/catalog"))          -- refused: no credentials
    local _, raw = scrape(b)
    local samples = parse(raw)
    assert.is_nil(raw:find("m-one", 1, true))
    assert.is_nil(raw:find("mb1", 1, true))
    assert.is_true(value(samples, "forge_http_requests_total", { route = "/v2/service_instances/:instance_id",
      method = "PUT", status = "202" }) >= 2)
    assert.is_true(value(samples, "forge_http_requests_total", {
      route = "/v2/service_instances/:instance_id/service_bindings/:binding_id", method = "PUT", status = "201" }) >= 1)
    assert.is_true(value(samples, "forge_http_request_duration_seconds_count",
      { route = "/v2/service_instances/:instance_id/last_operation" }) >= 2)
    assert.is_true(value(samples, "forge_http_refused_total", { status = "401" }) >= 1)
    assert.is_true(value(samples, "forge_http_requests_in_flight") >= 1)   -- this scrape
  end)

  it("tracks instances, bindings and operations as their records change", function()
    local samples = parse(select(2, scrape(b)))
    local running = { service = "dummy", plan = "small", target = "local", state = "running" }
    assert.equal(2, value(samples, "forge_instances", running))
    assert.equal(1, value(samples, "forge_bindings", { service = "dummy", state = "created" }))
    assert.is_true(value(samples, "forge_operations_finished_total", { type = "provision", result = "succeeded" }) >= 2)
    assert.is_true(value(samples, "forge_operations_finished_total", { type = "bind", result = "succeeded" }) >= 1)

    b:provision_async("m-stuck", STUCK.service, STUCK.plan)
    samples = parse(select(2, scrape(b)))
    assert.equal(1, value(samples, "forge_operations_in_flight", { type = "provision", target = "local" }))
    assert.is_true(value(samples, "forge_operation_oldest_age_seconds", { type = "provision", target = "local" }) >= 0)
    assert.equal(1, value(samples, "forge_instances", { service = "stuck", state = "deploying" }))
    assert.equal(202, (b:call("POST", "/admin/instances/m-stuck/cancel")))
    local deadline = proc.monotonic() + 15
    repeat
      proc.sleep(0.1)
      samples = parse(select(2, scrape(b)))
    until value(samples, "forge_operations_in_flight", { type = "provision" }) == 0 or proc.monotonic() > deadline
    assert.equal(0, value(samples, "forge_operations_in_flight", { type = "provision" }))
    assert.equal(1, value(samples, "forge_instances", { service = "stuck", state = "failed" }))
    assert.is_true(value(samples, "forge_operations_finished_total", { type = "provision", result = "failed" }) >= 1)

    assert.equal(200, (b:call("DELETE", "/v2/service_instances/m-two?service_id=" .. D.service .. "&plan_id=" .. D.small)))
    samples = parse(select(2, scrape(b)))
    assert.equal(1, value(samples, "forge_instances", running))
    assert.equal(1, value(samples, "forge_instances", { service = "dummy", state = "deleted" }))
  end)

  it("reports the reconciler, the store, the sandbox, the services and the process", function()
    local samples = parse(select(2, scrape(b)))
    assert.is_true(value(samples, "forge_reconciler_pass_seconds_count") > 0)
    assert.is_true(value(samples, "forge_store_txn_seconds_count") > 0)
    assert.is_true(value(samples, "forge_sandbox_calls_total", { service = "dummy", hook = "deploy" }) >= 2)
    assert.equal(1, value(samples, "forge_service_versions", { service = "dummy" }))
    assert.equal(0, value(samples, "forge_service_refused_edits"))
    assert.is_true(value(samples, "process_resident_memory_bytes") > 1e6)
    assert.is_true(value(samples, "process_open_fds") > 3)
    assert.is_true(value(samples, "process_threads") >= 2)
    assert.is_true(value(samples, "process_start_time_seconds") > 1.7e9)
  end)

  it("counts the stored records again after a restart", function()
    b:stop()
    b:launch()
    local samples = parse(select(2, scrape(b)))
    assert.equal(1, value(samples, "forge_instances", { service = "dummy", plan = "small", state = "running" }))
    assert.equal(1, value(samples, "forge_bindings", { service = "dummy", state = "created" }))
  end)
end)
