/*
 * TLS credential sets for forge.http (see ltls.h). GnuTLS does not copy what a certificate
 * callback hands it: a session uses the set's chain and key for as long as it lives, which is
 * why a connection holds a reference to its set until it closes.
 */
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <gnutls/x509.h>

#include "ltls.h"

#define MAX_CHAIN 16

struct forge_tls_creds {
    atomic_int refs;
    gnutls_pcert_st chain[MAX_CHAIN];
    unsigned chain_len;
    gnutls_privkey_t key;
    gnutls_x509_trust_list_t trust;       /* NULL: no client certificates */
};

static void creds_free(struct forge_tls_creds *c)
{
    for (unsigned i = 0; i < c->chain_len; i++)
        gnutls_pcert_deinit(&c->chain[i]);
    if (c->key)
        gnutls_privkey_deinit(c->key);
    if (c->trust)
        gnutls_x509_trust_list_deinit(c->trust, 1);
    free(c);
}

void forge_tls_creds_unref(struct forge_tls_creds *c)
{
    if (c && atomic_fetch_sub(&c->refs, 1) == 1)
        creds_free(c);
}

int forge_tls_creds_has_ca(const struct forge_tls_creds *c)
{
    return c->trust != NULL;
}

static int fail(char *err, size_t errlen, const char *what, int code)
{
    snprintf(err, errlen, "%s: %s", what, gnutls_strerror(code));
    return -1;
}

/* Whether the key's public half is the one in the first certificate. */
static int key_matches(struct forge_tls_creds *c)
{
    gnutls_pubkey_t pub;
    gnutls_datum_t mine = {NULL, 0}, theirs = {NULL, 0};
    int same = 0;
    if (gnutls_pubkey_init(&pub) < 0)
        return 0;
    if (gnutls_pubkey_import_privkey(pub, c->key, 0, 0) == 0 &&
        gnutls_pubkey_export2(pub, GNUTLS_X509_FMT_DER, &mine) == 0 &&
        gnutls_pubkey_export2(c->chain[0].pubkey, GNUTLS_X509_FMT_DER, &theirs) == 0)
        same = mine.size == theirs.size && memcmp(mine.data, theirs.data, mine.size) == 0;
    gnutls_free(mine.data);
    gnutls_free(theirs.data);
    gnutls_pubkey_deinit(pub);
    return same;
}

static void describe(const gnutls_pcert_st *pcert, struct forge_tls_info *info)
{
    gnutls_x509_crt_t crt;
    memset(info, 0, sizeof *info);
    if (gnutls_pcert_export_x509((gnutls_pcert_st *)pcert, &crt) < 0)
        return;
    unsigned char serial[40];
    size_t n = sizeof serial;
    if (gnutls_x509_crt_get_serial(crt, serial, &n) == 0)
        for (size_t i = 0; i < n && 2 * i + 2 < sizeof info->serial; i++)
            snprintf(info->serial + 2 * i, 3, "%02x", serial[i]);
    gnutls_datum_t dn = {NULL, 0};
    if (gnutls_x509_crt_get_dn3(crt, &dn, 0) == 0)
        snprintf(info->subject, sizeof info->subject, "%.*s", (int)dn.size, (const char *)dn.data);
    gnutls_free(dn.data);
    info->not_after = (int64_t)gnutls_x509_crt_get_expiration_time(crt);
    gnutls_x509_crt_deinit(crt);
}

static int load_ca(struct forge_tls_creds *c, const struct forge_tls_pem *pem, char *err, size_t errlen)
{
    gnutls_datum_t ca = {(unsigned char *)pem->client_ca, (unsigned)pem->ca_len};
    int ret = gnutls_x509_trust_list_init(&c->trust, 0);
    if (ret < 0)
        return fail(err, errlen, "tls.client_ca: not usable PEM certificates", ret);
    ret = gnutls_x509_trust_list_add_trust_mem(c->trust, &ca, NULL, GNUTLS_X509_FMT_PEM, 0, 0);
    if (ret < 0)
        return fail(err, errlen, "tls.client_ca: not usable PEM certificates", ret);
    if (ret == 0) {
        snprintf(err, errlen, "tls.client_ca: no PEM certificate in it");
        return -1;
    }
    return 0;
}

int forge_tls_creds_load(const struct forge_tls_pem *pem, struct forge_tls_creds **out, struct forge_tls_info *info,
                         char *err, size_t errlen)
{
    struct forge_tls_creds *c = calloc(1, sizeof *c);
    if (!c) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    atomic_init(&c->refs, 1);
    gnutls_datum_t cert = {(unsigned char *)pem->cert, (unsigned)pem->cert_len};
    gnutls_datum_t key = {(unsigned char *)pem->key, (unsigned)pem->key_len};
    c->chain_len = MAX_CHAIN;
    int ret = gnutls_pcert_list_import_x509_raw(c->chain, &c->chain_len, &cert, GNUTLS_X509_FMT_PEM, 0);
    if (ret < 0) {
        c->chain_len = 0;
        fail(err, errlen, "tls.cert: not a usable PEM certificate", ret);
        goto bad;
    }
    if ((ret = gnutls_privkey_init(&c->key)) < 0 ||
        (ret = gnutls_privkey_import_x509_raw(c->key, &key, GNUTLS_X509_FMT_PEM, NULL, 0)) < 0) {
        fail(err, errlen, "tls.key: not a usable PEM private key (unencrypted)", ret);
        goto bad;
    }
    if (!key_matches(c)) {
        snprintf(err, errlen, "tls.key: it is not the key of the certificate (the first one in tls.cert)");
        goto bad;
    }
    if (pem->client_ca && load_ca(c, pem, err, errlen) != 0)
        goto bad;
    if (info)
        describe(&c->chain[0], info);
    *out = c;
    return 0;
bad:
    creds_free(c);
    return -1;
}

void forge_tls_creds_select(struct forge_tls_creds *c, gnutls_pcert_st **pcert, unsigned *n, gnutls_privkey_t *key)
{
    *pcert = c->chain;
    *n = c->chain_len;
    *key = c->key;
}

enum forge_tls_peer forge_tls_verify_peer(gnutls_session_t s, const struct forge_tls_creds *c, char *dn,
                                          size_t dnlen)
{
    unsigned n = 0;
    const gnutls_datum_t *raw = gnutls_certificate_get_peers(s, &n);
    if (!raw || n == 0)
        return FORGE_TLS_PEER_NONE;
    if (!c->trust)
        return FORGE_TLS_PEER_REFUSED;
    if (n > MAX_CHAIN)
        n = MAX_CHAIN;
    gnutls_x509_crt_t crts[MAX_CHAIN];
    unsigned imported = 0;
    enum forge_tls_peer result = FORGE_TLS_PEER_REFUSED;
    for (; imported < n; imported++) {
        if (gnutls_x509_crt_init(&crts[imported]) < 0)
            goto out;
        if (gnutls_x509_crt_import(crts[imported], &raw[imported], GNUTLS_X509_FMT_DER) < 0) {
            imported++;
            goto out;
        }
    }
    gnutls_typed_vdata_st purpose = {GNUTLS_DT_KEY_PURPOSE_OID, (unsigned char *)GNUTLS_KP_TLS_WWW_CLIENT, 0};
    unsigned status = 0;
    if (gnutls_x509_trust_list_verify_crt2(c->trust, crts, n, &purpose, 1, 0, &status, NULL) == 0 && status == 0) {
        gnutls_datum_t subject = {NULL, 0};
        dn[0] = '\0';
        if (gnutls_x509_crt_get_dn3(crts[0], &subject, 0) == 0)
            snprintf(dn, dnlen, "%.*s", (int)subject.size, (const char *)subject.data);
        gnutls_free(subject.data);
        result = FORGE_TLS_PEER_VERIFIED;
    }
out:
    for (unsigned i = 0; i < imported; i++)
        gnutls_x509_crt_deinit(crts[i]);
    return result;
}

void forge_tls_slot_init(struct forge_tls_slot *slot, struct forge_tls_creds *c)
{
    pthread_mutex_init(&slot->lock, NULL);
    slot->current = c;
}

struct forge_tls_creds *forge_tls_slot_acquire(struct forge_tls_slot *slot)
{
    pthread_mutex_lock(&slot->lock);
    struct forge_tls_creds *c = slot->current;
    atomic_fetch_add(&c->refs, 1);
    pthread_mutex_unlock(&slot->lock);
    return c;
}

void forge_tls_slot_swap(struct forge_tls_slot *slot, struct forge_tls_creds *c)
{
    pthread_mutex_lock(&slot->lock);
    struct forge_tls_creds *old = slot->current;
    slot->current = c;
    pthread_mutex_unlock(&slot->lock);
    forge_tls_creds_unref(old);
}

void forge_tls_slot_destroy(struct forge_tls_slot *slot)
{
    forge_tls_creds_unref(slot->current);
    slot->current = NULL;
    pthread_mutex_destroy(&slot->lock);
}
