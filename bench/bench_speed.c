/* Per-device speed: mpar against what a user would write without it, one
   `name: value` per line.
     host_ref_samples_per_s         a plain single-thread C training step of the
                                    bench model (CBLAS GEMMs, simple loops,
                                    whole batch at once)
     host_ref_gemm_gflops           the reference's GEMM rate (its GEMMs alone)
     samples_per_s_1dev_over_host_ref   mpar on one device (M = 1) / reference
     samples_per_s_1dev_m8_over_host_ref  the same with 8 micro-batches
     samples_per_s_2dev_over_host_ref   mpar's best 2-device schedule / reference
     best_2dev                      which schedule and M that was
     samples_per_s_1dev_opencl_over_host_ref  one device with every layer as
                                    OpenCL kernels (mpar_desc.cpu_route OPENCL)
     gemm_gflops_1dev               GEMM rate of one device at the bench's
                                    micro-batch shape, through mpar's route there
     launches_per_microbatch        kernel launches + GEMMs per micro-batch and
                                    stage (1 device, M = 8), and how many of them
                                    went to OpenCL, per route
     first_loss_rel_diff            |mpar's first loss - reference's| / reference's:
                                    the two compute the same thing
   The model is bench_pipeline's: 6 × (linear 384 + relu) + linear 10 +
   cross-entropy, batch 256, SGD. Configurations alternate within each round
   and medians are printed, since timings on shared machines drift. */
#define MPAR_IMPLEMENTATION
#include "mpar.h"
#include <cblas.h>

enum { WIDTH = 384, BLOCKS = 6, CLASSES = 10, BATCH = 256, ROUNDS = 5, STEPS = 6, LINEARS = BLOCKS + 1 };
static const float LR = 1e-3f;

static mpar_context *ctx, *ctx_cl;
static mpar_model* model;
static float* x;
static int32_t* y;

static void die(mpar_context* c, const char* what) {
    fprintf(stderr, "bench_speed: %s: %s\n", what, mpar_last_error(c));
    exit(1);
}

/* ---- the reference: what one would write by hand ---- */
typedef struct ref_net {
    int in[LINEARS], out[LINEARS];
    float *w[LINEARS], *b[LINEARS], *gw[LINEARS], *gb[LINEARS];
    float* act[LINEARS + 1]; /* act[0] = input, act[l+1] = output of linear l (after relu) */
    float *grad_a, *grad_b;  /* [BATCH × WIDTH] each, ping-pong */
    double gemm_seconds;
} ref_net;

static void ref_init(ref_net* n) {
    int l;
    memset(n, 0, sizeof *n);
    for (l = 0; l < LINEARS; l++) {
        size_t in = WIDTH, out = l == BLOCKS ? CLASSES : WIDTH;
        float* params = (float*)malloc(sizeof(float) * (in * out + out));
        mpar_error err;
        /* the same initial parameters as mpar's model: layer 2l is linear l */
        if (mpar_model_init_params(model, 2 * l, params, &err) != MPAR_SUCCESS) die(ctx, "init");
        n->in[l] = (int)in, n->out[l] = (int)out;
        n->w[l] = params, n->b[l] = params + in * out;
        n->gw[l] = (float*)malloc(sizeof(float) * (in * out + out));
        n->gb[l] = n->gw[l] + in * out;
        n->act[l + 1] = (float*)malloc(sizeof(float) * BATCH * out);
    }
    n->grad_a = (float*)malloc(sizeof(float) * BATCH * WIDTH);
    n->grad_b = (float*)malloc(sizeof(float) * BATCH * WIDTH);
}

static void ref_free(ref_net* n) {
    int l;
    for (l = 0; l < LINEARS; l++) free(n->w[l]), free(n->gw[l]), free(n->act[l + 1]);
    free(n->grad_a), free(n->grad_b);
}

static void gemm(ref_net* n, int ta, int tb, int m, int nn, int k, const float* a, int lda, const float* b, int ldb,
                 float* c, int ldc) {
    double t0 = mpar__now();
    cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, m, nn, k, 1.0f, a, lda, b,
                ldb, 0.0f, c, ldc);
    n->gemm_seconds += mpar__now() - t0;
}

/* One SGD step on the whole batch; returns the mean loss. */
static double ref_step(ref_net* n, const float* input, const int32_t* target) {
    int l, r, j;
    double loss = 0.0;
    float *g = n->grad_a, *g2 = n->grad_b;
    n->act[0] = (float*)input;
    for (l = 0; l < LINEARS; l++) {
        int in = n->in[l], out = n->out[l];
        float* o = n->act[l + 1];
        gemm(n, 0, 0, BATCH, out, in, n->act[l], in, n->w[l], out, o, out);
        for (r = 0; r < BATCH; r++)
            for (j = 0; j < out; j++) {
                float v = o[r * out + j] + n->b[l][j];
                o[r * out + j] = l < BLOCKS && v < 0.0f ? 0.0f : v;
            }
    }
    for (r = 0; r < BATCH; r++) { /* softmax cross-entropy, mean over rows */
        const float* z = n->act[LINEARS] + r * CLASSES;
        float mx = z[0], sum = 0.0f;
        for (j = 1; j < CLASSES; j++) mx = z[j] > mx ? z[j] : mx;
        for (j = 0; j < CLASSES; j++) sum += expf(z[j] - mx);
        loss += (double)(logf(sum) + mx - z[target[r]]);
        for (j = 0; j < CLASSES; j++)
            g[r * CLASSES + j] = (expf(z[j] - mx) / sum - (j == target[r] ? 1.0f : 0.0f)) / (float)BATCH;
    }
    for (l = LINEARS - 1; l >= 0; l--) {
        int in = n->in[l], out = n->out[l];
        float* t;
        gemm(n, 1, 0, in, out, BATCH, n->act[l], in, g, out, n->gw[l], out);
        for (j = 0; j < out; j++) n->gb[l][j] = 0.0f;
        for (r = 0; r < BATCH; r++)
            for (j = 0; j < out; j++) n->gb[l][j] += g[r * out + j];
        if (l > 0) {
            gemm(n, 0, 1, BATCH, in, out, g, out, n->w[l], out, g2, in);
            for (r = 0; r < BATCH * in; r++)
                if (n->act[l][r] <= 0.0f) g2[r] = 0.0f;
            t = g, g = g2, g2 = t;
        }
    }
    for (l = 0; l < LINEARS; l++) {
        size_t count = (size_t)n->in[l] * (size_t)n->out[l] + (size_t)n->out[l], i;
        for (i = 0; i < count; i++) n->w[l][i] -= LR * n->gw[l][i];
    }
    return loss / BATCH;
}

static double ref_steps(ref_net* n, int count) {
    double t0 = mpar__now();
    int s;
    for (s = 0; s < count; s++) ref_step(n, x, y);
    return (mpar__now() - t0) / count;
}

/* ---- mpar ---- */
static mpar_pipeline* make(mpar_context* c, mpar_schedule_kind kind, int stages, int M) {
    mpar_stage_desc st[2];
    mpar_pipeline_desc pd;
    mpar_pipeline* p = NULL;
    int L = mpar_model_layer_count(model), j;
    for (j = 0; j < stages; j++) {
        st[j].device = j;
        st[j].first_layer = 2 * BLOCKS * j / stages;
        st[j].last_layer = j == stages - 1 ? L - 1 : 2 * BLOCKS * (j + 1) / stages - 1;
    }
    memset(&pd, 0, sizeof pd);
    pd.stages = st, pd.stage_count = stages, pd.schedule = kind, pd.microbatches = M;
    pd.max_batch = BATCH;
    pd.optimizer.kind = MPAR_OPTIMIZER_SGD;
    pd.optimizer.lr = LR;
    if (mpar_pipeline_create(c, model, &pd, &p) != MPAR_SUCCESS) die(c, "create");
    return p;
}

static double steps(mpar_pipeline* p, int count, double* first_loss) {
    mpar_batch b;
    mpar_step_info info;
    double t0 = mpar__now();
    int s;
    b.inputs = x, b.targets = y, b.samples = BATCH;
    for (s = 0; s < count; s++) {
        if (mpar_pipeline_train_step(p, &b, &info) != MPAR_SUCCESS) die(ctx, "step");
        if (first_loss && s == 0) *first_loss = info.loss;
    }
    return (mpar__now() - t0) / count;
}

static int by_value(const void* a, const void* b) {
    double u = *(const double*)a, v = *(const double*)b;
    return u < v ? -1 : u > v;
}
static double median(double* v, int n) {
    qsort(v, (size_t)n, sizeof(double), by_value);
    return v[n / 2];
}

static void setup(void) {
    mpar_desc d;
    mpar_model_desc md;
    mpar_error err;
    uint64_t s = 3;
    int i;
    memset(&d, 0, sizeof d);
    d.error = &err;
    if (mpar_create(&d, &ctx) != MPAR_SUCCESS) {
        fprintf(stderr, "bench_speed: %s\n", err.message);
        exit(1);
    }
    d.cpu_route = MPAR_CPU_ROUTE_OPENCL;
    if (getenv("MPAR_CPU_ROUTE")) {
        fprintf(stderr, "bench_speed: unset MPAR_CPU_ROUTE: this bench compares the routes itself\n");
        exit(1);
    }
    if (mpar_create(&d, &ctx_cl) != MPAR_SUCCESS) {
        fprintf(stderr, "bench_speed: %s\n", err.message);
        exit(1);
    }
    memset(&md, 0, sizeof md);
    md.input_features = WIDTH, md.seed = 9;
    mpar_model_create(&md, &model, &err);
    for (i = 0; i < BLOCKS; i++) {
        mpar_model_add_linear(model, WIDTH, &err);
        mpar_model_add_simple(model, mpar_layer_relu(), &err);
    }
    mpar_model_add_linear(model, CLASSES, &err);
    mpar_model_add_simple(model, mpar_layer_cross_entropy(), &err);
    x = (float*)malloc(sizeof(float) * BATCH * WIDTH);
    y = (int32_t*)malloc(sizeof(int32_t) * BATCH);
    for (i = 0; i < BATCH * WIDTH; i++) x[i] = (float)(2.0 * mpar__rng_uniform(&s) - 1.0);
    for (i = 0; i < BATCH; i++) y[i] = (int32_t)(mpar__rng_next(&s) % CLASSES);
}

static void launches(mpar_context* c, const char* route) {
    mpar_pipeline* p = make(c, MPAR_SCHEDULE_1F1B, 1, 8);
    mpar_pipeline_stats st;
    steps(p, 1, NULL);
    mpar_pipeline_get_stats(p, &st);
    printf("launches_per_microbatch_%s: %.1f\n", route, (double)st.launches[0] / 8.0);
    printf("opencl_launches_per_microbatch_%s: %.1f\n", route, (double)st.opencl_launches[0] / 8.0);
    mpar_pipeline_destroy(p);
}

int main(void) {
    enum { TWO = 6 };
    const mpar_schedule_kind kinds[TWO] = {MPAR_SCHEDULE_1F1B, MPAR_SCHEDULE_GPIPE, MPAR_SCHEDULE_ZB_H1,
                                           MPAR_SCHEDULE_1F1B, MPAR_SCHEDULE_GPIPE, MPAR_SCHEDULE_ZB_H1};
    const int Ms[TWO] = {4, 4, 4, 8, 8, 8};
    const char* names[TWO] = {"1f1b_m4", "gpipe_m4", "zbh1_m4", "1f1b_m8", "gpipe_m8", "zbh1_m8"};
    ref_net ref;
    mpar_pipeline *one, *one_m8, *one_cl, *two[TWO];
    double t_ref[ROUNDS], r1[ROUNDS], r1m8[ROUNDS], rcl[ROUNDS], r2[TWO][ROUNDS], best = 0.0, loss_mpar = 0.0,
        loss_ref, gemm_flops, gemm_seconds = 0.0, flops, t;
    mpar_device_info info;
    int i, r, best_i = 0, ref_steps_done = 0;

    setup();
    if (mpar_device_count(ctx) < 2) die(ctx, "needs 2 devices (POCL_DEVICES=\"basic basic\")");
    mpar_device_get_info(ctx, 0, &info);
    printf("route_1dev: %s\n", info.host_route ? "host" : "opencl");
    ref_init(&ref);
    loss_ref = ref_step(&ref, x, y);
    one = make(ctx, MPAR_SCHEDULE_SEQUENTIAL, 1, 1);
    steps(one, 1, &loss_mpar);
    printf("first_loss_rel_diff: %.2e\n", fabs(loss_mpar - loss_ref) / loss_ref);
    one_m8 = make(ctx, MPAR_SCHEDULE_1F1B, 1, 8);
    one_cl = make(ctx_cl, MPAR_SCHEDULE_SEQUENTIAL, 1, 1);
    for (i = 0; i < TWO; i++) two[i] = make(ctx, kinds[i], 2, Ms[i]);
    /* warm-up: first runs compile kernels and run one stage at a time */
    steps(one_m8, 2, NULL), steps(one_cl, 2, NULL), ref_steps(&ref, 2);
    for (i = 0; i < TWO; i++) steps(two[i], 2, NULL);
    ref.gemm_seconds = 0.0;
    for (r = 0; r < ROUNDS; r++) {
        t_ref[r] = ref_steps(&ref, STEPS);
        ref_steps_done += STEPS;
        r1[r] = t_ref[r] / steps(one, STEPS, NULL);
        r1m8[r] = t_ref[r] / steps(one_m8, STEPS, NULL);
        rcl[r] = t_ref[r] / steps(one_cl, 2, NULL);
        for (i = 0; i < TWO; i++) r2[i][r] = t_ref[r] / steps(two[i], STEPS, NULL);
    }
    gemm_seconds = ref.gemm_seconds;
    gemm_flops = 0.0; /* per step: forward, weight gradient, input gradient (not for the first layer) */
    for (i = 0; i < LINEARS; i++) gemm_flops += 2.0 * BATCH * ref.in[i] * ref.out[i] * (i > 0 ? 3.0 : 2.0);
    t = median(t_ref, ROUNDS);
    printf("host_ref_samples_per_s: %.0f\n", BATCH / t);
    printf("host_ref_step_ms: %.2f\n", 1e3 * t);
    printf("host_ref_gemm_gflops: %.1f\n", gemm_flops * ref_steps_done / gemm_seconds / 1e9);
    printf("samples_per_s_1dev_over_host_ref: %.3f\n", median(r1, ROUNDS));
    printf("samples_per_s_1dev_m8_over_host_ref: %.3f\n", median(r1m8, ROUNDS));
    printf("samples_per_s_1dev_opencl_over_host_ref: %.3f\n", median(rcl, ROUNDS));
    for (i = 0; i < TWO; i++) {
        double m = median(r2[i], ROUNDS);
        printf("samples_per_s_2dev_%s_over_host_ref: %.3f\n", names[i], m);
        if (m > best) best = m, best_i = i;
    }
    printf("samples_per_s_2dev_over_host_ref: %.3f\n", best);
    printf("best_2dev: %s\n", names[best_i]);
    if (mpar_device_measure_gemm(ctx, 0, BATCH / 8, WIDTH, WIDTH, &flops) != MPAR_SUCCESS) die(ctx, "gemm");
    printf("gemm_gflops_1dev: %.1f\n", flops / 1e9);
    if (mpar_device_measure_gemm(ctx, 0, BATCH, WIDTH, WIDTH, &flops) != MPAR_SUCCESS) die(ctx, "gemm");
    printf("gemm_gflops_1dev_256rows: %.1f\n", flops / 1e9);
    if (mpar_device_measure_gemm(ctx_cl, 0, BATCH / 8, WIDTH, WIDTH, &flops) != MPAR_SUCCESS) die(ctx_cl, "gemm");
    printf("gemm_gflops_1dev_opencl: %.1f\n", flops / 1e9);
    launches(ctx, "host");
    launches(ctx_cl, "opencl");
    for (i = 0; i < TWO; i++) mpar_pipeline_destroy(two[i]);
    mpar_pipeline_destroy(one), mpar_pipeline_destroy(one_m8), mpar_pipeline_destroy(one_cl);
    ref_free(&ref);
    mpar_model_destroy(model);
    free(x), free(y);
    mpar_destroy(ctx_cl);
    mpar_destroy(ctx);
    return 0;
}
