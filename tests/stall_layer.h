/* A test layer: copies its input and, while `stall_seconds` is set, first
   sleeps that long in the training forward of the micro-batch that starts
   at row 0, as a hung neighbour (stage or rank) would; with `stall_stop`
   set it stops its whole process there instead (SIGSTOP, once), as a
   stopped rank would, until something sends it SIGCONT. Include after
   mpar.h. */
#ifndef MPAR_TEST_STALL_LAYER_H
#define MPAR_TEST_STALL_LAYER_H
#include <signal.h>
#include <time.h>

static double stall_seconds;
static volatile int stall_stop;
static mpar_result stall_setup(mpar_layer* l, mpar_error* err) {
    (void)err;
    l->out_features = l->in_features;
    return MPAR_SUCCESS;
}
static mpar_result stall_forward(mpar_exec* ex, const mpar_layer* l, const mpar_io* io) {
    int n = io->rows * l->in_features;
    if (stall_stop && io->row_offset == 0 && io->training) {
        stall_stop = 0;
        raise(SIGSTOP);
    }
    if (stall_seconds > 0 && io->row_offset == 0 && io->training) {
        struct timespec ts;
        ts.tv_sec = (time_t)stall_seconds;
        ts.tv_nsec = (long)((stall_seconds - (double)ts.tv_sec) * 1e9);
        nanosleep(&ts, NULL);
    }
    return mpar_exec_launch(ex, "elementwise.cl", "mpar_copy", (size_t)n, 0, "BBl", io->x, io->y, (size_t)n);
}
static mpar_result stall_backward(mpar_exec* ex, const mpar_layer* l, const mpar_io* io) {
    int n = io->rows * l->in_features;
    if (!io->need_dx) return MPAR_SUCCESS;
    return mpar_exec_launch(ex, "elementwise.cl", "mpar_copy", (size_t)n, 0, "BBl", io->dy, io->dx, (size_t)n);
}
static const mpar_layer_type stall_type = {"stall", 0, stall_setup, NULL, stall_forward, stall_backward, NULL};

#endif
