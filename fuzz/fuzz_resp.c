/*
 * forge.resp's reply reader (RESP2), two ways:
 *  1. resp.call{} through the module's Lua API, with the TCP connect replaced by one end of
 *     a socketpair whose other end already holds the input's "server bytes" and is shut for
 *     writing (the server said everything, then closed): AUTH, pipelined commands, replies
 *     turned into Lua values. runtime/resp.c is compiled into this file to swap the connect.
 *  2. the scanner alone: scanning the bytes in pieces (as recv delivers them) ends exactly as
 *     scanning them at once, and push_reply reads no byte past what the scan accepted.
 *
 * Input: one line of options (fuzz/resp.lua), then the server bytes.
 */
#include <errno.h>
#include <fcntl.h>
#include <sys/socket.h>
#include <unistd.h>

#include "fuzz_lua.h"
#include "../runtime/lnet.h"

static const char *fz_server;
static size_t fz_server_len;
static int fz_peer = -1;

/* Connect: a socketpair; the peer end holds the server bytes and is shut for writing. */
static int fz_tcp_connect(const char *host, int port, int timeout_ms, int *gai)
{
    (void)host, (void)port, (void)timeout_ms;
    *gai = 0;
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0)
        return -errno;
    int size = 1 << 20;
    setsockopt(sv[1], SOL_SOCKET, SO_SNDBUF, &size, sizeof size);
    setsockopt(sv[0], SOL_SOCKET, SO_RCVBUF, &size, sizeof size);
    for (size_t off = 0; off < fz_server_len;) {
        ssize_t w = write(sv[1], fz_server + off, fz_server_len - off);
        if (w <= 0)
            abort();                    /* the input is capped below the socket buffer */
        off += (size_t)w;
    }
    shutdown(sv[1], SHUT_WR);
    if (fz_peer >= 0)
        close(fz_peer);
    fz_peer = sv[1];
    if (fcntl(sv[0], F_SETFL, fcntl(sv[0], F_GETFL) | O_NONBLOCK) != 0)
        abort();
    return sv[0];
}
#define forge_tcp_connect fz_tcp_connect

#include "../runtime/resp.c"

static lua_State *L;

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc, (void)argv;
    L = fuzz_lua_new();
    luaL_requiref(L, "forge.resp", luaopen_forge_resp, 0);
    lua_pop(L, 1);
    fuzz_lua_load(L, "resp.lua");
    return 0;
}

/* Property 2: piecewise scanning = scanning at once; push_reply stays inside the scan. */
static void check_scanner(const char *data, size_t len, size_t want, size_t max, unsigned step)
{
    struct resp_scan whole = {0}, parts = {0};
    const char *why1 = NULL, *why2 = NULL;
    int r1 = scan_replies(&whole, data, len, want, max, &why1);
    int r2 = 0;
    for (size_t n = 0; r2 == 0;) {
        n = n + step > len ? len : n + step;
        r2 = scan_replies(&parts, data, n, want, max, &why2);
        if (n == len)
            break;
    }
    if (r1 != r2 || (r1 == 0 && (whole.pos != parts.pos || whole.replies != parts.replies ||
                                 whole.depth != parts.depth))) {
        fprintf(stderr, "==fuzz== resp scan: at once rc=%d pos=%zu replies=%zu (%s); in pieces of %u rc=%d "
                "pos=%zu replies=%zu (%s)\n", r1, whole.pos, whole.replies, why1 ? why1 : "-", step, r2,
                parts.pos, parts.replies, why2 ? why2 : "-");
        abort();
    }
    /* with depth > 0, pos is inside an array still open (not the end of a reply) */
    if (r1 != 0 || whole.replies == 0 || whole.depth != 0)
        return;
    /* the accepted bytes alone, in a buffer of exactly that size (ASan sees any over-read) */
    char *copy = malloc(whole.pos);
    if (!copy)
        return;
    memcpy(copy, data, whole.pos);
    int top = lua_gettop(L);
    size_t pos = 0;
    for (size_t i = 0; i < whole.replies; i++)
        push_reply(L, copy, whole.pos, &pos);
    lua_settop(L, top);
    free(copy);
    if (pos != whole.pos) {
        fprintf(stderr, "==fuzz== resp: push_reply ended at %zu, the scan at %zu\n", pos, whole.pos);
        abort();
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size > 131072)
        return -1;
    const char *s = (const char *)data;
    const char *nl = memchr(s, '\n', size);
    size_t oplen = nl ? (size_t)(nl - s) : size;
    fz_server = nl ? nl + 1 : s + size;
    fz_server_len = nl ? size - oplen - 1 : 0;
    fuzz_lua_run(L, data, oplen, 0);
    if (fz_peer >= 0) {
        close(fz_peer);
        fz_peer = -1;
    }
    check_scanner(fz_server, fz_server_len, 1 + (size > 0 ? data[0] % 4 : 0), size % 3 ? 1 << 24 : 64,
                  1 + (unsigned)(size % 7));
    return 0;
}
