--- `forge rotate-key` (docs/security.md): re-seal every value of the broker's store under the
-- primary key of the configured keyring. It runs here, against the store, not in the broker:
-- the broker goes on serving meanwhile (its writes already use the primary key). The job is
-- journaled in the store (forge.secrets.rotate), so a run that was stopped resumes.
local secrets = require "forge.secrets"

local M = {}

local HELP = "usage: forge rotate-key [--config FILE] [--rate N]\n"
  .. "  Re-seal every record of the broker's store under the primary key of encryption.keys (first\n"
  .. "  make the new key the primary and restart the broker, so new writes use it). Safe while the\n"
  .. "  broker runs: each record is rewritten only if nobody wrote it meanwhile. A run that stopped\n"
  .. "  resumes after the last record it saved. At the end it names the keys no record needs any more.\n"
  .. "  --config FILE   the broker's config (default ./forge.yml; the FORGE_* environment overrides it)\n"
  .. "  --rate N        at most N records per second (spare a busy etcd)\n"
  .. "exit status: 0 done, 1 the store or a key failed (run it again to resume), 2 usage or config error\n"

local function fail(what, err)
  io.stderr:write("forge rotate-key: ", what, ": ", tostring(err and err.message or err), "\n")
  return 1
end

local function report_progress(job)
  local n = job.resealed + job.skipped
  if n % 100 == 0 then
    io.write(string.format("rotate-key: %d records done (%d re-sealed), at %s\n", n, job.resealed, job.cursor))
    io.flush()
  end
end

-- The key ids of the ring that no stored value is sealed under any more.
local function unused_keys(db)
  local census = assert(secrets.census(db))
  assert(secrets.record_usage(db, census))   -- what a start checks the ring against from now on
  local out = {}
  for _, id in ipairs(db.ring.ids) do
    if not census.by_kid[id] then out[#out + 1] = id end
  end
  return out, census.plain
end

local function rotate(config, rate)
  local db, err = require("forge.storage").open(config)
  if not db then return fail("cannot open the store", err) end
  local before = secrets.job(db)
  if before and before.state == "running" and before.primary == db.ring.primary then
    io.write("rotate-key: resuming the rotation to key '", before.primary, "' after ", before.cursor, "\n")
  else
    io.write("rotate-key: re-sealing every record under key '", db.ring.primary, "'\n")
  end
  io.flush()
  local job, rerr = secrets.rotate(db, { progress = report_progress, rate = rate })
  if not job then
    db:close()
    return fail("stopped (run it again to resume)", rerr)
  end
  local unused, plain = unused_keys(db)
  db:close()
  io.write(string.format("rotate-key: done: %d records re-sealed under key '%s', %d were already (%d records)\n",
    job.resealed, job.primary, job.skipped, job.total))
  if plain > 0 then io.write("rotate-key: ", plain, " records were written in plain text meanwhile: run it again\n") end
  if #unused > 0 then
    io.write("rotate-key: no record is sealed under ", table.concat(unused, ", "),
      " any more: it may leave encryption.keys\n")
  end
  return 0
end

--- Define the command. `cli` holds forge.cli's helpers (see forge.cli_backups.define).
function M.define(cli)
  cli.command("rotate-key", HELP, function(args)
    local opts, pos = cli.parse_options(args, 2, { config = "value", rate = "value", help = "flag" })
    if not opts or #pos > 0 then
      io.stderr:write("forge rotate-key: ", opts and "no arguments expected" or pos, "\n", HELP)
      return 2
    end
    if opts.help then
      io.write(HELP)
      return 0
    end
    local rate = opts.rate and tonumber(opts.rate)
    if opts.rate and not (rate and rate > 0) then
      io.stderr:write("forge rotate-key: --rate must be a positive number\n")
      return 2
    end
    local config, err = cli.load_config(opts)
    if not config then
      io.stderr:write("forge rotate-key: ", err, "\n")
      return 2
    end
    return rotate(config, rate)
  end)
end

return M
