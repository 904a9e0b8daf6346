--- A simulated BOSH director on forge.http (see docs/bosh.md and ../shared/BOSH-API.md).
--
-- Every forge.http worker thread has its own lua_State, so all sim state lives in one forge.store
-- database: a "world" document (locks, releases, stemcells, faults, errands, the task counter)
-- changed only by compare-and-swap; one key per deployment (dep/<name>) and per reserved IP
-- (ipam/<ip> -> deployment), read and written through the world (see `keyed`), so the sim holds
-- 100,000 deployments; one key per task, indexed by context id and deployment; and one key per
-- recorded request. Task progress is computed from timestamps on every read (queued until started_at,
-- processing until finish_at, then the outcome fixed when the task was accepted); the effects of
-- a finished task are applied by the first request that notices it ("settle"). No background thread.
local proc = require "forge.proc"
local util = require "forge.util"
local crypto = require "forge.crypto"

local M = {}

local db                        -- this worker state's store connection
local null = util.null
local EMPTY = "__boshsim_empty_array__"   -- encodes as [] (cjson writes {} for empty tables)
local FINAL = { done = true, error = true, cancelled = true, timeout = true }

------------------------------------------------------------------------------------------------
-- helpers
------------------------------------------------------------------------------------------------

local function now() return proc.time() end

local function encode(v)
  local s = assert(util.json_encode(v))
  return (s:gsub('"' .. EMPTY .. '"', "[]"))
end

-- The same, with object keys sorted: equal documents give equal texts.
local function encode_sorted(v)
  local s = assert(util.json_encode_sorted(v))
  return (s:gsub('"' .. EMPTY .. '"', "[]"))
end

local function arr(t) return (t and #t > 0) and t or EMPTY end

local function json_reply(status, v, headers)
  local h = { ["Content-Type"] = "application/json" }
  for k, x in pairs(headers or {}) do h[k] = x end
  return status, h, encode(v)
end

local function text_reply(status, text, headers)
  local h = { ["Content-Type"] = "text/plain" }
  for k, x in pairs(headers or {}) do h[k] = x end
  return status, h, text
end

--- A director error body {"code","description"}.
local function director_error(status, code, description)
  return json_reply(status, { code = code, description = description })
end

local function not_found_route(path)
  return text_reply(404, "Endpoint '" .. path .. "' not found.")
end

local function jget(key)
  local kv, err = db:get(key)
  if err then error(err) end
  if not kv then return nil, 0 end
  return util.json_decode(kv.value), kv.mod_revision
end

local function task_key(id) return string.format("task/%012d", id) end

------------------------------------------------------------------------------------------------
-- config and world
------------------------------------------------------------------------------------------------

local function config() return (jget("config")) end

local function new_world()
  return { next_task = 1, locks = {}, active = {}, releases = {}, stemcells = {}, errands = {}, faults = {},
    tokens_not_before = 0 }
end

--- A table of the world kept as one store key per entry (prefix .. name): an entry is read on
-- first use, and changes(ops) adds txn ops for the entries put, deleted or changed in place
-- since. pairs() loads every entry (listing routes only). json: values are JSON documents
-- (else strings).
local function keyed(prefix, json)
  local loaded, stored = {}, {}     -- name -> value (false: absent); name -> stored text (false: absent)
  local function load(name, text)
    if loaded[name] ~= nil then return end
    if text == nil then
      local kv, err = db:get(prefix .. name)
      if err then error(err) end
      text = kv and kv.value or false
    end
    stored[name] = text
    loaded[name] = text and (json and util.json_decode(text) or text) or false
    if text and json then stored[name] = encode_sorted(loaded[name]) end  -- compared in the same form
  end
  local t = setmetatable({}, {
    __index = function(_, name)
      load(name)
      return loaded[name] or nil
    end,
    __newindex = function(_, name, v)
      load(name)
      if v == nil then loaded[name] = false else loaded[name] = v end
    end,
    __pairs = function()
      for _, kv in ipairs(assert(db:range(prefix))) do load(kv.key:sub(#prefix + 1), kv.value) end
      local all = {}
      for name, v in pairs(loaded) do if v then all[name] = v end end
      return next, all, nil
    end,
  })
  local function changes(ops)
    for name, v in pairs(loaded) do
      local text = v and (json and encode_sorted(v) or v) or false
      if text ~= stored[name] then
        ops[#ops + 1] = text and { op = "put", key = prefix .. name, value = text } or { op = "delete", key = prefix .. name }
      end
    end
    return ops
  end
  return t, changes
end

local KEYED = { { "deployments", "dep/", true }, { "ipam", "ipam/", false }, { "by_context", "taskctx/", false },
  { "by_deployment", "deptask/", false } }

--- The world document with its keyed tables (deployments, ipam, the task indexes) attached:
-- world, revision, changes(ops).
local function load_world()
  local w, rev = jget("world")
  w = w or new_world()
  local all = {}
  for _, k in ipairs(KEYED) do w[k[1]], all[#all + 1] = keyed(k[2], k[3]) end
  return w, rev, function(ops)
    for _, changes in ipairs(all) do changes(ops) end
    return ops
  end
end

-- The world document's own text (without its keyed tables).
local function world_text(w)
  local doc = {}
  for k, v in pairs(w) do doc[k] = v end
  for _, k in ipairs(KEYED) do doc[k[1]] = nil end
  return encode(doc)
end

--- Change the world atomically: fn(world) -> result, extra txn ops; retried on a lost race.
-- Every write of a keyed entry goes with a write of the world key, whose compare-and-swap
-- keeps the whole change atomic.
local function update_world(fn)
  for _ = 1, 200 do
    local w, rev, changes = load_world()
    local res, ops = fn(w)
    local success = changes({ { op = "put", key = "world", value = world_text(w) } })
    for _, o in ipairs(ops or {}) do success[#success + 1] = o end
    local ok, err = db:txn { compare = { { key = "world", mod_revision = rev } }, success = success }
    if ok == nil then error(err) end
    if ok then return res end
    proc.sleep(0.002)
  end
  error("boshsim: world update kept losing races")
end

--- Consume one of a counted fault; true when it applies to this request.
local function take_fault(name)
  local w = jget("world")
  if not w or (tonumber(w.faults[name]) or 0) <= 0 then return false end
  return update_world(function(world)
    local n = tonumber(world.faults[name]) or 0
    if n <= 0 then return false end
    world.faults[name] = n > 1 and n - 1 or nil
    return true
  end)
end

------------------------------------------------------------------------------------------------
-- IP addresses
------------------------------------------------------------------------------------------------

local function ip2n(ip)
  local a, b, c, d = tostring(ip):match("^(%d+)%.(%d+)%.(%d+)%.(%d+)$")
  if not a then return nil end
  return ((tonumber(a) * 256 + tonumber(b)) * 256 + tonumber(c)) * 256 + tonumber(d)
end

local function n2ip(n)
  return string.format("%d.%d.%d.%d", n >> 24 & 255, n >> 16 & 255, n >> 8 & 255, n & 255)
end

--- Parse "[name=]CIDR[:FIRST-LAST]" (the static range) into a subnet.
function M.parse_subnet(spec)
  local name, rest = spec:match("^([%w_%-%.]+)=(.*)$")
  rest = rest or spec
  local cidr, static = rest:match("^([^:]+):?(.*)$")
  local base, bits = (cidr or ""):match("^([%d%.]+)/(%d+)$")
  local n, b = ip2n(base), tonumber(bits)
  if not n or not b or b < 8 or b > 30 then return nil, "bad subnet '" .. spec .. "' (want [NAME=]CIDR[:FIRST-LAST])" end
  local size = 1 << (32 - b)
  local first = n & ~(size - 1)
  local s = { name = name, cidr = cidr, first = first, last = first + size - 1, gateway = first + 1 }
  if static and static ~= "" then
    local f, l = static:match("^([%d%.]+)%-([%d%.]+)$")
    s.static_first, s.static_last = ip2n(f), ip2n(l)
    if not s.static_first or not s.static_last or s.static_first < first or s.static_last > s.last then
      return nil, "bad static range in subnet '" .. spec .. "'"
    end
  end
  return s
end

local function subnets_for(cfg, network)
  local out = {}
  for _, s in ipairs(cfg.subnets or {}) do
    if s.name == nil or s.name == network then out[#out + 1] = s end
  end
  return out
end

local function in_static(s, n)
  return s.static_first and n >= s.static_first and n <= s.static_last
end

--- A free dynamic IP (inside the range, outside the static list) or nil.
local function dynamic_ip(subnets, used)
  for _, s in ipairs(subnets) do
    for n = s.first + 2, s.last - 1 do
      local ip = n2ip(n)
      if not in_static(s, n) and not used[ip] then return ip end
    end
  end
end

------------------------------------------------------------------------------------------------
-- manifests
------------------------------------------------------------------------------------------------

local V1_KEYS = { { "jobs", 140023 }, { "networks", 140026 }, { "disk_pools", 140027 }, { "resource_pools", 140028 } }
local CLOUD_KEYS = { "azs", "vm_types", "vm_extensions", "disk_types", "compilation" }

--- Validate a decoded v2 manifest and plan its instances with IPs. Returns instances or nil, {code, message}.
local function plan_instances(cfg, w, m, name)
  for _, k in ipairs(V1_KEYS) do
    if m[k[1]] ~= nil then
      return nil, { code = k[2], message = "Deployment manifest should not contain '" .. k[1] ..
        "' (manifest v1 is no longer supported; use instance_groups and cloud-config)" }
    end
  end
  for _, k in ipairs(CLOUD_KEYS) do
    if m[k] ~= nil then
      return nil, { code = 190014, message = "Deployment manifest contains '" .. k ..
        "' section, but this can only be set in a cloud-config." }
    end
  end
  local groups = m.instance_groups
  if type(groups) ~= "table" then
    return nil, { code = 40001, message = "Required property 'instance_groups' was not specified" }
  end
  local old = {}
  local dep = w.deployments[name]
  for _, inst in ipairs(dep and dep.instances or {}) do old[inst.group .. "/" .. inst.index] = inst end
  -- the deployment reserving an IP: this plan's picks, else the other deployments' reservations
  local picked = {}
  local used = setmetatable({}, { __index = function(_, ip)
    if picked[ip] then return picked[ip] end
    local owner = w.ipam[ip]
    if owner ~= name then return owner end
  end })
  local out = {}
  for _, g in ipairs(groups) do
    if type(g) ~= "table" or type(g.name) ~= "string" then
      return nil, { code = 40001, message = "Required property 'name' was not specified in an instance group" }
    end
    local count = math.tointeger(g.instances)
    if not count or count < 0 then
      return nil, { code = 40000, message = "Property 'instances' of instance group '" .. g.name .. "' must be an integer" }
    end
    local errand = g.lifecycle == "errand"
    local jobs = {}
    for _, j in ipairs(type(g.jobs) == "table" and g.jobs or {}) do jobs[#jobs + 1] = j.name end
    local ips = {}
    for idx = 0, count - 1 do ips[idx] = {} end
    for _, net in ipairs(type(g.networks) == "table" and g.networks or {}) do
      local subnets = subnets_for(cfg, net.name)
      local static = type(net.static_ips) == "table" and net.static_ips or nil
      if static and #static < count then
        return nil, { code = 150008, message = string.format(
          "Instance group '%s' has %d instances but was allocated %d static IPs in network '%s'",
          g.name, count, #static, tostring(net.name)) }
      end
      for idx = 0, count - 1 do
        local ip
        if static then
          ip = tostring(static[idx + 1])
          local n = ip2n(ip)
          local ok = n ~= nil and #subnets == 0
          for _, s in ipairs(subnets) do if n and in_static(s, n) then ok = true end end
          if not ok then
            return nil, { code = 150006, message = string.format(
              "Instance group '%s' asked for static IP '%s' outside the static ranges of network '%s'",
              g.name, ip, tostring(net.name)) }
          end
          if used[ip] then
            return nil, { code = 130008, message = string.format(
              "Failed to reserve IP '%s' for instance '%s/%d': already reserved by deployment '%s'",
              ip, g.name, idx, used[ip]) }
          end
        elseif not errand then
          local pool = #subnets > 0 and subnets or { M.parse_subnet("10.244.0.0/24:10.244.0.2-10.244.0.127") }
          ip = dynamic_ip(pool, used)
          if not ip then
            return nil, { code = 130007, message = "No more IPs available in network '" .. tostring(net.name) .. "'" }
          end
        end
        if ip then
          picked[ip] = name
          table.insert(ips[idx], ip)
        end
      end
    end
    for idx = 0, count - 1 do
      local prev = old[g.name .. "/" .. idx]
      out[#out + 1] = {
        group = g.name, index = idx, id = prev and prev.id or crypto.uuid(),
        az = type(g.azs) == "table" and g.azs[idx % math.max(#g.azs, 1) + 1] or "z1",
        ips = errand and {} or ips[idx], errand = errand, jobs = jobs, vm_type = g.vm_type,
        vm_cid = (not errand) and ("vm-" .. crypto.token(6)) or nil,
        agent_id = (not errand) and crypto.uuid() or nil,
        created_at = util.iso_time(now()), bootstrap = idx == 0,
      }
    end
  end
  return out
end

------------------------------------------------------------------------------------------------
-- tasks
------------------------------------------------------------------------------------------------

local function task_state(t, at)
  if at < t.started_at then return "queued" end
  if at < t.finish_at then return "processing" end
  return t.outcome
end

--- Create a task inside a world update. spec: kind, description, deployment, context_id, user,
-- delay, outcome, result, error, effects, result_output, lock. Returns task, txn op.
local function new_task(w, cfg, spec, at)
  local id = w.next_task
  w.next_task = id + 1
  local delay = spec.delay or cfg.task_delay or 0.5
  local t = { id = id, kind = spec.kind, description = spec.description, deployment = spec.deployment,
    context_id = spec.context_id, user = spec.user, created_at = at, started_at = at + delay / 4,
    finish_at = at + delay, outcome = spec.outcome or "done", result = spec.result, error = spec.error,
    effects = spec.effects, result_output = spec.result_output }
  local f = w.faults
  if spec.kind ~= "vms" and (f.task_error or 0) > 0 then
    f.task_error = f.task_error - 1
    t.outcome, t.effects, t.result_output = "error", nil, nil
    t.error = { code = f.task_error_code or 100, message = f.task_error_message or "Injected task failure (boshsim)" }
  elseif spec.kind ~= "vms" and (f.task_timeout or 0) > 0 then
    f.task_timeout = f.task_timeout - 1
    t.outcome, t.effects, t.result_output = "timeout", nil, nil
    t.error = { code = 100, message = "Task " .. id .. " time out" }
  end
  if spec.lock and t.deployment then
    local l = w.locks[t.deployment]
    if l and l.expires > at then
      t.outcome, t.effects, t.result_output = "error", nil, nil
      t.error = { code = 100, message = string.format(
        "Failed to acquire lock for lock:deployment:%s uid: %s. Locking task id is %d, description: '%s'",
        t.deployment, crypto.uuid(), l.task, l.description or "") }
      t.finish_at = at + (cfg.lock_wait or delay)
      t.started_at = math.min(t.started_at, t.finish_at)
    else
      w.locks[t.deployment] = { task = id, expires = t.finish_at, description = t.description }
    end
  end
  if t.outcome ~= "done" then t.result = t.error and t.error.message or t.result end
  w.active[tostring(id)] = t.finish_at
  if t.context_id then w.by_context[t.context_id .. "/" .. task_key(id)] = "" end
  if t.deployment then w.by_deployment[t.deployment .. "/" .. task_key(id)] = "" end
  return t, { op = "put", key = task_key(id), value = encode(t) }
end

local function ips_of(instances)
  local out = {}
  for _, inst in ipairs(instances or {}) do
    for _, ip in ipairs(inst.ips or {}) do out[#out + 1] = ip end
  end
  return out
end

--- Reserve the IPs of `instances` for deployment `name`, releasing those of `held` (what it
-- may hold now) that it does not keep.
local function reserve_ips(w, name, instances, held)
  for _, ip in ipairs(held) do if w.ipam[ip] == name then w.ipam[ip] = nil end end
  for _, ip in ipairs(ips_of(instances)) do w.ipam[ip] = name end
end

-- The IPs a task's deployment may hold: its instances', and those the task reserved when it
-- was accepted (a deploy).
local function held_by(w, t)
  local dep = t.deployment and w.deployments[t.deployment]
  local held = ips_of(dep and dep.instances)
  for _, ip in ipairs(t.reserved or {}) do held[#held + 1] = ip end
  return held
end

--- Apply a finished task's effects to the world.
local function apply_effects(w, t)
  local e = t.effects
  local dep = t.deployment and w.deployments[t.deployment]
  local held = held_by(w, t)
  if t.outcome == "done" and e then
    if e.type == "deploy" and dep then
      dep.manifest, dep.instances, dep.releases, dep.stemcells = e.manifest, e.instances, e.releases, e.stemcells
    elseif e.type == "delete" then
      w.deployments[t.deployment] = nil
      dep = nil
      reserve_ips(w, t.deployment, {}, held)
    elseif e.type == "release" then
      local r = w.releases[e.name] or { name = e.name, versions = {} }
      r.versions[e.version] = { version = e.version, commit_hash = e.commit_hash or "0000000",
        uncommitted_changes = false, job_names = e.job_names or {} }
      w.releases[e.name] = r
    elseif e.type == "stemcell" then
      w.stemcells[e.name .. "/" .. e.version] = { name = e.name, version = e.version,
        operating_system = e.operating_system or "ubuntu-jammy", cid = "sc-" .. crypto.token(6),
        api_version = 3, id = crypto.uuid(), cpi = "" }
    end
  end
  if dep then reserve_ips(w, t.deployment, dep.instances, held) end
  local l = t.deployment and w.locks[t.deployment]
  if l and l.task == t.id then w.locks[t.deployment] = nil end
end

--- Apply every task whose finish time has passed (cheap read when nothing is due).
local function settle()
  local at = now()
  local w = jget("world")
  if not w then return end
  local due = false
  for _, fin in pairs(w.active) do if fin <= at then due = true end end
  if not due then return end
  update_world(function(world)
    local ops = {}
    for sid, fin in pairs(world.active) do
      if fin <= at then
        world.active[sid] = nil
        local t = jget(task_key(tonumber(sid)))
        if t and not t.applied then
          apply_effects(world, t)
          t.applied = true
          ops[#ops + 1] = { op = "put", key = task_key(t.id), value = encode(t) }
        end
      end
    end
    return nil, ops
  end)
end

local function task_json(t, at)
  local state = task_state(t, at)
  local final = FINAL[state]
  return {
    id = t.id, state = state, description = t.description,
    timestamp = final and math.floor(t.finish_at) or null,
    started_at = at >= t.started_at and math.floor(t.started_at) or null,
    result = final and (t.result or "") or null,
    user = t.user or "admin", deployment = t.deployment or null, context_id = t.context_id or "",
  }
end

local function event_output(t, at)
  local lines = {}
  local state = task_state(t, at)
  local stage = t.description
  if state ~= "queued" then
    lines[#lines + 1] = encode { time = math.floor(t.started_at), stage = stage, tags = EMPTY, total = 1,
      task = stage, index = 1, state = "started", progress = 0 }
  end
  if state == "done" then
    lines[#lines + 1] = encode { time = math.floor(t.finish_at), stage = stage, tags = EMPTY, total = 1,
      task = stage, index = 1, state = "finished", progress = 100 }
  elseif FINAL[state] and t.error then
    lines[#lines + 1] = encode { time = math.floor(t.finish_at), stage = stage, tags = EMPTY, total = 1,
      task = stage, index = 1, state = "failed", progress = 100, data = { error = t.error.message } }
    lines[#lines + 1] = encode { time = math.floor(t.finish_at), error = t.error }
  end
  return #lines > 0 and (table.concat(lines, "\n") .. "\n") or ""
end

------------------------------------------------------------------------------------------------
-- auth
------------------------------------------------------------------------------------------------

local function b64url(s) return (crypto.base64_encode(s):gsub("+", "-"):gsub("/", "_"):gsub("=", "")) end

local function b64url_decode(s)
  s = s:gsub("-", "+"):gsub("_", "/")
  return crypto.base64_decode(s .. string.rep("=", (4 - #s % 4) % 4))
end

local function sign(cfg, payload) return b64url(crypto.hmac_sha256(cfg.signing_key, payload)) end

local function issue_token(cfg, client)
  local at = now()
  local payload = b64url(encode { client_id = client, iat = at, exp = at + cfg.token_ttl,
    jti = crypto.token(8), scope = { "bosh.admin" } })
  return payload .. "." .. sign(cfg, payload)
end

local function basic_credentials(req)
  local b64 = (req.headers.authorization or ""):match("^[Bb]asic%s+(%S+)")
  local raw = b64 and crypto.base64_decode(b64)
  if not raw then return nil end
  return raw:match("^([^:]*):(.*)$")
end

--- The authenticated user name, or nil.
local function authenticate(cfg, req, w)
  if cfg.auth == "uaa" then
    local tok = (req.headers.authorization or ""):match("^[Bb]earer%s+(%S+)$")
    if not tok then return nil end
    local payload, sig = tok:match("^([%w%-_]+)%.([%w%-_]+)$")
    if not payload or not crypto.equal(sig, sign(cfg, payload)) then return nil end
    local claims = util.json_decode(b64url_decode(payload) or "")
    if not claims or claims.exp <= now() or claims.iat < (w.tokens_not_before or 0) then return nil end
    return claims.client_id
  end
  local user, password = basic_credentials(req)
  if user and crypto.equal(user, cfg.user) and crypto.equal(password, cfg.password) then return user end
end

local function unauthorized(path)
  return text_reply(401, "Not authorized: '" .. path .. "'\n", { ["WWW-Authenticate"] = 'Basic realm="BOSH Director"' })
end

------------------------------------------------------------------------------------------------
-- routes
------------------------------------------------------------------------------------------------

local R = {}   -- handlers: R.name(ctx) -> status, headers, body

local function redirect_task(ctx, t)
  return 302, { Location = ctx.cfg.url .. "/tasks/" .. t.id, ["Content-Type"] = "text/html" }, ""
end

local function info(ctx)
  local cfg = ctx.cfg
  local ua = cfg.auth == "uaa" and { type = "uaa", options = { url = cfg.url, urls = { cfg.url } } }
    or { type = "basic", options = {} }
  local user = ctx.w and authenticate(cfg, ctx.req, ctx.w) or nil
  local body = encode { name = cfg.name, uuid = cfg.uuid, version = "280.1.0 (boshsim)", user = user or null,
    cpi = "boshsim_cpi", stemcell_os = "ubuntu-jammy", stemcell_version = "1.500", user_authentication = ua,
    features = { local_dns = { status = true, extras = { domain_name = "bosh" } }, snapshots = { status = false },
      config_server = { status = false, extras = { urls = EMPTY } } } }
  return 200, { ["Content-Type"] = "application/json" }, body
end

local function token_endpoint(ctx)
  local cfg, req = ctx.cfg, ctx.req
  if cfg.auth ~= "uaa" then return not_found_route("/oauth/token") end
  local form = util.parse_query(req.body) or {}
  local client, secret = basic_credentials(req)
  client, secret = client or form.client_id, secret or form.client_secret
  if form.grant_type ~= "client_credentials" then
    return json_reply(400, { error = "unsupported_grant_type", error_description = "only client_credentials" })
  end
  if not (client and crypto.equal(client, cfg.client) and crypto.equal(secret or "", cfg.secret)) then
    return json_reply(401, { error = "unauthorized", error_description = "Bad credentials" })
  end
  return json_reply(200, { access_token = issue_token(cfg, client), token_type = "bearer",
    expires_in = cfg.token_ttl, scope = "bosh.admin", jti = crypto.token(8) })
end

local function media_type(req)
  return ((req.headers["content-type"] or ""):match("^%s*([^;%s]+)") or ""):lower()
end

function R.post_deployments(ctx)
  local req = ctx.req
  if media_type(req) ~= "text/yaml" then return not_found_route("/deployments") end
  local ctxid = req.headers["x-bosh-context-id"]
  if ctxid and #ctxid > 64 then
    return director_error(400, 70010, "Context ID is too long (max 64 characters)")
  end
  local yaml = require "forge.yaml"
  local m, err = yaml.decode(req.body, "manifest")
  if m == nil or yaml.kind(m) ~= "map" then
    return director_error(400, 440001, "Incorrect YAML structure of the uploaded manifest: " .. tostring(err or "not a map"))
  end
  if type(m.name) ~= "string" or m.name == "" then
    return director_error(400, 40001, "Required property 'name' was not specified in object")
  end
  local name = m.name
  local dry = ctx.query.dry_run == "true"
  local at = now()
  local t = update_world(function(w)
    local instances, perr = plan_instances(ctx.cfg, w, m, name)
    if not dry and not w.deployments[name] then
      w.deployments[name] = { name = name, created_at = at, instances = {} }
    end
    local releases, stemcells = {}, {}
    for _, r in ipairs(type(m.releases) == "table" and m.releases or {}) do
      releases[#releases + 1] = { name = r.name, version = tostring(r.version) }
    end
    for _, s in ipairs(type(m.stemcells) == "table" and m.stemcells or {}) do
      stemcells[#stemcells + 1] = { name = s.name or s.os, version = tostring(s.version) }
    end
    local task, op = new_task(w, ctx.cfg, {
      kind = "deploy", deployment = name, context_id = ctxid, user = ctx.user, lock = not dry,
      description = dry and "create deployment (dry run)" or "create deployment",
      outcome = perr and "error" or "done", error = perr, result = "/deployments/" .. name,
      effects = (not dry and instances) and { type = "deploy", manifest = req.body, instances = instances,
        releases = releases, stemcells = stemcells } or nil,
    }, at)
    -- reserve the planned IPs now, so concurrent deploys never get the same ones
    if task.effects then
      task.reserved = ips_of(instances)
      for _, ip in ipairs(task.reserved) do w.ipam[ip] = name end
      op.value = encode(task)
    end
    return task, { op }
  end)
  return redirect_task(ctx, t)
end

local function deployment_json(d, w)
  local l = w.locks[d.name]
  return { name = d.name, cloud_config = "latest", releases = arr(d.releases), stemcells = arr(d.stemcells),
    teams = EMPTY, locked = (l ~= nil and l.expires > now()) }
end

function R.get_deployments(ctx)
  local list = {}
  for _, d in pairs(ctx.w.deployments) do list[#list + 1] = deployment_json(d, ctx.w) end
  table.sort(list, function(a, b) return a.name < b.name end)
  return json_reply(200, arr(list))
end

local function no_deployment(name)
  return director_error(404, 70000, "Deployment '" .. name .. "' doesn't exist")
end

function R.get_deployment(ctx, name)
  local d = ctx.w.deployments[name]
  if not d then return no_deployment(name) end
  return json_reply(200, { manifest = d.manifest or null })
end

function R.delete_deployment(ctx, name)
  if not ctx.w.deployments[name] then return no_deployment(name) end
  local force = ctx.query.force == "true"
  local t = update_world(function(w)
    if not w.deployments[name] then return nil end
    local task, op = new_task(w, ctx.cfg, { kind = "delete", deployment = name, user = ctx.user, lock = true,
      description = "delete deployment " .. name, result = "/deployments/" .. name,
      context_id = ctx.req.headers["x-bosh-context-id"],
      effects = { type = "delete", force = force } }, now())
    return task, { op }
  end)
  if not t then return no_deployment(name) end
  return redirect_task(ctx, t)
end

local function vm_rows(d, instances_view)
  local rows = {}
  for _, inst in ipairs(d.instances or {}) do
    if instances_view or not inst.errand then
      local row = { agent_id = inst.agent_id or null, cid = inst.vm_cid or null, job = inst.group, index = inst.index,
        id = inst.id, az = inst.az, ips = arr(inst.ips), vm_created_at = inst.created_at }
      if instances_view then row.expects_vm = not inst.errand else row.active = true end
      rows[#rows + 1] = row
    end
  end
  return rows
end

local function vm_full_line(d, inst)
  return encode {
    job_name = inst.group, index = inst.index, id = inst.id, az = inst.az, vm_type = inst.vm_type or "default",
    bootstrap = inst.bootstrap, ignore = false, ips = arr(inst.ips),
    job_state = inst.errand and null or "running", state = "started",
    vm_cid = inst.vm_cid or null, agent_id = inst.agent_id or null, active = not inst.errand,
    vm_created_at = inst.created_at, disk_cid = null, disk_cids = EMPTY, cloud_properties = {},
    vitals = inst.errand and null or { cpu = { sys = "0.1", user = "0.2", wait = "0.0" },
      mem = { kb = "102400", percent = "10" }, swap = { kb = "0", percent = "0" }, load = { "0.01", "0.02", "0.03" },
      disk = { system = { percent = "20" } } },
    processes = inst.errand and EMPTY or (function()
      local p = {}
      for _, j in ipairs(inst.jobs or {}) do p[#p + 1] = { name = j, state = "running" } end
      return arr(p)
    end)(),
    stemcell = { name = "bosh-boshsim-ubuntu-jammy-go_agent", version = "1.500", api_version = 3 },
    deployment = d.name,
  }
end

function R.get_vms(ctx, name, what)
  local d = ctx.w.deployments[name]
  if not d then return no_deployment(name) end
  local instances_view = what == "instances"
  if ctx.query.format ~= "full" then return json_reply(200, arr(vm_rows(d, instances_view))) end
  local lines = {}
  for _, inst in ipairs(d.instances or {}) do
    if instances_view or not inst.errand then lines[#lines + 1] = vm_full_line(d, inst) end
  end
  local t = update_world(function(w)
    local task, op = new_task(w, ctx.cfg, { kind = "vms", deployment = name, user = ctx.user,
      description = "retrieve vm-stats", result = "", delay = ctx.cfg.vms_delay or 0.1,
      result_output = #lines > 0 and (table.concat(lines, "\n") .. "\n") or "" }, now())
    return task, { op }
  end)
  return redirect_task(ctx, t)
end

--- The instances an errand runs on: the lifecycle-errand group of that name, else instances colocating the job.
local function errand_instances(d, errand)
  local out = {}
  for _, inst in ipairs(d.instances or {}) do
    if inst.errand and inst.group == errand then out[#out + 1] = inst end
  end
  if #out > 0 then return out end
  for _, inst in ipairs(d.instances or {}) do
    for _, j in ipairs(inst.jobs or {}) do if j == errand then out[#out + 1] = inst end end
  end
  return out
end

function R.list_errands(ctx, name)
  local d = ctx.w.deployments[name]
  if not d then return no_deployment(name) end
  local seen, list = {}, {}
  for _, inst in ipairs(d.instances or {}) do
    if inst.errand and not seen[inst.group] then
      seen[inst.group] = true
      list[#list + 1] = { name = inst.group }
    end
  end
  return json_reply(200, arr(list))
end

function R.run_errand(ctx, name, errand)
  local d = ctx.w.deployments[name]
  if not d then return no_deployment(name) end
  local body = util.json_decode(ctx.req.body ~= "" and ctx.req.body or "{}")
  if type(body) ~= "table" then return director_error(400, 40000, "Request body must be a JSON object") end
  local wanted = {}
  for _, i in ipairs(type(body.instances) == "table" and body.instances or {}) do
    wanted[tostring(i.group) .. "/" .. tostring(i.id)] = true
  end
  local t = update_world(function(w)
    local dep = w.deployments[name] or d
    local targets, lines = {}, {}
    for _, inst in ipairs(errand_instances(dep, errand)) do
      if next(wanted) == nil or wanted[inst.group .. "/" .. inst.id] or wanted[inst.group .. "/" .. inst.index] then
        targets[#targets + 1] = inst
      end
    end
    local conf = w.errands[name .. "/" .. errand] or w.errands[errand] or {}
    local ok, failed = 0, 0
    for _, inst in ipairs(targets) do
      local code = math.tointeger(conf.exit_code) or 0
      if code == 0 then ok = ok + 1 else failed = failed + 1 end
      lines[#lines + 1] = encode { instance = { group = inst.group, id = inst.id }, errand_name = errand,
        exit_code = code, stdout = conf.stdout or ("errand " .. errand .. " ran\n"), stderr = conf.stderr or "",
        logs = { blobstore_id = crypto.uuid(), sha1 = crypto.sha256_hex(inst.id):sub(1, 40) } }
    end
    local spec = { kind = "errand", deployment = name, user = ctx.user, lock = true,
      context_id = ctx.req.headers["x-bosh-context-id"], description = "run errand " .. errand .. " from deployment " .. name,
      result = string.format("%d succeeded, %d errored, 0 canceled", ok, failed),
      result_output = #lines > 0 and (table.concat(lines, "\n") .. "\n") or nil }
    if #targets == 0 then
      spec.outcome, spec.error = "error", { code = 100, message = "Errand '" .. errand .. "' doesn't exist" }
      spec.result_output = nil
    end
    local task, op = new_task(w, ctx.cfg, spec, now())
    return task, { op }
  end)
  return redirect_task(ctx, t)
end

------------------------------------------------------------------------------------------------
-- tasks routes
------------------------------------------------------------------------------------------------

local function no_task(id) return director_error(404, 10000, "Task " .. tostring(id) .. " not found") end

function R.get_task(_, id)
  local t = jget(task_key(tonumber(id) or 0))
  if not t then return no_task(id) end
  return json_reply(200, task_json(t, now()))
end

function R.task_output(ctx, id)
  local t = jget(task_key(tonumber(id) or 0))
  if not t then return no_task(id) end
  local at = now()
  local kind = ctx.query.type or "none"
  local text = ""
  if kind == "event" then
    text = event_output(t, at)
  elseif kind == "result" then
    text = task_state(t, at) == "done" and (t.result_output or "") or ""
  elseif kind == "debug" then
    text = event_output(t, at):gsub("[^\n]+", "D, [boshsim] DEBUG -- %0")
  end
  if text == "" then return 204, { ["Content-Type"] = "text/plain" }, "" end
  local range = ctx.req.headers.range
  if range then
    local from, to = range:match("^bytes=(%d+)%-(%d*)$")
    from = tonumber(from)
    if from then
      to = tonumber(to) or #text - 1
      if from >= #text then
        return 416, { ["Content-Type"] = "text/plain", ["Content-Range"] = "bytes */" .. #text }, ""
      end
      to = math.min(to, #text - 1)
      return 206, { ["Content-Type"] = "text/plain", ["Content-Range"] = string.format("bytes %d-%d/%d", from, to, #text) },
        text:sub(from + 1, to + 1)
    end
  end
  return text_reply(200, text)
end

-- The ids of the tasks a listing may show, newest first: from the context id or deployment
-- index when the query names one, else every id from the newest down (read lazily).
local function candidate_tasks(ctx)
  local q, prefix = ctx.query, nil
  if q.context_id then
    prefix = "taskctx/" .. q.context_id .. "/"
  elseif q.deployment then
    prefix = "deptask/" .. q.deployment .. "/"
  end
  if not prefix then
    local id = ctx.w.next_task
    return function()
      id = id - 1
      return id > 0 and id or nil
    end
  end
  local kvs = assert(db:range(prefix))
  local i = #kvs + 1
  return function()
    i = i - 1
    return kvs[i] and tonumber(kvs[i].key:match("task/(%d+)$")) or nil
  end
end

function R.list_tasks(ctx)
  local q = ctx.query
  local states = {}
  for s in (q.state or ""):gmatch("[^,]+") do states[s] = true end
  local limit = tonumber(q.limit) or 100
  local verbose = tonumber(q.verbose) or 1
  local at, out = now(), {}
  for id in candidate_tasks(ctx) do
    local t = jget(task_key(id))
    local tj = t and task_json(t, at)
    if t and (next(states) == nil or states[tj.state]) and (not q.deployment or q.deployment == t.deployment)
      and (not q.context_id or q.context_id == t.context_id) and (verbose >= 2 or t.kind ~= "vms") then
      out[#out + 1] = tj
      if #out >= limit then break end
    end
  end
  return json_reply(200, arr(out))
end

function R.cancel_task(_, id)
  id = tonumber(id) or 0
  local at = now()
  local res = update_world(function(w)
    local t = jget(task_key(id))
    if not t then return "missing" end
    local state = task_state(t, at)
    if state ~= "queued" and state ~= "processing" then return state end
    t.outcome, t.effects, t.result_output, t.finish_at = "cancelled", nil, nil, at
    t.started_at = math.min(t.started_at, at)
    t.result = "Task " .. id .. " cancelled"
    w.active[tostring(id)] = at
    local l = t.deployment and w.locks[t.deployment]
    if l and l.task == id then l.expires = at end
    return "ok", { { op = "put", key = task_key(id), value = encode(t) } }
  end)
  if res == "missing" then return no_task(id) end
  if res ~= "ok" then return text_reply(400, "Cannot cancel task " .. id .. ": invalid state (" .. res .. ")") end
  return 204, { ["Content-Type"] = "text/plain" }, ""
end

function R.get_locks(ctx)
  local out, at = {}, now()
  for name, l in pairs(ctx.w.locks) do
    if l.expires > at then
      out[#out + 1] = { type = "deployment", resource = { name }, timeout = string.format("%.6f", l.expires),
        task_id = tostring(l.task) }
    end
  end
  return json_reply(200, arr(out))
end

------------------------------------------------------------------------------------------------
-- releases and stemcells
------------------------------------------------------------------------------------------------

function R.get_releases(ctx)
  local list = {}
  for name, r in pairs(ctx.w.releases) do
    local versions = {}
    for _, v in pairs(r.versions) do
      local used = false
      for _, d in pairs(ctx.w.deployments) do
        for _, dr in ipairs(d.releases or {}) do if dr.name == name and dr.version == v.version then used = true end end
      end
      versions[#versions + 1] = { version = v.version, commit_hash = v.commit_hash, uncommitted_changes = false,
        currently_deployed = used, job_names = arr(v.job_names) }
    end
    table.sort(versions, function(a, b) return a.version < b.version end)
    list[#list + 1] = { name = name, release_versions = versions }
  end
  table.sort(list, function(a, b) return a.name < b.name end)
  return json_reply(200, arr(list))
end

function R.get_stemcells(ctx)
  local list = {}
  for _, s in pairs(ctx.w.stemcells) do
    local deps = {}
    for _, d in pairs(ctx.w.deployments) do
      for _, ds in ipairs(d.stemcells or {}) do
        if (ds.name == s.name or ds.name == s.operating_system) and ds.version == s.version then
          deps[#deps + 1] = { name = d.name }
        end
      end
    end
    list[#list + 1] = { name = s.name, operating_system = s.operating_system, version = s.version, cid = s.cid,
      cpi = s.cpi, deployments = arr(deps), api_version = s.api_version, id = s.id }
  end
  table.sort(list, function(a, b) return a.name .. a.version < b.name .. b.version end)
  return json_reply(200, arr(list))
end

local function shell_quote(s) return "'" .. tostring(s):gsub("'", "'\\''") .. "'" end

--- Read the release.MF or stemcell.MF (kind "release" | "stemcell") of a tgz, with tar through
-- forge.proc, and the tgz's sha1. Returns manifest, sha1 | nil, message, sha1.
local function inspect_tarball(path, kind)
  local releases = require "forge.releases"
  local sha1 = releases.sha1(path)
  local m = releases.tarball_manifest(path, kind)
  if not m then return nil, "tarball has no valid " .. kind .. ".MF", sha1 end
  return m, sha1
end

--- Fetch an upload's `location` (http, https or file URL) into `file` with curl, as the director
-- downloads it. Returns true | nil, message.
local function download(location, file)
  local r, err = proc.run { argv = { "curl", "-fsSL", "--max-time", "600", "-o", file, "--", location }, timeout = 610 }
  if r and r.code == 0 then return true end
  os.remove(file)
  return nil, "cannot download " .. location .. ": " .. (r and (r.stderr:gsub("%s+$", "")) or tostring(err))
end

local function upload(ctx, what)
  local req, cfg = ctx.req, ctx.cfg
  if take_fault("upload_refuse") then
    return director_error(400, 40000, "Upload refused (boshsim fault upload_refuse)")
  end
  local mt = media_type(req)
  local location, sha1 = nil, ctx.query.sha1
  if mt == "application/json" then
    local b = util.json_decode(req.body)
    if type(b) ~= "table" or type(b.location) ~= "string" then
      return director_error(400, 40001, "Required property 'location' was not specified")
    end
    if b.sha1 and sha1 then return director_error(400, 40000, "sha1 given in both the body and the query") end
    location, sha1 = b.location, b.sha1 or sha1
  elseif mt ~= "application/x-compressed" and mt ~= "application/octet-stream" then
    return not_found_route("/" .. what)
  end
  local kind = what == "releases" and "release" or "stemcell"
  local file = string.format("%s/upload-%s.tgz", cfg.state, req.id)
  local m, actual, err
  if location then
    m, err = download(location, file)
  else
    local f = assert(io.open(file, "wb"))
    f:write(req.body)
    f:close()
    m = true
  end
  if m then
    m, actual = inspect_tarball(file, kind)
    if not m then err = actual end
    os.remove(file)
  end
  local spec = { kind = kind, user = ctx.user,
    description = what == "releases" and "create release" or "create stemcell" }
  if not m then
    spec.outcome, spec.error = "error", { code = what == "releases" and 30001 or 50001, message = err or "invalid tarball" }
  elseif sha1 and actual and sha1:lower() ~= actual then
    spec.outcome, spec.error = "error", { code = what == "releases" and 30015 or 50007,
      message = string.format("SHA1 mismatch: expected %s, got %s", sha1, actual) }
  else
    local version = tostring(m.version)
    local jobs = {}
    for _, j in ipairs(type(m.jobs) == "table" and m.jobs or {}) do jobs[#jobs + 1] = j.name end
    spec.effects = { type = spec.kind, name = m.name, version = version, commit_hash = m.commit_hash,
      job_names = jobs, operating_system = m.operating_system }
    spec.result = what == "releases" and ("Created release '" .. m.name .. "/" .. version .. "'")
      or ("/stemcells/" .. m.name .. "/" .. version)
  end
  local t = update_world(function(w)
    local task, op = new_task(w, cfg, spec, now())
    return task, { op }
  end)
  return redirect_task(ctx, t)
end

function R.post_releases(ctx) return upload(ctx, "releases") end
function R.post_stemcells(ctx) return upload(ctx, "stemcells") end

------------------------------------------------------------------------------------------------
-- admin endpoints (/_sim/...), no auth
------------------------------------------------------------------------------------------------

local function restart(w)
  -- a director restart: in-flight tasks vanish (GET /tasks/N → 404), their locks go with them
  local at, ops, lost = now(), {}, {}
  for sid, fin in pairs(w.active) do
    local t = jget(task_key(tonumber(sid)))
    if fin > at or (t and task_state(t, at) ~= t.outcome) then
      w.active[sid] = nil
      ops[#ops + 1] = { op = "delete", key = task_key(tonumber(sid)) }
      lost[#lost + 1] = tonumber(sid)
      if t and t.deployment and w.locks[t.deployment] and w.locks[t.deployment].task == t.id then
        w.locks[t.deployment] = nil
      end
      if t and t.deployment and w.deployments[t.deployment] then
        reserve_ips(w, t.deployment, w.deployments[t.deployment].instances, held_by(w, t))
      end
    end
  end
  return lost, ops
end

local function admin(ctx, segs)
  local req, method = ctx.req, ctx.req.method
  local what = segs[2]
  if what == "requests" then
    if method == "DELETE" then
      assert(db:txn { success = { { op = "delete_prefix", prefix = "req/" } } })
      return json_reply(200, { cleared = true })
    end
    local out = {}
    for _, kv in ipairs(assert(db:range("req/"))) do out[#out + 1] = util.json_decode(kv.value) end
    return json_reply(200, arr(out))
  elseif what == "faults" then
    if method == "DELETE" then
      update_world(function(w) w.faults = {} end)
      return json_reply(200, {})
    end
    if method ~= "POST" then return json_reply(200, (jget("world") or new_world()).faults) end
    local f = util.json_decode(req.body)
    if type(f) ~= "table" then return json_reply(400, { error = "body must be a JSON object" }) end
    local result = update_world(function(w)
      local ops, lost = {}, nil
      for _, k in ipairs { "task_error", "task_error_code", "task_error_message", "task_timeout", "http_500",
        "slow_ms", "slow_count", "upload_refuse" } do
        if f[k] ~= nil then w.faults[k] = f[k] == false and nil or (f[k] == true and 1 or f[k]) end
      end
      if f.restart then lost, ops = restart(w) end
      if f.revoke_tokens then w.tokens_not_before = now() end
      return { faults = w.faults, lost_tasks = lost and arr(lost) or nil }, ops
    end)
    return json_reply(200, result)
  elseif what == "errands" and method == "POST" then
    local e = util.json_decode(req.body)
    if type(e) ~= "table" or type(e.errand) ~= "string" then
      return json_reply(400, { error = "want {errand=, deployment=?, exit_code=, stdout=, stderr=}" })
    end
    update_world(function(w)
      w.errands[(e.deployment and (e.deployment .. "/") or "") .. e.errand] =
        { exit_code = e.exit_code or 0, stdout = e.stdout, stderr = e.stderr }
    end)
    return json_reply(200, e)
  elseif what == "config" and method == "POST" then
    local c = util.json_decode(req.body)
    if type(c) ~= "table" then return json_reply(400, { error = "body must be a JSON object" }) end
    local cfg = config()
    for _, k in ipairs { "task_delay", "vms_delay", "lock_wait", "token_ttl" } do
      if tonumber(c[k]) then cfg[k] = tonumber(c[k]) end
    end
    assert(db:put("config", encode(cfg)))
    return json_reply(200, { task_delay = cfg.task_delay, vms_delay = cfg.vms_delay, lock_wait = cfg.lock_wait,
      token_ttl = cfg.token_ttl })
  elseif what == "state" then
    return json_reply(200, jget("world") or new_world())
  end
  return not_found_route(ctx.path)
end

------------------------------------------------------------------------------------------------
-- dispatch
------------------------------------------------------------------------------------------------

local ROUTES = {
  { "GET", "^/deployments$", R.get_deployments },
  { "POST", "^/deployments$", R.post_deployments },
  { "GET", "^/deployments/([^/]+)$", R.get_deployment },
  { "DELETE", "^/deployments/([^/]+)$", R.delete_deployment },
  { "GET", "^/deployments/([^/]+)/(vms)$", R.get_vms },
  { "GET", "^/deployments/([^/]+)/(instances)$", R.get_vms },
  { "GET", "^/deployments/([^/]+)/errands$", R.list_errands },
  { "POST", "^/deployments/([^/]+)/errands/([^/]+)/runs$", R.run_errand },
  { "GET", "^/tasks$", R.list_tasks },
  { "GET", "^/tasks/(%d+)$", R.get_task },
  { "GET", "^/tasks/(%d+)/output$", R.task_output },
  { "DELETE", "^/task/(%d+)$", R.cancel_task },
  { "GET", "^/locks$", R.get_locks },
  { "GET", "^/releases$", R.get_releases },
  { "POST", "^/releases$", R.post_releases },
  { "GET", "^/stemcells$", R.get_stemcells },
  { "POST", "^/stemcells$", R.post_stemcells },
}

local function dispatch(req, path, qs)
  local cfg = config()
  if not cfg then return text_reply(503, "boshsim is starting") end
  local query = util.parse_query(qs) or {}
  local segs = util.split_path(path) or {}
  local ctx = { req = req, cfg = cfg, query = query, path = path }
  if segs[1] == "_sim" then return admin(ctx, segs) end

  local w = jget("world") or new_world()
  local slow = tonumber(w.faults.slow_ms)
  if slow and slow > 0 then
    if w.faults.slow_count == nil or take_fault("slow_count") then proc.sleep(slow / 1000) end
  end
  if take_fault("http_500") then return 500, { ["Content-Type"] = "text/html" }, "" end

  settle()
  w = load_world()
  ctx.w = w
  if req.method == "GET" and path == "/info" then return info(ctx) end
  if req.method == "POST" and path == "/oauth/token" then return token_endpoint(ctx) end

  local user = authenticate(cfg, req, w)
  if not user then return unauthorized(path) end
  ctx.user = user
  for _, r in ipairs(ROUTES) do
    if r[1] == req.method then
      local a, b = path:match(r[2])
      if a or path:match(r[2]) then
        return r[3](ctx, a and util.url_decode(a), b and util.url_decode(b))
      end
    end
  end
  return not_found_route(path)
end

------------------------------------------------------------------------------------------------
-- forge.http handler interface
------------------------------------------------------------------------------------------------

--- Called once per worker state with the store path.
function M.init(db_path)
  local store = require "forge.store"
  db = assert(store.open(db_path, { busy_timeout_ms = 10000 }))
end

function M.handle(req)
  local at = now()
  local path, qs = req.uri:match("^([^?]*)%??(.*)$")
  local ok, status, headers, body = pcall(dispatch, req, path, qs)
  if not ok then
    io.stderr:write("boshsim: ", tostring(status), "\n")
    status, headers, body = 500, { ["Content-Type"] = "text/plain" }, ""
  end
  if path:sub(1, 6) ~= "/_sim/" then
    db:put(string.format("req/%017.6f/%s", at, req.id),
      encode { method = req.method, path = path, query = qs ~= "" and qs or nil, status = status, time = at })
  end
  return status, headers, body
end

------------------------------------------------------------------------------------------------
-- command line
------------------------------------------------------------------------------------------------

M.USAGE = [[
usage: forge bosh-sim [options]
       (the same: forge lua scripts/forge/boshsim_main.lua [options])

A simulated BOSH director for specs and authors (docs/bosh.md), serving until SIGTERM or SIGINT.

  --listen HOST:PORT     address to serve on (default 127.0.0.1:25555; port 0 picks one)
  --state DIR            state directory (store file boshsim.db; created; default a temp dir)
  --auth basic|uaa       authentication (default basic)
  --user U --password P  basic credentials (default admin / admin)
  --client C --secret S  UAA client credentials (default bosh_cli / secret); the sim is its
                         own UAA: POST /oauth/token on the same port
  --token-ttl SECONDS    lifetime of issued UAA tokens (default 120)
  --task-delay SECONDS   time a task takes: queued for a quarter, processing for the rest (default 0.5)
  --vms-delay SECONDS    time of a vms/instances format=full task (default 0.1)
  --lock-wait SECONDS    time a task waits before failing on a held deployment lock (default: task delay)
  --subnet [NAME=]CIDR[:FIRST-LAST]
                         a cloud-config subnet (repeatable) with its static range; NAME limits it
                         to that manifest network. Default 10.244.0.0/24:10.244.0.2-10.244.0.127
  --name NAME            director name in /info (default boshsim)
  --threads N            HTTP worker threads (default 8)
  --ready-file PATH      write the bound port there once serving
  --help                 this text

Admin endpoints (no auth): GET|DELETE /_sim/requests, GET|POST|DELETE /_sim/faults,
POST /_sim/errands, POST /_sim/config, GET /_sim/state.

exit status: 0 stopped by a signal, 1 cannot listen, 2 usage error
]]

local FLAGS = { listen = 1, state = 1, auth = 1, user = 1, password = 1, client = 1, secret = 1, ["token-ttl"] = 1,
  ["task-delay"] = 1, ["vms-delay"] = 1, ["lock-wait"] = 1, subnet = "list", name = 1, threads = 1,
  ["ready-file"] = 1, help = 0 }

local function parse_args(args)
  local o = { subnet = {} }
  local i = 1
  while i <= #args do
    local name = args[i]:match("^%-%-([%w%-]+)$")
    if not name or FLAGS[name] == nil then return nil, "unknown argument '" .. args[i] .. "'" end
    if FLAGS[name] == 0 then
      o[name] = true
    else
      local v = args[i + 1]
      if v == nil then return nil, "--" .. name .. " needs a value" end
      if FLAGS[name] == "list" then table.insert(o[name], v) else o[name] = v end
      i = i + 1
    end
    i = i + 1
  end
  return o
end

--- Run the simulator until SIGTERM/SIGINT; returns an exit code.
function M.main(args)
  local o, err = parse_args(args or {})
  if not o then
    io.stderr:write("boshsim: ", err, "\n\n", M.USAGE)
    return 2
  end
  if o.help then
    io.write(M.USAGE)
    return 0
  end
  local http = require "forge.http"
  local store = require "forge.store"
  local auth = o.auth or "basic"
  if auth ~= "basic" and auth ~= "uaa" then
    io.stderr:write("boshsim: --auth must be basic or uaa\n")
    return 2
  end
  local subnets = {}
  for _, s in ipairs(o.subnet) do
    local sn, serr = M.parse_subnet(s)
    if not sn then
      io.stderr:write("boshsim: ", serr, "\n")
      return 2
    end
    subnets[#subnets + 1] = sn
  end
  local nums = {}
  for _, k in ipairs { "token-ttl", "task-delay", "vms-delay", "lock-wait", "threads" } do
    if o[k] then
      nums[k] = tonumber(o[k])
      if not nums[k] or nums[k] < 0 then
        io.stderr:write("boshsim: --", k, " must be a non-negative number\n")
        return 2
      end
    end
  end
  local state = o.state
  if not state then
    state = os.tmpname()
    os.remove(state)
  end
  os.execute("mkdir -p " .. shell_quote(state))
  local db_path = state .. "/boshsim.db"
  os.remove(db_path)
  os.remove(db_path .. "-wal")
  os.remove(db_path .. "-shm")
  db = assert(store.open(db_path))
  local max_upload = 256 * 1024 * 1024         -- one raw tarball body, held in memory whole
  local srv, serr = http.serve { listen = o.listen or "127.0.0.1:25555", handler = "forge.boshsim", init = db_path,
    threads = math.tointeger(nums.threads) or 8, body_limit = max_upload, max_buffered_bytes = max_upload }
  if not srv then
    io.stderr:write("boshsim: ", tostring(serr), "\n")
    return 1
  end
  local host = (o.listen or "127.0.0.1:25555"):match("^(.*):%d+$")
  if host == "0.0.0.0" or host == "" then host = "127.0.0.1" end
  local cfg = {
    url = "http://" .. host .. ":" .. srv:port(), state = state, auth = auth, name = o.name or "boshsim",
    uuid = crypto.uuid(), user = o.user or "admin", password = o.password or "admin",
    client = o.client or "bosh_cli", secret = o.secret or "secret", token_ttl = nums["token-ttl"] or 120,
    task_delay = nums["task-delay"] or 0.5, vms_delay = nums["vms-delay"] or 0.1, lock_wait = nums["lock-wait"],
    subnets = subnets, signing_key = crypto.token(32),
  }
  assert(db:put("config", encode(cfg)))
  assert(db:put("world", encode(new_world())))
  http.trap_signals()
  io.write("boshsim: director ", cfg.name, " (", auth, ") listening on ", cfg.url, "\n")
  io.stdout:flush()
  if o["ready-file"] then
    local f = io.open(o["ready-file"] .. ".tmp", "w")
    if f then
      f:write(tostring(srv:port()), "\n")
      f:close()
      os.rename(o["ready-file"] .. ".tmp", o["ready-file"])
    end
  end
  while http.wait(3600) ~= "stop" do end
  srv:stop(2)
  db:close()
  return 0
end

return M
