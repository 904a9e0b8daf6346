--- A BOSH target: a deployment is a BOSH deployment on one director (forge.bosh).
--
-- Provision (in the request): static IPs for the plan's instance count come from the target's
-- network pool as store keys `ip/<target>/<network>/<ip>` -> instance id, put in the SAME
-- transaction as the instance record (compared absent, like port/ keys); the manifest is rendered
-- with forge.yaml from the service's templates, a stub the service's `manifest` hook returns, and
-- a pool stub made here. Nothing talks to the director in an HTTP worker except the short
-- `vms` read on bind.
--
-- The reconciler then calls `advance`: it looks for a task of this operation by context id (the
-- operation id) before starting one, journals the task id at once, and polls it. So a broker killed
-- between upload and journal finds its task again, and one killed while a task runs resumes
-- polling the same task: nothing is deployed twice.
local bosh = require "forge.bosh"
local lfs = require "lfs"
local log = require "forge.log"
local model = require "forge.model"
local util = require "forge.util"
local wire = require "forge.targets.wire"
local yaml = require "forge.yaml"

local Bosh = {}
Bosh.__index = Bosh
Bosh.kind = "bosh"

local FINAL = { done = true, error = true, cancelled = true, timeout = true }

local function ip2n(s)
  local a, b, c, d = tostring(s):match("^%s*(%d+)%.(%d+)%.(%d+)%.(%d+)%s*$")
  a, b, c, d = tonumber(a), tonumber(b), tonumber(c), tonumber(d)
  if not a or a > 255 or b > 255 or c > 255 or d > 255 then return nil end
  return ((a * 256 + b) * 256 + c) * 256 + d
end

local function n2ip(n)
  return string.format("%d.%d.%d.%d", n >> 24 & 255, n >> 16 & 255, n >> 8 & 255, n & 255)
end

-- Cut the addresses `ranges` already hold out of [f, l]: the pieces left, in order.
local function uncovered(ranges, f, l)
  local pieces = { { f, l } }
  for _, r in ipairs(ranges) do
    local left = {}
    for _, p in ipairs(pieces) do
      if p[2] < r.first or p[1] > r.last then
        left[#left + 1] = p
      else
        if p[1] < r.first then left[#left + 1] = { p[1], r.first - 1 } end
        if p[2] > r.last then left[#left + 1] = { r.last + 1, p[2] } end
      end
    end
    pieces = left
  end
  return pieces
end

--- A network's `static` entries ("IP" or "IP - IP") as ranges of addresses, in order, each
-- address once: {size = n, {first = a, last = b}, ...} (numbers). A pool of 100,000 addresses
-- costs a few tables, not 100,000 strings in every state.
-- @return ranges | nil, message
function Bosh.static_ranges(static, cidr)
  local lo, hi
  if cidr then
    local base, bits = cidr:match("^([%d%.]+)/(%d+)$")
    local n = base and ip2n(base)
    bits = tonumber(bits)
    if not n or not bits or bits > 32 then return nil, "bad cidr '" .. tostring(cidr) .. "'" end
    local size = 1 << (32 - bits)
    lo = n - n % size
    hi = lo + size - 1
  end
  local out = { size = 0 }
  for _, entry in ipairs(static or {}) do
    local first, last = tostring(entry):match("^%s*([%d%.]+)%s*%-%s*([%d%.]+)%s*$")
    local f, l = ip2n(first or entry), ip2n(last or entry)
    if not f or not l or f > l then return nil, "bad static entry '" .. tostring(entry) .. "'" end
    if l - f > 65535 then return nil, "static entry '" .. tostring(entry) .. "' is larger than 65536 addresses" end
    if lo and (f < lo or l > hi) then
      return nil, "static entry '" .. tostring(entry) .. "' is outside " .. cidr
    end
    for _, p in ipairs(uncovered(out, f, l)) do
      out[#out + 1] = { first = p[1], last = p[2] }
      out.size = out.size + p[2] - p[1] + 1
    end
  end
  return out
end

--- The i-th address (1-based) of a pool from static_ranges.
function Bosh.ip_at(pool, i)
  for _, r in ipairs(pool) do
    local n = r.last - r.first + 1
    if i <= n then return n2ip(r.first + i - 1) end
    i = i - n
  end
end

--- Expand a network's `static` entries into a list of IPs, in order.
-- @return list | nil, message
function Bosh.expand_static(static, cidr)
  local pool, err = Bosh.static_ranges(static, cidr)
  if not pool then return nil, err end
  local out = {}
  for i = 1, pool.size do out[i] = Bosh.ip_at(pool, i) end
  return out
end

function Bosh.new(name, cfg, state_dir)
  local self = setmetatable({ name = name, cfg = cfg, state_dir = state_dir, pools = {}, cursors = {},
    next_poll = {} }, Bosh)
  return self
end

-- A new director handle whose calls take at most timeout_ms.
function Bosh:connect(timeout_ms)
  local c = self.cfg
  return bosh.new { url = c.url, username = c.username, password = c.password, client = c.client,
    client_secret = c.client_secret, ca_cert = c.ca_cert, insecure = c.insecure or false, timeout_ms = timeout_ms }
end

--- The director handle (created on first use, kept).
function Bosh:director()
  if self.d then return self.d end
  local d, err = self:connect(self.cfg.timeout_ms or 10000)
  if not d then return nil, err end
  self.d = d
  return d
end

local function one_line(s) return (tostring(s):gsub("%s+", " ")) end

-- A director's error as one line (it may hold raw newlines; operation descriptions may not).
local function errtext(err) return one_line(err and err.message or err) end

--- Whether the director answers with this target's credentials: GET /info, then an
-- authenticated call (the newest task), on a handle of its own whose calls take at most
-- timeout_ms (readiness probes must not wait for the deploy path's timeout).
-- @return true | nil, message
function Bosh:probe(timeout_ms)
  local d = self.probe_d
  if not d then
    local err
    d, err = self:connect(timeout_ms)
    if not d then return nil, "BOSH target " .. self.name .. ": " .. errtext(err) end
    self.probe_d = d
  end
  local _, ierr = d:info()
  if not ierr then _, ierr = d:tasks { limit = 1 } end
  if ierr then return nil, "director " .. self.name .. " (" .. d:url() .. "): " .. errtext(ierr) end
  return true
end

--- The network a plan uses: plan.bosh_network if it names one of the target's, else the first.
function Bosh:network(plan)
  for _, n in ipairs(self.cfg.networks) do
    if plan and plan.bosh_network == n.name then return n end
  end
  return self.cfg.networks[1]
end

function Bosh:pool(net)
  if not self.pools[net.name] then self.pools[net.name] = assert(Bosh.static_ranges(net.static, net.cidr)) end
  return self.pools[net.name]
end

function Bosh:ip_prefix(net) return "ip/" .. self.name .. "/" .. net.name .. "/" end

-- The instance id an IP key points at, or nil.
local function ip_owner(db, k)
  local kv, err = db:get(k)
  if err then model.fail(503, "ServiceUnavailable", "the broker's store is unavailable: " .. tostring(err.message)) end
  return kv and kv.value
end

-- Where to start looking for free IPs: after this state's last allocation on the network, else
-- where the reserved front of the pool ends (pools fill from the front): a galloping probe, then
-- a binary search between the last taken and the first free IP it met, about 2 log2(reserved)
-- reads. A pool with holes only makes the start a guess; the scan from it finds any free IP.
function Bosh:first_probe(db, net)
  local pool, prefix = self:pool(net), self:ip_prefix(net)
  if self.cursors[net.name] then return self.cursors[net.name] end
  local function free(i) return not ip_owner(db, prefix .. Bosh.ip_at(pool, i)) end
  if free(1) then return 1 end
  local taken, step = 1, 1
  while taken + step <= pool.size and not free(taken + step) do taken, step = taken + step, step * 2 end
  local hi = math.min(taken + step, pool.size)
  while hi - taken > 1 do
    local mid = (taken + hi) // 2
    if free(mid) then hi = mid else taken = mid end
  end
  return hi
end

--- Allocate `count` IPs for instance `id` from the network's pool. IPs this instance already
-- holds (`keep`, in order) come first, then free ones from where the last allocation ended:
-- a provision reads about as many IP keys as it takes, not every reserved one.
-- @return ips, keys_to_claim (compare absent) | nil, message
function Bosh:allocate_ips(db, net, id, count, keep, spread)
  local prefix, pool = self:ip_prefix(net), self:pool(net)
  local ips, taken, claim = {}, {}, {}
  local function add(ip)
    ips[#ips + 1], taken[ip] = ip, true
  end
  for _, ip in ipairs(keep or {}) do
    if #ips < count and not taken[ip] and ip_owner(db, prefix .. ip) == id then add(ip) end
  end
  -- a retry after a lost race starts at a random point, so concurrent provisions spread out
  local start = spread and math.random(1, pool.size) or self:first_probe(db, net)
  for i = 0, pool.size - 1 do
    if #ips >= count then break end
    local at = (start + i - 1) % pool.size + 1
    local ip = Bosh.ip_at(pool, at)
    if not taken[ip] then
      local owner = ip_owner(db, prefix .. ip)
      if owner == nil then claim[#claim + 1] = prefix .. ip end
      if owner == nil or owner == id then add(ip) end
      self.cursors[net.name] = at % pool.size + 1
    end
  end
  if #ips < count then
    return nil, string.format("the IP pool of network %s on BOSH target %s has no %d free address(es) left "
      .. "(%d in the pool)", net.name, self.name, count, pool.size)
  end
  return ips, claim
end

--- Store ops releasing the IP keys that point at instance `rec` (its IPs, and those of the
-- deployment it replaces when an update did not finish).
function Bosh:release_ops(db, rec, ops)
  ops = ops or {}
  for _, res in ipairs({ rec.resources or {}, (rec.previous or {}).resources or {} }) do
    for _, ip in ipairs(res.network and res.ips or {}) do
      local k = "ip/" .. self.name .. "/" .. res.network .. "/" .. ip
      if ip_owner(db, k) == rec.id then ops[#ops + 1] = model.delete(k) end
    end
  end
  return ops
end

--- Store ops releasing the IPs of `old` (a list) that are not in `keep`.
function Bosh:release_unused(net_name, old, keep, ops)
  local k = {}
  for _, ip in ipairs(keep or {}) do k[ip] = true end
  for _, ip in ipairs(old or {}) do
    if not k[ip] then ops[#ops + 1] = model.delete("ip/" .. self.name .. "/" .. net_name .. "/" .. ip) end
  end
  return ops
end

-- Texts of services/<name>/templates/*.yml (and .yaml), by file name.
local function read_templates(dir)
  local out = {}
  local ok, iter, st = pcall(lfs.dir, dir .. "/templates")
  if not ok then return out end
  for entry in iter, st do
    if entry:match("%.ya?ml$") then
      local f = io.open(dir .. "/templates/" .. entry, "rb")
      if f then
        out[entry] = f:read("a")
        f:close()
      end
    end
  end
  return out
end

--- Render the manifest of `rec` for `plan`: allocate IPs, call the service's `manifest` hook,
-- merge. Sets rec.resources, rec.manifest, rec.bosh. Returns the store keys to claim (compared
-- absent, put to rec.id in the journal txn), or nil, status, code, message.
-- call(hook, ...) calls a service hook (services.call bound to the service).
function Bosh:render(db, svc, plan, rec, call, spread)
  if not svc.script.manifest then                 -- hooks show as `true` outside the sandbox
    return nil, 500, "ServiceScriptError", "service " .. svc.name .. " has no manifest hook: it cannot deploy "
      .. "to BOSH target " .. self.name
  end
  local count = 1
  local hook = svc.script.ips and "ips" or (svc.script.ports and "ports" or nil)
  if hook then
    local n, err = call(hook, plan, rec.parameters or {})
    count = math.tointeger(n)
    if not count or count < 1 then
      return nil, 500, "ServiceScriptError", "service " .. svc.name .. ": " .. hook ..
        "() must return a positive integer" .. (err and (": " .. err) or "")
    end
  end
  local net = self:network(plan)
  local old = rec.resources and rec.resources.ips or {}
  local ips, claim = self:allocate_ips(db, net, rec.id, count, old, spread)
  if not ips then return nil, 503, "ServiceUnavailable", claim end
  rec.resources = { target = self.name, network = net.name, ips = ips, azs = net.azs }
  rec.secrets = rec.secrets or {}
  rec.bosh = rec.bosh or {}
  rec.bosh.deployment = rec.deployment_name
  local templates = svc.templates or (svc.dir and read_templates(svc.dir)) or {}
  local ctx = { instance_id = rec.id, plan = plan, parameters = rec.parameters or {}, context = rec.context or {},
    secrets = rec.secrets, deployment_name = rec.deployment_name, target = self.name, network = net.name,
    ips = ips, azs = net.azs or { "z1" }, templates = templates }
  local res, err = call("manifest", ctx)
  if type(res) ~= "table" or type(res.documents) ~= "table" then
    return nil, 500, "ServiceScriptError", "service " .. svc.name .. ": manifest must return {documents = {...}}"
      .. (err and (": " .. err) or "")
  end
  local docs, names = {}, {}
  for i, d in ipairs(res.documents) do
    if type(d) == "string" and templates[d] then
      docs[#docs + 1], names[#names + 1] = templates[d], "services/" .. svc.name .. "/templates/" .. d
    elseif type(d) == "string" or type(d) == "table" then
      docs[#docs + 1], names[#names + 1] = d, "manifest document " .. i
    else
      return nil, 500, "ServiceScriptError", "service " .. svc.name .. ": manifest document " .. i ..
        " must be a template name, YAML text or a table"
    end
  end
  local azs = yaml.seq(net.azs and { table.unpack(net.azs) } or { "z1" })
  docs[#docs + 1] = {
    meta = { forge = { deployment_name = rec.deployment_name, instance_id = rec.id, target = self.name,
      network = net.name, static_ips = yaml.seq({ table.unpack(ips) }), azs = azs,
      stemcell = self.cfg.stemcell or yaml.map(), releases = self.cfg.releases or yaml.map() } },
    networks = { { name = net.name, subnets = { { static = yaml.seq({ table.unpack(ips) }),
      azs = yaml.seq({ table.unpack(azs) }) } } } },
  }
  names[#names + 1] = "pool stub (target " .. self.name .. ", network " .. net.name .. ")"
  local prune = { "meta", "networks" }
  for _, p in ipairs(res.prune or {}) do prune[#prune + 1] = p end
  local merged, merr = yaml.merge(docs, { names = names, params = res.params, prune = prune, env = {} })
  if not merged then
    return nil, 500, "ServiceScriptError", "service " .. svc.name .. ": the manifest does not render: " ..
      tostring(merr and merr.message or merr)
  end
  merged.name = rec.deployment_name
  local text, eerr = yaml.encode(merged)
  if not text then return nil, 500, "ServiceScriptError", "manifest: " .. tostring(eerr) end
  rec.manifest = text
  rec.script_hash = svc.hash
  return claim
end

--- Run a service's bind/unbind commands against the deployment's VMs: only commands the broker
-- speaks itself over the network (`redis`, `pg`, each naming its VM's IP as host); helper
-- processes have nowhere to run. The first failure stops and is returned.
function Bosh:run_all(cmds)
  for i, cmd in ipairs(cmds or {}) do
    local ok, err = wire.run(cmd, nil, self.cfg.command_timeout or 10)
    if ok == nil and err == nil then
      return nil, "command " .. i .. ": helper processes do not run on BOSH targets (use a redis or pg command)"
    end
    if not ok then return nil, err end
  end
  return true
end

--- The live topology for a bind: {vms = {{job_name, index, id, az, ips}}, ips = {...}} from the
-- director (its database view: no task).
function Bosh:binding_info(inst)
  local d, err = self:director()
  if not d then return nil, tostring(err) end
  local vms, verr = d:vms(inst.bosh and inst.bosh.deployment or inst.deployment_name, { full = false })
  if not vms then return nil, "director " .. self.name .. ": " .. errtext(verr) end
  local list, ips = {}, {}
  for _, v in ipairs(vms) do
    list[#list + 1] = { job_name = v.job_name or v.job, index = v.index, id = v.id, az = v.az, ips = v.ips or {} }
  end
  table.sort(list, function(a, b)
    if a.job_name ~= b.job_name then return tostring(a.job_name) < tostring(b.job_name) end
    return (a.index or 0) < (b.index or 0)
  end)
  for _, v in ipairs(list) do for _, ip in ipairs(v.ips) do ips[#ips + 1] = ip end end
  return { vms = list, ips = ips }
end

--- The full error text of a failed task (the event log's error line), else its result; one line.
function Bosh.task_reason(d, t)
  local out = d:task_output(t.id, "event")
  local msg
  for line in (out or ""):gmatch("[^\n]+") do
    local event = util.json_decode(line)
    if type(event) == "table" and type(event.error) == "table" and type(event.error.message) == "string" then
      msg = event.error.message
    end
  end
  return one_line(msg or t.result or t.description or "no reason given")
end

-- What the log says of the task an operation goes on with: found on the director (a broker
-- that stopped between upload and journal), started again (it vanished), or started.
local function task_event(b, op, found)
  if found then return "BOSH task of the operation found on the director" end
  local last = b.tasks and b.tasks[1]
  if last and last.operation == op.id then return "BOSH task resubmitted" end
  return "BOSH task started"
end

local REPORT_EVERY = 30   -- seconds between log lines of one target's retried director errors

-- Log a director error: each one that fails an operation; one that is retried (the director
-- is unreachable) at most every REPORT_EVERY seconds per target while it lasts.
function Bosh:report(rec, err, retried)
  if retried then
    local now = os.time()
    if now < (self.quiet_until or 0) then return end
    self.quiet_until = now + REPORT_EVERY
  end
  local fields = { target = self.name, instance = rec.id, operation = rec.operation.id,
    code = type(err) == "table" and err.code or nil, error = errtext(err) }
  if retried then return log.warn("director unreachable, retrying", fields) end
  log.error("director error", fields)
end

--- Advance the BOSH side of the operation of `rec`. `what` is "deploy" or "delete".
-- save(fn) applies fn to the stored record (only while it still has this operation) and
-- returns the stored record or nil. now is a clock in seconds (for the poll interval).
-- @return "wait", description | "done", description | "failed", reason
function Bosh:advance(rec, what, save, now)
  local op, b = rec.operation, rec.bosh or {}
  if (self.next_poll[rec.id] or 0) > now then return "wait" end
  self.next_poll[rec.id] = now + (self.cfg.poll_interval or 0.5)
  local d, derr = self:director()
  if not d then return "failed", "BOSH target " .. self.name .. ": " .. errtext(derr) end
  local function unreachable(err)
    self:report(rec, err, true)
    return "wait", string.format("director %s unreachable (%s); retrying", self.name, errtext(err))
  end
  local function refused(err, doing)
    self:report(rec, err, false)
    return "failed", "director " .. self.name .. doing .. ": " .. errtext(err)
  end
  -- a task of an earlier operation still running (a delete during a deploy): cancel it, let it end
  if b.task and b.task_op ~= op.id then
    local t, err = d:task(b.task)
    if not t and err.retryable then return unreachable(err) end
    if t and not FINAL[t.state] then
      if what == "delete" and not b.cancel_sent then
        d:cancel_task(b.task)
        save(function(r) r.bosh.cancel_sent = true end)
      end
      return "wait", string.format("waiting for BOSH task %s (%s) of the previous operation to end", b.task, t.state)
    end
    save(function(r) r.bosh.task, r.bosh.task_op, r.bosh.cancel_sent = nil, nil, nil end)
    b.task = nil
  end
  if not b.task then
    -- a task for this operation may exist already (broker killed between upload and journal)
    local found, ferr = d:tasks { context_id = op.id, verbose = 2 }
    if not found then
      if ferr.retryable then return unreachable(ferr) end
      return refused(ferr, "")
    end
    local id = found[1] and found[1].id
    if not id then
      local err
      if what == "delete" then
        id, err = d:delete_deployment(b.deployment or rec.deployment_name, { force = true })
        if not id and err.code == "bosh.not_found" then return "done", "deployment was already gone" end
      else
        id, err = d:deploy(rec.manifest, { context_id = op.id })
      end
      if not id then
        if err.retryable then return unreachable(err) end
        return refused(err, " refused the " .. what)
      end
    end
    log.info(task_event(b, op, found[1]), { target = self.name, instance = rec.id, operation = op.id, task = id,
      type = what })
    local stored = save(function(r)
      r.bosh = r.bosh or {}
      r.bosh.task, r.bosh.task_op, r.bosh.cancel_sent = id, op.id, nil
      r.bosh.tasks = r.bosh.tasks or {}
      table.insert(r.bosh.tasks, 1, { id = id, operation = op.id, type = what })
      while #r.bosh.tasks > 20 do table.remove(r.bosh.tasks) end
      r.operation.description = string.format("BOSH task %s (%s deployment) on %s", id, what, self.name)
    end)
    if not stored then return "wait" end
    b.task = id
    self.next_poll[rec.id] = 0
    return "wait"
  end
  local t, err = d:task(b.task)
  if not t then
    if err.retryable then return unreachable(err) end
    if err.code == "bosh.not_found" then
      -- the director lost the task (restarted): forget it; the next pass looks again, then resubmits
      save(function(r) r.bosh.task, r.bosh.task_op = nil, nil end)
      log.warn("BOSH task vanished, resubmitting", { target = self.name, instance = rec.id, operation = op.id,
        task = b.task })
      return "wait", string.format("BOSH task %s vanished on director %s; resubmitting", b.task, self.name)
    end
    return refused(err, "")
  end
  if t.state == "done" then return "done", string.format("BOSH task %s done", t.id) end
  if FINAL[t.state] then
    return "failed", string.format("BOSH task %s on %s ended %s: %s", t.id, self.name, t.state, Bosh.task_reason(d, t))
  end
  -- a task that never ends (a stuck director) fails the operation after task_timeout (default 2 h)
  local limit = self.cfg.task_timeout or 7200
  if os.time() - (op.started_at or os.time()) > limit then
    d:cancel_task(t.id)
    return "failed", string.format("BOSH task %s on %s still %s after %ds; cancelled", t.id, self.name, t.state, limit)
  end
  return "wait", string.format("BOSH task %s (%s deployment) on %s: %s", t.id, what, self.name, t.state)
end

function Bosh:forget(id) self.next_poll[id] = nil end

return Bosh
