/* Links that copy on the device must wait for their copies: the sender
   before it hands a slot over, the receiver before it gives the slot back.
   With MPAR_TEST_DEFER_COPIES a device-side link copy is only enqueued at
   the link's next wait on its queue, as a copy engine may finish late, so
   a missing wait hands over a slot before its data is there and the numbers
   change. Three stages on two devices of one context (or on one device when
   the devices have contexts of their own), device-copy links, four
   schedules: the same parameters as one stage, bit for bit.
   Asynchronous links across contexts likewise: the hook puts a slow copy
   in front of every read into pinned memory, so a receiver that did not
   wait for the read's event would take stale data. (In one context PoCL
   orders a buffer's users across queues by itself, so no test here can
   see a missing event wait there; the GPU check runs them for real.) */
#define MPAR_TEST_DEFER_COPIES
#define MPAR_IMPLEMENTATION
#include "mpar.h"

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

enum { IN = 12, BATCH = 16, STEPS = 2 };
static mpar_context* ctx;
static mpar_context* ctx_sep; /* one context per device */
static mpar_model* model;
static float x[BATCH * IN];
static int32_t y[BATCH];

static int setup(void** state) {
    mpar_desc d;
    mpar_model_desc md;
    uint64_t s = 21;
    int i;
    (void)state;
    memset(&d, 0, sizeof d);
    if (mpar_create(&d, &ctx) != MPAR_SUCCESS) return -1;
    d.context_per_device = 1;
    if (mpar_create(&d, &ctx_sep) != MPAR_SUCCESS) return -1;
    memset(&md, 0, sizeof md);
    md.input_features = IN, md.seed = 4;
    if (mpar_model_create(&md, &model, NULL) != MPAR_SUCCESS) return -1;
    for (i = 0; i < 3; i++) {
        mpar_model_add_linear(model, 20, NULL);
        mpar_model_add_simple(model, mpar_layer_tanh(), NULL);
    }
    mpar_model_add_linear(model, 5, NULL);
    if (mpar_model_add_simple(model, mpar_layer_cross_entropy(), NULL) != MPAR_SUCCESS) return -1;
    for (i = 0; i < BATCH * IN; i++) x[i] = (float)(2.0 * mpar__rng_uniform(&s) - 1.0);
    for (i = 0; i < BATCH; i++) y[i] = i % 5;
    return 0;
}

static int teardown(void** state) {
    (void)state;
    mpar_model_destroy(model);
    mpar_destroy(ctx);
    mpar_destroy(ctx_sep);
    return 0;
}

/* All parameters after STEPS steps. */
static float* run_on(mpar_context* ctx, mpar_schedule_kind kind, int stages, mpar_link_mode mode) {
    mpar_stage_desc st[3] = {{0, 0, 1}, {1, 2, 4}, {0, 5, 7}};
    mpar_device_info a, b;
    mpar_pipeline_desc pd;
    mpar_pipeline* p = NULL;
    mpar_batch batch;
    mpar_step_info info;
    float* params = (float*)malloc(sizeof(float) * mpar_model_param_count(model));
    size_t at = 0;
    int i;
    memset(&a, 0, sizeof a), memset(&b, 0, sizeof b);
    assert_int_equal(mpar_device_get_info(ctx, 0, &a), MPAR_SUCCESS);
    assert_int_equal(mpar_device_get_info(ctx, 1, &b), MPAR_SUCCESS);
    if (a.group != b.group && mode == MPAR_LINK_DEVICE_COPY) st[1].device = 0; /* a device copy needs one context */
    if (stages == 1) st[0].last_layer = 7;
    memset(&pd, 0, sizeof pd);
    pd.stages = st, pd.stage_count = stages, pd.schedule = kind, pd.microbatches = 4, pd.max_batch = BATCH;
    pd.link_mode = mode, pd.link_capacity = 2;
    pd.optimizer.lr = 0.05f;
    if (mpar_pipeline_create(ctx, model, &pd, &p) != MPAR_SUCCESS) fail_msg("create: %s", mpar_last_error(ctx));
    batch.inputs = x, batch.targets = y, batch.samples = BATCH;
    for (i = 0; i < STEPS; i++)
        if (mpar_pipeline_train_step(p, &batch, &info) != MPAR_SUCCESS) fail_msg("step: %s", mpar_last_error(ctx));
    for (i = 0; i < mpar_model_layer_count(model); i++) {
        assert_int_equal(mpar_pipeline_get_params(p, i, params + at), MPAR_SUCCESS);
        at += mpar_model_layer(model, i)->param_count;
    }
    mpar_pipeline_destroy(p);
    return params;
}
/* Four schedules: three stages on `on` with link_mode `mode` give the
   parameters of one stage, bit for bit. */
static void same_as_one_stage(mpar_context* on, mpar_link_mode mode, const char* what) {
    const mpar_schedule_kind kinds[4] = {MPAR_SCHEDULE_GPIPE, MPAR_SCHEDULE_1F1B, MPAR_SCHEDULE_ZB_H1,
                                         MPAR_SCHEDULE_SEQUENTIAL};
    size_t n = mpar_model_param_count(model);
    int k;
    for (k = 0; k < 4; k++) {
        float* one = run_on(ctx, kinds[k], 1, MPAR_LINK_AUTO);
        float* three = run_on(on, kinds[k], 3, mode);
        if (memcmp(one, three, n * sizeof(float)) != 0)
            fail_msg("%s: three stages with %s differ from one stage", mpar_schedule_kind_name(kinds[k]), what);
        free(one), free(three);
    }
}

static void test_delayed_device_copies(void** state) {
    (void)state;
    same_as_one_stage(ctx, MPAR_LINK_DEVICE_COPY, "delayed device copies");
}

static void test_slow_async_links_across_contexts(void** state) {
    (void)state;
    same_as_one_stage(ctx_sep, MPAR_LINK_ASYNC, "slow asynchronous links");
}

int main(void) {
    const struct CMUnitTest tests[] = {cmocka_unit_test(test_delayed_device_copies),
                                       cmocka_unit_test(test_slow_async_links_across_contexts)};
    return cmocka_run_group_tests_name("transfer hook", tests, setup, teardown);
}
