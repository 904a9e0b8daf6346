/*
 * For the harnesses that drive forge.sandbox from a check script (sandbox, sandbox_json):
 * sandbox.c compiled in, the harness state L with forge.sandbox, and the collection of the
 * sandbox state's garbage after each input. Include after fuzz_lua.h.
 */
#ifndef FORGE_FUZZ_SANDBOX_IN_H
#define FORGE_FUZZ_SANDBOX_IN_H

/* compiled in, to reach the sandbox's own state (collected after every input below) */
#include "../runtime/sandbox.c"

static lua_State *L;

/*
 * Collect the sandbox state's garbage too (the check script keeps its sandbox in the global
 * FUZZ_SANDBOX): else nearly every input ends with more mallocs than frees, and libFuzzer
 * runs its slow leak scan after each.
 */
static void fuzz_collect_sandbox(lua_State *S)
{
    lua_getglobal(S, "FUZZ_SANDBOX");
    struct sbox *box = luaL_testudata(S, -1, FORGE_SANDBOX_MT);
    if (box && box->sb && box->sb->S)
        lua_gc(box->sb->S, LUA_GCCOLLECT);
    lua_pop(S, 1);
}

/* L with forge.sandbox and the check script fuzz/<file> loaded. */
static void fuzz_sandbox_init(const char *file)
{
    L = fuzz_lua_new();
    luaL_requiref(L, "forge.sandbox", luaopen_forge_sandbox, 0);
    lua_pop(L, 1);
    fuzz_lua_load(L, file);
}

#endif
