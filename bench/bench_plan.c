/* Planner prediction vs measurement on two devices, one `name: value` per
   line:
     plan_stages                    the plan's ranges, "device:first-last,..."
     plan_predicted_ms              the plan's step_seconds
     plan_simulated_ms              mpar_simulate on the plan's per-stage costs
     plan_measured_ms               median wall time of a training step
     plan_predicted_over_measured   target: within 10% of 1
     plan_simulated_over_measured
     plan_busy_over_profiled        device compute in the pipeline / profiled
                                    (above 1: the devices slowed each other)
   The costs are measured per layer on each device (mpar_profile_layers),
   the plan is made from them (mpar_pipeline_plan), the pipeline is built
   from the plan and timed: 2 warm-up steps, then the median of STEPS.
   Model: the Fashion-MNIST MLP 784-512-256-10, batch 256, M = 8, 1F1B
   (random data: step time does not depend on it). `--gpt` uses a small
   character GPT instead (64 tokens, width 128, 4 heads, 4 blocks, batch 32).
   Needs two devices that run in parallel: POCL_DEVICES="basic basic". */
#define MPAR_IMPLEMENTATION
#include "mpar.h"

#include <stdlib.h>

enum { STEPS = 5, WARMUP = 2, ROUNDS = 5, PROFILES = 3, MAX_LAYERS = 64 };

typedef struct round_result {
    double predicted, simulated, measured, ratio;
    double inflation; /* device compute time in the last step / the profile's */
    char ranges[256];
} round_result;

static mpar_context* ctx;

static void die(const char* what) {
    fprintf(stderr, "bench_plan: %s: %s\n", what, ctx ? mpar_last_error(ctx) : "");
    exit(1);
}

static int by_value(const void* a, const void* b) {
    double u = *(const double*)a, v = *(const double*)b;
    return u < v ? -1 : u > v;
}

/* median of PROFILES values `stride` apart */
static double median_of(const double* first, int stride) {
    double v[PROFILES];
    int k;
    for (k = 0; k < PROFILES; k++) v[k] = first[k * stride];
    qsort(v, PROFILES, sizeof v[0], by_value);
    return v[PROFILES / 2];
}

static int by_ratio(const void* a, const void* b) {
    double u = ((const round_result*)a)->ratio, v = ((const round_result*)b)->ratio;
    return u < v ? -1 : u > v;
}

static mpar_model* make_mlp(void) {
    mpar_model* m = NULL;
    mpar_model_desc md;
    memset(&md, 0, sizeof md);
    md.input_features = 784, md.seed = 1;
    if (mpar_model_create(&md, &m, NULL) || mpar_model_add_linear(m, 512, NULL) ||
        mpar_model_add_simple(m, mpar_layer_relu(), NULL) || mpar_model_add_linear(m, 256, NULL) ||
        mpar_model_add_simple(m, mpar_layer_relu(), NULL) || mpar_model_add_linear(m, 10, NULL) ||
        mpar_model_add_simple(m, mpar_layer_cross_entropy(), NULL))
        die("model");
    return m;
}

static mpar_model* make_gpt(int seq, int vocab) {
    mpar_model* m = NULL;
    mpar_model_desc md;
    mpar_layer_desc ld;
    int i;
    memset(&md, 0, sizeof md);
    md.input_features = 1, md.seq_len = seq, md.seed = 1;
    if (mpar_model_create(&md, &m, NULL)) die("model");
    memset(&ld, 0, sizeof ld);
    ld.type = mpar_layer_embedding(), ld.units = 128, ld.vocab = vocab;
    if (mpar_model_add(m, &ld, NULL)) die("model");
    for (i = 0; i < 4; i++) {
        memset(&ld, 0, sizeof ld);
        ld.type = mpar_layer_decoder_block(), ld.heads = 4;
        if (mpar_model_add(m, &ld, NULL)) die("model");
    }
    if (mpar_model_add_simple(m, mpar_layer_layernorm(), NULL) || mpar_model_add_linear(m, vocab, NULL) ||
        mpar_model_add_simple(m, mpar_layer_cross_entropy(), NULL))
        die("model");
    return m;
}

/* The plan's stages as simulator costs: per stage the sum of its layers'
   measured F, I and W on its device, and the planner's transfer charge
   split evenly between the forward and the backward (the executor's copies
   block the worker, as the planner assumes). */
static double simulate(const mpar_plan* plan, int D, const double* f, const double* bi, const double* bw) {
    double F[MAX_LAYERS], I[MAX_LAYERS], W[MAX_LAYERS], B[MAX_LAYERS];
    mpar_schedule* sched = NULL;
    mpar_simulation* sim = NULL;
    mpar_sim_desc sd;
    mpar_error err;
    double t;
    int s, l;
    for (s = 0; s < plan->num_stages; s++) {
        const mpar_plan_stage* st = &plan->stages[s];
        F[s] = I[s] = W[s] = 0.0;
        for (l = st->first_layer; l <= st->last_layer; l++) {
            F[s] += f[l * D + st->device];
            I[s] += bi[l * D + st->device];
            W[s] += bw[l * D + st->device];
        }
        F[s] += 0.5 * st->transfer_seconds;
        I[s] += 0.5 * st->transfer_seconds;
        B[s] = I[s] + W[s];
    }
    memset(&sd, 0, sizeof sd);
    sd.forward_per_stage = F, sd.backward_per_stage = B;
    sd.backward_input_per_stage = I, sd.backward_weight_per_stage = W;
    if (mpar_schedule_create(plan->schedule, plan->num_stages / plan->virtual_stages, plan->microbatches,
                             plan->virtual_stages, &sched, &err) != MPAR_SUCCESS ||
        mpar_simulate(sched, &sd, &sim, &err) != MPAR_SUCCESS) {
        fprintf(stderr, "bench_plan: simulate: %s\n", err.message);
        exit(1);
    }
    t = sim->step_time;
    mpar_simulation_destroy(sim);
    mpar_schedule_destroy(sched);
    return t;
}

/* How much longer the devices computed in the pipeline's last step than the
   profile said (F, B, I, W events against M x the plan's compute seconds,
   slowest stage): 1 when the profile holds while both devices run at once;
   above 1 when they slow each other down (shared cores, other load). */
static double busy_over_profiled(mpar_pipeline* p, const mpar_plan* plan) {
    mpar_timeline t;
    double busy[MAX_LAYERS], worst = 0.0;
    int i, s;
    if (mpar_pipeline_get_timeline(p, &t) != MPAR_SUCCESS) die("timeline");
    for (s = 0; s < plan->num_stages; s++) busy[s] = 0.0;
    for (i = 0; i < t.event_count; i++)
        if (t.events[i].kind <= MPAR_EVENT_BACKWARD_WEIGHT && t.events[i].stage < plan->num_stages)
            busy[t.events[i].stage] += t.events[i].end - t.events[i].start;
    for (s = 0; s < plan->num_stages; s++) {
        double r = busy[s] / (plan->microbatches * plan->stages[s].compute_seconds);
        if (r > worst) worst = r;
    }
    mpar_timeline_free(&t);
    return worst;
}

int main(int argc, char** argv) {
    const int gpt = argc > 1 && !strcmp(argv[1], "--gpt");
    const int seq = 64, vocab = 65;
    const int batch = gpt ? 32 : 256, M = 8;
    double f[MAX_LAYERS * 2], bi[MAX_LAYERS * 2], bw[MAX_LAYERS * 2];
    double times[STEPS], flops[2] = {1e10, 1e10};
    round_result res[ROUNDS];
    static double pf[PROFILES][MAX_LAYERS], pbi[PROFILES][MAX_LAYERS], pbw[PROFILES][MAX_LAYERS];
    const int rounds = gpt ? 1 : ROUNDS;
    mpar_desc d;
    mpar_error err;
    mpar_model* model;
    mpar_pipeline_desc pd;
    mpar_plan_options o;
    mpar_plan plan;
    mpar_pipeline* p = NULL;
    mpar_batch b;
    mpar_step_info info;
    size_t rows, in_floats;
    float* x;
    int32_t* y;
    int D = 2, L, dev, l, i, r, k;
    uint64_t rng = 5;

    memset(&d, 0, sizeof d);
    d.error = &err;
    if (mpar_create(&d, &ctx) != MPAR_SUCCESS) {
        fprintf(stderr, "bench_plan: %s\n", err.message);
        return 1;
    }
    if (mpar_device_count(ctx) < 2) die("needs 2 devices");

    model = gpt ? make_gpt(seq, vocab) : make_mlp();
    L = mpar_model_layer_count(model);
    rows = (size_t)batch * (gpt ? (size_t)seq : 1);
    in_floats = rows * (gpt ? 1 : 784);
    x = (float*)malloc(sizeof(float) * in_floats);
    y = (int32_t*)malloc(sizeof(int32_t) * rows);
    if (!x || !y) die("out of memory");
    for (i = 0; i < (int)in_floats; i++) {
        if (gpt) ((int32_t*)x)[i] = (int32_t)(mpar__rng_next(&rng) % (uint64_t)vocab);
        else x[i] = (float)(2.0 * mpar__rng_uniform(&rng) - 1.0);
    }
    for (i = 0; i < (int)rows; i++) y[i] = (int32_t)(mpar__rng_next(&rng) % (uint64_t)(gpt ? vocab : 10));
    b.inputs = x, b.targets = y, b.samples = batch;

    /* Rounds of profile -> plan -> build -> time, so that the profile and
       the steps it predicts run close together: the load of a shared
       machine drifts. The round with the median predicted/measured ratio
       is reported. */
    for (r = 0; r < rounds; r++) {
        round_result* rr = &res[r];
        memset(&pd, 0, sizeof pd);
        pd.schedule = MPAR_SCHEDULE_1F1B, pd.microbatches = M, pd.max_batch = batch;
        pd.optimizer.kind = MPAR_OPTIMIZER_ADAMW;
        pd.optimizer.lr = 1e-3f;
        /* per-layer seconds per micro-batch on each device, [layer * D + device]:
           the median of PROFILES profiles (each is one timed step) */
        for (dev = 0; dev < D; dev++) {
            for (k = 0; k < PROFILES; k++)
                if (mpar_profile_layers(ctx, model, &pd, dev, pf[k], pbi[k], pbw[k]) != MPAR_SUCCESS) die("profile");
            for (l = 0; l < L; l++) {
                f[l * D + dev] = median_of(&pf[0][l], MAX_LAYERS);
                bi[l * D + dev] = median_of(&pbi[0][l], MAX_LAYERS);
                bw[l * D + dev] = median_of(&pbw[0][l], MAX_LAYERS);
            }
        }
        memset(&o, 0, sizeof o);
        o.measured_forward = f, o.measured_backward_input = bi, o.measured_backward_weight = bw;
        o.device_flops = flops; /* not used: the measured tables override the FLOP model */
        if (mpar_pipeline_plan(ctx, model, &pd, &o, &plan) != MPAR_SUCCESS) die("plan");
        mpar_plan_to_string(&plan, rr->ranges, sizeof rr->ranges);
        pd.plan = &plan;
        pd.profile = 1; /* for the busy time below */
        if (mpar_pipeline_create(ctx, model, &pd, &p) != MPAR_SUCCESS) die("create");
        for (i = 0; i < WARMUP; i++)
            if (mpar_pipeline_train_step(p, &b, &info) != MPAR_SUCCESS) die("step");
        for (i = 0; i < STEPS; i++) {
            double t0 = mpar__now();
            if (mpar_pipeline_train_step(p, &b, &info) != MPAR_SUCCESS) die("step");
            times[i] = mpar__now() - t0;
        }
        qsort(times, STEPS, sizeof times[0], by_value);
        rr->measured = times[STEPS / 2];
        rr->predicted = plan.step_seconds;
        rr->simulated = simulate(&plan, D, f, bi, bw);
        rr->ratio = rr->predicted / rr->measured;
        rr->inflation = busy_over_profiled(p, &plan);
        mpar_pipeline_destroy(p);
        mpar_plan_free(&plan);
    }
    qsort(res, (size_t)rounds, sizeof res[0], by_ratio);
    {
        const round_result* m = &res[rounds / 2];
        printf("plan_model: %s\n", gpt ? "char_gpt_t64_c128_b4" : "mlp_784_512_256_10");
        printf("plan_rounds: %d\n", rounds);
        printf("plan_stages: %s\n", m->ranges);
        printf("plan_predicted_ms: %.3f\n", 1e3 * m->predicted);
        printf("plan_simulated_ms: %.3f\n", 1e3 * m->simulated);
        printf("plan_measured_ms: %.3f\n", 1e3 * m->measured);
        printf("plan_predicted_over_measured: %.3f\n", m->ratio);
        printf("plan_simulated_over_measured: %.3f\n", m->simulated / m->measured);
        printf("plan_busy_over_profiled: %.3f\n", m->inflation);
        printf("plan_predicted_over_measured_min: %.3f\n", res[0].ratio);
        printf("plan_predicted_over_measured_max: %.3f\n", res[rounds - 1].ratio);
    }

    mpar_model_destroy(model);
    free(x), free(y);
    mpar_destroy(ctx);
    return 0;
}
