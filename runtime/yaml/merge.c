/*
 * forge.yaml, merge: spruce-style document merge (maps deep, arrays by the
 * default rule or by array operators, prune/sort marks). See YAML-MERGE.md §1–2.
 * Declarations in yaml_int.h.
 */
#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "yaml_int.h"

/* ------------------------------------------------------------------------- */
/* marks: (( prune )) and (( sort [by KEY] )) remembered by path              */
/* ------------------------------------------------------------------------- */

void fy_mark_add(yctx *c, const char *path, int sort, const char *key, size_t keylen)
{
    for (size_t i = 0; i < c->nmarks; i++)
        if (c->marks[i].sort == sort && strcmp(c->marks[i].path, path) == 0)
            return;
    if (c->nmarks == c->capmarks) {
        size_t cap = c->capmarks ? c->capmarks * 2 : 16;
        ymark *m = fy_aalloc(c, sizeof(ymark) * cap);
        if (c->nmarks)
            memcpy(m, c->marks, sizeof(ymark) * c->nmarks);
        c->marks = m;
        c->capmarks = cap;
    }
    c->marks[c->nmarks].path = fy_astrdup(c, path, strlen(path));
    c->marks[c->nmarks].sort = sort;
    c->marks[c->nmarks].key = key ? fy_astrdup(c, key, keylen) : NULL;
    c->nmarks++;
}

/* ------------------------------------------------------------------------- */
/* operator text helpers                                                      */
/* ------------------------------------------------------------------------- */

/* If s is "(( ... ))" (whitespace allowed inside), set the inner text (trimmed). */
int fy_op_inner(const ynode *n, const char **in, size_t *inlen)
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

int fy_word_is(const char *w, size_t wl, const char *lit)
{
    return strlen(lit) == wl && memcmp(w, lit, wl) == 0;
}

static int is_prune_op(const ynode *n)
{
    const char *in;
    size_t len;
    return fy_op_inner(n, &in, &len) && fy_word_is(in, len, "prune");
}

/* (( sort )) or (( sort by KEY )); sets key (NULL for the default). */
static int is_sort_op(const ynode *n, const char **key, size_t *keylen)
{
    const char *in, *w[4];
    size_t len, wl[4];
    if (!fy_op_inner(n, &in, &len))
        return 0;
    int k = op_words(in, len, w, wl, 4);
    if (k == 1 && fy_word_is(w[0], wl[0], "sort")) {
        *key = NULL;
        *keylen = 0;
        return 1;
    }
    if (k == 3 && fy_word_is(w[0], wl[0], "sort") && fy_word_is(w[1], wl[1], "by")) {
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
    if (!fy_op_inner(n, &in, &len))
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
    int keyed;          /* delete: KEY given explicitly */
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
/* An operator's list index; huge ones are clamped (strtol gives LONG_MAX, and pos + 1 must
   not overflow): any index past INT_MAX is out of range anyway. */
static long index_word(const char *w)
{
    long v = strtol(w, NULL, 10);
    return v > INT_MAX ? INT_MAX : v;
}

static int parse_aop(const ynode *n, aop *op)
{
    const char *in, *w[6];
    size_t len, wl[6];
    memset(op, 0, sizeof *op);
    op->src = n;
    if (!fy_op_inner(n, &in, &len))
        return 0;
    int k = op_words(in, len, w, wl, 6);
    if (k == 0)
        return 0;
    if (k == 1) {
        if (fy_word_is(w[0], wl[0], "append")) op->kind = AOP_APPEND;
        else if (fy_word_is(w[0], wl[0], "prepend")) op->kind = AOP_PREPEND;
        else if (fy_word_is(w[0], wl[0], "inline")) op->kind = AOP_INLINE;
        else if (fy_word_is(w[0], wl[0], "replace")) op->kind = AOP_REPLACE;
        else if (fy_word_is(w[0], wl[0], "merge")) op->kind = AOP_MERGE;
        if (op->kind == AOP_MERGE) {
            op->key = "name";
            op->keylen = 4;
        }
        return op->kind != AOP_NONE;
    }
    if (fy_word_is(w[0], wl[0], "merge") && k == 3 && fy_word_is(w[1], wl[1], "on")) {
        op->kind = AOP_MERGE;
        op->key = w[2];
        op->keylen = wl[2];
        return 1;
    }
    if (fy_word_is(w[0], wl[0], "insert") && (k == 3 || k == 4)
        && (fy_word_is(w[1], wl[1], "after") || fy_word_is(w[1], wl[1], "before"))) {
        op->kind = AOP_INSERT;
        op->after = fy_word_is(w[1], wl[1], "after");
        if (k == 3 && is_int_word(w[2], wl[2])) {
            if (w[2][0] == '-')
                return 0;   /* spruce: not an array operator, just data */
            op->has_idx = 1;
            op->idx = index_word(w[2]);
            return 1;
        }
        op->key = k == 4 ? w[2] : "name";
        op->keylen = k == 4 ? wl[2] : 4;
        op->name = w[k - 1];
        op->namelen = wl[k - 1];
        unquote(&op->name, &op->namelen);
        return 1;
    }
    if (fy_word_is(w[0], wl[0], "delete") && (k == 2 || k == 3)) {
        op->kind = AOP_DELETE;
        if (k == 2 && is_int_word(w[1], wl[1])) {
            op->has_idx = 1;
            op->idx = index_word(w[1]);
            return 1;
        }
        op->key = k == 3 ? w[1] : "name";
        op->keylen = k == 3 ? wl[1] : 4;
        op->keyed = k == 3;
        op->name = w[k - 1];
        op->namelen = wl[k - 1];
        unquote(&op->name, &op->namelen);
        return 1;
    }
    return 0;
}

const char *fy_type_name(const ynode *n)
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

static ynode *map_getk(yctx *c, ynode *m, const char *key, size_t keylen)
{
    if (!m || m->t != T_MAP)
        return NULL;
    long i = fy_map_finds(c, m, key, keylen);
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
        if (e->t == T_NULL) {
            snprintf(tmp, sizeof tmp, "%s object is nil - cannot merge by key", who);
            why = tmp;
        } else if (e->t != T_MAP) {
            snprintf(tmp, sizeof tmp, "%s object is a %s, not a map - cannot merge by key", who, fy_type_name(e));
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
                size_t old = fy_path_push_idx(c, i);
                fy_err_add(c, "yaml.merge", e, fy_path_str(c), NULL, "%s", why);
                fy_path_pop(c, old);
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
        size_t old = fy_path_push_key(c, kv);
        size_t j;
        for (j = 0; j < norig; j++) {
            ynode *ov = map_getk(c, orig->u.c.v[j], key, keylen);
            if (ov && fy_scalar_eq(ov, kv))
                break;
        }
        int later = 0;   /* spruce keys new entries by value: a later duplicate wins the match */
        for (size_t k = i + 1; j < norig && k < piece->u.c.n && !later; k++)
            later = fy_scalar_eq(map_getk(c, piece->u.c.v[k], key, keylen), kv);
        if (j < norig) {
            if (!later)
                orig->u.c.v[j] = fy_merge_obj(c, orig->u.c.v[j], e);
        } else
            fy_seq_push(c, orig, fy_merge_obj(c, NULL, e));
        fy_path_pop(c, old);
    }
}

static void merge_inline(yctx *c, ynode *orig, ynode *piece)
{
    for (size_t i = 0; i < piece->u.c.n; i++) {
        size_t old = fy_path_push_idx(c, i);
        if (i < orig->u.c.n)
            orig->u.c.v[i] = fy_merge_obj(c, orig->u.c.v[i], piece->u.c.v[i]);
        else
            fy_seq_push(c, orig, fy_merge_obj(c, NULL, piece->u.c.v[i]));
        fy_path_pop(c, old);
    }
}

static void merge_append(yctx *c, ynode *orig, ynode *piece)
{
    for (size_t i = 0; i < piece->u.c.n; i++) {
        size_t old = fy_path_push_idx(c, orig->u.c.n);
        fy_seq_push(c, orig, fy_merge_obj(c, NULL, piece->u.c.v[i]));
        fy_path_pop(c, old);
    }
}

static void merge_insert_at(yctx *c, ynode *orig, ynode *piece, size_t at)
{
    for (size_t i = 0; i < piece->u.c.n; i++) {
        size_t old = fy_path_push_idx(c, at + i);
        fy_seq_insert(c, orig, at + i, fy_merge_obj(c, NULL, piece->u.c.v[i]));
        fy_path_pop(c, old);
    }
}

/* Printed form of a scalar equals (w, wl)? */
int fy_scalar_text_is(const ynode *n, const char *w, size_t wl)
{
    if (!n || !fy_is_scalar(n))
        return 0;
    char tmp[64];
    size_t len;
    const char *s = fy_scalar_text(n, tmp, sizeof tmp, &len);
    return len == wl && memcmp(s, w, wl) == 0;
}

/* spruce's getIndexOfEntry: the first map whose KEY is the string NAME. */
static long entry_index(yctx *c, ynode *list, const char *key, size_t keylen, const char *name, size_t namelen)
{
    for (size_t j = 0; j < list->u.c.n; j++) {
        ynode *v = map_getk(c, list->u.c.v[j], key, keylen);
        if (v && v->t == T_STR && v->u.s.n == namelen && memcmp(v->u.s.p, name, namelen) == 0)
            return (long)j;
    }
    return -1;
}

/* $NAME from opts.env, or from the process environment when opts.env is absent. */
const char *fy_env_get(yctx *c, const char *name, size_t *len)
{
    *len = 0;
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

/* The default rule's key: $DEFAULT_ARRAY_MERGE_KEY when it is set (spruce's mergeArrayDefault), else name. */
static const char *default_merge_key(yctx *c, size_t *len)
{
    const char *k = fy_env_get(c, "DEFAULT_ARRAY_MERGE_KEY", len);
    if (!k || !*len) {
        *len = 4;
        return "name";
    }
    return k;
}

static int piece_default(yctx *c, ynode *orig, ynode *piece)
{
    if (piece->u.c.n == 0)
        return 1;
    size_t kl;
    const char *key = default_merge_key(c, &kl);
    if (keyable(c, orig, key, kl, "original", 0) && keyable(c, piece, key, kl, "new", 0))
        merge_by_key(c, orig, piece, key, kl);
    else if (c->fallback_append)
        merge_append(c, orig, piece);
    else
        merge_inline(c, orig, piece);
    return 1;
}

#define MERR(at, ...) do { fy_err_add(c, "yaml.merge", (at), fy_path_str(c), NULL, __VA_ARGS__); return 0; } while (0)

/* (( insert after|before ... )): by index, or next to the map whose KEY is NAME. */
static int piece_insert(yctx *c, ynode *orig, const aop *op, ynode *piece, const ynode *at)
{
    long pos;
    if (op->has_idx) {
        pos = op->idx + (op->after ? 1 : 0);
    } else {
        if (!keyable(c, orig, op->key, op->keylen, "original", 1) || !keyable(c, piece, op->key, op->keylen, "new", 1))
            return 0;
        for (size_t i = 0; i < piece->u.c.n; i++) {
            ynode *kv = map_getk(c, piece->u.c.v[i], op->key, op->keylen);
            if (kv->t == T_STR && entry_index(c, orig, op->key, op->keylen, kv->u.s.p, kv->u.s.n) > 0)
                MERR(at, "unable to insert, because new list entry '%.*s: %.*s' is detected multiple times",
                     (int)op->keylen, op->key, (int)kv->u.s.n, kv->u.s.p);
        }
        pos = entry_index(c, orig, op->key, op->keylen, op->name, op->namelen);
        if (pos < 0)
            MERR(at, "unable to find specified modification point with '%.*s: %.*s'", (int)op->keylen, op->key,
                 (int)op->namelen, op->name);
        pos += op->after ? 1 : 0;
    }
    if (pos < 0 || pos > (long)orig->u.c.n)
        MERR(at, "unable to modify the list, because specified index %ld is out of bounds", pos);
    merge_insert_at(c, orig, piece, (size_t)pos);
    return 1;
}

/* (( delete N )), (( delete NAME )) in a list of strings, or (( delete [KEY] NAME )) in a list of maps. */
static int piece_delete(yctx *c, ynode *orig, const aop *op, ynode *piece, const ynode *at, int simple)
{
    long pos;
    if (op->has_idx) {
        pos = op->idx;
    } else if (simple) {
        if (piece->u.c.n)
            MERR(piece->u.c.v[0], "item in array directly after (( delete \"%.*s\" )) must be one of the array "
                 "operators 'append', 'prepend', 'delete', or 'insert'", (int)op->namelen, op->name);
        pos = -1;
        for (size_t j = 0; j < orig->u.c.n && pos < 0; j++) {
            ynode *e = orig->u.c.v[j];
            if (e->t == T_STR && e->u.s.n == op->namelen && memcmp(e->u.s.p, op->name, op->namelen) == 0)
                pos = (long)j;
        }
        if (pos < 0)
            MERR(at, "unable to find specified modification point with '%.*s'", (int)op->namelen, op->name);
    } else {
        if (!keyable(c, orig, op->key, op->keylen, "original", 1))
            return 0;
        if (piece->u.c.n)
            MERR(piece->u.c.v[0], "item in array directly after (( delete %.*s \"%.*s\" )) must be one of the array "
                 "operators 'append', 'prepend', 'delete', or 'insert'", (int)op->keylen, op->key,
                 (int)op->namelen, op->name);
        pos = entry_index(c, orig, op->key, op->keylen, op->name, op->namelen);
        if (pos < 0)
            MERR(at, "unable to find specified modification point with '%.*s: %.*s'", (int)op->keylen, op->key,
                 (int)op->namelen, op->name);
    }
    if (pos < 0 || pos >= (long)orig->u.c.n)
        MERR(at, "unable to modify the list, because specified index %ld is out of bounds", pos);
    fy_seq_remove(orig, (size_t)pos);
    return 1;
}

/* Apply one piece of the new list; 0 when spruce gives up on the whole list. */
static int apply_piece(yctx *c, ynode *orig, const aop *op, ynode *piece, int simple)
{
    const ynode *at = op->src ? op->src : (piece->u.c.n ? piece->u.c.v[0] : orig);
    switch (op->kind) {
    case AOP_INLINE:
        merge_inline(c, orig, piece);
        return 1;
    case AOP_APPEND:
        merge_append(c, orig, piece);
        return 1;
    case AOP_PREPEND:
        merge_insert_at(c, orig, piece, 0);
        return 1;
    case AOP_REPLACE:
        orig->u.c.n = 0;
        merge_append(c, orig, piece);
        return 1;
    case AOP_MERGE:
        if (!keyable(c, piece, op->key, op->keylen, "new", 1) || !keyable(c, orig, op->key, op->keylen, "original", 1))
            return 0;
        merge_by_key(c, orig, piece, op->key, op->keylen);
        return 1;
    case AOP_INSERT:
        return piece_insert(c, orig, op, piece, at);
    case AOP_DELETE:
        return piece_delete(c, orig, op, piece, at, simple);
    default:
        return piece_default(c, orig, piece);
    }
}

/* spruce's isSimpleList: a non-empty list without maps. */
static int simple_list(const ynode *l)
{
    for (size_t i = 0; i < l->u.c.n; i++)
        if (l->u.c.v[i]->t == T_MAP)
            return 0;
    return l->u.c.n > 0;
}

/* Merge the list nw into orig (a sequence, modified in place); 0 when an array operator failed. */
static int merge_seq(yctx *c, ynode *orig, ynode *nw)
{
    aop op;
    memset(&op, 0, sizeof op);
    ynode piece;
    memset(&piece, 0, sizeof piece);
    piece.t = T_SEQ;
    int simple = simple_list(orig);
    ynode **keep = fy_aalloc(c, sizeof(ynode *) * (nw->u.c.n + 1));
    size_t nkeep = 0;
    for (size_t i = 0; i <= nw->u.c.n; i++) {
        aop next = {0};     /* parse_aop fills it while i < n; gcc cannot see that */
        if (i < nw->u.c.n && !parse_aop(nw->u.c.v[i], &next)) {
            keep[nkeep++] = nw->u.c.v[i];
            continue;
        }
        if (i < nw->u.c.n && next.kind == AOP_DELETE && next.keyed && simple)
            continue;   /* spruce drops (( delete KEY NAME )) in a list of scalars */
        piece.u.c.v = keep;
        piece.u.c.n = nkeep;
        piece.u.c.cap = nkeep;
        if (!apply_piece(c, orig, &op, &piece, simple))
            return 0;
        if (i < nw->u.c.n)
            op = next;
        keep += nkeep;
        nkeep = 0;
    }
    return 1;
}

ynode *fy_merge_obj(yctx *c, ynode *orig, ynode *nw)
{
    if (nw->t == T_STR) {
        const char *key;
        size_t keylen;
        if (is_prune_op(nw)) {
            fy_mark_add(c, fy_path_str(c), 0, NULL, 0);
            return orig ? orig : nw;
        }
        if (is_sort_op(nw, &key, &keylen)) {
            fy_mark_add(c, fy_path_str(c), 1, key, keylen);
            return orig ? orig : nw;
        }
        if (is_merge_misuse(nw)) {
            fy_err_add(c, "yaml.merge", nw, fy_path_str(c), NULL,
                       "inappropriate use of (( merge )) operator outside of a list (this is spruce, after all)");
            return orig ? orig : nw;
        }
        return nw;
    }
    if (nw->t == T_MAP) {
        ynode *m = orig && orig->t == T_MAP ? orig : fy_nnew(c, T_MAP, nw);
        for (size_t i = 0; i < nw->u.c.n; i++) {
            ynode *k = nw->u.c.k[i];
            size_t old = fy_path_push_key(c, k);
            long j = fy_map_find(c, m, k);
            ynode *r = fy_merge_obj(c, j >= 0 ? m->u.c.v[j] : NULL, nw->u.c.v[i]);
            j = fy_map_find(c, m, k);
            if (j >= 0)
                m->u.c.v[j] = r;
            else
                fy_map_append(c, m, k, r);
            fy_path_pop(c, old);
        }
        return m;
    }
    if (nw->t == T_SEQ) {
        ynode *s = orig && orig->t == T_SEQ ? orig : fy_nnew(c, T_SEQ, nw);
        if (!merge_seq(c, s, nw))
            return fy_nnew(c, T_NULL, nw);   /* spruce: a failed array operator leaves nil */
        return s;
    }
    return nw;
}
