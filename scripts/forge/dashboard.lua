--- The operator's dashboard (/dashboard, docs/dashboard.md): server-rendered HTML pages over the
-- admin API's data (forge.admin, forge.quotas, Broker:services_status), with forms that run the
-- admin actions. Pages are built from nodes that escape every value they did not build
-- themselves, so ids, descriptions and parameters from the platform are always text; no page
-- shows a secret (forge.admin masks the instance detail).
--
-- CSRF: a browser sends the cached Basic credentials with any request to the broker, also one a
-- foreign page makes, so an action needs a token only a dashboard page carries (an HMAC of the
-- action's path keyed with the admin credentials), and a cross-site Origin or Sec-Fetch-Site
-- is refused.
local admin = require "forge.admin"
local common = require "forge.osb.common"
local crypto = require "forge.crypto"
local log = require "forge.log"
local model = require "forge.model"
local quotas = require "forge.quotas"
local request = require "forge.request"
local upgrades = require "forge.upgrades"
local util = require "forge.util"
local yaml = require "forge.yaml"

local fail = common.fail

local M = {}

-- ---- markup ------------------------------------------------------------------------------

local ESCAPES = { ["&"] = "&amp;", ["<"] = "&lt;", [">"] = "&gt;", ['"'] = "&quot;", ["'"] = "&#39;" }

--- Text as HTML (for element content and attribute values).
function M.escape(s) return (tostring(s):gsub("[&<>\"']", ESCAPES)) end

-- Markup built here: { html } with this metatable; anything else is text to escape.
local Markup = {}
local function markup(html) return setmetatable({ html }, Markup) end

-- Append the HTML of a node: markup as is, a list of nodes in order (nil/false items, as from
-- `cond and node`, are nothing, also between others), anything else as escaped text.
local function render(node, out)
  if node == nil or node == false then return out end
  if getmetatable(node) == Markup then
    out[#out + 1] = node[1]
  elseif type(node) == "table" then
    local n = 0
    for k in pairs(node) do if math.type(k) == "integer" and k > n then n = k end end
    for i = 1, n do render(node[i], out) end
  else
    out[#out + 1] = M.escape(node)
  end
  return out
end

local VOID = { meta = true, link = true, input = true, br = true }

local function is_attrs(t)
  return type(t) == "table" and getmetatable(t) ~= Markup and t[1] == nil
end

-- An element: el(tag, [attrs,] children...). Attribute values are escaped; true is a bare
-- attribute, false/nil leaves it out.
local function el(tag, ...)
  local kids = table.pack(...)
  local attrs, first = {}, 1
  if is_attrs(kids[1]) then attrs, first = kids[1], 2 end
  local names = {}
  for k in pairs(attrs) do names[#names + 1] = k end
  table.sort(names)
  local out = { "<", tag }
  for _, k in ipairs(names) do
    local v = attrs[k]
    if v == true then out[#out + 1] = " " .. k
    elseif v then out[#out + 1] = " " .. k .. '="' .. M.escape(v) .. '"' end
  end
  out[#out + 1] = ">"
  if not VOID[tag] then
    for i = first, kids.n do render(kids[i], out) end
    out[#out + 1] = "</" .. tag .. ">"
  end
  return markup(table.concat(out))
end

-- H.td(...) is el("td", ...).
local H = setmetatable({}, { __index = function(_, tag) return function(...) return el(tag, ...) end end })

-- ---- values as text ----------------------------------------------------------------------

local function url_encode(s)
  return (tostring(s):gsub("[^%w%-%._~]", function(c) return string.format("%%%02X", c:byte()) end))
end

-- A path with a query string from {name = value} (sorted; nil values left out).
local function link(path, q)
  local names = {}
  for k in pairs(q or {}) do names[#names + 1] = k end
  table.sort(names)
  local parts = {}
  for _, k in ipairs(names) do parts[#parts + 1] = url_encode(k) .. "=" .. url_encode(q[k]) end
  return #parts == 0 and path or (path .. "?" .. table.concat(parts, "&"))
end

local function instance_path(id) return "/dashboard/instances/" .. url_encode(id) end

local function when(t)
  if type(t) ~= "number" then return "—" end
  return os.date("!%Y-%m-%d %H:%M:%S UTC", math.floor(t))
end

local function duration(s)
  if type(s) ~= "number" then return "—" end
  s = math.max(0, math.floor(s))
  if s < 120 then return s .. " s" end
  if s < 7200 then return string.format("%d min %d s", s // 60, s % 60) end
  return string.format("%d h %d min", s // 3600, s % 3600 // 60)
end

local KNOWN_STATES = { deploying = true, running = true, failed = true, destroying = true, deleted = true,
  succeeded = true, ["in progress"] = true, created = true }

local function badge(state)
  local class = KNOWN_STATES[state] and state:gsub(" ", "-") or "other"
  return H.span({ class = "state state-" .. class }, state or "—")
end

local function yes_no(v)
  if v == nil then return "—" end
  return v and "yes" or "no"
end

-- JSON nulls (util.null) as YAML nulls, for yaml.encode.
local function yaml_nulls(v)
  if v == util.null then return yaml.null end
  if type(v) ~= "table" then return v end
  local t = {}
  for k, x in pairs(v) do t[k] = yaml_nulls(x) end
  return t
end

-- A value as a code block: strings as they are, tables as YAML.
local function code(v)
  if v == nil or v == util.null then return H.p({ class = "muted" }, "none") end
  local text = v
  if type(v) == "table" then
    local err
    text, err = yaml.encode(yaml_nulls(v))
    if not text then text = util.json_encode(v) or tostring(err) end
  end
  return H.pre(H.code(tostring(text)))
end

local function table_of(headings, rows, empty)
  if #rows == 0 then return H.p({ class = "muted" }, empty) end
  local head = {}
  for i, h in ipairs(headings) do head[i] = H.th(h) end
  return H.table(H.thead(H.tr(head)), H.tbody(rows))
end

local function cells(...)
  local out, n = {}, select("#", ...)
  for i = 1, n do out[i] = H.td((select(i, ...))) end
  return H.tr(out)
end

-- ---- pages and responses -----------------------------------------------------------------

-- 'self' only: the stylesheet and script below; forms post only to the broker; no framing.
local SECURITY = "default-src 'none'; style-src 'self'; script-src 'self'; img-src 'self'; form-action 'self'; " ..
  "frame-ancestors 'none'; base-uri 'none'"

local function html_headers(extra)
  local h = { ["Content-Type"] = "text/html; charset=utf-8", ["Cache-Control"] = "no-store",
    ["Content-Security-Policy"] = SECURITY, ["X-Content-Type-Options"] = "nosniff",
    ["Referrer-Policy"] = "same-origin", Vary = "Accept, Authorization" }
  for k, v in pairs(extra or {}) do h[k] = v end
  return h
end

local NAV = { { "/dashboard", "Overview" }, { "/dashboard/instances", "Instances" }, { "/dashboard/services", "Services" } }

-- A whole page. opts: refresh (seconds), section (the nav entry to mark).
local function page(title, body, opts)
  opts = opts or {}
  local nav = {}
  for i, n in ipairs(NAV) do
    nav[i] = H.a({ href = n[1], ["aria-current"] = opts.section == n[2] and "page" or nil }, n[2])
  end
  local head = H.head(H.meta({ charset = "utf-8" }),
    H.meta({ name = "viewport", content = "width=device-width, initial-scale=1" }),
    opts.refresh and H.meta({ ["http-equiv"] = "refresh", content = tostring(opts.refresh) }),
    H.title(title .. " · Service Forge"),
    H.link({ rel = "stylesheet", href = "/dashboard/style.css" }),
    H.script({ src = "/dashboard/dashboard.js", defer = true }))
  return "<!DOCTYPE html>\n" .. el("html", { lang = "en" }, head, H.body(
    H.header(H.span({ class = "brand" }, "Service Forge"), H.nav(nav)),
    H.main(H.h1(title), body)))[1]
end

local function respond(status, html, headers) return status, html_headers(headers), html end

--- An error (a broker error table) as an HTML page with its status and headers.
function M.error_reply(e)
  local status, headers = common.error_reply(e)
  headers["Content-Type"] = nil
  return respond(status, page(status .. " " .. tostring(e.error),
    { H.p({ class = "error" }, e.description), H.p(H.a({ href = "/dashboard" }, "Back to the overview")) }),
    headers)
end

--- Whether a request asks for HTML (a browser's Accept), not JSON.
function M.wants_html(req)
  for range in (req.headers.accept or ""):gmatch("[^,]+") do
    local media, params = range:match("^%s*([^;%s]+)%s*(.*)$")
    local q = tonumber((params or ""):match("q%s*=%s*([%d.]+)") or "1")
    if media and media:lower() == "text/html" and q and q > 0 then return true end
  end
  return false
end

-- Refuse query parameters other than the allowed ones.
local function only(q, allowed)
  for k in pairs(q) do
    if not allowed[k] then fail(400, "BadRequest", "unknown query parameter '" .. k .. "'") end
  end
end

-- ---- static files ------------------------------------------------------------------------

local HERE = debug.getinfo(1, "S").source:match("^@(.*)%.lua$")

-- The shipped file dashboard/<name> beside this script, read once per worker state.
local function read_asset(name)
  local path = HERE .. "/" .. name
  local f, err = io.open(path, "rb")
  if not f then
    log.warn("dashboard file missing from the install", { file = path, error = err })
    return nil
  end
  local text = f:read("a")
  f:close()
  return text
end

local ASSET_TYPES = { css = "text/css; charset=utf-8", js = "text/javascript; charset=utf-8" }

--- The handler of GET /dashboard/<name>, a shipped stylesheet or script.
function M.asset(name)
  local text = read_asset(name)
  local headers = { ["Content-Type"] = ASSET_TYPES[name:match("%.(%w+)$")], ["Cache-Control"] = "max-age=300",
    ["X-Content-Type-Options"] = "nosniff" }
  return function()
    if not text then fail(404, "NotFound", "dashboard/" .. name .. " is missing from this installation") end
    return 200, util.copy(headers), text
  end
end

-- ---- tokens ------------------------------------------------------------------------------

-- HMAC of a purpose and a message, keyed with the admin credentials (hex).
local function sign(b, purpose, message)
  return crypto.hex(assert(crypto.hmac_sha256(b.admin_token, purpose .. "\n" .. message)))
end

--- The token a form posting to `path` carries.
function M.form_token(b, path) return sign(b, "form", path) end

local function action_path(id, action) return instance_path(id) .. "/" .. action end

-- A POST must come from a dashboard page: same site, with the form's token.
local function check_form(b, req, path)
  local site = req.headers["sec-fetch-site"]
  if site and site ~= "same-origin" then
    fail(403, "Forbidden", "refused a " .. site .. " request: actions are taken from the dashboard's own pages")
  end
  local origin = req.headers.origin
  if origin and origin ~= b.public_url:match("^%a+://[^/]+") and origin:match("^https?://(.+)$") ~= req.headers.host then
    fail(403, "Forbidden", "refused a request from " .. origin .. ": actions are taken from the dashboard's own pages")
  end
  local form = request.body(req)
  local token = type(form) == "table" and form.token
  if type(token) ~= "string" or not crypto.equal(token, M.form_token(b, path)) then
    fail(403, "Forbidden", "the form's token is missing or wrong: reload the instance's page and try again")
  end
end

-- The query of an instance page that shows an action's outcome, signed so that no link from
-- elsewhere can put words on the page.
local function flash_query(b, id, outcome, text)
  return { outcome = outcome, flash = text, sig = sign(b, "flash", id .. "\n" .. outcome .. "\n" .. text) }
end

local function flash_of(b, id, q)
  if not q.flash and not q.sig and not q.outcome then return nil end
  local outcome, text = q.outcome or "", q.flash or ""
  if not q.sig or not crypto.equal(q.sig, sign(b, "flash", id .. "\n" .. outcome .. "\n" .. text)) then
    fail(400, "BadRequest", "the outcome message in this link is not signed by this broker")
  end
  return H.p({ class = "flash flash-" .. (outcome == "done" and "done" or "refused"), role = "status" }, text)
end

-- ---- overview ----------------------------------------------------------------------------

local STATE_ORDER = { "deploying", "running", "failed", "destroying", "deleted" }

-- One pass over the instance records: counts[service][plan][state], and per service the live
-- instances on each version: versions[service][hash] = n.
local function tally(b)
  local counts, versions = {}, {}
  for _, kv in ipairs(model.range(b.db, "instance/")) do
    local rec = kv.value
    if type(rec) == "table" and rec.service then
      local plans = counts[rec.service] or {}
      counts[rec.service] = plans
      local states = plans[rec.plan or "?"] or {}
      plans[rec.plan or "?"] = states
      states[rec.state or "?"] = (states[rec.state or "?"] or 0) + 1
      if rec.state ~= "deleted" and rec.script_hash then
        local v = versions[rec.service] or {}
        versions[rec.service] = v
        v[rec.script_hash] = (v[rec.script_hash] or 0) + 1
      end
    end
  end
  return counts, versions
end

local function count_link(n, filter)
  if not n or n == 0 then return H.span({ class = "muted" }, "0") end
  return H.a({ href = link("/dashboard/instances", filter) }, tostring(n))
end

local function counts_table(counts)
  local rows, totals = {}, {}
  for _, svc in ipairs(util.sorted_keys(counts)) do
    for _, plan in ipairs(util.sorted_keys(counts[svc])) do
      local states, row, sum = counts[svc][plan], { H.td(svc), H.td(plan) }, 0
      for _, st in ipairs(STATE_ORDER) do
        row[#row + 1] = H.td({ class = "num" }, count_link(states[st], { service = svc, plan = plan, state = st }))
        sum, totals[st] = sum + (states[st] or 0), (totals[st] or 0) + (states[st] or 0)
      end
      row[#row + 1] = H.td({ class = "num" }, count_link(sum, { service = svc, plan = plan }))
      rows[#rows + 1] = H.tr(row)
    end
  end
  if #rows == 0 then return H.p({ class = "muted" }, "No instances yet.") end
  local head, foot, all = { H.th("Service"), H.th("Plan") }, { H.th({ colspan = "2" }, "All") }, 0
  for _, st in ipairs(STATE_ORDER) do
    head[#head + 1] = H.th({ class = "num" }, st)
    foot[#foot + 1] = H.td({ class = "num" }, count_link(totals[st], { state = st }))
    all = all + (totals[st] or 0)
  end
  head[#head + 1] = H.th({ class = "num" }, "total")
  foot[#foot + 1] = H.td({ class = "num" }, count_link(all, {}))
  return H.table({ id = "counts" }, H.thead(H.tr(head)), H.tbody(rows), H.tfoot(H.tr(foot)))
end

local function operations_table(ops)
  local rows = {}
  for _, o in ipairs(ops) do
    rows[#rows + 1] = cells(H.a({ href = instance_path(o.instance) }, o.instance), o.binding or "—", o.type,
      o.target or "local", duration(o.age_seconds), o.description or "")
  end
  return table_of({ "Instance", "Binding", "Type", "Target", "Age", "Description" }, rows,
    "Nothing in flight.")
end

local function refused_table(errors)
  local rows = {}
  for _, e in ipairs(errors) do
    rows[#rows + 1] = cells(e.service or "—", H.code(e.message or ""), e.kept_version or "none")
  end
  return table_of({ "Service", "Error", "Version kept" }, rows, "No refused edits: every service loaded as written.")
end

local function quota_table(usage)
  local rows = {}
  for _, u in ipairs(usage) do
    rows[#rows + 1] = cells(u.scope, u.name, u.resource, H.span({ class = "num" }, u.used .. " of " .. u.limit),
      H.meter({ min = "0", max = tostring(u.limit), value = tostring(u.used), high = tostring(u.limit * 0.9) },
        u.used .. "/" .. u.limit))
  end
  return table_of({ "Scope", "Name", "Resource", "Used", "" }, rows, "No quotas configured.")
end

--- GET /dashboard
function M.overview(b, _, q)
  only(q, {})
  local counts = tally(b)
  local ops = admin.operations(b, {}).operations
  local status = b:services_status()
  return respond(200, page("Overview", {
    H.section(H.h2("Instances"), counts_table(counts)),
    H.section(H.h2("Operations in flight (" .. #ops .. ")"), operations_table(ops)),
    H.section(H.h2("Refused service edits (" .. #status.errors .. ")"), refused_table(status.errors)),
    H.section(H.h2("Quota usage"), quota_table(quotas.usage(b))),
  }, { section = "Overview", refresh = #ops > 0 and 5 or nil }))
end

-- ---- instances list ----------------------------------------------------------------------

local FILTERS = { "service", "plan", "state", "org", "space", "target" }

local function select_of(name, label, options, current)
  local opts = { H.option({ value = "" }, "any") }
  for _, o in ipairs(options) do opts[#opts + 1] = H.option({ value = o, selected = o == current }, o) end
  return H.label(label, H.select({ name = name }, opts))
end

local function text_input(name, label, current)
  return H.label(label, H.input({ type = "text", name = name, value = current, size = "14" }))
end

local function filter_form(b, q)
  local names = {}
  for _, svc in ipairs(b.registry.list) do names[#names + 1] = svc.name end
  table.sort(names)
  return H.form({ method = "get", action = "/dashboard/instances", class = "filters" },
    select_of("service", "Service", names, q.service), text_input("plan", "Plan", q.plan),
    select_of("state", "State", STATE_ORDER, q.state), text_input("org", "Organization", q.org),
    text_input("space", "Space", q.space), text_input("target", "Target", q.target),
    H.button({ type = "submit" }, "Filter"), H.a({ href = "/dashboard/instances" }, "Clear"))
end

local function instance_row(i)
  local op = i.operation or {}
  return cells(H.a({ href = instance_path(i.id) }, i.id), i.service, i.plan, badge(i.state), i.target,
    i.organization_guid or "—", i.space_guid or "—", { op.type or "—", " ", badge(op.state) }, when(i.updated_at))
end

--- GET /dashboard/instances?service=&plan=&state=&org=&space=&target=&limit=&after=
function M.instances(b, _, q)
  local res = admin.list_instances(b, q)
  local rows = {}
  for _, i in ipairs(res.instances) do rows[#rows + 1] = instance_row(i) end
  local filtered = {}
  for _, k in ipairs(FILTERS) do filtered[k] = q[k] end
  filtered.limit = q.limit
  local pager = {}
  if q.after then pager[#pager + 1] = H.a({ href = link("/dashboard/instances", filtered) }, "« First page") end
  if res.next then
    local nextq = util.copy(filtered)
    nextq.after = res.next
    pager[#pager + 1] = H.a({ href = link("/dashboard/instances", nextq), rel = "next" }, "Next page »")
  end
  return respond(200, page("Instances", {
    filter_form(b, q),
    table_of({ "Id", "Service", "Plan", "State", "Target", "Organization", "Space", "Operation", "Updated" }, rows,
      "No instance matches these filters."),
    H.p({ class = "pager" }, pager),
  }, { section = "Instances" }))
end

-- ---- instance page -----------------------------------------------------------------------

local function facts(pairs_list)
  local out = {}
  for _, p in ipairs(pairs_list) do
    out[#out + 1] = H.dt(p[1])
    out[#out + 1] = H.dd(p[2])
  end
  return H.dl({ class = "facts" }, out)
end

-- The action forms: each enabled only where the admin API would act.
local function action_forms(b, d)
  local op = d.operation or {}
  local list = {
    { "retry", "Retry " .. (op.type or ""), op.state == "failed", nil },
    { "cancel", "Cancel " .. (op.type or ""), op.state == "in progress",
      "Cancel the " .. (op.type or "") .. " of " .. d.id .. "? Processes it started are stopped." },
    { "restart", "Restart processes", d.state == "running" and d.target == "local" and op.state ~= "in progress",
      "Restart the processes of " .. d.id .. "?" },
  }
  local forms = {}
  for _, a in ipairs(list) do
    local path = action_path(d.id, a[1])
    forms[#forms + 1] = H.form({ method = "post", action = path, class = "action", ["data-confirm"] = a[4] },
      H.input({ type = "hidden", name = "token", value = M.form_token(b, path) }),
      H.button({ type = "submit", name = "action", value = a[1], disabled = not a[3] }, a[2]))
  end
  return H.div({ class = "actions" }, forms)
end

local function timeline(ops)
  local items = {}
  for _, op in ipairs(ops) do
    local took = op.finished_at and op.started_at and (op.finished_at - op.started_at)
    items[#items + 1] = H.li(H.div({ class = "when" }, when(op.started_at)),
      H.div(H.strong(op.type), " ", badge(op.state), took and { " after ", duration(took) } or nil),
      op.description and H.div({ class = "description" }, op.description), H.div({ class = "muted" }, op.id),
      op.diff and op.diff ~= "" and H.details(H.summary("What it changed (diff, secrets masked)"),
        H.pre(H.code(op.diff))) or nil)
  end
  return H.ol({ class = "timeline" }, items)
end

local function bindings_table(list)
  local rows = {}
  for _, bnd in ipairs(list) do
    local op = bnd.operation or {}
    rows[#rows + 1] = cells(bnd.id, badge(bnd.state), bnd.app_guid or "—", when(bnd.created_at),
      { op.type or "—", " ", badge(op.state) }, op.description or "")
  end
  return table_of({ "Id", "State", "App", "Created", "Operation", "Description" }, rows, "No bindings.")
end

local function shown(v)
  if v == nil or v == util.null then return "—" end
  if type(v) == "table" then return H.code(util.json_encode(v) or "?") end
  return tostring(v)
end

local function processes_table(list)
  local rows = {}
  for _, p in ipairs(list) do
    rows[#rows + 1] = cells(p.name, shown(p.pid), yes_no(p.alive), yes_no(p.healthy), shown(p.restarts),
      shown(p.last_exit), shown(p.health))
  end
  return table_of({ "Process", "Pid", "Alive", "Healthy", "Restarts", "Last exit", "Health" }, rows,
    "No processes.")
end

local function vms_table(vms, err)
  if not vms then return H.p({ class = "error" }, "The director did not answer: " .. tostring(err or "?")) end
  local rows = {}
  for _, vm in ipairs(vms) do
    rows[#rows + 1] = cells((vm.job_name or "?") .. "/" .. shown(vm.index), shown(vm.id), shown(vm.az),
      type(vm.ips) == "table" and table.concat(vm.ips, ", ") or shown(vm.ips), shown(vm.job_state or vm.state),
      shown(vm.vm_cid))
  end
  return table_of({ "Instance", "Id", "AZ", "IPs", "State", "VM" }, rows, "No VMs.")
end

local function version_facts(v)
  return facts({ { "Pinned", H.code(v.pinned or "—") }, { "Current", H.code(v.current or "not loaded") },
    { "Upgrade available", v.upgrade_available and H.strong("yes") or "no" } })
end

--- GET /dashboard/instances/:id (also the OSB dashboard_url, /service_instances/:id, to a browser)
function M.instance(b, id, _, q)
  only(q, { outcome = true, flash = true, sig = true })
  local d = admin.instance_detail(b, id)
  local flash = flash_of(b, id, q)
  local op = d.operation or {}
  local where = d.processes and H.section(H.h2("Processes"), processes_table(d.processes))
    or H.section(H.h2("VMs"), vms_table(d.vms, d.vms_error))
  return respond(200, page("Instance " .. d.id, {
    flash,
    facts({ { "State", badge(d.state) }, { "Service", d.service }, { "Plan", d.plan }, { "Target", d.target },
      { "Organization", d.organization_guid or "—" }, { "Space", d.space_guid or "—" },
      { "Created", when(d.created_at) }, { "Updated", when(d.updated_at) },
      { "Operation", { op.type or "—", " ", badge(op.state), op.description and { " — ", op.description } } } }),
    action_forms(b, d),
    H.section(H.h2("Version"), version_facts(d.version or {})),
    H.section(H.h2("Operations"), timeline(d.operations or {})),
    H.section(H.h2("Bindings (" .. #d.bindings .. ")"), bindings_table(d.bindings)),
    where,
    H.section(H.h2("Request and resources"), facts({ { "Parameters", code(d.parameters) },
      { "Context", code(d.context) }, { "Maintenance info", code(d.maintenance_info) },
      { "Resources", code(d.resources) } })),
    H.section(H.h2("Rendered deployment"), H.p({ class = "muted" }, "Secrets are shown as ********."),
      code(d.deployment)),
  }, { section = "Instances", refresh = op.state == "in progress" and 3 or nil }))
end

-- ---- actions -----------------------------------------------------------------------------

local ACTIONS = { retry = admin.retry, cancel = admin.cancel, restart = admin.restart }

--- POST /dashboard/instances/:id/:action (retry, cancel, restart): runs the admin action and
-- answers 303 to the instance's page, which shows the outcome.
function M.act(b, id, action, req)
  local run = ACTIONS[action]
  if not run then fail(404, "NotFound", "no such action '" .. action .. "': retry, cancel or restart") end
  check_form(b, req, action_path(id, action))
  local ok, status, body = pcall(run, b, id, b.admin_user)
  local outcome, text
  if ok then
    outcome, text = "done", action .. " accepted: operation " .. tostring(body.operation) .. " (" .. status .. ")"
  elseif type(status) == "table" and status.status and status.status ~= 404 and status.status < 500 then
    outcome, text = "refused", action .. " refused (" .. status.status .. "): " .. tostring(status.description)
  else
    error(status, 0)
  end
  return 303, html_headers({ Location = link(instance_path(id), flash_query(b, id, outcome, text)) }), ""
end

-- ---- services ----------------------------------------------------------------------------

local function short(hash) return hash and hash:sub(1, 12) or "—" end

local function services_table(b, list, versions)
  local rows = {}
  for _, s in ipairs(list) do
    local svc = b.registry.by_name[s.name]
    local plans = {}
    for _, p in ipairs(svc and svc.catalog.plans or {}) do plans[#plans + 1] = p.name end
    local on_current, on_older = 0, 0
    for hash, n in pairs(versions[s.name] or {}) do
      if hash == s.version then on_current = on_current + n else on_older = on_older + n end
    end
    rows[#rows + 1] = cells(H.strong(s.name), svc and svc.catalog.description or "", s.folder,
      H.code({ title = s.version }, short(s.version)), table.concat(plans, ", "),
      H.span({ class = "num" }, tostring(on_current)),
      on_older > 0 and H.strong({ class = "num" }, tostring(on_older)) or H.span({ class = "num muted" }, "0"))
  end
  return table_of({ "Service", "Description", "Folder", "Version", "Plans", "Instances on it", "On older versions" },
    rows, "No services loaded.")
end

-- The newest fleet upgrades (forge.upgrades), at most 10.
local function upgrades_table(list)
  local rows = {}
  for i = 1, math.min(#list, 10) do
    local u, n = list[i], list[i].counts
    rows[i] = cells(H.code(u.id), badge(u.state), when(u.created_at),
      string.format("%d/%d: %d upgraded, %d skipped, %d failed, %d in flight", n.upgraded + n.skipped + n.failed,
        u.total, n.upgraded, n.skipped, n.failed, n["in flight"]), u.description or "")
  end
  return table_of({ "Upgrade", "State", "Started", "Instances", "Description" }, rows,
    "No fleet upgrade yet: forge upgrade starts one.")
end

--- GET /dashboard/services
function M.services(b, _, q)
  only(q, {})
  local status = b:services_status()
  local _, versions = tally(b)
  local _, runs = upgrades.list(b)
  return respond(200, page("Services", {
    H.p("Loaded generation ", H.strong(tostring(status.generation)), "."),
    H.section(H.h2("Loaded versions"), services_table(b, status.services, versions)),
    H.section(H.h2("Fleet upgrades"), upgrades_table(runs.upgrades)),
    H.section(H.h2("Reload errors (" .. #status.errors .. ")"),
      H.p({ class = "muted" }, "An edit that failed to load is refused; the version before it keeps running."),
      refused_table(status.errors)),
  }, { section = "Services" }))
end

return M
