/* Tests for mpar_schedule_synthesize (section 6): schedules made for given
   costs and per-device stash caps. Pure C, no device needed.

   gcc -std=c99 -Wall -Wextra -Werror -pedantic -fsanitize=address,undefined \
       -I/work/main tests/test_synth.c -lcmocka -lm */
#define MPAR_IMPLEMENTATION
#include "../mpar.h"
#include "synth_case.h"

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cmocka.h>

#define assert_contains(hay, needle)                                                                       \
    do {                                                                                                   \
        if (!strstr((hay), (needle))) {                                                                    \
            print_error("expected \"%s\" in message \"%s\"\n", (needle), (hay));                           \
            fail();                                                                                        \
        }                                                                                                  \
    } while (0)

static mpar_schedule* synthesize_ok(const mpar_synth_desc* d) {
    mpar_schedule* sc = NULL;
    mpar_error err;
    mpar_result r;
    memset(&err, 0, sizeof err);
    r = mpar_schedule_synthesize(d, &sc, &err);
    if (r != MPAR_SUCCESS) {
        print_error("synthesize P=%d M=%d V=%d: %s\n", d->stages, d->microbatches, d->virtual_stages, err.message);
        fail();
    }
    assert_non_null(sc);
    return sc;
}

/* What every synthesised schedule promises: its shape and placement, a
   valid list per stage, the caps kept. */
static void check_schedule(const mpar_schedule* sc, const mpar_synth_desc* d) {
    mpar_error err;
    int V = d->virtual_stages > 0 ? d->virtual_stages : 1, s, vs;
    memset(&err, 0, sizeof err);
    if (mpar_schedule_validate(sc, &err) != MPAR_SUCCESS) {
        print_error("synthesised schedule invalid: %s\n", err.message);
        fail();
    }
    assert_int_equal(sc->custom, 1);
    assert_int_equal(sc->kind, MPAR_SCHEDULE_AUTO);
    assert_int_equal(sc->stages, d->stages);
    assert_int_equal(sc->microbatches, d->microbatches);
    assert_int_equal(sc->virtual_stages, V);
    for (vs = 0; vs < d->stages * V; ++vs)
        assert_int_equal(sc->placement[vs], d->placement ? d->placement[vs] : vs % d->stages);
    for (s = 0; d->max_in_flight && s < d->stages; ++s)
        if (d->max_in_flight[s] > 0 && sc->peak_in_flight[s] > d->max_in_flight[s]) {
            print_error("stage %d holds %d stashes, cap %d\n", s, sc->peak_in_flight[s], d->max_in_flight[s]);
            fail();
        }
    /* each chunk adds its weight gradients (B or W) in micro-batch order:
       what keeps a pipeline bit for bit with one device */
    for (s = 0; s < d->stages; ++s) {
        int c, i;
        for (c = 0; c < V; ++c) {
            int last = -1;
            for (i = 0; i < mpar_schedule_action_count(sc, s); ++i) {
                const mpar_action* a = mpar_schedule_action(sc, s, i);
                if (a->chunk != c || (a->kind != MPAR_ACTION_BACKWARD && a->kind != MPAR_ACTION_BACKWARD_WEIGHT))
                    continue;
                if (a->microbatch < last) {
                    print_error("stage %d chunk %d: weight gradient of micro-batch %d after %d\n", s, c, a->microbatch,
                                last);
                    fail();
                }
                last = a->microbatch;
            }
        }
    }
}

static uint64_t rng_state = 0x5eed;
static double uniform(double lo, double hi) {
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return lo + (hi - lo) * (double)(rng_state >> 11) / 9007199254740992.0;
}
static int uniform_int(int lo, int hi) { /* lo..hi */
    int x = lo + (int)uniform(0.0, (double)(hi - lo + 1));
    return x > hi ? hi : x;
}

/* One random table: P 2-6, M 1-24, V 1 or 2 (interleaved or V-shaped),
   F, I, W in [0.2, 3], links in [0, 0.5], caps between the least-memory
   built-in's peaks and twice those (V per stage, the least any schedule
   needs, where no built-in has this placement). Every third table has
   blocking links, every fifth uneven micro-batches (scales in [0.5, 1.5])
   and an optimizer step per device. */
typedef struct random_case {
    mpar_synth_desc d;
    int placement[12], cap[6];
    double f[12], i[12], w[12], link[12], scale[24], opt[6];
} random_case;

static void random_case_make(random_case* c, int index) {
    int P = uniform_int(2, 6), V = uniform_int(1, 2), v_shape = V == 2 && uniform(0, 1) < 0.5, vs, s, k;
    int least = -1, least_sum = 0;
    mpar_schedule* built[SYNTH_BUILTIN_KINDS];
    memset(c, 0, sizeof *c);
    c->d.stages = P;
    c->d.microbatches = uniform_int(1, 24);
    c->d.virtual_stages = V;
    for (vs = 0; vs < P * V; ++vs) {
        c->placement[vs] = v_shape ? (vs < P ? vs : 2 * P - 1 - vs) : vs % P;
        c->f[vs] = uniform(0.2, 3.0);
        c->i[vs] = uniform(0.2, 3.0);
        c->w[vs] = uniform(0.2, 3.0);
        c->link[vs] = uniform(0.0, 0.5);
    }
    c->d.placement = c->placement;
    c->d.costs.forward_per_stage = c->f;
    c->d.costs.backward_input_per_stage = c->i;
    c->d.costs.backward_weight_per_stage = c->w;
    c->d.costs.link_delay_per_boundary = c->link;
    c->d.seed = (uint64_t)index;
    c->d.costs.link_blocking = index % 3 == 1;
    if (index % 5 == 2) {
        for (k = 0; k < c->d.microbatches; ++k) c->scale[k] = uniform(0.5, 1.5);
        for (s = 0; s < P; ++s) c->opt[s] = uniform(0.0, 1.0);
        c->d.costs.microbatch_scale = c->scale;
        c->d.costs.optimizer_step_per_stage = c->opt;
    }
    for (k = 0; k < SYNTH_BUILTIN_KINDS; ++k) {
        int sum = 0;
        built[k] = synth_builtin(&c->d, k);
        if (!built[k]) continue;
        for (s = 0; s < P; ++s) sum += built[k]->peak_in_flight[s];
        if (least < 0 || sum < least_sum) least = k, least_sum = sum;
    }
    for (s = 0; s < P; ++s) {
        int need = least >= 0 ? built[least]->peak_in_flight[s] : V;
        c->cap[s] = uniform_int(need, 2 * need);
    }
    for (k = 0; k < SYNTH_BUILTIN_KINDS; ++k) mpar_schedule_destroy(built[k]);
    c->d.max_in_flight = c->cap;
}

static void test_random_tables_never_worse_than_builtins(void** state) {
    int n, with_builtin = 0, better = 0, searched = 0;
    double gain = 0.0, search_gain = 0.0;
    (void)state;
    for (n = 0; n < 200; ++n) {
        random_case c;
        mpar_schedule* sc;
        double built, step;
        random_case_make(&c, n);
        sc = synthesize_ok(&c.d);
        check_schedule(sc, &c.d);
        step = synth_step(sc, &c.d);
        built = synth_best_builtin(&c.d, NULL);
        assert_true(step > 0.0);
        if (built > 0.0) {
            if (step > built * (1.0 + 1e-9)) {
                print_error("case %d (P=%d M=%d V=%d): synthesised %.9g, built-in %.9g\n", n, c.d.stages,
                            c.d.microbatches, c.d.virtual_stages, step, built);
                fail();
            }
            with_builtin++;
            better += step < built * (1.0 - 1e-9);
            gain += 1.0 - step / built;
        }
        mpar_schedule_destroy(sc);
        c.d.effort = 1; /* the seeds alone: the built-ins, the fixed rules */
        sc = synthesize_ok(&c.d);
        built = synth_step(sc, &c.d);
        assert_true(step <= built);
        searched += step < built;
        search_gain += 1.0 - step / built;
        mpar_schedule_destroy(sc);
    }
    printf("search over its seeds: strictly shorter in %d, mean gain %.2f%%\n", searched, 100.0 * search_gain / 200);
    assert_true(with_builtin >= 100); /* the comparison above ran */
    printf("200 random tables: %d with a fitting built-in, synthesised strictly shorter in %d, mean gain %.2f%%\n",
           with_builtin, better, 100.0 * gain / with_builtin);
}

/* The case of tests/synth_case.h at M = 8. The step cannot drop below
   device 3's busy time (8 x (3 + 9)) plus the first forwards reaching it
   (2.8): 98.8, 10.1% under interleaved 1F1B's 109.9; the synthesizer
   reaches 99.2 (9.7%), so the bar here is 9%, not the 10% first hoped for.
   At M = 16 the built-in loses about the same time, 5% of a longer step
   (195.2 against 205.9; the bound is 194.8). */
static void test_realistic_unequal_case(void** state) {
    mpar_synth_desc d;
    mpar_schedule_kind kind = MPAR_SCHEDULE_AUTO;
    int M;
    (void)state;
    for (M = 8; M <= 16; M += 8) {
        mpar_schedule* sc;
        double built, step;
        synth_case_desc(&d, M);
        built = synth_best_builtin(&d, &kind);
        sc = synthesize_ok(&d);
        check_schedule(sc, &d);
        step = synth_step(sc, &d);
        assert_true(built > 0.0);
        printf("realistic case, M = %d: best built-in (%s) %.4g, synthesised %.4g, ratio %.4f\n", M,
               mpar_schedule_kind_name(kind), built, step, step / built);
        assert_true(step <= (M == 8 ? 0.91 : 0.96) * built);
        mpar_schedule_destroy(sc);
    }
}

/* Equal costs and no cap: the last stage cannot start before the other
   three forwards of micro-batch 0, and then has 3M units of work: 3M + 3
   is the optimum, and the synthesizer finds it. */
static void test_equal_costs_reach_the_bound(void** state) {
    mpar_synth_desc d;
    mpar_schedule* sc;
    (void)state;
    memset(&d, 0, sizeof d);
    d.stages = 4, d.microbatches = 16;
    sc = synthesize_ok(&d);
    check_schedule(sc, &d);
    assert_true(synth_step(sc, &d) == 51.0);
    mpar_schedule_destroy(sc);
}

static void expect_error(const mpar_synth_desc* d, mpar_result code, const char* needle) {
    mpar_schedule* sc = (mpar_schedule*)&sc; /* must be reset to NULL */
    mpar_error err;
    memset(&err, 0, sizeof err);
    assert_int_equal(mpar_schedule_synthesize(d, &sc, &err), code);
    assert_null(sc);
    assert_contains(err.message, needle);
}

static void* count_alloc(void* user, size_t size) {
    ++*(int*)user;
    return malloc(size);
}
static void* count_realloc(void* user, void* p, size_t size) {
    (void)user;
    return realloc(p, size);
}
static void count_free(void* user, void* p) {
    if (p) --*(int*)user;
    free(p);
}

static void test_bad_arguments(void** state) {
    mpar_synth_desc d, base;
    mpar_schedule* sc = NULL;
    mpar_error err;
    int bad_stage[4] = {0, 1, 2, 0}, unbalanced[4] = {0, 0, 0, 1};
    double negative[2] = {1.0, -1.0};
    (void)state;
    memset(&base, 0, sizeof base);
    base.stages = 2, base.microbatches = 4, base.virtual_stages = 2;
    memset(&err, 0, sizeof err);
    assert_int_equal(mpar_schedule_synthesize(NULL, &sc, &err), MPAR_ERROR_INVALID_ARGUMENT);
    assert_contains(err.message, "desc is NULL");
    assert_int_equal(mpar_schedule_synthesize(&base, NULL, &err), MPAR_ERROR_INVALID_ARGUMENT);
    assert_contains(err.message, "out is NULL");
    d = base, d.stages = 0;
    expect_error(&d, MPAR_ERROR_INVALID_ARGUMENT, "mpar_synth_desc.stages is 0");
    d = base, d.microbatches = -3;
    expect_error(&d, MPAR_ERROR_INVALID_ARGUMENT, "mpar_synth_desc.microbatches is -3");
    d = base, d.virtual_stages = -1;
    expect_error(&d, MPAR_ERROR_INVALID_ARGUMENT, "mpar_synth_desc.virtual_stages is -1");
    d = base, d.stages = 4096, d.microbatches = 4096;
    expect_error(&d, MPAR_ERROR_INVALID_ARGUMENT, "too large");
    bad_stage[1] = 5;
    d = base, d.placement = bad_stage;
    expect_error(&d, MPAR_ERROR_INVALID_ARGUMENT, "mpar_synth_desc.placement[1] is 5");
    d = base, d.placement = unbalanced;
    expect_error(&d, MPAR_ERROR_INVALID_ARGUMENT, "mpar_synth_desc.placement gives stage 0 3 virtual stages");
    d = base, d.effort = -1;
    expect_error(&d, MPAR_ERROR_INVALID_ARGUMENT, "mpar_synth_desc.effort is -1");
    d = base, d.split = (mpar_synth_split)7;
    expect_error(&d, MPAR_ERROR_INVALID_ARGUMENT, "mpar_synth_desc.split is 7");
    d = base, d.virtual_stages = 1, d.costs.forward_per_stage = negative;
    expect_error(&d, MPAR_ERROR_INVALID_ARGUMENT, "mpar_synth_desc.costs: forward cost of virtual stage 1 is -1");
    d = base, d.costs.link_delay = -0.5;
    expect_error(&d, MPAR_ERROR_INVALID_ARGUMENT, "mpar_synth_desc.costs: link delay of boundary 0 is -0.5");
    d = base, d.allocator.alloc = count_alloc;
    expect_error(&d, MPAR_ERROR_INVALID_ARGUMENT, "mpar_synth_desc.allocator");
}

/* Every schedule holds V stashes per device at once, so a cap below V
   cannot be met; a cap of exactly V can (one micro-batch at a time). */
static void test_unreachable_caps(void** state) {
    mpar_synth_desc d;
    mpar_schedule* sc;
    int caps[3] = {2, 1, 2}, exact[3] = {2, 2, 2};
    (void)state;
    memset(&d, 0, sizeof d);
    d.stages = 3, d.microbatches = 6, d.virtual_stages = 2, d.max_in_flight = caps;
    expect_error(&d, MPAR_ERROR_DOES_NOT_FIT, "stage 1 may hold 1 activation stash");
    expect_error(&d, MPAR_ERROR_DOES_NOT_FIT, "max_in_flight[1]");
    expect_error(&d, MPAR_ERROR_DOES_NOT_FIT, "the least-memory schedule (one micro-batch at a time) needs 2");
    d.max_in_flight = exact;
    sc = synthesize_ok(&d);
    check_schedule(sc, &d);
    mpar_schedule_destroy(sc);
    caps[1] = 0; /* <= 0: no cap on stage 1 */
    d.max_in_flight = caps;
    sc = synthesize_ok(&d);
    check_schedule(sc, &d);
    mpar_schedule_destroy(sc);
}

static int same_lists(const mpar_schedule* a, const mpar_schedule* b) {
    int s;
    for (s = 0; s < a->stages; ++s)
        if (a->action_count[s] != b->action_count[s] ||
            memcmp(a->actions[s], b->actions[s], sizeof(mpar_action) * (size_t)a->action_count[s]) != 0)
            return 0;
    return 1;
}

static void test_deterministic(void** state) {
    random_case c;
    mpar_schedule *a, *b;
    int n;
    (void)state;
    for (n = 0; n < 5; ++n) {
        random_case_make(&c, 1000 + n);
        a = synthesize_ok(&c.d);
        b = synthesize_ok(&c.d);
        assert_true(same_lists(a, b));
        mpar_schedule_destroy(a);
        mpar_schedule_destroy(b);
    }
}

/* SPLIT_NEVER: full B only, yet no worse than the unsplit built-ins;
   SPLIT_ALWAYS: I + W only. */
static void test_split_modes(void** state) {
    mpar_synth_desc d;
    mpar_schedule* sc;
    int s, i, n;
    (void)state;
    for (n = 0; n < 2; ++n) {
        synth_case_desc(&d, 8);
        d.split = n == 0 ? MPAR_SYNTH_SPLIT_NEVER : MPAR_SYNTH_SPLIT_ALWAYS;
        sc = synthesize_ok(&d);
        check_schedule(sc, &d);
        for (s = 0; s < sc->stages; ++s)
            for (i = 0; i < sc->action_count[s]; ++i) {
                mpar_action_kind k = sc->actions[s][i].kind;
                if (n == 0) assert_true(k != MPAR_ACTION_BACKWARD_INPUT && k != MPAR_ACTION_BACKWARD_WEIGHT);
                else assert_true(k != MPAR_ACTION_BACKWARD);
            }
        if (n == 0) {
            assert_int_equal(sc->split_backward, 0);
            assert_true(synth_step(sc, &d) <= synth_best_builtin(&d, NULL));
        } else {
            assert_int_equal(sc->split_backward, 1);
        }
        mpar_schedule_destroy(sc);
    }
    /* a built-in that splits (ZB-H1) is no seed under SPLIT_NEVER */
    memset(&d, 0, sizeof d);
    d.stages = 4, d.microbatches = 8, d.split = MPAR_SYNTH_SPLIT_NEVER, d.effort = 1;
    sc = synthesize_ok(&d);
    assert_int_equal(sc->split_backward, 0);
    mpar_schedule_destroy(sc);
}

static int count_kind(const mpar_schedule* sc, mpar_action_kind kind) {
    int s, i, n = 0;
    for (s = 0; s < sc->stages; ++s)
        for (i = 0; i < sc->action_count[s]; ++i) n += sc->actions[s][i].kind == kind;
    return n;
}

/* A fused backward much cheaper than I + W (1.2 against 2): most
   backwards stay whole, and the step beats the best split-only schedule. */
static void test_fused_backward_is_used(void** state) {
    mpar_synth_desc d;
    mpar_schedule *sc, *split;
    (void)state;
    memset(&d, 0, sizeof d);
    d.stages = 3, d.microbatches = 6;
    d.costs.forward = 1.0, d.costs.backward = 1.2, d.costs.backward_input = 1.0, d.costs.backward_weight = 1.0;
    sc = synthesize_ok(&d);
    check_schedule(sc, &d);
    d.split = MPAR_SYNTH_SPLIT_ALWAYS;
    split = synthesize_ok(&d);
    assert_true(count_kind(sc, MPAR_ACTION_BACKWARD) > 3 * 6 / 2);
    assert_true(synth_step(sc, &d) <= synth_best_builtin(&d, NULL));
    assert_true(synth_step(sc, &d) < synth_step(split, &d));
    mpar_schedule_destroy(sc);
    mpar_schedule_destroy(split);
}

static void test_allocator(void** state) {
    mpar_synth_desc d;
    mpar_schedule* sc;
    int live = 0;
    (void)state;
    synth_case_desc(&d, 8);
    d.effort = 200;
    d.allocator.alloc = count_alloc, d.allocator.realloc = count_realloc, d.allocator.free = count_free;
    d.allocator.user = &live;
    sc = synthesize_ok(&d);
    assert_true(live > 0); /* the schedule's own */
    mpar_schedule_destroy(sc);
    assert_int_equal(live, 0);
}

/* P = 8, M = 32 at the default effort: prints the time (benchmarks time,
   tests do not assert on it). */
static void test_large_pipeline_time(void** state) {
    mpar_synth_desc d;
    mpar_schedule* sc;
    double f[16];
    int V, vs;
    (void)state;
    for (V = 1; V <= 2; ++V) {
        clock_t t0;
        memset(&d, 0, sizeof d);
        d.stages = 8, d.microbatches = 32, d.virtual_stages = V;
        for (vs = 0; vs < 8 * V; ++vs) f[vs] = 0.5 + 0.25 * (vs % 4);
        d.costs.forward_per_stage = f;
        d.costs.link_delay = 0.1;
        t0 = clock();
        sc = synthesize_ok(&d);
        printf("P = 8, M = 32, V = %d: synthesised in %.0f ms (CPU time)\n", V,
               1000.0 * (double)(clock() - t0) / CLOCKS_PER_SEC);
        check_schedule(sc, &d);
        assert_true(synth_step(sc, &d) <= synth_best_builtin(&d, NULL));
        mpar_schedule_destroy(sc);
    }
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_random_tables_never_worse_than_builtins),
        cmocka_unit_test(test_realistic_unequal_case),
        cmocka_unit_test(test_equal_costs_reach_the_bound),
        cmocka_unit_test(test_bad_arguments),
        cmocka_unit_test(test_unreachable_caps),
        cmocka_unit_test(test_deterministic),
        cmocka_unit_test(test_split_modes),
        cmocka_unit_test(test_fused_backward_is_used),
        cmocka_unit_test(test_allocator),
        cmocka_unit_test(test_large_pipeline_time),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
