/* What live re-balancing buys, one `name: value` per line:
     rebalance_gain      step time on a bad starting split (1:7 of 8 equal
                         linear layers on two devices) / step time of a
                         pipeline that started on the same split with
                         desc.rebalance = AUTO and moved by itself
     rebalances          moves that pipeline made (mpar_pipeline_stats)
     rebalance_checks    re-plans it made, moved or not
   Both pipelines live side by side; their steps are timed alternately,
   several rounds, and the median ratio is printed, since timings on this
   kind of machine drift. A third pipeline, every layer on one device, is
   timed in the same rounds (a `#` line): a balanced split can gain only
   what two devices gain over one, so on a machine whose cores are busy
   with other work the gain shrinks towards 1. Needs two devices that run
   in parallel: POCL_DEVICES="basic basic". */
#define MPAR_IMPLEMENTATION
#include "mpar.h"

enum { WIDTH = 512, LINEARS = 8, BATCH = 128, M = 4, WARM = 12, ROUNDS = 7, STEPS = 3 };

static mpar_context* ctx;

static void die(const char* what) {
    fprintf(stderr, "bench_rebalance: %s: %s\n", what, mpar_last_error(ctx));
    exit(1);
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static double steps(mpar_pipeline* p, const mpar_batch* b, int n) {
    double t0 = now();
    int i;
    for (i = 0; i < n; i++)
        if (mpar_pipeline_train_step(p, b, NULL) != MPAR_SUCCESS) die("train step");
    return (now() - t0) / n;
}

static int by_value(const void* a, const void* b) {
    double x = *(const double*)a, y = *(const double*)b;
    return x < y ? -1 : x > y;
}

int main(void) {
    mpar_desc d;
    mpar_model_desc md;
    mpar_model* model = NULL;
    mpar_stage_desc st[2];
    mpar_pipeline_desc pd;
    mpar_pipeline *bad = NULL, *moving = NULL, *one = NULL;
    mpar_pipeline_stats stats;
    mpar_plan plan;
    mpar_batch b;
    mpar_error err;
    double ratio[ROUNDS], t_bad = 0, t_moved = 0, t_one = 0;
    float* x;
    int32_t* y;
    uint64_t s = 3;
    int i, r;
    char text[128];
    memset(&d, 0, sizeof d);
    d.error = &err;
    if (mpar_create(&d, &ctx) != MPAR_SUCCESS) {
        fprintf(stderr, "bench_rebalance: %s\n", err.message);
        return 1;
    }
    if (mpar_device_count(ctx) < 2) {
        fprintf(stderr, "bench_rebalance: needs two devices (POCL_DEVICES=\"basic basic\")\n");
        return 1;
    }
    memset(&md, 0, sizeof md);
    md.input_features = WIDTH, md.seed = 5;
    if (mpar_model_create(&md, &model, &err) != MPAR_SUCCESS) die("model");
    for (i = 0; i < LINEARS; i++) mpar_model_add_linear(model, WIDTH, &err);
    if (mpar_model_add_simple(model, mpar_layer_cross_entropy(), &err) != MPAR_SUCCESS) die("model");
    x = (float*)malloc(sizeof(float) * BATCH * WIDTH);
    y = (int32_t*)malloc(sizeof(int32_t) * BATCH);
    if (!x || !y) die("host memory");
    for (i = 0; i < BATCH * WIDTH; i++) x[i] = (float)(2.0 * mpar__rng_uniform(&s) - 1.0);
    for (i = 0; i < BATCH; i++) y[i] = (int32_t)(mpar__rng_next(&s) % WIDTH);
    b.inputs = x, b.targets = y, b.samples = BATCH;

    st[0].device = 0, st[0].first_layer = 0, st[0].last_layer = 0;
    st[1].device = 1, st[1].first_layer = 1, st[1].last_layer = LINEARS;
    memset(&pd, 0, sizeof pd);
    pd.stages = st, pd.stage_count = 2, pd.schedule = MPAR_SCHEDULE_1F1B, pd.microbatches = M;
    pd.max_batch = BATCH;
    pd.optimizer.kind = MPAR_OPTIMIZER_SGD, pd.optimizer.lr = 1e-3f;
    if (mpar_pipeline_create(ctx, model, &pd, &bad) != MPAR_SUCCESS) die("create (1:7)");
    st[0].last_layer = LINEARS, pd.stage_count = 1;
    if (mpar_pipeline_create(ctx, model, &pd, &one) != MPAR_SUCCESS) die("create (one device)");
    st[0].last_layer = 0, pd.stage_count = 2;
    pd.rebalance = MPAR_REBALANCE_AUTO; /* warm-up [3], threshold [0.05] */
    if (mpar_pipeline_create(ctx, model, &pd, &moving) != MPAR_SUCCESS) die("create (re-balancing)");
    steps(bad, &b, 2), steps(one, &b, 2);
    steps(moving, &b, WARM); /* measures, re-plans, moves */
    if (mpar_pipeline_get_plan(moving, &plan) != MPAR_SUCCESS) die("get_plan");
    mpar_plan_to_string(&plan, text, sizeof text);
    printf("# %d linear layers of %d, batch %d, M = %d, 1F1B on 2 devices; started on 0:0-0,1:1-%d\n", LINEARS,
           WIDTH, BATCH, M, LINEARS);
    printf("# after %d steps with rebalance = AUTO: %s (predicted step %.4g s)\n", WARM, text, plan.step_seconds);
    mpar_plan_free(&plan);
    for (r = 0; r < ROUNDS; r++) {
        double a = steps(bad, &b, STEPS), c = steps(moving, &b, STEPS);
        ratio[r] = a / c, t_bad += a, t_moved += c;
        t_one += steps(one, &b, STEPS);
    }
    qsort(ratio, ROUNDS, sizeof ratio[0], by_value);
    printf("# mean step: %.2f ms on 1:7, %.2f ms re-balanced, %.2f ms on one device\n", 1e3 * t_bad / ROUNDS,
           1e3 * t_moved / ROUNDS, 1e3 * t_one / ROUNDS);
    printf("# two devices over one, re-balanced: %.3f (what the cores free of other work allow)\n", t_one / t_moved);
    if (mpar_pipeline_get_stats(moving, &stats) != MPAR_SUCCESS) die("stats");
    printf("rebalance_gain: %.3f\n", ratio[ROUNDS / 2]);
    printf("rebalances: %d\n", stats.rebalances);
    printf("rebalance_checks: %d\n", stats.rebalance_checks);
    mpar_pipeline_destroy(moving);
    mpar_pipeline_destroy(one);
    mpar_pipeline_destroy(bad);
    mpar_model_destroy(model);
    mpar_destroy(ctx);
    free(x), free(y);
    return 0;
}
