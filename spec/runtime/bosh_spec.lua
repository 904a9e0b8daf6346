-- forge.bosh against two simulated directors (basic and UAA), plus the director contract.
local bosh = require "forge.bosh"
local proc = require "forge.proc"
local boshsim = require "spec.support.boshsim"
local client = require "spec.support.client"

local function manifest(name, opts)
  opts = opts or {}
  local lines = {
    "name: " .. name,
    "releases: [{name: redis, version: \"1.2.3\"}]",
    "stemcells: [{alias: default, os: ubuntu-jammy, version: \"1.500\"}]",
    "update: {canaries: 1, max_in_flight: 1, canary_watch_time: 1000, update_watch_time: 1000}",
    "instance_groups:",
    "- name: redis",
    "  instances: " .. (opts.instances or 2),
    "  azs: [z1]",
    "  vm_type: small",
    "  stemcell: default",
    "  jobs: [{name: redis-server, release: redis}]",
  }
  if opts.static_ips then
    lines[#lines + 1] = "  networks: [{name: services, static_ips: [" .. table.concat(opts.static_ips, ", ") .. "]}]"
  else
    lines[#lines + 1] = "  networks: [{name: services}]"
  end
  if opts.errand then
    for _, l in ipairs {
      "- name: " .. opts.errand, "  lifecycle: errand", "  instances: 1", "  azs: [z1]", "  vm_type: small",
      "  stemcell: default", "  jobs: [{name: " .. opts.errand .. ", release: redis}]", "  networks: [{name: services}]",
    } do lines[#lines + 1] = l end
  end
  return table.concat(lines, "\n") .. "\n"
end

local V1_MANIFEST = [[
name: old-style
director_uuid: 1234
releases: [{name: redis, version: 1}]
networks: [{name: default, subnets: [{range: 10.0.0.0/24, static: [10.0.0.10 - 10.0.0.20]}]}]
resource_pools: [{name: small, network: default, stemcell: {name: s, version: 1}}]
jobs: [{name: redis, templates: [{name: redis-server}], instances: 1, resource_pool: small, networks: [{name: default}]}]
]]

local function wait(d, id)
  return assert(d:wait_task(id, { timeout_ms = 10000, poll_ms = 50 }))
end

local sh = require("spec.support.shell").output

describe("forge.bosh", function()
  local basic, uaa, tmp

  setup(function()
    math.randomseed(os.time() + proc.getpid())
    local subnets = { "services=10.10.1.0/24:10.10.1.10-10.10.1.50" }
    basic = boshsim.start { auth = "basic", subnets = subnets }
    uaa = boshsim.start { auth = "uaa", token_ttl = 2, subnets = subnets }
    tmp = os.tmpname()
    os.remove(tmp)
    os.execute("mkdir -p '" .. tmp .. "'")
  end)

  teardown(function()
    if basic then basic:cleanup() end
    if uaa then uaa:cleanup() end
    if tmp then os.execute("rm -rf '" .. tmp .. "'") end
  end)

  describe("handles", function()
    it("raises on misuse and reports bad local configuration as errors", function()
      assert.has_error(function() bosh.new { url = "ftp://x" } end)
      assert.has_error(function() bosh.new { url = basic.url, colour = "blue" } end)
      assert.has_error(function() bosh.new { url = basic.url, client = "c" } end)
      local d, err = bosh.new { url = basic.url, ca_cert = tmp .. "/no-such-ca.pem" }
      assert.is_nil(d)
      assert.equal("bosh.local", err.code)
      assert.truthy(bosh.new { url = "https://10.0.0.6:25555/", insecure = true,
        ca_cert = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n" })
      d = basic:director()
      assert.has_error(function() d:deploy("name: x\n", { context_id = string.rep("x", 65) }) end)
      assert.has_error(function() d:deploy("name: x\n", { recreat = true }) end)
      assert.has_error(function() d:run_errand("x", "y", { 42 }) end)
      assert.has_error(function() d:task(0) end)
      d:close()
      d:close()
      assert.matches("closed", tostring(d))
      assert.has_error(function() d:info() end)
    end)
  end)

  describe("info and auth", function()
    it("reads /info and learns the auth type", function()
      local d = basic:director()
      local info = assert(d:info())
      assert.equal("boshsim", info.name)
      assert.equal("basic", info.user_authentication.type)
      assert.equal("admin", info.user)                    -- credentials sent to /info are checked
      assert.equal("basic", d:auth_type())
      local u = uaa:director()
      local uinfo = assert(u:info())
      assert.equal("uaa", uinfo.user_authentication.type)
      assert.equal(uaa.url, uinfo.user_authentication.options.url)
      assert.is_nil(uinfo.timestamp)
      assert.equal("uaa", u:auth_type())
    end)

    it("maps bad credentials to bosh.auth", function()
      local _, err = basic:director({ password = "wrong" }):deployments()
      assert.equal("bosh.auth", err.code)
      assert.equal(401, err.status)
      assert.is_false(err.retryable)
      assert.matches("Not authorized", err.message)
      _, err = uaa:director({ client_secret = "wrong" }):deployments()
      assert.equal("bosh.auth", err.code)
      _, err = assert(bosh.new { url = uaa.url, username = "admin", password = "x" }):deployments()
      assert.equal("bosh.auth", err.code)
      assert.matches("client_secret are required", err.message)
      assert.equal("bosh.auth: " .. err.message, tostring(err))
    end)

    it("fetches a UAA token, refreshes it before expiry and once after a 401", function()
      local d = uaa:director()
      uaa:clear_requests()
      assert(d:deployments())
      assert(d:deployments())
      local function count(method, path, status)
        local n = 0
        for _, r in ipairs(uaa:requests()) do
          if r.method == method and r.path == path and (not status or r.status == status) then n = n + 1 end
        end
        return n
      end
      assert.equal(1, count("POST", "/oauth/token", 200))
      proc.sleep(1.6)                                     -- ttl 2 s, refreshed 0.5 s before expiry
      assert(d:deployments())
      assert.equal(2, count("POST", "/oauth/token", 200))
      assert.equal(0, count("GET", "/deployments", 401))
      uaa:faults { revoke_tokens = true }                 -- tokens issued so far are refused
      proc.sleep(0.01)
      assert(d:deployments())
      assert.equal(1, count("GET", "/deployments", 401))
      assert.equal(3, count("POST", "/oauth/token", 200))
    end)
  end)

  describe("deployments", function()
    it("deploys: 302 → task polled to done; vms carry the manifest's static IPs", function()
      local d = basic:director()
      local id = assert(d:deploy(manifest("dep-a", { static_ips = { "10.10.1.11", "10.10.1.12" } }),
        { context_id = "ctx-a" }))
      assert.equal("integer", math.type(id))
      local t = assert(d:task(id))
      assert.is_true(t.state == "queued" or t.state == "processing")
      assert.is_nil(t.timestamp)                          -- null until the task ends
      assert.equal("ctx-a", t.context_id)
      t = wait(d, id)
      assert.equal("done", t.state)
      assert.equal("/deployments/dep-a", t.result)
      assert.equal("integer", math.type(t.timestamp))
      local vms = assert(d:vms("dep-a"))
      assert.equal(2, #vms)
      table.sort(vms, function(a, b) return a.index < b.index end)
      assert.same({ "10.10.1.11" }, vms[1].ips)
      assert.same({ "10.10.1.12" }, vms[2].ips)
      assert.equal("redis", vms[1].job_name)
      assert.equal("running", vms[1].job_state)
      local plain = assert(d:vms("dep-a", { full = false, instances = true }))
      assert.equal(2, #plain)
      assert.matches("name: dep%-a", assert(d:deployment("dep-a")))
      local names = {}
      for _, dep in ipairs(assert(d:deployments())) do names[dep.name] = dep end
      assert.is_table(names["dep-a"])
      assert.equal("redis", names["dep-a"].releases[1].name)
      local tasks = assert(d:tasks { deployment = "dep-a", context_id = "ctx-a", state = { "done", "error" } })
      assert.equal(1, #tasks)
      assert.equal(id, tasks[1].id)
    end)

    it("assigns dynamic IPs from the cloud-config subnet outside its static range", function()
      local d = basic:director()
      wait(d, assert(d:deploy(manifest("dep-dyn", { instances = 1 }))))
      local vms = assert(d:vms("dep-dyn"))
      local n = tonumber(vms[1].ips[1]:match("%.(%d+)$"))
      assert.is_true(n < 10 or n > 50, vms[1].ips[1])   -- static range is .10-.50
      assert.matches("^10%.10%.1%.", vms[1].ips[1])
    end)

    it("deletes a deployment; unknown names are bosh.not_found 70000", function()
      local d = basic:director()
      wait(d, assert(d:deploy(manifest("dep-del", { instances = 1 }))))
      local id = assert(d:delete_deployment("dep-del", { force = true }))
      assert.equal("done", wait(d, id).state)
      local _, err = d:deployment("dep-del")
      assert.equal("bosh.not_found", err.code)
      assert.equal(70000, err.director_code)
      assert.equal(404, err.status)
      _, err = d:delete_deployment("dep-del")
      assert.equal(70000, err.director_code)
    end)

    it("shows a failing errand as a done task with its exit code", function()
      local d = basic:director()
      wait(d, assert(d:deploy(manifest("dep-err", { instances = 1, errand = "smoke-tests" }))))
      basic:admin("POST", "errands", { errand = "smoke-tests", exit_code = 3, stderr = "boom\n" })
      local id = assert(d:run_errand("dep-err", "smoke-tests"))
      local t = wait(d, id)
      assert.equal("done", t.state)
      assert.equal("0 succeeded, 1 errored, 0 canceled", t.result)
      local res = assert(d:errand_result(id))
      assert.equal(1, #res)
      assert.equal(3, res[1].exit_code)
      assert.equal("boom\n", res[1].stderr)
      assert.equal("smoke-tests", res[1].instance.group)
      local ok_id = assert(d:run_errand("dep-err", "redis-server", { "redis/0" }))
      assert.equal("done", wait(d, ok_id).state)
      assert.equal(0, assert(d:errand_result(ok_id))[1].exit_code)
      local vms = assert(d:vms("dep-err"))
      assert.equal(1, #vms)                              -- the errand group has no VM
    end)

    it("reports a deployment lock conflict as a failed task with code 100", function()
      local d = basic:director()
      local first = assert(d:deploy(manifest("dep-lock", { instances = 1 })))
      local second = assert(d:deploy(manifest("dep-lock", { instances = 1 })))
      assert.equal("done", wait(d, first).state)
      local t = wait(d, second)
      assert.equal("error", t.state)
      assert.matches("Failed to acquire lock for lock:deployment:dep%-lock", t.result)
      local events = assert(d:task_output(second, "event"))
      assert.matches('"code":100', events)
    end)

    it("refuses a v1 manifest in the task, and a wrong Content-Type with 404", function()
      local d = basic:director()
      local t = wait(d, assert(d:deploy(V1_MANIFEST)))
      assert.equal("error", t.state)
      assert.matches("140023", assert(d:task_output(t.id, "event")))
      local status, body = client.request("POST", basic.url .. "/deployments",
        { body = "name: x\n", headers = { ["Content-Type"] = "application/json" }, user = basic.user,
          password = basic.password })
      assert.equal(404, status)
      assert.equal("Endpoint '/deployments' not found.", body)
      local _, err = d:deploy("name: [")
      assert.equal("bosh.bad_request", err.code)
      assert.equal(440001, err.director_code)
      _, err = d:deploy("releases: []\n")
      assert.equal(40001, err.director_code)
    end)

    it("reads task output with a Range offset", function()
      local d = basic:director()
      local id = assert(d:deploy(manifest("dep-range", { instances = 1 })))
      wait(d, id)
      local all = assert(d:task_output(id, "event"))
      local first = all:match("^[^\n]*\n")
      local rest, total = d:task_output(id, "event", { offset = #first })
      assert.equal(all:sub(#first + 1), rest)
      assert.equal(#all, total)
      assert.equal("", (d:task_output(id, "event", { offset = #all })))  -- 416: nothing new
      assert.equal("", (d:task_output(id, "result")))                    -- 204: no output
    end)

    it("cancels a queued task; a finished one cannot be cancelled", function()
      local d = basic:director()
      basic:config { task_delay = 3 }
      local id = assert(d:deploy(manifest("dep-cancel", { instances = 1 })))
      basic:config { task_delay = 0.3 }
      assert.is_true(d:cancel_task(id))
      assert.equal("cancelled", wait(d, id).state)
      local _, err = d:cancel_task(id)
      assert.equal("bosh.bad_request", err.code)
      assert.equal(400, err.status)
    end)
  end)

  describe("faults", function()
    after_each(function() basic:clear_faults() end)

    it("turns 500s into retryable errors", function()
      local d = basic:director()
      assert(d:deployments())
      basic:faults { http_500 = 2 }
      local _, err = d:deployments()
      assert.equal("bosh.unreachable", err.code)
      assert.is_true(err.retryable)
      assert.equal(500, err.status)
      _, err = d:releases()
      assert.equal(500, err.status)
      assert(d:deployments())
    end)

    it("fails fast and retryably when the director is unreachable or slow", function()
      local port
      repeat port = math.random(30000, 39999) until proc.port_free(port)
      local d = assert(bosh.new { url = "http://127.0.0.1:" .. port, username = "a", password = "b" })
      local t0 = proc.monotonic()
      local _, err = d:deployments()
      assert.equal("bosh.unreachable", err.code)
      assert.is_true(err.retryable)
      assert.is_true(proc.monotonic() - t0 < 1)
      basic:faults { slow_ms = 1500, slow_count = 1 }
      local slow = basic:director { timeout_ms = 300 }
      t0 = proc.monotonic()
      _, err = slow:info()
      assert.equal("bosh.unreachable", err.code)
      assert.is_true(proc.monotonic() - t0 < 1)
    end)

    it("injects a task error", function()
      local d = basic:director()
      basic:faults { task_error = 1, task_error_message = "disk full", task_error_code = 500001 }
      local t = wait(d, assert(d:deploy(manifest("dep-fault", { instances = 1 }))))
      assert.equal("error", t.state)
      assert.equal("disk full", t.result)
      assert.matches('"code":500001', d:task_output(t.id, "event"))
      local _, err = d:vms("dep-fault", { timeout_ms = 5000 })   -- the failed first deploy left no VMs
      assert.is_nil(err)
      assert.is_nil(d:deployment("dep-fault"))                    -- listed, but no manifest
    end)

    it("loses in-flight tasks on a director restart", function()
      local d = basic:director()
      basic:config { task_delay = 5 }
      local id = assert(d:deploy(manifest("dep-restart", { instances = 1 })))
      basic:config { task_delay = 0.3 }
      local _, state = basic:faults { restart = true }
      assert.same({ id }, state.lost_tasks)
      local _, err = d:task(id)
      assert.equal("bosh.not_found", err.code)
      assert.equal(10000, err.director_code)
      local again = assert(d:deploy(manifest("dep-restart", { instances = 1 })))  -- the lock went too
      assert.equal("done", wait(d, again).state)
    end)
  end)

  describe("releases and stemcells", function()
    local function tarball(mf, text)
      local dir = tmp .. "/" .. mf
      os.execute("mkdir -p '" .. dir .. "'")
      local f = assert(io.open(dir .. "/" .. mf, "w"))
      f:write(text)
      f:close()
      local path = dir .. ".tgz"
      sh("tar -czf '" .. path .. "' -C '" .. dir .. "' ./" .. mf)
      return path, sh("sha1sum '" .. path .. "'"):match("^(%x+)")
    end

    it("uploads a release and a stemcell as raw tgz bodies", function()
      local d = uaa:director()
      local path, sha1 = tarball("release.MF", "name: myrel\nversion: \"1.2.3\"\njobs: [{name: redis-server}]\n")
      local t = wait(d, assert(d:upload_release(path, sha1)))
      assert.equal("done", t.state)
      assert.equal("Created release 'myrel/1.2.3'", t.result)
      local rels = assert(d:releases())
      assert.equal("myrel", rels[1].name)
      assert.equal("1.2.3", rels[1].release_versions[1].version)
      t = wait(d, assert(d:upload_release(path, string.rep("0", 40))))
      assert.equal("error", t.state)
      assert.matches("SHA1 mismatch", t.result)
      local spath, ssha = tarball("stemcell.MF", "name: bosh-sim-ubuntu\nversion: \"1.500\"\noperating_system: ubuntu-jammy\n")
      t = wait(d, assert(d:upload_stemcell(spath, ssha)))
      assert.equal("/stemcells/bosh-sim-ubuntu/1.500", t.result)
      local scs = assert(d:stemcells())
      assert.equal("ubuntu-jammy", scs[1].operating_system)
      local _, err = d:upload_release(tmp .. "/missing.tgz")
      assert.equal("bosh.local", err.code)
    end)
  end)

  describe("director contract", function()
    -- Collapse task polls: "GET /tasks/7 200" repeated any number of times → one "GET /tasks/7 200 *".
    local function sequence(reqs)
      local out = {}
      for _, r in ipairs(reqs) do
        local line = string.format("%s %s%s %d", r.method, r.path, r.query and ("?" .. r.query) or "", r.status)
        if r.method == "GET" and r.path:match("^/tasks/%d+$") then line = line .. " *" end
        if out[#out] ~= line or not line:match(" %*$") then out[#out + 1] = line end
      end
      return out
    end

    it("deploy and vms follow POST → 302 → polled GET /tasks/N → GET result output", function()
      local d = basic:director()
      basic:clear_requests()
      local id = assert(d:deploy(manifest("dep-contract", { instances = 2 })))
      local t
      repeat
        t = assert(d:task(id))
        proc.sleep(0.05)
      until t.state ~= "queued" and t.state ~= "processing"
      assert.equal("done", t.state)
      assert.equal("", d:task_output(id, "result"))
      local vms = assert(d:vms("dep-contract", { poll_ms = 20 }))
      assert.equal(2, #vms)
      local seq = sequence(basic:requests())
      local vms_task = id + 1
      local expected = {
        "GET /info 200",                                  -- auth discovery (basic vs uaa)
        "POST /deployments 302",
        "GET /tasks/" .. id .. " 200 *",
        "GET /tasks/" .. id .. "/output?type=result 204",
        "GET /deployments/dep-contract/vms?format=full 302",
        "GET /tasks/" .. vms_task .. " 200 *",
        "GET /tasks/" .. vms_task .. "/output?type=result 200",
      }
      assert.same(expected, seq)
    end)
  end)
end)
