-- forge.http over TLS: certificates made here with openssl, real curl and openssl s_client
-- clients, the server in this process (its pool threads serve while the spec waits on curl).
local client = require "spec.support.client"
local files = require "spec.support.files"
local http = require "forge.http"
local proc = require "forge.proc"
local shell = require "spec.support.shell"
local tls_certs = require "spec.support.tls_certs"

local free_port = require("spec.support.net").free_port

local dir = require("spec.support.broker").tmpdir()
local certs = tls_certs.make(dir)
local USER, PASSWORD = "platform", "pw-" .. math.random(1e6)

local function pem(cert, key, ca)
  return { cert = files.read(cert), key = files.read(key), client_ca = ca and files.read(ca) or nil }
end

local function serve(tls)
  local port = free_port()
  local srv = assert(http.serve { listen = "127.0.0.1:" .. port, handler = "spec.support.http_echo", threads = 2,
    tls = tls, auth = { users = { { username = USER, password = PASSWORD } }, public = { "/healthz" } } })
  return srv, port
end

local function url(port, path) return "https://127.0.0.1:" .. port .. path end

-- A request with the test CA and Basic credentials; cert: "client", "stranger" or nil.
local function get(port, path, cert, basic)
  return client.request("GET", url(port, path), { cacert = certs.ca,
    cert = cert and certs[cert .. "_cert"], key = cert and certs[cert .. "_key"],
    user = basic ~= false and USER or nil, password = PASSWORD })
end

-- openssl s_client's handshake with the server at port: true when it completed.
local function handshake(port, flags)
  local code, out = shell.run(string.format("openssl s_client -connect 127.0.0.1:%d -CAfile %s %s </dev/null",
    port, certs.ca, flags))
  return code == 0 and out:match("Verify return code: 0 %(ok%)") ~= nil
end

teardown(function() os.execute("rm -rf '" .. dir .. "'") end)

describe("forge.http with tls and no client_ca", function()
  local srv, port
  setup(function() srv, port = serve(pem(certs.server_cert, certs.server_key)) end)
  teardown(function() srv:stop(5) end)

  it("serves HTTPS to a client that trusts the CA, and none to one that does not", function()
    local status, _, _, body = get(port, "/x")
    assert.equal(200, status)
    assert.equal("/x", body.uri)
    assert.is_nil(body.client_cert)
    local code = shell.run("curl -s -o /dev/null --max-time 10 " .. url(port, "/healthz"))
    assert.equal(60, code) -- curl: the peer certificate cannot be authenticated
  end)

  it("speaks TLS 1.2 and 1.3 with AEAD ciphers only", function()
    assert.is_true(handshake(port, "-tls1_3"))
    assert.is_true(handshake(port, "-tls1_2 -cipher ECDHE-ECDSA-AES128-GCM-SHA256"))
    assert.is_true(handshake(port, "-tls1_2 -cipher ECDHE-ECDSA-CHACHA20-POLY1305"))
    assert.is_false(handshake(port, "-tls1_2 -cipher ECDHE-ECDSA-AES128-SHA"))
    assert.is_false(handshake(port, "-tls1_1 -cipher DEFAULT@SECLEVEL=0"))
  end)

  it("disconnects a plain HTTP client at once and goes on serving", function()
    local code = shell.run("curl -s -o /dev/null --max-time 10 http://127.0.0.1:" .. port .. "/healthz")
    assert.equal(52, code) -- curl: empty reply from server (not 28, a timeout)
    local status = get(port, "/healthz")
    assert.equal(200, status)
  end)

  it("swaps the certificate on reload_tls; a request in flight across it completes", function()
    assert.equal("5e01", tls_certs.served_serial(port))
    local out = os.tmpname()
    local slow = assert(proc.spawn { argv = { "curl", "-s", "--cacert", certs.ca, "-u", USER .. ":" .. PASSWORD,
      "-o", out, "-w", "%{http_code}", url(port, "/sleep1.5") }, stdout = out .. ".code" })
    assert.truthy(require("spec.support.broker").wait_for(function() return srv:active() > 0 end))
    local cert, key = certs.renew("5e02")
    local info = assert(srv:reload_tls(pem(cert, key)))
    assert.equal("5e02", info.serial)
    assert.equal("CN=127.0.0.1", info.subject)
    assert.equal("5e02", tls_certs.served_serial(port))
    assert.same({ code = 0 }, proc.wait(slow.pid, 20))
    assert.equal("200", files.read(out .. ".code"))
    assert.equal("/sleep1.5", require("cjson").decode(files.read(out)).uri)
    os.remove(out)
    os.remove(out .. ".code")
  end)

  it("keeps the running certificate when the new one does not load", function()
    local before = tls_certs.served_serial(port)
    local ok, err = srv:reload_tls(pem(certs.server_cert, certs.client_key))
    assert.is_nil(ok)
    assert.equal("http.tls", err.code)
    assert.matches("not the key of the certificate", err.message)
    assert.is_nil((srv:reload_tls { cert = "junk", key = files.read(certs.server_key) }))
    assert.equal(before, tls_certs.served_serial(port))
    assert.equal(200, (get(port, "/x")))
  end)

  it("refuses to add a client_ca by a reload", function()
    local ok, err = srv:reload_tls(pem(certs.server_cert, certs.server_key, certs.ca))
    assert.is_nil(ok)
    assert.matches("not added or removed", err.message)
  end)
end)

describe("forge.http with a client_ca", function()
  it("client_auth require: a certificate the CA signed, and Basic credentials too", function()
    local srv, port = serve(pem(certs.server_cert, certs.server_key, certs.ca))
    local status, _, _, body = get(port, "/x", "client")
    assert.equal(200, status)
    assert.equal("CN=platform", body.client_cert)
    assert.equal(401, (get(port, "/x", "client", false)))
    local s2, _, _, refused = get(port, "/x")
    assert.equal(403, s2)
    assert.equal("Forbidden", refused.error)
    assert.matches("certificate signed by the broker's client CA is required", refused.description)
    local s3, _, _, stranger = get(port, "/x", "stranger")
    assert.equal(403, s3)
    assert.matches("not one the broker's client CA signed", stranger.description)
    assert.equal(200, (get(port, "/healthz", nil, false))) -- public paths stay open to probes
    srv:stop(5)
  end)

  it("client_auth optional: a good certificate stands in for Basic credentials", function()
    local tls = pem(certs.server_cert, certs.server_key, certs.ca)
    tls.client_auth = "optional"
    local srv, port = serve(tls)
    assert.equal(200, (get(port, "/x", "client", false)))
    assert.equal(200, (get(port, "/x", nil, true)))
    assert.equal(401, (get(port, "/x", nil, false)))
    assert.equal(403, (get(port, "/x", "stranger", true)))
    srv:stop(5)
  end)

  it("client_auth cert: a good certificate is needed and is enough", function()
    local tls = pem(certs.server_cert, certs.server_key, certs.ca)
    tls.client_auth = "cert"
    local srv, port = serve(tls)
    assert.equal(200, (get(port, "/x", "client", false)))
    assert.equal(403, (get(port, "/x", nil, true)))
    srv:stop(5)
  end)

  it("verifies against the CA of a reload for new connections", function()
    local srv, port = serve(pem(certs.server_cert, certs.server_key, certs.ca))
    assert(srv:reload_tls(pem(certs.server_cert, certs.server_key, dir .. "/stranger-ca.pem")))
    assert.equal(200, (get(port, "/x", "stranger")))
    assert.equal(403, (get(port, "/x", "client")))
    srv:stop(5)
  end)
end)

describe("forge.http tls settings", function()
  it("returns nil, err for credentials that do not load; raises on misuse", function()
    local ok, err = http.serve { listen = "127.0.0.1:0", handler = "spec.support.http_echo",
      tls = pem(certs.server_cert, certs.client_key) }
    assert.is_nil(ok)
    assert.equal("http.tls", err.code)
    assert.has_error(function()
      http.serve { listen = "127.0.0.1:0", handler = "spec.support.http_echo",
        tls = { cert = files.read(certs.server_cert), key = files.read(certs.server_key), client_auth = "cert" } }
    end, "http.serve: tls.client_auth must be require, optional or cert, and needs client_ca")
    assert.has_error(function() http.serve { listen = "127.0.0.1:0", handler = "x", tls = { cert = "c" } } end)
  end)

  it("tls_check describes a good set and names what is wrong with a bad one", function()
    local info = assert(http.tls_check(pem(certs.server_cert, certs.server_key, certs.ca)))
    assert.equal("5e01", info.serial)
    assert.is_true(info.not_after > os.time())
    local _, err = http.tls_check(pem(certs.server_cert, certs.server_key, certs.server_key))
    assert.matches("^tls.client_ca: ", err.message)
    _, err = http.tls_check { cert = "not a certificate", key = files.read(certs.server_key) }
    assert.matches("^tls.cert: ", err.message)
  end)
end)
