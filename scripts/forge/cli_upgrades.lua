--- The diff and fleet upgrade commands of the forge command line (docs/upgrades.md): `forge diff`
-- and `forge upgrade` over a running broker's admin API. forge.cli defines them with M.define,
-- handing over its helpers, so they take the same options and credentials as its other commands.
local proc = require "forge.proc"
local util = require "forge.util"

local M = {}

local POLL_SECONDS = 0.5

local function short(hash) return type(hash) == "string" and hash:sub(1, 12) or "-" end

local function diff_command(cli)
  local help = "usage: forge diff INSTANCE [--to current|pinned|VERSION] [--plan P] [--params JSON] [--url URL]\n"
    .. "                  [--config FILE] [--json]\n"
    .. "  Print what an update or upgrade of the instance would change, as a unified diff of what it\n"
    .. "  runs now against what it would run (local processes, config files and commands, or the\n"
    .. "  BOSH manifest), secrets masked (GET /admin/instances/ID/diff). Nothing changes.\n"
    .. "  --to current   the service's current version (the default without --plan and --params)\n"
    .. "  --to pinned    the version the instance runs (the default with --plan or --params, as a\n"
    .. "                 platform's update keeps it); --to VERSION: a stored version (a hash prefix)\n"
    .. "  --plan P       a plan change (name or id); --params JSON: new parameters\n"
    .. cli.common_help:gsub("exit status:[^\n]*\n$", "")
    .. "exit status: 0 no change, 1 changes, 2 usage error, refused or no answer\n"
  cli.admin_command("diff", help, { to = "value", plan = "value", params = "value" }, 1, function(api, pos, opts)
    local q = {}
    for _, name in ipairs({ "to", "plan", "params" }) do
      if opts[name] then q[#q + 1] = name .. "=" .. cli.encode(opts[name]) end
    end
    local path = "/admin/instances/" .. cli.encode(pos[1]) .. "/diff" .. (#q > 0 and ("?" .. table.concat(q, "&")) or "")
    local status, body, text = cli.call_json(api, "GET", path)
    if status ~= 200 or type(body) ~= "table" then
      io.stderr:write("forge diff: ", cli.failure(status, body, text), "\n")
      return 2
    end
    if opts.json then
      io.write(text, "\n")
    elseif body.changed then
      io.write(body.diff)
    else
      io.write("no change: instance ", pos[1], " would run the same on version ", short(body.to), " (plan ",
        tostring(body.plan), ")\n")
    end
    return body.changed and 1 or 0
  end)
end

local UPGRADE_HELP = "usage: forge upgrade (--all | --service S | --plan P | --org O | --space S | ID...)\n"
  .. "                     [--canaries N] [--max-in-flight M] [--wait SECONDS] [--dry-run] [--no-wait]\n"
  .. "       forge upgrade --pause [UPGRADE] | --resume [UPGRADE] | --abort [UPGRADE]\n"
  .. "  Move the instances pinned to older versions of their service to the current one, as a job the\n"
  .. "  broker runs (POST /admin/upgrades; it survives a broker restart): N canaries first (default\n"
  .. "  1), one at a time, then at most M at once (default 1). An instance whose rendering does not\n"
  .. "  change is skipped: its pin moves, nothing is redeployed or restarted. One that has another\n"
  .. "  operation in flight is waited for (--wait, default 300 s), then skipped. The first failure pauses\n"
  .. "  the run, as --pause does; --resume goes on (trying the failed ones again), --abort ends it\n"
  .. "  (the newest such upgrade unless UPGRADE is named). Shows a progress line, then a table of every\n"
  .. "  instance: upgraded, skipped or failed, with the reasons (--no-wait: return at once).\n"
  .. "  --dry-run  only say what would happen to each instance; nothing changes\n"
  .. "  --url URL, --config FILE, --json as for the other admin commands (`forge instances --help`)\n"
  .. "exit status: 0 every instance upgraded or skipped, 1 a failure (the run is paused), it was\n"
  .. "  aborted, refused or no answer, 2 usage error\n"

local RESULTS = { { "INSTANCE", "id" }, { "SERVICE", "service" }, { "PLAN", "plan" }, { "RESULT", "state" } }

local function results_table(cli, list, result_field)
  local columns = {}
  for i, c in ipairs(RESULTS) do columns[i] = { c[1], cli.field(c[2] == "state" and result_field or c[2]) } end
  columns[#columns + 1] = { "FROM", function(e) return short(e.from) end }
  columns[#columns + 1] = { "TO", function(e) return short(e.to) end }
  columns[#columns + 1] = { "REASON", cli.field("reason") }
  cli.print_table(columns, list)
end

local function progress_text(job)
  local n = job.counts or {}
  local done = (n.upgraded or 0) + (n.skipped or 0) + (n.failed or 0)
  return string.format("upgrade %s %s: %d/%d done (%d upgraded, %d skipped, %d failed), %d in flight", job.id,
    job.state, done, #(job.instances or {}), n.upgraded or 0, n.skipped or 0, n.failed or 0, n["in flight"] or 0)
end

local function ended(job)
  return job.state ~= "running" and (job.counts or {})["in flight"] == 0
end

-- Poll job `id` until it ends or pauses, with a progress line on stderr; then the table.
local function follow_job(cli, api, id, opts)
  local tty, last = os.execute("test -t 2") == true, nil
  local job
  while true do
    local status, body, text = cli.call_json(api, "GET", "/admin/upgrades/" .. cli.encode(id))
    if status ~= 200 or type(body) ~= "table" then
      if tty and last then io.stderr:write("\r\27[K") end
      io.stderr:write("forge upgrade: ", status and cli.refusal(status, body, text) or body, "\n")
      return 1
    end
    job = body
    if ended(job) then break end
    local line = progress_text(job)
    if tty then io.stderr:write("\r\27[K", line) elseif line ~= last then io.stderr:write(line, "\n") end
    last = line
    proc.sleep(POLL_SECONDS)
  end
  if tty and last then io.stderr:write("\r\27[K") end
  if opts.json then
    io.write(util.json_encode(job), "\n")
  else
    results_table(cli, job.instances, "state")
    io.write(progress_text(job), job.description and (": " .. job.description) or "", "\n")
    if job.state == "paused" then io.write("resume: forge upgrade --resume ", job.id, "   abort: forge upgrade --abort ",
      job.id, "\n") end
  end
  return (job.state == "succeeded" and (job.counts or {}).failed == 0) and 0 or 1
end

-- The answer to a start, resume or abort (202 with the job): follow it unless --no-wait.
local function answered(cli, api, status, body, text, opts)
  if status ~= 202 or type(body) ~= "table" or not body.id then
    io.stderr:write("forge upgrade: ", cli.failure(status, body, text), "\n")
    return 1
  end
  if opts["no-wait"] then
    io.write(opts.json and (text .. "\n") or (progress_text(body) .. "\n"))
    return 0
  end
  return follow_job(cli, api, body.id, opts)
end

-- The newest upgrade in one of `states`, when none is named.
local function newest(cli, api, states)
  local status, body, text = cli.call_json(api, "GET", "/admin/upgrades")
  if status ~= 200 or type(body) ~= "table" then
    return nil, cli.failure(status, body, text)
  end
  for _, u in ipairs(body.upgrades or {}) do
    if states[u.state] then return u.id end
  end
  return nil, "no upgrade is " .. table.concat(util.sorted_keys(states), " or ")
end

local function act(cli, api, pos, opts, action, states)
  local id, err = pos[1], nil
  if not id then id, err = newest(cli, api, states) end
  if not id then
    io.stderr:write("forge upgrade: ", err, "\n")
    return 1
  end
  local status, body, text = cli.call_json(api, "POST", "/admin/upgrades/" .. cli.encode(id) .. "/" .. action)
  return answered(cli, api, status, body, text, opts)
end

local function dry_run(cli, api, request, opts)
  local status, body, text = cli.call_json(api, "POST", "/admin/upgrades", util.json_encode(request))
  if status ~= 200 or type(body) ~= "table" then
    io.stderr:write("forge upgrade: ", cli.failure(status, body, text), "\n")
    return 1
  end
  if opts.json then
    io.write(text, "\n")
    return 0
  end
  if #body.instances == 0 then io.write("no instance is pinned to an older version\n") end
  if #body.instances > 0 then results_table(cli, body.instances, "action") end
  for _, l in ipairs(body.left or {}) do io.write("left alone: ", l.id, ": ", l.reason, "\n") end
  io.write("(dry run: nothing changed)\n")
  return 0
end

local function count_option(opts, name)
  if opts[name] == nil then return nil end
  local n = math.tointeger(tonumber(opts[name]))
  if not n or not opts[name]:match("^%d+$") then return nil, "--" .. name .. " must be a whole number" end
  return n
end

local function upgrade_command(cli)
  cli.admin_command("upgrade", UPGRADE_HELP, { all = "flag", service = "value", plan = "value", org = "value",
    space = "value", canaries = "value", ["max-in-flight"] = "value", ["dry-run"] = "flag", ["no-wait"] = "flag",
    pause = "flag", resume = "flag", abort = "flag", wait = "value" }, { 0, 1000 }, function(api, pos, opts)
      local actions = (opts.pause and 1 or 0) + (opts.resume and 1 or 0) + (opts.abort and 1 or 0)
      if actions > 1 or (actions == 1 and #pos > 1) then
        io.stderr:write(UPGRADE_HELP)
        return 2
      end
      if opts.pause then return act(cli, api, pos, opts, "pause", { running = true }) end
      if opts.resume then return act(cli, api, pos, opts, "resume", { paused = true, failed = true }) end
      if opts.abort then return act(cli, api, pos, opts, "abort", { paused = true, running = true }) end
      local request = { all = opts.all or nil, service = opts.service, plan = opts.plan, org = opts.org,
        space = opts.space, instances = #pos > 0 and pos or nil, dry_run = opts["dry-run"] or nil }
      if not (request.all or request.service or request.plan or request.org or request.space or request.instances) then
        io.stderr:write("forge upgrade: say which instances: --all, --service, --plan, --org, --space or IDs\n",
          UPGRADE_HELP)
        return 2
      end
      for option, field in pairs({ canaries = "canaries", ["max-in-flight"] = "max_in_flight", wait = "wait_seconds" }) do
        local n, err = count_option(opts, option)
        if err then
          io.stderr:write("forge upgrade: ", err, "\n")
          return 2
        end
        request[field] = n
      end
      if request.dry_run then return dry_run(cli, api, request, opts) end
      local status, body, text = cli.call_json(api, "POST", "/admin/upgrades", util.json_encode(request))
      return answered(cli, api, status, body, text, opts)
    end)
end

--- Define the commands. `cli` holds forge.cli's helpers (see forge.cli_backups.define), and
-- refusal(status, body, text): why the broker said no, on one line.
function M.define(cli)
  diff_command(cli)
  upgrade_command(cli)
end

return M
