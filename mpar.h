/* mpar.h - layer-wise model parallelism over OpenCL devices, in one header.

   (top documentation comes here)
*/
#ifndef MPAR_H
#define MPAR_H

#define MPAR_VERSION_MAJOR 0
#define MPAR_VERSION_MINOR 1
#define MPAR_VERSION_PATCH 0
#define MPAR_VERSION_STRING "0.1.0"

#include <stddef.h>
#include <stdint.h>

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

#endif /* MPAR_IMPLEMENTATION_DONE */
#endif /* MPAR_IMPLEMENTATION */
