/* mpar.h - layer-wise model parallelism over OpenCL devices, in one header.

   (top documentation comes here)
*/
#ifndef MPAR_H
#define MPAR_H

#define MPAR_VERSION_MAJOR 0
#define MPAR_VERSION_MINOR 1
#define MPAR_VERSION_PATCH 0
#define MPAR_VERSION_STRING "0.1.0"

#if defined(MPAR_IMPLEMENTATION) && !defined(_POSIX_C_SOURCE) && !defined(_WIN32)
/* setenv, readlink, fsync, pthreads: include mpar.h first in the file that
   defines MPAR_IMPLEMENTATION, or define _POSIX_C_SOURCE yourself. */
#define _POSIX_C_SOURCE 200809L
#endif

#include <stddef.h>
#include <stdint.h>

#ifndef CL_TARGET_OPENCL_VERSION
#define CL_TARGET_OPENCL_VERSION 120
#endif
#ifdef __APPLE__
#include <OpenCL/opencl.h>
#else
#include <CL/cl.h>
#endif

#ifndef MPARDEF
#ifdef MPAR_STATIC
#define MPARDEF static
#else
#define MPARDEF extern
#endif
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* ==========================================================================
   1. Basics: result codes, error detail, allocator and logging hooks.
   ========================================================================== */

/* OpenCL's own error codes (0 and negative values down to about -72) and
   CLBlast's (-1024 .. -2050) pass through unchanged, so a failing call keeps
   the value its documentation lists. mpar's own codes live in -4000 .. -4099. */
typedef enum mpar_result {
    MPAR_SUCCESS = 0,
    MPAR_ERROR_INVALID_ARGUMENT = -4001, /* NULL pointer, bad size, bad index */
    MPAR_ERROR_OUT_OF_HOST_MEMORY = -4002,
    MPAR_ERROR_NO_DEVICE = -4003,        /* no platform, or selection matched nothing */
    MPAR_ERROR_KERNEL_NOT_FOUND = -4004, /* a .cl file is not on the search path */
    MPAR_ERROR_KERNEL_BUILD = -4005,     /* a .cl file failed to build: see the log */
    MPAR_ERROR_INVALID_MODEL = -4006,    /* shapes or layer order do not fit */
    MPAR_ERROR_INVALID_PLAN = -4007,     /* ranges not contiguous, gaps, overlaps */
    MPAR_ERROR_DOES_NOT_FIT = -4008,     /* no plan fits the devices' memory */
    MPAR_ERROR_INVALID_SCHEDULE = -4009, /* a schedule deadlocks or breaks a dependency */
    MPAR_ERROR_IO = -4010,               /* a file could not be read or written */
    MPAR_ERROR_CORRUPT = -4011,          /* a file failed its checks */
    MPAR_ERROR_MISMATCH = -4012,         /* a file belongs to another model */
    MPAR_ERROR_NUMERICAL = -4013,        /* NaN or Inf in loss or gradients */
    MPAR_ERROR_ABORTED = -4014,          /* stopped because another stage failed */
    MPAR_ERROR_INVALID_STATE = -4015,    /* call out of order, or on a destroyed object */
    MPAR_ERROR_INVALID_SELECTION = -4016,/* MPAR_DEVICES / descriptor syntax */
    MPAR_ERROR_TIMEOUT = -4017,
    MPAR_ERROR_UNSUPPORTED = -4018
} mpar_result;

/* A human readable name for any mpar, OpenCL or CLBlast result code. */
MPARDEF const char* mpar_result_string(mpar_result result);

/* Error detail for the parts of mpar that need no context (planner,
   schedules, simulator, checkpoint format). Pass NULL when not wanted. */
typedef struct mpar_error {
    mpar_result code;
    char message[1024];
} mpar_error;

/* Sets err (if any) and returns code: a one-line way to fail with a message. */
MPARDEF mpar_result mpar_error_set(mpar_error* err, mpar_result code, const char* fmt, ...)
#if defined(__GNUC__) || defined(__clang__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;

typedef enum mpar_log_level {
    MPAR_LOG_ERROR = 0,
    MPAR_LOG_WARN = 1,
    MPAR_LOG_INFO = 2,
    MPAR_LOG_DEBUG = 3
} mpar_log_level;

typedef void (*mpar_log_fn)(void* user, mpar_log_level level, const char* message);

/* Run-time allocator; all three or none. */
typedef struct mpar_allocator {
    void* (*alloc)(void* user, size_t size);
    void* (*realloc)(void* user, void* ptr, size_t size);
    void (*free)(void* user, void* ptr);
    void* user;
} mpar_allocator;

/* Micro-batch schedules (section 6). Declared here because the planner
   (section 5) needs to know how many micro-batches each stage keeps. */
typedef enum mpar_schedule_kind {
    MPAR_SCHEDULE_SEQUENTIAL = 0,       /* whole batch, one stage at a time */
    MPAR_SCHEDULE_GPIPE = 1,            /* all forwards, then all backwards */
    MPAR_SCHEDULE_1F1B = 2,             /* PipeDream-Flush */
    MPAR_SCHEDULE_INTERLEAVED_1F1B = 3, /* V model chunks per device */
    MPAR_SCHEDULE_ZB_H1 = 4             /* zero-bubble: B split into I and W */
} mpar_schedule_kind;


/* ==========================================================================
   2. Devices: every platform and device, selection, contexts and queues.
   ========================================================================== */

typedef struct mpar_context mpar_context;

typedef enum mpar_device_type {
    MPAR_DEVICE_OTHER = 0,
    MPAR_DEVICE_CPU = 1,
    MPAR_DEVICE_GPU = 2,
    MPAR_DEVICE_ACCELERATOR = 3
} mpar_device_type;

typedef struct mpar_device_info {
    int index;          /* position in the context's selection (stage order) */
    int global_index;   /* position in the enumeration over all platforms */
    int platform_index; /* which platform (ICD) it comes from */
    int group;          /* devices with the same group share one cl_context */
    mpar_device_type type;
    char name[256];
    char vendor[256];
    char platform[256];
    char version[128];  /* CL_DEVICE_VERSION */
    char driver[128];   /* CL_DRIVER_VERSION */
    uint64_t global_mem_bytes;
    uint64_t max_alloc_bytes;
    int compute_units;
} mpar_device_info;

/* Setup descriptor: a zero-initialised struct means "all defaults". */
typedef struct mpar_desc {
    /* Which devices, in stage order. NULL: the MPAR_DEVICES environment
       variable; if that is unset too, every GPU, or every device when there is
       no GPU. Syntax: comma-separated terms, each one of
         all | gpu | cpu | accel    devices of that type
         N | N-M                   by global index (see mpar_list_devices)
         pN                        every device of platform N
         name:TEXT | TEXT          name, vendor or platform containing TEXT
                                   (case-insensitive)
       Terms select in the order written; a device already selected is not
       selected twice. */
    const char* devices;
    /* Non-zero: every device gets its own cl_context (the mixed-vendor path),
       even when devices share a platform. */
    int context_per_device;
    /* Value given to POCL_DEVICES when it is unset, before OpenCL starts in
       this process. NULL: "basic basic" (two one-core PoCL devices that run in
       parallel); "": leave the environment alone. Has no effect once any
       OpenCL platform was queried in the process. */
    const char* pocl_devices;
    /* Kernel search: this colon-separated list of folders first, then
       MPAR_KERNEL_PATH, then kernels/ beside the executable (or in its parent
       folder), then the compiled-in MPAR_KERNEL_DIR. */
    const char* kernel_path;
    /* Extra OpenCL build options; the MPAR_BUILD_OPTIONS environment
       variable, when set, replaces them. */
    const char* build_options;
    /* Binary cache folder. NULL: MPAR_CACHE_DIR, else $XDG_CACHE_HOME/mpar,
       else $HOME/.cache/mpar. MPAR_CACHE_DIR=off disables it. */
    const char* cache_dir;
    int disable_cache;
    mpar_allocator allocator; /* all NULL: MPAR_MALLOC and friends */
    mpar_log_fn log;          /* NULL: silent */
    void* log_user;
    mpar_log_level log_level; /* messages above this level are dropped */
    /* Receives the reason when mpar_create fails (there is no context then
       to ask). Optional. */
    mpar_error* error;
} mpar_desc;

typedef struct mpar_context_stats {
    int programs_built;       /* built from source */
    int programs_from_cache;  /* loaded from the binary cache */
    int cache_rejected;       /* cache files found but not trusted */
    int cache_written;
} mpar_context_stats;

MPARDEF mpar_result mpar_create(const mpar_desc* desc, mpar_context** out);
MPARDEF void mpar_destroy(mpar_context* ctx);
/* The detail of the last failure on this context: the failing call, file
   and line, or a kernel build log. Never NULL. */
MPARDEF const char* mpar_last_error(const mpar_context* ctx);
MPARDEF int mpar_device_count(const mpar_context* ctx);
MPARDEF mpar_result mpar_device_get_info(const mpar_context* ctx, int device, mpar_device_info* out);
/* The OpenCL objects behind a device: its context and its in-order,
   profiling-enabled queue. They stay owned by mpar. Any pointer may be NULL. */
MPARDEF mpar_result mpar_device_get_cl(const mpar_context* ctx, int device, cl_device_id* device_id,
                                       cl_context* context, cl_command_queue* queue);
MPARDEF mpar_result mpar_context_get_stats(const mpar_context* ctx, mpar_context_stats* out);
/* Every device on every platform, no selection applied. `count` receives
   the total even when `capacity` is smaller. */
MPARDEF mpar_result mpar_list_devices(mpar_device_info* out, int capacity, int* count, const char* pocl_devices,
                                      mpar_error* err);
MPARDEF const char* mpar_device_type_name(mpar_device_type type);

/* ==========================================================================
   3. Kernels: find .cl files, build them per context, cache binaries.
   ========================================================================== */

/* Full path of a kernel file by the search order above; out receives it. */
MPARDEF mpar_result mpar_kernel_find(mpar_context* ctx, const char* file, char* out, size_t out_size);
/* The program built from `file` for the context that `device` belongs to.
   Built once per context and kept; mpar releases it. */
MPARDEF mpar_result mpar_program_get(mpar_context* ctx, int device, const char* file, cl_program* out);
/* A new kernel object; the caller releases it with clReleaseKernel. */
MPARDEF mpar_result mpar_kernel_create(mpar_context* ctx, int device, const char* file, const char* name,
                                       cl_kernel* out);

#ifdef __cplusplus
}
#endif
#endif /* MPAR_H */

/* ==========================================================================
   Implementation
   ========================================================================== */
#ifdef MPAR_IMPLEMENTATION
#ifndef MPAR_IMPLEMENTATION_DONE
#define MPAR_IMPLEMENTATION_DONE

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#if defined(MPAR_MALLOC) && defined(MPAR_FREE) && defined(MPAR_REALLOC)
/* all given */
#elif !defined(MPAR_MALLOC) && !defined(MPAR_FREE) && !defined(MPAR_REALLOC)
#define MPAR_MALLOC(sz) malloc(sz)
#define MPAR_REALLOC(p, sz) realloc(p, sz)
#define MPAR_FREE(p) free(p)
#else
#error "Define all or none of MPAR_MALLOC, MPAR_REALLOC and MPAR_FREE."
#endif

#ifndef MPAR_ASSERT
#include <assert.h>
#define MPAR_ASSERT(x) assert(x)
#endif

/* Sets err and returns code (see the declaration). */
MPARDEF mpar_result mpar_error_set(mpar_error* err, mpar_result code, const char* fmt, ...) {
    if (err) {
        va_list ap;
        err->code = code;
        va_start(ap, fmt);
        vsnprintf(err->message, sizeof err->message, fmt, ap);
        va_end(ap);
    }
    return code;
}


#include <ctype.h>
#include <errno.h>
#include <pthread.h>
#include <sys/stat.h>
#include <unistd.h>

/* --------------------------------------------------------------------------
   1. Basics
   -------------------------------------------------------------------------- */

static const char* mpar__cl_error_name(int code) {
    switch (code) {
#define MPAR__E(x) case x: return #x;
        MPAR__E(CL_DEVICE_NOT_FOUND) MPAR__E(CL_DEVICE_NOT_AVAILABLE) MPAR__E(CL_COMPILER_NOT_AVAILABLE)
        MPAR__E(CL_MEM_OBJECT_ALLOCATION_FAILURE) MPAR__E(CL_OUT_OF_RESOURCES) MPAR__E(CL_OUT_OF_HOST_MEMORY)
        MPAR__E(CL_PROFILING_INFO_NOT_AVAILABLE) MPAR__E(CL_MEM_COPY_OVERLAP) MPAR__E(CL_IMAGE_FORMAT_MISMATCH)
        MPAR__E(CL_IMAGE_FORMAT_NOT_SUPPORTED) MPAR__E(CL_BUILD_PROGRAM_FAILURE) MPAR__E(CL_MAP_FAILURE)
        MPAR__E(CL_MISALIGNED_SUB_BUFFER_OFFSET) MPAR__E(CL_EXEC_STATUS_ERROR_FOR_EVENTS_IN_WAIT_LIST)
        MPAR__E(CL_COMPILE_PROGRAM_FAILURE) MPAR__E(CL_LINKER_NOT_AVAILABLE) MPAR__E(CL_LINK_PROGRAM_FAILURE)
        MPAR__E(CL_DEVICE_PARTITION_FAILED) MPAR__E(CL_KERNEL_ARG_INFO_NOT_AVAILABLE) MPAR__E(CL_INVALID_VALUE)
        MPAR__E(CL_INVALID_DEVICE_TYPE) MPAR__E(CL_INVALID_PLATFORM) MPAR__E(CL_INVALID_DEVICE)
        MPAR__E(CL_INVALID_CONTEXT) MPAR__E(CL_INVALID_QUEUE_PROPERTIES) MPAR__E(CL_INVALID_COMMAND_QUEUE)
        MPAR__E(CL_INVALID_HOST_PTR) MPAR__E(CL_INVALID_MEM_OBJECT) MPAR__E(CL_INVALID_IMAGE_FORMAT_DESCRIPTOR)
        MPAR__E(CL_INVALID_IMAGE_SIZE) MPAR__E(CL_INVALID_SAMPLER) MPAR__E(CL_INVALID_BINARY)
        MPAR__E(CL_INVALID_BUILD_OPTIONS) MPAR__E(CL_INVALID_PROGRAM) MPAR__E(CL_INVALID_PROGRAM_EXECUTABLE)
        MPAR__E(CL_INVALID_KERNEL_NAME) MPAR__E(CL_INVALID_KERNEL_DEFINITION) MPAR__E(CL_INVALID_KERNEL)
        MPAR__E(CL_INVALID_ARG_INDEX) MPAR__E(CL_INVALID_ARG_VALUE) MPAR__E(CL_INVALID_ARG_SIZE)
        MPAR__E(CL_INVALID_KERNEL_ARGS) MPAR__E(CL_INVALID_WORK_DIMENSION) MPAR__E(CL_INVALID_WORK_GROUP_SIZE)
        MPAR__E(CL_INVALID_WORK_ITEM_SIZE) MPAR__E(CL_INVALID_GLOBAL_OFFSET) MPAR__E(CL_INVALID_EVENT_WAIT_LIST)
        MPAR__E(CL_INVALID_EVENT) MPAR__E(CL_INVALID_OPERATION) MPAR__E(CL_INVALID_GL_OBJECT)
        MPAR__E(CL_INVALID_BUFFER_SIZE) MPAR__E(CL_INVALID_MIP_LEVEL) MPAR__E(CL_INVALID_GLOBAL_WORK_SIZE)
        MPAR__E(CL_INVALID_PROPERTY) MPAR__E(CL_INVALID_IMAGE_DESCRIPTOR) MPAR__E(CL_INVALID_COMPILER_OPTIONS)
        MPAR__E(CL_INVALID_LINKER_OPTIONS) MPAR__E(CL_INVALID_DEVICE_PARTITION_COUNT)
#undef MPAR__E
        case -1001: return "CL_PLATFORM_NOT_FOUND_KHR (no OpenCL platform installed)";
        default: return NULL;
    }
}

MPARDEF const char* mpar_result_string(mpar_result result) {
    const char* cl;
    switch (result) {
        case MPAR_SUCCESS: return "MPAR_SUCCESS";
        case MPAR_ERROR_INVALID_ARGUMENT: return "MPAR_ERROR_INVALID_ARGUMENT";
        case MPAR_ERROR_OUT_OF_HOST_MEMORY: return "MPAR_ERROR_OUT_OF_HOST_MEMORY";
        case MPAR_ERROR_NO_DEVICE: return "MPAR_ERROR_NO_DEVICE";
        case MPAR_ERROR_KERNEL_NOT_FOUND: return "MPAR_ERROR_KERNEL_NOT_FOUND";
        case MPAR_ERROR_KERNEL_BUILD: return "MPAR_ERROR_KERNEL_BUILD";
        case MPAR_ERROR_INVALID_MODEL: return "MPAR_ERROR_INVALID_MODEL";
        case MPAR_ERROR_INVALID_PLAN: return "MPAR_ERROR_INVALID_PLAN";
        case MPAR_ERROR_DOES_NOT_FIT: return "MPAR_ERROR_DOES_NOT_FIT";
        case MPAR_ERROR_INVALID_SCHEDULE: return "MPAR_ERROR_INVALID_SCHEDULE";
        case MPAR_ERROR_IO: return "MPAR_ERROR_IO";
        case MPAR_ERROR_CORRUPT: return "MPAR_ERROR_CORRUPT";
        case MPAR_ERROR_MISMATCH: return "MPAR_ERROR_MISMATCH";
        case MPAR_ERROR_NUMERICAL: return "MPAR_ERROR_NUMERICAL";
        case MPAR_ERROR_ABORTED: return "MPAR_ERROR_ABORTED";
        case MPAR_ERROR_INVALID_STATE: return "MPAR_ERROR_INVALID_STATE";
        case MPAR_ERROR_INVALID_SELECTION: return "MPAR_ERROR_INVALID_SELECTION";
        case MPAR_ERROR_TIMEOUT: return "MPAR_ERROR_TIMEOUT";
        case MPAR_ERROR_UNSUPPORTED: return "MPAR_ERROR_UNSUPPORTED";
        default: break;
    }
    cl = mpar__cl_error_name((int)result);
    if (cl) return cl;
    if ((int)result <= -1007 && (int)result >= -1024) return "CLBlast error (matrix/vector argument, see clblast_c.h)";
    if ((int)result <= -2039 && (int)result >= -2050) return "CLBlast error (see clblast_c.h)";
    return "unknown mpar_result";
}

/* Case-insensitive substring test (strcasestr is not C99). */
static int mpar__contains_nocase(const char* hay, const char* needle) {
    size_t n = strlen(needle), i, j;
    if (n == 0) return 1;
    for (i = 0; hay[i]; i++) {
        for (j = 0; j < n && hay[i + j]; j++)
            if (tolower((unsigned char)hay[i + j]) != tolower((unsigned char)needle[j])) break;
        if (j == n) return 1;
    }
    return 0;
}

static uint64_t mpar__fnv1a(uint64_t h, const void* data, size_t n) {
    const unsigned char* p = (const unsigned char*)data;
    size_t i;
    for (i = 0; i < n; i++) {
        h ^= p[i];
        h *= 1099511628211ULL;
    }
    return h;
}
#define MPAR__FNV_SEED 14695981039346656037ULL

/* --------------------------------------------------------------------------
   2. Devices
   -------------------------------------------------------------------------- */

#define MPAR__MAX_DEVICES 64

typedef struct mpar__program {
    int group;
    char* path;
    cl_program program;
    struct mpar__program* next;
} mpar__program;

typedef struct mpar__device {
    mpar_device_info info;
    cl_platform_id platform;
    cl_device_id id;
    cl_command_queue queue;
} mpar__device;

struct mpar_context {
    mpar_allocator allocator;
    mpar_log_fn log;
    void* log_user;
    mpar_log_level log_level;
    int device_count;
    mpar__device devices[MPAR__MAX_DEVICES];
    int group_count;
    cl_context groups[MPAR__MAX_DEVICES];
    char* kernel_path;   /* desc->kernel_path copy, may be NULL */
    char* build_options; /* never NULL */
    char* cache_dir;     /* NULL: cache off */
    mpar__program* programs;
    mpar_context_stats stats;
    pthread_mutex_t lock; /* guards error, programs, stats */
    char* error;          /* last error detail, never NULL after create */
    size_t error_cap;
};

static void* mpar__alloc(const mpar_context* ctx, size_t size) {
    if (ctx && ctx->allocator.alloc) return ctx->allocator.alloc(ctx->allocator.user, size);
    return MPAR_MALLOC(size);
}
static void mpar__free(const mpar_context* ctx, void* p) {
    if (!p) return;
    if (ctx && ctx->allocator.free) {
        ctx->allocator.free(ctx->allocator.user, p);
        return;
    }
    MPAR_FREE(p);
}
static char* mpar__strdup(const mpar_context* ctx, const char* s) {
    size_t n = strlen(s) + 1;
    char* d = (char*)mpar__alloc(ctx, n);
    if (d) memcpy(d, s, n);
    return d;
}

static void mpar__log(const mpar_context* ctx, mpar_log_level level, const char* fmt, ...)
#if defined(__GNUC__) || defined(__clang__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;
static void mpar__log(const mpar_context* ctx, mpar_log_level level, const char* fmt, ...) {
    char buf[1024];
    va_list ap;
    if (!ctx || !ctx->log || level > ctx->log_level) return;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    ctx->log(ctx->log_user, level, buf);
}

/* Records the failure detail on the context and returns code. The detail
   may be long (a build log), so it grows as needed. */
static mpar_result mpar__fail(mpar_context* ctx, mpar_result code, const char* fmt, ...)
#if defined(__GNUC__) || defined(__clang__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;
static mpar_result mpar__fail(mpar_context* ctx, mpar_result code, const char* fmt, ...) {
    va_list ap;
    int n;
    if (!ctx) return code;
    pthread_mutex_lock(&ctx->lock);
    va_start(ap, fmt);
    n = vsnprintf(ctx->error, ctx->error_cap, fmt, ap);
    va_end(ap);
    if (n >= 0 && (size_t)n >= ctx->error_cap) {
        char* bigger = (char*)mpar__alloc(ctx, (size_t)n + 1);
        if (bigger) {
            mpar__free(ctx, ctx->error);
            ctx->error = bigger;
            ctx->error_cap = (size_t)n + 1;
            va_start(ap, fmt);
            vsnprintf(ctx->error, ctx->error_cap, fmt, ap);
            va_end(ap);
        }
    }
    pthread_mutex_unlock(&ctx->lock);
    mpar__log(ctx, MPAR_LOG_ERROR, "%s: %.900s", mpar_result_string(code), ctx->error);
    return code;
}

/* One check for every OpenCL call: the call's text, file and line go into
   the context's error detail, and the CL code is returned unchanged. */
static mpar_result mpar__cl_check(mpar_context* ctx, cl_int status, const char* call, const char* file, int line) {
    if (status == CL_SUCCESS) return MPAR_SUCCESS;
    return mpar__fail(ctx, (mpar_result)status, "%s failed with %s (%d) at %s:%d", call,
                      mpar_result_string((mpar_result)status), (int)status, file, line);
}
#define MPAR__CL(ctx, call)                                                                  \
    do {                                                                                     \
        mpar_result mpar__r = mpar__cl_check((ctx), (call), #call, __FILE__, __LINE__);      \
        if (mpar__r != MPAR_SUCCESS) return mpar__r;                                         \
    } while (0)

MPARDEF const char* mpar_device_type_name(mpar_device_type type) {
    switch (type) {
        case MPAR_DEVICE_CPU: return "cpu";
        case MPAR_DEVICE_GPU: return "gpu";
        case MPAR_DEVICE_ACCELERATOR: return "accelerator";
        default: return "other";
    }
}

static void mpar__pocl_default(const char* pocl_devices) {
    const char* value = pocl_devices ? pocl_devices : "basic basic";
    if (value[0] == '\0' || getenv("POCL_DEVICES")) return;
#ifndef _WIN32
    setenv("POCL_DEVICES", value, 0);
#endif
}

static void mpar__device_strings(cl_device_id id, cl_platform_id platform, mpar_device_info* info) {
    cl_device_type t = 0;
    cl_ulong mem = 0, alloc = 0;
    cl_uint cu = 0;
    clGetDeviceInfo(id, CL_DEVICE_NAME, sizeof info->name, info->name, NULL);
    clGetDeviceInfo(id, CL_DEVICE_VENDOR, sizeof info->vendor, info->vendor, NULL);
    clGetDeviceInfo(id, CL_DEVICE_VERSION, sizeof info->version, info->version, NULL);
    clGetDeviceInfo(id, CL_DRIVER_VERSION, sizeof info->driver, info->driver, NULL);
    clGetPlatformInfo(platform, CL_PLATFORM_NAME, sizeof info->platform, info->platform, NULL);
    clGetDeviceInfo(id, CL_DEVICE_TYPE, sizeof t, &t, NULL);
    clGetDeviceInfo(id, CL_DEVICE_GLOBAL_MEM_SIZE, sizeof mem, &mem, NULL);
    clGetDeviceInfo(id, CL_DEVICE_MAX_MEM_ALLOC_SIZE, sizeof alloc, &alloc, NULL);
    clGetDeviceInfo(id, CL_DEVICE_MAX_COMPUTE_UNITS, sizeof cu, &cu, NULL);
    info->type = (t & CL_DEVICE_TYPE_GPU) ? MPAR_DEVICE_GPU
               : (t & CL_DEVICE_TYPE_CPU) ? MPAR_DEVICE_CPU
               : (t & CL_DEVICE_TYPE_ACCELERATOR) ? MPAR_DEVICE_ACCELERATOR : MPAR_DEVICE_OTHER;
    info->global_mem_bytes = mem;
    info->max_alloc_bytes = alloc;
    info->compute_units = (int)cu;
}

/* Enumerates up to MPAR__MAX_DEVICES devices over every platform. */
static mpar_result mpar__enumerate(mpar__device* out, int* count, mpar_error* err) {
    cl_platform_id platforms[16];
    cl_uint np = 0, p;
    cl_int st = clGetPlatformIDs(16, platforms, &np);
    *count = 0;
    if (st != CL_SUCCESS || np == 0)
        return mpar_error_set(err, MPAR_ERROR_NO_DEVICE,
                              "no OpenCL platform found (clGetPlatformIDs: %s); is an ICD such as "
                              "pocl-opencl-icd installed and OCL_ICD_VENDORS right?",
                              mpar_result_string((mpar_result)st));
    if (np > 16) np = 16;
    for (p = 0; p < np; p++) {
        cl_device_id ids[MPAR__MAX_DEVICES];
        cl_uint nd = 0, d;
        if (clGetDeviceIDs(platforms[p], CL_DEVICE_TYPE_ALL, MPAR__MAX_DEVICES, ids, &nd) != CL_SUCCESS) continue;
        if (nd > MPAR__MAX_DEVICES) nd = MPAR__MAX_DEVICES;
        for (d = 0; d < nd && *count < MPAR__MAX_DEVICES; d++) {
            mpar__device* dev = &out[*count];
            memset(dev, 0, sizeof *dev);
            dev->platform = platforms[p];
            dev->id = ids[d];
            mpar__device_strings(ids[d], platforms[p], &dev->info);
            dev->info.global_index = *count;
            dev->info.platform_index = (int)p;
            (*count)++;
        }
    }
    if (*count == 0) return mpar_error_set(err, MPAR_ERROR_NO_DEVICE, "OpenCL platforms found, but no device");
    return MPAR_SUCCESS;
}

MPARDEF mpar_result mpar_list_devices(mpar_device_info* out, int capacity, int* count, const char* pocl_devices,
                                      mpar_error* err) {
    mpar__device* all;
    int n = 0, i;
    mpar_result r;
    if (!count || capacity < 0 || (capacity > 0 && !out))
        return mpar_error_set(err, MPAR_ERROR_INVALID_ARGUMENT, "mpar_list_devices: count is NULL, or out is NULL "
                                                                "with a positive capacity");
    all = (mpar__device*)MPAR_MALLOC(sizeof(mpar__device) * MPAR__MAX_DEVICES);
    if (!all) return mpar_error_set(err, MPAR_ERROR_OUT_OF_HOST_MEMORY, "out of host memory");
    mpar__pocl_default(pocl_devices);
    r = mpar__enumerate(all, &n, err);
    *count = n;
    for (i = 0; i < n && i < capacity; i++) out[i] = all[i].info;
    MPAR_FREE(all);
    return r;
}

static int mpar__is_digits(const char* s, size_t n) {
    size_t i;
    if (n == 0) return 0;
    for (i = 0; i < n; i++)
        if (!isdigit((unsigned char)s[i])) return 0;
    return 1;
}

/* Marks the devices one selection term picks, appending them in order. */
static mpar_result mpar__select_term(const char* term, const mpar__device* all, int n, int* order, int* count,
                                     mpar_error* err) {
    size_t len = strlen(term);
    int i, lo = -1, hi = -1, matched = 0;
    const char* dash = strchr(term, '-');
    int type = -1, platform = -1;
    const char* text = NULL;
    if (!strcmp(term, "all")) lo = 0, hi = n - 1;
    else if (!strcmp(term, "gpu")) type = MPAR_DEVICE_GPU;
    else if (!strcmp(term, "cpu")) type = MPAR_DEVICE_CPU;
    else if (!strcmp(term, "accel") || !strcmp(term, "accelerator")) type = MPAR_DEVICE_ACCELERATOR;
    else if (mpar__is_digits(term, len)) lo = hi = atoi(term);
    else if (dash && mpar__is_digits(term, (size_t)(dash - term)) && mpar__is_digits(dash + 1, strlen(dash + 1))) {
        lo = atoi(term);
        hi = atoi(dash + 1);
        if (hi < lo) return mpar_error_set(err, MPAR_ERROR_INVALID_SELECTION, "device range '%s' runs backwards", term);
    } else if (term[0] == 'p' && mpar__is_digits(term + 1, len - 1)) platform = atoi(term + 1);
    else if (!strncmp(term, "name:", 5)) text = term + 5;
    else text = term;
    if (lo >= 0 && hi >= n)
        return mpar_error_set(err, MPAR_ERROR_NO_DEVICE, "device index %d does not exist (%d device%s found)", hi, n,
                              n == 1 ? "" : "s");
    for (i = 0; i < n; i++) {
        const mpar_device_info* d = &all[i].info;
        int hit = (lo >= 0 && i >= lo && i <= hi) || (type >= 0 && (int)d->type == type) ||
                  (platform >= 0 && d->platform_index == platform) ||
                  (text && text[0] && (mpar__contains_nocase(d->name, text) || mpar__contains_nocase(d->vendor, text) ||
                                       mpar__contains_nocase(d->platform, text)));
        int k, seen = 0;
        if (!hit) continue;
        matched = 1;
        for (k = 0; k < *count; k++) seen |= order[k] == i;
        if (!seen) order[(*count)++] = i;
    }
    if (!matched)
        return mpar_error_set(err, MPAR_ERROR_NO_DEVICE, "device selection term '%s' matches none of the %d device%s",
                              term, n, n == 1 ? "" : "s");
    return MPAR_SUCCESS;
}

/* Parses a selection string into device positions (see mpar_desc.devices). */
static mpar_result mpar__select(const char* spec, const mpar__device* all, int n, int* order, int* count,
                                mpar_error* err) {
    char term[256];
    const char* p = spec;
    *count = 0;
    if (!spec || !spec[0]) {
        int i, gpus = 0;
        for (i = 0; i < n; i++) gpus += all[i].info.type == MPAR_DEVICE_GPU;
        return mpar__select_term(gpus ? "gpu" : "all", all, n, order, count, err);
    }
    while (*p) {
        size_t len = strcspn(p, ",");
        size_t a = 0, b = len;
        while (a < b && isspace((unsigned char)p[a])) a++;
        while (b > a && isspace((unsigned char)p[b - 1])) b--;
        if (b == a) return mpar_error_set(err, MPAR_ERROR_INVALID_SELECTION, "empty term in device selection '%s'", spec);
        if (b - a >= sizeof term)
            return mpar_error_set(err, MPAR_ERROR_INVALID_SELECTION, "device selection term too long in '%s'", spec);
        memcpy(term, p + a, b - a);
        term[b - a] = '\0';
        {
            mpar_result r = mpar__select_term(term, all, n, order, count, err);
            if (r != MPAR_SUCCESS) return r;
        }
        p += len;
        if (*p == ',') p++;
    }
    return MPAR_SUCCESS;
}

/* Devices of one platform share a cl_context unless asked otherwise.
   Grouped by the platform's position, not its handle: the ICD loader may hand
   out one handle twice when two ICD files name the same driver, and those
   must still behave as the separate platforms the user configured. */
static mpar_result mpar__create_contexts(mpar_context* ctx, int per_device) {
    int i, j;
    for (i = 0; i < ctx->device_count; i++) {
        mpar__device* d = &ctx->devices[i];
        cl_device_id ids[MPAR__MAX_DEVICES];
        cl_context_properties props[3];
        cl_int st = CL_SUCCESS;
        int n = 0;
        if (d->info.group >= 0) continue;
        for (j = i; j < ctx->device_count; j++) {
            mpar__device* e = &ctx->devices[j];
            if (e->info.group < 0 && e->info.platform_index == d->info.platform_index && (j == i || !per_device)) {
                e->info.group = ctx->group_count;
                ids[n++] = e->id;
            }
        }
        props[0] = CL_CONTEXT_PLATFORM;
        props[1] = (cl_context_properties)d->platform;
        props[2] = 0;
        ctx->groups[ctx->group_count] = clCreateContext(props, (cl_uint)n, ids, NULL, NULL, &st);
        MPAR__CL(ctx, st);
        ctx->group_count++;
    }
    for (i = 0; i < ctx->device_count; i++) {
        mpar__device* d = &ctx->devices[i];
        cl_int st = CL_SUCCESS;
        d->queue = clCreateCommandQueue(ctx->groups[d->info.group], d->id, CL_QUEUE_PROFILING_ENABLE, &st);
        MPAR__CL(ctx, st);
    }
    return MPAR_SUCCESS;
}

static char* mpar__default_cache_dir(const mpar_context* ctx) {
    const char* env = getenv("MPAR_CACHE_DIR");
    const char* base;
    char buf[4096];
    if (env && env[0]) return strcmp(env, "off") ? mpar__strdup(ctx, env) : NULL;
    base = getenv("XDG_CACHE_HOME");
    if (base && base[0]) snprintf(buf, sizeof buf, "%s/mpar", base);
    else if ((base = getenv("HOME")) != NULL && base[0]) snprintf(buf, sizeof buf, "%s/.cache/mpar", base);
    else return NULL;
    return mpar__strdup(ctx, buf);
}

static mpar_result mpar__create_setup(mpar_context* ctx, const mpar_desc* d, mpar_error* err) {
    mpar__device* all = (mpar__device*)mpar__alloc(ctx, sizeof(mpar__device) * MPAR__MAX_DEVICES);
    int order[MPAR__MAX_DEVICES], n = 0, count = 0, i;
    const char* spec = d->devices ? d->devices : getenv("MPAR_DEVICES");
    const char* opts = getenv("MPAR_BUILD_OPTIONS");
    mpar_result r;
    if (!all) return mpar_error_set(err, MPAR_ERROR_OUT_OF_HOST_MEMORY, "out of host memory");
    mpar__pocl_default(d->pocl_devices);
    r = mpar__enumerate(all, &n, err);
    if (r == MPAR_SUCCESS) r = mpar__select(spec, all, n, order, &count, err);
    for (i = 0; r == MPAR_SUCCESS && i < count; i++) {
        ctx->devices[i] = all[order[i]];
        ctx->devices[i].info.index = i;
        ctx->devices[i].info.group = -1;
    }
    mpar__free(ctx, all);
    if (r != MPAR_SUCCESS) return r;
    ctx->device_count = count;
    ctx->kernel_path = d->kernel_path ? mpar__strdup(ctx, d->kernel_path) : NULL;
    ctx->build_options = mpar__strdup(ctx, opts ? opts : d->build_options ? d->build_options : "");
    ctx->cache_dir = d->disable_cache ? NULL : d->cache_dir ? mpar__strdup(ctx, d->cache_dir)
                                                            : mpar__default_cache_dir(ctx);
    if (!ctx->build_options || (d->kernel_path && !ctx->kernel_path))
        return mpar_error_set(err, MPAR_ERROR_OUT_OF_HOST_MEMORY, "out of host memory");
    r = mpar__create_contexts(ctx, d->context_per_device);
    if (r != MPAR_SUCCESS) return mpar_error_set(err, r, "%s", ctx->error);
    return MPAR_SUCCESS;
}

MPARDEF mpar_result mpar_create(const mpar_desc* desc, mpar_context** out) {
    mpar_desc d;
    mpar_context* ctx;
    mpar_result r;
    mpar_error* err = desc ? desc->error : NULL;
    if (!desc || !out) return mpar_error_set(err, MPAR_ERROR_INVALID_ARGUMENT, "mpar_create: desc or out is NULL");
    *out = NULL;
    d = *desc;
    if ((d.allocator.alloc || d.allocator.realloc || d.allocator.free) &&
        !(d.allocator.alloc && d.allocator.realloc && d.allocator.free))
        return mpar_error_set(err, MPAR_ERROR_INVALID_ARGUMENT, "mpar_desc.allocator: give all three functions or none");
    if (d.log_level == 0 && d.log) d.log_level = MPAR_LOG_INFO;
    ctx = (mpar_context*)(d.allocator.alloc ? d.allocator.alloc(d.allocator.user, sizeof *ctx)
                                            : MPAR_MALLOC(sizeof *ctx));
    if (!ctx) return mpar_error_set(err, MPAR_ERROR_OUT_OF_HOST_MEMORY, "out of host memory");
    memset(ctx, 0, sizeof *ctx);
    ctx->allocator = d.allocator;
    ctx->log = d.log;
    ctx->log_user = d.log_user;
    ctx->log_level = d.log_level;
    pthread_mutex_init(&ctx->lock, NULL);
    ctx->error_cap = 512;
    ctx->error = (char*)mpar__alloc(ctx, ctx->error_cap);
    if (!ctx->error) {
        mpar_destroy(ctx);
        return mpar_error_set(err, MPAR_ERROR_OUT_OF_HOST_MEMORY, "out of host memory");
    }
    ctx->error[0] = '\0';
    r = mpar__create_setup(ctx, &d, err);
    if (r != MPAR_SUCCESS) {
        mpar_destroy(ctx);
        return r;
    }
    mpar__log(ctx, MPAR_LOG_INFO, "mpar %s: %d device(s), %d context(s)", MPAR_VERSION_STRING, ctx->device_count,
              ctx->group_count);
    *out = ctx;
    return MPAR_SUCCESS;
}

MPARDEF void mpar_destroy(mpar_context* ctx) {
    int i;
    mpar__program* p;
    if (!ctx) return;
    for (p = ctx->programs; p;) {
        mpar__program* next = p->next;
        clReleaseProgram(p->program);
        mpar__free(ctx, p->path);
        mpar__free(ctx, p);
        p = next;
    }
    for (i = ctx->device_count - 1; i >= 0; i--)
        if (ctx->devices[i].queue) clReleaseCommandQueue(ctx->devices[i].queue);
    for (i = ctx->group_count - 1; i >= 0; i--) clReleaseContext(ctx->groups[i]);
    mpar__free(ctx, ctx->cache_dir);
    mpar__free(ctx, ctx->build_options);
    mpar__free(ctx, ctx->kernel_path);
    mpar__free(ctx, ctx->error);
    pthread_mutex_destroy(&ctx->lock);
    if (ctx->allocator.free) ctx->allocator.free(ctx->allocator.user, ctx);
    else MPAR_FREE(ctx);
}

MPARDEF const char* mpar_last_error(const mpar_context* ctx) {
    if (!ctx) return "mpar_last_error: context is NULL";
    return ctx->error;
}

MPARDEF int mpar_device_count(const mpar_context* ctx) { return ctx ? ctx->device_count : 0; }

static mpar_result mpar__check_device(const mpar_context* ctx, int device) {
    if (!ctx) return MPAR_ERROR_INVALID_ARGUMENT;
    if (device < 0 || device >= ctx->device_count) {
        mpar__fail((mpar_context*)ctx, MPAR_ERROR_INVALID_ARGUMENT, "device %d does not exist (%d selected)", device,
                   ctx->device_count);
        return MPAR_ERROR_INVALID_ARGUMENT; /* spelled out so compilers see the bounds check */
    }
    return MPAR_SUCCESS;
}

MPARDEF mpar_result mpar_device_get_info(const mpar_context* ctx, int device, mpar_device_info* out) {
    mpar_result r = mpar__check_device(ctx, device);
    if (r != MPAR_SUCCESS) return r;
    if (!out) return mpar__fail((mpar_context*)ctx, MPAR_ERROR_INVALID_ARGUMENT, "mpar_device_get_info: out is NULL");
    *out = ctx->devices[device].info;
    return MPAR_SUCCESS;
}

MPARDEF mpar_result mpar_device_get_cl(const mpar_context* ctx, int device, cl_device_id* device_id,
                                       cl_context* context, cl_command_queue* queue) {
    mpar_result r = mpar__check_device(ctx, device);
    if (r != MPAR_SUCCESS) return r;
    if (device_id) *device_id = ctx->devices[device].id;
    if (context) *context = ctx->groups[ctx->devices[device].info.group];
    if (queue) *queue = ctx->devices[device].queue;
    return MPAR_SUCCESS;
}

MPARDEF mpar_result mpar_context_get_stats(const mpar_context* ctx, mpar_context_stats* out) {
    if (!ctx || !out) return MPAR_ERROR_INVALID_ARGUMENT;
    pthread_mutex_lock((pthread_mutex_t*)&ctx->lock);
    *out = ctx->stats;
    pthread_mutex_unlock((pthread_mutex_t*)&ctx->lock);
    return MPAR_SUCCESS;
}

/* --------------------------------------------------------------------------
   3. Kernels
   -------------------------------------------------------------------------- */

static int mpar__file_exists(const char* path) {
    FILE* f = fopen(path, "rb");
    if (!f) return 0;
    fclose(f);
    return 1;
}

/* Tries every folder of a colon-separated list; appends it to `searched`. */
static int mpar__find_in_list(const char* list, const char* file, char* out, size_t out_size, char* searched,
                              size_t searched_size) {
    const char* p = list;
    while (p && *p) {
        size_t len = strcspn(p, ":");
        if (len > 0) {
            size_t used = strlen(searched);
            snprintf(out, out_size, "%.*s/%s", (int)len, p, file);
            snprintf(searched + used, searched_size - used, "%s%.*s", used ? ", " : "", (int)len, p);
            if (mpar__file_exists(out)) return 1;
        }
        p += len;
        if (*p == ':') p++;
    }
    return 0;
}

static void mpar__exe_dir(char* out, size_t size) {
    out[0] = '\0';
#if defined(__linux__)
    {
        ssize_t n = readlink("/proc/self/exe", out, size - 1);
        char* slash;
        if (n <= 0) {
            out[0] = '\0';
            return;
        }
        out[n] = '\0';
        slash = strrchr(out, '/');
        if (slash) *slash = '\0';
    }
#else
    (void)size;
#endif
}

MPARDEF mpar_result mpar_kernel_find(mpar_context* ctx, const char* file, char* out, size_t out_size) {
    char searched[4096] = "";
    char exe[2048], list[4200];
    if (!ctx || !file || !file[0] || !out || out_size == 0)
        return mpar__fail(ctx, MPAR_ERROR_INVALID_ARGUMENT, "mpar_kernel_find: NULL or empty argument");
    if (strchr(file, '/') && mpar__file_exists(file)) {
        snprintf(out, out_size, "%s", file);
        return MPAR_SUCCESS;
    }
    if (ctx->kernel_path && mpar__find_in_list(ctx->kernel_path, file, out, out_size, searched, sizeof searched))
        return MPAR_SUCCESS;
    if (mpar__find_in_list(getenv("MPAR_KERNEL_PATH"), file, out, out_size, searched, sizeof searched))
        return MPAR_SUCCESS;
    mpar__exe_dir(exe, sizeof exe);
    if (exe[0]) {
        snprintf(list, sizeof list, "%s/kernels:%s/../kernels", exe, exe);
        if (mpar__find_in_list(list, file, out, out_size, searched, sizeof searched)) return MPAR_SUCCESS;
    }
#ifdef MPAR_KERNEL_DIR
    if (mpar__find_in_list(MPAR_KERNEL_DIR, file, out, out_size, searched, sizeof searched)) return MPAR_SUCCESS;
#endif
    out[0] = '\0';
    return mpar__fail(ctx, MPAR_ERROR_KERNEL_NOT_FOUND,
                      "kernel file '%s' not found; searched: %s (set MPAR_KERNEL_PATH or mpar_desc.kernel_path)", file,
                      searched[0] ? searched : "nothing");
}

/* Reads a whole file; *size receives its length. NULL on failure. */
static char* mpar__read_file(const mpar_context* ctx, const char* path, size_t* size) {
    FILE* f = fopen(path, "rb");
    char* buf = NULL;
    long n;
    if (!f) return NULL;
    if (fseek(f, 0, SEEK_END) == 0 && (n = ftell(f)) >= 0 && fseek(f, 0, SEEK_SET) == 0) {
        buf = (char*)mpar__alloc(ctx, (size_t)n + 1);
        if (buf && fread(buf, 1, (size_t)n, f) != (size_t)n) {
            mpar__free(ctx, buf);
            buf = NULL;
        }
        if (buf) {
            buf[n] = '\0';
            *size = (size_t)n;
        }
    }
    fclose(f);
    return buf;
}

typedef struct mpar__build {
    const char* path;
    int group;
    cl_context context;
    cl_device_id ids[MPAR__MAX_DEVICES];
    int device_positions[MPAR__MAX_DEVICES];
    cl_uint n;
    char* source;
    size_t source_size;
    uint64_t key[2];
} mpar__build;

#define MPAR__CACHE_MAGIC "MPARBIN1"
#define MPAR__CACHE_FORMAT 1u

/* Cache key: source, options and everything that could change the binary. */
static void mpar__build_key(const mpar_context* ctx, mpar__build* b) {
    uint64_t h[2] = {MPAR__FNV_SEED, MPAR__FNV_SEED ^ 0x9E3779B97F4A7C15ULL};
    int k;
    cl_uint i;
    for (k = 0; k < 2; k++) {
        char pver[256] = "";
        h[k] = mpar__fnv1a(h[k], MPAR_VERSION_STRING, sizeof MPAR_VERSION_STRING);
        h[k] = mpar__fnv1a(h[k], b->source, b->source_size);
        h[k] = mpar__fnv1a(h[k], ctx->build_options, strlen(ctx->build_options) + 1);
        clGetPlatformInfo(ctx->devices[b->device_positions[0]].platform, CL_PLATFORM_VERSION, sizeof pver, pver, NULL);
        h[k] = mpar__fnv1a(h[k], pver, strlen(pver) + 1);
        for (i = 0; i < b->n; i++) {
            const mpar_device_info* d = &ctx->devices[b->device_positions[i]].info;
            h[k] = mpar__fnv1a(h[k], d->name, strlen(d->name) + 1);
            h[k] = mpar__fnv1a(h[k], d->driver, strlen(d->driver) + 1);
            h[k] = mpar__fnv1a(h[k], d->version, strlen(d->version) + 1);
        }
    }
    b->key[0] = h[0];
    b->key[1] = h[1];
}

static void mpar__cache_file(const mpar_context* ctx, const mpar__build* b, char* out, size_t size) {
    snprintf(out, size, "%s/%016llx%016llx.bin", ctx->cache_dir, (unsigned long long)b->key[0],
             (unsigned long long)b->key[1]);
}

static uint64_t mpar__get_u64(const unsigned char* p) {
    uint64_t v;
    memcpy(&v, p, 8);
    return v;
}

/* Loads and builds a cached binary. Anything wrong: NULL, never trusted. */
static cl_program mpar__cache_load(mpar_context* ctx, const mpar__build* b) {
    char file[4400];
    size_t size = 0, off, need;
    unsigned char* data;
    const unsigned char* bins[MPAR__MAX_DEVICES];
    size_t sizes[MPAR__MAX_DEVICES];
    cl_int status[MPAR__MAX_DEVICES], st = CL_SUCCESS;
    cl_program prog = NULL;
    uint32_t fmt, ndev;
    cl_uint i;
    mpar__cache_file(ctx, b, file, sizeof file);
    data = (unsigned char*)mpar__read_file(ctx, file, &size);
    if (!data) return NULL;
    off = 8 + 4 + 4 + 16;
    if (size < off || memcmp(data, MPAR__CACHE_MAGIC, 8) != 0) goto reject;
    memcpy(&fmt, data + 8, 4);
    memcpy(&ndev, data + 12, 4);
    if (fmt != MPAR__CACHE_FORMAT || ndev != b->n || mpar__get_u64(data + 16) != b->key[0] ||
        mpar__get_u64(data + 24) != b->key[1])
        goto reject;
    need = off + 16 * (size_t)ndev;
    if (size < need) goto reject;
    for (i = 0; i < ndev; i++) {
        sizes[i] = (size_t)mpar__get_u64(data + off + 16 * i);
        if (sizes[i] == 0 || sizes[i] > size - need) goto reject;
        bins[i] = data + need;
        need += sizes[i];
        if (mpar__fnv1a(MPAR__FNV_SEED, bins[i], sizes[i]) != mpar__get_u64(data + off + 16 * i + 8)) goto reject;
    }
    if (need != size) goto reject;
    prog = clCreateProgramWithBinary(b->context, b->n, b->ids, sizes, bins, status, &st);
    if (st != CL_SUCCESS || !prog) goto reject;
    if (clBuildProgram(prog, b->n, b->ids, ctx->build_options, NULL, NULL) != CL_SUCCESS) goto reject;
    mpar__free(ctx, data);
    return prog;
reject:
    if (prog) clReleaseProgram(prog);
    mpar__free(ctx, data);
    pthread_mutex_lock(&ctx->lock);
    ctx->stats.cache_rejected++;
    pthread_mutex_unlock(&ctx->lock);
    mpar__log(ctx, MPAR_LOG_WARN, "ignoring unusable kernel cache file %s", file);
    return NULL;
}

static int mpar__mkdirs(const char* dir) {
    char tmp[4096];
    size_t i, n = strlen(dir);
    if (n == 0 || n >= sizeof tmp) return -1;
    memcpy(tmp, dir, n + 1);
    for (i = 1; i <= n; i++) {
        if (tmp[i] == '/' || tmp[i] == '\0') {
            char c = tmp[i];
            tmp[i] = '\0';
            if (mkdir(tmp, 0755) != 0 && errno != EEXIST) return -1;
            tmp[i] = c;
        }
    }
    return 0;
}

/* Writes the binaries to a temp file and renames it into place, so that a
   reader never sees half a file. Failure only costs a future rebuild. */
static void mpar__cache_store(mpar_context* ctx, const mpar__build* b, cl_program prog) {
    size_t sizes[MPAR__MAX_DEVICES];
    unsigned char* bins[MPAR__MAX_DEVICES];
    char file[4400], tmp[4500];
    uint32_t fmt = MPAR__CACHE_FORMAT, ndev = b->n;
    cl_uint i;
    int ok = 1;
    FILE* f;
    memset(bins, 0, sizeof bins);
    if (clGetProgramInfo(prog, CL_PROGRAM_BINARY_SIZES, sizeof(size_t) * b->n, sizes, NULL) != CL_SUCCESS) return;
    for (i = 0; i < b->n; i++) {
        if (sizes[i] == 0 || !(bins[i] = (unsigned char*)mpar__alloc(ctx, sizes[i]))) ok = 0;
    }
    if (ok && clGetProgramInfo(prog, CL_PROGRAM_BINARIES, sizeof(unsigned char*) * b->n, bins, NULL) != CL_SUCCESS)
        ok = 0;
    mpar__cache_file(ctx, b, file, sizeof file);
    snprintf(tmp, sizeof tmp, "%s.tmp.%ld", file, (long)getpid());
    if (ok && mpar__mkdirs(ctx->cache_dir) == 0 && (f = fopen(tmp, "wb")) != NULL) {
        ok = fwrite(MPAR__CACHE_MAGIC, 1, 8, f) == 8 && fwrite(&fmt, 4, 1, f) == 1 && fwrite(&ndev, 4, 1, f) == 1 &&
             fwrite(b->key, 8, 2, f) == 2;
        for (i = 0; ok && i < b->n; i++) {
            uint64_t sz = sizes[i], sum = mpar__fnv1a(MPAR__FNV_SEED, bins[i], sizes[i]);
            ok = fwrite(&sz, 8, 1, f) == 1 && fwrite(&sum, 8, 1, f) == 1;
        }
        for (i = 0; ok && i < b->n; i++) ok = fwrite(bins[i], 1, sizes[i], f) == sizes[i];
        ok = fflush(f) == 0 && ok;
        ok = fsync(fileno(f)) == 0 && ok;
        ok = fclose(f) == 0 && ok;
        if (ok && rename(tmp, file) == 0) {
            pthread_mutex_lock(&ctx->lock);
            ctx->stats.cache_written++;
            pthread_mutex_unlock(&ctx->lock);
        } else {
            remove(tmp);
        }
    }
    for (i = 0; i < b->n; i++) mpar__free(ctx, bins[i]);
}

static mpar_result mpar__build_failed(mpar_context* ctx, const mpar__build* b, cl_program prog, cl_int st) {
    char* log = NULL;
    size_t n = 0;
    cl_uint i;
    int pos = b->device_positions[0];
    for (i = 0; i < b->n; i++) {
        cl_build_status bs = CL_BUILD_NONE;
        clGetProgramBuildInfo(prog, b->ids[i], CL_PROGRAM_BUILD_STATUS, sizeof bs, &bs, NULL);
        if (bs == CL_BUILD_ERROR) {
            pos = b->device_positions[i];
            clGetProgramBuildInfo(prog, b->ids[i], CL_PROGRAM_BUILD_LOG, 0, NULL, &n);
            log = (char*)mpar__alloc(ctx, n + 1);
            if (log && clGetProgramBuildInfo(prog, b->ids[i], CL_PROGRAM_BUILD_LOG, n, log, NULL) == CL_SUCCESS)
                log[n] = '\0';
            else if (log)
                log[0] = '\0';
            break;
        }
    }
    mpar__fail(ctx, MPAR_ERROR_KERNEL_BUILD,
               "kernel build failed (%s): file '%s' on device %d '%s' (platform '%s'), options '%s'; build log:\n%s",
               mpar_result_string((mpar_result)st), b->path, pos, ctx->devices[pos].info.name,
               ctx->devices[pos].info.platform, ctx->build_options, log && log[0] ? log : "(empty)");
    mpar__free(ctx, log);
    return MPAR_ERROR_KERNEL_BUILD;
}

static mpar_result mpar__build_program(mpar_context* ctx, mpar__build* b, cl_program* out) {
    cl_int st = CL_SUCCESS;
    const char* src = b->source;
    cl_program prog;
    if (ctx->cache_dir) {
        mpar__build_key(ctx, b);
        prog = mpar__cache_load(ctx, b);
        if (prog) {
            pthread_mutex_lock(&ctx->lock);
            ctx->stats.programs_from_cache++;
            pthread_mutex_unlock(&ctx->lock);
            *out = prog;
            return MPAR_SUCCESS;
        }
    }
    prog = clCreateProgramWithSource(b->context, 1, &src, &b->source_size, &st);
    MPAR__CL(ctx, st);
    st = clBuildProgram(prog, b->n, b->ids, ctx->build_options, NULL, NULL);
    if (st != CL_SUCCESS) {
        mpar_result r = mpar__build_failed(ctx, b, prog, st);
        clReleaseProgram(prog);
        return r;
    }
    pthread_mutex_lock(&ctx->lock);
    ctx->stats.programs_built++;
    pthread_mutex_unlock(&ctx->lock);
    if (ctx->cache_dir) mpar__cache_store(ctx, b, prog);
    *out = prog;
    return MPAR_SUCCESS;
}

MPARDEF mpar_result mpar_program_get(mpar_context* ctx, int device, const char* file, cl_program* out) {
    char path[4096];
    mpar__build b;
    mpar__program* p;
    mpar_result r = mpar__check_device(ctx, device);
    int i;
    if (r != MPAR_SUCCESS) return r;
    if (!file || !out) return mpar__fail(ctx, MPAR_ERROR_INVALID_ARGUMENT, "mpar_program_get: file or out is NULL");
    r = mpar_kernel_find(ctx, file, path, sizeof path);
    if (r != MPAR_SUCCESS) return r;
    memset(&b, 0, sizeof b);
    b.group = ctx->devices[device].info.group;
    pthread_mutex_lock(&ctx->lock);
    for (p = ctx->programs; p; p = p->next)
        if (p->group == b.group && !strcmp(p->path, path)) break;
    pthread_mutex_unlock(&ctx->lock);
    if (p) {
        *out = p->program;
        return MPAR_SUCCESS;
    }
    b.path = path;
    b.context = ctx->groups[b.group];
    for (i = 0; i < ctx->device_count; i++)
        if (ctx->devices[i].info.group == b.group) {
            b.device_positions[b.n] = i;
            b.ids[b.n++] = ctx->devices[i].id;
        }
    b.source = mpar__read_file(ctx, path, &b.source_size);
    if (!b.source) return mpar__fail(ctx, MPAR_ERROR_IO, "cannot read kernel file '%s'", path);
    r = mpar__build_program(ctx, &b, out);
    mpar__free(ctx, b.source);
    if (r != MPAR_SUCCESS) return r;
    p = (mpar__program*)mpar__alloc(ctx, sizeof *p);
    if (!p || !(p->path = mpar__strdup(ctx, path))) {
        mpar__free(ctx, p);
        clReleaseProgram(*out);
        *out = NULL;
        return mpar__fail(ctx, MPAR_ERROR_OUT_OF_HOST_MEMORY, "out of host memory");
    }
    p->group = b.group;
    p->program = *out;
    pthread_mutex_lock(&ctx->lock);
    p->next = ctx->programs;
    ctx->programs = p;
    pthread_mutex_unlock(&ctx->lock);
    return MPAR_SUCCESS;
}

MPARDEF mpar_result mpar_kernel_create(mpar_context* ctx, int device, const char* file, const char* name,
                                       cl_kernel* out) {
    cl_program prog;
    cl_int st = CL_SUCCESS;
    mpar_result r;
    if (!name || !out) return mpar__fail(ctx, MPAR_ERROR_INVALID_ARGUMENT, "mpar_kernel_create: name or out is NULL");
    r = mpar_program_get(ctx, device, file, &prog);
    if (r != MPAR_SUCCESS) return r;
    *out = clCreateKernel(prog, name, &st);
    if (st != CL_SUCCESS)
        return mpar__fail(ctx, (mpar_result)st, "clCreateKernel('%s') from '%s' failed with %s", name, file,
                          mpar_result_string((mpar_result)st));
    return MPAR_SUCCESS;
}

#endif /* MPAR_IMPLEMENTATION_DONE */
#endif /* MPAR_IMPLEMENTATION */
