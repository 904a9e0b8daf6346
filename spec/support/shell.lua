-- Running commands from specs: a shell command's exit code and output, and the forge binary.
local M = {}

M.FORGE = os.getenv("PWD") .. "/build/bin/forge"

--- Run a shell command; returns its exit code and its output (stderr included).
function M.run(cmd)
  local p = io.popen(cmd .. " 2>&1")
  local out = p:read("a")
  local _, _, code = p:close()
  return code, out
end

--- A shell command's standard output (its exit status is not looked at).
function M.output(cmd)
  local p = assert(io.popen(cmd))
  local out = p:read("a")
  p:close()
  return out
end

--- Run the forge binary with `args` (shell words); returns exit code, output.
function M.forge(args) return M.run(M.FORGE .. " " .. args) end

--- Status codes of `n` concurrent requests to broker b, `make(i)` giving each one's curl arguments.
function M.concurrently(b, n, make)
  local script = os.tmpname()
  local f = assert(io.open(script, "w"))
  for i = 1, n do
    f:write("curl -s -o /dev/null -w '%{http_code}\\n' --max-time 60 -u '", b.user, ":", b.password,
      "' -H 'X-Broker-API-Version: 2.17' -H 'Content-Type: application/json' ", make(i), " &\n")
  end
  f:write("wait\n")
  f:close()
  local p = io.popen("sh " .. script)
  local codes = {}
  for line in p:lines() do codes[#codes + 1] = tonumber(line) end
  p:close()
  os.remove(script)
  return codes
end

return M
