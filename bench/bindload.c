/*
 * Load for the binding rows of `make bench`: C connections (threads), each on one keep-alive
 * HTTP/1.1 connection, for S seconds: PUT a binding of a fresh id, then (mode bind_unbind)
 * DELETE it once the bind answered. wrk cannot do this with many connections: its script
 * state is per thread, and a response does not say which connection's request it answers.
 *   bindload HOST PORT AUTH INSTANCE SERVICE PLAN CONNECTIONS SECONDS bind|bind_unbind
 * Prints wrk-like lines: "N requests in", "Requests/sec:", latency percentiles, status counts.
 */
#define _GNU_SOURCE                     /* strcasestr */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_SAMPLES 2000000

static const char *host, *auth, *instance, *service, *plan;
static int port, unbind_too;
static double stop_at;

static double *samples;                 /* latency of every request, seconds */
static size_t nsamples;
static long statuses[600], failures;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static int dial(void)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((unsigned short)port)};
    inet_pton(AF_INET, host, &a.sin_addr);
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (connect(fd, (struct sockaddr *)&a, sizeof a) < 0) {
        close(fd);
        return -1;
    }
    return fd;
}

/* Send req, read one response (Content-Length framed). Returns the status, or -1. */
static int exchange(int fd, const char *req, size_t len)
{
    char buf[16384];
    size_t have = 0;
    if (send(fd, req, len, MSG_NOSIGNAL) != (ssize_t)len)
        return -1;
    for (;;) {
        ssize_t r = recv(fd, buf + have, sizeof buf - 1 - have, 0);
        if (r <= 0)
            return -1;
        have += (size_t)r;
        buf[have] = '\0';
        char *end = strstr(buf, "\r\n\r\n");
        if (!end)
            continue;
        const char *cl = strcasestr(buf, "\r\nContent-Length:");
        size_t body = cl && cl < end ? (size_t)strtoul(cl + 17, NULL, 10) : 0;
        if (have >= (size_t)(end + 4 - buf) + body)
            return atoi(buf + 9);
        if (have >= sizeof buf - 1)
            return -1;
    }
}

static void record(double took, int status)
{
    pthread_mutex_lock(&lock);
    if (nsamples < MAX_SAMPLES)
        samples[nsamples++] = took;
    if (status >= 100 && status < 600)
        statuses[status]++;
    else
        failures++;
    pthread_mutex_unlock(&lock);
}

static void *worker(void *arg)
{
    long id = (long)arg;
    char req[2048], body[512], path[512];
    int fd = dial();
    for (long n = 0; fd >= 0 && now() < stop_at; n++) {
        snprintf(path, sizeof path, "/v2/service_instances/%s/service_bindings/c%ld-%d-%ld", instance, id,
                 (int)getpid(), n);
        int blen = snprintf(body, sizeof body, "{\"service_id\":\"%s\",\"plan_id\":\"%s\"}", service, plan);
        int len = snprintf(req, sizeof req, "PUT %s HTTP/1.1\r\nHost: %s\r\nAuthorization: Basic %s\r\n"
                           "X-Broker-API-Version: 2.17\r\nContent-Type: application/json\r\n"
                           "Content-Length: %d\r\n\r\n%s", path, host, auth, blen, body);
        double t0 = now();
        int st = exchange(fd, req, (size_t)len);
        record(now() - t0, st);
        if (st < 0 || !unbind_too)
            continue;
        len = snprintf(req, sizeof req, "DELETE %s?service_id=%s&plan_id=%s HTTP/1.1\r\nHost: %s\r\n"
                       "Authorization: Basic %s\r\nX-Broker-API-Version: 2.17\r\n\r\n",
                       path, service, plan, host, auth);
        t0 = now();
        st = exchange(fd, req, (size_t)len);
        record(now() - t0, st);
        if (st < 0) {
            close(fd);
            fd = dial();
        }
    }
    if (fd >= 0)
        close(fd);
    return NULL;
}

static int by_value(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

int main(int argc, char **argv)
{
    if (argc != 10) {
        fprintf(stderr, "usage: bindload HOST PORT AUTH INSTANCE SERVICE PLAN CONNECTIONS SECONDS bind|bind_unbind\n");
        return 2;
    }
    host = argv[1], port = atoi(argv[2]), auth = argv[3], instance = argv[4], service = argv[5], plan = argv[6];
    int conns = atoi(argv[7]);
    double secs = atof(argv[8]);
    unbind_too = strcmp(argv[9], "bind_unbind") == 0;
    samples = malloc(MAX_SAMPLES * sizeof *samples);
    pthread_t *t = calloc((size_t)conns, sizeof *t);
    if (!samples || !t || conns < 1)
        return 1;
    double t0 = now();
    stop_at = t0 + secs;
    for (long i = 0; i < conns; i++)
        pthread_create(&t[i], NULL, worker, (void *)i);
    for (int i = 0; i < conns; i++)
        pthread_join(t[i], NULL);
    double took = now() - t0;
    qsort(samples, nsamples, sizeof *samples, by_value);
    printf("  %zu requests in %.2fs\n", nsamples, took);
    printf("Requests/sec: %.2f\n", (double)nsamples / took);
    static const int pct[] = {50, 90, 99};
    for (int i = 0; i < 3; i++)
        printf("     %d%%   %.2fms\n", pct[i], nsamples ? samples[(nsamples - 1) * (size_t)pct[i] / 100] * 1e3 : 0);
    printf("statuses:");
    for (int s = 100; s < 600; s++)
        if (statuses[s])
            printf(" %d x%ld", s, statuses[s]);
    printf("; connection errors: %ld\n", failures);
    return 0;
}
