-- Certificates made at test time with the openssl command line: a CA, a server certificate for
-- 127.0.0.1 and localhost, client certificates (one the CA signed, one a stranger CA signed).
local M = {}

local function sh(cmd)
  local p = io.popen("(" .. cmd .. ") 2>&1")
  local out = p:read("a")
  local ok = p:close()
  if not ok then error("openssl failed: " .. cmd .. "\n" .. out, 2) end
end

-- A CA at dir/<name>-ca.{pem,key}.
local function ca(dir, name)
  sh(string.format("openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 "
    .. "-subj '/CN=%s test CA' -keyout %s/%s-ca.key -out %s/%s-ca.pem", name, dir, name, dir, name))
end

-- A certificate dir/<name>.{pem,key} signed by CA `by`, with extensions `ext` and a given serial.
local function leaf(dir, name, by, cn, ext, serial)
  local extfile = dir .. "/" .. name .. ".ext"
  local f = assert(io.open(extfile, "w"))
  f:write(ext, "\n")
  f:close()
  sh(string.format("openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj '/CN=%s' "
    .. "-keyout %s/%s.key -out %s/%s.csr", cn, dir, name, dir, name))
  sh(string.format("openssl x509 -req -in %s/%s.csr -CA %s/%s-ca.pem -CAkey %s/%s-ca.key -set_serial 0x%s "
    .. "-days 2 -extfile %s -out %s/%s.pem", dir, name, dir, by, dir, by, serial, extfile, dir, name))
end

local SERVER_EXT = "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth"
local CLIENT_EXT = "extendedKeyUsage=clientAuth"

--- Make every certificate under dir; returns the paths: ca, server_cert, server_key, client_cert,
-- client_key, stranger_cert, stranger_key (a client certificate another CA signed), and
-- renew(serial) -> cert, key (a new server certificate from the same CA).
function M.make(dir)
  ca(dir, "test")
  ca(dir, "stranger")
  leaf(dir, "server", "test", "127.0.0.1", SERVER_EXT, "5e01")
  leaf(dir, "client", "test", "platform", CLIENT_EXT, "c001")
  leaf(dir, "stranger", "stranger", "platform", CLIENT_EXT, "c002")
  local t = { dir = dir, ca = dir .. "/test-ca.pem" }
  for _, n in ipairs({ "server", "client", "stranger" }) do
    t[n .. "_cert"], t[n .. "_key"] = dir .. "/" .. n .. ".pem", dir .. "/" .. n .. ".key"
  end
  function t.renew(serial)
    local name = "server-" .. serial
    leaf(dir, name, "test", "127.0.0.1", SERVER_EXT, serial)
    return dir .. "/" .. name .. ".pem", dir .. "/" .. name .. ".key"
  end
  return t
end

--- The serial (lowercase hex, as openssl prints it) of the certificate a TLS server at port shows.
function M.served_serial(port)
  local p = io.popen(string.format("openssl s_client -connect 127.0.0.1:%d -servername localhost </dev/null "
    .. "2>/dev/null | openssl x509 -noout -serial", port))
  local out = p:read("a")
  p:close()
  return out:match("serial=(%x+)") and out:match("serial=(%x+)"):lower()
end

return M
