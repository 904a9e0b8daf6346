/*
 * forge.log — structured logs: one JSON object per line on stderr.
 *
 *   {"ts":"2026-11-24T23:59:59.123Z","level":"info","msg":"...", ...fields}
 *
 * Each line goes out with a single write(2), so lines from concurrent threads do not
 * interleave. Fields whose key contains password, secret, token, credential, passwd or
 * authorization (any case, any depth) are written as "[redacted]". Lines are capped at
 * 64 KiB and stay valid JSON when cut ("truncated":true is added).
 *
 * The minimum level is process-wide (an atomic), read from FORGE_LOG_LEVEL when the
 * module is first loaded. So is the context (log.context{replica=...}): fields written on
 * every line of every thread, right after msg; a line's own field of the same name is renamed
 * with a leading "_", as ts, level and msg are. The line is built in a buffer owned by Lua (a userdata once
 * it outgrows the C stack), so a raise (memory error) never leaks.
 *
 * The JSON is written here, not by lua-cjson, because of the limits: a line stops at 64 KiB
 * while it is written, and stays valid JSON when cut (a string cut at a character
 * boundary, containers closed); secret fields, cycles and depth are handled on the way.
 * Strings and numbers are written by ljson.c, as every C writer does.
 */
#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

#include "forge/forge.h"
#include "ljson.h"

#define LOG_MAX       65536          /* whole line, newline included */
#define LOG_RESERVE   64             /* room kept for closers and truncation markers */
#define LOG_MAX_DEPTH 16
#define TRUNC_MARK    "...[truncated]"
#define REDACTED      "\"[redacted]\""
#define CONTEXT_MAX   512            /* the context's JSON members */
#define CONTEXT_KEYS  8
#define CONTEXT_KEY   32

enum { LVL_DEBUG = 0, LVL_INFO, LVL_WARN, LVL_ERROR, LVL_COUNT };

static const char *const level_names[LVL_COUNT] = {"debug", "info", "warn", "error"};

/* Process-wide minimum level; -1 until the first luaopen reads FORGE_LOG_LEVEL. */
static atomic_int min_level = -1;

/* The process-wide context: its members as JSON (",\"k\":v..."), and their keys. */
struct log_context {
    char json[CONTEXT_MAX];
    size_t len;
    int nkeys;
    char keys[CONTEXT_KEYS][CONTEXT_KEY];
};

static struct log_context context;
static pthread_mutex_t context_lock = PTHREAD_MUTEX_INITIALIZER;

static const char *const secret_words[] = {
    "password", "secret", "token", "credential", "passwd", "authorization", NULL,
};


/* ------------------------------------------------------------------------ */
/* line buffer                                                              */
/* ------------------------------------------------------------------------ */

struct lbuf {
    lua_State *L;
    int anchor;                 /* stack index of a table holding the heap buffer at [1] */
    char *p;
    size_t len, cap;
    int overflow;               /* the soft cap was hit: the encoders unwind */
    char init[1024];
};


static void lbuf_init(struct lbuf *b, lua_State *L, int anchor)
{
    b->L = L;
    b->anchor = anchor;
    b->p = b->init;
    b->len = 0;
    b->cap = sizeof b->init;
    b->overflow = 0;
}


/*
 * Make room for `need` more bytes (never beyond LOG_MAX). A larger buffer is a userdata
 * stored at anchor[1], replacing (and releasing) the previous one. May longjmp (memory).
 * Stack: unchanged.
 */
static void lbuf_reserve(struct lbuf *b, size_t need)
{
    if (b->len + need <= b->cap)
        return;
    size_t cap = b->cap * 2;
    while (cap < b->len + need)
        cap *= 2;
    if (cap > LOG_MAX)
        cap = LOG_MAX;
    char *p = lua_newuserdatauv(b->L, cap, 0);
    memcpy(p, b->p, b->len);
    lua_rawseti(b->L, b->anchor, 1);
    b->p = p;
    b->cap = cap;
}


/* Append within the soft cap; on failure set overflow and append nothing. */
static int lbuf_add(struct lbuf *b, const char *s, size_t n)
{
    if (b->overflow || b->len + n > LOG_MAX - LOG_RESERVE) {
        b->overflow = 1;
        return -1;
    }
    lbuf_reserve(b, n);
    memcpy(b->p + b->len, s, n);
    b->len += n;
    return 0;
}

#define lbuf_lit(b, s) lbuf_add((b), "" s, sizeof(s) - 1)


/* Append into the reserve (closers and markers after an overflow). */
static void lbuf_force(struct lbuf *b, const char *s, size_t n)
{
    if (b->len + n > LOG_MAX)
        return;                                 /* cannot happen: LOG_RESERVE covers it */
    lbuf_reserve(b, n);
    memcpy(b->p + b->len, s, n);
    b->len += n;
}


/* ------------------------------------------------------------------------ */
/* JSON pieces                                                              */
/* ------------------------------------------------------------------------ */



/* A forge_json_put into a line buffer, cutting a plain run that does not fit when partial. */
struct lsink {
    struct lbuf *b;
    int partial;
};

static int lbuf_put(void *ud, const char *p, size_t n, int whole)
{
    struct lsink *sink = ud;
    struct lbuf *b = sink->b;
    size_t room = b->overflow || b->len > LOG_MAX - LOG_RESERVE ? 0 : LOG_MAX - LOG_RESERVE - b->len;
    if (n <= room)
        return lbuf_add(b, p, n);
    if (sink->partial && !whole && !b->overflow)
        lbuf_add(b, p, room);
    b->overflow = 1;
    return -1;
}


/*
 * Append s as a JSON string (RFC 8259 escaping; invalid UTF-8 becomes U+FFFD).
 * With `partial`, a string that does not fit is cut at a character boundary and closed
 * with TRUNC_MARK (overflow set); otherwise nothing is appended and overflow is set.
 * Returns 0, or -1 on overflow.
 */
static int add_string(struct lbuf *b, const char *str, size_t n, int partial)
{
    struct lsink sink = {b, partial};
    size_t mark = b->len;
    if (forge_json_string(lbuf_put, &sink, str, n, FORGE_JSON_UTF8) == 0)
        return 0;
    if (b->len == mark)
        return -1;                              /* not even the quote: the caller rolls back */
    if (partial)
        lbuf_force(b, TRUNC_MARK "\"", sizeof(TRUNC_MARK "\"") - 1);
    else
        b->len = mark;
    b->overflow = 1;
    return -1;
}


static int add_number(struct lbuf *b, lua_State *L, int idx)
{
    char num[FORGE_JSON_NUMBER_MAX];
    size_t n = forge_json_number(L, idx, num);
    if (n)
        return lbuf_add(b, num, n);
    double d = lua_tonumber(L, idx);
    if (isnan(d))
        return lbuf_lit(b, "\"nan\"");
    return d > 0 ? lbuf_lit(b, "\"inf\"") : lbuf_lit(b, "\"-inf\"");
}


/* Case-insensitive (ASCII) substring test. */
static int contains_ci(const char *s, size_t n, const char *word)
{
    size_t wl = strlen(word);
    for (size_t i = 0; i + wl <= n; i++) {
        size_t k = 0;
        while (k < wl) {
            char c = s[i + k];
            if (c >= 'A' && c <= 'Z')
                c = (char)(c - 'A' + 'a');
            if (c != word[k])
                break;
            k++;
        }
        if (k == wl)
            return 1;
    }
    return 0;
}


static int is_secret_key(const char *k, size_t n)
{
    for (int i = 0; secret_words[i]; i++)
        if (contains_ci(k, n, secret_words[i]))
            return 1;
    return 0;
}


/*
 * Key at `idx` as a string (non-string keys stringified without metamethods).
 * Writes into `tmp` when it has to format. Stack: unchanged.
 */
static const char *key_string(lua_State *L, int idx, char *tmp, size_t tmpn, size_t *len)
{
    int n;
    switch (lua_type(L, idx)) {
    case LUA_TSTRING:
        return lua_tolstring(L, idx, len);
    case LUA_TNUMBER:
        if (lua_isinteger(L, idx))
            n = snprintf(tmp, tmpn, "%lld", (long long)lua_tointeger(L, idx));
        else
            n = snprintf(tmp, tmpn, "%.15g", lua_tonumber(L, idx));
        break;
    case LUA_TBOOLEAN:
        n = snprintf(tmp, tmpn, "%s", lua_toboolean(L, idx) ? "true" : "false");
        break;
    default:
        n = snprintf(tmp, tmpn, "%s: %p", lua_typename(L, lua_type(L, idx)), lua_topointer(L, idx));
        break;
    }
    *len = (size_t)n < tmpn ? (size_t)n : tmpn - 1;
    return tmp;
}


struct enc {
    struct lbuf *b;
    int seen;                   /* stack index: tables on the current path */
    const struct log_context *ctx;      /* its keys are taken, like ts/level/msg (NULL: none) */
};


/* Whether a top-level key is taken by the line itself: ts, level, msg or a context key. */
static int reserved_key(const struct log_context *ctx, const char *k, size_t klen)
{
    if ((klen == 2 && memcmp(k, "ts", 2) == 0) || (klen == 3 && memcmp(k, "msg", 3) == 0) ||
        (klen == 5 && memcmp(k, "level", 5) == 0))
        return 1;
    for (int i = 0; ctx && i < ctx->nkeys; i++)
        if (strlen(ctx->keys[i]) == klen && memcmp(ctx->keys[i], k, klen) == 0)
            return 1;
    return 0;
}

static int add_value(struct enc *e, lua_State *L, int idx, int depth);


/*
 * Encode the table at `idx` as a JSON array when its keys are exactly 1..n (n > 0),
 * else as an object. Tables on the current path (cycles) and tables deeper than
 * LOG_MAX_DEPTH become "...". `top` writes only the entries (the caller owns the braces),
 * each prefixed with a comma, and renames keys clashing with ts/level/msg or the context.
 * Returns 0, or -1 after an overflow (the container is closed before returning).
 * Stack: unchanged.
 */
static int add_table(struct enc *e, lua_State *L, int idx, int depth, int top)
{
    struct lbuf *b = e->b;
    idx = lua_absindex(L, idx);
    if (!top) {
        if (depth > LOG_MAX_DEPTH)
            return lbuf_lit(b, "\"...\"");
        lua_pushvalue(L, idx);
        if (lua_rawget(L, e->seen) != LUA_TNIL) {
            lua_pop(L, 1);
            return lbuf_lit(b, "\"...\"");
        }
        lua_pop(L, 1);
    }
    luaL_checkstack(L, 6, "log: nesting too deep");

    /* Array test: count keys and check they are the integers 1..count. */
    lua_Integer count = 0, maxk = 0;
    int array = !top;
    lua_pushnil(L);
    while (lua_next(L, idx)) {
        lua_pop(L, 1);
        count++;
        if (array) {
            if (lua_isinteger(L, -1) && lua_tointeger(L, -1) >= 1) {
                if (lua_tointeger(L, -1) > maxk)
                    maxk = lua_tointeger(L, -1);
            } else {
                array = 0;
            }
        }
    }
    array = array && count > 0 && maxk == count;

    if (!top) {
        if (lbuf_add(b, array ? "[" : "{", 1) < 0)
            return -1;
        lua_pushvalue(L, idx);                  /* mark as on the path */
        lua_pushboolean(L, 1);
        lua_rawset(L, e->seen);
    }

    int rc = 0, first = !top;
    if (array) {
        for (lua_Integer i = 1; i <= count && rc == 0; i++) {
            size_t mark = b->len;
            lua_rawgeti(L, idx, i);
            if ((!first && lbuf_lit(b, ",") < 0) || add_value(e, L, -1, depth + 1) < 0) {
                if (b->len > mark && b->p[b->len - 1] == ',')
                    b->len = mark;              /* a lone comma would break the JSON */
                rc = -1;
            }
            first = 0;
            lua_pop(L, 1);
        }
    } else {
        lua_pushnil(L);
        while (rc == 0 && lua_next(L, idx)) {
            /* stack: ... key value */
            char tmp[64];
            size_t klen, mark = b->len;
            const char *k = key_string(L, -2, tmp, sizeof tmp, &klen);
            int clash = top && reserved_key(e->ctx, k, klen);
            if ((!first && lbuf_lit(b, ",") < 0) || (clash && lbuf_lit(b, "\"_") < 0) ||
                (clash ? lbuf_add(b, k, klen) < 0 || lbuf_lit(b, "\"") < 0
                       : add_string(b, k, klen, 0) < 0) ||
                lbuf_lit(b, ":") < 0) {
                b->len = mark;
                rc = -1;
            } else if (is_secret_key(k, klen)) {
                if (lbuf_lit(b, REDACTED) < 0) {
                    b->len = mark;
                    rc = -1;
                }
            } else if (add_value(e, L, -1, depth + 1) < 0) {
                if (b->len > mark && b->p[b->len - 1] == ':')
                    b->len = mark;              /* the value did not even start */
                rc = -1;
            }
            first = 0;
            lua_pop(L, 1);
        }
        if (rc < 0)
            lua_pop(L, 1);                      /* the key lua_next left */
    }

    if (!top) {
        lua_pushvalue(L, idx);                  /* off the path */
        lua_pushnil(L);
        lua_rawset(L, e->seen);
        lbuf_force(b, array ? "]" : "}", 1);
    }
    return rc;
}


/* Encode the value at `idx`. Returns 0, or -1 after an overflow. Stack: unchanged. */
static int add_value(struct enc *e, lua_State *L, int idx, int depth)
{
    size_t n;
    const char *s;
    switch (lua_type(L, idx)) {
    case LUA_TSTRING:
        s = lua_tolstring(L, idx, &n);
        return add_string(e->b, s, n, 1);
    case LUA_TNUMBER:
        return add_number(e->b, L, idx);
    case LUA_TBOOLEAN:
        return lua_toboolean(L, idx) ? lbuf_lit(e->b, "true") : lbuf_lit(e->b, "false");
    case LUA_TNIL:
        return lbuf_lit(e->b, "null");
    case LUA_TTABLE:
        return add_table(e, L, idx, depth, 0);
    default: {
        char tmp[64];
        int k = snprintf(tmp, sizeof tmp, "<%s>", lua_typename(L, lua_type(L, idx)));
        return add_string(e->b, tmp, (size_t)k, 0);
    }
    }
}


static void add_timestamp(struct lbuf *b)
{
    struct timespec ts;
    struct tm tm;
    clock_gettime(CLOCK_REALTIME, &ts);
    gmtime_r(&ts.tv_sec, &tm);
    char out[40];
    int n = snprintf(out, sizeof out, "%04d-%02d-%02dT%02d:%02d:%02d.%03ldZ",
                     tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec,
                     ts.tv_nsec / 1000000);
    lbuf_add(b, out, (size_t)n);
}


/*
 * Build the line for level `lvl`, message at index 1 and optional fields at index 2,
 * and push it as a string (newline included).
 * Stack: [msg fields? ...] -> [... line]
 * May longjmp (memory).
 */
static void push_line(lua_State *L, int lvl)
{
    size_t mlen;
    const char *msg = luaL_checklstring(L, 1, &mlen);
    int has_fields = !lua_isnoneornil(L, 2);
    if (has_fields)
        luaL_checktype(L, 2, LUA_TTABLE);
    lua_newtable(L);                            /* anchor for the heap buffer */
    int anchor = lua_gettop(L);
    lua_newtable(L);                            /* tables on the current path */
    struct log_context ctx;
    pthread_mutex_lock(&context_lock);
    ctx = context;
    pthread_mutex_unlock(&context_lock);
    struct enc e;
    struct lbuf b;
    lbuf_init(&b, L, anchor);
    e.b = &b;
    e.seen = lua_gettop(L);
    e.ctx = &ctx;

    lbuf_lit(&b, "{\"ts\":\"");
    add_timestamp(&b);
    lbuf_lit(&b, "\",\"level\":\"");
    lbuf_add(&b, level_names[lvl], strlen(level_names[lvl]));
    lbuf_lit(&b, "\",\"msg\":");
    int rc = add_string(&b, msg, mlen, 1);
    if (rc == 0)
        rc = lbuf_add(&b, ctx.json, ctx.len);
    if (rc == 0 && has_fields)
        add_table(&e, L, 2, 0, 1);
    if (b.overflow)
        lbuf_force(&b, ",\"truncated\":true", sizeof(",\"truncated\":true") - 1);
    lbuf_force(&b, "}\n", 2);
    lua_pushlstring(L, b.p, b.len);
    lua_replace(L, anchor);                     /* line where the anchor was */
    lua_settop(L, anchor);
}


static int check_level(lua_State *L, int idx)
{
    const char *name = luaL_checkstring(L, idx);
    for (int i = 0; i < LVL_COUNT; i++)
        if (strcmp(name, level_names[i]) == 0)
            return i;
    if (strcmp(name, "warning") == 0)
        return LVL_WARN;
    return luaL_argerror(L, idx, "expected a level: debug, info, warn or error");
}


static int parse_level(const char *name, int def)
{
    if (!name)
        return def;
    for (int i = 0; i < LVL_COUNT; i++)
        if (strcasecmp(name, level_names[i]) == 0)
            return i;
    if (strcasecmp(name, "warning") == 0)
        return LVL_WARN;
    return def;
}


static int current_level(void)
{
    int lvl = atomic_load(&min_level);
    return lvl < 0 ? LVL_INFO : lvl;
}


static int log_at(lua_State *L, int lvl)
{
    if (lvl < current_level())
        return 0;
    push_line(L, lvl);
    size_t n;
    const char *line = lua_tolstring(L, -1, &n);
    while (n > 0) {                             /* one write(2) unless the kernel cuts it */
        ssize_t w = write(STDERR_FILENO, line, n);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            break;                              /* nowhere to report a failing stderr */
        }
        line += w;
        n -= (size_t)w;
    }
    return 0;
}


/***
 * Log at debug level.
 * @function debug
 * @tparam string msg
 * @tparam[opt] table fields extra keys of the JSON object
 */
static int l_log_debug(lua_State *L) { return log_at(L, LVL_DEBUG); }

/***
 * Log at info level.
 * @function info
 * @tparam string msg
 * @tparam[opt] table fields
 */
static int l_log_info(lua_State *L) { return log_at(L, LVL_INFO); }

/***
 * Log at warn level.
 * @function warn
 * @tparam string msg
 * @tparam[opt] table fields
 */
static int l_log_warn(lua_State *L) { return log_at(L, LVL_WARN); }

/***
 * Log at error level.
 * @function error
 * @tparam string msg
 * @tparam[opt] table fields
 */
static int l_log_error(lua_State *L) { return log_at(L, LVL_ERROR); }


/***
 * Get or set the process-wide minimum level.
 * @function level
 * @tparam[opt] string name "debug", "info", "warn" (or "warning") or "error"
 * @treturn string the level in force before the call
 */
static int l_log_level(lua_State *L)
{
    int prev;
    if (lua_isnoneornil(L, 1)) {
        prev = current_level();
    } else {
        int lvl = check_level(L, 1);
        prev = atomic_exchange(&min_level, lvl);
        if (prev < 0)
            prev = LVL_INFO;
    }
    lua_pushstring(L, level_names[prev]);
    return 1;
}


/* Raise unless the key at `idx` is a context key: a plain name, not ts/level/msg. Returns it. */
static const char *check_context_key(lua_State *L, int idx)
{
    size_t n;
    const char *k = lua_type(L, idx) == LUA_TSTRING ? lua_tolstring(L, idx, &n) : NULL;
    int ok = k && n > 0 && n < CONTEXT_KEY && !reserved_key(NULL, k, n);
    for (size_t i = 0; ok && i < n; i++)
        ok = (k[i] >= 'a' && k[i] <= 'z') || (k[i] >= 'A' && k[i] <= 'Z') || (k[i] >= '0' && k[i] <= '9')
             || k[i] == '_';
    if (!ok)
        luaL_error(L, "log.context: keys must be names of letters, digits and '_' (at most %d), "
                      "not ts, level or msg", CONTEXT_KEY - 1);
    return k;
}


/***
 * Set the process-wide context: fields written on every line of every thread from now on,
 * after msg (they replace the previous context; nil or {} clears it).
 * @function context
 * @tparam[opt] table fields e.g. {replica = "3f2a9c0d1e4b5a67"}
 */
static int l_log_context(lua_State *L)
{
    struct log_context next = {.len = 0, .nkeys = 0};
    if (!lua_isnoneornil(L, 1)) {
        luaL_checktype(L, 1, LUA_TTABLE);
        lua_settop(L, 1);
        lua_pushnil(L);
        while (lua_next(L, 1)) {                    /* [fields key value] */
            if (next.nkeys == CONTEXT_KEYS)
                return luaL_error(L, "log.context: at most %d fields", CONTEXT_KEYS);
            strcpy(next.keys[next.nkeys++], check_context_key(L, 2));
            lua_pop(L, 1);
        }
        lua_newtable(L);                            /* 2: anchor for the heap buffer */
        lua_newtable(L);                            /* 3: tables on the current path */
        struct lbuf b;
        lbuf_init(&b, L, 2);
        struct enc e = {.b = &b, .seen = 3, .ctx = NULL};
        if (add_table(&e, L, 1, 0, 1) < 0 || b.len > sizeof next.json)
            return luaL_error(L, "log.context: the fields take more than %d bytes", CONTEXT_MAX);
        memcpy(next.json, b.p, b.len);
        next.len = b.len;
    }
    pthread_mutex_lock(&context_lock);
    context = next;
    pthread_mutex_unlock(&context_lock);
    return 0;
}


/***
 * The line log.<level>(msg, fields) would write, without writing it (level filter ignored).
 * @function encode
 * @tparam string msg
 * @tparam[opt] table fields
 * @tparam[opt="info"] string level
 * @treturn string one JSON object followed by "\n"
 */
static int l_log_encode(lua_State *L)
{
    int lvl = lua_isnoneornil(L, 3) ? LVL_INFO : check_level(L, 3);
    lua_settop(L, 2);
    push_line(L, lvl);
    return 1;
}


/***
 * Whether a field with this key would be redacted.
 * @function redact
 * @param key string (other values are stringified as keys are)
 * @treturn boolean
 */
static int l_log_redact(lua_State *L)
{
    luaL_checkany(L, 1);
    char tmp[64];
    size_t n;
    const char *k = key_string(L, 1, tmp, sizeof tmp, &n);
    lua_pushboolean(L, is_secret_key(k, n));
    return 1;
}


int luaopen_forge_log(lua_State *L)
{
    static const luaL_Reg lib[] = {
        {"debug", l_log_debug},
        {"info", l_log_info},
        {"warn", l_log_warn},
        {"error", l_log_error},
        {"level", l_log_level},
        {"context", l_log_context},
        {"encode", l_log_encode},
        {"redact", l_log_redact},
        {NULL, NULL},
    };
    if (atomic_load(&min_level) < 0) {
        int expected = -1;
        atomic_compare_exchange_strong(&min_level, &expected, parse_level(getenv("FORGE_LOG_LEVEL"), LVL_INFO));
    }
    luaL_newlib(L, lib);
    forge_setmodinfo(L, "forge.log");
    return 1;
}
