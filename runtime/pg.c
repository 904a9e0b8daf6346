/*
 * forge.pg — run SQL statements against PostgreSQL from the broker, on libpq.
 *
 * What this adds over libpq (which does the protocol, the authentication, the escaping and
 * the connect timeout): one call is one connection (connect, the statements in order, each
 * on its own in autocommit, close) described by an options table; a format form whose %I and
 * %L are filled with PQescapeIdentifier / PQescapeLiteral (DDL takes no $n parameters); one
 * timeout for libpq's connect_timeout, the session's statement_timeout and a client-side
 * bound on each statement's wait (libpq has none: a silent server would hold the thread);
 * refusals matched against tolerate patterns; failures as forge.error values with one-line
 * messages that never hold the password, the statement text or its secret values.
 *
 * Memory: the PGconn, the current PGresult and an escaped string being copied are owned by a
 * userdata with __gc, so a raise (memory, a malformed tolerate pattern) leaks nothing; the
 * call frees them itself before it returns.
 *
 * Threads: libpq is thread-safe (checked when the module loads); nothing here is a mutable
 * static; notices are dropped (libpq would print them on the broker's stderr, its log).
 */
#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <libpq-fe.h>

#include "forge/forge.h"

#define PG_CALL_MT      "forge.pg.call"
#define PG_GRACE        1.0             /* seconds the client waits past statement_timeout */
#define PG_MAX_TIMEOUT  86400           /* seconds */
#define PG_MAX_STMTS    1000000
#define PG_MAX_PARAMS   65535           /* the protocol's limit */
#define PG_SCRUB_MIN    4               /* shorter values are not scrubbed from messages */

/* One call's libpq resources; the userdata's __gc frees whatever is still held. */
struct pg_call {
    PGconn *conn;
    PGresult *res;                      /* the current statement's result */
    char *esc;                          /* an escaped identifier or literal being copied */
};

/* The options of a call (strings held by the options table). */
struct pg_opts {
    const char *host, *user, *password, *database;
    int port;
    double timeout;
};

/* How waiting for, or running, a statement ended. */
enum pg_end {
    PG_DONE,                            /* ready / c->res holds its result */
    PG_REFUSED,                         /* c->res holds the server's error; the connection is fine */
    PG_UNSUPPORTED,                     /* c->res holds a result pg.exec does not read (COPY) */
    PG_LOST,                            /* the connection failed */
    PG_TIMEOUT,                         /* no answer by the deadline */
};


/* ------------------------------------------------------------------------ */
/* small helpers                                                            */
/* ------------------------------------------------------------------------ */

static double now_mono(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}


/* Milliseconds to the deadline, rounded up; 0 when it has passed. */
static int ms_left(double deadline)
{
    double left = deadline - now_mono();
    return left <= 0 ? 0 : (int)(left * 1000) + 1;
}


static void call_free(struct pg_call *c)
{
    PQfreemem(c->esc);
    c->esc = NULL;
    PQclear(c->res);
    c->res = NULL;
    PQfinish(c->conn);
    c->conn = NULL;
}


/* __gc of the call context: [ctx] -> [] */
static int l_call_gc(lua_State *L)
{
    call_free(luaL_checkudata(L, 1, PG_CALL_MT));
    return 0;
}


static void drop_notice(void *arg, const char *message)
{
    (void)arg;
    (void)message;
}


/*
 * Length of the table at idx when its keys are exactly 1..n, else -1.
 * Stack unchanged.
 */
static lua_Integer array_len(lua_State *L, int idx)
{
    idx = lua_absindex(L, idx);
    lua_Integer n = (lua_Integer)lua_rawlen(L, idx), count = 0;
    lua_pushnil(L);
    while (lua_next(L, idx)) {
        lua_pop(L, 1);
        int isint = 0;
        lua_Integer k = lua_type(L, -1) == LUA_TNUMBER ? lua_tointegerx(L, -1, &isint) : 0;
        if (!isint || k < 1 || k > n) {
            lua_pop(L, 1);
            return -1;
        }
        count++;
    }
    return count == n ? n : -1;
}


/*
 * The parameter or argument on top as text: strings as they are, integers and integral
 * floats (a port that went through JSON) in decimal, other floats as Lua prints them.
 * Raises unless it is a string or a number, without NUL bytes; `field` ("" or ".args")
 * and i, j name it.
 *
 * Stack: [... v] -> [... s]
 */
static void to_text(lua_State *L, int i, const char *field, int j)
{
    int t = lua_type(L, -1), isint = 0;
    lua_Integer iv = lua_tointegerx(L, -1, &isint);
    if (t == LUA_TNUMBER && isint) {
        lua_pop(L, 1);
        lua_pushfstring(L, "%I", (LUAI_UACINT)iv);
    }
    size_t len = 0;
    const char *s = t == LUA_TSTRING || t == LUA_TNUMBER ? lua_tolstring(L, -1, &len) : NULL;
    if (!s || strlen(s) != len)
        luaL_error(L, "pg.exec: statements[%d]%s[%d] must be a string (without NUL bytes) or a number",
                   i, field, j);
}


/*
 * The next directive of the NUL-terminated format f from *pos: *lit gets the length of the
 * literal text before it, and *pos moves past it. Returns the character after the '%'
 * ('I', 'L', '%', any other, or '\0' for a '%' that ends the format), or -1 at the end.
 */
static int fmt_next(const char *f, size_t *pos, size_t *lit)
{
    const char *s = f + *pos;
    const char *p = strchr(s, '%');
    if (!p) {
        *lit = strlen(s);
        *pos += *lit;
        return -1;
    }
    *lit = (size_t)(p - s);
    *pos += *lit + (p[1] ? 2 : 1);
    return (unsigned char)p[1];
}


/*
 * Push s as one line: each run of white space (newlines, tabs) becomes one space, with none
 * at either end.
 *
 * Stack: [...] -> [... line]
 */
static void push_oneline(lua_State *L, const char *s)
{
    luaL_Buffer b;
    luaL_buffinit(L, &b);
    int space = 0;
    for (; *s; s++) {
        if (isspace((unsigned char)*s)) {
            space = 1;
            continue;
        }
        if (space && luaL_bufflen(&b) > 0)
            luaL_addchar(&b, ' ');
        space = 0;
        luaL_addchar(&b, *s);
    }
    luaL_pushresult(&b);
}


/* Stack: [... msg] -> [... msg with every `secret` replaced by "***"] */
static void scrub_one(lua_State *L, const char *secret)
{
    if (secret && strlen(secret) >= PG_SCRUB_MIN) {
        luaL_gsub(L, lua_tostring(L, -1), secret, "***");
        lua_remove(L, -2);
    }
}


/*
 * Scrub from the message on top what may be secret: the password and, with a plan entry
 * (entry != 0), its values — a list entry's parameters, a format entry's %L arguments
 * (%I arguments are names, and stay).
 *
 * Stack: [... msg] -> [... msg']
 */
static void scrub(lua_State *L, const char *password, int entry)
{
    scrub_one(L, password);
    if (!entry)
        return;
    lua_getfield(L, entry, "format");
    int isfmt = lua_toboolean(L, -1);
    lua_rawgeti(L, entry, 1);
    const char *f = lua_tostring(L, -1);            /* held by the entry */
    lua_pop(L, 2);
    lua_Integer n = (lua_Integer)lua_rawlen(L, entry);
    size_t pos = 0, lit;
    int d = 'L';                                    /* a list entry: every value counts as %L */
    for (lua_Integer j = 2; j <= n; j++) {
        while (isfmt && (d = fmt_next(f, &pos, &lit)) == '%')     /* value j fills the next %I or %L */
            ;
        if (d != 'L')
            continue;
        lua_rawgeti(L, entry, j);
        const char *v = lua_tostring(L, -1);        /* held by the entry */
        lua_pop(L, 1);
        scrub_one(L, v);
    }
}


/* ------------------------------------------------------------------------ */
/* checking the options (misuse raises before anything connects)            */
/* ------------------------------------------------------------------------ */

/* Option `key` of the options at 1: a non-empty string without NUL bytes, or NULL when absent. */
static const char *opt_text(lua_State *L, const char *key, int required)
{
    size_t len = 0;
    const char *v = NULL;
    int t = lua_getfield(L, 1, key);
    if (t == LUA_TSTRING)
        v = lua_tolstring(L, -1, &len);             /* held by the options */
    else if (t != LUA_TNIL)
        luaL_error(L, "pg.exec: option '%s' must be a string", key);
    lua_pop(L, 1);
    if (!v && required)
        luaL_error(L, "pg.exec: option '%s' is required", key);
    if (v && (len == 0 || strlen(v) != len))
        luaL_error(L, "pg.exec: option '%s' must be a non-empty string without NUL bytes", key);
    return v;
}


static void read_opts(lua_State *L, struct pg_opts *o)
{
    o->host = opt_text(L, "host", 1);
    lua_Integer port = forge_optintfield(L, 1, "port", 0);
    if (port < 1 || port > 65535)
        luaL_error(L, "pg.exec: option 'port' must be an integer in 1..65535");
    o->port = (int)port;
    o->user = opt_text(L, "user", 1);
    o->password = opt_text(L, "password", 0);
    o->database = opt_text(L, "database", 0);
    if (!o->database)
        o->database = "postgres";
    o->timeout = forge_optnumfield(L, 1, "timeout", 10);
    if (!(o->timeout > 0 && o->timeout <= PG_MAX_TIMEOUT))
        luaL_error(L, "pg.exec: option 'timeout' must be in (0, %d] seconds", PG_MAX_TIMEOUT);
}


/*
 * Check a statement {format=, args=} and fill its plan entry: {format, arg..., format=true}.
 *
 * Stack: [... stmt entry] -> [... stmt entry]
 */
static void plan_format(lua_State *L, int i)
{
    static const char *const keys[] = {"format", "args", NULL};
    int stmt = lua_absindex(L, -2), entry = lua_absindex(L, -1);
    lua_pushfstring(L, "pg.exec: statements[%d]", i);
    forge_checkkeys(L, stmt, lua_tostring(L, -1), keys);
    lua_pop(L, 1);
    size_t len;
    if (lua_getfield(L, stmt, "format") != LUA_TSTRING)
        luaL_error(L, "pg.exec: statements[%d].format must be a string", i);
    const char *f = lua_tolstring(L, -1, &len);
    if (strlen(f) != len)
        luaL_error(L, "pg.exec: statements[%d].format must not contain NUL bytes", i);
    lua_rawseti(L, entry, 1);                       /* f stays held by the statement */
    size_t pos = 0, lit;
    int d, want = 0;
    while ((d = fmt_next(f, &pos, &lit)) >= 0) {
        if (d == 'I' || d == 'L')
            want++;
        else if (d == '\0')
            luaL_error(L, "pg.exec: statements[%d].format ends in a lone '%%'", i);
        else if (d != '%')
            luaL_error(L, "pg.exec: statements[%d].format: unknown directive '%%%c' (%%I, %%L, %%%%)", i, d);
    }
    int t = lua_getfield(L, stmt, "args");          /* [... stmt entry args] */
    lua_Integer n = t == LUA_TNIL ? 0 : t == LUA_TTABLE ? array_len(L, -1) : -1;
    if (n < 0)
        luaL_error(L, "pg.exec: statements[%d].args must be an array", i);
    if (n != want)
        luaL_error(L, "pg.exec: statements[%d]: the format takes %d arguments, args has %d", i, want, (int)n);
    for (int j = 1; j <= want; j++) {
        lua_rawgeti(L, -1, j);
        to_text(L, i, ".args", j);
        lua_rawseti(L, entry, j + 1);
    }
    lua_pop(L, 1);
    lua_pushboolean(L, 1);
    lua_setfield(L, entry, "format");
}


/*
 * Check a statement {sql, param...} and fill its plan entry: {sql, param...} as text.
 *
 * Stack: [... stmt entry] -> [... stmt entry]
 */
static void plan_list(lua_State *L, int i)
{
    int stmt = lua_absindex(L, -2), entry = lua_absindex(L, -1);
    lua_Integer n = array_len(L, stmt);
    if (n < 1 || lua_rawgeti(L, stmt, 1) != LUA_TSTRING)
        luaL_error(L, "pg.exec: statements[%d] must be {sql, param...} (no holes) or {format=, args=}", i);
    size_t len;
    const char *sql = lua_tolstring(L, -1, &len);
    if (len == 0 || strlen(sql) != len)
        luaL_error(L, "pg.exec: statements[%d][1] must be SQL text without NUL bytes", i);
    lua_rawseti(L, entry, 1);
    if (n - 1 > PG_MAX_PARAMS)
        luaL_error(L, "pg.exec: statements[%d] has more than %d parameters", i, PG_MAX_PARAMS);
    for (int j = 2; j <= (int)n; j++) {
        lua_rawgeti(L, stmt, j);
        to_text(L, i, "", j);
        lua_rawseti(L, entry, j);
    }
}


/*
 * Check every statement and build the plan: plan[i] = {text, value...}, every value as text.
 *
 * Stack: [...] -> [... plan]
 */
static void build_plan(lua_State *L, int stmts, int n)
{
    lua_createtable(L, n, 0);
    for (int i = 1; i <= n; i++) {
        if (lua_rawgeti(L, stmts, i) != LUA_TTABLE)                 /* [... plan stmt] */
            luaL_error(L, "pg.exec: statements[%d] must be a table", i);
        lua_createtable(L, 2, 1);                                   /* [... plan stmt entry] */
        int isfmt = lua_getfield(L, -2, "format") != LUA_TNIL;
        lua_pop(L, 1);
        if (isfmt)
            plan_format(L, i);
        else
            plan_list(L, i);
        lua_rawseti(L, -3, i);
        lua_pop(L, 1);
    }
}


/*
 * opts.tolerate (an array of Lua patterns) and string.find, taken from the string
 * metatable (so it works where the global `string` is hidden). Returns the index of
 * tolerate, or 0 when there is none.
 *
 * Stack: [...] -> [... tolerate find] or [... nil nil]
 */
static int read_tolerate(lua_State *L)
{
    int t = lua_getfield(L, 1, "tolerate");
    if (t == LUA_TNIL) {
        lua_pushnil(L);
        return 0;
    }
    int tol = lua_gettop(L);
    lua_Integer n = t == LUA_TTABLE ? array_len(L, tol) : -1;
    for (lua_Integer k = 1; k <= n; k++) {
        if (lua_rawgeti(L, tol, k) != LUA_TSTRING)
            n = -1;
        lua_pop(L, 1);
    }
    if (n < 0)
        luaL_error(L, "pg.exec: option 'tolerate' must be an array of patterns (strings)");
    lua_pushliteral(L, "");                                         /* [... tol ""] */
    if (luaL_getmetafield(L, -1, "__index") != LUA_TTABLE ||        /* [... tol "" string] */
        lua_getfield(L, -1, "find") != LUA_TFUNCTION)               /* [... tol "" string find] */
        luaL_error(L, "pg.exec: string.find is not available");
    lua_replace(L, -3);                                             /* [... tol find string] */
    lua_pop(L, 1);
    return tol;
}


/* ------------------------------------------------------------------------ */
/* libpq                                                                    */
/* ------------------------------------------------------------------------ */

/* Connect with the options. Returns 0, or -1 (c->conn, if any, holds the reason). */
static int pg_connect(struct pg_call *c, const struct pg_opts *o)
{
    char port[8], connect_timeout[16], options[48];
    snprintf(port, sizeof port, "%d", o->port);
    snprintf(connect_timeout, sizeof connect_timeout, "%d", (int)ceil(o->timeout));
    snprintf(options, sizeof options, "-c statement_timeout=%d", (int)ceil(o->timeout * 1000));
    /* a NULL value (no password) is left unset */
    const char *const keys[] = {"host", "port", "user", "password", "dbname", "connect_timeout", "options",
                                "application_name", "client_encoding", "sslmode", "gssencmode", NULL};
    const char *const values[] = {o->host, port, o->user, o->password, o->database, connect_timeout, options,
                                  "forge", "UTF8", "prefer", "disable", NULL};
    c->conn = PQconnectdbParams(keys, values, 0);   /* 0: dbname is a name, never a conninfo */
    if (PQstatus(c->conn) != CONNECTION_OK)
        return -1;
    PQsetErrorVerbosity(c->conn, PQERRORS_TERSE);   /* no DETAIL, no "LINE 1: <statement>" */
    PQsetNoticeProcessor(c->conn, drop_notice, NULL);
    return 0;
}


/* Wait until libpq can hand over a result (or the end of them) without blocking. */
static enum pg_end await_result(PGconn *conn, double deadline)
{
    while (PQisBusy(conn)) {
        struct pollfd pf = {.fd = PQsocket(conn), .events = POLLIN};
        if (pf.fd < 0)
            return PG_LOST;
        int ms = ms_left(deadline);
        int n = ms > 0 ? poll(&pf, 1, ms) : 0;
        if (n < 0 && errno == EINTR)
            continue;
        if (n == 0)
            return PG_TIMEOUT;
        if (n < 0 || !PQconsumeInput(conn))
            return PG_LOST;
    }
    return PG_DONE;
}


static enum pg_end result_end(const PGresult *res)
{
    switch (PQresultStatus(res)) {
    case PGRES_COMMAND_OK:
    case PGRES_TUPLES_OK:
    case PGRES_EMPTY_QUERY:
        return PG_DONE;
    case PGRES_FATAL_ERROR:
        return PG_REFUSED;
    default:
        return PG_UNSUPPORTED;
    }
}


/*
 * Run one statement (the extended protocol: exactly one statement, in autocommit) and
 * collect its result into c->res (a first error is kept over what follows it).
 */
static enum pg_end run_statement(struct pg_call *c, const char *sql, int nparams,
                                 const char *const *params, double deadline)
{
    if (!PQsendQueryParams(c->conn, sql, nparams, NULL, params, NULL, NULL, 0))
        return PG_LOST;
    for (;;) {
        enum pg_end w = await_result(c->conn, deadline);
        if (w != PG_DONE)
            return w;
        PGresult *r = PQgetResult(c->conn);
        if (!r)
            break;
        if (c->res && PQresultStatus(c->res) == PGRES_FATAL_ERROR) {
            PQclear(r);
            continue;
        }
        PQclear(c->res);
        c->res = r;
        if (result_end(r) == PG_UNSUPPORTED)        /* COPY: PQgetResult would repeat it */
            return PG_UNSUPPORTED;
    }
    if (PQstatus(c->conn) != CONNECTION_OK || !c->res)
        return PG_LOST;
    return result_end(c->res);
}


/* ------------------------------------------------------------------------ */
/* Lua side of one statement                                                */
/* ------------------------------------------------------------------------ */

/*
 * The SQL of a format entry: the literal text, with %I and %L replaced by the argument
 * escaped by PQescapeIdentifier / PQescapeLiteral, and %% by %. Returns 0, or -1 when libpq
 * refused to escape an argument (its reason in PQerrorMessage).
 *
 * Stack: [... entry] -> [... entry sql] (on -1: [... entry <buffer>])
 * May longjmp (memory); c->esc is owned by the call context meanwhile.
 */
static int expand_format(lua_State *L, struct pg_call *c, int entry)
{
    lua_rawgeti(L, entry, 1);
    const char *f = lua_tostring(L, -1);            /* held by the entry */
    lua_pop(L, 1);
    luaL_Buffer b;
    luaL_buffinit(L, &b);
    size_t pos = 0, lit;
    int arg = 2;
    for (;;) {
        size_t start = pos;
        int d = fmt_next(f, &pos, &lit);
        luaL_addlstring(&b, f + start, lit);
        if (d < 0)
            break;
        if (d == '%') {
            luaL_addchar(&b, '%');
            continue;
        }
        size_t len;
        lua_rawgeti(L, entry, arg++);               /* balanced: pushed and popped between buffer calls */
        const char *s = lua_tolstring(L, -1, &len); /* held by the entry */
        lua_pop(L, 1);
        c->esc = d == 'I' ? PQescapeIdentifier(c->conn, s, len) : PQescapeLiteral(c->conn, s, len);
        if (!c->esc)
            return -1;
        luaL_addstring(&b, c->esc);
        PQfreemem(c->esc);
        c->esc = NULL;
    }
    luaL_pushresult(&b);
    return 0;
}


/* Stack: [...] -> [... {command=, rows=, affected=}] */
static void push_reply(lua_State *L, PGresult *res)
{
    lua_createtable(L, 0, 3);
    lua_pushstring(L, PQcmdStatus(res));
    lua_setfield(L, -2, "command");
    int nrows = PQntuples(res), ncols = PQnfields(res);
    lua_createtable(L, nrows, 0);
    for (int r = 0; r < nrows; r++) {
        lua_createtable(L, ncols, 0);
        for (int f = 0; f < ncols; f++) {
            if (PQgetisnull(res, r, f))
                lua_pushboolean(L, 0);
            else
                lua_pushlstring(L, PQgetvalue(res, r, f), (size_t)PQgetlength(res, r, f));
            lua_rawseti(L, -2, f + 1);
        }
        lua_rawseti(L, -2, r + 1);
    }
    lua_setfield(L, -2, "rows");
    lua_pushinteger(L, (lua_Integer)strtoll(PQcmdTuples(res), NULL, 10));  /* "" → 0 */
    lua_setfield(L, -2, "affected");
}


/* Stack: [...] -> [... {command="TOLERATED", rows={}, affected=0, sqlstate=}] */
static void push_tolerated(lua_State *L, const char *sqlstate)
{
    lua_createtable(L, 0, 4);
    lua_pushliteral(L, "TOLERATED");
    lua_setfield(L, -2, "command");
    lua_newtable(L);
    lua_setfield(L, -2, "rows");
    lua_pushinteger(L, 0);
    lua_setfield(L, -2, "affected");
    lua_pushstring(L, sqlstate);
    lua_setfield(L, -2, "sqlstate");
}


/*
 * Whether "<sqlstate> <message>" matches one of the tolerate patterns.
 *
 * Stack: [... message] -> [... message]
 * May longjmp (a malformed pattern).
 */
static int tolerated(lua_State *L, int tol, int find, const char *sqlstate)
{
    lua_pushfstring(L, "%s %s", sqlstate, lua_tostring(L, -1));    /* [... message text] */
    int hit = 0;
    lua_Integer n = (lua_Integer)lua_rawlen(L, tol);
    for (lua_Integer k = 1; k <= n && !hit; k++) {
        lua_pushvalue(L, find);
        lua_pushvalue(L, -2);
        lua_rawgeti(L, tol, k);
        lua_call(L, 2, 1);
        hit = !lua_isnil(L, -1);
        lua_pop(L, 1);
    }
    lua_pop(L, 1);
    return hit;
}


/*
 * nil, err for statement i from the one-line message on top:
 * "statement <i>: [<sqlstate>: ]<message>", with err.statement and err.sqlstate.
 *
 * Stack: [... message] -> [... message nil err]
 */
static int statement_error(lua_State *L, const char *code, int retryable, int i, const char *sqlstate)
{
    const char *msg = lua_tostring(L, -1);
    if (sqlstate)
        forge_pusherror(L, code, retryable, "statement %d: %s: %s", i, sqlstate, msg);
    else
        forge_pusherror(L, code, retryable, "statement %d: %s", i, msg);
    lua_pushinteger(L, i);
    lua_setfield(L, -2, "statement");
    if (sqlstate) {
        lua_pushstring(L, sqlstate);
        lua_setfield(L, -2, "sqlstate");
    }
    return 2;
}


/*
 * The outcome of statement i that did not end PG_DONE: its tolerated reply (returns 0) or
 * nil, err (returns 2).
 *
 * Stack: [...] -> [... reply] or [... nil err] (with the message below)
 */
static int statement_failed(lua_State *L, struct pg_call *c, const struct pg_opts *o, int entry, int i,
                            enum pg_end end, int tol, int find)
{
    const char *state = c->res ? PQresultErrorField(c->res, PG_DIAG_SQLSTATE) : NULL;
    switch (end) {
    case PG_TIMEOUT:
        lua_pushfstring(L, "no answer within %f s", (lua_Number)(o->timeout + PG_GRACE));
        return statement_error(L, "pg.timeout", 1, i, NULL);
    case PG_UNSUPPORTED:
        lua_pushfstring(L, "unsupported result %s (COPY is not supported)",
                        PQresStatus(PQresultStatus(c->res)));
        return statement_error(L, "pg.error", 0, i, NULL);
    case PG_LOST:
        push_oneline(L, PQerrorMessage(c->conn));
        scrub(L, o->password, entry);
        return statement_error(L, "pg.io", 1, i, state);
    default:                                        /* PG_REFUSED */
        break;
    }
    const char *primary = PQresultErrorField(c->res, PG_DIAG_MESSAGE_PRIMARY);
    push_oneline(L, primary ? primary : PQresultErrorMessage(c->res));
    scrub(L, o->password, entry);
    if (state && tol && tolerated(L, tol, find, state)) {
        push_tolerated(L, state);
        return 0;
    }
    if (state && strcmp(state, "57014") == 0)       /* query_canceled: statement_timeout */
        return statement_error(L, "pg.timeout", 1, i, state);
    return statement_error(L, "pg.error", 0, i, state);
}


/*
 * Run statement i of the plan and push its reply (returns 0), or nil, err (returns 2).
 *
 * Stack: [... plan ...] -> [... plan ... <scratch> reply] or [... <scratch> nil err]
 */
static int exec_one(lua_State *L, struct pg_call *c, const struct pg_opts *o, int plan, int i,
                    int tol, int find)
{
    lua_rawgeti(L, plan, i);                                        /* [... entry] */
    int entry = lua_gettop(L);
    lua_getfield(L, entry, "format");
    int isfmt = lua_toboolean(L, -1);
    lua_pop(L, 1);
    int nparams = isfmt ? 0 : (int)lua_rawlen(L, entry) - 1;
    if (isfmt && expand_format(L, c, entry) < 0) {                  /* [... entry sql] */
        push_oneline(L, PQerrorMessage(c->conn));
        return statement_error(L, "pg.error", 0, i, NULL);
    }
    if (!isfmt)
        lua_rawgeti(L, entry, 1);
    const char *sql = lua_tostring(L, -1);
    const char **params = nparams ? lua_newuserdatauv(L, (size_t)nparams * sizeof *params, 0) : NULL;
    for (int j = 0; j < nparams; j++) {
        lua_rawgeti(L, entry, j + 2);
        params[j] = lua_tostring(L, -1);                            /* held by the entry */
        lua_pop(L, 1);
    }
    enum pg_end end = run_statement(c, sql, nparams, params, now_mono() + o->timeout + PG_GRACE);
    int r = 0;
    if (end == PG_DONE)
        push_reply(L, c->res);
    else
        r = statement_failed(L, c, o, entry, i, end, tol, find);
    PQclear(c->res);
    c->res = NULL;
    return r;
}


/* ------------------------------------------------------------------------ */
/* pg.exec                                                                  */
/* ------------------------------------------------------------------------ */

/* nil, err for a failed connection (frees it). Stack: [...] -> [... message nil err] */
static int connect_failed(lua_State *L, struct pg_call *c, const struct pg_opts *o)
{
    push_oneline(L, c->conn ? PQerrorMessage(c->conn) : "out of memory");
    scrub(L, o->password, 0);
    call_free(c);
    return forge_pusherror(L, "pg.connect", 1, "%s:%d: %s", o->host, o->port, lua_tostring(L, -1));
}


/***
 * Run SQL statements, in order, each on its own (autocommit), on one connection.
 * @function exec
 * @tparam table opts {host=, port=, user=, password=?, database="postgres", timeout=10
 *   (seconds: connect_timeout rounded up, statement_timeout, and the wait for each answer
 *   plus 1 s), statements={{sql, param...} | {format=, args=}, ...}, tolerate={pattern...}?}
 * @return replies {{command=, rows={{v...}...}, affected=}...} (SQL NULL as false; a
 *   tolerated refusal as {command="TOLERATED", rows={}, affected=0, sqlstate=}); or nil, err:
 *   "pg.connect" (retryable), "pg.error" (refused: err.statement, err.sqlstate),
 *   "pg.timeout" (retryable), "pg.io" (connection lost, retryable)
 *
 * Stack: [opts] -> [opts, statements, plan, tolerate, find, ctx, replies, ...]
 */
static int l_pg_exec(lua_State *L)
{
    static const char *const keys[] = {"host", "port", "user", "password", "database", "timeout",
                                       "statements", "tolerate", NULL};
    luaL_checktype(L, 1, LUA_TTABLE);
    lua_settop(L, 1);
    forge_checkkeys(L, 1, "pg.exec", keys);
    struct pg_opts o;
    read_opts(L, &o);
    lua_Integer n = lua_getfield(L, 1, "statements") == LUA_TTABLE ? array_len(L, 2) : -1;
    if (n < 1 || n > PG_MAX_STMTS)
        luaL_error(L, "pg.exec: option 'statements' must be a non-empty array of statements");
    build_plan(L, 2, (int)n);                                       /* [opts stmts plan] */
    int tol = read_tolerate(L);                                     /* [... tol find] */
    int find = tol ? tol + 1 : 0;

    struct pg_call *c = lua_newuserdatauv(L, sizeof *c, 0);         /* [... ctx] */
    memset(c, 0, sizeof *c);
    luaL_setmetatable(L, PG_CALL_MT);
    if (pg_connect(c, &o) < 0)
        return connect_failed(L, c, &o);
    lua_createtable(L, (int)n, 0);                                  /* [... ctx replies] */
    int replies = lua_gettop(L);
    for (int i = 1; i <= (int)n; i++) {
        if (exec_one(L, c, &o, 3, i, tol, find)) {
            call_free(c);
            return 2;
        }
        lua_rawseti(L, replies, i);
        lua_settop(L, replies);
    }
    call_free(c);                                                   /* now, not at next GC */
    return 1;
}


int luaopen_forge_pg(lua_State *L)
{
    static const luaL_Reg lib[] = {
        {"exec", l_pg_exec},
        {NULL, NULL},
    };
    static const luaL_Reg meta[] = {
        {"__gc", l_call_gc},
        {NULL, NULL},
    };
    if (!PQisthreadsafe())
        return luaL_error(L, "forge.pg: this libpq is not thread-safe");
    forge_newclass(L, PG_CALL_MT, NULL, meta);
    luaL_newlib(L, lib);
    forge_setmodinfo(L, "forge.pg");
    return 1;
}
