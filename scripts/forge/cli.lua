--- The forge command line: every subcommand of the forge binary lives here.
local util = require "forge.util"

local M = {}

local USAGE = [[
usage: forge <command> [options]

commands:
  serve [--config FILE]                 run the broker (default config: ./forge.yml if present)
  check [DIR]                           validate services (a service folder or a services dir) in the
                                        sandbox, render every plan; non-zero exit on problems
  render SERVICE PLAN [--params JSON]   print what a plan would deploy (dry run, no side effects)
  new NAME                              scaffold services/NAME that passes `forge check` at once
  install PKG.tgz                       validate a service package and install it atomically
  bosh-sim [--help]                     run a simulated BOSH director (for authors and specs)
  store-backup FILE [--config FILE]     copy the broker's own store into FILE (docs/backups.md)
  rotate-key [--config FILE]            re-seal the store under the primary key (docs/security.md)
  version                               print the version
  help                                  this text; `forge COMMAND --help` for one command

commands over a running broker's admin API (--url URL, admin credentials from the config or
FORGE_ADMIN_USER/FORGE_ADMIN_PASSWORD, --json for the raw answer; over HTTPS --cacert FILE, and
--cert FILE --key FILE for a broker that asks for client certificates):
  status                                service versions, refused edits and readiness (/readyz)
  instances [--state S] [--service S] [--plan P] [--org O] [--space S] [--target T] [--limit N]
                                        list instances
  instance ID                           one instance: operations, bindings, processes or VMs
  ops [--state S] [--type T]            operations in progress (or failed, succeeded)
  retry ID | cancel ID | restart ID     act on an instance, then wait for the operation (--no-wait)
  backup ID | backups [ID]              back an instance up (then wait); list backups
  restore BACKUP --to ID                put a backup into an instance of the same service (then wait)
  diff ID [--to V] [--plan P] [--params JSON]
                                        what an update or upgrade would change (exit 1: changes)
  upgrade --all | --service S | IDs... [--canaries N] [--max-in-flight M] [--dry-run]
                                        move instances to their service's current version; a job
                                        the broker runs (--pause, --resume, --abort)
  orphans [--clean]                     what no record owns, records whose deployment is gone
  metrics                               the Prometheus metrics

Options of check/render/new/install: --services DIR (default: services_dir of ./forge.yml, else
./services), --config FILE.
exit status: 0 ok; 1 the command failed (problems found, refused, no answer); 2 usage or config error.

Environment variables override forge.yml:
]]

local function file_exists(path)
  local f = io.open(path, "r")
  if f then f:close() end
  return f ~= nil
end

-- Parse "--name value" options; returns opts, positional | nil, message.
local function parse_options(args, first, known)
  local opts, pos = {}, {}
  local i = first
  while i <= #args do
    local a = args[i]
    local name = a:match("^%-%-([%w%-]+)$")
    if name then
      if known[name] == nil then return nil, "unknown option --" .. name end
      if known[name] == "flag" then
        opts[name] = true
      else
        if args[i + 1] == nil then return nil, "option --" .. name .. " needs a value" end
        opts[name] = args[i + 1]
        i = i + 1
      end
    else
      pos[#pos + 1] = a
    end
    i = i + 1
  end
  return opts, pos
end

local commands = {}

local HELP = {
  serve = "usage: forge serve [--config FILE]\n"
    .. "  Run the broker until SIGTERM or SIGINT (then in-flight requests finish). The config is\n"
    .. "  FILE, else ./forge.yml if present, else the defaults; FORGE_* variables override it\n"
    .. "  (`forge help` lists them). A store that does not answer yet (etcd down) is retried while\n"
    .. "  the broker listens: /healthz answers, /readyz and OSB requests answer 503 until it does.\n"
    .. "exit status: 0 stopped by a signal, 1 cannot start (state dir, a store that refuses, listen\n"
    .. "  address), 2 bad configuration (including settings naming no loaded service or plan)\n",
  check = "usage: forge check [DIR] [--services DIR] [--config FILE]\n  Load each service in the sandbox, validate its "
    .. "catalog entry, render every plan with\n  sample parameters and run bind/unbind; prints one line per problem "
    .. "(file: message).\n  Checking the whole services dir also checks the settings of the config that name services\n"
    .. "  or plans (targets.NAME.services, quotas) against them.\n"
    .. "exit status: 0 no problem, 1 problems found, 2 usage error, no such directory or a bad config\n",
  render = "usage: forge render SERVICE PLAN [--params JSON] [--target NAME] [--services DIR]\n  Print the "
    .. "deployment a plan would run, as YAML: local processes, or with --target the BOSH manifest\n  for that "
    .. "configured director (--target sample: a sample network). Nothing is started or stored.\n"
    .. "exit status: 0 rendered, 1 no such service or plan, bad parameters or a failing hook, 2 usage error\n",
  new = "usage: forge new NAME [--services DIR]\n  Scaffold DIR/NAME: service.lua with fresh GUIDs, templates/, "
    .. "README.md and a spec.\n"
    .. "exit status: 0 created, 1 DIR/NAME exists or cannot be written, 2 usage error or a bad name\n",
  install = "usage: forge install PKG.tgz [--replace] [--services DIR] [--config FILE]\n"
    .. "  Check a .tgz holding one service folder (service.lua, templates/, ...) exactly as\n"
    .. "  `forge check` does, then move it into the services dir atomically (a running broker\n"
    .. "  loads it). Refuses path traversal, links out of the folder, special files, oversized\n"
    .. "  archives, and ids or service names used by another installed folder. File modes are\n"
    .. "  kept, minus group/other write and setuid/setgid/sticky bits.\n"
    .. "  BOSH releases and stemcells the package lists in releases.yml (tarballs under releases/\n"
    .. "  and stemcells/, or http(s) URLs with their sha1) are uploaded first to every BOSH target\n"
    .. "  of the config the service's plans map to, skipping what a director has; the service is\n"
    .. "  installed only when every upload succeeded (a re-run skips what was uploaded).\n"
    .. "  --replace   replace an installed folder of the same name (atomically; the old version\n"
    .. "              is restored on failure)\n"
    .. "exit status: 0 installed, 1 refused (nothing was installed), 2 usage error or unreadable package\n",
}

function commands.serve(args)
  local opts, err = parse_options(args, 2, { config = "value", help = "flag" })
  if not opts then
    io.stderr:write("forge serve: ", err, "\n")
    return 2
  end
  if opts.help then
    io.write(HELP.serve)
    return 0
  end
  local path = opts.config or (file_exists("forge.yml") and "forge.yml" or nil)
  return require("forge.serve").run(path)
end

-- The services dir and sandbox limits for the authoring commands.
local function authoring_setup(opts)
  local path = opts.config or (file_exists("forge.yml") and "forge.yml" or nil)
  local config, err = require("forge.config").load(path)
  if not config then return nil, err end
  return opts.services or config.services_dir, config.sandbox, config
end

local AUTHORING_OPTIONS = { services = "value", config = "value", params = "value", target = "value", url = "value",
  help = "flag", replace = "flag" }

local function authoring(name, min_args, max_args, run)
  commands[name] = function(args)
    local opts, pos = parse_options(args, 2, AUTHORING_OPTIONS)
    if not opts then
      io.stderr:write("forge ", name, ": ", pos, "\n", HELP[name])
      return 2
    end
    if opts.help then
      io.write(HELP[name])
      return 0
    end
    if #pos < min_args or #pos > max_args then
      io.stderr:write(HELP[name])
      return 2
    end
    local dir, limits, config = authoring_setup(opts)
    if not dir then
      io.stderr:write("forge ", name, ": ", limits, "\n")
      return 2
    end
    return run(pos, opts, dir, limits, config)
  end
end

authoring("check", 0, 1, function(pos, _, dir, limits, config)
  return require("forge.authoring").check(pos[1] or dir, limits, { local_cfg = config.targets["local"] }, config)
end)
authoring("render", 2, 2, function(pos, opts, dir, limits, config)
  return require("forge.authoring").render(dir, pos[1], pos[2], opts.params, limits, opts.target, config)
end)
authoring("new", 1, 1, function(pos, _, dir)
  return require("forge.authoring").new(pos[1], dir)
end)
authoring("install", 1, 1, function(pos, opts, dir, limits, config)
  for _, name in ipairs({ "params", "target", "url" }) do
    if opts[name] then
      io.stderr:write("forge install: option --", name, " does not apply\n", HELP.install)
      return 2
    end
  end
  return require("forge.install").install(pos[1], dir, limits,
    { replace = opts.replace, check = { local_cfg = config.targets and config.targets["local"] },
      targets = config.targets })
end)

-- ---- the admin API (forge status, instances, instance, ops, retry, cancel, restart, orphans,
-- metrics): curl against a running broker with the admin credentials -------------------------

local function one_line(text) return (tostring(text):gsub("%s+", " ")) end

-- A string in a curl config file: double-quoted, backslash and quote escaped.
local function curl_quoted(text) return '"' .. text:gsub('[\\"]', "\\%0") .. '"' end

-- Percent-encode a path segment or query value.
local function encode(text) return (tostring(text):gsub("[^%w%-%._~]", function(c) return ("%%%02X"):format(c:byte()) end)) end

--- One call to the broker: method, path (with query). The credentials and the URL reach curl
-- through a private config file (mode 0600, removed at once), never its command line.
-- `data`: a JSON request body.
-- @return status, body text | nil, message (the broker did not answer)
local function call(api, method, path, data)
  local cfg, errs = os.tmpname(), os.tmpname()
  local f = assert(io.open(cfg, "w"))
  f:write("user = ", curl_quoted(api.user .. ":" .. api.password), "\n", "url = ", curl_quoted(api.url .. path), "\n",
    "request = ", curl_quoted(method), "\n", 'write-out = "\\n%{http_code}"\n')
  if data then f:write('header = "Content-Type: application/json"\n', "data-binary = ", curl_quoted(data), "\n") end
  for _, o in ipairs({ "cacert", "cert", "key" }) do
    if api[o] then f:write(o, " = ", curl_quoted(api[o]), "\n") end
  end
  f:close()
  local p = io.popen("curl -s -S --max-time 30 -K " .. cfg .. " 2>" .. errs)
  local out = p:read("a")
  p:close()
  local ef = io.open(errs)
  local err = ef and ef:read("a") or ""
  if ef then ef:close() end
  os.remove(cfg)
  os.remove(errs)
  local body, code = out:match("^(.*)\n(%d%d%d)$")
  if not code or code == "000" then return nil, "no answer from " .. api.url .. ": " .. one_line(err) end
  return tonumber(code), body
end

-- A JSON call. @return status, decoded body (nil when not JSON), text | nil, message
local function call_json(api, method, path, data)
  local status, text = call(api, method, path, data)
  if not status then return nil, text end
  return status, util.json_decode(text), text
end

-- Why the broker said no, on one line: "404 NotFound: instance r9 does not exist".
local function refusal(status, body, text)
  if type(body) == "table" and body.error then
    return string.format("%d %s: %s", status, body.error, one_line(body.description or ""))
  end
  return string.format("%d: %s", status, one_line(text or ""):sub(1, 300))
end

-- What a failed call_json says: the broker's refusal, or (status nil) why nothing answered.
local function failure(status, body, text)
  return status and ("the broker refused: " .. refusal(status, body, text)) or body
end

-- The TLS files of a call over HTTPS: the CA the broker's certificate chains to (--cacert,
-- FORGE_CACERT; default: the system's), a client certificate and its key (--cert/--key,
-- FORGE_CLIENT_CERT/FORGE_CLIENT_KEY) for a broker that asks for one.
-- @return {cacert, cert, key} | nil, message
local function tls_files(opts)
  local t = { cacert = opts.cacert or os.getenv("FORGE_CACERT"), cert = opts.cert or os.getenv("FORGE_CLIENT_CERT"),
    key = opts.key or os.getenv("FORGE_CLIENT_KEY") }
  for k, v in pairs(t) do
    if v == "" then t[k] = nil end
  end
  if (t.cert == nil) ~= (t.key == nil) then return nil, "--cert and --key go together" end
  for _, k in ipairs({ "cacert", "cert", "key" }) do
    local f = t[k] and io.open(t[k], "rb")
    if t[k] and not f then return nil, "--" .. k .. ": cannot read " .. t[k] end
    if f then f:close() end
  end
  return t
end

-- The broker and the admin credentials, from --url and the config (FORGE_ADMIN_USER/PASSWORD);
-- https:// by default when the config serves HTTPS.
-- @return api {url, user, password, cacert, cert, key} | nil, message
local function admin_api(opts)
  local path = opts.config or (file_exists("forge.yml") and "forge.yml" or nil)
  local config, err = require("forge.config").load(path)
  if not config then return nil, err end
  if not config.admin.password then
    return nil, "no admin credentials configured (admin.password in the config, or FORGE_ADMIN_USER/"
      .. "FORGE_ADMIN_PASSWORD)"
  end
  local url = (opts.url or ((config.tls.cert and "https://" or "http://") .. config.listen)):gsub("/+$", "")
  if not url:match("^https?://[^/%s]+") then return nil, "--url must be an http:// or https:// URL" end
  local tls, terr = tls_files(opts)
  if not tls then return nil, terr end
  return { url = url, user = config.admin.username, password = config.admin.password, cacert = tls.cacert,
    cert = tls.cert, key = tls.key }
end

-- Seconds as "45s", "12m", "3h" or "2d".
local function age(seconds)
  if not seconds then return "-" end
  for _, u in ipairs({ { 86400, "d" }, { 3600, "h" }, { 60, "m" } }) do
    if seconds >= u[1] * 2 then return math.floor(seconds / u[1]) .. u[2] end
  end
  return math.floor(seconds) .. "s"
end

local function ago(t) return t and age(os.time() - t) or "-" end

-- Print rows as a table: columns {{heading, function(row) -> text}}; the last column is not padded.
local function print_table(columns, rows)
  local cells, widths = {}, {}
  for c, col in ipairs(columns) do widths[c] = #col[1] end
  for r, row in ipairs(rows) do
    cells[r] = {}
    for c, col in ipairs(columns) do
      local text = one_line(col[2](row) or "-")
      cells[r][c] = text
      if c < #columns then widths[c] = math.max(widths[c], #text) end
    end
  end
  local function line(values)
    local out = {}
    for c, v in ipairs(values) do out[c] = c < #columns and (v .. string.rep(" ", widths[c] - #v)) or v end
    io.write(table.concat(out, "  "), "\n")
  end
  local heads = {}
  for c, col in ipairs(columns) do heads[c] = col[1] end
  line(heads)
  for _, r in ipairs(cells) do line(r) end
end

local function field(name) return function(row) return row[name] ~= nil and tostring(row[name]) or nil end end

local function operation_text(op)
  if type(op) ~= "table" then return nil end
  return op.type .. " " .. op.state
end

-- The query string of the options that are set: {option, parameter} pairs.
local function query(opts, names)
  local parts = {}
  for _, n in ipairs(names) do
    if opts[n[1]] then parts[#parts + 1] = n[2] .. "=" .. encode(opts[n[1]]) end
  end
  return #parts > 0 and ("?" .. table.concat(parts, "&")) or ""
end

local ADMIN_OPTIONS = { url = "value", config = "value", json = "flag", help = "flag", cacert = "value", cert = "value",
  key = "value" }

--- Define `forge NAME` over the admin API: its options (beyond --url, --config, --json, --help),
-- its number of positional arguments (n, or {min, max}), and run(api, positional, opts) -> exit status.
local function admin_command(name, help, options, nargs, run)
  HELP[name] = help
  commands[name] = function(args)
    local known = util.copy(ADMIN_OPTIONS)
    for k, v in pairs(options) do known[k] = v end
    local opts, pos = parse_options(args, 2, known)
    if not opts then
      io.stderr:write("forge ", name, ": ", pos, "\n", help)
      return 2
    end
    if opts.help then
      io.write(help)
      return 0
    end
    local min, max = table.unpack(type(nargs) == "table" and nargs or { nargs, nargs })
    if #pos < min or #pos > max then
      io.stderr:write(help)
      return 2
    end
    local api, err = admin_api(opts)
    if not api then
      io.stderr:write("forge ", name, ": ", err, "\n")
      return 2
    end
    return run(api, pos, opts)
  end
end

-- GET path: prints the raw JSON with --json, else show(body); exit 0, or 1 when refused.
local function show_json(name, api, path, opts, show)
  local status, body, text = call_json(api, "GET", path)
  if not status then
    io.stderr:write("forge ", name, ": ", body, "\n")
    return 1
  end
  if status ~= 200 or type(body) ~= "table" then
    io.stderr:write("forge ", name, ": the broker refused: ", refusal(status, body, text), "\n")
    return 1
  end
  if opts.json then
    io.write(text, "\n")
    return 0
  end
  return show(body) or 0
end

local COMMON_HELP = "  --url URL       the broker (default: http://<listen> of the config, https:// when it has tls)\n"
  .. "  --cacert FILE   the CA (PEM) the broker's HTTPS certificate chains to (FORGE_CACERT; default:\n"
  .. "                  the system's CAs)\n"
  .. "  --cert FILE --key FILE  a client certificate and key (PEM) for a broker that asks for one\n"
  .. "                  (FORGE_CLIENT_CERT, FORGE_CLIENT_KEY)\n"
  .. "  --config FILE   the config with the admin credentials (default ./forge.yml; FORGE_ADMIN_USER and\n"
  .. "                  FORGE_ADMIN_PASSWORD override it)\n"
  .. "  --json          print the broker's JSON answer as it is\n"
  .. "exit status: 0 ok, 1 the broker refused, did not answer or the action failed, 2 usage error\n"

admin_command("status", "usage: forge status [--url URL] [--config FILE] [--json]\n"
  .. "  Ask a running broker which service versions it serves, which edits it refused\n"
  .. "  (GET /admin/services), and whether it is ready (GET /readyz: its store and every target).\n"
  .. "  Exit 1 also when an edit was refused or the broker is not ready.\n" .. COMMON_HELP, {}, 0,
  function(api, _, opts)
    local status, body, text = call_json(api, "GET", "/admin/services")
    if not status or status ~= 200 or type(body) ~= "table" or type(body.services) ~= "table" then
      io.stderr:write("forge status: ", status and refusal(status, body, text) or body, "\n")
      return 1
    end
    local rstatus, ready, rtext = call_json(api, "GET", "/readyz")
    if opts.json then
      io.write(util.json_encode({ services = body, readiness = ready or rtext }), "\n")
    else
      io.write("generation ", tostring(body.generation), "\n")
      local iso = body.isolation or {}
      io.write("local target: isolation ", tostring(iso.mode), ", limits ", tostring(iso.limits), "\n")
      for _, w in ipairs(iso.warnings or {}) do io.write("  WARNING ", w, "\n") end
      for _, svc in ipairs(body.services) do
        io.write(string.format("  %-20s version %s  (%d plan(s))\n", svc.name, svc.version, svc.plans))
      end
      for _, e in ipairs(body.errors or {}) do
        io.write(string.format("  REFUSED %s: %s%s\n", e.service, e.message,
          e.kept_version and (" (still serving " .. e.kept_version .. ")") or ""))
      end
      if rstatus == 200 then
        io.write("ready\n")
      else
        io.write("NOT READY", type(ready) == "table" and "" or (": " .. (rstatus and refusal(rstatus, ready, rtext)
          or tostring(ready))), "\n")
        for _, c in ipairs(type(ready) == "table" and ready.checks or {}) do
          if not c.ok then io.write("  ", c.name, ": ", one_line(c.error or "failed"), "\n") end
        end
      end
    end
    return (#(body.errors or {}) == 0 and rstatus == 200) and 0 or 1
  end)

local INSTANCE_FILTERS = { { "state", "state" }, { "service", "service" }, { "plan", "plan" }, { "org", "org" },
  { "space", "space" }, { "target", "target" }, { "limit", "limit" }, { "after", "after" } }

admin_command("instances", "usage: forge instances [--state S] [--service S] [--plan P] [--org GUID] [--space GUID]\n"
  .. "                       [--target T] [--limit N] [--after ID] [--url URL] [--config FILE] [--json]\n"
  .. "  List instances (GET /admin/instances), in id order, one page of --limit (default 50, at most\n"
  .. "  500); --after ID starts after that id. --state: deploying, running, failed, destroying, deleted.\n"
  .. COMMON_HELP, { state = "value", service = "value", plan = "value", org = "value", space = "value",
    target = "value", limit = "value", after = "value" }, 0,
  function(api, _, opts)
    return show_json("instances", api, "/admin/instances" .. query(opts, INSTANCE_FILTERS), opts, function(body)
      print_table({ { "ID", field("id") }, { "SERVICE", field("service") }, { "PLAN", field("plan") },
        { "STATE", field("state") }, { "TARGET", field("target") }, { "ORG", field("organization_guid") },
        { "SPACE", field("space_guid") }, { "UPDATED", function(r) return ago(r.updated_at) end },
        { "OPERATION", function(r) return operation_text(r.operation) end } }, body.instances or {})
      if body.next then io.write("more: forge instances --after ", body.next, "\n") end
    end)
  end)

local function operations_table(ops)
  print_table({ { "ID", field("id") }, { "TYPE", field("type") }, { "STATE", field("state") },
    { "STARTED", function(o) return ago(o.started_at) end },
    { "TOOK", function(o) return o.finished_at and o.started_at and age(o.finished_at - o.started_at) end },
    { "DESCRIPTION", field("description") } }, ops)
end

-- The readable view of GET /admin/instances/:id.
local function show_instance(d)
  local v = type(d.version) == "table" and d.version or {}
  io.write("instance ", d.id, "\n")
  io.write(string.format("  service  %s / %s on %s, %s\n", d.service, d.plan, d.target, d.state))
  io.write(string.format("  org      %s  space %s\n", tostring(d.organization_guid), tostring(d.space_guid)))
  io.write(string.format("  version  %s%s\n", tostring(v.pinned), v.upgrade_available
    and (" (upgrade available: " .. tostring(v.current) .. ")") or ""))
  io.write(string.format("  created  %s ago, updated %s ago\n", ago(d.created_at), ago(d.updated_at)))
  local r = type(d.resources) == "table" and d.resources or {}
  if r.ports then io.write("  ports    ", table.concat(r.ports, ", "), " on ", tostring(r.host or "-"), "\n") end
  if r.ips then io.write("  ips      ", table.concat(r.ips, ", "), " (network ", tostring(r.network), ")\n") end
  io.write("operations\n")
  operations_table(d.operations or {})
  if d.bindings and #d.bindings > 0 then
    io.write("bindings\n")
    print_table({ { "ID", field("id") }, { "STATE", field("state") }, { "CREATED", function(b) return ago(b.created_at) end },
      { "OPERATION", function(b) return operation_text(b.operation) end } }, d.bindings)
  end
  if d.processes then
    io.write("processes\n")
    print_table({ { "NAME", field("name") }, { "PID", field("pid") }, { "ALIVE", field("alive") },
      { "HEALTHY", field("healthy") }, { "RESTARTS", field("restarts") },
      { "LAST EXIT", function(p) return p.last_exit and util.json_encode(p.last_exit) end } },
      d.processes)
  end
  if d.vms then
    io.write("vms\n")
    print_table({ { "JOB", function(m) return (m.job_name or m.job or "?") .. "/" .. tostring(m.index) end },
      { "STATE", function(m) return m.job_state or m.process_state end }, { "AZ", field("az") },
      { "IPS", function(m) return table.concat(m.ips or {}, ",") end } }, d.vms)
  elseif d.vms_error then
    io.write("vms: the director did not answer: ", one_line(d.vms_error), "\n")
  end
  io.write("(forge instance ", d.id, " --json shows the rendered deployment, secrets masked)\n")
end

admin_command("instance", "usage: forge instance ID [--url URL] [--config FILE] [--json]\n"
  .. "  Show one instance (GET /admin/instances/ID): state, version, operations, bindings (never\n"
  .. "  credentials), processes or VMs; --json adds the rendered deployment (secrets masked).\n" .. COMMON_HELP,
  {}, 1, function(api, pos, opts)
    return show_json("instance", api, "/admin/instances/" .. encode(pos[1]), opts, show_instance)
  end)

admin_command("ops", "usage: forge ops [--state in_progress|failed|succeeded] [--type T] [--limit N] [--url URL]\n"
  .. "               [--config FILE] [--json]\n"
  .. "  List operations (GET /admin/operations): in progress (default), or the current ones that\n"
  .. "  failed or succeeded; --type provision, update, deprovision, bind, unbind or restart.\n" .. COMMON_HELP,
  { state = "value", type = "value", limit = "value" }, 0, function(api, _, opts)
    local path = "/admin/operations" .. query(opts, { { "state", "state" }, { "type", "type" }, { "limit", "limit" } })
    return show_json("ops", api, path, opts, function(body)
      print_table({ { "INSTANCE", field("instance") }, { "BINDING", field("binding") }, { "ID", field("id") },
        { "TYPE", field("type") }, { "STATE", field("state") }, { "TARGET", field("target") },
        { "AGE", function(o) return o.age_seconds and age(o.age_seconds) end },
        { "DESCRIPTION", field("description") } }, body.operations or {})
    end)
  end)

-- Whether stderr is a terminal (a progress line is then rewritten in place).
local function stderr_is_tty() return os.execute("test -t 2") == true end

local POLL_SECONDS = 0.5

-- Poll GET /admin/instances/:id until operation op_id ends, with a progress line on stderr.
-- @return the operation summary | nil, message
local function wait_operation(name, api, id, op_id)
  local tty, last = stderr_is_tty(), nil
  while true do
    local status, body, text = call_json(api, "GET", "/admin/instances/" .. encode(id))
    if status ~= 200 or type(body) ~= "table" then
      if tty and last then io.stderr:write("\r\27[K") end
      return nil, status and refusal(status, body, text) or body
    end
    local op
    for _, o in ipairs(body.operations or {}) do if o.id == op_id then op = o end end
    if not op then return nil, "operation " .. op_id .. " is no longer in the history of instance " .. id end
    if op.state ~= "in progress" then
      if tty and last then io.stderr:write("\r\27[K") end
      return op
    end
    local what = one_line(op.description or "")
    local line = string.format("forge %s: %s %s%s", name, op.type, op.state, what ~= "" and ": " .. what or "")
    if tty then
      io.stderr:write("\r\27[K", line:sub(1, 150), " (", age(os.time() - (op.started_at or os.time())), ")")
    elseif line ~= last then
      io.stderr:write(line, "\n")
    end
    last = line
    require("forge.proc").sleep(POLL_SECONDS)
  end
end

--- The answer to an action that starts an operation on instance `id` (202 {operation}): print
-- it (--json), return at once (--no-wait), or wait for the operation with a progress line and
-- print how it ended. Exit 0 when it ended in `want`.
local function follow(name, api, id, status, body, text, opts, want)
  if not status then
    io.stderr:write("forge ", name, ": ", body, "\n")
    return 1
  end
  if status ~= 202 or type(body) ~= "table" or not body.operation then
    io.stderr:write("forge ", name, ": the broker refused: ", refusal(status, body, text), "\n")
    return 1
  end
  if opts.json then io.write(text, "\n") end
  if opts["no-wait"] then
    if not opts.json then io.write(name, ": operation ", body.operation, " started on instance ", id, "\n") end
    return 0
  end
  local op, err = wait_operation(name, api, id, body.operation)
  if not op then
    io.stderr:write("forge ", name, ": ", err, "\n")
    return 1
  end
  if opts.json then
    io.write(util.json_encode(op), "\n")
  else
    io.write(string.format("%s: %s %s %s: %s\n", name, op.type, op.id, op.state, one_line(op.description or "")))
  end
  return op.state == want and 0 or 1
end

--- forge retry|cancel|restart ID: POST the action, then wait for its operation to end in
-- `want` ("succeeded"; a cancelled operation ends "failed").
local function action(name, want, what)
  admin_command(name, "usage: forge " .. name .. " ID [--no-wait] [--url URL] [--config FILE] [--json]\n"
    .. "  " .. what .. "\n"
    .. "  Then wait for its operation to end, with a progress line (--no-wait: return at once).\n"
    .. COMMON_HELP, { ["no-wait"] = "flag" }, 1, function(api, pos, opts)
      local status, body, text = call_json(api, "POST", "/admin/instances/" .. encode(pos[1]) .. "/" .. name)
      return follow(name, api, pos[1], status, body, text, opts, want)
    end)
end

action("retry", "succeeded", "Run the instance's failed operation (provision, update or deprovision) again.")
action("cancel", "failed", "Stop the operation in flight (its processes stop, a BOSH task is cancelled); it ends\n"
  .. "  failed, \"cancelled by the operator\". Exit 1 when it succeeded before it could be stopped.")
action("restart", "succeeded", "Restart a running local instance's processes.")

local helpers = { admin_command = admin_command, call_json = call_json, show_json = show_json,
  follow = follow, print_table = print_table, field = field, ago = ago, encode = encode,
  parse_options = parse_options, common_help = COMMON_HELP, refusal = refusal, failure = failure,
  command = function(name, help, fn) HELP[name], commands[name] = help, fn end,
  load_config = function(opts)
    return require("forge.config").load(opts.config or (file_exists("forge.yml") and "forge.yml" or nil))
  end }
require("forge.cli_backups").define(helpers)
require("forge.cli_secrets").define(helpers)
require("forge.cli_upgrades").define(helpers)

-- Orphans cleaned in this order: a directory holding a live process can go once it is stopped.
local CLEAN_ORDER = { process = 1, deployment = 2, record = 3, directory = 4 }

local function clean_orphans(api, list)
  table.sort(list, function(a, b)
    if a.kind ~= b.kind then return (CLEAN_ORDER[a.kind] or 9) < (CLEAN_ORDER[b.kind] or 9) end
    return a.id < b.id
  end)
  local failed = 0
  for _, o in ipairs(list) do
    local status, body, text = call_json(api, "POST", "/admin/orphans/" .. encode(o.kind) .. "/" .. encode(o.id)
      .. "/clean")
    if status == 200 and type(body) == "table" then
      io.write(string.format("%s %s %s: %s\n", body.cleaned and "cleaned" or "left", o.kind, o.id,
        one_line(body.description or "")))
    else
      failed = failed + 1
      io.write(string.format("FAILED %s %s: %s\n", o.kind, o.id, status and refusal(status, body, text) or body))
    end
  end
  return failed == 0 and 0 or 1
end

admin_command("orphans", "usage: forge orphans [--clean] [--url URL] [--config FILE] [--json]\n"
  .. "  List what no instance record owns (local processes and directories under the state dir,\n"
  .. "  BOSH deployments named by this broker) and records whose deployment is gone\n"
  .. "  (GET /admin/orphans). --clean cleans each one: stops the process, removes the directory,\n"
  .. "  deletes the deployment, forgets the record; exit 1 if any could not be cleaned.\n" .. COMMON_HELP,
  { clean = "flag" }, 0, function(api, _, opts)
    return show_json("orphans", api, "/admin/orphans", opts, function(body)
      local list = body.orphans or {}
      for _, e in ipairs(body.errors or {}) do
        io.stderr:write("forge orphans: target ", tostring(e.target), " could not be looked at: ", one_line(e.error), "\n")
      end
      if #list == 0 then
        io.write("no orphans\n")
      elseif opts.clean then
        return clean_orphans(api, list)
      else
        print_table({ { "KIND", field("kind") }, { "ID", field("id") }, { "TARGET", field("target") },
          { "DETAIL", field("detail") } }, list)
      end
      return #(body.errors or {}) == 0 and 0 or 1
    end)
  end)

admin_command("metrics", "usage: forge metrics [--url URL] [--config FILE]\n"
  .. "  Print the broker's metrics (GET /metrics, Prometheus text format 0.0.4).\n" .. COMMON_HELP, {}, 0,
  function(api, _, opts)
    if opts.json then
      io.stderr:write("forge metrics: --json does not apply: the metrics are Prometheus text\n")
      return 2
    end
    local status, text = call(api, "GET", "/metrics")
    if status == 200 then
      io.write(text)
      return 0
    end
    io.stderr:write("forge metrics: ", status and ("the broker refused: " .. refusal(status,
      util.json_decode(text), text)) or text, "\n")
    return 1
  end)

commands["bosh-sim"] = function(args)
  return require("forge.boshsim").main({ table.unpack(args, 2) })
end

function commands.version()
  io.write("forge ", require("forge.http")._VERSION, "\n")
  return 0
end

-- FORGE_* variables that override no setting of forge.yml.
local OTHER_ENV = {
  { "FORGE_ENCRYPTION_KEY", "the store's one key (base64 of 32 bytes) when forge.yml has no encryption section" },
  { "FORGE_CACERT", "the CA of the broker's HTTPS certificate, for the admin commands (--cacert)" },
  { "FORGE_CLIENT_CERT", "a client certificate for the admin commands (--cert)" },
  { "FORGE_CLIENT_KEY", "its key (--key)" },
}

-- USAGE and every FORGE_* variable with the setting it overrides, then the others.
local function usage()
  local lines = { USAGE }
  for _, e in ipairs(require("forge.config").environment()) do
    lines[#lines + 1] = string.format("  %-22s %s%s\n", e.name, e.setting, e.form and (" (" .. e.form .. ")") or "")
  end
  lines[#lines + 1] = "Other environment variables:\n"
  for _, v in ipairs(OTHER_ENV) do lines[#lines + 1] = string.format("  %-22s %s\n", v[1], v[2]) end
  return table.concat(lines)
end

function commands.help()
  io.write(usage())
  return 0
end
commands["--help"] = commands.help
commands["-h"] = commands.help

--- Run the command line; returns the exit status.
function M.main(args)
  local name = args[1]
  if not name then
    io.stderr:write(usage())
    return 2
  end
  local cmd = commands[name]
  if not cmd then
    io.stderr:write("forge: unknown command '", name, "'\n\n", usage())
    return 2
  end
  return cmd(args)
end

return M
