/* Inference from a checkpoint: rebuilds the model the checkpoint describes
   (mpar_model_from_checkpoint_data: no model code of its own), loads its
   parameters into an inference-only pipeline over the devices and into a
   one-device one, streams the Fashion-MNIST test images forward
   through both, and compares accuracy, throughput and the outputs.

     examples/infer --checkpoint PATH [--devices SEL] [--microbatches M] [--batch B]
                    [--samples N] [--repeats R]

   PATH is a checkpoint written by `examples/fashion_mnist --checkpoint PATH`,
   or a weights file (mpar_pipeline_save_weights) of the same model. The
   inputs are normalised with the training split's mean and deviation, as
   fashion_mnist does (a checkpoint holds no preprocessing). B is the
   pipeline's max_batch, so a micro-batch holds B / M images; the test images
   go through in one mpar_pipeline_infer call per timed pass.

   Ends with `infer_speedup_2dev: <x>` (throughput on the devices over one
   device) and `test_accuracy: <fraction>`. Exit code 1 on any error. */
#define MPAR_IMPLEMENTATION
#include "mpar.h"
#include "data.h"
#include "common.h"

static int fail(const char* what, const char* msg) {
    fprintf(stderr, "infer: %s: %s\n", what, msg);
    return 1;
}

static int read_file(const char* path, unsigned char** data, size_t* size, char* msg, size_t msg_size) {
    FILE* f = fopen(path, "rb");
    long n;
    *data = NULL, *size = 0;
    if (!f) return snprintf(msg, msg_size, "cannot open %s: %s", path, strerror(errno)), -1;
    if (fseek(f, 0, SEEK_END) != 0 || (n = ftell(f)) < 0 || fseek(f, 0, SEEK_SET) != 0) {
        fclose(f);
        return snprintf(msg, msg_size, "cannot read %s: not a regular file", path), -1;
    }
    *data = (unsigned char*)malloc(n > 0 ? (size_t)n : 1);
    if (!*data || fread(*data, 1, (size_t)n, f) != (size_t)n) {
        fclose(f);
        free(*data), *data = NULL;
        return snprintf(msg, msg_size, "cannot read %s", path), -1;
    }
    fclose(f);
    *size = (size_t)n;
    return 0;
}

/* One timed configuration: a pipeline loaded from the checkpoint. */
typedef struct run {
    mpar_pipeline* pipe;
    double best_seconds;
    double accuracy, loss;
    float* logits;
} run;

/* One forward pass over the test images; keeps the fastest time. */
static int pass(run* r, mpar_context* ctx, const data_mnist* test, int timed, const char* label) {
    mpar_batch b;
    double t0 = ex_seconds(), dt;
    b.inputs = test->images, b.targets = test->labels, b.samples = test->count;
    if (mpar_pipeline_infer(r->pipe, &b, r->logits, &r->loss) != MPAR_SUCCESS) {
        fprintf(stderr, "infer: %s: %s\n", label, mpar_last_error(ctx));
        return -1;
    }
    dt = ex_seconds() - t0;
    if (timed && (r->best_seconds == 0.0 || dt < r->best_seconds)) r->best_seconds = dt;
    return 0;
}

static double accuracy(const float* logits, const data_mnist* test, int classes) {
    double acc;
    return mpar_accuracy(logits, test->labels, test->count, classes, &acc, NULL) == MPAR_SUCCESS ? acc : -1.0;
}

static const char usage[] =
    "usage: examples/infer --checkpoint PATH [options]\n"
    "  loads a fashion_mnist checkpoint and infers the test images, on the devices and on one\n"
    "  --checkpoint PATH      written by examples/fashion_mnist --checkpoint PATH\n"
    "  --devices SEL  --microbatches M [8]  --batch B [1000]  --samples N [10000]  --repeats R [2]\n"
    "  --help\n";

int main(int argc, char** argv) {
    ex_args(argc, argv, usage, "--checkpoint= --devices= --microbatches= --batch= --samples= --repeats=");
    const char* path = ex_option(argc, argv, "--checkpoint");
    int microbatches = ex_int(argc, argv, "--microbatches", 8), batch = ex_int(argc, argv, "--batch", 1000);
    int samples = ex_int(argc, argv, "--samples", 10000), repeats = ex_int(argc, argv, "--repeats", 2);
    mpar_desc desc;
    mpar_error err;
    mpar_context* ctx = NULL;
    mpar_model* model = NULL;
    mpar_checkpoint_info ci;
    mpar_pipeline_desc pd;
    mpar_stage_desc one;
    mpar_plan plan;
    data_mnist train, test;
    unsigned char* file = NULL;
    size_t file_size = 0, n, i, diff = 0;
    char msg[1400];
    double mean, stdev, max_abs = 0.0;
    int L, classes, status = 1, identical, planned = 0, r;
    char text[256];
    run multi, single;

    memset(&multi, 0, sizeof multi), memset(&single, 0, sizeof single);
    memset(&train, 0, sizeof train), memset(&test, 0, sizeof test);
    if (!path) return fail("usage", "examples/infer --checkpoint PATH [--devices SEL] [--microbatches M] "
                                    "[--batch B] [--samples N] [--repeats R]");
    if (microbatches < 1 || batch < 1 || samples < 1 || repeats < 1)
        return fail("options", "--microbatches, --batch, --samples and --repeats must be at least 1");

    /* The checkpoint alone says what the model is. */
    if (read_file(path, &file, &file_size, msg, sizeof msg) != 0) return fail("checkpoint", msg);
    if (mpar_checkpoint_parse(file, file_size, &ci, &err) != MPAR_SUCCESS) {
        free(file);
        return fail(path, err.message);
    }
    if (mpar_model_from_checkpoint_data(file, file_size, NULL, 0, &model, &err) != MPAR_SUCCESS) {
        free(file);
        mpar_checkpoint_info_free(&ci);
        return fail(path, err.message);
    }
    free(file);
    L = mpar_model_layer_count(model);
    classes = mpar_model_layer(model, L - 1)->in_features;
    printf("checkpoint %s: format %u, written by mpar %u.%u.%u, %zu bytes, step %d, %s, seed %llu\n", path,
           ci.format_version, ci.mpar_version >> 16, (ci.mpar_version >> 8) & 255u, ci.mpar_version & 255u, ci.size,
           ci.step, ci.weights_only ? "weights only" : ci.optimizer == MPAR_OPTIMIZER_SGD ? "SGD" : "AdamW",
           (unsigned long long)ci.seed);
    printf("model: %d features x %d rows in, %d layers, %zu parameters:", ci.input_features, ci.seq_len, L,
           mpar_model_param_count(model));
    for (i = 0; i < (size_t)L; i++) printf(" %s(%d)", ci.layers[i].type_name, ci.layers[i].out_features);
    printf("\n");

    /* The data must fit the model: 784 pixels in, 10 classes out. */
    if (mpar_model_get_desc(model)->seq_len != 1 || ci.input_features != 784 || classes != 10 ||
        !(mpar_model_layer(model, L - 1)->type->flags & MPAR_LAYER_LOSS)) {
        snprintf(msg, sizeof msg, "the model takes %d feature(s) x %d row(s) and ends in %d outputs; Fashion-MNIST "
                 "needs 784 x 1 in and 10 classes out", ci.input_features, ci.seq_len, classes);
        goto done_msg;
    }
    if (data_mnist_load_split("train", 0, &train, msg, sizeof msg) != DATA_OK ||
        data_mnist_load_split("t10k", 0, &test, msg, sizeof msg) != DATA_OK ||
        data_mnist_stats(&train, &mean, &stdev, msg, sizeof msg) != DATA_OK ||
        data_mnist_normalize(&test, mean, stdev, msg, sizeof msg) != DATA_OK)
        goto done_msg;
    data_mnist_free(&train);
    if (test.rows * test.cols != 784) {
        snprintf(msg, sizeof msg, "test images are %dx%d, the model takes 784 pixels", test.rows, test.cols);
        goto done_msg;
    }
    if (samples < test.count) test.count = samples;

    memset(&desc, 0, sizeof desc);
    desc.devices = ex_option(argc, argv, "--devices");
    desc.error = &err;
    ex_pocl_devices();
    if (mpar_create(&desc, &ctx) != MPAR_SUCCESS) {
        snprintf(msg, sizeof msg, "%s", err.message);
        goto done_msg;
    }

    /* The devices as the planner splits them (planner defaults), and one
       device holding every layer; inference only: parameters and one
       activation slot per chunk on the devices, no gradients or optimizer
       state (any optimizer, any seed: the file's parameters alone load). */
    memset(&pd, 0, sizeof pd);
    pd.schedule = MPAR_SCHEDULE_1F1B; /* inference streams forwards in any case; it sets M > 1 */
    pd.microbatches = microbatches;
    pd.max_batch = batch;
    pd.inference_only = 1;
    /* Planned once here and handed to the pipeline, so what is printed is what
       runs (planning again would measure the devices again). */
    if (mpar_pipeline_plan(ctx, model, &pd, NULL, &plan) != MPAR_SUCCESS) goto done_ctx;
    planned = 1;
    mpar_plan_to_string(&plan, text, sizeof text);
    printf("plan: %s on %d of %d device(s), %s-bound, predicted training step %.2f ms\n", text, plan.num_stages,
           mpar_device_count(ctx), mpar_plan_binding_name(plan.binding.kind), 1e3 * plan.step_seconds);
    pd.plan = &plan;
    if (mpar_pipeline_create(ctx, model, &pd, &multi.pipe) != MPAR_SUCCESS) goto done_ctx;
    pd.plan = NULL;
    one.device = 0, one.first_layer = 0, one.last_layer = L - 1;
    pd.stages = &one, pd.stage_count = 1;
    if (mpar_pipeline_create(ctx, model, &pd, &single.pipe) != MPAR_SUCCESS) goto done_ctx;
    if (mpar_pipeline_load_weights(multi.pipe, path, &err) != MPAR_SUCCESS || /* a checkpoint or a weights file */
        mpar_pipeline_load_weights(single.pipe, path, &err) != MPAR_SUCCESS) {
        snprintf(msg, sizeof msg, "%s", err.message);
        goto done_msg;
    }
    printf("pipeline A: %s; pipeline B: 0:0-%d\n", text, L - 1);

    n = (size_t)test.count * (size_t)classes;
    multi.logits = (float*)malloc(n * sizeof(float));
    single.logits = (float*)malloc(n * sizeof(float));
    if (!multi.logits || !single.logits) {
        snprintf(msg, sizeof msg, "out of host memory");
        goto done_msg;
    }
    printf("inference: %d test images, micro-batches of %d images, best of %d alternating passes after a warm-up\n",
           test.count, (batch + microbatches - 1) / microbatches, repeats);
    /* Pass 0 warms up (kernel builds, first touches); then A and B take
       turns, so a load that comes and goes on the machine hits both. */
    for (r = 0; r <= repeats; r++)
        if (pass(&multi, ctx, &test, r > 0, "pipeline A") != 0 || pass(&single, ctx, &test, r > 0, "pipeline B") != 0)
            goto done;
    multi.accuracy = accuracy(multi.logits, &test, classes);
    single.accuracy = accuracy(single.logits, &test, classes);

    for (i = 0; i < n; i++) {
        double d = (double)multi.logits[i] - (double)single.logits[i];
        if (memcmp(&multi.logits[i], &single.logits[i], sizeof(float)) != 0) diff++;
        if (d < 0) d = -d;
        if (d > max_abs) max_abs = d;
    }
    identical = diff == 0;
    printf("A (%d stage(s)):  %.3f s, %.0f images/s, loss %.4f, accuracy %.4f\n", plan.num_stages,
           multi.best_seconds, test.count / multi.best_seconds, multi.loss, multi.accuracy);
    printf("B (device 0):    %.3f s, %.0f images/s, loss %.4f, accuracy %.4f\n", single.best_seconds,
           test.count / single.best_seconds, single.loss, single.accuracy);
    if (identical) printf("outputs: identical, bit for bit (%zu logits compared)\n", n);
    else printf("outputs: DIFFER in %zu of %zu logits (largest difference %.3g)\n", diff, n, max_abs);
    printf("infer_speedup_2dev: %.2f\n", single.best_seconds / multi.best_seconds);
    printf("test_accuracy: %.4f\n", multi.accuracy);
    status = identical && multi.accuracy == single.accuracy ? 0 : 1;
    goto done;

done_ctx:
    snprintf(msg, sizeof msg, "%s", mpar_last_error(ctx));
done_msg:
    fprintf(stderr, "infer: %s\n", msg);
done:
    free(multi.logits), free(single.logits);
    if (multi.pipe) mpar_pipeline_destroy(multi.pipe);
    if (single.pipe) mpar_pipeline_destroy(single.pipe);
    if (planned) mpar_plan_free(&plan);
    mpar_model_destroy(model);
    mpar_checkpoint_info_free(&ci);
    data_mnist_free(&train), data_mnist_free(&test);
    if (ctx) mpar_destroy(ctx);
    return status;
}
