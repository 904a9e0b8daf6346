/*
 * forge.yaml — private: spruce-style document merge (maps deep, arrays by the
 * default rule or by array operators, prune/sort marks). See YAML-MERGE.md §1–2.
 * Included only by runtime/yaml.c.
 */
#ifndef FORGE_YAML_MERGE_H
#define FORGE_YAML_MERGE_H

#include "yaml_io.h"

/* ------------------------------------------------------------------------- */
/* marks: (( prune )) and (( sort [by KEY] )) remembered by path              */
/* ------------------------------------------------------------------------- */

static void mark_add(yctx *c, const char *path, int sort, const char *key, size_t keylen)
{
    for (size_t i = 0; i < c->nmarks; i++)
        if (c->marks[i].sort == sort && strcmp(c->marks[i].path, path) == 0)
            return;
    if (c->nmarks == c->capmarks) {
        size_t cap = c->capmarks ? c->capmarks * 2 : 16;
        ymark *m = aalloc(c, sizeof(ymark) * cap);
        if (c->nmarks)
            memcpy(m, c->marks, sizeof(ymark) * c->nmarks);
        c->marks = m;
        c->capmarks = cap;
    }
    c->marks[c->nmarks].path = astrdup(c, path, strlen(path));
    c->marks[c->nmarks].sort = sort;
    c->marks[c->nmarks].key = key ? astrdup(c, key, keylen) : NULL;
    c->nmarks++;
}

/* ------------------------------------------------------------------------- */
/* operator text helpers                                                      */
/* ------------------------------------------------------------------------- */

/* If s is "(( ... ))" (whitespace allowed inside), set the inner text (trimmed). */
static int op_inner(const ynode *n, const char **in, size_t *inlen)
{
    if (!n || n->t != T_STR || n->u.s.n < 4)
        return 0;
    const char *s = n->u.s.p;
    size_t len = n->u.s.n;
    if (s[0] != '(' || s[1] != '(' || s[len - 1] != ')' || s[len - 2] != ')')
        return 0;
    const char *a = s + 2, *b = s + len - 2;
    while (a < b && isspace((unsigned char)*a))
        a++;
    while (b > a && isspace((unsigned char)b[-1]))
        b--;
    *in = a;
    *inlen = (size_t)(b - a);
    return 1;
}

/* Split inner text into whitespace-separated words (quotes kept). Returns the count. */
static int op_words(const char *s, size_t n, const char **w, size_t *wl, int max)
{
    int k = 0;
    size_t i = 0;
    while (i < n) {
        while (i < n && isspace((unsigned char)s[i]))
            i++;
        if (i >= n)
            break;
        size_t st = i;
        if (s[i] == '"') {
            i++;
            while (i < n && s[i] != '"') {
                if (s[i] == '\\' && i + 1 < n)
                    i++;
                i++;
            }
            if (i < n)
                i++;
        } else {
            while (i < n && !isspace((unsigned char)s[i]))
                i++;
        }
        if (k < max) {
            w[k] = s + st;
            wl[k] = i - st;
        }
        k++;
    }
    return k;
}

static int word_is(const char *w, size_t wl, const char *lit)
{
    return strlen(lit) == wl && memcmp(w, lit, wl) == 0;
}

static int is_prune_op(const ynode *n)
{
    const char *in;
    size_t len;
    return op_inner(n, &in, &len) && word_is(in, len, "prune");
}

/* (( sort )) or (( sort by KEY )); sets key (NULL for the default). */
static int is_sort_op(const ynode *n, const char **key, size_t *keylen)
{
    const char *in, *w[4];
    size_t len, wl[4];
    if (!op_inner(n, &in, &len))
        return 0;
    int k = op_words(in, len, w, wl, 4);
    if (k == 1 && word_is(w[0], wl[0], "sort")) {
        *key = NULL;
        *keylen = 0;
        return 1;
    }
    if (k == 3 && word_is(w[0], wl[0], "sort") && word_is(w[1], wl[1], "by")) {
        *key = w[2];
        *keylen = wl[2];
        return 1;
    }
    return 0;
}

static int is_merge_misuse(const ynode *n)
{
    const char *in;
    size_t len;
    if (!op_inner(n, &in, &len))
        return 0;
    return len >= 5 && memcmp(in, "merge", 5) == 0 && (len == 5 || isspace((unsigned char)in[5]));
}

enum { AOP_NONE, AOP_APPEND, AOP_PREPEND, AOP_INLINE, AOP_REPLACE, AOP_MERGE, AOP_INSERT, AOP_DELETE };

typedef struct aop {
    int kind;
    int after;          /* insert after (1) / before (0) */
    int has_idx;
    long idx;
    const char *key;    /* merge on / insert / delete key */
    size_t keylen;
    const char *name;   /* insert / delete NAME (quotes stripped) */
    size_t namelen;
    const ynode *src;
} aop;

static int is_int_word(const char *w, size_t wl)
{
    size_t i = 0;
    if (i < wl && w[i] == '-')
        i++;
    if (i >= wl)
        return 0;
    for (; i < wl; i++)
        if (!isdigit((unsigned char)w[i]))
            return 0;
    return 1;
}

static void unquote(const char **w, size_t *wl)
{
    if (*wl >= 2 && (*w)[0] == '"' && (*w)[*wl - 1] == '"') {
        (*w)++;
        *wl -= 2;
    }
}

/* Is this list entry an array operator? Fills op. */
static int parse_aop(const ynode *n, aop *op)
{
    const char *in, *w[6];
    size_t len, wl[6];
    memset(op, 0, sizeof *op);
    op->src = n;
    if (!op_inner(n, &in, &len))
        return 0;
    int k = op_words(in, len, w, wl, 6);
    if (k == 0)
        return 0;
    if (k == 1) {
        if (word_is(w[0], wl[0], "append")) op->kind = AOP_APPEND;
        else if (word_is(w[0], wl[0], "prepend")) op->kind = AOP_PREPEND;
        else if (word_is(w[0], wl[0], "inline")) op->kind = AOP_INLINE;
        else if (word_is(w[0], wl[0], "replace")) op->kind = AOP_REPLACE;
        else if (word_is(w[0], wl[0], "merge")) op->kind = AOP_MERGE;
        if (op->kind == AOP_MERGE) {
            op->key = "name";
            op->keylen = 4;
        }
        return op->kind != AOP_NONE;
    }
    if (word_is(w[0], wl[0], "merge") && k == 3 && word_is(w[1], wl[1], "on")) {
        op->kind = AOP_MERGE;
        op->key = w[2];
        op->keylen = wl[2];
        return 1;
    }
    if (word_is(w[0], wl[0], "insert") && (k == 3 || k == 4)
        && (word_is(w[1], wl[1], "after") || word_is(w[1], wl[1], "before"))) {
        op->kind = AOP_INSERT;
        op->after = word_is(w[1], wl[1], "after");
        if (k == 3 && is_int_word(w[2], wl[2])) {
            op->has_idx = 1;
            op->idx = strtol(w[2], NULL, 10);
            return 1;
        }
        op->key = k == 4 ? w[2] : "name";
        op->keylen = k == 4 ? wl[2] : 4;
        op->name = w[k - 1];
        op->namelen = wl[k - 1];
        unquote(&op->name, &op->namelen);
        return 1;
    }
    if (word_is(w[0], wl[0], "delete") && (k == 2 || k == 3)) {
        op->kind = AOP_DELETE;
        if (k == 2 && is_int_word(w[1], wl[1])) {
            op->has_idx = 1;
            op->idx = strtol(w[1], NULL, 10);
            return 1;
        }
        op->key = k == 3 ? w[1] : "name";
        op->keylen = k == 3 ? wl[1] : 4;
        op->name = w[k - 1];
        op->namelen = wl[k - 1];
        unquote(&op->name, &op->namelen);
        return 1;
    }
    return 0;
}

static const char *type_name(const ynode *n)
{
    switch (n ? n->t : T_NULL) {
    case T_STR: return "string";
    case T_INT: return "int";
    case T_FLOAT: return "float64";
    case T_BOOL: return "bool";
    case T_MAP: return "map";
    case T_SEQ: return "slice";
    default: return "nil";
    }
}

/* ------------------------------------------------------------------------- */
/* merge                                                                      */
/* ------------------------------------------------------------------------- */

static ynode *merge_obj(yctx *c, ynode *orig, ynode *nw);

static ynode *map_getk(yctx *c, ynode *m, const char *key, size_t keylen)
{
    if (!m || m->t != T_MAP)
        return NULL;
    long i = map_finds(c, m, key, keylen);
    return i < 0 ? NULL : m->u.c.v[i];
}

/*
 * Can `list` be merged by `key`? With report set, record why not (explicit merge);
 * `who` is "original" or "new".
 */
static int keyable(yctx *c, ynode *list, const char *key, size_t keylen, const char *who, int report)
{
    for (size_t i = 0; i < list->u.c.n; i++) {
        ynode *e = list->u.c.v[i];
        const char *why = NULL;
        char tmp[256];
        if (e->t != T_MAP) {
            snprintf(tmp, sizeof tmp, "%s object is a %s, not a map - cannot merge by key", who, type_name(e));
            why = tmp;
        } else {
            ynode *kv = map_getk(c, e, key, keylen);
            if (!kv) {
                snprintf(tmp, sizeof tmp, "%s object does not contain the key '%.*s' - cannot merge by key",
                         who, (int)keylen, key);
                why = tmp;
            } else if (kv->t == T_MAP || kv->t == T_SEQ) {
                snprintf(tmp, sizeof tmp, "%s object's key '%.*s' cannot have a value which is a hash or "
                         "sequence - cannot merge by key", who, (int)keylen, key);
                why = tmp;
            }
        }
        if (why) {
            if (report) {
                size_t old = path_push_idx(c, i);
                yerr_add(c, "yaml.merge", e, path_str(c), NULL, "%s", why);
                path_pop(c, old);
            }
            return 0;
        }
    }
    return 1;
}

static void merge_by_key(yctx *c, ynode *orig, ynode *piece, const char *key, size_t keylen)
{
    size_t norig = orig->u.c.n;
    for (size_t i = 0; i < piece->u.c.n; i++) {
        ynode *e = piece->u.c.v[i];
        ynode *kv = map_getk(c, e, key, keylen);
        size_t old = path_push_key(c, kv);
        size_t j;
        for (j = 0; j < norig; j++) {
            ynode *ov = map_getk(c, orig->u.c.v[j], key, keylen);
            if (ov && scalar_eq(ov, kv))
                break;
        }
        if (j < norig)
            orig->u.c.v[j] = merge_obj(c, orig->u.c.v[j], e);
        else
            seq_push(c, orig, merge_obj(c, NULL, e));
        path_pop(c, old);
    }
}

static void merge_inline(yctx *c, ynode *orig, ynode *piece)
{
    for (size_t i = 0; i < piece->u.c.n; i++) {
        size_t old = path_push_idx(c, i);
        if (i < orig->u.c.n)
            orig->u.c.v[i] = merge_obj(c, orig->u.c.v[i], piece->u.c.v[i]);
        else
            seq_push(c, orig, merge_obj(c, NULL, piece->u.c.v[i]));
        path_pop(c, old);
    }
}

static void merge_append(yctx *c, ynode *orig, ynode *piece)
{
    for (size_t i = 0; i < piece->u.c.n; i++) {
        size_t old = path_push_idx(c, orig->u.c.n);
        seq_push(c, orig, merge_obj(c, NULL, piece->u.c.v[i]));
        path_pop(c, old);
    }
}

static void merge_insert_at(yctx *c, ynode *orig, ynode *piece, size_t at)
{
    for (size_t i = 0; i < piece->u.c.n; i++) {
        size_t old = path_push_idx(c, at + i);
        seq_insert(c, orig, at + i, merge_obj(c, NULL, piece->u.c.v[i]));
        path_pop(c, old);
    }
}

/* Printed form of a scalar equals (w, wl)? */
static int scalar_text_is(const ynode *n, const char *w, size_t wl)
{
    if (!n || !is_scalar(n))
        return 0;
    char tmp[64];
    size_t len;
    const char *s = scalar_text(n, tmp, sizeof tmp, &len);
    return len == wl && memcmp(s, w, wl) == 0;
}

static void apply_piece(yctx *c, ynode *orig, const aop *op, ynode *piece)
{
    const ynode *at = op->src ? op->src : (piece->u.c.n ? piece->u.c.v[0] : orig);
    switch (op->kind) {
    case AOP_NONE:
        if (piece->u.c.n == 0)
            return;
        if (keyable(c, orig, "name", 4, "original", 0) && keyable(c, piece, "name", 4, "new", 0))
            merge_by_key(c, orig, piece, "name", 4);
        else if (c->fallback_append)
            merge_append(c, orig, piece);
        else
            merge_inline(c, orig, piece);
        return;
    case AOP_INLINE:
        merge_inline(c, orig, piece);
        return;
    case AOP_APPEND:
        merge_append(c, orig, piece);
        return;
    case AOP_PREPEND:
        merge_insert_at(c, orig, piece, 0);
        return;
    case AOP_REPLACE:
        orig->u.c.n = 0;
        merge_append(c, orig, piece);
        return;
    case AOP_MERGE: {
        int ok = keyable(c, orig, op->key, op->keylen, "original", 1);
        ok = keyable(c, piece, op->key, op->keylen, "new", 1) && ok;
        if (ok)
            merge_by_key(c, orig, piece, op->key, op->keylen);
        return;
    }
    case AOP_INSERT: {
        long pos;
        if (op->has_idx) {
            pos = op->idx + (op->after ? 1 : 0);
            if (op->idx < 0 || pos > (long)orig->u.c.n) {
                yerr_add(c, "yaml.merge", at, path_str(c), NULL,
                         "unable to modify the list, because specified index %ld is out of bounds", pos);
                return;
            }
        } else {
            if (!keyable(c, orig, op->key, op->keylen, "original", 1))
                return;
            pos = -1;
            for (size_t j = 0; j < orig->u.c.n; j++) {
                if (scalar_text_is(map_getk(c, orig->u.c.v[j], op->key, op->keylen), op->name, op->namelen)) {
                    pos = (long)j + (op->after ? 1 : 0);
                    break;
                }
            }
            if (pos < 0) {
                yerr_add(c, "yaml.merge", at, path_str(c), NULL,
                         "unable to find specified modification point with '%.*s: %.*s'",
                         (int)op->keylen, op->key, (int)op->namelen, op->name);
                return;
            }
        }
        merge_insert_at(c, orig, piece, (size_t)pos);
        return;
    }
    case AOP_DELETE: {
        if (piece->u.c.n) {
            yerr_add(c, "yaml.merge", piece->u.c.v[0], path_str(c), NULL,
                     "item in array directly after (( delete ... )) operation does not seem to be "
                     "another array operation");
            return;
        }
        if (op->has_idx) {
            if (op->idx < 0 || op->idx >= (long)orig->u.c.n) {
                yerr_add(c, "yaml.merge", at, path_str(c), NULL,
                         "unable to modify the list, because specified index %ld is out of bounds", op->idx);
                return;
            }
            seq_remove(orig, (size_t)op->idx);
            return;
        }
        for (size_t j = 0; j < orig->u.c.n; j++) {
            ynode *e = orig->u.c.v[j];
            if ((e->t == T_MAP && scalar_text_is(map_getk(c, e, op->key, op->keylen), op->name, op->namelen))
                || (e->t == T_STR && e->u.s.n == op->namelen && memcmp(e->u.s.p, op->name, op->namelen) == 0)) {
                seq_remove(orig, j);
                return;
            }
        }
        yerr_add(c, "yaml.merge", at, path_str(c), NULL,
                 "unable to find specified modification point with '%.*s: %.*s'",
                 (int)op->keylen, op->key, (int)op->namelen, op->name);
        return;
    }
    }
}

/* Merge the list nw into orig (a sequence, modified in place). */
static void merge_seq(yctx *c, ynode *orig, ynode *nw)
{
    aop op;
    memset(&op, 0, sizeof op);
    ynode piece;
    memset(&piece, 0, sizeof piece);
    piece.t = T_SEQ;
    size_t start = 0;
    for (size_t i = 0; i <= nw->u.c.n; i++) {
        aop next;
        if (i < nw->u.c.n && !parse_aop(nw->u.c.v[i], &next))
            continue;
        piece.u.c.v = nw->u.c.v + start;
        piece.u.c.n = i - start;
        piece.u.c.cap = piece.u.c.n;
        apply_piece(c, orig, &op, &piece);
        if (i < nw->u.c.n)
            op = next;
        start = i + 1;
    }
}

static ynode *merge_obj(yctx *c, ynode *orig, ynode *nw)
{
    if (nw->t == T_STR) {
        const char *key;
        size_t keylen;
        if (is_prune_op(nw)) {
            mark_add(c, path_str(c), 0, NULL, 0);
            return orig ? orig : nw;
        }
        if (is_sort_op(nw, &key, &keylen)) {
            mark_add(c, path_str(c), 1, key, keylen);
            return orig ? orig : nw;
        }
        if (is_merge_misuse(nw)) {
            yerr_add(c, "yaml.merge", nw, path_str(c), NULL,
                     "inappropriate use of (( merge )) operator outside of a list (this is spruce, after all)");
            return orig ? orig : nw;
        }
        return nw;
    }
    if (nw->t == T_MAP) {
        ynode *m = orig && orig->t == T_MAP ? orig : nnew(c, T_MAP, nw);
        for (size_t i = 0; i < nw->u.c.n; i++) {
            ynode *k = nw->u.c.k[i];
            size_t old = path_push_key(c, k);
            long j = map_find(c, m, k);
            ynode *r = merge_obj(c, j >= 0 ? m->u.c.v[j] : NULL, nw->u.c.v[i]);
            j = map_find(c, m, k);
            if (j >= 0)
                m->u.c.v[j] = r;
            else
                map_append(c, m, k, r);
            path_pop(c, old);
        }
        return m;
    }
    if (nw->t == T_SEQ) {
        ynode *s = orig && orig->t == T_SEQ ? orig : nnew(c, T_SEQ, nw);
        merge_seq(c, s, nw);
        return s;
    }
    return nw;
}

#endif
