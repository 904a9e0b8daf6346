/*
 * forge.crypto — random secrets and ids, hashes, constant-time compare, encodings.
 *
 * SHA-256 is written here from FIPS 180-4; HMAC from RFC 2104. Randomness comes from
 * getrandom(2) (the kernel CSPRNG). No static mutable state: safe from any thread.
 * All buffers are Lua-owned (luaL_Buffer), so a raise never leaks.
 */
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/random.h>

#include "forge/forge.h"

#define MAX_RANDOM      (1024 * 1024)
#define DEFAULT_ALPHA   "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"

static const char hexdigits[] = "0123456789abcdef";
static const char b64chars[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";


/* ------------------------------------------------------------------------ */
/* SHA-256 (FIPS 180-4)                                                     */
/* ------------------------------------------------------------------------ */

struct sha256 {
    uint32_t h[8];
    uint8_t block[64];
    size_t used;                /* bytes in block */
    uint64_t total;             /* message bytes so far */
};

static const uint32_t K256[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
};

#define ROTR(x, n)  (((x) >> (n)) | ((x) << (32 - (n))))
#define CH(x, y, z) (((x) & (y)) ^ (~(x) & (z)))
#define MAJ(x, y, z) (((x) & (y)) ^ ((x) & (z)) ^ ((y) & (z)))
#define BSIG0(x)    (ROTR(x, 2) ^ ROTR(x, 13) ^ ROTR(x, 22))
#define BSIG1(x)    (ROTR(x, 6) ^ ROTR(x, 11) ^ ROTR(x, 25))
#define SSIG0(x)    (ROTR(x, 7) ^ ROTR(x, 18) ^ ((x) >> 3))
#define SSIG1(x)    (ROTR(x, 17) ^ ROTR(x, 19) ^ ((x) >> 10))


static void sha256_init(struct sha256 *c)
{
    static const uint32_t h0[8] = {
        0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19,
    };
    memcpy(c->h, h0, sizeof h0);
    c->used = 0;
    c->total = 0;
}


static void sha256_compress(uint32_t h[8], const uint8_t p[64])
{
    uint32_t w[64];
    for (int t = 0; t < 16; t++)
        w[t] = (uint32_t)p[4 * t] << 24 | (uint32_t)p[4 * t + 1] << 16 |
               (uint32_t)p[4 * t + 2] << 8 | (uint32_t)p[4 * t + 3];
    for (int t = 16; t < 64; t++)
        w[t] = SSIG1(w[t - 2]) + w[t - 7] + SSIG0(w[t - 15]) + w[t - 16];
    uint32_t a = h[0], b = h[1], c = h[2], d = h[3], e = h[4], f = h[5], g = h[6], k = h[7];
    for (int t = 0; t < 64; t++) {
        uint32_t t1 = k + BSIG1(e) + CH(e, f, g) + K256[t] + w[t];
        uint32_t t2 = BSIG0(a) + MAJ(a, b, c);
        k = g;
        g = f;
        f = e;
        e = d + t1;
        d = c;
        c = b;
        b = a;
        a = t1 + t2;
    }
    h[0] += a; h[1] += b; h[2] += c; h[3] += d;
    h[4] += e; h[5] += f; h[6] += g; h[7] += k;
}


static void sha256_update(struct sha256 *c, const void *data, size_t len)
{
    const uint8_t *p = data;
    c->total += len;
    if (c->used) {
        size_t take = 64 - c->used < len ? 64 - c->used : len;
        memcpy(c->block + c->used, p, take);
        c->used += take;
        p += take;
        len -= take;
        if (c->used < 64)
            return;
        sha256_compress(c->h, c->block);
        c->used = 0;
    }
    for (; len >= 64; p += 64, len -= 64)
        sha256_compress(c->h, p);
    memcpy(c->block, p, len);
    c->used = len;
}


static void sha256_final(struct sha256 *c, uint8_t out[32])
{
    uint64_t bits = c->total * 8;
    c->block[c->used++] = 0x80;
    if (c->used > 56) {
        memset(c->block + c->used, 0, 64 - c->used);
        sha256_compress(c->h, c->block);
        c->used = 0;
    }
    memset(c->block + c->used, 0, 56 - c->used);
    for (int i = 0; i < 8; i++)
        c->block[56 + i] = (uint8_t)(bits >> (56 - 8 * i));
    sha256_compress(c->h, c->block);
    for (int i = 0; i < 8; i++) {
        out[4 * i] = (uint8_t)(c->h[i] >> 24);
        out[4 * i + 1] = (uint8_t)(c->h[i] >> 16);
        out[4 * i + 2] = (uint8_t)(c->h[i] >> 8);
        out[4 * i + 3] = (uint8_t)c->h[i];
    }
    memset(c, 0, sizeof *c);                    /* no key material left on the stack */
}


static void sha256(const void *data, size_t len, uint8_t out[32])
{
    struct sha256 c;
    sha256_init(&c);
    sha256_update(&c, data, len);
    sha256_final(&c, out);
}


/* HMAC-SHA256 (RFC 2104): H((K ^ opad) || H((K ^ ipad) || m)). */
static void hmac_sha256(const void *key, size_t klen, const void *msg, size_t mlen, uint8_t out[32])
{
    uint8_t k[64], pad[64], inner[32];
    memset(k, 0, sizeof k);
    if (klen > 64)
        sha256(key, klen, k);
    else
        memcpy(k, key, klen);
    struct sha256 c;
    for (int i = 0; i < 64; i++)
        pad[i] = k[i] ^ 0x36;
    sha256_init(&c);
    sha256_update(&c, pad, 64);
    sha256_update(&c, msg, mlen);
    sha256_final(&c, inner);
    for (int i = 0; i < 64; i++)
        pad[i] = k[i] ^ 0x5c;
    sha256_init(&c);
    sha256_update(&c, pad, 64);
    sha256_update(&c, inner, 32);
    sha256_final(&c, out);
    memset(k, 0, sizeof k);
    memset(pad, 0, sizeof pad);
}


/* ------------------------------------------------------------------------ */
/* randomness                                                               */
/* ------------------------------------------------------------------------ */

/* Fill buf with n random bytes. Returns 0 or -errno. */
static int fill_random(void *buf, size_t n)
{
    uint8_t *p = buf;
    while (n > 0) {
        ssize_t r = getrandom(p, n, 0);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        p += r;
        n -= (size_t)r;
    }
    return 0;
}


static int push_random_error(lua_State *L, int rc)
{
    char eb[128];
    return forge_pusherror(L, "crypto.random", 1, "getrandom: %s", strerror_r(-rc, eb, sizeof eb));
}


static void push_hex(lua_State *L, const uint8_t *p, size_t n)
{
    luaL_Buffer b;
    char *out = luaL_buffinitsize(L, &b, 2 * n);
    for (size_t i = 0; i < n; i++) {
        out[2 * i] = hexdigits[p[i] >> 4];
        out[2 * i + 1] = hexdigits[p[i] & 15];
    }
    luaL_pushresultsize(&b, 2 * n);
}


/***
 * Random bytes from the kernel CSPRNG.
 * @function random_bytes
 * @tparam integer n 0..1048576
 * @return string of n bytes, or nil, err ("crypto.random")
 */
static int l_crypto_random_bytes(lua_State *L)
{
    lua_Integer n = luaL_checkinteger(L, 1);
    luaL_argcheck(L, n >= 0 && n <= MAX_RANDOM, 1, "expected 0 <= n <= 1048576");
    luaL_Buffer b;
    char *p = luaL_buffinitsize(L, &b, (size_t)n);
    int rc = fill_random(p, (size_t)n);
    if (rc < 0)
        return push_random_error(L, rc);
    luaL_pushresultsize(&b, (size_t)n);
    return 1;
}


/***
 * A random password: each character drawn uniformly (rejection sampling) from the alphabet.
 * @function password
 * @tparam[opt=32] integer len 1..4096
 * @tparam[opt] string alphabet 2..256 distinct bytes (default A-Z a-z 0-9)
 * @return string, or nil, err ("crypto.random")
 */
static int l_crypto_password(lua_State *L)
{
    lua_Integer len = luaL_optinteger(L, 1, 32);
    luaL_argcheck(L, len >= 1 && len <= 4096, 1, "expected 1 <= len <= 4096");
    size_t m;
    const char *alpha = luaL_optlstring(L, 2, DEFAULT_ALPHA, &m);
    luaL_argcheck(L, m >= 2 && m <= 256, 2, "alphabet must have 2..256 characters");
    unsigned char seen[256] = {0};
    for (size_t i = 0; i < m; i++) {
        unsigned char ch = (unsigned char)alpha[i];
        luaL_argcheck(L, !seen[ch], 2, "alphabet has a repeated character");
        seen[ch] = 1;
    }
    /* Accept a byte only below the largest multiple of m: every index equally likely. */
    unsigned limit = 256 - (256 % (unsigned)m);
    luaL_Buffer b;
    char *out = luaL_buffinitsize(L, &b, (size_t)len);
    uint8_t pool[256];
    size_t have = 0, pos = 0;
    for (lua_Integer i = 0; i < len;) {
        if (pos == have) {
            int rc = fill_random(pool, sizeof pool);
            if (rc < 0)
                return push_random_error(L, rc);
            have = sizeof pool;
            pos = 0;
        }
        unsigned v = pool[pos++];
        if (v < limit)
            out[i++] = alpha[v % m];
    }
    memset(pool, 0, sizeof pool);
    luaL_pushresultsize(&b, (size_t)len);
    return 1;
}


/***
 * A random RFC 4122 version 4 UUID, lowercase.
 * @function uuid
 * @return string "xxxxxxxx-xxxx-4xxx-yxxx-xxxxxxxxxxxx", or nil, err ("crypto.random")
 */
static int l_crypto_uuid(lua_State *L)
{
    uint8_t u[16];
    int rc = fill_random(u, sizeof u);
    if (rc < 0)
        return push_random_error(L, rc);
    u[6] = (uint8_t)((u[6] & 0x0f) | 0x40);     /* version 4 */
    u[8] = (uint8_t)((u[8] & 0x3f) | 0x80);     /* variant 10 */
    char s[37], *p = s;
    for (int i = 0; i < 16; i++) {
        if (i == 4 || i == 6 || i == 8 || i == 10)
            *p++ = '-';
        *p++ = hexdigits[u[i] >> 4];
        *p++ = hexdigits[u[i] & 15];
    }
    lua_pushlstring(L, s, 36);
    return 1;
}


/***
 * A random token as lowercase hex.
 * @function token
 * @tparam[opt=16] integer nbytes random bytes (1..1048576); the string is twice as long
 * @return string, or nil, err ("crypto.random")
 */
static int l_crypto_token(lua_State *L)
{
    lua_Integer n = luaL_optinteger(L, 1, 16);
    luaL_argcheck(L, n >= 1 && n <= MAX_RANDOM, 1, "expected 1 <= nbytes <= 1048576");
    /* Random bytes into the back half of the buffer, hex-expanded front to back in place. */
    luaL_Buffer b;
    char *out = luaL_buffinitsize(L, &b, 2 * (size_t)n);
    uint8_t *raw = (uint8_t *)out + n;
    int rc = fill_random(raw, (size_t)n);
    if (rc < 0)
        return push_random_error(L, rc);
    for (lua_Integer i = 0; i < n; i++) {
        uint8_t v = raw[i];                     /* read before out[2i+1] may overwrite it */
        out[2 * i] = hexdigits[v >> 4];
        out[2 * i + 1] = hexdigits[v & 15];
    }
    luaL_pushresultsize(&b, 2 * (size_t)n);
    return 1;
}


/* ------------------------------------------------------------------------ */
/* hashes and encodings                                                     */
/* ------------------------------------------------------------------------ */

/***
 * Lowercase hex of a string.
 * @function hex
 * @tparam string s
 * @treturn string
 */
static int l_crypto_hex(lua_State *L)
{
    size_t n;
    const char *s = luaL_checklstring(L, 1, &n);
    push_hex(L, (const uint8_t *)s, n);
    return 1;
}


/***
 * SHA-256 digest (FIPS 180-4).
 * @function sha256
 * @tparam string s
 * @treturn string 32 raw bytes
 */
static int l_crypto_sha256(lua_State *L)
{
    size_t n;
    const char *s = luaL_checklstring(L, 1, &n);
    uint8_t d[32];
    sha256(s, n, d);
    lua_pushlstring(L, (const char *)d, 32);
    return 1;
}


/***
 * SHA-256 digest as lowercase hex.
 * @function sha256_hex
 * @tparam string s
 * @treturn string 64 hex digits
 */
static int l_crypto_sha256_hex(lua_State *L)
{
    size_t n;
    const char *s = luaL_checklstring(L, 1, &n);
    uint8_t d[32];
    sha256(s, n, d);
    push_hex(L, d, 32);
    return 1;
}


/***
 * HMAC-SHA256 (RFC 2104).
 * @function hmac_sha256
 * @tparam string key
 * @tparam string s
 * @treturn string 32 raw bytes
 */
static int l_crypto_hmac_sha256(lua_State *L)
{
    size_t kn, n;
    const char *k = luaL_checklstring(L, 1, &kn);
    const char *s = luaL_checklstring(L, 2, &n);
    uint8_t d[32];
    hmac_sha256(k, kn, s, n, d);
    lua_pushlstring(L, (const char *)d, 32);
    return 1;
}


/***
 * Compare two strings in time that depends only on their lengths (for secrets).
 * @function equal
 * @tparam string a
 * @tparam string b
 * @treturn boolean
 */
static int l_crypto_equal(lua_State *L)
{
    size_t an, bn;
    const char *a = luaL_checklstring(L, 1, &an);
    const char *b = luaL_checklstring(L, 2, &bn);
    /* Always walk a's length; a length mismatch is folded into the result. */
    volatile unsigned char diff = an != bn;
    for (size_t i = 0; i < an; i++)
        diff |= (unsigned char)(a[i] ^ (i < bn ? b[i] : 0));
    lua_pushboolean(L, diff == 0);
    return 1;
}


/***
 * Base64 (RFC 4648, standard alphabet, with padding).
 * @function base64_encode
 * @tparam string s
 * @treturn string
 */
static int l_crypto_base64_encode(lua_State *L)
{
    size_t n;
    const uint8_t *s = (const uint8_t *)luaL_checklstring(L, 1, &n);
    luaL_argcheck(L, n <= ((size_t)-1 / 4) * 3 - 3, 1, "string too long");
    size_t outn = (n + 2) / 3 * 4;
    luaL_Buffer b;
    char *out = luaL_buffinitsize(L, &b, outn);
    char *p = out;
    size_t i = 0;
    for (; i + 3 <= n; i += 3) {
        uint32_t v = (uint32_t)s[i] << 16 | (uint32_t)s[i + 1] << 8 | s[i + 2];
        *p++ = b64chars[v >> 18];
        *p++ = b64chars[(v >> 12) & 63];
        *p++ = b64chars[(v >> 6) & 63];
        *p++ = b64chars[v & 63];
    }
    if (n - i == 1) {
        uint32_t v = (uint32_t)s[i] << 16;
        *p++ = b64chars[v >> 18];
        *p++ = b64chars[(v >> 12) & 63];
        *p++ = '=';
        *p++ = '=';
    } else if (n - i == 2) {
        uint32_t v = (uint32_t)s[i] << 16 | (uint32_t)s[i + 1] << 8;
        *p++ = b64chars[v >> 18];
        *p++ = b64chars[(v >> 12) & 63];
        *p++ = b64chars[(v >> 6) & 63];
        *p++ = '=';
    }
    luaL_pushresultsize(&b, outn);
    return 1;
}


static int b64value(unsigned char c)
{
    if (c >= 'A' && c <= 'Z')
        return c - 'A';
    if (c >= 'a' && c <= 'z')
        return c - 'a' + 26;
    if (c >= '0' && c <= '9')
        return c - '0' + 52;
    if (c == '+')
        return 62;
    if (c == '/')
        return 63;
    return -1;
}


/***
 * Decode base64 (RFC 4648, standard alphabet). Padding may be omitted; anything else
 * outside the alphabet (whitespace included) is refused.
 * @function base64_decode
 * @tparam string s
 * @return string, or nil, err ("crypto.base64")
 */
static int l_crypto_base64_decode(lua_State *L)
{
    size_t n;
    const unsigned char *s = (const unsigned char *)luaL_checklstring(L, 1, &n);
    size_t data = n;                            /* length without padding */
    while (data > 0 && s[data - 1] == '=')
        data--;
    size_t pad = n - data;
    if (pad > 2 || (pad > 0 && n % 4 != 0))
        return forge_pusherror(L, "crypto.base64", 0, "bad padding");
    if (data % 4 == 1)
        return forge_pusherror(L, "crypto.base64", 0, "bad length");
    size_t outn = data / 4 * 3 + (data % 4 ? data % 4 - 1 : 0);
    luaL_Buffer b;
    char *out = luaL_buffinitsize(L, &b, outn);
    size_t o = 0;
    uint32_t acc = 0;
    int bits = 0;
    for (size_t i = 0; i < data; i++) {
        int v = b64value(s[i]);
        if (v < 0) {
            lua_settop(L, 1);                   /* drop the buffer (Lua-owned) */
            return forge_pusherror(L, "crypto.base64", 0, "invalid character at offset %d", (int)i);
        }
        acc = acc << 6 | (uint32_t)v;
        bits += 6;
        if (bits >= 8) {
            bits -= 8;
            out[o++] = (char)(acc >> bits);
            acc &= (1u << bits) - 1;
        }
    }
    luaL_pushresultsize(&b, o);
    return 1;
}


int luaopen_forge_crypto(lua_State *L)
{
    static const luaL_Reg lib[] = {
        {"random_bytes", l_crypto_random_bytes},
        {"password", l_crypto_password},
        {"uuid", l_crypto_uuid},
        {"token", l_crypto_token},
        {"hex", l_crypto_hex},
        {"sha256", l_crypto_sha256},
        {"sha256_hex", l_crypto_sha256_hex},
        {"hmac_sha256", l_crypto_hmac_sha256},
        {"equal", l_crypto_equal},
        {"base64_encode", l_crypto_base64_encode},
        {"base64_decode", l_crypto_base64_decode},
        {NULL, NULL},
    };
    luaL_newlib(L, lib);
    forge_setmodinfo(L, "forge.crypto");
    return 1;
}
