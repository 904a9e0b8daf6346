/*
 * forge.sandbox's value copy between the broker's state and a sandbox: sb:call copies the
 * arguments in and the results out (nil, booleans, numbers, strings, tables, json null;
 * functions and other values dropped; at most 64 levels, no cycles, 16 MiB estimated).
 * The input is a small bytecode that builds the broker-side value (build_value below):
 * nesting, shared subtables, cycles, every scalar, functions, userdata, threads. The
 * first byte picks the service function (fuzz/sandbox_service.lua); fuzz/sandbox.lua
 * predicts the outcome of each copy and checks the value that comes back.
 */
#include <math.h>

#include "fuzz_lua.h"

#include "sandbox_in.h"

#define FZ_STACK 48

static int fz_dummy(lua_State *S)
{
    (void)S;
    return 0;
}

/*
 * Build one value from p[0, n) on L. Opcodes (low 4 bits of a byte):
 *  0 nil  1 boolean(next byte & 1)  2 integer(next 8 bytes)  3 float(next 8 bytes)
 *  4 small integer(next byte - 128)  5 string(length byte, bytes)  6 new table
 *  7 t[k] = v (stack: t k v)  8 append (stack: t v)  9 dup(next byte: how deep)
 *  10 json null  11 function  12 userdata  13 thread  14 pop  15 swap
 * Stack: [...] -> [..., value] (the top of the work stack, nil if empty).
 */
static void build_value(lua_State *S, const uint8_t *p, size_t n)
{
    int base = lua_gettop(S);
    luaL_checkstack(S, FZ_STACK + 8, "fuzz");
    size_t i = 0;
    while (i < n) {
        uint8_t op = p[i++] & 15;
        int d = lua_gettop(S) - base;
        if (d >= FZ_STACK && op <= 6)
            continue;
        switch (op) {
        case 0: lua_pushnil(S); break;
        case 1: lua_pushboolean(S, i < n ? p[i++] & 1 : 0); break;
        case 2: case 3: {
            unsigned char b[8] = {0};
            size_t k = n - i < 8 ? n - i : 8;
            memcpy(b, p + i, k);
            i += k;
            if (op == 2) {
                int64_t v;
                memcpy(&v, b, 8);
                lua_pushinteger(S, (lua_Integer)v);
            } else {
                double v;
                memcpy(&v, b, 8);
                lua_pushnumber(S, v);
            }
            break;
        }
        case 4: lua_pushinteger(S, i < n ? (lua_Integer)p[i++] - 128 : 0); break;
        case 5: {
            size_t len = i < n ? p[i++] : 0;
            if (len > n - i)
                len = n - i;
            lua_pushlstring(S, (const char *)p + i, len);
            i += len;
            break;
        }
        case 6: lua_newtable(S); break;
        case 7:
            if (d >= 3 && lua_istable(S, -3)) {
                int kt = lua_type(S, -2);
                int bad = kt == LUA_TNIL || (kt == LUA_TNUMBER && !lua_isinteger(S, -2) && isnan(lua_tonumber(S, -2)));
                if (bad)
                    lua_pop(S, 2);
                else
                    lua_rawset(S, -3);
            }
            break;
        case 8:
            if (d >= 2 && lua_istable(S, -2))
                lua_rawseti(S, -2, (lua_Integer)lua_rawlen(S, -2) + 1);
            break;
        case 9:
            if (d >= 1 && d < FZ_STACK) {
                int k = i < n ? p[i++] % d : 0;
                lua_pushvalue(S, -1 - k);
            }
            break;
        case 10: if (d < FZ_STACK) lua_pushlightuserdata(S, NULL); break;
        case 11: if (d < FZ_STACK) lua_pushcfunction(S, fz_dummy); break;
        case 12: if (d < FZ_STACK) lua_newuserdatauv(S, 8, 0); break;
        case 13: if (d < FZ_STACK) lua_newthread(S); break;
        case 14: if (d >= 1) lua_pop(S, 1); break;
        case 15: if (d >= 2) lua_rotate(S, -2, 1); break;
        }
    }
    if (lua_gettop(S) == base)
        lua_pushnil(S);
    if (lua_gettop(S) > base + 1)
        lua_replace(S, base + 1);       /* the top value, in the first slot */
    lua_settop(S, base + 1);
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc, (void)argv;
    fuzz_sandbox_init("sandbox.lua");
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size > 16384)
        return -1;
    build_value(L, size ? data + 1 : data, size ? size - 1 : 0);
    fuzz_lua_run(L, data, size > 0 ? 1 : 0, 1);
    fuzz_collect_sandbox(L);
    return 0;
}
