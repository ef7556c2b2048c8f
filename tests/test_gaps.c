/* Tests for gaps a mutation run found (scripts/mutate.sh, tests/mutants.txt):
   each test names the mutant it kills. Result strings; long error details
   kept whole; the kernel cache keyed by build options and strict about its
   file size; need_dx 0 only on the model's first layer; token ids checked
   against the vocabulary; 10-digit numbers in plan text; a link refusing a
   message of another micro-batch; the step counter after a failed optimizer
   step; a checkpoint load dropping computed gradients; inference with a
   short last micro-batch; host-route code waiting for OpenCL commands of
   user layers; the token-table gradient leaving unused rows alone; Chrome
   trace slices cut where the next begins; old checkpoint versions and
   unchained layer tables refused. Every test passes on both CPU routes. */
#define _GNU_SOURCE /* RTLD_NEXT, for the clFinish of the host-route tests */
#define MPAR_IMPLEMENTATION
#include "mpar.h"

#include <dlfcn.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <dirent.h>
#include <cmocka.h>

#include "stall_layer.h"

const char* __lsan_default_suppressions(void);
const char* __lsan_default_suppressions(void) { return "leak:libpocl.so\nleak:libLLVM\n"; }

enum { IN = 6, HID = 8, CLASSES = 3, BATCH = 8 };

static mpar_context* g_ctx;
static char g_dir[64];
static float g_x[BATCH * IN];
static int32_t g_y[BATCH];

static void path_in(char* out, size_t n, const char* name) { snprintf(out, n, "%s/%s", g_dir, name); }

/* A user layer's own kernel: y = 2x, for the host-route tests. */
static const char twice_cl[] =
    "__kernel void gaps_twice(__global const float* x, int x_off, __global float* y, int y_off, int n)\n"
    "{ int i = (int)get_global_id(0); if (i < n) y[y_off + i] = 2.0f * x[x_off + i]; }\n";

static int setup(void** state) {
    mpar_desc d;
    mpar_error err;
    char path[128];
    FILE* f;
    uint64_t s = 5;
    int i;
    (void)state;
    memset(&d, 0, sizeof d);
    d.error = &err;
    if (mpar_create(&d, &g_ctx) != MPAR_SUCCESS) {
        fprintf(stderr, "mpar_create: %s\n", err.message);
        return -1;
    }
    snprintf(g_dir, sizeof g_dir, "/tmp/mpar_gaps_XXXXXX");
    if (!mkdtemp(g_dir)) return -1;
    path_in(path, sizeof path, "gaps_twice.cl");
    f = fopen(path, "w");
    if (!f) return -1;
    fputs(twice_cl, f);
    fclose(f);
    for (i = 0; i < BATCH * IN; i++) g_x[i] = (float)(2.0 * mpar__rng_uniform(&s) - 1.0);
    for (i = 0; i < BATCH; i++) g_y[i] = (int32_t)(mpar__rng_next(&s) % CLASSES);
    return 0;
}

/* Removes g_dir and what the tests left in it (files, and the cache folders
   with their files). */
static void remove_tree(const char* dir) {
    DIR* d = opendir(dir);
    struct dirent* e;
    while (d && (e = readdir(d)) != NULL) {
        char p[512];
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
        snprintf(p, sizeof p, "%s/%s", dir, e->d_name);
        if (remove(p) != 0) remove_tree(p);
    }
    if (d) closedir(d);
    rmdir(dir);
}

static int teardown(void** state) {
    (void)state;
    remove_tree(g_dir);
    mpar_destroy(g_ctx);
    return 0;
}

/* linear HID, tanh, linear CLASSES, cross-entropy */
static mpar_model* small_model(void) {
    mpar_model* m = NULL;
    mpar_model_desc md;
    memset(&md, 0, sizeof md);
    md.input_features = IN, md.seed = 9;
    assert_int_equal(mpar_model_create(&md, &m, NULL), MPAR_SUCCESS);
    assert_int_equal(mpar_model_add_linear(m, HID, NULL), MPAR_SUCCESS);
    assert_int_equal(mpar_model_add_simple(m, mpar_layer_tanh(), NULL), MPAR_SUCCESS);
    assert_int_equal(mpar_model_add_linear(m, CLASSES, NULL), MPAR_SUCCESS);
    assert_int_equal(mpar_model_add_simple(m, mpar_layer_cross_entropy(), NULL), MPAR_SUCCESS);
    return m;
}

/* One stage per device used (two when there are two), layers split evenly. */
static mpar_pipeline* make_pipeline(mpar_context* ctx, const mpar_model* m, mpar_schedule_kind kind, int M,
                                    int stages) {
    mpar_stage_desc st[2];
    mpar_pipeline_desc pd;
    mpar_pipeline* p = NULL;
    int L = mpar_model_layer_count(m), s;
    if (stages > mpar_device_count(ctx)) stages = mpar_device_count(ctx);
    for (s = 0; s < stages; s++) {
        st[s].device = s;
        st[s].first_layer = L * s / stages;
        st[s].last_layer = L * (s + 1) / stages - 1;
    }
    memset(&pd, 0, sizeof pd);
    pd.stages = st, pd.stage_count = stages, pd.schedule = kind, pd.microbatches = M, pd.max_batch = BATCH;
    pd.optimizer.kind = MPAR_OPTIMIZER_SGD, pd.optimizer.lr = 0.1f;
    if (mpar_pipeline_create(ctx, m, &pd, &p) != MPAR_SUCCESS) fail_msg("create: %s", mpar_last_error(ctx));
    return p;
}

static mpar_batch full_batch(void) {
    mpar_batch b;
    b.inputs = g_x, b.targets = g_y, b.samples = BATCH;
    return b;
}

/* ---- 1. basics ---- */

/* basics-result-string: every mpar code has its own name. */
static void test_result_strings(void** state) {
    static const struct {
        mpar_result code;
        const char* name;
    } codes[] = {
#define GAPS_CODE(c) {c, #c}
        GAPS_CODE(MPAR_SUCCESS), GAPS_CODE(MPAR_ERROR_INVALID_ARGUMENT), GAPS_CODE(MPAR_ERROR_OUT_OF_HOST_MEMORY),
        GAPS_CODE(MPAR_ERROR_NO_DEVICE), GAPS_CODE(MPAR_ERROR_KERNEL_NOT_FOUND), GAPS_CODE(MPAR_ERROR_KERNEL_BUILD),
        GAPS_CODE(MPAR_ERROR_INVALID_MODEL), GAPS_CODE(MPAR_ERROR_INVALID_PLAN), GAPS_CODE(MPAR_ERROR_DOES_NOT_FIT),
        GAPS_CODE(MPAR_ERROR_INVALID_SCHEDULE), GAPS_CODE(MPAR_ERROR_IO), GAPS_CODE(MPAR_ERROR_CORRUPT),
        GAPS_CODE(MPAR_ERROR_MISMATCH), GAPS_CODE(MPAR_ERROR_NUMERICAL), GAPS_CODE(MPAR_ERROR_ABORTED),
        GAPS_CODE(MPAR_ERROR_INVALID_STATE), GAPS_CODE(MPAR_ERROR_INVALID_SELECTION), GAPS_CODE(MPAR_ERROR_TIMEOUT),
        GAPS_CODE(MPAR_ERROR_UNSUPPORTED),
#undef GAPS_CODE
        {(mpar_result)CL_OUT_OF_RESOURCES, "CL_OUT_OF_RESOURCES"},
        {(mpar_result)CL_INVALID_KERNEL_ARGS, "CL_INVALID_KERNEL_ARGS"},
    };
    size_t i;
    (void)state;
    for (i = 0; i < sizeof codes / sizeof codes[0]; i++) assert_string_equal(mpar_result_string(codes[i].code), codes[i].name);
}

/* basics-error-no-grow: a detail longer than the first buffer (512 bytes)
   is kept whole, as a build log must be. */
static void test_long_error_detail(void** state) {
    char name[901], out[64];
    (void)state;
    memset(name, 'k', sizeof name - 4);
    memcpy(name + sizeof name - 4, ".cl", 4);
    assert_int_equal(mpar_kernel_find(g_ctx, name, out, sizeof out), MPAR_ERROR_KERNEL_NOT_FOUND);
    assert_true(strlen(mpar_last_error(g_ctx)) > sizeof name);
    assert_non_null(strstr(mpar_last_error(g_ctx), name));
    assert_non_null(strstr(mpar_last_error(g_ctx), "MPAR_KERNEL_PATH")); /* the end of the message is there too */
}

/* ---- 3. the kernel binary cache ---- */

static mpar_context* cache_ctx(const char* cache, const char* options) {
    mpar_desc d;
    mpar_error err;
    mpar_context* ctx = NULL;
    memset(&d, 0, sizeof d);
    d.cache_dir = cache, d.build_options = options, d.error = &err;
    if (mpar_create(&d, &ctx) != MPAR_SUCCESS) fail_msg("mpar_create: %s", err.message);
    return ctx;
}

/* Builds loss.cl on a fresh context; returns its stats. */
static mpar_context_stats build_loss(const char* cache, const char* options) {
    mpar_context* ctx = cache_ctx(cache, options);
    mpar_context_stats st;
    cl_program prog;
    if (mpar_program_get(ctx, 0, "loss.cl", &prog) != MPAR_SUCCESS) fail_msg("build: %s", mpar_last_error(ctx));
    assert_int_equal(mpar_context_get_stats(ctx, &st), MPAR_SUCCESS);
    mpar_destroy(ctx);
    return st;
}

/* kern-cache-key-options: a binary built with other options is not reused. */
static void test_cache_key_has_options(void** state) {
    char cache[128];
    mpar_context_stats st;
    char* saved = getenv("MPAR_BUILD_OPTIONS") ? strdup(getenv("MPAR_BUILD_OPTIONS")) : NULL;
    (void)state;
    unsetenv("MPAR_BUILD_OPTIONS"); /* it would replace the descriptor's options */
    path_in(cache, sizeof cache, "cache_options");
    st = build_loss(cache, "");
    assert_int_equal(st.programs_built, 1);
    assert_int_equal(st.cache_written, 1);
    st = build_loss(cache, "-DMPAR_GAPS_OPTION=1");
    assert_int_equal(st.programs_from_cache, 0);
    assert_int_equal(st.programs_built, 1);
    st = build_loss(cache, ""); /* and the first one is still there */
    assert_int_equal(st.programs_from_cache, 1);
    assert_int_equal(st.programs_built, 0);
    if (saved) setenv("MPAR_BUILD_OPTIONS", saved, 1);
    free(saved);
}

/* kern-cache-trailing-bytes: a cache file longer than its binaries is not
   trusted; the program is built again. */
static void test_cache_trailing_bytes(void** state) {
    char cache[128], file[400] = "";
    mpar_context_stats st;
    DIR* d;
    struct dirent* e;
    FILE* f;
    char* saved = getenv("MPAR_BUILD_OPTIONS") ? strdup(getenv("MPAR_BUILD_OPTIONS")) : NULL;
    (void)state;
    unsetenv("MPAR_BUILD_OPTIONS");
    path_in(cache, sizeof cache, "cache_trailing");
    st = build_loss(cache, "");
    assert_int_equal(st.cache_written, 1);
    d = opendir(cache);
    assert_non_null(d);
    while ((e = readdir(d)) != NULL)
        if (strstr(e->d_name, ".bin")) snprintf(file, sizeof file, "%s/%s", cache, e->d_name);
    closedir(d);
    assert_true(file[0] != '\0');
    f = fopen(file, "ab");
    assert_non_null(f);
    assert_int_equal(fwrite("trailing", 1, 8, f), 8);
    fclose(f);
    st = build_loss(cache, "");
    assert_int_equal(st.cache_rejected, 1);
    assert_int_equal(st.programs_from_cache, 0);
    assert_int_equal(st.programs_built, 1);
    if (saved) setenv("MPAR_BUILD_OPTIONS", saved, 1);
    free(saved);
}

/* ---- 4. model and layers ---- */

/* A user layer that passes its input on (tests/stall_layer.h's copy
   layer) and records need_dx (desc.user). */
static mpar_result probe_backward(mpar_exec* ex, const mpar_layer* l, const mpar_io* io) {
    *(int*)l->desc.user = io->need_dx;
    return stall_backward(ex, l, io);
}
static const mpar_layer_type probe_type = {"probe", 0, stall_setup, NULL, stall_forward, probe_backward, NULL};

/* layer-need-dx-always: the model's first layer is told its input gradient
   is not needed; every other layer is told it is. */
static void test_need_dx_first_layer_only(void** state) {
    mpar_model* m = NULL;
    mpar_model_desc md;
    mpar_layer_desc ld;
    mpar_pipeline* p;
    mpar_batch b = full_batch();
    int first = -1, later = -1;
    (void)state;
    memset(&md, 0, sizeof md);
    md.input_features = IN, md.seed = 2;
    assert_int_equal(mpar_model_create(&md, &m, NULL), MPAR_SUCCESS);
    memset(&ld, 0, sizeof ld);
    ld.type = &probe_type, ld.user = &first;
    assert_int_equal(mpar_model_add(m, &ld, NULL), MPAR_SUCCESS);
    assert_int_equal(mpar_model_add_linear(m, HID, NULL), MPAR_SUCCESS);
    ld.user = &later;
    assert_int_equal(mpar_model_add(m, &ld, NULL), MPAR_SUCCESS);
    assert_int_equal(mpar_model_add_linear(m, CLASSES, NULL), MPAR_SUCCESS);
    assert_int_equal(mpar_model_add_simple(m, mpar_layer_cross_entropy(), NULL), MPAR_SUCCESS);
    p = make_pipeline(g_ctx, m, MPAR_SCHEDULE_1F1B, 2, 2);
    assert_int_equal(mpar_pipeline_train_step(p, &b, NULL), MPAR_SUCCESS);
    assert_int_equal(first, 0);
    assert_int_equal(later, 1);
    mpar_pipeline_destroy(p);
    mpar_model_destroy(m);
}

/* batch-token-range: token ids must lie in [0, vocab); vocab itself is out. */
static void test_token_range(void** state) {
    enum { T = 4, V = 5, S = 2 };
    mpar_model* m = NULL;
    mpar_model_desc md;
    mpar_layer_desc ld;
    mpar_pipeline_desc pd;
    mpar_pipeline* p = NULL;
    int32_t tok[S * T], y[S * T];
    mpar_batch b;
    int i;
    (void)state;
    memset(&md, 0, sizeof md);
    md.input_features = 1, md.seq_len = T, md.seed = 4;
    assert_int_equal(mpar_model_create(&md, &m, NULL), MPAR_SUCCESS);
    memset(&ld, 0, sizeof ld);
    ld.type = mpar_layer_embedding(), ld.units = 8, ld.vocab = V;
    assert_int_equal(mpar_model_add(m, &ld, NULL), MPAR_SUCCESS);
    assert_int_equal(mpar_model_add_linear(m, CLASSES, NULL), MPAR_SUCCESS);
    assert_int_equal(mpar_model_add_simple(m, mpar_layer_cross_entropy(), NULL), MPAR_SUCCESS);
    memset(&pd, 0, sizeof pd);
    pd.schedule = MPAR_SCHEDULE_GPIPE, pd.microbatches = 1, pd.max_batch = S;
    assert_int_equal(mpar_pipeline_create(g_ctx, m, &pd, &p), MPAR_SUCCESS);
    for (i = 0; i < S * T; i++) tok[i] = i % V, y[i] = i % CLASSES;
    b.inputs = tok, b.targets = y, b.samples = S;
    assert_int_equal(mpar_pipeline_train_step(p, &b, NULL), MPAR_SUCCESS);
    tok[3] = V;
    assert_int_equal(mpar_pipeline_train_step(p, &b, NULL), MPAR_ERROR_INVALID_ARGUMENT);
    assert_non_null(strstr(mpar_last_error(g_ctx), "outside the vocabulary"));
    tok[3] = -1;
    assert_int_equal(mpar_pipeline_train_step(p, &b, NULL), MPAR_ERROR_INVALID_ARGUMENT);
    mpar_pipeline_destroy(p);
    mpar_model_destroy(m);
}

/* ---- 5. planner ---- */

/* plan-parse-long-number: numbers in plan text have at most 9 digits. */
static void test_plan_number_length(void** state) {
    mpar_plan plan;
    mpar_error err;
    (void)state;
    assert_int_equal(mpar_plan_parse("0:0-123456789", 13, &plan, &err), MPAR_SUCCESS);
    assert_int_equal(plan.stages[0].last_layer, 123456789);
    mpar_plan_free(&plan);
    assert_int_equal(mpar_plan_parse("0:0-1234567890", 14, &plan, &err), MPAR_ERROR_INVALID_PLAN);
    assert_non_null(strstr(err.message, "too long"));
    assert_int_equal(mpar_plan_parse("9999999999:0", 12, &plan, &err), MPAR_ERROR_INVALID_PLAN);
}

/* ---- 7-8. links and the executor ---- */

/* link-tag-check: the first stage sends micro-batch 1 before 0 while the
   second expects 0 first. mpar_schedule_validate refuses such lists, so the
   test puts them in place of the pipeline's own (white box): the receiver
   must refuse the message rather than compute micro-batch 0 from 1's data. */
static void test_link_refuses_other_microbatch(void** state) {
    static const mpar_action s0[] = {{MPAR_ACTION_FORWARD, 1, 0}, {MPAR_ACTION_FORWARD, 0, 0},
                                     {MPAR_ACTION_BACKWARD, 0, 0}, {MPAR_ACTION_BACKWARD, 1, 0},
                                     {MPAR_ACTION_OPTIMIZER_STEP, -1, 0}};
    static const mpar_action s1[] = {{MPAR_ACTION_FORWARD, 0, 0}, {MPAR_ACTION_FORWARD, 1, 0},
                                     {MPAR_ACTION_BACKWARD, 0, 0}, {MPAR_ACTION_BACKWARD, 1, 0},
                                     {MPAR_ACTION_OPTIMIZER_STEP, -1, 0}};
    const mpar_action* lists[2] = {s0, s1};
    const int counts[2] = {5, 5};
    mpar_model* m = small_model();
    mpar_pipeline* p;
    mpar_schedule* swapped = NULL;
    mpar_batch b = full_batch();
    (void)state;
    if (mpar_device_count(g_ctx) < 2) skip();
    p = make_pipeline(g_ctx, m, MPAR_SCHEDULE_GPIPE, 2, 2);
    assert_int_equal(mpar_schedule_from_lists(2, 2, 1, lists, counts, &swapped, NULL), MPAR_SUCCESS);
    /* validation refuses it (links are queues); the executor's own check
       stands behind that, for lists that never went through it */
    assert_int_equal(mpar_schedule_validate(swapped, NULL), MPAR_ERROR_INVALID_SCHEDULE);
    mpar_schedule_destroy(p->schedule);
    p->schedule = swapped;
    assert_int_equal(mpar_pipeline_compute_gradients(p, &b, NULL), MPAR_ERROR_INVALID_SCHEDULE);
    assert_non_null(strstr(mpar_last_error(g_ctx), "link delivered micro-batch 1 where the schedule expects 0"));
    mpar_pipeline_destroy(p);
    mpar_model_destroy(m);
}

/* exec-step-count-after-failure: an optimizer step that fails is not
   counted, whether or not some stages had stepped. */
static void test_failed_step_not_counted(void** state) {
    mpar_model* m = small_model();
    mpar_pipeline* p = make_pipeline(g_ctx, m, MPAR_SCHEDULE_1F1B, 2, 2);
    mpar_batch b = full_batch();
    (void)state;
    assert_int_equal(mpar_pipeline_train_step(p, &b, NULL), MPAR_SUCCESS);
    assert_int_equal(mpar_pipeline_get_step(p), 1);
    assert_int_equal(mpar_pipeline_compute_gradients(p, &b, NULL), MPAR_SUCCESS);
    /* the first launch of stage 0 at step counter 2 is its optimizer step */
    assert_int_equal(mpar_set_fault(g_ctx, "enqueue:0:2"), MPAR_SUCCESS);
    assert_int_equal(mpar_pipeline_apply_gradients(p, NULL), (mpar_result)CL_OUT_OF_RESOURCES);
    assert_int_equal(mpar_pipeline_get_step(p), 1);
    assert_int_equal(mpar_set_fault(g_ctx, NULL), MPAR_SUCCESS);
    mpar_pipeline_destroy(p);
    /* the same inside train_step, where the step is an action of the job */
    p = make_pipeline(g_ctx, m, MPAR_SCHEDULE_1F1B, 2, 2);
    assert_int_equal(mpar_pipeline_train_step(p, &b, NULL), MPAR_SUCCESS);
    assert_int_equal(mpar_set_fault(g_ctx, "enqueue:0:2"), MPAR_SUCCESS);
    assert_int_equal(mpar_pipeline_train_step(p, &b, NULL), (mpar_result)CL_OUT_OF_RESOURCES);
    assert_int_equal(mpar_pipeline_get_step(p), 1);
    assert_int_equal(mpar_set_fault(g_ctx, NULL), MPAR_SUCCESS);
    mpar_pipeline_destroy(p);
    mpar_model_destroy(m);
}

/* ckpt-load-keeps-grads: gradients computed before a load belong to the
   state it replaced; applying them afterwards is refused. */
static void test_load_drops_gradients(void** state) {
    mpar_model* m = small_model();
    mpar_pipeline* p = make_pipeline(g_ctx, m, MPAR_SCHEDULE_GPIPE, 2, 2);
    mpar_batch b = full_batch();
    char path[128];
    (void)state;
    path_in(path, sizeof path, "grads.ckpt");
    assert_int_equal(mpar_pipeline_train_step(p, &b, NULL), MPAR_SUCCESS);
    assert_int_equal(mpar_pipeline_save_checkpoint(p, path, NULL), MPAR_SUCCESS);
    assert_int_equal(mpar_pipeline_compute_gradients(p, &b, NULL), MPAR_SUCCESS);
    assert_int_equal(mpar_pipeline_load_checkpoint(p, path, NULL), MPAR_SUCCESS);
    assert_int_equal(mpar_pipeline_apply_gradients(p, NULL), MPAR_ERROR_INVALID_STATE);
    assert_int_equal(mpar_pipeline_train_step(p, &b, NULL), MPAR_SUCCESS);
    remove(path);
    mpar_pipeline_destroy(p);
    mpar_model_destroy(m);
}

/* exec-infer-last-microbatch: inference of a batch whose last micro-batch
   is short gives every row what inferring it alone gives. */
static void test_infer_short_last_microbatch(void** state) {
    enum { N = BATCH / 2 + 1 }; /* max_batch 8 in 2 micro-batches: 4 rows each, then 1 more */
    mpar_model* m = small_model();
    mpar_pipeline* p = make_pipeline(g_ctx, m, MPAR_SCHEDULE_GPIPE, 2, 2);
    float all[N * CLASSES], one[CLASSES];
    mpar_batch b;
    int i, c;
    (void)state;
    b.inputs = g_x, b.targets = NULL, b.samples = N;
    assert_int_equal(mpar_pipeline_infer(p, &b, all, NULL), MPAR_SUCCESS);
    for (i = 0; i < N; i++) {
        b.inputs = g_x + i * IN, b.samples = 1;
        assert_int_equal(mpar_pipeline_infer(p, &b, one, NULL), MPAR_SUCCESS);
        for (c = 0; c < CLASSES; c++) assert_true(fabsf(all[i * CLASSES + c] - one[c]) <= 1e-5f * (1.0f + fabsf(one[c])));
    }
    mpar_pipeline_destroy(p);
    mpar_model_destroy(m);
}

/* ---- the host route: host code after OpenCL commands of a user layer ---- */

/* PoCL's CPU devices run a command as soon as it is enqueued and ready, so
   host code that forgot to wait for the queue would still find the result
   (and a command gated on a user event deadlocks PoCL 3.1 when the event is
   set from another thread). So on the host route the user layer below does
   not enqueue its kernel at once: it leaves it pending, and this file's
   clFinish (which mpar's own calls reach, the executable's definition
   coming first) enqueues it before waiting, as a device that finishes late
   would. Code that reads the layer's output without waiting for the queue
   reads stale memory. Nothing else in the file is affected: with nothing
   pending, clFinish is the OpenCL library's. */
static pthread_mutex_t g_defer_lock = PTHREAD_MUTEX_INITIALIZER;
static struct {
    cl_command_queue queue;
    cl_kernel kernel;
    size_t global;
} g_deferred; /* kernel NULL: nothing pending */

static cl_int real_finish(cl_command_queue q) {
    static cl_int (*fn)(cl_command_queue);
    if (!fn) {
        void* sym = dlsym(RTLD_NEXT, "clFinish");
        if (!sym) return CL_INVALID_OPERATION;
        memcpy(&fn, &sym, sizeof fn); /* ISO C has no cast between the two */
    }
    return fn(q);
}

static cl_int run_deferred(cl_command_queue q) {
    cl_int st = CL_SUCCESS;
    pthread_mutex_lock(&g_defer_lock);
    if (g_deferred.kernel && (!q || g_deferred.queue == q)) {
        st = clEnqueueNDRangeKernel(g_deferred.queue, g_deferred.kernel, 1, NULL, &g_deferred.global, NULL, 0, NULL,
                                    NULL);
        clReleaseKernel(g_deferred.kernel);
        g_deferred.kernel = NULL;
    }
    pthread_mutex_unlock(&g_defer_lock);
    return st;
}

cl_int clFinish(cl_command_queue q) {
    cl_int st = run_deferred(q);
    return st != CL_SUCCESS ? st : real_finish(q);
}

/* y = 2x through the user's own kernel on the stage's queue; deferred on
   the host route (white box: the stage's device and route are read from
   ex). */
static mpar_result twice_forward(mpar_exec* ex, const mpar_layer* l, const mpar_io* io) {
    int n = io->rows * l->in_features, xo = (int)io->x.off, yo = (int)io->y.off;
    size_t g = (size_t)n;
    cl_command_queue q = mpar_exec_queue(ex); /* tells mpar that OpenCL work is pending */
    cl_kernel k = NULL;
    cl_int st;
    mpar_result r = mpar_kernel_create(mpar_exec_context(ex), ex->device, "gaps_twice.cl", "gaps_twice", &k);
    if (r != MPAR_SUCCESS) return r;
    st = clSetKernelArg(k, 0, sizeof(cl_mem), &io->x.mem);
    st |= clSetKernelArg(k, 1, sizeof xo, &xo);
    st |= clSetKernelArg(k, 2, sizeof(cl_mem), &io->y.mem);
    st |= clSetKernelArg(k, 3, sizeof yo, &yo);
    st |= clSetKernelArg(k, 4, sizeof n, &n);
    if (st == CL_SUCCESS && ex->host_route) {
        run_deferred(NULL); /* at most one pending */
        pthread_mutex_lock(&g_defer_lock);
        g_deferred.queue = q, g_deferred.kernel = k, g_deferred.global = g;
        pthread_mutex_unlock(&g_defer_lock);
        return MPAR_SUCCESS;
    }
    if (st == CL_SUCCESS) st = clEnqueueNDRangeKernel(q, k, 1, NULL, &g, NULL, 0, NULL, NULL);
    clReleaseKernel(k);
    return st == CL_SUCCESS ? MPAR_SUCCESS : mpar_exec_fail(ex, (mpar_result)st, "twice: launch failed");
}
static mpar_result twice_backward(mpar_exec* ex, const mpar_layer* l, const mpar_io* io) {
    int n = io->rows * l->in_features;
    if (!io->need_dx) return MPAR_SUCCESS;
    return mpar_exec_launch(ex, "gaps_twice.cl", "gaps_twice", (size_t)n, 0, "bbi", io->dy, io->dx, n);
}
static const mpar_layer_type twice_type = {"twice", 0, stall_setup, NULL, twice_forward, twice_backward, NULL};

/* One stage on device 0; the user kernel comes from g_dir. kinds: 'L'
   linear (width), 'T' twice, 'R' relu, 'X' cross-entropy. */
static mpar_pipeline* user_pipeline(mpar_context** ctx, mpar_model** m, const char* kinds, const int* widths) {
    mpar_desc d;
    mpar_model_desc md;
    mpar_layer_desc ld;
    mpar_stage_desc st;
    mpar_pipeline_desc pd;
    mpar_pipeline* p = NULL;
    mpar_error err;
    int i;
    memset(&d, 0, sizeof d);
    d.kernel_path = g_dir, d.error = &err;
    if (mpar_create(&d, ctx) != MPAR_SUCCESS) fail_msg("mpar_create: %s", err.message);
    memset(&md, 0, sizeof md);
    md.input_features = IN, md.seed = 6;
    assert_int_equal(mpar_model_create(&md, m, NULL), MPAR_SUCCESS);
    for (i = 0; kinds[i]; i++) {
        memset(&ld, 0, sizeof ld);
        ld.type = kinds[i] == 'L' ? mpar_layer_linear() : kinds[i] == 'R' ? mpar_layer_relu()
                : kinds[i] == 'X' ? mpar_layer_cross_entropy() : &twice_type;
        ld.units = kinds[i] == 'L' ? widths[i] : 0;
        assert_int_equal(mpar_model_add(*m, &ld, NULL), MPAR_SUCCESS);
    }
    st.device = 0, st.first_layer = 0, st.last_layer = i - 1;
    memset(&pd, 0, sizeof pd);
    pd.stages = &st, pd.stage_count = 1, pd.schedule = MPAR_SCHEDULE_GPIPE, pd.microbatches = 1;
    pd.max_batch = BATCH;
    if (mpar_pipeline_create(*ctx, *m, &pd, &p) != MPAR_SUCCESS) fail_msg("create: %s", mpar_last_error(*ctx));
    return p;
}

/* out[r] = in[r]·W + b for the linear layer `layer` of p, in double. */
static void linear_ref(mpar_pipeline* p, int layer, const double* in, int rows, int n_in, int n_out, double* out) {
    float* w = (float*)malloc(sizeof(float) * (size_t)(n_in * n_out + n_out));
    int r, i, o;
    assert_non_null(w);
    assert_int_equal(mpar_pipeline_get_params(p, layer, w), MPAR_SUCCESS);
    for (r = 0; r < rows; r++)
        for (o = 0; o < n_out; o++) {
            double s = w[n_in * n_out + o];
            for (i = 0; i < n_in; i++) s += in[r * n_in + i] * w[i * n_out + o];
            out[r * n_out + o] = s;
        }
    free(w);
}

static void check_close(const float* got, const double* want, int n) {
    int i;
    for (i = 0; i < n; i++)
        if (!(fabs((double)got[i] - want[i]) <= 1e-4 * (1.0 + fabs(want[i]))))
            fail_msg("output %d is %.9g, expected %.9g", i, (double)got[i], want[i]);
}

/* host-launch-no-sync: relu (host code on the host route) reads what the
   user layer's OpenCL kernel writes: it must wait for that kernel. */
static void test_host_launch_waits_for_opencl(void** state) {
    static const int widths[] = {0, 0, CLASSES, 0};
    mpar_context* ctx = NULL;
    mpar_model* m = NULL;
    mpar_pipeline* p = user_pipeline(&ctx, &m, "TRLX", widths);
    double h[BATCH * IN], want[BATCH * CLASSES];
    float out[BATCH * CLASSES];
    mpar_batch b;
    int i;
    (void)state;
    b.inputs = g_x, b.targets = NULL, b.samples = BATCH;
    assert_int_equal(mpar_pipeline_infer(p, &b, out, NULL), MPAR_SUCCESS);
    assert_int_equal(run_deferred(NULL), CL_SUCCESS); /* none left when the code is right */
    for (i = 0; i < BATCH * IN; i++) h[i] = g_x[i] > 0.0f ? 2.0 * g_x[i] : 0.0;
    linear_ref(p, 2, h, BATCH, IN, CLASSES, want);
    check_close(out, want, BATCH * CLASSES);
    mpar_pipeline_destroy(p);
    mpar_model_destroy(m);
    mpar_destroy(ctx);
}

/* host-transfer-no-sync: the outputs are read back (memcpy on the host
   route) right after the user layer's OpenCL kernel that writes them: the
   read must wait for it. */
static void test_host_transfer_waits_for_opencl(void** state) {
    static const int widths[] = {HID, 0, 0};
    mpar_context* ctx = NULL;
    mpar_model* m = NULL;
    mpar_pipeline* p = user_pipeline(&ctx, &m, "LTX", widths);
    double x[BATCH * IN], want[BATCH * HID];
    float out[BATCH * HID];
    mpar_batch b;
    int i;
    (void)state;
    b.inputs = g_x, b.targets = NULL, b.samples = BATCH;
    assert_int_equal(mpar_pipeline_infer(p, &b, out, NULL), MPAR_SUCCESS);
    assert_int_equal(run_deferred(NULL), CL_SUCCESS); /* none left when the code is right */
    for (i = 0; i < BATCH * IN; i++) x[i] = g_x[i];
    linear_ref(p, 0, x, BATCH, IN, HID, want);
    for (i = 0; i < BATCH * HID; i++) want[i] *= 2.0;
    check_close(out, want, BATCH * HID);
    mpar_pipeline_destroy(p);
    mpar_model_destroy(m);
    mpar_destroy(ctx);
}

/* host-embedding-untouched-rows, cl-embedding-untouched-rows: the
   token-table gradient leaves the rows of tokens that do not occur bit for
   bit as they were (here -0.0, which adding 0.0 would turn into +0.0), in
   the kernel and in its host copy alike. */
static void test_embedding_grad_untouched_rows(void** state) {
    enum { V = 4, C = 3, ROWS = 5 };
    static const int32_t tokens[ROWS] = {0, 2, 2, 0, 2}; /* tokens 1 and 3 unused */
    float dout[ROWS * C], host[V * C], dev[V * C];
    mpar__harg a[6];
    mpar__host_fn fn = mpar__host_kernel("embedding.cl", "mpar_embedding_bwd_wte");
    cl_context cc = NULL;
    cl_command_queue q = NULL;
    cl_kernel k = NULL;
    cl_mem mt, md, mw;
    cl_int st = CL_SUCCESS;
    int i, rows = ROWS, c = C, v = V;
    cl_ulong zero = 0; /* the buffers' offsets */
    size_t g = V * C;
    (void)state;
    for (i = 0; i < ROWS * C; i++) dout[i] = (float)(i % 7) - 3.0f;
    for (i = 0; i < V * C; i++) host[i] = dev[i] = -0.0f;
    /* the host copy */
    assert_non_null(fn);
    a[0].p = (void*)(uintptr_t)tokens, a[1].p = dout, a[2].p = host, a[3].i = ROWS, a[4].i = C, a[5].i = V;
    fn(a, g, 0);
    /* the kernel */
    assert_int_equal(mpar_device_get_cl(g_ctx, 0, NULL, &cc, &q), MPAR_SUCCESS);
    assert_int_equal(mpar_kernel_create(g_ctx, 0, "embedding.cl", "mpar_embedding_bwd_wte", &k), MPAR_SUCCESS);
    mt = clCreateBuffer(cc, CL_MEM_READ_ONLY | CL_MEM_COPY_HOST_PTR, sizeof tokens, (void*)(uintptr_t)tokens, &st);
    assert_int_equal(st, CL_SUCCESS);
    md = clCreateBuffer(cc, CL_MEM_READ_ONLY | CL_MEM_COPY_HOST_PTR, sizeof dout, dout, &st);
    assert_int_equal(st, CL_SUCCESS);
    mw = clCreateBuffer(cc, CL_MEM_READ_WRITE | CL_MEM_COPY_HOST_PTR, sizeof dev, dev, &st);
    assert_int_equal(st, CL_SUCCESS);
    st |= clSetKernelArg(k, 0, sizeof mt, &mt), st |= clSetKernelArg(k, 1, sizeof zero, &zero);
    st |= clSetKernelArg(k, 2, sizeof md, &md), st |= clSetKernelArg(k, 3, sizeof zero, &zero);
    st |= clSetKernelArg(k, 4, sizeof mw, &mw), st |= clSetKernelArg(k, 5, sizeof zero, &zero);
    st |= clSetKernelArg(k, 6, sizeof rows, &rows), st |= clSetKernelArg(k, 7, sizeof c, &c);
    st |= clSetKernelArg(k, 8, sizeof v, &v);
    assert_int_equal(st, CL_SUCCESS);
    assert_int_equal(clEnqueueNDRangeKernel(q, k, 1, NULL, &g, NULL, 0, NULL, NULL), CL_SUCCESS);
    assert_int_equal(clEnqueueReadBuffer(q, mw, CL_TRUE, 0, sizeof dev, dev, 0, NULL, NULL), CL_SUCCESS);
    clReleaseMemObject(mt), clReleaseMemObject(md), clReleaseMemObject(mw), clReleaseKernel(k);
    for (i = 0; i < V * C; i++) {
        int row = i / C, used = row == 0 || row == 2;
        if (used) continue;
        if (!(host[i] == 0.0f && signbit(host[i]))) fail_msg("host: dwte[%d] of unused token %d is %g, not -0", i, row, (double)host[i]);
        if (!(dev[i] == 0.0f && signbit(dev[i]))) fail_msg("kernel: dwte[%d] of unused token %d is %g, not -0", i, row, (double)dev[i]);
    }
    assert_memory_equal(host, dev, sizeof host); /* and the used rows agree */
}

/* ---- 9. timeline ---- */

/* tl-trace-no-cut: in the Chrome trace a slice ends where the next slice
   of its track starts (device times mapped onto the host clock may overlap
   by microseconds). */
static void test_trace_cuts_overlap(void** state) {
    mpar_event ev[2];
    mpar_timeline t;
    char path[128], text[8192], *f0, *dur;
    FILE* f;
    size_t n;
    (void)state;
    memset(&t, 0, sizeof t);
    memset(ev, 0, sizeof ev);
    ev[0].kind = ev[1].kind = MPAR_EVENT_FORWARD;
    ev[0].boundary = ev[1].boundary = -1;
    ev[0].microbatch = 0, ev[0].start = 0.0, ev[0].end = 0.002;
    ev[1].microbatch = 1, ev[1].start = 0.001, ev[1].end = 0.003;
    t.stages = 1, t.virtual_stages = 1, t.microbatches = 2, t.schedule = MPAR_SCHEDULE_GPIPE;
    t.step_time = 0.003, t.event_count = 2, t.events = ev;
    path_in(path, sizeof path, "trace.json");
    f = fopen(path, "w");
    assert_non_null(f);
    assert_int_equal(mpar_timeline_write_chrome_trace(&t, f), MPAR_SUCCESS);
    fclose(f);
    f = fopen(path, "r");
    assert_non_null(f);
    n = fread(text, 1, sizeof text - 1, f);
    fclose(f);
    remove(path);
    text[n] = '\0';
    f0 = strstr(text, "\"name\":\"F0\"");
    assert_non_null(f0);
    dur = strstr(f0, "\"dur\":");
    assert_non_null(dur);
    assert_true(fabs(atof(dur + 6) - 1000.0) < 1e-3); /* us: cut at F1's start */
    dur = strstr(strstr(text, "\"name\":\"F1\""), "\"dur\":");
    assert_true(fabs(atof(dur + 6) - 2000.0) < 1e-3);
}

/* ---- 10. checkpoints ---- */

/* A valid checkpoint of the small model, read into memory. */
static unsigned char* saved_checkpoint(size_t* size) {
    mpar_model* m = small_model();
    mpar_pipeline* p = make_pipeline(g_ctx, m, MPAR_SCHEDULE_GPIPE, 2, 1);
    mpar_batch b = full_batch();
    char path[128];
    unsigned char* d;
    FILE* f;
    long n;
    path_in(path, sizeof path, "edit.ckpt");
    assert_int_equal(mpar_pipeline_train_step(p, &b, NULL), MPAR_SUCCESS);
    assert_int_equal(mpar_pipeline_save_checkpoint(p, path, NULL), MPAR_SUCCESS);
    mpar_pipeline_destroy(p);
    mpar_model_destroy(m);
    f = fopen(path, "rb");
    assert_non_null(f);
    fseek(f, 0, SEEK_END);
    n = ftell(f);
    fseek(f, 0, SEEK_SET);
    d = (unsigned char*)malloc((size_t)n);
    assert_non_null(d);
    assert_int_equal(fread(d, 1, (size_t)n, f), (size_t)n);
    fclose(f);
    remove(path);
    *size = (size_t)n;
    return d;
}

/* After an edit of the header or layer table: both checksums that cover it
   made right again, so that only the edited field can be refused. */
static void reseal(unsigned char* d, size_t size, size_t table_end) {
    mpar__ckpt_wr64(d + table_end, mpar__ckpt_checksum(d, table_end));
    mpar__ckpt_wr64(d + size - 8, mpar__ckpt_checksum(d, size - 8));
}

static size_t table_end_of(const unsigned char* d, size_t size) {
    mpar_checkpoint_info info;
    size_t end;
    assert_int_equal(mpar_checkpoint_parse(d, size, &info, NULL), MPAR_SUCCESS);
    end = info.layers[0].params_offset - 8; /* the table checksum comes right before the first data */
    mpar_checkpoint_info_free(&info);
    return end;
}

/* ckpt-version: a checkpoint of another format version (older too) is
   refused as unsupported, not read with this version's layout. */
static void test_checkpoint_old_version(void** state) {
    size_t size, end;
    unsigned char* d = saved_checkpoint(&size);
    mpar_checkpoint_info info;
    mpar_error err;
    (void)state;
    end = table_end_of(d, size);
    mpar__ckpt_wr32(d + 8, MPAR_CHECKPOINT_FORMAT_VERSION - 1);
    reseal(d, size, end);
    assert_int_equal(mpar_checkpoint_parse(d, size, &info, &err), MPAR_ERROR_UNSUPPORTED);
    assert_non_null(strstr(err.message, "format version"));
    free(d);
}

/* ckpt-layer-chain: layer 1 must take what layer 0 gives. */
static void test_checkpoint_unchained_layers(void** state) {
    size_t size, end, rec1;
    unsigned char* d = saved_checkpoint(&size);
    mpar_checkpoint_info info;
    mpar_error err;
    (void)state;
    end = table_end_of(d, size);
    rec1 = MPAR__CKPT_HEADER + mpar__ckpt_rd32(d + MPAR__CKPT_HEADER); /* layer 1's record */
    assert_int_equal(mpar__ckpt_rd32(d + rec1 + 8), HID);
    mpar__ckpt_wr32(d + rec1 + 8, HID + 1);
    reseal(d, size, end);
    assert_int_equal(mpar_checkpoint_parse(d, size, &info, &err), MPAR_ERROR_CORRUPT);
    assert_non_null(strstr(err.message, "layer 1: in_features"));
    free(d);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_result_strings),
        cmocka_unit_test(test_long_error_detail),
        cmocka_unit_test(test_cache_key_has_options),
        cmocka_unit_test(test_cache_trailing_bytes),
        cmocka_unit_test(test_need_dx_first_layer_only),
        cmocka_unit_test(test_token_range),
        cmocka_unit_test(test_plan_number_length),
        cmocka_unit_test(test_link_refuses_other_microbatch),
        cmocka_unit_test(test_failed_step_not_counted),
        cmocka_unit_test(test_load_drops_gradients),
        cmocka_unit_test(test_infer_short_last_microbatch),
        cmocka_unit_test(test_host_launch_waits_for_opencl),
        cmocka_unit_test(test_host_transfer_waits_for_opencl),
        cmocka_unit_test(test_embedding_grad_untouched_rows),
        cmocka_unit_test(test_trace_cuts_overlap),
        cmocka_unit_test(test_checkpoint_old_version),
        cmocka_unit_test(test_checkpoint_unchained_layers),
    };
    return cmocka_run_group_tests_name("gaps", tests, setup, teardown);
}
