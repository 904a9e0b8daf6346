/*
 * forge.metrics — the process-wide Prometheus registry (runtime/lmetrics.c) for Lua.
 *
 * Every lua_State of the process (HTTP workers, the waiter, the reconciler) sees the same
 * families and series: the registry is C state behind one mutex, not Lua state. Each state
 * describes the families it uses when it starts (describing again identically is a no-op).
 *
 * Misuse raises with a usage string: an undescribed name, a call that does not fit the
 * family's kind, bad names, labels or values. An update past a family's series cap is
 * dropped without a raise and counted in forge_metrics_series_dropped_total.
 *
 * Labels are a table of name -> string or number, rendered sorted by name. Label strings are
 * borrowed from the Lua stack for the duration of one call; render's text is malloc'd by the
 * registry and owned by a userdata box until it is a Lua string, so a raise never leaks it.
 */
#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "forge/forge.h"
#include "forge/metrics.h"

#define TEXT_MT "forge.metrics.text"

#define LABEL_RULES "label names match [a-zA-Z_][a-zA-Z0-9_]* (not __*, not le on a histogram), " \
                    "values are UTF-8 strings or numbers; at most 16 labels, 4096 bytes rendered"

/* What a call's usage error says: its usage, why a family does not fit it, what bad input is. */
struct call {
    const char *usage;
    const char *misfit;
    const char *invalid;
};

static const struct call DESCRIBE = {
    "metrics.describe(name, \"counter\"|\"gauge\"|\"histogram\", help [, {buckets=, oldest=}])",
    "is described already with another kind, other buckets or another oldest family, its oldest family is "
    "described otherwise, or it is a built-in name",
    "name and oldest match [a-zA-Z_:][a-zA-Z0-9_:]* (at most 200 bytes; oldest is another name), "
    "buckets are finite and strictly ascending",
};
static const struct call INC = {
    "metrics.inc(name, labels|nil [, n])", "is not a counter", "n must be a finite number >= 0; " LABEL_RULES,
};
static const struct call SET = {
    "metrics.set(name, labels|nil, v)",
    "is not a gauge set with set/add (counters take inc, histograms observe, tracked gauges track)", LABEL_RULES,
};
static const struct call ADD = {
    "metrics.add(name, labels|nil, delta)",
    "is not a gauge set with set/add (counters take inc, histograms observe, tracked gauges track)", LABEL_RULES,
};
static const struct call OBSERVE = {
    "metrics.observe(name, labels|nil, v)", "is not a histogram", "v must not be NaN; " LABEL_RULES,
};
static const struct call TRACK = {
    "metrics.track(name, id, labels|nil [, since])",
    "is not a gauge used only with track (and since needs a family described with opts.oldest)",
    "since must be finite; " LABEL_RULES,
};
static const struct call FORGET = {"metrics.forget(name)", "is not a gauge used only with track", ""};
static const struct call VALUE = {"metrics.value(name, labels|nil)", "", LABEL_RULES};


/* Raise for a registry error; nothing for 0 or -ENOSPC (a dropped update, which the registry counts). */
static void check_rc(lua_State *L, int rc, const struct call *c, const char *name)
{
    if (rc == 0 || rc == -ENOSPC)
        return;
    if (rc == -ENOENT)
        luaL_error(L, "%s: '%s' is not described (metrics.describe it first)", c->usage, name);
    else if (rc == -EPERM || rc == -EEXIST)
        luaL_error(L, "%s: '%s' %s", c->usage, name, c->misfit);
    else if (rc == -EINVAL)
        luaL_error(L, "%s: %s", c->usage, c->invalid);
    else
        luaL_error(L, "%s: out of memory", c->usage);
}


/* A string argument without NUL bytes (the registry takes C strings). */
static const char *check_cstring(lua_State *L, int arg, const char *what)
{
    size_t n;
    const char *s = luaL_checklstring(L, arg, &n);
    if (strlen(s) != n)
        luaL_argerror(L, arg, lua_pushfstring(L, "%s contains a NUL byte", what));
    return s;
}


/*
 * The label table at arg (nil or none: no labels) as pairs in out[FORGE_METRICS_MAX_LABELS];
 * a number value is converted to its string. Returns the count. Raises on a name that is not
 * a string, a value that is neither a string nor a number, a NUL byte, too many labels.
 * Stack: [...] -> [..., v1, ..., vn] (the value strings, anchored for the call)
 */
static size_t check_labels(lua_State *L, int arg, struct forge_label *out)
{
    if (lua_isnoneornil(L, arg))
        return 0;
    luaL_checktype(L, arg, LUA_TTABLE);
    size_t n = 0;
    lua_pushnil(L);                                     /* [..., v1..vi, key] */
    while (lua_next(L, arg)) {                          /* [..., v1..vi, key, value] */
        int vt = lua_type(L, -1);
        if (lua_type(L, -2) != LUA_TSTRING || (vt != LUA_TSTRING && vt != LUA_TNUMBER))
            luaL_argerror(L, arg, "labels map names (strings) to strings or numbers");
        if (n == FORGE_METRICS_MAX_LABELS)
            luaL_argerror(L, arg, lua_pushfstring(L, "at most %d labels", FORGE_METRICS_MAX_LABELS));
        luaL_checkstack(L, 2, "too many labels");
        size_t nlen, vlen;
        out[n].name = lua_tolstring(L, -2, &nlen);
        out[n].value = lua_tolstring(L, -1, &vlen);     /* a number becomes a string in this slot only */
        if (strlen(out[n].name) != nlen || strlen(out[n].value) != vlen)
            luaL_argerror(L, arg, "a label name or value contains a NUL byte");
        n++;
        lua_insert(L, -2);                              /* [..., v1..vi+1, key] */
    }
    return n;
}


/* An integral value as a Lua integer (counts read as 3, not 3.0), others as floats. */
static void push_number(lua_State *L, double v)
{
    if (v == floor(v) && fabs(v) < 9007199254740992.0)  /* 2^53: every integer below is exact */
        lua_pushinteger(L, (lua_Integer)v);
    else
        lua_pushnumber(L, v);
}


/*
 * opts.buckets (absent: none) into b[FORGE_METRICS_MAX_BUCKETS]; returns the count. Raises
 * unless it is an array of 1..FORGE_METRICS_MAX_BUCKETS numbers on a histogram.
 * Stack: unchanged (opts at 4).
 */
static size_t check_buckets(lua_State *L, int kind, double *b)
{
    if (lua_getfield(L, 4, "buckets") == LUA_TNIL) {
        lua_pop(L, 1);
        return 0;
    }
    luaL_argcheck(L, kind == FORGE_METRIC_HISTOGRAM, 4, "buckets are for histograms");
    size_t n = lua_istable(L, -1) ? lua_rawlen(L, -1) : 0;
    if (n < 1 || n > FORGE_METRICS_MAX_BUCKETS)
        luaL_argerror(L, 4, lua_pushfstring(L, "buckets must be an array of 1 to %d numbers",
                                            FORGE_METRICS_MAX_BUCKETS));
    for (size_t i = 0; i < n; i++) {
        int t = lua_rawgeti(L, -1, (lua_Integer)i + 1); /* [..., buckets, b[i]] */
        luaL_argcheck(L, t == LUA_TNUMBER, 4, "buckets must be an array of numbers");
        b[i] = lua_tonumber(L, -1);
        lua_pop(L, 1);
    }
    lua_pop(L, 1);
    return n;
}


/* opts.oldest (absent: NULL), a name for a gauge; the string stays anchored by opts. Stack: unchanged. */
static const char *check_oldest(lua_State *L, int kind)
{
    if (lua_getfield(L, 4, "oldest") == LUA_TNIL) {
        lua_pop(L, 1);
        return NULL;
    }
    luaL_argcheck(L, kind == FORGE_METRIC_GAUGE, 4, "oldest is for gauges");
    luaL_argcheck(L, lua_type(L, -1) == LUA_TSTRING, 4, "oldest must be a family name");
    size_t n;
    const char *s = lua_tolstring(L, -1, &n);
    luaL_argcheck(L, strlen(s) == n, 4, "oldest contains a NUL byte");
    lua_pop(L, 1);
    return s;
}


/***
 * metrics.describe(name, kind, help [, opts])
 * Describe a family: kind is "counter", "gauge" or "histogram". opts.buckets (histograms):
 * ascending upper bounds (default .005 .01 .025 .05 .1 .25 .5 1 2.5 5 10). opts.oldest
 * (gauges): the gauge is tracked (see track), and the family named oldest shows, for each
 * of its label sets with members, the seconds since the oldest member entered it.
 * Describing again identically does nothing; another kind, buckets or oldest raises.
 */
static int l_metrics_describe(lua_State *L)
{
    static const char *const kinds[] = {"counter", "gauge", "histogram", NULL};
    static const char *const keys[] = {"buckets", "oldest", NULL};
    const char *name = check_cstring(L, 1, "name");
    int kind = luaL_checkoption(L, 2, NULL, kinds);
    const char *help = check_cstring(L, 3, "help");
    double buckets[FORGE_METRICS_MAX_BUCKETS];
    size_t nbuckets = 0;
    const char *oldest = NULL;
    if (!lua_isnoneornil(L, 4)) {
        forge_checkkeys(L, 4, "metrics.describe", keys);
        nbuckets = check_buckets(L, kind, buckets);
        oldest = check_oldest(L, kind);
    }
    check_rc(L, forge_metrics_describe(name, kind, help, buckets, nbuckets, oldest), &DESCRIBE, name);
    return 0;
}


typedef int (*update_fn)(const char *name, const struct forge_label *labels, size_t nlabels, double v);

/* The shared body of inc, set, add and observe: name at 1, labels at 2, v read by the caller. */
static int update(lua_State *L, update_fn fn, double v, const struct call *c)
{
    struct forge_label labels[FORGE_METRICS_MAX_LABELS];
    const char *name = check_cstring(L, 1, "name");
    size_t n = check_labels(L, 2, labels);
    check_rc(L, fn(name, labels, n, v), c, name);
    return 0;
}


/***
 * metrics.inc(name, labels|nil [, n=1])
 * Counter += n (n >= 0).
 */
static int l_metrics_inc(lua_State *L)
{
    return update(L, forge_metrics_inc, luaL_optnumber(L, 3, 1), &INC);
}


/***
 * metrics.set(name, labels|nil, v)
 * Gauge = v.
 */
static int l_metrics_set(lua_State *L)
{
    return update(L, forge_metrics_set, luaL_checknumber(L, 3), &SET);
}


/***
 * metrics.add(name, labels|nil, delta)
 * Gauge += delta.
 */
static int l_metrics_add(lua_State *L)
{
    return update(L, forge_metrics_add, luaL_checknumber(L, 3), &ADD);
}


/***
 * metrics.observe(name, labels|nil, v)
 * Histogram: v into its bucket, its sum and its count.
 */
static int l_metrics_observe(lua_State *L)
{
    return update(L, forge_metrics_observe, luaL_checknumber(L, 3), &OBSERVE);
}


/***
 * metrics.track(name, id, labels|nil [, since])
 * The gauge `name` counts members by label set: member id (a string) moves to `labels`
 * (nil: it leaves). since (unix seconds, default now; only for a family described with
 * opts.oldest) is when it entered that label set; tracking it again with the same labels
 * keeps the old since unless a new one is given.
 */
static int l_metrics_track(lua_State *L)
{
    struct forge_label labels[FORGE_METRICS_MAX_LABELS];
    const char *name = check_cstring(L, 1, "name");
    const char *id = check_cstring(L, 2, "id");
    double since = luaL_opt(L, luaL_checknumber, 4, NAN);
    int rc;
    if (lua_isnoneornil(L, 3)) {
        rc = forge_metrics_untrack(name, id);
    } else {
        size_t n = check_labels(L, 3, labels);
        rc = forge_metrics_track(name, id, labels, n, since);
    }
    check_rc(L, rc, &TRACK, name);
    return 0;
}


/***
 * metrics.forget(name)
 * Remove every member of the tracked gauge `name` (its label sets stay, at 0).
 */
static int l_metrics_forget(lua_State *L)
{
    const char *name = check_cstring(L, 1, "name");
    check_rc(L, forge_metrics_forget(name), &FORGET, name);
    return 0;
}


/***
 * metrics.value(name, labels|nil) -> number | count, sum | nil
 * What render shows for that series: a counter's or gauge's value, a histogram's count and
 * sum; nil when render shows no such series.
 */
static int l_metrics_value(lua_State *L)
{
    struct forge_label labels[FORGE_METRICS_MAX_LABELS];
    const char *name = check_cstring(L, 1, "name");
    size_t n = check_labels(L, 2, labels);
    double v, sum;
    int rc = forge_metrics_value(name, labels, n, &v, &sum);
    if (rc == -ENODATA) {
        lua_pushnil(L);
        return 1;
    }
    check_rc(L, rc < 0 ? rc : 0, &VALUE, name);
    push_number(L, v);
    if (rc == 2)
        push_number(L, sum);
    return rc;
}


/* Owns render's malloc'd text until it is a Lua string. */
struct text_box {
    char *p;
};

static int l_text_gc(lua_State *L)
{
    struct text_box *b = luaL_checkudata(L, 1, TEXT_MT);
    free(b->p);
    b->p = NULL;
    return 0;
}


/***
 * metrics.render() -> text
 * Every family in the Prometheus text exposition format 0.0.4, then the process metrics.
 */
static int l_metrics_render(lua_State *L)
{
    struct text_box *b = lua_newuserdatauv(L, sizeof *b, 0);     /* [box] */
    b->p = NULL;
    luaL_setmetatable(L, TEXT_MT);
    size_t len;
    if (forge_metrics_render(&b->p, &len) < 0)
        return luaL_error(L, "metrics.render: out of memory");
    lua_pushlstring(L, b->p, len);                              /* [box, text]; a raise leaves p to __gc */
    free(b->p);
    b->p = NULL;
    return 1;
}


int luaopen_forge_metrics(lua_State *L)
{
    static const luaL_Reg lib[] = {
        {"describe", l_metrics_describe},
        {"inc", l_metrics_inc},
        {"set", l_metrics_set},
        {"add", l_metrics_add},
        {"observe", l_metrics_observe},
        {"track", l_metrics_track},
        {"forget", l_metrics_forget},
        {"value", l_metrics_value},
        {"render", l_metrics_render},
        {NULL, NULL},
    };
    static const luaL_Reg text_metamethods[] = {
        {"__gc", l_text_gc},
        {NULL, NULL},
    };
    forge_newclass(L, TEXT_MT, NULL, text_metamethods);
    luaL_newlib(L, lib);
    lua_pushinteger(L, FORGE_METRICS_MAX_SERIES);
    lua_setfield(L, -2, "MAX_SERIES");
    lua_pushinteger(L, FORGE_METRICS_MAX_LABELS);
    lua_setfield(L, -2, "MAX_LABELS");
    forge_setmodinfo(L, "forge.metrics");
    return 1;
}
