/* data.h — data loaders for the mpar example programs (not part of mpar.h).

   Header-only C99 (also compiles as C++). Every function is `static inline`,
   so a program may include it from one or several files; link with -lz -lm.

   What it loads
     Fashion-MNIST   IDX files, gzip-compressed or plain (Debian package
                     dataset-fashion-mnist). Images become floats in [0,1].
     Text            any plain or gzip text file, or the King James Bible of
                     Debian's bible-kjv-text (/usr/lib/bible.data), whose
                     windowed LZW format is decoded here.
     Characters      a compact vocabulary of the distinct bytes of a text,
                     encode / decode, unigram entropy.
     Randomness      splitmix64: seeded, the same sequence on every platform.

   Errors
     Functions that can fail return an int status: DATA_OK (0) or a negative
     DATA_ERR_*. They never exit or abort, and write a message that names the
     file and what is wrong into the caller's `err` buffer (which may be NULL).
     On failure the output object is left zeroed and owns nothing.

   Configuration
     DATA_FASHION_MNIST_DIR  default data directory; environment variable
                             FASHION_MNIST_DIR overrides it at run time.
     DATA_KJV_PATH           default Bible file; environment variable
                             KJV_BIBLE_DATA overrides it at run time.
     DATA_MAX_FILE_BYTES     largest decompressed file accepted (2 GiB).
     DATA_DEF                storage of every function (static inline).

   Usage
     data_mnist train;
     char err[512];
     if (data_mnist_load_split("train", 0, &train, err, sizeof err) != 0) {
         fprintf(stderr, "%s\n", err);
         return 1;
     }
     data_mnist_shuffle(&train, 42, err, sizeof err);
     ...
     data_mnist_free(&train);

   Revision history
     0.1  Fashion-MNIST, KJV text, charset, entropy, splitmix64.
*/
#ifndef DATA_H
#define DATA_H

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>

#ifndef DATA_DEF
#define DATA_DEF static inline
#endif
#ifndef DATA_FASHION_MNIST_DIR
#define DATA_FASHION_MNIST_DIR "/usr/share/datasets/fashion-mnist"
#endif
#ifndef DATA_KJV_PATH
#define DATA_KJV_PATH "/usr/lib/bible.data"
#endif
#ifndef DATA_MAX_FILE_BYTES
#define DATA_MAX_FILE_BYTES ((size_t)1 << 31)
#endif

#if defined(__GNUC__)
#define DATA__PRINTF(f, a) __attribute__((format(printf, f, a)))
#else
#define DATA__PRINTF(f, a)
#endif

enum {
    DATA_OK = 0,
    DATA_ERR_ARG = -1,    /* a caller's argument is invalid */
    DATA_ERR_IO = -2,     /* a file cannot be opened or read */
    DATA_ERR_FORMAT = -3, /* a file's contents are not what they should be */
    DATA_ERR_NOMEM = -4   /* an allocation failed */
};

typedef struct data_mnist {
    float* images;   /* count x rows x cols, row-major, in [0,1] */
    int32_t* labels; /* count, each 0..9 */
    int count, rows, cols;
} data_mnist;

typedef struct data_text {
    char* bytes; /* size bytes plus a terminating NUL */
    size_t size;
} data_text;

typedef struct data_charset {
    int size;                   /* number of distinct bytes */
    unsigned char symbols[256]; /* id -> byte, ascending */
    int index[256];             /* byte -> id, or -1 */
} data_charset;

typedef struct data_rng {
    uint64_t state;
} data_rng;

/* ---- Errors: status names and the message writer ------------------------ */

DATA_DEF const char* data_status_string(int status) {
    switch (status) {
    case DATA_OK: return "ok";
    case DATA_ERR_ARG: return "invalid argument";
    case DATA_ERR_IO: return "input/output error";
    case DATA_ERR_FORMAT: return "bad file format";
    case DATA_ERR_NOMEM: return "out of memory";
    default: return "unknown status";
    }
}

DATA__PRINTF(4, 5)
DATA_DEF int data__fail(int status, char* err, size_t err_size, const char* fmt, ...) {
    if (err && err_size > 0) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, err_size, fmt, ap);
        va_end(ap);
    }
    return status;
}

DATA_DEF void data__clear_err(char* err, size_t err_size) {
    if (err && err_size > 0) err[0] = '\0';
}

/* ---- Random numbers: splitmix64, so a seed means the same thing anywhere - */

DATA_DEF void data_rng_seed(data_rng* rng, uint64_t seed) { rng->state = seed; }

DATA_DEF uint64_t data_rng_next(data_rng* rng) {
    uint64_t z = (rng->state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* Uniform in [0, n), n > 0; rejection keeps it unbiased. */
DATA_DEF uint32_t data_rng_below(data_rng* rng, uint32_t n) {
    uint64_t limit, x;
    if (n == 0) return 0;
    limit = UINT64_MAX - UINT64_MAX % n;
    do x = data_rng_next(rng);
    while (x >= limit);
    return (uint32_t)(x % n);
}

/* Uniform in [0, 1) with 24 random bits, exact in a float. */
DATA_DEF float data_rng_float(data_rng* rng) {
    return (float)(data_rng_next(rng) >> 40) * (1.0f / 16777216.0f);
}

/* idx <- a permutation of 0..n-1 that depends only on seed. */
DATA_DEF int data_permutation(int32_t* idx, int n, uint64_t seed, char* err, size_t err_size) {
    data_rng rng;
    int i;
    data__clear_err(err, err_size);
    if (!idx || n < 0)
        return data__fail(DATA_ERR_ARG, err, err_size, "data_permutation: bad arguments (n=%d)", n);
    for (i = 0; i < n; i++) idx[i] = i;
    data_rng_seed(&rng, seed);
    for (i = n - 1; i > 0; i--) {
        int j = (int)data_rng_below(&rng, (uint32_t)i + 1);
        int32_t t = idx[i];
        idx[i] = idx[j];
        idx[j] = t;
    }
    return DATA_OK;
}

/* ---- Files: whole-file reads through zlib (gzip or plain) ---------------- */

/* Reads all of path into a malloc'd buffer. gzip streams are inflated and
   their CRC and length checked; other files are read as they are. */
DATA_DEF int data__read_file(const char* path, unsigned char** data, size_t* size, char* err,
                             size_t err_size) {
    gzFile f;
    unsigned char* buf = NULL;
    size_t cap = 0, n = 0;
    int zerr = Z_OK, got = 0, closed;
    const char* zmsg;
    *data = NULL;
    *size = 0;
    if (!path) return data__fail(DATA_ERR_ARG, err, err_size, "(null): no file name given");
    errno = 0;
    f = gzopen(path, "rb");
    if (!f)
        return data__fail(DATA_ERR_IO, err, err_size, "%s: cannot open: %s", path,
                          errno ? strerror(errno) : "out of memory");
    gzbuffer(f, 1u << 17);
    for (;;) {
        size_t want;
        if (n == cap) {
            size_t ncap = cap ? cap * 2 : (size_t)1 << 16;
            unsigned char* nbuf;
            if (cap >= DATA_MAX_FILE_BYTES) {
                gzclose_r(f);
                free(buf);
                return data__fail(DATA_ERR_FORMAT, err, err_size,
                                  "%s: larger than %lu bytes when decompressed", path,
                                  (unsigned long)DATA_MAX_FILE_BYTES);
            }
            nbuf = (unsigned char*)realloc(buf, ncap);
            if (!nbuf) {
                gzclose_r(f);
                free(buf);
                return data__fail(DATA_ERR_NOMEM, err, err_size, "%s: out of memory", path);
            }
            buf = nbuf;
            cap = ncap;
        }
        want = cap - n;
        if (want > (1u << 30)) want = 1u << 30;
        got = gzread(f, buf + n, (unsigned)want);
        if (got < 0) break;
        if (got == 0) break;
        n += (size_t)got;
    }
    zmsg = gzerror(f, &zerr);
    if (got < 0 || (zerr != Z_OK && zerr != Z_BUF_ERROR)) {
        int st = data__fail(DATA_ERR_FORMAT, err, err_size, "%s: corrupt or unreadable: %s", path,
                            zerr == Z_ERRNO ? strerror(errno) : zmsg);
        gzclose_r(f);
        free(buf);
        return st;
    }
    /* Z_BUF_ERROR: the input ended in the middle of a gzip stream. */
    closed = gzclose_r(f);
    if (zerr == Z_BUF_ERROR || closed != Z_OK) {
        free(buf);
        return data__fail(DATA_ERR_FORMAT, err, err_size,
                          "%s: truncated gzip stream (unexpected end of file, zlib status %d)",
                          path, closed != Z_OK ? closed : zerr);
    }
    if (n == 0) {
        free(buf);
        return data__fail(DATA_ERR_FORMAT, err, err_size, "%s: file is empty", path);
    }
    *data = buf;
    *size = n;
    return DATA_OK;
}

/* ---- Fashion-MNIST: IDX parsing and validation --------------------------- */

DATA_DEF uint32_t data__be32(const unsigned char* p) {
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

/* Checks an IDX file of unsigned bytes with ndims dimensions and returns
   them; the payload must fill the rest of the file exactly. */
DATA_DEF int data__idx_check(const char* path, const unsigned char* buf, size_t n, int ndims,
                             uint32_t dims[3], char* err, size_t err_size) {
    uint32_t magic, want_magic = 0x00000800u | (uint32_t)ndims;
    uint64_t items = 1, expect;
    size_t header = 4 + 4 * (size_t)ndims;
    int d;
    if (n < 4)
        return data__fail(DATA_ERR_FORMAT, err, err_size, "%s: %lu bytes is too short for an IDX header",
                          path, (unsigned long)n);
    magic = data__be32(buf);
    if (magic != want_magic)
        return data__fail(DATA_ERR_FORMAT, err, err_size,
                          "%s: bad IDX magic 0x%08lx, expected 0x%08lx (%s)", path,
                          (unsigned long)magic, (unsigned long)want_magic,
                          ndims == 3 ? "ubyte images, 3 dimensions" : "ubyte labels, 1 dimension");
    if (n < header)
        return data__fail(DATA_ERR_FORMAT, err, err_size,
                          "%s: truncated IDX header (%lu of %lu bytes)", path, (unsigned long)n,
                          (unsigned long)header);
    for (d = 0; d < ndims; d++) {
        dims[d] = data__be32(buf + 4 + 4 * d);
        if (dims[d] == 0 || dims[d] > 0x7fffffffu)
            return data__fail(DATA_ERR_FORMAT, err, err_size, "%s: bad IDX dimension %d: %lu", path,
                              d, (unsigned long)dims[d]);
        items *= dims[d];
        if (items > (uint64_t)DATA_MAX_FILE_BYTES)
            return data__fail(DATA_ERR_FORMAT, err, err_size,
                              "%s: IDX dimensions describe more than %lu bytes", path,
                              (unsigned long)DATA_MAX_FILE_BYTES);
    }
    expect = header + items;
    if ((uint64_t)n < expect)
        return data__fail(DATA_ERR_FORMAT, err, err_size,
                          "%s: truncated IDX data: header promises %llu bytes, file has %lu", path,
                          (unsigned long long)expect, (unsigned long)n);
    if ((uint64_t)n > expect)
        return data__fail(DATA_ERR_FORMAT, err, err_size,
                          "%s: %llu bytes of trailing garbage after the IDX data", path,
                          (unsigned long long)((uint64_t)n - expect));
    return DATA_OK;
}

DATA_DEF void data_mnist_free(data_mnist* m) {
    if (!m) return;
    free(m->images);
    free(m->labels);
    memset(m, 0, sizeof *m);
}

DATA_DEF int data__mnist_labels(const char* path, data_mnist* out, uint32_t* total, char* err,
                                size_t err_size) {
    unsigned char* buf;
    size_t n;
    uint32_t dims[3] = {0, 0, 0}, i;
    int st = data__read_file(path, &buf, &n, err, err_size);
    if (st) return st;
    st = data__idx_check(path, buf, n, 1, dims, err, err_size);
    for (i = 0; st == DATA_OK && i < dims[0]; i++)
        if (buf[8 + i] > 9)
            st = data__fail(DATA_ERR_FORMAT, err, err_size, "%s: label %lu is %d, not in 0..9",
                            path, (unsigned long)i, buf[8 + i]);
    if (st == DATA_OK) {
        uint32_t keep = (uint32_t)out->count < dims[0] ? (uint32_t)out->count : dims[0];
        out->labels = (int32_t*)malloc(sizeof(int32_t) * keep);
        if (!out->labels)
            st = data__fail(DATA_ERR_NOMEM, err, err_size, "%s: out of memory", path);
        for (i = 0; st == DATA_OK && i < keep; i++) out->labels[i] = buf[8 + i];
        *total = dims[0];
    }
    free(buf);
    return st;
}

DATA_DEF int data__mnist_images(const char* path, data_mnist* out, int max_count, uint32_t* total,
                                char* err, size_t err_size) {
    unsigned char* buf;
    size_t n, i, pixels;
    uint32_t dims[3] = {0, 0, 0};
    int st = data__read_file(path, &buf, &n, err, err_size);
    if (st) return st;
    st = data__idx_check(path, buf, n, 3, dims, err, err_size);
    if (st == DATA_OK && (dims[1] > 4096 || dims[2] > 4096))
        st = data__fail(DATA_ERR_FORMAT, err, err_size, "%s: images of %lux%lu are implausible",
                        path, (unsigned long)dims[1], (unsigned long)dims[2]);
    if (st == DATA_OK) {
        uint32_t keep = dims[0];
        if (max_count > 0 && (uint32_t)max_count < keep) keep = (uint32_t)max_count;
        pixels = (size_t)keep * dims[1] * dims[2];
        out->images = (float*)malloc(sizeof(float) * pixels);
        if (!out->images) st = data__fail(DATA_ERR_NOMEM, err, err_size, "%s: out of memory", path);
        for (i = 0; st == DATA_OK && i < pixels; i++) out->images[i] = buf[16 + i] / 255.0f;
        out->count = (int)keep;
        out->rows = (int)dims[1];
        out->cols = (int)dims[2];
        *total = dims[0];
    }
    free(buf);
    return st;
}

/* Loads an images/labels pair; max_count <= 0 loads all of it. */
DATA_DEF int data_mnist_load(const char* images_gz, const char* labels_gz, int max_count,
                             data_mnist* out, char* err, size_t err_size) {
    uint32_t nimages = 0, nlabels = 0;
    int st;
    data__clear_err(err, err_size);
    if (!out) return data__fail(DATA_ERR_ARG, err, err_size, "data_mnist_load: out is NULL");
    memset(out, 0, sizeof *out);
    if (!images_gz || !labels_gz)
        return data__fail(DATA_ERR_ARG, err, err_size, "data_mnist_load: %s file name is NULL",
                          images_gz ? "labels" : "images");
    st = data__mnist_images(images_gz, out, max_count, &nimages, err, err_size);
    if (st == DATA_OK) st = data__mnist_labels(labels_gz, out, &nlabels, err, err_size);
    if (st == DATA_OK && nimages != nlabels)
        st = data__fail(DATA_ERR_FORMAT, err, err_size,
                        "%s has %lu images but %s has %lu labels", images_gz,
                        (unsigned long)nimages, labels_gz, (unsigned long)nlabels);
    if (st) data_mnist_free(out);
    return st;
}

/* out <- "<dir>/<file_name>", dir from $FASHION_MNIST_DIR or the default. */
DATA_DEF int data_mnist_path(const char* file_name, char* out, size_t out_size, char* err,
                             size_t err_size) {
    const char* dir = getenv("FASHION_MNIST_DIR");
    int len;
    data__clear_err(err, err_size);
    if (!dir || !*dir) dir = DATA_FASHION_MNIST_DIR;
    if (!file_name || !out || out_size == 0)
        return data__fail(DATA_ERR_ARG, err, err_size, "data_mnist_path: bad arguments");
    len = snprintf(out, out_size, "%s/%s", dir, file_name);
    if (len < 0 || (size_t)len >= out_size)
        return data__fail(DATA_ERR_ARG, err, err_size, "%s/%s: path longer than %lu bytes", dir,
                          file_name, (unsigned long)out_size - 1);
    return DATA_OK;
}

/* split is "train" or "t10k"; files come from data_mnist_path. */
DATA_DEF int data_mnist_load_split(const char* split, int max_count, data_mnist* out, char* err,
                                   size_t err_size) {
    char images[1024], labels[1024], name[64];
    int st;
    if (out) memset(out, 0, sizeof *out);
    if (!out || !split || (strcmp(split, "train") != 0 && strcmp(split, "t10k") != 0))
        return data__fail(DATA_ERR_ARG, err, err_size,
                          "data_mnist_load_split: split must be \"train\" or \"t10k\"");
    snprintf(name, sizeof name, "%s-images-idx3-ubyte.gz", split);
    st = data_mnist_path(name, images, sizeof images, err, err_size);
    if (st) return st;
    snprintf(name, sizeof name, "%s-labels-idx1-ubyte.gz", split);
    st = data_mnist_path(name, labels, sizeof labels, err, err_size);
    if (st) return st;
    return data_mnist_load(images, labels, max_count, out, err, err_size);
}

/* Mean and standard deviation over every pixel. */
DATA_DEF int data_mnist_stats(const data_mnist* m, double* mean, double* std, char* err,
                              size_t err_size) {
    size_t i, n;
    double s = 0.0, ss = 0.0, mu;
    data__clear_err(err, err_size);
    if (mean) *mean = 0.0;
    if (std) *std = 0.0;
    if (!m || !m->images || m->count <= 0 || !mean || !std)
        return data__fail(DATA_ERR_ARG, err, err_size, "data_mnist_stats: empty data set");
    n = (size_t)m->count * (size_t)m->rows * (size_t)m->cols;
    for (i = 0; i < n; i++) s += m->images[i];
    mu = s / (double)n;
    for (i = 0; i < n; i++) ss += (m->images[i] - mu) * (m->images[i] - mu);
    *mean = mu;
    *std = sqrt(ss / (double)n);
    return DATA_OK;
}

/* pixel <- (pixel - mean) / std; use the training set's figures for both. */
DATA_DEF int data_mnist_normalize(data_mnist* m, double mean, double std, char* err,
                                  size_t err_size) {
    size_t i, n;
    data__clear_err(err, err_size);
    if (!m || !m->images || !(std > 0.0))
        return data__fail(DATA_ERR_ARG, err, err_size,
                          "data_mnist_normalize: needs data and std > 0 (std=%g)", std);
    n = (size_t)m->count * (size_t)m->rows * (size_t)m->cols;
    for (i = 0; i < n; i++) m->images[i] = (float)((m->images[i] - mean) / std);
    return DATA_OK;
}

/* Shuffles images and labels together, in place, reproducibly per seed. */
DATA_DEF int data_mnist_shuffle(data_mnist* m, uint64_t seed, char* err, size_t err_size) {
    data_rng rng;
    size_t px, k;
    int i;
    data__clear_err(err, err_size);
    if (!m || (m->count > 0 && (!m->images || !m->labels)))
        return data__fail(DATA_ERR_ARG, err, err_size, "data_mnist_shuffle: no data");
    px = (size_t)m->rows * (size_t)m->cols;
    data_rng_seed(&rng, seed);
    for (i = m->count - 1; i > 0; i--) {
        int j = (int)data_rng_below(&rng, (uint32_t)i + 1);
        float* a = m->images + (size_t)i * px;
        float* b = m->images + (size_t)j * px;
        int32_t t = m->labels[i];
        m->labels[i] = m->labels[j];
        m->labels[j] = t;
        for (k = 0; k < px; k++) {
            float v = a[k];
            a[k] = b[k];
            b[k] = v;
        }
    }
    return DATA_OK;
}

/* Copies examples order[start .. start+batch) (or start.. when order is
   NULL) into x (batch x rows x cols) and y (batch). */
DATA_DEF int data_mnist_batch(const data_mnist* m, const int32_t* order, int start, int batch,
                              float* x, int32_t* y, char* err, size_t err_size) {
    size_t px;
    int b;
    data__clear_err(err, err_size);
    if (!m || !x || !y || start < 0 || batch <= 0 || start > m->count - batch)
        return data__fail(DATA_ERR_ARG, err, err_size,
                          "data_mnist_batch: examples %d..%d outside 0..%d", start,
                          start + batch - 1, m ? m->count - 1 : -1);
    px = (size_t)m->rows * (size_t)m->cols;
    for (b = 0; b < batch; b++) {
        int32_t e = order ? order[start + b] : start + b;
        if (e < 0 || e >= m->count)
            return data__fail(DATA_ERR_ARG, err, err_size, "data_mnist_batch: order[%d]=%ld",
                              start + b, (long)e);
        memcpy(x + (size_t)b * px, m->images + (size_t)e * px, px * sizeof(float));
        y[b] = m->labels[e];
    }
    return DATA_OK;
}

/* ---- KJV Bible: bible-kjv's windowed LZW data file ----------------------
   Layout (tsl.h of bible-kjv, big-endian integers):
     0 "EC", 2 "02", 4 description[80], 84 window size, 88 window count W,
     92 W+1 file offsets of the windows (the last is the end of the file),
     then a 3-byte compress(1) header 1F 9D <flags|maxbits>, then the
     windows. Each window is a separate compress(1) LZW stream that inflates
     to exactly the window size, except the last, which may be shorter. */

typedef struct data__lzw {
    uint16_t prefix[65536];
    unsigned char suffix[65536];
    unsigned char stack[65536];
    /* bit reader: compress(1) reads codes n_bits bytes at a time */
    const unsigned char* in;
    size_t in_size, pos;
    unsigned char chunk[24];
    long offset, size;
    int n_bits, max_bits, block, clear;
    long max_code, max_max_code, free_ent;
} data__lzw;

DATA_DEF long data__lzw_code(data__lzw* z) {
    long code;
    size_t take, byte;
    uint32_t v;
    if (z->clear || z->offset >= z->size || z->free_ent > z->max_code) {
        if (z->free_ent > z->max_code) {
            z->n_bits++;
            z->max_code = z->n_bits == z->max_bits ? z->max_max_code : (1L << z->n_bits) - 1;
        }
        if (z->clear) {
            z->n_bits = 9;
            z->max_code = 511;
            z->clear = 0;
        }
        take = z->in_size - z->pos;
        if (take > (size_t)z->n_bits) take = (size_t)z->n_bits;
        z->size = (long)take * 8 - (z->n_bits - 1);
        if (z->size <= 0) return -1;
        memset(z->chunk, 0, sizeof z->chunk);
        memcpy(z->chunk, z->in + z->pos, take);
        z->pos += take;
        z->offset = 0;
    }
    byte = (size_t)(z->offset >> 3);
    v = (uint32_t)z->chunk[byte] | ((uint32_t)z->chunk[byte + 1] << 8) |
        ((uint32_t)z->chunk[byte + 2] << 16);
    code = (long)((v >> (z->offset & 7)) & ((1u << z->n_bits) - 1));
    z->offset += z->n_bits;
    return code;
}

/* Inflates one window into out (at most cap bytes). 0 ok, -1 bad code,
   -2 more than cap bytes, -3 empty. */
DATA_DEF int data__lzw_window(data__lzw* z, const unsigned char* in, size_t n, unsigned char* out,
                              size_t cap, size_t* out_n) {
    long code, oldcode, incode;
    int finchar;
    size_t o = 0, sp;
    z->in = in;
    z->in_size = n;
    z->pos = 0;
    z->offset = z->size = 0;
    z->clear = 0;
    z->n_bits = 9;
    z->max_code = 511;
    z->free_ent = z->block ? 257 : 256;
    for (code = 0; code < 256; code++) {
        z->prefix[code] = 0;
        z->suffix[code] = (unsigned char)code;
    }
    oldcode = data__lzw_code(z);
    if (oldcode < 0) return -3;
    if (oldcode > 255) return -1;
    finchar = (int)oldcode;
    if (cap < 1) return -2;
    out[o++] = (unsigned char)finchar;
    while ((code = data__lzw_code(z)) >= 0) {
        if (code == 256 && z->block) {
            z->clear = 1;
            z->free_ent = 256;
            if ((code = data__lzw_code(z)) < 0) break;
        }
        incode = code;
        sp = 0;
        if (code > z->free_ent) return -1;
        if (code == z->free_ent) { /* the KwKwK case: a code defined by itself */
            z->stack[sp++] = (unsigned char)finchar;
            code = oldcode;
        }
        while (code >= 256) {
            if (sp >= sizeof z->stack - 1) return -1; /* a loop in a corrupt table */
            z->stack[sp++] = z->suffix[code];
            code = z->prefix[code];
        }
        finchar = z->suffix[code];
        z->stack[sp++] = (unsigned char)finchar;
        if (sp > cap - o) return -2;
        while (sp > 0) out[o++] = z->stack[--sp];
        if (z->free_ent < z->max_max_code) {
            z->prefix[z->free_ent] = (uint16_t)oldcode;
            z->suffix[z->free_ent] = (unsigned char)finchar;
            z->free_ent++;
        }
        oldcode = incode;
    }
    *out_n = o;
    return 0;
}

DATA_DEF void data_text_free(data_text* t) {
    if (!t) return;
    free(t->bytes);
    t->bytes = NULL;
    t->size = 0;
}

/* Length of a verse reference such as "Ge1:1 " or "1Chr12:3 " at s, or 0. */
DATA_DEF size_t data__kjv_ref(const char* s, size_t n) {
    size_t i = 0, k;
    if (i < n && s[i] >= '1' && s[i] <= '3') i++;
    for (k = i; i < n && ((s[i] >= 'A' && s[i] <= 'Z') || (s[i] >= 'a' && s[i] <= 'z')); i++) {}
    if (i == k) return 0;
    for (k = i; i < n && s[i] >= '0' && s[i] <= '9'; i++) {}
    if (i == k || i >= n || s[i++] != ':') return 0;
    for (k = i; i < n && s[i] >= '0' && s[i] <= '9'; i++) {}
    if (i == k || i >= n || s[i] != ' ') return 0;
    return i + 1;
}

/* Removes the title line and the "Book1:1 " reference of every verse, in
   place, so only the verse text remains, one verse a line. */
DATA_DEF int data__kjv_strip(const char* name, data_text* t, char* err, size_t err_size) {
    char* s = t->bytes;
    size_t r = 0, w = 0, line = 1;
    while (r < t->size) {
        const char* nl = (const char*)memchr(s + r, '\n', t->size - r);
        size_t end = nl ? (size_t)(nl - s) + 1 : t->size;
        size_t ref = data__kjv_ref(s + r, end - r);
        if (ref == 0 && line > 1)
            return data__fail(DATA_ERR_FORMAT, err, err_size,
                              "%s: decoded line %lu has no verse reference", name,
                              (unsigned long)line);
        if (ref > 0) {
            memmove(s + w, s + r + ref, end - r - ref);
            w += end - r - ref;
        }
        r = end;
        line++;
    }
    if (w == 0) return data__fail(DATA_ERR_FORMAT, err, err_size, "%s: no verses", name);
    t->size = w;
    s[w] = '\0';
    return DATA_OK;
}

DATA_DEF int data__kjv_header(const char* name, const unsigned char* buf, size_t n,
                              uint32_t* wsize, uint32_t* wnum, int* max_bits, int* block,
                              char* err, size_t err_size) {
    uint32_t ws, wn;
    size_t table_end;
    if (n < 92 || buf[0] != 'E' || buf[1] != 'C')
        return data__fail(DATA_ERR_FORMAT, err, err_size,
                          "%s: not a bible-kjv data file (magic \"EC\" missing)", name);
    if (buf[2] != '0' || buf[3] != '2')
        return data__fail(DATA_ERR_FORMAT, err, err_size,
                          "%s: bible-kjv data file version %c%c, only 02 is supported", name,
                          buf[2] >= 32 && buf[2] < 127 ? buf[2] : '?',
                          buf[3] >= 32 && buf[3] < 127 ? buf[3] : '?');
    ws = data__be32(buf + 84);
    wn = data__be32(buf + 88);
    if (ws == 0 || ws > (1u << 24) || wn == 0 || wn > (uint32_t)((n - 92) / 4))
        return data__fail(DATA_ERR_FORMAT, err, err_size,
                          "%s: bad window size %lu or count %lu", name, (unsigned long)ws,
                          (unsigned long)wn);
    table_end = 92 + 4 * ((size_t)wn + 1);
    if (n < table_end + 3 || buf[table_end] != 0x1f || buf[table_end + 1] != 0x9d)
        return data__fail(DATA_ERR_FORMAT, err, err_size,
                          "%s: compress(1) header 1F 9D missing after the window table", name);
    *max_bits = buf[table_end + 2] & 0x1f;
    *block = (buf[table_end + 2] & 0x80) != 0;
    if (*max_bits < 9 || *max_bits > 16)
        return data__fail(DATA_ERR_FORMAT, err, err_size, "%s: LZW with %d bits is unsupported",
                          name, *max_bits);
    *wsize = ws;
    *wnum = wn;
    return DATA_OK;
}

/* Decodes a bible-kjv data file held in memory. keep_refs = 0 gives verse
   text only; 1 gives the file's text as stored (title, "Ge1:1 " refs). */
DATA_DEF int data_kjv_decode(const unsigned char* buf, size_t n, int keep_refs, const char* name,
                             data_text* out, char* err, size_t err_size) {
    uint32_t wsize = 0, wnum = 0, w;
    int max_bits = 0, block = 0, st;
    size_t table_end, cap, used = 0;
    data__lzw* z;
    data__clear_err(err, err_size);
    if (!name) name = "(memory)";
    if (!out || !buf) return data__fail(DATA_ERR_ARG, err, err_size, "%s: no buffer", name);
    memset(out, 0, sizeof *out);
    st = data__kjv_header(name, buf, n, &wsize, &wnum, &max_bits, &block, err, err_size);
    if (st) return st;
    table_end = 92 + 4 * ((size_t)wnum + 1);
    if (data__be32(buf + 92) != table_end + 3 || data__be32(buf + table_end - 4) != n)
        return data__fail(DATA_ERR_FORMAT, err, err_size,
                          "%s: window table spans bytes %lu..%lu but the file has %lu "
                          "(truncated or trailing garbage)", name,
                          (unsigned long)data__be32(buf + 92),
                          (unsigned long)data__be32(buf + table_end - 4), (unsigned long)n);
    if ((uint64_t)wsize * wnum > 64u << 20)
        return data__fail(DATA_ERR_FORMAT, err, err_size, "%s: more than 64 MiB of text", name);
    cap = (size_t)wsize * wnum;
    z = (data__lzw*)malloc(sizeof *z);
    out->bytes = (char*)malloc(cap + 1);
    if (!z || !out->bytes) {
        free(z);
        data_text_free(out);
        return data__fail(DATA_ERR_NOMEM, err, err_size, "%s: out of memory", name);
    }
    z->max_bits = max_bits;
    z->block = block;
    z->max_max_code = 1L << max_bits;
    for (w = 0; w < wnum && st == DATA_OK; w++) {
        uint32_t a = data__be32(buf + 92 + 4 * (size_t)w), b = data__be32(buf + 96 + 4 * (size_t)w);
        size_t got = 0;
        int r;
        if (b <= a || b > n || b - a > wsize) {
            st = data__fail(DATA_ERR_FORMAT, err, err_size,
                            "%s: window %lu has bad bounds %lu..%lu", name, (unsigned long)w,
                            (unsigned long)a, (unsigned long)b);
            break;
        }
        r = data__lzw_window(z, buf + a, b - a, (unsigned char*)out->bytes + used, wsize, &got);
        if (r != 0 || (w + 1 < wnum && got != wsize))
            st = data__fail(DATA_ERR_FORMAT, err, err_size,
                            "%s: window %lu (bytes %lu..%lu) is corrupt: %s", name,
                            (unsigned long)w, (unsigned long)a, (unsigned long)b,
                            r == -1 ? "invalid LZW code" : r == -2 ? "inflates past the window size"
                            : r == -3 ? "empty" : "inflates short of the window size");
        used += got;
    }
    free(z);
    if (st == DATA_OK) {
        out->size = used;
        out->bytes[used] = '\0';
        if (!keep_refs) st = data__kjv_strip(name, out, err, err_size);
    }
    if (st) data_text_free(out);
    return st;
}

/* ---- Text: plain, gzip or bible-kjv files -------------------------------- */

/* Loads path (NULL: $KJV_BIBLE_DATA or DATA_KJV_PATH). A bible-kjv data
   file gives its verse text, one verse a line; any other file (plain or
   gzip) gives its bytes as they are. */
DATA_DEF int data_text_load(const char* path, data_text* out, char* err, size_t err_size) {
    unsigned char* buf;
    size_t n;
    int st;
    data__clear_err(err, err_size);
    if (!out) return data__fail(DATA_ERR_ARG, err, err_size, "data_text_load: out is NULL");
    memset(out, 0, sizeof *out);
    if (!path) path = getenv("KJV_BIBLE_DATA");
    if (!path || !*path) path = DATA_KJV_PATH;
    st = data__read_file(path, &buf, &n, err, err_size);
    if (st) return st;
    if (n >= 2 && buf[0] == 'E' && buf[1] == 'C') {
        st = data_kjv_decode(buf, n, 0, path, out, err, err_size);
        free(buf);
        return st;
    }
    out->bytes = (char*)realloc(buf, n + 1);
    if (!out->bytes) {
        free(buf);
        return data__fail(DATA_ERR_NOMEM, err, err_size, "%s: out of memory", path);
    }
    out->bytes[n] = '\0';
    out->size = n;
    return DATA_OK;
}

/* ---- Characters: vocabulary, encoding, entropy --------------------------- */

/* The vocabulary is the text's distinct bytes in ascending order. */
DATA_DEF int data_charset_build(const char* text, size_t n, data_charset* cs, char* err,
                                size_t err_size) {
    int seen[256] = {0}, b;
    size_t i;
    data__clear_err(err, err_size);
    if (!cs || (!text && n > 0))
        return data__fail(DATA_ERR_ARG, err, err_size, "data_charset_build: bad arguments");
    memset(cs, 0, sizeof *cs);
    if (n == 0) return data__fail(DATA_ERR_ARG, err, err_size, "data_charset_build: empty text");
    for (i = 0; i < n; i++) seen[(unsigned char)text[i]] = 1;
    for (b = 0; b < 256; b++) {
        cs->index[b] = seen[b] ? cs->size : -1;
        if (seen[b]) cs->symbols[cs->size++] = (unsigned char)b;
    }
    return DATA_OK;
}

DATA_DEF int data_charset_encode(const data_charset* cs, const char* text, size_t n, int32_t* ids,
                                 char* err, size_t err_size) {
    size_t i;
    data__clear_err(err, err_size);
    if (!cs || ((!text || !ids) && n > 0))
        return data__fail(DATA_ERR_ARG, err, err_size, "data_charset_encode: bad arguments");
    for (i = 0; i < n; i++) {
        int id = cs->index[(unsigned char)text[i]];
        if (id < 0)
            return data__fail(DATA_ERR_ARG, err, err_size,
                              "data_charset_encode: byte 0x%02x at %lu is not in the charset",
                              (unsigned char)text[i], (unsigned long)i);
        ids[i] = id;
    }
    return DATA_OK;
}

DATA_DEF int data_charset_decode(const data_charset* cs, const int32_t* ids, size_t n, char* text,
                                 char* err, size_t err_size) {
    size_t i;
    data__clear_err(err, err_size);
    if (!cs || ((!text || !ids) && n > 0))
        return data__fail(DATA_ERR_ARG, err, err_size, "data_charset_decode: bad arguments");
    for (i = 0; i < n; i++) {
        if (ids[i] < 0 || ids[i] >= cs->size)
            return data__fail(DATA_ERR_ARG, err, err_size,
                              "data_charset_decode: id %ld at %lu is outside 0..%d", (long)ids[i],
                              (unsigned long)i, cs->size - 1);
        text[i] = (char)cs->symbols[ids[i]];
    }
    return DATA_OK;
}

/* Entropy of the byte frequencies, in nats per character: the loss a
   model that ignores context cannot beat. */
DATA_DEF int data_unigram_entropy(const char* text, size_t n, double* nats, char* err,
                                  size_t err_size) {
    size_t count[256] = {0}, i;
    double h = 0.0;
    data__clear_err(err, err_size);
    if (nats) *nats = 0.0;
    if (!nats || !text || n == 0)
        return data__fail(DATA_ERR_ARG, err, err_size, "data_unigram_entropy: empty text");
    for (i = 0; i < n; i++) count[(unsigned char)text[i]]++;
    for (i = 0; i < 256; i++)
        if (count[i]) {
            double p = (double)count[i] / (double)n;
            h -= p * log(p);
        }
    *nats = h;
    return DATA_OK;
}

#endif /* DATA_H */
