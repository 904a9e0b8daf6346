--- Open the broker's store as configured: the embedded SQLite file (default) or etcd v3.
-- Both give the same API (forge.store's db: get, range, put, delete, txn, revision, close).
local M = {}

--- @return db | nil, err
function M.open(config)
  if config.store == "etcd" then
    local e = config.etcd
    return require("forge.etcd").open { endpoints = e.endpoints, prefix = e.prefix, timeout_ms = e.timeout_ms,
      username = e.username, password = e.password, cacert = e.cacert, cert = e.cert, key = e.key }
  end
  return require("forge.store").open(config.state_dir .. "/forge.db")
end

--- A short description for logs (never credentials).
function M.describe(config)
  if config.store == "etcd" then
    return "etcd " .. table.concat(config.etcd.endpoints, ",") .. " prefix " .. config.etcd.prefix
  end
  return "sqlite " .. config.state_dir .. "/forge.db"
end

return M
