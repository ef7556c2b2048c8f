/* Run-time allocators (mpar_allocator): once a context, model, plan,
   simulation or schedule is given one, every byte mpar allocates for it
   comes from that allocator and goes back to it. MPAR_MALLOC, MPAR_REALLOC
   and MPAR_FREE are counting wrappers here, so any call site that bypasses
   the run-time allocator shows up; every block carries its owner, so a
   block freed through another allocator than the one that made it does too. */
#define _POSIX_C_SOURCE 200809L /* mkdtemp; mpar.h would set it, but the wrappers come first */
#include <pthread.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

typedef struct counter {
    const char* name;
    long allocs, reallocs, frees;
    long live_blocks;
    long long live_bytes;
    long foreign; /* blocks handed to this counter's free or realloc that another one made */
    long attempts, fail_at; /* allocations and reallocations asked for; fail_at > 0: that one fails */
} counter;

/* Every block, from the compile-time wrappers or a counting allocator,
   starts with this header; the caller's pointer follows it. */
typedef union alloc_header {
    struct {
        counter* owner; /* &g_static or the counting allocator's counter */
        size_t size;
    } h;
    long double align_ld;
    void* align_p;
    long long align_ll;
} alloc_header;

static pthread_mutex_t g_lock = PTHREAD_MUTEX_INITIALIZER;
static counter g_static = {"MPAR_MALLOC", 0, 0, 0, 0, 0, 0, 0, 0};

/* The attempt that counter c was told to fail (fail_at), counted. */
static int fails_now(counter* c) {
    int fail;
    pthread_mutex_lock(&g_lock);
    fail = ++c->attempts == c->fail_at;
    pthread_mutex_unlock(&g_lock);
    return fail;
}

static void* block_alloc(counter* c, size_t n) {
    alloc_header* h = fails_now(c) ? NULL : (alloc_header*)malloc(sizeof(alloc_header) + n);
    if (!h) return NULL;
    h->h.owner = c, h->h.size = n;
    pthread_mutex_lock(&g_lock);
    c->allocs++, c->live_blocks++, c->live_bytes += (long long)n;
    pthread_mutex_unlock(&g_lock);
    return h + 1;
}
static void block_free(counter* c, void* p) {
    alloc_header* h;
    if (!p) return;
    h = (alloc_header*)p - 1;
    pthread_mutex_lock(&g_lock);
    c->frees++;
    if (h->h.owner != c) c->foreign++;
    h->h.owner->live_blocks--;
    h->h.owner->live_bytes -= (long long)h->h.size;
    pthread_mutex_unlock(&g_lock);
    free(h);
}
static void* block_realloc(counter* c, void* p, size_t n) {
    alloc_header *h, *g;
    size_t old;
    if (!p) {
        void* q = block_alloc(c, n);
        pthread_mutex_lock(&g_lock);
        if (q) c->allocs--, c->reallocs++;
        pthread_mutex_unlock(&g_lock);
        return q;
    }
    h = (alloc_header*)p - 1;
    old = h->h.size;
    g = fails_now(c) ? NULL : (alloc_header*)realloc(h, sizeof(alloc_header) + n);
    if (!g) return NULL;
    pthread_mutex_lock(&g_lock);
    c->reallocs++;
    if (g->h.owner != c) c->foreign++;
    g->h.owner->live_bytes += (long long)n - (long long)old;
    pthread_mutex_unlock(&g_lock);
    g->h.size = n;
    return g + 1;
}

/* The compile-time allocator: counted, so that bypasses show. */
static void* test_static_malloc(size_t n) { return block_alloc(&g_static, n); }
static void* test_static_realloc(void* p, size_t n) { return block_realloc(&g_static, p, n); }
static void test_static_free(void* p) { block_free(&g_static, p); }
#define MPAR_MALLOC(sz) test_static_malloc(sz)
#define MPAR_REALLOC(p, sz) test_static_realloc(p, sz)
#define MPAR_FREE(p) test_static_free(p)

#define MPAR_IMPLEMENTATION
#include "mpar.h"

#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <unistd.h>
#include <cmocka.h>

const char* __lsan_default_suppressions(void);
const char* __lsan_default_suppressions(void) { return "leak:libpocl.so\nleak:libLLVM\n"; }

/* The run-time allocators: `user` is the counter. */
static void* counting_alloc(void* user, size_t n) { return block_alloc((counter*)user, n); }
static void* counting_realloc(void* user, void* p, size_t n) { return block_realloc((counter*)user, p, n); }
static void counting_free(void* user, void* p) { block_free((counter*)user, p); }

static mpar_allocator allocator_of(counter* c) {
    mpar_allocator a;
    a.alloc = counting_alloc, a.realloc = counting_realloc, a.free = counting_free, a.user = c;
    return a;
}

static void counter_reset(counter* c, const char* name) {
    pthread_mutex_lock(&g_lock);
    memset(c, 0, sizeof *c);
    c->name = name;
    pthread_mutex_unlock(&g_lock);
}

/* Used, and nothing left: every block came back to the counter that made it. */
static void expect_used_and_clean(const counter* c) {
    if (c->allocs + c->reallocs == 0) fail_msg("allocator '%s' was never used", c->name);
    if (c->live_blocks != 0 || c->live_bytes != 0)
        fail_msg("allocator '%s': %ld blocks (%lld bytes) not freed", c->name, c->live_blocks, c->live_bytes);
    if (c->foreign != 0) fail_msg("allocator '%s' was handed %ld blocks it did not make", c->name, c->foreign);
}

enum { IN = 12, HID = 16, CLASSES = 5, BATCH = 16 };
static float g_x[BATCH * IN];
static int32_t g_y[BATCH];

static int setup(void** state) {
    uint64_t s = 11;
    int i;
    (void)state;
    for (i = 0; i < BATCH * IN; i++) g_x[i] = (float)(2.0 * mpar__rng_uniform(&s) - 1.0);
    for (i = 0; i < BATCH; i++) g_y[i] = (int32_t)(mpar__rng_next(&s) % CLASSES);
    return 0;
}

static mpar_context* make_ctx(const mpar_allocator* a) {
    mpar_desc d;
    mpar_error err;
    mpar_context* ctx = NULL;
    memset(&d, 0, sizeof d);
    d.error = &err;
    if (a) d.allocator = *a;
    if (mpar_create(&d, &ctx) != MPAR_SUCCESS) fail_msg("mpar_create: %s", err.message);
    if (mpar_device_count(ctx) < 2) fail_msg("test_alloc needs two devices (POCL_DEVICES=\"basic basic\")");
    return ctx;
}

/* `pairs` linear + activation pairs, then the classifier and the loss. */
static mpar_model* make_model(const mpar_allocator* a, int pairs) {
    mpar_model_desc md;
    mpar_model* m = NULL;
    mpar_error err;
    int i;
    memset(&md, 0, sizeof md);
    md.input_features = IN;
    md.seed = 5;
    if (a) md.allocator = *a;
    if (mpar_model_create(&md, &m, &err) != MPAR_SUCCESS) fail_msg("mpar_model_create: %s", err.message);
    for (i = 0; i < pairs; i++) {
        assert_int_equal(mpar_model_add_linear(m, HID, NULL), MPAR_SUCCESS);
        assert_int_equal(mpar_model_add_simple(m, i % 2 ? mpar_layer_tanh() : mpar_layer_relu(), NULL), MPAR_SUCCESS);
    }
    assert_int_equal(mpar_model_add_linear(m, CLASSES, NULL), MPAR_SUCCESS);
    assert_int_equal(mpar_model_add_simple(m, mpar_layer_cross_entropy(), NULL), MPAR_SUCCESS);
    return m;
}

static void expect_same(const mpar_allocator* a, const mpar_allocator* b) {
    assert_true(a->alloc == b->alloc && a->realloc == b->realloc && a->free == b->free && a->user == b->user);
}

/* A small plan desc for mpar_plan_create: 6 equal layers on 2 devices. */
static void plan_desc(mpar_plan_desc* d, mpar_plan_layer* layers, mpar_plan_device* devices) {
    int i;
    memset(d, 0, sizeof *d);
    memset(layers, 0, 6 * sizeof *layers);
    memset(devices, 0, 2 * sizeof *devices);
    for (i = 0; i < 6; i++) {
        layers[i].flops_forward = layers[i].flops_backward_input = layers[i].flops_backward_weight = 1e6;
        layers[i].param_bytes = layers[i].activation_bytes = layers[i].output_bytes = 1024;
    }
    devices[0].flops_per_second = devices[1].flops_per_second = 1e9;
    d->num_layers = 6, d->layers = layers, d->num_devices = 2, d->devices = devices;
    d->schedule = MPAR_SCHEDULE_1F1B, d->microbatches = 4;
}

static void* read_whole(const char* path, size_t* size) {
    FILE* f = fopen(path, "rb");
    void* d;
    long n;
    assert_non_null(f);
    assert_int_equal(fseek(f, 0, SEEK_END), 0);
    n = ftell(f);
    assert_true(n > 0);
    rewind(f);
    d = malloc((size_t)n);
    assert_non_null(d);
    assert_int_equal(fread(d, 1, (size_t)n, f), (size_t)n);
    fclose(f);
    *size = (size_t)n;
    return d;
}

/* Context, model, plan, pipeline, profiled training, every timeline
   analysis, checkpoints, inference and the pure-C objects, each with its
   own counting allocator: MPAR_MALLOC is never called from mpar_create on,
   every allocator is used, and each ends with nothing live. */
static void test_every_allocation_through_its_allocator(void** state) {
    counter c_ctx, c_model, c_plan, c_sched, c_sim, c_ckpt;
    mpar_allocator a_ctx, a_model, a_plan, a_sched, a_sim, a_ckpt;
    mpar_context* ctx;
    mpar_model *m, *small;
    mpar_pipeline_desc pd;
    mpar_plan_options o;
    mpar_plan plan, own, parsed;
    mpar_plan_desc d;
    mpar_plan_layer layers[6];
    mpar_plan_device devices[2];
    mpar_pipeline* p = NULL;
    mpar_batch b;
    mpar_step_info info;
    mpar_timeline t;
    mpar_timeline_stats ts;
    mpar_timeline_link_stats ls;
    mpar_timeline_prediction pr;
    mpar_schedule *sc = NULL, *tsc = NULL, *custom = NULL;
    mpar_simulation *sim = NULL, *tsim = NULL;
    mpar_sim_desc sd;
    mpar_checkpoint_info ci;
    mpar_error err;
    double flops[2] = {1e9, 1e9}, loss = 0.0, fwd[4], bi[4], bw[4];
    char dir[64], path[128], text[64];
    float out[BATCH * CLASSES];
    FILE* f;
    void* data;
    size_t size;
    int step;
    mpar_action list0[3] = {{MPAR_ACTION_FORWARD, 0, 0}, {MPAR_ACTION_BACKWARD, 0, 0},
                            {MPAR_ACTION_OPTIMIZER_STEP, -1, 0}};
    const mpar_action* lists[1] = {list0};
    int counts[1] = {3};
    (void)state;
    counter_reset(&c_ctx, "context"), a_ctx = allocator_of(&c_ctx);
    counter_reset(&c_model, "model"), a_model = allocator_of(&c_model);
    counter_reset(&c_plan, "plan"), a_plan = allocator_of(&c_plan);
    counter_reset(&c_sched, "schedule"), a_sched = allocator_of(&c_sched);
    counter_reset(&c_sim, "simulation"), a_sim = allocator_of(&c_sim);
    counter_reset(&c_ckpt, "checkpoint parse"), a_ckpt = allocator_of(&c_ckpt);
    snprintf(dir, sizeof dir, "/tmp/mpar_alloc_XXXXXX");
    assert_non_null(mkdtemp(dir));
    counter_reset(&g_static, "MPAR_MALLOC");

    ctx = make_ctx(&a_ctx);
    m = make_model(&a_model, 9); /* 20 layers: the layer table grows past 16 (realloc) */
    assert_true(c_model.reallocs >= 2);

    /* planned by the context: the plan's arrays are the context's */
    memset(&pd, 0, sizeof pd);
    pd.schedule = MPAR_SCHEDULE_1F1B, pd.microbatches = 4, pd.max_batch = BATCH, pd.profile = 1;
    memset(&o, 0, sizeof o);
    o.device_flops = flops, o.use_devices = 2;
    if (mpar_pipeline_plan(ctx, m, &pd, &o, &plan) != MPAR_SUCCESS) fail_msg("plan: %s", mpar_last_error(ctx));
    expect_same(&plan.allocator, &a_ctx);
    pd.plan = &plan;
    if (mpar_pipeline_create(ctx, m, &pd, &p) != MPAR_SUCCESS) fail_msg("create: %s", mpar_last_error(ctx));
    mpar_plan_free(&plan);

    b.inputs = g_x, b.targets = g_y, b.samples = BATCH;
    for (step = 0; step < 2; step++)
        if (mpar_pipeline_train_step(p, &b, &info) != MPAR_SUCCESS) fail_msg("train: %s", mpar_last_error(ctx));
    assert_true(isfinite(info.loss));

    /* the timeline and everything that reads it */
    assert_int_equal(mpar_pipeline_get_timeline(p, &t), MPAR_SUCCESS);
    expect_same(&t.allocator, &a_ctx);
    assert_true(t.event_count > 0);
    assert_int_equal(mpar_timeline_get_stats(&t, &ts, NULL), MPAR_SUCCESS);
    assert_int_equal(mpar_timeline_get_link_stats(&t, 0, 0, &ls, NULL), MPAR_SUCCESS);
    if (mpar_timeline_check(&t, 1e-3, &err) != MPAR_SUCCESS) fail_msg("check: %s", err.message);
    assert_int_equal(mpar_timeline_predict(&t, &pr, NULL), MPAR_SUCCESS);
    assert_int_equal(mpar_timeline_simulate(&t, &tsc, &tsim, NULL), MPAR_SUCCESS);
    expect_same(&tsc->allocator, &a_ctx);
    expect_same(&tsim->allocator, &a_ctx);
    mpar_simulation_destroy(tsim);
    mpar_schedule_destroy(tsc);
    f = tmpfile();
    assert_non_null(f);
    mpar_timeline_print_gantt(&t, f, 60);
    mpar_timeline_print_stats(&t, f);
    assert_int_equal(mpar_timeline_write_svg(&t, f), MPAR_SUCCESS);
    assert_int_equal(mpar_timeline_write_chrome_trace(&t, f), MPAR_SUCCESS);
    assert_true(ftell(f) > 0);
    fclose(f);
    mpar_timeline_free(&t);

    /* checkpoints: save, load, and a standalone parse */
    snprintf(path, sizeof path, "%s/model.ckpt", dir);
    if (mpar_pipeline_save_checkpoint(p, path, &err) != MPAR_SUCCESS) fail_msg("save: %s", err.message);
    if (mpar_pipeline_load_checkpoint(p, path, &err) != MPAR_SUCCESS) fail_msg("load: %s", err.message);
    data = read_whole(path, &size);
    if (mpar_checkpoint_parse_with(&a_ckpt, data, size, &ci, &err) != MPAR_SUCCESS) fail_msg("parse: %s", err.message);
    expect_same(&ci.allocator, &a_ckpt);
    assert_int_equal(ci.layer_count, 20);
    assert_int_equal(mpar_checkpoint_match(&ci, m, MPAR_OPTIMIZER_ADAMW, NULL), MPAR_SUCCESS);
    mpar_checkpoint_info_free(&ci);
    free(data);
    remove(path);

    if (mpar_pipeline_infer(p, &b, out, &loss) != MPAR_SUCCESS) fail_msg("infer: %s", mpar_last_error(ctx));
    assert_true(isfinite(loss));
    mpar_pipeline_destroy(p);

    /* profiling runs a pipeline of its own, on the context's allocator */
    small = make_model(&a_model, 1);
    memset(&pd, 0, sizeof pd);
    pd.max_batch = 4;
    if (mpar_profile_layers(ctx, small, &pd, 0, fwd, bi, bw) != MPAR_SUCCESS)
        fail_msg("profile: %s", mpar_last_error(ctx));
    mpar_model_destroy(small);

    /* pure C objects, each made with its own allocator */
    plan_desc(&d, layers, devices);
    d.allocator = a_plan;
    if (mpar_plan_create(&d, &own, &err) != MPAR_SUCCESS) fail_msg("plan_create: %s", err.message);
    expect_same(&own.allocator, &a_plan);
    assert_true(mpar_plan_to_string(&own, text, sizeof text) > 0);
    mpar_plan_free(&own);
    assert_int_equal(mpar_plan_parse_with(&a_plan, text, strlen(text), &parsed, NULL), MPAR_SUCCESS);
    expect_same(&parsed.allocator, &a_plan);
    mpar_plan_free(&parsed);

    assert_int_equal(mpar_schedule_create_with(&a_sched, MPAR_SCHEDULE_ZB_H1, 3, 6, 1, &sc, NULL), MPAR_SUCCESS);
    expect_same(&sc->allocator, &a_sched);
    assert_int_equal(mpar_schedule_validate(sc, NULL), MPAR_SUCCESS);
    memset(&sd, 0, sizeof sd);
    sd.allocator = a_sim;
    assert_int_equal(mpar_simulate(sc, &sd, &sim, NULL), MPAR_SUCCESS);
    expect_same(&sim->allocator, &a_sim);
    mpar_simulation_destroy(sim);
    mpar_schedule_destroy(sc);
    assert_int_equal(mpar_schedule_from_lists_with(&a_sched, 1, 1, 1, lists, counts, &custom, NULL), MPAR_SUCCESS);
    expect_same(&custom->allocator, &a_sched);
    mpar_schedule_destroy(custom);

    mpar_model_destroy(m);
    mpar_destroy(ctx);
    rmdir(dir);

    /* not once since mpar_create began */
    if (g_static.allocs != 0 || g_static.reallocs != 0 || g_static.frees != 0)
        fail_msg("MPAR_MALLOC %ld, MPAR_REALLOC %ld, MPAR_FREE %ld times though every object had an allocator",
                 g_static.allocs, g_static.reallocs, g_static.frees);
    expect_used_and_clean(&c_ctx);
    expect_used_and_clean(&c_model);
    expect_used_and_clean(&c_plan);
    expect_used_and_clean(&c_sched);
    expect_used_and_clean(&c_sim);
    expect_used_and_clean(&c_ckpt);

    /* the wrappers are live: the one documented exception reaches them */
    {
        int count = 0;
        assert_int_equal(mpar_list_devices(NULL, 0, &count, NULL), MPAR_SUCCESS);
        assert_true(count >= 2);
        assert_int_equal(g_static.allocs, 1);
        assert_int_equal(g_static.frees, 1);
        assert_int_equal(g_static.live_blocks, 0);
    }
}

/* Objects keep the allocator they were made with, whatever the context's:
   a model made with A and used by a pipeline on a context with C goes back
   to A (after the context is gone, even); a schedule made with A simulated
   with B gives a simulation freed through B. With no allocator at all,
   the compile-time one serves, and also balances. */
static void test_objects_keep_their_allocator(void** state) {
    counter c_a, c_b, c_c;
    mpar_allocator a, bb, c;
    mpar_context* ctx;
    mpar_model* m;
    mpar_stage_desc st[2];
    mpar_pipeline_desc pd;
    mpar_pipeline* p = NULL;
    mpar_batch batch;
    mpar_schedule* sc = NULL;
    mpar_simulation* sim = NULL;
    mpar_sim_desc sd;
    mpar_plan_desc d;
    mpar_plan_layer layers[6];
    mpar_plan_device devices[2];
    mpar_plan plan;
    long a_frees;
    int L;
    (void)state;
    counter_reset(&c_a, "A"), a = allocator_of(&c_a);
    counter_reset(&c_b, "B"), bb = allocator_of(&c_b);
    counter_reset(&c_c, "C (context)"), c = allocator_of(&c_c);
    counter_reset(&g_static, "MPAR_MALLOC");

    ctx = make_ctx(&c);
    m = make_model(&a, 2);
    L = mpar_model_layer_count(m);
    st[0].device = 0, st[0].first_layer = 0, st[0].last_layer = L / 2 - 1;
    st[1].device = 1, st[1].first_layer = L / 2, st[1].last_layer = L - 1;
    memset(&pd, 0, sizeof pd);
    pd.stages = st, pd.stage_count = 2, pd.schedule = MPAR_SCHEDULE_GPIPE, pd.microbatches = 2;
    pd.max_batch = BATCH;
    if (mpar_pipeline_create(ctx, m, &pd, &p) != MPAR_SUCCESS) fail_msg("create: %s", mpar_last_error(ctx));
    batch.inputs = g_x, batch.targets = g_y, batch.samples = BATCH;
    if (mpar_pipeline_train_step(p, &batch, NULL) != MPAR_SUCCESS) fail_msg("train: %s", mpar_last_error(ctx));
    /* a plan made with A while a context with C exists */
    plan_desc(&d, layers, devices);
    d.allocator = a;
    assert_int_equal(mpar_plan_create(&d, &plan, NULL), MPAR_SUCCESS);
    mpar_pipeline_destroy(p);
    mpar_destroy(ctx);
    assert_int_equal(c_c.live_blocks, 0);
    a_frees = c_a.frees;
    mpar_plan_free(&plan);
    mpar_model_destroy(m);
    assert_true(c_a.frees >= a_frees + 5); /* three plan arrays, the layer table, the model */
    assert_int_equal(c_c.foreign, 0);

    assert_int_equal(mpar_schedule_create_with(&a, MPAR_SCHEDULE_1F1B, 2, 4, 1, &sc, NULL), MPAR_SUCCESS);
    memset(&sd, 0, sizeof sd);
    sd.allocator = bb;
    a_frees = c_a.frees;
    assert_int_equal(mpar_simulate(sc, &sd, &sim, NULL), MPAR_SUCCESS);
    assert_int_equal(c_a.frees, a_frees); /* the simulator's scratch is B's too */
    mpar_schedule_destroy(sc);
    assert_int_equal(c_a.live_blocks, 0);
    assert_true(c_b.live_blocks > 0); /* the simulation outlives its schedule */
    mpar_simulation_destroy(sim);

    expect_used_and_clean(&c_a);
    expect_used_and_clean(&c_b);
    expect_used_and_clean(&c_c);
    assert_int_equal(g_static.allocs + g_static.reallocs + g_static.frees, 0);

    /* no allocator: MPAR_MALLOC, balanced */
    assert_int_equal(mpar_schedule_create(MPAR_SCHEDULE_GPIPE, 2, 2, 1, &sc, NULL), MPAR_SUCCESS);
    assert_int_equal(mpar_simulate(sc, NULL, &sim, NULL), MPAR_SUCCESS);
    mpar_simulation_destroy(sim);
    mpar_schedule_destroy(sc);
    assert_true(g_static.allocs > 0);
    assert_int_equal(g_static.live_blocks, 0);
    assert_int_equal(g_static.foreign, 0);
}

/* The references held on a cl_context: every queue and buffer made on it
   holds one, so a cl_mem or queue that a failed create leaves behind shows. */
static cl_uint context_refs(mpar_context* ctx, int device) {
    cl_context c = NULL;
    cl_uint n = 0;
    assert_int_equal(mpar_device_get_cl(ctx, device, NULL, &c, NULL), MPAR_SUCCESS);
    assert_int_equal(clGetContextInfo(c, CL_CONTEXT_REFERENCE_COUNT, sizeof n, &n, NULL), CL_SUCCESS);
    return n;
}

/* BUG (issue 18): with device-copy links a failed allocation in link setup
   leaked the link's tag, device, host and pending arrays and the device
   buffers already made. Each allocation of a 2-stage device-copy
   pipeline's create (asynchronous links across two platforms) is failed in turn: create returns an error, and
   nothing it allocated (host blocks, cl_mem, queues) is left. */
static void test_failed_create_leaks_nothing(void** state) {
    counter c;
    mpar_allocator a;
    mpar_context* ctx;
    mpar_model* m;
    mpar_stage_desc st[2];
    mpar_pipeline_desc pd;
    mpar_pipeline* p = NULL;
    mpar_result r;
    long live, n, link_failures = 0;
    cl_uint refs;
    int L;
    (void)state;
    counter_reset(&c, "context"), a = allocator_of(&c);
    ctx = make_ctx(&a);
    m = make_model(NULL, 2);
    L = mpar_model_layer_count(m);
    st[0].device = 0, st[0].first_layer = 0, st[0].last_layer = L / 2 - 1;
    st[1].device = 1, st[1].first_layer = L / 2, st[1].last_layer = L - 1;
    memset(&pd, 0, sizeof pd);
    pd.stages = st, pd.stage_count = 2, pd.schedule = MPAR_SCHEDULE_1F1B, pd.microbatches = 2;
    pd.max_batch = BATCH, pd.link_mode = MPAR_LINK_DEVICE_COPY;
    {
        mpar_device_info i0, i1; /* two platforms (scripts/run-tests.sh): pinned host buffers instead */
        memset(&i0, 0, sizeof i0), memset(&i1, 0, sizeof i1);
        assert_int_equal(mpar_device_get_info(ctx, 0, &i0), MPAR_SUCCESS);
        assert_int_equal(mpar_device_get_info(ctx, 1, &i1), MPAR_SUCCESS);
        if (i0.group != i1.group) pd.link_mode = MPAR_LINK_ASYNC;
    }
    /* once through, so that the context's kernel and program caches are full */
    if (mpar_pipeline_create(ctx, m, &pd, &p) != MPAR_SUCCESS) fail_msg("create: %s", mpar_last_error(ctx));
    mpar_pipeline_destroy(p);
    /* the context keeps its last error messages (the current one and 16
       retired): fill that ring first, so that a failure's message takes one
       block as it frees one */
    for (n = 0; n < 20; n++) assert_int_equal(mpar_pipeline_create(ctx, m, NULL, &p), MPAR_ERROR_INVALID_ARGUMENT);
    live = c.live_blocks, refs = context_refs(ctx, 0) + context_refs(ctx, 1);
    for (n = 1;; n++) {
        c.fail_at = c.attempts + n;
        p = NULL;
        r = mpar_pipeline_create(ctx, m, &pd, &p);
        c.fail_at = 0;
        if (r == MPAR_SUCCESS) break;
        assert_null(p);
        if (r != MPAR_ERROR_OUT_OF_HOST_MEMORY && r != (mpar_result)CL_OUT_OF_HOST_MEMORY) /* host-route buffers */
            fail_msg("allocation %ld failed: create gave %s (%s)", n, mpar_result_string(r), mpar_last_error(ctx));
        link_failures += strstr(mpar_last_error(ctx), "out of host memory") != NULL;
        if (c.live_blocks != live)
            fail_msg("allocation %ld failed: %ld blocks left behind", n, c.live_blocks - live);
        if (context_refs(ctx, 0) + context_refs(ctx, 1) != refs)
            fail_msg("allocation %ld failed: %d cl_context references (queues or buffers) left behind", n,
                     (int)(context_refs(ctx, 0) + context_refs(ctx, 1) - refs));
    }
    assert_true(n > 20); /* every allocation of create was failed once */
    assert_true(link_failures > 0);
    mpar_pipeline_destroy(p);
    mpar_destroy(ctx);
    mpar_model_destroy(m);
    assert_int_equal(c.live_blocks, 0);
}

/* An allocator with some of its functions is refused everywhere, as by
   mpar_create, before anything is allocated. */
static void test_partial_allocator_refused(void** state) {
    counter c;
    mpar_allocator half;
    mpar_model_desc md;
    mpar_model* m = NULL;
    mpar_plan_desc d;
    mpar_plan_layer layers[6];
    mpar_plan_device devices[2];
    mpar_plan plan;
    mpar_schedule* sc = NULL;
    mpar_simulation* sim = NULL;
    mpar_sim_desc sd;
    mpar_checkpoint_info ci;
    mpar_action one = {MPAR_ACTION_OPTIMIZER_STEP, -1, 0};
    const mpar_action* lists[1] = {&one};
    int counts[1] = {1};
    unsigned char junk[8] = {0};
    (void)state;
    counter_reset(&c, "half");
    half = allocator_of(&c);
    half.realloc = NULL;
    memset(&md, 0, sizeof md);
    md.input_features = 4, md.allocator = half;
    assert_int_equal(mpar_model_create(&md, &m, NULL), MPAR_ERROR_INVALID_ARGUMENT);
    assert_null(m);
    plan_desc(&d, layers, devices);
    d.allocator = half;
    assert_int_equal(mpar_plan_create(&d, &plan, NULL), MPAR_ERROR_INVALID_ARGUMENT);
    assert_null(plan.stages);
    assert_int_equal(mpar_plan_parse_with(&half, "0:0-1", 5, &plan, NULL), MPAR_ERROR_INVALID_ARGUMENT);
    assert_int_equal(mpar_schedule_create_with(&half, MPAR_SCHEDULE_GPIPE, 1, 1, 1, &sc, NULL),
                     MPAR_ERROR_INVALID_ARGUMENT);
    assert_int_equal(mpar_schedule_from_lists_with(&half, 1, 1, 1, lists, counts, &sc, NULL),
                     MPAR_ERROR_INVALID_ARGUMENT);
    assert_null(sc);
    assert_int_equal(mpar_checkpoint_parse_with(&half, junk, sizeof junk, &ci, NULL), MPAR_ERROR_INVALID_ARGUMENT);
    assert_int_equal(mpar_schedule_create(MPAR_SCHEDULE_GPIPE, 1, 1, 1, &sc, NULL), MPAR_SUCCESS);
    memset(&sd, 0, sizeof sd);
    sd.allocator = half;
    assert_int_equal(mpar_simulate(sc, &sd, &sim, NULL), MPAR_ERROR_INVALID_ARGUMENT);
    assert_null(sim);
    mpar_schedule_destroy(sc);
    assert_int_equal(c.allocs + c.reallocs + c.frees, 0);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_every_allocation_through_its_allocator),
        cmocka_unit_test(test_objects_keep_their_allocator),
        cmocka_unit_test(test_partial_allocator_refused),
        cmocka_unit_test(test_failed_create_leaks_nothing),
    };
    return cmocka_run_group_tests_name("alloc", tests, setup, NULL);
}
