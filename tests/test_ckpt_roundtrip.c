/* Property (issue 18): whatever a save writes, a load accepts, and the
   state comes back bit for bit. For many seeds: a random valid model
   (random built-in layer kinds and sizes, float or token input), a random
   optimizer with valid settings, a random partition, sometimes a trained
   step, then random state written over some layers, extremes included
   (denormals, +-FLT_MAX, signed zeros), and a random step counter up to
   INT_MAX; saved, loaded into a fresh pipeline on another partition,
   compared. */
#define MPAR_IMPLEMENTATION
#include "mpar.h"

#include <float.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <cmocka.h>

const char* __lsan_default_suppressions(void);
const char* __lsan_default_suppressions(void) { return "leak:libpocl.so\nleak:libLLVM\n"; }

enum { SEEDS = 100, BATCH = 4, M = 2 };

static mpar_context* g_ctx;
static char g_dir[64];

static int setup(void** state) {
    mpar_desc d;
    mpar_error err;
    (void)state;
    memset(&d, 0, sizeof d);
    d.error = &err;
    d.kernel_path = "kernels";
    if (mpar_create(&d, &g_ctx) != MPAR_SUCCESS) {
        fprintf(stderr, "mpar_create: %s\n", err.message);
        return -1;
    }
    snprintf(g_dir, sizeof g_dir, "/tmp/mpar_ckpt_rt_XXXXXX");
    return mkdtemp(g_dir) ? 0 : -1;
}

static int teardown(void** state) {
    char path[128];
    (void)state;
    snprintf(path, sizeof path, "%s/c.ckpt", g_dir);
    unlink(path);
    rmdir(g_dir);
    mpar_destroy(g_ctx);
    return 0;
}

static uint32_t rnd(uint64_t* s, uint32_t n) { return (uint32_t)(mpar__rng_next(s) % n); }

/* A float, often an extreme one: denormals, the largest finite values,
   signed zeros, the smallest normals, or ordinary values; never NaN or
   infinite (no valid state holds those). nonneg: AdamW's second moment. */
static float random_value(uint64_t* s, int nonneg) {
    uint32_t bits;
    float f;
    switch (rnd(s, 8)) {
    case 0: bits = 1u + rnd(s, 0x7fffffu); break;                  /* denormal */
    case 1: bits = 0x7f7fffffu - rnd(s, 16); break;                /* near FLT_MAX */
    case 2: bits = 0; break;                                       /* zero */
    case 3: bits = 0x00800000u + rnd(s, 16); break;                /* smallest normals */
    case 4: bits = (uint32_t)mpar__rng_next(s) & 0x7f7fffffu; break; /* any finite magnitude */
    default: f = (float)(2.0 * mpar__rng_uniform(s) - 1.0); memcpy(&bits, &f, 4); bits &= 0x7fffffffu; break;
    }
    if (!nonneg && rnd(s, 2)) bits |= 0x80000000u; /* -0.0 too */
    memcpy(&f, &bits, 4);
    return f;
}

static void add(mpar_model* m, const mpar_layer_desc* d) {
    mpar_error err;
    if (mpar_model_add(m, d, &err) != MPAR_SUCCESS) fail_msg("mpar_model_add(%s): %s", d->type->name, err.message);
}

/* A random valid model; *classes: the loss layer's classes, *vocab: 0 or
   the token count of a token model. */
static mpar_model* random_model(uint64_t* s, int* classes, int* vocab) {
    mpar_model* m = NULL;
    mpar_model_desc md;
    mpar_layer_desc ld;
    mpar_error err;
    int width, i, n, tokens = rnd(s, 3) == 0;
    memset(&md, 0, sizeof md);
    md.seed = mpar__rng_next(s);
    md.input_features = tokens ? 1 : 1 + (int)rnd(s, 12);
    md.seq_len = tokens ? 1 + (int)rnd(s, 4) : (int)rnd(s, 2); /* 0: 1 */
    if (mpar_model_create(&md, &m, &err) != MPAR_SUCCESS) fail_msg("mpar_model_create: %s", err.message);
    *vocab = 0;
    width = md.input_features;
    if (tokens) {
        memset(&ld, 0, sizeof ld);
        ld.type = mpar_layer_embedding(), ld.vocab = *vocab = 2 + (int)rnd(s, 14), ld.units = width = 4 * (1 + (int)rnd(s, 3));
        add(m, &ld);
    }
    n = 1 + (int)rnd(s, 5);
    for (i = 0; i < n; i++) {
        memset(&ld, 0, sizeof ld);
        switch (rnd(s, tokens ? 7 : 6)) {
        case 0: ld.type = mpar_layer_linear(), ld.units = width = 1 + (int)rnd(s, 16); break;
        case 1: ld.type = mpar_layer_relu(); break;
        case 2: ld.type = mpar_layer_gelu(); break;
        case 3: ld.type = mpar_layer_tanh(); break;
        case 4: ld.type = mpar_layer_dropout(), ld.rate = (float)(0.9 * mpar__rng_uniform(s)); break;
        case 5: ld.type = mpar_layer_layernorm(), ld.eps = rnd(s, 2) ? 0.0f : 1e-3f; break;
        default: /* a decoder block keeps the width; its heads divide it */
            ld.type = mpar_layer_decoder_block(), ld.heads = width % 2 ? 1 : 1 + (int)rnd(s, 2);
            if (width % ld.heads) ld.heads = 1;
            ld.hidden = rnd(s, 2) ? 0 : 4 + (int)rnd(s, 12);
            break;
        }
        add(m, &ld);
    }
    *classes = 2 + (int)rnd(s, 6);
    memset(&ld, 0, sizeof ld);
    ld.type = mpar_layer_linear(), ld.units = *classes;
    add(m, &ld);
    memset(&ld, 0, sizeof ld);
    ld.type = mpar_layer_cross_entropy();
    add(m, &ld);
    return m;
}

static void random_optimizer(uint64_t* s, mpar_optimizer_desc* o) {
    memset(o, 0, sizeof *o);
    o->kind = rnd(s, 2) ? MPAR_OPTIMIZER_SGD : MPAR_OPTIMIZER_ADAMW;
    o->lr = (float)(1e-4 + 0.1 * mpar__rng_uniform(s));
    o->momentum = (float)(0.99 * mpar__rng_uniform(s));
    o->beta1 = (float)(0.99 * mpar__rng_uniform(s));
    o->beta2 = (float)(0.999 * mpar__rng_uniform(s));
    o->eps = rnd(s, 2) ? 0.0f : 1e-6f;
    o->weight_decay = (float)(0.1 * mpar__rng_uniform(s));
    o->clip_norm = rnd(s, 2) ? 0.0f : 1.0f;
    o->warmup_steps = (int)rnd(s, 5);
    o->decay_steps = rnd(s, 2) ? 0 : (int)rnd(s, 100);
    o->min_lr = o->lr * (float)mpar__rng_uniform(s);
}

/* `stages` stages (1 or 2) on devices from dev0, layers split at `cut`. */
static mpar_pipeline* make_pipeline(mpar_model* m, const mpar_optimizer_desc* o, int stages, int dev0, int cut) {
    mpar_stage_desc st[2];
    mpar_pipeline_desc pd;
    mpar_pipeline* p = NULL;
    int L = mpar_model_layer_count(m), n = mpar_device_count(g_ctx);
    memset(&pd, 0, sizeof pd);
    st[0].device = dev0 % n, st[0].first_layer = 0, st[0].last_layer = stages == 1 ? L - 1 : cut - 1;
    st[1].device = (dev0 + 1) % n, st[1].first_layer = cut, st[1].last_layer = L - 1;
    pd.stages = st, pd.stage_count = stages;
    pd.schedule = stages == 1 ? MPAR_SCHEDULE_GPIPE : MPAR_SCHEDULE_1F1B;
    pd.microbatches = M, pd.max_batch = BATCH, pd.optimizer = *o, pd.skip_nonfinite = 1;
    if (mpar_pipeline_create(g_ctx, m, &pd, &p) != MPAR_SUCCESS) fail_msg("create: %s", mpar_last_error(g_ctx));
    return p;
}

static void train_once(uint64_t* s, mpar_pipeline* p, const mpar_model* m, int classes, int vocab) {
    int rows = BATCH * mpar_model_get_desc(m)->seq_len, in = mpar_model_get_desc(m)->input_features, i;
    float x[BATCH * 4 * 12];
    int32_t tok[BATCH * 4], y[BATCH * 4];
    mpar_batch b;
    for (i = 0; i < rows * in; i++) x[i] = (float)(2.0 * mpar__rng_uniform(s) - 1.0);
    for (i = 0; i < rows; i++) tok[i] = vocab ? (int32_t)rnd(s, (uint32_t)vocab) : 0, y[i] = (int32_t)rnd(s, (uint32_t)classes);
    b.inputs = vocab ? (const void*)tok : (const void*)x, b.targets = y, b.samples = BATCH;
    if (mpar_pipeline_train_step(p, &b, NULL) != MPAR_SUCCESS) fail_msg("train: %s", mpar_last_error(g_ctx));
}

static const mpar_state_kind kinds[3] = {MPAR_STATE_PARAMS, MPAR_STATE_MOMENT1, MPAR_STATE_MOMENT2};

static void read_all(mpar_pipeline* p, const mpar_model* m, float** out) {
    int l, k, L = mpar_model_layer_count(m);
    for (l = 0; l < L; l++)
        for (k = 0; k < 3; k++)
            if (mpar_model_layer(m, l)->param_count &&
                mpar_pipeline_read_state(p, l, kinds[k], out[l * 3 + k]) != MPAR_SUCCESS)
                fail_msg("read_state(%d, %d): %s", l, k, mpar_last_error(g_ctx));
}

static void test_save_then_load_round_trips(void** state) {
    int seed;
    (void)state;
    for (seed = 0; seed < SEEDS; seed++) {
        uint64_t s = 0x5eed0000u + (uint64_t)seed;
        int classes, vocab, L, l, k, stages, cut, step, steps[5] = {0, 1, INT_MAX, INT_MAX - 1, 0};
        mpar_model* m = random_model(&s, &classes, &vocab);
        mpar_optimizer_desc o;
        mpar_pipeline *p, *q;
        float **want, **got;
        char path[128];
        mpar_error err;
        random_optimizer(&s, &o);
        L = mpar_model_layer_count(m);
        stages = mpar_device_count(g_ctx) >= 2 && L >= 2 ? 1 + (int)rnd(&s, 2) : 1;
        cut = 1 + (int)rnd(&s, (uint32_t)(L - 1));
        p = make_pipeline(m, &o, stages, (int)rnd(&s, 2), cut);
        if (rnd(&s, 2)) train_once(&s, p, m, classes, vocab);
        want = (float**)calloc((size_t)L * 3, sizeof *want);
        got = (float**)calloc((size_t)L * 3, sizeof *got);
        assert_non_null(want), assert_non_null(got);
        for (l = 0; l < L * 3; l++) {
            size_t n = mpar_model_layer(m, l / 3)->param_count;
            want[l] = (float*)calloc(n + 1, sizeof(float)), got[l] = (float*)calloc(n + 1, sizeof(float));
            assert_non_null(want[l]), assert_non_null(got[l]);
        }
        /* random state over some layers; the rest keep what they have */
        for (l = 0; l < L; l++) {
            size_t i, n = mpar_model_layer(m, l)->param_count;
            if (!n || !rnd(&s, 3)) continue;
            for (k = 0; k < 3; k++) {
                for (i = 0; i < n; i++) want[l * 3 + k][i] = random_value(&s, k == 2);
                if (mpar_pipeline_write_state(p, l, kinds[k], want[l * 3 + k]) != MPAR_SUCCESS)
                    fail_msg("seed %d: write_state(%d, %d): %s", seed, l, k, mpar_last_error(g_ctx));
            }
        }
        steps[4] = (int)(mpar__rng_next(&s) % INT_MAX);
        step = steps[rnd(&s, 5)];
        assert_int_equal(mpar_pipeline_set_step(p, step), MPAR_SUCCESS);
        read_all(p, m, want);
        snprintf(path, sizeof path, "%s/c.ckpt", g_dir);
        if (mpar_pipeline_save_checkpoint(p, path, &err) != MPAR_SUCCESS)
            fail_msg("seed %d: save: %s", seed, err.message);
        /* a fresh pipeline on another partition */
        q = make_pipeline(m, &o, stages == 1 && L >= 2 && mpar_device_count(g_ctx) >= 2 ? 2 : 1, (int)rnd(&s, 2),
                          1 + (int)rnd(&s, (uint32_t)(L - 1)));
        if (mpar_pipeline_load_checkpoint(q, path, &err) != MPAR_SUCCESS)
            fail_msg("seed %d: a checkpoint save wrote was refused by load: %s", seed, err.message);
        assert_int_equal(mpar_pipeline_get_step(q), step);
        read_all(q, m, got);
        for (l = 0; l < L * 3; l++) {
            size_t n = mpar_model_layer(m, l / 3)->param_count;
            if (l % 3 == 2 && o.kind == MPAR_OPTIMIZER_SGD) continue; /* SGD keeps no second moment */
            if (memcmp(want[l], got[l], n * sizeof(float)) != 0)
                fail_msg("seed %d: layer %d (%s) state %d differs after the round trip", seed, l / 3,
                         mpar_model_layer(m, l / 3)->type->name, l % 3);
        }
        for (l = 0; l < L * 3; l++) free(want[l]), free(got[l]);
        free(want), free(got);
        mpar_pipeline_destroy(q);
        mpar_pipeline_destroy(p);
        mpar_model_destroy(m);
    }
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_save_then_load_round_trips),
    };
    return cmocka_run_group_tests_name("checkpoint round trip", tests, setup, teardown);
}
