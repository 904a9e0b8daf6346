/*
 * The txn table of forge.store and forge.etcd (see ltxn.h): one parser, so both
 * backends accept the same shape and raise the same usage errors.
 */
#include <string.h>

#include "ltxn.h"


/*
 * t[name] without metamethods, so a string it returns stays anchored by t.
 * Stack: [...] -> [..., t[name]]; returns its type.
 */
static int rawfield(lua_State *L, int t, const char *name)
{
    lua_pushstring(L, name);
    return lua_rawget(L, t);
}


const char *forge_txn_keyproblem(const char *k, size_t len, int allow_empty)
{
    if (len == 0 && !allow_empty)
        return "key must be a non-empty string";
    if (len > TXN_KEY_MAX)
        return "key longer than 1024 bytes";
    if (memchr(k, '\0', len))
        return "key contains a NUL byte";
    return NULL;
}


const char *forge_txn_checkkey(lua_State *L, int arg, size_t *len, int allow_empty)
{
    luaL_argexpected(L, lua_type(L, arg) == LUA_TSTRING, arg, "string");
    const char *k = lua_tolstring(L, arg, len);
    const char *why = forge_txn_keyproblem(k, *len, allow_empty);
    if (why)
        luaL_argerror(L, arg, why);
    return k;
}


const char *forge_range_from(lua_State *L, int opts, const char *prefix, size_t plen, size_t *len)
{
    lua_getfield(L, opts, "from");                          /* [..., from] */
    if (lua_isnil(L, -1)) {
        lua_pop(L, 1);
        return NULL;
    }
    if (lua_type(L, -1) != LUA_TSTRING)
        luaL_argerror(L, opts, "from must be a string");
    const char *from = lua_tolstring(L, -1, len);
    const char *why = forge_txn_keyproblem(from, *len, 0);
    if (why)
        luaL_argerror(L, opts, why);
    if (*len < plen || memcmp(from, prefix, plen) != 0)
        luaL_argerror(L, opts, "from must start with the prefix");
    lua_pop(L, 1);                  /* the opts table keeps the string alive */
    return from;
}


const char *forge_txn_checkvalue(lua_State *L, int arg, size_t *len)
{
    luaL_argexpected(L, lua_type(L, arg) == LUA_TSTRING, arg, "string");
    const char *v = lua_tolstring(L, arg, len);
    luaL_argcheck(L, *len <= TXN_VALUE_MAX, arg, "value larger than 8 MiB");
    return v;
}


/*
 * The array txn[name] (absent or nil = empty); raises unless it is a proper
 * sequence of tables.
 * Stack: [...] -> [..., array or nil]; returns its length.
 */
static size_t txn_array(lua_State *L, int txn, const char *name)
{
    if (rawfield(L, txn, name) == LUA_TNIL)
        return 0;
    if (!lua_istable(L, -1))
        luaL_error(L, "txn: '%s' must be an array of tables (" TXN_USAGE ")", name);
    int arr = lua_gettop(L);
    size_t n = (size_t)lua_rawlen(L, arr), count = 0;
    lua_pushnil(L);
    while (lua_next(L, arr)) {
        lua_pop(L, 1);
        count++;
    }
    if (count != n)
        luaL_error(L, "txn: '%s' must be an array (no holes or named fields)", name);
    for (size_t i = 1; i <= n; i++) {
        if (lua_rawgeti(L, arr, (lua_Integer)i) != LUA_TTABLE)
            luaL_error(L, "txn: %s[%d] must be a table", name, (int)i);
        lua_pop(L, 1);
    }
    return n;
}


/*
 * A key or prefix field of entry e; raises if missing or invalid.
 * Stack unchanged (the string stays anchored by the entry table).
 */
static const char *txn_keyfield(lua_State *L, int e, const char *field, const char *where,
                                int i, size_t *len, int allow_empty)
{
    if (rawfield(L, e, field) != LUA_TSTRING)
        luaL_error(L, "txn: %s[%d].%s must be a string", where, i, field);
    const char *k = lua_tolstring(L, -1, len);
    lua_pop(L, 1);
    const char *why = forge_txn_keyproblem(k, *len, allow_empty);
    if (why)
        luaL_error(L, "txn: %s[%d].%s: %s", where, i, field, why);
    return k;
}


/*
 * Parse txn.compare into a GC-owned array.
 * Stack: [...] -> [..., buf (userdata)]
 */
static struct txn_cmp *txn_parse_cmps(lua_State *L, int txn, const struct txn_rules *rules,
                                      size_t *ncmp)
{
    static const char *const keys[] = {"key", "mod_revision", "exists", "value", NULL};
    size_t n = txn_array(L, txn, "compare");
    int arr = lua_gettop(L);
    struct txn_cmp *cmps = lua_newuserdatauv(L, n ? n * sizeof *cmps : 1, 0);
    for (size_t i = 0; i < n; i++) {
        struct txn_cmp *c = &cmps[i];
        int ii = (int)i + 1;
        memset(c, 0, sizeof *c);
        lua_rawgeti(L, arr, (lua_Integer)ii);
        int e = lua_gettop(L);
        forge_checkkeys(L, e, "txn compare", keys);
        c->key = txn_keyfield(L, e, "key", "compare", ii, &c->klen, 0);
        int given = 0;
        if (rawfield(L, e, "mod_revision") != LUA_TNIL) {
            int isint;
            c->kind = TXN_CMP_MODREV;
            c->n = lua_tointegerx(L, -1, &isint);
            if (!isint || c->n < 0)
                luaL_error(L, "txn: compare[%d].mod_revision must be an integer >= 0", ii);
            given++;
        }
        if (rawfield(L, e, "exists") != LUA_TNIL) {
            if (!lua_isboolean(L, -1))
                luaL_error(L, "txn: compare[%d].exists must be a boolean", ii);
            c->kind = TXN_CMP_EXISTS;
            c->n = lua_toboolean(L, -1);
            given++;
        }
        if (rawfield(L, e, "value") != LUA_TNIL) {
            if (lua_type(L, -1) != LUA_TSTRING)
                luaL_error(L, "txn: compare[%d].value must be a string", ii);
            c->kind = TXN_CMP_VALUE;
            c->val = lua_tolstring(L, -1, &c->vlen);
            if (rules->bound_cmp_value && c->vlen > TXN_VALUE_MAX)
                luaL_error(L, "txn: compare[%d].value larger than 8 MiB", ii);
            given++;
        }
        if (given != 1)
            luaL_error(L, "txn: compare[%d] needs exactly one of mod_revision, exists, value", ii);
        lua_settop(L, e - 1);
    }
    lua_remove(L, arr);
    *ncmp = n;
    return cmps;
}


static int has_prefix(const char *k, size_t klen, const char *p, size_t plen)
{
    return klen >= plen && memcmp(k, p, plen) == 0;
}


/*
 * Parse txn[name] (success or failure) into a GC-owned array. As etcd, a put
 * key may not be written twice nor also deleted in the same branch.
 * Stack: [...] -> [..., buf (userdata)]
 */
static struct txn_op *txn_parse_ops(lua_State *L, int txn, const struct txn_rules *rules,
                                    const char *name, size_t *nops)
{
    static const char *const keys[] = {"op", "key", "value", "prefix", NULL};
    static const char *const lease_keys[] = {"op", "key", "value", "prefix", "lease", NULL};
    size_t n = txn_array(L, txn, name);
    int arr = lua_gettop(L);
    struct txn_op *ops = lua_newuserdatauv(L, n ? n * sizeof *ops : 1, 0);
    for (size_t i = 0; i < n; i++) {
        struct txn_op *o = &ops[i];
        int ii = (int)i + 1;
        memset(o, 0, sizeof *o);
        lua_rawgeti(L, arr, (lua_Integer)ii);
        int e = lua_gettop(L);
        forge_checkkeys(L, e, "txn op", rules->check_lease ? lease_keys : keys);
        if (rawfield(L, e, "op") != LUA_TSTRING)
            luaL_error(L, "txn: %s[%d].op must be \"put\", \"delete\" or \"delete_prefix\"", name, ii);
        const char *opname = lua_tostring(L, -1);
        int has_key = rawfield(L, e, "key") != LUA_TNIL;
        int has_val = rawfield(L, e, "value") != LUA_TNIL;
        int has_pfx = rawfield(L, e, "prefix") != LUA_TNIL;
        int has_lease = rawfield(L, e, "lease") != LUA_TNIL;   /* only if check_lease */
        if (strcmp(opname, "put") == 0) {
            o->kind = TXN_OP_PUT;
            if (has_pfx)
                luaL_error(L, "txn: %s[%d]: put takes key and value, not prefix", name, ii);
            o->key = txn_keyfield(L, e, "key", name, ii, &o->klen, 0);
            if (rawfield(L, e, "value") != LUA_TSTRING)
                luaL_error(L, "txn: %s[%d].value must be a string", name, ii);
            o->val = lua_tolstring(L, -1, &o->vlen);
            if (o->vlen > TXN_VALUE_MAX)
                luaL_error(L, "txn: %s[%d].value larger than 8 MiB", name, ii);
            if (has_lease) {
                rawfield(L, e, "lease");
                o->lease = rules->check_lease(L, -1, "txn put");
            }
        } else if (strcmp(opname, "delete") == 0) {
            o->kind = TXN_OP_DELETE;
            if (has_val || has_pfx || has_lease)
                luaL_error(L, "txn: %s[%d]: delete takes only key", name, ii);
            o->key = txn_keyfield(L, e, "key", name, ii, &o->klen, 0);
        } else if (strcmp(opname, "delete_prefix") == 0) {
            o->kind = TXN_OP_DELPREFIX;
            if (has_val || has_key || has_lease)
                luaL_error(L, "txn: %s[%d]: delete_prefix takes only prefix", name, ii);
            o->key = txn_keyfield(L, e, "prefix", name, ii, &o->klen, 1);
        } else {
            luaL_error(L, "txn: %s[%d]: unknown op '%s' (put, delete, delete_prefix)", name, ii, opname);
        }
        lua_settop(L, e - 1);
    }
    for (size_t i = 0; i < n; i++) {
        if (ops[i].kind != TXN_OP_PUT)
            continue;
        for (size_t j = 0; j < n; j++) {
            if (j == i || (ops[j].kind == TXN_OP_PUT && j < i))
                continue;
            int clash = ops[j].kind == TXN_OP_DELPREFIX
                        ? has_prefix(ops[i].key, ops[i].klen, ops[j].key, ops[j].klen)
                        : ops[j].klen == ops[i].klen && memcmp(ops[j].key, ops[i].key, ops[i].klen) == 0;
            if (clash)
                luaL_error(L, "txn: %s: key '%s' is put and also %s in the same branch", name,
                           ops[i].key, ops[j].kind == TXN_OP_PUT ? "put again" : "deleted");
        }
    }
    lua_remove(L, arr);
    *nops = n;
    return ops;
}


void forge_txn_parse(lua_State *L, int t, const struct txn_rules *rules, struct txn *out)
{
    t = lua_absindex(L, t);
    out->cmps = txn_parse_cmps(L, t, rules, &out->ncmp);                    /* [..., cmps] */
    out->ops[0] = txn_parse_ops(L, t, rules, "success", &out->nops[0]);    /* [..., cmps, ok] */
    out->ops[1] = txn_parse_ops(L, t, rules, "failure", &out->nops[1]);    /* [..., cmps, ok, ko] */
}
