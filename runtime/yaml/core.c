/*
 * forge.yaml, core: the arena that owns every node, the per-call context (a userdata
 * with __gc, so nothing leaks when a Lua API call raises), error records, node and
 * map/sequence helpers, Go-compatible number formatting and the YAML 1.1 scalar
 * resolver. Declarations in yaml_int.h.
 */
#include <ctype.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "yaml_int.h"

/* ------------------------------------------------------------------------- */
/* arena                                                                      */
/* ------------------------------------------------------------------------- */

FORGE_NORETURN void fy_oom(yctx *c)
{
    luaL_error(c->L, "forge.yaml: not enough memory");
    abort();
}

void *fy_aalloc(yctx *c, size_t size)
{
    size = (size + 15) & ~(size_t)15;
    chunk *ch = c->arena;
    if (!ch || ch->cap - ch->used < size) {
        size_t cap = size > 65536 ? size : 65536;
        if (c->arena_total > 65536 * 8 && cap < c->arena_total / 8)
            cap = c->arena_total / 8;
        if (cap > ((size_t)1 << 26) && cap > size)
            cap = size > ((size_t)1 << 26) ? size : ((size_t)1 << 26);
        chunk *n = malloc(sizeof(chunk) + cap);
        if (!n)
            fy_oom(c);
        n->cap = cap;
        n->used = 0;
        c->arena_total += cap;
        if (ch && ch->cap - ch->used > 4096 && cap == size) {
            /* a big one-off block: keep the current chunk on top */
            n->next = ch->next;
            ch->next = n;
            n->used = size;
            return (char *)n->data;
        }
        n->next = ch;
        c->arena = ch = n;
    }
    void *p = (char *)ch->data + ch->used;
    ch->used += size;
    return p;
}

char *fy_astrdup(yctx *c, const char *s, size_t n)
{
    char *p = fy_aalloc(c, n + 1);
    memcpy(p, s, n);
    p[n] = 0;
    return p;
}

static void buf_reserve(yctx *c, ybuf *b, size_t extra)
{
    if (b->n + extra + 1 <= b->cap)
        return;
    size_t cap = b->cap ? b->cap : 256;
    while (cap < b->n + extra + 1)
        cap *= 2;
    char *p = realloc(b->p, cap);
    if (!p)
        fy_oom(c);
    b->p = p;
    b->cap = cap;
}

void fy_buf_add(yctx *c, ybuf *b, const char *s, size_t n)
{
    buf_reserve(c, b, n);
    memcpy(b->p + b->n, s, n);
    b->n += n;
    b->p[b->n] = 0;
}

void fy_buf_adds(yctx *c, ybuf *b, const char *s)
{
    fy_buf_add(c, b, s, strlen(s));
}

/* ------------------------------------------------------------------------- */
/* context                                                                    */
/* ------------------------------------------------------------------------- */

void fy_ctx_release(yctx *c)
{
    if (c->event_live) {
        yaml_event_delete(&c->event);
        c->event_live = 0;
    }
    if (c->parser_live) {
        yaml_parser_delete(&c->parser);
        c->parser_live = 0;
    }
    if (c->emitter_live) {
        yaml_emitter_delete(&c->emitter);
        c->emitter_live = 0;
    }
    free(c->out.p);
    c->out.p = NULL;
    c->out.n = c->out.cap = 0;
    free(c->path.p);
    c->path.p = NULL;
    c->path.n = c->path.cap = 0;
    free(c->tmp.p);
    c->tmp.p = NULL;
    c->tmp.n = c->tmp.cap = 0;
    while (c->arena) {
        chunk *n = c->arena->next;
        free(c->arena);
        c->arena = n;
    }
}

int fy_ctx_gc(lua_State *L)
{
    yctx *c = luaL_checkudata(L, 1, CTX_MT);
    fy_ctx_release(c);
    return 0;
}

/* Stack: [...] -> [..., ctx] */
yctx *fy_ctx_new(lua_State *L)
{
    yctx *c = lua_newuserdatauv(L, sizeof(yctx), 0);
    memset(c, 0, sizeof *c);
    c->L = L;
    luaL_setmetatable(L, CTX_MT);
    return c;
}

unsigned short fy_ctx_addfile(yctx *c, const char *name)
{
    if (!name || !*name)
        return 0;
    if (c->nfiles == 0) {
        c->capfiles = 8;
        c->files = fy_aalloc(c, sizeof(char *) * (size_t)c->capfiles);
        c->files[0] = "";
        c->nfiles = 1;
    }
    for (int i = 1; i < c->nfiles; i++)
        if (strcmp(c->files[i], name) == 0)
            return (unsigned short)i;
    if (c->nfiles >= 65535)
        return 0;
    if (c->nfiles == c->capfiles) {
        char **nf = fy_aalloc(c, sizeof(char *) * (size_t)c->capfiles * 2);
        memcpy(nf, c->files, sizeof(char *) * (size_t)c->nfiles);
        c->files = nf;
        c->capfiles *= 2;
    }
    c->files[c->nfiles] = fy_astrdup(c, name, strlen(name));
    return (unsigned short)c->nfiles++;
}

static const char *ctx_file(yctx *c, const ynode *n)
{
    if (!n || !n->file || n->file >= c->nfiles)
        return NULL;
    return c->files[n->file];
}

/* ------------------------------------------------------------------------- */
/* error records                                                              */
/* ------------------------------------------------------------------------- */

/*
 * Append an error record to the error table:
 *   {code=, path=, detail=, op=, file=, line=}
 * `path` is a dotted path without "$." (may be NULL for document-wide errors).
 */
FORGE_PRINTF(6)
void fy_err_add(yctx *c, const char *code, const ynode *at, const char *path, const char *op,
                const char *fmt, ...)
{
    lua_State *L = c->L;
    if (c->nerrors >= YMAX_ERRORS) {
        c->nerrors++;
        return;
    }
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    lua_createtable(L, 0, 6);
    lua_pushstring(L, code);
    lua_setfield(L, -2, "code");
    lua_pushstring(L, msg);
    lua_setfield(L, -2, "detail");
    if (path) {
        lua_pushstring(L, path);
        lua_setfield(L, -2, "path");
    }
    if (op) {
        lua_pushstring(L, op);
        lua_setfield(L, -2, "op");
    }
    const char *f = ctx_file(c, at);
    if (f) {
        lua_pushstring(L, f);
        lua_setfield(L, -2, "file");
    }
    if (at && at->line > 0) {
        lua_pushinteger(L, at->line);
        lua_setfield(L, -2, "line");
    }
    lua_rawseti(L, c->errtab, ++c->nerrors);
}

int fy_sentinel;

/* Raise the sentinel: the protected runner turns the error records into nil, err. */
FORGE_NORETURN void fy_raise(yctx *c)
{
    lua_pushlightuserdata(c->L, &fy_sentinel);
    lua_error(c->L);
    abort();
}

/* ------------------------------------------------------------------------- */
/* node helpers                                                               */
/* ------------------------------------------------------------------------- */

ynode *fy_nnew(yctx *c, int t, const ynode *src)
{
    ynode *n = fy_aalloc(c, sizeof(ynode));
    memset(n, 0, sizeof *n);
    n->t = (unsigned char)t;
    if (src) {
        n->file = src->file;
        n->line = src->line;
    }
    return n;
}

ynode *fy_nstr(yctx *c, const char *s, size_t len, const ynode *src)
{
    ynode *n = fy_nnew(c, T_STR, src);
    n->u.s.p = fy_astrdup(c, s, len);
    n->u.s.n = len;
    return n;
}

ynode *fy_nstrz(yctx *c, const char *s, const ynode *src)
{
    return fy_nstr(c, s, strlen(s), src);
}

ynode *fy_nint(yctx *c, lua_Integer i, const ynode *src)
{
    ynode *n = fy_nnew(c, T_INT, src);
    n->u.i = i;
    return n;
}

ynode *fy_nfloat(yctx *c, double f, const ynode *src)
{
    ynode *n = fy_nnew(c, T_FLOAT, src);
    n->u.f = f;
    return n;
}

ynode *fy_nbool(yctx *c, int b, const ynode *src)
{
    ynode *n = fy_nnew(c, T_BOOL, src);
    n->u.b = b != 0;
    return n;
}

int fy_is_scalar(const ynode *n)
{
    return n && n->t != T_MAP && n->t != T_SEQ;
}

static unsigned khash(const ynode *k)
{
    uint64_t h = 1469598103934665603ULL;
    switch (k->t) {
    case T_STR:
        for (size_t i = 0; i < k->u.s.n; i++) {
            h ^= (unsigned char)k->u.s.p[i];
            h *= 1099511628211ULL;
        }
        return (unsigned)(h ^ (h >> 32));
    case T_INT:
        h = (uint64_t)k->u.i * 0x9E3779B97F4A7C15ULL;
        return (unsigned)(h >> 32);
    case T_FLOAT:
        if (k->u.f == floor(k->u.f) && fabs(k->u.f) < 9.2e18) {
            h = (uint64_t)(int64_t)k->u.f * 0x9E3779B97F4A7C15ULL;
            return (unsigned)(h >> 32);
        }
        memcpy(&h, &k->u.f, sizeof h);              /* other floats: hash their bits */
        h *= 0x9E3779B97F4A7C15ULL;
        return (unsigned)(h >> 32);
    case T_BOOL:
        return 7u + (unsigned)k->u.b;
    default:
        return 3u;
    }
}

/* Typed equality of scalars (numbers compare by value, as Lua table keys do). */
int fy_scalar_eq(const ynode *a, const ynode *b)
{
    if (a->t == T_STR || b->t == T_STR)
        return a->t == b->t && a->u.s.n == b->u.s.n && memcmp(a->u.s.p, b->u.s.p, a->u.s.n) == 0;
    if ((a->t == T_INT || a->t == T_FLOAT) && (b->t == T_INT || b->t == T_FLOAT)) {
        if (a->t == T_INT && b->t == T_INT)
            return a->u.i == b->u.i;
        double x = a->t == T_INT ? (double)a->u.i : a->u.f;
        double y = b->t == T_INT ? (double)b->u.i : b->u.f;
        return x == y;
    }
    if (a->t != b->t)
        return 0;
    if (a->t == T_BOOL)
        return a->u.b == b->u.b;
    return a->t == T_NULL;
}

static void map_rehash(yctx *c, ynode *m)
{
    size_t cap = 64;
    while (cap < m->u.c.n * 2 + 2)
        cap *= 2;
    unsigned *h = fy_aalloc(c, sizeof(unsigned) * cap);
    memset(h, 0, sizeof(unsigned) * cap);
    for (size_t i = 0; i < m->u.c.n; i++) {
        size_t j = khash(m->u.c.k[i]) & (cap - 1);
        while (h[j])
            j = (j + 1) & (cap - 1);
        h[j] = (unsigned)(i + 1);
    }
    m->u.c.h = h;
    m->u.c.hcap = cap;
}

long fy_map_find(yctx *c, ynode *m, const ynode *k)
{
    size_t n = m->u.c.n;
    if (n < 16) {
        for (size_t i = 0; i < n; i++)
            if (fy_scalar_eq(m->u.c.k[i], k))
                return (long)i;
        return -1;
    }
    if (!m->u.c.h)
        map_rehash(c, m);
    size_t cap = m->u.c.hcap;
    size_t j = khash(k) & (cap - 1);
    while (m->u.c.h[j]) {
        size_t i = m->u.c.h[j] - 1;
        if (fy_scalar_eq(m->u.c.k[i], k))
            return (long)i;
        j = (j + 1) & (cap - 1);
    }
    return -1;
}

long fy_map_finds(yctx *c, ynode *m, const char *key, size_t len)
{
    ynode k;
    memset(&k, 0, sizeof k);
    k.t = T_STR;
    k.u.s.p = (char *)key;
    k.u.s.n = len;
    return fy_map_find(c, m, &k);
}

ynode *fy_map_gets(yctx *c, ynode *m, const char *key)
{
    if (!m || m->t != T_MAP)
        return NULL;
    long i = fy_map_finds(c, m, key, strlen(key));
    return i < 0 ? NULL : m->u.c.v[i];
}

static void coll_grow(yctx *c, ynode *n, int withkeys)
{
    size_t cap = n->u.c.cap ? n->u.c.cap * 2 : 4;
    ynode **v = fy_aalloc(c, sizeof(ynode *) * cap);
    if (n->u.c.n)
        memcpy(v, n->u.c.v, sizeof(ynode *) * n->u.c.n);
    n->u.c.v = v;
    if (withkeys) {
        ynode **k = fy_aalloc(c, sizeof(ynode *) * cap);
        if (n->u.c.n)
            memcpy(k, n->u.c.k, sizeof(ynode *) * n->u.c.n);
        n->u.c.k = k;
    }
    n->u.c.cap = cap;
}

void fy_seq_push(yctx *c, ynode *s, ynode *v)
{
    if (s->u.c.n == s->u.c.cap)
        coll_grow(c, s, 0);
    s->u.c.v[s->u.c.n++] = v;
}

void fy_seq_insert(yctx *c, ynode *s, size_t at, ynode *v)
{
    if (s->u.c.n == s->u.c.cap)
        coll_grow(c, s, 0);
    memmove(s->u.c.v + at + 1, s->u.c.v + at, sizeof(ynode *) * (s->u.c.n - at));
    s->u.c.v[at] = v;
    s->u.c.n++;
}

void fy_seq_remove(ynode *s, size_t at)
{
    memmove(s->u.c.v + at, s->u.c.v + at + 1, sizeof(ynode *) * (s->u.c.n - at - 1));
    s->u.c.n--;
}

/* Append without a lookup (the caller knows the key is new). */
void fy_map_append(yctx *c, ynode *m, ynode *k, ynode *v)
{
    if (m->u.c.n == m->u.c.cap)
        coll_grow(c, m, 1);
    size_t i = m->u.c.n++;
    m->u.c.k[i] = k;
    m->u.c.v[i] = v;
    if (m->u.c.h) {
        if (m->u.c.n * 2 + 2 > m->u.c.hcap) {
            map_rehash(c, m);
        } else {
            size_t cap = m->u.c.hcap;
            size_t j = khash(k) & (cap - 1);
            while (m->u.c.h[j])
                j = (j + 1) & (cap - 1);
            m->u.c.h[j] = (unsigned)(i + 1);
        }
    }
}

/* Set key k (later wins; a new key goes last). */
void fy_map_set(yctx *c, ynode *m, ynode *k, ynode *v)
{
    long i = fy_map_find(c, m, k);
    if (i >= 0)
        m->u.c.v[i] = v;
    else
        fy_map_append(c, m, k, v);
}

void fy_map_remove(ynode *m, size_t i)
{
    size_t rest = m->u.c.n - i - 1;
    memmove(m->u.c.k + i, m->u.c.k + i + 1, sizeof(ynode *) * rest);
    memmove(m->u.c.v + i, m->u.c.v + i + 1, sizeof(ynode *) * rest);
    m->u.c.n--;
    m->u.c.h = NULL;
}

/* Deep copy. `budget` (may be NULL) counts nodes; returns NULL when it runs out. */
ynode *fy_ncopy(yctx *c, const ynode *n, long *budget)
{
    if (budget && --*budget < 0)
        return NULL;
    ynode *r = fy_aalloc(c, sizeof(ynode));
    *r = *n;
    if (n->t == T_MAP || n->t == T_SEQ) {
        r->u.c.h = NULL;
        r->u.c.hcap = 0;
        r->u.c.cap = n->u.c.n;
        r->u.c.v = n->u.c.n ? fy_aalloc(c, sizeof(ynode *) * n->u.c.n) : NULL;
        if (n->t == T_MAP)
            r->u.c.k = n->u.c.n ? fy_aalloc(c, sizeof(ynode *) * n->u.c.n) : NULL;
        for (size_t i = 0; i < n->u.c.n; i++) {
            if (n->t == T_MAP)
                r->u.c.k[i] = n->u.c.k[i];   /* scalar keys are never mutated */
            r->u.c.v[i] = fy_ncopy(c, n->u.c.v[i], budget);
            if (!r->u.c.v[i])
                return NULL;
        }
    }
    return r;
}

/* ------------------------------------------------------------------------- */
/* number formatting                                                          */
/* ------------------------------------------------------------------------- */

/* Go's float32(f): rounded to float, ±Inf beyond its range (done here, not left to the conversion). */
double fy_to_f32(double f)
{
    if (!isnan(f) && fabs(f) >= 0x1.ffffffp127)
        return f < 0 ? -HUGE_VAL : HUGE_VAL;
    return (double)(float)f;
}

/* Shortest round-trip digits of f (of (float)f when f32) and the decimal exponent of the first digit. */
static int go_shortest(double f, int f32, char *digits, int *exp)
{
    char e[40];
    for (int prec = 0; prec < 17; prec++) {
        snprintf(e, sizeof e, "%.*e", prec, f);
        double back = strtod(e, NULL);
        if (f32 ? fy_to_f32(back) == f : back == f)
            break;
    }
    int nd = 0;
    const char *p = e + (e[0] == '-');
    for (; *p && *p != 'e'; p++)
        if (isdigit((unsigned char)*p))
            digits[nd++] = *p;
    *exp = atoi(p + 1);
    while (nd > 1 && digits[nd - 1] == '0')
        nd--;
    digits[nd] = 0;
    return nd;
}

/*
 * Go's strconv.FormatFloat(f, 'g', -1, bits) as fmt's %v and go-yaml print it: shortest digits, exponent
 * form when the exponent is below -4 or at least eprec (21 for %v, 6 for FormatFloat), bits 32 rounding
 * to float32 first (go-yaml v2 of 2016 writes every float that way).
 */
void fy_fmt_go_floatx(double f, int f32, int eprec, char *out, size_t size)
{
    if (f32)
        f = fy_to_f32(f);
    if (isnan(f) || isinf(f)) {
        snprintf(out, size, "%s", isnan(f) ? "NaN" : f < 0 ? "-Inf" : "+Inf");
        return;
    }
    char digits[32];
    int exp, nd = go_shortest(f, f32, digits, &exp);
    char *o = out;
    size_t left = size;
#define PUT(...) do { int w_ = snprintf(o, left, __VA_ARGS__); if (w_ < 0 || (size_t)w_ >= left) return; o += w_; left -= (size_t)w_; } while (0)
    if (signbit(f))
        PUT("-");
    if (exp < -4 || exp >= eprec) {
        PUT("%c", digits[0]);
        if (nd > 1)
            PUT(".%s", digits + 1);
        PUT("e%c%02d", exp < 0 ? '-' : '+', exp < 0 ? -exp : exp);
    } else if (exp < 0) {
        PUT("0.");
        for (int i = 0; i < -exp - 1; i++)
            PUT("0");
        PUT("%s", digits);
    } else {
        for (int i = 0; i <= exp; i++)
            PUT("%c", i < nd ? digits[i] : '0');
        if (nd > exp + 1)
            PUT(".%s", digits + exp + 1);
    }
#undef PUT
}

/* Shortest round-trip digits, printed like Go's %v (strconv 'g', shortest). */
void fy_fmt_go_float(double f, char *out, size_t size)
{
    fy_fmt_go_floatx(f, 0, 21, out, size);
}

/* A float as YAML that reads back as the same float. */
void fy_fmt_yaml_float(double f, char *out, size_t size)
{
    if (isnan(f)) {
        snprintf(out, size, ".nan");
        return;
    }
    if (isinf(f)) {
        snprintf(out, size, f < 0 ? "-.inf" : ".inf");
        return;
    }
    for (int prec = 15; prec <= 17; prec++) {
        snprintf(out, size, "%.*g", prec, f);
        if (strtod(out, NULL) == f)
            break;
    }
    if (!strpbrk(out, ".eEn"))
        strncat(out, ".0", size - strlen(out) - 1);
}

/* ------------------------------------------------------------------------- */
/* YAML 1.1 scalar resolution (go-yaml v2 resolve.go, as spruce and BOSH read) */
/* ------------------------------------------------------------------------- */

int fy_parse_go_int(const char *s, size_t n, lua_Integer *out, int *overflow)
{
    size_t i = 0;
    int neg = 0;
    *overflow = 0;
    if (i < n && (s[i] == '+' || s[i] == '-'))
        neg = s[i++] == '-';
    if (i >= n)
        return 0;
    unsigned base = 10;
    if (s[i] == '0' && i + 1 < n && (s[i + 1] == 'x' || s[i + 1] == 'X')) {
        base = 16;
        i += 2;
        if (i >= n)
            return 0;
    } else if (s[i] == '0' && i + 1 < n) {
        base = 8;
        i += 1;
    }
    uint64_t v = 0;
    for (; i < n; i++) {
        int d;
        char ch = s[i];
        if (ch >= '0' && ch <= '9')
            d = ch - '0';
        else if (ch >= 'a' && ch <= 'f')
            d = ch - 'a' + 10;
        else if (ch >= 'A' && ch <= 'F')
            d = ch - 'A' + 10;
        else
            return 0;
        if ((unsigned)d >= base)
            return 0;
        if (v > (UINT64_MAX - (uint64_t)d) / base)
            *overflow = 1;
        else
            v = v * base + (uint64_t)d;
    }
    if (*overflow)
        return 0;
    if (neg) {
        if (v > (uint64_t)INT64_MAX + 1)
            return *overflow = 1, 0;
        *out = v == (uint64_t)INT64_MAX + 1 ? INT64_MIN : -(lua_Integer)v;
    } else {
        if (v > (uint64_t)INT64_MAX)
            return *overflow = 1, 0;   /* a uint64 in Go; Lua keeps it as a float */
        *out = (lua_Integer)v;
    }
    return 1;
}

static int ieq(const char *a, size_t n, const char *b)
{
    size_t m = strlen(b);
    if (n != m)
        return 0;
    for (size_t i = 0; i < n; i++)
        if (tolower((unsigned char)a[i]) != b[i])
            return 0;
    return 1;
}

/* Go strconv.ParseFloat syntax (decimal only); 0 when it would fail or overflow. */
int fy_parse_go_float(const char *s, size_t n, double *out)
{
    size_t i = 0;
    int neg = 0;
    if (i < n && (s[i] == '+' || s[i] == '-'))
        neg = s[i++] == '-';
    if (ieq(s + i, n - i, "inf") || ieq(s + i, n - i, "infinity")) {
        *out = neg ? -HUGE_VAL : HUGE_VAL;
        return 1;
    }
    if (i == 0 && ieq(s, n, "nan")) {
        *out = NAN;
        return 1;
    }
    size_t digits = 0;
    while (i < n && isdigit((unsigned char)s[i]))
        i++, digits++;
    if (i < n && s[i] == '.') {
        i++;
        while (i < n && isdigit((unsigned char)s[i]))
            i++, digits++;
    }
    if (!digits)
        return 0;
    if (i < n && (s[i] == 'e' || s[i] == 'E')) {
        i++;
        if (i < n && (s[i] == '+' || s[i] == '-'))
            i++;
        size_t ed = 0;
        while (i < n && isdigit((unsigned char)s[i]))
            i++, ed++;
        if (!ed)
            return 0;
    }
    if (i != n)
        return 0;
    char tmp[128];
    if (n >= sizeof tmp)
        return 0;
    memcpy(tmp, s, n);
    tmp[n] = 0;
    double v = strtod(tmp, NULL);
    if (isinf(v))
        return 0;   /* ErrRange: go-yaml keeps the text as a string */
    *out = v;
    return 1;
}

/*
 * Resolve a plain scalar into n (which the caller allocated); `copy` = 0 leaves a
 * string's text unset (used to ask "would this read back as a string?").
 */
void fy_resolve_plain(yctx *c, ynode *n, const char *s, size_t len, int copy)
{
    static const struct { const char *s; int t; int v; } words[] = {
        {"y", T_BOOL, 1}, {"Y", T_BOOL, 1}, {"yes", T_BOOL, 1}, {"Yes", T_BOOL, 1}, {"YES", T_BOOL, 1},
        {"true", T_BOOL, 1}, {"True", T_BOOL, 1}, {"TRUE", T_BOOL, 1},
        {"on", T_BOOL, 1}, {"On", T_BOOL, 1}, {"ON", T_BOOL, 1},
        {"n", T_BOOL, 0}, {"N", T_BOOL, 0}, {"no", T_BOOL, 0}, {"No", T_BOOL, 0}, {"NO", T_BOOL, 0},
        {"false", T_BOOL, 0}, {"False", T_BOOL, 0}, {"FALSE", T_BOOL, 0},
        {"off", T_BOOL, 0}, {"Off", T_BOOL, 0}, {"OFF", T_BOOL, 0},
        {"~", T_NULL, 0}, {"null", T_NULL, 0}, {"Null", T_NULL, 0}, {"NULL", T_NULL, 0},
        {".nan", T_FLOAT, 0}, {".NaN", T_FLOAT, 0}, {".NAN", T_FLOAT, 0},
        {".inf", T_FLOAT, 1}, {".Inf", T_FLOAT, 1}, {".INF", T_FLOAT, 1},
        {"+.inf", T_FLOAT, 1}, {"+.Inf", T_FLOAT, 1}, {"+.INF", T_FLOAT, 1},
        {"-.inf", T_FLOAT, -1}, {"-.Inf", T_FLOAT, -1}, {"-.INF", T_FLOAT, -1},
    };
    n->t = T_STR;
    if (len == 0) {
        n->t = T_NULL;
        return;
    }
    if (len <= 5) {
        for (size_t i = 0; i < sizeof words / sizeof words[0]; i++) {
            if (strlen(words[i].s) == len && memcmp(words[i].s, s, len) == 0) {
                n->t = (unsigned char)words[i].t;
                if (words[i].t == T_BOOL)
                    n->u.b = words[i].v;
                else if (words[i].t == T_FLOAT)
                    n->u.f = words[i].v == 0 ? NAN : words[i].v > 0 ? HUGE_VAL : -HUGE_VAL;
                return;
            }
        }
    }
    if (len == 2 && s[0] == '<' && s[1] == '<') {
        n->flags |= NF_MERGEKEY;
        goto str;
    }
    char h = s[0];
    if (isdigit((unsigned char)h) || h == '+' || h == '-') {
        if (len < 128) {
            char plain[128] = {0};
            size_t pn = 0;
            for (size_t i = 0; i < len; i++)
                if (s[i] != '_')
                    plain[pn++] = s[i];
            lua_Integer iv;
            int ovf;
            double fv;
            if (fy_parse_go_int(plain, pn, &iv, &ovf)) {
                n->t = T_INT;
                n->u.i = iv;
                return;
            }
            if (fy_parse_go_float(plain, pn, &fv)) {
                n->t = T_FLOAT;
                n->u.f = fv;
                return;
            }
            if (ovf && pn > 0) {
                /* an integer beyond int64 (a uint64 in Go): keep it as a float */
                size_t k = (plain[0] == '+' || plain[0] == '-') ? 1 : 0;
                int alldig = k < pn;
                for (size_t i = k; i < pn; i++)
                    if (!isdigit((unsigned char)plain[i]))
                        alldig = 0;
                if (alldig) {
                    plain[pn] = 0;
                    n->t = T_FLOAT;
                    n->u.f = strtod(plain, NULL);
                    return;
                }
            }
            size_t k = plain[0] == '-' ? 1 : 0;
            if (pn > k + 2 && plain[k] == '0' && plain[k + 1] == 'b') {
                uint64_t v = 0;
                size_t i;
                for (i = k + 2; i < pn && (plain[i] == '0' || plain[i] == '1') && v < ((uint64_t)1 << 62); i++)
                    v = v * 2 + (uint64_t)(plain[i] - '0');
                if (i == pn) {
                    n->t = T_INT;
                    n->u.i = k ? -(lua_Integer)v : (lua_Integer)v;
                    return;
                }
            }
        }
    } else if (h == '.') {
        double fv;
        if (fy_parse_go_float(s, len, &fv)) {
            n->t = T_FLOAT;
            n->u.f = fv;
            return;
        }
    }
str:
    n->t = T_STR;
    n->u.s.p = copy ? fy_astrdup(c, s, len) : NULL;
    n->u.s.n = len;
}

/* Would this string, written plain, read back as something other than itself? */
int fy_needs_quotes(yctx *c, const char *s, size_t len)
{
    if (len == 0)
        return 1;
    ynode tmp;
    memset(&tmp, 0, sizeof tmp);
    char h = s[0];
    if (len > 5 && !(isdigit((unsigned char)h) || h == '+' || h == '-' || h == '.'))
        return len == 2;
    fy_resolve_plain(c, &tmp, s, len, 0);
    return tmp.t != T_STR || (tmp.flags & NF_MERGEKEY);
}
