/* libFuzzer target for the plan text form and the schedule names (no device
   is touched):
     clang -g -O1 -fsanitize=fuzzer,address,undefined -I. tests/fuzz/fuzz_plan.c \
         -lclblast -lOpenCL -lpthread -lm
   scripts/fuzz.sh builds and runs it; with MPAR_FUZZ_SEEDS=DIR set the
   binary only writes its seed corpus into DIR (plans that mpar_plan_create
   made, as mpar_plan_to_string prints them, and schedule names) and exits.
   Each input is
   - parsed by mpar_plan_parse (not NUL-terminated: the parser must stay
     inside `size` bytes). A parsed plan is printed again and re-parsed: the
     same stages, and the same text once more; the print is also cut short
     at a length taken from the input. Then its stages go to the planner's
     MANUAL mode, which must accept them or say why.
   - given, NUL-terminated, to mpar_schedule_kind_parse, and checked against
     its documented rule (case, '-', '_' and spaces ignored). */
#define MPAR_IMPLEMENTATION
#include "mpar.h"

int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size);
int LLVMFuzzerInitialize(int* argc, char*** argv);

static int error_ok(const mpar_error* err, mpar_result r) {
    return err->code == r && memchr(err->message, '\0', sizeof err->message) && err->message[0] != '\0';
}

static int same_ranges(const mpar_plan* a, const mpar_plan* b) {
    int s;
    if (a->num_stages != b->num_stages) return 0;
    for (s = 0; s < a->num_stages; s++)
        if (a->stages[s].device != b->stages[s].device || a->stages[s].first_layer != b->stages[s].first_layer ||
            a->stages[s].last_layer != b->stages[s].last_layer)
            return 0;
    return 1;
}

/* mpar_plan_to_string into exactly `size` bytes (so ASan sees any byte
   written past them); must return the full length and keep a prefix. */
static void print_cut(const mpar_plan* plan, const char* full, int n, size_t size) {
    char* buf = (char*)malloc(size ? size : 1);
    if (mpar_plan_to_string(plan, size ? buf : NULL, size) != n) __builtin_trap();
    if (size) {
        size_t keep = (size_t)n < size - 1 ? (size_t)n : size - 1;
        if (strlen(buf) != keep || memcmp(buf, full, keep) != 0) __builtin_trap();
    }
    free(buf);
}

/* The parsed ranges as MANUAL stages of a model just long enough. */
static void plan_manual(const mpar_plan* parsed) {
    mpar_plan_layer layers[512];
    mpar_plan_device devices[16];
    mpar_plan_desc d;
    mpar_plan plan;
    mpar_error err;
    mpar_result r;
    int s, L = parsed->stages[parsed->num_stages - 1].last_layer + 1, P = 0;
    for (s = 0; s < parsed->num_stages; s++)
        if (parsed->stages[s].device + 1 > P) P = parsed->stages[s].device + 1;
    if (L > 512 || P > 16) return;
    memset(layers, 0, sizeof layers);
    memset(devices, 0, sizeof devices);
    for (s = 0; s < L; s++) {
        layers[s].flops_forward = layers[s].flops_backward_input = layers[s].flops_backward_weight = 1e6 * (s % 7 + 1);
        layers[s].param_bytes = 4096, layers[s].activation_bytes = 1024, layers[s].output_bytes = 512;
    }
    for (s = 0; s < P; s++) devices[s].flops_per_second = 1e9 * (s + 1);
    memset(&d, 0, sizeof d);
    d.num_layers = L, d.layers = layers, d.num_devices = P, d.devices = devices;
    d.mode = MPAR_PLAN_MANUAL, d.manual_stages = parsed->stages, d.num_manual_stages = parsed->num_stages;
    d.schedule = MPAR_SCHEDULE_1F1B, d.microbatches = 4;
    r = mpar_plan_create(&d, &plan, &err);
    if (r == MPAR_SUCCESS) {
        if (!same_ranges(&plan, parsed)) __builtin_trap();
    } else {
        if (r != MPAR_ERROR_INVALID_PLAN && r != MPAR_ERROR_INVALID_ARGUMENT && r != MPAR_ERROR_DOES_NOT_FIT)
            __builtin_trap();
        if (!error_ok(&err, r) || plan.stages || plan.num_stages) __builtin_trap();
    }
    mpar_plan_free(&plan);
}

static void fuzz_plan_text(const uint8_t* data, size_t size) {
    mpar_plan plan, again, third;
    mpar_error err;
    mpar_result r;
    size_t commas = 0, i;
    char *text, *text2;
    int n, s;
    memset(&err, 0x5a, sizeof err);
    r = mpar_plan_parse((const char*)data, size, &plan, &err);
    if (r != MPAR_SUCCESS) {
        if (r != MPAR_ERROR_INVALID_PLAN || !error_ok(&err, r) || plan.stages || plan.num_stages) __builtin_trap();
        return;
    }
    for (i = 0; i < size && data[i]; i++) commas += data[i] == ',';
    if (plan.num_stages < 1 || (size_t)plan.num_stages > commas + 1 || !plan.stages) __builtin_trap();
    for (s = 0; s < plan.num_stages; s++) {
        const mpar_plan_stage* st = &plan.stages[s];
        if (st->device < 0 || st->first_layer < 0 || st->first_layer > st->last_layer || st->last_layer > 999999999)
            __builtin_trap();
    }
    /* print, parse the print, print again */
    n = mpar_plan_to_string(&plan, NULL, 0);
    if (n < 0) __builtin_trap();
    text = (char*)malloc((size_t)n + 1);
    if (mpar_plan_to_string(&plan, text, (size_t)n + 1) != n || strlen(text) != (size_t)n) __builtin_trap();
    if (mpar_plan_parse(text, (size_t)n, &again, &err) != MPAR_SUCCESS || !same_ranges(&plan, &again)) __builtin_trap();
    text2 = (char*)malloc((size_t)n + 1);
    if (mpar_plan_to_string(&again, text2, (size_t)n + 1) != n || strcmp(text, text2) != 0) __builtin_trap();
    /* the same text with the length given as "up to the NUL" */
    if (mpar_plan_parse(text, (size_t)-1, &third, &err) != MPAR_SUCCESS || !same_ranges(&plan, &third))
        __builtin_trap();
    print_cut(&plan, text, n, 0);
    print_cut(&plan, text, n, 1);
    print_cut(&plan, text, n, size % ((size_t)n + 2));
    plan_manual(&plan);
    free(text), free(text2);
    mpar_plan_free(&plan), mpar_plan_free(&again), mpar_plan_free(&third);
}

/* ---- schedule names ---- */

static int ref_kind(const char* name) {
    static const char* names[] = {"sequential", "naive", "gpipe", "1f1b", "pipedreamflush",
                                  "interleaved", "interleaved1f1b", "zbh1", "zbh2", "zbv", "auto"};
    static const int kinds[] = {MPAR_SCHEDULE_SEQUENTIAL, MPAR_SCHEDULE_SEQUENTIAL, MPAR_SCHEDULE_GPIPE,
                                MPAR_SCHEDULE_1F1B, MPAR_SCHEDULE_1F1B, MPAR_SCHEDULE_INTERLEAVED_1F1B,
                                MPAR_SCHEDULE_INTERLEAVED_1F1B, MPAR_SCHEDULE_ZB_H1, MPAR_SCHEDULE_ZB_H2,
                                MPAR_SCHEDULE_ZB_V, MPAR_SCHEDULE_AUTO};
    char norm[40];
    size_t n = 0, k;
    for (; *name; name++) {
        char c = *name;
        if (c == '-' || c == '_' || c == ' ') continue;
        if (n + 1 >= sizeof norm) return -1; /* longer than any name */
        norm[n++] = c >= 'A' && c <= 'Z' ? (char)(c - 'A' + 'a') : c;
    }
    norm[n] = '\0';
    for (k = 0; k < sizeof names / sizeof names[0]; k++)
        if (!strcmp(norm, names[k])) return kinds[k];
    return -1;
}

static void fuzz_kind_name(const uint8_t* data, size_t size) {
    char* name = (char*)malloc(size + 1);
    mpar_schedule_kind kind = (mpar_schedule_kind)-7, back = (mpar_schedule_kind)-7;
    mpar_error err;
    mpar_result r;
    int want;
    memcpy(name, data, size);
    name[size] = '\0';
    memset(&err, 0x5a, sizeof err);
    r = mpar_schedule_kind_parse(name, &kind, &err);
    want = ref_kind(name);
    if (r == MPAR_SUCCESS) {
        if ((int)kind != want) __builtin_trap();
        if (mpar_schedule_kind_parse(mpar_schedule_kind_name(kind), &back, NULL) != MPAR_SUCCESS || back != kind)
            __builtin_trap();
    } else {
        if (want != -1 || r != MPAR_ERROR_INVALID_ARGUMENT || !error_ok(&err, r) || kind != (mpar_schedule_kind)-7)
            __builtin_trap();
    }
    free(name);
}

int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    fuzz_plan_text(data, size);
    fuzz_kind_name(data, size);
    return 0;
}

/* ---- seed corpus (MPAR_FUZZ_SEEDS=DIR) ---- */

static void write_seed(const char* dir, int* k, const char* text) {
    char path[4096];
    FILE* f;
    snprintf(path, sizeof path, "%s/seed-%02d", dir, (*k)++);
    f = fopen(path, "wb");
    if (!f || fwrite(text, 1, strlen(text), f) != strlen(text) || fclose(f) != 0) {
        fprintf(stderr, "fuzz_plan: cannot write %s\n", path);
        exit(1);
    }
}

/* Plans from the planner itself, in each mode, as mpar_plan_to_string prints them. */
static void write_plan_seeds(const char* dir, int* k) {
    mpar_plan_layer layers[24];
    mpar_plan_device devices[4];
    mpar_plan_desc d;
    mpar_plan plan;
    double weights[4] = {1.0, 2.0, 1.0, 3.0};
    char text[512];
    int i, mode;
    memset(layers, 0, sizeof layers);
    memset(devices, 0, sizeof devices);
    for (i = 0; i < 24; i++) {
        layers[i].flops_forward = layers[i].flops_backward_input = layers[i].flops_backward_weight = 1e7 * (i % 5 + 1);
        layers[i].param_bytes = 1 << 20, layers[i].activation_bytes = 1 << 16, layers[i].output_bytes = 1 << 14;
    }
    for (i = 0; i < 4; i++) devices[i].flops_per_second = 1e10 * (i % 2 + 1);
    for (mode = 0; mode < 4; mode++) {
        memset(&d, 0, sizeof d);
        d.num_layers = 24, d.layers = layers, d.num_devices = 4, d.devices = devices;
        d.schedule = MPAR_SCHEDULE_1F1B, d.microbatches = 8;
        if (mode == 1) d.mode = MPAR_PLAN_PROPORTIONAL, d.weights = weights;
        if (mode == 2) d.schedule = MPAR_SCHEDULE_INTERLEAVED_1F1B, d.virtual_stages = 2;
        if (mode == 3) d.num_layers = 3, d.num_devices = 2;
        if (mpar_plan_create(&d, &plan, NULL) != MPAR_SUCCESS || mpar_plan_to_string(&plan, text, sizeof text) < 0) {
            fprintf(stderr, "fuzz_plan: mpar_plan_create failed for seed %d\n", mode);
            exit(1);
        }
        write_seed(dir, k, text);
        mpar_plan_free(&plan);
    }
}

int LLVMFuzzerInitialize(int* argc, char*** argv) {
    static const char* texts[] = {"0:0-5,1:6-11", "1:0-3, 0:4-7", " 2 : 0 - 9 ,\t0:10\n", "0:0",
                                  "0:0-0,1:1-1,2:2-2,3:3-3", "123456789:0-999999999", "1f1b", "ZB-H1",
                                  "interleaved_1f1b", "Pipedream Flush", "naive", "gpipe", "zb_h2", "ZBV", "Auto"};
    const char* dir = getenv("MPAR_FUZZ_SEEDS");
    int k = 0;
    size_t i;
    (void)argc, (void)argv;
    if (!dir) return 0;
    write_plan_seeds(dir, &k);
    for (i = 0; i < sizeof texts / sizeof texts[0]; i++) write_seed(dir, &k, texts[i]);
    exit(0);
}
