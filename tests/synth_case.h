/* What tests/test_synth.c and bench/bench_synth.c share: the best built-in
   schedule that fits a synthesis desc, and the realistic unequal case.
   Include after mpar.h. */
#ifndef MPAR_TEST_SYNTH_CASE_H
#define MPAR_TEST_SYNTH_CASE_H
#include <string.h>

/* The kinds a synthesis is measured against: every one that keeps M (not
   SEQUENTIAL) and is not the synthesizer itself (AUTO). mpar_schedule_create
   refuses the ones it cannot make yet, and those are skipped. */
static const mpar_schedule_kind synth_builtin_kinds[] = {MPAR_SCHEDULE_GPIPE, MPAR_SCHEDULE_1F1B,
                                                         MPAR_SCHEDULE_INTERLEAVED_1F1B, MPAR_SCHEDULE_ZB_H1,
                                                         MPAR_SCHEDULE_ZB_H2, MPAR_SCHEDULE_ZB_V};
#define SYNTH_BUILTIN_KINDS ((int)(sizeof synth_builtin_kinds / sizeof synth_builtin_kinds[0]))

/* Built-in kind k for d's P, M, V and placement, or NULL when
   mpar_schedule_create refuses it or makes another shape. */
static mpar_schedule* synth_builtin(const mpar_synth_desc* d, int k) {
    mpar_schedule* sc = NULL;
    mpar_error err;
    int V = d->virtual_stages > 0 ? d->virtual_stages : 1, vs, ok;
    if (mpar_schedule_create(synth_builtin_kinds[k], d->stages, d->microbatches, V, &sc, &err) != MPAR_SUCCESS)
        return NULL;
    ok = sc->microbatches == d->microbatches && sc->virtual_stages == V;
    for (vs = 0; ok && vs < d->stages * V; ++vs)
        ok = sc->placement[vs] == (d->placement ? d->placement[vs] : vs % d->stages);
    if (!ok) {
        mpar_schedule_destroy(sc);
        return NULL;
    }
    return sc;
}

static int synth_fits(const mpar_schedule* sc, const int* cap) {
    int s;
    for (s = 0; cap && s < sc->stages; ++s)
        if (cap[s] > 0 && sc->peak_in_flight[s] > cap[s]) return 0;
    return 1;
}

/* Simulated step of sc under d's costs, -1 on failure. */
static double synth_step(const mpar_schedule* sc, const mpar_synth_desc* d) {
    mpar_simulation* sim = NULL;
    mpar_error err;
    double t;
    if (mpar_simulate(sc, &d->costs, &sim, &err) != MPAR_SUCCESS) return -1.0;
    t = sim->step_time;
    mpar_simulation_destroy(sim);
    return t;
}

/* Shortest step of the built-ins that fit d's caps (-1: none fits); *kind
   the one that gives it. */
static double synth_best_builtin(const mpar_synth_desc* d, mpar_schedule_kind* kind) {
    double best = -1.0;
    int k;
    for (k = 0; k < SYNTH_BUILTIN_KINDS; ++k) {
        mpar_schedule* sc = synth_builtin(d, k);
        if (!sc) continue;
        if (synth_fits(sc, d->max_in_flight)) {
            double t = synth_step(sc, d);
            if (t >= 0.0 && (best < 0.0 || t < best)) {
                best = t;
                if (kind) *kind = synth_builtin_kinds[k];
            }
        }
        mpar_schedule_destroy(sc);
    }
    return best;
}

/* A realistic unequal pipeline: 4 devices, 2 chunks each, interleaved
   (Megatron placement), in units of one transformer chunk's forward:
   - chunk 0 (virtual stage 0) holds the embedding: a cheap forward and
     input gradient (a lookup), an expensive weight gradient (a scatter-add
     into a large table): F 0.5, I 0.6, W 2.5;
   - the last chunk (virtual stage 7, on device 3) holds a large-vocabulary
     head: F, I and W all 3;
   - the others: F = I = W = 1;
   - every link delays a message by 0.1 (asynchronous copies);
   - device 3 has half the memory of the others: 8 activation stashes
     against 16 (interleaved 1F1B, the one built-in for this placement,
     needs 11, 9, 7, 5). */
static const double synth_case_f[8] = {0.5, 1, 1, 1, 1, 1, 1, 3};
static const double synth_case_i[8] = {0.6, 1, 1, 1, 1, 1, 1, 3};
static const double synth_case_w[8] = {2.5, 1, 1, 1, 1, 1, 1, 3};
static const double synth_case_link[7] = {0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1};
static const int synth_case_cap[4] = {16, 16, 16, 8};

static void synth_case_desc(mpar_synth_desc* d, int microbatches) {
    memset(d, 0, sizeof *d);
    d->stages = 4;
    d->virtual_stages = 2;
    d->microbatches = microbatches;
    d->costs.forward_per_stage = synth_case_f;
    d->costs.backward_input_per_stage = synth_case_i;
    d->costs.backward_weight_per_stage = synth_case_w;
    d->costs.link_delay_per_boundary = synth_case_link;
    d->max_in_flight = synth_case_cap;
}

#endif
