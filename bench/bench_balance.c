/* Balance without asking, one `name: value` per line:
     demo_balance_ratio           the demo's model and settings (784-512-512-
                                  512-512-10 MLP, batch 128, 1F1B, M = 8,
                                  AdamW) on the plan a pipeline makes for
                                  itself: least stage busy time / most, summed
                                  over STEPS profiled steps; the median of 3
                                  pipelines (target >= 0.9)
     demo_speedup_2dev            the same: 1-device step / 2-device step,
                                  unprofiled, alternated, median of ROUNDS
     hetero_plan_over_best_split  device 1 slowed to half speed
                                  (mpar_desc.slow_devices "1:2"): the step of
                                  the plan mpar makes for itself over the best
                                  step of every split measured exhaustively
                                  (each cut, both device orders, each device
                                  alone): all screened ROUNDS times in turn
                                  (least step kept), then the planner's and
                                  the 3 best measured FINAL times in turn,
                                  medians compared (target <= 1.05)
   The plans come from measured layer costs (the profile cache under
   MPAR_CACHE_DIR; measured on the first run). Needs two devices that run in
   parallel: POCL_DEVICES="basic basic". */
#define MPAR_IMPLEMENTATION
#include "mpar.h"

enum { BATCH = 128, M = 8, IN = 784, ROUNDS = 5, STEPS = 8, FINAL = 9 };

static mpar_context* ctx;
static float x[BATCH * IN];
static int32_t y[BATCH];

static void die(const char* what) {
    fprintf(stderr, "bench_balance: %s: %s\n", what, ctx ? mpar_last_error(ctx) : "");
    exit(1);
}

static mpar_model* demo_model(void) {
    mpar_model_desc md;
    mpar_model* m = NULL;
    mpar_error err;
    int i, r = 0;
    memset(&md, 0, sizeof md);
    md.input_features = IN;
    md.seed = 2026;
    r |= mpar_model_create(&md, &m, &err);
    for (i = 0; i < 4; i++) {
        r |= mpar_model_add_linear(m, 512, &err);
        r |= mpar_model_add_simple(m, mpar_layer_relu(), &err);
    }
    r |= mpar_model_add_linear(m, 10, &err);
    r |= mpar_model_add_simple(m, mpar_layer_cross_entropy(), &err);
    if (r) die(err.message);
    return m;
}

static void desc_of(mpar_pipeline_desc* pd, int profile) {
    memset(pd, 0, sizeof *pd);
    pd->schedule = MPAR_SCHEDULE_1F1B;
    pd->microbatches = M;
    pd->max_batch = BATCH;
    pd->optimizer.kind = MPAR_OPTIMIZER_ADAMW;
    pd->optimizer.lr = 1e-3f;
    pd->profile = profile;
}

static mpar_pipeline* make(mpar_model* m, const mpar_stage_desc* st, int n, int profile) {
    mpar_pipeline_desc pd;
    mpar_pipeline* p = NULL;
    desc_of(&pd, profile);
    pd.stages = st, pd.stage_count = n;
    if (mpar_pipeline_create(ctx, m, &pd, &p) != MPAR_SUCCESS) die("create");
    return p;
}

static double steps(mpar_pipeline* p, int n) {
    mpar_batch b;
    double t0 = mpar__now();
    int s;
    b.inputs = x, b.targets = y, b.samples = BATCH;
    for (s = 0; s < n; s++)
        if (mpar_pipeline_train_step(p, &b, NULL) != MPAR_SUCCESS) die("step");
    return (mpar__now() - t0) / n;
}

static int cmp(const void* a, const void* b) {
    double u = *(const double*)a, v = *(const double*)b;
    return u < v ? -1 : u > v;
}

static mpar_context* open_ctx(const char* slow) {
    mpar_desc d;
    mpar_error err;
    mpar_context* c = NULL;
    memset(&d, 0, sizeof d);
    d.error = &err;
    d.slow_devices = slow;
    if (mpar_create(&d, &c) != MPAR_SUCCESS) {
        fprintf(stderr, "bench_balance: %s\n", err.message);
        exit(1);
    }
    if (mpar_device_count(c) < 2) {
        fprintf(stderr, "bench_balance: needs two devices (POCL_DEVICES=\"basic basic\")\n");
        exit(1);
    }
    return c;
}

/* The plan a pipeline without stages makes: mpar_pipeline_plan with the
   desc's defaults, as mpar_pipeline_create calls it. */
static void default_plan(mpar_model* m, mpar_stage_desc* st, int* n) {
    mpar_pipeline_desc pd;
    mpar_plan plan;
    int j;
    desc_of(&pd, 0);
    if (mpar_pipeline_plan(ctx, m, &pd, NULL, &plan) != MPAR_SUCCESS) die("plan");
    *n = plan.num_stages;
    printf("# plan:");
    for (j = 0; j < plan.num_stages; j++) {
        st[j].device = plan.stages[j].device;
        st[j].first_layer = plan.stages[j].first_layer;
        st[j].last_layer = plan.stages[j].last_layer;
        printf(" device %d layers %d-%d;", st[j].device, st[j].first_layer, st[j].last_layer);
    }
    printf("\n");
    mpar_plan_free(&plan);
}

static void demo_figures(void) {
    mpar_model* m = demo_model();
    mpar_stage_desc st[8], one = {0, 0, 0};
    mpar_pipeline *p, *q, *single;
    double busy[8] = {0}, lo, hi, ratio[ROUNDS];
    int n, s, j, r;
    default_plan(m, st, &n);
    one.last_layer = mpar_model_layer_count(m) - 1;
    /* busy fractions: profiled steps on the plan the pipeline makes itself,
       in 3 pipelines one after the other (threads land on cores anew), the
       median of their ratios */
    {
        double ratios[3];
        int round;
        for (round = 0; round < 3; round++) {
            memset(busy, 0, sizeof busy);
            p = make(m, NULL, 0, 1); /* no stages: it plans itself */
            steps(p, 3);
            for (s = 0; s < STEPS; s++) {
                mpar_timeline t;
                mpar_timeline_stats ts;
                steps(p, 1);
                if (mpar_pipeline_get_timeline(p, &t) != MPAR_SUCCESS) die("timeline");
                if (mpar_timeline_get_stats(&t, &ts, NULL) != MPAR_SUCCESS) die("stats");
                for (j = 0; j < ts.stages && j < 8; j++) busy[j] += ts.stage[j].busy / ts.step_time;
                mpar_timeline_free(&t);
            }
            lo = hi = busy[0];
            for (j = 1; j < n; j++) lo = busy[j] < lo ? busy[j] : lo, hi = busy[j] > hi ? busy[j] : hi;
            printf("# busy per stage:");
            for (j = 0; j < n; j++) printf(" %.3f", busy[j] / STEPS);
            printf("\n");
            ratios[round] = lo / hi;
            mpar_pipeline_destroy(p);
        }
        qsort(ratios, 3, sizeof ratios[0], cmp);
        printf("demo_balance_ratio: %.4f\n", ratios[1]);
    }
    /* speed-up, unprofiled, alternated */
    q = make(m, st, n, 0);
    single = make(m, &one, 1, 0);
    steps(q, 3), steps(single, 3);
    for (r = 0; r < ROUNDS; r++) {
        double t1 = steps(single, STEPS), t2 = steps(q, STEPS);
        ratio[r] = t1 / t2;
    }
    qsort(ratio, ROUNDS, sizeof ratio[0], cmp);
    printf("demo_speedup_2dev: %.4f\n", ratio[ROUNDS / 2]);
    mpar_pipeline_destroy(q);
    mpar_pipeline_destroy(single);
    mpar_model_destroy(m);
}

static void hetero_figure(void) {
    mpar_model* m = demo_model();
    int L = mpar_model_layer_count(m), n_plan, c, k, r, count = 0, mine = -1, best = 0;
    mpar_stage_desc plan[8], cfg[64][2];
    int cfg_n[64];
    mpar_pipeline* pipes[64];
    double t[64];
    default_plan(m, plan, &n_plan);
    for (k = 0; k < 2; k++) { /* each device alone */
        cfg[count][0].device = k, cfg[count][0].first_layer = 0, cfg[count][0].last_layer = L - 1;
        cfg_n[count++] = 1;
    }
    for (k = 0; k < 2; k++) /* both orders, every cut */
        for (c = 0; c + 1 < L; c++) {
            cfg[count][0].device = k, cfg[count][0].first_layer = 0, cfg[count][0].last_layer = c;
            cfg[count][1].device = 1 - k, cfg[count][1].first_layer = c + 1, cfg[count][1].last_layer = L - 1;
            cfg_n[count++] = 2;
        }
    for (k = 0; k < count; k++) {
        int same = cfg_n[k] == n_plan;
        for (c = 0; same && c < n_plan; c++)
            same = cfg[k][c].device == plan[c].device && cfg[k][c].first_layer == plan[c].first_layer &&
                   cfg[k][c].last_layer == plan[c].last_layer;
        if (same) mine = k;
        pipes[k] = make(m, cfg[k], cfg_n[k], 0);
        steps(pipes[k], 2);
        t[k] = 1e30;
    }
    if (mine < 0) die("the plan is none of the splits");
    /* screening: every split, ROUNDS times in turn, its least step kept */
    for (r = 0; r < ROUNDS; r++)
        for (k = 0; k < count; k++) {
            double s = steps(pipes[k], 3);
            if (s < t[k]) t[k] = s;
        }
    /* the final: the planner's split and the 3 best of the screening, in
       turn, FINAL rounds each; medians compared (the least of many noisy
       splits alone would favour whichever got lucky) */
    {
        int top[4], n_top = 0, j;
        double med[4], sample[FINAL];
        for (j = 0; j < 3; j++) {
            int pick = -1;
            for (k = 0; k < count; k++) {
                int taken = 0, q;
                for (q = 0; q < n_top; q++) taken |= top[q] == k;
                if (!taken && (pick < 0 || t[k] < t[pick])) pick = k;
            }
            top[n_top++] = pick;
        }
        for (j = 0; j < n_top && top[j] != mine; j++) {
        }
        if (j == n_top) top[n_top++] = mine;
        {
            double all[4][FINAL];
            for (r = 0; r < FINAL; r++)
                for (j = 0; j < n_top; j++) all[j][r] = steps(pipes[top[j]], 3);
            for (j = 0; j < n_top; j++) {
                memcpy(sample, all[j], sizeof sample);
                qsort(sample, FINAL, sizeof sample[0], cmp);
                med[j] = sample[FINAL / 2];
            }
        }
        best = top[0];
        for (j = 0; j < n_top; j++) {
            t[top[j]] = med[j];
            if (med[j] < t[best]) best = top[j];
        }
        for (k = 0; k < count; k++) {
            int in = 0;
            for (j = 0; j < n_top; j++) in |= top[j] == k;
            if (!in) t[k] = 1e30; /* out of the final */
        }
    }
    for (k = 0; k < count; k++) mpar_pipeline_destroy(pipes[k]);
    printf("# planned: %.2f ms; best: %.2f ms (", 1e3 * t[mine], 1e3 * t[best]);
    for (c = 0; c < cfg_n[best]; c++)
        printf("%sdevice %d layers %d-%d", c ? "; " : "", cfg[best][c].device, cfg[best][c].first_layer,
               cfg[best][c].last_layer);
    printf(")\n");
    printf("hetero_plan_over_best_split: %.4f\n", t[mine] / t[best]);
    mpar_model_destroy(m);
}

int main(void) {
    int i;
    for (i = 0; i < BATCH * IN; i++) x[i] = (float)((i * 7919) % 255) / 255.0f;
    for (i = 0; i < BATCH; i++) y[i] = i % 10;
    ctx = open_ctx(NULL);
    demo_figures();
    mpar_destroy(ctx);
    ctx = open_ctx("1:2");
    hetero_figure();
    mpar_destroy(ctx);
    return 0;
}
