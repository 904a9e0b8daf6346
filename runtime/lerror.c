/*
 * forge.error — the error value every primitive returns on operational failure.
 *
 * An error is a plain table {code=, message=, retryable=} with the "forge.error"
 * metatable, whose __tostring gives "code: message" so lua.c-style message
 * handlers and log lines print it readably.
 */
#include <stdarg.h>
#include <string.h>

#include "forge/forge.h"

/* Stack: [err] -> [err, "code: message"] */
static int l_error_tostring(lua_State *L)
{
    lua_getfield(L, 1, "code");
    lua_getfield(L, 1, "message");
    lua_pushfstring(L, "%s: %s", luaL_optstring(L, -2, "error"), luaL_optstring(L, -1, "?"));
    return 1;
}

static void push_error_mt(lua_State *L)
{
    if (luaL_newmetatable(L, FORGE_ERROR_MT)) {
        lua_pushcfunction(L, l_error_tostring);
        lua_setfield(L, -2, "__tostring");
    }
}

static void push_error_table(lua_State *L, const char *code, int retryable, const char *fmt, va_list ap)
{
    lua_createtable(L, 0, 3);
    lua_pushstring(L, code);
    lua_setfield(L, -2, "code");
    lua_pushvfstring(L, fmt, ap);
    lua_setfield(L, -2, "message");
    lua_pushboolean(L, retryable);
    lua_setfield(L, -2, "retryable");
    push_error_mt(L);
    lua_setmetatable(L, -2);
}

void forge_newerror(lua_State *L, const char *code, int retryable, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    push_error_table(L, code, retryable, fmt, ap);
    va_end(ap);
}

int forge_pusherror(lua_State *L, const char *code, int retryable, const char *fmt, ...)
{
    va_list ap;
    lua_pushnil(L);
    va_start(ap, fmt);
    push_error_table(L, code, retryable, fmt, ap);
    va_end(ap);
    return 2;
}

/***
 * error.new(code, message [, retryable [, fields]]) -> err
 * Build an error value from Lua with the same shape and metatable as C errors.
 */
static int l_error_new(lua_State *L)
{
    const char *code = luaL_checkstring(L, 1);
    const char *message = luaL_checkstring(L, 2);
    int retryable = lua_toboolean(L, 3);
    if (!lua_isnoneornil(L, 4))
        luaL_checktype(L, 4, LUA_TTABLE);
    forge_newerror(L, code, retryable, "%s", message);
    if (lua_istable(L, 4)) {            /* copy extra fields (status, path, ...) */
        lua_pushnil(L);
        while (lua_next(L, 4)) {
            lua_pushvalue(L, -2);
            lua_insert(L, -2);
            lua_settable(L, -4);
        }
    }
    return 1;
}

/***
 * error.is(v) -> boolean: whether v is a forge error value.
 */
static int l_error_is(lua_State *L)
{
    int is = 0;
    if (lua_getmetatable(L, 1)) {
        luaL_getmetatable(L, FORGE_ERROR_MT);
        is = lua_rawequal(L, -1, -2);
    }
    lua_pushboolean(L, is);
    return 1;
}

void forge_setmodinfo(lua_State *L, const char *name)
{
    lua_pushstring(L, name);
    lua_setfield(L, -2, "_NAME");
    lua_pushliteral(L, FORGE_VERSION);
    lua_setfield(L, -2, "_VERSION");
}

int luaopen_forge_error(lua_State *L)
{
    static const luaL_Reg lib[] = {
        {"new", l_error_new},
        {"is", l_error_is},
        {NULL, NULL},
    };
    push_error_mt(L);
    lua_pop(L, 1);
    luaL_newlib(L, lib);
    forge_setmodinfo(L, "forge.error");
    return 1;
}
