/* libFuzzer target for the record the ranks of a pipeline across processes
   exchange at create (mpar__digest_decode: what one rank reads of another's
   description; see mpar__mpi_join). No OpenCL or MPI call is made:
     clang -g -O1 -fsanitize=fuzzer,address,undefined -I. tests/fuzz/fuzz_digest.c \
         -lclblast -lOpenCL -lpthread -lm
   scripts/fuzz.sh builds and runs it; with MPAR_FUZZ_SEEDS=DIR set the
   binary only writes its seed corpus (valid records) into DIR and exits.
   Each input is one record as received. Invariants:
   - a record is accepted only at its exact size, with the magic, format 1,
     a result <= 0 and a rank >= 0 (checked against an independent
     reading of the documented layout);
   - an accepted record encodes back to the same bytes;
   - the comparison names a differing part exactly when the parts differ,
     and the part it names is the first that does;
   - a record differing from another in one byte of one part is found to
     differ in that part. */
#define MPAR_IMPLEMENTATION
#include "mpar.h"

int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size);
int LLVMFuzzerInitialize(int* argc, char*** argv);

static uint32_t le32(const uint8_t* p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    mpar__digest d, e;
    unsigned char back[MPAR__DIGEST_BYTES];
    int ok = mpar__digest_decode(data, size, &d) == 0, expect, k, first = -1;
    expect = size == MPAR__DIGEST_BYTES && le32(data) == 0x4744504Du && le32(data + 4) == 1u &&
             (int32_t)le32(data + 8) <= 0 && (int32_t)le32(data + 12) >= 0;
    if (ok != expect) __builtin_trap();
    if (!ok) return 0;
    mpar__digest_encode(&d, back);
    if (memcmp(back, data, MPAR__DIGEST_BYTES) != 0) __builtin_trap();
    /* against a record with the parts' bytes reversed: the first part that
       differs is named */
    e = d;
    for (k = 0; k < MPAR__DIGEST_PARTS; k++) {
        e.part[k] = d.part[MPAR__DIGEST_PARTS - 1 - k];
        if (first < 0 && e.part[k] != d.part[k]) first = k;
    }
    if (mpar__digest_differs(&d, &e) != first || mpar__digest_differs(&e, &d) != first) __builtin_trap();
    if (mpar__digest_differs(&d, &d) != -1) __builtin_trap();
    /* one byte changed in one part: that part differs */
    k = (int)(size ? data[size - 1] % MPAR__DIGEST_PARTS : 0);
    e = d;
    e.part[k] ^= (uint64_t)1 << (data[0] % 64);
    if (mpar__digest_differs(&d, &e) != k) __builtin_trap();
    return 0;
}

/* ---- seed corpus (MPAR_FUZZ_SEEDS=DIR): valid records ---- */
int LLVMFuzzerInitialize(int* argc, char*** argv) {
    const char* dir = getenv("MPAR_FUZZ_SEEDS");
    int i, k;
    (void)argc, (void)argv;
    if (!dir) return 0;
    for (i = 0; i < 4; i++) {
        mpar__digest d;
        unsigned char rec[MPAR__DIGEST_BYTES];
        char path[4096];
        FILE* f;
        d.result = i == 3 ? MPAR_ERROR_INVALID_ARGUMENT : MPAR_SUCCESS, d.rank = i;
        for (k = 0; k < MPAR__DIGEST_PARTS; k++) d.part[k] = 0x9E3779B97F4A7C15ull * (uint64_t)(k + 1 + i * (k & 1));
        mpar__digest_encode(&d, rec);
        snprintf(path, sizeof path, "%s/record%d", dir, i);
        f = fopen(path, "wb");
        if (!f || fwrite(rec, 1, sizeof rec, f) != sizeof rec) return 1;
        fclose(f);
    }
    exit(0);
}
