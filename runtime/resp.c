/*
 * forge.resp — speak the Redis protocol (RESP2) from the broker, without a redis-cli process.
 *
 * One call is one TCP connection: connect (non-blocking, bounded by the call's deadline),
 * AUTH when credentials are given (and only then the commands, so a failed AUTH never runs
 * anything as the default user), the commands pipelined as RESP2 arrays of bulk strings
 * (binary safe), exactly one reply read per command, close.
 *
 * With pool=true the connection is kept instead of closed, in a process-wide pool keyed by
 * host, port, user and password, and a later call with the same key reuses it without
 * connecting or AUTH. Only a connection whose call succeeded, left no unread byte, and sent
 * no command that changes a connection's state (SELECT, MULTI, CLIENT, HELLO...) goes back.
 * A pooled connection idle for RESP_POOL_IDLE_S, or found readable before use (the server
 * closed it, e.g. on a restart), is dropped for a new one; a failed call closes its own.
 * The pool holds at most RESP_POOL_MAX idle connections.
 *
 * flush={...} names a command that makes the commands' effect durable on the server (ACL SAVE,
 * CONFIG REWRITE: each rewrites a whole file). Concurrent calls to one server share it, as
 * writers share a group commit: a call returns once a flush that began after its commands
 * were answered has succeeded; one call leads it (on its own connection), the others wait.
 *
 * Memory: the request is built in a Lua userdata (collected, never leaked); the received
 * bytes live in a malloc'd buffer owned by a userdata with __gc. The network phase makes
 * no Lua calls; the fd is closed before the replies are turned into Lua values, the only
 * step after it that can raise.
 *
 * Threads: every call has its own socket and buffers; the pool is the only shared state,
 * guarded by pool_mu, and a connection taken from it belongs to one call at a time.
 */
#include <errno.h>
#include <limits.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#include "forge/forge.h"
#include "lnet.h"

#define RESP_CALL_MT      "forge.resp.call"
#define RESP_MAX_REPLY    (16 * 1024 * 1024)    /* default cap on all replies of a call */
#define RESP_MAX_DEPTH    32                    /* nested arrays in one reply */
#define RESP_READ_CHUNK   65536
#define RESP_WHY          256
#define RESP_POOL_MAX     64                    /* idle connections kept, all keys together */
#define RESP_POOL_IDLE_S  60.0                  /* a connection idle longer is not reused */

/* How a call failed (before any Lua value is built). */
enum resp_fail {
    RESP_OK = 0,
    RESP_FAIL_CONNECT,          /* refused, unreachable, connect timed out: retryable */
    RESP_FAIL_RESOLVE,          /* host name does not resolve */
    RESP_FAIL_TIMEOUT,          /* connected, replies not complete by the deadline: retryable */
    RESP_FAIL_IO,               /* reset, closed early, send/recv error: retryable */
    RESP_FAIL_PROTOCOL,         /* malformed reply, or replies over the cap */
    RESP_FAIL_AUTH,             /* AUTH answered with an error */
    RESP_FAIL_FLUSH,            /* the flush command answered with an error: retryable */
};

/* Incremental scanner state: how far the received bytes hold complete elements. */
struct resp_scan {
    size_t pos;                             /* start of the first incomplete element */
    int depth;                              /* arrays open at pos */
    long long left[RESP_MAX_DEPTH];         /* elements still due in each open array */
    size_t replies;                         /* complete top-level replies before pos */
};

/* One call's resources; the userdata's __gc frees whatever is still held. */
struct resp_ctx {
    int fd;
    char *buf;                              /* received bytes */
    size_t len, cap;
    size_t max;                             /* cap on len */
    struct resp_scan scan;
    char why[RESP_WHY];                     /* failure message */
};


/* ------------------------------------------------------------------------ */
/* small helpers                                                            */
/* ------------------------------------------------------------------------ */

static double now_mono(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}


/* Milliseconds to the deadline, rounded up; 0 when it has passed. */
static int ms_left(double deadline)
{
    double left = deadline - now_mono();
    if (left <= 0)
        return 0;
    if (left > 86400)
        left = 86400;
    return (int)(left * 1000) + 1;
}



static void ctx_close_fd(struct resp_ctx *c)
{
    if (c->fd >= 0) {
        close(c->fd);
        c->fd = -1;
    }
}


static void ctx_free(struct resp_ctx *c)
{
    ctx_close_fd(c);
    free(c->buf);
    c->buf = NULL;
    c->len = c->cap = 0;
}


/* __gc of the call context: [ctx] -> [] */
static int l_call_gc(lua_State *L)
{
    ctx_free(luaL_checkudata(L, 1, RESP_CALL_MT));
    return 0;
}


/* Number of decimal digits of v (for the request's length headers). */
static size_t dec_len(size_t v)
{
    size_t n = 1;
    while (v >= 10) {
        v /= 10;
        n++;
    }
    return n;
}


/* Write "<c><v>\r\n" at p; returns the byte after it. */
static char *put_header(char *p, char c, size_t v)
{
    *p++ = c;
    size_t n = dec_len(v);
    for (size_t i = n; i > 0; i--) {
        p[i - 1] = (char)('0' + v % 10);
        v /= 10;
    }
    p += n;
    *p++ = '\r';
    *p++ = '\n';
    return p;
}


/* ------------------------------------------------------------------------ */
/* the connection pool (no Lua)                                             */
/* ------------------------------------------------------------------------ */

struct pooled {
    int fd;
    char *key;                              /* host NUL port NUL user NUL password */
    size_t klen;
    double idle_since;
};

static pthread_mutex_t pool_mu = PTHREAD_MUTEX_INITIALIZER;
static struct pooled pool[RESP_POOL_MAX];
static int pool_len;


/* Whether fd is still an open, quiet connection: nothing to read, no EOF, no error. */
static int fd_quiet(int fd)
{
    struct pollfd pf = {.fd = fd, .events = POLLIN};
    return poll(&pf, 1, 0) == 0;
}


/* An idle connection for key (removed from the pool), or -1. Stale ones met are closed. */
static int pool_take(const char *key, size_t klen)
{
    int fd = -1;
    double now = now_mono();
    pthread_mutex_lock(&pool_mu);
    for (int i = pool_len - 1; i >= 0 && fd < 0; i--) {
        struct pooled *e = &pool[i];
        int expired = now - e->idle_since > RESP_POOL_IDLE_S;
        if (!expired && (e->klen != klen || memcmp(e->key, key, klen) != 0))
            continue;
        if (!expired && fd_quiet(e->fd))
            fd = e->fd;
        else
            close(e->fd);
        free(e->key);
        *e = pool[--pool_len];
    }
    pthread_mutex_unlock(&pool_mu);
    return fd;
}


/* Keep fd for key; closes it when the pool is full or out of memory. */
static void pool_put(const char *key, size_t klen, int fd)
{
    char *k = malloc(klen);
    pthread_mutex_lock(&pool_mu);
    if (k && pool_len < RESP_POOL_MAX) {
        memcpy(k, key, klen);
        pool[pool_len++] = (struct pooled){.fd = fd, .key = k, .klen = klen, .idle_since = now_mono()};
        k = NULL;
        fd = -1;
    }
    pthread_mutex_unlock(&pool_mu);
    free(k);
    if (fd >= 0)
        close(fd);
}


/* ------------------------------------------------------------------------ */
/* reply scanning (no Lua)                                                  */
/* ------------------------------------------------------------------------ */

/* The "\r\n" ending the line at p (n bytes available), or NULL when it has not arrived. */
static const char *find_crlf(const char *p, size_t n)
{
    const char *end = p + n;
    while (p < end) {
        const char *cr = memchr(p, '\r', (size_t)(end - p));
        if (!cr || cr + 1 >= end)
            return NULL;
        if (cr[1] == '\n')
            return cr;
        p = cr + 1;
    }
    return NULL;
}


/* Parse the decimal integer [p, e) (optional '-'). Returns 0, or -1 when malformed or out of range. */
static int parse_int(const char *p, const char *e, long long *out)
{
    int neg = 0;
    if (p < e && *p == '-') {
        neg = 1;
        p++;
    }
    if (p == e || e - p > 19)
        return -1;
    unsigned long long v = 0;
    for (; p < e; p++) {
        if (*p < '0' || *p > '9')
            return -1;
        v = v * 10 + (unsigned long long)(*p - '0');
    }
    if (v > (unsigned long long)LLONG_MAX + (unsigned long long)neg)
        return -1;
    *out = neg ? (v == (unsigned long long)LLONG_MAX + 1 ? LLONG_MIN : -(long long)v) : (long long)v;
    return 0;
}


/*
 * Advance s over the complete elements in buf[0, len) until `want` top-level replies are
 * complete or the data runs out. Returns 0, or -1 with the reason in *why (malformed, or
 * a length that cannot fit in `max` bytes).
 * Each byte is scanned once, except the header line of an element that is still incomplete.
 */
static int scan_replies(struct resp_scan *s, const char *buf, size_t len, size_t want, size_t max,
                        const char **why)
{
    while (s->replies < want) {
        size_t p = s->pos;
        if (p >= len)
            return 0;
        const char *cr = find_crlf(buf + p, len - p);
        if (!cr)
            return 0;
        const char *body = buf + p + 1;
        size_t next = (size_t)(cr - buf) + 2;
        long long n = 0;
        switch (buf[p]) {
        case '+':
        case '-':
            break;
        case ':':
            if (parse_int(body, cr, &n) < 0) {
                *why = "malformed integer reply";
                return -1;
            }
            break;
        case '$':
            if (parse_int(body, cr, &n) < 0 || n < -1) {
                *why = "malformed bulk string length";
                return -1;
            }
            if (n > (long long)max) {
                *why = "bulk string longer than max_reply";
                return -1;
            }
            if (n >= 0) {
                if ((unsigned long long)n > (unsigned long long)len ||
                    len - next < (size_t)n + 2)
                    return 0;                   /* the rest has not arrived */
                if (buf[next + (size_t)n] != '\r' || buf[next + (size_t)n + 1] != '\n') {
                    *why = "bulk string not terminated by CRLF";
                    return -1;
                }
                next += (size_t)n + 2;
            }
            break;
        case '*':
            if (parse_int(body, cr, &n) < 0 || n < -1) {
                *why = "malformed array length";
                return -1;
            }
            if (n > (long long)(max / 3)) {     /* each element takes 3 bytes at least */
                *why = "array longer than max_reply allows";
                return -1;
            }
            if (n > 0) {                        /* opens an array: not complete yet */
                if (s->depth == RESP_MAX_DEPTH) {
                    *why = "arrays nested too deep";
                    return -1;
                }
                s->left[s->depth++] = n;
                s->pos = next;
                continue;
            }
            break;
        default:
            *why = "unexpected reply type byte";
            return -1;
        }
        s->pos = next;
        /* one element complete: it may complete its array, and that one its parent */
        while (s->depth > 0 && --s->left[s->depth - 1] == 0)
            s->depth--;
        if (s->depth == 0)
            s->replies++;
    }
    return 0;
}


/* ------------------------------------------------------------------------ */
/* network (no Lua)                                                         */
/* ------------------------------------------------------------------------ */

/*
 * Connect to host:port before the deadline, trying each address in turn. On success
 * c->fd is a non-blocking socket. Returns RESP_OK or a failure kind (message in c->why).
 */
static int resp_connect(struct resp_ctx *c, const char *host, int port, double deadline)
{
    char eb[128];
    int gai;
    int fd = forge_tcp_connect(host, port, ms_left(deadline), &gai);
    if (gai != 0) {
        snprintf(c->why, sizeof c->why, "%s:%d: %s", host, port, gai_strerror(gai));
        return gai == EAI_AGAIN ? RESP_FAIL_CONNECT : RESP_FAIL_RESOLVE;
    }
    if (fd < 0) {
        snprintf(c->why, sizeof c->why, "%s:%d: %s", host, port,
                 fd == -ETIMEDOUT ? "connect timed out" : forge_strerror(-fd, eb, sizeof eb));
        return RESP_FAIL_CONNECT;
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    c->fd = fd;
    return RESP_OK;
}


/* Room for at least one more read chunk, within the cap. Returns 0, or -1 (ENOMEM). */
static int ctx_reserve(struct resp_ctx *c)
{
    if (c->cap - c->len >= RESP_READ_CHUNK / 4)
        return 0;
    size_t ncap = c->cap ? c->cap * 2 : RESP_READ_CHUNK;
    if (ncap > c->max + RESP_READ_CHUNK)
        ncap = c->max + RESP_READ_CHUNK;
    if (ncap <= c->cap)
        ncap = c->cap + RESP_READ_CHUNK;
    char *nb = realloc(c->buf, ncap);
    if (!nb)
        return -1;
    c->buf = nb;
    c->cap = ncap;
    return 0;
}


/*
 * Send req[0, reqlen) and read until `want` replies in total are complete (the scan state
 * carries over between exchanges). Sending and receiving interleave, so a long pipeline
 * never deadlocks on full socket buffers. Returns RESP_OK or a failure kind (c->why).
 */
static int resp_exchange(struct resp_ctx *c, const char *req, size_t reqlen, size_t want,
                         double deadline, const char *peer)
{
    char eb[128];
    size_t off = 0;
    int eof = 0;
    for (;;) {
        const char *why = NULL;
        if (scan_replies(&c->scan, c->buf, c->len, want, c->max, &why) < 0) {
            snprintf(c->why, sizeof c->why, "%s: %s", peer, why);
            return RESP_FAIL_PROTOCOL;
        }
        if (c->len > c->max) {
            snprintf(c->why, sizeof c->why, "%s: replies exceed max_reply (%zu bytes)", peer, c->max);
            return RESP_FAIL_PROTOCOL;
        }
        if (c->scan.replies >= want)
            return RESP_OK;
        if (eof) {
            snprintf(c->why, sizeof c->why, "%s: connection closed by the server after %zu of %zu replies",
                     peer, c->scan.replies, want);
            return RESP_FAIL_IO;
        }
        struct pollfd pf = {.fd = c->fd, .events = (short)(POLLIN | (off < reqlen ? POLLOUT : 0))};
        int ms = ms_left(deadline);
        int n = ms > 0 ? poll(&pf, 1, ms) : 0;
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            snprintf(c->why, sizeof c->why, "%s: poll: %s", peer, forge_strerror(errno, eb, sizeof eb));
            return RESP_FAIL_IO;
        }
        if (n == 0) {
            snprintf(c->why, sizeof c->why, "%s: timed out waiting for replies (%zu of %zu)",
                     peer, c->scan.replies, want);
            return RESP_FAIL_TIMEOUT;
        }
        if ((pf.revents & POLLOUT) && off < reqlen) {
            ssize_t w = send(c->fd, req + off, reqlen - off, MSG_NOSIGNAL);
            if (w > 0) {
                off += (size_t)w;
            } else if (w < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
                snprintf(c->why, sizeof c->why, "%s: send: %s", peer, forge_strerror(errno, eb, sizeof eb));
                return RESP_FAIL_IO;
            }
        }
        if (pf.revents & (POLLIN | POLLHUP | POLLERR)) {
            while (c->len <= c->max) {          /* drain what is there */
                if (ctx_reserve(c) < 0) {
                    snprintf(c->why, sizeof c->why, "%s: out of memory for replies", peer);
                    return RESP_FAIL_IO;
                }
                ssize_t r = recv(c->fd, c->buf + c->len, c->cap - c->len, 0);
                if (r > 0) {
                    c->len += (size_t)r;
                    continue;
                }
                if (r == 0) {
                    eof = 1;
                    break;
                }
                if (errno == EINTR)
                    continue;
                if (errno == EAGAIN || errno == EWOULDBLOCK)
                    break;
                snprintf(c->why, sizeof c->why, "%s: recv: %s", peer, forge_strerror(errno, eb, sizeof eb));
                return RESP_FAIL_IO;
            }
        }
    }
}


/* ------------------------------------------------------------------------ */
/* shared flushes (no Lua)                                                  */
/* ------------------------------------------------------------------------ */

/* The flushes of one key (pool key NUL flush command); lives while a call uses it. */
struct flusher {
    struct flusher *next;
    char *key;
    size_t klen;
    int refs;
    int leading;                            /* a flush is running */
    unsigned long long started, done, ok;   /* generations: begun, finished, last that succeeded */
    int fail;                               /* the last failed flush: kind and message */
    char why[RESP_WHY];
    pthread_cond_t cv;                      /* signalled whenever a flush finishes */
};

static pthread_mutex_t flush_mu = PTHREAD_MUTEX_INITIALIZER;
static struct flusher *flushers;


/* The flusher of key with one more reference (created if needed), or NULL (ENOMEM). Locked. */
static struct flusher *flusher_join(const char *key, size_t klen)
{
    struct flusher *f = flushers;
    while (f && (f->klen != klen || memcmp(f->key, key, klen) != 0))
        f = f->next;
    if (!f && (f = calloc(1, sizeof *f)) != NULL) {
        pthread_condattr_t ca;
        if (!(f->key = malloc(klen))) {
            free(f);
            return NULL;
        }
        memcpy(f->key, key, klen);
        f->klen = klen;
        pthread_condattr_init(&ca);
        pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
        pthread_cond_init(&f->cv, &ca);
        pthread_condattr_destroy(&ca);
        f->next = flushers;
        flushers = f;
    }
    if (f)
        f->refs++;
    return f;
}


/* Drop a reference; the last one frees it. Locked. */
static void flusher_leave(struct flusher *f)
{
    if (--f->refs > 0)
        return;
    struct flusher **p = &flushers;
    while (*p != f)
        p = &(*p)->next;
    *p = f->next;
    pthread_cond_destroy(&f->cv);
    free(f->key);
    free(f);
}


/* Send the flush command on fd and check its one reply. Returns RESP_OK or a kind (why). */
static int flush_run(int fd, const char *req, size_t len, double deadline, const char *peer, char *why)
{
    struct resp_ctx f = {.fd = fd, .max = 65536};
    int fail = resp_exchange(&f, req, len, 1, deadline, peer);
    if (!fail && f.buf[0] == '-') {
        const char *cr = find_crlf(f.buf, f.len);
        snprintf(why, RESP_WHY, "%.120s: the flush command failed: %.*s", peer,
                 (int)(cr - f.buf - 1 < 120 ? cr - f.buf - 1 : 120), f.buf + 1);
        fail = RESP_FAIL_FLUSH;
    } else if (fail) {
        memcpy(why, f.why, RESP_WHY);
    }
    if (!fail && f.scan.pos != f.len) {
        snprintf(why, RESP_WHY, "%.200s: unexpected bytes after the flush reply", peer);
        fail = RESP_FAIL_PROTOCOL;
    }
    free(f.buf);
    return fail;
}


/*
 * Make sure a flush begun after now succeeds before returning: lead one on c->fd, or wait
 * for the one running to end and then the next. Returns RESP_OK or a failure kind (c->why).
 */
static int flush_shared(struct resp_ctx *c, const char *key, size_t klen, const char *req, size_t len,
                        double deadline, const char *peer)
{
    pthread_mutex_lock(&flush_mu);
    struct flusher *f = flusher_join(key, klen);
    if (!f) {
        pthread_mutex_unlock(&flush_mu);
        snprintf(c->why, sizeof c->why, "%.200s: out of memory for the flush", peer);
        return RESP_FAIL_IO;
    }
    unsigned long long target = f->started + 1;
    int fail = RESP_OK;
    while (f->done < target && !fail) {
        if (!f->leading) {
            unsigned long long gen = ++f->started;
            f->leading = 1;
            pthread_mutex_unlock(&flush_mu);
            char why[RESP_WHY];
            int kind = flush_run(c->fd, req, len, deadline, peer, why);
            pthread_mutex_lock(&flush_mu);
            f->done = gen;
            if (kind == RESP_OK) {
                f->ok = gen;
            } else {
                f->fail = kind;
                memcpy(f->why, why, sizeof why);
            }
            f->leading = 0;
            pthread_cond_broadcast(&f->cv);
            continue;
        }
        double left = deadline - now_mono();
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        if (left > 0) {
            long long ns = ts.tv_nsec + (long long)(left * 1e9);
            ts.tv_sec += (time_t)(ns / 1000000000);
            ts.tv_nsec = (long)(ns % 1000000000);
        }
        if (left <= 0 || pthread_cond_timedwait(&f->cv, &flush_mu, &ts) == ETIMEDOUT) {
            if (f->done < target) {
                snprintf(c->why, sizeof c->why, "%.200s: timed out waiting for the shared flush", peer);
                fail = RESP_FAIL_TIMEOUT;
            }
        }
    }
    if (!fail && f->ok < target) {
        fail = f->fail;
        memcpy(c->why, f->why, sizeof c->why);
    }
    flusher_leave(f);
    pthread_mutex_unlock(&flush_mu);
    return fail;
}


/* ------------------------------------------------------------------------ */
/* Lua side                                                                 */
/* ------------------------------------------------------------------------ */

/*
 * Push the (already scanned, so well-formed) reply at buf[*pos] and advance *pos past it.
 *
 * Stack: [...] -> [... value]
 * May longjmp (memory); the buffer is owned by the call context's __gc.
 */
static void push_reply(lua_State *L, const char *buf, size_t len, size_t *pos)
{
    size_t p = *pos;
    const char *cr = find_crlf(buf + p, len - p);
    const char *body = buf + p + 1;
    size_t next = (size_t)(cr - buf) + 2;
    long long n = 0;
    switch (buf[p]) {
    case '+':
        lua_pushlstring(L, body, (size_t)(cr - body));
        break;
    case '-':
        lua_createtable(L, 0, 1);
        lua_pushlstring(L, body, (size_t)(cr - body));
        lua_setfield(L, -2, "err");
        break;
    case ':':
        parse_int(body, cr, &n);
        lua_pushinteger(L, (lua_Integer)n);
        break;
    case '$':
        parse_int(body, cr, &n);
        if (n < 0) {
            lua_pushboolean(L, 0);
        } else {
            lua_pushlstring(L, buf + next, (size_t)n);
            next += (size_t)n + 2;
        }
        break;
    default:                                    /* '*' */
        parse_int(body, cr, &n);
        if (n < 0) {
            lua_pushboolean(L, 0);
            break;
        }
        luaL_checkstack(L, 4, "resp: reply nested too deep");
        lua_createtable(L, n < INT_MAX ? (int)n : INT_MAX, 0);
        for (long long i = 1; i <= n; i++) {
            push_reply(L, buf, len, &next);
            lua_rawseti(L, -2, (lua_Integer)i);
        }
        break;
    }
    *pos = next;
}




/*
 * The command argument on top of the stack as a string: strings as they are, integers and
 * integral floats (a port that went through JSON) in decimal, other floats as Lua prints them.
 *
 * Stack: [... v] -> [... s]
 * May longjmp (memory).
 */
static const char *arg_tolstring(lua_State *L, size_t *len)
{
    int isint = 0;
    lua_Integer iv = lua_tointegerx(L, -1, &isint);
    if (lua_type(L, -1) == LUA_TNUMBER && isint) {
        lua_pop(L, 1);
        lua_pushfstring(L, "%I", (LUAI_UACINT)iv);
    }
    return lua_tolstring(L, -1, len);
}


/*
 * Encoded size of commands[i] (a non-empty array of strings or numbers); raises on misuse.
 *
 * Stack: [...] -> [...]
 * May longjmp.
 */
static size_t command_size(lua_State *L, int cmds, lua_Integer i)
{
    if (lua_geti(L, cmds, i) != LUA_TTABLE)
        luaL_error(L, "resp.call: commands[%d] must be an array of strings", (int)i);
    lua_Integer n = (lua_Integer)lua_rawlen(L, -1);
    if (n < 1 || n > 1048576)
        luaL_error(L, "resp.call: commands[%d] must be a non-empty array of strings", (int)i);
    size_t size = 1 + dec_len((size_t)n) + 2;
    for (lua_Integer j = 1; j <= n; j++) {
        int t = lua_geti(L, -1, j);
        if (t != LUA_TSTRING && t != LUA_TNUMBER)
            luaL_error(L, "resp.call: commands[%d][%d] must be a string or a number", (int)i, (int)j);
        size_t len;
        arg_tolstring(L, &len);                 /* converts the pushed copy only */
        size += 1 + dec_len(len) + 2 + len + 2;
        lua_pop(L, 1);
    }
    lua_pop(L, 1);
    return size;
}


/*
 * Write commands[i] as a RESP2 array of bulk strings at p; returns the byte after it.
 *
 * Stack: [...] -> [...]
 */
static char *command_write(lua_State *L, int cmds, lua_Integer i, char *p)
{
    lua_geti(L, cmds, i);
    lua_Integer n = (lua_Integer)lua_rawlen(L, -1);
    p = put_header(p, '*', (size_t)n);
    for (lua_Integer j = 1; j <= n; j++) {
        lua_geti(L, -1, j);
        size_t len;
        const char *s = arg_tolstring(L, &len);
        p = put_header(p, '$', len);
        memcpy(p, s, len);
        p += len;
        *p++ = '\r';
        *p++ = '\n';
        lua_pop(L, 1);
    }
    lua_pop(L, 1);
    return p;
}


/* Write one inline array of bulk strings (AUTH) at p. */
static char *strings_write(char *p, const char *const *v, const size_t *lens, int n)
{
    p = put_header(p, '*', (size_t)n);
    for (int i = 0; i < n; i++) {
        p = put_header(p, '$', lens[i]);
        memcpy(p, v[i], lens[i]);
        p += lens[i];
        *p++ = '\r';
        *p++ = '\n';
    }
    return p;
}


/*
 * Whether the commands leave the connection as a new one would be after AUTH, so that
 * another call may reuse it: none of them changes its database, transaction, protocol,
 * identity, reply mode or subscriptions.
 *
 * Stack: [...] -> [...]
 */
static int commands_keep_state(lua_State *L, int cmds, lua_Integer ncmd)
{
    static const char *const changing[] = {"AUTH", "HELLO", "SELECT", "MULTI", "EXEC", "DISCARD", "WATCH",
        "UNWATCH", "SUBSCRIBE", "PSUBSCRIBE", "SSUBSCRIBE", "MONITOR", "CLIENT", "READONLY", "READWRITE",
        "RESET", "QUIT", "SYNC", "PSYNC", "REPLCONF", NULL};
    int keep = 1;
    for (lua_Integer i = 1; i <= ncmd && keep; i++) {
        lua_geti(L, cmds, i);
        lua_geti(L, -1, 1);
        const char *name = lua_tostring(L, -1);         /* checked by command_size */
        for (int k = 0; changing[k] && keep; k++)
            keep = strcasecmp(name, changing[k]) != 0;
        lua_pop(L, 2);
    }
    return keep;
}


static int push_failure(lua_State *L, int kind, const char *why)
{
    switch (kind) {
    case RESP_FAIL_CONNECT:  return forge_pusherror(L, "resp.connect", 1, "%s", why);
    case RESP_FAIL_RESOLVE:  return forge_pusherror(L, "resp.connect", 0, "%s", why);
    case RESP_FAIL_TIMEOUT:  return forge_pusherror(L, "resp.timeout", 1, "%s", why);
    case RESP_FAIL_IO:       return forge_pusherror(L, "resp.io", 1, "%s", why);
    case RESP_FAIL_AUTH:     return forge_pusherror(L, "resp.auth", 0, "%s", why);
    case RESP_FAIL_FLUSH:    return forge_pusherror(L, "resp.flush", 1, "%s", why);
    default:                 return forge_pusherror(L, "resp.protocol", 0, "%s", why);
    }
}


/***
 * Send commands to a Redis server over one connection and return their replies.
 * @function call
 * @tparam table opts {host=, port=, timeout=seconds for the whole call (default 5),
 *   user=?, password=? (AUTH first when given), commands={{"SET","k","v"}, ...},
 *   max_reply=bytes of all replies together (default 16 MiB),
 *   pool=true to keep the connection for later calls with the same host, port and credentials
 *   and to reuse one kept before (default false),
 *   flush={"ACL","SAVE"}: a command run after the commands, shared by concurrent calls to the
 *   same server and credentials; the call succeeds only once such a flush, begun after its
 *   commands were answered, succeeded (its reply is not returned)}
 * @return array of replies, one per command: strings (bulk and simple), integers,
 *   false (nil bulk or nil array), tables (arrays), {err="ERR ..."} (error replies);
 *   or nil, err: "resp.connect" (refused, unreachable, connect timeout: retryable),
 *   "resp.timeout" (retryable), "resp.io" (retryable), "resp.auth" (the server's message),
 *   "resp.protocol" (malformed replies, or over max_reply), "resp.flush" (the flush command
 *   answered with an error: the server's message; retryable)
 *
 * Stack: [opts] -> [opts, commands, req_ud, ctx_ud, result] (or ..., nil, err)
 */
static int l_resp_call(lua_State *L)
{
    static const char *const keys[] = {"host", "port", "timeout", "user", "password", "commands",
                                       "max_reply", "pool", "flush", NULL};
    luaL_checktype(L, 1, LUA_TTABLE);
    lua_settop(L, 1);
    forge_checkkeys(L, 1, "resp.call", keys);
    const char *host = forge_optstrfield(L, 1, "host", NULL);
    if (!host || !*host)
        luaL_error(L, "resp.call: option 'host' is required");
    lua_Integer port = forge_optintfield(L, 1, "port", 0);
    if (port < 1 || port > 65535)
        luaL_error(L, "resp.call: option 'port' must be an integer in 1..65535");
    double timeout = forge_optnumfield(L, 1, "timeout", 5);
    if (!(timeout > 0 && timeout < 86400))
        luaL_error(L, "resp.call: option 'timeout' must be in (0, 86400) seconds");
    lua_Integer max_reply = forge_optintfield(L, 1, "max_reply", RESP_MAX_REPLY);
    if (max_reply < 1 || max_reply > (lua_Integer)1 << 30)
        luaL_error(L, "resp.call: option 'max_reply' must be in 1..2^30 bytes");
    const char *user = forge_optstrfield(L, 1, "user", NULL);
    const char *password = forge_optstrfield(L, 1, "password", NULL);
    if (user && !password)
        luaL_error(L, "resp.call: option 'user' needs 'password'");
    int use_pool = forge_optboolfield(L, 1, "pool", 0);

    if (lua_getfield(L, 1, "commands") != LUA_TTABLE)
        luaL_error(L, "resp.call: option 'commands' must be an array of commands");
    int cmds = lua_gettop(L);
    lua_Integer ncmd = (lua_Integer)lua_rawlen(L, cmds);
    if (ncmd > 1048576)
        luaL_error(L, "resp.call: too many commands");

    /* the AUTH request, then the commands: sizes first (misuse raises here) */
    static const char *const cred_keys[] = {"user", "password"};
    const char *auth[3];
    size_t auth_len[3];
    int nauth = 0;
    size_t auth_size = 0;
    if (password) {
        auth[nauth] = "AUTH";
        auth_len[nauth++] = 4;
        for (int k = user ? 0 : 1; k < 2; k++) {
            lua_getfield(L, 1, cred_keys[k]);
            auth[nauth] = lua_tolstring(L, -1, &auth_len[nauth]);  /* held by opts */
            nauth++;
            lua_pop(L, 1);
        }
        auth_size = 1 + dec_len((size_t)nauth) + 2;
        for (int i = 0; i < nauth; i++)
            auth_size += 1 + dec_len(auth_len[i]) + 2 + auth_len[i] + 2;
    }
    size_t cmd_size = 0;
    for (lua_Integer i = 1; i <= ncmd; i++)
        cmd_size += command_size(L, cmds, i);
    int keep = use_pool && commands_keep_state(L, cmds, ncmd);

    /* the flush command, encoded (anchored on the stack) */
    size_t flush_len = 0;
    const char *flush = NULL;
    if (lua_getfield(L, 1, "flush") != LUA_TNIL) {
        if (!lua_istable(L, -1) || lua_rawlen(L, -1) < 1)
            luaL_error(L, "resp.call: option 'flush' must be one command: a non-empty array of strings");
        lua_createtable(L, 1, 0);                                       /* [..., flush, {flush}] */
        lua_insert(L, -2);
        lua_rawseti(L, -2, 1);
        flush_len = command_size(L, lua_gettop(L), 1);
        char *fb = lua_newuserdatauv(L, flush_len, 0);                  /* [..., {flush}, fb] */
        command_write(L, lua_gettop(L) - 1, 1, fb);
        flush = fb;
    } else {
        lua_pop(L, 1);
    }

    /* the pool key: host NUL port NUL user NUL password; a flush's: that NUL the flush */
    size_t klen = 0, fklen = 0;
    const char *pool_key = NULL, *flush_key = NULL;
    if (use_pool || flush) {
        lua_pushfstring(L, "%s%c%d%c%s%c", host, 0, (int)port, 0, user ? user : "", 0);
        lua_pushstring(L, password ? password : "");
        lua_concat(L, 2);
        pool_key = lua_tolstring(L, -1, &klen);
    }
    if (flush) {
        lua_pushvalue(L, -1);
        lua_pushliteral(L, "\0");
        lua_pushlstring(L, flush, flush_len);
        lua_concat(L, 3);
        flush_key = lua_tolstring(L, -1, &fklen);
    }

    char *req = lua_newuserdatauv(L, auth_size + cmd_size + 1, 0);     /* [opts, cmds, req] */
    char *p = req;
    if (nauth)
        p = strings_write(p, auth, auth_len, nauth);
    for (lua_Integer i = 1; i <= ncmd; i++)
        p = command_write(L, cmds, i, p);

    struct resp_ctx *c = lua_newuserdatauv(L, sizeof *c, 0);            /* [opts, cmds, req, ctx] */
    memset(c, 0, sizeof *c);
    c->fd = -1;
    c->max = (size_t)max_reply;
    luaL_setmetatable(L, RESP_CALL_MT);
    int ctx_idx = lua_gettop(L);

    /* network phase: no Lua calls from here to the close */
    char peer[320];
    snprintf(peer, sizeof peer, "%s:%d", host, (int)port);
    double deadline = now_mono() + timeout;
    int fail = RESP_OK;
    if (use_pool)
        c->fd = pool_take(pool_key, klen);
    if (c->fd < 0)
        fail = resp_connect(c, host, (int)port, deadline);
    else
        nauth = 0;                              /* authenticated when it was made */
    size_t want_auth = nauth ? 1 : 0, auth_end = 0;
    if (!fail && nauth) {
        fail = resp_exchange(c, req, auth_size, 1, deadline, peer);
        auth_end = c->scan.pos;                 /* the scan stops right after the AUTH reply */
        if (!fail && c->buf[0] == '-') {
            /* the server's words, control bytes (a NUL would end the message) as '?' */
            const char *cr = find_crlf(c->buf, c->len);
            size_t n = 0;
            for (const char *q = c->buf + 1; q < cr && n + 1 < sizeof c->why; q++)
                c->why[n++] = (unsigned char)*q < 0x20 || *q == 0x7f ? '?' : *q;
            c->why[n] = '\0';
            if (n == 0)
                snprintf(c->why, sizeof c->why, "%.200s: AUTH refused (an empty error reply)", peer);
            fail = RESP_FAIL_AUTH;
        } else if (!fail && c->buf[0] != '+') {
            /* Only a status (+OK) means success; a bulk string or an array is not an answer to
             * AUTH, and its bytes must not be read as the commands' replies. */
            snprintf(c->why, sizeof c->why, "%.200s: AUTH answered with a '%c' reply, not +OK", peer, c->buf[0]);
            fail = RESP_FAIL_PROTOCOL;
        }
    }
    if (!fail && ncmd > 0)
        fail = resp_exchange(c, req + auth_size, cmd_size, want_auth + (size_t)ncmd, deadline, peer);
    if (!fail && flush)
        fail = flush_shared(c, flush_key, fklen, flush, flush_len, deadline, peer);
    if (!fail && keep && c->scan.pos == c->len) {
        pool_put(pool_key, klen, c->fd);
        c->fd = -1;
    }
    ctx_close_fd(c);
    if (fail) {
        char why[RESP_WHY];
        memcpy(why, c->why, sizeof why);
        ctx_free(c);
        return push_failure(L, fail, why);
    }

    /* the replies as Lua values (may raise: the buffer stays owned by ctx until then) */
    size_t pos = 0;
    if (want_auth)
        pos = auth_end;                                                 /* past +OK */
    lua_createtable(L, ncmd < INT_MAX ? (int)ncmd : INT_MAX, 0);
    for (lua_Integer i = 1; i <= ncmd; i++) {
        push_reply(L, c->buf, c->len, &pos);
        lua_rawseti(L, -2, i);
    }
    ctx_free((struct resp_ctx *)lua_touserdata(L, ctx_idx));           /* now, not at next GC */
    return 1;
}


int luaopen_forge_resp(lua_State *L)
{
    static const luaL_Reg lib[] = {
        {"call", l_resp_call},
        {NULL, NULL},
    };
    static const luaL_Reg meta[] = {
        {"__gc", l_call_gc},
        {NULL, NULL},
    };
    forge_newclass(L, RESP_CALL_MT, NULL, meta);
    luaL_newlib(L, lib);
    lua_pushinteger(L, RESP_MAX_REPLY);
    lua_setfield(L, -2, "MAX_REPLY");
    forge_setmodinfo(L, "forge.resp");
    return 1;
}
