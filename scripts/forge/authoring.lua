--- The authoring commands: forge check, forge render, forge new, forge install.
--
-- Everything runs the service script in the same sandbox the broker uses, so what passes
-- here behaves the same when served.
local crypto = require "forge.crypto"
local lfs = require "lfs"
local services = require "forge.services"
local util = require "forge.util"
local yaml = require "forge.yaml"

local M = {}

local function say(...) io.stdout:write(...) io.stdout:write("\n") end
local function complain(...) io.stderr:write(...) io.stderr:write("\n") end

-- Sample parameters for a plan: each property's default, else its first example or enum value.
local function sample_parameters(plan)
  local s = plan.schemas and plan.schemas.service_instance and plan.schemas.service_instance.create
  local props = s and s.parameters and s.parameters.properties or {}
  local params = {}
  for name, p in pairs(props) do
    local v = p.default
    if v == nil and type(p.examples) == "table" then v = p.examples[1] end
    if v == nil and type(p.enum) == "table" then v = p.enum[1] end
    if v ~= nil then params[name] = v end
  end
  return params
end

-- Render one plan of svc as the local target would. Returns deployment, ctx | nil, message.
local function render(svc, plan, params)
  local count = 1
  if svc.script.ports then
    local n, err = services.call(svc, "ports", plan, params)
    count = math.tointeger(n)
    if not count or count < 1 then return nil, "ports() must return a positive integer" .. (err and (": " .. err) or "") end
  end
  local ports = {}
  for i = 1, count do ports[i] = 30000 + i - 1 end
  local ctx = { instance_id = "dry-run", plan = plan, parameters = params, context = {}, host = "127.0.0.1",
    ports = ports, dir = "/var/lib/forge/instances/dry-run", secrets = {}, templates = svc.templates }
  local deployment, err = services.call(svc, "deploy", ctx)
  if not deployment then return nil, err end
  if type(deployment) ~= "table" or type(deployment.processes) ~= "table" or #deployment.processes == 0 then
    return nil, "deploy must return {processes = {...}} with at least one process"
  end
  for i, p in ipairs(deployment.processes) do
    if type(p.name) ~= "string" or not p.name:match("^[%w][%w%-_%.]*$") then
      return nil, "processes[" .. i .. "].name must be a simple name"
    end
    if type(p.argv) ~= "table" or type(p.argv[1]) ~= "string" then
      return nil, "processes[" .. i .. "].argv must be a list of strings"
    end
  end
  return deployment, ctx
end

-- Check one loaded service: render every plan, bind and unbind on each. Returns problem list.
function M.check_service(svc)
  local problems = {}
  for _, plan in ipairs(svc.script.plans) do
    local params = sample_parameters(plan)
    local deployment, ctx = render(svc, plan, params)
    if not deployment then
      problems[#problems + 1] = string.format("plan %s: deploy: %s", plan.name, ctx)
    elseif plan.bindable ~= false and svc.script.bindable then
      local bctx = { instance_id = "dry-run", binding_id = "dry-run-binding", host = ctx.host, ports = ctx.ports,
        parameters = {}, secrets = ctx.secrets }
      local res, err = services.call(svc, "bind", bctx)
      if type(res) ~= "table" or type(res.credentials) ~= "table" then
        problems[#problems + 1] = string.format("plan %s: bind: %s", plan.name, err or "must return {credentials = {...}}")
      else
        bctx.binding = { id = "dry-run-binding", credentials = res.credentials }
        local ures, uerr = services.call(svc, "unbind", bctx)
        if type(ures) ~= "table" then
          problems[#problems + 1] = string.format("plan %s: unbind: %s", plan.name, uerr or "must return a table")
        end
      end
    end
  end
  return problems
end

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

--- forge check [dir]: load, validate, render every plan; non-zero exit on problems.
function M.check(path, limits)
  path = path or "services"
  if not lfs.attributes(path, "mode") then
    complain("forge check: ", path, ": no such directory")
    return 2
  end
  local dir, names = check_targets(path)
  local failed = 0
  for _, name in ipairs(names) do
    local src, rerr = services.read_folder(dir, name)
    local svc, err = nil, rerr
    if src then svc, err = services.build(src, limits) end
    if not svc then
      complain(err)
      failed = failed + 1
    else
      local problems = M.check_service(svc)
      for _, p in ipairs(problems) do complain("services/", name, "/service.lua: ", p) end
      if #problems > 0 then
        failed = failed + 1
      else
        say(string.format("ok  services/%s  %s, %d plan(s), version %s", name, svc.name, #svc.script.plans, svc.hash))
      end
      svc.sandbox:close()
    end
  end
  if #names == 0 then
    complain("forge check: no service found under ", path)
    return 1
  end
  say(string.format("%d service(s) checked, %d with problems", #names, failed))
  return failed == 0 and 0 or 1
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
  local deployment, err = render(svc, plan, params)
  if not deployment then
    complain("forge render: ", err)
    return 1
  end
  io.stdout:write("# dry run of ", svc.name, "/", plan.name, " (version ", svc.hash, "); secrets are samples\n")
  io.stdout:write(assert(yaml.encode({ service = svc.name, plan = plan.name, parameters = params,
    deployment = deployment })))
  return 0
end

local NEW_SERVICE = [==[
-- %s: a service for Service Forge (scaffolded by `forge new`).
--
-- The broker calls these hooks in a sandbox: only string/table/math/utf8 and the `forge`
-- capabilities (json, yaml, crypto, log). Check it with `forge check services/%s` and see what
-- a plan deploys with `forge render %s default`.
local crypto = forge.crypto

local service = {
  id = "%s",
  name = "%s",
  description = "A Redis cache (edit me)",
  bindable = true,
  tags = { "cache" },
  instances_retrievable = true,
  bindings_retrievable = true,
  plans = {
    {
      id = "%s",
      name = "default",
      description = "One Redis server",
      free = true,
      schemas = { service_instance = { create = { parameters = {
        ["$schema"] = "http://json-schema.org/draft-07/schema#",
        type = "object",
        additionalProperties = false,
        properties = { maxmemory_mb = { type = "integer", minimum = 16, maximum = 1024, default = 64 } },
      } } } },
    },
  },
}

local admin -- defined below, used by deploy's health check

-- Settings from templates/settings.yml, overridden by the instance's parameters.
local function settings(ctx)
  local base = ctx.templates and ctx.templates["settings.yml"] or "maxmemory_mb: 64\n"
  return assert(forge.yaml.merge({ base, ctx.parameters or {} }))
end

--- The processes of an instance: one redis-server on the first allocated port.
function service.deploy(ctx)
  local password = ctx.secret("admin_password")
  local conf = table.concat({
    "bind " .. ctx.host, "port " .. ctx.ports[1], "daemonize no", "dir " .. ctx.dir .. "/server",
    "save ''", "appendonly no", "maxmemory " .. settings(ctx).maxmemory_mb .. "mb",
    "aclfile " .. ctx.dir .. "/server/users.acl",
  }, "\n") .. "\n"
  return { processes = { {
    name = "server",
    argv = { "redis-server", ctx.dir .. "/server/redis.conf" },
    files = { ["server/redis.conf"] = conf },
    seed_files = { ["server/users.acl"] = "user default off\nuser admin on #" .. crypto.sha256_hex(password)
      .. " ~* &* +@all\n" },
    health = admin(ctx, { { "PING" } }, { "^PONG$" }),
  } } }
end

-- Commands the broker sends to the server itself (Redis protocol), as the admin user.
function admin(ctx, commands, expect)
  return { redis = { host = ctx.host, port = ctx.ports[1], user = "admin", password = ctx.secret("admin_password"),
    commands = commands, expect = expect } }
end

--- A binding: its own ACL user.
function service.bind(ctx)
  local user = "b-" .. crypto.sha256_hex(ctx.binding_id):sub(1, 20)
  local password = ctx.credentials and ctx.credentials.password or crypto.password(32)
  return {
    credentials = { host = ctx.host, port = ctx.ports[1], username = user, password = password },
    run = { admin(ctx, { { "ACL", "SETUSER", user, "reset", "on", "#" .. crypto.sha256_hex(password), "~*", "&*",
      "+@all", "-@admin" }, { "ACL", "SAVE" } }, { "^OK$", "^OK$" }) },
  }
end

function service.unbind(ctx)
  local user = "b-" .. crypto.sha256_hex(ctx.binding_id):sub(1, 20)
  return { run = { admin(ctx, { { "ACL", "DELUSER", user }, { "ACL", "SAVE" } }, { "^%%d+$", "^OK$" }) } }
end

return service
]==]

local NEW_SPEC = [==[
-- Checks services/%s with the forge binary: it loads, validates and renders every plan.
describe("service %s", function()
  it("passes forge check", function()
    local p = io.popen("build/bin/forge check services/%s 2>&1")
    local out = p:read("a")
    local ok = p:close()
    assert.is_true(ok, out)
  end)

  it("renders the default plan", function()
    local p = io.popen("build/bin/forge render %s default --services services 2>&1")
    local out = p:read("a")
    assert.is_true(p:close(), out)
    assert.matches("redis%%-server", out)
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
    write_new(root .. "/templates/settings.yml", "# defaults; parameters of an instance override them\n"
      .. "maxmemory_mb: 64\n")
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
