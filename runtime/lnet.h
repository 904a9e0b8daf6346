/*
 * Small network helpers shared by the runtime primitives (no Lua API of their own).
 */
#ifndef FORGE_LNET_H
#define FORGE_LNET_H

#include <stddef.h>

/* strerror_r, thread-safe (GNU flavour: returns a pointer into buf or a static string). */
const char *forge_strerror(int err, char *buf, size_t len);

/*
 * Connect to host:port over TCP (any address family, addresses tried in turn) within
 * timeout_ms, shared across the addresses. Returns a connected non-blocking CLOEXEC socket,
 * or -errno (-ETIMEDOUT when the time ran out); a name that does not resolve returns
 * -EHOSTUNREACH with its getaddrinfo code in *gai (0 otherwise).
 */
int forge_tcp_connect(const char *host, int port, int timeout_ms, int *gai);

#endif
