/* Generation with a key/value cache (mpar_pipeline_generate), one
   `name: value` per line:
     decode_tokens_per_s_2dev_over_1dev  8 sequences in flight, decoding in
                                         2 groups that take turns through 2
                                         stages, over the same on 1 device
                                         (decode tokens / decode seconds)
     prefill_speedup_2dev                8 prompts of 128 tokens prefilled
                                         through 2 stages (micro-batches in
                                         flight) over 1 device (prompt
                                         tokens / prefill seconds)
     kv_over_recompute_speed_ctx256      per-token decode time at context
                                         256 on 1 device: a full forward of
                                         the 256 positions (mpar_pipeline_infer,
                                         what sampling did before) over one
                                         cached decode step of one sequence
                                         whose context runs from 192 to 256
   A GPT of width 256, 4 decoder blocks (8 heads), context 256, 64 tokens;
   two stages of two blocks each. Configurations alternate, ROUNDS times,
   medians compared. Needs two devices that run in parallel:
   POCL_DEVICES="basic basic". */
#define MPAR_IMPLEMENTATION
#include "mpar.h"

enum { V = 64, C = 256, HEADS = 8, BLOCKS = 4, T = 256, LAYERS = BLOCKS + 4, SEQS = 8, ROUNDS = 5 };

static mpar_context* ctx;

static void die(const char* what) {
    fprintf(stderr, "bench_generate: %s: %s\n", what, ctx ? mpar_last_error(ctx) : "");
    exit(1);
}

static mpar_model* gpt(void) {
    mpar_model_desc md;
    mpar_layer_desc ld;
    mpar_model* m = NULL;
    int i, r = 0;
    memset(&md, 0, sizeof md);
    md.input_features = 1, md.seq_len = T, md.seed = 5;
    if (mpar_model_create(&md, &m, NULL) != MPAR_SUCCESS) die("model");
    memset(&ld, 0, sizeof ld);
    ld.type = mpar_layer_embedding(), ld.units = C, ld.vocab = V;
    r |= mpar_model_add(m, &ld, NULL);
    for (i = 0; i < BLOCKS; i++) {
        memset(&ld, 0, sizeof ld);
        ld.type = mpar_layer_decoder_block(), ld.heads = HEADS;
        r |= mpar_model_add(m, &ld, NULL);
    }
    r |= mpar_model_add_simple(m, mpar_layer_layernorm(), NULL);
    r |= mpar_model_add_linear(m, V, NULL);
    r |= mpar_model_add_simple(m, mpar_layer_cross_entropy(), NULL);
    if (r) die("model layers");
    return m;
}

static mpar_pipeline* pipeline(mpar_model* m, int devices) {
    mpar_stage_desc st[2];
    mpar_pipeline_desc pd;
    mpar_pipeline* p = NULL;
    memset(&pd, 0, sizeof pd);
    if (devices == 2) {
        st[0].device = 0, st[0].first_layer = 0, st[0].last_layer = BLOCKS / 2;
        st[1].device = 1, st[1].first_layer = BLOCKS / 2 + 1, st[1].last_layer = LAYERS - 1;
    } else {
        st[0].device = 0, st[0].first_layer = 0, st[0].last_layer = LAYERS - 1;
    }
    pd.stages = st, pd.stage_count = devices, pd.max_batch = 1, pd.inference_only = 1;
    pd.generate_sequences = SEQS, pd.generate_context = T;
    if (mpar_pipeline_create(ctx, m, &pd, &p) != MPAR_SUCCESS) die("pipeline");
    return p;
}

static int32_t prompt_tokens[SEQS][T];

/* Generation of SEQS prompts of `len` tokens, `new_tokens` each (1 sequence when one). */
static mpar_generate_stats run(mpar_pipeline* p, int sequences, int len, int new_tokens) {
    const int32_t* prompts[SEQS];
    int lens[SEQS], i;
    mpar_generate_desc g;
    mpar_generate_stats s;
    for (i = 0; i < sequences; i++) prompts[i] = prompt_tokens[i], lens[i] = len;
    memset(&g, 0, sizeof g);
    g.sequences = sequences, g.prompts = prompts, g.prompt_lengths = lens, g.max_new = new_tokens;
    g.temperature = 1.0f, g.seed = 3; /* sampling: no early repetition loops, every sequence runs its length */
    if (mpar_pipeline_generate(p, &g, &s) != MPAR_SUCCESS) die("generate");
    return s;
}

static int by_value(const void* a, const void* b) {
    double x = *(const double*)a, y = *(const double*)b;
    return x < y ? -1 : x > y;
}
static double median(double* v, int n) {
    qsort(v, (size_t)n, sizeof *v, by_value);
    return v[n / 2];
}

int main(void) {
    mpar_desc d;
    mpar_error err;
    mpar_model* m;
    mpar_pipeline *one, *two;
    double dec1[ROUNDS], dec2[ROUNDS], pre1[ROUNDS], pre2[ROUNDS], rec[ROUNDS], kv[ROUNDS];
    int32_t window[T];
    uint64_t rng = 77;
    int i, j, r;
    memset(&d, 0, sizeof d);
    d.error = &err;
    if (mpar_create(&d, &ctx) != MPAR_SUCCESS) {
        fprintf(stderr, "bench_generate: %s\n", err.message);
        return 1;
    }
    if (mpar_device_count(ctx) < 2) die("needs two devices (POCL_DEVICES=\"basic basic\")");
    for (i = 0; i < SEQS; i++)
        for (j = 0; j < T; j++) prompt_tokens[i][j] = (int32_t)(mpar__rng_next(&rng) % V);
    m = gpt();
    one = pipeline(m, 1), two = pipeline(m, 2);
    for (i = 0; i < LAYERS; i++) { /* the same parameters in both */
        size_t n = mpar_model_layer(m, i)->param_count;
        float* w = (float*)malloc(sizeof(float) * (n ? n : 1));
        if (!w || mpar_model_init_params(m, i, w, NULL) != MPAR_SUCCESS || mpar_pipeline_set_params(one, i, w) ||
            mpar_pipeline_set_params(two, i, w))
            die("parameters");
        free(w);
    }
    run(one, SEQS, 16, 8), run(two, SEQS, 16, 8); /* warm-up: kernels, first runs of each row count */
    run(one, SEQS, 128, 1), run(two, SEQS, 128, 1);
    for (r = 0; r < ROUNDS; r++) {
        mpar_generate_stats a = run(one, SEQS, 16, 48), b = run(two, SEQS, 16, 48);
        mpar_generate_stats c = run(one, SEQS, 128, 1), e = run(two, SEQS, 128, 1);
        dec1[r] = (double)a.decode_tokens / a.decode_seconds, dec2[r] = (double)b.decode_tokens / b.decode_seconds;
        pre1[r] = (double)c.prompt_tokens / c.prefill_seconds, pre2[r] = (double)e.prompt_tokens / e.prefill_seconds;
    }
    for (j = 0; j < T; j++) window[j] = prompt_tokens[0][j];
    for (r = 0; r < ROUNDS; r++) { /* at context 256: 64 cached steps, then as many full forwards */
        mpar_generate_stats s = run(one, 1, T - 64, 64);
        mpar_batch b;
        double t0;
        memset(&b, 0, sizeof b);
        b.inputs = window, b.samples = 1;
        kv[r] = s.decode_seconds / (double)s.decode_tokens;
        t0 = mpar__now();
        for (j = 0; j < 16; j++)
            if (mpar_pipeline_infer(one, &b, NULL, NULL) != MPAR_SUCCESS) die("infer");
        rec[r] = (mpar__now() - t0) / 16.0;
    }
    printf("decode_tokens_per_s_1dev: %.1f\n", median(dec1, ROUNDS));
    printf("decode_tokens_per_s_2dev: %.1f\n", median(dec2, ROUNDS));
    printf("decode_tokens_per_s_2dev_over_1dev: %.2f\n", median(dec2, ROUNDS) / median(dec1, ROUNDS));
    printf("prefill_speedup_2dev: %.2f\n", median(pre2, ROUNDS) / median(pre1, ROUNDS));
    printf("kv_over_recompute_speed_ctx256: %.1f\n", median(rec, ROUNDS) / median(kv, ROUNDS));
    mpar_pipeline_destroy(two);
    mpar_pipeline_destroy(one);
    mpar_model_destroy(m);
    mpar_destroy(ctx);
    return 0;
}
