/* What waiting for a message costs a rank, for each way of polling in
   mpar__mpi_wait. Run with `mpirun -np 2 bench/mpi/bench_mpi_wait` (both
   ranks on one machine: the wake-up delay compares the two ranks'
   CLOCK_MONOTONIC). Rank 1 waits, rank 0 sends; each trial alternates the
   strategies so that load drift hits them all. Measures
     - a long wait: rank 0 sends LONG_MS after both leave a barrier; rank 1
       reports the CPU its thread burnt per wall second of waiting and how
       late it saw the message (its return minus rank 0's send time);
     - a ping-pong of an 8-byte message, each receive through the strategy,
       against plain MPI_Wait (which spins) on both sides.
   Every strategy runs through mpar__mpi_wait, with the pipeline's mpi_polling
   set to it. Prints, on rank 1, per strategy and then for mpar's own
   (the pipeline's mpi_polling as compiled):
     mpi_wait_cpu_fraction[_<strategy>]: CPU s per wall s while waiting
     mpi_wait_wake_us[_<strategy>]: message sent to wait returned (plain
                                    MPI_Wait's is printed alone)
     mpi_wait_added_latency_us[_<strategy>]: ping-pong round trip minus plain
                                    MPI_Wait's round trip
   Medians over the trials. With other processes on the cores the wake-up
   delays are the scheduler's (several ms, spinners the latest), not the
   policy's: read them on an idle machine. */
#define MPAR_IMPLEMENTATION
#include "mpar.h"

#include <mpi.h>

enum { LONG_MS = 20, LONG_TRIALS = 15, PINGS = 400, PING_TRIALS = 15, TAG = 30000 };

typedef struct {
    const char* name;
    int plain; /* MPI_Wait, else mpar__mpi_wait with this polling: */
    mpar__mpi_polling how;
} strategy;

static strategy strategies[] = {
    {"plain", 1, {0, 0, 0}},
    {"nap100", 0, {0, 100e-6, 100e-6}},           /* mpar until 42f599c: a fixed 100 us nap */
    {"spin", 0, {1e9, 0, 0}},                     /* MPI_Test back to back */
    {"spin50_cap100", 0, {50e-6, 5e-6, 100e-6}},  /* adaptive: spin 50 us, then doubling naps up to... */
    {"spin50_cap250", 0, {50e-6, 5e-6, 250e-6}},
    {"spin50_cap500", 0, {50e-6, 5e-6, 500e-6}},
    {"spin50_cap1000", 0, {50e-6, 5e-6, 1000e-6}},
    {"mpar", 0, {0, 0, 0}}, /* mpar's own, set in main */
};
enum { NS = sizeof strategies / sizeof strategies[0] };

static int rank;
static mpar__worker* w;
static mpar__link* l;

static double cpu_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void wait_with(const strategy* s, MPI_Request* req, int is_send) {
    mpar_result r = MPAR_SUCCESS;
    if (s->plain) {
        MPI_Wait(req, MPI_STATUS_IGNORE);
        return;
    }
    w->p->mpi_polling = s->how; /* this pipeline's links wait this way */
    r = mpar__mpi_wait(w, l, req, is_send, 0);
    if (r != MPAR_SUCCESS) {
        fprintf(stderr, "rank %d: wait failed: %s\n", rank, mpar_last_error(w->p->ctx));
        MPI_Abort(MPI_COMM_WORLD, 1);
    }
}

/* Rank 1 waits for a message rank 0 sends LONG_MS later; returns on rank 1
   the CPU fraction and the delay from send to return. */
static void long_wait(const strategy* s, double* cpu_fraction, double* wake) {
    double sent = 0, t0, c0;
    MPI_Request req;
    MPI_Barrier(MPI_COMM_WORLD);
    if (rank == 0) {
        struct timespec nap = {0, LONG_MS * 1000000L};
        nanosleep(&nap, NULL);
        sent = mpar__now();
        MPI_Send(&sent, 1, MPI_DOUBLE, 1, TAG, MPI_COMM_WORLD);
        return;
    }
    t0 = mpar__now(), c0 = cpu_now();
    MPI_Irecv(&sent, 1, MPI_DOUBLE, 0, TAG, MPI_COMM_WORLD, &req);
    wait_with(s, &req, 0);
    *wake = mpar__now() - sent;
    *cpu_fraction = (cpu_now() - c0) / (mpar__now() - t0);
}

/* Mean round trip of PINGS 8-byte ping-pongs, every wait through s. */
static double ping_pong(const strategy* s) {
    double msg = 0, t0;
    int i, other = 1 - rank;
    MPI_Barrier(MPI_COMM_WORLD);
    t0 = mpar__now();
    for (i = 0; i < PINGS; i++) {
        MPI_Request req;
        if (rank == 0) {
            MPI_Isend(&msg, 1, MPI_DOUBLE, other, TAG + 1, MPI_COMM_WORLD, &req);
            wait_with(s, &req, 1);
        }
        MPI_Irecv(&msg, 1, MPI_DOUBLE, other, TAG + 1, MPI_COMM_WORLD, &req);
        wait_with(s, &req, 0);
        if (rank == 1) {
            MPI_Isend(&msg, 1, MPI_DOUBLE, other, TAG + 1, MPI_COMM_WORLD, &req);
            wait_with(s, &req, 1);
        }
    }
    return (mpar__now() - t0) / PINGS;
}

static int cmp(const void* a, const void* b) {
    double x = *(const double*)a, y = *(const double*)b;
    return (x > y) - (x < y);
}
static double median(double* v, int n) {
    qsort(v, (size_t)n, sizeof *v, cmp);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

int main(int argc, char** argv) {
    static double cpu[NS][LONG_TRIALS], wake[NS][LONG_TRIALS], rt[NS][PING_TRIALS];
    double cpu_m[NS], wake_m[NS], rt_m[NS];
    int provided, size, i, k;
    mpar_desc d;
    mpar_error err;
    mpar_model_desc md;
    mpar_model* model;
    mpar_context* ctx;
    mpar_stage_desc st[2];
    mpar_pipeline_desc pd;
    mpar_pipeline* p = NULL;
    MPI_Comm comm = MPI_COMM_WORLD;
    static float x[4 * 8];
    static int32_t y[4];
    mpar_batch b;
    strategies[NS - 1].how = mpar__mpi_polling_default;
    MPI_Init_thread(&argc, &argv, MPI_THREAD_MULTIPLE, &provided);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    if (provided < MPI_THREAD_MULTIPLE || size != 2) {
        if (rank == 0) fprintf(stderr, "bench_mpi_wait: needs 2 ranks and MPI_THREAD_MULTIPLE\n");
        MPI_Finalize();
        return 1;
    }
    /* A two-stage pipeline over the two ranks gives the worker and the link
       that mpar__mpi_wait polls (its abort flag, peer and timeout). */
    memset(&d, 0, sizeof d);
    d.error = &err;
    memset(&md, 0, sizeof md);
    md.input_features = 8, md.seed = 1;
    if (mpar_create(&d, &ctx) != MPAR_SUCCESS || mpar_model_create(&md, &model, &err) != MPAR_SUCCESS ||
        mpar_model_add_linear(model, 4, &err) != MPAR_SUCCESS ||
        mpar_model_add_simple(model, mpar_layer_cross_entropy(), &err) != MPAR_SUCCESS) {
        fprintf(stderr, "rank %d: %s\n", rank, err.message);
        MPI_Abort(MPI_COMM_WORLD, 1);
    }
    st[0].device = st[1].device = 0;
    st[0].first_layer = st[0].last_layer = 0;
    st[1].first_layer = st[1].last_layer = 1;
    memset(&pd, 0, sizeof pd);
    pd.stages = st, pd.stage_count = 2, pd.schedule = MPAR_SCHEDULE_GPIPE, pd.microbatches = 1, pd.max_batch = 4;
    pd.optimizer.kind = MPAR_OPTIMIZER_SGD, pd.timeout_seconds = 60, pd.mpi_comm = &comm;
    b.inputs = x, b.targets = y, b.samples = 4;
    if (mpar_pipeline_create(ctx, model, &pd, &p) != MPAR_SUCCESS || mpar_pipeline_train_step(p, &b, NULL) != MPAR_SUCCESS) {
        fprintf(stderr, "rank %d: %s\n", rank, mpar_last_error(ctx));
        MPI_Abort(MPI_COMM_WORLD, 1);
    }
    w = &p->workers[rank], l = &p->links[0];
    if (l->peer != 1 - rank) {
        fprintf(stderr, "rank %d: link peer is %d\n", rank, l->peer);
        MPI_Abort(MPI_COMM_WORLD, 1);
    }

    for (k = 0; k < LONG_TRIALS; k++)
        for (i = 0; i < NS; i++) long_wait(&strategies[(i + k) % NS], &cpu[(i + k) % NS][k], &wake[(i + k) % NS][k]);
    for (k = 0; k < PING_TRIALS; k++)
        for (i = 0; i < NS; i++) rt[(i + k) % NS][k] = ping_pong(&strategies[(i + k) % NS]);

    if (rank == 1) {
        for (i = 0; i < NS; i++) {
            cpu_m[i] = median(cpu[i], LONG_TRIALS);
            wake_m[i] = median(wake[i], LONG_TRIALS);
            rt_m[i] = median(rt[i], PING_TRIALS);
        }
        printf("mpi_wait_plain_wake_us: %.1f\nmpi_wait_plain_round_trip_us: %.1f\n", 1e6 * wake_m[0], 1e6 * rt_m[0]);
        for (i = 1; i < NS; i++) {
            const char* sep = i == NS - 1 ? "" : "_";
            const char* name = i == NS - 1 ? "" : strategies[i].name;
            printf("mpi_wait_cpu_fraction%s%s: %.3f\n", sep, name, cpu_m[i]);
            printf("mpi_wait_wake_us%s%s: %.1f\n", sep, name, 1e6 * wake_m[i]);
            printf("mpi_wait_added_latency_us%s%s: %.1f\n", sep, name, 1e6 * (rt_m[i] - rt_m[0]));
        }
    }
    mpar_pipeline_destroy(p);
    mpar_model_destroy(model);
    mpar_destroy(ctx);
    MPI_Finalize();
    return 0;
}
