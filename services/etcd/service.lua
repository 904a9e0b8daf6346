-- etcd as a service: a cluster of 1, 3 or 5 members, client auth on, a user per binding.
--
-- Local target: each member is one `etcd` process with two ports from the broker's pool
-- (client, peer; member i has ports[2i-1] and ports[2i]) and its data under the instance's
-- directory (etcd-<n>/data). A fresh provision starts every member at once with a static
-- initial cluster. An update to a larger plan grows the running cluster member by member:
-- each new member waits for the members before it (`after`), is added to the cluster with
-- `etcdctl member add` (its `init`), then starts with --initial-cluster-state existing.
-- Shrinking is refused (plan_change). Setup creates root with a generated password and turns
-- authentication on; each binding gets its own user and role, allowed to read and write under
-- the binding's key prefix only.
--
-- BOSH target: manifest() renders templates/etcd.yml (the cfcr-etcd release's etcd job, one
-- instance per member on the instance's static IPs). Bindings there need etcd's auth API,
-- which the broker cannot speak to VMs yet (README.md, "BOSH").
local crypto = forge.crypto

-- A binding may name its own key prefix: "/" then path segments, each ending in "/".
local PREFIX_PATTERN = "^/[A-Za-z0-9._-]+/([A-Za-z0-9._-]+/)*$"

local BIND_PARAMETERS = {
  service_binding = { create = { parameters = {
    ["$schema"] = "http://json-schema.org/draft-07/schema#",
    type = "object",
    additionalProperties = false,
    properties = {
      prefix = { type = "string", pattern = PREFIX_PATTERN, maxLength = 256,
        description = "the key prefix the binding may read and write, e.g. /myapp/ (default /<binding id>/)",
        examples = { "/myapp/" } },
    },
  } } },
}

local MAINTENANCE = { version = "3.4.1", description = "etcd 3.4; clusters of 1, 3 or 5 members; readiness checks" }

local service = {
  id = "2f3b8f3e-7a51-4b8e-9f5e-0c1d2e3f4a5b",
  name = "etcd",
  description = "etcd v3 key-value store (1, 3 or 5 members) with per-binding users",
  bindable = true,
  tags = { "etcd", "key-value", "coordination" },
  metadata = { displayName = "etcd", providerDisplayName = "Service Forge" },
  plan_updateable = true,              -- 1 -> 3 -> 5 members; shrinking is refused (plan_change)
  instances_retrievable = true,
  bindings_retrievable = true,
  commands = { "etcd", "etcdctl" },    -- executables this service runs (the operator approves them)
  plans = {
    {
      id = "6a7b8c9d-0e1f-4a2b-8c3d-4e5f6a7b8c9d",
      name = "1-member",
      description = "A single etcd member (no fault tolerance)",
      free = true,
      metadata = { bullets = { "1 etcd member", "grows to 3 or 5 members" } },
      maintenance_info = MAINTENANCE,
      schemas = BIND_PARAMETERS,
      members = 1,
    },
    {
      id = "0c6f4f0e-5d2b-4a8e-b3a1-7e9d1c2b3a40",
      name = "3-members",
      description = "An etcd cluster of 3 members (survives the loss of one)",
      free = true,
      metadata = { bullets = { "3 etcd members", "tolerates 1 failed member", "grows to 5 members" } },
      maintenance_info = MAINTENANCE,
      maximum_polling_duration = 300,
      schemas = BIND_PARAMETERS,
      async_only = true,
      members = 3,
    },
    {
      id = "9e2d7b14-6c3a-4f5e-8d1b-2a7c6e5f4d30",
      name = "5-members",
      description = "An etcd cluster of 5 members (survives the loss of two)",
      free = true,
      metadata = { bullets = { "5 etcd members", "tolerates 2 failed members" } },
      maintenance_info = MAINTENANCE,
      maximum_polling_duration = 300,
      schemas = BIND_PARAMETERS,
      async_only = true,
      members = 5,
    },
  },
}

--- Two ports per member: client and peer.
function service.ports(plan) return 2 * plan.members end

--- BOSH: one static IP per member.
function service.ips(plan) return plan.members end

--- Growing is a redeploy that adds members; shrinking would need members removed one by one
-- with their data moved, which this service does not do.
function service.plan_change(from, to)
  if from and to.members < from.members then
    return string.format("etcd cannot shrink a cluster: plan %s has %d member(s), the instance runs %d. "
      .. "Create a new instance with plan %s and move the data.", to.name, to.members, from.members, to.name)
  end
  return true
end

local function member_name(i) return "member-" .. (i - 1) end
local function process_name(i) return "etcd-" .. (i - 1) end
local function client_url(ctx, i) return "http://" .. ctx.host .. ":" .. ctx.ports[2 * i - 1] end
local function peer_url(ctx, i) return "http://" .. ctx.host .. ":" .. ctx.ports[2 * i] end

-- The client URLs of members first..last, comma-separated (etcdctl --endpoints).
local function endpoints(ctx, first, last)
  local urls = {}
  for i = first, last do urls[#urls + 1] = client_url(ctx, i) end
  return table.concat(urls, ",")
end

-- On an update, the members the cluster has now: the plan that ran (ctx.previous.plan), bounded
-- by the ports it held (two per member that was deployed).
local function members_now(prev)
  local n = prev.plan and prev.plan.members or math.huge
  if prev.ports then n = math.min(n, #prev.ports // 2) end
  return n
end

-- etcdctl against `urls`; the caller adds the credentials it needs (env), never in argv.
-- `quick`: health checks, polled while a member waits for a leader, give up after ~2 s.
local function etcdctl(urls, args, quick)
  local argv = { "etcdctl", "--endpoints=" .. urls, quick and "--dial-timeout=1s" or "--dial-timeout=3s",
    quick and "--command-timeout=1s" or "--command-timeout=5s" }
  for _, a in ipairs(args) do argv[#argv + 1] = a end
  return argv
end

local function as_root(ctx)
  return { ETCDCTL_API = "3", ETCDCTL_USER = "root:" .. ctx.secret("root_password") }
end

-- --initial-cluster for members 1..last.
local function initial_cluster(ctx, last)
  local parts = {}
  for i = 1, last do parts[i] = member_name(i) .. "=" .. peer_url(ctx, i) end
  return table.concat(parts, ",")
end

--- The members: every one on a fresh provision with a static initial cluster; on an update,
-- the members that exist restart on their data (etcd ignores --initial-* flags then) and each
-- new one joins the running cluster after the members before it are healthy.
function service.deploy(ctx)
  local total = ctx.plan.members
  local fresh = ctx.previous == nil
  local existing = fresh and total or math.max(1, math.min(total, members_now(ctx.previous)))
  local processes = {}
  for i = 1, total do
    local joins = i > existing
    local p = {
      name = process_name(i),
      argv = { "etcd", "--name", member_name(i), "--data-dir", ctx.dir .. "/" .. process_name(i) .. "/data",
        "--listen-client-urls", client_url(ctx, i), "--advertise-client-urls", client_url(ctx, i),
        "--listen-peer-urls", peer_url(ctx, i), "--initial-advertise-peer-urls", peer_url(ctx, i),
        "--initial-cluster", initial_cluster(ctx, joins and i or existing),
        "--initial-cluster-state", fresh and "new" or "existing",
        "--initial-cluster-token", "forge-" .. ctx.instance_id,
        -- members join one after the other, each as soon as the one before is healthy: etcd's
        -- strict check would refuse an add within 5 s of the previous member connecting
        "--strict-reconfig-check=false",
        "--auto-compaction-mode", "periodic", "--auto-compaction-retention", "1h",
        "--logger", "zap", "--log-outputs", "stderr" },
      -- ready: this member answers and a linearizable read commits (the cluster has a leader)
      health = { argv = etcdctl(client_url(ctx, i), { "endpoint", "health" }, true), env = as_root(ctx) },
    }
    if joins then
      p.after = {}
      for j = 1, i - 1 do p.after[j] = process_name(j) end
      -- A rerun after a broker crash finds the member added already ("member ID already
      -- exist", "Peer URLs already exists"); when it is the second member, the added but
      -- unstarted member leaves the first without a quorum, so the rerun times out instead:
      -- either is the state it wants.
      local done = { "already exist" }
      if i == 2 then done[2] = "deadline exceeded" end
      p.init = { {
        argv = etcdctl(endpoints(ctx, 1, i - 1), { "member", "add", member_name(i), "--peer-urls=" .. peer_url(ctx, i) }),
        env = as_root(ctx),
        creates = process_name(i) .. "/data/member/wal",   -- it has joined once already
        tolerate = done,
      } }
    end
    processes[i] = p
  end
  -- Setup creates root and turns auth on. Each step is idempotent: once auth is on, a rerun
  -- (after a broker crash, or an update) is refused by etcd for want of credentials, which is
  -- the state the step wants, so those refusals are tolerated.
  local done = { "already exists", "user name is empty", "permission denied", "Authentication Enabled" }
  local all = endpoints(ctx, 1, total)
  local function setup(args, stdin)
    return { argv = etcdctl(all, args), env = { ETCDCTL_API = "3" }, stdin = stdin, tolerate = done }
  end
  return {
    processes = processes,
    setup = {
      setup({ "user", "add", "root", "--interactive=false" }, ctx.secret("root_password")),
      setup({ "user", "grant-role", "root", "root" }),
      setup({ "auth", "enable" }),
    },
  }
end

local function names(binding_id)
  local id = crypto.sha256_hex(binding_id):sub(1, 20)
  return "b-" .. id, "r-" .. id
end

-- A root etcdctl step of bind/unbind against every member.
local function admin(ctx, args, stdin, expect, tolerate)
  return { argv = etcdctl(endpoints(ctx, 1, #ctx.ports // 2), args), env = as_root(ctx), stdin = stdin,
    expect = expect, tolerate = tolerate }
end

local function no_bosh_bindings()
  error("etcd bindings on a BOSH target are not supported: the broker has no etcd command kind for VMs "
    .. "(services/etcd/README.md, BOSH)", 0)
end

--- A binding: a user and a role with read/write on the binding's prefix. Idempotent: the
-- broker re-applies every binding after an update (ctx.credentials), and a bind may rerun
-- after a crash, so "already exists" is the state wanted and the password is set again.
function service.bind(ctx)
  if ctx.ips then no_bosh_bindings() end
  local user, role = names(ctx.binding_id)
  local old = ctx.credentials or {}
  local prefix = old.prefix or (ctx.parameters or {}).prefix or ("/" .. ctx.binding_id .. "/")
  local password = old.password or crypto.password(32)
  local urls = {}
  for i = 1, #ctx.ports // 2 do urls[i] = client_url(ctx, i) end
  return {
    credentials = { endpoints = urls, username = user, password = password, prefix = prefix },
    run = {
      admin(ctx, { "role", "add", role }, nil, { "^Role .* created$" }, { "role name already exists" }),
      admin(ctx, { "role", "grant-permission", role, "--prefix=true", "readwrite", prefix }, nil,
        { "^Role .* updated$" }),
      admin(ctx, { "user", "add", user, "--interactive=false" }, password, { "^User .* created$" },
        { "user name already exists" }),
      admin(ctx, { "user", "passwd", user, "--interactive=false" }, password, { "^Password updated$" }),
      admin(ctx, { "user", "grant-role", user, role }, nil, { "^Role .* is granted to user .*$" }),
    },
  }
end

--- Unbind: delete the binding's user (its tokens go with it) and role. Also undoes a bind that
-- failed halfway, so what is missing already counts as deleted.
function service.unbind(ctx)
  if ctx.ips then return { run = {} } end
  local user, role = names(ctx.binding_id)
  return { run = {
    admin(ctx, { "user", "delete", user }, nil, { "^User .* deleted$" }, { "user name not found" }),
    admin(ctx, { "role", "delete", role }, nil, { "^Role .* deleted$" }, { "role name not found" }),
  } }
end

-- Backups ------------------------------------------------------------------------------------

local SNAPSHOT = "snapshot.db"

--- Backup: a snapshot of the keyspace (etcdctl snapshot save, from the first member; it holds
-- every key, user and role, the root password's hash among them).
function service.backup(ctx)
  local path = ctx.scratch .. "/" .. SNAPSHOT
  return {
    run = { { argv = { "etcdctl", "--endpoints=" .. client_url(ctx, 1), "--dial-timeout=3s", "--command-timeout=300s",
      "snapshot", "save", ctx.dir .. "/" .. path }, env = as_root(ctx) } },
    files = { [SNAPSHOT] = path },
  }
end

-- After a snapshot of another instance: root has that instance's password (set this one's,
-- signing in with the other's; "authentication failed" means it is done already), and the other
-- instance's binding users, which have no binding here, are deleted. This instance's bindings
-- are re-created by the broker once it is healthy.
local function adopt_snapshot(ctx)
  local run = {}
  local theirs = ctx.backup.secrets.root_password
  local ours = ctx.secret("root_password")
  local all = endpoints(ctx, 1, ctx.plan.members)
  if theirs and theirs ~= ours then
    run[1] = { argv = etcdctl(all, { "user", "passwd", "root", "--interactive=false" }), stdin = ours,
      env = { ETCDCTL_API = "3", ETCDCTL_USER = "root:" .. theirs }, expect = { "^Password updated$" },
      tolerate = { "authentication failed" } }
  end
  local here = {}
  for _, b in ipairs(ctx.bindings or {}) do here[b.id] = true end
  for _, b in ipairs(ctx.backup.bindings or {}) do
    if not here[b.id] then
      local user, role = names(b.id)
      run[#run + 1] = { argv = etcdctl(all, { "user", "delete", user }), env = as_root(ctx), tolerate = { "not found" } }
      run[#run + 1] = { argv = etcdctl(all, { "role", "delete", role }), env = as_root(ctx), tolerate = { "not found" } }
    end
  end
  return run
end

--- Restore: stop every member, drop their data, rebuild each member's data directory from the
-- snapshot (etcdctl snapshot restore with this cluster's members and token), start again.
-- A snapshot of any plan fits any plan.
function service.restore(ctx)
  local remove, prepare = {}, {}
  local snapshot = ctx.dir .. "/" .. ctx.scratch .. "/" .. SNAPSHOT
  for i = 1, ctx.plan.members do
    local data = process_name(i) .. "/data"
    remove[i] = data
    prepare[i] = { argv = { "etcdctl", "snapshot", "restore", snapshot, "--name", member_name(i),
      "--initial-cluster", initial_cluster(ctx, ctx.plan.members), "--initial-cluster-token", "forge-" .. ctx.instance_id,
      "--initial-advertise-peer-urls", peer_url(ctx, i), "--data-dir", ctx.dir .. "/" .. data },
      env = { ETCDCTL_API = "3" } }
  end
  return { stop = true, remove = remove, put = { [ctx.scratch .. "/" .. SNAPSHOT] = SNAPSHOT }, prepare = prepare,
    run = adopt_snapshot(ctx) }
end

--- BOSH: templates/etcd.yml with the plan's member count and the root password as params
-- (the broker's pool stub adds meta.forge: deployment name, network, static IPs, AZs,
-- stemcell and releases).
function service.manifest(ctx)
  return {
    documents = { "etcd.yml" },
    params = {
      ["instance_groups.etcd.instances"] = ctx.plan.members,
      ["instance_groups.etcd.jobs.etcd.properties.users.root.password"] = ctx.secret("root_password"),
    },
  }
end

return service
