/*
 * The process-wide Prometheus metrics registry (runtime/lmetrics.c; Lua: forge.metrics).
 *
 * One registry per process, shared by every thread and lua_State; every call is thread-safe.
 * A family is described once (describing it again identically is a no-op) and then updated
 * by series: one per label set. Label sets are given as name/value pairs in any order; the
 * registry keys a series by its rendered label string (sorted by name, values escaped).
 *
 * Calls return 0 or -errno:
 *   -EINVAL   a bad metric or label name (metric names: at most FORGE_METRICS_MAX_NAME bytes),
 *             a label value that is not UTF-8, a repeated or reserved label name (names
 *             starting "__"; "le" on a histogram), more than FORGE_METRICS_MAX_LABELS labels,
 *             labels longer than FORGE_METRICS_MAX_LABELS_LEN rendered, bad buckets, a
 *             negative or non-finite counter increment, a NaN observation, a non-finite since
 *   -ENOENT   the family is not described
 *   -EEXIST   described before with another kind, other buckets or another oldest family,
 *             an oldest family that is described otherwise, or a built-in family's name
 *   -EPERM    the call does not fit the family: inc on a non-counter, set/add on a gauge that
 *             is tracked or derived, observe on a non-histogram, track on a gauge set with
 *             set/add, a `since` for a family without an oldest family
 *   -ENOSPC   the family has FORGE_METRICS_MAX_SERIES series already: the update is dropped
 *             and counted in forge_metrics_series_dropped_total{family="<name>"}
 *   -ENODATA  (value) render shows no such series
 *   -ENOMEM
 */
#ifndef FORGE_METRICS_H
#define FORGE_METRICS_H

#include <stddef.h>

enum forge_metric_kind { FORGE_METRIC_COUNTER, FORGE_METRIC_GAUGE, FORGE_METRIC_HISTOGRAM };

#define FORGE_METRICS_MAX_NAME       200     /* bytes of a metric name */
#define FORGE_METRICS_MAX_LABELS     16
#define FORGE_METRICS_MAX_LABELS_LEN 4096    /* bytes of one rendered label string */
#define FORGE_METRICS_MAX_SERIES     5000    /* per family */
#define FORGE_METRICS_MAX_BUCKETS    64

struct forge_label {
    const char *name;
    const char *value;
};

/*
 * Describe family `name` ([a-zA-Z_:][a-zA-Z0-9_:]*). A histogram takes `nbuckets` finite,
 * strictly ascending upper bounds (0: the Prometheus defaults .005 .01 .025 .05 .1 .25 .5 1
 * 2.5 5 10; +Inf is implicit); others take none. A gauge given `oldest` (another name) is
 * tracked (see forge_metrics_track) and makes `oldest` a derived gauge: per label set of
 * this family that has members, now - the smallest `since` among them, in seconds (rendered
 * right after this family; set/add/track refuse it).
 * Describing again with the same kind, buckets and oldest is a no-op that keeps the series
 * (a new help text replaces the old one).
 */
int forge_metrics_describe(const char *name, enum forge_metric_kind kind, const char *help,
                           const double *buckets, size_t nbuckets, const char *oldest);

/* Counter += by (by >= 0). */
int forge_metrics_inc(const char *name, const struct forge_label *labels, size_t nlabels, double by);

/* Gauge = v; gauge += delta. */
int forge_metrics_set(const char *name, const struct forge_label *labels, size_t nlabels, double v);
int forge_metrics_add(const char *name, const struct forge_label *labels, size_t nlabels, double delta);

/* Histogram: count v in its bucket, its sum and its count. */
int forge_metrics_observe(const char *name, const struct forge_label *labels, size_t nlabels, double v);

/*
 * Membership gauge: the series of `name` count members by label set. Member `id` gets the
 * label set `labels` (moving it there from the one it had); `since` (unix seconds, or NaN:
 * now) is when it entered that set, kept when it is tracked again with the same set without
 * one. Counts change incrementally, so rendering never walks the members; label sets that had
 * members stay, at 0. A member whose new label set is past the series cap is removed
 * (-ENOSPC, counted).
 */
int forge_metrics_track(const char *name, const char *id, const struct forge_label *labels, size_t nlabels,
                        double since);

/* Remove member `id` of `name` (not a member: nothing to do, 0). */
int forge_metrics_untrack(const char *name, const char *id);

/* Remove every member of `name` (before a full re-seed); its label sets stay, at 0. */
int forge_metrics_forget(const char *name);

/*
 * What render shows for one series: returns 1 with a counter's or gauge's *value, or 2 with a
 * histogram's count in *value and its *sum; -ENODATA when render shows no such series.
 */
int forge_metrics_value(const char *name, const struct forge_label *labels, size_t nlabels, double *value,
                        double *sum);

/*
 * The whole registry in the Prometheus text exposition format 0.0.4, followed by the
 * process metrics read from /proc/self now. *out is malloc'd (the caller frees it) and
 * NUL-terminated; *len excludes the NUL.
 */
int forge_metrics_render(char **out, size_t *len);

#endif
