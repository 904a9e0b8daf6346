-- forge.sandbox: the API, the capabilities a script gets, and a real service running unchanged.
local sandbox = require "forge.sandbox"
local ferror = require "forge.error"
local flog = require "forge.log"
local services = require "forge.services"
local util = require "forge.util"

local REDIS = "services/redis/service.lua"

local read = require("spec.support.files").read

local function loaded(src, opts)
  local sb = sandbox.new(opts or { name = "t" })
  assert(sb:load(src, "@services/t/service.lua"))
  return sb
end

-- Same keys and value types at every level (values may differ: random passwords).
local function same_shape(a, b, path)
  path = path or "value"
  assert.equals(type(a), type(b), path .. ": type")
  if type(a) ~= "table" then return end
  for k, v in pairs(a) do same_shape(v, b[k], path .. "." .. tostring(k)) end
  for k in pairs(b) do assert(a[k] ~= nil, path .. "." .. tostring(k) .. " only in the sandbox") end
end

describe("forge.sandbox", function()
  local level
  setup(function() level = flog.level("error") end)
  teardown(function() flog.level(level) end)

  it("has module info and defaults", function()
    assert.equals("forge.sandbox", sandbox._NAME)
    assert.equals(64 * 1024 * 1024, sandbox.MEMORY)
    local sb = sandbox.new()
    assert.same({ name = "service", memory = sandbox.MEMORY, cpu = 2, wall = 10,
      chunk = "@services/service/service.lua" }, sb:limits())
    assert.matches("^forge.sandbox %(service, %d+ bytes%)$", tostring(sb))
    sb:close()
  end)

  it("rejects unknown or invalid options", function()
    assert.has_error(function() sandbox.new{ memroy = 1 } end, "sandbox.new: unknown option 'memroy'")
    assert.has_error(function() sandbox.new{ memory = 1000 } end)
    assert.has_error(function() sandbox.new{ cpu = 0 } end)
    assert.has_error(function() sandbox.new{ wall = "x" } end)
  end)

  it("finds the capability modules in modules_dir (plain lua5.4) and reports a bad one", function()
    local sb = sandbox.new{ modules_dir = "build/lib/forge" }
    assert(sb:load("return { f = function() return forge.crypto.hex('A') end }"))
    assert.equals("41", sb:call("f"))
    assert.has_error(function() sandbox.new{ modules_dir = "/nonexistent" } end)
  end)

  it("uses path_prefix for the default chunk name", function()
    local sb = sandbox.new{ name = "x", path_prefix = "/srv/services/x/" }
    local ok, err = sb:load("error('boom')")
    assert.is_nil(ok)
    assert.matches("^/srv/services/x/service.lua:1: boom", err.message)
  end)

  it("accounts memory and frees it on close (also via <close>)", function()
    local sb = loaded("local s = {} ; function s.grow(n) s.t = {} ; for i = 1, n do s.t[i] = i end end ; return s")
    local before = sb:memory()
    assert(before > 0 and before < 1024 * 1024, before)
    sb:call("grow", 100000)
    assert(sb:memory() > before + 100000 * 8)
    sb:close()
    sb:close() -- idempotent
    assert.has_error(function() sb:memory() end, "sandbox is closed")
    do
      local sb2 <close> = loaded("return {}")
      assert(sb2:memory() > 0)
    end
  end)

  it("refuses a second load, and calls before a load", function()
    local sb = sandbox.new()
    assert.has_error(function() sb:call("x") end)
    assert.has_error(function() sb:field() end)
    assert(sb:load("return {}"))
    local ok, err = sb:load("return {}")
    assert.is_nil(ok)
    assert.matches("already holds a service", err.message)
  end)

  it("field() deep-copies plain data; functions show as true", function()
    local sb = loaded([[
      return { id = "x", n = 3, f = 1.5, list = { "a", "b" }, nested = { deep = { yes = true } },
        hook = function() end, null = forge.json.null, ynull = forge.yaml.null }
    ]])
    local all = sb:field()
    assert.same({ id = "x", n = 3, f = 1.5, list = { "a", "b" }, nested = { deep = { yes = true } },
      hook = true }, { id = all.id, n = all.n, f = all.f, list = all.list, nested = all.nested, hook = all.hook })
    assert.equals(all.null, all.ynull) -- both become the lightuserdata null (cjson.null)
    assert.is_true(math.type(all.n) == "integer")
    assert.same({ "a", "b" }, sb:field("list"))
    assert.equals("b", sb:field("list.2"))
    assert.is_true(sb:field("nested.deep.yes"))
    assert.is_nil(sb:field("nested.missing.x"))
    -- the copy is a copy
    local l = sb:field("list")
    l[1] = "changed"
    assert.equals("a", sb:field("list.1"))
  end)

  it("call() copies arguments in and the result and ctx out; functions are dropped", function()
    local sb = loaded([[
      local s = {}
      function s.echo(ctx, extra)
        ctx.seen = true
        ctx.fn = function() end
        return { ctx = ctx.v, extra = extra, fn = function() end, null = forge.json.null }
      end
      function s.nothing() end
      return s
    ]])
    local ctx = { v = { 1, 2, { x = "y" } } }
    local res, after = sb:call("echo", ctx, 7)
    assert.same({ 1, 2, { x = "y" } }, res.ctx)
    assert.equals(7, res.extra)
    assert.is_nil(res.fn)
    assert.equals(require("cjson").null, res.null)
    assert.is_true(after.seen)
    assert.is_nil(after.fn)
    assert.is_nil(ctx.seen) -- the caller's table is untouched
    local r2, a2 = sb:call("nothing")
    assert.is_nil(r2)
    assert.is_nil(a2)
  end)

  it("errors are forge.error values with code, message, traceback and service", function()
    local sb = loaded("local s = {}\nfunction s.f()\n  error('bad input')\nend\nreturn s")
    local res, err = sb:call("f", {})
    assert.is_nil(res)
    assert.is_true(ferror.is(err))
    assert.equals("sandbox.error", err.code)
    assert.equals("services/t/service.lua:3: bad input", err.message)
    assert.is_false(err.retryable)
    assert.equals("t", err.service)
    assert.matches("services/t/service.lua:3: in function", err.traceback)
    assert.equals("sandbox.error: services/t/service.lua:3: bad input", tostring(err))
    -- error objects: tables with __tostring, non-strings
    sb = loaded([[return {
      t = function() error(setmetatable({}, { __tostring = function() return "custom" end })) end,
      n = function() error(42) end,
      e = function() error() end }]])
    assert.equals("custom", select(2, sb:call("t")).message)
    assert.equals("42", select(2, sb:call("n")).message)
    assert.equals("(error object is a nil value)", select(2, sb:call("e")).message)
  end)

  it("ctx.secret(name) returns ctx.secrets[name], generating and storing it when absent", function()
    local sb = loaded([[return { f = function(ctx)
      return { a = ctx.secret("a"), b = ctx.secret("b"), b2 = ctx.secret("b") }
    end }]])
    local res, after = sb:call("f", { secrets = { a = "given" } })
    assert.equals("given", res.a)
    assert.matches("^[%w]+$", res.b)
    assert.equals(32, #res.b)
    assert.equals(res.b, res.b2)
    assert.same({ a = "given", b = res.b }, after.secrets)
    local _, after2 = sb:call("f", {})
    assert.equals(32, #after2.secrets.a)
  end)

  it("gives scripts the whitelisted libraries, read-only but iterable", function()
    local sb = loaded([[return { f = function()
      local names = {}
      for k in pairs(string) do names[#names + 1] = k end
      table.sort(names)
      local co = coroutine.wrap(function(a) local b = coroutine.yield(a + 1) ; return b * 2 end)
      local c = coroutine.create(function() return "done" end)
      return {
        string = table.concat(names, ","),
        fmt = string.format("%05.1f|%s", 3.14159, ("x"):upper()),
        utf8 = utf8.len("héllo"), math = math.max(1, 5), int = math.type(3),
        co = { co(1), co(10) }, created = { coroutine.resume(c) },
        load = load("return 1 + ...")(41),
        xp = { xpcall(function() error("e", 0) end, function(m) return "handled " .. m end) },
        pc = { pcall(error, "p", 0) },
        gmatch = (function() local t = {} for w in ("a b c"):gmatch("%a") do t[#t + 1] = w end return t end)(),
        mem = type(collectgarbage("count")),
        G = _G == _ENV,
      }
    end }]])
    local r = assert(sb:call("f"))
    assert.equals("byte,char,find,format,gmatch,gsub,len,lower,match,pack,packsize,rep,reverse,sub,unpack,upper",
      r.string)
    assert.equals("003.1|X", r.fmt)
    assert.equals(5, r.utf8)
    assert.same({ 2, 20 }, r.co)
    assert.same({ true, "done" }, r.created)
    assert.equals(42, r.load)
    assert.same({ false, "handled e" }, r.xp)
    assert.same({ false, "p" }, r.pc)
    assert.same({ "a", "b", "c" }, r.gmatch)
    assert.equals("number", r.mem)
    assert.is_true(r.G)
  end)

  it("does not give scripts the excluded names", function()
    local sb = loaded([[return { f = function(ctx) local out = {} ; for _, n in ipairs(ctx) do
        local ok, v = pcall(load("return " .. n))
        out[n] = ok and v ~= nil
      end ; return out end }]])
    local names = { "io", "os", "package", "require", "debug", "dofile", "loadfile", "print", "rawset", "rawget",
      "warn", "string.dump", "math.randomseed", "collectgarbage('collect')" }
    local r = assert(sb:call("f", names))
    for _, n in ipairs(names) do assert.is_false(r[n], n) end
  end)

  it("forge.json encodes and decodes plain data", function()
    local sb = loaded([[return {
      enc = function(v) return forge.json.encode(v) end,
      dec = function(s) local v, err = forge.json.decode(s) ; return { v = v, err = err and err.message } end,
      rt = function() return forge.json.decode(forge.json.encode({ a = { 1, 2.5, "x\n\"y\"" }, b = forge.json.null })) end,
    }]])
    assert.equals('[1,2,3]', sb:call("enc", { 1, 2, 3 }))
    assert.equals('{"a":"\\u0001\\t"}', sb:call("enc", { a = "\1\t" }))
    assert.equals("{}", sb:call("enc", {}))
    assert.equals("0.1", sb:call("enc", 0.1))
    local d = sb:call("dec", '{"a":[1,-2,3.5e1,true,false,null],"b":"\\u00e9\\ud83d\\ude00"}')
    assert.same({ 1, -2, 35.0, true, false, require("cjson").null }, d.v.a)
    assert.equals("integer", math.type(d.v.a[1]))
    assert.equals("é😀", d.v.b)
    assert.same({ a = { 1, 2.5, "x\n\"y\"" }, b = require("cjson").null }, sb:call("rt"))
    for _, bad in ipairs({ "", "{", "[1,]", '{"a" 1}', "nul", '"\1"', "1 2", '"\\ud800"' }) do
      local r = sb:call("dec", bad)
      assert.is_nil(r.v, bad)
      assert.matches("^json.decode: .+ at offset %d+$", r.err)
    end
    local sb2 = loaded("return { f = function() return forge.json.encode({ x = 0/0 }) end }")
    local r, e = sb2:call("f")
    assert.is_nil(r)
    assert.matches("json.encode: cannot encode NaN", e.message)
  end)

  it("forge.yaml, forge.crypto and forge.log work inside", function()
    local sb = loaded([[return { f = function()
      local doc = assert(forge.yaml.decode("a: 1\nb: [x, z]\n"))
      local merged = assert(forge.yaml.merge({ "a: 1\nb: {c: 2}\n", "b: {d: 3}\n" }))
      forge.log.info("hello", { plan = "p" })
      return {
        doc = doc, merged = merged, yaml = forge.yaml.encode({ k = "v" }),
        uuid = forge.crypto.uuid(), sha = forge.crypto.sha256_hex("abc"),
        b64 = forge.crypto.base64_decode(forge.crypto.base64_encode("hi")),
        has_random_bytes = rawequal(forge.crypto.random_bytes, nil),
      }
    end }]])
    local r = assert(sb:call("f"))
    assert.same({ a = 1, b = { "x", "z" } }, r.doc)
    assert.same({ a = 1, b = { c = 2, d = 3 } }, r.merged)
    assert.equals("k: v\n", r.yaml)
    assert.matches("^%x+%-%x+%-4%x+%-%x+%-%x+$", r.uuid)
    assert.equals("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad", r.sha)
    assert.equals("hi", r.b64)
    assert.is_true(r.has_random_bytes)
  end)

  it("forge.crypto's hmac, pbkdf2 and scram_sha256 work inside, and give what the module gives", function()
    local crypto = require "forge.crypto"
    local sb = loaded([[return { f = function()
      return {
        hmac = forge.crypto.hmac("sha512", "key", "msg"),
        pbkdf2 = forge.crypto.pbkdf2("pw", "salt", 1000, 48, "sha384"),
        scram = forge.crypto.scram_sha256("pw", "0123456789abcdef"),
        random_scram = forge.crypto.scram_sha256("pw"),
        has_equal = rawequal(forge.crypto.equal, nil),
        bad_alg = select(2, pcall(forge.crypto.hmac, "md5", "k", "m")),
      }
    end }]])
    local r = assert(sb:call("f"))
    assert.equals(crypto.hmac("sha512", "key", "msg"), r.hmac)
    assert.equals(crypto.pbkdf2("pw", "salt", 1000, 48, "sha384"), r.pbkdf2)
    assert.equals(crypto.scram_sha256("pw", "0123456789abcdef"), r.scram)
    assert.matches("^SCRAM%-SHA%-256%$4096:[%w+/]+=*%$[%w+/]+=*:[%w+/]+=*$", r.random_scram)
    assert.is_true(r.has_equal)
    assert.matches("bad argument #1 to 'forge.crypto.hmac' %(expected sha1, sha256, sha384 or sha512, got 'md5'%)", r.bad_alg)
  end)

  it("bounds the work of key derivation, which runs where the CPU limit cannot stop it", function()
    local sb = loaded([[return {
      big = function() return forge.crypto.pbkdf2("p", "s", 10000000, 32) end,
      wide = function() return forge.crypto.pbkdf2("p", "s", 50000, 1024, "sha1") end,
      scram = function() return forge.crypto.scram_sha256("p", "salt", 200000) end,
      ok = function() return #forge.crypto.pbkdf2("p", "s", 1000, 1024, "sha1") end,
    }]])
    local t0 = os.clock()
    for _, f in ipairs({ "big", "wide", "scram" }) do
      local res, err = sb:call(f)
      assert.is_nil(res)
      assert.matches("more work than a sandboxed call may do", err.message)
    end
    assert.is_true(os.clock() - t0 < 1)
    assert.equals(1024, (sb:call("ok")))
  end)

  it("forge.conf.render works inside, read-only", function()
    local sb = loaded([[return { f = function(ctx)
      local names = {}
      for k in pairs(forge.conf) do names[#names + 1] = k end
      return {
        redis = forge.conf.render("redis", { port = ctx.port, replicaof = { "127.0.0.1", 30000 },
          ["maxmemory-policy"] = ctx.policy }, { header = "by " .. forge.service_name }),
        pg = forge.conf.render("postgresql", { port = 5432, listen_addresses = "it's", ssl = true }),
        names = table.concat(names, ","),
        assign = select(2, pcall(function() forge.conf.render = nil end)),
      }
    end }]])
    local r = assert(sb:call("f", { port = 6379, policy = "allkeys-lru" }))
    assert.equals("# by t\nmaxmemory-policy allkeys-lru\nport 6379\nreplicaof 127.0.0.1 30000\n", r.redis)
    assert.equals("listen_addresses = 'it''s'\nport = 5432\nssl = on\n", r.pg)
    assert.equals("render", r.names)
    assert.is_string(r.assign)
  end)

  it("a render with a newline in a value fails that call with the script's file:line", function()
    local sb = loaded("local s = {}\nfunction s.deploy(ctx)\n  return forge.conf.render('redis', "
      .. "{ ['maxmemory-policy'] = ctx.parameters.policy })\nend\nreturn s")
    local res, err = sb:call("deploy", { parameters = { policy = "noeviction\nenable-debug-command yes" } })
    assert.is_nil(res)
    assert.equals("sandbox.error", err.code)
    assert.equals("services/t/service.lua:3: forge.conf.render: value of 'maxmemory-policy' contains a control "
      .. "character (newline)", err.message)
    assert.equals("noeviction\n", sb:call("deploy", { parameters = { policy = "noeviction" } }):match(" (.*)$"))
  end)

  it("forge.log adds the service name to every line", function()
    -- in a child process, to capture its stderr
    local path = os.tmpname()
    local cmd = string.format(
      [[lua5.4 -e 'package.cpath="build/lib/?.so;"..package.cpath
        local sb = require("forge.sandbox").new{name="svcname"}
        assert(sb:load("return { f = function() forge.log.error(\"x\", { a = 1 }) end }"))
        sb:call("f")' 2> %s]], path)
    assert(os.execute(cmd))
    local line = read(path)
    os.remove(path)
    local j = require("cjson").decode(line)
    assert.same({ "x", 1, "svcname", "error" }, { j.msg, j.a, j.service, j.level })
  end)

  it("a sandbox works from several sandboxes at once, isolated from each other", function()
    local a = loaded("local n = 0 ; return { inc = function() n = n + 1 ; return n end }")
    local b = loaded("local n = 100 ; return { inc = function() n = n + 1 ; return n end }")
    assert.equals(1, a:call("inc"))
    assert.equals(101, b:call("inc"))
    assert.equals(2, a:call("inc"))
  end)

  describe("services/redis/service.lua runs unchanged", function()
    local src = read(REDIS)
    local sb, direct

    local function ctx(secrets)
      return { instance_id = "i1", binding_id = "b1", plan = { nodes = 3, name = "3-servers" }, host = "127.0.0.1",
        ports = { 1, 2, 3 }, dir = "/tmp/x", secrets = secrets or {}, parameters = {},
        templates = { ["local.yml"] = read("services/redis/templates/local.yml") } }
    end

    -- the broker's way: forge.services builds the service in its own sandbox and calls hooks
    -- with ctx.secrets (ctx.secret generates into it, new secrets come back)
    local function direct_call(hook, c)
      return assert(services.call(direct, hook, c))
    end

    setup(function()
      sb = sandbox.new{ name = "redis" }
      assert(sb:load(src, "@" .. REDIS))
      direct = assert(services.build(assert(services.read_folder("services", "redis"))))
    end)

    it("exposes the same catalog data", function()
      local svc = sb:field()
      for _, k in ipairs({ "id", "name", "description", "bindable", "tags", "metadata", "plans" }) do
        assert.is_true(util.deep_equal(direct.script[k], svc[k]), k)
      end
      assert.is_true(svc.deploy)
      assert.is_true(svc.bind)
      assert.is_true(svc.unbind)
    end)

    it("deploy returns what the plain env returns", function()
      local res, after = sb:call("deploy", ctx())
      assert.equals(32, #after.secrets.admin_password)
      local want = direct_call("deploy", ctx({ admin_password = after.secrets.admin_password }))
      assert.same(want, res)
      assert.equals(3, #res.processes)
    end)

    it("bind and unbind return the same shapes", function()
      local secrets = { admin_password = "pw" }
      local res, after = sb:call("bind", ctx(secrets))
      same_shape(direct_call("bind", ctx(secrets)), res)
      assert.equals("pw", after.secrets.admin_password)
      assert.matches("^redis://b%-%x+:%w+@127.0.0.1:1$", res.credentials.uri)
      local ures = sb:call("unbind", ctx(secrets))
      assert.same(direct_call("unbind", ctx(secrets)), ures)
    end)

    it("ports(plan) works with a non-ctx argument", function()
      assert.equals(3, sb:call("ports", { nodes = 3 }))
    end)
  end)
end)
