--- The authoring commands: forge check, forge render, forge new (forge install: forge.install).
--
-- Everything runs the service script in the same sandbox the broker uses, so what passes
-- here behaves the same when served.
local crypto = require "forge.crypto"
local lfs = require "lfs"
local services = require "forge.services"
local util = require "forge.util"
local validate = require "forge.validate"
local yaml = require "forge.yaml"

local M = {}

local function say(...) io.stdout:write(...) io.stdout:write("\n") end
local function complain(...) io.stderr:write(...) io.stderr:write("\n") end

--- Validate a built service: problems, warnings (see forge.validate).
function M.check_service(svc, opts) return validate.service(svc, opts) end

-- The services dir and folder names a check covers: a service folder, or a services dir.
local function check_targets(path)
  if lfs.attributes(path .. "/service.lua", "mode") == "file" then
    return path:match("^(.*)/[^/]+/?$") or ".", { path:match("([^/]+)/?$") }
  end
  local names = {}
  for entry in lfs.dir(path) do
    if entry:sub(1, 1) ~= "." and lfs.attributes(path .. "/" .. entry .. "/service.lua", "mode") == "file" then
      names[#names + 1] = entry
    end
  end
  table.sort(names)
  return path, names
end

-- The settings of `config` that name services or plans, checked against the services that
-- passed (svcs) and the folders that did not (refused). @return the number of errors
local function check_config(config, svcs, refused)
  local reg = { by_name = {}, errors = refused }
  for _, svc in ipairs(svcs) do reg.by_name[svc.name] = svc end
  local errors, warnings = require("forge.config").check_references(config, reg)
  for _, e in ipairs(errors) do complain("config: ", e) end
  for _, w in ipairs(warnings) do complain("warning: config: ", w) end
  return #errors
end

--- forge check [dir]: load, validate, render every plan; non-zero exit on problems. A whole
-- services dir is also checked against the settings of `config` that name services or plans.
-- opts: {local_cfg = targets.local config}
function M.check(path, limits, opts, config)
  path = path or "services"
  if not lfs.attributes(path, "mode") then
    complain("forge check: ", path, ": no such directory")
    return 2
  end
  local dir, names = check_targets(path)
  local failed, passed, refused = 0, {}, {}
  for _, name in ipairs(names) do
    local src, rerr = services.read_folder(dir, name)
    local svc, warnings, problems = nil, nil, { rerr }
    if src then svc, warnings, problems = services.accept(src, limits, opts) end
    if not svc then
      for _, p in ipairs(problems) do complain(p) end
      failed = failed + 1
      refused[#refused + 1] = { service = name }
    else
      for _, w in ipairs(warnings) do complain("warning: ", w) end
      say(string.format("ok  services/%s  %s, %d plan(s), version %s", name, svc.name, #svc.script.plans, svc.hash))
      svc.sandbox:close()
      passed[#passed + 1] = svc
    end
  end
  if #names == 0 then
    complain("forge check: no service found under ", path)
    return 1
  end
  local config_errors = (config and dir == path) and check_config(config, passed, refused) or 0
  say(string.format("%d service(s) checked, %d with problems", #names, failed))
  return (failed == 0 and config_errors == 0) and 0 or 1
end

-- A sample BOSH target for dry runs when no director is configured.
local SAMPLE_BOSH = { type = "bosh", url = "https://192.0.2.6:25555", networks = { { name = "default",
  cidr = "10.244.0.0/24", static = { "10.244.0.10 - 10.244.0.100" }, azs = { "z1" } } } }

-- The BOSH manifest a plan renders on `target_cfg`, with IPs from a throw-away in-memory pool.
local function render_bosh(svc, plan, params, name, target_cfg)
  local bosh = require("forge.targets.bosh").new(name, target_cfg, "/nonexistent")
  local db = assert(require("forge.store").open(":memory:"))
  local rec = { id = "dry-run", parameters = params, deployment_name = svc.name .. "-dry-run", secrets = {} }
  local ok, claim, _, _, msg = pcall(bosh.render, bosh, db, svc, plan, rec, function(hook, ...)
    return services.call(svc, hook, ...)
  end)
  db:close()
  if not ok then return nil, tostring(claim) end
  if not claim then return nil, msg end
  return rec.manifest
end

--- forge render <service> <plan> [--params JSON] [--target NAME]: what would run (dry run).
function M.render(dir, service_name, plan_name, params_json, limits, target, config)
  local params = {}
  if params_json then
    params = util.json_decode(params_json)
    if type(params) ~= "table" then
      complain("forge render: --params must be a JSON object")
      return 2
    end
  end
  local reg = services.load(dir, limits)
  local svc = reg.by_name[service_name] or (reg.by_folder or {})[service_name]
  if not svc then
    for _, e in ipairs(reg.errors) do if e.service == service_name then complain(e.message) return 1 end end
    complain("forge render: no service '", service_name, "' under ", dir)
    return 1
  end
  local plan
  for _, p in ipairs(svc.script.plans) do
    if p.name == plan_name or p.id == plan_name then plan = p end
  end
  if not plan then
    complain("forge render: service ", svc.name, " has no plan '", plan_name, "'")
    return 1
  end
  local schema = require "forge.schema"
  local s = plan.schemas and plan.schemas.service_instance and plan.schemas.service_instance.create
  if s and s.parameters then
    local ok, msg = schema.validate(s.parameters, params, "parameters")
    if not ok then
      complain("forge render: ", msg)
      return 1
    end
  elseif next(params) ~= nil then
    complain("forge render: parameters are not accepted by plan ", plan.name, " (it has no parameter schema)")
    return 1
  end
  if target and target ~= "local" then
    local cfg = target == "sample" and SAMPLE_BOSH or (config and config.targets[target])
    if not cfg or cfg.type ~= "bosh" then
      complain("forge render: no BOSH target '", target, "' in the config (or use --target sample)")
      return 1
    end
    local manifest, merr = render_bosh(svc, plan, params, target, cfg)
    if not manifest then
      complain("forge render: ", merr)
      return 1
    end
    io.stdout:write("# dry run of ", svc.name, "/", plan.name, " on BOSH target ", target, " (version ", svc.hash,
      "); IPs and secrets are samples\n", manifest)
    return 0
  end
  local instances = config and (config.state_dir .. "/instances") or nil
  local deployment, ctx = validate.render_local(svc, plan, params, instances)
  local bound, unbound
  if deployment and plan.bindable ~= false and svc.script.bindable then
    bound, unbound = validate.bind_unbind(svc, ctx)
    if not bound then deployment, ctx = nil, unbound end
  end
  if not deployment then
    for _, e in ipairs(ctx) do complain("forge render: ", e) end
    return 1
  end
  io.stdout:write("# dry run of ", svc.name, "/", plan.name, " (version ", svc.hash, "); secrets are samples\n")
  if instances then
    io.stdout:write("# state_dir: ", config.state_dir, " (the instance's files go under ", instances, "/<id>)\n")
  end
  io.stdout:write(assert(yaml.encode({ service = svc.name, plan = plan.name, parameters = params,
    deployment = deployment, bind = bound, unbind = unbound })))
  return 0
end

local NEW_SERVICE = [==[
-- %s: a service for Service Forge (scaffolded by `forge new`).
--
-- The broker runs these hooks in a sandbox (string/table/math/utf8 and the `forge`
-- capabilities only). docs/authoring.md documents every hook, every field they may return and
-- every ctx value. `forge check services/%s` validates this file; `forge render %s default`
-- shows what a plan deploys and what bind/unbind run. Replace each PLACEHOLDER with your server.
local crypto = forge.crypto

-- Parameters end users may pass; every one is constrained (a plan without a schema accepts none).
local function parameters()
  return {
    ["$schema"] = "http://json-schema.org/draft-07/schema#",
    type = "object",
    additionalProperties = false,
    properties = {
      greeting = { type = "string", pattern = "^[A-Za-z0-9 .,!-]{0,64}$", default = "hello",
        description = "PLACEHOLDER: a setting written into the server's config file" },
    },
  }
end

local service = {
  id = "%s",
  name = "%s",
  description = "PLACEHOLDER: what this service offers",
  bindable = true,
  tags = {},
  instances_retrievable = true,
  bindings_retrievable = true,
  -- every executable the hooks run; the operator approves each one (targets.local.commands)
  commands = { "sleep" },
  plans = {
    {
      id = "%s",
      name = "default",
      description = "One server process",
      free = true,
      schemas = { service_instance = { create = { parameters = parameters() }, update = { parameters = parameters() } } },
    },
  },
}

--- Ports this plan needs from the broker's pool: ctx.ports in deploy, bind and unbind.
function service.ports()
  return 1
end

--- The processes of an instance. Files are written under ctx.dir before anything starts.
function service.deploy(ctx)
  local settings = assert(forge.yaml.merge({ ctx.templates["settings.yml"],
    { port = ctx.ports[1], host = ctx.host, greeting = ctx.parameters.greeting } }))
  return {
    processes = { {
      name = "server",
      -- PLACEHOLDER: the real server, e.g. { "my-server", "--config", ctx.dir .. "/server/settings.yml" }
      argv = { "sleep", "infinity" },
      files = { ["server/settings.yml"] = forge.yaml.encode(settings) },
      -- PLACEHOLDER: commands run once before the first start (skipped when `creates` exists), e.g.
      -- init = { { argv = { "my-server-init", ctx.dir .. "/server/data" }, creates = "server/data" } },
      -- PLACEHOLDER: when the server listens, say how to tell it is ready, e.g.
      -- health = { tcp = ctx.ports[1] },   -- "the port is open"; a command check can say "ready"
      stop_signal = "TERM",
      stop_timeout = 5,
    } },
  }
end

--- A binding: credentials for one application. ctx.credentials holds the binding's existing
-- credentials when the broker re-applies it (after a redeploy): reuse them.
function service.bind(ctx)
  local username = "u-" .. crypto.sha256_hex(ctx.binding_id):sub(1, 16)
  local password = ctx.credentials and ctx.credentials.password or crypto.password(24)
  return {
    credentials = { host = ctx.host, port = ctx.ports[1], username = username, password = password },
    -- PLACEHOLDER: commands that create the user on the server, e.g.
    -- { argv = { "my-server-cli", "--port", tostring(ctx.ports[1]), "add-user", username }, stdin = password }
    run = {},
  }
end

--- Unbind: remove what bind created; the binding's credentials must stop working.
function service.unbind()
  return { run = {} }   -- PLACEHOLDER: e.g. { { argv = { "my-server-cli", "del-user", "..." } } }
end

return service
]==]

local NEW_SPEC = [==[
-- services/%s: the whole lifecycle through a real broker (provision, bind, unbind, deprovision).
local Broker = require "spec.support.broker"

-- the services dir this spec's service lives in
local here = debug.getinfo(1, "S").source:sub(2):match("^(.*)/spec/[^/]+$") or "services/%s"
local dir = here:match("^(.*)/[^/]+$") or "."
if dir:sub(1, 1) ~= "/" then dir = os.getenv("PWD") .. "/" .. dir end

describe("service %s", function()
  local broker
  setup(function() broker = Broker.start { services_dir = dir } end)
  teardown(function() broker:cleanup() end)

  it("passes forge check", function()
    local p = io.popen("build/bin/forge check " .. here .. " 2>&1")
    local out = p:read("a")
    assert.is_true(p:close(), out)
  end)

  it("provisions, binds, unbinds and deprovisions", function()
    local _, _, _, catalog = broker:call("GET", "/v2/catalog")
    local svc
    for _, s in ipairs(catalog.services) do if s.name == "%s" then svc = s end end
    assert.truthy(svc, "the service is in the catalog")
    local ids = { service_id = svc.id, plan_id = svc.plans[1].id }
    local status = broker:call("PUT", "/v2/service_instances/i1", { service_id = ids.service_id,
      plan_id = ids.plan_id, organization_guid = "o", space_guid = "s", parameters = { greeting = "hi" } })
    assert.equal(201, status, broker:read_log())
    local bstatus, _, _, bound = broker:call("PUT", "/v2/service_instances/i1/service_bindings/b1", ids)
    assert.equal(201, bstatus)
    assert.truthy(bound.credentials.password)
    local query = "?service_id=" .. ids.service_id .. "&plan_id=" .. ids.plan_id
    assert.equal(200, (broker:call("DELETE", "/v2/service_instances/i1/service_bindings/b1" .. query)))
    assert.equal(200, (broker:call("DELETE", "/v2/service_instances/i1" .. query)))
    assert.same({}, Broker.marked_pids(broker.state_dir))
  end)
end)
]==]

local function write_new(path, text)
  if lfs.attributes(path, "mode") then error(path .. " already exists", 0) end
  local f, err = io.open(path, "w")
  if not f then error("cannot create " .. path .. ": " .. tostring(err), 0) end
  f:write(text)
  f:close()
end

--- forge new <name> [--dir services]: scaffold a service that passes forge check at once.
function M.new(name, dir)
  dir = dir or "services"
  if not name or not name:match("^[a-z][a-z0-9%-]*$") or #name > 63 then
    complain("forge new: the name must be lowercase letters, digits and '-', starting with a letter")
    return 2
  end
  local root = dir .. "/" .. name
  if lfs.attributes(root, "mode") then
    complain("forge new: ", root, " already exists")
    return 1
  end
  local ok, err = pcall(function()
    for _, d in ipairs({ dir, root, root .. "/templates", root .. "/spec" }) do
      if not lfs.attributes(d, "mode") then assert(lfs.mkdir(d)) end
    end
    write_new(root .. "/service.lua", NEW_SERVICE:format(name, name, name, crypto.uuid(), name, crypto.uuid()))
    write_new(root .. "/templates/settings.yml", "# PLACEHOLDER: the server's default settings; deploy merges "
      .. "each instance's\n# own values (port, host, parameters) over them with forge.yaml.\ngreeting: hello\n")
    write_new(root .. "/README.md", "# " .. name .. "\n\nA service for Service Forge. Edit `service.lua`; "
      .. "`forge check services/" .. name .. "` validates it, `forge render " .. name .. " default` shows what a "
      .. "plan deploys. The running broker picks up every saved change.\n")
    write_new(root .. "/spec/" .. name .. "_spec.lua", NEW_SPEC:format(name, name, name, name))
  end)
  if not ok then
    complain("forge new: ", err)
    return 1
  end
  say("created ", root, " (service.lua, templates/, README.md, spec/)")
  return M.check(root)
end

return M
