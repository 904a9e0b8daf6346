--- Service releases: the BOSH release and stemcell tarballs a service package carries under
-- releases/ and stemcells/ (or references by URL + sha1), listed in the package's releases.yml.
-- `forge install` uploads them to every BOSH director the service's plans are mapped to before it
-- installs the service, so a service is one step instead of `bosh upload-release`,
-- `bosh upload-stemcell` and an install.
--
--   releases:
--   - {name: redis, version: "18.0.0", file: releases/redis-18.0.0.tgz}        # sha1 optional
--   - {name: routing, version: "0.300.0", url: "https://…/routing-0.300.0.tgz", sha1: 9b1c…}
--   stemcells:
--   - {name: bosh-warden-boshlite-ubuntu-jammy-go_agent, version: "1.500", file: stemcells/jammy.tgz}
--
-- Everything that can be checked here is checked before the first upload: the manifest, each file
-- (inside releases/ or stemcells/, a regular file), its sha1 against the manifest's, and that its
-- release.MF / stemcell.MF names the manifest's name and version (what the director lists
-- afterwards, so that a re-run skips it). A director that already lists a name/version is skipped.
local lfs = require "lfs"
local proc = require "forge.proc"
local yaml = require "forge.yaml"

local M = {}

M.MANIFEST = "releases.yml"
M.KINDS = { "stemcell", "release" }          -- upload order: stemcells first, as bosh users do
local FOLDER = { release = "releases", stemcell = "stemcells" }
local TASK_TIMEOUT_MS = 3600 * 1000          -- an upload task (the director imports the tarball)
local HASH_TIMEOUT = 3600                    -- seconds to hash or read a tarball of many GB

--- The sha1 (hex) of a file. Returns hex | nil, message.
function M.sha1(path)
  local r, err = proc.run { argv = { "sha1sum", "--", path }, timeout = HASH_TIMEOUT }
  if not r then return nil, "cannot hash " .. path .. ": " .. tostring(err) end
  local hex = r.code == 0 and r.stdout:match("^(%x+)")
  if not hex then return nil, "cannot hash " .. path .. ": " .. (r.stderr:gsub("%s+$", "")) end
  return hex:lower()
end

--- The release.MF or stemcell.MF (kind "release" | "stemcell") of a tarball (any compression tar
-- reads), decoded; tar stops at the first copy instead of reading a large tarball to its end.
-- Returns a table with name and version | nil, message.
function M.tarball_manifest(path, kind)
  local mf = kind .. ".MF"
  local text
  for _, member in ipairs { "./" .. mf, mf } do
    local r = proc.run { argv = { "tar", "-xOf", path, "--occurrence=1", member }, timeout = HASH_TIMEOUT }
    if r and r.code == 0 and r.stdout ~= "" then
      text = r.stdout
      break
    end
  end
  if not text then return nil, "the tarball holds no " .. mf end
  local m = yaml.decode(text, mf)
  if type(m) ~= "table" or type(m.name) ~= "string" or m.version == nil then
    return nil, "its " .. mf .. " names no name and version"
  end
  m.version = tostring(m.version)
  return m
end

-- A manifest's version: a string, or an integer (`version: 7`); a float like 1.50 would lose digits.
local function version_of(v)
  if type(v) == "string" and v ~= "" then return v end
  if math.type(v) == "integer" then return tostring(v) end
  return nil
end

-- Check one manifest entry; adds to problems. Returns the entry
-- {kind, name, version, label, file? (absolute), url?, sha1?} or nil.
local function entry(folder, kind, i, e, problems)
  local where = M.MANIFEST .. ": " .. FOLDER[kind] .. "[" .. i .. "]"
  local function bad(msg)
    problems[#problems + 1] = where .. " " .. msg
    return nil
  end
  if type(e) ~= "table" then return bad("must be a map {name, version, file | url + sha1}") end
  local version = version_of(e.version)
  if type(e.name) ~= "string" or e.name == "" then return bad("has no name") end
  if not version then return bad("(" .. e.name .. ") needs a version, as a quoted string") end
  local label = kind .. " " .. e.name .. "/" .. version
  where = where .. " (" .. e.name .. "/" .. version .. ")"
  if e.sha1 ~= nil and (type(e.sha1) ~= "string" or not e.sha1:match("^%x+$") or #e.sha1 ~= 40) then
    return bad("sha1 must be 40 hex digits")
  end
  local out = { kind = kind, name = e.name, version = version, label = label, sha1 = e.sha1 and e.sha1:lower() }
  if (e.file == nil) == (e.url == nil) then return bad("needs either file or url") end
  if e.url ~= nil then
    if type(e.url) ~= "string" or not e.url:match("^https?://.") then return bad("url must be http:// or https://") end
    if not out.sha1 then return bad("needs the sha1 of " .. e.url .. " (the director checks it)") end
    out.url = e.url
    return out
  end
  local rel = tostring(e.file)
  if not rel:match("^" .. FOLDER[kind] .. "/[^/]") or rel:find("..", 1, true) then
    return bad("file must be a path under " .. FOLDER[kind] .. "/ in the package")
  end
  out.file = folder .. "/" .. rel
  if lfs.symlinkattributes(out.file, "mode") ~= "file" then return bad("file " .. rel .. " is missing from the package") end
  local sha1, herr = M.sha1(out.file)
  if not sha1 then return bad(herr) end
  if out.sha1 and out.sha1 ~= sha1 then
    return bad("sha1 mismatch: the manifest says " .. out.sha1 .. ", " .. rel .. " has " .. sha1)
  end
  out.sha1 = sha1
  local mf, merr = M.tarball_manifest(out.file, kind)
  if not mf then return bad(rel .. ": " .. merr) end
  if mf.name ~= e.name or mf.version ~= version then
    return bad(rel .. " is " .. mf.name .. "/" .. mf.version .. " by its " .. kind .. ".MF")
  end
  return out
end

--- Read and check the releases.yml of an extracted service folder.
-- @return entries (stemcells first; {} without a manifest) | nil, problems (a list of messages)
function M.read(folder)
  local path = folder .. "/" .. M.MANIFEST
  if not lfs.symlinkattributes(path, "mode") then return {} end
  local f = io.open(path, "rb")
  local doc, err
  if f then
    doc, err = yaml.decode(f:read("a"), M.MANIFEST)
    f:close()
  else
    err = "cannot read it"
  end
  if type(doc) ~= "table" then return nil, { M.MANIFEST .. ": " .. tostring(err or "must be a map") } end
  local entries, problems = {}, {}
  for key in pairs(doc) do
    if key ~= "releases" and key ~= "stemcells" then problems[#problems + 1] = M.MANIFEST .. ": unknown key " .. tostring(key) end
  end
  for _, kind in ipairs(M.KINDS) do
    local list = doc[FOLDER[kind]]
    if list ~= nil and yaml.kind(list) ~= "seq" then
      problems[#problems + 1] = M.MANIFEST .. ": " .. FOLDER[kind] .. " must be a list"
    else
      for i, e in ipairs(list or {}) do entries[#entries + 1] = entry(folder, kind, i, e, problems) end
    end
  end
  if #problems > 0 then return nil, problems end
  return entries
end

--- Remove the tarball folders from an extracted service folder (they live on the directors once
-- uploaded; the services dir keeps only releases.yml). Returns true | nil, message.
function M.drop_tarballs(folder)
  for _, kind in ipairs(M.KINDS) do
    local r = proc.run { argv = { "rm", "-rf", "--", folder .. "/" .. FOLDER[kind] } }
    if not r or r.code ~= 0 then return nil, "cannot remove " .. folder .. "/" .. FOLDER[kind] end
  end
  return true
end

--- The BOSH targets the plans of a service (its script data) are mapped to, as the broker picks
-- them (forge.targets): the config's claims, else plan.target / service.target. A service with a
-- target_for hook may choose any target per request, so it gets every BOSH target.
-- @param targets_cfg config.targets
-- @return sorted list of target names
function M.targets(script, targets_cfg)
  local claims = require("forge.targets").claims(targets_cfg)
  local bosh, chosen = {}, {}
  for name, cfg in pairs(targets_cfg or {}) do if cfg.type == "bosh" then bosh[name] = true end end
  for _, plan in ipairs(script.plans) do
    local name = claims[script.name .. "/" .. plan.name] or claims[script.name]
    if not name and script.target_for then
      for n in pairs(bosh) do chosen[n] = true end
    end
    name = name or plan.target or script.target
    if name and bosh[name] then chosen[name] = true end
  end
  local list = {}
  for n in pairs(chosen) do list[#list + 1] = n end
  table.sort(list)
  return list
end

-- A forge.bosh error as a reason a user can act on.
local function reason(err)
  local code, msg = err and err.code, tostring(err and err.message or err)
  if code == "bosh.unreachable" then return "unreachable: " .. msg end
  if code == "bosh.auth" then return "refused the credentials: " .. msg end
  if code == "bosh.bad_request" or code == "bosh.not_found" then
    return "refused the upload: " .. msg
  end
  return tostring(err)
end

-- What a director already has: set of "release name/version" and "stemcell name/version".
-- @return set | nil, err
local function present(d)
  local have = {}
  local rels, err = d:releases()
  if not rels then return nil, err end
  for _, r in ipairs(rels) do
    for _, v in ipairs(r.release_versions or {}) do have["release " .. r.name .. "/" .. v.version] = true end
  end
  local scs, serr = d:stemcells()
  if not scs then return nil, serr end
  for _, s in ipairs(scs) do have["stemcell " .. s.name .. "/" .. s.version] = true end
  return have
end

-- Upload one entry and wait for its task. say(text) prints progress.
-- @return true | nil, message, err (the forge.bosh error when the director did not answer)
local function upload_one(d, e, say)
  local started = proc.monotonic()
  say("  uploading ", e.label, e.file and (" (" .. lfs.attributes(e.file, "size") .. " bytes)") or (" from " .. e.url),
    " ...")
  local id, err = d["upload_" .. e.kind](d, e.file or e.url, e.sha1)
  if not id then return nil, e.label .. ": " .. reason(err), err end
  local t, werr = d:wait_task(id, { timeout_ms = TASK_TIMEOUT_MS, poll_ms = 200 })
  if not t then return nil, e.label .. ": task " .. id .. ": " .. reason(werr), werr end
  if t.state ~= "done" then
    return nil, string.format("%s: task %s ended %s: %s", e.label, id, t.state,
      require("forge.targets.bosh").task_reason(d, t))
  end
  say(string.format("  %s uploaded (task %s, %.1f s)", e.label, id, proc.monotonic() - started))
  return true
end

-- Upload what one director lacks. Returns a list of problems (empty when all is there).
local function publish(name, cfg, entries, say)
  local d, err = require("forge.targets.bosh").new(name, cfg):connect(cfg.timeout_ms or 10000)
  local where = "director " .. name .. " (" .. tostring(cfg.url) .. ")"
  if not d then return { where .. ": " .. reason(err) } end
  say(where, ":")
  local have, herr = present(d)
  if not have then
    d:close()
    return { where .. " " .. reason(herr) }
  end
  local problems = {}
  for _, e in ipairs(entries) do
    if have[e.label] then
      say("  ", e.label, " is there already, skipped")
    else
      local ok, msg, uerr = upload_one(d, e, say)
      if not ok then
        say("  failed: ", msg)
        problems[#problems + 1] = where .. ": " .. msg
        if uerr and uerr.code ~= "bosh.bad_request" and uerr.code ~= "bosh.not_found" then break end
      end
    end
  end
  d:close()
  return problems
end

--- "1 stemcell and 2 releases" for a list of entries.
function M.count(entries)
  local n = { release = 0, stemcell = 0 }
  for _, e in ipairs(entries) do n[e.kind] = n[e.kind] + 1 end
  local function phrase(k) return n[k] .. " " .. k .. (n[k] == 1 and "" or "s") end
  return phrase("stemcell") .. " and " .. phrase("release")
end

--- Upload the entries to each named target (config.targets[name]), skipping what a director
-- lists already. A failure on one director does not stop the others (a re-run has less to do).
-- @param say function(...) printing one progress line
-- @return true | nil, problems
function M.upload(entries, targets_cfg, names, say)
  local problems = {}
  for _, name in ipairs(names) do
    for _, p in ipairs(publish(name, targets_cfg[name], entries, say)) do problems[#problems + 1] = p end
  end
  if #problems > 0 then return nil, problems end
  return true
end

return M
