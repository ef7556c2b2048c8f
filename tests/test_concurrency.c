/* Pipelines and stages that run at the same time:
   - two independent pipelines in one process (each on its own context)
     run their first steps at once: no lock shared by the process holds one
     while the other waits (a test layer in each waits, up to a timeout, for
     the other to arrive);
   - two stages of one pipeline fail at the same instant with different
     codes and details: the call returns the code of the stage its message
     names, and that stage's own detail; mpar_last_error is read by another
     thread meanwhile (make check runs this under ThreadSanitizer).
   Needs two devices (POCL_DEVICES="basic basic"). */
#define MPAR_IMPLEMENTATION
#include "mpar.h"

#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>
#include <time.h>

#include "fixture.h"
#include "stall_layer.h"

const char* __lsan_default_suppressions(void) { return "leak:libpocl.so\nleak:libLLVM\n"; }

enum { IN = 8, BATCH = 8 };
static float g_x[BATCH * IN];
static int32_t g_y[BATCH];

/* ---- a rendezvous between two threads, with a timeout ---- */
static pthread_mutex_t g_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t g_cv = PTHREAD_COND_INITIALIZER;
static int g_arrived, g_round, g_timed_out;

static void rendezvous_reset(void) {
    pthread_mutex_lock(&g_mu);
    g_arrived = 0, g_timed_out = 0;
    g_round++;
    pthread_mutex_unlock(&g_mu);
}

/* Returns 1 when both arrived within `seconds`. */
static int rendezvous(double seconds) {
    struct timespec ts;
    int ok = 1;
    clock_gettime(CLOCK_REALTIME, &ts);
    ts.tv_sec += (time_t)seconds;
    pthread_mutex_lock(&g_mu);
    g_arrived++;
    pthread_cond_broadcast(&g_cv);
    while (g_arrived < 2 && ok) ok = pthread_cond_timedwait(&g_cv, &g_mu, &ts) == 0 || g_arrived >= 2;
    if (!ok) g_timed_out = 1;
    pthread_mutex_unlock(&g_mu);
    return ok;
}

/* A copy layer whose first training forward of a step waits for the other
   pipeline's (or, in the failure test, fails). */
static int g_fail_mode; /* 0: meet and go on; 1: meet, then fail; 2: just copy */
static mpar_result meet_forward(mpar_exec* ex, const mpar_layer* l, const mpar_io* io) {
    size_t n = (size_t)io->rows * (size_t)l->in_features;
    /* failure test: layer 1 (stage 0) at its second micro-batch, layer 3
       (stage 1) at its first: the two run at the same time */
    int mine = g_fail_mode ? ((l->index == 1 && io->row_offset == BATCH / 2) || (l->index == 3 && io->row_offset == 0))
                           : io->row_offset == 0;
    if (io->training && mine && g_fail_mode != 2) {
        int met = rendezvous(g_fail_mode ? 10.0 : 60.0); /* first steps: cold kernel caches compile here */
        if (g_fail_mode) {
            char msg[64];
            snprintf(msg, sizeof msg, "the meet layer %d says no", l->index);
            return mpar_exec_fail(ex, l->index == 1 ? MPAR_ERROR_IO : MPAR_ERROR_UNSUPPORTED, msg);
        }
        if (!met) return mpar_exec_fail(ex, MPAR_ERROR_TIMEOUT, "the other pipeline never arrived");
    }
    return mpar_exec_launch(ex, "elementwise.cl", "mpar_copy", n, 0, "BBl", io->x, io->y, n);
}
/* setup and backward: tests/stall_layer.h's copy layer */
static const mpar_layer_type meet_type = {"meet", 0, stall_setup, NULL, meet_forward, stall_backward, NULL};

/* linear, meet, linear, meet, linear, cross-entropy */
static mpar_model* make_model(void) {
    mpar_model* m = NULL;
    mpar_model_desc md;
    mpar_layer_desc meet;
    memset(&md, 0, sizeof md);
    md.input_features = IN, md.seed = 5;
    memset(&meet, 0, sizeof meet);
    meet.type = &meet_type;
    assert_int_equal(mpar_model_create(&md, &m, NULL), MPAR_SUCCESS);
    assert_int_equal(mpar_model_add_linear(m, IN, NULL), MPAR_SUCCESS);
    assert_int_equal(mpar_model_add(m, &meet, NULL), MPAR_SUCCESS);
    assert_int_equal(mpar_model_add_linear(m, IN, NULL), MPAR_SUCCESS);
    assert_int_equal(mpar_model_add(m, &meet, NULL), MPAR_SUCCESS);
    assert_int_equal(mpar_model_add_linear(m, 4, NULL), MPAR_SUCCESS);
    assert_int_equal(mpar_model_add_simple(m, mpar_layer_cross_entropy(), NULL), MPAR_SUCCESS);
    return m;
}

/* a context of one device, `device` of those found */
static mpar_context* make_context(int device) {
    mpar_desc d;
    char spec[16];
    memset(&d, 0, sizeof d); /* no kernel_path: found as a user's would be */
    snprintf(spec, sizeof spec, "%d", device);
    d.devices = spec;
    return fx_context_or_fail(&d, 1);
}

/* a context of two devices */
static mpar_context* make_context2(void) {
    mpar_desc d;
    memset(&d, 0, sizeof d);
    return fx_context_or_fail(&d, 2);
}

/* the model's 6 layers on `stages` devices (0-5, or 0-2 and 3-5), a 30 s
   timeout */
static mpar_pipeline* make_pipeline(mpar_context* ctx, const mpar_model* m, int stages, mpar_schedule_kind kind) {
    mpar_stage_desc st[2];
    mpar_pipeline_desc pd;
    fx_stages(st, stages, 6);
    pd = fx_pipeline_desc(st, stages, kind, 2, BATCH);
    pd.timeout_seconds = 30;
    return fx_pipeline(ctx, m, &pd);
}

typedef struct job {
    mpar_pipeline* p;
    mpar_result r;
} job;

static void* train_one(void* arg) {
    job* j = (job*)arg;
    mpar_batch b;
    mpar_step_info info;
    b.inputs = g_x, b.targets = g_y, b.samples = BATCH;
    j->r = mpar_pipeline_train_step(j->p, &b, &info);
    return NULL;
}

static mpar_pipeline* one_stage_pipeline(mpar_context* ctx, const mpar_model* m) {
    return make_pipeline(ctx, m, 1, MPAR_SCHEDULE_1F1B);
}

static void test_two_pipelines_at_once(void** state) {
    mpar_model* m = make_model();
    mpar_context *a = make_context(0), *b = make_context(1);
    mpar_pipeline *pa = one_stage_pipeline(a, m), *pb = one_stage_pipeline(b, m);
    job ja = {pa, MPAR_SUCCESS}, jb = {pb, MPAR_SUCCESS};
    pthread_t ta, tb;
    int round;
    (void)state;
    g_fail_mode = 0;
    /* the first step of each is a first run (kernels one stage at a time on
       PoCL); the second is not */
    for (round = 0; round < 2; round++) {
        rendezvous_reset();
        assert_int_equal(pthread_create(&ta, NULL, train_one, &ja), 0);
        assert_int_equal(pthread_create(&tb, NULL, train_one, &jb), 0);
        pthread_join(ta, NULL), pthread_join(tb, NULL);
        if (ja.r != MPAR_SUCCESS || jb.r != MPAR_SUCCESS)
            fail_msg("step %d: %s / %s", round, mpar_last_error(a), mpar_last_error(b));
        assert_false(g_timed_out);
    }
    mpar_pipeline_destroy(pa), mpar_pipeline_destroy(pb);
    mpar_destroy(a), mpar_destroy(b);
    mpar_model_destroy(m);
}

/* Reads mpar_last_error over and over while the stages fail. */
static int g_stop_reader; /* under g_mu */
static int reader_stopped(void) {
    int v;
    pthread_mutex_lock(&g_mu);
    v = g_stop_reader;
    pthread_mutex_unlock(&g_mu);
    return v;
}
static void* read_errors(void* arg) {
    mpar_context* ctx = (mpar_context*)arg;
    size_t total = 0;
    while (!reader_stopped()) total += strlen(mpar_last_error(ctx));
    return (void*)(uintptr_t)(total & 1);
}

static void test_concurrent_failures(void** state) {
    mpar_model* m = make_model();
    mpar_context* ctx = make_context2();
    mpar_pipeline* p = make_pipeline(ctx, m, 2, MPAR_SCHEDULE_GPIPE);
    pthread_t reader;
    int round, named[2] = {0, 0};
    (void)state;
    {   /* a first step of a shape runs one stage at a time on PoCL: warm up */
        mpar_batch b;
        mpar_step_info info;
        g_fail_mode = 2;
        b.inputs = g_x, b.targets = g_y, b.samples = BATCH;
        if (mpar_pipeline_train_step(p, &b, &info) != MPAR_SUCCESS) fail_msg("warm-up: %s", mpar_last_error(ctx));
    }
    g_fail_mode = 1;
    pthread_mutex_lock(&g_mu);
    g_stop_reader = 0;
    pthread_mutex_unlock(&g_mu);
    assert_int_equal(pthread_create(&reader, NULL, read_errors, ctx), 0);
    for (round = 0; round < 12; round++) {
        mpar_batch b;
        mpar_step_info info;
        mpar_result r;
        const char* e;
        int stage = -1;
        rendezvous_reset();
        b.inputs = g_x, b.targets = g_y, b.samples = BATCH;
        r = mpar_pipeline_train_step(p, &b, &info);
        e = mpar_last_error(ctx);
        assert_false(g_timed_out); /* both stages did fail at once */
        /* the message names one stage, carries that stage's own detail,
           and the call returns that stage's code */
        if (strncmp(e, "stage 0 ", 8) == 0) stage = 0;
        else if (strncmp(e, "stage 1 ", 8) == 0) stage = 1;
        else fail_msg("round %d: message names no stage: %s", round, e);
        if (!strstr(e, stage == 0 ? "the meet layer 1 says no" : "the meet layer 3 says no"))
            fail_msg("round %d: stage %d's message carries another detail: %s", round, stage, e);
        assert_int_equal(r, stage == 0 ? MPAR_ERROR_IO : MPAR_ERROR_UNSUPPORTED);
        assert_int_equal(strstr(e, stage == 0 ? "layer 3" : "layer 1") == NULL, 1);
        named[stage]++;
    }
    pthread_mutex_lock(&g_mu);
    g_stop_reader = 1;
    pthread_mutex_unlock(&g_mu);
    pthread_join(reader, NULL);
    print_message("first failure named stage 0 %d times, stage 1 %d times\n", named[0], named[1]);
    g_fail_mode = 2;
    /* the pipeline still trains after the failures */
    {
        mpar_batch b;
        mpar_step_info info;
        b.inputs = g_x, b.targets = g_y, b.samples = BATCH;
        if (mpar_pipeline_train_step(p, &b, &info) != MPAR_SUCCESS) fail_msg("after: %s", mpar_last_error(ctx));
    }
    mpar_pipeline_destroy(p);
    mpar_destroy(ctx);
    mpar_model_destroy(m);
}

/* Two threads calling train_step on one pipeline: each call either runs
   or returns MPAR_ERROR_INVALID_STATE at once ("another thread is in ...");
   nothing hangs (they used to deadlock in the job hand-off), and the step
   counter counts exactly the calls that ran. */
typedef struct racer {
    mpar_pipeline* p;
    int ok, refused, other;
} racer;
static void* race_steps(void* arg) {
    racer* r = (racer*)arg;
    int i;
    for (i = 0; i < 40; i++) {
        mpar_batch b;
        mpar_step_info info;
        mpar_result res;
        b.inputs = g_x, b.targets = g_y, b.samples = BATCH;
        res = mpar_pipeline_train_step(r->p, &b, &info);
        if (res == MPAR_SUCCESS) r->ok++;
        else if (res == MPAR_ERROR_INVALID_STATE) r->refused++;
        else r->other++;
    }
    return NULL;
}
static void test_two_threads_one_pipeline(void** state) {
    mpar_model* m = make_model();
    mpar_context* ctx = make_context2();
    mpar_pipeline* p;
    pthread_t t[2];
    racer r[2];
    int k;
    (void)state;
    g_fail_mode = 2;
    p = make_pipeline(ctx, m, 2, MPAR_SCHEDULE_1F1B);
    memset(r, 0, sizeof r);
    for (k = 0; k < 2; k++) r[k].p = p, assert_int_equal(pthread_create(&t[k], NULL, race_steps, &r[k]), 0);
    for (k = 0; k < 2; k++) pthread_join(t[k], NULL);
    print_message("two threads: %d + %d steps ran, %d + %d refused\n", r[0].ok, r[1].ok, r[0].refused, r[1].refused);
    assert_int_equal(r[0].other + r[1].other, 0);
    assert_int_equal(r[0].ok + r[1].ok + r[0].refused + r[1].refused, 80);
    assert_int_equal(mpar_pipeline_get_step(p), r[0].ok + r[1].ok);
    if (r[0].refused + r[1].refused > 0 && !strstr(mpar_last_error(ctx), "another thread is in"))
        fail_msg("a refusal that does not say why: %s", mpar_last_error(ctx));
    {   /* and a lone call still runs */
        mpar_batch b;
        b.inputs = g_x, b.targets = g_y, b.samples = BATCH;
        assert_int_equal(mpar_pipeline_train_step(p, &b, NULL), MPAR_SUCCESS);
    }
    mpar_pipeline_destroy(p);
    mpar_destroy(ctx);
    mpar_model_destroy(m);
}

int main(void) {
    const struct CMUnitTest tests[] = {cmocka_unit_test(test_two_pipelines_at_once),
                                       cmocka_unit_test(test_concurrent_failures),
                                       cmocka_unit_test(test_two_threads_one_pipeline)};
    int i;
    for (i = 0; i < BATCH * IN; i++) g_x[i] = (float)((i * 37) % 17) / 17.0f - 0.5f;
    for (i = 0; i < BATCH; i++) g_y[i] = i % 4;
    return cmocka_run_group_tests_name("concurrency", tests, NULL, NULL);
}
