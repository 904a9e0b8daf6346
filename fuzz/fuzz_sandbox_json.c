/*
 * forge.json.decode, the JSON decoder a service script gets inside its sandbox
 * (runtime/sandbox.c, no malloc, 64 levels), its encoder on what it decoded, and the copy
 * of the decoded value out of the sandbox. Checks in fuzz/sandbox_json.lua.
 */
#include "fuzz_lua.h"

#include "sandbox_in.h"

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc, (void)argv;
    fuzz_sandbox_init("sandbox_json.lua");
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
