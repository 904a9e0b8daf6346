-- Checks of fuzz_bosh (fuzz/README.md). The input's first line: words, each an operation
-- run in turn on one director handle (info auth_type deploy delete deployment deployments
-- task output output_from wait vms vms_db instances errand errand_result releases
-- stemcells upload cancel tasks), or an option: uaa (uaa_url given: UAA without /info),
-- client (client credentials, UAA found through /info), nobasic (no username). Every answer
-- after the first line is what the director or UAA sends, in order (fake_curl.h).
-- Any raise, or a failed assert, is a finding. Checked beyond "no raise":
--  * an error is a forge.error whose code is one of those documented in runtime/bosh.c;
--  * d:task(id) and the JSON getters return the answer's JSON exactly as lua-cjson decodes
--    it, with the documented normalisation only: integral numbers become integers, null
--    object members are dropped (array nulls stay).
local bosh = require "forge.bosh"
local cjson = require "cjson"
local VERBOSE = os.getenv("FUZZ_VERBOSE")

local CODES = { ["bosh.unreachable"] = true, ["bosh.tls"] = true, ["bosh.auth"] = true, ["bosh.not_found"] = true,
  ["bosh.bad_request"] = true, ["bosh.protocol"] = true, ["bosh.task_failed"] = true, ["bosh.timeout"] = true,
  ["bosh.local"] = true }

local function show(v, d)
  d = d or 0
  if type(v) ~= "table" or d > 3 then return tostring(v) end
  local parts = {}
  for k, x in pairs(v) do parts[#parts + 1] = tostring(k) .. "=" .. show(x, d + 1) end
  table.sort(parts)
  return "{" .. table.concat(parts, ", ") .. "}"
end

local function check_err(err, what)
  if VERBOSE then print(what, show(err)) end
  assert(type(err) == "table", what .. ": error is not a table")
  assert(CODES[err.code], what .. ": undocumented error code " .. tostring(err.code))
  assert(type(err.message) == "string" and err.message ~= "", what .. ": error without a message")
  assert(err.status == nil or math.type(err.status) == "integer", what .. ": status is not an integer")
end

-- The documented normalisation of a decoded JSON value (runtime/bosh.c normalize()).
local function normalized(v, depth)
  if type(v) ~= "table" or depth > 200 then return v end
  local out = {}
  for k, x in pairs(v) do
    if type(x) == "number" and math.type(x) == "float" then
      out[k] = math.tointeger(x) or x
    elseif x == cjson.null and type(k) == "string" then
      out[k] = nil
    else
      out[k] = normalized(x, depth + 1)
    end
  end
  return out
end

local function same(a, b, path, depth)
  if depth > 1100 then return true end
  if type(a) == "number" and type(b) == "number" then
    if a ~= a and b ~= b then return true end
    return math.type(a) == math.type(b) and a == b, path .. ": " .. tostring(a) .. " vs " .. tostring(b)
  end
  if type(a) ~= "table" or type(b) ~= "table" then return a == b, path .. ": " .. tostring(a) .. " vs " .. tostring(b) end
  for k, x in pairs(a) do
    local ok, why = same(x, b[k], path .. "." .. tostring(k), depth + 1)
    if not ok then return false, why end
  end
  for k in pairs(b) do
    if a[k] == nil then return false, path .. "." .. tostring(k) .. ": not in the answer" end
  end
  return true
end

-- A JSON getter's value against the body that was served last.
local function check_json(v, what)
  local body, status = fuzz_last_body()
  if status ~= 200 or body == nil then return end
  local ok, decoded = pcall(cjson.decode, body)
  if not ok then return end
  local want = normalized(decoded, 0)
  local same_ok, why = same(want, v, "$", 0)
  assert(same_ok, what .. ": value differs from the normalised JSON answer at " .. tostring(why))
end

local function result(what, v, err, json)
  if VERBOSE then print(what, show(v), show(err)) end
  if v == nil and err ~= nil then return check_err(err, what) end
  if json and v ~= nil then check_json(v, what) end
end

local OPS = {
  info = function(d) local v, e = d:info() result("info", v, e, true) end,
  auth_type = function(d)
    local v, e = d:auth_type()
    result("auth_type", v, e)
    assert(v == nil or v == "basic" or v == "uaa", "auth_type: " .. tostring(v))
  end,
  deploy = function(d)
    local id, e = d:deploy("name: dep\n", { context_id = "op-1", recreate = true })
    result("deploy", id, e)
    assert(id == nil or (math.type(id) == "integer" and id > 0), "deploy: task id")
  end,
  delete = function(d) local v, e = d:delete_deployment("dep/x y", { force = true }) result("delete", v, e) end,
  deployment = function(d)
    local v, e = d:deployment("dep")
    result("deployment", v, e)
    assert(v == nil or type(v) == "string", "deployment: manifest")
  end,
  deployments = function(d) local v, e = d:deployments() result("deployments", v, e, true) end,
  task = function(d) local v, e = d:task(5) result("task", v, e, true) end,
  output = function(d)
    local v, e = d:task_output(5, "event")
    result("output", v, e)
    assert(v == nil or type(v) == "string", "task_output: text")
  end,
  output_from = function(d)
    local v, total = d:task_output(5, "debug", { offset = 10 })
    if v == nil then return check_err(total, "output_from") end
    assert(type(v) == "string" and (total == nil or math.type(total) == "integer"), "task_output offset: results")
  end,
  wait = function(d) local v, e = d:wait_task(5, { timeout_ms = 50, poll_ms = 1 }) result("wait", v, e) end,
  vms = function(d) local v, e = d:vms("dep", { timeout_ms = 50, poll_ms = 1 }) result("vms", v, e) end,
  vms_db = function(d) local v, e = d:vms("dep", { full = false }) result("vms_db", v, e, true) end,
  instances = function(d)
    local v, e = d:vms("dep", { instances = true, timeout_ms = 50, poll_ms = 1 })
    result("instances", v, e)
  end,
  errand = function(d)
    local v, e = d:run_errand("dep", "smoke", { "web/0", { group = "db", id = 1 } })
    result("errand", v, e)
  end,
  errand_result = function(d)
    local v, e = d:errand_result(5)
    result("errand_result", v, e)
    assert(v == nil or type(v) == "table", "errand_result: array")
  end,
  releases = function(d) local v, e = d:releases() result("releases", v, e, true) end,
  stemcells = function(d) local v, e = d:stemcells() result("stemcells", v, e, true) end,
  upload = function(d)
    local v, e = d:upload_release("https://example.invalid/r.tgz", "abc", { fix = true })
    result("upload", v, e)
  end,
  cancel = function(d)
    local v, e = d:cancel_task(5)
    result("cancel", v, e)
    assert(v == nil or v == true, "cancel_task")
  end,
  tasks = function(d)
    local v, e = d:tasks({ state = { "processing", "queued" }, deployment = "dep", limit = 5, verbose = 1 })
    result("tasks", v, e, true)
  end,
}

return function(line)
  local opts = { url = "https://10.0.0.6:25555/", username = "admin", password = "pw", timeout_ms = 1000 }
  local ops = {}
  for w in line:gmatch("%S+") do
    if w == "uaa" then
      opts.uaa_url, opts.client, opts.client_secret = "https://10.0.0.6:8443/", "broker", "s"
    elseif w == "client" then
      opts.client, opts.client_secret = "broker", "s"
    elseif w == "nobasic" then
      opts.username, opts.password = nil, nil
    elseif OPS[w] and #ops < 16 then
      ops[#ops + 1] = OPS[w]
    end
  end
  local d = assert(bosh.new(opts))
  for _, op in ipairs(ops) do op(d) end
  d:close()
end
