/* The set-up the device suites share (issue 17): a context on two PoCL
   devices, small MLPs, even stage splits, pipeline descs, deterministic
   data, bit-for-bit parameter comparison and a NaN-safe float check.

   Include after mpar.h in a suite that defines MPAR_IMPLEMENTATION first
   (the data generator is the library's own, see fx_rng_next), and after
   cmocka.h (the helpers assert and fail through cmocka):

     #define MPAR_IMPLEMENTATION
     #include "mpar.h"
     #include <setjmp.h>
     #include <stdarg.h>
     #include <stddef.h>
     #include <cmocka.h>
     #include "fixture.h"

   Every function is static inline, so a suite pays nothing (and gets no
   unused-function warning) for what it does not call. Nothing here reaches
   into mpar's private structs; the one private call left is the random
   generator (no public one exists), kept so that data is bit-identical to
   what the suites made before they shared this file. */
#ifndef MPAR_TEST_FIXTURE_H
#define MPAR_TEST_FIXTURE_H

#ifndef MPAR_IMPLEMENTATION
#error "tests/fixture.h: define MPAR_IMPLEMENTATION and include mpar.h first"
#endif

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ==== contexts ==== */

/* The context of fx_group_setup, for suites that share one. */
static mpar_context* fx_ctx;

/* Creates a context from *d (NULL: kernels from "kernels", nothing else
   set; d->error, when NULL, is pointed at a local for the message) and
   checks it selected at least devices_needed devices. Returns 0, or -1
   after saying why on stderr (the cmocka group-setup convention), with
   *out NULL. */
static inline int fx_context_desc(mpar_desc* d, int devices_needed, mpar_context** out) {
    mpar_desc def;
    mpar_error err;
    mpar_error* keep;
    mpar_result r;
    *out = NULL;
    if (!d) {
        memset(&def, 0, sizeof def);
        def.kernel_path = "kernels";
        d = &def;
    }
    keep = d->error;
    if (!d->error) d->error = &err;
    r = mpar_create(d, out);
    if (r != MPAR_SUCCESS) {
        fprintf(stderr, "mpar_create: %s: %s\n", mpar_result_string(r), d->error->message);
        d->error = keep;
        *out = NULL;
        return -1;
    }
    d->error = keep;
    if (mpar_device_count(*out) < devices_needed) {
        fprintf(stderr, "this suite needs %d devices, found %d (POCL_DEVICES=\"basic basic\")\n", devices_needed,
                mpar_device_count(*out));
        mpar_destroy(*out);
        *out = NULL;
        return -1;
    }
    return 0;
}

/* The common case: the default desc. */
static inline int fx_context(int devices_needed, mpar_context** out) {
    return fx_context_desc(NULL, devices_needed, out);
}

/* fx_context_desc inside a test: a failure fails the test. */
static inline mpar_context* fx_context_or_fail(mpar_desc* d, int devices_needed) {
    mpar_context* ctx = NULL;
    if (fx_context_desc(d, devices_needed, &ctx) != 0) fail_msg("no context of %d devices (see above)", devices_needed);
    return ctx;
}

/* cmocka group fixtures: fx_ctx on two devices. */
static inline int fx_group_setup(void** state) {
    (void)state;
    return fx_context(2, &fx_ctx);
}

static inline int fx_group_teardown(void** state) {
    (void)state;
    mpar_destroy(fx_ctx);
    fx_ctx = NULL;
    return 0;
}

/* ==== models ==== */

/* widths[0] input features, then one linear layer per further width, act
   (NULL: none) between two linears, then the loss:
     {4, 8, 3}, relu  ->  linear 8, relu, linear 3, loss
   Any failure fails the test. */
static inline mpar_model* fx_mlp_loss(const int* widths, int n, const mpar_layer_type* act,
                                      const mpar_layer_type* loss, uint64_t seed) {
    mpar_model* m = NULL;
    mpar_model_desc md;
    mpar_error err;
    int i;
    assert_true(n >= 2);
    memset(&md, 0, sizeof md);
    md.input_features = widths[0];
    md.seed = seed;
    if (mpar_model_create(&md, &m, &err) != MPAR_SUCCESS) fail_msg("mpar_model_create: %s", err.message);
    for (i = 1; i < n; i++) {
        if (mpar_model_add_linear(m, widths[i], &err) != MPAR_SUCCESS) fail_msg("add_linear: %s", err.message);
        if (act && i + 1 < n && mpar_model_add_simple(m, act, &err) != MPAR_SUCCESS)
            fail_msg("add %s: %s", act->name, err.message);
    }
    if (mpar_model_add_simple(m, loss, &err) != MPAR_SUCCESS) fail_msg("add %s: %s", loss->name, err.message);
    return m;
}

/* The same ending in cross-entropy. */
static inline mpar_model* fx_mlp(const int* widths, int n, const mpar_layer_type* act, uint64_t seed) {
    return fx_mlp_loss(widths, n, act, mpar_layer_cross_entropy(), seed);
}

/* ==== stages and pipeline descs ==== */

/* `stages` even splits of `layers` layers, stage j on device j:
   first_layer j*layers/stages, the last up to the next one's first. */
static inline void fx_stages(mpar_stage_desc* st, int stages, int layers) {
    int j;
    for (j = 0; j < stages; j++) {
        st[j].device = j;
        st[j].first_layer = j * layers / stages;
        st[j].last_layer = (j + 1) * layers / stages - 1;
    }
}

/* A desc of the given stages (NULL, 0: planned by mpar), everything else
   zero: the defaults (SGD, no virtual stages). */
static inline mpar_pipeline_desc fx_pipeline_desc(const mpar_stage_desc* st, int stage_count,
                                                  mpar_schedule_kind schedule, int microbatches, int max_batch) {
    mpar_pipeline_desc pd;
    memset(&pd, 0, sizeof pd);
    pd.stages = st;
    pd.stage_count = stage_count;
    pd.schedule = schedule;
    pd.microbatches = microbatches;
    pd.max_batch = max_batch;
    return pd;
}

/* mpar_pipeline_create, or the test fails with the context's message. */
static inline mpar_pipeline* fx_pipeline(mpar_context* ctx, const mpar_model* m, const mpar_pipeline_desc* pd) {
    mpar_pipeline* p = NULL;
    if (mpar_pipeline_create(ctx, m, pd, &p) != MPAR_SUCCESS) fail_msg("create: %s", mpar_last_error(ctx));
    return p;
}

/* ==== data ==== */

/* The generator the suites always used: mpar's own splitmix64 (private;
   no public generator exists). */
static inline uint64_t fx_rng_next(uint64_t* s) { return mpar__rng_next(s); }

/* n floats uniform in [lo, hi), as (float)((hi - lo) * u + lo), u in [0, 1)
   of 53 bits; for (-1, 1) that is (float)(2u - 1), bit for bit. */
static inline void fx_uniform(float* out, size_t n, double lo, double hi, uint64_t* s) {
    size_t i;
    for (i = 0; i < n; i++) out[i] = (float)((hi - lo) * mpar__rng_uniform(s) + lo);
}

/* n class labels in [0, classes). */
static inline void fx_labels(int32_t* out, size_t n, int classes, uint64_t* s) {
    size_t i;
    for (i = 0; i < n; i++) out[i] = (int32_t)(fx_rng_next(s) % (uint64_t)classes);
}

/* rows x features inputs in [-1, 1), then (y not NULL) rows labels below
   classes, from one stream seeded `seed`. */
static inline void fx_data(float* x, int32_t* y, int rows, int features, int classes, uint64_t seed) {
    uint64_t s = seed;
    fx_uniform(x, (size_t)rows * (size_t)features, -1.0, 1.0, &s);
    if (y) fx_labels(y, (size_t)rows, classes, &s);
}

/* ==== comparisons ==== */

/* The first layer whose parameters differ by a bit between p and q (two
   pipelines of models shaped as `model`), or -1 when all are the same. */
static inline int fx_same_params(mpar_pipeline* p, mpar_pipeline* q, const mpar_model* model) {
    int l, L = mpar_model_layer_count(model), first = -1;
    for (l = 0; l < L && first < 0; l++) {
        size_t n = mpar_model_layer(model, l)->param_count;
        float *u, *v;
        if (!n) continue;
        u = (float*)malloc(n * sizeof(float)), v = (float*)malloc(n * sizeof(float));
        assert_non_null(u);
        assert_non_null(v);
        assert_int_equal(mpar_pipeline_get_params(p, l, u), MPAR_SUCCESS);
        assert_int_equal(mpar_pipeline_get_params(q, l, v), MPAR_SUCCESS);
        if (memcmp(u, v, n * sizeof(float)) != 0) first = l;
        free(u), free(v);
    }
    return first;
}

/* |a - b| <= tol, and a NaN on either side fails (cmocka's
   assert_float_equal passes a NaN). */
#define FX_NEAR(a, b, tol)                                                                                       \
    do {                                                                                                         \
        double fx_a_ = (double)(a), fx_b_ = (double)(b);                                                         \
        if (!(fabs(fx_a_ - fx_b_) <= (double)(tol)))                                                             \
            fail_msg("%s = %.9g, expected %.9g (within %g)", #a, fx_a_, fx_b_, (double)(tol));                  \
    } while (0)

/* The same bits (so a NaN equals only itself, and -0 is not +0). */
#define FX_SAME_BITS(a, b)                                                                                       \
    do {                                                                                                         \
        double fx_a_ = (double)(a), fx_b_ = (double)(b);                                                         \
        if (memcmp(&fx_a_, &fx_b_, sizeof fx_a_) != 0) fail_msg("%s = %.9g, %s = %.9g", #a, fx_a_, #b, fx_b_);   \
    } while (0)

#endif
