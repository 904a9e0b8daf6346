-- IP allocation of a BOSH target against the real store: a provision reads about as many IP
-- keys as it takes (not every reserved one), keeps the IPs an instance holds, skips holes' owners,
-- and deprovision releases exactly the instance's keys.
local Bosh = require "forge.targets.bosh"
local Broker = require "spec.support.broker"
local store = require "forge.store"

local NET = { name = "services", static = { "10.1.0.1 - 10.1.255.254" } }

-- A store wrapper counting the keys read (gets and rows of ranges).
local function counting(db)
  local c = { reads = 0 }
  c.db = setmetatable({}, { __index = function(_, name)
    return function(_, ...)
      local a, b = db[name](db, ...)
      if name == "get" then c.reads = c.reads + 1 end
      if name == "range" and a then c.reads = c.reads + #a end
      return a, b
    end
  end })
  return c
end

local function claim(db, keys, id)
  local ops = {}
  for _, k in ipairs(keys) do ops[#ops + 1] = { op = "put", key = k, value = id } end
  assert(db:txn { success = ops })
end

describe("BOSH IP allocation", function()
  local dir, db, target
  before_each(function()
    dir = Broker.tmpdir()
    db = assert(store.open(dir .. "/forge.db"))
    target = Bosh.new("dc", { networks = { NET } }, dir)
  end)
  after_each(function()
    db:close()
    os.execute("rm -rf '" .. dir .. "'")
  end)

  it("reads a few keys per provision with 20,000 IPs reserved", function()
    local pool = assert(Bosh.expand_static(NET.static))
    local ops = {}
    for i = 1, 20000 do
      ops[#ops + 1] = { op = "put", key = target:ip_prefix(NET) .. pool[i], value = "old" .. i }
      if #ops == 500 then assert(db:txn { success = ops }); ops = {} end
    end
    local c = counting(db)
    local ips, keys = target:allocate_ips(c.db, NET, "new1", 3)
    assert.same({ pool[20001], pool[20002], pool[20003] }, ips)
    assert.is_true(c.reads < 40, "keys read: " .. c.reads)
    claim(db, keys, "new1")
    c.reads = 0
    ips = target:allocate_ips(c.db, NET, "new2", 1)
    assert.same({ pool[20004] }, ips)
    assert.equal(1, c.reads)
  end)

  it("keeps what an instance holds and passes over IPs others hold", function()
    local pool, prefix = assert(Bosh.expand_static(NET.static)), target:ip_prefix(NET)
    claim(db, { prefix .. pool[1], prefix .. pool[3] }, "a")
    claim(db, { prefix .. pool[2] }, "b")
    local ips, keys = target:allocate_ips(db, NET, "b", 2, { pool[2] })
    assert.same({ pool[2], pool[4] }, ips)
    assert.same({ prefix .. pool[4] }, keys)
    claim(db, keys, "b")
    local ops = target:release_ops(db, { id = "b", resources = { network = NET.name, ips = ips } })
    assert.same({ { op = "delete", key = prefix .. pool[2] }, { op = "delete", key = prefix .. pool[4] } }, ops)
    assert.same({}, target:release_ops(db, { id = "c", resources = { network = NET.name, ips = { pool[1] } } }))
  end)

  it("keeps a pool as ranges: 130,816 addresses in two entries, overlaps counted once", function()
    local pool = assert(Bosh.static_ranges({ "10.1.0.0 - 10.1.255.255", "10.1.255.0 - 10.2.254.255" }))
    assert.equal(130816, pool.size)
    assert.equal(2, #pool)
    assert.equal("10.1.255.255", Bosh.ip_at(pool, 65536))
    assert.equal("10.2.0.0", Bosh.ip_at(pool, 65537))
    assert.is_nil(Bosh.ip_at(pool, 130817))
  end)

  it("says when the pool is full", function()
    local small = { name = "tiny", static = { "10.2.0.1 - 10.2.0.2" } }
    target = Bosh.new("dc", { networks = { small } }, dir)
    claim(db, { target:ip_prefix(small) .. "10.2.0.1" }, "x")
    local ips, err = target:allocate_ips(db, small, "y", 2)
    assert.is_nil(ips)
    assert.matches("has no 2 free address%(es%) left %(2 in the pool%)", err)
  end)
end)
