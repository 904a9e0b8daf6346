/*
 * The broker's request parsing in Lua (scripts/forge/request.lua, util.lua): the request
 * target (path segments, query) and the body (JSON, urlencoded and multipart forms).
 * Input: "<request target>\n<content-type>\n<body>". Checks in fuzz/request.lua; Lua line
 * coverage guides the fuzzer (fuzz_lua.h).
 */
#include "fuzz_lua.h"

static lua_State *L;

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc, (void)argv;
    L = fuzz_lua_new();
    fuzz_lua_load(L, "request.lua");
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
