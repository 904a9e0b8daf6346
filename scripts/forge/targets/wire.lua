--- Commands a service declares that the broker speaks over the network itself, with no client
-- process: `redis` (forge.resp) and `pg` (forge.pg on libpq). Both targets run them: the local
-- target against its processes, a BOSH target against the VMs' IPs.
local resp = require "forge.resp"

local M = {}

-- Commands whose second word names a subcommand ("ACL SETUSER"): part of the command's name.
local CONTAINERS = { ACL = true, CLIENT = true, CLUSTER = true, COMMAND = true, CONFIG = true, DEBUG = true,
  FUNCTION = true, LATENCY = true, MEMORY = true, MODULE = true, OBJECT = true, PUBSUB = true, SCRIPT = true,
  SLOWLOG = true, XGROUP = true, XINFO = true }

-- How messages name a redis command: its name, never its arguments (they may hold secrets).
local function redis_command_name(c)
  local name = type(c) == "table" and tostring(c[1]):upper() or "?"
  if CONTAINERS[name] and type(c[2]) == "string" then name = name .. " " .. c[2]:upper():sub(1, 32) end
  return name
end

-- A reply as the text its expect pattern is matched against: strings as they are, integers
-- via tostring, a nil reply as "(nil)", an array as its elements one per line.
local function reply_text(r)
  if type(r) == "table" then
    local parts = {}
    for i, v in ipairs(r) do parts[i] = reply_text(v) end
    return table.concat(parts, "\n")
  end
  if r == false then return "(nil)" end
  return tostring(r)
end

--- A declared redis command list, spoken natively (forge.resp): no redis-cli process. The
-- connection is pooled: the next command list for the same node and credentials (the next bind
-- of the instance, its health check) reuses it without a new connection and AUTH.
-- r = {host (default: default_host), port, user, password, commands = {{"PING"}, ...},
--      expect = {lua patterns, one per reply}, flush = {"ACL", "SAVE"} (optional: a command that
--      persists what the commands did, shared by concurrent command lists to the same node)}
-- @return true | nil, message
function M.redis(r, default_host, timeout)
  local host = r.host or default_host
  if not host then return nil, "redis command: no host (give redis.host)" end
  local where = string.format("redis %s:%s", tostring(host), tostring(r.port))
  local ok, replies, err = pcall(resp.call, { host = host, port = r.port, user = r.user, password = r.password,
    commands = r.commands, flush = r.flush, timeout = timeout, pool = true })
  if not ok then return nil, where .. ": bad command: " .. tostring(replies) end
  if not replies then return nil, where .. ": " .. tostring(err) end
  for i, reply in ipairs(replies) do
    local want = r.expect and r.expect[i]
    if type(reply) == "table" and reply.err then
      return nil, string.format("%s: %s: error reply %q", where, redis_command_name(r.commands[i]),
        tostring(reply.err):sub(1, 200))
    end
    local text = reply_text(reply)
    if want and not text:match(want) then
      return nil, string.format("%s: %s: unexpected reply %q", where, redis_command_name(r.commands[i]),
        text:sub(1, 200))
    end
  end
  if r.expect and #replies < #r.expect then return nil, where .. ": missing replies" end
  return true
end


--- A declared SQL statement list, spoken natively (forge.pg on libpq): no psql process.
-- q = {host (default: default_host), port, user, password, database, statements,
--      expect = {lua patterns, one per statement}, tolerate = {patterns of "SQLSTATE message"}}
-- A reply's text is the first column of its first row, else its command tag.
-- @return true | nil, message
function M.pg(q, default_host, timeout)
  local host = q.host or default_host
  if not host then return nil, "pg command: no host (give pg.host)" end
  local where = string.format("postgres %s:%s", tostring(host), tostring(q.port))
  local ok, replies, err = pcall(require("forge.pg").exec, { host = host, port = q.port, user = q.user,
    password = q.password, database = q.database, statements = q.statements, tolerate = q.tolerate,
    timeout = timeout })
  if not ok then return nil, where .. ": bad statement: " .. tostring(replies) end
  if not replies then return nil, where .. ": " .. tostring(err and err.message or err) end
  for i, want in ipairs(q.expect or {}) do
    local r = replies[i]
    local text = r and (r.rows and r.rows[1] and tostring(r.rows[1][1]) or r.command) or ""
    if not text:match(want) then
      return nil, string.format("%s: statement %d: unexpected reply %q", where, i, text:sub(1, 200))
    end
  end
  return true
end

--- Run a network command (cmd.redis or cmd.pg). Returns true | nil, message; nil, nil when cmd
-- is neither (a helper process: the caller's business).
function M.run(cmd, default_host, timeout)
  if cmd.redis then return M.redis(cmd.redis, default_host, timeout) end
  if cmd.pg then return M.pg(cmd.pg, default_host, timeout) end
end

return M
