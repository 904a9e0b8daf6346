--- What an update or upgrade would change, as a unified diff of the instance's rendering (what
-- it runs now) against the rendering of a copy of its record after the change, secrets masked.
-- The admin API (GET /admin/instances/:id/diff), every update operation (op.diff) and the fleet
-- upgrade (forge.upgrades) use it.
--
-- The diff itself is `diff -u` run through forge.proc on two temp files holding masked text: the
-- tool every operator reads, and no diff algorithm of our own to maintain.
local proc = require "forge.proc"
local util = require "forge.util"
local yaml = require "forge.yaml"

local M = {}

-- A stored diff (op.diff) is cut at this size: a record stays small.
M.CAP = 16384

-- Credentials fields whose names end in one of these words hold secrets.
local SECRET_FIELD = { password = true, secret = true, token = true, uri = true, url = true, key = true }

-- Does a credentials field hold a secret? Its name ends in one of SECRET_FIELD's words (admin_password, uri).
local function secret_field(k)
  return type(k) == "string" and SECRET_FIELD[k:lower():match("(%a+)$") or ""] == true
end

--- Every secret of an instance (`rec.secrets`) and of its bindings (their credentials' secret
-- fields; `bindings` as model.range returns them): the strings to mask wherever they appear.
function M.secrets(rec, bindings)
  local found = {}
  local function walk(v, secret)
    if type(v) == "string" then
      if secret and #v >= 4 then found[#found + 1] = v end
    elseif type(v) == "table" then
      for k, x in pairs(v) do walk(x, secret or secret_field(k)) end
    end
  end
  walk(rec.secrets, true)
  for _, kv in ipairs(bindings or {}) do walk(kv.value.credentials, false) end
  -- longest first, so a secret that contains another is masked whole
  table.sort(found, function(x, y) return #x > #y end)
  return found
end

--- `value` with every occurrence of the secrets replaced by ********.
function M.mask(value, secrets)
  if value == nil then return nil end
  local text = util.json_encode(value)
  for _, s in ipairs(secrets) do
    local json = util.json_encode(s):sub(2, -2)       -- as the secret appears inside a JSON string
    text = text:gsub(json:gsub("%p", "%%%0"), "********")
  end
  return util.json_decode(text)
end

--- What a record runs, as one table: local processes (with their config files and commands),
-- ports, user and limits; or the BOSH manifest. Two records run the same iff these are equal.
function M.rendering(rec)
  if (rec.target or "local") ~= "local" then return { manifest = rec.manifest } end
  return { deployment = rec.deployment, ports = rec.resources and rec.resources.ports, run_as = rec.run_as,
    limits = rec.limits }
end

-- The rendering as YAML text (sorted keys, config files as blocks); a BOSH manifest is already text.
local function text_of(rendering)
  if rendering.manifest then return rendering.manifest end
  local text = yaml.encode(rendering)
  return text or util.json_encode_sorted(rendering)
end

local function write_temp(text)
  local path = os.tmpname()          -- mode 0600; the text is masked anyway
  local f = assert(io.open(path, "w"))
  f:write(text)
  f:close()
  return path
end

--- The unified diff from text `a` to text `b` ("" when equal), with `labels` {from, to}.
-- @return text | nil, message (diff could not run)
function M.unified(a, b, labels)
  if a == b then return "" end
  local fa, fb = write_temp(a), write_temp(b)
  local res, err = proc.run { argv = { "diff", "-u", "--label", labels[1], "--label", labels[2], fa, fb },
    env = { PATH = os.getenv("PATH") or "/usr/bin:/bin" }, timeout = 20, max_output = 1 << 22 }
  os.remove(fa)
  os.remove(fb)
  if not res then return nil, "diff failed: " .. tostring(err and err.message or err) end
  if res.code > 1 then return nil, "diff failed: " .. res.stderr end
  return res.stdout
end

--- The change from record `old` to record `new` (a rendered copy): whether what runs changes,
-- and the masked unified diff of the two renderings ("" when unchanged).
-- @return changed, diff text | nil, message
function M.between(old, new, secrets, labels)
  local before, after = M.rendering(old), M.rendering(new)
  local changed = not util.deep_equal(before, after)
  if not changed then return false, "" end
  local text, err = M.unified(text_of(M.mask(before, secrets)), text_of(M.mask(after, secrets)), labels)
  if not text then return nil, err end
  if text == "" then text = "(only masked values change)\n" end
  return true, text
end

--- A diff cut to M.CAP bytes, for an operation record.
function M.capped(text)
  if not text or #text <= M.CAP then return text end
  return text:sub(1, M.CAP) .. string.format("\n... (cut: the diff has %d bytes)\n", #text)
end

return M
