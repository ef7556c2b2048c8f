/* common.h — what the mpar example programs share: command-line options,
   a progress bar, timing. Not part of mpar.h. */
#ifndef EXAMPLES_COMMON_H
#define EXAMPLES_COMMON_H

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double ex_seconds(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

/* "--name value" or "--name=value"; returns the value or NULL. */
static const char* ex_option(int argc, char** argv, const char* name) {
    int i;
    size_t n = strlen(name);
    for (i = 1; i < argc; i++) {
        if (strncmp(argv[i], name, n) != 0) continue;
        if (argv[i][n] == '=') return argv[i] + n + 1;
        if (argv[i][n] == '\0' && i + 1 < argc) return argv[i + 1];
    }
    return NULL;
}
static int ex_int(int argc, char** argv, const char* name, int fallback) {
    const char* v = ex_option(argc, argv, name);
    return v ? atoi(v) : fallback;
}
static double ex_double(int argc, char** argv, const char* name, double fallback) {
    const char* v = ex_option(argc, argv, name);
    return v ? atof(v) : fallback;
}

/* Parses "D:A-B,D:A-B,..." (device : first-last layer) into stages. */
static int ex_parse_stages(const char* text, mpar_stage_desc* out, int capacity) {
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

/* One line, redrawn in place: step, loss, samples/s, ETA. */
static void ex_progress(int step, int steps, double loss, double samples_per_s, double elapsed) {
    int width = 30, filled = steps ? width * step / steps : width, i;
    double eta = step ? elapsed * (steps - step) / step : 0.0;
    char bar[64];
    for (i = 0; i < width; i++) bar[i] = i < filled ? '#' : '-';
    bar[width] = '\0';
    fprintf(stderr, "\r[%s] step %d/%d  loss %.4f  %.0f samples/s  ETA %.0fs   ", bar, step, steps, loss,
            samples_per_s, eta);
    if (step == steps) fputc('\n', stderr);
    fflush(stderr);
}

#endif
