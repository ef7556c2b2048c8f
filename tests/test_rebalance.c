/* Re-balancing and the plan in use: mpar_pipeline_get_plan for explicit
   stages, a given plan and a self-planned pipeline; a pipeline started on
   a 1:7 split of 8 equal layers moves to the balanced split, with its
   parameters, gradients, optimizer moments and step intact, and then
   trains bit for bit like one device (1F1B, zero-bubble ZB-H1,
   interleaved and AUTO's synthesised lists); automatic re-balancing from its own measurements; a move
   that fails is undone; bad settings. Decisions that the tests assert are
   made from given device speeds (mpar_pipeline_rebalance), so nothing here
   depends on timing; the automatic test asserts only what any timing
   gives. */
#define MPAR_IMPLEMENTATION
#include "mpar.h"

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>
#include "fixture.h"

const char* __lsan_default_suppressions(void);
const char* __lsan_default_suppressions(void) { return "leak:libpocl.so\nleak:libLLVM\n"; }

enum { LINEARS = 8, LAYERS = LINEARS + 1, BATCH = 32, M = 4 };

static mpar_context* g_ctx;
static mpar_model* g_small; /* 8 linear layers of 32, then cross-entropy */
static mpar_model* g_big;   /* the same of 384: compute outweighs per-action costs when measured */
static float g_x_small[BATCH * 32], g_x_big[BATCH * 384];
static int32_t g_y[BATCH];
/* Equal device speeds, slow enough that compute outweighs the planner's
   link latency for the small model: its balance is certain. */
static const double g_equal[2] = {1e7, 1e7};

/* LINEARS linear layers of `width` (no activation), cross-entropy, model
   seed 99; x: BATCH rows of inputs in [-1, 1) from `seed` */
static mpar_model* make_model(int width, float* x, uint64_t seed) {
    int widths[LINEARS + 1], i;
    uint64_t s = seed;
    for (i = 0; i <= LINEARS; i++) widths[i] = width;
    fx_uniform(x, (size_t)BATCH * (size_t)width, -1.0, 1.0, &s);
    return fx_mlp(widths, LINEARS + 1, NULL, 99);
}

/* MPAR_TEST_VERBOSE=1: the library's messages, re-planning's among them */
static void log_to_stderr(void* user, mpar_log_level level, const char* message) {
    (void)user, (void)level;
    fprintf(stderr, "# %s\n", message);
}

static int setup(void** state) {
    mpar_desc d;
    uint64_t s = 5;
    (void)state;
    memset(&d, 0, sizeof d); /* no kernel_path: found as a user's would be */
    if (getenv("MPAR_TEST_VERBOSE")) d.log = log_to_stderr;
    if (fx_context_desc(&d, 2, &g_ctx) != 0) return -1;
    g_small = make_model(32, g_x_small, 11);
    g_big = make_model(384, g_x_big, 12);
    fx_labels(g_y, BATCH, 32, &s);
    return 0;
}

static int teardown(void** state) {
    (void)state;
    mpar_model_destroy(g_small);
    mpar_model_destroy(g_big);
    mpar_destroy(g_ctx);
    return 0;
}

/* A training desc on `stages` (NULL: the caller sets stages or plan). */
static void desc_for(mpar_pipeline_desc* pd, const mpar_stage_desc* stages, int count, mpar_schedule_kind kind, int V) {
    *pd = fx_pipeline_desc(stages, count, kind, M, BATCH);
    pd->virtual_stages = V;
    pd->optimizer.kind = MPAR_OPTIMIZER_ADAMW;
    pd->optimizer.lr = 0.01f;
    pd->optimizer.weight_decay = 0.01f;
    pd->optimizer.clip_norm = 0.5f;
}

static mpar_pipeline* create(const mpar_model* model, const mpar_pipeline_desc* pd) {
    return fx_pipeline(g_ctx, model, pd);
}

static void train(mpar_pipeline* p, const mpar_model* model, int steps, double* losses) {
    mpar_batch b;
    int s;
    b.inputs = model == g_big ? g_x_big : g_x_small, b.targets = g_y, b.samples = BATCH;
    for (s = 0; s < steps; s++) {
        mpar_step_info info;
        if (mpar_pipeline_train_step(p, &b, &info) != MPAR_SUCCESS) fail_msg("step: %s", mpar_last_error(g_ctx));
        if (losses) losses[s] = info.loss;
    }
}

/* Every layer's parameters, gradients and both moments, concatenated. */
static float* snapshot(mpar_pipeline* p, const mpar_model* model) {
    size_t n = mpar_model_param_count(model), off = 0;
    float* all = (float*)malloc(sizeof(float) * 4 * n);
    int l, k;
    assert_non_null(all);
    for (l = 0; l < LAYERS; l++) {
        size_t c = mpar_model_layer(model, l)->param_count;
        for (k = MPAR_STATE_PARAMS; k <= MPAR_STATE_MOMENT2; k++, off += c)
            assert_int_equal(mpar_pipeline_read_state(p, l, (mpar_state_kind)k, all + off), MPAR_SUCCESS);
    }
    return all;
}

static void expect_same_state(const float* a, const float* b, const mpar_model* model, const char* what) {
    size_t n = 4 * mpar_model_param_count(model), i;
    for (i = 0; i < n; i++)
        if (memcmp(&a[i], &b[i], sizeof(float)) != 0)
            fail_msg("%s: state float %zu differs: %.9g vs %.9g", what, i, (double)a[i], (double)b[i]);
}

/* One device, one stage, the same micro-batches: the reference. */
static float* reference(const mpar_model* model, int steps, double* losses) {
    mpar_stage_desc one = {0, 0, LAYERS - 1};
    mpar_pipeline_desc pd;
    mpar_pipeline* p;
    float* state;
    desc_for(&pd, &one, 1, MPAR_SCHEDULE_1F1B, 1);
    p = create(model, &pd);
    train(p, model, steps, losses);
    state = snapshot(p, model);
    mpar_pipeline_destroy(p);
    return state;
}

/* Linear layers in each device's stages of a plan. */
static void linears_per_device(const mpar_plan* plan, int* count) {
    int j, l;
    count[0] = count[1] = 0;
    for (j = 0; j < plan->num_stages; j++)
        for (l = plan->stages[j].first_layer; l <= plan->stages[j].last_layer; l++)
            count[plan->stages[j].device] += l < LINEARS;
}

static void test_get_plan_explicit(void** state) {
    mpar_stage_desc st[2] = {{0, 0, 0}, {1, 1, LAYERS - 1}};
    mpar_pipeline_desc pd;
    mpar_pipeline* p;
    mpar_plan plan;
    char text[64];
    (void)state;
    desc_for(&pd, st, 2, MPAR_SCHEDULE_1F1B, 1);
    p = create(g_small, &pd);
    assert_int_equal(mpar_pipeline_get_plan(p, NULL), MPAR_ERROR_INVALID_ARGUMENT);
    assert_int_equal(mpar_pipeline_get_plan(p, &plan), MPAR_SUCCESS);
    mpar_plan_to_string(&plan, text, sizeof text);
    assert_string_equal(text, "0:0-0,1:1-8");
    assert_int_equal(plan.schedule, MPAR_SCHEDULE_1F1B);
    assert_int_equal(plan.microbatches, M);
    assert_int_equal(plan.virtual_stages, 1);
    assert_true(plan.stages[1].compute_seconds > plan.stages[0].compute_seconds); /* costed: 7 layers vs 1 */
    assert_true(plan.step_seconds > 0.0);
    mpar_plan_free(&plan);
    mpar_pipeline_destroy(p);
}

static void test_get_plan_given_and_planned(void** state) {
    mpar_pipeline_desc pd;
    mpar_plan_options o;
    mpar_plan made, got;
    mpar_pipeline* p;
    char a[64], b[64];
    (void)state;
    memset(&o, 0, sizeof o);
    o.device_flops = g_equal, o.use_devices = 2, o.order = MPAR_PLAN_ORDER_FIXED;
    desc_for(&pd, NULL, 0, MPAR_SCHEDULE_GPIPE, 1);
    assert_int_equal(mpar_pipeline_plan(g_ctx, g_small, &pd, &o, &made), MPAR_SUCCESS);
    mpar_plan_to_string(&made, a, sizeof a);
    /* given */
    pd.plan = &made;
    p = create(g_small, &pd);
    assert_int_equal(mpar_pipeline_get_plan(p, &got), MPAR_SUCCESS);
    mpar_plan_to_string(&got, b, sizeof b);
    assert_string_equal(a, b);
    assert_true(got.step_seconds == made.step_seconds);
    assert_int_equal(got.schedule, MPAR_SCHEDULE_GPIPE);
    mpar_plan_free(&got);
    mpar_pipeline_destroy(p);
    /* planned by the pipeline itself */
    pd.plan = NULL, pd.plan_options = &o;
    p = create(g_small, &pd);
    assert_int_equal(mpar_pipeline_get_plan(p, &got), MPAR_SUCCESS);
    mpar_plan_to_string(&got, b, sizeof b);
    assert_string_equal(a, b);
    assert_true(got.step_seconds == made.step_seconds);
    assert_int_equal(got.microbatches, M);
    mpar_plan_free(&got);
    mpar_pipeline_destroy(p);
    mpar_plan_free(&made);
}

/* 1:7 -> balanced from given speeds, the state carried over, then bit for
   bit like one device. */
static void moved_equals_one_device(mpar_schedule_kind kind, int V, const mpar_stage_desc* st, int count) {
    enum { BEFORE = 2, AFTER = 3 };
    mpar_pipeline_desc pd;
    mpar_pipeline* p;
    mpar_pipeline_stats stats;
    mpar_plan plan, best;
    mpar_plan_options o;
    double losses[BEFORE + AFTER], ref_losses[BEFORE + AFTER];
    float *before, *after, *ref;
    int moved = -1, count_dev[2], s;
    char a[96], b[96];
    desc_for(&pd, st, count, kind, V);
    pd.rebalance = MPAR_REBALANCE_MANUAL;
    p = create(g_small, &pd);
    train(p, g_small, BEFORE, losses);
    before = snapshot(p, g_small);
    assert_int_equal(mpar_pipeline_rebalance(p, g_equal, &moved), MPAR_SUCCESS);
    assert_int_equal(moved, 1);
    assert_int_equal(mpar_pipeline_get_step(p), BEFORE);
    after = snapshot(p, g_small);
    expect_same_state(before, after, g_small, "state moved by re-balancing");
    /* the plan in use is the planner's best for these devices and speeds */
    assert_int_equal(mpar_pipeline_get_plan(p, &plan), MPAR_SUCCESS);
    memset(&o, 0, sizeof o);
    o.device_flops = g_equal, o.use_devices = 2, o.order = MPAR_PLAN_ORDER_FIXED;
    desc_for(&pd, NULL, 0, kind, V);
    assert_int_equal(mpar_pipeline_plan(g_ctx, g_small, &pd, &o, &best), MPAR_SUCCESS);
    mpar_plan_to_string(&plan, a, sizeof a), mpar_plan_to_string(&best, b, sizeof b);
    assert_string_equal(a, b);
    linears_per_device(&plan, count_dev);
    assert_int_equal(count_dev[0], 4); /* balanced */
    assert_int_equal(count_dev[1], 4);
    assert_int_equal(plan.num_stages, 2 * V);
    assert_int_equal(plan.virtual_stages, V);
    mpar_plan_free(&plan), mpar_plan_free(&best);
    /* balanced already: a second re-plan stays */
    assert_int_equal(mpar_pipeline_rebalance(p, g_equal, &moved), MPAR_SUCCESS);
    assert_int_equal(moved, 0);
    assert_int_equal(mpar_pipeline_get_stats(p, &stats), MPAR_SUCCESS);
    assert_int_equal(stats.rebalances, 1);
    assert_int_equal(stats.rebalance_checks, 2);
    assert_int_equal(stats.rebalance_failures, 0);
    train(p, g_small, AFTER, losses + BEFORE);
    free(after);
    after = snapshot(p, g_small);
    ref = reference(g_small, BEFORE + AFTER, ref_losses);
    for (s = 0; s < BEFORE + AFTER; s++)
        if (losses[s] != ref_losses[s]) fail_msg("loss of step %d: %.9g vs %.9g", s, losses[s], ref_losses[s]);
    expect_same_state(after, ref, g_small, "re-balanced pipeline vs one device");
    free(before), free(after), free(ref);
    mpar_pipeline_destroy(p);
}

static void test_rebalance_1f1b(void** state) {
    mpar_stage_desc st[2] = {{0, 0, 0}, {1, 1, LAYERS - 1}};
    (void)state;
    moved_equals_one_device(MPAR_SCHEDULE_1F1B, 1, st, 2);
}

static void test_rebalance_zero_bubble(void** state) {
    mpar_stage_desc st[2] = {{0, 0, 0}, {1, 1, LAYERS - 1}};
    (void)state;
    moved_equals_one_device(MPAR_SCHEDULE_ZB_H1, 1, st, 2);
}

static void test_rebalance_interleaved(void** state) {
    /* chunks on devices 0, 1, 0, 1: device 0 holds 2 layers, device 1 seven */
    mpar_stage_desc st[4] = {{0, 0, 0}, {1, 1, 1}, {0, 2, 2}, {1, 3, LAYERS - 1}};
    (void)state;
    moved_equals_one_device(MPAR_SCHEDULE_INTERLEAVED_1F1B, 2, st, 4);
}

/* AUTO schedules synthesise their lists from a measured step: after a
   move the rebuilt pipeline measures and synthesises again. */
static void test_rebalance_auto_schedule(void** state) {
    mpar_stage_desc st[2] = {{0, 0, 0}, {1, 1, LAYERS - 1}};
    (void)state;
    moved_equals_one_device(MPAR_SCHEDULE_AUTO, 1, st, 2);
}

/* Automatic: after warm-up the pipeline measures, re-plans and moves by
   itself. The 1:7 start is 3.5 times slower than balanced on equal
   devices, so at least one move is certain; where it lands depends on the
   clock, but every plan trains the same numbers. */
static void test_rebalance_automatic(void** state) {
    enum { STEPS = 12 };
    mpar_stage_desc st[2] = {{0, 0, 0}, {1, 1, LAYERS - 1}};
    mpar_pipeline_desc pd;
    mpar_pipeline* p;
    mpar_pipeline_stats stats;
    mpar_plan plan;
    double losses[STEPS], ref_losses[STEPS];
    float *got, *ref;
    int count_dev[2], s;
    (void)state;
    desc_for(&pd, st, 2, MPAR_SCHEDULE_1F1B, 1);
    pd.rebalance = MPAR_REBALANCE_AUTO;
    pd.rebalance_warmup = 3;
    p = create(g_big, &pd);
    assert_int_equal(mpar_pipeline_get_desc(p)->rebalance_warmup, 3);
    assert_true(mpar_pipeline_get_desc(p)->rebalance_threshold == 0.05); /* the default */
    train(p, g_big, STEPS, losses);
    assert_int_equal(mpar_pipeline_get_stats(p, &stats), MPAR_SUCCESS);
    assert_true(stats.rebalances >= 1);
    assert_true(stats.rebalance_checks >= stats.rebalances);
    assert_int_equal(stats.rebalance_failures, 0);
    assert_int_equal(mpar_pipeline_get_plan(p, &plan), MPAR_SUCCESS);
    linears_per_device(&plan, count_dev);
    assert_true(count_dev[0] >= 2 && count_dev[1] >= 2); /* away from 1:7 */
    mpar_plan_free(&plan);
    got = snapshot(p, g_big);
    ref = reference(g_big, STEPS, ref_losses);
    for (s = 0; s < STEPS; s++)
        if (losses[s] != ref_losses[s]) fail_msg("loss of step %d: %.9g vs %.9g", s, losses[s], ref_losses[s]);
    expect_same_state(got, ref, g_big, "automatically re-balanced pipeline vs one device");
    free(got), free(ref);
    mpar_pipeline_destroy(p);
}

/* A move whose rebuild fails (an allocation on the new stage 1) is undone:
   the old stages, the same state, training goes on. */
static void test_rebalance_failure_undone(void** state) {
    mpar_stage_desc st[2] = {{0, 0, 0}, {1, 1, LAYERS - 1}};
    mpar_pipeline_desc pd;
    mpar_pipeline* p;
    mpar_pipeline_stats stats;
    mpar_plan plan;
    float *before, *after;
    int moved = -1;
    char text[64];
    (void)state;
    desc_for(&pd, st, 2, MPAR_SCHEDULE_1F1B, 1);
    pd.rebalance = MPAR_REBALANCE_MANUAL;
    p = create(g_small, &pd);
    train(p, g_small, 2, NULL);
    before = snapshot(p, g_small);
    assert_int_equal(mpar_set_fault(g_ctx, "alloc:1:*"), MPAR_SUCCESS);
    assert_int_not_equal(mpar_pipeline_rebalance(p, g_equal, &moved), MPAR_SUCCESS);
    assert_int_equal(moved, 0);
    assert_non_null(strstr(mpar_last_error(g_ctx), "goes on with its old stages"));
    assert_int_equal(mpar_pipeline_get_plan(p, &plan), MPAR_SUCCESS);
    mpar_plan_to_string(&plan, text, sizeof text);
    assert_string_equal(text, "0:0-0,1:1-8");
    mpar_plan_free(&plan);
    assert_int_equal(mpar_pipeline_get_step(p), 2);
    after = snapshot(p, g_small);
    expect_same_state(before, after, g_small, "state after an undone move");
    assert_int_equal(mpar_pipeline_get_stats(p, &stats), MPAR_SUCCESS);
    assert_int_equal(stats.rebalances, 0);
    assert_int_equal(stats.rebalance_failures, 1);
    train(p, g_small, 1, NULL);
    /* and the move itself works once the fault is gone */
    assert_int_equal(mpar_pipeline_rebalance(p, g_equal, &moved), MPAR_SUCCESS);
    assert_int_equal(moved, 1);
    free(before), free(after);
    mpar_pipeline_destroy(p);
}

static void expect_refused(mpar_pipeline_desc* pd, const mpar_model* model, mpar_result code, const char* names) {
    mpar_pipeline* p = NULL;
    assert_int_equal(mpar_pipeline_create(g_ctx, model, pd, &p), code);
    assert_null(p);
    if (!strstr(mpar_last_error(g_ctx), names)) fail_msg("'%s' does not name %s", mpar_last_error(g_ctx), names);
}

static void test_rebalance_bad_input(void** state) {
    mpar_stage_desc st[2] = {{0, 0, 0}, {1, 1, LAYERS - 1}}, shared[2] = {{0, 0, 3}, {0, 4, LAYERS - 1}};
    const double bad[2] = {1e7, 0.0};
    mpar_pipeline_desc pd;
    mpar_pipeline* p;
    int moved = -1;
    (void)state;
    desc_for(&pd, st, 2, MPAR_SCHEDULE_1F1B, 1);
    pd.rebalance = MPAR_REBALANCE_AUTO;
    pd.rebalance_threshold = -0.1;
    expect_refused(&pd, g_small, MPAR_ERROR_INVALID_ARGUMENT, "rebalance_threshold");
    pd.rebalance_threshold = 1.0;
    expect_refused(&pd, g_small, MPAR_ERROR_INVALID_ARGUMENT, "rebalance_threshold");
    pd.rebalance_threshold = NAN;
    expect_refused(&pd, g_small, MPAR_ERROR_INVALID_ARGUMENT, "rebalance_threshold");
    pd.rebalance_threshold = 0.0;
    pd.rebalance_warmup = -1;
    expect_refused(&pd, g_small, MPAR_ERROR_INVALID_ARGUMENT, "rebalance_warmup");
    pd.rebalance_warmup = 0;
    pd.rebalance = 3;
    expect_refused(&pd, g_small, MPAR_ERROR_INVALID_ARGUMENT, "rebalance 3");
    pd.rebalance = MPAR_REBALANCE_AUTO;
    pd.inference_only = 1;
    expect_refused(&pd, g_small, MPAR_ERROR_UNSUPPORTED, "inference_only");
    pd.inference_only = 0;
    pd.stages = shared;
    expect_refused(&pd, g_small, MPAR_ERROR_UNSUPPORTED, "share device 0");
    /* calls that cannot re-plan */
    desc_for(&pd, st, 2, MPAR_SCHEDULE_1F1B, 1);
    p = create(g_small, &pd);
    assert_int_equal(mpar_pipeline_rebalance(p, g_equal, &moved), MPAR_ERROR_INVALID_STATE);
    assert_non_null(strstr(mpar_last_error(g_ctx), "desc.rebalance"));
    mpar_pipeline_destroy(p);
    pd.rebalance = MPAR_REBALANCE_MANUAL;
    p = create(g_small, &pd);
    assert_int_equal(mpar_pipeline_rebalance(p, NULL, &moved), MPAR_ERROR_INVALID_STATE); /* nothing measured */
    assert_int_equal(mpar_pipeline_rebalance(p, bad, &moved), MPAR_ERROR_INVALID_ARGUMENT);
    assert_non_null(strstr(mpar_last_error(g_ctx), "device_flops[1]"));
    assert_int_equal(moved, 0);
    assert_int_equal(mpar_pipeline_rebalance(NULL, g_equal, NULL), MPAR_ERROR_INVALID_ARGUMENT);
    /* two measured steps (the first runs one stage at a time: not counted), then from measurements */
    train(p, g_small, 2, NULL);
    assert_int_equal(mpar_pipeline_rebalance(p, NULL, &moved), MPAR_SUCCESS);
    mpar_pipeline_destroy(p);
    /* profiling puts every layer on one device: the desc's rebalance does not get in the way */
    {
        double f[LAYERS], bi[LAYERS], bw[LAYERS];
        pd.rebalance = MPAR_REBALANCE_AUTO;
        assert_int_equal(mpar_profile_layers(g_ctx, g_small, &pd, 0, f, bi, bw), MPAR_SUCCESS);
    }
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_get_plan_explicit),     cmocka_unit_test(test_get_plan_given_and_planned),
        cmocka_unit_test(test_rebalance_1f1b),        cmocka_unit_test(test_rebalance_zero_bubble),
        cmocka_unit_test(test_rebalance_interleaved), cmocka_unit_test(test_rebalance_auto_schedule),
        cmocka_unit_test(test_rebalance_automatic),
        cmocka_unit_test(test_rebalance_failure_undone), cmocka_unit_test(test_rebalance_bad_input),
    };
    return cmocka_run_group_tests_name("rebalance", tests, setup, teardown);
}
