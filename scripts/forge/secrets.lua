--- Secrets at rest (docs/security.md): the keyring and the sealing store.
--
-- Every value the broker writes to its store is sealed with AES-256-GCM (forge.crypto.seal)
-- under the keyring's primary key, with the record's key as associated data, so a value copied
-- to another key does not open. What is stored is an envelope:
--   {"sealed":1,"kid":"<key id>","data":"<base64 of nonce | ciphertext | tag>"}
-- Reads open it with whichever key of the ring the envelope names. Sealing wraps the store
-- handle (M.wrap), so every reader and writer (forge.model, the admin API, telemetry, quotas,
-- backups, published services) goes through it without knowing.
--
-- The ring: `encryption: {keys: [{id:, file: | env:}], primary: ID}` in forge.yml; else the
-- one key in $FORGE_ENCRYPTION_KEY (id "env"); else <state_dir>/forge.key (id "generated"),
-- which `forge serve` makes at first start. A key is 32 random bytes, written in base64.
local crypto = require "forge.crypto"
local lfs = require "lfs"
local log = require "forge.log"
local proc = require "forge.proc"
local util = require "forge.util"

local M = {}

local KEY_FILE = "forge.key"
local JOB_KEY = "keyrotation/job"     -- the `forge rotate-key` job: primary, cursor, counts
local USAGE_KEY = "keyring/usage"      -- the key ids stored values may be sealed under (see read_usage)
local ENV_KEY = "FORGE_ENCRYPTION_KEY"
local ID_PATTERN = "^[%w][%w%-_%.]*$"
local HEAD, MIDDLE, TAIL = '{"sealed":1,"kid":"', '","data":"', '"}'

-- The key id and base64 data of a sealed envelope, or nil for a value in plain text. Found
-- with plain finds: a pattern over the data would cost more than opening it (the base64
-- decoder checks the data's characters).
local function envelope(value)
  if value:sub(1, #HEAD) ~= HEAD or value:sub(-#TAIL) ~= TAIL then return nil end
  local m = value:find(MIDDLE, #HEAD + 1, true)
  if not m then return nil end
  local kid = value:sub(#HEAD + 1, m - 1)
  local data = value:sub(m + #MIDDLE, -#TAIL - 1)
  if not kid:find("^[%w%-_%.]+$") or data:find('"', 1, true) then return nil end
  return kid, data
end

local function failure(code, message)
  return setmetatable({ code = code, message = message, retryable = false },
    { __tostring = function(e) return e.message end })
end

--- Check the `encryption` section (already shaped by forge.config's schema: keys is a list of
-- {id, file, env}, primary a string). @return the section, primary filled in | nil, message
function M.check_config(e, p)
  if not e.keys or #e.keys == 0 then return nil, p .. ".keys must list at least one key" end
  local seen = {}
  for i, k in ipairs(e.keys) do
    local kp = p .. ".keys[" .. i .. "]"
    if type(k.id) ~= "string" or not k.id:match(ID_PATTERN) then
      return nil, kp .. ".id must use letters, digits, '-', '_' and '.'"
    end
    if seen[k.id] then return nil, kp .. ": duplicate key id '" .. k.id .. "'" end
    seen[k.id] = true
    if (k.file == nil) == (k.env == nil) then
      return nil, kp .. " needs one of file (a path) or env (an environment variable's name)"
    end
  end
  e.primary = e.primary or (#e.keys == 1 and e.keys[1].id or nil)
  if not seen[e.primary] then return nil, p .. ".primary must be the id of one of " .. p .. ".keys" end
  return e
end

-- The keys the config names, and the primary's id.
local function key_list(config, getenv)
  if config.encryption then return config.encryption.keys, config.encryption.primary end
  if (getenv(ENV_KEY) or "") ~= "" then return { { id = "env", env = ENV_KEY } }, "env" end
  return { { id = "generated", file = config.state_dir .. "/" .. KEY_FILE } }, "generated"
end

local function decode_key(text, what)
  local raw = crypto.base64_decode((text:gsub("%s+", "")))
  if not raw or #raw ~= 32 then
    return nil, what .. " must hold 32 random bytes in base64 (44 characters, as `openssl rand -base64 32` writes)"
  end
  return raw
end

local function load_key(k, getenv)
  local what = "encryption key '" .. k.id .. "' (" .. (k.env and ("$" .. k.env) or k.file) .. ")"
  local text = k.env and getenv(k.env) or k.file and util.read_file(k.file)
  if not text or text == "" then
    return nil, what .. (k.env and " is not set" or " cannot be read (missing or not readable by this user)")
  end
  return decode_key(text, what)
end

--- The keyring of the config: {keys = {id = 32 bytes}, ids = {in config order}, primary = id}.
-- @param getenv optional function(name) (default os.getenv)
-- @return ring | nil, err (a key is missing, unreadable or not 32 bytes)
function M.keyring(config, getenv)
  getenv = getenv or os.getenv
  local list, primary = key_list(config, getenv)
  local ring = { keys = {}, ids = {}, primary = primary }
  for i, k in ipairs(list) do
    local raw, err = load_key(k, getenv)
    if not raw then return nil, failure("secrets.key", err) end
    ring.keys[k.id], ring.ids[i] = raw, k.id
  end
  return ring
end

-- Write a new random key to path, mode 0600 before it holds anything, hard-linked into place:
-- of two brokers starting at once on one state dir, the second keeps the first one's key.
-- @return true (written), false (there was one already) | nil, message
local function generate_key(path)
  local tmp = path .. ".tmp." .. proc.getpid()
  local f, err = io.open(tmp, "w")
  if not f then return nil, err end
  local ok, cerr = proc.chmod(tmp, tonumber("600", 8))
  if ok then ok, cerr = f:write(crypto.base64_encode(assert(crypto.random_bytes(32))), "\n") end
  f:close()
  local linked
  if ok then linked, cerr = lfs.link(tmp, path) end
  os.remove(tmp)
  if linked then return true end
  if ok and lfs.attributes(path) then return false end
  return nil, cerr
end

--- At `forge serve`'s start: make <state_dir>/forge.key when no key is configured and there is
-- none yet (and log that), then load the ring. @return ring | nil, err
function M.prepare(config)
  local list = key_list(config, os.getenv)
  local path = list[1].file
  if not config.encryption and path and not lfs.attributes(path) then
    local made, err = generate_key(path)
    if made == nil then return nil, failure("secrets.key", "cannot write " .. path .. ": " .. tostring(err)) end
    if made then
      log.info("generated an encryption key for the store (keep it: without it the store cannot be read)",
        { file = path })
    end
  end
  local ring, err = M.keyring(config)
  if ring then log.info("store values are sealed (AES-256-GCM)", { primary_key = ring.primary, keys = ring.ids }) end
  return ring, err
end

--- The key id a stored value is sealed under, or nil for a value in plain text.
function M.kid(value)
  return (envelope(value))
end

--- Seal `value` for store key `key` under the ring's primary key. @return the envelope
function M.seal(ring, key, value)
  local blob = assert(crypto.seal(ring.keys[ring.primary], value, key))
  return string.format('{"sealed":1,"kid":"%s","data":"%s"}', ring.primary, crypto.base64_encode(blob))
end

--- Open a stored value of store key `key` (a value in plain text, written before sealing, is
-- returned as it is). @return plain text | nil, err ("secrets.unknown_key", "secrets.open")
function M.open(ring, key, value)
  local kid, data = envelope(value)
  if not kid then return value end
  local k = ring.keys[kid]
  if not k then
    return nil, failure("secrets.unknown_key", key .. " is sealed under encryption key '" .. kid
      .. "', which the keyring does not hold")
  end
  local blob, err = crypto.base64_decode(data)
  local plain
  if blob then plain, err = crypto.open(k, blob, key) end
  if not plain then
    return nil, failure("secrets.open", "cannot open " .. key .. " with encryption key '" .. kid .. "': "
      .. err.message)
  end
  return plain
end

--- A table sealed for a file outside the store (a backup's manifest), `aad` naming what it
-- belongs to. @return {sealed = 1, kid =, data = base64}
function M.seal_table(ring, aad, t)
  local blob = assert(crypto.seal(ring.keys[ring.primary], util.json_encode(t), aad))
  return { sealed = 1, kid = ring.primary, data = crypto.base64_encode(blob) }
end

--- The table M.seal_table sealed (a table that is not sealed, from before, as it is).
-- @return table | nil, err
function M.open_table(ring, aad, v)
  if type(v) ~= "table" or v.sealed ~= 1 then return v end
  local text, err = M.open(ring, aad, string.format('{"sealed":1,"kid":"%s","data":"%s"}', v.kid, v.data))
  if not text then return nil, err end
  return util.json_decode(text)
end

-- ------------------------------------------------------------------------------------------
-- The sealing store: forge.store's / forge.etcd's db API, values sealed on the way in and
-- opened on the way out (put, txn, batch; get, range). Other methods (revision, close, backup,
-- endpoints, leases) go to the store handle as they are.

local Sealed = {}

-- Open every kv of a get/range answer in place. @return kvs | nil, err
local function open_all(ring, kvs)
  for _, kv in ipairs(kvs) do
    local plain, err = M.open(ring, kv.key, kv.value)
    if not plain then return nil, err end
    kv.value = plain
  end
  return kvs
end

function Sealed:get(key, ...)
  local kv, err = self.raw:get(key, ...)
  if not kv then return kv, err end
  local plain, oerr = M.open(self.ring, key, kv.value)
  if not plain then return nil, oerr end
  kv.value = plain
  return kv
end

function Sealed:range(prefix, ...)
  local kvs, err = self.raw:range(prefix, ...)
  if not kvs then return nil, err end
  return open_all(self.ring, kvs)
end

function Sealed:put(key, value, ...)
  if type(key) ~= "string" or type(value) ~= "string" then
    error("usage: db:put(key, value [, opts]): key and value must be strings", 2)
  end
  return self.raw:put(key, M.seal(self.ring, key, value), ...)
end

-- A copy of ops with every put's value sealed (the caller's ops stay as they are).
local function seal_ops(ring, ops)
  if not ops then return nil end
  local out = {}
  for i, op in ipairs(ops) do
    if op.op == "put" and type(op.key) == "string" and type(op.value) == "string" then
      op = { op = "put", key = op.key, value = M.seal(ring, op.key, op.value), lease = op.lease }
    end
    out[i] = op
  end
  return out
end

-- A copy of txn table t with its puts sealed; raises (at level) on a value compare.
local function sealed_txn(ring, t, what, level)
  for _, c in ipairs(t.compare or {}) do
    if c.value ~= nil then error(what .. ": a sealed store cannot compare values (compare mod_revision)", level + 1) end
  end
  return { compare = t.compare, success = seal_ops(ring, t.success), failure = seal_ops(ring, t.failure) }
end

function Sealed:txn(t)
  if type(t) ~= "table" then return self.raw:txn(t) end
  return self.raw:txn(sealed_txn(self.ring, t, "db:txn", 2))
end

--- db:batch (forge.store only): every txn of the list sealed as db:txn seals one.
function Sealed:batch(list)
  if type(list) ~= "table" then return self.raw:batch(list) end
  local out = {}
  for i, t in ipairs(list) do out[i] = type(t) == "table" and sealed_txn(self.ring, t, "db:batch", 2) or t end
  return self.raw:batch(out)
end

local sealed_mt = {
  __index = function(self, name)
    local m = Sealed[name]
    if m then return m end
    local f = self.raw[name]
    if type(f) ~= "function" then return f end
    local bound = function(_, ...) return f(self.raw, ...) end
    rawset(self, name, bound)
    return bound
  end,
  __tostring = function(self) return "sealed " .. tostring(self.raw) end,
  __close = function(self) self.raw:close() end,
}

--- Wrap a store handle so that values are sealed with `ring`. db.raw is the store as it is.
function M.wrap(db, ring)
  return setmetatable({ raw = db, ring = ring }, sealed_mt)
end

-- ------------------------------------------------------------------------------------------
-- Start-up check and key rotation

--- What the stored values are sealed under: {by_kid = {id = {count, first = key}}, plain = n,
-- plain_first = key}. @param db a sealed store @return summary | nil, err
function M.census(db)
  local s = { by_kid = {}, plain = 0 }
  -- paged: a start-up read of the whole store at once held all of it in memory
  local ok, err = util.each_kv(db.raw, "", function(kv)
    if kv.key == USAGE_KEY then return end
    local kid = M.kid(kv.value)
    if kid then
      local c = s.by_kid[kid] or { count = 0, first = kv.key, value = kv.value }
      c.count = c.count + 1
      s.by_kid[kid] = c
    else
      s.plain = s.plain + 1
      s.plain_first = s.plain_first or kv.key
    end
  end)
  if not ok then return nil, err end
  return s
end

-- The usage record (USAGE_KEY, plain JSON: key ids and sealed probes, no secret) lists every
-- key id a stored value may be sealed under, each with a probe (a value sealed under it and the
-- store key it was sealed for), so a start checks the ring against it instead of reading every
-- value. Every process that opens the store notes its primary there before it writes
-- (M.note_primary); a record that is not `complete` (noted before any census) makes the next
-- start count the store once and complete it; `forge rotate-key` sets it to what its census
-- found. @return record | false (none, or unreadable), mod_revision (0: none) | nil, err
local function read_usage(db)
  local kv, err = db.raw:get(USAGE_KEY)
  if err then return nil, err end
  if not kv then return false, 0 end
  local u = util.json_decode(kv.value)
  if type(u) ~= "table" or type(u.kids) ~= "table" then return false, kv.mod_revision end
  return u, kv.mod_revision
end

-- Write usage record u if the stored one is still at revision rev. @return true | false | nil, err
local function write_usage(db, u, rev)
  return db.raw:txn { compare = { { key = USAGE_KEY, mod_revision = rev } },
    success = { { op = "put", key = USAGE_KEY, value = util.json_encode(u) } } }
end

local function primary_probe(ring)
  local key = "keyring/probe/" .. ring.primary
  return { key = key, value = M.seal(ring, key, "probe") }
end

--- Note the ring's primary in the usage record (before this process writes under it).
-- @param db a sealed store @return true | nil, err
function M.note_primary(db)
  while true do
    local u, rev = read_usage(db)
    if u == nil then return nil, rev end
    if u and u.kids[db.ring.primary] then return true end
    u = u or { kids = {}, complete = false }
    u.kids[db.ring.primary] = primary_probe(db.ring)
    local ok, err = write_usage(db, u, rev)
    if ok == nil then return nil, err end
    if ok then return true end
  end
end

-- The complete usage record of census s: each key id found, with its first value as the probe.
local function usage_of(s)
  local u = { kids = {}, complete = true, plain = s.plain, plain_first = s.plain_first }
  for kid, c in pairs(s.by_kid) do u.kids[kid] = { key = c.first, value = c.value } end
  return u
end

-- Count the store and record what it found, with what processes noted meanwhile.
-- @return the complete record
local function complete_usage(db)
  while true do
    local first, rev0 = read_usage(db)
    if first == nil then error(rev0, 0) end
    local s, err = M.census(db)
    if not s then error(err, 0) end
    local noted, rev = read_usage(db)
    if noted == nil then error(rev, 0) end
    local u = usage_of(s)
    for kid, probe in pairs(noted and noted.kids or {}) do u.kids[kid] = u.kids[kid] or probe end
    if rev == rev0 then
      local ok, werr = write_usage(db, u, rev)
      if ok == nil then error(werr, 0) end
      if ok then return u end
    end
  end
end

--- Check at start that the ring opens the store: every key id a value may be sealed under (the
-- usage record; counted once when there is none) is in the ring and opens its probe. Plain-text
-- values (a store from before sealing) are reported for `forge rotate-key`. @param db a sealed store
-- @return problems (list of messages, empty when fine), plain (count of values in plain text), first
function M.check_store(db)
  local u, rev = read_usage(db)
  if u == nil then error(rev, 0) end
  if not (u and u.complete) then u = complete_usage(db) end
  local problems = {}
  for _, kid in ipairs(util.sorted_keys(u.kids)) do
    local probe = u.kids[kid]
    if not db.ring.keys[kid] then
      problems[#problems + 1] = string.format("stored records, e.g. %s, are sealed under encryption key '%s', "
        .. "which the keyring does not hold: put the key back in encryption.keys (after `forge rotate-key` has "
        .. "re-sealed every record under the primary key, it may go)", probe.key, kid)
    else
      local ok, oerr = M.open(db.ring, probe.key, probe.value)
      if not ok then
        problems[#problems + 1] = tostring(oerr) .. " (is that the key the store was sealed with?)"
      end
    end
  end
  if #problems == 0 then
    local ok, err = M.note_primary(db)
    if not ok then error(err, 0) end
  end
  return problems, u.plain or 0, u.plain_first
end

--- After a rotation: record the key ids its census found in use (and the primary).
-- @param db a sealed store @param s M.census's summary @return true | nil, err
function M.record_usage(db, s)
  while true do
    local u0, rev = read_usage(db)
    if u0 == nil then return nil, rev end
    local u = usage_of(s)
    u.kids[db.ring.primary] = u.kids[db.ring.primary] or primary_probe(db.ring)
    local ok, err = write_usage(db, u, rev)
    if ok == nil then return nil, err end
    if ok then return true end
  end
end

local function read_job(db)
  local kv, err = db:get(JOB_KEY)
  if err then return nil, err end
  return kv and util.json_decode(kv.value) or nil
end

local function save_job(db, job)
  local ok, err = db:put(JOB_KEY, util.json_encode(job))
  if not ok then return nil, err end
  return true
end

-- Re-seal one stored kv under the primary key, compare-and-swap on its mod_revision; a value
-- written meanwhile is read again (a writer since then sealed it under the primary already,
-- or it is re-sealed in turn). @return true (re-sealed), false (nothing to do) | nil, err
local function reseal(db, kv)
  while true do
    if M.kid(kv.value) == db.ring.primary then return false end
    local plain, err = M.open(db.ring, kv.key, kv.value)
    if not plain then return nil, err end
    local put = { op = "put", key = kv.key, value = M.seal(db.ring, kv.key, plain) }
    local ok, terr = db.raw:txn { compare = { { key = kv.key, mod_revision = kv.mod_revision } }, success = { put } }
    if ok == nil then return nil, terr end
    if ok then return true end
    kv, err = db.raw:get(kv.key)
    if err then return nil, err end
    if not kv then return false end       -- deleted meanwhile
  end
end

--- Re-seal every stored value under the ring's primary key, as a journaled job: the job record
-- (JOB_KEY) keeps the last key done, so a run that was stopped resumes after it. Keys are
-- done in order; the broker may go on writing meanwhile (its writes use the primary key).
-- @param db a sealed store
-- @param opts {progress = function(job, key) (after each record), rate = records per second
--   (nil: as fast as the store takes them), every = records between job saves (default 100)}
-- @return job {primary, cursor, resealed, skipped, total, state="done", resumed} | nil, err
function M.rotate(db, opts)
  opts = opts or {}
  local job, err = read_job(db)
  if err then return nil, err end
  local resumed = job and job.state == "running" and job.primary == db.ring.primary
  if not resumed then
    job = { primary = db.ring.primary, cursor = "", resealed = 0, skipped = 0, started_at = os.time(),
      state = "running" }
  end
  job.resumed = resumed and job.cursor or nil
  local kvs, rerr = db.raw:range("")
  if not kvs then return nil, rerr end
  job.total = 0
  local function skipped(k) return k == JOB_KEY or k == USAGE_KEY end
  for _, kv in ipairs(kvs) do if not skipped(kv.key) then job.total = job.total + 1 end end
  local every, pause = opts.every or 100, opts.rate and 1 / opts.rate
  local since = 0
  for _, kv in ipairs(kvs) do
    if kv.key > job.cursor and not skipped(kv.key) then
      local done, serr = reseal(db, kv)
      if done == nil then return nil, serr end
      if done then job.resealed = job.resealed + 1 else job.skipped = job.skipped + 1 end
      job.cursor, since = kv.key, since + 1
      if since >= every then
        since = 0
        local ok, jerr = save_job(db, job)
        if not ok then return nil, jerr end
      end
      if opts.progress then opts.progress(job, kv.key) end
      if pause then proc.sleep(pause) end
    end
  end
  job.state, job.finished_at = "done", os.time()
  local ok, jerr = save_job(db, job)
  if not ok then return nil, jerr end
  return job
end

--- The rotation job's record, or nil. @param db a sealed store
function M.job(db)
  return read_job(db)
end

return M
