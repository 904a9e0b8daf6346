/*
 * forge.yaml, io: the libyaml loader (events -> nodes, anchors, `<<`), the
 * conversions node <-> Lua value (with per-table kind and key order), and the
 * emitter (nodes -> block YAML). Declarations in yaml_int.h.
 */
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "yaml_int.h"

/* ------------------------------------------------------------------------- */
/* current path (for messages and marks)                                      */
/* ------------------------------------------------------------------------- */

size_t fy_path_push(yctx *c, const char *s, size_t n)
{
    size_t old = c->path.n;
    if (old)
        fy_buf_add(c, &c->path, ".", 1);
    fy_buf_add(c, &c->path, s, n);
    return old;
}

size_t fy_path_push_idx(yctx *c, size_t i)
{
    char tmp[32];
    int w = snprintf(tmp, sizeof tmp, "%zu", i);
    return fy_path_push(c, tmp, (size_t)w);
}

/* Print a scalar as a path segment / message text. Returns a pointer to buf or the string. */
const char *fy_scalar_text(const ynode *k, char *buf, size_t size, size_t *len)
{
    switch (k->t) {
    case T_STR:
        *len = k->u.s.n;
        return k->u.s.p;
    case T_INT:
        snprintf(buf, size, "%lld", (long long)k->u.i);
        break;
    case T_FLOAT:
        fy_fmt_go_float(k->u.f, buf, size);
        break;
    case T_BOOL:
        snprintf(buf, size, "%s", k->u.b ? "true" : "false");
        break;
    case T_NULL:
        snprintf(buf, size, "null");
        break;
    case T_MAP:
        snprintf(buf, size, "map");
        break;
    default:
        snprintf(buf, size, "list");
        break;
    }
    *len = strlen(buf);
    return buf;
}

size_t fy_path_push_key(yctx *c, const ynode *k)
{
    char tmp[64];
    size_t n;
    const char *s = fy_scalar_text(k, tmp, sizeof tmp, &n);
    return fy_path_push(c, s, n);
}

void fy_path_pop(yctx *c, size_t old)
{
    c->path.n = old;
    if (c->path.p)
        c->path.p[old] = 0;
}

const char *fy_path_str(yctx *c)
{
    return c->path.p ? c->path.p : "";
}

/* ------------------------------------------------------------------------- */
/* loader                                                                     */
/* ------------------------------------------------------------------------- */

static void load_fail(yctx *c, const char *code, int line, const char *fmt, ...) FORGE_PRINTF(4);
FORGE_NORETURN static void load_fail(yctx *c, const char *code, int line, const char *fmt, ...)
{
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    ynode at;
    memset(&at, 0, sizeof at);
    at.file = c->curfile;
    at.line = line;
    fy_err_add(c, code, &at, c->path.n ? fy_path_str(c) : NULL, NULL, "%s", msg);
    fy_raise(c);
}

static void load_next(yctx *c)
{
    if (c->event_live) {
        yaml_event_delete(&c->event);
        c->event_live = 0;
    }
    if (!yaml_parser_parse(&c->parser, &c->event)) {
        yaml_parser_t *p = &c->parser;
        int line = (int)p->problem_mark.line + 1;
        const char *what = p->error == YAML_MEMORY_ERROR ? "out of memory"
                         : p->problem ? p->problem : "invalid YAML";
        if (p->context)
            load_fail(c, "yaml.parse", line, "%s %s (line %d)", what, p->context,
                      (int)p->context_mark.line + 1);
        load_fail(c, "yaml.parse", line, "%s", what);
    }
    c->event_live = 1;
}

static void anchor_add(yctx *c, const char *name, ynode *n)
{
    if (!name)
        return;
    if (c->nanchors == c->capanchors) {
        size_t cap = c->capanchors ? c->capanchors * 2 : 16;
        yanchor *a = fy_aalloc(c, sizeof(yanchor) * cap);
        if (c->nanchors)
            memcpy(a, c->anchors, sizeof(yanchor) * c->nanchors);
        c->anchors = a;
        c->capanchors = cap;
    }
    c->anchors[c->nanchors].name = (char *)name;
    c->anchors[c->nanchors].n = n;
    c->nanchors++;
}

static int is_tag(const yaml_char_t *tag, const char *name)
{
    return tag && strcmp((const char *)tag, name) == 0;
}

static void merge_key_into(yctx *c, ynode *m, ynode *v, int line)
{
    if (v->t == T_MAP) {
        for (size_t i = 0; i < v->u.c.n; i++)
            fy_map_set(c, m, v->u.c.k[i], v->u.c.v[i]);
        return;
    }
    if (v->t == T_SEQ) {
        for (size_t i = v->u.c.n; i-- > 0;) {
            ynode *e = v->u.c.v[i];
            if (e->t != T_MAP)
                load_fail(c, "yaml.parse", line, "map merge (<<) requires a map or a list of maps");
            for (size_t j = 0; j < e->u.c.n; j++)
                fy_map_set(c, m, e->u.c.k[j], e->u.c.v[j]);
        }
        return;
    }
    load_fail(c, "yaml.parse", line, "map merge (<<) requires a map or a list of maps");
}

/* The current event starts the node; on return it is the node's last event. */
static ynode *load_node(yctx *c, int depth)
{
    yaml_event_t *ev = &c->event;
    int line = (int)ev->start_mark.line + 1;
    if (depth > YMAX_DEPTH)
        load_fail(c, "yaml.depth", line, "nesting deeper than %d levels", YMAX_DEPTH);
    switch (ev->type) {
    case YAML_ALIAS_EVENT: {
        const char *name = (const char *)ev->data.alias.anchor;
        for (size_t i = c->nanchors; i-- > 0;) {
            if (strcmp(c->anchors[i].name, name) == 0) {
                long budget = YMAX_ALIAS_NODES - c->alias_nodes;
                ynode *r = fy_ncopy(c, c->anchors[i].n, &budget);
                if (!r)
                    load_fail(c, "yaml.alias", line,
                              "alias expansion exceeds %d nodes (billion laughs?) at *%s",
                              YMAX_ALIAS_NODES, name);
                c->alias_nodes = YMAX_ALIAS_NODES - budget;
                return r;
            }
        }
        load_fail(c, "yaml.parse", line, "unknown anchor '%s' referenced", name);
    }
    case YAML_SCALAR_EVENT: {
        ynode *n = fy_nnew(c, T_STR, NULL);
        n->file = c->curfile;
        n->line = line;
        const char *s = (const char *)ev->data.scalar.value;
        size_t len = ev->data.scalar.length;
        const yaml_char_t *tag = ev->data.scalar.tag;
        int plain = ev->data.scalar.style == YAML_PLAIN_SCALAR_STYLE;
        if (is_tag(tag, "tag:yaml.org,2002:str") || is_tag(tag, "!") || (!plain && !tag)) {
            n->u.s.p = fy_astrdup(c, s, len);
            n->u.s.n = len;
        } else if (!tag || is_tag(tag, "tag:yaml.org,2002:int") || is_tag(tag, "tag:yaml.org,2002:float")
                   || is_tag(tag, "tag:yaml.org,2002:bool") || is_tag(tag, "tag:yaml.org,2002:null")
                   || plain) {
            fy_resolve_plain(c, n, s, len, 1);
            if (tag || !plain)
                n->flags &= (unsigned char)~NF_MERGEKEY;
            else
                n->flags |= NF_PLAIN;
        } else {
            n->u.s.p = fy_astrdup(c, s, len);
            n->u.s.n = len;
        }
        if (ev->data.scalar.anchor)
            anchor_add(c, fy_astrdup(c, (const char *)ev->data.scalar.anchor,
                                     strlen((const char *)ev->data.scalar.anchor)), n);
        return n;
    }
    case YAML_SEQUENCE_START_EVENT: {
        char *anchor = ev->data.sequence_start.anchor
            ? fy_astrdup(c, (const char *)ev->data.sequence_start.anchor,
                         strlen((const char *)ev->data.sequence_start.anchor)) : NULL;
        ynode *n = fy_nnew(c, T_SEQ, NULL);
        n->file = c->curfile;
        n->line = line;
        for (size_t i = 0;; i++) {
            load_next(c);
            if (c->event.type == YAML_SEQUENCE_END_EVENT)
                break;
            size_t old = fy_path_push_idx(c, i);
            fy_seq_push(c, n, load_node(c, depth + 1));
            fy_path_pop(c, old);
        }
        anchor_add(c, anchor, n);
        return n;
    }
    case YAML_MAPPING_START_EVENT: {
        char *anchor = ev->data.mapping_start.anchor
            ? fy_astrdup(c, (const char *)ev->data.mapping_start.anchor,
                         strlen((const char *)ev->data.mapping_start.anchor)) : NULL;
        ynode *n = fy_nnew(c, T_MAP, NULL);
        n->file = c->curfile;
        n->line = line;
        for (;;) {
            load_next(c);
            if (c->event.type == YAML_MAPPING_END_EVENT)
                break;
            int kline = (int)c->event.start_mark.line + 1;
            ynode *k = load_node(c, depth + 1);
            if (k->t == T_MAP || k->t == T_SEQ)
                load_fail(c, "yaml.parse", kline, "complex (map or list) mapping keys are not supported");
            if (k->t == T_NULL)
                load_fail(c, "yaml.parse", kline, "null mapping keys are not supported");
            if (k->t == T_FLOAT && isnan(k->u.f))
                load_fail(c, "yaml.parse", kline, "NaN mapping keys are not supported");
            load_next(c);
            size_t old = fy_path_push_key(c, k);
            ynode *v = load_node(c, depth + 1);
            fy_path_pop(c, old);
            if (k->flags & NF_MERGEKEY)
                merge_key_into(c, n, v, kline);
            else
                fy_map_set(c, n, k, v);
        }
        anchor_add(c, anchor, n);
        return n;
    }
    default:
        load_fail(c, "yaml.parse", line, "unexpected YAML event %d", (int)ev->type);
    }
}

/*
 * Parse one YAML document. Returns the root, or NULL for an empty stream / empty
 * document. A second document is an error.
 */
ynode *fy_load_document(yctx *c, const char *text, size_t len, unsigned short file)
{
    if (c->parser_live) {
        yaml_parser_delete(&c->parser);
        c->parser_live = 0;
    }
    if (!yaml_parser_initialize(&c->parser))
        fy_oom(c);
    c->parser_live = 1;
    yaml_parser_set_input_string(&c->parser, (const unsigned char *)text, len);
    c->nanchors = 0;
    c->alias_nodes = 0;
    c->curfile = file;
    fy_path_pop(c, 0);
    ynode *root = NULL;
    load_next(c);                       /* STREAM-START */
    load_next(c);
    if (c->event.type == YAML_DOCUMENT_START_EVENT) {
        load_next(c);
        root = load_node(c, 0);
        load_next(c);                   /* DOCUMENT-END */
        load_next(c);
        if (c->event.type == YAML_DOCUMENT_START_EVENT)
            load_fail(c, "yaml.multidoc", (int)c->event.start_mark.line + 1,
                      "more than one YAML document in the stream (forge.yaml reads exactly one)");
    }
    if (c->event_live) {
        yaml_event_delete(&c->event);
        c->event_live = 0;
    }
    yaml_parser_delete(&c->parser);
    c->parser_live = 0;
    if (root && root->t == T_NULL && root->line == 0)
        return NULL;
    return root;
}

/* ------------------------------------------------------------------------- */
/* node -> Lua                                                                */
/* ------------------------------------------------------------------------- */

/* Stack: [...] -> [..., yaml.null, meta] ; returns their indices. */
yidx fy_push_refs(lua_State *L)
{
    yidx x;
    lua_getfield(L, LUA_REGISTRYINDEX, NULL_KEY);
    x.null = lua_gettop(L);
    lua_getfield(L, LUA_REGISTRYINDEX, META_KEY);
    x.meta = lua_gettop(L);
    return x;
}

static void push_scalar(lua_State *L, const ynode *n, yidx x)
{
    switch (n->t) {
    case T_NULL:
        lua_pushvalue(L, x.null);
        break;
    case T_BOOL:
        lua_pushboolean(L, n->u.b);
        break;
    case T_INT:
        lua_pushinteger(L, n->u.i);
        break;
    case T_FLOAT:
        lua_pushnumber(L, n->u.f);
        break;
    default:
        lua_pushlstring(L, n->u.s.p, n->u.s.n);
        break;
    }
}

/* Stack: [...] -> [..., value] */
void fy_push_node(yctx *c, const ynode *n, yidx x)
{
    lua_State *L = c->L;
    luaL_checkstack(L, 6, "forge.yaml: nesting too deep");
    if (n->t == T_SEQ) {
        lua_createtable(L, (int)n->u.c.n, 0);
        for (size_t i = 0; i < n->u.c.n; i++) {
            fy_push_node(c, n->u.c.v[i], x);
            lua_rawseti(L, -2, (lua_Integer)i + 1);
        }
        lua_pushvalue(L, -1);
        lua_pushliteral(L, "seq");
        lua_rawset(L, x.meta);
    } else if (n->t == T_MAP) {
        lua_createtable(L, 0, (int)n->u.c.n);
        lua_createtable(L, (int)n->u.c.n, 0);
        lua_Integer j = 0;
        for (size_t i = 0; i < n->u.c.n; i++) {
            const ynode *k = n->u.c.k[i];
            if (k->t == T_NULL || (k->t == T_FLOAT && isnan(k->u.f)))
                continue;
            push_scalar(L, k, x);
            lua_pushvalue(L, -1);
            lua_rawseti(L, -3, ++j);
            fy_push_node(c, n->u.c.v[i], x);
            lua_rawset(L, -4);
        }
        lua_pushvalue(L, -2);
        lua_insert(L, -2);
        lua_rawset(L, x.meta);         /* meta[t] = order */
    } else {
        push_scalar(L, n, x);
    }
}

/* ------------------------------------------------------------------------- */
/* Lua -> node                                                                */
/* ------------------------------------------------------------------------- */

/*
 * Kind of the table at idx: 1 seq, 0 map. Recorded kinds win; otherwise a non-empty
 * table whose keys are exactly 1..n is a seq and anything else (the empty table
 * included) is a map.
 */
int fy_table_kind(lua_State *L, int idx, int metaidx)
{
    idx = lua_absindex(L, idx);
    lua_pushvalue(L, idx);
    int t = lua_rawget(L, metaidx);
    if (t == LUA_TTABLE) {
        lua_pop(L, 1);
        return 0;
    }
    if (t == LUA_TSTRING) {
        int seq = strcmp(lua_tostring(L, -1), "seq") == 0;
        lua_pop(L, 1);
        return seq;
    }
    lua_pop(L, 1);
    lua_Unsigned n = lua_rawlen(L, idx);
    if (n == 0)
        return 0;
    lua_Unsigned count = 0;
    lua_pushnil(L);
    while (lua_next(L, idx)) {
        lua_pop(L, 1);
        int isint;
        lua_Integer k = lua_tointegerx(L, -1, &isint);
        if (lua_type(L, -1) != LUA_TNUMBER || !isint || k < 1 || (lua_Unsigned)k > n) {
            lua_pop(L, 1);
            return 0;
        }
        count++;
    }
    return count == n;
}

int fy_key_cmp(const void *pa, const void *pb)
{
    const ynode *a = *(ynode *const *)pa, *b = *(ynode *const *)pb;
    int ra = (a->t == T_INT || a->t == T_FLOAT) ? 0 : a->t == T_BOOL ? 1 : 2;
    int rb = (b->t == T_INT || b->t == T_FLOAT) ? 0 : b->t == T_BOOL ? 1 : 2;
    if (ra != rb)
        return ra - rb;
    if (ra == 0) {
        double x = a->t == T_INT ? (double)a->u.i : a->u.f;
        double y = b->t == T_INT ? (double)b->u.i : b->u.f;
        if (a->t == T_INT && b->t == T_INT)
            return a->u.i < b->u.i ? -1 : a->u.i > b->u.i;
        return x < y ? -1 : x > y;
    }
    if (ra == 1)
        return a->u.b - b->u.b;
    size_t n = a->u.s.n < b->u.s.n ? a->u.s.n : b->u.s.n;
    int r = memcmp(a->u.s.p, b->u.s.p, n);
    if (r)
        return r;
    return a->u.s.n < b->u.s.n ? -1 : a->u.s.n > b->u.s.n;
}

FORGE_PRINTF(3)
FORGE_NORETURN static void conv_fail(yctx *c, const char *code, const char *fmt, ...)
{
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    fy_err_add(c, code, NULL, c->path.n ? fy_path_str(c) : NULL, NULL, "%s", msg);
    fy_raise(c);
}

/* A Lua key (at idx) as a scalar node; NULL with *bad set when it cannot be one. */
static ynode *key_from_lua(yctx *c, int idx)
{
    lua_State *L = c->L;
    switch (lua_type(L, idx)) {
    case LUA_TSTRING: {
        size_t len;
        const char *s = lua_tolstring(L, idx, &len);
        return fy_nstr(c, s, len, NULL);
    }
    case LUA_TNUMBER:
        if (lua_isinteger(L, idx))
            return fy_nint(c, lua_tointeger(L, idx), NULL);
        return fy_nfloat(c, lua_tonumber(L, idx), NULL);
    case LUA_TBOOLEAN:
        return fy_nbool(c, lua_toboolean(L, idx), NULL);
    default:
        conv_fail(c, "yaml.encode", "cannot use a %s as a mapping key", luaL_typename(L, idx));
    }
}

static void map_add_value(yctx *c, ynode *m, ynode *k, int vidx, int depth, yidx x, unsigned short file)
{
    size_t old = fy_path_push_key(c, k);
    ynode *v = fy_from_lua(c, vidx, depth + 1, x, file);
    fy_path_pop(c, old);
    fy_map_set(c, m, k, v);
}

/* Convert the Lua value at idx (absolute) into a node tree. */
ynode *fy_from_lua(yctx *c, int idx, int depth, yidx x, unsigned short file)
{
    lua_State *L = c->L;
    ynode *n;
    idx = lua_absindex(L, idx);
    if (depth > YMAX_DEPTH)
        conv_fail(c, "yaml.depth", "nesting deeper than %d levels (a cycle?)", YMAX_DEPTH);
    switch (lua_type(L, idx)) {
    case LUA_TNIL:
        n = fy_nnew(c, T_NULL, NULL);
        break;
    case LUA_TBOOLEAN:
        n = fy_nbool(c, lua_toboolean(L, idx), NULL);
        break;
    case LUA_TNUMBER:
        n = lua_isinteger(L, idx) ? fy_nint(c, lua_tointeger(L, idx), NULL) : fy_nfloat(c, lua_tonumber(L, idx), NULL);
        break;
    case LUA_TSTRING: {
        size_t len;
        const char *s = lua_tolstring(L, idx, &len);
        n = fy_nstr(c, s, len, NULL);
        break;
    }
    case LUA_TTABLE: {
        luaL_checkstack(L, 8, "forge.yaml: nesting too deep");
        if (fy_table_kind(L, idx, x.meta)) {
            n = fy_nnew(c, T_SEQ, NULL);
            lua_Unsigned len = lua_rawlen(L, idx);
            for (lua_Unsigned i = 1; i <= len; i++) {
                lua_rawgeti(L, idx, (lua_Integer)i);
                size_t old = fy_path_push_idx(c, (size_t)i - 1);
                fy_seq_push(c, n, fy_from_lua(c, -1, depth + 1, x, file));
                fy_path_pop(c, old);
                lua_pop(L, 1);
            }
            break;
        }
        n = fy_nnew(c, T_MAP, NULL);
        /* recorded key order first */
        lua_pushvalue(L, idx);
        if (lua_rawget(L, x.meta) == LUA_TTABLE) {
            int order = lua_gettop(L);
            lua_Unsigned on = lua_rawlen(L, order);
            for (lua_Unsigned j = 1; j <= on; j++) {
                lua_rawgeti(L, order, (lua_Integer)j);
                int kt = lua_type(L, -1);
                if (kt == LUA_TSTRING || kt == LUA_TNUMBER || kt == LUA_TBOOLEAN) {
                    lua_pushvalue(L, -1);
                    if (lua_rawget(L, idx) != LUA_TNIL) {
                        ynode *k = key_from_lua(c, -2);
                        map_add_value(c, n, k, lua_gettop(L), depth, x, file);
                    }
                    lua_pop(L, 1);
                }
                lua_pop(L, 1);
            }
        }
        lua_pop(L, 1);
        /* then every other key, sorted */
        size_t total = 0;
        lua_pushnil(L);
        while (lua_next(L, idx)) {
            lua_pop(L, 1);
            total++;
        }
        if (total != n->u.c.n) {
            ynode **extra = fy_aalloc(c, sizeof(ynode *) * total);
            size_t ne = 0;
            lua_pushnil(L);
            while (lua_next(L, idx)) {
                lua_pop(L, 1);
                ynode *k = key_from_lua(c, -1);
                if (k->t == T_FLOAT && isnan(k->u.f))
                    continue;
                if (fy_map_find(c, n, k) < 0 && ne < total)
                    extra[ne++] = k;
            }
            qsort(extra, ne, sizeof(ynode *), fy_key_cmp);
            for (size_t i = 0; i < ne; i++) {
                push_scalar(L, extra[i], x);
                lua_rawget(L, idx);
                map_add_value(c, n, extra[i], lua_gettop(L), depth, x, file);
                lua_pop(L, 1);
            }
        }
        break;
    }
    default:
        if (lua_rawequal(L, idx, x.null)) {
            n = fy_nnew(c, T_NULL, NULL);
            break;
        }
        conv_fail(c, "yaml.encode", "cannot encode a value of type %s", luaL_typename(L, idx));
    }
    n->file = file;
    return n;
}

/* ------------------------------------------------------------------------- */
/* emitter                                                                    */
/* ------------------------------------------------------------------------- */

static int emit_write(void *data, unsigned char *buffer, size_t size)
{
    yctx *c = data;
    fy_buf_add(c, &c->out, (const char *)buffer, size);
    return 1;
}

static void emit_ev(yctx *c, yaml_event_t *ev, int ok)
{
    if (!ok)
        conv_fail(c, "yaml.encode", "cannot encode this value (invalid UTF-8 in a string?)");
    if (!yaml_emitter_emit(&c->emitter, ev))
        conv_fail(c, "yaml.encode", "%s", c->emitter.problem ? c->emitter.problem : "emitter error");
}

static void emit_text(yctx *c, const char *s, size_t n, yaml_scalar_style_t style)
{
    yaml_event_t ev;
    int ok = yaml_scalar_event_initialize(&ev, NULL, NULL, (yaml_char_t *)s, (int)n, 1, 1, style);
    emit_ev(c, &ev, ok);
}

static void emit_scalar(yctx *c, const ynode *n)
{
    char tmp[64];
    switch (n->t) {
    case T_NULL:
        emit_text(c, "null", 4, YAML_PLAIN_SCALAR_STYLE);
        break;
    case T_BOOL:
        emit_text(c, n->u.b ? "true" : "false", n->u.b ? 4 : 5, YAML_PLAIN_SCALAR_STYLE);
        break;
    case T_INT:
        snprintf(tmp, sizeof tmp, "%lld", (long long)n->u.i);
        emit_text(c, tmp, strlen(tmp), YAML_PLAIN_SCALAR_STYLE);
        break;
    case T_FLOAT:
        if (c->go_emit && (isnan(n->u.f) || isinf(fy_to_f32(n->u.f))))
            snprintf(tmp, sizeof tmp, "%s", isnan(n->u.f) ? ".nan" : n->u.f < 0 ? "-.inf" : ".inf");
        else if (c->go_emit)
            fy_fmt_go_floatx(n->u.f, 1, 6, tmp, sizeof tmp);
        else
            fy_fmt_yaml_float(n->u.f, tmp, sizeof tmp);
        emit_text(c, tmp, strlen(tmp), YAML_PLAIN_SCALAR_STYLE);
        break;
    default: {
        yaml_scalar_style_t style = YAML_PLAIN_SCALAR_STYLE;
        if (memchr(n->u.s.p, '\n', n->u.s.n))
            style = YAML_LITERAL_SCALAR_STYLE;
        else if (fy_needs_quotes(c, n->u.s.p, n->u.s.n))
            style = YAML_DOUBLE_QUOTED_SCALAR_STYLE;
        emit_text(c, n->u.s.p, n->u.s.n, style);
    }
    }
}

static void emit_node(yctx *c, const ynode *n)
{
    yaml_event_t ev;
    if (n->t == T_SEQ) {
        emit_ev(c, &ev, yaml_sequence_start_event_initialize(&ev, NULL, NULL, 1, YAML_BLOCK_SEQUENCE_STYLE));
        for (size_t i = 0; i < n->u.c.n; i++)
            emit_node(c, n->u.c.v[i]);
        emit_ev(c, &ev, yaml_sequence_end_event_initialize(&ev));
    } else if (n->t == T_MAP) {
        emit_ev(c, &ev, yaml_mapping_start_event_initialize(&ev, NULL, NULL, 1, YAML_BLOCK_MAPPING_STYLE));
        for (size_t i = 0; i < n->u.c.n; i++) {
            emit_scalar(c, n->u.c.k[i]);
            emit_node(c, n->u.c.v[i]);
        }
        emit_ev(c, &ev, yaml_mapping_end_event_initialize(&ev));
    } else {
        emit_scalar(c, n);
    }
}

/* Emit n as one YAML document into c->out (reset first). */
void fy_emit_document(yctx *c, const ynode *n)
{
    yaml_event_t ev;
    c->out.n = 0;
    if (c->emitter_live) {
        yaml_emitter_delete(&c->emitter);
        c->emitter_live = 0;
    }
    if (!yaml_emitter_initialize(&c->emitter))
        fy_oom(c);
    c->emitter_live = 1;
    yaml_emitter_set_output(&c->emitter, emit_write, c);
    yaml_emitter_set_unicode(&c->emitter, 1);
    yaml_emitter_set_width(&c->emitter, c->go_emit ? 80 : -1);
    yaml_emitter_set_indent(&c->emitter, 2);
    emit_ev(c, &ev, yaml_stream_start_event_initialize(&ev, YAML_UTF8_ENCODING));
    emit_ev(c, &ev, yaml_document_start_event_initialize(&ev, NULL, NULL, NULL, 1));
    emit_node(c, n);
    emit_ev(c, &ev, yaml_document_end_event_initialize(&ev, 1));
    emit_ev(c, &ev, yaml_stream_end_event_initialize(&ev));
    if (!yaml_emitter_flush(&c->emitter))
        conv_fail(c, "yaml.encode", "emitter flush failed");
    yaml_emitter_delete(&c->emitter);
    c->emitter_live = 0;
    if (!c->out.p)
        fy_buf_add(c, &c->out, "", 0);
}
