-- Group commit: the broker's threads share SQLite commits (runtime/store.c). Whatever a
-- request acknowledged is on disk, whichever thread's commit carried it: a broker killed
-- with SIGKILL right after the answers has every acknowledged binding stored, each write
-- with a revision of its own.
local Broker = require "spec.support.broker"
local client = require "spec.support.client"
local cjson = require "cjson"

local R = Broker.redis
local N = 48

describe("group commit", function()
  local b
  setup(function()
    b = Broker.start { pool = 4 }
    b:provision_async("gc", R.service, R.one)
    assert.equal("succeeded", b:settle("gc").operation.state)
  end)
  teardown(function() if b then b:cleanup() end end)

  local function request(method, path, body)
    return { method = method, url = b:url(path), user = b.user, password = b.password,
      headers = { ["X-Broker-API-Version"] = "2.17", ["Content-Type"] = "application/json" },
      body = body and cjson.encode(body) }
  end

  local function bindings()
    local db = b:store()
    local kvs = assert(db:range("binding/gc/"))
    db:close()
    return kvs
  end

  it("stores every acknowledged bind and unbind of concurrent requests before a kill -9", function()
    local reqs = {}
    for i = 1, N do
      reqs[i] = request("PUT", "/v2/service_instances/gc/service_bindings/b" .. i, { service_id = R.service,
        plan_id = R.one })
    end
    local results = client.parallel(reqs)
    b:stop("KILL")
    local acked = {}
    for i, r in ipairs(results) do
      assert.equal(201, r.status, r.body)
      acked["binding/gc/b" .. i] = r.json.credentials.username
    end
    local revisions = {}
    local kvs = bindings()
    assert.equal(N, #kvs)
    for _, kv in ipairs(kvs) do
      local rec = cjson.decode(kv.value)
      assert.equal("created", rec.state, kv.key)
      assert.equal(acked[kv.key], rec.credentials.username, kv.key)
      assert.is_nil(revisions[kv.mod_revision], "two writes share revision " .. kv.mod_revision)
      revisions[kv.mod_revision] = true
    end

    b:launch()
    local unbinds = {}
    for i = 1, N do
      unbinds[i] = request("DELETE", string.format("/v2/service_instances/gc/service_bindings/b%d?service_id=%s&plan_id=%s",
        i, R.service, R.one))
    end
    for _, r in ipairs(client.parallel(unbinds)) do assert.equal(200, r.status, r.body) end
    b:stop("KILL")
    assert.same({}, bindings())
    b:launch()
  end)
end)
