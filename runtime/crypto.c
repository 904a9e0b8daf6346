/*
 * forge.crypto — random secrets and ids, hashes, MACs, key derivation, authenticated
 * encryption (AES-256-GCM), constant-time compare, encodings.
 *
 * Every primitive is OpenSSL's libcrypto: EVP_Digest, HMAC(), PKCS5_PBKDF2_HMAC, EVP_Encrypt*,
 * RAND_bytes (seeded from the kernel, reseeded after fork), EVP_EncodeBlock/DecodeBlock,
 * CRYPTO_memcmp. No static mutable state: safe from any thread (OpenSSL's error queue is
 * per thread). Outputs go to Lua-owned buffers (luaL_Buffer) or the C stack, so a raise
 * never leaks; key material on the C stack is wiped with OPENSSL_cleanse.
 */
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/rand.h>

#include "forge/forge.h"

#define MAX_RANDOM      (1024 * 1024)
#define MAX_ITERATIONS  10000000
#define MAX_DERIVED     1024
#define MAX_SALT        1024
#define SCRAM_SALT      16              /* default salt bytes (what PostgreSQL generates) */
#define SCRAM_ITER      4096            /* RFC 7677's and PostgreSQL's default */
#define DEFAULT_ALPHA   "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
#define B64_ALPHABET    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
#define B64_GROUPS      (1 << 20)       /* 3-byte groups per EVP_Encode/DecodeBlock call (an int length) */
#define AEAD_KEY        32              /* AES-256 */
#define AEAD_NONCE      12              /* 96-bit GCM nonce, random per seal (NIST SP 800-38D 8.2.2) */
#define AEAD_TAG        16              /* 128-bit tag */
#define AEAD_MAX        (INT_MAX - AEAD_NONCE - AEAD_TAG)

static const char hexdigits[] = "0123456789abcdef";

/* Digests for hmac and pbkdf2, by the names scripts use. */
static const char *const MD_NAMES[] = {"sha1", "sha256", "sha384", "sha512", NULL};
static const EVP_MD *(*const MD_FUNCS[])(void) = {EVP_sha1, EVP_sha256, EVP_sha384, EVP_sha512};


/* nil, err from the first entry of this thread's OpenSSL error queue, which is then emptied. */
static int push_ssl_error(lua_State *L, const char *code, int retryable, const char *call)
{
    char reason[256] = "failed";
    unsigned long e = ERR_get_error();
    if (e)
        ERR_error_string_n(e, reason, sizeof reason);
    ERR_clear_error();
    return forge_pusherror(L, code, retryable, "%s: %s", call, reason);
}


/* Fill buf with n random bytes. Returns 0, or -1 with the reason on OpenSSL's error queue. */
static int fill_random(void *buf, size_t n)
{
    return RAND_bytes(buf, (int)n) == 1 ? 0 : -1;
}


static int push_random_error(lua_State *L)
{
    return push_ssl_error(L, "crypto.random", 1, "RAND_bytes");
}


/* The digest named by argument arg (default def when def is not NULL). */
static const EVP_MD *check_md(lua_State *L, int arg, const char *def)
{
    const char *name = def && lua_isnoneornil(L, arg) ? def : luaL_checkstring(L, arg);
    for (int i = 0; MD_NAMES[i]; i++)
        if (strcmp(name, MD_NAMES[i]) == 0)
            return MD_FUNCS[i]();
    luaL_argerror(L, arg, lua_pushfstring(L, "expected sha1, sha256, sha384 or sha512, got '%s'", name));
    return NULL;
}


/* A Lua string argument handed to an OpenSSL call that takes an int length. */
static const char *check_intlstring(lua_State *L, int arg, size_t *n)
{
    const char *s = luaL_checklstring(L, arg, n);
    luaL_argcheck(L, *n <= INT_MAX, arg, "string too long");
    return s;
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


/* ------------------------------------------------------------------------ */
/* randomness                                                               */
/* ------------------------------------------------------------------------ */

/***
 * Random bytes from OpenSSL's CSPRNG.
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
    if (fill_random(p, (size_t)n) < 0)
        return push_random_error(L);
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
            if (fill_random(pool, sizeof pool) < 0)
                return push_random_error(L);
            have = sizeof pool;
            pos = 0;
        }
        unsigned v = pool[pos++];
        if (v < limit)
            out[i++] = alpha[v % m];
    }
    OPENSSL_cleanse(pool, sizeof pool);
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
    if (fill_random(u, sizeof u) < 0)
        return push_random_error(L);
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
    if (fill_random(raw, (size_t)n) < 0)
        return push_random_error(L);
    for (lua_Integer i = 0; i < n; i++) {
        uint8_t v = raw[i];                     /* read before out[2i+1] may overwrite it */
        out[2 * i] = hexdigits[v >> 4];
        out[2 * i + 1] = hexdigits[v & 15];
    }
    luaL_pushresultsize(&b, 2 * (size_t)n);
    return 1;
}


/* ------------------------------------------------------------------------ */
/* hashes, MACs, key derivation                                             */
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


/* SHA-256 of argument 1 into d. Returns 0, or -1 with the reason on OpenSSL's error queue. */
static int sha256_arg(lua_State *L, uint8_t d[32])
{
    size_t n;
    const char *s = luaL_checklstring(L, 1, &n);
    return EVP_Digest(s, n, d, NULL, EVP_sha256(), NULL) == 1 ? 0 : -1;
}


/***
 * SHA-256 digest (FIPS 180-4).
 * @function sha256
 * @tparam string s
 * @return string 32 raw bytes, or nil, err ("crypto.openssl")
 */
static int l_crypto_sha256(lua_State *L)
{
    uint8_t d[32];
    if (sha256_arg(L, d) < 0)
        return push_ssl_error(L, "crypto.openssl", 0, "EVP_Digest");
    lua_pushlstring(L, (const char *)d, 32);
    return 1;
}


/***
 * SHA-256 digest as lowercase hex.
 * @function sha256_hex
 * @tparam string s
 * @return string 64 hex digits, or nil, err ("crypto.openssl")
 */
static int l_crypto_sha256_hex(lua_State *L)
{
    uint8_t d[32];
    if (sha256_arg(L, d) < 0)
        return push_ssl_error(L, "crypto.openssl", 0, "EVP_Digest");
    push_hex(L, d, 32);
    return 1;
}


/* HMAC of arguments (key, msg) at arg, arg + 1: one string of the digest's size, or nil, err. */
static int push_hmac(lua_State *L, const EVP_MD *md, int arg)
{
    size_t kn, n;
    const char *k = check_intlstring(L, arg, &kn);
    const char *s = luaL_checklstring(L, arg + 1, &n);
    unsigned char d[EVP_MAX_MD_SIZE];
    unsigned int dn;
    if (!HMAC(md, k, (int)kn, (const unsigned char *)s, n, d, &dn))
        return push_ssl_error(L, "crypto.openssl", 0, "HMAC");
    lua_pushlstring(L, (const char *)d, dn);
    return 1;
}


/***
 * HMAC (RFC 2104).
 * @function hmac
 * @tparam string alg "sha1", "sha256", "sha384" or "sha512"
 * @tparam string key
 * @tparam string msg
 * @return string of raw bytes (20, 32, 48 or 64), or nil, err ("crypto.openssl")
 */
static int l_crypto_hmac(lua_State *L)
{
    return push_hmac(L, check_md(L, 1, NULL), 2);
}


/***
 * HMAC-SHA256: hmac("sha256", key, msg).
 * @function hmac_sha256
 * @tparam string key
 * @tparam string msg
 * @return string 32 raw bytes, or nil, err ("crypto.openssl")
 */
static int l_crypto_hmac_sha256(lua_State *L)
{
    return push_hmac(L, EVP_sha256(), 1);
}


/***
 * PBKDF2 (RFC 8018) with an HMAC.
 * @function pbkdf2
 * @tparam string password
 * @tparam string salt
 * @tparam integer iterations 1..10000000
 * @tparam integer length bytes to derive, 1..1024
 * @tparam[opt="sha256"] string alg "sha1", "sha256", "sha384" or "sha512"
 * @return string of length raw bytes, or nil, err ("crypto.openssl")
 */
static int l_crypto_pbkdf2(lua_State *L)
{
    size_t pn, sn;
    const char *pass = check_intlstring(L, 1, &pn);
    const char *salt = check_intlstring(L, 2, &sn);
    lua_Integer iter = luaL_checkinteger(L, 3);
    luaL_argcheck(L, iter >= 1 && iter <= MAX_ITERATIONS, 3, "expected 1 <= iterations <= 10000000");
    lua_Integer len = luaL_checkinteger(L, 4);
    luaL_argcheck(L, len >= 1 && len <= MAX_DERIVED, 4, "expected 1 <= length <= 1024");
    const EVP_MD *md = check_md(L, 5, "sha256");
    luaL_Buffer b;
    unsigned char *out = (unsigned char *)luaL_buffinitsize(L, &b, (size_t)len);
    if (!PKCS5_PBKDF2_HMAC(pass, (int)pn, (const unsigned char *)salt, (int)sn, (int)iter, md, (int)len, out))
        return push_ssl_error(L, "crypto.openssl", 0, "PKCS5_PBKDF2_HMAC");
    luaL_pushresultsize(&b, (size_t)len);
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
    /* CRYPTO_memcmp needs equal lengths: compare the common prefix, fold in the mismatch. */
    int diff = CRYPTO_memcmp(a, b, an < bn ? an : bn);
    lua_pushboolean(L, (diff | (an != bn)) == 0);
    return 1;
}


/* ------------------------------------------------------------------------ */
/* base64                                                                   */
/* ------------------------------------------------------------------------ */

/* Stack: [... b] -> [... b]: append the padded base64 of s[0..n) to b. */
static void add_base64(luaL_Buffer *b, const unsigned char *s, size_t n)
{
    size_t outn = (n + 2) / 3 * 4;
    unsigned char *out = (unsigned char *)luaL_prepbuffsize(b, outn + 1);     /* + the NUL it writes */
    for (size_t i = 0; i < n; i += 3 * B64_GROUPS) {
        size_t k = n - i < 3 * B64_GROUPS ? n - i : 3 * B64_GROUPS;
        EVP_EncodeBlock(out + i / 3 * 4, s + i, (int)k);
    }
    luaL_addsize(b, outn);
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
    const unsigned char *s = (const unsigned char *)luaL_checklstring(L, 1, &n);
    luaL_argcheck(L, n <= ((size_t)-1 / 4) * 3 - 3, 1, "string too long");
    luaL_Buffer b;
    luaL_buffinit(L, &b);
    add_base64(&b, s, n);
    luaL_pushresult(&b);
    return 1;
}


/*
 * Decode data[0..n) (alphabet only, n % 4 != 1) into out, which holds n / 4 * 3 + 2 bytes.
 * EVP_DecodeBlock takes whole groups of 4: a 2- or 3-character tail is padded on the stack.
 * Returns the bytes written.
 */
static size_t decode_base64(unsigned char *out, const unsigned char *data, size_t n)
{
    size_t whole = n / 4 * 4, o = 0;
    for (size_t i = 0; i < whole; i += 4 * B64_GROUPS) {
        size_t k = whole - i < 4 * B64_GROUPS ? whole - i : 4 * B64_GROUPS;
        o += (size_t)EVP_DecodeBlock(out + o, data + i, (int)k);      /* cannot fail on checked input */
    }
    if (n > whole) {
        unsigned char tail[4] = {'=', '=', '=', '='}, bytes[3];
        memcpy(tail, data + whole, n - whole);
        EVP_DecodeBlock(bytes, tail, 4);
        memcpy(out + o, bytes, n - whole - 1);  /* 2 characters carry 1 byte, 3 carry 2 */
        o += n - whole - 1;
    }
    return o;
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
    /* Checked here, not left to OpenSSL, which skips whitespace and takes '=' anywhere.
     * strspn stops at the first byte outside the alphabet: at the latest s[data] ('=' or NUL). */
    size_t bad = strspn((const char *)s, B64_ALPHABET);
    if (bad < data)
        return forge_pusherror(L, "crypto.base64", 0, "invalid character at offset %d", (int)bad);
    luaL_Buffer b;
    unsigned char *out = (unsigned char *)luaL_buffinitsize(L, &b, data / 4 * 3 + 2);
    luaL_pushresultsize(&b, decode_base64(out, s, data));
    return 1;
}


/* ------------------------------------------------------------------------ */
/* SCRAM-SHA-256 verifiers                                                  */
/* ------------------------------------------------------------------------ */

/* StoredKey and ServerKey of RFC 5802 §3 from the password. Returns 0, or -1 naming the failed call. */
static int scram_keys(const char *pass, size_t pn, const unsigned char *salt, size_t sn, int iter,
                      unsigned char stored[32], unsigned char server[32], const char **failed)
{
    unsigned char salted[32], client[32];
    int rc = -1;
    *failed = "PKCS5_PBKDF2_HMAC";
    if (!PKCS5_PBKDF2_HMAC(pass, (int)pn, salt, (int)sn, iter, EVP_sha256(), 32, salted))
        goto out;
    *failed = "HMAC";
    if (!HMAC(EVP_sha256(), salted, 32, (const unsigned char *)"Client Key", 10, client, NULL) ||
        !HMAC(EVP_sha256(), salted, 32, (const unsigned char *)"Server Key", 10, server, NULL))
        goto out;
    *failed = "EVP_Digest";
    if (EVP_Digest(client, 32, stored, NULL, EVP_sha256(), NULL) == 1)
        rc = 0;
out:
    OPENSSL_cleanse(salted, sizeof salted);
    OPENSSL_cleanse(client, sizeof client);
    return rc;
}


/***
 * A PostgreSQL SCRAM-SHA-256 password verifier (RFC 5802, RFC 7677), for pg_authid.rolpassword
 * or `CREATE ROLE ... PASSWORD '<verifier>'`. PostgreSQL applies SASLprep to the password at
 * login; this does not, so give it ASCII passwords (crypto.password's are).
 * @function scram_sha256
 * @tparam string password
 * @tparam[opt] string salt raw salt bytes, 1..1024 (default 16 random bytes)
 * @tparam[opt=4096] integer iterations 1..10000000
 * @return string "SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>" (base64),
 *   or nil, err ("crypto.random", "crypto.openssl")
 */
static int l_crypto_scram_sha256(lua_State *L)
{
    size_t pn, sn = SCRAM_SALT;
    const char *pass = check_intlstring(L, 1, &pn);
    unsigned char rsalt[SCRAM_SALT];
    const unsigned char *salt = rsalt;
    if (lua_isnoneornil(L, 2)) {
        if (fill_random(rsalt, sizeof rsalt) < 0)
            return push_random_error(L);
    } else {
        salt = (const unsigned char *)luaL_checklstring(L, 2, &sn);
        luaL_argcheck(L, sn >= 1 && sn <= MAX_SALT, 2, "expected a salt of 1..1024 bytes");
    }
    lua_Integer iter = luaL_optinteger(L, 3, SCRAM_ITER);
    luaL_argcheck(L, iter >= 1 && iter <= MAX_ITERATIONS, 3, "expected 1 <= iterations <= 10000000");
    unsigned char stored[32], server[32];
    const char *failed;
    if (scram_keys(pass, pn, salt, sn, (int)iter, stored, server, &failed) < 0)
        return push_ssl_error(L, "crypto.openssl", 0, failed);
    char head[40];
    snprintf(head, sizeof head, "SCRAM-SHA-256$%d:", (int)iter);
    luaL_Buffer b;
    luaL_buffinit(L, &b);
    luaL_addstring(&b, head);
    add_base64(&b, salt, sn);
    luaL_addchar(&b, '$');
    add_base64(&b, stored, 32);
    luaL_addchar(&b, ':');
    add_base64(&b, server, 32);
    luaL_pushresult(&b);
    return 1;
}


/* ------------------------------------------------------------------------ */
/* authenticated encryption: AES-256-GCM                                    */
/* ------------------------------------------------------------------------ */

/* The 32-byte key at argument arg (raises on any other length). */
static const unsigned char *check_key(lua_State *L, int arg)
{
    size_t n;
    const char *k = luaL_checklstring(L, arg, &n);
    luaL_argcheck(L, n == AEAD_KEY, arg, "expected a 32-byte key");
    return (const unsigned char *)k;
}


/*
 * AES-256-GCM over in[0..n) into out (n bytes) with the associated data aad; enc != 0 seals
 * (writes the tag), else opens (checks it). No Lua calls: the context is freed on every path.
 * Returns 0; -1 on an OpenSSL failure (reason queued); -2 when the tag does not verify.
 */
static int gcm(int enc, const unsigned char *key, const unsigned char *nonce, const unsigned char *aad, size_t an,
               const unsigned char *in, size_t n, unsigned char *out, unsigned char *tag)
{
    EVP_CIPHER_CTX *c = EVP_CIPHER_CTX_new();
    int len, rc = -1;
    if (!c)
        return -1;
    if (EVP_CipherInit_ex(c, EVP_aes_256_gcm(), NULL, key, nonce, enc) != 1 ||
        (an > 0 && EVP_CipherUpdate(c, NULL, &len, aad, (int)an) != 1) ||
        EVP_CipherUpdate(c, out, &len, in, (int)n) != 1)
        goto out;
    if (enc) {
        if (EVP_CipherFinal_ex(c, out + len, &len) == 1 &&
            EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_GCM_GET_TAG, AEAD_TAG, tag) == 1)
            rc = 0;
    } else if (EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_GCM_SET_TAG, AEAD_TAG, tag) == 1) {
        rc = EVP_CipherFinal_ex(c, out + len, &len) == 1 ? 0 : -2;
        ERR_clear_error();                      /* a failed tag check queues nothing useful */
    }
out:
    EVP_CIPHER_CTX_free(c);
    return rc;
}


/***
 * Encrypt and authenticate with AES-256-GCM under a fresh random 96-bit nonce.
 * @function seal
 * @tparam string key 32 bytes
 * @tparam string plaintext
 * @tparam[opt=""] string aad associated data: authenticated, not stored (open needs the same)
 * @return string nonce (12) | ciphertext (#plaintext) | tag (16), or nil, err ("crypto.random",
 *   "crypto.openssl")
 */
static int l_crypto_seal(lua_State *L)
{
    const unsigned char *key = check_key(L, 1);
    size_t n, an;
    const char *pt = luaL_checklstring(L, 2, &n);
    const char *aad = luaL_optlstring(L, 3, "", &an);
    luaL_argcheck(L, n <= AEAD_MAX, 2, "string too long");
    luaL_argcheck(L, an <= INT_MAX, 3, "string too long");
    luaL_Buffer b;
    unsigned char *out = (unsigned char *)luaL_buffinitsize(L, &b, AEAD_NONCE + n + AEAD_TAG);
    if (fill_random(out, AEAD_NONCE) < 0)
        return push_random_error(L);
    if (gcm(1, key, out, (const unsigned char *)aad, an, (const unsigned char *)pt, n, out + AEAD_NONCE,
            out + AEAD_NONCE + n) < 0)
        return push_ssl_error(L, "crypto.openssl", 0, "AES-256-GCM");
    luaL_pushresultsize(&b, AEAD_NONCE + n + AEAD_TAG);
    return 1;
}


/***
 * Check and decrypt a blob made by seal.
 * @function open
 * @tparam string key 32 bytes
 * @tparam string blob
 * @tparam[opt=""] string aad the associated data it was sealed with
 * @return string plaintext, or nil, err ("crypto.open": too short, or the wrong key or aad or a
 *   changed blob, which GCM cannot tell apart; "crypto.openssl")
 */
static int l_crypto_open(lua_State *L)
{
    const unsigned char *key = check_key(L, 1);
    size_t bn, an;
    const unsigned char *blob = (const unsigned char *)luaL_checklstring(L, 2, &bn);
    const char *aad = luaL_optlstring(L, 3, "", &an);
    luaL_argcheck(L, bn <= INT_MAX, 2, "string too long");
    luaL_argcheck(L, an <= INT_MAX, 3, "string too long");
    if (bn < AEAD_NONCE + AEAD_TAG)
        return forge_pusherror(L, "crypto.open", 0, "sealed blob too short (%d bytes)", (int)bn);
    size_t n = bn - AEAD_NONCE - AEAD_TAG;
    unsigned char tag[AEAD_TAG];
    memcpy(tag, blob + AEAD_NONCE + n, AEAD_TAG);
    luaL_Buffer b;
    unsigned char *out = (unsigned char *)luaL_buffinitsize(L, &b, n);
    int rc = gcm(0, key, blob, (const unsigned char *)aad, an, blob + AEAD_NONCE, n, out, tag);
    if (rc == -2) {
        OPENSSL_cleanse(out, n);
        return forge_pusherror(L, "crypto.open", 0, "authentication failed: wrong key or associated data, or a changed blob");
    }
    if (rc < 0)
        return push_ssl_error(L, "crypto.openssl", 0, "AES-256-GCM");
    luaL_pushresultsize(&b, n);
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
        {"hmac", l_crypto_hmac},
        {"hmac_sha256", l_crypto_hmac_sha256},
        {"pbkdf2", l_crypto_pbkdf2},
        {"scram_sha256", l_crypto_scram_sha256},
        {"equal", l_crypto_equal},
        {"base64_encode", l_crypto_base64_encode},
        {"base64_decode", l_crypto_base64_decode},
        {"seal", l_crypto_seal},
        {"open", l_crypto_open},
        {NULL, NULL},
    };
    luaL_newlib(L, lib);
    forge_setmodinfo(L, "forge.crypto");
    return 1;
}
