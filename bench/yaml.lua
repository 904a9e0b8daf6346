-- bench/yaml.lua: forge.yaml merge of a ~1 MB generated manifest with two stubs,
-- against the floor of decoding + encoding the same bytes, in one run.
-- usage: lua5.4 bench/yaml.lua [target_bytes]   (run from the project root)
package.cpath = "build/lib/?.so;" .. package.cpath
local yaml = require "forge.yaml"

local target = tonumber(arg and arg[1]) or 1024 * 1024

local function now()
  return os.clock()
end

-- A BOSH-like manifest: many instance groups with jobs, properties and networks.
local function manifest(bytes)
  local parts = { "name: bench\nmeta:\n  env: prod\n  port: 6379\n  net: default\n",
    "networks:\n- name: default\n  subnets:\n  - range: 10.0.0.0/16\n    static: [10.0.0.10 - 10.0.200.250]\n",
    "instance_groups:\n" }
  local size, i = #parts[1] + #parts[2] + #parts[3], 0
  while size < bytes do
    i = i + 1
    local g = {}
    g[#g + 1] = ("- name: group%d\n  instances: %d\n  azs: [z1]\n  vm_type: default\n"):format(i, i % 3 + 1)
    g[#g + 1] = "  networks:\n  - name: (( grab meta.net ))\n"
    g[#g + 1] = "  jobs:\n"
    for j = 1, 4 do
      g[#g + 1] = ("  - name: job%d\n    release: rel%d\n    properties:\n"):format(j, j)
      g[#g + 1] = ("      port: (( grab meta.port ))\n      url: (( concat \"redis://\" meta.env \":\" meta.port ))\n")
      g[#g + 1] = ("      tags: [a%d, b%d, c%d]\n      limits: {cpu: %d, mem: %d, note: \"group %d job %d\"}\n")
        :format(i, j, i + j, j, i * j, i, j)
    end
    local s = table.concat(g)
    parts[#parts + 1] = s
    size = size + #s
  end
  return table.concat(parts), i
end

local text, groups = manifest(target)
local stub_net = "meta:\n  net: private\nnetworks:\n- name: private\n  subnets:\n  - range: 10.1.0.0/16\n"
local stub_plan = {}
stub_plan[#stub_plan + 1] = "meta:\n  port: 6380\ninstance_groups:\n"
for i = 1, groups, 7 do
  stub_plan[#stub_plan + 1] = ("- name: group%d\n  instances: 5\n  jobs:\n  - name: job1\n    properties:\n" ..
    "      limits: {mem: 4096}\n"):format(i)
end
stub_plan = table.concat(stub_plan)

local function best(n, f)
  local t = math.huge
  local out
  for _ = 1, n do
    collectgarbage()
    local t0 = now()
    out = f()
    local dt = now() - t0
    if dt < t then t = dt end
  end
  return t, out
end

local rounds = 5
local t_floor = best(rounds, function()
  local v = assert(yaml.decode(text))
  return assert(yaml.encode(v))
end)
local t_decode = best(rounds, function() return assert(yaml.decode(text)) end)
local t_merge, merged = best(rounds, function()
  return assert(yaml.merge({ text, stub_net, stub_plan }, { names = { "manifest.yml", "net.yml", "plan.yml" } }))
end)
local t_merge_enc = best(rounds, function()
  return assert(yaml.encode(assert(yaml.merge({ text, stub_net, stub_plan }))))
end)

local out = assert(yaml.encode(merged))
print(("input: %d bytes, %d instance groups, stubs %d + %d bytes; merged output %d bytes")
  :format(#text, groups, #stub_net, #stub_plan, #out))
print(("%-34s %9.1f ms"):format("decode", t_decode * 1000))
print(("%-34s %9.1f ms   (floor)"):format("decode + encode", t_floor * 1000))
print(("%-34s %9.1f ms   %.2fx floor"):format("merge (3 docs, operators, to Lua)", t_merge * 1000, t_merge / t_floor))
print(("%-34s %9.1f ms   %.2fx floor"):format("merge + encode", t_merge_enc * 1000, t_merge_enc / t_floor))
print(("best of %d rounds, os.clock()"):format(rounds))
