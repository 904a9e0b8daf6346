/*
 * forge.pattern — Lua 5.4 pattern matching (find, match, gmatch, gsub) with a step budget.
 *
 * Same results and the same error messages as the string library (checked against it by
 * spec/runtime/pattern_spec.lua), written from the "Patterns" section of the Lua 5.4
 * reference manual (§6.4.1). The difference: every matcher step is counted, and a call
 * that needs more than the budget raises "pattern too complex (step limit)". The stock
 * matcher runs in C where a count hook never fires, so `("a"):rep(20000):find(".-.-.-b")`
 * would hold a thread for hours; here it stops after the budget (10M steps, well under
 * 100 ms). The sandbox hands these functions out as its string.find/match/gmatch/gsub.
 *
 * The budget is per call: one find, match or gsub (all its replacements, not counting
 * the Lua code a replacement function runs, which the sandbox's hook sees), or one step
 * of a gmatch iterator. It is process-wide, set with pattern.set_budget(n) (an atomic).
 * Everything else lives on the C stack or in Lua-owned memory: safe from any thread, and
 * a raise (bad pattern, budget, memory) never leaks.
 *
 * Plain finds (no magic characters, or `plain`) use memmem, which is linear in glibc.
 */
#include <ctype.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>

#include "forge/forge.h"

#define PAT_ESC          '%'
#define PAT_SPECIALS     "^$*+?.([%-"
#define PAT_MAXCAPTURES  32             /* LUA_MAXCAPTURES */
#define PAT_MAXDEPTH     200            /* nested matcher calls (MAXCCALLS): C stack bound */
#define PAT_BUDGET       10000000       /* default steps per call */

#define CAP_OPEN        (-1)            /* capture started, not closed yet */
#define CAP_POSITION    (-2)            /* () position capture */

static _Atomic long long pat_budget = PAT_BUDGET;


struct capture {
    const char *at;
    ptrdiff_t len;                      /* >= 0, CAP_OPEN or CAP_POSITION */
};

struct matcher {
    lua_State *L;
    const char *src;                    /* subject */
    const char *src_end;
    const char *p_end;                  /* pattern end */
    int depth;                          /* nested calls left */
    int ncap;                           /* captures opened so far */
    long long steps;                    /* budget left for this call */
    struct capture cap[PAT_MAXCAPTURES];
};


static void m_init(struct matcher *m, lua_State *L, const char *s, size_t ls, const char *p, size_t lp)
{
    m->L = L;
    m->src = s;
    m->src_end = s + ls;
    m->p_end = p + lp;
    m->steps = atomic_load_explicit(&pat_budget, memory_order_relaxed);
}


/* Before each attempt at a new subject position (the budget carries on). */
static void m_reset(struct matcher *m)
{
    m->ncap = 0;
    m->depth = PAT_MAXDEPTH;
}


/* One unit of work. May longjmp. */
static inline void m_step(struct matcher *m)
{
    if (--m->steps < 0)
        luaL_error(m->L, "pattern too complex (step limit)");
}


/* ------------------------------------------------------------------------ */
/* single characters: classes, sets, items                                  */
/* ------------------------------------------------------------------------ */

/* Does byte c belong to the class %<cl>? A letter that is not a class stands for itself. */
static int in_class(int c, int cl)
{
    int r;
    switch (tolower(cl)) {
    case 'a': r = isalpha(c); break;
    case 'c': r = iscntrl(c); break;
    case 'd': r = isdigit(c); break;
    case 'g': r = isgraph(c); break;
    case 'l': r = islower(c); break;
    case 'p': r = ispunct(c); break;
    case 's': r = isspace(c); break;
    case 'u': r = isupper(c); break;
    case 'w': r = isalnum(c); break;
    case 'x': r = isxdigit(c); break;
    case 'z': r = c == 0; break;        /* deprecated in the manual, still in 5.4's library */
    default: return cl == c;
    }
    if (isupper(cl))                    /* %A, %D, ...: the complement */
        return !r;
    return r != 0;
}


/*
 * Does byte c belong to the set [ ... ] spanning open (the '[') to close (its ']')?
 * A leading '^' negates; %x is a class or an escaped char; x-y a range (a '-' first or
 * last is itself).
 */
static int in_set(int c, const char *open, const char *close)
{
    const char *p = open + 1;
    int yes = 1;
    if (*p == '^') {
        yes = 0;
        p++;
    }
    for (; p < close; p++) {
        if (*p == PAT_ESC) {
            p++;
            if (in_class(c, (unsigned char)*p))
                return yes;
        } else if (p[1] == '-' && p + 2 < close) {
            if ((unsigned char)p[0] <= c && c <= (unsigned char)p[2])
                return yes;
            p += 2;
        } else if ((unsigned char)*p == c) {
            return yes;
        }
    }
    return !yes;
}


/* End of the single-character item at p (a char, '.', %x or a set). May longjmp. */
static const char *item_end(struct matcher *m, const char *p)
{
    char c = *p++;
    if (c == PAT_ESC) {
        if (p == m->p_end)
            luaL_error(m->L, "malformed pattern (ends with '%%')");
        return p + 1;
    }
    if (c == '[') {
        if (p < m->p_end && *p == '^')
            p++;
        do {                            /* the first char is a member even when it is ']' */
            if (p == m->p_end)
                luaL_error(m->L, "malformed pattern (missing ']')");
            c = *p++;
            if (c == PAT_ESC && p < m->p_end)
                p++;
        } while (p == m->p_end || *p != ']');
        return p + 1;
    }
    return p;
}


/* Does the subject char at s match the item p..ep? False at the end of the subject. */
static int item_matches(const struct matcher *m, const char *s, const char *p, const char *ep)
{
    if (s >= m->src_end)
        return 0;
    int c = (unsigned char)*s;
    switch (*p) {
    case '.': return 1;
    case PAT_ESC: return in_class(c, (unsigned char)p[1]);
    case '[': return in_set(c, p, ep - 1);
    default: return (unsigned char)*p == c;
    }
}


/* ------------------------------------------------------------------------ */
/* the backtracking matcher                                                 */
/* ------------------------------------------------------------------------ */

static const char *match(struct matcher *m, const char *s, const char *p);


/* Longest run of the item, then back off one at a time until the rest matches. */
static const char *match_greedy(struct matcher *m, const char *s, const char *p, const char *ep)
{
    ptrdiff_t n = 0;
    while (item_matches(m, s + n, p, ep)) {
        m_step(m);
        n++;
    }
    for (; n >= 0; n--) {
        const char *r = match(m, s + n, ep + 1);
        if (r)
            return r;
    }
    return NULL;
}


/* Shortest run of the item that lets the rest match. */
static const char *match_lazy(struct matcher *m, const char *s, const char *p, const char *ep)
{
    for (;;) {
        const char *r = match(m, s, ep + 1);
        if (r)
            return r;
        if (!item_matches(m, s, p, ep))
            return NULL;
        m_step(m);
        s++;
    }
}


/* %bxy at p (pointing at x): x, then balanced x/y pairs, up to the y closing it. */
static const char *match_balance(struct matcher *m, const char *s, const char *p)
{
    if (p + 1 >= m->p_end)
        luaL_error(m->L, "malformed pattern (missing arguments to '%%b')");
    if (s >= m->src_end || *s != p[0])
        return NULL;
    int depth = 1;
    while (++s < m->src_end) {
        m_step(m);
        if (*s == p[1]) {
            if (--depth == 0)
                return s + 1;
        } else if (*s == p[0]) {
            depth++;
        }
    }
    return NULL;
}


static const char *open_capture(struct matcher *m, const char *s, const char *p, ptrdiff_t kind)
{
    if (m->ncap >= PAT_MAXCAPTURES)
        luaL_error(m->L, "too many captures");
    m->cap[m->ncap].at = s;
    m->cap[m->ncap].len = kind;
    m->ncap++;
    const char *r = match(m, s, p);
    if (!r)
        m->ncap--;
    return r;
}


static const char *close_capture(struct matcher *m, const char *s, const char *p)
{
    int i = m->ncap - 1;
    while (i >= 0 && m->cap[i].len != CAP_OPEN)
        i--;
    if (i < 0)
        luaL_error(m->L, "invalid pattern capture");
    m->cap[i].len = s - m->cap[i].at;
    const char *r = match(m, s, p);
    if (!r)
        m->cap[i].len = CAP_OPEN;
    return r;
}


/* %1-%9 in a pattern: the text of that (closed) capture again. */
static const char *match_backref(struct matcher *m, const char *s, int digit)
{
    int i = digit - '1';
    if (i < 0 || i >= m->ncap || m->cap[i].len == CAP_OPEN)
        luaL_error(m->L, "invalid capture index %%%d", i + 1);
    ptrdiff_t len = m->cap[i].len;
    if (len < 0)                        /* a position capture has no text: never matches */
        return NULL;
    if (m->src_end - s >= len && memcmp(m->cap[i].at, s, (size_t)len) == 0)
        return s + len;
    return NULL;
}


/*
 * Match pattern p (to m->p_end) at subject position s: the end of the match, or NULL.
 * Single items advance in the loop; captures, quantifiers and '?' recurse, at most
 * PAT_MAXDEPTH deep. May longjmp (malformed pattern, step limit, too complex).
 */
static const char *match(struct matcher *m, const char *s, const char *p)
{
    if (m->depth-- == 0)
        luaL_error(m->L, "pattern too complex");
    for (;;) {
        m_step(m);
        if (p == m->p_end)
            break;
        if (*p == '(') {
            if (p + 1 < m->p_end && p[1] == ')')
                s = open_capture(m, s, p + 2, CAP_POSITION);
            else
                s = open_capture(m, s, p + 1, CAP_OPEN);
            break;
        }
        if (*p == ')') {
            s = close_capture(m, s, p + 1);
            break;
        }
        if (*p == '$' && p + 1 == m->p_end) {
            if (s != m->src_end)
                s = NULL;
            break;
        }
        if (*p == PAT_ESC && p + 1 < m->p_end) {
            char c = p[1];
            if (c == 'b') {
                s = match_balance(m, s, p + 2);
                if (!s)
                    break;
                p += 4;
                continue;
            }
            if (c == 'f') {
                p += 2;
                if (p == m->p_end || *p != '[')
                    luaL_error(m->L, "missing '[' after '%%f' in pattern");
                const char *ep = item_end(m, p);
                int before = s == m->src ? 0 : (unsigned char)s[-1];
                int here = s < m->src_end ? (unsigned char)*s : 0;
                if (!in_set(before, p, ep - 1) && in_set(here, p, ep - 1)) {
                    p = ep;
                    continue;
                }
                s = NULL;
                break;
            }
            if (isdigit((unsigned char)c)) {
                s = match_backref(m, s, (unsigned char)c);
                if (!s)
                    break;
                p += 2;
                continue;
            }
        }
        /* a single-character item, maybe followed by a quantifier */
        const char *ep = item_end(m, p);
        char q = ep < m->p_end ? *ep : '\0';
        if (!item_matches(m, s, p, ep)) {
            if (q == '*' || q == '?' || q == '-') {     /* zero repetitions are fine */
                p = ep + 1;
                continue;
            }
            s = NULL;
            break;
        }
        if (q == '?') {
            const char *r = match(m, s + 1, ep + 1);
            if (r) {
                s = r;
                break;
            }
            p = ep + 1;
            continue;
        }
        if (q == '+') {
            s = match_greedy(m, s + 1, p, ep);
            break;
        }
        if (q == '*') {
            s = match_greedy(m, s, p, ep);
            break;
        }
        if (q == '-') {
            s = match_lazy(m, s, p, ep);
            break;
        }
        s++;
        p = ep;
    }
    m->depth++;
    return s;
}


/* ------------------------------------------------------------------------ */
/* results                                                                  */
/* ------------------------------------------------------------------------ */

/*
 * Push capture i of the match s..e. With no captures, "capture 0" is the whole match.
 * Stack: [] -> [value]. May longjmp.
 */
static void push_capture(struct matcher *m, int i, const char *s, const char *e)
{
    if (i >= m->ncap) {
        if (i != 0)
            luaL_error(m->L, "invalid capture index %%%d", i + 1);
        lua_pushlstring(m->L, s, (size_t)(e - s));
        return;
    }
    ptrdiff_t len = m->cap[i].len;
    if (len == CAP_OPEN)
        luaL_error(m->L, "unfinished capture");
    if (len == CAP_POSITION)
        lua_pushinteger(m->L, (lua_Integer)(m->cap[i].at - m->src) + 1);
    else
        lua_pushlstring(m->L, m->cap[i].at, (size_t)len);
}


/* Push every capture (or the whole match when s is given and there are none). */
static int push_captures(struct matcher *m, const char *s, const char *e)
{
    int n = (m->ncap == 0 && s) ? 1 : m->ncap;
    luaL_checkstack(m->L, n, "too many captures");
    for (int i = 0; i < n; i++)
        push_capture(m, i, s, e);
    return n;
}


/* An init argument (1-based, negative from the end) as a 1-based index >= 1. */
static size_t start_index(lua_Integer pos, size_t len)
{
    if (pos > 0)
        return (size_t)pos;
    if (pos == 0 || pos < -(lua_Integer)len)
        return 1;
    return len + (size_t)pos + 1;
}


static int has_specials(const char *p, size_t lp)
{
    for (size_t i = 0; i < lp; i++)
        if (p[i] != '\0' && strchr(PAT_SPECIALS, p[i]))
            return 1;
    return 0;
}


/* find (is_find) or match. Stack: [s, p, init?, plain?] -> results */
static int find_or_match(lua_State *L, int is_find)
{
    size_t ls, lp;
    const char *s = luaL_checklstring(L, 1, &ls);
    const char *p = luaL_checklstring(L, 2, &lp);
    size_t init = start_index(luaL_optinteger(L, 3, 1), ls) - 1;
    if (init > ls) {
        luaL_pushfail(L);
        return 1;
    }
    if (is_find && (lua_toboolean(L, 4) || !has_specials(p, lp))) {
        const char *hit = memmem(s + init, ls - init, p, lp);
        if (!hit) {
            luaL_pushfail(L);
            return 1;
        }
        lua_pushinteger(L, (lua_Integer)(hit - s) + 1);
        lua_pushinteger(L, (lua_Integer)(hit - s + lp));
        return 2;
    }
    int anchored = lp > 0 && *p == '^';
    if (anchored) {
        p++;
        lp--;
    }
    struct matcher m;
    m_init(&m, L, s, ls, p, lp);
    const char *at = s + init;
    do {
        m_reset(&m);
        m_step(&m);
        const char *e = match(&m, at, p);
        if (e) {
            if (!is_find)
                return push_captures(&m, at, e);
            lua_pushinteger(L, (lua_Integer)(at - s) + 1);
            lua_pushinteger(L, (lua_Integer)(e - s));
            return push_captures(&m, NULL, NULL) + 2;
        }
    } while (at++ < m.src_end && !anchored);
    luaL_pushfail(L);
    return 1;
}


/***
 * string.find with a step budget.
 * @function find
 * @tparam string s
 * @tparam string pattern
 * @tparam[opt=1] integer init
 * @tparam[opt] boolean plain
 * @return start, end, captures... or nil
 * @raise on a malformed pattern, or "pattern too complex (step limit)"
 */
static int l_pattern_find(lua_State *L)
{
    return find_or_match(L, 1);
}


/***
 * string.match with a step budget.
 * @function match
 * @tparam string s
 * @tparam string pattern
 * @tparam[opt=1] integer init
 * @return captures (or the whole match) or nil
 */
static int l_pattern_match(lua_State *L)
{
    return find_or_match(L, 0);
}


/* gmatch iterator state; upvalues 1 and 2 keep the subject and pattern alive. */
struct gmatch_state {
    const char *s;
    size_t ls;
    const char *p;
    size_t lp;
    const char *next;                   /* where the next search starts */
    const char *last;                   /* end of the last match (no empty match there again) */
};


static int l_gmatch_next(lua_State *L)
{
    struct gmatch_state *g = lua_touserdata(L, lua_upvalueindex(3));
    struct matcher m;
    m_init(&m, L, g->s, g->ls, g->p, g->lp);
    for (const char *at = g->next; at <= m.src_end; at++) {
        m_reset(&m);
        m_step(&m);
        const char *e = match(&m, at, g->p);
        if (e && e != g->last) {
            g->next = g->last = e;
            return push_captures(&m, at, e);
        }
    }
    g->next = m.src_end + 1;            /* exhausted: later calls return nothing at once */
    return 0;
}


/***
 * string.gmatch with a step budget per iteration. A leading '^' is an ordinary char.
 * @function gmatch
 * @tparam string s
 * @tparam string pattern
 * @tparam[opt=1] integer init
 * @treturn function iterator returning the captures of each match
 */
static int l_pattern_gmatch(lua_State *L)
{
    size_t ls, lp;
    const char *s = luaL_checklstring(L, 1, &ls);
    const char *p = luaL_checklstring(L, 2, &lp);
    size_t init = start_index(luaL_optinteger(L, 3, 1), ls) - 1;
    if (init > ls)
        init = ls + 1;
    lua_settop(L, 2);
    struct gmatch_state *g = lua_newuserdatauv(L, sizeof *g, 0);
    g->s = s;
    g->ls = ls;
    g->p = p;
    g->lp = lp;
    g->next = s + init;
    g->last = NULL;
    lua_pushcclosure(L, l_gmatch_next, 3);
    return 1;
}


/*
 * Append the replacement for the match s..e to b; returns whether it changed the text.
 * Stack: [..., b] -> [..., b] (the buffer's own slot may grow). May longjmp.
 */
static int add_replacement(struct matcher *m, luaL_Buffer *b, const char *s, const char *e, int rtype)
{
    lua_State *L = m->L;
    if (rtype == LUA_TSTRING || rtype == LUA_TNUMBER) {
        size_t lr;
        const char *r = lua_tolstring(L, 3, &lr);
        const char *end = r + lr;
        while (r < end) {
            const char *pct = memchr(r, PAT_ESC, (size_t)(end - r));
            if (!pct) {
                luaL_addlstring(b, r, (size_t)(end - r));
                break;
            }
            luaL_addlstring(b, r, (size_t)(pct - r));
            char c = pct + 1 < end ? pct[1] : '\0';
            if (c == PAT_ESC) {
                luaL_addchar(b, PAT_ESC);
            } else if (c == '0') {
                luaL_addlstring(b, s, (size_t)(e - s));
            } else if (isdigit((unsigned char)c)) {
                push_capture(m, c - '1', s, e);
                luaL_tolstring(L, -1, NULL);    /* a position capture is an integer */
                lua_remove(L, -2);
                luaL_addvalue(b);
            } else {
                luaL_error(L, "invalid use of '%c' in replacement string", PAT_ESC);
            }
            r = pct + 2;
        }
        return 1;
    }
    if (rtype == LUA_TFUNCTION) {
        lua_pushvalue(L, 3);
        int n = push_captures(m, s, e);
        lua_call(L, n, 1);
    } else {
        push_capture(m, 0, s, e);
        lua_gettable(L, 3);
    }
    if (!lua_toboolean(L, -1)) {        /* nil or false: keep the matched text */
        lua_pop(L, 1);
        luaL_addlstring(b, s, (size_t)(e - s));
        return 0;
    }
    if (!lua_isstring(L, -1))
        return luaL_error(L, "invalid replacement value (a %s)", luaL_typename(L, -1));
    luaL_addvalue(b);
    return 1;
}


/***
 * string.gsub with a step budget for the whole call.
 * @function gsub
 * @tparam string s
 * @tparam string pattern
 * @tparam string|table|function repl
 * @tparam[opt] integer n at most this many replacements
 * @treturn string
 * @treturn integer the number of matches
 */
static int l_pattern_gsub(lua_State *L)
{
    size_t ls, lp;
    const char *src = luaL_checklstring(L, 1, &ls);
    const char *p = luaL_checklstring(L, 2, &lp);
    int rtype = lua_type(L, 3);
    lua_Integer max = luaL_optinteger(L, 4, (lua_Integer)ls + 1);
    luaL_argexpected(L, rtype == LUA_TNUMBER || rtype == LUA_TSTRING || rtype == LUA_TFUNCTION ||
                     rtype == LUA_TTABLE, 3, "string/function/table");
    int anchored = lp > 0 && *p == '^';
    if (anchored) {
        p++;
        lp--;
    }
    luaL_Buffer b;
    luaL_buffinit(L, &b);
    struct matcher m;
    m_init(&m, L, src, ls, p, lp);
    const char *last = NULL;
    lua_Integer n = 0;
    int changed = 0;
    while (n < max) {
        m_reset(&m);
        m_step(&m);
        const char *e = match(&m, src, p);
        if (e && e != last) {
            n++;
            changed |= add_replacement(&m, &b, src, e, rtype);
            src = last = e;
        } else if (src < m.src_end) {
            luaL_addchar(&b, *src++);
        } else {
            break;
        }
        if (anchored)
            break;
    }
    if (!changed) {
        lua_pushvalue(L, 1);
    } else {
        luaL_addlstring(&b, src, (size_t)(m.src_end - src));
        luaL_pushresult(&b);
    }
    lua_pushinteger(L, n);
    return 2;
}


/***
 * Set the step budget of every later call, in every thread.
 * @function set_budget
 * @tparam integer n steps per call, >= 1
 * @treturn integer the previous budget
 */
static int l_pattern_set_budget(lua_State *L)
{
    lua_Integer n = luaL_checkinteger(L, 1);
    luaL_argcheck(L, n >= 1, 1, "expected 'set_budget(integer steps >= 1)'");
    lua_pushinteger(L, (lua_Integer)atomic_exchange(&pat_budget, (long long)n));
    return 1;
}


/***
 * The current step budget.
 * @function budget
 * @treturn integer
 */
static int l_pattern_budget(lua_State *L)
{
    lua_pushinteger(L, (lua_Integer)atomic_load_explicit(&pat_budget, memory_order_relaxed));
    return 1;
}


int luaopen_forge_pattern(lua_State *L)
{
    static const luaL_Reg lib[] = {
        {"find", l_pattern_find},
        {"match", l_pattern_match},
        {"gmatch", l_pattern_gmatch},
        {"gsub", l_pattern_gsub},
        {"set_budget", l_pattern_set_budget},
        {"budget", l_pattern_budget},
        {NULL, NULL},
    };
    luaL_newlib(L, lib);
    lua_pushinteger(L, PAT_BUDGET);
    lua_setfield(L, -2, "DEFAULT_BUDGET");
    forge_setmodinfo(L, "forge.pattern");
    return 1;
}
