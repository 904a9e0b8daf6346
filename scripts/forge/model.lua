--- The broker's records in the store: keys, JSON values, compare-and-swap updates.
--
-- Keys (flat, etcd-style):
--   instance/<id>            instance record (state, operation, deployment, resources, tombstone)
--   binding/<iid>/<bid>      binding record (state, credentials)
--   port/<nnnnn>             local-target port allocation -> instance id
--   pending/<id>             instance has an operation for the reconciler
--   gone/<id>                purged tombstone: last_operation still answers 410
-- Store failures raise a broker error {status=503, retryable=true}; callers answer it.
local util = require "forge.util"

local M = {}

M.key = {
  instance = function(id) return "instance/" .. id end,
  binding = function(iid, bid) return "binding/" .. iid .. "/" .. bid end,
  bindings = function(iid) return "binding/" .. iid .. "/" end,
  port = function(p) return string.format("port/%05d", p) end,
  pending = function(id) return "pending/" .. id end,
  gone = function(id) return "gone/" .. id end,
}

--- Raise a broker error that becomes an OSB error response.
function M.fail(status, code, description, extra)
  local e = { status = status, error = code, description = description }
  for k, v in pairs(extra or {}) do e[k] = v end
  error(setmetatable(e, { __tostring = function(x) return x.error .. ": " .. x.description end }), 0)
end

local function store_failed(err)
  M.fail(503, "ServiceUnavailable", "the broker's store is unavailable: " .. tostring(err and err.message or err),
    { retry_after = 2 })
end

--- Read and decode a record. Returns value, mod_revision | nil, 0 when absent.
function M.read(db, key)
  local kv, err = db:get(key)
  if err then store_failed(err) end
  if not kv then return nil, 0 end
  local v, derr = util.json_decode(kv.value)
  if v == nil then error("corrupt record " .. key .. ": " .. tostring(derr)) end
  return v, kv.mod_revision
end

--- Range of decoded records under a prefix: array of {key=, value=, rev=}.
function M.range(db, prefix, limit)
  local kvs, err = db:range(prefix, limit and { limit = limit } or nil)
  if not kvs then store_failed(err) end
  local out = {}
  for i, kv in ipairs(kvs) do
    out[i] = { key = kv.key, value = util.json_decode(kv.value) or kv.value, rev = kv.mod_revision }
  end
  return out
end

--- Apply a transaction; returns true if the compares held.
function M.txn(db, t)
  local ok, err = db:txn(t)
  if ok == nil then store_failed(err) end
  return ok
end

--- A put op for txn.
function M.put(key, value)
  return { op = "put", key = key, value = type(value) == "string" and value or util.json_encode(value) }
end

function M.delete(key) return { op = "delete", key = key } end

--- Read-modify-write with compare-and-swap, retried on conflict.
-- fn(record) changes the record in place and returns extra txn ops (or nil), or false to skip.
-- @return the stored record, or nil if absent or skipped
function M.update(db, key, fn)
  for _ = 1, 50 do
    local rec, rev = M.read(db, key)
    if not rec then return nil end
    local extra = fn(rec)
    if extra == false then return nil end
    local ops = { M.put(key, rec) }
    for _, op in ipairs(extra or {}) do ops[#ops + 1] = op end
    if M.txn(db, { compare = { { key = key, mod_revision = rev } }, success = ops }) then return rec end
  end
  error("could not update " .. key .. ": too much contention")
end

return M
