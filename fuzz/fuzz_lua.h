/*
 * Shared by the fuzz harnesses (fuzz/README.md): one lua_State per process, the
 * check script each harness embeds, Lua line coverage for libFuzzer, and the rule
 * that any raise out of the code under test is a finding.
 *
 * Lua coverage: the C code under test is compiled with -fsanitize=fuzzer, but the
 * Lua VM (liblua5.4.so) and the broker's Lua code are not instrumented. A line hook
 * turns every (source, previous line -> line) edge into a bump of one of libFuzzer's
 * extra counters, so inputs that reach new Lua lines are kept like new C edges.
 */
#ifndef FORGE_FUZZ_LUA_H
#define FORGE_FUZZ_LUA_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>

#ifndef FUZZ_ROOT
#define FUZZ_ROOT "."
#endif

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerInitialize(int *argc, char ***argv);

/*
 * Sanitizer defaults (UBSAN_OPTIONS / ASAN_OPTIONS in the environment still win): undefined
 * behaviour stops the run like a crash, except the open bugs listed in fuzz/ubsan.supp.
 */
const char *__ubsan_default_options(void);
const char *__ubsan_default_options(void)
{
    return "halt_on_error=1:print_stacktrace=1:suppressions=" FUZZ_ROOT "/fuzz/ubsan.supp";
}
const char *__asan_default_options(void);
const char *__asan_default_options(void)
{
    return "abort_on_error=0:detect_stack_use_after_return=1";
}

#define FUZZ_LUA_COUNTERS 65536
__attribute__((used, section("__libfuzzer_extra_counters")))
static uint8_t fuzz_lua_counters[FUZZ_LUA_COUNTERS];
static uintptr_t fuzz_lua_prev;

static void fuzz_line_hook(lua_State *L, lua_Debug *ar)
{
    if (ar->event != LUA_HOOKLINE || !lua_getinfo(L, "S", ar))
        return;
    uintptr_t cur = ((uintptr_t)ar->source * 0x9E3779B1u) ^ ((uintptr_t)ar->currentline * 0x85EBCA6Bu);
    size_t slot = (size_t)((cur ^ (fuzz_lua_prev >> 1)) % FUZZ_LUA_COUNTERS);
    if (fuzz_lua_counters[slot] < 255)
        fuzz_lua_counters[slot]++;
    fuzz_lua_prev = cur;
}

/* Turn Lua line coverage on for L (and every coroutine created from it after this). */
static void fuzz_lua_coverage(lua_State *L)
{
    lua_sethook(L, fuzz_line_hook, LUA_MASKLINE, 0);
}

/* The project root: $FORGE_ROOT, else the directory `make fuzz` was built from. */
static const char *fuzz_root(void)
{
    const char *r = getenv("FORGE_ROOT");
    return r && *r ? r : FUZZ_ROOT;
}

/* A raise out of the code under test, or a failed check: print it and abort (a crash). */
__attribute__((noreturn)) static void fuzz_die(lua_State *L, const char *what)
{
    const char *msg = lua_tostring(L, -1);
    fprintf(stderr, "\n==fuzz== %s: %s\n", what, msg ? msg : "(non-string error)");
    fflush(stderr);
    abort();
}

static int fuzz_traceback(lua_State *L)
{
    const char *msg = lua_tostring(L, 1);
    luaL_traceback(L, L, msg ? msg : "(non-string error)", 1);
    return 1;
}

/*
 * A new state with the standard libraries, package.path = <root>/scripts/?.lua and
 * package.cpath = the system Lua 5.4 C modules (lua-cjson); FUZZ_ROOT is a global.
 */
static lua_State *fuzz_lua_new(void)
{
    lua_State *L = luaL_newstate();
    if (!L)
        abort();
    luaL_openlibs(L);
    lua_getglobal(L, "package");
    lua_pushfstring(L, "%s/scripts/?.lua;%s/scripts/?/init.lua;%s/?.lua", fuzz_root(), fuzz_root(), fuzz_root());
    lua_setfield(L, -2, "path");
    lua_pushliteral(L, "/usr/lib/x86_64-linux-gnu/lua/5.4/?.so;/usr/local/lib/lua/5.4/?.so;"
                       "/usr/lib/lua/5.4/?.so");
    lua_setfield(L, -2, "cpath");
    lua_pop(L, 1);
    lua_pushstring(L, fuzz_root());
    lua_setglobal(L, "FUZZ_ROOT");
    return L;
}

/*
 * Run the harness's check script <root>/fuzz/<file> (after the harness has preloaded its
 * C modules): it must return the function each input is given to, kept in the registry.
 */
static void fuzz_lua_load(lua_State *L, const char *file)
{
    lua_pushcfunction(L, fuzz_traceback);
    lua_pushfstring(L, "%s/fuzz/%s", fuzz_root(), file);
    if (luaL_loadfile(L, lua_tostring(L, -1)) != LUA_OK)
        fuzz_die(L, "check script does not load (set FORGE_ROOT to the source tree)");
    lua_remove(L, -2);
    if (lua_pcall(L, 0, 1, -2) != LUA_OK)
        fuzz_die(L, "check script failed");
    if (!lua_isfunction(L, -1)) {
        lua_pushliteral(L, "the check script must return a function");
        fuzz_die(L, file);
    }
    lua_setfield(L, LUA_REGISTRYINDEX, "fuzz.check");
    lua_pop(L, 1);
}

/* Call the check function with the input (and nargs extra values already pushed). */
static void fuzz_lua_run(lua_State *L, const uint8_t *data, size_t size, int nargs)
{
    int base = lua_gettop(L) - nargs;
    lua_pushcfunction(L, fuzz_traceback);
    int handler = lua_gettop(L);
    lua_getfield(L, LUA_REGISTRYINDEX, "fuzz.check");
    lua_pushlstring(L, (const char *)data, size);
    for (int i = 1; i <= nargs; i++)
        lua_pushvalue(L, base + i);
    if (lua_pcall(L, 1 + nargs, 0, handler) != LUA_OK)
        fuzz_die(L, "raise or failed check");
    lua_settop(L, base);
    /* Free this input's garbage now: libFuzzer runs a (slow) leak scan after every input
     * that malloc'd more than it freed, and would otherwise do so for nearly every one. */
    lua_gc(L, LUA_GCCOLLECT);
}

/*
 * The whole of a harness whose check is fuzz/<file> alone, for inputs up to `max` bytes; the
 * script's line coverage guides the fuzzer.
 */
#define FUZZ_LUA_SCRIPT_HARNESS(file, max)                                  \
    static lua_State *L;                                                    \
    int LLVMFuzzerInitialize(int *argc, char ***argv)                       \
    {                                                                       \
        (void)argc, (void)argv;                                             \
        L = fuzz_lua_new();                                                 \
        fuzz_lua_load(L, file);                                             \
        fuzz_lua_coverage(L);                                               \
        return 0;                                                           \
    }                                                                       \
    int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)            \
    {                                                                       \
        if (size > (max))                                                   \
            return -1;                                                      \
        fuzz_lua_run(L, data, size, 0);                                     \
        return 0;                                                           \
    }

#ifdef FORGE_FUZZ_FAKE_CURL_H
/* Input "<operation line>\n<answers>": queue the answers (fake_curl.h), run the check on the
   operation line. For the etcd and bosh harnesses. */
static int fuzz_lua_run_answers(lua_State *L, const uint8_t *data, size_t size)
{
    if (size > 262144)
        return -1;
    const char *s = (const char *)data;
    const char *nl = memchr(s, '\n', size);
    size_t oplen = nl ? (size_t)(nl - s) : size;
    fz_parse_answers(nl ? nl + 1 : s + size, nl ? size - oplen - 1 : 0);
    fuzz_lua_run(L, data, oplen, 0);
    return 0;
}
#endif

#endif
