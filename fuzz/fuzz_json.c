/*
 * The broker's JSON decoding with its limits (forge.util.json_decode: lua-cjson in strict
 * mode, 64 levels, integral numbers as integers, no NaN/Infinity, UTF-8 only), and the
 * encode -> decode round trip the store relies on. Checks in fuzz/json.lua.
 */
#include "fuzz_lua.h"

static lua_State *L;

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc, (void)argv;
    L = fuzz_lua_new();
    fuzz_lua_load(L, "json.lua");
    fuzz_lua_coverage(L);
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size > 65536)
        return -1;
    fuzz_lua_run(L, data, size, 0);
    return 0;
}
