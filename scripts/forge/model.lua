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
--   manifest/<id>            an instance's rendered BOSH manifest (M.manifest), kept out of the
--                            record so what last_operation, bind and the reconciler read stays small
-- and the reconciler's indexes, written by txn in the same transaction as the record they
-- follow, so housekeeping reads only what is due, never everything stored:
--   due/tombstone/<t>/<key>  a deleted instance or binding record, deleted at t
--   due/gone/<t>/<id>        a gone/ marker of a record deleted at t
--   due/port/<t>/<nnnnn>     a port held by an outsider until t
--   creating/<iid>/<bid>     a sync bind in flight (undone if its broker died)
--   supervised/<id>          a running instance with local processes
-- An index entry may outlive what it points at (the record was re-created, the bind ended by
-- a delete_prefix): its reader checks the record and drops the entry.
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
  manifest = function(id) return "manifest/" .. id end,
  creating = function(iid, bid) return "creating/" .. iid .. "/" .. bid end,
  supervised = function(id) return "supervised/" .. id end,
  due = function(kind, t, rest) return string.format("due/%s/%012d/%s", kind, math.floor(t), rest) end,
}

--- The prefix of index `kind` (due/tombstone/, ...); its keys sort by time.
function M.due_prefix(kind) return "due/" .. kind .. "/" end

--- Parse a due/ key: time, the rest (a record key, an id or a port).
function M.parse_due(k)
  local t, rest = k:match("^due/[^/]+/(%d+)/(.+)$")
  return tonumber(t), rest
end

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

--- Call fn({key=, value=, rev=}) for every record under a prefix (decoded), a page at a time.
function M.each(db, prefix, fn)
  local ok, err = util.each_kv(db, prefix, function(kv)
    fn({ key = kv.key, value = util.json_decode(kv.value) or kv.value, rev = kv.mod_revision })
  end)
  if not ok then store_failed(err) end
end

-- The records of put ops on instance/, binding/, gone/ and port/ keys (weak: they go with their op), so a
-- transaction that held tells forge.telemetry what is stored now without decoding it again.
local written = setmetatable({}, { __mode = "k" })
local manifests = setmetatable({}, { __mode = "k" })   -- put op of an instance record -> put op of its manifest

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
  local pending = false
  for _, op in ipairs(t.success or {}) do
    local k = op.key or ""
    pending = pending or (op.op == "put" and k:sub(1, 8) == "pending/")
    local id = k:match("^instance/(.+)$")
    local iid, bid = k:match("^binding/([^/]+)/(.+)$")
    local rec = op.op == "put" and written[op] or nil
    if id and (op.op == "delete" or rec) then
      telemetry.instance(id, rec)
      if M.on_instance then M.on_instance(id, rec) end
    end
    if iid and (op.op == "delete" or rec) then telemetry.binding(iid, bid, rec, rec and rec.service) end
  end
  for _, k in ipairs(doomed or {}) do
    local iid, bid = k:match("^binding/([^/]+)/(.+)$")
    if iid then telemetry.binding(iid, bid, nil) end
  end
  if pending and M.on_pending then M.on_pending() end
end

local function sync_bind_in_flight(rec)
  return rec.state == "creating" and not (type(rec.operation) == "table" and rec.operation.async)
end

-- The index ops that follow one op of a transaction (see the key list at the top).
function M.index_ops(op, rec, out)
  local k = op.key or ""
  local kind, rest = k:match("^(%a+)/(.+)$")
  if op.op == "delete_prefix" and op.prefix:match("^binding/") then
    out[#out + 1] = { op = "delete_prefix", prefix = "creating/" .. op.prefix:sub(#"binding/" + 1) }
  elseif kind == "binding" and not (rec and sync_bind_in_flight(rec)) then
    out[#out + 1] = M.delete("creating/" .. rest)
  end
  if kind == "instance" and (op.op == "delete" or (rec and rec.state == "deleted")) then
    out[#out + 1] = M.delete(M.key.manifest(rest))
  end
  if op.op ~= "put" or type(rec) ~= "table" then return out end
  if (kind == "instance" or kind == "binding") and rec.state == "deleted" then
    out[#out + 1] = M.put(M.key.due("tombstone", rec.deleted_at or os.time(), k), "")
  elseif kind == "binding" and sync_bind_in_flight(rec) then
    out[#out + 1] = M.put("creating/" .. rest, "")
  elseif kind == "instance" and rec.state == "running" and type(rec.processes) == "table" and next(rec.processes) then
    out[#out + 1] = M.put(M.key.supervised(rest), "")
  elseif kind == "gone" then
    out[#out + 1] = M.put(M.key.due("gone", rec.deleted_at or os.time(), rest), "")
  elseif kind == "port" and rec.outsider then
    out[#out + 1] = M.put(M.key.due("port", rec.until_ or 0, rest), "")
  end
  return out
end

-- `t` with the index ops of its success ops added.
local function indexed(t)
  local ops = {}
  for _, op in ipairs(t.success or {}) do
    ops[#ops + 1] = op
    ops[#ops + 1] = manifests[op]
    M.index_ops(op, written[op], ops)
  end
  return { compare = t.compare, success = ops, failure = t.failure }
end

--- M.on_instance(id, rec | nil), when set, hears of each instance record this state's
-- transactions stored (the reconciler schedules supervision with it).
M.on_instance = nil

--- M.on_pending(), when set, hears that a transaction of this state stored an operation for the
-- reconciler (a pending/ key): forge.app wakes the main thread with it.
M.on_pending = nil

--- Apply a transaction; returns true if the compares held, and the store revision after it
-- (the mod_revision of every key it put).
function M.txn(db, t)
  local doomed = doomed_bindings(db, t)
  local started = proc.monotonic()
  local ok, rev = db:txn(indexed(t))
  if ok == nil then store_failed(rev) end
  telemetry.txn(proc.monotonic() - started, ok)
  if ok then track(t, doomed) end
  return ok, rev
end

--- The rendered manifest of instance `id` (text), or nil.
function M.manifest(db, id)
  local kv, err = db:get(M.key.manifest(id))
  if err then store_failed(err) end
  return kv and kv.value
end

-- The JSON of an instance record without its manifest, and a put op of the manifest's own key.
local function split_manifest(key, rec)
  local manifest = rec.manifest
  rec.manifest = nil
  local text = util.json_encode(rec)
  rec.manifest = manifest
  return text, { op = "put", key = M.key.manifest(key:sub(#"instance/" + 1)), value = manifest }
end

--- A put op for txn. An instance record's manifest goes to its own key in the same transaction.
function M.put(key, value)
  if type(value) == "table" and value.manifest and value.state ~= "deleted" and key:match("^instance/") then
    local text, side = split_manifest(key, value)
    local op = { op = "put", key = key, value = text }
    written[op], manifests[op] = value, side
    return op
  end
  local op = { op = "put", key = key, value = type(value) == "string" and value or util.json_encode(value) }
  if type(value) == "table" and (key:match("^instance/") or key:match("^binding/") or key:match("^gone/")
      or key:match("^port/")) then
    written[op] = value
  end
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
