/* What mpar would do with a model on these devices, and why: the devices,
   the per-layer costs the planner sees, the plan, its binding constraint,
   and the plan of every schedule kind side by side. Trains nothing.

     examples/plan [--model mlp|gpt] [--schedule S] [--microbatches M] [--batch B]
                   [--measure] [--json] [--devices SEL] [--plan optimal|proportional --weights W,W]
                   [--memory-limit-mib N] [--optimizer adamw|sgd]
                   mlp: [--hidden H]      gpt: [--seq T] [--width C] [--layers L] [--heads H] [--vocab V]

   mlp is examples/fashion_mnist's MLP (784-H-H/2-10, dropout), gpt is
   examples/char_gpt's decoder (63 symbols: the King James Bible's). B is
   the pipeline's max_batch, so a micro-batch holds B / M samples.
   --measure profiles every layer on every device (mpar_profile_layers) and
   plans with those times instead of the FLOP model. --memory-limit-mib
   leaves N MiB usable on every device (through plan_options.reserve_bytes),
   to show what happens when a model does not fit. --json writes the plan as
   JSON (mpar_plan_write_json) on stdout, and everything else on stderr.

   Exit code 0 when the chosen schedule has a plan, 1 otherwise (a model
   that does not fit prints mpar's reason). */
#define MPAR_IMPLEMENTATION
#include "mpar.h"
#include "common.h"

#define MAX_DEV 64
#define MAX_LAYERS 64

static int die(const char* what, const char* msg) {
    fprintf(stderr, "plan: %s: %s\n", what, msg);
    return 1;
}

static mpar_result build_mlp(int hidden, mpar_model** out, mpar_error* err) {
    mpar_model_desc md;
    mpar_layer_desc drop;
    mpar_model* m = NULL;
    memset(&md, 0, sizeof md);
    md.input_features = 784, md.seed = 1;
    memset(&drop, 0, sizeof drop);
    drop.type = mpar_layer_dropout(), drop.rate = 0.2f;
    if (mpar_model_create(&md, &m, err) || mpar_model_add_linear(m, hidden, err) ||
        mpar_model_add_simple(m, mpar_layer_relu(), err) || mpar_model_add_linear(m, hidden / 2, err) ||
        mpar_model_add_simple(m, mpar_layer_relu(), err) || mpar_model_add(m, &drop, err) ||
        mpar_model_add_linear(m, 10, err) || mpar_model_add_simple(m, mpar_layer_cross_entropy(), err)) {
        mpar_model_destroy(m);
        return err->code;
    }
    *out = m;
    return MPAR_SUCCESS;
}

static mpar_result build_gpt(int T, int C, int L, int H, int vocab, mpar_model** out, mpar_error* err) {
    mpar_model_desc md;
    mpar_layer_desc ld;
    mpar_model* m = NULL;
    int i;
    memset(&md, 0, sizeof md);
    md.input_features = 1, md.seq_len = T, md.seed = 1;
    memset(&ld, 0, sizeof ld);
    ld.type = mpar_layer_embedding(), ld.units = C, ld.vocab = vocab;
    if (mpar_model_create(&md, &m, err) || mpar_model_add(m, &ld, err)) goto fail;
    for (i = 0; i < L; i++) {
        memset(&ld, 0, sizeof ld);
        ld.type = mpar_layer_decoder_block(), ld.heads = H;
        if (mpar_model_add(m, &ld, err)) goto fail;
    }
    if (mpar_model_add_simple(m, mpar_layer_layernorm(), err) || mpar_model_add_linear(m, vocab, err) ||
        mpar_model_add_simple(m, mpar_layer_cross_entropy(), err))
        goto fail;
    *out = m;
    return MPAR_SUCCESS;
fail:
    mpar_model_destroy(m);
    return err->code;
}

/* The planner's per-layer table, as mpar_pipeline_plan builds it. */
static void plan_layers(const mpar_model* model, const mpar_pipeline_desc* d, mpar_plan_layer* out) {
    mpar_error err;
    if (mpar_pipeline_plan_layers(model, d, out, &err) != MPAR_SUCCESS) {
        fprintf(stderr, "plan: %s\n", err.message);
        exit(1);
    }
}

/* Everything a schedule comparison needs besides the plan itself. */
typedef struct setup {
    mpar_context* ctx;
    const mpar_model* model;
    int devices;
    double flops[MAX_DEV];
    const double *mf, *mi, *mw; /* measured seconds per micro-batch, [layer * devices + device], or NULL */
    double link_bandwidth, link_latency;
} setup;

/* Seconds of layer l on device d, for part 0 (F), 1 (I) or 2 (W). */
static double layer_seconds(const setup* s, const mpar_plan_layer* pl, int l, int d, int part, double scale) {
    const double* m = part == 0 ? s->mf : part == 1 ? s->mi : s->mw;
    double f = part == 0 ? pl[l].flops_forward : part == 1 ? pl[l].flops_backward_input : pl[l].flops_backward_weight;
    return m ? scale * m[l * s->devices + d] : f / s->flops[d];
}

/* One-way copy time of an activation (or its gradient) over the cut after
   layer l between devices a and b, with mpar_pipeline_plan's link model. */
static double link_seconds(const setup* s, const mpar_plan_layer* pl, int l, int a, int b) {
    mpar_device_info ia, ib;
    double bw = s->link_bandwidth, lat = s->link_latency > 0 ? s->link_latency : 1e-4;
    if (a == b) return 0.0;
    memset(&ia, 0, sizeof ia), memset(&ib, 0, sizeof ib); /* a failed query leaves them zero */
    if (mpar_device_get_info(s->ctx, a, &ia) != MPAR_SUCCESS || mpar_device_get_info(s->ctx, b, &ib) != MPAR_SUCCESS)
        return lat + (double)pl[l].output_bytes / (bw > 0 ? bw : 6e9);
    if (bw <= 0)
        bw = ia.group != ib.group || ia.type == MPAR_DEVICE_CPU || ib.type == MPAR_DEVICE_CPU ? 6e9 : 12e9;
    return lat + (double)pl[l].output_bytes / bw;
}

/* Runs the plan's schedule through the simulator with the planner's costs:
   each copy is charged to the F (activations) or I (gradients) of both the
   sender and the receiver, as the planner charges it to both stages. */
static mpar_result simulate_plan(const setup* s, const mpar_plan* plan, const mpar_plan_layer* pl, double scale,
                                 double* step, double* bubble, mpar_error* err) {
    double f[4 * MAX_DEV], in[4 * MAX_DEV], w[4 * MAX_DEV];
    mpar_schedule* sc = NULL;
    mpar_simulation* sim = NULL;
    mpar_sim_desc sd;
    int V = plan->virtual_stages > 0 ? plan->virtual_stages : 1, n = plan->num_stages, j, l;
    mpar_result r;
    if (n > 4 * MAX_DEV) return mpar_error_set(err, MPAR_ERROR_UNSUPPORTED, "too many stages to simulate");
    for (j = 0; j < n; j++) {
        const mpar_plan_stage* st = &plan->stages[j];
        f[j] = in[j] = w[j] = 0.0;
        for (l = st->first_layer; l <= st->last_layer; l++) {
            f[j] += layer_seconds(s, pl, l, st->device, 0, scale);
            in[j] += layer_seconds(s, pl, l, st->device, 1, scale);
            w[j] += layer_seconds(s, pl, l, st->device, 2, scale);
        }
    }
    for (j = 0; j + 1 < n; j++) {
        double x = link_seconds(s, pl, plan->stages[j].last_layer, plan->stages[j].device, plan->stages[j + 1].device);
        f[j] += x, f[j + 1] += x, in[j] += x, in[j + 1] += x;
    }
    memset(&sd, 0, sizeof sd);
    sd.forward_per_stage = f, sd.backward_input_per_stage = in, sd.backward_weight_per_stage = w;
    r = mpar_schedule_create(plan->schedule, n / V, plan->microbatches, V, &sc, err);
    if (r == MPAR_SUCCESS) r = mpar_simulate(sc, &sd, &sim, err);
    if (r == MPAR_SUCCESS) *step = sim->step_time, *bubble = sim->bubble_fraction;
    mpar_simulation_destroy(sim);
    mpar_schedule_destroy(sc);
    return r;
}

static void print_layers(const mpar_model* model, const mpar_plan_layer* pl, const setup* s) {
    int i, d, L = mpar_model_layer_count(model);
    printf("%5s %-14s %11s %10s %9s %9s %9s %10s %10s %10s %10s\n", "layer", "type", "in->out", "params", "F_MFLOP",
           "I_MFLOP", "W_MFLOP", "param_KiB", "optim_KiB", "stash_KiB", "output_KiB");
    for (i = 0; i < L; i++) {
        const mpar_layer* l = mpar_model_layer(model, i);
        char shape[32];
        snprintf(shape, sizeof shape, "%d->%d", l->in_features, l->out_features);
        printf("%5d %-14s %11s %10zu %9.2f %9.2f %9.2f %10.1f %10.1f %10.1f %10.1f\n", i, l->type->name, shape,
               l->param_count, pl[i].flops_forward / 1e6, pl[i].flops_backward_input / 1e6,
               pl[i].flops_backward_weight / 1e6, pl[i].param_bytes / 1024.0, pl[i].optimizer_bytes / 1024.0,
               pl[i].activation_bytes / 1024.0, pl[i].output_bytes / 1024.0);
    }
    if (!s->mf) return;
    printf("measured ms per micro-batch (mpar_profile_layers), F / I / W:\n%5s %-14s", "layer", "type");
    for (d = 0; d < s->devices; d++) printf("   device %-2d F / I / W    ", d);
    printf("\n");
    for (i = 0; i < L; i++) {
        printf("%5d %-14s", i, mpar_model_layer(model, i)->type->name);
        for (d = 0; d < s->devices; d++)
            printf("  %7.3f %7.3f %7.3f ", 1e3 * s->mf[i * s->devices + d], 1e3 * s->mi[i * s->devices + d],
                   1e3 * s->mw[i * s->devices + d]);
        printf("\n");
    }
}

/* One line per schedule kind: what the planner would do with it. */
static void compare_schedules(const setup* s, const mpar_pipeline_desc* base, const mpar_plan_options* opt,
                              mpar_schedule_kind chosen) {
    static const mpar_schedule_kind kinds[] = {MPAR_SCHEDULE_SEQUENTIAL, MPAR_SCHEDULE_GPIPE, MPAR_SCHEDULE_1F1B,
                                               MPAR_SCHEDULE_INTERLEAVED_1F1B, MPAR_SCHEDULE_ZB_H1, MPAR_SCHEDULE_ZB_H2,
                                               MPAR_SCHEDULE_ZB_V};
    mpar_plan_layer pl[MAX_LAYERS];
    static double scaled[3][MAX_LAYERS * MAX_DEV];
    double best = 1e30;
    int k, i, best_k = -1, n = mpar_model_layer_count(s->model) * s->devices;
    printf("\nevery schedule kind, same model, devices and options (M=%d):\n", base->microbatches);
    printf("  %-12s %-26s %6s %13s %13s %9s %11s  %s\n", "schedule", "stages", "in_fl", "plan_step_ms",
           "sim_step_ms", "sim_bubble", "peak_MiB", "binding");
    for (k = 0; k < (int)(sizeof kinds / sizeof kinds[0]); k++) {
        mpar_pipeline_desc d = *base;
        mpar_plan_options o = *opt;
        mpar_plan plan;
        mpar_error err;
        double step = 0, bubble = 0, scale = 1.0;
        uint64_t peak = 0;
        char text[256];
        int j, in_flight = 0;
        d.schedule = kinds[k];
        d.virtual_stages = kinds[k] == MPAR_SCHEDULE_INTERLEAVED_1F1B || kinds[k] == MPAR_SCHEDULE_ZB_V ? 2 : 1;
        if (kinds[k] == MPAR_SCHEDULE_SEQUENTIAL && s->mf) {
            /* The profile is per micro-batch of B/M samples; SEQUENTIAL runs
               the whole batch as one, so its costs are scaled by M. */
            scale = d.microbatches > 0 ? d.microbatches : 1;
            for (i = 0; i < n; i++)
                scaled[0][i] = scale * s->mf[i], scaled[1][i] = scale * s->mi[i], scaled[2][i] = scale * s->mw[i];
            o.measured_forward = scaled[0], o.measured_backward_input = scaled[1];
            o.measured_backward_weight = scaled[2];
        }
        printf("%c %-12s ", kinds[k] == chosen ? '*' : ' ', mpar_schedule_kind_name(kinds[k]));
        if (mpar_pipeline_plan(s->ctx, s->model, &d, &o, &plan) != MPAR_SUCCESS) {
            printf("no plan: %s\n", mpar_last_error(s->ctx));
            continue;
        }
        plan_layers(s->model, &d, pl);
        if (simulate_plan(s, &plan, pl, scale, &step, &bubble, &err) != MPAR_SUCCESS)
            step = 0, bubble = -1;
        for (j = 0; j < plan.num_devices; j++)
            if (plan.device_memory_bytes[j] > peak) peak = plan.device_memory_bytes[j];
        for (j = 0; j < plan.num_stages; j++)
            if (plan.stages[j].in_flight > in_flight) in_flight = plan.stages[j].in_flight;
        mpar_plan_to_string(&plan, text, sizeof text);
        printf("%-26s %6d %13.3f %13.3f %8.1f%% %11.2f  %s\n", text, in_flight, 1e3 * plan.step_seconds, 1e3 * step,
               100.0 * bubble, peak / 1048576.0, mpar_plan_binding_name(plan.binding.kind));
        if (step > 0 && step < best) best = step, best_k = k;
        mpar_plan_free(&plan);
    }
    if (best_k >= 0)
        printf("  (* = --schedule; fastest simulated step: %s. The planner gives ZB-H1 1F1B's step, an upper "
               "bound; the simulator splits B into I and W.)\n", mpar_schedule_kind_name(kinds[best_k]));
}

static const char usage[] =
    "usage: examples/plan [options]\n"
    "  what mpar would do with a model on these devices, and why (trains nothing)\n"
    "  --model mlp|gpt        fashion_mnist's MLP (default) or char_gpt's decoder\n"
    "  --schedule S  --microbatches M [4]  --batch B  --optimizer adamw|sgd\n"
    "  --measure              plan from measured layer times instead of the FLOP model\n"
    "  --json                 the plan as JSON on stdout; everything else goes to stderr\n"
    "  --devices SEL  --plan optimal|proportional [--weights W,W]  --memory-limit-mib N\n"
    "  mlp: --hidden H        gpt: --seq T --width C --layers L --heads H --vocab V\n"
    "  --help\n";

int main(int argc, char** argv) {
    ex_args(argc, argv, usage, "--model= --schedule= --microbatches= --batch= --optimizer= --measure --json --devices= --plan= --weights= --memory-limit-mib= --hidden= --seq= --width= --layers= --heads= --vocab=");
    const char* model_name = ex_option(argc, argv, "--model");
    const char* sched = ex_option(argc, argv, "--schedule");
    const char* optim = ex_option(argc, argv, "--optimizer");
    int gpt = model_name && !strcmp(model_name, "gpt"), json = ex_flag(argc, argv, "--json");
    int measure = ex_flag(argc, argv, "--measure");
    double limit_mib = ex_double(argc, argv, "--memory-limit-mib", 0.0);
    mpar_desc desc;
    mpar_error err;
    mpar_pipeline_desc pd;
    mpar_plan_options opt;
    mpar_plan plan;
    mpar_plan_layer pl[MAX_LAYERS];
    mpar_model* model = NULL;
    setup s;
    static double mf[MAX_LAYERS * MAX_DEV], mi[MAX_LAYERS * MAX_DEV], mw[MAX_LAYERS * MAX_DEV];
    double weights[MAX_DEV], col[3][MAX_LAYERS];
    uint64_t min_mem = 0;
    int d, i, L, status = 0;
    mpar_result r;

    FILE* json_out = NULL;
    if (model_name && strcmp(model_name, "mlp") != 0 && !gpt) return die("--model", "expected mlp or gpt");
    if (json) { /* stdout carries the JSON alone: everything printed for people goes to stderr */
        int fd = dup(1);
        fflush(stdout);
        if (fd < 0 || dup2(2, 1) < 0 || !(json_out = fdopen(fd, "w"))) return die("--json", "cannot set up stdout");
    }
    memset(&desc, 0, sizeof desc);
    desc.devices = ex_option(argc, argv, "--devices");
    desc.error = &err;
    ex_pocl_devices();
    if (mpar_create(&desc, &s.ctx) != MPAR_SUCCESS) return die("devices", err.message);
    s.devices = mpar_device_count(s.ctx);
    if (s.devices > MAX_DEV) return die("devices", "more than 64 devices");
    s.mf = s.mi = s.mw = NULL;

    r = gpt ? build_gpt(ex_int(argc, argv, "--seq", 64), ex_int(argc, argv, "--width", 96),
                        ex_int(argc, argv, "--layers", 3), ex_int(argc, argv, "--heads", 4),
                        ex_int(argc, argv, "--vocab", 63), &model, &err)
            : build_mlp(ex_int(argc, argv, "--hidden", 512), &model, &err);
    if (r != MPAR_SUCCESS) return die("model", err.message);
    s.model = model;
    L = mpar_model_layer_count(model);
    if (L > MAX_LAYERS) return die("model", "more than 64 layers");

    memset(&pd, 0, sizeof pd);
    pd.schedule = MPAR_SCHEDULE_1F1B;
    if (sched && mpar_schedule_kind_parse(sched, &pd.schedule, &err) != MPAR_SUCCESS)
        return die("--schedule", err.message);
    pd.microbatches = ex_int(argc, argv, "--microbatches", 4);
    pd.virtual_stages = pd.schedule == MPAR_SCHEDULE_INTERLEAVED_1F1B ? 2 : 1;
    pd.max_batch = ex_int(argc, argv, "--batch", gpt ? 16 : 128);
    pd.optimizer.kind = optim && !strcmp(optim, "sgd") ? MPAR_OPTIMIZER_SGD : MPAR_OPTIMIZER_ADAMW;
    if (pd.microbatches < 1 || pd.max_batch < pd.microbatches)
        return die("options", "need --microbatches >= 1 and --batch >= --microbatches");
    if (ex_plan_options(argc, argv, &opt, weights, MAX_DEV) != 0)
        return die("--plan", "expected optimal, or proportional with --weights W,W,...");

    printf("mpar %s: %d device(s)\n", MPAR_VERSION_STRING, s.devices);
    for (d = 0; d < s.devices; d++) {
        mpar_device_info info;
        mpar_device_get_info(s.ctx, d, &info);
        if (mpar_device_measure_flops(s.ctx, d, &s.flops[d]) != MPAR_SUCCESS)
            return die("measuring devices", mpar_last_error(s.ctx));
        printf("  device %d: %s (%s, %s), %d compute unit(s), %.0f MiB, context %d, %.2f GFLOP/s (SGEMM n=512)\n",
               d, info.name, info.platform, mpar_device_type_name(info.type), info.compute_units,
               info.global_mem_bytes / 1048576.0, info.group, s.flops[d] / 1e9);
        if (d == 0 || info.global_mem_bytes < min_mem) min_mem = info.global_mem_bytes;
    }
    {
        /* mpar_pipeline_plan measures identical devices (same name and
           driver) once so that they get equal plans; here each was measured,
           and identical ones are given their mean for the same reason. */
        int alike = 1;
        double sum = 0.0;
        mpar_device_info a, b;
        mpar_device_get_info(s.ctx, 0, &a);
        for (d = 0; d < s.devices; d++) {
            mpar_device_get_info(s.ctx, d, &b);
            alike &= !strcmp(a.name, b.name) && !strcmp(a.driver, b.driver);
            sum += s.flops[d];
        }
        if (alike && s.devices > 1) {
            for (d = 0; d < s.devices; d++) s.flops[d] = sum / s.devices;
            printf("  identical devices: planning with their mean, %.2f GFLOP/s each\n", s.flops[0] / 1e9);
        }
    }
    opt.device_flops = s.flops; /* plan with the figures shown, not a second measurement */
    s.link_bandwidth = opt.link_bandwidth, s.link_latency = opt.link_latency;
    if (limit_mib > 0) {
        /* One reserve for every device: "memory - limit" of the smallest, so
           no device has more than the limit usable. */
        uint64_t limit = (uint64_t)(limit_mib * 1048576.0);
        opt.reserve_bytes = min_mem > limit ? min_mem - limit : 1; /* 0 would mean the 64 MiB default */
        printf("memory limit: %.1f MiB usable per device (reserve_bytes = %llu)\n", limit_mib,
               (unsigned long long)opt.reserve_bytes);
    }

    printf("model: %s, %d layers, %zu parameters; batch %d in %d micro-batch(es) of %d sample(s)%s, %s, %s\n",
           gpt ? "char_gpt decoder" : "fashion_mnist MLP", L, mpar_model_param_count(model), pd.max_batch,
           pd.microbatches, (pd.max_batch + pd.microbatches - 1) / pd.microbatches,
           gpt ? " x seq_len rows" : "", mpar_schedule_kind_name(pd.schedule),
           pd.optimizer.kind == MPAR_OPTIMIZER_SGD ? "SGD" : "AdamW");

    if (measure) {
        for (d = 0; d < s.devices; d++) {
            if (mpar_profile_layers(s.ctx, model, &pd, d, col[0], col[1], col[2]) != MPAR_SUCCESS)
                return die("--measure", mpar_last_error(s.ctx));
            for (i = 0; i < L; i++)
                mf[i * s.devices + d] = col[0][i], mi[i * s.devices + d] = col[1][i], mw[i * s.devices + d] = col[2][i];
        }
        s.mf = opt.measured_forward = mf;
        s.mi = opt.measured_backward_input = mi;
        s.mw = opt.measured_backward_weight = mw;
    }

    printf("\nwhat the planner sees, per micro-batch (%s):\n",
           measure ? "FLOPs for reference; the measured times below replace them" : "FLOP model");
    plan_layers(model, &pd, pl);
    print_layers(model, pl, &s);

    printf("\n");
    if ((r = mpar_pipeline_plan(s.ctx, model, &pd, &opt, &plan)) != MPAR_SUCCESS) {
        printf("no plan (%s): %s\n", mpar_result_string(r), mpar_last_error(s.ctx));
        status = 1;
    } else
        mpar_plan_print(&plan, stdout);
    compare_schedules(&s, &pd, &opt, pd.schedule);
    if (status == 0 && json) mpar_plan_write_json(&plan, json_out);
    if (json_out) fclose(json_out);
    if (status == 0) mpar_plan_free(&plan);

    mpar_model_destroy(model);
    mpar_destroy(s.ctx);
    return status;
}
