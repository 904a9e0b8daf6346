/*
 * forge.http — the broker's HTTP server on libmicrohttpd.
 *
 * libmicrohttpd runs a pool of threads (internal polling, one listen socket). Each pool
 * thread owns one lua_State, created on its first request: it requires the handler module
 * named in http.serve{} and calls `handle(req)` for every request that thread serves. There
 * is no interpreter lock on the request path; states share nothing but the store on disk.
 *
 * Connection life:
 *   NOTIFY_STARTED        tracks the connection (its fd and a deadline for its headers)
 *   NOTIFY_CLOSED         forgets it
 * Request life (see DESIGN.md "Known traps"):
 *   uri_log callback      allocates the request context (raw URI, request id), counts it active
 *   1st access call       headers only: refuse at once (queued now, so libmicrohttpd reads no
 *                         body and closes) a control byte in the target (400), wrong
 *                         credentials (401), a missing API version (412), an oversized
 *                         Content-Length (413) or a body the buffer budget cannot hold (503);
 *                         else the body deadline starts
 *   next calls            body chunks, kept up to the body limit and the budget
 *   last call (size 0)    dispatch to Lua and queue the answer — only now, so keep-alive holds;
 *                         or, when the handler answers with a wait, park the request (see "Waits")
 *   call after a resume   queue the answer the waiter left (none: the client left, close)
 *   completed callback    frees the context; the connection's next headers get a deadline
 *
 * Abuse limits: a cap on connections in all (below the open-file limit, which http.serve
 * raises to its hard value) and per client address; deadlines for the headers and the body
 * that hold however slowly the bytes trickle (see "Deadlines"); the bytes of request bodies
 * held across all connections (max_buffered_bytes).
 *
 * HTTPS (http.serve{tls}): GnuTLS through libmicrohttpd, the certificate handed out per
 * handshake from a reference-counted set that srv:reload_tls swaps; client certificates are
 * checked with the other checks before the body (see "TLS").
 *
 * Replayed answers: a GET the handler answered with a ":replay" mark is answered again from C,
 * without Lua, while the service generation it was made for holds (see "replayed answers").
 *
 * Stopping: srv:stop(grace) quiesces the listen socket, has the waiter answer every parked
 * request, waits for in-flight requests to finish (bounded by grace), stops the waiter (which
 * resumes whatever is still parked: libmicrohttpd must not stop with suspended connections),
 * the daemon and the sweeper, and closes every worker state.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <microhttpd.h>
#include <lualib.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>

#include "forge/forge.h"
#include "forge/metrics.h"
#include "ltls.h"

#define SERVER_MT "forge.http.server"
#define RELOAD_COUNTER_MT "forge.reload.counter"   /* runtime/reload.c */
#define DEFAULT_BODY_LIMIT (1024 * 1024)
#define DEFAULT_HEADER_TIMEOUT 5.0          /* seconds for a request's headers */
#define DEFAULT_REQUEST_TIMEOUT 30.0        /* seconds for its body, once the headers are in */
#define DEFAULT_MAX_CONNECTIONS 4000        /* and never more than the open-file limit - FD_RESERVE */
#define DEFAULT_MAX_PER_IP 256
#define DEFAULT_MAX_BUFFERED (64 * 1024 * 1024)
#define FD_RESERVE 64                       /* descriptors left for the store, logs, children */
#define SWEEP_INTERVAL_NS (100 * 1000 * 1000)
#define WAIT_INTERVAL_NS (50 * 1000 * 1000)  /* between two looks at every parked request */
#define RETRY_AFTER "2"                     /* seconds, on a 503 for the buffer budget */
#define REPLAY_SLOTS 16                     /* replayable answers kept (see "replayed answers") */
#define CRED_NONE (-1)                      /* a request's credentials: none configured, */
#define CRED_PUBLIC (-2)                    /* a public path, */
#define CRED_CERT (-3)                      /* a client certificate stood in; >= 0: token index */

/* Present in the forge binary (generated preload table); absent when loaded as a .so. */
extern void forge_preload(lua_State *L) __attribute__((weak));

struct worker {
    lua_State *L;
    int handle_ref;             /* registry ref of handler.handle, LUA_NOREF until loaded */
    int poll_ref;               /* handler.poll; LUA_NOREF when the module has none */
    struct server *srv;
    struct worker *next;
};

/* One TCP connection, from NOTIFY_STARTED to NOTIFY_CLOSED (its MHD socket context). */
struct conn {
    MHD_socket fd;
    double deadline;            /* monotonic s by which what it awaits must be in; 0: none */
    struct conn *prev, *next;   /* in server.conns; all three under server.conns_lock */
    /* TLS, all owned by the connection's pool thread: */
    struct forge_tls_slot *tls; /* the server's credentials; NULL: plain HTTP */
    struct forge_tls_creds *creds; /* the set its handshake used, held until it closes */
    int peer;                   /* enum forge_tls_peer once checked (first request); -1 before */
    char *peer_dn;              /* a verified client certificate's subject */
};

/* What a client certificate (TLS with client_ca) does: see l_http_serve's tls. */
enum client_auth { CLIENT_AUTH_REQUIRE, CLIENT_AUTH_OPTIONAL, CLIENT_AUTH_CERT };

struct strlist {
    char **v;
    size_t n;
};

/* Checks made in C once the headers are in, before any body is read (http.serve{auth, version}). */
struct precheck {
    struct strlist tokens;      /* base64("user:password") accepted after "Basic "; none: no auth */
    struct strlist open_paths;  /* served without credentials */
    char *challenge;            /* WWW-Authenticate value: Basic realm="..." */
    char *version_header;       /* NULL: no version check */
    char version_major[24];
    struct strlist version_under;
    int client_certs;           /* TLS with a client_ca: certificates are asked for and checked */
    enum client_auth client_auth;
};

struct answer;

struct server {
    struct MHD_Daemon *daemon;
    size_t body_limit, max_buffered;
    double header_timeout, request_timeout;
    char *handler;              /* module name required in every worker state */
    char *init_arg;             /* string passed to handler.init() */
    size_t init_len;
    char *path, *cpath;         /* package.path / package.cpath for worker states */
    struct precheck pre;
    int tls;                    /* HTTPS: tls_slot holds the credentials */
    struct forge_tls_slot tls_slot;
    char *client_ca;            /* PEM given at start (libmicrohttpd names its CAs to clients) */
    unsigned short port;
    char id_prefix[9];
    atomic_long active;         /* requests between uri_log and completed */
    atomic_ullong seq;
    atomic_size_t buffered;     /* body bytes reserved by the requests in flight */
    pthread_mutex_t lock;       /* guards workers */
    struct worker *workers;
    pthread_mutex_t conns_lock; /* guards conns, every conn's links and deadline, sweeping */
    pthread_cond_t sweep_wake;
    struct conn *conns;
    pthread_t sweeper;
    int sweeping;               /* the sweeper runs; cleared to stop it */
    pthread_mutex_t waits_lock; /* guards waits, every parked request's wait_next, the two flags */
    pthread_cond_t waits_wake;
    struct request *waits;      /* parked requests, owned by the waiter between its passes */
    pthread_t waiter;
    int waiting;                /* the waiter runs and takes new waits; cleared to stop it */
    int waits_ending;           /* stopping: every wait is answered at the waiter's next pass */
    int stopped;
    const atomic_llong *generation; /* http.serve{generation}; NULL: no answer is replayed */
    pthread_mutex_t answers_lock;   /* guards answers */
    struct answer *answers[REPLAY_SLOTS]; /* see "replayed answers" */
};

struct request {
    char *uri;
    struct conn *conn;
    char *body;
    size_t len, cap;
    size_t reserved;            /* bytes of the buffer budget held (>= cap) */
    int started, too_large, over_budget;
    int parked;                 /* suspended for the waiter, until the access call after its resume */
    struct MHD_Connection *con; /* of a parked request, to resume it */
    char *wait;                 /* the handler's wait token, handed to poll */
    size_t wait_len;
    double wait_deadline;       /* monotonic s by which the wait ends */
    struct MHD_Response *answer; /* left by the waiter before the resume; NULL: close */
    unsigned answer_status;
    struct request *wait_next;  /* in server.waits */
    double arrived;             /* monotonic s at its uri_log call */
    int cred;                   /* which credentials it came with: a token's index or CRED_* */
    char id[32];
};

static _Thread_local struct worker *tls_worker;
static volatile sig_atomic_t stop_requested, reload_requested;
static atomic_int kicked;                   /* http.kick() since the last http.wait that saw it */
static int wake_pipe[2] = {-1, -1};         /* a byte wakes http.wait: a signal or a kick came */
static pthread_once_t wake_once = PTHREAD_ONCE_INIT;


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

static void strlist_free(struct strlist *l)
{
    for (size_t i = 0; i < l->n; i++)
        free(l->v[i]);
    free(l->v);
    l->v = NULL;
    l->n = 0;
}

/* Append a copy of str[0..n) to l. May raise (out of memory); the server's __gc frees l. */
static void strlist_push(lua_State *L, struct strlist *l, const char *str, size_t n)
{
    char **v = realloc(l->v, (l->n + 1) * sizeof *v);
    if (!v)
        luaL_error(L, "http.serve: out of memory");
    l->v = v;
    v[l->n] = xstrdup_len(str, n);
    if (!v[l->n])
        luaL_error(L, "http.serve: out of memory");
    l->n++;
}

/* Queue resp and drop our reference to it; MHD_NO for a NULL resp (out of memory). */
static enum MHD_Result queue_owned(struct MHD_Connection *con, unsigned status, struct MHD_Response *resp)
{
    if (!resp)
        return MHD_NO;
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
static struct MHD_Response *error_response(const char *error, const char *description, const char *request_id)
{
    char buf[512];
    int n = snprintf(buf, sizeof buf, "{\"error\":\"%s\",\"description\":\"%s\"}", error, description);
    struct MHD_Response *resp = MHD_create_response_from_buffer((size_t)n, buf, MHD_RESPMEM_MUST_COPY);
    if (resp) {
        MHD_add_response_header(resp, "Content-Type", "application/json");
        MHD_add_response_header(resp, "X-Request-Id", request_id);
    }
    return resp;
}

/* A request refused before any handler ran, in forge_http_refused_total{status} (not 500s). */
static void count_refused(unsigned status)
{
    if (status == 500)
        return;
    char code[8];
    snprintf(code, sizeof code, "%u", status);
    struct forge_label label = {"status", code};
    forge_metrics_inc("forge_http_refused_total", &label, 1, 1);
}

static enum MHD_Result queue_error(struct MHD_Connection *con, unsigned status, const char *error,
                                   const char *description, const char *request_id)
{
    count_refused(status);
    return queue_owned(con, status, error_response(error, description, request_id));
}

/* queue_error with one more header (WWW-Authenticate, Retry-After). */
static enum MHD_Result queue_error_with(struct MHD_Connection *con, unsigned status, const char *error,
                                        const char *description, const char *request_id,
                                        const char *name, const char *value)
{
    struct MHD_Response *resp = error_response(error, description, request_id);
    if (resp)
        MHD_add_response_header(resp, name, value);
    count_refused(status);
    return queue_owned(con, status, resp);
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
 * Load the handler module into the worker state: require(handler), call init(arg), keep refs
 * to handle and to poll (if any). On failure leaves an error message on the stack and returns 0.
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
    w->handle_ref = luaL_ref(L, LUA_REGISTRYINDEX);       /* [msgh, module] */
    if (lua_getfield(L, -1, "poll") == LUA_TFUNCTION)     /* [msgh, module, poll] */
        w->poll_ref = luaL_ref(L, LUA_REGISTRYINDEX);
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
    w->handle_ref = w->poll_ref = LUA_NOREF;
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

/* The calling thread's worker (a pool thread's or the waiter's), handler loaded; NULL and *err on failure. */
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
    lua_createtable(L, 0, 8);
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
    if (r->conn->peer_dn) {
        lua_pushstring(L, r->conn->peer_dn);
        lua_setfield(L, -2, "client_cert");
    }
    lua_newtable(L);
    MHD_get_connection_values(con, MHD_HEADER_KIND, add_header, L);
    lua_setfield(L, -2, "headers");
}

/*
 * The handler's results as a response: a 500 when the status is not valid; NULL when out of memory.
 * Stack: [msgh, status, headers, body] (as returned by handle or poll)
 */
static struct MHD_Response *lua_response(lua_State *L, const struct request *r, unsigned *status)
{
    int isnum;
    lua_Integer code = lua_tointegerx(L, 2, &isnum);
    if (!isnum || code < 100 || code > 599) {
        *status = 500;
        return error_response("InternalError", "handler returned no valid status", r->id);
    }
    *status = (unsigned)code;
    size_t len = 0;
    const char *body = lua_tolstring(L, 4, &len);
    struct MHD_Response *resp =
        MHD_create_response_from_buffer(body ? len : 0, (void *)(body ? body : ""), MHD_RESPMEM_MUST_COPY);
    if (!resp)
        return NULL;
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
    return resp;
}


/* ---- waits ------------------------------------------------------------------------ */

/*
 * A handler that must wait for something (forge.app: a sync operation the reconciler carries
 * out) answers with a wait, {wait = token, timeout = seconds}, instead of blocking its pool
 * thread. The request is then parked: its connection suspended (libmicrohttpd polls it no
 * more, and its idle timeout stops) and the request put on the wait list. The waiter thread
 * has a state of its own, loaded like the pool threads' ones; every WAIT_INTERVAL_NS it calls
 * poll(token, why) for each parked request: nil while the wait goes on, else status, headers,
 * body. `why` is nil, or "timeout" once the timeout has passed, or "stop" once the server
 * stops: then poll must answer (one that still does not gets 504). The waiter leaves the answer
 * in the request and resumes the connection; its pool thread calls the access handler again,
 * which queues the answer: after the whole request, as a normal answer, so keep-alive holds.
 * A suspended connection's disconnect goes unseen by libmicrohttpd, so the waiter peeks at
 * each socket: a client that left is resumed without an answer, the access handler refuses,
 * and libmicrohttpd closes the connection (completed callback, then NOTIFY_CLOSED).
 * The sweeper leaves parked connections alone: their deadline is 0 from the end of the body
 * to the completed callback.
 * Only the waiter takes requests off the list: it takes the whole list for a pass (calling
 * Lua without the lock) and puts back what still waits. A request is off the list before its
 * resume, after which its pool thread may free it at any time.
 */

/* CLOCK_MONOTONIC now + ns (< 1 s), for pthread_cond_timedwait on the server's conditions. */
static struct timespec monotonic_after(long ns)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    t.tv_nsec += ns;
    if (t.tv_nsec >= 1000000000L) {
        t.tv_sec++;
        t.tv_nsec -= 1000000000L;
    }
    return t;
}

/*
 * Park request r with wait token[0..len) for at most timeout seconds: suspend its connection
 * and put it on the wait list. 1 when parked, 0 when the waiter takes no more waits (the
 * server is stopping), -1 when out of memory. Called from the access handler, as
 * MHD_suspend_connection must be.
 */
static int park(struct server *s, struct MHD_Connection *con, struct request *r, const char *token, size_t len,
                double timeout)
{
    r->wait = xstrdup_len(token, len);
    if (!r->wait)
        return -1;
    r->wait_len = len;
    r->wait_deadline = monotonic_now() + timeout;
    r->con = con;
    pthread_mutex_lock(&s->waits_lock);
    int ok = s->waiting;
    if (ok) {
        MHD_suspend_connection(con);                      /* before the waiter can see it */
        r->parked = 1;
        if (!s->waits)
            pthread_cond_signal(&s->waits_wake);          /* it sleeps while nothing waits */
        r->wait_next = s->waits;
        s->waits = r;
    }
    pthread_mutex_unlock(&s->waits_lock);
    return ok;
}

/*
 * The handler answered with a wait: park the request.
 * Stack: [msgh, wait, headers, body] (as returned by handle)
 */
static enum MHD_Result wait_lua_response(struct server *s, struct worker *w, struct MHD_Connection *con,
                                         struct request *r)
{
    lua_State *L = w->L;
    size_t len = 0;
    int isnum;
    lua_getfield(L, 2, "wait");                           /* [..., token] */
    lua_getfield(L, 2, "timeout");                        /* [..., token, timeout] */
    const char *token = lua_type(L, -2) == LUA_TSTRING ? lua_tolstring(L, -2, &len) : NULL;
    lua_Number timeout = lua_tonumberx(L, -1, &isnum);
    if (!token || !isnum || !(timeout >= 0) || w->poll_ref == LUA_NOREF) {
        log_error("request handler returned an invalid wait", r->id,
                  w->poll_ref == LUA_NOREF ? "the handler module has no poll function"
                                           : "a wait is {wait = string, timeout = seconds >= 0}");
        return queue_error(con, 500, "InternalError", "the broker failed on this request; see the broker log", r->id);
    }
    int parked = park(s, con, r, token, len, timeout);
    if (parked > 0)
        return MHD_YES;
    if (parked == 0)
        return queue_error(con, 503, "ServiceUnavailable", "the server is stopping", r->id);
    return MHD_NO;
}

/*
 * Whether the client of parked request r closed its side or the connection failed. A TLS
 * client sends close_notify before its FIN: there are bytes to peek at, and the FIN behind
 * them shows as POLLRDHUP.
 */
static int client_gone(const struct request *r)
{
    char c;
    ssize_t n = recv(r->conn->fd, &c, 1, MSG_PEEK | MSG_DONTWAIT);
    if (n == 0 || (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR))
        return 1;
    struct pollfd pf = {.fd = r->conn->fd, .events = POLLRDHUP};
    return n > 0 && r->conn->tls && poll(&pf, 1, 0) == 1 && (pf.revents & (POLLRDHUP | POLLHUP | POLLERR));
}

/*
 * Ask poll about parked request r: 0 while the wait goes on (only when `why` is NULL), else 1
 * with its answer in *status and *answer (NULL when out of memory).
 * Stack: [] -> []
 */
static int poll_wait(struct worker *w, const struct request *r, const char *why, unsigned *status,
                     struct MHD_Response **answer)
{
    lua_State *L = w->L;
    lua_settop(L, 0);
    lua_pushcfunction(L, traceback_handler);              /* [msgh] */
    lua_rawgeti(L, LUA_REGISTRYINDEX, w->poll_ref);       /* [msgh, poll] */
    lua_pushlstring(L, r->wait, r->wait_len);             /* [msgh, poll, token] */
    if (why)
        lua_pushstring(L, why);
    else
        lua_pushnil(L);                                   /* [msgh, poll, token, why] */
    int answered = 1;
    if (lua_pcall(L, 2, 3, 1) != LUA_OK) {                /* [msgh, err] */
        log_error("wait poll raised", r->id, lua_tostring(L, -1));
        *status = 500;
        *answer = error_response("InternalError", "the broker failed on this request; see the broker log", r->id);
    } else if (!lua_isnil(L, 2)) {                        /* [msgh, status, headers, body] */
        *answer = lua_response(L, r, status);
    } else if (why) {                                     /* [msgh, nil, nil, nil] */
        *status = 504;
        *answer = error_response("Timeout", "the wait ended without an answer", r->id);
    } else {
        answered = 0;
    }
    lua_settop(L, 0);
    return answered;
}

/* Leave parked request r its answer (NULL: none, close) and resume it; r may be freed from then on. */
static void unpark(struct request *r, unsigned status, struct MHD_Response *answer)
{
    r->answer_status = status;
    r->answer = answer;
    MHD_resume_connection(r->con);
}

/*
 * One look at each request of `list`: resume the ones answered or whose client left (all of
 * them when `ending`); returns the others, still parked.
 */
static struct request *waits_pass(struct server *s, struct request *list, int ending)
{
    char err[1024];
    if (!list)
        return NULL;                                      /* the waiter's state loads with the first wait */
    struct worker *w = worker_get(s, err, sizeof err);
    double now = monotonic_now();
    struct request *rest = NULL;
    while (list) {
        struct request *r = list;
        list = r->wait_next;
        const char *why = ending ? "stop" : now >= r->wait_deadline ? "timeout" : NULL;
        unsigned status = 0;
        struct MHD_Response *answer = NULL;
        if (client_gone(r)) {
            /* nobody to answer: the connection closes */
        } else if (!w) {
            log_error("broker handler failed to load", r->id, err);
            status = 503;
            answer = error_response("ServiceUnavailable", "broker is not ready; see the broker log", r->id);
        } else if (!poll_wait(w, r, why, &status, &answer)) {
            r->wait_next = rest;                          /* waits on */
            rest = r;
            continue;
        }
        unpark(r, status, answer);
    }
    return rest;
}

static void *waiter(void *arg)
{
    struct server *s = arg;
    pthread_mutex_lock(&s->waits_lock);
    while (s->waiting) {
        struct request *list = s->waits;
        int ending = s->waits_ending;
        s->waits = NULL;
        pthread_mutex_unlock(&s->waits_lock);
        struct request *rest = waits_pass(s, list, ending);
        pthread_mutex_lock(&s->waits_lock);
        while (rest) {                                    /* back with the ones parked meanwhile */
            struct request *r = rest;
            rest = r->wait_next;
            r->wait_next = s->waits;
            s->waits = r;
        }
        if (!s->waits && !s->waits_ending && s->waiting) {
            pthread_cond_wait(&s->waits_wake, &s->waits_lock);
            continue;
        }
        struct timespec until = monotonic_after(WAIT_INTERVAL_NS);
        pthread_cond_timedwait(&s->waits_wake, &s->waits_lock, &until);
    }
    struct request *left = s->waits;                      /* no more parking: answer the rest */
    s->waits = NULL;
    pthread_mutex_unlock(&s->waits_lock);
    waits_pass(s, left, 1);
    return NULL;
}

/* Have every wait answered at the waiter's next pass, and every new one at the pass after it. */
static void waits_end(struct server *s)
{
    pthread_mutex_lock(&s->waits_lock);
    s->waits_ending = 1;
    pthread_cond_signal(&s->waits_wake);
    pthread_mutex_unlock(&s->waits_lock);
}

/* Stop the waiter once it has resumed every parked request; later waits are refused (503). */
static void waiter_stop(struct server *s)
{
    pthread_mutex_lock(&s->waits_lock);
    s->waiting = 0;
    pthread_cond_signal(&s->waits_wake);
    pthread_mutex_unlock(&s->waits_lock);
    pthread_join(s->waiter, NULL);
}

/* ---- replayed answers ------------------------------------------------------------- */

/*
 * An answer the handler marks replayable is kept here and served again to later requests
 * that ask for the same, without entering Lua: the broker's catalog, asked for by every
 * platform, costs what libmicrohttpd costs. The handler marks it with a ":replay" header,
 * {generation = n, route = "/v2/catalog", vary = "X-Broker-API-Version", unless = {...}}; only
 * a 200 to a GET without a body is kept, and only with http.serve{generation = counter}, a
 * forge.reload generation counter. "The same" is: the same method and raw target, the same
 * value (or absence) of the vary header, credentials of the same kind as the request the
 * answer was made for (the same accepted user, or a client certificate standing in, or a
 * public path), and none of the `unless` headers (which change an answer, such as
 * If-None-Match; a request that carries one goes to the handler, and its answer is not kept).
 * An answer is served while the counter stays at the generation it was made for: a worker
 * still on an older one may keep its answer, but it never matches. Replayed answers get the
 * kept headers and their own X-Request-Id, and count in forge_http_requests_total and
 * forge_http_request_duration_seconds under the route the handler named. At most
 * REPLAY_SLOTS answers are kept (a new one replaces one of an older generation, else is not
 * kept). Each is immutable and reference-counted: a response still being sent holds it.
 */
struct answer {
    atomic_int refs;
    long long generation;
    char *uri;
    int cred;
    char *vary, *vary_value;       /* NULL: no vary header / the request had none */
    struct strlist unless;
    struct strlist headers;        /* name, value, name, value... */
    char *route;
    char *body;
    size_t len;
};

static void answer_release(void *cls)
{
    struct answer *a = cls;
    if (atomic_fetch_sub(&a->refs, 1) != 1)
        return;
    free(a->uri);
    free(a->vary);
    free(a->vary_value);
    strlist_free(&a->unless);
    strlist_free(&a->headers);
    free(a->route);
    free(a->body);
    free(a);
}

/* Whether request r on con asks what answer a answers (its method and body checked by the caller). */
static int asks_same(const struct answer *a, struct MHD_Connection *con, const struct request *r)
{
    if (a->cred != r->cred || strcmp(a->uri, r->uri) != 0)
        return 0;
    for (size_t i = 0; i < a->unless.n; i++)
        if (MHD_lookup_connection_value(con, MHD_HEADER_KIND, a->unless.v[i]))
            return 0;
    if (!a->vary)
        return 1;
    const char *v = MHD_lookup_connection_value(con, MHD_HEADER_KIND, a->vary);
    return v ? a->vary_value && strcmp(v, a->vary_value) == 0 : !a->vary_value;
}

/* The kept answer for this request, with a reference the caller owns; NULL: ask the handler. */
static struct answer *answer_find(struct server *s, struct MHD_Connection *con, const char *method,
                                  const struct request *r)
{
    if (!s->generation || r->len || strcmp(method, MHD_HTTP_METHOD_GET) != 0)
        return NULL;
    long long gen = atomic_load(s->generation);
    struct answer *hit = NULL;
    pthread_mutex_lock(&s->answers_lock);
    for (size_t i = 0; i < REPLAY_SLOTS && !hit; i++) {
        struct answer *a = s->answers[i];
        if (a && a->generation == gen && asks_same(a, con, r)) {
            atomic_fetch_add(&a->refs, 1);
            hit = a;
        }
    }
    pthread_mutex_unlock(&s->answers_lock);
    return hit;
}

/* Queue kept answer a (its reference passes to the response) and count it as the handler would. */
static enum MHD_Result answer_queue(struct MHD_Connection *con, const struct request *r, struct answer *a)
{
    struct MHD_Response *resp =
        MHD_create_response_from_buffer_with_free_callback_cls(a->len, a->body, answer_release, a);
    if (!resp) {
        answer_release(a);
        return MHD_NO;
    }
    for (size_t i = 0; i + 1 < a->headers.n; i += 2)
        MHD_add_response_header(resp, a->headers.v[i], a->headers.v[i + 1]);
    MHD_add_response_header(resp, "X-Request-Id", r->id);
    struct forge_label labels[] = {{"route", a->route}, {"method", MHD_HTTP_METHOD_GET}, {"status", "200"}};
    forge_metrics_inc("forge_http_requests_total", labels, 3, 1);
    forge_metrics_observe("forge_http_request_duration_seconds", labels, 1, monotonic_now() - r->arrived);
    return queue_owned(con, MHD_HTTP_OK, resp);
}

/* Put a in a free slot, in its own key's, or in one of an older generation; 0: no room. */
static int answer_keep(struct server *s, struct answer *a)
{
    int slot = -1;
    pthread_mutex_lock(&s->answers_lock);
    long long gen = atomic_load(s->generation);
    for (int i = 0; i < REPLAY_SLOTS; i++) {
        struct answer *o = s->answers[i];
        int same_key = o && o->cred == a->cred && strcmp(o->uri, a->uri) == 0 &&
                       (o->vary_value && a->vary_value ? strcmp(o->vary_value, a->vary_value) == 0
                                                       : o->vary_value == a->vary_value);
        if (!o || same_key || o->generation != gen) {
            slot = i;
            if (o)
                answer_release(o);
            s->answers[i] = NULL;
            if (same_key || !o)
                break;
        }
    }
    if (slot >= 0 && a->generation == gen)
        s->answers[slot] = a;
    else
        slot = -1;
    pthread_mutex_unlock(&s->answers_lock);
    return slot >= 0;
}

/* A string field of the ":replay" table at t, copied; NULL when absent. Raises when not a string. */
static char *replay_string(lua_State *L, int t, const char *key)
{
    const char *v = forge_optstrfield(L, t, key, NULL);
    return v ? xstrdup_len(v, strlen(v)) : NULL;
}

/*
 * Fill answer a from the handler's headers, body and ":replay" table; called protected, as it
 * raises on a malformed table (and when memory runs out).
 * Stack: [a (light userdata), headers, body, replay] -> []
 */
static int replay_build(lua_State *L)
{
    struct answer *a = lua_touserdata(L, 1);              /* [a, headers, body, replay] */
    static const char *const keys[] = {"generation", "route", "vary", "unless", NULL};
    forge_checkkeys(L, 4, "http: a ':replay' header", keys);
    lua_getfield(L, 4, "generation");
    if (!lua_isinteger(L, -1))
        return luaL_error(L, "http: a ':replay' header needs an integer generation");
    a->generation = (long long)lua_tointeger(L, -1);
    a->route = replay_string(L, 4, "route");
    a->vary = replay_string(L, 4, "vary");
    if (lua_getfield(L, 4, "unless") == LUA_TTABLE)       /* [a, headers, body, replay, gen, unless] */
        for (lua_Integer i = 1; lua_rawgeti(L, -1, i) != LUA_TNIL; i++) {
            if (!lua_isstring(L, -1))
                return luaL_error(L, "http: a ':replay' header's unless must list header names");
            strlist_push(L, &a->unless, lua_tostring(L, -1), lua_rawlen(L, -1));
            lua_pop(L, 1);
        }
    lua_settop(L, 3);
    lua_pushnil(L);
    while (lua_next(L, 2)) {                              /* [a, headers, body, key, value] */
        if (lua_type(L, -2) == LUA_TSTRING && lua_type(L, -1) == LUA_TSTRING) {
            strlist_push(L, &a->headers, lua_tostring(L, -2), lua_rawlen(L, -2));
            strlist_push(L, &a->headers, lua_tostring(L, -1), lua_rawlen(L, -1));
        }
        lua_pop(L, 1);
    }
    size_t len;
    const char *body = lua_tolstring(L, 3, &len);
    a->body = xstrdup_len(body ? body : "", body ? len : 0);
    a->len = body ? len : 0;
    if (!a->route || !a->body)
        return luaL_error(L, "http: a ':replay' header needs a route (or memory ran out)");
    return 0;
}

/*
 * Keep the answer the handler just gave request r when it is marked replayable.
 * Stack: [msgh, status, headers, body] (unchanged)
 */
static void keep_replayable(struct server *s, lua_State *L, struct MHD_Connection *con, const char *method,
                            const struct request *r, unsigned status)
{
    if (!s->generation || status != MHD_HTTP_OK || r->len || strcmp(method, MHD_HTTP_METHOD_GET) != 0 ||
        !lua_istable(L, 3) || lua_getfield(L, 3, ":replay") != LUA_TTABLE) {
        lua_settop(L, 4);
        return;
    }
    struct answer *a = calloc(1, sizeof *a);
    if (!a || !(a->uri = xstrdup_len(r->uri, strlen(r->uri)))) {
        free(a);
        lua_settop(L, 4);
        return;
    }
    atomic_init(&a->refs, 1);
    a->cred = r->cred;
    lua_pushcfunction(L, replay_build);                   /* [msgh, status, headers, body, replay, f] */
    lua_pushlightuserdata(L, a);
    lua_pushvalue(L, 3);
    lua_pushvalue(L, 4);
    lua_pushvalue(L, 5);
    int ok = lua_pcall(L, 4, 0, 0) == LUA_OK;
    if (!ok)
        log_error("a replayable answer was not kept", r->id, lua_tostring(L, -1));
    lua_settop(L, 4);
    if (ok && a->vary) {
        const char *v = MHD_lookup_connection_value(con, MHD_HEADER_KIND, a->vary);
        a->vary_value = v ? xstrdup_len(v, strlen(v)) : NULL;
        ok = !v || a->vary_value;
    }
    if (ok)
        for (size_t i = 0; i < a->unless.n && ok; i++)
            ok = !MHD_lookup_connection_value(con, MHD_HEADER_KIND, a->unless.v[i]);
    if (!ok || !answer_keep(s, a))
        answer_release(a);
}

static void answers_free(struct server *s)
{
    for (size_t i = 0; i < REPLAY_SLOTS; i++) {
        if (s->answers[i])
            answer_release(s->answers[i]);
        s->answers[i] = NULL;
    }
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
    enum MHD_Result ret;                                  /* [msgh, status | wait, headers, body] */
    if (lua_istable(L, 2)) {
        ret = wait_lua_response(s, w, con, r);
    } else {
        unsigned status;
        struct MHD_Response *resp = lua_response(L, r, &status);
        if (resp)
            keep_replayable(s, L, con, method, r, status);
        ret = resp ? queue_owned(con, status, resp) : MHD_NO;
    }
    lua_settop(L, 0);
    return ret;
}


/* ---- deadlines -------------------------------------------------------------------- */

/*
 * libmicrohttpd's connection timeout is an idle timeout: every byte received restarts it,
 * so a client trickling one header byte every few seconds keeps its connection (and a slot
 * of the connection limit) for ever, and the access handler is not called before the headers
 * are complete. So the deadlines live here. Every connection, tracked from NOTIFY_STARTED,
 * carries the monotonic time by which what it awaits must be in: its headers (header_timeout
 * from accept, or from the end of its previous request: an idle keep-alive connection has as
 * long to send the next one), then its body (request_timeout from the end of the headers),
 * then nothing while the handler runs and the answer goes out. A sweeper thread checks them
 * every SWEEP_INTERVAL_NS. It leaves libmicrohttpd's connection state to the pool thread
 * polling the connection (MHD_set_connection_option would only change that idle timeout, which
 * the next trickled byte restarts, and from another thread it neither locks the connection nor
 * wakes that thread's poll()): it shuts the late socket down. The owning pool thread's poll()
 * then sees end-of-stream at once and closes the connection as a client disconnect (completed
 * callback, then NOTIFY_CLOSED).
 * The fd cannot be a reused one: the sweeper holds conns_lock across shutdown(), and
 * libmicrohttpd calls NOTIFY_CLOSED, which unlinks the connection under that lock, before it
 * closes the descriptor.
 */

static void conn_set_deadline(struct server *s, struct conn *c, double deadline)
{
    pthread_mutex_lock(&s->conns_lock);
    c->deadline = deadline;
    pthread_mutex_unlock(&s->conns_lock);
}

static void *sweep(void *arg)
{
    struct server *s = arg;
    pthread_mutex_lock(&s->conns_lock);
    while (s->sweeping) {
        double now = monotonic_now();
        for (struct conn *c = s->conns; c; c = c->next) {
            if (c->deadline > 0 && c->deadline <= now) {
                shutdown(c->fd, SHUT_RDWR);
                c->deadline = 0;
            }
        }
        if (!s->conns) {                                  /* nothing to sweep until a client comes */
            pthread_cond_wait(&s->sweep_wake, &s->conns_lock);
            continue;
        }
        struct timespec until = monotonic_after(SWEEP_INTERVAL_NS);
        pthread_cond_timedwait(&s->sweep_wake, &s->conns_lock, &until);
    }
    pthread_mutex_unlock(&s->conns_lock);
    return NULL;
}

static void on_connection(void *cls, struct MHD_Connection *con, void **socket_context,
                          enum MHD_ConnectionNotificationCode toe)
{
    struct server *s = cls;
    struct conn *c = *socket_context;
    if (toe == MHD_CONNECTION_NOTIFY_STARTED) {
        c = calloc(1, sizeof *c);                         /* NULL: on_uri drops the connection */
        *socket_context = c;
        if (!c)
            return;
        c->fd = MHD_get_connection_info(con, MHD_CONNECTION_INFO_CONNECTION_FD)->connect_fd;
        c->tls = s->tls ? &s->tls_slot : NULL;
        c->peer = -1;
        pthread_mutex_lock(&s->conns_lock);
        c->deadline = monotonic_now() + s->header_timeout;
        c->next = s->conns;
        if (s->conns)
            s->conns->prev = c;
        else
            pthread_cond_signal(&s->sweep_wake);          /* the sweeper sleeps while there is none */
        s->conns = c;
        pthread_mutex_unlock(&s->conns_lock);
        return;
    }
    if (!c)
        return;
    pthread_mutex_lock(&s->conns_lock);
    if (c->prev)
        c->prev->next = c->next;
    else
        s->conns = c->next;
    if (c->next)
        c->next->prev = c->prev;
    pthread_mutex_unlock(&s->conns_lock);
    forge_tls_creds_unref(c->creds);
    free(c->peer_dn);
    free(c);
    *socket_context = NULL;
}


/* ---- TLS ---------------------------------------------------------------------------- */

/*
 * HTTPS through libmicrohttpd's GnuTLS. The certificate is not handed to libmicrohttpd: its
 * certificate callback (below) gives each handshake the server's current set, which a reload
 * swaps (srv:reload_tls); the connection keeps a reference to the set it used. A client_ca
 * makes libmicrohttpd ask clients for a certificate; the broker checks it against the set's
 * CA at the connection's first request (forge_tls_verify_peer), so a reloaded CA applies to
 * new connections. libmicrohttpd names the CAs of the client_ca given at start to clients.
 */

/* gnutls_certificate_retrieve_function2; libmicrohttpd's session pointer is the connection. */
static int tls_pick_cert(gnutls_session_t session, const gnutls_datum_t *req_ca_rdn, int nreqs,
                         const gnutls_pk_algorithm_t *pk_algos, int pk_algos_length, gnutls_pcert_st **pcert,
                         unsigned int *pcert_length, gnutls_privkey_t *pkey)
{
    (void)req_ca_rdn;
    (void)nreqs;
    (void)pk_algos;
    (void)pk_algos_length;
    struct MHD_Connection *con = gnutls_session_get_ptr(session);
    const union MHD_ConnectionInfo *ci = con ? MHD_get_connection_info(con, MHD_CONNECTION_INFO_SOCKET_CONTEXT) : NULL;
    struct conn *c = ci ? ci->socket_context : NULL;
    if (!c || !c->tls)
        return -1;                                        /* the handshake fails */
    if (!c->creds)
        c->creds = forge_tls_slot_acquire(c->tls);
    forge_tls_creds_select(c->creds, pcert, pcert_length, pkey);
    return 0;
}

/* The client certificate of connection c, checked once (at its first request). */
static enum forge_tls_peer tls_peer(struct MHD_Connection *con, struct conn *c)
{
    if (c->peer >= 0)
        return (enum forge_tls_peer)c->peer;
    const union MHD_ConnectionInfo *ci = MHD_get_connection_info(con, MHD_CONNECTION_INFO_GNUTLS_SESSION);
    char dn[512];
    enum forge_tls_peer peer = FORGE_TLS_PEER_NONE;
    if (ci && ci->tls_session && c->creds)
        peer = forge_tls_verify_peer(ci->tls_session, c->creds, dn, sizeof dn);
    if (peer == FORGE_TLS_PEER_VERIFIED) {
        c->peer_dn = xstrdup_len(dn, strlen(dn));
        if (!c->peer_dn)
            peer = FORGE_TLS_PEER_REFUSED;                /* out of memory: not let in unnamed */
    }
    c->peer = (int)peer;
    return peer;
}

/*
 * The client certificate rule for a request to a non-public path: refused (403, the reason
 * returned) for a certificate the CA did not sign, and for none when client_auth requires
 * one; NULL: go on. Sets *stands_in when a verified certificate replaces Basic credentials.
 */
static const char *client_cert_refusal(const struct precheck *p, struct MHD_Connection *con, struct conn *c,
                                       int *stands_in)
{
    *stands_in = 0;
    if (!p->client_certs)
        return NULL;
    enum forge_tls_peer peer = tls_peer(con, c);
    if (peer == FORGE_TLS_PEER_REFUSED)
        return "the client certificate is not one the broker's client CA signed for client authentication, "
               "or it has expired";
    if (peer == FORGE_TLS_PEER_NONE && p->client_auth != CLIENT_AUTH_OPTIONAL)
        return "a client certificate signed by the broker's client CA is required";
    *stands_in = peer == FORGE_TLS_PEER_VERIFIED && p->client_auth != CLIENT_AUTH_REQUIRE;
    return NULL;
}


/* ---- checks before the body ------------------------------------------------------- */

/*
 * Whether the request target has a control byte. libmicrohttpd hands the target over as a C
 * string cut at its first NUL, but it parses the request line in place: `url` and `version`
 * point into that line, and an uncut target ends one separator byte before the version.
 */
static int bad_target(const struct request *r, const char *url, const char *version)
{
    size_t n = strlen(r->uri);
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)r->uri[i];
        if (c < 0x20 || c == 0x7f)
            return 1;
    }
    return version[0] && version != url + n + 1;
}

static int hexval(int c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if ((c | 0x20) >= 'a' && (c | 0x20) <= 'f')
        return (c | 0x20) - 'a' + 10;
    return -1;
}

/* The next segment of a path (a run of bytes other than '/' before any '?' or '#'); NULL at the end. */
static const char *next_segment(const char **p, size_t *len)
{
    const char *b = *p;
    while (*b == '/')
        b++;
    if (!*b || *b == '?' || *b == '#')
        return NULL;
    const char *e = b;
    while (*e && *e != '/' && *e != '?' && *e != '#')
        e++;
    *p = e;
    *len = (size_t)(e - b);
    return b;
}

/* Whether raw segment seg, percent-decoded as forge.util.url_decode does, is want[0..wlen). */
static int segment_is(const char *seg, size_t len, const char *want, size_t wlen)
{
    size_t j = 0;
    for (size_t i = 0; i < len; i++, j++) {
        int c = (unsigned char)seg[i];
        if (c == '%') {
            int hi = i + 2 < len ? hexval(seg[i + 1]) : -1, lo = i + 2 < len ? hexval(seg[i + 2]) : -1;
            if (hi < 0 || lo < 0)
                return 0;                                 /* malformed: the handler refuses it */
            c = hi * 16 + lo;
            i += 2;
        }
        if (j >= wlen || (unsigned char)want[j] != c)
            return 0;
    }
    return j == wlen;
}

/*
 * Whether the raw target's path has the segments of `pattern` (a plain path such as
 * "/healthz"), as forge.request.target splits and decodes them: empty segments do not count,
 * escapes are decoded. With `prefix`, further segments may follow.
 */
static int path_matches(const char *target, const char *pattern, int prefix)
{
    const char *seg, *want;
    size_t len, wlen;
    while ((want = next_segment(&pattern, &wlen))) {
        seg = next_segment(&target, &len);
        if (!seg || !segment_is(seg, len, want, wlen))
            return 0;
    }
    return prefix || !next_segment(&target, &len);
}

static int path_in(const char *target, const struct strlist *patterns, int prefix)
{
    for (size_t i = 0; i < patterns->n; i++)
        if (path_matches(target, patterns->v[i], prefix))
            return 1;
    return 0;
}

/*
 * Which accepted Basic credentials the Authorization header carries: 1 + the index of the
 * first matching token, 0 for none. The scheme is case-insensitive (RFC 7617); the credentials
 * are compared with every accepted token, each in time that depends only on the lengths.
 */
static int authorized(const struct precheck *p, struct MHD_Connection *con)
{
    const char *h = MHD_lookup_connection_value(con, MHD_HEADER_KIND, MHD_HTTP_HEADER_AUTHORIZATION);
    if (!h || strncasecmp(h, "basic ", 6) != 0)
        return 0;
    h += 6 + strspn(h + 6, " ");
    size_t n = strlen(h);
    int who = 0;
    for (size_t i = 0; i < p->tokens.n; i++) {
        size_t tn = strlen(p->tokens.v[i]);
        int eq = (CRYPTO_memcmp(h, p->tokens.v[i], n < tn ? n : tn) | (n != tn)) == 0;
        who = who ? who : eq * (int)(i + 1);
    }
    return who;
}

/* Whether the version header is "<major>.<digits>", as forge.broker requires. */
static int version_ok(const struct precheck *p, struct MHD_Connection *con)
{
    const char *v = MHD_lookup_connection_value(con, MHD_HEADER_KIND, p->version_header);
    size_t mn = strlen(p->version_major);
    if (!v || strncmp(v, p->version_major, mn) != 0 || v[mn] != '.' || !v[mn + 1])
        return 0;
    for (v += mn + 1; *v; v++)
        if (*v < '0' || *v > '9')
            return 0;
    return 1;
}

static enum MHD_Result queue_version_error(struct MHD_Connection *con, const struct precheck *p,
                                          const struct request *r)
{
    char description[160];
    snprintf(description, sizeof description, "the %s header is required and must be %s.x", p->version_header,
             p->version_major);
    return queue_error(con, 412, "PreconditionFailed", description, r->id);
}

/* Take n bytes of the buffer budget; 0 when they do not fit. */
static int budget_take(struct server *s, size_t n)
{
    size_t cur = atomic_load(&s->buffered);
    do {
        if (n > s->max_buffered - cur)
            return 0;
    } while (!atomic_compare_exchange_weak(&s->buffered, &cur, cur + n));
    return 1;
}

/*
 * The first access call, headers in. A refusal is queued now: libmicrohttpd then reads no
 * body and closes the connection after the answer. Otherwise the declared body is reserved
 * against the budget. Either way the body deadline starts (it also bounds sending a refusal).
 */
static enum MHD_Result on_headers(struct server *s, struct MHD_Connection *con, const char *url,
                                  const char *version, struct request *r)
{
    const struct precheck *p = &s->pre;
    conn_set_deadline(s, r->conn, monotonic_now() + s->request_timeout);
    if (bad_target(r, url, version))
        return queue_error(con, 400, "BadRequest", "the request target contains a control character", r->id);
    int open = path_in(r->uri, &p->open_paths, 0), stands_in = 0;
    const char *cert_refusal = open ? NULL : client_cert_refusal(p, con, r->conn, &stands_in);
    if (cert_refusal)
        return queue_error(con, 403, "Forbidden", cert_refusal, r->id);
    r->cred = open ? CRED_PUBLIC : stands_in ? CRED_CERT : CRED_NONE;
    if (p->tokens.n && !open && !stands_in && (r->cred = authorized(p, con) - 1) < 0)
        return queue_error_with(con, 401, "Unauthorized", "missing or wrong credentials", r->id,
                                MHD_HTTP_HEADER_WWW_AUTHENTICATE, p->challenge);
    if (p->version_header && !open && path_in(r->uri, &p->version_under, 1) &&
        !version_ok(p, con))
        return queue_version_error(con, p, r);
    const char *cl = MHD_lookup_connection_value(con, MHD_HEADER_KIND, MHD_HTTP_HEADER_CONTENT_LENGTH);
    unsigned long long declared = cl ? strtoull(cl, NULL, 10) : 0;
    if (declared > s->body_limit)
        return queue_error(con, 413, "PayloadTooLarge", "request body exceeds the broker's body limit", r->id);
    if (declared && !budget_take(s, (size_t)declared))
        return queue_error_with(con, 503, "ServiceUnavailable", "the broker is buffering too many request bodies",
                                r->id, MHD_HTTP_HEADER_RETRY_AFTER, RETRY_AFTER);
    r->reserved = (size_t)declared;
    return MHD_YES;
}


/* ---- libmicrohttpd callbacks ------------------------------------------------------ */

static void *on_uri(void *cls, const char *uri, struct MHD_Connection *con)
{
    struct server *s = cls;
    struct conn *c = MHD_get_connection_info(con, MHD_CONNECTION_INFO_SOCKET_CONTEXT)->socket_context;
    struct request *r = c ? calloc(1, sizeof *r) : NULL;
    if (!r)
        return NULL;
    r->conn = c;
    r->uri = xstrdup_len(uri, strlen(uri));
    r->arrived = monotonic_now();
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
    conn_set_deadline(s, r->conn, monotonic_now() + s->header_timeout);
    atomic_fetch_sub(&s->buffered, r->reserved);
    if (r->answer)                                        /* resumed, closed before its access call */
        MHD_destroy_response(r->answer);
    free(r->uri);
    free(r->body);
    free(r->wait);
    free(r);
    *con_cls = NULL;
    atomic_fetch_sub(&s->active, 1);
}

/* The access call after the waiter resumed request r: queue the answer it left; none: close. */
static enum MHD_Result answer_parked(struct MHD_Connection *con, struct request *r)
{
    struct MHD_Response *answer = r->answer;
    r->parked = 0;
    r->answer = NULL;
    return answer ? queue_owned(con, r->answer_status, answer) : MHD_NO;
}

/* Room for `need` body bytes: the reservation if it is enough, else doubling, at most the body limit. */
static size_t body_capacity(const struct server *s, const struct request *r, size_t need)
{
    if (r->reserved >= need)
        return r->reserved;
    size_t cap = r->cap ? r->cap : 4096;
    while (cap < need)
        cap *= 2;
    return cap < s->body_limit ? cap : s->body_limit;
}

/*
 * Append a body chunk, keeping at most the body limit and what the budget allows (a body
 * beyond either is read and dropped, and answered 413 or 503); 0 on allocation failure.
 */
static int body_append(struct server *s, struct request *r, const char *data, size_t n)
{
    if (r->too_large || r->over_budget)
        return 1;
    if (r->len + n > s->body_limit) {
        r->too_large = 1;
        return 1;
    }
    if (r->len + n > r->cap) {
        size_t cap = body_capacity(s, r, r->len + n);
        if (cap > r->reserved) {
            if (!budget_take(s, cap - r->reserved)) {
                r->over_budget = 1;
                return 1;
            }
            r->reserved = cap;
        }
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
    if (!r || !r->uri)
        return MHD_NO;                                    /* out of memory: drop the connection */
    if (r->parked)
        return answer_parked(con, r);
    if (!r->started) {
        r->started = 1;
        return on_headers(s, con, url, version, r);
    }
    if (*upload_data_size) {
        if (!body_append(s, r, upload_data, *upload_data_size))
            return MHD_NO;
        *upload_data_size = 0;
        return MHD_YES;
    }
    conn_set_deadline(s, r->conn, 0);                     /* the body is in */
    if (r->too_large)
        return queue_error(con, 413, "PayloadTooLarge", "request body exceeds the broker's body limit", r->id);
    if (r->over_budget)
        return queue_error_with(con, 503, "ServiceUnavailable", "the broker is buffering too many request bodies",
                                r->id, MHD_HTTP_HEADER_RETRY_AFTER, RETRY_AFTER);
    struct answer *kept = answer_find(s, con, method, r);
    return kept ? answer_queue(con, r, kept) : dispatch(s, con, method, r);
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
    strlist_free(&s->pre.tokens);
    strlist_free(&s->pre.open_paths);
    strlist_free(&s->pre.version_under);
    free(s->pre.challenge);
    free(s->pre.version_header);
    s->pre.challenge = s->pre.version_header = NULL;
    free(s->client_ca);
    s->client_ca = NULL;
    if (s->tls) {
        forge_tls_slot_destroy(&s->tls_slot);
        s->tls = 0;
    }
    answers_free(s);
}

static void sweeper_stop(struct server *s)
{
    pthread_mutex_lock(&s->conns_lock);
    s->sweeping = 0;
    pthread_cond_signal(&s->sweep_wake);
    pthread_mutex_unlock(&s->conns_lock);
    pthread_join(s->sweeper, NULL);
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

/* Quiesce, answer the waits, wait up to `grace` seconds for in-flight requests, stop, close states. */
static void server_stop(struct server *s, double grace)
{
    if (s->stopped)
        return;
    s->stopped = 1;
    if (s->daemon) {
        MHD_socket fd = MHD_quiesce_daemon(s->daemon);
        waits_end(s);
        double deadline = monotonic_now() + grace;
        while (atomic_load(&s->active) > 0 && monotonic_now() < deadline) {
            struct timespec ts = {0, 10 * 1000 * 1000};
            nanosleep(&ts, NULL);
        }
        waiter_stop(s);
        MHD_stop_daemon(s->daemon);
        if (fd != MHD_INVALID_SOCKET)
            close(fd);
        s->daemon = NULL;
    }
    sweeper_stop(s);
    server_close_workers(s);
    server_free_config(s);
    pthread_mutex_destroy(&s->lock);
    pthread_mutex_destroy(&s->conns_lock);
    pthread_cond_destroy(&s->sweep_wake);
    pthread_mutex_destroy(&s->waits_lock);
    pthread_cond_destroy(&s->waits_wake);
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

/* Raise unless s is printable ASCII without '"' and '\\' (it goes into a header or a JSON body). */
static void check_plain(lua_State *L, const char *s, const char *what)
{
    for (const unsigned char *c = (const unsigned char *)s; *c; c++)
        if (*c < 0x20 || *c > 0x7e || *c == '"' || *c == '\\')
            luaL_error(L, "http.serve: %s must be printable ASCII without quotes or backslashes", what);
}

/*
 * The paths listed at field `key` of the table at t ("/..." strings); absent: `def`, if any.
 * Stack: unchanged.
 */
static void read_paths(lua_State *L, int t, const char *key, const char *def, struct strlist *out)
{
    int type = lua_getfield(L, t, key);                   /* [list] */
    if (type == LUA_TNIL && def)
        strlist_push(L, out, def, strlen(def));
    else if (type != LUA_TNIL && type != LUA_TTABLE)
        luaL_error(L, "http.serve: %s must be a list of paths", key);
    lua_Integer n = type == LUA_TTABLE ? (lua_Integer)lua_rawlen(L, -1) : 0;
    for (lua_Integer i = 1; i <= n; i++) {
        lua_rawgeti(L, -1, i);                            /* [list, path] */
        size_t len;
        const char *path = lua_type(L, -1) == LUA_TSTRING ? lua_tolstring(L, -1, &len) : NULL;
        if (!path || path[0] != '/')
            luaL_error(L, "http.serve: %s must be a list of paths ('/...')", key);
        strlist_push(L, out, path, len);
        lua_pop(L, 1);                                    /* [list] */
    }
    lua_pop(L, 1);                                        /* [] */
}

/*
 * Add to tokens the Basic token of the user {username=, password=} at the top of the stack:
 * base64("username:password"). Stack: [user] -> [user]
 */
static void add_user_token(lua_State *L, struct strlist *tokens)
{
    if (!lua_istable(L, -1) || lua_getfield(L, -1, "username") != LUA_TSTRING ||
        lua_getfield(L, -2, "password") != LUA_TSTRING)
        luaL_error(L, "http.serve: auth.users must list {username=string, password=string}");
    lua_pushliteral(L, ":");
    lua_insert(L, -2);                                    /* [user, name, ":", password] */
    lua_concat(L, 3);                                     /* [user, "name:password"] */
    size_t n;
    const unsigned char *raw = (const unsigned char *)lua_tolstring(L, -1, &n);
    if (n > 4096)
        luaL_error(L, "http.serve: auth.users: credentials longer than 4096 bytes");
    unsigned char *b64 = lua_newuserdatauv(L, 4 * ((n + 2) / 3) + 1, 0);   /* [user, raw, b64] */
    int len = EVP_EncodeBlock(b64, raw, (int)n);
    strlist_push(L, tokens, (const char *)b64, (size_t)len);
    lua_pop(L, 2);                                        /* [user] */
}

/*
 * auth = {users = {{username=, password=}, ...}, realm = "forge", public = {"/healthz", ...}}
 * Stack: unchanged.
 */
static void read_auth(lua_State *L, struct precheck *p)
{
    static const char *const keys[] = {"users", "realm", "public", NULL};
    if (lua_getfield(L, 1, "auth") == LUA_TNIL) {         /* [auth] */
        lua_pop(L, 1);
        return;
    }
    int t = lua_gettop(L);
    forge_checkkeys(L, t, "http.serve: auth", keys);
    const char *realm = forge_optstrfield(L, t, "realm", "forge");
    check_plain(L, realm, "auth.realm");
    size_t cap = strlen(realm) + sizeof "Basic realm=\"\"";
    p->challenge = malloc(cap);
    if (!p->challenge)
        luaL_error(L, "http.serve: out of memory");
    snprintf(p->challenge, cap, "Basic realm=\"%s\"", realm);
    if (lua_getfield(L, t, "users") != LUA_TTABLE)       /* [auth, users] */
        luaL_error(L, "http.serve: auth.users must list {username=string, password=string}");
    lua_Integer n = (lua_Integer)lua_rawlen(L, -1);
    for (lua_Integer i = 1; i <= n; i++) {
        lua_rawgeti(L, -1, i);                            /* [auth, users, user] */
        add_user_token(L, &p->tokens);
        lua_pop(L, 1);                                    /* [auth, users] */
    }
    if (!p->tokens.n)
        luaL_error(L, "http.serve: auth.users must list at least one user");
    read_paths(L, t, "public", NULL, &p->open_paths);
    lua_settop(L, t - 1);
}

/*
 * version = {header = "X-Broker-API-Version", major = 2, under = {"/v2"}}: requests under
 * those paths (default: all) need header "<major>.<minor>".
 * Stack: unchanged.
 */
static void read_version(lua_State *L, struct precheck *p)
{
    static const char *const keys[] = {"header", "major", "under", NULL};
    if (lua_getfield(L, 1, "version") == LUA_TNIL) {      /* [version] */
        lua_pop(L, 1);
        return;
    }
    int t = lua_gettop(L);
    forge_checkkeys(L, t, "http.serve: version", keys);
    const char *header = forge_optstrfield(L, t, "header", NULL);
    lua_Integer major = forge_optintfield(L, t, "major", -1);
    if (!header || !header[0] || strlen(header) > 64 || strspn(header, "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
            "abcdefghijklmnopqrstuvwxyz0123456789-") != strlen(header) || major < 0)
        luaL_error(L, "http.serve: version needs header (a header name) and major (an integer >= 0)");
    snprintf(p->version_major, sizeof p->version_major, "%lld", (long long)major);
    p->version_header = xstrdup_len(header, strlen(header));
    if (!p->version_header)
        luaL_error(L, "http.serve: out of memory");
    read_paths(L, t, "under", "/", &p->version_under);
    lua_settop(L, t - 1);
}

/*
 * The PEM strings at fields cert, key and client_ca (optional) of the table at t.
 * Stack: unchanged.
 */
static void read_pem(lua_State *L, int t, const char *what, struct forge_tls_pem *pem)
{
    lua_getfield(L, t, "cert");
    lua_getfield(L, t, "key");
    lua_getfield(L, t, "client_ca");                      /* [cert, key, ca] */
    if (lua_type(L, -3) != LUA_TSTRING || lua_type(L, -2) != LUA_TSTRING ||
        (!lua_isnil(L, -1) && lua_type(L, -1) != LUA_TSTRING))
        luaL_error(L, "%s: tls needs cert and key (PEM text) and optionally client_ca (PEM text)", what);
    pem->cert = lua_tolstring(L, -3, &pem->cert_len);
    pem->key = lua_tolstring(L, -2, &pem->key_len);
    pem->client_ca = lua_isnil(L, -1) ? NULL : lua_tolstring(L, -1, &pem->ca_len);
    lua_pop(L, 3);                                        /* the strings stay in the table */
}

/*
 * A certificate's facts as a table {serial = hex, subject = DN, not_after = Unix time}.
 * Stack: [...] -> [..., info]
 */
static void push_tls_info(lua_State *L, const struct forge_tls_info *info)
{
    lua_createtable(L, 0, 3);
    lua_pushstring(L, info->serial);
    lua_setfield(L, -2, "serial");
    lua_pushstring(L, info->subject);
    lua_setfield(L, -2, "subject");
    lua_pushinteger(L, (lua_Integer)info->not_after);
    lua_setfield(L, -2, "not_after");
}

/*
 * tls = {cert = PEM, key = PEM, client_ca = PEM, client_auth = "require"|"optional"|"cert"}:
 * load the credentials into s. 1, or 0 with nil, err pushed (a PEM that does not load).
 * Stack: [...] -> [...] | [..., nil, err]
 */
static int read_tls(lua_State *L, struct server *s)
{
    static const char *const keys[] = {"cert", "key", "client_ca", "client_auth", NULL};
    static const char *const modes[] = {"require", "optional", "cert", NULL};
    if (lua_getfield(L, 1, "tls") == LUA_TNIL) {          /* [tls] */
        lua_pop(L, 1);
        return 1;
    }
    int t = lua_gettop(L);
    forge_checkkeys(L, t, "http.serve: tls", keys);
    struct forge_tls_pem pem;
    read_pem(L, t, "http.serve", &pem);
    const char *mode = forge_optstrfield(L, t, "client_auth", NULL);
    int m = 0;
    while (mode && modes[m] && strcmp(modes[m], mode) != 0)
        m++;
    if (mode && (!modes[m] || !pem.client_ca))
        luaL_error(L, "http.serve: tls.client_auth must be require, optional or cert, and needs client_ca");
    char err[256];
    struct forge_tls_creds *creds;
    if (forge_tls_creds_load(&pem, &creds, NULL, err, sizeof err) != 0) {
        lua_settop(L, t - 1);
        forge_pusherror(L, "http.tls", 0, "%s", err);
        return 0;
    }
    forge_tls_slot_init(&s->tls_slot, creds);
    s->tls = 1;
    if (pem.client_ca) {
        s->client_ca = xstrdup_len(pem.client_ca, pem.ca_len);
        if (!s->client_ca)
            luaL_error(L, "http.serve: out of memory");
        s->pre.client_certs = 1;
        s->pre.client_auth = (enum client_auth)m;
    }
    lua_settop(L, t - 1);
    return 1;
}

/* libmicrohttpd's options for HTTPS (at most 3, then MHD_OPTION_END) and its flag. */
static void tls_options_for(struct server *s, struct MHD_OptionItem *o, unsigned *flags)
{
    int n = 0;
    *flags |= MHD_USE_TLS;
    o[n++] = (struct MHD_OptionItem){MHD_OPTION_HTTPS_CERT_CALLBACK, 0, (void *)tls_pick_cert};
    o[n++] = (struct MHD_OptionItem){MHD_OPTION_HTTPS_PRIORITIES, 0, (void *)FORGE_TLS_PRIORITIES};
    if (s->client_ca)                                     /* libmicrohttpd then asks for client certificates */
        o[n++] = (struct MHD_OptionItem){MHD_OPTION_HTTPS_MEM_TRUST, 0, s->client_ca};
    o[n] = (struct MHD_OptionItem){MHD_OPTION_END, 0, NULL};
}

/* Raise the soft open-file limit to the hard one; the descriptors left for connections. */
static size_t connection_fds(void)
{
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) != 0)
        return 1024 - FD_RESERVE;
    if (rl.rlim_cur < rl.rlim_max) {
        rlim_t soft = rl.rlim_cur;
        rl.rlim_cur = rl.rlim_max;
        if (setrlimit(RLIMIT_NOFILE, &rl) != 0)
            rl.rlim_cur = soft;
    }
    return rl.rlim_cur > 2 * FD_RESERVE ? (size_t)(rl.rlim_cur - FD_RESERVE) : (size_t)(rl.rlim_cur / 2);
}

static void server_init_sync(struct server *s)
{
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&s->sweep_wake, &ca);
    pthread_cond_init(&s->waits_wake, &ca);
    pthread_condattr_destroy(&ca);
    pthread_mutex_init(&s->lock, NULL);
    pthread_mutex_init(&s->conns_lock, NULL);
    pthread_mutex_init(&s->waits_lock, NULL);
    pthread_mutex_init(&s->answers_lock, NULL);
}

/***
 * http.serve{listen="127.0.0.1:5000", handler="module", init="arg", threads=n, body_limit=bytes,
 *            connection_timeout=seconds, header_timeout=seconds, request_timeout=seconds,
 *            max_connections=n, max_connections_per_ip=n, max_buffered_bytes=bytes,
 *            auth={...}, version={...}, tls={...}}
 * Start serving. `handler` is required in every worker state and must return a table with
 * handle(req) -> status, headers, body (and optionally init(arg), called once per state).
 * req = {method, uri (raw, undecoded), headers (lowercase names), body, id, remote}.
 * Instead of blocking, handle may answer with a wait, {wait = token (a string), timeout =
 * seconds}: the connection is parked and the server's waiter state (loaded like the others)
 * calls the module's poll(token, why) every 50 ms until it returns status, headers, body; why
 * is nil, then "timeout" once the timeout has passed or "stop" once the server stops, when
 * poll must answer (else 504). A client that leaves meanwhile is forgotten.
 *   threads             pool threads (default 0: 2 x cores), each with its own state
 *   body_limit          bytes of one request body (default 1 MiB); larger ones get 413
 *   connection_timeout  seconds a connection may stay silent (default 60)
 *   header_timeout      seconds for a request's headers, from accept or from the end of the
 *                       previous request on the connection (default 5)
 *   request_timeout     seconds for its body, from the end of its headers (default 30);
 *                       a connection past either deadline is closed, however it trickles
 *   max_connections     open connections in all (default 0: 4000), at most the open-file limit
 *                       less 64 (the soft limit is first raised to the hard one); further
 *                       clients wait in the listen backlog
 *   max_connections_per_ip  open connections of one client address (default 256); further
 *                       ones are closed at once
 *   max_buffered_bytes  bytes of request bodies held across all connections (default 64 MiB);
 *                       a body that does not fit gets 503 with Retry-After
 *   auth = {users = {{username=, password=}, ...}, realm = "forge", public = {"/healthz"}}
 *                       a request to another path without one of these Basic credentials
 *                       gets 401 (WWW-Authenticate: Basic realm="...")
 *   version = {header = "X-Broker-API-Version", major = 2, under = {"/v2"}}
 *                       a request under those paths (default: all but the public ones)
 *                       without the header "<major>.<n>" gets 412
 *   generation = reload.counter
 *                       answers the handler marks replayable (a ":replay" header, see
 *                       "replayed answers") are served again without Lua while this forge.reload
 *                       counter stays at the generation they were made for
 *   tls = {cert = PEM, key = PEM, client_ca = PEM, client_auth = "require"}
 *                       serve HTTPS: TLS 1.2 and 1.3, AEAD ciphers, ECDHE (FORGE_TLS_PRIORITIES);
 *                       cert may hold the chain after the server's certificate. A client that
 *                       does not speak TLS is disconnected at its first bytes. With client_ca,
 *                       clients are asked for a certificate; on every path but the public ones
 *                       one that client_ca did not sign for client authentication gets 403, and
 *                       client_auth says what a good one does: "require" (default) one is
 *                       needed, and Basic credentials too; "optional" one stands in for Basic
 *                       credentials, which a client without one gives; "cert" one is needed and
 *                       stands in for Basic credentials. req.client_cert is its subject DN.
 *                       A cert or key that does not load returns nil, err (code "http.tls").
 * A request target with a control byte gets 400. 400, 401, 412, an oversized declared body
 * (413) and a declared body over the budget (503) are answered once the headers are in,
 * before any body is read, and close the connection. Paths match as the broker decodes
 * them: empty segments do not count and escapes are decoded.
 * @return server | nil, err
 */
static int l_http_serve(lua_State *L)
{
    static const char *const keys[] = {"listen", "handler", "init", "threads", "body_limit",
                                       "connection_timeout", "header_timeout", "request_timeout",
                                       "max_connections", "max_connections_per_ip", "max_buffered_bytes",
                                       "auth", "version", "tls", "generation", NULL};
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
    lua_Number header_timeout = forge_optnumfield(L, 1, "header_timeout", DEFAULT_HEADER_TIMEOUT);
    lua_Number request_timeout = forge_optnumfield(L, 1, "request_timeout", DEFAULT_REQUEST_TIMEOUT);
    lua_Integer max_conns = forge_optintfield(L, 1, "max_connections", 0);
    lua_Integer per_ip = forge_optintfield(L, 1, "max_connections_per_ip", DEFAULT_MAX_PER_IP);
    lua_Integer max_buffered = forge_optintfield(L, 1, "max_buffered_bytes", DEFAULT_MAX_BUFFERED);
    if (threads <= 0)
        threads = 2 * sysconf(_SC_NPROCESSORS_ONLN);
    if (threads > 256 || body_limit <= 0 || conn_timeout < 0)
        return luaL_error(L, "http.serve: threads must be 1..256, body_limit > 0, connection_timeout >= 0");
    if (!(header_timeout > 0) || !(request_timeout > 0) || max_conns < 0 || max_conns > 1000000 || per_ip < 1 ||
        per_ip > 1000000 || max_buffered <= 0)
        return luaL_error(L, "http.serve: header_timeout and request_timeout must be > 0, max_connections "
                             "0..1000000 (0: automatic), max_connections_per_ip 1..1000000, max_buffered_bytes > 0");
    size_t conns = connection_fds();
    if (conns > (size_t)(max_conns ? max_conns : DEFAULT_MAX_CONNECTIONS))
        conns = (size_t)(max_conns ? max_conns : DEFAULT_MAX_CONNECTIONS);
    if (conns < (size_t)threads)
        return luaL_error(L, "http.serve: max_connections (%d) must be at least threads (%d)", (int)conns,
                          (int)threads);

    struct sockaddr_storage addr;
    socklen_t alen;
    if (parse_listen(listen, &addr, &alen) != 0)
        return luaL_error(L, "http.serve: listen must be 'ipv4:port' or '[ipv6]:port', got '%s'", listen);

    struct server *s = lua_newuserdatauv(L, sizeof *s, 0);
    memset(s, 0, sizeof *s);
    server_init_sync(s);
    s->stopped = 1;                        /* until the daemon runs, __gc only frees config */
    luaL_setmetatable(L, SERVER_MT);
    s->body_limit = (size_t)body_limit;
    s->max_buffered = (size_t)max_buffered;
    s->header_timeout = header_timeout;
    s->request_timeout = request_timeout;
    s->handler = xstrdup_len(handler, strlen(handler));
    s->init_arg = xstrdup_len(init, init_len);
    s->init_len = init_len;
    s->path = package_field(L, "path");
    s->cpath = package_field(L, "cpath");
    if (!s->handler || !s->init_arg || !s->path || !s->cpath) {
        server_free_config(s);
        return luaL_error(L, "http.serve: out of memory");
    }
    read_auth(L, &s->pre);
    read_version(L, &s->pre);
    if (!read_tls(L, s)) {
        server_free_config(s);
        return 2;
    }
    if (lua_getfield(L, 1, "generation") != LUA_TNIL) {
        const atomic_llong **counter = luaL_testudata(L, -1, RELOAD_COUNTER_MT);
        if (!counter)
            return luaL_error(L, "http.serve: generation must be forge.reload's counter (reload.counter)");
        s->generation = *counter;
    }
    lua_pop(L, 1);
    unsigned long long r = (unsigned long long)time(NULL) ^ ((unsigned long long)getpid() << 16) ^
                           (unsigned long long)(uintptr_t)s;
    snprintf(s->id_prefix, sizeof s->id_prefix, "%08llx", (r * 0x9E3779B97F4A7C15ULL) >> 32);

    s->sweeping = 1;
    int e = pthread_create(&s->sweeper, NULL, sweep, s);
    if (e != 0) {
        server_free_config(s);
        return forge_pusherror(L, "http.thread", 1, "cannot start the deadline sweeper: %s", strerror(e));
    }
    s->waiting = 1;
    e = pthread_create(&s->waiter, NULL, waiter, s);
    if (e != 0) {
        sweeper_stop(s);
        server_free_config(s);
        return forge_pusherror(L, "http.thread", 1, "cannot start the waiter: %s", strerror(e));
    }
    unsigned flags = MHD_USE_INTERNAL_POLLING_THREAD | MHD_ALLOW_SUSPEND_RESUME | MHD_USE_POLL;
    if (addr.ss_family == AF_INET6)
        flags |= MHD_USE_IPv6;
    struct MHD_OptionItem tls_options[4] = {{MHD_OPTION_END, 0, NULL}};
    if (s->tls)
        tls_options_for(s, tls_options, &flags);
    s->daemon = MHD_start_daemon(flags, 0, NULL, NULL, on_request, s,
        MHD_OPTION_SOCK_ADDR, (struct sockaddr *)&addr,
        MHD_OPTION_THREAD_POOL_SIZE, (unsigned)threads,
        MHD_OPTION_URI_LOG_CALLBACK, on_uri, s,
        MHD_OPTION_NOTIFY_COMPLETED, on_completed, s,
        MHD_OPTION_NOTIFY_CONNECTION, on_connection, s,
        MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)conn_timeout,
        MHD_OPTION_CONNECTION_LIMIT, (unsigned)conns,
        MHD_OPTION_PER_IP_CONNECTION_LIMIT, (unsigned)per_ip,
        MHD_OPTION_LISTEN_BACKLOG_SIZE, 1024u,
        MHD_OPTION_ARRAY, tls_options,
        MHD_OPTION_END);
    if (!s->daemon) {
        e = errno;
        waiter_stop(s);
        sweeper_stop(s);
        server_free_config(s);
        return forge_pusherror(L, "http.listen", 1, "cannot listen on %s: %s", listen,
                               e ? strerror(e) : "libmicrohttpd refused to start");
    }
    s->stopped = 0;
    s->port = bound_port(s->daemon);
    return 1;
}

/***
 * server:reload_tls{cert = PEM, key = PEM, client_ca = PEM} -> info | nil, err
 * Swap the HTTPS credentials: new connections get them, open ones keep theirs until they
 * close. A set that does not load leaves the running one. client_ca must stay given, or stay
 * absent, as at start. info: as http.tls_check's.
 */
static int l_server_reload_tls(lua_State *L)
{
    struct server *s = toserver(L);
    luaL_checktype(L, 2, LUA_TTABLE);
    static const char *const keys[] = {"cert", "key", "client_ca", NULL};
    forge_checkkeys(L, 2, "server:reload_tls", keys);
    if (s->stopped || !s->tls)
        return luaL_error(L, "server:reload_tls: the server is stopped or does not serve HTTPS");
    struct forge_tls_pem pem;
    read_pem(L, 2, "server:reload_tls", &pem);
    if ((pem.client_ca != NULL) != s->pre.client_certs)
        return forge_pusherror(L, "http.tls", 0, "tls.client_ca can be replaced by a reload, not added or removed "
                               "(restart the broker for that)");
    char err[256];
    struct forge_tls_creds *creds;
    struct forge_tls_info info;
    if (forge_tls_creds_load(&pem, &creds, &info, err, sizeof err) != 0)
        return forge_pusherror(L, "http.tls", 0, "%s", err);
    forge_tls_slot_swap(&s->tls_slot, creds);
    push_tls_info(L, &info);
    return 1;
}

/***
 * http.tls_check{cert = PEM, key = PEM, client_ca = PEM} -> info | nil, err
 * Whether these credentials load (the key is the certificate's, the CA holds a certificate);
 * info = {serial = hex, subject = DN, not_after = Unix time} of the server certificate.
 */
static int l_http_tls_check(lua_State *L)
{
    luaL_checktype(L, 1, LUA_TTABLE);
    static const char *const keys[] = {"cert", "key", "client_ca", NULL};
    forge_checkkeys(L, 1, "http.tls_check", keys);
    struct forge_tls_pem pem;
    read_pem(L, 1, "http.tls_check", &pem);
    char err[256];
    struct forge_tls_creds *creds;
    struct forge_tls_info info;
    if (forge_tls_creds_load(&pem, &creds, &info, err, sizeof err) != 0)
        return forge_pusherror(L, "http.tls", 0, "%s", err);
    forge_tls_creds_unref(creds);
    push_tls_info(L, &info);
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

static void wake_init(void)
{
    if (pipe2(wake_pipe, O_CLOEXEC | O_NONBLOCK) != 0)
        wake_pipe[0] = wake_pipe[1] = -1;                 /* http.wait then sleeps its timeout out */
}

/* Wake http.wait; async-signal-safe (a full pipe is awake already). */
static void wake_waiter(void)
{
    int saved = errno;
    if (wake_pipe[1] >= 0) {
        char c = 1;
        ssize_t n = write(wake_pipe[1], &c, 1);
        (void)n;
    }
    errno = saved;
}

static void on_signal(int sig)
{
    if (sig == SIGHUP)
        reload_requested = 1;
    else
        stop_requested = 1;
    wake_waiter();
}

/***
 * http.kick() -> true
 * Wake the thread in http.wait (from any thread of the process): it returns "kick". Kicks
 * before that wait returns are one.
 */
static int l_http_kick(lua_State *L)
{
    atomic_store(&kicked, 1);
    wake_waiter();
    lua_pushboolean(L, 1);
    return 1;
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
 * http.wait(timeout_seconds [, fd]) -> "stop" | "reload" | "kick" | "ready" | nil (timeout).
 * Sleeps until a trapped signal arrives (SIGTERM/SIGINT: "stop", SIGHUP: "reload"), another
 * thread calls http.kick(), descriptor fd (if given) is readable ("ready", left unread), or
 * the timeout passes.
 */
static int l_http_wait(lua_State *L)
{
    double deadline = monotonic_now() + luaL_checknumber(L, 1);
    int fd = (int)luaL_optinteger(L, 2, -1);
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
        if (atomic_exchange(&kicked, 0)) {
            lua_pushliteral(L, "kick");
            return 1;
        }
        double left = deadline - monotonic_now();
        if (left <= 0)
            return 0;
        struct pollfd p[2] = {{.fd = wake_pipe[0], .events = POLLIN}, {.fd = fd, .events = POLLIN}};
        int ms = left > 3600 ? 3600000 : (int)(left * 1000) + 1;
        if (poll(p, fd >= 0 ? 2 : 1, ms) > 0) {
            char drain[64];
            if (p[0].revents)
                while (read(wake_pipe[0], drain, sizeof drain) > 0)
                    ;
            if (fd >= 0 && p[1].revents) {
                lua_pushliteral(L, "ready");
                return 1;
            }
        }
    }
}

int luaopen_forge_http(lua_State *L)
{
    pthread_once(&wake_once, wake_init);
    static const luaL_Reg lib[] = {
        {"serve", l_http_serve},
        {"trap_signals", l_http_trap_signals},
        {"tls_check", l_http_tls_check},
        {"wait", l_http_wait},
        {"kick", l_http_kick},
        {NULL, NULL},
    };
    static const luaL_Reg methods[] = {
        {"port", l_server_port},
        {"active", l_server_active},
        {"stop", l_server_stop},
        {"reload_tls", l_server_reload_tls},
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
