--- `forge serve`: load the config, start the HTTP workers, run the reconciler until a
-- SIGTERM/SIGINT, then stop gracefully (in-flight requests finish).
local Reconciler = require "forge.reconciler"
local config_mod = require "forge.config"
local crypto = require "forge.crypto"
local http = require "forge.http"
local lfs = require "lfs"
local log = require "forge.log"
local proc = require "forge.proc"
local reload = require "forge.reload"
local services = require "forge.services"
local store = require "forge.store"
local targets = require "forge.targets"
local util = require "forge.util"

local M = {}

local function mkdirs(path)
  local cur = ""
  for part in path:gmatch("[^/]+") do
    cur = cur .. "/" .. part
    if not lfs.attributes(cur, "mode") and not lfs.mkdir(cur) and not lfs.attributes(cur, "mode") then
      return nil, "cannot create " .. cur
    end
  end
  return true
end

-- Scan the services directory (keeping running versions of unchanged or broken services),
-- record the versions in the store, and publish a new generation for the workers.
local function load_services(config, db, previous, generation)
  local registry = services.attach(services.scan(config.services_dir, config.sandbox, previous), db,
    config.sandbox, previous)
  if not generation then
    local current = db:get(services.CURRENT_KEY)
    generation = current and (util.json_decode(current.value) or {}).generation or 0
  end
  generation = services.publish(db, registry, generation + 1)
  reload.publish(generation)
  for _, e in ipairs(registry.errors) do
    log.error("service refused", { service = e.service, error = e.message, kept_version = e.kept })
  end
  local versions = {}
  for _, svc in ipairs(registry.list) do versions[svc.folder] = svc.hash end
  log.info("services loaded", { generation = generation, versions = versions, refused = #registry.errors,
    dir = config.services_dir })
  return registry, generation
end

--- Run the broker with the config file at `path` (or defaults); returns the exit status.
function M.run(path)
  local config, err = config_mod.load(path)
  if not config then
    io.stderr:write("forge serve: ", err, "\n")
    return 2
  end
  log.level(config.log_level)
  -- no password configured: make one up and show it once on stdout (never in the log)
  config.auth.password = config.auth.password or crypto.password(24)
  local ok, merr = mkdirs(config.state_dir)
  if not ok then
    io.stderr:write("forge serve: ", merr, "\n")
    return 1
  end
  local db, serr = store.open(config.state_dir .. "/forge.db")
  if not db then
    io.stderr:write("forge serve: cannot open the store: ", tostring(serr), "\n")
    return 1
  end
  local registry, generation = load_services(config, db, nil)

  local reconciler = Reconciler.new(config, db, registry, targets.new(config, config.state_dir))
  http.trap_signals()
  local srv, herr = http.serve { listen = config.listen, handler = "forge.app", init = util.json_encode(config),
    threads = config.threads, body_limit = config.body_limit }
  if not srv then
    io.stderr:write("forge serve: ", tostring(herr), "\n")
    return 1
  end
  local host = config.listen:match("^(.*):%d+$")
  io.stdout:write(string.format("Service Forge listening on http://%s:%d (user %s, password %s)\n",
    host, srv:port(), config.auth.username, config.auth.password))
  io.stdout:flush()
  log.info("listening", { listen = config.listen, port = srv:port(), state_dir = config.state_dir })

  local watcher, werr = reload.watch(config.services_dir)
  if not watcher then log.warn("services are not watched; reload with SIGHUP", { error = tostring(werr) }) end
  local next_tick = 0
  while true do
    local sig = http.wait(0.05)
    if sig == "stop" then break end
    if sig == "reload" or (watcher and watcher:poll(0)) then
      if watcher then repeat until not watcher:poll(0.02) end -- let an editor finish writing
      local rok, new, gen = pcall(load_services, config, db, registry, generation)
      if rok then
        registry, generation = new, gen
        reconciler.registry = registry
      else
        log.error("service reload failed; the running versions stay", { error = tostring(new) })
      end
    end
    if proc.monotonic() >= next_tick then
      next_tick = proc.monotonic() + config.reconcile_interval
      local rok, rerr = pcall(reconciler.tick, reconciler, os.time())
      if not rok then log.error("reconciler pass failed", { error = tostring(rerr) }) end
    end
  end
  log.info("stopping", { in_flight = srv:active() })
  srv:stop(30)
  db:close()
  log.info("stopped")
  return 0
end

return M
