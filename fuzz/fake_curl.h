/*
 * A stand-in for the libcurl transfer calls, for harnesses that #include a runtime file
 * (etcd.c, bosh.c) to drive its whole Lua API with no network: curl_easy_perform hands the
 * next answer parsed from the fuzz input to the write/header callbacks the code set. Build
 * with -DCURL_DISABLE_TYPECHECK (the Makefile does) so curl_easy_setopt is a plain function
 * here, and include this file BEFORE the runtime file.
 *
 * Input format (after the harness's own first line), answers separated by "\n%%\n":
 *   <http status> [<curl code> [<chunk size>]]\n      e.g. "200", "503", "0 7", "200 28 5"
 *   <header lines>\n                                    optional, e.g. "Location: /tasks/5"
 *   \n
 *   <body bytes>
 * curl code: 0 ok; 6, 7, 35, 58, 60, 77 fail before anything is sent (status 0, no data);
 * 52 the request was sent, no answer; 28, 56, 18 the answer (headers, body) arrives, then
 * the transfer fails. Chunk size: the body reaches the write callback in pieces of that
 * many bytes (0: all at once). No answer left: CURLE_COULDNT_CONNECT.
 */
#ifndef FORGE_FUZZ_FAKE_CURL_H
#define FORGE_FUZZ_FAKE_CURL_H

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include <curl/curl.h>

#ifndef CURL_DISABLE_TYPECHECK
#error "build with -DCURL_DISABLE_TYPECHECK"
#endif

#define FZ_MAX_ANSWERS 64

struct fz_answer {
    long status;
    int rc;
    size_t chunk;
    const char *hdr, *body;
    size_t hdrlen, len;
};

static struct fz_answer fz_answers[FZ_MAX_ANSWERS];
static int fz_nanswers, fz_next;
static long fz_status, fz_reqsize, fz_hdrsize;
static curl_write_callback fz_write, fz_header;
static void *fz_write_ud, *fz_header_ud;
static char *fz_errbuf;

static const char *fz_memmem(const char *h, size_t hn, const char *n, size_t nn)
{
    return memmem(h, hn, n, nn);
}

static long fz_number(const char **p, const char *end, long def)
{
    while (*p < end && **p == ' ')
        (*p)++;
    if (*p >= end || **p < '0' || **p > '9')
        return def;
    long v = 0;
    while (*p < end && **p >= '0' && **p <= '9') {
        if (v < 100000000)
            v = v * 10 + (**p - '0');
        (*p)++;
    }
    return v;
}

/* Parse the answers in s[0, n) (see the top of this file). */
static void fz_parse_answers(const char *s, size_t n)
{
    fz_nanswers = fz_next = 0;
    const char *end = s + n;
    while (s <= end && fz_nanswers < FZ_MAX_ANSWERS) {
        const char *sep = fz_memmem(s, (size_t)(end - s), "\n%%\n", 4);
        const char *bend = sep ? sep : end;
        struct fz_answer *a = &fz_answers[fz_nanswers++];
        memset(a, 0, sizeof *a);
        const char *nl = memchr(s, '\n', (size_t)(bend - s));
        const char *lend = nl ? nl : bend, *p = s;
        a->status = fz_number(&p, lend, 200);
        a->rc = (int)fz_number(&p, lend, 0);
        a->chunk = (size_t)fz_number(&p, lend, 0);
        const char *rest = nl ? nl + 1 : bend;
        if (rest < bend && *rest == '\n') {
            a->body = rest + 1;
        } else {
            const char *blank = fz_memmem(rest, (size_t)(bend - rest), "\n\n", 2);
            a->hdr = rest;
            a->hdrlen = (size_t)((blank ? blank + 1 : bend) - rest);
            a->body = blank ? blank + 2 : bend;
        }
        a->len = (size_t)(bend - a->body);
        if (!sep)
            break;
        s = sep + 4;
    }
}

static CURLcode fz_easy_setopt(CURL *h, CURLoption opt, ...)
{
    va_list ap;
    (void)h;
    va_start(ap, opt);
    switch (opt) {
    case CURLOPT_WRITEFUNCTION: fz_write = va_arg(ap, curl_write_callback); break;
    case CURLOPT_WRITEDATA: fz_write_ud = va_arg(ap, void *); break;
    case CURLOPT_HEADERFUNCTION: fz_header = va_arg(ap, curl_write_callback); break;
    case CURLOPT_HEADERDATA: fz_header_ud = va_arg(ap, void *); break;
    case CURLOPT_ERRORBUFFER: fz_errbuf = va_arg(ap, char *); break;
    default: break;
    }
    va_end(ap);
    return CURLE_OK;
}

static void fz_easy_reset(CURL *h)
{
    curl_easy_reset(h);
    fz_write = fz_header = NULL;
    fz_write_ud = fz_header_ud = NULL;
    fz_errbuf = NULL;
}

static CURLcode fz_fail(CURLcode rc, const char *why)
{
    if (fz_errbuf)
        snprintf(fz_errbuf, CURL_ERROR_SIZE, "fuzz: %s", why);
    return rc;
}

/* Deliver n bytes to a callback; 0 when it took them all. */
static int fz_deliver(curl_write_callback cb, void *ud, const char *p, size_t n)
{
    if (!cb || n == 0)
        return 0;
    return cb((char *)p, 1, n, ud) == n ? 0 : -1;
}

static CURLcode fz_easy_perform(CURL *h)
{
    (void)h;
    fz_status = fz_reqsize = fz_hdrsize = 0;
    if (fz_next >= fz_nanswers)
        return fz_fail(CURLE_COULDNT_CONNECT, "no answer left in the input");
    const struct fz_answer *a = &fz_answers[fz_next++];
    switch (a->rc) {
    case CURLE_COULDNT_RESOLVE_HOST: case CURLE_COULDNT_CONNECT: case CURLE_SSL_CONNECT_ERROR:
    case CURLE_SSL_CERTPROBLEM: case CURLE_PEER_FAILED_VERIFICATION: case CURLE_SSL_CACERT_BADFILE:
        return fz_fail((CURLcode)a->rc, "failed before sending");
    case CURLE_GOT_NOTHING:
        fz_reqsize = 100;
        return fz_fail(CURLE_GOT_NOTHING, "empty reply from server");
    case CURLE_OK: case CURLE_OPERATION_TIMEDOUT: case CURLE_RECV_ERROR: case CURLE_PARTIAL_FILE:
        break;
    default:
        return fz_fail(CURLE_COULDNT_CONNECT, "unmodelled curl code");
    }
    fz_reqsize = 100;
    fz_status = a->status;
    char line[64];
    int ln = snprintf(line, sizeof line, "HTTP/1.1 %ld Fuzz\r\n", a->status);
    fz_hdrsize = ln + 2;
    if (fz_deliver(fz_header, fz_header_ud, line, (size_t)ln) < 0)
        return fz_fail(CURLE_WRITE_ERROR, "header callback refused");
    for (const char *p = a->hdr, *e = a->hdr ? a->hdr + a->hdrlen : NULL; p && p < e;) {
        const char *nl = memchr(p, '\n', (size_t)(e - p));
        const char *le = nl ? nl + 1 : e;
        fz_hdrsize += (long)(le - p);
        if (fz_deliver(fz_header, fz_header_ud, p, (size_t)(le - p)) < 0)
            return fz_fail(CURLE_WRITE_ERROR, "header callback refused");
        p = le;
    }
    if (fz_deliver(fz_header, fz_header_ud, "\r\n", 2) < 0)
        return fz_fail(CURLE_WRITE_ERROR, "header callback refused");
    size_t step = a->chunk ? a->chunk : a->len;
    for (size_t off = 0; off < a->len; off += step) {
        size_t k = a->len - off < step ? a->len - off : step;
        if (fz_deliver(fz_write, fz_write_ud, a->body + off, k) < 0)
            return fz_fail(CURLE_WRITE_ERROR, "write callback refused");
    }
    return a->rc == CURLE_OK ? CURLE_OK : fz_fail((CURLcode)a->rc, "transfer broke after the answer");
}

static CURLcode fz_easy_getinfo(CURL *h, CURLINFO info, ...)
{
    va_list ap;
    (void)h;
    va_start(ap, info);
    long *out = va_arg(ap, long *);
    va_end(ap);
    switch (info) {
    case CURLINFO_RESPONSE_CODE: *out = fz_status; return CURLE_OK;
    case CURLINFO_REQUEST_SIZE: *out = fz_reqsize; return CURLE_OK;
    case CURLINFO_HEADER_SIZE: *out = fz_hdrsize; return CURLE_OK;
    default: return CURLE_UNKNOWN_OPTION;
    }
}

#undef curl_easy_setopt
#undef curl_easy_getinfo
#define curl_easy_setopt  fz_easy_setopt
#define curl_easy_perform fz_easy_perform
#define curl_easy_getinfo fz_easy_getinfo
#define curl_easy_reset   fz_easy_reset

#endif
