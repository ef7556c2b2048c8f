/* How long the other ranks take to return when one rank of a pipeline
   across processes fails. Run with `mpirun -np 2 bench/mpi/bench_mpi_fail`;
   prints, on rank 0 (the rank that does not fail), with timeout_seconds 2:
     mpi_stalled_rank_return_s: <seconds from the step's start until rank 0
       returned, the last rank having stopped itself (SIGSTOP) in its first
       forward; target: at most timeout + 2>
     mpi_local_failure_return_s: <seconds until rank 0 returned when the
       last rank refused the step (a label out of range) before running it;
       target: at most timeout + 2, and in practice a few milliseconds>
     mpi_recovered: <1 if the step after each failure succeeded everywhere>
   Each figure is the largest of 3 tries. */
#define MPAR_IMPLEMENTATION
#include "mpar.h"

#include <mpi.h>
#include <signal.h>

#include "../../tests/stall_layer.h"

enum { IN = 32, HID = 64, CLASSES = 8, BATCH = 64, M = 4, TRIES = 3 };
static const double TIMEOUT = 2.0;
static int rank, size;
static float x[BATCH * IN];
static int32_t y[BATCH], bad[BATCH];

static mpar_context* ctx;

/* 1 if a step's outcome is what was expected; says so on stderr if not */
static int step(mpar_pipeline* p, const int32_t* targets, int expect_success, const char* what) {
    mpar_batch b;
    mpar_result r;
    b.inputs = x, b.targets = targets, b.samples = BATCH;
    r = mpar_pipeline_train_step(p, &b, NULL);
    if ((r == MPAR_SUCCESS) == expect_success) return 1;
    fprintf(stderr, "rank %d: %s: %s %s\n", rank, what, mpar_result_string(r), mpar_last_error(ctx));
    return 0;
}

int main(int argc, char** argv) {
    int provided = 0, i, t, pid, pids[64], ok = 1, all_ok = 0;
    double worst_stall = 0, worst_local = 0, t0, took;
    mpar_desc d;
    mpar_error err;
    mpar_model* m = NULL;
    mpar_model_desc md;
    mpar_layer_desc ld;
    mpar_pipeline_desc pd;
    mpar_stage_desc st[64];
    mpar_pipeline* p = NULL;
    MPI_Comm comm = MPI_COMM_WORLD;
    uint64_t s = 11;
    MPI_Init_thread(&argc, &argv, MPI_THREAD_MULTIPLE, &provided);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    if (provided < MPI_THREAD_MULTIPLE || size < 2 || size > 64) {
        if (rank == 0) fprintf(stderr, "bench_mpi_fail: needs MPI_THREAD_MULTIPLE and 2 to 64 ranks\n");
        MPI_Finalize();
        return 1;
    }
    setenv("POCL_DEVICES", "basic", 1); /* one device per rank */
    memset(&d, 0, sizeof d);
    d.error = &err;
    memset(&md, 0, sizeof md);
    md.input_features = IN, md.seed = 5;
    memset(&ld, 0, sizeof ld);
    ld.type = &stall_type;
    if (mpar_create(&d, &ctx) != MPAR_SUCCESS || mpar_model_create(&md, &m, &err) != MPAR_SUCCESS) {
        fprintf(stderr, "rank %d: %s\n", rank, err.message);
        MPI_Abort(MPI_COMM_WORLD, 2);
    }
    mpar_model_add_linear(m, HID, NULL);
    mpar_model_add_simple(m, mpar_layer_tanh(), NULL);
    mpar_model_add_linear(m, CLASSES, NULL);
    mpar_model_add(m, &ld, NULL); /* on the last rank */
    mpar_model_add_simple(m, mpar_layer_cross_entropy(), NULL);
    for (i = 0; i < BATCH * IN; i++) x[i] = (float)(2.0 * mpar__rng_uniform(&s) - 1.0);
    for (i = 0; i < BATCH; i++) bad[i] = y[i] = (int32_t)(mpar__rng_next(&s) % CLASSES);
    bad[BATCH - 1] = CLASSES;
    for (i = 0; i < size; i++) {
        int L = mpar_model_layer_count(m);
        st[i].device = 0, st[i].first_layer = L * i / size, st[i].last_layer = L * (i + 1) / size - 1;
    }
    memset(&pd, 0, sizeof pd);
    pd.stages = st, pd.stage_count = size, pd.schedule = MPAR_SCHEDULE_1F1B, pd.microbatches = M;
    pd.max_batch = BATCH, pd.timeout_seconds = TIMEOUT, pd.mpi_comm = &comm;
    pd.optimizer.kind = MPAR_OPTIMIZER_SGD, pd.optimizer.lr = 0.01f;
    if (mpar_pipeline_create(ctx, m, &pd, &p) != MPAR_SUCCESS) {
        fprintf(stderr, "rank %d: %s\n", rank, mpar_last_error(ctx));
        MPI_Abort(MPI_COMM_WORLD, 2);
    }
    pid = (int)getpid();
    MPI_Allgather(&pid, 1, MPI_INT, pids, 1, MPI_INT, MPI_COMM_WORLD);
    ok &= step(p, y, 1, "first step");
    for (t = 0; t < TRIES; t++) {
        /* a stopped rank */
        if (rank == size - 1) stall_stop = 1;
        MPI_Barrier(MPI_COMM_WORLD);
        t0 = mpar__now();
        ok &= step(p, y, 0, "the step with a stopped rank");
        took = mpar__now() - t0;
        if (rank == 0) {
            if (took > worst_stall) worst_stall = took;
            kill((pid_t)pids[size - 1], SIGCONT);
        }
        ok &= step(p, y, 1, "the step after the stopped rank continued");
        /* a step refused by one rank */
        MPI_Barrier(MPI_COMM_WORLD);
        t0 = mpar__now();
        ok &= step(p, rank == size - 1 ? bad : y, 0, "the step refused by one rank");
        took = mpar__now() - t0;
        if (took > worst_local) worst_local = took;
        ok &= step(p, y, 1, "the step after the refused one");
    }
    MPI_Allreduce(&ok, &all_ok, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
    if (rank == 0) {
        printf("mpi_stalled_rank_return_s: %.3f\n", worst_stall);
        printf("mpi_local_failure_return_s: %.3f\n", worst_local);
        printf("mpi_recovered: %d\n", all_ok);
        printf("mpi_fail_timeout_s: %g\n", TIMEOUT);
    }
    mpar_pipeline_destroy(p);
    mpar_model_destroy(m);
    mpar_destroy(ctx);
    MPI_Finalize();
    return all_ok ? 0 : 1;
}
