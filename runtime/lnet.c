/*
 * Network helpers shared by forge.proc (tcp_check) and forge.resp: one non-blocking connect
 * with a deadline.
 */
#include <errno.h>
#include <netdb.h>
#include <poll.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "lnet.h"

const char *forge_strerror(int err, char *buf, size_t len)
{
    /* GNU strerror_r (the Makefile defines _GNU_SOURCE): thread-safe, returns a pointer. */
    return strerror_r(err, buf, len);
}

static double now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1000 + ts.tv_nsec / 1e6;
}

/* Connect one address before `end` (monotonic ms). Returns the socket or -errno. */
static int connect_one(const struct addrinfo *ai, double end)
{
    int fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK, ai->ai_protocol);
    if (fd < 0)
        return -errno;
    int err = 0;
    if (connect(fd, ai->ai_addr, ai->ai_addrlen) < 0) {
        err = errno;
        if (err == EINPROGRESS) {
            struct pollfd pf = {.fd = fd, .events = POLLOUT};
            int n;
            do {
                double left = end - now_ms();
                n = poll(&pf, 1, left > 0 ? (int)left + 1 : 0);
            } while (n < 0 && errno == EINTR);
            if (n == 0) {
                err = ETIMEDOUT;
            } else if (n < 0) {
                err = errno;
            } else {
                socklen_t sl = sizeof err;
                if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &sl) < 0)
                    err = errno;
            }
        }
    }
    if (err == 0)
        return fd;
    close(fd);
    return -err;
}

int forge_tcp_connect(const char *host, int port, int timeout_ms, int *gai)
{
    char serv[8];
    snprintf(serv, sizeof serv, "%d", port);
    struct addrinfo hints, *res = NULL;
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_NUMERICSERV;
    *gai = getaddrinfo(host, serv, &hints, &res);
    if (*gai != 0)
        return -EHOSTUNREACH;
    double end = now_ms() + (timeout_ms > 0 ? timeout_ms : 0);
    int rc = -ECONNREFUSED;
    for (struct addrinfo *ai = res; ai; ai = ai->ai_next) {
        rc = connect_one(ai, end);
        if (rc >= 0 || rc == -ETIMEDOUT)
            break;                              /* the deadline is shared: nothing left */
    }
    freeaddrinfo(res);
    return rc;
}
