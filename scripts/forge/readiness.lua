--- Readiness (GET /readyz): 200 only when this broker can do its work: the store answers a
-- read, and every configured target is reachable with its credentials (local: its instances
-- dir is writable, and the service user can reach it; BOSH: the director answers an
-- authenticated call). Otherwise 503 with each
-- check and the error of those that failed. /healthz stays the cheap liveness answer.
--
-- An answer is kept CACHE_SECONDS per worker state, so frequent probes cost nothing. Every
-- check has a short time limit of its own: a probe answers within seconds even when etcd has
-- lost its quorum (a read then hangs until the store's timeout) or a director does not answer.
local crypto = require "forge.crypto"
local proc = require "forge.proc"
local storage = require "forge.storage"
local util = require "forge.util"

local M = {}

local CACHE_SECONDS = 2
local PROBE_TIMEOUT_MS = 1500

local cached       -- {until_ = monotonic time, status =, body =}
local probe_db     -- this state's etcd handle for probes (opened on first use, with the short limit)
local registry     -- targets of a worker that has no broker yet (its store was down)

local function one_line(s) return (tostring(s):gsub("%s+", " ")) end

local function message(err) return one_line(type(err) == "table" and (err.message or err.description) or err) end

-- An etcd handle like the broker's, with the probe's time limit.
local function etcd_probe(config)
  if probe_db then return probe_db end
  local c = util.copy(config)
  c.etcd.timeout_ms = math.min(c.etcd.timeout_ms, PROBE_TIMEOUT_MS)
  local db, err = storage.open(c)
  if not db then return nil, err end
  probe_db = db
  return db
end

-- The store answers a read (a key nobody writes: absent is the answer).
local function check_store(b)
  local db, err = b.db, b.store_error
  if b.config.store == "etcd" then db, err = etcd_probe(b.config) end
  if not db then return message(err or "not connected") end
  local _, rerr = db:get("readyz")
  if rerr then return message(rerr) end
end

-- A file can be created in dir (the instances dir; the state dir until the first instance).
local function writable(dir, parent)
  local mode = require("lfs").attributes(dir, "mode")
  if not mode and parent then return writable(parent) end
  if mode ~= "directory" then return dir .. " is not a directory" end
  local path = dir .. "/.readyz-" .. crypto.token(6)
  local f, err = io.open(path, "w")
  if not f then return "cannot write in " .. dir .. ": " .. tostring(err) end
  f:close()
  os.remove(path)
end

local function check_target(b, driver)
  if driver.kind == "local" then return writable(driver.dir, b.config.state_dir) or driver:unreachable() end
  local ok, err = driver:probe(PROBE_TIMEOUT_MS)
  if not ok then return message(err) end
end

local function run_checks(b)
  local checks, ready = {}, true
  local function add(name, err)
    checks[#checks + 1] = { name = name, ok = err == nil, error = err }
    ready = ready and err == nil
  end
  add("store", check_store(b))
  for _, name in ipairs(b.targets:names()) do add("targets." .. name, check_target(b, b.targets.by_name[name])) end
  if ready then return 200, { status = "ready", checks = checks } end
  return 503, { status = "unavailable", checks = checks }
end

--- The readiness of broker `b` ({config, db, targets}, or {config, store_error} for a worker
-- without its store), cached for a few seconds.
-- @return status (200 | 503), body table {status = "ready" | "unavailable", checks = {{name, ok, error}}}
function M.check(b)
  local now = proc.monotonic()
  if cached and now < cached.until_ then return cached.status, cached.body end
  local status, body = run_checks(b)
  cached = { until_ = proc.monotonic() + CACHE_SECONDS, status = status, body = body }
  return status, body
end

--- What a worker that could not reach its store (err) answers: /healthz that it is alive,
-- /readyz 503 with the checks; nil for any other request (the caller answers 503).
-- @return status, headers, body | nil
function M.without_store(req, config, err)
  local path = req.uri:match("^[^?]*")
  local headers = { ["Content-Type"] = "application/json" }
  if path == "/healthz" then return 200, headers, util.json_encode({ status = "ok" }) end
  if path ~= "/readyz" then return nil end
  registry = registry or require("forge.targets").new(config, config.state_dir)
  local status, body = M.check({ config = config, targets = registry, store_error = err })
  return status, headers, util.json_encode(body)
end

return M
