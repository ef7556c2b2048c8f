/* Pipeline speed and idle time on two devices, one `name: value` per line:
     speedup_<schedule>_2dev       1-device step time / 2-device step time (M = 8),
                                   every schedule on a placement that gives each
                                   device the same number of blocks (3 of 6)
     measured_over_predicted_<schedule>
                                   measured step / simulator's prediction from
                                   the action costs measured in the same step:
                                   the median over PSTEPS profiled steps, each
                                   step's wall time over its own prediction
     profile_overhead              profiled 1F1B step / unprofiled one (2 devices),
                                   median of the alternating rounds
     bubble_timeline_minus_wallclock
                                   |timeline's measured bubble - wall-clock bubble|,
                                   1F1B on 2 devices, where the wall-clock bubble
                                   is 1 - T_1device / (2 x T_2device) (profiling
                                   off) and the timeline's is that of profiled
                                   steps alternated with them: the median over
                                   rounds of the difference
     synth_over_best_builtin_measured
                                   on an unequal model (a wide first layer, a head
                                   of 2048 classes) whose second device has half the
                                   first's room for stashes (max_in_flight {2, 1}):
                                   AUTO's step / the best built-in's that fits
     naive_util_<P>dev             measured utilisation of the naive schedule
     <schedule>_bubble_measured_2dev_m8, gpipe_bubble_theory_2dev_m8
   Timings on this kind of machine drift, so 1-device and 2-device steps are
   measured alternately, several rounds, and the median ratio is printed.
   Needs two devices that run in parallel: POCL_DEVICES="basic basic". */
#define MPAR_IMPLEMENTATION
#include "mpar.h"

enum { WIDTH = 384, BLOCKS = 6, BATCH = 256, M = 8, ROUNDS = 5, STEPS = 5, PSTEPS = 9, TRUTH_ROUNDS = 9 };

static mpar_context* ctx;
static mpar_model* model;
static float* x;
static int32_t* y;

static void die(const char* what) {
    fprintf(stderr, "bench_pipeline: %s: %s\n", what, mpar_last_error(ctx));
    exit(1);
}

/* stages × V chunks over `stages` devices, placed as the schedule places
   them (interleaved, or a V). Chunk j gets BLOCKS/n blocks, the remainder
   going to the later half: 4 chunks get 1, 1, 2, 2, so each of 2 devices
   holds 3 blocks under both placements. The head and the loss go with the
   last chunk. */
static const int* g_caps; /* pd.max_in_flight for make_on; a refused pipeline is NULL then */
static mpar_pipeline* make_on(mpar_model* mdl, int blocks, mpar_schedule_kind kind, int stages, int V, int profile) {
    mpar_stage_desc st[32];
    mpar_pipeline_desc pd;
    mpar_pipeline* p = NULL;
    mpar_schedule* placed = NULL;
    int L = mpar_model_layer_count(mdl), n = stages * V, j, first = 0;
    if (mpar_schedule_create(kind == MPAR_SCHEDULE_AUTO ? MPAR_SCHEDULE_1F1B : kind, stages, M, V, &placed, NULL) !=
        MPAR_SUCCESS)
        die("schedule");
    for (j = 0; j < n; j++) {
        int size = blocks / n + (j >= n - blocks % n);
        st[j].device = mpar_schedule_stage_of(placed, j) % mpar_device_count(ctx);
        st[j].first_layer = first;
        st[j].last_layer = j == n - 1 ? L - 1 : first + 2 * size - 1;
        first += 2 * size;
    }
    mpar_schedule_destroy(placed);
    memset(&pd, 0, sizeof pd);
    pd.stages = st, pd.stage_count = n, pd.schedule = kind, pd.microbatches = M, pd.virtual_stages = V;
    pd.max_batch = BATCH, pd.profile = profile;
    pd.optimizer.kind = MPAR_OPTIMIZER_SGD;
    pd.optimizer.lr = 1e-3f;
    pd.max_in_flight = g_caps;
    if (mpar_pipeline_create(ctx, mdl, &pd, &p) != MPAR_SUCCESS) {
        if (g_caps) return NULL; /* does not fit the caps */
        die("create");
    }
    return p;
}
static mpar_pipeline* make(mpar_schedule_kind kind, int stages, int V, int profile) {
    return make_on(model, BLOCKS, kind, stages, V, profile);
}

static double steps(mpar_pipeline* p, int n) {
    mpar_batch b;
    mpar_step_info info;
    double t0 = mpar__now();
    int s;
    b.inputs = x, b.targets = y, b.samples = BATCH;
    for (s = 0; s < n; s++)
        if (mpar_pipeline_train_step(p, &b, &info) != MPAR_SUCCESS) die("step");
    return (mpar__now() - t0) / n;
}

static int by_value(const void* a, const void* b) {
    double u = *(const double*)a, v = *(const double*)b;
    return u < v ? -1 : u > v;
}

/* One profiled step: its wall time, its timeline's statistics and the
   prediction from it. */
static double profiled_step(mpar_pipeline* p, mpar_timeline_stats* st, mpar_timeline_prediction* pr) {
    mpar_timeline t;
    mpar_error err;
    double wall = steps(p, 1);
    if (mpar_pipeline_get_timeline(p, &t) != MPAR_SUCCESS) die("timeline");
    if (mpar_timeline_get_stats(&t, st, &err) != MPAR_SUCCESS ||
        (pr && mpar_timeline_predict(&t, pr, &err) != MPAR_SUCCESS)) {
        fprintf(stderr, "bench_pipeline: %s\n", err.message);
        exit(1);
    }
    mpar_timeline_free(&t);
    return wall;
}

static double median(double* v, int n) {
    qsort(v, (size_t)n, sizeof(double), by_value);
    return v[n / 2];
}

/* Each step's wall time over the prediction from its own timeline: the
   simulator's error, not the drift between steps. */
static double measured_over_predicted(mpar_schedule_kind kind, int V, mpar_timeline_stats* st,
                                      mpar_timeline_prediction* pr, double* wall) {
    mpar_pipeline* p = make(kind, 2, V, 1);
    double ratio[PSTEPS];
    int s;
    steps(p, 2);
    for (s = 0; s < PSTEPS; s++) {
        *wall = profiled_step(p, st, pr);
        ratio[s] = *wall / pr->step_time;
    }
    mpar_pipeline_destroy(p);
    return median(ratio, PSTEPS);
}

/* Whether the timeline tells the truth (1F1B, 2 devices), in alternating
   rounds: 1 device and 2 devices without profiling, then 2 devices with
   it. Profiling's cost is the profiled step over the unprofiled one; the
   timeline's bubble (median of the round's profiled steps) is set against
   the bubble the wall clock shows, 1 - T_1 / (2 T_2). */
static void truth(double* overhead, double* bubble_diff, double* bubble_tl, double* bubble_wall) {
    mpar_pipeline *one = make(MPAR_SCHEDULE_1F1B, 1, 1, 0), *two = make(MPAR_SCHEDULE_1F1B, 2, 1, 0),
                  *prof = make(MPAR_SCHEDULE_1F1B, 2, 1, 1);
    double ovh[TRUTH_ROUNDS], diff[TRUTH_ROUNDS], tl[TRUTH_ROUNDS], wall[TRUTH_ROUNDS];
    int r, s;
    steps(one, 2), steps(two, 2), steps(prof, 2);
    for (r = 0; r < TRUTH_ROUNDS; r++) {
        double t1 = steps(one, STEPS), t2 = steps(two, STEPS), tp = 0, b[STEPS];
        mpar_timeline_stats st;
        for (s = 0; s < STEPS; s++) {
            tp += profiled_step(prof, &st, NULL) / STEPS;
            b[s] = st.bubble_fraction;
        }
        ovh[r] = tp / t2;
        wall[r] = 1.0 - t1 / (2.0 * t2);
        tl[r] = median(b, STEPS);
        diff[r] = tl[r] - wall[r];
    }
    *overhead = median(ovh, TRUTH_ROUNDS);
    *bubble_diff = fabs(median(diff, TRUTH_ROUNDS));
    *bubble_tl = median(tl, TRUTH_ROUNDS);
    *bubble_wall = median(wall, TRUTH_ROUNDS);
    mpar_pipeline_destroy(prof), mpar_pipeline_destroy(two), mpar_pipeline_destroy(one);
}

/* Runs a profiled pipeline and returns its last step's statistics. */
static void profiled(mpar_schedule_kind kind, int stages, int V, mpar_timeline_stats* st, mpar_timeline_prediction* pr,
                     double* wall) {
    mpar_pipeline* p = make(kind, stages, V, 1);
    mpar_timeline t;
    mpar_error err;
    steps(p, 2);
    *wall = steps(p, STEPS);
    if (mpar_pipeline_get_timeline(p, &t) != MPAR_SUCCESS) die("timeline");
    if (mpar_timeline_get_stats(&t, st, &err) != MPAR_SUCCESS ||
        (pr && mpar_timeline_predict(&t, pr, &err) != MPAR_SUCCESS)) {
        fprintf(stderr, "bench_pipeline: %s\n", err.message);
        exit(1);
    }
    mpar_timeline_free(&t);
    mpar_pipeline_destroy(p);
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
        fprintf(stderr, "bench_pipeline: %s\n", err.message);
        exit(1);
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
}

/* Median of the alternating ratios t(reference) / t(pipeline i). */
static void race(mpar_pipeline* ref, mpar_pipeline** two, int n, double* median, double* t_ref) {
    double ratio[8][ROUNDS];
    int i, r;
    steps(ref, 2);
    for (i = 0; i < n; i++) steps(two[i], 2);
    for (r = 0; r < ROUNDS; r++) {
        *t_ref = steps(ref, STEPS);
        for (i = 0; i < n; i++) ratio[i][r] = *t_ref / steps(two[i], STEPS);
    }
    for (i = 0; i < n; i++) {
        qsort(ratio[i], ROUNDS, sizeof(double), by_value);
        median[i] = ratio[i][ROUNDS / 2];
    }
}

/* The unequal model: a wide first layer (4x), the blocks, and a head of
   HEAD classes, about 5x a block's work. Cut by block count as a user
   would cut it (2 stages), so the stages' costs differ. */
enum { HEAD = 2048 };
static mpar_model* unequal_model(void) {
    mpar_model_desc md;
    mpar_model* m = NULL;
    mpar_error err;
    int i;
    memset(&md, 0, sizeof md);
    md.input_features = WIDTH, md.seed = 11;
    mpar_model_create(&md, &m, &err);
    mpar_model_add_linear(m, 4 * WIDTH, &err);
    mpar_model_add_simple(m, mpar_layer_relu(), &err);
    mpar_model_add_linear(m, WIDTH, &err);
    mpar_model_add_simple(m, mpar_layer_relu(), &err);
    for (i = 0; i < BLOCKS - 2; i++) {
        mpar_model_add_linear(m, WIDTH, &err);
        mpar_model_add_simple(m, mpar_layer_relu(), &err);
    }
    mpar_model_add_linear(m, HEAD, &err);
    if (mpar_model_add_simple(m, mpar_layer_cross_entropy(), &err) != MPAR_SUCCESS) die("unequal model");
    return m;
}

int main(int argc, char** argv) {
    enum { KINDS = 7, BUILTIN = 6 };
    const mpar_schedule_kind kinds[KINDS] = {MPAR_SCHEDULE_GPIPE, MPAR_SCHEDULE_1F1B, MPAR_SCHEDULE_INTERLEAVED_1F1B,
                                             MPAR_SCHEDULE_ZB_H1, MPAR_SCHEDULE_ZB_H2, MPAR_SCHEDULE_ZB_V,
                                             MPAR_SCHEDULE_AUTO};
    const int vstages[KINDS] = {1, 1, 2, 1, 1, 2, 1};
    const char* speedup_names[KINDS] = {"speedup_gpipe_2dev", "speedup_1f1b_2dev", "speedup_interleaved_2dev",
                                        "speedup_zbh1_2dev",  "speedup_zbh2_2dev", "speedup_zbv_2dev",
                                        "speedup_auto_2dev"};
    mpar_pipeline *one, *two[KINDS];
    double speedup[KINDS], t1 = 0, wall;
    mpar_timeline_stats st;
    mpar_timeline_prediction pr;
    int i;

    if (argc > 1 && !strcmp(argv[1], "--naive4")) { /* child: four devices */
        setup();
        if (mpar_device_count(ctx) < 4) die("needs 4 devices");
        profiled(MPAR_SCHEDULE_SEQUENTIAL, 4, 1, &st, NULL, &wall);
        printf("naive_util_4dev: %.3f\n", st.utilisation);
        return 0;
    }
    setup();
    if (mpar_device_count(ctx) < 2) die("needs 2 devices");

    one = make(MPAR_SCHEDULE_1F1B, 1, 1, 0);
    for (i = 0; i < KINDS; i++) two[i] = make(kinds[i], 2, vstages[i], 0);
    race(one, two, KINDS, speedup, &t1);
    for (i = 0; i < KINDS; i++) {
        printf("%s: %.3f\n", speedup_names[i], speedup[i]);
        mpar_pipeline_destroy(two[i]);
    }
    printf("step_ms_1dev: %.2f\n", 1e3 * t1);
    mpar_pipeline_destroy(one);

    { /* what profiling costs, and whether its bubble is the wall clock's */
        double overhead, diff, tl, wall_bubble;
        truth(&overhead, &diff, &tl, &wall_bubble);
        printf("profile_overhead: %.3f\n", overhead);
        printf("bubble_timeline_1f1b_2dev: %.3f\n", tl);
        printf("bubble_wallclock_1f1b_2dev: %.3f\n", wall_bubble);
        printf("bubble_timeline_minus_wallclock: %.3f\n", diff);
    }
    for (i = 0; i < KINDS; i++) { /* every schedule's own steps, each predicted from its own measured actions */
        double ratio = measured_over_predicted(kinds[i], vstages[i], &st, &pr, &wall);
        printf("measured_over_predicted_%s: %.3f\n", mpar_schedule_kind_name(kinds[i]), ratio);
        if (kinds[i] == MPAR_SCHEDULE_1F1B) {
            printf("step_ms_1f1b_2dev_profiled: %.2f\n", 1e3 * wall);
            printf("predicted_ms_1f1b_2dev: %.2f\n", 1e3 * pr.step_time);
            printf("1f1b_bubble_measured_2dev_m8: %.3f\n", st.bubble_fraction);
            printf("1f1b_bubble_predicted_2dev_m8: %.3f\n", pr.bubble_fraction);
        }
    }
    profiled(MPAR_SCHEDULE_GPIPE, 2, 1, &st, NULL, &wall);
    printf("gpipe_bubble_measured_2dev_m8: %.3f\n", st.bubble_fraction);
    printf("gpipe_bubble_theory_2dev_m8: %.3f\n", 1.0 / (M + 1));
    profiled(MPAR_SCHEDULE_SEQUENTIAL, 2, 1, &st, NULL, &wall);
    printf("naive_util_2dev: %.3f\n", st.utilisation);
    printf("naive_util_theory_2dev: %.3f\n", 0.5);

    { /* the unequal case: the best built-in that fits against AUTO, alternating */
        static const int caps[2] = {2, 1};
        mpar_model* u = unequal_model();
        mpar_pipeline* p[2];
        double ratio[1], t_best = 0, best_ratio, best_ms = 1e30;
        int best = -1;
        g_caps = caps;
        for (i = 0; i < BUILTIN; i++) { /* which built-in that fits is fastest here (V = 1 ones) */
            mpar_pipeline* q;
            double t;
            if (vstages[i] != 1 || !(q = make_on(u, BLOCKS, kinds[i], 2, 1, 0))) continue;
            steps(q, 2);
            t = steps(q, STEPS);
            if (t < best_ms) best_ms = t, best = i;
            mpar_pipeline_destroy(q);
        }
        if (best < 0) die("no built-in fits the caps");
        p[0] = make_on(u, BLOCKS, kinds[best], 2, 1, 0);
        p[1] = make_on(u, BLOCKS, MPAR_SCHEDULE_AUTO, 2, 1, 0);
        race(p[0], p + 1, 1, ratio, &t_best);
        best_ratio = ratio[0];
        printf("unequal_best_builtin: %s\n", mpar_schedule_kind_name(kinds[best]));
        printf("synth_over_best_builtin_measured: %.3f\n", 1.0 / best_ratio);
        mpar_pipeline_destroy(p[0]), mpar_pipeline_destroy(p[1]);
        mpar_model_destroy(u);
        g_caps = NULL;
    }
    mpar_model_destroy(model);
    free(x), free(y);
    mpar_destroy(ctx);
    fflush(stdout);
    {
        char cmd[4200];
        snprintf(cmd, sizeof cmd, "POCL_DEVICES='basic basic basic basic' '%s' --naive4", argv[0]);
        if (system(cmd) != 0) return 1;
        printf("naive_util_theory_4dev: %.3f\n", 0.25);
    }
    return 0;
}
