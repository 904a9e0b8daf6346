-- Network helpers for specs.
local proc = require "forge.proc"

local M = {}

--- A TCP port free on 127.0.0.1, below the kernel's ephemeral range (so no client connection
-- holds it), in [lo, hi] (default 20000-29999).
function M.free_port(lo, hi)
  for _ = 1, 200 do
    local p = math.random(lo or 20000, hi or 29999)
    if proc.port_free(p) then return p end
  end
  error("no free port")
end

return M
