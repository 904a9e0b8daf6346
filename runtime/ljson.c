/*
 * JSON pieces shared by the runtime primitives: lua-cjson decoding with limits, and the
 * string and number writers of the C encoders (see ljson.h).
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include "ljson.h"


/* Call cjson instance function name(arg) for its effect. Stack: [inst] -> [inst]. May raise. */
static void cjson_set(lua_State *L, const char *name, int is_bool, lua_Integer arg)
{
    lua_getfield(L, -1, name);
    if (is_bool)
        lua_pushboolean(L, (int)arg);
    else
        lua_pushinteger(L, arg);
    lua_call(L, 1, 0);
}


void forge_json_decoder(lua_State *L, const void *key, int max_depth)
{
    lua_getglobal(L, "require");
    lua_pushliteral(L, "cjson");
    lua_call(L, 1, 1);                                  /* [cjson] */
    lua_getfield(L, -1, "new");
    lua_call(L, 0, 1);                                  /* [cjson, inst] */
    cjson_set(L, "decode_max_depth", 0, max_depth);
    cjson_set(L, "decode_invalid_numbers", 1, 0);
    lua_getfield(L, -1, "decode");                      /* [cjson, inst, decode] */
    lua_rawsetp(L, LUA_REGISTRYINDEX, key);
    lua_pop(L, 2);
}


int forge_json_decode(lua_State *L, const void *key, const char *s, size_t n)
{
    lua_rawgetp(L, LUA_REGISTRYINDEX, key);
    lua_pushlstring(L, s, n);
    return lua_pcall(L, 1, 1, 0) == LUA_OK ? 0 : -1;
}


/* The escape of byte c in out; returns its length, or 0 when c stands for itself. */
static size_t escape(unsigned char c, char out[6])
{
    static const char hex[] = "0123456789abcdef";
    static const char shortform[] = {['"'] = '"', ['\\'] = '\\', ['\n'] = 'n', ['\r'] = 'r',
                                     ['\t'] = 't', ['\b'] = 'b', ['\f'] = 'f'};
    if (c < sizeof shortform && shortform[c]) {
        out[0] = '\\';
        out[1] = shortform[c];
        return 2;
    }
    if (c >= 0x20 && c != 0x7f)
        return 0;
    out[0] = '\\', out[1] = 'u', out[2] = '0', out[3] = '0';
    out[4] = hex[c >> 4];
    out[5] = hex[c & 15];
    return 6;
}


/* Bytes from s[i] on that need no escape (plain ASCII; with raw8, bytes >= 0x80 too). */
static size_t plain_run(const unsigned char *s, size_t i, size_t n, int raw8)
{
    size_t j = i;
    while (j < n && s[j] >= 0x20 && s[j] != 0x7f && s[j] != '"' && s[j] != '\\' && (s[j] < 0x80 || raw8))
        j++;
    return j - i;
}


int forge_json_string(forge_json_put put, void *ud, const char *str, size_t n, int flags)
{
    const unsigned char *s = (const unsigned char *)str;
    int raw8 = !(flags & FORGE_JSON_UTF8);
    if (put(ud, "\"", 1, 1) < 0)
        return -1;
    for (size_t i = 0; i < n;) {
        size_t run = plain_run(s, i, n, raw8);
        if (run) {
            if (put(ud, str + i, run, 0) < 0)
                return -1;
            i += run;
            continue;
        }
        char esc[6];
        const char *piece = esc;
        size_t len = escape(s[i], esc), adv = 1;
        if (len == 0) {                             /* a UTF-8 sequence (checked: raw8 is off) */
            adv = forge_utf8_len(s + i, n - i);
            piece = adv ? str + i : "\\ufffd";
            len = adv ? adv : 6;
            adv = adv ? adv : 1;
        }
        if (put(ud, piece, len, 1) < 0)
            return -1;
        i += adv;
    }
    return put(ud, "\"", 1, 1);
}


size_t forge_json_number(lua_State *L, int idx, char out[FORGE_JSON_NUMBER_MAX])
{
    if (lua_isinteger(L, idx))
        return (size_t)snprintf(out, FORGE_JSON_NUMBER_MAX, LUA_INTEGER_FMT, (LUAI_UACINT)lua_tointeger(L, idx));
    double d = (double)lua_tonumber(L, idx);
    if (!isfinite(d))
        return 0;
    int len = 0;
    for (int digits = 15; digits <= 17; digits++) {
        len = snprintf(out, FORGE_JSON_NUMBER_MAX, "%.*g", digits, d);
        if (strtod(out, NULL) == d)
            break;
    }
    return (size_t)len;
}
