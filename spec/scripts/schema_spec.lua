-- forge.schema: JSON Schema (drafts 04/06/07) for plan parameters, table-driven.
local schema = require "forge.schema"
local cjson = require "cjson"
local util = require "forge.util"

local function J(text) return cjson.decode(text) end

-- { schema JSON, value JSON, true | "expected message" }; validated with the default root name.
local KEYWORDS = {
  -- type
  { '{"type":"string"}', '"x"', true },
  { '{"type":"string"}', '1', "parameters: must be a string" },
  { '{"type":"integer"}', '3', true },
  { '{"type":"integer"}', '3.0', true },
  { '{"type":"integer"}', '3.5', "parameters: must be an integer" },
  { '{"type":"number"}', '3.5', true },
  { '{"type":"number"}', '"3"', "parameters: must be a number" },
  { '{"type":"boolean"}', 'false', true },
  { '{"type":"boolean"}', '0', "parameters: must be a boolean" },
  { '{"type":"null"}', 'null', true },
  { '{"type":"null"}', '{}', "parameters: must be null" },
  { '{"type":"object"}', '{"a":1}', true },
  { '{"type":"object"}', '{}', true },
  { '{"type":"object"}', '[1]', "parameters: must be an object" },
  { '{"type":"array"}', '[1]', true },
  { '{"type":"array"}', '[]', true },
  { '{"type":"array"}', '{"a":1}', "parameters: must be an array" },
  { '{"type":["string","null"]}', 'null', true },
  { '{"type":["string","null"]}', '7', "parameters: must be a string or null" },
  -- enum / const
  { '{"enum":["small","large",null,[1,2],{"a":1}]}', '"large"', true },
  { '{"enum":["small","large",null,[1,2],{"a":1}]}', 'null', true },
  { '{"enum":["small","large",null,[1,2],{"a":1}]}', '[1,2]', true },
  { '{"enum":["small","large",null,[1,2],{"a":1}]}', '{"a":1.0}', true },
  { '{"enum":["small","large"]}', '"medium"', 'parameters: must be one of "small", "large"' },
  { '{"enum":[[1,2]]}', '[2,1]', "parameters: must be one of [1,2]" },
  { '{"const":{"b":[1,null],"a":"x"}}', '{"a":"x","b":[1,null]}', true },
  { '{"const":{"b":[1,null],"a":"x"}}', '{"a":"x","b":[1]}', 'parameters: must be equal to {"a":"x","b":[1,null]}' },
  { '{"const":null}', 'false', "parameters: must be equal to null" },
  -- numbers
  { '{"minimum":1}', '1', true },
  { '{"minimum":1}', '0.5', "parameters: must be at least 1" },
  { '{"maximum":1024}', '1024', true },
  { '{"maximum":1024}', '1025', "parameters: must be at most 1024" },
  { '{"exclusiveMinimum":0}', '0.1', true },
  { '{"exclusiveMinimum":0}', '0', "parameters: must be greater than 0" },
  { '{"exclusiveMaximum":10}', '9.99', true },
  { '{"exclusiveMaximum":10}', '10', "parameters: must be less than 10" },
  { '{"multipleOf":256}', '1024', true },
  { '{"multipleOf":256}', '1000', "parameters: must be a multiple of 256" },
  { '{"multipleOf":0.1}', '0.3', true },
  { '{"multipleOf":0.1}', '0.35', "parameters: must be a multiple of 0.1" },
  { '{"maximum":10}', '"99"', true }, -- numeric keywords ignore other types
  -- strings
  { '{"minLength":2}', '"ab"', true },
  { '{"minLength":2}', '"a"', "parameters: must be at least 2 characters long" },
  { '{"maxLength":3}', '"h\\u00e9\\u00e9"', true }, -- code points, not bytes
  { '{"maxLength":3}', '"h\\u00e9\\u00e9s"', "parameters: must be at most 3 characters long" },
  { '{"maxLength":1}', '"ab"', "parameters: must be at most 1 character long" },
  { '{"pattern":"^[a-z]+$"}', '"abc"', true },
  { '{"pattern":"^[a-z]+$"}', '"aBc"', "parameters: must match pattern '^[a-z]+$'" },
  { '{"pattern":"b"}', '"abc"', true }, -- unanchored search
  { '{"pattern":"(?<=a)b"}', '"ab"', "parameters: unsupported pattern '(?<=a)b': lookbehind is not supported" },
  { '{"pattern":"x"}', '5', true },
  -- formats
  { '{"format":"email"}', '"ops@example.com"', true },
  { '{"format":"email"}', '"first.last+tag@mail.example.org"', true },
  { '{"format":"email"}', '"ops@@example.com"', "parameters: must be a valid email address" },
  { '{"format":"email"}', '"ops example.com"', "parameters: must be a valid email address" },
  { '{"format":"ipv4"}', '"10.0.255.1"', true },
  { '{"format":"ipv4"}', '"10.0.256.1"', "parameters: must be a valid IPv4 address" },
  { '{"format":"ipv4"}', '"10.0.01.1"', "parameters: must be a valid IPv4 address" },
  { '{"format":"uri"}', '"https://example.com/a?b=c#d"', true },
  { '{"format":"uri"}', '"urn:isbn:0451450523"', true },
  { '{"format":"uri"}', '"/relative/path"', "parameters: must be a valid URI" },
  { '{"format":"uri"}', '"http://exa mple.com"', "parameters: must be a valid URI" },
  { '{"format":"date-time"}', '"2024-02-29T23:59:59.123Z"', true },
  { '{"format":"date-time"}', '"2024-06-01T08:00:00+02:00"', true },
  { '{"format":"date-time"}', '"2023-02-29T10:00:00Z"', "parameters: must be a valid RFC 3339 date-time" },
  { '{"format":"date-time"}', '"2024-06-01 08:00:00"', "parameters: must be a valid RFC 3339 date-time" },
  { '{"format":"uuid"}', '"0b4a2b9e-3c1f-4c1a-9d7e-2f6f0a9b8c7d"', true },
  { '{"format":"uuid"}', '"0b4a2b9e3c1f4c1a9d7e2f6f0a9b8c7d"', "parameters: must be a valid UUID" },
  { '{"format":"hostname"}', '"not checked!"', true },
  -- arrays
  { '{"minItems":1}', '["a"]', true },
  { '{"minItems":1}', '[]', "parameters: must have at least 1 item" },
  { '{"maxItems":2}', '[1,2,3]', "parameters: must have at most 2 items" },
  { '{"uniqueItems":true}', '[1,"1",[1],{"a":1},{"a":2},null]', true },
  { '{"uniqueItems":true}', '[{"a":1,"b":[2]},3,{"b":[2],"a":1.0}]',
    "parameters: must not contain duplicates (items [0] and [2] are equal)" },
  { '{"uniqueItems":false}', '[1,1]', true },
  { '{"items":{"type":"string"}}', '["a","b"]', true },
  { '{"items":{"type":"string"}}', '["a","b",3]', "parameters[2]: must be a string" },
  { '{"items":[{"type":"string"},{"type":"integer"}]}', '["a",1,true]', true },
  { '{"items":[{"type":"string"},{"type":"integer"}]}', '["a","b"]', "parameters[1]: must be an integer" },
  { '{"items":[{"type":"string"}],"additionalItems":false}', '["a",1]',
    "parameters[1]: item is not allowed (at most 1 item)" },
  { '{"items":[{"type":"string"}],"additionalItems":{"type":"integer"}}', '["a",1,2]', true },
  { '{"items":[{"type":"string"}],"additionalItems":{"type":"integer"}}', '["a",1,"2"]',
    "parameters[2]: must be an integer" },
  { '{"contains":{"const":"admin"}}', '["user","admin"]', true },
  { '{"contains":{"const":"admin"}}', '["user"]', "parameters: must contain at least one matching item" },
  { '{"contains":{"const":"admin"}}', '[]', "parameters: must contain at least one matching item" },
  -- objects
  { '{"required":["size"]}', '{"size":1}', true },
  { '{"required":["size"]}', '{}', "parameters: missing required property 'size'" },
  { '{"required":["size"]}', '{"size":null}', true },
  { '{"properties":{"memory":{"type":"integer"}}}', '{"memory":512,"other":"x"}', true },
  { '{"properties":{"memory":{"type":"integer"}}}', '{"memory":"512"}', "parameters.memory: must be an integer" },
  { '{"properties":{"a":{"type":"string"}},"additionalProperties":false}', '{"a":"x"}', true },
  { '{"properties":{"a":{"type":"string"}},"additionalProperties":false}', '{"a":"x","b":1}',
    "parameters.b: property is not allowed" },
  { '{"additionalProperties":{"type":"integer"}}', '{"a":1,"b":"2"}', "parameters.b: must be an integer" },
  { '{"patternProperties":{"^x-":{"type":"string"}},"additionalProperties":false}', '{"x-team":"db"}', true },
  { '{"patternProperties":{"^x-":{"type":"string"}},"additionalProperties":false}', '{"x-team":1}',
    "parameters.x-team: must be a string" },
  { '{"patternProperties":{"^x-":{"type":"string"}},"additionalProperties":false}', '{"team":"db"}',
    "parameters.team: property is not allowed" },
  { '{"propertyNames":{"pattern":"^[a-z_]+$"}}', '{"max_conn":1}', true },
  { '{"propertyNames":{"pattern":"^[a-z_]+$"}}', '{"MaxConn":1}',
    "parameters: invalid property name 'MaxConn': must match pattern '^[a-z_]+$'" },
  { '{"propertyNames":{"maxLength":3}}', '{"abcd":1}',
    "parameters: invalid property name 'abcd': must be at most 3 characters long" },
  { '{"minProperties":1}', '{"a":1}', true },
  { '{"minProperties":1}', '{}', "parameters: must have at least 1 property" },
  { '{"maxProperties":1}', '{"a":1,"b":2}', "parameters: must have at most 1 property" },
  { '{"maxProperties":0}', '{"a":1}', "parameters: must have at most 0 properties" },
  { '{"dependencies":{"tls":["cert","key"]}}', '{"tls":true,"cert":"c","key":"k"}', true },
  { '{"dependencies":{"tls":["cert","key"]}}', '{"cert":"c"}', true },
  { '{"dependencies":{"tls":["cert","key"]}}', '{"tls":true,"cert":"c"}',
    "parameters: property 'tls' requires property 'key'" },
  { '{"dependencies":{"tls":{"required":["port"]}}}', '{"tls":true}', "parameters: missing required property 'port'" },
  { '{"dependentRequired":{"user":["password"]}}', '{"user":"u"}',
    "parameters: property 'user' requires property 'password'" },
  { '{"dependentRequired":{"user":["password"]}}', '{"user":"u","password":"p"}', true },
  -- combinators
  { '{"allOf":[{"type":"integer"},{"minimum":2}]}', '3', true },
  { '{"allOf":[{"type":"integer"},{"minimum":2}]}', '1', "parameters: must be at least 2" },
  { '{"anyOf":[{"type":"string"},{"type":"integer"}]}', '1', true },
  { '{"anyOf":[{"type":"string"},{"type":"integer"}]}', '1.5', "parameters: must match at least one schema in anyOf" },
  { '{"oneOf":[{"multipleOf":2},{"multipleOf":3}]}', '4', true },
  { '{"oneOf":[{"multipleOf":2},{"multipleOf":3}]}', '6',
    "parameters: must match exactly one schema in oneOf (matched [0] and [1])" },
  { '{"oneOf":[{"multipleOf":2},{"multipleOf":3}]}', '5',
    "parameters: must match exactly one schema in oneOf (matched none)" },
  { '{"not":{"const":"root"}}', '"admin"', true },
  { '{"not":{"const":"root"}}', '"root"', "parameters: must not match the schema in not" },
  { '{"if":{"properties":{"ha":{"const":true}}},"then":{"required":["replicas"]},"else":{"maxProperties":1}}',
    '{"ha":true,"replicas":3}', true },
  { '{"if":{"properties":{"ha":{"const":true}}},"then":{"required":["replicas"]},"else":{"maxProperties":1}}',
    '{"ha":true}', "parameters: missing required property 'replicas'" },
  { '{"if":{"properties":{"ha":{"const":true}}},"then":{"required":["replicas"]},"else":{"maxProperties":1}}',
    '{"ha":false,"x":1}', "parameters: must have at most 1 property" },
  -- boolean schemas, default, unknown keywords
  { 'true', '{"anything":[1]}', true },
  { 'false', '1', "parameters: is not allowed" },
  { '{"properties":{"a":false}}', '{"a":1}', "parameters.a: is not allowed" },
  { '{"default":5,"x-ui":"slider","type":"integer"}', '1', true },
}

describe("forge.schema.validate", function()
  for i, case in ipairs(KEYWORDS) do
    local s, value, want = case[1], case[2], case[3]
    it(("#%d %s with %s"):format(i, s, value), function()
      local ok, msg, path = schema.validate(J(s), J(value))
      if want == true then
        assert.is_true(ok, msg)
      else
        assert.is_nil(ok)
        assert.equal(want, msg)
        assert.equal(want:match("^(.-): "), path)
      end
    end)
  end

  it("works on util.json_decode values (integers) as well as raw cjson floats", function()
    local s = J '{"type":"object","properties":{"port":{"type":"integer","maximum":65535}}}'
    assert.is_true(schema.validate(s, util.json_decode '{"port":5432}'))
    assert.is_true(schema.validate(s, J '{"port":5432}'))
    local _, msg = schema.validate(s, util.json_decode '{"port":70000}')
    assert.equal("parameters.port: must be at most 65535", msg)
  end)

  it("util.json_decode refuses what JSON text may hold and a record may not, naming where", function()
    local bad = { ['{"a":[1,2,{"b":"\xff"}]}'] = "$.a[3].b: invalid UTF-8 in a string",
      ['{"a":{"x\xff":1}}'] = "$.a: invalid UTF-8 in a key", ["[1e999]"] = "$[1]: number out of range",
      ['"\xfe"'] = "$: invalid UTF-8 in a string" }
    for text, want in pairs(bad) do
      local v, err = util.json_decode(text)
      assert.is_nil(v, text)
      assert.equal(want, err)
    end
    local v = util.json_decode '{"port":30000,"f":1.5,"l":[1,{"n":-0.0}],"s":"é","z":null}'
    assert.equal("integer", math.type(v.port))
    assert.equal("integer", math.type(v.l[1]))
    assert.equal("integer", math.type(v.l[2].n))
    assert.equal("float", math.type(v.f))
    assert.equal("é", v.s)
    assert.equal(require("cjson").null, v.z)
  end)

  it("reports nested paths with 0-based indices and quoted odd keys", function()
    local s = J [[{"type":"object","properties":{
      "nodes":{"type":"array","items":{"type":"object","properties":{
        "disks":{"type":"array","items":{"type":"object","required":["size"],
          "properties":{"size":{"type":"integer","minimum":1}}}}}}},
      "labels":{"type":"object","additionalProperties":{"type":"string"}}}}]]
    local ok, msg, path = schema.validate(s, J '{"nodes":[{"disks":[]},{"disks":[{"size":1},{"size":0}]}]}')
    assert.is_nil(ok)
    assert.equal("parameters.nodes[1].disks[1].size: must be at least 1", msg)
    assert.equal("parameters.nodes[1].disks[1].size", path)
    ok, msg = schema.validate(s, J '{"nodes":[{"disks":[{}]}]}')
    assert.is_nil(ok)
    assert.equal("parameters.nodes[0].disks[0]: missing required property 'size'", msg)
    ok, msg, path = schema.validate(s, J '{"labels":{"team name":7}}')
    assert.is_nil(ok)
    assert.equal('parameters.labels["team name"]: must be a string', msg)
    assert.equal('parameters.labels["team name"]', path)
  end)

  it("uses the given root name", function()
    local ok, msg, path = schema.validate(J '{"type":"object"}', J '[1]', "bind.parameters")
    assert.is_nil(ok)
    assert.equal("bind.parameters: must be an object", msg)
    assert.equal("bind.parameters", path)
  end)

  it("reports the first error in sorted property order, whatever the table order", function()
    local s = J [[{"properties":{"zeta":{"type":"string"},"alpha":{"type":"string"},"mid":{"type":"string"}},
      "additionalProperties":false}]]
    for _ = 1, 20 do
      local _, msg = schema.validate(s, J '{"zeta":1,"mid":2,"alpha":3,"extra":4}')
      assert.equal("parameters.alpha: must be a string", msg)
    end
    local _, msg = schema.validate(s, J '{"zeta":1,"mid":2,"extra":4}')
    assert.equal("parameters.extra: property is not allowed", msg)
  end)

  it("checks required before the property values", function()
    local s = J '{"required":["size"],"properties":{"memory":{"maximum":1}}}'
    local _, msg = schema.validate(s, J '{"memory":5}')
    assert.equal("parameters: missing required property 'size'", msg)
  end)

  it("accepts an empty table as an empty object or an empty array", function()
    assert.is_true(schema.validate(J '{"type":"object","properties":{"a":{}}}', {}))
    assert.is_true(schema.validate(J '{"type":"array","items":{"type":"string"}}', {}))
    assert.is_true(schema.validate(J '{"type":["object","null"]}', J "[]"))
    assert.is_true(schema.validate(J '{"properties":{"m":{"type":"object"},"a":{"type":"array"}}}',
      J '{"m":[],"a":{}}'))
    local _, msg = schema.validate(J '{"type":"object","required":["a"]}', J "[]")
    assert.equal("parameters: missing required property 'a'", msg)
  end)

  it("treats cjson.null and an absent value as null", function()
    assert.is_true(schema.validate(J '{"type":"null"}', cjson.null))
    assert.is_true(schema.validate(J '{"type":"null"}', util.null))
    assert.is_true(schema.validate(J '{"type":"null"}', nil))
    local _, msg = schema.validate(J '{"type":"object"}', nil)
    assert.equal("parameters: must be an object", msg)
  end)

  it("reports an invalid schema instead of guessing", function()
    local ok, msg, path = schema.validate(J '{"type":"int"}', 1)
    assert.is_nil(ok)
    assert.equal("parameters: invalid schema: type: unknown type 'int'", msg)
    assert.equal("parameters", path)
  end)
end)

describe("forge.schema $ref", function()
  local tree = J [[{
    "$schema": "http://json-schema.org/draft-07/schema#",
    "definitions": {
      "node": {"type":"object","required":["name"],"properties":{
        "name":{"$ref":"#/definitions/name"},
        "children":{"type":"array","items":{"$ref":"#/definitions/node"}}}},
      "name": {"type":"string","pattern":"^[a-z]+$"},
      "a/b": {"type":"integer"},
      "t~x": {"type":"boolean"}
    },
    "$defs": {"size": {"enum":["s","m","l"]}},
    "type": "object",
    "properties": {
      "root": {"$ref":"#/definitions/node"},
      "slash": {"$ref":"#/definitions/a~1b"},
      "tilde": {"$ref":"#/definitions/t~0x"},
      "size": {"$ref":"#/$defs/size"},
      "again": {"$ref":"#/properties/size"},
      "self": {"$ref":"#"}
    }
  }]]

  it("is a valid schema", function()
    assert.is_true(schema.check(tree))
  end)

  local cases = {
    { '{"root":{"name":"a","children":[{"name":"b","children":[{"name":"c"}]}]}}', true },
    { '{"root":{"name":"a","children":[{"name":"b","children":[{"name":"C"}]}]}}',
      "parameters.root.children[0].children[0].name: must match pattern '^[a-z]+$'" },
    { '{"root":{"name":"a","children":[{}]}}', "parameters.root.children[0]: missing required property 'name'" },
    { '{"slash":1,"tilde":true,"size":"m","again":"l"}', true },
    { '{"slash":"1"}', "parameters.slash: must be an integer" },
    { '{"tilde":1}', "parameters.tilde: must be a boolean" },
    { '{"size":"xl"}', 'parameters.size: must be one of "s", "m", "l"' },
    { '{"again":"xl"}', 'parameters.again: must be one of "s", "m", "l"' },
    { '{"self":{"self":{"size":"s"}}}', true },
    { '{"self":{"self":{"size":"x"}}}', 'parameters.self.self.size: must be one of "s", "m", "l"' },
  }
  for i, case in ipairs(cases) do
    it("case " .. i, function()
      local ok, msg = schema.validate(tree, J(case[1]))
      if case[2] == true then
        assert.is_true(ok, msg)
      else
        assert.equal(case[2], msg)
      end
    end)
  end

  it("resolves refs into arrays by index", function()
    local s = J '{"allOf":[{"type":"string"},{"$ref":"#/allOf/0"}]}'
    assert.is_true(schema.validate(s, "x"))
    assert.is_nil(schema.validate(s, 1))
  end)

  it("ignores keywords next to $ref up to draft-07", function()
    local s = J('{"$schema":"http://json-schema.org/draft-07/schema#","definitions":{"n":{"type":"integer"}},' ..
      '"$ref":"#/definitions/n","maximum":5}')
    assert.is_true(schema.validate(s, 10))
  end)

  it("stops reference cycles with 'schema too deep'", function()
    for _, text in ipairs {
      '{"$ref":"#"}',
      '{"definitions":{"a":{"$ref":"#/definitions/b"},"b":{"$ref":"#/definitions/a"}},"$ref":"#/definitions/a"}',
      '{"anyOf":[{"$ref":"#"}]}',
      '{"not":{"$ref":"#"}}',
    } do
      local ok, msg, path = schema.validate(J(text), J '{"a":1}')
      assert.is_nil(ok, text)
      assert.equal("parameters: schema too deep", msg)
      assert.equal("parameters", path)
    end
  end)
end)

describe("forge.schema drafts", function()
  local d4 = '"$schema":"http://json-schema.org/draft-04/schema#"'
  local d7 = '"$schema":"http://json-schema.org/draft-07/schema#"'

  it("draft-04: exclusiveMaximum is a boolean modifier of maximum", function()
    local s = J('{' .. d4 .. ',"maximum":10,"exclusiveMaximum":true,"minimum":1,"exclusiveMinimum":true}')
    assert.is_true(schema.check(s))
    assert.is_true(schema.validate(s, 9.5))
    assert.equal("parameters: must be less than 10", select(2, schema.validate(s, 10)))
    assert.equal("parameters: must be greater than 1", select(2, schema.validate(s, 1)))
    local incl = J('{' .. d4 .. ',"maximum":10,"exclusiveMaximum":false}')
    assert.is_true(schema.validate(incl, 10))
  end)

  it("draft-07: exclusiveMaximum is a number of its own", function()
    local s = J('{' .. d7 .. ',"exclusiveMaximum":10}')
    assert.is_true(schema.check(s))
    assert.is_true(schema.validate(s, 9))
    assert.equal("parameters: must be less than 10", select(2, schema.validate(s, 10)))
  end)

  it("check rejects the other draft's exclusiveMaximum style", function()
    local ok, msg = schema.check(J('{' .. d7 .. ',"maximum":10,"exclusiveMaximum":true}'))
    assert.is_nil(ok)
    assert.equal("exclusiveMaximum: must be a number (a boolean here is draft-04 syntax)", msg)
    ok, msg = schema.check(J('{' .. d4 .. ',"properties":{"n":{"exclusiveMinimum":0}}}'))
    assert.is_nil(ok)
    assert.equal("properties.n.exclusiveMinimum: must be a boolean in draft-04", msg)
  end)

  it("boolean schemas need draft-06 or later", function()
    assert.is_true(schema.check(J('{' .. d7 .. ',"properties":{"a":true,"b":false}}')))
    local ok, msg = schema.check(J('{' .. d4 .. ',"properties":{"a":true}}'))
    assert.is_nil(ok)
    assert.equal("properties.a: must be a schema object (boolean schemas need draft-06 or later)", msg)
    assert.is_true(schema.check(J('{' .. d4 .. ',"additionalProperties":false}')))
  end)

  it("defaults to draft-07 semantics without a recognised $schema", function()
    assert.is_true(schema.validate(J '{"exclusiveMaximum":10}', 9))
    assert.is_nil(schema.validate(J '{"exclusiveMaximum":10}', 10))
  end)
end)

describe("forge.schema.check", function()
  local d7 = '"$schema":"http://json-schema.org/draft-07/schema#",'

  it("accepts a typical plan schema", function()
    assert.is_true(schema.check(J [[{
      "$schema": "http://json-schema.org/draft-04/schema#",
      "type": "object",
      "additionalProperties": false,
      "required": ["memory"],
      "properties": {
        "memory": {"type": "integer", "minimum": 256, "maximum": 1024, "default": 512, "description": "MB"},
        "name": {"type": "string", "pattern": "^[a-z][a-z0-9-]{2,30}$"},
        "tags": {"type": "array", "items": {"type": "string"}, "uniqueItems": true},
        "mode": {"enum": ["a", "b"]},
        "extra": {"type": "object", "patternProperties": {"^x-": {}}, "dependencies": {"a": ["b"], "c": {}}}
      }
    }]]))
  end)

  local REJECT = {
    { '[1,2]', "schema must be a JSON object" },
    { '"string"', "schema must be a JSON object" },
    { '{"type":"object"}', "$schema: missing (a schema must declare its draft)" },
    { '{"$schema":7}', "$schema: must be a string" },
    { '{"$schema":"http://json-schema.org/draft-03/schema#"}',
      "$schema: unsupported draft 'http://json-schema.org/draft-03/schema#' (use draft-04, 06 or 07)" },
    { '{' .. d7 .. '"$ref":"http://example.com/s.json"}',
      "$ref: external reference 'http://example.com/s.json' is not allowed (only local references starting with '#')" },
    { '{' .. d7 .. '"properties":{"a":{"$ref":"other.json#/x"}}}',
      "properties.a.$ref: external reference 'other.json#/x' is not allowed (only local references starting with '#')" },
    { '{' .. d7 .. '"properties":{"a":{"$ref":"#/definitions/missing"}}}',
      "properties.a.$ref: cannot resolve reference '#/definitions/missing'" },
    { '{' .. d7 .. '"$ref":"#anchor"}',
      "$ref: unsupported reference '#anchor' (only '#' and JSON pointers '#/...')" },
    { '{' .. d7 .. '"properties":{"memory":{"type":"int"}}}', "properties.memory.type: unknown type 'int'" },
    { '{' .. d7 .. '"type":["string",3]}', "type[1]: must be a string" },
    { '{' .. d7 .. '"type":["string","string"]}', "type[1]: duplicate type 'string'" },
    { '{' .. d7 .. '"type":{}}', "type: must be a type name or a non-empty array of type names" },
    { '{' .. d7 .. '"required":"size"}', "required: must be an array of strings" },
    { '{' .. d7 .. '"required":["a",1]}', "required[1]: must be a string" },
    { '{' .. d7 .. '"properties":[{"type":"string"}]}', "properties: must be an object" },
    { '{' .. d7 .. '"properties":{"a":3}}', "properties.a: must be a schema (an object or a boolean)" },
    { '{' .. d7 .. '"additionalProperties":"no"}',
      "additionalProperties: must be a schema (an object or a boolean)" },
    { '{' .. d7 .. '"items":[{"type":"string"},7]}', "items[1]: must be a schema (an object or a boolean)" },
    { '{' .. d7 .. '"enum":"a"}', "enum: must be a non-empty array" },
    { '{' .. d7 .. '"minLength":-1}', "minLength: must be a non-negative integer" },
    { '{' .. d7 .. '"maxItems":1.5}', "maxItems: must be a non-negative integer" },
    { '{' .. d7 .. '"minimum":"1"}', "minimum: must be a number" },
    { '{' .. d7 .. '"multipleOf":0}', "multipleOf: must be a number greater than 0" },
    { '{' .. d7 .. '"uniqueItems":1}', "uniqueItems: must be a boolean" },
    { '{' .. d7 .. '"anyOf":{}}', "anyOf: must be a non-empty array of schemas" },
    { '{' .. d7 .. '"allOf":[{"type":"nope"}]}', "allOf[0].type: unknown type 'nope'" },
    { '{' .. d7 .. '"dependencies":{"a":["b",2]}}', "dependencies.a[1]: must be a string" },
    { '{' .. d7 .. '"pattern":"(?<=x)y"}', "pattern: unsupported pattern '(?<=x)y': lookbehind is not supported" },
    { '{' .. d7 .. '"properties":{"n":{"pattern":"(a)\\\\1"}}}',
      "properties.n.pattern: unsupported pattern '(a)\\1': backreferences are not supported" },
    { '{' .. d7 .. '"patternProperties":{"\\\\p{L}":{}}}',
      'patternProperties["\\\\p{L}"]: unsupported pattern \'\\p{L}\': unicode property escapes are not supported' },
    { '{' .. d7 .. '"definitions":{"x":{"properties":{"a b":{"format":1}}}}}',
      'definitions.x.properties["a b"].format: must be a string' },
    { '{' .. d7 .. '"x-custom":{"s":{"type":"bad"}},"$ref":"#/x-custom/s"}', "x-custom.s.type: unknown type 'bad'" },
  }
  for i, case in ipairs(REJECT) do
    it("rejects #" .. i .. " " .. case[1], function()
      local ok, msg = schema.check(J(case[1]))
      assert.is_nil(ok)
      assert.equal(case[2], msg)
    end)
  end
end)

describe("forge.schema patterns (ECMA subset)", function()
  -- pattern, strings that match, strings that do not
  local PATTERNS = {
    { "^[a-z][a-z0-9-]{2,30}$", { "abc", "my-db-01", "a" .. ("b"):rep(30) }, { "ab", "1abc", "Abc", "a_bc",
      "a" .. ("b"):rep(31), "abc\n" } },
    { "\\d{3}-\\d{4}", { "555-1234", "call 555-1234 now" }, { "55-1234", "555-123", "abc-defg" } },
    { "^(foo|bar)+$", { "foo", "barfoo", "foofoobar" }, { "", "fo", "foobaz", "xfoo" } },
    { "^(?:[0-9]{1,3}\\.){3}[0-9]{1,3}$", { "10.0.0.1", "255.255.255.255" }, { "10.0.0", "1.2.3.4.5", "a.b.c.d" } },
    { "^[^\\s@]+@[^\\s@]+$", { "a@b", "x.y@z.org" }, { "a b@c", "@b", "a@" } },
    { "^\\w+$", { "abc_123" }, { "abc-123", "", "é" } },
    { "^\\S+\\s\\S+$", { "hello world", "a\tb" }, { "helloworld", "a  b" } },
    { "^\\D*$", { "", "abc" }, { "a1" } },
    { "^\\W$", { "-", " " }, { "a", "_" } },
    { "colou?r", { "color", "colour", "my colours" }, { "colr", "coloor" } },
    { "^a.c$", { "abc", "a-c", "aéc" }, { "ac", "abbc", "a\nc" } },
    { "^[A-Fa-f0-9]{2}(:[A-Fa-f0-9]{2}){5}$", { "00:1A:2b:3C:4d:5E" }, { "00:1A:2b:3C:4d", "00-1A-2b-3C-4d-5E" } },
    { "^(small|medium|large)$", { "small", "large" }, { "smal", "xlarge", "small " } },
    { "^v\\d+(\\.\\d+){0,2}$", { "v1", "v1.2", "v1.2.3" }, { "v1.2.3.4", "1.2", "v" } },
    { "^[-+]?\\d+$", { "-1", "+20", "3" }, { "--1", "1-" } },
    { "^[\\w.-]+$", { "a.b-c_d" }, { "a b", "a/b" } },
    { "^x{2,}$", { "xx", "xxxxx" }, { "x", "xxy" } },
    { "^$", { "" }, { " " } },
    { "a|^b", { "xa", "bx" }, { "xb" } },
    { "^(?=.*\\d)(?=.*[a-z]).{8,}$", { "passw0rdx" }, { "password", "12345678", "pa55" } },
    { "^(?!admin$)[a-z]+$", { "alice", "admins" }, { "admin" } },
    { "\\bcat\\b", { "a cat sat" }, { "concat", "cats" } },
    { "^[]$", {}, { "", "a" } },
    { "^[\\]\\\\]+$", { "]\\]" }, { "a" } },
    { "^\\u00e9+$", { "éé" }, { "e" } },
    { "^\\x41\\t$", { "A\t" }, { "A " } },
    { "^\\/api\\/v\\d\\/$", { "/api/v2/" }, { "/api/vx/" } },
    { "^a{,2}$", { "a{,2}" }, { "aa" } }, -- not a quantifier: literal braces (Annex B)
    { "^(a|ab)(c|bcd)(d*)$", { "abcd", "abcdd" }, { "abce" } },
    { "^(?<year>\\d{4})-(\\d{2})$", { "2024-06" }, { "24-06" } },
    { "^[\\d-x]+$", { "1-x", "x" }, { "y" } },
    { "^(a*)*$", { "", "aaaa" }, { "aab" } },
  }
  for _, case in ipairs(PATTERNS) do
    local pat, yes, no = case[1], case[2], case[3]
    it(pat, function()
      for _, s in ipairs(yes) do
        assert.is_true(schema.pattern_match(pat, s), pat .. " should match " .. ("%q"):format(s))
      end
      for _, s in ipairs(no) do
        assert.is_false(schema.pattern_match(pat, s), pat .. " should not match " .. ("%q"):format(s))
      end
    end)
  end

  local UNSUPPORTED = {
    { "(?<=a)b", "lookbehind is not supported" },
    { "(?<!a)b", "lookbehind is not supported" },
    { "(a)\\1", "backreferences are not supported" },
    { "\\p{Lu}", "unicode property escapes are not supported" },
    { "\\k<x>", "named backreferences are not supported" },
    { "\\u{1F600}", "\\u{...} escapes are not supported" },
    { "\\e", "unsupported escape '\\e'" },
    { "(?i)abc", "unsupported group syntax '(?'" },
    { "*a", "nothing to repeat" },
    { "a**", "nothing to repeat" },
    { "^*", "nothing to repeat" },
    { "(ab", "missing ')'" },
    { "ab)", "unmatched ')'" },
    { "[abc", "unterminated character class" },
    { "[z-a]", "character class range out of order" },
    { "a{3,1}", "numbers out of order in {} quantifier" },
    { "abc\\", "pattern ends with a backslash" },
  }
  for _, case in ipairs(UNSUPPORTED) do
    it("refuses " .. case[1], function()
      local ok, msg = schema.pattern_match(case[1], "abc")
      assert.is_nil(ok)
      assert.equal("unsupported pattern '" .. case[1] .. "': " .. case[2], msg)
    end)
  end

  it("an unsupported pattern fails validation where it applies, even under not/anyOf", function()
    for _, text in ipairs {
      '{"not":{"pattern":"(?<=a)b"}}',
      '{"anyOf":[{"pattern":"(?<=a)b"},{"type":"string"}]}',
      '{"oneOf":[{"type":"string"},{"pattern":"(?<=a)b"}]}',
      '{"if":{"pattern":"(?<=a)b"},"then":true}',
    } do
      local ok, msg, path = schema.validate(J(text), "ab")
      assert.is_nil(ok, text)
      assert.equal("parameters: unsupported pattern '(?<=a)b': lookbehind is not supported", msg)
      assert.equal("parameters", path)
    end
    local ok, msg = schema.validate(J '{"patternProperties":{"(?<=a)b":{}}}', J '{"x":"ab"}')
    assert.is_nil(ok)
    assert.equal("parameters.x: unsupported pattern '(?<=a)b': lookbehind is not supported", msg)
  end)

  it("gives up on catastrophic backtracking instead of hanging", function()
    local ok, msg = schema.pattern_match("^(a+)+$", ("a"):rep(40) .. "!")
    assert.is_nil(ok)
    assert.equal("pattern '^(a+)+$' is too expensive to evaluate on this value", msg)
    local s = J '{"pattern":"^(a+)+$"}'
    local vok, vmsg, path = schema.validate(s, ("a"):rep(40) .. "!")
    assert.is_nil(vok)
    assert.equal("parameters: pattern '^(a+)+$' is too expensive to evaluate on this value", vmsg)
    assert.equal("parameters", path)
  end)

  it("handles long inputs for simple patterns", function()
    assert.is_true(schema.pattern_match("^[a-z]*$", ("a"):rep(100000)))
    assert.is_false(schema.pattern_match("\\d{3}", ("a"):rep(100000)))
  end)
end)

describe("forge.schema sandboxing", function()
  it("loads and works with only string/table/math/utf8 and basic functions", function()
    local env = { string = string, table = table, math = math, utf8 = utf8, type = type, pairs = pairs,
      ipairs = ipairs, tostring = tostring, tonumber = tonumber }
    local chunk = assert(loadfile("scripts/forge/schema.lua", "t", env))
    local sandboxed = chunk()
    assert.is_true(sandboxed.check(J '{"$schema":"http://json-schema.org/draft-07/schema#","pattern":"^a+$"}'))
    local _, msg = sandboxed.validate(J '{"properties":{"n":{"pattern":"^a+$"}}}', J '{"n":"b"}')
    assert.equal("parameters.n: must match pattern '^a+$'", msg)
    local keys = 0
    for _ in pairs(env) do keys = keys + 1 end
    assert.equal(9, keys, "the module must not create globals")
  end)
end)
