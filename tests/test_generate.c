/* Text generation with a key/value cache (issue 19): mpar_pipeline_generate.
   - Greedy generation with the cache gives, token for token, what a full
     forward of the whole prefix (mpar_pipeline_infer, argmax of the last
     position's logits) gives, on 1, 2 and 3 stages, with prompts of uneven
     length and several sequences in flight; the stream of on_token calls is
     the outputs, in order per sequence; a sequence stops at its length,
     at a stop token and when it fills the context.
   - Seeded top-k sampling is reproducible and the same on 1, 2 and 3
     stages; top_k 1 is greedy; another seed gives other tokens.
   - A cache that does not fit fails with MPAR_ERROR_DOES_NOT_FIT naming the
     device, and the memory model counts the cache as create allocates it.
   - Bad arguments get MPAR_ERROR_INVALID_ARGUMENT naming the field.
   - A stage that fails during generation stops the call naming the stage
     (no hang) and the pipeline then generates as before; a failed cache
     allocation at create is reported and cleaned up.
     make tests/test_generate && MPAR_CACHE_DIR=$PWD/build/cache tests/test_generate */
#define MPAR_IMPLEMENTATION
#include "mpar.h"

#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

const char* __lsan_default_suppressions(void);
const char* __lsan_default_suppressions(void) { return "leak:libpocl.so\nleak:libLLVM\n"; }

enum { V = 11, C = 16, HEADS = 2, T = 24, LAYERS = 7, SEQS = 5, MAXNEW = 24 };
static mpar_context* g_ctx;
static mpar_model* g_model;
static float* g_params[LAYERS];

static mpar_model* make_model(void) {
    mpar_model* m = NULL;
    mpar_model_desc md;
    mpar_layer_desc ld;
    int i;
    memset(&md, 0, sizeof md);
    md.input_features = 1, md.seq_len = T, md.seed = 19;
    assert_int_equal(mpar_model_create(&md, &m, NULL), MPAR_SUCCESS);
    memset(&ld, 0, sizeof ld);
    ld.type = mpar_layer_embedding(), ld.units = C, ld.vocab = V;
    assert_int_equal(mpar_model_add(m, &ld, NULL), MPAR_SUCCESS);
    for (i = 0; i < 3; i++) {
        memset(&ld, 0, sizeof ld);
        ld.type = mpar_layer_decoder_block(), ld.heads = HEADS;
        assert_int_equal(mpar_model_add(m, &ld, NULL), MPAR_SUCCESS);
    }
    assert_int_equal(mpar_model_add_simple(m, mpar_layer_layernorm(), NULL), MPAR_SUCCESS);
    assert_int_equal(mpar_model_add_linear(m, V, NULL), MPAR_SUCCESS);
    assert_int_equal(mpar_model_add_simple(m, mpar_layer_cross_entropy(), NULL), MPAR_SUCCESS);
    return m;
}

/* Stages: 1 [0-6]; 2 [0-2][3-6]; 3 [0-1][2-3][4-6] (the third on device 0 again). */
static mpar_pipeline_desc desc_for(int stages, mpar_stage_desc* st, int sequences, int context) {
    static const int firsts[4][3] = {{0}, {0}, {0, 3}, {0, 2, 4}};
    mpar_pipeline_desc pd;
    int i;
    memset(&pd, 0, sizeof pd);
    for (i = 0; i < stages; i++) {
        st[i].device = i % 2;
        st[i].first_layer = firsts[stages][i];
        st[i].last_layer = i + 1 < stages ? firsts[stages][i + 1] - 1 : LAYERS - 1;
    }
    pd.stages = st, pd.stage_count = stages, pd.max_batch = 1, pd.inference_only = 1;
    pd.generate_sequences = sequences, pd.generate_context = context;
    return pd;
}

static mpar_pipeline* make_pipeline(int stages, int sequences) {
    mpar_stage_desc st[3];
    mpar_pipeline_desc pd = desc_for(stages, st, sequences, 0);
    mpar_pipeline* p = NULL;
    int l;
    if (mpar_pipeline_create(g_ctx, g_model, &pd, &p) != MPAR_SUCCESS) fail_msg("create: %s", mpar_last_error(g_ctx));
    for (l = 0; l < LAYERS; l++)
        if (g_params[l]) assert_int_equal(mpar_pipeline_set_params(p, l, g_params[l]), MPAR_SUCCESS);
    return p;
}

static const int32_t g_p0[] = {1, 2, 3}, g_p1[] = {4, 4, 5, 9, 0, 10, 7}, g_p2[] = {6},
                     g_p3[] = {3, 1, 4, 1, 5}, g_p4[] = {2, 7, 1, 8, 2, 8, 1, 8, 2, 8, 4, 5, 9, 0, 4, 5, 2, 3, 5, 3};
static const int32_t* const g_prompts[SEQS] = {g_p0, g_p1, g_p2, g_p3, g_p4};
static const int g_lens[SEQS] = {3, 7, 1, 5, 20};
static const int g_max[SEQS] = {10, 6, 12, 8, 10}; /* the last one fills the context (24) after 4 */

typedef struct stream {
    int32_t tokens[SEQS][MAXNEW];
    int count[SEQS];
    int calls;
} stream;

static void on_token(void* user, int sequence, int token) {
    stream* s = (stream*)user;
    assert_true(sequence >= 0 && sequence < SEQS);
    assert_true(s->count[sequence] < MAXNEW);
    s->tokens[sequence][s->count[sequence]++] = token;
    s->calls++;
}

typedef struct result {
    int32_t out[SEQS][MAXNEW];
    int len[SEQS];
    mpar_generate_finish finish[SEQS];
    stream st;
} result;

static void run_generate(mpar_pipeline* p, mpar_generate_desc g, result* r) {
    int32_t* outs[SEQS];
    mpar_generate_stats stats;
    int i;
    memset(r, 0, sizeof *r);
    for (i = 0; i < SEQS; i++) outs[i] = r->out[i];
    g.sequences = SEQS, g.prompts = g_prompts, g.prompt_lengths = g_lens;
    if (!g.max_new_tokens && !g.max_new) g.max_new_tokens = g_max;
    g.outputs = outs, g.output_lengths = r->len, g.finish = r->finish;
    g.on_token = on_token, g.user = &r->st;
    if (mpar_pipeline_generate(p, &g, &stats) != MPAR_SUCCESS) fail_msg("generate: %s", mpar_last_error(g_ctx));
    for (i = 0; i < SEQS; i++) { /* the stream is the outputs, in order */
        assert_int_equal(r->st.count[i], r->len[i]);
        assert_memory_equal(r->st.tokens[i], r->out[i], sizeof(int32_t) * (size_t)r->len[i]);
    }
    assert_int_equal(stats.new_tokens, r->st.calls);
    assert_int_equal(stats.decode_tokens, r->st.calls - SEQS);
    assert_int_equal(stats.prompt_tokens, 3 + 7 + 1 + 5 + 20);
}

/* The next token by a full forward of the prefix. */
static int recompute_next(mpar_pipeline* p, const int32_t* prefix, int n) {
    int32_t in[T];
    float logits[T * V];
    int32_t best;
    mpar_batch b;
    memset(in, 0, sizeof in);
    memcpy(in, prefix, sizeof(int32_t) * (size_t)n);
    memset(&b, 0, sizeof b);
    b.inputs = in, b.samples = 1;
    if (mpar_pipeline_infer(p, &b, logits, NULL) != MPAR_SUCCESS) fail_msg("infer: %s", mpar_last_error(g_ctx));
    assert_int_equal(mpar_argmax(logits + (size_t)(n - 1) * V, 1, V, &best, NULL), MPAR_SUCCESS);
    return (int)best;
}

static void check_against_recompute(mpar_pipeline* p, const result* r) {
    int i, k;
    for (i = 0; i < SEQS; i++) {
        int32_t seq[T + MAXNEW];
        memcpy(seq, g_prompts[i], sizeof(int32_t) * (size_t)g_lens[i]);
        for (k = 0; k < r->len[i]; k++) {
            int want = recompute_next(p, seq, g_lens[i] + k);
            if (want != r->out[i][k])
                fail_msg("sequence %d, new token %d: the cache gave %d, a full forward %d", i, k, (int)r->out[i][k],
                         want);
            seq[g_lens[i] + k] = r->out[i][k];
        }
    }
}

static void test_greedy_matches_recompute(void** state) {
    result r[4];
    int stages, i;
    (void)state;
    for (stages = 1; stages <= 3; stages++) {
        mpar_pipeline* p = make_pipeline(stages, SEQS + 1);
        mpar_generate_desc g;
        memset(&g, 0, sizeof g);
        run_generate(p, g, &r[stages]);
        for (i = 0; i < SEQS; i++) {
            int want = g_lens[i] + g_max[i] <= T ? g_max[i] : T - g_lens[i];
            assert_int_equal(r[stages].len[i], want);
            assert_int_equal(r[stages].finish[i], g_lens[i] + g_max[i] <= T ? MPAR_GENERATE_FINISH_LENGTH
                                                                            : MPAR_GENERATE_FINISH_CONTEXT);
        }
        check_against_recompute(p, &r[stages]);
        if (stages > 1)
            for (i = 0; i < SEQS; i++)
                assert_memory_equal(r[stages].out[i], r[1].out[i], sizeof(int32_t) * (size_t)r[1].len[i]);
        /* the cache is overwritten by the next call: again, in other groups */
        g.groups = SEQS;
        run_generate(p, g, &r[0]);
        for (i = 0; i < SEQS; i++)
            assert_memory_equal(r[0].out[i], r[1].out[i], sizeof(int32_t) * (size_t)r[1].len[i]);
        mpar_pipeline_destroy(p);
    }
    /* the model must not be trivial: the sequences differ */
    assert_true(memcmp(r[1].out[0], r[1].out[2], 5 * sizeof(int32_t)) != 0 ||
                memcmp(r[1].out[1], r[1].out[3], 5 * sizeof(int32_t)) != 0);
}

static void test_stop_tokens(void** state) {
    mpar_pipeline* p = make_pipeline(2, SEQS);
    mpar_generate_desc g;
    result free_run, stopped;
    int32_t stop;
    int i, k;
    (void)state;
    memset(&g, 0, sizeof g);
    run_generate(p, g, &free_run);
    stop = free_run.out[0][2];
    g.stop_tokens = &stop, g.stop_count = 1;
    run_generate(p, g, &stopped);
    for (i = 0; i < SEQS; i++) {
        for (k = 0; k < free_run.len[i] && free_run.out[i][k] != stop; k++) {}
        if (k < free_run.len[i]) {
            assert_int_equal(stopped.len[i], k + 1); /* the stop token is in the output */
            assert_int_equal(stopped.finish[i], MPAR_GENERATE_FINISH_STOP);
        } else {
            assert_int_equal(stopped.len[i], free_run.len[i]);
        }
        assert_memory_equal(stopped.out[i], free_run.out[i], sizeof(int32_t) * (size_t)stopped.len[i]);
    }
    assert_true(stopped.len[0] <= 3);
    mpar_pipeline_destroy(p);
}

static void test_sampling_reproducible(void** state) {
    result r[4], again, other, greedy, top1;
    mpar_generate_desc g;
    int stages, i, differs = 0;
    (void)state;
    memset(&g, 0, sizeof g);
    g.temperature = 0.9f, g.top_k = 4, g.seed = 7, g.groups = 2;
    for (stages = 1; stages <= 3; stages++) {
        mpar_pipeline* p = make_pipeline(stages, SEQS);
        run_generate(p, g, &r[stages]);
        if (stages == 2) {
            mpar_generate_desc h = g;
            run_generate(p, g, &again);
            h.seed = 8;
            run_generate(p, h, &other);
            memset(&h, 0, sizeof h);
            run_generate(p, h, &greedy);
            h.temperature = 1.5f, h.top_k = 1, h.seed = 3;
            run_generate(p, h, &top1);
        }
        mpar_pipeline_destroy(p);
    }
    for (i = 0; i < SEQS; i++) {
        assert_int_equal(r[2].len[i], r[1].len[i]);
        assert_int_equal(r[3].len[i], r[1].len[i]);
        assert_int_equal(again.len[i], r[1].len[i]);
        assert_memory_equal(r[2].out[i], r[1].out[i], sizeof(int32_t) * (size_t)r[1].len[i]);
        assert_memory_equal(r[3].out[i], r[1].out[i], sizeof(int32_t) * (size_t)r[1].len[i]);
        assert_memory_equal(again.out[i], r[1].out[i], sizeof(int32_t) * (size_t)r[1].len[i]);
        assert_memory_equal(top1.out[i], greedy.out[i], sizeof(int32_t) * (size_t)greedy.len[i]);
        differs += memcmp(other.out[i], r[1].out[i], sizeof(int32_t) * (size_t)r[1].len[i]) != 0;
        differs += memcmp(greedy.out[i], r[1].out[i], sizeof(int32_t) * (size_t)r[1].len[i]) != 0;
    }
    assert_true(differs >= 2); /* another seed, and greedy, give other tokens */
}

static void test_memory_and_does_not_fit(void** state) {
    mpar_stage_desc st[3];
    mpar_pipeline_desc plain = desc_for(2, st, 0, 0), gen = desc_for(2, st, 8, 20);
    mpar_pipeline_memory_info a, b;
    mpar_pipeline_stats stats;
    mpar_pipeline* p = NULL;
    uint64_t kv = 2ull * 4 * 8 * 20 * C; /* per decoder block: keys and values */
    int i;
    (void)state;
    assert_int_equal(mpar_pipeline_memory(g_ctx, g_model, &plain, &a), MPAR_SUCCESS);
    assert_int_equal(mpar_pipeline_memory(g_ctx, g_model, &gen, &b), MPAR_SUCCESS);
    /* stage 0 holds 2 blocks, stage 1 one, besides the work buffers */
    assert_true(b.device_bytes[0] >= a.device_bytes[0] + 2 * kv);
    assert_true(b.device_bytes[1] >= a.device_bytes[1] + kv);
    /* the model's count is what create allocates */
    if (mpar_pipeline_create(g_ctx, g_model, &gen, &p) != MPAR_SUCCESS) fail_msg("%s", mpar_last_error(g_ctx));
    assert_int_equal(mpar_pipeline_get_stats(p, &stats), MPAR_SUCCESS);
    for (i = 0; i < 2; i++) assert_int_equal((uint64_t)stats.device_bytes[i], b.device_bytes[i]);
    mpar_pipeline_destroy(p);
    p = NULL;
    /* a limit the plain pipeline fits in but not its cache */
    gen.memory_limit_bytes = b.device_bytes[0] - kv;
    plain.memory_limit_bytes = gen.memory_limit_bytes;
    assert_int_equal(mpar_pipeline_memory(g_ctx, g_model, &plain, &a), MPAR_SUCCESS);
    /* refused before the first buffer: an allocation fault armed for it
       does not fire */
    assert_int_equal(mpar_set_fault(g_ctx, "alloc:*:*:1"), MPAR_SUCCESS);
    assert_int_equal(mpar_pipeline_create(g_ctx, g_model, &gen, &p), MPAR_ERROR_DOES_NOT_FIT);
    assert_null(p);
    assert_int_equal(mpar_set_fault(g_ctx, NULL), MPAR_SUCCESS);
    assert_non_null(strstr(mpar_last_error(g_ctx), "device 0"));
    assert_non_null(strstr(mpar_last_error(g_ctx), "bytes"));
    assert_int_equal(mpar_pipeline_memory(g_ctx, g_model, &gen, &b), MPAR_ERROR_DOES_NOT_FIT);
    /* a cache larger than the largest buffer */
    gen = desc_for(2, st, 64, T), gen.max_buffer_bytes = 60000; /* a block's buffers fit, its 98304-byte caches not */
    assert_int_equal(mpar_pipeline_create(g_ctx, g_model, &gen, &p), MPAR_ERROR_DOES_NOT_FIT);
    if (!strstr(mpar_last_error(g_ctx), "key cache")) fail_msg("%s", mpar_last_error(g_ctx));
}

/* A stage that fails mid-generation stops the call (no hang), names the
   stage, and the pipeline generates as before afterwards; an allocation
   failure in the caches at create is reported and cleaned up. */
static void test_failure(void** state) {
    mpar_pipeline* p = make_pipeline(2, SEQS);
    mpar_stage_desc st[3];
    mpar_pipeline_desc pd = desc_for(2, st, SEQS, 0);
    mpar_pipeline* q = NULL;
    mpar_generate_desc g;
    result before, after;
    const int32_t* prompts[SEQS];
    int i, k;
    mpar_result r;
    (void)state;
    memset(&g, 0, sizeof g);
    run_generate(p, g, &before);
    for (k = 1; k <= 40; k += 13) { /* early, in the prefills, and in the decode steps */
        char spec[64];
        snprintf(spec, sizeof spec, "enqueue:1:*:%d", k);
        assert_int_equal(mpar_set_fault(g_ctx, spec), MPAR_SUCCESS);
        for (i = 0; i < SEQS; i++) prompts[i] = g_prompts[i];
        g.sequences = SEQS, g.prompts = prompts, g.prompt_lengths = g_lens, g.max_new_tokens = g_max;
        r = mpar_pipeline_generate(p, &g, NULL);
        assert_int_equal(mpar_set_fault(g_ctx, NULL), MPAR_SUCCESS);
        if (r == MPAR_SUCCESS) fail_msg("fault %s: generation succeeded", spec);
        if (!strstr(mpar_last_error(g_ctx), "stage 1")) fail_msg("fault %s: %s", spec, mpar_last_error(g_ctx));
        memset(&g, 0, sizeof g);
        run_generate(p, g, &after);
        for (i = 0; i < SEQS; i++) {
            assert_int_equal(after.len[i], before.len[i]);
            assert_memory_equal(after.out[i], before.out[i], sizeof(int32_t) * (size_t)before.len[i]);
        }
    }
    mpar_pipeline_destroy(p);
    /* every allocation of create in turn, the caches (the last ones) included */
    for (k = 1;; k++) {
        char spec[64];
        snprintf(spec, sizeof spec, "alloc:*:*:%d", k);
        assert_int_equal(mpar_set_fault(g_ctx, spec), MPAR_SUCCESS);
        r = mpar_pipeline_create(g_ctx, g_model, &pd, &q);
        assert_int_equal(mpar_set_fault(g_ctx, NULL), MPAR_SUCCESS);
        if (r == MPAR_SUCCESS) break; /* past the last allocation */
        assert_null(q);
        if (!strstr(mpar_last_error(g_ctx), "clCreateBuffer")) fail_msg("alloc %d: %s", k, mpar_last_error(g_ctx));
        assert_true(k < 1000);
    }
    assert_true(k > 3 * 2 + 5 * 2); /* at least the caches and work buffers of both stages failed once */
    mpar_pipeline_destroy(q);
}

static void expect_bad(mpar_pipeline* p, const mpar_generate_desc* g, mpar_result code, const char* field) {
    mpar_result r = mpar_pipeline_generate(p, g, NULL);
    if (r != code || !strstr(mpar_last_error(g_ctx), field))
        fail_msg("expected %s naming '%s', got %s: %s", mpar_result_string(code), field, mpar_result_string(r),
                 mpar_last_error(g_ctx));
}

static void test_bad_arguments(void** state) {
    mpar_pipeline* p = make_pipeline(2, 3);
    mpar_pipeline* plain;
    mpar_stage_desc st[3];
    mpar_pipeline_desc pd = desc_for(1, st, 0, 0);
    mpar_generate_desc g, b;
    static const int32_t bad_tok[] = {1, V};
    static const int32_t* const prompts[3] = {g_p0, g_p1, g_p2};
    const int32_t* null_prompts[3] = {g_p0, NULL, g_p2};
    const int32_t* bad_prompts[3] = {g_p0, bad_tok, g_p2};
    int lens[3] = {3, 7, 1}, long_lens[3] = {3, T, 1}, two[3] = {3, 2, 1}, neg[3] = {1, -1, 1};
    (void)state;
    memset(&g, 0, sizeof g);
    g.sequences = 3, g.prompts = prompts, g.prompt_lengths = lens, g.max_new = 2;
    assert_int_equal(mpar_pipeline_generate(p, &g, NULL), MPAR_SUCCESS);
    b = g, b.sequences = 4, expect_bad(p, &b, MPAR_ERROR_INVALID_ARGUMENT, "sequences");
    b = g, b.sequences = 0, expect_bad(p, &b, MPAR_ERROR_INVALID_ARGUMENT, "sequences");
    b = g, b.prompts = NULL, expect_bad(p, &b, MPAR_ERROR_INVALID_ARGUMENT, "prompts");
    b = g, b.prompts = null_prompts, expect_bad(p, &b, MPAR_ERROR_INVALID_ARGUMENT, "prompts");
    b = g, b.prompts = bad_prompts, b.prompt_lengths = two, expect_bad(p, &b, MPAR_ERROR_INVALID_ARGUMENT, "vocabulary");
    b = g, b.prompt_lengths = NULL, expect_bad(p, &b, MPAR_ERROR_INVALID_ARGUMENT, "prompt_lengths");
    b = g, b.prompt_lengths = long_lens, expect_bad(p, &b, MPAR_ERROR_INVALID_ARGUMENT, "prompt_lengths");
    b = g, b.max_new = -1, expect_bad(p, &b, MPAR_ERROR_INVALID_ARGUMENT, "max_new");
    b = g, b.max_new_tokens = neg, expect_bad(p, &b, MPAR_ERROR_INVALID_ARGUMENT, "max_new_tokens");
    b = g, b.temperature = -1.0f, expect_bad(p, &b, MPAR_ERROR_INVALID_ARGUMENT, "temperature");
    b = g, b.temperature = NAN, expect_bad(p, &b, MPAR_ERROR_INVALID_ARGUMENT, "temperature");
    b = g, b.top_k = -2, expect_bad(p, &b, MPAR_ERROR_INVALID_ARGUMENT, "top_k");
    b = g, b.groups = 4, expect_bad(p, &b, MPAR_ERROR_INVALID_ARGUMENT, "groups");
    b = g, b.stop_count = 2, expect_bad(p, &b, MPAR_ERROR_INVALID_ARGUMENT, "stop_tokens");
    expect_bad(p, NULL, MPAR_ERROR_INVALID_ARGUMENT, "NULL");
    /* nothing to generate is fine */
    b = g, b.max_new = 0;
    assert_int_equal(mpar_pipeline_generate(p, &b, NULL), MPAR_SUCCESS);
    mpar_pipeline_destroy(p);
    /* a pipeline without a cache */
    if (mpar_pipeline_create(g_ctx, g_model, &pd, &plain) != MPAR_SUCCESS) fail_msg("%s", mpar_last_error(g_ctx));
    expect_bad(plain, &g, MPAR_ERROR_INVALID_STATE, "generate_sequences");
    mpar_pipeline_destroy(plain);
    /* create-time fields */
    plain = NULL;
    pd.generate_sequences = -1;
    assert_int_equal(mpar_pipeline_create(g_ctx, g_model, &pd, &plain), MPAR_ERROR_INVALID_ARGUMENT);
    assert_non_null(strstr(mpar_last_error(g_ctx), "generate_sequences"));
    pd.generate_sequences = 2, pd.generate_context = T + 1;
    assert_int_equal(mpar_pipeline_create(g_ctx, g_model, &pd, &plain), MPAR_ERROR_INVALID_ARGUMENT);
    assert_non_null(strstr(mpar_last_error(g_ctx), "generate_context"));
    pd.generate_sequences = 0, pd.generate_context = 8;
    assert_int_equal(mpar_pipeline_create(g_ctx, g_model, &pd, &plain), MPAR_ERROR_INVALID_ARGUMENT);
    assert_non_null(strstr(mpar_last_error(g_ctx), "generate_context"));
    assert_null(plain);
    /* a model generation cannot run: an MLP on float inputs */
    {
        mpar_model* m = NULL;
        mpar_model_desc md;
        memset(&md, 0, sizeof md);
        md.input_features = 4;
        assert_int_equal(mpar_model_create(&md, &m, NULL), MPAR_SUCCESS);
        assert_int_equal(mpar_model_add_linear(m, 3, NULL), MPAR_SUCCESS);
        assert_int_equal(mpar_model_add_simple(m, mpar_layer_cross_entropy(), NULL), MPAR_SUCCESS);
        pd.generate_sequences = 2, pd.generate_context = 0, st[0].last_layer = 1;
        assert_int_equal(mpar_pipeline_create(g_ctx, m, &pd, &plain), MPAR_ERROR_INVALID_MODEL);
        if (!strstr(mpar_last_error(g_ctx), "embedding")) fail_msg("%s", mpar_last_error(g_ctx));
        mpar_model_destroy(m);
    }
}

static int group_setup(void** state) {
    mpar_desc d;
    mpar_error err;
    uint64_t s = 1919;
    int l;
    (void)state;
    memset(&d, 0, sizeof d);
    d.error = &err;
    d.kernel_path = "kernels";
    if (mpar_create(&d, &g_ctx) != MPAR_SUCCESS) {
        fprintf(stderr, "mpar_create: %s\n", err.message);
        return -1;
    }
    if (mpar_device_count(g_ctx) < 2) {
        fprintf(stderr, "test_generate needs two devices (POCL_DEVICES=\"basic basic\")\n");
        return -1;
    }
    g_model = make_model();
    /* larger weights than the initialisation's, so that the next token
       depends on the whole context and not only on the last one */
    for (l = 0; l < LAYERS; l++) {
        const mpar_layer* ly = mpar_model_layer(g_model, l);
        size_t i, n = ly->param_count;
        if (!n) continue;
        g_params[l] = (float*)malloc(sizeof(float) * n);
        assert_int_equal(mpar_model_init_params(g_model, l, g_params[l], NULL), MPAR_SUCCESS);
        if (ly->type == mpar_layer_decoder_block() || ly->type == mpar_layer_embedding())
            for (i = 0; i < n; i++) g_params[l][i] = (float)(g_params[l][i] * 10.0 + 0.1 * (mpar__rng_uniform(&s) - 0.5));
    }
    return 0;
}

static int group_teardown(void** state) {
    int l;
    (void)state;
    for (l = 0; l < LAYERS; l++) free(g_params[l]);
    mpar_model_destroy(g_model);
    mpar_destroy(g_ctx);
    return 0;
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_greedy_matches_recompute),
        cmocka_unit_test(test_stop_tokens),
        cmocka_unit_test(test_sampling_reproducible),
        cmocka_unit_test(test_memory_and_does_not_fit),
        cmocka_unit_test(test_bad_arguments),
        cmocka_unit_test(test_failure),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
