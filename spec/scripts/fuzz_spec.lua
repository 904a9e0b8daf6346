-- Fuzz: random and mutated requests at every route of a broker built with AddressSanitizer
-- (make asan). Bounded in count and time, loopback only. No crash, no undocumented 5xx, the
-- store consistent afterwards, a clean graceful stop with no sanitizer report.
local Broker = require "spec.support.broker"
local client = require "spec.support.client"
local cjson = require "cjson"
local proc = require "forge.proc"

local R, D = Broker.redis, Broker.dummy
local ROUNDS, BATCH, BUDGET = 30, 20, 90 -- 600 requests, at most 90 s

-- 5xx the broker documents: 502 (a service command failed), 503 (store or port pool
-- unavailable), 504 (a sync operation outlived sync_timeout).
local DOCUMENTED_5XX = { [502] = true, [503] = true, [504] = true }

local rng_state = 12345
local function rand(n) -- deterministic LCG so a failure can be replayed
  rng_state = (rng_state * 1103515245 + 12345) % 2147483648
  return rng_state % n + 1
end
local function pick(t) return t[rand(#t)] end

local IDS = { "f1", "f2", "f3", "x", "..", "a%2Fb", "%00", string.rep("z", 300), "%C3%A9", "%", "%zz", "a..b",
  "ok-1", "", "a%20b", "f1/extra", "%2e%2e" }
local SERVICES = { R.service, D.service, "nope", "", 42 }
local PLANS = { R.one, R.three, D.small, D.large, D.unbindable, "nope" }
local VERSIONS = { "2.17", "2.17", "2.17", "2.13", "1.0", "", "2.x", "garbage" }

local function random_value(depth)
  depth = depth or 0
  local kind = rand(depth > 3 and 5 or 8)
  if kind == 1 then return rand(1000) - 500 end
  if kind == 2 then return pick({ "", "x", string.rep("A", rand(3000)), "\0\1\2", "é", "((grab x))" }) end
  if kind == 3 then return rand(2) == 1 end
  if kind == 4 then return cjson.null end
  if kind == 5 then return 1.5e300 end
  if kind == 6 then return { random_value(depth + 1), random_value(depth + 1) } end
  local t = {}
  for _ = 1, rand(4) do t[pick({ "a", "size", "role", "maxmemory_mb", "$ref", "" .. rand(9) })] = random_value(depth + 1) end
  return t
end

local function random_body()
  local kind = rand(10)
  if kind == 1 then return "" end
  if kind == 2 then return string.rep("{", rand(2000)) end
  if kind == 3 then
    local bytes = {}
    for i = 1, rand(200) do bytes[i] = string.char(rand(256) - 1) end
    return table.concat(bytes)
  end
  if kind == 4 then return "service_id=" .. pick(SERVICES) .. "&plan_id=" .. pick(PLANS) .. "&parameters=%7B" end
  local body = { service_id = pick(SERVICES), plan_id = pick(PLANS), organization_guid = pick({ "o", "", 7 }),
    space_guid = "s" }
  for _ = 1, rand(3) do
    body[pick({ "parameters", "context", "maintenance_info", "bind_resource", "previous_values", "service_id",
      "predecessor_binding_id", "app_guid" })] = random_value()
  end
  if rand(4) == 1 then body[pick({ "service_id", "plan_id", "organization_guid" })] = nil end
  local ok, text = pcall(cjson.encode, body)
  return ok and text or "{}"
end

local function random_request(b)
  local iid, bid = pick(IDS), pick(IDS)
  local path = pick({ "/v2/catalog", "/v2/service_instances/" .. iid, "/v2/service_instances/" .. iid .. "/last_operation",
    "/v2/service_instances/" .. iid .. "/service_bindings/" .. bid,
    "/v2/service_instances/" .. iid .. "/service_bindings/" .. bid .. "/last_operation",
    "/service_instances/" .. iid, "/v2/", "/healthz", "/v2/service_instances", "//v2//catalog" })
  local qs = {}
  for _ = 1, rand(4) - 1 do
    qs[#qs + 1] = pick({ "accepts_incomplete=true", "accepts_incomplete=", "service_id=" .. tostring(pick(SERVICES)),
      "plan_id=" .. pick(PLANS), "operation=x", "%zz=1", "a" })
  end
  if #qs > 0 then path = path .. "?" .. table.concat(qs, "&") end
  local headers = { ["X-Broker-API-Version"] = pick(VERSIONS) }
  local ctype = pick({ "application/json", "application/json", "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=X", "text/plain", nil })
  if ctype then headers["Content-Type"] = ctype end
  local method = pick({ "GET", "PUT", "PUT", "PATCH", "DELETE", "POST" })
  local good_auth = rand(10) > 1
  return { method = method, url = b:url(path), headers = headers, user = b.user,
    password = good_auth and b.password or "wrong", body = (method ~= "GET" and method ~= "DELETE") and random_body() or nil }
end

describe("fuzzing the broker (ASan build)", function()
  it("never crashes, never answers an undocumented 5xx, keeps the store consistent", function()
    local b = Broker.start { fixtures = true, pool = 8, bin = "build/asan/bin/forge",
      env = { FORGE_SCRIPTS = os.getenv("PWD") .. "/scripts", FORGE_SYNC_TIMEOUT = "5",
        ASAN_OPTIONS = "detect_leaks=1:abort_on_error=0:exitcode=86", UBSAN_OPTIONS = "print_stacktrace=1" } }
    finally(function() b:cleanup() end)
    -- a few real instances so routes reach deep code paths
    for _, id in ipairs({ "f1", "f2" }) do
      assert.equal(201, (b:call("PUT", "/v2/service_instances/" .. id, { service_id = D.service, plan_id = D.small,
        organization_guid = "o", space_guid = "s" })))
    end
    local deadline, sent, statuses = proc.monotonic() + BUDGET, 0, {}
    for _ = 1, ROUNDS do
      if proc.monotonic() > deadline then break end
      local reqs = {}
      for i = 1, BATCH do reqs[i] = random_request(b) end
      for i, r in ipairs(client.parallel(reqs, BATCH)) do
        sent = sent + 1
        statuses[r.status] = (statuses[r.status] or 0) + 1
        assert.is_true(r.status > 0, "no answer for " .. reqs[i].method .. " " .. reqs[i].url)
        assert.is_true(r.status < 500 or DOCUMENTED_5XX[r.status],
          string.format("%d for %s %s: %s", r.status, reqs[i].method, reqs[i].url, r.body))
        if r.status >= 400 and r.status ~= 405 then
          assert.is_table(r.json, "error responses are JSON: " .. r.body)
          assert.is_string(r.json.error)
        end
      end
      assert.is_true(proc.alive(b.pid, b.start_time), "the broker died:\n" .. b:read_log())
    end
    assert.is_true(sent >= 200, "only " .. sent .. " requests sent")
    assert.is_true((statuses[400] or 0) > 0 and (statuses[200] or 0) > 0, "the fuzz reached both refusals and answers")
    -- still answering, and every stored record decodes and references what exists
    assert.equal(200, (b:call("GET", "/v2/catalog")))
    local db = b:store()
    local all = db:range("")
    db:close()
    local keys = {}
    for _, kv in ipairs(all) do keys[kv.key] = kv.value end
    for k, v in pairs(keys) do
      if k:match("^instance/") or k:match("^binding/") then assert.is_table(cjson.decode(v), k) end
      local pending = k:match("^pending/(.*)$")
      if pending and not pending:find("/", 1, true) then assert.is_string(keys["instance/" .. pending], k) end
      local owner = k:match("^port/") and v
      if owner then assert.is_string(keys["instance/" .. owner], k .. " belongs to a missing instance") end
    end
    local w = b:stop("TERM")
    assert.equal(0, w.code, "broker exit status (86 = sanitizer report):\n" .. b:read_log():sub(-3000))
    assert.is_nil(b:read_log():find("Sanitizer", 1, true), b:read_log():sub(-3000))
  end)
end)
