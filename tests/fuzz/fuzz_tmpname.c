/* libFuzzer target for the temporary-file naming behind every file mpar
   writes (mpar__tmp_create): the folder of a target path (mpar__dir_of),
   the name made for it (mpar__tmp_name) and the parse that decides which
   folder entries are leftovers of dead processes to remove
   (mpar__leftover_pid). Pure functions: no file is touched.
     clang -g -O1 -fsanitize=fuzzer,address,undefined -I. tests/fuzz/fuzz_tmpname.c \
         -lclblast -lOpenCL -lpthread -lm
   scripts/fuzz.sh builds and runs it; with MPAR_FUZZ_SEEDS=DIR set the
   binary only writes its seed corpus into DIR and exits.
   An input is a target path, a NUL, then a folder entry name (bytes after
   a second NUL are ignored). Invariants:
   - mpar__dir_of, for every output size: a NUL-terminated string shorter
     than the size; a prefix of the path (or of "." when the path has no
     slash); with room, exactly the path up to its last slash ("/" for a
     file in the root);
   - mpar__leftover_pid accepts a name exactly when a small reference
     reading of the pattern does (".mpar-", a decimal pid 1..INT_MAX with
     no sign, space or leading zero, '-', six letters or digits, nothing
     more), and the pid it gives, formatted back, is the name's;
   - a name mpar__tmp_name makes (with mkstemp's six characters filled in)
     parses back to its pid, so a dead writer's file is always found. */
#define MPAR_IMPLEMENTATION
#include "mpar.h"

#include <limits.h>

int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size);
int LLVMFuzzerInitialize(int* argc, char*** argv);

static int ref_alnum(char c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9'); }

/* The reference reading: the pid, or -1. */
static long ref_pid(const char* n) {
    size_t len = strlen(n), digits = 0, i;
    long pid = 0;
    if (len < 6 || memcmp(n, ".mpar-", 6) != 0) return -1;
    while (6 + digits < len && n[6 + digits] >= '0' && n[6 + digits] <= '9') digits++;
    if (digits == 0 || digits > 10 || n[6] == '0') return -1;
    if (len != 6 + digits + 1 + 6 || n[6 + digits] != '-') return -1;
    for (i = 0; i < 6; i++)
        if (!ref_alnum(n[6 + digits + 1 + i])) return -1;
    for (i = 0; i < digits; i++) pid = pid * 10 + (n[6 + i] - '0'); /* 10 digits fit a long */
    return pid <= INT_MAX ? pid : -1;
}

static void check_dir_of(const char* path) {
    static const size_t sizes[] = {1, 2, 3, 8, 64, 8192};
    const char* slash = strrchr(path, '/');
    char out[8192], want[8192];
    size_t k, n;
    /* with room: everything before the last slash; "/" for the root; "." with none */
    if (!slash) snprintf(want, sizeof want, ".");
    else if (slash == path) snprintf(want, sizeof want, "/");
    else snprintf(want, sizeof want, "%.*s", (int)(slash - path), path);
    for (k = 0; k < sizeof sizes / sizeof sizes[0]; k++) {
        memset(out, 'Z', sizeof out);
        mpar__dir_of(path, out, sizes[k]);
        n = strnlen(out, sizes[k]);
        if (n >= sizes[k]) __builtin_trap(); /* not terminated within size */
        if (strncmp(out, slash ? path : ".", n) != 0) __builtin_trap(); /* not a prefix */
        if (strncmp(out, want, n) != 0) __builtin_trap();
        if (strlen(want) < sizes[k] && strcmp(out, want) != 0) __builtin_trap(); /* room, but cut */
    }
}

static void check_name(const char* name) {
    long pid = mpar__leftover_pid(name), want = ref_pid(name);
    char back[64];
    if (pid != want) __builtin_trap();
    if (pid < 0) return;
    if (pid < 1 || pid > INT_MAX) __builtin_trap();
    snprintf(back, sizeof back, ".mpar-%ld-%.6s", pid, name + strlen(name) - 6);
    if (strcmp(back, name) != 0) __builtin_trap();
}

/* A name mpar makes in the path's folder, for a pid taken from the input. */
static void check_made(const char* path, const uint8_t* data, size_t size) {
    char dir[4096], tmp[4096 + 64], *base;
    long pid = 1;
    size_t i;
    for (i = 0; i < size && i < 8; i++) pid = (pid * 131 + data[i]) % INT_MAX;
    if (pid < 1) pid = 1;
    mpar__dir_of(path, dir, sizeof dir);
    if (mpar__tmp_name(dir, pid, tmp, sizeof tmp) != 0) {
        if (strlen(dir) + 30 < sizeof tmp) __builtin_trap(); /* it fits: must be made */
        return;
    }
    base = strrchr(tmp, '/');
    if (!base || strncmp(tmp, dir, strlen(dir)) != 0) __builtin_trap();
    base++;
    if (strcmp(base + strlen(base) - 6, MPAR__MKSTEMP_TEMPLATE) != 0) __builtin_trap();
    memcpy(base + strlen(base) - 6, "aZ09Qx", 6); /* what mkstemp might pick */
    if (mpar__leftover_pid(base) != pid) __builtin_trap();
    if (mpar__tmp_name(dir, pid, tmp, strlen(dir) + 10) == 0) __builtin_trap(); /* too small: refused */
}

int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    char path[4096], name[512];
    size_t i = 0, n = 0;
    while (i < size && data[i] && n + 1 < sizeof path) path[n++] = (char)data[i++];
    path[n] = '\0';
    while (i < size && data[i]) i++; /* the rest of an overlong path */
    if (i < size) i++;
    n = 0;
    while (i < size && data[i] && n + 1 < sizeof name) name[n++] = (char)data[i++];
    name[n] = '\0';
    check_dir_of(path);
    check_name(name);
    check_name(path); /* any string is a possible entry name too */
    check_made(path, data, size);
    return 0;
}

/* MPAR_FUZZ_SEEDS=DIR: write the seed corpus and exit. */
int LLVMFuzzerInitialize(int* argc, char*** argv) {
    static const char* seeds[][2] = {
        {"/tmp/run/model.ckpt", ".mpar-1234-AbC123"},
        {"model.ckpt", ".mpar-2147483647-zzzzzz"},
        {"/model.ckpt", ".mpar-2147483648-abcdef"},
        {"a/b/c/", ".mpar-0-abcdef"},
        {"//", ".mpar-012-abcdef"},
        {"cache/x.bin", ".mpar- 12-abcdef"},
        {"", ".mpar-+12-abcdef"},
        {"dir/.mpar-99-XXXXXX", ".mpar-12-abc"},
        {"./f", ".mpar-12-abcdefg"},
        {"../../f", ".mpar-12-abc-ef"},
        {"/", ".mpar--12-abcdef"},
        {"x", ".mpar-12abcdef"},
    };
    const char* dir = getenv("MPAR_FUZZ_SEEDS");
    size_t i;
    (void)argc, (void)argv;
    if (!dir) return 0;
    for (i = 0; i < sizeof seeds / sizeof seeds[0]; i++) {
        char file[4200];
        FILE* f;
        snprintf(file, sizeof file, "%s/seed-%02u", dir, (unsigned)i);
        f = fopen(file, "wb");
        if (!f) exit(1);
        fwrite(seeds[i][0], 1, strlen(seeds[i][0]) + 1, f);
        fwrite(seeds[i][1], 1, strlen(seeds[i][1]), f);
        fclose(f);
    }
    exit(0);
}
