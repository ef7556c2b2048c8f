/* libFuzzer target for schedules as data (no device is touched):
     clang -g -O1 -fsanitize=fuzzer,address,undefined -I. tests/fuzz/fuzz_schedule.c \
         -lclblast -lOpenCL -lpthread -lm
   scripts/fuzz.sh builds and runs it; with MPAR_FUZZ_SEEDS=DIR set the
   binary only writes its seed corpus into DIR (every generator's lists,
   encoded as below) and exits.
   Each input is read as: P (1-4), M (1-6), V (1-3), a placement byte per
   virtual stage (any stage: an uneven one must be refused by name), then
   per stage a count and that many actions (kind byte, any value: an
   unknown one must be refused; micro-batch and chunk bytes, out of range
   allowed). The lists go to mpar_schedule_from_lists_placed; a schedule it
   makes is validated, and
   - a valid one simulates with costs from the input, its derived facts are
     checked against a recount (peaks, split, forward-only), a copy
     validates the same, its forward-only twin validates, and printing it
     stays in bounds;
   - an invalid one fails mpar_simulate with the same code and message;
   every error message is NUL-terminated and non-empty. */
#define MPAR_IMPLEMENTATION
#include "mpar.h"

int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size);
int LLVMFuzzerInitialize(int* argc, char*** argv);

typedef struct reader {
    const uint8_t* p;
    size_t n;
} reader;

static int next(reader* r) {
    if (!r->n) return 0;
    r->n--;
    return *r->p++;
}

static int error_ok(const mpar_error* err, mpar_result r) {
    return err->code == r && memchr(err->message, '\0', sizeof err->message) && err->message[0] != '\0';
}

/* Peaks and flags recounted from the lists, as the header defines them. */
static void check_derived(const mpar_schedule* sc) {
    int s, i, c, split = 0, backward = 0, V = sc->virtual_stages;
    for (s = 0; s < sc->stages; s++) {
        int held = 0, peak = 0;
        for (i = 0; i < sc->action_count[s]; i++) {
            const mpar_action* a = &sc->actions[s][i];
            if (a->kind != MPAR_ACTION_FORWARD) backward = 1;
            if (a->kind == MPAR_ACTION_BACKWARD_INPUT || a->kind == MPAR_ACTION_BACKWARD_WEIGHT) split = 1;
            if (a->kind == MPAR_ACTION_OPTIMIZER_STEP || a->chunk < 0 || a->chunk >= V) continue; /* not a stash */
            if (a->kind == MPAR_ACTION_FORWARD && ++held > peak) peak = held;
            if (a->kind == MPAR_ACTION_BACKWARD || a->kind == MPAR_ACTION_BACKWARD_WEIGHT) held--;
        }
        if (sc->peak_in_flight[s] != peak) __builtin_trap();
        for (c = 0; c < V; c++) {
            int vs = mpar_schedule_virtual_stage(sc, s, c);
            if (vs < 0 || mpar_schedule_stage_of(sc, vs) != s || mpar_schedule_chunk_of(sc, vs) != c) __builtin_trap();
        }
    }
    if (sc->split_backward != split || sc->forward_only != !backward) __builtin_trap();
}

int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    reader r = {data, size};
    int P = 1 + next(&r) % 4, M = 1 + next(&r) % 6, V = 1 + next(&r) % 3, VS = P * V, s, i;
    int placement[12], counts[4];
    mpar_action lists[4][64];
    const mpar_action* ptrs[4];
    mpar_schedule *sc = NULL, *copy = NULL, *fwd = NULL;
    mpar_simulation* sim = NULL;
    mpar_sim_desc d;
    mpar_error err, err2;
    mpar_result res;
    double f[12], b[12];
    FILE* null;
    for (i = 0; i < VS; i++) placement[i] = next(&r) % P;
    for (s = 0; s < P; s++) {
        counts[s] = next(&r) % 64;
        for (i = 0; i < counts[s]; i++) {
            int k = next(&r);
            lists[s][i].kind = (mpar_action_kind)(k < 250 ? (k & 15) % 5 : k); /* 250..255: unknown kinds */
            lists[s][i].microbatch = next(&r) % (M + 1) - (k & 64 ? 1 : 0);
            lists[s][i].chunk = next(&r) % (V + 1);
        }
        ptrs[s] = lists[s];
    }
    res = mpar_schedule_from_lists_placed(NULL, P, M, V, placement, ptrs, counts, &sc, &err);
    if (res != MPAR_SUCCESS) {
        if (sc || !error_ok(&err, res)) __builtin_trap();
        return 0;
    }
    check_derived(sc);
    res = mpar_schedule_validate(sc, &err);
    if (res != MPAR_SUCCESS && !error_ok(&err, res)) __builtin_trap();
    for (i = 0; i < VS; i++) f[i] = 0.1 + next(&r) / 64.0, b[i] = next(&r) / 32.0;
    memset(&d, 0, sizeof d);
    d.forward_per_stage = f, d.backward_per_stage = b, d.link_delay = next(&r) / 128.0;
    d.link_blocking = next(&r) & 1;
    {
        mpar_result rs = mpar_simulate(sc, &d, &sim, &err2);
        if (res != MPAR_SUCCESS) { /* the simulator refuses what validation refuses, with the same words */
            if (rs != res || sim || strcmp(err.message, err2.message) != 0) __builtin_trap();
        } else if (rs != MPAR_SUCCESS) {
            if (!error_ok(&err2, rs)) __builtin_trap(); /* a cost the input made bad */
        } else {
            for (s = 0; s < P; s++)
                if (sim->peak_in_flight[s] != sc->peak_in_flight[s]) __builtin_trap();
        }
    }
    if (mpar_schedule_copy(NULL, sc, &copy, &err2) != MPAR_SUCCESS) __builtin_trap();
    if ((mpar_schedule_validate(copy, &err2) == MPAR_SUCCESS) != (res == MPAR_SUCCESS)) __builtin_trap();
    if (res == MPAR_SUCCESS &&
        mpar_schedule_forward_only(NULL, P, M, V, sc->placement, &fwd, &err2) != MPAR_SUCCESS)
        __builtin_trap();
    null = fopen("/dev/null", "w");
    if (null) {
        mpar_schedule_print(sc, null);
        if (sim) mpar_simulation_print(sim, sc, null, 1 + next(&r) % 100);
        fclose(null);
    }
    mpar_simulation_destroy(sim);
    mpar_schedule_destroy(fwd);
    mpar_schedule_destroy(copy);
    mpar_schedule_destroy(sc);
    return 0;
}

/* Seeds: every generator on small shapes, in the encoding above. */
static void write_seeds(const char* dir) {
    static const mpar_schedule_kind kinds[] = {MPAR_SCHEDULE_GPIPE, MPAR_SCHEDULE_1F1B, MPAR_SCHEDULE_INTERLEAVED_1F1B,
                                               MPAR_SCHEDULE_ZB_H1, MPAR_SCHEDULE_ZB_H2, MPAR_SCHEDULE_ZB_V};
    size_t k;
    int P, M, n = 0;
    for (k = 0; k < sizeof kinds / sizeof kinds[0]; k++)
        for (P = 1; P <= 3; P++)
            for (M = 1; M <= 4; M++) {
                int V = kinds[k] == MPAR_SCHEDULE_ZB_V || kinds[k] == MPAR_SCHEDULE_INTERLEAVED_1F1B ? 2 : 1, s, i;
                mpar_schedule* sc = NULL;
                uint8_t buf[4096];
                size_t len = 0;
                char path[512];
                FILE* f;
                if (mpar_schedule_create(kinds[k], P, M, V, &sc, NULL) != MPAR_SUCCESS) continue;
                buf[len++] = (uint8_t)(P - 1), buf[len++] = (uint8_t)(M - 1), buf[len++] = (uint8_t)(V - 1);
                for (i = 0; i < P * V; i++) buf[len++] = (uint8_t)sc->placement[i];
                for (s = 0; s < P; s++) {
                    buf[len++] = (uint8_t)sc->action_count[s];
                    for (i = 0; i < sc->action_count[s] && len + 3 < sizeof buf; i++) {
                        const mpar_action* a = &sc->actions[s][i];
                        buf[len++] = (uint8_t)(a->kind | (a->microbatch < 0 ? 64 : 0));
                        buf[len++] = (uint8_t)(a->microbatch < 0 ? 0 : a->microbatch);
                        buf[len++] = (uint8_t)a->chunk;
                    }
                }
                mpar_schedule_destroy(sc);
                snprintf(path, sizeof path, "%s/seed_%d", dir, n++);
                f = fopen(path, "wb");
                if (!f) continue;
                fwrite(buf, 1, len, f);
                fclose(f);
            }
}

int LLVMFuzzerInitialize(int* argc, char*** argv) {
    const char* dir = getenv("MPAR_FUZZ_SEEDS");
    (void)argc, (void)argv;
    if (dir) {
        write_seeds(dir);
        exit(0);
    }
    return 0;
}
