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
local broker, generation, limits

function M.init(config_json)
  local config = assert(util.json_decode(config_json))
  log.level(config.log_level)
  local db = assert(storage.open(config))
  limits = config.sandbox
  local registry
  registry, generation = services.load_published(db, limits)
  broker = Broker.new(config, db, registry, targets.new(config, config.state_dir))
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

function M.handle(req)
  refresh()
  return broker:handle(req)
end

return M
