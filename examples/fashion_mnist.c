/* Fashion-MNIST: an MLP split across the OpenCL devices, trained with a
   micro-batch schedule, then evaluated on the 10,000 test images.

     examples/fashion_mnist [--devices SEL] [--schedule 1f1b|gpipe|zbh1|zbh2|zbv|interleaved|auto|sequential]
                            [--microbatches M] [--stages D:A-B,...] [--activations fp32|bf16] [--epochs N] [--batch B]
                            [--lr X] [--hidden H] [--seed S] [--plan optimal|proportional --weights W,W]
                            [--checkpoint PATH [--resume]] [--trace PATH]

   --checkpoint saves the training state after every epoch (atomically);
   --resume continues from it. --trace writes the last step's timeline as a
   Chrome trace and an SVG, after printing its Gantt chart.

   The last line is `test_accuracy: <fraction>`. */
#define MPAR_IMPLEMENTATION
#include "mpar.h"
#include "data.h"
#include "common.h"

static int fail(const char* what, mpar_context* ctx, const char* msg) {
    fprintf(stderr, "fashion_mnist: %s: %s\n", what, ctx ? mpar_last_error(ctx) : msg);
    return 1;
}

static double accuracy(mpar_pipeline* p, const data_mnist* d, float* logits, double* loss) {
    mpar_batch b;
    double acc;
    b.inputs = d->images, b.targets = d->labels, b.samples = d->count;
    if (mpar_pipeline_infer(p, &b, logits, loss) != MPAR_SUCCESS) return -1.0;
    if (mpar_accuracy(logits, d->labels, d->count, 10, &acc, NULL) != MPAR_SUCCESS) return -1.0;
    return acc;
}

static const char usage[] =
    "usage: examples/fashion_mnist [options]\n"
    "  trains an MLP on Fashion-MNIST across the devices, then tests it\n"
    "  --devices SEL          which OpenCL devices (see README: Devices)\n"
    "  --schedule S           1f1b (default), gpipe, zbh1, zbh2, zbv, interleaved, auto or sequential\n"
    "  --microbatches M       micro-batches per step [4]\n"
    "  --stages D:A-B,...     explicit stages (device:first-last layer); default: planned\n"
    "  --plan optimal|proportional [--weights W,W]   how to plan without --stages\n"
    "  --activations fp32|bf16\n"
    "  --epochs N [20]  --batch B [128]  --lr X  --hidden H [512]  --seed S\n"
    "  --checkpoint PATH [--resume]   save after every epoch; continue from it\n"
    "  --trace PATH           write the last step's timeline (Chrome trace and SVG)\n"
    "  --help\n";

int main(int argc, char** argv) {
    ex_args(argc, argv, usage, "--devices= --schedule= --microbatches= --stages= --plan= --weights= --activations= --epochs= --batch= --lr= --hidden= --seed= --checkpoint= --resume --trace=");
    mpar_desc desc;
    mpar_error err;
    mpar_context* ctx = NULL;
    mpar_model* model = NULL;
    mpar_model_desc md;
    mpar_pipeline_desc pd;
    mpar_pipeline* pipe = NULL;
    mpar_stage_desc stages[64];
    data_mnist train, test;
    char msg[512];
    int32_t* order;
    float *x, *logits;
    int32_t* y;
    int epochs = ex_int(argc, argv, "--epochs", 20), batch = ex_int(argc, argv, "--batch", 128);
    int hidden = ex_int(argc, argv, "--hidden", 512), steps_per_epoch, steps, step = 0, e, i;
    double mean, stdev, t0, test_loss = 0.0, acc;
    const char* bad;
    const char* ckpt = ex_option(argc, argv, "--checkpoint");
    const char* trace = ex_option(argc, argv, "--trace");
    mpar_plan_options plan_options;
    double weights[64];
    int first_epoch = 0;

    memset(&desc, 0, sizeof desc);
    desc.devices = ex_option(argc, argv, "--devices");
    desc.error = &err;
    ex_pocl_devices();
    if (mpar_create(&desc, &ctx) != MPAR_SUCCESS) return fail("devices", NULL, err.message);
    if (data_mnist_load_split("train", 0, &train, msg, sizeof msg) != DATA_OK ||
        data_mnist_load_split("t10k", 0, &test, msg, sizeof msg) != DATA_OK)
        return fail("data", NULL, msg);
    data_mnist_stats(&train, &mean, &stdev, msg, sizeof msg);
    data_mnist_normalize(&train, mean, stdev, msg, sizeof msg);
    data_mnist_normalize(&test, mean, stdev, msg, sizeof msg);

    memset(&md, 0, sizeof md);
    md.input_features = 784;
    md.seed = (uint64_t)ex_int(argc, argv, "--seed", 1);
    if (mpar_model_create(&md, &model, &err) || mpar_model_add_linear(model, hidden, &err) ||
        mpar_model_add_simple(model, mpar_layer_relu(), &err) || mpar_model_add_linear(model, hidden / 2, &err) ||
        mpar_model_add_simple(model, mpar_layer_relu(), &err)) return fail("model", NULL, err.message);
    {
        mpar_layer_desc drop;
        memset(&drop, 0, sizeof drop);
        drop.type = mpar_layer_dropout();
        drop.rate = 0.2f;
        if (mpar_model_add(model, &drop, &err) || mpar_model_add_linear(model, 10, &err) ||
            mpar_model_add_simple(model, mpar_layer_cross_entropy(), &err))
            return fail("model", NULL, err.message);
    }

    steps_per_epoch = train.count / batch;
    steps = epochs * steps_per_epoch;
    memset(&pd, 0, sizeof pd);
    if ((bad = ex_pipeline_options(argc, argv, 4, &pd, stages, &plan_options, weights)) != NULL)
        return fail("options", NULL, bad);
    pd.max_batch = batch > 1000 ? batch : 1000;
    pd.optimizer.kind = MPAR_OPTIMIZER_ADAMW;
    pd.optimizer.lr = (float)ex_double(argc, argv, "--lr", 1e-3);
    pd.optimizer.weight_decay = 1e-4f;
    pd.optimizer.warmup_steps = steps / 50;
    pd.optimizer.decay_steps = steps - steps / 50;
    pd.optimizer.min_lr = pd.optimizer.lr * 0.05f;
    if (mpar_pipeline_create(ctx, model, &pd, &pipe) != MPAR_SUCCESS) return fail("pipeline", ctx, NULL);
    if (ckpt && ex_flag(argc, argv, "--resume")) {
        if (mpar_pipeline_load_checkpoint(pipe, ckpt, NULL) != MPAR_SUCCESS) return fail("--resume", ctx, NULL);
        first_epoch = mpar_pipeline_get_step(pipe) / steps_per_epoch;
        step = first_epoch * steps_per_epoch;
        printf("resumed from %s at step %d (epoch %d)\n", ckpt, step, first_epoch + 1);
    }
    printf("fashion_mnist: %d train / %d test images, MLP 784-%d-%d-10, %s, M=%d, %d device(s), %d epochs\n",
           train.count, test.count, hidden, hidden / 2, mpar_schedule_kind_name(pd.schedule), pd.microbatches,
           mpar_device_count(ctx), epochs);
    {
        mpar_plan plan;
        if (mpar_pipeline_get_plan(pipe, &plan) == MPAR_SUCCESS) { /* the plan in use, given or planned */
            mpar_plan_print(&plan, stdout);
            mpar_plan_free(&plan);
        }
    }

    order = (int32_t*)malloc(sizeof(int32_t) * (size_t)train.count);
    x = (float*)malloc(sizeof(float) * 784 * (size_t)batch);
    y = (int32_t*)malloc(sizeof(int32_t) * (size_t)batch);
    logits = (float*)malloc(sizeof(float) * 10 * (size_t)(train.count > test.count ? train.count : test.count));
    t0 = ex_seconds();
    for (e = first_epoch; e < epochs; e++) {
        data_permutation(order, train.count, md.seed + (uint64_t)e, msg, sizeof msg);
        for (i = 0; i < steps_per_epoch; i++, step++) {
            mpar_batch b;
            mpar_step_info info;
            data_mnist_batch(&train, order, i * batch, batch, x, y, msg, sizeof msg);
            b.inputs = x, b.targets = y, b.samples = batch;
            if (mpar_pipeline_train_step(pipe, &b, &info) != MPAR_SUCCESS) return fail("train", ctx, NULL);
            if (step % 10 == 0 || step + 1 == steps)
                ex_progress(step + 1, steps, info.loss, (double)(step + 1) * batch / (ex_seconds() - t0),
                            ex_seconds() - t0);
            if (trace && step + 1 == steps) ex_report_timeline(pipe, trace); /* the last training step */
        }
        acc = accuracy(pipe, &test, logits, &test_loss);
        fprintf(stderr, "epoch %d: test loss %.4f, accuracy %.4f\n", e + 1, test_loss, acc);
        if (ckpt && mpar_pipeline_save_checkpoint(pipe, ckpt, NULL) != MPAR_SUCCESS) return fail("checkpoint", ctx, NULL);
    }
    acc = accuracy(pipe, &test, logits, &test_loss);
    if (acc < 0) return fail("evaluate", ctx, NULL);
    printf("trained %d steps in %.1f s (%.0f samples/s)\n", steps, ex_seconds() - t0,
           (double)steps * batch / (ex_seconds() - t0));
    printf("test_loss: %.4f\n", test_loss);
    printf("test_accuracy: %.4f\n", acc);
    free(order), free(x), free(y), free(logits);
    mpar_pipeline_destroy(pipe);
    mpar_model_destroy(model);
    data_mnist_free(&train), data_mnist_free(&test);
    mpar_destroy(ctx);
    return 0;
}
