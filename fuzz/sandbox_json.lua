-- Checks of fuzz_sandbox_json (fuzz/README.md): the input is the text a service script
-- gives forge.json.decode inside its sandbox (fuzz/sandbox_service.lua "json"). Any raise,
-- or a failed assert, is a finding. Checked: decode never raises (a value, or nil and an
-- error naming json.invalid); what it accepts, forge.json.encode writes, and that text
-- decodes back to the same value; the decoded value copies out of the sandbox.
local sandbox = require "forge.sandbox"
local VERBOSE = os.getenv("FUZZ_VERBOSE")

local f = assert(io.open(FUZZ_ROOT .. "/fuzz/sandbox_service.lua"))
local source = f:read("a")
f:close()
local sb = assert(sandbox.new { name = "fuzz", memory = 256 * 1024 * 1024 })
assert(sb:load(source, "@fuzz/sandbox_service.lua"))
FUZZ_SANDBOX = sb -- fuzz_sandbox*.c collects its garbage after every input

return function(data)
  local r, err = sb:call("json", {}, data)
  if VERBOSE then print(r and r.ok, r and r.text, r and (r.encode_error or r.redecode_error), err and err.message) end
  if r == nil then
    assert(type(err) == "table" and type(err.message) == "string", "call: error is not a forge.error")
    assert(err.code == "sandbox.memory", "json: the call failed: " .. err.message)
    return
  end
  if not r.ok then
    assert(type(r.err) == "table" and r.err.code == "json.invalid" and type(r.err.message) == "string",
      "json.decode: refusal without a json.invalid error")
    return
  end
  assert(r.encode_error == nil, "json.encode cannot write what json.decode accepted: " .. tostring(r.encode_error))
  assert(r.redecode_error == nil, "json.decode refuses what json.encode wrote: " .. tostring(r.text))
  assert(r.same, "decode(encode(decode(text))) differs from decode(text): " .. tostring(r.text))
end
