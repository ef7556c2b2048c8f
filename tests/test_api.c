/* Bad input at every public function: NULL pointers, zero and negative
   sizes, indices that do not exist, batches too large, calls out of order.
   Each must return its documented mpar_result and leave a message (in the
   mpar_error given, or in mpar_last_error for the context), and nothing may
   crash. Calls after a destroy are not tested: C cannot detect a freed
   pointer, so they stay undefined. Cases that could crash the process run
   in a child (expect_child) so that one failure does not hide the others.
     make tests/test_api && MPAR_CACHE_DIR=$PWD/build/cache tests/test_api */
#define MPAR_IMPLEMENTATION
#include "mpar.h"

#include <limits.h>
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <signal.h>
#include <sys/wait.h>
#include <cmocka.h>

const char* __lsan_default_suppressions(void);
const char* __lsan_default_suppressions(void) { return "leak:libpocl.so\nleak:libLLVM\n"; }

/* ---- checking helpers ---- */

/* Leaves a known message on the context, so that a call can be seen to
   record its own detail (not merely leave an older one in place). */
static void mark(mpar_context* ctx) {
    mpar_device_info info;
    assert_int_equal(mpar_device_get_info(ctx, -777, &info), MPAR_ERROR_INVALID_ARGUMENT);
    assert_non_null(strstr(mpar_last_error(ctx), "-777"));
}
static int fresh_detail(const mpar_context* ctx) {
    const char* e = mpar_last_error(ctx);
    return e && e[0] && !strstr(e, "device -777 does not exist");
}

/* `call` fails with `want` and records its own detail on ctx. */
#define CTX_FAILS(ctx, want, call)                                                                               \
    do {                                                                                                         \
        mpar_result r_;                                                                                          \
        mark(ctx);                                                                                               \
        r_ = (call);                                                                                             \
        if (r_ != (want))                                                                                        \
            fail_msg("%s:%d: %s gave %s, expected %s (detail: %s)", __FILE__, __LINE__, #call,                   \
                     mpar_result_string(r_), mpar_result_string(want), mpar_last_error(ctx));                    \
        if (!fresh_detail(ctx))                                                                                  \
            fail_msg("%s:%d: %s recorded no detail (mpar_last_error: '%s')", __FILE__, __LINE__, #call,          \
                     mpar_last_error(ctx));                                                                      \
    } while (0)

/* `call` (which takes &e) fails with `want` and fills e with a message. */
#define ERR_FAILS(want, call)                                                                                    \
    do {                                                                                                         \
        mpar_result r_;                                                                                          \
        memset(&e, 0x5a, sizeof e);                                                                              \
        r_ = (call);                                                                                             \
        if (r_ != (want))                                                                                        \
            fail_msg("%s:%d: %s gave %s, expected %s", __FILE__, __LINE__, #call, mpar_result_string(r_),        \
                     mpar_result_string(want));                                                                  \
        if (e.code != (want) || !memchr(e.message, '\0', sizeof e.message) || !e.message[0])                     \
            fail_msg("%s:%d: %s left no message in its mpar_error", __FILE__, __LINE__, #call);                  \
    } while (0)

/* `call` gives `want` where no context or mpar_error can take a message. */
#define FAILS(want, call)                                                                                        \
    do {                                                                                                         \
        mpar_result r_ = (call);                                                                                 \
        if (r_ != (want))                                                                                        \
            fail_msg("%s:%d: %s gave %s, expected %s", __FILE__, __LINE__, #call, mpar_result_string(r_),        \
                     mpar_result_string(want));                                                                  \
    } while (0)

/* Runs fn in a child process, so that a crash or a sanitizer abort fails
   one check instead of ending the whole run. fn returns 0 when its checks
   pass. Returns 1 if they did; else appends what happened to `report`. */
static int run_child(const char* what, int (*fn)(void), char* report, size_t size) {
    pid_t pid;
    int status = 0;
    size_t used = strlen(report);
    fflush(NULL);
    pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) { /* cmocka's handlers would carry on with the next test in the child */
        signal(SIGSEGV, SIG_DFL), signal(SIGBUS, SIG_DFL), signal(SIGILL, SIG_DFL), signal(SIGFPE, SIG_DFL);
        signal(SIGABRT, SIG_DFL);
        alarm(60);
        _exit(fn());
    }
    assert_int_equal(waitpid(pid, &status, 0), pid);
    if (WIFSIGNALED(status))
        snprintf(report + used, size - used, "\n  %s: crashed with signal %d", what, WTERMSIG(status));
    else if (WEXITSTATUS(status) != 0)
        snprintf(report + used, size - used, "\n  %s: failed (exit status %d; see the output above)", what,
                 WEXITSTATUS(status));
    else
        return 1;
    return 0;
}
static void expect_child(const char* what, int (*fn)(void)) {
    char report[512] = "";
    if (!run_child(what, fn, report, sizeof report)) fail_msg("%s", report + 3);
}

/* ---- shared objects: one context, a small model and pipelines on it ---- */

static mpar_context* g_ctx;
static mpar_model* g_model;   /* 4 -> linear 8 -> relu -> linear 3 -> cross-entropy */
static mpar_pipeline* g_pipe; /* 2 stages, 1F1B, 2 micro-batches, max_batch 8 */
static char g_dir[64];        /* a fresh temporary folder */

static const float g_x[8 * 4] = {0.1f, 0.2f, 0.3f, 0.4f, 1, 2, 3, 4, -1, 0, 1, 0, 2, 2, 2, 2,
                                 0.5f, 0.5f, 0, 0, 3, 1, 4, 1, 5, 9, 2, 6, -3, -1, 0, 1};
static const int32_t g_y[8] = {0, 1, 2, 0, 1, 2, 0, 1};

static mpar_model* make_model(int input, int hidden, int classes) {
    mpar_model* m = NULL;
    mpar_model_desc md;
    memset(&md, 0, sizeof md);
    md.input_features = input;
    md.seed = 7;
    assert_int_equal(mpar_model_create(&md, &m, NULL), MPAR_SUCCESS);
    assert_int_equal(mpar_model_add_linear(m, hidden, NULL), MPAR_SUCCESS);
    assert_int_equal(mpar_model_add_simple(m, mpar_layer_relu(), NULL), MPAR_SUCCESS);
    assert_int_equal(mpar_model_add_linear(m, classes, NULL), MPAR_SUCCESS);
    assert_int_equal(mpar_model_add_simple(m, mpar_layer_cross_entropy(), NULL), MPAR_SUCCESS);
    return m;
}

static mpar_pipeline_desc two_stage_desc(mpar_stage_desc* st, int profile) {
    mpar_pipeline_desc pd;
    st[0].device = 0, st[0].first_layer = 0, st[0].last_layer = 1;
    st[1].device = 1, st[1].first_layer = 2, st[1].last_layer = 3;
    memset(&pd, 0, sizeof pd);
    pd.stages = st;
    pd.stage_count = 2;
    pd.schedule = MPAR_SCHEDULE_1F1B;
    pd.microbatches = 2;
    pd.max_batch = 8;
    pd.profile = profile;
    return pd;
}

static int group_setup(void** state) {
    mpar_desc d;
    mpar_error err;
    mpar_stage_desc st[2];
    mpar_pipeline_desc pd = two_stage_desc(st, 0);
    (void)state;
    unsetenv("MPAR_DEVICES");
    unsetenv("MPAR_FAULT");
    memset(&d, 0, sizeof d);
    d.error = &err;
    d.kernel_path = "kernels"; /* run from the top folder, wherever the binary is */
    if (mpar_create(&d, &g_ctx) != MPAR_SUCCESS) {
        fprintf(stderr, "mpar_create: %s\n", err.message);
        return -1;
    }
    if (mpar_device_count(g_ctx) < 2) {
        fprintf(stderr, "test_api needs two devices\n");
        return -1;
    }
    g_model = make_model(4, 8, 3);
    if (mpar_pipeline_create(g_ctx, g_model, &pd, &g_pipe) != MPAR_SUCCESS) {
        fprintf(stderr, "mpar_pipeline_create: %s\n", mpar_last_error(g_ctx));
        return -1;
    }
    snprintf(g_dir, sizeof g_dir, "/tmp/mpar_test_api_XXXXXX");
    if (!mkdtemp(g_dir)) return -1;
    return 0;
}

static int group_teardown(void** state) {
    char cmd[128];
    (void)state;
    mpar_pipeline_destroy(g_pipe);
    mpar_model_destroy(g_model);
    mpar_destroy(g_ctx);
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", g_dir);
    if (g_dir[0] && system(cmd) != 0) return -1;
    return 0;
}

/* ==== 1. basics ==== */

static void test_basics(void** state) {
    mpar_error e;
    (void)state;
    assert_string_equal(mpar_result_string((mpar_result)-4099), "unknown mpar_result");
    assert_string_equal(mpar_result_string((mpar_result)INT_MIN), "unknown mpar_result");
    assert_int_equal(mpar_error_set(NULL, MPAR_ERROR_IO, "x %d", 1), MPAR_ERROR_IO);
    ERR_FAILS(MPAR_ERROR_IO, mpar_error_set(&e, MPAR_ERROR_IO, "%s", "disk"));
    assert_string_equal(e.message, "disk");
    assert_string_equal(mpar_device_type_name((mpar_device_type)99), "other");
    assert_string_equal(mpar_device_type_name((mpar_device_type)-1), "other");
    assert_string_equal(mpar_schedule_kind_name((mpar_schedule_kind)99), "unknown");
    assert_string_equal(mpar_plan_binding_name((mpar_plan_binding_kind)-3), "?");
    {
        const mpar_layer_type* types[9];
        int i;
        types[0] = mpar_layer_linear(), types[1] = mpar_layer_relu(), types[2] = mpar_layer_gelu();
        types[3] = mpar_layer_tanh(), types[4] = mpar_layer_dropout(), types[5] = mpar_layer_layernorm();
        types[6] = mpar_layer_embedding(), types[7] = mpar_layer_decoder_block(), types[8] = mpar_layer_cross_entropy();
        for (i = 0; i < 9; i++) assert_true(types[i] && types[i]->name && types[i]->setup && types[i]->forward);
    }
}

/* ==== 2. devices and contexts ==== */

static void* one_alloc(void* user, size_t size) {
    (void)user;
    return malloc(size);
}

static void test_create_bad_input(void** state) {
    mpar_desc d;
    mpar_error e;
    mpar_context* ctx = (mpar_context*)&d; /* must become NULL on failure */
    static const char* invalid[] = {",", "0,,1", " , 0", "3-1", "0-1,,", NULL};
    static const char* none[] = {"99", "0-99", "p99", "name:", "no such device at all", "accel", "GPU-only-please",
                                 "-1", NULL};
    char longterm[400];
    int i;
    (void)state;
    FAILS(MPAR_ERROR_INVALID_ARGUMENT, mpar_create(NULL, &ctx));
    memset(&d, 0, sizeof d);
    d.error = &e;
    ERR_FAILS(MPAR_ERROR_INVALID_ARGUMENT, mpar_create(&d, NULL));
    d.allocator.alloc = one_alloc; /* one of three: refused before any is called */
    ERR_FAILS(MPAR_ERROR_INVALID_ARGUMENT, mpar_create(&d, &ctx));
    assert_null(ctx);
    d.allocator.alloc = NULL;
    for (i = 0; invalid[i]; i++) {
        d.devices = invalid[i];
        ctx = (mpar_context*)&d;
        ERR_FAILS(MPAR_ERROR_INVALID_SELECTION, mpar_create(&d, &ctx));
        assert_null(ctx);
    }
    for (i = 0; none[i]; i++) {
        d.devices = none[i];
        ctx = (mpar_context*)&d;
        ERR_FAILS(MPAR_ERROR_NO_DEVICE, mpar_create(&d, &ctx));
        assert_null(ctx);
    }
    memset(longterm, 'x', sizeof longterm - 1);
    longterm[sizeof longterm - 1] = '\0';
    d.devices = longterm;
    ERR_FAILS(MPAR_ERROR_INVALID_SELECTION, mpar_create(&d, &ctx));
    /* no error struct at all: still the code, no crash */
    d.error = NULL;
    d.devices = "nothing-matches-this";
    FAILS(MPAR_ERROR_NO_DEVICE, mpar_create(&d, &ctx));
    mpar_destroy(NULL);
    assert_non_null(mpar_last_error(NULL));
    assert_true(mpar_last_error(NULL)[0] != '\0');
    assert_int_equal(mpar_device_count(NULL), 0);
}

/* MPAR_DEVICES set to garbage before mpar_create. */
static void test_env_devices_garbage(void** state) {
    static const struct {
        const char* value;
        mpar_result want;
    } cases[] = {{"garbage!!", MPAR_ERROR_NO_DEVICE}, {",,,", MPAR_ERROR_INVALID_SELECTION},
                 {"7-3", MPAR_ERROR_INVALID_SELECTION}, {"0,,", MPAR_ERROR_INVALID_SELECTION},
                 {"1000", MPAR_ERROR_NO_DEVICE}, {"p77", MPAR_ERROR_NO_DEVICE}, {"\x01\x02\xff", MPAR_ERROR_NO_DEVICE}};
    mpar_desc d;
    mpar_error e;
    mpar_context* ctx;
    size_t i;
    (void)state;
    memset(&d, 0, sizeof d);
    d.error = &e;
    for (i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        assert_int_equal(setenv("MPAR_DEVICES", cases[i].value, 1), 0);
        ctx = (mpar_context*)&d;
        memset(&e, 0x5a, sizeof e);
        if (mpar_create(&d, &ctx) != cases[i].want || e.code != cases[i].want || !memchr(e.message, 0, sizeof e.message) ||
            !e.message[0] || ctx) {
            unsetenv("MPAR_DEVICES");
            fail_msg("MPAR_DEVICES='%s': expected %s with a message, got %s '%.200s'", cases[i].value,
                     mpar_result_string(cases[i].want), mpar_result_string(e.code), e.message);
        }
    }
    /* the descriptor wins over the environment */
    d.devices = "0";
    assert_int_equal(mpar_create(&d, &ctx), MPAR_SUCCESS);
    assert_int_equal(mpar_device_count(ctx), 1);
    mpar_destroy(ctx);
    assert_int_equal(unsetenv("MPAR_DEVICES"), 0);
}

/* BUG: mpar__select_term reads numbers with atoi, so an index beyond int
   wraps round: "4294967296" selects device 0, "4294967297-4294967298"
   devices 1-2, "p4294967296" platform 0, and "0-2222222222" is called a
   backwards range. A device index that large does not exist. */
static void test_selection_index_overflow(void** state) {
    static const char* specs[] = {"4294967296", "4294967297-4294967298", "p4294967296", "0-2222222222",
                                  "18446744073709551616"};
    mpar_desc d;
    mpar_error e;
    mpar_context* ctx;
    size_t i;
    (void)state;
    memset(&d, 0, sizeof d);
    d.error = &e;
    for (i = 0; i < sizeof specs / sizeof specs[0]; i++) {
        d.devices = specs[i];
        ctx = NULL;
        memset(&e, 0, sizeof e);
        if (mpar_create(&d, &ctx) != MPAR_ERROR_NO_DEVICE) {
            mpar_device_info info;
            int n = ctx ? mpar_device_count(ctx) : 0;
            memset(&info, 0, sizeof info);
            if (ctx) mpar_device_get_info(ctx, 0, &info);
            mpar_destroy(ctx);
            fail_msg("devices '%s' should be MPAR_ERROR_NO_DEVICE, got %s: %d device(s), the first of global index %d %s",
                     specs[i], mpar_result_string(e.code), n, n ? info.global_index : -1, e.message);
        }
    }
}

static void test_context_queries(void** state) {
    mpar_device_info info[4];
    mpar_context_stats cs;
    mpar_error e;
    cl_device_id id;
    volatile int far = 64; /* not a constant: gcc would warn about the (guarded) array index */
    int n = -1;
    (void)state;
    FAILS(MPAR_ERROR_INVALID_ARGUMENT, mpar_device_get_info(NULL, 0, info));
    CTX_FAILS(g_ctx, MPAR_ERROR_INVALID_ARGUMENT, mpar_device_get_info(g_ctx, 2, info));
    CTX_FAILS(g_ctx, MPAR_ERROR_INVALID_ARGUMENT, mpar_device_get_info(g_ctx, -1, info));
    CTX_FAILS(g_ctx, MPAR_ERROR_INVALID_ARGUMENT, mpar_device_get_info(g_ctx, INT_MIN, info));
    CTX_FAILS(g_ctx, MPAR_ERROR_INVALID_ARGUMENT, mpar_device_get_info(g_ctx, INT_MAX, info));
    CTX_FAILS(g_ctx, MPAR_ERROR_INVALID_ARGUMENT, mpar_device_get_info(g_ctx, 0, NULL));
    FAILS(MPAR_ERROR_INVALID_ARGUMENT, mpar_device_get_cl(NULL, 0, &id, NULL, NULL));
    CTX_FAILS(g_ctx, MPAR_ERROR_INVALID_ARGUMENT, mpar_device_get_cl(g_ctx, far, &id, NULL, NULL));
    CTX_FAILS(g_ctx, MPAR_ERROR_INVALID_ARGUMENT, mpar_device_get_cl(g_ctx, -2, NULL, NULL, NULL));
    FAILS(MPAR_SUCCESS, mpar_device_get_cl(g_ctx, 1, NULL, NULL, NULL)); /* every output may be NULL */
    FAILS(MPAR_ERROR_INVALID_ARGUMENT, mpar_context_get_stats(NULL, &cs));
    FAILS(MPAR_ERROR_INVALID_ARGUMENT, mpar_context_get_stats(g_ctx, NULL));
    ERR_FAILS(MPAR_ERROR_INVALID_ARGUMENT, mpar_list_devices(info, 4, NULL, &e));
    ERR_FAILS(MPAR_ERROR_INVALID_ARGUMENT, mpar_list_devices(NULL, 4, &n, &e));
    ERR_FAILS(MPAR_ERROR_INVALID_ARGUMENT, mpar_list_devices(info, -1, &n, &e));
    FAILS(MPAR_ERROR_INVALID_ARGUMENT, mpar_list_devices(info, INT_MIN, &n, NULL));
    /* capacity 0 or 1: the count still says how many there are, nothing more is written */
    assert_int_equal(mpar_list_devices(NULL, 0, &n, NULL), MPAR_SUCCESS);
    assert_true(n >= 2);
    memset(info, 0x77, sizeof info);
    assert_int_equal(mpar_list_devices(info, 1, &n, NULL), MPAR_SUCCESS);
    assert_true(n >= 2);
    assert_int_equal(info[1].global_index, 0x77777777);
}

/* mpar_set_fault: a malformed spec is refused with a message; MPAR_FAULT too. */
static void test_fault_spec(void** state) {
    static const char* bad[] = {"x", "alloc", "alloc:", "alloc:0", "alloc:0:", "alloc:a:1", "alloc:0:1:0",
                                "alloc:0:1:", "alloc:0:1:2:3", "enqueue:*:*x", "build:-1:0", "ALLOC:0:0",
                                "transfer:1000000000000:0", " alloc:0:0"};
    mpar_desc d;
    mpar_error e;
    mpar_context* ctx = NULL;
    mpar_result r;
    size_t i;
    (void)state;
    FAILS(MPAR_ERROR_INVALID_ARGUMENT, mpar_set_fault(NULL, "alloc:0:0"));
    for (i = 0; i < sizeof bad / sizeof bad[0]; i++) CTX_FAILS(g_ctx, MPAR_ERROR_INVALID_ARGUMENT, mpar_set_fault(g_ctx, bad[i]));
    FAILS(MPAR_SUCCESS, mpar_set_fault(g_ctx, "alloc:*:*:3"));
    FAILS(MPAR_SUCCESS, mpar_set_fault(g_ctx, NULL)); /* clears */
    FAILS(MPAR_SUCCESS, mpar_set_fault(g_ctx, ""));
    memset(&d, 0, sizeof d);
    d.error = &e;
    assert_int_equal(setenv("MPAR_FAULT", "alloc:zero:one", 1), 0);
    memset(&e, 0, sizeof e);
    r = mpar_create(&d, &ctx);
    unsetenv("MPAR_FAULT");
    assert_int_equal(r, MPAR_ERROR_INVALID_ARGUMENT);
    assert_null(ctx);
    assert_non_null(strstr(e.message, "MPAR_FAULT"));
}

/* ==== 3. kernels ==== */

static void test_kernels_bad_input(void** state) {
    char path[4096], small[8];
    cl_program prog;
    cl_kernel k;
    FILE* f;
    (void)state;
    FAILS(MPAR_ERROR_INVALID_ARGUMENT, mpar_kernel_find(NULL, "elementwise.cl", path, sizeof path));
    CTX_FAILS(g_ctx, MPAR_ERROR_INVALID_ARGUMENT, mpar_kernel_find(g_ctx, NULL, path, sizeof path));
    CTX_FAILS(g_ctx, MPAR_ERROR_INVALID_ARGUMENT, mpar_kernel_find(g_ctx, "", path, sizeof path));
    CTX_FAILS(g_ctx, MPAR_ERROR_INVALID_ARGUMENT, mpar_kernel_find(g_ctx, "elementwise.cl", NULL, sizeof path));
    CTX_FAILS(g_ctx, MPAR_ERROR_INVALID_ARGUMENT, mpar_kernel_find(g_ctx, "elementwise.cl", small, 0));
    CTX_FAILS(g_ctx, MPAR_ERROR_KERNEL_NOT_FOUND, mpar_kernel_find(g_ctx, "no_such_file.cl", path, sizeof path));
    assert_non_null(strstr(mpar_last_error(g_ctx), "no_such_file.cl"));
    FAILS(MPAR_ERROR_INVALID_ARGUMENT, mpar_program_get(NULL, 0, "elementwise.cl", &prog));
    CTX_FAILS(g_ctx, MPAR_ERROR_INVALID_ARGUMENT, mpar_program_get(g_ctx, 2, "elementwise.cl", &prog));
    CTX_FAILS(g_ctx, MPAR_ERROR_INVALID_ARGUMENT, mpar_program_get(g_ctx, -1, "elementwise.cl", &prog));
    CTX_FAILS(g_ctx, MPAR_ERROR_INVALID_ARGUMENT, mpar_program_get(g_ctx, 0, NULL, &prog));
    CTX_FAILS(g_ctx, MPAR_ERROR_INVALID_ARGUMENT, mpar_program_get(g_ctx, 0, "elementwise.cl", NULL));
    CTX_FAILS(g_ctx, MPAR_ERROR_KERNEL_NOT_FOUND, mpar_program_get(g_ctx, 0, "no_such_file.cl", &prog));
    FAILS(MPAR_ERROR_INVALID_ARGUMENT, mpar_kernel_create(NULL, 0, "elementwise.cl", "mpar_copy", &k));
    CTX_FAILS(g_ctx, MPAR_ERROR_INVALID_ARGUMENT, mpar_kernel_create(g_ctx, 5, "elementwise.cl", "mpar_copy", &k));
    CTX_FAILS(g_ctx, MPAR_ERROR_INVALID_ARGUMENT, mpar_kernel_create(g_ctx, 0, "elementwise.cl", NULL, &k));
    CTX_FAILS(g_ctx, MPAR_ERROR_INVALID_ARGUMENT, mpar_kernel_create(g_ctx, 0, "elementwise.cl", "mpar_copy", NULL));
    CTX_FAILS(g_ctx, MPAR_ERROR_INVALID_ARGUMENT, mpar_kernel_create(g_ctx, 0, NULL, "mpar_copy", &k));
    CTX_FAILS(g_ctx, (mpar_result)CL_INVALID_KERNEL_NAME, mpar_kernel_create(g_ctx, 0, "elementwise.cl", "no_such_kernel", &k));
    assert_non_null(strstr(mpar_last_error(g_ctx), "no_such_kernel"));
    /* a file that does not build: the build log comes back */
    snprintf(path, sizeof path, "%s/broken.cl", g_dir);
    f = fopen(path, "w");
    assert_non_null(f);
    fputs("__kernel void broken(__global float* x) { x[0] = undeclared_thing; }\n", f);
    fclose(f);
    CTX_FAILS(g_ctx, MPAR_ERROR_KERNEL_BUILD, mpar_program_get(g_ctx, 0, path, &prog));
    assert_non_null(strstr(mpar_last_error(g_ctx), "undeclared_thing"));
    CTX_FAILS(g_ctx, MPAR_ERROR_KERNEL_BUILD, mpar_kernel_create(g_ctx, 1, path, "broken", &k));
}

/* BUG: a folder passes for a kernel file. mpar__file_exists tests with
   fopen, which opens a folder on Linux, so mpar_kernel_find returns
   MPAR_SUCCESS for one; mpar__read_file then takes ftell after
   fseek(SEEK_END) as the size, which on ext4 is LLONG_MAX for a folder, and
   asks for 2^63 bytes: MPAR_ERROR_IO by luck under glibc, an abort under
   AddressSanitizer ("requested allocation size 0x8000000000000000"). */
static int child_kernel_folder(void) {
    char out[4096];
    cl_program prog;
    mpar_result r1, r2;
    mark(g_ctx);
    r1 = mpar_kernel_find(g_ctx, g_dir, out, sizeof out);
    r2 = mpar_program_get(g_ctx, 0, g_dir, &prog);
    if (r1 != MPAR_ERROR_KERNEL_NOT_FOUND || (r2 != MPAR_ERROR_KERNEL_NOT_FOUND && r2 != MPAR_ERROR_IO) ||
        !fresh_detail(g_ctx)) {
        fprintf(stderr, "folder '%s' as a kernel file: mpar_kernel_find %s, mpar_program_get %s (%s)\n", g_dir,
                mpar_result_string(r1), mpar_result_string(r2), mpar_last_error(g_ctx));
        return 1;
    }
    return 0;
}
static void test_kernel_path_is_folder(void** state) {
    (void)state;
    expect_child("a folder given as the kernel file", child_kernel_folder);
}

/* BUG: mpar_kernel_find reports success with a truncated path when `out`
   is too small for the full one, whenever the cut-off text happens to name
   something that exists (a folder: fopen of a folder succeeds on Linux). */
static void test_kernel_find_small_buffer(void** state) {
    char full[4096], out[4096];
    char* slash;
    mpar_result r;
    size_t dir_len;
    (void)state;
    assert_int_equal(mpar_kernel_find(g_ctx, "elementwise.cl", full, sizeof full), MPAR_SUCCESS);
    slash = strrchr(full, '/');
    assert_non_null(slash);
    dir_len = (size_t)(slash - full);
    memset(out, 0, sizeof out);
    r = mpar_kernel_find(g_ctx, "elementwise.cl", out, dir_len + 1); /* room for the folder name only */
    if (r == MPAR_SUCCESS && strcmp(out, full) != 0)
        fail_msg("mpar_kernel_find with out_size %lu returned MPAR_SUCCESS and '%s' (the file is '%s')",
                 (unsigned long)(dir_len + 1), out, full);
    r = mpar_kernel_find(g_ctx, full, out, dir_len + 1); /* the path given directly */
    if (r == MPAR_SUCCESS && strcmp(out, full) != 0)
        fail_msg("mpar_kernel_find('%s') with out_size %lu returned MPAR_SUCCESS and '%s'", full,
                 (unsigned long)(dir_len + 1), out);
}

/* ==== 4. model ==== */

static mpar_result user_setup_no_outputs(mpar_layer* l, mpar_error* err) {
    (void)l, (void)err;
    return MPAR_SUCCESS; /* leaves out_features 0 */
}
static mpar_result user_setup_params(mpar_layer* l, mpar_error* err) {
    (void)err;
    l->out_features = l->in_features;
    l->param_count = 4;
    return MPAR_SUCCESS;
}
static mpar_result user_noop(mpar_exec* ex, const mpar_layer* l, const mpar_io* io) {
    (void)ex, (void)l, (void)io;
    return MPAR_SUCCESS;
}

static void test_model_bad_input(void** state) {
    static const mpar_layer_type no_outputs = {"no_outputs", 0, user_setup_no_outputs, NULL, user_noop, user_noop, NULL};
    static const mpar_layer_type no_bw = {"no_backward_weight", 0, user_setup_params, NULL, user_noop, user_noop, NULL};
    static const mpar_layer_type no_setup = {"no_setup", 0, NULL, NULL, user_noop, user_noop, NULL};
    static const mpar_layer_type no_forward = {"no_forward", 0, user_setup_params, NULL, NULL, user_noop, user_noop};
    mpar_model_desc md;
    mpar_layer_desc ld;
    mpar_model *m = (mpar_model*)&md, *tok;
    mpar_error e;
    float params[64];
    (void)state;
    memset(&md, 0, sizeof md);
    ERR_FAILS(MPAR_ERROR_INVALID_ARGUMENT, mpar_model_create(NULL, &m, &e));
    ERR_FAILS(MPAR_ERROR_INVALID_ARGUMENT, mpar_model_create(&md, NULL, &e));
    ERR_FAILS(MPAR_ERROR_INVALID_MODEL, mpar_model_create(&md, &m, &e)); /* input_features 0 */
    assert_null(m);
    md.input_features = -4;
    ERR_FAILS(MPAR_ERROR_INVALID_MODEL, mpar_model_create(&md, &m, &e));
    md.input_features = 4, md.seq_len = -1;
    ERR_FAILS(MPAR_ERROR_INVALID_MODEL, mpar_model_create(&md, &m, &e));
    md.seq_len = 0;
    assert_int_equal(mpar_model_create(&md, &m, &e), MPAR_SUCCESS);

    ERR_FAILS(MPAR_ERROR_INVALID_ARGUMENT, mpar_model_add(NULL, &ld, &e));
    ERR_FAILS(MPAR_ERROR_INVALID_ARGUMENT, mpar_model_add(m, NULL, &e));
    memset(&ld, 0, sizeof ld);
    ERR_FAILS(MPAR_ERROR_INVALID_ARGUMENT, mpar_model_add(m, &ld, &e)); /* type NULL */
    ERR_FAILS(MPAR_ERROR_INVALID_ARGUMENT, mpar_model_add_simple(m, NULL, &e));
    ERR_FAILS(MPAR_ERROR_INVALID_ARGUMENT, mpar_model_add_simple(m, &no_setup, &e));
    ERR_FAILS(MPAR_ERROR_INVALID_ARGUMENT, mpar_model_add_simple(m, &no_forward, &e));
    ERR_FAILS(MPAR_ERROR_INVALID_MODEL, mpar_model_add_simple(m, &no_outputs, &e));
    ERR_FAILS(MPAR_ERROR_INVALID_MODEL, mpar_model_add_simple(m, &no_bw, &e));
    ERR_FAILS(MPAR_ERROR_INVALID_ARGUMENT, mpar_model_add_linear(NULL, 4, &e));
    ERR_FAILS(MPAR_ERROR_INVALID_MODEL, mpar_model_add_linear(m, 0, &e));
    ERR_FAILS(MPAR_ERROR_INVALID_MODEL, mpar_model_add_linear(m, -8, &e));
    ERR_FAILS(MPAR_ERROR_INVALID_MODEL, mpar_model_add_linear(m, INT_MIN, &e));
    ld.type = mpar_layer_dropout(), ld.rate = 1.0f;
    ERR_FAILS(MPAR_ERROR_INVALID_MODEL, mpar_model_add(m, &ld, &e));
    ld.rate = -0.1f;
    ERR_FAILS(MPAR_ERROR_INVALID_MODEL, mpar_model_add(m, &ld, &e));
    ld.rate = (float)NAN;
    ERR_FAILS(MPAR_ERROR_INVALID_MODEL, mpar_model_add(m, &ld, &e));
    memset(&ld, 0, sizeof ld);
    ld.type = mpar_layer_relu(), ld.units = 5; /* the previous layer gives 4 */
    ERR_FAILS(MPAR_ERROR_INVALID_MODEL, mpar_model_add(m, &ld, &e));
    ld.type = mpar_layer_layernorm();
    ERR_FAILS(MPAR_ERROR_INVALID_MODEL, mpar_model_add(m, &ld, &e));
    ld.type = mpar_layer_gelu(), ld.units = -1;
    ERR_FAILS(MPAR_ERROR_INVALID_MODEL, mpar_model_add(m, &ld, &e));
    memset(&ld, 0, sizeof ld);
    ld.type = mpar_layer_decoder_block(), ld.heads = 0;
    ERR_FAILS(MPAR_ERROR_INVALID_MODEL, mpar_model_add(m, &ld, &e));
    ld.heads = 3; /* does not divide 4 */
    ERR_FAILS(MPAR_ERROR_INVALID_MODEL, mpar_model_add(m, &ld, &e));
    ld.heads = 2, ld.hidden = -1;
    ERR_FAILS(MPAR_ERROR_INVALID_MODEL, mpar_model_add(m, &ld, &e));
    memset(&ld, 0, sizeof ld);
    ld.type = mpar_layer_embedding(), ld.units = 8, ld.vocab = 10; /* input width 4, not one token */
    ERR_FAILS(MPAR_ERROR_INVALID_MODEL, mpar_model_add(m, &ld, &e));
    assert_int_equal(mpar_model_layer_count(m), 0); /* nothing was added */

    ERR_FAILS(MPAR_ERROR_INVALID_ARGUMENT, mpar_model_validate(NULL, &e));
    ERR_FAILS(MPAR_ERROR_INVALID_MODEL, mpar_model_validate(m, &e)); /* no layers */
    assert_int_equal(mpar_model_add_linear(m, 1, &e), MPAR_SUCCESS);
    ERR_FAILS(MPAR_ERROR_INVALID_MODEL, mpar_model_validate(m, &e)); /* no loss */
    ERR_FAILS(MPAR_ERROR_INVALID_MODEL, mpar_model_add_simple(m, mpar_layer_cross_entropy(), &e)); /* 1 class */
    assert_int_equal(mpar_model_add_linear(m, 3, &e), MPAR_SUCCESS);
    ld.type = mpar_layer_embedding(), ld.units = 8, ld.vocab = 10, ld.heads = 0;
    ERR_FAILS(MPAR_ERROR_INVALID_MODEL, mpar_model_add(m, &ld, &e)); /* tokens must come first */
    assert_int_equal(mpar_model_add_simple(m, mpar_layer_cross_entropy(), &e), MPAR_SUCCESS);
    ERR_FAILS(MPAR_ERROR_INVALID_MODEL, mpar_model_add_linear(m, 3, &e)); /* after the loss */
    assert_int_equal(mpar_model_validate(m, &e), MPAR_SUCCESS);

    /* getters */
    assert_int_equal(mpar_model_layer_count(NULL), 0);
    assert_null(mpar_model_get_desc(NULL));
    assert_null(mpar_model_layer(NULL, 0));
    assert_null(mpar_model_layer(m, -1));
    assert_null(mpar_model_layer(m, 3));
    assert_null(mpar_model_layer(m, INT_MAX));
    assert_int_equal(mpar_model_param_count(NULL), 0);
    ERR_FAILS(MPAR_ERROR_INVALID_ARGUMENT, mpar_model_init_params(NULL, 0, params, &e));
    ERR_FAILS(MPAR_ERROR_INVALID_ARGUMENT, mpar_model_init_params(m, -1, params, &e));
    ERR_FAILS(MPAR_ERROR_INVALID_ARGUMENT, mpar_model_init_params(m, 3, params, &e));
    ERR_FAILS(MPAR_ERROR_INVALID_ARGUMENT, mpar_model_init_params(m, INT_MIN, params, &e));
    ERR_FAILS(MPAR_ERROR_INVALID_ARGUMENT, mpar_model_init_params(m, 0, NULL, &e));
    assert_int_equal(mpar_model_init_params(m, 2, NULL, &e), MPAR_SUCCESS); /* the loss has no parameters */
    mpar_model_destroy(m);
    mpar_model_destroy(NULL);

    /* token models: an embedding needs a vocabulary and a width, and input_features 1 */
    md.input_features = 1, md.seq_len = 4;
    assert_int_equal(mpar_model_create(&md, &tok, &e), MPAR_SUCCESS);
    memset(&ld, 0, sizeof ld);
    ld.type = mpar_layer_embedding(), ld.units = 8, ld.vocab = 0;
    ERR_FAILS(MPAR_ERROR_INVALID_MODEL, mpar_model_add(tok, &ld, &e));
    ld.vocab = 10, ld.units = -8;
    ERR_FAILS(MPAR_ERROR_INVALID_MODEL, mpar_model_add(tok, &ld, &e));
    mpar_model_destroy(tok);
}

/* ==== 5. planner ==== */

static void test_planner_bad_input(void** state) {
    mpar_plan_layer layers[4];
    mpar_plan_device devices[2];
    mpar_plan_stage manual[3];
    mpar_plan_desc d;
    mpar_plan plan, bad;
    mpar_error e;
    double weights[2] = {1.0, -1.0};
    char buf[64];
    int i;
    (void)state;
    memset(layers, 0, sizeof layers);
    memset(devices, 0, sizeof devices);
    for (i = 0; i < 4; i++) layers[i].flops_forward = layers[i].flops_backward_input = layers[i].flops_backward_weight = 1e6;
    devices[0].flops_per_second = devices[1].flops_per_second = 1e9;
#define PLAN_DESC()                                                                                              \
    (memset(&d, 0, sizeof d), d.num_layers = 4, d.layers = layers, d.num_devices = 2, d.devices = devices)
    PLAN_DESC();
    ERR_FAILS(MPAR_ERROR_INVALID_ARGUMENT, mpar_plan_create(NULL, &plan, &e));
    ERR_FAILS(MPAR_ERROR_INVALID_ARGUMENT, mpar_plan_create(&d, NULL, &e));
    d.num_layers = 0;
    ERR_FAILS(MPAR_ERROR_INVALID_ARGUMENT, mpar_plan_create(&d, &plan, &e));
    assert_null(plan.stages);
    mpar_plan_free(&plan);
    PLAN_DESC(), d.num_layers = -3;
    ERR_FAILS(MPAR_ERROR_INVALID_ARGUMENT, mpar_plan_create(&d, &plan, &e));
    PLAN_DESC(), d.layers = NULL;
    ERR_FAILS(MPAR_ERROR_INVALID_ARGUMENT, mpar_plan_create(&d, &plan, &e));
    PLAN_DESC(), d.num_devices = 0;
    ERR_FAILS(MPAR_ERROR_INVALID_ARGUMENT, mpar_plan_create(&d, &plan, &e));
    PLAN_DESC(), d.devices = NULL;
    ERR_FAILS(MPAR_ERROR_INVALID_ARGUMENT, mpar_plan_create(&d, &plan, &e));
    PLAN_DESC(), d.schedule = (mpar_schedule_kind)9;
    ERR_FAILS(MPAR_ERROR_INVALID_ARGUMENT, mpar_plan_create(&d, &plan, &e));
    PLAN_DESC(), d.mode = (mpar_plan_mode)-1;
    ERR_FAILS(MPAR_ERROR_INVALID_ARGUMENT, mpar_plan_create(&d, &plan, &e));
    PLAN_DESC(), d.order = (mpar_plan_order)5;
    ERR_FAILS(MPAR_ERROR_INVALID_ARGUMENT, mpar_plan_create(&d, &plan, &e));
    PLAN_DESC(), d.microbatches = -1;
    ERR_FAILS(MPAR_ERROR_INVALID_ARGUMENT, mpar_plan_create(&d, &plan, &e));
    PLAN_DESC(), d.use_devices = 3;
    ERR_FAILS(MPAR_ERROR_INVALID_ARGUMENT, mpar_plan_create(&d, &plan, &e));
    PLAN_DESC(), layers[2].flops_forward = -1.0;
    ERR_FAILS(MPAR_ERROR_INVALID_ARGUMENT, mpar_plan_create(&d, &plan, &e));
    layers[2].flops_forward = NAN;
    ERR_FAILS(MPAR_ERROR_INVALID_ARGUMENT, mpar_plan_create(&d, &plan, &e));
    layers[2].flops_forward = 1e6;
    PLAN_DESC(), d.mode = MPAR_PLAN_PROPORTIONAL; /* weights NULL */
    ERR_FAILS(MPAR_ERROR_INVALID_ARGUMENT, mpar_plan_create(&d, &plan, &e));
    d.weights = weights; /* a negative weight */
    ERR_FAILS(MPAR_ERROR_INVALID_ARGUMENT, mpar_plan_create(&d, &plan, &e));
    PLAN_DESC(), d.mode = MPAR_PLAN_MANUAL; /* neither stages nor per-layer devices */
    memset(&e, 0, sizeof e);
    assert_int_not_equal(mpar_plan_create(&d, &plan, &e), MPAR_SUCCESS);
    assert_true(e.message[0] != '\0');
    memset(manual, 0, sizeof manual);
    manual[0].device = 0, manual[0].first_layer = 0, manual[0].last_layer = 1;
    manual[1].device = 5, manual[1].first_layer = 2, manual[1].last_layer = 3; /* no device 5 */
    d.manual_stages = manual, d.num_manual_stages = 2;
    ERR_FAILS(MPAR_ERROR_INVALID_PLAN, mpar_plan_create(&d, &plan, &e));
    manual[1].device = 1, manual[1].first_layer = 3; /* gap */
    ERR_FAILS(MPAR_ERROR_INVALID_PLAN, mpar_plan_create(&d, &plan, &e));
    manual[1].first_layer = 2, manual[1].last_layer = INT_MAX; /* beyond the model */
    ERR_FAILS(MPAR_ERROR_INVALID_PLAN, mpar_plan_create(&d, &plan, &e));
    d.num_manual_stages = 0;
    ERR_FAILS(MPAR_ERROR_INVALID_PLAN, mpar_plan_create(&d, &plan, &e));
    PLAN_DESC(), d.num_layers = 1, d.use_devices = 2; /* more stages than layers */
    ERR_FAILS(MPAR_ERROR_INVALID_PLAN, mpar_plan_create(&d, &plan, &e));
#undef PLAN_DESC
    mpar_plan_free(NULL);

    /* text form, printing, in-flight counts */
    assert_int_equal(mpar_plan_to_string(NULL, buf, sizeof buf), -1);
    memset(&bad, 0, sizeof bad);
    bad.num_stages = 3; /* stages NULL */
    assert_int_equal(mpar_plan_to_string(&bad, buf, sizeof buf), -1);
    FAILS(MPAR_ERROR_INVALID_ARGUMENT, mpar_plan_print(NULL, stdout));
    FAILS(MPAR_ERROR_INVALID_ARGUMENT, mpar_plan_print(&bad, stdout));
    FAILS(MPAR_ERROR_INVALID_ARGUMENT, mpar_plan_write_json(&bad, stdout));
    FAILS(MPAR_ERROR_INVALID_ARGUMENT, mpar_plan_write_json(NULL, stdout));
    assert_int_equal(mpar_plan_parse("0:0-1", 5, &plan, &e), MPAR_SUCCESS);
    FAILS(MPAR_ERROR_INVALID_ARGUMENT, mpar_plan_print(&plan, NULL));
    FAILS(MPAR_ERROR_INVALID_ARGUMENT, mpar_plan_write_json(&plan, NULL));
    assert_int_equal(mpar_plan_to_string(&plan, NULL, 0), 5);
    assert_int_equal(mpar_plan_to_string(&plan, buf, 3), 5);
    assert_string_equal(buf, "0:");
    mpar_plan_free(&plan);
    ERR_FAILS(MPAR_ERROR_INVALID_ARGUMENT, mpar_plan_parse(NULL, 4, &plan, &e));
    ERR_FAILS(MPAR_ERROR_INVALID_ARGUMENT, mpar_plan_parse("0:0", 3, NULL, &e));
    ERR_FAILS(MPAR_ERROR_INVALID_PLAN, mpar_plan_parse("", 0, &plan, &e));
    ERR_FAILS(MPAR_ERROR_INVALID_PLAN, mpar_plan_parse("0:0-1", 0, &plan, &e)); /* length 0: empty */
    ERR_FAILS(MPAR_ERROR_INVALID_PLAN, mpar_plan_parse("0:5-2", 5, &plan, &e));
    ERR_FAILS(MPAR_ERROR_INVALID_PLAN, mpar_plan_parse("0:1234567890", 12, &plan, &e));
    ERR_FAILS(MPAR_ERROR_INVALID_PLAN, mpar_plan_parse("-1:0", 4, &plan, &e));
    ERR_FAILS(MPAR_ERROR_INVALID_PLAN, mpar_plan_parse("0:0,", 4, &plan, &e));
    assert_null(plan.stages);
    assert_int_equal(mpar_plan_in_flight(MPAR_SCHEDULE_1F1B, 0, 4, 1, 0), 0);
    assert_int_equal(mpar_plan_in_flight(MPAR_SCHEDULE_1F1B, 2, 0, 1, 0), 0);
    assert_int_equal(mpar_plan_in_flight(MPAR_SCHEDULE_1F1B, 2, 4, -1, 0), 0);
    assert_int_equal(mpar_plan_in_flight(MPAR_SCHEDULE_1F1B, 2, 4, 1, 2), 0);
    assert_int_equal(mpar_plan_in_flight(MPAR_SCHEDULE_1F1B, 2, 4, 1, -1), 0);
    assert_int_equal(mpar_plan_in_flight((mpar_schedule_kind)77, 2, 4, 1, 0), 0);
    assert_int_equal(mpar_plan_in_flight(MPAR_SCHEDULE_INTERLEAVED_1F1B, 2, INT_MAX, INT_MAX, 0), 0);
}

/* ==== 6. schedules and the simulator ==== */

static void test_schedule_bad_input(void** state) {
    mpar_schedule* sc = (mpar_schedule*)&sc;
    mpar_schedule* ok = NULL;
    mpar_simulation* sim = (mpar_simulation*)&sim;
    mpar_sim_desc sd;
    mpar_schedule_kind kind = MPAR_SCHEDULE_GPIPE;
    mpar_action list[3] = {{MPAR_ACTION_FORWARD, 0, 0}, {MPAR_ACTION_BACKWARD, 0, 0}, {MPAR_ACTION_OPTIMIZER_STEP, -1, 0}};
    mpar_action badkind[1] = {{(mpar_action_kind)42, 0, 0}};
    const mpar_action* lists[2] = {list, NULL};
    int counts[2] = {3, 0};
    double scale[2] = {1.0, 0.0};
    mpar_error e;
    char buf[16];
    (void)state;
    ERR_FAILS(MPAR_ERROR_INVALID_ARGUMENT, mpar_schedule_create(MPAR_SCHEDULE_1F1B, 2, 4, 1, NULL, &e));
    ERR_FAILS(MPAR_ERROR_INVALID_ARGUMENT, mpar_schedule_create((mpar_schedule_kind)8, 2, 4, 1, &sc, &e));
    assert_null(sc);
    sc = (mpar_schedule*)&sc; /* AUTO needs costs: pipelines only */
    ERR_FAILS(MPAR_ERROR_INVALID_ARGUMENT, mpar_schedule_create(MPAR_SCHEDULE_AUTO, 2, 4, 1, &sc, &e));
    assert_null(sc);
    assert_non_null(strstr(e.message, "mpar_schedule_synthesize"));
    ERR_FAILS(MPAR_ERROR_INVALID_ARGUMENT, mpar_schedule_create((mpar_schedule_kind)-1, 2, 4, 1, &sc, &e));
    ERR_FAILS(MPAR_ERROR_INVALID_ARGUMENT, mpar_schedule_create(MPAR_SCHEDULE_1F1B, 0, 4, 1, &sc, &e));
    ERR_FAILS(MPAR_ERROR_INVALID_ARGUMENT, mpar_schedule_create(MPAR_SCHEDULE_1F1B, 2, 0, 1, &sc, &e));
    ERR_FAILS(MPAR_ERROR_INVALID_ARGUMENT, mpar_schedule_create(MPAR_SCHEDULE_1F1B, 2, -5, 1, &sc, &e));
    ERR_FAILS(MPAR_ERROR_INVALID_ARGUMENT, mpar_schedule_create(MPAR_SCHEDULE_1F1B, 2, 4, 0, &sc, &e));
    ERR_FAILS(MPAR_ERROR_INVALID_ARGUMENT, mpar_schedule_create(MPAR_SCHEDULE_1F1B, 2, 4, 2, &sc, &e));
    ERR_FAILS(MPAR_ERROR_INVALID_ARGUMENT, mpar_schedule_create(MPAR_SCHEDULE_GPIPE, INT_MAX, INT_MAX, 1, &sc, &e));
    ERR_FAILS(MPAR_ERROR_INVALID_ARGUMENT,
              mpar_schedule_create(MPAR_SCHEDULE_INTERLEAVED_1F1B, 64, 1 << 20, 4096, &sc, &e));
    ERR_FAILS(MPAR_ERROR_INVALID_ARGUMENT, mpar_schedule_from_lists(1, 1, 1, lists, counts, NULL, &e));
    ERR_FAILS(MPAR_ERROR_INVALID_ARGUMENT, mpar_schedule_from_lists(1, 1, 1, NULL, counts, &sc, &e));
    ERR_FAILS(MPAR_ERROR_INVALID_ARGUMENT, mpar_schedule_from_lists(1, 1, 1, lists, NULL, &sc, &e));
    ERR_FAILS(MPAR_ERROR_INVALID_ARGUMENT, mpar_schedule_from_lists(0, 1, 1, lists, counts, &sc, &e));
    counts[1] = 2; /* list 1 is NULL */
    ERR_FAILS(MPAR_ERROR_INVALID_ARGUMENT, mpar_schedule_from_lists(2, 1, 1, lists, counts, &sc, &e));
    counts[1] = -1;
    ERR_FAILS(MPAR_ERROR_INVALID_ARGUMENT, mpar_schedule_from_lists(2, 1, 1, lists, counts, &sc, &e));
    lists[1] = badkind, counts[1] = 1;
    ERR_FAILS(MPAR_ERROR_INVALID_SCHEDULE, mpar_schedule_from_lists(2, 1, 1, lists, counts, &sc, &e));
    /* a custom schedule that deadlocks is built, then refused by the checks */
    lists[1] = NULL, counts[1] = 0;
    assert_int_equal(mpar_schedule_from_lists(2, 1, 1, lists, counts, &sc, &e), MPAR_SUCCESS);
    ERR_FAILS(MPAR_ERROR_INVALID_SCHEDULE, mpar_schedule_validate(sc, &e));
    ERR_FAILS(MPAR_ERROR_INVALID_SCHEDULE, mpar_simulate(sc, NULL, &sim, &e));
    assert_null(sim);
    mpar_schedule_destroy(sc);
    ERR_FAILS(MPAR_ERROR_INVALID_ARGUMENT, mpar_schedule_validate(NULL, &e));

    assert_int_equal(mpar_schedule_create(MPAR_SCHEDULE_1F1B, 2, 2, 1, &ok, &e), MPAR_SUCCESS);
    assert_int_equal(mpar_schedule_action_count(NULL, 0), 0);
    assert_int_equal(mpar_schedule_action_count(ok, -1), 0);
    assert_int_equal(mpar_schedule_action_count(ok, 2), 0);
    assert_null(mpar_schedule_action(NULL, 0, 0));
    assert_null(mpar_schedule_action(ok, 0, -1));
    assert_null(mpar_schedule_action(ok, 0, mpar_schedule_action_count(ok, 0)));
    assert_null(mpar_schedule_action(ok, 7, 0));
    assert_int_equal(mpar_schedule_virtual_stage(NULL, 0, 0), -1);
    assert_int_equal(mpar_action_format(NULL, 0, buf, sizeof buf), 1);
    assert_string_equal(buf, "?");
    assert_int_equal(mpar_action_format(&badkind[0], 1, buf, sizeof buf), 1);
    assert_int_equal(mpar_action_format(&list[0], 1, NULL, 0), 4); /* "F0.0": the length only */
    mpar_schedule_print(NULL, stdout);
    mpar_schedule_print(ok, NULL);
    ERR_FAILS(MPAR_ERROR_INVALID_ARGUMENT, mpar_schedule_kind_parse(NULL, &kind, &e));
    ERR_FAILS(MPAR_ERROR_INVALID_ARGUMENT, mpar_schedule_kind_parse("1f1b", NULL, &e));
    ERR_FAILS(MPAR_ERROR_INVALID_ARGUMENT, mpar_schedule_kind_parse("", &kind, &e));
    ERR_FAILS(MPAR_ERROR_INVALID_ARGUMENT, mpar_schedule_kind_parse("1f1bb", &kind, &e));
    ERR_FAILS(MPAR_ERROR_INVALID_ARGUMENT,
              mpar_schedule_kind_parse("gpipe-------------------------------------------x", &kind, &e));
    assert_int_equal(kind, MPAR_SCHEDULE_GPIPE); /* untouched by the failures */

    ERR_FAILS(MPAR_ERROR_INVALID_ARGUMENT, mpar_simulate(ok, NULL, NULL, &e));
    ERR_FAILS(MPAR_ERROR_INVALID_ARGUMENT, mpar_simulate(NULL, NULL, &sim, &e));
    memset(&sd, 0, sizeof sd);
    sd.forward = -1.0;
    ERR_FAILS(MPAR_ERROR_INVALID_ARGUMENT, mpar_simulate(ok, &sd, &sim, &e));
    sd.forward = NAN;
    ERR_FAILS(MPAR_ERROR_INVALID_ARGUMENT, mpar_simulate(ok, &sd, &sim, &e));
    sd.forward = INFINITY;
    ERR_FAILS(MPAR_ERROR_INVALID_ARGUMENT, mpar_simulate(ok, &sd, &sim, &e));
    memset(&sd, 0, sizeof sd);
    sd.microbatch_scale = scale; /* a zero scale */
    ERR_FAILS(MPAR_ERROR_INVALID_ARGUMENT, mpar_simulate(ok, &sd, &sim, &e));
    memset(&sd, 0, sizeof sd);
    sd.backward = 1.0, sd.backward_input = 2.0; /* W = B - I < 0 */
    ERR_FAILS(MPAR_ERROR_INVALID_ARGUMENT, mpar_simulate(ok, &sd, &sim, &e));
    mpar_simulation_destroy(NULL);
    assert_int_equal(mpar_simulate(ok, NULL, &sim, &e), MPAR_SUCCESS);
    mpar_simulation_print(NULL, ok, stdout, 10);
    mpar_simulation_print(sim, NULL, stdout, 10);
    mpar_simulation_print(sim, ok, NULL, 10);
    {
        mpar_schedule* three = NULL; /* a schedule of another shape than the simulation */
        assert_int_equal(mpar_schedule_create(MPAR_SCHEDULE_1F1B, 3, 2, 1, &three, &e), MPAR_SUCCESS);
        mpar_simulation_print(sim, three, stdout, 10);
        mpar_schedule_destroy(three);
    }
    mpar_simulation_destroy(sim);
    mpar_schedule_destroy(ok);
    mpar_schedule_destroy(NULL);
}

/* BUG (undefined behaviour, seen under UBSan): mpar_schedule_virtual_stage
   checks neither stage nor chunk and computes chunk * stages + stage in
   int, so chunk = INT_MAX overflows; out of range it should say -1 as it
   does for a NULL schedule. */
static int child_virtual_stage_range(void) {
    mpar_schedule* sc = NULL;
    int bad = 0;
    if (mpar_schedule_create(MPAR_SCHEDULE_INTERLEAVED_1F1B, 2, 4, 2, &sc, NULL) != MPAR_SUCCESS) return 2;
    bad |= mpar_schedule_virtual_stage(sc, 1, 1) != 3;
    if (mpar_schedule_virtual_stage(sc, 2, 0) != -1 || mpar_schedule_virtual_stage(sc, -1, 0) != -1 ||
        mpar_schedule_virtual_stage(sc, 0, 2) != -1) {
        fprintf(stderr, "mpar_schedule_virtual_stage(P=2, V=2): stage 2 -> %d, stage -1 -> %d, chunk 2 -> %d\n",
                mpar_schedule_virtual_stage(sc, 2, 0), mpar_schedule_virtual_stage(sc, -1, 0),
                mpar_schedule_virtual_stage(sc, 0, 2));
        bad = 1;
    }
    bad |= mpar_schedule_virtual_stage(sc, 0, INT_MAX) != -1;
    mpar_schedule_destroy(sc);
    return bad;
}
static void test_schedule_virtual_stage_range(void** state) {
    (void)state;
    expect_child("mpar_schedule_virtual_stage out of range", child_virtual_stage_range);
}

/* ==== 7-8. pipelines ==== */

static int pipeline_with(const mpar_model* m, const mpar_pipeline_desc* pd) {
    mpar_pipeline* p = (mpar_pipeline*)&p;
    mpar_result r = mpar_pipeline_create(g_ctx, m, pd, &p);
    if (r == MPAR_SUCCESS) mpar_pipeline_destroy(p);
    else if (p) fail_msg("a failed mpar_pipeline_create left *out set");
    return (int)r;
}

static void test_pipeline_create_bad_input(void** state) {
    mpar_stage_desc st[4], chunks[4] = {{0, 0, 0}, {1, 1, 1}, {0, 2, 2}, {1, 3, 3}};
    mpar_pipeline_desc pd = two_stage_desc(st, 0);
    mpar_pipeline* p = (mpar_pipeline*)&p;
    mpar_model *empty, *noloss;
    mpar_model_desc md;
    mpar_plan plan;
    (void)state;
    FAILS(MPAR_ERROR_INVALID_ARGUMENT, mpar_pipeline_create(NULL, g_model, &pd, &p));
    CTX_FAILS(g_ctx, MPAR_ERROR_INVALID_ARGUMENT, mpar_pipeline_create(g_ctx, NULL, &pd, &p));
    CTX_FAILS(g_ctx, MPAR_ERROR_INVALID_ARGUMENT, mpar_pipeline_create(g_ctx, g_model, NULL, &p));
    CTX_FAILS(g_ctx, MPAR_ERROR_INVALID_ARGUMENT, mpar_pipeline_create(g_ctx, g_model, &pd, NULL));
#define BAD(want, change)                                                                                        \
    do {                                                                                                         \
        pd = two_stage_desc(st, 0);                                                                              \
        change;                                                                                                  \
        CTX_FAILS(g_ctx, (mpar_result)(want), (mpar_result)pipeline_with(g_model, &pd));                         \
    } while (0)
    BAD(MPAR_ERROR_INVALID_ARGUMENT, pd.max_batch = 0);
    BAD(MPAR_ERROR_INVALID_ARGUMENT, pd.max_batch = -8);
    BAD(MPAR_ERROR_INVALID_ARGUMENT, pd.microbatches = -1);
    BAD(MPAR_ERROR_INVALID_ARGUMENT, pd.microbatches = 9); /* more micro-batches than max_batch */
    BAD(MPAR_ERROR_INVALID_ARGUMENT, pd.virtual_stages = -2);
    BAD(MPAR_ERROR_INVALID_ARGUMENT, (pd.virtual_stages = 2, pd.stages = chunks, pd.stage_count = 4)); /* V > 1: interleaved only */
    BAD(MPAR_ERROR_INVALID_ARGUMENT, pd.link_capacity = -1);
    BAD(MPAR_ERROR_INVALID_ARGUMENT, pd.link_mode = (mpar_link_mode)9);
    BAD(MPAR_ERROR_INVALID_ARGUMENT, pd.optimizer.kind = (mpar_optimizer_kind)7);
    BAD(MPAR_ERROR_INVALID_ARGUMENT, pd.optimizer.lr = -1.0f);
    BAD(MPAR_ERROR_INVALID_ARGUMENT, pd.optimizer.clip_norm = -1.0f);
    /* settings that would poison every parameter on step 1, or disable the
       timeout: refused, the field and its value named */
#define BAD_NAMED(change, field)                                                                                 \
    do {                                                                                                         \
        BAD(MPAR_ERROR_INVALID_ARGUMENT, change);                                                                \
        if (!strstr(mpar_last_error(g_ctx), field)) fail_msg("%s: message does not name %s: %s", #change, field, \
                                                             mpar_last_error(g_ctx));                            \
    } while (0)
    BAD_NAMED(pd.optimizer.lr = NAN, "optimizer.lr is nan");
    BAD_NAMED(pd.optimizer.lr = INFINITY, "optimizer.lr is inf");
    BAD_NAMED(pd.optimizer.lr = -1.0f, "optimizer.lr is -1");
    BAD_NAMED(pd.optimizer.weight_decay = NAN, "optimizer.weight_decay is nan");
    BAD_NAMED(pd.optimizer.weight_decay = -0.5f, "optimizer.weight_decay is -0.5");
    BAD_NAMED(pd.optimizer.beta1 = 1.5f, "optimizer.beta1 is 1.5");
    BAD_NAMED(pd.optimizer.beta1 = 1.0f, "optimizer.beta1 is 1");
    BAD_NAMED(pd.optimizer.beta2 = NAN, "optimizer.beta2 is nan");
    BAD_NAMED(pd.optimizer.eps = -1e-8f, "optimizer.eps");
    BAD_NAMED(pd.optimizer.momentum = INFINITY, "optimizer.momentum is inf");
    BAD_NAMED(pd.optimizer.clip_norm = NAN, "optimizer.clip_norm is nan");
    BAD_NAMED(pd.optimizer.min_lr = NAN, "optimizer.min_lr is nan");
    BAD_NAMED(pd.optimizer.min_lr = 1.0f, "optimizer.min_lr is 1"); /* above lr */
    BAD_NAMED(pd.optimizer.warmup_steps = -3, "optimizer.warmup_steps");
    BAD_NAMED(pd.optimizer.kind = (mpar_optimizer_kind)7, "optimizer.kind");
    BAD_NAMED(pd.timeout_seconds = NAN, "timeout_seconds is nan");
    BAD_NAMED(pd.timeout_seconds = INFINITY, "timeout_seconds is inf");
    BAD_NAMED(pd.timeout_seconds = -1.0, "timeout_seconds is -1");
#undef BAD_NAMED
    BAD(MPAR_ERROR_INVALID_ARGUMENT, pd.schedule = (mpar_schedule_kind)17);
    BAD(MPAR_ERROR_INVALID_PLAN, st[1].device = 2);            /* no device 2 */
    BAD(MPAR_ERROR_INVALID_PLAN, st[1].device = -1);
    BAD(MPAR_ERROR_INVALID_PLAN, st[1].first_layer = 3);       /* gap */
    BAD(MPAR_ERROR_INVALID_PLAN, st[1].first_layer = 1);       /* overlap */
    BAD(MPAR_ERROR_INVALID_PLAN, st[1].last_layer = 4);        /* beyond the model (4 layers) */
    BAD(MPAR_ERROR_INVALID_PLAN, st[1].last_layer = 2);        /* the last layer in no stage */
    BAD(MPAR_ERROR_INVALID_PLAN, st[0].last_layer = -1);       /* empty stage */
    BAD(MPAR_ERROR_INVALID_PLAN, pd.stage_count = 0);
    BAD(MPAR_ERROR_INVALID_PLAN, pd.stage_count = -1);
    BAD(MPAR_ERROR_INVALID_PLAN, pd.stage_count = 100000);
    BAD(MPAR_ERROR_INVALID_PLAN, (pd.schedule = MPAR_SCHEDULE_INTERLEAVED_1F1B, pd.virtual_stages = 2));
    BAD(MPAR_ERROR_UNSUPPORTED, (pd.mpi_comm = &pd, st[1].device = 99)); /* built without MPAR_USE_MPI */
    /* a plan to follow that has no stages */
    memset(&plan, 0, sizeof plan);
    BAD(MPAR_ERROR_INVALID_PLAN, (pd.stages = NULL, pd.stage_count = 0, pd.plan = &plan));
    /* models that cannot run */
    memset(&md, 0, sizeof md);
    md.input_features = 4;
    assert_int_equal(mpar_model_create(&md, &empty, NULL), MPAR_SUCCESS);
    assert_int_equal(mpar_model_create(&md, &noloss, NULL), MPAR_SUCCESS);
    assert_int_equal(mpar_model_add_linear(noloss, 3, NULL), MPAR_SUCCESS);
    pd = two_stage_desc(st, 0);
    pd.stage_count = 1, st[0].last_layer = 0;
    CTX_FAILS(g_ctx, MPAR_ERROR_INVALID_MODEL, (mpar_result)pipeline_with(empty, &pd));
    CTX_FAILS(g_ctx, MPAR_ERROR_INVALID_MODEL, (mpar_result)pipeline_with(noloss, &pd));
    mpar_model_destroy(empty);
    mpar_model_destroy(noloss);
#undef BAD
    mpar_pipeline_destroy(NULL);
}

/* BUG: mpar__resolve_stages reads plan->stages[j] for num_stages entries
   without checking that stages is non-NULL (mpar_plan_to_string and
   mpar_plan_print do check): a plan with num_stages > 0 and no array
   crashes mpar_pipeline_create instead of MPAR_ERROR_INVALID_PLAN. */
static int child_plan_without_stages(void) {
    mpar_stage_desc st[2];
    mpar_pipeline_desc pd = two_stage_desc(st, 0);
    mpar_pipeline* p = NULL;
    mpar_plan plan;
    mpar_result r;
    memset(&plan, 0, sizeof plan);
    plan.num_stages = 2; /* and stages NULL */
    pd.stages = NULL, pd.stage_count = 0, pd.plan = &plan;
    r = mpar_pipeline_create(g_ctx, g_model, &pd, &p);
    if (r != MPAR_ERROR_INVALID_PLAN) fprintf(stderr, "got %s\n", mpar_result_string(r));
    return r != MPAR_ERROR_INVALID_PLAN;
}
static void test_pipeline_plan_without_stages(void** state) {
    (void)state;
    expect_child("mpar_pipeline_create with plan.num_stages 2 and plan.stages NULL", child_plan_without_stages);
}

/* BUG (undefined behaviour: signed int overflow, which aborts a UBSan build
   such as `make check`; a plain build happens to return an error):
   - mpar__pipeline_build: mpar_device_count(ctx) * desc.virtual_stages
     with virtual_stages near INT_MAX;
   - mpar__resolve_stages: out[j - 1].last_layer + 1 with last_layer INT_MAX;
   - mpar__pipeline_build: (max_batch + M - 1) / M * seq_len with max_batch
     near INT_MAX (the same expression in mpar_pipeline_plan and
     mpar_profile_layers).
   Each must be refused with an error code, overflow-free. */
static int create_in_child(int variant) {
    mpar_stage_desc st[2];
    mpar_pipeline_desc pd = two_stage_desc(st, 0);
    mpar_pipeline* p = NULL;
    mpar_result r;
    if (variant == 0) pd.schedule = MPAR_SCHEDULE_INTERLEAVED_1F1B, pd.virtual_stages = INT_MAX;
    if (variant == 1) st[0].last_layer = INT_MAX;
    if (variant == 2) pd.max_batch = INT_MAX;
    if (variant == 3) {
        static const double flops[2] = {1e9, 1e9};
        static mpar_plan_options o;
        o.device_flops = flops; /* no measuring in a child process */
        pd.max_batch = INT_MAX, pd.stages = NULL, pd.stage_count = 0, pd.plan_options = &o;
    }
    r = mpar_pipeline_create(g_ctx, g_model, &pd, &p);
    mpar_pipeline_destroy(p);
    if (r == MPAR_SUCCESS || !fresh_detail(g_ctx)) {
        fprintf(stderr, "variant %d: %s\n", variant, mpar_result_string(r));
        return 1;
    }
    return 0;
}
static int child_virtual_stages_max(void) { return mark(g_ctx), create_in_child(0); }
static int child_last_layer_max(void) { return mark(g_ctx), create_in_child(1); }
static int child_max_batch_max(void) { return mark(g_ctx), create_in_child(2); }
static int child_max_batch_max_planned(void) { return mark(g_ctx), create_in_child(3); }
static void test_pipeline_int_limits(void** state) {
    char report[2048] = "";
    int ok = 1;
    (void)state;
    ok &= run_child("virtual_stages INT_MAX", child_virtual_stages_max, report, sizeof report);
    ok &= run_child("stage last_layer INT_MAX", child_last_layer_max, report, sizeof report);
    ok &= run_child("max_batch INT_MAX, explicit stages", child_max_batch_max, report, sizeof report);
    ok &= run_child("max_batch INT_MAX, planned", child_max_batch_max_planned, report, sizeof report);
    if (!ok) fail_msg("%s", report);
}

static void test_pipeline_calls_bad_input(void** state) {
    mpar_batch b;
    mpar_step_info info;
    mpar_pipeline_stats ps;
    mpar_timeline t;
    int32_t y[8];
    float params[64], out[8 * 3];
    double loss;
    (void)state;
    b.inputs = g_x, b.targets = g_y, b.samples = 8;
    /* out of order */
    CTX_FAILS(g_ctx, MPAR_ERROR_INVALID_STATE, mpar_pipeline_apply_gradients(g_pipe, &info));
    assert_non_null(strstr(mpar_last_error(g_ctx), "compute_gradients"));
    CTX_FAILS(g_ctx, MPAR_ERROR_INVALID_STATE, mpar_pipeline_get_timeline(g_pipe, &t));
    assert_null(t.events);
    /* NULLs */
    FAILS(MPAR_ERROR_INVALID_ARGUMENT, mpar_pipeline_compute_gradients(NULL, &b, &info));
    FAILS(MPAR_ERROR_INVALID_ARGUMENT, mpar_pipeline_apply_gradients(NULL, &info));
    FAILS(MPAR_ERROR_INVALID_ARGUMENT, mpar_pipeline_train_step(NULL, &b, &info));
    FAILS(MPAR_ERROR_INVALID_ARGUMENT, mpar_pipeline_infer(NULL, &b, NULL, NULL));
    CTX_FAILS(g_ctx, MPAR_ERROR_INVALID_ARGUMENT, mpar_pipeline_compute_gradients(g_pipe, NULL, &info));
    CTX_FAILS(g_ctx, MPAR_ERROR_INVALID_ARGUMENT, mpar_pipeline_train_step(g_pipe, NULL, &info));
    /* bad batches */
#define BAD_BATCH(call, change)                                                                                  \
    do {                                                                                                         \
        b.inputs = g_x, b.targets = g_y, b.samples = 8;                                                          \
        change;                                                                                                  \
        CTX_FAILS(g_ctx, MPAR_ERROR_INVALID_ARGUMENT, call);                                                     \
    } while (0)
    BAD_BATCH(mpar_pipeline_train_step(g_pipe, &b, &info), b.inputs = NULL);
    BAD_BATCH(mpar_pipeline_train_step(g_pipe, &b, &info), b.targets = NULL); /* training needs targets */
    BAD_BATCH(mpar_pipeline_train_step(g_pipe, &b, &info), b.samples = 0);
    BAD_BATCH(mpar_pipeline_train_step(g_pipe, &b, &info), b.samples = -3);
    BAD_BATCH(mpar_pipeline_train_step(g_pipe, &b, &info), b.samples = 9);       /* > max_batch 8 */
    BAD_BATCH(mpar_pipeline_train_step(g_pipe, &b, &info), b.samples = INT_MAX); /* never read */
    BAD_BATCH(mpar_pipeline_compute_gradients(g_pipe, &b, &info), b.samples = 1); /* < 2 micro-batches */
    memcpy(y, g_y, sizeof y);
    y[5] = 3; /* 3 classes: 0..2 */
    BAD_BATCH(mpar_pipeline_compute_gradients(g_pipe, &b, &info), b.targets = y);
    assert_non_null(strstr(mpar_last_error(g_ctx), "row 5"));
    y[5] = INT_MAX;
    BAD_BATCH(mpar_pipeline_train_step(g_pipe, &b, &info), b.targets = y);
    BAD_BATCH(mpar_pipeline_infer(g_pipe, &b, out, &loss), b.targets = y);
    BAD_BATCH(mpar_pipeline_infer(g_pipe, &b, out, &loss), b.samples = 0);
    BAD_BATCH(mpar_pipeline_infer(g_pipe, &b, out, &loss), b.inputs = NULL);
    /* huge counts: refused before any arithmetic on them (samples + 3 overflowed, and infer returned success
       having computed nothing); never read */
    BAD_BATCH(mpar_pipeline_infer(g_pipe, &b, out, &loss), b.samples = INT_MAX);
    assert_non_null(strstr(mpar_last_error(g_ctx), "batch.samples 2147483647"));
    BAD_BATCH(mpar_pipeline_infer(g_pipe, &b, NULL, NULL), (b.samples = INT_MAX - 2, b.targets = NULL));
    assert_non_null(strstr(mpar_last_error(g_ctx), "batch.samples 2147483645"));
    /* micro-batches of 4 samples: 2^20 of them is the most one call takes */
    BAD_BATCH(mpar_pipeline_infer(g_pipe, &b, NULL, NULL), (b.samples = 4 * (1 << 20) + 1, b.targets = NULL));
    assert_non_null(strstr(mpar_last_error(g_ctx), "batch.samples 4194305 needs 1048577 micro-batches"));
    /* nothing above counts as computed gradients */
    CTX_FAILS(g_ctx, MPAR_ERROR_INVALID_STATE, mpar_pipeline_apply_gradients(g_pipe, &info));
    /* negative targets leave rows out; a batch larger than max_batch is fine for inference */
    y[5] = -1;
    b.inputs = g_x, b.targets = y, b.samples = 8;
    assert_int_equal(mpar_pipeline_compute_gradients(g_pipe, &b, &info), MPAR_SUCCESS);
    assert_int_equal(info.counted_rows, 7);
    assert_int_equal(mpar_pipeline_apply_gradients(g_pipe, &info), MPAR_SUCCESS);
    CTX_FAILS(g_ctx, MPAR_ERROR_INVALID_STATE, mpar_pipeline_apply_gradients(g_pipe, &info)); /* twice */
    {
        float many[20 * 4];
        int32_t many_y[20];
        int i;
        for (i = 0; i < 20 * 4; i++) many[i] = (float)(i % 7) - 3.0f;
        for (i = 0; i < 20; i++) many_y[i] = i % 3;
        b.inputs = many, b.targets = many_y, b.samples = 20;
        assert_int_equal(mpar_pipeline_infer(g_pipe, &b, NULL, &loss), MPAR_SUCCESS);
        assert_true(isfinite(loss));
        b.targets = NULL; /* no targets: no loss, still fine */
        assert_int_equal(mpar_pipeline_infer(g_pipe, &b, NULL, NULL), MPAR_SUCCESS);
    }
    /* layer indices and state kinds */
    FAILS(MPAR_ERROR_INVALID_ARGUMENT, mpar_pipeline_get_params(NULL, 0, params));
    CTX_FAILS(g_ctx, MPAR_ERROR_INVALID_ARGUMENT, mpar_pipeline_get_params(g_pipe, -1, params));
    CTX_FAILS(g_ctx, MPAR_ERROR_INVALID_ARGUMENT, mpar_pipeline_get_params(g_pipe, 4, params));
    CTX_FAILS(g_ctx, MPAR_ERROR_INVALID_ARGUMENT, mpar_pipeline_get_params(g_pipe, INT_MAX, params));
    CTX_FAILS(g_ctx, MPAR_ERROR_INVALID_ARGUMENT, mpar_pipeline_get_params(g_pipe, 0, NULL));
    FAILS(MPAR_SUCCESS, mpar_pipeline_get_params(g_pipe, 1, NULL)); /* relu: nothing to copy */
    CTX_FAILS(g_ctx, MPAR_ERROR_INVALID_ARGUMENT, mpar_pipeline_set_params(g_pipe, 4, params));
    CTX_FAILS(g_ctx, MPAR_ERROR_INVALID_ARGUMENT, mpar_pipeline_set_params(g_pipe, 2, NULL));
    CTX_FAILS(g_ctx, MPAR_ERROR_INVALID_ARGUMENT, mpar_pipeline_get_grads(g_pipe, -7, params));
    CTX_FAILS(g_ctx, MPAR_ERROR_INVALID_ARGUMENT, mpar_pipeline_read_state(g_pipe, 0, (mpar_state_kind)4, params));
    CTX_FAILS(g_ctx, MPAR_ERROR_INVALID_ARGUMENT, mpar_pipeline_read_state(g_pipe, 0, (mpar_state_kind)-1, params));
    CTX_FAILS(g_ctx, MPAR_ERROR_INVALID_ARGUMENT, mpar_pipeline_write_state(g_pipe, 0, (mpar_state_kind)99, params));
    CTX_FAILS(g_ctx, MPAR_ERROR_INVALID_ARGUMENT, mpar_pipeline_write_state(g_pipe, 9, MPAR_STATE_MOMENT1, params));
    FAILS(MPAR_ERROR_INVALID_ARGUMENT, mpar_pipeline_read_state(NULL, 0, MPAR_STATE_PARAMS, params));
    /* step, getters, stats */
    FAILS(MPAR_ERROR_INVALID_ARGUMENT, mpar_pipeline_set_step(NULL, 3));
    CTX_FAILS(g_ctx, MPAR_ERROR_INVALID_ARGUMENT, mpar_pipeline_set_step(g_pipe, -1));
    CTX_FAILS(g_ctx, MPAR_ERROR_INVALID_ARGUMENT, mpar_pipeline_set_step(g_pipe, INT_MIN));
    assert_int_equal(mpar_pipeline_get_step(NULL), 0);
    assert_int_equal(mpar_pipeline_get_step(g_pipe), 1);
    /* a counter that cannot count another step: refused before any work,
       parameters unchanged, and the counter usable again once lowered */
    assert_int_equal(mpar_pipeline_set_step(g_pipe, INT_MAX), MPAR_SUCCESS);
    assert_int_equal(mpar_pipeline_get_params(g_pipe, 0, params), MPAR_SUCCESS);
    b.inputs = g_x, b.targets = g_y, b.samples = 8;
    CTX_FAILS(g_ctx, MPAR_ERROR_INVALID_STATE, mpar_pipeline_train_step(g_pipe, &b, &info));
    assert_non_null(strstr(mpar_last_error(g_ctx), "step counter is at its limit"));
    assert_int_equal(mpar_pipeline_compute_gradients(g_pipe, &b, &info), MPAR_SUCCESS);
    CTX_FAILS(g_ctx, MPAR_ERROR_INVALID_STATE, mpar_pipeline_apply_gradients(g_pipe, &info));
    assert_int_equal(mpar_pipeline_get_step(g_pipe), INT_MAX);
    {
        float after[64];
        assert_int_equal(mpar_pipeline_get_params(g_pipe, 0, after), MPAR_SUCCESS);
        assert_memory_equal(params, after, sizeof(float) * mpar_model_layer(g_model, 0)->param_count);
    }
    assert_int_equal(mpar_pipeline_set_step(g_pipe, 1), MPAR_SUCCESS);
    assert_null(mpar_pipeline_model(NULL));
    assert_null(mpar_pipeline_get_desc(NULL));
    FAILS(MPAR_ERROR_INVALID_ARGUMENT, mpar_pipeline_get_stats(NULL, &ps));
    FAILS(MPAR_ERROR_INVALID_ARGUMENT, mpar_pipeline_get_stats(g_pipe, NULL));
    FAILS(MPAR_ERROR_INVALID_ARGUMENT, mpar_pipeline_get_timeline(NULL, &t));
    FAILS(MPAR_ERROR_INVALID_ARGUMENT, mpar_pipeline_get_timeline(g_pipe, NULL));
    mpar_timeline_free(NULL);
#undef BAD_BATCH
}

/* Planning and measuring with bad arguments. */
static void test_pipeline_plan_bad_input(void** state) {
    mpar_stage_desc st[2];
    mpar_pipeline_desc pd = two_stage_desc(st, 0);
    mpar_plan_options o;
    mpar_plan plan;
    double flops[2] = {1e9, -1.0}, f, fw[70], bi[70], bw[70];
    mpar_model* big;
    mpar_model_desc md;
    int i;
    (void)state;
    pd.stages = NULL, pd.stage_count = 0;
    memset(&o, 0, sizeof o);
    o.device_flops = flops;
    FAILS(MPAR_ERROR_INVALID_ARGUMENT, mpar_pipeline_plan(NULL, g_model, &pd, &o, &plan));
    CTX_FAILS(g_ctx, MPAR_ERROR_INVALID_ARGUMENT, mpar_pipeline_plan(g_ctx, NULL, &pd, &o, &plan));
    CTX_FAILS(g_ctx, MPAR_ERROR_INVALID_ARGUMENT, mpar_pipeline_plan(g_ctx, g_model, NULL, &o, &plan));
    CTX_FAILS(g_ctx, MPAR_ERROR_INVALID_ARGUMENT, mpar_pipeline_plan(g_ctx, g_model, &pd, &o, NULL));
    CTX_FAILS(g_ctx, MPAR_ERROR_INVALID_ARGUMENT, mpar_pipeline_plan(g_ctx, g_model, &pd, &o, &plan)); /* flops < 0 */
    flops[1] = 1e9;
    pd.max_batch = 0;
    CTX_FAILS(g_ctx, MPAR_ERROR_INVALID_ARGUMENT, mpar_pipeline_plan(g_ctx, g_model, &pd, &o, &plan));
    pd.max_batch = 8;
    o.mode = MPAR_PLAN_PROPORTIONAL; /* weights NULL */
    CTX_FAILS(g_ctx, MPAR_ERROR_INVALID_ARGUMENT, mpar_pipeline_plan(g_ctx, g_model, &pd, &o, &plan));
    o.mode = MPAR_PLAN_OPTIMAL, o.use_devices = 3;
    CTX_FAILS(g_ctx, MPAR_ERROR_INVALID_ARGUMENT, mpar_pipeline_plan(g_ctx, g_model, &pd, &o, &plan));
    FAILS(MPAR_ERROR_INVALID_ARGUMENT, mpar_device_measure_flops(NULL, 0, &f));
    CTX_FAILS(g_ctx, MPAR_ERROR_INVALID_ARGUMENT, mpar_device_measure_flops(g_ctx, 2, &f));
    CTX_FAILS(g_ctx, MPAR_ERROR_INVALID_ARGUMENT, mpar_device_measure_flops(g_ctx, -1, &f));
    CTX_FAILS(g_ctx, MPAR_ERROR_INVALID_ARGUMENT, mpar_device_measure_flops(g_ctx, 0, NULL));
    FAILS(MPAR_ERROR_INVALID_ARGUMENT, mpar_profile_layers(NULL, g_model, &pd, 0, fw, bi, bw));
    CTX_FAILS(g_ctx, MPAR_ERROR_INVALID_ARGUMENT, mpar_profile_layers(g_ctx, NULL, &pd, 0, fw, bi, bw));
    CTX_FAILS(g_ctx, MPAR_ERROR_INVALID_ARGUMENT, mpar_profile_layers(g_ctx, g_model, NULL, 0, fw, bi, bw));
    CTX_FAILS(g_ctx, MPAR_ERROR_INVALID_ARGUMENT, mpar_profile_layers(g_ctx, g_model, &pd, 0, NULL, bi, bw));
    CTX_FAILS(g_ctx, MPAR_ERROR_INVALID_ARGUMENT, mpar_profile_layers(g_ctx, g_model, &pd, 0, fw, bi, NULL));
    CTX_FAILS(g_ctx, MPAR_ERROR_INVALID_ARGUMENT, mpar_profile_layers(g_ctx, g_model, &pd, 2, fw, bi, bw));
    pd.max_batch = 0;
    CTX_FAILS(g_ctx, MPAR_ERROR_INVALID_ARGUMENT, mpar_profile_layers(g_ctx, g_model, &pd, 0, fw, bi, bw));
    pd.max_batch = 8;
    /* more layers than profiling takes */
    memset(&md, 0, sizeof md);
    md.input_features = 4;
    assert_int_equal(mpar_model_create(&md, &big, NULL), MPAR_SUCCESS);
    for (i = 0; i < 68; i++) assert_int_equal(mpar_model_add_simple(big, mpar_layer_relu(), NULL), MPAR_SUCCESS);
    assert_int_equal(mpar_model_add_simple(big, mpar_layer_cross_entropy(), NULL), MPAR_SUCCESS);
    CTX_FAILS(g_ctx, MPAR_ERROR_UNSUPPORTED, mpar_profile_layers(g_ctx, big, &pd, 0, fw, bi, bw));
    mpar_model_destroy(big);
}

/* BUG: mpar_profile_layers does not check desc->max_batch. A negative one
   gives samples < 0, so (size_t)rows * width * 4 wraps to an allocation of
   about 2^64 bytes: MPAR_ERROR_OUT_OF_HOST_MEMORY from glibc, an abort
   under AddressSanitizer ("requested allocation size exceeds maximum").
   mpar_pipeline_plan and mpar_pipeline_create say MPAR_ERROR_INVALID_ARGUMENT. */
static int child_profile_negative_batch(void) {
    mpar_stage_desc st[2];
    mpar_pipeline_desc pd = two_stage_desc(st, 0);
    double fw[4], bi[4], bw[4];
    mpar_result r;
    pd.max_batch = -5;
    mark(g_ctx);
    r = mpar_profile_layers(g_ctx, g_model, &pd, 0, fw, bi, bw);
    if (r != MPAR_ERROR_INVALID_ARGUMENT || !fresh_detail(g_ctx)) {
        fprintf(stderr, "mpar_profile_layers(max_batch -5): %s, %s\n", mpar_result_string(r), mpar_last_error(g_ctx));
        return 1;
    }
    return 0;
}
static void test_profile_negative_batch(void** state) {
    (void)state;
    expect_child("mpar_profile_layers with max_batch -5", child_profile_negative_batch);
}

/* User layers whose kernels fail in each way mpar_exec_* can report. */
static int g_exec_mode;
static char g_stale[2048]; /* failures that left an older detail on the context */
static mpar_result exec_setup(mpar_layer* l, mpar_error* err) {
    (void)err;
    l->out_features = l->in_features;
    return MPAR_SUCCESS;
}
static mpar_result exec_copy(mpar_exec* ex, mpar_buf from, mpar_buf to, int n) {
    return mpar_exec_launch(ex, "elementwise.cl", "mpar_copy", (size_t)n, 0, "BBl", from, to, (size_t)n);
}
static mpar_result exec_forward(mpar_exec* ex, const mpar_layer* l, const mpar_io* io) {
    int n = io->rows * l->in_features;
    switch (g_exec_mode) {
    case 1: return mpar_exec_launch(ex, "no_such_file.cl", "k", 1, 0, "");
    case 2: return mpar_exec_launch(ex, "elementwise.cl", "no_such_kernel", 1, 0, "");
    case 3: return mpar_exec_launch(ex, "elementwise.cl", "mpar_copy", (size_t)n, 0, "BBz", io->x, io->y, (size_t)n);
    case 4: return mpar_exec_launch(ex, NULL, "mpar_copy", (size_t)n, 0, "BBl", io->x, io->y, (size_t)n);
    case 5: return mpar_exec_gemm(ex, 0, 0, (size_t)io->rows, 4, 0, 1.0f, io->x, 4, io->x, 4, 0.0f, io->y, 4);
    case 6: return mpar_exec_fail(ex, MPAR_ERROR_NUMERICAL, NULL);
    case 7: return mpar_exec_fail(ex, MPAR_ERROR_UNSUPPORTED, "the user layer says no");
    default:
        if (!mpar_exec_context(ex) || !mpar_exec_queue(ex)) return MPAR_ERROR_INVALID_STATE;
        return exec_copy(ex, io->x, io->y, n);
    }
}
static mpar_result exec_backward(mpar_exec* ex, const mpar_layer* l, const mpar_io* io) {
    if (!io->need_dx) return MPAR_SUCCESS;
    return exec_copy(ex, io->dy, io->dx, io->rows * l->in_features);
}

static void test_user_layer_failures(void** state) {
    static const mpar_layer_type faulty = {"faulty", 0, exec_setup, NULL, exec_forward, exec_backward, NULL};
    static const mpar_result want[8] = {MPAR_SUCCESS, MPAR_ERROR_KERNEL_NOT_FOUND, (mpar_result)CL_INVALID_KERNEL_NAME,
                                        MPAR_ERROR_INVALID_ARGUMENT, MPAR_ERROR_INVALID_ARGUMENT,
                                        MPAR_ERROR_INVALID_ARGUMENT, MPAR_ERROR_NUMERICAL, MPAR_ERROR_UNSUPPORTED};
    mpar_stage_desc st[2] = {{0, 0, 1}, {1, 2, 4}};
    mpar_pipeline_desc pd;
    mpar_pipeline* p = NULL;
    mpar_model* m;
    mpar_model_desc md;
    mpar_batch b;
    mpar_step_info info;
    mpar_buf nobuf;
    int mode;
    (void)state;
    nobuf.mem = NULL, nobuf.off = 0;
    FAILS(MPAR_ERROR_INVALID_ARGUMENT, mpar_exec_launch(NULL, "elementwise.cl", "mpar_copy", 1, 0, ""));
    FAILS(MPAR_ERROR_INVALID_ARGUMENT, mpar_exec_gemm(NULL, 0, 0, 1, 1, 1, 1.0f, nobuf, 1, nobuf, 1, 0.0f, nobuf, 1));
    assert_null(mpar_exec_context(NULL));
    assert_null(mpar_exec_queue(NULL));
    FAILS(MPAR_ERROR_IO, mpar_exec_fail(NULL, MPAR_ERROR_IO, "no exec"));
    memset(&md, 0, sizeof md);
    md.input_features = 4;
    assert_int_equal(mpar_model_create(&md, &m, NULL), MPAR_SUCCESS);
    assert_int_equal(mpar_model_add_linear(m, 4, NULL), MPAR_SUCCESS);
    assert_int_equal(mpar_model_add_simple(m, mpar_layer_relu(), NULL), MPAR_SUCCESS);
    assert_int_equal(mpar_model_add_simple(m, &faulty, NULL), MPAR_SUCCESS);
    assert_int_equal(mpar_model_add_linear(m, 3, NULL), MPAR_SUCCESS);
    assert_int_equal(mpar_model_add_simple(m, mpar_layer_cross_entropy(), NULL), MPAR_SUCCESS);
    memset(&pd, 0, sizeof pd);
    pd.stages = st, pd.stage_count = 2, pd.schedule = MPAR_SCHEDULE_GPIPE, pd.microbatches = 2, pd.max_batch = 8;
    assert_int_equal(mpar_pipeline_create(g_ctx, m, &pd, &p), MPAR_SUCCESS);
    b.inputs = g_x, b.targets = g_y, b.samples = 8;
    for (mode = 1; mode < 8; mode++) {
        mpar_result r;
        g_exec_mode = mode;
        mark(g_ctx);
        r = mpar_pipeline_train_step(p, &b, &info);
        if (r != want[mode])
            fail_msg("failure mode %d: %s, expected %s (%s)", mode, mpar_result_string(r), mpar_result_string(want[mode]),
                     mpar_last_error(g_ctx));
        assert_non_null(strstr(mpar_last_error(g_ctx), "stage 1"));
        if (!fresh_detail(g_ctx)) /* reported by test_error_detail_recorded */
            snprintf(g_stale + strlen(g_stale), sizeof g_stale - strlen(g_stale), "\n  a user layer's %s (%s)",
                     mode == 4 ? "mpar_exec_launch(ex, NULL file, ...)" : mode == 5 ? "mpar_exec_gemm(..., k = 0, ...)"
                                                                                    : "failure",
                     mpar_last_error(g_ctx));
        CTX_FAILS(g_ctx, MPAR_ERROR_INVALID_STATE, mpar_pipeline_apply_gradients(p, &info));
        /* and the pipeline still works afterwards */
        g_exec_mode = 0;
        if (mpar_pipeline_train_step(p, &b, &info) != MPAR_SUCCESS)
            fail_msg("after failure mode %d the next step failed: %s", mode, mpar_last_error(g_ctx));
    }
    assert_int_equal(mpar_pipeline_get_step(p), 7);
    mpar_pipeline_destroy(p);
    mpar_model_destroy(m);
}

/* A model of 10,000 layers: built, planned, and trained on two stages. */
static void test_ten_thousand_layers(void** state) {
    mpar_model* m;
    mpar_model_desc md;
    mpar_stage_desc st[2] = {{0, 0, 4999}, {1, 5000, 9999}};
    mpar_pipeline_desc pd;
    mpar_pipeline* p = NULL;
    mpar_plan_options o;
    mpar_plan plan;
    mpar_batch b;
    mpar_step_info info;
    double flops[2] = {1e9, 1e9}, loss;
    int i;
    (void)state;
    memset(&md, 0, sizeof md);
    md.input_features = 4;
    assert_int_equal(mpar_model_create(&md, &m, NULL), MPAR_SUCCESS);
    assert_int_equal(mpar_model_add_linear(m, 3, NULL), MPAR_SUCCESS);
    for (i = 0; i < 9998; i++)
        assert_int_equal(mpar_model_add_simple(m, i % 2 ? mpar_layer_relu() : mpar_layer_tanh(), NULL), MPAR_SUCCESS);
    assert_int_equal(mpar_model_add_simple(m, mpar_layer_cross_entropy(), NULL), MPAR_SUCCESS);
    assert_int_equal(mpar_model_layer_count(m), 10000);
    assert_int_equal(mpar_model_validate(m, NULL), MPAR_SUCCESS);
    memset(&pd, 0, sizeof pd);
    pd.stages = st, pd.stage_count = 2, pd.schedule = MPAR_SCHEDULE_1F1B, pd.microbatches = 2, pd.max_batch = 2;
    if (mpar_pipeline_create(g_ctx, m, &pd, &p) != MPAR_SUCCESS) fail_msg("%s", mpar_last_error(g_ctx));
    b.inputs = g_x, b.targets = g_y, b.samples = 2;
    if (mpar_pipeline_train_step(p, &b, &info) != MPAR_SUCCESS) fail_msg("%s", mpar_last_error(g_ctx));
    assert_true(isfinite(info.loss));
    assert_int_equal(mpar_pipeline_infer(p, &b, NULL, &loss), MPAR_SUCCESS);
    assert_true(isfinite(loss));
    CTX_FAILS(g_ctx, MPAR_ERROR_INVALID_ARGUMENT, mpar_pipeline_get_params(p, 10000, NULL));
    mpar_pipeline_destroy(p);
    memset(&o, 0, sizeof o);
    o.device_flops = flops;
    pd.stages = NULL, pd.stage_count = 0;
    if (mpar_pipeline_plan(g_ctx, m, &pd, &o, &plan) != MPAR_SUCCESS) fail_msg("%s", mpar_last_error(g_ctx));
    assert_true(plan.num_stages >= 1);
    assert_int_equal(plan.stages[plan.num_stages - 1].last_layer, 9999);
    mpar_plan_free(&plan);
    mpar_model_destroy(m);
}

/* ==== 9. timelines ==== */

static void test_timeline_bad_input(void** state) {
    mpar_stage_desc st[2];
    mpar_pipeline_desc pd = two_stage_desc(st, 1);
    mpar_pipeline* p = NULL;
    mpar_timeline t, bad;
    mpar_timeline_stats ts;
    mpar_timeline_link_stats ls;
    mpar_timeline_prediction pr;
    mpar_event ev;
    mpar_schedule* sc = (mpar_schedule*)&sc;
    mpar_simulation* sim = (mpar_simulation*)&sim;
    mpar_batch b;
    mpar_error e;
    FILE* devnull = fopen("/dev/null", "w");
    (void)state;
    assert_non_null(devnull);
    assert_int_equal(mpar_pipeline_create(g_ctx, g_model, &pd, &p), MPAR_SUCCESS);
    /* profiling on, but no step yet: an empty timeline */
    assert_int_equal(mpar_pipeline_get_timeline(p, &t), MPAR_SUCCESS);
    assert_int_equal(t.event_count, 0);
    mpar_timeline_free(&t);
    b.inputs = g_x, b.targets = g_y, b.samples = 8;
    assert_int_equal(mpar_pipeline_train_step(p, &b, NULL), MPAR_SUCCESS);
    assert_int_equal(mpar_pipeline_get_timeline(p, &t), MPAR_SUCCESS);
    assert_true(t.event_count > 0);

    ERR_FAILS(MPAR_ERROR_INVALID_ARGUMENT, mpar_timeline_get_stats(NULL, &ts, &e));
    ERR_FAILS(MPAR_ERROR_INVALID_ARGUMENT, mpar_timeline_get_stats(&t, NULL, &e));
    ERR_FAILS(MPAR_ERROR_INVALID_ARGUMENT, mpar_timeline_get_link_stats(&t, -1, 0, &ls, &e));
    ERR_FAILS(MPAR_ERROR_INVALID_ARGUMENT, mpar_timeline_get_link_stats(&t, mpar_timeline_link_count(&t) / 2, 0, &ls, &e));
    ERR_FAILS(MPAR_ERROR_INVALID_ARGUMENT, mpar_timeline_get_link_stats(&t, 0, 2, &ls, &e));
    ERR_FAILS(MPAR_ERROR_INVALID_ARGUMENT, mpar_timeline_get_link_stats(&t, 0, 0, NULL, &e));
    ERR_FAILS(MPAR_ERROR_INVALID_ARGUMENT, mpar_timeline_get_link_stats(NULL, 0, 0, &ls, &e));
    ERR_FAILS(MPAR_ERROR_INVALID_ARGUMENT, mpar_timeline_simulate(NULL, &sc, &sim, &e));
    assert_null(sc);
    assert_null(sim);
    assert_int_equal(mpar_timeline_simulate(&t, NULL, NULL, &e), MPAR_SUCCESS); /* both outputs optional */
    ERR_FAILS(MPAR_ERROR_INVALID_ARGUMENT, mpar_timeline_predict(&t, NULL, &e));
    ERR_FAILS(MPAR_ERROR_INVALID_ARGUMENT, mpar_timeline_predict(NULL, &pr, &e));
    ERR_FAILS(MPAR_ERROR_INVALID_ARGUMENT, mpar_timeline_check(NULL, 1e-3, &e));
    assert_int_equal(mpar_timeline_check(&t, NAN, NULL), mpar_timeline_check(&t, 0.0, NULL)); /* NaN: 0 */
    assert_int_equal(mpar_timeline_link_count(NULL), 0);
    FAILS(MPAR_ERROR_INVALID_ARGUMENT, mpar_timeline_write_chrome_trace(NULL, devnull));
    FAILS(MPAR_ERROR_INVALID_ARGUMENT, mpar_timeline_write_chrome_trace(&t, NULL));
    FAILS(MPAR_ERROR_INVALID_ARGUMENT, mpar_timeline_write_svg(NULL, devnull));
    FAILS(MPAR_ERROR_INVALID_ARGUMENT, mpar_timeline_write_svg(&t, NULL));
    mpar_timeline_print_gantt(NULL, devnull, 40);
    mpar_timeline_print_gantt(&t, NULL, 40);
    mpar_timeline_print_gantt(&t, devnull, INT_MIN);
    mpar_timeline_print_gantt(&t, devnull, INT_MAX);
    mpar_timeline_print_stats(NULL, devnull);
    mpar_timeline_print_stats(&t, NULL);

    /* hand-built timelines of a bad shape: refused, never read out of bounds */
#define BAD_TL(change)                                                                                           \
    do {                                                                                                         \
        bad = t;                                                                                                 \
        change;                                                                                                  \
        ERR_FAILS(MPAR_ERROR_INVALID_ARGUMENT, mpar_timeline_get_stats(&bad, &ts, &e));                          \
        ERR_FAILS(MPAR_ERROR_INVALID_ARGUMENT, mpar_timeline_check(&bad, 1e-3, &e));                             \
        ERR_FAILS(MPAR_ERROR_INVALID_ARGUMENT, mpar_timeline_simulate(&bad, NULL, NULL, &e));                    \
        FAILS(MPAR_ERROR_INVALID_ARGUMENT, mpar_timeline_write_svg(&bad, devnull));                              \
        mpar_timeline_print_gantt(&bad, devnull, 20);                                                            \
    } while (0)
    BAD_TL(bad.stages = 0);
    BAD_TL(bad.stages = MPAR_TIMELINE_MAX_STAGES + 1);
    BAD_TL(bad.virtual_stages = 0);
    BAD_TL(bad.microbatches = -1);
    BAD_TL(bad.event_count = -1);
    BAD_TL(bad.events = NULL);
    ev = t.events[0], ev.stage = 5, bad = t;
    BAD_TL((bad.events = &ev, bad.event_count = 1));
    ev = t.events[0], ev.end = ev.start - 1.0;
    BAD_TL((bad.events = &ev, bad.event_count = 1));
    ev = t.events[0], ev.start = NAN;
    BAD_TL((bad.events = &ev, bad.event_count = 1));
    ev = t.events[0], ev.kind = (mpar_event_kind)12;
    BAD_TL((bad.events = &ev, bad.event_count = 1));
    ev = t.events[0], ev.kind = MPAR_EVENT_SEND, ev.boundary = 1; /* 2 stages: boundary 0 only */
    BAD_TL((bad.events = &ev, bad.event_count = 1));
#undef BAD_TL
    mpar_timeline_free(&t);
    assert_null(t.events);
    mpar_timeline_free(&t); /* twice is harmless */
    mpar_pipeline_destroy(p);
    fclose(devnull);
}

/* BUG (undefined behaviour, seen under UBSan): mpar_timeline_link_count
   checks only stages >= 1 and virtual_stages >= 1, then computes
   2 * (stages * virtual_stages - 1) in int: virtual_stages = INT_MAX
   overflows (a plain build returns -6). The other timeline functions refuse
   such a shape (virtual_stages > 4096); this one should return 0. */
static int child_link_count_shape(void) {
    mpar_timeline t;
    int a, b, c;
    memset(&t, 0, sizeof t);
    t.stages = 2, t.virtual_stages = 2, t.microbatches = 1;
    a = mpar_timeline_link_count(&t);
    t.virtual_stages = INT_MAX;
    b = mpar_timeline_link_count(&t);
    t.stages = INT_MAX, t.virtual_stages = 1;
    c = mpar_timeline_link_count(&t);
    if (a == 6 && b == 0 && c == 0) return 0;
    fprintf(stderr, "mpar_timeline_link_count: 2x2 -> %d (want 6), 2xINT_MAX -> %d, INT_MAXx1 -> %d (want 0)\n", a, b, c);
    return 1;
}
static void test_timeline_link_count_shape(void** state) {
    (void)state;
    expect_child("mpar_timeline_link_count on a bad shape", child_link_count_shape);
}

/* ==== 10. checkpoints ==== */

static void test_checkpoint_bad_input(void** state) {
    char path[256], garbage_path[256];
    unsigned char junk[200];
    mpar_checkpoint_info info;
    mpar_error e;
    float out[64];
    FILE* f;
    unsigned char* data;
    long size;
    (void)state;
    snprintf(path, sizeof path, "%s/ok.ckpt", g_dir);
    ERR_FAILS(MPAR_ERROR_INVALID_ARGUMENT, mpar_pipeline_save_checkpoint(NULL, path, &e));
    CTX_FAILS(g_ctx, MPAR_ERROR_INVALID_ARGUMENT, mpar_pipeline_save_checkpoint(g_pipe, NULL, &e));
    CTX_FAILS(g_ctx, MPAR_ERROR_IO, mpar_pipeline_save_checkpoint(g_pipe, "/nonexistent-dir/x/y.ckpt", &e));
    CTX_FAILS(g_ctx, MPAR_ERROR_IO, mpar_pipeline_save_checkpoint(g_pipe, g_dir, &e)); /* a folder */
    FAILS(MPAR_ERROR_INVALID_ARGUMENT, mpar_pipeline_save_checkpoint(NULL, path, NULL));
    ERR_FAILS(MPAR_ERROR_INVALID_ARGUMENT, mpar_pipeline_load_checkpoint(NULL, path, &e));
    CTX_FAILS(g_ctx, MPAR_ERROR_INVALID_ARGUMENT, mpar_pipeline_load_checkpoint(g_pipe, NULL, &e));
    CTX_FAILS(g_ctx, MPAR_ERROR_IO, mpar_pipeline_load_checkpoint(g_pipe, "/nonexistent-dir/y.ckpt", &e));
    CTX_FAILS(g_ctx, MPAR_ERROR_IO, mpar_pipeline_load_checkpoint(g_pipe, g_dir, &e));
    snprintf(garbage_path, sizeof garbage_path, "%s/garbage.ckpt", g_dir);
    f = fopen(garbage_path, "wb");
    assert_non_null(f);
    memset(junk, 0xab, sizeof junk);
    fwrite(junk, 1, sizeof junk, f);
    fclose(f);
    CTX_FAILS(g_ctx, MPAR_ERROR_CORRUPT, mpar_pipeline_load_checkpoint(g_pipe, garbage_path, &e));
    f = fopen(garbage_path, "wb"); /* empty */
    fclose(f);
    CTX_FAILS(g_ctx, MPAR_ERROR_CORRUPT, mpar_pipeline_load_checkpoint(g_pipe, garbage_path, &e));

    /* parsing held bytes */
    ERR_FAILS(MPAR_ERROR_INVALID_ARGUMENT, mpar_checkpoint_parse(NULL, 100, &info, &e));
    assert_null(info.layers);
    ERR_FAILS(MPAR_ERROR_CORRUPT, mpar_checkpoint_parse(NULL, 0, &info, &e));
    ERR_FAILS(MPAR_ERROR_CORRUPT, mpar_checkpoint_parse(junk, sizeof junk, &info, &e));
    assert_null(info.layers);
    ERR_FAILS(MPAR_ERROR_CORRUPT, mpar_checkpoint_parse(junk, sizeof junk, NULL, &e));
    mpar_checkpoint_info_free(NULL);

    /* a real one, then bad layer indices and kinds */
    assert_int_equal(mpar_pipeline_save_checkpoint(g_pipe, path, &e), MPAR_SUCCESS);
    f = fopen(path, "rb");
    assert_non_null(f);
    fseek(f, 0, SEEK_END);
    size = ftell(f);
    fseek(f, 0, SEEK_SET);
    data = (unsigned char*)malloc((size_t)size);
    assert_int_equal(fread(data, 1, (size_t)size, f), (size_t)size);
    fclose(f);
    assert_int_equal(mpar_checkpoint_parse(data, (size_t)size, &info, &e), MPAR_SUCCESS);
    ERR_FAILS(MPAR_ERROR_CORRUPT, mpar_checkpoint_parse(data, (size_t)size - 1, NULL, &e));
    ERR_FAILS(MPAR_ERROR_INVALID_ARGUMENT, mpar_checkpoint_get_state(NULL, (size_t)size, &info, 0, MPAR_STATE_PARAMS, out, &e));
    ERR_FAILS(MPAR_ERROR_INVALID_ARGUMENT, mpar_checkpoint_get_state(data, (size_t)size, NULL, 0, MPAR_STATE_PARAMS, out, &e));
    ERR_FAILS(MPAR_ERROR_INVALID_ARGUMENT, mpar_checkpoint_get_state(data, (size_t)size, &info, -1, MPAR_STATE_PARAMS, out, &e));
    ERR_FAILS(MPAR_ERROR_INVALID_ARGUMENT, mpar_checkpoint_get_state(data, (size_t)size, &info, 4, MPAR_STATE_PARAMS, out, &e));
    ERR_FAILS(MPAR_ERROR_INVALID_ARGUMENT, mpar_checkpoint_get_state(data, (size_t)size, &info, 0, MPAR_STATE_GRADS, out, &e));
    ERR_FAILS(MPAR_ERROR_INVALID_ARGUMENT, mpar_checkpoint_get_state(data, (size_t)size, &info, 0, (mpar_state_kind)9, out, &e));
    ERR_FAILS(MPAR_ERROR_INVALID_ARGUMENT, mpar_checkpoint_get_state(data, (size_t)size, &info, 0, MPAR_STATE_PARAMS, NULL, &e));
    ERR_FAILS(MPAR_ERROR_INVALID_ARGUMENT, mpar_checkpoint_get_state(data, 10, &info, 0, MPAR_STATE_PARAMS, out, &e)); /* size shrunk */
    ERR_FAILS(MPAR_ERROR_INVALID_ARGUMENT, mpar_checkpoint_match(NULL, g_model, MPAR_OPTIMIZER_ADAMW, &e));
    ERR_FAILS(MPAR_ERROR_INVALID_ARGUMENT, mpar_checkpoint_match(&info, NULL, MPAR_OPTIMIZER_ADAMW, &e));
    ERR_FAILS(MPAR_ERROR_MISMATCH, mpar_checkpoint_match(&info, g_model, MPAR_OPTIMIZER_SGD, &e));
    ERR_FAILS(MPAR_ERROR_MISMATCH, mpar_checkpoint_match(&info, g_model, (mpar_optimizer_kind)5, &e));
    assert_int_equal(mpar_checkpoint_match(&info, g_model, MPAR_OPTIMIZER_ADAMW, &e), MPAR_SUCCESS);
    {
        mpar_model* other = make_model(4, 9, 3);
        ERR_FAILS(MPAR_ERROR_MISMATCH, mpar_checkpoint_match(&info, other, MPAR_OPTIMIZER_ADAMW, &e));
        mpar_model_destroy(other);
    }
    mpar_checkpoint_info_free(&info);
    assert_null(info.layers);
    ERR_FAILS(MPAR_ERROR_INVALID_ARGUMENT, mpar_checkpoint_get_state(data, (size_t)size, &info, 0, MPAR_STATE_PARAMS, out, &e));
    ERR_FAILS(MPAR_ERROR_INVALID_ARGUMENT, mpar_checkpoint_match(&info, g_model, MPAR_OPTIMIZER_ADAMW, &e));
    free(data);
    /* loading drops computed gradients: apply must not follow it */
    {
        mpar_batch b;
        mpar_step_info si;
        b.inputs = g_x, b.targets = g_y, b.samples = 8;
        assert_int_equal(mpar_pipeline_compute_gradients(g_pipe, &b, &si), MPAR_SUCCESS);
        assert_int_equal(mpar_pipeline_load_checkpoint(g_pipe, path, &e), MPAR_SUCCESS);
        CTX_FAILS(g_ctx, MPAR_ERROR_INVALID_STATE, mpar_pipeline_apply_gradients(g_pipe, &si));
    }
}

/* ==== error detail on the context ==== */

/* BUG (minor): these return MPAR_ERROR_INVALID_ARGUMENT with a context at
   hand but record nothing, so mpar_last_error still shows an older,
   unrelated failure (README: "mpar_last_error(ctx) gives the detail"). */
static void test_error_detail_recorded(void** state) {
    char missing[4096] = "";
    (void)state;
#define DETAIL(call)                                                                                             \
    do {                                                                                                         \
        mark(g_ctx);                                                                                             \
        (void)(call);                                                                                            \
        if (!fresh_detail(g_ctx)) strncat(missing, "\n  " #call, sizeof missing - strlen(missing) - 1);          \
    } while (0)
    DETAIL(mpar_context_get_stats(g_ctx, NULL));
    DETAIL(mpar_pipeline_get_stats(g_pipe, NULL));
    DETAIL(mpar_pipeline_get_timeline(g_pipe, NULL));
    DETAIL(mpar_pipeline_infer(g_pipe, NULL, NULL, NULL));
#undef DETAIL
    strncat(missing, g_stale, sizeof missing - strlen(missing) - 1);
    if (missing[0]) fail_msg("no detail recorded on the context by:%s", missing);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_basics),
        cmocka_unit_test(test_create_bad_input),
        cmocka_unit_test(test_env_devices_garbage),
        cmocka_unit_test(test_selection_index_overflow),
        cmocka_unit_test(test_context_queries),
        cmocka_unit_test(test_fault_spec),
        cmocka_unit_test(test_kernels_bad_input),
        cmocka_unit_test(test_kernel_find_small_buffer),
        cmocka_unit_test(test_kernel_path_is_folder),
        cmocka_unit_test(test_model_bad_input),
        cmocka_unit_test(test_planner_bad_input),
        cmocka_unit_test(test_schedule_bad_input),
        cmocka_unit_test(test_schedule_virtual_stage_range),
        cmocka_unit_test(test_pipeline_create_bad_input),
        cmocka_unit_test(test_pipeline_plan_without_stages),
        cmocka_unit_test(test_pipeline_int_limits),
        cmocka_unit_test(test_pipeline_calls_bad_input),
        cmocka_unit_test(test_pipeline_plan_bad_input),
        cmocka_unit_test(test_profile_negative_batch),
        cmocka_unit_test(test_user_layer_failures),
        cmocka_unit_test(test_ten_thousand_layers),
        cmocka_unit_test(test_timeline_bad_input),
        cmocka_unit_test(test_timeline_link_count_shape),
        cmocka_unit_test(test_checkpoint_bad_input),
        cmocka_unit_test(test_error_detail_recorded),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
