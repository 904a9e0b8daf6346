-- `forge serve` over HTTPS: the tls settings and their checks at start, the https URL, plain HTTP
-- refused, the certificate swapped on SIGHUP (a request in flight across it completes, a bad new
-- certificate is logged and the old one stays), client certificates in place of Basic
-- credentials, and the CLI's --cacert, --cert and --key. Certificates made at test time.
local Broker = require "spec.support.broker"
local client = require "spec.support.client"
local files = require "spec.support.files"
local proc = require "forge.proc"
local shell = require "spec.support.shell"
local tls_certs = require "spec.support.tls_certs"

local D = Broker.dummy

-- `forge ARGS --url <b>` with b's admin credentials: exit code, output (stderr included).
local function cli(b, args)
  return shell.run("env FORGE_ADMIN_USER='" .. b.admin_user .. "' FORGE_ADMIN_PASSWORD='" .. b.admin_password .. "' "
    .. shell.FORGE .. " " .. args .. " --url " .. b:url(""))
end

describe("forge serve with tls", function()
  local b
  setup(function() b = Broker.start { fixtures = true, tls = true } end)
  teardown(function() if b then b:cleanup() end end)

  it("prints and logs the https URL and the certificate", function()
    local url = "https://127.0.0.1:" .. b.port
    assert.matches("Service Forge listening on " .. url:gsub("%p", "%%%0") .. " ", b:read_log())
    assert.matches('"url":"' .. url:gsub("%p", "%%%0") .. '"', b:read_log())
    assert.matches('"serial":"5e01"', b:read_log())
  end)

  it("answers clients that trust its CA; curl without the CA refuses the broker", function()
    local status, _, _, body = b:call("GET", "/v2/catalog")
    assert.equal(200, status)
    assert.is_table(body.services)
    local code = shell.run("curl -s -o /dev/null --max-time 10 -u " .. b.user .. ":" .. b.password .. " " ..
      b:url("/v2/catalog"))
    assert.equal(60, code)
  end)

  it("refuses plain HTTP on its port cleanly and goes on", function()
    local code = shell.run("curl -s -o /dev/null --max-time 10 http://127.0.0.1:" .. b.port .. "/healthz")
    assert.equal(52, code)
    assert.equal(200, (b:call("GET", "/healthz")))
  end)

  it("swaps the certificate on SIGHUP; a request in flight across it completes", function()
    -- a provision whose body trickles in for about 4 s (padding the JSON with spaces)
    local body = files.temp('{"service_id":"' .. D.service .. '","plan_id":"' .. D.small ..
      '","organization_guid":"o","space_guid":"s"}' .. string.rep(" ", 8000))
    local out = os.tmpname()
    local slow = assert(proc.spawn { argv = { "curl", "-s", "--cacert", b.certs.ca, "-u", b.user .. ":" .. b.password,
      "-H", "X-Broker-API-Version: 2.17", "-H", "Content-Type: application/json", "--limit-rate", "2k", "-X", "PUT",
      "--data-binary", "@" .. body, "-o", "/dev/null", "-w", "%{http_code}", b:url("/v2/service_instances/hup") },
      stdout = out })
    proc.sleep(1)
    local cert, key = b.certs.renew("5e02")
    files.write(b.certs.server_cert, files.read(cert))
    files.write(b.certs.server_key, files.read(key))
    assert(proc.kill(b.pid, b.start_time, "HUP"))
    assert.equal("5e02", Broker.wait_for(function() return tls_certs.served_serial(b.port) == "5e02" and "5e02" end))
    assert.matches('"msg":"tls certificate reloaded".-"serial":"5e02"', b:read_log())
    assert.same({ code = 0 }, proc.wait(slow.pid, 30))
    assert.equal("201", files.read(out))
    os.remove(out)
    os.remove(body)
  end)

  it("keeps the running certificate when the new files do not load", function()
    files.write(b.certs.server_key, files.read(b.certs.client_key))
    assert(proc.kill(b.pid, b.start_time, "HUP"))
    assert.truthy(Broker.wait_for(function() return b:read_log():match('"msg":"tls reload failed') end))
    assert.matches("not the key of the certificate", b:read_log())
    assert.equal("5e02", tls_certs.served_serial(b.port))
    assert.equal(200, (b:call("GET", "/v2/catalog")))
  end)

  it("forge status takes --cacert (or FORGE_CACERT)", function()
    local code, out = cli(b, "status --cacert " .. b.certs.ca)
    assert.equal(0, code, out)
    code, out = shell.run("FORGE_CACERT=" .. b.certs.ca .. " env FORGE_ADMIN_USER='" .. b.admin_user ..
      "' FORGE_ADMIN_PASSWORD='" .. b.admin_password .. "' " .. shell.FORGE .. " status --url " .. b:url(""))
    assert.equal(0, code, out)
    code, out = cli(b, "status")
    assert.equal(1, code)
    assert.matches("no answer from https://127%.0%.0%.1:%d+: .*certificate", out)
  end)
end)

describe("forge serve with client certificates", function()
  it("client_auth optional: a good certificate stands in for the broker's credentials, not the admin's", function()
    local b = Broker.start { tls = { client_auth = "optional" } }
    local certs = b.certs
    local function get(path, cert, user, password)
      return client.request("GET", b:url(path), { cacert = certs.ca, cert = cert and certs[cert .. "_cert"],
        key = cert and certs[cert .. "_key"], user = user, password = password,
        headers = { ["X-Broker-API-Version"] = "2.17" } })
    end
    local ok, err = pcall(function()
      assert.equal(200, (get("/v2/catalog", "client")))
      assert.equal(200, (get("/v2/catalog", nil, b.user, b.password)))
      assert.equal(401, (get("/v2/catalog")))
      assert.equal(403, (get("/v2/catalog", "stranger", b.user, b.password)))
      assert.equal(401, (get("/admin/instances", "client")))
      assert.equal(200, (get("/admin/instances", "client", b.admin_user, b.admin_password)))
    end)
    b:cleanup()
    assert(ok, err)
  end)

  it("client_auth require: the CLI shows its certificate with --cert and --key", function()
    local b = Broker.start { tls = { client_auth = "require" } }
    local certs = b.certs
    local ok, err = pcall(function()
      local code, out = cli(b, "status --cacert " .. certs.ca .. " --cert " .. certs.client_cert .. " --key " ..
        certs.client_key)
      assert.equal(0, code, out)
      code, out = cli(b, "status --cacert " .. certs.ca)
      assert.equal(1, code)
      assert.matches("403 Forbidden: a client certificate signed by the broker's client CA is required", out)
      code, out = cli(b, "status --cacert " .. certs.ca .. " --cert " .. certs.client_cert)
      assert.equal(2, code)
      assert.matches("%-%-cert and %-%-key go together", out)
    end)
    b:cleanup()
    assert(ok, err)
  end)
end)

describe("forge serve with tls and sync waits", function()
  it("forgets a client that gives up mid-wait (it sends close_notify before its FIN)", function()
    local svc, plan = "5a0e5a0e-0000-4000-8000-000000000001", "5a0e5a0e-0000-4000-8000-000000000010"
    local b = Broker.start { services_dir = os.getenv("PWD") .. "/spec/fixtures/waits", tls = true,
      env = { FORGE_SYNC_TIMEOUT = "30", FORGE_LOCAL_COMMANDS = "sh,sleep" } }
    local function sockets()
      local n = 0
      for fd in require("lfs").dir("/proc/" .. b.pid .. "/fd") do
        if (require("lfs").symlinkattributes("/proc/" .. b.pid .. "/fd/" .. fd, "target") or ""):match("^socket:") then
          n = n + 1
        end
      end
      return n
    end
    local ok, err = pcall(function()
      local before = sockets()
      local r = proc.run { argv = { "curl", "-s", "--cacert", b.certs.ca, "--max-time", "1", "-u",
        b.user .. ":" .. b.password, "-X", "PUT", "-H", "X-Broker-API-Version: 2.17", "-H",
        "Content-Type: application/json", "--data-binary", require("cjson").encode { service_id = svc, plan_id = plan,
          organization_guid = "o", space_guid = "s", parameters = { delay = 600 } },
        b:url("/v2/service_instances/quitter") }, timeout = 10 }
      assert.equal(28, r.code) -- curl: operation timed out
      -- closed well before sync_timeout (30 s) would end the wait
      assert.truthy(Broker.wait_for(function() return sockets() <= before end, 5), "the broker kept the connection")
    end)
    b:cleanup()
    assert(ok, err)
  end)
end)

describe("forge serve's tls checks at start", function()
  local dir, certs
  setup(function()
    dir = Broker.tmpdir()
    certs = tls_certs.make(dir)
  end)
  teardown(function() os.execute("rm -rf '" .. dir .. "'") end)

  -- `forge serve` with these FORGE_TLS_* words: exit code, output.
  local function serve(env)
    return shell.run("cd " .. dir .. " && env FORGE_STATE_DIR=" .. dir .. "/state FORGE_LISTEN=127.0.0.1:1 " .. env ..
      " " .. shell.FORGE .. " serve")
  end

  it("refuses a key that is not the certificate's, an unreadable file, a client_ca without a certificate", function()
    local code, out = serve("FORGE_TLS_CERT=" .. certs.server_cert .. " FORGE_TLS_KEY=" .. certs.client_key)
    assert.equal(2, code)
    assert.matches("forge serve: tls.key: it is not the key of the certificate", out)
    code, out = serve("FORGE_TLS_CERT=" .. dir .. "/missing.pem FORGE_TLS_KEY=" .. certs.server_key)
    assert.equal(2, code)
    assert.matches("forge serve: tls.cert: cannot read .*missing.pem", out)
    code, out = serve("FORGE_TLS_CLIENT_CA=" .. certs.ca)
    assert.equal(2, code)
    assert.matches("tls.client_ca needs tls.cert and tls.key", out)
    code, out = serve("FORGE_TLS_CERT=" .. certs.server_cert)
    assert.equal(2, code)
    assert.matches("tls.cert and tls.key go together", out)
    code, out = serve("FORGE_TLS_CERT=" .. certs.server_cert .. " FORGE_TLS_KEY=" .. certs.server_key ..
      " FORGE_TLS_CLIENT_AUTH=cert")
    assert.equal(2, code)
    assert.matches("tls.client_auth needs tls.client_ca", out)
    code, out = serve("FORGE_TLS_CERT=" .. certs.server_cert .. " FORGE_TLS_KEY=" .. certs.server_key ..
      " FORGE_TLS_CLIENT_CA=" .. certs.ca .. " FORGE_TLS_CLIENT_AUTH=always")
    assert.equal(2, code)
    assert.matches("tls.client_auth must be require, optional or cert", out)
  end)
end)
