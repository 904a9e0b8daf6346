/*
 * forge.json.decode, the JSON decoder a service script gets inside its sandbox
 * (runtime/sandbox.c, no malloc, 64 levels), its encoder on what it decoded, and the copy
 * of the decoded value out of the sandbox. Checks in fuzz/sandbox_json.lua.
 */
#include "fuzz_lua.h"

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

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc, (void)argv;
    L = fuzz_lua_new();
    luaL_requiref(L, "forge.sandbox", luaopen_forge_sandbox, 0);
    lua_pop(L, 1);
    fuzz_lua_load(L, "sandbox_json.lua");
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size > 65536)
        return -1;
    fuzz_lua_run(L, data, size, 0);
    fuzz_collect_sandbox(L);
    return 0;
}
