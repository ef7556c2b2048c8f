/* Checkpoint tests: resuming from a checkpoint in another partition gives
   the same losses and parameters bit for bit; every single-byte error,
   truncation and trailing byte is rejected without touching the pipeline;
   another model or optimizer is a mismatch naming the difference; failed
   saves leave the old file in place. */
#define MPAR_IMPLEMENTATION
#include "mpar.h"

#include <dirent.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <sys/resource.h>
#include <cmocka.h>

const char* __lsan_default_suppressions(void);
const char* __lsan_default_suppressions(void) { return "leak:libpocl.so\nleak:libLLVM\n"; }

enum { MAXIN = 8, BATCH = 12, M = 4 };

static mpar_context* g_ctx;
static char g_dir[256];
static float g_x[BATCH * MAXIN];
static int32_t g_y[BATCH];

static void path_in(char* out, size_t n, const char* name) { snprintf(out, n, "%s/%s", g_dir, name); }

static int setup(void** state) {
    mpar_desc d;
    mpar_error err;
    uint64_t s = 11;
    int i;
    (void)state;
    memset(&d, 0, sizeof d);
    d.error = &err;
    if (mpar_create(&d, &g_ctx) != MPAR_SUCCESS) {
        fprintf(stderr, "mpar_create: %s\n", err.message);
        return -1;
    }
    snprintf(g_dir, sizeof g_dir, "/tmp/mpar_ckpt_XXXXXX");
    if (!mkdtemp(g_dir)) return -1;
    for (i = 0; i < BATCH * MAXIN; i++) g_x[i] = (float)(2.0 * mpar__rng_uniform(&s) - 1.0);
    for (i = 0; i < BATCH; i++) g_y[i] = (int32_t)(mpar__rng_next(&s) % 3);
    return 0;
}

static int teardown(void** state) {
    DIR* dir = opendir(g_dir);
    struct dirent* e;
    (void)state;
    while (dir && (e = readdir(dir)) != NULL) {
        char p[512];
        if (e->d_name[0] == '.') continue;
        snprintf(p, sizeof p, "%s/%s", g_dir, e->d_name);
        if (remove(p) != 0) {
            char q[600];
            snprintf(q, sizeof q, "rm -rf '%s'", p); /* a folder made by a test */
            if (system(q) != 0) fprintf(stderr, "could not remove %s\n", p);
        }
    }
    if (dir) closedir(dir);
    rmdir(g_dir);
    mpar_destroy(g_ctx);
    return 0;
}

/* in -> linear(hid) -> dropout -> relu -> linear(out) -> cross entropy */
static mpar_model* make_model(int in, int hid, int out, uint64_t seed) {
    mpar_model* m = NULL;
    mpar_model_desc md;
    mpar_layer_desc drop;
    mpar_error err;
    memset(&md, 0, sizeof md);
    md.input_features = in;
    md.seed = seed;
    assert_int_equal(mpar_model_create(&md, &m, &err), MPAR_SUCCESS);
    memset(&drop, 0, sizeof drop);
    drop.type = mpar_layer_dropout();
    drop.rate = 0.25f;
    assert_int_equal(mpar_model_add_linear(m, hid, &err), MPAR_SUCCESS);
    assert_int_equal(mpar_model_add(m, &drop, &err), MPAR_SUCCESS);
    assert_int_equal(mpar_model_add_simple(m, mpar_layer_relu(), &err), MPAR_SUCCESS);
    assert_int_equal(mpar_model_add_linear(m, out, &err), MPAR_SUCCESS);
    assert_int_equal(mpar_model_add_simple(m, mpar_layer_cross_entropy(), &err), MPAR_SUCCESS);
    return m;
}

/* `stages` stages from device `dev0` on, layers split evenly. */
static mpar_pipeline* make_pipeline(mpar_model* m, int stages, int dev0, mpar_schedule_kind kind,
                                    mpar_optimizer_kind opt) {
    mpar_stage_desc st[8];
    mpar_pipeline_desc pd;
    mpar_pipeline* p = NULL;
    int L = mpar_model_layer_count(m), j;
    for (j = 0; j < stages; j++) {
        st[j].device = (dev0 + j) % mpar_device_count(g_ctx);
        st[j].first_layer = L * j / stages;
        st[j].last_layer = L * (j + 1) / stages - 1;
    }
    memset(&pd, 0, sizeof pd);
    pd.stages = st;
    pd.stage_count = stages;
    pd.schedule = kind;
    pd.microbatches = M;
    pd.max_batch = BATCH;
    pd.optimizer.kind = opt;
    pd.optimizer.lr = 0.02f;
    pd.optimizer.momentum = 0.9f;
    pd.optimizer.weight_decay = 0.01f;
    pd.optimizer.warmup_steps = 2;
    if (mpar_pipeline_create(g_ctx, m, &pd, &p) != MPAR_SUCCESS) fail_msg("create: %s", mpar_last_error(g_ctx));
    return p;
}

static double train(mpar_pipeline* p) {
    mpar_batch b;
    mpar_step_info info;
    b.inputs = g_x, b.targets = g_y, b.samples = BATCH;
    if (mpar_pipeline_train_step(p, &b, &info) != MPAR_SUCCESS) fail_msg("step: %s", mpar_last_error(g_ctx));
    return info.loss;
}

/* Every layer's PARAMS, MOMENT1, MOMENT2, concatenated (3 × param count floats). */
static float* snapshot(mpar_pipeline* p) {
    const mpar_model* m = mpar_pipeline_model(p);
    float* s = (float*)malloc(sizeof(float) * (3 * mpar_model_param_count(m) + 1));
    size_t at = 0;
    int i, k;
    for (i = 0; i < mpar_model_layer_count(m); i++)
        for (k = 0; k < 3; k++) {
            mpar_state_kind kind = k == 0 ? MPAR_STATE_PARAMS : k == 1 ? MPAR_STATE_MOMENT1 : MPAR_STATE_MOMENT2;
            assert_int_equal(mpar_pipeline_read_state(p, i, kind, s + at), MPAR_SUCCESS);
            at += mpar_model_layer(m, i)->param_count;
        }
    return s;
}

static int same_floats(const float* a, const float* b, size_t n) { return memcmp(a, b, n * sizeof(float)) == 0; }

static unsigned char* read_all(const char* path, size_t* size) {
    FILE* f = fopen(path, "rb");
    unsigned char* d;
    long n;
    assert_non_null(f);
    fseek(f, 0, SEEK_END);
    n = ftell(f);
    fseek(f, 0, SEEK_SET);
    d = (unsigned char*)malloc((size_t)n + 1);
    assert_int_equal(fread(d, 1, (size_t)n, f), (size_t)n);
    fclose(f);
    *size = (size_t)n;
    return d;
}

static void write_all(const char* path, const void* d, size_t n) {
    FILE* f = fopen(path, "wb");
    assert_non_null(f);
    assert_int_equal(fwrite(d, 1, n, f), n);
    assert_int_equal(fclose(f), 0);
}

static void save_ok(mpar_pipeline* p, const char* path) {
    mpar_error err;
    if (mpar_pipeline_save_checkpoint(p, path, &err) != MPAR_SUCCESS) fail_msg("save: %s", err.message);
}

static void load_ok(mpar_pipeline* p, const char* path) {
    mpar_error err;
    if (mpar_pipeline_load_checkpoint(p, path, &err) != MPAR_SUCCESS) fail_msg("load: %s", err.message);
}

static void all_params(mpar_pipeline* p, float* out) {
    const mpar_model* m = mpar_pipeline_model(p);
    int i;
    for (i = 0; i < mpar_model_layer_count(m); i++) {
        assert_int_equal(mpar_pipeline_get_params(p, i, out), MPAR_SUCCESS);
        out += mpar_model_layer(m, i)->param_count;
    }
}

/* Resume in another partition and schedule: the same L4, L5 and Q, bit for
   bit. Then the controls: dropping the step or a moment on load changes the
   result, so this comparison can fail. */
static void test_round_trip(void** state) {
    mpar_model* m = make_model(6, 16, 3, 99);
    size_t np = mpar_model_param_count(m);
    float *q = (float*)malloc(np * sizeof(float)), *q2 = (float*)malloc(np * sizeof(float));
    double l4, l5;
    char path[400];
    int variant;
    mpar_pipeline* a = make_pipeline(m, 2, 0, MPAR_SCHEDULE_1F1B, MPAR_OPTIMIZER_ADAMW);
    (void)state;
    path_in(path, sizeof path, "round.ckpt");
    train(a), train(a), train(a);
    save_ok(a, path);
    l4 = train(a), l5 = train(a);
    all_params(a, q);
    mpar_pipeline_destroy(a);
    /* 0: a plain resume; 1: the step not restored; 2: MOMENT1 of layer 0 lost */
    for (variant = 0; variant < 3; variant++) {
        mpar_pipeline* b = make_pipeline(m, 1, 1, MPAR_SCHEDULE_GPIPE, MPAR_OPTIMIZER_ADAMW);
        double b4, b5;
        load_ok(b, path);
        assert_int_equal(mpar_pipeline_get_step(b), 3);
        if (variant == 1) mpar_pipeline_set_step(b, 0);
        if (variant == 2) {
            float* zero = (float*)calloc(mpar_model_layer(m, 0)->param_count, sizeof(float));
            assert_int_equal(mpar_pipeline_write_state(b, 0, MPAR_STATE_MOMENT1, zero), MPAR_SUCCESS);
            free(zero);
        }
        b4 = train(b), b5 = train(b);
        all_params(b, q2);
        if (variant == 0) {
            if (b4 != l4 || b5 != l5) fail_msg("losses after resume differ: %.17g %.17g vs %.17g %.17g", b4, b5, l4, l5);
            assert_true(same_floats(q, q2, np));
        } else {
            assert_false(same_floats(q, q2, np)); /* the control shows the state matters */
            if (variant == 1) assert_true(b4 != l4);
        }
        mpar_pipeline_destroy(b);
    }
    free(q), free(q2);
    mpar_model_destroy(m);
}

/* The tiny model of the corruption tests, and a pipeline holding its state. */
typedef struct tiny {
    mpar_model* model;
    mpar_pipeline* victim; /* loads are tried on it */
    float* before;         /* its state before every try */
    unsigned char* good;   /* a checkpoint saved from another pipeline */
    size_t size;
    float* good_state;     /* that checkpoint's state */
} tiny;

static void tiny_make(tiny* t) {
    mpar_pipeline* src;
    char path[400];
    t->model = make_model(3, 5, 3, 7);
    src = make_pipeline(t->model, 2, 0, MPAR_SCHEDULE_1F1B, MPAR_OPTIMIZER_ADAMW);
    train(src), train(src);
    path_in(path, sizeof path, "tiny.ckpt");
    save_ok(src, path);
    t->good_state = snapshot(src);
    mpar_pipeline_destroy(src);
    t->good = read_all(path, &t->size);
    t->victim = make_pipeline(t->model, 2, 1, MPAR_SCHEDULE_GPIPE, MPAR_OPTIMIZER_ADAMW);
    train(t->victim); /* a state different from the checkpoint's */
    t->before = snapshot(t->victim);
}

static void tiny_free(tiny* t) {
    mpar_pipeline_destroy(t->victim);
    mpar_model_destroy(t->model);
    free(t->before), free(t->good), free(t->good_state);
}

/* The victim's state is exactly what it was before the try. */
static void expect_unchanged(tiny* t, const char* what) {
    float* now = snapshot(t->victim);
    if (!same_floats(now, t->before, 3 * mpar_model_param_count(t->model)) || mpar_pipeline_get_step(t->victim) != 1)
        fail_msg("%s: a rejected load changed the pipeline", what);
    free(now);
}

/* Writes `d` to a file, loads it into the victim and checks the outcome:
   rejected (CORRUPT/MISMATCH, the victim unchanged; the in-memory parser
   agrees) or harmless (loads exactly the good state). Returns 1 if rejected. */
static int try_load(tiny* t, const unsigned char* d, size_t n, const char* what) {
    char path[400];
    mpar_error err, perr;
    mpar_result r, pr;
    mpar_checkpoint_info info;
    path_in(path, sizeof path, "try.ckpt");
    write_all(path, d, n);
    r = mpar_pipeline_load_checkpoint(t->victim, path, &err);
    pr = mpar_checkpoint_parse(d, n, &info, &perr);
    if (pr == MPAR_SUCCESS) {
        assert_non_null(info.layers);
        mpar_checkpoint_info_free(&info);
    } else {
        assert_null(info.layers);
    }
    if (r == MPAR_SUCCESS) {
        float* now = snapshot(t->victim);
        if (!same_floats(now, t->good_state, 3 * mpar_model_param_count(t->model)))
            fail_msg("%s: loaded, but to different values", what);
        free(now);
        /* put the victim back */
        assert_int_equal(mpar_pipeline_set_step(t->victim, 1), MPAR_SUCCESS);
        {
            const mpar_model* m = t->model;
            size_t at = 0;
            int i, k;
            for (i = 0; i < mpar_model_layer_count(m); i++)
                for (k = 0; k < 3; k++) {
                    assert_int_equal(mpar_pipeline_write_state(t->victim, i, (mpar_state_kind)(k == 0 ? 0 : k + 1),
                                                               t->before + at), MPAR_SUCCESS);
                    at += mpar_model_layer(m, i)->param_count;
                }
        }
        return 0;
    }
    if (r != MPAR_ERROR_CORRUPT && r != MPAR_ERROR_MISMATCH)
        fail_msg("%s: load returned %s: %s", what, mpar_result_string(r), err.message);
    if (pr == MPAR_SUCCESS && r == MPAR_ERROR_CORRUPT) fail_msg("%s: the parser accepts what load rejects", what);
    if (r == MPAR_ERROR_CORRUPT && (pr != MPAR_ERROR_CORRUPT || !strstr(err.message, "offset") ||
                                   !strstr(err.message, path)))
        fail_msg("%s: the message does not say where: %s", what, err.message);
    expect_unchanged(t, what);
    return 1;
}

static void test_every_byte_flip(void** state) {
    tiny t;
    size_t i;
    int rejected = 0, harmless = 0, mode;
    (void)state;
    tiny_make(&t);
    assert_true(t.size < 4096);
    assert_int_equal(try_load(&t, t.good, t.size, "the unmodified file"), 0); /* the harness accepts good files */
    for (mode = 0; mode < 2; mode++)
        for (i = 0; i < t.size; i++) {
            unsigned char* d = (unsigned char*)malloc(t.size);
            char what[64];
            memcpy(d, t.good, t.size);
            d[i] = mode == 0 ? (unsigned char)(d[i] ^ 0xFF) : (unsigned char)(d[i] + 1);
            snprintf(what, sizeof what, "byte %lu %s", (unsigned long)i, mode == 0 ? "^ 0xFF" : "+ 1");
            if (try_load(&t, d, t.size, what)) rejected++;
            else harmless++;
            free(d);
        }
    print_message("byte flips over %lu bytes: %d rejected, %d harmless\n", (unsigned long)t.size, rejected, harmless);
    tiny_free(&t);
}

static void test_truncation_and_trailing(void** state) {
    tiny t;
    size_t n;
    unsigned char* longer;
    mpar_error err;
    (void)state;
    tiny_make(&t);
    for (n = 0; n < t.size; n++) {
        char what[64];
        snprintf(what, sizeof what, "truncated to %lu bytes", (unsigned long)n);
        assert_int_equal(try_load(&t, t.good, n, what), 1);
        assert_int_equal(mpar_checkpoint_parse(t.good, n, NULL, &err), MPAR_ERROR_CORRUPT);
    }
    longer = (unsigned char*)calloc(t.size + 100, 1);
    memcpy(longer, t.good, t.size);
    for (n = 1; n <= 100; n += 99) {
        assert_int_equal(try_load(&t, longer, t.size + n, "trailing bytes"), 1);
        assert_int_equal(mpar_checkpoint_parse(longer, t.size + n, NULL, &err), MPAR_ERROR_CORRUPT);
        assert_non_null(strstr(err.message, "trailing"));
    }
    free(longer);
    tiny_free(&t);
}

static void test_missing_file(void** state) {
    tiny t;
    char path[400];
    mpar_error err;
    (void)state;
    tiny_make(&t);
    path_in(path, sizeof path, "no-such.ckpt");
    assert_int_equal(mpar_pipeline_load_checkpoint(t.victim, path, &err), MPAR_ERROR_IO);
    assert_non_null(strstr(err.message, path));
    assert_non_null(strstr(err.message, strerror(ENOENT)));
    assert_int_equal(mpar_pipeline_load_checkpoint(t.victim, g_dir, &err), MPAR_ERROR_IO); /* a folder */
    expect_unchanged(&t, "missing file");
    tiny_free(&t);
}

/* Loads `path` into a pipeline of `m` and expects MISMATCH mentioning `needle`. */
static void expect_mismatch(mpar_model* m, mpar_optimizer_kind opt, const char* path, const char* needle) {
    mpar_pipeline* p = make_pipeline(m, 2, 0, MPAR_SCHEDULE_1F1B, opt);
    float* before = snapshot(p);
    float* after;
    mpar_error err;
    assert_int_equal(mpar_pipeline_load_checkpoint(p, path, &err), MPAR_ERROR_MISMATCH);
    if (!strstr(err.message, needle)) fail_msg("mismatch message lacks '%s': %s", needle, err.message);
    after = snapshot(p);
    assert_true(same_floats(before, after, 3 * mpar_model_param_count(m)));
    assert_int_equal(mpar_pipeline_get_step(p), 0);
    free(before), free(after);
    mpar_pipeline_destroy(p);
}

static void test_other_model(void** state) {
    tiny t;
    char path[400];
    mpar_model *wider0, *wider3, *reseeded;
    (void)state;
    tiny_make(&t);
    path_in(path, sizeof path, "tiny.ckpt");
    wider0 = make_model(3, 6, 3, 7); /* first layer one wider */
    wider3 = make_model(3, 5, 4, 7); /* layer 3 one wider */
    reseeded = make_model(3, 5, 3, 8);
    expect_mismatch(wider0, MPAR_OPTIMIZER_ADAMW, path, "layer 0 differs");
    expect_mismatch(wider3, MPAR_OPTIMIZER_ADAMW, path, "layer 3 differs");
    expect_mismatch(reseeded, MPAR_OPTIMIZER_ADAMW, path, "seed");
    expect_mismatch(t.model, MPAR_OPTIMIZER_SGD, path, "optimizer");
    mpar_model_destroy(wider0), mpar_model_destroy(wider3), mpar_model_destroy(reseeded);
    tiny_free(&t);
}

/* token embedding (vocab 11, width 16) -> decoder block with `heads` heads
   -> linear(11) -> cross entropy, 4 tokens per sample */
static mpar_model* make_decoder(int heads) {
    mpar_model* m = NULL;
    mpar_model_desc md;
    mpar_layer_desc ld;
    memset(&md, 0, sizeof md);
    md.input_features = 1, md.seq_len = 4, md.seed = 7;
    assert_int_equal(mpar_model_create(&md, &m, NULL), MPAR_SUCCESS);
    memset(&ld, 0, sizeof ld);
    ld.type = mpar_layer_embedding(), ld.vocab = 11, ld.units = 16;
    assert_int_equal(mpar_model_add(m, &ld, NULL), MPAR_SUCCESS);
    memset(&ld, 0, sizeof ld);
    ld.type = mpar_layer_decoder_block(), ld.heads = heads;
    assert_int_equal(mpar_model_add(m, &ld, NULL), MPAR_SUCCESS);
    assert_int_equal(mpar_model_add_linear(m, 11, NULL), MPAR_SUCCESS);
    assert_int_equal(mpar_model_add_simple(m, mpar_layer_cross_entropy(), NULL), MPAR_SUCCESS);
    return m;
}

/* Heads split the same parameters differently: a checkpoint of a 2-head
   block has as many parameters as a 4-head one and must still be refused. */
static void test_other_heads(void** state) {
    mpar_model *two = make_decoder(2), *four = make_decoder(4);
    mpar_pipeline* p = make_pipeline(two, 2, 0, MPAR_SCHEDULE_1F1B, MPAR_OPTIMIZER_ADAMW);
    char path[400];
    (void)state;
    assert_int_equal(mpar_model_param_count(two), mpar_model_param_count(four));
    path_in(path, sizeof path, "heads.ckpt");
    assert_int_equal(mpar_pipeline_save_checkpoint(p, path, NULL), MPAR_SUCCESS);
    expect_mismatch(four, MPAR_OPTIMIZER_ADAMW, path, "layer 1 (decoder_block) differs");
    expect_mismatch(four, MPAR_OPTIMIZER_ADAMW, path, "heads 2");
    mpar_pipeline_destroy(p);
    mpar_model_destroy(two), mpar_model_destroy(four);
}

static void test_null_arguments(void** state) {
    tiny t;
    char path[400];
    mpar_error err;
    mpar_checkpoint_info info;
    float f[64];
    (void)state;
    tiny_make(&t);
    path_in(path, sizeof path, "null.ckpt");
    assert_int_equal(mpar_pipeline_save_checkpoint(NULL, path, &err), MPAR_ERROR_INVALID_ARGUMENT);
    assert_int_equal(mpar_pipeline_save_checkpoint(t.victim, NULL, &err), MPAR_ERROR_INVALID_ARGUMENT);
    assert_int_equal(mpar_pipeline_save_checkpoint(t.victim, path, NULL), MPAR_SUCCESS); /* err is optional */
    assert_int_equal(mpar_pipeline_load_checkpoint(NULL, path, &err), MPAR_ERROR_INVALID_ARGUMENT);
    assert_int_equal(mpar_pipeline_load_checkpoint(t.victim, NULL, &err), MPAR_ERROR_INVALID_ARGUMENT);
    assert_int_equal(mpar_checkpoint_parse(NULL, 10, &info, &err), MPAR_ERROR_INVALID_ARGUMENT);
    assert_int_equal(mpar_checkpoint_parse(NULL, 0, NULL, NULL), MPAR_ERROR_CORRUPT); /* empty */
    assert_int_equal(mpar_checkpoint_match(NULL, t.model, MPAR_OPTIMIZER_ADAMW, &err), MPAR_ERROR_INVALID_ARGUMENT);
    assert_int_equal(mpar_checkpoint_parse(t.good, t.size, &info, &err), MPAR_SUCCESS);
    assert_int_equal(mpar_checkpoint_match(&info, NULL, MPAR_OPTIMIZER_ADAMW, &err), MPAR_ERROR_INVALID_ARGUMENT);
    assert_int_equal(mpar_checkpoint_get_state(NULL, t.size, &info, 0, MPAR_STATE_PARAMS, f, &err),
                     MPAR_ERROR_INVALID_ARGUMENT);
    assert_int_equal(mpar_checkpoint_get_state(t.good, t.size, NULL, 0, MPAR_STATE_PARAMS, f, &err),
                     MPAR_ERROR_INVALID_ARGUMENT);
    assert_int_equal(mpar_checkpoint_get_state(t.good, t.size, &info, 0, MPAR_STATE_PARAMS, NULL, &err),
                     MPAR_ERROR_INVALID_ARGUMENT);
    assert_int_equal(mpar_checkpoint_get_state(t.good, t.size, &info, 0, MPAR_STATE_GRADS, f, &err),
                     MPAR_ERROR_INVALID_ARGUMENT);
    assert_int_equal(mpar_checkpoint_get_state(t.good, t.size, &info, 99, MPAR_STATE_PARAMS, f, &err),
                     MPAR_ERROR_INVALID_ARGUMENT);
    assert_int_equal(mpar_checkpoint_get_state(t.good, 100, &info, 0, MPAR_STATE_MOMENT2, f, &err),
                     MPAR_ERROR_INVALID_ARGUMENT); /* offsets past the buffer given */
    mpar_checkpoint_info_free(&info);
    mpar_checkpoint_info_free(NULL);
    tiny_free(&t);
}

/* Pure: what the parser reports about a real checkpoint, and the checks
   behind the file checksum (reached by re-sealing an edited file). */
static void reseal(unsigned char* d, size_t n) {
    uint64_t h = mpar__ckpt_checksum(d, n - 8);
    mpar__ckpt_wr64(d + n - 8, h);
}

static void test_parse(void** state) {
    tiny t;
    mpar_checkpoint_info info;
    mpar_error err;
    unsigned char* d;
    float* s;
    size_t at = 0;
    int i, k;
    (void)state;
    tiny_make(&t);
    assert_int_equal(mpar_checkpoint_parse(t.good, t.size, &info, &err), MPAR_SUCCESS);
    assert_int_equal(info.layer_count, 5);
    assert_int_equal(info.step, 2);
    assert_int_equal(info.input_features, 3);
    assert_int_equal(info.seq_len, 1);
    assert_int_equal(info.optimizer, MPAR_OPTIMIZER_ADAMW);
    assert_true(info.seed == 7);
    assert_int_equal(info.size, t.size);
    assert_string_equal(info.layers[1].type_name, "dropout");
    assert_true(info.layers[1].rate == 0.25f);
    assert_string_equal(info.layers[4].type_name, "cross_entropy");
    assert_int_equal(info.layers[0].param_count, 3 * 5 + 5);
    assert_int_equal(info.layers[3].out_features, 3);
    s = (float*)malloc(sizeof(float) * 64);
    for (i = 0; i < 5; i++)
        for (k = 0; k < 3; k++) {
            size_t n = info.layers[i].param_count;
            mpar_state_kind kind = k == 0 ? MPAR_STATE_PARAMS : k == 1 ? MPAR_STATE_MOMENT1 : MPAR_STATE_MOMENT2;
            assert_int_equal(mpar_checkpoint_get_state(t.good, t.size, &info, i, kind, s, &err), MPAR_SUCCESS);
            assert_true(same_floats(s, t.good_state + at, n));
            at += n;
        }
    free(s);
    /* an intact file of a newer format (2 is weights only) */
    d = (unsigned char*)malloc(t.size);
    memcpy(d, t.good, t.size);
    d[8] = MPAR_WEIGHTS_FORMAT_VERSION + 1;
    reseal(d, t.size);
    assert_int_equal(mpar_checkpoint_parse(d, t.size, NULL, &err), MPAR_ERROR_UNSUPPORTED);
    /* version 2 (weights only) with a checkpoint's optimizer kind and data */
    memcpy(d, t.good, t.size);
    d[8] = MPAR_WEIGHTS_FORMAT_VERSION;
    reseal(d, t.size);
    assert_int_equal(mpar_checkpoint_parse(d, t.size, NULL, &err), MPAR_ERROR_CORRUPT);
    assert_non_null(strstr(err.message, "offset 36"));
    /* sealed but inconsistent: a layer count the file cannot hold */
    memcpy(d, t.good, t.size);
    d[32] = 200;
    reseal(d, t.size);
    assert_int_equal(mpar_checkpoint_parse(d, t.size, NULL, &err), MPAR_ERROR_CORRUPT);
    assert_non_null(strstr(err.message, "offset 32"));
    /* sealed, but a layer's data no longer matches its own checksum */
    memcpy(d, t.good, t.size);
    d[info.layers[3].params_offset] ^= 1;
    reseal(d, t.size);
    assert_int_equal(mpar_checkpoint_parse(d, t.size, NULL, &err), MPAR_ERROR_CORRUPT);
    assert_non_null(strstr(err.message, "layer 3"));
    /* unsealed: the file checksum fails and the message names the section */
    memcpy(d, t.good, t.size);
    d[info.layers[3].moment2_offset + 1] ^= 0x40;
    assert_int_equal(mpar_checkpoint_parse(d, t.size, NULL, &err), MPAR_ERROR_CORRUPT);
    assert_non_null(strstr(err.message, "layer 3 (linear)"));
    mpar_checkpoint_info_free(&info);
    free(d);
    tiny_free(&t);
}

static int count_temp_files(void) {
    DIR* dir = opendir(g_dir);
    struct dirent* e;
    int n = 0;
    while (dir && (e = readdir(dir)) != NULL) n += strncmp(e->d_name, ".mpar-", 6) == 0;
    if (dir) closedir(dir);
    return n;
}

static void expect_io(mpar_pipeline* p, const char* path, int e) {
    mpar_error err;
    assert_int_equal(mpar_pipeline_save_checkpoint(p, path, &err), MPAR_ERROR_IO);
    if (!strstr(err.message, path) || !strstr(err.message, strerror(e)))
        fail_msg("the message should name '%s' and '%s': %s", path, strerror(e), err.message);
}

static void test_save_failures(void** state) {
    tiny t;
    char good[400], path[700], file_dir[500];
    unsigned char *before, *after;
    size_t nb, na;
    struct rlimit old, lim;
    (void)state;
    tiny_make(&t);
    path_in(good, sizeof good, "good.ckpt");
    save_ok(t.victim, good);
    before = read_all(good, &nb);
    snprintf(path, sizeof path, "%s/no-such-folder/x.ckpt", g_dir);
    expect_io(t.victim, path, ENOENT);
    snprintf(path, sizeof path, "%s/x.ckpt", good); /* under a regular file */
    expect_io(t.victim, path, ENOTDIR);
    snprintf(file_dir, sizeof file_dir, "%s/a-folder", g_dir); /* rename over a folder */
    assert_int_equal(mkdir(file_dir, 0755), 0);
    expect_io(t.victim, file_dir, EISDIR);
    if (geteuid() != 0) { /* root writes into read-only folders */
        snprintf(path, sizeof path, "%s/x.ckpt", file_dir);
        chmod(file_dir, 0555);
        expect_io(t.victim, path, EACCES);
        chmod(file_dir, 0755);
    }
    /* the disk fills up while overwriting the good file itself */
    train(t.victim);
    signal(SIGXFSZ, SIG_IGN);
    getrlimit(RLIMIT_FSIZE, &old);
    lim = old;
    lim.rlim_cur = 200;
    setrlimit(RLIMIT_FSIZE, &lim);
    expect_io(t.victim, good, EFBIG);
    setrlimit(RLIMIT_FSIZE, &old);
    signal(SIGXFSZ, SIG_DFL);
    assert_int_equal(count_temp_files(), 0);
    after = read_all(good, &na);
    assert_int_equal(na, nb);
    assert_memory_equal(before, after, nb);
    assert_int_equal(mpar_checkpoint_parse(after, na, NULL, NULL), MPAR_SUCCESS);
    free(before), free(after);
    tiny_free(&t);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_round_trip),     cmocka_unit_test(test_every_byte_flip),
        cmocka_unit_test(test_truncation_and_trailing), cmocka_unit_test(test_missing_file),
        cmocka_unit_test(test_other_model), cmocka_unit_test(test_other_heads),    cmocka_unit_test(test_null_arguments),
        cmocka_unit_test(test_parse),          cmocka_unit_test(test_save_failures),
    };
    return cmocka_run_group_tests_name("checkpoint", tests, setup, teardown);
}
