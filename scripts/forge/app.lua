--- The HTTP worker entry point: forge.http requires this module once per worker thread
-- state, calls init(config_json) once, then handle(req) for each request that thread serves.
--
-- Service versions: the worker loads the versions the main thread published in the store and
-- checks the published generation (one atomic read) before each request; when it moved, the
-- registry is swapped between requests, so a request finishes on the version it started with.
--
-- Replayed answers: an answer the broker marks replayable (req.replay: the catalog) goes out
-- with a ":replay" header naming the generation it was made on; forge.http then answers the
-- same request again itself until the published generation moves.
--
-- Sync operations: a request without accepts_incomplete does not block its worker until the
-- reconciler is done. Its handler answers with a wait (forge.osb.common.wait_for); handle turns
-- it into a forge.http wait, the connection is parked, and forge.http's waiter thread, in a
-- state of its own loaded like the workers' ones, calls poll until the wait ends.
local Broker = require "forge.broker"
local common = require "forge.osb.common"
local http = require "forge.http"
local log = require "forge.log"
local model = require "forge.model"
local proc = require "forge.proc"
local reload = require "forge.reload"
local services = require "forge.services"
local storage = require "forge.storage"
local targets = require "forge.targets"
local telemetry = require "forge.telemetry"
local util = require "forge.util"

local M = {}
local broker, generation, limits, config

-- Open the store and load the published services. A store that is unreachable (etcd down when
-- this worker starts) is retried on the next request instead of failing the worker for good.
local function connect()
  local db, err = storage.open(config)
  if not db then return nil, err end
  local ok, registry, gen = pcall(services.load_published, db, limits)
  if not ok then
    db:close()
    return nil, registry
  end
  generation = gen
  broker = Broker.new(config, db, registry, targets.new(config, config.state_dir))
  return true
end

function M.init(config_json)
  model.on_pending = http.kick -- the reconciler starts an operation at once, not at its next look
  config = assert(util.json_decode(config_json))
  log.level(config.log_level)
  limits = config.sandbox
  local ok, err = connect()
  if not ok then log.warn("worker started without its store; retrying on each request", { error = tostring(err) }) end
end

local function refresh()
  local published = reload.generation()
  if published == generation then return end
  local ok, registry, gen = pcall(services.load_published, broker.db, limits, broker.registry)
  if ok then
    broker.registry, generation = registry, gen
  else
    log.error("worker could not load the published services; keeping the previous ones", { error = tostring(registry) })
    generation = published
  end
end

local function unavailable(err)
  local e = type(err) == "table" and (err.description or err.message) or tostring(err)
  return 503, { ["Content-Type"] = "application/json", ["Retry-After"] = "2" },
    util.json_encode({ error = "ServiceUnavailable", description = "the broker's store is unavailable: " .. e })
end

-- What a parked request keeps for its answer (forge.broker's log lines, the version's shape of
-- the body, the request identity header): not its body, nor its credentials.
local function parked(req)
  local headers = {}
  for k, v in pairs(req.headers) do
    if k ~= "authorization" then headers[k] = v end
  end
  return { id = req.id, method = req.method, uri = req.uri, remote = req.remote, headers = headers }
end

-- A request answered: its route template, status and time since it arrived.
local function answered(route, method, status, started)
  telemetry.in_flight(-1)
  telemetry.request(route or "unmatched", method, status, proc.monotonic() - started)
end

function M.handle(req)
  local started = proc.monotonic()
  telemetry.in_flight(1)
  if not broker then
    local ok, err = connect()
    if not ok then
      local status, headers, body = require("forge.readiness").without_store(req, config, err)
      if not status then status, headers, body = unavailable(err) end
      answered(nil, req.method, status, started)
      return status, headers, body
    end
  end
  refresh()
  local status, headers, body = broker:handle(req)
  if status ~= common.WAIT then
    if req.replay and status == 200 then
      headers[":replay"] = { generation = generation, route = req.route, vary = req.replay.vary,
        unless = req.replay.unless }
    end
    answered(req.route, req.method, status, started)
    return status, headers, body
  end
  local p = parked(req)
  p.route, p.started = req.route, started
  return { wait = util.json_encode({ req = p, wait = body }), timeout = body.timeout }
end

--- A parked request's answer (forge.http calls it in its waiter state): nil while its operation
-- is in progress and `why` (nil, "timeout" or "stop") does not end the wait; else status, headers,
-- body, which forge.broker makes as for any request, with a route that settles the wait in place
-- of the request's own.
function M.poll(token, why)
  local p = assert(util.json_decode(token))
  if not broker then
    local ok, err = connect()
    if not ok then
      if not why then return nil end
      local status, headers, body = unavailable(err)
      answered(p.req.route, p.req.method, status, p.req.started)
      return status, headers, body
    end
  end
  local ok, final = pcall(common.poll_wait, broker.db, p.wait)
  if ok and final == nil and not why then return nil end
  local settle = setmetatable({ route = function()
    if not ok then error(final, 0) end
    return common.settle(p.wait, final, why)
  end }, { __index = broker })
  local status, headers, body = settle:handle(p.req)
  answered(p.req.route, p.req.method, status, p.req.started)
  return status, headers, body
end

return M
