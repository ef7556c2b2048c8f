/* Tests for the layer-range planner (section 5): pure C, no device needed.
   The brute-force checks re-implement the cost model from its documentation
   and enumerate every device sequence and every set of cut points. */
#define MPAR_IMPLEMENTATION
#include "../mpar.h"

#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <cmocka.h>

/* ---- helpers ---- */

static uint64_t rng_state = 88172645463325252ULL;

static uint64_t rnd(void) { /* xorshift64: reproducible on every platform */
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return rng_state;
}

static double rnd_unit(void) { return (double)(rnd() >> 11) / 9007199254740992.0; }
static int rnd_int(int lo, int hi) { return lo + (int)(rnd() % (uint64_t)(hi - lo + 1)); }

static int near(double a, double b) { return fabs(a - b) <= 1e-7 * (fabs(a) > fabs(b) ? fabs(a) : fabs(b)) + 1e-12; }

#define MAXL 8
#define MAXP 4

typedef struct instance {
    int L, P;
    mpar_plan_layer layers[MAXL];
    mpar_plan_device devs[MAXP];
    mpar_plan_link links[MAXP * MAXP];
    double mf[MAXL * MAXP], mbi[MAXL * MAXP], mbw[MAXL * MAXP];
    mpar_plan_desc desc;
} instance;

/* ---- the cost model, written again from the documentation ---- */

static double cost_of(const instance* in, int l, int d) {
    const mpar_plan_desc* g = &in->desc;
    const mpar_plan_layer* y = &in->layers[l];
    double s = in->devs[d].flops_per_second, t = 0.0;
    int at = l * in->P + d;
    t += g->measured_forward ? g->measured_forward[at] : (y->flops_forward > 0 ? y->flops_forward / s : 0.0);
    t += g->measured_backward_input ? g->measured_backward_input[at]
                                    : (y->flops_backward_input > 0 ? y->flops_backward_input / s : 0.0);
    t += g->measured_backward_weight ? g->measured_backward_weight[at]
                                     : (y->flops_backward_weight > 0 ? y->flops_backward_weight / s : 0.0);
    return t;
}

static double one_way(const mpar_plan_link* k, double bytes) {
    return k->latency + (k->bandwidth > 0 ? bytes / k->bandwidth : 0.0);
}

/* Transfer over a cut after layer l between devices a and b, both ways. */
static double xfer_of(const instance* in, int a, int b, int l) {
    double bytes = (double)in->layers[l].output_bytes;
    if (!in->desc.links || a == b) return 0.0;
    return one_way(&in->links[a * in->P + b], bytes) + one_way(&in->links[b * in->P + a], bytes);
}

static int virtual_of(const instance* in, int k) {
    int V = in->desc.virtual_stages ? in->desc.virtual_stages : 1;
    return in->desc.schedule == MPAR_SCHEDULE_INTERLEAVED_1F1B && k > 1 ? V : 1;
}

static double mult_of(const instance* in, int k, int s) {
    int M = in->desc.microbatches ? in->desc.microbatches : 1, v = virtual_of(in, k);
    mpar_schedule_kind kind = in->desc.schedule;
    if (v > 1) return (double)((mpar_plan_in_flight(kind, k, M, v, s % k) + v - 1) / v);
    if (kind == MPAR_SCHEDULE_INTERLEAVED_1F1B) kind = MPAR_SCHEDULE_1F1B;
    return (double)mpar_plan_in_flight(kind, k * v, M, 1, s);
}

static double usable_of(const instance* in, int d, int k) {
    const mpar_plan_device* v = &in->devs[d];
    if (v->memory_bytes == 0) return HUGE_VAL;
    return (v->memory_bytes > v->reserve_bytes ? (double)(v->memory_bytes - v->reserve_bytes) : 0.0) / virtual_of(in, k);
}

typedef struct score {
    int feasible;
    double bottleneck, path;
} score;

/* Scores stage s on dev[s] holding layers [start[s], start[s+1]). */
static score score_of(const instance* in, const int* dev, const int* start, int n, int k) {
    score r = {1, 0.0, 0.0};
    int s, l;
    for (s = 0; s < n; ++s) {
        double comp = 0.0, mem = 0.0, t;
        double xin = s > 0 ? xfer_of(in, dev[s - 1], dev[s], start[s] - 1) : 0.0;
        double xout = s + 1 < n ? xfer_of(in, dev[s], dev[s + 1], start[s + 1] - 1) : 0.0;
        for (l = start[s]; l < start[s + 1]; ++l) {
            const mpar_plan_layer* y = &in->layers[l];
            comp += cost_of(in, l, dev[s]);
            mem += 2.0 * (double)y->param_bytes + (double)y->optimizer_bytes +
                   mult_of(in, k, s) * (double)y->activation_bytes;
        }
        if (mem > usable_of(in, dev[s], k)) r.feasible = 0;
        t = comp + xin + xout;
        if (t > r.bottleneck) r.bottleneck = t;
        r.path += comp + xin;
    }
    return r;
}

/* Lexicographic, with the planner's documented 1e-9 tie band. */
static int better(const instance* in, score a, int ka, score b, int kb) {
    double pa = in->desc.schedule == MPAR_SCHEDULE_SEQUENTIAL ? a.path : a.bottleneck;
    double pb = in->desc.schedule == MPAR_SCHEDULE_SEQUENTIAL ? b.path : b.bottleneck;
    if (!b.feasible) return a.feasible;
    if (!a.feasible) return 0;
    if (pa < pb * (1 - 1e-9)) return 1;
    if (pa > pb * (1 + 1e-9)) return 0;
    if (in->desc.schedule == MPAR_SCHEDULE_SEQUENTIAL) return ka < kb;
    if (a.path < b.path * (1 - 1e-9)) return 1;
    return a.path <= b.path * (1 + 1e-9) && ka < kb;
}

typedef struct brute {
    const instance* in;
    int dev[MAXL], start[MAXL + 1], k, n;
    score best;
    int best_k;
} brute;

static void brute_cuts(brute* b, int s) {
    int j;
    if (s == b->n - 1) {
        score sc;
        b->start[b->n] = b->in->L;
        sc = score_of(b->in, b->dev, b->start, b->n, b->k);
        if (better(b->in, sc, b->k, b->best, b->best_k)) {
            b->best = sc;
            b->best_k = b->k;
        }
        return;
    }
    for (j = b->start[s] + 1; j <= b->in->L - (b->n - 1 - s); ++j) {
        b->start[s + 1] = j;
        brute_cuts(b, s + 1);
    }
}

static void brute_orders(brute* b, int* order, int* used, int pos) {
    int d, s;
    if (pos == b->k || pos >= MAXP) {
        b->n = b->k * virtual_of(b->in, b->k);
        if (b->n > b->in->L) return;
        for (s = 0; s < b->n; ++s) b->dev[s] = order[s % b->k];
        b->start[0] = 0;
        brute_cuts(b, 0);
        return;
    }
    for (d = 0; d < b->in->P; ++d) {
        if (used[d]) continue;
        if (b->in->desc.order == MPAR_PLAN_ORDER_FIXED && pos > 0 && d < order[pos - 1]) continue;
        used[d] = 1;
        order[pos] = d;
        brute_orders(b, order, used, pos + 1);
        used[d] = 0;
    }
}

static brute brute_force(const instance* in) {
    brute b;
    int order[MAXP], used[MAXP] = {0}, k;
    memset(&b, 0, sizeof b);
    b.in = in;
    b.best.feasible = 0;
    for (k = 1; k <= in->P; ++k) {
        if (in->desc.use_devices && k != in->desc.use_devices) continue;
        b.k = k;
        brute_orders(&b, order, used, 0);
    }
    return b;
}

/* The plan's reported numbers match the model applied to its ranges. */
static void check_plan_against_model(const instance* in, const mpar_plan* p) {
    int dev[MAXL], start[MAXL + 1], s, k = p->num_stages / p->virtual_stages;
    score sc;
    assert_true(p->num_stages >= 1 && p->num_stages <= in->L);
    for (s = 0; s < p->num_stages; ++s) {
        dev[s] = p->stages[s].device;
        start[s] = p->stages[s].first_layer;
        assert_int_equal(p->stages[s].first_layer, s ? p->stages[s - 1].last_layer + 1 : 0);
        assert_true(p->stages[s].last_layer >= p->stages[s].first_layer);
        assert_int_equal(dev[s], p->stages[s % k].device);
    }
    assert_int_equal(p->stages[p->num_stages - 1].last_layer, in->L - 1);
    start[p->num_stages] = in->L;
    sc = score_of(in, dev, start, p->num_stages, k);
    assert_true(sc.feasible);
    assert_true(near(sc.bottleneck, p->bottleneck_seconds));
    assert_true(near(sc.path, p->path_seconds));
}

/* ---- random instances ---- */

static void random_layers(instance* in) {
    int l;
    for (l = 0; l < in->L; ++l) {
        mpar_plan_layer* y = &in->layers[l];
        y->flops_forward = 1e9 * (0.2 + 3.0 * rnd_unit());
        y->flops_backward_input = 1e9 * (0.2 + 3.0 * rnd_unit());
        y->flops_backward_weight = rnd_int(0, 3) ? 1e9 * (0.2 + 3.0 * rnd_unit()) : 0.0;
        y->param_bytes = (uint64_t)rnd_int(0, 1000);
        y->optimizer_bytes = (uint64_t)rnd_int(0, 2000);
        y->activation_bytes = (uint64_t)rnd_int(0, 600);
        y->output_bytes = (uint64_t)rnd_int(0, 4000);
    }
}

static void random_devices(instance* in) {
    double total = 0.0;
    int l, d;
    for (l = 0; l < in->L; ++l)
        total += 2.0 * (double)in->layers[l].param_bytes + (double)in->layers[l].optimizer_bytes +
                 3.0 * (double)in->layers[l].activation_bytes;
    for (d = 0; d < in->P; ++d) {
        mpar_plan_device* v = &in->devs[d];
        v->flops_per_second = 1e9 * (1.0 + 9.0 * rnd_unit());
        v->reserve_bytes = (uint64_t)rnd_int(0, 200);
        v->memory_bytes = rnd_int(0, 3) ? v->reserve_bytes + (uint64_t)(total * (0.2 + 1.2 * rnd_unit())) : 0;
    }
}

static void random_tables(instance* in) {
    int i, n = in->L * in->P;
    for (i = 0; i < n; ++i) {
        in->mf[i] = rnd_unit();
        in->mbi[i] = rnd_unit();
        in->mbw[i] = rnd_unit();
    }
    if (rnd_int(0, 3) == 0) in->desc.measured_forward = in->mf;
    if (rnd_int(0, 3) == 0) in->desc.measured_backward_input = in->mbi;
    if (rnd_int(0, 3) == 0) in->desc.measured_backward_weight = in->mbw;
}

static void random_links(instance* in) {
    int i;
    for (i = 0; i < in->P * in->P; ++i) {
        in->links[i].bandwidth = rnd_int(0, 4) ? 1e3 * (1.0 + 2e4 * rnd_unit()) : 0.0;
        in->links[i].latency = rnd_int(0, 2) ? 0.05 * rnd_unit() : 0.0;
    }
    if (rnd_int(0, 4)) in->desc.links = in->links;
}

static void random_schedule(instance* in) {
    static const mpar_schedule_kind kinds[5] = {MPAR_SCHEDULE_SEQUENTIAL, MPAR_SCHEDULE_GPIPE, MPAR_SCHEDULE_1F1B,
                                                MPAR_SCHEDULE_INTERLEAVED_1F1B, MPAR_SCHEDULE_ZB_H1};
    in->desc.schedule = kinds[rnd_int(0, 4)];
    in->desc.microbatches = rnd_int(0, 6);
    in->desc.virtual_stages = in->desc.schedule == MPAR_SCHEDULE_INTERLEAVED_1F1B ? rnd_int(1, 3) : 0;
    in->desc.use_devices = 0;
    if (rnd_int(0, 3) == 0) {
        int k = rnd_int(1, in->P);
        if (k * virtual_of(in, k) <= in->L) in->desc.use_devices = k;
    }
}

/* Devices in two kinds, links by kind pair: swapping two devices of a kind
   changes nothing, which is what the search's deduplication relies on. */
static void make_clusters(instance* in) {
    int d, e, kind[MAXP];
    for (d = 0; d < in->P; ++d) {
        kind[d] = rnd_int(0, 1);
        for (e = 0; e < d; ++e)
            if (kind[e] == kind[d]) in->devs[d] = in->devs[e];
    }
    for (d = 0; d < in->P; ++d)
        for (e = 0; e < in->P; ++e) {
            int a = kind[d] * 2 + kind[e];
            in->links[d * in->P + e].bandwidth = 1e3 * (1 + a);
            in->links[d * in->P + e].latency = 0.01 * (3 - a);
        }
    in->desc.links = in->links;
    in->desc.measured_forward = in->desc.measured_backward_input = in->desc.measured_backward_weight = NULL;
}

static void random_instance(instance* in, mpar_plan_order order, int clusters) {
    memset(in, 0, sizeof *in);
    in->L = rnd_int(1, MAXL);
    in->P = rnd_int(1, MAXP);
    if (order == MPAR_PLAN_ORDER_SEARCH && in->L > 7 && in->P > 3) in->L = 7; /* keep the brute force quick */
    random_layers(in);
    random_devices(in);
    in->desc.num_layers = in->L;
    in->desc.layers = in->layers;
    in->desc.num_devices = in->P;
    in->desc.devices = in->devs;
    in->desc.order = order;
    random_tables(in);
    random_links(in);
    random_schedule(in);
    if (clusters) make_clusters(in);
}

static int run_random(mpar_plan_order order, int count, int clusters) {
    int i, feasible = 0;
    for (i = 0; i < count; ++i) {
        instance in;
        mpar_plan plan;
        mpar_error err;
        mpar_result r;
        brute b;
        random_instance(&in, order, clusters);
        b = brute_force(&in);
        r = mpar_plan_create(&in.desc, &plan, &err);
        if (!b.best.feasible) {
            if (r != MPAR_ERROR_DOES_NOT_FIT) fprintf(stderr, "instance %d: expected DOES_NOT_FIT, got %d\n", i, r);
            assert_int_equal(r, MPAR_ERROR_DOES_NOT_FIT);
            assert_non_null(strstr(err.message, "bytes"));
            continue;
        }
        if (r != MPAR_SUCCESS) fprintf(stderr, "instance %d: %s\n", i, err.message);
        assert_int_equal(r, MPAR_SUCCESS);
        assert_int_equal(plan.exact, 1);
        check_plan_against_model(&in, &plan);
        if (in.desc.schedule != MPAR_SCHEDULE_SEQUENTIAL && !near(plan.bottleneck_seconds, b.best.bottleneck))
            fprintf(stderr, "instance %d: bottleneck %.17g, brute force %.17g\n", i, plan.bottleneck_seconds,
                    b.best.bottleneck);
        if (in.desc.schedule != MPAR_SCHEDULE_SEQUENTIAL) assert_true(near(plan.bottleneck_seconds, b.best.bottleneck));
        if (!near(plan.path_seconds, b.best.path))
            fprintf(stderr, "instance %d: path %.17g, brute force %.17g\n", i, plan.path_seconds, b.best.path);
        assert_true(near(plan.path_seconds, b.best.path));
        mpar_plan_free(&plan);
        feasible++;
    }
    return feasible;
}

static void test_brute_force_fixed_order(void** state) {
    (void)state;
    rng_state = 12345;
    assert_true(run_random(MPAR_PLAN_ORDER_FIXED, 300, 0) > 150); /* most instances must be feasible to mean much */
}

static void test_brute_force_order_search(void** state) {
    (void)state;
    rng_state = 67890;
    assert_true(run_random(MPAR_PLAN_ORDER_SEARCH, 300, 0) > 150);
}

static void test_brute_force_identical_devices(void** state) {
    (void)state;
    rng_state = 1357;
    assert_true(run_random(MPAR_PLAN_ORDER_SEARCH, 200, 1) > 100);
}

/* ---- hand-made instances ---- */

typedef struct simple {
    mpar_plan_layer layers[64];
    mpar_plan_device devs[8];
    mpar_plan_link links[64];
    mpar_plan_desc desc;
} simple;

/* n equal layers (1 GFLOP each way) on p devices of 1 GFLOP/s, no memory limit. */
static void simple_init(simple* s, int n, int p) {
    int i;
    memset(s, 0, sizeof *s);
    for (i = 0; i < n; ++i) {
        s->layers[i].flops_forward = 1e9;
        s->layers[i].flops_backward_input = 1e9;
        s->layers[i].flops_backward_weight = 1e9;
        s->layers[i].output_bytes = 1000;
    }
    for (i = 0; i < p; ++i) s->devs[i].flops_per_second = 1e9;
    s->desc.num_layers = n;
    s->desc.layers = s->layers;
    s->desc.num_devices = p;
    s->desc.devices = s->devs;
    s->desc.schedule = MPAR_SCHEDULE_1F1B;
    s->desc.microbatches = 8;
}

static int layers_of(const mpar_plan* p, int device) {
    int s, n = 0;
    for (s = 0; s < p->num_stages; ++s)
        if (p->stages[s].device == device) n += p->stages[s].last_layer - p->stages[s].first_layer + 1;
    return n;
}

static void test_equal_layers_equal_devices(void** state) {
    simple s;
    mpar_plan p;
    int order, i;
    (void)state;
    for (order = 0; order < 2; ++order) {
        simple_init(&s, 24, 4);
        s.desc.order = (mpar_plan_order)order;
        assert_int_equal(mpar_plan_create(&s.desc, &p, NULL), MPAR_SUCCESS);
        assert_int_equal(p.num_stages, 4);
        for (i = 0; i < 4; ++i) {
            assert_int_equal(p.stages[i].first_layer, 6 * i);
            assert_int_equal(p.stages[i].last_layer, 6 * i + 5);
            assert_int_equal(layers_of(&p, p.stages[i].device), 6);
        }
        assert_true(near(p.bottleneck_seconds, 18.0)); /* 6 layers x 3 GFLOP at 1 GFLOP/s */
        assert_true(near(p.step_seconds, 7 * 18.0 + 72.0));
        assert_int_equal(p.exact, 1);
        assert_int_equal(p.binding.kind, MPAR_PLAN_BINDING_COMPUTE);
        mpar_plan_free(&p);
    }
}

static void test_round_robin_rejected(void** state) {
    simple s;
    mpar_plan p;
    mpar_error err;
    int ld[12], i;
    (void)state;
    simple_init(&s, 12, 3);
    for (i = 0; i < 12; ++i) ld[i] = i % 3;
    s.desc.mode = MPAR_PLAN_MANUAL;
    s.desc.manual_layer_devices = ld;
    assert_int_equal(mpar_plan_create(&s.desc, &p, &err), MPAR_ERROR_INVALID_PLAN);
    assert_int_equal(err.code, MPAR_ERROR_INVALID_PLAN);
    assert_non_null(strstr(err.message, "not contiguous"));
    assert_non_null(strstr(err.message, "layer 3 is on device 0"));
    assert_null(p.stages);
    /* The same devices in runs are fine. */
    for (i = 0; i < 12; ++i) ld[i] = i / 4;
    assert_int_equal(mpar_plan_create(&s.desc, &p, &err), MPAR_SUCCESS);
    assert_int_equal(p.num_stages, 3);
    assert_int_equal(p.stages[1].first_layer, 4);
    mpar_plan_free(&p);
}

static mpar_result manual(simple* s, const char* text, mpar_error* err) {
    mpar_plan parsed, p;
    mpar_result r = mpar_plan_parse(text, strlen(text), &parsed, err);
    if (r != MPAR_SUCCESS) return r;
    s->desc.mode = MPAR_PLAN_MANUAL;
    s->desc.manual_stages = parsed.stages;
    s->desc.num_manual_stages = parsed.num_stages;
    r = mpar_plan_create(&s->desc, &p, err);
    mpar_plan_free(&p);
    mpar_plan_free(&parsed);
    return r;
}

static void expect_manual(const char* text, const char* words) {
    simple s;
    mpar_error err;
    simple_init(&s, 12, 3);
    err.message[0] = '\0';
    assert_int_equal(manual(&s, text, &err), MPAR_ERROR_INVALID_PLAN);
    if (!strstr(err.message, words)) fprintf(stderr, "'%s': %s\n", text, err.message);
    assert_non_null(strstr(err.message, words));
}

static void test_manual_validation(void** state) {
    simple s;
    mpar_error err;
    (void)state;
    expect_manual("0:0-3,1:5-11", "gap: layers 4-4");
    expect_manual("0:1-5,1:6-11", "gap: layers 0-0");
    expect_manual("0:0-5,1:6-10", "gap: layers 11-11");
    expect_manual("0:0-5,1:4-11", "overlap: layers 4-5");
    expect_manual("0:6-11,1:0-5", "gap: layers 0-5"); /* stage 0 must start at 0 */
    expect_manual("0:0-3,1:8-11,2:4-7", "gap: layers 4-7");
    expect_manual("0:0-3,1:4-7,0:8-11", "device 0 is used by stage 0 and stage 2");
    expect_manual("0:0-5,3:6-11", "device 3 is out of range");
    expect_manual("0:0-5,1:6-12", "not a range inside 0..11");
    simple_init(&s, 2, 3);
    assert_int_equal(manual(&s, "0:0,1:1,2:1", &err), MPAR_ERROR_INVALID_PLAN);
    assert_non_null(strstr(err.message, "more stages (3) than layers (2)"));
    simple_init(&s, 12, 3);
    assert_int_equal(manual(&s, "1:0-5,0:6-11", &err), MPAR_SUCCESS);
    /* out of order: both ranges valid, listed backwards after a first stage */
    simple_init(&s, 12, 3);
    assert_int_equal(manual(&s, "0:0-5,1:8-11,2:6-7", &err), MPAR_ERROR_INVALID_PLAN);
    assert_non_null(strstr(err.message, "gap: layers 6-7"));
    {
        mpar_plan_stage st[3];
        mpar_plan p;
        memset(st, 0, sizeof st);
        st[0].device = 0, st[0].first_layer = 0, st[0].last_layer = 5;
        st[1].device = 1, st[1].first_layer = 6, st[1].last_layer = 11;
        st[2].device = 2, st[2].first_layer = 0, st[2].last_layer = 3;
        s.desc.mode = MPAR_PLAN_MANUAL;
        s.desc.manual_stages = st;
        s.desc.num_manual_stages = 3;
        assert_int_equal(mpar_plan_create(&s.desc, &p, &err), MPAR_ERROR_INVALID_PLAN);
        assert_non_null(strstr(err.message, "out of order: stage 2 (layers 0-3)"));
    }
}

static void test_faster_device_gets_three_quarters(void** state) {
    simple s;
    mpar_plan p;
    double w[2] = {3.0, 1.0};
    int mode;
    (void)state;
    for (mode = 0; mode < 2; ++mode) {
        simple_init(&s, 24, 2);
        s.devs[0].flops_per_second = 3e9;
        s.desc.order = MPAR_PLAN_ORDER_FIXED;
        if (mode) {
            s.desc.mode = MPAR_PLAN_PROPORTIONAL;
            s.desc.weights = w;
        }
        assert_int_equal(mpar_plan_create(&s.desc, &p, NULL), MPAR_SUCCESS);
        assert_int_equal(p.num_stages, 2);
        assert_true(layers_of(&p, 0) >= 17 && layers_of(&p, 0) <= 19);
        assert_int_equal(layers_of(&p, 0), 18); /* 18/3 = 6 = 24 - 18 exactly */
        assert_true(near(p.bottleneck_seconds, 18.0));
        mpar_plan_free(&p);
    }
    /* With the order searched, the fast device still takes 18, wherever it sits. */
    simple_init(&s, 24, 2);
    s.devs[1].flops_per_second = 3e9;
    assert_int_equal(mpar_plan_create(&s.desc, &p, NULL), MPAR_SUCCESS);
    assert_int_equal(layers_of(&p, 1), 18);
    mpar_plan_free(&p);
}

static void test_measured_overrides_flops(void** state) {
    simple s;
    mpar_plan p;
    double fwd[48];
    int i;
    (void)state;
    simple_init(&s, 24, 2);
    s.devs[0].flops_per_second = 3e9; /* the FLOP model says device 0 is fast ... */
    for (i = 0; i < 24; ++i) {
        fwd[2 * i] = 3.0;             /* ... the measurement says it is slow */
        fwd[2 * i + 1] = 1.0;
        s.layers[i].flops_backward_input = s.layers[i].flops_backward_weight = 0.0;
    }
    s.desc.measured_forward = fwd;
    s.desc.order = MPAR_PLAN_ORDER_FIXED;
    assert_int_equal(mpar_plan_create(&s.desc, &p, NULL), MPAR_SUCCESS);
    assert_int_equal(layers_of(&p, 1), 18);
    assert_true(near(p.stages[0].compute_seconds, 18.0));
    mpar_plan_free(&p);
}

static void test_memory_small_cap(void** state) {
    simple s;
    mpar_plan p;
    mpar_error err;
    int i;
    (void)state;
    simple_init(&s, 12, 2);
    for (i = 0; i < 12; ++i) s.layers[i].param_bytes = 50; /* 100 bytes a layer with gradients */
    s.desc.order = MPAR_PLAN_ORDER_FIXED;
    s.devs[0].memory_bytes = 10000;
    s.devs[1].memory_bytes = 400;
    s.devs[1].reserve_bytes = 100; /* 300 usable: three layers */
    assert_int_equal(mpar_plan_create(&s.desc, &p, &err), MPAR_SUCCESS);
    assert_int_equal(layers_of(&p, 1), 3);
    assert_int_equal(layers_of(&p, 0), 9);
    assert_int_equal(p.device_memory_bytes[1], 300);
    assert_int_equal(p.binding.kind, MPAR_PLAN_BINDING_MEMORY);
    assert_int_equal(p.binding.device, 1);
    assert_non_null(strstr(p.binding.text, "memory of device 1"));
    mpar_plan_free(&p);
    /* 1200 bytes needed, 2 x 500 usable: the best split is 600/600, 100 short. */
    s.devs[0].memory_bytes = 500;
    s.devs[1].memory_bytes = 500;
    s.devs[1].reserve_bytes = 0;
    s.devs[1].name = "small";
    assert_int_equal(mpar_plan_create(&s.desc, &p, &err), MPAR_ERROR_DOES_NOT_FIT);
    assert_non_null(strstr(err.message, "100 bytes missing"));
    assert_non_null(strstr(err.message, "device"));
    assert_null(p.stages);
    /* A layer larger than every device. */
    s.devs[0].memory_bytes = s.devs[1].memory_bytes = 5000;
    s.layers[5].param_bytes = 4000;
    assert_int_equal(mpar_plan_create(&s.desc, &p, &err), MPAR_ERROR_DOES_NOT_FIT);
    assert_non_null(strstr(err.message, "layer 5 needs 8000 bytes"));
    assert_non_null(strstr(err.message, "fits on no device"));
}

/* Under 1F1B stage 0 stashes min(M, 2) = 2 micro-batches, under GPipe all
   4: with 8 units of memory on device 0 it takes 4 layers or only 2. */
static void test_gpipe_vs_1f1b_memory(void** state) {
    simple s;
    mpar_plan p;
    int i;
    (void)state;
    simple_init(&s, 8, 2);
    for (i = 0; i < 8; ++i) s.layers[i].activation_bytes = 1000;
    s.devs[0].memory_bytes = 8000;
    s.devs[1].memory_bytes = 40000;
    s.desc.order = MPAR_PLAN_ORDER_FIXED;
    s.desc.microbatches = 4;
    s.desc.schedule = MPAR_SCHEDULE_1F1B;
    assert_int_equal(mpar_plan_create(&s.desc, &p, NULL), MPAR_SUCCESS);
    assert_int_equal(p.stages[0].last_layer, 3);
    assert_int_equal(p.stages[0].in_flight, 2);
    assert_int_equal(p.stages[1].in_flight, 1);
    assert_int_equal(p.device_memory_bytes[0], 8000);
    assert_int_equal(p.binding.kind, MPAR_PLAN_BINDING_COMPUTE);
    mpar_plan_free(&p);
    s.desc.schedule = MPAR_SCHEDULE_GPIPE;
    assert_int_equal(mpar_plan_create(&s.desc, &p, NULL), MPAR_SUCCESS);
    assert_int_equal(p.stages[0].last_layer, 1);
    assert_int_equal(p.stages[0].in_flight, 4);
    assert_int_equal(p.binding.kind, MPAR_PLAN_BINDING_MEMORY);
    assert_int_equal(p.binding.device, 0);
    mpar_plan_free(&p);
}

static void test_in_flight_counts(void** state) {
    static const int one_f_one_b[4] = {4, 3, 2, 1}, interleaved[4] = {11, 9, 7, 5};
    int s;
    (void)state;
    for (s = 0; s < 4; ++s) {
        assert_int_equal(mpar_plan_in_flight(MPAR_SCHEDULE_GPIPE, 4, 8, 1, s), 8);
        assert_int_equal(mpar_plan_in_flight(MPAR_SCHEDULE_SEQUENTIAL, 4, 8, 1, s), 8);
        assert_int_equal(mpar_plan_in_flight(MPAR_SCHEDULE_1F1B, 4, 8, 1, s), one_f_one_b[s]);
        assert_int_equal(mpar_plan_in_flight(MPAR_SCHEDULE_1F1B, 4, 2, 1, s), s == 3 ? 1 : 2);
        assert_int_equal(mpar_plan_in_flight(MPAR_SCHEDULE_ZB_H1, 4, 8, 1, s), 4);
        assert_int_equal(mpar_plan_in_flight(MPAR_SCHEDULE_ZB_H1, 4, 3, 1, s), 3);
        assert_int_equal(mpar_plan_in_flight(MPAR_SCHEDULE_INTERLEAVED_1F1B, 4, 8, 2, s), interleaved[s]);
        assert_int_equal(mpar_plan_in_flight(MPAR_SCHEDULE_INTERLEAVED_1F1B, 4, 8, 1, s), one_f_one_b[s]);
        assert_int_equal(mpar_plan_in_flight(MPAR_SCHEDULE_INTERLEAVED_1F1B, 4, 1, 2, s), 2); /* M*V caps it */
    }
    /* M = 5 on 4 stages: padded to 8, the padding dropped: 8 real warm-up items of
       group 0 plus chunk 0 of micro-batch 4. */
    assert_int_equal(mpar_plan_in_flight(MPAR_SCHEDULE_INTERLEAVED_1F1B, 4, 5, 2, 0), 9);
    assert_int_equal(mpar_plan_in_flight(MPAR_SCHEDULE_1F1B, 0, 8, 1, 0), 0);
    assert_int_equal(mpar_plan_in_flight(MPAR_SCHEDULE_1F1B, 4, 0, 1, 0), 0);
    assert_int_equal(mpar_plan_in_flight(MPAR_SCHEDULE_1F1B, 4, 8, 1, 4), 0);
    assert_int_equal(mpar_plan_in_flight(MPAR_SCHEDULE_1F1B, 4, 8, -1, 0), 0);
    assert_int_equal(mpar_plan_in_flight((mpar_schedule_kind)99, 4, 8, 1, 0), 0);
}

/* Asynchronous links overlap compute: their transfer lengthens the path
   but neither stage's time, so a slow link no longer keeps the plan on one
   device; one blocking direction makes the cut blocking again. */
static void test_overlapping_links(void** state) {
    simple s;
    mpar_plan p;
    int i;
    (void)state;
    simple_init(&s, 8, 2);
    for (i = 0; i < 4; ++i) s.links[i].latency = 100.0, s.links[i].overlaps = 1; /* 200 s a cut, overlapped */
    s.desc.links = s.links;
    assert_int_equal(mpar_plan_create(&s.desc, &p, NULL), MPAR_SUCCESS);
    assert_int_equal(p.num_stages, 2);
    assert_true(near(p.bottleneck_seconds, 12.0));
    for (i = 0; i < 2; ++i) {
        assert_true(near(p.stages[i].transfer_seconds, 0.0));
        assert_true(near(p.stages[i].time_seconds, p.stages[i].compute_seconds));
    }
    assert_true(near(p.path_seconds, 24.0 + 200.0));
    mpar_plan_free(&p);
    s.links[1].overlaps = 0; /* 0 -> 1 blocks */
    assert_int_equal(mpar_plan_create(&s.desc, &p, NULL), MPAR_SUCCESS);
    assert_int_equal(p.num_stages, 1);
    mpar_plan_free(&p);
}

static void test_fewer_devices_when_links_slow(void** state) {
    simple s;
    mpar_plan p;
    int i;
    (void)state;
    simple_init(&s, 8, 2);
    for (i = 0; i < 4; ++i) s.links[i].latency = 100.0; /* 200 s a cut, each way */
    s.desc.links = s.links;
    assert_int_equal(mpar_plan_create(&s.desc, &p, NULL), MPAR_SUCCESS);
    assert_int_equal(p.num_stages, 1);
    assert_true(near(p.bottleneck_seconds, 24.0));
    mpar_plan_free(&p);
    for (i = 0; i < 4; ++i) s.links[i].latency = 1.0; /* 2 s a cut: splitting wins, the link dominates */
    assert_int_equal(mpar_plan_create(&s.desc, &p, NULL), MPAR_SUCCESS);
    assert_int_equal(p.num_stages, 2);
    assert_true(near(p.bottleneck_seconds, 14.0));
    assert_int_equal(p.binding.kind, MPAR_PLAN_BINDING_COMPUTE);
    mpar_plan_free(&p);
    for (i = 0; i < 8; ++i) s.layers[i].flops_backward_input = s.layers[i].flops_backward_weight = 0.0;
    for (i = 0; i < 4; ++i) s.links[i].latency = 0.5; /* F only: 4 s compute + 1 s link vs 8 s alone */
    assert_int_equal(mpar_plan_create(&s.desc, &p, NULL), MPAR_SUCCESS);
    assert_int_equal(p.num_stages, 2);
    assert_int_equal(p.binding.kind, MPAR_PLAN_BINDING_COMPUTE);
    mpar_plan_free(&p);
    for (i = 0; i < 4; ++i) s.links[i].latency = 1.5; /* 3 s link, 1 s compute per layer */
    s.desc.use_devices = 2;                          /* asked for two stages */
    assert_int_equal(mpar_plan_create(&s.desc, &p, NULL), MPAR_SUCCESS);
    assert_int_equal(p.num_stages, 2);
    assert_int_equal(p.stages[0].last_layer, 3);
    mpar_plan_free(&p);
    s.desc.use_devices = 2;
    for (i = 0; i < 8; ++i) s.layers[i].flops_forward = 1e8; /* 0.4 s compute vs 3 s link */
    assert_int_equal(mpar_plan_create(&s.desc, &p, NULL), MPAR_SUCCESS);
    assert_int_equal(p.binding.kind, MPAR_PLAN_BINDING_LINK);
    assert_non_null(strstr(p.binding.text, "link"));
    mpar_plan_free(&p);
}

static void test_text_round_trip(void** state) {
    simple s;
    mpar_plan p, back, again;
    char buf[256], small[8];
    int len, i;
    (void)state;
    simple_init(&s, 24, 4);
    s.devs[2].flops_per_second = 4e9;
    s.desc.microbatches = 16;
    assert_int_equal(mpar_plan_create(&s.desc, &p, NULL), MPAR_SUCCESS);
    len = mpar_plan_to_string(&p, buf, sizeof buf);
    assert_int_equal(len, (int)strlen(buf));
    assert_int_equal(mpar_plan_to_string(&p, small, sizeof small), len);
    assert_int_equal(strlen(small), 7);
    assert_memory_equal(small, buf, 7);
    assert_int_equal(mpar_plan_parse(buf, strlen(buf), &back, NULL), MPAR_SUCCESS);
    assert_int_equal(back.num_stages, p.num_stages);
    for (i = 0; i < p.num_stages; ++i) {
        assert_int_equal(back.stages[i].device, p.stages[i].device);
        assert_int_equal(back.stages[i].first_layer, p.stages[i].first_layer);
        assert_int_equal(back.stages[i].last_layer, p.stages[i].last_layer);
    }
    s.desc.mode = MPAR_PLAN_MANUAL;
    s.desc.manual_stages = back.stages;
    s.desc.num_manual_stages = back.num_stages;
    assert_int_equal(mpar_plan_create(&s.desc, &again, NULL), MPAR_SUCCESS);
    assert_true(near(again.bottleneck_seconds, p.bottleneck_seconds));
    assert_true(near(again.step_seconds, p.step_seconds));
    mpar_plan_free(&again);
    mpar_plan_free(&back);
    mpar_plan_free(&p);
    /* Blanks, single-layer ranges and the length limit. */
    assert_int_equal(mpar_plan_parse(" 0 : 0 - 5 ,\t1:6\n", 100, &back, NULL), MPAR_SUCCESS);
    assert_int_equal(back.num_stages, 2);
    assert_int_equal(back.stages[1].first_layer, 6);
    assert_int_equal(back.stages[1].last_layer, 6);
    mpar_plan_free(&back);
    assert_int_equal(mpar_plan_parse("0:0-5,1:6-11", 5, &back, NULL), MPAR_SUCCESS);
    assert_int_equal(back.num_stages, 1);
    assert_int_equal(back.stages[0].last_layer, 5);
    mpar_plan_free(&back);
}

static void expect_parse_error(const char* text, const char* words) {
    mpar_plan p;
    mpar_error err;
    err.message[0] = '\0';
    assert_int_equal(mpar_plan_parse(text, strlen(text), &p, &err), MPAR_ERROR_INVALID_PLAN);
    if (!strstr(err.message, words)) fprintf(stderr, "'%s': %s\n", text, err.message);
    assert_non_null(strstr(err.message, words));
    assert_null(p.stages);
    assert_int_equal(p.num_stages, 0);
}

static void test_parse_garbage(void** state) {
    mpar_plan p;
    mpar_error err;
    char fuzz[64];
    int i, j;
    (void)state;
    expect_parse_error("", "empty");
    expect_parse_error("   ", "empty");
    expect_parse_error("x", "expected a device number at offset 0, found 'x'");
    expect_parse_error("0:0-5,", "expected a device number at offset 6, found the end");
    expect_parse_error("0:0-5,,1:6-7", "offset 6, found ','");
    expect_parse_error("0-5", "expected ':' after the device at offset 1");
    expect_parse_error("0:5-", "expected a last layer");
    expect_parse_error("0:5-3", "first layer 5 is after last layer 3");
    expect_parse_error("0:0-5;1:6-7", "expected ',' or the end at offset 5");
    expect_parse_error("0:0-5 1:6-7", "expected ',' or the end at offset 6");
    expect_parse_error("0:99999999999-5", "too long");
    expect_parse_error("-1:0-5", "found '-'");
    expect_parse_error("0:0-5\x01", "found byte 0x01");
    assert_int_equal(mpar_plan_parse(NULL, 3, &p, &err), MPAR_ERROR_INVALID_ARGUMENT);
    assert_int_equal(mpar_plan_parse("0:0", 3, NULL, &err), MPAR_ERROR_INVALID_ARGUMENT);
    /* Random bytes from a small alphabet: must end in success or INVALID_PLAN. */
    rng_state = 4242;
    for (i = 0; i < 20000; ++i) {
        static const char alphabet[] = "0123456789:-, \x80\xff";
        int n = rnd_int(0, 63);
        mpar_result r;
        for (j = 0; j < n; ++j) fuzz[j] = alphabet[rnd_int(0, (int)sizeof alphabet - 2)];
        r = mpar_plan_parse(fuzz, (size_t)n, &p, &err);
        assert_true(r == MPAR_SUCCESS || r == MPAR_ERROR_INVALID_PLAN);
        if (r == MPAR_SUCCESS) assert_true(p.num_stages >= 1);
        mpar_plan_free(&p);
    }
}

static void test_invalid_arguments(void** state) {
    simple s;
    mpar_plan p;
    mpar_error err;
    double nan_value = 0.0;
    (void)state;
    nan_value = nan_value / nan_value;
    assert_int_equal(mpar_plan_create(NULL, &p, &err), MPAR_ERROR_INVALID_ARGUMENT);
    simple_init(&s, 4, 2);
    assert_int_equal(mpar_plan_create(&s.desc, NULL, &err), MPAR_ERROR_INVALID_ARGUMENT);
    s.desc.num_layers = 0;
    assert_int_equal(mpar_plan_create(&s.desc, &p, &err), MPAR_ERROR_INVALID_ARGUMENT);
    assert_non_null(strstr(err.message, "num_layers"));
    simple_init(&s, 4, 2);
    s.desc.devices = NULL;
    assert_int_equal(mpar_plan_create(&s.desc, &p, &err), MPAR_ERROR_INVALID_ARGUMENT);
    simple_init(&s, 4, 2);
    s.layers[2].flops_forward = -1.0;
    assert_int_equal(mpar_plan_create(&s.desc, &p, &err), MPAR_ERROR_INVALID_ARGUMENT);
    assert_non_null(strstr(err.message, "layer 2"));
    simple_init(&s, 4, 2);
    s.layers[1].flops_backward_input = nan_value;
    assert_int_equal(mpar_plan_create(&s.desc, &p, &err), MPAR_ERROR_INVALID_ARGUMENT);
    simple_init(&s, 4, 2);
    s.devs[1].flops_per_second = 0.0;
    assert_int_equal(mpar_plan_create(&s.desc, &p, &err), MPAR_ERROR_INVALID_ARGUMENT);
    assert_non_null(strstr(err.message, "device 1"));
    simple_init(&s, 4, 2);
    s.links[1].bandwidth = -5.0;
    s.desc.links = s.links;
    assert_int_equal(mpar_plan_create(&s.desc, &p, &err), MPAR_ERROR_INVALID_ARGUMENT);
    assert_non_null(strstr(err.message, "link 0->1"));
    simple_init(&s, 4, 2);
    s.desc.microbatches = -2;
    assert_int_equal(mpar_plan_create(&s.desc, &p, &err), MPAR_ERROR_INVALID_ARGUMENT);
    simple_init(&s, 4, 2);
    s.desc.use_devices = 3;
    assert_int_equal(mpar_plan_create(&s.desc, &p, &err), MPAR_ERROR_INVALID_ARGUMENT);
    simple_init(&s, 4, 2);
    s.desc.mode = MPAR_PLAN_PROPORTIONAL;
    assert_int_equal(mpar_plan_create(&s.desc, &p, &err), MPAR_ERROR_INVALID_ARGUMENT);
    assert_non_null(strstr(err.message, "weights"));
    simple_init(&s, 4, 2);
    s.desc.mode = MPAR_PLAN_MANUAL;
    assert_int_equal(mpar_plan_create(&s.desc, &p, &err), MPAR_ERROR_INVALID_ARGUMENT);
    simple_init(&s, 3, 4);
    s.desc.use_devices = 4; /* four stages for three layers */
    assert_int_equal(mpar_plan_create(&s.desc, &p, &err), MPAR_ERROR_INVALID_PLAN);
    assert_non_null(strstr(err.message, "more stages"));
    /* Zero devices' flops is fine when measured tables cover every part. */
    {
        double t[8] = {1, 2, 1, 2, 1, 2, 1, 2};
        simple_init(&s, 4, 2);
        s.devs[0].flops_per_second = s.devs[1].flops_per_second = 0.0;
        s.desc.measured_forward = s.desc.measured_backward_input = s.desc.measured_backward_weight = t;
        assert_int_equal(mpar_plan_create(&s.desc, &p, &err), MPAR_SUCCESS);
        mpar_plan_free(&p);
    }
}

static void test_interleaved(void** state) {
    simple s;
    mpar_plan p;
    mpar_error err;
    (void)state;
    simple_init(&s, 12, 2);
    s.desc.schedule = MPAR_SCHEDULE_INTERLEAVED_1F1B;
    s.desc.virtual_stages = 2;
    s.desc.microbatches = 4;
    s.desc.order = MPAR_PLAN_ORDER_FIXED;
    s.desc.use_devices = 2;
    assert_int_equal(mpar_plan_create(&s.desc, &p, &err), MPAR_SUCCESS);
    assert_int_equal(p.num_stages, 4);
    assert_int_equal(p.virtual_stages, 2);
    assert_int_equal(p.stages[0].device, p.stages[2].device);
    assert_int_equal(p.stages[1].device, p.stages[3].device);
    assert_true(near(p.bottleneck_seconds, 9.0)); /* 3 layers a chunk */
    /* (M-1) T + (path + (V-1) T) / V with T = 18 s a device, path 36 s. */
    assert_true(near(p.step_seconds, 3 * 18.0 + (36.0 + 18.0) / 2));
    mpar_plan_free(&p);
    assert_int_equal(manual(&s, "0:0-2,1:3-5,0:6-8,1:9-11", &err), MPAR_SUCCESS);
    assert_int_equal(manual(&s, "0:0-2,1:3-5,1:6-8,0:9-11", &err), MPAR_ERROR_INVALID_PLAN);
    assert_non_null(strstr(err.message, "interleaved"));
    assert_int_equal(manual(&s, "0:0-5,1:6-11", &err), MPAR_ERROR_INVALID_PLAN);
}

static void test_print_and_json(void** state) {
    simple s;
    mpar_plan p;
    FILE* f = tmpfile();
    char text[4096];
    size_t n;
    (void)state;
    assert_non_null(f);
    simple_init(&s, 24, 3);
    s.devs[0].memory_bytes = 1 << 30;
    s.devs[1].name = "gpu \"one\"";
    assert_int_equal(mpar_plan_create(&s.desc, &p, NULL), MPAR_SUCCESS);
    assert_int_equal(mpar_plan_print(&p, f), MPAR_SUCCESS);
    assert_int_equal(mpar_plan_write_json(&p, f), MPAR_SUCCESS);
    rewind(f);
    n = fread(text, 1, sizeof text - 1, f);
    text[n] = '\0';
    fclose(f);
    assert_non_null(strstr(text, "plan: 3 stages, 1F1B, 8 micro-batches"));
    assert_non_null(strstr(text, "predicted step"));
    assert_non_null(strstr(text, "binding: compute of stage"));
    assert_non_null(strstr(text, "{\"schedule\":\"1F1B\""));
    assert_non_null(strstr(text, "\"first_layer\":8,\"last_layer\":15"));
    assert_non_null(strstr(text, "\"exact\":true"));
    assert_int_equal(mpar_plan_print(NULL, stdout), MPAR_ERROR_INVALID_ARGUMENT);
    mpar_plan_free(&p);
}

/* Eight devices: more orders than the budget, so the hill climb runs and
   the plan says it is not proven optimal; FIXED order stays exact. */
static void test_large_device_count(void** state) {
    simple s;
    mpar_plan p, q;
    int i;
    (void)state;
    simple_init(&s, 64, 8);
    for (i = 0; i < 8; ++i) s.devs[i].flops_per_second = 1e9 * (1 + i);
    assert_int_equal(mpar_plan_create(&s.desc, &p, NULL), MPAR_SUCCESS);
    assert_int_equal(p.exact, 0);
    assert_true(p.orders_evaluated > 0 && p.orders_evaluated <= 2 * MPAR_PLAN_DEFAULT_ORDER_BUDGET);
    s.desc.order = MPAR_PLAN_ORDER_FIXED;
    assert_int_equal(mpar_plan_create(&s.desc, &q, NULL), MPAR_SUCCESS);
    assert_int_equal(q.exact, 1);
    /* No links: order does not matter, so the climb must match the exact answer. */
    assert_true(near(p.bottleneck_seconds, q.bottleneck_seconds));
    mpar_plan_free(&p);
    mpar_plan_free(&q);
    /* Links too slow to split: the climb must also try a single device. */
    for (i = 0; i < 64; ++i) s.links[i].latency = 1000.0;
    s.desc.links = s.links;
    s.desc.order = MPAR_PLAN_ORDER_SEARCH;
    assert_int_equal(mpar_plan_create(&s.desc, &p, NULL), MPAR_SUCCESS);
    assert_int_equal(p.exact, 0);
    assert_int_equal(p.num_stages, 1);
    assert_int_equal(p.stages[0].device, 7); /* the fastest */
    mpar_plan_free(&p);
}

/* Extreme but valid numbers (subnormal and huge costs, 2^60-byte layers)
   and random junk must end in a result code, never a crash or a hang; a
   successful plan always covers every layer once. */
static void test_random_descriptors_are_safe(void** state) {
    static const double values[8] = {0.0, 5e-324, 1e-300, 1.0, 3.5, 1e18, 1e300, -1.0};
    mpar_plan p_tiny;
    int it, i, ok = 0;
    (void)state;
    rng_state = 777;
    for (it = 0; it < 20000; ++it) {
        instance in;
        mpar_plan p;
        mpar_error err;
        mpar_result r;
        random_instance(&in, (mpar_plan_order)rnd_int(0, 1), 0);
        for (i = 0; i < MAXL * MAXP; ++i) {
            in.mf[i] = values[rnd_int(0, 6)];
            in.mbi[i] = rnd_int(0, 1) ? in.mf[i] : values[rnd_int(0, 6)];
            in.mbw[i] = rnd_int(0, 1) ? in.mf[i] : values[rnd_int(0, 6)];
        }
        for (i = 0; i < in.L; ++i) {
            if (rnd_int(0, 3) == 0) in.layers[i].flops_forward = values[rnd_int(0, 7)];
            if (rnd_int(0, 5) == 0) in.layers[i].param_bytes = (uint64_t)1 << 60;
        }
        for (i = 0; i < in.P; ++i)
            if (rnd_int(0, 3) == 0) in.devs[i].flops_per_second = values[rnd_int(0, 7)];
        for (i = 0; i < MAXP * MAXP; ++i)
            if (rnd_int(0, 3) == 0) in.links[i].bandwidth = values[rnd_int(0, 7)];
        in.desc.order_budget = rnd_int(0, 3) ? 0 : 1; /* sometimes the hill climb */
        r = mpar_plan_create(&in.desc, &p, &err);
        assert_true(r == MPAR_SUCCESS || r == MPAR_ERROR_INVALID_ARGUMENT || r == MPAR_ERROR_DOES_NOT_FIT);
        if (r == MPAR_SUCCESS) {
            assert_int_equal(p.stages[0].first_layer, 0);
            assert_int_equal(p.stages[p.num_stages - 1].last_layer, in.L - 1);
            for (i = 1; i < p.num_stages; ++i) assert_int_equal(p.stages[i].first_layer, p.stages[i - 1].last_layer + 1);
            for (i = 0; i < in.P; ++i)
                assert_true(!p.device_capacity_bytes[i] || p.device_memory_bytes[i] <= p.device_capacity_bytes[i]);
            ok++;
        } else {
            assert_true(strlen(err.message) > 10);
        }
        mpar_plan_free(&p);
    }
    assert_true(ok > 2000);
    /* Regression: costs of a few subnormals once kept the bisection going
       for ever (the midpoint of adjacent doubles is one of them). */
    {
        simple t;
        double tiny[6] = {5e-324, 5e-324, 1e-323, 5e-324, 5e-324, 5e-324};
        simple_init(&t, 3, 2);
        t.desc.measured_forward = t.desc.measured_backward_input = t.desc.measured_backward_weight = tiny;
        assert_int_equal(mpar_plan_create(&t.desc, &p_tiny, NULL), MPAR_SUCCESS);
        assert_true(p_tiny.bottleneck_seconds < 1e-300);
        mpar_plan_free(&p_tiny);
    }
}

/* The hill climb against the exhaustive search on random 7-device
   instances (13,699 device sequences: more than the default budget of
   4,096, so the default takes the climb) whose links matter a lot. It
   never beats the optimum (it costs real plans) and stays close to it. */
static void test_heuristic_vs_exhaustive(void** state) {
    simple s;
    int t, i, hits = 0;
    double worst = 1.0, sum = 0.0;
    (void)state;
    rng_state = 2468;
    for (t = 0; t < 24; ++t) {
        mpar_plan exact, climb;
        simple_init(&s, 24, 7);
        for (i = 0; i < 24; ++i) s.layers[i].flops_forward = 1e9 * (0.5 + rnd_unit());
        for (i = 0; i < 7; ++i) s.devs[i].flops_per_second = 1e9 * (1.0 + 9.0 * rnd_unit());
        for (i = 0; i < 49; ++i) {
            s.links[i].bandwidth = 1e3 * (0.1 + rnd_unit());
            s.links[i].latency = t % 4 == 0 ? 20.0 * rnd_unit() : 0.1 * rnd_unit(); /* some very slow */
        }
        s.desc.links = s.links;
        s.desc.order_budget = 20000;
        assert_int_equal(mpar_plan_create(&s.desc, &exact, NULL), MPAR_SUCCESS);
        s.desc.order_budget = 0;
        assert_int_equal(mpar_plan_create(&s.desc, &climb, NULL), MPAR_SUCCESS);
        assert_int_equal(exact.exact, 1);
        assert_int_equal(climb.exact, 0);
        assert_true(climb.bottleneck_seconds >= exact.bottleneck_seconds * (1 - 1e-9));
        assert_true(climb.bottleneck_seconds <= exact.bottleneck_seconds * 1.10);
        worst = climb.bottleneck_seconds / exact.bottleneck_seconds > worst
                    ? climb.bottleneck_seconds / exact.bottleneck_seconds : worst;
        sum += climb.bottleneck_seconds / exact.bottleneck_seconds;
        hits += near(climb.bottleneck_seconds, exact.bottleneck_seconds);
        mpar_plan_free(&exact);
        mpar_plan_free(&climb);
    }
    fprintf(stderr, "hill climb: optimum in %d of 24, mean ratio %.4f, worst %.4f\n", hits, sum / 24, worst);
    assert_true(hits >= 12);
    assert_true(sum / 24 <= 1.02);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_in_flight_counts),
        cmocka_unit_test(test_brute_force_fixed_order),
        cmocka_unit_test(test_brute_force_order_search),
        cmocka_unit_test(test_brute_force_identical_devices),
        cmocka_unit_test(test_equal_layers_equal_devices),
        cmocka_unit_test(test_round_robin_rejected),
        cmocka_unit_test(test_manual_validation),
        cmocka_unit_test(test_faster_device_gets_three_quarters),
        cmocka_unit_test(test_measured_overrides_flops),
        cmocka_unit_test(test_memory_small_cap),
        cmocka_unit_test(test_gpipe_vs_1f1b_memory),
        cmocka_unit_test(test_fewer_devices_when_links_slow),
        cmocka_unit_test(test_overlapping_links),
        cmocka_unit_test(test_text_round_trip),
        cmocka_unit_test(test_parse_garbage),
        cmocka_unit_test(test_invalid_arguments),
        cmocka_unit_test(test_interleaved),
        cmocka_unit_test(test_print_and_json),
        cmocka_unit_test(test_large_device_count),
        cmocka_unit_test(test_heuristic_vs_exhaustive),
        cmocka_unit_test(test_random_descriptors_are_safe),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
