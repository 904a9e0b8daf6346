-- forge.metrics with a broker-sized registry: the cost of render() and of one update.
--
--   lua5.4 bench/metrics.lua [members]        (default 100000; run from anywhere)
--
-- Seeds `members` tracked instances over 3 services x 4 plans x 2 targets x 5 states (120 label
-- sets), a few operations in flight with their age gauge, and about 300 counter, gauge and
-- histogram series; then times render() (median of 20) and one inc, observe, set and track
-- (new member, move) from Lua. A last figure gives every instance a `since` for an age gauge:
-- the worst case, where render scans the members of each label set for the oldest.
-- One thread; no assertions.
local here = (arg and arg[0] or ""):match("^(.*)/bench/[^/]*$") or "."
package.cpath = here .. "/build/lib/?.so;" .. package.cpath

local metrics = require "forge.metrics"
local proc = require "forge.proc"

local MEMBERS = tonumber(arg and arg[1]) or 100000
local RENDERS = 20
local SERVICES = { "redis", "postgres", "etcd" }
local PLANS = { "small", "medium", "large", "cluster" }
local TARGETS = { "local", "bosh-eu" }
local STATES = { "provisioning", "running", "updating", "failed", "deprovisioning" }
local ROUTES = { "catalog", "provision", "deprovision", "update", "last_operation", "bind", "unbind", "fetch",
  "admin", "metrics" }

local function rss_mb()
  local f = assert(io.open("/proc/self/statm"))
  local pages = f:read("a"):match("^%S+%s+(%d+)")
  f:close()
  return tonumber(pages) * 4096 / 2 ^ 20
end

-- Seconds per call of fn(i), over n calls.
local function per_call(n, fn)
  local t0 = proc.monotonic()
  for i = 1, n do fn(i) end
  return (proc.monotonic() - t0) / n
end

-- Median render time (s) over RENDERS renders, and the text's size.
local function time_render()
  local times, text = {}, nil
  for i = 1, RENDERS do
    local t0 = proc.monotonic()
    text = metrics.render()
    times[i] = proc.monotonic() - t0
  end
  table.sort(times)
  return (times[RENDERS // 2] + times[RENDERS // 2 + 1]) / 2, #text, select(2, text:gsub("\n[^#]", ""))
end

-- The label set of instance i (spread over every combination).
local function tuple(i, state_shift)
  return {
    service = SERVICES[i % #SERVICES + 1],
    plan = PLANS[i // #SERVICES % #PLANS + 1],
    target = TARGETS[i // (#SERVICES * #PLANS) % #TARGETS + 1],
    state = STATES[(i // (#SERVICES * #PLANS * #TARGETS) + (state_shift or 0)) % #STATES + 1],
  }
end

metrics.describe("bench_instances", "gauge", "Instances by service, plan, target and state.")
metrics.describe("bench_operations_in_flight", "gauge", "Operations in flight.",
  { oldest = "bench_operation_oldest_seconds" })
metrics.describe("bench_http_requests_total", "counter", "HTTP requests by route and status.")
metrics.describe("bench_http_request_seconds", "histogram", "HTTP request time by route and method.")
metrics.describe("bench_operations_total", "counter", "Finished operations.")
metrics.describe("bench_store_keys", "gauge", "Store keys by prefix.")

local rss0 = rss_mb()
local t_new = per_call(MEMBERS, function(i) metrics.track("bench_instances", "instance-" .. i, tuple(i)) end)
local rss1 = rss_mb()
for i = 1, 40 do
  metrics.track("bench_operations_in_flight", "op-" .. i, { service = SERVICES[i % 3 + 1], type = "provision" },
    proc.time() - i)
end
for r, route in ipairs(ROUTES) do
  for _, code in ipairs({ 200, 201, 202, 400, 404, 500 }) do
    metrics.inc("bench_http_requests_total", { route = route, code = code }, r)
  end
  for _, method in ipairs({ "GET", "PUT", "DELETE" }) do
    metrics.observe("bench_http_request_seconds", { route = route, method = method }, r / 100)
  end
end
for _, service in ipairs(SERVICES) do
  for _, op in ipairs({ "provision", "update", "deprovision", "bind" }) do
    for _, result in ipairs({ "succeeded", "failed", "cancelled" }) do
      metrics.inc("bench_operations_total", { service = service, type = op, result = result })
    end
  end
end
for i = 1, 100 do metrics.set("bench_store_keys", { prefix = "p" .. i }, i) end

local render_s, bytes, samples = time_render()

local labels = { route = "catalog", code = 200 }
local t_inc = per_call(200000, function() metrics.inc("bench_http_requests_total", labels) end)
local hlabels = { route = "catalog", method = "GET" }
local t_observe = per_call(200000, function(i) metrics.observe("bench_http_request_seconds", hlabels, i % 7 / 10) end)
local t_set = per_call(200000, function(i) metrics.set("bench_store_keys", { prefix = "p1" }, i) end)
local t_move = per_call(MEMBERS, function(i) metrics.track("bench_instances", "instance-" .. i, tuple(i, 1)) end)
local t_again = per_call(MEMBERS, function(i) metrics.track("bench_instances", "instance-" .. i, tuple(i, 1)) end)

-- worst case: every instance in a family with an age gauge
metrics.describe("bench_instances_aged", "gauge", "Instances, with their age.", { oldest = "bench_instances_age_seconds" })
local now = proc.time()
for i = 1, MEMBERS do metrics.track("bench_instances_aged", "instance-" .. i, tuple(i), now - i % 3600) end
local aged_s = time_render()

local function us(s) return string.format("%8.2f µs", s * 1e6) end
local other = #ROUTES * 6 + #ROUTES * 3 + #SERVICES * 4 * 3 + 100 + 2 * #SERVICES   -- as seeded above
print(string.format("metrics bench: %d tracked instances over %d label sets, %d other series; lua5.4, one thread",
  MEMBERS, #SERVICES * #PLANS * #TARGETS * #STATES, other))
print()
print(string.format("render (median of %d)      %8.3f ms   (%d bytes, %d samples)", RENDERS, render_s * 1e3, bytes,
  samples))
print(string.format("render, all aged members  %8.3f ms   (the age gauge scans %d members)", aged_s * 1e3, MEMBERS))
print(string.format("memory for the members    %8.1f MB   (%.0f bytes per member, resident)", rss1 - rss0,
  (rss1 - rss0) * 2 ^ 20 / MEMBERS))
print()
print("per call from Lua (labels table built once unless noted):")
print("inc, 2 labels           " .. us(t_inc))
print("observe, 2 labels       " .. us(t_observe))
print("set, 1 label (new table)" .. us(t_set))
print("track, new member       " .. us(t_new) .. "   (4 labels, new table and id string)")
print("track, move             " .. us(t_move))
print("track, same label set   " .. us(t_again))
