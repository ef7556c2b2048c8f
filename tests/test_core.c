/* Foundation tests: result strings, device enumeration and selection,
   contexts and queues, kernel search, build errors and the binary cache.
   Run by scripts/run-tests.sh on two devices of one platform and again on
   two platforms (MPAR_TEST_PLATFORMS=2). */
#define MPAR_IMPLEMENTATION
#include "mpar.h"

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

static mpar_context* make_ctx(const char* devices, int per_device, const char* kernel_path, const char* cache_dir) {
    mpar_desc d;
    mpar_error err;
    mpar_context* ctx = NULL;
    memset(&d, 0, sizeof d);
    d.devices = devices;
    d.context_per_device = per_device;
    d.kernel_path = kernel_path;
    d.cache_dir = cache_dir;
    d.disable_cache = cache_dir == NULL;
    d.error = &err;
    err.message[0] = '\0';
    if (mpar_create(&d, &ctx) != MPAR_SUCCESS) fail_msg("mpar_create: %s", err.message);
    return ctx;
}

/* Fills n floats with `value` through kernels/elementwise.cl on `device`. */
static void fill_and_check(mpar_context* ctx, int device, float value) {
    cl_context cc = NULL;
    cl_command_queue q = NULL;
    cl_kernel k;
    cl_int st;
    cl_mem buf;
    float host[64];
    cl_ulong n = 64, off = 0;
    int i;
    assert_int_equal(mpar_device_get_cl(ctx, device, NULL, &cc, &q), MPAR_SUCCESS);
    if (mpar_kernel_create(ctx, device, "elementwise.cl", "mpar_fill", &k) != MPAR_SUCCESS)
        fail_msg("kernel: %s", mpar_last_error(ctx));
    buf = clCreateBuffer(cc, CL_MEM_READ_WRITE, sizeof host, NULL, &st);
    assert_int_equal(st, CL_SUCCESS);
    {
        size_t global = (size_t)n;
        assert_int_equal(clSetKernelArg(k, 0, sizeof buf, &buf), CL_SUCCESS);
        assert_int_equal(clSetKernelArg(k, 1, sizeof off, &off), CL_SUCCESS);
        assert_int_equal(clSetKernelArg(k, 2, sizeof n, &n), CL_SUCCESS);
        assert_int_equal(clSetKernelArg(k, 3, sizeof value, &value), CL_SUCCESS);
        assert_int_equal(clEnqueueNDRangeKernel(q, k, 1, NULL, &global, NULL, 0, NULL, NULL), CL_SUCCESS);
    }
    assert_int_equal(clEnqueueReadBuffer(q, buf, CL_TRUE, 0, sizeof host, host, 0, NULL, NULL), CL_SUCCESS);
    for (i = 0; i < (int)n; i++) assert_true(host[i] == value);
    clReleaseMemObject(buf);
    clReleaseKernel(k);
}

static void test_result_strings(void** state) {
    (void)state;
    assert_string_equal(mpar_result_string(MPAR_SUCCESS), "MPAR_SUCCESS");
    assert_string_equal(mpar_result_string(MPAR_ERROR_KERNEL_BUILD), "MPAR_ERROR_KERNEL_BUILD");
    assert_string_equal(mpar_result_string((mpar_result)CL_INVALID_VALUE), "CL_INVALID_VALUE");
    assert_string_equal(mpar_result_string((mpar_result)CL_OUT_OF_RESOURCES), "CL_OUT_OF_RESOURCES");
    assert_non_null(strstr(mpar_result_string((mpar_result)-1021), "CLBlast"));
    assert_string_equal(mpar_result_string((mpar_result)12345), "unknown mpar_result");
}

static void test_list_devices(void** state) {
    mpar_device_info info[16];
    mpar_error err;
    int n = 0, i, platforms = 0, want = getenv("MPAR_TEST_PLATFORMS") ? atoi(getenv("MPAR_TEST_PLATFORMS")) : 1;
    (void)state;
    assert_int_equal(mpar_list_devices(info, 16, &n, &err), MPAR_SUCCESS);
    assert_true(n >= 2);
    for (i = 0; i < n; i++) {
        assert_int_equal(info[i].global_index, i);
        assert_true(info[i].name[0] != '\0');
        assert_true(info[i].platform[0] != '\0');
        assert_true(info[i].global_mem_bytes > 0);
        assert_true(info[i].max_alloc_bytes > 0 && info[i].max_alloc_bytes <= info[i].global_mem_bytes);
        assert_true(info[i].compute_units >= 1);
        assert_non_null(strstr(info[i].version, "OpenCL"));
        if (info[i].platform_index + 1 > platforms) platforms = info[i].platform_index + 1;
    }
    assert_true(platforms >= want);
    /* a short capacity still reports the total */
    assert_int_equal(mpar_list_devices(info, 1, &n, &err), MPAR_SUCCESS);
    assert_true(n >= 2);
    assert_int_equal(mpar_list_devices(NULL, 4, &n, &err), MPAR_ERROR_INVALID_ARGUMENT);
    assert_int_equal(mpar_list_devices(info, 4, NULL, NULL), MPAR_ERROR_INVALID_ARGUMENT);
}

/* Every selected device runs a kernel from kernels/, in a shared context
   (or one per platform) and in one context per device. */
static void test_kernel_on_every_device(void** state) {
    int per_device, i, want = getenv("MPAR_TEST_PLATFORMS") ? atoi(getenv("MPAR_TEST_PLATFORMS")) : 1;
    (void)state;
    for (per_device = 0; per_device <= 1; per_device++) {
        mpar_context* ctx = make_ctx("all", per_device, NULL, NULL);
        mpar_device_info a, b;
        assert_true(mpar_device_count(ctx) >= 2);
        assert_int_equal(mpar_device_get_info(ctx, 0, &a), MPAR_SUCCESS);
        assert_int_equal(mpar_device_get_info(ctx, 1, &b), MPAR_SUCCESS);
        /* one platform shares a context unless asked; two platforms never do */
        if (per_device || want >= 2) assert_int_not_equal(a.group, b.group);
        else assert_int_equal(a.group, b.group);
        for (i = 0; i < mpar_device_count(ctx); i++) fill_and_check(ctx, i, 1.5f + (float)i);
        mpar_destroy(ctx);
    }
}

static void expect_create_error(const char* devices, mpar_result code, const char* text) {
    mpar_desc d;
    mpar_error err;
    mpar_context* ctx = (mpar_context*)&d; /* must be reset to NULL */
    memset(&d, 0, sizeof d);
    d.devices = devices;
    d.disable_cache = 1;
    d.error = &err;
    assert_int_equal(mpar_create(&d, &ctx), code);
    assert_null(ctx);
    assert_int_equal(err.code, code);
    if (!strstr(err.message, text)) fail_msg("'%s' not in '%s'", text, err.message);
}

static void test_selection(void** state) {
    mpar_context* ctx;
    mpar_device_info info;
    (void)state;
    ctx = make_ctx("1", 0, NULL, NULL);
    assert_int_equal(mpar_device_count(ctx), 1);
    assert_int_equal(mpar_device_get_info(ctx, 0, &info), MPAR_SUCCESS);
    assert_int_equal(info.global_index, 1);
    mpar_destroy(ctx);
    /* order as written */
    ctx = make_ctx("1, 0", 0, NULL, NULL);
    assert_int_equal(mpar_device_count(ctx), 2);
    assert_int_equal(mpar_device_get_info(ctx, 0, &info), MPAR_SUCCESS);
    assert_int_equal(info.global_index, 1);
    mpar_destroy(ctx);
    ctx = make_ctx("0-1", 0, NULL, NULL);
    assert_int_equal(mpar_device_count(ctx), 2);
    mpar_destroy(ctx);
    ctx = make_ctx("cpu", 0, NULL, NULL);
    assert_true(mpar_device_count(ctx) >= 2);
    mpar_destroy(ctx);
    ctx = make_ctx("name:BASIC", 0, NULL, NULL);
    assert_true(mpar_device_count(ctx) >= 2);
    mpar_destroy(ctx);
    ctx = make_ctx("p0", 0, NULL, NULL);
    assert_true(mpar_device_count(ctx) >= 1);
    mpar_destroy(ctx);
    /* the environment variable is used when the descriptor says nothing */
    setenv("MPAR_DEVICES", "1", 1);
    ctx = make_ctx(NULL, 0, NULL, NULL);
    assert_int_equal(mpar_device_count(ctx), 1);
    mpar_destroy(ctx);
    unsetenv("MPAR_DEVICES");
    /* a device selected twice is refused, not silently merged (issue 17) */
    expect_create_error("1, 0 ,1", MPAR_ERROR_INVALID_SELECTION, "device 1 (");
    expect_create_error("0,0", MPAR_ERROR_INVALID_SELECTION, "is selected twice (again by '0')");
    expect_create_error("0-1,cpu", MPAR_ERROR_INVALID_SELECTION, "selected twice (again by 'cpu')");
    setenv("MPAR_DEVICES", "0,0", 1);
    expect_create_error(NULL, MPAR_ERROR_INVALID_SELECTION, "device 0 (");
    unsetenv("MPAR_DEVICES");
    expect_create_error("17", MPAR_ERROR_NO_DEVICE, "device index 17 does not exist");
    expect_create_error("gpu", MPAR_ERROR_NO_DEVICE, "'gpu' matches none");
    expect_create_error("no-such-vendor", MPAR_ERROR_NO_DEVICE, "'no-such-vendor' matches none");
    expect_create_error("0,,1", MPAR_ERROR_INVALID_SELECTION, "empty term");
    expect_create_error("1-0", MPAR_ERROR_INVALID_SELECTION, "runs backwards");
}

static void free_one(void* user, void* p) { (void)user; free(p); }

static void test_bad_arguments(void** state) {
    mpar_context* ctx = make_ctx("0", 0, NULL, NULL);
    mpar_device_info info;
    mpar_desc d;
    cl_program prog;
    (void)state;
    memset(&d, 0, sizeof d);
    assert_int_equal(mpar_create(NULL, &ctx), MPAR_ERROR_INVALID_ARGUMENT);
    assert_int_equal(mpar_create(&d, NULL), MPAR_ERROR_INVALID_ARGUMENT);
    assert_int_equal(mpar_device_get_info(ctx, 5, &info), MPAR_ERROR_INVALID_ARGUMENT);
    assert_non_null(strstr(mpar_last_error(ctx), "device 5 does not exist"));
    assert_int_equal(mpar_device_get_info(ctx, -1, &info), MPAR_ERROR_INVALID_ARGUMENT);
    assert_int_equal(mpar_device_get_info(ctx, 0, NULL), MPAR_ERROR_INVALID_ARGUMENT);
    assert_int_equal(mpar_program_get(ctx, 0, NULL, &prog), MPAR_ERROR_INVALID_ARGUMENT);
    assert_int_equal(mpar_device_count(NULL), 0);
    assert_non_null(mpar_last_error(NULL));
    mpar_destroy(NULL);
    mpar_destroy(ctx);
    d.allocator.alloc = NULL;
    d.allocator.free = free_one;
    assert_int_equal(mpar_create(&d, &ctx), MPAR_ERROR_INVALID_ARGUMENT);
}

static char tmp_root[256];

static void write_file(const char* path, const char* text) {
    FILE* f = fopen(path, "wb");
    assert_non_null(f);
    fputs(text, f);
    fclose(f);
}

static void test_missing_kernel(void** state) {
    mpar_context* ctx = make_ctx("0", 0, tmp_root, NULL);
    cl_program prog;
    (void)state;
    assert_int_equal(mpar_program_get(ctx, 0, "no_such_file.cl", &prog), MPAR_ERROR_KERNEL_NOT_FOUND);
    assert_non_null(strstr(mpar_last_error(ctx), "no_such_file.cl"));
    assert_non_null(strstr(mpar_last_error(ctx), tmp_root)); /* says where it looked */
    mpar_destroy(ctx);
}

static void test_build_failure(void** state) {
    char path[512];
    mpar_context* ctx;
    cl_program prog;
    mpar_device_info info;
    (void)state;
    memset(&info, 0, sizeof info);
    snprintf(path, sizeof path, "%s/broken.cl", tmp_root);
    write_file(path, "__kernel void broken(__global float* y) { y[0] = undeclared_thing + 1.0f; }\n");
    ctx = make_ctx("0", 0, tmp_root, NULL);
    assert_int_equal(mpar_device_get_info(ctx, 0, &info), MPAR_SUCCESS);
    assert_int_equal(mpar_program_get(ctx, 0, "broken.cl", &prog), MPAR_ERROR_KERNEL_BUILD);
    assert_non_null(strstr(mpar_last_error(ctx), "broken.cl"));
    assert_non_null(strstr(mpar_last_error(ctx), info.name));
    assert_non_null(strstr(mpar_last_error(ctx), "undeclared_thing")); /* the build log */
    /* the context stays usable */
    fill_and_check(ctx, 0, 3.0f);
    mpar_destroy(ctx);
}

static int count_cache_files(const char* dir, char* last, size_t size) {
    char cmd[600];
    FILE* p;
    int n = 0;
    snprintf(cmd, sizeof cmd, "ls %s 2>/dev/null", dir);
    p = popen(cmd, "r");
    if (!p) return -1;
    while (fgets(last, (int)size, p)) {
        last[strcspn(last, "\n")] = '\0';
        n++;
    }
    pclose(p);
    return n;
}

static void corrupt_file(const char* path, long at) {
    FILE* f = fopen(path, "r+b");
    int c;
    assert_non_null(f);
    if (at < 0) {
        fseek(f, 0, SEEK_END);
        at = ftell(f) / 2;
    }
    fseek(f, at, SEEK_SET);
    c = fgetc(f);
    fseek(f, at, SEEK_SET);
    fputc(c ^ 0x5a, f);
    fclose(f);
}

static void test_binary_cache(void** state) {
    char dir[512], name[512], file[1100];
    mpar_context* ctx;
    mpar_context_stats st;
    (void)state;
    snprintf(dir, sizeof dir, "%s/cache/sub", tmp_root); /* created on demand */
    ctx = make_ctx("0", 0, NULL, dir);
    fill_and_check(ctx, 0, 1.0f);
    mpar_context_get_stats(ctx, &st);
    assert_int_equal(st.programs_built, 1);
    assert_int_equal(st.programs_from_cache, 0);
    assert_int_equal(st.cache_written, 1);
    mpar_destroy(ctx);
    assert_int_equal(count_cache_files(dir, name, sizeof name), 1);

    ctx = make_ctx("0", 0, NULL, dir); /* second build: from the cache */
    fill_and_check(ctx, 0, 2.0f);
    mpar_context_get_stats(ctx, &st);
    assert_int_equal(st.programs_built, 0);
    assert_int_equal(st.programs_from_cache, 1);
    assert_int_equal(st.cache_rejected, 0);
    mpar_destroy(ctx);

    snprintf(file, sizeof file, "%s/%s", dir, name); /* corrupt payload: ignored, rebuilt */
    corrupt_file(file, -1);
    ctx = make_ctx("0", 0, NULL, dir);
    fill_and_check(ctx, 0, 4.0f);
    mpar_context_get_stats(ctx, &st);
    assert_int_equal(st.cache_rejected, 1);
    assert_int_equal(st.programs_built, 1);
    assert_int_equal(st.programs_from_cache, 0);
    assert_int_equal(st.cache_written, 1); /* rewritten, good again */
    mpar_destroy(ctx);

    corrupt_file(file, 2); /* bad magic */
    ctx = make_ctx("0", 0, NULL, dir);
    fill_and_check(ctx, 0, 5.0f);
    mpar_context_get_stats(ctx, &st);
    assert_int_equal(st.cache_rejected, 1);
    mpar_destroy(ctx);

    assert_int_equal(truncate(file, 40), 0); /* truncated */
    ctx = make_ctx("0", 0, NULL, dir);
    fill_and_check(ctx, 0, 6.0f);
    mpar_context_get_stats(ctx, &st);
    assert_int_equal(st.cache_rejected, 1);
    assert_int_equal(st.programs_built, 1);
    mpar_destroy(ctx);
}

/* A run-time allocator sees every allocation and gets all of it back. */
static long live_blocks;
static void* count_alloc(void* user, size_t n) { (void)user; live_blocks++; return malloc(n); }
static void* count_realloc(void* user, void* p, size_t n) { (void)user; if (!p) live_blocks++; return realloc(p, n); }
static void count_free(void* user, void* p) { (void)user; if (p) live_blocks--; free(p); }
static int log_lines;
static void count_log(void* user, mpar_log_level level, const char* msg) { (void)user; (void)level; (void)msg; log_lines++; }

static void test_allocator_and_log(void** state) {
    mpar_desc d;
    mpar_context* ctx;
    cl_program prog;
    (void)state;
    memset(&d, 0, sizeof d);
    d.devices = "0";
    d.disable_cache = 1;
    d.allocator.alloc = count_alloc;
    d.allocator.realloc = count_realloc;
    d.allocator.free = count_free;
    d.log = count_log;
    assert_int_equal(mpar_create(&d, &ctx), MPAR_SUCCESS);
    assert_true(live_blocks > 0);
    assert_true(log_lines >= 1);
    fill_and_check(ctx, 0, 7.0f);
    assert_int_equal(mpar_program_get(ctx, 0, "missing.cl", &prog), MPAR_ERROR_KERNEL_NOT_FOUND);
    mpar_destroy(ctx);
    assert_int_equal(live_blocks, 0);
}

static int setup(void** state) {
    (void)state;
    snprintf(tmp_root, sizeof tmp_root, "/tmp/mpar-test-XXXXXX");
    return mkdtemp(tmp_root) ? 0 : -1;
}
static int teardown(void** state) {
    char cmd[300];
    (void)state;
    snprintf(cmd, sizeof cmd, "rm -rf %s", tmp_root);
    return system(cmd) == 0 ? 0 : -1;
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_result_strings),   cmocka_unit_test(test_list_devices),
        cmocka_unit_test(test_kernel_on_every_device), cmocka_unit_test(test_selection),
        cmocka_unit_test(test_bad_arguments),    cmocka_unit_test(test_missing_kernel),
        cmocka_unit_test(test_build_failure),    cmocka_unit_test(test_binary_cache),
        cmocka_unit_test(test_allocator_and_log),
    };
    return cmocka_run_group_tests_name("core", tests, setup, teardown);
}
