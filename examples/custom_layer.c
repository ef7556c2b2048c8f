/* A layer type of your own: Swish (x · sigmoid(x)) with its kernels in
   examples/kernels/swish.cl, used in a model split across the devices like
   any built-in layer. Prints its loss falling and checks one gradient
   against a finite difference.

   CPU devices may take the host route (mpar_cpu_route): mpar's own layers
   then run as host code. A user layer works there unchanged (its kernels
   run through OpenCL on the same memory), and may add a host path of its
   own: mpar_exec_host gives the host address of a buffer on such a stage
   and NULL elsewhere, as the forward below does. */
#define MPAR_IMPLEMENTATION
#include "mpar.h"
#include "common.h"

#include <math.h>

/* The vtable: shape, forward, input gradient; no parameters, so no init and
   no weight gradient. */
static mpar_result swish_setup(mpar_layer* l, mpar_error* err) {
    (void)err;
    l->out_features = l->in_features;
    l->flops_forward = 4.0 * l->in_features;
    l->flops_backward_input = 6.0 * l->in_features;
    return MPAR_SUCCESS;
}
static mpar_result swish_forward(mpar_exec* ex, const mpar_layer* l, const mpar_io* io) {
    size_t n = (size_t)io->rows * (size_t)l->in_features, i;
    float *x = mpar_exec_host(ex, io->x), *y = mpar_exec_host(ex, io->y);
    if (x && y) { /* host route: plain C, no kernel launch */
        for (i = 0; i < n; i++) y[i] = x[i] / (1.0f + expf(-x[i]));
        return MPAR_SUCCESS;
    }
    return mpar_exec_launch(ex, "swish.cl", "swish_fwd", n, 0, "BBl", io->x, io->y, n);
}
/* OpenCL only: on the host route this kernel runs through OpenCL on the
   stage's memory, between host-code calls. */
static mpar_result swish_backward_input(mpar_exec* ex, const mpar_layer* l, const mpar_io* io) {
    size_t n = (size_t)io->rows * (size_t)l->in_features;
    if (!io->need_dx) return MPAR_SUCCESS;
    return mpar_exec_launch(ex, "swish.cl", "swish_bwd", n, 0, "BBBl", io->x, io->dy, io->dx, n);
}
static const mpar_layer_type swish_type = {"swish", 0, swish_setup, NULL, swish_forward, swish_backward_input, NULL};

static const char usage[] =
    "usage: examples/custom_layer\n"
    "  a layer type of your own (Swish, examples/kernels/swish.cl) in a split model; no options\n"
    "  --help\n";

int main(int argc, char** argv) {
    ex_args(argc, argv, usage, "");
    mpar_context* ctx = NULL;
    mpar_desc desc;
    mpar_error err;
    mpar_model* model = NULL;
    mpar_model_desc md;
    mpar_layer_desc swish;
    mpar_pipeline_desc pd;
    mpar_pipeline* p = NULL;
    enum { N = 64, IN = 16 };
    float x[N * IN], w0[IN * 32 + 32];
    int32_t y[N];
    uint64_t s = 5;
    int i, step;
    double base, plus, minus, h = 1e-2;
    float g0;

    memset(&desc, 0, sizeof desc);
    desc.error = &err;
    ex_pocl_devices();
    if (mpar_create(&desc, &ctx) != MPAR_SUCCESS) {
        fprintf(stderr, "custom_layer: %s\n", err.message);
        return 1;
    }
    memset(&md, 0, sizeof md);
    md.input_features = IN, md.seed = 3;
    memset(&swish, 0, sizeof swish);
    swish.type = &swish_type;
    if (mpar_model_create(&md, &model, &err) || mpar_model_add_linear(model, 32, &err) ||
        mpar_model_add(model, &swish, &err) || mpar_model_add_linear(model, 32, &err) ||
        mpar_model_add(model, &swish, &err) || mpar_model_add_linear(model, 4, &err) ||
        mpar_model_add_simple(model, mpar_layer_cross_entropy(), &err)) {
        fprintf(stderr, "custom_layer: %s\n", err.message);
        return 1;
    }
    memset(&pd, 0, sizeof pd);
    pd.schedule = MPAR_SCHEDULE_1F1B, pd.microbatches = 4, pd.max_batch = N;
    pd.optimizer.lr = 0.02f;
    if (mpar_pipeline_create(ctx, model, &pd, &p) != MPAR_SUCCESS) {
        fprintf(stderr, "custom_layer: %s\n", mpar_last_error(ctx));
        return 1;
    }
    for (i = 0; i < N * IN; i++) x[i] = (float)(2.0 * mpar__rng_uniform(&s) - 1.0);
    for (i = 0; i < N; i++) y[i] = (x[i * IN] > 0) + 2 * (x[i * IN + 1] > 0);
    {
        mpar_batch b = {x, y, N, NULL};
        mpar_step_info info;
        /* gradient of one weight of the first layer vs a central difference */
        mpar_pipeline_compute_gradients(p, &b, &info);
        base = info.loss;
        mpar_pipeline_get_grads(p, 0, w0);
        g0 = w0[5];
        mpar_pipeline_get_params(p, 0, w0);
        w0[5] += (float)h;
        mpar_pipeline_set_params(p, 0, w0);
        mpar_pipeline_infer(p, &b, NULL, &plus);
        w0[5] -= (float)(2 * h);
        mpar_pipeline_set_params(p, 0, w0);
        mpar_pipeline_infer(p, &b, NULL, &minus);
        w0[5] += (float)h;
        mpar_pipeline_set_params(p, 0, w0);
        printf("swish layer on %d device(s): d loss / d w[5] = %.6f, finite difference %.6f\n",
               mpar_device_count(ctx), (double)g0, (plus - minus) / (2 * h));
        for (step = 0; step < 60; step++) {
            if (mpar_pipeline_train_step(p, &b, &info) != MPAR_SUCCESS) {
                fprintf(stderr, "custom_layer: %s\n", mpar_last_error(ctx));
                return 1;
            }
            if (step % 20 == 0 || step == 59) printf("step %2d  loss %.4f\n", step, info.loss);
        }
        printf("loss %.4f -> %.4f\n", base, info.loss);
    }
    mpar_pipeline_destroy(p);
    mpar_model_destroy(model);
    mpar_destroy(ctx);
    return fabs(base) > 0 ? 0 : 1;
}
