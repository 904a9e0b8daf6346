/*
 * The process-wide Prometheus registry behind forge.metrics (include/forge/metrics.h).
 *
 * Our own because no C library in Debian does this: prometheus-cpp is C++, the C client
 * (libprom) is not packaged, and neither keeps membership gauges (counts of members by label
 * set, moved incrementally) or exposes an age-of-oldest-member gauge.
 *
 * One mutex guards everything; every call holds it for a few hash lookups, render for one
 * walk over the series (never over the members). Families live in description order with a
 * hash index by name; each family indexes its series by rendered label string and keeps them
 * in creation order, and a tracked family indexes its members by id. A member is also linked
 * into its label set's series, so the age of the oldest member is a scan of that set alone.
 * Families are never removed while the process runs; the destructor frees everything when
 * the object is unloaded (dlclose of a module .so) or the process exits.
 */
#include <dirent.h>
#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#include "forge/forge.h"
#include "forge/metrics.h"

#define DROPPED_NAME "forge_metrics_series_dropped_total"
#define DROPPED_HELP "Series updates dropped because their family had reached its series cap, by family."
#define OLDEST_HELP  "Seconds since the oldest member of %s in each label set entered it."

static const double default_buckets[] = {.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10};

static const char *const kind_names[] = {"counter", "gauge", "histogram"};


/* ------------------------------------------------------------------------ */
/* hash index (chained; entries embed the node first)                       */
/* ------------------------------------------------------------------------ */

struct hnode {
    struct hnode *next;         /* in its bucket */
    uint64_t hash;
    const char *key;            /* NUL-terminated, stored in the entry */
};

struct htab {
    struct hnode **buckets;
    size_t nbuckets;            /* 0 or a power of two */
    size_t count;
};


static uint64_t hash_key(const char *s)
{
    uint64_t h = 1469598103934665603ULL;               /* FNV-1a */
    for (; *s; s++) {
        h ^= (unsigned char)*s;
        h *= 1099511628211ULL;
    }
    return h;
}


static struct hnode *htab_find(const struct htab *t, const char *key, uint64_t hash)
{
    if (!t->nbuckets)
        return NULL;
    for (struct hnode *n = t->buckets[hash & (t->nbuckets - 1)]; n; n = n->next)
        if (n->hash == hash && strcmp(n->key, key) == 0)
            return n;
    return NULL;
}


/* Double the buckets (16 at first). -ENOMEM leaves the table as it was. */
static int htab_grow(struct htab *t)
{
    size_t nb = t->nbuckets ? t->nbuckets * 2 : 16;
    struct hnode **b = calloc(nb, sizeof *b);
    if (!b)
        return -ENOMEM;
    for (size_t i = 0; i < t->nbuckets; i++) {
        struct hnode *next;
        for (struct hnode *n = t->buckets[i]; n; n = next) {
            next = n->next;
            n->next = b[n->hash & (nb - 1)];
            b[n->hash & (nb - 1)] = n;
        }
    }
    free(t->buckets);
    t->buckets = b;
    t->nbuckets = nb;
    return 0;
}


/* Add n, whose key is not in t yet (n->hash and n->key set). */
static int htab_add(struct htab *t, struct hnode *n)
{
    if (t->count >= t->nbuckets && htab_grow(t) < 0)
        return -ENOMEM;
    struct hnode **head = &t->buckets[n->hash & (t->nbuckets - 1)];
    n->next = *head;
    *head = n;
    t->count++;
    return 0;
}


static void htab_remove(struct htab *t, struct hnode *n)
{
    struct hnode **p = &t->buckets[n->hash & (t->nbuckets - 1)];
    while (*p != n)
        p = &(*p)->next;
    *p = n->next;
    t->count--;
}


/* Free every entry (each one allocation starting with its node) and the buckets. */
static void htab_free_all(struct htab *t)
{
    for (size_t i = 0; i < t->nbuckets; i++) {
        struct hnode *next;
        for (struct hnode *n = t->buckets[i]; n; n = next) {
            next = n->next;
            free(n);
        }
    }
    free(t->buckets);
    memset(t, 0, sizeof *t);
}


/* ------------------------------------------------------------------------ */
/* registry                                                                 */
/* ------------------------------------------------------------------------ */

/* What a gauge is used for, fixed by its first use: set/add, track, or derived from a tracked one. */
enum role { ROLE_UNUSED, ROLE_VALUES, ROLE_TRACKED, ROLE_DERIVED };

struct member;

struct series {
    struct hnode node;          /* key: the rendered labels, stored after counts[] */
    struct series *next;        /* in its family, in creation order */
    struct member *members;     /* tracked family: the members with these labels */
    double value;               /* counter, gauge; tracked: the member count */
    double sum;                 /* histogram */
    uint64_t counts[];          /* histogram: per bucket, not cumulative; the last one is +Inf */
};

struct member {
    struct hnode node;          /* key: id[] */
    struct series *tuple;       /* the label set it counts in */
    struct member *prev, *next; /* in tuple->members */
    double since;               /* unix seconds it entered tuple */
    char id[];
};

struct family {
    struct hnode node;          /* key: name[] */
    struct family *next;        /* in description order */
    enum forge_metric_kind kind;
    enum role role;
    char *help;
    double *bounds;             /* histogram: upper bounds, ascending (+Inf implicit) */
    size_t nbounds;
    struct family *oldest;      /* tracked: its derived age gauge, or NULL */
    struct family *source;      /* derived: the tracked family it reads */
    struct htab series;
    struct series *first, *last;
    struct htab members;        /* tracked: by id */
    char name[];
};

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;

/* Everything below is guarded by lock. */
static struct {
    struct htab families;
    struct family *first, *last;
    struct family *dropped;     /* DROPPED_NAME, described with the first family */
} reg;


static double now_unix(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}


/* [a-zA-Z_:][a-zA-Z0-9_:]* for metrics (colon), [a-zA-Z_][a-zA-Z0-9_]* for labels; capped. */
static int valid_name(const char *s, int colon)
{
    size_t n = 0;
    for (; s[n]; n++) {
        int c = (unsigned char)s[n];
        int ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' || (colon && c == ':') ||
                 (n > 0 && c >= '0' && c <= '9');
        if (!ok)
            return 0;
    }
    return n > 0 && n <= FORGE_METRICS_MAX_NAME;
}


/* Append s[0..n) at out+*len within the label string's cap. Returns 0 or -EINVAL (too long). */
static int put(char *out, size_t *len, const char *s, size_t n)
{
    if (*len + n > FORGE_METRICS_MAX_LABELS_LEN)
        return -EINVAL;
    memcpy(out + *len, s, n);
    *len += n;
    return 0;
}


/* Append value as an escaped label value (\\ \" \n); -EINVAL unless it is UTF-8 and fits. */
static int put_value(char *out, size_t *len, const char *value)
{
    size_t left = strlen(value);
    for (const unsigned char *p = (const unsigned char *)value; left;) {
        size_t n = forge_utf8_len(p, left);
        if (n == 0)
            return -EINVAL;
        const char *esc = *p == '\\' ? "\\\\" : *p == '"' ? "\\\"" : *p == '\n' ? "\\n" : NULL;
        int rc = esc ? put(out, len, esc, 2) : put(out, len, (const char *)p, n);
        if (rc < 0)
            return rc;
        p += n;
        left -= n;
    }
    return 0;
}


/*
 * The series key of a label set in out[FORGE_METRICS_MAX_LABELS_LEN + 1]: name="value" pairs
 * sorted by name, comma-separated, no braces. `reserved` is one more refused name (NULL: none).
 * Returns 0 or -EINVAL.
 */
static int format_labels(char *out, const struct forge_label *labels, size_t n, const char *reserved)
{
    const struct forge_label *sorted[FORGE_METRICS_MAX_LABELS];
    if (n > FORGE_METRICS_MAX_LABELS)
        return -EINVAL;
    for (size_t i = 0; i < n; i++) {
        const char *name = labels[i].name;
        if (!valid_name(name, 0) || strncmp(name, "__", 2) == 0 || (reserved && strcmp(name, reserved) == 0))
            return -EINVAL;
        size_t j = i;                                   /* insertion sort: n is small */
        while (j > 0 && strcmp(sorted[j - 1]->name, name) > 0) {
            sorted[j] = sorted[j - 1];
            j--;
        }
        if (j > 0 && strcmp(sorted[j - 1]->name, name) == 0)
            return -EINVAL;                             /* repeated */
        sorted[j] = &labels[i];
    }
    size_t len = 0;
    int rc = 0;
    for (size_t i = 0; i < n && rc == 0; i++) {
        rc = (i > 0 ? put(out, &len, ",", 1) : 0);
        if (rc == 0)
            rc = put(out, &len, sorted[i]->name, strlen(sorted[i]->name));
        if (rc == 0)
            rc = put(out, &len, "=\"", 2);
        if (rc == 0)
            rc = put_value(out, &len, sorted[i]->value);
        if (rc == 0)
            rc = put(out, &len, "\"", 1);
    }
    out[len] = '\0';
    return rc;
}


static struct family *find_family(const char *name)
{
    return name ? (struct family *)htab_find(&reg.families, name, hash_key(name)) : NULL;
}


static struct series *find_series(const struct family *f, const char *key)
{
    return (struct series *)htab_find(&f->series, key, hash_key(key));
}


/* A family with no series, not yet in the registry; NULL when out of memory. */
static struct family *new_family(const char *name, enum forge_metric_kind kind, const char *help,
                                 const double *bounds, size_t nbounds)
{
    size_t len = strlen(name) + 1;
    struct family *f = calloc(1, sizeof *f + len);
    if (!f)
        return NULL;
    memcpy(f->name, name, len);
    f->node.key = f->name;
    f->node.hash = hash_key(name);
    f->kind = kind;
    f->role = kind == FORGE_METRIC_GAUGE ? ROLE_UNUSED : ROLE_VALUES;
    f->help = strdup(help);
    f->nbounds = nbounds;
    f->bounds = nbounds ? malloc(nbounds * sizeof *bounds) : NULL;
    if (!f->help || (nbounds && !f->bounds)) {
        free(f->help);
        free(f->bounds);
        free(f);
        return NULL;
    }
    if (nbounds)
        memcpy(f->bounds, bounds, nbounds * sizeof *bounds);
    return f;
}


static void free_family(struct family *f)
{
    htab_free_all(&f->members);
    struct series *next;
    for (struct series *s = f->first; s; s = next) {
        next = s->next;
        free(s);
    }
    free(f->series.buckets);
    free(f->help);
    free(f->bounds);
    free(f);
}


/* Put f into the registry (last in description order); frees it when out of memory. */
static int add_family(struct family *f)
{
    if (htab_add(&reg.families, &f->node) < 0) {
        free_family(f);
        return -ENOMEM;
    }
    if (reg.last)
        reg.last->next = f;
    else
        reg.first = f;
    reg.last = f;
    return 0;
}


/* Describe the registry's own family, once. */
static int ensure_dropped_family(void)
{
    if (reg.dropped)
        return 0;
    struct family *f = new_family(DROPPED_NAME, FORGE_METRIC_COUNTER, DROPPED_HELP, NULL, 0);
    if (!f || add_family(f) < 0)
        return -ENOMEM;
    reg.dropped = f;
    return 0;
}


__attribute__((destructor)) static void free_registry(void)
{
    pthread_mutex_lock(&lock);
    struct family *next;
    for (struct family *f = reg.first; f; f = next) {
        next = f->next;
        free_family(f);
    }
    free(reg.families.buckets);
    memset(&reg, 0, sizeof reg);
    pthread_mutex_unlock(&lock);
}


static void count_drop(struct family *f);

/*
 * The series of f with key `key`, created at 0 when new. NULL with *rc = -ENOSPC (f is at its
 * cap: counted) or -ENOMEM.
 */
static struct series *get_series(struct family *f, const char *key, int *rc)
{
    struct series *s = find_series(f, key);
    if (s)
        return s;
    if (f->series.count >= FORGE_METRICS_MAX_SERIES) {
        count_drop(f);
        *rc = -ENOSPC;
        return NULL;
    }
    size_t ncounts = f->kind == FORGE_METRIC_HISTOGRAM ? f->nbounds + 1 : 0;
    size_t len = strlen(key) + 1;
    s = calloc(1, sizeof *s + ncounts * sizeof s->counts[0] + len);
    if (!s) {
        *rc = -ENOMEM;
        return NULL;
    }
    char *stored = (char *)(s->counts + ncounts);
    memcpy(stored, key, len);
    s->node.key = stored;
    s->node.hash = hash_key(key);
    if (htab_add(&f->series, &s->node) < 0) {
        free(s);
        *rc = -ENOMEM;
        return NULL;
    }
    if (f->last)
        f->last->next = s;
    else
        f->first = s;
    f->last = s;
    return s;
}


/* forge_metrics_series_dropped_total{family=f} += 1 (not for its own drops, which cannot happen). */
static void count_drop(struct family *f)
{
    char key[FORGE_METRICS_MAX_LABELS_LEN + 1];
    const struct forge_label label = {"family", f->name};
    int rc = 0;
    if (f == reg.dropped || format_labels(key, &label, 1, NULL) < 0)
        return;
    struct series *s = get_series(reg.dropped, key, &rc);
    if (s)
        s->value += 1;
}


/* ------------------------------------------------------------------------ */
/* describe                                                                 */
/* ------------------------------------------------------------------------ */

static int builtin_name(const char *name);


static int valid_buckets(const double *b, size_t n)
{
    if (n > FORGE_METRICS_MAX_BUCKETS)
        return 0;
    for (size_t i = 0; i < n; i++)
        if (!isfinite(b[i]) || (i > 0 && !(b[i] > b[i - 1])))
            return 0;
    return 1;
}


/* Describing f again: the same kind, buckets and oldest family, or -EEXIST. A new help replaces the old. */
static int redescribe(struct family *f, enum forge_metric_kind kind, const char *help, const double *bounds,
                      size_t nbounds, const char *oldest)
{
    int same_oldest = f->oldest ? oldest && strcmp(f->oldest->name, oldest) == 0 : !oldest;
    if (f->kind != kind || f->nbounds != nbounds || !same_oldest ||
        (nbounds && memcmp(f->bounds, bounds, nbounds * sizeof *bounds) != 0))
        return -EEXIST;
    if (strcmp(f->help, help) != 0) {
        char *h = strdup(help);
        if (!h)
            return -ENOMEM;
        free(f->help);
        f->help = h;
    }
    return 0;
}


/* The derived gauge `name` for tracked family f: an unused gauge described before, or a new one. */
static struct family *derived_family(struct family *f, const char *name, int *rc)
{
    struct family *d = find_family(name);
    if (d) {
        if (d->kind != FORGE_METRIC_GAUGE || d->role != ROLE_UNUSED) {
            *rc = -EEXIST;
            return NULL;
        }
    } else {
        char *help;
        if (asprintf(&help, OLDEST_HELP, f->name) < 0) {
            *rc = -ENOMEM;
            return NULL;
        }
        d = new_family(name, FORGE_METRIC_GAUGE, help, NULL, 0);
        free(help);
        if (!d || add_family(d) < 0) {
            *rc = -ENOMEM;
            return NULL;
        }
    }
    return d;
}


static int describe_locked(const char *name, enum forge_metric_kind kind, const char *help,
                           const double *bounds, size_t nbounds, const char *oldest)
{
    if (builtin_name(name) || (oldest && builtin_name(oldest)))
        return -EEXIST;
    int rc = ensure_dropped_family();
    if (rc < 0)
        return rc;
    struct family *f = find_family(name);
    if (f)
        return redescribe(f, kind, help, bounds, nbounds, oldest);
    f = new_family(name, kind, help, bounds, nbounds);
    if (!f)
        return -ENOMEM;
    struct family *d = oldest ? derived_family(f, oldest, &rc) : NULL;
    if (oldest && !d) {
        free_family(f);
        return rc;
    }
    if ((rc = add_family(f)) < 0)
        return rc;                  /* d stays, an unused gauge */
    if (d) {
        f->role = ROLE_TRACKED;
        f->oldest = d;
        d->role = ROLE_DERIVED;
        d->source = f;
    }
    return 0;
}


int forge_metrics_describe(const char *name, enum forge_metric_kind kind, const char *help,
                           const double *buckets, size_t nbuckets, const char *oldest)
{
    if (!name || !help || !valid_name(name, 1) || (unsigned)kind > FORGE_METRIC_HISTOGRAM ||
        (kind != FORGE_METRIC_HISTOGRAM && nbuckets) || (oldest && kind != FORGE_METRIC_GAUGE) ||
        (oldest && (!valid_name(oldest, 1) || strcmp(oldest, name) == 0)) || !valid_buckets(buckets, nbuckets))
        return -EINVAL;
    if (kind == FORGE_METRIC_HISTOGRAM && nbuckets == 0) {
        buckets = default_buckets;
        nbuckets = sizeof default_buckets / sizeof default_buckets[0];
    }
    pthread_mutex_lock(&lock);
    int rc = describe_locked(name, kind, help, buckets, nbuckets, oldest);
    pthread_mutex_unlock(&lock);
    return rc;
}


/* ------------------------------------------------------------------------ */
/* counters, gauges, histograms                                             */
/* ------------------------------------------------------------------------ */

enum op { OP_INC, OP_SET, OP_ADD, OP_OBSERVE };


/* 0 when op suits f, else -EPERM. */
static int check_op(const struct family *f, enum op op)
{
    switch (op) {
    case OP_INC:
        return f->kind == FORGE_METRIC_COUNTER ? 0 : -EPERM;
    case OP_OBSERVE:
        return f->kind == FORGE_METRIC_HISTOGRAM ? 0 : -EPERM;
    default:
        return f->kind == FORGE_METRIC_GAUGE && (f->role == ROLE_UNUSED || f->role == ROLE_VALUES) ? 0 : -EPERM;
    }
}


static void apply(struct family *f, struct series *s, enum op op, double v)
{
    size_t i = 0;
    switch (op) {
    case OP_SET:
        s->value = v;
        f->role = ROLE_VALUES;
        break;
    case OP_ADD:
        f->role = ROLE_VALUES;
        /* fall through */
    case OP_INC:
        s->value += v;
        break;
    case OP_OBSERVE:
        while (i < f->nbounds && v > f->bounds[i])
            i++;
        s->counts[i]++;
        s->sum += v;
        break;
    }
}


static int update(const char *name, const struct forge_label *labels, size_t nlabels, enum op op, double v)
{
    char key[FORGE_METRICS_MAX_LABELS_LEN + 1];
    pthread_mutex_lock(&lock);
    struct family *f = find_family(name);
    int rc = f ? check_op(f, op) : -ENOENT;
    if (rc == 0)
        rc = format_labels(key, labels, nlabels, f->kind == FORGE_METRIC_HISTOGRAM ? "le" : NULL);
    struct series *s = rc == 0 ? get_series(f, key, &rc) : NULL;
    if (s)
        apply(f, s, op, v);
    pthread_mutex_unlock(&lock);
    return rc;
}


int forge_metrics_inc(const char *name, const struct forge_label *labels, size_t nlabels, double by)
{
    return by >= 0 && isfinite(by) ? update(name, labels, nlabels, OP_INC, by) : -EINVAL;
}


int forge_metrics_set(const char *name, const struct forge_label *labels, size_t nlabels, double v)
{
    return update(name, labels, nlabels, OP_SET, v);
}


int forge_metrics_add(const char *name, const struct forge_label *labels, size_t nlabels, double delta)
{
    return update(name, labels, nlabels, OP_ADD, delta);
}


int forge_metrics_observe(const char *name, const struct forge_label *labels, size_t nlabels, double v)
{
    return isnan(v) ? -EINVAL : update(name, labels, nlabels, OP_OBSERVE, v);
}


/* ------------------------------------------------------------------------ */
/* membership gauges                                                        */
/* ------------------------------------------------------------------------ */

/* The tracked gauge `name` (a gauge not used otherwise); NULL with *rc = -ENOENT or -EPERM. */
static struct family *tracked_family(const char *name, int *rc)
{
    struct family *f = find_family(name);
    if (!f)
        *rc = -ENOENT;
    else if (f->kind != FORGE_METRIC_GAUGE || (f->role != ROLE_UNUSED && f->role != ROLE_TRACKED))
        *rc = -EPERM;
    return *rc ? NULL : f;
}


static void join_tuple(struct member *m, struct series *s)
{
    m->tuple = s;
    m->prev = NULL;
    m->next = s->members;
    if (s->members)
        s->members->prev = m;
    s->members = m;
    s->value += 1;
}


static void leave_tuple(struct member *m)
{
    struct series *s = m->tuple;
    if (m->prev)
        m->prev->next = m->next;
    else
        s->members = m->next;
    if (m->next)
        m->next->prev = m->prev;
    s->value -= 1;
    m->tuple = NULL;
}


static void drop_member(struct family *f, struct member *m)
{
    leave_tuple(m);
    htab_remove(&f->members, &m->node);
    free(m);
}


/* A member of f in no label set yet; NULL when out of memory. */
static struct member *new_member(struct family *f, const char *id)
{
    size_t len = strlen(id) + 1;
    struct member *m = calloc(1, sizeof *m + len);
    if (!m)
        return NULL;
    memcpy(m->id, id, len);
    m->node.key = m->id;
    m->node.hash = hash_key(id);
    if (htab_add(&f->members, &m->node) < 0) {
        free(m);
        return NULL;
    }
    return m;
}


/* Member id of f into the label set `key` (a member dropped at the series cap leaves its old set). */
static int move_member(struct family *f, const char *id, const char *key, double since)
{
    struct member *m = (struct member *)htab_find(&f->members, id, hash_key(id));
    int rc = 0;
    struct series *s = get_series(f, key, &rc);
    if (!s) {
        if (m)
            drop_member(f, m);
        return rc;
    }
    f->role = ROLE_TRACKED;
    if (m && m->tuple == s) {
        if (!isnan(since))
            m->since = since;
        return 0;
    }
    if (m)
        leave_tuple(m);
    else if (!(m = new_member(f, id)))
        return -ENOMEM;
    m->since = isnan(since) ? now_unix() : since;
    join_tuple(m, s);
    return 0;
}


int forge_metrics_track(const char *name, const char *id, const struct forge_label *labels, size_t nlabels,
                        double since)
{
    char key[FORGE_METRICS_MAX_LABELS_LEN + 1];
    if (!id || (!isnan(since) && !isfinite(since)))
        return -EINVAL;
    pthread_mutex_lock(&lock);
    int rc = 0;
    struct family *f = tracked_family(name, &rc);
    if (f && !isnan(since) && !f->oldest)
        rc = -EPERM;
    if (rc == 0)
        rc = format_labels(key, labels, nlabels, NULL);
    if (rc == 0)
        rc = move_member(f, id, key, since);
    pthread_mutex_unlock(&lock);
    return rc;
}


int forge_metrics_untrack(const char *name, const char *id)
{
    if (!id)
        return -EINVAL;
    pthread_mutex_lock(&lock);
    int rc = 0;
    struct family *f = tracked_family(name, &rc);
    struct member *m = f ? (struct member *)htab_find(&f->members, id, hash_key(id)) : NULL;
    if (m)
        drop_member(f, m);
    pthread_mutex_unlock(&lock);
    return rc;
}


int forge_metrics_forget(const char *name)
{
    pthread_mutex_lock(&lock);
    int rc = 0;
    struct family *f = tracked_family(name, &rc);
    if (f) {
        htab_free_all(&f->members);
        for (struct series *s = f->first; s; s = s->next) {
            s->members = NULL;
            s->value = 0;
        }
    }
    pthread_mutex_unlock(&lock);
    return rc;
}


/* The smallest since among the members of s (s has members). */
static double oldest_since(const struct series *s)
{
    double min = s->members->since;
    for (const struct member *m = s->members->next; m; m = m->next)
        if (m->since < min)
            min = m->since;
    return min;
}


/* ------------------------------------------------------------------------ */
/* value                                                                    */
/* ------------------------------------------------------------------------ */

static uint64_t histogram_count(const struct family *f, const struct series *s)
{
    uint64_t n = 0;
    for (size_t i = 0; i <= f->nbounds; i++)
        n += s->counts[i];
    return n;
}


static int value_locked(const char *name, const struct forge_label *labels, size_t nlabels, double *value,
                        double *sum)
{
    char key[FORGE_METRICS_MAX_LABELS_LEN + 1];
    struct family *f = find_family(name);
    if (!f)
        return -ENOENT;
    int rc = format_labels(key, labels, nlabels, f->kind == FORGE_METRIC_HISTOGRAM ? "le" : NULL);
    if (rc < 0)
        return rc;
    const struct series *s = find_series(f->role == ROLE_DERIVED ? f->source : f, key);
    if (!s || (f->role == ROLE_DERIVED && !s->members))
        return -ENODATA;
    if (f->role == ROLE_DERIVED) {
        *value = now_unix() - oldest_since(s);
    } else if (f->kind == FORGE_METRIC_HISTOGRAM) {
        *value = (double)histogram_count(f, s);
        *sum = s->sum;
        return 2;
    } else {
        *value = s->value;
    }
    return 1;
}


int forge_metrics_value(const char *name, const struct forge_label *labels, size_t nlabels, double *value,
                        double *sum)
{
    pthread_mutex_lock(&lock);
    int rc = value_locked(name, labels, nlabels, value, sum);
    pthread_mutex_unlock(&lock);
    return rc;
}


/* ------------------------------------------------------------------------ */
/* render                                                                   */
/* ------------------------------------------------------------------------ */

/* A growing NUL-terminated text; `failed` once an allocation failed (further adds do nothing). */
struct text {
    char *p;
    size_t len, cap;
    int failed;
};


static void text_add(struct text *t, const char *s, size_t n)
{
    if (t->failed)
        return;
    if (t->len + n + 1 > t->cap) {
        size_t cap = t->cap ? t->cap : 16384;
        while (cap < t->len + n + 1)
            cap *= 2;
        char *p = realloc(t->p, cap);
        if (!p) {
            t->failed = 1;
            return;
        }
        t->p = p;
        t->cap = cap;
    }
    memcpy(t->p + t->len, s, n);
    t->len += n;
    t->p[t->len] = '\0';
}


static void text_str(struct text *t, const char *s)
{
    text_add(t, s, strlen(s));
}


/* v as the exposition format writes it: integers in full (the common case, without printf), else the
 * shorter of %.15g and %.17g that reads back exactly. */
static void format_number(char out[32], double v)
{
    if (v == floor(v) && fabs(v) < 1e15) {
        char digits[20];
        unsigned long long n = (unsigned long long)fabs(v);
        size_t len = 0, i = 0;
        do {
            digits[len++] = (char)('0' + n % 10);
            n /= 10;
        } while (n);
        if (v < 0)
            out[i++] = '-';
        while (len)
            out[i++] = digits[--len];
        out[i] = '\0';
        return;
    }
    if (isnan(v) || isinf(v)) {
        snprintf(out, 32, "%s", isnan(v) ? "NaN" : v > 0 ? "+Inf" : "-Inf");
        return;
    }
    snprintf(out, 32, "%.15g", v);
    if (strtod(out, NULL) != v)
        snprintf(out, 32, "%.17g", v);
}


/* # HELP (help escaped: \\ and \n) and # TYPE lines. */
static void render_header(struct text *t, const char *name, const char *help, enum forge_metric_kind kind)
{
    text_str(t, "# HELP ");
    text_str(t, name);
    text_str(t, " ");
    for (const char *p = help; *p; p++) {
        if (*p == '\\')
            text_str(t, "\\\\");
        else if (*p == '\n')
            text_str(t, "\\n");
        else
            text_add(t, p, 1);
    }
    text_str(t, "\n# TYPE ");
    text_str(t, name);
    text_str(t, " ");
    text_str(t, kind_names[kind]);
    text_str(t, "\n");
}


/* name<suffix>{labels,le="<le>"} value — braces only when there is a label; le may be NULL. */
static void render_sample(struct text *t, const char *name, const char *suffix, const char *labels, const char *le,
                          double v)
{
    char num[32];
    text_str(t, name);
    text_str(t, suffix);
    if (*labels || le) {
        text_str(t, "{");
        text_str(t, labels);
        if (le) {
            text_str(t, *labels ? ",le=\"" : "le=\"");
            text_str(t, le);
            text_str(t, "\"");
        }
        text_str(t, "}");
    }
    format_number(num, v);
    text_str(t, " ");
    text_str(t, num);
    text_str(t, "\n");
}


static void render_histogram(struct text *t, const struct family *f, const struct series *s)
{
    char le[32];
    uint64_t cumulative = 0;
    for (size_t i = 0; i < f->nbounds; i++) {
        cumulative += s->counts[i];
        format_number(le, f->bounds[i]);
        render_sample(t, f->name, "_bucket", s->node.key, le, (double)cumulative);
    }
    cumulative += s->counts[f->nbounds];
    render_sample(t, f->name, "_bucket", s->node.key, "+Inf", (double)cumulative);
    render_sample(t, f->name, "_sum", s->node.key, NULL, s->sum);
    render_sample(t, f->name, "_count", s->node.key, NULL, (double)cumulative);
}


/* The age gauge d of tracked family d->source: its label sets that have members. */
static void render_derived(struct text *t, const struct family *d, double now)
{
    render_header(t, d->name, d->help, d->kind);
    for (const struct series *s = d->source->first; s; s = s->next)
        if (s->members)
            render_sample(t, d->name, "", s->node.key, NULL, now - oldest_since(s));
}


/* Family f, followed by its age gauge if it has one (derived families are rendered there only). */
static void render_family(struct text *t, const struct family *f, double now)
{
    if (f->role == ROLE_DERIVED)
        return;
    render_header(t, f->name, f->help, f->kind);
    for (const struct series *s = f->first; s; s = s->next) {
        if (f->kind == FORGE_METRIC_HISTOGRAM)
            render_histogram(t, f, s);
        else
            render_sample(t, f->name, "", s->node.key, NULL, s->value);
    }
    if (f->oldest)
        render_derived(t, f->oldest, now);
}


/* ------------------------------------------------------------------------ */
/* process metrics (/proc/self, as Prometheus' own clients read them)       */
/* ------------------------------------------------------------------------ */

enum { P_CPU, P_OPEN_FDS, P_MAX_FDS, P_VSIZE, P_RSS, P_START, P_THREADS, P_COUNT };

static const struct {
    const char *name;
    enum forge_metric_kind kind;
    const char *help;
} process_metrics[P_COUNT] = {
    [P_CPU] = {"process_cpu_seconds_total", FORGE_METRIC_COUNTER, "Total user and system CPU time spent in seconds."},
    [P_OPEN_FDS] = {"process_open_fds", FORGE_METRIC_GAUGE, "Number of open file descriptors."},
    [P_MAX_FDS] = {"process_max_fds", FORGE_METRIC_GAUGE, "Maximum number of open file descriptors."},
    [P_VSIZE] = {"process_virtual_memory_bytes", FORGE_METRIC_GAUGE, "Virtual memory size in bytes."},
    [P_RSS] = {"process_resident_memory_bytes", FORGE_METRIC_GAUGE, "Resident memory size in bytes."},
    [P_START] = {"process_start_time_seconds", FORGE_METRIC_GAUGE,
                 "Start time of the process since unix epoch in seconds."},
    [P_THREADS] = {"process_threads", FORGE_METRIC_GAUGE, "Number of OS threads in the process."},
};


static int builtin_name(const char *name)
{
    for (int i = 0; i < P_COUNT; i++)
        if (strcmp(name, process_metrics[i].name) == 0)
            return 1;
    return strcmp(name, DROPPED_NAME) == 0;
}


/* Seconds since the epoch at boot (btime of /proc/stat), or -1. */
static double boot_time(void)
{
    FILE *f = fopen("/proc/stat", "re");
    if (!f)
        return -1;
    char *line = NULL;
    size_t cap = 0;
    unsigned long long btime;
    double t = -1;
    while (t < 0 && getline(&line, &cap, f) > 0)
        if (sscanf(line, "btime %llu", &btime) == 1)
            t = (double)btime;
    free(line);
    fclose(f);
    return t;
}


/* CPU, threads, start time, virtual and resident size from /proc/self/stat; 0 or -1. */
static int read_self_stat(double v[P_COUNT])
{
    char buf[2048];
    FILE *f = fopen("/proc/self/stat", "re");
    if (!f)
        return -1;
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = '\0';
    const char *p = strrchr(buf, ')');             /* the command name may hold spaces and parens */
    unsigned long utime, stime, vsize;
    long threads, rss;
    unsigned long long start;
    double btime = boot_time(), tick = (double)sysconf(_SC_CLK_TCK);
    /* fields 3.. of proc(5): state ppid pgrp session tty_nr tpgid flags minflt cminflt majflt
     * cmajflt utime stime cutime cstime priority nice num_threads itrealvalue starttime vsize rss */
    if (!p || btime < 0 || tick <= 0 ||
        sscanf(p + 1, " %*s %*s %*s %*s %*s %*s %*s %*s %*s %*s %*s %lu %lu %*s %*s %*s %*s %ld %*s %llu %lu %ld",
               &utime, &stime, &threads, &start, &vsize, &rss) != 6)
        return -1;
    v[P_CPU] = (double)(utime + stime) / tick;
    v[P_THREADS] = (double)threads;
    v[P_START] = btime + (double)start / tick;
    v[P_VSIZE] = (double)vsize;
    v[P_RSS] = (double)rss * (double)sysconf(_SC_PAGESIZE);
    return 0;
}


/* Entries of /proc/self/fd, less the one reading it; -1 when it cannot be read. */
static double open_fds(void)
{
    DIR *d = opendir("/proc/self/fd");
    if (!d)
        return -1;
    double n = 0;
    for (struct dirent *e; (e = readdir(d));)
        if (e->d_name[0] != '.')
            n++;
    closedir(d);
    return n - 1;
}


static void render_process(struct text *t)
{
    double v[P_COUNT];
    struct rlimit rl;
    int have_stat = read_self_stat(v) == 0;
    v[P_OPEN_FDS] = open_fds();
    v[P_MAX_FDS] = getrlimit(RLIMIT_NOFILE, &rl) == 0 ?
                   (rl.rlim_cur == RLIM_INFINITY ? INFINITY : (double)rl.rlim_cur) : -1;
    for (int i = 0; i < P_COUNT; i++) {
        int known = i == P_OPEN_FDS || i == P_MAX_FDS ? v[i] >= 0 : have_stat;
        if (!known)
            continue;
        render_header(t, process_metrics[i].name, process_metrics[i].help, process_metrics[i].kind);
        render_sample(t, process_metrics[i].name, "", "", NULL, v[i]);
    }
}


int forge_metrics_render(char **out, size_t *len)
{
    struct text t = {0};
    double now = now_unix();
    pthread_mutex_lock(&lock);
    for (const struct family *f = reg.first; f; f = f->next)
        render_family(&t, f, now);
    pthread_mutex_unlock(&lock);
    render_process(&t);
    if (t.failed || !t.p) {
        free(t.p);
        return -ENOMEM;
    }
    *out = t.p;
    *len = t.len;
    return 0;
}
