--- The registry of target drivers: `local` (processes on this machine) plus one driver per BOSH
-- director configured under `targets:` in forge.yml.
--
-- Which target a new instance goes to, first match wins:
--   1. the operator's config: a target whose `services` list names "<service>/<plan>";
--   2. the operator's config: a target whose `services` list names "<service>";
--   3. the service's rule: service.target_for(plan, params, names) returning a target name (or nil);
--   4. plan.target, then service.target (static names in the script);
--   5. "local".
-- The chosen name is stored in the instance record (`target`); every driver call afterwards goes
-- through `by_name[rec.target]`, so a record keeps its target when the config mapping changes.
local Local = require "forge.targets.local"

local M = {}
M.__index = M

--- Which target each claim of the config names: {"svc" or "svc/plan" -> target name}, from the
-- `services` lists of the BOSH targets (config.targets; the config refuses a claim made twice).
function M.claims(targets_cfg)
  local claims, names = {}, {}
  for name, cfg in pairs(targets_cfg or {}) do if cfg.type == "bosh" then names[#names + 1] = name end end
  table.sort(names)
  for _, name in ipairs(names) do
    for _, claim in ipairs(targets_cfg[name].services or {}) do claims[claim] = name end
  end
  return claims
end

--- Build the registry from the broker config (config.targets) and the state directory.
-- @return {by_name = {name -> driver}, default = "local", claims = {"svc" or "svc/plan" -> name}}
function M.new(config, state_dir)
  local self = setmetatable({ by_name = {}, default = "local", claims = M.claims(config.targets) }, M)
  self.by_name["local"] = Local.new(config.targets["local"], state_dir)
  self.by_name["local"].name, self.by_name["local"].kind = "local", "local"
  local names = {}
  for name in pairs(config.targets) do if name ~= "local" then names[#names + 1] = name end end
  table.sort(names)
  for _, name in ipairs(names) do
    local cfg = config.targets[name]
    if cfg.type == "bosh" then
      self.by_name[name] = require("forge.targets.bosh").new(name, cfg, state_dir)
    end
  end
  return self
end

--- Names of the configured targets, sorted.
function M:names()
  local l = {}
  for name in pairs(self.by_name) do l[#l + 1] = name end
  table.sort(l)
  return l
end

--- The target name for a new instance of `svc` (a registry service record) on `plan`.
-- @return name | nil, message
function M:choose(svc, plan, params)
  local name = self.claims[svc.name .. "/" .. plan.name] or self.claims[svc.name]
  if not name and svc.script.target_for then    -- a hook (shows as `true` outside the sandbox)
    local services = require "forge.services"
    local res, err = services.call(svc, "target_for", plan, params or {}, self:names())
    if err then return nil, "service " .. svc.name .. ": target_for failed: " .. err end
    if res ~= nil and type(res) ~= "string" then
      return nil, "service " .. svc.name .. ": target_for must return a target name or nil"
    end
    name = res
  end
  name = name or plan.target or svc.script.target or self.default
  if not self.by_name[name] then
    return nil, string.format("plan %s of service %s wants target '%s', which is not configured", plan.name,
      svc.name, tostring(name))
  end
  return name
end

--- The driver of an instance record (records written before targets existed are local).
-- @return driver | nil, message
function M:of(rec)
  local name = rec.target or self.default
  local d = self.by_name[name]
  if not d then return nil, "target '" .. tostring(name) .. "' of instance " .. tostring(rec.id) .. " is not configured" end
  return d
end

return M
