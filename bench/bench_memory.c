/* Memory: how much model fits, and how well the planner predicts what the
   executor allocates. One `name: value` per line, `# ` lines for context:
     capacity_2dev_over_1dev         the largest trainable model (parameters;
                                     AdamW, same batch) on 2 devices over the
                                     largest on 1. The family: an MLP, input
                                     1024, N linears of width 1024 each with a
                                     relu, a linear to 10 classes, cross-entropy.
                                     N is binary-searched for the largest that
                                     mpar_pipeline_plan accepts (use_devices 1,
                                     then 2) within memory_limit_bytes = 768 MiB
                                     per device (the planner keeps its default
                                     64 MiB reserve free); each winner is then
                                     built from its plan and trains one step.
     capacity_fill_1dev              the bytes the largest 1-device pipeline
                                     allocates (mpar_pipeline_get_stats) over
                                     the device memory (768 MiB)
     capacity_16bit_over_fp32        the same search for an activation-heavy
                                     family (width 256, batch 2048, GPipe
                                     with 8 micro-batches, one device: all
                                     activations in flight; one stage, so
                                     neither recomputes) with bf16
                                     activations over fp32: parameters of
                                     the largest model, each trained a step
     bf16_step_over_fp32             what bf16 activations cost in time: the
                                     demo's MLP on 2 devices (1F1B, M = 8),
                                     step time with bf16 over fp32, the
                                     median of 5 alternated rounds
     memory_predicted_over_allocated the plan's bytes per device over the bytes
                                     the pipeline built from it allocates, on 2
                                     devices, for every schedule x recompute x
                                     device-copy links x inference-only, on a
                                     small MLP and a small GPT: the ratio
                                     farthest from 1 (one `# ` line per case)
     infer_bytes_over_params         an inference-only pipeline of a large MLP
                                     (8 linears 2048x2048) with a small batch
                                     on 2 devices: its device bytes over the
                                     parameter bytes (it runs one inference)
   Planning passes device_flops, so the plan calls touch no device. Needs two
   devices: POCL_DEVICES="basic basic". */
#define MPAR_IMPLEMENTATION
#include "mpar.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MIB ((uint64_t)1 << 20)

enum { CAP_CLASSES = 10, CAP_MAX_N = 4096 };
/* The capacity family and how it trains: width, batch, micro-batches,
   schedule, activations (capacity16 changes them). */
static struct {
    int width, batch, M;
    mpar_schedule_kind schedule;
    mpar_activation_type act;
    int whole; /* one stage of every layer (MANUAL): no recomputation chosen where memory binds */
} cap = {1024, 64, 4, MPAR_SCHEDULE_1F1B, MPAR_ACTIVATIONS_FP32, 0};
static const uint64_t CAP_LIMIT = 768 * MIB;

static mpar_context* ctx;
static double flops[2] = {15e9, 15e9};

static void die(const char* what) {
    fprintf(stderr, "bench_memory: %s: %s\n", what, mpar_last_error(ctx));
    exit(1);
}

static void die_model(const char* what, const mpar_error* err) {
    fprintf(stderr, "bench_memory: %s: %s\n", what, err->message);
    exit(1);
}

/* input `in`, then linears widths[0..n-1], a relu after each but the last,
   cross-entropy */
static mpar_model* make_mlp(int in, const int* widths, int n) {
    mpar_model* m = NULL;
    mpar_model_desc md;
    mpar_error err;
    int i;
    memset(&md, 0, sizeof md);
    md.input_features = in, md.seed = 42;
    if (mpar_model_create(&md, &m, &err) != MPAR_SUCCESS) die_model("model", &err);
    for (i = 0; i < n; i++) {
        if (mpar_model_add_linear(m, widths[i], &err) != MPAR_SUCCESS) die_model("linear", &err);
        if (i + 1 < n && mpar_model_add_simple(m, mpar_layer_relu(), &err) != MPAR_SUCCESS) die_model("relu", &err);
    }
    if (mpar_model_add_simple(m, mpar_layer_cross_entropy(), &err) != MPAR_SUCCESS) die_model("loss", &err);
    return m;
}

/* The capacity family: N hidden linears of cap.width, then CAP_CLASSES. */
static mpar_model* make_family(int N) {
    int* w = (int*)malloc(sizeof(int) * (size_t)(N + 1));
    mpar_model* m;
    int i;
    if (!w) {
        fprintf(stderr, "bench_memory: out of host memory\n");
        exit(1);
    }
    for (i = 0; i < N; i++) w[i] = cap.width;
    w[N] = CAP_CLASSES;
    m = make_mlp(cap.width, w, N + 1);
    free(w);
    return m;
}

/* A small character GPT: embedding, decoder blocks, layer norm, head, loss. */
static mpar_model* make_gpt(int seq, int width, int heads, int blocks, int vocab) {
    mpar_model* m = NULL;
    mpar_model_desc md;
    mpar_layer_desc ld;
    mpar_error err;
    int i;
    memset(&md, 0, sizeof md);
    md.input_features = 1, md.seq_len = seq, md.seed = 7;
    if (mpar_model_create(&md, &m, &err) != MPAR_SUCCESS) die_model("gpt", &err);
    memset(&ld, 0, sizeof ld);
    ld.type = mpar_layer_embedding(), ld.units = width, ld.vocab = vocab;
    if (mpar_model_add(m, &ld, &err) != MPAR_SUCCESS) die_model("embedding", &err);
    for (i = 0; i < blocks; i++) {
        memset(&ld, 0, sizeof ld);
        ld.type = mpar_layer_decoder_block(), ld.heads = heads;
        if (mpar_model_add(m, &ld, &err) != MPAR_SUCCESS) die_model("decoder block", &err);
    }
    if (mpar_model_add_simple(m, mpar_layer_layernorm(), &err) != MPAR_SUCCESS) die_model("layernorm", &err);
    if (mpar_model_add_linear(m, vocab, &err) != MPAR_SUCCESS) die_model("head", &err);
    if (mpar_model_add_simple(m, mpar_layer_cross_entropy(), &err) != MPAR_SUCCESS) die_model("loss", &err);
    return m;
}

static void fill_batch(float* x, int32_t* y, int samples, int width, int classes) {
    uint64_t s = 5;
    int i;
    for (i = 0; i < samples * width; i++) x[i] = (float)(2.0 * mpar__rng_uniform(&s) - 1.0);
    for (i = 0; i < samples; i++) y[i] = (int32_t)(mpar__rng_next(&s) % (uint64_t)classes);
}

/* ---- capacity ---- */

static void capacity_desc(mpar_pipeline_desc* pd) {
    memset(pd, 0, sizeof *pd);
    pd->schedule = cap.schedule, pd->microbatches = cap.M, pd->max_batch = cap.batch;
    pd->activation_type = cap.act;
    pd->optimizer.kind = MPAR_OPTIMIZER_ADAMW;
    pd->memory_limit_bytes = CAP_LIMIT;
}

/* 1: the planner accepts N hidden layers on `devices` devices (plan kept in
   *plan when keep), 0: MPAR_ERROR_DOES_NOT_FIT; anything else is fatal. */
static int fits(int N, int devices, mpar_plan* plan, int keep) {
    mpar_model* m = make_family(N);
    mpar_pipeline_desc pd;
    mpar_plan_options o;
    mpar_plan local;
    mpar_stage_desc whole;
    mpar_result r;
    capacity_desc(&pd);
    memset(&o, 0, sizeof o);
    o.device_flops = flops, o.use_devices = devices;
    if (cap.whole) {
        whole.device = 0, whole.first_layer = 0, whole.last_layer = mpar_model_layer_count(m) - 1;
        pd.stages = &whole, pd.stage_count = 1, o.mode = MPAR_PLAN_MANUAL;
    }
    r = mpar_pipeline_plan(ctx, m, &pd, &o, keep ? plan : &local);
    mpar_model_destroy(m);
    if (r == MPAR_ERROR_DOES_NOT_FIT) return 0;
    if (r != MPAR_SUCCESS) die("capacity plan");
    if (!keep) mpar_plan_free(&local);
    return 1;
}

/* Largest N the planner accepts on `devices` devices (0 if not even one). */
static int largest(int devices, int* calls) {
    int lo = 0, hi = 1; /* lo fits (0 by convention), hi is the next probe */
    while (hi <= CAP_MAX_N && (++*calls, fits(hi, devices, NULL, 0))) lo = hi, hi *= 2;
    if (hi > CAP_MAX_N) hi = CAP_MAX_N + 1;
    while (hi - lo > 1) { /* lo fits, hi does not */
        int mid = lo + (hi - lo) / 2;
        ++*calls;
        if (fits(mid, devices, NULL, 0)) lo = mid;
        else hi = mid;
    }
    return lo;
}

/* Builds the largest model for `devices` from its plan and trains one step;
   returns its parameter count and (devices == 1) the bytes it allocated. */
static size_t confirm(int N, int devices, uint64_t* allocated) {
    mpar_model* m = make_family(N);
    mpar_pipeline_desc pd;
    mpar_plan plan;
    mpar_pipeline* p = NULL;
    mpar_pipeline_stats stats;
    mpar_batch b;
    mpar_step_info info;
    float* x = (float*)malloc(sizeof(float) * cap.batch * cap.width);
    int32_t* y = (int32_t*)malloc(sizeof(int32_t) * cap.batch);
    char ranges[256];
    double t0;
    size_t params = mpar_model_param_count(m);
    uint64_t total = 0, predicted = 0;
    int s;
    if (!x || !y) {
        fprintf(stderr, "bench_memory: out of host memory\n");
        exit(1);
    }
    fill_batch(x, y, cap.batch, cap.width, CAP_CLASSES);
    if (!fits(N, devices, &plan, 1)) {
        fprintf(stderr, "bench_memory: N = %d no longer fits %d device(s)\n", N, devices);
        exit(1);
    }
    mpar_plan_to_string(&plan, ranges, sizeof ranges);
    for (s = 0; s < plan.num_devices; s++) predicted += plan.device_memory_bytes[s];
    capacity_desc(&pd);
    pd.plan = &plan;
    t0 = mpar__now();
    if (mpar_pipeline_create(ctx, m, &pd, &p) != MPAR_SUCCESS) die("capacity create");
    if (mpar_pipeline_get_stats(p, &stats) != MPAR_SUCCESS) die("capacity stats");
    for (s = 0; s < stats.stages; s++) total += stats.device_bytes[s];
    b.inputs = x, b.targets = y, b.samples = cap.batch;
    if (mpar_pipeline_train_step(p, &b, &info) != MPAR_SUCCESS) die("capacity train step");
    if (!(info.loss > 0.0 && info.loss < 50.0)) {
        fprintf(stderr, "bench_memory: %d device(s), N = %d: loss %g\n", devices, N, info.loss);
        exit(1);
    }
    printf("# capacity %d dev%s: N = %d hidden layers, %zu parameters (%.1f MiB); plan %s; predicted %.1f MiB, "
           "allocated %.1f MiB", devices, cap.act == MPAR_ACTIVATIONS_BF16 ? " bf16" : "", N, params, (double)params * 4.0 / (double)MIB, ranges,
           (double)predicted / (double)MIB, (double)total / (double)MIB);
    for (s = 0; s < stats.stages; s++) printf(" [dev %d: %.1f]", plan.stages[s].device,
                                               (double)stats.device_bytes[s] / (double)MIB);
    printf("; one step: loss %.3f, %.2f s with create\n", info.loss, mpar__now() - t0);
    if (allocated) *allocated = stats.device_bytes[0];
    mpar_pipeline_destroy(p);
    mpar_plan_free(&plan);
    mpar_model_destroy(m);
    free(x);
    free(y);
    return params;
}

static void capacity(void) {
    int calls = 0, n1, n2;
    double t0 = mpar__now();
    size_t p1, p2;
    uint64_t bytes1 = 0;
    n1 = largest(1, &calls);
    n2 = largest(2, &calls);
    printf("# capacity search: %d plan calls, %.2f s; 1 dev N = %d, 2 dev N = %d (%d + 1 linears of width %d, "
           "AdamW, batch %d, 1F1B M = %d, %llu MiB per device, 64 MiB reserve)\n", calls, mpar__now() - t0, n1, n2,
           cap.width, cap.width, cap.batch, cap.M, (unsigned long long)(CAP_LIMIT / MIB));
    if (n1 < 1 || n2 < 1 || n2 >= CAP_MAX_N) {
        fprintf(stderr, "bench_memory: capacity search out of range (N = %d, %d)\n", n1, n2);
        exit(1);
    }
    p1 = confirm(n1, 1, &bytes1);
    p2 = confirm(n2, 2, NULL);
    printf("capacity_2dev_over_1dev: %.4f\n", (double)p2 / (double)p1);
    printf("capacity_fill_1dev: %.4f\n", (double)bytes1 / (double)CAP_LIMIT);
    fflush(stdout);
}

/* ---- 16-bit activations ---- */

/* An activation-heavy family (width 256, batch 2048 in 8 micro-batches
   under GPipe, one device: every micro-batch's activations are held at
   once), one stage of all layers with fp32 and with bf16 activations
   (MANUAL, so that neither falls back to recomputation, which would hide
   what 16 bits buy); each largest model trains one step. */
static void capacity16(void) {
    int calls = 0, n32, n16;
    size_t p32, p16;
    uint64_t b32 = 0, b16 = 0;
    cap.width = 256, cap.batch = 2048, cap.M = 8, cap.schedule = MPAR_SCHEDULE_GPIPE, cap.whole = 1;
    cap.act = MPAR_ACTIVATIONS_FP32;
    n32 = largest(1, &calls);
    cap.act = MPAR_ACTIVATIONS_BF16;
    n16 = largest(1, &calls);
    printf("# capacity 16-bit: 1 dev, %d + 1 linears of width %d, AdamW, batch %d, GPipe M = %d: N = %d (fp32), "
           "N = %d (bf16)\n", cap.width, cap.width, cap.batch, cap.M, n32, n16);
    if (n32 < 1 || n16 < 1 || n16 >= CAP_MAX_N) {
        fprintf(stderr, "bench_memory: 16-bit capacity search out of range (N = %d, %d)\n", n32, n16);
        exit(1);
    }
    cap.act = MPAR_ACTIVATIONS_FP32;
    p32 = confirm(n32, 1, &b32);
    cap.act = MPAR_ACTIVATIONS_BF16;
    p16 = confirm(n16, 1, &b16);
    printf("capacity_16bit_over_fp32: %.4f\n", (double)p16 / (double)p32);
    fflush(stdout);
    cap.width = 1024, cap.batch = 64, cap.M = 4, cap.schedule = MPAR_SCHEDULE_1F1B, cap.act = MPAR_ACTIVATIONS_FP32;
    cap.whole = 0;
}

/* ---- predicted vs allocated ---- */

typedef struct mem_case {
    mpar_schedule_kind kind;
    int V, recompute, device_copy, infer;
} mem_case;

/* Plans on 2 devices (fixed order), builds from the plan and returns the
   ratio farthest from 1 over the device stages. */
static double compare_case(const mem_case* c, int gpt) {
    static const int W[] = {512, 512, 512, 10};
    mpar_model* m = gpt ? make_gpt(32, 64, 4, 4, 65) : make_mlp(512, W, 4);
    mpar_pipeline_desc pd;
    mpar_plan_options o;
    mpar_plan plan;
    mpar_pipeline* p = NULL;
    mpar_pipeline_stats stats;
    char line[512], ranges[128];
    double worst = 1.0;
    int s, n = 0;
    memset(&pd, 0, sizeof pd);
    pd.schedule = c->kind, pd.microbatches = 8, pd.virtual_stages = c->V, pd.recompute = c->recompute;
    pd.inference_only = c->infer;
    if (c->device_copy) pd.link_mode = MPAR_LINK_DEVICE_COPY, pd.link_capacity = 3;
    pd.max_batch = gpt ? 32 : 256; /* 128 and 32 rows per micro-batch */
    pd.optimizer.kind = MPAR_OPTIMIZER_ADAMW;
    memset(&o, 0, sizeof o);
    o.device_flops = flops, o.use_devices = 2, o.order = MPAR_PLAN_ORDER_FIXED;
    n = snprintf(line, sizeof line, "# %-18s %-4s%s%s%s:", mpar_schedule_kind_name(c->kind), gpt ? "gpt" : "mlp",
                 c->recompute ? " recompute" : "", c->device_copy ? " device-copy" : "", c->infer ? " inference" : "");
    if (mpar_pipeline_plan(ctx, m, &pd, &o, &plan) != MPAR_SUCCESS) die(line + 2);
    mpar_plan_to_string(&plan, ranges, sizeof ranges);
    pd.plan = &plan;
    if (mpar_pipeline_create(ctx, m, &pd, &p) != MPAR_SUCCESS) die(line + 2);
    if (mpar_pipeline_get_stats(p, &stats) != MPAR_SUCCESS) die("stats");
    for (s = 0; s < stats.stages && s < plan.num_stages; s++) {
        int d = plan.stages[s].device;
        double ratio = stats.device_bytes[s] ? (double)plan.device_memory_bytes[d] / (double)stats.device_bytes[s]
                                             : (plan.device_memory_bytes[d] ? INFINITY : 1.0);
        if (fabs(ratio - 1.0) > fabs(worst - 1.0)) worst = ratio;
        if (n > 0 && (size_t)n < sizeof line)
            n += snprintf(line + n, sizeof line - (size_t)n, " dev %d predicted %llu allocated %llu (%.4f);", d,
                          (unsigned long long)plan.device_memory_bytes[d], (unsigned long long)stats.device_bytes[s],
                          ratio);
    }
    printf("%s plan %s\n", line, ranges);
    mpar_pipeline_destroy(p);
    mpar_plan_free(&plan);
    mpar_model_destroy(m);
    return worst;
}

static void predicted(void) {
    static const struct { mpar_schedule_kind kind; int V; } kinds[] = {
        {MPAR_SCHEDULE_SEQUENTIAL, 1}, {MPAR_SCHEDULE_GPIPE, 1}, {MPAR_SCHEDULE_1F1B, 1},
        {MPAR_SCHEDULE_INTERLEAVED_1F1B, 2}, {MPAR_SCHEDULE_ZB_H1, 1}, {MPAR_SCHEDULE_ZB_H2, 1},
        {MPAR_SCHEDULE_ZB_V, 2}};
    double worst = 1.0, t0 = mpar__now();
    int k, opt, gpt, cases = 0;
    for (k = 0; k < (int)(sizeof kinds / sizeof kinds[0]); k++)
        for (opt = 0; opt < 8; opt++)
            for (gpt = 0; gpt < 2; gpt++) {
                mem_case c;
                double r;
                c.kind = kinds[k].kind, c.V = kinds[k].V;
                c.recompute = opt & 1, c.device_copy = (opt >> 1) & 1, c.infer = (opt >> 2) & 1;
                r = compare_case(&c, gpt);
                if (fabs(r - 1.0) > fabs(worst - 1.0)) worst = r;
                cases++;
            }
    printf("# %d cases in %.2f s\n", cases, mpar__now() - t0);
    printf("memory_predicted_over_allocated: %.4f\n", worst);
    fflush(stdout);
}

/* ---- what bf16 costs in time ---- */

static int cmp_double(const void* a, const void* b) {
    double x = *(const double*)a, y = *(const double*)b;
    return x < y ? -1 : x > y;
}

/* The demo's MLP (784-512-512-512-10, batch 128, 1F1B, M = 8) on 2 devices
   with fp32 and with bf16 activations, 10 steps each, alternated for 5
   rounds: the median of the rounds' step-time ratios. */
static void bf16_time(void) {
    static const int W[] = {512, 512, 512, 10};
    enum { BATCH = 128, IN = 784, ROUNDS = 5, STEPS = 10 };
    mpar_model* m = make_mlp(IN, W, 4);
    mpar_pipeline* p[2] = {NULL, NULL};
    float* x = (float*)malloc(sizeof(float) * BATCH * IN);
    int32_t y[BATCH];
    double ratio[ROUNDS], t[2] = {0, 0};
    int k, r, s;
    if (!x) {
        fprintf(stderr, "bench_memory: out of host memory\n");
        exit(1);
    }
    fill_batch(x, y, BATCH, IN, 10);
    for (k = 0; k < 2; k++) {
        mpar_pipeline_desc pd;
        memset(&pd, 0, sizeof pd);
        pd.schedule = MPAR_SCHEDULE_1F1B, pd.microbatches = 8, pd.max_batch = BATCH;
        pd.optimizer.kind = MPAR_OPTIMIZER_ADAMW;
        pd.activation_type = k ? MPAR_ACTIVATIONS_BF16 : MPAR_ACTIVATIONS_FP32;
        if (mpar_pipeline_create(ctx, m, &pd, &p[k]) != MPAR_SUCCESS) die("bf16 time create");
    }
    for (r = -1; r < ROUNDS; r++) /* round -1 warms both up */
        for (k = 0; k < 2; k++) {
            mpar_batch b;
            mpar_step_info info;
            double t0 = mpar__now();
            b.inputs = x, b.targets = y, b.samples = BATCH;
            for (s = 0; s < STEPS; s++)
                if (mpar_pipeline_train_step(p[k], &b, &info) != MPAR_SUCCESS) die("bf16 time step");
            t[k] = (mpar__now() - t0) / STEPS;
            if (r >= 0 && k == 1) ratio[r] = t[1] / t[0];
        }
    qsort(ratio, ROUNDS, sizeof ratio[0], cmp_double);
    printf("# bf16 time: 784-512-512-512-10 MLP, batch 128, 1F1B M = 8 on 2 devices; last round %.2f ms (fp32), "
           "%.2f ms (bf16) per step\n", t[0] * 1e3, t[1] * 1e3);
    printf("bf16_step_over_fp32: %.4f\n", ratio[ROUNDS / 2]);
    fflush(stdout);
    for (k = 0; k < 2; k++) mpar_pipeline_destroy(p[k]);
    mpar_model_destroy(m);
    free(x);
}

/* ---- inference memory ---- */

static void inference(void) {
    static const int W[] = {2048, 2048, 2048, 2048, 2048, 2048, 2048, 2048, 10};
    mpar_model* m = make_mlp(2048, W, 9);
    mpar_pipeline_desc pd;
    mpar_plan_options o;
    mpar_plan plan;
    mpar_pipeline* p = NULL;
    mpar_pipeline_stats stats;
    mpar_batch b;
    float x[4 * 2048], out[4 * 10];
    int32_t y[4];
    double loss = 0.0, param_bytes = 4.0 * (double)mpar_model_param_count(m);
    uint64_t total = 0;
    char ranges[128];
    int s;
    fill_batch(x, y, 4, 2048, 10);
    memset(&pd, 0, sizeof pd);
    pd.schedule = MPAR_SCHEDULE_1F1B, pd.microbatches = 2, pd.max_batch = 4, pd.inference_only = 1;
    memset(&o, 0, sizeof o);
    o.device_flops = flops, o.use_devices = 2;
    if (mpar_pipeline_plan(ctx, m, &pd, &o, &plan) != MPAR_SUCCESS) die("inference plan");
    mpar_plan_to_string(&plan, ranges, sizeof ranges);
    pd.plan = &plan;
    if (mpar_pipeline_create(ctx, m, &pd, &p) != MPAR_SUCCESS) die("inference create");
    if (mpar_pipeline_get_stats(p, &stats) != MPAR_SUCCESS) die("inference stats");
    for (s = 0; s < stats.stages; s++) total += stats.device_bytes[s];
    b.inputs = x, b.targets = y, b.samples = 4;
    if (mpar_pipeline_infer(p, &b, out, &loss) != MPAR_SUCCESS) die("infer");
    if (!(loss > 0.0 && loss < 50.0)) {
        fprintf(stderr, "bench_memory: inference loss %g\n", loss);
        exit(1);
    }
    printf("# inference: 8 x 2048x2048 + head, %zu parameters (%.2f MiB), max_batch 4, M = 2, plan %s: %.2f MiB on "
           "%d device stages; infer loss %.3f\n", mpar_model_param_count(m), param_bytes / (double)MIB, ranges,
           (double)total / (double)MIB, stats.stages, loss);
    printf("infer_bytes_over_params: %.4f\n", (double)total / param_bytes);
    fflush(stdout);
    mpar_pipeline_destroy(p);
    mpar_plan_free(&plan);
    mpar_model_destroy(m);
}

int main(void) {
    mpar_desc d;
    mpar_error err;
    memset(&d, 0, sizeof d);
    d.error = &err;
    if (mpar_create(&d, &ctx) != MPAR_SUCCESS) {
        fprintf(stderr, "bench_memory: %s\n", err.message);
        return 1;
    }
    if (mpar_device_count(ctx) < 2) {
        fprintf(stderr, "bench_memory: needs two devices (POCL_DEVICES=\"basic basic\")\n");
        mpar_destroy(ctx);
        return 1;
    }
    capacity();
    capacity16();
    bf16_time();
    predicted();
    inference();
    mpar_destroy(ctx);
    return 0;
}
