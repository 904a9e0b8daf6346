-- forge.crypto (OpenSSL's libcrypto): randomness, ids, SHA-256/HMAC/PBKDF2 vectors, SCRAM verifiers,
-- base64, constant-time compare, AES-256-GCM seal/open.
local crypto = require "forge.crypto"

local function unhex(h)
  return (h:gsub("%x%x", function(x) return string.char(tonumber(x, 16)) end))
end

local function xor(a, b)
  local out = {}
  for i = 1, #a do out[i] = string.char(a:byte(i) ~ b:byte(i)) end
  return table.concat(out)
end

-- stdout of a shell command, with a temporary file holding `input` as $IN
local function run(cmd, input)
  local path = os.tmpname()
  local f = assert(io.open(path, "wb")); f:write(input or ""); f:close()
  local p = assert(io.popen("IN=" .. path .. "; " .. cmd))
  local out = p:read("a")
  p:close()
  os.remove(path)
  return out
end

-- "AB:CD:..." (openssl kdf, openssl mac) -> lowercase hex
local function openssl_hex(out)
  return (out:gsub("[%s:]", "")):lower()
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
        assert.equal(c[4], crypto.hex(crypto.hmac("sha256", c[2], c[3])))
      end)
    end
  end)

  describe("hmac(alg, key, msg)", function()
    it("matches RFC 2202 (sha1) and RFC 4231 (sha384, sha512)", function()
      local jefe = { "Jefe", "what do ya want for nothing?" }
      assert.equal("effcdf6ae5eb2fa2d27416d5f184df9c259a7c79", crypto.hex(crypto.hmac("sha1", jefe[1], jefe[2])))
      assert.equal("af45d2e376484031617f78d2b58a6b1b9c7ef464f5a01b47e42ec3736322445e"
        .. "8e2240ca5e69e2c78b3239ecfab21649", crypto.hex(crypto.hmac("sha384", jefe[1], jefe[2])))
      assert.equal("164b7a7bfcf819e2e395fbe73b56e0a387bd64222e831fd610270cd7ea250554"
        .. "9758bf75c05a994a6d034f65f8f0e6fdcaeab1a34d4a6b4b636e070a38bce737",
        crypto.hex(crypto.hmac("sha512", jefe[1], jefe[2])))
      local k = string.rep("\11", 20)
      assert.equal("afd03944d84895626b0825f4ab46907f15f9dadbe4101ec682aa034c7cebc59c"
        .. "faea9ea9076ede7f4af152e8b2fa9cb6", crypto.hex(crypto.hmac("sha384", k, "Hi There")))
      assert.equal("87aa7cdea5ef619d4ff0b4241a1d6cb02379f4e2ce4ec2787ad0b30545e17cde"
        .. "daa833b7d6b8a702038b274eaea3f4e4be9d914eeb61f1702e696c203a126854",
        crypto.hex(crypto.hmac("sha512", k, "Hi There")))
    end)

    it("agrees with `openssl mac` on random keys and messages", function()
      for _, alg in ipairs({ "sha1", "sha256", "sha384", "sha512" }) do
        for _, n in ipairs({ 0, 1, 64, 129, 200 }) do
          local key, msg = crypto.random_bytes(n), crypto.random_bytes(3 * n + 1)
          local want = run(string.format("openssl mac -digest %s -macopt hexkey:%s -in \"$IN\" HMAC",
            alg:upper(), crypto.hex(key)), msg)
          if n == 0 then want = run("openssl mac -digest " .. alg:upper() .. " -macopt key: -in \"$IN\" HMAC", msg) end
          assert.equal(openssl_hex(want), crypto.hex(crypto.hmac(alg, key, msg)), alg .. " key " .. n)
        end
      end
    end)

    it("has the digest's length and takes an empty key", function()
      for alg, len in pairs({ sha1 = 20, sha256 = 32, sha384 = 48, sha512 = 64 }) do
        assert.equal(len, #crypto.hmac(alg, "", ""))
      end
      assert.equal("b613679a0814d9ec772f95d778c35fc5ff1697c493715653c6c712144292c5ad",
        crypto.hex(crypto.hmac_sha256("", "")))
    end)

    it("raises on an unknown algorithm or a missing argument", function()
      assert.has_error(function() crypto.hmac("md5", "k", "m") end,
        "bad argument #1 to 'hmac' (expected sha1, sha256, sha384 or sha512, got 'md5')")
      assert.has_error(function() crypto.hmac("SHA256", "k", "m") end)
      assert.has_error(function() crypto.hmac(nil, "k", "m") end)
      assert.has_error(function() crypto.hmac("sha256", "k") end)
      assert.has_error(function() crypto.hmac("sha256", nil, "m") end)
      assert.has_error(function() crypto.hmac_sha256("k") end)
    end)
  end)

  describe("pbkdf2", function()
    it("matches RFC 6070 (PBKDF2-HMAC-SHA1)", function()
      local cases = {
        { "password", "salt", 1, 20, "0c60c80f961f0e71f3a9b524af6012062fe037a6" },
        { "password", "salt", 2, 20, "ea6c014dc72d6f8ccd1ed92ace1d41f0d8de8957" },
        { "password", "salt", 4096, 20, "4b007901b765489abead49d926f721d065a429c1" },
        { "passwordPASSWORDpassword", "saltSALTsaltSALTsaltSALTsaltSALTsalt", 4096, 25,
          "3d2eec4fe41c849b80c8d83662c0e44a8b291a964cf2f07038" },
        { "pass\0word", "sa\0lt", 4096, 16, "56fa6aa75548099dcc37d7f03425e0c3" },
      }
      for _, c in ipairs(cases) do
        assert.equal(c[5], crypto.hex(crypto.pbkdf2(c[1], c[2], c[3], c[4], "sha1")), c[1] .. " " .. c[3])
      end
    end)

    it("agrees with `openssl kdf ... PBKDF2` (sha256 by default, and the other digests)", function()
      local cases = {
        { "password", "salt", 1, 32 }, { "password", "salt", 4096, 32 }, { "", "salt", 3, 1 },
        { crypto.random_bytes(17), crypto.random_bytes(16), 1000, 64 },
        { crypto.random_bytes(100), crypto.random_bytes(1), 7, 1024 },
      }
      for _, c in ipairs(cases) do
        for _, alg in ipairs({ "sha256", "sha1", "sha384", "sha512" }) do
          local pass = #c[1] > 0 and "hexpass:" .. crypto.hex(c[1]) or "pass:"
          local want = run(string.format("openssl kdf -keylen %d -kdfopt digest:%s -kdfopt %s "
            .. "-kdfopt hexsalt:%s -kdfopt iter:%d PBKDF2", c[4], alg:upper(), pass, crypto.hex(c[2]), c[3]))
          assert.equal(c[4] * 2, #openssl_hex(want), want)
          assert.equal(openssl_hex(want), crypto.hex(crypto.pbkdf2(c[1], c[2], c[3], c[4], alg)), alg)
          if alg == "sha256" then
            assert.equal(crypto.pbkdf2(c[1], c[2], c[3], c[4], alg), crypto.pbkdf2(c[1], c[2], c[3], c[4]))
          end
        end
      end
    end)

    it("raises on out-of-range arguments with usage text", function()
      assert.has_error(function() crypto.pbkdf2("p", "s", 0, 32) end,
        "bad argument #3 to 'pbkdf2' (expected 1 <= iterations <= 10000000)")
      assert.has_error(function() crypto.pbkdf2("p", "s", 16777216, 20, "sha1") end,
        "bad argument #3 to 'pbkdf2' (expected 1 <= iterations <= 10000000)")
      assert.has_error(function() crypto.pbkdf2("p", "s", 1, 0) end,
        "bad argument #4 to 'pbkdf2' (expected 1 <= length <= 1024)")
      assert.has_error(function() crypto.pbkdf2("p", "s", 1, 1025) end,
        "bad argument #4 to 'pbkdf2' (expected 1 <= length <= 1024)")
      assert.has_error(function() crypto.pbkdf2("p", "s", 1, 32, "md5") end,
        "bad argument #5 to 'pbkdf2' (expected sha1, sha256, sha384 or sha512, got 'md5')")
      assert.has_error(function() crypto.pbkdf2("p", "s", 1.5, 32) end)
      assert.has_error(function() crypto.pbkdf2("p", nil, 1, 32) end)
      assert.has_error(function() crypto.pbkdf2("p", "s") end)
      assert.equal(1024, #crypto.pbkdf2("p", "s", 1, 1024))
    end)
  end)

  describe("scram_sha256", function()
    local function parse(v)
      local iter, salt, stored, server = v:match("^SCRAM%-SHA%-256%$(%d+):([%w+/=]+)%$([%w+/=]+):([%w+/=]+)$")
      assert.is_string(iter, v)
      return tonumber(iter), crypto.base64_decode(salt), crypto.base64_decode(stored), crypto.base64_decode(server)
    end

    it("is RFC 5802's StoredKey and ServerKey, recomputed from the primitives", function()
      local salt = crypto.random_bytes(16)
      local v = crypto.scram_sha256("correct horse", salt, 1234)
      local iter, s, stored, server = parse(v)
      assert.equal(1234, iter)
      assert.equal(salt, s)
      local salted = crypto.pbkdf2("correct horse", salt, 1234, 32, "sha256")
      assert.equal(crypto.sha256(crypto.hmac("sha256", salted, "Client Key")), stored)
      assert.equal(crypto.hmac("sha256", salted, "Server Key"), server)
    end)

    it("fits RFC 7677's example exchange (pencil)", function()
      local salt_b64 = "W22ZaJ0SNY7soEsUEjb6gQ=="
      local v = crypto.scram_sha256("pencil", crypto.base64_decode(salt_b64), 4096)
      assert.equal("SCRAM-SHA-256$4096:" .. salt_b64 .. "$", v:sub(1, 44))
      local _, _, stored, server = parse(v)
      local nonce = "rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
      local auth = "n=user,r=rOprNGfwEbeRWgbNEkqO," .. "r=" .. nonce .. ",s=" .. salt_b64 .. ",i=4096,"
        .. "c=biws,r=" .. nonce
      -- the server proves itself with ServerSignature = HMAC(ServerKey, AuthMessage)
      assert.equal("6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=",
        crypto.base64_encode(crypto.hmac("sha256", server, auth)))
      -- the client's proof XOR HMAC(StoredKey, AuthMessage) is ClientKey, and SHA256(ClientKey) = StoredKey
      local proof = crypto.base64_decode("dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=")
      assert.equal(stored, crypto.sha256(xor(proof, crypto.hmac("sha256", stored, auth))))
    end)

    it("defaults to 16 random salt bytes and 4096 iterations", function()
      local a, b = crypto.scram_sha256("pw"), crypto.scram_sha256("pw")
      assert.are_not.equal(a, b)
      local iter, salt = parse(a)
      assert.equal(4096, iter)
      assert.equal(16, #salt)
      assert.equal(a, crypto.scram_sha256("pw", salt))
      assert.equal(a, crypto.scram_sha256("pw", salt, nil))
      assert.equal(4096, (parse(crypto.scram_sha256("pw", nil, 4096))))
      assert.equal(1, (parse(crypto.scram_sha256("", "s", 1))))
    end)

    it("raises on bad arguments with usage text", function()
      assert.has_error(function() crypto.scram_sha256() end)
      assert.has_error(function() crypto.scram_sha256({}) end)
      assert.has_error(function() crypto.scram_sha256("pw", "") end,
        "bad argument #2 to 'scram_sha256' (expected a salt of 1..1024 bytes)")
      assert.has_error(function() crypto.scram_sha256("pw", string.rep("s", 1025)) end,
        "bad argument #2 to 'scram_sha256' (expected a salt of 1..1024 bytes)")
      assert.has_error(function() crypto.scram_sha256("pw", "salt", 0) end,
        "bad argument #3 to 'scram_sha256' (expected 1 <= iterations <= 10000000)")
      assert.has_error(function() crypto.scram_sha256("pw", "salt", 10000001) end)
      assert.has_error(function() crypto.scram_sha256("pw", {}) end)
    end)
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

    it("agrees with coreutils base64 past OpenSSL's int-sized blocks", function()
      local parts = {}
      for i = 1, 7 do parts[i] = crypto.random_bytes(1024 * 1024) end
      local s = table.concat(parts) .. "xy"
      local e = crypto.base64_encode(s)
      assert.equal(run("base64 -w0 \"$IN\"", s), e)
      assert.equal(s, crypto.base64_decode(e))
      assert.equal(s, crypto.base64_decode((e:gsub("=+$", ""))))
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

  describe("seal and open (AES-256-GCM)", function()
    local key = crypto.random_bytes(32)

    it("opens the GCM spec's test case 16 (AES-256, 96-bit IV, associated data)", function()
      local k = unhex("feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308")
      local iv = unhex("cafebabefacedbaddecaf888")
      local aad = unhex("feedfacedeadbeeffeedfacedeadbeefabaddad2")
      local ct = unhex("522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa" ..
        "8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662")
      local tag = unhex("76fc6ece0f4e1768cddf8853bb2d551b")
      assert.equal("d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a72" ..
        "1c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b39", crypto.hex(crypto.open(k, iv .. ct .. tag, aad)))
    end)

    it("is nonce | ciphertext | tag, with a fresh nonce each time, and round-trips", function()
      for _, pt in ipairs({ "", "x", string.rep("secret ", 1000), crypto.random_bytes(4097) }) do
        local a, b = crypto.seal(key, pt, "instance/1"), crypto.seal(key, pt, "instance/1")
        assert.equal(12 + #pt + 16, #a)
        assert.are_not.equal(a:sub(1, 12), b:sub(1, 12))
        assert.equal(pt, crypto.open(key, a, "instance/1"))
        assert.equal(pt, crypto.open(key, b, "instance/1"))
      end
      assert.equal("no aad", crypto.open(key, crypto.seal(key, "no aad")))
      assert.equal("no aad", crypto.open(key, crypto.seal(key, "no aad", ""), ""))
    end)

    it("agrees with Python's cryptography (AESGCM) both ways", function()
      local pt, aad = crypto.random_bytes(300), "binding/i/b"
      local blob = crypto.seal(key, pt, aad)
      local py = "import sys,binascii as b; from cryptography.hazmat.primitives.ciphers.aead import AESGCM; " ..
        "k,x,a=[b.unhexlify(s) for s in sys.argv[1:4]]; " ..
        "print(AESGCM(k).decrypt(x[:12],x[12:],a).hex(), (x[:12]+AESGCM(k).encrypt(x[:12],b'theirs',a)).hex())"
      local out = run(string.format("python3 -c %q %s %s %s", py, crypto.hex(key), crypto.hex(blob), crypto.hex(aad)))
      local opened, theirs = out:match("^(%x+) (%x+)")
      assert.equal(crypto.hex(pt), opened)
      assert.equal("theirs", crypto.open(key, unhex(theirs), aad))
    end)

    it("gives nil, err for a wrong key, wrong aad, a changed byte anywhere, or a short blob", function()
      local blob = crypto.seal(key, "password=hunter2", "instance/a")
      local function refused(k, b, aad)
        local v, err = crypto.open(k, b, aad)
        assert.is_nil(v)
        assert.equal("crypto.open", err.code)
        assert.is_false(err.retryable)
        return err
      end
      assert.matches("authentication failed", refused(crypto.random_bytes(32), blob, "instance/a").message)
      refused(key, blob, "instance/b")
      refused(key, blob)
      for i = 1, #blob do
        local changed = blob:sub(1, i - 1) .. string.char(blob:byte(i) ~ 1) .. blob:sub(i + 1)
        refused(key, changed, "instance/a")
      end
      refused(key, blob:sub(1, -2), "instance/a")
      assert.matches("too short", refused(key, blob:sub(1, 27), "instance/a").message)
    end)

    it("raises on a key that is not 32 bytes or a missing argument, with usage text", function()
      for _, k in ipairs({ "", string.rep("k", 16), string.rep("k", 31), string.rep("k", 33) }) do
        assert.has_error(function() crypto.seal(k, "x") end, "bad argument #1 to 'seal' (expected a 32-byte key)")
        assert.has_error(function() crypto.open(k, string.rep("\0", 40)) end,
          "bad argument #1 to 'open' (expected a 32-byte key)")
      end
      assert.has_error(function() crypto.seal(key) end)
      assert.has_error(function() crypto.open(key, nil) end)
      assert.has_error(function() crypto.seal(key, "x", {}) end)
    end)
  end)
end)
