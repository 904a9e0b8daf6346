--- The HTTP worker entry point: forge.http requires this module once per worker thread
-- state, calls init(config_json) once, then handle(req) for each request that thread serves.
--
-- Service versions: the worker loads the versions the main thread published in the store and
-- checks the published generation (one atomic read) before each request; when it moved, the
-- registry is swapped between requests, so a request finishes on the version it started with.
local Broker = require "forge.broker"
local log = require "forge.log"
local reload = require "forge.reload"
local services = require "forge.services"
local storage = require "forge.storage"
local targets = require "forge.targets"
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

function M.handle(req)
  if not broker then
    local ok, err = connect()
    if not ok then return unavailable(err) end
  end
  refresh()
  return broker:handle(req)
end

return M
