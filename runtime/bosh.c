/*
 * forge.bosh — a BOSH director client on libcurl (see ../../shared/BOSH-API.md).
 *
 *   local d = assert(bosh.new{url="https://10.0.0.6:25555", client="broker", client_secret="…",
 *                             ca_cert=pem})
 *   local task_id = assert(d:deploy(manifest_yaml, {context_id=op_id}))
 *   local t = assert(d:task(task_id))          -- the reconciler polls this
 *
 * Every call is one bounded HTTP exchange (timeout_ms), except vms{full} and wait_task, which
 * poll a short task under their own deadline. Long work is a director task the caller polls.
 *
 * Ownership: the curl handle, the header list, the response buffers, the cached token and an
 * upload's FILE* all live in the "forge.bosh.director" userdata and are freed by __gc/__close,
 * so a Lua raise (out of memory, a misuse error) at any point leaks nothing. Strings that only
 * live during one request (URLs, header lines) are built on the Lua stack; curl copies them.
 *
 * Errors: nil, err with err = {code, message, retryable, status?, director_code?}:
 *   bosh.unreachable  transport failure, timeout, 5xx                     (retryable)
 *   bosh.tls          certificate verification failed
 *   bosh.auth         401/403, UAA refused the client, wrong auth for this director
 *   bosh.not_found    404 (director_code 10000 task, 70000 deployment, …; none for no route)
 *   bosh.bad_request  400 and other 4xx
 *   bosh.protocol     an answer we cannot use (malformed JSON, 200 where a 302 was due, …)
 *   bosh.task_failed  vms/wait_task: the task ended error/cancelled/timeout
 *   bosh.timeout      vms/wait_task: the task did not finish within the deadline (retryable)
 *   bosh.local        a local file to upload cannot be read
 * JSON is decoded with lua-cjson in protected mode (ljson.c); integral numbers come back as
 * integers and JSON null object members are dropped (so `t.timestamp == nil` until a task ends).
 */
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <curl/curl.h>

#include "forge/forge.h"
#include "forge/metrics.h"
#include "ljson.h"

#define DIRECTOR_MT         "forge.bosh.director"
#define DEFAULT_TIMEOUT_MS  30000
#define DEFAULT_CONNECT_MS  5000
#define DEFAULT_UPLOAD_MS   600000
#define MAX_BODY            (64 * 1024 * 1024)
#define MAX_CONTEXT_ID      64
#define BOSH_JSON_DEPTH     1000                /* lua-cjson's default nesting limit */

enum { AUTH_UNKNOWN, AUTH_BASIC, AUTH_UAA };

struct buf {
    char *p;
    size_t len, cap;
};

struct director {
    CURL *curl;
    struct curl_slist *hdrs;    /* header list of the request in flight */
    struct buf body;            /* response body of the last request */
    char *location;             /* Location header of the last response */
    char *content_range;        /* Content-Range header of the last response */
    FILE *upload;               /* file being uploaded */
    char *url;                  /* base URL, no trailing slash */
    char *user, *password, *client, *secret;
    char *ca;                   /* PEM text or a file path */
    int ca_is_pem, insecure, auth, closed;
    char *uaa_url;              /* from /info or the uaa_url option */
    char *token;                /* UAA access token */
    double token_expiry;        /* monotonic time after which a new token is fetched */
    long timeout_ms, connect_ms, upload_ms;
    long status;                /* HTTP status of the last response */
    char errbuf[CURL_ERROR_SIZE];
};

/* One HTTP exchange; every pointer stays valid (on the Lua stack or in d) until perform returns. */
struct req {
    const char *method;
    const char *url;
    const char *ctype;          /* request Content-Type, NULL without a body */
    const char *body;
    size_t len;
    FILE *file;                 /* raw upload from a file instead of body */
    curl_off_t file_size;
    const char *extra[3];       /* extra header lines */
    const char *user, *password;/* HTTP basic */
    const char *auth_header;    /* "Authorization: bearer …" */
    long timeout_ms;
};

static pthread_once_t curl_once = PTHREAD_ONCE_INIT;
static char json_decode_key;    /* registry key: our lua-cjson decoder */

#define todirector(L) (check_open(L))


/* ---- small helpers ---------------------------------------------------------------- */

static double now_mono(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

static void sleep_ms(long ms)
{
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
        ;
}

static void init_curl(void)
{
    curl_global_init(CURL_GLOBAL_DEFAULT);
}

/* The director at index 1, which must not be closed. May longjmp. */
static struct director *check_open(lua_State *L)
{
    struct director *d = luaL_checkudata(L, 1, DIRECTOR_MT);
    if (d->closed)
        luaL_error(L, "forge.bosh: the director handle is closed");
    return d;
}

/* strdup that raises on OOM; the result must go straight into the userdata. May longjmp. */
static char *xstrdup(lua_State *L, const char *s)
{
    if (!s)
        return NULL;
    char *p = strdup(s);
    if (!p)
        luaL_error(L, "forge.bosh: out of memory");
    return p;
}

static void set_str(char **field, char *value)
{
    free(*field);
    *field = value;
}

static int buf_append(struct buf *b, const char *data, size_t n)
{
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 4096;
        while (cap < b->len + n + 1)
            cap *= 2;
        char *p = realloc(b->p, cap);
        if (!p)
            return -ENOMEM;
        b->p = p;
        b->cap = cap;
    }
    memcpy(b->p + b->len, data, n);
    b->len += n;
    b->p[b->len] = '\0';
    return 0;
}

/* Percent-encode one path segment or query value into b (RFC 3986 unreserved kept). */
static void add_escaped(luaL_Buffer *b, const char *s)
{
    static const char hex[] = "0123456789ABCDEF";
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        unsigned char c = *p;
        if ((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
            c == '-' || c == '.' || c == '_' || c == '~') {
            luaL_addchar(b, (char)c);
        } else {
            luaL_addchar(b, '%');
            luaL_addchar(b, hex[c >> 4]);
            luaL_addchar(b, hex[c & 15]);
        }
    }
}

static int lbuffer_put(void *ud, const char *p, size_t n, int whole)
{
    (void)whole;
    luaL_addlstring(ud, p, n);
    return 0;
}

/* A JSON string literal of s into b. */
static void add_json_string(luaL_Buffer *b, const char *s)
{
    forge_json_string(lbuffer_put, b, s, strlen(s), 0);
}


/* ---- JSON ------------------------------------------------------------------------- */

/*
 * Integral floats → integers, null members of objects dropped (array nulls stay cjson.null).
 * Stack: [..., v] -> [..., v]
 */
static void normalize(lua_State *L, int depth)
{
    if (!lua_istable(L, -1) || depth > 200)
        return;
    luaL_checkstack(L, 4, "forge.bosh: JSON too deep");
    lua_pushnil(L);
    while (lua_next(L, -2)) {                            /* [t, k, v] */
        int t = lua_type(L, -1);
        if (t == LUA_TNUMBER && !lua_isinteger(L, -1)) {
            int integral;                                /* exactly an integer: 2.0 yes, 0.5 no */
            lua_Integer i = lua_tointegerx(L, -1, &integral);
            if (integral) {
                lua_pushvalue(L, -2);
                lua_pushinteger(L, i);
                lua_rawset(L, -5);
            }
        } else if (t == LUA_TLIGHTUSERDATA && lua_touserdata(L, -1) == NULL &&
                   lua_type(L, -2) == LUA_TSTRING) {
            lua_pushvalue(L, -2);
            lua_pushnil(L);
            lua_rawset(L, -5);                           /* clearing a field during next is allowed */
        } else if (t == LUA_TTABLE) {
            normalize(L, depth + 1);
        }
        lua_pop(L, 1);
    }
}

/*
 * Decode JSON text. Stack: [] -> [value] (returns 0) | [] -> [err] (returns -1).
 */
static int json_decode(lua_State *L, const char *s, size_t n, const char *what)
{
    if (forge_json_decode(L, &json_decode_key, s, n) < 0) {
        const char *msg = lua_tostring(L, -1);
        forge_newerror(L, "bosh.protocol", 0, "%s: the director sent malformed JSON (%s)", what,
                       msg ? msg : "?");
        lua_remove(L, -2);
        return -1;
    }
    normalize(L, 0);
    return 0;
}

/* Set err.status and err.director_code on the error at the top. Stack: [err] -> [err] */
static void error_fields(lua_State *L, long status, lua_Integer director_code)
{
    if (status > 0) {
        lua_pushinteger(L, status);
        lua_setfield(L, -2, "status");
    }
    if (director_code > 0) {
        lua_pushinteger(L, director_code);
        lua_setfield(L, -2, "director_code");
    }
}


/* Keep only the top value above base. Stack: [base..., x, ..., v] -> [base..., v] */
static void keep_top(lua_State *L, int base)
{
    if (lua_gettop(L) > base + 1)
        lua_replace(L, base + 1);
    lua_settop(L, base + 1);
}

/* Push s percent-encoded (RFC 3986 unreserved kept). Stack: [] -> [escaped] */
static const char *push_escaped(lua_State *L, const char *s)
{
    luaL_Buffer b;
    luaL_buffinit(L, &b);
    add_escaped(&b, s);
    luaL_pushresult(&b);
    return lua_tostring(L, -1);
}


/* ---- HTTP --------------------------------------------------------------------------- */

static size_t on_body(char *data, size_t size, size_t n, void *ud)
{
    struct director *d = ud;
    size_t total = size * n;
    if (d->body.len + total > MAX_BODY || buf_append(&d->body, data, total) != 0)
        return 0;
    return total;
}

/* Keep a copy of one header value (trailing CR/LF trimmed) if its name matches. */
static void grab_header(const char *line, size_t len, const char *name, char **field)
{
    size_t nl = strlen(name);
    if (len <= nl + 1 || strncasecmp(line, name, nl) != 0 || line[nl] != ':')
        return;
    const char *v = line + nl + 1;
    const char *end = line + len;
    while (v < end && (*v == ' ' || *v == '\t'))
        v++;
    while (end > v && (end[-1] == '\r' || end[-1] == '\n' || end[-1] == ' '))
        end--;
    char *copy = malloc((size_t)(end - v) + 1);
    if (!copy)
        return;
    memcpy(copy, v, (size_t)(end - v));
    copy[end - v] = '\0';
    set_str(field, copy);
}

static size_t on_header(char *data, size_t size, size_t n, void *ud)
{
    struct director *d = ud;
    size_t total = size * n;
    grab_header(data, total, "Location", &d->location);
    grab_header(data, total, "Content-Range", &d->content_range);
    return total;
}

static size_t on_read(char *dst, size_t size, size_t n, void *ud)
{
    struct director *d = ud;
    size_t got = fread(dst, 1, size * n, d->upload);
    if (got == 0 && ferror(d->upload))
        return CURL_READFUNC_ABORT;
    return got;
}

static int is_unreachable(CURLcode rc)
{
    switch (rc) {
    case CURLE_PEER_FAILED_VERIFICATION:
    case CURLE_SSL_CACERT_BADFILE:
    case CURLE_SSL_CERTPROBLEM:
    case CURLE_SSL_ISSUER_ERROR:
    case CURLE_SSL_PINNEDPUBKEYNOTMATCH:
        return 0;
    default:
        return 1;
    }
}

/*
 * Count a director call in forge_bosh_director_calls_total{director, outcome} (described by
 * the broker's forge.telemetry; elsewhere the family is absent and nothing is counted).
 * outcome: 2xx..5xx, or unreachable, tls, too_large.
 */
static void count_call(const struct director *d, CURL *c, CURLcode rc)
{
    char outcome[16] = "unreachable";
    long st = 0;
    if (rc == CURLE_OK) {
        curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &st);
        snprintf(outcome, sizeof outcome, "%ldxx", st / 100 % 10);
    } else if (rc == CURLE_WRITE_ERROR) {
        strcpy(outcome, "too_large");
    } else if (!is_unreachable(rc)) {
        strcpy(outcome, "tls");
    }
    struct forge_label labels[] = {{"director", d->url}, {"outcome", outcome}};
    forge_metrics_inc("forge_bosh_director_calls_total", labels, 2, 1);
}

/*
 * Run one exchange. On success d->status, d->body, d->location hold the answer.
 * Stack: [] -> [] (returns 0) | [] -> [err] (returns -1): only transport failures are errors here.
 */
static int perform(lua_State *L, struct director *d, const struct req *rq)
{
    CURL *c = d->curl;
    curl_easy_reset(c);
    curl_slist_free_all(d->hdrs);
    d->hdrs = NULL;
    d->body.len = 0;
    if (d->body.p)
        d->body.p[0] = '\0';
    set_str(&d->location, NULL);
    set_str(&d->content_range, NULL);
    d->status = 0;
    d->errbuf[0] = '\0';

    struct curl_slist *h = NULL, *t;
#define ADD_HDR(line) do { t = curl_slist_append(h, (line)); if (!t) goto oom; h = t; } while (0)
    ADD_HDR("Accept: application/json");
    ADD_HDR("Expect:");
    if (rq->auth_header)
        ADD_HDR(rq->auth_header);
    for (int i = 0; i < 3; i++)
        if (rq->extra[i])
            ADD_HDR(rq->extra[i]);
    if (rq->ctype) {
        lua_pushfstring(L, "Content-Type: %s", rq->ctype);
        t = curl_slist_append(h, lua_tostring(L, -1));
        lua_pop(L, 1);
        if (!t)
            goto oom;
        h = t;
    }
#undef ADD_HDR
    d->hdrs = h;

    curl_easy_setopt(c, CURLOPT_URL, rq->url);
    curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(c, CURLOPT_FOLLOWLOCATION, 0L);
    curl_easy_setopt(c, CURLOPT_PROTOCOLS_STR, "http,https");
    curl_easy_setopt(c, CURLOPT_HTTPHEADER, d->hdrs);
    curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, on_body);
    curl_easy_setopt(c, CURLOPT_WRITEDATA, d);
    curl_easy_setopt(c, CURLOPT_HEADERFUNCTION, on_header);
    curl_easy_setopt(c, CURLOPT_HEADERDATA, d);
    curl_easy_setopt(c, CURLOPT_ERRORBUFFER, d->errbuf);
    curl_easy_setopt(c, CURLOPT_TIMEOUT_MS, rq->timeout_ms > 0 ? rq->timeout_ms : d->timeout_ms);
    curl_easy_setopt(c, CURLOPT_CONNECTTIMEOUT_MS, d->connect_ms);
    curl_easy_setopt(c, CURLOPT_USERAGENT, "forge.bosh/" FORGE_VERSION);
    if (d->insecure) {
        curl_easy_setopt(c, CURLOPT_SSL_VERIFYPEER, 0L);
        curl_easy_setopt(c, CURLOPT_SSL_VERIFYHOST, 0L);
    } else if (d->ca && d->ca_is_pem) {
        struct curl_blob blob = {.data = d->ca, .len = strlen(d->ca), .flags = CURL_BLOB_COPY};
        curl_easy_setopt(c, CURLOPT_CAINFO_BLOB, &blob);
    } else if (d->ca) {
        curl_easy_setopt(c, CURLOPT_CAINFO, d->ca);
    }
    if (rq->user) {
        curl_easy_setopt(c, CURLOPT_HTTPAUTH, (long)CURLAUTH_BASIC);
        curl_easy_setopt(c, CURLOPT_USERNAME, rq->user);
        curl_easy_setopt(c, CURLOPT_PASSWORD, rq->password ? rq->password : "");
    }
    if (rq->file) {
        curl_easy_setopt(c, CURLOPT_POST, 1L);
        curl_easy_setopt(c, CURLOPT_READFUNCTION, on_read);
        curl_easy_setopt(c, CURLOPT_READDATA, d);
        curl_easy_setopt(c, CURLOPT_POSTFIELDSIZE_LARGE, rq->file_size);
    } else if (rq->body) {
        curl_easy_setopt(c, CURLOPT_POSTFIELDS, rq->body);
        curl_easy_setopt(c, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)rq->len);
    }
    if (strcmp(rq->method, "GET") != 0 && !(strcmp(rq->method, "POST") == 0 && (rq->body || rq->file)))
        curl_easy_setopt(c, CURLOPT_CUSTOMREQUEST, rq->method);
    if (strcmp(rq->method, "POST") == 0 && !rq->body && !rq->file) {
        curl_easy_setopt(c, CURLOPT_POSTFIELDS, "");
        curl_easy_setopt(c, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)0);
    }

    CURLcode rc = curl_easy_perform(c);
    curl_slist_free_all(d->hdrs);
    d->hdrs = NULL;
    count_call(d, c, rc);
    if (rc != CURLE_OK) {
        const char *detail = d->errbuf[0] ? d->errbuf : curl_easy_strerror(rc);
        if (rc == CURLE_WRITE_ERROR)
            forge_newerror(L, "bosh.protocol", 0, "%s %s: response too large or out of memory", rq->method,
                           rq->url);
        else if (is_unreachable(rc))
            forge_newerror(L, "bosh.unreachable", 1, "%s %s: %s", rq->method, rq->url, detail);
        else
            forge_newerror(L, "bosh.tls", 0, "%s %s: %s", rq->method, rq->url, detail);
        return -1;
    }
    curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &d->status);
    return 0;
oom:
    curl_slist_free_all(h);
    forge_newerror(L, "bosh.unreachable", 1, "%s %s: out of memory", rq->method, rq->url);
    return -1;
}

/*
 * The error for an unexpected status of the last response, from the director's
 * {"code","description"} body when there is one. Stack: [] -> [err]
 */
static void push_status_error(lua_State *L, struct director *d, const char *what)
{
    long st = d->status;
    lua_Integer dcode = 0;
    const char *desc = NULL;
    int top = lua_gettop(L);
    if (d->body.len > 0 && d->body.p[0] == '{' && json_decode(L, d->body.p, d->body.len, what) == 0 &&
        lua_istable(L, -1)) {
        if (lua_getfield(L, -1, "code") == LUA_TNUMBER && lua_isinteger(L, -1))
            dcode = lua_tointeger(L, -1);
        lua_pop(L, 1);
        if (lua_getfield(L, -1, "description") == LUA_TSTRING)
            desc = lua_tostring(L, -1);              /* anchored on the stack until settop */
    }
    if (!desc && d->body.len > 0 && d->body.p[0] != '{') {
        lua_pushlstring(L, d->body.p, d->body.len > 300 ? 300 : d->body.len);
        desc = lua_tostring(L, -1);
    }
    if (!desc)
        desc = st >= 500 ? "director error" : "no details";
    const char *code = "bosh.bad_request";
    int retry = 0;
    if (st >= 500) {
        code = "bosh.unreachable";
        retry = 1;
    } else if (st == 401 || st == 403) {
        code = "bosh.auth";
    } else if (st == 404) {
        code = "bosh.not_found";
    } else if (st < 400) {
        code = "bosh.protocol";
    }
    forge_newerror(L, code, retry, "%s: HTTP %d: %s", what, (int)st, desc);
    error_fields(L, st, dcode);
    keep_top(L, top);
}

/* 0 if the last status is a or b; else push the error. Stack: [] -> [] | [err] */
static int expect(lua_State *L, struct director *d, const char *what, long a, long b)
{
    if (d->status == a || (b && d->status == b))
        return 0;
    push_status_error(L, d, what);
    return -1;
}

/* Push base URL + path. Stack: [] -> [url] */
static const char *push_url(lua_State *L, struct director *d, const char *path)
{
    return lua_pushfstring(L, "%s%s", d->url, path);
}


/* ---- authentication ------------------------------------------------------------------ */

/* Learn basic vs uaa from GET /info (once). Stack: [] -> [] | [err] */
static int discover_auth(lua_State *L, struct director *d)
{
    if (d->auth != AUTH_UNKNOWN)
        return 0;
    int top = lua_gettop(L);
    struct req rq = {.method = "GET", .url = push_url(L, d, "/info")};
    int rc = perform(L, d, &rq);
    if (rc == 0)
        rc = expect(L, d, "GET /info", 200, 0);
    if (rc == 0)
        rc = json_decode(L, d->body.p, d->body.len, "GET /info");
    if (rc < 0) {
        keep_top(L, top);
        return -1;
    }
    int auth = AUTH_BASIC;
    if (lua_istable(L, -1) && lua_getfield(L, -1, "user_authentication") == LUA_TTABLE &&
        lua_getfield(L, -1, "type") == LUA_TSTRING && strcmp(lua_tostring(L, -1), "uaa") == 0) {
        auth = AUTH_UAA;
        if (!d->uaa_url && lua_getfield(L, -2, "options") == LUA_TTABLE &&
            lua_getfield(L, -1, "url") == LUA_TSTRING) {
            size_t n;
            const char *u = lua_tolstring(L, -1, &n);
            set_str(&d->uaa_url, xstrdup(L, u));
            while (n > 0 && d->uaa_url[n - 1] == '/')
                d->uaa_url[--n] = '\0';
        }
    }
    lua_settop(L, top);
    if (auth == AUTH_UAA && !d->uaa_url) {
        forge_newerror(L, "bosh.protocol", 0, "GET /info: user_authentication is uaa but has no url");
        return -1;
    }
    if (auth == AUTH_UAA && (!d->client || !d->secret)) {
        forge_newerror(L, "bosh.auth", 0, "%s uses UAA: client and client_secret are required", d->url);
        return -1;
    }
    if (auth == AUTH_BASIC && !d->user) {
        forge_newerror(L, "bosh.auth", 0, "%s uses basic auth: username and password are required", d->url);
        return -1;
    }
    d->auth = auth;
    return 0;
}

/* POST <uaa>/oauth/token (client credentials); keeps the token in d. Stack: [] -> [] | [err] */
static int fetch_token(lua_State *L, struct director *d)
{
    int top = lua_gettop(L);
    set_str(&d->token, NULL);
    static const char form[] = "grant_type=client_credentials";
    struct req rq = {.method = "POST", .url = lua_pushfstring(L, "%s/oauth/token", d->uaa_url),
                     .ctype = "application/x-www-form-urlencoded", .body = form, .len = sizeof form - 1,
                     .user = d->client, .password = d->secret};
    if (perform(L, d, &rq) < 0)
        goto fail;
    if (d->status != 200) {
        push_status_error(L, d, "UAA token request");
        if (d->status == 400 || d->status == 401 || d->status == 403) {
            lua_pushliteral(L, "bosh.auth");
            lua_setfield(L, -2, "code");
        }
        goto fail;
    }
    if (json_decode(L, d->body.p, d->body.len, "UAA token request") < 0)
        goto fail;
    if (!lua_istable(L, -1) || lua_getfield(L, -1, "access_token") != LUA_TSTRING) {
        forge_newerror(L, "bosh.protocol", 0, "UAA token request: no access_token in the answer");
        goto fail;
    }
    lua_getfield(L, -2, "expires_in");
    double ttl = lua_isnumber(L, -1) ? lua_tonumber(L, -1) : 60;
    double margin = ttl > 240 ? 60 : ttl / 4;
    set_str(&d->token, xstrdup(L, lua_tostring(L, -2)));
    d->token_expiry = now_mono() + ttl - margin;
    lua_settop(L, top);
    return 0;
fail:
    keep_top(L, top);
    return -1;
}

/*
 * An authenticated exchange: basic credentials, or a UAA bearer token fetched when missing or
 * near expiry, and fetched again once after a 401. Stack: [] -> [] | [err]
 */
static int authed(lua_State *L, struct director *d, struct req *rq)
{
    if (discover_auth(L, d) < 0)
        return -1;
    for (int attempt = 0;; attempt++) {
        int top = lua_gettop(L);
        if (d->auth == AUTH_UAA) {
            if ((!d->token || now_mono() >= d->token_expiry) && fetch_token(L, d) < 0)
                return -1;
            rq->auth_header = lua_pushfstring(L, "Authorization: bearer %s", d->token);
            rq->user = rq->password = NULL;
        } else {
            rq->user = d->user;
            rq->password = d->password;
        }
        if (rq->file && fseek(rq->file, 0, SEEK_SET) != 0) {
            lua_settop(L, top);
            forge_newerror(L, "bosh.local", 0, "cannot rewind the upload: %s", strerror(errno));
            return -1;
        }
        int rc = perform(L, d, rq);
        if (rc < 0) {
            keep_top(L, top);
            return -1;
        }
        lua_settop(L, top);
        rq->auth_header = NULL;
        if (d->status == 401 && d->auth == AUTH_UAA && attempt == 0) {
            set_str(&d->token, NULL);
            continue;
        }
        return 0;
    }
}

/* Task id from the Location of a 302/303 (only its path counts). Stack: [] -> [] | [err] */
static int location_task_id(lua_State *L, struct director *d, const char *what, lua_Integer *id)
{
    const char *p = d->location ? strstr(d->location, "/tasks/") : NULL;
    char *end = NULL;
    long long v = p ? strtoll(p + 7, &end, 10) : 0;
    if (!p || end == p + 7 || v <= 0 || (*end && *end != '?' && *end != '/')) {
        forge_newerror(L, "bosh.protocol", 0, "%s: HTTP %d without a /tasks/<id> Location (%s)", what,
                       (int)d->status, d->location ? d->location : "none");
        return -1;
    }
    *id = (lua_Integer)v;
    return 0;
}

/* Return helper: rc 0 → n results on top; rc -1 → nil, err. */
static int results(lua_State *L, int rc, int n)
{
    if (rc == 0)
        return n;
    lua_pushnil(L);
    lua_insert(L, -2);
    return 2;
}

/*
 * GET path and decode its JSON. Stack: [] -> [value] | [err]
 */
static int get_json(lua_State *L, struct director *d, const char *path, const char *what)
{
    struct req rq = {.method = "GET", .url = push_url(L, d, path)};
    int base = lua_gettop(L);
    int rc = authed(L, d, &rq);
    if (rc == 0)
        rc = expect(L, d, what, 200, 0);
    if (rc == 0)
        rc = json_decode(L, d->body.p, d->body.len, what);
    lua_remove(L, base);
    return rc;
}

/*
 * An exchange that must answer 302/303 with a task: push its id. Stack: [] -> [id] | [err]
 */
static int task_call(lua_State *L, struct director *d, struct req *rq, const char *what)
{
    lua_Integer id = 0;
    int rc = authed(L, d, rq);
    if (rc == 0)
        rc = expect(L, d, what, 302, 303);
    if (rc == 0)
        rc = location_task_id(L, d, what, &id);
    if (rc == 0)
        lua_pushinteger(L, id);
    return rc;
}

/* Decode one-JSON-object-per-line text into an array. Stack: [] -> [array] | [err] */
static int json_lines(lua_State *L, const char *s, size_t n, const char *what)
{
    lua_newtable(L);
    lua_Integer i = 0;
    const char *end = s + n;
    while (s < end) {
        const char *nl = memchr(s, '\n', (size_t)(end - s));
        const char *e = nl ? nl : end;
        const char *q = s;
        while (q < e && (*q == ' ' || *q == '\t' || *q == '\r'))
            q++;
        if (q < e) {
            if (json_decode(L, s, (size_t)(e - s), what) < 0) {
                lua_remove(L, -2);
                return -1;
            }
            lua_rawseti(L, -2, ++i);
        }
        s = nl ? nl + 1 : end;
    }
    return 0;
}


/* ---- Lua API: constructor --------------------------------------------------------- */

/***
 * bosh.new{url=, username=?, password=?, client=?, client_secret=?, uaa_url=?, ca_cert=?,
 *          insecure=false, timeout_ms=30000, connect_timeout_ms=5000, upload_timeout_ms=600000}
 * A director handle. Basic or UAA is learnt from GET /info on the first authenticated call
 * (uaa_url skips that). ca_cert is PEM text or a file path and is used for UAA too.
 * @return director | nil, err (bosh.local when ca_cert names an unreadable file)
 */
static int l_bosh_new(lua_State *L)
{
    static const char *const keys[] = {"url", "username", "password", "client", "client_secret", "uaa_url",
                                       "ca_cert", "insecure", "timeout_ms", "connect_timeout_ms",
                                       "upload_timeout_ms", NULL};
    luaL_checktype(L, 1, LUA_TTABLE);
    forge_checkkeys(L, 1, "bosh.new", keys);
    const char *url = forge_optstrfield(L, 1, "url", NULL);
    if (!url || (strncmp(url, "http://", 7) != 0 && strncmp(url, "https://", 8) != 0))
        return luaL_error(L, "bosh.new: 'url' must be an http:// or https:// URL");
    const char *user = forge_optstrfield(L, 1, "username", NULL);
    const char *password = forge_optstrfield(L, 1, "password", NULL);
    const char *client = forge_optstrfield(L, 1, "client", NULL);
    const char *secret = forge_optstrfield(L, 1, "client_secret", NULL);
    const char *uaa = forge_optstrfield(L, 1, "uaa_url", NULL);
    const char *ca = forge_optstrfield(L, 1, "ca_cert", NULL);
    int insecure = forge_optboolfield(L, 1, "insecure", 0);
    lua_Integer timeout = forge_optintfield(L, 1, "timeout_ms", DEFAULT_TIMEOUT_MS);
    lua_Integer connect = forge_optintfield(L, 1, "connect_timeout_ms",
                                            timeout < DEFAULT_CONNECT_MS ? timeout : DEFAULT_CONNECT_MS);
    lua_Integer upload = forge_optintfield(L, 1, "upload_timeout_ms", DEFAULT_UPLOAD_MS);
    if (timeout <= 0 || connect <= 0 || upload <= 0)
        return luaL_error(L, "bosh.new: timeouts must be > 0 ms");
    if ((client == NULL) != (secret == NULL))
        return luaL_error(L, "bosh.new: 'client' and 'client_secret' go together");
    if (user && !password)
        return luaL_error(L, "bosh.new: 'username' needs 'password'");

    struct director *d = lua_newuserdatauv(L, sizeof *d, 0);
    memset(d, 0, sizeof *d);
    luaL_setmetatable(L, DIRECTOR_MT);
    size_t ulen = strlen(url);
    d->url = xstrdup(L, url);
    while (ulen > 0 && d->url[ulen - 1] == '/')
        d->url[--ulen] = '\0';
    d->user = xstrdup(L, user);
    d->password = xstrdup(L, password);
    d->client = xstrdup(L, client);
    d->secret = xstrdup(L, secret);
    d->insecure = insecure;
    d->timeout_ms = (long)timeout;
    d->connect_ms = (long)connect;
    d->upload_ms = (long)upload;
    if (uaa) {
        d->uaa_url = xstrdup(L, uaa);
        size_t n = strlen(d->uaa_url);
        while (n > 0 && d->uaa_url[n - 1] == '/')
            d->uaa_url[--n] = '\0';
        d->auth = AUTH_UAA;
    }
    if (ca) {
        d->ca_is_pem = strstr(ca, "-----BEGIN") != NULL;
        if (!d->ca_is_pem && access(ca, R_OK) != 0)
            return forge_pusherror(L, "bosh.local", 0, "ca_cert %s: %s", ca, strerror(errno));
        d->ca = xstrdup(L, ca);
    }
    pthread_once(&curl_once, init_curl);
    d->curl = curl_easy_init();
    if (!d->curl)
        return forge_pusherror(L, "bosh.local", 0, "curl_easy_init failed");
    return 1;
}


/* ---- Lua API: director methods ------------------------------------------------------- */

/***
 * d:info() -> {name, uuid, version, user_authentication, features, …} | nil, err
 * GET /info, sent with basic credentials when the handle has them (then `user` is set).
 */
static int l_info(lua_State *L)
{
    struct director *d = todirector(L);
    lua_settop(L, 1);
    struct req rq = {.method = "GET", .url = push_url(L, d, "/info"), .user = d->user,
                     .password = d->password};
    if (d->auth == AUTH_UAA)
        rq.user = rq.password = NULL;
    int rc = perform(L, d, &rq);
    if (rc == 0)
        rc = expect(L, d, "GET /info", 200, 0);
    if (rc == 0)
        rc = json_decode(L, d->body.p, d->body.len, "GET /info");
    return results(L, rc, 1);
}

/***
 * d:auth_type() -> "basic" | "uaa" | nil, err  (asks GET /info once)
 */
static int l_auth_type(lua_State *L)
{
    struct director *d = todirector(L);
    lua_settop(L, 1);
    int rc = discover_auth(L, d);
    if (rc == 0)
        lua_pushstring(L, d->auth == AUTH_UAA ? "uaa" : "basic");
    return results(L, rc, 1);
}

/***
 * d:deploy(manifest_yaml [, {context_id=, recreate=, fix=, dry_run=, skip_drain=}]) -> task_id | nil, err
 * POST /deployments (Content-Type text/yaml) → 302 /tasks/<id>.
 */
static int l_deploy(lua_State *L)
{
    static const char *const keys[] = {"context_id", "recreate", "fix", "dry_run", "skip_drain", NULL};
    struct director *d = todirector(L);
    size_t len;
    const char *manifest = luaL_checklstring(L, 2, &len);
    int has_opts = !lua_isnoneornil(L, 3);
    if (has_opts)
        forge_checkkeys(L, 3, "deploy", keys);
    lua_settop(L, 3);
    const char *ctx = has_opts ? forge_optstrfield(L, 3, "context_id", NULL) : NULL;
    if (ctx && strlen(ctx) > MAX_CONTEXT_ID)
        return luaL_argerror(L, 3, "context_id must be at most 64 characters");
    int base = lua_gettop(L);
    lua_pushstring(L, d->url);
    lua_pushliteral(L, "/deployments");
    const char *sep = "?";
    static const char *const flags[] = {"recreate", "fix", "dry_run", "skip_drain", NULL};
    for (int i = 0; has_opts && flags[i]; i++) {
        if (forge_optboolfield(L, 3, flags[i], 0)) {
            lua_pushfstring(L, "%s%s=true", sep, flags[i]);
            sep = "&";
        }
    }
    lua_concat(L, lua_gettop(L) - base);                 /* 4: url */
    struct req rq = {.method = "POST", .url = lua_tostring(L, 4), .ctype = "text/yaml",
                     .body = manifest, .len = len};
    if (ctx)
        rq.extra[0] = lua_pushfstring(L, "X-Bosh-Context-Id: %s", ctx);
    return results(L, task_call(L, d, &rq, "POST /deployments"), 1);
}

/* Push d->url .. prefix .. escaped(name) .. suffix. Stack: [] -> [url] */
static const char *push_name_url(lua_State *L, struct director *d, const char *prefix, const char *name,
                                 const char *suffix)
{
    lua_pushstring(L, d->url);
    lua_pushstring(L, prefix);
    push_escaped(L, name);
    lua_pushstring(L, suffix);
    lua_concat(L, 4);
    return lua_tostring(L, -1);
}

/***
 * d:delete_deployment(name [, {force=true}]) -> task_id | nil, err
 * DELETE /deployments/<name>[?force=true] → 302. An unknown name is bosh.not_found (70000).
 */
static int l_delete_deployment(lua_State *L)
{
    static const char *const keys[] = {"force", NULL};
    struct director *d = todirector(L);
    const char *name = luaL_checkstring(L, 2);
    int force = 0;
    if (!lua_isnoneornil(L, 3)) {
        forge_checkkeys(L, 3, "delete_deployment", keys);
        force = forge_optboolfield(L, 3, "force", 0);
    }
    lua_settop(L, 3);
    struct req rq = {.method = "DELETE",
                     .url = push_name_url(L, d, "/deployments/", name, force ? "?force=true" : "")};
    return results(L, task_call(L, d, &rq, "DELETE /deployments"), 1);
}

/***
 * d:deployment(name) -> manifest_text | nil (the deployment has no successful manifest yet) | nil, err
 */
static int l_deployment(lua_State *L)
{
    struct director *d = todirector(L);
    const char *name = luaL_checkstring(L, 2);
    lua_settop(L, 2);
    lua_pushliteral(L, "/deployments/");
    push_escaped(L, name);
    lua_concat(L, 2);                                     /* 3: path */
    int rc = get_json(L, d, lua_tostring(L, 3), "GET /deployments/<name>");
    if (rc < 0)
        return results(L, rc, 1);
    if (!lua_istable(L, -1))
        return forge_pusherror(L, "bosh.protocol", 0, "GET /deployments/%s: not a JSON object", name);
    if (lua_getfield(L, -1, "manifest") == LUA_TSTRING)
        return 1;
    lua_pushnil(L);
    return 1;
}

/***
 * d:deployments() -> array of {name, releases, stemcells, cloud_config, teams, locked?} | nil, err
 */
static int l_deployments(lua_State *L)
{
    struct director *d = todirector(L);
    lua_settop(L, 1);
    return results(L, get_json(L, d, "/deployments", "GET /deployments"), 1);
}

static lua_Integer check_task_id(lua_State *L, int idx)
{
    lua_Integer id = luaL_checkinteger(L, idx);
    luaL_argcheck(L, id > 0, idx, "task id must be a positive integer");
    return id;
}

/***
 * d:task(id) -> {id, state, description, result?, timestamp?, started_at, deployment?, context_id?, user}
 * | nil, err (bosh.not_found with director_code 10000 for an unknown id)
 */
static int l_task(lua_State *L)
{
    struct director *d = todirector(L);
    lua_Integer id = check_task_id(L, 2);
    lua_settop(L, 2);
    lua_pushfstring(L, "/tasks/%I", (LUAI_UACINT)id);
    return results(L, get_json(L, d, lua_tostring(L, 3), "GET /tasks/<id>"), 1);
}

/***
 * d:task_output(id, type [, {offset=n}]) -> text, total? | nil, err
 * GET /tasks/<id>/output?type=result|event|debug|cpi. With offset, sends Range: bytes=offset-
 * and returns only the new text ("" when nothing is new) plus the total size from Content-Range.
 */
static int l_task_output(lua_State *L)
{
    static const char *const keys[] = {"offset", NULL};
    struct director *d = todirector(L);
    lua_Integer id = check_task_id(L, 2);
    const char *type = luaL_checkstring(L, 3);
    lua_Integer offset = -1;
    if (!lua_isnoneornil(L, 4)) {
        forge_checkkeys(L, 4, "task_output", keys);
        offset = forge_optintfield(L, 4, "offset", -1);
    }
    lua_settop(L, 4);
    lua_pushfstring(L, "%s/tasks/%I/output?type=", d->url, (LUAI_UACINT)id);
    push_escaped(L, type);
    lua_concat(L, 2);                                     /* 5: url */
    struct req rq = {.method = "GET", .url = lua_tostring(L, 5)};
    if (offset >= 0)
        rq.extra[0] = lua_pushfstring(L, "Range: bytes=%I-", (LUAI_UACINT)offset);
    int rc = authed(L, d, &rq);
    if (rc < 0)
        return results(L, rc, 1);
    if (d->status == 204 || d->status == 416) {
        lua_pushliteral(L, "");
        return 1;
    }
    if (expect(L, d, "GET /tasks/<id>/output", 200, 206) < 0)
        return results(L, -1, 1);
    lua_pushlstring(L, d->body.p ? d->body.p : "", d->body.len);
    if (d->status == 206 && d->content_range) {
        const char *slash = strrchr(d->content_range, '/');
        if (slash && slash[1] >= '0' && slash[1] <= '9') {
            lua_pushinteger(L, (lua_Integer)strtoll(slash + 1, NULL, 10));
            return 2;
        }
    }
    return 1;
}

static int is_final(const char *state)
{
    return strcmp(state, "done") == 0 || strcmp(state, "error") == 0 || strcmp(state, "cancelled") == 0 ||
           strcmp(state, "timeout") == 0;
}

/*
 * Poll GET /tasks/<id> until final or the deadline. Stack: [] -> [task] | [err]
 * A task that ends in anything but done is bosh.task_failed when require_done.
 */
static int poll_task(lua_State *L, struct director *d, lua_Integer id, long timeout_ms, long poll_ms,
                     int require_done)
{
    double deadline = now_mono() + timeout_ms / 1000.0;
    int top = lua_gettop(L);
    for (;;) {
        lua_pushfstring(L, "/tasks/%I", (LUAI_UACINT)id);
        int rc = get_json(L, d, lua_tostring(L, -1), "GET /tasks/<id>");
        lua_remove(L, -2);
        if (rc < 0)
            return -1;
        if (!lua_istable(L, -1) || lua_getfield(L, -1, "state") != LUA_TSTRING) {
            lua_settop(L, top);
            forge_newerror(L, "bosh.protocol", 0, "GET /tasks/%d: no state in the answer", (int)id);
            return -1;
        }
        const char *state = lua_tostring(L, -1);
        if (is_final(state)) {
            if (require_done && strcmp(state, "done") != 0) {
                lua_getfield(L, -2, "result");
                const char *res = lua_tostring(L, -1);
                forge_newerror(L, "bosh.task_failed", 0, "task %d ended %s: %s", (int)id, state,
                               res ? res : "no result");
                lua_pushinteger(L, id);
                lua_setfield(L, -2, "task_id");
                keep_top(L, top);
                return -1;
            }
            lua_pop(L, 1);
            return 0;
        }
        lua_settop(L, top);
        if (now_mono() >= deadline) {
            forge_newerror(L, "bosh.timeout", 1, "task %d still %s after %ld ms", (int)id, "running", timeout_ms);
            lua_pushinteger(L, id);
            lua_setfield(L, -2, "task_id");
            return -1;
        }
        sleep_ms(poll_ms);
    }
}

/***
 * d:wait_task(id [, {timeout_ms=60000, poll_ms=200}]) -> final task | nil, err (bosh.timeout)
 * A bounded blocking helper for tools and specs; the broker polls d:task() instead.
 */
static int l_wait_task(lua_State *L)
{
    static const char *const keys[] = {"timeout_ms", "poll_ms", NULL};
    struct director *d = todirector(L);
    lua_Integer id = check_task_id(L, 2);
    lua_Integer timeout = 60000, poll = 200;
    if (!lua_isnoneornil(L, 3)) {
        forge_checkkeys(L, 3, "wait_task", keys);
        timeout = forge_optintfield(L, 3, "timeout_ms", timeout);
        poll = forge_optintfield(L, 3, "poll_ms", poll);
    }
    luaL_argcheck(L, timeout > 0 && poll > 0, 3, "timeout_ms and poll_ms must be > 0");
    lua_settop(L, 3);
    return results(L, poll_task(L, d, id, (long)timeout, (long)poll, 0), 1);
}

/* GET /tasks/<id>/output?type=result as JSON lines. Stack: [] -> [array] | [err] */
static int result_lines(lua_State *L, struct director *d, lua_Integer id, const char *what)
{
    struct req rq = {.method = "GET",
                     .url = lua_pushfstring(L, "%s/tasks/%I/output?type=result", d->url, (LUAI_UACINT)id)};
    int base = lua_gettop(L);
    int rc = authed(L, d, &rq);
    if (rc == 0 && d->status == 204) {
        lua_newtable(L);
    } else {
        if (rc == 0)
            rc = expect(L, d, what, 200, 206);
        if (rc == 0)
            rc = json_lines(L, d->body.p ? d->body.p : "", d->body.len, what);
    }
    lua_remove(L, base);
    return rc;
}

/***
 * d:vms(name [, {full=true, instances=false, timeout_ms=60000, poll_ms=200}]) -> array | nil, err
 * full: GET /deployments/<name>/vms?format=full (or /instances) → task, polled until done, then
 * its result lines {job_name, index, id, az, ips, job_state, state, vm_cid, …}. full=false reads
 * the database-only listing {job, index, id, az, ips, cid, agent_id, …} in one call.
 */
static int l_vms(lua_State *L)
{
    static const char *const keys[] = {"full", "instances", "timeout_ms", "poll_ms", NULL};
    struct director *d = todirector(L);
    const char *name = luaL_checkstring(L, 2);
    int full = 1, instances = 0;
    lua_Integer timeout = 60000, poll = 200;
    if (!lua_isnoneornil(L, 3)) {
        forge_checkkeys(L, 3, "vms", keys);
        full = forge_optboolfield(L, 3, "full", 1);
        instances = forge_optboolfield(L, 3, "instances", 0);
        timeout = forge_optintfield(L, 3, "timeout_ms", timeout);
        poll = forge_optintfield(L, 3, "poll_ms", poll);
    }
    luaL_argcheck(L, timeout > 0 && poll > 0, 3, "timeout_ms and poll_ms must be > 0");
    lua_settop(L, 3);
    const char *suffix = instances ? (full ? "/instances?format=full" : "/instances")
                                   : (full ? "/vms?format=full" : "/vms");
    if (!full) {
        lua_pushliteral(L, "/deployments/");
        push_escaped(L, name);
        lua_pushstring(L, suffix);
        lua_concat(L, 3);
        return results(L, get_json(L, d, lua_tostring(L, -1), "GET /deployments/<name>/vms"), 1);
    }
    struct req rq = {.method = "GET", .url = push_name_url(L, d, "/deployments/", name, suffix)};
    if (task_call(L, d, &rq, "GET /deployments/<name>/vms?format=full") < 0)
        return results(L, -1, 1);
    lua_Integer id = lua_tointeger(L, -1);
    if (poll_task(L, d, id, (long)timeout, (long)poll, 1) < 0)
        return results(L, -1, 1);
    lua_pop(L, 1);
    return results(L, result_lines(L, d, id, "vms result"), 1);
}

/***
 * d:run_errand(name, errand [, instances]) -> task_id | nil, err
 * instances: array of {group=, id=} or "group/id" strings; absent or empty = all instances.
 */
static int l_run_errand(lua_State *L)
{
    static const char *const usage = "instances must be {group=, id=} tables or \"group/id\" strings";
    struct director *d = todirector(L);
    const char *name = luaL_checkstring(L, 2);
    const char *errand = luaL_checkstring(L, 3);
    if (!lua_isnoneornil(L, 4))
        luaL_checktype(L, 4, LUA_TTABLE);
    lua_settop(L, 4);
    lua_Integer n = lua_istable(L, 4) ? luaL_len(L, 4) : 0;
    int base = lua_gettop(L);
    lua_pushliteral(L, "{\"keep-alive\":false,\"when-changed\":false,\"instances\":[");
    for (lua_Integer i = 1; i <= n; i++) {
        int t = lua_geti(L, 4, i);                        /* [.., item] */
        if (t == LUA_TSTRING) {
            const char *s = lua_tostring(L, -1);
            const char *slash = strchr(s, '/');
            if (!slash)
                return luaL_argerror(L, 4, usage);
            lua_pushlstring(L, s, (size_t)(slash - s));
            lua_pushstring(L, slash + 1);
        } else if (t == LUA_TTABLE) {
            lua_getfield(L, -1, "group");
            lua_getfield(L, -2, "id");
            if (lua_type(L, -2) != LUA_TSTRING || !lua_isstring(L, -1))
                return luaL_argerror(L, 4, usage);
            lua_pushstring(L, lua_tostring(L, -1));       /* a number id becomes a string */
            lua_replace(L, -2);
        } else {
            return luaL_argerror(L, 4, usage);
        }
        lua_remove(L, -3);                                /* [.., group, id] */
        luaL_Buffer eb;
        luaL_buffinit(L, &eb);                            /* balanced: only eb's slot above */
        luaL_addstring(&eb, i > 1 ? ",{\"group\":" : "{\"group\":");
        add_json_string(&eb, lua_tostring(L, -3));
        luaL_addstring(&eb, ",\"id\":");
        add_json_string(&eb, lua_tostring(L, -2));
        luaL_addchar(&eb, '}');
        luaL_pushresult(&eb);                             /* [.., group, id, json] */
        lua_replace(L, -3);
        lua_pop(L, 1);                                    /* [.., json] */
        lua_concat(L, 2);
    }
    lua_pushliteral(L, "]}");
    lua_concat(L, 2);
    luaL_checkstack(L, 4, NULL);
    (void)base;                                           /* 5: body */
    size_t blen;
    const char *body = lua_tolstring(L, 5, &blen);
    lua_pushstring(L, d->url);
    lua_pushliteral(L, "/deployments/");
    push_escaped(L, name);
    lua_pushliteral(L, "/errands/");
    push_escaped(L, errand);
    lua_pushliteral(L, "/runs");
    lua_concat(L, 6);                                     /* 6: url */
    struct req rq = {.method = "POST", .url = lua_tostring(L, 6), .ctype = "application/json",
                     .body = body, .len = blen};
    return results(L, task_call(L, d, &rq, "POST /deployments/<name>/errands/<errand>/runs"), 1);
}

/***
 * d:errand_result(task_id) -> array of {instance={group,id}, errand_name, exit_code, stdout, stderr}
 * | nil, err. The task ends done even when an errand failed: read exit_code (0 ok, 1-128
 * errored, >128 cancelled).
 */
static int l_errand_result(lua_State *L)
{
    struct director *d = todirector(L);
    lua_Integer id = check_task_id(L, 2);
    lua_settop(L, 2);
    return results(L, result_lines(L, d, id, "errand result"), 1);
}

/***
 * d:releases() -> array of {name, release_versions={…}} | nil, err
 */
static int l_releases(lua_State *L)
{
    struct director *d = todirector(L);
    lua_settop(L, 1);
    return results(L, get_json(L, d, "/releases", "GET /releases"), 1);
}

/***
 * d:stemcells() -> array of {name, operating_system, version, cid, …} | nil, err
 */
static int l_stemcells(lua_State *L)
{
    struct director *d = todirector(L);
    lua_settop(L, 1);
    return results(L, get_json(L, d, "/stemcells", "GET /stemcells"), 1);
}

static void close_upload(struct director *d)
{
    if (d->upload) {
        fclose(d->upload);
        d->upload = NULL;
    }
}

/* Shared body of upload_release / upload_stemcell. */
static int upload(lua_State *L, const char *what_path)
{
    static const char *const keys[] = {"fix", "rebase", NULL};
    struct director *d = todirector(L);
    const char *src = luaL_checkstring(L, 2);
    const char *sha1 = luaL_optstring(L, 3, NULL);
    int fix = 0, rebase = 0;
    if (!lua_isnoneornil(L, 4)) {
        forge_checkkeys(L, 4, "upload", keys);
        fix = forge_optboolfield(L, 4, "fix", 0);
        rebase = forge_optboolfield(L, 4, "rebase", 0);
    }
    lua_settop(L, 4);
    int remote = strncmp(src, "http://", 7) == 0 || strncmp(src, "https://", 8) == 0;
    lua_pushstring(L, d->url);
    lua_pushstring(L, what_path);
    lua_pushstring(L, fix ? "?fix=true" : "");
    lua_pushstring(L, rebase ? (fix ? "&rebase=true" : "?rebase=true") : "");
    lua_pushstring(L, !remote && sha1 ? ((fix || rebase) ? "&sha1=" : "?sha1=") : "");
    push_escaped(L, !remote && sha1 ? sha1 : "");
    lua_concat(L, 6);                                     /* 5: url */
    struct req rq = {.method = "POST", .url = lua_tostring(L, 5), .timeout_ms = d->upload_ms};
    if (remote) {
        luaL_Buffer jb;
        luaL_buffinit(L, &jb);
        luaL_addstring(&jb, "{\"location\":");
        add_json_string(&jb, src);
        if (sha1) {
            luaL_addstring(&jb, ",\"sha1\":");
            add_json_string(&jb, sha1);
        }
        luaL_addchar(&jb, '}');
        luaL_pushresult(&jb);                             /* 6: body */
        rq.body = lua_tolstring(L, 6, &rq.len);
        rq.ctype = "application/json";
    } else {
        close_upload(d);
        d->upload = fopen(src, "rb");
        struct stat st;
        if (!d->upload || fstat(fileno(d->upload), &st) != 0 || !S_ISREG(st.st_mode)) {
            int e = d->upload ? (errno ? errno : EISDIR) : errno;
            close_upload(d);
            return forge_pusherror(L, "bosh.local", 0, "%s: %s", src, strerror(e));
        }
        rq.file = d->upload;
        rq.file_size = (curl_off_t)st.st_size;
        rq.ctype = "application/x-compressed";
    }
    lua_pushfstring(L, "POST %s", what_path);
    int rc = task_call(L, d, &rq, lua_tostring(L, -1));
    close_upload(d);
    return results(L, rc, 1);
}

/***
 * d:upload_release(path_or_url [, sha1 [, {fix=, rebase=}]]) -> task_id | nil, err
 * A URL is sent as {"location","sha1"} JSON; a local tgz as the raw body
 * (application/x-compressed, sha1 in the query). Uses upload_timeout_ms.
 */
static int l_upload_release(lua_State *L)
{
    return upload(L, "/releases");
}

/***
 * d:upload_stemcell(path_or_url [, sha1 [, {fix=}]]) -> task_id | nil, err
 */
static int l_upload_stemcell(lua_State *L)
{
    return upload(L, "/stemcells");
}

/***
 * d:cancel_task(id) -> true | nil, err (bosh.bad_request when the task can no longer be cancelled)
 * DELETE /task/<id> (singular) → 204.
 */
static int l_cancel_task(lua_State *L)
{
    struct director *d = todirector(L);
    lua_Integer id = check_task_id(L, 2);
    lua_settop(L, 2);
    struct req rq = {.method = "DELETE", .url = lua_pushfstring(L, "%s/task/%I", d->url, (LUAI_UACINT)id)};
    int rc = authed(L, d, &rq);
    if (rc == 0)
        rc = expect(L, d, "DELETE /task/<id>", 204, 200);
    if (rc == 0)
        lua_pushboolean(L, 1);
    return results(L, rc, 1);
}

/***
 * d:tasks{state=string|array, deployment=, context_id=, limit=, verbose=} -> array (newest first)
 * | nil, err
 */
static int l_tasks(lua_State *L)
{
    static const char *const keys[] = {"state", "deployment", "context_id", "limit", "verbose", NULL};
    static const char *const usage = "state must be a string or an array of strings";
    struct director *d = todirector(L);
    int has = !lua_isnoneornil(L, 2);
    if (has)
        forge_checkkeys(L, 2, "tasks", keys);
    lua_settop(L, 2);
    lua_pushliteral(L, "/tasks");                         /* 3: path, grown piece by piece */
    const char *sep = "?";
    if (has) {
        int t = lua_getfield(L, 2, "state");              /* 4 */
        if (t == LUA_TTABLE) {
            lua_Integer n = luaL_len(L, 4);
            lua_pushliteral(L, "");                       /* 5: states joined with "," */
            for (lua_Integer i = 1; i <= n; i++) {
                if (lua_geti(L, 4, i) != LUA_TSTRING)
                    return luaL_argerror(L, 2, usage);
                if (i > 1) {
                    lua_pushliteral(L, ",");
                    lua_insert(L, -2);
                    lua_concat(L, 2);
                }
                lua_concat(L, 2);
            }
            if (n > 0) {
                lua_pushfstring(L, "%s%sstate=", lua_tostring(L, 3), sep);
                push_escaped(L, lua_tostring(L, 5));
                lua_concat(L, 2);
                lua_replace(L, 3);
                sep = "&";
            }
        } else if (t == LUA_TSTRING) {
            lua_pushfstring(L, "%s%sstate=", lua_tostring(L, 3), sep);
            push_escaped(L, lua_tostring(L, 4));
            lua_concat(L, 2);
            lua_replace(L, 3);
            sep = "&";
        } else if (t != LUA_TNIL) {
            return luaL_argerror(L, 2, usage);
        }
        lua_settop(L, 3);
        static const char *const strs[] = {"deployment", "context_id", NULL};
        for (int i = 0; strs[i]; i++) {
            const char *v = forge_optstrfield(L, 2, strs[i], NULL);
            if (!v)
                continue;
            lua_pushfstring(L, "%s%s%s=", lua_tostring(L, 3), sep, strs[i]);
            push_escaped(L, v);
            lua_concat(L, 2);
            lua_replace(L, 3);
            sep = "&";
        }
        static const char *const ints[] = {"limit", "verbose", NULL};
        for (int i = 0; ints[i]; i++) {
            lua_Integer v = forge_optintfield(L, 2, ints[i], -1);
            if (v >= 0) {
                lua_pushfstring(L, "%s%s%s=%I", lua_tostring(L, 3), sep, ints[i], (LUAI_UACINT)v);
                lua_replace(L, 3);
                sep = "&";
            }
        }
    }
    return results(L, get_json(L, d, lua_tostring(L, 3), "GET /tasks"), 1);
}

/***
 * d:url() -> the base URL
 */
static int l_url(lua_State *L)
{
    lua_pushstring(L, todirector(L)->url);
    return 1;
}

/***
 * d:close() — free the curl handle and buffers (also __gc / __close). Idempotent.
 */
static int l_close(lua_State *L)
{
    struct director *d = luaL_checkudata(L, 1, DIRECTOR_MT);
    close_upload(d);
    curl_slist_free_all(d->hdrs);
    d->hdrs = NULL;
    if (d->curl)
        curl_easy_cleanup(d->curl);
    d->curl = NULL;
    free(d->body.p);
    d->body.p = NULL;
    d->body.len = d->body.cap = 0;
    char **strs[] = {&d->location, &d->content_range, &d->url, &d->user, &d->password, &d->client,
                     &d->secret, &d->ca, &d->uaa_url, &d->token};
    for (size_t i = 0; i < sizeof strs / sizeof strs[0]; i++)
        set_str(strs[i], NULL);
    d->closed = 1;
    return 0;
}

static int l_tostring(lua_State *L)
{
    struct director *d = luaL_checkudata(L, 1, DIRECTOR_MT);
    lua_pushfstring(L, "forge.bosh.director (%s)", d->closed ? "closed" : d->url);
    return 1;
}

int luaopen_forge_bosh(lua_State *L)
{
    static const luaL_Reg lib[] = {
        {"new", l_bosh_new},
        {NULL, NULL},
    };
    static const luaL_Reg methods[] = {
        {"info", l_info},
        {"auth_type", l_auth_type},
        {"deploy", l_deploy},
        {"delete_deployment", l_delete_deployment},
        {"deployment", l_deployment},
        {"deployments", l_deployments},
        {"task", l_task},
        {"task_output", l_task_output},
        {"wait_task", l_wait_task},
        {"vms", l_vms},
        {"run_errand", l_run_errand},
        {"errand_result", l_errand_result},
        {"releases", l_releases},
        {"stemcells", l_stemcells},
        {"upload_release", l_upload_release},
        {"upload_stemcell", l_upload_stemcell},
        {"cancel_task", l_cancel_task},
        {"tasks", l_tasks},
        {"url", l_url},
        {"close", l_close},
        {NULL, NULL},
    };
    static const luaL_Reg metamethods[] = {
        {"__gc", l_close},
        {"__close", l_close},
        {"__tostring", l_tostring},
        {NULL, NULL},
    };
    forge_json_decoder(L, &json_decode_key, BOSH_JSON_DEPTH);      /* may raise */
    forge_newclass(L, DIRECTOR_MT, methods, metamethods);
    luaL_newlib(L, lib);
    forge_setmodinfo(L, "forge.bosh");
    return 1;
}
