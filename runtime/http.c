/*
 * forge.http — the broker's HTTP server on libmicrohttpd.
 *
 * libmicrohttpd runs a pool of threads (internal polling, one listen socket). Each pool
 * thread owns one lua_State, created on its first request: it requires the handler module
 * named in http.serve{} and calls `handle(req)` for every request that thread serves. There
 * is no interpreter lock on the request path; states share nothing but the store on disk.
 *
 * Request life (see DESIGN.md "Known traps"):
 *   uri_log callback      allocates the request context (raw URI, request id), counts it active
 *   1st access call       headers only: reject an oversized Content-Length at once (413)
 *   next calls            body chunks, kept up to the body limit
 *   last call (size 0)    dispatch to Lua and queue the answer — only now, so keep-alive holds
 *   completed callback    frees the context
 *
 * Stopping: srv:stop(grace) quiesces the listen socket, waits for in-flight requests to
 * finish (bounded by grace), stops the daemon and closes every worker state.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <microhttpd.h>
#include <lualib.h>

#include "forge/forge.h"

#define SERVER_MT "forge.http.server"
#define DEFAULT_BODY_LIMIT (1024 * 1024)

/* Present in the forge binary (generated preload table); absent when loaded as a .so. */
extern void forge_preload(lua_State *L) __attribute__((weak));

struct worker {
    lua_State *L;
    int handle_ref;             /* registry ref of handler.handle, LUA_NOREF until loaded */
    struct server *srv;
    struct worker *next;
};

struct server {
    struct MHD_Daemon *daemon;
    size_t body_limit;
    char *handler;              /* module name required in every worker state */
    char *init_arg;             /* string passed to handler.init() */
    size_t init_len;
    char *path, *cpath;         /* package.path / package.cpath for worker states */
    unsigned short port;
    char id_prefix[9];
    atomic_long active;         /* requests between uri_log and completed */
    atomic_ullong seq;
    pthread_mutex_t lock;       /* guards workers */
    struct worker *workers;
    int stopped;
};

struct request {
    char *uri;
    char *body;
    size_t len, cap;
    int started, too_large;
    char id[32];
};

static _Thread_local struct worker *tls_worker;
static volatile sig_atomic_t stop_requested, reload_requested;


/* ---- small helpers ---------------------------------------------------------------- */

static double monotonic_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

static char *xstrdup_len(const char *s, size_t len)
{
    char *p = malloc(len + 1);
    if (p) {
        memcpy(p, s, len);
        p[len] = '\0';
    }
    return p;
}

static enum MHD_Result queue_bytes(struct MHD_Connection *con, unsigned status, const char *ctype,
                                   const char *body, size_t len, const char *request_id)
{
    struct MHD_Response *resp =
        MHD_create_response_from_buffer(len, (void *)body, MHD_RESPMEM_MUST_COPY);
    if (!resp)
        return MHD_NO;
    MHD_add_response_header(resp, "Content-Type", ctype);
    MHD_add_response_header(resp, "X-Request-Id", request_id);
    enum MHD_Result ret = MHD_queue_response(con, status, resp);
    MHD_destroy_response(resp);
    return ret;
}

/*
 * One log line of JSON on stderr, as forge.log writes them: {"level":"error","msg":..,
 * "request_id":..,"error":<detail, escaped>}. Used where no Lua state can log (a worker that
 * failed to load, a handler that raised). One fputs of a whole line keeps lines whole.
 */
static void log_error(const char *msg, const char *request_id, const char *detail)
{
    size_t cap = strlen(detail) * 6 + strlen(msg) + 160, n = 0;
    char *line = malloc(cap);
    if (!line)
        return;
    n += (size_t)snprintf(line, cap, "{\"level\":\"error\",\"msg\":\"%s\",\"request_id\":\"%s\",\"error\":\"",
                          msg, request_id);
    for (const unsigned char *c = (const unsigned char *)detail; *c && n + 8 < cap; c++) {
        if (*c == '"' || *c == '\\') {
            line[n++] = '\\';
            line[n++] = (char)*c;
        } else if (*c == '\n') {
            line[n++] = '\\';
            line[n++] = 'n';
        } else if (*c < 0x20) {
            n += (size_t)snprintf(line + n, cap - n, "\\u%04x", *c);
        } else {
            line[n++] = (char)*c;
        }
    }
    snprintf(line + n, cap - n, "\"}\n");
    fputs(line, stderr);
    free(line);
}

/* A JSON error body {"error","description"}; description must not need escaping. */
static enum MHD_Result queue_error(struct MHD_Connection *con, unsigned status, const char *error,
                                   const char *description, const char *request_id)
{
    char buf[512];
    int n = snprintf(buf, sizeof buf, "{\"error\":\"%s\",\"description\":\"%s\"}", error, description);
    return queue_bytes(con, status, "application/json", buf, (size_t)n, request_id);
}


/* ---- worker states ---------------------------------------------------------------- */

/* Message handler: error value -> string with traceback. [err] -> [msg] */
static int traceback_handler(lua_State *L)
{
    const char *msg = luaL_tolstring(L, 1, NULL);
    luaL_traceback(L, L, msg, 1);
    return 1;
}

/*
 * Load the handler module into the worker state: require(handler), call init(arg), keep a
 * ref to handle. On failure leaves an error message on the stack and returns 0.
 * Stack: [] -> [] on success, [] -> [msg] on failure.
 */
static int worker_load(struct worker *w)
{
    lua_State *L = w->L;
    lua_pushcfunction(L, traceback_handler);
    lua_getglobal(L, "require");
    lua_pushstring(L, w->srv->handler);
    if (lua_pcall(L, 1, 1, 1) != LUA_OK)
        goto fail;
    if (!lua_istable(L, -1)) {
        lua_pushfstring(L, "handler module '%s' must return a table", w->srv->handler);
        goto fail;
    }
    if (lua_getfield(L, -1, "init") == LUA_TFUNCTION) {
        lua_pushlstring(L, w->srv->init_arg, w->srv->init_len);
        if (lua_pcall(L, 1, 0, 1) != LUA_OK)
            goto fail;
    } else {
        lua_pop(L, 1);
    }
    if (lua_getfield(L, -1, "handle") != LUA_TFUNCTION) {
        lua_pushfstring(L, "handler module '%s' has no handle function", w->srv->handler);
        goto fail;
    }
    w->handle_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    lua_settop(L, 0);
    return 1;
fail:
    lua_replace(L, 1);
    lua_settop(L, 1);
    return 0;
}

static struct worker *worker_new(struct server *s)
{
    struct worker *w = calloc(1, sizeof *w);
    if (!w)
        return NULL;
    w->L = luaL_newstate();
    if (!w->L) {
        free(w);
        return NULL;
    }
    w->srv = s;
    w->handle_ref = LUA_NOREF;
    luaL_openlibs(w->L);
    if (forge_preload)
        forge_preload(w->L);
    lua_getglobal(w->L, "package");
    lua_pushstring(w->L, s->path);
    lua_setfield(w->L, -2, "path");
    lua_pushstring(w->L, s->cpath);
    lua_setfield(w->L, -2, "cpath");
    lua_pop(w->L, 1);
    pthread_mutex_lock(&s->lock);
    w->next = s->workers;
    s->workers = w;
    pthread_mutex_unlock(&s->lock);
    return w;
}

/* The calling pool thread's worker, with its handler loaded; NULL and *err on failure. */
static struct worker *worker_get(struct server *s, char *err, size_t errlen)
{
    if (!tls_worker || tls_worker->srv != s)
        tls_worker = worker_new(s);
    struct worker *w = tls_worker;
    if (!w) {
        snprintf(err, errlen, "out of memory creating a worker state");
        return NULL;
    }
    if (w->handle_ref == LUA_NOREF && !worker_load(w)) {
        snprintf(err, errlen, "%s", lua_tostring(w->L, -1));
        lua_settop(w->L, 0);
        return NULL;
    }
    return w;
}


/* ---- request table and response ----------------------------------------------------- */

/*
 * MHD iterator: add one header, name lowercased, to the table at the top of the stack;
 * a repeated header is joined with ", " as RFC 9110 allows.
 * Stack: [headers] -> [headers]
 */
static enum MHD_Result add_header(void *cls, enum MHD_ValueKind kind, const char *key, const char *value)
{
    lua_State *L = cls;
    (void)kind;
    luaL_Buffer b;
    luaL_buffinit(L, &b);
    for (const char *p = key; *p; p++)
        luaL_addchar(&b, (*p >= 'A' && *p <= 'Z') ? *p + 32 : *p);
    luaL_pushresult(&b);                                  /* [headers, k] */
    lua_pushvalue(L, -1);                                 /* [headers, k, k] */
    if (lua_rawget(L, -3) == LUA_TSTRING) {               /* [headers, k, old] */
        lua_pushliteral(L, ", ");
        lua_pushstring(L, value ? value : "");
        lua_concat(L, 3);                                 /* [headers, k, "old, new"] */
    } else {
        lua_pop(L, 1);
        lua_pushstring(L, value ? value : "");            /* [headers, k, v] */
    }
    lua_rawset(L, -3);                                    /* [headers] */
    return MHD_YES;
}

static void push_remote(lua_State *L, struct MHD_Connection *con)
{
    const union MHD_ConnectionInfo *ci = MHD_get_connection_info(con, MHD_CONNECTION_INFO_CLIENT_ADDRESS);
    char addr[INET6_ADDRSTRLEN] = "";
    if (ci && ci->client_addr) {
        const struct sockaddr *sa = ci->client_addr;
        if (sa->sa_family == AF_INET)
            inet_ntop(AF_INET, &((const struct sockaddr_in *)sa)->sin_addr, addr, sizeof addr);
        else if (sa->sa_family == AF_INET6)
            inet_ntop(AF_INET6, &((const struct sockaddr_in6 *)sa)->sin6_addr, addr, sizeof addr);
    }
    lua_pushstring(L, addr);
}

/*
 * Build the request table.
 * Stack: [...] -> [..., req]
 */
static void push_request(lua_State *L, struct MHD_Connection *con, const char *method, struct request *r)
{
    lua_createtable(L, 0, 7);
    lua_pushstring(L, method);
    lua_setfield(L, -2, "method");
    lua_pushstring(L, r->uri);
    lua_setfield(L, -2, "uri");
    lua_pushlstring(L, r->body ? r->body : "", r->len);
    lua_setfield(L, -2, "body");
    lua_pushstring(L, r->id);
    lua_setfield(L, -2, "id");
    push_remote(L, con);
    lua_setfield(L, -2, "remote");
    lua_newtable(L);
    MHD_get_connection_values(con, MHD_HEADER_KIND, add_header, L);
    lua_setfield(L, -2, "headers");
}

/*
 * Turn the handler's results into a queued response.
 * Stack: [msgh, status, headers, body] (as returned by handle)
 */
static enum MHD_Result queue_lua_response(lua_State *L, struct MHD_Connection *con, struct request *r)
{
    int isnum;
    lua_Integer status = lua_tointegerx(L, 2, &isnum);
    if (!isnum || status < 100 || status > 599)
        return queue_error(con, 500, "InternalError", "handler returned no valid status", r->id);
    size_t len = 0;
    const char *body = lua_tolstring(L, 4, &len);
    struct MHD_Response *resp =
        MHD_create_response_from_buffer(body ? len : 0, (void *)(body ? body : ""), MHD_RESPMEM_MUST_COPY);
    if (!resp)
        return MHD_NO;
    int has_ctype = 0;
    if (lua_istable(L, 3)) {
        lua_pushnil(L);
        while (lua_next(L, 3)) {
            if (lua_type(L, -2) == LUA_TSTRING && lua_type(L, -1) == LUA_TSTRING) {
                const char *k = lua_tostring(L, -2);
                MHD_add_response_header(resp, k, lua_tostring(L, -1));
                if (strcasecmp(k, "Content-Type") == 0)
                    has_ctype = 1;
            }
            lua_pop(L, 1);
        }
    }
    if (!has_ctype)
        MHD_add_response_header(resp, "Content-Type", "application/json");
    MHD_add_response_header(resp, "X-Request-Id", r->id);
    enum MHD_Result ret = MHD_queue_response(con, (unsigned)status, resp);
    MHD_destroy_response(resp);
    return ret;
}

static enum MHD_Result dispatch(struct server *s, struct MHD_Connection *con, const char *method,
                                struct request *r)
{
    char err[1024];
    struct worker *w = worker_get(s, err, sizeof err);
    if (!w) {
        log_error("broker handler failed to load", r->id, err);
        return queue_error(con, 503, "ServiceUnavailable", "broker is not ready; see the broker log", r->id);
    }
    lua_State *L = w->L;
    lua_settop(L, 0);
    lua_pushcfunction(L, traceback_handler);              /* [msgh] */
    lua_rawgeti(L, LUA_REGISTRYINDEX, w->handle_ref);     /* [msgh, handle] */
    push_request(L, con, method, r);                      /* [msgh, handle, req] */
    if (lua_pcall(L, 1, 3, 1) != LUA_OK) {                /* [msgh, err] */
        log_error("request handler raised", r->id, lua_tostring(L, -1));
        lua_settop(L, 0);
        return queue_error(con, 500, "InternalError", "the broker failed on this request; see the broker log", r->id);
    }
    enum MHD_Result ret = queue_lua_response(L, con, r); /* [msgh, status, headers, body] */
    lua_settop(L, 0);
    return ret;
}


/* ---- libmicrohttpd callbacks ------------------------------------------------------ */

static void *on_uri(void *cls, const char *uri, struct MHD_Connection *con)
{
    struct server *s = cls;
    (void)con;
    struct request *r = calloc(1, sizeof *r);
    if (!r)
        return NULL;
    r->uri = xstrdup_len(uri, strlen(uri));
    snprintf(r->id, sizeof r->id, "%s-%llx", s->id_prefix, (unsigned long long)atomic_fetch_add(&s->seq, 1));
    atomic_fetch_add(&s->active, 1);
    return r;
}

static void on_completed(void *cls, struct MHD_Connection *con, void **con_cls,
                         enum MHD_RequestTerminationCode toe)
{
    struct server *s = cls;
    struct request *r = *con_cls;
    (void)con;
    (void)toe;
    if (!r)
        return;
    free(r->uri);
    free(r->body);
    free(r);
    *con_cls = NULL;
    atomic_fetch_sub(&s->active, 1);
}

/* Append a body chunk, keeping at most the body limit; 0 on allocation failure. */
static int body_append(struct server *s, struct request *r, const char *data, size_t n)
{
    if (r->too_large || r->len + n > s->body_limit) {
        r->too_large = 1;
        return 1;
    }
    if (r->len + n > r->cap) {
        size_t cap = r->cap ? r->cap : 4096;
        while (cap < r->len + n)
            cap *= 2;
        char *p = realloc(r->body, cap);
        if (!p)
            return 0;
        r->body = p;
        r->cap = cap;
    }
    memcpy(r->body + r->len, data, n);
    r->len += n;
    return 1;
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *con, const char *url,
                                  const char *method, const char *version, const char *upload_data,
                                  size_t *upload_data_size, void **con_cls)
{
    struct server *s = cls;
    struct request *r = *con_cls;
    (void)url;
    (void)version;
    if (!r || !r->uri)
        return MHD_NO;                                    /* out of memory: drop the connection */
    if (!r->started) {
        r->started = 1;
        const char *cl = MHD_lookup_connection_value(con, MHD_HEADER_KIND, MHD_HTTP_HEADER_CONTENT_LENGTH);
        if (cl && strtoull(cl, NULL, 10) > s->body_limit) {
            r->too_large = 1;                             /* answer now; MHD closes the connection */
            return queue_error(con, 413, "PayloadTooLarge", "request body exceeds the broker's body limit", r->id);
        }
        return MHD_YES;
    }
    if (*upload_data_size) {
        if (!body_append(s, r, upload_data, *upload_data_size))
            return MHD_NO;
        *upload_data_size = 0;
        return MHD_YES;
    }
    if (r->too_large)
        return queue_error(con, 413, "PayloadTooLarge", "request body exceeds the broker's body limit", r->id);
    return dispatch(s, con, method, r);
}


/* ---- Lua API ---------------------------------------------------------------------- */

#define toserver(L) ((struct server *)luaL_checkudata(L, 1, SERVER_MT))

static void server_free_config(struct server *s)
{
    free(s->handler);
    free(s->init_arg);
    free(s->path);
    free(s->cpath);
    s->handler = s->init_arg = s->path = s->cpath = NULL;
}

static void server_close_workers(struct server *s)
{
    pthread_mutex_lock(&s->lock);
    struct worker *w = s->workers;
    s->workers = NULL;
    pthread_mutex_unlock(&s->lock);
    while (w) {
        struct worker *next = w->next;
        lua_close(w->L);
        free(w);
        w = next;
    }
}

/* Quiesce, wait up to `grace` seconds for in-flight requests, stop, close states. */
static void server_stop(struct server *s, double grace)
{
    if (s->stopped)
        return;
    s->stopped = 1;
    if (s->daemon) {
        MHD_socket fd = MHD_quiesce_daemon(s->daemon);
        double deadline = monotonic_now() + grace;
        while (atomic_load(&s->active) > 0 && monotonic_now() < deadline) {
            struct timespec ts = {0, 10 * 1000 * 1000};
            nanosleep(&ts, NULL);
        }
        MHD_stop_daemon(s->daemon);
        if (fd != MHD_INVALID_SOCKET)
            close(fd);
        s->daemon = NULL;
    }
    server_close_workers(s);
    server_free_config(s);
    pthread_mutex_destroy(&s->lock);
}

/* Parse "host:port" or "[v6]:port" into addr; 0 on success. */
static int parse_listen(const char *listen, struct sockaddr_storage *addr, socklen_t *alen)
{
    char host[256];
    const char *colon = strrchr(listen, ':');
    if (!colon || (size_t)(colon - listen) >= sizeof host)
        return -EINVAL;
    size_t hlen = (size_t)(colon - listen);
    memcpy(host, listen, hlen);
    host[hlen] = '\0';
    char *end;
    long port = strtol(colon + 1, &end, 10);
    if (*end || end == colon + 1 || port < 0 || port > 65535)
        return -EINVAL;
    memset(addr, 0, sizeof *addr);
    if (host[0] == '[' && hlen > 2 && host[hlen - 1] == ']') {
        struct sockaddr_in6 *a6 = (struct sockaddr_in6 *)addr;
        host[hlen - 1] = '\0';
        if (inet_pton(AF_INET6, host + 1, &a6->sin6_addr) != 1)
            return -EINVAL;
        a6->sin6_family = AF_INET6;
        a6->sin6_port = htons((unsigned short)port);
        *alen = sizeof *a6;
        return 0;
    }
    struct sockaddr_in *a4 = (struct sockaddr_in *)addr;
    if (strcmp(host, "localhost") == 0)
        strcpy(host, "127.0.0.1");
    if (inet_pton(AF_INET, host, &a4->sin_addr) != 1)
        return -EINVAL;
    a4->sin_family = AF_INET;
    a4->sin_port = htons((unsigned short)port);
    *alen = sizeof *a4;
    return 0;
}

static unsigned short bound_port(struct MHD_Daemon *d)
{
    const union MHD_DaemonInfo *di = MHD_get_daemon_info(d, MHD_DAEMON_INFO_LISTEN_FD);
    struct sockaddr_storage ss;
    socklen_t len = sizeof ss;
    if (!di || getsockname(di->listen_fd, (struct sockaddr *)&ss, &len) != 0)
        return 0;
    if (ss.ss_family == AF_INET6)
        return ntohs(((struct sockaddr_in6 *)&ss)->sin6_port);
    return ntohs(((struct sockaddr_in *)&ss)->sin_port);
}

/* package.path / package.cpath of the calling state, for the workers. */
static char *package_field(lua_State *L, const char *field)
{
    lua_getglobal(L, "package");
    lua_getfield(L, -1, field);
    const char *v = lua_tostring(L, -1);
    char *copy = xstrdup_len(v ? v : "", v ? strlen(v) : 0);
    lua_pop(L, 2);
    return copy;
}

/***
 * http.serve{listen="127.0.0.1:5000", handler="module", init="arg", threads=n, body_limit=bytes,
 *            connection_timeout=seconds}
 * Start serving. `handler` is required in every worker state and must return a table with
 * handle(req) -> status, headers, body (and optionally init(arg), called once per state).
 * req = {method, uri (raw, undecoded), headers (lowercase names), body, id, remote}.
 * @return server | nil, err
 */
static int l_http_serve(lua_State *L)
{
    static const char *const keys[] = {"listen", "handler", "init", "threads", "body_limit",
                                       "connection_timeout", NULL};
    forge_checkkeys(L, 1, "http.serve", keys);
    const char *listen = forge_optstrfield(L, 1, "listen", "127.0.0.1:5000");
    const char *handler = forge_optstrfield(L, 1, "handler", NULL);
    if (!handler)
        return luaL_error(L, "http.serve: 'handler' (a module name) is required");
    size_t init_len = 0;
    lua_getfield(L, 1, "init");
    const char *init = lua_isnil(L, -1) ? "" : luaL_checklstring(L, -1, &init_len);
    lua_Integer threads = forge_optintfield(L, 1, "threads", 0);
    lua_Integer body_limit = forge_optintfield(L, 1, "body_limit", DEFAULT_BODY_LIMIT);
    lua_Integer conn_timeout = forge_optintfield(L, 1, "connection_timeout", 60);
    if (threads <= 0)
        threads = 2 * sysconf(_SC_NPROCESSORS_ONLN);
    if (threads > 256 || body_limit <= 0 || conn_timeout < 0)
        return luaL_error(L, "http.serve: threads must be 1..256, body_limit > 0, connection_timeout >= 0");

    struct sockaddr_storage addr;
    socklen_t alen;
    if (parse_listen(listen, &addr, &alen) != 0)
        return luaL_error(L, "http.serve: listen must be 'ipv4:port' or '[ipv6]:port', got '%s'", listen);

    struct server *s = lua_newuserdatauv(L, sizeof *s, 0);
    memset(s, 0, sizeof *s);
    pthread_mutex_init(&s->lock, NULL);
    s->stopped = 1;                        /* until the daemon runs, __gc only frees config */
    luaL_setmetatable(L, SERVER_MT);
    s->body_limit = (size_t)body_limit;
    s->handler = xstrdup_len(handler, strlen(handler));
    s->init_arg = xstrdup_len(init, init_len);
    s->init_len = init_len;
    s->path = package_field(L, "path");
    s->cpath = package_field(L, "cpath");
    if (!s->handler || !s->init_arg || !s->path || !s->cpath) {
        server_free_config(s);
        return luaL_error(L, "http.serve: out of memory");
    }
    unsigned long long r = (unsigned long long)time(NULL) ^ ((unsigned long long)getpid() << 16) ^
                           (unsigned long long)(uintptr_t)s;
    snprintf(s->id_prefix, sizeof s->id_prefix, "%08llx", (r * 0x9E3779B97F4A7C15ULL) >> 32);

    unsigned flags = MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_ITC | MHD_USE_POLL;
    if (addr.ss_family == AF_INET6)
        flags |= MHD_USE_IPv6;
    s->daemon = MHD_start_daemon(flags, 0, NULL, NULL, on_request, s,
        MHD_OPTION_SOCK_ADDR, (struct sockaddr *)&addr,
        MHD_OPTION_THREAD_POOL_SIZE, (unsigned)threads,
        MHD_OPTION_URI_LOG_CALLBACK, on_uri, s,
        MHD_OPTION_NOTIFY_COMPLETED, on_completed, s,
        MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)conn_timeout,
        MHD_OPTION_LISTEN_BACKLOG_SIZE, 1024u,
        MHD_OPTION_END);
    if (!s->daemon) {
        int e = errno;
        server_free_config(s);
        return forge_pusherror(L, "http.listen", 1, "cannot listen on %s: %s", listen,
                               e ? strerror(e) : "libmicrohttpd refused to start");
    }
    s->stopped = 0;
    s->port = bound_port(s->daemon);
    return 1;
}

/***
 * server:port() -> the bound TCP port (useful with port 0).
 */
static int l_server_port(lua_State *L)
{
    lua_pushinteger(L, toserver(L)->port);
    return 1;
}

/***
 * server:active() -> number of requests in flight.
 */
static int l_server_active(lua_State *L)
{
    lua_pushinteger(L, (lua_Integer)atomic_load(&toserver(L)->active));
    return 1;
}

/***
 * server:stop([grace_seconds=30]) -> true. Stops accepting, lets in-flight requests finish
 * (up to grace), then stops the threads and closes every worker state.
 */
static int l_server_stop(lua_State *L)
{
    struct server *s = toserver(L);
    double grace = luaL_optnumber(L, 2, 30);
    server_stop(s, grace);
    lua_pushboolean(L, 1);
    return 1;
}

static int l_server_gc(lua_State *L)
{
    struct server *s = toserver(L);
    if (!s->stopped)
        server_stop(s, 0);
    else
        server_free_config(s);
    return 0;
}

static void on_signal(int sig)
{
    if (sig == SIGHUP)
        reload_requested = 1;
    else
        stop_requested = 1;
}

/***
 * http.trap_signals() -> true. SIGTERM/SIGINT request a stop and SIGHUP a reload, as flags
 * read by http.wait(); SIGPIPE is ignored.
 */
static int l_http_trap_signals(lua_State *L)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGHUP, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);
    lua_pushboolean(L, 1);
    return 1;
}

/***
 * http.wait(timeout_seconds) -> "stop" | "reload" | nil (timeout). Sleeps in short steps,
 * returning as soon as a trapped signal arrives.
 */
static int l_http_wait(lua_State *L)
{
    double deadline = monotonic_now() + luaL_checknumber(L, 1);
    for (;;) {
        if (stop_requested) {
            lua_pushliteral(L, "stop");
            return 1;
        }
        if (reload_requested) {
            reload_requested = 0;
            lua_pushliteral(L, "reload");
            return 1;
        }
        double left = deadline - monotonic_now();
        if (left <= 0)
            return 0;
        double step = left < 0.02 ? left : 0.02;
        struct timespec ts = {0, (long)(step * 1e9)};
        nanosleep(&ts, NULL);
    }
}

int luaopen_forge_http(lua_State *L)
{
    static const luaL_Reg lib[] = {
        {"serve", l_http_serve},
        {"trap_signals", l_http_trap_signals},
        {"wait", l_http_wait},
        {NULL, NULL},
    };
    static const luaL_Reg methods[] = {
        {"port", l_server_port},
        {"active", l_server_active},
        {"stop", l_server_stop},
        {NULL, NULL},
    };
    static const luaL_Reg metamethods[] = {
        {"__gc", l_server_gc},
        {"__close", l_server_gc},
        {NULL, NULL},
    };
    forge_newclass(L, SERVER_MT, methods, metamethods);
    luaL_newlib(L, lib);
    forge_setmodinfo(L, "forge.http");
    return 1;
}
