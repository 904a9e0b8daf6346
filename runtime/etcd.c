/*
 * forge.etcd — the distributed backend of the store: etcd v3 through its JSON
 * gateway (grpc-gateway, paths under /v3/ as served by etcd 3.4), on libcurl.
 *
 * A db object has exactly the methods and semantics of a forge.store db (see
 * store.c and ../../shared/DESIGN.md "Store semantics"): get, range, put and
 * delete with prev_revision (compare-and-swap), txn, revision, close. The
 * revision is etcd's own cluster revision. Extra, etcd-only methods serve the
 * replica work: leases (grant, keepalive, revoke; put and txn puts take
 * `lease=id`) and a bounded watch.
 *
 * Wire format: every request is a POST of a JSON body; keys and values travel
 * base64-encoded, int64 fields as decimal strings, and the gateway omits every
 * zero-valued field ("kvs", "count", "succeeded" = false, an empty "value").
 * Responses are decoded by lua-cjson in protected mode (ljson.c: at most ETCD_JSON_DEPTH
 * levels of nesting, RFC 8259 numbers only) into Lua tables that the readers below walk,
 * so a malformed or hostile response is an error value, never a crash or a raise. int64
 * fields are read from their strings exactly; a JSON number counts only up to 2^53 (cjson
 * reads numbers as doubles). Decoding runs on the calling thread: a call is one
 * synchronous transfer inside the Lua function that made it, and the watch stream's
 * messages, checked as they arrive inside curl's write callback, go through lua_pcall.
 *
 * Namespacing: the optional `prefix` is prepended to every key on the way in
 * and stripped on the way out, so several brokers or test cases can share one
 * etcd without seeing each other's keys.
 *
 * Endpoints and failover: requests go to the last endpoint that answered. An
 * endpoint fails a call when the connection fails or when its member answers that
 * it cannot serve now (gRPC Unavailable or Canceled, "no leader", "too many
 * requests", a gateway's 408/502/503/504): the call moves on to the next endpoint,
 * all within one time budget (timeout_ms). A read is always resent; a write only
 * when it certainly was not applied (nothing was sent, or etcd says it did not
 * process it: see not_processed[] for which answers, and why a txn is no exception);
 * otherwise the caller gets the retryable "etcd.unavailable" and decides.
 * An endpoint that failed is marked down with the time, and calls try it only after
 * every endpoint that is up (a call fails only when all failed it). Once its
 * backoff is over (0.5 s, doubling with each failure in a row up to 30 s) the next
 * read probes it first, under a short limit (ETCD_PROBE_MS): a dead endpoint costs
 * a refused connection (or at most that limit) once per backoff, not a connect
 * timeout per call. No thread: the time check is on the request path. Writes never
 * probe (a probe that hangs after sending would fail a write that may not be
 * resent). db:endpoints() reports the state; tostring(db) names the endpoint that
 * answered last.
 *
 * Auth: with `username`, the db authenticates (/v3/auth/authenticate) and sends
 * the token in the Authorization header; when etcd calls the token invalid
 * (expired, or etcd restarted) it authenticates again, once, and resends.
 *
 * Ownership: the db userdata owns the curl handle, header list and every buffer; __gc
 * frees them. Lua arguments are validated (and may raise) before any request is built;
 * building a request and the transfer run no Lua (but the protected check of a watch
 * message); answers are read and results pushed afterwards (a memory raise then leaks
 * nothing).
 */
#include <limits.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <curl/curl.h>

#include "forge/forge.h"
#include "ljson.h"
#include "ltxn.h"

#define ETCD_MT             "forge.etcd.db"
#define ETCD_KEY_MAX        1024
#define ETCD_PREFIX_MAX     1024
#define ETCD_VALUE_MAX      (8 * 1024 * 1024)
#define ETCD_RESP_MAX       ((size_t)256 * 1024 * 1024)
#define ETCD_JSON_DEPTH     64
#define ETCD_ENDPOINTS_MAX  16
#define ETCD_URL_MAX        512
#define ETCD_TIMEOUT_MS     5000
#define ETCD_TIMEOUT_MAX    (3600 * 1000)
#define ETCD_TTL_MAX        9000000000LL        /* etcd's MaxLeaseTTL */
#define ETCD_KEEP_BYTES     (1024 * 1024)       /* buffers larger than this are freed after a call */
#define ETCD_DOWN_MIN_MS    500                 /* an endpoint that failed is skipped this long ... */
#define ETCD_DOWN_MAX_MS    30000               /* ... doubling with each failure in a row, up to this */
#define ETCD_PROBE_MS       200                 /* a probe of an endpoint that is down: whole time limit */
#define ETCD_EP_ERROR_MAX   256

#define checkdb(L)          (etcd_check((L), 1))


/* ---------------------------------------------------------------------------
 * Growable buffers (a failed allocation is sticky: checked once per request)
 * ------------------------------------------------------------------------- */

struct buf {
    char *p;
    size_t len, cap;
    int failed;
};


static int buf_grow(struct buf *b, size_t extra)
{
    if (b->failed)
        return -1;
    if (extra >= SIZE_MAX / 2 - b->len) {
        b->failed = 1;
        return -1;
    }
    size_t need = b->len + extra + 1;
    if (need <= b->cap)
        return 0;
    size_t cap = b->cap ? b->cap : 256;
    while (cap < need)
        cap *= 2;
    char *p = realloc(b->p, cap);
    if (!p) {
        b->failed = 1;
        return -1;
    }
    b->p = p;
    b->cap = cap;
    return 0;
}


static void buf_add(struct buf *b, const void *s, size_t n)
{
    if (buf_grow(b, n) == 0) {
        if (n)
            memcpy(b->p + b->len, s, n);
        b->len += n;
        b->p[b->len] = '\0';
    }
}


static void buf_adds(struct buf *b, const char *s)
{
    buf_add(b, s, strlen(s));
}


/* Empty the buffer; a large one is freed so one big value does not stay pinned. */
static void buf_reset(struct buf *b)
{
    if (b->cap > ETCD_KEEP_BYTES) {
        free(b->p);
        b->p = NULL;
        b->cap = 0;
    }
    b->len = 0;
    b->failed = 0;
    if (b->p)
        b->p[0] = '\0';
}


static void buf_free(struct buf *b)
{
    free(b->p);
    memset(b, 0, sizeof *b);
}


/* ---------------------------------------------------------------------------
 * Base64 (standard alphabet, padded, as Go's encoding/json writes []byte)
 * ------------------------------------------------------------------------- */

static const char b64_alphabet[] =
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";


/* Append base64(a || c) (two parts, so a namespaced key needs no copy). */
static void buf_addb64(struct buf *b, const char *a, size_t alen, const char *c, size_t clen)
{
    size_t n = alen + clen;
    if (buf_grow(b, (n + 2) / 3 * 4) < 0)
        return;
    char *out = b->p + b->len;
    unsigned char in[3];
    int k = 0;
    for (size_t i = 0; i < n; i++) {
        in[k++] = (unsigned char)(i < alen ? a[i] : c[i - alen]);
        if (k == 3) {
            *out++ = b64_alphabet[in[0] >> 2];
            *out++ = b64_alphabet[((in[0] & 3) << 4) | (in[1] >> 4)];
            *out++ = b64_alphabet[((in[1] & 15) << 2) | (in[2] >> 6)];
            *out++ = b64_alphabet[in[2] & 63];
            k = 0;
        }
    }
    if (k) {
        if (k == 1)
            in[1] = 0;
        *out++ = b64_alphabet[in[0] >> 2];
        *out++ = b64_alphabet[((in[0] & 3) << 4) | (in[1] >> 4)];
        *out++ = k == 2 ? b64_alphabet[(in[1] & 15) << 2] : '=';
        *out++ = '=';
    }
    b->len = (size_t)(out - b->p);
    b->p[b->len] = '\0';
}


static int b64_value(unsigned char ch)
{
    if (ch >= 'A' && ch <= 'Z') return ch - 'A';
    if (ch >= 'a' && ch <= 'z') return ch - 'a' + 26;
    if (ch >= '0' && ch <= '9') return ch - '0' + 52;
    if (ch == '+' || ch == '-') return 62;
    if (ch == '/' || ch == '_') return 63;
    return -1;
}


/*
 * Decode base64 (standard or URL alphabet, padding optional) in place: the
 * output never outgrows the input. Returns the decoded length, or -1.
 */
static long b64_decode_inplace(char *s, size_t len)
{
    while (len > 0 && s[len - 1] == '=')
        len--;
    if (len % 4 == 1)
        return -1;
    size_t o = 0;
    uint32_t acc = 0;
    int bits = 0;
    for (size_t i = 0; i < len; i++) {
        int v = b64_value((unsigned char)s[i]);
        if (v < 0)
            return -1;
        acc = (acc << 6) | (uint32_t)v;
        bits += 6;
        if (bits >= 8) {
            bits -= 8;
            s[o++] = (char)((acc >> bits) & 0xFF);
        }
    }
    return (long)o;
}


/* ---------------------------------------------------------------------------
 * JSON writer helpers. Request bodies are written here rather than by lua-cjson because of
 * the value limit: a put carries up to 8 MiB, base64-encoded straight into the one request
 * buffer, where lua-cjson would need a Lua table per request and hold the value three more
 * times (the base64 string, cjson's buffer, the result), writing each '/' of it as "\/".
 * The bodies have a few fixed shapes (field names, base64 text, int64 as decimal strings);
 * their only free text, the credentials, goes through the shared string writer (ljson.c).
 * ------------------------------------------------------------------------- */

static int buf_put(void *ud, const char *p, size_t n, int whole)
{
    (void)whole;
    buf_add(ud, p, n);
    return 0;
}


/* A JSON string literal (UTF-8 passed through, control characters escaped). */
static void buf_addjstr(struct buf *b, const char *s)
{
    forge_json_string(buf_put, b, s, strlen(s), 0);
}


/* An int64 the way jsonpb writes it: a decimal string. */
static void buf_addint(struct buf *b, long long v)
{
    char num[32];
    int n = snprintf(num, sizeof num, "\"%lld\"", v);
    buf_add(b, num, (size_t)n);
}


/* ---------------------------------------------------------------------------
 * The db object
 * ------------------------------------------------------------------------- */

/*
 * One endpoint and what the db knows of it. "Down" (fails > 0) is a fact about the past
 * (its last attempt failed at the endpoint), kept with the time so that calls skip it
 * until retry_at, then let a read probe it (see "Endpoints and failover" at the top).
 */
struct endpoint {
    char *url;                      /* without a trailing '/' */
    int fails;                      /* failures in a row; 0 = up */
    double down_since;              /* monotonic ms of the first of those failures */
    double retry_at;                /* while down: from then on a read may probe it */
    unsigned long long attempts;    /* requests sent (or tried) to it */
    unsigned long long failures;    /* of those, how many failed at the endpoint */
    char last_error[ETCD_EP_ERROR_MAX];     /* "" until one failed */
};

struct etcd {
    CURL *curl;                     /* NULL once closed */
    struct curl_slist *headers;
    struct endpoint ep[ETCD_ENDPOINTS_MAX];
    int nendpoints;
    int cur;                        /* the endpoint that answered last */
    char *prefix;                   /* never NULL while open ("" = no namespace) */
    size_t plen;
    long timeout_ms;
    char *username, *password, *token;
    struct buf req, aux, resp, scratch;
    /* state of the transfer in progress */
    lua_State *L;                   /* the calling state: the watch stream's messages are decoded in it */
    int too_big;
    int stream;                     /* newline-delimited messages (watch) */
    int stream_stop;                /* a message that ends the watch arrived */
    size_t scan;                    /* stream: bytes of resp already split into lines */
    size_t stop_start, stop_end;    /* stream: the line that stopped it */
    long long stream_rev;           /* stream: header revision of the last message */
    char errbuf[CURL_ERROR_SIZE];
};

/* An operational failure, formatted in C (no Lua), pushed later as `nil, err`. */
struct res {
    const char *code;
    int retryable;
    long status;                    /* HTTP status, 0 when there was no answer */
    long long grpc;                 /* gRPC status code of an etcd error answer, -1 if none */
    long long compact_revision;     /* watch: etcd.compacted */
    int resume;                     /* watch: the stream broke after it was created (resend it) */
    char msg[1536];
};


static int res_fail(struct res *r, const char *code, int retryable, long status, const char *fmt, ...)
    FORGE_PRINTF(5);

static int res_fail(struct res *r, const char *code, int retryable, long status, const char *fmt, ...)
{
    va_list ap;
    r->code = code;
    r->retryable = retryable;
    r->status = status;
    r->grpc = -1;
    r->compact_revision = 0;
    r->resume = 0;
    va_start(ap, fmt);
    vsnprintf(r->msg, sizeof r->msg, fmt, ap);
    va_end(ap);
    return -1;
}


static int malformed(struct res *r, const char *what)
{
    return res_fail(r, "etcd.error", 0, 200, "malformed response from etcd (%s)", what);
}


/* ---------------------------------------------------------------------------
 * JSON reader: an answer is decoded by lua-cjson (ljson.c) into a table on the Lua stack,
 * and read from there. Every reader takes stack indexes; jfield and jindex push what
 * they find, the others push nothing. JSON null reads as absent.
 * ------------------------------------------------------------------------- */

static char json_key;               /* registry key: this module's cjson decoder */


/*
 * Decode one JSON document (at most ETCD_JSON_DEPTH levels deep). Stack: [...] -> [..., doc]
 * and returns 0; or unchanged and -1 with r filled. May raise (memory) pushing the text.
 */
static int json_doc(lua_State *L, const char *s, size_t len, struct res *r)
{
    if (forge_json_decode(L, &json_key, s, len) == 0)
        return 0;
    const char *msg = lua_tostring(L, -1);
    malformed(r, msg ? msg : "not JSON");
    lua_pop(L, 1);
    return -1;
}


/* Keep only the value at the top above base. Stack: [base..., x..., v] -> [base..., v] */
static void keep_top(lua_State *L, int base)
{
    if (lua_gettop(L) > base + 1)
        lua_replace(L, base + 1);
    lua_settop(L, base + 1);
}


/* Push the value at the top instead as nil when it is JSON null. Returns its index. */
static int push_notnull(lua_State *L)
{
    if (lua_type(L, -1) == LUA_TLIGHTUSERDATA && lua_touserdata(L, -1) == NULL) {
        lua_pop(L, 1);
        lua_pushnil(L);
    }
    return lua_gettop(L);
}


/* Push member name of the object at obj (nil if absent, or obj is no object). Returns its index. */
static int jfield(lua_State *L, int obj, const char *name)
{
    luaL_checkstack(L, 2, "etcd answer");
    if (lua_type(L, obj) == LUA_TTABLE)
        lua_getfield(L, obj, name);                 /* decoded tables have no metatable */
    else
        lua_pushnil(L);
    return push_notnull(L);
}


/* Push element i (1-based) of the array at arr (nil if absent). Returns its index. */
static int jindex(lua_State *L, int arr, lua_Integer i)
{
    luaL_checkstack(L, 2, "etcd answer");
    if (lua_type(L, arr) == LUA_TTABLE)
        lua_rawgeti(L, arr, i);
    else
        lua_pushnil(L);
    return push_notnull(L);
}


/* Number of elements of the array at idx; absent counts 0; -1 if not an array. */
static long jlen(lua_State *L, int idx)
{
    if (lua_isnil(L, idx))
        return 0;
    if (lua_type(L, idx) != LUA_TTABLE)
        return -1;
    size_t n = lua_rawlen(L, idx);                  /* cjson: an array has keys 1..n, an object none */
    if (n == 0) {
        lua_pushnil(L);
        if (lua_next(L, idx)) {                     /* a non-empty object */
            lua_pop(L, 2);
            return -1;
        }
    }
    return n <= LONG_MAX ? (long)n : -1;
}


/* A decimal int64 in s[0..len) (jsonpb writes them as strings). Returns 0, or -1. */
static int parse_int64(const char *s, size_t len, long long *out)
{
    const char *end = s + len;
    int neg = 0;
    if (s < end && *s == '-') {
        neg = 1;
        s++;
    }
    if (s == end)
        return -1;
    unsigned long long v = 0;
    for (; s < end; s++) {
        if (*s < '0' || *s > '9')
            return -1;
        unsigned d = (unsigned)(*s - '0');
        if (v > (ULLONG_MAX - d) / 10)
            return -1;
        v = v * 10 + d;
    }
    if (v > (unsigned long long)LLONG_MAX + (unsigned long long)neg)
        return -1;
    *out = neg ? (long long)(0ULL - v) : (long long)v;
    return 0;
}


/*
 * An int64 at idx: a string (jsonpb), or a JSON number when it is an integer that a
 * double holds exactly (|n| <= 2^53; lua-cjson reads every number as a double).
 * Absent is def (the gateway omits zeros). Returns 0, or -1 when malformed.
 */
static int jint(lua_State *L, int idx, long long def, long long *out)
{
    *out = def;
    switch (lua_type(L, idx)) {
    case LUA_TNIL:
        return 0;
    case LUA_TSTRING: {
        size_t len;
        const char *s = lua_tolstring(L, idx, &len);
        return parse_int64(s, len, out);
    }
    case LUA_TNUMBER: {
        int exact;
        lua_Integer v = lua_tointegerx(L, idx, &exact);
        if (!exact || v > (1LL << 53) || v < -(1LL << 53))
            return -1;
        *out = (long long)v;
        return 0;
    }
    default:
        return -1;
    }
}


/* A boolean at idx; absent is false. Returns 0/1, or -1 when malformed. */
static int jbool(lua_State *L, int idx)
{
    if (lua_isnil(L, idx))
        return 0;
    return lua_type(L, idx) == LUA_TBOOLEAN ? lua_toboolean(L, idx) : -1;
}


/* The string at idx (valid while it stays on the stack); absent is "". NULL if not a string. */
static const char *jstr(lua_State *L, int idx, size_t *len)
{
    *len = 0;
    if (lua_isnil(L, idx))
        return "";
    return lua_type(L, idx) == LUA_TSTRING ? lua_tolstring(L, idx, len) : NULL;
}


/* Member name of obj as an int64 (see jint). Stack: unchanged. */
static int field_int(lua_State *L, int obj, const char *name, long long def, long long *out)
{
    int rc = jint(L, jfield(L, obj, name), def, out);
    lua_pop(L, 1);
    return rc;
}


/* Member name of obj as a boolean (see jbool). Stack: unchanged. */
static int field_bool(lua_State *L, int obj, const char *name)
{
    int rc = jbool(L, jfield(L, obj, name));
    lua_pop(L, 1);
    return rc;
}


/* Member name of obj, a base64 bytes field (jsonpb []byte), decoded into out; absent is "". */
static int field_bytes(lua_State *L, int obj, const char *name, struct buf *out)
{
    size_t len;
    const char *s = jstr(L, jfield(L, obj, name), &len);
    buf_reset(out);
    buf_add(out, s ? s : "", len);
    lua_pop(L, 1);
    long n = s && !out->failed ? b64_decode_inplace(out->p, out->len) : -1;
    if (n < 0)
        return -1;
    out->len = (size_t)n;
    return 0;
}


/* obj.header.revision (see jint). Stack: unchanged. */
static int header_rev(lua_State *L, int obj, long long def, long long *out)
{
    int rc = field_int(L, jfield(L, obj, "header"), "revision", def, out);
    lua_pop(L, 1);
    return rc;
}


/* A message for an error text: at most 400 bytes, control bytes replaced. */
static void sanitize(char *dst, size_t dstlen, const char *s, size_t len)
{
    size_t n = 0;
    for (size_t i = 0; i < len && n + 1 < dstlen && n < 400; i++) {
        unsigned char ch = (unsigned char)s[i];
        dst[n++] = ch < 0x20 || ch == 0x7F ? '?' : (char)ch;
    }
    dst[n] = '\0';
}


/* ---------------------------------------------------------------------------
 * Connection lifetime
 * ------------------------------------------------------------------------- */

static void etcd_release(struct etcd *e)
{
    if (e->curl) {
        curl_easy_cleanup(e->curl);
        e->curl = NULL;
    }
    curl_slist_free_all(e->headers);
    e->headers = NULL;
    for (int i = 0; i < ETCD_ENDPOINTS_MAX; i++) {
        free(e->ep[i].url);
        e->ep[i].url = NULL;
    }
    e->nendpoints = 0;
    free(e->prefix);
    free(e->username);
    if (e->password) {
        memset(e->password, 0, strlen(e->password));
        free(e->password);
    }
    free(e->token);
    e->prefix = e->username = e->password = e->token = NULL;
    buf_free(&e->req);
    buf_free(&e->aux);
    buf_free(&e->resp);
    buf_free(&e->scratch);
}


/* Drop what one large call left behind (after a call; never needed for correctness). */
static void etcd_trim(struct etcd *e)
{
    buf_reset(&e->req);
    buf_reset(&e->aux);
    buf_reset(&e->resp);
    buf_reset(&e->scratch);
}


/* Content-Type, no "Expect: 100-continue", and the auth token if any. Returns 0 or -1. */
static int set_headers(struct etcd *e)
{
    struct curl_slist *h = curl_slist_append(NULL, "Content-Type: application/json"), *t;
    if (!h)
        return -1;
    if (!(t = curl_slist_append(h, "Expect:")))
        goto fail;
    h = t;
    if (e->token) {
        struct buf line = {0};
        buf_adds(&line, "Authorization: ");
        buf_adds(&line, e->token);
        t = line.failed ? NULL : curl_slist_append(h, line.p);
        buf_free(&line);
        if (!t)
            goto fail;
        h = t;
    }
    curl_easy_setopt(e->curl, CURLOPT_HTTPHEADER, h);
    curl_slist_free_all(e->headers);
    e->headers = h;
    return 0;
fail:
    curl_slist_free_all(h);
    return -1;
}


static void drop_token(struct etcd *e)
{
    free(e->token);
    e->token = NULL;
    set_headers(e);             /* only shrinks the list; on failure the old one stays valid */
}


/* ---------------------------------------------------------------------------
 * HTTP: the transfer (flags, clock, write callback)
 * ------------------------------------------------------------------------- */

enum {
    CALL_READ = 1,              /* idempotent: may be resent to another endpoint */
    CALL_STREAM = 2,            /* newline-delimited messages until one ends it, or the time runs out */
};


static double now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}


/*
 * Whether the watch message e->resp[start, end) ends the watch (it has events, a
 * cancellation, a compaction or an error, or it is not JSON); records the revision of its
 * header. Run by stream_ends under lua_pcall.
 * Stack: [e, start, end] -> [..., stop]
 */
static int l_stream_message(lua_State *L)
{
    struct etcd *e = lua_touserdata(L, 1);
    size_t start = (size_t)lua_tointeger(L, 2), end = (size_t)lua_tointeger(L, 3);
    struct res r;
    int stop = 1;
    if (json_doc(L, e->resp.p + start, end - start, &r) == 0) {
        int doc = lua_gettop(L), result = jfield(L, doc, "result");
        int error = !lua_isnil(L, jfield(L, doc, "error"));
        long long rev, compact;
        if (!error && lua_istable(L, result)) {
            if (header_rev(L, result, 0, &rev) == 0 && rev > 0)
                e->stream_rev = rev;
            stop = field_bool(L, result, "canceled") != 0
                   || field_int(L, result, "compact_revision", 0, &compact) != 0 || compact != 0
                   || jlen(L, jfield(L, result, "events")) != 0;
        }
    }
    lua_pushboolean(L, stop);
    return 1;
}


/*
 * Whether the watch message e->resp[start, end) ends the watch (l_stream_message). It runs
 * inside curl's write callback, hence protected: a raise (memory) ends the watch, and the
 * message is read again, with its error reported, once the transfer is over.
 */
static int stream_ends(struct etcd *e, size_t start, size_t end)
{
    lua_State *L = e->L;
    if (!lua_checkstack(L, 4))
        return 1;
    lua_pushcfunction(L, l_stream_message);        /* none of these allocate */
    lua_pushlightuserdata(L, e);
    lua_pushinteger(L, (lua_Integer)start);
    lua_pushinteger(L, (lua_Integer)end);
    int stop = lua_pcall(L, 3, 1, 0) != LUA_OK || lua_toboolean(L, -1);
    lua_pop(L, 1);
    return stop;
}


/*
 * Inspect the complete lines of a watch stream received so far. A line with
 * events, a cancellation or an error ends the watch: its span is recorded and
 * 1 returned. Runs inside the curl write callback.
 */
static int stream_scan(struct etcd *e)
{
    while (e->scan < e->resp.len) {
        char *base = e->resp.p;
        char *nl = memchr(base + e->scan, '\n', e->resp.len - e->scan);
        if (!nl)
            return 0;
        size_t start = e->scan, end = (size_t)(nl - base);
        e->scan = end + 1;
        while (start < end && (base[start] == ' ' || base[start] == '\r'))
            start++;
        if (start == end)
            continue;
        if (stream_ends(e, start, end)) {
            e->stream_stop = 1;
            e->stop_start = start;
            e->stop_end = end;
            return 1;
        }
    }
    return 0;
}


static size_t write_cb(char *ptr, size_t size, size_t nmemb, void *ud)
{
    struct etcd *e = ud;
    size_t n = size * nmemb;
    if (e->resp.len + n > ETCD_RESP_MAX) {
        e->too_big = 1;
        return 0;
    }
    buf_add(&e->resp, ptr, n);
    if (e->resp.failed)
        return 0;
    if (e->stream && !e->stream_stop && stream_scan(e))
        return 0;               /* enough: end the transfer */
    return n;
}


/* Failures that retrying elsewhere will not cure: our TLS files or the server's certificate. */
static int tls_config_error(CURLcode rc)
{
    return rc == CURLE_SSL_CERTPROBLEM || rc == CURLE_SSL_CACERT_BADFILE || rc == CURLE_SSL_CRL_BADFILE
           || rc == CURLE_PEER_FAILED_VERIFICATION || rc == CURLE_SSL_ISSUER_ERROR
           || rc == CURLE_SSL_ENGINE_NOTFOUND || rc == CURLE_SSL_ENGINE_SETFAILED;
}


/* ---------------------------------------------------------------------------
 * Endpoint state: up, or down since a time with a backoff before the next probe
 * ------------------------------------------------------------------------- */

static void ep_up(struct endpoint *ep)
{
    ep->fails = 0;
    ep->down_since = ep->retry_at = 0;
}


/* The endpoint failed at `now` (why: msg): down, next probe after a doubling backoff. */
static void ep_down(struct endpoint *ep, double now, const char *msg)
{
    double backoff = ETCD_DOWN_MIN_MS;
    if (ep->fails == 0)
        ep->down_since = now;
    ep->fails++;
    for (int i = 1; i < ep->fails && backoff < ETCD_DOWN_MAX_MS; i++)
        backoff *= 2;
    ep->retry_at = now + (backoff < ETCD_DOWN_MAX_MS ? backoff : ETCD_DOWN_MAX_MS);
    ep->failures++;
    snprintf(ep->last_error, sizeof ep->last_error, "%s", msg);
}


/*
 * The order in which one call tries the endpoints (indexes into order[], all of them):
 * the endpoint that answered last if it is up, the other up endpoints after it in list
 * order, then those marked down, soonest due first, as a last resort (a call fails only
 * when every endpoint failed it or the time ran out). A plain read (not a stream) first
 * probes the down endpoint most overdue, but only while some endpoint is up, and sets
 * *probe: that attempt runs under ETCD_PROBE_MS.
 */
static int plan(const struct etcd *e, int flags, double now, int order[], int *probe)
{
    int n = 0, nd = 0, down[ETCD_ENDPOINTS_MAX];
    for (int k = 0; k < e->nendpoints; k++) {
        int idx = (e->cur + k) % e->nendpoints;
        if (e->ep[idx].fails == 0)
            order[n++] = idx;
        else
            down[nd++] = idx;
    }
    for (int i = 1; i < nd; i++)            /* insertion sort by retry_at (at most 16) */
        for (int j = i; j > 0 && e->ep[down[j]].retry_at < e->ep[down[j - 1]].retry_at; j--) {
            int t = down[j];
            down[j] = down[j - 1];
            down[j - 1] = t;
        }
    *probe = (flags & CALL_READ) && !(flags & CALL_STREAM) && n > 0 && nd > 0
             && e->ep[down[0]].retry_at <= now;
    if (*probe) {
        memmove(order + 1, order, (size_t)n * sizeof order[0]);
        order[0] = down[0];
        n++;
    }
    for (int i = *probe; i < nd; i++)
        order[n++] = down[i];
    return n;
}


/* ---------------------------------------------------------------------------
 * HTTP: one attempt at one endpoint, and the failover loop over them
 * ------------------------------------------------------------------------- */

/*
 * How one attempt ended. X_NOT_SENT means no byte of the request left this process
 * (connection refused, name not resolved, connect timeout, TLS handshake failed, reset
 * before the request was written): whatever the request, another endpoint may take it.
 * X_MAYBE_SENT is every other transport failure: the request may have reached etcd and
 * been applied (a reset or a timeout after sending proves nothing either way).
 */
enum xfer { X_ANSWER, X_NOT_SENT, X_MAYBE_SENT, X_FATAL };

/* What an answer (or a failed attempt) means for the call: see send_any. */
enum verdict { V_OK, V_ERROR, V_DOWN_SAFE, V_DOWN_MAYBE };


/* Reset the per-transfer state and point the handle at endpoint idx. */
static void attempt_setup(struct etcd *e, const char *url, const struct buf *body, int flags,
                          long limit_ms, long connect_ms)
{
    buf_reset(&e->resp);
    e->too_big = 0;
    e->stream = (flags & CALL_STREAM) != 0;
    e->stream_stop = 0;
    e->scan = 0;
    e->stream_rev = 0;
    e->errbuf[0] = '\0';
    curl_easy_setopt(e->curl, CURLOPT_URL, url);
    curl_easy_setopt(e->curl, CURLOPT_POSTFIELDS, body->p ? body->p : "");
    curl_easy_setopt(e->curl, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)body->len);
    curl_easy_setopt(e->curl, CURLOPT_TIMEOUT_MS, limit_ms > 0 ? limit_ms : 1L);
    curl_easy_setopt(e->curl, CURLOPT_CONNECTTIMEOUT_MS, connect_ms > 0 ? connect_ms : 1L);
}


/*
 * POST body to path at endpoint idx within limit_ms (connect_ms to connect). X_ANSWER:
 * *status is set and the answer is in e->resp. Otherwise r is filled: X_NOT_SENT and
 * X_MAYBE_SENT as above (a TLS failure of ours or the server's certificate is X_NOT_SENT
 * with code etcd.error), X_FATAL when no endpoint can do better (answer too large, out
 * of memory).
 */
static int http_attempt(struct etcd *e, int idx, const char *path, const struct buf *body, int flags,
                        long limit_ms, long connect_ms, long *status, struct res *r)
{
    const char *base = e->ep[idx].url;
    char url[ETCD_URL_MAX + 64];
    snprintf(url, sizeof url, "%s%s", base, path);
    attempt_setup(e, url, body, flags, limit_ms, connect_ms);
    CURLcode rc = curl_easy_perform(e->curl);
    e->stream = 0;

    long code = 0, reqsize = 0, hdrsize = 0;
    curl_easy_getinfo(e->curl, CURLINFO_RESPONSE_CODE, &code);
    curl_easy_getinfo(e->curl, CURLINFO_REQUEST_SIZE, &reqsize);     /* request bytes written */
    curl_easy_getinfo(e->curl, CURLINFO_HEADER_SIZE, &hdrsize);      /* answer header bytes read */
    int sent = reqsize > 0 || code != 0 || hdrsize > 0;
    if (rc == CURLE_OK || (rc == CURLE_WRITE_ERROR && e->stream_stop)
        || (rc == CURLE_OPERATION_TIMEDOUT && (flags & CALL_STREAM) && sent && (code == 0 || code == 200))) {
        *status = code ? code : 200;
        return X_ANSWER;
    }
    if (e->too_big)
        return res_fail(r, "etcd.error", 0, code, "%s: response larger than %zu MiB", url,
                        ETCD_RESP_MAX >> 20), X_FATAL;
    if (e->resp.failed)
        return res_fail(r, "etcd.error", 1, code, "%s: out of memory reading the response", url), X_FATAL;
    const char *why = e->errbuf[0] ? e->errbuf : curl_easy_strerror(rc);
    if (tls_config_error(rc))
        return res_fail(r, "etcd.error", 0, 0, "TLS failure: %s: %s", base, why), X_NOT_SENT;
    res_fail(r, "etcd.unavailable", 1, 0, "%s: %s", base, why);
    return sent ? X_MAYBE_SENT : X_NOT_SENT;
}


/*
 * Error answers in which etcd (or its gateway) says the request was never processed, so
 * that a write may be resent to another member. Each is produced before the request can
 * have reached raft:
 *   "the client connection is closing"   gRPC Canceled, HTTP 408: the gateway of a member
 *                                    that is stopping has closed its gRPC connection to the
 *                                    member; grpc-go refuses to start a stream on a closed
 *                                    connection (the streams already open finish: it closes
 *                                    gracefully). Other 408s, such as "request cancelled",
 *                                    may come after raft got the proposal: not on the list.
 *   "Error while dialing"            the gateway could not connect to its member at all.
 *   "etcdserver: no leader"          refused by the member's gRPC interceptor.
 *   "etcdserver: leader changed"     a linearizable read lost its read index (etcd 3.4
 *                                    returns it for reads and lease lookups only).
 *   "etcdserver: too many requests"  refused before proposing: apply lags commit.
 *   "raft proposal dropped"          raft refused the proposal (leadership transfer).
 * Not on the list, because the write may have been applied:
 *   "transport is closing"           gRPC Unavailable, HTTP 503, from a member that is
 *                                    stopping. grpc-go gives it to a new stream on a draining
 *                                    connection, but also to a stream in flight when the
 *                                    connection closes, after the member applied it (the
 *                                    answer is lost when the member closes the connection).
 *                                    Measured with the loop of spec/runtime/etcd_failover_spec
 *                                    on etcd 3.4.23 while it was still on this list: in 40
 *                                    clean stops of leaders and followers, 12 txns answered so
 *                                    had been applied (resent, their compare failed), while
 *                                    none of ~20 answered "the client connection is closing".
 *   "request timed out" (every variant), "server stopped": answers to a proposal already
 *                                    made, whose outcome the member did not wait for.
 * Why not resend a txn that may have been applied and let its compares sort it out: the
 * callers (scripts/forge/model.lua and its users) read only `succeeded`. A txn applied
 * once and resent fails its mod_revision compare against its own write, so the caller
 * would hear "you lost the race" for a change that is in the store: it answers 422
 * ConcurrencyError, or (model.update) re-reads and applies its change a second time. A txn
 * without compares, resent after another replica wrote the same keys, would silently
 * undo that write. So a write is resent only when it certainly was not applied; otherwise
 * the caller gets the retryable etcd.unavailable and decides, and the next call starts at
 * another endpoint.
 */
static const char *const not_processed[] = {
    "the client connection is closing", "Error while dialing", "etcdserver: no leader",
    "etcdserver: leader changed", "etcdserver: too many requests", "raft proposal dropped", NULL,
};


/* The verdict on an error answer: the member cannot serve now (SAFE: not processed), or a real answer. */
static int answer_verdict(long status, long long grpc, const char *text)
{
    for (int i = 0; not_processed[i]; i++)
        if (strstr(text, not_processed[i]))
            return V_DOWN_SAFE;
    if (grpc == 14 || grpc == 1)
        return V_DOWN_MAYBE;
    if (grpc == -1 && (status == 408 || status == 502 || status == 503 || status == 504))
        return V_DOWN_MAYBE;
    return V_ERROR;
}


/*
 * The message and gRPC code of the error answer decoded at obj into text and *grpc (-1 if
 * none). Stack: unchanged.
 */
static void error_text(lua_State *L, int obj, char *text, size_t textlen, long long *grpc)
{
    int top = lua_gettop(L), m = jfield(L, obj, "message");
    size_t len;
    if (lua_isnil(L, m))
        m = jfield(L, obj, "error");
    if (lua_istable(L, m)) {                            /* stream errors nest {grpc_code, message} */
        if (field_int(L, m, "grpc_code", -1, grpc) < 0)
            *grpc = -1;
        m = jfield(L, m, "message");
    } else if (field_int(L, obj, "code", -1, grpc) < 0) {
        *grpc = -1;
    }
    const char *msg = jstr(L, m, &len);
    if (msg)
        sanitize(text, textlen, msg, len);
    lua_settop(L, top);
}


/*
 * Turn an error answer from endpoint idx (non-200, or an in-band error object decoded at
 * obj, 0 if the answer is not JSON) into r, with r->grpc the gRPC status code (-1 if
 * unknown). The answer is in e->resp. Returns its verdict (never V_OK). Stack: unchanged.
 */
static int answer_error(lua_State *L, struct etcd *e, int idx, long status, int obj, struct res *r)
{
    char text[512] = "";
    long long grpc = -1;
    if (obj)
        error_text(L, obj, text, sizeof text, &grpc);
    if (!text[0])
        sanitize(text, sizeof text, e->resp.p ? e->resp.p : "", e->resp.len);
    if (!text[0])
        snprintf(text, sizeof text, "(empty answer)");

    char grpcs[32] = "";
    if (grpc >= 0)
        snprintf(grpcs, sizeof grpcs, ", grpc code %lld", grpc);
    int verdict = answer_verdict(status, grpc, text);
    const char *code = "etcd.error";
    int retryable = 0;
    switch (grpc) {
    case 4: case 8: case 10:                    /* DeadlineExceeded, ResourceExhausted, Aborted */
        code = "store.busy";
        retryable = 1;
        break;
    case 5:
        if (strstr(text, "lease not found"))
            code = "etcd.lease_not_found";
        break;
    case 11:
        if (strstr(text, "compacted"))
            code = "etcd.compacted";
        break;
    default:
        if (verdict != V_ERROR) {               /* Unavailable, Canceled, a gateway's 5xx/408 */
            code = "etcd.unavailable";
            retryable = 1;
        }
        break;
    }
    res_fail(r, code, retryable, status, "%s: HTTP %ld: %s%s", e->ep[idx].url, status, text, grpcs);
    r->grpc = grpc;
    return verdict;
}


/*
 * Read the answer of endpoint idx (status; the text in e->resp): V_OK with the answer
 * decoded (a stream is left to its reader), else r filled and the verdict of
 * answer_error (a malformed 200 answer is V_ERROR).
 * Stack: [...] -> [..., doc] for V_OK but a stream; else unchanged.
 */
static int read_answer(lua_State *L, struct etcd *e, int idx, long status, int flags, struct res *r)
{
    if (status == 200 && (flags & CALL_STREAM))
        return V_OK;
    int json = json_doc(L, e->resp.p ? e->resp.p : "", e->resp.len, r) == 0, doc = lua_gettop(L);
    if (status == 200 && !json)
        return V_ERROR;
    if (json) {
        int errobj = !lua_isnil(L, jfield(L, doc, "error"));
        lua_pop(L, 1);
        if (status == 200 && !errobj)
            return V_OK;
    }
    int verdict = answer_error(L, e, idx, status, json ? doc : 0, r);
    lua_settop(L, json ? doc - 1 : doc);
    return verdict;
}


/*
 * One attempt at endpoint idx, its outcome as a verdict (r filled unless V_OK); *fatal for
 * X_FATAL. Stack: as read_answer.
 */
static int attempt(lua_State *L, struct etcd *e, int idx, const char *path, const struct buf *body, int flags,
                   long limit_ms, long connect_ms, struct res *r, int *fatal)
{
    long status = 0;
    e->ep[idx].attempts++;
    int x = http_attempt(e, idx, path, body, flags, limit_ms, connect_ms, &status, r);
    *fatal = x == X_FATAL;
    if (x == X_ANSWER)
        return read_answer(L, e, idx, status, flags, r);
    if (x == X_FATAL)
        return V_ERROR;
    return x == X_NOT_SENT ? V_DOWN_SAFE : V_DOWN_MAYBE;
}


/* After every endpoint failed (or the time ran out): r as is for an etcd answer or a TLS failure. */
static int exhausted(struct res *r, double budget_ms)
{
    if (r->status || strcmp(r->code, "etcd.unavailable") != 0)
        return -1;
    char last[sizeof r->msg - 100];
    snprintf(last, sizeof last, "%.*s", (int)sizeof last - 1, r->msg);
    return res_fail(r, "etcd.unavailable", 1, 0, "no etcd endpoint answered (time budget %.0f ms; last: %s)",
                    budget_ms, last);
}


/*
 * POST body to path, trying the endpoints in plan() order until one answers or the time
 * runs out. An endpoint that fails (a transport failure, or an answer that says the member
 * cannot serve now) is marked down and the call moves on: a read always, a write only when
 * the request was certainly not processed (V_DOWN_SAFE). An endpoint that answers, even
 * with an error, is marked up and becomes the first choice of the next call. Each attempt
 * gets the time left, and an equal share of it to connect; a probe gets ETCD_PROBE_MS.
 * A stream that broke after it was created is not resent here (r->resume: the caller
 * resends it from where it was). Returns 0 (the answer read as read_answer says, so
 * decoded and pushed unless a stream) or -1 with r filled and the stack unchanged.
 */
static int send_any(lua_State *L, struct etcd *e, const char *path, const struct buf *body, int flags,
                    double deadline, struct res *r)
{
    int order[ETCD_ENDPOINTS_MAX], probe, fatal;
    double start = now_ms();
    e->L = L;
    int n = plan(e, flags, start, order, &probe);
    res_fail(r, "etcd.unavailable", 1, 0, "no attempt made");
    for (int k = 0; k < n; k++) {
        int idx = order[k];
        double left = deadline - now_ms();
        if (left < 1)
            break;
        long limit = (long)left, connect = (long)(left / (n - k));
        if (k == 0 && probe)
            limit = connect = left < ETCD_PROBE_MS ? (long)left : ETCD_PROBE_MS;
        int v = attempt(L, e, idx, path, body, flags, limit, connect, r, &fatal);
        if (fatal)
            return -1;
        if (v == V_OK || v == V_ERROR) {
            ep_up(&e->ep[idx]);
            e->cur = idx;
            return v == V_OK ? 0 : -1;
        }
        ep_down(&e->ep[idx], now_ms(), r->msg);
        if ((flags & CALL_STREAM) && e->stream_rev > 0) {
            r->resume = 1;
            return -1;
        }
        if (v == V_DOWN_MAYBE && !(flags & CALL_READ)) {
            size_t len = strlen(r->msg);
            snprintf(r->msg + len, sizeof r->msg - len, "; the request was sent, it may or may not have been applied");
            return -1;
        }
    }
    return exhausted(r, deadline - start);
}


/* Keep the auth token of the authenticate answer decoded at doc. Returns 0 or -1 with r filled. */
static int keep_token(lua_State *L, struct etcd *e, int doc, struct res *r)
{
    size_t len;
    const char *t = jstr(L, jfield(L, doc, "token"), &len);
    if (!t || len == 0)
        return malformed(r, "no token in the authenticate answer");
    for (size_t i = 0; i < len; i++)
        if ((unsigned char)t[i] < 0x20 || (unsigned char)t[i] == 0x7F)
            return malformed(r, "control character in the auth token");
    char *token = strdup(t);
    if (!token)
        return res_fail(r, "etcd.error", 1, 0, "out of memory");
    free(e->token);
    e->token = token;
    if (set_headers(e) < 0) {
        free(e->token);
        e->token = NULL;
        return res_fail(r, "etcd.error", 1, 0, "out of memory");
    }
    return 0;
}


/*
 * Authenticate as e->username: POST /v3/auth/authenticate, keep the token.
 * Clobbers e->resp. Returns 0 or -1 with r filled. Stack: unchanged.
 */
static int authenticate(lua_State *L, struct etcd *e, double deadline, struct res *r)
{
    buf_reset(&e->aux);
    buf_adds(&e->aux, "{\"name\":");
    buf_addjstr(&e->aux, e->username);
    buf_adds(&e->aux, ",\"password\":");
    buf_addjstr(&e->aux, e->password);
    buf_adds(&e->aux, "}");
    if (e->aux.failed)
        return res_fail(r, "etcd.error", 1, 0, "out of memory");
    int rc = send_any(L, e, "/v3/auth/authenticate", &e->aux, CALL_READ, deadline, r);
    memset(e->aux.p, 0, e->aux.len);            /* the password */
    buf_reset(&e->aux);
    if (rc < 0) {
        if (r->status && r->status != 200) {
            char inner[800];
            snprintf(inner, sizeof inner, "%.799s", r->msg);
            snprintf(r->msg, sizeof r->msg, "authentication as '%.200s' failed: %s", e->username, inner);
        }
        return -1;
    }
    int doc = lua_gettop(L);
    rc = keep_token(L, e, doc, r);
    lua_settop(L, doc - 1);
    return rc;
}


/*
 * Send e->req to path and read the answer. On success returns 0 with the answer in
 * e->resp, decoded and pushed unless CALL_STREAM. Handles authentication, one
 * re-authentication on an invalid token, and failover (send_any).
 * Returns -1 with r filled on failure.
 * Stack: [...] -> [..., doc] on success (but for a stream); else unchanged.
 */
static int etcd_call(lua_State *L, struct etcd *e, const char *path, int flags, long budget_ms, struct res *r)
{
    double deadline = now_ms() + (double)budget_ms;
    int reauthed = 0;
    if (e->req.failed)
        return res_fail(r, "etcd.error", 1, 0, "out of memory building the request");
    for (;;) {
        if (e->username && !e->token && authenticate(L, e, deadline, r) < 0)
            return -1;
        if (send_any(L, e, path, &e->req, flags, deadline, r) == 0)
            return 0;
        if (r->grpc == 16 && e->username && !reauthed) {
            reauthed = 1;
            drop_token(e);
            continue;
        }
        return -1;
    }
}


/* ---------------------------------------------------------------------------
 * Request builders (no Lua; strings point into Lua values anchored by the caller)
 * ------------------------------------------------------------------------- */

static void req_begin(struct etcd *e)
{
    etcd_trim(e);
}


/* "key" as base64 of prefix || key */
static void add_key(struct etcd *e, struct buf *b, const char *key, size_t klen)
{
    buf_add(b, "\"", 1);
    buf_addb64(b, e->prefix, e->plen, key, klen);
    buf_add(b, "\"", 1);
}


/*
 * "key":..,"range_end":.. covering every key that starts with prefix || p,
 * from prefix || from on when from is not NULL (a key starting with p).
 * range_end is the prefix with its last non-0xFF byte incremented; "\0" means
 * "to the end" (etcd's convention), also used for the empty prefix from "\0".
 */
static void add_range_from(struct etcd *e, struct buf *b, const char *p, size_t plen, const char *from,
                           size_t flen)
{
    char full[ETCD_PREFIX_MAX + ETCD_KEY_MAX];
    size_t n = e->plen + plen;
    if (n == 0 && !from) {
        buf_adds(b, "\"key\":\"AA==\",\"range_end\":\"AA==\"");
        return;
    }
    memcpy(full, e->prefix, e->plen);
    buf_adds(b, "\"key\":\"");
    if (from) {
        memcpy(full + e->plen, from, flen);
        buf_addb64(b, full, e->plen + flen, NULL, 0);
    } else {
        memcpy(full + e->plen, p, plen);
        buf_addb64(b, full, n, NULL, 0);
    }
    if (plen)
        memcpy(full + e->plen, p, plen);
    buf_adds(b, "\",\"range_end\":\"");
    while (n > 0 && (unsigned char)full[n - 1] == 0xFF)
        n--;
    if (n == 0) {
        buf_adds(b, "AA==\"");
        return;
    }
    full[n - 1] = (char)((unsigned char)full[n - 1] + 1);
    buf_addb64(b, full, n, NULL, 0);
    buf_adds(b, "\"");
}


static void add_range_keys(struct etcd *e, struct buf *b, const char *p, size_t plen)
{
    add_range_from(e, b, p, plen, NULL, 0);
}


static void add_cmp(struct etcd *e, struct buf *b, const struct txn_cmp *c)
{
    buf_adds(b, "{\"key\":");
    add_key(e, b, c->key, c->klen);
    switch (c->kind) {
    case TXN_CMP_MODREV:
        if (c->n == 0) {        /* absent: never created */
            buf_adds(b, ",\"target\":\"CREATE\",\"result\":\"EQUAL\",\"create_revision\":\"0\"}");
            return;
        }
        buf_adds(b, ",\"target\":\"MOD\",\"result\":\"EQUAL\",\"mod_revision\":");
        buf_addint(b, (long long)c->n);
        break;
    case TXN_CMP_EXISTS:
        buf_adds(b, c->n ? ",\"target\":\"VERSION\",\"result\":\"GREATER\",\"version\":\"0\""
                         : ",\"target\":\"VERSION\",\"result\":\"EQUAL\",\"version\":\"0\"");
        break;
    default:
        buf_adds(b, ",\"target\":\"VALUE\",\"result\":\"EQUAL\",\"value\":\"");
        buf_addb64(b, c->val, c->vlen, NULL, 0);
        buf_adds(b, "\"");
        break;
    }
    buf_adds(b, "}");
}


/* A PutRequest / DeleteRangeRequest body, without the op wrapper. */
static void add_op_body(struct etcd *e, struct buf *b, const struct txn_op *o)
{
    buf_adds(b, "{");
    if (o->kind == TXN_OP_DELPREFIX) {
        add_range_keys(e, b, o->key, o->klen);
    } else {
        buf_adds(b, "\"key\":");
        add_key(e, b, o->key, o->klen);
    }
    if (o->kind == TXN_OP_PUT) {
        buf_adds(b, ",\"value\":\"");
        buf_addb64(b, o->val, o->vlen, NULL, 0);
        buf_adds(b, "\"");
        if (o->lease) {
            buf_adds(b, ",\"lease\":");
            buf_addint(b, (long long)o->lease);
        }
    }
    buf_adds(b, "}");
}


static void add_op(struct etcd *e, struct buf *b, const struct txn_op *o)
{
    buf_adds(b, o->kind == TXN_OP_PUT ? "{\"request_put\":" : "{\"request_delete_range\":");
    add_op_body(e, b, o);
    buf_adds(b, "}");
}


/*
 * A TxnRequest. With probe_key, the failure branch instead reads that key (to
 * report the mod_revision found on a CAS conflict).
 */
static void build_txn(struct etcd *e, const struct txn_cmp *cmps, size_t ncmp,
                      const struct txn_op *const ops[2], const size_t nops[2], const struct txn_cmp *probe)
{
    struct buf *b = &e->req;
    buf_adds(b, "{\"compare\":[");
    for (size_t i = 0; i < ncmp; i++) {
        if (i)
            buf_adds(b, ",");
        add_cmp(e, b, &cmps[i]);
    }
    for (int br = 0; br < 2; br++) {
        buf_adds(b, br == 0 ? "],\"success\":[" : "],\"failure\":[");
        if (br == 1 && probe) {
            buf_adds(b, "{\"request_range\":{\"key\":");
            add_key(e, b, probe->key, probe->klen);
            buf_adds(b, "}}");
            continue;
        }
        for (size_t i = 0; i < nops[br]; i++) {
            if (i)
                buf_adds(b, ",");
            add_op(e, b, &ops[br][i]);
        }
    }
    buf_adds(b, "]}");
}


/* ---------------------------------------------------------------------------
 * Answer readers
 * ------------------------------------------------------------------------- */

/* The revision in the header of the answer decoded at doc. Stack: unchanged. */
static int header_revision(lua_State *L, int doc, long long *rev, struct res *r)
{
    if (header_rev(L, doc, 0, rev) < 0 || *rev <= 0)
        return malformed(r, "no header revision");
    return 0;
}


/* The key of the kv record at kv, into e->scratch; 0, or -1 (not base64, outside the prefix). */
static int kv_key(lua_State *L, struct etcd *e, int kv)
{
    if (field_bytes(L, kv, "key", &e->scratch) < 0)
        return -1;
    return e->scratch.len >= e->plen && memcmp(e->scratch.p, e->prefix, e->plen) == 0 ? 0 : -1;
}


/*
 * Push the kv record decoded at kv, its key stripped of the namespace.
 * Stack: [...] -> [..., kv] and returns 0; or unchanged and -1 with r filled.
 * May raise (memory) once the strings are being pushed.
 */
static int push_kv(lua_State *L, struct etcd *e, int kv, struct res *r)
{
    long long crev, mrev, ver, lease;
    if (!lua_istable(L, kv)
        || field_int(L, kv, "create_revision", 0, &crev) < 0
        || field_int(L, kv, "mod_revision", 0, &mrev) < 0
        || field_int(L, kv, "version", 0, &ver) < 0
        || field_int(L, kv, "lease", 0, &lease) < 0)
        return malformed(r, "bad kv record");
    if (kv_key(L, e, kv) < 0)
        return malformed(r, "bad key (not base64, or outside the prefix)");
    lua_createtable(L, 0, 6);
    lua_pushlstring(L, e->scratch.p + e->plen, e->scratch.len - e->plen);
    lua_setfield(L, -2, "key");
    if (field_bytes(L, kv, "value", &e->scratch) < 0) {
        lua_pop(L, 1);
        return malformed(r, "bad value encoding");
    }
    lua_pushlstring(L, e->scratch.p, e->scratch.len);
    lua_setfield(L, -2, "value");
    lua_pushinteger(L, (lua_Integer)crev);
    lua_setfield(L, -2, "create_revision");
    lua_pushinteger(L, (lua_Integer)mrev);
    lua_setfield(L, -2, "mod_revision");
    lua_pushinteger(L, (lua_Integer)ver);
    lua_setfield(L, -2, "version");
    if (lease) {
        lua_pushinteger(L, (lua_Integer)lease);
        lua_setfield(L, -2, "lease");
    }
    return 0;
}


/*
 * Push `nil, err` for r, prefixed with what; err.status is the HTTP status when
 * there was one.
 * Stack: [...] -> [..., nil, err]; returns 2.
 */
static int push_res(lua_State *L, struct etcd *e, const struct res *r, const char *what)
{
    etcd_trim(e);
    forge_pusherror(L, r->code, r->retryable, "%s: %s", what, r->msg);
    if (r->status) {
        lua_pushinteger(L, r->status);
        lua_setfield(L, -2, "status");
    }
    if (r->compact_revision) {
        lua_pushinteger(L, (lua_Integer)r->compact_revision);
        lua_setfield(L, -2, "compact_revision");
    }
    return 2;
}


/* Stack: [...] -> [..., nil, err]; returns 2. key has no NUL (checked). */
static int push_conflict(lua_State *L, struct etcd *e, const char *what, const char *key,
                         lua_Integer expected, long long found)
{
    char exp[32], fnd[32];
    etcd_trim(e);
    snprintf(exp, sizeof exp, LUA_INTEGER_FMT, (LUAI_UACINT)expected);
    snprintf(fnd, sizeof fnd, "%lld", found);
    if (expected == 0)
        return forge_pusherror(L, "store.conflict", 0,
                               "%s '%s': expected the key to be absent (mod_revision 0), found mod_revision %s",
                               what, key, fnd);
    return forge_pusherror(L, "store.conflict", 0, "%s '%s': expected mod_revision %s, found %s%s",
                           what, key, exp, fnd, found == 0 ? " (key absent)" : "");
}


/* ---------------------------------------------------------------------------
 * Argument checks (may raise; run before any request)
 * ------------------------------------------------------------------------- */

static struct etcd *etcd_check(lua_State *L, int idx)
{
    struct etcd *e = luaL_checkudata(L, idx, ETCD_MT);
    if (!e->curl)
        luaL_error(L, "store is closed");
    return e;
}


/* A lease id: an integer > 0. */
static lua_Integer check_lease_value(lua_State *L, int idx, const char *what)
{
    int isint;
    lua_Integer id = lua_tointegerx(L, idx, &isint);
    if (!isint || lua_type(L, idx) != LUA_TNUMBER || id <= 0)
        luaL_error(L, "%s: lease must be an integer id > 0", what);
    return id;
}


/* etcd bounds compare values like put values, and a txn put may carry a lease. */
static const struct txn_rules etcd_txn_rules = {.bound_cmp_value = 1, .check_lease = check_lease_value};
_Static_assert(ETCD_KEY_MAX == TXN_KEY_MAX && ETCD_VALUE_MAX == TXN_VALUE_MAX, "etcd and txn limits differ");


/*
 * Options of put/delete at arg: {prev_revision=n} (and {lease=id} for put).
 * Returns 1 and sets *prev if prev_revision was given. Stack unchanged.
 */
static int opt_write(lua_State *L, int arg, const char *what, int allow_lease,
                     lua_Integer *prev, lua_Integer *lease)
{
    static const char *const put_keys[] = {"prev_revision", "lease", NULL};
    static const char *const del_keys[] = {"prev_revision", NULL};
    int given = 0;
    if (lua_isnoneornil(L, arg))
        return 0;
    luaL_checktype(L, arg, LUA_TTABLE);
    forge_checkkeys(L, arg, what, allow_lease ? put_keys : del_keys);
    if (lua_getfield(L, arg, "prev_revision") != LUA_TNIL) {
        *prev = forge_optintfield(L, arg, "prev_revision", 0);
        luaL_argcheck(L, *prev >= 0, arg, "prev_revision must be >= 0");
        given = 1;
    }
    lua_pop(L, 1);
    if (allow_lease) {
        if (lua_getfield(L, arg, "lease") != LUA_TNIL)
            *lease = check_lease_value(L, -1, what);
        lua_pop(L, 1);
    }
    return given;
}


/* ---------------------------------------------------------------------------
 * Lua API
 * ------------------------------------------------------------------------- */

/* A copy of s in *dst (owned by the db); raises on memory failure (the db's __gc frees). */
static void set_string(lua_State *L, char **dst, const char *s, size_t len)
{
    char *p = malloc(len + 1);
    if (!p)
        luaL_error(L, "etcd.open: out of memory");
    memcpy(p, s, len);
    p[len] = '\0';
    *dst = p;
}


/* An optional string option without NUL bytes; NULL when absent. Stack unchanged. */
static const char *opt_string(lua_State *L, int idx, const char *name, size_t *len)
{
    const char *s = forge_optstrfield(L, idx, name, NULL);
    *len = s ? strlen(s) : 0;
    if (s) {
        lua_getfield(L, idx, name);
        size_t full = lua_rawlen(L, -1);
        lua_pop(L, 1);
        if (full != *len)
            luaL_error(L, "etcd.open: option '%s' contains a NUL byte", name);
    }
    return s;
}


/***
 * Connect to etcd (v3 JSON gateway) and check that it answers.
 * @function etcd.open
 * @tparam table opts `{endpoints={"http://127.0.0.1:2379", ...}, prefix="forge/",
 *   timeout_ms=5000, username=, password=, cacert=, cert=, key=}`: endpoints are
 *   tried in order, one that fails is skipped for a while (see the top of the file);
 *   prefix namespaces every key (stripped on
 *   the way out); timeout_ms bounds each call (every endpoint tried within it);
 *   username/password turn on etcd auth; cacert/cert/key are PEM files for TLS
 *   (server verification is always on).
 * @return db (userdata "forge.etcd.db"), or nil, err (etcd.unavailable when no
 *   endpoint answers, etcd.error for auth or TLS failures)
 */
static int l_open(lua_State *L)
{
    static const char *const keys[] = {"endpoints", "prefix", "timeout_ms", "username", "password",
                                       "cacert", "cert", "key", NULL};
    luaL_argexpected(L, lua_istable(L, 1), 1, "table (usage: etcd.open{endpoints={url, ...}, prefix=?, ...})");
    lua_settop(L, 1);
    forge_checkkeys(L, 1, "etcd.open", keys);

    if (lua_getfield(L, 1, "endpoints") != LUA_TTABLE)
        return luaL_error(L, "etcd.open: 'endpoints' must be an array of URLs (usage: "
                             "etcd.open{endpoints={\"http://127.0.0.1:2379\"}})");
    int eps = lua_gettop(L);                                /* [opts, endpoints] */
    lua_Integer nep = (lua_Integer)lua_rawlen(L, eps), count = 0;
    lua_pushnil(L);
    while (lua_next(L, eps)) {
        lua_pop(L, 1);
        count++;
    }
    if (nep < 1 || nep > ETCD_ENDPOINTS_MAX || count != nep)
        return luaL_error(L, "etcd.open: 'endpoints' must be an array of 1 to %d URLs", ETCD_ENDPOINTS_MAX);
    for (lua_Integer i = 1; i <= nep; i++) {
        if (lua_rawgeti(L, eps, i) != LUA_TSTRING)
            return luaL_error(L, "etcd.open: endpoints[%d] must be a string", (int)i);
        size_t len;
        const char *u = lua_tolstring(L, -1, &len);
        int ok = len < ETCD_URL_MAX && (strncmp(u, "http://", 7) == 0 || strncmp(u, "https://", 8) == 0)
                 && len > (size_t)(u[4] == 's' ? 8 : 7);
        for (size_t j = 0; ok && j < len; j++)
            ok = (unsigned char)u[j] > 0x20 && (unsigned char)u[j] < 0x7F;
        if (!ok)
            return luaL_error(L, "etcd.open: endpoints[%d] must be an http:// or https:// URL "
                                 "(printable, under %d bytes)", (int)i, ETCD_URL_MAX);
        lua_pop(L, 1);
    }

    size_t plen = 0, ulen, pwlen, calen, certlen, keylen;
    const char *prefix = forge_optstrfield(L, 1, "prefix", "");
    lua_getfield(L, 1, "prefix");
    plen = lua_isstring(L, -1) ? lua_rawlen(L, -1) : 0;
    lua_pop(L, 1);
    if (plen > ETCD_PREFIX_MAX || memchr(prefix, '\0', plen))
        return luaL_error(L, "etcd.open: 'prefix' must be at most %d bytes, without NUL", ETCD_PREFIX_MAX);
    lua_Integer timeout = forge_optintfield(L, 1, "timeout_ms", ETCD_TIMEOUT_MS);
    if (timeout < 1 || timeout > ETCD_TIMEOUT_MAX)
        return luaL_error(L, "etcd.open: 'timeout_ms' must be 1..%d", ETCD_TIMEOUT_MAX);
    const char *user = opt_string(L, 1, "username", &ulen);
    const char *pass = opt_string(L, 1, "password", &pwlen);
    const char *cacert = opt_string(L, 1, "cacert", &calen);
    const char *cert = opt_string(L, 1, "cert", &certlen);
    const char *key = opt_string(L, 1, "key", &keylen);
    if ((user == NULL) != (pass == NULL) || (user && ulen == 0))
        return luaL_error(L, "etcd.open: 'username' and 'password' go together (username non-empty)");
    if (key && !cert)
        return luaL_error(L, "etcd.open: 'key' needs 'cert'");

    struct etcd *e = lua_newuserdatauv(L, sizeof *e, 0);
    memset(e, 0, sizeof *e);
    luaL_setmetatable(L, ETCD_MT);                      /* from here __gc owns everything */
    for (lua_Integer i = 1; i <= nep; i++) {
        size_t len;
        lua_rawgeti(L, eps, i);
        const char *u = lua_tolstring(L, -1, &len);
        while (len > 0 && u[len - 1] == '/')
            len--;
        set_string(L, &e->ep[i - 1].url, u, len);
        e->nendpoints = (int)i;
        lua_pop(L, 1);
    }
    set_string(L, &e->prefix, prefix, plen);
    e->plen = plen;
    e->timeout_ms = (long)timeout;
    if (user) {
        set_string(L, &e->username, user, ulen);
        set_string(L, &e->password, pass, pwlen);
    }

    if (!(e->curl = curl_easy_init()))
        return luaL_error(L, "etcd.open: cannot create a curl handle");
    CURL *c = e->curl;
    curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, write_cb);
    curl_easy_setopt(c, CURLOPT_WRITEDATA, e);
    curl_easy_setopt(c, CURLOPT_ERRORBUFFER, e->errbuf);
    curl_easy_setopt(c, CURLOPT_PROTOCOLS_STR, "http,https");
    curl_easy_setopt(c, CURLOPT_TCP_KEEPALIVE, 1L);
    curl_easy_setopt(c, CURLOPT_TCP_NODELAY, 1L);
    curl_easy_setopt(c, CURLOPT_SSL_VERIFYPEER, 1L);
    curl_easy_setopt(c, CURLOPT_SSL_VERIFYHOST, 2L);
    curl_easy_setopt(c, CURLOPT_USERAGENT, "forge-etcd/" FORGE_VERSION);
    if (cacert)
        curl_easy_setopt(c, CURLOPT_CAINFO, cacert);    /* curl copies option strings */
    if (cert)
        curl_easy_setopt(c, CURLOPT_SSLCERT, cert);
    if (key)
        curl_easy_setopt(c, CURLOPT_SSLKEY, key);
    if (set_headers(e) < 0)
        return luaL_error(L, "etcd.open: out of memory");

    /* Check now that some endpoint answers (and that the credentials work). */
    struct res r;
    int rc;
    if (e->username) {
        rc = authenticate(L, e, now_ms() + (double)e->timeout_ms, &r);
    } else {
        req_begin(e);
        buf_adds(&e->req, "{\"key\":\"AA==\",\"count_only\":true}");
        rc = etcd_call(L, e, "/v3/kv/range", CALL_READ, e->timeout_ms, &r);
        if (rc == 0)
            lua_pop(L, 1);                              /* [opts, endpoints, db] */
    }
    if (rc < 0) {
        push_res(L, e, &r, "etcd.open");
        etcd_release(e);
        return 2;
    }
    etcd_trim(e);
    return 1;
}


/***
 * Close the connection (also done by __gc and __close). Idempotent.
 * @function db:close
 */
static int l_close(lua_State *L)
{
    etcd_release(luaL_checkudata(L, 1, ETCD_MT));
    return 0;
}


/***
 * @function db:__tostring
 * @return "forge.etcd.db (endpoint that answered last, prefix '...')" or "forge.etcd.db (closed)"
 */
static int l_tostring(lua_State *L)
{
    struct etcd *e = luaL_checkudata(L, 1, ETCD_MT);
    if (!e->curl)
        lua_pushliteral(L, "forge.etcd.db (closed)");
    else
        lua_pushfstring(L, "forge.etcd.db (%s, prefix '%s')", e->ep[e->cur].url, e->prefix);
    return 1;
}


/* Push the state of endpoint i as a table. Stack: [...] -> [..., t] */
static void push_endpoint(lua_State *L, const struct etcd *e, int i, double now)
{
    const struct endpoint *ep = &e->ep[i];
    lua_createtable(L, 0, 9);
    lua_pushstring(L, ep->url);
    lua_setfield(L, -2, "url");
    lua_pushboolean(L, i == e->cur);
    lua_setfield(L, -2, "current");
    lua_pushboolean(L, ep->fails == 0);
    lua_setfield(L, -2, "up");
    lua_pushinteger(L, (lua_Integer)ep->attempts);
    lua_setfield(L, -2, "attempts");
    lua_pushinteger(L, (lua_Integer)ep->failures);
    lua_setfield(L, -2, "failures");
    if (ep->fails) {
        lua_pushinteger(L, ep->fails);
        lua_setfield(L, -2, "fails_in_a_row");
        lua_pushinteger(L, (lua_Integer)(now - ep->down_since));
        lua_setfield(L, -2, "down_ms");
        lua_pushinteger(L, (lua_Integer)(ep->retry_at > now ? ep->retry_at - now : 0));
        lua_setfield(L, -2, "retry_in_ms");
    }
    if (ep->last_error[0]) {
        lua_pushstring(L, ep->last_error);
        lua_setfield(L, -2, "last_error");
    }
}


/***
 * What the db knows of its endpoints, in the order they were given.
 * @function db:endpoints
 * @return array of `{url=, current=bool (answered last), up=bool, attempts=n, failures=n,
 *   fails_in_a_row=n, down_ms=n, retry_in_ms=n (these three while down; 0 ms: a read
 *   probes it next), last_error=string (once one failed)}`
 */
static int l_endpoints(lua_State *L)
{
    struct etcd *e = checkdb(L);
    double now = now_ms();
    lua_createtable(L, e->nendpoints, 0);                   /* [db, list] */
    for (int i = 0; i < e->nendpoints; i++) {
        push_endpoint(L, e, i, now);                        /* [db, list, t] */
        lua_rawseti(L, -2, i + 1);                          /* [db, list] */
    }
    return 1;
}


/***
 * Read one key.
 * @function db:get
 * @tparam string key
 * @return kv `{key=, value=, create_revision=, mod_revision=, version=}` (plus
 *   `lease=id` when attached to a lease); nil (absent, no second value); or nil, err
 */
static int l_get(lua_State *L)
{
    struct etcd *e = checkdb(L);
    size_t klen;
    const char *k = forge_txn_checkkey(L, 2, &klen, 0);
    struct res r;
    req_begin(e);
    buf_adds(&e->req, "{\"key\":");
    add_key(e, &e->req, k, klen);
    buf_adds(&e->req, "}");
    if (etcd_call(L, e, "/v3/kv/range", CALL_READ, e->timeout_ms, &r) < 0)
        return push_res(L, e, &r, "get");
    int kvs = jfield(L, lua_gettop(L), "kvs");                    /* [db, key, doc, kvs] */
    long n = jlen(L, kvs);
    if (n < 0)
        return malformed(&r, "kvs is not an array"), push_res(L, e, &r, "get");
    if (n == 0) {
        etcd_trim(e);
        lua_pushnil(L);
        return 1;
    }
    if (push_kv(L, e, jindex(L, kvs, 1), &r) < 0)
        return push_res(L, e, &r, "get");
    etcd_trim(e);
    return 1;
}


/***
 * Every key starting with prefix, sorted by key (byte order).
 * @function db:range
 * @tparam string prefix "" for all keys (of the namespace)
 * @tparam[opt] table opts `{limit=n, from=key}`: limit 0 or absent: no limit; from: start at
 * this key (it starts with prefix), for reading a long range page by page
 * @return array of kv, etcd revision of the snapshot; or nil, err
 */
static int l_range(lua_State *L)
{
    static const char *const keys[] = {"limit", "from", NULL};
    struct etcd *e = checkdb(L);
    size_t plen, flen = 0;
    const char *p = forge_txn_checkkey(L, 2, &plen, 1);
    const char *from = NULL;
    lua_Integer limit = 0;
    if (!lua_isnoneornil(L, 3)) {
        luaL_checktype(L, 3, LUA_TTABLE);
        forge_checkkeys(L, 3, "range", keys);
        limit = forge_optintfield(L, 3, "limit", 0);
        luaL_argcheck(L, limit >= 0, 3, "limit must be >= 0");
        from = forge_range_from(L, 3, p, plen, &flen);
    }
    struct res r;
    req_begin(e);
    buf_adds(&e->req, "{");
    add_range_from(e, &e->req, p, plen, from, flen);
    if (limit > 0) {
        buf_adds(&e->req, ",\"limit\":");
        buf_addint(&e->req, (long long)limit);
    }
    buf_adds(&e->req, "}");
    if (etcd_call(L, e, "/v3/kv/range", CALL_READ, e->timeout_ms, &r) < 0)
        return push_res(L, e, &r, "range");
    long long rev;
    int doc = lua_gettop(L), kvs = jfield(L, doc, "kvs");
    long n = jlen(L, kvs);
    if (header_revision(L, doc, &rev, &r) < 0 || (n < 0 && malformed(&r, "kvs is not an array")))
        return push_res(L, e, &r, "range");
    lua_createtable(L, (int)(n < INT_MAX ? n : 0), 0);            /* [..., doc, kvs, list] */
    int list = lua_gettop(L);
    for (lua_Integer i = 1; i <= n; i++) {
        if (push_kv(L, e, jindex(L, kvs, i), &r) < 0)             /* [..., list, raw, kv] */
            return push_res(L, e, &r, "range");
        lua_rawseti(L, list, i);
        lua_pop(L, 1);
    }
    lua_pushinteger(L, (lua_Integer)rev);
    etcd_trim(e);
    return 2;
}


/*
 * A single put or delete, with prev_revision as a CAS txn. On success pushes
 * the revision (and the deleted count for a delete).
 */
static int write_one(lua_State *L, struct etcd *e, const char *what, const struct txn_op *o,
                     int cas, lua_Integer prev)
{
    struct res r;
    long long rev, deleted = 0;
    req_begin(e);
    if (!cas) {
        add_op_body(e, &e->req, o);
        if (etcd_call(L, e, o->kind == TXN_OP_PUT ? "/v3/kv/put" : "/v3/kv/deleterange", 0, e->timeout_ms, &r) < 0)
            return push_res(L, e, &r, what);
        int doc = lua_gettop(L);
        if (header_revision(L, doc, &rev, &r) < 0
            || field_int(L, doc, "deleted", 0, &deleted) < 0)
            return malformed(&r, "bad deleted count"), push_res(L, e, &r, what);
    } else {
        struct txn_cmp c = {.kind = TXN_CMP_MODREV, .key = o->key, .klen = o->klen, .n = prev};
        const struct txn_op *ops[2] = {o, NULL};
        const size_t nops[2] = {1, 0};
        build_txn(e, &c, 1, ops, nops, &c);
        if (etcd_call(L, e, "/v3/kv/txn", 0, e->timeout_ms, &r) < 0)
            return push_res(L, e, &r, what);
        int doc = lua_gettop(L), ok = field_bool(L, doc, "succeeded");
        if (ok < 0 || header_revision(L, doc, &rev, &r) < 0)
            return malformed(&r, "bad txn answer"), push_res(L, e, &r, what);
        int resp = jfield(L, doc, "responses");
        if (jlen(L, resp) != 1)
            return malformed(&r, "txn answer without its response"), push_res(L, e, &r, what);
        int first = jindex(L, resp, 1);
        if (!ok) {
            int kvs = jfield(L, jfield(L, first, "response_range"), "kvs");
            long long found = 0;
            long n = jlen(L, kvs);
            if (n < 0 || (n > 0 && field_int(L, jindex(L, kvs, 1), "mod_revision", 0, &found) < 0))
                return malformed(&r, "bad range in txn answer"), push_res(L, e, &r, what);
            return push_conflict(L, e, what, o->key, prev, found);
        }
        if (o->kind != TXN_OP_PUT
            && field_int(L, jfield(L, first, "response_delete_range"), "deleted", 0, &deleted) < 0)
            return malformed(&r, "bad deleted count"), push_res(L, e, &r, what);
    }
    etcd_trim(e);
    lua_pushinteger(L, (lua_Integer)rev);
    if (o->kind == TXN_OP_PUT)
        return 1;
    lua_pushinteger(L, (lua_Integer)deleted);
    return 2;
}


/***
 * Write a key.
 * @function db:put
 * @tparam string key
 * @tparam string value any bytes, at most 8 MiB
 * @tparam[opt] table opts `{prev_revision=n}`: only if the key's mod_revision is n
 *   (0: absent); `{lease=id}`: attach the key to a lease (deleted when it expires)
 * @return new revision; or nil, err (store.conflict when prev_revision does not match)
 */
static int l_put(lua_State *L)
{
    struct etcd *e = checkdb(L);
    struct txn_op o = {.kind = TXN_OP_PUT};
    lua_Integer prev = 0;
    o.key = forge_txn_checkkey(L, 2, &o.klen, 0);
    o.val = forge_txn_checkvalue(L, 3, &o.vlen);
    int cas = opt_write(L, 4, "put", 1, &prev, &o.lease);
    return write_one(L, e, "put", &o, cas, prev);
}


/***
 * Delete a key.
 * @function db:delete
 * @tparam string key
 * @tparam[opt] table opts `{prev_revision=n}` as for put
 * @return revision (new if something was deleted), deleted count (0 or 1); or nil, err
 */
static int l_delete(lua_State *L)
{
    struct etcd *e = checkdb(L);
    struct txn_op o = {.kind = TXN_OP_DELETE};
    lua_Integer prev = 0, lease = 0;
    o.key = forge_txn_checkkey(L, 2, &o.klen, 0);
    int cas = opt_write(L, 3, "delete", 0, &prev, &lease);
    return write_one(L, e, "delete", &o, cas, prev);
}


/***
 * Atomic compare-then-write (one etcd txn).
 * @function db:txn
 * @tparam table t `{compare={...}, success={...}, failure={...}}`; compares are
 *   `{key=, mod_revision=n}` (0: absent), `{key=, exists=bool}`, `{key=, value=s}`;
 *   ops are `{op="put", key=, value=, lease=?}`, `{op="delete", key=}`,
 *   `{op="delete_prefix", prefix=}`
 * @return succeeded (all compares held: success applied, else failure applied),
 *   revision after the txn; or nil, err
 */
static int l_txn(lua_State *L)
{
    static const char *const keys[] = {"compare", "success", "failure", NULL};
    struct etcd *e = checkdb(L);
    luaL_argexpected(L, lua_istable(L, 2), 2, "table (" TXN_USAGE ")");
    lua_settop(L, 2);
    forge_checkkeys(L, 2, "txn", keys);

    struct txn t;
    forge_txn_parse(L, 2, &etcd_txn_rules, &t);                     /* [db, t, cmps, ok, ko] */

    struct res r;
    long long rev;
    req_begin(e);
    build_txn(e, t.cmps, t.ncmp, t.ops, t.nops, NULL);
    if (etcd_call(L, e, "/v3/kv/txn", 0, e->timeout_ms, &r) < 0)
        return push_res(L, e, &r, "txn");
    int doc = lua_gettop(L), ok = field_bool(L, doc, "succeeded");
    if (ok < 0 || header_revision(L, doc, &rev, &r) < 0)
        return malformed(&r, "bad txn answer"), push_res(L, e, &r, "txn");
    etcd_trim(e);
    lua_pushboolean(L, ok);
    lua_pushinteger(L, (lua_Integer)rev);
    return 2;
}


/***
 * The current etcd revision.
 * @function db:revision
 * @return integer; or nil, err
 */
static int l_revision(lua_State *L)
{
    struct etcd *e = checkdb(L);
    struct res r;
    long long rev;
    req_begin(e);
    buf_adds(&e->req, "{\"key\":");
    add_key(e, &e->req, "\0", e->plen ? 0 : 1);
    buf_adds(&e->req, ",\"count_only\":true}");
    if (etcd_call(L, e, "/v3/kv/range", CALL_READ, e->timeout_ms, &r) < 0
        || header_revision(L, lua_gettop(L), &rev, &r) < 0)
        return push_res(L, e, &r, "revision");
    etcd_trim(e);
    lua_pushinteger(L, (lua_Integer)rev);
    return 1;
}


/***
 * Grant a lease.
 * @function db:lease_grant
 * @tparam integer ttl seconds (etcd may round it up to its minimum)
 * @return lease id (integer), granted ttl; or nil, err
 */
static int l_lease_grant(lua_State *L)
{
    struct etcd *e = checkdb(L);
    luaL_argexpected(L, lua_type(L, 2) == LUA_TNUMBER, 2, "integer");
    lua_Integer ttl = luaL_checkinteger(L, 2);
    luaL_argcheck(L, ttl > 0 && ttl <= ETCD_TTL_MAX, 2, "ttl must be 1..9000000000 seconds");
    struct res r;
    long long id, granted;
    req_begin(e);
    buf_adds(&e->req, "{\"TTL\":");
    buf_addint(&e->req, (long long)ttl);
    buf_adds(&e->req, "}");
    if (etcd_call(L, e, "/v3/lease/grant", 0, e->timeout_ms, &r) < 0)
        return push_res(L, e, &r, "lease_grant");
    int doc = lua_gettop(L);                /* an "error" member was an error answer (read_answer) */
    if (field_int(L, doc, "ID", 0, &id) < 0 || id <= 0
        || field_int(L, doc, "TTL", 0, &granted) < 0)
        return malformed(&r, "bad lease grant answer"), push_res(L, e, &r, "lease_grant");
    etcd_trim(e);
    lua_pushinteger(L, (lua_Integer)id);
    lua_pushinteger(L, (lua_Integer)granted);
    return 2;
}


/*
 * Send {"ID":id} to the lease endpoint path, id being the lease at arg 2 (checked
 * with what; may raise). Returns what etcd_call returns (< 0: r filled), and pushes the
 * answer as it does.
 */
static int lease_call(lua_State *L, struct etcd *e, const char *what, const char *path, int flags,
                      lua_Integer *id, struct res *r)
{
    *id = check_lease_value(L, 2, what);
    req_begin(e);
    buf_adds(&e->req, "{\"ID\":");
    buf_addint(&e->req, (long long)*id);
    buf_adds(&e->req, "}");
    return etcd_call(L, e, path, flags, e->timeout_ms, r);
}


/***
 * Renew a lease once.
 * @function db:lease_keepalive
 * @tparam integer id
 * @return remaining ttl in seconds; or nil, err (etcd.lease_not_found when it expired or was revoked)
 */
static int l_lease_keepalive(lua_State *L)
{
    struct etcd *e = checkdb(L);
    lua_Integer id;
    struct res r;
    long long ttl;
    if (lease_call(L, e, "lease_keepalive", "/v3/lease/keepalive", CALL_READ, &id, &r) < 0)
        return push_res(L, e, &r, "lease_keepalive");
    int result = jfield(L, lua_gettop(L), "result");
    if (!lua_istable(L, result) || field_int(L, result, "TTL", 0, &ttl) < 0)
        return malformed(&r, "bad keepalive answer"), push_res(L, e, &r, "lease_keepalive");
    if (ttl <= 0) {
        char ids[32];
        snprintf(ids, sizeof ids, LUA_INTEGER_FMT, (LUAI_UACINT)id);
        res_fail(&r, "etcd.lease_not_found", 0, 200, "lease %s not found (expired or revoked)", ids);
        return push_res(L, e, &r, "lease_keepalive");
    }
    etcd_trim(e);
    lua_pushinteger(L, (lua_Integer)ttl);
    return 1;
}


/***
 * Revoke a lease: every key attached to it is deleted.
 * @function db:lease_revoke
 * @tparam integer id
 * @return revision after the revoke; or nil, err (etcd.lease_not_found)
 */
static int l_lease_revoke(lua_State *L)
{
    struct etcd *e = checkdb(L);
    lua_Integer id;
    struct res r;
    long long rev;
    if (lease_call(L, e, "lease_revoke", "/v3/lease/revoke", 0, &id, &r) < 0
        || header_revision(L, lua_gettop(L), &rev, &r) < 0)
        return push_res(L, e, &r, "lease_revoke");
    etcd_trim(e);
    lua_pushinteger(L, (lua_Integer)rev);
    return 1;
}


/*
 * Push the events of the watch answer decoded at result as forge events.
 * Stack: [...] -> [..., events] and returns 0; or unchanged and -1 with r filled.
 */
static int push_events(lua_State *L, struct etcd *e, int result, struct res *r)
{
    int top = lua_gettop(L), events = jfield(L, result, "events");
    long n = jlen(L, events);
    if (n < 0)
        return lua_settop(L, top), malformed(r, "bad watch events");
    lua_createtable(L, (int)(n < INT_MAX ? n : 0), 0);
    int list = lua_gettop(L);
    for (lua_Integer i = 1; i <= n; i++) {
        int ev = jindex(L, events, i), kv = jfield(L, ev, "kv");
        size_t tlen;
        const char *type = jstr(L, jfield(L, ev, "type"), &tlen);     /* [..., list, ev, kv, type] */
        long long mrev;
        if (!type || (tlen && strcmp(type, "PUT") != 0 && strcmp(type, "DELETE") != 0)
            || field_int(L, kv, "mod_revision", 0, &mrev) < 0 || kv_key(L, e, kv) < 0)
            return lua_settop(L, top), malformed(r, "bad watch event");
        lua_createtable(L, 0, 4);
        lua_pushstring(L, tlen && type[0] == 'D' ? "delete" : "put");
        lua_setfield(L, -2, "type");
        lua_pushlstring(L, e->scratch.p + e->plen, e->scratch.len - e->plen);
        lua_setfield(L, -2, "key");
        if (field_bytes(L, kv, "value", &e->scratch) < 0)
            return lua_settop(L, top), malformed(r, "bad watch event");
        lua_pushlstring(L, e->scratch.p, e->scratch.len);
        lua_setfield(L, -2, "value");
        lua_pushinteger(L, (lua_Integer)mrev);
        lua_setfield(L, -2, "mod_revision");
        lua_rawseti(L, list, i);
        lua_settop(L, list);
    }
    keep_top(L, top);
    return 0;
}


/*
 * Read the watch message decoded at doc that ended the stream: push its events, or fill r
 * (etcd.compacted, a cancellation, an error: r->resume when the member broke the stream,
 * *auth_retry when etcd canceled it for an invalid token).
 * Stack: [...] -> [..., result, events] and returns 0; or -1 with what it read left above
 * [...] (the caller drops it).
 */
static int read_watch(lua_State *L, struct etcd *e, int doc, long long *rev, struct res *r, int *auth_retry)
{
    if (!lua_isnil(L, jfield(L, doc, "error"))) {
        lua_pop(L, 1);
        if (answer_error(L, e, e->cur, 200, doc, r) != V_ERROR) {
            ep_down(&e->ep[e->cur], now_ms(), r->msg);     /* the member broke the stream */
            r->resume = 1;
        }
        return -1;
    }
    int result = jfield(L, doc, "result");
    long long compact;
    if (field_int(L, result, "compact_revision", 0, &compact) < 0)
        return malformed(r, "bad compact_revision");
    if (compact > 0) {
        res_fail(r, "etcd.compacted", 0, 200,
                 "start revision is compacted; the oldest revision still available is %lld", compact);
        r->compact_revision = compact;
        return -1;
    }
    if (field_bool(L, result, "canceled") != 0) {
        char text[512] = "";
        size_t len;
        const char *reason = jstr(L, jfield(L, result, "cancel_reason"), &len);
        if (reason)
            sanitize(text, sizeof text, reason, len);
        if (strstr(text, "invalid auth token"))
            *auth_retry = 1;
        return res_fail(r, "etcd.error", 0, 200, "watch canceled by etcd: %s", text[0] ? text : "no reason given");
    }
    if (!lua_istable(L, result))
        return malformed(r, "watch message without a result");
    if (header_rev(L, result, *rev, rev) < 0)
        return malformed(r, "bad watch events");
    return push_events(L, e, result, r);
}


/*
 * Read the watch message (if any) that ended the stream and push its events.
 * Stack: [...] -> [..., events, revision] and returns 2; or -1 with r filled (r->resume
 * when the member broke the stream: another may take it) and the stack unchanged.
 */
static int watch_result(lua_State *L, struct etcd *e, struct res *r, int *auth_retry)
{
    long long rev = e->stream_rev;
    *auth_retry = 0;
    if (!e->stream_stop && e->scan < e->resp.len) {
        /* the stream ended without a newline after its last message */
        buf_add(&e->resp, "\n", 1);
        if (e->resp.failed)
            return res_fail(r, "etcd.error", 1, 200, "out of memory");
        stream_scan(e);
        rev = e->stream_rev ? e->stream_rev : rev;
    }
    if (!e->stream_stop) {
        lua_newtable(L);
        lua_pushinteger(L, (lua_Integer)rev);
        return 2;
    }
    int top = lua_gettop(L);
    if (json_doc(L, e->resp.p + e->stop_start, e->stop_end - e->stop_start, r) < 0)
        return -1;
    if (read_watch(L, e, top + 1, &rev, r, auth_retry) < 0) {
        lua_settop(L, top);
        return -1;
    }
    keep_top(L, top);                                       /* [..., events] */
    lua_pushinteger(L, (lua_Integer)rev);
    return 2;
}


/***
 * Watch every key starting with prefix, for a bounded time: returns the first
 * batch of events etcd sends (one revision's worth or more), or none when the
 * time runs out.
 * @function db:watch
 * @tparam string prefix "" for the whole namespace
 * @tparam[opt] integer start_revision first revision to report (0 or nil: from now)
 * @tparam[opt] integer timeout_ms how long to wait (default: the db's timeout_ms)
 * @return array of events `{type="put"|"delete", key=, value=, mod_revision=}`, and
 *   the revision etcd reported last (0 if none); or nil, err (etcd.compacted, with
 *   err.compact_revision, when start_revision is no longer available)
 */
static int l_watch(lua_State *L)
{
    struct etcd *e = checkdb(L);
    size_t plen;
    const char *p = forge_txn_checkkey(L, 2, &plen, 1);
    lua_Integer start = luaL_optinteger(L, 3, 0);
    luaL_argcheck(L, start >= 0, 3, "start_revision must be >= 0");
    lua_Integer timeout = luaL_optinteger(L, 4, e->timeout_ms);
    luaL_argcheck(L, timeout >= 1 && timeout <= ETCD_TIMEOUT_MAX, 4, "timeout_ms must be 1..3600000");
    struct res r;
    double deadline = now_ms() + (double)timeout;
    int reauthed = 0;
    for (int resends = 0;;) {
        double left = deadline - now_ms();
        req_begin(e);
        buf_adds(&e->req, "{\"create_request\":{");
        add_range_keys(e, &e->req, p, plen);
        if (start > 0) {
            buf_adds(&e->req, ",\"start_revision\":");
            buf_addint(&e->req, (long long)start);
        }
        buf_adds(&e->req, "}}");
        int n = -1, auth_retry = 0;
        if (etcd_call(L, e, "/v3/watch", CALL_READ | CALL_STREAM, left >= 1 ? (long)left : 1L, &r) == 0)
            n = watch_result(L, e, &r, &auth_retry);                   /* [db, p, ..., events, rev] */
        if (n >= 0) {
            etcd_trim(e);
            return n;
        }
        if (auth_retry && e->username && !reauthed) {
            reauthed = 1;
            drop_token(e);
            continue;
        }
        if (r.resume && ++resends < e->nendpoints && deadline - now_ms() >= 1) {
            /* The member broke the stream after creating it: resend it to another one, from
             * the revision after the last one this stream reported, so no event is missed. */
            if (start == 0 && e->stream_rev > 0)
                start = (lua_Integer)e->stream_rev + 1;
            continue;
        }
        return push_res(L, e, &r, "watch");
    }
}


int luaopen_forge_etcd(lua_State *L)
{
    static const luaL_Reg lib[] = {
        {"open", l_open},
        {NULL, NULL},
    };
    static const luaL_Reg meth[] = {
        {"get", l_get},
        {"range", l_range},
        {"put", l_put},
        {"delete", l_delete},
        {"txn", l_txn},
        {"revision", l_revision},
        {"close", l_close},
        {"endpoints", l_endpoints},
        {"lease_grant", l_lease_grant},
        {"lease_keepalive", l_lease_keepalive},
        {"lease_revoke", l_lease_revoke},
        {"watch", l_watch},
        {NULL, NULL},
    };
    static const luaL_Reg metameth[] = {
        {"__gc", l_close},
        {"__close", l_close},
        {"__tostring", l_tostring},
        {"__index", NULL},
        {NULL, NULL},
    };
    /* Thread-safe since curl 7.84 and reference-counted: every module (and state) may call it. */
    if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK)
        return luaL_error(L, "forge.etcd: curl_global_init failed");
    forge_json_decoder(L, &json_key, ETCD_JSON_DEPTH);
    forge_newclass(L, ETCD_MT, meth, metameth);
    luaL_newlib(L, lib);
    forge_setmodinfo(L, "forge.etcd");
    return 1;
}
