/*
 * forge.bosh's readers of director and UAA answers: JSON bodies (lua-cjson, then the
 * module's own normalisation), the Location and Content-Range headers, task polling, JSON
 * result lines, status errors, through the module's whole Lua API. runtime/bosh.c is
 * compiled into this file with libcurl's transfer calls replaced by fake_curl.h and
 * nanosleep by a no-op (polls run at once): no network, nothing exposed by bosh.c.
 *
 * Input: one line of operations and options (fuzz/bosh.lua), then the answers in
 * fake_curl.h's format.
 */
#include <time.h>

#include "fake_curl.h"
#include "fuzz_lua.h"

static int fz_nanosleep(const struct timespec *req, struct timespec *rem)
{
    (void)req, (void)rem;
    return 0;
}
#define nanosleep fz_nanosleep

#include "../runtime/bosh.c"

static lua_State *L;

/* fuzz_last_body() -> the body of the answer served last (nil before the first). */
static int l_last_body(lua_State *S)
{
    if (fz_next == 0)
        return 0;
    const struct fz_answer *a = &fz_answers[fz_next - 1];
    lua_pushlstring(S, a->body, a->len);
    lua_pushinteger(S, a->status);
    return 2;
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc, (void)argv;
    L = fuzz_lua_new();
    luaL_requiref(L, "forge.bosh", luaopen_forge_bosh, 0);
    lua_pop(L, 1);
    lua_register(L, "fuzz_last_body", l_last_body);
    fuzz_lua_load(L, "bosh.lua");
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    return fuzz_lua_run_answers(L, data, size);
}
