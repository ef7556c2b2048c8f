/* Pipeline tests: every schedule on 2, 3 and 4 stages gives the same loss
   and parameters as one stage on one device, bit for bit (same PoCL
   driver); one context per device too, and two platforms when run by
   scripts/run-tests.sh with MPAR_TEST_PLATFORMS=2. Memory accounting,
   failure handling and bad input. */
#define MPAR_IMPLEMENTATION
#include "mpar.h"

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

const char* __lsan_default_suppressions(void);
const char* __lsan_default_suppressions(void) { return "leak:libpocl.so\nleak:libLLVM\n"; }

enum { IN = 24, HID = 24, CLASSES = 6, BATCH = 30, STEPS = 3 };

static mpar_context* g_ctx;      /* devices share a context per platform */
static mpar_context* g_ctx_sep;  /* one context per device */
static mpar_model* g_model;
static float g_x[BATCH * IN];
static int32_t g_y[BATCH];

static int setup(void** state) {
    mpar_desc d;
    mpar_error err;
    mpar_model_desc md;
    uint64_t s = 7;
    int i;
    (void)state;
    memset(&d, 0, sizeof d);
    d.error = &err;
    if (mpar_create(&d, &g_ctx) != MPAR_SUCCESS) return -1;
    d.context_per_device = 1;
    if (mpar_create(&d, &g_ctx_sep) != MPAR_SUCCESS) return -1;
    memset(&md, 0, sizeof md);
    md.input_features = IN;
    md.seed = 1234;
    if (mpar_model_create(&md, &g_model, &err) != MPAR_SUCCESS) return -1;
    for (i = 0; i < 6; i++) { /* 14 layers: enough for 4 stages × 2 chunks */
        mpar_model_add_linear(g_model, HID, &err);
        mpar_model_add_simple(g_model, i % 2 ? mpar_layer_tanh() : mpar_layer_relu(), &err);
    }
    mpar_model_add_linear(g_model, CLASSES, &err);
    if (mpar_model_add_simple(g_model, mpar_layer_cross_entropy(), &err) != MPAR_SUCCESS) return -1;
    for (i = 0; i < BATCH * IN; i++) g_x[i] = (float)(2.0 * mpar__rng_uniform(&s) - 1.0);
    for (i = 0; i < BATCH; i++) g_y[i] = (int32_t)(mpar__rng_next(&s) % CLASSES);
    g_y[3] = -1; /* an ignored row */
    return 0;
}

static int teardown(void** state) {
    (void)state;
    mpar_model_destroy(g_model);
    mpar_destroy(g_ctx_sep);
    mpar_destroy(g_ctx);
    return 0;
}

typedef struct run_result {
    double loss[STEPS];
    float* params; /* all layers, concatenated */
    int peak[4], slots[4]; /* per device stage, from mpar_pipeline_get_stats */
} run_result;

/* Trains STEPS steps with `stages` stages (× V chunks), devices used round
   robin, and returns the losses and final parameters. */
static int g_recompute;           /* run() passes these to the pipeline */
static mpar_link_mode g_link_mode;
static const mpar_schedule* g_lists; /* a schedule object to run instead of `kind` */
static int g_split_apply;            /* compute_gradients + apply_gradients instead of train_step */
static const int* g_caps;            /* pd.max_in_flight */

static void run(mpar_context* ctx, mpar_schedule_kind kind, int stages, int V, int M, run_result* out) {
    mpar_stage_desc st[32];
    mpar_pipeline_desc pd;
    mpar_pipeline* p = NULL;
    mpar_batch b;
    mpar_pipeline_stats stats;
    int L = mpar_model_layer_count(g_model), n = stages * V, j, step;
    size_t off = 0;
    mpar_schedule* placed = NULL; /* where the kind's lists put each chunk (ZB-V: a V) */
    if (!g_lists) /* AUTO keeps the placement of the kind it is planned as */
        assert_int_equal(mpar_schedule_create(kind == MPAR_SCHEDULE_AUTO ? MPAR_SCHEDULE_ZB_H1 : kind, stages, M, V,
                                              &placed, NULL), MPAR_SUCCESS);
    for (j = 0; j < n; j++) {
        st[j].device = mpar_schedule_stage_of(g_lists ? g_lists : placed, j) % mpar_device_count(ctx);
        st[j].first_layer = L * j / n;
        st[j].last_layer = L * (j + 1) / n - 1;
    }
    memset(&pd, 0, sizeof pd);
    pd.stages = st;
    pd.stage_count = n;
    pd.schedule = kind;
    pd.microbatches = M;
    pd.virtual_stages = V;
    pd.max_batch = BATCH;
    pd.optimizer.kind = MPAR_OPTIMIZER_ADAMW;
    pd.optimizer.lr = 0.01f;
    pd.optimizer.weight_decay = 0.01f;
    pd.optimizer.clip_norm = 0.5f;
    pd.recompute = g_recompute;
    pd.link_mode = g_link_mode;
    pd.max_run_ahead = g_link_mode == MPAR_LINK_ASYNC ? 1 : 0; /* the tightest bound, and the default (4) */
    pd.schedule_lists = g_lists;
    pd.max_in_flight = g_caps;
    mpar_schedule_destroy(placed);
    if (mpar_pipeline_create(ctx, g_model, &pd, &p) != MPAR_SUCCESS) fail_msg("create: %s", mpar_last_error(ctx));
    if (kind == MPAR_SCHEDULE_AUTO && !g_lists) { /* synthesised: custom lists that validate, within the caps */
        const mpar_schedule* sc = mpar_pipeline_get_schedule(p);
        assert_non_null(sc);
        assert_int_equal(sc->custom, 1);
        assert_int_equal(sc->microbatches, M);
        assert_int_equal(mpar_schedule_validate(sc, NULL), MPAR_SUCCESS);
        for (j = 0; g_caps && j < stages; j++) assert_true(sc->peak_in_flight[j] <= g_caps[j]);
    }
    b.inputs = g_x, b.targets = g_y, b.samples = BATCH;
    for (step = 0; step < STEPS; step++) {
        mpar_step_info info;
        if (g_split_apply) {
            if (mpar_pipeline_compute_gradients(p, &b, &info) != MPAR_SUCCESS ||
                mpar_pipeline_apply_gradients(p, &info) != MPAR_SUCCESS)
                fail_msg("step: %s", mpar_last_error(ctx));
        } else if (mpar_pipeline_train_step(p, &b, &info) != MPAR_SUCCESS) {
            fail_msg("step: %s", mpar_last_error(ctx));
        }
        assert_int_equal(info.counted_rows, BATCH - 1);
        out->loss[step] = info.loss;
    }
    out->params = (float*)malloc(sizeof(float) * mpar_model_param_count(g_model));
    for (j = 0; j < L; j++) {
        assert_int_equal(mpar_pipeline_get_params(p, j, out->params + off), MPAR_SUCCESS);
        off += mpar_model_layer(g_model, j)->param_count;
    }
    assert_int_equal(mpar_pipeline_get_stats(p, &stats), MPAR_SUCCESS);
    assert_int_equal(stats.stages, stages);
    for (j = 0; j < stages && j < 4; j++) out->peak[j] = stats.peak_in_flight[j], out->slots[j] = stats.slots[j];
    /* the transport asked for is the one that ran (AUTO: host-staged, as
       every device here is a CPU) */
    assert_int_equal(stats.boundaries, n - 1);
    for (j = 0; j < n - 1; j++) {
        assert_int_equal(stats.link_modes[j], g_link_mode == MPAR_LINK_AUTO ? MPAR_LINK_HOST_STAGED : g_link_mode);
        assert_int_equal(stats.link_overlaps[j], g_link_mode == MPAR_LINK_ASYNC);
    }
    mpar_pipeline_destroy(p);
}

static void expect_same(const run_result* a, const run_result* b, const char* what) {
    size_t n = mpar_model_param_count(g_model), i;
    int s;
    for (s = 0; s < STEPS; s++)
        if (a->loss[s] != b->loss[s]) fail_msg("%s: loss of step %d differs: %.9g vs %.9g", what, s, a->loss[s], b->loss[s]);
    for (i = 0; i < n; i++)
        if (memcmp(&a->params[i], &b->params[i], sizeof(float)) != 0)
            fail_msg("%s: parameter %zu differs: %.9g vs %.9g", what, i, (double)a->params[i], (double)b->params[i]);
}

static void equality_for(mpar_schedule_kind kind, int V) {
    run_result base, other;
    int stages, c;
    const int M = 8;
    /* the single-device reference: same micro-batches, one stage */
    run(g_ctx, kind == MPAR_SCHEDULE_SEQUENTIAL ? kind : MPAR_SCHEDULE_1F1B, 1, 1, M, &base);
    assert_true(base.loss[STEPS - 1] < base.loss[0]); /* it learns */
    /* c = 0: shared context, links chosen by AUTO (host-staged on CPU
       devices); 1: one context per device; 2: device-side copies forced;
       3: asynchronous links (copy queue, events) in the shared context (in
       two contexts under MPAR_TEST_PLATFORMS); 4: asynchronous links across
       contexts (pinned host memory) */
    static const mpar_link_mode modes[5] = {MPAR_LINK_AUTO, MPAR_LINK_AUTO, MPAR_LINK_DEVICE_COPY, MPAR_LINK_ASYNC,
                                            MPAR_LINK_ASYNC};
    for (c = 0; c < 5; c++)
        for (stages = 2; stages <= 4; stages++) {
            char what[96];
            if ((c == 1 || c == 2 || c == 4) && stages != 2) continue;
            if (c == 2 && getenv("MPAR_TEST_PLATFORMS")) continue; /* no shared context there */
            g_link_mode = modes[c];
            run(c == 1 || c == 4 ? g_ctx_sep : g_ctx, kind, stages, V, M, &other);
            g_link_mode = MPAR_LINK_AUTO;
            snprintf(what, sizeof what, "%s, %d stages, V=%d%s", mpar_schedule_kind_name(kind), stages, V,
                     c == 1 ? ", context per device" : c == 2 ? ", device copies"
                     : c == 3 ? ", asynchronous links" : c == 4 ? ", asynchronous links across contexts" : "");
            expect_same(&base, &other, what);
            free(other.params);
        }
    free(base.params);
}

static void test_equal_sequential(void** s) { (void)s; equality_for(MPAR_SCHEDULE_SEQUENTIAL, 1); }
static void test_equal_gpipe(void** s) { (void)s; equality_for(MPAR_SCHEDULE_GPIPE, 1); }
static void test_equal_1f1b(void** s) { (void)s; equality_for(MPAR_SCHEDULE_1F1B, 1); }
static void test_equal_interleaved(void** s) { (void)s; equality_for(MPAR_SCHEDULE_INTERLEAVED_1F1B, 2); }
static void test_equal_zbh1(void** s) { (void)s; equality_for(MPAR_SCHEDULE_ZB_H1, 1); }
static void test_equal_zbh2(void** s) { (void)s; equality_for(MPAR_SCHEDULE_ZB_H2, 1); }
static void test_equal_zbv(void** s) { (void)s; equality_for(MPAR_SCHEDULE_ZB_V, 2); }
static void test_equal_auto(void** s) { (void)s; equality_for(MPAR_SCHEDULE_AUTO, 1); }

/* Recomputing activations in backward changes memory, not results. */
static void test_recompute(void** state) {
    run_result base, other;
    (void)state;
    run(g_ctx, MPAR_SCHEDULE_1F1B, 1, 1, 8, &base);
    g_recompute = 1;
    run(g_ctx, MPAR_SCHEDULE_1F1B, 3, 1, 8, &other);
    expect_same(&base, &other, "1f1b with recompute");
    free(other.params);
    run(g_ctx, MPAR_SCHEDULE_ZB_H1, 2, 1, 8, &other);
    expect_same(&base, &other, "zbh1 with recompute");
    free(other.params);
    g_recompute = 0;
    free(base.params);
}

/* Peak stashed micro-batches on every stage, from the executor's
   accounting, against what each schedule's lists hold (section 6: a stash
   is taken at F and freed at B, or at W for a split backward), and the
   activation slots allocated: each chunk exactly its own peak, counted
   here by walking the lists (at least one slot a chunk). P = 4, M = 8. */
static int chunk_slots(mpar_schedule_kind kind, int P, int M, int V, int stage) {
    mpar_schedule* sc = NULL;
    int c, i, total = 0;
    assert_int_equal(mpar_schedule_create(kind, P, M, V, &sc, NULL), MPAR_SUCCESS);
    for (c = 0; c < V; c++) {
        int now = 0, most = 0;
        for (i = 0; i < mpar_schedule_action_count(sc, stage); i++) {
            const mpar_action* a = mpar_schedule_action(sc, stage, i);
            if (a->chunk != c) continue;
            if (a->kind == MPAR_ACTION_FORWARD && ++now > most) most = now;
            if (a->kind == MPAR_ACTION_BACKWARD || a->kind == MPAR_ACTION_BACKWARD_WEIGHT) now--;
        }
        total += most > 1 ? most : 1;
    }
    mpar_schedule_destroy(sc);
    return total;
}

static void expect_peaks(mpar_schedule_kind kind, int V, const int* peak, int recompute) {
    run_result r;
    const int M = 8, P = 4;
    int s;
    g_recompute = recompute;
    run(g_ctx, kind, P, V, M, &r);
    g_recompute = 0;
    for (s = 0; s < P; s++) {
        int slots = chunk_slots(kind, P, M, V, s);
        if (V == 1 && slots != (peak[s] > 1 ? peak[s] : 1)) fail_msg("stage %d: %d slots from the lists", s, slots);
        if (r.peak[s] != peak[s] || r.slots[s] != slots)
            fail_msg("%s V=%d%s, stage %d: peak %d in flight and %d slots, expected %d and %d",
                     mpar_schedule_kind_name(kind), V, recompute ? " recompute" : "", s, r.peak[s], r.slots[s],
                     peak[s], slots);
    }
    free(r.params);
}

static void test_memory_accounting(void** state) {
    /* GPipe: all M forwards before the first B. 1F1B: min(M, P - s).
       ZB-H1: 1F1B's P - s plus the s deferred W's: min(M, P) on every
       stage. SEQUENTIAL: the batch is one micro-batch. Interleaved V = 2
       (chunk units): 2(P-s-1) + (V-1)P warm-up forwards and one more,
       P dividing M. ZB-H2 (M >= 2P-1): 2P-1 on every stage. ZB-V (chunk
       units, two chunks of half a stage each): 2P on every device, 1F1B's
       stage-0 activation memory. */
    static const int gpipe[4] = {8, 8, 8, 8}, one_f_one_b[4] = {4, 3, 2, 1}, zbh1[4] = {4, 4, 4, 4},
                     sequential[4] = {1, 1, 1, 1}, interleaved[4] = {11, 9, 7, 5}, zbh2[4] = {7, 7, 7, 7},
                     zbv[4] = {8, 8, 8, 8};
    (void)state;
    expect_peaks(MPAR_SCHEDULE_GPIPE, 1, gpipe, 0);
    expect_peaks(MPAR_SCHEDULE_1F1B, 1, one_f_one_b, 0);
    expect_peaks(MPAR_SCHEDULE_ZB_H1, 1, zbh1, 0);
    expect_peaks(MPAR_SCHEDULE_SEQUENTIAL, 1, sequential, 0);
    expect_peaks(MPAR_SCHEDULE_INTERLEAVED_1F1B, 2, interleaved, 0);
    expect_peaks(MPAR_SCHEDULE_ZB_H2, 1, zbh2, 0);
    expect_peaks(MPAR_SCHEDULE_ZB_V, 2, zbv, 0);
    /* recomputing changes what a slot holds, not how many are held */
    expect_peaks(MPAR_SCHEDULE_ZB_H1, 1, zbh1, 1);
}

/* A failure on the last stage mid-step: an error naming stage and action
   within a second, and every worker thread stops (destroy joins them). */
static void test_fault_on_last_stage(void** state) {
    mpar_stage_desc st[2] = {{0, 0, 6}, {1, 7, 13}};
    mpar_pipeline_desc pd;
    mpar_pipeline* p = NULL;
    mpar_batch b;
    mpar_step_info info;
    double t0, t1;
    mpar_result r;
    (void)state;
    memset(&pd, 0, sizeof pd);
    pd.stages = st, pd.stage_count = 2, pd.schedule = MPAR_SCHEDULE_1F1B, pd.microbatches = 8, pd.max_batch = BATCH;
    pd.inject_fault = 1, pd.fault_stage = 1, pd.fault_action = 7;
    assert_int_equal(mpar_pipeline_create(g_ctx, g_model, &pd, &p), MPAR_SUCCESS);
    b.inputs = g_x, b.targets = g_y, b.samples = BATCH;
    t0 = mpar__now();
    r = mpar_pipeline_train_step(p, &b, &info);
    t1 = mpar__now();
    assert_int_equal(r, MPAR_ERROR_ABORTED);
    assert_true(t1 - t0 < 1.0);
    if (!strstr(mpar_last_error(g_ctx), "stage 1") || !strstr(mpar_last_error(g_ctx), "action ") ||
        !strstr(mpar_last_error(g_ctx), "fault injected"))
        fail_msg("error detail: %s", mpar_last_error(g_ctx));
    /* still usable: the next step fails the same way, not with a hang */
    assert_int_equal(mpar_pipeline_train_step(p, &b, &info), MPAR_ERROR_ABORTED);
    assert_int_equal(mpar_pipeline_apply_gradients(p, &info), MPAR_ERROR_INVALID_STATE);
    t0 = mpar__now();
    mpar_pipeline_destroy(p);
    assert_true(mpar__now() - t0 < 1.0);
}

static void test_bad_input(void** state) {
    mpar_stage_desc gap[2] = {{0, 0, 5}, {1, 7, 13}}, order[2] = {{0, 7, 13}, {1, 0, 6}},
                    short_[2] = {{0, 0, 5}, {1, 6, 12}}, nodev[2] = {{0, 0, 6}, {9, 7, 13}},
                    two_ok[2] = {{0, 0, 6}, {1, 7, 13}},
                    two_chunks[4] = {{0, 0, 3}, {1, 4, 7}, {0, 8, 10}, {1, 11, 13}};
    mpar_pipeline_desc pd;
    mpar_pipeline* p = NULL;
    mpar_batch b;
    mpar_step_info info;
    int32_t bad_y[BATCH];
    (void)state;
    memset(&pd, 0, sizeof pd);
    pd.max_batch = BATCH, pd.stage_count = 2;
    pd.stages = gap;
    assert_int_equal(mpar_pipeline_create(g_ctx, g_model, &pd, &p), MPAR_ERROR_INVALID_PLAN);
    assert_non_null(strstr(mpar_last_error(g_ctx), "contiguous"));
    assert_null(p);
    pd.stages = order;
    assert_int_equal(mpar_pipeline_create(g_ctx, g_model, &pd, &p), MPAR_ERROR_INVALID_PLAN);
    pd.stages = short_;
    assert_int_equal(mpar_pipeline_create(g_ctx, g_model, &pd, &p), MPAR_ERROR_INVALID_PLAN);
    assert_non_null(strstr(mpar_last_error(g_ctx), "14 layers"));
    pd.stages = nodev;
    assert_int_equal(mpar_pipeline_create(g_ctx, g_model, &pd, &p), MPAR_ERROR_INVALID_PLAN);
    assert_non_null(strstr(mpar_last_error(g_ctx), "device 9 does not exist"));
    pd.stages = two_ok, pd.link_mode = MPAR_LINK_DEVICE_COPY;
    assert_int_equal(mpar_pipeline_create(g_ctx_sep, g_model, &pd, &p), MPAR_ERROR_INVALID_ARGUMENT);
    assert_non_null(strstr(mpar_last_error(g_ctx_sep), "do not share"));
    pd.link_mode = (mpar_link_mode)7;
    assert_int_equal(mpar_pipeline_create(g_ctx, g_model, &pd, &p), MPAR_ERROR_INVALID_ARGUMENT);
    pd.link_mode = MPAR_LINK_AUTO, pd.max_run_ahead = -1;
    assert_int_equal(mpar_pipeline_create(g_ctx, g_model, &pd, &p), MPAR_ERROR_INVALID_ARGUMENT);
    assert_non_null(strstr(mpar_last_error(g_ctx), "max_run_ahead -1"));
    pd.max_run_ahead = 65;
    assert_int_equal(mpar_pipeline_create(g_ctx, g_model, &pd, &p), MPAR_ERROR_INVALID_ARGUMENT);
    assert_non_null(strstr(mpar_last_error(g_ctx), "max_run_ahead 65"));
    pd.max_run_ahead = 0;
    pd.link_mode = MPAR_LINK_AUTO, pd.stages = gap, pd.stage_count = 2;
    pd.stages = NULL, pd.stage_count = 0, pd.max_batch = 0;
    assert_int_equal(mpar_pipeline_create(g_ctx, g_model, &pd, &p), MPAR_ERROR_INVALID_ARGUMENT);
    pd.max_batch = 4, pd.microbatches = 8;
    assert_int_equal(mpar_pipeline_create(g_ctx, g_model, &pd, &p), MPAR_ERROR_INVALID_ARGUMENT);
    pd.microbatches = 2, pd.virtual_stages = 2, pd.schedule = MPAR_SCHEDULE_1F1B;
    pd.stages = two_chunks, pd.stage_count = 4; /* V>1 needs interleaved: the schedule refuses it */
    assert_int_equal(mpar_pipeline_create(g_ctx, g_model, &pd, &p), MPAR_ERROR_INVALID_ARGUMENT);
    assert_non_null(strstr(mpar_last_error(g_ctx), "only the interleaved"));
    assert_null(p);
    pd.stages = NULL, pd.stage_count = 0;
    assert_int_equal(mpar_pipeline_create(NULL, g_model, &pd, &p), MPAR_ERROR_INVALID_ARGUMENT);
    pd.virtual_stages = 1, pd.max_batch = BATCH;
    assert_int_equal(mpar_pipeline_create(g_ctx, g_model, &pd, &p), MPAR_SUCCESS); /* default: even split */
    b.inputs = g_x, b.targets = g_y, b.samples = BATCH + 1;
    assert_int_equal(mpar_pipeline_train_step(p, &b, &info), MPAR_ERROR_INVALID_ARGUMENT);
    assert_non_null(strstr(mpar_last_error(g_ctx), "exceeds max_batch"));
    b.samples = 1;
    assert_int_equal(mpar_pipeline_train_step(p, &b, &info), MPAR_ERROR_INVALID_ARGUMENT);
    b.samples = BATCH, b.targets = NULL;
    assert_int_equal(mpar_pipeline_train_step(p, &b, &info), MPAR_ERROR_INVALID_ARGUMENT);
    memcpy(bad_y, g_y, sizeof bad_y);
    bad_y[5] = CLASSES;
    b.targets = bad_y;
    assert_int_equal(mpar_pipeline_train_step(p, &b, &info), MPAR_ERROR_INVALID_ARGUMENT);
    assert_non_null(strstr(mpar_last_error(g_ctx), "row 5"));
    assert_int_equal(mpar_pipeline_get_params(p, 99, (float*)g_x), MPAR_ERROR_INVALID_ARGUMENT);
    b.targets = g_y;
    assert_int_equal(mpar_pipeline_train_step(p, &b, &info), MPAR_SUCCESS); /* still fine */
    mpar_pipeline_destroy(p);
}

/* Forward-only streaming through 2 stages equals 1 stage, and the loss
   equals the training loss before any step. */
static void test_inference(void** state) {
    mpar_stage_desc one[1] = {{0, 0, 13}}, two[2] = {{0, 0, 6}, {1, 7, 13}};
    mpar_pipeline_desc pd;
    mpar_pipeline *p1, *p2;
    mpar_batch b;
    float out1[BATCH * CLASSES], out2[BATCH * CLASSES];
    double l1 = 0, l2 = 0;
    mpar_step_info info;
    (void)state;
    memset(&pd, 0, sizeof pd);
    pd.max_batch = 8, pd.microbatches = 4, pd.schedule = MPAR_SCHEDULE_1F1B; /* 2 samples per micro-batch */
    pd.stages = one, pd.stage_count = 1;
    assert_int_equal(mpar_pipeline_create(g_ctx, g_model, &pd, &p1), MPAR_SUCCESS);
    pd.stages = two, pd.stage_count = 2;
    assert_int_equal(mpar_pipeline_create(g_ctx, g_model, &pd, &p2), MPAR_SUCCESS);
    b.inputs = g_x, b.targets = g_y, b.samples = BATCH; /* 15 micro-batches streamed */
    assert_int_equal(mpar_pipeline_infer(p1, &b, out1, &l1), MPAR_SUCCESS);
    assert_int_equal(mpar_pipeline_infer(p2, &b, out2, &l2), MPAR_SUCCESS);
    assert_memory_equal(out1, out2, sizeof out1);
    assert_true(l1 == l2 && l1 > 0.0);
    b.samples = 8;
    assert_int_equal(mpar_pipeline_compute_gradients(p2, &b, &info), MPAR_SUCCESS);
    assert_int_equal(mpar_pipeline_infer(p1, &b, NULL, &l1), MPAR_SUCCESS);
    assert_true(fabs(info.loss - l1) < 1e-6);
    mpar_pipeline_destroy(p2);
    mpar_pipeline_destroy(p1);
}

/* A schedule written by hand as lists runs, and equals one device bit for
   bit: 2 stages, full and split backwards mixed, W's moved late. */
static void test_hand_written_lists(void** state) {
    static const mpar_action s0[] = {{MPAR_ACTION_FORWARD, 0, 0}, {MPAR_ACTION_FORWARD, 1, 0},
                                     {MPAR_ACTION_BACKWARD, 0, 0}, {MPAR_ACTION_FORWARD, 2, 0},
                                     {MPAR_ACTION_BACKWARD_INPUT, 1, 0}, {MPAR_ACTION_FORWARD, 3, 0},
                                     {MPAR_ACTION_BACKWARD_WEIGHT, 1, 0}, {MPAR_ACTION_BACKWARD, 2, 0},
                                     {MPAR_ACTION_BACKWARD_INPUT, 3, 0}, {MPAR_ACTION_BACKWARD_WEIGHT, 3, 0},
                                     {MPAR_ACTION_OPTIMIZER_STEP, -1, 0}};
    static const mpar_action s1[] = {{MPAR_ACTION_FORWARD, 0, 0}, {MPAR_ACTION_BACKWARD_INPUT, 0, 0},
                                     {MPAR_ACTION_FORWARD, 1, 0}, {MPAR_ACTION_BACKWARD, 1, 0},
                                     {MPAR_ACTION_BACKWARD_WEIGHT, 0, 0}, {MPAR_ACTION_FORWARD, 2, 0},
                                     {MPAR_ACTION_BACKWARD, 2, 0}, {MPAR_ACTION_FORWARD, 3, 0},
                                     {MPAR_ACTION_BACKWARD_INPUT, 3, 0}, {MPAR_ACTION_BACKWARD_WEIGHT, 3, 0},
                                     {MPAR_ACTION_OPTIMIZER_STEP, -1, 0}};
    const mpar_action* lists[2] = {s0, s1};
    int counts[2] = {11, 11};
    mpar_schedule* sc = NULL;
    run_result base, other;
    (void)state;
    assert_int_equal(mpar_schedule_from_lists(2, 4, 1, lists, counts, &sc, NULL), MPAR_SUCCESS);
    assert_int_equal(mpar_schedule_validate(sc, NULL), MPAR_SUCCESS);
    assert_int_equal(sc->split_backward, 1);
    run(g_ctx, MPAR_SCHEDULE_1F1B, 1, 1, 4, &base);
    g_lists = sc;
    run(g_ctx, MPAR_SCHEDULE_SEQUENTIAL /* ignored */, 2, 1, 4, &other);
    expect_same(&base, &other, "hand-written lists");
    free(other.params);
    g_link_mode = MPAR_LINK_ASYNC;
    run(g_ctx, MPAR_SCHEDULE_SEQUENTIAL, 2, 1, 4, &other);
    g_link_mode = MPAR_LINK_AUTO;
    expect_same(&base, &other, "hand-written lists, asynchronous links");
    free(other.params);
    g_lists = NULL;
    mpar_schedule_destroy(sc);
    free(base.params);
}

/* Chunks placed in a V by hand (stage 0 runs the first and the last
   quarter of the model, stage 1 the middle two: a boundary inside one
   worker), trained and inferred bit for bit against one device. */
static void test_v_shape_lists(void** state) {
    static const int placement[4] = {0, 1, 1, 0};
    mpar_action l0[64], l1[64];
    const mpar_action* lists[2] = {l0, l1};
    int counts[2] = {0, 0}, m, c, s;
    mpar_schedule* sc = NULL;
    run_result base, other;
    (void)state;
    for (s = 0; s < 2; s++) { /* GPipe order per stage: chunk 0 then 1 forward, 1 then 0 backward */
        mpar_action* l = s ? l1 : l0;
        for (c = 0; c < 2; c++)
            for (m = 0; m < 4; m++) l[counts[s]].kind = MPAR_ACTION_FORWARD, l[counts[s]].microbatch = m, l[counts[s]++].chunk = c;
        for (c = 1; c >= 0; c--)
            for (m = 0; m < 4; m++) l[counts[s]].kind = MPAR_ACTION_BACKWARD, l[counts[s]].microbatch = m, l[counts[s]++].chunk = c;
        l[counts[s]].kind = MPAR_ACTION_OPTIMIZER_STEP, l[counts[s]].microbatch = -1, l[counts[s]++].chunk = 0;
    }
    assert_int_equal(mpar_schedule_from_lists_placed(NULL, 2, 4, 2, placement, lists, counts, &sc, NULL), MPAR_SUCCESS);
    assert_int_equal(mpar_schedule_validate(sc, NULL), MPAR_SUCCESS);
    assert_int_equal(mpar_schedule_stage_of(sc, 3), 0);
    assert_int_equal(mpar_schedule_chunk_of(sc, 2), 1);
    run(g_ctx, MPAR_SCHEDULE_1F1B, 1, 1, 4, &base);
    g_lists = sc;
    run(g_ctx, MPAR_SCHEDULE_SEQUENTIAL, 2, 2, 4, &other);
    expect_same(&base, &other, "V-shaped lists");
    free(other.params);
    g_lists = NULL;
    free(base.params);
    { /* inference walks a forward-only schedule on the same V */
        mpar_stage_desc one[1] = {{0, 0, 13}}, vee[4] = {{0, 0, 3}, {1, 4, 7}, {1, 8, 10}, {0, 11, 13}};
        mpar_pipeline_desc pd;
        mpar_pipeline *p1, *p2;
        mpar_batch b;
        float out1[BATCH * CLASSES], out2[BATCH * CLASSES];
        double loss1 = 0, loss2 = 0;
        mpar_timeline t;
        memset(&pd, 0, sizeof pd);
        memset(&t, 0, sizeof t);
        pd.max_batch = 8, pd.microbatches = 4, pd.schedule = MPAR_SCHEDULE_1F1B, pd.profile = 1;
        pd.stages = one, pd.stage_count = 1;
        assert_int_equal(mpar_pipeline_create(g_ctx, g_model, &pd, &p1), MPAR_SUCCESS);
        pd.stages = vee, pd.stage_count = 4, pd.schedule_lists = sc;
        assert_int_equal(mpar_pipeline_create(g_ctx, g_model, &pd, &p2), MPAR_SUCCESS);
        b.inputs = g_x, b.targets = g_y, b.samples = BATCH;
        assert_int_equal(mpar_pipeline_infer(p1, &b, out1, &loss1), MPAR_SUCCESS);
        assert_int_equal(mpar_pipeline_infer(p2, &b, out2, &loss2), MPAR_SUCCESS);
        assert_memory_equal(out1, out2, sizeof out1);
        assert_true(loss1 == loss2 && loss1 > 0.0);
        assert_int_equal(mpar_pipeline_get_timeline(p2, &t), MPAR_SUCCESS); /* 15 micro-batches, forwards only */
        assert_int_equal(t.microbatches, 15);
        {
            mpar_error err;
            if (mpar_timeline_check(&t, 1e-3, &err) != MPAR_SUCCESS) fail_msg("timeline: %s", err.message);
        }
        mpar_timeline_free(&t);
        mpar_pipeline_destroy(p2);
        vee[2].device = 0; /* the schedule puts chunk 2 with chunk 1 */
        assert_int_equal(mpar_pipeline_create(g_ctx, g_model, &pd, &p2), MPAR_ERROR_INVALID_PLAN);
        assert_non_null(strstr(mpar_last_error(g_ctx), "chunk 2 must run on the device of chunk 1"));
        mpar_pipeline_destroy(p1);
    }
    mpar_schedule_destroy(sc);
}

/* A device with less memory: max_in_flight caps its stashes. ZB-H1 holds
   P on every stage and is refused by name; AUTO synthesises within the
   caps and still equals one device bit for bit. */
static void test_max_in_flight(void** state) {
    static const int caps[2] = {2, 1};
    mpar_stage_desc st[2] = {{0, 0, 6}, {1, 7, 13}};
    mpar_pipeline_desc pd;
    mpar_pipeline* p = NULL;
    run_result base, other;
    (void)state;
    memset(&pd, 0, sizeof pd);
    pd.stages = st, pd.stage_count = 2, pd.schedule = MPAR_SCHEDULE_ZB_H1, pd.microbatches = 8, pd.max_batch = BATCH;
    pd.max_in_flight = caps;
    assert_int_equal(mpar_pipeline_create(g_ctx, g_model, &pd, &p), MPAR_ERROR_DOES_NOT_FIT);
    assert_non_null(strstr(mpar_last_error(g_ctx), "stage 1 holds up to 2 micro-batch stashes under schedule zbh1 but "
                                                   "max_in_flight[1] is 1"));
    assert_null(p);
    pd.schedule = MPAR_SCHEDULE_1F1B; /* 2 and 1: fits */
    assert_int_equal(mpar_pipeline_create(g_ctx, g_model, &pd, &p), MPAR_SUCCESS);
    mpar_pipeline_destroy(p);
    run(g_ctx, MPAR_SCHEDULE_1F1B, 1, 1, 8, &base);
    g_caps = caps;
    run(g_ctx, MPAR_SCHEDULE_AUTO, 2, 1, 8, &other);
    g_caps = NULL;
    expect_same(&base, &other, "auto within max_in_flight {2, 1}");
    free(base.params), free(other.params);
}

/* The optimizer step as an action of the training job gives the same bits
   as computing the gradients and applying them in two calls (where the
   host decides the step): clipping is on, so the global norm matters. */
static void test_step_action_equals_two_calls(void** state) {
    run_result one, two;
    (void)state;
    run(g_ctx, MPAR_SCHEDULE_ZB_H1, 3, 1, 6, &one);
    g_split_apply = 1;
    run(g_ctx, MPAR_SCHEDULE_ZB_H1, 3, 1, 6, &two);
    g_split_apply = 0;
    expect_same(&one, &two, "train_step vs compute + apply");
    free(one.params), free(two.params);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_equal_sequential), cmocka_unit_test(test_equal_gpipe),
        cmocka_unit_test(test_equal_1f1b),       cmocka_unit_test(test_equal_interleaved),
        cmocka_unit_test(test_equal_zbh1),       cmocka_unit_test(test_equal_zbh2),
        cmocka_unit_test(test_equal_zbv),        cmocka_unit_test(test_equal_auto),
        cmocka_unit_test(test_recompute),
        cmocka_unit_test(test_memory_accounting),
        cmocka_unit_test(test_fault_on_last_stage), cmocka_unit_test(test_bad_input),
        cmocka_unit_test(test_inference),        cmocka_unit_test(test_hand_written_lists),
        cmocka_unit_test(test_v_shape_lists),    cmocka_unit_test(test_step_action_equals_two_calls),
        cmocka_unit_test(test_max_in_flight),
    };
    return cmocka_run_group_tests_name("pipeline", tests, setup, teardown);
}
