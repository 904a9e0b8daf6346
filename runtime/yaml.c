/*
 * forge.yaml — YAML decode/encode on libyaml, and a spruce-compatible merge engine.
 *
 *   yaml.decode(text [, name])     -> value | nil, err
 *   yaml.encode(value)             -> text | nil, err
 *   yaml.merge({doc, ...} [, opts])-> value | nil, err
 *   yaml.kind(t)                   -> "map" | "seq" | nil
 *   yaml.map([t]), yaml.seq([t])   -> t, marked as a map / a sequence
 *   yaml.null                      -> the YAML null sentinel
 *
 * Errors are forge.error tables {code, message, file, line, path, errors, spruce}.
 * This file is the Lua API; the implementation is in runtime/yaml/, linked into
 * the same module:
 *   core.c   nodes, arena, context, errors, YAML 1.1 scalar resolution
 *   io.c     libyaml loader, node <-> Lua, emitter
 *   merge.c  document merge (maps, array modes and operators, marks)
 *   eval.c   operator parsing, dependency order and evaluation, prune, cherry-pick
 * with one internal header, yaml_int.h.
 * See docs/yaml.md.
 */
#include <string.h>

#include "yaml/yaml_int.h"

/* ------------------------------------------------------------------------- */
/* protected runner and the error value                                       */
/* ------------------------------------------------------------------------- */

/* Sort error records (in the table at idx) by path, keeping insertion order on ties. */
static void sort_errors(lua_State *L, int idx, int n)
{
    for (int i = 2; i <= n; i++) {
        for (int j = i; j > 1; j--) {
            lua_rawgeti(L, idx, j - 1);
            lua_rawgeti(L, idx, j);
            lua_getfield(L, -2, "path");
            lua_getfield(L, -2, "path");
            const char *a = luaL_optstring(L, -2, "");
            const char *b = luaL_optstring(L, -1, "");
            int swap = strcmp(a, b) > 0;
            lua_pop(L, 2);
            if (!swap) {
                lua_pop(L, 2);
                break;
            }
            lua_rawseti(L, idx, j - 1);
            lua_rawseti(L, idx, j);
        }
    }
}

/*
 * Turn the error records at errtab into the returned error value.
 * Stack: [...] -> [..., nil, err]
 */
static int push_error_value(lua_State *L, int errtab, int total)
{
    int n = (int)lua_rawlen(L, errtab);
    if (n == 0) {
        lua_pushnil(L);
        lua_createtable(L, 0, 0);
        lua_rawseti(L, errtab, 1);
        n = 1;
    }
    sort_errors(L, errtab, n);
    luaL_Buffer msg;
    /* build the per-record message and spruce lines */
    for (int i = 1; i <= n; i++) {
        lua_rawgeti(L, errtab, i);
        int r = lua_gettop(L);
        lua_getfield(L, r, "file");
        lua_getfield(L, r, "line");
        lua_getfield(L, r, "path");
        lua_getfield(L, r, "op");
        lua_getfield(L, r, "detail");
        const char *file = lua_tostring(L, r + 1);
        lua_Integer line = lua_tointeger(L, r + 2);
        const char *path = lua_tostring(L, r + 3);
        const char *op = lua_tostring(L, r + 4);
        const char *detail = luaL_optstring(L, r + 5, "error");
        luaL_buffinit(L, &msg);
        if (file && line > 0) {
            lua_pushfstring(L, "%s:%I: ", file, line);
            luaL_addvalue(&msg);
        } else if (file) {
            lua_pushfstring(L, "%s: ", file);
            luaL_addvalue(&msg);
        }
        if (path) {
            lua_pushfstring(L, "%s: ", *path ? path : "$");
            luaL_addvalue(&msg);
        }
        if (op) {
            lua_pushfstring(L, "%s \xE2\x80\x94 ", op);
            luaL_addvalue(&msg);
        }
        luaL_addstring(&msg, detail);
        luaL_pushresult(&msg);
        lua_setfield(L, r, "message");
        if (path)
            lua_pushfstring(L, "$%s%s: %s", *path ? "." : "", path, detail);
        else
            lua_pushstring(L, detail);
        lua_setfield(L, r, "spruce");
        lua_settop(L, r - 1);
    }
    /* top-level */
    lua_rawgeti(L, errtab, 1);
    int first = lua_gettop(L);
    lua_getfield(L, first, "code");
    forge_newerror(L, luaL_optstring(L, -1, "yaml.error"), 0, "%s", "");
    lua_remove(L, -2);
    int err = lua_gettop(L);
    const char *fields[] = {"file", "line", "path"};
    for (int i = 0; i < 3; i++) {
        lua_getfield(L, first, fields[i]);
        lua_setfield(L, err, fields[i]);
    }
    /* message: accumulate with lua_concat (no luaL_Buffer while the stack moves) */
    if (n > 1 || total > n)
        lua_pushfstring(L, "%d errors detected:", total);
    else
        lua_pushliteral(L, "");
    for (int i = 1; i <= n; i++) {
        lua_pushstring(L, (n > 1 || total > n) ? "\n - " : "");
        lua_rawgeti(L, errtab, i);
        lua_getfield(L, -1, "message");
        lua_remove(L, -2);
        lua_concat(L, 3);
    }
    if (total > n) {
        lua_pushfstring(L, "\n (and %d more)", total - n);
        lua_concat(L, 2);
    }
    lua_setfield(L, err, "message");
    lua_pushfstring(L, "%d error(s) detected:", total);
    for (int i = 1; i <= n; i++) {
        lua_pushliteral(L, "\n - ");
        lua_rawgeti(L, errtab, i);
        lua_getfield(L, -1, "spruce");
        lua_remove(L, -2);
        lua_concat(L, 3);
    }
    lua_setfield(L, err, "spruce");
    lua_pushvalue(L, errtab);
    lua_setfield(L, err, "errors");
    lua_remove(L, first);
    lua_pushnil(L);
    lua_insert(L, -2);
    return 2;
}

/*
 * Run `inner` protected with (ctx, errtab, args 1..nargs of the caller).
 * On success its one result is returned; an operational failure gives nil, err;
 * anything else (misuse, out of memory) is re-raised after the context is freed.
 */
static int yrun(lua_State *L, lua_CFunction inner, int nargs)
{
    lua_settop(L, nargs);
    yctx *c = fy_ctx_new(L);
    lua_newtable(L);
    int errtab = lua_gettop(L);
    lua_pushcfunction(L, inner);
    lua_pushlightuserdata(L, c);
    lua_pushvalue(L, errtab);
    for (int i = 1; i <= nargs; i++)
        lua_pushvalue(L, i);
    int st = lua_pcall(L, 2 + nargs, 1, 0);
    int total = c->nerrors;
    fy_ctx_release(c);
    if (st == LUA_OK)
        return 1;
    if (lua_touserdata(L, -1) == &fy_sentinel) {
        lua_pop(L, 1);
        return push_error_value(L, errtab, total);
    }
    return lua_error(L);
}

static yctx *inner_ctx(lua_State *L)
{
    yctx *c = lua_touserdata(L, 1);
    c->L = L;
    c->errtab = 2;
    return c;
}

/* ------------------------------------------------------------------------- */
/* decode / encode                                                            */
/* ------------------------------------------------------------------------- */

/* Stack: [ctx, errtab, text, name] -> [..., value] */
static int inner_decode(lua_State *L)
{
    yctx *c = inner_ctx(L);
    size_t len;
    const char *text = lua_tolstring(L, 3, &len);
    const char *name = lua_tostring(L, 4);
    unsigned short file = fy_ctx_addfile(c, name ? name : "<string>");
    ynode *root = fy_load_document(c, text, len, file);
    yidx x = fy_push_refs(L);
    if (!root)
        lua_pushvalue(L, x.null);
    else
        fy_push_node(c, root, x);
    return 1;
}

/***
 * yaml.decode(text [, name]) -> value | nil, err
 * Parse one YAML document with YAML 1.1 scalar typing (as spruce and BOSH read it),
 * anchors/aliases expanded (capped), `<<` merge keys applied. Maps and sequences
 * come back as tables whose kind and key order yaml.kind / yaml.encode remember;
 * null is yaml.null. An empty document gives yaml.null. `name` labels errors.
 */
static int l_decode(lua_State *L)
{
    luaL_checkstring(L, 1);
    luaL_optstring(L, 2, NULL);
    return yrun(L, inner_decode, 2);
}

/* Stack: [ctx, errtab, value] -> [..., text] */
static int inner_encode(lua_State *L)
{
    yctx *c = inner_ctx(L);
    yidx x = fy_push_refs(L);
    ynode *n = fy_from_lua(c, 3, 0, x, 0);
    fy_emit_document(c, n);
    lua_pushlstring(L, c->out.p, c->out.n);
    return 1;
}

/***
 * yaml.encode(value) -> text | nil, err
 * Block-style YAML. Decoded maps keep their key order; plain tables are sorted
 * (numbers, then booleans, then strings). Strings that would read back as another
 * type are quoted; multi-line strings become literal block scalars.
 */
static int l_encode(lua_State *L)
{
    luaL_checkany(L, 1);
    return yrun(L, inner_encode, 1);
}

/* ------------------------------------------------------------------------- */
/* kinds and null                                                             */
/* ------------------------------------------------------------------------- */

/***
 * yaml.kind(v) -> "map" | "seq" | nil (v not a table)
 * The empty plain table is a "map"; use yaml.seq{} for an empty sequence.
 */
static int l_kind(lua_State *L)
{
    luaL_checkany(L, 1);
    if (!lua_istable(L, 1)) {
        lua_pushnil(L);
        return 1;
    }
    lua_getfield(L, LUA_REGISTRYINDEX, META_KEY);
    int seq = fy_table_kind(L, 1, lua_gettop(L));
    lua_pushstring(L, seq ? "seq" : "map");
    return 1;
}

static int mark_kind(lua_State *L, const char *kind)
{
    if (lua_isnoneornil(L, 1)) {
        lua_settop(L, 0);
        lua_newtable(L);
    } else {
        luaL_checktype(L, 1, LUA_TTABLE);
        lua_settop(L, 1);
    }
    lua_getfield(L, LUA_REGISTRYINDEX, META_KEY);
    lua_pushvalue(L, 1);
    if (strcmp(kind, "map") == 0) {
        /* keep a recorded key order if there is one */
        lua_pushvalue(L, 1);
        if (lua_rawget(L, 2) == LUA_TTABLE) {
            lua_settop(L, 1);
            return 1;
        }
        lua_pop(L, 1);
    }
    lua_pushstring(L, kind);
    lua_rawset(L, 2);
    lua_settop(L, 1);
    return 1;
}

/***
 * yaml.map([t]) -> t   marks t (or a new table) as a YAML mapping.
 */
static int l_map(lua_State *L)
{
    return mark_kind(L, "map");
}

/***
 * yaml.seq([t]) -> t   marks t (or a new table) as a YAML sequence.
 */
static int l_seq(lua_State *L)
{
    return mark_kind(L, "seq");
}

static int l_null_tostring(lua_State *L)
{
    lua_pushliteral(L, "yaml.null");
    return 1;
}

/* ------------------------------------------------------------------------- */
/* merge                                                                      */
/* ------------------------------------------------------------------------- */

/* Stack: [ctx, errtab, docs, opts] -> [..., value] */
static int inner_merge(lua_State *L)
{
    yctx *c = inner_ctx(L);
    return fy_merge_main(c, 3, 4);
}

/***
 * yaml.merge({doc, ...} [, opts]) -> value | nil, err
 * Merge documents (YAML text or tables) spruce-style, evaluate (( operators )),
 * then prune / cherry-pick. opts: params = {["dotted.path"] = value, ...},
 * prune = {path, ...}, cherry_pick = {path, ...}, names = {name of doc 1, ...},
 * fallback_append = boolean, env = {NAME = value} (for $VAR; default: os env).
 */
static int l_merge(lua_State *L)
{
    static const char *const keys[] = {"params", "prune", "cherry_pick", "names", "fallback_append",
                                       "env", "skip_eval", NULL};
    luaL_checktype(L, 1, LUA_TTABLE);
    if (!lua_isnoneornil(L, 2)) {
        luaL_checktype(L, 2, LUA_TTABLE);
        forge_checkkeys(L, 2, "yaml.merge", keys);
        const char *tabs[] = {"params", "prune", "cherry_pick", "names", "env"};
        for (int i = 0; i < 5; i++) {
            lua_getfield(L, 2, tabs[i]);
            if (!lua_isnil(L, -1) && !lua_istable(L, -1))
                luaL_error(L, "yaml.merge: option '%s' must be a table", tabs[i]);
            lua_pop(L, 1);
        }
    }
    lua_Unsigned n = lua_rawlen(L, 1);
    for (lua_Unsigned i = 1; i <= n; i++) {
        int t = lua_rawgeti(L, 1, (lua_Integer)i);
        if (t != LUA_TSTRING && t != LUA_TTABLE)
            luaL_error(L, "yaml.merge: document %d must be YAML text or a table, got %s", (int)i,
                       lua_typename(L, t));
        lua_pop(L, 1);
    }
    return yrun(L, inner_merge, 2);
}

int luaopen_forge_yaml(lua_State *L)
{
    static const luaL_Reg lib[] = {
        {"decode", l_decode},
        {"encode", l_encode},
        {"merge", l_merge},
        {"kind", l_kind},
        {"map", l_map},
        {"seq", l_seq},
        {NULL, NULL},
    };
    static const luaL_Reg ctx_meta[] = {
        {"__gc", fy_ctx_gc},
        {NULL, NULL},
    };
    forge_newclass(L, CTX_MT, NULL, ctx_meta);
    /* kinds and key orders of tables, weak-keyed */
    if (lua_getfield(L, LUA_REGISTRYINDEX, META_KEY) != LUA_TTABLE) {
        lua_pop(L, 1);
        lua_newtable(L);
        lua_createtable(L, 0, 1);
        lua_pushliteral(L, "k");
        lua_setfield(L, -2, "__mode");
        lua_setmetatable(L, -2);
        lua_setfield(L, LUA_REGISTRYINDEX, META_KEY);
    } else {
        lua_pop(L, 1);
    }
    if (lua_getfield(L, LUA_REGISTRYINDEX, NULL_KEY) != LUA_TUSERDATA) {
        lua_pop(L, 1);
        lua_newuserdatauv(L, 0, 0);
        lua_createtable(L, 0, 3);
        lua_pushcfunction(L, l_null_tostring);
        lua_setfield(L, -2, "__tostring");
        lua_pushliteral(L, "yaml.null");
        lua_setfield(L, -2, "__name");
        lua_pushboolean(L, 0);
        lua_setfield(L, -2, "__metatable");
        lua_setmetatable(L, -2);
        lua_setfield(L, LUA_REGISTRYINDEX, NULL_KEY);
    } else {
        lua_pop(L, 1);
    }
    luaL_newlib(L, lib);
    lua_getfield(L, LUA_REGISTRYINDEX, NULL_KEY);
    lua_setfield(L, -2, "null");
    forge_setmodinfo(L, "forge.yaml");
    return 1;
}
