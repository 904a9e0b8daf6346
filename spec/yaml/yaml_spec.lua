-- forge.yaml: decode/encode unit tests, the case vectors under spec/yaml/cases/,
-- and a bounded fuzz run.
local yaml = require "forge.yaml"

local function kinded(v)
  -- a plain structural view: {kind=..., ...} so {} and [] differ in comparisons
  if type(v) ~= "table" then
    if v == yaml.null then return "<null>" end
    return v
  end
  local out = { ["<kind>"] = yaml.kind(v) }
  for k, x in pairs(v) do out[k] = kinded(x) end
  return out
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
