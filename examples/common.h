/* common.h — what the mpar example programs share: command-line options,
   a progress bar, timing. Not part of mpar.h. */
#ifndef EXAMPLES_COMMON_H
#define EXAMPLES_COMMON_H

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* mpar never touches the environment. On a machine whose only OpenCL is
   PoCL on the CPU, these examples want two one-core devices that run in
   parallel, so they ask PoCL for them before the first OpenCL call, unless
   the user chose otherwise. */
static inline void ex_pocl_devices(void) {
    if (!getenv("POCL_DEVICES")) setenv("POCL_DEVICES", "basic basic", 0);
}

static inline double ex_seconds(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

/* The command line against what an example knows: `known` lists its
   options, space-separated, "--name=" for one that takes a value. --help
   (or -h) prints the usage on stdout and exits 0; an unknown or misspelt
   option, a value missing, or a stray argument prints what is wrong and the
   usage on stderr and exits 2. Call it first. */
static inline void ex_args(int argc, char** argv, const char* usage, const char* known) {
    int i;
    for (i = 1; i < argc; i++) {
        const char* a = argv[i];
        const char* k = known;
        size_t n = strcspn(a, "=");
        int takes = -1;
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            fputs(usage, stdout);
            exit(0);
        }
        while (a[0] == '-' && a[1] == '-' && *k) { /* find a's name among the known ones */
            size_t len = strcspn(k, " ");
            size_t name = len > 0 && k[len - 1] == '=' ? len - 1 : len;
            if (name == n && !strncmp(k, a, n)) {
                takes = name < len;
                break;
            }
            k += len;
            while (*k == ' ') k++;
        }
        if (takes < 0) {
            fprintf(stderr, "%s: unknown %s '%s'\n\n%s", argv[0], a[0] == '-' ? "option" : "argument", a, usage);
            exit(2);
        }
        if (!takes && a[n] == '=') {
            fprintf(stderr, "%s: %.*s takes no value\n\n%s", argv[0], (int)n, a, usage);
            exit(2);
        }
        if (takes && a[n] != '=' && ++i >= argc) {
            fprintf(stderr, "%s: %s needs a value\n\n%s", argv[0], a, usage);
            exit(2);
        }
    }
}

/* "--name value" or "--name=value"; returns the value or NULL. */
static inline const char* ex_option(int argc, char** argv, const char* name) {
    int i;
    size_t n = strlen(name);
    for (i = 1; i < argc; i++) {
        if (strncmp(argv[i], name, n) != 0) continue;
        if (argv[i][n] == '=') return argv[i] + n + 1;
        if (argv[i][n] == '\0' && i + 1 < argc) return argv[i + 1];
    }
    return NULL;
}
static inline int ex_flag(int argc, char** argv, const char* name) {
    int i;
    for (i = 1; i < argc; i++)
        if (!strcmp(argv[i], name)) return 1;
    return 0;
}
/* A number option; a value that is not a number exits 2 naming it. */
static inline int ex_int(int argc, char** argv, const char* name, int fallback) {
    const char* v = ex_option(argc, argv, name);
    char* end;
    long x;
    if (!v) return fallback;
    x = strtol(v, &end, 10);
    if (end == v || *end || x < -2147483647L || x > 2147483647L) {
        fprintf(stderr, "%s: %s '%s' is not a whole number\n", argv[0], name, v);
        exit(2);
    }
    return (int)x;
}
static inline double ex_double(int argc, char** argv, const char* name, double fallback) {
    const char* v = ex_option(argc, argv, name);
    char* end;
    double x;
    if (!v) return fallback;
    x = strtod(v, &end);
    if (end == v || *end || x != x) {
        fprintf(stderr, "%s: %s '%s' is not a number\n", argv[0], name, v);
        exit(2);
    }
    return x;
}

/* Parses "D:A-B,D:A-B,..." (device : first-last layer) into stages. */
static inline int ex_parse_stages(const char* text, mpar_stage_desc* out, int capacity) {
    int n = 0;
    const char* p = text;
    while (*p && n < capacity) {
        int d, a, b, used = 0;
        if (sscanf(p, "%d:%d-%d%n", &d, &a, &b, &used) != 3) return -1;
        out[n].device = d, out[n].first_layer = a, out[n].last_layer = b;
        n++;
        p += used;
        if (*p == ',') p++;
        else if (*p) return -1;
    }
    return n;
}

/* Plan options from --plan optimal|proportional and --weights W,W,... */
static inline int ex_plan_options(int argc, char** argv, mpar_plan_options* o, double* weights, int capacity) {
    const char* mode = ex_option(argc, argv, "--plan");
    const char* w = ex_option(argc, argv, "--weights");
    memset(o, 0, sizeof *o);
    if (!mode || !strcmp(mode, "optimal")) return 0;
    if (strcmp(mode, "proportional") != 0) return -1;
    o->mode = MPAR_PLAN_PROPORTIONAL;
    if (w) {
        int n = 0;
        while (*w && n < capacity) {
            char* end;
            weights[n++] = strtod(w, &end);
            if (end == w) return -1;
            w = *end == ',' ? end + 1 : end;
        }
        o->weights = weights;
    }
    return 0;
}

/* The options every example shares, into a pipeline descriptor: --schedule,
   --microbatches (default given), --stages or --plan/--weights, --activations
   fp32|bf16 and --trace (profiling). stages, o and weights are the caller's storage (64 each).
   Returns NULL, or what was wrong. */
static inline const char* ex_pipeline_options(int argc, char** argv, int microbatches, mpar_pipeline_desc* pd,
                                              mpar_stage_desc* stages, mpar_plan_options* o, double* weights) {
    const char* sched = ex_option(argc, argv, "--schedule");
    const char* stage_text = ex_option(argc, argv, "--stages");
    const char* acts = ex_option(argc, argv, "--activations");
    pd->schedule = MPAR_SCHEDULE_1F1B;
    if (acts && strcmp(acts, "fp32") != 0 && strcmp(acts, "bf16") != 0) return "--activations: expected fp32 or bf16";
    pd->activation_type = acts && strcmp(acts, "bf16") == 0 ? MPAR_ACTIVATIONS_BF16 : MPAR_ACTIVATIONS_FP32;
    if (sched && mpar_schedule_kind_parse(sched, &pd->schedule, NULL) != MPAR_SUCCESS)
        return "--schedule: expected sequential, gpipe, 1f1b, interleaved, zbh1, zbh2, zbv or auto";
    pd->microbatches = ex_int(argc, argv, "--microbatches", microbatches);
    pd->virtual_stages = pd->schedule == MPAR_SCHEDULE_INTERLEAVED_1F1B ? 2 : 1;
    pd->profile = ex_option(argc, argv, "--trace") != NULL;
    if (stage_text) {
        pd->stage_count = ex_parse_stages(stage_text, stages, 64);
        if (pd->stage_count <= 0) return "--stages: expected D:A-B,D:A-B,... (device:first-last layer)";
        pd->stages = stages;
    }
    if (ex_plan_options(argc, argv, o, weights, 64) != 0)
        return "--plan: expected optimal, or proportional with --weights W,W,...";
    pd->plan_options = o;
    return NULL;
}

/* After training: the Gantt chart and statistics of the last step, and the
   timeline as a Chrome trace (opens in Perfetto) and an SVG. */
static inline void ex_report_timeline(mpar_pipeline* p, const char* trace_path) {
    mpar_timeline t;
    char svg[1024];
    FILE* f;
    if (mpar_pipeline_get_timeline(p, &t) != MPAR_SUCCESS) return;
    printf("\nlast training step, one row per device:\n");
    mpar_timeline_print_gantt(&t, stdout, 100);
    mpar_timeline_print_stats(&t, stdout);
    if (trace_path && (f = fopen(trace_path, "w")) != NULL) {
        mpar_timeline_write_chrome_trace(&t, f);
        fclose(f);
        printf("trace: %s (open in https://ui.perfetto.dev or chrome://tracing)\n", trace_path);
        snprintf(svg, sizeof svg, "%s.svg", trace_path);
        if ((f = fopen(svg, "w")) != NULL) {
            mpar_timeline_write_svg(&t, f);
            fclose(f);
            printf("timeline picture: %s\n", svg);
        }
    }
    mpar_timeline_free(&t);
}

/* One line, redrawn in place: step, loss, samples/s, ETA. */
static inline void ex_progress(int step, int steps, double loss, double samples_per_s, double elapsed) {
    int width = 30, filled = steps ? width * step / steps : width, i;
    double eta = step ? elapsed * (steps - step) / step : 0.0;
    char bar[64];
    if (!isatty(2)) { /* a log file: a plain line every tenth of the run */
        if (step == steps || (steps >= 10 && step % (steps / 10) < 10 && step > 10))
            fprintf(stderr, "step %d/%d  loss %.4f  %.0f samples/s  %.0fs left\n", step, steps, loss, samples_per_s, eta);
        return;
    }
    for (i = 0; i < width; i++) bar[i] = i < filled ? '#' : '-';
    bar[width] = '\0';
    fprintf(stderr, "\r[%s] step %d/%d  loss %.4f  %.0f samples/s  ETA %.0fs   ", bar, step, steps, loss,
            samples_per_s, eta);
    if (step == steps) fputc('\n', stderr);
    fflush(stderr);
}

#endif
