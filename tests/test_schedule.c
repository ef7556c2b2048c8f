/* Tests for section 6: schedules as data and the simulator. No device needed.

   gcc -std=c99 -Wall -Wextra -Werror -pedantic -fsanitize=address,undefined \
       -I/work/main tests/test_schedule.c -lcmocka -lm */
#define MPAR_IMPLEMENTATION
#include "../mpar.h"

#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#define assert_contains(hay, needle)                                                                       \
    do {                                                                                                   \
        if (!strstr((hay), (needle))) {                                                                    \
            print_error("expected \"%s\" in message \"%s\"\n", (needle), (hay));                           \
            fail();                                                                                        \
        }                                                                                                  \
    } while (0)

#define assert_near(a, b, tol)                                                                             \
    do {                                                                                                   \
        double a_ = (a), b_ = (b);                                                                         \
        if (!(fabs(a_ - b_) <= (tol))) {                                                                   \
            print_error("%s = %.12g, expected %.12g\n", #a, a_, b_);                                       \
            fail();                                                                                        \
        }                                                                                                  \
    } while (0)

static const mpar_schedule_kind all_kinds[] = {MPAR_SCHEDULE_SEQUENTIAL,       MPAR_SCHEDULE_GPIPE,
                                               MPAR_SCHEDULE_1F1B,             MPAR_SCHEDULE_INTERLEAVED_1F1B,
                                               MPAR_SCHEDULE_ZB_H1,            MPAR_SCHEDULE_ZB_H2,
                                               MPAR_SCHEDULE_ZB_V};

/* Chunks per stage the grids give a kind: interleaving 1 to 3, ZB-V its
   two, the rest one. */
static int v_first(mpar_schedule_kind kind) { return kind == MPAR_SCHEDULE_ZB_V ? 2 : 1; }
static int v_last(mpar_schedule_kind kind) {
    return kind == MPAR_SCHEDULE_INTERLEAVED_1F1B ? 3 : kind == MPAR_SCHEDULE_ZB_V ? 2 : 1;
}
static int splits_backward(mpar_schedule_kind kind) {
    return kind == MPAR_SCHEDULE_ZB_H1 || kind == MPAR_SCHEDULE_ZB_H2 || kind == MPAR_SCHEDULE_ZB_V;
}

static mpar_schedule* create_ok(mpar_schedule_kind kind, int P, int M, int V) {
    mpar_schedule* sc = NULL;
    mpar_error err;
    mpar_result r;
    memset(&err, 0, sizeof err);
    r = mpar_schedule_create(kind, P, M, V, &sc, &err);
    if (r != MPAR_SUCCESS) {
        print_error("create %s P=%d M=%d V=%d: %s\n", mpar_schedule_kind_name(kind), P, M, V, err.message);
        fail();
    }
    assert_non_null(sc);
    return sc;
}

static mpar_simulation* simulate_ok(const mpar_schedule* sc, const mpar_sim_desc* desc) {
    mpar_simulation* sim = NULL;
    mpar_error err;
    mpar_result r;
    memset(&err, 0, sizeof err);
    r = mpar_simulate(sc, desc, &sim, &err);
    if (r != MPAR_SUCCESS) {
        print_error("simulate P=%d M=%d V=%d: %s\n", sc->stages, sc->microbatches, sc->virtual_stages, err.message);
        fail();
    }
    assert_non_null(sim);
    return sim;
}

static mpar_sim_desc costs(double f, double b, double i, double w) {
    mpar_sim_desc d;
    memset(&d, 0, sizeof d);
    d.forward = f;
    d.backward = b;
    d.backward_input = i;
    d.backward_weight = w;
    return d;
}

/* Bubble of kind (P, M, V) under desc. */
static double bubble(mpar_schedule_kind kind, int P, int M, int V, const mpar_sim_desc* desc) {
    mpar_schedule* sc = create_ok(kind, P, M, V);
    mpar_simulation* sim = simulate_ok(sc, desc);
    double b = sim->bubble_fraction;
    mpar_simulation_destroy(sim);
    mpar_schedule_destroy(sc);
    return b;
}

/* Independent check of a simulation with scalar costs f, b, i, w, optimizer
   step 0, the same link delay on every boundary and micro-batch m's costs
   and delays times scale[m] (NULL: 1): every (vs, m) has its actions,
   every action lasts its cost and starts exactly at max(previous end on
   its stage, its inputs ready). Virtual stages and the stages they live on
   come from the schedule's accessors, whatever its placement. */
static void check_timing(const mpar_schedule* sc, const mpar_simulation* sim, double f, double b, double i,
                         double w, double link, const double* scale) {
    int P = sc->stages, M = sc->microbatches, V = sc->virtual_stages, VS = P * V, s, k;
    int n = VS * M;
    double* f_end = (double*)malloc(sizeof(double) * (size_t)n);
    double* g_end = (double*)malloc(sizeof(double) * (size_t)n); /* B or I */
    double* w_end = (double*)malloc(sizeof(double) * (size_t)n); /* B or W */
    assert_non_null(f_end);
    assert_non_null(g_end);
    assert_non_null(w_end);
    for (k = 0; k < n; ++k) f_end[k] = g_end[k] = w_end[k] = -1.0;
    assert_int_equal(sim->stages, P);
    for (s = 0; s < P; ++s) {
        assert_int_equal(sim->action_count[s], sc->action_count[s]);
        for (k = 0; k < sc->action_count[s]; ++k) {
            const mpar_action* a = &sc->actions[s][k];
            double e = sim->end[s][k];
            if (a->kind == MPAR_ACTION_OPTIMIZER_STEP) continue;
            {
                int idx = mpar_schedule_virtual_stage(sc, s, a->chunk) * M + a->microbatch;
                if (a->kind == MPAR_ACTION_FORWARD) f_end[idx] = e;
                if (a->kind == MPAR_ACTION_BACKWARD || a->kind == MPAR_ACTION_BACKWARD_INPUT) g_end[idx] = e;
                if (a->kind == MPAR_ACTION_BACKWARD || a->kind == MPAR_ACTION_BACKWARD_WEIGHT) w_end[idx] = e;
            }
        }
    }
    for (k = 0; k < n; ++k) {
        assert_true(f_end[k] >= 0.0);
        assert_true(g_end[k] >= 0.0);
        assert_true(w_end[k] >= 0.0);
    }
    for (s = 0; s < P; ++s) {
        for (k = 0; k < sc->action_count[s]; ++k) {
            const mpar_action* a = &sc->actions[s][k];
            int vs = mpar_schedule_virtual_stage(sc, s, a->chunk), m = a->microbatch;
            double ready = k > 0 ? sim->end[s][k - 1] : 0.0, dur = 0.0, dep = 0.0, x = 1.0;
            if (a->kind != MPAR_ACTION_OPTIMIZER_STEP && scale) x = scale[m];
            switch (a->kind) {
            case MPAR_ACTION_FORWARD:
                dur = f * x;
                if (vs > 0) dep = f_end[(vs - 1) * M + m] + (mpar_schedule_stage_of(sc, vs - 1) != s ? link * x : 0.0);
                break;
            case MPAR_ACTION_BACKWARD:
            case MPAR_ACTION_BACKWARD_INPUT:
                dur = (a->kind == MPAR_ACTION_BACKWARD ? b : i) * x;
                dep = f_end[vs * M + m];
                if (vs + 1 < VS) {
                    double g = g_end[(vs + 1) * M + m] + (mpar_schedule_stage_of(sc, vs + 1) != s ? link * x : 0.0);
                    if (g > dep) dep = g;
                }
                break;
            case MPAR_ACTION_BACKWARD_WEIGHT:
                dur = w * x;
                dep = g_end[vs * M + m];
                break;
            default: break;
            }
            if (dep > ready) ready = dep;
            assert_near(sim->start[s][k], ready, 1e-9 * (1.0 + ready));
            assert_near(sim->end[s][k] - sim->start[s][k], dur, 1e-9 * (1.0 + ready));
            assert_true(sim->end[s][k] <= sim->step_time + 1e-9);
        }
    }
    free(f_end);
    free(g_end);
    free(w_end);
}

/* ---- every generated schedule runs, with the right shape and timing ---- */

/* Step time of a generated schedule with uniform costs F = 1, B = 2 (I = W
   = 1) per chunk, no link delay and no optimizer cost, where a closed form
   is known; -1 otherwise.
     SEQUENTIAL      the batch through P stages one after another: 3P
     GPIPE, 1F1B     3 (M + P - 1): bubble (P - 1) / (M + P - 1)
     ZB_H1, ZB_H2    M >= P: 3M + P - 1, the (P - 1) / (3M + P - 1) bubble;
                     M < P: micro-batch 0 takes 2P - 1 to come back to
                     stage 0 as an I (P forwards, P - 1 I's), then stage 0
                     runs I, W of each micro-batch back to back: 2P - 1 + 2M
     ZB_V            in chunk units, 2M >= 3P - 1: 6M + P - 1, the floor
                     (the device of virtual stage P - 1 starts at P - 1 and
                     has 6M of work); below that 4M + 4P - 2
     INTERLEAVED     V = 1: as 1F1B. P divides M: 3 (VM + P - 1), Megatron's
                     (P - 1) / (VM + P - 1); other M: padding leaves more
                     idle time, no closed form. */
static double uniform_step(mpar_schedule_kind kind, int P, int M, int V) {
    switch (kind) {
    case MPAR_SCHEDULE_SEQUENTIAL: return 3.0 * P;
    case MPAR_SCHEDULE_GPIPE:
    case MPAR_SCHEDULE_1F1B: return 3.0 * (M + P - 1);
    case MPAR_SCHEDULE_ZB_H1:
    case MPAR_SCHEDULE_ZB_H2: return M >= P ? 3.0 * M + P - 1 : 2.0 * P - 1 + 2.0 * M;
    case MPAR_SCHEDULE_ZB_V: return 2 * M >= 3 * P - 1 ? 6.0 * M + P - 1 : 4.0 * M + 4.0 * P - 2;
    case MPAR_SCHEDULE_INTERLEAVED_1F1B:
        if (V == 1) return 3.0 * (M + P - 1);
        return M % P == 0 ? 3.0 * (V * M + P - 1) : -1.0;
    default: return -1.0;
    }
}

/* What a generated schedule must say about itself: the derived facts as
   its lists imply them and as the simulator counts them, and a placement
   the accessors agree with (a V for ZB-V: virtual stage vs on stage vs,
   P + j on P - 1 - j). */
static void check_derived(mpar_schedule_kind kind, const mpar_schedule* sc, const mpar_simulation* sim) {
    int P = sc->stages, V = sc->virtual_stages, s, c, vs, sum;
    assert_int_equal(sc->split_backward, splits_backward(kind));
    assert_int_equal(sc->forward_only, 0);
    for (s = 0; s < P; ++s) {
        assert_int_equal(sc->peak_in_flight[s], sim->peak_in_flight[s]);
        for (sum = 0, c = 0; c < V; ++c) {
            vs = mpar_schedule_virtual_stage(sc, s, c);
            assert_int_equal(mpar_schedule_stage_of(sc, vs), s);
            assert_int_equal(mpar_schedule_chunk_of(sc, vs), c);
            if (c > 0) assert_true(vs > mpar_schedule_virtual_stage(sc, s, c - 1)); /* model order */
            if (kind == MPAR_SCHEDULE_ZB_V) assert_int_equal(vs, c == 0 ? s : 2 * P - 1 - s);
            if (kind == MPAR_SCHEDULE_INTERLEAVED_1F1B) assert_int_equal(vs, c * P + s);
            assert_true(sc->chunk_peak_in_flight[vs] >= 1 && sc->chunk_peak_in_flight[vs] <= sc->microbatches);
            sum += sc->chunk_peak_in_flight[vs];
        }
        assert_true(sc->peak_in_flight[s] <= sum); /* chunks need not peak at once */
    }
}

/* Micro-batches of uneven size: 0.5, 0.87, ..., 1.98, and round again. */
static void uneven_scales(double* scale, int M) {
    int m;
    for (m = 0; m < M; ++m) scale[m] = 0.5 + 0.37 * (m % 5);
}

static void test_grid_every_schedule_simulates(void** state) {
    size_t kk;
    int P, M, V, s, checked = 0;
    double scale[32];
    mpar_sim_desc d = costs(1.0, 2.0, 1.0, 1.0), free_links = costs(1.0, 2.0, 1.0, 1.0);
    mpar_sim_desc uneven = costs(1.0, 2.0, 1.0, 1.0);
    d.link_delay = 0.25;
    uneven.link_delay = 0.25;
    uneven.microbatch_scale = scale;
    (void)state;
    for (kk = 0; kk < sizeof all_kinds / sizeof all_kinds[0]; ++kk) {
        mpar_schedule_kind kind = all_kinds[kk];
        for (P = 1; P <= 8; ++P)
            for (M = 1; M <= 32; ++M)
                for (V = v_first(kind); V <= v_last(kind); ++V) {
                    mpar_schedule* sc = create_ok(kind, P, M, V);
                    mpar_simulation *sim, *free_sim, *uneven_sim;
                    int m_sched = kind == MPAR_SCHEDULE_SEQUENTIAL ? 1 : M;
                    int per_stage = (splits_backward(kind) ? 3 : 2) * m_sched * V + 1;
                    /* F + B, or F + I + W, of every micro-batch and chunk:
                       all a stage is busy with (the optimizer costs 0) */
                    double busy = 3.0 * m_sched * V, last_end = 0.0, expect;
                    assert_int_equal(sc->stages, P);
                    assert_int_equal(sc->microbatches, m_sched);
                    assert_int_equal(sc->virtual_stages, V);
                    assert_int_equal(sc->custom, 0);
                    for (s = 0; s < P; ++s) {
                        assert_int_equal(sc->action_count[s], per_stage);
                        assert_int_equal(sc->actions[s][per_stage - 1].kind, MPAR_ACTION_OPTIMIZER_STEP);
                    }
                    assert_int_equal(mpar_schedule_validate(sc, NULL), MPAR_SUCCESS);
                    sim = simulate_ok(sc, &d);
                    check_timing(sc, sim, 1.0, 2.0, 1.0, 1.0, 0.25, NULL);
                    check_derived(kind, sc, sim);
                    /* the step ends when the last stage ends, and the bubble
                       is the idle share of P stages over that step */
                    for (s = 0; s < P; ++s) {
                        assert_near(sim->busy[s], busy, 1e-9);
                        if (sim->end[s][per_stage - 1] > last_end) last_end = sim->end[s][per_stage - 1];
                    }
                    assert_near(sim->step_time, last_end, 0.0);
                    assert_near(sim->bubble_fraction, 1.0 - busy / sim->step_time, 1e-12);
                    /* SEQUENTIAL and GPipe run every micro-batch's forwards,
                       then its backwards, through the whole chain: the fill
                       and the drain each cross P - 1 links */
                    if (kind == MPAR_SCHEDULE_SEQUENTIAL || kind == MPAR_SCHEDULE_GPIPE)
                        assert_near(sim->step_time, 3.0 * (m_sched + P - 1) + 2.0 * (P - 1) * 0.25, 1e-9);
                    if (P == 1) assert_near(sim->step_time, busy, 1e-9); /* no link, no idle time */
                    /* free links: the closed forms above */
                    free_sim = simulate_ok(sc, &free_links);
                    expect = uniform_step(kind, P, M, V);
                    if (expect > 0.0) {
                        if (fabs(free_sim->step_time - expect) > 1e-9) {
                            print_error("%s P=%d M=%d V=%d: step %g without link delays, expected %g\n",
                                        mpar_schedule_kind_name(kind), P, M, V, free_sim->step_time, expect);
                            fail();
                        }
                    } else { /* interleaved, P does not divide M: above Megatron's figure */
                        assert_int_equal(kind, MPAR_SCHEDULE_INTERLEAVED_1F1B);
                        assert_true(free_sim->bubble_fraction >= (double)(P - 1) / (double)(V * M + P - 1) - 1e-9);
                    }
                    assert_near(free_sim->bubble_fraction, 1.0 - busy / free_sim->step_time, 1e-12);
                    /* a delay on the links never makes a step shorter */
                    assert_true(sim->step_time >= free_sim->step_time - 1e-9);
                    /* uneven micro-batches: same lists, every action still
                       exactly where its inputs and its stage allow */
                    uneven_scales(scale, m_sched);
                    uneven_sim = simulate_ok(sc, &uneven);
                    check_timing(sc, uneven_sim, 1.0, 2.0, 1.0, 1.0, 0.25, scale);
                    mpar_simulation_destroy(uneven_sim);
                    mpar_simulation_destroy(free_sim);
                    mpar_simulation_destroy(sim);
                    mpar_schedule_destroy(sc);
                    ++checked;
                }
    }
    assert_int_equal(checked, 8 * 32 * (1 + 1 + 1 + 3 + 1 + 1 + 1));
}

/* ---- bubble figures ---- */

static void test_bubble_gpipe_and_1f1b_match_formula(void** state) {
    mpar_sim_desc d = costs(1.0, 2.0, 0.0, 0.0);
    int P, M;
    (void)state;
    for (P = 1; P <= 8; ++P)
        for (M = 1; M <= 16; ++M) {
            double expected = (double)(P - 1) / (double)(M + P - 1);
            assert_near(bubble(MPAR_SCHEDULE_GPIPE, P, M, 1, &d), expected, 1e-9);
            assert_near(bubble(MPAR_SCHEDULE_1F1B, P, M, 1, &d), expected, 1e-9);
        }
}

/* The step ends when the last stage ends, whichever it is: here stage 2's
   long optimizer step (GPipe, P = 3, M = 1, F = 1, B = 2; optimizer 0.5,
   0.5, 20). Stage 0 is done at 9.5, stage 2 at 5 + 20 = 25; busy
   3.5 + 3.5 + 23 = 30 of 3 × 25. */
static void test_bubble_counts_the_last_stage_to_finish(void** state) {
    mpar_sim_desc d = costs(1.0, 2.0, 0.0, 0.0);
    const double opt[3] = {0.5, 0.5, 20.0};
    mpar_schedule* sc = create_ok(MPAR_SCHEDULE_GPIPE, 3, 1, 1);
    mpar_simulation* sim;
    (void)state;
    d.optimizer_step_per_stage = opt;
    sim = simulate_ok(sc, &d);
    assert_near(sim->step_time, 25.0, 1e-12);
    assert_near(sim->busy[0], 3.5, 1e-12);
    assert_near(sim->busy[2], 23.0, 1e-12);
    assert_near(sim->bubble_fraction, 1.0 - 30.0 / 75.0, 1e-12);
    mpar_simulation_destroy(sim);
    mpar_schedule_destroy(sc);
}

static void test_sequential_utilization_is_one_over_p(void** state) {
    mpar_sim_desc d = costs(1.0, 2.0, 0.0, 0.0);
    int P;
    (void)state;
    for (P = 1; P <= 8; ++P) {
        mpar_schedule* sc = create_ok(MPAR_SCHEDULE_SEQUENTIAL, P, 8, 1);
        mpar_simulation* sim = simulate_ok(sc, &d);
        int s;
        assert_int_equal(sc->microbatches, 1); /* whole batch as one micro-batch */
        assert_near(sim->bubble_fraction, 1.0 - 1.0 / P, 1e-9);
        assert_near(sim->step_time, 3.0 * P, 1e-9);
        for (s = 0; s < P; ++s) assert_near(sim->busy[s], 3.0, 1e-9);
        mpar_simulation_destroy(sim);
        mpar_schedule_destroy(sc);
    }
}

static void test_zbh1_bubble_below_1f1b(void** state) {
    mpar_sim_desc d = costs(1.0, 2.0, 1.0, 1.0);
    int P, j;
    (void)state;
    for (P = 2; P <= 8; ++P) {
        int ms[5];
        ms[0] = 1, ms[1] = 2, ms[2] = P, ms[3] = 2 * P, ms[4] = 16;
        for (j = 0; j < 5; ++j) {
            int M = ms[j];
            double zb = bubble(MPAR_SCHEDULE_ZB_H1, P, M, 1, &d), base = bubble(MPAR_SCHEDULE_1F1B, P, M, 1, &d);
            if (!(zb < base - 1e-9)) {
                print_error("P=%d M=%d: zbh1 bubble %g not below 1f1b %g\n", P, M, zb, base);
                fail();
            }
            /* H1 with F = I = W: the bubble is (P-1) time units per stage
               once the pipeline fills (M >= P), i.e. (P-1)/(3M+P-1). */
            if (M >= P) assert_near(zb, (double)(P - 1) / (3.0 * M + P - 1), 1e-9);
        }
    }
}

/* The zero-bubble generators against the floor of one step. With F = I =
   W = 1 and no link delay the last stage (ZB-V: the device of virtual
   stage P-1) starts after P-1 forwards and then has 3M units of work (6M
   chunk units), so no step beats (P-1)/(3M+P-1) (ZB-V: (P-1)/(6M+P-1));
   the published zero bubble hides that fill behind the next step, which
   mpar's exact optimizer step does not. Once M >= 2P each generator must
   come within 0.02 of its floor (they reach it), ZB-V must beat ZB-H1 and
   1F1B, and ZB-H2 1F1B. ZB-H1 already sits on the floor with these costs,
   so ZB-H2 can only tie it there; its extra warm-up pays off once links
   take time or W costs less than F, where it must beat ZB-H1. Fractions
   compare across units: ZB-V runs half a stage per chunk. */
static void test_zero_bubble_fill_floor(void** state) {
    mpar_sim_desc unit = costs(1.0, 0.0, 1.0, 1.0), linked = costs(1.0, 0.0, 1.0, 1.0);
    mpar_sim_desc cheap_w = costs(1.0, 0.0, 1.0, 0.5);
    double worst_h2 = 0.0, worst_v = 0.0;
    int P, M;
    (void)state;
    linked.link_delay = 0.25;
    for (P = 2; P <= 8; ++P)
        for (M = 2 * P; M <= 32; ++M) {
            double h2 = bubble(MPAR_SCHEDULE_ZB_H2, P, M, 1, &unit), v = bubble(MPAR_SCHEDULE_ZB_V, P, M, 2, &unit);
            double h1 = bubble(MPAR_SCHEDULE_ZB_H1, P, M, 1, &unit), base = bubble(MPAR_SCHEDULE_1F1B, P, M, 1, &unit);
            double floor_h = (double)(P - 1) / (3.0 * M + P - 1), floor_v = (double)(P - 1) / (6.0 * M + P - 1);
            if (h2 - floor_h > worst_h2) worst_h2 = h2 - floor_h;
            if (v - floor_v > worst_v) worst_v = v - floor_v;
            if (!(h2 - floor_h <= 0.02 && v - floor_v <= 0.02 && h2 >= floor_h - 1e-9 && v >= floor_v - 1e-9)) {
                print_error("P=%d M=%d: zbh2 %g (floor %g), zbv %g (floor %g)\n", P, M, h2, floor_h, v, floor_v);
                fail();
            }
            if (!(v < h1 - 1e-9 && v < base - 1e-9 && h2 < base - 1e-9 && h2 <= h1 + 1e-9)) {
                print_error("P=%d M=%d: zbv %g, zbh2 %g, zbh1 %g, 1f1b %g\n", P, M, v, h2, h1, base);
                fail();
            }
            h2 = bubble(MPAR_SCHEDULE_ZB_H2, P, M, 1, &linked), h1 = bubble(MPAR_SCHEDULE_ZB_H1, P, M, 1, &linked);
            if (!(h2 < h1 - 1e-9)) {
                print_error("P=%d M=%d, links 0.25: zbh2 %g not below zbh1 %g\n", P, M, h2, h1);
                fail();
            }
            h2 = bubble(MPAR_SCHEDULE_ZB_H2, P, M, 1, &cheap_w), h1 = bubble(MPAR_SCHEDULE_ZB_H1, P, M, 1, &cheap_w);
            if (!(h2 < h1 - 1e-9)) {
                print_error("P=%d M=%d, W = 0.5: zbh2 %g not below zbh1 %g\n", P, M, h2, h1);
                fail();
            }
        }
    print_message("unit costs, M >= 2P: zbh2 at most %.4f above its floor, zbv %.4f\n", worst_h2, worst_v);
}

/* ZB-V never loses to ZB-H1 (stage costs = two chunks), at any M. */
static void test_zbv_not_behind_zbh1(void** state) {
    mpar_sim_desc unit = costs(1.0, 0.0, 1.0, 1.0);
    int P, M;
    (void)state;
    for (P = 1; P <= 8; ++P)
        for (M = 1; M <= 32; ++M) {
            double v = bubble(MPAR_SCHEDULE_ZB_V, P, M, 2, &unit), h1 = bubble(MPAR_SCHEDULE_ZB_H1, P, M, 1, &unit);
            if (v > h1 + 1e-9) {
                print_error("P=%d M=%d: zbv %g above zbh1 %g\n", P, M, v, h1);
                fail();
            }
        }
}

static void test_interleaved_bubble_below_1f1b(void** state) {
    int P, M, V;
    (void)state;
    for (V = 2; V <= 3; ++V) {
        /* same total work: each of the V chunks does 1/V of a stage's work */
        mpar_sim_desc chunked = costs(1.0 / V, 2.0 / V, 0.0, 0.0);
        mpar_sim_desc whole = costs(1.0, 2.0, 0.0, 0.0);
        for (P = 2; P <= 8; ++P)
            for (M = 2; M <= 16; ++M) { /* holds from M = 2, not only M >= P */
                double inter = bubble(MPAR_SCHEDULE_INTERLEAVED_1F1B, P, M, V, &chunked);
                double base = bubble(MPAR_SCHEDULE_1F1B, P, M, 1, &whole);
                if (!(inter < base - 1e-9)) {
                    print_error("P=%d M=%d V=%d: interleaved %g not below 1f1b %g\n", P, M, V, inter, base);
                    fail();
                }
                if (M % P == 0) /* Megatron-LM's figure */
                    assert_near(inter, (double)(P - 1) / (double)(V * M + P - 1), 1e-9);
            }
    }
}

/* ---- peak in-flight micro-batches ---- */

static void test_peak_in_flight(void** state) {
    int P, M, V, s;
    (void)state;
    for (P = 1; P <= 8; ++P)
        for (M = 1; M <= 16; ++M) {
            mpar_schedule* g = create_ok(MPAR_SCHEDULE_GPIPE, P, M, 1);
            mpar_schedule* o = create_ok(MPAR_SCHEDULE_1F1B, P, M, 1);
            mpar_schedule* z = create_ok(MPAR_SCHEDULE_ZB_H1, P, M, 1);
            mpar_simulation* gs = simulate_ok(g, NULL);
            mpar_simulation* os = simulate_ok(o, NULL);
            mpar_simulation* zs = simulate_ok(z, NULL);
            for (s = 0; s < P; ++s) {
                int expect = M < P - s ? M : P - s;
                assert_int_equal(gs->peak_in_flight[s], M);
                assert_int_equal(os->peak_in_flight[s], expect);
                /* a stash lives until W: stage s holds 1F1B's P - s and
                   the s whose W's lag behind their I's, so min(M, P) on
                   every stage: stage 0 as in 1F1B, and the peak over
                   stages (what sizes memory) 1F1B's */
                assert_int_equal(zs->peak_in_flight[s], M < P ? M : P);
            }
            mpar_simulation_destroy(gs);
            mpar_simulation_destroy(os);
            mpar_simulation_destroy(zs);
            mpar_schedule_destroy(g);
            mpar_schedule_destroy(o);
            mpar_schedule_destroy(z);
        }
    /* ZB-H2: its 2(P-s)-1 warm-up forwards and the W's lagging 2s behind
       the I's make 2P-1 on every stage once M >= 2P-1 (else the lag is s:
       min(M, 2P-1-s)); never above 2x 1F1B's peak over stages (min(M, P))
       less one. ZB-V, in chunk units: 2P on every stage once M >= 2P-1,
       never above 2 min(M, P), which with 2P equal chunks is min(M, P)
       stage stashes: 1F1B's peak over stages (its stage 0), per device.
       (Not 1F1B's P-s of the same stage: ZB-V's device P-1 waits a whole
       round trip for its chunks' gradients; 1F1B's last stage does not.) */
    for (P = 1; P <= 8; ++P)
        for (M = 1; M <= 32; ++M) {
            mpar_schedule* h2 = create_ok(MPAR_SCHEDULE_ZB_H2, P, M, 1);
            mpar_schedule* zv = create_ok(MPAR_SCHEDULE_ZB_V, P, M, 2);
            int one_f1b = M < P ? M : P;
            for (s = 0; s < P; ++s) {
                int expect = M >= 2 * P - 1 ? 2 * P - 1 : (M < 2 * P - 1 - s ? M : 2 * P - 1 - s);
                if (h2->peak_in_flight[s] != expect || zv->peak_in_flight[s] > 2 * one_f1b ||
                    (M >= 2 * P - 1 && zv->peak_in_flight[s] != 2 * P)) {
                    print_error("P=%d M=%d stage %d: zbh2 peak %d (expected %d), zbv %d chunks (1f1b's peak %d "
                                "micro-batches)\n", P, M, s, h2->peak_in_flight[s], expect, zv->peak_in_flight[s],
                                one_f1b);
                    fail();
                }
                assert_true(h2->peak_in_flight[s] <= 2 * one_f1b - 1);
            }
            mpar_schedule_destroy(h2);
            mpar_schedule_destroy(zv);
        }
    /* interleaved, P dividing M, in chunk units: the warm-up's
       2(P-s-1) + (V-1)P forwards and the one more before the first B */
    for (V = 2; V <= 3; ++V)
        for (P = 1; P <= 8; ++P)
            for (M = P; M <= 16; M += P) {
                mpar_schedule* sc = create_ok(MPAR_SCHEDULE_INTERLEAVED_1F1B, P, M, V);
                mpar_simulation* sim = simulate_ok(sc, NULL);
                for (s = 0; s < P; ++s) {
                    int warm = 2 * (P - s - 1) + (V - 1) * P + 1, expect = M * V < warm ? M * V : warm;
                    if (sim->peak_in_flight[s] != expect) {
                        print_error("interleaved P=%d M=%d V=%d stage %d: peak %d, expected %d\n", P, M, V, s,
                                    sim->peak_in_flight[s], expect);
                        fail();
                    }
                }
                mpar_simulation_destroy(sim);
                mpar_schedule_destroy(sc);
            }
}

/* ---- hand-written schedules ---- */

static mpar_action act(mpar_action_kind kind, int m, int chunk) {
    mpar_action a;
    a.kind = kind;
    a.microbatch = kind == MPAR_ACTION_OPTIMIZER_STEP ? -1 : m;
    a.chunk = chunk;
    return a;
}
#define F(m) act(MPAR_ACTION_FORWARD, m, 0)
#define B(m) act(MPAR_ACTION_BACKWARD, m, 0)
#define I(m) act(MPAR_ACTION_BACKWARD_INPUT, m, 0)
#define W(m) act(MPAR_ACTION_BACKWARD_WEIGHT, m, 0)
#define OPT act(MPAR_ACTION_OPTIMIZER_STEP, 0, 0)

/* Builds a 2-stage custom schedule and expects validate and simulate to
   reject it with INVALID_SCHEDULE and a message holding each needle. */
static void expect_rejected(int M, int V, const mpar_action* s0, int n0, const mpar_action* s1, int n1,
                            const char* const* needles, int needle_count) {
    const mpar_action* lists[2];
    int counts[2], j;
    mpar_schedule* sc = NULL;
    mpar_simulation* sim = NULL;
    mpar_error err;
    lists[0] = s0, lists[1] = s1, counts[0] = n0, counts[1] = n1;
    memset(&err, 0, sizeof err);
    assert_int_equal(mpar_schedule_from_lists(2, M, V, lists, counts, &sc, &err), MPAR_SUCCESS);
    assert_int_equal(sc->custom, 1);
    assert_int_equal(mpar_schedule_validate(sc, &err), MPAR_ERROR_INVALID_SCHEDULE);
    assert_int_equal(err.code, MPAR_ERROR_INVALID_SCHEDULE);
    for (j = 0; j < needle_count; ++j) assert_contains(err.message, needles[j]);
    memset(&err, 0, sizeof err);
    assert_int_equal(mpar_simulate(sc, NULL, &sim, &err), MPAR_ERROR_INVALID_SCHEDULE);
    assert_null(sim);
    for (j = 0; j < needle_count; ++j) assert_contains(err.message, needles[j]);
    mpar_schedule_destroy(sc);
}

static void test_custom_valid_schedule_runs(void** state) {
    /* 1F1B for P = 2, M = 2 written by hand: must pass, so the rejections
       below are caused by the edits and nothing else */
    mpar_action s0[] = {F(0), F(1), B(0), B(1), OPT};
    mpar_action s1[] = {F(0), B(0), F(1), B(1), OPT};
    const mpar_action* lists[2];
    int counts[2] = {5, 5};
    mpar_schedule* sc = NULL;
    mpar_simulation* sim;
    (void)state;
    lists[0] = s0, lists[1] = s1;
    assert_int_equal(mpar_schedule_from_lists(2, 2, 1, lists, counts, &sc, NULL), MPAR_SUCCESS);
    assert_int_equal(mpar_schedule_validate(sc, NULL), MPAR_SUCCESS);
    sim = simulate_ok(sc, NULL);
    check_timing(sc, sim, 1.0, 2.0, 1.0, 1.0, 0.0, NULL);
    assert_near(sim->step_time, 9.0, 1e-9);
    mpar_simulation_destroy(sim);
    mpar_schedule_destroy(sc);
}

static void test_deadlock_names_stage_step_and_wait(void** state) {
    /* stage 0 waits for B0's gradient before sending F1; stage 1 waits
       for F1 before running B0 */
    mpar_action s0[] = {F(0), B(0), F(1), B(1), OPT};
    mpar_action s1[] = {F(0), F(1), B(0), B(1), OPT};
    const char* needles[] = {"deadlock", "stage 0 step 1 (B0) waits for B0 from stage 1",
                             "stage 1 step 1 (F1) waits for F1 from stage 0"};
    (void)state;
    expect_rejected(2, 1, s0, 5, s1, 5, needles, 3);
}

static void test_deadlock_within_one_stage(void** state) {
    /* one device holding two chunks: chunk 1 cannot run before chunk 0 */
    mpar_action s0[] = {act(MPAR_ACTION_FORWARD, 0, 1), act(MPAR_ACTION_FORWARD, 0, 0),
                        act(MPAR_ACTION_BACKWARD, 0, 1), act(MPAR_ACTION_BACKWARD, 0, 0), OPT};
    const mpar_action* lists[1];
    int counts[1] = {5};
    mpar_schedule* sc = NULL;
    mpar_error err;
    (void)state;
    lists[0] = s0;
    assert_int_equal(mpar_schedule_from_lists(1, 1, 2, lists, counts, &sc, NULL), MPAR_SUCCESS);
    assert_int_equal(mpar_schedule_validate(sc, &err), MPAR_ERROR_INVALID_SCHEDULE);
    assert_contains(err.message, "stage 0 step 0 (F0.1) waits for F0.0 from stage 0");
    mpar_schedule_destroy(sc);
}

static void test_backward_before_forward_rejected(void** state) {
    mpar_action s0[] = {F(0), F(1), B(0), B(1), OPT};
    mpar_action s1[] = {B(0), F(0), F(1), B(1), OPT};
    mpar_action z0[] = {F(0), I(0), W(0), OPT};
    mpar_action z1[] = {F(0), W(0), I(0), OPT};
    const char* needles[] = {"stage 1 step 0", "B0 comes before its own F0 (step 1)"};
    const char* wneedles[] = {"stage 1 step 1", "W0 comes before its own I0 (step 2)"};
    (void)state;
    expect_rejected(2, 1, s0, 5, s1, 5, needles, 2);
    expect_rejected(1, 1, z0, 4, z1, 4, wneedles, 2);
}

static void test_missing_actions_rejected(void** state) {
    mpar_action s0[] = {F(0), F(1), B(0), B(1), OPT};
    mpar_action no_f1[] = {F(0), B(0), B(1), OPT};
    mpar_action no_b1[] = {F(0), B(0), F(1), OPT};
    mpar_action no_opt[] = {F(0), B(0), F(1), B(1)};
    mpar_action opt_early[] = {F(0), B(0), OPT, F(1), B(1)};
    mpar_action z0[] = {F(0), I(0), W(0), OPT};
    mpar_action no_w[] = {F(0), I(0), OPT};
    const char* n1[] = {"stage 1", "F1 is missing"};
    const char* n2[] = {"stage 1", "backward of micro-batch 1 is missing"};
    const char* n3[] = {"stage 1", "missing optimizer step", "step 4"};
    const char* n4[] = {"stage 1 step 2", "optimizer step must be the last"};
    const char* n5[] = {"stage 1 step 1", "I0 has no matching weight-gradient"};
    (void)state;
    expect_rejected(2, 1, s0, 5, no_f1, 4, n1, 2);
    expect_rejected(2, 1, s0, 5, no_b1, 4, n2, 2);
    expect_rejected(2, 1, s0, 5, no_opt, 4, n3, 3);
    expect_rejected(2, 1, s0, 5, opt_early, 5, n4, 2);
    expect_rejected(1, 1, z0, 4, no_w, 3, n5, 2);
}

static void test_duplicate_and_out_of_range_rejected(void** state) {
    mpar_action s0[] = {F(0), F(1), B(0), B(1), OPT};
    mpar_action dup[] = {F(0), B(0), F(1), B(1), B(0), OPT};
    mpar_action mixed[] = {F(0), B(0), I(0), W(0), F(1), B(1), OPT};
    mpar_action big_m[] = {F(0), B(0), F(1), B(1), F(2), OPT};
    mpar_action big_chunk[] = {F(0), B(0), act(MPAR_ACTION_FORWARD, 1, 1), F(1), B(1), OPT};
    const char* n1[] = {"stage 1 step 4", "duplicate B0 (already at step 1)"};
    const char* n2[] = {"stage 1", "mixes a full backward with a split one"};
    const char* n3[] = {"stage 1 step 4", "micro-batch 2 out of range 0..1"};
    const char* n4[] = {"stage 1 step 2", "chunk 1 out of range 0..0"};
    (void)state;
    expect_rejected(2, 1, s0, 5, dup, 6, n1, 2);
    expect_rejected(2, 1, s0, 5, mixed, 7, n2, 2);
    expect_rejected(2, 1, s0, 5, big_m, 6, n3, 2);
    expect_rejected(2, 1, s0, 5, big_chunk, 6, n4, 2);
}

/* ---- bad input ---- */

static void expect_create_error(mpar_schedule_kind kind, int P, int M, int V, mpar_result code, const char* needle) {
    mpar_schedule* sc = (mpar_schedule*)&sc; /* must be reset to NULL */
    mpar_error err;
    memset(&err, 0, sizeof err);
    assert_int_equal(mpar_schedule_create(kind, P, M, V, &sc, &err), code);
    assert_int_equal(err.code, code);
    assert_null(sc);
    assert_contains(err.message, needle);
}

static void test_bad_arguments(void** state) {
    mpar_error err;
    mpar_schedule* sc = NULL;
    mpar_simulation* sim = NULL;
    mpar_action a[] = {F(0), B(0), OPT};
    const mpar_action* lists[1];
    int counts[1] = {3}, bad_count[1] = {-1};
    (void)state;
    lists[0] = a;
    expect_create_error(MPAR_SCHEDULE_1F1B, 0, 4, 1, MPAR_ERROR_INVALID_ARGUMENT, "stages is 0");
    expect_create_error(MPAR_SCHEDULE_1F1B, 4, 0, 1, MPAR_ERROR_INVALID_ARGUMENT, "microbatches is 0");
    expect_create_error(MPAR_SCHEDULE_1F1B, 4, 4, 0, MPAR_ERROR_INVALID_ARGUMENT, "virtual_stages is 0");
    expect_create_error(MPAR_SCHEDULE_INTERLEAVED_1F1B, 4, 4, -2, MPAR_ERROR_INVALID_ARGUMENT, "virtual_stages is -2");
    expect_create_error(MPAR_SCHEDULE_GPIPE, 4, 4, 2, MPAR_ERROR_INVALID_ARGUMENT, "only the interleaved");
    expect_create_error(MPAR_SCHEDULE_ZB_H1, 4, 4, 3, MPAR_ERROR_INVALID_ARGUMENT, "'zbh1' needs 1");
    expect_create_error(MPAR_SCHEDULE_ZB_H2, 4, 4, 2, MPAR_ERROR_INVALID_ARGUMENT, "'zbh2' needs 1");
    expect_create_error(MPAR_SCHEDULE_ZB_V, 4, 4, 1, MPAR_ERROR_INVALID_ARGUMENT, "'zbv' runs exactly 2 chunks");
    expect_create_error(MPAR_SCHEDULE_ZB_V, 4, 4, 3, MPAR_ERROR_INVALID_ARGUMENT, "virtual_stages is 3");
    expect_create_error(MPAR_SCHEDULE_AUTO, 4, 4, 1, MPAR_ERROR_INVALID_ARGUMENT, "use mpar_schedule_synthesize");
    expect_create_error((mpar_schedule_kind)99, 4, 4, 1, MPAR_ERROR_INVALID_ARGUMENT, "unknown schedule kind 99");
    expect_create_error(MPAR_SCHEDULE_GPIPE, 100000, 100000, 1, MPAR_ERROR_INVALID_ARGUMENT, "too large");

    assert_int_equal(mpar_schedule_create(MPAR_SCHEDULE_1F1B, 4, 4, 1, NULL, &err), MPAR_ERROR_INVALID_ARGUMENT);
    assert_contains(err.message, "out is NULL");
    assert_int_equal(mpar_schedule_create(MPAR_SCHEDULE_1F1B, 4, 4, 1, NULL, NULL), MPAR_ERROR_INVALID_ARGUMENT);

    assert_int_equal(mpar_schedule_from_lists(1, 1, 1, NULL, counts, &sc, &err), MPAR_ERROR_INVALID_ARGUMENT);
    assert_contains(err.message, "NULL");
    assert_int_equal(mpar_schedule_from_lists(1, 1, 1, lists, bad_count, &sc, &err), MPAR_ERROR_INVALID_ARGUMENT);
    assert_contains(err.message, "stage 0: count -1");
    assert_int_equal(mpar_schedule_from_lists(0, 1, 1, lists, counts, &sc, &err), MPAR_ERROR_INVALID_ARGUMENT);
    assert_int_equal(mpar_schedule_from_lists(1, 1, 1, lists, counts, NULL, &err), MPAR_ERROR_INVALID_ARGUMENT);
    a[1].kind = (mpar_action_kind)17;
    assert_int_equal(mpar_schedule_from_lists(1, 1, 1, lists, counts, &sc, &err), MPAR_ERROR_INVALID_SCHEDULE);
    assert_contains(err.message, "stage 0 step 1: unknown action kind 17");
    assert_null(sc);

    assert_int_equal(mpar_schedule_validate(NULL, &err), MPAR_ERROR_INVALID_ARGUMENT);
    assert_int_equal(mpar_simulate(NULL, NULL, &sim, &err), MPAR_ERROR_INVALID_ARGUMENT);
    assert_contains(err.message, "schedule is NULL");
    sc = create_ok(MPAR_SCHEDULE_1F1B, 2, 2, 1);
    assert_int_equal(mpar_simulate(sc, NULL, NULL, &err), MPAR_ERROR_INVALID_ARGUMENT);
    assert_contains(err.message, "out is NULL");
    mpar_schedule_destroy(sc);
    mpar_schedule_destroy(NULL);
    mpar_simulation_destroy(NULL);
}

static void test_bad_costs(void** state) {
    mpar_schedule* sc = create_ok(MPAR_SCHEDULE_ZB_H1, 2, 2, 1);
    mpar_simulation* sim = NULL;
    mpar_error err;
    mpar_sim_desc d;
    double per_stage[2] = {1.0, -3.0}, scale[2] = {1.0, 0.0};
    (void)state;
    d = costs(-1.0, 0.0, 0.0, 0.0);
    assert_int_equal(mpar_simulate(sc, &d, &sim, &err), MPAR_ERROR_INVALID_ARGUMENT);
    assert_contains(err.message, "forward cost of virtual stage 0 is -1");
    d = costs(1.0, 0.0, 0.0, 0.0);
    d.backward_weight_per_stage = per_stage;
    assert_int_equal(mpar_simulate(sc, &d, &sim, &err), MPAR_ERROR_INVALID_ARGUMENT);
    assert_contains(err.message, "backward-weight cost of virtual stage 1 is -3");
    d = costs(1.0, 2.0, 3.0, 0.0); /* B < I: W would be negative */
    assert_int_equal(mpar_simulate(sc, &d, &sim, &err), MPAR_ERROR_INVALID_ARGUMENT);
    assert_contains(err.message, "backward cost 2 is less than");
    d = costs(1.0, 0.0, 0.0, 0.0);
    d.link_delay = NAN;
    assert_int_equal(mpar_simulate(sc, &d, &sim, &err), MPAR_ERROR_INVALID_ARGUMENT);
    assert_contains(err.message, "link delay of boundary 0");
    d = costs(1.0, 0.0, 0.0, 0.0);
    d.microbatch_scale = scale;
    assert_int_equal(mpar_simulate(sc, &d, &sim, &err), MPAR_ERROR_INVALID_ARGUMENT);
    assert_contains(err.message, "microbatch_scale[1] is 0");
    d = costs(1.0, 0.0, 0.0, 0.0);
    d.optimizer_step = INFINITY;
    assert_int_equal(mpar_simulate(sc, &d, &sim, &err), MPAR_ERROR_INVALID_ARGUMENT);
    assert_contains(err.message, "optimizer step cost of stage 0");
    assert_null(sim);
    mpar_schedule_destroy(sc);
}

/* ---- cost model ---- */

static double step_time(const mpar_schedule* sc, const mpar_sim_desc* d) {
    mpar_simulation* sim = simulate_ok(sc, d);
    double t = sim->step_time;
    mpar_simulation_destroy(sim);
    return t;
}

static void test_cost_defaults_links_and_scales(void** state) {
    mpar_schedule* one_zb = create_ok(MPAR_SCHEDULE_ZB_H1, 1, 1, 1);
    mpar_schedule* one_gp = create_ok(MPAR_SCHEDULE_GPIPE, 1, 1, 1);
    mpar_schedule* two_gp = create_ok(MPAR_SCHEDULE_GPIPE, 2, 1, 1);
    mpar_schedule* uneven = create_ok(MPAR_SCHEDULE_GPIPE, 1, 2, 1);
    mpar_schedule* two_gp2 = create_ok(MPAR_SCHEDULE_GPIPE, 2, 2, 1);
    mpar_schedule* chain = create_ok(MPAR_SCHEDULE_GPIPE, 3, 1, 1);
    mpar_sim_desc d;
    double scale[2] = {1.0, 3.0}, links[2] = {0.5, 4.0}, opt[3] = {0.0, 0.0, 20.0};
    double fwd[3] = {1.0, 2.0, 3.0};
    (void)state;
    d = costs(0.0, 0.0, 0.0, 0.0); /* F = 1, I = W = 1, B = 2 */
    assert_near(step_time(one_zb, &d), 3.0, 1e-12);
    assert_near(step_time(one_gp, &d), 3.0, 1e-12);
    assert_near(step_time(one_gp, NULL), 3.0, 1e-12);
    d = costs(2.0, 6.0, 0.0, 0.0); /* I = W = B / 2 */
    assert_near(step_time(one_zb, &d), 8.0, 1e-12);
    d = costs(2.0, 6.0, 1.0, 0.0); /* W = B - I = 5 */
    assert_near(step_time(one_zb, &d), 8.0, 1e-12);
    d = costs(1.0, 0.0, 2.0, 5.0); /* B = I + W */
    assert_near(step_time(one_gp, &d), 8.0, 1e-12);
    d = costs(1.0, 2.0, 0.0, 0.0);
    d.link_delay = 0.5; /* one activation and one gradient cross */
    assert_near(step_time(two_gp, &d), 2.0 * 3.0 + 2.0 * 0.5, 1e-12);
    /* blocking links: each copy is busy time on both ends. s0 F + copy
       out = 1.5; s1 copy in + F = 3; s1 B + copy out = 5.5; s0 copy in + B
       = 8 (asynchronous: 7), and each stage is busy 1.5 + 2.5 */
    d.link_blocking = 1;
    {
        mpar_simulation* sim = simulate_ok(two_gp, &d);
        assert_near(sim->step_time, 8.0, 1e-12);
        assert_near(sim->end[0][0], 1.5, 1e-12);
        assert_near(sim->start[1][0], 1.5, 1e-12);
        assert_near(sim->end[1][1], 5.5, 1e-12);
        assert_near(sim->busy[0], 4.0, 1e-12);
        assert_near(sim->busy[1], 4.0, 1e-12);
        mpar_simulation_destroy(sim);
    }
    d.link_blocking = 0;
    d.microbatch_scale = scale; /* uneven micro-batches */
    assert_near(step_time(uneven, &d), (1.0 + 3.0) * 3.0, 1e-12);
    /* the scale applies to link delays too (activations grow with the
       micro-batch): s1 F1 starts at 4 + 3 * .5, s0 B1 at 16.5 + 3 * .5 */
    assert_near(step_time(two_gp2, &d), 24.0, 1e-12);
    d = costs(0.0, 0.0, 0.0, 0.0);
    d.forward_per_stage = fwd; /* B = 2F per stage by default */
    d.link_delay_per_boundary = links;
    d.optimizer_step_per_stage = opt;
    /* F: 1 + .5 + 2 + 4 + 3 = 10.5; B: 6, then + 4 + 4 + .5 + 2 to stage 0;
       stage 2's optimizer step (20) overlaps that and ends last */
    {
        mpar_simulation* sim = simulate_ok(chain, &d);
        assert_near(sim->step_time, 10.5 + 6.0 + 20.0, 1e-12);
        assert_near(sim->end[0][1], 10.5 + 6.0 + 4.0 + 4.0 + 0.5 + 2.0, 1e-12);
        assert_near(sim->busy[2], 3.0 + 6.0 + 20.0, 1e-12);
        mpar_simulation_destroy(sim);
    }
    mpar_schedule_destroy(one_zb);
    mpar_schedule_destroy(one_gp);
    mpar_schedule_destroy(two_gp);
    mpar_schedule_destroy(uneven);
    mpar_schedule_destroy(two_gp2);
    mpar_schedule_destroy(chain);
}

static void test_slowest_stage_sets_the_pace(void** state) {
    /* stage 1 twice as slow: with many micro-batches 1F1B's step time is
       about M * (stage 1's F + B) */
    double fwd[2] = {1.0, 2.0};
    mpar_sim_desc d = costs(0.0, 0.0, 0.0, 0.0);
    mpar_schedule* sc = create_ok(MPAR_SCHEDULE_1F1B, 2, 32, 1);
    mpar_simulation* sim;
    (void)state;
    d.forward_per_stage = fwd;
    sim = simulate_ok(sc, &d);
    assert_true(sim->step_time >= 32 * 6.0);
    assert_true(sim->step_time <= 32 * 6.0 + 3.0 + 1e-9);
    assert_true(sim->busy[1] > sim->busy[0]);
    mpar_simulation_destroy(sim);
    mpar_schedule_destroy(sc);
}

/* ---- names, accessors, printing ---- */

static void test_kind_names_round_trip(void** state) {
    size_t k;
    mpar_schedule_kind kind;
    mpar_error err;
    (void)state;
    for (k = 0; k < sizeof all_kinds / sizeof all_kinds[0]; ++k) {
        assert_int_equal(mpar_schedule_kind_parse(mpar_schedule_kind_name(all_kinds[k]), &kind, NULL), MPAR_SUCCESS);
        assert_int_equal(kind, all_kinds[k]);
    }
    assert_string_equal(mpar_schedule_kind_name(MPAR_SCHEDULE_SEQUENTIAL), "sequential");
    assert_string_equal(mpar_schedule_kind_name(MPAR_SCHEDULE_GPIPE), "gpipe");
    assert_string_equal(mpar_schedule_kind_name(MPAR_SCHEDULE_1F1B), "1f1b");
    assert_string_equal(mpar_schedule_kind_name(MPAR_SCHEDULE_INTERLEAVED_1F1B), "interleaved");
    assert_string_equal(mpar_schedule_kind_name(MPAR_SCHEDULE_ZB_H1), "zbh1");
    assert_string_equal(mpar_schedule_kind_name(MPAR_SCHEDULE_ZB_H2), "zbh2");
    assert_string_equal(mpar_schedule_kind_name(MPAR_SCHEDULE_ZB_V), "zbv");
    assert_string_equal(mpar_schedule_kind_name((mpar_schedule_kind)42), "unknown");
    assert_int_equal(mpar_schedule_kind_parse("ZB-H1", &kind, NULL), MPAR_SUCCESS);
    assert_int_equal(kind, MPAR_SCHEDULE_ZB_H1);
    assert_int_equal(mpar_schedule_kind_parse("ZB-V", &kind, NULL), MPAR_SUCCESS);
    assert_int_equal(kind, MPAR_SCHEDULE_ZB_V);
    assert_int_equal(mpar_schedule_kind_parse("zb_h2", &kind, NULL), MPAR_SUCCESS);
    assert_int_equal(kind, MPAR_SCHEDULE_ZB_H2);
    assert_int_equal(mpar_schedule_kind_parse("Interleaved_1F1B", &kind, NULL), MPAR_SUCCESS);
    assert_int_equal(kind, MPAR_SCHEDULE_INTERLEAVED_1F1B);
    assert_int_equal(mpar_schedule_kind_parse("bogus", &kind, &err), MPAR_ERROR_INVALID_ARGUMENT);
    assert_contains(err.message, "unknown schedule 'bogus'");
    assert_int_equal(mpar_schedule_kind_parse("1f1bxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx", &kind, &err),
                     MPAR_ERROR_INVALID_ARGUMENT);
    assert_int_equal(mpar_schedule_kind_parse(NULL, &kind, &err), MPAR_ERROR_INVALID_ARGUMENT);
}

static void test_accessors(void** state) {
    mpar_schedule* sc = create_ok(MPAR_SCHEDULE_INTERLEAVED_1F1B, 4, 8, 2);
    const mpar_action* a;
    char buf[16];
    (void)state;
    assert_int_equal(mpar_schedule_action_count(sc, 0), 2 * 8 * 2 + 1);
    assert_int_equal(mpar_schedule_action_count(sc, 4), 0);
    assert_int_equal(mpar_schedule_action_count(NULL, 0), 0);
    a = mpar_schedule_action(sc, 0, 4); /* chunk 1 of micro-batch 0 follows chunk 0 of the group */
    assert_non_null(a);
    assert_int_equal(a->kind, MPAR_ACTION_FORWARD);
    assert_int_equal(a->microbatch, 0);
    assert_int_equal(a->chunk, 1);
    a = mpar_schedule_action(sc, 3, 32);
    assert_non_null(a);
    assert_int_equal(a->kind, MPAR_ACTION_OPTIMIZER_STEP);
    assert_null(mpar_schedule_action(sc, 3, 33));
    assert_null(mpar_schedule_action(sc, -1, 0));
    assert_int_equal(mpar_schedule_virtual_stage(sc, 3, 1), 7);
    a = mpar_schedule_action(sc, 0, 4);
    mpar_action_format(a, 1, buf, sizeof buf);
    assert_string_equal(buf, "F0.1");
    mpar_action_format(a, 0, buf, sizeof buf);
    assert_string_equal(buf, "F0");
    mpar_schedule_destroy(sc);
    /* ZB-V on 4 stages: a V, virtual stages 0 1 2 3 down, 4 5 6 7 back */
    sc = create_ok(MPAR_SCHEDULE_ZB_V, 4, 8, 2);
    assert_int_equal(mpar_schedule_virtual_stage(sc, 0, 1), 7);
    assert_int_equal(mpar_schedule_virtual_stage(sc, 3, 0), 3);
    assert_int_equal(mpar_schedule_virtual_stage(sc, 3, 1), 4);
    assert_int_equal(mpar_schedule_stage_of(sc, 5), 2);
    assert_int_equal(mpar_schedule_chunk_of(sc, 5), 1);
    assert_int_equal(mpar_schedule_chunk_of(sc, 2), 0);
    assert_int_equal(mpar_schedule_virtual_stage(sc, 0, 2), -1);
    mpar_schedule_destroy(sc);
}

static char* capture(void (*write)(FILE*, const void*, const void*), const void* x, const void* y) {
    FILE* f = tmpfile();
    long n;
    char* text;
    assert_non_null(f);
    write(f, x, y);
    n = ftell(f);
    rewind(f);
    text = (char*)malloc((size_t)n + 1);
    assert_non_null(text);
    assert_int_equal(fread(text, 1, (size_t)n, f), (size_t)n);
    text[n] = '\0';
    fclose(f);
    return text;
}

static void write_schedule(FILE* f, const void* x, const void* y) {
    (void)y;
    mpar_schedule_print((const mpar_schedule*)x, f);
}

static void write_simulation(FILE* f, const void* x, const void* y) {
    mpar_simulation_print((const mpar_simulation*)x, (const mpar_schedule*)y, f, 27);
}

static void test_print_table_and_timeline(void** state) {
    mpar_schedule* z = create_ok(MPAR_SCHEDULE_ZB_H1, 4, 8, 1);
    mpar_schedule* v = create_ok(MPAR_SCHEDULE_INTERLEAVED_1F1B, 2, 2, 2);
    mpar_schedule* g = create_ok(MPAR_SCHEDULE_GPIPE, 2, 2, 1);
    mpar_simulation* sim = simulate_ok(g, NULL);
    char* text;
    (void)state;
    text = capture(write_schedule, z, NULL);
    assert_contains(text, "schedule zbh1: 4 stages, 8 micro-batches");
    assert_contains(text, "stage 0  F0  F1  F2  F3  I0  W0  F4");
    assert_contains(text, "stage 3  F0  I0  F1  I1  F2  I2  F3  I3  W0");
    assert_contains(text, "W7  OPT");
    free(text);
    text = capture(write_schedule, v, NULL);
    assert_contains(text, "stage 0  F0.0 F1.0 F0.1 F1.1 B0.1 B1.1 B0.0 B1.0 OPT");
    free(text);
    /* GPipe P = 2, M = 2, F = 1, B = 2: step 9, one column per time unit */
    text = capture(write_simulation, sim, g);
    assert_contains(text, "step time 9, bubble 0.3333");
    assert_contains(text, "stage 0  |FFFfff.........BBBBBBbbbbbb|");
    assert_contains(text, "stage 1  |...FFFfffBBBBBBbbbbbb......|");
    assert_contains(text, "peak in flight 2");
    assert_null(strstr(text, "chunk")); /* one chunk per stage: no chunk rows */
    free(text);
    mpar_simulation_destroy(sim);
    mpar_schedule_destroy(z);
    mpar_schedule_destroy(v);
    mpar_schedule_destroy(g);
}

/* The optimizer step's chunk field is ignored, whatever it holds: found by
   tests/fuzz/fuzz_schedule.c, where the walk read the placement table at
   an OPT's unchecked chunk (run under ASan by make check). */
static void test_optimizer_chunk_ignored(void** state) {
    static const mpar_action s0[] = {{MPAR_ACTION_FORWARD, 0, 0}, {MPAR_ACTION_BACKWARD, 0, 0},
                                     {MPAR_ACTION_OPTIMIZER_STEP, -1, 1000000}};
    static const mpar_action s1[] = {{MPAR_ACTION_FORWARD, 0, 0}, {MPAR_ACTION_BACKWARD, 0, 0},
                                     {MPAR_ACTION_OPTIMIZER_STEP, -1, -7}};
    const mpar_action* lists[2] = {s0, s1};
    int counts[2] = {3, 3};
    mpar_schedule* sc = NULL;
    mpar_simulation* sim = NULL;
    (void)state;
    assert_int_equal(mpar_schedule_from_lists(2, 1, 1, lists, counts, &sc, NULL), MPAR_SUCCESS);
    assert_int_equal(mpar_schedule_validate(sc, NULL), MPAR_SUCCESS);
    assert_int_equal(mpar_simulate(sc, NULL, &sim, NULL), MPAR_SUCCESS);
    assert_int_equal(sc->peak_in_flight[0], 1);
    mpar_simulation_destroy(sim);
    mpar_schedule_destroy(sc);
}

/* Links are queues: a receiver that takes micro-batches in another order
   than its neighbour sends them is refused by name, although no stage
   would wait forever in the simulator's model. */
static void test_links_are_queues(void** state) {
    static const mpar_action s0[] = {{MPAR_ACTION_FORWARD, 0, 0}, {MPAR_ACTION_FORWARD, 1, 0},
                                     {MPAR_ACTION_BACKWARD, 0, 0}, {MPAR_ACTION_BACKWARD, 1, 0},
                                     {MPAR_ACTION_OPTIMIZER_STEP, -1, 0}};
    static const mpar_action s1[] = {{MPAR_ACTION_FORWARD, 1, 0}, {MPAR_ACTION_FORWARD, 0, 0},
                                     {MPAR_ACTION_BACKWARD, 0, 0}, {MPAR_ACTION_BACKWARD, 1, 0},
                                     {MPAR_ACTION_OPTIMIZER_STEP, -1, 0}};
    static const mpar_action s1b[] = {{MPAR_ACTION_FORWARD, 0, 0}, {MPAR_ACTION_FORWARD, 1, 0},
                                      {MPAR_ACTION_BACKWARD, 1, 0}, {MPAR_ACTION_BACKWARD, 0, 0},
                                      {MPAR_ACTION_OPTIMIZER_STEP, -1, 0}};
    const mpar_action* lists[2] = {s0, s1};
    int counts[2] = {5, 5};
    mpar_schedule* sc = NULL;
    mpar_error err;
    (void)state;
    assert_int_equal(mpar_schedule_from_lists(2, 2, 1, lists, counts, &sc, &err), MPAR_SUCCESS);
    assert_int_equal(mpar_schedule_validate(sc, &err), MPAR_ERROR_INVALID_SCHEDULE);
    assert_contains(err.message, "stage 1 step 0: F1 comes before F0 (step 1)");
    assert_contains(err.message, "first in, first out");
    mpar_schedule_destroy(sc);
    lists[1] = s1b; /* gradients sent B1 then B0, received B0 then B1 */
    assert_int_equal(mpar_schedule_from_lists(2, 2, 1, lists, counts, &sc, &err), MPAR_SUCCESS);
    assert_int_equal(mpar_schedule_validate(sc, &err), MPAR_ERROR_INVALID_SCHEDULE);
    assert_contains(err.message, "gradients of micro-batch");
    mpar_schedule_destroy(sc);
}

static void write_simulation_19(FILE* f, const void* x, const void* y) {
    mpar_simulation_print((const mpar_simulation*)x, (const mpar_schedule*)y, f, 19);
}

/* ZB-V, P = 2, M = 3 (= 2P-1: no padding), written out from the rules in
   the header: stage 0 holds virtual stages 0 and 3 (the loss), stage 1
   holds 1 and 2. Stage 0: 3 chunk-0 F's, 2 triples F1 I1 W1, one steady
   round (no F0 left) I0 W0 F1 I1 W1, 2 pairs I0 W0. Stage 1: 1 chunk-0 F,
   a pair F1 F0, a triple F1 I1 W1, a steady round F0 I0 W0 F1 I1 W1, a
   pair I0 I1, a pair I0 W0, the deferred W1 and W0. Timed by hand with
   unit costs: step 19; stage 0 idles in the last unit, stage 1 in the
   first. */
static void test_print_v_shape(void** state) {
    mpar_schedule* v = create_ok(MPAR_SCHEDULE_ZB_V, 2, 3, 2);
    mpar_simulation* sim = simulate_ok(v, NULL);
    char* text;
    (void)state;
    text = capture(write_schedule, v, NULL);
    assert_contains(text, "schedule zbv: 2 stages, 3 micro-batches, 2 virtual stages per stage\n"
                          "chunks as virtual stages (model order): stage 0: .0=0 .1=3; stage 1: .0=1 .1=2\n");
    assert_contains(text, "stage 0  F0.0 F1.0 F2.0 F0.1 I0.1 W0.1 F1.1 I1.1 W1.1 I0.0 W0.0 F2.1 I2.1 W2.1 I1.0 "
                          "W1.0 I2.0 W2.0 OPT");
    assert_contains(text, "stage 1  F0.0 F0.1 F1.0 F1.1 I0.1 W0.1 F2.0 I0.0 W0.0 F2.1 I1.1 W1.1 I1.0 I2.1 I2.0 "
                          "W1.0 W2.1 W2.0 OPT");
    free(text);
    text = capture(write_simulation_19, sim, v);
    assert_contains(text, "step time 19, bubble 0.0526");
    assert_contains(text, "chunks as virtual stages (model order): stage 0: .0=0 .1=3; stage 1: .0=1 .1=2\n");
    assert_contains(text, "stage 0  |FfFFIWfiwIWFIWiwIW.| busy 18 (94.7%), peak in flight 4\n"
                          "   chunk |000111111001110000 |\n");
    assert_contains(text, "stage 1  |.FFffIWFIWFiwiIIwWW| busy 18 (94.7%), peak in flight 4\n"
                          "   chunk | 010111000111010010|\n");
    free(text);
    mpar_simulation_destroy(sim);
    mpar_schedule_destroy(v);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_grid_every_schedule_simulates),
        cmocka_unit_test(test_bubble_gpipe_and_1f1b_match_formula),
        cmocka_unit_test(test_bubble_counts_the_last_stage_to_finish),
        cmocka_unit_test(test_sequential_utilization_is_one_over_p),
        cmocka_unit_test(test_zbh1_bubble_below_1f1b),
        cmocka_unit_test(test_zero_bubble_fill_floor),
        cmocka_unit_test(test_zbv_not_behind_zbh1),
        cmocka_unit_test(test_interleaved_bubble_below_1f1b),
        cmocka_unit_test(test_peak_in_flight),
        cmocka_unit_test(test_custom_valid_schedule_runs),
        cmocka_unit_test(test_deadlock_names_stage_step_and_wait),
        cmocka_unit_test(test_deadlock_within_one_stage),
        cmocka_unit_test(test_backward_before_forward_rejected),
        cmocka_unit_test(test_missing_actions_rejected),
        cmocka_unit_test(test_duplicate_and_out_of_range_rejected),
        cmocka_unit_test(test_bad_arguments),
        cmocka_unit_test(test_bad_costs),
        cmocka_unit_test(test_cost_defaults_links_and_scales),
        cmocka_unit_test(test_slowest_stage_sets_the_pace),
        cmocka_unit_test(test_kind_names_round_trip),
        cmocka_unit_test(test_accessors),
        cmocka_unit_test(test_print_table_and_timeline),
        cmocka_unit_test(test_links_are_queues),
        cmocka_unit_test(test_optimizer_chunk_ignored),
        cmocka_unit_test(test_print_v_shape),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
