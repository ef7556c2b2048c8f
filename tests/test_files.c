/* The files mpar writes and reads, against what a hostile or careless
   neighbour leaves in a folder:
   (a) a link planted at the checkpoint's path: the save replaces the link,
       the file it pointed to keeps its bytes;
   (b) a FIFO at the path: load fails with MPAR_ERROR_IO at once (it used to
       block in open), save replaces it;
   (c) a name of NAME_MAX bytes saves and loads (the temporary name is
       short, not the name plus a suffix);
   (d) a temporary file left by a process that is gone is removed by the
       next save in that folder; one of a live process is left alone;
   (e) two pipelines saving to one path at once: every save that returns
       success leaves a file that loads;
   (f) a kernel cache file writable by others is not trusted: rejected and
       rebuilt, never loaded;
   (g) only names of exactly the temporary files' pattern are leftovers
       (mpar__tmp_name and mpar__leftover_pid are private and called
       directly: no public call parses or makes those names). */
#define MPAR_IMPLEMENTATION
#include "mpar.h"

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdlib.h>
#include <dirent.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>
#include <cmocka.h>
#include "fixture.h"

const char* __lsan_default_suppressions(void);
const char* __lsan_default_suppressions(void) { return "leak:libpocl.so\nleak:libLLVM\n"; }

static char g_dir[64];
static mpar_context* g_ctx;
static mpar_model* g_model;

/* 6 -> linear 8 -> relu -> linear 3 -> cross-entropy */
static mpar_model* make_model(void) {
    static const int widths[] = {6, 8, 3};
    return fx_mlp(widths, 3, mpar_layer_relu(), 3);
}

/* layers 0-1 on device 0, 2-3 on device 1, AdamW, one step taken */
static mpar_pipeline* make_pipe(void) {
    mpar_pipeline_desc pd;
    mpar_pipeline* p;
    mpar_stage_desc st[2];
    float x[8 * 6];
    int32_t y[8];
    mpar_batch b;
    int i;
    fx_stages(st, 2, 4);
    pd = fx_pipeline_desc(st, 2, MPAR_SCHEDULE_1F1B, 2, 8);
    pd.optimizer.kind = MPAR_OPTIMIZER_ADAMW;
    p = fx_pipeline(g_ctx, g_model, &pd);
    for (i = 0; i < 8 * 6; i++) x[i] = (float)(i % 7) / 7.0f;
    for (i = 0; i < 8; i++) y[i] = i % 3;
    b.inputs = x, b.targets = y, b.samples = 8;
    assert_int_equal(mpar_pipeline_train_step(p, &b, NULL), MPAR_SUCCESS);
    return p;
}

static int setup(void** state) {
    mpar_desc d;
    (void)state;
    snprintf(g_dir, sizeof g_dir, "/tmp/mpar_files_XXXXXX");
    if (!mkdtemp(g_dir)) return -1;
    memset(&d, 0, sizeof d); /* the kernels found as a user's would be: no kernel_path */
    if (fx_context_desc(&d, 2, &g_ctx) != 0) return -1;
    g_model = make_model();
    return 0;
}

static int teardown(void** state) {
    char cmd[128];
    (void)state;
    mpar_model_destroy(g_model);
    mpar_destroy(g_ctx);
    snprintf(cmd, sizeof cmd, "rm -rf %s", g_dir);
    return system(cmd) != 0;
}

static void spit(const char* path, const char* data) {
    FILE* f = fopen(path, "wb");
    assert_non_null(f);
    fputs(data, f);
    fclose(f);
}
static int same_text(const char* path, const char* want) {
    char buf[256] = {0};
    FILE* f = fopen(path, "rb");
    size_t n;
    if (!f) return 0;
    n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    return n == strlen(want) && !memcmp(buf, want, n);
}

static int temp_files(void) {
    DIR* d = opendir(g_dir);
    struct dirent* e;
    int n = 0;
    while (d && (e = readdir(d)) != NULL) n += strncmp(e->d_name, ".mpar-", 6) == 0;
    if (d) closedir(d);
    return n;
}

/* (a) */
static void test_planted_link(void** state) {
    char path[200], victim[200];
    struct stat st;
    mpar_pipeline* p = make_pipe();
    mpar_error err;
    (void)state;
    snprintf(path, sizeof path, "%s/link.ckpt", g_dir);
    snprintf(victim, sizeof victim, "%s/victim.txt", g_dir);
    spit(victim, "someone else's file\n");
    assert_int_equal(symlink(victim, path), 0);
    assert_int_equal(mpar_pipeline_save_checkpoint(p, path, &err), MPAR_SUCCESS);
    assert_int_equal(lstat(path, &st), 0);
    assert_true(S_ISREG(st.st_mode)); /* the link was replaced by the checkpoint */
    assert_true(same_text(victim, "someone else's file\n"));
    assert_int_equal(mpar_pipeline_load_checkpoint(p, path, &err), MPAR_SUCCESS);
    assert_int_equal(temp_files(), 0);
    mpar_pipeline_destroy(p);
}

/* (b) */
static void test_fifo(void** state) {
    char path[200];
    struct stat st;
    mpar_pipeline* p = make_pipe();
    mpar_error err;
    (void)state;
    snprintf(path, sizeof path, "%s/fifo.ckpt", g_dir);
    assert_int_equal(mkfifo(path, 0644), 0);
    assert_int_equal(mpar_pipeline_load_checkpoint(p, path, &err), MPAR_ERROR_IO);
    assert_non_null(strstr(err.message, "not a regular file"));
    assert_int_equal(mpar_pipeline_save_checkpoint(p, path, &err), MPAR_SUCCESS);
    assert_int_equal(lstat(path, &st), 0);
    assert_true(S_ISREG(st.st_mode));
    assert_int_equal(mpar_pipeline_load_checkpoint(p, path, &err), MPAR_SUCCESS);
    mpar_pipeline_destroy(p);
}

/* (c) */
static void test_longest_name(void** state) {
    char path[600], name[NAME_MAX + 1];
    mpar_pipeline* p = make_pipe();
    mpar_error err;
    (void)state;
    memset(name, 'n', NAME_MAX);
    name[NAME_MAX] = '\0';
    snprintf(path, sizeof path, "%s/%s", g_dir, name);
    if (mpar_pipeline_save_checkpoint(p, path, &err) != MPAR_SUCCESS) fail_msg("%s", err.message);
    assert_int_equal(mpar_pipeline_load_checkpoint(p, path, &err), MPAR_SUCCESS);
    unlink(path);
    mpar_pipeline_destroy(p);
}

/* (d) */
static void test_leftovers(void** state) {
    char path[200], dead[200], alive[200];
    mpar_pipeline* p = make_pipe();
    mpar_error err;
    pid_t child = fork();
    (void)state;
    assert_true(child >= 0);
    if (child == 0) _exit(0);
    assert_int_equal(waitpid(child, NULL, 0), child); /* its pid now names no process */
    snprintf(path, sizeof path, "%s/left.ckpt", g_dir);
    snprintf(dead, sizeof dead, "%s/.mpar-%ld-AbC123", g_dir, (long)child);
    snprintf(alive, sizeof alive, "%s/.mpar-%ld-XyZ789", g_dir, (long)getpid());
    spit(dead, "half a checkpoint");
    spit(alive, "a save in progress");
    assert_int_equal(mpar_pipeline_save_checkpoint(p, path, &err), MPAR_SUCCESS);
    assert_int_equal(access(dead, F_OK), -1);
    assert_int_equal(access(alive, F_OK), 0);
    unlink(alive);
    assert_int_equal(temp_files(), 0);
    mpar_pipeline_destroy(p);
}

/* (e) */
typedef struct saver {
    mpar_pipeline* p;
    const char* path;
    int failures;
} saver;
static void* save_loop(void* arg) {
    saver* s = (saver*)arg;
    mpar_error err;
    int i;
    for (i = 0; i < 40; i++)
        if (mpar_pipeline_save_checkpoint(s->p, s->path, &err) != MPAR_SUCCESS) s->failures++;
    return NULL;
}
static void test_two_savers(void** state) {
    char path[200];
    saver a, b;
    pthread_t ta, tb;
    mpar_pipeline* check = make_pipe();
    mpar_error err;
    int round;
    (void)state;
    snprintf(path, sizeof path, "%s/shared.ckpt", g_dir);
    a.p = make_pipe(), b.p = make_pipe();
    for (round = 0; round < 3; round++) {
        a.path = b.path = path, a.failures = b.failures = 0;
        pthread_create(&ta, NULL, save_loop, &a);
        pthread_create(&tb, NULL, save_loop, &b);
        pthread_join(ta, NULL);
        pthread_join(tb, NULL);
        assert_int_equal(a.failures + b.failures, 0);
        if (mpar_pipeline_load_checkpoint(check, path, &err) != MPAR_SUCCESS) fail_msg("round %d: %s", round, err.message);
    }
    assert_int_equal(temp_files(), 0);
    mpar_pipeline_destroy(a.p), mpar_pipeline_destroy(b.p), mpar_pipeline_destroy(check);
}

/* (f) */
static void test_untrusted_kernel_cache(void** state) {
    char cache[200], cmd[400];
    mpar_desc d;
    mpar_error err;
    mpar_context* ctx;
    mpar_context_stats s;
    mpar_pipeline_desc pd;
    mpar_pipeline* p;
    mpar_stage_desc st = {0, 0, 3};
    (void)state;
    snprintf(cache, sizeof cache, "%s/kcache", g_dir);
    memset(&d, 0, sizeof d);
    d.error = &err, d.cache_dir = cache;
    d.cpu_route = MPAR_CPU_ROUTE_OPENCL; /* kernels to build and cache, not host code */
    memset(&pd, 0, sizeof pd);
    pd.stages = &st, pd.stage_count = 1, pd.max_batch = 4;
    /* fill the cache */
    assert_int_equal(mpar_create(&d, &ctx), MPAR_SUCCESS);
    assert_int_equal(mpar_pipeline_create(ctx, g_model, &pd, &p), MPAR_SUCCESS);
    mpar_pipeline_destroy(p);
    assert_int_equal(mpar_context_get_stats(ctx, &s), MPAR_SUCCESS);
    assert_true(s.cache_written > 0);
    mpar_destroy(ctx);
    /* trusted as written */
    assert_int_equal(mpar_create(&d, &ctx), MPAR_SUCCESS);
    assert_int_equal(mpar_pipeline_create(ctx, g_model, &pd, &p), MPAR_SUCCESS);
    mpar_pipeline_destroy(p);
    assert_int_equal(mpar_context_get_stats(ctx, &s), MPAR_SUCCESS);
    assert_true(s.programs_from_cache > 0);
    assert_int_equal(s.cache_rejected, 0);
    assert_int_equal(s.programs_built, 0);
    mpar_destroy(ctx);
    /* writable by everyone: never loaded, rebuilt and rewritten */
    snprintf(cmd, sizeof cmd, "chmod 0666 %s/*.bin", cache);
    assert_int_equal(system(cmd), 0);
    assert_int_equal(mpar_create(&d, &ctx), MPAR_SUCCESS);
    assert_int_equal(mpar_pipeline_create(ctx, g_model, &pd, &p), MPAR_SUCCESS);
    mpar_pipeline_destroy(p);
    assert_int_equal(mpar_context_get_stats(ctx, &s), MPAR_SUCCESS);
    assert_int_equal(s.programs_from_cache, 0);
    assert_true(s.cache_rejected > 0);
    assert_true(s.programs_built > 0);
    mpar_destroy(ctx);
}

/* (g) Which folder entries count as leftovers: exactly the names
   mpar__tmp_name and mkstemp make. strtol once took a sign, spaces, and a
   pid beyond pid_t (cast to a wrapped, possibly negative one: kill() on a
   process group); tests/fuzz/fuzz_tmpname.c checks the same at random. */
static void test_leftover_names(void** state) {
    static const char* refused[] = {".mpar-+12-abcdef", ".mpar- 12-abcdef", ".mpar--12-abcdef", ".mpar-012-abcdef",
                                    ".mpar-0-abcdef",   ".mpar-2147483648-abcdef", ".mpar-4294967297-abcdef",
                                    ".mpar-12-abcde",   ".mpar-12-abcdefg", ".mpar-12-abc.ef", ".mpar-12abcdef",
                                    ".mpar-12-",        ".mpar-",         "mpar-12-abcdef",  ".mpar-99999999999999999999-abcdef"};
    char made[64];
    volatile size_t short_size;
    size_t i;
    (void)state;
    for (i = 0; i < sizeof refused / sizeof refused[0]; i++)
        if (mpar__leftover_pid(refused[i]) != -1) fail_msg("'%s' was taken for a leftover", refused[i]);
    assert_int_equal(mpar__leftover_pid(".mpar-1-aZ09Qx"), 1);
    assert_int_equal(mpar__leftover_pid(".mpar-2147483647-XyZ789"), INT_MAX);
    assert_int_equal(mpar__tmp_name("d", 4321, made, sizeof made), 0);
    assert_string_equal(made, "d/.mpar-4321-XXXXXX");
    assert_int_equal(mpar__leftover_pid(made + 2), 4321); /* mkstemp's template is six letters itself */
    memcpy(made + strlen(made) - 6, "Ab3dE9", 6);
    assert_int_equal(mpar__leftover_pid(made + 2), 4321);
    short_size = 19; /* one byte short (volatile: gcc would warn of the truncation the call refuses) */
    assert_int_equal(mpar__tmp_name("d", 4321, made, short_size), -1);
    short_size = 20;
    assert_int_equal(mpar__tmp_name("d", 4321, made, short_size), 0);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_leftover_names),
        cmocka_unit_test(test_planted_link), cmocka_unit_test(test_fifo),
        cmocka_unit_test(test_longest_name), cmocka_unit_test(test_leftovers),
        cmocka_unit_test(test_two_savers),   cmocka_unit_test(test_untrusted_kernel_cache),
    };
    alarm(120); /* a blocking open must fail the suite, not hang it (it runs in seconds) */
    return cmocka_run_group_tests(tests, setup, teardown);
}
