/* Stages in separate processes over MPI. Run with
     mpirun -np 2 tests/mpi/test_mpi    and    mpirun -np 3 tests/mpi/test_mpi
   Each rank drives one PoCL device. For several schedules the loss and the
   parameters after a few steps equal those of the same stages run in one
   process, bit for bit (bf16 activations too, whose messages carry 16
   bits); inference outputs too; a fault injected on the last
   rank makes every rank return an error within a bounded time, and the
   pipeline works again afterwards. Checkpoints saved across the ranks are
   the one-process file, bit for bit, and load into any split, one process
   or (the file build/mpi_ckpt_2ranks.ckpt of a 2-rank run) another rank
   count; failed saves and loads fail on every rank and change nothing.
   Rank 0 prints "N passed, N failed". */
#define MPAR_IMPLEMENTATION
#include "mpar.h"

#include <mpi.h>
#include <sys/stat.h>

enum { IN = 24, HID = 24, CLASSES = 6, BATCH = 30, STEPS = 3, M = 6 };
static const float CLIP = 0.05f; /* below the gradients' norm: clipping engages */

static int rank, size, failures, checks;
static mpar_context* ctx;
static mpar_model* model;
static float x[BATCH * IN];
static int32_t y[BATCH];

#define CHECK(cond, ...)                                                     \
    do {                                                                     \
        checks++;                                                            \
        if (!(cond)) {                                                       \
            failures++;                                                      \
            fprintf(stderr, "rank %d: FAILED %s: ", rank, #cond);            \
            fprintf(stderr, __VA_ARGS__);                                    \
            fprintf(stderr, "\n");                                           \
        }                                                                    \
    } while (0)

static mpar_activation_type g_act; /* make(): activation_type */
static int g_shift;                /* make(): every stage boundary this many layers later */
static double g_timeout = 30;      /* make(): timeout_seconds */

static mpar_pipeline* make(mpar_schedule_kind kind, int mpi, mpar_stage_desc* st) {
    mpar_pipeline_desc pd;
    mpar_pipeline* p = NULL;
    MPI_Comm comm = MPI_COMM_WORLD;
    int L = mpar_model_layer_count(model), j;
    for (j = 0; j < size; j++) {
        st[j].device = 0; /* each rank's own device; in one process all on device 0 */
        st[j].first_layer = L * j / size + (j ? g_shift : 0);
        st[j].last_layer = L * (j + 1) / size - 1 + (j + 1 < size ? g_shift : 0);
    }
    memset(&pd, 0, sizeof pd);
    pd.stages = st, pd.stage_count = size, pd.schedule = kind, pd.microbatches = M, pd.max_batch = BATCH;
    pd.optimizer.kind = MPAR_OPTIMIZER_ADAMW, pd.optimizer.lr = 0.01f, pd.optimizer.clip_norm = CLIP;
    pd.timeout_seconds = g_timeout, pd.activation_type = g_act;
    pd.mpi_comm = mpi ? &comm : NULL; /* mpar duplicates it during create */
    if (mpar_pipeline_create(ctx, model, &pd, &p) != MPAR_SUCCESS) {
        fprintf(stderr, "rank %d: create: %s\n", rank, mpar_last_error(ctx));
        MPI_Abort(MPI_COMM_WORLD, 2);
    }
    return p;
}

static double last_grad_norm; /* of the last step() */

static mpar_result step(mpar_pipeline* p, double* loss) {
    mpar_batch b;
    mpar_step_info info;
    mpar_result r;
    b.inputs = x, b.targets = y, b.samples = BATCH;
    memset(&info, 0, sizeof info);
    r = mpar_pipeline_train_step(p, &b, &info);
    if (loss) *loss = info.loss;
    last_grad_norm = info.grad_norm;
    return r;
}

/* One process vs one stage per rank: same losses, same parameters. */
static void equality(mpar_schedule_kind kind) {
    mpar_stage_desc st1[8], st2[8];
    mpar_pipeline* ref = make(kind, 0, st1);
    mpar_pipeline* dist = make(kind, 1, st2);
    int s, l;
    for (s = 0; s < STEPS; s++) {
        double a = 0, b = 0, na, nb;
        CHECK(step(ref, &a) == MPAR_SUCCESS, "reference step: %s", mpar_last_error(ctx));
        na = last_grad_norm;
        CHECK(step(dist, &b) == MPAR_SUCCESS, "mpi step: %s", mpar_last_error(ctx));
        nb = last_grad_norm;
        CHECK(a == b, "%s step %d: loss %.9g (one process) vs %.9g (MPI)", mpar_schedule_kind_name(kind), s, a, b);
        /* every rank sees the global norm (all layers, summed across ranks)
           and clips with it */
        CHECK(na == nb, "%s step %d: gradient norm %.9g (one process) vs %.9g (MPI)", mpar_schedule_kind_name(kind), s,
              na, nb);
        CHECK(na > 1.5 * CLIP, "%s step %d: gradient norm %g does not engage clipping at %g",
              mpar_schedule_kind_name(kind), s, na, (double)CLIP);
    }
    for (l = st2[rank].first_layer; l <= st2[rank].last_layer; l++) {
        size_t n = mpar_model_layer(model, l)->param_count;
        float* u = (float*)malloc(sizeof(float) * (n ? n : 1));
        float* v = (float*)malloc(sizeof(float) * (n ? n : 1));
        if (n) {
            CHECK(mpar_pipeline_get_params(ref, l, u) == MPAR_SUCCESS, "params");
            CHECK(mpar_pipeline_get_params(dist, l, v) == MPAR_SUCCESS, "params: %s", mpar_last_error(ctx));
            CHECK(memcmp(u, v, n * sizeof(float)) == 0, "%s: layer %d parameters differ", mpar_schedule_kind_name(kind),
                  l);
        }
        free(u), free(v);
    }
    if (size > 1) { /* another rank's layer is not here */
        float tmp[1];
        int other = st2[(rank + 1) % size].first_layer;
        CHECK(mpar_pipeline_get_params(dist, other, tmp) == MPAR_ERROR_INVALID_ARGUMENT, "remote layer");
    }
    {
        mpar_batch b;
        float o1[BATCH * CLASSES], o2[BATCH * CLASSES];
        double l1 = 0, l2 = 0;
        b.inputs = x, b.targets = y, b.samples = BATCH;
        CHECK(mpar_pipeline_infer(ref, &b, o1, &l1) == MPAR_SUCCESS, "infer");
        CHECK(mpar_pipeline_infer(dist, &b, o2, &l2) == MPAR_SUCCESS, "infer: %s", mpar_last_error(ctx));
        CHECK(l1 == l2, "inference loss %.9g vs %.9g", l1, l2);
        if (rank == size - 1) CHECK(memcmp(o1, o2, sizeof o1) == 0, "inference outputs differ");
    }
    mpar_pipeline_destroy(dist);
    mpar_pipeline_destroy(ref);
}

/* A fault on the last rank: every rank returns an error, promptly. */
static void fault(void) {
    mpar_stage_desc st[8];
    mpar_pipeline* p = make(MPAR_SCHEDULE_1F1B, 1, st);
    double t0, loss;
    mpar_result r;
    CHECK(step(p, &loss) == MPAR_SUCCESS, "first step: %s", mpar_last_error(ctx));
    if (rank == size - 1) mpar_set_fault(ctx, "enqueue:*:1:3");
    MPI_Barrier(MPI_COMM_WORLD);
    t0 = mpar__now();
    r = step(p, &loss);
    CHECK(r != MPAR_SUCCESS, "a step with a fault on rank %d succeeded", size - 1);
    CHECK(mpar__now() - t0 < 10.0, "the failing step took %.1f s", mpar__now() - t0);
    if (rank == size - 1)
        CHECK(r == (mpar_result)CL_OUT_OF_RESOURCES, "cause: %s %s", mpar_result_string(r), mpar_last_error(ctx));
    else {
        char cause[64];
        snprintf(cause, sizeof cause, "because rank %d failed", size - 1); /* names the failing rank */
        CHECK(r == MPAR_ERROR_ABORTED && strstr(mpar_last_error(ctx), cause), "others: %s %s", mpar_result_string(r),
              mpar_last_error(ctx));
    }
    CHECK(step(p, &loss) == MPAR_SUCCESS, "the step after the fault: %s", mpar_last_error(ctx));
    /* A fault in the last launch of the gradient job on the last rank (the
       gradient norms; the optimizer's launch comes after it): the other
       ranks may be done with that job when its abort message arrives, and
       must not take it for a failure of the next step. */
    {
        mpar_pipeline_stats st;
        char spec[64];
        int last;
        memset(&st, 0, sizeof st);
        CHECK(mpar_pipeline_get_stats(p, &st) == MPAR_SUCCESS, "stats");
        last = (int)st.launches[size - 1] - 1; /* launches of the last step, less the optimizer's */
        if (rank == size - 1) {
            snprintf(spec, sizeof spec, "enqueue:*:%d:%d", mpar_pipeline_get_step(p), last);
            CHECK(last > 1 && mpar_set_fault(ctx, spec) == MPAR_SUCCESS, "fault %s", spec);
        }
        MPI_Barrier(MPI_COMM_WORLD);
        r = step(p, &loss);
        CHECK(r != MPAR_SUCCESS, "a step with a fault in its last launch on rank %d succeeded", size - 1);
        CHECK(step(p, &loss) == MPAR_SUCCESS, "the step after a late fault: %s", mpar_last_error(ctx));
        CHECK(step(p, &loss) == MPAR_SUCCESS, "the second step after a late fault: %s", mpar_last_error(ctx));
    }
    mpar_pipeline_destroy(p);
}

#include "../stall_layer.h"

/* The last rank hangs for 2 s with a 0.5 s timeout: a rank waiting for it
   stops with MPAR_ERROR_TIMEOUT, every rank returns an error soon after
   the sleeper is back, and the next step works everywhere. */
static void timeout(void) {
    mpar_model* m = NULL;
    mpar_model_desc md;
    mpar_layer_desc ld;
    mpar_pipeline_desc pd;
    mpar_stage_desc st[8];
    mpar_pipeline* p = NULL;
    MPI_Comm comm = MPI_COMM_WORLD;
    int L, j;
    double t0, loss;
    mpar_result r;
    memset(&md, 0, sizeof md);
    md.input_features = IN, md.seed = 3;
    memset(&ld, 0, sizeof ld);
    ld.type = &stall_type;
    mpar_model_create(&md, &m, NULL);
    mpar_model_add_linear(m, HID, NULL);
    mpar_model_add_simple(m, mpar_layer_tanh(), NULL);
    mpar_model_add_linear(m, CLASSES, NULL);
    mpar_model_add(m, &ld, NULL); /* on the last rank */
    mpar_model_add_simple(m, mpar_layer_cross_entropy(), NULL);
    L = mpar_model_layer_count(m);
    for (j = 0; j < size; j++) {
        st[j].device = 0;
        st[j].first_layer = L * j / size;
        st[j].last_layer = L * (j + 1) / size - 1;
    }
    memset(&pd, 0, sizeof pd);
    pd.stages = st, pd.stage_count = size, pd.schedule = MPAR_SCHEDULE_GPIPE, pd.microbatches = M;
    pd.max_batch = BATCH, pd.timeout_seconds = 0.5, pd.mpi_comm = &comm;
    CHECK(mpar_pipeline_create(ctx, m, &pd, &p) == MPAR_SUCCESS, "create: %s", mpar_last_error(ctx));
    if (!p) return;
    CHECK(step(p, &loss) == MPAR_SUCCESS, "first step: %s", mpar_last_error(ctx));
    if (rank == size - 1) stall_seconds = 2.0;
    MPI_Barrier(MPI_COMM_WORLD);
    t0 = mpar__now();
    r = step(p, &loss);
    stall_seconds = 0;
    CHECK(mpar__now() - t0 < 2.0 + 3.0, "the hung step took %.1f s", mpar__now() - t0);
    {
        /* whichever waiting rank gives up first reports the timeout; the
           rest, the sleeper included, stop because of it */
        int timed_out = r == MPAR_ERROR_TIMEOUT, total = 0;
        if (timed_out)
            CHECK(rank != size - 1 && strstr(mpar_last_error(ctx), "waited over 0.5 s"), "waiter: %s",
                  mpar_last_error(ctx));
        else
            CHECK(r == MPAR_ERROR_ABORTED, "others: %s %s", mpar_result_string(r), mpar_last_error(ctx));
        MPI_Allreduce(&timed_out, &total, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
        CHECK(total >= 1, "no rank reported the timeout");
    }
    CHECK(step(p, &loss) == MPAR_SUCCESS, "the step after the hang: %s", mpar_last_error(ctx));
    mpar_pipeline_destroy(p);
    mpar_model_destroy(m);
}

/* Wide enough that a micro-batch's message (5 rows) is past Open MPI's
   eager limit (4 KiB on shared memory): a send left unmatched by a failed
   job stays pending until its receiver drains it. */
enum { WIDE = 256 };

/* A small model whose first boundary is `width` wide: linear, tanh,
   linear, stall (a copy: on the last rank of 2 or 3), cross-entropy. */
static mpar_model* small_model(int width) {
    mpar_model* m = NULL;
    mpar_model_desc md;
    mpar_layer_desc ld;
    memset(&md, 0, sizeof md);
    md.input_features = IN, md.seed = 3;
    memset(&ld, 0, sizeof ld);
    ld.type = &stall_type;
    mpar_model_create(&md, &m, NULL);
    mpar_model_add_linear(m, width, NULL);
    mpar_model_add_simple(m, mpar_layer_tanh(), NULL);
    mpar_model_add_linear(m, CLASSES, NULL);
    mpar_model_add(m, &ld, NULL);
    mpar_model_add_simple(m, mpar_layer_cross_entropy(), NULL);
    return m;
}

/* A pipeline desc over MPI_COMM_WORLD with one stage per rank; `shift`
   moves rank 0's last layer (a split of its own). */
static MPI_Comm world;
static void small_desc(mpar_pipeline_desc* pd, mpar_stage_desc* st, int L, int shift, double timeout) {
    int j;
    for (j = 0; j < size; j++) {
        st[j].device = 0;
        st[j].first_layer = L * j / size + (j > 0 ? shift : 0);
        st[j].last_layer = j + 1 < size ? L * (j + 1) / size - 1 + shift : L - 1;
    }
    world = MPI_COMM_WORLD;
    memset(pd, 0, sizeof *pd);
    pd->stages = st, pd->stage_count = size, pd->schedule = MPAR_SCHEDULE_1F1B, pd->microbatches = M;
    pd->max_batch = BATCH, pd->timeout_seconds = timeout, pd->mpi_comm = &world;
    pd->optimizer.kind = MPAR_OPTIMIZER_SGD, pd->optimizer.lr = 0.05f;
}

/* Ranks that describe different pipelines: every rank's create fails with
   MPAR_ERROR_MISMATCH naming what differs; a rank whose own create fails
   makes the others fail with MPAR_ERROR_ABORTED naming it, at once. */
static void disagree(void) {
    mpar_model* m = small_model(HID);
    mpar_model* wide = small_model(HID + 4);
    mpar_pipeline_desc pd;
    mpar_stage_desc st[8];
    mpar_pipeline* p = NULL;
    int L = mpar_model_layer_count(m);
    double t0;
    mpar_result r;
    /* another split on the last rank */
    small_desc(&pd, st, L, rank == size - 1 ? 1 : 0, 30);
    r = mpar_pipeline_create(ctx, m, &pd, &p);
    CHECK(r == MPAR_ERROR_MISMATCH && strstr(mpar_last_error(ctx), "disagree on the stages") && !p,
          "another split: %s %s", mpar_result_string(r), mpar_last_error(ctx));
    mpar_pipeline_destroy(p), p = NULL;
    /* a wider boundary on the last rank */
    small_desc(&pd, st, L, 0, 30);
    r = mpar_pipeline_create(ctx, rank == size - 1 ? wide : m, &pd, &p);
    CHECK(r == MPAR_ERROR_MISMATCH && strstr(mpar_last_error(ctx), "disagree on the model") && !p,
          "another width: %s %s", mpar_result_string(r), mpar_last_error(ctx));
    mpar_pipeline_destroy(p), p = NULL;
    /* another learning rate on rank 0 */
    small_desc(&pd, st, L, 0, 30);
    if (rank == 0) pd.optimizer.lr = 0.5f;
    r = mpar_pipeline_create(ctx, m, &pd, &p);
    CHECK(r == MPAR_ERROR_MISMATCH && strstr(mpar_last_error(ctx), "disagree on the optimizer") &&
              strstr(mpar_last_error(ctx), "rank 1's differs"), "another lr: %s %s", mpar_result_string(r),
          mpar_last_error(ctx));
    mpar_pipeline_destroy(p), p = NULL;
    /* a create that fails on the last rank only: at once everywhere */
    small_desc(&pd, st, L, 0, 30);
    if (rank == size - 1) pd.optimizer.lr = -1.0f;
    MPI_Barrier(MPI_COMM_WORLD);
    t0 = mpar__now();
    r = mpar_pipeline_create(ctx, m, &pd, &p);
    CHECK(mpar__now() - t0 < 5.0, "a create failing on one rank took %.1f s", mpar__now() - t0);
    if (rank == size - 1)
        CHECK(r == MPAR_ERROR_INVALID_ARGUMENT && strstr(mpar_last_error(ctx), "lr"), "failing rank: %s %s",
              mpar_result_string(r), mpar_last_error(ctx));
    else {
        char cause[64];
        snprintf(cause, sizeof cause, "rank %d could not create its part", size - 1);
        CHECK(r == MPAR_ERROR_ABORTED && strstr(mpar_last_error(ctx), cause), "others: %s %s", mpar_result_string(r),
              mpar_last_error(ctx));
    }
    mpar_pipeline_destroy(p), p = NULL;
    /* the receive-size checks, reached by skipping the comparison: a
       receiver expecting another width stops with MISMATCH, never
       computing from memory nobody wrote */
    ctx->test_skip_digest = 1;
    small_desc(&pd, st, L, 0, 5);
    r = mpar_pipeline_create(ctx, rank == 1 ? wide : m, &pd, &p); /* rank 1 receives the first boundary */
    ctx->test_skip_digest = 0;
    CHECK(r == MPAR_SUCCESS, "create without the comparison: %s", mpar_last_error(ctx));
    if (p) {
        static float out[BATCH * (HID + 4)];
        mpar_batch b;
        int mismatched = 0, total = 0;
        b.inputs = x, b.targets = y, b.samples = BATCH;
        t0 = mpar__now();
        r = mpar_pipeline_infer(p, &b, out, NULL);
        CHECK(r == MPAR_ERROR_MISMATCH || r == MPAR_ERROR_ABORTED, "infer across widths: %s %s",
              mpar_result_string(r), mpar_last_error(ctx));
        CHECK(mpar__now() - t0 < 3.0, "infer across widths took %.1f s", mpar__now() - t0);
        mismatched = r == MPAR_ERROR_MISMATCH;
        if (mismatched) CHECK(strstr(mpar_last_error(ctx), "the ranks disagree"), "%s", mpar_last_error(ctx));
        MPI_Allreduce(&mismatched, &total, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
        CHECK(total >= 1, "no rank found the size mismatch");
        r = step(p, NULL);
        CHECK(r == MPAR_ERROR_MISMATCH || r == MPAR_ERROR_ABORTED, "training across widths: %s %s",
              mpar_result_string(r), mpar_last_error(ctx));
        mpar_pipeline_destroy(p), p = NULL;
    }
    mpar_model_destroy(wide);
    mpar_model_destroy(m);
}

/* A bad batch on one rank only: that rank returns its own error, the
   others MPAR_ERROR_ABORTED naming it, promptly; the step changes nothing,
   and the ranks stay paired: the next steps equal one process's. Batches
   of different sizes on different ranks fail everywhere. */
static void local_failure(void) {
    mpar_model* m = small_model(WIDE);
    mpar_pipeline_desc pd, one;
    mpar_stage_desc st[8], st1[8];
    mpar_pipeline *p = NULL, *ref = NULL;
    int L = mpar_model_layer_count(m), s, j;
    int32_t bad[BATCH];
    double t0, a = 0, b = 0;
    mpar_result r;
    small_desc(&pd, st, L, 0, 30);
    one = pd;
    for (j = 0; j < size; j++) st1[j] = st[j];
    one.stages = st1, one.mpi_comm = NULL;
    CHECK(mpar_pipeline_create(ctx, m, &pd, &p) == MPAR_SUCCESS, "create: %s", mpar_last_error(ctx));
    CHECK(mpar_pipeline_create(ctx, m, &one, &ref) == MPAR_SUCCESS, "create: %s", mpar_last_error(ctx));
    if (!p || !ref) return;
    memcpy(bad, y, sizeof bad);
    bad[BATCH / 2] = CLASSES; /* not a class */
    for (s = 0; s < 4; s++) {
        mpar_batch bb;
        mpar_step_info info;
        if (s == 1) { /* the bad label, on the last rank only */
            bb.inputs = x, bb.targets = rank == size - 1 ? bad : y, bb.samples = BATCH;
            MPI_Barrier(MPI_COMM_WORLD);
            t0 = mpar__now();
            r = mpar_pipeline_train_step(p, &bb, &info);
            CHECK(mpar__now() - t0 < 2.0, "a step failing on one rank took %.1f s", mpar__now() - t0);
            if (rank == size - 1)
                CHECK(r == MPAR_ERROR_INVALID_ARGUMENT && strstr(mpar_last_error(ctx), "is not below"),
                      "failing rank: %s %s", mpar_result_string(r), mpar_last_error(ctx));
            else {
                char cause[64];
                snprintf(cause, sizeof cause, "because rank %d failed", size - 1);
                CHECK(r == MPAR_ERROR_ABORTED && strstr(mpar_last_error(ctx), cause), "others: %s %s",
                      mpar_result_string(r), mpar_last_error(ctx));
            }
            /* a batch of another size on rank 0: every rank fails */
            bb.targets = y, bb.samples = rank == 0 ? BATCH - M : BATCH;
            r = mpar_pipeline_train_step(p, &bb, &info);
            CHECK(r == MPAR_ERROR_MISMATCH || r == MPAR_ERROR_ABORTED, "batch sizes %d: %s %s", bb.samples,
                  mpar_result_string(r), mpar_last_error(ctx));
            /* a NULL batch for inference on rank 0 */
            r = mpar_pipeline_infer(p, rank == 0 ? NULL : &bb, NULL, NULL);
            CHECK(r == (rank == 0 ? MPAR_ERROR_INVALID_ARGUMENT : MPAR_ERROR_ABORTED), "infer with NULL on rank 0: "
                  "%s %s", mpar_result_string(r), mpar_last_error(ctx));
        }
        CHECK(step(ref, &a) == MPAR_SUCCESS, "reference: %s", mpar_last_error(ctx));
        CHECK(step(p, &b) == MPAR_SUCCESS, "step %d: %s", s, mpar_last_error(ctx));
        CHECK(a == b, "step %d: loss %.9g (one process) vs %.9g (MPI)", s, a, b);
    }
    mpar_pipeline_destroy(ref);
    mpar_pipeline_destroy(p);
    mpar_model_destroy(m);
}

/* The last rank stops (SIGSTOP) in the middle of a step: every other rank
   returns within timeout + 2 s, with MPAR_ERROR_TIMEOUT (a rank that
   waited for it) or MPAR_ERROR_ABORTED; once it continues (SIGCONT), the
   next step works on every rank. */
static void stalled(void) {
    mpar_model* m = small_model(WIDE);
    mpar_pipeline_desc pd;
    mpar_stage_desc st[8];
    mpar_pipeline* p = NULL;
    int L = mpar_model_layer_count(m), pid = (int)getpid(), pids[16], timed_out, total = 0;
    const double T = 1.0;
    double t0, took;
    mpar_result r;
    MPI_Allgather(&pid, 1, MPI_INT, pids, 1, MPI_INT, MPI_COMM_WORLD);
    small_desc(&pd, st, L, 0, T);
    pd.schedule = MPAR_SCHEDULE_GPIPE;
    CHECK(mpar_pipeline_create(ctx, m, &pd, &p) == MPAR_SUCCESS, "create: %s", mpar_last_error(ctx));
    if (!p) return;
    CHECK(step(p, NULL) == MPAR_SUCCESS, "first step: %s", mpar_last_error(ctx));
    if (rank == size - 1) stall_stop = 1;
    MPI_Barrier(MPI_COMM_WORLD);
    t0 = mpar__now();
    r = step(p, NULL);
    took = mpar__now() - t0;
    if (rank != size - 1) {
        CHECK(took <= T + 2.0, "with rank %d stopped, a step took %.2f s (timeout %g s)", size - 1, took, T);
        CHECK(r == MPAR_ERROR_TIMEOUT || r == MPAR_ERROR_ABORTED, "with rank %d stopped: %s %s", size - 1,
              mpar_result_string(r), mpar_last_error(ctx));
        if (rank == 0) kill((pid_t)pids[size - 1], SIGCONT);
    } else
        CHECK(r != MPAR_SUCCESS, "the stopped rank's step succeeded");
    timed_out = r == MPAR_ERROR_TIMEOUT;
    MPI_Allreduce(&timed_out, &total, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
    CHECK(total >= 1, "no rank reported the timeout");
    CHECK(step(p, NULL) == MPAR_SUCCESS, "the step after the stopped rank continued: %s", mpar_last_error(ctx));
    CHECK(step(p, NULL) == MPAR_SUCCESS, "the second step after: %s", mpar_last_error(ctx));
    mpar_pipeline_destroy(p);
    mpar_model_destroy(m);
}

/* ---- checkpoints across ranks ---- */

static unsigned char* slurp(const char* path, size_t* size) {
    FILE* f = fopen(path, "rb");
    unsigned char* d;
    long n;
    *size = 0;
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    n = ftell(f);
    fseek(f, 0, SEEK_SET);
    d = (unsigned char*)malloc(n > 0 ? (size_t)n : 1);
    if (d && n > 0 && fread(d, 1, (size_t)n, f) != (size_t)n) n = 0;
    fclose(f);
    *size = n > 0 ? (size_t)n : 0;
    return d;
}

static int spit(const char* path, const unsigned char* d, size_t n) {
    FILE* f = fopen(path, "wb");
    int ok = f && fwrite(d, 1, n, f) == n;
    if (f && fclose(f) != 0) ok = 0;
    return ok;
}

/* K more steps; every rank gets every loss. */
enum { K = 2 };
static void steps(mpar_pipeline* p, double* loss, const char* what) {
    int k;
    for (k = 0; k < K; k++) CHECK(step(p, &loss[k]) == MPAR_SUCCESS, "%s step %d: %s", what, k, mpar_last_error(ctx));
}

static void same_losses(const double* want, const double* got, const char* what) {
    int k;
    for (k = 0; k < K; k++)
        CHECK(want[k] == got[k], "%s: loss %.9g after the load, %.9g in the reference", what, got[k], want[k]);
}

static const mpar_state_kind KINDS[3] = {MPAR_STATE_PARAMS, MPAR_STATE_MOMENT1, MPAR_STATE_MOMENT2};

/* The state (parameters, both moments) of this rank's layers of p, all in one array. */
static float* own_state(mpar_pipeline* p, const mpar_stage_desc* st, size_t* count) {
    size_t n = 0, at = 0;
    int l, k;
    float* out;
    for (l = st[rank].first_layer; l <= st[rank].last_layer; l++) n += 3 * mpar_model_layer(model, l)->param_count;
    out = (float*)malloc(sizeof(float) * (n ? n : 1));
    for (l = st[rank].first_layer; l <= st[rank].last_layer; l++) {
        size_t c = mpar_model_layer(model, l)->param_count;
        for (k = 0; k < 3 && c; k++, at += c)
            CHECK(mpar_pipeline_read_state(p, l, KINDS[k], out + at) == MPAR_SUCCESS, "read state of layer %d: %s", l,
                  mpar_last_error(ctx));
    }
    *count = n;
    return out;
}

/* This rank's layers of p hold what the file holds. */
static void holds_file(mpar_pipeline* p, const mpar_stage_desc* st, const char* path, const char* what) {
    size_t size, n, at = 0;
    unsigned char* d = slurp(path, &size);
    float* mine = own_state(p, st, &n);
    mpar_checkpoint_info info;
    int l, k;
    CHECK(d && mpar_checkpoint_parse(d, size, &info, NULL) == MPAR_SUCCESS, "%s: parse %s", what, path);
    if (d && info.layers) {
        for (l = st[rank].first_layer; l <= st[rank].last_layer; l++) {
            size_t c = info.layers[l].param_count;
            float* f = (float*)malloc(sizeof(float) * (c ? c : 1));
            for (k = 0; k < 3 && c; k++, at += c) {
                mpar_checkpoint_get_state(d, size, &info, l, KINDS[k], f, NULL);
                CHECK(memcmp(f, mine + at, c * sizeof(float)) == 0, "%s: layer %d state %d differs from the file", what,
                      l, k);
            }
            free(f);
        }
        mpar_checkpoint_info_free(&info);
    }
    free(d), free(mine);
}

/* Every rank saves the pipeline's checkpoint; rank 0 writes one file, the
   same bytes a one-process pipeline with the same training writes. It
   loads into the same MPI pipeline, one with other stages, and one
   process, and each continues as the one-process reference does. A file
   saved by another rank count resumes here too. Failures (a corrupt file,
   a rank at another step, a rank late past the timeout) return the same
   result on every rank and change neither the pipeline nor the file
   (checked with 2 ranks or more). */
static void checkpoints(void) {
    mpar_stage_desc st1[8], st2[8], st3[8];
    mpar_pipeline *ref, *dist, *moved;
    char path[128], refpath[128], bad[128], other[128];
    double want[K], got[K];
    size_t n1, n2;
    float *before, *after;
    mpar_error err;
    mpar_result r;
    int s;
    mkdir("build", 0755);
    snprintf(path, sizeof path, "build/mpi_ckpt_%dranks.ckpt", size);
    snprintf(refpath, sizeof refpath, "build/mpi_ckpt_%dranks_ref.ckpt", size);
    snprintf(bad, sizeof bad, "build/mpi_ckpt_%dranks_corrupt.ckpt", size);
    ref = make(MPAR_SCHEDULE_1F1B, 0, st1);
    dist = make(MPAR_SCHEDULE_1F1B, 1, st2);
    for (s = 0; s < STEPS; s++) {
        double a = 0, b = 0;
        CHECK(step(ref, &a) == MPAR_SUCCESS && step(dist, &b) == MPAR_SUCCESS, "step: %s", mpar_last_error(ctx));
        CHECK(a == b, "checkpoint training: loss %.9g vs %.9g", a, b);
    }
    r = mpar_pipeline_save_checkpoint(dist, path, &err);
    CHECK(r == MPAR_SUCCESS, "save across %d ranks: %s", size, err.message);
    if (rank == 0) { /* the same bytes as one process saves */
        size_t a, b;
        unsigned char *fa, *fb;
        CHECK(mpar_pipeline_save_checkpoint(ref, refpath, &err) == MPAR_SUCCESS, "reference save: %s", err.message);
        fa = slurp(path, &a), fb = slurp(refpath, &b);
        CHECK(fa && fb && a == b && memcmp(fa, fb, a) == 0,
              "the MPI checkpoint (%lu bytes) differs from the one-process one (%lu bytes)", (unsigned long)a,
              (unsigned long)b);
        /* a corrupt copy: one byte of the last layer's data flipped */
        if (fa && a > 100) {
            fa[a - 100] ^= 0x10;
            CHECK(spit(bad, fa, a), "write %s", bad);
        }
        free(fa), free(fb);
    }
    steps(ref, want, "reference"); /* how training goes on from the checkpoint */

    /* (a) the same pipeline, trained past the checkpoint, goes back to it */
    steps(dist, got, "past the checkpoint");
    r = mpar_pipeline_load_checkpoint(dist, path, &err);
    CHECK(r == MPAR_SUCCESS, "load into the same MPI pipeline: %s", err.message);
    CHECK(mpar_pipeline_get_step(dist) == STEPS, "step %d after the load, saved at %d", mpar_pipeline_get_step(dist),
          STEPS);
    holds_file(dist, st2, path, "same stages");
    steps(dist, got, "same stages");
    same_losses(want, got, "same stages");

    /* a corrupt file: CORRUPT on every rank, nothing changed */
    MPI_Barrier(MPI_COMM_WORLD);
    before = own_state(dist, st2, &n1);
    r = mpar_pipeline_load_checkpoint(dist, bad, &err);
    CHECK(r == MPAR_ERROR_CORRUPT, "corrupt file: %s %s", mpar_result_string(r), err.message);
    after = own_state(dist, st2, &n2);
    CHECK(n1 == n2 && memcmp(before, after, n1 * sizeof(float)) == 0, "a failed load changed the parameters");
    CHECK(mpar_pipeline_get_step(dist) == STEPS + K, "a failed load changed the step to %d",
          mpar_pipeline_get_step(dist));
    free(after);
    /* a failure on one rank only (no path there): every rank returns it,
       none applies the file */
    if (size > 1) {
        char who[32];
        r = mpar_pipeline_load_checkpoint(dist, rank == size - 1 ? NULL : path, &err);
        snprintf(who, sizeof who, "rank %d: ", size - 1);
        CHECK(r == MPAR_ERROR_INVALID_ARGUMENT && strstr(err.message, who), "no path on the last rank: %s %s",
              mpar_result_string(r), err.message);
        after = own_state(dist, st2, &n2);
        CHECK(n1 == n2 && memcmp(before, after, n1 * sizeof(float)) == 0, "a load failed on rank %d changed this "
              "rank's parameters", size - 1);
        CHECK(mpar_pipeline_get_step(dist) == STEPS + K, "a load failed on rank %d changed the step to %d", size - 1,
              mpar_pipeline_get_step(dist));
        free(after);
    }
    /* no file on rank 0: IO on every rank */
    r = mpar_pipeline_load_checkpoint(dist, "build/mpi_ckpt_missing.ckpt", &err);
    CHECK(r == MPAR_ERROR_IO && (size == 1 || strstr(err.message, "rank 0")), "missing file: %s %s",
          mpar_result_string(r), err.message);

    /* a rank at another step: the save fails on every rank, naming it, and
       the file stays the one before */
    if (size > 1) {
        size_t a, b;
        unsigned char *fa = rank == 0 ? slurp(path, &a) : NULL, *fb;
        char who[32];
        if (rank == size - 1) mpar_pipeline_set_step(dist, 99);
        r = mpar_pipeline_save_checkpoint(dist, path, &err);
        snprintf(who, sizeof who, "rank %d is at step 99", size - 1);
        CHECK(r == MPAR_ERROR_INVALID_STATE && strstr(err.message, who), "a rank at another step: %s %s",
              mpar_result_string(r), err.message);
        if (rank == size - 1) mpar_pipeline_set_step(dist, STEPS + K);
        if (rank == 0) {
            fb = slurp(path, &b);
            CHECK(fa && fb && a == b && memcmp(fa, fb, a) == 0, "a failed save changed the file");
            free(fb);
        }
        after = own_state(dist, st2, &n2);
        CHECK(n1 == n2 && memcmp(before, after, n1 * sizeof(float)) == 0, "a failed save changed the parameters");
        free(after);
        /* a failure on a rank other than rank 0 (no path there) */
        r = mpar_pipeline_save_checkpoint(dist, rank == size - 1 ? NULL : path, &err);
        snprintf(who, sizeof who, "rank %d: ", size - 1);
        CHECK(r == MPAR_ERROR_INVALID_ARGUMENT && strstr(err.message, who), "no path on the last rank: %s %s",
              mpar_result_string(r), err.message);
        if (rank == 0) {
            fb = slurp(path, &b);
            CHECK(fa && fb && a == b && memcmp(fa, fb, a) == 0, "a failed save changed the file");
            free(fb);
        }
        free(fa);
    }
    free(before);

    /* (b) other stages across the same ranks */
    g_shift = 2;
    moved = make(MPAR_SCHEDULE_GPIPE, 1, st3);
    g_shift = 0;
    r = mpar_pipeline_load_checkpoint(moved, path, &err);
    CHECK(r == MPAR_SUCCESS, "load into other stages: %s", err.message);
    holds_file(moved, st3, path, "other stages");
    steps(moved, got, "other stages");
    same_losses(want, got, "other stages");
    mpar_pipeline_destroy(moved);

    /* (c) one process (a local pipeline: rank 0 alone calls it) */
    if (rank == 0) {
        mpar_pipeline* one = make(MPAR_SCHEDULE_1F1B, 0, st3);
        r = mpar_pipeline_load_checkpoint(one, path, &err);
        CHECK(r == MPAR_SUCCESS, "load into one process: %s", err.message);
        steps(one, got, "one process");
        same_losses(want, got, "one process");
        mpar_pipeline_destroy(one);
    }

    /* a checkpoint saved by another rank count (the -np 2 run's) */
    if (size != 2) {
        int have = 0;
        snprintf(other, sizeof other, "build/mpi_ckpt_2ranks.ckpt");
        if (rank == 0) have = access(other, R_OK) == 0;
        MPI_Bcast(&have, 1, MPI_INT, 0, MPI_COMM_WORLD);
        if (!have && rank == 0) printf("mpi (%d ranks): no %s from a 2-rank run; resuming it skipped\n", size, other);
        if (have) {
            double theirs[K];
            r = mpar_pipeline_load_checkpoint(dist, other, &err);
            CHECK(r == MPAR_SUCCESS, "load the 2-rank checkpoint: %s", err.message);
            steps(dist, got, "from 2 ranks");
            if (rank == 0) {
                mpar_pipeline* one = make(MPAR_SCHEDULE_1F1B, 0, st3);
                CHECK(mpar_pipeline_load_checkpoint(one, other, &err) == MPAR_SUCCESS, "one process: %s", err.message);
                steps(one, theirs, "one process from 2 ranks");
                mpar_pipeline_destroy(one);
            }
            MPI_Bcast(theirs, K, MPI_DOUBLE, 0, MPI_COMM_WORLD);
            same_losses(theirs, got, "resumed from 2 ranks");
        }
    }
    mpar_pipeline_destroy(dist);
    mpar_pipeline_destroy(ref);
    if (rank == 0) remove(bad); /* build/mpi_ckpt_<N>ranks.ckpt stays, for a run on another rank count */

    /* a rank late past the timeout: TIMEOUT on every rank, naming the rank
       waited for; the next save works */
    if (size == 1) return;
    g_timeout = 0.5;
    dist = make(MPAR_SCHEDULE_1F1B, 1, st2);
    g_timeout = 30;
    CHECK(step(dist, NULL) == MPAR_SUCCESS, "step: %s", mpar_last_error(ctx));
    MPI_Barrier(MPI_COMM_WORLD);
    {
        double t0 = mpar__now();
        char who[32];
        if (rank == size - 1) {
            struct timespec ts = {2, 0};
            nanosleep(&ts, NULL);
        }
        r = mpar_pipeline_save_checkpoint(dist, refpath, &err);
        snprintf(who, sizeof who, "rank %d", rank == size - 1 ? 0 : size - 1);
        CHECK(r == MPAR_ERROR_TIMEOUT && strstr(err.message, who), "late rank: %s %s", mpar_result_string(r),
              err.message);
        CHECK(mpar__now() - t0 < 2.0 + 3.0, "the late save took %.1f s", mpar__now() - t0);
    }
    MPI_Barrier(MPI_COMM_WORLD);
    CHECK(step(dist, NULL) == MPAR_SUCCESS, "step: %s", mpar_last_error(ctx));
    r = mpar_pipeline_save_checkpoint(dist, refpath, &err);
    CHECK(r == MPAR_SUCCESS, "the save after a timeout: %s", err.message);
    holds_file(dist, st2, refpath, "the save after a timeout"); /* not the late rank's part of the failed save */
    r = mpar_pipeline_load_checkpoint(dist, refpath, &err);
    CHECK(r == MPAR_SUCCESS, "the load after a timeout: %s", err.message);
    /* a rank late for a load: TIMEOUT on every rank, and no rank applies it
       (refpath holds step 2; the pipeline goes on to step 3) */
    CHECK(step(dist, NULL) == MPAR_SUCCESS, "step: %s", mpar_last_error(ctx));
    before = own_state(dist, st2, &n1);
    MPI_Barrier(MPI_COMM_WORLD);
    {
        double t0 = mpar__now();
        if (rank == size - 1) {
            struct timespec ts = {2, 0};
            nanosleep(&ts, NULL);
        }
        r = mpar_pipeline_load_checkpoint(dist, refpath, &err);
        CHECK(r == MPAR_ERROR_TIMEOUT, "late rank at a load: %s %s", mpar_result_string(r), err.message);
        CHECK(mpar__now() - t0 < 2.0 + 3.0, "the late load took %.1f s", mpar__now() - t0);
    }
    after = own_state(dist, st2, &n2);
    CHECK(n1 == n2 && memcmp(before, after, n1 * sizeof(float)) == 0, "a timed-out load changed the parameters");
    CHECK(mpar_pipeline_get_step(dist) == 3, "a timed-out load changed the step to %d", mpar_pipeline_get_step(dist));
    free(before), free(after);
    MPI_Barrier(MPI_COMM_WORLD);
    r = mpar_pipeline_load_checkpoint(dist, refpath, &err);
    CHECK(r == MPAR_SUCCESS && mpar_pipeline_get_step(dist) == 2, "the load after a timed-out load: %s",
          err.message);
    mpar_pipeline_destroy(dist);
    if (rank == 0) remove(refpath);
}

int main(int argc, char** argv) {
    int provided = 0, total[2], mine[2], i;
    mpar_desc d;
    mpar_error err;
    mpar_model_desc md;
    uint64_t s = 7;
    MPI_Init_thread(&argc, &argv, MPI_THREAD_MULTIPLE, &provided);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    if (provided < MPI_THREAD_MULTIPLE) {
        if (rank == 0) fprintf(stderr, "test_mpi: MPI without MPI_THREAD_MULTIPLE\n");
        MPI_Finalize();
        return 1;
    }
    setenv("POCL_DEVICES", "basic", 1); /* one device per rank */
    memset(&d, 0, sizeof d);
    d.error = &err;
    if (mpar_create(&d, &ctx) != MPAR_SUCCESS) {
        fprintf(stderr, "rank %d: %s\n", rank, err.message);
        MPI_Abort(MPI_COMM_WORLD, 2);
    }
    memset(&md, 0, sizeof md);
    md.input_features = IN, md.seed = 1234;
    mpar_model_create(&md, &model, &err);
    for (i = 0; i < 6; i++) {
        mpar_model_add_linear(model, HID, &err);
        mpar_model_add_simple(model, i % 2 ? mpar_layer_tanh() : mpar_layer_relu(), &err);
    }
    mpar_model_add_linear(model, CLASSES, &err);
    mpar_model_add_simple(model, mpar_layer_cross_entropy(), &err);
    for (i = 0; i < BATCH * IN; i++) x[i] = (float)(2.0 * mpar__rng_uniform(&s) - 1.0);
    for (i = 0; i < BATCH; i++) y[i] = (int32_t)(mpar__rng_next(&s) % CLASSES);

    equality(MPAR_SCHEDULE_1F1B);
    equality(MPAR_SCHEDULE_GPIPE);
    equality(MPAR_SCHEDULE_ZB_H1);
    equality(MPAR_SCHEDULE_SEQUENTIAL);
    g_act = MPAR_ACTIVATIONS_BF16; /* bf16 slots, and bf16 messages between ranks */
    equality(MPAR_SCHEDULE_1F1B);
    equality(MPAR_SCHEDULE_ZB_H1);
    g_act = MPAR_ACTIVATIONS_FP32;
    fault();
    timeout();
    disagree();
    local_failure();
    stalled();
    checkpoints();

    mine[0] = checks - failures, mine[1] = failures;
    MPI_Reduce(mine, total, 2, MPI_INT, MPI_SUM, 0, MPI_COMM_WORLD);
    if (rank == 0) printf("mpi (%d ranks): %d passed, %d failed\n", size, total[0], total[1]);
    mpar_model_destroy(model);
    mpar_destroy(ctx);
    MPI_Finalize();
    return failures ? 1 : 0;
}
