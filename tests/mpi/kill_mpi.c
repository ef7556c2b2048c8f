/* Helper for scripts/kill-test.sh (not a unit test): the kill test's
   training run with its stages in separate processes.
     mpirun -np N tests/mpi/kill_mpi PATH [STEPS]
   resumes from PATH if rank 0 has it (every rank loads it, collectively),
   then trains, every rank saving to PATH after every step (rank 0 writes
   it). One stage per rank, stage 0 (the ~15 MB embedding table) on the
   last rank, so that most of every save crosses MPI to rank 0. Rank 0
   prints "resumed at step N" and "saved step N". Exit codes: 0 done, 1 the
   load failed, 2 usage or setup error. */
#define MPAR_IMPLEMENTATION
#include "mpar.h"

#include <mpi.h>
#include <unistd.h>

#include "../ckpt_model.h"

static int train(mpar_context* ctx, const char* path, long steps, int rank, int size) {
    mpar_model* m = big_model();
    mpar_stage_desc st[8];
    int stage_rank[8], have = 0, L, j;
    mpar_pipeline_desc pd;
    mpar_pipeline* p = NULL;
    MPI_Comm comm = MPI_COMM_WORLD;
    static int32_t x[BATCH], y[BATCH];
    mpar_batch b;
    mpar_error err;
    uint64_t s = 5;
    long i;
    if (!m || size > 6) return 2;
    L = mpar_model_layer_count(m);
    for (j = 0; j < size; j++) {
        st[j].device = 0;
        st[j].first_layer = L * j / size;
        st[j].last_layer = L * (j + 1) / size - 1;
        stage_rank[j] = size - 1 - j;
    }
    memset(&pd, 0, sizeof pd);
    pd.stages = st, pd.stage_count = size, pd.stage_rank = stage_rank, pd.mpi_comm = &comm;
    pd.schedule = MPAR_SCHEDULE_1F1B, pd.microbatches = 4, pd.max_batch = BATCH;
    pd.optimizer.kind = MPAR_OPTIMIZER_ADAMW, pd.optimizer.lr = 0.01f, pd.optimizer.momentum = 0.9f;
    pd.timeout_seconds = 60;
    if (mpar_pipeline_create(ctx, m, &pd, &p) != MPAR_SUCCESS) {
        fprintf(stderr, "kill_mpi: rank %d: pipeline: %s\n", rank, mpar_last_error(ctx));
        return 2;
    }
    if (rank == 0) have = access(path, F_OK) == 0; /* the file is rank 0's alone */
    MPI_Bcast(&have, 1, MPI_INT, 0, MPI_COMM_WORLD);
    if (have && mpar_pipeline_load_checkpoint(p, path, &err) != MPAR_SUCCESS) {
        fprintf(stderr, "kill_mpi: rank %d: cannot resume: %s\n", rank, err.message);
        return 1;
    }
    if (rank == 0) printf("resumed at step %d\n", mpar_pipeline_get_step(p));
    fflush(stdout);
    for (i = 0; steps < 0 || i < steps; i++) {
        int k;
        mpar_step_info info;
        for (k = 0; k < BATCH; k++) x[k] = (int32_t)(mpar__rng_next(&s) % VOCAB);
        for (k = 0; k < BATCH; k++) y[k] = (int32_t)(mpar__rng_next(&s) % 10);
        b.inputs = x, b.targets = y, b.samples = BATCH;
        if (mpar_pipeline_train_step(p, &b, &info) != MPAR_SUCCESS) {
            fprintf(stderr, "kill_mpi: rank %d: step: %s\n", rank, mpar_last_error(ctx));
            return 2;
        }
        if (mpar_pipeline_save_checkpoint(p, path, &err) != MPAR_SUCCESS) {
            fprintf(stderr, "kill_mpi: rank %d: save: %s\n", rank, err.message);
            return 2;
        }
        if (rank == 0) printf("saved step %d\n", info.step);
        fflush(stdout);
    }
    mpar_pipeline_destroy(p);
    mpar_model_destroy(m);
    return 0;
}

int main(int argc, char** argv) {
    mpar_context* ctx = NULL;
    mpar_desc d;
    mpar_error err;
    int provided = 0, rank = 0, size = 1, rc;
    MPI_Init_thread(&argc, &argv, MPI_THREAD_MULTIPLE, &provided);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    if (argc < 2 || provided < MPI_THREAD_MULTIPLE) {
        fprintf(stderr, "usage: mpirun -np N kill_mpi PATH [STEPS] (MPI with MPI_THREAD_MULTIPLE)\n");
        MPI_Finalize();
        return 2;
    }
    setenv("POCL_DEVICES", "basic", 1); /* one device per rank */
    memset(&d, 0, sizeof d);
    d.error = &err;
    if (mpar_create(&d, &ctx) != MPAR_SUCCESS) {
        fprintf(stderr, "kill_mpi: rank %d: %s\n", rank, err.message);
        MPI_Abort(MPI_COMM_WORLD, 2);
    }
    rc = train(ctx, argv[1], argc > 2 ? atol(argv[2]) : -1, rank, size);
    mpar_destroy(ctx);
    if (rc != 0) MPI_Abort(MPI_COMM_WORLD, rc); /* the other ranks may be waiting for this one */
    MPI_Finalize();
    return rc;
}
