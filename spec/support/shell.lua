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

--- Run the forge binary with `args` (shell words); returns exit code, output.
function M.forge(args) return M.run(M.FORGE .. " " .. args) end

return M
