/* The planner's memory model against real device memory: two PoCL devices
   capped at 1 GiB each (POCL_MEMORY_LIMIT=1, set by main before OpenCL
   starts).
   (a) A front-heavy model (about 1.4 GiB of parameters, gradients and AdamW
       moments) that an even split by layer count cannot hold: the pipeline
       that plans itself puts fewer layers on device 0, fits, and trains.
   (b) A model too large for 2 x 1 GiB: MPAR_ERROR_DOES_NOT_FIT, with the
       shortfall named, before any device memory is allocated.
   (c) Predicted bytes per device (the plan) against the bytes the executor
       allocates (mpar_pipeline_get_stats) for several models and schedules:
       each equal, to the byte, to its formula written out below from the
       layers' shapes. They differ by what the planner leaves to the reserve
       it keeps free on every device, and that difference stays below the
       reserve (the planner's claim).
   What PoCL 3.1 enforces (measured): POCL_MEMORY_LIMIT sets every CPU
   device's CL_DEVICE_GLOBAL_MEM_SIZE and CL_DEVICE_MAX_MEM_ALLOC_SIZE
   (= global / 4), but only the per-buffer limit is enforced: one
   clCreateBuffer above 256 MiB fails with CL_INVALID_BUFFER_SIZE, while
   many smaller buffers can exceed 1 GiB in total (filled and used), on one
   device or several. So "fits" is checked here against the executor's own
   byte count, and a plan must also respect the per-buffer limit. */
#define MPAR_IMPLEMENTATION
#include "mpar.h"

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <math.h>
#include <stdlib.h>
#include <cmocka.h>

const char* __lsan_default_suppressions(void);
const char* __lsan_default_suppressions(void) { return "leak:libpocl.so\nleak:libLLVM\n"; }

#define MIB (1024.0 * 1024.0)
static const uint64_t RESERVE = (uint64_t)64 << 20; /* mpar_plan_options.reserve_bytes default */

static mpar_context* g_ctx;

static int setup(void** state) {
    mpar_desc d;
    mpar_error err;
    int i;
    (void)state;
    memset(&d, 0, sizeof d);
    d.error = &err;
    if (mpar_create(&d, &g_ctx) != MPAR_SUCCESS) {
        fprintf(stderr, "mpar_create: %s\n", err.message);
        return -1;
    }
    if (mpar_device_count(g_ctx) < 2) {
        fprintf(stderr, "needs two devices (POCL_DEVICES=\"basic basic\")\n");
        return -1;
    }
    for (i = 0; i < mpar_device_count(g_ctx); i++) {
        mpar_device_info info;
        mpar_device_get_info(g_ctx, i, &info);
        if (info.global_mem_bytes != (uint64_t)1 << 30) {
            fprintf(stderr, "device %d reports %llu bytes, not 1 GiB: POCL_MEMORY_LIMIT=1 did not apply\n", i,
                    (unsigned long long)info.global_mem_bytes);
            return -1;
        }
    }
    return 0;
}

static int teardown(void** state) {
    (void)state;
    mpar_destroy(g_ctx);
    return 0;
}

/* linear widths[0], relu, linear widths[1], relu, ..., linear widths[n-1], cross-entropy */
static mpar_model* make_mlp(int in, const int* widths, int n) {
    mpar_model* m = NULL;
    mpar_model_desc md;
    mpar_error err;
    int i;
    memset(&md, 0, sizeof md);
    md.input_features = in;
    md.seed = 42;
    assert_int_equal(mpar_model_create(&md, &m, &err), MPAR_SUCCESS);
    for (i = 0; i < n; i++) {
        assert_int_equal(mpar_model_add_linear(m, widths[i], &err), MPAR_SUCCESS);
        if (i + 1 < n) assert_int_equal(mpar_model_add_simple(m, mpar_layer_relu(), &err), MPAR_SUCCESS);
    }
    assert_int_equal(mpar_model_add_simple(m, mpar_layer_cross_entropy(), &err), MPAR_SUCCESS);
    return m;
}

/* A small character GPT: embedding, decoder blocks, layer norm, head, loss. */
static mpar_model* make_gpt(int seq, int width, int heads, int blocks, int vocab) {
    mpar_model* m = NULL;
    mpar_model_desc md;
    mpar_layer_desc ld;
    mpar_error err;
    int i;
    memset(&md, 0, sizeof md);
    md.input_features = 1, md.seq_len = seq, md.seed = 7;
    assert_int_equal(mpar_model_create(&md, &m, &err), MPAR_SUCCESS);
    memset(&ld, 0, sizeof ld);
    ld.type = mpar_layer_embedding(), ld.units = width, ld.vocab = vocab;
    assert_int_equal(mpar_model_add(m, &ld, &err), MPAR_SUCCESS);
    for (i = 0; i < blocks; i++) {
        memset(&ld, 0, sizeof ld);
        ld.type = mpar_layer_decoder_block(), ld.heads = heads;
        assert_int_equal(mpar_model_add(m, &ld, &err), MPAR_SUCCESS);
    }
    assert_int_equal(mpar_model_add_simple(m, mpar_layer_layernorm(), &err), MPAR_SUCCESS);
    assert_int_equal(mpar_model_add_linear(m, vocab, &err), MPAR_SUCCESS);
    assert_int_equal(mpar_model_add_simple(m, mpar_layer_cross_entropy(), &err), MPAR_SUCCESS);
    return m;
}

static double rss_mib(void) {
    long pages = 0, resident = 0;
    FILE* f = fopen("/proc/self/statm", "r");
    if (!f) return 0.0;
    if (fscanf(f, "%ld %ld", &pages, &resident) != 2) resident = 0;
    fclose(f);
    return (double)resident * 4096.0 / MIB;
}

/* ---- the memory of a stage, from the layers' shapes ---- */

/* Activation stashes device stage s of P holds at once (chunk units with
   V chunks), as section 6 of mpar.h derives them from the lists; M is the
   schedule's (one micro-batch for SEQUENTIAL). Written out here rather than
   taken from mpar_plan_in_flight, the code under test. */
static int stash_peak(mpar_schedule_kind kind, int P, int M, int V, int s) {
    int warm = 2 * (P - s - 1) + (V - 1) * P + 1;
    switch (kind) {
    case MPAR_SCHEDULE_SEQUENTIAL: return 1;
    case MPAR_SCHEDULE_GPIPE: return M;
    case MPAR_SCHEDULE_ZB_H1: return M < P ? M : P; /* W's lag s behind the I's */
    case MPAR_SCHEDULE_1F1B: return M < P - s ? M : P - s;
    case MPAR_SCHEDULE_INTERLEAVED_1F1B:
        if (V == 1) return M < P - s ? M : P - s;
        assert_int_equal(M % P, 0); /* the closed form is for P dividing M */
        return M * V < warm ? M * V : warm;
    default: break;
    }
    fail_msg("unknown schedule %d", (int)kind);
    return 0;
}

/* Stashes chunk c of stage s holds at once, counted by walking the
   generated lists here (F takes one, B or W gives it back). */
static int chunk_peak(const mpar_pipeline_desc* pd, int P, int s, int c) {
    mpar_schedule* sc = NULL;
    int i, now = 0, most = 0, V = pd->virtual_stages > 0 ? pd->virtual_stages : 1;
    assert_int_equal(mpar_schedule_create(pd->schedule, P, pd->microbatches > 0 ? pd->microbatches : 1, V, &sc, NULL),
                     MPAR_SUCCESS);
    for (i = 0; i < mpar_schedule_action_count(sc, s); i++) {
        const mpar_action* a = mpar_schedule_action(sc, s, i);
        if (a->chunk != c) continue;
        if (a->kind == MPAR_ACTION_FORWARD && ++now > most) most = now;
        if (a->kind == MPAR_ACTION_BACKWARD || a->kind == MPAR_ACTION_BACKWARD_WEIGHT) now--;
    }
    mpar_schedule_destroy(sc);
    return most;
}

typedef struct stage_memory {
    int in_flight;      /* the planner's stash multiplier */
    int slots;          /* activation slots the executor gives the chunk */
    uint64_t predicted; /* bytes, the planner's model */
    uint64_t allocated; /* bytes, the executor's buffers */
} stage_memory;

static uint64_t at_least_one(uint64_t floats) { return floats ? floats : 1; } /* no buffer of 0 floats */

/* Chunk `j` of a plan, layers first..last, on device stage j % P. */
static stage_memory stage_memory_of(const mpar_model* m, const mpar_pipeline_desc* pd, int P, int j, int first,
                                    int last) {
    int V = pd->virtual_stages > 0 ? pd->virtual_stages : 1;
    int M = pd->schedule == MPAR_SCHEDULE_SEQUENTIAL ? 1 : pd->microbatches;
    int split = pd->schedule == MPAR_SCHEDULE_ZB_H1, adamw = pd->optimizer.kind == MPAR_OPTIMIZER_ADAMW;
    int peak = stash_peak(pd->schedule, P, M, V, j % P), l;
    uint64_t rows = (uint64_t)((pd->max_batch + M - 1) / M) * (uint64_t)mpar_model_get_desc(m)->seq_len;
    uint64_t params = 0, in = 0, stash = 0, gstash = 0, scratch = 0, partial = 0, n = (uint64_t)(last - first + 1);
    uint64_t out = (uint64_t)mpar_model_layer(m, last)->out_features;
    uint64_t in_first = (uint64_t)mpar_model_layer(m, first)->in_features, act, grad, floats;
    stage_memory r;
    for (l = first; l <= last; l++) {
        const mpar_layer* y = mpar_model_layer(m, l);
        params += y->param_count;
        in += (uint64_t)y->in_features;
        stash += y->stash_per_row, gstash += y->gstash_per_row;
        if (y->scratch_per_row > scratch) scratch = y->scratch_per_row;
        partial += (y->param_count + 4095) / 4096; /* gradient-norm chunks */
    }
    /* The planner (section 5): 2 * param_bytes (parameters and gradients)
       + optimizer_bytes (AdamW's two moments or SGD's one, and the backward
       buffer, each layer's input gradient and gstash, once per stage) +
       in_flight * activation_bytes (each layer's input and stash; ZB-H1's
       backward buffer too: its W reads it after the I). With V chunks a
       chunk is given ceil(peak / V) of its device's peak. */
    r.in_flight = V > 1 ? (peak + V - 1) / V : peak;
    r.predicted = 4 * (2 * params + (adamw ? 2 : 1) * params + (split ? 0 : rows * (in + gstash)) +
                       (uint64_t)r.in_flight * rows * (in + stash + (split ? in + gstash : 0)));
    /* The executor (mpar__vstage_buffers): every slot holds the layers'
       inputs and the stage's own output, and the stashes (with recompute,
       the stage input alone, and one working copy of all of it); the
       gradient buffer, its output's gradient included, once or per slot for
       ZB-H1; parameters, gradients and two optimizer buffers (SGD's second
       is one float); the widest layer's scratch; the targets of every slot;
       gradient-norm bookkeeping. Each chunk gets the slots its own lists
       need at most (at least one). */
    r.slots = chunk_peak(pd, P, j % P, j / P);
    if (r.slots < 1) r.slots = 1;
    act = rows * (in + out + stash);
    grad = rows * (in + out + gstash);
    floats = (uint64_t)r.slots * (pd->recompute ? rows * in_first : act) + (uint64_t)(split ? r.slots : 1) * grad;
    floats += 3 * at_least_one(params) + (adamw ? at_least_one(params) : 1) + at_least_one(rows * scratch);
    floats += pd->recompute ? act : 1;
    floats += n + at_least_one(partial) + rows * (uint64_t)r.slots + 1 + 4 * (n + 1); /* the norm table: 2(n+1) cl_ulong */
    r.allocated = 4 * floats;
    return r;
}

/* Checks a plan and the pipeline built from it against stage_memory_of,
   per device stage; prints each and returns how many disagree. The planner
   claims its per-layer bytes are "as the executor allocates it", and leaves
   the rest to reserve_bytes ("Link buffers and kernel workspace are not
   modelled: cover them with reserve_bytes"). So the plan alone is no bound
   on the allocation: allocated - predicted is each slot's copy of the stage
   output and its gradient, targets, scratch and bookkeeping, less the
   stashes recompute does not keep, plus, for interleaving, the difference
   between each chunk's own peak and the ceil(peak / V) the planner counts;
   that difference must stay below the reserve. */
static int check_memory(const char* name, const mpar_model* m, const mpar_pipeline_desc* pd, const mpar_plan* plan,
                        const mpar_pipeline_stats* stats) {
    int V = plan->virtual_stages > 0 ? plan->virtual_stages : 1, P = plan->num_stages / V, j, s, bad = 0;
    uint64_t pred[64] = {0}, alloc[64] = {0};
    int slots[64] = {0};
    char ranges[128];
    assert_int_equal(stats->stages, P);
    mpar_plan_to_string(plan, ranges, sizeof ranges);
    for (j = 0; j < plan->num_stages; j++) {
        stage_memory e = stage_memory_of(m, pd, P, j, plan->stages[j].first_layer, plan->stages[j].last_layer);
        if (plan->stages[j].in_flight != e.in_flight || plan->stages[j].memory_bytes != e.predicted) {
            printf("# %s %s chunk %d: the plan has %d in flight, %llu bytes; the model %d, %llu  <-- MISMATCH\n", name,
                   ranges, j, plan->stages[j].in_flight, (unsigned long long)plan->stages[j].memory_bytes,
                   e.in_flight, (unsigned long long)e.predicted);
            bad++;
        }
        pred[j % P] += e.predicted, alloc[j % P] += e.allocated, slots[j % P] += e.slots;
    }
    for (s = 0; s < P; s++) {
        int d = plan->stages[s].device;
        double p = (double)plan->device_memory_bytes[d], a = (double)stats->device_bytes[s];
        int ok = plan->device_memory_bytes[d] == pred[s] && (uint64_t)stats->device_bytes[s] == alloc[s] &&
                 stats->slots[s] == slots[s] && a <= p + (double)RESERVE;
        printf("# %-18s %-22s device %d: predicted %8.2f MiB (model %8.2f), allocated %8.2f MiB (model %8.2f, "
               "%d slots, model %d): %+7.2f MiB beyond the plan%s\n", name, ranges, d, p / MIB, (double)pred[s] / MIB,
               a / MIB, (double)alloc[s] / MIB, stats->slots[s], slots[s], (a - p) / MIB, ok ? "" : "  <-- MISMATCH");
        bad += !ok;
    }
    return bad;
}

/* ---- (a) a front-heavy model: the plan moves layers off device 0 ---- */

/* 22 layers; the five 4096x4096 linears (16.8 M parameters each, 256 MiB of
   parameters + gradients + AdamW moments each) sit in the first half.
   Total about 95.8 M parameters = 1.43 GiB of training state. */
static const int FRONT_IN = 4096;
static const int FRONT_W[] = {4096, 4096, 4096, 4096, 4096, 2048, 1024, 1024, 256, 256, 10};
enum { FRONT_N = 11, FRONT_BATCH = 16, FRONT_M = 4, CLASSES = 10 };

static void front_desc(mpar_pipeline_desc* pd) {
    memset(pd, 0, sizeof *pd);
    pd->schedule = MPAR_SCHEDULE_1F1B;
    pd->microbatches = FRONT_M;
    pd->max_batch = FRONT_BATCH;
    pd->optimizer.kind = MPAR_OPTIMIZER_ADAMW;
    pd->optimizer.lr = 1e-4f;
}

static void test_front_heavy_plan_fits_and_trains(void** state) {
    mpar_model* m = make_mlp(FRONT_IN, FRONT_W, FRONT_N);
    mpar_pipeline_desc pd;
    mpar_pipeline* p = NULL;
    mpar_pipeline_stats stats;
    mpar_plan plan;
    mpar_batch b;
    mpar_step_info info;
    float* x = (float*)malloc(sizeof(float) * FRONT_BATCH * FRONT_IN);
    int32_t y[FRONT_BATCH];
    int L = mpar_model_layer_count(m), i, s, dev0_layers = 0;
    double state_mib = (double)mpar_model_param_count(m) * 16.0 / MIB;
    (void)state;
    assert_non_null(x);
    assert_true(state_mib > 1.3 * 1024 && state_mib < 1.7 * 1024);
    front_desc(&pd);
    /* What the pipeline will plan for itself (same inputs: default options). */
    if (mpar_pipeline_plan(g_ctx, m, &pd, NULL, &plan) != MPAR_SUCCESS) fail_msg("plan: %s", mpar_last_error(g_ctx));
    mpar_plan_print(&plan, stdout);
    assert_int_equal(plan.num_stages, 2);
    for (s = 0; s < plan.num_stages; s++) {
        int d = plan.stages[s].device;
        assert_int_equal(plan.device_capacity_bytes[d], ((uint64_t)1 << 30) - RESERVE);
        assert_true(plan.device_memory_bytes[d] <= plan.device_capacity_bytes[d]);
        if (d == 0) dev0_layers += plan.stages[s].last_layer - plan.stages[s].first_layer + 1;
    }
    /* an even split by layer count gives device 0 L/2 layers: the plan gives it fewer */
    printf("# (a) %.0f MiB of training state, %d layers; plan puts %d on device 0 (even split: %d)\n", state_mib, L,
           dev0_layers, L / 2);
    assert_true(dev0_layers < L / 2);

    /* The pipeline that plans itself follows the same plan and trains. */
    pd.stages = NULL, pd.plan = NULL, pd.plan_options = NULL;
    if (mpar_pipeline_create(g_ctx, m, &pd, &p) != MPAR_SUCCESS) fail_msg("create: %s", mpar_last_error(g_ctx));
    for (s = 0; s < plan.num_stages; s++) { /* no public getter for a pipeline's ranges */
        assert_int_equal(p->vs[s].device, plan.stages[s].device);
        assert_int_equal(p->vs[s].first, plan.stages[s].first_layer);
        assert_int_equal(p->vs[s].last, plan.stages[s].last_layer);
    }
    for (i = 0; i < FRONT_BATCH * FRONT_IN; i++) x[i] = (float)((i * 37 % 101) - 50) / 50.0f;
    for (i = 0; i < FRONT_BATCH; i++) y[i] = i % CLASSES;
    b.inputs = x, b.targets = y, b.samples = FRONT_BATCH;
    if (mpar_pipeline_train_step(p, &b, &info) != MPAR_SUCCESS) fail_msg("step: %s", mpar_last_error(g_ctx));
    assert_int_equal(info.counted_rows, FRONT_BATCH);
    /* The step's loss is the untrained model's, the mean over the 16 rows:
       eleven linears with PyTorch's U(+-1/sqrt(in)) shrink the inputs, and
       the logits differ by about a tenth, so the softmax is near uniform and
       the loss ln(10) plus about half their variance (measured: +0.01). A
       sum instead of a mean, or a mean over the wrong count, is far off. */
    printf("# (a) loss %.6f, ln(%d) = %.6f\n", info.loss, CLASSES, log((double)CLASSES));
    assert_true(fabs(info.loss - log((double)CLASSES)) < 0.05);
    assert_int_equal(info.step, 1);
    /* PoCL does not police the total, so check what the executor allocated
       against the plan: byte for byte as modelled, below the plan plus the
       reserve, and so within the device. */
    assert_int_equal(mpar_pipeline_get_stats(p, &stats), MPAR_SUCCESS);
    if (check_memory("(a) front-heavy", m, &pd, &plan, &stats))
        fail_msg("(a): the plan or the allocation disagrees with the model; see the lines marked MISMATCH");
    for (s = 0; s < stats.stages; s++) assert_true(stats.device_bytes[s] <= (size_t)1 << 30);
    mpar_pipeline_destroy(p);
    mpar_plan_free(&plan);
    mpar_model_destroy(m);
    free(x);
}

/* The even split by layer count (explicit stages) cannot be created: its
   device 0 would hold 92 M parameters (1.37 GiB of state). On PoCL 3.1 the
   failure comes from the per-buffer limit (its 352 MiB parameter buffer >
   CL_DEVICE_MAX_MEM_ALLOC_SIZE = 256 MiB), since PoCL does not enforce the
   1 GiB total. */
static void test_front_heavy_even_split_fails(void** state) {
    mpar_model* m = make_mlp(FRONT_IN, FRONT_W, FRONT_N);
    int L = mpar_model_layer_count(m);
    mpar_stage_desc even[2] = {{0, 0, 0}, {1, 0, 0}};
    mpar_pipeline_desc pd;
    mpar_pipeline* p = NULL;
    mpar_result r;
    double t0 = mpar__now(), rss0 = rss_mib();
    (void)state;
    even[0].last_layer = L / 2 - 1, even[1].first_layer = L / 2, even[1].last_layer = L - 1;
    front_desc(&pd);
    pd.stages = even, pd.stage_count = 2;
    r = mpar_pipeline_create(g_ctx, m, &pd, &p);
    printf("# (a) even split 0:0-%d,1:%d-%d: %s (%s) in %.2f s, RSS %+.0f MiB\n", L / 2 - 1, L / 2, L - 1,
           mpar_result_string(r), mpar_last_error(g_ctx), mpar__now() - t0, rss_mib() - rss0);
    /* refused by the per-buffer check before anything is allocated (not by
       a failed clCreateBuffer), naming the parameter buffer: the largest */
    assert_int_equal(r, MPAR_ERROR_DOES_NOT_FIT);
    assert_null(p);
    {
        char expect[160];
        size_t params = 0;
        mpar_device_info info;
        int l;
        memset(&info, 0, sizeof info);
        assert_int_equal(mpar_device_get_info(g_ctx, 0, &info), MPAR_SUCCESS);
        for (l = 0; l < L / 2; l++) params += mpar_model_layer(m, l)->param_count;
        snprintf(expect, sizeof expect, "needs a buffer of %llu bytes but device 0 allows at most %llu in one buffer",
                 (unsigned long long)params * 4, (unsigned long long)info.max_alloc_bytes);
        if (!strstr(mpar_last_error(g_ctx), expect)) fail_msg("expected \"%s\" in \"%s\"", expect, mpar_last_error(g_ctx));
    }
    mpar_model_destroy(m);
}

/* The same even split, costed by the planner (mode MANUAL, which the
   header documents as "MANUAL is desc.stages"): DOES_NOT_FIT on device 0. */
static void test_front_heavy_even_split_costed_manual(void** state) {
    mpar_model* m = make_mlp(FRONT_IN, FRONT_W, FRONT_N);
    int L = mpar_model_layer_count(m);
    mpar_stage_desc even[2] = {{0, 0, 0}, {1, 0, 0}};
    mpar_pipeline_desc pd;
    mpar_plan_options o;
    mpar_plan plan;
    double flops[2] = {15e9, 15e9};
    mpar_result r;
    (void)state;
    even[0].last_layer = L / 2 - 1, even[1].first_layer = L / 2, even[1].last_layer = L - 1;
    front_desc(&pd);
    pd.stages = even, pd.stage_count = 2;
    memset(&o, 0, sizeof o);
    o.mode = MPAR_PLAN_MANUAL, o.device_flops = flops;
    r = mpar_pipeline_plan(g_ctx, m, &pd, &o, &plan);
    printf("# (a) MANUAL even split: %s: %s\n", mpar_result_string(r), mpar_last_error(g_ctx));
    fflush(stdout);
    if (r == MPAR_SUCCESS) mpar_plan_free(&plan);
    mpar_model_destroy(m);
    assert_int_equal(r, MPAR_ERROR_DOES_NOT_FIT);
    assert_non_null(strstr(mpar_last_error(g_ctx), "device 0"));
    assert_non_null(strstr(mpar_last_error(g_ctx), "missing"));
}

/* ---- (b) too large for 2 x 1 GiB ---- */

/* Ten 4096x4096 linears: 168 M parameters, 2.5 GiB of AdamW state, no layer
   above one device's 960 MiB. */
static void test_too_large_does_not_fit(void** state) {
    static const int W[] = {4096, 4096, 4096, 4096, 4096, 4096, 4096, 4096, 4096, 4096, 10};
    mpar_model* m = make_mlp(4096, W, 11);
    mpar_pipeline_desc pd;
    mpar_pipeline* p = NULL;
    mpar_plan_options o;
    double flops[2] = {15e9, 15e9}, t0, dt, rss0, drss, state_bytes;
    unsigned long long missing = 0;
    const char *msg, *at;
    (void)state;
    state_bytes = (double)mpar_model_param_count(m) * 16.0;
    memset(&pd, 0, sizeof pd);
    pd.schedule = MPAR_SCHEDULE_1F1B, pd.microbatches = 4, pd.max_batch = 16;
    memset(&o, 0, sizeof o);
    o.device_flops = flops; /* no GEMM measurement: nothing at all touches the devices */
    pd.plan_options = &o;
    rss0 = rss_mib();
    t0 = mpar__now();
    assert_int_equal(mpar_pipeline_create(g_ctx, m, &pd, &p), MPAR_ERROR_DOES_NOT_FIT);
    dt = mpar__now() - t0;
    drss = rss_mib() - rss0;
    assert_null(p);
    msg = mpar_last_error(g_ctx);
    printf("# (b) %.0f MiB of state: DOES_NOT_FIT in %.3f s, RSS %+.1f MiB: %s\n", state_bytes / MIB, dt, drss, msg);
    /* the shortfall: "... N bytes missing", at least half the excess over
       both devices, at most the whole model less one device */
    at = strstr(msg, " bytes missing");
    assert_non_null(at);
    while (at > msg && at[-1] >= '0' && at[-1] <= '9') at--;
    assert_int_equal(sscanf(at, "%llu", &missing), 1);
    assert_true((double)missing >= (state_bytes - 2.0 * (double)(((uint64_t)1 << 30) - RESERVE)) / 2.0);
    assert_true((double)missing <= state_bytes);
    assert_non_null(strstr(msg, "device"));
    /* nothing was allocated: no time spent, no 2.5 GiB of host pages (PoCL
       CPU buffers are host memory) */
    assert_true(dt < 1.0);
    assert_true(drss < 64.0);
    /* the same through the planner alone */
    {
        mpar_plan plan;
        pd.plan_options = NULL;
        assert_int_equal(mpar_pipeline_plan(g_ctx, m, &pd, &o, &plan), MPAR_ERROR_DOES_NOT_FIT);
    }
    mpar_model_destroy(m);
}

/* ---- (c) predicted vs allocated ---- */

typedef struct mem_case {
    const char* name;
    int model; /* 0: MLP 1024-1024-1024-1024-10 (batch 4096); 1: char GPT (64 tokens, width 128, 4 blocks) */
    mpar_schedule_kind kind;
    int V, recompute;
} mem_case;

/* One case: plan on both devices, build from the plan, compare per device.
   Returns the number of devices (or chunks) that disagree with the model. */
static int compare_case(const mem_case* c) {
    static const int W[] = {1024, 1024, 1024, 10};
    mpar_model* m = c->model ? make_gpt(64, 128, 4, 4, 65) : make_mlp(1024, W, 4);
    mpar_pipeline_desc pd;
    mpar_plan_options o;
    mpar_plan plan;
    mpar_pipeline* p = NULL;
    mpar_pipeline_stats stats;
    double flops[2] = {15e9, 15e9};
    char name[48];
    int bad;
    memset(&pd, 0, sizeof pd);
    pd.schedule = c->kind, pd.microbatches = 8, pd.virtual_stages = c->V, pd.recompute = c->recompute;
    pd.max_batch = c->model ? 64 : 4096; /* 512 rows per micro-batch either way */
    pd.optimizer.kind = MPAR_OPTIMIZER_ADAMW;
    memset(&o, 0, sizeof o);
    o.device_flops = flops, o.use_devices = 2, o.order = MPAR_PLAN_ORDER_FIXED;
    if (mpar_pipeline_plan(g_ctx, m, &pd, &o, &plan) != MPAR_SUCCESS) fail_msg("plan: %s", mpar_last_error(g_ctx));
    assert_int_equal(plan.num_stages, 2 * c->V);
    pd.plan = &plan;
    if (mpar_pipeline_create(g_ctx, m, &pd, &p) != MPAR_SUCCESS) fail_msg("create: %s", mpar_last_error(g_ctx));
    assert_int_equal(mpar_pipeline_get_stats(p, &stats), MPAR_SUCCESS);
    snprintf(name, sizeof name, "(c) %s %s", c->name, c->model ? "gpt" : "mlp");
    bad = check_memory(name, m, &pd, &plan, &stats);
    mpar_pipeline_destroy(p);
    mpar_plan_free(&plan);
    mpar_model_destroy(m);
    return bad;
}

static void compare_kind(const char* name, mpar_schedule_kind kind, int V, int recompute) {
    int model, bad = 0;
    for (model = 0; model < 2; model++) {
        mem_case c;
        c.name = name, c.model = model, c.kind = kind, c.V = V, c.recompute = recompute;
        bad += compare_case(&c);
    }
    fflush(stdout);
    if (bad) fail_msg("%s: the plan or the allocation disagrees with the memory model on %d device(s) or chunk(s); "
                      "see the lines marked MISMATCH", name, bad);
}

static void test_predicted_vs_allocated_gpipe(void** s) { (void)s; compare_kind("gpipe", MPAR_SCHEDULE_GPIPE, 1, 0); }
static void test_predicted_vs_allocated_1f1b(void** s) { (void)s; compare_kind("1f1b", MPAR_SCHEDULE_1F1B, 1, 0); }
static void test_predicted_vs_allocated_zbh1(void** s) { (void)s; compare_kind("zbh1", MPAR_SCHEDULE_ZB_H1, 1, 0); }
static void test_predicted_vs_allocated_interleaved(void** s) {
    (void)s;
    compare_kind("interleaved", MPAR_SCHEDULE_INTERLEAVED_1F1B, 2, 0);
}
static void test_predicted_vs_allocated_sequential(void** s) {
    (void)s;
    compare_kind("sequential", MPAR_SCHEDULE_SEQUENTIAL, 1, 0);
}
static void test_predicted_vs_allocated_recompute(void** s) {
    (void)s;
    compare_kind("1f1b+recompute", MPAR_SCHEDULE_1F1B, 1, 1);
}

/* ---- a plan must respect the per-buffer limit too ---- */

/* Four 4096x4096 linears with SGD on one device: 67 M parameters, 768 MiB
   of state (fits 960 MiB), but the stage's parameter buffer is 256.03 MiB,
   above CL_DEVICE_MAX_MEM_ALLOC_SIZE (256 MiB). A plan the planner accepts
   must be one the executor can allocate. */
static void test_plan_respects_max_alloc(void** state) {
    static const int W[] = {4096, 4096, 4096, 4096};
    mpar_model* m = make_mlp(4096, W, 4);
    mpar_pipeline_desc pd;
    mpar_plan_options o;
    mpar_plan plan;
    mpar_pipeline* p = NULL;
    mpar_device_info info;
    double flops[2] = {15e9, 15e9};
    mpar_result r;
    (void)state;
    memset(&info, 0, sizeof info);
    assert_int_equal(mpar_device_get_info(g_ctx, 0, &info), MPAR_SUCCESS);
    memset(&pd, 0, sizeof pd);
    pd.schedule = MPAR_SCHEDULE_1F1B, pd.microbatches = 2, pd.max_batch = 4;
    pd.optimizer.kind = MPAR_OPTIMIZER_SGD;
    memset(&o, 0, sizeof o);
    o.device_flops = flops, o.use_devices = 1, o.order = MPAR_PLAN_ORDER_FIXED;
    /* mpar_plan_device has no per-buffer limit: the planner accepts the
       768 MiB, and predicts them as modelled */
    r = mpar_pipeline_plan(g_ctx, m, &pd, &o, &plan);
    if (r != MPAR_SUCCESS) fail_msg("plan: %s (%s)", mpar_result_string(r), mpar_last_error(g_ctx));
    assert_int_equal(plan.num_stages, 1);
    assert_int_equal(plan.device_memory_bytes[0],
                     stage_memory_of(m, &pd, 1, 0, 0, mpar_model_layer_count(m) - 1).predicted);
    pd.plan = &plan;
    r = mpar_pipeline_create(g_ctx, m, &pd, &p);
    printf("# max alloc: plan %s predicts %.2f MiB of %.0f usable; parameter buffer %.2f MiB, max alloc %.0f MiB; "
           "create: %s (%s)\n", plan.num_stages == 1 ? "0:0-8" : "(several stages)",
           (double)plan.device_memory_bytes[0] / MIB, (double)plan.device_capacity_bytes[0] / MIB,
           (double)mpar_model_param_count(m) * 4.0 / MIB, (double)info.max_alloc_bytes / MIB, mpar_result_string(r),
           r == MPAR_SUCCESS ? "" : mpar_last_error(g_ctx));
    fflush(stdout);
    /* so the pipeline must refuse it, before allocating, naming the
       parameter buffer (the largest) and the limit */
    assert_int_equal(r, MPAR_ERROR_DOES_NOT_FIT);
    assert_null(p);
    assert_int_equal(info.max_alloc_bytes, (uint64_t)1 << 28); /* global / 4 */
    {
        char expect[160];
        snprintf(expect, sizeof expect, "needs a buffer of %llu bytes but device 0 allows at most %llu in one buffer",
                 (unsigned long long)mpar_model_param_count(m) * 4, (unsigned long long)info.max_alloc_bytes);
        if (!strstr(mpar_last_error(g_ctx), expect)) fail_msg("expected \"%s\" in \"%s\"", expect, mpar_last_error(g_ctx));
    }
    mpar_plan_free(&plan);
    mpar_model_destroy(m);
}

int main(int argc, char** argv) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_front_heavy_plan_fits_and_trains),
        cmocka_unit_test(test_front_heavy_even_split_fails),
        cmocka_unit_test(test_front_heavy_even_split_costed_manual),
        cmocka_unit_test(test_too_large_does_not_fit),
        cmocka_unit_test(test_predicted_vs_allocated_gpipe),
        cmocka_unit_test(test_predicted_vs_allocated_1f1b),
        cmocka_unit_test(test_predicted_vs_allocated_zbh1),
        cmocka_unit_test(test_predicted_vs_allocated_interleaved),
        cmocka_unit_test(test_predicted_vs_allocated_sequential),
        cmocka_unit_test(test_predicted_vs_allocated_recompute),
        cmocka_unit_test(test_plan_respects_max_alloc),
    };
    (void)argc, (void)argv;
    /* PoCL reads the limit when OpenCL starts, which is in setup (the first
       mpar_create): nothing before this line touches OpenCL. */
    setenv("POCL_MEMORY_LIMIT", "1", 1);
    return cmocka_run_group_tests_name("plan_memory", tests, setup, teardown);
}
