--- The HTTP worker entry point: forge.http requires this module once per worker thread
-- state, calls init(config_json) once, then handle(req) for each request that thread serves.
local Broker = require "forge.broker"
local Local = require "forge.targets.local"
local log = require "forge.log"
local services = require "forge.services"
local store = require "forge.store"
local util = require "forge.util"

local M = {}
local broker

function M.init(config_json)
  local config = assert(util.json_decode(config_json))
  log.level(config.log_level)
  local db = assert(store.open(config.state_dir .. "/forge.db"))
  local registry = services.load(config.services_dir)
  broker = Broker.new(config, db, registry, Local.new(config.targets["local"], config.state_dir))
end

function M.handle(req)
  return broker:handle(req)
end

return M
