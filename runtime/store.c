/*
 * forge.store — the embedded backend of the etcd-v3-like key/value store.
 *
 * One SQLite file in WAL mode holds every instance, binding and operation of the
 * broker. Several lua_States (threads) and several processes may open the same
 * file; each db object owns exactly one sqlite3 connection and a small set of
 * statements prepared once in store.open.
 *
 * Semantics follow etcd v3 (see ../../shared/DESIGN.md "Store semantics"):
 *  - one global revision counter (a fresh store is at revision 1, as etcd),
 *    bumped once per write that changed something; every key written by that
 *    write gets mod_revision = the new revision;
 *  - per key: create_revision, mod_revision, version (puts since creation;
 *    a delete forgets the key, so a re-created key starts at version 1 again);
 *  - compare-and-swap through prev_revision (0 = "must not exist") and txn.
 *
 * Concurrency: every write runs in one `BEGIN IMMEDIATE` transaction that first
 * evaluates its compares, so two connections racing a CAS are serialised by
 * SQLite's write lock and only one can see the old mod_revision. Reads that
 * return several values (range) run in one read transaction, so the rows and
 * the revision come from the same snapshot.
 *
 * Group commit: the connections of one process to one file (one per broker
 * thread) share a write queue. A writer queues its txn; if no batch is running
 * it leads: it takes every queued txn, runs them in order in one IMMEDIATE
 * transaction on its own connection (each txn's compares judged on its own,
 * against the writes of the txns before it; each txn that writes gets its own
 * revision) and commits once — one fsync for the batch. The others wait on a
 * condition variable and are answered only after that COMMIT returned, i.e.
 * once their writes are on disk. Any SQLite failure of a batch (a write, or the
 * COMMIT) rolls it back and fails every txn in it with that error.
 *
 * Raises versus SQL: arguments are validated (and may raise) before any SQL
 * runs. Write paths run no Lua call between BEGIN and COMMIT/ROLLBACK. Read
 * paths, which must push strings while a statement is live, run their body
 * under lua_pcall; on a raise every statement is reset and any transaction is
 * rolled back before the error is re-raised.
 */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <sqlite3.h>

#include "forge/forge.h"
#include "ltxn.h"

#define STORE_MT          "forge.store.db"
#define STORE_KEY_MAX     1024
#define STORE_VALUE_MAX   (8 * 1024 * 1024)
#define STORE_SCHEMA      1
#define STORE_BUSY_MS     5000

#define checkdb(L)        (store_check((L), 1))


/* ---------------------------------------------------------------------------
 * Connection and prepared statements
 * ------------------------------------------------------------------------- */

enum {
    ST_BEGIN, ST_BEGIN_IMM, ST_COMMIT, ST_ROLLBACK,
    ST_GET, ST_RANGE, ST_REV_GET, ST_REV_SET,
    ST_PUT, ST_DEL, ST_DEL_RANGE,
    ST__N
};

static const char *const stmt_sql[ST__N] = {
    [ST_BEGIN]     = "BEGIN",
    [ST_BEGIN_IMM] = "BEGIN IMMEDIATE",
    [ST_COMMIT]    = "COMMIT",
    [ST_ROLLBACK]  = "ROLLBACK",
    [ST_GET]       = "SELECT create_revision, mod_revision, version, value FROM kv WHERE key = ?1",
    /* ?2 is always bound: see prefix_end() */
    [ST_RANGE]     = "SELECT key, create_revision, mod_revision, version, value FROM kv"
                     " WHERE key >= ?1 AND key < ?2 ORDER BY key LIMIT ?3",
    [ST_REV_GET]   = "SELECT revision FROM meta WHERE id = 0",
    [ST_REV_SET]   = "UPDATE meta SET revision = ?1 WHERE id = 0",
    [ST_PUT]       = "INSERT INTO kv (key, create_revision, mod_revision, version, value)"
                     " VALUES (?1, ?3, ?3, 1, ?2)"
                     " ON CONFLICT (key) DO UPDATE SET mod_revision = excluded.mod_revision,"
                     " version = kv.version + 1, value = excluded.value",
    [ST_DEL]       = "DELETE FROM kv WHERE key = ?1",
    [ST_DEL_RANGE] = "DELETE FROM kv WHERE key >= ?1 AND key < ?2",
};

/*
 * Keys are always bound as BLOBs so SQLite compares them with memcmp (byte
 * order, as etcd). Small columns come before the value so reading a
 * mod_revision never has to walk a large value's overflow pages.
 */
static const char schema_sql[] =
    "CREATE TABLE IF NOT EXISTS kv ("
    " key BLOB NOT NULL UNIQUE,"
    " create_revision INTEGER NOT NULL,"
    " mod_revision INTEGER NOT NULL,"
    " version INTEGER NOT NULL,"
    " value BLOB NOT NULL);"
    "CREATE TABLE IF NOT EXISTS meta ("
    " id INTEGER PRIMARY KEY CHECK (id = 0),"
    " revision INTEGER NOT NULL);"
    "INSERT OR IGNORE INTO meta (id, revision) VALUES (0, 1);";

struct group;

struct store {
    sqlite3 *db;                    /* NULL once closed */
    sqlite3_stmt *st[ST__N];
    struct group *group;            /* the file's write queue; NULL for :memory: */
};

/* An SQLite failure, copied out of the connection before any rollback. */
struct sqlerr {
    int rc;
    char msg[256];
};


static int sql_fail(struct store *s, struct sqlerr *e, int rc)
{
    e->rc = rc;
    snprintf(e->msg, sizeof e->msg, "%s", s->db ? sqlite3_errmsg(s->db) : sqlite3_errstr(rc));
    return rc;
}


static void stmt_finish(sqlite3_stmt *st)
{
    sqlite3_reset(st);
    sqlite3_clear_bindings(st);     /* drop SQLITE_STATIC pointers into Lua strings */
}


/* Step a statement whose rows (if any) are ignored, then reset it. */
static int stmt_exec(struct store *s, int id, struct sqlerr *e)
{
    sqlite3_stmt *st = s->st[id];
    int rc = sqlite3_step(st);
    if (rc == SQLITE_ROW || rc == SQLITE_DONE)
        rc = SQLITE_OK;
    else
        sql_fail(s, e, rc);
    stmt_finish(st);
    return rc;
}


/* After any failure or raise: reset every statement and end any open transaction. */
static void store_abort(struct store *s)
{
    if (!s->db)
        return;
    for (int i = 0; i < ST__N; i++)
        if (s->st[i])
            stmt_finish(s->st[i]);
    if (!sqlite3_get_autocommit(s->db)) {
        if (s->st[ST_ROLLBACK]) {
            sqlite3_step(s->st[ST_ROLLBACK]);
            sqlite3_reset(s->st[ST_ROLLBACK]);
        } else {
            sqlite3_exec(s->db, "ROLLBACK", NULL, NULL, NULL);
        }
    }
}


/* ---------------------------------------------------------------------------
 * Write groups: one per database file and busy timeout in this process
 * ------------------------------------------------------------------------- */

struct txnres;

/* One queued txn; lives on its writer's stack while the writer waits. */
struct pending {
    struct pending *next;
    const struct txn_cmp *cmps;
    size_t ncmp;
    const struct txn_op *const *ops;    /* [2]: success, failure */
    const size_t *nops;
    struct txnres *r;
    int rc;
    int done;                           /* r and rc are final */
};

struct group {
    struct group *next;
    char *path;
    int busy_ms;
    int refs;                           /* connections using it */
    pthread_mutex_t mu;
    pthread_cond_t cv;
    struct pending *head, **tail;       /* queued, not taken by a leader yet */
    int leading;                        /* a batch is running */
};

/* The registry of groups; a group lives while a connection uses it. */
static pthread_mutex_t groups_mu = PTHREAD_MUTEX_INITIALIZER;
static struct group *groups;


/* The group of (path, busy_ms), created if needed, with one more reference; NULL on ENOMEM. */
static struct group *group_join(const char *path, int busy_ms)
{
    pthread_mutex_lock(&groups_mu);
    struct group *g = groups;
    while (g && (g->busy_ms != busy_ms || strcmp(g->path, path) != 0))
        g = g->next;
    if (!g && (g = calloc(1, sizeof *g)) != NULL) {
        if (!(g->path = strdup(path))) {
            free(g);
            g = NULL;
        } else {
            g->busy_ms = busy_ms;
            g->tail = &g->head;
            pthread_mutex_init(&g->mu, NULL);
            pthread_cond_init(&g->cv, NULL);
            g->next = groups;
            groups = g;
        }
    }
    if (g)
        g->refs++;
    pthread_mutex_unlock(&groups_mu);
    return g;
}


static void group_leave(struct group *g)
{
    pthread_mutex_lock(&groups_mu);
    if (--g->refs == 0) {
        struct group **p = &groups;
        while (*p != g)
            p = &(*p)->next;
        *p = g->next;
        pthread_mutex_destroy(&g->mu);
        pthread_cond_destroy(&g->cv);
        free(g->path);
        free(g);
    }
    pthread_mutex_unlock(&groups_mu);
}


static void store_release(struct store *s)
{
    if (!s->db)
        return;
    store_abort(s);
    if (s->group) {
        group_leave(s->group);
        s->group = NULL;
    }
    for (int i = 0; i < ST__N; i++) {
        sqlite3_finalize(s->st[i]);
        s->st[i] = NULL;
    }
    sqlite3_close_v2(s->db);
    s->db = NULL;
}


/* sqlite3_exec callback: copy the first column of the first row into buf[64]. */
static int first_column_cb(void *buf, int ncol, char **vals, char **names)
{
    (void)names;
    if (ncol > 0 && vals[0] && !((char *)buf)[0])
        snprintf(buf, 64, "%s", vals[0]);
    return 0;
}


/*
 * Open the connection, switch to WAL, create or check the schema, prepare the
 * statements. Runs no Lua. On failure the caller calls store_release().
 */
static int store_connect(struct store *s, const char *path, int busy_ms, struct sqlerr *e)
{
    char mode[64] = "";
    char version[64] = "";
    int rc = sqlite3_open_v2(path, &s->db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE, NULL);
    if (rc != SQLITE_OK)
        return sql_fail(s, e, rc);
    sqlite3_busy_timeout(s->db, busy_ms);

    rc = sqlite3_exec(s->db, "PRAGMA journal_mode=WAL", first_column_cb, mode, NULL);
    if (rc != SQLITE_OK)
        return sql_fail(s, e, rc);
    if (strcmp(mode, "wal") != 0 && strcmp(mode, "memory") != 0) {
        e->rc = SQLITE_CANTOPEN;
        snprintf(e->msg, sizeof e->msg, "cannot switch to WAL (journal_mode is '%s')", mode);
        return e->rc;
    }
    /*
     * FULL, not NORMAL: in WAL mode NORMAL may lose the last commits on power
     * loss. A broker that acknowledged a provision must not forget it, and the
     * write rate of a broker is low, so one fsync per commit is affordable.
     */
    rc = sqlite3_exec(s->db, "PRAGMA synchronous=FULL", NULL, NULL, NULL);
    if (rc != SQLITE_OK)
        return sql_fail(s, e, rc);

    rc = sqlite3_exec(s->db, "BEGIN IMMEDIATE", NULL, NULL, NULL);
    if (rc != SQLITE_OK)
        return sql_fail(s, e, rc);
    rc = sqlite3_exec(s->db, "PRAGMA user_version", first_column_cb, version, NULL);
    if (rc == SQLITE_OK && strcmp(version, "0") != 0 && strcmp(version, "1") != 0) {
        sqlite3_exec(s->db, "ROLLBACK", NULL, NULL, NULL);
        e->rc = SQLITE_MISMATCH;
        snprintf(e->msg, sizeof e->msg, "schema version %s is newer than supported (%d)",
                 version, STORE_SCHEMA);
        return e->rc;
    }
    if (rc == SQLITE_OK)
        rc = sqlite3_exec(s->db, schema_sql, NULL, NULL, NULL);
    if (rc == SQLITE_OK && strcmp(version, "0") == 0)
        rc = sqlite3_exec(s->db, "PRAGMA user_version=1", NULL, NULL, NULL);
    if (rc == SQLITE_OK)
        rc = sqlite3_exec(s->db, "COMMIT", NULL, NULL, NULL);
    if (rc != SQLITE_OK) {
        sql_fail(s, e, rc);
        sqlite3_exec(s->db, "ROLLBACK", NULL, NULL, NULL);
        return rc;
    }

    for (int i = 0; i < ST__N; i++) {
        rc = sqlite3_prepare_v3(s->db, stmt_sql[i], -1, SQLITE_PREPARE_PERSISTENT, &s->st[i], NULL);
        if (rc != SQLITE_OK)
            return sql_fail(s, e, rc);
    }
    return SQLITE_OK;
}


/* ---------------------------------------------------------------------------
 * Errors
 * ------------------------------------------------------------------------- */

/* Stack: [...] -> [..., nil, err]; returns 2. */
static int push_sqlerr(lua_State *L, const struct sqlerr *e, const char *what)
{
    int primary = e->rc & 0xff;
    if (primary == SQLITE_BUSY || primary == SQLITE_LOCKED)
        return forge_pusherror(L, "store.busy", 1, "%s: database is busy: %s", what, e->msg);
    /* I/O trouble and a full disk may clear up; corruption or a bad schema will not. */
    int retryable = primary == SQLITE_IOERR || primary == SQLITE_FULL || primary == SQLITE_NOMEM
                    || primary == SQLITE_PROTOCOL;
    return forge_pusherror(L, "store.io", retryable, "%s: %s (sqlite error %d)", what, e->msg, e->rc);
}


/* Stack: [...] -> [..., nil, err]; returns 2. key has no NUL (checked). */
static int push_conflict(lua_State *L, const char *what, const char *key,
                         lua_Integer expected, lua_Integer found)
{
    char exp[32], fnd[32];      /* lua_pushfstring's %I is not printf-checkable */
    snprintf(exp, sizeof exp, LUA_INTEGER_FMT, (LUAI_UACINT)expected);
    snprintf(fnd, sizeof fnd, LUA_INTEGER_FMT, (LUAI_UACINT)found);
    if (expected == 0)
        return forge_pusherror(L, "store.conflict", 0,
                               "%s '%s': expected the key to be absent (mod_revision 0), found mod_revision %s",
                               what, key, fnd);
    return forge_pusherror(L, "store.conflict", 0, "%s '%s': expected mod_revision %s, found %s%s",
                           what, key, exp, fnd, found == 0 ? " (key absent)" : "");
}


/* ---------------------------------------------------------------------------
 * Argument checks (may raise; run before any SQL)
 * ------------------------------------------------------------------------- */

static struct store *store_check(lua_State *L, int idx)
{
    struct store *s = luaL_checkudata(L, idx, STORE_MT);
    if (!s->db)
        luaL_error(L, "store is closed");
    return s;
}


/*
 * Optional {prev_revision=n} at arg. Returns 1 and sets *prev if given.
 * Stack unchanged.
 */
static int opt_prev_revision(lua_State *L, int arg, const char *what, lua_Integer *prev)
{
    static const char *const keys[] = {"prev_revision", NULL};
    if (lua_isnoneornil(L, arg))
        return 0;
    luaL_checktype(L, arg, LUA_TTABLE);
    forge_checkkeys(L, arg, what, keys);
    if (lua_getfield(L, arg, "prev_revision") == LUA_TNIL) {
        lua_pop(L, 1);
        return 0;
    }
    lua_pop(L, 1);
    *prev = forge_optintfield(L, arg, "prev_revision", 0);
    luaL_argcheck(L, *prev >= 0, arg, "prev_revision must be >= 0");
    return 1;
}


/*
 * Exclusive upper bound of the keys starting with prefix: drop trailing 0xFF
 * bytes and increment the last remaining byte. With no such byte (prefix ""
 * or all 0xFF) every key qualifies; since keys are at most STORE_KEY_MAX bytes,
 * STORE_KEY_MAX + 1 bytes of 0xFF compare greater than any key. buf must hold
 * STORE_KEY_MAX + 1 bytes; plen <= STORE_KEY_MAX.
 */
static size_t prefix_end(const char *prefix, size_t plen, char *buf)
{
    size_t n = plen;
    while (n > 0 && (unsigned char)prefix[n - 1] == 0xFF)
        n--;
    if (n == 0) {
        memset(buf, 0xFF, STORE_KEY_MAX + 1);
        return STORE_KEY_MAX + 1;
    }
    memcpy(buf, prefix, n);
    buf[n - 1] = (char)((unsigned char)buf[n - 1] + 1);
    return n;
}


/* ---------------------------------------------------------------------------
 * The write engine: compares + one branch of ops in one IMMEDIATE transaction
 * ------------------------------------------------------------------------- */

struct txnres {
    int succeeded;
    lua_Integer revision;
    lua_Integer deleted;
    size_t failed;                  /* index of the first false compare */
    lua_Integer found;              /* its key's current mod_revision (0 = absent) */
    struct sqlerr err;
};


static int read_revision(struct store *s, lua_Integer *rev, struct sqlerr *e)
{
    sqlite3_stmt *st = s->st[ST_REV_GET];
    int rc = sqlite3_step(st);
    if (rc == SQLITE_ROW) {
        *rev = sqlite3_column_int64(st, 0);
        rc = SQLITE_OK;
    } else if (rc == SQLITE_DONE) {
        rc = e->rc = SQLITE_CORRUPT;
        snprintf(e->msg, sizeof e->msg, "store revision row is missing");
    } else {
        sql_fail(s, e, rc);
    }
    stmt_finish(st);
    return rc;
}


static int eval_cmp(struct store *s, const struct txn_cmp *c, int *ok, lua_Integer *found, struct sqlerr *e)
{
    sqlite3_stmt *st = s->st[ST_GET];
    sqlite3_bind_blob(st, 1, c->key, (int)c->klen, SQLITE_STATIC);
    int rc = sqlite3_step(st);
    if (rc == SQLITE_ROW) {
        *found = sqlite3_column_int64(st, 1);
        switch (c->kind) {
        case TXN_CMP_MODREV:
            *ok = *found == c->n;
            break;
        case TXN_CMP_EXISTS:
            *ok = c->n != 0;
            break;
        default: {
            const void *v = sqlite3_column_blob(st, 3);
            size_t vlen = (size_t)sqlite3_column_bytes(st, 3);
            *ok = vlen == c->vlen && (vlen == 0 || memcmp(v, c->val, vlen) == 0);
        }
        }
        rc = SQLITE_OK;
    } else if (rc == SQLITE_DONE) {
        *found = 0;
        *ok = c->kind == TXN_CMP_MODREV ? c->n == 0 : c->kind == TXN_CMP_EXISTS ? c->n == 0 : 0;
        rc = SQLITE_OK;
    } else {
        sql_fail(s, e, rc);
    }
    stmt_finish(st);
    return rc;
}


/* Apply one op at revision rev; *changed = number of keys written. */
static int apply_op(struct store *s, const struct txn_op *o, lua_Integer rev, int *changed, struct sqlerr *e)
{
    sqlite3_stmt *st;
    char end[STORE_KEY_MAX + 1];
    switch (o->kind) {
    case TXN_OP_PUT:
        st = s->st[ST_PUT];
        sqlite3_bind_blob(st, 1, o->key, (int)o->klen, SQLITE_STATIC);
        sqlite3_bind_blob(st, 2, o->val, (int)o->vlen, SQLITE_STATIC);
        sqlite3_bind_int64(st, 3, rev);
        break;
    case TXN_OP_DELETE:
        st = s->st[ST_DEL];
        sqlite3_bind_blob(st, 1, o->key, (int)o->klen, SQLITE_STATIC);
        break;
    default:
        st = s->st[ST_DEL_RANGE];
        sqlite3_bind_blob(st, 1, o->key, (int)o->klen, SQLITE_STATIC);
        sqlite3_bind_blob(st, 2, end, (int)prefix_end(o->key, o->klen, end), SQLITE_STATIC);
        break;
    }
    int rc = sqlite3_step(st);
    if (rc == SQLITE_DONE) {
        *changed = sqlite3_changes(s->db);
        rc = SQLITE_OK;
    } else {
        sql_fail(s, e, rc);
    }
    stmt_finish(st);
    return rc;
}


/*
 * Evaluate the compares of p (logical AND) and apply its success ops if all
 * hold, else its failure ops, at revision *rev + 1; *rev is bumped if anything
 * was written. Runs inside the batch's write transaction, no Lua. Returns
 * SQLITE_OK (p->r filled) or an error code (e filled).
 */
static int txn_apply(struct store *s, struct pending *p, lua_Integer *rev, struct sqlerr *e)
{
    struct txnres *r = p->r;
    int rc, writes = 0;

    r->succeeded = 1;
    r->deleted = 0;
    for (size_t i = 0; i < p->ncmp; i++) {
        int ok = 0;
        lua_Integer found = 0;
        if ((rc = eval_cmp(s, &p->cmps[i], &ok, &found, e)) != SQLITE_OK)
            return rc;
        if (!ok) {
            r->succeeded = 0;
            r->failed = i;
            r->found = found;
            break;
        }
    }
    int b = r->succeeded ? 0 : 1;
    for (size_t i = 0; i < p->nops[b]; i++) {
        int changed = 0;
        if ((rc = apply_op(s, &p->ops[b][i], *rev + 1, &changed, e)) != SQLITE_OK)
            return rc;
        writes += changed;
        if (p->ops[b][i].kind != TXN_OP_PUT)
            r->deleted += changed;
    }
    if (writes)
        ++*rev;
    r->revision = *rev;
    return SQLITE_OK;
}


/*
 * Run the txns of batch (a list through ->next), in order, in one IMMEDIATE
 * transaction and one COMMIT. Then every member has rc = SQLITE_OK and its r
 * filled, or, when any step failed, the batch was rolled back (nothing of it
 * written) and every member has that error. Runs no Lua.
 */
static void batch_run(struct store *s, struct pending *batch)
{
    struct sqlerr e = {.rc = SQLITE_OK};
    lua_Integer start = 0, rev;
    size_t n = 0;
    int rc = stmt_exec(s, ST_BEGIN_IMM, &e);
    if (rc == SQLITE_OK)
        rc = read_revision(s, &start, &e);
    rev = start;
    for (struct pending *p = batch; p; p = p->next, n++)
        if (rc == SQLITE_OK)
            rc = txn_apply(s, p, &rev, &e);
    if (rc == SQLITE_OK && rev != start) {
        sqlite3_bind_int64(s->st[ST_REV_SET], 1, rev);
        rc = stmt_exec(s, ST_REV_SET, &e);
    }
    if (rc == SQLITE_OK)
        rc = stmt_exec(s, ST_COMMIT, &e);
    if (rc != SQLITE_OK) {
        store_abort(s);
        if (n > 1) {
            size_t len = strlen(e.msg);
            snprintf(e.msg + len, sizeof e.msg - len, "; the %zu writes committed together with it fail too", n - 1);
        }
    }
    for (struct pending *p = batch; p; p = p->next) {
        p->rc = rc;
        p->r->err = e;
    }
}


/*
 * One txn (see txn_apply), on disk when this returns SQLITE_OK. With a group,
 * it joins the group's queue and either waits for a leader to commit it or
 * leads a batch of everything queued itself.
 */
static int txn_run(struct store *s, const struct txn_cmp *cmps, size_t ncmp,
                   const struct txn_op *const ops[2], const size_t nops[2], struct txnres *r)
{
    struct pending me = {.cmps = cmps, .ncmp = ncmp, .ops = ops, .nops = nops, .r = r};
    struct group *g = s->group;
    if (!g) {
        batch_run(s, &me);
        return me.rc;
    }
    pthread_mutex_lock(&g->mu);
    *g->tail = &me;
    g->tail = &me.next;
    while (!me.done) {
        if (g->leading) {
            pthread_cond_wait(&g->cv, &g->mu);
            continue;
        }
        struct pending *batch = g->head;        /* not done and nobody leads: we are queued */
        g->head = NULL;
        g->tail = &g->head;
        g->leading = 1;
        pthread_mutex_unlock(&g->mu);
        batch_run(s, batch);
        pthread_mutex_lock(&g->mu);
        for (struct pending *p = batch, *next; p; p = next) {
            next = p->next;                     /* p's owner may return once done is set */
            p->done = 1;
        }
        g->leading = 0;
        pthread_cond_broadcast(&g->cv);
    }
    pthread_mutex_unlock(&g->mu);
    return me.rc;
}


/* ---------------------------------------------------------------------------
 * Protected read bodies
 * ------------------------------------------------------------------------- */

struct readctx {
    struct store *s;
    const char *key;                /* key for get, prefix for range */
    size_t klen;
    const char *from;               /* range: first key to return (starts with the prefix), or NULL */
    size_t flen;
    lua_Integer limit;
    struct sqlerr err;
};


/*
 * Push the kv record of the current row of st; key columns start at `col`
 * (create_revision, mod_revision, version, value).
 * Stack: [...] -> [..., kv]. May raise (memory): callers run under pcall.
 */
static void push_kv(lua_State *L, sqlite3_stmt *st, const char *key, size_t klen, int col)
{
    lua_createtable(L, 0, 5);
    lua_pushlstring(L, key, klen);
    lua_setfield(L, -2, "key");
    const char *v = sqlite3_column_blob(st, col + 3);
    size_t vlen = (size_t)sqlite3_column_bytes(st, col + 3);
    lua_pushlstring(L, vlen ? v : "", vlen);
    lua_setfield(L, -2, "value");
    lua_pushinteger(L, (lua_Integer)sqlite3_column_int64(st, col));
    lua_setfield(L, -2, "create_revision");
    lua_pushinteger(L, (lua_Integer)sqlite3_column_int64(st, col + 1));
    lua_setfield(L, -2, "mod_revision");
    lua_pushinteger(L, (lua_Integer)sqlite3_column_int64(st, col + 2));
    lua_setfield(L, -2, "version");
}


/*
 * Stack: [ctx] -> [ctx, kv] | [ctx, nil] | [ctx] with ctx->err set.
 */
static int get_body(lua_State *L)
{
    struct readctx *c = lua_touserdata(L, 1);
    sqlite3_stmt *st = c->s->st[ST_GET];
    sqlite3_bind_blob(st, 1, c->key, (int)c->klen, SQLITE_STATIC);
    int rc = sqlite3_step(st);
    if (rc == SQLITE_ROW) {
        push_kv(L, st, c->key, c->klen, 0);
    } else if (rc == SQLITE_DONE) {
        lua_pushnil(L);
    } else {
        sql_fail(c->s, &c->err, rc);
        return 0;
    }
    stmt_finish(st);
    return 1;
}


/*
 * One read transaction: the revision and the rows come from one snapshot.
 * Stack: [ctx] -> [ctx, {kv...}, revision] | [ctx, ...] with ctx->err set.
 */
static int range_body(lua_State *L)
{
    struct readctx *c = lua_touserdata(L, 1);
    struct store *s = c->s;
    char end[STORE_KEY_MAX + 1];
    lua_Integer rev;
    int rc;

    if (stmt_exec(s, ST_BEGIN, &c->err) != SQLITE_OK || read_revision(s, &rev, &c->err) != SQLITE_OK)
        return 0;
    lua_newtable(L);
    sqlite3_stmt *st = s->st[ST_RANGE];
    if (c->from)
        sqlite3_bind_blob(st, 1, c->from, (int)c->flen, SQLITE_STATIC);
    else
        sqlite3_bind_blob(st, 1, c->key, (int)c->klen, SQLITE_STATIC);
    sqlite3_bind_blob(st, 2, end, (int)prefix_end(c->key, c->klen, end), SQLITE_STATIC);
    sqlite3_bind_int64(st, 3, c->limit > 0 ? c->limit : -1);
    lua_Integer n = 0;
    while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
        const char *k = sqlite3_column_blob(st, 0);
        size_t klen = (size_t)sqlite3_column_bytes(st, 0);
        push_kv(L, st, k ? k : "", klen, 1);
        lua_rawseti(L, -2, ++n);
    }
    if (rc != SQLITE_DONE) {
        sql_fail(s, &c->err, rc);
        return 0;
    }
    stmt_finish(st);
    if (stmt_exec(s, ST_COMMIT, &c->err) != SQLITE_OK)
        return 0;
    lua_pushinteger(L, rev);
    return 2;
}


/*
 * Run body(ctx) under lua_pcall. A raise inside it resets the statements and
 * rolls back before being re-raised; an SQLite failure (ctx->err.rc set) is
 * cleaned up the same way and turned into `nil, err`.
 * Stack: [...] -> [..., results of body] or [..., nil, err]. May longjmp.
 */
static int run_read(lua_State *L, struct readctx *c, lua_CFunction body, const char *what)
{
    int base = lua_gettop(L);
    c->err.rc = SQLITE_OK;
    lua_pushcfunction(L, body);
    lua_pushlightuserdata(L, c);
    if (lua_pcall(L, 1, LUA_MULTRET, 0) != LUA_OK) {
        store_abort(c->s);
        lua_error(L);
    }
    if (c->err.rc != SQLITE_OK) {
        store_abort(c->s);
        lua_settop(L, base);
        return push_sqlerr(L, &c->err, what);
    }
    return lua_gettop(L) - base;
}


/* ---------------------------------------------------------------------------
 * Lua API
 * ------------------------------------------------------------------------- */

/***
 * Open (creating if needed) a store file.
 * @function store.open
 * @tparam string path SQLite file; created with its schema if missing
 * @tparam[opt] table opts `{busy_timeout_ms=5000}`: how long a write waits for the lock
 * @return db (userdata "forge.store.db"), or nil, err (store.io / store.busy)
 */
static int l_open(lua_State *L)
{
    static const char *const keys[] = {"busy_timeout_ms", NULL};
    const char *path = luaL_checkstring(L, 1);
    lua_Integer busy = STORE_BUSY_MS;
    if (!lua_isnoneornil(L, 2)) {
        luaL_checktype(L, 2, LUA_TTABLE);
        forge_checkkeys(L, 2, "store.open", keys);
        busy = forge_optintfield(L, 2, "busy_timeout_ms", STORE_BUSY_MS);
        luaL_argcheck(L, busy >= 0 && busy <= INT_MAX, 2, "busy_timeout_ms must be >= 0");
    }
    struct store *s = lua_newuserdatauv(L, sizeof *s, 0);
    memset(s, 0, sizeof *s);
    luaL_setmetatable(L, STORE_MT);             /* from here __gc owns the connection */
    struct sqlerr e;
    if (store_connect(s, path, (int)busy, &e) != SQLITE_OK) {
        store_release(s);
        return push_sqlerr(L, &e, path);
    }
    /* the file's canonical name, so every spelling of a path shares one queue */
    const char *file = sqlite3_db_filename(s->db, "main");
    if (file && *file && !(s->group = group_join(file, (int)busy))) {
        store_release(s);
        return luaL_error(L, "store.open: out of memory");
    }
    return 1;
}


/***
 * Close the connection (also done by __gc and __close). Idempotent.
 * @function db:close
 */
static int l_close(lua_State *L)
{
    store_release(luaL_checkudata(L, 1, STORE_MT));
    return 0;
}


/***
 * @function db:__tostring
 * @return "forge.store.db (path)" or "forge.store.db (closed)"
 */
static int l_tostring(lua_State *L)
{
    struct store *s = luaL_checkudata(L, 1, STORE_MT);
    const char *file = s->db ? sqlite3_db_filename(s->db, "main") : NULL;
    lua_pushfstring(L, "forge.store.db (%s)", s->db ? (file && *file ? file : ":memory:") : "closed");
    return 1;
}


/***
 * Read one key.
 * @function db:get
 * @tparam string key
 * @return kv `{key=, value=, create_revision=, mod_revision=, version=}`;
 *   nil (absent, no second value); or nil, err
 */
static int l_get(lua_State *L)
{
    struct readctx c = {.s = checkdb(L)};
    c.key = forge_txn_checkkey(L, 2, &c.klen, 0);
    return run_read(L, &c, get_body, "get");
}


/***
 * Every key starting with prefix, sorted by key (byte order).
 * @function db:range
 * @tparam string prefix "" for all keys
 * @tparam[opt] table opts `{limit=n, from=key}`: limit 0 or absent: no limit; from: start at
 * this key (it starts with prefix), for reading a long range page by page
 * @return array of kv, store revision of the snapshot; or nil, err
 */
static int l_range(lua_State *L)
{
    static const char *const keys[] = {"limit", "from", NULL};
    struct readctx c = {.s = checkdb(L)};
    c.key = forge_txn_checkkey(L, 2, &c.klen, 1);
    if (!lua_isnoneornil(L, 3)) {
        luaL_checktype(L, 3, LUA_TTABLE);
        forge_checkkeys(L, 3, "range", keys);
        c.limit = forge_optintfield(L, 3, "limit", 0);
        luaL_argcheck(L, c.limit >= 0, 3, "limit must be >= 0");
        c.from = forge_range_from(L, 3, c.key, c.klen, &c.flen);
    }
    return run_read(L, &c, range_body, "range");
}


/***
 * Write a key.
 * @function db:put
 * @tparam string key
 * @tparam string value any bytes, at most 8 MiB
 * @tparam[opt] table opts `{prev_revision=n}`: only if the key's mod_revision is n (0: absent)
 * @return new store revision; or nil, err (store.conflict when prev_revision does not match)
 */
static int l_put(lua_State *L)
{
    struct store *s = checkdb(L);
    struct txn_cmp c = {.kind = TXN_CMP_MODREV};
    struct txn_op o = {.kind = TXN_OP_PUT};
    o.key = c.key = forge_txn_checkkey(L, 2, &o.klen, 0);
    c.klen = o.klen;
    o.val = forge_txn_checkvalue(L, 3, &o.vlen);
    size_t ncmp = (size_t)opt_prev_revision(L, 4, "put", &c.n);

    const struct txn_op *ops[2] = {&o, NULL};
    const size_t nops[2] = {1, 0};
    struct txnres r;
    if (txn_run(s, &c, ncmp, ops, nops, &r) != SQLITE_OK)
        return push_sqlerr(L, &r.err, "put");
    if (!r.succeeded)
        return push_conflict(L, "put", c.key, c.n, r.found);
    lua_pushinteger(L, r.revision);
    return 1;
}


/***
 * Delete a key.
 * @function db:delete
 * @tparam string key
 * @tparam[opt] table opts `{prev_revision=n}` as for put
 * @return store revision (new if something was deleted), deleted count (0 or 1); or nil, err
 */
static int l_delete(lua_State *L)
{
    struct store *s = checkdb(L);
    struct txn_cmp c = {.kind = TXN_CMP_MODREV};
    struct txn_op o = {.kind = TXN_OP_DELETE};
    o.key = c.key = forge_txn_checkkey(L, 2, &o.klen, 0);
    c.klen = o.klen;
    size_t ncmp = (size_t)opt_prev_revision(L, 3, "delete", &c.n);

    const struct txn_op *ops[2] = {&o, NULL};
    const size_t nops[2] = {1, 0};
    struct txnres r;
    if (txn_run(s, &c, ncmp, ops, nops, &r) != SQLITE_OK)
        return push_sqlerr(L, &r.err, "delete");
    if (!r.succeeded)
        return push_conflict(L, "delete", c.key, c.n, r.found);
    lua_pushinteger(L, r.revision);
    lua_pushinteger(L, r.deleted);
    return 2;
}


/* The store has no leases and leaves compare values unbounded. */
static const struct txn_rules store_txn_rules = {.bound_cmp_value = 0, .check_lease = NULL};
_Static_assert(STORE_KEY_MAX == TXN_KEY_MAX && STORE_VALUE_MAX == TXN_VALUE_MAX, "store and txn limits differ");


/***
 * Atomic compare-then-write.
 * @function db:txn
 * @tparam table t `{compare={...}, success={...}, failure={...}}`; compares are
 *   `{key=, mod_revision=n}` (0: absent), `{key=, exists=bool}`, `{key=, value=s}`;
 *   ops are `{op="put", key=, value=}`, `{op="delete", key=}`, `{op="delete_prefix", prefix=}`
 * @return succeeded (all compares held: success applied, else failure applied),
 *   store revision after the txn; or nil, err
 */
static int l_txn(lua_State *L)
{
    static const char *const keys[] = {"compare", "success", "failure", NULL};
    struct store *s = checkdb(L);
    luaL_argexpected(L, lua_istable(L, 2), 2, "table (" TXN_USAGE ")");
    lua_settop(L, 2);
    forge_checkkeys(L, 2, "txn", keys);

    struct txn t;
    forge_txn_parse(L, 2, &store_txn_rules, &t);                     /* [db, t, cmps, ok, ko] */

    struct txnres r;
    if (txn_run(s, t.cmps, t.ncmp, t.ops, t.nops, &r) != SQLITE_OK)
        return push_sqlerr(L, &r.err, "txn");
    lua_pushboolean(L, r.succeeded);
    lua_pushinteger(L, r.revision);
    return 2;
}


#define STORE_BATCH_MAX 1000

/***
 * Several txns in one SQLite transaction and one commit (one fsync), as concurrent writers
 * of one process share: each judged on its own compares, in order, each that writes with its
 * own revision. SQLite only: the etcd backend has no such call.
 * @function db:batch
 * @tparam table list array of txn tables as for db:txn (at most 1000)
 * @return array of `{succeeded=, revision=}`, one per txn; or nil, err when the batch failed
 *   (then nothing of it was written)
 */
static int l_batch(lua_State *L)
{
    static const char *const keys[] = {"compare", "success", "failure", NULL};
    struct store *s = checkdb(L);
    luaL_checktype(L, 2, LUA_TTABLE);
    lua_settop(L, 2);
    lua_Integer n = (lua_Integer)lua_rawlen(L, 2);
    luaL_argcheck(L, n >= 1 && n <= STORE_BATCH_MAX, 2, "1 to 1000 txn tables expected");
    luaL_checkstack(L, 3 * (int)n + 4, "db:batch");
    /* the parsed txns and their results live in one userdata; the parses stay on the stack */
    struct txn *t = lua_newuserdatauv(L, (size_t)n * (sizeof *t + sizeof(struct pending) + sizeof(struct txnres)), 0);
    struct pending *p = (struct pending *)(t + n);
    struct txnres *r = (struct txnres *)(p + n);
    for (lua_Integer i = 0; i < n; i++) {
        luaL_argexpected(L, lua_geti(L, 2, i + 1) == LUA_TTABLE, 2, "array of txn tables");
        int ti = lua_gettop(L);
        forge_checkkeys(L, ti, "batch", keys);
        forge_txn_parse(L, ti, &store_txn_rules, &t[i]);            /* [.., ti, cmps, ok, ko] */
        lua_remove(L, ti);
        p[i] = (struct pending){.cmps = t[i].cmps, .ncmp = t[i].ncmp, .ops = t[i].ops, .nops = t[i].nops,
                                .r = &r[i], .next = i + 1 < n ? &p[i + 1] : NULL};
    }
    batch_run(s, p);
    if (p[0].rc != SQLITE_OK)
        return push_sqlerr(L, &r[0].err, "batch");
    lua_createtable(L, (int)n, 0);
    for (lua_Integer i = 0; i < n; i++) {
        lua_createtable(L, 0, 2);
        lua_pushboolean(L, r[i].succeeded);
        lua_setfield(L, -2, "succeeded");
        lua_pushinteger(L, r[i].revision);
        lua_setfield(L, -2, "revision");
        lua_rawseti(L, -2, i + 1);
    }
    return 1;
}


/***
 * The current store revision.
 * @function db:revision
 * @return integer; or nil, err
 */
static int l_revision(lua_State *L)
{
    struct store *s = checkdb(L);
    struct sqlerr e;
    lua_Integer rev;
    if (read_revision(s, &rev, &e) != SQLITE_OK) {
        store_abort(s);
        return push_sqlerr(L, &e, "revision");
    }
    lua_pushinteger(L, rev);
    return 1;
}


/*
 * Copy the whole of s into the open, empty database dst in one backup step: the copy is the
 * store as of one moment, and writers on other connections go on meanwhile (WAL). A busy or
 * locked source is retried for up to STORE_BUSY_MS. Then the copy is checked (quick_check)
 * and its revision read into rev[64]. Runs no Lua.
 */
static int backup_into(struct store *s, sqlite3 *dst, char *rev, struct sqlerr *e)
{
    sqlite3_backup *b = sqlite3_backup_init(dst, "main", s->db, "main");
    if (!b) {
        e->rc = sqlite3_errcode(dst);
        snprintf(e->msg, sizeof e->msg, "%s", sqlite3_errmsg(dst));
        return e->rc;
    }
    int rc, waited = 0;
    while ((rc = sqlite3_backup_step(b, -1)) == SQLITE_BUSY || rc == SQLITE_LOCKED) {
        if (waited >= STORE_BUSY_MS)
            break;
        sqlite3_sleep(10);
        waited += 10;
    }
    sqlite3_backup_finish(b);
    if (rc != SQLITE_DONE) {
        e->rc = rc;
        snprintf(e->msg, sizeof e->msg, "%s", sqlite3_errstr(rc));
        return rc;
    }
    char check[64] = "";
    rc = sqlite3_exec(dst, "PRAGMA quick_check", first_column_cb, check, NULL);
    if (rc == SQLITE_OK && strcmp(check, "ok") != 0) {
        e->rc = SQLITE_CORRUPT;
        snprintf(e->msg, sizeof e->msg, "the copy fails its check: %s", check);
        return e->rc;
    }
    if (rc == SQLITE_OK)
        rc = sqlite3_exec(dst, "SELECT revision FROM meta WHERE id = 0", first_column_cb, rev, NULL);
    if (rc != SQLITE_OK) {
        e->rc = rc;
        snprintf(e->msg, sizeof e->msg, "%s", sqlite3_errmsg(dst));
    }
    return rc;
}


/***
 * Copy the store into a new file with SQLite's online backup API: a consistent copy of one
 * moment, taken while the broker goes on writing. The file is created with mode 0600 (it holds
 * every secret of the store) and removed again when the copy fails.
 * @function db:backup
 * @tparam string path a file that does not exist yet
 * @return the store revision of the copy; or nil, err (store.exists when path exists,
 *   store.io, store.busy)
 */
static int l_backup(lua_State *L)
{
    struct store *s = checkdb(L);
    const char *path = luaL_checkstring(L, 2);
    int fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd < 0)
        return forge_pusherror(L, errno == EEXIST ? "store.exists" : "store.io", 0, "backup: cannot create %s: %s",
                               path, strerror(errno));
    close(fd);
    sqlite3 *dst = NULL;
    struct sqlerr e = {0};
    char rev[64] = "";
    int rc = sqlite3_open_v2(path, &dst, SQLITE_OPEN_READWRITE, NULL);
    if (rc != SQLITE_OK) {
        e.rc = rc;
        snprintf(e.msg, sizeof e.msg, "%s", dst ? sqlite3_errmsg(dst) : sqlite3_errstr(rc));
    } else {
        rc = backup_into(s, dst, rev, &e);
    }
    if (sqlite3_close(dst) != SQLITE_OK && rc == SQLITE_OK) {
        e.rc = rc = SQLITE_IOERR;
        snprintf(e.msg, sizeof e.msg, "cannot close the copy");
    }
    if (rc != SQLITE_OK) {
        unlink(path);
        return push_sqlerr(L, &e, "backup");
    }
    lua_pushinteger(L, (lua_Integer)strtoll(rev, NULL, 10));
    return 1;
}


int luaopen_forge_store(lua_State *L)
{
    static const luaL_Reg lib[] = {
        {"open", l_open},
        {NULL, NULL},
    };
    static const luaL_Reg meth[] = {
        {"get", l_get},
        {"range", l_range},
        {"put", l_put},
        {"delete", l_delete},
        {"txn", l_txn},
        {"batch", l_batch},
        {"revision", l_revision},
        {"backup", l_backup},
        {"close", l_close},
        {NULL, NULL},
    };
    static const luaL_Reg metameth[] = {
        {"__gc", l_close},
        {"__close", l_close},
        {"__tostring", l_tostring},
        {"__index", NULL},
        {NULL, NULL},
    };
    forge_newclass(L, STORE_MT, meth, metameth);
    luaL_newlib(L, lib);
    forge_setmodinfo(L, "forge.store");
    return 1;
}
