/* Helper for scripts/kill-test.sh and scripts/fuzz.sh (not a unit test):
     ckpt_tool train PATH [STEPS]    resume from PATH if it exists, then train,
                                     checkpointing to PATH after every step
     ckpt_tool train-unsafe PATH     the same, but PATH is overwritten in place
                                     (no temp file, no rename): the kill test's
                                     negative control
     ckpt_tool verify PATH           load PATH into a fresh pipeline; prints
                                     "step N"; exit 0 if it loads, 1 if not
     ckpt_tool seed DIR              write a few small checkpoints and weights files (fuzz corpus)
   Exit codes: 0 done, 1 a check failed, 2 usage or setup error. */
#define MPAR_IMPLEMENTATION
#include "mpar.h"

#include <fcntl.h>
#include <unistd.h>

#include "ckpt_model.h"

static mpar_pipeline* pipeline(mpar_context* ctx, mpar_model* m, int stages, mpar_optimizer_kind opt) {
    mpar_stage_desc st[4];
    mpar_pipeline_desc pd;
    mpar_pipeline* p = NULL;
    int L = mpar_model_layer_count(m), j;
    if (stages > mpar_device_count(ctx)) stages = mpar_device_count(ctx);
    for (j = 0; j < stages; j++) {
        st[j].device = j;
        st[j].first_layer = L * j / stages;
        st[j].last_layer = L * (j + 1) / stages - 1;
    }
    memset(&pd, 0, sizeof pd);
    pd.stages = st;
    pd.stage_count = stages;
    pd.schedule = MPAR_SCHEDULE_1F1B;
    pd.microbatches = 4;
    pd.max_batch = BATCH;
    pd.optimizer.kind = opt;
    pd.optimizer.lr = 0.01f;
    pd.optimizer.momentum = 0.9f;
    if (mpar_pipeline_create(ctx, m, &pd, &p) != MPAR_SUCCESS) {
        fprintf(stderr, "ckpt_tool: pipeline: %s\n", mpar_last_error(ctx));
        return NULL;
    }
    return p;
}

/* The negative control: the same bytes, written over PATH in place. */
static int save_in_place(mpar_pipeline* p, const char* path) {
    char tmp[4200];
    unsigned char buf[4096];
    int in, out;
    ssize_t n;
    snprintf(tmp, sizeof tmp, "%s.unsafe", path);
    if (mpar_pipeline_save_checkpoint(p, tmp, NULL) != MPAR_SUCCESS) return -1;
    in = open(tmp, O_RDONLY);
    out = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (in < 0 || out < 0) return -1;
    while ((n = read(in, buf, sizeof buf)) > 0)
        if (write(out, buf, (size_t)n) != n) return -1;
    close(in);
    close(out);
    return 0;
}

static int train(mpar_context* ctx, const char* path, long steps, int unsafe) {
    mpar_model* m = big_model();
    mpar_pipeline* p;
    static int32_t x[BATCH];
    static int32_t y[BATCH];
    mpar_batch b;
    mpar_error err;
    uint64_t s = 5;
    long i;
    if (!m || !(p = pipeline(ctx, m, 2, MPAR_OPTIMIZER_ADAMW))) return 2;
    if (access(path, F_OK) == 0 && mpar_pipeline_load_checkpoint(p, path, &err) != MPAR_SUCCESS) {
        fprintf(stderr, "ckpt_tool: cannot resume: %s\n", err.message);
        return 1;
    }
    printf("resumed at step %d\n", mpar_pipeline_get_step(p));
    fflush(stdout);
    for (i = 0; steps < 0 || i < steps; i++) {
        int k;
        mpar_step_info info;
        for (k = 0; k < BATCH; k++) x[k] = (int32_t)(mpar__rng_next(&s) % VOCAB);
        for (k = 0; k < BATCH; k++) y[k] = (int32_t)(mpar__rng_next(&s) % 10);
        b.inputs = x, b.targets = y, b.samples = BATCH;
        if (mpar_pipeline_train_step(p, &b, &info) != MPAR_SUCCESS) {
            fprintf(stderr, "ckpt_tool: step: %s\n", mpar_last_error(ctx));
            return 2;
        }
        if (unsafe ? save_in_place(p, path) != 0 : mpar_pipeline_save_checkpoint(p, path, &err) != MPAR_SUCCESS) {
            fprintf(stderr, "ckpt_tool: save: %s\n", unsafe ? "failed" : err.message);
            return 2;
        }
        printf("saved step %d\n", info.step);
        fflush(stdout);
    }
    mpar_pipeline_destroy(p);
    mpar_model_destroy(m);
    return 0;
}

static int verify(mpar_context* ctx, const char* path) {
    mpar_model* m = big_model();
    mpar_pipeline* p;
    mpar_error err;
    int rc = 0;
    if (!m || !(p = pipeline(ctx, m, 1, MPAR_OPTIMIZER_ADAMW))) return 2;
    if (mpar_pipeline_load_checkpoint(p, path, &err) != MPAR_SUCCESS) {
        printf("broken: %s\n", err.message);
        rc = 1;
    } else {
        printf("step %d\n", mpar_pipeline_get_step(p));
    }
    mpar_pipeline_destroy(p);
    mpar_model_destroy(m);
    return rc;
}

/* Small checkpoints of a few layer kinds, AdamW and SGD: the fuzz corpus. */
static int seed(mpar_context* ctx, const char* dir) {
    int v;
    for (v = 0; v < 3; v++) {
        mpar_model* m = NULL;
        mpar_model_desc md;
        mpar_pipeline* p;
        mpar_layer_desc drop;
        float x[4 * 5];
        int32_t y[4] = {0, 1, 2, 1};
        mpar_batch b;
        mpar_step_info info;
        mpar_error err;
        char path[4200];
        int k;
        memset(&md, 0, sizeof md);
        md.input_features = 5;
        md.seed = (uint64_t)v + 1;
        memset(&drop, 0, sizeof drop);
        drop.type = mpar_layer_dropout();
        drop.rate = 0.5f;
        mpar_model_create(&md, &m, NULL);
        mpar_model_add_linear(m, v == 2 ? 6 : 4, NULL);
        if (v == 2) mpar_model_add_simple(m, mpar_layer_layernorm(), NULL);
        mpar_model_add(m, &drop, NULL);
        mpar_model_add_simple(m, v ? mpar_layer_tanh() : mpar_layer_relu(), NULL);
        mpar_model_add_linear(m, 3, NULL);
        if (mpar_model_add_simple(m, mpar_layer_cross_entropy(), NULL) != MPAR_SUCCESS) return 2;
        for (k = 0; k < 20; k++) x[k] = (float)k / 10.0f - 1.0f;
        b.inputs = x, b.targets = y, b.samples = 4;
        p = pipeline(ctx, m, 1 + v % 2, v == 1 ? MPAR_OPTIMIZER_SGD : MPAR_OPTIMIZER_ADAMW);
        if (!p) return 2;
        for (k = 0; k < v + 1; k++)
            if (mpar_pipeline_train_step(p, &b, &info) != MPAR_SUCCESS) return 2;
        snprintf(path, sizeof path, "%s/seed-%d.ckpt", dir, v);
        if (mpar_pipeline_save_checkpoint(p, path, &err) != MPAR_SUCCESS) {
            fprintf(stderr, "ckpt_tool: %s\n", err.message);
            return 2;
        }
        snprintf(path, sizeof path, "%s/seed-%d.weights", dir, v); /* and weights only (format version 2) */
        if (mpar_pipeline_save_weights(p, path, &err) != MPAR_SUCCESS) {
            fprintf(stderr, "ckpt_tool: %s\n", err.message);
            return 2;
        }
        mpar_pipeline_destroy(p);
        mpar_model_destroy(m);
    }
    return 0;
}

int main(int argc, char** argv) {
    mpar_context* ctx = NULL;
    mpar_desc d;
    mpar_error err;
    int rc;
    if (argc < 3) {
        fprintf(stderr, "usage: ckpt_tool train|train-unsafe|verify PATH [STEPS] | seed DIR\n");
        return 2;
    }
    memset(&d, 0, sizeof d);
    d.error = &err;
    if (mpar_create(&d, &ctx) != MPAR_SUCCESS) {
        fprintf(stderr, "ckpt_tool: %s\n", err.message);
        return 2;
    }
    if (!strcmp(argv[1], "train") || !strcmp(argv[1], "train-unsafe"))
        rc = train(ctx, argv[2], argc > 3 ? atol(argv[3]) : -1, argv[1][5] == '-');
    else if (!strcmp(argv[1], "verify")) rc = verify(ctx, argv[2]);
    else if (!strcmp(argv[1], "seed")) rc = seed(ctx, argv[2]);
    else rc = 2;
    mpar_destroy(ctx);
    return rc;
}
