-- Per-call cost of sb:call (copy ctx in, limits armed, call, copy result and ctx out)
-- against a direct call of the same function in the broker's own state.
--   lua5.4 bench/sandbox.lua [iterations]
package.path = "scripts/?.lua;scripts/?/init.lua;spec/?.lua;./?.lua;" .. package.path
package.cpath = "build/lib/?.so;" .. package.cpath

local sandbox = require "forge.sandbox"
local flog = require "forge.log"

flog.level("error")
local N = tonumber(arg and arg[1]) or 20000

local read = require("spec.support.files").read

local TEMPLATES = { ["local.yml"] = read("services/redis/templates/local.yml") }

local function ctx()
  return { instance_id = "i1", binding_id = "b1", plan = { nodes = 3 }, host = "127.0.0.1",
    ports = { 1, 2, 3 }, dir = "/tmp/x", secrets = { admin_password = "pw" }, parameters = {},
    templates = TEMPLATES }
end

local function clock(n, f)
  local t0 = os.clock()
  for _ = 1, n do f() end
  return (os.clock() - t0) / n * 1e6 -- µs per call
end

local src = read("services/redis/service.lua")
local sb = sandbox.new{ name = "redis" }
assert(sb:load(src, "@services/redis/service.lua"))
-- the same script loaded straight into this state, with the same capabilities
local env = setmetatable({ forge = { crypto = require "forge.crypto", yaml = require "forge.yaml",
  conf = require "forge.conf", json = require "cjson", log = flog } }, { __index = _G })
local direct = { script = assert(load(src, "@services/redis/service.lua", "t", env))() }

local function direct_call(hook)
  local c = ctx()
  local secrets = c.secrets
  c.secret = function(name) return secrets[name] end
  return direct.script[hook](c)
end

-- a trivial hook: the fixed cost of a call
local tiny = sandbox.new{ name = "tiny" }
assert(tiny:load("return { f = function(ctx) return ctx.n end }"))
local function tiny_direct(c) return c.n end

print(string.format("%-22s %12s %12s %8s", "function", "direct µs", "sandbox µs", "ratio"))
local function row(name, d, s)
  print(string.format("%-22s %12.2f %12.2f %8.1f", name, d, s, s / d))
end

for _, hook in ipairs({ "deploy", "bind", "unbind" }) do
  direct_call(hook); sb:call(hook, ctx()) -- warm up
  local d = clock(N, function() direct_call(hook) end)
  local s = clock(N, function() assert(sb:call(hook, ctx())) end)
  row("redis " .. hook, d, s)
end
local d = clock(N * 10, function() tiny_direct({ n = 1 }) end)
local s = clock(N * 10, function() tiny:call("f", { n = 1 }) end)
row("trivial f(ctx)", d, s)
print(string.format("fixed overhead of sb:call ≈ %.2f µs; sandbox memory: redis %d bytes, trivial %d bytes",
  s - d, sb:memory(), tiny:memory()))
local t0 = os.clock()
for _ = 1, 200 do
  local x = sandbox.new{ name = "redis" }
  assert(x:load(src, "@services/redis/service.lua"))
  x:close()
end
print(string.format("sandbox.new + load of redis: %.0f µs", (os.clock() - t0) / 200 * 1e6))
