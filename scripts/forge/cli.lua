--- The forge command line: every subcommand of the forge binary lives here.
local M = {}

local USAGE = [[
usage: forge <command> [options]

commands:
  serve [--config FILE]    run the broker (default config: ./forge.yml if present)
  bosh-sim [--help]        run a simulated BOSH director (for authors and specs)
  version                  print the version
  help                     this text

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
