--- Open the broker's store as configured: the embedded SQLite file (default) or etcd v3.
-- Both give the same API (forge.store's db: get, range, put, delete, txn, revision, close),
-- with every value sealed under the configured keyring (forge.secrets).
local secrets = require "forge.secrets"

local M = {}

local function open_raw(config)
  if config.store == "etcd" then
    local e = config.etcd
    return require("forge.etcd").open { endpoints = e.endpoints, prefix = e.prefix, timeout_ms = e.timeout_ms,
      username = e.username, password = e.password, cacert = e.cacert, cert = e.cert, key = e.key }
  end
  return require("forge.store").open(config.state_dir .. "/forge.db")
end

--- @return db (sealing) | nil, err (the store refused, or a key of the ring is missing or wrong)
function M.open(config)
  local ring, kerr = secrets.keyring(config)
  if not ring then return nil, kerr end
  local db, err = open_raw(config)
  if not db then return nil, err end
  local sealed = secrets.wrap(db, ring)
  -- before this process writes under its primary key, the store's usage record names it
  local ok, nerr = secrets.note_primary(sealed)
  if not ok then
    db:close()
    return nil, nerr
  end
  return sealed
end

--- A short description for logs (never credentials).
function M.describe(config)
  if config.store == "etcd" then
    return "etcd " .. table.concat(config.etcd.endpoints, ",") .. " prefix " .. config.etcd.prefix
  end
  return "sqlite " .. config.state_dir .. "/forge.db"
end

return M
