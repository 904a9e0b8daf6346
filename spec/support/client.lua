-- A minimal HTTP client for specs, on the curl command line tool.
local cjson = require "cjson.safe"

local M = {}

local function q(s) return "'" .. tostring(s):gsub("'", "'\\''") .. "'" end

local function tmpfile()
  local p = os.tmpname()
  return p
end

--- request(method, url, {body=, headers={}, user=, password=, form = {...}, cacert=, cert=, key=})
-- cacert: the CA file an https URL's server certificate must chain to; cert, key: a client certificate.
-- @return status, body (raw), headers (lowercase names), json (decoded body or nil)
function M.request(method, url, opts)
  opts = opts or {}
  local out, hdr = tmpfile(), tmpfile()
  local args = { "curl", "-s", "-g", "--path-as-is", "-X", method, "-o", out, "-D", hdr, "-w", "%{http_code}",
    "--max-time", tostring(opts.timeout or 30) }
  for _, o in ipairs({ "cacert", "cert", "key" }) do
    if opts[o] then args[#args + 1] = "--" .. o; args[#args + 1] = opts[o] end
  end
  if opts.user then args[#args + 1] = "-u"; args[#args + 1] = opts.user .. ":" .. (opts.password or "") end
  for k, v in pairs(opts.headers or {}) do args[#args + 1] = "-H"; args[#args + 1] = k .. ": " .. v end
  local bodyfile
  if opts.body then
    bodyfile = tmpfile()
    local f = assert(io.open(bodyfile, "wb"))
    f:write(opts.body)
    f:close()
    args[#args + 1] = "--data-binary"
    args[#args + 1] = "@" .. bodyfile
  end
  args[#args + 1] = url
  local cmd = {}
  for i, a in ipairs(args) do cmd[i] = q(a) end
  local p = assert(io.popen(table.concat(cmd, " ")))
  local code = p:read("a")
  p:close()
  local f = assert(io.open(out, "rb"))
  local body = f:read("a")
  f:close()
  local headers = {}
  local hf = assert(io.open(hdr, "rb"))
  for line in hf:lines() do
    local k, v = line:match("^([^:]+):%s*(.-)%s*$")
    if k then headers[k:lower()] = v end
  end
  hf:close()
  os.remove(out)
  os.remove(hdr)
  if bodyfile then os.remove(bodyfile) end
  return tonumber(code), body, headers, cjson.decode(body)
end


--- Send many requests at once (curl --parallel). Each request: {method, url, body, headers,
-- user, password}. Returns an array of {status=, body=, json=} in the same order.
function M.parallel(requests, max)
  local dir = os.tmpname()
  os.remove(dir)
  assert(os.execute("mkdir -p " .. dir))
  local cfg = {}
  local function opt(k, v)
    local escaped = tostring(v):gsub('\\', '\\\\'):gsub('"', '\\"')
    cfg[#cfg + 1] = string.format('%s = "%s"', k, escaped)
  end
  for i, r in ipairs(requests) do
    if i > 1 then cfg[#cfg + 1] = "next" end
    opt("url", r.url)
    opt("request", r.method)
    opt("output", dir .. "/out" .. i)
    opt("write-out", "%{http_code} %{filename_effective}\\n")
    if r.user then opt("user", r.user .. ":" .. (r.password or "")) end
    for k, v in pairs(r.headers or {}) do opt("header", k .. ": " .. v) end
    if r.body then
      local f = assert(io.open(dir .. "/in" .. i, "wb"))
      f:write(r.body)
      f:close()
      opt("data-binary", "@" .. dir .. "/in" .. i)
    end
  end
  local f = assert(io.open(dir .. "/config", "w"))
  f:write(table.concat(cfg, "\n"), "\n")
  f:close()
  local p = assert(io.popen("curl -s --no-progress-meter -g --path-as-is --parallel --parallel-immediate --parallel-max " ..
    (max or 100) .. " -K " .. dir .. "/config"))
  local results = {}
  for line in p:lines() do
    local code, file = line:match("^(%d+) (.*)$")
    local i = file and tonumber(file:match("out(%d+)$"))
    if i then
      local bf = io.open(file, "rb")
      local body = bf and bf:read("a") or ""
      if bf then bf:close() end
      results[i] = { status = tonumber(code), body = body, json = cjson.decode(body) }
    end
  end
  p:close()
  os.execute("rm -rf " .. dir)
  return results
end

return M
