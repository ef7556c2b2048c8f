/* Pipeline speed on 2 devices vs 1, per schedule, and measured vs
   simulated 1F1B step time. Prints `name: value` lines:
     speedup_<schedule>_2dev   1-device step time / 2-device step time (M = 8)
     measured_over_predicted_1f1b
   A balanced model (equal layers) so that the split is even. Needs two
   devices that run in parallel: POCL_DEVICES="basic basic" (the default). */
#define MPAR_IMPLEMENTATION
#include "mpar.h"

#include <time.h>

enum { WIDTH = 384, BLOCKS = 6, BATCH = 256, M = 8, STEPS = 6 };

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static mpar_context* ctx;
static mpar_model* model;
static float* x;
static int32_t* y;

static mpar_pipeline* make(mpar_schedule_kind kind, int stages, int V) {
    mpar_stage_desc st[16];
    mpar_pipeline_desc pd;
    mpar_pipeline* p = NULL;
    int L = mpar_model_layer_count(model), n = stages * V, j;
    /* even split of the blocks; the small head and loss go with the last */
    for (j = 0; j < n; j++) {
        st[j].device = j % stages;
        st[j].first_layer = 2 * BLOCKS * j / n;
        st[j].last_layer = j == n - 1 ? L - 1 : 2 * BLOCKS * (j + 1) / n - 1;
    }
    memset(&pd, 0, sizeof pd);
    pd.stages = st, pd.stage_count = n, pd.schedule = kind, pd.microbatches = M, pd.virtual_stages = V;
    pd.max_batch = BATCH;
    pd.optimizer.kind = MPAR_OPTIMIZER_SGD;
    pd.optimizer.lr = 1e-3f;
    if (mpar_pipeline_create(ctx, model, &pd, &p) != MPAR_SUCCESS) {
        fprintf(stderr, "bench: %s\n", mpar_last_error(ctx));
        exit(1);
    }
    return p;
}

/* Median seconds per step over STEPS steps after a warm-up step. */
static double step_time(mpar_pipeline* p) {
    double t[STEPS], tmp;
    mpar_batch b;
    mpar_step_info info;
    int s, i, j;
    b.inputs = x, b.targets = y, b.samples = BATCH;
    for (s = -1; s < STEPS; s++) {
        double t0 = now();
        if (mpar_pipeline_train_step(p, &b, &info) != MPAR_SUCCESS) {
            fprintf(stderr, "bench: %s\n", mpar_last_error(ctx));
            exit(1);
        }
        if (s >= 0) t[s] = now() - t0;
    }
    for (i = 0; i < STEPS; i++)
        for (j = i + 1; j < STEPS; j++)
            if (t[j] < t[i]) tmp = t[i], t[i] = t[j], t[j] = tmp;
    return 0.5 * (t[STEPS / 2] + t[(STEPS - 1) / 2]);
}

static double infer_time(mpar_pipeline* p) {
    mpar_batch b;
    double best = 1e9;
    int s;
    b.inputs = x, b.targets = y, b.samples = BATCH;
    for (s = 0; s < 4; s++) {
        double t0 = now(), t;
        mpar_pipeline_infer(p, &b, NULL, NULL);
        t = now() - t0;
        if (t < best) best = t;
    }
    return best;
}

int main(void) {
    mpar_desc d;
    mpar_model_desc md;
    mpar_error err;
    uint64_t s = 3;
    int i;
    const mpar_schedule_kind kinds[4] = {MPAR_SCHEDULE_GPIPE, MPAR_SCHEDULE_1F1B, MPAR_SCHEDULE_INTERLEAVED_1F1B,
                                         MPAR_SCHEDULE_ZB_H1};
    const char* names[4] = {"gpipe", "1f1b", "interleaved", "zbh1"};
    double t1, t2[4];
    memset(&d, 0, sizeof d);
    d.error = &err;
    d.context_per_device = getenv("BENCH_CONTEXT_PER_DEVICE") != NULL;
    if (mpar_create(&d, &ctx) != MPAR_SUCCESS || mpar_device_count(ctx) < 2) {
        fprintf(stderr, "bench: needs 2 devices (%s)\n", err.message);
        return 1;
    }
    memset(&md, 0, sizeof md);
    md.input_features = WIDTH, md.seed = 9;
    mpar_model_create(&md, &model, &err);
    for (i = 0; i < BLOCKS; i++) {
        mpar_model_add_linear(model, WIDTH, &err);
        mpar_model_add_simple(model, mpar_layer_relu(), &err);
    }
    mpar_model_add_linear(model, 10, &err);
    mpar_model_add_simple(model, mpar_layer_cross_entropy(), &err);
    x = (float*)malloc(sizeof(float) * BATCH * WIDTH);
    y = (int32_t*)malloc(sizeof(int32_t) * BATCH);
    for (i = 0; i < BATCH * WIDTH; i++) x[i] = (float)(2.0 * mpar__rng_uniform(&s) - 1.0);
    for (i = 0; i < BATCH; i++) y[i] = (int32_t)(mpar__rng_next(&s) % 10);

    {
        mpar_pipeline* one = make(MPAR_SCHEDULE_1F1B, 1, 1);
        double f_all, b_all;
        mpar_schedule* sch;
        mpar_simulation* sim;
        mpar_sim_desc sd;
        t1 = step_time(one);
        /* action costs measured on one device: forward-only streaming gives F,
           the rest of a training step is B (optimizer step folded in) */
        f_all = infer_time(one) / M;
        b_all = t1 / M - f_all;
        mpar_pipeline_destroy(one);
        for (i = 0; i < 4; i++) {
            mpar_pipeline* p = make(kinds[i], 2, kinds[i] == MPAR_SCHEDULE_INTERLEAVED_1F1B ? 2 : 1);
            t2[i] = step_time(p);
            mpar_pipeline_destroy(p);
            printf("speedup_%s_2dev: %.3f\n", names[i], t1 / t2[i]);
        }
        memset(&sd, 0, sizeof sd);
        sd.forward = f_all / 2, sd.backward = b_all / 2;
        mpar_schedule_create(MPAR_SCHEDULE_1F1B, 2, M, 1, &sch, &err);
        mpar_simulate(sch, &sd, &sim, &err);
        printf("step_ms_1dev: %.2f\n", 1e3 * t1);
        printf("step_ms_1f1b_2dev: %.2f\n", 1e3 * t2[1]);
        printf("predicted_ms_1f1b_2dev: %.2f\n", 1e3 * sim->step_time);
        printf("measured_over_predicted_1f1b: %.3f\n", t2[1] / sim->step_time);
        mpar_simulation_destroy(sim);
        mpar_schedule_destroy(sch);
    }
    mpar_model_destroy(model);
    free(x), free(y);
    mpar_destroy(ctx);
    return 0;
}
