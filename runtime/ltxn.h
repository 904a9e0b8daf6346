/*
 * The Lua txn table shared by the key-value backends (forge.store, forge.etcd):
 *   db:txn{compare={...}, success={...}, failure={...}}
 * Parsing and key/value argument checks only; each backend runs the txn its own way.
 * No Lua API.
 */
#ifndef FORGE_LTXN_H
#define FORGE_LTXN_H

#include <stddef.h>

#include "forge/forge.h"

#define TXN_USAGE     "usage: db:txn{compare={...}, success={...}, failure={...}}"
#define TXN_KEY_MAX   1024                  /* bytes; keys are non-empty, no NUL */
#define TXN_VALUE_MAX (8 * 1024 * 1024)     /* bytes */

enum { TXN_CMP_MODREV, TXN_CMP_EXISTS, TXN_CMP_VALUE };
enum { TXN_OP_PUT, TXN_OP_DELETE, TXN_OP_DELPREFIX };

/* Strings point into Lua strings anchored by the caller's arguments. */
struct txn_cmp {
    int kind;
    const char *key;
    size_t klen;
    lua_Integer n;                  /* mod_revision, or exists as 0/1 */
    const char *val;
    size_t vlen;
};

struct txn_op {
    int kind;
    const char *key;                /* key, or prefix for TXN_OP_DELPREFIX */
    size_t klen;
    const char *val;
    size_t vlen;
    lua_Integer lease;              /* 0 = none */
};

/* A parsed txn table; the arrays are userdata left on the stack by forge_txn_parse. */
struct txn {
    const struct txn_cmp *cmps;
    size_t ncmp;
    const struct txn_op *ops[2];    /* success, failure */
    size_t nops[2];
};

/* What a backend accepts beyond the common shape. */
struct txn_rules {
    int bound_cmp_value;            /* compare values too are at most TXN_VALUE_MAX */
    /* Checks a put's lease= at idx (may longjmp); NULL: ops take no lease. */
    lua_Integer (*check_lease)(lua_State *L, int idx, const char *what);
};

/* NULL if k is a valid key, else why not. Prefixes (allow_empty) may be empty. */
const char *forge_txn_keyproblem(const char *k, size_t len, int allow_empty);

/* The key (prefix if allow_empty) at arg of a db method; raises a usage error if invalid. */
const char *forge_txn_checkkey(lua_State *L, int arg, size_t *len, int allow_empty);

/* opts.from of a range (table at index opts): NULL when absent, else a key starting with
 * prefix; raises a usage error otherwise. The string lives as long as the opts table. */
const char *forge_range_from(lua_State *L, int opts, const char *prefix, size_t plen, size_t *len);

/* The value at arg of a db method: a string of at most TXN_VALUE_MAX bytes, else raises. */
const char *forge_txn_checkvalue(lua_State *L, int arg, size_t *len);

/*
 * Parse the txn fields compare, success and failure of the table at t (its keys
 * already checked). As etcd, a put key may not be written twice nor also deleted
 * in the same branch. Raises on any malformed entry (may longjmp).
 * Stack: [...] -> [..., cmps, success ops, failure ops] (GC-owned userdata)
 */
void forge_txn_parse(lua_State *L, int t, const struct txn_rules *rules, struct txn *out);

#endif
