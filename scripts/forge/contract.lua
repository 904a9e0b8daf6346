--- The service author's contract: the shape of every value a hook may return, checked in one
-- place for `forge check`, `forge install`, hot reload, broker start and every request.
--
-- docs/authoring.md documents each field below (a spec checks that every field name known
-- here appears there). A value is checked against a shape; a problem names the field's path
-- (`processes[1].health.argv`) and, when the script is at hand, the line of service.lua that
-- most likely wrote it (the field's first mention after the hook's definition).
local M = {}

-- Shapes ------------------------------------------------------------------------------------

local function scalar(desc, test) return { desc = desc, test = test } end

local STRING = scalar("a string", function(v) return type(v) == "string" end)
local TEXT = STRING
local POSITIVE = scalar("a positive number", function(v) return type(v) == "number" and v > 0 end)
local PORT = scalar("a port number (1-65535)", function(v)
  return math.type(v) == "integer" and v >= 1 and v <= 65535
end)
local NAME = scalar("a simple name (letters, digits, '-', '_', '.')", function(v)
  return type(v) == "string" and v:match("^[%w][%w%-_%.]*$") ~= nil and #v <= 64
end)
local RELPATH = scalar("a relative path inside the instance directory", function(v)
  return type(v) == "string" and v ~= "" and v:sub(1, 1) ~= "/" and not ("/" .. v .. "/"):find("/%.%./")
    and not v:find("%z")
end)
local SIGNALS = { TERM = true, INT = true, QUIT = true, HUP = true, USR1 = true, USR2 = true, KILL = true }
local SIGNAL = scalar("a signal name (TERM, INT, QUIT, HUP, USR1, USR2, KILL)", function(v)
  return type(v) == "string" and SIGNALS[v:upper():gsub("^SIG", "")] ~= nil
end)
local TABLE = scalar("a table", function(v) return type(v) == "table" end)
local BOOLEAN = scalar("a boolean", function(v) return type(v) == "boolean" end)
local ARG = scalar("a string or a number", function(v) return type(v) == "string" or type(v) == "number" end)
local DOCUMENT = scalar("a template name, YAML text or a table", function(v)
  return type(v) == "string" or type(v) == "table"
end)

local function list(of, min) return { list = of, min = min or 0 } end
local function map(of, key) return { map = of, key = key or STRING } end

-- A record: known fields, which are required, and at most one of `one_of` (exactly one when
-- one_of.required).
local function record(name, fields, opts)
  opts = opts or {}
  return { record = name, fields = fields, required = opts.required or {}, one_of = opts.one_of }
end

local ENV = map(STRING)

local REDIS = record("redis command list", {
  host = STRING, port = PORT, user = STRING, password = STRING,
  commands = list(list(ARG, 1), 1), expect = list(STRING), flush = list(ARG, 1),
}, { required = { "port", "commands" } })

-- A SQL statement: {sql, params...} (parameterised) or {format = "... %I ... %L ...", args = {...}}.
local STATEMENT = scalar("a statement: {sql, params...} or {format = ..., args = {...}}", function(v)
  if type(v) ~= "table" then return false end
  if v.format ~= nil then
    if type(v.format) ~= "string" or (v.args ~= nil and type(v.args) ~= "table") then return false end
    for k in pairs(v) do if k ~= "format" and k ~= "args" then return false end end
    for _, a in ipairs(v.args or {}) do if type(a) ~= "string" and type(a) ~= "number" then return false end end
    return true
  end
  if type(v[1]) ~= "string" then return false end
  local n = 0
  for _ in pairs(v) do n = n + 1 end
  for i = 2, #v do if type(v[i]) ~= "string" and type(v[i]) ~= "number" then return false end end
  return n == #v
end)

local PG = record("pg statement list", {
  host = STRING, port = PORT, user = STRING, password = STRING, database = STRING,
  statements = list(STATEMENT, 1), expect = list(STRING), tolerate = list(STRING),
}, { required = { "port", "user", "statements" } })

local COMMAND_FIELDS = { argv = list(STRING, 1), env = ENV, stdin = TEXT, expect = list(STRING),
  tolerate = list(STRING), redis = REDIS, pg = PG }
local COMMAND = record("command", COMMAND_FIELDS, { one_of = { "argv", "redis", "pg", required = true } })

local HEALTH_FIELDS = { tcp = PORT }
for k, v in pairs(COMMAND_FIELDS) do HEALTH_FIELDS[k] = v end
local HEALTH = record("health check", HEALTH_FIELDS, { one_of = { "argv", "redis", "pg", "tcp", required = true } })

local INIT = record("init command", { argv = list(STRING, 1), env = ENV, stdin = TEXT, creates = RELPATH,
  fresh = RELPATH, tolerate = list(STRING) }, { required = { "argv" } })

local PROCESS = record("process", {
  name = NAME, argv = list(STRING, 1), env = ENV, files = map(TEXT, RELPATH), seed_files = map(TEXT, RELPATH),
  health = HEALTH, init = list(INIT), stop_signal = SIGNAL, stop_timeout = POSITIVE, after = list(NAME),
}, { required = { "name", "argv" } })

--- What each hook may return (local target hooks and the BOSH manifest hook).
M.shapes = {
  deploy = record("deployment", { processes = list(PROCESS, 1), setup = list(COMMAND) },
    { required = { "processes" } }),
  bind = record("binding", { credentials = TABLE, run = list(COMMAND) }, { required = { "credentials" } }),
  unbind = record("unbinding", { run = list(COMMAND) }),
  manifest = record("manifest", { documents = list(DOCUMENT, 1), params = TABLE, prune = list(STRING) },
    { required = { "documents" } }),
  -- what to run, await and copy for a backup; files: name in the backup -> path in the instance dir
  backup = record("backup", { run = list(COMMAND), ready = HEALTH, files = map(RELPATH, NAME) },
    { required = { "files" } }),
  -- how to put a backup back (a string instead refuses the restore)
  restore = record("restore", { stop = BOOLEAN, remove = list(RELPATH), put = map(NAME, RELPATH),
    write = map(TEXT, RELPATH), prepare = list(COMMAND), run = list(COMMAND), notes = list(STRING) }),
}

local COUNT = scalar("a positive integer", function(v) return math.type(v) == "integer" and v > 0 end)

-- Resource limits of an instance on the local target (the operator's defaults fill the rest).
local LIMITS = record("limits", { memory_mb = COUNT, pids = COUNT, cpu_shares = COUNT, files = COUNT })

-- Fields of the service table (service.lua's returned table) beyond the OSB catalog fields,
-- and of each plan; anything else in a plan is the author's own data (ctx.plan).
M.script_fields = { commands = list(STRING), user = NAME, target = STRING, limits = LIMITS }
M.plan_fields = { user = NAME, target = STRING, limits = LIMITS }

-- Checking ----------------------------------------------------------------------------------

local function sorted_keys(t)
  local keys = {}
  for k in pairs(t) do keys[#keys + 1] = k end
  table.sort(keys, function(a, b) return tostring(a) < tostring(b) end)
  return keys
end

-- The keys of t with their values: in order when `ordered` (problems are then reported in a
-- stable order), else as next() finds them.
local function each_key(t, ordered)
  if not ordered then return next, t end
  local keys, i = sorted_keys(t), 0
  return function()
    i = i + 1
    local k = keys[i]
    if k ~= nil then return k, t[k] end
  end
end

local function is_sequence(v)
  local n = 0
  for _ in pairs(v) do n = n + 1 end
  return n == #v
end

local function describe(shape)
  if shape.desc then return shape.desc end
  if shape.list then return "a list" end
  if shape.map then return "a table of names to values" end
  return "a " .. shape.record .. " table"
end

-- check() runs in two modes. With a path (a string, "" at the top), it appends up to 20
-- problems {path, field, message} in key order. With path nil it only asks whether there is
-- one: unordered, building no path string, stopping at the first. Every hook result of every
-- request is checked, and nearly all of them fit.
local check

local function check_record(shape, v, path, out)
  for k, x in each_key(v, path ~= nil) do
    local sub = path and (path == "" and tostring(k) or path .. "." .. tostring(k))
    if type(k) ~= "string" or not shape.fields[k] then
      out[#out + 1] = { path = sub, field = tostring(k), message = path and string.format(
        "unknown field (a %s has: %s)", shape.record, table.concat(sorted_keys(shape.fields), ", ")) }
    else
      check(shape.fields[k], x, sub, out, k)
    end
  end
  for _, k in ipairs(shape.required) do
    if v[k] == nil then
      out[#out + 1] = { path = path and (path == "" and k or path .. "." .. k), field = k, message = "is required" }
    end
  end
  local one = shape.one_of
  if one then
    local n = 0
    for _, k in ipairs(one) do if v[k] ~= nil then n = n + 1 end end
    if n > 1 or (one.required and n == 0) then
      local present = {}
      for _, k in ipairs(one) do if v[k] ~= nil then present[#present + 1] = k end end
      out[#out + 1] = { path = path, field = present[2] or one[1], message = string.format(
        "a %s has exactly one of %s (found %s)", shape.record, table.concat(one, ", "),
        #present == 0 and "none" or table.concat(present, ", ")) }
    end
  end
end

local function bad(out, path, field, msg) out[#out + 1] = { path = path, field = field, message = msg } end

-- Append problems of `v` against `shape` to `out` (see the modes above).
check = function(shape, v, path, out, field)
  if #out >= (path and 20 or 1) then return end
  if shape.test then
    if not shape.test(v) then bad(out, path, field, "must be " .. shape.desc .. " (got " .. type(v) .. ")") end
    return
  end
  if type(v) ~= "table" then return bad(out, path, field, "must be " .. describe(shape) .. " (got " .. type(v) .. ")") end
  if shape.list then
    if not is_sequence(v) then return bad(out, path, field, "must be a list (keys 1..n)") end
    if #v < shape.min then return bad(out, path, field, "must list at least " .. shape.min .. " item(s)") end
    for i, e in ipairs(v) do check(shape.list, e, path and (path .. "[" .. i .. "]"), out, field) end
  elseif shape.map then
    for k, x in each_key(v, path ~= nil) do
      local sub = path and (path .. "[" .. string.format("%q", tostring(k)) .. "]")
      if not shape.key.test(k) then
        out[#out + 1] = { path = sub, field = field, message = "key must be " .. shape.key.desc }
      else
        check(shape.map, x, sub, out, field)
      end
    end
  else
    check_record(shape, v, path, out)
  end
end

--- Problems of a hook's result: a list of {path, field, message} (empty when it fits).
function M.problems(hook, value)
  local out = {}
  check(M.shapes[hook], value, nil, out, nil)
  if #out == 0 then return out end
  out = {}
  check(M.shapes[hook], value, "", out, nil)
  return out
end

--- Cross-field rules of a deployment: unique process names; `after` names only processes
-- listed before it (so starting in order can never wait on itself).
local function deployment_rules(d, out)
  local seen = {}
  for i, p in ipairs(type(d) == "table" and type(d.processes) == "table" and d.processes or {}) do
    if type(p) == "table" and type(p.name) == "string" then
      if seen[p.name] then
        out[#out + 1] = { path = "processes[" .. i .. "].name", field = "name",
          message = "duplicate process name '" .. p.name .. "'" }
      end
      for j, a in ipairs(type(p.after) == "table" and p.after or {}) do
        if type(a) == "string" and not seen[a] then
          out[#out + 1] = { path = "processes[" .. i .. "].after[" .. j .. "]", field = "after",
            message = "'" .. a .. "' is not a process listed before " .. p.name }
        end
      end
      seen[p.name] = true
    end
  end
end

-- Where -------------------------------------------------------------------------------------

local function lines_of(source)
  local lines = {}
  for line in (source .. "\n"):gmatch("([^\n]*)\n") do lines[#lines + 1] = line end
  return lines
end

-- The line that defines `hook` in the script (function service.hook(...) / x.hook = function).
local function hook_line(lines, hook)
  for n, line in ipairs(lines) do
    if line:find("function%s+[%w_]+[%.:]" .. hook .. "%s*%(") or line:find("[%w_]%." .. hook .. "%s*=%s*function")
        or line:find("^%s*" .. hook .. "%s*=%s*function") then
      return n
    end
  end
end

local function mentions(line, field)
  return line:find("[^%w_]" .. field .. "%s*=") or line:find("^" .. field .. "%s*=")
    or line:find("%[%s*[\"']" .. field .. "[\"']%s*%]")
end

--- The line of `source` most likely to have written `field` in `hook`'s result: its first
-- mention after the hook's definition, else anywhere, else the hook's own line.
function M.locate(source, hook, field)
  if type(source) ~= "string" then return nil end
  local lines = lines_of(source)
  local start = hook and hook_line(lines, hook) or 1
  if field and field:match("^[%a_][%w_]*$") then
    for n = start or 1, #lines do if mentions(lines[n], field) then return n end end
    for n = 1, #lines do if mentions(lines[n], field) then return n end end
  end
  return start
end

--- The first line of `source` holding the string literal `text` ("..." or '...'), or nil.
function M.locate_literal(source, text)
  if type(source) ~= "string" then return nil end
  for n, line in ipairs(lines_of(source)) do
    if line:find('"' .. text .. '"', 1, true) or line:find("'" .. text .. "'", 1, true) then return n end
  end
end

--- One problem as the message authors see: "services/x/service.lua:12: deploy: path: message".
function M.format(svc, hook, p)
  local where = "services/" .. (svc.folder or svc.name) .. "/service.lua"
  local line = M.locate(svc.source, hook, p.field)
  return string.format("%s%s: %s: %s%s", where, line and (":" .. line) or "", hook,
    p.path ~= "" and (p.path .. ": ") or "", p.message)
end

-- Cross-field rules of backups: a backup holds at least one file; a restore puts back only
-- files the backup holds (`names`: the backup's file names, when known).
local function backup_rules(hook, v, names, out)
  if type(v) ~= "table" then return end
  if hook == "backup" and type(v.files) == "table" and next(v.files) == nil then
    out[#out + 1] = { path = "files", field = "files", message = "must name at least one file" }
  end
  if hook == "restore" and names and type(v.put) == "table" then
    local have = {}
    for _, n in ipairs(names) do have[n] = true end
    for _, rel in ipairs(sorted_keys(v.put)) do
      local name = v.put[rel]
      if type(name) == "string" and not have[name] then
        out[#out + 1] = { path = "put[" .. string.format("%q", tostring(rel)) .. "]", field = "put",
          message = "the backup holds no file '" .. name .. "' (it holds: " .. table.concat(names, ", ") .. ")" }
      end
    end
  end
end

--- Every problem of a hook result, formatted (an empty list when it fits). `names`: for a
-- restore, the file names of the backup it puts back.
function M.all(svc, hook, value, names)
  local out = M.problems(hook, value)
  if hook == "deploy" then deployment_rules(value, out) end
  backup_rules(hook, value, names, out)
  local msgs = {}
  for i, p in ipairs(out) do msgs[i] = M.format(svc, hook, p) end
  return msgs
end

--- Problems of the script's own fields (commands, user, target) and of its plans'.
function M.script_problems(svc)
  local out = {}
  local script = svc.script
  for k, shape in pairs(M.script_fields) do
    if script[k] ~= nil then check(shape, script[k], k, out, k) end
  end
  for i, plan in ipairs(script.plans or {}) do
    for k, shape in pairs(M.plan_fields) do
      if plan[k] ~= nil then check(shape, plan[k], "plans[" .. i .. "]." .. k, out, k) end
    end
  end
  local msgs = {}
  for i, p in ipairs(out) do
    local line = M.locate(svc.source, nil, p.field)
    msgs[i] = string.format("services/%s/service.lua%s: %s: %s", svc.folder or svc.name,
      line and (":" .. line) or "", p.path, p.message)
  end
  return msgs
end

--- Every field name the contract knows (documentation is checked against it).
function M.field_names()
  local names, seen = {}, {}
  local function add(k) if not seen[k] then seen[k], names[#names + 1] = true, k end end
  local function walk(shape)
    if shape.list then return walk(shape.list) end
    if shape.map then return walk(shape.map) end
    for k, s in pairs(shape.fields or {}) do
      add(k)
      walk(s)
    end
  end
  for _, s in pairs(M.shapes) do walk(s) end
  for _, fields in ipairs({ M.script_fields, M.plan_fields }) do
    for k, s in pairs(fields) do
      add(k)
      walk(s)
    end
  end
  table.sort(names)
  return names
end

--- The commands of a backup or restore result, in the order they run (run, ready; prepare, run).
function M.backup_commands(result)
  local cmds = {}
  for _, field in ipairs({ "prepare", "run" }) do
    for _, c in ipairs(type(result[field]) == "table" and result[field] or {}) do cmds[#cmds + 1] = c end
  end
  if type(result.ready) == "table" then cmds[#cmds + 1] = result.ready end
  return cmds
end

--- Every executable a deployment or command list names (argv[1] of processes, init, health,
-- setup and run commands), each once.
function M.executables(deployment, runs)
  local seen, list_ = {}, {}
  local function add(argv)
    if type(argv) == "table" and type(argv[1]) == "string" and not seen[argv[1]] then
      seen[argv[1]], list_[#list_ + 1] = true, argv[1]
    end
  end
  for _, p in ipairs(deployment and deployment.processes or {}) do
    add(p.argv)
    for _, c in ipairs(p.init or {}) do add(c.argv) end
    if type(p.health) == "table" then add(p.health.argv) end
  end
  for _, c in ipairs(deployment and deployment.setup or {}) do add(c.argv) end
  for _, c in ipairs(runs or {}) do add(c.argv) end
  return list_
end

return M
