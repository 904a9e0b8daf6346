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
local storage = require "forge.storage"
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

-- What a scan changes in the published set. With SQLite (one broker) the directory is the truth
-- at start; with etcd, replicas adopt the versions already in the store and publish only
-- services the store does not have. After that, every local edit (watch, SIGHUP) is published.
local function local_changes(config, scanned, local_hashes, published)
  local changes = {}
  for _, svc in ipairs(scanned.list) do
    local at_start = local_hashes == nil
    if (at_start and (config.store ~= "etcd" or not published[svc.folder]))
        or (not at_start and local_hashes[svc.folder] ~= svc.hash) then
      changes[svc.folder] = true
    end
  end
  for folder in pairs(local_hashes or (config.store ~= "etcd" and published) or {}) do
    if not scanned.by_folder[folder] then
      local broken = false
      for _, e in ipairs(scanned.errors) do broken = broken or e.service == folder end
      if not broken then changes[folder] = false end
    end
  end
  return changes
end

-- Scan the services directory (keeping running versions of unchanged or broken services),
-- publish what changed locally in the store, and load the published set.
-- @return registry, generation, local_hashes
local function sync_services(config, db, registry, local_hashes)
  local scanned = services.scan(config.services_dir, config.sandbox, registry,
    { local_cfg = config.targets["local"] })
  local _, current = services.published_generation(db)
  local changes = local_changes(config, scanned, local_hashes, current and current.services or {})
  services.publish(db, scanned, changes) -- also when nothing changed: the refused edits are news
  for _, e in ipairs(scanned.errors) do
    log.error("service refused", { service = e.service, error = e.message, kept_version = e.kept })
  end
  local hashes = {}
  for _, svc in ipairs(scanned.list) do hashes[svc.folder] = svc.hash end
  local loaded, generation = services.load_published(db, config.sandbox, scanned)
  reload.publish(generation)
  local versions = {}
  for _, svc in ipairs(loaded.list) do versions[svc.folder] = svc.hash end
  log.info("services loaded", { generation = generation, versions = versions, refused = #scanned.errors,
    dir = config.services_dir })
  return loaded, generation, hashes
end

-- Another replica (or forge install) published new versions: load them.
local function follow_store(config, db, registry, generation)
  local published = services.published_generation(db)
  if published <= generation then return registry, generation end
  local loaded, gen = services.load_published(db, config.sandbox, registry)
  reload.publish(gen)
  log.info("services follow the store", { generation = gen })
  return loaded, gen
end

-- The store, retried while it is unreachable (etcd may start after the broker).
local function open_store(config)
  local deadline = proc.monotonic() + 60
  while true do
    local db, err = storage.open(config)
    if db or not (err and err.retryable) or proc.monotonic() > deadline then return db, err end
    log.warn("store unavailable, retrying", { store = storage.describe(config), error = tostring(err) })
    proc.sleep(1)
  end
end

-- Services run as other users: they may pass through the state dir to their instance's own
-- directory, but not list it nor read the store (SQLite gives its WAL the database's mode).
local function close_state_dir(config)
  proc.chmod(config.state_dir, tonumber("711", 8))
  for _, suffix in ipairs({ "", "-wal", "-shm" }) do
    local path = config.state_dir .. "/forge.db" .. suffix
    if lfs.attributes(path, "mode") == "file" then proc.chmod(path, tonumber("600", 8)) end
  end
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
  local generated = not config.auth.password
  config.auth.password = config.auth.password or crypto.password(24)
  local ok, merr = mkdirs(config.state_dir)
  if not ok then
    io.stderr:write("forge serve: ", merr, "\n")
    return 1
  end
  local db, serr = open_store(config)
  if not db then
    io.stderr:write("forge serve: cannot open the store (", storage.describe(config), "): ", tostring(serr), "\n")
    return 1
  end
  close_state_dir(config)
  local registry, generation, local_hashes = sync_services(config, db, nil, nil)

  local reconciler = Reconciler.new(config, db, registry, targets.new(config, config.state_dir))
  for _, w in ipairs(reconciler.targets.by_name["local"]:isolation().warnings) do log.warn(w) end
  http.trap_signals()
  -- forge.broker's checks, made again in C before a body is read: the broker's and the admin
  -- credentials on every path but /healthz, the OSB version header under /v2
  local h = config.http
  local srv, herr = http.serve { listen = config.listen, handler = "forge.app", init = util.json_encode(config),
    threads = config.threads, body_limit = config.body_limit, header_timeout = h.header_timeout,
    request_timeout = h.request_timeout, max_connections = h.max_connections,
    max_connections_per_ip = h.max_connections_per_ip, max_buffered_bytes = h.max_buffered_bytes,
    auth = { realm = "forge", users = { config.auth, config.admin.password and config.admin or config.auth },
      public = { "/healthz" } },
    version = { header = "X-Broker-API-Version", major = 2, under = { "/v2" } } }
  if not srv then
    io.stderr:write("forge serve: ", tostring(herr), "\n")
    return 1
  end
  local host = config.listen:match("^(.*):%d+$")
  io.stdout:write(string.format("Service Forge listening on http://%s:%d (user %s, %s)\n", host, srv:port(),
    config.auth.username, generated and ("generated password " .. config.auth.password) or "password as configured"))
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
      local rok, new, gen, hashes = pcall(sync_services, config, db, registry, local_hashes)
      if rok then
        registry, generation, local_hashes = new, gen, hashes
        reconciler.registry = registry
      else
        log.error("service reload failed; the running versions stay", { error = tostring(new) })
      end
    end
    if proc.monotonic() >= next_tick then
      next_tick = proc.monotonic() + config.reconcile_interval
      local fok, freg, fgen = pcall(follow_store, config, db, registry, generation)
      if fok then
        registry, generation = freg, fgen
        reconciler.registry = registry
      end
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
