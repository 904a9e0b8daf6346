/*
 * forge.yaml, eval: (( operator )) parsing, reference resolution, dependency
 * order (Kahn, ties by path, cycle detection), the operators themselves, then
 * prune, sort and cherry-pick; and fy_merge_main, which runs the whole pipeline.
 * See YAML-MERGE.md §3–5. Declarations in yaml_int.h.
 */
#include <ctype.h>
#include <math.h>
#include <regex.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "yaml_int.h"


/* ------------------------------------------------------------------------- */
/* operator calls                                                             */
/* ------------------------------------------------------------------------- */

enum { A_STR, A_INT, A_FLOAT, A_BOOL, A_NULL, A_REF, A_ENV };

typedef struct atok { int kind; char *s; size_t n; lua_Integer i; double f; int b; } atok;
typedef struct yarg { atok *alt; int nalt; } yarg;

typedef struct yop {
    ynode *parent;      /* container holding the operator string */
    size_t index;       /* its index there (stable during the eval phase) */
    ynode *key;         /* map key (inject phase re-finds the index by key) */
    ynode *node;        /* the operator string */
    char *path;         /* canonical path, list entries by index */
    char name[40];
    yarg *args;
    int nargs;
    const char *raw;    /* argument text (defer) */
    size_t rawlen;
    const char *perr;   /* argument syntax error */
    int *deps;
    int ndeps, capdeps;
    int indeg;
    int *users;
    int nusers;
    int run;
    int used;           /* alternative that gave the last arg_value */
} yop;

typedef struct yops { yop *v; int n, cap; } yops;

enum { PH_INJECT, PH_PARAM, PH_EVAL };

static const char *const known_ops[] = {
    "grab", "concat", "join", "param", "static_ips", "calc", "keys", "sort", "empty", "base64",
    "inject", "defer", "prune", "ips", "cartesian-product", "negate", "stringify", "base64-decode", NULL,
};
static const char *const unsupported_ops[] = {
    "vault", "vault-try", "file", "load", "awsparam", "awssecret", "shuffle", NULL,
};

static int in_list(const char *const *list, const char *s)
{
    for (int i = 0; list[i]; i++)
        if (strcmp(list[i], s) == 0)
            return 1;
    return 0;
}

static void add_tok(yctx *c, yarg **args, int *nargs, int *cap, int *join, atok t)
{
    if (*join && *nargs > 0) {
        yarg *a = &(*args)[*nargs - 1];
        atok *alt = fy_aalloc(c, sizeof(atok) * (size_t)(a->nalt + 1));
        memcpy(alt, a->alt, sizeof(atok) * (size_t)a->nalt);
        alt[a->nalt++] = t;
        a->alt = alt;
        *join = 0;
        return;
    }
    if (*nargs == *cap) {
        int nc = *cap ? *cap * 2 : 4;
        yarg *na = fy_aalloc(c, sizeof(yarg) * (size_t)nc);
        if (*nargs)
            memcpy(na, *args, sizeof(yarg) * (size_t)*nargs);
        *args = na;
        *cap = nc;
    }
    atok *alt = fy_aalloc(c, sizeof(atok));
    *alt = t;
    (*args)[*nargs].alt = alt;
    (*args)[*nargs].nalt = 1;
    (*nargs)++;
    *join = 0;
}

/* spruce's envvar pattern: `$` then [a-zA-Z_][a-zA-Z0-9_.]* (the whole word). */
static int is_envvar_word(const char *w, size_t n)
{
    if (n < 2 || w[0] != '$' || !(isalpha((unsigned char)w[1]) || w[1] == '_'))
        return 0;
    for (size_t i = 2; i < n; i++)
        if (!(isalnum((unsigned char)w[i]) || w[i] == '_' || w[i] == '.'))
            return 0;
    return 1;
}

/* Length of the variable name after a `$` at w[i] (`NAME` or `{NAME}`), 0 when there is none. */
static size_t env_name_at(const char *w, size_t n, size_t i, size_t *skip)
{
    size_t j = i + 1, brace = j < n && w[j] == '{';
    if (brace)
        j++;
    size_t st = j;
    if (j >= n || !(isalpha((unsigned char)w[j]) || w[j] == '_'))
        return 0;
    while (j < n && (isalnum((unsigned char)w[j]) || w[j] == '_'))
        j++;
    if (brace && (j >= n || w[j] != '}'))
        return 0;
    *skip = j - i + brace;
    return j - st;
}

static void classify_word(yctx *c, atok *t, const char *w, size_t n)
{
    memset(t, 0, sizeof *t);
    t->s = fy_astrdup(c, w, n);
    t->n = n;
    if (fy_word_is(w, n, "~") || fy_word_is(w, n, "nil") || fy_word_is(w, n, "null") || fy_word_is(w, n, "NULL")
        || fy_word_is(w, n, "Null") || fy_word_is(w, n, "NIL") || fy_word_is(w, n, "Nil")) {
        t->kind = A_NULL;
        return;
    }
    if (fy_word_is(w, n, "true") || fy_word_is(w, n, "True") || fy_word_is(w, n, "TRUE")) {
        t->kind = A_BOOL;
        t->b = 1;
        return;
    }
    if (fy_word_is(w, n, "false") || fy_word_is(w, n, "False") || fy_word_is(w, n, "FALSE")) {
        t->kind = A_BOOL;
        return;
    }
    if (is_envvar_word(w, n)) {
        t->kind = A_ENV;
        t->s = fy_astrdup(c, w + 1, n - 1);
        t->n = n - 1;
        return;
    }
    size_t i = (w[0] == '-' || w[0] == '+') ? 1 : 0, digits = 0, dots = 0;
    for (size_t j = i; j < n; j++) {
        if (isdigit((unsigned char)w[j]))
            digits++;
        else if (w[j] == '.')
            dots++;
        else
            digits = dots = (size_t)-1 / 4;
    }
    if (digits && digits + dots + i == n && dots <= 1) {
        if (!dots) {
            lua_Integer v;
            int ovf;
            if (fy_parse_go_int(w, n, &v, &ovf) && !(n - i > 1 && w[i] == '0')) {
                t->kind = A_INT;
                t->i = v;
                return;
            }
            if (n - i > 1 && w[i] == '0') {
                t->kind = A_INT;
                t->i = strtoll(t->s, NULL, 10);
                return;
            }
        }
        t->kind = A_FLOAT;
        t->f = strtod(t->s, NULL);
        return;
    }
    t->kind = A_REF;
}

/* Tokenize operator arguments: spaces/commas separate, "..." strings, `||` alternatives. */
static const char *parse_args(yctx *c, const char *s, size_t n, yop *op)
{
    int cap = 0, join = 0;
    size_t i = 0;
    char *buf = fy_aalloc(c, n + 1);
    while (i < n) {
        char ch = s[i];
        if (isspace((unsigned char)ch) || ch == ',') {
            i++;
            continue;
        }
        if (ch == '|' && i + 1 < n && s[i + 1] == '|') {
            if (op->nargs == 0 || join)
                return "syntax error: misplaced ||";
            join = 1;
            i += 2;
            continue;
        }
        atok t;
        memset(&t, 0, sizeof t);
        if (ch == '"') {
            size_t k = 0;
            i++;
            while (i < n && s[i] != '"') {
                if (s[i] == '\\' && i + 1 < n) {
                    i++;
                    char e = s[i];
                    buf[k++] = e == 'n' ? '\n' : e == 't' ? '\t' : e == 'r' ? '\r' : e;
                } else {
                    buf[k++] = s[i];
                }
                i++;
            }
            if (i >= n)
                return "syntax error: unterminated string";
            i++;
            t.kind = A_STR;
            t.s = fy_astrdup(c, buf, k);
            t.n = k;
        } else {
            size_t st = i;
            while (i < n && !isspace((unsigned char)s[i]) && s[i] != ',' && s[i] != '"'
                   && !(s[i] == '|' && i + 1 < n && s[i + 1] == '|'))
                i++;
            classify_word(c, &t, s + st, i - st);
        }
        add_tok(c, &op->args, &op->nargs, &cap, &join, t);
    }
    if (join)
        return "syntax error: dangling ||";
    return NULL;
}

/* Is the string node an operator call? Fills op (name, args) when it is. */
static int parse_opcall(yctx *c, ynode *n, yop *op)
{
    const char *in;
    size_t len;
    if (!fy_op_inner(n, &in, &len) || len == 0 || !isalpha((unsigned char)in[0]))
        return 0;
    size_t i = 1;
    while (i < len && (isalnum((unsigned char)in[i]) || in[i] == '_' || in[i] == '-'))
        i++;
    if (i >= sizeof op->name)
        return 0;
    memcpy(op->name, in, i);
    op->name[i] = 0;
    const char *args = in + i;
    size_t alen = len - i;
    size_t j = 0;
    while (j < alen && isspace((unsigned char)args[j]))
        j++;
    if (j < alen && args[j] == '(' && in[len - 1] == ')') {
        args += j + 1;
        alen -= j + 2;
    } else if (alen > 0 && !isspace((unsigned char)args[0])) {
        return 0;
    }
    while (alen && isspace((unsigned char)args[0]))
        args++, alen--;
    while (alen && isspace((unsigned char)args[alen - 1]))
        alen--;
    if (!in_list(known_ops, op->name) && !in_list(unsupported_ops, op->name) && alen == 0)
        return 0;       /* ((var)) etc. pass through */
    op->node = n;
    op->raw = args;
    op->rawlen = alen;
    op->perr = parse_args(c, args, alen, op);
    return 1;
}

/* ------------------------------------------------------------------------- */
/* collecting operators                                                       */
/* ------------------------------------------------------------------------- */

static int phase_wants(int phase, const char *name)
{
    if (phase == PH_INJECT)
        return strcmp(name, "inject") == 0;
    if (phase == PH_PARAM)
        return strcmp(name, "param") == 0;
    return strcmp(name, "inject") != 0 && strcmp(name, "param") != 0;
}

static void ops_push(yctx *c, yops *o, yop *op)
{
    if (o->n == o->cap) {
        int cap = o->cap ? o->cap * 2 : 32;
        yop *v = fy_aalloc(c, sizeof(yop) * (size_t)cap);
        if (o->n)
            memcpy(v, o->v, sizeof(yop) * (size_t)o->n);
        o->v = v;
        o->cap = cap;
    }
    o->v[o->n++] = *op;
}

static void collect(yctx *c, ynode *n, ynode *parent, size_t idx, ynode *key, int phase, yops *o, int depth)
{
    if (depth > YMAX_DEPTH * 4)
        return;
    if (n->t == T_STR) {
        if (n->u.s.n < 4 || n->u.s.p[0] != '(')
            return;
        yop op;
        memset(&op, 0, sizeof op);
        if (!parse_opcall(c, n, &op) || !phase_wants(phase, op.name))
            return;
        op.parent = parent;
        op.index = idx;
        op.key = key;
        op.path = fy_astrdup(c, fy_path_str(c), c->path.n);
        ops_push(c, o, &op);
        return;
    }
    if (n->t == T_MAP) {
        for (size_t i = 0; i < n->u.c.n; i++) {
            size_t old = fy_path_push_key(c, n->u.c.k[i]);
            collect(c, n->u.c.v[i], n, i, n->u.c.k[i], phase, o, depth + 1);
            fy_path_pop(c, old);
        }
    } else if (n->t == T_SEQ) {
        for (size_t i = 0; i < n->u.c.n; i++) {
            size_t old = fy_path_push_idx(c, i);
            collect(c, n->u.c.v[i], n, i, NULL, phase, o, depth + 1);
            fy_path_pop(c, old);
        }
    }
}

static int op_path_cmp(const void *a, const void *b)
{
    return strcmp(((const yop *)a)->path, ((const yop *)b)->path);
}

static void collect_ops(yctx *c, int phase, yops *o)
{
    memset(o, 0, sizeof *o);
    fy_path_pop(c, 0);
    collect(c, c->root, NULL, 0, NULL, phase, o, 0);
    if (o->n > 1)
        qsort(o->v, (size_t)o->n, sizeof(yop), op_path_cmp);
}

/* ------------------------------------------------------------------------- */
/* references                                                                 */
/* ------------------------------------------------------------------------- */

typedef struct yseg { const char *s; size_t n; int bracket; } yseg;

#define MAXSEG 256

/* Split a reference into segments ("a.b[1]", "$.a", "x.[0]", "k[ref]"). Returns count or -1. */
static int split_ref(const char *s, size_t n, yseg *seg, int max)
{
    size_t i = 0;
    int k = 0;
    if (n >= 2 && s[0] == '$' && s[1] == '.')
        i = 2;
    else if (n == 1 && s[0] == '$')
        i = 1;
    while (i < n) {
        size_t st = i;
        while (i < n && s[i] != '.' && s[i] != '[')
            i++;
        if (i > st) {
            if (k >= max)
                return -1;
            seg[k].s = s + st;
            seg[k].n = i - st;
            seg[k++].bracket = 0;
        }
        if (i < n && s[i] == '[') {
            int depth = 0;
            size_t b = i;
            for (; i < n; i++) {
                if (s[i] == '[')
                    depth++;
                else if (s[i] == ']' && --depth == 0)
                    break;
            }
            if (i >= n || k >= max)
                return -1;
            seg[k].s = s + b + 1;
            seg[k].n = i - b - 1;
            seg[k++].bracket = 1;
            i++;
        }
        if (i < n && s[i] == '.')
            i++;
    }
    return k;
}

/* A reference as spruce's cursor prints it: segments joined by dots ("$.a[1]" is "a.1"). */
static const char *ref_norm(yctx *c, const char *s, size_t n)
{
    yseg seg[MAXSEG];
    int k = split_ref(s, n, seg, MAXSEG);
    if (k < 0)
        return fy_astrdup(c, s, n);
    size_t total = 1;
    for (int i = 0; i < k; i++)
        total += seg[i].n + 1;
    char *out = fy_aalloc(c, total);
    size_t at = 0;
    for (int i = 0; i < k; i++) {
        if (i)
            out[at++] = '.';
        memcpy(out + at, seg[i].s, seg[i].n);
        at += seg[i].n;
    }
    out[at] = 0;
    return out;
}

static int all_digits(const char *s, size_t n)
{
    if (!n)
        return 0;
    for (size_t i = 0; i < n; i++)
        if (!isdigit((unsigned char)s[i]))
            return 0;
    return 1;
}

/* One step down from cur by segment text; index of the child in *idx. */
static ynode *step(yctx *c, ynode *cur, const char *s, size_t n, size_t *idx)
{
    if (cur->t == T_MAP) {
        long i = fy_map_finds(c, cur, s, n);
        if (i < 0) {
            for (size_t j = 0; j < cur->u.c.n; j++)
                if (cur->u.c.k[j]->t != T_STR && fy_scalar_text_is(cur->u.c.k[j], s, n)) {
                    i = (long)j;
                    break;
                }
        }
        if (i < 0)
            return NULL;
        *idx = (size_t)i;
        return cur->u.c.v[i];
    }
    if (cur->t == T_SEQ) {
        if (all_digits(s, n)) {
            size_t i = (size_t)strtoull(s, NULL, 10);
            if (n > 18 || i >= cur->u.c.n)
                return NULL;
            *idx = i;
            return cur->u.c.v[i];
        }
        static const char *const fields[] = {"name", "key", "id"};
        for (int f = 0; f < 3; f++)
            for (size_t j = 0; j < cur->u.c.n; j++) {
                ynode *v = fy_map_gets(c, cur->u.c.v[j], fields[f]);
                if (v && v->t == T_STR && v->u.s.n == n && memcmp(v->u.s.p, s, n) == 0) {
                    *idx = j;
                    return cur->u.c.v[j];
                }
            }
    }
    return NULL;
}

static ynode *resolve(yctx *c, const char *ref, size_t n, char *err, size_t errsz, int depth);

/*
 * A segment that is exactly $NAME or ${NAME} (spruce pull request #378, and op_grab_bracket_test.go for
 * [$NAME]): the variable's value is the key, taken literally. 1 with *s set, -1 when it is not set (or
 * empty, as spruce counts it), 0 for any other segment.
 */
static int seg_env(yctx *c, const yseg *sg, const char **s, size_t *n, const char **name)
{
    size_t skip = 0, nl = sg->n > 1 && sg->s[0] == '$' ? env_name_at(sg->s, sg->n, 0, &skip) : 0;
    if (!nl || skip != sg->n)
        return 0;
    *name = fy_astrdup(c, sg->s + 1 + (sg->s[1] == '{'), nl);
    *s = fy_env_get(c, *name, n);
    return *s && *n ? 1 : -1;
}

/* Text of a segment, resolving a dynamic [ref] and a $NAME. */
static int seg_text(yctx *c, const yseg *sg, const char **s, size_t *n, char *tmp, size_t tmpsz,
                    char *err, size_t errsz, int depth)
{
    const char *name;
    int env = seg_env(c, sg, s, n, &name);
    if (env < 0) {
        snprintf(err, errsz, "Environment variable $%s is not set", name);
        return 0;
    }
    if (env > 0)
        return 1;
    if (!sg->bracket || all_digits(sg->s, sg->n)) {
        *s = sg->s;
        *n = sg->n;
        return 1;
    }
    ynode *k = resolve(c, sg->s, sg->n, err, errsz, depth + 1);
    if (!k)
        return 0;
    if (!fy_is_scalar(k)) {
        snprintf(err, errsz, "`%.*s` is not a scalar and cannot be used as a key", (int)sg->n, sg->s);
        return 0;
    }
    *s = fy_scalar_text(k, tmp, tmpsz, n);
    return 1;
}

/* spruce's TypeMismatchError for a path that runs through a scalar (have[0..hn) is its parent path). */
static void scalar_mismatch(const ynode *v, int glob, const char *have, size_t hn, char *err, size_t errsz)
{
    char tmp[64];
    size_t len;
    if (v->t == T_NULL || glob) {
        snprintf(err, errsz, "$.%.*s is a scalar (not a map or a list)", (int)hn, have);
        return;
    }
    const char *s = fy_scalar_text(v, tmp, sizeof tmp, &len);
    snprintf(err, errsz, "$.%.*s [=%.*s] is a scalar (not a map or a list)", (int)hn, have, (int)len, s);
}

/* Resolve a reference against the document. NULL with err set when it cannot be. */
static ynode *resolve(yctx *c, const char *ref, size_t n, char *err, size_t errsz, int depth)
{
    yseg seg[MAXSEG];
    if (depth > 4) {
        snprintf(err, errsz, "`%.*s`: references nested too deeply", (int)n, ref);
        return NULL;
    }
    int k = split_ref(ref, n, seg, MAXSEG);
    if (k < 0) {
        snprintf(err, errsz, "`%.*s` is not a valid reference", (int)n, ref);
        return NULL;
    }
    ynode *cur = c->root;
    char have[512];
    size_t hn = 0;
    have[0] = 0;
    for (int i = 0; i < k; i++) {
        const char *s;
        size_t sl, idx;
        char tmp[64];
        if (!seg_text(c, &seg[i], &s, &sl, tmp, sizeof tmp, err, errsz, depth))
            return NULL;
        size_t prev = hn;
        int w = snprintf(have + hn, sizeof have - hn, "%s%.*s", hn ? "." : "", (int)sl, s);
        if (w > 0 && hn + (size_t)w < sizeof have)
            hn += (size_t)w;
        if (cur->t != T_MAP && cur->t != T_SEQ) {
            scalar_mismatch(cur, c->glob_mode, have, prev, err, errsz);
            return NULL;
        }
        ynode *next = step(c, cur, s, sl, &idx);
        if (!next) {
            snprintf(err, errsz, "`$.%s` could not be found in the datastructure", have);
            return NULL;
        }
        cur = next;
    }
    return cur;
}

/* ------------------------------------------------------------------------- */
/* dependencies                                                               */
/* ------------------------------------------------------------------------- */

static int ops_find(yops *o, const char *path)
{
    int lo = 0, hi = o->n - 1;
    while (lo <= hi) {
        int mid = (lo + hi) / 2;
        int r = strcmp(o->v[mid].path, path);
        if (r == 0)
            return mid;
        if (r < 0)
            lo = mid + 1;
        else
            hi = mid - 1;
    }
    return -1;
}

static int ops_lower(yops *o, const char *path)
{
    int lo = 0, hi = o->n;
    while (lo < hi) {
        int mid = (lo + hi) / 2;
        if (strcmp(o->v[mid].path, path) < 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

static void dep_add(yctx *c, yops *o, int self, int d)
{
    if (d < 0 || d == self)
        return;
    yop *op = &o->v[self];
    for (int i = 0; i < op->ndeps; i++)
        if (op->deps[i] == d)
            return;
    if (op->ndeps == op->capdeps) {
        int cap = op->capdeps ? op->capdeps * 2 : 4;
        int *v = fy_aalloc(c, sizeof(int) * (size_t)cap);
        if (op->ndeps)
            memcpy(v, op->deps, sizeof(int) * (size_t)op->ndeps);
        op->deps = v;
        op->capdeps = cap;
    }
    op->deps[op->ndeps++] = d;
}

/* Depend on the operator at `path` and every operator under it (except static_ips when skip_sips). */
static void dep_subtree(yctx *c, yops *o, int self, const char *path, int skip_sips)
{
    dep_add(c, o, self, ops_find(o, path));
    size_t pl = strlen(path);
    char *pre = fy_aalloc(c, pl + 2);
    memcpy(pre, path, pl);
    if (pl)
        pre[pl++] = '.';
    pre[pl] = 0;
    for (int i = ops_lower(o, pre); i < o->n && strncmp(o->v[i].path, pre, pl) == 0; i++)
        if (!skip_sips || strcmp(o->v[i].name, "static_ips") != 0)
            dep_add(c, o, self, i);
}

static void ref_deps(yctx *c, yops *o, int self, const char *ref, size_t n, int depth)
{
    yseg seg[MAXSEG];
    int k = split_ref(ref, n, seg, MAXSEG);
    if (k < 0 || depth > 4)
        return;
    ynode *cur = c->root;
    ybuf *canon = &c->tmp;
    canon->n = 0;
    fy_buf_add(c, canon, "", 0);
    for (int i = 0; i < k; i++) {
        if (cur->t == T_STR && cur->u.s.n > 4 && cur->u.s.p[0] == '(') {
            dep_add(c, o, self, ops_find(o, canon->p));
            return;
        }
        const char *s = seg[i].s, *name;
        size_t sl = seg[i].n, idx;
        char tmp[64];
        int env = seg_env(c, &seg[i], &s, &sl, &name);
        if (env < 0)
            return;
        if (!env && seg[i].bracket && !all_digits(s, sl)) {
            /* dynamic key: depend on the key's reference and everything under here */
            char *save = fy_astrdup(c, canon->p, canon->n);
            ref_deps(c, o, self, s, sl, depth + 1);
            dep_subtree(c, o, self, save, 0);
            char err[256];
            if (!seg_text(c, &seg[i], &s, &sl, tmp, sizeof tmp, err, sizeof err, depth)) {
                return;
            }
            canon->n = 0;
            fy_buf_add(c, canon, save, strlen(save));
        }
        ynode *next = step(c, cur, s, sl, &idx);
        if (!next)
            return;
        if (canon->n)
            fy_buf_add(c, canon, ".", 1);
        if (cur->t == T_SEQ) {
            char num[32];
            int w = snprintf(num, sizeof num, "%zu", idx);
            fy_buf_add(c, canon, num, (size_t)w);
        } else {
            size_t kl;
            const char *kt = fy_scalar_text(cur->u.c.k[idx], tmp, sizeof tmp, &kl);
            fy_buf_add(c, canon, kt, kl);
        }
        cur = next;
    }
    char *p = fy_astrdup(c, canon->p, canon->n);
    dep_subtree(c, o, self, p, 0);
}

/* spruce's searchForCursors: the next match of `(\w+|-)\.(\w+|-|\.)+` at or after *i that is not a
 * number (Go's ParseFloat/ParseInt would take it); 1 with [*st, *st + *len) set, 0 at the end. */
static int cw_word(char ch)
{
    return isalnum((unsigned char)ch) || ch == '_';
}

static int cw_tail(char ch)
{
    return cw_word(ch) || ch == '-' || ch == '.';
}

static size_t calc_match(const char *e, size_t n, size_t i)
{
    size_t j = i;
    if (cw_word(e[i])) {
        while (j < n && cw_word(e[j]))
            j++;
    } else if (e[i] == '-') {
        j = i + 1;
    } else {
        return 0;
    }
    if (j + 1 >= n || e[j] != '.' || !cw_tail(e[j + 1]))
        return 0;
    for (j++; j < n && cw_tail(e[j]); j++)
        ;
    return j - i;
}

static int calc_next_cursor(const char *e, size_t n, size_t *i, size_t *st, size_t *len)
{
    while (*i < n) {
        size_t m = calc_match(e, n, *i);
        double f;
        if (!m) {
            (*i)++;
            continue;
        }
        *st = *i;
        *len = m;
        *i += m;
        if (!fy_parse_go_float(e + *st, m, &f))
            return 1;
    }
    return 0;
}

static void op_deps(yctx *c, yops *o, int self)
{
    yop *op = &o->v[self];
    for (int a = 0; a < op->nargs; a++)
        for (int t = 0; t < op->args[a].nalt; t++) {
            atok *tk = &op->args[a].alt[t];
            if (tk->kind == A_REF && strcmp(op->name, "empty") != 0 && strcmp(op->name, "defer") != 0
                && strcmp(op->name, "sort") != 0)
                ref_deps(c, o, self, tk->s, tk->n, 0);
            else if (tk->kind == A_STR && strcmp(op->name, "calc") == 0) {
                size_t i = 0, st, len;
                while (calc_next_cursor(tk->s, tk->n, &i, &st, &len))
                    ref_deps(c, o, self, tk->s + st, len, 0);
            }
        }
    if (strcmp(op->name, "static_ips") == 0) {
        dep_subtree(c, o, self, "networks", 0);
        yseg seg[3];
        if (split_ref(op->path, strlen(op->path), seg, 3) >= 2) {
            char jp[256];
            snprintf(jp, sizeof jp, "%.*s.%.*s", (int)seg[0].n, seg[0].s, (int)seg[1].n, seg[1].s);
            dep_subtree(c, o, self, jp, 1);
        }
    }
}

/* ------------------------------------------------------------------------- */
/* values of arguments                                                        */
/* ------------------------------------------------------------------------- */


static ynode *tok_literal(yctx *c, const atok *t, const ynode *at)
{
    switch (t->kind) {
    case A_STR: return fy_nstr(c, t->s, t->n, at);
    case A_INT: return fy_nint(c, t->i, at);
    case A_FLOAT: return fy_nfloat(c, t->f, at);
    case A_BOOL: return fy_nbool(c, t->b, at);
    default: return fy_nnew(c, T_NULL, at);
    }
}

/* Whether text is one well-formed YAML document (checked on a parser of its own, so nothing is raised). */
static int yaml_one_document(const char *text, size_t len)
{
    yaml_parser_t p;
    yaml_event_t ev;
    int ok = 1, docs = 0, done = 0;
    if (!yaml_parser_initialize(&p))
        return 0;
    yaml_parser_set_input_string(&p, (const unsigned char *)text, len);
    while (ok && !done) {
        if (!yaml_parser_parse(&p, &ev)) {
            ok = 0;
            break;
        }
        docs += ev.type == YAML_DOCUMENT_START_EVENT;
        done = ev.type == YAML_STREAM_END_EVENT;
        yaml_event_delete(&ev);
    }
    yaml_parser_delete(&p);
    return ok && docs <= 1;
}

/* An environment variable's value as spruce's Expr.Resolve gives it: YAML-unmarshalled, except that a value
 * that reads as a string (or does not read at all) stays the raw text, so multi-line text is kept as it is. */
static ynode *env_value(yctx *c, const char *v, size_t len, const ynode *at)
{
    ynode *n = NULL;
    if (yaml_one_document(v, len)) {
        char *copy = fy_astrdup(c, v, len);
        unsigned short file = c->curfile;
        n = fy_load_document(c, copy, len, at ? at->file : file);
        c->curfile = file;
    }
    if (!n || n->t == T_STR) {
        n = fy_nnew(c, T_STR, at);
        n->u.s.p = fy_astrdup(c, v, len);
        n->u.s.n = len;
    }
    return n;
}

/* Value of argument a (alternatives tried left to right). lit set when a literal gave it. */
static ynode *arg_value(yctx *c, yop *op, int a, char *err, size_t errsz, int *lit)
{
    yarg *arg = &op->args[a];
    if (lit)
        *lit = 0;
    for (int i = 0; i < arg->nalt; i++) {
        atok *t = &arg->alt[i];
        op->used = i;
        if (t->kind == A_REF) {
            char e2[400];
            ynode *v = resolve(c, t->s, t->n, e2, sizeof e2, 0);
            if (v)
                return v;
            snprintf(err, errsz, "unable to resolve `%s`: %s", ref_norm(c, t->s, t->n), e2);
        } else if (t->kind == A_ENV) {
            size_t len = 0;
            const char *v = fy_env_get(c, t->s, &len);
            if (v && len)
                return env_value(c, v, len, op->node);
            snprintf(err, errsz, "Environment variable $%s is not set", t->s);
        } else {
            if (lit)
                *lit = 1;
            return tok_literal(c, t, op->node);
        }
    }
    return NULL;
}


/* The argument as spruce prints it: the reference (as a cursor) that gave the value. */
static const char *arg_text(yctx *c, yop *op, int a)
{
    yarg *arg = &op->args[a];
    atok *t = &arg->alt[op->used < arg->nalt ? op->used : 0];
    if (t->kind == A_REF)
        return ref_norm(c, t->s, t->n);
    return t->s ? t->s : "?";
}

/* A literal as Go's %v prints it (nil as <nil>). */
static void add_gotext(yctx *c, ybuf *b, const ynode *n)
{
    if (n->t == T_NULL) {
        fy_buf_add(c, b, "<nil>", 5);
        return;
    }
    char tmp[64];
    size_t len;
    const char *s = fy_scalar_text(n, tmp, sizeof tmp, &len);
    fy_buf_add(c, b, s, len);
}

/* ------------------------------------------------------------------------- */
/* operators                                                                  */
/* ------------------------------------------------------------------------- */

typedef int (*opfn)(yctx *c, yop *op, ynode **out, char *err, size_t errsz);

#define NEED(cond, ...) do { if (!(cond)) { snprintf(err, errsz, __VA_ARGS__); return 0; } } while (0)

static int op_grab(yctx *c, yop *op, ynode **out, char *err, size_t errsz)
{
    NEED(op->nargs > 0, "no arguments specified to (( grab ... ))");
    if (op->nargs == 1) {
        ynode *v = arg_value(c, op, 0, err, errsz, NULL);
        if (!v)
            return 0;
        *out = fy_ncopy(c, v, NULL);
        return 1;
    }
    ynode *l = fy_nnew(c, T_SEQ, op->node);
    for (int a = 0; a < op->nargs; a++) {
        ynode *v = arg_value(c, op, a, err, errsz, NULL);
        if (!v)
            return 0;
        if (v->t == T_SEQ)
            for (size_t i = 0; i < v->u.c.n; i++)
                fy_seq_push(c, l, fy_ncopy(c, v->u.c.v[i], NULL));
        else
            fy_seq_push(c, l, fy_ncopy(c, v, NULL));
    }
    *out = l;
    return 1;
}

static int op_concat(yctx *c, yop *op, ynode **out, char *err, size_t errsz)
{
    NEED(op->nargs >= 2, "concat operator requires at least two arguments");
    ybuf *b = &c->tmp;
    b->n = 0;
    fy_buf_add(c, b, "", 0);
    for (int a = 0; a < op->nargs; a++) {
        ynode *v = arg_value(c, op, a, err, errsz, NULL);
        if (!v)
            return 0;
        NEED(fy_is_scalar(v), "tried to concat %s, which is not a string scalar", arg_text(c, op, a));
        add_gotext(c, b, v);
    }
    *out = fy_nstr(c, b->p, b->n, op->node);
    return 1;
}

/* One data argument of join: a list's entries or one scalar, each as Go's %v prints it. */
static int join_arg(yctx *c, yop *op, int a, const atok *sep, int *first, char *err, size_t errsz)
{
    ybuf *b = &c->tmp;
    ynode *v = arg_value(c, op, a, err, errsz, NULL);
    if (!v)
        return 0;
    NEED(v->t != T_MAP, "referenced entry is not a list or string for (( join ... ))");
    size_t n = v->t == T_SEQ ? v->u.c.n : 1;
    for (size_t i = 0; i < n; i++) {
        ynode *e = v->t == T_SEQ ? v->u.c.v[i] : v;
        NEED(fy_is_scalar(e), "entry #%zu in list is not compatible for (( join ... ))", i);
        if (!*first)
            fy_buf_add(c, b, sep->s, sep->n);
        add_gotext(c, b, e);
        *first = 0;
    }
    return 1;
}

static int op_join(yctx *c, yop *op, ynode **out, char *err, size_t errsz)
{
    NEED(op->nargs > 0, "no arguments specified to (( join ... ))");
    NEED(op->nargs >= 2, "too few arguments supplied to (( join ... ))");
    const atok *sep = &op->args[0].alt[0];
    if (sep->kind == A_ENV) {
        ynode *v = arg_value(c, op, 0, err, errsz, NULL);
        if (!v)
            return 0;
    }
    NEED(sep->kind == A_STR || sep->kind == A_ENV, "join operator only accepts literal argument for the separator");
    if (sep->kind == A_ENV) {
        size_t len = 0;
        const char *v = fy_env_get(c, sep->s, &len);
        atok *t = fy_aalloc(c, sizeof *t);
        memset(t, 0, sizeof *t);
        t->kind = A_STR;
        t->s = fy_astrdup(c, v, len);
        t->n = len;
        sep = t;
    }
    ybuf *b = &c->tmp;
    b->n = 0;
    fy_buf_add(c, b, "", 0);
    int first = 1;
    for (int a = 1; a < op->nargs; a++)
        if (!join_arg(c, op, a, sep, &first, err, errsz))
            return 0;
    *out = fy_nstr(c, b->p, b->n, op->node);
    return 1;
}

static int op_param(yctx *c, yop *op, ynode **out, char *err, size_t errsz)
{
    (void)c;
    (void)out;
    snprintf(err, errsz, "%s", op->nargs && op->args[0].alt[0].kind == A_STR ? op->args[0].alt[0].s
                                                                              : "parameter not set");
    return 0;
}

static int op_keys(yctx *c, yop *op, ynode **out, char *err, size_t errsz)
{
    ynode *l = fy_nnew(c, T_SEQ, op->node);
    for (int a = 0; a < op->nargs; a++) {
        int lit;
        ynode *v = arg_value(c, op, a, err, errsz, &lit);
        if (!v)
            return 0;
        NEED(!lit && op->args[a].alt[op->used].kind == A_REF, "keys operator only accepts key reference arguments");
        NEED(v->t == T_MAP, "%s is not a map", arg_text(c, op, a));
        for (size_t i = 0; i < v->u.c.n; i++) {
            char tmp[64];
            size_t len;
            const char *s = fy_scalar_text(v->u.c.k[i], tmp, sizeof tmp, &len);
            fy_seq_push(c, l, fy_nstr(c, s, len, op->node));
        }
    }
    NEED(op->nargs > 0, "no arguments specified to (( keys ... ))");
    if (l->u.c.n > 1)
        qsort(l->u.c.v, l->u.c.n, sizeof(ynode *), fy_key_cmp);
    *out = l;
    return 1;
}

static int op_empty(yctx *c, yop *op, ynode **out, char *err, size_t errsz)
{
    NEED(op->nargs == 1, "empty operator expects 1 argument, received %d", op->nargs);
    const atok *tk = &op->args[0].alt[0];
    NEED(tk->kind == A_STR || tk->kind == A_REF, "cannot interpret argument for empty operator");
    const char *t = tk->kind == A_REF ? ref_norm(c, tk->s, tk->n) : tk->s;
    if (!strcmp(t, "hash") || !strcmp(t, "map"))
        *out = fy_nnew(c, T_MAP, op->node);
    else if (!strcmp(t, "array") || !strcmp(t, "list"))
        *out = fy_nnew(c, T_SEQ, op->node);
    else if (!strcmp(t, "string"))
        *out = fy_nstr(c, "", 0, op->node);
    else
        NEED(0, "unknown type for empty operator: %s", t);
    return 1;
}

/* The one string argument of base64 / base64-decode (`verb` is "encode" or "decode"). */
static const ynode *b64_input(yctx *c, yop *op, const char *verb, char *err, size_t errsz)
{
    NEED(op->nargs == 1, "base64%s operator requires exactly one string or reference argument",
         verb[0] == 'd' ? "-decode" : "");
    int lit;
    ynode *v = arg_value(c, op, 0, err, errsz, &lit);
    if (!v)
        return NULL;
    if (v->t != T_STR) {
        ybuf *b = &c->tmp;
        b->n = 0;
        if (lit)
            add_gotext(c, b, v);
        else
            fy_buf_adds(c, b, arg_text(c, op, 0));
        fy_buf_add(c, b, "", 1);
        NEED(0, "tried to base64 %s %s, which is not a string scalar", verb, b->p);
    }
    return v;
}

static int op_base64(yctx *c, yop *op, ynode **out, char *err, size_t errsz)
{
    static const char tab[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    const ynode *v = b64_input(c, op, "encode", err, errsz);
    if (!v)
        return 0;
    size_t n = v->u.s.n;
    const unsigned char *in = (const unsigned char *)v->u.s.p;
    char *o = fy_aalloc(c, (n + 2) / 3 * 4 + 1);
    size_t k = 0;
    for (size_t i = 0; i < n; i += 3) {
        unsigned w = (unsigned)in[i] << 16 | (i + 1 < n ? (unsigned)in[i + 1] << 8 : 0) | (i + 2 < n ? in[i + 2] : 0);
        o[k++] = tab[(w >> 18) & 63];
        o[k++] = tab[(w >> 12) & 63];
        o[k++] = i + 1 < n ? tab[(w >> 6) & 63] : '=';
        o[k++] = i + 2 < n ? tab[w & 63] : '=';
    }
    *out = fy_nstr(c, o, k, op->node);
    return 1;
}

static int b64_value(int ch)
{
    if (ch >= 'A' && ch <= 'Z') return ch - 'A';
    if (ch >= 'a' && ch <= 'z') return ch - 'a' + 26;
    if (ch >= '0' && ch <= '9') return ch - '0' + 52;
    if (ch == '+') return 62;
    if (ch == '/') return 63;
    return -1;
}

/* Strict standard base64 (padding required), as Go's StdEncoding; returns the bad byte or -1. */
static long b64_decode(const char *s, size_t n, char *o, size_t *olen)
{
    size_t k = 0;
    if (n % 4)
        return (long)(n / 4 * 4 + (n % 4 == 1 ? 0 : n % 4));
    for (size_t i = 0; i < n; i += 4) {
        int q[4], pad = 0;
        for (int j = 0; j < 4; j++) {
            char ch = s[i + j];
            int last = i + 4 == n;
            if (ch == '=' && last && j >= 2 && (j == 3 || s[i + 3] == '=')) {
                q[j] = 0;
                pad++;
                continue;
            }
            q[j] = pad ? -1 : b64_value((unsigned char)ch);
            if (q[j] < 0)
                return (long)(i + (size_t)j);
        }
        unsigned w = (unsigned)q[0] << 18 | (unsigned)q[1] << 12 | (unsigned)q[2] << 6 | (unsigned)q[3];
        o[k++] = (char)(w >> 16);
        if (pad < 2)
            o[k++] = (char)(w >> 8);
        if (pad < 1)
            o[k++] = (char)w;
    }
    *olen = k;
    return -1;
}

static int op_base64_decode(yctx *c, yop *op, ynode **out, char *err, size_t errsz)
{
    const ynode *v = b64_input(c, op, "decode", err, errsz);
    if (!v)
        return 0;
    char *o = fy_aalloc(c, v->u.s.n + 1);
    size_t k = 0;
    long bad = b64_decode(v->u.s.p, v->u.s.n, o, &k);
    NEED(bad < 0, "unable to base64 decode string %.*s: illegal base64 data at input byte %ld", (int)v->u.s.n,
         v->u.s.p, bad);
    *out = fy_nstr(c, o, k, op->node);
    return 1;
}

static int op_negate(yctx *c, yop *op, ynode **out, char *err, size_t errsz)
{
    NEED(op->nargs == 1, "negate operator requires exactly one reference argument");
    int lit;
    ynode *v = arg_value(c, op, 0, err, errsz, &lit);
    if (!v)
        return 0;
    NEED(v->t == T_BOOL, lit ? "negate operator only operates on bools" : "negate operator only accepts references to bools");
    *out = fy_nbool(c, !v->u.b, op->node);
    return 1;
}

/* -- stringify: spruce marshals with go-yaml v2 (2016) ------------------------ */

/* reflect.Kind order of a key, which go-yaml's sorter falls back on */
static int go_kind(const ynode *k)
{
    switch (k->t) {
    case T_BOOL: return 1;
    case T_INT: return 2;
    case T_FLOAT: return 14;
    case T_STR: return 24;
    default: return 20;   /* nil interface */
    }
}

/* One rune of UTF-8 at s[*i] (a bad byte stands for itself). */
static long go_rune(const char *s, size_t n, size_t *i)
{
    unsigned char ch = (unsigned char)s[*i];
    int len = ch >= 0xf0 ? 4 : ch >= 0xe0 ? 3 : ch >= 0xc0 ? 2 : 1;
    long r = len == 1 ? ch : ch & (0x3f >> (len - 1));
    size_t j = *i + 1;
    for (int k = 1; k < len && j < n && ((unsigned char)s[j] & 0xc0) == 0x80; k++, j++)
        r = r << 6 | ((unsigned char)s[j] & 0x3f);
    *i = j;
    return r;
}

static int go_letter(long r)
{
    return (r < 0x80 && isalpha((int)r)) || (r >= 0xc0 && r != 0xd7 && r != 0xf7);
}

static size_t go_runes(yctx *c, const ynode *k, long **out)
{
    long *v = fy_aalloc(c, sizeof(long) * (k->u.s.n + 1));
    size_t n = 0;
    for (size_t i = 0; i < k->u.s.n;)
        v[n++] = go_rune(k->u.s.p, k->u.s.n, &i);
    *out = v;
    return n;
}

/* The digit run of r from i: its value and where it ends. */
static int64_t go_digits(const long *r, size_t n, size_t i, size_t *end)
{
    int64_t v = 0;
    for (; i < n && r[i] >= '0' && r[i] <= '9'; i++)
        v = v * 10 + (r[i] - '0');
    *end = i;
    return v;
}

/*
 * go-yaml's keyList.Less for two strings, with go-yaml PR #195 that spruce's fork carries (equal digits are
 * not skipped, so digit runs compare by value: q2GB < q4GB < q256MB): letters by code point, other runes
 * before letters.
 */
static int go_str_less(yctx *c, const ynode *a, const ynode *b)
{
    long *ar, *br;
    size_t an = go_runes(c, a, &ar), bn = go_runes(c, b, &br);
    for (size_t i = 0; i < an && i < bn; i++) {
        if (ar[i] == br[i] && !(ar[i] >= '0' && ar[i] <= '9'))
            continue;
        int al = go_letter(ar[i]), bl = go_letter(br[i]);
        if (al && bl)
            return ar[i] < br[i];
        if (al || bl)
            return bl;
        size_t ai, bi;
        int64_t x = go_digits(ar, an, i, &ai), y = go_digits(br, bn, i, &bi);
        if (x != y)
            return x < y;
        if (ai != bi)
            return ai < bi;
        if (ar[i] == br[i])
            continue;
        return ar[i] < br[i];
    }
    return an < bn;
}

static int go_key_less(yctx *c, const ynode *a, const ynode *b)
{
    int ak = go_kind(a), bk = go_kind(b);
    int an = a->t == T_INT || a->t == T_FLOAT || a->t == T_BOOL, bn = b->t == T_INT || b->t == T_FLOAT || b->t == T_BOOL;
    if (an && bn) {
        double x = a->t == T_INT ? (double)a->u.i : a->t == T_FLOAT ? a->u.f : a->u.b;
        double y = b->t == T_INT ? (double)b->u.i : b->t == T_FLOAT ? b->u.f : b->u.b;
        if (x != y)
            return x < y;
        if (ak != bk)
            return ak < bk;
        return a->t == T_INT ? a->u.i < b->u.i : a->t == T_BOOL ? !a->u.b && b->u.b : a->u.f < b->u.f;
    }
    if (ak != 24 || bk != 24)
        return ak < bk;
    return go_str_less(c, a, b);
}

/* A copy of n with every map's keys in go-yaml's order (insertion sort: maps are small). */
static ynode *sorted_copy(yctx *c, const ynode *n)
{
    ynode *r = fy_ncopy(c, n, NULL);
    if (r->t == T_MAP) {
        for (size_t i = 1; i < r->u.c.n; i++)
            for (size_t j = i; j > 0 && go_key_less(c, r->u.c.k[j], r->u.c.k[j - 1]); j--) {
                ynode *tk = r->u.c.k[j], *tv = r->u.c.v[j];
                r->u.c.k[j] = r->u.c.k[j - 1];
                r->u.c.v[j] = r->u.c.v[j - 1];
                r->u.c.k[j - 1] = tk;
                r->u.c.v[j - 1] = tv;
            }
        r->u.c.h = NULL;
    }
    if (r->t == T_MAP || r->t == T_SEQ)
        for (size_t i = 0; i < r->u.c.n; i++)
            r->u.c.v[i] = sorted_copy(c, r->u.c.v[i]);
    return r;
}

static int op_stringify(yctx *c, yop *op, ynode **out, char *err, size_t errsz)
{
    NEED(op->nargs == 1, "stringify operator requires exactly one reference argument");
    int lit;
    ynode *v = arg_value(c, op, 0, err, errsz, &lit);
    if (!v)
        return 0;
    if (lit) {
        *out = v;
        return 1;
    }
    ynode *s = sorted_copy(c, v);
    c->go_emit = 1;
    fy_emit_document(c, s);
    c->go_emit = 0;
    *out = fy_nstr(c, c->out.p, c->out.n, op->node);
    return 1;
}

/* One argument token as spruce's Expr.String prints it. */
static void tok_gostr(yctx *c, ybuf *b, const atok *t)
{
    char tmp[64];
    switch (t->kind) {
    case A_STR:
        fy_buf_add(c, b, "\"", 1);
        fy_buf_add(c, b, t->s, t->n);
        fy_buf_add(c, b, "\"", 1);
        return;
    case A_INT:
        snprintf(tmp, sizeof tmp, "%lld", (long long)t->i);
        break;
    case A_FLOAT:
        fy_fmt_go_float(t->f, tmp, sizeof tmp);
        break;
    case A_BOOL:
        snprintf(tmp, sizeof tmp, "%s", t->b ? "true" : "false");
        break;
    case A_NULL:
        snprintf(tmp, sizeof tmp, "nil");
        break;
    case A_ENV:
        fy_buf_add(c, b, "$", 1);
        fy_buf_add(c, b, t->s, t->n);
        return;
    default:
        fy_buf_adds(c, b, ref_norm(c, t->s, t->n));
        return;
    }
    fy_buf_adds(c, b, tmp);
}

/* (( defer X Y )) gives the text (( X Y )), each argument as spruce prints it (a literal ends an || chain). */
static int op_defer(yctx *c, yop *op, ynode **out, char *err, size_t errsz)
{
    NEED(op->nargs > 0, "defer has no arguments - what are you deferring?");
    ybuf *b = &c->tmp;
    b->n = 0;
    fy_buf_add(c, b, "((", 2);
    for (int a = 0; a < op->nargs; a++) {
        fy_buf_add(c, b, " ", 1);
        for (int i = 0; i < op->args[a].nalt; i++) {
            const atok *t = &op->args[a].alt[i];
            if (i)
                fy_buf_add(c, b, " || ", 4);
            tok_gostr(c, b, t);
            if (t->kind != A_REF && t->kind != A_ENV)
                break;
        }
    }
    fy_buf_add(c, b, " ))", 3);
    *out = fy_nstr(c, b->p, b->n, op->node);
    return 1;
}

static int op_prune(yctx *c, yop *op, ynode **out, char *err, size_t errsz)
{
    (void)err;
    (void)errsz;
    fy_mark_add(c, op->path, 0, NULL, 0);
    *out = op->node;
    return 1;
}

static int op_sort(yctx *c, yop *op, ynode **out, char *err, size_t errsz)
{
    (void)c;
    (void)out;
    snprintf(err, errsz, "orphaned (( sort )) operator at $.%s, no list exists at that path", op->path);
    return 0;
}

/* acc x items: every string of acc followed by the %v text of every item. */
static ynode *cartesian_step(yctx *c, yop *op, const ynode *acc, ynode *const *items, size_t n)
{
    ynode *next = fy_nnew(c, T_SEQ, op->node);
    for (size_t i = 0; i < acc->u.c.n; i++)
        for (size_t j = 0; j < n; j++) {
            ybuf *b = &c->tmp;
            b->n = 0;
            fy_buf_add(c, b, acc->u.c.v[i]->u.s.p, acc->u.c.v[i]->u.s.n);
            add_gotext(c, b, items[j]);
            fy_seq_push(c, next, fy_nstr(c, b->p, b->n, op->node));
        }
    return next;
}

static int op_cartesian(yctx *c, yop *op, ynode **out, char *err, size_t errsz)
{
    ynode *acc = fy_nnew(c, T_SEQ, op->node);
    fy_seq_push(c, acc, fy_nstr(c, "", 0, op->node));
    for (int a = 0; a < op->nargs; a++) {
        int lit;
        ynode *v = arg_value(c, op, a, err, errsz, &lit);
        if (!v)
            return 0;
        NEED(!(lit && v->t != T_STR), "cartesian-product operator only accepts string literals and key reference "
             "arguments (got %s)", arg_text(c, op, a));
        NEED(v->t != T_MAP, "cartesian-product operator only accepts arrays and string values");
        ynode *one[1] = {v};
        ynode *const *items = v->t == T_SEQ ? v->u.c.v : one;
        size_t n = v->t == T_SEQ ? v->u.c.n : 1;
        for (size_t j = 0; j < n; j++)
            NEED(fy_is_scalar(items[j]), "cartesian-product operator can only operate on lists of scalar values");
        acc = cartesian_step(c, op, acc, items, n);
    }
    NEED(op->nargs > 0, "no arguments specified to (( cartesian-product ... ))");
    *out = acc;
    return 1;
}

/* IPv4 in dotted decimal as Go's netip parses it: four fields 0-255, no leading zeros. */
static int parse_ip(const char *s, size_t n, uint32_t *ip)
{
    uint32_t v = 0;
    size_t i = 0;
    for (int f = 0; f < 4; f++) {
        size_t st = i;
        unsigned x = 0;
        while (i < n && isdigit((unsigned char)s[i]) && i - st < 4)
            x = x * 10 + (unsigned)(s[i++] - '0');
        if (i == st || x > 255 || (i - st > 1 && s[st] == '0'))
            return 0;
        v = v << 8 | x;
        if (f < 3 && (i >= n || s[i++] != '.'))
            return 0;
    }
    if (i != n)
        return 0;
    *ip = v;
    return 1;
}

static void fmt_ip(uint32_t ip, char *out, size_t size)
{
    snprintf(out, size, "%u.%u.%u.%u", ip >> 24, (ip >> 16) & 255, (ip >> 8) & 255, ip & 255);
}

/* An address as Go's net.IP holds it: 4 bytes, or 16 (IPv4 then as ::ffff:a.b.c.d). */
typedef struct goip { unsigned char b[16]; int len; } goip;

static int goip_is4(const goip *ip)
{
    static const unsigned char v4in6[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
    return ip->len == 4 || memcmp(ip->b, v4in6, 12) == 0;
}

static void goip_from4(goip *ip, uint32_t v)
{
    memset(ip->b, 0, 10);
    ip->b[10] = ip->b[11] = 0xff;
    for (int i = 0; i < 4; i++)
        ip->b[12 + i] = (unsigned char)(v >> (24 - 8 * i));
    ip->len = 16;
}

/* One IPv6 group (1-4 hex digits) at s[*i]; -1 when there is none. */
static long hex_group(const char *s, size_t n, size_t *i)
{
    long v = 0;
    size_t st = *i;
    while (*i < n && isxdigit((unsigned char)s[*i]) && *i - st < 5)
        v = v * 16 + (isdigit((unsigned char)s[*i]) ? s[*i] - '0' : (tolower((unsigned char)s[*i]) - 'a' + 10)), (*i)++;
    return *i == st || *i - st > 4 ? -1 : v;
}

/* netip's parseIPv6 (with an embedded IPv4 tail); no zones. */
static int parse_ip6(const char *s, size_t n, unsigned char out[16])
{
    unsigned char ip[16] = {0};
    int k = 0, ell = -1;
    size_t i = 0;
    if (n >= 2 && s[0] == ':' && s[1] == ':') {
        ell = 0;
        i = 2;
    }
    while (i < n && k < 16) {
        size_t st = i;
        long g = hex_group(s, n, &i);
        if (g >= 0 && i < n && s[i] == '.') {
            uint32_t v4;
            if ((ell < 0 && k != 12) || k > 12 || !parse_ip(s + st, n - st, &v4))
                return 0;
            for (int b = 0; b < 4; b++)
                ip[k++] = (unsigned char)(v4 >> (24 - 8 * b));
            i = n;
            break;
        }
        if (g < 0)
            return 0;
        ip[k++] = (unsigned char)(g >> 8);
        ip[k++] = (unsigned char)g;
        if (i >= n)
            break;
        if (s[i] != ':' || i + 1 >= n)
            return 0;
        i++;
        if (s[i] == ':') {
            if (ell >= 0)
                return 0;
            ell = k;
            if (++i >= n)
                break;
        }
    }
    if (i != n || (k == 16 && ell >= 0) || (k < 16 && ell < 0))
        return 0;
    if (ell >= 0) {
        int gap = 16 - k;
        memmove(ip + ell + gap, ip + ell, (size_t)(k - ell));
        memset(ip + ell, 0, (size_t)gap);
    }
    memcpy(out, ip, 16);
    return 1;
}

/* Go's netip.ParseAddr without zones: *bits is 32 for IPv4, 128 for IPv6 (even ::ffff:a.b.c.d). */
static int parse_goaddr(const char *s, size_t n, goip *ip, int *bits)
{
    for (size_t i = 0; i < n; i++) {
        if (s[i] == '.') {
            uint32_t v;
            if (!parse_ip(s, n, &v))
                return 0;
            goip_from4(ip, v);
            *bits = 32;
            return 1;
        }
        if (s[i] == ':') {
            ip->len = 16;
            *bits = 128;
            return parse_ip6(s, n, ip->b);
        }
        if (s[i] == '%')
            return 0;
    }
    return 0;
}

/* net.ParseCIDR: the network address (ip.Mask(mask), 4 bytes for IPv4) and the prefix length. */
static int parse_gocidr(const char *s, size_t n, goip *net, int *ones, int *bits)
{
    const char *slash = memchr(s, '/', n);
    if (!slash || !parse_goaddr(s, (size_t)(slash - s), net, bits))
        return 0;
    const char *m = slash + 1;
    size_t ml = n - (size_t)(m - s), i = 0;
    long v = 0;
    while (i < ml && isdigit((unsigned char)m[i]) && v < 0xFFFFFF)
        v = v * 10 + (m[i++] - '0');
    if (i == 0 || i != ml || v > *bits)
        return 0;
    *ones = (int)v;
    if (*bits == 32) {
        memmove(net->b, net->b + 12, 4);
        net->len = 4;
    }
    for (int b = 0; b < net->len; b++) {
        int keep = *ones - 8 * b;
        net->b[b] &= (unsigned char)(keep >= 8 ? 0xff : keep <= 0 ? 0 : 0xff << (8 - keep));
    }
    return 1;
}

/* ziutek/utils netaddr.IPAdd: IPv4 wraps at 32 bits, anything else at 128. */
static goip goip_add(const goip *ip, int64_t off)
{
    goip r;
    if (goip_is4(ip)) {
        const unsigned char *p = ip->b + ip->len - 4;
        uint32_t a = (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
        goip_from4(&r, a + (uint32_t)(uint64_t)off);
        return r;
    }
    r = *ip;
    unsigned carry = 0;
    uint64_t o = (uint64_t)off;
    for (int b = 15; b >= 0; b--) {
        unsigned add = (unsigned)(b >= 8 ? (o >> (8 * (15 - b))) & 0xff : off < 0 ? 0xff : 0);
        unsigned sum = r.b[b] + add + carry;
        r.b[b] = (unsigned char)sum;
        carry = sum >> 8;
    }
    return r;
}

/* net.IP.String: dotted for IPv4 (and ::ffff:a.b.c.d), else RFC 5952 (the first longest zero run of 2+ groups). */
static void goip_text(const goip *ip, char *out, size_t size)
{
    const unsigned char *p = ip->b + (ip->len == 16 ? 12 : 0);
    if (goip_is4(ip)) {
        fmt_ip((uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3], out, size);
        return;
    }
    unsigned g[8];
    int zs = -1, ze = -1;
    for (int i = 0; i < 8; i++)
        g[i] = (unsigned)ip->b[2 * i] << 8 | ip->b[2 * i + 1];
    for (int i = 0; i < 8; i++) {
        int j = i;
        while (j < 8 && g[j] == 0)
            j++;
        if (j - i >= 2 && j - i > ze - zs)
            zs = i, ze = j;
    }
    size_t k = 0;
    out[0] = 0;
    for (int i = 0; i < 8 && k + 6 < size; i++) {
        if (i == zs) {
            k += (size_t)snprintf(out + k, size - k, "::");
            i = ze - 1;
            continue;
        }
        k += (size_t)snprintf(out + k, size - k, "%s%x", i > 0 && i != ze ? ":" : "", g[i]);
    }
}

static int int_of(const ynode *v, lua_Integer *i)
{
    if (v->t == T_INT) {
        *i = v->u.i;
        return 1;
    }
    if (v->t == T_FLOAT && v->u.f == floor(v->u.f) && fabs(v->u.f) < 9e18) {
        *i = (lua_Integer)v->u.f;
        return 1;
    }
    return 0;
}

/* The base address and first offset of (( ips BASE IDX [COUNT] )), checked as op_ips.go checks them, with Go's
 * int arithmetic: a CIDR's size is 1 << host bits (0 from 64 host bits on, negative at exactly 63). */
static int ips_start(const ynode *base, lua_Integer idx, int has_count, lua_Integer count, goip *ip, int64_t *start,
                     char *err, size_t errsz)
{
    const char *s = base->u.s.p;
    size_t n = base->u.s.n;
    int ones, bits;
    if (!parse_gocidr(s, n, ip, &ones, &bits)) {
        NEED(!memchr(s, '/', n) && parse_goaddr(s, n, ip, &bits), "invalid CIDR address: %.*s", (int)n, s);
        *start = idx;
        return 1;
    }
    int host = bits - ones;
    int64_t size = host >= 64 ? 0 : host == 63 ? INT64_MIN : (int64_t)1 << host;
    uint64_t mag = idx < 0 ? 0 - (uint64_t)idx : (uint64_t)idx;
    int64_t absidx = (int64_t)(mag > (uint64_t)INT64_MAX ? (uint64_t)INT64_MIN : mag);
    NEED(absidx <= size, "start index %lld exceeds size of subnet %.*s",
         (long long)idx, (int)n, s);
    int64_t st = idx < 0 ? (int64_t)((uint64_t)idx + (uint64_t)size) : idx;
    NEED(!has_count || (int64_t)((uint64_t)st + (uint64_t)count) <= size,
         "start index %lld and count %lld would exceed size of subnet %.*s", (long long)st, (long long)count,
         (int)n, s);
    *start = st;
    return 1;
}

static int op_ips(yctx *c, yop *op, ynode **out, char *err, size_t errsz)
{
    NEED(op->nargs >= 2, "ips requires at least two arguments: 1) An IP or a CIDR and 2) an index");
    ynode *vals[3];
    for (int a = 0; a < op->nargs; a++) {
        ynode *v = arg_value(c, op, a, err, errsz, NULL);
        if (!v)
            return 0;
        if (a < 3)
            vals[a] = v;
    }
    NEED(vals[0]->t == T_STR, "invalid CIDR address: %s", arg_text(c, op, 0));
    lua_Integer idx, count = 0;
    NEED(int_of(vals[1], &idx), "ips: index %s is not an integer", arg_text(c, op, 1));
    NEED(op->nargs == 2 || (int_of(vals[2], &count) && count <= 65536), "ips: count %s is not a usable integer",
         arg_text(c, op, 2));
    goip ip, one;
    int64_t start;
    if (!ips_start(vals[0], idx, op->nargs > 2, count, &ip, &start, err, errsz))
        return 0;
    char tmp[64];
    if (op->nargs == 2) {
        one = goip_add(&ip, start);
        goip_text(&one, tmp, sizeof tmp);
        *out = fy_nstrz(c, tmp, op->node);
        return 1;
    }
    ynode *l = fy_nnew(c, T_SEQ, op->node);
    for (lua_Integer i = 0; i < count; i++) {
        one = goip_add(&ip, (int64_t)((uint64_t)start + (uint64_t)i));
        goip_text(&one, tmp, sizeof tmp);
        fy_seq_push(c, l, fy_nstrz(c, tmp, op->node));
    }
    *out = l;
    return 1;
}

/* -- static_ips ----------------------------------------------------------- */

typedef struct ippool { uint32_t *ip; size_t n, cap; } ippool;

static void pool_add(yctx *c, ippool *p, uint32_t ip)
{
    if (p->n == p->cap) {
        size_t cap = p->cap ? p->cap * 2 : 64;
        uint32_t *v = fy_aalloc(c, sizeof(uint32_t) * cap);
        if (p->n)
            memcpy(v, p->ip, sizeof(uint32_t) * p->n);
        p->ip = v;
        p->cap = cap;
    }
    p->ip[p->n++] = ip;
}

/* Static pools by zone, plus every zone in subnet order (spruce's poolAZs, duplicates kept). */
typedef struct sipzones {
    const char **name;
    ippool *pool;
    int n, cap;
    const char **order;
    int norder, caporder;
} sipzones;

static ippool *zone_pool(sipzones *z, const char *name)
{
    for (int i = 0; i < z->n; i++)
        if (strcmp(z->name[i], name) == 0)
            return &z->pool[i];
    return NULL;
}

/* Record that a subnet serves zone `name`; returns its pool. */
static ippool *zone_use(yctx *c, sipzones *z, const char *name)
{
    if (z->norder == z->caporder) {
        int cap = z->caporder ? z->caporder * 2 : 8;
        const char **o = fy_aalloc(c, sizeof(char *) * (size_t)cap);
        if (z->norder)
            memcpy(o, z->order, sizeof(char *) * (size_t)z->norder);
        z->order = o;
        z->caporder = cap;
    }
    z->order[z->norder++] = name;
    ippool *p = zone_pool(z, name);
    if (p)
        return p;
    if (z->n == z->cap) {
        int cap = z->cap ? z->cap * 2 : 8;
        const char **nm = fy_aalloc(c, sizeof(char *) * (size_t)cap);
        ippool *pl = fy_aalloc(c, sizeof(ippool) * (size_t)cap);
        if (z->n) {
            memcpy(nm, z->name, sizeof(char *) * (size_t)z->n);
            memcpy(pl, z->pool, sizeof(ippool) * (size_t)z->n);
        }
        z->name = nm;
        z->pool = pl;
        z->cap = cap;
    }
    z->name[z->n] = name;
    memset(&z->pool[z->n], 0, sizeof(ippool));
    return &z->pool[z->n++];
}

/* Resolve a path spruce builds with Sprintf; NULL with the tree error in err. */
static ynode *sip_get(yctx *c, char *err, size_t errsz, const char *fmt, const char *a, const char *b)
{
    char path[1200];
    if (snprintf(path, sizeof path, fmt, a, b ? b : "") >= (int)sizeof path) {
        snprintf(err, errsz, "path too long");
        return NULL;
    }
    return resolve(c, path, strlen(path), err, errsz, 0);
}

/* Cursor.ResolveString: a string, or an int printed; anything else "<path> is not a string". */
static const char *sip_string(yctx *c, const char *path, const char *leaf, char *err, size_t errsz)
{
    ynode *v = sip_get(c, err, errsz, "%s.%s", path, leaf);
    if (!v)
        return NULL;
    if (v->t == T_STR)
        return fy_astrdup(c, v->u.s.p, v->u.s.n);
    if (v->t == T_INT) {
        char tmp[32];
        snprintf(tmp, sizeof tmp, "%lld", (long long)v->u.i);
        return fy_astrdup(c, tmp, strlen(tmp));
    }
    snprintf(err, errsz, "%s.%s is not a string", path, leaf);
    return NULL;
}

/* The zones one subnet serves: its az, its azs, or z1. */
static void subnet_zones(yctx *c, sipzones *z, const char *r, const char **zones, int *nz, int max)
{
    char e[256];
    *nz = 0;
    const char *az = sip_string(c, r, "az", e, sizeof e);
    if (az && *az && *nz < max)
        zones[(*nz)++] = az;
    ynode *azs = sip_get(c, e, sizeof e, "%s.azs", r, NULL);
    for (size_t i = 0; azs && azs->t == T_SEQ && i < azs->u.c.n; i++) {
        ynode *v = azs->u.c.v[i];
        if (v->t == T_STR && v->u.s.n && *nz < max)
            zones[(*nz)++] = fy_astrdup(c, v->u.s.p, v->u.s.n);
    }
    if (*nz == 0)
        zones[(*nz)++] = "z1";
    for (int i = 0; i < *nz; i++)
        zone_use(c, z, zones[i]);
}

/* One `static` entry ("IP" or "IP - IP") into every zone of its subnet. */
static int static_entry(yctx *c, sipzones *z, const char *net, const ynode *e, const char *const *zones, int nz,
                        char *err, size_t errsz)
{
    NEED(e->t == T_STR, "%s is not a well-formed BOSH network", net);
    const char *s = e->u.s.p, *end = s + e->u.s.n, *dash = memchr(s, '-', e->u.s.n);
    const char *dash2 = dash ? memchr(dash + 1, '-', (size_t)(end - dash - 1)) : NULL;
    const char *s2 = dash ? dash + 1 : end, *e2 = dash2 ? dash2 : end;
    const char *e1 = dash ? dash : end;
    while (s < e1 && isspace((unsigned char)*s)) s++;
    while (e1 > s && isspace((unsigned char)e1[-1])) e1--;
    while (s2 < e2 && isspace((unsigned char)*s2)) s2++;
    while (e2 > s2 && isspace((unsigned char)e2[-1])) e2--;
    uint32_t a, b;
    NEED(parse_ip(s, (size_t)(e1 - s), &a), "%.*s: not a valid IP address", (int)(e1 - s), s);
    b = a;
    if (dash && !dash2) {
        NEED(parse_ip(s2, (size_t)(e2 - s2), &b), "%.*s: not a valid IP address", (int)(e2 - s2), s2);
        char ta[32], tb[32];
        fmt_ip(a, ta, sizeof ta);
        fmt_ip(b, tb, sizeof tb);
        NEED(a <= b, "Static IP pool [%s - %s] ends before it starts", ta, tb);
        NEED(b - a < (1u << 22), "Static IP pool [%s - %s] is too large for forge.yaml", ta, tb);
    }
    for (int i = 0; i < nz; i++) {
        ippool *p = zone_pool(z, zones[i]);
        for (uint64_t ip = a; ip <= b; ip++)
            pool_add(c, p, (uint32_t)ip);
    }
    return 1;
}

/* The static IPs of one subnet (canonical path r), as spruce's statics() reads them. */
static int subnet_statics(yctx *c, sipzones *z, const char *net, const char *r, char *err, size_t errsz)
{
    const char *zones[64];
    int nz;
    subnet_zones(c, z, r, zones, &nz, 64);
    c->glob_mode = 1;
    ynode *st = sip_get(c, err, errsz, "%s.static", r, NULL);
    c->glob_mode = 0;
    if (!st)
        return 0;
    NEED(st->t == T_SEQ || st->t == T_MAP, "$.%s.static.* is a scalar (not a map or a list)", r);
    for (size_t i = 0; i < st->u.c.n; i++)
        if (!static_entry(c, z, net, st->u.c.v[i], zones, nz, err, errsz))
            return 0;
    return 1;
}

/* Canonical path of a reference (list entries by index). */
static const char *canon_path(yctx *c, const char *ref)
{
    yseg seg[MAXSEG];
    int k = split_ref(ref, strlen(ref), seg, MAXSEG);
    ybuf *b = &c->tmp;
    b->n = 0;
    fy_buf_add(c, b, "", 0);
    ynode *cur = c->root;
    for (int i = 0; i < k && cur; i++) {
        size_t idx;
        char tmp[64];
        ynode *next = step(c, cur, seg[i].s, seg[i].n, &idx);
        if (!next)
            break;
        if (b->n)
            fy_buf_add(c, b, ".", 1);
        if (cur->t == T_SEQ) {
            snprintf(tmp, sizeof tmp, "%zu", idx);
            fy_buf_adds(c, b, tmp);
        } else {
            size_t kl;
            const char *kt = fy_scalar_text(cur->u.c.k[idx], tmp, sizeof tmp, &kl);
            fy_buf_add(c, b, kt, kl);
        }
        cur = next;
    }
    return fy_astrdup(c, b->p, b->n);
}

/* spruce's statics(): the network named beside the operator, all its subnets' pools. */
static int sip_pools(yctx *c, yop *op, sipzones *z, const char **netname, char *err, size_t errsz)
{
    const char *dot = strrchr(op->path, '.');
    const char *entry = dot ? fy_astrdup(c, op->path, (size_t)(dot - op->path)) : "";
    const char *net = sip_string(c, entry, "name", err, errsz);
    if (!net)
        return 0;
    *netname = net;
    c->glob_mode = 1;
    ynode *subs = sip_get(c, err, errsz, "networks.%s.subnets", net, NULL);
    c->glob_mode = 0;
    if (!subs)
        return 0;
    NEED(subs->t == T_SEQ || subs->t == T_MAP, "$.networks.%s.subnets.* is a scalar (not a map or a list)", net);
    char base[600];
    snprintf(base, sizeof base, "networks.%s.subnets", net);
    const char *cb = canon_path(c, base);
    for (size_t i = 0; i < subs->u.c.n; i++) {
        char r[700], tmp[64];
        size_t kl;
        if (subs->t == T_SEQ)
            snprintf(r, sizeof r, "%s.%zu", cb, i);
        else {
            const char *key = fy_scalar_text(subs->u.c.k[i], tmp, sizeof tmp, &kl);   /* sets kl first */
            snprintf(r, sizeof r, "%s.%.*s", cb, (int)kl, key);
        }
        if (!subnet_statics(c, z, net, r, err, errsz))
            return 0;
    }
    return 1;
}

/* A value roughly as Go's %#v prints it ([]interface {}{"z1", 2}). */
static void go_sharpv(yctx *c, ybuf *b, const ynode *n, int depth)
{
    char tmp[64];
    size_t len;
    if (n->t == T_STR) {
        fy_buf_add(c, b, "\"", 1);
        fy_buf_add(c, b, n->u.s.p, n->u.s.n);
        fy_buf_add(c, b, "\"", 1);
        return;
    }
    if (n->t == T_NULL || depth > 8) {
        fy_buf_adds(c, b, "interface {}(nil)");
        return;
    }
    if (fy_is_scalar(n)) {
        const char *s = fy_scalar_text(n, tmp, sizeof tmp, &len);
        fy_buf_add(c, b, s, len);
        return;
    }
    fy_buf_adds(c, b, n->t == T_SEQ ? "[]interface {}{" : "map[interface {}]interface {}{");
    for (size_t i = 0; i < n->u.c.n; i++) {
        if (i)
            fy_buf_add(c, b, ", ", 2);
        if (n->t == T_MAP) {
            go_sharpv(c, b, n->u.c.k[i], depth + 1);
            fy_buf_add(c, b, ":", 1);
        }
        go_sharpv(c, b, n->u.c.v[i], depth + 1);
    }
    fy_buf_add(c, b, "}", 1);
}

/* The job's `azs` as a list of strings (NULL when absent). */
static int sip_job_azs(yctx *c, const char *job, const ynode **azs, char *err, size_t errsz)
{
    char e[256];
    *azs = sip_get(c, e, sizeof e, "%s.azs", job, NULL);
    if (!*azs)
        return 1;
    int ok = (*azs)->t == T_SEQ;
    for (size_t i = 0; ok && i < (*azs)->u.c.n; i++)
        ok = (*azs)->u.c.v[i]->t == T_STR;
    if (!ok) {
        ybuf *b = &c->tmp;
        b->n = 0;
        go_sharpv(c, b, *azs, 0);
        fy_buf_add(c, b, "", 1);
        NEED(0, "azs %s must be a list of strings", b->p);
    }
    return 1;
}

/* instances: a number (string or int), not negative. */
static int sip_instances(yctx *c, const char *job, lua_Integer *inst, char *err, size_t errsz)
{
    const char *s = sip_string(c, job, "instances", err, errsz);
    if (!s)
        return 0;
    lua_Integer v;
    int ovf;
    NEED(fy_parse_go_int(s, strlen(s), &v, &ovf) && !ovf && strspn(s, "+-0123456789") == strlen(s),
         "the `instances:` for the current job is not numeric");
    NEED(v >= 0, "negative number found in `instances:` for the current job");
    *inst = v;
    return 1;
}

/* currentJob(): the path up to the entry right under `jobs` or `instance_groups`. */
static const char *sip_job(yctx *c, yop *op, char *err, size_t errsz)
{
    yseg seg[MAXSEG];
    int k = split_ref(op->path, strlen(op->path), seg, MAXSEG);
    while (k > 0 && !(k >= 2 && (fy_word_is(seg[k - 2].s, seg[k - 2].n, "jobs")
                                 || fy_word_is(seg[k - 2].s, seg[k - 2].n, "instance_groups"))))
        k--;
    if (k <= 0) {
        snprintf(err, errsz, "not currently inside of a job definition block");
        return NULL;
    }
    return fy_astrdup(c, op->path, (size_t)(seg[k - 1].s + seg[k - 1].n - op->path));
}

static int str_in(const ynode *list, const char *s, size_t n)
{
    for (size_t i = 0; list && i < list->u.c.n; i++)
        if (list->u.c.v[i]->u.s.n == n && memcmp(list->u.c.v[i]->u.s.p, s, n) == 0)
            return 1;
    return 0;
}

/* The pool an argument indexes: every zone's addresses (de-duplicated, zone order), or one zone's. */
static int sip_pick_pool(yctx *c, sipzones *z, const ynode *jazs, const char *az, size_t azl, ippool *out,
                         char *err, size_t errsz)
{
    ybuf *b = &c->tmp;
    b->n = 0;
    fy_buf_add(c, b, "[", 1);
    int nz = jazs ? (int)jazs->u.c.n : z->norder;
    for (int i = 0; i < nz; i++) {
        if (i)
            fy_buf_add(c, b, " ", 1);
        if (jazs)
            fy_buf_add(c, b, jazs->u.c.v[i]->u.s.p, jazs->u.c.v[i]->u.s.n);
        else
            fy_buf_adds(c, b, z->order[i]);
    }
    fy_buf_add(c, b, "]", 2);
    if (az) {
        int found = 0;
        for (int i = 0; i < nz && !found; i++)
            found = jazs ? str_in(jazs, az, azl) : (strlen(z->order[i]) == azl && memcmp(z->order[i], az, azl) == 0);
        NEED(found, "could not find AZ %.*s in instance_groups AZS %s", (int)azl, az, b->p);
        char *name = fy_astrdup(c, az, azl);
        ippool *p = zone_pool(z, name);
        NEED(p, "could not find AZ %s in IP pool", name);
        *out = *p;
        return 1;
    }
    memset(out, 0, sizeof *out);
    for (int i = 0; i < nz; i++) {
        const char *name = jazs ? fy_astrdup(c, jazs->u.c.v[i]->u.s.p, jazs->u.c.v[i]->u.s.n) : z->order[i];
        int dup = 0;
        for (int j = 0; j < i && !dup; j++)
            dup = strcmp(name, jazs ? fy_astrdup(c, jazs->u.c.v[j]->u.s.p, jazs->u.c.v[j]->u.s.n) : z->order[j]) == 0;
        ippool *p = dup ? NULL : zone_pool(z, name);
        for (size_t k = 0; p && k < p->n; k++) {
            int seen = 0;
            for (size_t m = 0; m < out->n && !seen && nz > 1; m++)
                seen = out->ip[m] == p->ip[k];
            if (!seen)
                pool_add(c, out, p->ip[k]);
        }
    }
    return 1;
}

/* One argument: an int literal, or a string "N" / "AZ:N" (references do not count as literals). */
static int sip_arg(yctx *c, yop *op, int i, const char **az, size_t *azl, lua_Integer *n, char *err, size_t errsz)
{
    int lit;
    ynode *v = arg_value(c, op, i, err, errsz, &lit);
    if (!v)
        return 0;
    const atok *t = &op->args[i].alt[op->used];
    *az = NULL;
    if (t->kind == A_INT && lit) {
        *n = t->i;
        return 1;
    }
    const char *fmt = "static_ips operator arguments must have format <az>:<number> or <number>";
    NEED((t->kind == A_STR && lit) || t->kind == A_ENV, "%s", fmt);
    const char *s = t->kind == A_STR ? t->s : NULL;
    size_t len = t->n;
    if (t->kind == A_ENV)
        s = fy_env_get(c, t->s, &len);
    const char *colon = memchr(s, ':', len);
    if (colon) {
        *az = s;
        *azl = (size_t)(colon - s);
        len -= *azl + 1;
        s = colon + 1;
    }
    int ovf;
    NEED(len && strspn(s, "+-0123456789") >= len && fy_parse_go_int(s, len, n, &ovf) && !ovf, "%s", fmt);
    return 1;
}

/* Claim ip for owner, once per document. */
static int sip_claim(yctx *c, uint32_t ip, const char *owner, char *err, size_t errsz)
{
    char ipt[32];
    fmt_ip(ip, ipt, sizeof ipt);
    for (size_t cl = 0; cl < c->nclaims; cl++)
        NEED(c->claims[cl].ip != ip, "tried to use IP '%s', but that address is already allocated to %s", ipt,
             c->claims[cl].owner);
    if (c->nclaims == c->capclaims) {
        size_t cap = c->capclaims ? c->capclaims * 2 : 32;
        void *nv = fy_aalloc(c, sizeof(c->claims[0]) * cap);
        if (c->nclaims)
            memcpy(nv, c->claims, sizeof(c->claims[0]) * c->nclaims);
        c->claims = nv;
        c->capclaims = cap;
    }
    c->claims[c->nclaims].ip = ip;
    c->claims[c->nclaims].owner = fy_astrdup(c, owner, strlen(owner));
    c->nclaims++;
    return 1;
}

/* The instances' addresses, one argument each, in spruce's order of checks. */
static int sip_assign(yctx *c, yop *op, sipzones *z, const ynode *jazs, const char *jname, lua_Integer inst,
                      ynode *l, char *err, size_t errsz)
{
    for (lua_Integer i = 0; i < inst; i++) {
        const char *az;
        size_t azl = 0;
        lua_Integer n;
        ippool pool;
        if (!sip_arg(c, op, (int)i, &az, &azl, &n, err, errsz)
            || !sip_pick_pool(c, z, jazs, az, azl, &pool, err, errsz))
            return 0;
        NEED(n >= 0, "static_ips operator only accepts literal non-negative numbers for arguments");
        NEED((size_t)n < pool.n, "request for static_ip(%lld) in a pool of only %zu (zero-indexed) static addresses",
             (long long)n, pool.n);
        char owner[160], ipt[32];
        snprintf(owner, sizeof owner, "%s/%lld", jname, (long long)i);
        if (!sip_claim(c, pool.ip[n], owner, err, errsz))
            return 0;
        fmt_ip(pool.ip[n], ipt, sizeof ipt);
        fy_seq_push(c, l, fy_nstrz(c, ipt, op->node));
    }
    return 1;
}

static int op_static_ips(yctx *c, yop *op, ynode **out, char *err, size_t errsz)
{
    const char *job = sip_job(c, op, err, errsz);
    if (!job)
        return 0;
    ynode *jn = sip_get(c, err, errsz, "%s.name", job, NULL);
    const ynode *jazs;
    lua_Integer inst;
    if (!jn || !sip_job_azs(c, job, &jazs, err, errsz) || !sip_instances(c, job, &inst, err, errsz))
        return 0;
    ynode *l = fy_nnew(c, T_SEQ, op->node);
    *out = l;
    if (inst == 0)
        return 1;
    NEED(op->nargs >= inst, "not enough static IPs requested for job of %lld instances (only asked for %d)",
         (long long)inst, op->nargs);
    sipzones z;
    memset(&z, 0, sizeof z);
    const char *net;
    if (!sip_pools(c, op, &z, &net, err, errsz))
        return 0;
    char azlist[512];
    size_t al = 0;
    for (size_t i = 0; jazs && i < jazs->u.c.n; i++)
        al += (size_t)snprintf(azlist + al, al < sizeof azlist ? sizeof azlist - al : 0, "%s%.*s", i ? " " : "",
                               (int)jazs->u.c.v[i]->u.s.n, jazs->u.c.v[i]->u.s.p);
    for (size_t i = 0; jazs && i < jazs->u.c.n; i++) {
        char *name = fy_astrdup(c, jazs->u.c.v[i]->u.s.p, jazs->u.c.v[i]->u.s.n);
        NEED(zone_pool(&z, name), "could not find AZ %s (in network AZS [%.*s])", name, (int)al, azlist);
    }
    char tmp[64];
    size_t jl;
    const char *js = fy_is_scalar(jn) ? fy_scalar_text(jn, tmp, sizeof tmp, &jl) : "?";
    char *jname = fy_astrdup(c, js, fy_is_scalar(jn) ? jl : 1);
    if (jazs && jazs->u.c.n == 0)
        jazs = NULL;
    return sip_assign(c, op, &z, jazs, jname, inst, l, err, errsz);
}

/* -- calc ------------------------------------------------------------------ */
/*
 * spruce's op_calc: the references in the expression are replaced by their values as text
 * (replaceReferences), then the text goes through govaluate (v3.0.0, as spruce pins it): its lexer,
 * its parenthesis and token-transition checks, spruce's named-variable check, and evaluation with
 * govaluate's precedence levels, type checks and error wording. Division by zero is not an error
 * there (it gives +Inf, or NaN for %), and neither is it here.
 */

/* The expression with every reference replaced by its value, or NULL with err set. */
static char *str_replace_all(yctx *c, const char *s, const char *from, const char *to)
{
    size_t fl = strlen(from), tl = strlen(to), cnt = 0;
    for (const char *p = s; fl && (p = strstr(p, from)); p += fl)
        cnt++;
    if (!cnt)
        return (char *)s;
    char *out = fy_aalloc(c, strlen(s) + cnt * tl + 1), *o = out;
    for (const char *p = s, *q; (q = strstr(p, from)); p = q + fl) {
        memcpy(o, p, (size_t)(q - p));
        o += q - p;
        memcpy(o, to, tl);
        o += tl;
        s = q + fl;
    }
    strcpy(o, s);
    return out;
}

/* A referenced value as replaceReferences writes it (%d, %f), or NULL with err set. */
static const char *calc_value_text(const ynode *v, const char *path, char *tmp, size_t tsz, char *err, size_t errsz)
{
    if (v->t == T_INT) {
        snprintf(tmp, tsz, "%lld", (long long)v->u.i);
    } else if (v->t == T_FLOAT) {
        if (isnan(v->u.f))
            snprintf(tmp, tsz, "NaN");
        else if (isinf(v->u.f))
            snprintf(tmp, tsz, v->u.f < 0 ? "-Inf" : "+Inf");
        else
            snprintf(tmp, tsz, "%f", v->u.f);
    } else if (v->t == T_NULL) {
        snprintf(err, errsz, "path %s references a nil value, which cannot be used in calculations", path);
        return NULL;
    } else {
        snprintf(err, errsz, "path %s is of type %s, which cannot be used in calculations", path, fy_type_name(v));
        return NULL;
    }
    return tmp;
}

static char *calc_replace_refs(yctx *c, const char *e, size_t n, char *err, size_t errsz)
{
    char *out = fy_astrdup(c, e, n);
    size_t i = 0, st, len;
    while (calc_next_cursor(e, n, &i, &st, &len)) {
        const char *path = ref_norm(c, e + st, len);
        char tmp[400];
        ynode *v = resolve(c, e + st, len, err, errsz, 0);
        const char *text = v ? calc_value_text(v, path, tmp, sizeof tmp, err, errsz) : NULL;
        if (!text)
            return NULL;
        out = str_replace_all(c, out, path, text);
    }
    return out;
}

/* govaluate's token kinds (those a spruce expression can produce) and their valid successors */
enum { GK_UNKNOWN, GK_PREFIX, GK_NUMERIC, GK_BOOLEAN, GK_STRING, GK_VARIABLE, GK_FUNCTION, GK_SEPARATOR,
       GK_COMPARATOR, GK_LOGICALOP, GK_MODIFIER, GK_CLAUSE, GK_CLAUSE_CLOSE, GK_TERNARY, GK_COUNT };

static const char *const gk_names[GK_COUNT] = {
    "UNKNOWN", "PREFIX", "NUMERIC", "BOOLEAN", "STRING", "VARIABLE", "FUNCTION", "SEPARATOR",
    "COMPARATOR", "LOGICALOP", "MODIFIER", "CLAUSE", "CLAUSE_CLOSE", "TERNARY",
};

#define GB(k) (1u << (k))
#define GK_OPERAND (GB(GK_PREFIX) | GB(GK_NUMERIC) | GB(GK_BOOLEAN) | GB(GK_VARIABLE) | GB(GK_FUNCTION) \
                    | GB(GK_STRING) | GB(GK_CLAUSE))
#define GK_AFTER_VALUE (GB(GK_MODIFIER) | GB(GK_COMPARATOR) | GB(GK_LOGICALOP) | GB(GK_CLAUSE_CLOSE) \
                        | GB(GK_TERNARY) | GB(GK_SEPARATOR))

static const unsigned gk_next[GK_COUNT] = {
    [GK_UNKNOWN] = GK_OPERAND,
    [GK_PREFIX] = GB(GK_NUMERIC) | GB(GK_BOOLEAN) | GB(GK_VARIABLE) | GB(GK_FUNCTION) | GB(GK_CLAUSE)
                  | GB(GK_CLAUSE_CLOSE),
    [GK_NUMERIC] = GK_AFTER_VALUE,
    [GK_BOOLEAN] = GK_AFTER_VALUE,
    [GK_STRING] = GK_AFTER_VALUE,
    [GK_VARIABLE] = GK_AFTER_VALUE,
    [GK_FUNCTION] = GB(GK_CLAUSE),
    [GK_SEPARATOR] = GK_OPERAND,
    [GK_COMPARATOR] = GK_OPERAND | GB(GK_CLAUSE_CLOSE),
    [GK_LOGICALOP] = GK_OPERAND | GB(GK_CLAUSE_CLOSE),
    [GK_MODIFIER] = GK_OPERAND | GB(GK_CLAUSE_CLOSE),
    [GK_CLAUSE] = GK_OPERAND | GB(GK_CLAUSE_CLOSE),
    [GK_CLAUSE_CLOSE] = (GK_AFTER_VALUE | GB(GK_NUMERIC) | GB(GK_BOOLEAN) | GB(GK_VARIABLE) | GB(GK_STRING)
                         | GB(GK_CLAUSE)),
    [GK_TERNARY] = (GK_OPERAND | GB(GK_SEPARATOR)),
};

static const unsigned gk_eof = GB(GK_NUMERIC) | GB(GK_BOOLEAN) | GB(GK_STRING) | GB(GK_VARIABLE)
                               | GB(GK_CLAUSE_CLOSE);

static const char *const calc_funcs[] = {"min", "max", "mod", "pow", "sqrt", "floor", "ceil", NULL};

typedef struct gtok { int kind; const char *s; size_t n; double f; } gtok;

typedef struct glex {
    yctx *c;
    const char *s;
    size_t n, i;
    gtok *t;
    int nt, cap;
    char *err;
    size_t errsz;
} glex;

static int gl_space(int ch)
{
    return ch == ' ' || (ch >= '\t' && ch <= '\r');
}

static int gl_letter(int ch)
{
    return isalpha(ch) || ch >= 0x80;
}

static int gl_numeric(int ch)
{
    return isdigit(ch) || ch == '.';
}

static int gl_varname(int ch)
{
    return gl_letter(ch) || isdigit(ch) || ch == '_';
}

static int gl_notquote(int ch)
{
    return ch != '\'' && ch != '"';
}

static int gl_notbracket(int ch)
{
    return ch != ']';
}

static int gl_symbol(int ch)
{
    return !(isdigit(ch) || gl_letter(ch) || ch == '(' || ch == ')' || !gl_notquote(ch));
}

/* govaluate's readUntilFalse from l->i (`\` escapes the next character): keep = whitespace is text,
 * else whitespace ends a non-empty token. Returns whether a non-matching character ended it. */
static int gl_read(glex *l, int keep, int (*cond)(int), const char **out, size_t *outn)
{
    char *buf = fy_aalloc(l->c, l->n - l->i + 1);
    size_t k = 0;
    int ended = 0;
    while (l->i < l->n) {
        int ch = (unsigned char)l->s[l->i++];
        if (ch == '\\' && l->i < l->n) {
            buf[k++] = l->s[l->i++];
            continue;
        }
        if (gl_space(ch) && !keep) {
            if (k) {
                ended = 1;
                break;
            }
            continue;
        }
        if (!cond(ch)) {
            ended = 1;
            l->i--;
            break;
        }
        buf[k++] = (char)ch;
    }
    buf[k] = 0;
    *out = buf;
    *outn = k;
    return ended;
}

static int gl_in(const char *const *list, const char *s, size_t n)
{
    for (int i = 0; list[i]; i++)
        if (strlen(list[i]) == n && memcmp(list[i], s, n) == 0)
            return 1;
    return 0;
}

static int gl_fail(glex *l, const char *fmt, const char *s)
{
    snprintf(l->err, l->errsz, fmt, s);
    return -1;
}

/* The kind of an operator symbol after a token of kind prev (-1: not a symbol govaluate knows). */
static int gl_symbol_kind(int prev, const char *s, size_t n)
{
    static const char *const prefix[] = {"-", "!", "~", NULL};
    static const char *const modifier[] = {"+", "-", "*", "/", "%", "**", "&", "|", "^", ">>", "<<", NULL};
    static const char *const logical[] = {"&&", "||", NULL};
    static const char *const comparator[] = {"==", "!=", ">", ">=", "<", "<=", "=~", "!~", NULL};
    static const char *const ternary[] = {"?", ":", "??", NULL};
    if ((gk_next[prev] & GB(GK_PREFIX)) && gl_in(prefix, s, n))
        return GK_PREFIX;
    if (gl_in(modifier, s, n))
        return GK_MODIFIER;
    if (gl_in(logical, s, n))
        return GK_LOGICALOP;
    if (gl_in(comparator, s, n))
        return GK_COMPARATOR;
    return gl_in(ternary, s, n) ? GK_TERNARY : -1;
}

static int gl_word(glex *l, gtok *t)
{
    l->i--;
    gl_read(l, 0, gl_varname, &t->s, &t->n);
    t->kind = GK_VARIABLE;
    if (fy_word_is(t->s, t->n, "true") || fy_word_is(t->s, t->n, "false")) {
        t->kind = GK_BOOLEAN;
        t->f = fy_word_is(t->s, t->n, "true");
    } else if (fy_word_is(t->s, t->n, "in") || fy_word_is(t->s, t->n, "IN")) {
        t->kind = GK_COMPARATOR;
        t->s = "in";
    }
    if (gl_in(calc_funcs, t->s, t->n))
        t->kind = GK_FUNCTION;
    return 1;
}

static int gl_number(glex *l, gtok *t)
{
    l->i--;
    gl_read(l, 0, gl_numeric, &t->s, &t->n);
    t->kind = GK_NUMERIC;
    if (!fy_parse_go_float(t->s, t->n, &t->f))
        return gl_fail(l, "Unable to parse numeric value '%s' to float64", t->s);
    return 1;
}

/* govaluate's readToken: 1 with *t filled, 0 at the end, -1 with l->err set. */
static int gl_token(glex *l, int prev, gtok *t)
{
    memset(t, 0, sizeof *t);
    while (l->i < l->n && gl_space((unsigned char)l->s[l->i]))
        l->i++;
    if (l->i >= l->n)
        return 0;
    int ch = (unsigned char)l->s[l->i++];
    if (gl_numeric(ch))
        return gl_number(l, t);
    if (ch == ',' || ch == '(' || ch == ')') {
        t->kind = ch == ',' ? GK_SEPARATOR : ch == '(' ? GK_CLAUSE : GK_CLAUSE_CLOSE;
        t->s = ch == ',' ? "," : ch == '(' ? "40" : "41";   /* a rune prints as its number */
        t->n = strlen(t->s);
        return 1;
    }
    if (ch == '[' || !gl_notquote(ch)) {
        int done = gl_read(l, 1, ch == '[' ? gl_notbracket : gl_notquote, &t->s, &t->n);
        if (!done)
            return gl_fail(l, "%s", ch == '[' ? "Unclosed parameter bracket" : "Unclosed string literal");
        l->i++;
        t->kind = ch == '[' ? GK_VARIABLE : GK_STRING;
        return 1;
    }
    if (gl_letter(ch))
        return gl_word(l, t);
    l->i--;
    gl_read(l, 0, gl_symbol, &t->s, &t->n);
    t->kind = gl_symbol_kind(prev, t->s, t->n);
    return t->kind < 0 ? gl_fail(l, "Invalid token: '%s'", t->s) : 1;
}

/* parseTokens + checkBalance: 0 with l->err set on failure. */
static int gl_tokens(glex *l)
{
    int prev = GK_UNKNOWN, r, depth = 0;
    gtok t;
    while ((r = gl_token(l, prev, &t)) > 0) {
        if (l->nt == l->cap) {
            int cap = l->cap ? l->cap * 2 : 16;
            gtok *v = fy_aalloc(l->c, sizeof(gtok) * (size_t)cap);
            if (l->nt)
                memcpy(v, l->t, sizeof(gtok) * (size_t)l->nt);
            l->t = v;
            l->cap = cap;
        }
        l->t[l->nt++] = t;
        prev = t.kind;
        depth += t.kind == GK_CLAUSE ? 1 : t.kind == GK_CLAUSE_CLOSE ? -1 : 0;
    }
    if (r < 0)
        return 0;
    if (depth) {
        snprintf(l->err, l->errsz, "Unbalanced parenthesis");
        return 0;
    }
    return 1;
}

/* A token's value as Go's %v prints it. */
static const char *gtok_text(yctx *c, const gtok *t)
{
    if (!t)
        return "<nil>";
    if (t->kind == GK_NUMERIC) {
        char tmp[64];
        fy_fmt_go_float(t->f, tmp, sizeof tmp);
        return fy_astrdup(c, tmp, strlen(tmp));
    }
    if (t->kind == GK_BOOLEAN)
        return t->f ? "true" : "false";
    return fy_astrdup(c, t->s, t->n);
}

/* checkExpressionSyntax: 0 with err set when a token cannot follow the one before it. */
static int gl_syntax(glex *l)
{
    int state = GK_UNKNOWN;
    const gtok *last = NULL;
    for (int i = 0; i < l->nt; i++) {
        const gtok *t = &l->t[i];
        if (!(gk_next[state] & GB(t->kind))) {
            if (last && last->kind == GK_VARIABLE && t->kind == GK_CLAUSE)
                snprintf(l->err, l->errsz, "Undefined function %s", gtok_text(l->c, last));
            else
                snprintf(l->err, l->errsz, "Cannot transition token types from %s [%s] to %s [%s]", gk_names[state],
                         gtok_text(l->c, last), gk_names[t->kind], gtok_text(l->c, t));
            return 0;
        }
        state = t->kind;
        last = t;
    }
    if (!(gk_eof & GB(state))) {
        snprintf(l->err, l->errsz, "Unexpected end of expression");
        return 0;
    }
    return 1;
}

/* govaluate values: float64, bool, string, nil and the lists that `,` builds */
enum { GV_NIL, GV_NUM, GV_BOOL, GV_STR, GV_LIST };

typedef struct gval { int t; double f; const char *s; struct gval *l; size_t n; } gval;

typedef struct gev { yctx *c; const gtok *t; int nt, p; char *err; size_t errsz; int failed; } gev;

static const gval gv_nil = {GV_NIL, 0, NULL, NULL, 0};

static gval gv_num(double f)
{
    gval v = {GV_NUM, f, NULL, NULL, 0};
    return v;
}

static gval gv_bool(int b)
{
    gval v = {GV_BOOL, b, NULL, NULL, 0};
    return v;
}

/* A value as Go's %v prints it. */
static void gv_text(yctx *c, ybuf *b, const gval *v)
{
    char tmp[64];
    switch (v->t) {
    case GV_NUM:
        fy_fmt_go_float(v->f, tmp, sizeof tmp);
        fy_buf_adds(c, b, tmp);
        break;
    case GV_BOOL:
        fy_buf_adds(c, b, v->f ? "true" : "false");
        break;
    case GV_STR:
        fy_buf_add(c, b, v->s, v->n);
        break;
    case GV_LIST:
        fy_buf_add(c, b, "[", 1);
        for (size_t i = 0; i < v->n; i++) {
            if (i)
                fy_buf_add(c, b, " ", 1);
            gv_text(c, b, &v->l[i]);
        }
        fy_buf_add(c, b, "]", 1);
        break;
    default:
        fy_buf_adds(c, b, "<nil>");
    }
}

static const char *gv_str(yctx *c, const gval *v)
{
    ybuf *b = &c->tmp;
    b->n = 0;
    gv_text(c, b, v);
    fy_buf_add(c, b, "", 1);
    return fy_astrdup(c, b->p, b->n - 1);
}

static gval ge_fail(gev *e, const char *fmt, const gval *v, const char *sym)
{
    if (!e->failed)
        snprintf(e->err, e->errsz, fmt, v ? gv_str(e->c, v) : "", sym);
    e->failed = 1;
    return gv_nil;
}

/* reflect.DeepEqual on two values */
static int gv_equal(const gval *a, const gval *b)
{
    if (a->t != b->t)
        return 0;
    switch (a->t) {
    case GV_NUM:
    case GV_BOOL: return a->f == b->f;
    case GV_STR: return a->n == b->n && memcmp(a->s, b->s, a->n) == 0;
    case GV_LIST:
        if (a->n != b->n)
            return 0;
        for (size_t i = 0; i < a->n; i++)
            if (!gv_equal(&a->l[i], &b->l[i]))
                return 0;
        return 1;
    default: return 1;
    }
}

static int gv_strcmp(const gval *a, const gval *b)
{
    size_t n = a->n < b->n ? a->n : b->n;
    int r = memcmp(a->s, b->s, n);
    return r ? r : (a->n > b->n) - (a->n < b->n);
}

static const char g_modfmt[] = "Value '%s' cannot be used with the modifier '%s', it is not a number";
static const char g_cmpfmt[] = "Value '%s' cannot be used with the comparator '%s', it is not a number";
static const char g_logfmt[] = "Value '%s' cannot be used with the logical operator '%s', it is not a bool";
static const char g_terfmt[] = "Value '%s' cannot be used with the ternary operator '%s', it is not a bool";

/* Both sides must pass check (left first), as govaluate's typeCheck does for most operators. */
static int ge_check(gev *e, int type, const gval *a, const gval *b, const char *fmt, const char *sym)
{
    if (a->t != type)
        ge_fail(e, fmt, a, sym);
    else if (b->t != type)
        ge_fail(e, fmt, b, sym);
    return !e->failed;
}

static gval ge_concat(gev *e, const gval *a, const gval *b)
{
    ybuf *buf = &e->c->tmp;
    buf->n = 0;
    gv_text(e->c, buf, a);
    gv_text(e->c, buf, b);
    fy_buf_add(e->c, buf, "", 0);
    gval r = {GV_STR, 0, NULL, NULL, buf->n};
    r.s = fy_astrdup(e->c, buf->p, buf->n);
    return r;
}

/* + - * / % ** and the bitwise operators */
static gval ge_modifier(gev *e, const char *sym, const gval *a, const gval *b)
{
    if (!strcmp(sym, "+")) {
        if (a->t == GV_NUM && b->t == GV_NUM)
            return gv_num(a->f + b->f);
        if (a->t == GV_STR || b->t == GV_STR)
            return ge_concat(e, a, b);
        return ge_fail(e, g_modfmt, a, sym);
    }
    if (!ge_check(e, GV_NUM, a, b, g_modfmt, sym))
        return gv_nil;
    double x = a->f, y = b->f;
    switch (sym[0]) {
    case '-': return gv_num(x - y);
    case '*': return gv_num(sym[1] ? pow(x, y) : x * y);
    case '/': return gv_num(x / y);
    case '%': return gv_num(fmod(x, y));
    case '&': return gv_num((double)((int64_t)x & (int64_t)y));
    case '|': return gv_num((double)((int64_t)x | (int64_t)y));
    case '^': return gv_num((double)((int64_t)x ^ (int64_t)y));
    default: {
        uint64_t u = (uint64_t)(int64_t)x, s = (uint64_t)(int64_t)y;
        if (s >= 64)
            return gv_num(0);
        return gv_num((double)(sym[0] == '<' ? u << s : u >> s));
    }
    }
}

static gval ge_regex(gev *e, const char *sym, const gval *a, const gval *b)
{
    if (!ge_check(e, GV_STR, a, b, g_cmpfmt, sym))
        return gv_nil;
    regex_t re;
    char *pat = fy_astrdup(e->c, b->s, b->n), *subj = fy_astrdup(e->c, a->s, a->n);
    if (regcomp(&re, pat, REG_EXTENDED | REG_NOSUB) != 0) {
        gval pv = {GV_STR, 0, pat, NULL, b->n};
        return ge_fail(e, "Unable to compile regexp pattern '%s': %s", &pv, "invalid pattern");
    }
    int m = regexec(&re, subj, 0, NULL, 0) == 0;
    regfree(&re);
    return gv_bool(sym[0] == '=' ? m : !m);
}

static gval ge_comparator(gev *e, const char *sym, const gval *a, const gval *b)
{
    if (!strcmp(sym, "==") || !strcmp(sym, "!="))
        return gv_bool(gv_equal(a, b) == (sym[0] == '='));
    if (!strcmp(sym, "=~") || !strcmp(sym, "!~"))
        return ge_regex(e, sym, a, b);
    if (!strcmp(sym, "in")) {
        if (b->t != GV_LIST)
            return ge_fail(e, g_cmpfmt, b, sym);
        for (size_t i = 0; i < b->n; i++)
            if (b->l[i].t != GV_LIST && gv_equal(a, &b->l[i]))
                return gv_bool(1);
        return gv_bool(0);
    }
    int r;
    if (a->t == GV_NUM && b->t == GV_NUM)
        r = (a->f > b->f) - (a->f < b->f) + (isnan(a->f) || isnan(b->f) ? 8 : 0);
    else if (a->t == GV_STR && b->t == GV_STR)
        r = gv_strcmp(a, b);
    else
        return ge_fail(e, g_cmpfmt, a, sym);
    if (r >= 8)
        return gv_bool(0);   /* NaN compares false */
    if (sym[0] == '>')
        return gv_bool(sym[1] ? r >= 0 : r > 0);
    return gv_bool(sym[1] ? r <= 0 : r < 0);
}

static gval ge_separator(gev *e, const gval *a, const gval *b)
{
    size_t n = a->t == GV_LIST ? a->n : 1;
    gval r = {GV_LIST, 0, NULL, NULL, n + 1};
    r.l = fy_aalloc(e->c, sizeof(gval) * (n + 1));
    if (a->t == GV_LIST)
        memcpy(r.l, a->l, sizeof(gval) * n);
    else
        r.l[0] = *a;
    r.l[n] = *b;
    return r;
}

/* One binary operator of a precedence level, applied to its evaluated sides. */
static gval ge_apply(gev *e, int kind, const char *sym, const gval *a, const gval *b)
{
    switch (kind) {
    case GK_SEPARATOR:
        return ge_separator(e, a, b);
    case GK_TERNARY:
        if (sym[0] != '?' || sym[1])
            return a->t != GV_NIL ? *a : *b;
        if (a->t != GV_BOOL)
            return ge_fail(e, g_terfmt, a, sym);
        return a->f ? *b : gv_nil;
    case GK_LOGICALOP:
        if (!ge_check(e, GV_BOOL, a, b, g_logfmt, sym))
            return gv_nil;
        return gv_bool(sym[0] == '|' ? (a->f || b->f) : (a->f && b->f));
    case GK_COMPARATOR:
        return ge_comparator(e, sym, a, b);
    default:
        return ge_modifier(e, sym, a, b);
    }
}

/* spruce's functions: min max mod pow take two float64 arguments, sqrt floor ceil one */
static gval ge_call(gev *e, const gtok *fn, const gval *arg)
{
    const gval *a = arg->t == GV_LIST ? arg->l : arg;
    size_t na = arg->t == GV_LIST ? arg->n : arg->t == GV_NIL ? 0 : 1;
    int two = gl_in((const char *const[]){"min", "max", "mod", "pow", NULL}, fn->s, fn->n);
    size_t want = two ? 2 : 1;
    int ok = na == want;
    for (size_t i = 0; ok && i < na; i++)
        ok = a[i].t == GV_NUM;
    if (!ok) {
        snprintf(e->err, e->errsz, "%.*s function expects %s of type float64", (int)fn->n, fn->s,
                 two ? "two arguments" : "one argument");
        e->failed = 1;
        return gv_nil;
    }
    switch (fn->s[1]) {
    case 'i': return gv_num(fmin(a[0].f, a[1].f));
    case 'a': return gv_num(fmax(a[0].f, a[1].f));
    case 'o': return gv_num(fn->s[0] == 'm' ? fmod(a[0].f, a[1].f) : pow(a[0].f, a[1].f));
    case 'q': return gv_num(sqrt(a[0].f));
    case 'l': return gv_num(floor(a[0].f));
    default: return gv_num(ceil(a[0].f));
    }
}

static gval ge_level(gev *e, int lv);
static gval ge_function(gev *e);

static gval ge_prefix(gev *e, const gtok *t)
{
    gval r = ge_function(e);
    if (e->failed)
        return r;
    char sym[8];
    snprintf(sym, sizeof sym, "%.*s", (int)t->n, t->s);
    if ((sym[0] == '!' && r.t != GV_BOOL) || (sym[0] != '!' && r.t != GV_NUM))
        return ge_fail(e, "Value '%s' cannot be used with the prefix '%s'", &r, sym);
    if (sym[0] == '!')
        return gv_bool(!r.f);
    return gv_num(sym[0] == '-' ? -r.f : (double)~(int64_t)r.f);
}

/* govaluate's planValue: a literal, a parenthesized expression, a prefix operation or nothing. */
static gval ge_value(gev *e)
{
    if (e->p >= e->nt)
        return gv_nil;
    const gtok *t = &e->t[e->p++];
    gval v = gv_nil;
    switch (t->kind) {
    case GK_CLAUSE:
        v = e->p < e->nt ? ge_level(e, 0) : gv_nil;
        e->p++;   /* the CLAUSE_CLOSE (parentheses are balanced) */
        return v;
    case GK_CLAUSE_CLOSE:
        e->p--;
        return v;
    case GK_NUMERIC:
        return gv_num(t->f);
    case GK_BOOLEAN:
        return gv_bool(t->f != 0);
    case GK_STRING:
        v.t = GV_STR;
        v.s = t->s;
        v.n = t->n;
        return v;
    case GK_PREFIX:
        return ge_prefix(e, t);
    default:
        snprintf(e->err, e->errsz, "Unable to plan token kind: '%s', value: '%s'", gk_names[t->kind],
                 gtok_text(e->c, t));
        e->failed = 1;
        return v;
    }
}

static gval ge_function(gev *e)
{
    if (e->p < e->nt && e->t[e->p].kind == GK_FUNCTION) {
        const gtok *fn = &e->t[e->p++];
        gval arg = ge_value(e);
        return e->failed ? arg : ge_call(e, fn, &arg);
    }
    return ge_value(e);
}

/* govaluate's precedence levels, lowest first (each left-associative) */
static const struct { int kind; const char *syms[10]; } g_levels[] = {
    {GK_SEPARATOR, {",", NULL}},
    {GK_TERNARY, {"?", ":", "??", NULL}},
    {GK_LOGICALOP, {"||", NULL}},
    {GK_LOGICALOP, {"&&", NULL}},
    {GK_COMPARATOR, {"==", "!=", ">", ">=", "<", "<=", "=~", "!~", "in", NULL}},
    {GK_MODIFIER, {"&", "|", "^", NULL}},
    {GK_MODIFIER, {"<<", ">>", NULL}},
    {GK_MODIFIER, {"+", "-", NULL}},
    {GK_MODIFIER, {"*", "/", "%", NULL}},
    {GK_MODIFIER, {"**", NULL}},
};

static gval ge_level(gev *e, int lv)
{
    if (lv == (int)(sizeof g_levels / sizeof g_levels[0]))
        return ge_function(e);
    gval a = ge_level(e, lv + 1);
    while (!e->failed && e->p < e->nt) {
        const gtok *t = &e->t[e->p];
        if (t->kind != g_levels[lv].kind || !gl_in(g_levels[lv].syms, t->s, t->n))
            break;
        e->p++;
        gval b = ge_level(e, lv + 1);
        if (e->failed)
            break;
        char sym[8];
        snprintf(sym, sizeof sym, "%.*s", (int)t->n, t->s);
        a = ge_apply(e, t->kind, sym, &a, &b);
    }
    return a;
}

/* The result as a node: numbers become integers when they are whole (spruce returns int64s if it can). */
static ynode *gv_node(yctx *c, const gval *v, const ynode *at)
{
    switch (v->t) {
    case GV_NUM:
        if (isfinite(v->f) && v->f == floor(v->f) && fabs(v->f) < 9.2e18)
            return fy_nint(c, (lua_Integer)v->f, at);
        return fy_nfloat(c, v->f, at);
    case GV_BOOL: return fy_nbool(c, v->f != 0, at);
    case GV_STR: return fy_nstr(c, v->s, v->n, at);
    case GV_LIST: {
        ynode *l = fy_nnew(c, T_SEQ, at);
        for (size_t i = 0; i < v->n; i++)
            fy_seq_push(c, l, gv_node(c, &v->l[i], at));
        return l;
    }
    default: return fy_nnew(c, T_NULL, at);
    }
}

/* spruce's check of expression.Vars(): every VARIABLE token, in order. */
static int calc_no_vars(yctx *c, const glex *l, char *err, size_t errsz)
{
    ybuf *b = &c->tmp;
    b->n = 0;
    fy_buf_add(c, b, "", 0);
    int n = 0;
    for (int i = 0; i < l->nt; i++)
        if (l->t[i].kind == GK_VARIABLE) {
            if (n++)
                fy_buf_add(c, b, ", ", 2);
            fy_buf_add(c, b, l->t[i].s, l->t[i].n);
        }
    fy_buf_add(c, b, "", 1);
    NEED(n == 0, "calc operator does not support named variables in expression: %s", b->p);
    return 1;
}

static int op_calc(yctx *c, yop *op, ynode **out, char *err, size_t errsz)
{
    NEED(op->nargs == 1, "calc operator only expects one argument containing the expression");
    atok *t = &op->args[0].alt[0];
    NEED(op->args[0].nalt == 1 && t->kind == A_STR,
         "calc operator argument is suppose to be a quoted mathematical expression (type Literal)");
    char *text = calc_replace_refs(c, t->s, t->n, err, errsz);
    if (!text)
        return 0;
    glex l = {c, text, strlen(text), 0, NULL, 0, 0, err, errsz};
    if (!gl_tokens(&l) || !gl_syntax(&l) || !calc_no_vars(c, &l, err, errsz))
        return 0;
    gev e = {c, l.t, l.nt, 0, err, errsz, 0};
    gval v = l.nt ? ge_level(&e, 0) : gv_nil;
    if (e.failed)
        return 0;
    *out = gv_node(c, &v, op->node);
    return 1;
}

/* -- inject (merge phase) ------------------------------------------------- */

static int op_inject(yctx *c, yop *op, ynode **out, char *err, size_t errsz)
{
    (void)out;
    NEED(op->nargs > 0, "no arguments specified to (( inject ... ))");
    NEED(op->parent && op->parent->t == T_MAP, "inject operator can only be used as a map value");
    ynode *acc = NULL;
    for (int a = 0; a < op->nargs; a++) {
        int lit;
        ynode *v = arg_value(c, op, a, err, errsz, &lit);
        if (!v)
            return 0;
        NEED(!lit && op->args[a].alt[op->used].kind == A_REF, "inject operator only accepts key reference arguments");
        NEED(v->t == T_MAP, "%s is not a map", arg_text(c, op, a));
        ynode *cp = fy_ncopy(c, v, NULL);
        acc = acc ? fy_merge_obj(c, acc, cp) : cp;
    }
    ynode *m = op->parent;
    long self = -1;
    for (size_t i = 0; i < m->u.c.n; i++)
        if (m->u.c.v[i] == op->node) {
            self = (long)i;
            break;
        }
    NEED(self >= 0, "inject operator lost its place in the document");
    /* parent path for marks made while merging */
    const char *dot = strrchr(op->path, '.');
    fy_path_pop(c, 0);
    if (dot)
        fy_buf_add(c, &c->path, op->path, (size_t)(dot - op->path));
    ynode *res = fy_nnew(c, T_MAP, m);
    int save = c->fallback_append;
    c->fallback_append = 1;
    for (size_t i = 0; i < m->u.c.n; i++) {
        if ((long)i == self) {
            for (size_t j = 0; j < acc->u.c.n; j++)
                if (fy_map_find(c, m, acc->u.c.k[j]) < 0)
                    fy_map_append(c, res, acc->u.c.k[j], acc->u.c.v[j]);
            continue;
        }
        long j = fy_map_find(c, acc, m->u.c.k[i]);
        ynode *v = m->u.c.v[i];
        if (j >= 0) {
            size_t old = fy_path_push_key(c, m->u.c.k[i]);
            v = fy_merge_obj(c, acc->u.c.v[j], v);
            fy_path_pop(c, old);
        }
        fy_map_append(c, res, m->u.c.k[i], v);
    }
    c->fallback_append = save;
    fy_path_pop(c, 0);
    /* rewrite the parent in place so every pointer to it stays valid */
    m->u.c.k = res->u.c.k;
    m->u.c.v = res->u.c.v;
    m->u.c.n = res->u.c.n;
    m->u.c.cap = res->u.c.cap;
    m->u.c.h = NULL;
    return 1;
}

static int op_unknown(yctx *c, yop *op, ynode **out, char *err, size_t errsz)
{
    (void)c;
    (void)out;
    if (in_list(unsupported_ops, op->name))
        snprintf(err, errsz, "(( %s )) operator is not offered by forge.yaml (no file, vault or cloud access)",
                 op->name);
    else
        snprintf(err, errsz, "(( %s )) operator not defined", op->name);
    return 0;
}

static opfn op_lookup(const char *name)
{
    static const struct { const char *name; opfn fn; } tab[] = {
        {"grab", op_grab}, {"concat", op_concat}, {"join", op_join}, {"param", op_param},
        {"static_ips", op_static_ips}, {"calc", op_calc}, {"keys", op_keys}, {"sort", op_sort},
        {"empty", op_empty}, {"base64", op_base64}, {"inject", op_inject}, {"defer", op_defer},
        {"prune", op_prune}, {"ips", op_ips}, {"cartesian-product", op_cartesian}, {"negate", op_negate},
        {"stringify", op_stringify}, {"base64-decode", op_base64_decode},
    };
    for (size_t i = 0; i < sizeof tab / sizeof tab[0]; i++)
        if (strcmp(tab[i].name, name) == 0)
            return tab[i].fn;
    return op_unknown;
}

/* Format "(( name args ))" of an operator for messages. */
static const char *op_text(yctx *c, yop *op)
{
    size_t n = op->node->u.s.n;
    if (n > 200)
        n = 200;
    return fy_astrdup(c, op->node->u.s.p, n);
}

/* Run one operator; 1 on success (result stored in place). */
static int run_op(yctx *c, yop *op, int phase)
{
    char err[1024];
    ynode *res = NULL;
    err[0] = 0;
    int ok;
    if (op->perr) {
        snprintf(err, sizeof err, "%s", op->perr);
        ok = 0;
    } else {
        ok = op_lookup(op->name)(c, op, &res, err, sizeof err);
    }
    if (!ok) {
        fy_err_add(c, phase == PH_PARAM ? "yaml.param" : "yaml.eval", op->node, op->path, op_text(c, op), "%s", err);
        return 0;
    }
    if (phase == PH_INJECT)
        return 1;
    if (res && op->parent && op->index < op->parent->u.c.n && op->parent->u.c.v[op->index] == op->node)
        op->parent->u.c.v[op->index] = res;
    return 1;
}

/* ------------------------------------------------------------------------- */
/* phases                                                                     */
/* ------------------------------------------------------------------------- */

static void heap_push(int *h, int *n, int v)
{
    int i = (*n)++;
    h[i] = v;
    while (i > 0 && h[(i - 1) / 2] > h[i]) {
        int t = h[i];
        h[i] = h[(i - 1) / 2];
        h[(i - 1) / 2] = t;
        i = (i - 1) / 2;
    }
}

static int heap_pop(int *h, int *n)
{
    int top = h[0];
    h[0] = h[--*n];
    int i = 0;
    for (;;) {
        int l = 2 * i + 1, r = l + 1, m = i;
        if (l < *n && h[l] < h[m])
            m = l;
        if (r < *n && h[r] < h[m])
            m = r;
        if (m == i)
            break;
        int t = h[i];
        h[i] = h[m];
        h[m] = t;
        i = m;
    }
    return top;
}

static void report_cycle(yctx *c, yops *o, const int *done)
{
    ybuf *b = &c->tmp;
    b->n = 0;
    fy_buf_add(c, b, "cycle detected in operator data-flow graph:", 43);
    int shown = 0;
    for (int i = 0; i < o->n && shown < 8; i++)
        if (o->v[i].run && !done[i]) {
            fy_buf_add(c, b, " $.", 3);
            fy_buf_adds(c, b, o->v[i].path);
            shown++;
        }
    const ynode *at = NULL;
    for (int i = 0; i < o->n; i++)
        if (o->v[i].run && !done[i]) {
            at = o->v[i].node;
            break;
        }
    fy_err_add(c, "yaml.cycle", at, NULL, NULL, "%s", b->p);
}

static int under_path(const char *p, const char *pick)
{
    size_t l = strlen(pick);
    return strncmp(p, pick, l) == 0 && (p[l] == 0 || p[l] == '.');
}

static void mark_run(yops *o, int i)
{
    if (o->v[i].run)
        return;
    o->v[i].run = 1;
    for (int d = 0; d < o->v[i].ndeps; d++)
        mark_run(o, o->v[i].deps[d]);
}

/* Evaluate every operator in dependency order. */
static void eval_phase(yctx *c, const char *const *picks, int npicks)
{
    yops o;
    collect_ops(c, PH_EVAL, &o);
    if (!o.n)
        return;
    for (int i = 0; i < o.n; i++)
        op_deps(c, &o, i);
    for (int i = 0; i < o.n; i++) {
        int sel = npicks == 0;
        for (int p = 0; p < npicks && !sel; p++)
            sel = under_path(o.v[i].path, picks[p]);
        if (sel)
            mark_run(&o, i);
    }
    int *cnt = fy_aalloc(c, sizeof(int) * (size_t)o.n);
    memset(cnt, 0, sizeof(int) * (size_t)o.n);
    for (int i = 0; i < o.n; i++)
        if (o.v[i].run)
            for (int d = 0; d < o.v[i].ndeps; d++) {
                cnt[o.v[i].deps[d]]++;
                o.v[i].indeg++;
            }
    for (int i = 0; i < o.n; i++) {
        o.v[i].users = fy_aalloc(c, sizeof(int) * (size_t)(cnt[i] + 1));
        o.v[i].nusers = 0;
    }
    for (int i = 0; i < o.n; i++)
        if (o.v[i].run)
            for (int d = 0; d < o.v[i].ndeps; d++) {
                yop *dep = &o.v[o.v[i].deps[d]];
                dep->users[dep->nusers++] = i;
            }
    int *heap = fy_aalloc(c, sizeof(int) * (size_t)o.n);
    int *done = fy_aalloc(c, sizeof(int) * (size_t)o.n);
    memset(done, 0, sizeof(int) * (size_t)o.n);
    int hn = 0, ndone = 0, nrun = 0;
    for (int i = 0; i < o.n; i++)
        if (o.v[i].run) {
            nrun++;
            if (o.v[i].indeg == 0)
                heap_push(heap, &hn, i);
        }
    while (hn) {
        int i = heap_pop(heap, &hn);
        run_op(c, &o.v[i], PH_EVAL);
        done[i] = 1;
        ndone++;
        for (int u = 0; u < o.v[i].nusers; u++) {
            yop *us = &o.v[o.v[i].users[u]];
            if (--us->indeg == 0)
                heap_push(heap, &hn, o.v[i].users[u]);
        }
    }
    if (ndone < nrun)
        report_cycle(c, &o, done);
}

/* inject: one operator at a time (each rewrites its map), in dependency order. */
static void inject_phase(yctx *c)
{
    ynode **failed = NULL;
    int nfailed = 0, capfailed = 0;
    for (int round = 0; round < 100000; round++) {
        yops o;
        collect_ops(c, PH_INJECT, &o);
        int live = 0;
        for (int i = 0; i < o.n; i++) {
            int skip = 0;
            for (int f = 0; f < nfailed; f++)
                if (failed[f] == o.v[i].node)
                    skip = 1;
            o.v[i].run = !skip;
            live += !skip;
        }
        if (!live)
            return;
        for (int i = 0; i < o.n; i++)
            if (o.v[i].run)
                op_deps(c, &o, i);
        int pick = -1;
        for (int i = 0; i < o.n && pick < 0; i++) {
            if (!o.v[i].run)
                continue;
            int blocked = 0;
            for (int d = 0; d < o.v[i].ndeps; d++)
                if (o.v[o.v[i].deps[d]].run)
                    blocked = 1;
            if (!blocked)
                pick = i;
        }
        if (pick < 0) {
            int *done = fy_aalloc(c, sizeof(int) * (size_t)o.n);
            for (int i = 0; i < o.n; i++)
                done[i] = !o.v[i].run;
            report_cycle(c, &o, done);
            return;
        }
        if (!run_op(c, &o.v[pick], PH_INJECT)) {
            if (nfailed == capfailed) {
                capfailed = capfailed ? capfailed * 2 : 8;
                ynode **nf = fy_aalloc(c, sizeof(ynode *) * (size_t)capfailed);
                if (nfailed)
                    memcpy(nf, failed, sizeof(ynode *) * (size_t)nfailed);
                failed = nf;
            }
            failed[nfailed++] = o.v[pick].node;
        }
    }
}

static void param_phase(yctx *c)
{
    yops o;
    collect_ops(c, PH_PARAM, &o);
    for (int i = 0; i < o.n; i++)
        run_op(c, &o.v[i], PH_PARAM);
}

/* ------------------------------------------------------------------------- */
/* prune, sort, cherry-pick, params                                           */
/* ------------------------------------------------------------------------- */

/* Resolve a static path to (parent, index); 0 if it is not there. */
static int locate(yctx *c, const char *path, ynode **parent, size_t *idx, int *last_is_name)
{
    yseg seg[MAXSEG];
    int k = split_ref(path, strlen(path), seg, MAXSEG);
    if (k <= 0)
        return 0;
    ynode *cur = c->root;
    for (int i = 0; i < k; i++) {
        size_t ix;
        ynode *next = step(c, cur, seg[i].s, seg[i].n, &ix);
        if (!next)
            return 0;
        if (i == k - 1) {
            *parent = cur;
            *idx = ix;
            if (last_is_name)
                *last_is_name = cur->t == T_SEQ && !all_digits(seg[i].s, seg[i].n);
            return 1;
        }
        cur = next;
    }
    return 0;
}

static void prune_all(yctx *c, const char *const *extra, int nextra)
{
    size_t total = c->nmarks + (size_t)nextra;
    ynode **targets = fy_aalloc(c, sizeof(ynode *) * (total + 1));
    size_t nt = 0;
    for (size_t i = 0; i < total; i++) {
        const char *p;
        int option = i >= c->nmarks;
        if (!option) {
            if (c->marks[i].sort)
                continue;
            p = c->marks[i].path;
        } else {
            p = extra[i - c->nmarks];
        }
        ynode *parent;
        size_t idx;
        int byname = 0;
        if (!locate(c, p, &parent, &idx, &byname))
            continue;
        if (option && byname)
            continue;   /* spruce: a name as the last segment in a list prunes nothing */
        targets[nt++] = parent->u.c.v[idx];
    }
    /* walk the tree removing targets by identity, so indexes cannot shift under us */
    if (!nt)
        return;
    ynode **stack = fy_aalloc(c, sizeof(ynode *) * 64);
    size_t sp = 0, scap = 64;
    stack[sp++] = c->root;
    while (sp) {
        ynode *n = stack[--sp];
        if (n->t != T_MAP && n->t != T_SEQ)
            continue;
        for (size_t i = 0; i < n->u.c.n;) {
            ynode *v = n->u.c.v[i];
            int hit = 0;
            for (size_t t = 0; t < nt && !hit; t++)
                hit = targets[t] == v;
            if (hit) {
                if (n->t == T_MAP)
                    fy_map_remove(n, i);
                else
                    fy_seq_remove(n, i);
                continue;
            }
            if (v->t == T_MAP || v->t == T_SEQ) {
                if (sp == scap) {
                    ynode **ns = fy_aalloc(c, sizeof(ynode *) * scap * 2);
                    memcpy(ns, stack, sizeof(ynode *) * sp);
                    stack = ns;
                    scap *= 2;
                }
                stack[sp++] = v;
            }
            i++;
        }
    }
}

typedef struct sortctx { yctx *c; const char *key; int kind; } sortctx;

/* No globals: several lua_States may merge on different threads at once. */
static int sort_cmp(const sortctx *sc, const ynode *a, const ynode *b)
{
    if (sc->kind == T_MAP) {
        a = fy_map_gets(sc->c, (ynode *)a, sc->key);
        b = fy_map_gets(sc->c, (ynode *)b, sc->key);
    }
    if ((a->t == T_INT || a->t == T_FLOAT) && (b->t == T_INT || b->t == T_FLOAT))
        return fy_key_cmp(&a, &b);
    char ta[64], tb[64];
    size_t la, lb;
    const char *sa = fy_scalar_text(a, ta, sizeof ta, &la), *sb = fy_scalar_text(b, tb, sizeof tb, &lb);
    size_t n = la < lb ? la : lb;
    int r = memcmp(sa, sb, n);
    return r ? r : (la < lb ? -1 : la > lb);
}

static void stable_sort(const sortctx *sc, ynode **v, size_t n)
{
    for (size_t i = 1; i < n; i++)
        for (size_t j = i; j > 0 && sort_cmp(sc, v[j - 1], v[j]) > 0; j--) {
            ynode *t = v[j];
            v[j] = v[j - 1];
            v[j - 1] = t;
        }
}

static void sort_all(yctx *c)
{
    for (size_t m = 0; m < c->nmarks; m++) {
        if (!c->marks[m].sort)
            continue;
        const char *path = c->marks[m].path;
        ynode *parent;
        size_t idx;
        if (!locate(c, path, &parent, &idx, NULL))
            continue;
        ynode *l = parent->u.c.v[idx];
        if (l->t != T_SEQ)
            continue;   /* still the operator: reported as orphaned during eval */
        const char *key = c->marks[m].key ? c->marks[m].key : "name";
        int kind = -1;
        int bad = 0;
        for (size_t i = 0; i < l->u.c.n; i++) {
            int t = l->u.c.v[i]->t;
            if (t == T_FLOAT)
                t = T_INT;
            if (kind < 0)
                kind = t;
            else if (kind != t)
                bad = 1;
        }
        if (bad) {
            fy_err_add(c, "yaml.sort", l, path, NULL,
                       "$.%s is a list with different types (not a list with homogeneous entry types)", path);
            continue;
        }
        if (kind == T_SEQ) {
            fy_err_add(c, "yaml.sort", l, path, NULL,
                       "$.%s is a list with list entries (not a list with maps, strings or numbers)", path);
            continue;
        }
        if (kind == T_MAP) {
            for (size_t i = 0; i < l->u.c.n && !bad; i++) {
                ynode *kv = fy_map_gets(c, l->u.c.v[i], key);
                bad = !kv || !fy_is_scalar(kv);
            }
            if (bad) {
                fy_err_add(c, "yaml.sort", l, path, NULL,
                           "$.%s is a list with map entries, where some do not contain %s (not a list with map "
                           "entries each containing %s)", path, key, key);
                continue;
            }
        }
        sortctx sc = {c, key, kind};
        stable_sort(&sc, l->u.c.v, l->u.c.n);
    }
}

static ynode *cherry_pick(yctx *c, const char *const *picks, int npicks)
{
    ynode *out = fy_nnew(c, T_MAP, c->root);
    for (int p = 0; p < npicks; p++) {
        yseg seg[MAXSEG];
        int k = split_ref(picks[p], strlen(picks[p]), seg, MAXSEG);
        if (k <= 0)
            continue;
        ynode *chain[MAXSEG + 1];
        chain[0] = c->root;
        char have[512];
        size_t hn = 0;
        int ok = 1;
        for (int i = 0; i < k; i++) {
            size_t ix;
            int w = snprintf(have + hn, sizeof have - hn, "%s%.*s", hn ? "." : "", (int)seg[i].n, seg[i].s);
            if (w > 0 && hn + (size_t)w < sizeof have)
                hn += (size_t)w;
            chain[i + 1] = step(c, chain[i], seg[i].s, seg[i].n, &ix);
            if (!chain[i + 1]) {
                fy_err_add(c, "yaml.cherry_pick", NULL, NULL, NULL,
                           "`$.%s` could not be found in the datastructure", have);
                ok = 0;
                break;
            }
        }
        if (!ok)
            continue;
        ynode *val = fy_ncopy(c, chain[k], NULL);
        for (int i = k - 1; i >= 1; i--) {
            if (chain[i]->t == T_SEQ) {
                ynode *l = fy_nnew(c, T_SEQ, val);
                fy_seq_push(c, l, val);
                val = l;
            } else {
                ynode *m = fy_nnew(c, T_MAP, val);
                fy_map_append(c, m, fy_nstr(c, seg[i].s, seg[i].n, NULL), val);
                val = m;
            }
        }
        ynode *key = fy_nstr(c, seg[0].s, seg[0].n, NULL);
        long j = fy_map_find(c, out, key);
        if (j < 0) {
            fy_map_append(c, out, key, val);
        } else {
            fy_path_pop(c, 0);
            fy_path_push(c, seg[0].s, seg[0].n);
            out->u.c.v[j] = fy_merge_obj(c, val, out->u.c.v[j]);
            fy_path_pop(c, 0);
        }
    }
    return out;
}

/* params: set values at dotted paths (maps created as needed). */
static void set_param(yctx *c, const char *path, ynode *val)
{
    yseg seg[MAXSEG];
    int k = split_ref(path, strlen(path), seg, MAXSEG);
    if (k <= 0) {
        fy_err_add(c, "yaml.param", NULL, path, NULL, "bad parameter path");
        return;
    }
    ynode *cur = c->root;
    for (int i = 0; i < k; i++) {
        size_t ix;
        ynode *next = step(c, cur, seg[i].s, seg[i].n, &ix);
        if (i == k - 1) {
            if (next)
                cur->u.c.v[ix] = val;
            else if (cur->t == T_MAP)
                fy_map_append(c, cur, fy_nstr(c, seg[i].s, seg[i].n, NULL), val);
            else
                fy_err_add(c, "yaml.param", NULL, path, NULL, "cannot set a parameter here (no such list entry)");
            return;
        }
        if (!next || (next->t != T_MAP && next->t != T_SEQ)) {
            if (cur->t != T_MAP) {
                fy_err_add(c, "yaml.param", NULL, path, NULL, "cannot set a parameter here (no such list entry)");
                return;
            }
            ynode *m = fy_nnew(c, T_MAP, NULL);
            if (next)
                cur->u.c.v[ix] = m;
            else
                fy_map_append(c, cur, fy_nstr(c, seg[i].s, seg[i].n, NULL), m);
            next = m;
        }
        cur = next;
    }
}

/* Strings of an optional list option at opts[name]; returns count (arena copies). */
static int opt_strings(yctx *c, int opts, const char *name, const char ***out)
{
    lua_State *L = c->L;
    *out = NULL;
    if (!opts || lua_getfield(L, opts, name) != LUA_TTABLE) {
        if (opts)
            lua_pop(L, 1);
        return 0;
    }
    int n = (int)lua_rawlen(L, -1);
    const char **v = fy_aalloc(c, sizeof(char *) * (size_t)(n + 1));
    for (int i = 1; i <= n; i++) {
        lua_rawgeti(L, -1, i);
        size_t len;
        const char *s = lua_tolstring(L, -1, &len);
        if (!s)
            luaL_error(L, "yaml.merge: option '%s' must list strings", name);
        v[i - 1] = fy_astrdup(c, s, len);
        lua_pop(L, 1);
    }
    lua_pop(L, 1);
    *out = v;
    return n;
}

/* Stack (inner frame): [ctx, errtab, docs, opts] -> [..., value] */
int fy_merge_main(yctx *c, int docs, int opts)
{
    lua_State *L = c->L;
    if (lua_isnoneornil(L, opts))
        opts = 0;
    yidx x = fy_push_refs(L);
    c->fallback_append = opts ? forge_optboolfield(L, opts, "fallback_append", 0) : 0;
    int skip_eval = opts ? forge_optboolfield(L, opts, "skip_eval", 0) : 0;
    if (opts && lua_getfield(L, opts, "env") == LUA_TTABLE)
        c->envidx = lua_gettop(L);
    else if (opts)
        lua_pop(L, 1);
    const char **names, **prunes, **picks;
    int nnames = opt_strings(c, opts, "names", &names);
    int nprunes = opt_strings(c, opts, "prune", &prunes);
    int npicks = opt_strings(c, opts, "cherry_pick", &picks);

    ynode *root = fy_nnew(c, T_MAP, NULL);
    c->root = root;
    int ndocs = (int)lua_rawlen(L, docs);
    for (int i = 1; i <= ndocs; i++) {
        char label[32];
        snprintf(label, sizeof label, "<doc %d>", i);
        unsigned short file = fy_ctx_addfile(c, i <= nnames ? names[i - 1] : label);
        lua_rawgeti(L, docs, i);
        ynode *d;
        if (lua_type(L, -1) == LUA_TSTRING) {
            size_t len;
            const char *text = lua_tolstring(L, -1, &len);
            d = fy_load_document(c, text, len, file);
        } else {
            fy_path_pop(c, 0);
            d = fy_from_lua(c, lua_gettop(L), 0, x, file);
        }
        lua_pop(L, 1);
        if (!d || d->t == T_NULL)
            continue;
        if (d->t != T_MAP) {
            fy_err_add(c, "yaml.merge", d, NULL, NULL, "root of document %d must be a map, not a %s", i,
                       d->t == T_SEQ ? "list" : "scalar");
            continue;
        }
        fy_path_pop(c, 0);
        fy_merge_obj(c, root, d);
    }
    if (c->nerrors)
        fy_raise(c);
    if (opts && lua_getfield(L, opts, "params") == LUA_TTABLE) {
        int pidx = lua_gettop(L);
        lua_pushnil(L);
        while (lua_next(L, pidx)) {
            if (lua_type(L, -2) != LUA_TSTRING)
                luaL_error(L, "yaml.merge: params keys must be dotted paths (strings)");
            const char *k = lua_tostring(L, -2);
            fy_path_pop(c, 0);
            set_param(c, fy_astrdup(c, k, strlen(k)), fy_from_lua(c, lua_gettop(L), 0, x, 0));
            lua_pop(L, 1);
        }
        lua_pop(L, 1);
    } else if (opts) {
        lua_pop(L, 1);
    }
    if (c->nerrors)
        fy_raise(c);
    if (!skip_eval) {
        inject_phase(c);
        if (c->nerrors)
            fy_raise(c);
        param_phase(c);
        if (c->nerrors)
            fy_raise(c);
        eval_phase(c, picks, npicks);
        if (c->nerrors)
            fy_raise(c);
    }
    prune_all(c, prunes, nprunes);
    sort_all(c);
    if (c->nerrors)
        fy_raise(c);
    ynode *result = c->root;
    if (npicks) {
        result = cherry_pick(c, picks, npicks);
        if (c->nerrors)
            fy_raise(c);
    }
    fy_push_node(c, result, x);
    return 1;
}
