/* mpar demo: finds the OpenCL devices, splits an MLP across them, trains it
   on a slice of Fashion-MNIST with a 1F1B pipeline, compares the step time
   with the same model on one device, and ends with a Gantt chart of a step,
   its measured and predicted bubble, and a trace file. Run from the
   repository root: `make demo`. */
#define MPAR_IMPLEMENTATION
#include "mpar.h"
#include "common.h"
#include "data.h"

#include <sys/stat.h>

#include <time.h>

#define CHECK(call)                                                                         \
    do {                                                                                    \
        mpar_result r_ = (call);                                                            \
        if (r_ != MPAR_SUCCESS) {                                                           \
            fprintf(stderr, "demo: %s failed: %s\n  %s\n", #call, mpar_result_string(r_),   \
                    ctx ? mpar_last_error(ctx) : err.message);                              \
            return 1;                                                                       \
        }                                                                                   \
    } while (0)

static double seconds(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static int build_model(mpar_model** m, mpar_error* err) {
    mpar_model_desc md;
    int r = 0;
    memset(&md, 0, sizeof md);
    md.input_features = 784;
    md.seed = 2026;
    r |= mpar_model_create(&md, m, err);
    r |= mpar_model_add_linear(*m, 512, err);
    r |= mpar_model_add_simple(*m, mpar_layer_relu(), err);
    r |= mpar_model_add_linear(*m, 512, err);
    r |= mpar_model_add_simple(*m, mpar_layer_relu(), err);
    r |= mpar_model_add_linear(*m, 512, err);
    r |= mpar_model_add_simple(*m, mpar_layer_relu(), err);
    r |= mpar_model_add_linear(*m, 512, err);
    r |= mpar_model_add_simple(*m, mpar_layer_relu(), err);
    r |= mpar_model_add_linear(*m, 10, err);
    r |= mpar_model_add_simple(*m, mpar_layer_cross_entropy(), err);
    return r;
}

/* Mean seconds per training step over `steps` steps (after one warm-up). */
static double time_steps(mpar_pipeline* p, const data_mnist* d, int batch, int steps, float* x, int32_t* y) {
    mpar_batch b;
    mpar_step_info info;
    double t0 = 0;
    int s;
    for (s = 0; s <= steps; s++) {
        if (s == 1) t0 = seconds();
        data_mnist_batch(d, NULL, (s * batch) % (d->count - batch), batch, x, y, NULL, 0);
        b.inputs = x, b.targets = y, b.samples = batch;
        if (mpar_pipeline_train_step(p, &b, &info) != MPAR_SUCCESS) return -1.0;
    }
    return (seconds() - t0) / steps;
}

static const char usage[] =
    "usage: examples/demo      (from the repository root: make demo)\n"
    "  splits an MLP across the OpenCL devices, trains it on Fashion-MNIST with 1F1B,\n"
    "  and shows the speed-up, how busy each device was and a timeline; no options\n"
    "  --help\n";

int main(int argc, char** argv) {
    ex_args(argc, argv, usage, "");
    mpar_context* ctx = NULL;
    mpar_error err;
    mpar_desc desc;
    mpar_model* model = NULL;
    mpar_pipeline *pipe = NULL, *single = NULL;
    mpar_pipeline_desc pd;
    mpar_stage_desc one = {0, 0, 9};
    data_mnist train, test;
    char msg[512];
    int i, n, batch = 128, steps = 120;
    float *x, *logits;
    int32_t* y;
    double t_pipe, t_one, loss = 0.0;

    memset(&desc, 0, sizeof desc);
    desc.error = &err;
    ex_pocl_devices();
    CHECK(mpar_create(&desc, &ctx));
    n = mpar_device_count(ctx);
    printf("mpar %s: %d device(s)\n", MPAR_VERSION_STRING, n);
    for (i = 0; i < n; i++) {
        mpar_device_info info;
        mpar_device_get_info(ctx, i, &info);
        printf("  device %d: %s (%s, %s), %d compute unit(s), %.1f GiB, context %d\n", i, info.name,
               info.platform, mpar_device_type_name(info.type), info.compute_units,
               (double)info.global_mem_bytes / 1073741824.0, info.group);
    }
    if (data_mnist_load_split("train", 12000, &train, msg, sizeof msg) != DATA_OK ||
        data_mnist_load_split("t10k", 2000, &test, msg, sizeof msg) != DATA_OK) {
        fprintf(stderr, "demo: %s\n", msg);
        return 1;
    }
    if (build_model(&model, &err) != 0) {
        fprintf(stderr, "demo: model: %s\n", err.message);
        return 1;
    }
    printf("model: 784-512-512-512-512-10 MLP, %zu parameters, %d layers\n", mpar_model_param_count(model),
           mpar_model_layer_count(model));

    memset(&pd, 0, sizeof pd);
    pd.schedule = MPAR_SCHEDULE_1F1B;
    pd.microbatches = 8;
    pd.max_batch = batch;
    pd.optimizer.kind = MPAR_OPTIMIZER_ADAMW;
    pd.optimizer.lr = 1e-3f;
    pd.profile = 1; /* record a timeline of every step */
    CHECK(mpar_pipeline_create(ctx, model, &pd, &pipe)); /* mpar plans the split itself */
    {
        mpar_plan plan;
        CHECK(mpar_pipeline_get_plan(pipe, &plan)); /* the plan in use */
        printf("\nthe plan mpar chose (from each layer's measured time on each device):\n");
        mpar_plan_print(&plan, stdout);
        mpar_plan_free(&plan);
    }
    {
        mpar_schedule* s = NULL;
        mpar_schedule_create(MPAR_SCHEDULE_1F1B, n, 8, 1, &s, &err);
        printf("\n1F1B schedule on %d stage(s), 8 micro-batches (one row per device):\n", n);
        mpar_schedule_print(s, stdout);
        mpar_schedule_destroy(s);
    }

    x = (float*)malloc(sizeof(float) * 784 * (size_t)(batch > test.count ? batch : test.count));
    y = (int32_t*)malloc(sizeof(int32_t) * (size_t)(batch > test.count ? batch : test.count));
    logits = (float*)malloc(sizeof(float) * 10 * (size_t)test.count);
    printf("\ntraining on %d Fashion-MNIST images, batch %d, %d steps:\n", train.count, batch, steps);
    for (i = 0; i < steps; i++) {
        mpar_batch b;
        mpar_step_info info;
        data_mnist_batch(&train, NULL, (i * batch) % (train.count - batch), batch, x, y, NULL, 0);
        b.inputs = x, b.targets = y, b.samples = batch;
        CHECK(mpar_pipeline_train_step(pipe, &b, &info));
        loss = info.loss;
        if (i % 20 == 0 || i == steps - 1) printf("  step %3d  loss %.4f  grad norm %.3f\n", i, info.loss, info.grad_norm);
    }
    {
        mpar_batch b;
        double acc = 0.0;
        b.inputs = test.images, b.targets = test.labels, b.samples = test.count;
        CHECK(mpar_pipeline_infer(pipe, &b, logits, &loss));
        CHECK(mpar_accuracy(logits, test.labels, test.count, 10, &acc, NULL));
        printf("test: loss %.4f, accuracy %.4f on %d images\n", loss, acc, test.count);
    }

    /* Same model and schedule on one device: the pipeline's speed-up. */
    pd.stages = &one;
    pd.stage_count = 1;
    CHECK(mpar_pipeline_create(ctx, model, &pd, &single));
    { /* alternated, so that a moment's interference hits both; the median of 5 rounds */
        double one_t[5], pipe_t[5], ratio[5], tmp;
        int a, b;
        for (a = 0; a < 5; a++) {
            one_t[a] = time_steps(single, &train, batch, 4, x, y);
            pipe_t[a] = time_steps(pipe, &train, batch, 4, x, y);
            ratio[a] = one_t[a] / pipe_t[a];
        }
        for (a = 0; a < 5; a++)
            for (b = a + 1; b < 5; b++)
                if (ratio[b] < ratio[a]) {
                    tmp = ratio[a], ratio[a] = ratio[b], ratio[b] = tmp;
                    tmp = one_t[a], one_t[a] = one_t[b], one_t[b] = tmp;
                    tmp = pipe_t[a], pipe_t[a] = pipe_t[b], pipe_t[b] = tmp;
                }
        t_one = one_t[2], t_pipe = pipe_t[2];
    }
    printf("\nstep time (median of 5 alternated rounds): %.1f ms on 1 device, %.1f ms on %d devices (1F1B, M=8): "
           "speed-up %.2fx\n", 1e3 * t_one,
           1e3 * t_pipe, n, t_one / t_pipe);

    {
        /* how evenly the plan loads the devices: busy time per stage over 8 steps */
        double busy[64] = {0}, lo = 1.0, hi = 0.0;
        int s, k, stages = 0;
        for (s = 0; s < 8; s++) {
            mpar_timeline t;
            mpar_timeline_stats ts;
            if (time_steps(pipe, &train, batch, 1, x, y) < 0) break;
            if (mpar_pipeline_get_timeline(pipe, &t) != MPAR_SUCCESS) break;
            if (mpar_timeline_get_stats(&t, &ts, &err) == MPAR_SUCCESS)
                for (k = 0, stages = ts.stages; k < ts.stages && k < 64; k++) busy[k] += ts.stage[k].busy / ts.step_time / 8;
            mpar_timeline_free(&t);
        }
        printf("busy per device (mean of 8 steps):");
        for (k = 0; k < stages; k++) {
            printf(" %.1f%%", 100.0 * busy[k]);
            lo = busy[k] < lo ? busy[k] : lo, hi = busy[k] > hi ? busy[k] : hi;
        }
        if (stages > 0) printf("; least/most %.2f\n", lo / hi);
    }
    {
        mpar_timeline t;
        mpar_timeline_prediction pr;
        FILE* f;
        const char* path = "build/demo_trace.json";
        CHECK(mpar_pipeline_get_timeline(pipe, &t));
        printf("\nthe last step, one row per device (F forward, B backward, O optimizer; digits: micro-batch):\n");
        mpar_timeline_print_gantt(&t, stdout, 100);
        if (mpar_timeline_predict(&t, &pr, &err) == MPAR_SUCCESS)
            printf("bubble: measured %.3f, predicted by the simulator from the measured costs %.3f, "
                   "(P-1)/(M+P-1) = %.3f\n",
                   pr.measured_bubble_fraction, pr.bubble_fraction, (double)(n - 1) / (8 + n - 1));
        mkdir("build", 0755);
        if ((f = fopen(path, "w")) != NULL) {
            mpar_timeline_write_chrome_trace(&t, f);
            fclose(f);
            printf("trace written to %s (open it in https://ui.perfetto.dev)\n", path);
        }
        if ((f = fopen("build/demo_trace.svg", "w")) != NULL) {
            mpar_timeline_write_svg(&t, f);
            fclose(f);
            printf("timeline picture written to build/demo_trace.svg\n");
        }
        mpar_timeline_free(&t);
    }
    mpar_pipeline_destroy(single);
    mpar_pipeline_destroy(pipe);
    mpar_model_destroy(model);
    free(x), free(y), free(logits);
    data_mnist_free(&train), data_mnist_free(&test);
    mpar_destroy(ctx);
    return 0;
}
