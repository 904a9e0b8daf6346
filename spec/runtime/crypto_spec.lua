-- forge.crypto: randomness, ids, SHA-256/HMAC vectors, base64, constant-time compare.
local crypto = require "forge.crypto"

local function unhex(h)
  return (h:gsub("%x%x", function(x) return string.char(tonumber(x, 16)) end))
end

-- sha256sum of s via the coreutils binary, as an independent reference
local function sha256sum(s)
  local path = os.tmpname()
  local f = assert(io.open(path, "wb")); f:write(s); f:close()
  local p = assert(io.popen("sha256sum " .. path))
  local out = p:read("a")
  p:close()
  os.remove(path)
  return out:match("^(%x+)")
end

describe("forge.crypto", function()
  it("has module info", function()
    assert.equal("forge.crypto", crypto._NAME)
    assert.is_string(crypto._VERSION)
  end)

  describe("sha256 (FIPS 180-4 / NIST vectors)", function()
    local vectors = {
      { "", "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855" },
      { "abc", "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad" },
      { "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq",
        "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1" },
      { "abcdefghbcdefghicdefghijdefghijkefghijklfghijklmghijklmnhijklmno"
        .. "ijklmnopjklmnopqklmnopqrlmnopqrsmnopqrstnopqrstu",
        "cf5b16a778af8380036ce59e7b0492370b249b11e8f07a51afac45037afee9d1" },
      { string.rep("a", 1000000), "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0" },
    }
    for i, v in ipairs(vectors) do
      it("vector " .. i .. " (" .. #v[1] .. " bytes)", function()
        assert.equal(v[2], crypto.sha256_hex(v[1]))
        assert.equal(unhex(v[2]), crypto.sha256(v[1]))
        assert.equal(32, #crypto.sha256(v[1]))
      end)
    end

    it("agrees with sha256sum around the padding boundaries", function()
      for _, n in ipairs({ 1, 55, 56, 57, 63, 64, 65, 119, 120, 127, 128, 129, 1000 }) do
        local s = crypto.random_bytes(n)
        assert.equal(sha256sum(s), crypto.sha256_hex(s), "length " .. n)
      end
    end)
  end)

  describe("hmac_sha256 (RFC 4231)", function()
    local big = string.rep("\170", 131)
    local cases = {
      { 1, string.rep("\11", 20), "Hi There",
        "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7" },
      { 2, "Jefe", "what do ya want for nothing?",
        "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843" },
      { 6, big, "Test Using Larger Than Block-Size Key - Hash Key First",
        "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54" },
      { 7, big, "This is a test using a larger than block-size key and a larger than block-size data. "
        .. "The key needs to be hashed before being used by the HMAC algorithm.",
        "9b09ffa71b942fcb27635fbcd5b0e944bfdc63644f0713938a7f51535c3a35e2" },
    }
    for _, c in ipairs(cases) do
      it("test case " .. c[1], function()
        assert.equal(c[4], crypto.hex(crypto.hmac_sha256(c[2], c[3])))
      end)
    end
  end)

  describe("base64 (RFC 4648)", function()
    local vectors = {
      { "", "" }, { "f", "Zg==" }, { "fo", "Zm8=" }, { "foo", "Zm9v" },
      { "foob", "Zm9vYg==" }, { "fooba", "Zm9vYmE=" }, { "foobar", "Zm9vYmFy" },
    }
    it("encodes and decodes the test vectors", function()
      for _, v in ipairs(vectors) do
        assert.equal(v[2], crypto.base64_encode(v[1]))
        assert.equal(v[1], crypto.base64_decode(v[2]))
      end
    end)

    it("accepts missing padding", function()
      assert.equal("f", crypto.base64_decode("Zg"))
      assert.equal("fo", crypto.base64_decode("Zm8"))
      assert.equal("fooba", crypto.base64_decode("Zm9vYmE"))
    end)

    it("round-trips random binary", function()
      for n = 0, 200 do
        local s = crypto.random_bytes(n)
        local e = crypto.base64_encode(s)
        assert.equal(math.ceil(n / 3) * 4, #e)
        assert.equal(s, crypto.base64_decode(e))
      end
      assert.equal("+/+/", crypto.base64_encode("\251\255\191"))
    end)

    it("rejects bad input with nil, err", function()
      for _, bad in ipairs({ "Z", "Zm9v!", "Zm 9v", "Zg===", "Z===", "=Zg=", "Zm9vY", "Zm=v", "Zm-_" }) do
        local r, err = crypto.base64_decode(bad)
        assert.is_nil(r, bad)
        assert.equal("crypto.base64", err.code)
      end
    end)
  end)

  describe("random", function()
    it("random_bytes returns n bytes, different each time", function()
      assert.equal("", crypto.random_bytes(0))
      assert.equal(1, #crypto.random_bytes(1))
      assert.equal(1024 * 1024, #crypto.random_bytes(1024 * 1024))
      assert.are_not.equal(crypto.random_bytes(32), crypto.random_bytes(32))
      assert.has_error(function() crypto.random_bytes(1024 * 1024 + 1) end)
      assert.has_error(function() crypto.random_bytes(-1) end)
    end)

    it("uuid is v4, lowercase, unique over 10000", function()
      local seen = {}
      for _ = 1, 10000 do
        local u = crypto.uuid()
        assert.is_truthy(u:match("^%x%x%x%x%x%x%x%x%-%x%x%x%x%-4%x%x%x%-[89ab]%x%x%x%-%x%x%x%x%x%x%x%x%x%x%x%x$"), u)
        assert.equal(u:lower(), u)
        assert.is_nil(seen[u])
        seen[u] = true
      end
    end)

    it("password has the length and alphabet, no duplicates over 1000", function()
      local seen = {}
      for _ = 1, 1000 do
        local p = crypto.password()
        assert.equal(32, #p)
        assert.is_truthy(p:match("^[A-Za-z0-9]+$"))
        assert.is_nil(seen[p])
        seen[p] = true
      end
      assert.equal(8, #crypto.password(8))
      local p = crypto.password(2000, "ab")
      assert.is_truthy(p:match("^[ab]+$"))
      -- both letters appear with roughly equal frequency (unbiased)
      local _, na = p:gsub("a", "")
      assert.is_true(na > 800 and na < 1200, "a count " .. na)
      assert.has_error(function() crypto.password(0) end)
      assert.has_error(function() crypto.password(8, "a") end)
      assert.has_error(function() crypto.password(8, "aab") end)
    end)

    it("password draws every alphabet character uniformly", function()
      local alpha = "0123456789"           -- 256 % 10 ~= 0: rejection sampling matters
      local counts = {}
      local p = crypto.password(4096, alpha)
      for c in p:gmatch(".") do counts[c] = (counts[c] or 0) + 1 end
      for c in alpha:gmatch(".") do
        assert.is_true(counts[c] > 300 and counts[c] < 520, c .. ": " .. tostring(counts[c]))
      end
    end)

    it("token is hex of nbytes", function()
      assert.equal(32, #crypto.token())
      assert.is_truthy(crypto.token():match("^%x+$"))
      assert.equal(2, #crypto.token(1))
      assert.equal(200, #crypto.token(100))
      assert.are_not.equal(crypto.token(), crypto.token())
      assert.has_error(function() crypto.token(0) end)
    end)
  end)

  describe("hex and equal", function()
    it("hex", function()
      assert.equal("", crypto.hex(""))
      assert.equal("00ff10616263", crypto.hex("\0\255\16abc"))
    end)

    it("equal", function()
      assert.is_true(crypto.equal("", ""))
      assert.is_true(crypto.equal("secret", "secret"))
      assert.is_false(crypto.equal("secret", "secreT"))
      assert.is_false(crypto.equal("secret", "secret2"))
      assert.is_false(crypto.equal("secret2", "secret"))
      assert.is_false(crypto.equal("", "x"))
      assert.is_true(crypto.equal("a\0b", "a\0b"))
      assert.is_false(crypto.equal("a\0b", "a\0c"))
      assert.has_error(function() crypto.equal("a", nil) end)
    end)
  end)
end)
