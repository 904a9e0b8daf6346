/*
 * forge.yaml — private: (( operator )) parsing, reference resolution, dependency
 * order (Kahn, ties by path, cycle detection), the operators themselves, then
 * prune, sort and cherry-pick; and merge_main, which runs the whole pipeline.
 * See YAML-MERGE.md §3–5. Included only by runtime/yaml.c.
 */
#ifndef FORGE_YAML_EVAL_H
#define FORGE_YAML_EVAL_H

#include "yaml_merge.h"

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
        atok *alt = aalloc(c, sizeof(atok) * (size_t)(a->nalt + 1));
        memcpy(alt, a->alt, sizeof(atok) * (size_t)a->nalt);
        alt[a->nalt++] = t;
        a->alt = alt;
        *join = 0;
        return;
    }
    if (*nargs == *cap) {
        int nc = *cap ? *cap * 2 : 4;
        yarg *na = aalloc(c, sizeof(yarg) * (size_t)nc);
        if (*nargs)
            memcpy(na, *args, sizeof(yarg) * (size_t)*nargs);
        *args = na;
        *cap = nc;
    }
    atok *alt = aalloc(c, sizeof(atok));
    *alt = t;
    (*args)[*nargs].alt = alt;
    (*args)[*nargs].nalt = 1;
    (*nargs)++;
    *join = 0;
}

static void classify_word(yctx *c, atok *t, const char *w, size_t n)
{
    memset(t, 0, sizeof *t);
    t->s = astrdup(c, w, n);
    t->n = n;
    if (word_is(w, n, "~") || word_is(w, n, "nil") || word_is(w, n, "null") || word_is(w, n, "NULL")
        || word_is(w, n, "Null") || word_is(w, n, "NIL") || word_is(w, n, "Nil")) {
        t->kind = A_NULL;
        return;
    }
    if (word_is(w, n, "true") || word_is(w, n, "True") || word_is(w, n, "TRUE")) {
        t->kind = A_BOOL;
        t->b = 1;
        return;
    }
    if (word_is(w, n, "false") || word_is(w, n, "False") || word_is(w, n, "FALSE")) {
        t->kind = A_BOOL;
        return;
    }
    if (n > 1 && w[0] == '$' && (isalpha((unsigned char)w[1]) || w[1] == '_')) {
        t->kind = A_ENV;
        t->s = astrdup(c, w + 1, n - 1);
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
            if (parse_go_int(w, n, &v, &ovf) && !(n - i > 1 && w[i] == '0')) {
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
    char *buf = aalloc(c, n + 1);
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
            t.s = astrdup(c, buf, k);
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
    if (!op_inner(n, &in, &len) || len == 0 || !isalpha((unsigned char)in[0]))
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
        yop *v = aalloc(c, sizeof(yop) * (size_t)cap);
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
        op.path = astrdup(c, path_str(c), c->path.n);
        ops_push(c, o, &op);
        return;
    }
    if (n->t == T_MAP) {
        for (size_t i = 0; i < n->u.c.n; i++) {
            size_t old = path_push_key(c, n->u.c.k[i]);
            collect(c, n->u.c.v[i], n, i, n->u.c.k[i], phase, o, depth + 1);
            path_pop(c, old);
        }
    } else if (n->t == T_SEQ) {
        for (size_t i = 0; i < n->u.c.n; i++) {
            size_t old = path_push_idx(c, i);
            collect(c, n->u.c.v[i], n, i, NULL, phase, o, depth + 1);
            path_pop(c, old);
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
    path_pop(c, 0);
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
        return astrdup(c, s, n);
    size_t total = 1;
    for (int i = 0; i < k; i++)
        total += seg[i].n + 1;
    char *out = aalloc(c, total);
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
        long i = map_finds(c, cur, s, n);
        if (i < 0) {
            for (size_t j = 0; j < cur->u.c.n; j++)
                if (cur->u.c.k[j]->t != T_STR && scalar_text_is(cur->u.c.k[j], s, n)) {
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
                ynode *v = map_gets(c, cur->u.c.v[j], fields[f]);
                if (v && v->t == T_STR && v->u.s.n == n && memcmp(v->u.s.p, s, n) == 0) {
                    *idx = j;
                    return cur->u.c.v[j];
                }
            }
    }
    return NULL;
}

static ynode *resolve(yctx *c, const char *ref, size_t n, char *err, size_t errsz, int depth);

/* Text of a segment, resolving a dynamic [ref]. */
static int seg_text(yctx *c, const yseg *sg, const char **s, size_t *n, char *tmp, size_t tmpsz,
                    char *err, size_t errsz, int depth)
{
    if (!sg->bracket || all_digits(sg->s, sg->n)) {
        *s = sg->s;
        *n = sg->n;
        return 1;
    }
    ynode *k = resolve(c, sg->s, sg->n, err, errsz, depth + 1);
    if (!k)
        return 0;
    if (!is_scalar(k)) {
        snprintf(err, errsz, "`%.*s` is not a scalar and cannot be used as a key", (int)sg->n, sg->s);
        return 0;
    }
    *s = scalar_text(k, tmp, tmpsz, n);
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
    const char *s = scalar_text(v, tmp, sizeof tmp, &len);
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
        int *v = aalloc(c, sizeof(int) * (size_t)cap);
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
    char *pre = aalloc(c, pl + 2);
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
    buf_add(c, canon, "", 0);
    for (int i = 0; i < k; i++) {
        if (cur->t == T_STR && cur->u.s.n > 4 && cur->u.s.p[0] == '(') {
            dep_add(c, o, self, ops_find(o, canon->p));
            return;
        }
        const char *s = seg[i].s;
        size_t sl = seg[i].n, idx;
        char tmp[64];
        if (seg[i].bracket && !all_digits(s, sl)) {
            /* dynamic key: depend on the key's reference and everything under here */
            char *save = astrdup(c, canon->p, canon->n);
            ref_deps(c, o, self, s, sl, depth + 1);
            dep_subtree(c, o, self, save, 0);
            char err[256];
            if (!seg_text(c, &seg[i], &s, &sl, tmp, sizeof tmp, err, sizeof err, depth)) {
                return;
            }
            canon->n = 0;
            buf_add(c, canon, save, strlen(save));
        }
        ynode *next = step(c, cur, s, sl, &idx);
        if (!next)
            return;
        if (canon->n)
            buf_add(c, canon, ".", 1);
        if (cur->t == T_SEQ) {
            char num[32];
            int w = snprintf(num, sizeof num, "%zu", idx);
            buf_add(c, canon, num, (size_t)w);
        } else {
            size_t kl;
            const char *kt = scalar_text(cur->u.c.k[idx], tmp, sizeof tmp, &kl);
            buf_add(c, canon, kt, kl);
        }
        cur = next;
    }
    char *p = astrdup(c, canon->p, canon->n);
    dep_subtree(c, o, self, p, 0);
}

/* Dotted names in a calc expression (paths), calling fn for each. */
typedef void (*ident_fn)(yctx *c, void *ud, const char *s, size_t n, int dotted, int func);

static void calc_idents(yctx *c, const char *e, size_t n, ident_fn fn, void *ud)
{
    size_t i = 0;
    while (i < n) {
        if (isalpha((unsigned char)e[i]) || e[i] == '_') {
            size_t st = i;
            int dotted = 0;
            while (i < n && (isalnum((unsigned char)e[i]) || e[i] == '_' || e[i] == '.' || e[i] == '[' || e[i] == ']'
                             || (e[i] == '-' && i + 1 < n && isalpha((unsigned char)e[i + 1]) && dotted)))
                if (e[i++] == '.')
                    dotted = 1;
            size_t j = i;
            while (j < n && isspace((unsigned char)e[j]))
                j++;
            fn(c, ud, e + st, i - st, dotted, j < n && e[j] == '(');
        } else if (isdigit((unsigned char)e[i]) || e[i] == '.') {
            while (i < n && (isalnum((unsigned char)e[i]) || e[i] == '.'))
                i++;
        } else {
            i++;
        }
    }
}

typedef struct depctx { yops *o; int self; } depctx;

static void calc_dep_cb(yctx *c, void *ud, const char *s, size_t n, int dotted, int func)
{
    depctx *d = ud;
    if (dotted && !func)
        ref_deps(c, d->o, d->self, s, n, 0);
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
                depctx d = {o, self};
                calc_idents(c, tk->s, tk->n, calc_dep_cb, &d);
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

static const char *env_get(yctx *c, const char *name, size_t *len)
{
    if (c->envidx) {
        lua_getfield(c->L, c->envidx, name);
        const char *v = lua_tolstring(c->L, -1, len);
        lua_pop(c->L, 1);   /* still referenced by the env table */
        return v;
    }
    const char *v = getenv(name);
    if (v)
        *len = strlen(v);
    return v;
}

static ynode *tok_literal(yctx *c, const atok *t, const ynode *at)
{
    switch (t->kind) {
    case A_STR: return nstr(c, t->s, t->n, at);
    case A_INT: return nint(c, t->i, at);
    case A_FLOAT: return nfloat(c, t->f, at);
    case A_BOOL: return nbool(c, t->b, at);
    default: return nnew(c, T_NULL, at);
    }
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
            const char *v = env_get(c, t->s, &len);
            if (v && len) {
                ynode *n = nnew(c, T_STR, op->node);
                resolve_plain(c, n, v, len, 1);
                return n;
            }
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
        buf_add(c, b, "<nil>", 5);
        return;
    }
    char tmp[64];
    size_t len;
    const char *s = scalar_text(n, tmp, sizeof tmp, &len);
    buf_add(c, b, s, len);
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
        *out = ncopy(c, v, NULL);
        return 1;
    }
    ynode *l = nnew(c, T_SEQ, op->node);
    for (int a = 0; a < op->nargs; a++) {
        ynode *v = arg_value(c, op, a, err, errsz, NULL);
        if (!v)
            return 0;
        if (v->t == T_SEQ)
            for (size_t i = 0; i < v->u.c.n; i++)
                seq_push(c, l, ncopy(c, v->u.c.v[i], NULL));
        else
            seq_push(c, l, ncopy(c, v, NULL));
    }
    *out = l;
    return 1;
}

static int op_concat(yctx *c, yop *op, ynode **out, char *err, size_t errsz)
{
    NEED(op->nargs >= 2, "concat operator requires at least two arguments");
    ybuf *b = &c->tmp;
    b->n = 0;
    buf_add(c, b, "", 0);
    for (int a = 0; a < op->nargs; a++) {
        ynode *v = arg_value(c, op, a, err, errsz, NULL);
        if (!v)
            return 0;
        NEED(is_scalar(v), "tried to concat %s, which is not a string scalar", arg_text(c, op, a));
        add_gotext(c, b, v);
    }
    *out = nstr(c, b->p, b->n, op->node);
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
        NEED(is_scalar(e), "entry #%zu in list is not compatible for (( join ... ))", i);
        if (!*first)
            buf_add(c, b, sep->s, sep->n);
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
        const char *v = env_get(c, sep->s, &len);
        atok *t = aalloc(c, sizeof *t);
        memset(t, 0, sizeof *t);
        t->kind = A_STR;
        t->s = astrdup(c, v, len);
        t->n = len;
        sep = t;
    }
    ybuf *b = &c->tmp;
    b->n = 0;
    buf_add(c, b, "", 0);
    int first = 1;
    for (int a = 1; a < op->nargs; a++)
        if (!join_arg(c, op, a, sep, &first, err, errsz))
            return 0;
    *out = nstr(c, b->p, b->n, op->node);
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
    ynode *l = nnew(c, T_SEQ, op->node);
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
            const char *s = scalar_text(v->u.c.k[i], tmp, sizeof tmp, &len);
            seq_push(c, l, nstr(c, s, len, op->node));
        }
    }
    NEED(op->nargs > 0, "no arguments specified to (( keys ... ))");
    if (l->u.c.n > 1)
        qsort(l->u.c.v, l->u.c.n, sizeof(ynode *), key_cmp);
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
        *out = nnew(c, T_MAP, op->node);
    else if (!strcmp(t, "array") || !strcmp(t, "list"))
        *out = nnew(c, T_SEQ, op->node);
    else if (!strcmp(t, "string"))
        *out = nstr(c, "", 0, op->node);
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
            buf_adds(c, b, arg_text(c, op, 0));
        buf_add(c, b, "", 1);
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
    char *o = aalloc(c, (n + 2) / 3 * 4 + 1);
    size_t k = 0;
    for (size_t i = 0; i < n; i += 3) {
        unsigned w = (unsigned)in[i] << 16 | (i + 1 < n ? (unsigned)in[i + 1] << 8 : 0) | (i + 2 < n ? in[i + 2] : 0);
        o[k++] = tab[(w >> 18) & 63];
        o[k++] = tab[(w >> 12) & 63];
        o[k++] = i + 1 < n ? tab[(w >> 6) & 63] : '=';
        o[k++] = i + 2 < n ? tab[w & 63] : '=';
    }
    *out = nstr(c, o, k, op->node);
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
    char *o = aalloc(c, v->u.s.n + 1);
    size_t k = 0;
    long bad = b64_decode(v->u.s.p, v->u.s.n, o, &k);
    NEED(bad < 0, "unable to base64 decode string %.*s: illegal base64 data at input byte %ld", (int)v->u.s.n,
         v->u.s.p, bad);
    *out = nstr(c, o, k, op->node);
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
    *out = nbool(c, !v->u.b, op->node);
    return 1;
}

static ynode *sorted_copy(yctx *c, const ynode *n)
{
    ynode *r = ncopy(c, n, NULL);
    if (r->t == T_MAP && r->u.c.n > 1) {
        /* sort keys, carrying values along */
        size_t cnt = r->u.c.n;
        ynode **pairs = aalloc(c, sizeof(ynode *) * cnt * 2);
        for (size_t i = 0; i < cnt; i++) {
            pairs[2 * i] = r->u.c.k[i];
            pairs[2 * i + 1] = r->u.c.v[i];
        }
        for (size_t i = 1; i < cnt; i++)
            for (size_t j = i; j > 0 && key_cmp(&pairs[2 * (j - 1)], &pairs[2 * j]) > 0; j--) {
                ynode *tk = pairs[2 * j], *tv = pairs[2 * j + 1];
                pairs[2 * j] = pairs[2 * (j - 1)];
                pairs[2 * j + 1] = pairs[2 * (j - 1) + 1];
                pairs[2 * (j - 1)] = tk;
                pairs[2 * (j - 1) + 1] = tv;
            }
        for (size_t i = 0; i < cnt; i++) {
            r->u.c.k[i] = pairs[2 * i];
            r->u.c.v[i] = pairs[2 * i + 1];
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
    emit_document(c, s);
    *out = nstr(c, c->out.p, c->out.n, op->node);
    return 1;
}

/* One argument token as spruce's Expr.String prints it. */
static void tok_gostr(yctx *c, ybuf *b, const atok *t)
{
    char tmp[64];
    switch (t->kind) {
    case A_STR:
        buf_add(c, b, "\"", 1);
        buf_add(c, b, t->s, t->n);
        buf_add(c, b, "\"", 1);
        return;
    case A_INT:
        snprintf(tmp, sizeof tmp, "%lld", (long long)t->i);
        break;
    case A_FLOAT:
        fmt_go_float(t->f, tmp, sizeof tmp);
        break;
    case A_BOOL:
        snprintf(tmp, sizeof tmp, "%s", t->b ? "true" : "false");
        break;
    case A_NULL:
        snprintf(tmp, sizeof tmp, "nil");
        break;
    case A_ENV:
        buf_add(c, b, "$", 1);
        buf_add(c, b, t->s, t->n);
        return;
    default:
        buf_adds(c, b, ref_norm(c, t->s, t->n));
        return;
    }
    buf_adds(c, b, tmp);
}

/* (( defer X Y )) gives the text (( X Y )), each argument as spruce prints it (a literal ends an || chain). */
static int op_defer(yctx *c, yop *op, ynode **out, char *err, size_t errsz)
{
    NEED(op->nargs > 0, "defer has no arguments - what are you deferring?");
    ybuf *b = &c->tmp;
    b->n = 0;
    buf_add(c, b, "((", 2);
    for (int a = 0; a < op->nargs; a++) {
        buf_add(c, b, " ", 1);
        for (int i = 0; i < op->args[a].nalt; i++) {
            const atok *t = &op->args[a].alt[i];
            if (i)
                buf_add(c, b, " || ", 4);
            tok_gostr(c, b, t);
            if (t->kind != A_REF && t->kind != A_ENV)
                break;
        }
    }
    buf_add(c, b, " ))", 3);
    *out = nstr(c, b->p, b->n, op->node);
    return 1;
}

static int op_prune(yctx *c, yop *op, ynode **out, char *err, size_t errsz)
{
    (void)err;
    (void)errsz;
    mark_add(c, op->path, 0, NULL, 0);
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
    ynode *next = nnew(c, T_SEQ, op->node);
    for (size_t i = 0; i < acc->u.c.n; i++)
        for (size_t j = 0; j < n; j++) {
            ybuf *b = &c->tmp;
            b->n = 0;
            buf_add(c, b, acc->u.c.v[i]->u.s.p, acc->u.c.v[i]->u.s.n);
            add_gotext(c, b, items[j]);
            seq_push(c, next, nstr(c, b->p, b->n, op->node));
        }
    return next;
}

static int op_cartesian(yctx *c, yop *op, ynode **out, char *err, size_t errsz)
{
    ynode *acc = nnew(c, T_SEQ, op->node);
    seq_push(c, acc, nstr(c, "", 0, op->node));
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
            NEED(is_scalar(items[j]), "cartesian-product operator can only operate on lists of scalar values");
        acc = cartesian_step(c, op, acc, items, n);
    }
    NEED(op->nargs > 0, "no arguments specified to (( cartesian-product ... ))");
    *out = acc;
    return 1;
}

/* IPv4 helpers */
static int parse_ip(const char *s, size_t n, uint32_t *ip)
{
    unsigned v[4];
    char tmp[32], tail;
    if (n >= sizeof tmp)
        return 0;
    memcpy(tmp, s, n);
    tmp[n] = 0;
    if (sscanf(tmp, "%u.%u.%u.%u%c", &v[0], &v[1], &v[2], &v[3], &tail) != 4)
        return 0;
    for (int i = 0; i < 4; i++)
        if (v[i] > 255)
            return 0;
    *ip = v[0] << 24 | v[1] << 16 | v[2] << 8 | v[3];
    return 1;
}

static void fmt_ip(uint32_t ip, char *out, size_t size)
{
    snprintf(out, size, "%u.%u.%u.%u", ip >> 24, (ip >> 16) & 255, (ip >> 8) & 255, ip & 255);
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

/* First address for (( ips BASE IDX [COUNT] )): CIDRs count from the network base (from its end if IDX < 0). */
static int ips_start(const ynode *base, lua_Integer idx, int has_count, lua_Integer count, int64_t *start,
                     char *err, size_t errsz)
{
    const char *s = base->u.s.p;
    const char *slash = memchr(s, '/', base->u.s.n);
    uint32_t ip;
    int bits = slash ? atoi(slash + 1) : 32;
    NEED(parse_ip(s, slash ? (size_t)(slash - s) : base->u.s.n, &ip) && bits >= 0 && bits <= 32
         && (!slash || (slash[1] && strspn(slash + 1, "0123456789") == base->u.s.n - (size_t)(slash + 1 - s))),
         "invalid CIDR address: %.*s", (int)base->u.s.n, s);
    if (!slash) {
        *start = (int64_t)ip + idx;
        NEED(*start >= 0 && *start + (has_count && count > 0 ? count - 1 : 0) <= 0xFFFFFFFFLL,
             "ips: index %lld is out of range for %.*s", (long long)idx, (int)base->u.s.n, s);
        return 1;
    }
    uint32_t mask = bits == 0 ? 0 : 0xFFFFFFFFu << (32 - bits);
    int64_t size = (int64_t)1 << (32 - bits);
    NEED(llabs((long long)idx) <= size, "start index %lld exceeds size of subnet %.*s", (long long)idx,
         (int)base->u.s.n, s);
    int64_t st = idx < 0 ? size + idx : idx;
    NEED(!has_count || st + count <= size, "start index %lld and count %lld would exceed size of subnet %.*s",
         (long long)st, (long long)count, (int)base->u.s.n, s);
    *start = (int64_t)(ip & mask) + st;
    NEED(*start + (has_count && count > 0 ? count - 1 : 0) <= 0xFFFFFFFFLL, "ips: index %lld is out of range for %.*s",
         (long long)idx, (int)base->u.s.n, s);
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
    int64_t start;
    if (!ips_start(vals[0], idx, op->nargs > 2, count, &start, err, errsz))
        return 0;
    char tmp[32];
    if (op->nargs == 2) {
        fmt_ip((uint32_t)start, tmp, sizeof tmp);
        *out = nstrz(c, tmp, op->node);
        return 1;
    }
    ynode *l = nnew(c, T_SEQ, op->node);
    for (lua_Integer i = 0; i < count; i++) {
        fmt_ip((uint32_t)(start + i), tmp, sizeof tmp);
        seq_push(c, l, nstrz(c, tmp, op->node));
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
        uint32_t *v = aalloc(c, sizeof(uint32_t) * cap);
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
        const char **o = aalloc(c, sizeof(char *) * (size_t)cap);
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
        const char **nm = aalloc(c, sizeof(char *) * (size_t)cap);
        ippool *pl = aalloc(c, sizeof(ippool) * (size_t)cap);
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
        return astrdup(c, v->u.s.p, v->u.s.n);
    if (v->t == T_INT) {
        char tmp[32];
        snprintf(tmp, sizeof tmp, "%lld", (long long)v->u.i);
        return astrdup(c, tmp, strlen(tmp));
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
            zones[(*nz)++] = astrdup(c, v->u.s.p, v->u.s.n);
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
    buf_add(c, b, "", 0);
    ynode *cur = c->root;
    for (int i = 0; i < k && cur; i++) {
        size_t idx;
        char tmp[64];
        ynode *next = step(c, cur, seg[i].s, seg[i].n, &idx);
        if (!next)
            break;
        if (b->n)
            buf_add(c, b, ".", 1);
        if (cur->t == T_SEQ) {
            snprintf(tmp, sizeof tmp, "%zu", idx);
            buf_adds(c, b, tmp);
        } else {
            size_t kl;
            const char *kt = scalar_text(cur->u.c.k[idx], tmp, sizeof tmp, &kl);
            buf_add(c, b, kt, kl);
        }
        cur = next;
    }
    return astrdup(c, b->p, b->n);
}

/* spruce's statics(): the network named beside the operator, all its subnets' pools. */
static int sip_pools(yctx *c, yop *op, sipzones *z, const char **netname, char *err, size_t errsz)
{
    const char *dot = strrchr(op->path, '.');
    const char *entry = dot ? astrdup(c, op->path, (size_t)(dot - op->path)) : "";
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
        else
            snprintf(r, sizeof r, "%s.%.*s", cb, (int)kl, scalar_text(subs->u.c.k[i], tmp, sizeof tmp, &kl));
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
        buf_add(c, b, "\"", 1);
        buf_add(c, b, n->u.s.p, n->u.s.n);
        buf_add(c, b, "\"", 1);
        return;
    }
    if (n->t == T_NULL || depth > 8) {
        buf_adds(c, b, "interface {}(nil)");
        return;
    }
    if (is_scalar(n)) {
        const char *s = scalar_text(n, tmp, sizeof tmp, &len);
        buf_add(c, b, s, len);
        return;
    }
    buf_adds(c, b, n->t == T_SEQ ? "[]interface {}{" : "map[interface {}]interface {}{");
    for (size_t i = 0; i < n->u.c.n; i++) {
        if (i)
            buf_add(c, b, ", ", 2);
        if (n->t == T_MAP) {
            go_sharpv(c, b, n->u.c.k[i], depth + 1);
            buf_add(c, b, ":", 1);
        }
        go_sharpv(c, b, n->u.c.v[i], depth + 1);
    }
    buf_add(c, b, "}", 1);
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
        buf_add(c, b, "", 1);
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
    NEED(parse_go_int(s, strlen(s), &v, &ovf) && !ovf && strspn(s, "+-0123456789") == strlen(s),
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
    while (k > 0 && !(k >= 2 && (word_is(seg[k - 2].s, seg[k - 2].n, "jobs")
                                 || word_is(seg[k - 2].s, seg[k - 2].n, "instance_groups"))))
        k--;
    if (k <= 0) {
        snprintf(err, errsz, "not currently inside of a job definition block");
        return NULL;
    }
    return astrdup(c, op->path, (size_t)(seg[k - 1].s + seg[k - 1].n - op->path));
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
    buf_add(c, b, "[", 1);
    int nz = jazs ? (int)jazs->u.c.n : z->norder;
    for (int i = 0; i < nz; i++) {
        if (i)
            buf_add(c, b, " ", 1);
        if (jazs)
            buf_add(c, b, jazs->u.c.v[i]->u.s.p, jazs->u.c.v[i]->u.s.n);
        else
            buf_adds(c, b, z->order[i]);
    }
    buf_add(c, b, "]", 2);
    if (az) {
        int found = 0;
        for (int i = 0; i < nz && !found; i++)
            found = jazs ? str_in(jazs, az, azl) : (strlen(z->order[i]) == azl && memcmp(z->order[i], az, azl) == 0);
        NEED(found, "could not find AZ %.*s in instance_groups AZS %s", (int)azl, az, b->p);
        char *name = astrdup(c, az, azl);
        ippool *p = zone_pool(z, name);
        NEED(p, "could not find AZ %s in IP pool", name);
        *out = *p;
        return 1;
    }
    memset(out, 0, sizeof *out);
    for (int i = 0; i < nz; i++) {
        const char *name = jazs ? astrdup(c, jazs->u.c.v[i]->u.s.p, jazs->u.c.v[i]->u.s.n) : z->order[i];
        int dup = 0;
        for (int j = 0; j < i && !dup; j++)
            dup = strcmp(name, jazs ? astrdup(c, jazs->u.c.v[j]->u.s.p, jazs->u.c.v[j]->u.s.n) : z->order[j]) == 0;
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
        s = env_get(c, t->s, &len);
    const char *colon = memchr(s, ':', len);
    if (colon) {
        *az = s;
        *azl = (size_t)(colon - s);
        len -= *azl + 1;
        s = colon + 1;
    }
    int ovf;
    NEED(len && strspn(s, "+-0123456789") >= len && parse_go_int(s, len, n, &ovf) && !ovf, "%s", fmt);
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
        void *nv = aalloc(c, sizeof(c->claims[0]) * cap);
        if (c->nclaims)
            memcpy(nv, c->claims, sizeof(c->claims[0]) * c->nclaims);
        c->claims = nv;
        c->capclaims = cap;
    }
    c->claims[c->nclaims].ip = ip;
    c->claims[c->nclaims].owner = astrdup(c, owner, strlen(owner));
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
        seq_push(c, l, nstrz(c, ipt, op->node));
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
    ynode *l = nnew(c, T_SEQ, op->node);
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
        char *name = astrdup(c, jazs->u.c.v[i]->u.s.p, jazs->u.c.v[i]->u.s.n);
        NEED(zone_pool(&z, name), "could not find AZ %s (in network AZS [%.*s])", name, (int)al, azlist);
    }
    char tmp[64];
    size_t jl;
    const char *js = is_scalar(jn) ? scalar_text(jn, tmp, sizeof tmp, &jl) : "?";
    char *jname = astrdup(c, js, is_scalar(jn) ? jl : 1);
    if (jazs && jazs->u.c.n == 0)
        jazs = NULL;
    return sip_assign(c, op, &z, jazs, jname, inst, l, err, errsz);
}

/* -- calc ------------------------------------------------------------------ */

typedef struct cval { int isbool; double v; } cval;
typedef struct cpar { yctx *c; const char *s; size_t n, i; char *err; size_t errsz; int failed; } cpar;

static void cp_ws(cpar *p)
{
    while (p->i < p->n && isspace((unsigned char)p->s[p->i]))
        p->i++;
}

static int cp_eat(cpar *p, const char *tok)
{
    cp_ws(p);
    size_t l = strlen(tok);
    if (p->i + l <= p->n && memcmp(p->s + p->i, tok, l) == 0) {
        p->i += l;
        return 1;
    }
    return 0;
}

static cval cp_fail(cpar *p, const char *msg)
{
    if (!p->failed)
        snprintf(p->err, p->errsz, "%s", msg);
    p->failed = 1;
    cval z = {0, 0};
    return z;
}

static cval cp_expr(cpar *p);

static cval cp_num(cpar *p, cval v)
{
    if (v.isbool)
        return cp_fail(p, "calc: a boolean cannot be used as a number");
    return v;
}

/* min max mod pow (two arguments) and sqrt floor ceil (one), as spruce registers them with govaluate. */
static cval calc_func(cpar *p, const char *id, size_t il, const cval *a, int na)
{
    static const char *const two[] = {"min", "max", "mod", "pow"};
    static const char *const one[] = {"sqrt", "floor", "ceil"};
    char m[128];
    cval r = {0, 0};
    for (int i = 0; i < 4; i++)
        if (word_is(id, il, two[i])) {
            if (na != 2 || a[0].isbool || a[1].isbool) {
                snprintf(m, sizeof m, "%s function expects two arguments of type float64", two[i]);
                return cp_fail(p, m);
            }
            r.v = i == 0 ? fmin(a[0].v, a[1].v) : i == 1 ? fmax(a[0].v, a[1].v)
                : i == 2 ? fmod(a[0].v, a[1].v) : pow(a[0].v, a[1].v);
            return r;
        }
    for (int i = 0; i < 3; i++)
        if (word_is(id, il, one[i])) {
            if (na != 1 || a[0].isbool) {
                snprintf(m, sizeof m, "%s function expects one argument of type float64", one[i]);
                return cp_fail(p, m);
            }
            r.v = i == 0 ? sqrt(a[0].v) : i == 1 ? floor(a[0].v) : ceil(a[0].v);
            return r;
        }
    snprintf(m, sizeof m, "calc: unknown function %.*s/%d", (int)il, id, na);
    return cp_fail(p, m);
}

static cval cp_primary(cpar *p)
{
    cp_ws(p);
    cval r = {0, 0};
    if (p->failed || p->i >= p->n)
        return cp_fail(p, "calc: unexpected end of expression");
    char ch = p->s[p->i];
    if (ch == '(') {
        p->i++;
        r = cp_expr(p);
        if (!cp_eat(p, ")"))
            return cp_fail(p, "calc: missing )");
        return r;
    }
    if (isdigit((unsigned char)ch) || ch == '.') {
        char *end;
        char tmp[64];
        size_t l = 0;
        while (p->i + l < p->n && l < 63 && (isalnum((unsigned char)p->s[p->i + l]) || p->s[p->i + l] == '.'
               || ((p->s[p->i + l] == '-' || p->s[p->i + l] == '+') && l && (p->s[p->i + l - 1] == 'e'
                                                                              || p->s[p->i + l - 1] == 'E'))))
            l++;
        memcpy(tmp, p->s + p->i, l);
        tmp[l] = 0;
        r.v = strtod(tmp, &end);
        if (*end)
            return cp_fail(p, "calc: bad number");
        p->i += l;
        return r;
    }
    if (isalpha((unsigned char)ch) || ch == '_') {
        size_t st = p->i;
        int dotted = 0;
        while (p->i < p->n && (isalnum((unsigned char)p->s[p->i]) || p->s[p->i] == '_' || p->s[p->i] == '.'
                               || p->s[p->i] == '[' || p->s[p->i] == ']'
                               || (p->s[p->i] == '-' && dotted && p->i + 1 < p->n && isalpha((unsigned char)p->s[p->i + 1]))))
            if (p->s[p->i++] == '.')
                dotted = 1;
        const char *id = p->s + st;
        size_t il = p->i - st;
        if (cp_eat(p, "(")) {
            cval a[8];
            int na = 0;
            if (!cp_eat(p, ")")) {
                do {
                    if (na < 8)
                        a[na++] = cp_num(p, cp_expr(p));
                    else
                        return cp_fail(p, "calc: too many function arguments");
                } while (cp_eat(p, ","));
                if (!cp_eat(p, ")"))
                    return cp_fail(p, "calc: missing ) after function arguments");
            }
            if (p->failed)
                return r;
            return calc_func(p, id, il, a, na);
        }
        if (word_is(id, il, "true") || word_is(id, il, "false")) {
            r.isbool = 1;
            r.v = word_is(id, il, "true");
            return r;
        }
        char e2[400];
        ynode *v = resolve(p->c, id, il, e2, sizeof e2, 0);
        char m[600];
        if (!v)
            return cp_fail(p, e2);
        switch (v->t) {
        case T_INT: r.v = (double)v->u.i; return r;
        case T_FLOAT: {
            char six[64];   /* spruce substitutes floats into the expression with %f */
            snprintf(six, sizeof six, "%f", v->u.f);
            r.v = strtod(six, NULL);
            return r;
        }
        case T_NULL:
            snprintf(m, sizeof m, "path %.*s references a nil value, which cannot be used in calculations", (int)il, id);
            return cp_fail(p, m);
        default:
            snprintf(m, sizeof m, "path %.*s is of type %s, which cannot be used in calculations", (int)il, id,
                     type_name(v));
            return cp_fail(p, m);
        }
    }
    char m[64];
    snprintf(m, sizeof m, "calc: unexpected '%c' in expression", ch);
    return cp_fail(p, m);
}

static cval cp_unary(cpar *p)
{
    if (cp_eat(p, "-")) {
        cval v = cp_num(p, cp_unary(p));
        v.v = -v.v;
        return v;
    }
    if (cp_eat(p, "!")) {
        cp_ws(p);
        if (p->i < p->n && p->s[p->i] == '=')
            return cp_fail(p, "calc: unexpected =");
        cval v = cp_unary(p);
        if (!v.isbool)
            return cp_fail(p, "calc: ! needs a boolean");
        v.v = !v.v;
        return v;
    }
    cp_eat(p, "+");
    return cp_primary(p);
}

static cval cp_pow(cpar *p)
{
    cval a = cp_unary(p);
    if (cp_eat(p, "**")) {
        cval b = cp_num(p, cp_pow(p));
        a = cp_num(p, a);
        a.v = pow(a.v, b.v);
    }
    return a;
}

static cval cp_mul(cpar *p)
{
    cval a = cp_pow(p);
    for (;;) {
        cp_ws(p);
        if (p->i + 1 < p->n && p->s[p->i] == '*' && p->s[p->i + 1] == '*')
            break;
        char op = p->i < p->n ? p->s[p->i] : 0;
        if (op != '*' && op != '/' && op != '%')
            break;
        p->i++;
        cval b = cp_num(p, cp_pow(p));
        a = cp_num(p, a);
        a.v = op == '*' ? a.v * b.v : op == '/' ? a.v / b.v : fmod(a.v, b.v);
    }
    return a;
}

static cval cp_add(cpar *p)
{
    cval a = cp_mul(p);
    for (;;) {
        cp_ws(p);
        char op = p->i < p->n ? p->s[p->i] : 0;
        if (op != '+' && op != '-')
            break;
        p->i++;
        cval b = cp_num(p, cp_mul(p));
        a = cp_num(p, a);
        a.v = op == '+' ? a.v + b.v : a.v - b.v;
    }
    return a;
}

static cval cp_cmp(cpar *p)
{
    cval a = cp_add(p);
    static const char *const ops[] = {"==", "!=", "<=", ">=", "<", ">"};
    for (int i = 0; i < 6; i++) {
        if (cp_eat(p, ops[i])) {
            cval b = cp_add(p);
            cval r = {1, 0};
            switch (i) {
            case 0: r.v = a.v == b.v && a.isbool == b.isbool; break;
            case 1: r.v = !(a.v == b.v && a.isbool == b.isbool); break;
            case 2: r.v = a.v <= b.v; break;
            case 3: r.v = a.v >= b.v; break;
            case 4: r.v = a.v < b.v; break;
            default: r.v = a.v > b.v; break;
            }
            return r;
        }
    }
    return a;
}

/* A left-associative boolean level: operand (op operand)*, op "&&" or "||". */
static cval cp_logic(cpar *p, cval (*operand)(cpar *), int is_or)
{
    cval a = operand(p);
    while (cp_eat(p, is_or ? "||" : "&&")) {
        cval b = operand(p);
        if (!a.isbool || !b.isbool)
            return cp_fail(p, is_or ? "calc: || needs booleans" : "calc: && needs booleans");
        a.v = is_or ? (a.v || b.v) : (a.v && b.v);
    }
    return a;
}

static cval cp_and(cpar *p) { return cp_logic(p, cp_cmp, 0); }

static cval cp_or(cpar *p) { return cp_logic(p, cp_and, 1); }

static cval cp_expr(cpar *p)
{
    cval a = cp_or(p);
    if (cp_eat(p, "?")) {
        cval x = cp_expr(p);
        if (!cp_eat(p, ":"))
            return cp_fail(p, "calc: missing : in ?: expression");
        cval y = cp_expr(p);
        if (!a.isbool)
            return cp_fail(p, "calc: ?: needs a boolean condition");
        return a.v ? x : y;
    }
    return a;
}

typedef struct namectx { ybuf *b; int n; } namectx;

static void calc_name_cb(yctx *c, void *ud, const char *s, size_t n, int dotted, int func)
{
    namectx *nc = ud;
    if (dotted || func || word_is(s, n, "true") || word_is(s, n, "false"))
        return;
    if (nc->n++)
        buf_add(c, nc->b, ", ", 2);
    buf_add(c, nc->b, s, n);
}

static int op_calc(yctx *c, yop *op, ynode **out, char *err, size_t errsz)
{
    NEED(op->nargs == 1, "calc operator only expects one argument containing the expression");
    atok *t = &op->args[0].alt[0];
    NEED(op->args[0].nalt == 1 && t->kind == A_STR,
         "calc operator argument is suppose to be a quoted mathematical expression (type Literal)");
    ybuf *b = &c->tmp;
    b->n = 0;
    buf_add(c, b, "", 0);
    namectx nc = {b, 0};
    calc_idents(c, t->s, t->n, calc_name_cb, &nc);
    NEED(nc.n == 0, "calc operator does not support named variables in expression: %s", b->p);
    cpar p = {c, t->s, t->n, 0, err, errsz, 0};
    cval v = cp_expr(&p);
    if (p.failed)
        return 0;
    cp_ws(&p);
    NEED(p.i == p.n, "calc: unexpected text at position %zu in expression", p.i + 1);
    if (v.isbool)
        *out = nbool(c, v.v != 0, op->node);
    else if (isfinite(v.v) && v.v == floor(v.v) && fabs(v.v) < 9.2e18)
        *out = nint(c, (lua_Integer)v.v, op->node);
    else
        *out = nfloat(c, v.v, op->node);
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
        ynode *cp = ncopy(c, v, NULL);
        acc = acc ? merge_obj(c, acc, cp) : cp;
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
    path_pop(c, 0);
    if (dot)
        buf_add(c, &c->path, op->path, (size_t)(dot - op->path));
    ynode *res = nnew(c, T_MAP, m);
    int save = c->fallback_append;
    c->fallback_append = 1;
    for (size_t i = 0; i < m->u.c.n; i++) {
        if ((long)i == self) {
            for (size_t j = 0; j < acc->u.c.n; j++)
                if (map_find(c, m, acc->u.c.k[j]) < 0)
                    map_append(c, res, acc->u.c.k[j], acc->u.c.v[j]);
            continue;
        }
        long j = map_find(c, acc, m->u.c.k[i]);
        ynode *v = m->u.c.v[i];
        if (j >= 0) {
            size_t old = path_push_key(c, m->u.c.k[i]);
            v = merge_obj(c, acc->u.c.v[j], v);
            path_pop(c, old);
        }
        map_append(c, res, m->u.c.k[i], v);
    }
    c->fallback_append = save;
    path_pop(c, 0);
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
    return astrdup(c, op->node->u.s.p, n);
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
        yerr_add(c, phase == PH_PARAM ? "yaml.param" : "yaml.eval", op->node, op->path, op_text(c, op), "%s", err);
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
    buf_add(c, b, "cycle detected in operator data-flow graph:", 43);
    int shown = 0;
    for (int i = 0; i < o->n && shown < 8; i++)
        if (o->v[i].run && !done[i]) {
            buf_add(c, b, " $.", 3);
            buf_adds(c, b, o->v[i].path);
            shown++;
        }
    const ynode *at = NULL;
    for (int i = 0; i < o->n; i++)
        if (o->v[i].run && !done[i]) {
            at = o->v[i].node;
            break;
        }
    yerr_add(c, "yaml.cycle", at, NULL, NULL, "%s", b->p);
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
    int *cnt = aalloc(c, sizeof(int) * (size_t)o.n);
    memset(cnt, 0, sizeof(int) * (size_t)o.n);
    for (int i = 0; i < o.n; i++)
        if (o.v[i].run)
            for (int d = 0; d < o.v[i].ndeps; d++) {
                cnt[o.v[i].deps[d]]++;
                o.v[i].indeg++;
            }
    for (int i = 0; i < o.n; i++) {
        o.v[i].users = aalloc(c, sizeof(int) * (size_t)(cnt[i] + 1));
        o.v[i].nusers = 0;
    }
    for (int i = 0; i < o.n; i++)
        if (o.v[i].run)
            for (int d = 0; d < o.v[i].ndeps; d++) {
                yop *dep = &o.v[o.v[i].deps[d]];
                dep->users[dep->nusers++] = i;
            }
    int *heap = aalloc(c, sizeof(int) * (size_t)o.n);
    int *done = aalloc(c, sizeof(int) * (size_t)o.n);
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
            int *done = aalloc(c, sizeof(int) * (size_t)o.n);
            for (int i = 0; i < o.n; i++)
                done[i] = !o.v[i].run;
            report_cycle(c, &o, done);
            return;
        }
        if (!run_op(c, &o.v[pick], PH_INJECT)) {
            if (nfailed == capfailed) {
                capfailed = capfailed ? capfailed * 2 : 8;
                ynode **nf = aalloc(c, sizeof(ynode *) * (size_t)capfailed);
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
    ynode **targets = aalloc(c, sizeof(ynode *) * (total + 1));
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
    ynode **stack = aalloc(c, sizeof(ynode *) * 64);
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
                    map_remove(n, i);
                else
                    seq_remove(n, i);
                continue;
            }
            if (v->t == T_MAP || v->t == T_SEQ) {
                if (sp == scap) {
                    ynode **ns = aalloc(c, sizeof(ynode *) * scap * 2);
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
        a = map_gets(sc->c, (ynode *)a, sc->key);
        b = map_gets(sc->c, (ynode *)b, sc->key);
    }
    if ((a->t == T_INT || a->t == T_FLOAT) && (b->t == T_INT || b->t == T_FLOAT))
        return key_cmp(&a, &b);
    char ta[64], tb[64];
    size_t la, lb;
    const char *sa = scalar_text(a, ta, sizeof ta, &la), *sb = scalar_text(b, tb, sizeof tb, &lb);
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
            yerr_add(c, "yaml.sort", l, path, NULL,
                     "$.%s is a list with different types (not a list with homogeneous entry types)", path);
            continue;
        }
        if (kind == T_SEQ) {
            yerr_add(c, "yaml.sort", l, path, NULL,
                     "$.%s is a list with list entries (not a list with maps, strings or numbers)", path);
            continue;
        }
        if (kind == T_MAP) {
            for (size_t i = 0; i < l->u.c.n && !bad; i++) {
                ynode *kv = map_gets(c, l->u.c.v[i], key);
                bad = !kv || !is_scalar(kv);
            }
            if (bad) {
                yerr_add(c, "yaml.sort", l, path, NULL,
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
    ynode *out = nnew(c, T_MAP, c->root);
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
                yerr_add(c, "yaml.cherry_pick", NULL, NULL, NULL,
                         "`$.%s` could not be found in the datastructure", have);
                ok = 0;
                break;
            }
        }
        if (!ok)
            continue;
        ynode *val = ncopy(c, chain[k], NULL);
        for (int i = k - 1; i >= 1; i--) {
            if (chain[i]->t == T_SEQ) {
                ynode *l = nnew(c, T_SEQ, val);
                seq_push(c, l, val);
                val = l;
            } else {
                ynode *m = nnew(c, T_MAP, val);
                map_append(c, m, nstr(c, seg[i].s, seg[i].n, NULL), val);
                val = m;
            }
        }
        ynode *key = nstr(c, seg[0].s, seg[0].n, NULL);
        long j = map_find(c, out, key);
        if (j < 0) {
            map_append(c, out, key, val);
        } else {
            path_pop(c, 0);
            path_push(c, seg[0].s, seg[0].n);
            out->u.c.v[j] = merge_obj(c, val, out->u.c.v[j]);
            path_pop(c, 0);
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
        yerr_add(c, "yaml.param", NULL, path, NULL, "bad parameter path");
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
                map_append(c, cur, nstr(c, seg[i].s, seg[i].n, NULL), val);
            else
                yerr_add(c, "yaml.param", NULL, path, NULL, "cannot set a parameter here (no such list entry)");
            return;
        }
        if (!next || (next->t != T_MAP && next->t != T_SEQ)) {
            if (cur->t != T_MAP) {
                yerr_add(c, "yaml.param", NULL, path, NULL, "cannot set a parameter here (no such list entry)");
                return;
            }
            ynode *m = nnew(c, T_MAP, NULL);
            if (next)
                cur->u.c.v[ix] = m;
            else
                map_append(c, cur, nstr(c, seg[i].s, seg[i].n, NULL), m);
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
    const char **v = aalloc(c, sizeof(char *) * (size_t)(n + 1));
    for (int i = 1; i <= n; i++) {
        lua_rawgeti(L, -1, i);
        size_t len;
        const char *s = lua_tolstring(L, -1, &len);
        if (!s)
            luaL_error(L, "yaml.merge: option '%s' must list strings", name);
        v[i - 1] = astrdup(c, s, len);
        lua_pop(L, 1);
    }
    lua_pop(L, 1);
    *out = v;
    return n;
}

/* Stack (inner frame): [ctx, errtab, docs, opts] -> [..., value] */
static int merge_main(yctx *c, int docs, int opts)
{
    lua_State *L = c->L;
    if (lua_isnoneornil(L, opts))
        opts = 0;
    yidx x = push_refs(L);
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

    ynode *root = nnew(c, T_MAP, NULL);
    c->root = root;
    int ndocs = (int)lua_rawlen(L, docs);
    for (int i = 1; i <= ndocs; i++) {
        char label[32];
        snprintf(label, sizeof label, "<doc %d>", i);
        unsigned short file = ctx_addfile(c, i <= nnames ? names[i - 1] : label);
        lua_rawgeti(L, docs, i);
        ynode *d;
        if (lua_type(L, -1) == LUA_TSTRING) {
            size_t len;
            const char *text = lua_tolstring(L, -1, &len);
            d = load_document(c, text, len, file);
        } else {
            path_pop(c, 0);
            d = from_lua(c, lua_gettop(L), 0, x, file);
        }
        lua_pop(L, 1);
        if (!d || d->t == T_NULL)
            continue;
        if (d->t != T_MAP) {
            yerr_add(c, "yaml.merge", d, NULL, NULL, "root of document %d must be a map, not a %s", i,
                     d->t == T_SEQ ? "list" : "scalar");
            continue;
        }
        path_pop(c, 0);
        merge_obj(c, root, d);
    }
    if (c->nerrors)
        yraise(c);
    if (opts && lua_getfield(L, opts, "params") == LUA_TTABLE) {
        int pidx = lua_gettop(L);
        lua_pushnil(L);
        while (lua_next(L, pidx)) {
            if (lua_type(L, -2) != LUA_TSTRING)
                luaL_error(L, "yaml.merge: params keys must be dotted paths (strings)");
            const char *k = lua_tostring(L, -2);
            path_pop(c, 0);
            set_param(c, astrdup(c, k, strlen(k)), from_lua(c, lua_gettop(L), 0, x, 0));
            lua_pop(L, 1);
        }
        lua_pop(L, 1);
    } else if (opts) {
        lua_pop(L, 1);
    }
    if (c->nerrors)
        yraise(c);
    if (!skip_eval) {
        inject_phase(c);
        if (c->nerrors)
            yraise(c);
        param_phase(c);
        if (c->nerrors)
            yraise(c);
        eval_phase(c, picks, npicks);
        if (c->nerrors)
            yraise(c);
    }
    prune_all(c, prunes, nprunes);
    sort_all(c);
    if (c->nerrors)
        yraise(c);
    ynode *result = c->root;
    if (npicks) {
        result = cherry_pick(c, picks, npicks);
        if (c->nerrors)
            yraise(c);
    }
    push_node(c, result, x);
    return 1;
}

#endif
