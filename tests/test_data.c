/* Tests for examples/data.h: the real Fashion-MNIST and KJV files, and
   corrupt files made here in a temporary directory. The expected figures
   (pixel sums, label order, text sizes, entropy) were computed separately
   with Python's gzip module and a separate LZW decoder. */
#define _POSIX_C_SOURCE 200809L
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <dirent.h>
#include <sys/stat.h>
#include <unistd.h>

#include "../examples/data.h"

#define FM_DIR DATA_FASHION_MNIST_DIR
#define TRAIN_IMAGES FM_DIR "/train-images-idx3-ubyte.gz"
#define TRAIN_LABELS FM_DIR "/train-labels-idx1-ubyte.gz"
#define TEST_IMAGES FM_DIR "/t10k-images-idx3-ubyte.gz"
#define TEST_LABELS FM_DIR "/t10k-labels-idx1-ubyte.gz"
#define GENESIS_1_1 "In the beginning God created the heaven and the earth.\n"

static char tmp_dir[256];
static char err[1024];

/* ---- helpers ------------------------------------------------------------ */

static const char* tmp_path(const char* name) {
    static char paths[8][512];
    static int next;
    char* p = paths[next++ % 8];
    snprintf(p, 512, "%s/%s", tmp_dir, name);
    return p;
}

static void write_plain(const char* path, const void* data, size_t n) {
    FILE* f = fopen(path, "wb");
    assert_non_null(f);
    if (n) assert_int_equal(fwrite(data, 1, n, f), n);
    assert_int_equal(fclose(f), 0);
}

static void write_gz(const char* path, const void* data, size_t n) {
    gzFile f = gzopen(path, "wb");
    assert_non_null(f);
    if (n) assert_int_equal(gzwrite(f, data, (unsigned)n), (int)n);
    assert_int_equal(gzclose(f), Z_OK);
}

static unsigned char* read_raw(const char* path, size_t* n) {
    FILE* f = fopen(path, "rb");
    unsigned char* buf;
    long len;
    assert_non_null(f);
    assert_int_equal(fseek(f, 0, SEEK_END), 0);
    len = ftell(f);
    assert_true(len > 0);
    rewind(f);
    buf = (unsigned char*)malloc((size_t)len + 64);
    assert_non_null(buf);
    assert_int_equal(fread(buf, 1, (size_t)len, f), (size_t)len);
    fclose(f);
    *n = (size_t)len;
    return buf;
}

static void put_be32(unsigned char* p, uint32_t v) {
    p[0] = (unsigned char)(v >> 24);
    p[1] = (unsigned char)(v >> 16);
    p[2] = (unsigned char)(v >> 8);
    p[3] = (unsigned char)v;
}

/* An IDX image file: count images of rows x cols, pixel = (i*7+k) & 255,
   followed by extra bytes; payload_count images are actually written. */
static size_t make_images(unsigned char* buf, uint32_t magic, uint32_t count, uint32_t rows,
                          uint32_t cols, uint32_t payload_count, size_t extra) {
    size_t px = (size_t)rows * cols, i, n = 16 + payload_count * px + extra;
    put_be32(buf, magic);
    put_be32(buf + 4, count);
    put_be32(buf + 8, rows);
    put_be32(buf + 12, cols);
    for (i = 0; i < n - 16; i++) buf[16 + i] = (unsigned char)((i / px) * 7 + i % px);
    return n;
}

static size_t make_labels(unsigned char* buf, uint32_t magic, uint32_t count, int bad_at) {
    uint32_t i;
    put_be32(buf, magic);
    put_be32(buf + 4, count);
    for (i = 0; i < count; i++) buf[8 + i] = (unsigned char)(i % 10);
    if (bad_at >= 0) buf[8 + bad_at] = 10;
    return 8 + count;
}

/* A good pair of 5 images of 4x3 and 5 labels, gzip-compressed. */
static void make_good_pair(const char* images, const char* labels) {
    unsigned char buf[256];
    write_gz(images, buf, make_images(buf, 0x803, 5, 4, 3, 5, 0));
    write_gz(labels, buf, make_labels(buf, 0x801, 5, -1));
}

/* Loading must fail, name bad_file and say `what`; out must own nothing. */
static void expect_fail(const char* images, const char* labels, const char* bad_file,
                        const char* what) {
    data_mnist m;
    int st;
    memset(&m, 0x55, sizeof m);
    err[0] = '\0';
    st = data_mnist_load(images, labels, 0, &m, err, sizeof err);
    if (st >= 0 || !strstr(err, bad_file) || !strstr(err, what))
        print_error("status %d, message \"%s\", wanted \"%s\" naming %s\n", st, err, what,
                    bad_file);
    assert_true(st < 0);
    assert_non_null(strstr(err, bad_file));
    assert_non_null(strstr(err, what));
    assert_null(m.images);
    assert_null(m.labels);
    assert_int_equal(m.count, 0);
}

static int group_setup(void** state) {
    (void)state;
    snprintf(tmp_dir, sizeof tmp_dir, "/tmp/mpar_test_data_XXXXXX");
    return mkdtemp(tmp_dir) ? 0 : -1;
}

static int remove_tree(const char* dir) {
    DIR* d = opendir(dir);
    struct dirent* e;
    while (d && (e = readdir(d)) != NULL) {
        char p[1024];
        struct stat st;
        if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0) continue;
        snprintf(p, sizeof p, "%s/%s", dir, e->d_name);
        if (lstat(p, &st) == 0 && S_ISDIR(st.st_mode))
            remove_tree(p);
        else
            remove(p);
    }
    if (d) closedir(d);
    return rmdir(dir);
}

static int group_teardown(void** state) {
    (void)state;
    return remove_tree(tmp_dir);
}

/* ---- real Fashion-MNIST --------------------------------------------------- */

static uint64_t pixel_sum(const data_mnist* m, int first, int count) {
    uint64_t s = 0;
    size_t i, px = (size_t)m->rows * m->cols;
    for (i = (size_t)first * px; i < (size_t)(first + count) * px; i++)
        s += (uint64_t)lrintf(m->images[i] * 255.0f);
    return s;
}

static void check_real(const char* images, const char* labels, int count, uint64_t sum,
                       uint64_t first_sum, const int32_t first_labels[10]) {
    data_mnist m;
    int hist[10] = {0}, i;
    assert_int_equal(data_mnist_load(images, labels, 0, &m, err, sizeof err), 0);
    assert_string_equal(err, "");
    assert_int_equal(m.count, count);
    assert_int_equal(m.rows, 28);
    assert_int_equal(m.cols, 28);
    for (i = 0; i < m.count; i++) {
        assert_in_range(m.labels[i], 0, 9);
        hist[m.labels[i]]++;
    }
    for (i = 0; i < 10; i++) assert_int_equal(hist[i], count / 10);
    for (i = 0; i < 10; i++) assert_int_equal(m.labels[i], first_labels[i]);
    for (i = 0; i < m.count * 784; i++) {
        assert_true(m.images[i] >= 0.0f);
        assert_true(m.images[i] <= 1.0f);
    }
    assert_true(pixel_sum(&m, 0, 1) == first_sum);
    assert_true(pixel_sum(&m, 0, m.count) == sum);
    data_mnist_free(&m);
    assert_null(m.images);
}

static void test_mnist_train(void** state) {
    static const int32_t first[10] = {9, 0, 0, 3, 0, 2, 7, 2, 5, 5};
    (void)state;
    check_real(TRAIN_IMAGES, TRAIN_LABELS, 60000, 3431114169ull, 76247, first);
}

static void test_mnist_t10k(void** state) {
    static const int32_t first[10] = {9, 2, 1, 1, 6, 1, 4, 6, 5, 7};
    (void)state;
    check_real(TEST_IMAGES, TEST_LABELS, 10000, 573469082ull, 33456, first);
}

static void test_mnist_max_count_and_split(void** state) {
    data_mnist a, b;
    (void)state;
    assert_int_equal(data_mnist_load_split("t10k", 100, &a, err, sizeof err), 0);
    assert_int_equal(a.count, 100);
    assert_int_equal(data_mnist_load(TEST_IMAGES, TEST_LABELS, 1000000, &b, err, sizeof err), 0);
    assert_int_equal(b.count, 10000);
    assert_memory_equal(a.images, b.images, 100 * 784 * sizeof(float));
    assert_memory_equal(a.labels, b.labels, 100 * sizeof(int32_t));
    data_mnist_free(&a);
    data_mnist_free(&b);
    assert_true(data_mnist_load_split("valid", 0, &a, err, sizeof err) < 0);
    assert_non_null(strstr(err, "split"));
}

static void test_mnist_env_dir(void** state) {
    char path[600];
    data_mnist m;
    (void)state;
    assert_int_equal(mkdir(tmp_path("fm"), 0700), 0);
    snprintf(path, sizeof path, "%s/fm/train-images-idx3-ubyte.gz", tmp_dir);
    make_good_pair(path, tmp_path("fm/train-labels-idx1-ubyte.gz"));
    assert_int_equal(setenv("FASHION_MNIST_DIR", tmp_path("fm"), 1), 0);
    assert_int_equal(data_mnist_path("x.gz", path, sizeof path, err, sizeof err), 0);
    assert_string_equal(path, tmp_path("fm/x.gz"));
    assert_int_equal(data_mnist_load_split("train", 0, &m, err, sizeof err), 0);
    assert_int_equal(m.count, 5);
    assert_int_equal(m.rows, 4);
    assert_int_equal(m.cols, 3);
    assert_true(m.images[12 + 1] == 8.0f / 255.0f); /* image 1, pixel 1: 1*7+1 */
    data_mnist_free(&m);
    assert_true(data_mnist_load_split("t10k", 0, &m, err, sizeof err) < 0);
    assert_non_null(strstr(err, tmp_path("fm/t10k-images-idx3-ubyte.gz")));
    assert_int_equal(unsetenv("FASHION_MNIST_DIR"), 0);
    assert_true(data_mnist_path("x", path, 8, err, sizeof err) < 0); /* too long */
}

/* ---- corrupt Fashion-MNIST files ------------------------------------------ */

static void test_corrupt_truncated_gzip(void** state) {
    size_t n;
    unsigned char* raw = read_raw(TEST_LABELS, &n);
    const char* labels = tmp_path("half-labels.gz");
    const char* images = tmp_path("good-images.gz");
    (void)state;
    make_good_pair(images, tmp_path("unused-labels.gz"));
    write_plain(labels, raw, n / 2);
    expect_fail(TEST_IMAGES, labels, labels, "truncated gzip");
    free(raw);
    raw = read_raw(TEST_IMAGES, &n);
    write_plain(tmp_path("half-images.gz"), raw, n / 2);
    expect_fail(tmp_path("half-images.gz"), TEST_LABELS, tmp_path("half-images.gz"),
                "truncated gzip");
    free(raw);
}

static void test_corrupt_truncated_payload(void** state) {
    static unsigned char buf[16 + 10 * 784];
    const char* images = tmp_path("short-images.gz");
    (void)state;
    write_gz(images, buf, make_images(buf, 0x803, 10, 28, 28, 5, 3));
    expect_fail(images, TEST_LABELS, images, "truncated IDX data");
    write_gz(images, buf, 10); /* inside the header */
    expect_fail(images, TEST_LABELS, images, "truncated IDX header");
    write_gz(images, buf, 3);
    expect_fail(images, TEST_LABELS, images, "too short");
}

static void test_corrupt_trailing_garbage(void** state) {
    unsigned char buf[256];
    const char* images = tmp_path("long-images.gz");
    const char* labels = tmp_path("long-labels.gz");
    (void)state;
    make_good_pair(images, labels);
    write_gz(images, buf, make_images(buf, 0x803, 5, 4, 3, 5, 1));
    expect_fail(images, labels, images, "trailing garbage");
    make_good_pair(images, labels);
    write_gz(labels, buf, make_labels(buf, 0x801, 5, -1) + 2);
    expect_fail(images, labels, labels, "trailing garbage");
}

static void test_corrupt_magic(void** state) {
    unsigned char buf[256];
    const char* images = tmp_path("magic-images.gz");
    const char* labels = tmp_path("magic-labels.gz");
    (void)state;
    make_good_pair(images, labels);
    write_gz(images, buf, make_images(buf, 0x804, 5, 4, 3, 5, 0));
    expect_fail(images, labels, images, "bad IDX magic");
    write_gz(images, buf, make_images(buf, 0x0d03, 5, 4, 3, 5, 0)); /* float data */
    expect_fail(images, labels, images, "bad IDX magic");
    make_good_pair(images, labels);
    expect_fail(labels, images, labels, "bad IDX magic"); /* swapped */
    write_gz(labels, buf, make_labels(buf, 0x802, 5, -1));
    make_good_pair(images, tmp_path("unused-labels.gz"));
    expect_fail(images, labels, labels, "bad IDX magic");
    /* not gzip at all, and not IDX either */
    write_plain(images, "hello, world\n", 13);
    expect_fail(images, labels, images, "bad IDX magic");
}

static void test_corrupt_dims(void** state) {
    unsigned char buf[256];
    const char* images = tmp_path("dims-images.gz");
    const char* labels = tmp_path("dims-labels.gz");
    (void)state;
    make_good_pair(images, labels);
    write_gz(images, buf, make_images(buf, 0x803, 5, 0, 3, 5, 0));
    expect_fail(images, labels, images, "bad IDX dimension 1");
    write_gz(images, buf, make_images(buf, 0x803, 0, 4, 3, 0, 0));
    expect_fail(images, labels, images, "bad IDX dimension 0");
    /* dimensions whose product overflows 32 and 64 bits */
    write_gz(images, buf, make_images(buf, 0x803, 0x7fffffffu, 0x7fffffffu, 0x7fffffffu, 0, 60));
    expect_fail(images, labels, images, "IDX dimensions");
    write_gz(images, buf, make_images(buf, 0x803, 0xffffffffu, 4, 3, 5, 0));
    expect_fail(images, labels, images, "bad IDX dimension 0");
    /* more images than the header says */
    write_gz(images, buf, make_images(buf, 0x803, 4, 4, 3, 5, 0));
    expect_fail(images, labels, images, "trailing garbage");
}

static void test_corrupt_label_range(void** state) {
    unsigned char buf[256];
    const char* images = tmp_path("range-images.gz");
    const char* labels = tmp_path("range-labels.gz");
    (void)state;
    make_good_pair(images, labels);
    write_gz(labels, buf, make_labels(buf, 0x801, 5, 3));
    expect_fail(images, labels, labels, "label 3 is 10");
}

static void test_corrupt_count_mismatch(void** state) {
    unsigned char buf[256];
    const char* images = tmp_path("count-images.gz");
    const char* labels = tmp_path("count-labels.gz");
    (void)state;
    make_good_pair(images, labels);
    write_gz(labels, buf, make_labels(buf, 0x801, 4, -1));
    expect_fail(images, labels, images, "has 5 images");
    expect_fail(images, labels, labels, "has 4 labels");
    expect_fail(images, TEST_LABELS, TEST_LABELS, "has 10000 labels");
}

static void test_corrupt_flipped_byte(void** state) {
    size_t n;
    unsigned char* raw = read_raw(TEST_LABELS, &n);
    const char* labels = tmp_path("flip-labels.gz");
    (void)state;
    raw[n / 2] ^= 0x10; /* inside the deflate data */
    write_plain(labels, raw, n);
    expect_fail(TEST_IMAGES, labels, labels, "corrupt");
    raw[n / 2] ^= 0x10;
    raw[n - 7] ^= 0x01; /* the CRC-32 in the gzip trailer */
    write_plain(labels, raw, n);
    expect_fail(TEST_IMAGES, labels, labels, "incorrect data check");
    raw[n - 7] ^= 0x01;
    raw[n - 2] ^= 0x01; /* the length in the gzip trailer */
    write_plain(labels, raw, n);
    expect_fail(TEST_IMAGES, labels, labels, "incorrect length check");
    raw[n - 2] ^= 0x01;
    write_plain(labels, raw, n); /* and intact it loads */
    {
        data_mnist m;
        assert_int_equal(data_mnist_load(TEST_IMAGES, labels, 10, &m, err, sizeof err), 0);
        data_mnist_free(&m);
    }
    free(raw);
}

static void test_corrupt_empty_missing(void** state) {
    const char* images = tmp_path("zero-images.gz");
    const char* labels = tmp_path("zero-labels.gz");
    (void)state;
    make_good_pair(images, labels);
    write_plain(labels, "", 0);
    expect_fail(images, labels, labels, "empty");
    write_gz(labels, "", 0); /* a valid gzip of nothing */
    expect_fail(images, labels, labels, "empty");
    expect_fail(tmp_path("no-such-file.gz"), labels, tmp_path("no-such-file.gz"), "cannot open");
    assert_int_equal(mkdir(tmp_path("a-directory"), 0700), 0);
    expect_fail(tmp_path("a-directory"), labels, tmp_path("a-directory"), "");
}

static void test_bad_arguments(void** state) {
    data_mnist m;
    (void)state;
    assert_int_equal(data_mnist_load(NULL, TEST_LABELS, 0, &m, err, sizeof err), DATA_ERR_ARG);
    assert_int_equal(data_mnist_load(TEST_IMAGES, TEST_LABELS, 0, NULL, err, sizeof err),
                     DATA_ERR_ARG);
    /* no message buffer: still a status, no crash */
    assert_int_equal(data_mnist_load("/nonexistent/x.gz", TEST_LABELS, 0, &m, NULL, 0),
                     DATA_ERR_IO);
    assert_int_equal(data_mnist_load("/nonexistent/x.gz", TEST_LABELS, 0, &m, err, 1),
                     DATA_ERR_IO);
    assert_string_equal(err, "");
    assert_string_equal(data_status_string(DATA_ERR_FORMAT), "bad file format");
}

/* ---- helpers: shuffle, normalise, batch, RNG ------------------------------ */

static void test_shuffle_normalize_batch(void** state) {
    data_mnist m, m2;
    int32_t perm[5], perm2[5], y[2];
    float x[2 * 12];
    double mean = -1.0, std = -1.0;
    int i, k, seen[5] = {0};
    (void)state;
    make_good_pair(tmp_path("s-images.gz"), tmp_path("s-labels.gz"));
    assert_int_equal(
        data_mnist_load(tmp_path("s-images.gz"), tmp_path("s-labels.gz"), 0, &m, err, sizeof err),
        0);
    assert_int_equal(
        data_mnist_load(tmp_path("s-images.gz"), tmp_path("s-labels.gz"), 0, &m2, err, sizeof err),
        0);
    assert_int_equal(data_mnist_shuffle(&m, 7, err, sizeof err), 0);
    assert_int_equal(data_mnist_shuffle(&m2, 7, err, sizeof err), 0);
    assert_memory_equal(m.images, m2.images, 5 * 12 * sizeof(float));
    for (i = 0; i < 5; i++) { /* image i of the file had pixels i*7+k, label i */
        int src = m.labels[i];
        seen[src]++;
        for (k = 0; k < 12; k++) assert_true(m.images[i * 12 + k] == (float)(src * 7 + k) / 255.0f);
    }
    for (i = 0; i < 5; i++) assert_int_equal(seen[i], 1);
    assert_int_equal(data_mnist_stats(&m, &mean, &std, err, sizeof err), 0);
    assert_true(fabs(mean - (14.0 + 5.5) / 255.0) < 1e-6);
    assert_int_equal(data_mnist_normalize(&m, mean, std, err, sizeof err), 0);
    assert_int_equal(data_mnist_stats(&m, &mean, &std, err, sizeof err), 0);
    assert_true(fabs(mean) < 1e-6);
    assert_true(fabs(std - 1.0) < 1e-5);
    assert_true(data_mnist_normalize(&m, 0.0, 0.0, err, sizeof err) < 0);

    assert_int_equal(data_permutation(perm, 5, 3, err, sizeof err), 0);
    assert_int_equal(data_permutation(perm2, 5, 3, err, sizeof err), 0);
    assert_memory_equal(perm, perm2, sizeof perm);
    assert_int_equal(data_mnist_batch(&m2, perm, 3, 2, x, y, err, sizeof err), 0);
    assert_int_equal(y[0], m2.labels[perm[3]]);
    assert_memory_equal(x + 12, m2.images + perm[4] * 12, 12 * sizeof(float));
    assert_true(data_mnist_batch(&m2, perm, 4, 2, x, y, err, sizeof err) < 0);
    perm[3] = 99;
    assert_true(data_mnist_batch(&m2, perm, 3, 2, x, y, err, sizeof err) < 0);
    data_mnist_free(&m);
    data_mnist_free(&m2);
}

static void test_rng(void** state) {
    data_rng a, b;
    int hist[10] = {0}, i;
    int32_t perm[1000], perm2[1000];
    (void)state;
    data_rng_seed(&a, 1);
    data_rng_seed(&b, 1);
    for (i = 0; i < 100; i++) assert_true(data_rng_next(&a) == data_rng_next(&b));
    data_rng_seed(&a, 0); /* splitmix64's published first output for seed 0 */
    assert_true(data_rng_next(&a) == 0xE220A8397B1DCDAFull);
    for (i = 0; i < 100000; i++) hist[data_rng_below(&a, 10)]++;
    for (i = 0; i < 10; i++) assert_in_range(hist[i], 9500, 10500);
    for (i = 0; i < 1000; i++) {
        float f = data_rng_float(&a);
        assert_true(f >= 0.0f && f < 1.0f);
    }
    assert_int_equal(data_permutation(perm, 1000, 1, err, sizeof err), 0);
    assert_int_equal(data_permutation(perm2, 1000, 2, err, sizeof err), 0);
    assert_memory_not_equal(perm, perm2, sizeof perm);
}

/* ---- KJV text ---------------------------------------------------------- */

static void test_text_kjv(void** state) {
    data_text t;
    size_t i, lines = 0;
    (void)state;
    assert_int_equal(data_text_load(NULL, &t, err, sizeof err), 0);
    assert_int_equal(t.size, 4137850);
    assert_int_equal(strncmp(t.bytes, GENESIS_1_1, strlen(GENESIS_1_1)), 0);
    assert_string_equal(t.bytes + t.size - 58,
                        "The grace of our Lord Jesus Christ be with you all. Amen.\n");
    for (i = 0; i < t.size; i++) lines += t.bytes[i] == '\n';
    assert_int_equal(lines, 31102); /* verses in the KJV */
    assert_int_equal(strlen(t.bytes), t.size);
    /* LZW has no checksum: compare with the independent decoder's CRC-32 */
    assert_int_equal(crc32(0L, (const Bytef*)t.bytes, (uInt)t.size), 0xdd06d0f1ul);
    data_text_free(&t);
}

static void test_text_kjv_raw_and_corrupt(void** state) {
    size_t n;
    unsigned char* raw = read_raw(DATA_KJV_PATH, &n);
    unsigned char* copy = (unsigned char*)malloc(n + 64);
    const char* path = tmp_path("bible.data");
    data_text t;
    (void)state;
    memset(copy + n, 0, 64);
    assert_int_equal(data_kjv_decode(raw, n, 1, "kjv", &t, err, sizeof err), 0);
    assert_int_equal(t.size, 4404475);
    assert_int_equal(strncmp(t.bytes, "Holy Bible, Authorized (King James) Version.  Textfile", 54), 0);
    assert_non_null(strstr(t.bytes, "\nGe1:1 " GENESIS_1_1 "Ge1:2 And the earth"));
    assert_int_equal(crc32(0L, (const Bytef*)t.bytes, (uInt)t.size), 0xfab7b8d3ul);
    data_text_free(&t);

#define KJV_FAIL(len, what)                                                      \
    do {                                                                         \
        write_plain(path, copy, (len));                                          \
        assert_true(data_text_load(path, &t, err, sizeof err) < 0);              \
        if (!strstr(err, path) || !strstr(err, what)) print_error("%s\n", err);  \
        assert_non_null(strstr(err, path));                                      \
        assert_non_null(strstr(err, what));                                      \
        assert_null(t.bytes);                                                    \
        memcpy(copy, raw, n);                                                    \
    } while (0)
    memcpy(copy, raw, n);
    KJV_FAIL(n / 2, "truncated");
    KJV_FAIL(n + 5, "trailing garbage");
    KJV_FAIL(60, "not a bible-kjv");
    copy[3] = '3';
    KJV_FAIL(n, "version 03");
    copy[88] = 0x7f; /* window count */
    KJV_FAIL(n, "bad window");
    copy[92 + 4 * 10 + 1] ^= 0x01; /* window 9's end moves 64 KiB on */
    KJV_FAIL(n, "window 9");
    copy[368] = 0x1e; /* compress(1) magic */
    KJV_FAIL(n, "1F 9D");
    copy[370] = 0x91; /* 17-bit codes */
    KJV_FAIL(n, "17 bits");
    /* Flipped codes: these two change the window's length, so they are
       caught; about one random flip in eight is not (LZW has no checksum). */
    copy[2000] ^= 0x5a;
    KJV_FAIL(n, "window 0 (bytes 371..26085) is corrupt: inflates past");
    copy[400000] ^= 0xff;
    KJV_FAIL(n, "window 16 (bytes 397921..423607) is corrupt: inflates short");
#undef KJV_FAIL
    free(copy);
    free(raw);
}

static void test_text_plain_files(void** state) {
    data_text t;
    (void)state;
    write_plain(tmp_path("plain.txt"), "hello\nworld\n", 12);
    assert_int_equal(data_text_load(tmp_path("plain.txt"), &t, err, sizeof err), 0);
    assert_int_equal(t.size, 12);
    assert_string_equal(t.bytes, "hello\nworld\n");
    data_text_free(&t);
    write_gz(tmp_path("plain.txt.gz"), "gzip text", 9);
    assert_int_equal(setenv("KJV_BIBLE_DATA", tmp_path("plain.txt.gz"), 1), 0);
    assert_int_equal(data_text_load(NULL, &t, err, sizeof err), 0);
    assert_int_equal(unsetenv("KJV_BIBLE_DATA"), 0);
    assert_string_equal(t.bytes, "gzip text");
    data_text_free(&t);
    write_plain(tmp_path("zero.txt"), "", 0);
    assert_true(data_text_load(tmp_path("zero.txt"), &t, err, sizeof err) < 0);
    assert_non_null(strstr(err, tmp_path("zero.txt")));
    assert_true(data_text_load(tmp_path("missing.txt"), &t, err, sizeof err) < 0);
    assert_non_null(strstr(err, tmp_path("missing.txt")));
    assert_non_null(strstr(err, "cannot open"));
}

static void test_charset_roundtrip(void** state) {
    static const char kjv_symbols[] =
        "\n !'(),-.:;?ABCDEFGHIJKLMNOPQRSTUVWYZabcdefghijklmnopqrstuvwxyz";
    data_text t;
    data_charset cs;
    int32_t* ids;
    char* back;
    int32_t bad = 63;
    char c;
    (void)state;
    assert_int_equal(data_text_load(NULL, &t, err, sizeof err), 0);
    assert_int_equal(data_charset_build(t.bytes, t.size, &cs, err, sizeof err), 0);
    assert_int_equal(cs.size, 63);
    assert_memory_equal(cs.symbols, kjv_symbols, 63);
    assert_int_equal(cs.index['a'], 37);
    assert_int_equal(cs.index['X'], -1);
    ids = (int32_t*)calloc(t.size, sizeof(int32_t));
    back = (char*)malloc(t.size);
    assert_int_equal(data_charset_encode(&cs, t.bytes, t.size, ids, err, sizeof err), 0);
    assert_int_equal(ids[0], cs.index['I']);
    assert_int_equal(data_charset_decode(&cs, ids, t.size, back, err, sizeof err), 0);
    assert_memory_equal(back, t.bytes, t.size);
    assert_true(data_charset_encode(&cs, "X", 1, ids, err, sizeof err) < 0);
    assert_non_null(strstr(err, "0x58"));
    assert_true(data_charset_decode(&cs, &bad, 1, &c, err, sizeof err) < 0);
    bad = -1;
    assert_true(data_charset_decode(&cs, &bad, 1, &c, err, sizeof err) < 0);
    assert_true(data_charset_build("", 0, &cs, err, sizeof err) < 0);
    free(ids);
    free(back);
    data_text_free(&t);
}

static void test_unigram_entropy(void** state) {
    double h = -1.0;
    data_text t;
    (void)state;
    assert_int_equal(data_unigram_entropy("aabb", 4, &h, err, sizeof err), 0);
    assert_true(fabs(h - log(2.0)) < 1e-12);
    assert_int_equal(data_unigram_entropy("aaaa", 4, &h, err, sizeof err), 0);
    assert_true(fabs(h) < 1e-12);
    assert_int_equal(data_unigram_entropy("abcd", 4, &h, err, sizeof err), 0);
    assert_true(fabs(h - log(4.0)) < 1e-12);
    assert_true(data_unigram_entropy("", 0, &h, err, sizeof err) < 0);
    assert_int_equal(data_text_load(NULL, &t, err, sizeof err), 0);
    assert_int_equal(data_unigram_entropy(t.bytes, t.size, &h, err, sizeof err), 0);
    assert_true(fabs(h - 3.0201575479337053) < 1e-9);
    data_text_free(&t);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_mnist_train),
        cmocka_unit_test(test_mnist_t10k),
        cmocka_unit_test(test_mnist_max_count_and_split),
        cmocka_unit_test(test_mnist_env_dir),
        cmocka_unit_test(test_corrupt_truncated_gzip),
        cmocka_unit_test(test_corrupt_truncated_payload),
        cmocka_unit_test(test_corrupt_trailing_garbage),
        cmocka_unit_test(test_corrupt_magic),
        cmocka_unit_test(test_corrupt_dims),
        cmocka_unit_test(test_corrupt_label_range),
        cmocka_unit_test(test_corrupt_count_mismatch),
        cmocka_unit_test(test_corrupt_flipped_byte),
        cmocka_unit_test(test_corrupt_empty_missing),
        cmocka_unit_test(test_bad_arguments),
        cmocka_unit_test(test_shuffle_normalize_batch),
        cmocka_unit_test(test_rng),
        cmocka_unit_test(test_text_kjv),
        cmocka_unit_test(test_text_kjv_raw_and_corrupt),
        cmocka_unit_test(test_text_plain_files),
        cmocka_unit_test(test_charset_roundtrip),
        cmocka_unit_test(test_unigram_entropy),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
