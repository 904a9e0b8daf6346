--- The forge command line: every subcommand of the forge binary lives here.
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
  status [--url URL]                    the service versions a running broker serves, refused edits
  bosh-sim [--help]                     run a simulated BOSH director (for authors and specs)
  version                               print the version
  help                                  this text; `forge COMMAND --help` for one command

Options of check/render/new/install: --services DIR (default: services_dir of ./forge.yml, else
./services), --config FILE.
Environment overrides: FORGE_LISTEN, FORGE_USER, FORGE_PASSWORD, FORGE_STATE_DIR,
FORGE_SERVICES_DIR, FORGE_PORTS (e.g. 30000-30999), FORGE_THREADS, FORGE_LOG_LEVEL.
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

function commands.serve(args)
  local opts, err = parse_options(args, 2, { config = "value", help = "flag" })
  if not opts then
    io.stderr:write("forge serve: ", err, "\n")
    return 2
  end
  if opts.help then
    io.write("usage: forge serve [--config FILE]\n")
    return 0
  end
  local path = opts.config or (file_exists("forge.yml") and "forge.yml" or nil)
  return require("forge.serve").run(path)
end

local HELP = {
  check = "usage: forge check [DIR] [--services DIR]\n  Load each service in the sandbox, validate its catalog entry, "
    .. "render every plan with\n  sample parameters and run bind/unbind; prints one line per problem (file: message).\n",
  render = "usage: forge render SERVICE PLAN [--params JSON] [--target NAME] [--services DIR]\n  Print the "
    .. "deployment a plan would run, as YAML: local processes, or with --target the BOSH manifest\n  for that "
    .. "configured director (--target sample: a sample network). Nothing is started or stored.\n",
  new = "usage: forge new NAME [--services DIR]\n  Scaffold DIR/NAME: service.lua with fresh GUIDs, templates/, "
    .. "README.md and a spec.\n",
  install = "usage: forge install PKG.tgz [--replace] [--services DIR] [--config FILE]\n"
    .. "  Check a .tgz holding one service folder (service.lua, templates/, ...) exactly as\n"
    .. "  `forge check` does, then move it into the services dir atomically (a running broker\n"
    .. "  loads it). Refuses path traversal, links out of the folder, special files, oversized\n"
    .. "  archives, and ids or service names used by another installed folder. File modes are\n"
    .. "  kept, minus group/other write and setuid/setgid/sticky bits.\n"
    .. "  --replace   replace an installed folder of the same name (atomically; the old version\n"
    .. "              is restored on failure)\n"
    .. "exit status: 0 installed, 1 refused (nothing was installed), 2 usage error or unreadable package\n",
}

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
  return require("forge.authoring").check(pos[1] or dir, limits, { local_cfg = config.targets["local"] })
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
    { replace = opts.replace, check = { local_cfg = config.targets and config.targets["local"] } })
end)

HELP.status = "usage: forge status [--url URL] [--config FILE]\n  Ask a running broker (GET /admin/services, admin "
  .. "credentials from the config or\n  FORGE_ADMIN_USER/FORGE_ADMIN_PASSWORD) which service versions it serves and "
  .. "which edits it refused.\n  Exit 1 when an edit was refused or the broker does not answer.\n"

authoring("status", 0, 0, function(_, opts, _, _, config)
  local admin = config.admin
  if not admin.password then
    io.stderr:write("forge status: no admin credentials configured (admin.password in the config, or "
      .. "FORGE_ADMIN_USER/FORGE_ADMIN_PASSWORD)\n")
    return 2
  end
  -- credentials go to curl through a private config file, never on its command line
  local cfg = os.tmpname()
  local f = assert(io.open(cfg, "w"))
  f:write(string.format('user = "%s:%s"\n', admin.username, admin.password))
  f:close()
  local url = (opts.url or ("http://" .. config.listen)) .. "/admin/services"
  local p = io.popen("curl -s -S --max-time 10 -K " .. cfg .. " '" .. url:gsub("'", "") .. "' 2>&1")
  local out = p:read("a")
  p:close()
  os.remove(cfg)
  local status = require("forge.util").json_decode(out)
  if type(status) ~= "table" or type(status.services) ~= "table" then
    io.stderr:write("forge status: no answer from ", url, ": ", out:sub(1, 300), "\n")
    return 1
  end
  io.write("generation ", tostring(status.generation), "\n")
  local iso = status.isolation or {}
  io.write("local target: isolation ", tostring(iso.mode), ", limits ", tostring(iso.limits), "\n")
  for _, w in ipairs(iso.warnings or {}) do io.write("  WARNING ", w, "\n") end
  for _, svc in ipairs(status.services) do
    io.write(string.format("  %-20s version %s  (%d plan(s))\n", svc.name, svc.version, svc.plans))
  end
  for _, e in ipairs(status.errors or {}) do
    io.write(string.format("  REFUSED %s: %s%s\n", e.service, e.message,
      e.kept_version and (" (still serving " .. e.kept_version .. ")") or ""))
  end
  return #(status.errors or {}) == 0 and 0 or 1
end)

commands["bosh-sim"] = function(args)
  return require("forge.boshsim").main({ table.unpack(args, 2) })
end

function commands.version()
  io.write("forge ", require("forge.http")._VERSION, "\n")
  return 0
end

function commands.help()
  io.write(USAGE)
  return 0
end
commands["--help"] = commands.help
commands["-h"] = commands.help

--- Run the command line; returns the exit status.
function M.main(args)
  local name = args[1]
  if not name then
    io.stderr:write(USAGE)
    return 2
  end
  local cmd = commands[name]
  if not cmd then
    io.stderr:write("forge: unknown command '", name, "'\n\n", USAGE)
    return 2
  end
  return cmd(args)
end

return M
