/* What mpar_schedule_synthesize gains over the built-in schedules on a
   realistic unequal pipeline (tests/synth_case.h: 4 devices, 2 chunks each,
   an embedding-heavy first chunk, a head three times a chunk on the last,
   one device with half the memory), as the simulator predicts it, and how
   long a synthesis takes. Pure C, no devices. Prints one `name: value` per
   line. */
#define MPAR_IMPLEMENTATION
#include "../mpar.h"
#include "../tests/synth_case.h"

#include <stdio.h>
#include <string.h>
#include <time.h>

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* Synthesised step over the best fitting built-in's, and the seconds per
   synthesis (best of `runs`); 0 on failure. */
static int measure(const mpar_synth_desc* d, int runs, double* ratio, double* seconds) {
    mpar_schedule* sc = NULL;
    mpar_error err;
    double built = synth_best_builtin(d, NULL), t;
    int k;
    *seconds = 0.0;
    for (k = 0; k < runs; ++k) {
        double t0 = now();
        if (mpar_schedule_synthesize(d, &sc, &err) != MPAR_SUCCESS) {
            fprintf(stderr, "bench_synth: %s\n", err.message);
            return 0;
        }
        t = now() - t0;
        if (k == 0 || t < *seconds) *seconds = t;
        if (k + 1 < runs) mpar_schedule_destroy(sc);
    }
    t = synth_step(sc, d);
    mpar_schedule_destroy(sc);
    if (built <= 0.0 || t <= 0.0) return 0;
    *ratio = t / built;
    return 1;
}

int main(void) {
    mpar_synth_desc d;
    double r8, r16, rl, s8, s16, sl, f[16];
    int vs;
    synth_case_desc(&d, 8);
    if (!measure(&d, 5, &r8, &s8)) return 1;
    synth_case_desc(&d, 16);
    if (!measure(&d, 5, &r16, &s16)) return 1;
    memset(&d, 0, sizeof d); /* P = 8, M = 32, unequal forwards, no caps */
    d.stages = 8, d.microbatches = 32, d.virtual_stages = 2;
    for (vs = 0; vs < 16; ++vs) f[vs] = 0.5 + 0.25 * (vs % 4);
    d.costs.forward_per_stage = f;
    d.costs.link_delay = 0.1;
    if (!measure(&d, 3, &rl, &sl)) return 1;
    printf("synth_over_best_builtin_simulated: %.4f\n", r8);
    printf("synth_over_best_builtin_simulated_m16: %.4f\n", r16);
    printf("synth_seconds_realistic_m8: %.4f\n", s8);
    printf("synth_seconds_realistic_m16: %.4f\n", s16);
    printf("synth_over_best_builtin_simulated_p8_m32_v2: %.4f\n", rl);
    printf("synth_seconds_p8_m32_v2: %.4f\n", sl);
    return 0;
}
