-- Checks of fuzz_etcd (fuzz/README.md). The input's first line: words, each an operation
-- run in turn on one db (get range put delete txn revision grant keepalive revoke watch
-- endpoints), or an option: auth (username/password), prefix (keys under "ns/"), eps=N
-- (1..4 endpoints), short (timeout_ms = 50). Every answer after the first line is what the
-- "server" sends, in order (fake_curl.h). Any raise, or a failed assert, is a finding.
local etcd = require "forge.etcd"
local VERBOSE = os.getenv("FUZZ_VERBOSE") -- print every call's results (reproducing a finding)

local function show(v)
  if type(v) ~= "table" then return tostring(v) end
  local parts = {}
  for k, x in pairs(v) do parts[#parts + 1] = tostring(k) .. "=" .. show(x) end
  table.sort(parts)
  return "{" .. table.concat(parts, ", ") .. "}"
end

local function check_err(err, what)
  if VERBOSE then print(what, show(err)) end
  assert(type(err) == "table", what .. ": error is not a table")
  assert(type(err.code) == "string" and err.code:match("^[%w_]+%.[%w_]+$"), what .. ": bad error code")
  assert(type(err.message) == "string" and err.message ~= "", what .. ": error without a message")
  assert(err.retryable == nil or type(err.retryable) == "boolean", what .. ": retryable is not a boolean")
end

local function is_int(v) return math.type(v) == "integer" end

local function check_kv(kv, what)
  assert(type(kv) == "table", what .. ": kv is not a table")
  assert(type(kv.key) == "string" and type(kv.value) == "string", what .. ": kv key/value not strings")
  assert(is_int(kv.mod_revision) and is_int(kv.create_revision) and is_int(kv.version), what .. ": kv revisions")
end

local OPS = {
  get = function(db)
    local kv, err = db:get("k")
    if kv then check_kv(kv, "get") elseif err then check_err(err, "get") end
  end,
  range = function(db)
    local kvs, rev = db:range("", { limit = 3 })
    if kvs then
      assert(is_int(rev), "range: revision")
      for _, kv in ipairs(kvs) do check_kv(kv, "range") end
    else
      check_err(rev, "range")
    end
  end,
  put = function(db)
    local rev, err = db:put("k", "v\0x", { prev_revision = 3 })
    if rev then assert(is_int(rev), "put: revision") else check_err(err, "put") end
  end,
  delete = function(db)
    local rev, n = db:delete("k")
    if rev then assert(is_int(rev) and is_int(n), "delete: results") else check_err(n, "delete") end
  end,
  txn = function(db)
    local ok, rev = db:txn({
      compare = { { key = "a", mod_revision = 0 }, { key = "b", exists = true }, { key = "c", value = "x" } },
      success = { { op = "put", key = "a", value = "1" }, { op = "delete_prefix", prefix = "p/" } },
      failure = { { op = "delete", key = "b" } },
    })
    if ok ~= nil then
      assert(type(ok) == "boolean" and is_int(rev), "txn: results")
    else
      check_err(rev, "txn")
    end
  end,
  revision = function(db)
    local rev, err = db:revision()
    if rev then assert(is_int(rev), "revision") else check_err(err, "revision") end
  end,
  grant = function(db)
    local id, ttl = db:lease_grant(10)
    if id then assert(is_int(id) and is_int(ttl), "lease_grant: results") else check_err(ttl, "lease_grant") end
  end,
  keepalive = function(db)
    local ttl, err = db:lease_keepalive(7)
    if ttl then assert(is_int(ttl), "lease_keepalive") else check_err(err, "lease_keepalive") end
  end,
  revoke = function(db)
    local rev, err = db:lease_revoke(7)
    if rev then assert(is_int(rev), "lease_revoke") else check_err(err, "lease_revoke") end
  end,
  watch = function(db)
    local events, rev = db:watch("p/", 2, 50)
    if events then
      assert(is_int(rev), "watch: revision")
      for _, ev in ipairs(events) do
        assert(ev.type == "put" or ev.type == "delete", "watch: event type")
        assert(type(ev.key) == "string" and type(ev.value) == "string" and is_int(ev.mod_revision), "watch: event")
      end
    else
      check_err(rev, "watch")
    end
  end,
  endpoints = function(db)
    assert(type(db:endpoints()) == "table", "endpoints")
  end,
}

return function(line)
  local opts = { endpoints = { "http://127.0.0.1:2379" }, timeout_ms = 1000 }
  local ops = {}
  for w in line:gmatch("%S+") do
    local n = w:match("^eps=(%d)$")
    if w == "auth" then
      opts.username, opts.password = "user", "secret"
    elseif w == "prefix" then
      opts.prefix = "ns/"
    elseif w == "short" then
      opts.timeout_ms = 50
    elseif n then
      for i = 2, math.max(1, math.min(4, tonumber(n))) do opts.endpoints[i] = "http://127.0.0.1:" .. (2378 + i) end
    elseif OPS[w] and #ops < 16 then
      ops[#ops + 1] = OPS[w]
    end
  end
  local db, err = etcd.open(opts)
  if VERBOSE then print("open", show(db), show(err)) end
  if not db then
    check_err(err, "open")
    return
  end
  for i, op in ipairs(ops) do
    op(db)
    if VERBOSE then print("op " .. i .. " done") end
  end
  db:close()
end
