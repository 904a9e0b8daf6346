-- The simulated director keeps one store key per deployment, reserved IP and task: its world
-- document stays the same size however many deployments it holds, and a deploy or a lookup
-- of tasks by context id reads a few keys, not everything stored.
local Broker = require "spec.support.broker"
local crypto = require "forge.crypto"
local proc = require "forge.proc"
local sim = require "forge.boshsim"
local store = require "forge.store"
local util = require "forge.util"

describe("boshsim's store", function()
  local dir, db, n = nil, nil, 0

  local function call(method, uri, body)
    n = n + 1
    local status, _, text = sim.handle { method = method, uri = uri, id = "r" .. n, body = body or "",
      headers = { authorization = "Basic " .. crypto.base64_encode("admin:admin"), ["content-type"] = "text/yaml",
        ["x-bosh-context-id"] = "ctx-" .. n } }
    return status, text
  end

  local function deploy(i)
    return call("POST", "/deployments", string.format("name: d%d\ninstance_groups:\n- name: g\n  instances: 1\n"
      .. "  networks: [{name: n, static_ips: [10.9.%d.%d]}]\n", i, i // 250, i % 250 + 1))
  end

  setup(function()
    dir = Broker.tmpdir()
    db = assert(store.open(dir .. "/boshsim.db"))
    assert(db:put("config", util.json_encode({ url = "http://127.0.0.1:1", auth = "basic", user = "admin",
      password = "admin", task_delay = 0, subnets = {} })))
    sim.init(dir .. "/boshsim.db")
  end)
  teardown(function()
    db:close()
    os.execute("rm -rf '" .. dir .. "'")
  end)

  it("holds deployments as keys: the world document does not grow with them", function()
    assert.equal(302, (deploy(1)))
    proc.sleep(0.01)
    assert.equal(200, (call("GET", "/deployments")))                 -- settles the first deploy
    local size = #db:get("world").value
    for i = 2, 200 do assert.equal(302, (deploy(i))) end
    proc.sleep(0.01)
    local _, list = call("GET", "/deployments")
    assert.equal(200, #util.json_decode(list))
    assert.equal(200, #db:range("dep/"))
    assert.equal(200, #db:range("ipam/"))
    assert.is_true(#db:get("world").value <= size + 16, "world grew from " .. size .. " to " .. #db:get("world").value)
    local _, tasks = call("GET", "/tasks?context_id=ctx-" .. (n - 1) .. "&verbose=2")
    assert.equal(1, #util.json_decode(tasks))
    -- a static IP another deployment holds is refused; deleting a deployment releases its IP
    assert.equal(302, (call("POST", "/deployments", "name: clash\ninstance_groups:\n- name: g\n  instances: 1\n"
      .. "  networks: [{name: n, static_ips: [10.9.0.2]}]\n")))
    local _, last = call("GET", "/tasks?limit=1")
    assert.matches("already reserved by deployment 'd1'", util.json_decode(last)[1].result)
    assert.equal(302, (call("DELETE", "/deployments/d1?force=true")))
    proc.sleep(0.01)
    call("GET", "/deployments")
    assert.is_nil(db:get("dep/d1"))
    assert.is_nil(db:get("ipam/10.9.0.2"))
    assert.equal("d2", db:get("ipam/10.9.0.3").value)
  end)
end)
