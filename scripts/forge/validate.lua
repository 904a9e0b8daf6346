--- The one validator of a service version: `forge check`, `forge install`, hot reload and the
-- broker's start all call validate.service, so the broker refuses exactly what check refuses.
--
-- Beyond the catalog rules (services.build), it checks the script's own fields, renders every
-- plan with sample parameters, checks each hook's result against the contract
-- (forge.contract), runs bind and unbind on a sample context, backup and restore on a sample
-- backup of the rendered instance, checks that every executable is
-- declared (service.commands). It warns when, given the local target's config, a declared
-- command is not approved or not installed or a user is not allowed, and when a parameter
-- without a constraining schema reaches a file unescaped.
local util = require "forge.util"
local backups = require "forge.backups"
local contract = require "forge.contract"
local Local = require "forge.targets.local"
local services = require "forge.services"

local M = {}

local SAMPLE_INSTANCES = "/var/lib/forge/instances"   -- the instances dir of a dry run without a config

local checked = services.checked

local function create_schema(plan)
  local s = plan.schemas and plan.schemas.service_instance and plan.schemas.service_instance.create
  return s and s.parameters
end

--- Sample parameters for a plan: each property's default, else its first example or enum value.
function M.sample_parameters(plan)
  local s = create_schema(plan)
  local params = {}
  for name, p in pairs(s and s.properties or {}) do
    local v = p.default
    if v == nil and type(p.examples) == "table" then v = p.examples[1] end
    if v == nil and type(p.enum) == "table" then v = p.enum[1] end
    if v ~= nil then params[name] = v end
  end
  return params
end

local function where(svc, field)
  local line = contract.locate(svc.source, nil, field)
  return "services/" .. (svc.folder or svc.name) .. "/service.lua" .. (line and (":" .. line) or "")
end

--- Render plan `plan` of svc as the local target would, with `params`.
-- @return deployment, ctx | nil, {messages} (file:line and field included)
function M.render_local(svc, plan, params, dir)
  local count = 1
  if svc.script.ports then
    local n, err = services.call(svc, "ports", plan, params)
    count = math.tointeger(n)
    if not count or count < 1 then
      return nil, { err or (where(svc, "ports") .. ": ports: must return a positive integer (got " .. type(n) .. ")") }
    end
  end
  local ports = {}
  for i = 1, count do ports[i] = 30000 + i - 1 end
  local ctx = { instance_id = "dry-run", plan = plan, parameters = params, context = {}, host = "127.0.0.1",
    ports = ports, dir = (dir or SAMPLE_INSTANCES) .. "/dry-run", secrets = {},
    templates = svc.templates }
  local deployment, errs = checked(svc, "deploy", ctx)
  if not deployment then return nil, errs end
  return deployment, ctx
end

--- The bind and unbind results for a rendered deployment's ctx (a sample binding).
-- @return bind, unbind | nil, {messages}
function M.bind_unbind(svc, ctx)
  local bctx = { instance_id = ctx.instance_id, binding_id = "dry-run-binding", host = ctx.host, ports = ctx.ports,
    parameters = {}, secrets = ctx.secrets }
  local bound, errs = checked(svc, "bind", bctx)
  if not bound then return nil, errs end
  bctx.binding = { id = "dry-run-binding", credentials = bound.credentials }
  local unbound, uerrs = checked(svc, "unbind", bctx)
  if not unbound then return nil, uerrs end
  return bound, unbound
end

--- The backup and restore results for a rendered deployment's ctx: a backup of the sample
-- instance with one binding, restored into the same instance. Both hooks or neither.
-- @return backup, restore | nil, {messages} | nil, nil (no hooks)
function M.backup_restore(svc, plan, ctx)
  local script = svc.script
  if not script.backup and not script.restore then return nil, nil end
  if not (script.backup and script.restore) then
    local missing = script.backup and "restore" or "backup"
    return nil, { string.format("%s: backup and restore come as a pair: define %s too",
      where(svc, script.backup and "backup" or "restore"), missing) }
  end
  local bindings = { { id = "dry-run-binding", parameters = {} } }
  local function sample()
    return { instance_id = ctx.instance_id, plan = plan, parameters = ctx.parameters, context = ctx.context,
      host = ctx.host, ports = ctx.ports, dir = ctx.dir, secrets = ctx.secrets, bindings = bindings,
      scratch = backups.SCRATCH }
  end
  local saved, errs = checked(svc, "backup", sample())
  if not saved then return nil, errs end
  local rctx = sample()
  rctx.backup = { id = "dry-run-backup", instance_id = ctx.instance_id, service = svc.name, plan = plan.name,
    version = svc.hash, created_at = 0, files = util.sorted_keys(saved.files), bindings = bindings, secrets = ctx.secrets }
  local restored, err, version = services.call(svc, "restore", rctx)
  if type(restored) == "string" then
    return nil, { where(svc, "restore") .. ": restore: refuses a backup of its own instance: " .. restored }
  end
  if restored == nil then return nil, { err } end
  local problems = contract.all(version, "restore", restored, rctx.backup.files)
  if #problems > 0 then return nil, problems end
  return saved, restored
end

-- The manifest hook's result on a sample BOSH network (its shape only; forge render --target
-- merges it for real). Returns nil | {messages}.
local function manifest_problems(svc, plan, params)
  local count = 1
  local hook = svc.script.ips and "ips" or (svc.script.ports and "ports" or nil)
  if hook then count = math.tointeger((services.call(svc, hook, plan, params))) or 1 end
  local ips = {}
  for i = 1, math.max(1, math.min(count, 200)) do ips[i] = "10.244.0." .. (9 + i) end
  local ctx = { instance_id = "dry-run", plan = plan, parameters = params, context = {}, secrets = {},
    deployment_name = svc.name .. "-dry-run", target = "sample", network = "default", ips = ips, azs = { "z1" },
    templates = svc.templates }
  local _, errs = checked(svc, "manifest", ctx)
  return errs
end

local function add_all(out, list) for _, m in ipairs(list) do out[#out + 1] = m end end

-- Each executable the results name must be one the service declares.
local function undeclared(svc, plan, deployment, runs, out)
  local declared = {}
  for _, c in ipairs(type(svc.script.commands) == "table" and svc.script.commands or {}) do declared[c] = true end
  for _, exe in ipairs(contract.executables(deployment, runs)) do
    if not declared[exe] then
      local line = contract.locate_literal(svc.source, exe) or contract.locate(svc.source, nil, "commands")
      out[#out + 1] = string.format("services/%s/service.lua%s: command '%s' is run but not declared in the "
        .. "service's commands list (plan %s)", svc.folder or svc.name, line and (":" .. line) or "", exe, plan.name)
    end
  end
end

-- Declared commands the operator did not approve or that are not installed, users not allowed,
-- limits above the operator's caps (targets.local.max_limits): warnings (this machine's local
-- target could not run the service; a BOSH target may), which a provision on the local target
-- then refuses before anything is stored.
local function local_target_warnings(svc, local_cfg, out)
  local target = Local.new(local_cfg, "/nonexistent")
  for _, c in ipairs(type(svc.script.commands) == "table" and svc.script.commands or {}) do
    local ok, err = target:approved(c)
    if not ok then out[#out + 1] = where(svc, "commands") .. ": commands: " .. err end
  end
  local wanted = {}
  if svc.script.user then wanted[#wanted + 1] = svc.script.user end
  for _, p in ipairs(svc.script.plans) do if p.user then wanted[#wanted + 1] = p.user end end
  for _, u in ipairs(wanted) do
    if not target:allows_user(u) then
      out[#out + 1] = string.format("%s: user '%s' is not allowed on the local target (targets.local.users)",
        where(svc, "user"), u)
    end
  end
  for _, p in ipairs(svc.script.plans) do
    local ok, err = target:limits(svc.script, p)
    if not ok then out[#out + 1] = string.format("%s: plan %s: %s", where(svc, "limits"), p.name, err) end
  end
end

-- A plan's string parameters that no schema keyword constrains (no enum, const or pattern).
local function unconstrained(plan)
  local s = create_schema(plan)
  local names = {}
  for name, p in pairs(s and s.properties or {}) do
    local t = p.type
    local stringy = t == nil or t == "string" or (type(t) == "table" and (t[1] == "string" or t[2] == "string"))
    if stringy and p.enum == nil and p.const == nil and p.pattern == nil then names[#names + 1] = name end
  end
  table.sort(names)
  return names
end

local function file_with(deployment, needle)
  for _, p in ipairs(deployment.processes or {}) do
    for _, kind in ipairs({ "files", "seed_files" }) do
      for rel, content in pairs(p[kind] or {}) do
        if type(content) == "string" and content:find(needle, 1, true) then return rel end
      end
    end
  end
end

-- Warn when a free-form parameter is written into a file as it is: rendered with a value that
-- holds a line break, the deploy hook must refuse it (forge.conf does) or keep it out of files.
local function injection_warnings(svc, plan, params, out)
  for _, name in ipairs(unconstrained(plan)) do
    local probe = {}
    for k, v in pairs(params) do probe[k] = v end
    probe[name] = "forge-check-probe\nforge-check-injected yes"
    local d = M.render_local(svc, plan, probe)
    local rel = d and file_with(d, "\nforge-check-injected yes")
    if rel then
      out[#out + 1] = string.format("%s: plan %s: parameter '%s' reaches %s unescaped and its schema does not "
        .. "constrain it (add an enum or pattern, or render the file with forge.conf.render)", where(svc, "deploy"),
        plan.name, name, rel)
    end
  end
end

--- Validate a built service version (services.build).
-- @param opts {local_cfg = targets.local config (commands and users are then checked too)}
-- @return problems, warnings (lists of "file:line: message" strings)
function M.service(svc, opts)
  opts = opts or {}
  local problems, warnings = contract.script_problems(svc), {}
  if opts.local_cfg then local_target_warnings(svc, opts.local_cfg, warnings) end
  for _, plan in ipairs(svc.script.plans) do
    local params = M.sample_parameters(plan)
    local function failed(errs)
      for _, e in ipairs(errs) do problems[#problems + 1] = e .. " (plan " .. plan.name .. ")" end
    end
    if svc.script.manifest then
      local errs = manifest_problems(svc, plan, params)
      if errs then failed(errs) end
    end
    local deployment, ctx = M.render_local(svc, plan, params)
    if not deployment then
      failed(ctx)
    else
      local runs = {}
      if plan.bindable ~= false and svc.script.bindable then
        local bound, unbound = M.bind_unbind(svc, ctx)
        if not bound then
          failed(unbound)
        else
          add_all(runs, bound.run or {})
          add_all(runs, unbound.run or {})
        end
      end
      local saved, restored = M.backup_restore(svc, plan, ctx)
      if saved then
        add_all(runs, contract.backup_commands(saved))
        add_all(runs, contract.backup_commands(restored))
      elseif restored then
        failed(restored)
      end
      undeclared(svc, plan, deployment, runs, problems)
      injection_warnings(svc, plan, params, warnings)
    end
  end
  return problems, warnings
end

return M
