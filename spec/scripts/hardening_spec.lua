-- Careless clients and a busy host: concurrent provisions that all want the same lowest free
-- port, and children that must be reaped.
local Broker = require "spec.support.broker"
local lfs = require "lfs"
local concurrently = require("spec.support.shell").concurrently

local D = Broker.dummy

-- Zombie children of pid (state Z in /proc/<child>/stat).
local function zombies(pid)
  local n = 0
  for entry in lfs.dir("/proc") do
    if entry:match("^%d+$") then
      local f = io.open("/proc/" .. entry .. "/stat")
      local stat = f and f:read("a") or ""
      if f then f:close() end
      local state, ppid = stat:match("%) (%a) (%d+)")
      if state == "Z" and tonumber(ppid) == pid then n = n + 1 end
    end
  end
  return n
end

describe("a busy broker", function()
  local b
  setup(function() b = Broker.start { pool = 160, fixtures = true, env = { FORGE_THREADS = "32" } } end)
  teardown(function() b:cleanup() end)

  it("gives 64 concurrent provisions distinct ports without a 503", function()
    local codes = concurrently(b, 64, function(i)
      return string.format("-X PUT -d '{\"service_id\":\"%s\",\"plan_id\":\"%s\",\"organization_guid\":\"o\","
        .. "\"space_guid\":\"s\"}' '%s'", D.service, D.small, b:url("/v2/service_instances/c" .. i
        .. "?accepts_incomplete=true"))
    end)
    assert.equal(64, #codes)
    local counts = {}
    for _, c in ipairs(codes) do counts[c] = (counts[c] or 0) + 1 end
    assert.same({ [202] = 64 }, counts)
    local seen = {}
    for i = 1, 64 do
      b:wait_operation("/v2/service_instances/c" .. i, 60)
      local _, _, _, view = b:call("GET", "/service_instances/c" .. i)
      for _, port in ipairs(view.ports) do
        assert.is_nil(seen[port], "port " .. port .. " given twice")
        seen[port] = true
      end
    end
  end)

  it("reaps every process it stopped: no zombies after 70 provision/deprovision cycles", function()
    local q = "?service_id=" .. D.service .. "&plan_id=" .. D.small
    for i = 1, 50 do
      assert.equal(201, (b:call("PUT", "/v2/service_instances/z" .. i, { service_id = D.service, plan_id = D.small,
        organization_guid = "o", space_guid = "s" })))
      assert.equal(200, (b:call("DELETE", "/v2/service_instances/z" .. i .. q)))
    end
    local R = Broker.redis
    local rq = "?service_id=" .. R.service .. "&plan_id=" .. R.one
    for i = 1, 20 do
      assert.equal(201, (b:call("PUT", "/v2/service_instances/r" .. i, { service_id = R.service, plan_id = R.one,
        organization_guid = "o", space_guid = "s" })))
      assert.equal(200, (b:call("DELETE", "/v2/service_instances/r" .. i .. rq)))
    end
    assert.equal(0, zombies(b.pid))
  end)
end)

describe("a pool port held by another program", function()
  local proc = require "forge.proc"
  it("is skipped: the provision gets another port", function()
    local b = Broker.start { pool = 4 }
    local held = b.pool.from
    local listener = assert(proc.spawn { argv = { "python3", "-c", "import socket,time\n"
      .. "s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
      .. "s.bind(('127.0.0.1', " .. held .. ")); s.listen(); time.sleep(60)" } })
    -- busted keeps one finally per test: it stops both
    finally(function()
      proc.stop(listener.pid, listener.start_time, 2)
      b:cleanup()
    end)
    local deadline = proc.monotonic() + 5
    while not proc.tcp_check("127.0.0.1", held, 1) and proc.monotonic() < deadline do proc.sleep(0.05) end
    local R = Broker.redis
    local status, raw = b:call("PUT", "/v2/service_instances/h1", { service_id = R.service, plan_id = R.one,
      organization_guid = "o", space_guid = "s" })
    assert.equal(201, status, raw)
    local _, _, _, view = b:call("GET", "/service_instances/h1")
    assert.not_equal(held, view.ports[1])
  end)
end)
