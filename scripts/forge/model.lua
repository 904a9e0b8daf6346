--- The broker's records in the store: keys, JSON values, compare-and-swap updates.
--
-- Keys (flat, etcd-style):
--   instance/<id>            instance record (state, operation, deployment, resources, tombstone)
--   binding/<iid>/<bid>      binding record (state, credentials)
--   port/<nnnnn>             local-target port allocation -> instance id
--   pending/<id>             instance has an operation for the reconciler
--   gone/<id>                purged tombstone: last_operation still answers 410
--   upgrades/<id>            a fleet upgrade run and the state of each of its instances (forge.upgrades)
--   upgrading/<id>           that run has not ended: the reconciler advances it
-- Store failures raise a broker error {status=503, retryable=true}; callers answer it.
local proc = require "forge.proc"
local telemetry = require "forge.telemetry"
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

-- The records of put ops on instance/ and binding/ keys (weak: they go with their op), so a
-- transaction that held tells forge.telemetry what is stored now without decoding it again.
local written = setmetatable({}, { __mode = "k" })

-- Binding ids under the delete_prefix ops of `t` (a deprovision drops all of an instance's).
local function doomed_bindings(db, t)
  local ids
  for _, op in ipairs(t.success or {}) do
    if op.op == "delete_prefix" and op.prefix:match("^binding/") then
      for _, kv in ipairs(db:range(op.prefix) or {}) do
        ids = ids or {}
        ids[#ids + 1] = kv.key
      end
    end
  end
  return ids
end

-- Move the tracked instances and bindings to what the transaction stored.
local function track(t, doomed)
  for _, op in ipairs(t.success or {}) do
    local k = op.key or ""
    local id = k:match("^instance/(.+)$")
    local iid, bid = k:match("^binding/([^/]+)/(.+)$")
    local rec = op.op == "put" and written[op] or nil
    if id and (op.op == "delete" or rec) then telemetry.instance(id, rec) end
    if iid and (op.op == "delete" or rec) then telemetry.binding(iid, bid, rec, rec and rec.service) end
  end
  for _, k in ipairs(doomed or {}) do
    local iid, bid = k:match("^binding/([^/]+)/(.+)$")
    if iid then telemetry.binding(iid, bid, nil) end
  end
end

--- Apply a transaction; returns true if the compares held, and the store revision after it
-- (the mod_revision of every key it put).
function M.txn(db, t)
  local doomed = doomed_bindings(db, t)
  local started = proc.monotonic()
  local ok, rev = db:txn(t)
  if ok == nil then store_failed(rev) end
  telemetry.txn(proc.monotonic() - started, ok)
  if ok then track(t, doomed) end
  return ok, rev
end

--- A put op for txn.
function M.put(key, value)
  local op = { op = "put", key = key, value = type(value) == "string" and value or util.json_encode(value) }
  if type(value) == "table" and (key:match("^instance/") or key:match("^binding/")) then written[op] = value end
  return op
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
