--- The backup commands of the forge command line (docs/backups.md): `forge backup`, `forge backups`
-- and `forge restore` over a running broker's admin API, and `forge store-backup`, which copies
-- the broker's store itself. forge.cli defines them with M.define, handing over its helpers,
-- so these commands take the same options, credentials and output as its other admin commands.
local util = require "forge.util"

local M = {}

local function size_text(n)
  if type(n) ~= "number" then return nil end
  for _, u in ipairs({ { 1073741824, "GiB" }, { 1048576, "MiB" }, { 1024, "KiB" } }) do
    if n >= u[1] then return string.format("%.1f %s", n / u[1], u[2]) end
  end
  return n .. " B"
end

local function backup_command(cli)
  cli.admin_command("backup", "usage: forge backup INSTANCE [--no-wait] [--url URL] [--config FILE] [--json]\n"
    .. "  Back a local instance up through its service's backup hook (POST /admin/instances/ID/backup):\n"
    .. "  an operation of type backup; then wait for it with a progress line (--no-wait: return at once).\n"
    .. "  The backup goes under the broker's backups dir, with a manifest and a SHA-256 of every file.\n"
    .. cli.common_help, { ["no-wait"] = "flag" }, 1, function(api, pos, opts)
      local id = pos[1]
      local status, body, text = cli.call_json(api, "POST", "/admin/instances/" .. cli.encode(id) .. "/backup")
      return cli.follow("backup", api, id, status, body, text, opts, "succeeded")
    end)
end

local function backups_command(cli)
  cli.admin_command("backups", "usage: forge backups [INSTANCE] [--url URL] [--config FILE] [--json]\n"
    .. "  List the backups (GET /admin/backups), of one instance or of all, newest first.\n" .. cli.common_help,
    {}, { 0, 1 }, function(api, pos, opts)
      local path = "/admin/backups" .. (pos[1] and ("?instance=" .. cli.encode(pos[1])) or "")
      return cli.show_json("backups", api, path, opts, function(body)
        local list = body.backups or {}
        if #list == 0 then
          io.write("no backups", pos[1] and (" of instance " .. pos[1]) or "", "\n")
          return 0
        end
        cli.print_table({ { "ID", cli.field("id") }, { "INSTANCE", cli.field("instance") },
          { "SERVICE", function(m) return tostring(m.service) .. "/" .. tostring(m.plan) end },
          { "CREATED", function(m) return cli.ago(m.created_at) .. " ago" end },
          { "SIZE", function(m) return size_text(m.size) end }, { "FILES", function(m) return #(m.files or {}) end },
          { "BY", cli.field("by") } }, list)
      end)
    end)
end

local function restore_command(cli)
  local help = "usage: forge restore BACKUP --to INSTANCE [--no-wait] [--url URL] [--config FILE] [--json]\n"
    .. "  Put a backup into an instance of the same service: the one it was taken of, or another one\n"
    .. "  (POST /admin/backups/BACKUP/restore). The broker checks every checksum first and refuses a\n"
    .. "  corrupt or truncated backup, or one the service does not take, before anything changes; the\n"
    .. "  instance's bindings are re-created afterwards. Then wait for the operation (--no-wait: do not).\n"
    .. cli.common_help
  cli.admin_command("restore", help, { to = "value", ["no-wait"] = "flag" }, 1, function(api, pos, opts)
    if not opts.to then
      io.stderr:write("forge restore: --to INSTANCE is required\n", help)
      return 2
    end
    local status, body, text = cli.call_json(api, "POST", "/admin/backups/" .. cli.encode(pos[1]) .. "/restore",
      util.json_encode({ to = opts.to }))
    return cli.follow("restore", api, opts.to, status, body, text, opts, "succeeded")
  end)
end

local STORE_HELP = "usage: forge store-backup FILE [--config FILE]\n"
  .. "  Copy the broker's own store into FILE, which must not exist, while the broker runs: the SQLite\n"
  .. "  store with SQLite's online backup API (a consistent copy of one moment), an etcd store as an\n"
  .. "  etcd snapshot (etcdctl snapshot save against the configured endpoints, the whole keyspace).\n"
  .. "  FILE gets mode 0600: it holds every secret of the broker. docs/backups.md says how to restore it.\n"
  .. "  --config FILE   the broker's config (default ./forge.yml; the FORGE_* environment overrides it)\n"
  .. "exit status: 0 written, 1 the copy failed (nothing is left at FILE), 2 usage or config error\n"

local function store_backup_command(cli)
  cli.command("store-backup", STORE_HELP, function(args)
    local opts, pos = cli.parse_options(args, 2, { config = "value", help = "flag" })
    if not opts then
      io.stderr:write("forge store-backup: ", pos, "\n", STORE_HELP)
      return 2
    end
    if opts.help then
      io.write(STORE_HELP)
      return 0
    end
    if #pos ~= 1 then
      io.stderr:write(STORE_HELP)
      return 2
    end
    local config, err = cli.load_config(opts)
    if not config then
      io.stderr:write("forge store-backup: ", err, "\n")
      return 2
    end
    local info, berr = require("forge.backups").store_backup(config, pos[1])
    if not info then
      io.stderr:write("forge store-backup: ", berr, "\n")
      return 1
    end
    io.write(string.format("store-backup: %s written: %s (%s%s)\n", info.file, info.kind, size_text(info.size),
      info.revision and (", store revision " .. info.revision) or (" from " .. tostring(info.endpoint))))
    return 0
  end)
end

--- Define the commands. `cli` holds forge.cli's helpers: admin_command(name, help, options,
-- nargs or {min, max}, run), command(name, help, fn(args)), call_json(api, method, path [, body]),
-- show_json, follow(name, api, id, status, body, text, opts, want) (an action's answer, then its
-- operation), print_table, field, ago, encode, parse_options, load_config(opts) and common_help.
function M.define(cli)
  backup_command(cli)
  backups_command(cli)
  restore_command(cli)
  store_backup_command(cli)
end

return M
