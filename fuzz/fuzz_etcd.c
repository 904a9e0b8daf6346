/*
 * forge.etcd's answer readers: everything that reads the answers lua-cjson decodes (kv
 * records, txn results, leases, auth tokens, error answers, the watch stream, whose
 * messages are checked inside curl's write callback), through the module's whole Lua API. runtime/etcd.c is compiled into this file
 * with libcurl's transfer calls replaced by fake_curl.h, which serves the answers parsed
 * from the input: no network, no static function exposed by etcd.c.
 *
 * Input: one line of operations and options (fuzz/etcd.lua), then the answers in
 * fake_curl.h's format. The first answer goes to etcd.open's probe (or the auth request).
 */
#include "fake_curl.h"
#include "fuzz_lua.h"

#include "../runtime/etcd.c"

static lua_State *L;

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc, (void)argv;
    L = fuzz_lua_new();
    luaL_requiref(L, "forge.etcd", luaopen_forge_etcd, 0);
    lua_pop(L, 1);
    fuzz_lua_load(L, "etcd.lua");
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    return fuzz_lua_run_answers(L, data, size);
}
