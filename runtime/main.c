/*
 * forge — the Service Forge binary.
 *
 * Thin by design: it creates the main Lua state, registers the built-in forge.* primitives,
 * points package.path at the shipped Lua library (scripts/forge) and hands the command line
 * to forge.cli, where every command lives.
 *
 *   forge serve | check | render | new | install | version | help   (see forge.cli)
 *   forge lua SCRIPT [ARGS...]    run a Lua script in this host (specs and tools)
 */
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <lualib.h>

#include "forge/forge.h"

#ifndef FORGE_DATADIR
#define FORGE_DATADIR "/usr/local/share/forge"
#endif

static int is_file(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0 && S_ISREG(st.st_mode);
}

/*
 * Where the shipped Lua library lives: $FORGE_SCRIPTS, else the source tree next to a
 * build/bin/forge binary, else the installed data directory. Writes into buf (PATH_MAX).
 */
static void find_scripts_dir(char *buf)
{
    const char *env = getenv("FORGE_SCRIPTS");
    if (env && *env) {
        snprintf(buf, PATH_MAX, "%s", env);
        return;
    }
    char exe[PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
    if (n > 0) {
        exe[n] = '\0';
        char *slash = strrchr(exe, '/');
        if (slash) {
            *slash = '\0';
            char probe[PATH_MAX + 64];
            snprintf(probe, sizeof probe, "%s/../../scripts/forge/cli.lua", exe);
            if (is_file(probe)) {
                snprintf(buf, PATH_MAX, "%.*s/../../scripts", PATH_MAX - 20, exe);
                return;
            }
        }
    }
    snprintf(buf, PATH_MAX, "%s/scripts", FORGE_DATADIR);
}

/* Prepend the scripts dir to package.path. Stack: [] -> [] */
static void set_paths(lua_State *L, const char *scripts)
{
    lua_getglobal(L, "package");
    lua_getfield(L, -1, "path");
    lua_pushfstring(L, "%s/?.lua;%s/?/init.lua;%s", scripts, scripts, lua_tostring(L, -1));
    lua_setfield(L, -3, "path");
    lua_pop(L, 2);
}

/* Message handler: error value -> string with traceback. */
static int traceback_handler(lua_State *L)
{
    const char *msg = luaL_tolstring(L, 1, NULL);
    luaL_traceback(L, L, msg, 1);
    return 1;
}

/* Push arg table {[0]=argv[0], argv[first..]} as the Lua interpreter does. */
static void push_args(lua_State *L, int argc, char **argv, int first)
{
    lua_createtable(L, argc - first, 1);
    lua_pushstring(L, argv[0]);
    lua_rawseti(L, -2, 0);
    for (int i = first; i < argc; i++) {
        lua_pushstring(L, argv[i]);
        lua_rawseti(L, -2, i - first + 1);
    }
}

/* `forge lua SCRIPT ARGS...`: run a script with arg set, like lua5.4 does. */
static int run_script(lua_State *L, int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: forge lua SCRIPT [ARGS...]\n");
        return 2;
    }
    push_args(L, argc, argv, 3);
    lua_setglobal(L, "arg");
    lua_pushcfunction(L, traceback_handler);
    if (luaL_loadfile(L, argv[2]) != LUA_OK || lua_pcall(L, 0, 0, 1) != LUA_OK) {
        fprintf(stderr, "forge: %s\n", lua_tostring(L, -1));
        return 1;
    }
    return 0;
}

/* Everything else: forge.cli.main(args) -> exit status. */
static int run_cli(lua_State *L, int argc, char **argv, const char *scripts)
{
    lua_pushcfunction(L, traceback_handler);
    lua_getglobal(L, "require");
    lua_pushliteral(L, "forge.cli");
    if (lua_pcall(L, 1, 1, 1) != LUA_OK) {
        fprintf(stderr, "forge: cannot load the Lua library from %s:\n%s\n", scripts, lua_tostring(L, -1));
        return 1;
    }
    lua_getfield(L, -1, "main");
    push_args(L, argc, argv, 1);
    if (lua_pcall(L, 1, 1, 1) != LUA_OK) {
        fprintf(stderr, "forge: %s\n", lua_tostring(L, -1));
        return 1;
    }
    return (int)luaL_optinteger(L, -1, 0);
}

int main(int argc, char **argv)
{
    umask(077);   /* everything the broker writes (store, configs with secrets, logs) is private */
    lua_State *L = luaL_newstate();
    if (!L) {
        fprintf(stderr, "forge: out of memory\n");
        return 1;
    }
    luaL_openlibs(L);
    forge_preload(L);
    char scripts[PATH_MAX];
    find_scripts_dir(scripts);
    set_paths(L, scripts);
    int status = (argc >= 2 && strcmp(argv[1], "lua") == 0) ? run_script(L, argc, argv)
                                                             : run_cli(L, argc, argv, scripts);
    lua_close(L);
    return status;
}
