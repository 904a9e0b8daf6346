-- services/etcd end to end: a real etcd per instance, per-binding users through etcd's auth.
local Broker = require "spec.support.broker"

local SVC, PLAN = "2f3b8f3e-7a51-4b8e-9f5e-0c1d2e3f4a5b", "6a7b8c9d-0e1f-4a2b-8c3d-4e5f6a7b8c9d"

local function etcdctl(creds, ...)
  local args = { "etcdctl", "--endpoints=" .. creds.endpoints[1], "--dial-timeout=3s" }
  for _, a in ipairs({ ... }) do args[#args + 1] = a end
  for i, a in ipairs(args) do args[i] = "'" .. a .. "'" end
  local p = io.popen("ETCDCTL_API=3 ETCDCTL_USER='" .. creds.username .. ":" .. creds.password .. "' "
    .. table.concat(args, " ") .. " 2>&1")
  local out = p:read("a")
  p:close()
  return (out:gsub("%s+$", ""))
end

describe("etcd service", function()
  local b
  setup(function() b = Broker.start { pool = 8 } end)
  teardown(function() if b then b:cleanup() end end)

  it("provisions an etcd, binds users limited to their prefix, unbinds and deprovisions", function()
    local status, raw = b:call("PUT", "/v2/service_instances/e1?accepts_incomplete=true",
      { service_id = SVC, plan_id = PLAN, organization_guid = "o", space_guid = "s" })
    assert.equal(202, status, raw)
    local op = b:wait_operation("/v2/service_instances/e1", 60)
    assert.equal("succeeded", op.state, op.description)
    local s1, _, _, b1 = b:call("PUT", "/v2/service_instances/e1/service_bindings/app1", { service_id = SVC,
      plan_id = PLAN })
    assert.equal(201, s1)
    local s2, _, _, b2 = b:call("PUT", "/v2/service_instances/e1/service_bindings/app2", { service_id = SVC,
      plan_id = PLAN })
    assert.equal(201, s2)
    local c1, c2 = b1.credentials, b2.credentials
    assert.equal("OK", etcdctl(c1, "put", c1.prefix .. "k", "v1"))
    assert.equal(c1.prefix .. "k\nv1", etcdctl(c1, "get", c1.prefix .. "k"))
    -- a binding cannot touch another binding's keys, nor work without credentials
    assert.matches("permission denied", etcdctl(c2, "get", c1.prefix .. "k"))
    assert.matches("user name is empty",
      etcdctl({ endpoints = c1.endpoints, username = "", password = "" }, "get", c1.prefix .. "k"), 1, true)
    assert.equal(200, (b:call("DELETE", "/v2/service_instances/e1/service_bindings/app1?service_id=" .. SVC
      .. "&plan_id=" .. PLAN)))
    assert.matches("authentication failed", etcdctl(c1, "get", c1.prefix .. "k"))
    assert.equal("OK", etcdctl(c2, "put", c2.prefix .. "k", "v2"))
    assert.equal(202, (b:call("DELETE", "/v2/service_instances/e1?service_id=" .. SVC .. "&plan_id=" .. PLAN
      .. "&accepts_incomplete=true")))
    assert.equal("succeeded", b:wait_operation("/v2/service_instances/e1", 60).state)
    assert.same({}, Broker.marked_pids(b.state_dir, "e1"))
  end)
end)
