/*
 * forge.yaml's internal header: the types and the functions its parts share.
 * The module is runtime/yaml.c (the Lua API) plus these translation units:
 *   yaml/core.c   arena, per-call context, error records, nodes, number formats,
 *                 YAML 1.1 scalar resolution
 *   yaml/io.c     libyaml loader, node <-> Lua value, emitter
 *   yaml/merge.c  spruce-style document merge (maps, array modes and operators, marks)
 *   yaml/eval.c   (( operator )) parsing, dependency order and evaluation, prune,
 *                 cherry-pick; fy_merge_main runs the whole pipeline
 * Every function declared here is named fy_*: the parts link into one module, and
 * into the forge binary next to every other module. See docs/yaml.md.
 */
#ifndef FORGE_YAML_INT_H
#define FORGE_YAML_INT_H

#include <stddef.h>
#include <stdint.h>

#include <yaml.h>

#include "forge/forge.h"

#define YMAX_DEPTH        1000      /* nesting limit for decode, encode and Lua tables */
#define YMAX_ALIAS_NODES  1000000   /* nodes an alias expansion may create per document */
#define YMAX_ERRORS       100       /* error records kept per call */

#define CTX_MT   "forge.yaml.ctx"
#define NULL_KEY "forge.yaml.null"
#define META_KEY "forge.yaml.meta"

/* ------------------------------------------------------------------------- */
/* nodes                                                                      */
/* ------------------------------------------------------------------------- */

enum { T_NULL, T_BOOL, T_INT, T_FLOAT, T_STR, T_MAP, T_SEQ };

#define NF_PLAIN    0x01    /* scalar written plain and untagged */
#define NF_MERGEKEY 0x02    /* the YAML merge key `<<` */

typedef struct ynode ynode;
struct ynode {
    unsigned char t;
    unsigned char flags;
    unsigned short file;    /* index into ctx->files; 0 = none */
    int line;               /* 1-based; 0 = unknown */
    union {
        int b;
        lua_Integer i;
        double f;
        struct { char *p; size_t n; } s;
        struct { ynode **k, **v; size_t n, cap; unsigned *h; size_t hcap; } c;
    } u;
};

typedef struct chunk {
    struct chunk *next;
    size_t used, cap;
    max_align_t data[];
} chunk;

typedef struct yanchor { char *name; ynode *n; } yanchor;

typedef struct ybuf { char *p; size_t n, cap; } ybuf;   /* malloc'd, owned by ctx */

typedef struct ymark { char *path; char *key; int sort; } ymark;

/* The per-call context; a full userdata so __gc frees all of it if a call raises. */
typedef struct yctx {
    lua_State *L;
    chunk *arena;
    size_t arena_total;
    yaml_parser_t parser;
    int parser_live;
    yaml_emitter_t emitter;
    int emitter_live;
    yaml_event_t event;
    int event_live;
    ybuf out;               /* emitter output */
    ybuf path;              /* current path while merging / walking */
    ybuf tmp;               /* scratch (canonical paths while computing dependencies) */
    ynode *root;            /* the merged document while operators run */
    int envidx;             /* stack index of opts.env (0: use the process environment) */
    /* decode */
    yanchor *anchors;
    size_t nanchors, capanchors;
    long alias_nodes;
    int depth;
    unsigned short curfile;
    /* file names: index 0 is "" */
    char **files;
    int nfiles, capfiles;
    /* errors go into the Lua table at stack index errtab (inside the protected call) */
    int errtab;
    int nerrors;
    /* merge state */
    ymark *marks;
    size_t nmarks, capmarks;
    int fallback_append;
    /* static_ips claims: ip -> owner */
    struct { uint32_t ip; char *owner; } *claims;
    size_t nclaims, capclaims;
    int glob_mode;          /* path errors as spruce's Cursor.Glob words them (no [=value]) */
    int go_emit;            /* emit as spruce's go-yaml v2 marshals (stringify): float32 floats, 80 columns */
} yctx;

extern int fy_sentinel;   /* its address is the error value of an operational failure */

/* Stack indices of yaml.null and the kind/key-order table (fy_push_refs). */
typedef struct yidx { int null, meta; } yidx;

/* ------------------------------------------------------------------------- */
/* core.c                                                                     */
/* ------------------------------------------------------------------------- */

/* arena and buffers: everything is freed with the context */
FORGE_NORETURN void fy_oom(yctx *c);
void *fy_aalloc(yctx *c, size_t size);
char *fy_astrdup(yctx *c, const char *s, size_t n);
void fy_buf_add(yctx *c, ybuf *b, const char *s, size_t n);
void fy_buf_adds(yctx *c, ybuf *b, const char *s);

/* context */
yctx *fy_ctx_new(lua_State *L);
void fy_ctx_release(yctx *c);
int fy_ctx_gc(lua_State *L);
unsigned short fy_ctx_addfile(yctx *c, const char *name);

/* error records; fy_raise ends the protected call as an operational failure */
void fy_err_add(yctx *c, const char *code, const ynode *at, const char *path, const char *op,
                const char *fmt, ...) FORGE_PRINTF(6);
FORGE_NORETURN void fy_raise(yctx *c);

/* nodes */
ynode *fy_nnew(yctx *c, int t, const ynode *src);
ynode *fy_nstr(yctx *c, const char *s, size_t len, const ynode *src);
ynode *fy_nstrz(yctx *c, const char *s, const ynode *src);
ynode *fy_nint(yctx *c, lua_Integer i, const ynode *src);
ynode *fy_nfloat(yctx *c, double f, const ynode *src);
ynode *fy_nbool(yctx *c, int b, const ynode *src);
ynode *fy_ncopy(yctx *c, const ynode *n, long *budget);
int fy_is_scalar(const ynode *n);
int fy_scalar_eq(const ynode *a, const ynode *b);
long fy_map_find(yctx *c, ynode *m, const ynode *k);
long fy_map_finds(yctx *c, ynode *m, const char *key, size_t len);
ynode *fy_map_gets(yctx *c, ynode *m, const char *key);
void fy_map_append(yctx *c, ynode *m, ynode *k, ynode *v);
void fy_map_set(yctx *c, ynode *m, ynode *k, ynode *v);
void fy_map_remove(ynode *m, size_t i);
void fy_seq_push(yctx *c, ynode *s, ynode *v);
void fy_seq_insert(yctx *c, ynode *s, size_t at, ynode *v);
void fy_seq_remove(ynode *s, size_t at);

/* number formatting and YAML 1.1 scalars */
double fy_to_f32(double f);
void fy_fmt_go_floatx(double f, int f32, int eprec, char *out, size_t size);
void fy_fmt_go_float(double f, char *out, size_t size);
void fy_fmt_yaml_float(double f, char *out, size_t size);
int fy_parse_go_int(const char *s, size_t n, lua_Integer *out, int *overflow);
int fy_parse_go_float(const char *s, size_t n, double *out);
void fy_resolve_plain(yctx *c, ynode *n, const char *s, size_t len, int copy);
int fy_needs_quotes(yctx *c, const char *s, size_t len);

/* ------------------------------------------------------------------------- */
/* io.c                                                                       */
/* ------------------------------------------------------------------------- */

/* current path (for messages and marks) */
size_t fy_path_push(yctx *c, const char *s, size_t n);
size_t fy_path_push_idx(yctx *c, size_t i);
size_t fy_path_push_key(yctx *c, const ynode *k);
void fy_path_pop(yctx *c, size_t old);
const char *fy_path_str(yctx *c);
const char *fy_scalar_text(const ynode *k, char *buf, size_t size, size_t *len);

/* loader, conversions, emitter */
ynode *fy_load_document(yctx *c, const char *text, size_t len, unsigned short file);
yidx fy_push_refs(lua_State *L);
void fy_push_node(yctx *c, const ynode *n, yidx x);
int fy_table_kind(lua_State *L, int idx, int metaidx);
int fy_key_cmp(const void *pa, const void *pb);
ynode *fy_from_lua(yctx *c, int idx, int depth, yidx x, unsigned short file);
void fy_emit_document(yctx *c, const ynode *n);

/* ------------------------------------------------------------------------- */
/* merge.c                                                                    */
/* ------------------------------------------------------------------------- */

void fy_mark_add(yctx *c, const char *path, int sort, const char *key, size_t keylen);
int fy_op_inner(const ynode *n, const char **in, size_t *inlen);
int fy_word_is(const char *w, size_t wl, const char *lit);
int fy_scalar_text_is(const ynode *n, const char *w, size_t wl);
const char *fy_type_name(const ynode *n);
const char *fy_env_get(yctx *c, const char *name, size_t *len);
ynode *fy_merge_obj(yctx *c, ynode *orig, ynode *nw);

/* ------------------------------------------------------------------------- */
/* eval.c                                                                     */
/* ------------------------------------------------------------------------- */

/* yaml.merge's pipeline: docs and opts are stack indices of its arguments */
int fy_merge_main(yctx *c, int docs, int opts);

#endif
