-- luacheck: globals wrk thread_number
-- wrk script: each connection alternates PUT bind / DELETE unbind of a fresh binding id.
-- Run with as many connections as threads so each connection's requests stay in order.
local counter = 0
local prefix
local threads = 0

function setup(thread) -- luacheck: ignore
  threads = threads + 1
  thread:set("thread_number", threads)
end

function init() -- luacheck: ignore
  prefix = string.format("t%d-%d", thread_number, os.time())
end

local service = os.getenv("BENCH_SERVICE")
local plan = os.getenv("BENCH_PLAN")
local instance = os.getenv("BENCH_INSTANCE")

-- wrk.format replaces wrk.headers (auth, version) when given headers: merge them.
local function headers(extra)
  local h = {}
  for k, v in pairs(wrk.headers) do h[k] = v end
  for k, v in pairs(extra or {}) do h[k] = v end
  return h
end

function request() -- luacheck: ignore
  counter = counter + 1
  local bid = prefix .. "-" .. math.floor((counter + 1) / 2)
  local path = "/v2/service_instances/" .. instance .. "/service_bindings/" .. bid
  if counter % 2 == 1 then
    return wrk.format("PUT", path, headers { ["Content-Type"] = "application/json" },
      string.format('{"service_id":"%s","plan_id":"%s"}', service, plan))
  end
  return wrk.format("DELETE", path .. "?service_id=" .. service .. "&plan_id=" .. plan, headers())
end

function done(summary, latency) -- luacheck: ignore
  io.write(string.format("errors: status %d, connect %d, read %d, timeout %d\n", summary.errors.status,
    summary.errors.connect, summary.errors.read, summary.errors.timeout))
end

local seen = 0
function response(status, _, body) -- luacheck: ignore
  if status >= 300 and seen < 3 then
    seen = seen + 1
    io.write(status, " ", body, "\n")
  end
end
