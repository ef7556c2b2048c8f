/* What asynchronous links gain, as the simulator and the planner model it,
   on a GPU-like cost table: four stages, 1F1B and ZB-H1 with eight
   micro-batches, forward 1, backward 2 (input 1 + weight 1), and every
   message's copy at 30% of a stage's forward time. Blocking links
   (host-staged, device copy then wait) keep both workers busy for each
   copy; asynchronous ones (a copy queue and events) only delay the
   receiver. Pure C, no devices. Prints one `name: value` per line. */
#define MPAR_IMPLEMENTATION
#include "../mpar.h"

#include <stdio.h>
#include <string.h>

static double step(mpar_schedule_kind kind, int blocking) {
    mpar_schedule* sc = NULL;
    mpar_simulation* sim = NULL;
    mpar_sim_desc d;
    mpar_error err;
    double t;
    if (mpar_schedule_create(kind, 4, 8, 1, &sc, &err) != MPAR_SUCCESS) {
        fprintf(stderr, "bench_links: %s\n", err.message);
        return -1.0;
    }
    memset(&d, 0, sizeof d);
    d.forward = 1.0, d.backward = 2.0, d.backward_input = 1.0, d.backward_weight = 1.0;
    d.link_delay = 0.3;
    d.link_blocking = blocking;
    if (mpar_simulate(sc, &d, &sim, &err) != MPAR_SUCCESS) {
        fprintf(stderr, "bench_links: %s\n", err.message);
        mpar_schedule_destroy(sc);
        return -1.0;
    }
    t = sim->step_time;
    mpar_simulation_destroy(sim);
    mpar_schedule_destroy(sc);
    return t;
}

/* The planner on 4 equal GPUs and 32 equal layers, links carrying 30% of a
   stage's forward: its predicted step with overlapping links over its step
   with blocking ones. */
static double plan_ratio(void) {
    mpar_plan_layer layers[32];
    mpar_plan_device dev[4];
    mpar_plan_link links[16];
    mpar_plan_desc d;
    mpar_plan a, b;
    mpar_error err;
    double r;
    int i;
    memset(layers, 0, sizeof layers), memset(dev, 0, sizeof dev), memset(links, 0, sizeof links);
    for (i = 0; i < 32; i++) {
        layers[i].flops_forward = 1e9, layers[i].flops_backward_input = 1e9, layers[i].flops_backward_weight = 1e9;
        layers[i].output_bytes = 1 << 20;
    }
    for (i = 0; i < 4; i++) dev[i].flops_per_second = 1e12; /* a stage of 8 layers: 8 ms forward */
    for (i = 0; i < 16; i++) {                                /* X = 2 * (lat + 1 MiB / bw) = 30% of 8 ms */
        links[i].latency = 0.0;
        links[i].bandwidth = 2.0 * (double)(1 << 20) / (0.3 * 8e-3);
    }
    memset(&d, 0, sizeof d);
    d.num_layers = 32, d.layers = layers, d.num_devices = 4, d.devices = dev, d.links = links;
    d.schedule = MPAR_SCHEDULE_1F1B, d.microbatches = 8, d.order = MPAR_PLAN_ORDER_FIXED;
    if (mpar_plan_create(&d, &b, &err) != MPAR_SUCCESS) {
        fprintf(stderr, "bench_links: %s\n", err.message);
        return -1.0;
    }
    for (i = 0; i < 16; i++) links[i].overlaps = 1;
    if (mpar_plan_create(&d, &a, &err) != MPAR_SUCCESS) {
        fprintf(stderr, "bench_links: %s\n", err.message);
        mpar_plan_free(&b);
        return -1.0;
    }
    r = a.step_seconds / b.step_seconds;
    mpar_plan_free(&a);
    mpar_plan_free(&b);
    return r;
}

int main(void) {
    double a1 = step(MPAR_SCHEDULE_1F1B, 0), b1 = step(MPAR_SCHEDULE_1F1B, 1);
    double az = step(MPAR_SCHEDULE_ZB_H1, 0), bz = step(MPAR_SCHEDULE_ZB_H1, 1);
    double pr = plan_ratio();
    if (a1 <= 0 || b1 <= 0 || az <= 0 || bz <= 0 || pr <= 0) return 1;
    printf("sim_step_async_gpu_like: %.3f\n", a1);
    printf("sim_step_blocking_gpu_like: %.3f\n", b1);
    printf("sim_async_over_blocking_gpu_like: %.4f\n", a1 / b1);
    printf("sim_async_over_blocking_gpu_like_zbh1: %.4f\n", az / bz);
    printf("plan_async_over_blocking_gpu_like: %.4f\n", pr);
    return 0;
}
