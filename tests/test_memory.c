/* Memory: chunks cut into buffers under a size limit, inference-only
   pipelines, and the memory limit a pipeline is checked against.
   (a) A character GPT whose every stage holds more parameters than one
       buffer may (max_buffer_bytes, the descriptor's override of the
       device's largest allocation) trains on 2 devices under 1F1B, ZB-H1,
       interleaving and recomputation, and equals one device without the
       limit bit for bit: losses and every parameter after three AdamW steps.
   (b) An inference-only pipeline holds its parameters and one slot per
       chunk: its bytes are those of mpar_pipeline_memory, below a training
       pipeline's; it infers the same outputs bit for bit, loads a training
       checkpoint, and refuses training, gradient reads and saving.
   (c) memory_limit_bytes: a pipeline over it is refused before anything is
       allocated, naming the device and the shortfall; the planner plans
       within it.
   (d) Where memory binds, the planner recomputes stage by stage.
   (e) bf16 activations: pipelines under 1F1B, ZB-H1 (weight gradients
       after other forwards, from the slot again), interleaving, cut
       buffers and a recomputing stage equal one device with bf16 bit for
       bit; bf16 is not fp32 (the rounding happens) but stays close; a bad
       activation_type is refused. AUTO is fp32 where that fits and bf16
       where only bf16 fits, in mpar_pipeline_create and in the planner. */
#define MPAR_IMPLEMENTATION
#include "mpar.h"

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <unistd.h>
#include <cmocka.h>
#include "fixture.h"

const char* __lsan_default_suppressions(void);
const char* __lsan_default_suppressions(void) { return "leak:libpocl.so\nleak:libLLVM\n"; }

enum { SEQ = 16, WIDTH = 64, HEADS = 4, BLOCKS = 4, VOCAB = 32, BATCH = 8, M = 4, STEPS = 3 };

static mpar_context* g_ctx;
static mpar_model* g_gpt;
static int32_t g_tokens[BATCH * SEQ], g_targets[BATCH * SEQ];

static int setup(void** state) {
    mpar_desc d;
    mpar_error err;
    mpar_model_desc md;
    mpar_layer_desc ld;
    uint64_t s = 99;
    int i;
    (void)state;
    memset(&d, 0, sizeof d); /* no kernel_path: found as a user's would be */
    if (fx_context_desc(&d, 2, &g_ctx) != 0) return -1;
    memset(&md, 0, sizeof md);
    md.input_features = 1, md.seq_len = SEQ, md.seed = 5;
    if (mpar_model_create(&md, &g_gpt, &err) != MPAR_SUCCESS) return -1;
    memset(&ld, 0, sizeof ld);
    ld.type = mpar_layer_embedding(), ld.units = WIDTH, ld.vocab = VOCAB;
    if (mpar_model_add(g_gpt, &ld, &err) != MPAR_SUCCESS) return -1;
    for (i = 0; i < BLOCKS; i++) {
        memset(&ld, 0, sizeof ld);
        ld.type = mpar_layer_decoder_block(), ld.heads = HEADS;
        if (mpar_model_add(g_gpt, &ld, &err) != MPAR_SUCCESS) return -1;
    }
    if (mpar_model_add_simple(g_gpt, mpar_layer_layernorm(), &err) != MPAR_SUCCESS ||
        mpar_model_add_linear(g_gpt, VOCAB, &err) != MPAR_SUCCESS ||
        mpar_model_add_simple(g_gpt, mpar_layer_cross_entropy(), &err) != MPAR_SUCCESS)
        return -1;
    for (i = 0; i < BATCH * SEQ; i++) {
        g_tokens[i] = (int32_t)(fx_rng_next(&s) % VOCAB); /* interleaved: not two fx_labels */
        g_targets[i] = (int32_t)(fx_rng_next(&s) % VOCAB);
    }
    return 0;
}

static int teardown(void** state) {
    (void)state;
    mpar_model_destroy(g_gpt);
    mpar_destroy(g_ctx);
    return 0;
}

/* 8 layers: embedding, 4 decoder blocks, layer norm, head, loss */
static const mpar_stage_desc ONE[1] = {{0, 0, 7}};
static const mpar_stage_desc TWO[2] = {{0, 0, 2}, {1, 3, 7}};
static const mpar_stage_desc FOUR[4] = {{0, 0, 1}, {1, 2, 3}, {0, 4, 5}, {1, 6, 7}}; /* V = 2 */

static const int* g_recompute_stages; /* train(): recompute_stages */
static mpar_activation_type g_act;    /* train(): activation_type */
static mpar_link_mode g_link;         /* train(): link_mode */

typedef struct trained {
    double loss[STEPS];
    float* params;
} trained;

static void train(const mpar_stage_desc* st, int n, mpar_schedule_kind kind, int V, int recompute,
                  uint64_t max_buffer, trained* out, mpar_pipeline_memory_info* mem) {
    mpar_pipeline_desc pd;
    mpar_pipeline* p = NULL;
    mpar_pipeline_stats stats;
    mpar_batch b;
    int i, l;
    size_t off = 0;
    pd = fx_pipeline_desc(st, n, kind, M, BATCH);
    pd.virtual_stages = V, pd.recompute = recompute, pd.max_buffer_bytes = max_buffer;
    pd.recompute_stages = g_recompute_stages, pd.activation_type = g_act, pd.link_mode = g_link;
    pd.optimizer.kind = MPAR_OPTIMIZER_ADAMW, pd.optimizer.lr = 1e-2f;
    if (mpar_pipeline_memory(g_ctx, g_gpt, &pd, mem) != MPAR_SUCCESS) fail_msg("memory: %s", mpar_last_error(g_ctx));
    p = fx_pipeline(g_ctx, g_gpt, &pd);
    assert_int_equal(mpar_pipeline_get_stats(p, &stats), MPAR_SUCCESS);
    for (i = 0; i < stats.stages; i++) assert_int_equal(stats.device_bytes[i], mem->device_bytes[i]);
    b.inputs = g_tokens, b.targets = g_targets, b.samples = BATCH;
    for (i = 0; i < STEPS; i++) {
        mpar_step_info info;
        if (mpar_pipeline_train_step(p, &b, &info) != MPAR_SUCCESS)
            fail_msg("step %d of %d stages (buffers of %llu bytes): %s", i, n, (unsigned long long)max_buffer,
                     mpar_last_error(g_ctx));
        out->loss[i] = info.loss;
    }
    out->params = (float*)malloc(sizeof(float) * mpar_model_param_count(g_gpt));
    assert_non_null(out->params);
    for (l = 0; l < mpar_model_layer_count(g_gpt); l++) {
        assert_int_equal(mpar_pipeline_get_params(p, l, out->params + off), MPAR_SUCCESS);
        off += mpar_model_layer(g_gpt, l)->param_count;
    }
    mpar_pipeline_destroy(p);
}

/* ---- (a) buffers under a limit ---- */

static void blocks_equal(mpar_schedule_kind kind, int V, int recompute) {
    const mpar_stage_desc* st = V > 1 ? FOUR : TWO;
    int n = V > 1 ? 4 : 2, j, l;
    uint64_t limit = 160 << 10; /* 160 KiB; a decoder block's parameters alone take 196 KiB... */
    trained base, cut;
    mpar_pipeline_memory_info mem0, mem;
    size_t biggest = 0;
    for (l = 0; l < mpar_model_layer_count(g_gpt); l++)
        if (mpar_model_layer(g_gpt, l)->param_count > biggest) biggest = mpar_model_layer(g_gpt, l)->param_count;
    limit = (uint64_t)biggest * 4 + 1024; /* ... so the limit is the largest layer's parameters and a bit */
    train(ONE, 1, kind, 1, recompute, 0, &base, &mem0);
    train(st, n, kind, V, recompute, limit, &cut, &mem);
    assert_int_equal(mem0.chunk_buffers[0], 1);
    for (j = 0; j < n; j++) {
        size_t params = 0;
        for (l = st[j].first_layer; l <= st[j].last_layer; l++) params += mpar_model_layer(g_gpt, l)->param_count;
        printf("# %s%s V=%d chunk %d: layers %d-%d, %zu parameter bytes in %d buffers of at most %llu bytes\n",
               mpar_schedule_kind_name(kind), recompute ? "+recompute" : "", V, j, st[j].first_layer,
               st[j].last_layer, params * 4, mem.chunk_buffers[j], (unsigned long long)limit);
        if ((uint64_t)params * 4 > limit) assert_true(mem.chunk_buffers[j] >= 2);
    }
    for (j = 0; j < STEPS; j++) {
        printf("# step %d: loss %.9f (one device, one buffer) %.9f (cut)\n", j, base.loss[j], cut.loss[j]);
        assert_true(base.loss[j] == cut.loss[j]);
    }
    assert_memory_equal(base.params, cut.params, sizeof(float) * mpar_model_param_count(g_gpt));
    free(base.params), free(cut.params);
}

/* ---- (e) bf16 activations ---- */

static void same_trained(const char* what, const trained* a, const trained* b) {
    int j;
    for (j = 0; j < STEPS; j++) {
        printf("# bf16 %s step %d: loss %.9f (one device) %.9f\n", what, j, a->loss[j], b->loss[j]);
        assert_true(a->loss[j] == b->loss[j]);
    }
    assert_memory_equal(a->params, b->params, sizeof(float) * mpar_model_param_count(g_gpt));
}

/* Every layer's gradients for one batch on one device (ZB-H1 on TWO when
   split: the weight pass after other forwards). */
static float* grads_of(mpar_activation_type t, int split) {
    mpar_pipeline_desc pd;
    mpar_pipeline* p = NULL;
    mpar_batch b;
    mpar_step_info info;
    float* g = (float*)malloc(sizeof(float) * mpar_model_param_count(g_gpt));
    size_t off = 0;
    int l;
    assert_non_null(g);
    memset(&pd, 0, sizeof pd);
    pd.stages = split ? TWO : ONE, pd.stage_count = split ? 2 : 1, pd.max_batch = BATCH, pd.microbatches = M;
    pd.schedule = split ? MPAR_SCHEDULE_ZB_H1 : MPAR_SCHEDULE_GPIPE, pd.activation_type = t;
    p = fx_pipeline(g_ctx, g_gpt, &pd);
    b.inputs = g_tokens, b.targets = g_targets, b.samples = BATCH;
    if (mpar_pipeline_compute_gradients(p, &b, &info) != MPAR_SUCCESS) fail_msg("%s", mpar_last_error(g_ctx));
    for (l = 0; l < mpar_model_layer_count(g_gpt); l++) {
        assert_int_equal(mpar_pipeline_get_grads(p, l, g + off), MPAR_SUCCESS);
        off += mpar_model_layer(g_gpt, l)->param_count;
    }
    mpar_pipeline_destroy(p);
    return g;
}

/* bf16 gradients stay near fp32's, layer by layer: the packed slots give
   the backward the forward's values (the token embedding's gradient lands
   on the batch's tokens, which are not kept in 16 bits). */
static void test_bf16_gradients(void** state) {
    float *g32 = grads_of(MPAR_ACTIVATIONS_FP32, 0), *g16 = grads_of(MPAR_ACTIVATIONS_BF16, 0);
    float* g16s = grads_of(MPAR_ACTIVATIONS_BF16, 1);
    size_t off = 0, i;
    int l;
    (void)state;
    assert_memory_equal(g16, g16s, sizeof(float) * mpar_model_param_count(g_gpt));
    for (l = 0; l < mpar_model_layer_count(g_gpt); l++) {
        size_t n = mpar_model_layer(g_gpt, l)->param_count;
        double d = 0, r = 0;
        for (i = off; i < off + n; i++) d += (double)(g16[i] - g32[i]) * (g16[i] - g32[i]), r += (double)g32[i] * g32[i];
        if (n) printf("# layer %d: |g_bf16 - g_fp32| / |g_fp32| = %.4f\n", l, sqrt(d / (r > 0 ? r : 1)));
        if (n) assert_true(sqrt(d) <= 0.05 * sqrt(r));
        off += n;
    }
    free(g32), free(g16), free(g16s);
}

static void test_bf16_activations(void** state) {
    static const int rec[2] = {1, 0};
    trained f32, one, cut;
    mpar_pipeline_memory_info m32, m16;
    size_t i, n = mpar_model_param_count(g_gpt), differ = 0;
    (void)state;
    g_act = MPAR_ACTIVATIONS_FP32;
    train(ONE, 1, MPAR_SCHEDULE_GPIPE, 1, 0, 0, &f32, &m32);
    g_act = MPAR_ACTIVATIONS_BF16;
    train(ONE, 1, MPAR_SCHEDULE_GPIPE, 1, 0, 0, &one, &m16);
    /* the rounding happens, and costs little */
    for (i = 0; i < n; i++) differ += f32.params[i] != one.params[i];
    printf("# bf16 vs fp32, one device: %zu of %zu parameters differ after %d steps; losses", differ, n, STEPS);
    for (i = 0; i < STEPS; i++) printf(" %.6f/%.6f", one.loss[i], f32.loss[i]);
    printf("\n# GPipe, %d micro-batches: %llu bytes (bf16) against %llu (fp32)\n", M,
           (unsigned long long)m16.device_bytes[0], (unsigned long long)m32.device_bytes[0]);
    assert_true(differ > n / 2);
    for (i = 0; i < STEPS; i++) assert_true(fabs(one.loss[i] - f32.loss[i]) < 0.02 * f32.loss[i]);
    /* no byte assertion here: this decoder's stashes (attention, MLP
       internals) outweigh its layer inputs, so halving the inputs does not
       pay for the fp32 working copy; test_plan_memory checks the bytes */
    free(f32.params);
    /* any partition, schedule and buffer cut: the bits of one device */
    train(TWO, 2, MPAR_SCHEDULE_GPIPE, 1, 0, 0, &cut, &m16);
    same_trained("GPipe 2 stages", &one, &cut), free(cut.params);
    train(TWO, 2, MPAR_SCHEDULE_1F1B, 1, 0, 0, &cut, &m16);
    same_trained("1F1B 2 stages", &one, &cut), free(cut.params);
    train(TWO, 2, MPAR_SCHEDULE_ZB_H1, 1, 0, 0, &cut, &m16);
    same_trained("ZB-H1 2 stages", &one, &cut), free(cut.params);
    train(FOUR, 4, MPAR_SCHEDULE_INTERLEAVED_1F1B, 2, 0, 210000, &cut, &m16); /* a decoder block: 199936 bytes */
    assert_true(m16.chunk_buffers[0] >= 2);
    same_trained("interleaved V=2, 210000-byte buffers", &one, &cut), free(cut.params);
    g_recompute_stages = rec;
    train(TWO, 2, MPAR_SCHEDULE_1F1B, 1, 0, 0, &cut, &m16);
    g_recompute_stages = NULL;
    same_trained("1F1B, stage 0 recomputing", &one, &cut), free(cut.params);
    g_link = MPAR_LINK_ASYNC; /* packed copies through a copy queue (pinned memory across contexts) */
    train(TWO, 2, MPAR_SCHEDULE_1F1B, 1, 0, 0, &cut, &m16);
    g_link = MPAR_LINK_AUTO;
    same_trained("1F1B, asynchronous links", &one, &cut), free(cut.params);
    if (!getenv("MPAR_TEST_PLATFORMS")) { /* device copies need one context */
        g_link = MPAR_LINK_DEVICE_COPY;
        train(TWO, 2, MPAR_SCHEDULE_ZB_H1, 1, 0, 0, &cut, &m16);
        g_link = MPAR_LINK_AUTO;
        same_trained("ZB-H1, device-copy links", &one, &cut), free(cut.params);
    }
    free(one.params);
    g_act = MPAR_ACTIVATIONS_FP32;
}

/* An activation-heavy MLP: 32 inputs, 4 x (linear 256 + relu), 10 classes. */
static mpar_model* make_wide_mlp(void) {
    static const int widths[] = {32, 256, 256, 256, 256, 10};
    return fx_mlp(widths, 6, mpar_layer_relu(), 3);
}

enum { WIDE_BATCH = 512 };

/* Trains two steps; returns the parameters and the stats. */
static float* wide_train(mpar_model* m, mpar_pipeline_desc* pd, mpar_pipeline_stats* stats) {
    static float x[WIDE_BATCH * 32];
    static int32_t y[WIDE_BATCH];
    mpar_pipeline* p;
    mpar_batch b;
    mpar_step_info info;
    float* params = (float*)malloc(sizeof(float) * mpar_model_param_count(m));
    size_t off = 0;
    int i, l;
    assert_non_null(params);
    fx_data(x, NULL, WIDE_BATCH, 32, 0, 8);
    for (i = 0; i < WIDE_BATCH; i++) y[i] = i % 10;
    p = fx_pipeline(g_ctx, m, pd);
    b.inputs = x, b.targets = y, b.samples = WIDE_BATCH;
    for (i = 0; i < 2; i++)
        if (mpar_pipeline_train_step(p, &b, &info) != MPAR_SUCCESS) fail_msg("step: %s", mpar_last_error(g_ctx));
    assert_int_equal(mpar_pipeline_get_stats(p, stats), MPAR_SUCCESS);
    for (l = 0; l < mpar_model_layer_count(m); l++) {
        assert_int_equal(mpar_pipeline_get_params(p, l, params + off), MPAR_SUCCESS);
        off += mpar_model_layer(m, l)->param_count;
    }
    mpar_pipeline_destroy(p);
    return params;
}

static void test_bf16_auto(void** state) {
    mpar_model* m = make_wide_mlp();
    mpar_stage_desc one = {0, 0, 0};
    mpar_pipeline_desc pd;
    mpar_pipeline_memory_info m32, m16;
    mpar_pipeline_stats st;
    mpar_plan_options o;
    mpar_plan plan;
    double flops[2] = {15e9, 15e9};
    uint64_t limit;
    float *p16, *pauto;
    size_t n = mpar_model_param_count(m);
    (void)state;
    one.last_layer = mpar_model_layer_count(m) - 1;
    memset(&pd, 0, sizeof pd);
    pd.stages = &one, pd.stage_count = 1, pd.schedule = MPAR_SCHEDULE_GPIPE, pd.microbatches = 8;
    pd.max_batch = WIDE_BATCH, pd.optimizer.kind = MPAR_OPTIMIZER_ADAMW;
    assert_int_equal(mpar_pipeline_memory(g_ctx, m, &pd, &m32), MPAR_SUCCESS);
    pd.activation_type = MPAR_ACTIVATIONS_BF16;
    assert_int_equal(mpar_pipeline_memory(g_ctx, m, &pd, &m16), MPAR_SUCCESS);
    limit = (m16.device_bytes[0] + m32.device_bytes[0]) / 2;
    printf("# wide MLP, GPipe M=8 on one device: %llu bytes (fp32), %llu (bf16); limit %llu\n",
           (unsigned long long)m32.device_bytes[0], (unsigned long long)m16.device_bytes[0],
           (unsigned long long)limit);
    assert_true(m16.device_bytes[0] < m32.device_bytes[0]);
    p16 = wide_train(m, &pd, &st);
    /* AUTO with room: fp32 */
    pd.activation_type = MPAR_ACTIVATIONS_AUTO;
    pauto = wide_train(m, &pd, &st);
    assert_int_equal(st.activation_type, MPAR_ACTIVATIONS_FP32);
    assert_int_equal(st.device_bytes[0], m32.device_bytes[0]);
    free(pauto);
    /* AUTO where only bf16 fits: bf16, the bits of an explicit bf16 run */
    pd.memory_limit_bytes = limit;
    pauto = wide_train(m, &pd, &st);
    assert_int_equal(st.activation_type, MPAR_ACTIVATIONS_BF16);
    assert_int_equal(st.device_bytes[0], m16.device_bytes[0]);
    assert_memory_equal(p16, pauto, sizeof(float) * n);
    free(pauto), free(p16);
    /* the planner: bf16 where fp32 does not fit, before recomputation */
    pd.stages = NULL, pd.stage_count = 0;
    memset(&o, 0, sizeof o);
    o.device_flops = flops, o.use_devices = 1, o.reserve_bytes = 1;
    assert_int_equal(mpar_pipeline_plan(g_ctx, m, &pd, &o, &plan), MPAR_SUCCESS);
    mpar_plan_print(&plan, stdout);
    assert_int_equal(plan.activation_type, MPAR_ACTIVATIONS_BF16);
    assert_int_equal(plan.stages[0].recompute, 0);
    assert_true(plan.device_memory_bytes[plan.stages[0].device] == m16.device_bytes[0]);
    mpar_plan_free(&plan);
    pd.memory_limit_bytes = 0;
    assert_int_equal(mpar_pipeline_plan(g_ctx, m, &pd, &o, &plan), MPAR_SUCCESS);
    assert_int_equal(plan.activation_type, MPAR_ACTIVATIONS_FP32);
    mpar_plan_free(&plan);
    mpar_model_destroy(m);
}

/* Inference with bf16 activations: the same outputs on one device, on two
   stages, and on an inference-only pipeline (no slots packed, links still
   16 bits). */
static void test_bf16_inference(void** state) {
    const mpar_stage_desc* st[3] = {ONE, TWO, TWO};
    float* out[3];
    double loss[3];
    int k;
    (void)state;
    for (k = 0; k < 3; k++) {
        mpar_pipeline_desc pd;
        mpar_pipeline* p = NULL;
        mpar_batch b;
        memset(&pd, 0, sizeof pd);
        pd.stages = st[k], pd.stage_count = k ? 2 : 1, pd.schedule = MPAR_SCHEDULE_1F1B, pd.microbatches = M;
        pd.max_batch = BATCH, pd.activation_type = MPAR_ACTIVATIONS_BF16, pd.inference_only = k == 2;
        out[k] = (float*)malloc(sizeof(float) * BATCH * SEQ * VOCAB);
        assert_non_null(out[k]);
        p = fx_pipeline(g_ctx, g_gpt, &pd);
        b.inputs = g_tokens, b.targets = g_targets, b.samples = BATCH;
        if (mpar_pipeline_infer(p, &b, out[k], &loss[k]) != MPAR_SUCCESS) fail_msg("infer: %s", mpar_last_error(g_ctx));
        mpar_pipeline_destroy(p);
    }
    printf("# bf16 inference loss: %.9f (one device) %.9f (two stages) %.9f (inference only)\n", loss[0], loss[1],
           loss[2]);
    for (k = 1; k < 3; k++) {
        assert_true(loss[k] == loss[0]);
        assert_memory_equal(out[0], out[k], sizeof(float) * BATCH * SEQ * VOCAB);
    }
    for (k = 0; k < 3; k++) free(out[k]);
}

static void test_bf16_bad_type(void** state) {
    mpar_pipeline_desc pd;
    mpar_pipeline* p = NULL;
    (void)state;
    memset(&pd, 0, sizeof pd);
    pd.stages = TWO, pd.stage_count = 2, pd.max_batch = BATCH, pd.microbatches = M;
    pd.activation_type = (mpar_activation_type)7;
    assert_int_equal(mpar_pipeline_create(g_ctx, g_gpt, &pd, &p), MPAR_ERROR_INVALID_ARGUMENT);
    assert_null(p);
    printf("# %s\n", mpar_last_error(g_ctx));
    assert_non_null(strstr(mpar_last_error(g_ctx), "activation_type 7"));
}

static void test_blocks_1f1b(void** s) { (void)s; blocks_equal(MPAR_SCHEDULE_1F1B, 1, 0); }
static void test_blocks_zbh1(void** s) { (void)s; blocks_equal(MPAR_SCHEDULE_ZB_H1, 1, 0); }
static void test_blocks_interleaved(void** s) { (void)s; blocks_equal(MPAR_SCHEDULE_INTERLEAVED_1F1B, 2, 0); }
static void test_blocks_recompute(void** s) { (void)s; blocks_equal(MPAR_SCHEDULE_1F1B, 1, 1); }

/* A limit below one layer's parameters: refused before allocating, naming
   the stage, the layer and the limit. */
static void test_blocks_layer_too_big(void** state) {
    mpar_pipeline_desc pd;
    mpar_pipeline* p = NULL;
    char expect[200];
    (void)state;
    memset(&pd, 0, sizeof pd);
    pd.stages = TWO, pd.stage_count = 2, pd.schedule = MPAR_SCHEDULE_1F1B, pd.microbatches = M, pd.max_batch = BATCH;
    pd.max_buffer_bytes = 64 << 10;
    assert_int_equal(mpar_pipeline_create(g_ctx, g_gpt, &pd, &p), MPAR_ERROR_DOES_NOT_FIT);
    assert_null(p);
    snprintf(expect, sizeof expect, "stage 0: layer 1 (decoder_block) alone needs a buffer of %llu bytes",
             (unsigned long long)mpar_model_layer(g_gpt, 1)->param_count * 4);
    if (!strstr(mpar_last_error(g_ctx), expect)) fail_msg("expected \"%s\" in \"%s\"", expect, mpar_last_error(g_ctx));
    assert_non_null(strstr(mpar_last_error(g_ctx), "allows at most 65536 in one buffer"));
}

/* ---- (b) inference only ---- */

static void test_inference_only(void** state) {
    mpar_pipeline_desc pd;
    mpar_pipeline *train_p = NULL, *infer_p = NULL;
    mpar_pipeline_stats st_train, st_infer;
    mpar_pipeline_memory_info mem;
    mpar_batch b;
    mpar_step_info info;
    float *out1 = (float*)malloc(sizeof(float) * BATCH * SEQ * VOCAB), *out2 = (float*)malloc(sizeof(float) * BATCH * SEQ * VOCAB);
    float* g = (float*)malloc(sizeof(float) * mpar_model_layer(g_gpt, 1)->param_count);
    double l1 = 0, l2 = 0;
    char path[] = "/tmp/mpar_test_memory_XXXXXX";
    int fd, i;
    uint64_t params = 0;
    mpar_error err;
    (void)state;
    assert_non_null(out1), assert_non_null(out2), assert_non_null(g);
    fd = mkstemp(path);
    assert_true(fd >= 0);
    close(fd);
    unlink(path); /* the name only: the checkpoint writes it */
    memset(&pd, 0, sizeof pd);
    pd.stages = TWO, pd.stage_count = 2, pd.schedule = MPAR_SCHEDULE_1F1B, pd.microbatches = M, pd.max_batch = BATCH;
    pd.optimizer.kind = MPAR_OPTIMIZER_ADAMW, pd.optimizer.lr = 1e-2f;
    assert_int_equal(mpar_pipeline_create(g_ctx, g_gpt, &pd, &train_p), MPAR_SUCCESS);
    b.inputs = g_tokens, b.targets = g_targets, b.samples = BATCH;
    assert_int_equal(mpar_pipeline_train_step(train_p, &b, &info), MPAR_SUCCESS);
    assert_int_equal(mpar_pipeline_save_checkpoint(train_p, path, &err), MPAR_SUCCESS);
    pd.inference_only = 1;
    assert_int_equal(mpar_pipeline_memory(g_ctx, g_gpt, &pd, &mem), MPAR_SUCCESS);
    assert_int_equal(mpar_pipeline_create(g_ctx, g_gpt, &pd, &infer_p), MPAR_SUCCESS);
    assert_int_equal(mpar_pipeline_get_stats(train_p, &st_train), MPAR_SUCCESS);
    assert_int_equal(mpar_pipeline_get_stats(infer_p, &st_infer), MPAR_SUCCESS);
    for (i = 0; i < 2; i++) {
        int l;
        uint64_t stage_params = 0;
        for (l = TWO[i].first_layer; l <= TWO[i].last_layer; l++) stage_params += mpar_model_layer(g_gpt, l)->param_count;
        params += stage_params;
        printf("# device stage %d: training %.2f MiB (%d slots), inference only %.2f MiB (%d slot), parameters "
               "%.2f MiB\n", i, (double)st_train.device_bytes[i] / 1048576.0, st_train.slots[i],
               (double)st_infer.device_bytes[i] / 1048576.0, st_infer.slots[i], (double)stage_params * 4 / 1048576.0);
        assert_int_equal(st_infer.device_bytes[i], mem.device_bytes[i]);
        assert_int_equal(st_infer.slots[i], 1);
        assert_true(st_infer.device_bytes[i] >= stage_params * 4);
        /* no gradients and no moments: at most the parameters and one micro-batch's activations more */
        assert_true(st_infer.device_bytes[i] * 2 < st_train.device_bytes[i]);
    }
    /* the trained parameters, loaded from the training pipeline's checkpoint */
    assert_int_equal(mpar_pipeline_load_checkpoint(infer_p, path, &err), MPAR_SUCCESS);
    assert_int_equal(mpar_pipeline_get_step(infer_p), 1);
    assert_int_equal(mpar_pipeline_infer(train_p, &b, out1, &l1), MPAR_SUCCESS);
    assert_int_equal(mpar_pipeline_infer(infer_p, &b, out2, &l2), MPAR_SUCCESS);
    assert_memory_equal(out1, out2, sizeof(float) * BATCH * SEQ * VOCAB);
    assert_true(l1 == l2 && l1 > 0.0);
    /* no training, no gradients, no moments, no checkpoint without them */
    assert_int_equal(mpar_pipeline_train_step(infer_p, &b, &info), MPAR_ERROR_INVALID_STATE);
    assert_non_null(strstr(mpar_last_error(g_ctx), "inference_only"));
    assert_int_equal(mpar_pipeline_compute_gradients(infer_p, &b, &info), MPAR_ERROR_INVALID_STATE);
    assert_int_equal(mpar_pipeline_apply_gradients(infer_p, &info), MPAR_ERROR_INVALID_STATE);
    assert_int_equal(mpar_pipeline_get_grads(infer_p, 1, g), MPAR_ERROR_INVALID_STATE);
    assert_non_null(strstr(mpar_last_error(g_ctx), "layer 1: an inference-only pipeline holds no gradients"));
    assert_int_equal(mpar_pipeline_read_state(infer_p, 1, MPAR_STATE_MOMENT1, g), MPAR_ERROR_INVALID_STATE);
    unlink(path);
    assert_int_equal(mpar_pipeline_save_checkpoint(infer_p, path, &err), MPAR_ERROR_INVALID_STATE);
    assert_non_null(strstr(err.message, "inference_only"));
    assert_int_equal(access(path, F_OK), -1); /* nothing written */
    /* and it still infers */
    assert_int_equal(mpar_pipeline_infer(infer_p, &b, out2, &l2), MPAR_SUCCESS);
    assert_memory_equal(out1, out2, sizeof(float) * BATCH * SEQ * VOCAB);
    mpar_pipeline_destroy(infer_p);
    mpar_pipeline_destroy(train_p);
    free(out1), free(out2), free(g);
    (void)params;
}

/* ---- (c) the memory limit ---- */

static void test_memory_limit(void** state) {
    mpar_pipeline_desc pd;
    mpar_pipeline* p = NULL;
    mpar_pipeline_memory_info mem, again;
    mpar_plan plan;
    mpar_plan_options o;
    double flops[2] = {1e9, 1e9};
    char expect[200];
    uint64_t limit;
    int d;
    (void)state;
    memset(&pd, 0, sizeof pd);
    pd.stages = TWO, pd.stage_count = 2, pd.schedule = MPAR_SCHEDULE_GPIPE, pd.microbatches = M, pd.max_batch = BATCH;
    assert_int_equal(mpar_pipeline_memory(g_ctx, g_gpt, &pd, &mem), MPAR_SUCCESS);
    assert_int_equal(mem.stages, 2);
    /* one byte less than device 1 needs */
    limit = mem.device_bytes[1] - 1;
    assert_true(mem.device_bytes[0] <= limit); /* device 0 (3 layers) needs less */
    pd.memory_limit_bytes = limit;
    assert_int_equal(mpar_pipeline_create(g_ctx, g_gpt, &pd, &p), MPAR_ERROR_DOES_NOT_FIT);
    assert_null(p);
    snprintf(expect, sizeof expect, "device 1 (stage 1) needs %llu bytes", (unsigned long long)mem.device_bytes[1]);
    if (!strstr(mpar_last_error(g_ctx), expect)) fail_msg("expected \"%s\" in \"%s\"", expect, mpar_last_error(g_ctx));
    assert_non_null(strstr(mpar_last_error(g_ctx), "0.0 MiB short"));
    assert_int_equal(mpar_pipeline_memory(g_ctx, g_gpt, &pd, &again), MPAR_ERROR_DOES_NOT_FIT);
    assert_int_equal(again.device_bytes[1], mem.device_bytes[1]);
    pd.memory_limit_bytes = mem.device_bytes[1];
    assert_int_equal(mpar_pipeline_create(g_ctx, g_gpt, &pd, &p), MPAR_SUCCESS);
    mpar_pipeline_destroy(p);
    /* two stages on one device share its memory: each fits alone, both do not */
    {
        mpar_stage_desc shared[2];
        memcpy(shared, TWO, sizeof shared);
        shared[1].device = shared[0].device;
        pd.stages = shared;
        pd.memory_limit_bytes = 0;
        assert_int_equal(mpar_pipeline_memory(g_ctx, g_gpt, &pd, &again), MPAR_SUCCESS);
        pd.memory_limit_bytes = again.device_bytes[0] > again.device_bytes[1] ? again.device_bytes[0] : again.device_bytes[1];
        pd.memory_limit_bytes += (again.device_bytes[0] + again.device_bytes[1] - pd.memory_limit_bytes) / 2;
        assert_int_equal(mpar_pipeline_create(g_ctx, g_gpt, &pd, &p), MPAR_ERROR_DOES_NOT_FIT);
        assert_null(p);
        snprintf(expect, sizeof expect, "device %d (stages 0 and 1 more) needs %llu bytes", shared[0].device,
                 (unsigned long long)(again.device_bytes[0] + again.device_bytes[1]));
        if (!strstr(mpar_last_error(g_ctx), expect)) fail_msg("expected \"%s\" in \"%s\"", expect, mpar_last_error(g_ctx));
        pd.stages = TWO, pd.memory_limit_bytes = 0;
    }
    /* the planner plans within the limit (less its reserve), by the executor's count */
    pd.stages = NULL, pd.stage_count = 0;
    pd.memory_limit_bytes = mem.device_bytes[1] + ((uint64_t)1 << 20);
    memset(&o, 0, sizeof o);
    o.device_flops = flops, o.reserve_bytes = (uint64_t)1 << 20;
    if (mpar_pipeline_plan(g_ctx, g_gpt, &pd, &o, &plan) != MPAR_SUCCESS) fail_msg("plan: %s", mpar_last_error(g_ctx));
    for (d = 0; d < plan.num_devices; d++) {
        printf("# planned within %llu bytes: device %d %llu bytes (capacity %llu)\n",
               (unsigned long long)pd.memory_limit_bytes, d, (unsigned long long)plan.device_memory_bytes[d],
               (unsigned long long)plan.device_capacity_bytes[d]);
        assert_int_equal(plan.device_capacity_bytes[d], mem.device_bytes[1]);
        assert_true(plan.device_memory_bytes[d] <= plan.device_capacity_bytes[d]);
    }
    pd.plan = &plan;
    assert_int_equal(mpar_pipeline_create(g_ctx, g_gpt, &pd, &p), MPAR_SUCCESS);
    mpar_pipeline_destroy(p);
    mpar_plan_free(&plan);
    /* a limit nothing fits in: the planner says DOES_NOT_FIT */
    pd.plan = NULL, pd.memory_limit_bytes = (uint64_t)256 << 10; /* 0.8 MiB of parameters alone */
    o.reserve_bytes = 1;
    assert_int_equal(mpar_pipeline_plan(g_ctx, g_gpt, &pd, &o, &plan), MPAR_ERROR_DOES_NOT_FIT);
}

/* ---- (d) recomputation where memory binds ---- */

/* A limit that the first stage meets as it is and the second only by
   recomputing: the planner recomputes on that stage alone, the plan fits
   by the executor's count, round-trips as text, and trains as one device
   without recomputation does, bit for bit. The same stages without
   recomputation do not fit. */
static void test_selective_recompute(void** state) {
    mpar_pipeline_desc pd;
    mpar_plan_options o;
    mpar_plan plan, parsed;
    mpar_pipeline_memory_info plain, all;
    mpar_pipeline* p = NULL;
    mpar_stage_desc st[2];
    int rec[2] = {1, 1}, j, chosen = 0;
    double flops[2] = {1e9, 1e9};
    uint64_t need_plain = 0, need_all = 0;
    char text[128], again[128];
    trained base, got;
    mpar_pipeline_memory_info mem;
    (void)state;
    memset(&pd, 0, sizeof pd);
    pd.stages = TWO, pd.stage_count = 2, pd.schedule = MPAR_SCHEDULE_GPIPE, pd.microbatches = M, pd.max_batch = BATCH;
    pd.optimizer.kind = MPAR_OPTIMIZER_ADAMW, pd.optimizer.lr = 1e-2f;
    assert_int_equal(mpar_pipeline_memory(g_ctx, g_gpt, &pd, &plain), MPAR_SUCCESS);
    pd.recompute_stages = rec;
    assert_int_equal(mpar_pipeline_memory(g_ctx, g_gpt, &pd, &all), MPAR_SUCCESS);
    for (j = 0; j < 2; j++) {
        need_plain = plain.device_bytes[j] > need_plain ? plain.device_bytes[j] : need_plain;
        need_all = all.device_bytes[j] > need_all ? all.device_bytes[j] : need_all;
    }
    printf("# GPipe, stages 0:0-2,1:3-7: %llu and %llu bytes, %llu and %llu recomputing everywhere\n",
           (unsigned long long)plain.device_bytes[0], (unsigned long long)plain.device_bytes[1],
           (unsigned long long)all.device_bytes[0], (unsigned long long)all.device_bytes[1]);
    assert_true(need_all < need_plain);
    /* the planner, free to move the cut, within a limit halfway between */
    pd.stages = NULL, pd.stage_count = 0, pd.recompute_stages = NULL;
    pd.memory_limit_bytes = plain.device_bytes[0] + 1; /* stage 0 fits as it is, stage 1 does not */
    memset(&o, 0, sizeof o);
    o.device_flops = flops, o.reserve_bytes = 1, o.use_devices = 2, o.order = MPAR_PLAN_ORDER_FIXED;
    if (mpar_pipeline_plan(g_ctx, g_gpt, &pd, &o, &plan) != MPAR_SUCCESS) fail_msg("plan: %s", mpar_last_error(g_ctx));
    mpar_plan_to_string(&plan, text, sizeof text);
    for (j = 0; j < plan.num_stages; j++) chosen += plan.stages[j].recompute;
    printf("# within %llu bytes: plan %s\n", (unsigned long long)pd.memory_limit_bytes, text);
    mpar_plan_print(&plan, stdout);
    assert_true(chosen >= 1 && chosen < plan.num_stages); /* where it binds, not everywhere */
    for (j = 0; j < plan.num_devices; j++) assert_true(plan.device_memory_bytes[j] <= plan.device_capacity_bytes[j]);
    /* the text form keeps the choice */
    assert_non_null(strchr(text, 'r'));
    assert_int_equal(mpar_plan_parse(text, strlen(text), &parsed, NULL), MPAR_SUCCESS);
    for (j = 0; j < plan.num_stages; j++) assert_int_equal(parsed.stages[j].recompute, plan.stages[j].recompute);
    mpar_plan_to_string(&parsed, again, sizeof again);
    assert_string_equal(text, again);
    mpar_plan_free(&parsed);
    /* the pipeline follows it, allocating what the plan predicts */
    pd.plan = &plan;
    assert_int_equal(mpar_pipeline_memory(g_ctx, g_gpt, &pd, &mem), MPAR_SUCCESS);
    for (j = 0; j < mem.stages; j++) assert_int_equal(mem.device_bytes[j], plan.device_memory_bytes[mem.device[j]]);
    assert_int_equal(mpar_pipeline_create(g_ctx, g_gpt, &pd, &p), MPAR_SUCCESS);
    mpar_pipeline_destroy(p);
    /* the same stages without recomputation do not fit */
    for (j = 0; j < 2; j++) {
        st[j].device = plan.stages[j].device;
        st[j].first_layer = plan.stages[j].first_layer, st[j].last_layer = plan.stages[j].last_layer;
    }
    pd.plan = NULL, pd.stages = st, pd.stage_count = 2;
    assert_int_equal(mpar_pipeline_create(g_ctx, g_gpt, &pd, &p), MPAR_ERROR_DOES_NOT_FIT);
    /* and with the plan's choice they train as one device without it */
    for (j = 0; j < 2; j++) rec[j] = plan.stages[j].recompute;
    pd.memory_limit_bytes = 0, pd.recompute_stages = NULL;
    train(ONE, 1, MPAR_SCHEDULE_GPIPE, 1, 0, 0, &base, &mem);
    g_recompute_stages = rec;
    train(st, 2, MPAR_SCHEDULE_GPIPE, 1, 0, 0, &got, &mem);
    g_recompute_stages = NULL;
    for (j = 0; j < STEPS; j++) assert_true(base.loss[j] == got.loss[j]);
    assert_memory_equal(base.params, got.params, sizeof(float) * mpar_model_param_count(g_gpt));
    free(base.params), free(got.params);
    mpar_plan_free(&plan);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_blocks_1f1b),         cmocka_unit_test(test_blocks_zbh1),
        cmocka_unit_test(test_blocks_interleaved),  cmocka_unit_test(test_blocks_recompute),
        cmocka_unit_test(test_blocks_layer_too_big), cmocka_unit_test(test_inference_only),
        cmocka_unit_test(test_memory_limit),        cmocka_unit_test(test_selective_recompute),
        cmocka_unit_test(test_bf16_activations),    cmocka_unit_test(test_bf16_gradients),
        cmocka_unit_test(test_bf16_auto),           cmocka_unit_test(test_bf16_inference),
        cmocka_unit_test(test_bf16_bad_type),
    };
    return cmocka_run_group_tests_name("memory", tests, setup, teardown);
}
