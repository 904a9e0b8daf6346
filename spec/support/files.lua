-- File helpers for specs and benches.
local M = {}

--- The whole file, or "" when it cannot be read.
function M.read(path)
  local f = io.open(path, "rb")
  if not f then return "" end
  local s = f:read("a")
  f:close()
  return s
end

--- Write a file atomically (temp file + rename), as an editor saving it would.
function M.write(path, text)
  local f = assert(io.open(path .. ".tmp", "wb"))
  f:write(text)
  f:close()
  assert(os.rename(path .. ".tmp", path))
end

--- A new empty temporary directory; returns its path.
function M.tempdir()
  local p = os.tmpname()
  os.remove(p)
  assert(os.execute("mkdir -p " .. p))
  return p
end

--- Write text to a new temporary file; returns its path.
function M.temp(text)
  local p = os.tmpname()
  local f = assert(io.open(p, "w"))
  f:write(text)
  f:close()
  return p
end

return M
