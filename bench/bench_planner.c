/* Planner speed on a random heterogeneous instance: 1,000 layers, 8
   devices with different speeds, memory and links. Prints one
   `name: value` per line; times are the best of a few runs. */
#define MPAR_IMPLEMENTATION
#include "../mpar.h"

#include <stdio.h>
#include <string.h>
#include <time.h>

#define LAYERS 1000
#define DEVICES 8

static uint64_t rng = 0x9E3779B97F4A7C15ULL;

static double unit(void) { /* xorshift64 in [0, 1) */
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (double)(rng >> 11) / 9007199254740992.0;
}

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return 1e3 * (double)ts.tv_sec + 1e-6 * (double)ts.tv_nsec;
}

static mpar_plan_layer layers[LAYERS];
static mpar_plan_device devices[DEVICES];
static mpar_plan_link links[DEVICES * DEVICES];

/* Transformer-ish layers of uneven size; devices 1-20 TFLOP/s with room
   for about 1.5x the model in total; links 5-50 GB/s, 5-50 us. */
static void make_instance(void) {
    double total = 0.0;
    int l, d;
    for (l = 0; l < LAYERS; ++l) {
        double f = 1e11 * (0.5 + unit());
        layers[l].flops_forward = f;
        layers[l].flops_backward_input = f;
        layers[l].flops_backward_weight = f;
        layers[l].param_bytes = (uint64_t)(4e7 * (0.5 + unit()));
        layers[l].optimizer_bytes = 2 * layers[l].param_bytes;
        layers[l].activation_bytes = (uint64_t)(1e7 * (0.5 + unit()));
        layers[l].output_bytes = (uint64_t)(4e6 * (0.5 + unit()));
        total += 4.0 * (double)layers[l].param_bytes + 8.0 * (double)layers[l].activation_bytes;
    }
    for (d = 0; d < DEVICES; ++d) {
        devices[d].flops_per_second = 1e12 * (1.0 + 19.0 * unit());
        devices[d].memory_bytes = (uint64_t)(total * 1.5 / DEVICES * (0.5 + unit()));
        devices[d].reserve_bytes = 256u << 20;
    }
    for (d = 0; d < DEVICES * DEVICES; ++d) {
        links[d].bandwidth = 5e9 * (1.0 + 9.0 * unit());
        links[d].latency = 5e-6 * (1.0 + 9.0 * unit());
    }
}

/* Best of three runs of mpar_plan_create, in ms; -1 on failure. */
static double time_plan(const mpar_plan_desc* desc, mpar_plan* keep) {
    double best = -1.0;
    int run;
    for (run = 0; run < 3; ++run) {
        mpar_plan p;
        mpar_error err;
        double t0 = now_ms(), t;
        if (mpar_plan_create(desc, &p, &err) != MPAR_SUCCESS) {
            fprintf(stderr, "bench_planner: %s\n", err.message);
            return -1.0;
        }
        t = now_ms() - t0;
        if (best < 0.0 || t < best) best = t;
        if (run == 0 && keep) *keep = p;
        else mpar_plan_free(&p);
    }
    return best;
}

int main(void) {
    mpar_plan_desc desc;
    mpar_plan search, fixed, six;
    double t_search, t_fixed, t_six;
    make_instance();
    memset(&desc, 0, sizeof desc);
    desc.num_layers = LAYERS;
    desc.layers = layers;
    desc.num_devices = DEVICES;
    desc.devices = devices;
    desc.links = links;
    desc.schedule = MPAR_SCHEDULE_1F1B;
    desc.microbatches = 16;
    t_search = time_plan(&desc, &search); /* 8 devices: hill climb over orders */
    desc.order = MPAR_PLAN_ORDER_FIXED;
    t_fixed = time_plan(&desc, &fixed);   /* exact over the 255 subsequences */
    desc.order = MPAR_PLAN_ORDER_SEARCH;
    desc.num_devices = 6;                 /* exact over all 1,956 ordered subsets */
    t_six = time_plan(&desc, &six);
    if (t_search < 0.0 || t_fixed < 0.0 || t_six < 0.0) return 1;
    printf("planner_ms_1000x8: %.1f\n", t_search);
    printf("planner_ms_1000x8_fixed_order: %.1f\n", t_fixed);
    printf("planner_ms_1000x6_exhaustive: %.1f\n", t_six);
    printf("orders_evaluated_1000x8: %ld\n", search.orders_evaluated);
    printf("orders_evaluated_1000x6: %ld\n", six.orders_evaluated);
    printf("stages_1000x8: %d\n", search.num_stages);
    printf("step_ratio_fixed_vs_searched_1000x8: %.4f\n", fixed.step_seconds / search.step_seconds);
    printf("bottleneck_ratio_fixed_vs_searched_1000x8: %.4f\n", fixed.bottleneck_seconds / search.bottleneck_seconds);
    mpar_plan_free(&search);
    mpar_plan_free(&fixed);
    mpar_plan_free(&six);
    return 0;
}
