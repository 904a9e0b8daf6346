/*
 * Small auxiliary helpers for the forge.* bindings: option-table checks, userdata classes.
 */
#include <string.h>

#include "forge/forge.h"

void forge_checkkeys(lua_State *L, int idx, const char *what, const char *const allowed[])
{
    idx = lua_absindex(L, idx);
    luaL_checktype(L, idx, LUA_TTABLE);
    lua_pushnil(L);
    while (lua_next(L, idx)) {
        lua_pop(L, 1);
        const char *key = lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1) : NULL;
        int known = 0;
        for (int i = 0; key && allowed[i]; i++)
            if (strcmp(key, allowed[i]) == 0)
                known = 1;
        if (!known)
            luaL_error(L, "%s: unknown option '%s'", what,
                       key ? key : luaL_typename(L, -1));
    }
}

lua_Integer forge_optintfield(lua_State *L, int idx, const char *key, lua_Integer def)
{
    lua_getfield(L, idx, key);
    lua_Integer v = def;
    if (!lua_isnil(L, -1)) {
        int isnum;
        v = lua_tointegerx(L, -1, &isnum);
        if (!isnum)
            luaL_error(L, "option '%s' must be an integer", key);
    }
    lua_pop(L, 1);
    return v;
}

/* The returned string stays valid while the options table holds it. */
lua_Number forge_optnumfield(lua_State *L, int idx, const char *key, lua_Number def)
{
    lua_getfield(L, idx, key);
    lua_Number v = def;
    if (!lua_isnil(L, -1)) {
        if (lua_type(L, -1) != LUA_TNUMBER)
            luaL_error(L, "option '%s' must be a number", key);
        v = lua_tonumber(L, -1);
    }
    lua_pop(L, 1);
    return v;
}

const char *forge_optstrfield(lua_State *L, int idx, const char *key, const char *def)
{
    lua_getfield(L, idx, key);
    const char *v = def;
    if (!lua_isnil(L, -1)) {
        if (lua_type(L, -1) != LUA_TSTRING)
            luaL_error(L, "option '%s' must be a string", key);
        v = lua_tostring(L, -1);
    }
    lua_pop(L, 1);
    return v;
}

int forge_optboolfield(lua_State *L, int idx, const char *key, int def)
{
    lua_getfield(L, idx, key);
    int v = lua_isnil(L, -1) ? def : lua_toboolean(L, -1);
    lua_pop(L, 1);
    return v;
}


void forge_newclass(lua_State *L, const char *name, const luaL_Reg *methods, const luaL_Reg *metamethods)
{
    if (luaL_newmetatable(L, name)) {                       /* [mt] */
        if (metamethods)
            luaL_setfuncs(L, metamethods, 0);
        if (methods) {
            int n = 0;
            while (methods[n].name)
                n++;
            luaL_checkversion(L);
            lua_createtable(L, 0, n);                       /* [mt, methods] */
            luaL_setfuncs(L, methods, 0);
            lua_setfield(L, -2, "__index");                 /* [mt] */
        }
    }
    lua_pop(L, 1);
}


/* Length of the valid UTF-8 sequence at s (1..4; RFC 3629: no overlongs, surrogates or > U+10FFFF), or 0. */
size_t forge_utf8_len(const unsigned char *s, size_t n)
{
    unsigned c = s[0];
    if (c < 0x80)
        return 1;
    size_t len;
    unsigned min;
    if (c >= 0xc2 && c <= 0xdf) { len = 2; min = 0x80; }
    else if (c >= 0xe0 && c <= 0xef) { len = 3; min = 0x800; }
    else if (c >= 0xf0 && c <= 0xf4) { len = 4; min = 0x10000; }
    else return 0;
    if (n < len)
        return 0;
    unsigned cp = c & (0x3f >> (len - 1));
    for (size_t i = 1; i < len; i++) {
        if ((s[i] & 0xc0) != 0x80)
            return 0;
        cp = cp << 6 | (s[i] & 0x3f);
    }
    if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff))
        return 0;
    return len;
}
