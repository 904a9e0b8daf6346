-- Redis as a service: one server, or a primary with two replicas; on the local target
-- (processes on this machine) or on a BOSH target (a deployment rendered from templates/).
-- Which target a plan uses is the operator's choice in forge.yml (targets.<name>.services);
-- nothing here names one, so without a BOSH target everything stays local.
--
-- Each instance gets its own redis-server process(es) on ports from the broker's pool, data
-- under the instance's directory, an admin user with a generated password, and the default
-- user switched off. Each binding gets its own ACL user with a random password, created on
-- bind and deleted on unbind, on every node (ACLs are not replicated) and saved to the
-- node's ACL file so a restarted node keeps them.
local crypto = forge.crypto

local ADMIN = "forge-admin"

-- The parameters every plan takes (create and update), each constrained: they reach redis.conf.
local function parameters()
  return {
    ["$schema"] = "http://json-schema.org/draft-07/schema#",
    type = "object",
    additionalProperties = false,
    properties = {
      maxmemory_mb = { type = "integer", minimum = 16, maximum = 4096, default = 256,
        description = "memory limit in MiB (maxmemory; default 256)" },
      maxmemory_policy = { type = "string", description = "what redis evicts at the limit (default noeviction)",
        enum = { "noeviction", "allkeys-lru", "volatile-lru", "allkeys-random", "volatile-ttl" } },
    },
  }
end
local PARAMETERS = { service_instance = { create = { parameters = parameters() },
  update = { parameters = parameters() } } }

local service = {
  id = "6f0f3c1e-3b5e-4c2a-9a43-1f6b7f3f2f01",
  name = "redis",
  description = "Redis in-memory key-value store",
  bindable = true,
  tags = { "redis", "key-value", "cache" },
  metadata = { displayName = "Redis", providerDisplayName = "Service Forge" },
  plan_updateable = true,          -- 1-server <-> 3-servers: a redeploy on the same data
  instances_retrievable = true,
  bindings_retrievable = true,
  commands = { "redis-server" },   -- executables this service runs (the operator approves them)
  plans = {
    {
      id = "68ec5c0f-7289-47a5-87ba-aff068f3aa2f",
      name = "1-server",
      description = "A single Redis server",
      free = true,
      metadata = { bullets = { "1 redis-server", "AOF persistence" } },
      maintenance_info = { version = "7.0.0", description = "redis 7.0 with AOF persistence" },
      maximum_polling_duration = 300,
      schemas = PARAMETERS,
      nodes = 1,
    },
    {
      id = "8ff52a10-1314-4a33-8127-68d8c4961c05",
      name = "3-servers",
      description = "One Redis primary and two replicas",
      free = true,
      metadata = { bullets = { "1 primary + 2 replicas", "AOF persistence" } },
      maintenance_info = { version = "7.0.0", description = "redis 7.0 with AOF persistence" },
      maximum_polling_duration = 600,
      schemas = PARAMETERS,
      nodes = 3,
      async_only = true,         -- provision, update and delete answer 202 only
      bindings_async = true,     -- a binding touches three nodes: async where the platform allows it
    },
  },
}

--- Ports this plan needs from the local pool: one per node.
function service.ports(plan)
  return plan.nodes
end

local function node_name(i) return "redis-" .. (i - 1) end

-- Redis commands for the broker to run as the admin user: it speaks the Redis protocol itself
-- (no redis-cli process); each reply must match its expect pattern (integers as text). `flush`
-- (ACL SAVE) persists what they did; the broker shares one among concurrent binds of a node.
local function admin_redis(host, port, password, commands, expect, flush)
  return {
    redis = { host = host, port = port, user = ADMIN, password = password, commands = commands, expect = expect,
      flush = flush },
  }
end

-- redis.conf of node i: templates/local.yml merged with the node's own settings (forge.yaml),
-- rendered with forge.conf.
local function redis_conf(ctx, i, admin_password)
  local name = node_name(i)
  local node = {
    bind = ctx.host,
    port = ctx.ports[i],
    dir = ctx.dir .. "/" .. name,
    aclfile = ctx.dir .. "/" .. name .. "/users.acl",
  }
  local params = ctx.parameters or {}
  node.maxmemory = (params.maxmemory_mb or 256) .. "mb"   -- every instance has a memory limit
  if params.maxmemory_policy then node["maxmemory-policy"] = params.maxmemory_policy end
  if i > 1 then
    node.replicaof = { ctx.host, ctx.ports[1] }
    node.masteruser = ADMIN
    node.masterauth = admin_password
  end
  local doc = assert(forge.yaml.merge({ ctx.templates["local.yml"], { settings = node } }))
  -- forge.conf quotes every value as redis reads it and refuses line breaks: no parameter can
  -- add a directive
  return forge.conf.render("redis", doc.settings, { header = "rendered by Service Forge; edits are overwritten" })
end

--- Render the deployment: one redis-server process per node.
function service.deploy(ctx)
  local admin_password = ctx.secret("admin_password")
  local acl = "user default off\n" ..
    "user " .. ADMIN .. " on #" .. crypto.sha256_hex(admin_password) .. " ~* &* +@all\n"
  local processes = {}
  for i = 1, ctx.plan.nodes do
    local name = node_name(i)
    processes[i] = {
      name = name,
      argv = { "redis-server", ctx.dir .. "/" .. name .. "/redis.conf" },
      files = { [name .. "/redis.conf"] = redis_conf(ctx, i, admin_password) },
      -- redis rewrites its ACL file on ACL SAVE (binding users): written once, kept on redeploys
      seed_files = { [name .. "/users.acl"] = acl },
      health = admin_redis(ctx.host, ctx.ports[i], admin_password, { { "PING" } }, { "^PONG$" }),
    }
  end
  return { processes = processes }
end

local function username(binding_id)
  return "b-" .. crypto.sha256_hex(binding_id):sub(1, 24)
end

--- BOSH: static IPs this plan needs from the target's pool (one per node).
function service.ips(plan)
  return plan.nodes
end

--- BOSH: the manifest documents, merged by the broker in order (then its pool stub, which gives
-- meta.forge.{deployment_name, network, static_ips, azs, stemcell, releases}).
function service.manifest(ctx)
  local params = ctx.parameters or {}
  local documents = { "redis.yml" }
  if ctx.plan.nodes == 3 then documents[#documents + 1] = "3-servers.yml" end
  documents[#documents + 1] = { meta = { redis = { admin_password = ctx.secret("admin_password"),
    maxmemory_mb = params.maxmemory_mb, maxmemory_policy = params.maxmemory_policy } } }
  return { documents = documents }
end

local REDIS_PORT = 6379

-- BOSH: the broker reaches every VM's redis over the Redis protocol as the admin (the job's
-- `password`, i.e. the default user). Users persist through CONFIG REWRITE: the job runs without
-- an ACL file, so redis keeps them in its redis.conf.
local function bosh_admin(ip, password, commands, expect)
  return { redis = { host = ip, port = REDIS_PORT, password = password, commands = commands, expect = expect,
    flush = { "CONFIG", "REWRITE" } } }
end

-- BOSH bind: a per-binding ACL user on every VM (ctx.ips, primary first).
local function bosh_bind(ctx, user, password)
  local admin_password = ctx.secret("admin_password")
  local setuser = {
    { "ACL", "SETUSER", user, "reset", "on", "#" .. crypto.sha256_hex(password), "~*", "&*", "+@all", "-@admin" },
  }
  local run, hosts = {}, {}
  for i, ip in ipairs(ctx.ips) do
    run[i] = bosh_admin(ip, admin_password, setuser, { "^OK$" })
    hosts[i] = ip .. ":" .. REDIS_PORT
  end
  if #hosts == 0 then error("the deployment has no VMs with IPs", 0) end
  return {
    credentials = {
      host = ctx.ips[1],
      port = REDIS_PORT,
      username = user,
      password = password,
      uri = string.format("redis://%s:%s@%s:%d", user, password, ctx.ips[1], REDIS_PORT),
      hosts = hosts,
    },
    run = run,
  }
end

--- A binding: its own ACL user on every node; credentials list every host. When the broker
-- re-applies an existing binding (after a redeploy), ctx.credentials holds its credentials.
function service.bind(ctx)
  local user = username(ctx.binding_id)
  local password = ctx.credentials and ctx.credentials.password or crypto.password(32)
  if ctx.ips then return bosh_bind(ctx, user, password) end
  local admin_password = ctx.secret("admin_password")
  local setuser = {
    { "ACL", "SETUSER", user, "reset", "on", "#" .. crypto.sha256_hex(password), "~*", "&*", "+@all", "-@admin" },
  }
  local run, hosts = {}, {}
  for i, port in ipairs(ctx.ports) do
    run[i] = admin_redis(ctx.host, port, admin_password, setuser, { "^OK$" }, { "ACL", "SAVE" })
    hosts[i] = ctx.host .. ":" .. port
  end
  return {
    credentials = {
      host = ctx.host,
      port = ctx.ports[1],
      username = user,
      password = password,
      uri = string.format("redis://%s:%s@%s:%d", user, password, ctx.host, ctx.ports[1]),
      hosts = hosts,
    },
    run = run,
  }
end

--- Unbind: delete the binding's user (which also drops its connections) on every node.
function service.unbind(ctx)
  local admin_password = ctx.secret("admin_password")
  if ctx.ips then
    local run = {}
    for i, ip in ipairs(ctx.ips) do
      run[i] = bosh_admin(ip, admin_password, { { "ACL", "DELUSER", username(ctx.binding_id) } }, { "^%d+$" })
    end
    return { run = run }
  end
  local deluser = { { "ACL", "DELUSER", username(ctx.binding_id) } }
  local run = {}
  for i, port in ipairs(ctx.ports) do
    run[i] = admin_redis(ctx.host, port, admin_password, deluser, { "^%d+$" }, { "ACL", "SAVE" })
  end
  return { run = run }
end

-- Backups ------------------------------------------------------------------------------------

--- Backup: a background save of the primary (BGSAVE SCHEDULE: an AOF rewrite in progress goes
-- first), awaited until no save or rewrite runs and the last save succeeded, then its RDB file.
-- Replicas hold the same data; binding users live in the ACL files, not in the backup.
function service.backup(ctx)
  local admin_password = ctx.secret("admin_password")
  local primary = ctx.ports[1]
  return {
    run = { admin_redis(ctx.host, primary, admin_password, { { "BGSAVE", "SCHEDULE" } }, { "^Background saving s" }) },
    ready = admin_redis(ctx.host, primary, admin_password, { { "INFO", "persistence" } },
      { "rdb_bgsave_in_progress:0.-rdb_last_bgsave_status:ok.-aof_rewrite_in_progress:0" }),
    files = { ["dump.rdb"] = node_name(1) .. "/dump.rdb" },
  }
end

-- Redis (appendonly yes) loads its data from the multi-part AOF in appendonlydir/ and ignores an
-- RDB file beside it: the backup goes back as that AOF's base, with a manifest naming it.
local AOF_DIR = "appendonlydir"
local AOF_BASE = "appendonly.aof.1.base.rdb"

--- Restore: stop every node, drop their data, put the RDB back as the primary's AOF base and
-- start again; replicas copy the primary. The ACL files (binding users) stay as they are, so
-- the instance's bindings keep working; a backup of any plan fits any plan.
function service.restore(ctx)
  local remove = {}
  for i = 1, ctx.plan.nodes do
    remove[#remove + 1] = node_name(i) .. "/" .. AOF_DIR
    remove[#remove + 1] = node_name(i) .. "/dump.rdb"
  end
  local aof = node_name(1) .. "/" .. AOF_DIR .. "/"
  return {
    stop = true,
    remove = remove,
    put = { [aof .. AOF_BASE] = "dump.rdb" },
    write = { [aof .. "appendonly.aof.manifest"] = "file " .. AOF_BASE .. " seq 1 type b\n" },
  }
end

return service
