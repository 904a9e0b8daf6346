/*
 * TLS credentials of forge.http (GnuTLS, which libmicrohttpd speaks): the server's certificate
 * chain and key, and the CA that signs accepted client certificates. A set is immutable and
 * reference-counted: a reload swaps in a new set while connections keep the one their handshake
 * used, and a set is freed when its last connection closes.
 */
#ifndef FORGE_LTLS_H
#define FORGE_LTLS_H

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

#include <gnutls/gnutls.h>
#include <gnutls/abstract.h>

/* TLS 1.3 and 1.2 only, AEAD ciphers only, forward-secret (ECDHE) key exchange only. */
#define FORGE_TLS_PRIORITIES "NORMAL:-VERS-ALL:+VERS-TLS1.3:+VERS-TLS1.2:-CIPHER-ALL:+AES-256-GCM:+AES-128-GCM:" \
                             "+CHACHA20-POLY1305:-KX-ALL:+ECDHE-ECDSA:+ECDHE-RSA"

struct forge_tls_pem {
    const char *cert, *key, *client_ca;   /* PEM text; client_ca NULL: no client certificates */
    size_t cert_len, key_len, ca_len;
};

/* What a loaded server certificate says, for logs and the operator. */
struct forge_tls_info {
    char serial[80];                      /* hex */
    char subject[256];
    int64_t not_after;                    /* Unix time */
};

struct forge_tls_creds;

/* One server's current set, swapped under its lock. */
struct forge_tls_slot {
    pthread_mutex_t lock;
    struct forge_tls_creds *current;
};

enum forge_tls_peer { FORGE_TLS_PEER_NONE, FORGE_TLS_PEER_VERIFIED, FORGE_TLS_PEER_REFUSED };

/* Load and check a set: the key matches the first certificate, the CA holds at least one
 * certificate. 0, or -1 with a message in err. */
int forge_tls_creds_load(const struct forge_tls_pem *pem, struct forge_tls_creds **out, struct forge_tls_info *info,
                         char *err, size_t errlen);
void forge_tls_creds_unref(struct forge_tls_creds *c);
int forge_tls_creds_has_ca(const struct forge_tls_creds *c);

/* For a gnutls_certificate_retrieve_function2: the set's chain and key (owned by the set). */
void forge_tls_creds_select(struct forge_tls_creds *c, gnutls_pcert_st **pcert, unsigned *n, gnutls_privkey_t *key);

/* Whether the peer of session s sent a certificate the set's CA signed for client
 * authentication; when verified, its subject DN goes to dn. */
enum forge_tls_peer forge_tls_verify_peer(gnutls_session_t s, const struct forge_tls_creds *c, char *dn,
                                          size_t dnlen);

void forge_tls_slot_init(struct forge_tls_slot *slot, struct forge_tls_creds *c);   /* takes c */
struct forge_tls_creds *forge_tls_slot_acquire(struct forge_tls_slot *slot);        /* a new reference */
void forge_tls_slot_swap(struct forge_tls_slot *slot, struct forge_tls_creds *c);   /* takes c */
void forge_tls_slot_destroy(struct forge_tls_slot *slot);

#endif
