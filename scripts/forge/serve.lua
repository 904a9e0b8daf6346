--- `forge serve`: load the config, start the HTTP workers, run the reconciler until a
-- SIGTERM/SIGINT, then stop gracefully (in-flight requests finish). A store that does not
-- answer at start (etcd down) does not keep the broker from listening: /healthz answers,
-- /readyz and OSB requests answer 503, and the main loop opens the store once it answers.
local Reconciler = require "forge.reconciler"
local config_mod = require "forge.config"
local crypto = require "forge.crypto"
local http = require "forge.http"
local lfs = require "lfs"
local log = require "forge.log"
local proc = require "forge.proc"
local reload = require "forge.reload"
local secrets = require "forge.secrets"
local services = require "forge.services"
local storage = require "forge.storage"
local targets = require "forge.targets"
local util = require "forge.util"

local M = {}

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

-- Services run as other users: they may pass through the state dir to their instance's own
-- directory, but not list it nor read the store (SQLite gives its WAL the database's mode).
local function close_state_dir(config)
  proc.chmod(config.state_dir, tonumber("711", 8))
  for _, suffix in ipairs({ "", "-wal", "-shm" }) do
    local path = config.state_dir .. "/forge.db" .. suffix
    if lfs.attributes(path, "mode") == "file" then proc.chmod(path, tonumber("600", 8)) end
  end
end

local STORE_RETRY = 1          -- seconds between attempts to open a store that did not answer
local STORE_REPORT = 30        -- seconds between log lines about it

-- Open the store. One that does not answer (etcd down) or refuses leaves st.db nil: the main
-- loop tries again. @return nil | err (its reason)
local function try_store(st, now)
  st.next_store_try = now + STORE_RETRY
  local db, err = storage.open(st.config)
  st.db = db
  if db then return nil end
  if now >= (st.next_store_report or 0) then
    st.next_store_report = now + STORE_REPORT
    local fields = { store = storage.describe(st.config), error = tostring(err) }
    if err and err.retryable then
      log.warn("store unavailable, retrying; /readyz and OSB requests answer 503 until it answers", fields)
    else
      log.error("the store refused, retrying", fields)
    end
  end
  return err
end

-- What each plan of the loaded services goes to (the instance records keep their own).
local function plan_targets(registry, drivers)
  local map = {}
  for _, svc in ipairs(registry.list) do
    for _, plan in ipairs(svc.script.plans) do
      map[svc.name .. "/" .. plan.name] = drivers.claims[svc.name .. "/" .. plan.name] or drivers.claims[svc.name]
        or (svc.script.target_for and "target_for()") or plan.target or svc.script.target or drivers.default
    end
  end
  return map
end

local function sorted_pairs(map, fmt)
  local out = {}
  for k, v in pairs(map) do out[#out + 1] = string.format(fmt, k, v) end
  table.sort(out)
  return table.concat(out, ", ")
end

--- The start-up summary: one log line, and the same for a person on stdout.
local function summary(st, port)
  local c, registry = st.config, st.reconciler.targets
  local store = c.store == "etcd" and { kind = "etcd", endpoints = c.etcd.endpoints, prefix = c.etcd.prefix }
    or { kind = "sqlite", path = c.state_dir .. "/forge.db" }
  local target_list, versions = {}, {}
  for _, name in ipairs(registry:names()) do
    target_list[name] = name == "local" and "local" or ("bosh " .. c.targets[name].url)
  end
  for _, svc in ipairs(st.registry.list) do versions[svc.name] = svc.hash end
  local plans = plan_targets(st.registry, registry)
  local admin = c.admin.password and "on" or "off"
  log.info("started", { store = store, targets = target_list, plans = plans, services = versions,
    listen = c.listen, port = port, admin = admin, state_dir = c.state_dir })
  io.stdout:write("  store:    ", storage.describe(c), "\n",
    "  targets:  ", sorted_pairs(target_list, "%s (%s)"), "\n",
    "  plans:    ", sorted_pairs(plans, "%s -> %s"), "\n",
    "  services: ", sorted_pairs(versions, "%s %.8s"), "\n",
    "  admin API ", admin == "on" and ("on (user " .. c.admin.username .. ")") or "off (no admin.password)", "\n")
  io.stdout:flush()
end

-- With the store open: close the state dir, load the services, check the settings that name
-- them, and make the reconciler. @return true | nil, problems (config errors: the broker stops)
local function start_work(st)
  close_state_dir(st.config)
  local sealing, plain, first = secrets.check_store(st.db)
  if #sealing > 0 then return nil, sealing end
  if plain > 0 then
    log.warn("records in plain text (from before encryption); `forge rotate-key` seals them", { count = plain,
      first = first })
  end
  st.registry, st.generation, st.local_hashes = sync_services(st.config, st.db, nil, nil)
  local errors, warnings = config_mod.check_references(st.config, st.registry)
  if #errors > 0 then return nil, errors end
  for _, w in ipairs(warnings) do log.warn("config", { warning = w }) end
  st.reconciler = Reconciler.new(st.config, st.db, st.registry, targets.new(st.config, st.config.state_dir))
  st.reconciler.replica = st.replica
  for _, w in ipairs(st.reconciler.targets.by_name["local"]:isolation().warnings) do log.warn(w) end
  return true
end

-- Store endpoint failovers as the main thread's etcd handle sees them (the reconciler reads
-- every pass): an endpoint that goes down or comes back, another endpoint answering now.
local function log_failovers(st)
  if st.config.store ~= "etcd" then return end
  local now, before = st.db:endpoints(), st.endpoints
  st.endpoints = now
  if not before then return end
  local from
  for _, ep in ipairs(before) do if ep.current then from = ep.url end end
  for i, ep in ipairs(now) do
    local was = before[i]
    if was.up and not ep.up then
      log.warn("store endpoint down", { endpoint = ep.url, error = ep.last_error })
    elseif ep.up and not was.up then
      log.info("store endpoint up again", { endpoint = ep.url })
    end
    if ep.current and not was.current then log.warn("store failover", { from = from, to = ep.url }) end
  end
end

-- Open the store and, once it answers, start the work (services, reconciler).
-- @return true (started, or the store does not answer yet) | nil, exit status, problems
local function begin(st, now, at_start)
  local err = try_store(st, now)
  if not st.db then
    if at_start and not (err and err.retryable) then
      return nil, 1, { "cannot open the store (" .. storage.describe(st.config) .. "): " .. tostring(err) }
    end
    return true
  end
  local ok, started, problems = pcall(start_work, st)
  if not ok then            -- the store failed on the way (etcd lost a member meanwhile): again later
    log.warn("the store failed while the services loaded; retrying", { error = tostring(started) })
    st.db:close()
    st.db = nil
    return true
  end
  if not started then return nil, 2, problems end
  return true
end

-- A reload (watch or SIGHUP): scan again; a failure keeps the running versions.
local function reload_services(st)
  local ok, new, gen, hashes = pcall(sync_services, st.config, st.db, st.registry, st.local_hashes)
  if not ok then return log.error("service reload failed; the running versions stay", { error = tostring(new) }) end
  st.registry, st.generation, st.local_hashes = new, gen, hashes
  st.reconciler.registry = new
  local errors, warnings = config_mod.check_references(st.config, new)
  for _, w in ipairs(errors) do log.warn("config names what is not loaded", { problem = w }) end
  for _, w in ipairs(warnings) do log.warn("config", { warning = w }) end
end

-- After a burst of work, what it left is garbage in Lua and free memory glibc keeps in its
-- arenas (a broker that took 10,000 provisions held three times what a restarted one does):
-- give it back once the work is done.
local function release_heap()
  collectgarbage("collect")
  proc.trim_heap()
end

-- One reconciler pass, after following versions other replicas published.
local function reconcile(st)
  local fok, freg, fgen = pcall(follow_store, st.config, st.db, st.registry, st.generation)
  if fok then
    st.registry, st.generation = freg, fgen
    st.reconciler.registry = freg
  end
  local rok, busy = pcall(st.reconciler.tick, st.reconciler, os.time())
  if not rok then log.error("reconciler pass failed", { error = tostring(busy) }) end
  log_failovers(st)
  return not rok or busy
end

local function report_problems(problems)
  for _, p in ipairs(problems) do io.stderr:write("forge serve: ", p, "\n") end
end

-- The C layer's checks, made before a body is read: the broker's and the admin credentials on
-- every path but the public ones, the OSB version header under /v2. /metrics is public to it
-- when a bearer token may open it (forge.broker checks the token or the admin credentials).
local function listen(config, tls)
  local h = config.http
  local public = { "/healthz", "/readyz" }
  if config.metrics.token then public[#public + 1] = "/metrics" end
  return http.serve { listen = config.listen, handler = "forge.app", init = util.json_encode(config),
    threads = config.threads, body_limit = config.body_limit, header_timeout = h.header_timeout,
    request_timeout = h.request_timeout, max_connections = h.max_connections,
    max_connections_per_ip = h.max_connections_per_ip, max_buffered_bytes = h.max_buffered_bytes,
    auth = { realm = "forge", users = { config.auth, config.admin.password and config.admin or config.auth },
      public = public },
    version = { header = "X-Broker-API-Version", major = 2, under = { "/v2" } }, tls = tls,
    generation = reload.counter }
end

-- The certificate's facts for the log.
local function cert_fields(info)
  return { serial = info.serial, subject = info.subject, not_after = os.date("!%Y-%m-%dT%H:%M:%SZ", info.not_after) }
end

-- SIGHUP with HTTPS: read the certificate files again and swap them in for new connections (open
-- ones keep theirs). A set that does not load is logged; the running one stays.
local function reload_tls(config, srv)
  if not config.tls.cert then return end
  local pem, err = config_mod.tls_credentials(config)
  local info
  if pem then info, err = srv:reload_tls { cert = pem.cert, key = pem.key, client_ca = pem.client_ca } end
  if not info then
    return log.error("tls reload failed; the running certificate stays", { error = tostring(err) })
  end
  log.info("tls certificate reloaded", cert_fields(info))
end

-- Until SIGTERM/SIGINT: open the store while it does not answer (then start the work), reload
-- the services when they change, and run reconciler passes: every reconcile_interval while work
-- is in flight, else every supervise_interval, and at once (at most every reconcile_interval)
-- when a request stored an operation (forge.app kicks this thread). Between them the thread
-- sleeps: an idle broker wakes once per supervise_interval.
-- @return the exit status
local function loop(st, srv, watcher)
  local next_tick, last_pass = 0, -math.huge
  local interval, idle = st.config.reconcile_interval, st.config.supervise_interval
  while true do
    local wake = st.reconciler and next_tick or st.next_store_try
    local sig = http.wait(math.max(0, wake - proc.monotonic()), st.reconciler and watcher and watcher:fd())
    if sig == "stop" then return 0 end
    if sig == "reload" then reload_tls(st.config, srv) end
    local now = proc.monotonic()
    if not st.reconciler then
      if now >= st.next_store_try then
        local ok, code, problems = begin(st, now, false)
        if not ok then
          report_problems(problems)
          log.error("cannot start", { problems = problems })
          return code
        end
        if st.reconciler then summary(st, srv:port()) end
      end
    else
      if sig == "reload" or sig == "ready" then
        if watcher then repeat until not watcher:poll(0.02) end -- let an editor finish writing
        reload_services(st)
      end
      if sig == "kick" then next_tick = math.min(next_tick, last_pass + interval) end
      if now >= next_tick then
        last_pass = now
        local was_busy = st.busy
        st.busy = reconcile(st)
        if was_busy and not st.busy then release_heap() end
        next_tick = now + (st.busy and interval or idle)
      end
    end
  end
end

--- Run the broker with the config file at `path` (or defaults); returns the exit status:
-- 0 stopped by a signal, 1 cannot start (state dir, store refused, listen address), 2 bad config.
function M.run(path)
  local config, err = config_mod.load(path)
  if not config then
    io.stderr:write("forge serve: ", err, "\n")
    return 2
  end
  log.level(config.log_level)
  -- every log line of this process names the replica, the id its operation locks carry
  local st = { config = config, replica = crypto.token(8) }
  log.context({ replica = st.replica })
  -- no password configured: make one up and show it once on stdout (never in the log)
  local generated = not config.auth.password
  config.auth.password = config.auth.password or crypto.password(24)
  local tls, tls_info
  if next(config.tls) then
    tls, tls_info = config_mod.tls_credentials(config)
    if not tls then
      io.stderr:write("forge serve: ", tls_info, "\n")
      return 2
    end
  end
  local ok, merr = util.mkdirs(config.state_dir)
  if not ok then
    io.stderr:write("forge serve: ", merr, "\n")
    return 1
  end
  local ring, kerr = secrets.prepare(config)
  if not ring then
    io.stderr:write("forge serve: ", tostring(kerr), "\n")
    return 1
  end
  local started, code, problems = begin(st, proc.monotonic(), true)
  if not started then
    report_problems(problems)
    return code
  end

  http.trap_signals()
  local srv, herr = listen(config, tls)
  if not srv then
    io.stderr:write("forge serve: ", tostring(herr), "\n")
    return 1
  end
  local url = string.format("%s://%s:%d", tls and "https" or "http", config.listen:match("^(.*):%d+$"), srv:port())
  io.stdout:write(string.format("Service Forge listening on %s (user %s, %s, replica %s)\n", url,
    config.auth.username, generated and ("generated password " .. config.auth.password)
    or "password as configured", st.replica))
  io.stdout:flush()
  log.info("listening", { listen = config.listen, port = srv:port(), state_dir = config.state_dir, url = url,
    tls = tls_info and cert_fields(tls_info) })
  if st.reconciler then
    pcall(st.reconciler.start_up, st.reconciler)    -- serving already; the first pass retries a failure
    summary(st, srv:port())
  else
    io.stdout:write("  store:    ", storage.describe(config), " does not answer; retrying (/readyz: 503)\n")
    io.stdout:flush()
  end

  local watcher, werr = reload.watch(config.services_dir)
  if not watcher then log.warn("services are not watched; reload with SIGHUP", { error = tostring(werr) }) end
  local status = loop(st, srv, watcher)
  log.info("stopping", { in_flight = srv:active() })
  srv:stop(30)
  if st.db then st.db:close() end
  log.info("stopped")
  return status
end

return M
