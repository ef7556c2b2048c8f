/* libFuzzer target for the two parsers mpar_create reads from the
   environment: the device selection (mpar_desc.devices and MPAR_DEVICES),
   run on six made-up devices of four platforms and on the first two and
   the first one alone, and the fault spec (mpar_set_fault, MPAR_FAULT), on
   a bare context; no OpenCL call is made:
     clang -g -O1 -fsanitize=fuzzer,address,undefined -I. tests/fuzz/fuzz_devices.c \
         -lclblast -lOpenCL -lpthread -lm
   scripts/fuzz.sh builds and runs it; with MPAR_FUZZ_SEEDS=DIR set the
   binary only writes its seed corpus (selection strings) into DIR and exits.
   Each input is one selection string.
   Besides the invariants every result must keep (success: 1..n distinct
   positions in range; failure: MPAR_ERROR_INVALID_SELECTION or
   MPAR_ERROR_NO_DEVICE with a message), the result is compared with a
   small reference reading of the documented syntax, so that a term is
   never taken to mean another device than the one it names (an index too
   large for an int must be "does not exist", not wrap round to a small one).
   A fault spec must be refused with a message, or set exactly the fields
   it names (KIND:STAGE:STEP[:NTH], numbers below 10^9 or '*', NTH >= 1). */
#define MPAR_IMPLEMENTATION
#include "mpar.h"

#include <limits.h>

int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size);
int LLVMFuzzerInitialize(int* argc, char*** argv);

#define FAKE_DEVICES 6

static mpar__device fake[FAKE_DEVICES];

static void fake_device(int i, const char* name, const char* vendor, const char* platform, mpar_device_type type,
                        int platform_index) {
    mpar_device_info* d = &fake[i].info;
    memset(&fake[i], 0, sizeof fake[i]);
    snprintf(d->name, sizeof d->name, "%s", name);
    snprintf(d->vendor, sizeof d->vendor, "%s", vendor);
    snprintf(d->platform, sizeof d->platform, "%s", platform);
    d->type = type;
    d->platform_index = platform_index;
    d->global_index = i;
}

static void setup(void) {
    static int done;
    if (done) return;
    done = 1;
    fake_device(0, "cpu-haswell-AMD EPYC 7B13", "AuthenticAMD", "Portable Computing Language", MPAR_DEVICE_CPU, 0);
    fake_device(1, "basic-haswell-AMD EPYC 7B13", "AuthenticAMD", "Portable Computing Language", MPAR_DEVICE_CPU, 0);
    fake_device(2, "NVIDIA GeForce RTX 3090", "NVIDIA Corporation", "NVIDIA CUDA", MPAR_DEVICE_GPU, 1);
    fake_device(3, "gfx1100", "Advanced Micro Devices, Inc.", "AMD Accelerated Parallel Processing", MPAR_DEVICE_GPU, 2);
    fake_device(4, "Intel(R) FPGA Emulation Device", "Intel(R) Corporation", "Intel(R) FPGA Emulation Platform",
                MPAR_DEVICE_ACCELERATOR, 3);
    fake_device(5, "pthread", "GenuineIntel", "Portable Computing Language", MPAR_DEVICE_OTHER, 0);
}

/* ---- reference reading of the syntax documented above mpar_desc ---- */

static int ref_lower(int c) { return c >= 'A' && c <= 'Z' ? c - 'A' + 'a' : c; }

static int ref_contains(const char* hay, const char* needle) {
    size_t n = strlen(needle), h = strlen(hay), i, j;
    if (n > h) return 0;
    for (i = 0; i + n <= h; i++) {
        for (j = 0; j < n && ref_lower((unsigned char)hay[i + j]) == ref_lower((unsigned char)needle[j]); j++) {}
        if (j == n) return 1;
    }
    return 0;
}

/* A decimal number of exactly `len` digits, saturating at LLONG_MAX. */
static int ref_number(const char* s, size_t len, long long* v) {
    size_t i;
    *v = 0;
    if (len == 0) return 0;
    for (i = 0; i < len; i++) {
        if (s[i] < '0' || s[i] > '9') return 0;
        *v = *v > (LLONG_MAX - 9) / 10 ? LLONG_MAX : *v * 10 + (s[i] - '0');
    }
    return 1;
}

static int ref_space(int c) { return c == ' ' || c == '\t' || c == '\n' || c == '\v' || c == '\f' || c == '\r'; }

/* One term: appends what it selects; returns 0 or an mpar_result. */
static int ref_term(const char* t, int n, int* order, int* count) {
    size_t len = strlen(t);
    const char* dash = strchr(t, '-');
    long long lo = -1, hi = -1, platform = -1, a, b;
    int type = -1, i, k, matched = 0;
    const char* text = NULL;
    if (!strcmp(t, "all")) lo = 0, hi = n - 1;
    else if (!strcmp(t, "gpu")) type = MPAR_DEVICE_GPU;
    else if (!strcmp(t, "cpu")) type = MPAR_DEVICE_CPU;
    else if (!strcmp(t, "accel") || !strcmp(t, "accelerator")) type = MPAR_DEVICE_ACCELERATOR;
    else if (ref_number(t, len, &a)) lo = hi = a;
    else if (dash && ref_number(t, (size_t)(dash - t), &a) && ref_number(dash + 1, strlen(dash + 1), &b)) {
        if (b < a) return MPAR_ERROR_INVALID_SELECTION;
        lo = a, hi = b;
    } else if (t[0] == 'p' && ref_number(t + 1, len - 1, &a)) platform = a;
    else text = strncmp(t, "name:", 5) ? t : t + 5;
    if (lo >= 0 && hi >= n) return MPAR_ERROR_NO_DEVICE;
    for (i = 0; i < n; i++) {
        const mpar_device_info* d = &fake[i].info;
        int hit = (lo >= 0 && i >= lo && i <= hi) || (type >= 0 && (int)d->type == type) ||
                  (platform >= 0 && d->platform_index == platform) ||
                  (text && text[0] &&
                   (ref_contains(d->name, text) || ref_contains(d->vendor, text) || ref_contains(d->platform, text)));
        if (!hit) continue;
        matched = 1;
        for (k = 0; k < *count && order[k] != i; k++) {}
        if (k < *count) return MPAR_ERROR_INVALID_SELECTION; /* selected twice */
        order[(*count)++] = i;
    }
    return matched ? 0 : MPAR_ERROR_NO_DEVICE;
}

/* Comma-separated terms, blanks around a term ignored; an empty term (a
   trailing comma excepted) and a term of 256 bytes or more are syntax
   errors; no terms at all means every GPU, else every device. */
static int ref_select(const char* spec, int n, int* order, int* count) {
    const char* p = spec;
    char term[256];
    *count = 0;
    if (!spec[0]) {
        int i, gpus = 0;
        for (i = 0; i < n; i++) gpus += fake[i].info.type == MPAR_DEVICE_GPU;
        return ref_term(gpus ? "gpu" : "all", n, order, count);
    }
    while (*p) {
        size_t len = strcspn(p, ","), a = 0, b;
        int r;
        b = len;
        while (a < b && ref_space((unsigned char)p[a])) a++;
        while (b > a && ref_space((unsigned char)p[b - 1])) b--;
        if (a == b || b - a >= sizeof term) return MPAR_ERROR_INVALID_SELECTION;
        memcpy(term, p + a, b - a);
        term[b - a] = '\0';
        if ((r = ref_term(term, n, order, count)) != 0) return r;
        p += len;
        if (*p == ',') p++;
    }
    return 0;
}

/* ---- the target ---- */

static void check(const char* spec, int n) {
    int order[MPAR__MAX_DEVICES], ref_order[MPAR__MAX_DEVICES], count = -1, ref_count = 0, i, k, ref;
    mpar_error err;
    mpar_result r;
    memset(&err, 0x5a, sizeof err); /* no NUL anywhere: the parser must write the message */
    r = mpar__select(spec, fake, n, order, &count, &err);
    if (r == MPAR_SUCCESS) {
        if (count < 1 || count > n) __builtin_trap();
        for (i = 0; i < count; i++) {
            if (order[i] < 0 || order[i] >= n) __builtin_trap();
            for (k = 0; k < i; k++)
                if (order[k] == order[i]) __builtin_trap();
        }
    } else {
        if (r != MPAR_ERROR_INVALID_SELECTION && r != MPAR_ERROR_NO_DEVICE) __builtin_trap();
        if (err.code != r || !memchr(err.message, '\0', sizeof err.message) || err.message[0] == '\0') __builtin_trap();
    }
    /* The reference reading: the same outcome and the same devices in the same order. */
    ref = ref_select(spec, n, ref_order, &ref_count);
    if ((int)r != ref) __builtin_trap();
    if (r == MPAR_SUCCESS && (count != ref_count || memcmp(order, ref_order, sizeof(int) * (size_t)count)))
        __builtin_trap();
}

/* ---- fault specs ---- */

/* '*' (-1) or a decimal number below 10^9; advances *p. */
static int ref_field(const char** p, int* out) {
    long long v = 0;
    if (**p == '*') return (*p)++, *out = -1, 1;
    if (**p < '0' || **p > '9') return 0;
    for (; **p >= '0' && **p <= '9'; (*p)++) v = v > 999999999 ? v : v * 10 + (**p - '0');
    *out = (int)v;
    return v <= 999999999;
}

static int ref_fault(const char* spec, int* f) { /* f: kind, stage, step, nth */
    static const char* kinds[] = {"alloc:", "enqueue:", "transfer:", "build:"};
    const char* p = spec;
    int k;
    f[0] = 0, f[1] = f[2] = -1, f[3] = 1;
    if (!spec[0]) return 1;
    for (k = 0; k < 4 && strncmp(spec, kinds[k], strlen(kinds[k])); k++) {}
    if (k == 4) return 0;
    f[0] = k + 1, p += strlen(kinds[k]);
    if (!ref_field(&p, &f[1]) || *p++ != ':' || !ref_field(&p, &f[2])) return 0;
    if (*p == ':' && (p++, !ref_field(&p, &f[3]) || f[3] < 1)) return 0;
    return *p == '\0';
}

static void check_fault(const char* spec) {
    static mpar_context* ctx;
    int want[4], ok;
    mpar_result r;
    if (!ctx) { /* the few fields mpar_set_fault and mpar__fail use */
        ctx = (mpar_context*)calloc(1, sizeof *ctx);
        ctx->live = MPAR__LIVE_CONTEXT; /* as mpar_create marks a context its public calls accept */
        pthread_mutex_init(&ctx->lock, NULL);
        ctx->error = (char*)calloc(1, 1);
    }
    ctx->fault_kind = 77, ctx->fault_stage = 77, ctx->fault_step = 77, ctx->fault_nth = 77;
    ctx->error[0] = '\0'; /* a refusal must publish a new, non-empty message */
    ok = ref_fault(spec, want);
    r = mpar_set_fault(ctx, spec);
    if (r == MPAR_SUCCESS) {
        if (!ok || ctx->fault_kind != want[0] || (want[0] && (ctx->fault_stage != want[1] || ctx->fault_step != want[2] ||
                                                             ctx->fault_nth != want[3])))
            __builtin_trap();
    } else {
        if (ok || r != MPAR_ERROR_INVALID_ARGUMENT || !ctx->error[0] || strlen(mpar_last_error(ctx)) == 0)
            __builtin_trap();
        if (ctx->fault_kind != 77 || ctx->fault_stage != 77 || ctx->fault_step != 77 || ctx->fault_nth != 77)
            __builtin_trap(); /* a refused spec changes nothing */
    }
}

int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    char* spec = (char*)malloc(size + 1);
    setup();
    memcpy(spec, data, size);
    spec[size] = '\0'; /* the parsers read C strings: they stop at the first NUL */
    check(spec, FAKE_DEVICES);
    check(spec, 2);
    check(spec, 1);
    check_fault(spec);
    free(spec);
    return 0;
}

/* ---- seed corpus (MPAR_FUZZ_SEEDS=DIR): one string per documented form ---- */
int LLVMFuzzerInitialize(int* argc, char*** argv) {
    static const char* seeds[] = {"0,1", "gpu", "cpu", "accel", "all", "name:basic,p1", "0-3", "5,0-2", "p0",
                                  " nvidia , 1 ", "name:Portable", "AMD", "gpu,cpu,all", "3-3,p2,name:fpga",
                                  "alloc:0:1", "enqueue:*:*:2", "transfer:1:0", "build:*:3"};
    const char* dir = getenv("MPAR_FUZZ_SEEDS");
    size_t i;
    (void)argc, (void)argv;
    if (!dir) return 0;
    for (i = 0; i < sizeof seeds / sizeof seeds[0]; i++) {
        char path[4096];
        FILE* f;
        snprintf(path, sizeof path, "%s/seed-%02d", dir, (int)i);
        f = fopen(path, "wb");
        if (!f || fputs(seeds[i], f) < 0 || fclose(f) != 0) {
            fprintf(stderr, "fuzz_devices: cannot write %s\n", path);
            exit(1);
        }
    }
    exit(0);
}
