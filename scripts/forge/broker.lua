--- The broker's HTTP surface: routing, basic auth, the X-Broker-API-Version check, and the
-- translation of broker errors into OSB error bodies. The endpoints live in forge.osb.*.
--
-- Auth (401) and the version header (412) are checked before the body is parsed or anything is
-- looked up. Any 4xx leaves the store unchanged.
local admin = require "forge.admin"
local backups = require "forge.backups"
local bindings = require "forge.osb.bindings"
local common = require "forge.osb.common"
local crypto = require "forge.crypto"
local dashboard = require "forge.dashboard"
local instances = require "forge.osb.instances"
local log = require "forge.log"
local orphans = require "forge.orphans"
local quotas = require "forge.quotas"
local request = require "forge.request"
local services = require "forge.services"
local telemetry = require "forge.telemetry"
local upgrades = require "forge.upgrades"
local util = require "forge.util"

local fail, reply = common.fail, common.reply

local Broker = {}
Broker.__index = Broker

--- New broker over an open store, a service registry, a config and the target registry (forge.targets).
function Broker.new(config, db, registry, targets)
  local function token(a) return "Basic " .. crypto.base64_encode(a.username .. ":" .. a.password) end
  -- the admin API has its own credentials, or is off: it never falls back to the broker's
  local adm = config.admin and config.admin.password and config.admin
  local tls = config.tls or {}
  return setmetatable({ config = config, db = db, registry = registry, targets = targets,
    public_url = config.public_url or ((tls.cert and "https://" or "http://") .. config.listen),
    -- a client certificate forge.http verified stands in for the broker's credentials (docs/tls.md)
    cert_auth = tls.client_auth == "optional" or tls.client_auth == "cert",
    auth_token = token(config.auth), admin_token = adm and token(adm), admin_user = adm and adm.username,
    metrics_token = config.metrics and config.metrics.token and ("Bearer " .. config.metrics.token) }, Broker)
end

local function authorized(req, token)
  return crypto.equal(((req.headers.authorization or ""):gsub("^[Bb][Aa][Ss][Ii][Cc] +", "Basic ")), token)
end

local function check_auth(req, token, who)
  if not authorized(req, token) then
    telemetry.refused(401)
    fail(401, "Unauthorized", "missing or wrong " .. who .. " credentials")
  end
end

local function check_version(req)
  local v = req.headers["x-broker-api-version"]
  if not v or v == "" then fail(412, "PreconditionFailed", "the X-Broker-API-Version header is required") end
  if not v:match("^2%.%d+$") then
    fail(412, "PreconditionFailed", "X-Broker-API-Version " .. v .. " is not supported; this broker speaks 2.x")
  end
end

-- The minor version a client speaks (X-Broker-API-Version 2.N), or nil.
local function api_minor(req)
  return tonumber((req.headers["x-broker-api-version"] or ""):match("^2%.(%d+)$"))
end

-- Catalog and response fields by the OSB version that introduced them: a client of an older
-- version gets none of them, so strict clients validating against its schema accept the answer.
local SINCE = {
  service = { instances_retrievable = 14, bindings_retrievable = 14, allow_context_updates = 15 },
  plan = { plan_updateable = 15, maintenance_info = 15, maximum_polling_duration = 15, binding_rotatable = 17 },
  response = { instance_usable = 16, update_repeatable = 16 },
}
local NEWEST = 17

local function strip(t, since, minor)
  for k, v in pairs(since) do if v > minor then t[k] = nil end end
  return t
end

-- The catalog JSON and ETag for clients of version 2.<minor>, built once per registry.
local function catalog_for(reg, minor)
  if minor >= NEWEST then return reg.catalog_json, reg.catalog_etag end
  reg.catalog_variants = reg.catalog_variants or {}
  local v = reg.catalog_variants[minor]
  if not v then
    local entries = {}
    for i, svc in ipairs(reg.list) do
      local entry = strip(util.copy(svc.catalog), SINCE.service, minor)
      for _, plan in ipairs(entry.plans) do strip(plan, SINCE.plan, minor) end
      entries[i] = entry
    end
    local json, etag = services.catalog_body(entries)
    v = { json = json, etag = etag }
    reg.catalog_variants[minor] = v
  end
  return v.json, v.etag
end

-- A response body without the fields the client's version does not define.
local function shape_response(minor, body)
  if not minor or minor >= NEWEST or type(body) ~= "string" then return body end
  for k, since in pairs(SINCE.response) do
    if since > minor and body:find('"' .. k .. '"', 1, true) then
      local t = util.json_decode(body)
      return type(t) == "table" and util.json_encode(strip(t, SINCE.response, minor)) or body
    end
  end
  return body
end

-- The catalog depends on the registry, the version header (its variant), If-None-Match (a 304)
-- and the request identity header (echoed by Broker:handle): forge.http may answer the same
-- request again without Lua (forge.app adds the registry's generation to req.replay).
local CATALOG_REPLAY = { vary = "X-Broker-API-Version", unless = { "If-None-Match", "X-Broker-API-Request-Identity" } }

local function catalog(self, req)
  local json, etag = catalog_for(self.registry, api_minor(req) or NEWEST)
  if req.headers["if-none-match"] == etag then return 304, { ETag = etag }, "" end
  req.replay = CATALOG_REPLAY
  return reply(200, json, { ETag = etag })
end

-- An admin action on an instance: fn(broker, id, who) -> status, body.
local function acting(fn)
  return function(self, id) return reply(fn(self, id, self.admin_user)) end
end

-- The OSB dashboard_url to a browser with the admin credentials: the instance's dashboard page.
local DASHBOARD_URL = { { "service_instances", ":" }, { GET = dashboard.instance }, admin = true }

-- Route table: path pattern (":" = an id segment) -> method -> handler(broker, ids..., req, q).
-- `osb` routes require the version header; the others are the 2014 Service Forge's own API.
local ROUTES = {
  { { "v2", "catalog" }, { GET = catalog }, osb = true },
  { { "v2", "service_instances", ":" }, { PUT = instances.provision, PATCH = instances.update,
    DELETE = instances.deprovision, GET = instances.fetch }, osb = true },
  { { "v2", "service_instances", ":", "last_operation" }, { GET = instances.last_operation }, osb = true },
  { { "v2", "service_instances", ":", "service_bindings", ":" }, { PUT = bindings.bind, DELETE = bindings.unbind,
    GET = bindings.fetch }, osb = true },
  { { "v2", "service_instances", ":", "service_bindings", ":", "last_operation" },
    { GET = bindings.last_operation }, osb = true },
  { { "service_instances", ":" }, { GET = instances.seed_view }, browser = DASHBOARD_URL },
  { { "dashboard" }, { GET = dashboard.overview }, admin = true },
  { { "dashboard", "instances" }, { GET = dashboard.instances }, admin = true },
  { { "dashboard", "instances", ":" }, { GET = dashboard.instance }, admin = true },
  { { "dashboard", "instances", ":", ":" }, { POST = dashboard.act }, admin = true, ids = { "instance id", "action" } },
  { { "dashboard", "services" }, { GET = dashboard.services }, admin = true },
  { { "dashboard", "style.css" }, { GET = dashboard.asset("style.css") }, admin = true },
  { { "dashboard", "dashboard.js" }, { GET = dashboard.asset("dashboard.js") }, admin = true },
  { { "admin", "services" }, { GET = function(self) return reply(200, self:services_status()) end }, admin = true },
  { { "admin", "instances" }, { GET = function(self, _, q) return reply(200, admin.list_instances(self, q)) end },
    admin = true },
  { { "admin", "instances", ":" }, { GET = function(self, id) return reply(200, admin.instance_detail(self, id)) end,
    DELETE = function(self, id, _, q) return reply(admin.purge(self, id, q, self.admin_user)) end }, admin = true },
  { { "admin", "instances", ":", "retry" }, { POST = acting(admin.retry) }, admin = true },
  { { "admin", "instances", ":", "cancel" }, { POST = acting(admin.cancel) }, admin = true },
  { { "admin", "instances", ":", "restart" }, { POST = acting(admin.restart) }, admin = true },
  { { "admin", "instances", ":", "backup" }, { POST = acting(backups.backup) }, admin = true },
  { { "admin", "instances", ":", "diff" }, { GET = function(self, id, _, q) return reply(200, upgrades.diff(self, id, q)) end },
    admin = true },
  { { "admin", "upgrades" }, { GET = function(self) return reply(upgrades.list(self)) end,
    POST = function(self, req) return reply(upgrades.start(self, req, self.admin_user)) end }, admin = true },
  { { "admin", "upgrades", ":" }, { GET = function(self, id) return reply(upgrades.get(self, id)) end }, admin = true,
    ids = { "upgrade id" } },
  { { "admin", "upgrades", ":", "pause" }, { POST = acting(upgrades.pause) }, admin = true, ids = { "upgrade id" } },
  { { "admin", "upgrades", ":", "resume" }, { POST = acting(upgrades.resume) }, admin = true, ids = { "upgrade id" } },
  { { "admin", "upgrades", ":", "abort" }, { POST = acting(upgrades.abort) }, admin = true, ids = { "upgrade id" } },
  { { "admin", "backups" }, { GET = function(self, _, q) return reply(backups.list(self, q)) end }, admin = true },
  { { "admin", "backups", ":" }, { DELETE = function(self, id) return reply(backups.delete(self, id)) end },
    admin = true, ids = { "backup id" } },
  { { "admin", "backups", ":", "restore" }, { POST = function(self, id, req)
    return reply(backups.restore(self, id, req, self.admin_user)) end }, admin = true, ids = { "backup id" } },
  { { "admin", "operations" }, { GET = function(self, _, q) return reply(200, admin.operations(self, q)) end },
    admin = true },
  { { "admin", "quotas" }, { GET = function(self) return reply(200, { quotas = quotas.usage(self) }) end }, admin = true },
  { { "admin", "orphans" }, { GET = function(self) return reply(200, orphans.list(self)) end }, admin = true },
  { { "metrics" }, { GET = function(self)
    return 200, { ["Content-Type"] = "text/plain; version=0.0.4; charset=utf-8" }, telemetry.render(quotas.usage(self))
  end }, admin = true, metrics = true },
  { { "admin", "orphans", ":", ":", "clean" }, { POST = function(self, kind, id)
    return reply(200, orphans.clean(self, kind, id, self.admin_user)) end }, admin = true, ids = { "kind", "orphan id" } },
}

--- Loaded service versions and refused edits, as the workers see them (GET /admin/services).
function Broker:services_status()
  local list = util.array()
  for _, svc in ipairs(self.registry.list) do
    list[#list + 1] = { name = svc.name, folder = svc.folder, version = svc.hash, plans = #svc.script.plans }
  end
  local errors = util.array()
  for i, e in ipairs(self.registry.errors) do
    errors[i] = { service = e.service, message = e.message, kept_version = e.kept }
  end
  local iso = self.targets.by_name["local"]:isolation()
  return { generation = require("forge.reload").generation(), services = list, errors = errors,
    isolation = { mode = iso.mode, limits = iso.limits, warnings = iso.warnings } }
end

local function match(segs)
  for _, r in ipairs(ROUTES) do
    local pattern, ids = r[1], {}
    if #pattern == #segs then
      local ok = true
      for i, p in ipairs(pattern) do
        if p == ":" then ids[#ids + 1] = segs[i] elseif p ~= segs[i] then ok = false break end
      end
      if ok then return r, ids end
    end
  end
end

-- "/v2/service_instances/:instance_id/service_bindings/:binding_id": a route's name in metrics.
local function template(route)
  local names, n, parts = route.ids or { "instance_id", "binding_id" }, 0, {}
  for i, p in ipairs(route[1]) do
    if p == ":" then n = n + 1 end
    parts[i] = p == ":" and (":" .. names[n]:gsub(" ", "_")) or p
  end
  return "/" .. table.concat(parts, "/")
end

function Broker:route(req)
  local segs, q, path = request.target(req.uri)
  if not segs then fail(400, "BadRequest", q) end
  if #segs == 1 and segs[1] == "healthz" then
    req.route = "/healthz"
    return reply(200, { status = "ok" })
  end
  if #segs == 1 and segs[1] == "readyz" then
    req.route = "/readyz"
    return reply(require("forge.readiness").check(self))
  end
  local route, ids = match(segs)
  if route and route.browser and self.admin_token and dashboard.wants_html(req) and authorized(req, self.admin_token) then
    route = route.browser
  end
  req.html = segs[1] == "dashboard" or route == DASHBOARD_URL      -- its errors are pages too
  req.route = route and (route.template or template(route))
  -- /metrics also answers its own token (a scraper need not hold the admin credentials)
  local by_token = route and route.metrics and self.metrics_token
    and crypto.equal(req.headers.authorization or "", self.metrics_token)
  if route and route.admin and not by_token then
    if not self.admin_token then
      fail(404, "NotFound", "the admin API is off: give it its own credentials (admin.password, FORGE_ADMIN_PASSWORD)")
    end
    check_auth(req, self.admin_token, "admin")
  elseif not by_token and not (self.cert_auth and req.client_cert) then
    check_auth(req, self.auth_token, "broker")
  end
  if not route then fail(404, "NotFound", "no such endpoint: " .. req.method .. " " .. path) end
  if route.osb then check_version(req) end
  local handler = route[2][req.method]
  if not handler then fail(405, "MethodNotAllowed", req.method .. " is not allowed on " .. path) end
  local names = route.ids or { "instance id", "binding id" }
  common.check_id(ids[1] or "x", names[1])
  common.check_id(ids[2] or "x", names[2])
  if #ids == 2 then return handler(self, ids[1], ids[2], req, q) end
  if #ids == 1 then return handler(self, ids[1], req, q) end
  return handler(self, req, q)
end

-- "<platform> <base64 JSON>" -> {platform=, identity=} for the log.
local function originating_identity(req)
  local origin = req.headers["x-broker-api-originating-identity"]
  if not origin then return nil end
  local platform, value = origin:match("^(%S+)%s+(%S+)$")
  local decoded = value and crypto.base64_decode(value)
  if not decoded then return { raw = origin:sub(1, 200) } end
  return { platform = platform, identity = util.json_decode(decoded) or decoded:sub(1, 200) }
end

--- Answer one request: status, headers, body. Never raises.
function Broker:handle(req)
  req.origin = originating_identity(req)
  local ok, status, headers, body = xpcall(self.route, function(e)
    if type(e) == "table" and e.status then return e end
    return { trace = debug.traceback(tostring(e), 2) }
  end, self, req)
  if not ok then
    local e = status
    if e.trace then
      log.error("request failed", { request_id = req.id, method = req.method, uri = req.uri, error = e.trace })
      e = { status = 500, error = "InternalError", description = "the broker failed on this request (id " .. req.id .. ")" }
    elseif e.status >= 500 then
      log.warn("request refused", { request_id = req.id, method = req.method, uri = req.uri, status = e.status,
        error = e.error, description = e.description })
    end
    status, headers, body = (req.html and dashboard.error_reply or common.error_reply)(e)
  end
  body = shape_response(api_minor(req), body)
  local rid = req.headers["x-broker-api-request-identity"]
  if rid then headers["X-Broker-API-Request-Identity"] = rid end
  return status, headers, body
end

return Broker
