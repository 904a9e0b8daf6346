-- etcd as a service on the local target: one etcd member per instance, client auth on.
--
-- Each instance runs its own etcd (client and peer port from the broker's pool, data under
-- the instance's directory) with a generated root password; setup turns authentication on.
-- Each binding gets its own user and role, allowed to read and write under the binding's own
-- key prefix (/<binding id>/), created on bind and removed on unbind.
local crypto = forge.crypto

local service = {
  id = "2f3b8f3e-7a51-4b8e-9f5e-0c1d2e3f4a5b",
  name = "etcd",
  description = "etcd v3 key-value store with per-binding users",
  bindable = true,
  tags = { "etcd", "key-value", "coordination" },
  metadata = { displayName = "etcd" },
  instances_retrievable = true,
  bindings_retrievable = true,
  commands = { "etcd", "etcdctl" },   -- executables this service runs (the operator approves them)
  plans = {
    {
      id = "6a7b8c9d-0e1f-4a2b-8c3d-4e5f6a7b8c9d",
      name = "1-member",
      description = "A single etcd member",
      free = true,
      maintenance_info = { version = "3.4.0" },
    },
  },
}

--- Two ports per member: client and peer.
function service.ports() return 2 end

local function endpoint(ctx) return "http://" .. ctx.host .. ":" .. ctx.ports[1] end

-- etcdctl as root; passwords travel in the environment, never in argv.
local function etcdctl(ctx, args, stdin, expect)
  local argv = { "etcdctl", "--endpoints=" .. endpoint(ctx), "--dial-timeout=3s", "--command-timeout=5s" }
  for _, a in ipairs(args) do argv[#argv + 1] = a end
  return { argv = argv, env = { ETCDCTL_API = "3", ETCDCTL_USER = "root:" .. ctx.secret("root_password") },
    stdin = stdin, expect = expect }
end

--- One etcd member; setup creates root and turns auth on. Each step is idempotent: once auth
-- is on, a rerun (after a broker crash) is refused by etcd for want of credentials, which is
-- the state the step wants, so those refusals are tolerated.
function service.deploy(ctx)
  local peer = "http://" .. ctx.host .. ":" .. ctx.ports[2]
  local root = ctx.secret("root_password")
  local done = { "already exists", "user name is empty", "permission denied", "Authentication Enabled" }
  local function setup(args, stdin)
    local argv = { "etcdctl", "--endpoints=" .. endpoint(ctx), "--dial-timeout=3s", "--command-timeout=5s" }
    for _, a in ipairs(args) do argv[#argv + 1] = a end
    return { argv = argv, env = { ETCDCTL_API = "3" }, stdin = stdin, tolerate = done }
  end
  return {
    processes = { {
      name = "etcd-0",
      argv = { "etcd", "--name", "member-0", "--data-dir", ctx.dir .. "/etcd-0/data",
        "--listen-client-urls", endpoint(ctx), "--advertise-client-urls", endpoint(ctx),
        "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
        "--initial-cluster", "member-0=" .. peer, "--initial-cluster-state", "new",
        "--initial-cluster-token", "forge-" .. ctx.instance_id, "--logger", "zap", "--log-outputs", "stderr" },
      health = { tcp = ctx.ports[1] },
    } },
    setup = {
      setup({ "user", "add", "root", "--interactive=false" }, root),
      setup({ "user", "grant-role", "root", "root" }),
      setup({ "auth", "enable" }),
    },
  }
end

local function names(binding_id)
  local id = crypto.sha256_hex(binding_id):sub(1, 20)
  return "b-" .. id, "r-" .. id, "/" .. binding_id .. "/"
end

--- A binding: a user and a role with read/write on the binding's own prefix.
function service.bind(ctx)
  local user, role, prefix = names(ctx.binding_id)
  local password = ctx.credentials and ctx.credentials.password or crypto.password(32)
  return {
    credentials = { endpoints = { endpoint(ctx) }, username = user, password = password, prefix = prefix },
    run = {
      etcdctl(ctx, { "role", "add", role }, nil, { "^Role .* created$" }),
      etcdctl(ctx, { "role", "grant-permission", role, "--prefix=true", "readwrite", prefix }, nil,
        { "^Role .* updated$" }),
      etcdctl(ctx, { "user", "add", user, "--interactive=false" }, password, { "^User .* created$" }),
      etcdctl(ctx, { "user", "grant-role", user, role }, nil, { "^Role .* is granted to user .*$" }),
    },
  }
end

--- Unbind: remove the binding's user and role.
function service.unbind(ctx)
  local user, role = names(ctx.binding_id)
  return { run = {
    etcdctl(ctx, { "user", "delete", user }, nil, { "^User .* deleted$" }),
    etcdctl(ctx, { "role", "delete", role }, nil, { "^Role .* deleted$" }),
  } }
end

return service
