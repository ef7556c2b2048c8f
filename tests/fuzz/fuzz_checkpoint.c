/* libFuzzer target for the checkpoint parser (no device is touched):
     clang -g -O1 -fsanitize=fuzzer,address,undefined -I. tests/fuzz/fuzz_checkpoint.c \
         -lclblast -lOpenCL -lpthread -lm
   scripts/fuzz.sh builds and runs it with a corpus of real checkpoints.
   Each input is parsed as it is, then "resealed": the size field, end marker
   and every checksum rewritten to match, so that the layout checks behind
   the checksums see hostile input too. Whatever parses is read back in full
   (a weights-only file, format version 2, has no moments to read). */
#define MPAR_IMPLEMENTATION
#include "mpar.h"

int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size);

static void parse_and_read(const unsigned char* d, size_t size) {
    mpar_checkpoint_info info;
    mpar_error err;
    int i, k;
    mpar_result r = mpar_checkpoint_parse(d, size, &info, &err);
    if (r != MPAR_SUCCESS) {
        if (info.layers || !memchr(err.message, '\0', sizeof err.message)) __builtin_trap();
        return;
    }
    for (i = 0; i < info.layer_count; i++) {
        size_t n = info.layers[i].param_count;
        float* f = (float*)malloc(n ? n * sizeof(float) : 1);
        if (n > size / (info.weights_only ? 4 : 12)) __builtin_trap(); /* the parser bounds every count by the data */
        for (k = 0; k < 3; k++) {
            mpar_state_kind kind = k == 0 ? MPAR_STATE_PARAMS : k == 1 ? MPAR_STATE_MOMENT1 : MPAR_STATE_MOMENT2;
            /* a weights-only file has PARAMS alone */
            mpar_result want = info.weights_only && k > 0 ? MPAR_ERROR_INVALID_ARGUMENT : MPAR_SUCCESS;
            if (mpar_checkpoint_get_state(d, size, &info, i, kind, f, &err) != want) __builtin_trap();
        }
        free(f);
    }
    mpar_checkpoint_info_free(&info);
}

/* Rewrites the size field, the end marker and the checksums the way a
   writer would, following the layout as far as the bytes allow. */
static void reseal(unsigned char* d, size_t size) {
    size_t pos = 64, end = size - 16, records[256], params[256], per;
    uint32_t L, i, n = 0;
    per = mpar__ckpt_rd32(d + 8) == MPAR_WEIGHTS_FORMAT_VERSION ? 4 : 12; /* bytes of data per parameter */
    mpar__ckpt_wr64(d + 24, (uint64_t)size);
    memcpy(d + end, "MPAR-END", 8);
    L = mpar__ckpt_rd32(d + 32);
    for (i = 0; i < L && n < 256; i++) { /* the table */
        uint32_t rec;
        if (end - pos < 64) break;
        rec = mpar__ckpt_rd32(d + pos);
        if (rec < 56 || rec > end - pos - 8) break;
        records[n] = pos, params[n] = (size_t)mpar__ckpt_rd64(d + pos + 16), n++;
        pos += rec;
    }
    if (i == L && end - pos >= 8) {
        size_t table_end = pos;
        pos += 8;
        for (i = 0; i < n; i++) { /* the data blocks */
            if (params[i] > (end - pos) / per || end - pos - per * params[i] < 8) break;
            mpar__ckpt_wr64(d + records[i] + 24, (uint64_t)pos);
            mpar__ckpt_wr64(d + pos + per * params[i], mpar__ckpt_checksum(d + pos, per * params[i]));
            pos += per * params[i] + 8;
        }
        mpar__ckpt_wr64(d + table_end, mpar__ckpt_checksum(d, table_end));
    }
    mpar__ckpt_wr64(d + size - 8, mpar__ckpt_checksum(d, size - 8));
}

int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    unsigned char* copy;
    parse_and_read(data, size);
    if (size < 88) return 0;
    copy = (unsigned char*)malloc(size);
    memcpy(copy, data, size);
    reseal(copy, size);
    parse_and_read(copy, size);
    free(copy);
    return 0;
}
