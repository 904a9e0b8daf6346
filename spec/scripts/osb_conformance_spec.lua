-- OSB 2.17 conformance: the lifecycle of every example plan, sync and async, and the rules of
-- ../shared/OSB-CHECKLIST.md endpoint by endpoint. Real broker, real processes.
local Broker = require "spec.support.broker"
local proc = require "forge.proc"

local R, D = Broker.redis, Broker.dummy

local function redis_cli(creds, host, port, ...)
  local args = { "redis-cli", "-h", host or creds.host, "-p", tostring(port or creds.port), "--user",
    creds.username, "--no-auth-warning", ... }
  for i, a in ipairs(args) do args[i] = "'" .. tostring(a) .. "'" end
  local p = io.popen("REDISCLI_AUTH='" .. creds.password .. "' " .. table.concat(args, " ") .. " 2>&1")
  local out = p:read("a")
  p:close()
  return (out:gsub("%s+$", ""))
end

local function q(t)
  local parts = {}
  for k, v in pairs(t) do parts[#parts + 1] = k .. "=" .. v end
  table.sort(parts)
  return "?" .. table.concat(parts, "&")
end

local b

local function inst(id) return "/v2/service_instances/" .. id end
local function bnd(id, bid) return inst(id) .. "/service_bindings/" .. bid end

-- Call and assert that a refused request changed nothing in the store.
local function refused(status, code, method, path, body, headers)
  local before = b:records()
  local got, raw, hdrs, json = b:call(method, path, body, headers)
  assert.equal(status, got, raw)
  assert.equal(code, json and json.error, raw)
  assert.is_true(type(json.description) == "string" and #json.description > 0)
  assert.same(before, b:records())
  return json, hdrs
end

local function provision(id, plan_id, async, extra, svc)
  local body = { service_id = svc or R.service, plan_id = plan_id, organization_guid = "org-1", space_guid = "space-1" }
  for k, v in pairs(extra or {}) do body[k] = v end
  return b:call("PUT", inst(id) .. (async and "?accepts_incomplete=true" or ""), body)
end

local function deprovision(id, plan_id, async, svc)
  return b:call("DELETE", inst(id) .. q { service_id = svc or R.service, plan_id = plan_id,
    accepts_incomplete = async and "true" or nil })
end

local function wait_ok(path)
  local op = b:wait_operation(path, 60)
  assert.equal("succeeded", op.state, op.description)
  return op
end

-- The whole suite runs twice: over plain HTTP, and over HTTPS with client certificates required
-- besides Basic credentials (certificates made at test time; b:call follows the broker's scheme,
-- trusts its CA and shows the client certificate).
local function conformance(tls)
  describe(tls and "over HTTPS with client certificates" or "over HTTP", function()
    setup(function() b = Broker.start { fixtures = true, pool = 16, tls = tls } end)
    teardown(function() if b then b:cleanup() end end)

    describe("catalog", function()
      it("lists every service with the OSB fields and no author internals", function()
        local status, _, hdrs, body = b:call("GET", "/v2/catalog")
        assert.equal(200, status)
        assert.equal("application/json", hdrs["content-type"])
        local by_name = {}
        for _, s in ipairs(body.services) do by_name[s.name] = s end
        local redis = by_name.redis
        assert.is_true(redis.bindable)
        assert.is_true(redis.instances_retrievable)
        assert.is_true(redis.bindings_retrievable)
        for _, p in ipairs(redis.plans) do
          assert.is_nil(p.nodes)
          assert.is_nil(p.async_only)
          assert.is_nil(p.bindings_async)
          assert.equal("7.0.0", p.maintenance_info.version)
          assert.is_number(p.maximum_polling_duration)
        end
        local one = redis.plans[1]
        assert.equal("http://json-schema.org/draft-07/schema#", one.schemas.service_instance.create.parameters["$schema"])
        assert.is_false(by_name.dummy.plans[3].bindable)
      end)

      it("is stable across fetches", function()
        local _, a = b:call("GET", "/v2/catalog")
        local _, c = b:call("GET", "/v2/catalog")
        assert.equal(a, c)
      end)
    end)

    describe("redis 1-server, async", function()
      local creds

      it("provisions: 202 with operation and dashboard_url, Retry-After while in progress", function()
        local status, _, _, body = provision("one-a", R.one, true, { parameters = { maxmemory_mb = 64 } })
        assert.equal(202, status)
        assert.is_string(body.operation)
        assert.matches("/service_instances/one%-a$", body.dashboard_url)
        local s2, _, _, again = provision("one-a", R.one, true, { parameters = { maxmemory_mb = 64 } })
        assert.is_true(s2 == 202 or s2 == 200)
        if s2 == 202 then assert.equal(body.operation, again.operation) end
        local ls, _, hdrs, lbody = b:call("GET", inst("one-a") .. "/last_operation" .. q { operation = body.operation,
          service_id = R.service, plan_id = R.one })
        assert.equal(200, ls)
        if lbody.state == "in progress" then assert.is_string(hdrs["retry-after"]) end
        wait_ok(inst("one-a"))
      end)

      it("answers identical PUT 200, different attributes 409", function()
        assert.equal(200, (provision("one-a", R.one, true, { parameters = { maxmemory_mb = 64 } })))
        refused(409, "Conflict", "PUT", inst("one-a") .. "?accepts_incomplete=true", { service_id = R.service,
          plan_id = R.one, organization_guid = "org-1", space_guid = "space-1", parameters = { maxmemory_mb = 128 } })
      end)

      it("fetches the instance and the seed's view", function()
        local status, _, _, body = b:call("GET", inst("one-a"))
        assert.equal(200, status)
        assert.equal(R.service, body.service_id)
        assert.equal(R.one, body.plan_id)
        assert.same({ maxmemory_mb = 64 }, body.parameters)
        assert.equal("7.0.0", body.maintenance_info.version)
        local s2, _, _, seed = b:call("GET", "/service_instances/one-a")
        assert.equal(200, s2)
        assert.equal("running", seed.state)
        assert.equal("one-a", seed.service_instance_id)
        assert.equal(R.one, seed.service_plan_id)
        assert.equal("redis-one-a", seed.deployment_name)
      end)

      it("binds sync: 201, identical 200, different 409, fetch, binding last_operation", function()
        local status, _, _, body = b:call("PUT", bnd("one-a", "b1"), { service_id = R.service, plan_id = R.one,
          bind_resource = { app_guid = "app-1" } })
        assert.equal(201, status)
        creds = body.credentials
        assert.equal("PONG", redis_cli(creds, nil, nil, "PING"))
        assert.matches("maxmemory:67108864", redis_cli(creds, nil, nil, "INFO", "memory"))
        assert.equal(200, (b:call("PUT", bnd("one-a", "b1"), { service_id = R.service, plan_id = R.one,
          bind_resource = { app_guid = "app-1" } })))
        refused(409, "Conflict", "PUT", bnd("one-a", "b1"), { service_id = R.service, plan_id = R.one,
          bind_resource = { app_guid = "app-2" } })
        local fs, _, _, fetched = b:call("GET", bnd("one-a", "b1"))
        assert.equal(200, fs)
        assert.same(creds, fetched.credentials)
        local ls, _, _, op = b:call("GET", bnd("one-a", "b1") .. "/last_operation")
        assert.equal(200, ls)
        assert.equal("succeeded", op.state)
      end)

      it("updates parameters (async), validating them against the update schema", function()
        refused(400, "BadRequest", "PATCH", inst("one-a") .. "?accepts_incomplete=true",
          { service_id = R.service, parameters = { maxmemory_mb = 1 } })
        local json = refused(400, "BadRequest", "PATCH", inst("one-a") .. "?accepts_incomplete=true",
          { service_id = R.service, parameters = { bogus = true } })
        assert.matches("parameters", json.description)
        local status, _, _, body = b:call("PATCH", inst("one-a") .. "?accepts_incomplete=true",
          { service_id = R.service, parameters = { maxmemory_mb = 32 } })
        assert.equal(202, status)
        assert.is_string(body.operation)
        wait_ok(inst("one-a"))
        assert.matches("maxmemory:33554432", redis_cli(creds, nil, nil, "INFO", "memory"))
        assert.equal(200, (b:call("PATCH", inst("one-a"), { service_id = R.service, parameters = { maxmemory_mb = 32 } })))
      end)

      it("refuses a maintenance_info that is not the catalog's with 422 MaintenanceInfoConflict", function()
        refused(422, "MaintenanceInfoConflict", "PATCH", inst("one-a") .. "?accepts_incomplete=true",
          { service_id = R.service, maintenance_info = { version = "9.9.9" } })
        assert.equal(200, (b:call("PATCH", inst("one-a") .. "?accepts_incomplete=true",
          { service_id = R.service, maintenance_info = { version = "7.0.0" } })))
      end)

      it("changes plan to 3-servers on the same data, bindings kept on every node", function()
        assert.equal("OK", redis_cli(creds, nil, nil, "SET", "survives", "yes"))
        local status, _, _, body = b:call("PATCH", inst("one-a") .. "?accepts_incomplete=true",
          { service_id = R.service, plan_id = R.three, previous_values = { plan_id = R.one } })
        assert.equal(202, status, body and body.description)
        wait_ok(inst("one-a"))
        local _, _, _, seed = b:call("GET", "/service_instances/one-a")
        assert.equal(R.three, seed.service_plan_id)
        assert.equal(3, #seed.ports)
        for _, port in ipairs(seed.ports) do
          local deadline = proc.monotonic() + 10
          while redis_cli(creds, nil, port, "GET", "survives") ~= "yes" and proc.monotonic() < deadline do proc.sleep(0.1) end
          assert.equal("yes", redis_cli(creds, nil, port, "GET", "survives"))
        end
      end)

      it("unbinds: 200, then 410; fetch 404", function()
        assert.equal(200, (b:call("DELETE", bnd("one-a", "b1") .. q { service_id = R.service, plan_id = R.three })))
        assert.matches("WRONGPASS", redis_cli(creds, nil, nil, "PING"))
        refused(410, "Gone", "DELETE", bnd("one-a", "b1") .. q { service_id = R.service, plan_id = R.three })
        refused(404, "NotFound", "GET", bnd("one-a", "b1"))
      end)

      it("deprovisions: 202, succeeded, tombstone answers succeeded, then 410 and 404", function()
        local before = b:call("GET", "/service_instances/one-a")
        assert.equal(200, before)
        local status, _, _, body = deprovision("one-a", R.three, true)
        assert.equal(202, status)
        local again, _, _, body2 = deprovision("one-a", R.three, true)
        if again == 202 then assert.equal(body.operation, body2.operation) end
        wait_ok(inst("one-a"))
        local ls, _, _, op = b:call("GET", inst("one-a") .. "/last_operation")
        assert.equal(200, ls)
        assert.equal("succeeded", op.state)
        refused(410, "Gone", "DELETE", inst("one-a") .. q { service_id = R.service, plan_id = R.three,
          accepts_incomplete = "true" })
        refused(404, "NotFound", "GET", inst("one-a"))
        assert.same({}, Broker.marked_pids(b.state_dir, "one-a"))
      end)
    end)

    describe("redis 1-server, sync", function()
      it("provisions 201, updates 200 and deprovisions 200 without accepts_incomplete", function()
        local status, raw, _, body = provision("one-s", R.one, false)
        assert.equal(201, status, raw)
        assert.matches("/service_instances/one%-s$", body.dashboard_url)
        assert.is_nil(body.operation)
        local bs, _, _, bb = b:call("PUT", bnd("one-s", "sb"), { service_id = R.service, plan_id = R.one })
        assert.equal(201, bs)
        assert.equal("PONG", redis_cli(bb.credentials, nil, nil, "PING"))
        assert.equal(200, (b:call("PATCH", inst("one-s"), { service_id = R.service, parameters = { maxmemory_mb = 20 } })))
        assert.matches("maxmemory:20971520", redis_cli(bb.credentials, nil, nil, "INFO", "memory"))
        assert.equal(200, (deprovision("one-s", R.one, false)))
        assert.same({}, Broker.marked_pids(b.state_dir, "one-s"))
        local ls, _, _, op = b:call("GET", inst("one-s") .. "/last_operation")
        assert.equal(200, ls)
        assert.equal("succeeded", op.state)
      end)
    end)

    describe("redis 3-servers, async only", function()
      it("refuses sync requests with 422 AsyncRequired", function()
        refused(422, "AsyncRequired", "PUT", inst("three"), { service_id = R.service, plan_id = R.three,
          organization_guid = "o", space_guid = "s" })
      end)

      it("ignores unknown fields in request bodies", function()
        local status, raw = provision("extra", R.one, true, { surprise = { nested = true }, another_field = 7 })
        assert.equal(202, status, raw)
        wait_ok(inst("extra"))
        refused(422, "AsyncRequired", "DELETE", inst("extra") .. q { service_id = R.service, plan_id = R.three })
        assert.equal(202, (deprovision("extra", R.one, true)))
        wait_ok(inst("extra"))
      end)

      it("runs the whole lifecycle with async bindings", function()
        assert.equal(202, (provision("three", R.three, true)))
        -- while deploying: fetch 404, bind 422 naming the state, a second change 422
        local fs = b:call("GET", inst("three"))
        local json
        if fs == 404 then
          json = select(4, b:call("PUT", bnd("three", "early"), { service_id = R.service, plan_id = R.three }))
        end
        wait_ok(inst("three"))
        if json and json.error == "ConcurrencyError" then
          assert.matches("Service Instance not ready for binding; state deploying", json.description)
        end
        refused(422, "AsyncRequired", "PUT", bnd("three", "ab"), { service_id = R.service, plan_id = R.three })
        local status, _, _, body = b:call("PUT", bnd("three", "ab") .. "?accepts_incomplete=true",
          { service_id = R.service, plan_id = R.three })
        assert.equal(202, status)
        assert.is_nil(body.credentials)
        local op = wait_ok(bnd("three", "ab"))
        assert.equal("succeeded", op.state)
        local gs, _, _, got = b:call("GET", bnd("three", "ab"))
        assert.equal(200, gs)
        assert.equal(3, #got.credentials.hosts)
        for _, hp in ipairs(got.credentials.hosts) do
          local host, port = hp:match("^(.*):(%d+)$")
          assert.equal("PONG", redis_cli(got.credentials, host, port, "PING"))
        end
        local us, _, _, ubody = b:call("DELETE", bnd("three", "ab") .. q { service_id = R.service, plan_id = R.three,
          accepts_incomplete = "true" })
        assert.equal(202, us)
        assert.is_string(ubody.operation)
        wait_ok(bnd("three", "ab"))
        assert.matches("WRONGPASS", redis_cli(got.credentials, nil, nil, "PING"))
        -- async only means every change: a PATCH that changes nothing, and a delete, without
        -- accepts_incomplete are refused too
        refused(422, "AsyncRequired", "PATCH", inst("three"), { service_id = R.service })
        refused(422, "AsyncRequired", "DELETE", inst("three") .. q { service_id = R.service, plan_id = R.three })
        assert.equal(202, (deprovision("three", R.three, true)))
        refused(422, "AsyncRequired", "DELETE", inst("three") .. q { service_id = R.service, plan_id = R.three })
        wait_ok(inst("three"))
        assert.same({}, Broker.marked_pids(b.state_dir, "three"))
      end)
    end)

    describe("instance rules", function()
      local function dummy(id, plan, async, extra)
        return provision(id, plan or D.small, async, extra, D.service)
      end

      it("halts a provision that a delete interrupts", function()
        assert.equal(202, (provision("halt", R.three, true)))
        assert.equal(202, (deprovision("halt", R.three, true)))
        wait_ok(inst("halt"))
        assert.same({}, Broker.marked_pids(b.state_dir, "halt"))
      end)

      it("422 ConcurrencyError for a second operation while one runs", function()
        assert.equal(202, (dummy("busy", D.large, true)))
        local status, _, _, json = b:call("PATCH", inst("busy") .. "?accepts_incomplete=true",
          { service_id = D.service, plan_id = D.unbindable })
        if status == 422 then assert.equal("ConcurrencyError", json.error) else assert.equal(202, status) end
        wait_ok(inst("busy"))
      end)

      it("400 for a missing or unknown service_id on update, 404 for an unknown instance", function()
        assert.equal(201, (dummy("upd")))
        refused(400, "BadRequest", "PATCH", inst("upd"), { plan_id = D.small })
        refused(400, "BadRequest", "PATCH", inst("upd"), { service_id = "nope" })
        refused(400, "BadRequest", "PATCH", inst("upd"), { service_id = D.service, plan_id = "nope" })
        refused(404, "NotFound", "PATCH", inst("nobody"), { service_id = D.service })
      end)

      it("422 when the plan cannot be changed, with update_repeatable false", function()
        local json = refused(422, "PlanChangeNotSupported", "PATCH", inst("upd"),
          { service_id = D.service, plan_id = D.unbindable })
        assert.is_false(json.update_repeatable)
        -- a 2.15 client gets no field 2.16 introduced
        local _, _, _, old = b:call("PATCH", inst("upd"), { service_id = D.service, plan_id = D.unbindable },
          { ["X-Broker-API-Version"] = "2.15" })
        assert.equal("PlanChangeNotSupported", old.error)
        assert.is_nil(old.update_repeatable)
        assert.is_nil(old.instance_usable)
      end)

      it("applies context-only updates where allowed (200) and no-op updates (200)", function()
        assert.equal(200, (b:call("PATCH", inst("upd"), { service_id = D.service, context = { platform = "cf",
          space_name = "renamed" } })))
        assert.equal(200, (b:call("PATCH", inst("upd"), { service_id = D.service })))
        assert.equal(200, (b:call("PATCH", inst("upd"), { service_id = D.service, maintenance_info = {} })))
      end)

      it("400 for parameters failing the create schema, with the failing path", function()
        local json = refused(400, "BadRequest", "PUT", inst("badp"), { service_id = D.service, plan_id = D.small,
          organization_guid = "o", space_guid = "s", parameters = { size = 99 } })
        assert.matches("parameters%.size", json.description)
      end)

      it("422 MaintenanceInfoConflict on provision; an empty maintenance_info is absent", function()
        refused(422, "MaintenanceInfoConflict", "PUT", inst("mi"), { service_id = D.service, plan_id = D.small,
          organization_guid = "o", space_guid = "s", maintenance_info = { version = "0.0.1" } })
        assert.equal(201, (dummy("mi", D.small, false, { maintenance_info = {} })))
      end)

      it("retries a failed provision with the same PUT", function()
        -- (covered for redis-server failures in broker_spec; here: a failed instance can be deleted)
        assert.equal(200, (deprovision("mi", D.small, false, D.service)))
      end)
    end)

    describe("binding rules", function()
      setup(function()
        assert.equal(201, (provision("bd", D.small, false, nil, D.service)))
        assert.equal(202, (provision("bl", D.large, true, nil, D.service)))
        wait_ok(inst("bl"))
        assert.equal(201, (provision("bu", D.unbindable, false, nil, D.service)))
      end)

      it("400 for an unbindable plan, unknown plan, bad parameters, bad bind_resource", function()
        refused(400, "BadRequest", "PUT", bnd("bu", "x"), { service_id = D.service, plan_id = D.unbindable })
        refused(400, "BadRequest", "PUT", bnd("bd", "x"), { service_id = D.service, plan_id = "nope" })
        refused(400, "BadRequest", "PUT", bnd("bd", "x"), { service_id = D.service, plan_id = D.small,
          parameters = { role = "admin" } })
        refused(400, "BadRequest", "PUT", bnd("bd", "x"), { service_id = D.service, plan_id = D.small,
          bind_resource = "app" })
      end)

      it("accepts an empty bind_resource and parameters", function()
        assert.equal(201, (b:call("PUT", bnd("bd", "e"), { service_id = D.service, plan_id = D.small,
          bind_resource = {}, parameters = { role = "reader" } })))
      end)

      it("rotates only where binding_rotatable", function()
        refused(400, "BadRequest", "PUT", bnd("bd", "rot"), { service_id = D.service, plan_id = D.small,
          predecessor_binding_id = "e" })
        assert.equal(202, (b:call("PUT", bnd("bl", "first") .. "?accepts_incomplete=true",
          { service_id = D.service, plan_id = D.large })))
        wait_ok(bnd("bl", "first"))
        local status = b:call("PUT", bnd("bl", "second") .. "?accepts_incomplete=true",
          { service_id = D.service, plan_id = D.large, predecessor_binding_id = "first" })
        assert.equal(202, status)
        wait_ok(bnd("bl", "second"))
      end)

      it("404 for fetch and last_operation of unknown bindings, 410 after an async unbind finished", function()
        refused(404, "NotFound", "GET", bnd("bd", "nope"))
        refused(404, "NotFound", "GET", bnd("bd", "nope") .. "/last_operation")
        assert.equal(202, (b:call("DELETE", bnd("bl", "first") .. q { service_id = D.service, plan_id = D.large,
          accepts_incomplete = "true" })))
        wait_ok(bnd("bl", "first"))
        refused(404, "NotFound", "GET", bnd("bl", "first"))
        refused(410, "Gone", "DELETE", bnd("bl", "first") .. q { service_id = D.service, plan_id = D.large })
      end)

      it("422 ConcurrencyError for a delete while a binding operation runs", function()
        local s = b:call("PUT", bnd("bl", "slow") .. "?accepts_incomplete=true", { service_id = D.service, plan_id = D.large })
        assert.equal(202, s)
        local ds, _, _, json = deprovision("bl", D.large, true, D.service)
        if ds == 422 then assert.equal("ConcurrencyError", json.error) else assert.equal(202, ds) end
      end)
    end)

    describe("sloppy clients", function()
      it("accepts form bodies: urlencoded and multipart, with or without Content-Type", function()
        local client = require "spec.support.client"
        local auth = { user = b.user, password = b.password }
        local function req(path, body, ctype)
          local h = { ["X-Broker-API-Version"] = "2.17" }
          if ctype then h["Content-Type"] = ctype end
          return client.request("PUT", b:url(path), b:client_opts { body = body, headers = h, user = auth.user,
        password = auth.password })
        end
        local form = "service_id=" .. D.service .. "&plan_id=" .. D.small .. "&organization_guid=o&space_guid=s" ..
          "&parameters=%7B%22size%22%3A2%7D"
        assert.equal(201, (req(inst("f1"), form, "application/x-www-form-urlencoded")))
        assert.equal(201, (req(inst("f2"), form, nil)))
        local mp = {}
        for k, v in pairs({ service_id = D.service, plan_id = D.small, organization_guid = "o", space_guid = "s" }) do
          mp[#mp + 1] = '--BOUND\r\nContent-Disposition: form-data; name="' .. k .. '"\r\n\r\n' .. v .. "\r\n"
        end
        assert.equal(201, (req(inst("f3"), table.concat(mp) .. "--BOUND--\r\n", "multipart/form-data; boundary=BOUND")))
        local _, _, _, f1 = b:call("GET", inst("f1"))
        assert.same({ size = 2 }, f1.parameters)
      end)

      it("treats empty query values as missing, accepts trailing slashes", function()
        refused(400, "BadRequest", "DELETE", inst("f1") .. "?service_id=&plan_id=" .. D.small)
        assert.equal(200, (b:call("GET", "/v2/catalog/")))
        assert.equal(200, (b:call("GET", inst("f1") .. "/")))
      end)

      it("answers a poll with another operation value with the latest operation", function()
        local status, _, _, body = b:call("GET", inst("f1") .. "/last_operation?operation=provision")
        assert.equal(200, status)
        assert.equal("succeeded", body.state)
      end)

      it("logs the originating identity decoded", function()
        local id = "cf " .. "eyJ1c2VyX2lkIjoiNjgzZWE3NDgtMzA5Mi00ZmY0LWI2NTYtMzljYWNjNGQ1MzYwIn0="
        assert.equal(201, (b:call("PUT", inst("oi"), { service_id = D.service, plan_id = D.small, organization_guid = "o",
          space_guid = "s" }, { ["X-Broker-API-Originating-Identity"] = id })))
        assert.matches('"user_id":"683ea748%-3092%-4ff4%-b656%-39cacc4d5360"', b:read_log())
      end)
    end)
  end)
end

conformance(false)
conformance({ client_auth = "require" })
