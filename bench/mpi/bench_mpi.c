/* Step time of one model on 2 MPI ranks (one PoCL device each) against one
   device in one process and two devices in one process. Run with
   `mpirun -np 2 bench/mpi/bench_mpi`; prints, on rank 0:
     speedup_mpi_2rank: <1 device in one process / 2 ranks>
     speedup_2dev_1process: <1 device / 2 devices in one process>
     mpi_over_1process_2dev: <2 ranks / 2 devices in one process>  (what MPI costs)
     cpus_rank0: <CPUs rank 0 may run on>
   The 2-device figures need a CPU per device: with Open MPI's default of
   one core per rank (2 ranks), both devices of rank 0 share one core; run
   mpirun with --bind-to none (the Makefile does). */
#define _GNU_SOURCE /* sched_getaffinity */
#define MPAR_IMPLEMENTATION
#include "mpar.h"

#include <mpi.h>
#include <sched.h>

enum { WIDTH = 384, BLOCKS = 6, BATCH = 256, M = 8, STEPS = 6 };
static int rank, size;
static mpar_context* ctx;
static mpar_model* model;
static float x[BATCH * WIDTH];
static int32_t y[BATCH];

/* A barrier that sleeps instead of spinning, so an idle rank leaves its
   core to the one measuring. */
static void quiet_barrier(void) {
    MPI_Request r;
    int done = 0;
    struct timespec nap = {0, 1000000};
    MPI_Ibarrier(MPI_COMM_WORLD, &r);
    while (!done) {
        MPI_Test(&r, &done, MPI_STATUS_IGNORE);
        if (!done) nanosleep(&nap, NULL);
    }
}

static double run(int stages, int devices_apart, int mpi) {
    mpar_stage_desc st[2];
    mpar_pipeline_desc pd;
    mpar_pipeline* p = NULL;
    MPI_Comm comm = MPI_COMM_WORLD;
    mpar_batch b;
    mpar_step_info info;
    double t0, best = 1e30;
    int L = mpar_model_layer_count(model), j, s;
    for (j = 0; j < stages; j++) {
        st[j].device = devices_apart ? j : 0;
        st[j].first_layer = 2 * BLOCKS * j / stages;
        st[j].last_layer = j == stages - 1 ? L - 1 : 2 * BLOCKS * (j + 1) / stages - 1;
    }
    memset(&pd, 0, sizeof pd);
    pd.stages = st, pd.stage_count = stages, pd.schedule = MPAR_SCHEDULE_1F1B, pd.microbatches = M;
    pd.max_batch = BATCH, pd.optimizer.kind = MPAR_OPTIMIZER_SGD, pd.timeout_seconds = 120;
    pd.mpi_comm = mpi ? &comm : NULL;
    if (mpar_pipeline_create(ctx, model, &pd, &p) != MPAR_SUCCESS) {
        fprintf(stderr, "rank %d: %s\n", rank, mpar_last_error(ctx));
        MPI_Abort(MPI_COMM_WORLD, 1);
    }
    b.inputs = x, b.targets = y, b.samples = BATCH;
    for (s = 0; s < STEPS + 2; s++) {
        t0 = mpar__now();
        if (mpar_pipeline_train_step(p, &b, &info) != MPAR_SUCCESS) {
            fprintf(stderr, "rank %d: %s\n", rank, mpar_last_error(ctx));
            MPI_Abort(MPI_COMM_WORLD, 1);
        }
        if (s >= 2 && mpar__now() - t0 < best) best = mpar__now() - t0;
    }
    mpar_pipeline_destroy(p);
    return best;
}

int main(int argc, char** argv) {
    int provided, i;
    mpar_desc d;
    mpar_error err;
    mpar_model_desc md;
    uint64_t s = 3;
    double one = 0, two = 0, ranks = 0;
    int cpus = 0;
    cpu_set_t set;
    MPI_Init_thread(&argc, &argv, MPI_THREAD_MULTIPLE, &provided);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    if (provided < MPI_THREAD_MULTIPLE || size != 2) {
        if (rank == 0) fprintf(stderr, "bench_mpi: needs 2 ranks and MPI_THREAD_MULTIPLE\n");
        MPI_Finalize();
        return 1;
    }
    memset(&d, 0, sizeof d);
    d.error = &err;
    if (mpar_create(&d, &ctx) != MPAR_SUCCESS || mpar_device_count(ctx) < 2) {
        fprintf(stderr, "rank %d: needs 2 devices per process: %s\n", rank, err.message);
        MPI_Abort(MPI_COMM_WORLD, 1);
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
    for (i = 0; i < BATCH * WIDTH; i++) x[i] = (float)(2.0 * mpar__rng_uniform(&s) - 1.0);
    for (i = 0; i < BATCH; i++) y[i] = (int32_t)(mpar__rng_next(&s) % 10);
    if (sched_getaffinity(0, sizeof set, &set) == 0) cpus = CPU_COUNT(&set);
    if (rank == 0 && cpus < 2)
        fprintf(stderr, "bench_mpi: rank 0 may run on %d CPU: its 2 devices share it (mpirun --bind-to none)\n", cpus);
    for (i = 0; i < 2; i++) { /* alternate, twice, so drift hits all three */
        if (rank == 0) one += run(1, 0, 0), two += run(2, 1, 0);
        quiet_barrier();
        ranks += run(2, 0, 1);
        quiet_barrier();
    }
    if (rank == 0) {
        printf("step_ms_1dev: %.2f\nstep_ms_2dev_1process: %.2f\nstep_ms_2rank: %.2f\n", 500 * one, 500 * two,
               500 * ranks);
        printf("speedup_mpi_2rank: %.3f\n", one / ranks);
        printf("speedup_2dev_1process: %.3f\n", one / two);
        printf("mpi_over_1process_2dev: %.3f\n", ranks / two);
        printf("cpus_rank0: %d\n", cpus);
    }
    mpar_model_destroy(model);
    mpar_destroy(ctx);
    MPI_Finalize();
    return 0;
}
