-- bench/reload: under steady catalog and bind/unbind load (wrk), rewrite a service 20 times;
-- report the time from write to the new version served, and the count of failed requests.
--   lua5.4 bench/reload.lua        (from the repository root, after make)
package.path = "scripts/?.lua;spec/?.lua;" .. package.path
package.cpath = "build/lib/?.so;" .. package.cpath
local Broker = require "spec.support.broker"
local proc = require "forge.proc"

local SVC, PLAN = "be0c4000-0000-4000-8000-000000000001", "be0c4000-0000-4000-8000-000000000002"
local ROUNDS = tonumber(os.getenv("BENCH_RELOADS") or 20)

local function script(version)
  return ([[
local service = { id = "%s", name = "bench", description = "version %s", bindable = true, commands = { "sleep" },
  plans = { { id = "%s", name = "only", description = "plan" } } }
function service.deploy() return { processes = { { name = "p", argv = { "sleep", "100000" } } } } end
function service.bind(ctx) return { credentials = { v = "%s", b = ctx.binding_id } } end
function service.unbind() return {} end
return service
]]):format(SVC, version, PLAN, version)
end

local write = require("spec.support.files").write

local dir = Broker.tmpdir()
os.execute("mkdir -p " .. dir .. "/bench")
write(dir .. "/bench/service.lua", script("0"))
local b = Broker.start { services_dir = dir, log_level = "warn" }
assert(b:call("PUT", "/v2/service_instances/load", { service_id = SVC, plan_id = PLAN, organization_guid = "o",
  space_guid = "s" }) == 201)

local seconds = ROUNDS + 4
local auth = io.popen("printf '%s' '" .. b.user .. ":" .. b.password .. "' | base64"):read("l")
local H = string.format("-H 'Authorization: Basic %s' -H 'X-Broker-API-Version: 2.17'", auth)
local out_cat, out_bind = os.tmpname(), os.tmpname()
local catalog_load = io.popen(string.format("wrk -t1 -c4 -d%ds %s %s > %s 2>&1", seconds, H, b:url("/v2/catalog"),
  out_cat), "r")
local bind_load = io.popen(string.format("BENCH_SERVICE=%s BENCH_PLAN=%s BENCH_INSTANCE=load wrk -t1 -c1 -d%ds "
  .. "-s bench/bind_unbind.lua %s %s > %s 2>&1", SVC, PLAN, seconds, H, b:url(""), out_bind), "r")
proc.sleep(1)

local function description()
  local _, _, _, body = b:call("GET", "/v2/catalog")
  return body and body.services and body.services[1] and body.services[1].description
end

local times = {}
for i = 1, ROUNDS do
  local want = "version " .. i
  local t0 = proc.monotonic()
  write(dir .. "/bench/service.lua", script(tostring(i)))
  while description() ~= want do
    if proc.monotonic() - t0 > 10 then error("version " .. i .. " not served after 10 s") end
    proc.sleep(0.005)
  end
  times[#times + 1] = (proc.monotonic() - t0) * 1000
  proc.sleep(0.1)
end
catalog_load:close()
bind_load:close()

local function failures(path)
  local f = io.open(path)
  local text = f:read("a")
  f:close()
  os.remove(path)
  local n = tonumber(text:match("Non%-2xx or 3xx responses: (%d+)")) or 0
  local s = text:match("Socket errors: ([^\n]*)")
  if s then for count in s:gmatch("(%d+)") do n = n + tonumber(count) end end
  return n, tonumber(text:match("Requests/sec:%s+([%d%.]+)")) or 0, text:match("status (%d+)")
end
local cat_fail, cat_rps = failures(out_cat)
local bind_fail, bind_rps, bind_status = failures(out_bind)
b:cleanup()
os.execute("rm -rf " .. dir)

table.sort(times)
local sum = 0
for _, t in ipairs(times) do sum = sum + t end
print(string.format("reload: %d rewrites under load; write -> new version served: min %.1f ms, median %.1f ms, "
  .. "mean %.1f ms, max %.1f ms", #times, times[1], times[math.ceil(#times / 2)], sum / #times, times[#times]))
print(string.format("load during the rewrites: catalog %.0f req/s, %d failed; bind/unbind %.0f req/s, %d failed "
  .. "(wrk status errors %s)", cat_rps, cat_fail, bind_rps, bind_fail, tostring(bind_status)))
