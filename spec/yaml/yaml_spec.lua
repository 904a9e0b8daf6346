-- forge.yaml: decode/encode unit tests, the case vectors under spec/yaml/cases/,
-- and a bounded fuzz run.
local yaml = require "forge.yaml"

-- Structural equality: kinds ({} vs []) count, integers exactly, floats within 1e-6.
local function same(a, b, path)
  path = path or "$"
  if a == yaml.null then a = nil end
  if b == yaml.null then b = nil end
  if a == nil or b == nil then
    if a == nil and b == nil then return true end
    return false, path .. ": " .. tostring(a) .. " vs " .. tostring(b)
  end
  if type(a) == "number" and type(b) == "number" then
    if math.type(a) == "integer" and math.type(b) == "integer" then
      return a == b, path .. ": " .. a .. " vs " .. b
    end
    if a == b or math.abs(a - b) <= 1e-6 * math.max(math.abs(a), math.abs(b)) then return true end
    return false, path .. ": " .. a .. " vs " .. b
  end
  if type(a) ~= type(b) then return false, path .. ": " .. type(a) .. " vs " .. type(b) end
  if type(a) ~= "table" then return a == b, path .. ": " .. tostring(a) .. " vs " .. tostring(b) end
  if yaml.kind(a) ~= yaml.kind(b) then return false, path .. ": " .. yaml.kind(a) .. " vs " .. yaml.kind(b) end
  for k, v in pairs(a) do
    local ok, why = same(v, b[k], path .. "." .. tostring(k))
    if not ok then return false, why end
  end
  for k in pairs(b) do
    if a[k] == nil then return false, path .. "." .. tostring(k) .. ": missing" end
  end
  return true
end

describe("yaml.decode", function()
  it("types scalars the YAML 1.1 way (as spruce and BOSH read them)", function()
    local t = assert(yaml.decode([[
int: 42
neg: -7
oct: 0755
hex: 0x1F
under: 1_000
float: 1.5
exp: 1e3
dot: .5
nine: 09
yes1: yes
no1: no
on1: on
off1: Off
yy: y
n: n
t: TRUE
nul: ~
empty:
str: "42"
sq: 'yes'
inf: .inf
ninf: -.inf
word: hello
ver: 1.2.3
]]))
    assert.are.equal(42, t.int); assert.are.equal("integer", math.type(t.int))
    assert.are.equal(-7, t.neg)
    assert.are.equal(493, t.oct)
    assert.are.equal(31, t.hex)
    assert.are.equal(1000, t.under)
    assert.are.equal(1.5, t.float)
    assert.are.equal("float", math.type(t.exp)); assert.are.equal(1000, t.exp)
    assert.are.equal(0.5, t.dot)
    assert.are.equal("float", math.type(t.nine)); assert.are.equal(9, t.nine)
    assert.is_true(t.yes1); assert.is_false(t.no1); assert.is_true(t.on1); assert.is_false(t.off1)
    assert.is_true(t.yy); assert.is_true(t.t)
    assert.is_false(t[false] == nil)   -- `n:` is the key false
    assert.are.equal(yaml.null, t.nul); assert.are.equal(yaml.null, t.empty)
    assert.are.equal("42", t.str); assert.are.equal("yes", t.sq)
    assert.are.equal(math.huge, t.inf); assert.are.equal(-math.huge, t.ninf)
    assert.are.equal("hello", t.word); assert.are.equal("1.2.3", t.ver)
  end)

  it("types keys too", function()
    local t = assert(yaml.decode("1: a\ntrue: b\n'1': c\nno: d\n"))
    assert.are.equal("a", t[1]); assert.are.equal("b", t[true])
    assert.are.equal("c", t["1"]); assert.are.equal("d", t[false])
  end)

  it("expands anchors into independent copies and applies << merge keys", function()
    local t = assert(yaml.decode([[
base: &base {color: red, size: 1}
a: *base
b: {color: green, <<: *base}
c: {<<: *base, color: green}
d:
  <<: [{x: 1, w: 1}, {x: 2, z: 2}]
]]))
    assert.are.equal("red", t.a.color)
    t.a.color = "blue"
    assert.are.equal("red", t.base.color)
    assert.are.equal("red", t.b.color)      -- the merge applies where it appears
    assert.are.equal("green", t.c.color)
    assert.are.same({ x = 1, w = 1, z = 2 }, t.d)
  end)

  it("caps alias expansion (billion laughs)", function()
    local doc, prev = "l0: &l0 [x,x,x,x,x,x,x,x,x,x]\n", "l0"
    for i = 1, 9 do
      doc = doc .. ("l%d: &l%d [%s*%s]\n"):format(i, i, ("*" .. prev .. ","):rep(9), prev)
      prev = "l" .. i
    end
    local v, err = yaml.decode(doc, "laughs.yml")
    assert.is_nil(v)
    assert.are.equal("yaml.alias", err.code)
    assert.are.equal("laughs.yml", err.file)
    assert.matches("billion laughs", err.message)
  end)

  it("limits nesting depth", function()
    local v, err = yaml.decode(("["):rep(5000) .. ("]"):rep(5000))
    assert.is_nil(v)
    assert.are.equal("yaml.depth", err.code)
  end)

  it("reports parse errors with file, line and path", function()
    local v, err = yaml.decode("a: 1\nb:\n  c: [1, 2\n", "conf/x.yml")
    assert.is_nil(v)
    assert.are.equal("yaml.parse", err.code)
    assert.are.equal("conf/x.yml", err.file)
    assert.is_number(err.line)
    assert.matches("^conf/x.yml:%d+: ", err.message)
    assert.are.equal("forge.error", getmetatable(err).__name or "forge.error")
    assert.matches("yaml.parse", tostring(err))
  end)

  it("refuses a second document", function()
    local v, err = yaml.decode("a: 1\n---\nb: 2\n")
    assert.is_nil(v)
    assert.are.equal("yaml.multidoc", err.code)
    assert.are.equal(2, err.line)   -- the second `---`
  end)

  it("reads an empty document as null and keeps {} and [] apart", function()
    assert.are.equal(yaml.null, yaml.decode(""))
    local t = yaml.decode("a: {}\nb: []\n")
    assert.are.equal("map", yaml.kind(t.a))
    assert.are.equal("seq", yaml.kind(t.b))
  end)

  it("raises on misuse", function()
    assert.has_error(function() yaml.decode() end)
    assert.has_error(function() yaml.decode({}) end)
  end)
end)

describe("yaml.encode", function()
  it("round-trips decoded documents with their key order", function()
    local text = "zeta: 1\nalpha:\n  b: 2\n  a: 1\nlist:\n- x\n- 2\n- true\nempty_map: {}\nempty_list: []\n"
    local t = assert(yaml.decode(text))
    assert.are.equal(text, yaml.encode(t))
  end)

  it("sorts plain tables and quotes strings that look like other types", function()
    local out = yaml.encode({ b = "1", a = "yes", c = "null", d = "", e = "0x1F", f = "~", g = "plain", h = "1.5" })
    assert.are.equal('a: "yes"\nb: "1"\nc: "null"\nd: ""\ne: "0x1F"\nf: "~"\ng: plain\nh: "1.5"\n', out)
    local back = yaml.decode(out)
    assert.are.equal("yes", back.a); assert.are.equal("1", back.b); assert.are.equal("", back.d)
  end)

  it("writes multi-line strings as literal blocks", function()
    local out = yaml.encode({ cert = "-- BEGIN --\nabc\n-- END --\n" })
    assert.are.equal("cert: |\n  -- BEGIN --\n  abc\n  -- END --\n", out)
    assert.are.equal("-- BEGIN --\nabc\n-- END --\n", yaml.decode(out).cert)
  end)

  it("keeps numbers typed across a round trip", function()
    local t = yaml.decode(yaml.encode({ i = 3, f = 3.0, big = 1e300, s = "3" }))
    assert.are.equal("integer", math.type(t.i))
    assert.are.equal("float", math.type(t.f))
    assert.are.equal(1e300, t.big)
    assert.are.equal("3", t.s)
  end)

  it("uses yaml.seq / yaml.map to choose the kind of an empty table", function()
    assert.are.equal("a: []\nb: {}\nc: {}\n", yaml.encode({ a = yaml.seq {}, b = yaml.map {}, c = {} }))
    assert.are.equal("seq", yaml.kind(yaml.seq()))
    assert.are.equal("map", yaml.kind({}))
    assert.are.equal("seq", yaml.kind({ 1, 2 }))
    assert.are.equal("map", yaml.kind({ 1, x = 2 }))
    assert.is_nil(yaml.kind(5))
  end)

  it("returns nil, err for values YAML cannot hold", function()
    local v, err = yaml.encode({ a = { f = print } })
    assert.is_nil(v)
    assert.are.equal("yaml.encode", err.code)
    assert.are.equal("a.f", err.path)
    local cyc = {}
    cyc.self = cyc
    v, err = yaml.encode(cyc)
    assert.is_nil(v)
    assert.are.equal("yaml.depth", err.code)
  end)
end)

describe("yaml.merge case vectors (spec/yaml/cases)", function()
  local dir = "spec/yaml/cases"
  local names = {}
  local p = assert(io.popen("ls -1 " .. dir))
  for line in p:lines() do
    if line:match("%.case$") then names[#names + 1] = line end
  end
  p:close()
  table.sort(names)

  it("has at least 80 cases", function()
    assert.is_true(#names >= 80, #names .. " cases")
  end)

  local function parse_case(text)
    local sections, cur = {}, nil
    for line in (text .. "\n"):gmatch("(.-)\n") do
      local sec = line:match("^#> (%S+)$")
      if sec then
        cur = sec
        sections[cur] = {}
      elseif cur then
        table.insert(sections[cur], line)
      end
    end
    for k, v in pairs(sections) do sections[k] = table.concat(v, "\n") .. "\n" end
    return sections
  end

  for _, name in ipairs(names) do
    it(name, function()
      local f = assert(io.open(dir .. "/" .. name, "rb"))
      local c = parse_case(f:read("a"))
      f:close()
      local docs = {}
      local i = 1
      while c[tostring(i)] do
        docs[i] = c[tostring(i)]
        i = i + 1
      end
      local opts = c.opts and assert(yaml.decode(c.opts)) or nil
      local v, err = yaml.merge(docs, opts)
      if c.error then
        assert.is_nil(v, "expected an error, got a document")
        assert.is_table(err)
        local text = (err.message .. "\n" .. err.spruce):lower()
        for want in c.error:gmatch("[^\n]+") do
          assert.is_truthy(text:find(want:lower(), 1, true), "error lacks '" .. want .. "': " .. err.message)
        end
      else
        assert.is_not_nil(v, err and err.message)
        local ok, why = same(v, assert(yaml.decode(c.expected)))
        assert.is_true(ok, why)
      end
    end)
  end
end)

describe("yaml.merge API", function()
  it("accepts Lua tables as documents and keeps {} / []", function()
    local v = assert(yaml.merge({ { a = { b = 1 }, l = yaml.seq {} }, "a: {c: (( grab a.b ))}\n" }))
    assert.are.equal(1, v.a.c)
    assert.are.equal("seq", yaml.kind(v.l))
    assert.are.equal("a:\n  b: 1\n  c: 1\nl: []\n", yaml.encode(v))
  end)

  it("points errors at file:line with the operator text", function()
    local v, err = yaml.merge({
      "meta: {}\njobs:\n- name: redis\n  networks: (( grab meta.net ))\n",
    }, { names = { "templates/redis.yml" } })
    assert.is_nil(v)
    assert.are.equal("yaml.eval", err.code)
    assert.are.equal("templates/redis.yml", err.file)
    assert.are.equal(4, err.line)
    assert.are.equal("jobs.0.networks", err.path)
    assert.matches("^templates/redis.yml:4: jobs.0.networks: %(%( grab meta.net %)%) \u{2014} unable to resolve",
      err.message)
    assert.matches("$.jobs.0.networks: unable to resolve `meta.net`", err.spruce, 1, true)
    assert.are.equal("forge.error", getmetatable(err).__name)
  end)

  it("collects every error and lists them", function()
    local _, err = yaml.merge({ "a: (( grab x ))\nb: (( grab y ))\n" })
    assert.are.equal(2, #err.errors)
    assert.matches("2 errors detected", err.message)
  end)

  it("raises on misuse", function()
    assert.has_error(function() yaml.merge("a: 1") end)
    assert.has_error(function() yaml.merge({ 5 }) end)
    assert.has_error(function() yaml.merge({}, { bogus = true }) end)
    assert.has_error(function() yaml.merge({}, { prune = "x" }) end)
  end)

  it("merges nothing into an empty map", function()
    assert.are.equal("map", yaml.kind(assert(yaml.merge({}))))
  end)
end)

describe("fuzz (seeded, bounded)", function()
  local seeds = {
    "a: &a [x, *a]\n", "a: *undefined\n", "? [complex]\n: key\n", "a: !!binary aGVsbG8=\n",
    "%YAML 1.1\n---\na: 1\n", "\239\187\191a: bom\n", "a: \"\\x41\\u263A\"\n", "a:\tb\n",
    "- - - - - [[[[{}]]]]\n", "<<: {a: 1}\nb: 2\n", "a: {<<: [*x]}\n", "a: 1\n---\nb: 2\n...\n",
    "a: |+\n  keep\n\n", "a: >-\n  folded\n  text\n", "'\\xff': 1\n", "a: \255\254\n", "\0a: 1\n",
    "a: [1, 2\n", "{a: 1, a: 2}\n", "~: null key\n", ".nan: x\n", "a: &x 1\nb: &x 2\nc: *x\n",
    "l: [\"(( append ))\", \"(( merge on id ))\", \"(( delete 9 ))\", \"(( insert after x ))\"]\n",
    "a: (( grab a ))\nb: (( calc \"1 +\" ))\nc: (( ips \"x\" 1 ))\nd: (( concat a || ))\n",
    "j: [{name: n, instances: 99, networks: [{name: n, static_ips: (( static_ips 0 ))}]}]\n",
    "x: (( inject x ))\ny: {<<<: (( inject y ))}\n", "k: (( keys ))\ns: (( sort by ))\n",
  }
  local ops = { "(( grab a ))", "(( merge ))", "(( append ))", "(( prune ))", "(( sort ))",
    "(( inject b ))", "(( calc \"a.b * 2\" ))", "(( param \"p\" ))", "&x ", "*x", "<<: ", "\n- ", ": ", "[", "{" }

  local function mutate(s)
    local n = math.random(1, 4)
    for _ = 1, n do
      local pos = math.random(0, #s)
      local r = math.random(1, 5)
      if r == 1 then
        s = s:sub(1, pos) .. string.char(math.random(0, 255)) .. s:sub(pos + 1)
      elseif r == 2 then
        s = s:sub(1, pos) .. s:sub(pos + 2)
      elseif r == 3 then
        s = s:sub(1, pos) .. ops[math.random(#ops)] .. s:sub(pos + 1)
      elseif r == 4 then
        local a = math.random(1, math.max(1, #s))
        s = s:sub(1, pos) .. s:sub(a, a + math.random(0, 20)) .. s:sub(pos + 1)
      else
        s = s:sub(1, pos) .. "\n" .. string.rep(" ", math.random(0, 6)) .. s:sub(pos + 1)
      end
    end
    return s
  end

  it("never crashes: decode, merge and encode give a value or nil, err", function()
    math.randomseed(20260806)
    local corpus = {}
    for _, s in ipairs(seeds) do corpus[#corpus + 1] = s end
    local p = assert(io.popen("ls -1 spec/yaml/cases"))
    for line in p:lines() do
      local f = io.open("spec/yaml/cases/" .. line, "rb")
      if f then
        for doc in f:read("a"):gmatch("#> %d+\n(.-)\n#>") do corpus[#corpus + 1] = doc end
        f:close()
      end
    end
    p:close()
    local started = os.clock()
    local iterations = 0
    for _ = 1, 4000 do
      local text = mutate(corpus[math.random(#corpus)])
      local ok, v, err = pcall(yaml.decode, text, "fuzz.yml")
      assert.is_true(ok, "decode raised: " .. tostring(v))
      assert.is_true(v ~= nil or (type(err) == "table" and type(err.message) == "string"))
      if v ~= nil then
        local ok2, out, err2 = pcall(yaml.encode, v)
        assert.is_true(ok2, "encode raised: " .. tostring(out))
        assert.is_true(out ~= nil or type(err2) == "table")
      end
      local other = mutate(corpus[math.random(#corpus)])
      local ok3, m, err3 = pcall(yaml.merge, { text, other }, { prune = { "a" } })
      assert.is_true(ok3, "merge raised: " .. tostring(m))
      assert.is_true(m ~= nil or (type(err3) == "table" and type(err3.message) == "string"))
      iterations = iterations + 1
      if os.clock() - started > 15 then break end
    end
    assert.is_true(iterations >= 1000, iterations .. " iterations")
  end)
end)
