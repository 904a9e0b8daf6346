-- PostgreSQL 15 as a service: one server, or a primary with a hot standby (streaming
-- replication); on the local target (processes on this machine) or on a BOSH target (a
-- deployment rendered from templates/). Which target a plan uses is the operator's choice
-- in forge.yml; nothing here names one.
--
-- Each instance gets its own postgres server(s) on ports from the broker's pool, a data
-- directory under the instance's directory created by initdb (the standby's by
-- pg_basebackup), a superuser forge-admin with a generated password, and scram-sha-256 as
-- the only way in. Each binding gets its own role with a random password and either its own
-- database (the default) or a share of the instance's database `app`; unbind drops them.
-- Health, setup, bind and unbind are SQL the broker speaks itself (`pg` commands, libpq).
local crypto = forge.crypto

local ADMIN = "forge-admin"             -- the superuser initdb creates; the broker's own role
local APP_DB, APP_OWNER = "app", "app_owner"   -- the shared database and its (NOLOGIN) owner
local SERVERS = { "primary", "standby" }      -- process names, in start order
local BOSH_PORT = 5432

-- The parameters every plan takes (create and update), each an integer in a range: they
-- reach postgresql.conf, through forge.conf.render only.
local function parameters()
  return {
    ["$schema"] = "http://json-schema.org/draft-07/schema#",
    type = "object",
    additionalProperties = false,
    properties = {
      max_connections = { type = "integer", minimum = 10, maximum = 1000, default = 100,
        description = "max_connections (default 100)" },
      shared_buffers_mb = { type = "integer", minimum = 16, maximum = 4096, default = 128,
        description = "shared_buffers in MiB (default 128)" },
      work_mem_mb = { type = "integer", minimum = 1, maximum = 1024, default = 4,
        description = "work_mem in MiB (default 4)" },
    },
  }
end

-- A binding's parameters: its own database (default) or a share of the database `app`.
local function binding_parameters()
  return {
    ["$schema"] = "http://json-schema.org/draft-07/schema#",
    type = "object",
    additionalProperties = false,
    properties = {
      database = { type = "string", enum = { "own", "shared" }, default = "own",
        description = "own: a database owned by the binding's role (default); shared: the instance's database app" },
    },
  }
end

local SCHEMAS = {
  service_instance = { create = { parameters = parameters() }, update = { parameters = parameters() } },
  service_binding = { create = { parameters = binding_parameters() } },
}

local MAINTENANCE = { version = "15.0.0", description = "PostgreSQL 15" }

local service = {
  id = "2ce35a84-27f5-4ed2-982d-2e23db02f9cf",
  name = "postgres",
  description = "PostgreSQL relational database",
  bindable = true,
  tags = { "postgres", "postgresql", "relational", "sql" },
  metadata = { displayName = "PostgreSQL", providerDisplayName = "Service Forge" },
  plan_updateable = true,           -- 1-server <-> 2-servers and new parameters keep the data
  instances_retrievable = true,
  bindings_retrievable = true,
  -- the operator approves each one; pg_dump and pg_restore make and restore backups
  commands = { "postgres", "initdb", "pg_basebackup", "pg_dump", "pg_restore" },
  plans = {
    {
      id = "90e77abd-a3e9-4bb2-b1e4-5de0e19609ed",
      name = "1-server",
      description = "A single PostgreSQL 15 server",
      free = true,
      plan_updateable = true,
      metadata = { bullets = { "1 postgres server", "a database per binding" } },
      maintenance_info = MAINTENANCE,
      maximum_polling_duration = 300,
      schemas = SCHEMAS,
      servers = 1,
    },
    {
      id = "26fdce70-03d0-40ea-8e6f-37a29c7455cf",
      name = "2-servers",
      description = "A PostgreSQL 15 primary and a hot standby (streaming replication)",
      free = true,
      plan_updateable = true,
      metadata = { bullets = { "primary + hot standby", "read-only URI for the standby" } },
      maintenance_info = MAINTENANCE,
      maximum_polling_duration = 600,
      schemas = SCHEMAS,
      servers = 2,
    },
  },
}

--- Ports this plan needs from the local pool: one per server (primary first).
function service.ports(plan)
  return plan.servers
end

--- BOSH: static IPs this plan needs from the target's pool (one per server).
function service.ips(plan)
  return plan.servers
end

-- Helpers ------------------------------------------------------------------------------------

-- SQL for the broker to send as forge-admin (libpq, no psql process).
local function admin_pg(host, port, password, database, statements, opts)
  opts = opts or {}
  return { pg = { host = host, port = port, user = ADMIN, password = password, database = database,
    statements = statements, expect = opts.expect, tolerate = opts.tolerate } }
end

-- SQLSTATEs that mean "the state this statement wants is already there".
local DUPLICATE_OBJECT = "^42710 "     -- CREATE ROLE: role already exists
local DUPLICATE_DATABASE = "^42P04 "   -- CREATE DATABASE: database already exists
local UNDEFINED_OBJECT = "^42704 "     -- ALTER/REASSIGN/DROP OWNED: role does not exist

-- The host as it goes into a URI (IPv6 literals in brackets).
local function uri_host(host)
  if host:find(":", 1, true) then return "[" .. host .. "]" end
  return host
end

-- Percent-encode a URI component (user, password, database: everything but unreserved).
local function escape(s)
  return (tostring(s):gsub("[^%w%-%._~]", function(c) return string.format("%%%02X", c:byte()) end))
end

local function uri(user, password, host, port, database)
  return string.format("postgresql://%s:%s@%s:%d/%s", escape(user), escape(password), uri_host(host), port,
    escape(database))
end

local function jdbc_url(user, password, host, port, database)
  return string.format("jdbc:postgresql://%s:%d/%s?user=%s&password=%s", uri_host(host), port, escape(database),
    escape(user), escape(password))
end

-- pg_hba.conf address column for the broker's listen address (targets.local.host): an IPv4 or
-- IPv6 address as a one-address network, the wildcards as every address, a name as it is.
local function hba_address(host)
  if host == "0.0.0.0" then return "0.0.0.0/0" end
  if host == "::" then return "::/0" end
  if host:match("^%d+%.%d+%.%d+%.%d+$") then return host .. "/32" end
  if host:find(":", 1, true) then return host .. "/128" end
  return host
end

-- The unix socket lives in the server's own directory, unless its path would pass the 107
-- bytes a socket address holds: then there is none (the broker and clients use TCP).
local function socket_dir(dir, port)
  if #(dir .. "/.s.PGSQL." .. port) > 107 then return "" end
  return dir
end

-- Files and deployment ------------------------------------------------------------------------

-- postgresql.conf of server i: templates/local.yml's settings merged with the server's own,
-- rendered by forge.conf (strings quoted, no line breaks: no parameter can add a directive).
local function postgresql_conf(ctx, i, settings)
  local name = SERVERS[i]
  local dir = ctx.dir .. "/" .. name
  local params = ctx.parameters or {}
  local own = {
    listen_addresses = ctx.host,
    port = ctx.ports[i],
    unix_socket_directories = socket_dir(dir, ctx.ports[i]),
    data_directory = dir .. "/data",
    hba_file = dir .. "/pg_hba.conf",
    ident_file = dir .. "/pg_ident.conf",
    cluster_name = name,
    -- the standby must allow at least the primary's max_connections: both get the same
    max_connections = params.max_connections or 100,
    shared_buffers = (params.shared_buffers_mb or 128) .. "MB",
    work_mem = (params.work_mem_mb or 4) .. "MB",
  }
  local doc = assert(forge.yaml.merge({ settings, { settings = own } }))
  return forge.conf.render("postgresql", doc.settings,
    { header = "postgresql.conf of the " .. name .. " server, rendered by Service Forge; edits are overwritten" })
end

-- pg_hba.conf: scram-sha-256 only, over the socket, loopback and the listen address.
local function pg_hba_conf(ctx, hba)
  if not ctx.host:match("^[%w%.:%-]+$") then error("targets.local.host is not an address: " .. ctx.host, 0) end
  local method = hba.method
  if method ~= "scram-sha-256" then error("templates/local.yml: hba.method must be scram-sha-256", 0) end
  local addresses, seen = {}, {}
  for _, a in ipairs(hba.loopback or {}) do
    if not seen[a] then addresses[#addresses + 1], seen[a] = a, true end
  end
  local listen = hba_address(ctx.host)
  if not seen[listen] then addresses[#addresses + 1] = listen end
  local lines = {
    "# pg_hba.conf, rendered by Service Forge; edits are overwritten",
    "# TYPE  DATABASE     USER         ADDRESS  METHOD",
    "local   all          all                   " .. method,
  }
  for _, a in ipairs(addresses) do lines[#lines + 1] = "host    all          all          " .. a .. "  " .. method end
  for _, a in ipairs(addresses) do
    lines[#lines + 1] = "host    replication  " .. ADMIN .. "  " .. a .. "  " .. method
  end
  return table.concat(lines, "\n") .. "\n"
end

-- initdb and pg_basebackup each fill a data directory and refuse one that is not empty, so
-- neither can simply run twice; `creates` names a file that exists only once the directory is
-- complete, so a finished run is never repeated. A broker killed while one of them runs takes
-- it along (an init command never outlives the broker), so what it left half-made is never
-- finished: `fresh` has the restarted broker remove it before the command runs again.
local function sql_literal(s) return "'" .. s:gsub("'", "''") .. "'" end

-- The primary's directory: initdb as the service user. The password travels on stdin
-- (--pwprompt reads it twice from standard input when there is no terminal), never in argv.
-- initdb writes PG_VERSION first and syncs everything last, so no file of its own says "done":
-- once it has exited 0, a standalone backend (postgres --single) writes the marker initdb.done,
-- which also shows the directory starts. A broker killed between the two runs initdb again.
local function primary_init(ctx, admin)
  local dir = ctx.dir .. "/" .. SERVERS[1]
  local marker = SERVERS[1] .. "/initdb.done"
  return { {
    argv = { "initdb", "-D", dir .. "/data", "-A", "scram-sha-256", "-U", ADMIN, "--pwprompt",
      "-E", "UTF8", "--locale=C.UTF-8", "--no-instructions" },
    stdin = admin .. "\n" .. admin .. "\n",
    creates = marker,
    fresh = SERVERS[1] .. "/data",
  }, {
    argv = { "postgres", "--single", "-c", "config_file=" .. dir .. "/postgresql.conf", "postgres" },
    stdin = "COPY (SELECT 'initdb done') TO " .. sql_literal(dir .. "/initdb.done") .. "\n",
    creates = marker,
  } }
end

-- The standby's directory is a base backup of the primary (-R: standby.signal and
-- primary_conninfo; -X stream: the WAL that makes it consistent). pg_basebackup renames
-- backup_manifest into place last, once every file and the WAL are synced, and exits
-- (PG_VERSION arrives early in the copy).
local function standby_init(ctx, admin)
  return { {
    argv = { "pg_basebackup", "-h", ctx.host, "-p", tostring(ctx.ports[1]), "-U", ADMIN, "-w",
      "-D", ctx.dir .. "/" .. SERVERS[2] .. "/data", "-R", "-X", "stream", "-c", "fast" },
    env = { PGPASSWORD = admin, PGCONNECT_TIMEOUT = "10", PGAPPNAME = "standby" },
    creates = SERVERS[2] .. "/data/backup_manifest",
    fresh = SERVERS[2] .. "/data",
  } }
end

local function server(ctx, i, admin, tmpl)
  local name = SERVERS[i]
  local p = {
    name = name,
    argv = { "postgres", "-c", "config_file=" .. ctx.dir .. "/" .. name .. "/postgresql.conf" },
    files = {
      [name .. "/postgresql.conf"] = postgresql_conf(ctx, i, { settings = tmpl.settings }),
      [name .. "/pg_hba.conf"] = pg_hba_conf(ctx, tmpl.hba),
      [name .. "/pg_ident.conf"] = "# pg_ident.conf, rendered by Service Forge: no user name maps\n",
    },
    stop_signal = "INT",          -- fast shutdown: sessions are ended, a checkpoint is written
    stop_timeout = 30,
    health = admin_pg(ctx.host, ctx.ports[i], admin, "postgres", { { "SELECT 1" } }, { expect = { "^1$" } }),
  }
  if i == 1 then
    p.init = primary_init(ctx, admin)
  else
    p.after = { SERVERS[1] }
    p.init = standby_init(ctx, admin)
  end
  return p
end

-- What setup does (idempotent): the shared database `app`, owned by the NOLOGIN role
-- app_owner, and only roles granted CONNECT reach a database, so bindings see their own (or
-- app) only. `admin_dbs` also closes the admin databases (postgres, template1) to PUBLIC.
local function setup_statements(admin_dbs)
  local statements = {
    { format = "CREATE ROLE %I NOLOGIN", args = { APP_OWNER } },
    { format = "CREATE DATABASE %I OWNER %I", args = { APP_DB, APP_OWNER } },
    { format = "ALTER DATABASE %I OWNER TO %I", args = { APP_DB, APP_OWNER } },
    { format = "REVOKE ALL ON DATABASE %I FROM PUBLIC", args = { APP_DB } },
  }
  if admin_dbs then
    statements[#statements + 1] = { "REVOKE ALL ON DATABASE postgres FROM PUBLIC" }
    statements[#statements + 1] = { "REVOKE ALL ON DATABASE template1 FROM PUBLIC" }
  end
  return statements
end

--- Render the deployment: the primary, and for 2-servers a standby copied from it once it is
-- healthy; setup runs on the primary once both answer.
function service.deploy(ctx)
  local admin = ctx.secret("admin_password")
  local tmpl = assert(forge.yaml.decode(ctx.templates["local.yml"]))
  local processes = {}
  for i = 1, ctx.plan.servers do processes[i] = server(ctx, i, admin, tmpl) end
  return { processes = processes, setup = { admin_pg(ctx.host, ctx.ports[1], admin, "postgres", setup_statements(true),
    { tolerate = { DUPLICATE_OBJECT, DUPLICATE_DATABASE } }) } }
end

--- BOSH: the manifest documents, merged by the broker in order (then its pool stub, which
-- gives meta.forge.{deployment_name, network, static_ips, azs, stemcell, releases}).
function service.manifest(ctx)
  local params = ctx.parameters or {}
  local documents = { "postgres.yml" }
  if ctx.plan.servers == 2 then documents[#documents + 1] = "2-servers.yml" end
  documents[#documents + 1] = { meta = { postgres = {
    admin_password = ctx.secret("admin_password"),
    max_connections = params.max_connections,
    shared_buffers = params.shared_buffers_mb and (params.shared_buffers_mb .. "MB"),
    work_mem = params.work_mem_mb and (params.work_mem_mb .. "MB"),
  } } }
  return { documents = documents }
end

-- Bindings -------------------------------------------------------------------------------------

-- A binding's role (and its own database): derived from the binding id, so unbind finds it.
local function role_name(binding_id)
  return "b_" .. crypto.sha256_hex(binding_id):sub(1, 24)
end

-- The credentials of a binding on `servers` ({host, port} each, primary first).
local function credentials(user, password, database, servers)
  local primary, hosts = servers[1], {}
  for i, srv in ipairs(servers) do hosts[i] = uri_host(srv.host) .. ":" .. srv.port end
  local c = {
    host = primary.host,
    port = primary.port,
    database = database,
    username = user,
    password = password,
    uri = uri(user, password, primary.host, primary.port, database),
    jdbcUrl = jdbc_url(user, password, primary.host, primary.port, database),
    hosts = hosts,
  }
  if servers[2] then c.read_only_uri = uri(user, password, servers[2].host, servers[2].port, database) end
  return c
end

local function database_mode(params)
  return (params and params.database) == "shared" and "shared" or "own"
end

-- The statements that create (or re-create) binding `user`: its role, LOGIN with a SCRAM
-- verifier of the password (the password itself never reaches the server), then its own
-- database or its share of `app`.
local function bind_statements(user, password, shared)
  local statements = {
    -- no secret in the statement that may fail (a refused statement is logged with its text)
    { format = "CREATE ROLE %I", args = { user } },
    { format = "ALTER ROLE %I WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION PASSWORD %L",
      args = { user, crypto.scram_sha256(password) } },
  }
  if shared then
    -- every shared binding acts as app_owner in app: they all see (and own) the same tables
    statements[#statements + 1] = { format = "GRANT CONNECT, TEMPORARY ON DATABASE %I TO %I", args = { APP_DB, user } }
    statements[#statements + 1] = { format = "GRANT %I TO %I", args = { APP_OWNER, user } }
    statements[#statements + 1] = { format = "ALTER ROLE %I IN DATABASE %I SET role = %L",
      args = { user, APP_DB, APP_OWNER } }
  else
    statements[#statements + 1] = { format = "CREATE DATABASE %I OWNER %I", args = { user, user } }
    statements[#statements + 1] = { format = "REVOKE ALL ON DATABASE %I FROM PUBLIC", args = { user } }
  end
  return statements
end

-- The sessions of `user` on a server, ended (waiting up to 2 s for each to go).
local TERMINATE = "SELECT count(pg_terminate_backend(pid, 2000)) FROM pg_stat_activity WHERE usename = $1"

-- The commands that remove binding `user` from `servers` (primary first): no more logins, its
-- sessions ended, its database dropped (or what it owns in app handed to app_owner), the role
-- dropped, all on the primary, which the standby replays; then its sessions on the standby
-- ended too (a dropped role only stops new logins there). Each step tolerates "already gone",
-- so a rerun (and the undo of a half-made bind) succeeds; both kinds of binding are removed
-- the same way.
local function unbind_commands(servers, admin, user)
  local primary = servers[1]
  local gone = { tolerate = { UNDEFINED_OBJECT } }
  local run = {
    admin_pg(primary.host, primary.port, admin, "postgres", {
      { format = "ALTER ROLE %I NOLOGIN", args = { user } },
      { TERMINATE, user },
      { format = "DROP DATABASE IF EXISTS %I WITH (FORCE)", args = { user } },
    }, gone),
    admin_pg(primary.host, primary.port, admin, APP_DB, {
      { format = "REASSIGN OWNED BY %I TO %I", args = { user, APP_OWNER } },
      { format = "DROP OWNED BY %I", args = { user } },
    }, gone),
    admin_pg(primary.host, primary.port, admin, "postgres", { { format = "DROP ROLE IF EXISTS %I", args = { user } } }),
  }
  for i = 2, #servers do
    run[#run + 1] = admin_pg(servers[i].host, servers[i].port, admin, "postgres", { { TERMINATE, user } })
  end
  return run
end

-- The servers of the instance, primary first: the local processes, or the BOSH VMs.
local function servers_of(ctx)
  local servers = {}
  if ctx.ips then
    for i, ip in ipairs(ctx.ips) do servers[i] = { host = ip, port = BOSH_PORT } end
  else
    for i, port in ipairs(ctx.ports) do servers[i] = { host = ctx.host, port = port } end
  end
  return servers
end

--- A binding: its own role and database (or a share of `app`), created on the primary only:
-- the standby replays it. Idempotent: the broker re-applies every binding after an update,
-- with ctx.credentials (same password, so applications keep working). On BOSH the same SQL
-- goes to the primary VM (ctx.ips[1]) on port 5432.
function service.bind(ctx)
  local user = role_name(ctx.binding_id)
  local password = ctx.credentials and ctx.credentials.password or crypto.password(32)
  local shared = database_mode(ctx.parameters) == "shared"
  local database = shared and APP_DB or user
  local admin = ctx.secret("admin_password")
  local statements = bind_statements(user, password, shared)
  local servers = servers_of(ctx)
  if not servers[1] then error("the deployment has no VMs with IPs", 0) end
  if ctx.ips then
    -- no setup hook on BOSH: the release creates app, each bind makes sure of its owner role
    local prepare = setup_statements(false)
    for i = #prepare, 1, -1 do table.insert(statements, 1, prepare[i]) end
  end
  return {
    credentials = credentials(user, password, database, servers),
    run = { admin_pg(servers[1].host, servers[1].port, admin, "postgres", statements,
      { tolerate = { DUPLICATE_OBJECT, DUPLICATE_DATABASE } }) },
  }
end

--- Unbind: the binding's role and what it owns go; its sessions are ended on every server.
function service.unbind(ctx)
  local servers = servers_of(ctx)
  if not servers[1] then return { run = {} } end     -- BOSH: no VMs left, nothing to remove
  return { run = unbind_commands(servers, ctx.secret("admin_password"), role_name(ctx.binding_id)) }
end

-- Backups ------------------------------------------------------------------------------------

-- The databases a backup holds: app, and the own database of every binding that has one
-- ({file = "<database>.dump", database, role = its owner}).
local function backed_up_databases(bindings)
  local list = { { file = APP_DB .. ".dump", database = APP_DB, role = APP_OWNER } }
  for _, b in ipairs(bindings or {}) do
    if database_mode(b.parameters) == "own" then
      local role = role_name(b.id)
      list[#list + 1] = { file = role .. ".dump", database = role, role = role, binding = b.id }
    end
  end
  return list
end

-- A client program (pg_dump, pg_restore) against the primary as forge-admin; the password in
-- its environment, never in argv.
local function client(ctx, program, args)
  local argv = { program, "--host", ctx.host, "--port", tostring(ctx.ports[1]), "--username", ADMIN, "--no-password" }
  for _, a in ipairs(args) do argv[#argv + 1] = a end
  return { argv = argv, env = { PGPASSWORD = ctx.secret("admin_password"), PGCONNECT_TIMEOUT = "10" } }
end

--- Backup: a pg_dump (custom format) of app and of each binding's own database, from the
-- primary. Roles are not in it: bindings are the broker's, which re-creates them after a restore.
function service.backup(ctx)
  local run, files = {}, {}
  for _, db in ipairs(backed_up_databases(ctx.bindings)) do
    local path = ctx.scratch .. "/" .. db.file
    run[#run + 1] = client(ctx, "pg_dump", { "--format=custom", "--file", ctx.dir .. "/" .. path, db.database })
    files[db.file] = path
  end
  return { run = run, files = files }
end

-- Replace database `db` with the dump `file` (in the scratch dir): dropped (its sessions
-- ended), created empty and closed to PUBLIC again, then restored with every object owned by
-- db.role. The broker re-applies every binding afterwards (grants, role settings).
local function replace_database(ctx, db)
  return {
    admin_pg(ctx.host, ctx.ports[1], ctx.secret("admin_password"), "postgres", {
      { format = "DROP DATABASE IF EXISTS %I WITH (FORCE)", args = { db.database } },
      { format = "CREATE DATABASE %I OWNER %I", args = { db.database, db.role } },
      { format = "REVOKE ALL ON DATABASE %I FROM PUBLIC", args = { db.database } },
    }),
    client(ctx, "pg_restore", { "--dbname", db.database, "--no-owner", "--no-privileges", "--role", db.role,
      "--exit-on-error", "--single-transaction", ctx.dir .. "/" .. ctx.scratch .. "/" .. db.file }),
  }
end

--- Restore, the servers running: app from the backup, and each binding's own database when
-- the binding exists in this instance (the same instance, or its bindings were re-created);
-- a binding database that has no binding here is left out, and the notes say so. Any plan
-- takes a backup of any plan: the standby replays what the primary restores.
function service.restore(ctx)
  local here = {}
  for _, b in ipairs(ctx.bindings or {}) do here[b.id] = true end
  local have = {}
  for _, f in ipairs(ctx.backup.files) do have[f] = true end
  local put, run, notes = {}, {}, {}
  for _, db in ipairs(backed_up_databases(ctx.backup.bindings)) do
    if not have[db.file] then
      notes[#notes + 1] = "database " .. db.database .. " is not in the backup"
    elseif db.binding and not here[db.binding] then
      notes[#notes + 1] = "database " .. db.database .. " of binding " .. db.binding
        .. " was not restored: this instance has no such binding"
    else
      put[ctx.scratch .. "/" .. db.file] = db.file
      for _, c in ipairs(replace_database(ctx, db)) do run[#run + 1] = c end
    end
  end
  return { put = put, run = run, notes = notes }
end

return service
