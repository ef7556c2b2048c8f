/* Timeline analysis (parts/timeline.h): real timelines of every schedule on
   two PoCL devices pass the consistency checks, and each check catches the
   corruption it is for; on asynchronous (PoCL pthread) devices too, in a
   child process, where no link copy is timed over its stage's compute;
   statistics and the simulated prediction of a hand-made timeline come
   out exactly, with each thing the prediction takes from the timeline
   beyond the lists (B parts, the optimizer's barrier, the first event's
   start); the naive schedule measures about
   1/P utilisation and its Gantt chart never shows two devices computing at
   once; the Chrome trace is JSON with one track per stage and per link; the
   SVG is XML and renders in headless Chromium (scripts/check-svg.sh): where
   Chromium is not installed that test is skipped, with a SKIPPED line. */
#define MPAR_IMPLEMENTATION
#include "mpar.h"

#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmocka.h>

const char* __lsan_default_suppressions(void);
const char* __lsan_default_suppressions(void) { return "leak:libpocl.so\nleak:libLLVM\n"; }

#define assert_near(a, b, tol)                                                                                   \
    do {                                                                                                         \
        double a_ = (a), b_ = (b);                                                                               \
        if (!(fabs(a_ - b_) <= (tol))) fail_msg("%s = %.12g, expected %.12g", #a, a_, b_);                       \
    } while (0)

#define assert_contains(hay, needle)                                                                             \
    do {                                                                                                         \
        if (!strstr((hay), (needle))) fail_msg("expected \"%s\" in \"%s\"", (needle), (hay));                    \
    } while (0)

enum { IN = 128, BATCH = 64, WIDE = 384, WIDE_BATCH_MAX = 512 };
/* Device times against host times and across devices: the executor maps
   each device clock once, so allow a millisecond of mapping error there
   (same-clock comparisons are exact). */
#define CLOCK_TOLERANCE 1e-3

static mpar_context* g_ctx;
static mpar_model* g_model;
static mpar_model* g_wide; /* more compute per kernel: host overhead matters less */
/* g_wide's batch: on the host route a kernel of 8 rows takes microseconds,
   less than a hand-off between threads, so its micro-batches get 64 rows */
static int g_wide_batch = BATCH;
static float g_x[WIDE_BATCH_MAX * IN];
static int32_t g_y[WIDE_BATCH_MAX];

static int setup(void** state) {
    mpar_desc d;
    mpar_error err;
    mpar_model_desc md;
    uint64_t s = 11;
    int i;
    (void)state;
    memset(&d, 0, sizeof d);
    d.error = &err;
    if (mpar_create(&d, &g_ctx) != MPAR_SUCCESS) {
        fprintf(stderr, "mpar_create: %s\n", err.message);
        return -1;
    }
    memset(&md, 0, sizeof md);
    md.input_features = IN;
    md.seed = 5;
    if (mpar_model_create(&md, &g_model, &err) != MPAR_SUCCESS) return -1;
    for (i = 0; i < 6; i++) {
        mpar_model_add_linear(g_model, 128, &err);
        mpar_model_add_simple(g_model, mpar_layer_relu(), &err);
    }
    mpar_model_add_linear(g_model, 10, &err);
    if (mpar_model_add_simple(g_model, mpar_layer_cross_entropy(), &err) != MPAR_SUCCESS) return -1;
    if (mpar_model_create(&md, &g_wide, &err) != MPAR_SUCCESS) return -1;
    for (i = 0; i < 6; i++) {
        mpar_model_add_linear(g_wide, WIDE, &err);
        mpar_model_add_simple(g_wide, mpar_layer_relu(), &err);
    }
    mpar_model_add_linear(g_wide, 10, &err);
    if (mpar_model_add_simple(g_wide, mpar_layer_cross_entropy(), &err) != MPAR_SUCCESS) return -1;
    for (i = 0; i < WIDE_BATCH_MAX * IN; i++) g_x[i] = (float)(2.0 * mpar__rng_uniform(&s) - 1.0);
    for (i = 0; i < WIDE_BATCH_MAX; i++) g_y[i] = i % 10;
    {
        mpar_device_info info;
        memset(&info, 0, sizeof info);
        if (mpar_device_get_info(g_ctx, 0, &info) != MPAR_SUCCESS) return -1;
        if (info.host_route) g_wide_batch = WIDE_BATCH_MAX;
    }
    return 0;
}

static int teardown(void** state) {
    (void)state;
    mpar_model_destroy(g_model);
    mpar_model_destroy(g_wide);
    mpar_destroy(g_ctx);
    return 0;
}

/* A profiled pipeline on 2 devices (4 chunks on devices 0,1,0,1 for V = 2). */
static mpar_pipeline* make_pipeline_for(const mpar_model* model, mpar_schedule_kind kind, int M) {
    mpar_stage_desc st[4];
    mpar_pipeline_desc pd;
    mpar_pipeline* p = NULL;
    int V = kind == MPAR_SCHEDULE_INTERLEAVED_1F1B ? 2 : 1, n = 2 * V, j;
    int L = mpar_model_layer_count(model);
    for (j = 0; j < n; j++) {
        st[j].device = (j % 2) % mpar_device_count(g_ctx);
        st[j].first_layer = L * j / n;
        st[j].last_layer = L * (j + 1) / n - 1;
    }
    memset(&pd, 0, sizeof pd);
    pd.stages = st;
    pd.stage_count = n;
    pd.schedule = kind;
    pd.microbatches = M;
    pd.virtual_stages = V;
    pd.max_batch = model == g_wide ? g_wide_batch : BATCH;
    pd.profile = 1;
    if (mpar_pipeline_create(g_ctx, model, &pd, &p) != MPAR_SUCCESS) fail_msg("create: %s", mpar_last_error(g_ctx));
    return p;
}
static mpar_pipeline* make_pipeline(mpar_schedule_kind kind, int M) { return make_pipeline_for(g_model, kind, M); }

static void train_step(mpar_pipeline* p, mpar_timeline* t) {
    mpar_batch b;
    mpar_step_info info;
    b.inputs = g_x, b.targets = g_y, b.samples = mpar_pipeline_get_desc(p)->max_batch;
    if (mpar_pipeline_train_step(p, &b, &info) != MPAR_SUCCESS) fail_msg("step: %s", mpar_last_error(g_ctx));
    if (mpar_pipeline_get_timeline(p, t) != MPAR_SUCCESS) fail_msg("timeline: %s", mpar_last_error(g_ctx));
}

static void expect_consistent(const mpar_timeline* t, double tol, const char* what) {
    mpar_error err;
    memset(&err, 0, sizeof err);
    if (mpar_timeline_check(t, tol, &err) != MPAR_SUCCESS) fail_msg("%s: %s", what, err.message);
}

static void expect_invalid(const mpar_timeline* t, const char* needle) {
    mpar_error err;
    memset(&err, 0, sizeof err);
    assert_int_equal(mpar_timeline_check(t, 0.0, &err), MPAR_ERROR_INVALID_SCHEDULE);
    assert_contains(err.message, needle);
}

/* Counts the test makes itself, independent of mpar_timeline_check. */
static void expect_counts(const mpar_timeline* t) {
    int VS = t->stages * t->virtual_stages, M = t->microbatches, n[8] = {0}, i, vs, m;
    for (i = 0; i < t->event_count; i++) n[t->events[i].kind]++;
    assert_int_equal(n[MPAR_EVENT_FORWARD], VS * M);
    if (t->schedule == MPAR_SCHEDULE_ZB_H1) {
        assert_int_equal(n[MPAR_EVENT_BACKWARD], 0);
        assert_int_equal(n[MPAR_EVENT_BACKWARD_INPUT], VS * M);
        assert_int_equal(n[MPAR_EVENT_BACKWARD_WEIGHT], VS * M);
    } else {
        assert_int_equal(n[MPAR_EVENT_BACKWARD], 2 * VS * M); /* input part, weight part */
        assert_int_equal(n[MPAR_EVENT_BACKWARD_INPUT] + n[MPAR_EVENT_BACKWARD_WEIGHT], 0);
    }
    assert_int_equal(n[MPAR_EVENT_OPTIMIZER_STEP], 2 * t->stages);
    assert_int_equal(n[MPAR_EVENT_SEND], 2 * (VS - 1) * M);
    assert_int_equal(n[MPAR_EVENT_RECEIVE], 2 * (VS - 1) * M);
    for (vs = 0; vs < VS; vs++)
        for (m = 0; m < M; m++) {
            int f = 0;
            for (i = 0; i < t->event_count; i++) {
                const mpar_event* e = &t->events[i];
                f += e->kind == MPAR_EVENT_FORWARD && e->microbatch == m && e->chunk * t->stages + e->stage == vs;
            }
            if (f != 1) fail_msg("virtual stage %d, micro-batch %d: %d forwards", vs, m, f);
        }
    /* each receive copy starts after its send copy finished */
    for (i = 0; i < t->event_count; i++) {
        const mpar_event* r = &t->events[i];
        int j, found = 0;
        if (r->kind != MPAR_EVENT_RECEIVE) continue;
        for (j = 0; j < t->event_count; j++) {
            const mpar_event* s = &t->events[j];
            if (s->kind != MPAR_EVENT_SEND || s->boundary != r->boundary || s->gradient != r->gradient ||
                s->microbatch != r->microbatch)
                continue;
            found++;
            assert_true(s->stage != r->stage);
            if (r->start < s->end) fail_msg("receive of mb %d at %.6f before its send ended %.6f", r->microbatch, r->start, s->end);
        }
        assert_int_equal(found, 1);
    }
}

/* What mpar_timeline_get_stats promises, recomputed from the events: the
   step ends with the last event; busy (F, B, I, W, optimizer), transfer
   (copies) and wait are sums of a stage's events, idle the rest of the
   step; bubble = 1 - sum(busy) / (stages * step); device memory is the
   executor's count. Exact but for the order of additions. */
static void expect_stats_of(const mpar_timeline* t, const mpar_timeline_stats* st, const mpar_pipeline_stats* ps) {
    double busy[2] = {0.0, 0.0}, transfer[2] = {0.0, 0.0}, wait[2] = {0.0, 0.0}, end = 0.0, total = 0.0;
    size_t peak = 0;
    int i, s;
    assert_int_equal(t->stages, 2);
    for (i = 0; i < t->event_count; i++) {
        const mpar_event* e = &t->events[i];
        double d = e->end - e->start;
        if (e->kind == MPAR_EVENT_SEND || e->kind == MPAR_EVENT_RECEIVE) transfer[e->stage] += d;
        else if (e->kind == MPAR_EVENT_WAIT) wait[e->stage] += d;
        else busy[e->stage] += d;
        if (e->end > end) end = e->end;
    }
    assert_near(t->step_time, end, 0.0);
    assert_near(st->step_time, t->step_time, 0.0);
    for (s = 0; s < 2; s++) {
        assert_near(st->stage[s].busy, busy[s], 1e-12);
        assert_near(st->stage[s].transfer, transfer[s], 1e-12);
        assert_near(st->stage[s].wait, wait[s], 1e-12);
        assert_near(st->stage[s].idle, fmax(0.0, end - busy[s] - transfer[s]), 1e-12);
        assert_true(st->stage[s].device_bytes == ps->device_bytes[s]);
        if (ps->device_bytes[s] > peak) peak = ps->device_bytes[s];
        total += busy[s];
    }
    assert_true(st->peak_device_bytes == peak && peak > 0);
    assert_near(st->busy_total, total, 1e-12);
    assert_near(st->bubble_fraction, 1.0 - total / (2.0 * end), 1e-12);
    assert_near(st->utilisation, total / (2.0 * end), 1e-12);
    /* two stages never both compute through a step: the second waits for
       the first forward, the first for the last backward */
    assert_true(st->bubble_fraction > 0.0 && st->bubble_fraction < 1.0);
}

/* What mpar_timeline_predict promises: the measured figures as they are,
   and the predicted bubble as the measured busy time over the simulated
   step. The simulated step is bounded by the events alone. Each stage runs
   its actions one after another at their measured means: F, B (or I, W),
   the stage's own copies charged to them, its host gaps (the time within
   its span in no event) spread over them, and its two optimizer events.
   So the step is at least the largest stage total; and at most all stage
   totals plus every message's link delay (the mean hand-off latency of its
   boundary, at most the larger direction's mean), since the step is one
   chain of actions and messages, each at most once. A mean that is a sum,
   a copy or gap left out or charged per action lands outside. Returns
   predicted / measured step. */
static double expect_prediction_of(const mpar_timeline* t, const mpar_timeline_stats* st) {
    mpar_timeline_prediction pr;
    mpar_error err;
    double total[2], lower = 0.0, upper = 0.0, first = -1.0;
    int s, i, b;
    memset(&err, 0, sizeof err);
    if (mpar_timeline_predict(t, &pr, &err) != MPAR_SUCCESS) fail_msg("predict: %s", err.message);
    assert_near(pr.measured_step_time, st->step_time, 0.0);
    assert_near(pr.measured_bubble_fraction, st->bubble_fraction, 0.0);
    assert_near(pr.bubble_fraction, 1.0 - st->busy_total / (2.0 * pr.step_time), 1e-12);
    for (s = 0; s < 2; s++) {
        double first = 0.0, last = 0.0, covered = 0.0, gap;
        int seen = 0;
        for (i = 0; i < t->event_count; i++) {
            const mpar_event* e = &t->events[i];
            if (e->stage != s || e->kind == MPAR_EVENT_OPTIMIZER_STEP) continue;
            if (!seen || e->start < first) first = e->start;
            if (!seen || e->end > last) last = e->end;
            seen = 1;
            covered += e->end - e->start;
        }
        gap = last - first - covered;
        total[s] = st->stage[s].busy + st->stage[s].transfer + (gap > 0.0 ? gap : 0.0);
        if (total[s] > lower) lower = total[s];
        upper += total[s];
    }
    for (b = 0; b < mpar_timeline_link_count(t) / 2; b++) {
        mpar_timeline_link_stats fwd, bwd;
        assert_int_equal(mpar_timeline_get_link_stats(t, b, 0, &fwd, NULL), MPAR_SUCCESS);
        assert_int_equal(mpar_timeline_get_link_stats(t, b, 1, &bwd, NULL), MPAR_SUCCESS);
        upper += 2.0 * t->microbatches * fmax(fwd.handoff_latency, bwd.handoff_latency);
    }
    for (i = 0; i < t->event_count; i++) /* the simulated step starts with the first event */
        if (first < 0.0 || t->events[i].start < first) first = t->events[i].start;
    if (first > 0.0) lower += first, upper += first;
    if (pr.step_time < lower - 1e-9 || pr.step_time > upper + 1e-9)
        fail_msg("%s: predicted step %.6f ms outside [%.6f, %.6f] ms (stage totals %.6f and %.6f ms)",
                 mpar_schedule_kind_name(t->schedule), pr.step_time * 1e3, lower * 1e3, upper * 1e3, total[0] * 1e3,
                 total[1] * 1e3);
    return pr.step_time / st->step_time;
}

/* Every schedule on 2 devices: the recorded step is consistent, and its
   statistics and prediction are what the events make them. How near the
   prediction comes to the measured step is printed, not asserted: host
   time outside the events (thread wake-ups) is spread over the actions of
   the stage it was seen on, not where it happened, and on a loaded machine
   or under ASan that takes the ratio from 0.8-1.05 down to 0.2. */
static void test_real_timelines_consistent(void** state) {
    static const mpar_schedule_kind kinds[] = {MPAR_SCHEDULE_SEQUENTIAL, MPAR_SCHEDULE_GPIPE, MPAR_SCHEDULE_1F1B,
                                               MPAR_SCHEDULE_ZB_H1, MPAR_SCHEDULE_INTERLEAVED_1F1B};
    size_t k;
    (void)state;
    for (k = 0; k < sizeof kinds / sizeof kinds[0]; k++) {
        mpar_pipeline* p = make_pipeline(kinds[k], 4);
        mpar_timeline t;
        mpar_timeline_stats st;
        mpar_pipeline_stats ps;
        double ratio[2];
        int step;
        for (step = 0; step < 2; step++) {
            train_step(p, &t);
            assert_int_equal(t.schedule, kinds[k]);
            assert_int_equal(t.stages, 2);
            expect_consistent(&t, CLOCK_TOLERANCE, mpar_schedule_kind_name(kinds[k]));
            expect_counts(&t);
            assert_int_equal(mpar_timeline_get_stats(&t, &st, NULL), MPAR_SUCCESS);
            assert_int_equal(mpar_pipeline_get_stats(p, &ps), MPAR_SUCCESS);
            expect_stats_of(&t, &st, &ps);
            ratio[step] = expect_prediction_of(&t, &st);
            mpar_timeline_free(&t);
        }
        print_message("%s: predicted / measured step %.3f, %.3f\n", mpar_schedule_kind_name(kinds[k]), ratio[0],
                      ratio[1]);
        if (kinds[k] == MPAR_SCHEDULE_1F1B) { /* an inference call is checked as one */
            mpar_batch b;
            b.inputs = g_x, b.targets = g_y, b.samples = BATCH;
            assert_int_equal(mpar_pipeline_infer(p, &b, NULL, NULL), MPAR_SUCCESS);
            assert_int_equal(mpar_pipeline_get_timeline(p, &t), MPAR_SUCCESS);
            expect_consistent(&t, CLOCK_TOLERANCE, "1f1b inference");
            mpar_timeline_free(&t);
        }
        mpar_pipeline_destroy(p);
    }
}

/* A copy through a blocking link (host-staged, the choice for PoCL's CPU
   devices) starts after the commands its stage enqueued before it; with
   profiling, its SEND or RECEIVE is the copy alone and no compute event of
   the stage overlaps it (beyond mapping the device clock), so a stage's
   busy and transfer time never count the same work twice. Profiling waits
   for no action on its own (compute times are read when the job has
   drained), so this is what the link does. */
static void expect_copies_apart_from_compute(const mpar_timeline* t, const char* what) {
    int i, j;
    for (i = 0; i < t->event_count; i++) {
        const mpar_event* c = &t->events[i];
        if (c->kind != MPAR_EVENT_SEND && c->kind != MPAR_EVENT_RECEIVE) continue;
        for (j = 0; j < t->event_count; j++) {
            const mpar_event* e = &t->events[j];
            double overlap;
            if (e->stage != c->stage || e->kind > MPAR_EVENT_OPTIMIZER_STEP) continue;
            overlap = fmin(e->end, c->end) - fmax(e->start, c->start);
            if (overlap > CLOCK_TOLERANCE)
                fail_msg("%s: stage %d: compute event %d (%.3f-%.3f ms) overlaps copy %d (%.3f-%.3f ms)", what,
                         c->stage, (int)e->kind, e->start * 1e3, e->end * 1e3, (int)c->kind, c->start * 1e3,
                         c->end * 1e3);
        }
    }
}

static int g_async_child; /* this process is the child below */
static void test_copies_apart_from_compute(void** state) {
    static const mpar_schedule_kind kinds[] = {MPAR_SCHEDULE_GPIPE, MPAR_SCHEDULE_1F1B, MPAR_SCHEDULE_ZB_H1};
    size_t k;
    (void)state;
    if (!g_async_child) {
        /* PoCL's `basic` devices run a command the moment it is enqueued, so
           nothing is pending when a copy starts; `pthread` devices run it
           later, on their own threads, as a GPU does. The same checks run
           there too, in a child process (PoCL reads POCL_DEVICES once). */
        char exe[4096], cmd[4300];
        ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
        assert_true(n > 0);
        exe[n] = '\0';
        snprintf(cmd, sizeof cmd, "POCL_DEVICES='pthread pthread' MPAR_CPU_ROUTE=opencl '%s' --async-devices", exe);
        if (system(cmd) != 0) fail_msg("the checks failed on asynchronous (pthread) devices: %s", cmd);
    }
    for (k = 0; k < sizeof kinds / sizeof kinds[0]; k++) {
        mpar_pipeline* p = make_pipeline_for(g_wide, kinds[k], 4);
        mpar_timeline t;
        int step, copies = 0, i;
        for (step = 0; step < 2; step++) {
            train_step(p, &t);
            for (i = 0; i < t.event_count; i++) copies += t.events[i].kind == MPAR_EVENT_SEND;
            expect_copies_apart_from_compute(&t, mpar_schedule_kind_name(kinds[k]));
            mpar_timeline_free(&t);
        }
        assert_true(copies > 0);
        mpar_pipeline_destroy(p);
    }
}

/* ---- a hand-made GPipe step, P = 2, M = 2, in seconds ---- */

static mpar_event ev(mpar_event_kind kind, int stage, int mb, double start, double end) {
    mpar_event e;
    memset(&e, 0, sizeof e);
    e.kind = kind, e.stage = stage, e.microbatch = mb, e.boundary = -1, e.start = start, e.end = end;
    return e;
}
static mpar_event lk(mpar_event_kind kind, int stage, int mb, int gradient, double start, double end, uint64_t bytes) {
    mpar_event e = ev(kind, stage, mb, start, end);
    e.boundary = 0, e.gradient = gradient, e.bytes = kind == MPAR_EVENT_WAIT ? 0 : bytes;
    return e;
}

static mpar_event g_ev[40];

static void synthetic(mpar_timeline* t) {
    int n = 0;
    /* stage 0 */
    g_ev[n++] = ev(MPAR_EVENT_FORWARD, 0, 0, 0.0, 1.0);
    g_ev[n++] = lk(MPAR_EVENT_SEND, 0, 0, 0, 1.0, 1.25, 1000);
    g_ev[n++] = ev(MPAR_EVENT_FORWARD, 0, 1, 1.25, 2.25);
    g_ev[n++] = lk(MPAR_EVENT_SEND, 0, 1, 0, 2.25, 2.5, 1000);
    g_ev[n++] = lk(MPAR_EVENT_WAIT, 0, 0, 1, 2.5, 5.1, 0);
    g_ev[n++] = lk(MPAR_EVENT_RECEIVE, 0, 0, 1, 5.1, 5.35, 500);
    g_ev[n++] = ev(MPAR_EVENT_BACKWARD, 0, 0, 5.35, 6.35);
    g_ev[n++] = ev(MPAR_EVENT_BACKWARD, 0, 0, 6.35, 7.35);
    g_ev[n++] = lk(MPAR_EVENT_RECEIVE, 0, 1, 1, 7.35, 7.6, 500);
    g_ev[n++] = ev(MPAR_EVENT_BACKWARD, 0, 1, 7.6, 8.6);
    g_ev[n++] = ev(MPAR_EVENT_BACKWARD, 0, 1, 8.6, 9.6);
    g_ev[n++] = ev(MPAR_EVENT_OPTIMIZER_STEP, 0, -1, 9.6, 9.75);
    g_ev[n++] = ev(MPAR_EVENT_OPTIMIZER_STEP, 0, -1, 9.75, 10.0);
    /* stage 1 */
    g_ev[n++] = lk(MPAR_EVENT_WAIT, 1, 0, 0, 0.0, 1.25, 0);
    g_ev[n++] = lk(MPAR_EVENT_RECEIVE, 1, 0, 0, 1.25, 1.5, 1000);
    g_ev[n++] = ev(MPAR_EVENT_FORWARD, 1, 0, 1.5, 2.5);
    g_ev[n++] = lk(MPAR_EVENT_RECEIVE, 1, 1, 0, 2.5, 2.75, 1000);
    g_ev[n++] = ev(MPAR_EVENT_FORWARD, 1, 1, 2.75, 3.75);
    g_ev[n++] = ev(MPAR_EVENT_BACKWARD, 1, 0, 3.75, 4.75);
    g_ev[n++] = lk(MPAR_EVENT_SEND, 1, 0, 1, 4.75, 5.0, 500);
    g_ev[n++] = ev(MPAR_EVENT_BACKWARD, 1, 0, 5.0, 6.0);
    g_ev[n++] = ev(MPAR_EVENT_BACKWARD, 1, 1, 6.0, 7.0);
    g_ev[n++] = lk(MPAR_EVENT_SEND, 1, 1, 1, 7.0, 7.25, 500);
    g_ev[n++] = ev(MPAR_EVENT_BACKWARD, 1, 1, 7.25, 8.25);
    g_ev[n++] = ev(MPAR_EVENT_OPTIMIZER_STEP, 1, -1, 8.25, 8.5);
    g_ev[n++] = ev(MPAR_EVENT_OPTIMIZER_STEP, 1, -1, 9.0, 9.5);
    memset(t, 0, sizeof *t);
    t->stages = 2, t->virtual_stages = 1, t->microbatches = 2;
    t->schedule = MPAR_SCHEDULE_GPIPE;
    t->step_time = 10.0;
    t->event_count = n;
    t->events = g_ev;
    t->device_bytes[0] = 3000, t->device_bytes[1] = 5000;
}

static void test_synthetic_stats(void** state) {
    mpar_timeline t;
    mpar_timeline_stats st;
    mpar_timeline_link_stats ls;
    mpar_timeline_prediction pr;
    mpar_error err;
    (void)state;
    synthetic(&t);
    expect_consistent(&t, 0.0, "synthetic");
    assert_int_equal(mpar_timeline_get_stats(&t, &st, NULL), MPAR_SUCCESS);
    assert_near(st.step_time, 10.0, 0.0);
    assert_near(st.stage[0].busy, 2.0 + 4.0 + 0.4, 1e-12);
    assert_near(st.stage[0].transfer, 1.0, 1e-12);
    assert_near(st.stage[0].wait, 2.6, 1e-12);
    assert_near(st.stage[0].idle, 10.0 - 6.4 - 1.0, 1e-12);
    assert_near(st.stage[0].overhead, 0.0, 1e-12);
    assert_near(st.stage[1].busy, 2.0 + 4.0 + 0.75, 1e-12);
    assert_near(st.stage[1].transfer, 1.0, 1e-12);
    assert_near(st.stage[1].wait, 1.25, 1e-12);
    assert_near(st.stage[1].idle, 10.0 - 6.75 - 1.0, 1e-12);
    assert_near(st.stage[1].overhead, 1.0, 1e-12); /* 8.5-9.0 and 9.5-10.0 */
    assert_int_equal(st.stage[1].compute_events, 8);
    assert_near(st.bubble_fraction, 1.0 - 13.15 / 20.0, 1e-12);
    assert_near(st.utilisation, 13.15 / 20.0, 1e-12);
    assert_int_equal(st.slowest_stage, 1);
    assert_true(st.peak_device_bytes == 5000 && st.stage[0].device_bytes == 3000);

    assert_int_equal(mpar_timeline_link_count(&t), 2);
    assert_int_equal(mpar_timeline_get_link_stats(&t, 0, 0, &ls, NULL), MPAR_SUCCESS);
    assert_true(ls.from_stage == 0 && ls.to_stage == 1 && ls.messages == 2 && ls.received == 2 && ls.bytes == 2000);
    assert_near(ls.send_time, 0.5, 1e-12);
    assert_near(ls.receive_time, 0.5, 1e-12);
    assert_near(ls.bandwidth, 2000.0, 1e-9);
    assert_near(ls.receive_wait, 1.25, 1e-12);
    assert_near(ls.send_wait, 0.0, 0.0);
    assert_near(ls.handoff_latency, 0.0, 1e-12); /* A0 arrived as the receiver stopped waiting */
    assert_int_equal(mpar_timeline_get_link_stats(&t, 0, 1, &ls, NULL), MPAR_SUCCESS);
    assert_true(ls.from_stage == 1 && ls.to_stage == 0 && ls.bytes == 1000);
    assert_near(ls.bandwidth, 1000.0, 1e-9);
    assert_near(ls.receive_wait, 2.6, 1e-12);
    assert_near(ls.handoff_latency, 0.1, 1e-12); /* G0 sent at 5.0, picked up at 5.1; G1 had no wait */

    /* Prediction. Every B was recorded as the executor records it, its
       input part and then its weight part (stage 1 sends the gradient
       between them), so each B is simulated as I then W: F = 1 + 0.25 copy,
       I = 1 + 0.25 copy, W = 1 on both virtual stages; link delay mean(0,
       0.1) = 0.05; the optimizer as norms, then (once every stage's norms
       are in) the update: 0.15 + 0.25 and 0.25 + 0.5. GPipe by hand:
       stage 1 F0 1.3-2.55, F1 2.55-3.8, I0 3.8-5.05 (G0 at stage 0 at 5.1),
       W0 -6.05, I1 -7.3 (G1 at 7.35), W1 -8.3, norms -8.55; stage 0 I0
       5.1-6.35, W0 -7.35, I1 -8.6, W1 -9.6, norms -9.75; updates from 9.75:
       stage 1 ends last, at 10.25. (As one action, a B would hold the
       gradient back until its weight part ends: 11.0.) */
    memset(&err, 0, sizeof err);
    if (mpar_timeline_predict(&t, &pr, &err) != MPAR_SUCCESS) fail_msg("predict: %s", err.message);
    assert_near(pr.step_time, 10.25, 1e-9);
    assert_near(pr.bubble_fraction, 1.0 - 13.15 / 20.5, 1e-9);
    assert_near(pr.measured_bubble_fraction, st.bubble_fraction, 0.0);

    /* bad input */
    assert_int_equal(mpar_timeline_get_stats(NULL, &st, NULL), MPAR_ERROR_INVALID_ARGUMENT);
    assert_int_equal(mpar_timeline_get_link_stats(&t, 1, 0, &ls, NULL), MPAR_ERROR_INVALID_ARGUMENT);
    g_ev[3].stage = 2;
    assert_int_equal(mpar_timeline_get_stats(&t, &st, &err), MPAR_ERROR_INVALID_ARGUMENT);
    assert_contains(err.message, "bad stage");
    assert_int_equal(mpar_timeline_write_svg(&t, stdout), MPAR_ERROR_INVALID_ARGUMENT);
}

/* Each invariant of mpar_timeline_check fails on the corruption it is for. */
/* What the prediction takes from the timeline beyond the lists, each on
   the hand-made step above (10.25 as it is): the step starts where its
   first event does; the update waits for every stage's norms only when
   the optimizer step was recorded as those two events; a B is simulated
   as I then W only when it was recorded as its two parts. */
static double predicted(const mpar_timeline* t) {
    mpar_timeline_prediction pr;
    mpar_error err;
    memset(&err, 0, sizeof err);
    if (mpar_timeline_predict(t, &pr, &err) != MPAR_SUCCESS) fail_msg("predict: %s", err.message);
    return pr.step_time;
}
static int find_ev(const mpar_timeline* t, mpar_event_kind kind, int stage, double start) {
    int i;
    for (i = 0; i < t->event_count; i++)
        if (t->events[i].kind == kind && t->events[i].stage == stage && t->events[i].start == start) return i;
    fail_msg("no event of kind %d on stage %d at %g", (int)kind, stage, start);
    return -1;
}
static void drop_ev(mpar_timeline* t, int i) {
    memmove(&t->events[i], &t->events[i + 1], sizeof(mpar_event) * (size_t)(t->event_count - i - 1));
    t->event_count--;
}
static void test_prediction_models_the_executor(void** state) {
    mpar_timeline t;
    int i, s;
    (void)state;
    synthetic(&t);
    for (i = 0; i < t.event_count; i++) t.events[i].start += 0.5, t.events[i].end += 0.5;
    t.step_time += 0.5;
    assert_near(predicted(&t), 10.75, 1e-9); /* started 0.5 late */

    synthetic(&t); /* one optimizer event per stage: no barrier known, GPipe with I, W ends on stage 0: 9.6 + 0.4 */
    t.events[find_ev(&t, MPAR_EVENT_OPTIMIZER_STEP, 0, 9.6)].end = 10.0;
    drop_ev(&t, find_ev(&t, MPAR_EVENT_OPTIMIZER_STEP, 0, 9.75));
    t.events[find_ev(&t, MPAR_EVENT_OPTIMIZER_STEP, 1, 8.25)].end = 9.0;
    drop_ev(&t, find_ev(&t, MPAR_EVENT_OPTIMIZER_STEP, 1, 9.0));
    assert_near(predicted(&t), 10.0, 1e-9);

    synthetic(&t); /* every B one event of 2: B = 2.25 with its copy; stage 0's B1 ends at 10.6, its norms at
                      10.75, then stage 1's update (0.5) ends last */
    for (s = 0; s < 2; s++) {
        static const double first[2][2] = {{5.35, 7.6}, {3.75, 6.0}}, second[2][2] = {{6.35, 8.6}, {5.0, 7.25}};
        int m;
        for (m = 0; m < 2; m++) {
            t.events[find_ev(&t, MPAR_EVENT_BACKWARD, s, first[s][m])].end = first[s][m] + 2.0;
            drop_ev(&t, find_ev(&t, MPAR_EVENT_BACKWARD, s, second[s][m]));
        }
    }
    assert_near(predicted(&t), 11.25, 1e-9);
}

static void test_check_catches_corruption(void** state) {
    mpar_timeline t;
    int i;
    (void)state;
    synthetic(&t);
    g_ev[2].start = 0.5; /* stage 0: F1 into F0 */
    expect_invalid(&t, "overlaps");
    synthetic(&t);
    g_ev[17].microbatch = 0; /* stage 1: F0 twice, no F1 */
    expect_invalid(&t, "bad forward count");
    synthetic(&t);
    g_ev[7].kind = MPAR_EVENT_BACKWARD_WEIGHT; /* half a B */
    expect_invalid(&t, "bad backward count");
    synthetic(&t);
    g_ev[15].start = 3.75, g_ev[15].end = 4.75; /* stage 1: B0 (input part) before F0 */
    g_ev[18].start = 1.5, g_ev[18].end = 2.5;
    expect_invalid(&t, "B0 starts at 1500.000 ms, before F0 (stage 1) ends");
    synthetic(&t);
    g_ev[15].start = 0.9, g_ev[15].end = 1.4; /* stage 1: F0 before stage 0's F0 ended */
    g_ev[13].end = 0.9;
    expect_invalid(&t, "F0 starts at 900.000 ms, before F0 (stage 0) ends");
    synthetic(&t);
    g_ev[13].end = 1.0, g_ev[14].start = 1.0; /* receive copy starts before the send copy ended */
    expect_invalid(&t, "recv A0 starts at 1000.000 ms, before send A0 (stage 0) ends");
    synthetic(&t);
    g_ev[19].stage = 0, g_ev[19].start = 0.0, g_ev[19].end = 0.0; /* gradient sent by the wrong stage */
    expect_invalid(&t, "1 sends and 1 receives, expected one send on stage 1");
    /* W before its I: the same step as zero-bubble, stage 0's mb 1 I and W swapped */
    synthetic(&t);
    t.schedule = MPAR_SCHEDULE_ZB_H1;
    for (i = 0; i < 4; i++) {
        static const int input_part[4] = {6, 9, 18, 21}, weight_part[4] = {7, 10, 20, 23};
        g_ev[input_part[i]].kind = MPAR_EVENT_BACKWARD_INPUT;
        g_ev[weight_part[i]].kind = MPAR_EVENT_BACKWARD_WEIGHT;
    }
    expect_consistent(&t, 0.0, "zero-bubble synthetic");
    g_ev[9].kind = MPAR_EVENT_BACKWARD_WEIGHT, g_ev[10].kind = MPAR_EVENT_BACKWARD_INPUT;
    expect_invalid(&t, "W1 starts at 7600.000 ms, before I1 (stage 0) ends");
}

/* ---- Gantt chart ---- */

/* Whether a weight-gradient computation of `stage` runs during [a, b): a W,
   or the second part of a B (its input gradient is sent before it). */
static int in_weight_part(const mpar_timeline* t, int stage, double a, double b) {
    int i, j;
    for (i = 0; i < t->event_count; i++) {
        const mpar_event* e = &t->events[i];
        if (e->stage != stage || e->end <= a || e->start >= b) continue;
        if (e->kind == MPAR_EVENT_BACKWARD_WEIGHT) return 1;
        if (e->kind != MPAR_EVENT_BACKWARD) continue;
        for (j = 0; j < t->event_count; j++) {
            const mpar_event* o = &t->events[j];
            if (o->kind == MPAR_EVENT_BACKWARD && o->stage == stage && o->chunk == e->chunk &&
                o->microbatch == e->microbatch && o->end <= e->start)
                return 1;
        }
    }
    return 0;
}

/* Reads the chart's stage rows. Returns the columns in which two or more
   stages compute (F/B/I/W); *unexplained counts those where more than one
   of them is not in a weight-gradient part (NULL t: not counted). */
static int gantt_overlap_columns(const char* text, const mpar_timeline* t, int stages, int* compute_cells,
                                 int* unexplained) {
    const char* rows[8];
    const char* line = text;
    int n = 0, c, s, both = 0, width;
    while (line && *line && n < stages) {
        if (!strncmp(line, "stage ", 6)) rows[n++] = strchr(line, '|') + 1;
        line = strchr(line, '\n');
        if (line) line++;
    }
    assert_int_equal(n, stages);
    width = (int)(strchr(rows[0], '|') - rows[0]);
    if (unexplained) *unexplained = 0;
    for (s = 0; s < stages; s++) compute_cells[s] = 0;
    for (c = 0; c < width; c++) {
        int k = 0, other = 0;
        for (s = 0; s < stages; s++)
            if (rows[s][c] && strchr("FBIWfbiw", rows[s][c])) {
                k++, compute_cells[s]++;
                if (t && !in_weight_part(t, s, t->step_time * c / width, t->step_time * (c + 1) / width)) other++;
            }
        both += k >= 2;
        if (unexplained && k >= 2 && other >= 2) ++*unexplained;
    }
    return both;
}

static char* gantt_text(const mpar_timeline* t, int columns) {
    FILE* f = tmpfile();
    char* buf;
    long n;
    assert_non_null(f);
    mpar_timeline_print_gantt(t, f, columns);
    n = ftell(f);
    rewind(f);
    buf = (char*)calloc((size_t)n + 1, 1);
    assert_true(fread(buf, 1, (size_t)n, f) == (size_t)n);
    fclose(f);
    return buf;
}

/* Naive layer-wise parallelism keeps one device busy at a time. The
   executor sends a B's input gradient before computing its weight gradient,
   so stage s-1's backward may overlap stage s's weight part: the chart may
   show two devices computing only there (and in one boundary column).
   Utilisation: the lowest over SEQUENTIAL steps and the highest over 1F1B
   steps (up to 12 each, stopping once shown): these are wall-clock
   measurements, and another process stealing a core for a step must not
   decide the outcome. */
static void test_sequential_utilisation_and_gantt(void** state) {
    mpar_timeline t;
    mpar_timeline_stats st;
    mpar_pipeline* p;
    double seq = 1.0, best = 0.0;
    char *text, *best_text = NULL;
    int cells[2], step, overlap, unexplained;
    (void)state;
    p = make_pipeline_for(g_wide, MPAR_SCHEDULE_SEQUENTIAL, 4);
    train_step(p, &t); /* warm-up: CLBlast builds its kernels for these sizes */
    mpar_timeline_free(&t);
    for (step = 0; step < 12 && (step < 3 || seq > 0.65); step++) {
        train_step(p, &t);
        assert_int_equal(mpar_timeline_get_stats(&t, &st, NULL), MPAR_SUCCESS);
        if (st.utilisation < seq) seq = st.utilisation;
        text = gantt_text(&t, 100);
        if (getenv("MPAR_TEST_VERBOSE")) fputs(text, stdout);
        overlap = gantt_overlap_columns(text, &t, 2, cells, &unexplained);
        if (unexplained > 1) fail_msg("sequential: %d columns with both devices computing\n%s", unexplained, text);
        assert_true(cells[0] >= 10 && cells[1] >= 10);
        assert_contains(text, "sequential: 2 stages");
        if (step == 0) print_message("sequential: %d of 100 columns both compute (weight part)\n", overlap);
        free(text);
        mpar_timeline_free(&t);
    }
    mpar_pipeline_destroy(p);
    print_message("sequential utilisation %.3f\n", seq);
    assert_true(seq <= 0.65);

    /* 1F1B with 8 micro-batches overlaps the devices */
    p = make_pipeline_for(g_wide, MPAR_SCHEDULE_1F1B, 8);
    train_step(p, &t);
    mpar_timeline_free(&t);
    overlap = 0;
    for (step = 0; step < 12 && (step < 3 || best <= seq + 0.05); step++) {
        train_step(p, &t);
        assert_int_equal(mpar_timeline_get_stats(&t, &st, NULL), MPAR_SUCCESS);
        if (st.utilisation > best) {
            best = st.utilisation;
            free(best_text);
            best_text = gantt_text(&t, 100);
            overlap = gantt_overlap_columns(best_text, &t, 2, cells, &unexplained);
        }
        mpar_timeline_free(&t);
    }
    mpar_pipeline_destroy(p);
    if (getenv("MPAR_TEST_VERBOSE")) fputs(best_text, stdout);
    print_message("1f1b M=8 utilisation %.3f; %d of 100 columns both compute\n", best, overlap);
    if (overlap < 5) fail_msg("1f1b: only %d columns with both devices computing\n%s", overlap, best_text);
    free(best_text);
    assert_true(best > seq + 0.05);
}

/* The chart of the hand-made step, cell by cell. */
static void test_gantt_synthetic(void** state) {
    mpar_timeline t;
    char* text;
    (void)state;
    synthetic(&t);
    text = gantt_text(&t, 20); /* 0.5 s per column */
    /* stage 0, column 10 (5.0-5.5 s): wait 0.1, copy 0.25, B0 0.15 -> '~';
       column 19: B1 0.1 + two optimizer halves 0.4 -> 'O' */
    assert_contains(text, "stage 0  |FFFFF-----~BBBBBBBBO| busy 64.0%\n         |00111      00001111 |");
    /* stage 1, column 7 (3.5-4 s): F1 and B0 0.25 each -> the first, F1 */
    assert_contains(text, "stage 1  |--~FFFFFBBBBBBBBB.O.| busy 67.5%\n         |   00111000011111   |");
    /* the overlap counting of the SEQUENTIAL test is not blind: stage 0's F1
       runs beside stage 1's F0 (columns 3, 4: counted), B beside B with
       one of them in its weight part (columns 11-16: allowed) */
    {
        int cells[2], unexplained, both = gantt_overlap_columns(text, &t, 2, cells, &unexplained);
        assert_int_equal(cells[0], 13);
        assert_int_equal(cells[1], 14);
        assert_int_equal(both, 8);
        assert_int_equal(unexplained, 2);
    }
    free(text);
}

/* ---- a hand-made ZB-V step: chunks placed in a V ---- */

/* P = 2, M = 1, two chunks per stage in a V: stage 0 runs virtual stages 0
   and 3 (the loss), stage 1 runs 1 and 2, so chunk 1 of stage 1 is virtual
   stage 2, not 1 * P + 1 = 3. Copies cross boundaries 0 (stages 0 and 1)
   and 2 (stages 1 and 0); boundary 1 stays on stage 1. */
static mpar_event v_ev[24];

static mpar_event vc(mpar_event_kind kind, int stage, int chunk, double start, double end) {
    mpar_event e = ev(kind, stage, kind == MPAR_EVENT_OPTIMIZER_STEP ? -1 : 0, start, end);
    e.chunk = chunk;
    return e;
}
static mpar_event vl(mpar_event_kind kind, int stage, int chunk, int boundary, int gradient, double start,
                     double end) {
    mpar_event e = lk(kind, stage, 0, gradient, start, end, 100);
    e.chunk = chunk, e.boundary = boundary;
    return e;
}

static void v_shaped(mpar_timeline* t, int with_links) {
    int n = 0;
    v_ev[n++] = vc(MPAR_EVENT_FORWARD, 0, 0, 0.0, 1.0);
    if (with_links) v_ev[n++] = vl(MPAR_EVENT_SEND, 0, 0, 0, 0, 1.0, 1.1);
    if (with_links) v_ev[n++] = vl(MPAR_EVENT_RECEIVE, 1, 0, 0, 0, 1.1, 1.2);
    v_ev[n++] = vc(MPAR_EVENT_FORWARD, 1, 0, 1.2, 2.2);
    v_ev[n++] = vc(MPAR_EVENT_FORWARD, 1, 1, 2.2, 3.2);
    if (with_links) v_ev[n++] = vl(MPAR_EVENT_SEND, 1, 1, 2, 0, 3.2, 3.3);
    if (with_links) v_ev[n++] = vl(MPAR_EVENT_RECEIVE, 0, 1, 2, 0, 3.3, 3.4);
    v_ev[n++] = vc(MPAR_EVENT_FORWARD, 0, 1, 3.4, 4.4);
    v_ev[n++] = vc(MPAR_EVENT_BACKWARD_INPUT, 0, 1, 4.4, 5.4);
    if (with_links) v_ev[n++] = vl(MPAR_EVENT_SEND, 0, 1, 2, 1, 5.4, 5.5);
    v_ev[n++] = vc(MPAR_EVENT_BACKWARD_WEIGHT, 0, 1, 5.5, 6.5);
    if (with_links) v_ev[n++] = vl(MPAR_EVENT_RECEIVE, 1, 1, 2, 1, 5.5, 5.6);
    v_ev[n++] = vc(MPAR_EVENT_BACKWARD_INPUT, 1, 1, 5.6, 6.6);
    v_ev[n++] = vc(MPAR_EVENT_BACKWARD_INPUT, 1, 0, 6.6, 7.6);
    if (with_links) v_ev[n++] = vl(MPAR_EVENT_SEND, 1, 0, 0, 1, 7.6, 7.7);
    v_ev[n++] = vc(MPAR_EVENT_BACKWARD_WEIGHT, 1, 1, 7.7, 8.7);
    v_ev[n++] = vc(MPAR_EVENT_BACKWARD_WEIGHT, 1, 0, 8.7, 9.7);
    v_ev[n++] = vc(MPAR_EVENT_OPTIMIZER_STEP, 1, 0, 9.7, 10.0);
    if (with_links) v_ev[n++] = vl(MPAR_EVENT_RECEIVE, 0, 0, 0, 1, 7.7, 7.8);
    v_ev[n++] = vc(MPAR_EVENT_BACKWARD_INPUT, 0, 0, 7.8, 8.8);
    v_ev[n++] = vc(MPAR_EVENT_BACKWARD_WEIGHT, 0, 0, 8.8, 9.8);
    v_ev[n++] = vc(MPAR_EVENT_OPTIMIZER_STEP, 0, 0, 9.8, 10.0);
    memset(t, 0, sizeof *t);
    t->stages = 2, t->virtual_stages = 2, t->microbatches = 1;
    t->schedule = MPAR_SCHEDULE_ZB_V;
    t->step_time = 10.0;
    t->event_count = n;
    t->events = v_ev;
}

static char* written(const mpar_timeline* t, int svg) {
    FILE* f = tmpfile();
    char* buf;
    long n;
    assert_non_null(f);
    assert_int_equal(svg ? mpar_timeline_write_svg(t, f) : mpar_timeline_write_chrome_trace(t, f), MPAR_SUCCESS);
    n = ftell(f);
    rewind(f);
    buf = (char*)calloc((size_t)n + 1, 1);
    assert_true(fread(buf, 1, (size_t)n, f) == (size_t)n);
    fclose(f);
    return buf;
}

/* The Gantt chart of the V, cell by cell on stage 1 (0.5 s per column; a
   cell with half a slice of compute shows its longest event), and each
   stage's chunks as the virtual stages the copies say. */
static void test_gantt_v_shape(void** state) {
    mpar_timeline t;
    char* text;
    (void)state;
    v_shaped(&t, 1);
    text = gantt_text(&t, 20);
    if (getenv("MPAR_TEST_VERBOSE")) fputs(text, stdout);
    assert_contains(text, "stage 1  |..FFff.....iiIIwwWWO| busy 63.0%\n"
                          "         |  0000     00000000 |\n"
                          "   chunk |  0011     11001100 | chunk = virtual stage: 0=1, 1=2\n");
    assert_contains(text, "   chunk |");
    assert_contains(text, "| chunk = virtual stage: 0=0, 1=3\n");
    assert_contains(text, "third: chunk");
    free(text);
    /* no copies to read it from: the kind's placement, a V for ZB-V and
       vs mod P when interleaved */
    v_shaped(&t, 0);
    text = gantt_text(&t, 20);
    assert_contains(text, "| chunk = virtual stage: 0=1, 1=2\n");
    free(text);
    t.schedule = MPAR_SCHEDULE_INTERLEAVED_1F1B;
    text = gantt_text(&t, 20);
    assert_contains(text, "| chunk = virtual stage: 0=1, 1=3\n");
    free(text);
    /* copies outrank the kind: a synthesized (AUTO) step has no fixed
       placement, its copies still show the V */
    v_shaped(&t, 1);
    t.schedule = MPAR_SCHEDULE_AUTO;
    text = gantt_text(&t, 20);
    assert_contains(text, "| chunk = virtual stage: 0=1, 1=2\n");
    assert_contains(text, "| chunk = virtual stage: 0=0, 1=3\n");
    free(text);
    /* one chunk per stage: no chunk line (the GPipe chart above is exact) */
    synthetic(&t);
    text = gantt_text(&t, 20);
    assert_null(strstr(text, "chunk |"));
    free(text);
}

/* Link directions name the stages at their ends, stage tracks their virtual
   stages, compute slices their chunk and virtual stage; the SVG labels
   boxes m.c, shades chunk 1 and names each lane's virtual stages; the link
   table of the stats agrees. */
static void test_trace_svg_stats_v_shape(void** state) {
    mpar_timeline t;
    mpar_timeline_link_stats ls;
    char* text;
    FILE* f;
    long n;
    (void)state;
    v_shaped(&t, 1);
    text = written(&t, 0);
    assert_contains(text, "\"name\":\"stage 0 (virtual stages 0, 3)\"");
    assert_contains(text, "\"name\":\"stage 1 (virtual stages 1, 2)\"");
    assert_contains(text, "\"name\":\"link 0: stage 0 -> 1 activations\"");
    assert_contains(text, "\"name\":\"link 1: stage 1 -> 1 activations\"");
    assert_contains(text, "\"name\":\"link 2: stage 1 -> 0 activations\"");
    assert_contains(text, "\"name\":\"link 2: stage 0 -> 1 gradients\"");
    assert_contains(text, "{\"name\":\"F0.1\",\"cat\":\"forward\",\"ph\":\"X\",\"pid\":0,\"tid\":1,");
    assert_contains(text, "\"stage\":1,\"microbatch\":0,\"chunk\":1,\"start_us\":2200000.000,\"end_us\":3200000.000,"
                          "\"virtual_stage\":2}");
    assert_contains(text, "\"stage\":0,\"microbatch\":0,\"chunk\":1,\"start_us\":3400000.000,\"end_us\":4400000.000,"
                          "\"virtual_stage\":3}");
    free(text);
    text = written(&t, 1);
    assert_contains(text, ">vs 0, 3</text>");
    assert_contains(text, ">vs 1, 2</text>");
    assert_contains(text, "boxes m.c: micro-batch m, chunk c");
    assert_contains(text, "fill-opacity=\"0.55\" stroke=\"#ffffff\" stroke-width=\"0.5\"><title>F0.1, stage 1, chunk 1:");
    assert_contains(text, "fill-opacity=\"1.00\" stroke=\"#ffffff\" stroke-width=\"0.5\"><title>F0.0, stage 1, chunk 0:");
    assert_contains(text, ">0.1</text>");
    free(text);
    assert_int_equal(mpar_timeline_get_link_stats(&t, 2, 0, &ls, NULL), MPAR_SUCCESS);
    assert_true(ls.from_stage == 1 && ls.to_stage == 0 && ls.messages == 1 && ls.received == 1);
    assert_int_equal(mpar_timeline_get_link_stats(&t, 1, 1, &ls, NULL), MPAR_SUCCESS);
    assert_true(ls.from_stage == 1 && ls.to_stage == 1 && ls.messages == 0);
    f = tmpfile();
    assert_non_null(f);
    mpar_timeline_print_stats(&t, f);
    n = ftell(f);
    rewind(f);
    text = (char*)calloc((size_t)n + 1, 1);
    assert_true(fread(text, 1, (size_t)n, f) == (size_t)n);
    fclose(f);
    assert_contains(text, "b2 A 1->0");
    assert_contains(text, "b2 G 0->1");
    assert_contains(text, "b0 G 1->0");
    free(text);
}

/* ---- Chrome trace and SVG ---- */

static int have(const char* cmd) {
    char buf[256];
    snprintf(buf, sizeof buf, "command -v %s >/dev/null 2>&1", cmd);
    return system(buf) == 0;
}

static void write_file(const char* path, const mpar_timeline* t, int svg) {
    FILE* f = fopen(path, "w");
    assert_non_null(f);
    assert_int_equal(svg ? mpar_timeline_write_svg(t, f) : mpar_timeline_write_chrome_trace(t, f), MPAR_SUCCESS);
    fclose(f);
}

/* Python checks the trace: JSON; one named track per stage and per link
   direction; every stage and link track has slices; slices of a track
   do not overlap. */
static const char* const trace_checker =
    "import json,sys\n"
    "d=json.load(open(sys.argv[1])); P=int(sys.argv[2]); L=int(sys.argv[3])\n"
    "ev=d['traceEvents']\n"
    "names={e['tid']:e['args']['name'] for e in ev if e['ph']=='M' and e['name']=='thread_name'}\n"
    "assert len(names)==P+L, names\n"
    "assert sum(n.startswith('stage ') for n in names.values())==P, names\n"
    "assert sum(n.startswith('link ') for n in names.values())==L, names\n"
    "x=[e for e in ev if e['ph']=='X']\n"
    "assert all(e['dur']>=0 and e['ts']>=0 for e in x)\n"
    "for tid in names:\n"
    "  s=sorted((e['ts'],e['ts']+e['dur']) for e in x if e['tid']==tid)\n"
    "  assert s, 'empty track %s'%names[tid]\n"
    "  assert all(b[0]>=a[1]-1e-3 for a,b in zip(s,s[1:])), names[tid]\n"
    "assert any(e['name'] in ('F3','F3.1') and e['args']['microbatch']==3 for e in x)\n"
    "assert any(e['cat']=='send' and e['args']['bytes']>0 for e in x)\n";

static void test_trace_and_svg(void** state) {
    static const mpar_schedule_kind kinds[] = {MPAR_SCHEDULE_1F1B, MPAR_SCHEDULE_INTERLEAVED_1F1B};
    char json[] = "/tmp/mpar_tl_XXXXXX", cmd[1024];
    size_t k;
    int fd;
    (void)state;
    fd = mkstemp(json);
    assert_true(fd >= 0);
    close(fd);
    if (!have("python3")) {
        print_message("python3 not found: trace and SVG not parsed\n");
        unlink(json);
        skip();
    }
    for (k = 0; k < 2; k++) {
        mpar_pipeline* p = make_pipeline(kinds[k], 4);
        mpar_timeline t;
        char svg[64];
        train_step(p, &t);
        write_file(json, &t, 0);
        snprintf(cmd, sizeof cmd, "python3 -c \"$MPAR_TL_CHECKER\" %s %d %d", json, t.stages, mpar_timeline_link_count(&t));
        setenv("MPAR_TL_CHECKER", trace_checker, 1);
        if (system(cmd) != 0) fail_msg("%s: Chrome trace %s failed the checks", mpar_schedule_kind_name(kinds[k]), json);
        snprintf(svg, sizeof svg, "%s.svg", json);
        write_file(svg, &t, 1);
        snprintf(cmd, sizeof cmd,
                 "python3 -c \"import sys,xml.etree.ElementTree as E; r=E.parse(sys.argv[1]).getroot(); "
                 "n=sum(1 for e in r.iter() if e.tag.endswith('rect')); sys.exit(0 if n>=%d else 1)\" %s",
                 t.event_count, svg);
        if (system(cmd) != 0) fail_msg("SVG %s is not XML or lacks boxes", svg);
        unlink(svg);
        mpar_timeline_free(&t);
        mpar_pipeline_destroy(p);
    }
    unlink(json);
}

/* The browsers scripts/check-svg.sh looks for. */
static int have_browser(void) { return have("chromium") || have("chromium-browser") || have("google-chrome"); }

/* Well-formed XML can still render blank: scripts/check-svg.sh renders the
   SVG in headless Chromium and checks the picture. Without Chromium or
   python3 (a developer machine) the check cannot run: it is skipped loudly,
   a SKIPPED line here and in cmocka's summary, and make test still passes.
   CI installs Chromium (.ci/run), so there (CI set, as CI services do) a
   missing one fails instead of passing unseen. */
static void test_svg_renders_in_chromium(void** state) {
    static const mpar_schedule_kind kinds[] = {MPAR_SCHEDULE_1F1B, MPAR_SCHEDULE_INTERLEAVED_1F1B};
    const char* ci = getenv("CI");
    char svg[] = "/tmp/mpar_svg_XXXXXX", path[64], cmd[256];
    size_t k;
    int fd;
    (void)state;
    if (!have_browser() || !have("python3")) {
        const char* missing = have_browser() ? "python3" : "chromium";
        if (ci && *ci && strcmp(ci, "0") != 0 && strcmp(ci, "false") != 0)
            fail_msg("CI=%s, but %s is not installed: the SVG rendering check cannot run", ci, missing);
        print_message("SKIPPED: the timeline SVG was not rendered: %s not installed (apt-get install chromium "
                      "python3; CI installs them)\n", missing);
        skip();
    }
    fd = mkstemp(svg);
    assert_true(fd >= 0);
    close(fd);
    unlink(svg);
    for (k = 0; k < 2; k++) {
        mpar_pipeline* p = make_pipeline(kinds[k], 4);
        mpar_timeline t;
        int rc;
        train_step(p, &t);
        snprintf(path, sizeof path, "%s.svg", svg);
        write_file(path, &t, 1);
        mpar_timeline_free(&t);
        mpar_pipeline_destroy(p);
        snprintf(cmd, sizeof cmd, "scripts/check-svg.sh %s %s.png", path, svg);
        rc = system(cmd);
        if (rc != 0)
            fail_msg("%s: scripts/check-svg.sh %s failed (exit status %d)", mpar_schedule_kind_name(kinds[k]), path,
                     WIFEXITED(rc) ? WEXITSTATUS(rc) : -1);
        unlink(path);
        snprintf(path, sizeof path, "%s.png", svg);
        unlink(path);
    }
}

int main(int argc, char** argv) {
    const struct CMUnitTest async_tests[] = {
        cmocka_unit_test(test_real_timelines_consistent),
        cmocka_unit_test(test_copies_apart_from_compute),
    };
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_synthetic_stats),
        cmocka_unit_test(test_prediction_models_the_executor),
        cmocka_unit_test(test_check_catches_corruption),
        cmocka_unit_test(test_gantt_synthetic),
        cmocka_unit_test(test_gantt_v_shape),
        cmocka_unit_test(test_trace_svg_stats_v_shape),
        cmocka_unit_test(test_real_timelines_consistent),
        cmocka_unit_test(test_copies_apart_from_compute),
        cmocka_unit_test(test_sequential_utilisation_and_gantt),
        cmocka_unit_test(test_trace_and_svg),
        cmocka_unit_test(test_svg_renders_in_chromium),
    };
    if (argc > 1 && !strcmp(argv[1], "--async-devices")) { /* see test_copies_apart_from_compute */
        g_async_child = 1;
        return cmocka_run_group_tests(async_tests, setup, teardown);
    }
    return cmocka_run_group_tests(tests, setup, teardown);
}
