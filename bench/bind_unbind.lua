-- luacheck: globals wrk thread_number
-- wrk script: each connection alternates PUT bind / DELETE unbind of a fresh binding id.
-- Run with as many connections as threads. The next step is decided when a response arrives
-- (not when wrk asks for a request), so wrk's extra request() calls cannot skew the pairs.
local n, next_step, prefix = 1, "bind", nil
local threads = 0
local seen = 0

local service = os.getenv("BENCH_SERVICE")
local plan = os.getenv("BENCH_PLAN")
local instance = os.getenv("BENCH_INSTANCE")

function setup(thread) -- luacheck: ignore
  threads = threads + 1
  thread:set("thread_number", threads)
end

function init() -- luacheck: ignore
  -- BENCH_PREFIX: several wrk at once (bench/replicas) must not make the same binding ids
  prefix = string.format("%s%d-%d", os.getenv("BENCH_PREFIX") or "t", thread_number, os.time())
end

-- wrk.format replaces wrk.headers (auth, version) when given headers: merge them.
local function headers(extra)
  local h = {}
  for k, v in pairs(wrk.headers) do h[k] = v end
  for k, v in pairs(extra or {}) do h[k] = v end
  return h
end

function request() -- luacheck: ignore
  local path = "/v2/service_instances/" .. instance .. "/service_bindings/" .. prefix .. "-" .. n
  if next_step == "bind" then
    return wrk.format("PUT", path, headers { ["Content-Type"] = "application/json" },
      string.format('{"service_id":"%s","plan_id":"%s"}', service, plan))
  end
  return wrk.format("DELETE", path .. "?service_id=" .. service .. "&plan_id=" .. plan, headers())
end

function response(status, _, body) -- luacheck: ignore
  if status >= 300 and seen < 3 then
    seen = seen + 1
    io.write(status, " ", body, "\n")
  end
  if next_step == "bind" then
    next_step = "unbind"
  else
    next_step, n = "bind", n + 1
  end
end

function done(summary) -- luacheck: ignore
  io.write(string.format("errors: status %d, connect %d, read %d, timeout %d\n", summary.errors.status,
    summary.errors.connect, summary.errors.read, summary.errors.timeout))
end
