/*
 * forge.sandbox — each service script in its own capped lua_State.
 *
 *   local sandbox = require "forge.sandbox"
 *   local sb = sandbox.new{name = "redis", memory = 64 * 2^20, cpu = 2, wall = 10}
 *   assert(sb:load(source, "@services/redis/service.lua"))
 *   local plans = sb:field("plans")                  -- deep copy, plain data
 *   local res, ctx = sb:call("deploy", ctx)          -- res | nil, err
 *
 * The broker's state and a sandbox share nothing: values are deep-copied in and out
 * (nil, booleans, numbers, strings, tables; json null). Inside, a script sees a locked
 * global environment holding only base/string/table/math/utf8/coroutine (minus what
 * docs/sandbox.md lists as excluded, each with a reason) and a `forge` capability table
 * (json, yaml, crypto, conf, log). Everything shared is a read-only proxy. string.find/match/
 * gmatch/gsub are forge.pattern's, which stop a pathological pattern with a step budget.
 *
 * Limits (per sandbox):
 *   memory  an accounting allocator (after HAProxy's hlua_alloc): growth past the limit is
 *           refused, a free never is; the limit is off while the libraries load;
 *   cpu     a count hook checks the thread CPU clock against a per-call deadline;
 *   wall    the same hook checks CLOCK_MONOTONIC.
 * On expiry the hook raises and re-arms itself with count 1, so every later instruction
 * raises again: a script's own pcall cannot swallow the limit (Redis re-arms the same way).
 *
 * Everything that touches the sandbox state runs inside lua_pcall on that state, so a
 * memory error there is an error value, never a panic. Values are copied OUT only with
 * reads that cannot raise or allocate in the sandbox, so a raise in the broker state
 * (its own out-of-memory) cannot cross the sandbox's C frames.
 *
 * Thread safety: a sandbox is used by one thread at a time. The module has no global
 * mutable state; per-sandbox state hangs off the allocator's ud and the state's extra space.
 */
#include <dlfcn.h>
#include <limits.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <lualib.h>

#include "forge/forge.h"
#include "forge/sandbox.h"
#include "ljson.h"

#define SB_MSG_MAX      4096            /* error message copied out */
#define SB_TB_MAX       8192            /* traceback copied out */
#define SB_MOVE_MAX     (1 << 24)       /* elements table.move/insert/remove may shift in C */
#define SB_NMODS        5               /* crypto, log, yaml (on the setup stack), pattern, conf */
#define SB_PATTERN      3               /* index of forge.pattern in MOD_NAMES */
#define SB_CONF         4               /* index of forge.conf in MOD_NAMES */

enum { EXP_NONE = 0, EXP_CPU, EXP_WALL };
enum { CP_TRUE, CP_SKIP };              /* what a function/userdata/thread becomes in a copy */

struct sandbox {
    lua_State *S;
    size_t used, limit;                 /* allocator accounting */
    int enforce;                        /* 0 while the libraries load */
    int refused;                        /* the allocator refused during this operation */
    int armed, expired;                 /* EXP_* */
    int has_tb;                         /* the message handler stored a traceback this op */
    int loaded;
    double cpu, wall;
    struct timespec cpu_deadline, wall_deadline;
    const void *ynull;                  /* forge.yaml.null inside the sandbox */
    void *dl[SB_NMODS];                 /* dlopen handles to release after lua_close */
    char name[128];
    char chunk[256];                    /* "@services/x/service.lua" */
    char where[320];                    /* "file:line" where a time limit fired */
};

struct sbox { struct sandbox *sb; };

#define tosbox(L) ((struct sbox *)luaL_checkudata(L, 1, FORGE_SANDBOX_MT))
#define SB(S)     (*(struct sandbox **)lua_getextraspace(S))

/* Registry keys inside a sandbox state (addresses are unique). */
static const char K_ENV = 0, K_SERVICE = 0, K_PREPARE = 0, K_TRACEBACK = 0;


/* ------------------------------------------------------------------------ */
/* allocator and clocks                                                     */
/* ------------------------------------------------------------------------ */

/* The sandbox's lua_Alloc: accounts every byte, refuses growth past the limit. */
static void *sb_alloc(void *ud, void *ptr, size_t osize, size_t nsize)
{
    struct sandbox *sb = ud;
    if (!ptr)
        osize = 0;                      /* 5.4: osize is a type tag when ptr is NULL */
    if (nsize == 0) {
        free(ptr);
        sb->used -= osize;
        return NULL;
    }
    if (sb->enforce && nsize > osize && sb->used + (nsize - osize) > sb->limit) {
        sb->refused = 1;
        return NULL;
    }
    void *p = realloc(ptr, nsize);
    if (!p) {
        sb->refused = 1;
        return NULL;
    }
    sb->used = sb->used - osize + nsize;
    return p;
}


static void ts_after(struct timespec *t, clockid_t clk, double secs)
{
    clock_gettime(clk, t);
    double whole = floor(secs);
    t->tv_sec += (time_t)whole;
    t->tv_nsec += (long)((secs - whole) * 1e9);
    if (t->tv_nsec >= 1000000000L) {
        t->tv_sec++;
        t->tv_nsec -= 1000000000L;
    }
}


static int ts_passed(clockid_t clk, const struct timespec *deadline)
{
    struct timespec now;
    clock_gettime(clk, &now);
    return now.tv_sec > deadline->tv_sec ||
           (now.tv_sec == deadline->tv_sec && now.tv_nsec >= deadline->tv_nsec);
}


/*
 * Count hook: every FORGE_SANDBOX_HOOK_COUNT instructions, compare the clocks with the
 * call's deadlines. After expiry, raise at every instruction (count 1) until the call
 * unwinds to sandbox.c. Runs in every coroutine (threads inherit the hook). May longjmp.
 */
static void sb_hook(lua_State *S, lua_Debug *ar)
{
    struct sandbox *sb = SB(S);
    if (!sb->expired) {
        if (!sb->armed)
            return;
        if (ts_passed(CLOCK_MONOTONIC, &sb->wall_deadline))
            sb->expired = EXP_WALL;
        else if (ts_passed(CLOCK_THREAD_CPUTIME_ID, &sb->cpu_deadline))
            sb->expired = EXP_CPU;
        else {
            if (lua_gethookcount(S) != FORGE_SANDBOX_HOOK_COUNT)     /* a thread left at 1 */
                lua_sethook(S, sb_hook, LUA_MASKCOUNT, FORGE_SANDBOX_HOOK_COUNT);
            return;
        }
        if (lua_getinfo(S, "Sl", ar) && ar->currentline > 0)
            snprintf(sb->where, sizeof sb->where, "%s:%d", ar->short_src, ar->currentline);
        else
            snprintf(sb->where, sizeof sb->where, "%s", sb->chunk[0] == '@' ? sb->chunk + 1 : sb->chunk);
    }
    lua_sethook(S, sb_hook, LUA_MASKCOUNT, 1);
    lua_pushfstring(S, "%s: %s time limit exceeded", sb->where, sb->expired == EXP_CPU ? "cpu" : "wall");
    lua_error(S);
}


/* Start an operation on the sandbox: deadlines from now, hook on, flags cleared. */
static void sb_arm(struct sandbox *sb)
{
    ts_after(&sb->wall_deadline, CLOCK_MONOTONIC, sb->wall);
    ts_after(&sb->cpu_deadline, CLOCK_THREAD_CPUTIME_ID, sb->cpu);
    sb->armed = 1;
    sb->expired = EXP_NONE;
    sb->refused = 0;
    sb->has_tb = 0;
    sb->where[0] = '\0';
    lua_settop(sb->S, 0);
    lua_sethook(sb->S, sb_hook, LUA_MASKCOUNT, FORGE_SANDBOX_HOOK_COUNT);
}


static void sb_disarm(struct sandbox *sb)
{
    sb->armed = 0;
    lua_sethook(sb->S, NULL, 0, 0);
}


static const char *short_chunk(const struct sandbox *sb)
{
    return sb->chunk[0] == '@' || sb->chunk[0] == '=' ? sb->chunk + 1 : sb->chunk;
}


/* ------------------------------------------------------------------------ */
/* copying values between states                                           */
/* ------------------------------------------------------------------------ */

struct copy {
    size_t size;                        /* estimated bytes so far */
    int mode;                           /* CP_TRUE | CP_SKIP */
    const void *ynull;                  /* the source state's yaml null (copy out) */
    const char *err;
    const void *path[FORGE_SANDBOX_MAX_DEPTH + 2];
};

#define CP_ENTRY 16                     /* accounted per table entry / scalar */
#define CP_TABLE 64


static int copy_account(struct copy *c, size_t n)
{
    c->size += n;
    if (c->size > FORGE_SANDBOX_MAX_COPY) {
        c->err = "value too large to copy (limit " "16 MiB" ")";
        return -1;
    }
    return 0;
}


/* Is the table at idx on the current path (a cycle)? Records it at path[depth] if not. */
static int copy_enter(struct copy *c, lua_State *from, int idx, int depth)
{
    if (depth > FORGE_SANDBOX_MAX_DEPTH) {
        c->err = "value nested deeper than 64 levels";
        return -1;
    }
    const void *p = lua_topointer(from, idx);
    for (int i = 0; i < depth; i++)
        if (c->path[i] == p) {
            c->err = "cyclic table";
            return -1;
        }
    c->path[depth] = p;
    return copy_account(c, CP_TABLE);
}


/*
 * Copy the value at `idx` of `from` onto `to`. Only reads `from` with calls that neither
 * allocate nor raise; allocates (and may raise) only in `to`.
 * Returns 0 (pushed one value), 1 (skipped: nothing pushed) or -1 (c->err set; `to` may
 * hold partial values above its entry top, `from` extra values above its entry top).
 * Stack of to: [...] -> [... value]
 */
static int copy_value(struct copy *c, lua_State *from, int idx, lua_State *to, int depth)
{
    size_t len;
    const char *s;
    idx = lua_absindex(from, idx);
    switch (lua_type(from, idx)) {
    case LUA_TNIL:
        lua_pushnil(to);
        return 0;
    case LUA_TBOOLEAN:
        lua_pushboolean(to, lua_toboolean(from, idx));
        return 0;
    case LUA_TNUMBER:
        if (lua_isinteger(from, idx))
            lua_pushinteger(to, lua_tointeger(from, idx));
        else
            lua_pushnumber(to, lua_tonumber(from, idx));
        return copy_account(c, CP_ENTRY);
    case LUA_TSTRING:
        s = lua_tolstring(from, idx, &len);     /* a string: no conversion, no allocation */
        if (copy_account(c, len + CP_ENTRY) < 0)
            return -1;
        lua_pushlstring(to, s, len);
        return 0;
    case LUA_TLIGHTUSERDATA:
        if (lua_touserdata(from, idx) == NULL) {        /* json null (cjson.null) */
            lua_pushlightuserdata(to, NULL);
            return 0;
        }
        break;
    case LUA_TUSERDATA:
        if (c->ynull && lua_topointer(from, idx) == c->ynull) {
            lua_pushlightuserdata(to, NULL);
            return 0;
        }
        break;
    case LUA_TTABLE: {
        if (copy_enter(c, from, idx, depth) < 0)
            return -1;
        if (!lua_checkstack(from, 4)) {
            c->err = "stack overflow while copying";
            return -1;
        }
        luaL_checkstack(to, 4, "copying a value");
        lua_createtable(to, 0, 0);
        lua_pushnil(from);
        while (lua_next(from, idx)) {
            int kt = lua_type(from, -2);
            if (kt != LUA_TSTRING && kt != LUA_TNUMBER && kt != LUA_TBOOLEAN) {
                lua_pop(from, 1);                       /* keys of other types: skipped */
                continue;
            }
            if (copy_value(c, from, -2, to, depth + 1) < 0)
                return -1;
            int rc = copy_value(c, from, -1, to, depth + 1);
            if (rc < 0)
                return -1;
            if (rc == 1)
                lua_pop(to, 1);                         /* drop the key */
            else
                lua_rawset(to, -3);
            lua_pop(from, 1);
        }
        return 0;
    }
    default:
        break;
    }
    if (c->mode == CP_TRUE && depth > 0) {
        lua_pushboolean(to, 1);
        return 0;
    }
    return 1;
}


/* ------------------------------------------------------------------------ */
/* message handler and error values                                         */
/* ------------------------------------------------------------------------ */

/*
 * Message handler for every protected operation in the sandbox: turns the error into a
 * string (running __tostring only while the call still has time) and stores a traceback.
 * Stack: [err] -> [err, message]
 */
static int sb_msgh(lua_State *S)
{
    struct sandbox *sb = SB(S);
    int t = lua_type(S, 1);
    if (t == LUA_TSTRING || t == LUA_TNUMBER)
        lua_tostring(S, 1);
    else if (!(!sb->expired && luaL_callmeta(S, 1, "__tostring") && lua_type(S, -1) == LUA_TSTRING))
        lua_pushfstring(S, "(error object is a %s value)", luaL_typename(S, 1));
    int mi = lua_gettop(S);
    luaL_traceback(S, S, NULL, 1);
    lua_rawsetp(S, LUA_REGISTRYINDEX, &K_TRACEBACK);
    sb->has_tb = 1;
    lua_pushvalue(S, mi);
    return 1;
}


/* Push the first `max` bytes of the string at idx of S onto L (marked when cut). */
static void push_cut(lua_State *L, lua_State *S, int idx, size_t max)
{
    size_t n;
    const char *s = lua_type(S, idx) == LUA_TSTRING ? lua_tolstring(S, idx, &n) : NULL;
    if (!s) {
        lua_pushliteral(L, "(error object is not a string)");
        return;
    }
    if (n <= max) {
        lua_pushlstring(L, s, n);
        return;
    }
    luaL_Buffer b;
    luaL_buffinit(L, &b);
    luaL_addlstring(&b, s, max);
    lua_pushfstring(L, "...[%I more bytes]", (lua_Integer)(n - max));
    luaL_addvalue(&b);
    luaL_pushresult(&b);
}


/*
 * Run f(arg) in the sandbox state under its limits (sb_arm .. sb_disarm), with
 * sb_msgh as message handler. Returns the lua_pcall status.
 * Stack of sb->S: [...] -> [sb_msgh, nresults results] or [sb_msgh, err]
 */
static int sb_pcall(struct sandbox *sb, lua_CFunction f, void *arg, int nresults)
{
    sb_arm(sb);                                 /* clears the stack */
    lua_pushcfunction(sb->S, sb_msgh);
    lua_pushcfunction(sb->S, f);
    lua_pushlightuserdata(sb->S, arg);
    int st = lua_pcall(sb->S, 1, nresults, 1);
    sb_disarm(sb);
    return st;
}


/*
 * Turn the outcome of a failed protected operation (status st, error message at the top
 * of S) into `nil, err` on L. Stack of L: [...] -> [..., nil, err]
 */
static int push_sb_error(lua_State *L, struct sandbox *sb, int st)
{
    const char *code = "sandbox.error";
    lua_pushnil(L);
    if (sb->expired) {
        code = sb->expired == EXP_CPU ? "sandbox.cpu" : "sandbox.timeout";
        lua_pushfstring(L, "%s: %s time limit exceeded (%f s per call)", sb->where,
                        sb->expired == EXP_CPU ? "cpu" : "wall",
                        sb->expired == EXP_CPU ? sb->cpu : sb->wall);
    } else if (st == LUA_ERRMEM || (sb->refused && st == LUA_ERRERR)) {
        code = "sandbox.memory";
        lua_pushfstring(L, "%s: memory limit exceeded (%I bytes)", short_chunk(sb), (lua_Integer)sb->limit);
    } else {
        push_cut(L, sb->S, -1, SB_MSG_MAX);
    }
    forge_newerror(L, code, 0, "%s", lua_tostring(L, -1));
    lua_remove(L, -2);
    if (sb->has_tb) {
        lua_rawgetp(sb->S, LUA_REGISTRYINDEX, &K_TRACEBACK);
        push_cut(L, sb->S, -1, SB_TB_MAX);
        lua_setfield(L, -2, "traceback");
        lua_pop(sb->S, 1);
    }
    lua_pushstring(L, sb->name);
    lua_setfield(L, -2, "service");
    lua_settop(sb->S, 0);
    if (strcmp(code, "sandbox.memory") == 0)
        lua_gc(sb->S, LUA_GCCOLLECT, 0);        /* give the bomb back now, not at the next call */
    return 2;
}


/* ------------------------------------------------------------------------ */
/* forge.json inside the sandbox (plain data, capped, no malloc)            */
/* ------------------------------------------------------------------------ */

/*
 * A JSON encoder of its own, beside lua-cjson, because the sandbox's limits must hold
 * while it writes: the text grows in the script's own capped memory (userdata buffers,
 * no malloc), and stops at FORGE_SANDBOX_MAX_COPY bytes and FORGE_SANDBOX_MAX_DEPTH levels
 * with a script error. Strings and numbers are written by ljson.c, as every C writer does.
 */

struct jbuf {
    lua_State *L;
    int anchor;                         /* stack slot holding the current userdata buffer */
    char *p;
    size_t n, cap;
};


static void jb_init(struct jbuf *b, lua_State *L)
{
    b->L = L;
    b->cap = 256;
    b->n = 0;
    b->p = lua_newuserdatauv(L, b->cap, 0);
    b->anchor = lua_gettop(L);
}


/* Make room for `need` more bytes. May longjmp (memory, size). */
static void jb_reserve(struct jbuf *b, size_t need)
{
    if (b->n + need <= b->cap)
        return;
    if (b->n + need > FORGE_SANDBOX_MAX_COPY)
        luaL_error(b->L, "json.encode: result larger than %d bytes", FORGE_SANDBOX_MAX_COPY);
    size_t cap = b->cap * 2;
    while (cap < b->n + need)
        cap *= 2;
    char *p = lua_newuserdatauv(b->L, cap, 0);
    memcpy(p, b->p, b->n);
    lua_replace(b->L, b->anchor);
    b->p = p;
    b->cap = cap;
}


static void jb_add(struct jbuf *b, const char *s, size_t n)
{
    jb_reserve(b, n);
    memcpy(b->p + b->n, s, n);
    b->n += n;
}


/* A forge_json_put into the capped buffer. May longjmp (memory, size). */
static int jb_put(void *ud, const char *p, size_t n, int whole)
{
    (void)whole;
    jb_add(ud, p, n);
    return 0;
}


static void j_string(struct jbuf *b, const char *s, size_t n)
{
    forge_json_string(jb_put, b, s, n, 0);
}


static void j_number(struct jbuf *b, lua_State *L, int idx)
{
    char num[FORGE_JSON_NUMBER_MAX];
    size_t n = forge_json_number(L, idx, num);
    if (n == 0) {
        double d = lua_tonumber(L, idx);
        luaL_error(L, "json.encode: cannot encode %s", isnan(d) ? "NaN" : "an infinite number");
    }
    jb_add(b, num, n);
}


/* Encode the value at idx. May longjmp. Stack: unchanged. */
static void j_encode(struct jbuf *b, int idx, int depth)
{
    lua_State *L = b->L;
    idx = lua_absindex(L, idx);
    switch (lua_type(L, idx)) {
    case LUA_TNIL:
        jb_add(b, "null", 4);
        return;
    case LUA_TBOOLEAN:
        if (lua_toboolean(L, idx))
            jb_add(b, "true", 4);
        else
            jb_add(b, "false", 5);
        return;
    case LUA_TNUMBER:
        j_number(b, L, idx);
        return;
    case LUA_TSTRING: {
        size_t n;
        const char *s = lua_tolstring(L, idx, &n);
        j_string(b, s, n);
        return;
    }
    case LUA_TLIGHTUSERDATA:
        if (lua_touserdata(L, idx) == NULL) {
            jb_add(b, "null", 4);
            return;
        }
        break;
    case LUA_TUSERDATA:
        if (lua_topointer(L, idx) == SB(L)->ynull) {
            jb_add(b, "null", 4);
            return;
        }
        break;
    case LUA_TTABLE: {
        if (depth >= FORGE_SANDBOX_MAX_DEPTH)
            luaL_error(L, "json.encode: nesting deeper than %d (a cycle?)", FORGE_SANDBOX_MAX_DEPTH);
        luaL_checkstack(L, 4, "json.encode");
        lua_Integer count = 0, maxk = 0;
        int array = 1;
        lua_pushnil(L);
        while (lua_next(L, idx)) {
            lua_pop(L, 1);
            count++;
            if (array && lua_isinteger(L, -1) && lua_tointeger(L, -1) >= 1) {
                if (lua_tointeger(L, -1) > maxk)
                    maxk = lua_tointeger(L, -1);
            } else {
                array = 0;
            }
        }
        if (array && count > 0 && maxk == count) {
            jb_add(b, "[", 1);
            for (lua_Integer i = 1; i <= count; i++) {
                if (i > 1)
                    jb_add(b, ",", 1);
                lua_rawgeti(L, idx, i);
                j_encode(b, -1, depth + 1);
                lua_pop(L, 1);
            }
            jb_add(b, "]", 1);
            return;
        }
        jb_add(b, "{", 1);
        int first = 1;
        lua_pushnil(L);
        while (lua_next(L, idx)) {
            if (!first)
                jb_add(b, ",", 1);
            first = 0;
            if (lua_type(L, -2) == LUA_TSTRING) {
                size_t n;
                const char *k = lua_tolstring(L, -2, &n);
                j_string(b, k, n);
            } else if (lua_type(L, -2) == LUA_TNUMBER) {
                jb_add(b, "\"", 1);
                j_number(b, L, -2);
                jb_add(b, "\"", 1);
            } else {
                luaL_error(L, "json.encode: cannot encode a %s key", luaL_typename(L, -2));
            }
            jb_add(b, ":", 1);
            j_encode(b, -1, depth + 1);
            lua_pop(L, 1);
        }
        jb_add(b, "}", 1);
        return;
    }
    default:
        break;
    }
    luaL_error(L, "json.encode: cannot encode a %s", luaL_typename(L, idx));
}


/***
 * JSON text of a plain value (tables with keys 1..n are arrays, other tables objects,
 * an empty table is {}; forge.json.null and forge.yaml.null are null).
 * @function forge.json.encode
 * @param value
 * @treturn string
 * @raise on functions, userdata, NaN/inf, non-string keys, nesting deeper than 64
 */
static int l_json_encode(lua_State *L)
{
    luaL_checkany(L, 1);
    lua_settop(L, 1);
    struct jbuf b;
    jb_init(&b, L);
    j_encode(&b, 1, 0);
    lua_pushlstring(L, b.p, b.n);
    return 1;
}


struct jdec {
    lua_State *L;
    const char *start, *p, *end;
    const char *err;
};


static void jd_ws(struct jdec *d)
{
    while (d->p < d->end && (*d->p == ' ' || *d->p == '\t' || *d->p == '\n' || *d->p == '\r'))
        d->p++;
}


static int jd_fail(struct jdec *d, const char *what)
{
    if (!d->err)
        d->err = what;
    return -1;
}


static int jd_hex4(struct jdec *d, unsigned *out)
{
    if (d->end - d->p < 4)
        return jd_fail(d, "truncated \\u escape");
    unsigned v = 0;
    for (int i = 0; i < 4; i++) {
        char c = d->p[i];
        v <<= 4;
        if (c >= '0' && c <= '9') v |= (unsigned)(c - '0');
        else if (c >= 'a' && c <= 'f') v |= (unsigned)(c - 'a' + 10);
        else if (c >= 'A' && c <= 'F') v |= (unsigned)(c - 'A' + 10);
        else return jd_fail(d, "invalid \\u escape");
    }
    d->p += 4;
    *out = v;
    return 0;
}


/* Parse a string (d->p at the opening quote) and push it. */
static int jd_string(struct jdec *d)
{
    lua_State *L = d->L;
    const char *s = ++d->p;
    while (d->p < d->end && *d->p != '"' && *d->p != '\\' && (unsigned char)*d->p >= 0x20)
        d->p++;
    if (d->p < d->end && *d->p == '"') {                /* no escapes */
        lua_pushlstring(L, s, (size_t)(d->p - s));
        d->p++;
        return 0;
    }
    luaL_Buffer b;
    luaL_buffinit(L, &b);
    luaL_addlstring(&b, s, (size_t)(d->p - s));
    while (d->p < d->end) {
        unsigned char c = (unsigned char)*d->p;
        if (c == '"') {
            d->p++;
            luaL_pushresult(&b);
            return 0;
        }
        if (c < 0x20)
            return jd_fail(d, "control character in a string");
        if (c != '\\') {
            luaL_addchar(&b, (char)c);
            d->p++;
            continue;
        }
        if (++d->p >= d->end)
            break;
        c = (unsigned char)*d->p++;
        switch (c) {
        case '"': case '\\': case '/': luaL_addchar(&b, (char)c); break;
        case 'b': luaL_addchar(&b, '\b'); break;
        case 'f': luaL_addchar(&b, '\f'); break;
        case 'n': luaL_addchar(&b, '\n'); break;
        case 'r': luaL_addchar(&b, '\r'); break;
        case 't': luaL_addchar(&b, '\t'); break;
        case 'u': {
            unsigned cp, lo;
            if (jd_hex4(d, &cp) < 0)
                return -1;
            if (cp >= 0xd800 && cp <= 0xdbff) {
                if (d->end - d->p < 6 || d->p[0] != '\\' || d->p[1] != 'u')
                    return jd_fail(d, "unpaired surrogate in \\u escape");
                d->p += 2;
                if (jd_hex4(d, &lo) < 0)
                    return -1;
                if (lo < 0xdc00 || lo > 0xdfff)
                    return jd_fail(d, "unpaired surrogate in \\u escape");
                cp = 0x10000 + ((cp - 0xd800) << 10) + (lo - 0xdc00);
            } else if (cp >= 0xdc00 && cp <= 0xdfff) {
                return jd_fail(d, "unpaired surrogate in \\u escape");
            }
            char u[4];
            size_t n;
            if (cp < 0x80) { u[0] = (char)cp; n = 1; }
            else if (cp < 0x800) { u[0] = (char)(0xc0 | cp >> 6); u[1] = (char)(0x80 | (cp & 0x3f)); n = 2; }
            else if (cp < 0x10000) {
                u[0] = (char)(0xe0 | cp >> 12); u[1] = (char)(0x80 | ((cp >> 6) & 0x3f));
                u[2] = (char)(0x80 | (cp & 0x3f)); n = 3;
            } else {
                u[0] = (char)(0xf0 | cp >> 18); u[1] = (char)(0x80 | ((cp >> 12) & 0x3f));
                u[2] = (char)(0x80 | ((cp >> 6) & 0x3f)); u[3] = (char)(0x80 | (cp & 0x3f)); n = 4;
            }
            luaL_addlstring(&b, u, n);
            break;
        }
        default:
            return jd_fail(d, "invalid escape in a string");
        }
    }
    return jd_fail(d, "unterminated string");
}


static int jd_number(struct jdec *d)
{
    const char *s = d->p;
    int is_int = 1;
    if (d->p < d->end && *d->p == '-')
        d->p++;
    if (d->p >= d->end || *d->p < '0' || *d->p > '9')
        return jd_fail(d, "invalid number");
    if (*d->p == '0')
        d->p++;
    else
        while (d->p < d->end && *d->p >= '0' && *d->p <= '9')
            d->p++;
    if (d->p < d->end && *d->p == '.') {
        is_int = 0;
        d->p++;
        if (d->p >= d->end || *d->p < '0' || *d->p > '9')
            return jd_fail(d, "invalid number");
        while (d->p < d->end && *d->p >= '0' && *d->p <= '9')
            d->p++;
    }
    if (d->p < d->end && (*d->p == 'e' || *d->p == 'E')) {
        is_int = 0;
        d->p++;
        if (d->p < d->end && (*d->p == '+' || *d->p == '-'))
            d->p++;
        if (d->p >= d->end || *d->p < '0' || *d->p > '9')
            return jd_fail(d, "invalid number");
        while (d->p < d->end && *d->p >= '0' && *d->p <= '9')
            d->p++;
    }
    char num[128];
    size_t n = (size_t)(d->p - s);
    if (n >= sizeof num)
        return jd_fail(d, "number too long");
    memcpy(num, s, n);
    num[n] = '\0';
    if (is_int && n <= 18) {
        lua_pushinteger(d->L, (lua_Integer)strtoll(num, NULL, 10));
        return 0;
    }
    double v = strtod(num, NULL);
    if (!isfinite(v)) {                 /* 1e400: encode could not write it back */
        d->p = s;
        return jd_fail(d, "number out of range");
    }
    lua_pushnumber(d->L, v);
    return 0;
}


static int jd_lit(struct jdec *d, const char *lit, size_t n)
{
    if ((size_t)(d->end - d->p) < n || memcmp(d->p, lit, n) != 0)
        return jd_fail(d, "unexpected character");
    d->p += n;
    return 0;
}


/* Parse one value and push it. Returns 0 or -1 (d->err set). */
static int jd_value(struct jdec *d, int depth)
{
    lua_State *L = d->L;
    jd_ws(d);
    if (d->p >= d->end)
        return jd_fail(d, "unexpected end of text");
    switch (*d->p) {
    case '{':
    case '[': {
        int obj = *d->p == '{';
        if (depth >= FORGE_SANDBOX_MAX_DEPTH)
            return jd_fail(d, "nesting deeper than 64");
        luaL_checkstack(L, 4, "json.decode");
        d->p++;
        lua_newtable(L);
        jd_ws(d);
        if (d->p < d->end && *d->p == (obj ? '}' : ']')) {
            d->p++;
            return 0;
        }
        for (lua_Integer i = 1;; i++) {
            if (obj) {
                jd_ws(d);
                if (d->p >= d->end || *d->p != '"')
                    return jd_fail(d, "expected a string key");
                if (jd_string(d) < 0)
                    return -1;
                jd_ws(d);
                if (d->p >= d->end || *d->p != ':')
                    return jd_fail(d, "expected ':'");
                d->p++;
                if (jd_value(d, depth + 1) < 0)
                    return -1;
                lua_rawset(L, -3);
            } else {
                if (jd_value(d, depth + 1) < 0)
                    return -1;
                lua_rawseti(L, -2, i);
            }
            jd_ws(d);
            if (d->p < d->end && *d->p == ',') {
                d->p++;
                continue;
            }
            if (d->p < d->end && *d->p == (obj ? '}' : ']')) {
                d->p++;
                return 0;
            }
            return jd_fail(d, obj ? "expected ',' or '}'" : "expected ',' or ']'");
        }
    }
    case '"':
        return jd_string(d);
    case 't':
        if (jd_lit(d, "true", 4) < 0)
            return -1;
        lua_pushboolean(L, 1);
        return 0;
    case 'f':
        if (jd_lit(d, "false", 5) < 0)
            return -1;
        lua_pushboolean(L, 0);
        return 0;
    case 'n':
        if (jd_lit(d, "null", 4) < 0)
            return -1;
        lua_pushlightuserdata(L, NULL);
        return 0;
    default:
        return jd_number(d);
    }
}


/***
 * Decode JSON text. Objects and arrays become tables, null becomes forge.json.null,
 * integers without fraction or exponent become Lua integers.
 * @function forge.json.decode
 * @tparam string text
 * @return value | nil, err (err.code "json.invalid", message with the byte offset)
 */
static int l_json_decode(lua_State *L)
{
    size_t n;
    const char *s = luaL_checklstring(L, 1, &n);
    lua_settop(L, 1);
    struct jdec d = {L, s, s, s + n, NULL};
    if (jd_value(&d, 0) == 0) {
        jd_ws(&d);
        if (d.p == d.end)
            return 1;
        d.err = "trailing characters after the value";
    }
    lua_settop(L, 1);
    return forge_pusherror(L, "json.invalid", 0, "json.decode: %s at offset %d", d.err,
                           (int)(d.p - d.start));
}


/* ------------------------------------------------------------------------ */
/* replaced and guarded library functions                                   */
/* ------------------------------------------------------------------------ */

/***
 * string.rep with the result capped at FORGE_SANDBOX_REP_MAX bytes (1 MiB).
 * An empty result returns at once (the stock loop would spin n times for "").
 */
static int l_str_rep(lua_State *S)
{
    size_t l, lsep;
    const char *s = luaL_checklstring(S, 1, &l);
    lua_Integer n = luaL_checkinteger(S, 2);
    const char *sep = luaL_optlstring(S, 3, "", &lsep);
    if (n <= 0 || (l == 0 && (lsep == 0 || n == 1))) {
        lua_pushliteral(S, "");
        return 1;
    }
    if (n > FORGE_SANDBOX_REP_MAX || l > FORGE_SANDBOX_REP_MAX || lsep > FORGE_SANDBOX_REP_MAX ||
        (size_t)n * l + (size_t)(n - 1) * lsep > FORGE_SANDBOX_REP_MAX)
        return luaL_error(S, "string.rep: result larger than %d bytes", FORGE_SANDBOX_REP_MAX);
    size_t total = (size_t)n * l + (size_t)(n - 1) * lsep;
    luaL_Buffer b;
    char *p = luaL_buffinitsize(S, &b, total);
    for (lua_Integer i = 0; i < n; i++) {
        memcpy(p, s, l);
        p += l;
        if (i + 1 < n && lsep) {
            memcpy(p, sep, lsep);
            p += lsep;
        }
    }
    luaL_pushresultsize(&b, total);
    return 1;
}


/* Call upvalue 1 (the stock function) with every argument; return all its results. */
static int call_stock(lua_State *S)
{
    int n = lua_gettop(S);
    lua_pushvalue(S, lua_upvalueindex(1));
    lua_insert(S, 1);
    lua_call(S, n, LUA_MULTRET);
    return lua_gettop(S);
}


/*
 * table.move/insert/remove loop in C with no hook: bound the elements they may shift,
 * so a huge range or a lying __len cannot stall the thread (upvalue 2: which one).
 */
static int l_tab_guard(lua_State *S)
{
    const char *which = lua_tostring(S, lua_upvalueindex(2));
    lua_Integer span;
    if (which[0] == 'm') {                              /* move(a1, f, e, t [,a2]) */
        lua_Integer f = luaL_checkinteger(S, 2), e = luaL_checkinteger(S, 3);
        span = e >= f ? (lua_Integer)((lua_Unsigned)e - (lua_Unsigned)f) : 0;
        if (e >= f && (lua_Unsigned)e - (lua_Unsigned)f >= (lua_Unsigned)SB_MOVE_MAX)
            span = SB_MOVE_MAX;
    } else {
        luaL_checktype(S, 1, LUA_TTABLE);
        span = luaL_len(S, 1);                          /* may run __len (hooked Lua) */
        if (span < 0)
            span = 0;
    }
    if (span >= SB_MOVE_MAX)
        return luaL_error(S, "table.%s: more than %d elements", which, SB_MOVE_MAX);
    return call_stock(S);
}


/*
 * A hook that raises leaves hooks disabled (L->allowhook = 0) while Lua runs the
 * message handler of the enclosing xpcall, and in a coroutine that died of it. So once
 * a limit has fired, no script handler runs (the error passes through unchanged) and
 * coroutine.close (which runs __close handlers in the dead thread) is refused.
 * Upvalue 1: the script's handler.
 */
static int l_xpcall_handler(lua_State *S)
{
    if (SB(S)->expired)
        return 1;
    lua_pushvalue(S, lua_upvalueindex(1));
    lua_insert(S, 1);
    lua_call(S, lua_gettop(S) - 1, 1);
    return 1;
}


/* xpcall(f, handler, ...) with the handler wrapped as above. Upvalue 1: stock xpcall. */
static int l_xpcall(lua_State *S)
{
    luaL_checktype(S, 2, LUA_TFUNCTION);
    lua_pushvalue(S, 2);
    lua_pushcclosure(S, l_xpcall_handler, 1);
    lua_replace(S, 2);
    return call_stock(S);
}


/* coroutine.close, refused once a limit has fired. Upvalue 1: stock close. */
static int l_co_close(lua_State *S)
{
    struct sandbox *sb = SB(S);
    if (sb->expired)
        return luaL_error(S, "%s time limit exceeded", sb->expired == EXP_CPU ? "cpu" : "wall");
    return call_stock(S);
}


/* coroutine.create, with the caller's hook set in the new thread explicitly. */
static int l_co_create(lua_State *S)
{
    luaL_checktype(S, 1, LUA_TFUNCTION);
    lua_State *co = lua_newthread(S);
    lua_pushvalue(S, 1);
    lua_xmove(S, co, 1);
    lua_Hook h = lua_gethook(S);
    if (h)
        lua_sethook(co, h, lua_gethookmask(S), lua_gethookcount(S));
    return 1;
}


/***
 * setmetatable without __gc: a finalizer would run script code at a time no call
 * limit covers (during a copy, or in lua_close). Otherwise as the stock function.
 */
static int l_setmetatable(lua_State *S)
{
    int t = lua_type(S, 2);
    luaL_checktype(S, 1, LUA_TTABLE);
    luaL_argexpected(S, t == LUA_TNIL || t == LUA_TTABLE, 2, "nil or table");
    if (t == LUA_TTABLE) {
        lua_pushliteral(S, "__gc");
        if (lua_rawget(S, 2) != LUA_TNIL)
            return luaL_error(S, "setmetatable: __gc metamethods are not allowed in a service script");
        lua_pop(S, 1);
    }
    if (luaL_getmetafield(S, 1, "__metatable") != LUA_TNIL)
        return luaL_error(S, "cannot change a protected metatable");
    lua_settop(S, 2);
    lua_setmetatable(S, 1);
    return 1;
}


/***
 * collectgarbage reduced to "count" (KiB in use, as a float).
 */
static int l_collectgarbage(lua_State *S)
{
    const char *opt = luaL_optstring(S, 1, "count");
    if (strcmp(opt, "count") != 0)
        return luaL_error(S, "collectgarbage: only \"count\" is allowed in a service script");
    int k = lua_gc(S, LUA_GCCOUNT, 0), b = lua_gc(S, LUA_GCCOUNTB, 0);
    lua_pushnumber(S, (lua_Number)k + ((lua_Number)b / 1024));
    return 1;
}


/***
 * load(chunk [, chunkname [, mode [, env]]]): text only (mode forced to "t"), env
 * defaulting to the script's environment. Upvalues: stock load, environment.
 */
static int l_load(lua_State *S)
{
    int has_env = !lua_isnone(S, 4);
    lua_settop(S, 4);
    lua_pushvalue(S, lua_upvalueindex(1));
    lua_pushvalue(S, 1);
    lua_pushvalue(S, 2);
    lua_pushliteral(S, "t");
    if (has_env)
        lua_pushvalue(S, 4);
    else
        lua_pushvalue(S, lua_upvalueindex(2));
    lua_call(S, 4, 2);
    if (lua_isnil(S, -2))
        return 2;
    lua_pop(S, 1);
    return 1;
}


/*
 * Estimated size of the value at idx, shared references counted each time (so the
 * walk is bounded by the cap, never by the graph). Returns SIZE_MAX past the cap.
 */
static size_t measure(lua_State *S, int idx, int depth, size_t acc)
{
    if (acc > FORGE_SANDBOX_MAX_COPY || depth > FORGE_SANDBOX_MAX_DEPTH)
        return SIZE_MAX;
    idx = lua_absindex(S, idx);
    if (lua_type(S, idx) == LUA_TSTRING)
        return acc + lua_rawlen(S, idx) + CP_ENTRY;
    if (lua_type(S, idx) != LUA_TTABLE)
        return acc + CP_ENTRY;
    luaL_checkstack(S, 3, "measuring a value");
    acc += CP_TABLE;
    lua_pushnil(S);
    while (lua_next(S, idx)) {
        acc = measure(S, -2, depth + 1, acc);
        if (acc != SIZE_MAX)
            acc = measure(S, -1, depth + 1, acc);
        lua_pop(S, 1);
        if (acc == SIZE_MAX) {
            lua_pop(S, 1);
            return SIZE_MAX;
        }
    }
    return acc;
}


/*
 * forge.yaml.decode/encode/merge guard: libyaml and the merge engine allocate with
 * malloc, outside the sandbox's cap, so bound their input first; merge gets env = {}
 * unless the script passes one (no process environment inside a sandbox).
 * Upvalues: stock function, its name.
 */
static int l_yaml_guard(lua_State *S)
{
    const char *name = lua_tostring(S, lua_upvalueindex(2));
    int n = lua_gettop(S);
    for (int i = 1; i <= n; i++)
        if (measure(S, i, 0, 0) == SIZE_MAX)
            return luaL_error(S, "forge.yaml.%s: argument %d is larger than %d bytes or nested deeper than %d",
                              name, i, FORGE_SANDBOX_MAX_COPY, FORGE_SANDBOX_MAX_DEPTH);
    if (strcmp(name, "merge") == 0) {
        lua_settop(S, 2);
        lua_newtable(S);                                /* opts copy with env = {} */
        if (lua_istable(S, 2)) {
            lua_pushnil(S);
            while (lua_next(S, 2)) {
                lua_pushvalue(S, -2);
                lua_insert(S, -2);
                lua_rawset(S, 3);
            }
        }
        lua_getfield(S, 3, "env");
        if (lua_isnil(S, -1)) {
            lua_newtable(S);
            lua_setfield(S, 3, "env");
        }
        lua_pop(S, 1);
        lua_replace(S, 2);
    }
    return call_stock(S);
}


/* ------------------------------------------------------------------------ */
/* read-only proxies and the locked environment                             */
/* ------------------------------------------------------------------------ */

/* luaL_error's position (level 1) is the script line doing the access. */
static int l_ro_newindex(lua_State *S)
{
    const char *key = lua_type(S, 2) == LUA_TSTRING ? lua_tostring(S, 2) : luaL_typename(S, 2);
    return luaL_error(S, "cannot assign field '%s' of a read-only table", key);
}


static int l_env_newindex(lua_State *S)
{
    const char *key = lua_type(S, 2) == LUA_TSTRING ? lua_tostring(S, 2) : luaL_typename(S, 2);
    return luaL_error(S, "cannot assign global '%s' (globals are locked: declare it local)", key);
}


static int l_env_index(lua_State *S)
{
    const char *key = lua_type(S, 2) == LUA_TSTRING ? lua_tostring(S, 2) : luaL_typename(S, 2);
    return luaL_error(S, "undefined global '%s'", key);
}


static int l_ro_next(lua_State *S)
{
    lua_settop(S, 2);
    if (lua_next(S, lua_upvalueindex(1)))
        return 2;
    lua_pushnil(S);
    return 1;
}


/* __pairs of a proxy: iterate the backing table without handing it out. */
static int l_ro_pairs(lua_State *S)
{
    lua_pushvalue(S, lua_upvalueindex(1));
    lua_pushcclosure(S, l_ro_next, 1);
    lua_pushvalue(S, 1);
    lua_pushnil(S);
    return 3;
}


/* Stack: [backing] -> [proxy]. `newindex` raises on every assignment. */
static void push_proxy(lua_State *S, lua_CFunction newindex)
{
    lua_newtable(S);
    lua_createtable(S, 0, 4);
    lua_pushvalue(S, -3);
    lua_setfield(S, -2, "__index");
    lua_pushcfunction(S, newindex);
    lua_setfield(S, -2, "__newindex");
    lua_pushvalue(S, -3);
    lua_pushcclosure(S, l_ro_pairs, 1);
    lua_setfield(S, -2, "__pairs");
    lua_pushboolean(S, 0);
    lua_setfield(S, -2, "__metatable");
    lua_setmetatable(S, -2);
    lua_remove(S, -2);
}


/* Stack: [src] -> [src, copy]: a new table with the fields of src named in `names`. */
static void pick(lua_State *S, const char *const names[])
{
    lua_newtable(S);
    for (int i = 0; names[i]; i++) {
        lua_getfield(S, -2, names[i]);
        lua_setfield(S, -2, names[i]);
    }
}


/*
 * pbkdf2 and scram_sha256 run in C, where the count hook never fires: bound their work
 * (iterations x output blocks of the digest) so one call stays within milliseconds.
 */
#define SB_KDF_WORK 100000

static int l_kdf_guard(lua_State *S)
{
    const char *name = lua_tostring(S, lua_upvalueindex(2));
    int scram = strcmp(name, "scram_sha256") == 0;
    lua_Integer iterations = scram ? luaL_optinteger(S, 3, 4096) : luaL_checkinteger(S, 3);
    lua_Integer blocks = 1;
    if (!scram) {
        static const char *const algs[] = {"sha1", "sha256", "sha384", "sha512", NULL};
        static const lua_Integer sizes[] = {20, 32, 48, 64};
        lua_Integer length = luaL_checkinteger(S, 4);
        int alg = luaL_checkoption(S, 5, "sha256", algs);
        blocks = length > 0 ? (length + sizes[alg] - 1) / sizes[alg] : 1;
    }
    if (iterations > 0 && blocks > SB_KDF_WORK / iterations)
        return luaL_error(S, "forge.crypto.%s: %I iterations x %I block(s) is more work than a sandboxed call may do "
                          "(%d)", name, iterations, blocks, SB_KDF_WORK);
    return call_stock(S);
}


/* Stack: [t] -> [t]: t[name] = closure(fn, t[name], name). */
static void wrap_field(lua_State *S, const char *name, lua_CFunction fn)
{
    lua_getfield(S, -1, name);
    lua_pushstring(S, name);
    lua_pushcclosure(S, fn, 2);
    lua_setfield(S, -2, name);
}


static const char PRELUDE[] =
    "local create, resume, password, rawlog, name, error, type, tostring, next, ipairs, setmetatable = ...\n"
    "local P = {}\n"
    "local function finish(ok, ...)\n"
    "  if ok then return ... end\n"
    "  error((...), 0)\n"
    "end\n"
    "function P.wrap(f)\n"
    "  local co = create(f)\n"
    "  return function(...) return finish(resume(co, ...)) end\n"
    "end\n"
    "function P.prepare(ctx)\n"
    "  local function secret(key)\n"
    "    if type(key) ~= 'string' then error('ctx.secret(name): name must be a string', 2) end\n"
    "    local s = ctx.secrets\n"
    "    if s == nil then s = {}; ctx.secrets = s end\n"
    "    if type(s) ~= 'table' then error('ctx.secrets must be a table', 2) end\n"
    "    local v = s[key]\n"
    "    if v == nil then v = password(32); s[key] = v end\n"
    "    return v\n"
    "  end\n"
    "  setmetatable(ctx, { __index = { secret = secret } })\n"
    "end\n"
    "for _, level in ipairs({ 'debug', 'info', 'warn', 'error' }) do\n"
    "  local f = rawlog[level]\n"
    "  P[level] = function(msg, fields)\n"
    "    local out = {}\n"
    "    if fields ~= nil then\n"
    "      if type(fields) ~= 'table' then error('forge.log.' .. level .. ': fields must be a table', 2) end\n"
    "      for k, v in next, fields do out[k] = v end\n"
    "    end\n"
    "    out.service = name\n"
    "    f(tostring(msg), out)\n"
    "  end\n"
    "end\n"
    "return P\n";


struct setup {
    struct sandbox *sb;
    lua_CFunction open[SB_NMODS];       /* crypto, log, yaml, pattern, conf */
};

static const char *const MOD_NAMES[SB_NMODS] = {"crypto", "log", "yaml", "pattern", "conf"};


/*
 * Build the sandbox: libraries, whitelisted copies, proxies, forge table, prelude,
 * locked environment. Runs protected, with the memory limit off.
 * Stack: [setup*] -> []
 */
static int t_setup(lua_State *S)
{
    static const char *const base_names[] = {"assert", "error", "getmetatable", "ipairs", "next", "pairs",
        "pcall", "rawequal", "rawlen", "select", "tonumber", "tostring", "type", "xpcall", "_VERSION", NULL};
    static const char *const string_names[] = {"byte", "char", "find", "format", "gmatch", "gsub", "len",
        "lower", "match", "reverse", "sub", "upper", "pack", "packsize", "unpack", NULL};
    static const char *const table_names[] = {"concat", "insert", "move", "pack", "remove", "sort", "unpack",
        NULL};
    static const char *const math_names[] = {"abs", "ceil", "cos", "deg", "exp", "floor", "fmod", "huge",
        "log", "max", "maxinteger", "min", "mininteger", "modf", "pi", "rad", "random", "sin", "sqrt",
        "tan", "tointeger", "type", "ult", "asin", "acos", "atan", NULL};
    static const char *const utf8_names[] = {"char", "charpattern", "codes", "codepoint", "len", "offset",
        NULL};
    static const char *const co_names[] = {"resume", "yield", "status", "isyieldable", "running", "close",
        NULL};
    static const char *const crypto_names[] = {"password", "uuid", "token", "sha256_hex", "hex",
        "base64_encode", "base64_decode", "hmac", "pbkdf2", "scram_sha256", NULL};
    static const char *const conf_names[] = {"render", NULL};
    static const char *const yaml_names[] = {"decode", "encode", "merge", "null", "kind", "map", "seq", NULL};

    struct setup *su = lua_touserdata(S, 1);
    struct sandbox *sb = su->sb;
    lua_settop(S, 0);

    luaL_requiref(S, "_G", luaopen_base, 0);            /* 1: stock globals */
    luaL_requiref(S, LUA_STRLIBNAME, luaopen_string, 0);        /* 2 */
    luaL_requiref(S, LUA_TABLIBNAME, luaopen_table, 0);         /* 3 */
    luaL_requiref(S, LUA_MATHLIBNAME, luaopen_math, 0);         /* 4 */
    luaL_requiref(S, LUA_UTF8LIBNAME, luaopen_utf8, 0);         /* 5 */
    luaL_requiref(S, LUA_COLIBNAME, luaopen_coroutine, 0);      /* 6 */
    for (int i = 0; i < SB_PATTERN; i++) {                      /* 7 crypto, 8 log, 9 yaml */
        char modname[32];
        snprintf(modname, sizeof modname, "forge.%s", MOD_NAMES[i]);
        luaL_requiref(S, modname, su->open[i], 0);
    }

    /* 10: the script's environment (locked proxy), created first: load needs it */
    lua_newtable(S);                                            /* 10: backing globals */
    lua_newtable(S);                                            /* 11: env proxy */
    lua_createtable(S, 0, 4);
    lua_pushvalue(S, 10);
    lua_setfield(S, -2, "__index");
    lua_pushcfunction(S, l_env_newindex);
    lua_setfield(S, -2, "__newindex");
    lua_pushvalue(S, 10);
    lua_pushcclosure(S, l_ro_pairs, 1);
    lua_setfield(S, -2, "__pairs");
    lua_pushboolean(S, 0);
    lua_setfield(S, -2, "__metatable");
    lua_setmetatable(S, 11);
    lua_createtable(S, 0, 2);                                   /* backing: undefined reads raise */
    lua_pushcfunction(S, l_env_index);
    lua_setfield(S, -2, "__index");
    lua_pushboolean(S, 0);
    lua_setfield(S, -2, "__metatable");
    lua_setmetatable(S, 10);

    /* base */
    lua_pushvalue(S, 1);                                        /* 12 */
    pick(S, base_names);                                        /* 13 */
    lua_pushcfunction(S, l_setmetatable);
    lua_setfield(S, 13, "setmetatable");
    lua_pushcfunction(S, l_collectgarbage);
    lua_setfield(S, 13, "collectgarbage");
    lua_getfield(S, 1, "load");
    lua_pushvalue(S, 11);
    lua_pushcclosure(S, l_load, 2);
    lua_setfield(S, 13, "load");
    lua_getfield(S, 1, "xpcall");
    lua_pushcclosure(S, l_xpcall, 1);
    lua_setfield(S, 13, "xpcall");
    lua_pushnil(S);                                             /* copy base into the backing */
    while (lua_next(S, 13)) {
        lua_pushvalue(S, -2);
        lua_insert(S, -2);
        lua_rawset(S, 10);
    }
    lua_settop(S, 11);

    /*
     * string: the copy also serves as the string metatable's __index. find, match, gmatch
     * and gsub are forge.pattern's: same semantics, but a step budget per call, because the
     * stock matcher runs in C where the count hook never fires.
     */
    lua_pushvalue(S, 2);
    pick(S, string_names);                                      /* 13 */
    lua_pushcfunction(S, l_str_rep);
    lua_setfield(S, -2, "rep");
    luaL_requiref(S, "forge.pattern", su->open[SB_PATTERN], 0); /* 14 */
    for (int i = 0; i < 4; i++) {
        static const char *const matchers[] = {"find", "match", "gmatch", "gsub"};
        lua_getfield(S, 14, matchers[i]);
        lua_setfield(S, 13, matchers[i]);
    }
    lua_pop(S, 1);
    lua_pushliteral(S, "");
    lua_getmetatable(S, -1);
    lua_pushvalue(S, 13);
    lua_setfield(S, -2, "__index");
    lua_pushboolean(S, 0);
    lua_setfield(S, -2, "__metatable");
    lua_pop(S, 2);
    push_proxy(S, l_ro_newindex);
    lua_setfield(S, 10, "string");
    lua_settop(S, 11);

    lua_pushvalue(S, 3);
    pick(S, table_names);
    wrap_field(S, "move", l_tab_guard);
    wrap_field(S, "insert", l_tab_guard);
    wrap_field(S, "remove", l_tab_guard);
    push_proxy(S, l_ro_newindex);
    lua_setfield(S, 10, "table");
    lua_settop(S, 11);

    lua_pushvalue(S, 4);
    pick(S, math_names);
    push_proxy(S, l_ro_newindex);
    lua_setfield(S, 10, "math");
    lua_settop(S, 11);

    lua_pushvalue(S, 5);
    pick(S, utf8_names);
    push_proxy(S, l_ro_newindex);
    lua_setfield(S, 10, "utf8");
    lua_settop(S, 11);

    /* prelude: coroutine.wrap, ctx.secret, log wrappers */
    if (luaL_loadbufferx(S, PRELUDE, sizeof PRELUDE - 1, "=forge.sandbox.prelude", "t") != LUA_OK)
        return lua_error(S);                                    /* 12 */
    lua_newtable(S);
    lua_setupvalue(S, 12, 1);                                   /* empty _ENV: uses only its args */
    lua_pushcfunction(S, l_co_create);
    lua_getfield(S, 6, "resume");
    lua_getfield(S, 7, "password");
    lua_pushvalue(S, 8);
    lua_pushstring(S, sb->name);
    lua_getfield(S, 1, "error");
    lua_getfield(S, 1, "type");
    lua_getfield(S, 1, "tostring");
    lua_getfield(S, 1, "next");
    lua_getfield(S, 1, "ipairs");
    lua_getfield(S, 1, "setmetatable");
    lua_call(S, 11, 1);                                         /* 12: P */
    lua_getfield(S, 12, "prepare");
    lua_rawsetp(S, LUA_REGISTRYINDEX, &K_PREPARE);

    lua_pushvalue(S, 6);
    pick(S, co_names);                                          /* 14 */
    lua_pushcfunction(S, l_co_create);
    lua_setfield(S, 14, "create");
    lua_getfield(S, 12, "wrap");
    lua_setfield(S, 14, "wrap");
    wrap_field(S, "close", l_co_close);
    push_proxy(S, l_ro_newindex);
    lua_setfield(S, 10, "coroutine");
    lua_settop(S, 12);

    /* forge */
    lua_newtable(S);                                            /* 13: forge backing */
    lua_pushvalue(S, 7);
    pick(S, crypto_names);
    wrap_field(S, "pbkdf2", l_kdf_guard);
    wrap_field(S, "scram_sha256", l_kdf_guard);
    push_proxy(S, l_ro_newindex);
    lua_setfield(S, 13, "crypto");
    lua_settop(S, 13);

    luaL_requiref(S, "forge.conf", su->open[SB_CONF], 0);      /* 14 */
    pick(S, conf_names);
    push_proxy(S, l_ro_newindex);
    lua_setfield(S, 13, "conf");
    lua_settop(S, 13);

    lua_newtable(S);
    for (int i = 0; i < 4; i++) {
        static const char *const lv[] = {"debug", "info", "warn", "error"};
        lua_getfield(S, 12, lv[i]);
        lua_setfield(S, -2, lv[i]);
    }
    push_proxy(S, l_ro_newindex);
    lua_setfield(S, 13, "log");

    lua_pushvalue(S, 9);
    pick(S, yaml_names);
    wrap_field(S, "decode", l_yaml_guard);
    wrap_field(S, "encode", l_yaml_guard);
    wrap_field(S, "merge", l_yaml_guard);
    lua_getfield(S, -1, "null");
    sb->ynull = lua_topointer(S, -1);
    lua_pop(S, 1);
    push_proxy(S, l_ro_newindex);
    lua_setfield(S, 13, "yaml");
    lua_settop(S, 13);

    lua_newtable(S);
    lua_pushcfunction(S, l_json_encode);
    lua_setfield(S, -2, "encode");
    lua_pushcfunction(S, l_json_decode);
    lua_setfield(S, -2, "decode");
    lua_pushlightuserdata(S, NULL);
    lua_setfield(S, -2, "null");
    push_proxy(S, l_ro_newindex);
    lua_setfield(S, 13, "json");

    lua_pushstring(S, sb->name);
    lua_setfield(S, 13, "service_name");
    lua_pushliteral(S, FORGE_VERSION);
    lua_setfield(S, 13, "_VERSION");
    lua_pushvalue(S, 13);
    push_proxy(S, l_ro_newindex);
    lua_setfield(S, 10, "forge");

    lua_pushvalue(S, 11);
    lua_setfield(S, 10, "_G");
    lua_pushvalue(S, 11);
    lua_rawsetp(S, LUA_REGISTRYINDEX, &K_ENV);
    lua_pushvalue(S, 11);                                       /* default _ENV of any chunk */
    lua_rawseti(S, LUA_REGISTRYINDEX, LUA_RIDX_GLOBALS);
    lua_pushliteral(S, "");
    lua_rawsetp(S, LUA_REGISTRYINDEX, &K_TRACEBACK);
    lua_settop(S, 0);
    return 0;
}


/* ------------------------------------------------------------------------ */
/* module loader for the forge.* capabilities inside the sandbox state      */
/* ------------------------------------------------------------------------ */

/*
 * Find luaopen_forge_<mod>: in the forge binary every module is linked in and exported
 * (-rdynamic); under plain lua5.4 the modules are sibling .so files of this one (or in
 * modules_dir), opened RTLD_LOCAL like Lua's own loader. The handle is returned in
 * *handle (NULL when none was opened) for dlclose after the state is closed.
 */
static lua_CFunction find_opener(const char *mod, const char *dir, void **handle, char *err, size_t errn)
{
    char sym[64], path[PATH_MAX];
    snprintf(sym, sizeof sym, "luaopen_forge_%s", mod);
    union { void *p; lua_CFunction f; } u;
    *handle = NULL;
    u.p = dlsym(RTLD_DEFAULT, sym);
    if (u.p)
        return u.f;
    if (dir) {
        snprintf(path, sizeof path, "%s/%s.so", dir, mod);
    } else {
        Dl_info info;
        union { lua_CFunction f; void *p; } self = {.f = luaopen_forge_sandbox};
        if (!dladdr(self.p, &info) || !info.dli_fname) {
            snprintf(err, errn, "cannot locate %s: not linked in and no modules_dir", sym);
            return NULL;
        }
        const char *slash = strrchr(info.dli_fname, '/');
        int dl = slash ? (int)(slash - info.dli_fname) : 1;
        snprintf(path, sizeof path, "%.*s/%s.so", dl, slash ? info.dli_fname : ".", mod);
    }
    void *h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (!h) {
        snprintf(err, errn, "cannot open %s: %s", path, dlerror());
        return NULL;
    }
    u.p = dlsym(h, sym);
    if (!u.p) {
        snprintf(err, errn, "%s has no %s", path, sym);
        dlclose(h);
        return NULL;
    }
    *handle = h;
    return u.f;
}


/* ------------------------------------------------------------------------ */
/* the sandbox object                                                       */
/* ------------------------------------------------------------------------ */

static void sb_free(struct sandbox *sb)
{
    if (sb->S) {
        sb->armed = 0;
        lua_close(sb->S);               /* no script finalizers: setmetatable refuses __gc */
        sb->S = NULL;
    }
    for (int i = 0; i < SB_NMODS; i++)
        if (sb->dl[i])
            dlclose(sb->dl[i]);
    free(sb);
}


static struct sandbox *checkopen(lua_State *L)
{
    struct sbox *box = tosbox(L);
    if (!box->sb)
        luaL_error(L, "sandbox is closed");
    return box->sb;
}


static double optseconds(lua_State *L, const char *key, double def)
{
    double v = def;
    if (lua_getfield(L, 1, key) != LUA_TNIL) {
        int isnum;
        v = lua_tonumberx(L, -1, &isnum);
        if (!isnum || !(v > 0) || v > 86400)
            luaL_error(L, "sandbox.new: option '%s' must be a number of seconds in (0, 86400]", key);
    }
    lua_pop(L, 1);
    return v;
}


/***
 * Create a sandbox: a new lua_State with the whitelisted libraries and the forge table.
 * @function new
 * @tparam[opt] table opts name (string, "service"), memory (bytes, 64 MiB), cpu (seconds
 *   per call, 2), wall (seconds per call, 10), path_prefix (default chunk name prefix,
 *   "services/<name>/"), modules_dir (where crypto.so, log.so, yaml.so, pattern.so and conf.so
 *   are when not linked in)
 * @return sandbox
 */
static int l_sandbox_new(lua_State *L)
{
    static const char *const keys[] = {"name", "memory", "cpu", "wall", "path_prefix", "modules_dir", NULL};
    if (lua_isnoneornil(L, 1)) {
        lua_settop(L, 0);
        lua_newtable(L);
    }
    forge_checkkeys(L, 1, "sandbox.new", keys);
    const char *name = forge_optstrfield(L, 1, "name", "service");
    lua_Integer memory = forge_optintfield(L, 1, "memory", FORGE_SANDBOX_MEMORY);
    if (memory < FORGE_SANDBOX_MEMORY_MIN)
        luaL_error(L, "sandbox.new: option 'memory' must be at least %d bytes", FORGE_SANDBOX_MEMORY_MIN);
    double cpu = optseconds(L, "cpu", FORGE_SANDBOX_CPU);
    double wall = optseconds(L, "wall", FORGE_SANDBOX_WALL);
    const char *prefix = forge_optstrfield(L, 1, "path_prefix", NULL);
    const char *dir = forge_optstrfield(L, 1, "modules_dir", NULL);

    struct sbox *box = lua_newuserdatauv(L, sizeof *box, 0);
    box->sb = NULL;
    luaL_setmetatable(L, FORGE_SANDBOX_MT);
    struct sandbox *sb = calloc(1, sizeof *sb);
    if (!sb)
        return luaL_error(L, "sandbox.new: out of memory");
    box->sb = sb;                       /* owned by the userdata from here: __gc frees */
    snprintf(sb->name, sizeof sb->name, "%s", name);
    if (prefix)
        snprintf(sb->chunk, sizeof sb->chunk, "@%sservice.lua", prefix);
    else
        snprintf(sb->chunk, sizeof sb->chunk, "@services/%s/service.lua", name);
    sb->cpu = cpu;
    sb->wall = wall;

    struct setup su = {.sb = sb};
    char err[PATH_MAX + 256];
    for (int i = 0; i < SB_NMODS; i++) {
        su.open[i] = find_opener(MOD_NAMES[i], dir, &sb->dl[i], err, sizeof err);
        if (!su.open[i])
            return luaL_error(L, "sandbox.new: %s", err);
    }

    lua_State *S = lua_newstate(sb_alloc, sb);
    if (!S)
        return luaL_error(L, "sandbox.new: cannot create a Lua state");
    sb->S = S;
    SB(S) = sb;
    lua_pushcfunction(S, t_setup);
    lua_pushlightuserdata(S, &su);
    if (lua_pcall(S, 1, 0, 0) != LUA_OK) {
        lua_pushfstring(L, "sandbox.new: setup failed: %s", lua_tostring(S, -1));
        return lua_error(L);
    }
    lua_gc(S, LUA_GCCOLLECT, 0);
    if (sb->used > (size_t)memory)
        return luaL_error(L, "sandbox.new: memory limit %I is below the %I bytes the libraries take",
                          memory, (lua_Integer)sb->used);
    sb->limit = (size_t)memory;
    sb->enforce = 1;
    return 1;
}


struct loadargs { const char *src; size_t len; const char *chunk; };

/* Stack: [loadargs*] -> []: compile (text only), run under the limits, keep the service. */
static int t_load(lua_State *S)
{
    struct loadargs *a = lua_touserdata(S, 1);
    struct sandbox *sb = SB(S);
    if (luaL_loadbufferx(S, a->src, a->len, a->chunk, "t") != LUA_OK)
        return lua_error(S);
    lua_rawgetp(S, LUA_REGISTRYINDEX, &K_ENV);
    lua_setupvalue(S, -2, 1);
    lua_call(S, 0, 1);
    if (!lua_istable(S, -1))
        return luaL_error(S, "%s: the script must return a table (the service), got %s", short_chunk(sb),
                          luaL_typename(S, -1));
    lua_rawsetp(S, LUA_REGISTRYINDEX, &K_SERVICE);
    return 0;
}


/***
 * Compile (text only) and run a service script; it must return a table (the service).
 * @function sb:load
 * @tparam string source
 * @tparam[opt] string chunkname e.g. "@services/redis/service.lua"
 * @return true | nil, err
 */
static int l_sb_load(lua_State *L)
{
    struct sandbox *sb = checkopen(L);
    size_t len;
    const char *src = luaL_checklstring(L, 2, &len);
    const char *chunk = luaL_optstring(L, 3, NULL);
    if (sb->loaded)
        return forge_pusherror(L, "sandbox.error", 0, "sandbox %s already holds a service: use a new sandbox",
                               sb->name);
    if (chunk)
        snprintf(sb->chunk, sizeof sb->chunk, "%s", chunk);
    struct loadargs a = {src, len, sb->chunk};
    lua_State *S = sb->S;
    int st = sb_pcall(sb, t_load, &a, 0);
    if (st != LUA_OK)
        return push_sb_error(L, sb, st);
    lua_settop(S, 0);
    sb->loaded = 1;
    lua_pushboolean(L, 1);
    return 1;
}


static void need_service(lua_State *L, struct sandbox *sb)
{
    if (!sb->loaded)
        luaL_error(L, "sandbox %s holds no service: call sb:load first", sb->name);
}


/* Stack: [path*] -> [value]: service field by dotted path ("plans.1.id"), raw reads only. */
static int t_field(lua_State *S)
{
    const char *path = lua_touserdata(S, 1);
    lua_settop(S, 0);
    lua_rawgetp(S, LUA_REGISTRYINDEX, &K_SERVICE);
    while (path && *path) {
        const char *dot = strchr(path, '.');
        size_t n = dot ? (size_t)(dot - path) : strlen(path);
        if (!lua_istable(S, -1)) {
            lua_pushnil(S);
            return 1;
        }
        char *end;
        long long i = strtoll(path, &end, 10);
        if (n > 0 && end == path + n)
            lua_rawgeti(S, -1, (lua_Integer)i);
        else {
            lua_pushlstring(S, path, n);
            lua_rawget(S, -2);
        }
        lua_remove(S, -2);
        path = dot ? dot + 1 : path + n;
    }
    return 1;
}


/* Copy S[idx] onto L; on failure push `nil, err` instead. Returns 0 or 2. */
static int copy_out(lua_State *L, struct sandbox *sb, int idx, int mode, const char *what)
{
    struct copy c = {.mode = mode, .ynull = sb->ynull};
    int top = lua_gettop(L), stop = lua_gettop(sb->S);
    int rc = copy_value(&c, sb->S, idx, L, 0);
    lua_settop(sb->S, stop);
    if (rc < 0) {
        lua_settop(L, top);
        lua_settop(sb->S, 0);
        return forge_pusherror(L, "sandbox.error", 0, "%s: %s: %s", short_chunk(sb), what, c.err);
    }
    if (rc == 1)
        lua_pushnil(L);
    return 0;
}


/***
 * Deep copy of a field of the service table (plain data; functions and other
 * non-data values become `true`, so hooks show as present).
 * @function sb:field
 * @tparam[opt] string path dotted, integer segments index arrays ("plans.1.id"); none: the whole service
 * @return value | nil, err
 */
static int l_sb_field(lua_State *L)
{
    struct sandbox *sb = checkopen(L);
    const char *path = luaL_optstring(L, 2, NULL);
    need_service(L, sb);
    lua_State *S = sb->S;
    int st = sb_pcall(sb, t_field, (void *)path, 1);
    if (st != LUA_OK)
        return push_sb_error(L, sb, st);
    if (copy_out(L, sb, 2, CP_TRUE, path ? path : "service") != 0)
        return 2;
    lua_settop(S, 0);
    return 1;
}


struct callargs { lua_State *L; int first, n; const char *fn; };

/*
 * Stack: [callargs*] -> [result, ctx]: copy the arguments in, give a table first argument
 * ctx.secret, call service[fn](args...).
 */
static int t_call(lua_State *S)
{
    struct callargs *a = lua_touserdata(S, 1);
    struct sandbox *sb = SB(S);
    lua_settop(S, 0);
    lua_rawgetp(S, LUA_REGISTRYINDEX, &K_SERVICE);      /* 1 */
    lua_rawgetp(S, LUA_REGISTRYINDEX, &K_PREPARE);      /* 2 */
    lua_getfield(S, 1, a->fn);                          /* 3: may run the service's __index */
    if (lua_type(S, 3) != LUA_TFUNCTION)
        return luaL_error(S, "%s: service has no function '%s'", short_chunk(sb), a->fn);
    luaL_checkstack(S, a->n + 4, "too many arguments");
    for (int i = 0; i < a->n; i++) {
        struct copy c = {.mode = CP_SKIP};
        int rc = copy_value(&c, a->L, a->first + i, S, 0);
        lua_settop(a->L, a->first + a->n - 1);
        if (rc < 0)
            return luaL_error(S, "sandbox: argument %d: %s", i + 1, c.err);
        if (rc == 1)
            lua_pushnil(S);
    }
    if (a->n > 0 && lua_istable(S, 4)) {
        lua_pushvalue(S, 2);
        lua_pushvalue(S, 4);
        lua_call(S, 1, 0);
        lua_pushvalue(S, 4);
    } else {
        lua_pushnil(S);
    }
    lua_replace(S, 2);                                  /* 2: ctx (or nil) */
    lua_call(S, a->n, 1);                               /* 3: result */
    lua_pushvalue(S, 2);
    return 2;
}


/***
 * Call a service function under the limits. Arguments and results are deep-copied
 * (plain data; functions are dropped). A table first argument (ctx) gets ctx.secret(name).
 * @function sb:call
 * @tparam string fn
 * @param ... arguments, usually one ctx table
 * @return result, ctx_after | nil, err (err.code sandbox.error|memory|cpu|timeout)
 */
static int l_sb_call(lua_State *L)
{
    struct sandbox *sb = checkopen(L);
    const char *fn = luaL_checkstring(L, 2);
    need_service(L, sb);
    struct callargs a = {L, 3, lua_gettop(L) - 2, fn};
    lua_State *S = sb->S;
    int st = sb_pcall(sb, t_call, &a, 2);
    if (st != LUA_OK)
        return push_sb_error(L, sb, st);
    if (copy_out(L, sb, 2, CP_SKIP, "result") != 0 || copy_out(L, sb, 3, CP_SKIP, "ctx") != 0)
        return 2;
    lua_settop(S, 0);
    return 2;
}


/***
 * Bytes the sandbox state holds now.
 * @function sb:memory
 * @treturn integer
 */
static int l_sb_memory(lua_State *L)
{
    struct sandbox *sb = checkopen(L);
    lua_pushinteger(L, (lua_Integer)sb->used);
    return 1;
}


/***
 * The limits in force: {name=, memory=, cpu=, wall=, chunk=}.
 * @function sb:limits
 */
static int l_sb_limits(lua_State *L)
{
    struct sandbox *sb = checkopen(L);
    lua_createtable(L, 0, 5);
    lua_pushstring(L, sb->name);
    lua_setfield(L, -2, "name");
    lua_pushinteger(L, (lua_Integer)sb->limit);
    lua_setfield(L, -2, "memory");
    lua_pushnumber(L, sb->cpu);
    lua_setfield(L, -2, "cpu");
    lua_pushnumber(L, sb->wall);
    lua_setfield(L, -2, "wall");
    lua_pushstring(L, sb->chunk);
    lua_setfield(L, -2, "chunk");
    return 1;
}


/***
 * Close the sandbox state (also on __gc and __close). Idempotent.
 * @function sb:close
 */
static int l_sb_close(lua_State *L)
{
    struct sbox *box = tosbox(L);
    if (box->sb) {
        struct sandbox *sb = box->sb;
        box->sb = NULL;
        sb_free(sb);
    }
    return 0;
}


static int l_sb_tostring(lua_State *L)
{
    struct sbox *box = tosbox(L);
    if (box->sb)
        lua_pushfstring(L, "forge.sandbox (%s, %I bytes)", box->sb->name, (lua_Integer)box->sb->used);
    else
        lua_pushliteral(L, "forge.sandbox (closed)");
    return 1;
}


int luaopen_forge_sandbox(lua_State *L)
{
    static const luaL_Reg methods[] = {
        {"load", l_sb_load},
        {"field", l_sb_field},
        {"call", l_sb_call},
        {"memory", l_sb_memory},
        {"limits", l_sb_limits},
        {"close", l_sb_close},
        {NULL, NULL},
    };
    static const luaL_Reg metameth[] = {
        {"__gc", l_sb_close},
        {"__close", l_sb_close},
        {"__tostring", l_sb_tostring},
        {"__index", NULL},
        {NULL, NULL},
    };
    static const luaL_Reg lib[] = {
        {"new", l_sandbox_new},
        {NULL, NULL},
    };
    forge_newclass(L, FORGE_SANDBOX_MT, methods, metameth);
    luaL_newlib(L, lib);
    lua_pushinteger(L, FORGE_SANDBOX_MEMORY);
    lua_setfield(L, -2, "MEMORY");
    lua_pushnumber(L, FORGE_SANDBOX_CPU);
    lua_setfield(L, -2, "CPU");
    lua_pushnumber(L, FORGE_SANDBOX_WALL);
    lua_setfield(L, -2, "WALL");
    forge_setmodinfo(L, "forge.sandbox");
    return 1;
}
