/*
 * forge.yaml: decode (then encode and decode again: the same value), and merge of two
 * documents (the input split at its first NUL byte) with every operator, through the
 * module's Lua API. Checks in fuzz/yaml.lua.
 */
#include "fuzz_lua.h"

int luaopen_forge_yaml(lua_State *L);

static lua_State *L;

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc, (void)argv;
    L = fuzz_lua_new();
    luaL_requiref(L, "forge.yaml", luaopen_forge_yaml, 0);
    lua_pop(L, 1);
    fuzz_lua_load(L, "yaml.lua");
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size > 65536)
        return -1;                      /* not kept in the corpus */
    fuzz_lua_run(L, data, size, 0);
    return 0;
}
