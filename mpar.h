/* mpar.h - layer-wise model parallelism over OpenCL devices, in one header.

   mpar splits a neural network into contiguous ranges of layers ("stages"),
   one or more per OpenCL device, joins the stages into a chain of queues and
   schedules micro-batches through it (GPipe, 1F1B, interleaved 1F1B,
   zero-bubble ZB-H1, ZB-H2 and ZB-V) for training and inference. Kernels are .cl files
   loaded at run time (kernels/); GEMM goes through CLBlast.

   Do this:
       #define MPAR_IMPLEMENTATION
   before you include this file in *one* C or C++ file (include it first
   there), and link with -lclblast -lOpenCL -lpthread -lm.

   Configuration macros (define before including):
       MPAR_STATIC          every public function static to that file
       MPAR_MALLOC(sz), MPAR_REALLOC(p,sz), MPAR_FREE(p)
                            allocation; define all three or none
       MPAR_ASSERT(x)       internal checks (default: assert)
       MPAR_USE_CBLAS       CPU devices may run layers as host code, GEMMs
                            through CBLAS (see mpar_cpu_route); link a
                            thread-safe single-threaded CBLAS (-lblis from
                            BLIS's serial build)
       MPAR_CBLAS_HEADER    the CBLAS header to include [<cblas.h>]
       MPAR_KERNEL_DIR      last folder searched for .cl files ("a:b");
                            make install bakes in its kernel folder
       MPARDEF              linkage of public functions
       MPAR_DEBUG           destroyed contexts, models and pipelines stay as
                            tombstones, so that using one returns
                            MPAR_ERROR_INVALID_STATE (see "Destroyed objects")

   Using it:
       mpar_context* ctx;   mpar_desc desc = {0};   mpar_create(&desc, &ctx);
       mpar_model* m;       mpar_model_desc md = {0};  md.input_features = 784;
       mpar_model_create(&md, &m, NULL);
       mpar_model_add_linear(m, 256, NULL);
       mpar_model_add_simple(m, mpar_layer_relu(), NULL);
       mpar_model_add_linear(m, 10, NULL);
       mpar_model_add_simple(m, mpar_layer_cross_entropy(), NULL);
       mpar_pipeline_desc pd = {0};  pd.schedule = MPAR_SCHEDULE_1F1B;
       pd.microbatches = 8;  pd.max_batch = 128;
       mpar_pipeline* p;     mpar_pipeline_create(ctx, m, &pd, &p);
       mpar_batch b = {inputs, targets, 128, NULL};
       mpar_pipeline_train_step(p, &b, &info);
       ...  mpar_pipeline_destroy(p); mpar_model_destroy(m); mpar_destroy(ctx);
   Every call returns an mpar_result; mpar_last_error(ctx) tells why.

   Sections: 1 basics, 2 devices, 3 kernels, 4 model and layers,
   6 schedules and simulator, 7-8 stage chain and executor, 7-8b
   generation with a key/value cache (mpar_pipeline_generate).

   Environment: MPAR_DEVICES, MPAR_KERNEL_PATH, MPAR_BUILD_OPTIONS,
   MPAR_CACHE_DIR, MPAR_CPU_ROUTE, MPAR_SLOW_DEVICES (see README.md). mpar reads the
   environment and never changes it.

   Revision history:
       0.1.0 (2026-11-21)  devices, run-time kernels with binary cache,
                           layers, schedules, simulator, pipeline executor
       0.2.0 (2026-12-01)  host route for CPU devices (MPAR_USE_CBLAS,
                           mpar_cpu_route, mpar_exec_host), launch counts,
                           mpar_device_measure_gemm
       0.3.0 (2026-12-01)  link transports (mpar_link_mode ASYNC: copy
                           queues, events, pinned memory), max_run_ahead,
                           per-worker error detail, no process-wide lock
                           and no setenv (mpar_desc.pocl_devices and the
                           pocl_devices argument of mpar_list_devices are
                           gone), 64-bit launch letters 'B' and 'l' (built-in
                           kernels take ulong offsets and counts), the
                           run-time allocator everywhere (_with
                           constructors), link_blocking / overlaps in the
                           simulator and planner
       0.4.0 (2026-12-01)  schedules as data: pipelines run any valid
                           schedule (pd.schedule_lists), placements
                           (mpar_schedule_from_lists_placed), ZB-H2, ZB-V,
                           mpar_schedule_synthesize and MPAR_SCHEDULE_AUTO,
                           forward-only inference schedules, the optimizer
                           step as an action, links as queues in validation,
                           pd.max_in_flight, mpar_pipeline_get_schedule
       0.5.0 (2026-12-01)  memory: per-layer-block buffers (max_buffer_bytes),
                           memory_limit_bytes, mpar_pipeline_memory (the
                           planner's bytes are its count), inference_only,
                           recompute_stages and plans that recompute stage
                           by stage, bf16 activations (activation_type,
                           AUTO), mpar_plan / mpar_pipeline_stats
                           activation_type
       0.6.0 (2026-12-02)  balance: plans from measured layer costs by
                           default (mpar_plan_options.costs, the profile
                           cache), mpar_desc.slow_devices, live re-balancing
                           (pd.rebalance, mpar_pipeline_rebalance),
                           mpar_pipeline_get_plan, profiling without waits
                           and a prediction that models the executor;
                           settings checked at create, safe temporary files,
                           memory checked per device
       0.7.0 (2026-12-02)  MPI: failure bounded by timeout_seconds (agreements
                           polled, a refused call still joins, stopped ranks
                           rejoin), ranks compare their descriptions
                           (MPAR_ERROR_MISMATCH), message sizes checked,
                           checkpoints across ranks; weights-only files
                           (save/load_weights), mpar_model_from_checkpoint,
                           regression losses (mse, l1; batch.float_targets),
                           models held by their pipelines, classification
                           helpers, checked buffer variants, a CMake package;
                           destroyed objects caught under MPAR_DEBUG;
                           generation: pd.generate_sequences and
                           generate_context (per-device key/value caches,
                           counted by the memory model),
                           mpar_pipeline_generate (pipelined prefill, decode
                           groups taking turns, greedy / top-k sampling,
                           stop tokens, streaming), kernels/generate.cl

   License: MIT, see the end of this file.
*/
#ifndef MPAR_H
#define MPAR_H

#define MPAR_VERSION_MAJOR 0
#define MPAR_VERSION_MINOR 7
#define MPAR_VERSION_PATCH 0
#define MPAR_VERSION_STRING "0.7.0"
/* `make install` writes the installed kernel folder here; MPAR_KERNEL_DIR,
   when defined, takes its place. */
#define MPAR__INSTALLED_KERNEL_DIR ""

#ifndef MPAR_CBLAS_HEADER
#define MPAR_CBLAS_HEADER <cblas.h>
#endif

#if defined(MPAR_IMPLEMENTATION) && !defined(_POSIX_C_SOURCE) && !defined(_WIN32)
/* readlink, fsync, mkstemp, pthreads: include mpar.h first in the file
   that defines MPAR_IMPLEMENTATION, or define _POSIX_C_SOURCE yourself. */
#define _POSIX_C_SOURCE 200809L
#endif

#include <stddef.h>
#include <stdint.h>
#include <stdio.h> /* FILE, for the print functions */

/* A system header included before mpar.h in the implementation's file has
   already fixed glibc's feature set, and the POSIX functions mpar calls
   (clock_gettime, nanosleep, fsync, mkstemp, pthreads) would be
   undeclared: say so here, not with a wall of implicit declarations. */
#if defined(MPAR_IMPLEMENTATION) && defined(__GLIBC__) && !defined(__USE_POSIX199309)
#error "mpar.h: in the file that defines MPAR_IMPLEMENTATION, include mpar.h before any system header, or define _POSIX_C_SOURCE 200809L (or _GNU_SOURCE) before them"
#endif

#ifndef CL_TARGET_OPENCL_VERSION
#define CL_TARGET_OPENCL_VERSION 120
#endif
#ifdef __APPLE__
#include <OpenCL/opencl.h>
#else
#include <CL/cl.h>
#endif
#ifdef MPAR_USE_MPI
#include <mpi.h>
#endif

#ifndef MPARDEF
#ifdef MPAR_STATIC
#if defined(__GNUC__) || defined(__clang__)
#define MPARDEF static __attribute__((unused))
#else
#define MPARDEF static
#endif
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
    MPAR_ERROR_MISMATCH = -4012,         /* a file belongs to another model; MPI ranks disagree */
    MPAR_ERROR_NUMERICAL = -4013,        /* NaN or Inf in loss or gradients */
    MPAR_ERROR_ABORTED = -4014,          /* stopped because another stage failed */
    MPAR_ERROR_INVALID_STATE = -4015,    /* call out of order; or on a destroyed context, model or
                                            pipeline in an MPAR_DEBUG build (see below) */
    MPAR_ERROR_INVALID_SELECTION = -4016,/* MPAR_DEVICES / descriptor syntax */
    MPAR_ERROR_TIMEOUT = -4017,
    MPAR_ERROR_UNSUPPORTED = -4018
} mpar_result;

/* Destroyed objects. Calling anything on a context, model or pipeline
   after its destroy is a contract violation. In a release build it is
   undefined (the memory is freed; the live tag every object carries and
   every public call checks may catch it, or not). Built with MPAR_DEBUG,
   destroy keeps the object's struct as a tombstone, its contents freed:
   then every call on it returns MPAR_ERROR_INVALID_STATE ("... was
   destroyed"; functions that return a count or pointer return 0 or NULL)
   and a second destroy does nothing but say so where it can (see each
   destroy function). A pipeline's tombstone (about 0.5 MB) is freed with
   its context, so this holds until the context is destroyed; a context's
   (about 80 KB) or a model's (under 100 bytes) has no owner left and is
   kept for the life of the process, on purpose, hidden from
   LeakSanitizer (valgrind counts it as lost). MPAR_DEBUG is for finding
   such bugs, not for production.
   Schedules, plans, simulations and timelines are plain data: using one
   after its destroy or free is undefined in every build. */

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

/* Run-time allocator; all three or none (all NULL: the compile-time
   MPAR_MALLOC, MPAR_REALLOC and MPAR_FREE). A context takes one in
   mpar_desc and uses it for everything it and its pipelines allocate,
   plans, schedules, simulations and timelines it hands out included;
   objects made without a context take one in their own desc
   (mpar_model_desc, mpar_plan_desc, mpar_sim_desc) or through a _with
   constructor (mpar_schedule_create_with, mpar_schedule_from_lists_with,
   mpar_plan_parse_with, mpar_checkpoint_parse_with). Each object keeps a
   copy in its `allocator` field and is freed through it, so objects made
   with different allocators mix freely; `user` must outlive them. The only
   allocation that never sees one is mpar_list_devices' scratch table (no
   context exists there): MPAR_MALLOC. */
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
    MPAR_SCHEDULE_ZB_H1 = 4,            /* zero-bubble: B split into I and W */
    MPAR_SCHEDULE_ZB_H2 = 5,            /* zero-bubble, more warm-up: about 2x 1F1B's stashes */
    MPAR_SCHEDULE_ZB_V = 6,             /* zero-bubble, two chunks per device in a V (virtual_stages 2) */
    /* Pipelines only: synthesised from measured costs (mpar_schedule_synthesize) */
    MPAR_SCHEDULE_AUTO = 7
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
    /* Layers on this device run as host code on the buffers' memory (see
       mpar_cpu_route); 0: as OpenCL kernels. */
    int host_route;
    double slowdown; /* mpar_desc.slow_devices: compute takes this many times longer [1] */
} mpar_device_info;

/* How layers run on CPU devices. OpenCL on a CPU (PoCL) reaches a fraction
   of what the same core does through a tuned BLAS, so a CPU device whose
   buffers are host memory may take a native route: GEMMs through CBLAS and
   the built-in kernels as C loops, on the buffers' own memory, in the
   stage's worker thread. It needs mpar compiled with MPAR_USE_CBLAS and a
   thread-safe single-threaded CBLAS (BLIS serial; Debian's serial OpenBLAS
   is not safe to call from two threads at once). Kernels without a host
   version (user layers' own .cl files) still run through OpenCL on the same
   memory, so every layer works on either route. GPUs always take OpenCL. */
typedef enum mpar_cpu_route {
    MPAR_CPU_ROUTE_AUTO = 0,   /* host code where possible, else OpenCL */
    MPAR_CPU_ROUTE_OPENCL = 1, /* always OpenCL kernels */
    MPAR_CPU_ROUTE_HOST = 2    /* host code on every CPU device, or mpar_create fails */
} mpar_cpu_route;

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
       Terms select in the order written. A device that two terms select
       ("0,0", "cpu,1") is refused with MPAR_ERROR_INVALID_SELECTION: the
       context's devices are distinct devices; to run two stages on one
       device, give its index in two mpar_stage_desc. */
    const char* devices;
    /* Non-zero: every device gets its own cl_context (the mixed-vendor path),
       even when devices share a platform. */
    int context_per_device;
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
    /* How CPU devices run layers [AUTO]; the MPAR_CPU_ROUTE environment
       variable (auto, opencl or host), when set, replaces it. */
    mpar_cpu_route cpu_route;
    /* Heterogeneity on demand, to study mismatched devices with alike ones
       (tests, benchmarks): "DEVICE:FACTOR[,DEVICE:FACTOR...]", e.g. "1:2",
       makes each named device's compute FACTOR times slower (1 <= FACTOR
       <= 100). After every compute section (a micro-batch's forward or
       backward part, an optimizer step, a measuring GEMM) the stage's worker
       waits for its device to finish, then sleeps FACTOR - 1 times as long
       as the section took, inside the section: timelines, profiles, GEMM
       measurements and so the planner all see a slower device, while the
       results stay the same bits. The MPAR_SLOW_DEVICES environment
       variable, when set, replaces it. NULL: every device at its speed. */
    const char* slow_devices;
    /* Receives the reason when mpar_create fails (there is no context then
       to ask). Optional. */
    mpar_error* error;
} mpar_desc;

typedef struct mpar_context_stats {
    int programs_built;       /* built from source */
    int programs_from_cache;  /* loaded from the binary cache */
    int cache_rejected;       /* cache files found but not trusted */
    int cache_written;
    /* The profile cache of measured layer costs (mpar_plan_options.costs):
       devices measured, devices found in the cache, files not trusted and
       files written. */
    int profiles_measured;
    int profile_cache_hits;
    int profile_cache_rejected;
    int profile_cache_written;
} mpar_context_stats;

MPARDEF mpar_result mpar_create(const mpar_desc* desc, mpar_context** out);
/* Destroy the context's pipelines first. NULL: nothing. Under MPAR_DEBUG
   the context becomes a tombstone (see "Destroyed objects" in section 1),
   the tombstones of its pipelines are freed, and a second destroy does
   nothing but tell the log callback, if one was given. In a release
   build a second destroy is undefined. */
MPARDEF void mpar_destroy(mpar_context* ctx);
/* The detail of the last failure on this context: the failing call, file
   and line, or a kernel build log. Never NULL. Safe from any thread; the
   string stays valid until 16 more calls on this context have failed, or
   the context is destroyed. A failing pipeline call names the stage that
   failed first and that stage's own detail. mpar never changes the
   process environment: to get two one-core PoCL devices on a CPU, set
   POCL_DEVICES="basic basic" before the first OpenCL call. */
MPARDEF const char* mpar_last_error(const mpar_context* ctx);
MPARDEF int mpar_device_count(const mpar_context* ctx);
MPARDEF mpar_result mpar_device_get_info(const mpar_context* ctx, int device, mpar_device_info* out);
/* The OpenCL objects behind a device: its context and its in-order,
   profiling-enabled queue. They stay owned by mpar. Any pointer may be NULL. */
MPARDEF mpar_result mpar_device_get_cl(const mpar_context* ctx, int device, cl_device_id* device_id,
                                       cl_context* context, cl_command_queue* queue);
MPARDEF mpar_result mpar_context_get_stats(const mpar_context* ctx, mpar_context_stats* out);
/* Fault injection, to test error handling: the chosen kind of OpenCL call
   fails on a stage at an optimizer step. spec is "KIND:STAGE:STEP[:NTH]":
   KIND alloc (buffer allocation), enqueue (kernel launch), transfer (link
   copies and uploads) or build (kernel program build); STAGE and STEP a
   number or '*'; the NTH matching call fails (default 1), once. Also read
   from the MPAR_FAULT environment variable by mpar_create. NULL or "" clears. */
MPARDEF mpar_result mpar_set_fault(mpar_context* ctx, const char* spec);
/* Every device on every platform, no selection applied. `count` receives
   the total even when `capacity` is smaller. Its scratch table comes from
   MPAR_MALLOC: there is no context, hence no run-time allocator. */
MPARDEF mpar_result mpar_list_devices(mpar_device_info* out, int capacity, int* count, mpar_error* err);
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


/* ==========================================================================
   4. Model: an ordered list of layers, the unit of partitioning.
   ========================================================================== */

/* A slice of a device buffer; offsets count floats (or int32 for tokens
   and targets), as every mpar kernel takes (buffer, offset) pairs. */
typedef struct mpar_buf {
    cl_mem mem;
    size_t off;
} mpar_buf;

/* What one layer call sees for one micro-batch. */
typedef struct mpar_io {
    int rows;       /* rows of this micro-batch: samples × seq_len */
    int row_offset; /* first row of this micro-batch within the whole batch */
    mpar_buf x;     /* input  [rows × in_features] (int32 tokens for TOKEN_INPUT) */
    mpar_buf y;     /* output [rows × out_features] */
    mpar_buf dx;    /* input gradient, written by backward_input (overwrite) */
    mpar_buf dy;    /* output gradient */
    int need_dx;    /* 0 on the model's first layer: dx may be skipped */
    mpar_buf params;  /* this layer's parameters */
    mpar_buf grads;   /* accumulate (+=) into these */
    mpar_buf stash;   /* [rows × stash_per_row], forward → backward */
    mpar_buf gstash;  /* [rows × gstash_per_row], backward_input → backward_weight */
    mpar_buf scratch; /* [rows × scratch_per_row], valid within one call only */
    mpar_buf targets; /* loss layers: int32 class per row, < 0 ignores the row; with
                         MPAR_LAYER_FLOAT_TARGETS: floats, in_features per row */
    float loss_scale; /* loss layers: gradient scale, 1 / counted rows in the batch */
    uint64_t seed;    /* differs per step and layer; equal for every micro-batch */
    int training;
} mpar_io;

typedef struct mpar_exec mpar_exec; /* a stage's queue and kernels */
typedef struct mpar_layer mpar_layer;

enum {
    MPAR_LAYER_LOSS = 1,        /* last layer; output is the per-row loss */
    MPAR_LAYER_TOKEN_INPUT = 2, /* input is int32 token ids; must be first */
    MPAR_LAYER_FLOAT_TARGETS = 4 /* a loss layer whose targets are floats, in_features per row
                                    (mpar_batch.float_targets) instead of one int32 class */
};

/* A layer type. Built-in types come from mpar_layer_linear() and friends;
   users define their own with the same table and their own .cl files. */
typedef struct mpar_layer_type {
    const char* name;
    unsigned flags;
    /* in_features is set; fill out_features, param_count, stash/gstash/scratch
       per row and the FLOPs; check the descriptor. */
    mpar_result (*setup)(mpar_layer* layer, mpar_error* err);
    /* Initial parameters on the host; rng_state is private to this layer. */
    void (*init)(const mpar_layer* layer, float* params, uint64_t* rng_state);
    mpar_result (*forward)(mpar_exec* ex, const mpar_layer* layer, const mpar_io* io);
    mpar_result (*backward_input)(mpar_exec* ex, const mpar_layer* layer, const mpar_io* io);
    /* NULL when the layer has no parameters. */
    mpar_result (*backward_weight)(mpar_exec* ex, const mpar_layer* layer, const mpar_io* io);
} mpar_layer_type;

/* How to make a layer: zero-initialised fields take defaults. */
typedef struct mpar_layer_desc {
    const mpar_layer_type* type;
    int units;  /* linear: outputs; embedding: width */
    int vocab;  /* embedding: token count */
    int heads;  /* decoder block: attention heads */
    int hidden; /* decoder block: MLP width (0: 4 × width) */
    float rate; /* dropout: probability of zeroing */
    float eps;  /* layer norm and decoder block (0: 1e-5) */
    void* user; /* for user-defined types */
} mpar_layer_desc;

struct mpar_layer {
    const mpar_layer_type* type;
    mpar_layer_desc desc;
    int index;        /* position in the model */
    int seq_len;      /* rows per sample */
    int in_features;  /* per row */
    int out_features; /* per row */
    size_t param_count;
    size_t stash_per_row, gstash_per_row, scratch_per_row; /* floats */
    double flops_forward, flops_backward_input, flops_backward_weight; /* per row */
};

typedef struct mpar_model mpar_model;

typedef struct mpar_model_desc {
    int input_features; /* per row (1 for token models) */
    int seq_len;        /* rows per sample (tokens per sequence); 0: 1 */
    uint64_t seed;      /* parameter initialisation and dropout */
    mpar_allocator allocator; /* the model and its layer table; all NULL: MPAR_MALLOC */
} mpar_model_desc;

MPARDEF const mpar_layer_type* mpar_layer_linear(void);
MPARDEF const mpar_layer_type* mpar_layer_relu(void);
MPARDEF const mpar_layer_type* mpar_layer_gelu(void);
MPARDEF const mpar_layer_type* mpar_layer_tanh(void);
MPARDEF const mpar_layer_type* mpar_layer_dropout(void);
MPARDEF const mpar_layer_type* mpar_layer_layernorm(void);
MPARDEF const mpar_layer_type* mpar_layer_embedding(void);
MPARDEF const mpar_layer_type* mpar_layer_decoder_block(void);
MPARDEF const mpar_layer_type* mpar_layer_cross_entropy(void);
/* Regression losses on float targets (mpar_batch.float_targets, one row of
   in_features values per row): mse, the mean of (output - target)^2 over a
   row's values, and l1, the mean of |output - target|; the step's loss is
   the mean over the batch's rows. Every row counts. */
MPARDEF const mpar_layer_type* mpar_layer_mse(void);
MPARDEF const mpar_layer_type* mpar_layer_l1(void);

MPARDEF mpar_result mpar_model_create(const mpar_model_desc* desc, mpar_model** out, mpar_error* err);
/* Drops the caller's reference. A pipeline made from the model holds its
   own (mpar_pipeline_create takes one, mpar_pipeline_destroy drops it), so
   the model may be destroyed before its pipelines: the last of them frees
   it. Do not use `model` after this call, and add no layers to a model
   that has pipelines. Safe while other threads destroy its pipelines.
   NULL: nothing. Under MPAR_DEBUG the caller's handle is dead at once:
   its public calls return MPAR_ERROR_INVALID_STATE and a second destroy
   does nothing (silently: a model has no error sink); the memory becomes
   a tombstone when the last reference goes. In a release build a second
   destroy is undefined. */
MPARDEF void mpar_model_destroy(mpar_model* model);
/* Appends a layer; its shape is checked against the previous one now. */
MPARDEF mpar_result mpar_model_add(mpar_model* model, const mpar_layer_desc* layer, mpar_error* err);
/* Shorthands for mpar_model_add. */
MPARDEF mpar_result mpar_model_add_linear(mpar_model* model, int units, mpar_error* err);
MPARDEF mpar_result mpar_model_add_simple(mpar_model* model, const mpar_layer_type* type, mpar_error* err);
/* Whole-model checks: a loss is last, nothing follows it, tokens come first. */
MPARDEF mpar_result mpar_model_validate(const mpar_model* model, mpar_error* err);
MPARDEF int mpar_model_layer_count(const mpar_model* model);
MPARDEF const mpar_model_desc* mpar_model_get_desc(const mpar_model* model);
MPARDEF const mpar_layer* mpar_model_layer(const mpar_model* model, int index);
MPARDEF size_t mpar_model_param_count(const mpar_model* model);
/* The initial parameters of one layer (deterministic from the seed). */
MPARDEF mpar_result mpar_model_init_params(const mpar_model* model, int layer, float* out, mpar_error* err);

/* Classification helpers for what mpar_pipeline_infer returns (the loss
   layer's input, [rows x classes], row-major); no device needed. Each
   returns MPAR_ERROR_INVALID_ARGUMENT for a NULL pointer, rows < 0 or
   classes < 1.
   mpar_softmax: probs = softmax of each row, computed after subtracting
   the row's largest value (no overflow for large logits); a row with a NaN
   or whose largest value is infinite gives NaN. probs may be logits.
   mpar_argmax: the index of each row's largest value, the first on a tie;
   NaN is never the largest unless the whole row is NaN (then 0).
   mpar_accuracy: the fraction of rows whose argmax equals the label.
   Rows labelled < 0 are left out, as the cross-entropy loss leaves them
   out; a label >= classes, or no row labelled >= 0, is
   MPAR_ERROR_INVALID_ARGUMENT. */
MPARDEF mpar_result mpar_softmax(const float* logits, int rows, int classes, float* probs, mpar_error* err);
MPARDEF mpar_result mpar_argmax(const float* x, int rows, int classes, int32_t* out, mpar_error* err);
MPARDEF mpar_result mpar_accuracy(const float* logits, const int32_t* labels, int rows, int classes, double* out,
                                  mpar_error* err);

/* For layer implementations: run a kernel from a .cl file. `args` has one
   letter per argument, and the variadic value each takes:
     'B' an mpar_buf: two kernel arguments, the buffer and a ulong offset
         (b.off, in elements; kernel signature `__global T* x, ulong x_off`)
     'b' an mpar_buf: the buffer and an int offset (`int x_off`), for
         kernels written that way; an offset above INT_MAX fails with
         MPAR_ERROR_INVALID_ARGUMENT (use 'B' for buffers that large)
     'l' a size_t (pass one: cast int values), as a ulong kernel argument:
         element counts and anything else that can reach 2^31
     'm' a cl_mem, 'i' an int, 'u' an unsigned int, 'f' a float (passed as
         double).
   The built-in kernels take 'B' offsets and 'l' counts, and int only for
   rows and widths. global1 = 0 makes a 1-D range. */
MPARDEF mpar_result mpar_exec_launch(mpar_exec* ex, const char* file, const char* kernel, size_t global0,
                                     size_t global1, const char* args, ...);
/* Row-major C = alpha·op(A)·op(B) + beta·C through CLBlast. */
MPARDEF mpar_result mpar_exec_gemm(mpar_exec* ex, int trans_a, int trans_b, size_t m, size_t n, size_t k, float alpha,
                                   mpar_buf a, size_t lda, mpar_buf b, size_t ldb, float beta, mpar_buf c,
                                   size_t ldc);
MPARDEF mpar_context* mpar_exec_context(mpar_exec* ex);
/* The stage's queue. Commands a layer enqueues on it itself are waited for
   before the next host-route call. */
MPARDEF cl_command_queue mpar_exec_queue(mpar_exec* ex);
/* On a stage that takes the host route (mpar_device_info.host_route): the
   host address of b, after every command enqueued on the stage's queue has
   finished, so that a user layer can do its work in C as the built-in ones
   do. NULL on OpenCL stages, and for buffers mpar did not allocate. */
MPARDEF float* mpar_exec_host(mpar_exec* ex, mpar_buf b);
/* Records detail for a failure inside a layer and returns code. */
MPARDEF mpar_result mpar_exec_fail(mpar_exec* ex, mpar_result code, const char* message);


/* ==========================================================================
   5. Planner (pure C, no OpenCL): per-layer costs + device capacities ->
      contiguous layer ranges ("stages"), one range per device (V ranges per
      device for interleaved 1F1B).

   Cost model. Every number is per micro-batch unless it says otherwise.
   - Compute of layer l on device d: F + B_input + B_weight seconds. Each of
     the three comes from its measured table when one is given (measured
     seconds override the FLOP model, table by table), else from
     flops / devices[d].flops_per_second.
   - A cut after layer l sends layers[l].output_bytes forward (activation)
     and as many back (its gradient). Over the link a->b that costs
        X = lat(a,b) + out/bw(a,b) + lat(b,a) + out/bw(b,a)
     A blocking copy is charged on BOTH ends (a host-staged copy keeps the
     sender's and the receiver's worker busy; nothing overlaps), so X is
     added to the stage before and to the stage after the cut:
        t_s = compute_s + X(cut before s) + X(cut after s)
     A link that overlaps compute (mpar_plan_link.overlaps: asynchronous
     copies) adds nothing to t_s; its X still counts in the path.
   - path = sum of compute over stages + every X once: one micro-batch's
     forward and backward through the whole chain (fill + drain).
   - Memory of a stage: sum over its layers of 2 * param_bytes (parameters
     and gradients) + optimizer_bytes + n_s * activation_bytes, where n_s is
     the stage's in-flight count (mpar_plan_in_flight). It must fit in
     memory_bytes - reserve_bytes of its device. Link buffers and kernel
     workspace are not modelled: cover them with reserve_bytes.
   - Interleaved 1F1B with V > 1 on k devices: the model is cut into k*V
     chunks in model order, chunk c on the device of stage c mod k (the
     schedule's "virtual stage vs lives on stage vs mod P"). Each chunk gets
     1/V of its device's usable memory, its stash multiplier is
     ceil(n / V) with n the device's peak (in chunk units), and the planner
     minimises the slowest chunk: exact for that model, a proxy for the
     device-level bottleneck (sum of a device's chunks).

   Predicted step time (T = slowest device: sum of its stages' t_s, which
   is the slowest stage when V = 1):
     SEQUENTIAL                 M * path
     GPIPE, 1F1B, ZB_H1         (M - 1) * T + path
     INTERLEAVED_1F1B (V > 1)   (M - 1) * T + (path + (V - 1) * T) / V
   (the last is Megatron's M*T + (P-1)*T/V bubble for balanced stages). ZB_H1
   is given 1F1B's figure, an upper bound: the schedule simulator (section 6)
   predicts its smaller bubble exactly.

   OPTIMAL objective, compared lexicographically:
     pipelined kinds: (slowest stage t_s, then path)  -- what dominates the
                      step time for M >> P, then the fill/drain term
     SEQUENTIAL:      path (stage times do not overlap, so only the sum counts)
   Values within a relative 1e-9 count as ties; a tie on both prefers fewer
   devices. For one device sequence the search is exact (to that 1e-9):
   the bottleneck comes from a bisection (to a relative 1e-10) driven by an
   O(stages * layers) sliding-window feasibility test (the memory window of
   a stage's start only moves right), the path from an O(stages * layers^2)
   DP capped at that bottleneck (run only to break ties and for the final
   plan). Device sequences: with order == FIXED, every subsequence of the
   index order; with SEARCH, every ordered subset, identical devices (same
   costs, memory and links) counted once. Most sequences cost one O(stages
   * layers) test: they cannot beat the incumbent. When there are more
   sequences than order_budget (default 4096: all of them for up to 6
   devices), a hill climb (swap two devices, move one, put an unused one
   in) runs from the index order, from the fastest-first order and then
   from seeded random orders until the budget is spent; plan.exact says 0.
   Measured on 7 devices with link-dominated costs it finds the optimum in
   most instances and stays within a few percent otherwise; 1,000 layers
   on 8 devices take about 0.1-0.2 s (bench/bench_planner.c).
   ========================================================================== */
#ifndef MPAR_PART_PLANNER_DECL
#define MPAR_PART_PLANNER_DECL



#define MPAR_PLAN_DEFAULT_ORDER_BUDGET 4096

typedef enum mpar_plan_mode {
    MPAR_PLAN_OPTIMAL = 0,      /* minimise the objective above */
    MPAR_PLAN_PROPORTIONAL = 1, /* cost share per device ~ weights (llama.cpp's tensor-split) */
    MPAR_PLAN_MANUAL = 2        /* explicit ranges: validated, then costed */
} mpar_plan_mode;

typedef enum mpar_plan_order {
    MPAR_PLAN_ORDER_SEARCH = 0, /* any order of the devices */
    MPAR_PLAN_ORDER_FIXED = 1   /* devices keep their index order */
} mpar_plan_order;

typedef enum mpar_plan_binding_kind {
    MPAR_PLAN_BINDING_COMPUTE = 0, /* the slowest stage is mostly compute */
    MPAR_PLAN_BINDING_MEMORY = 1,  /* without memory limits a faster plan exists */
    MPAR_PLAN_BINDING_LINK = 2     /* the slowest stage is mostly transfers */
} mpar_plan_binding_kind;

typedef struct mpar_plan_layer {
    double flops_forward;         /* per micro-batch */
    double flops_backward_input;  /* gradient w.r.t. the input, typically ~ forward */
    double flops_backward_weight; /* gradient w.r.t. the weights, typically ~ forward */
    uint64_t param_bytes;         /* gradients take as much again */
    uint64_t optimizer_bytes;     /* e.g. Adam: 2 * param_bytes */
    uint64_t activation_bytes;    /* stashed per micro-batch for the backward */
    uint64_t output_bytes;        /* crosses to the next stage if cut after this layer */
} mpar_plan_layer;

typedef struct mpar_plan_device {
    const char* name;         /* optional, for messages */
    double flops_per_second;  /* FLOP model; may be 0 when measured tables cover it */
    uint64_t memory_bytes;    /* capacity; 0 = unlimited (not checked) */
    uint64_t reserve_bytes;   /* kept free: runtime, workspace, link buffers */
} mpar_plan_device;

typedef struct mpar_plan_link {
    double bandwidth; /* bytes per second; 0 = unlimited */
    double latency;   /* seconds per message */
    /* The transfer overlaps compute (an asynchronous link: copy queue,
       events): it lengthens the path but neither stage's time. A cut's X
       is charged to its stages only when the links of both directions
       block. */
    int overlaps;
} mpar_plan_link;

/* One stage of a plan. MANUAL input reads device, first_layer, last_layer. */
/* How a micro-batch's activations are kept between its forward and its
   backward (mpar_pipeline_desc.activation_type). BF16: every layer's
   output is rounded to bfloat16 as it is computed (loss values excepted),
   and the activation slots hold them in 16 bits: half the bytes, plus one
   fp32 working copy per chunk that the layers compute in. Parameters,
   gradients and optimizer moments stay fp32 (an update smaller than a bf16
   parameter's spacing would be lost; moments need fp32 range and
   precision), as do layer stashes, the links and the input of the first
   stage. Pipelines with the same setting give the same numbers bit for
   bit, whatever the partition. AUTO: FP32 when the pipeline fits its
   devices, else BF16; mpar_pipeline_plan tries FP32, then BF16, before it
   turns to recomputation (mpar_plan.activation_type says which), and
   mpar_pipeline_create makes the same choice (mpar_pipeline_stats says
   which). One process only. */
typedef enum mpar_activation_type {
    MPAR_ACTIVATIONS_FP32 = 0,
    MPAR_ACTIVATIONS_BF16 = 1,
    MPAR_ACTIVATIONS_AUTO = 2
} mpar_activation_type;

typedef struct mpar_plan_stage {
    int device;              /* index into desc.devices */
    int first_layer;         /* inclusive, 0-based */
    int last_layer;          /* inclusive */
    int in_flight;           /* stash multiplier used for memory */
    /* The stage keeps only its input per micro-batch and recomputes its
       forward in the backward: chosen by mpar_pipeline_plan where memory
       binds (printed as "0:0-5r"); MANUAL input may set it. */
    int recompute;
    double compute_seconds;  /* F + B + W per micro-batch */
    double transfer_seconds; /* X before + X after, per micro-batch */
    double time_seconds;     /* compute + transfer */
    uint64_t memory_bytes;   /* predicted peak */
} mpar_plan_stage;

/* Zero-initialise, fill the required fields (layers, devices); every zero
   means "default". */
typedef struct mpar_plan_desc {
    int num_layers;                       /* required, >= 1 */
    const mpar_plan_layer* layers;        /* required */
    int num_devices;                      /* required, >= 1 */
    const mpar_plan_device* devices;      /* required */
    const mpar_plan_link* links;          /* NULL = free; else [from * num_devices + to] */
    /* Measured seconds per micro-batch, [layer * num_devices + device]; each
       table given overrides the FLOP model for its part. */
    const double* measured_forward;
    const double* measured_backward_input;
    const double* measured_backward_weight;
    mpar_schedule_kind schedule;          /* default SEQUENTIAL (0) */
    int microbatches;                     /* M; 0 -> 1 */
    int virtual_stages;                   /* V; 0 -> 1; INTERLEAVED_1F1B takes V, ZB_V runs 2 */
    /* A schedule object instead of the three fields above: the plan uses
       exactly its stage count (use_devices), and its stash peaks and chunk
       placement; M and V are its own. */
    const struct mpar_schedule* schedule_lists;
    mpar_plan_mode mode;                  /* default OPTIMAL */
    int use_devices;                      /* OPTIMAL: 0 = choose (fewer if faster), n = exactly n */
    mpar_plan_order order;                /* OPTIMAL: default SEARCH */
    int order_budget;                     /* OPTIMAL: 0 -> MPAR_PLAN_DEFAULT_ORDER_BUDGET */
    const double* weights;                /* PROPORTIONAL: num_devices weights >= 0, index order */
    const mpar_plan_stage* manual_stages; /* MANUAL: ranges in pipeline order ... */
    int num_manual_stages;
    const int* manual_layer_devices;      /* ... or MANUAL: a device per layer */
    /* Inference only: no gradients (a layer holds param_bytes +
       optimizer_bytes, which should be 0) and one micro-batch's activations
       per stage (stages[].in_flight is 1). */
    int inference_only;
    /* The planner's tables and the plan's arrays (the plan keeps a copy
       for mpar_plan_free); all NULL: MPAR_MALLOC. */
    mpar_allocator allocator;
} mpar_plan_desc;

typedef struct mpar_plan_binding {
    mpar_plan_binding_kind kind;
    int stage;     /* the slowest stage (COMPUTE, LINK); a stage of the device (MEMORY) */
    int device;    /* that stage's device (COMPUTE), the full device (MEMORY), link sender (LINK) */
    int device_to; /* LINK: receiver of the forward direction; else -1 */
    char text[320];
} mpar_plan_binding;

typedef struct mpar_plan {
    int num_stages;
    mpar_plan_stage* stages;          /* pipeline order */
    int num_devices;                  /* desc.num_devices (0 for a parsed plan) */
    uint64_t* device_memory_bytes;    /* predicted peak per device, 0 if unused */
    uint64_t* device_capacity_bytes;  /* usable (memory - reserve), 0 = unlimited */
    mpar_schedule_kind schedule;
    int microbatches;
    int virtual_stages;               /* 1 unless interleaved on >= 2 devices */
    double bottleneck_seconds;        /* slowest stage time */
    double path_seconds;              /* sum of compute + each transfer once */
    double step_seconds;              /* predicted step time (formula above) */
    mpar_plan_binding binding;
    int exact;                        /* 1: OPTIMAL and every device sequence was searched */
    long orders_evaluated;            /* device sequences the search costed */
    mpar_allocator allocator;         /* what the arrays came from; mpar_plan_free uses it */
    /* mpar_pipeline_plan: the activations the bytes are for (FP32 or BF16;
       AUTO resolved). Not part of the text or JSON forms. */
    mpar_activation_type activation_type;
} mpar_plan;

/* Peak number of micro-batches whose activations stage `stage` (0-based) of
   `stages` keeps stashed:
     SEQUENTIAL            M (the whole batch at once)
     GPIPE                 M
     1F1B                  min(M, P - s)
     ZB_H1                 min(M, P): its W's lag s micro-batches behind the
                           I's, so stage s holds s more than under 1F1B
     INTERLEAVED_1F1B      V <= 1: as 1F1B. V > 1: in chunk units, the peak of
                           Megatron's order (warm-up 2(P-s-1) + (V-1)P, then
                           one F / one B) with M padded up to a multiple of P
                           and the padding dropped: min(MV, 2(P-s-1)+(V-1)P+1)
                           when P divides M.
   These are the peaks section 6's simulator reaches (for SEQUENTIAL it runs
   the batch as one micro-batch: its peak 1 is these M). virtual_stages 0
   means 1. Returns 0 for bad arguments. */
MPARDEF int mpar_plan_in_flight(mpar_schedule_kind kind, int stages, int microbatches, int virtual_stages,
                                int stage);

/* Builds a plan. On failure *out is zeroed (mpar_plan_free is still safe).
   Errors: MPAR_ERROR_INVALID_ARGUMENT (NULL, counts, negative or non-finite
   costs), MPAR_ERROR_INVALID_PLAN (manual ranges; more stages than layers),
   MPAR_ERROR_DOES_NOT_FIT (a layer fits no device; no plan fits: the message
   names the device and the missing bytes), MPAR_ERROR_OUT_OF_HOST_MEMORY. */
MPARDEF mpar_result mpar_plan_create(const mpar_plan_desc* desc, mpar_plan* out, mpar_error* err);

MPARDEF void mpar_plan_free(mpar_plan* plan);

/* "device:first-last,..." e.g. "0:0-5,1:6-11"; "0:0-5r" recomputes. snprintf-like: writes at
   most size bytes (NUL-terminated if size > 0) and returns the length the
   whole text needs, or -1 for a NULL plan. */
MPARDEF int mpar_plan_to_string(const mpar_plan* plan, char* buf, size_t size);

/* Reads the text form (at most `length` bytes, stopping at a NUL; blanks
   between tokens allowed; "d:a" means "d:a-a") into a plan holding only the
   ranges: feed its stages to MANUAL to validate and cost them. Any input is
   safe. Errors: MPAR_ERROR_INVALID_ARGUMENT (NULL), MPAR_ERROR_INVALID_PLAN
   with the offset of the fault, MPAR_ERROR_OUT_OF_HOST_MEMORY. */
MPARDEF mpar_result mpar_plan_parse(const char* text, size_t length, mpar_plan* out, mpar_error* err);
/* mpar_plan_parse with the plan's arrays from `allocator` (NULL or all NULL:
   MPAR_MALLOC); the plan keeps it for mpar_plan_free. */
MPARDEF mpar_result mpar_plan_parse_with(const mpar_allocator* allocator, const char* text, size_t length,
                                         mpar_plan* out, mpar_error* err);

/* A table for people, and JSON for programs. MPAR_ERROR_IO if writing fails. */
MPARDEF mpar_result mpar_plan_print(const mpar_plan* plan, FILE* f);
MPARDEF mpar_result mpar_plan_write_json(const mpar_plan* plan, FILE* f);

MPARDEF const char* mpar_plan_binding_name(mpar_plan_binding_kind kind);

#endif /* MPAR_PART_PLANNER_DECL */


/* ==========================================================================
   6. Schedules (pure C, no OpenCL): micro-batch schedules as data, and a
      simulator that proves them deadlock-free and predicts step time.

   A schedule is one ordered action list per stage (= per device). The
   executor gives each stage one worker that walks its list in order and
   blocks until the inputs of the next action have arrived; the simulator
   models exactly that, with costs instead of kernels.

   Virtual stages. With V model chunks per device the model is cut into
   P*V virtual stages in model order; the schedule's placement says which
   stage runs each, and chunk c of stage s is the c-th of them in model
   order. Interleaved 1F1B: vs = c*P + s (virtual stage j on stage j mod
   P). ZB-V: a V, vs = s and 2P-1-s on stage s. With V = 1, vs = s.

   A schedule is all the executor needs: what it implies (split backward or
   not, forward-only, each stage's and each chunk's peak of stashes, the
   micro-batch count, the placement) is derived from the lists once, when
   the schedule is made, and read from mpar_schedule by the executor,
   planner, profiler and timeline alike. The kinds are generators;
   mpar_schedule_synthesize makes one for given costs; inference runs a
   forward-only schedule (mpar_schedule_forward_only).

   Dependencies (what the executor enforces, what the simulator checks):
     F(vs,m)      needs F(vs-1,m)            (+ link delay if another stage)
     B/I(vs,m)    needs F(vs,m), and B/I(vs+1,m) unless vs is the last one
                                             (+ link delay if another stage)
     W(vs,m)      needs I(vs,m)              (same stage)
     OPTIMIZER    needs every B / W of its stage; it is the last action.
   Every (vs,m) has exactly one F, and either one B or one I and one W.
   Links are queues: across each boundary the receiver must take the
   micro-batches in the order the sender sends them (validation refuses
   other lists). Sends never block: a link is modelled as able to hold
   every message in flight, so a bounded link queue needs room for the peak
   in-flight count. The executor accumulates a chunk's weight gradients in
   list order, so a schedule equals one device bit for bit when each
   chunk's B's and W's run in micro-batch order (every generator's and the
   synthesizer's do); other valid orders give the same values within float
   rounding.
   ========================================================================== */
#ifndef MPAR_PART_SCHEDULE_DECL
#define MPAR_PART_SCHEDULE_DECL



typedef enum mpar_action_kind {
    MPAR_ACTION_FORWARD = 0,         /* F: forward of one micro-batch          */
    MPAR_ACTION_BACKWARD = 1,        /* B: full backward (input + weight grad) */
    MPAR_ACTION_BACKWARD_INPUT = 2,  /* I: input gradient only (sent upstream) */
    MPAR_ACTION_BACKWARD_WEIGHT = 3, /* W: weight gradient only (local)        */
    MPAR_ACTION_OPTIMIZER_STEP = 4   /* last action of every stage             */
} mpar_action_kind;

typedef struct mpar_action {
    mpar_action_kind kind;
    int microbatch; /* 0 .. microbatches-1; -1 for OPTIMIZER_STEP (ignored) */
    int chunk;      /* 0 .. virtual_stages-1; 0 unless interleaved          */
} mpar_action;

/* Read-only after creation; use the functions below to make and free one. */
typedef struct mpar_schedule {
    mpar_schedule_kind kind; /* the generator; meaningless when custom != 0 */
    int custom;              /* 1 when made from lists (or synthesized) */
    int stages;              /* P: devices, one action list each */
    int microbatches;        /* M (1 for SEQUENTIAL, whatever was asked) */
    int virtual_stages;      /* V: model chunks per stage */
    int* action_count;       /* [stages] */
    mpar_action** actions;   /* [stages][action_count[s]] */
    /* Where the P*V virtual stages (model order) live: placement[vs] is its
       stage; chunk c of stage s is the c-th virtual stage of s in model
       order, virtual_stage_of[s*V + c]. Interleaved: vs on vs mod P. V
       shape (ZB-V): vs and 2P-1-vs on one stage. */
    int* placement;          /* [stages*virtual_stages] */
    int* virtual_stage_of;   /* [stages*virtual_stages] */
    /* What the lists imply, derived once when the schedule is made (list
       order only, no costs): the one place the executor, planner, profiler
       and timeline learn it from. */
    int split_backward;        /* some backward is split into I and W */
    int forward_only;          /* no backward, no optimizer step: inference */
    int* peak_in_flight;       /* [stages] most stashes held at once, all chunks of the stage */
    int* chunk_peak_in_flight; /* [stages*virtual_stages] the same per virtual stage */
    mpar_allocator allocator; /* what it was made with; destroy and validate use it */
} mpar_schedule;

/* Builds the action lists of a schedule kind and checks them with
   mpar_schedule_validate (a generated schedule is never handed out broken).
   - SEQUENTIAL: the naive layer-wise baseline. The whole batch goes through
     as ONE micro-batch, so the result has microbatches == 1 whatever M was
     given (M must still be >= 1). Costs given to mpar_simulate are per
     scheduled micro-batch, so here they are the costs of the whole batch.
   - GPIPE: per stage F0..F(M-1), then B0..B(M-1).
   - 1F1B (PipeDream-Flush): stage s runs min(P-s-1, M) warm-up forwards,
     then alternates F and B, then drains the remaining B's.
   - INTERLEAVED_1F1B (Megatron-LM): V chunks per stage. Micro-batches go in
     groups of P: the forward order is, per group, chunk 0 of every
     micro-batch of the group, then chunk 1, ...; backward order is the same
     with chunks reversed. Warm-up: 2*(P-s-1) + (V-1)*P forwards (at most
     all), then one forward / one backward, then the remaining backwards.
     Megatron requires M to be a multiple of P; mpar accepts any M >= 1 by
     building the lists for M rounded up to a multiple of P and dropping the
     padding micro-batches. Dropping whole micro-batches cannot create a
     deadlock; it only leaves some idle time, so the bubble is exactly
     Megatron's (P-1)/(V*M+P-1) (equal costs, no link delay) when P divides
     M and somewhat above it otherwise, still below 1F1B's for M >= 2.
     With V = 1 the lists are exactly 1F1B's.
   - ZB_H1 (Qi et al. 2023, "Zero Bubble Pipeline Parallelism", handcrafted
     H1): backward split into I and W. Stage s runs 1F1B's warm-up and
     F / I order, but its W's lag s micro-batches behind its I's; the s
     deferred W's run in the cool-down, filling the s idle slots stage s has
     there while input gradients travel down to stage 0. With F = I = W the
     bubble is (P-1)/(3M+P-1) for M >= P, a third of 1F1B's idle time.
     Stashes live until W, so every stage holds up to min(M, P): stage 0
     as in 1F1B, later stages more than 1F1B's P-s, the peak over stages
     (what sizes memory in the paper) equal to 1F1B's.
   - ZB_H2 (the same paper, H2): ZB-H1 with more warm-up. Stage s runs
     2(P-s)-1 forwards (at most M) before its first I: all that fit before
     micro-batch 0's input gradient can come back, so no stage waits for
     it. Then per micro-batch: I, a deferred W, the next F; the W's lag s
     behind the I's (2s once M >= 2P-1) and the deferred ones fill the
     cool-down. Stage s holds 2P-1 stashes (M >= 2P-1; else min(M,
     2P-1-s)): about twice 1F1B's peak over stages (P).
   - ZB_V (the same authors' V schedule): two chunks per stage placed in a
     V: virtual stage vs on stage vs and virtual stage P+j on stage P-1-j,
     so stage s runs chunk 0 = virtual stage s and chunk 1 = 2P-1-s, and
     the loss is on stage 0 (placement / virtual_stage_of say so). Stage s:
     2(P-s)-1 chunk-0 forwards, s pairs F1 F0, P-s triples F1 I1 W1; then
     F0 I0 W0 F1 I1 W1 until all forwards ran; cool-down: s pairs I0 I1,
     P-s pairs I0 W0, the deferred W's (chunk 1's first). M < 2P-1 is
     built as 2P-1 with the padding micro-batches dropped. Each stage
     holds at most 2*min(M, P) chunk stashes (peak_in_flight counts
     chunks); with the model cut into 2P equal virtual stages a chunk's
     stash is half a 1F1B stage's, so that is min(M, P) stage stashes:
     1F1B's peak (its stage 0), on every stage.
     Unit costs (F = I = W per chunk), no link delay: step 6M+P-1 once
     2M >= 3P-1, else 4M+4P-2 (for M <= P what ZB-H1 takes with stage
     costs of two chunks, below it for larger M).
   Bubble with F = I = W and no link delay, in the units of the schedule
   (stages; chunks for ZB_V): ZB_H1 and ZB_H2 (P-1)/(3M+P-1) for M >= P,
   ZB_V (P-1)/(6M+P-1) for 2M >= 3P-1. These are the floor for one step:
   the last stage (for ZB_V the device with virtual stage P-1) cannot start
   before the first forward reaches it, P-1 units, and then has 3M (6M)
   units of work. The published "zero bubble" of H2 and V also hides that
   fill: the next step's warm-up overlaps this step's cool-down, with the
   optimizer's global checks (gradient norm for clipping, NaN/Inf) validated
   after the update and rolled back when they fail. mpar checks exactly, at
   the optimizer step, before the update, so every step keeps the fill;
   what ZB_H2 adds over ZB_H1 is slack for link delays and unequal F, I, W
   (with F = I = W and no delay the two take the same time).
   virtual_stages must be 1 for every kind but INTERLEAVED_1F1B (any) and
   ZB_V (exactly 2). AUTO is refused: it is made from measured costs by
   mpar_schedule_synthesize.
   Errors: MPAR_ERROR_INVALID_ARGUMENT (NULL out, P/M/V < 1, unknown kind,
   AUTO, V > 1 for another kind, V != 2 for ZB_V, sizes too large),
   MPAR_ERROR_OUT_OF_HOST_MEMORY. */
MPARDEF mpar_result mpar_schedule_create(mpar_schedule_kind kind, int stages, int microbatches,
                                         int virtual_stages, mpar_schedule** out, mpar_error* err);

/* Copies hand-written action lists (lists[s] holds counts[s] actions) into a
   custom schedule. Only the shape is checked here (NULLs, sizes, action
   kinds), so a broken schedule can be built on purpose; check it with
   mpar_schedule_validate or mpar_simulate before running it. */
MPARDEF mpar_result mpar_schedule_from_lists(int stages, int microbatches, int virtual_stages,
                                             const mpar_action* const* lists, const int* counts,
                                             mpar_schedule** out, mpar_error* err);

/* The two above with the schedule (and mpar_schedule_validate's scratch)
   allocated from `allocator`, which the schedule keeps for
   mpar_schedule_destroy; NULL or all NULL: MPAR_MALLOC. A partial
   allocator is MPAR_ERROR_INVALID_ARGUMENT. */
MPARDEF mpar_result mpar_schedule_create_with(const mpar_allocator* allocator, mpar_schedule_kind kind, int stages,
                                              int microbatches, int virtual_stages, mpar_schedule** out,
                                              mpar_error* err);
MPARDEF mpar_result mpar_schedule_from_lists_with(const mpar_allocator* allocator, int stages, int microbatches,
                                                  int virtual_stages, const mpar_action* const* lists,
                                                  const int* counts, mpar_schedule** out, mpar_error* err);

/* mpar_schedule_from_lists_with with the virtual stages placed by hand:
   placement[vs] (stages*virtual_stages entries, model order) is the stage
   that runs virtual stage vs; each stage must get virtual_stages of them.
   NULL: interleaved (vs on stage vs mod stages). E.g. a V shape on 2
   stages: {0, 1, 1, 0}. */
MPARDEF mpar_result mpar_schedule_from_lists_placed(const mpar_allocator* allocator, int stages, int microbatches,
                                                    int virtual_stages, const int* placement,
                                                    const mpar_action* const* lists, const int* counts,
                                                    mpar_schedule** out, mpar_error* err);

/* An inference schedule: forwards only, no optimizer step. Each stage runs
   its F(m, vs) in order of m + vs (then m), the time each could start in
   an unbounded pipeline of unit costs; every dependency has a smaller key,
   so no placement can deadlock it. placement as above (NULL: interleaved). */
MPARDEF mpar_result mpar_schedule_forward_only(const mpar_allocator* allocator, int stages, int microbatches,
                                               int virtual_stages, const int* placement, mpar_schedule** out,
                                               mpar_error* err);

/* A copy of a schedule (lists, placement, derived facts), from `allocator`
   (NULL: MPAR_MALLOC). */
MPARDEF mpar_result mpar_schedule_copy(const mpar_allocator* allocator, const mpar_schedule* schedule,
                                       mpar_schedule** out, mpar_error* err);

MPARDEF void mpar_schedule_destroy(mpar_schedule* schedule);

/* Number of actions of a stage (0 for a bad stage or NULL schedule). */
MPARDEF int mpar_schedule_action_count(const mpar_schedule* schedule, int stage);
/* Action `index` of a stage's list, or NULL when out of range. */
MPARDEF const mpar_action* mpar_schedule_action(const mpar_schedule* schedule, int stage, int index);
/* Virtual stage (model order) of chunk `chunk` on stage `stage` (chunk*P +
   stage when interleaved), and back: the stage and the chunk of a virtual
   stage. -1 when out of range. */
MPARDEF int mpar_schedule_virtual_stage(const mpar_schedule* schedule, int stage, int chunk);
MPARDEF int mpar_schedule_stage_of(const mpar_schedule* schedule, int virtual_stage);
MPARDEF int mpar_schedule_chunk_of(const mpar_schedule* schedule, int virtual_stage);

/* Static checks (indices in range; exactly one F and one B or I+W per
   virtual stage and micro-batch; B/I after its own F and W after its own I
   in the list; one optimizer step, last; a forward-only schedule, with no
   backward and no optimizer step anywhere, is an inference schedule and
   needs only its F's) and then a dependency walk that
   finds deadlocks. Failure: MPAR_ERROR_INVALID_SCHEDULE with a message that
   names the stage, the step (0-based position in its list), the action and,
   for a deadlock, what each blocked stage waits for. Deadlock freedom does
   not depend on costs: the lists and the dependencies alone decide it. */
MPARDEF mpar_result mpar_schedule_validate(const mpar_schedule* schedule, mpar_error* err);

/* Writes an action as text: F3, B3, I3, W3 (F3.1 = micro-batch 3, chunk 1
   when show_chunk), OPT for the optimizer step. Returns what snprintf does. */
MPARDEF int mpar_action_format(const mpar_action* action, int show_chunk, char* buf, size_t size);

/* The per-stage action table: one row per stage, one column per step
   (position in the list, not time; see mpar_simulation_print for time).
   With more than one chunk per stage the labels carry the chunk (F3.1)
   and a line under the title maps each stage's chunks to virtual stages:
   "chunks as virtual stages (model order): stage 0: .0=0 .1=7; ...". */
MPARDEF void mpar_schedule_print(const mpar_schedule* schedule, FILE* out);

/* "sequential", "gpipe", "1f1b", "interleaved", "zbh1", "zbh2", "zbv",
   "auto" ("unknown" otherwise). */
MPARDEF const char* mpar_schedule_kind_name(mpar_schedule_kind kind);
/* Inverse of mpar_schedule_kind_name; case, '-', '_' and spaces are ignored,
   and "naive", "pipedream-flush", "interleaved-1f1b", "zb-h1", "zb-h2",
   "zb-v" are accepted. */
MPARDEF mpar_result mpar_schedule_kind_parse(const char* name, mpar_schedule_kind* out, mpar_error* err);

/* Costs for mpar_simulate, in any time unit. All zero (or a NULL desc)
   means defaults. Each cost is taken from its array when the array is
   given, else from the scalar. For F, B, I and W a value of 0 means "not
   given" and the defaults are: F = 1; I and W = F; B = I + W. When B is
   given but I and W are not, I = W = B/2; when B and one of I/W are given,
   the other is B minus it (an error if negative). B may also be set below
   I + W, e.g. for a fused backward kernel. The optimizer step and link
   delays default to 0. Negative, NaN or infinite values are errors. */
typedef struct mpar_sim_desc {
    double forward;
    double backward;
    double backward_input;
    double backward_weight;
    double optimizer_step;
    double link_delay; /* added to a message crossing from one stage to another */
    /* Optional arrays indexed by virtual stage in model order (length
       stages*virtual_stages; with V = 1 that is the stage index): */
    const double* forward_per_stage;
    const double* backward_per_stage;
    const double* backward_input_per_stage;
    const double* backward_weight_per_stage;
    const double* optimizer_step_per_stage; /* length stages: one per device */
    /* Delay across the boundary between virtual stage j and j+1 (length
       stages*virtual_stages - 1), for activations (j -> j+1) and gradients
       (j+1 -> j); ignored when both sides are on the same stage. */
    const double* link_delay_per_boundary;
    /* Uneven micro-batches: micro-batch m's F, B, I, W and link delays are
       multiplied by microbatch_scale[m] (length microbatches, each > 0). */
    const double* microbatch_scale;
    /* How links behave. 0: asynchronous copies (mpar_link_mode ASYNC, MPI):
       a message's delay postpones its receiver and keeps nobody busy.
       Non-zero: blocking copies (HOST_STAGED, DEVICE_COPY): the sender is
       busy for the delay after the action that produced the message (its
       copy out) and the receiver for the delay before the action that
       consumes it (its copy in); the message is there when the sender's
       copy ends. */
    int link_blocking;
    /* The simulation and the simulator's scratch (the simulation keeps a
       copy for mpar_simulation_destroy); all NULL: MPAR_MALLOC, whatever
       the schedule was made with. */
    mpar_allocator allocator;
} mpar_sim_desc;

/* Outcome of a simulation. With asynchronous links (the default) a link's
   delay postpones the receiver but counts as busy time for nobody; with
   link_blocking the copies are part of the actions' times. */
typedef struct mpar_simulation {
    int stages;
    double step_time;       /* end of the last action (the first starts at 0) */
    double bubble_fraction; /* 1 - sum(busy) / (stages * step_time) */
    double* busy;           /* [stages] time spent running actions */
    /* [stages] most activation stashes held at once. A stash (one chunk of
       one micro-batch) is taken when its F starts and freed when its B ends,
       or when its W ends for a split backward: W still reads the stashed
       layer inputs. A device with V chunks counts each chunk's stash (each
       holds 1/V of the device's layers). Depends on list order only. */
    int* peak_in_flight;
    int* action_count;      /* [stages], as in the schedule */
    double** start;         /* [stages][action_count[s]] start of each action */
    double** end;           /* [stages][action_count[s]] end of each action */
    mpar_allocator allocator; /* mpar_sim_desc.allocator; destroy uses it */
} mpar_simulation;

/* Runs the schedule: each stage executes its list strictly in order; an
   action starts at max(stage free, dependencies ready). Validates first
   (same errors and messages as mpar_schedule_validate); bad costs give
   MPAR_ERROR_INVALID_ARGUMENT. desc may be NULL (defaults). */
MPARDEF mpar_result mpar_simulate(const mpar_schedule* schedule, const mpar_sim_desc* desc,
                                  mpar_simulation** out, mpar_error* err);
MPARDEF void mpar_simulation_destroy(mpar_simulation* sim);

/* A text Gantt chart, one row per stage and `columns` time slices (<= 0:
   80). Each slice shows the action running at its middle: F B I W, O for
   the optimizer step, upper case for even micro-batches and lower case for
   odd ones so neighbours stand apart, '.' when idle. With more than one
   chunk per stage a "chunk" row under each stage's gives the chunk of each
   slice (0-9, then a-z), and a line above the rows says which virtual
   stage each chunk of each stage is (ZB-V's V: ".0=0 .1=7" on stage 0 of
   4). Nothing is printed for a schedule of another shape. */
MPARDEF void mpar_simulation_print(const mpar_simulation* sim, const mpar_schedule* schedule, FILE* out,
                                   int columns);

/* ---- synthesis: a schedule made for given costs and memory ----

   mpar_schedule_synthesize searches for the valid schedule with the
   shortest simulated step (mpar_simulate with `costs`) that keeps every
   device within its activation-stash cap. The built-in generators assume
   equal F, I and W on every stage; with unequal costs (an embedding whose
   weight gradient dominates, a vocabulary head three times a layer, slow
   links) and unequal memory per device, a schedule made for those numbers
   can be markedly shorter.

   The search (deterministic: the same desc gives the same lists):
   1. Seeds: every built-in kind mpar_schedule_create makes for these P, M
      and V with this placement (GPIPE, 1F1B, INTERLEAVED_1F1B, ZB_H1 and
      any later zero-bubble kind; not SEQUENTIAL, which changes M) whose
      stashes fit the caps and whose backward matches `split`; and the
      least-memory schedule, one micro-batch at a time, which holds exactly
      V stashes per device.
   2. List scheduling: a simulated clock builds the lists action by action.
      Each virtual stage takes its forwards, backwards and weight gradients
      in micro-batch order; among the actions that could start before the
      earliest possible completion (Giffler-Thompson), the stage picks by a
      priority rule: input gradients first when upstream waits, forwards
      when the downstream will starve, weight gradients in idle time or
      when the cap blocks a forward. A forward is taken only if the stashes
      still owed to older micro-batches fit beside it, so the oldest
      micro-batch can always finish: no rule can deadlock. Several rules
      (1F1B-like, breadth-first, eager W, randomised) are tried.
   3. Local search from the best so far: moves on the critical path (run a
      dependency earlier, let a waiting action pass the one before it),
      random moves of one action, and B <-> I + W; each candidate is checked
      against the caps and simulated (a deadlock rejects it), and kept when
      its step is no longer (ties broken by the sum of the stages' finish
      times).
   The result is the best candidate seen, so its step is never longer than
   that of any seed, in particular of every built-in that fits. */

/* How the synthesised schedule may run backwards. */
typedef enum mpar_synth_split {
    MPAR_SYNTH_SPLIT_ANY = 0,   /* per action: B, or I + W (default) */
    MPAR_SYNTH_SPLIT_NEVER = 1, /* full B only: layers without a separate weight gradient */
    MPAR_SYNTH_SPLIT_ALWAYS = 2 /* I + W only */
} mpar_synth_split;

/* What to synthesise for. Zero-initialised fields take the defaults. */
typedef struct mpar_synth_desc {
    int stages;         /* P: devices, >= 1 */
    int microbatches;   /* M, >= 1 */
    int virtual_stages; /* V: chunks per device; 0 is taken as 1 */
    /* [stages*virtual_stages] stage of each virtual stage, model order (as
       mpar_schedule_from_lists_placed); NULL: interleaved (vs mod P). */
    const int* placement;
    /* Costs per virtual stage and links, as for mpar_simulate (F, I, W; B
       = I + W unless given; link delays per boundary, link_blocking, the
       optimizer step, micro-batch scales). costs.allocator is not used. */
    mpar_sim_desc costs;
    /* [stages] most activation stashes device s may hold at once, counted
       as mpar_schedule.peak_in_flight counts them (one per chunk and
       micro-batch, from its F to its B or W); NULL or an entry <= 0: no
       cap. Every schedule holds V on each device (all chunks' forwards of
       a micro-batch run before its first backward), so a cap below V is
       MPAR_ERROR_DOES_NOT_FIT. */
    const int* max_in_flight;
    /* (Named for its zero default: free choice. A field "allow_split" set
       to 0 would read as "no split".) */
    mpar_synth_split split;
    /* Search budget: how many candidate schedules to simulate (the
       seeds are always tried, whatever the budget). 0: 2000, about 10 ms
       for P = 4, M = 16 and 50 ms (V = 1) to 0.15 s (V = 2) for P = 8,
       M = 32 on one 2020s x86 core. */
    int effort;
    uint64_t seed;      /* randomised rules and moves; any value */
    mpar_allocator allocator; /* the schedule and all scratch; all NULL: MPAR_MALLOC */
} mpar_synth_desc;

/* Makes a custom schedule (custom = 1, kind = MPAR_SCHEDULE_AUTO, the
   placement of desc) for desc, as described above. It passes
   mpar_schedule_validate, its peak_in_flight[s] is within
   max_in_flight[s], and its step under mpar_simulate with desc->costs is
   no longer than that of any built-in kind that fits (see 1 above).
   Errors: MPAR_ERROR_INVALID_ARGUMENT naming the field and its value (NULL
   desc or out, P/M/V < 1, a bad placement, bad costs, effort < 0, a
   partial allocator, split out of range); MPAR_ERROR_DOES_NOT_FIT naming
   the first device whose cap is below V, its cap and what the least-memory
   schedule needs there; MPAR_ERROR_OUT_OF_HOST_MEMORY. */
MPARDEF mpar_result mpar_schedule_synthesize(const mpar_synth_desc* desc, mpar_schedule** out, mpar_error* err);

#endif /* MPAR_PART_SCHEDULE_DECL */


/* ==========================================================================
   7-8. Stage chain and executor: stages on devices joined by links, one
   worker thread per device walking its schedule's action list.
   ========================================================================== */

typedef enum mpar_optimizer_kind { MPAR_OPTIMIZER_ADAMW = 0, MPAR_OPTIMIZER_SGD = 1 } mpar_optimizer_kind;

/* Zero fields take the defaults in brackets. */
typedef struct mpar_optimizer_desc {
    mpar_optimizer_kind kind;
    float lr;           /* peak learning rate [1e-3] */
    float momentum;     /* SGD [0] */
    float beta1, beta2; /* AdamW [0.9, 0.999] */
    float eps;          /* AdamW [1e-8] */
    float weight_decay; /* decoupled for AdamW, L2 for SGD [0] */
    float clip_norm;    /* clip gradients to this global norm [off] */
    int warmup_steps;   /* linear warm-up from lr/warmup_steps [0] */
    int decay_steps;    /* cosine decay to min_lr after warm-up [off] */
    float min_lr;
} mpar_optimizer_desc;

/* One stage (one chunk of layers on one device), in model order. With
   interleaving there are stages × virtual_stages of them and chunk j runs
   on the device of chunk j mod stages. */
typedef struct mpar_stage_desc {
    int device;      /* index in the context's selection */
    int first_layer; /* inclusive */
    int last_layer;  /* inclusive */
} mpar_stage_desc;

/* How a link moves a tensor between two stages (its transport).
   DEVICE_COPY: a copy in the sender's queue, waited for (one cl_context).
   HOST_STAGED: a blocking read into host memory by the sender, a blocking
     write by the receiver; both workers wait for their half.
   ASYNC: the sender enqueues the copy on a copy queue of its device behind
     an event of its compute queue and goes on; the receiver's queue waits
     on the copy's event. Across cl_contexts the slot is pinned host memory
     (CL_MEM_ALLOC_HOST_PTR, mapped once). Copies overlap compute where the
     device can (GPUs with copy engines).
   AUTO: ASYNC between two devices that are not CPUs, else HOST_STAGED.
   CPU devices already live in host memory, and PoCL serialises a buffer
   shared by two of its devices (measured: 1F1B on two `basic` devices 0.86x
   with device copies, 1.47x staged). Links between processes use MPI
   whatever this says. Every transport gives the same numbers, bit for bit. */
typedef enum mpar_link_mode {
    MPAR_LINK_AUTO = 0,
    MPAR_LINK_DEVICE_COPY = 1, /* only possible within one cl_context */
    MPAR_LINK_HOST_STAGED = 2,
    MPAR_LINK_ASYNC = 3        /* copy queue, events, pinned memory across contexts */
} mpar_link_mode;

typedef struct mpar_pipeline_desc {
    const mpar_stage_desc* stages; /* explicit stages; NULL: from `plan` */
    int stage_count;               /* entries in `stages` (0 when it is NULL) */
    /* With no stages: the plan to follow (mpar_pipeline_plan); NULL: mpar
       plans itself with plan_options (NULL: optimal, from measured layer
       costs: see mpar_cost_source). */
    const struct mpar_plan* plan;
    const struct mpar_plan_options* plan_options;
    mpar_schedule_kind schedule;   /* zero is SEQUENTIAL, the naive baseline */
    int microbatches;              /* M [1] */
    int virtual_stages;            /* V for INTERLEAVED_1F1B and AUTO [1; ZB_V: 2] */
    /* Most micro-batch stashes each device stage may hold at once (chunk
       units, as mpar_schedule.peak_in_flight counts them), e.g. for a
       device with less memory: [devices of the pipeline, stage order];
       NULL or an entry <= 0: no limit. AUTO synthesises within it (without
       it, within what its plan's schedule holds); any other schedule that
       holds more is refused with MPAR_ERROR_DOES_NOT_FIT. */
    const int* max_in_flight;
    /* Any schedule to run instead of generating one from the three fields
       above: made by mpar_schedule_create, _from_lists, _from_lists_placed
       or _synthesize, and valid (mpar_schedule_validate). The pipeline
       keeps its own copy. Its stages are the devices; its microbatches and
       virtual_stages replace the desc's, and its placement says which of
       the stages (chunks, in model order) share a device. */
    const mpar_schedule* schedule_lists;
    int max_batch;                 /* most samples in one step (required) */
    mpar_optimizer_desc optimizer;
    int recompute;          /* keep only stage inputs; recompute in backward */
    /* Recomputation stage by stage: recompute_stages[j] != 0 makes stage
       (chunk) j keep only its input and recompute its forward in the
       backward; [stage_count entries, with explicit stages]. With a plan,
       the plan's stages[].recompute (mpar_pipeline_plan chooses them where
       memory binds). `recompute` above turns it on for every stage. */
    const int* recompute_stages;
    int skip_nonfinite;     /* skip a step whose loss/gradients are NaN/Inf */
    int link_capacity;      /* messages a link holds [most micro-batches a stage holds, at least 2] */
    mpar_link_mode link_mode; /* how activations cross a stage boundary [AUTO] */
    /* Most actions a worker enqueues ahead of its device: after that it
       waits for the oldest to finish [4]. Only OpenCL-route stages run
       ahead; host-route ones compute in the worker thread. */
    int max_run_ahead;
    int profile;            /* record a timeline of every step (mpar_pipeline_get_timeline) */
    /* Memory. A chunk's per-layer state (parameters, gradients, optimizer
       moments) and each of its activation and gradient slots are cut,
       between layers, into buffers of at most max_buffer_bytes [each
       device's CL_DEVICE_MAX_MEM_ALLOC_SIZE], so a stage is limited by its
       device's total memory, not by its largest allocation. A single layer
       larger than that is refused with MPAR_ERROR_DOES_NOT_FIT. */
    uint64_t max_buffer_bytes;
    /* Bytes mpar may allocate on each device [its CL_DEVICE_GLOBAL_MEM_SIZE].
       A pipeline that needs more on some device (mpar_pipeline_memory) is
       refused with MPAR_ERROR_DOES_NOT_FIT before anything is allocated,
       naming the device and the shortfall; the planner plans within it. */
    uint64_t memory_limit_bytes;
    /* Inference only: no gradients, optimizer state or gradient slots, and
       one activation slot per chunk, so a device holds its parameters and
       the activations in flight. Training calls and gradient or moment
       reads return MPAR_ERROR_INVALID_STATE. */
    int inference_only;
    mpar_activation_type activation_type; /* [FP32]; see mpar_activation_type */
    /* Live re-balancing. 0 [off]; MPAR_REBALANCE_AUTO: every training step
       times each stage's compute (the host clock around its actions, link
       waits left out; no kernel profiling), and after rebalance_warmup
       measured steps the pipeline re-plans (mpar_pipeline_rebalance with
       the measured speeds); MPAR_REBALANCE_MANUAL: only when the caller
       calls mpar_pipeline_rebalance. A move keeps the devices and their
       order, moves the cuts between layers, and carries parameters,
       gradients, optimizer moments and the step through host memory into
       a rebuilt executor: training continues bit for bit as if the new
       stages had been used from the start. Opt-in because a move rebuilds
       the stages' buffers, links and threads (the first step after it runs
       one stage at a time, as a new pipeline's does), and because it
       replaces the stages or plan the caller chose: mpar_pipeline_get_desc
       then shows the pipeline's own copies (stages, recompute_stages,
       max_in_flight, schedule_lists, plan_options without its arrays;
       plan NULL). Not with mpi_comm (a stage's state would have to cross
       processes; refused with MPAR_ERROR_UNSUPPORTED), nor inference_only
       (it measures training steps; refused the same way), nor with a
       device that runs two stages (its speed is shared; refused). */
    int rebalance;
    /* Measured steps before the first re-plan [3]; steps run one stage at
       a time (a new pipeline's first, kernels compiling; the first after a
       move) are not counted. Each later re-plan waits twice as many
       measured steps as the one before, up to 64 times rebalance_warmup,
       so measurement noise that moves layers back and forth costs fewer
       and fewer rebuilds while a lasting change is still followed. */
    int rebalance_warmup;
    /* Move only when the new plan's predicted step time is below the
       current stages' (both costed by the planner with the same speeds) by
       more than this fraction, in [0, 1) [0.05] */
    double rebalance_threshold;
    /* Stages in separate processes (compiled with MPAR_USE_MPI): the
       address of an MPI_Comm whose ranks share this pipeline, each calling
       every pipeline function with the same arguments (MPI must be
       initialised with MPI_THREAD_MULTIPLE). stage_rank[s] is the rank that
       runs stage s (default: contiguous blocks of stages per rank); device
       indices in `stages` are those of the owning rank's context. Explicit
       `stages` are required. NULL: one process.
       Create is collective: the ranks compare their descriptions part by
       part (mpar version, model, stages, schedule, batch shape, data
       types, optimizer) and every rank fails with MPAR_ERROR_MISMATCH
       naming the part that differs; a rank whose own create fails returns
       its error and the others MPAR_ERROR_ABORTED naming it.
       Failure is bounded: no call waits for another rank longer than
       timeout_seconds at a time. A rank that refuses a call before
       communicating (a bad batch) still takes part in it, so the others
       return MPAR_ERROR_ABORTED naming it at once, and later calls stay
       paired. A rank that stops (SIGSTOP, a debugger) makes the others
       return MPAR_ERROR_TIMEOUT or MPAR_ERROR_ABORTED within
       timeout_seconds + 1 s; when it continues, the ranks finish the
       failed call's agreement at their next call and work on. A rank that
       dies: without `mpirun --enable-recovery`, Open MPI ends the whole job;
       with it, the others return MPAR_ERROR_TIMEOUT or MPAR_ERROR_IO within
       timeout_seconds, and every later call on the pipeline does the same
       (destroy it: its communicator is left to MPI). Every received
       message's size is checked (MPAR_ERROR_MISMATCH), as is the batch
       size each rank passed. */
    const void* mpi_comm;
    const int* stage_rank;
    double timeout_seconds; /* longest wait for a neighbour [600] */
    /* Testing: make action `fault_action` (position in the list) of stage
       `fault_stage` fail with MPAR_ERROR_ABORTED in every training step. */
    int inject_fault, fault_stage, fault_action;
    /* Generation (mpar_pipeline_generate): sequences a key/value cache
       holds at once [0: no cache, generation off], and positions per
       sequence, prompt included [0: the model's seq_len; at most that]. */
    int generate_sequences;
    int generate_context;
} mpar_pipeline_desc;

/* A batch: samples × seq_len rows. inputs: float [rows × input_features],
   or int32 token ids [rows] for token models; targets: int32 [rows], a
   negative target leaves its row out of the loss. A model whose loss layer
   takes float targets (MPAR_LAYER_FLOAT_TARGETS: mpar_layer_mse, _l1)
   reads float_targets instead, [rows × the loss layer's in_features], all
   finite; only the field the model's loss layer takes is read. */
typedef struct mpar_batch {
    const void* inputs;
    const int32_t* targets;
    int samples;
    const float* float_targets;
} mpar_batch;

typedef struct mpar_step_info {
    double loss;        /* mean over counted rows */
    int counted_rows;
    double grad_norm;   /* global L2 norm before clipping */
    float lr;           /* learning rate used */
    int skipped;        /* non-finite step skipped (skip_nonfinite) */
    int step;           /* optimizer steps taken so far */
} mpar_step_info;

typedef struct mpar_pipeline_stats {
    int stages;                /* devices (workers) */
    int peak_in_flight[64];    /* most micro-batch activations held at once, per device */
    int slots[64];             /* activation slots allocated, per device */
    size_t device_bytes[64];   /* buffers allocated, per device */
    /* Kernel launches and GEMMs in the last job (training step, gradient
       computation or inference), per device: all of them, and those that
       went to OpenCL (the rest ran as host code). */
    uint64_t launches[64], opencl_launches[64];
    /* The transport each boundary's links use (boundary j: between stage
       j and j+1 in model order; AUTO resolved; HOST_STAGED for MPI links)
       and whether that transport overlaps compute. */
    int boundaries;
    mpar_link_mode link_modes[64];
    int link_overlaps[64];
    mpar_activation_type activation_type; /* FP32 or BF16 (AUTO resolved) */
    /* desc.rebalance: moves made, re-plans made (moved or not), and
       re-plans or moves that failed (a failed move is undone: the pipeline
       went on with its stages; automatic re-planning stops after one) */
    int rebalances, rebalance_checks, rebalance_failures;
} mpar_pipeline_stats;

typedef struct mpar_pipeline mpar_pipeline;

/* The pipeline holds a reference to `model` until mpar_pipeline_destroy
   (see mpar_model_destroy): the model may be destroyed first. */
MPARDEF mpar_result mpar_pipeline_create(mpar_context* ctx, const mpar_model* model, const mpar_pipeline_desc* desc,
                                         mpar_pipeline** out);

/* What a pipeline made from `desc` would allocate, without allocating
   anything: per device stage and per chunk, the bytes of its buffers by
   the executor's own accounting (what mpar_pipeline_get_stats reports as
   device_bytes once it is created), link buffers included. Makes the
   checks mpar_pipeline_create makes before it allocates, so it returns
   MPAR_ERROR_DOES_NOT_FIT, naming the device and the shortfall, exactly
   when creating would (the counts are filled in then too). */
typedef struct mpar_pipeline_memory_info {
    int stages;                  /* device stages */
    int chunks;                  /* chunks: stages x virtual stages */
    int device[64];              /* device of each stage */
    uint64_t device_bytes[64];   /* per device stage */
    uint64_t chunk_bytes[256];   /* per chunk, with the link buffers it receives into (and, with
                                    generate_sequences, its key/value caches and generation buffers) */
    int chunk_buffers[256];      /* buffers each chunk's state is cut into (max_buffer_bytes) */
} mpar_pipeline_memory_info;
MPARDEF mpar_result mpar_pipeline_memory(mpar_context* ctx, const mpar_model* model, const mpar_pipeline_desc* desc,
                                         mpar_pipeline_memory_info* out);

/* Where the planner's compute costs come from when the options give
   neither measured tables nor device_flops. */
typedef enum mpar_cost_source {
    /* Each layer timed on each kind of device (a device's name, driver,
       route and slowdown), kept in the profile cache beside the kernel
       binaries (<cache dir>/profile-*.txt; in memory only with the cache
       off): what is missing is measured once, in bounded time (the model's
       layers as single-layer stages on one device: a warm-up job and three
       training steps of one micro-batch; on a PoCL core about a second for
       the demo's MLP), and logged at MPAR_LOG_INFO. A device that cannot
       hold the whole model for that (or a model of more than 64 layers)
       falls back to the FLOP model, logged at MPAR_LOG_WARN. */
    MPAR_COSTS_MEASURED = 0,
    MPAR_COSTS_FLOPS = 1 /* the FLOP model with a GEMM-measured throughput per device */
} mpar_cost_source;

/* Planning a pipeline for a model on the context's devices: the planner's
   inputs come from the model (FLOPs, parameter, optimizer and activation
   bytes for a micro-batch of the desc's size) and the devices (memory, and
   per-layer times: given, measured or from the FLOP model). Zero fields
   take the defaults in brackets. */
typedef struct mpar_plan_options {
    mpar_plan_mode mode;        /* [OPTIMAL]; PROPORTIONAL uses weights; MANUAL is desc.stages */
    const double* weights;      /* PROPORTIONAL: one per device */
    int use_devices;            /* exactly this many [0: the planner chooses, fewer when faster] */
    mpar_plan_order order;      /* [SEARCH device orders] or FIXED (context order) */
    const double* device_flops; /* FLOP/s per device [measured with a GEMM; once when all are alike] */
    /* Measured seconds per micro-batch, [layer * devices + device]
       (mpar_profile_layers); they replace the FLOP model. */
    const double *measured_forward, *measured_backward_input, *measured_backward_weight;
    uint64_t reserve_bytes;     /* left free on every device [64 MiB] */
    double link_bandwidth;      /* bytes/s between devices [12e9 same context, 6e9 staged] */
    double link_latency;        /* seconds per transfer [1e-4] */
    /* Without measured tables or device_flops: [MEASURED] or FLOPS (see
       mpar_cost_source). Pipelines over MPI use the FLOP model. */
    mpar_cost_source costs;
} mpar_plan_options;

MPARDEF mpar_result mpar_pipeline_plan(mpar_context* ctx, const mpar_model* model, const mpar_pipeline_desc* desc,
                                       const mpar_plan_options* options, mpar_plan* out);
/* The planner's per-layer table for a model and pipeline description, as
   mpar_pipeline_plan builds it: FLOPs per micro-batch, bytes of parameters,
   optimizer state (with the backward buffer), stashed activations per
   micro-batch in flight, and the output that crosses a cut. out has one
   entry per layer. */
MPARDEF mpar_result mpar_pipeline_plan_layers(const mpar_model* model, const mpar_pipeline_desc* desc,
                                              mpar_plan_layer* out, mpar_error* err);
/* GEMM throughput of a device in FLOP/s at n = 512, through the route its
   layers take (CLBlast on OpenCL, CBLAS on the host route). */
MPARDEF mpar_result mpar_device_measure_flops(mpar_context* ctx, int device, double* flops);
/* The same for row-major C[m×n] = A[m×k]·B[k×n]: small shapes show what a
   micro-batch's GEMM gets, launch costs included. */
MPARDEF mpar_result mpar_device_measure_gemm(mpar_context* ctx, int device, size_t m, size_t n, size_t k,
                                             double* flops);
/* Seconds per micro-batch of each layer's forward, input-gradient and
   weight-gradient work on one device ([layer] arrays), measured by running
   every layer as its own stage on that device. Models of at most 64 layers. */
MPARDEF mpar_result mpar_profile_layers(mpar_context* ctx, const mpar_model* model, const mpar_pipeline_desc* desc,
                                        int device, double* forward, double* backward_input,
                                        double* backward_weight);
/* Stops the workers and frees everything the pipeline holds. NULL:
   nothing. Under MPAR_DEBUG the pipeline becomes a tombstone, freed with
   its context; until then a call on it returns MPAR_ERROR_INVALID_STATE
   ("the pipeline was destroyed", in mpar_last_error) and a second destroy
   does nothing but record that message. In a release build a second
   destroy is undefined. */
MPARDEF void mpar_pipeline_destroy(mpar_pipeline* pipeline);
/* Forward and backward over the batch's micro-batches; gradients are
   zeroed first and accumulated in micro-batch order. */
MPARDEF mpar_result mpar_pipeline_compute_gradients(mpar_pipeline* p, const mpar_batch* batch, mpar_step_info* info);
/* Clipping, then one optimizer step on every stage. */
MPARDEF mpar_result mpar_pipeline_apply_gradients(mpar_pipeline* p, mpar_step_info* info);
/* compute_gradients + apply_gradients, with the same result bit for bit.
   In one process the optimizer step is the last action of each stage's
   list: a stage posts its layers' squared gradient norms, and once every
   stage's are in (and the loss) the step is decided from all of them,
   summed in layer order, so the NaN check and clipping see the same
   global norm on every stage and for every partition; each stage then
   steps at once, without a second job. Across processes the host decides
   between a gradient job and a step job. */
MPARDEF mpar_result mpar_pipeline_train_step(mpar_pipeline* p, const mpar_batch* batch, mpar_step_info* info);
/* Forward only, streamed through the stages in micro-batches of at most
   max_batch / microbatches samples, by a forward-only schedule on the
   training schedule's placement (mpar_schedule_forward_only). outputs (optional) receives the input
   of the loss layer, [rows × its width]; loss (optional) the mean loss,
   which needs the targets the loss layer takes (without them:
   MPAR_ERROR_INVALID_ARGUMENT). One call takes at most 2^20 micro-batches
   (batch.samples up to 2^20 × ceil(max_batch / microbatches)) and
   samples × seq_len rows up to INT_MAX; more is MPAR_ERROR_INVALID_ARGUMENT. */
MPARDEF mpar_result mpar_pipeline_infer(mpar_pipeline* p, const mpar_batch* batch, float* outputs, double* loss);
MPARDEF mpar_result mpar_pipeline_get_params(mpar_pipeline* p, int layer, float* out);
MPARDEF mpar_result mpar_pipeline_set_params(mpar_pipeline* p, int layer, const float* in);
MPARDEF mpar_result mpar_pipeline_get_grads(mpar_pipeline* p, int layer, float* out);
/* Checked variants: `capacity` is how many floats the caller's buffer
   holds; a buffer too small is MPAR_ERROR_INVALID_ARGUMENT naming both
   sizes, before anything is written. The sizes: mpar_pipeline_param_size
   (a layer's parameters), mpar_pipeline_output_size (what infer writes
   for `samples` samples: samples x seq_len x the loss layer's input
   width) and mpar_pipeline_input_size (what a batch's inputs must hold:
   samples x seq_len x input_features elements, floats or int32 token
   ids; mpar_batch has no width of its own, so this is the check). */
MPARDEF mpar_result mpar_pipeline_param_size(const mpar_pipeline* p, int layer, size_t* floats);
MPARDEF mpar_result mpar_pipeline_input_size(const mpar_pipeline* p, int samples, size_t* elements);
MPARDEF mpar_result mpar_pipeline_output_size(const mpar_pipeline* p, int samples, size_t* floats);
MPARDEF mpar_result mpar_pipeline_get_params_n(mpar_pipeline* p, int layer, float* out, size_t capacity);
MPARDEF mpar_result mpar_pipeline_infer_n(mpar_pipeline* p, const mpar_batch* batch, float* outputs, size_t capacity,
                                          double* loss);

/* Per-layer training state, for checkpoints: each array has the layer's
   param_count floats. MOMENT1 is SGD's velocity or AdamW's first moment;
   MOMENT2 is AdamW's second moment (zeros for SGD). */
typedef enum mpar_state_kind {
    MPAR_STATE_PARAMS = 0,
    MPAR_STATE_GRADS = 1,
    MPAR_STATE_MOMENT1 = 2,
    MPAR_STATE_MOMENT2 = 3
} mpar_state_kind;
MPARDEF mpar_result mpar_pipeline_read_state(mpar_pipeline* p, int layer, mpar_state_kind kind, float* out);
MPARDEF mpar_result mpar_pipeline_write_state(mpar_pipeline* p, int layer, mpar_state_kind kind, const float* in);
/* Optimizer steps taken; it also seeds dropout, so restoring it resumes
   the same random stream. */
MPARDEF int mpar_pipeline_get_step(const mpar_pipeline* p);
MPARDEF mpar_result mpar_pipeline_set_step(mpar_pipeline* p, int step);
MPARDEF const mpar_model* mpar_pipeline_model(const mpar_pipeline* p);
MPARDEF const mpar_pipeline_desc* mpar_pipeline_get_desc(const mpar_pipeline* p);
/* The schedule the pipeline trains with (generated from the kind, the
   desc's schedule_lists copied, or AUTO's synthesised one): print it,
   simulate it, save its lists. Owned by the pipeline. */
MPARDEF const mpar_schedule* mpar_pipeline_get_schedule(const mpar_pipeline* p);

#define MPAR_REBALANCE_AUTO 1   /* mpar_pipeline_desc.rebalance */
#define MPAR_REBALANCE_MANUAL 2

/* The plan the pipeline runs, as a plan the caller frees with
   mpar_plan_free: its stages (device, first and last layer, recompute),
   schedule, micro-batches and virtual stages, with the planner's costs.
   A pipeline that planned itself, or was given a plan, reports that plan
   (a parsed plan without costs stays without them); one given explicit
   stages has them costed by mpar_pipeline_plan (MANUAL) on the first call,
   which measures the devices' FLOP rate (one GEMM per kind of device);
   across processes, or where the planner cannot cost them, the ranges
   alone. After a re-balancing move, the plan it moved to, costed with the
   speeds it measured (or was given). */
MPARDEF mpar_result mpar_pipeline_get_plan(mpar_pipeline* p, mpar_plan* out);
/* Re-plans now (a pipeline created with desc.rebalance): mpar_pipeline_plan
   on the pipeline's devices, in their order, with device_flops (FLOP/s per
   context device; NULL: the speeds measured, each stage's planner FLOPs
   over its least compute time per step since the last re-plan, blended
   with the earlier re-plans' at half weight each), and the link and
   reserve settings of the desc's plan_options; it moves the layers when
   the new plan's predicted step beats the current stages' by more than
   desc.rebalance_threshold. *moved (optional) says whether it
   moved. A move that fails is undone: the pipeline goes on with its old
   stages and state, and the error says why; should rebuilding the old
   stages fail too, the pipeline refuses every call but destroy with
   MPAR_ERROR_INVALID_STATE. Errors: MPAR_ERROR_INVALID_STATE (created
   without rebalance, nothing measured yet, or damaged),
   MPAR_ERROR_INVALID_ARGUMENT (a speed not positive and finite). */
MPARDEF mpar_result mpar_pipeline_rebalance(mpar_pipeline* p, const double* device_flops, int* moved);

/* ==========================================================================
   7-8b. Generation: autoregressive decoding with a key/value cache.
   ========================================================================== */

/* A pipeline made with mpar_pipeline_desc.generate_sequences > 0 keeps, on
   each device, the keys and values of every decoder block it holds for
   generate_sequences sequences of generate_context positions (allocated at
   create and counted in mpar_pipeline_memory: 2 x sequences x context x
   width floats per block). mpar_pipeline_generate then runs prompts
   through the stages:
   - prefill: each prompt is one micro-batch (its rows are its tokens), so
     several prompts are in flight at once, one per stage;
   - decode: the sequences are split into `groups` (sequence i in group
     i mod groups); a group's micro-batch is one row per live sequence of
     the group (its last token at its position), and the groups take turns
     through the stages, so with groups >= stages every stage works: group
     g+1's forward runs on stage 0 while group g's runs on stage 1.
   The last stage samples each sequence's next token from the logits (the
   output of the last layer before the loss) and sends the group back to
   stage 0; host memory carries the activations between stages.
   The model must be an embedding (token input, positions) followed by
   layers that work row by row (linear, relu, gelu, tanh, dropout, which
   is the identity here, layernorm) and decoder blocks, with an optional
   loss last; the last layer before the loss gives one logit per token of
   the embedding's vocabulary. Context: positions come from the
   embedding's table, so generate_context is at most the model's seq_len
   [0: seq_len]; a sequence stops when its prompt and new tokens fill the
   context (MPAR_GENERATE_FINISH_CONTEXT), and a prompt must leave room for
   one new token (length below generate_context).
   Greedy decoding computes what a full forward of the whole prefix
   (mpar_pipeline_infer) computes for its last position, up to the
   rounding of GEMMs of other row counts. */
typedef enum mpar_generate_finish {
    MPAR_GENERATE_FINISH_LENGTH = 0,  /* max new tokens reached (also: 0 asked) */
    MPAR_GENERATE_FINISH_STOP = 1,    /* a stop token was produced (it is in the output) */
    MPAR_GENERATE_FINISH_CONTEXT = 2  /* prompt + new tokens filled generate_context */
} mpar_generate_finish;

/* Zero fields take the defaults in brackets. */
typedef struct mpar_generate_desc {
    int sequences;                  /* prompts, 1 .. pd.generate_sequences */
    const int32_t* const* prompts;  /* [sequences] token arrays, each token in [0, vocab) */
    const int* prompt_lengths;      /* [sequences], each in [1, generate_context - 1] */
    /* New tokens per sequence: max_new_tokens[i], or max_new for every
       sequence when max_new_tokens is NULL; 0 generates nothing. */
    const int* max_new_tokens;
    int max_new;
    const int32_t* stop_tokens;     /* a sequence ends after producing one of these */
    int stop_count;
    /* Sampling: temperature 0 is greedy (argmax, the lowest index on a
       tie); above 0 the next token is drawn from softmax(logits /
       temperature) over the top_k largest logits [0: all], with a random
       stream per sequence seeded from (seed, sequence index): the same
       seed gives the same tokens on any number of stages or groups. */
    float temperature;
    int top_k;
    uint64_t seed;
    int groups;                     /* decode groups [min(sequences, device stages)] */
    /* Streaming (optional): called with each token as it is produced, in
       order within a sequence, on one of the pipeline's worker threads
       (never two calls at once); it must not call into the pipeline. */
    void (*on_token)(void* user, int sequence, int token);
    void* user;
    /* Results (each optional): outputs[i] receives sequence i's new tokens
       (room for its max new tokens), output_lengths[i] their count,
       finish[i] why it stopped. */
    int32_t* const* outputs;
    int* output_lengths;
    mpar_generate_finish* finish;
} mpar_generate_desc;

typedef struct mpar_generate_stats {
    int64_t prompt_tokens;     /* tokens prefilled */
    int64_t new_tokens;        /* tokens generated (the first of each sequence comes from its prefill) */
    int64_t decode_tokens;     /* tokens generated by decode steps (new_tokens less the first ones) */
    double seconds;            /* the whole call's generation */
    double prefill_seconds;    /* until every prompt's first token was out */
    double decode_seconds;     /* the rest */
    int stages;
    double stage_busy_seconds[64]; /* per device stage: host time in its forwards (waits left out) */
} mpar_generate_stats;

/* Generates from g->sequences prompts; stats optional. Errors:
   MPAR_ERROR_INVALID_STATE (created without generate_sequences, another
   call running, a damaged pipeline), MPAR_ERROR_INVALID_ARGUMENT naming
   the field (a count out of range, a NULL array, a prompt too long for
   the context, a token outside the vocabulary, a negative temperature),
   a stage's failure as other jobs report it (the outputs then hold what
   was produced). At create: generate_sequences or generate_context out of
   range, MPAR_ERROR_INVALID_ARGUMENT; a model generation cannot run,
   MPAR_ERROR_INVALID_MODEL; with mpi_comm, rebalance or a device that
   runs two stages (virtual stages), MPAR_ERROR_UNSUPPORTED; a cache that
   does not fit, MPAR_ERROR_DOES_NOT_FIT naming the device and the bytes,
   before anything is allocated. */
MPARDEF mpar_result mpar_pipeline_generate(mpar_pipeline* p, const mpar_generate_desc* g, mpar_generate_stats* stats);

/* ==========================================================================
   9. Observability: what each stage did during a step, on one clock.
   ========================================================================== */

typedef enum mpar_event_kind {
    MPAR_EVENT_FORWARD = 0,
    MPAR_EVENT_BACKWARD = 1,        /* a B action (input and weight gradients) */
    MPAR_EVENT_BACKWARD_INPUT = 2,  /* an I action (zero-bubble) */
    MPAR_EVENT_BACKWARD_WEIGHT = 3, /* a W action (zero-bubble) */
    MPAR_EVENT_OPTIMIZER_STEP = 4,
    MPAR_EVENT_SEND = 5,    /* copying a tensor into a link */
    MPAR_EVENT_RECEIVE = 6, /* copying a tensor out of a link */
    MPAR_EVENT_WAIT = 7     /* blocked on a link: the neighbour was not ready */
} mpar_event_kind;

typedef struct mpar_event {
    mpar_event_kind kind;
    int stage;      /* device stage (worker) */
    int microbatch; /* -1 for the optimizer step */
    int chunk;      /* virtual stage on this device (interleaved), else 0 */
    int boundary;   /* links: between virtual stage `boundary` and the next; else -1 */
    int gradient;   /* links: 1 when carrying gradients backwards */
    double start;   /* seconds since the step began, one host clock for all devices */
    double end;
    uint64_t bytes; /* links: bytes moved */
} mpar_event;

typedef struct mpar_timeline {
    int stages, virtual_stages, microbatches;
    mpar_schedule_kind schedule;
    /* The schedule that ran (a copy, freed by mpar_timeline_free): the
       analysis takes chunk placement and the lists from it. NULL in a
       timeline built by hand: made from schedule, stages, microbatches
       and virtual_stages. */
    mpar_schedule* schedule_lists;
    double step_time; /* seconds: step start to the last event's end */
    int event_count;
    mpar_event* events; /* by stage, then start time */
    size_t device_bytes[64]; /* buffers allocated per stage */
    /* What events came from (the context's allocator), for
       mpar_timeline_free; the analysis functions (9b) take their scratch and
       the schedules and simulations they return from it too. All NULL:
       MPAR_MALLOC, so zero-initialise a timeline built by hand. */
    mpar_allocator allocator;
} mpar_timeline;

/* The timeline of the last training step (compute + apply) or inference
   call; needs mpar_pipeline_desc.profile. Compute times come from OpenCL
   profiling events mapped onto the host clock; link times from the host.
   Free with mpar_timeline_free. */
MPARDEF mpar_result mpar_pipeline_get_timeline(mpar_pipeline* p, mpar_timeline* out);
MPARDEF void mpar_timeline_free(mpar_timeline* t);
/* ==========================================================================
   9b. Timeline analysis (pure C, no OpenCL): what a recorded step tells,
       and three ways to look at it.

   Input is an mpar_timeline (mpar_pipeline_get_timeline, or one built by
   hand and zero-initialised first: every function here reads only the
   struct, and allocates from its `allocator`). From it:
   - mpar_timeline_get_stats: per stage busy (compute events: F, B, I, W and
     the optimizer step), transfer (SEND + RECEIVE copies), wait (WAIT: the
     worker blocked on a link) and idle = step - busy - transfer (waits are
     part of idle); measured bubble = 1 - sum(busy) / (stages * step), the
     simulator's definition; the slowest (most busy) stage; device memory.
     mpar_timeline_get_link_stats: per link direction, bytes, copy times and
     achieved bandwidth = bytes / (send + receive copy time), the rate of the
     whole move from one device to the next.
   - mpar_timeline_simulate / mpar_timeline_predict: the schedule of the
     timeline run through mpar_simulate with the measured costs, so the
     predicted bubble sits next to the measured one. Costs per virtual stage
     are means per action: F, B (both of its parts), I, W; the executor's
     link copies block its worker, so each copy is charged to the action that
     makes it (activations to the F of the sender and of the receiver,
     gradients to the B / I). The link delay of a boundary is the mean
     hand-off latency: for every receive that had to wait, the time from the
     end of the send to the start of the receive. The optimizer step per
     stage is the sum of its two OPTIMIZER_STEP events. What the lists leave
     out is modelled as the executor does it: a B recorded as its two parts
     (input gradient, then the send, then weight gradient: every B of a
     pipeline's timeline) is simulated as I then W, so the stage before gets
     the gradient when the first part ends; with the optimizer step recorded
     as its two events (norms, then update), every stage's update waits for
     the last stage's norms; and the simulated step starts at the step's
     first event, as no stage starts before the workers wake. The predicted
     bubble uses the measured compute time over the simulated step (same definition
     as the measured bubble; the simulation's own bubble_fraction counts the
     copies as busy).
   - mpar_timeline_check: the invariants a recorded training or inference
     step must satisfy (no overlapping compute on a stage, dependencies in
     time, one forward per virtual stage and micro-batch, each receive after
     its send ...). Comparisons between a device clock and the host clock, or
     between two devices, allow `clock_tolerance` seconds of mapping error.
   - mpar_timeline_print_gantt (terminal), mpar_timeline_write_svg,
     mpar_timeline_write_chrome_trace (chrome://tracing, ui.perfetto.dev).
   ========================================================================== */
#ifndef MPAR_PART_TIMELINE_DECL
#define MPAR_PART_TIMELINE_DECL

#define MPAR_TIMELINE_MAX_STAGES 64 /* as mpar_timeline.device_bytes */

typedef struct mpar_timeline_stage_stats {
    double busy;         /* seconds in compute events (F, B, I, W, optimizer) */
    double transfer;     /* seconds in SEND and RECEIVE copies */
    double wait;         /* seconds blocked on a link (part of idle) */
    double idle;         /* step - busy - transfer, at least 0 */
    double overhead;     /* idle - wait, at least 0: in no event at all (the worker
                            enqueueing, synchronising, or not scheduled) */
    int compute_events;
    size_t device_bytes; /* buffers allocated on the stage's device */
} mpar_timeline_stage_stats;

typedef struct mpar_timeline_stats {
    int stages;
    double step_time;       /* seconds (the timeline's, else the last event's end) */
    double busy_total;      /* sum of busy over stages */
    double bubble_fraction; /* 1 - busy_total / (stages * step_time) */
    double utilisation;     /* 1 - bubble_fraction */
    int slowest_stage;      /* most busy */
    size_t peak_device_bytes;
    mpar_timeline_stage_stats stage[MPAR_TIMELINE_MAX_STAGES];
} mpar_timeline_stats;

/* One direction of the link at `boundary` (between virtual stages boundary
   and boundary+1): activations (gradient 0) or gradients (gradient 1). */
typedef struct mpar_timeline_link_stats {
    int boundary, gradient;
    int from_stage, to_stage; /* device stages of the sender and the receiver */
    int messages;             /* SEND events */
    int received;             /* RECEIVE events */
    uint64_t bytes;           /* bytes sent */
    double send_time;         /* seconds in SEND copies */
    double receive_time;      /* seconds in RECEIVE copies */
    double send_wait;         /* sender blocked: link full */
    double receive_wait;      /* receiver blocked: nothing sent yet */
    double bandwidth;         /* bytes / (send_time + receive_time), bytes/s; 0 without copies */
    double handoff_latency;   /* mean send end -> receive start over receives that waited; 0 if none */
} mpar_timeline_link_stats;

typedef struct mpar_timeline_prediction {
    double step_time;                /* simulated, seconds */
    double bubble_fraction;          /* 1 - measured busy / (stages * simulated step) */
    double measured_step_time;
    double measured_bubble_fraction;
} mpar_timeline_prediction;

/* err may be NULL in every function here. Bad timelines (stage, kind,
   micro-batch, chunk or boundary out of range, end < start, NaN) give
   MPAR_ERROR_INVALID_ARGUMENT. */
MPARDEF mpar_result mpar_timeline_get_stats(const mpar_timeline* t, mpar_timeline_stats* out, mpar_error* err);
/* Link directions: 2 * (stages * virtual_stages - 1), boundaries 0 .. count/2-1. */
MPARDEF int mpar_timeline_link_count(const mpar_timeline* t);
MPARDEF mpar_result mpar_timeline_get_link_stats(const mpar_timeline* t, int boundary, int gradient,
                                                 mpar_timeline_link_stats* out, mpar_error* err);

/* Builds the timeline's schedule (mpar_schedule_create with its kind, P, M,
   V) and simulates it with the measured costs (see above); the schedule
   returned is the one simulated (B split into I and W when the timeline
   recorded each B as its two parts). Either output may be NULL; the caller
   destroys what it receives (both made with the timeline's allocator). */
MPARDEF mpar_result mpar_timeline_simulate(const mpar_timeline* t, mpar_schedule** schedule, mpar_simulation** sim,
                                           mpar_error* err);
/* mpar_timeline_simulate, reduced to predicted vs measured step and bubble. */
MPARDEF mpar_result mpar_timeline_predict(const mpar_timeline* t, mpar_timeline_prediction* out, mpar_error* err);

/* MPAR_ERROR_INVALID_SCHEDULE with the first broken invariant named, e.g.
   "stage 1: I3 starts at 4.102 ms, before F3 (stage 1) ends (4.350 ms)". A timeline
   with no backward events is checked as an inference call. */
MPARDEF mpar_result mpar_timeline_check(const mpar_timeline* t, double clock_tolerance, mpar_error* err);

/* Terminal Gantt chart, `columns` time slices (<= 0: 80). Two lines per
   stage: the first says what the stage did for at least half of the slice
   (F forward, B backward, I input gradient, W weight gradient, O optimizer;
   lower case for odd chunks when there are several), else the longest of
   '~' copying over a link, '-' blocked on a link, '.' idle; the second line
   gives the micro-batch under each compute cell (0-9, a-z, A-Z, then
   round again). With more than one chunk per stage a third line, "chunk",
   gives the chunk under each compute cell and ends with the virtual stage
   each chunk is (" chunk = virtual stage: 0=0, 1=7" for stage 0 of a
   4-stage ZB-V). A header with the time axis, a legend and per-stage busy
   share come with it.
   Where a virtual stage runs is read from the timeline: a link copy is
   recorded on the stage at its end of the boundary; a virtual stage with
   no copy next to it (both neighbours on its stage) is placed as the
   schedule kind places it (ZB-V: a V, otherwise vs mod stages). The stats,
   the trace and the SVG use the same rule. */
MPARDEF void mpar_timeline_print_gantt(const mpar_timeline* t, FILE* out, int columns);
/* Stage and link tables, measured vs predicted step and bubble. */
MPARDEF void mpar_timeline_print_stats(const mpar_timeline* t, FILE* out);

/* Chrome trace JSON (Trace Event Format, "X" events in microseconds): one
   track per stage (its compute, copies and waits) and one per link
   direction (its copies), named by metadata events ("stage 0 (virtual
   stages 0, 7)" with chunks, "link 3: stage 3 -> 3 activations").
   Compute slices are named as mpar_action_format names actions (F3.1 =
   micro-batch 3, chunk 1, with chunks) and carry stage, chunk and
   virtual_stage in their args. A slice that runs into
   the next one of its track (device times are mapped onto the host clock
   with an error of a few microseconds) is cut where that one starts, so no
   two slices of a track overlap; args keep the recorded times.
   MPAR_ERROR_IO when the stream reports an error. */
MPARDEF mpar_result mpar_timeline_write_chrome_trace(const mpar_timeline* t, FILE* out);
/* A self-contained SVG: one lane per stage with boxes coloured by kind and
   labelled with the micro-batch, copies and waits as thin bars under them,
   a time axis in ms, a legend, and the schedule, measured and predicted
   bubble in the title. With chunks the boxes are labelled m.c (chunk c),
   later chunks drawn lighter, and each lane names its virtual stages
   ("vs 0, 7"). */
MPARDEF mpar_result mpar_timeline_write_svg(const mpar_timeline* t, FILE* out);

#endif /* MPAR_PART_TIMELINE_DECL */


/* ==========================================================================
   10. Checkpoints: parameters and optimizer state, one file, written atomically.
   ========================================================================== */
/* ==========================================================================
   10. Checkpoints: a pipeline's whole training state in one file, saved
       atomically and checked completely before any of it is used.

   The state is kept per layer, never per stage, so a checkpoint saved from
   one partition (stages, devices, schedule) loads into any other partition
   of the same model. It holds what resuming needs to continue bit for bit:
   the parameters, the optimizer moments and the step counter (which also
   seeds dropout, together with the model seed).

   File format, version 1. Every integer is little-endian, every array is
   IEEE-754 binary32 little-endian (a big-endian host converts on the way in
   and out). All offsets are bytes from the start of the file.

   Header, 64 bytes:
       0  8  magic "MPARCKPT"
       8  4  format version (1)
      12  4  header size (64)
      16  4  writer's mpar version: major << 16 | minor << 8 | patch
      20  4  byte-order mark 0x01020304 (bytes 04 03 02 01)
      24  8  file size in bytes, trailer included
      32  4  layer count L (at least 1)
      36  4  optimizer kind (0 AdamW, 1 SGD)
      40  8  step: optimizer steps taken (at most INT_MAX)
      48  8  model seed
      56  4  model input_features
      60  4  model seq_len
   Layer table, L records in model order, each 56 bytes + its name:
      +0  4  record size: 56 + name length rounded up to a multiple of 8
      +4  4  type name length n, 1..255
      +8  4  in_features          +12  4  out_features
     +16  8  param_count P
     +24  8  offset of this layer's data block
     +32  4  units   +36 4 vocab   +40 4 heads   +44 4 hidden (int32)
     +48  4  rate (binary32)       +52 4 eps (binary32)
     +56  n  type name (no NUL), then zeros up to the record size
   Table checksum, 8 bytes: checksum of bytes [0, end of the table).
   Data, one block per layer in model order, each following the previous
   (the first right after the table checksum):
       PARAMS[P], MOMENT1[P], MOMENT2[P] as binary32 (12·P bytes; MOMENT2
       is zeros for SGD), then 8 bytes: checksum of those 12·P bytes.
   Trailer, 16 bytes:
       "MPAR-END", then the checksum of every byte before it.
   The layout is canonical: every size, offset and padding byte has exactly
   one valid value, so the parser accepts no other arrangement.

   Checksum ("mpar64"): h = 0x6D70617263686B31; for each whole 8-byte
   little-endian word w: h = mix(h ^ w); then the remaining 0-7 bytes,
   zero-padded to a word t: h = mix(h ^ t); finally h = mix(h ^ length).
   mix(x): x *= 0x9E3779B97F4A7C15; x ^= x >> 29; x *= 0xBF58476D1CE4E5B9;
   x ^= x >> 32. Every step is a bijection of h, so any change confined to
   one 8-byte word (every single-byte error) always changes the checksum.

   Saving writes a fresh temporary file beside `path` (".mpar-<pid>-" and
   six characters mkstemp picks, so it never opens an existing file or
   follows a link),
   fsyncs it, renames it over `path` and fsyncs the folder: a crash at any
   moment leaves the old file or the new one at `path`, never a mix. A
   temporary file left by a crash is removed by the next save in that
   folder once its process is gone.
   Loading reads the whole file, checks everything (the trailer checksum
   first, then the layout, the section checksums, then that the model and
   optimizer match the pipeline's) and only then writes the state; the
   pipeline's previous state is kept on the host meanwhile and put back if
   a device write fails, so a load changes all or nothing.
   ========================================================================== */
#ifndef MPAR_PART_CHECKPOINT_DECL
#define MPAR_PART_CHECKPOINT_DECL

#define MPAR_CHECKPOINT_FORMAT_VERSION 1
#define MPAR_WEIGHTS_FORMAT_VERSION 2 /* weights only: see mpar_pipeline_save_weights */
#define MPAR_CHECKPOINT_MAX_NAME 255

/* One layer as a checkpoint describes it. */
typedef struct mpar_checkpoint_layer {
    char type_name[MPAR_CHECKPOINT_MAX_NAME + 1];
    int in_features, out_features;
    int units, vocab, heads, hidden; /* the layer descriptor's fields */
    float rate, eps;
    size_t param_count;
    /* Byte offsets into the checkpoint of PARAMS, MOMENT1 and MOMENT2
       (each param_count little-endian binary32 values), and of the block's
       checksum. */
    size_t params_offset, moment1_offset, moment2_offset, checksum_offset;
} mpar_checkpoint_layer;

/* What mpar_checkpoint_parse found. */
typedef struct mpar_checkpoint_info {
    unsigned format_version;
    unsigned mpar_version; /* of the writer: major << 16 | minor << 8 | patch */
    size_t size;           /* bytes, the whole file */
    int input_features, seq_len;
    uint64_t seed;
    mpar_optimizer_kind optimizer;
    int step;
    int layer_count;
    mpar_checkpoint_layer* layers; /* [layer_count]; freed by mpar_checkpoint_info_free */
    mpar_allocator allocator;      /* what layers came from, for mpar_checkpoint_info_free */
    int weights_only; /* a weights file (format version 2): PARAMS only, step 0, `optimizer` meaningless */
} mpar_checkpoint_info;

/* Checks a checkpoint held in memory (no device needed) and describes it.
   Any input is safe: nothing outside [data, data + size) is read and no
   allocation exceeds a few times `size`. MPAR_ERROR_CORRUPT says what is
   wrong and at which byte offset; MPAR_ERROR_UNSUPPORTED is an intact file
   of a newer format version. `info` may be NULL; on success it must be
   released with mpar_checkpoint_info_free, on failure it holds nothing. */
MPARDEF mpar_result mpar_checkpoint_parse(const void* data, size_t size, mpar_checkpoint_info* info,
                                          mpar_error* err);
/* mpar_checkpoint_parse with info->layers from `allocator` (NULL or all
   NULL: MPAR_MALLOC), which info keeps for mpar_checkpoint_info_free. */
MPARDEF mpar_result mpar_checkpoint_parse_with(const mpar_allocator* allocator, const void* data, size_t size,
                                               mpar_checkpoint_info* info, mpar_error* err);
MPARDEF void mpar_checkpoint_info_free(mpar_checkpoint_info* info);
/* Copies one layer's PARAMS, MOMENT1 or MOMENT2 (param_count floats) out
   of a checkpoint parsed into `info`, converting to the host's byte order. */
MPARDEF mpar_result mpar_checkpoint_get_state(const void* data, size_t size, const mpar_checkpoint_info* info,
                                              int layer, mpar_state_kind kind, float* out, mpar_error* err);
/* MPAR_SUCCESS if the checkpoint was saved from this model (layer by layer:
   type, shapes, parameter counts, descriptor fields; seq_len and seed) with
   this optimizer kind; MPAR_ERROR_MISMATCH naming the first difference. */
MPARDEF mpar_result mpar_checkpoint_match(const mpar_checkpoint_info* info, const mpar_model* model,
                                          mpar_optimizer_kind optimizer, mpar_error* err);
/* Saves the pipeline's parameters, optimizer moments and step to `path`,
   atomically (see above). File errors: MPAR_ERROR_IO naming the path and
   the system's reason; the file at `path` is then the one before.
   Across processes (desc.mpi_comm): every rank calls it, with the same
   path. Each rank sends the state of the layers it runs to rank 0, which
   alone writes the file, in the same format as one process (any pipeline
   loads it: other stages, another rank count, one process; no shared file
   system is needed). Rank 0 creates the temp file only after every rank's
   part arrived, and renames it over `path` only when complete; then it
   tells every rank the outcome, so that all return the same result: the
   first failure (rank 0's own first, then by rank) with its message,
   naming the rank, or MPAR_SUCCESS. After any failure, on any rank, the
   file at `path` is the one before. No wait blocks for good: each is
   bounded by timeout_seconds (twice that for rank 0's answer, which comes
   after the file is written); a rank that does not come in time makes
   the call return MPAR_ERROR_TIMEOUT naming the rank waited for. One MPI
   message carries a rank's part (or, at a load, the file): more than
   2 GiB of it is MPAR_ERROR_UNSUPPORTED for now. */
MPARDEF mpar_result mpar_pipeline_save_checkpoint(mpar_pipeline* p, const char* path, mpar_error* err);
/* Restores a checkpoint saved from the same model with any partition.
   MPAR_ERROR_IO (cannot read), MPAR_ERROR_CORRUPT (fails its checks),
   MPAR_ERROR_MISMATCH (another model or optimizer): the pipeline is then
   unchanged.
   Across processes (desc.mpi_comm): every rank calls it. Rank 0 alone
   reads `path` (other ranks need no copy) and sends the file to every
   rank; each checks all of it and prepares the layers it runs, changing
   nothing; the ranks agree through rank 0, and only if every rank is
   ready does each apply its layers and the step. If applying fails on any
   rank, every rank puts its previous state back. Every rank returns the
   same result (the first failure, naming the rank); waits are bounded as
   for a save. */
MPARDEF mpar_result mpar_pipeline_load_checkpoint(mpar_pipeline* p, const char* path, mpar_error* err);

/* Weights files (format version 2): the checkpoint layout with PARAMS
   alone for each layer, optimizer kind 2 ("none") and step 0: what a
   deployed model needs. Saving is atomic as for checkpoints, works from an
   inference_only pipeline, and across MPI ranks as save_checkpoint does.
   Loading takes a weights file or a checkpoint (its parameters alone)
   into a pipeline whose model has the same structure (layer types,
   shapes, descriptor fields, seq_len), whatever its seed, optimizer or
   partition, inference_only or not. The optimizer's moments start from
   zero; the step counter is kept. All or nothing, as load_checkpoint.
   Errors as for checkpoints; load_checkpoint of a weights file into a
   pipeline that trains is MPAR_ERROR_MISMATCH (nothing to resume). An
   inference_only pipeline's load_checkpoint also matches the structure
   alone. */
MPARDEF mpar_result mpar_pipeline_save_weights(mpar_pipeline* p, const char* path, mpar_error* err);
MPARDEF mpar_result mpar_pipeline_load_weights(mpar_pipeline* p, const char* path, mpar_error* err);

/* The model a checkpoint or weights file describes, built layer by layer
   from the file's own description (types by name, shapes, descriptor
   fields, input_features, seq_len, seed), ready for a pipeline that then
   loads the file. Built-in layer types are known by name; a file with
   user-defined types names them in `types` (type_count entries, matched by
   mpar_layer_type.name; NULL, 0 when there are none). Errors: MPAR_ERROR_IO
   (cannot read), MPAR_ERROR_CORRUPT, MPAR_ERROR_UNSUPPORTED (a layer type
   neither built in nor in `types`, named), MPAR_ERROR_INVALID_MODEL (the
   description does not make a model), MPAR_ERROR_INVALID_ARGUMENT. */
MPARDEF mpar_result mpar_model_from_checkpoint(const char* path, const mpar_layer_type* const* types, int type_count,
                                               mpar_model** out, mpar_error* err);
/* The same from a file held in memory. */
MPARDEF mpar_result mpar_model_from_checkpoint_data(const void* data, size_t size, const mpar_layer_type* const* types,
                                                    int type_count, mpar_model** out, mpar_error* err);

#endif /* MPAR_PART_CHECKPOINT_DECL */

MPARDEF mpar_result mpar_pipeline_get_stats(const mpar_pipeline* p, mpar_pipeline_stats* out);

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

/* Allocation through an mpar_allocator; NULL or all NULL: MPAR_MALLOC and
   friends. Objects keep the allocator they were made with and free
   through it. */
static void* mpar__alloc_a(const mpar_allocator* a, size_t size) {
    if (a && a->alloc) return a->alloc(a->user, size);
    return MPAR_MALLOC(size);
}
static void mpar__free_a(const mpar_allocator* a, void* p) {
    if (!p) return;
    if (a && a->free) a->free(a->user, p);
    else MPAR_FREE(p);
}
static void* mpar__realloc_a(const mpar_allocator* a, void* p, size_t size) {
    if (a && a->realloc) return a->realloc(a->user, p, size);
    return MPAR_REALLOC(p, size);
}
/* All three functions or none (NULL counts as none). */
static int mpar__allocator_ok(const mpar_allocator* a) {
    return !a || (a->alloc && a->realloc && a->free) || (!a->alloc && !a->realloc && !a->free);
}
/* A copy to keep in an object: all NULL for NULL. */
static mpar_allocator mpar__allocator_copy(const mpar_allocator* a) {
    mpar_allocator c;
    if (a) return *a;
    memset(&c, 0, sizeof c);
    return c;
}

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
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

/* Live tags. Every context, model and pipeline carries one, checked at
   its public entry points; destroy replaces it with MPAR__DEAD. Under
   MPAR_DEBUG destroy keeps the object's struct as a tombstone (its
   contents freed), so that a later call on it finds MPAR__DEAD and returns
   MPAR_ERROR_INVALID_STATE instead of reading freed memory. */
#define MPAR__LIVE_CONTEXT 0x6d706378u  /* "mpcx" */
#define MPAR__LIVE_MODEL 0x6d706d64u    /* "mpmd" */
#define MPAR__LIVE_PIPELINE 0x6d70706cu /* "mppl" */
#define MPAR__DEAD 0xdeadbeefu
#ifdef MPAR_DEBUG
/* Tombstones of contexts and models have no owner left to free them: a
   debug build keeps them on purpose, and tells LeakSanitizer so. */
#if defined(__SANITIZE_ADDRESS__)
#define MPAR__LSAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define MPAR__LSAN 1
#endif
#endif
#ifdef MPAR__LSAN
#include <sanitizer/lsan_interface.h>
#define MPAR__KEEP_TOMBSTONE(p) __lsan_ignore_object(p)
#else
#define MPAR__KEEP_TOMBSTONE(p) ((void)(p))
#endif
#endif

/* --------------------------------------------------------------------------
   1. Basics
   -------------------------------------------------------------------------- */

#ifdef O_CLOEXEC
#define MPAR__O_CLOEXEC O_CLOEXEC
#else
#define MPAR__O_CLOEXEC 0
#endif
#ifdef O_NOFOLLOW
#define MPAR__O_NOFOLLOW O_NOFOLLOW
#else
#define MPAR__O_NOFOLLOW 0
#endif

/* mkstemp replaces these six characters with its own. */
#define MPAR__MKSTEMP_TEMPLATE "XXXXXX"

/* The folder part of path ("." when it has none) into out. */
static void mpar__dir_of(const char* path, char* out, size_t size) {
    const char* slash = strrchr(path, '/');
    size_t n = slash ? (size_t)(slash - path) : 1;
    if (slash && n == 0) n = 1; /* "/file" */
    if (n >= size) n = size - 1;
    memcpy(out, slash ? path : ".", n);
    out[n] = '\0';
}

/* The temporary file name for folder dir and process pid into out:
   "<dir>/.mpar-<pid>-XXXXXX" (mkstemp's template). -1 when it does not
   fit. */
static int mpar__tmp_name(const char* dir, long pid, char* out, size_t size) {
    int n = snprintf(out, size, "%s/.mpar-%ld-%s", dir, pid, MPAR__MKSTEMP_TEMPLATE);
    return n >= 0 && (size_t)n < size ? 0 : -1;
}

/* The process id in a folder entry's name when the name is exactly what
   mpar__tmp_name and mkstemp make: ".mpar-", a pid in decimal (no sign,
   space or leading zero, 1 to INT_MAX), '-', then six letters or digits.
   -1 for any other name: only those are ever removed as leftovers. */
static long mpar__leftover_pid(const char* name) {
    long pid = 0;
    int i;
    const char* c;
    if (strncmp(name, ".mpar-", 6) != 0) return -1;
    c = name + 6;
    if (*c < '1' || *c > '9') return -1;
    for (; *c >= '0' && *c <= '9'; c++) {
        if (pid > (INT_MAX - (*c - '0')) / 10) return -1; /* pid_t is an int */
        pid = pid * 10 + (*c - '0');
    }
    if (*c++ != '-') return -1;
    for (i = 0; i < 6; i++)
        if (!((c[i] >= 'a' && c[i] <= 'z') || (c[i] >= 'A' && c[i] <= 'Z') || (c[i] >= '0' && c[i] <= '9'))) return -1;
    return c[6] == '\0' ? pid : -1;
}

/* Every file mpar writes (checkpoints, the kernel cache, the profile
   cache) is written to a fresh temporary file beside its target and
   renamed over it when complete, so a reader sees the old file or the new
   one. The temporary file is "<folder>/.mpar-<pid>-" plus six characters
   mkstemp picks: created exclusively, so neither an existing file nor a planted
   link is ever opened or followed, and short, so a target whose name is
   NAME_MAX long still works. Temporary files of processes that no longer
   exist (a crash, a kill) are removed first: only names of exactly that
   form, regular files owned by this user. Returns the descriptor (mode
   0644), or -1 with errno set; tmp (size >= strlen(path) + 40) receives
   the name. */
static int mpar__tmp_create(const char* path, char* tmp, size_t size) {
    char dir[4096];
    DIR* d;
    struct dirent* e;
    int fd;
    mpar__dir_of(path, dir, sizeof dir);
    if (strlen(dir) + 40 > size || strlen(dir) + 40 > sizeof dir) {
        errno = ENAMETOOLONG;
        return -1;
    }
    if ((d = opendir(dir)) != NULL) { /* leftovers of dead processes */
        while ((e = readdir(d)) != NULL) {
            const char* n = e->d_name;
            long pid = mpar__leftover_pid(n);
            char old[4096 + 300];
            struct stat st;
            if (pid <= 0) continue;
            if (kill((pid_t)pid, 0) == 0 || errno != ESRCH) continue; /* alive, or not ours to judge */
            snprintf(old, sizeof old, "%s/%s", dir, n);
            if (lstat(old, &st) == 0 && S_ISREG(st.st_mode) && st.st_uid == geteuid()) unlink(old);
        }
        closedir(d);
    }
    if (mpar__tmp_name(dir, (long)getpid(), tmp, size) != 0) {
        errno = ENAMETOOLONG;
        return -1;
    }
    fd = mkstemp(tmp);
    if (fd < 0) return -1;
    if (fchmod(fd, 0644) != 0) {
        int err = errno;
        close(fd);
        unlink(tmp);
        errno = err;
        return -1;
    }
#if defined(FD_CLOEXEC)
    fcntl(fd, F_SETFD, fcntl(fd, F_GETFD) | FD_CLOEXEC);
#endif
    return fd;
}

/* Opens a file to read, refusing anything but a regular file without
   blocking on it (a FIFO in a file's place would block open). -1 with
   errno set (EINVAL: not a regular file). */
static int mpar__open_regular(const char* path, struct stat* st) {
    int fd = open(path, O_RDONLY | O_NONBLOCK | MPAR__O_CLOEXEC);
    if (fd < 0) return -1;
    if (fstat(fd, st) != 0 || !S_ISREG(st->st_mode)) {
        int err = S_ISREG(st->st_mode) ? errno : EINVAL;
        close(fd);
        errno = err;
        return -1;
    }
    return fd;
}

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
#define MPAR__MAX_SINKS 256 /* worker threads of all pipelines on one context */

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
    size_t host_align; /* host route: alignment of buffer memory, bytes */
    int pocl;          /* PoCL's device: first runs of a kernel one thread at a time */
} mpar__device;

struct mpar_context {
    unsigned live; /* MPAR__LIVE_CONTEXT; MPAR__DEAD once destroyed (MPAR_DEBUG) */
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
    pthread_mutex_t lock; /* guards error, retired, sinks, programs, stats */
    /* The last error detail of a call made on this context (never NULL
       after create). Each message is written once and never changed; the
       16 before it stay allocated, so a pointer from mpar_last_error stays
       valid while other threads fail. */
    char* error;
    char* retired[16];
    int retired_next;
    /* Worker threads of pipelines on this context: a failure inside one
       goes to that worker's own buffer, not to `error` (the pipeline call
       that ran the job assembles its message from them). */
    struct {
        pthread_t thread;
        char* buf;
        size_t cap;
    } sinks[MPAR__MAX_SINKS];
    int sink_count;
    /* PoCL's kernel loader is not safe when two threads load a kernel for
       the first time at once: first runs on this context's PoCL devices
       take this lock (see mpar__serial_begin). */
    pthread_mutex_t first_run_lock;
    int fault_kind, fault_stage, fault_step, fault_nth; /* mpar_set_fault; kind 0: none */
    /* Tests only: pipelines across processes skip comparing the ranks'
       descriptions at create, so that the checks of each received
       message's size can be reached. */
    int test_skip_digest;
    struct mpar_pipeline* tombstones; /* MPAR_DEBUG: destroyed pipelines, freed with the context */
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
static void* mpar__alloc_zeroed(const mpar_context* ctx, size_t size) {
    void* q = mpar__alloc(ctx, size);
    if (q) memset(q, 0, size);
    return q;
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

/* Records the failure detail and returns code. In a pipeline's worker
   thread the detail goes to that worker's buffer; elsewhere it becomes the
   context's message (mpar_last_error), a new string each time, so that a
   reader on another thread never sees one half-written. */
static mpar_result mpar__fail(mpar_context* ctx, mpar_result code, const char* fmt, ...)
#if defined(__GNUC__) || defined(__clang__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;
static mpar_result mpar__fail(mpar_context* ctx, mpar_result code, const char* fmt, ...) {
    va_list ap;
    int n, i;
    char* msg;
    if (!ctx) return code;
    pthread_mutex_lock(&ctx->lock);
    for (i = 0; i < ctx->sink_count && !pthread_equal(ctx->sinks[i].thread, pthread_self()); i++) {}
    if (i < ctx->sink_count) {
        char* buf = ctx->sinks[i].buf;
        va_start(ap, fmt);
        vsnprintf(buf, ctx->sinks[i].cap, fmt, ap);
        va_end(ap);
        pthread_mutex_unlock(&ctx->lock);
        mpar__log(ctx, MPAR_LOG_ERROR, "%s: %.900s", mpar_result_string(code), buf);
        return code;
    }
    pthread_mutex_unlock(&ctx->lock);
    va_start(ap, fmt);
    n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    msg = (char*)mpar__alloc(ctx, n > 0 ? (size_t)n + 1 : 1);
    if (!msg) return code; /* the previous message stays */
    va_start(ap, fmt);
    vsnprintf(msg, n > 0 ? (size_t)n + 1 : 1, fmt, ap);
    va_end(ap);
    mpar__log(ctx, MPAR_LOG_ERROR, "%s: %.900s", mpar_result_string(code), msg);
    pthread_mutex_lock(&ctx->lock);
    mpar__free(ctx, ctx->retired[ctx->retired_next]);
    ctx->retired[ctx->retired_next] = ctx->error;
    ctx->retired_next = (ctx->retired_next + 1) % (int)(sizeof ctx->retired / sizeof ctx->retired[0]);
    ctx->error = msg;
    pthread_mutex_unlock(&ctx->lock);
    return code;
}

/* The calling thread's failures go to buf (cap bytes) until removed. */
static int mpar__sink_add(mpar_context* ctx, char* buf, size_t cap) {
    int ok;
    pthread_mutex_lock(&ctx->lock);
    ok = ctx->sink_count < MPAR__MAX_SINKS;
    if (ok) {
        ctx->sinks[ctx->sink_count].thread = pthread_self();
        ctx->sinks[ctx->sink_count].buf = buf;
        ctx->sinks[ctx->sink_count].cap = cap;
        ctx->sink_count++;
    }
    pthread_mutex_unlock(&ctx->lock);
    return ok;
}
static void mpar__sink_remove(mpar_context* ctx, const char* buf) {
    int i;
    pthread_mutex_lock(&ctx->lock);
    for (i = 0; i < ctx->sink_count; i++)
        if (ctx->sinks[i].buf == buf) {
            ctx->sinks[i] = ctx->sinks[--ctx->sink_count];
            break;
        }
    pthread_mutex_unlock(&ctx->lock);
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
#define MPAR__TRY(expr)                                                                                       \
    do {                                                                                                      \
        mpar_result mpar__t = (expr);                                                                         \
        if (mpar__t != MPAR_SUCCESS) return mpar__t;                                                          \
    } while (0)

MPARDEF const char* mpar_device_type_name(mpar_device_type type) {
    switch (type) {
        case MPAR_DEVICE_CPU: return "cpu";
        case MPAR_DEVICE_GPU: return "gpu";
        case MPAR_DEVICE_ACCELERATOR: return "accelerator";
        default: return "other";
    }
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

MPARDEF mpar_result mpar_list_devices(mpar_device_info* out, int capacity, int* count, mpar_error* err) {
    mpar__device* all;
    int n = 0, i;
    mpar_result r;
    if (!count || capacity < 0 || (capacity > 0 && !out))
        return mpar_error_set(err, MPAR_ERROR_INVALID_ARGUMENT, "mpar_list_devices: count is NULL, or out is NULL "
                                                                "with a positive capacity");
    all = (mpar__device*)MPAR_MALLOC(sizeof(mpar__device) * MPAR__MAX_DEVICES);
    if (!all) return mpar_error_set(err, MPAR_ERROR_OUT_OF_HOST_MEMORY, "out of host memory");
    r = mpar__enumerate(all, &n, err);
    *count = n;
    for (i = 0; i < n && i < capacity; i++) out[i] = all[i].info;
    MPAR_FREE(all);
    return r;
}

/* A decimal number, saturated (at the largest long long) so that huge
   numbers stay huge and still compare right with smaller ones. */
static long long mpar__number(const char* s) {
    long long v = 0;
    while (isdigit((unsigned char)*s)) {
        int d = *s++ - '0';
        v = v > (LLONG_MAX - 9) / 10 ? LLONG_MAX : v * 10 + d;
    }
    return v;
}
/* ... and as an index: anything past 1e9 is just "does not exist". */
static int mpar__index(const char* s) {
    long long v = mpar__number(s);
    return v > 1000000000LL ? 1000000000 : (int)v;
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
    else if (mpar__is_digits(term, len)) lo = hi = mpar__index(term);
    else if (dash && mpar__is_digits(term, (size_t)(dash - term)) && mpar__is_digits(dash + 1, strlen(dash + 1))) {
        lo = mpar__index(term);
        hi = mpar__index(dash + 1);
        if (mpar__number(dash + 1) < mpar__number(term)) return mpar_error_set(err, MPAR_ERROR_INVALID_SELECTION, "device range '%s' runs backwards", term);
    } else if (term[0] == 'p' && mpar__is_digits(term + 1, len - 1)) platform = mpar__index(term + 1);
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
        int k;
        if (!hit) continue;
        matched = 1;
        /* Refused, not merged: the user asked for more stage devices than
           they get. Two stages on one device are stage_desc.device twice. */
        for (k = 0; k < *count; k++)
            if (order[k] == i)
                return mpar_error_set(err, MPAR_ERROR_INVALID_SELECTION, "device %d (%s) is selected twice (again by "
                                      "'%s'); to run two stages on one device, select it once and give its index "
                                      "in two mpar_stage_desc", i, d->name, term);
        order[(*count)++] = i;
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

/* Host memory aligned to `align` (a power of two), through the context's
   allocator. Just before the block: the pointer to free and the context,
   so that an OpenCL destructor callback can free it. */
typedef struct mpar__aligned_head {
    void* raw;
    const mpar_context* ctx;
} mpar__aligned_head;
static void* mpar__alloc_aligned(const mpar_context* ctx, size_t bytes, size_t align) {
    mpar__aligned_head head;
    uintptr_t at;
    if (bytes > SIZE_MAX - align - sizeof head) return NULL;
    head.raw = mpar__alloc(ctx, bytes + align + sizeof head);
    head.ctx = ctx;
    if (!head.raw) return NULL;
    at = ((uintptr_t)head.raw + sizeof head + (align - 1)) & ~(uintptr_t)(align - 1);
    memcpy((unsigned char*)at - sizeof head, &head, sizeof head);
    return (void*)at;
}
static void mpar__free_aligned(void* p) {
    mpar__aligned_head head;
    if (!p) return;
    memcpy(&head, (unsigned char*)p - sizeof head, sizeof head);
    mpar__free(head.ctx, head.raw);
}

/* Whether the device computes on the very memory of a CL_MEM_USE_HOST_PTR
   buffer, with no copy in between (PoCL's CPU devices do): the host route
   shares its buffers with the OpenCL kernels that have no host version. */
static int mpar__shares_host_memory(mpar_context* ctx, mpar__device* d) {
    float pattern = 42.0f, back = 0.0f, *h = (float*)mpar__alloc_aligned(ctx, 64, d->host_align);
    cl_int st = CL_SUCCESS;
    cl_mem m;
    int ok;
    if (!h) return 0;
    memset(h, 0, 64);
    m = clCreateBuffer(ctx->groups[d->info.group], CL_MEM_READ_WRITE | CL_MEM_USE_HOST_PTR, 64, h, &st);
    if (st == CL_SUCCESS) st = clEnqueueFillBuffer(d->queue, m, &pattern, sizeof pattern, 0, 64, 0, NULL, NULL);
    if (st == CL_SUCCESS) st = clFinish(d->queue);
    ok = st == CL_SUCCESS && h[3] == 42.0f; /* the device wrote here */
    h[5] = 7.0f;
    if (ok) ok = clEnqueueReadBuffer(d->queue, m, CL_TRUE, 20, 4, &back, 0, NULL, NULL) == CL_SUCCESS && back == 7.0f;
    if (m) clReleaseMemObject(m);
    mpar__free_aligned(h);
    return ok;
}

/* Decides once, for each device, whether its layers take the host route. */
static mpar_result mpar__decide_routes(mpar_context* ctx, mpar_cpu_route route, mpar_error* err) {
    const char* env = getenv("MPAR_CPU_ROUTE");
    int i;
    if (env && env[0]) {
        if (!strcmp(env, "auto")) route = MPAR_CPU_ROUTE_AUTO;
        else if (!strcmp(env, "opencl")) route = MPAR_CPU_ROUTE_OPENCL;
        else if (!strcmp(env, "host")) route = MPAR_CPU_ROUTE_HOST;
        else
            return mpar_error_set(err, MPAR_ERROR_INVALID_ARGUMENT,
                                  "MPAR_CPU_ROUTE is '%s'; expected auto, opencl or host", env);
    }
    if (route != MPAR_CPU_ROUTE_AUTO && route != MPAR_CPU_ROUTE_OPENCL && route != MPAR_CPU_ROUTE_HOST)
        return mpar_error_set(err, MPAR_ERROR_INVALID_ARGUMENT, "mpar_desc.cpu_route: unknown value %d", (int)route);
    for (i = 0; i < ctx->device_count; i++) {
        mpar__device* d = &ctx->devices[i];
        cl_uint bits = 0;
        cl_bool unified = CL_FALSE;
        const char* why = NULL;
        clGetDeviceInfo(d->id, CL_DEVICE_MEM_BASE_ADDR_ALIGN, sizeof bits, &bits, NULL);
        clGetDeviceInfo(d->id, CL_DEVICE_HOST_UNIFIED_MEMORY, sizeof unified, &unified, NULL);
        d->host_align = bits / 8 > 128 ? (size_t)bits / 8 : 128;
        if (d->info.type != MPAR_DEVICE_CPU || route == MPAR_CPU_ROUTE_OPENCL) continue;
#ifndef MPAR_USE_CBLAS
        why = "mpar was compiled without MPAR_USE_CBLAS";
#endif
        if (!why && !unified) why = "its memory is not the host's (CL_DEVICE_HOST_UNIFIED_MEMORY is false)";
        if (!why && !mpar__shares_host_memory(ctx, d)) why = "it copies CL_MEM_USE_HOST_PTR buffers";
        if (why && route == MPAR_CPU_ROUTE_HOST)
            return mpar_error_set(err, MPAR_ERROR_UNSUPPORTED, "cpu_route HOST: device %d (%s) cannot take it: %s", i,
                                  d->info.name, why);
        d->info.host_route = why == NULL;
    }
    return MPAR_SUCCESS;
}

/* mpar_desc.slow_devices (or MPAR_SLOW_DEVICES): "DEVICE:FACTOR,...". */
static mpar_result mpar__parse_slow_devices(mpar_context* ctx, const char* spec, const char* what, mpar_error* err) {
    const char* s = spec;
    int i;
    for (i = 0; i < ctx->device_count; i++) ctx->devices[i].info.slowdown = 1.0;
    if (!s || !s[0]) return MPAR_SUCCESS;
    for (;;) {
        char* end;
        long dev = strtol(s, &end, 10);
        double f;
        if (end == s || *end != ':')
            return mpar_error_set(err, MPAR_ERROR_INVALID_ARGUMENT, "%s '%s': expected DEVICE:FACTOR[,DEVICE:FACTOR...] "
                                  "at '%s'", what, spec, s);
        if (dev < 0 || dev >= ctx->device_count)
            return mpar_error_set(err, MPAR_ERROR_INVALID_ARGUMENT, "%s '%s': device %ld does not exist (%d device(s))",
                                  what, spec, dev, ctx->device_count);
        s = end + 1;
        f = strtod(s, &end);
        if (end == s || !(f >= 1.0 && f <= 100.0))
            return mpar_error_set(err, MPAR_ERROR_INVALID_ARGUMENT, "%s '%s': device %ld's factor must be a number "
                                  "from 1 to 100", what, spec, dev);
        ctx->devices[dev].info.slowdown = f;
        s = end;
        if (*s == '\0') return MPAR_SUCCESS;
        if (*s != ',')
            return mpar_error_set(err, MPAR_ERROR_INVALID_ARGUMENT, "%s '%s': unexpected '%s'", what, spec, s);
        s++;
    }
}

/* A slowed device's compute section took `elapsed` seconds: sleep the rest. */
static void mpar__slow_sleep(double factor, double elapsed) {
    struct timespec ts;
    double t = (factor - 1.0) * elapsed;
    if (!(factor > 1.0) || !(t > 0.0)) return;
    ts.tv_sec = (time_t)t;
    ts.tv_nsec = (long)((t - (double)ts.tv_sec) * 1e9);
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
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
    r = mpar__enumerate(all, &n, err);
    if (r == MPAR_SUCCESS) r = mpar__select(spec, all, n, order, &count, err);
    for (i = 0; r == MPAR_SUCCESS && i < count; i++) {
        ctx->devices[i] = all[order[i]];
        ctx->devices[i].info.index = i;
        ctx->devices[i].info.group = -1;
        ctx->devices[i].pocl = strstr(ctx->devices[i].info.platform, "Portable Computing Language") != NULL ||
                               strstr(ctx->devices[i].info.vendor, "pocl") != NULL;
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
    {
        const char* slow = getenv("MPAR_SLOW_DEVICES");
        r = slow ? mpar__parse_slow_devices(ctx, slow, "MPAR_SLOW_DEVICES", err)
                 : mpar__parse_slow_devices(ctx, d->slow_devices, "mpar_desc.slow_devices", err);
        if (r != MPAR_SUCCESS) return r;
    }
    r = mpar__create_contexts(ctx, d->context_per_device);
    if (r != MPAR_SUCCESS) return mpar_error_set(err, r, "%s", ctx->error);
    return mpar__decide_routes(ctx, d->cpu_route, err);
}

static void mpar__context_free(mpar_context* ctx, int keep);
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
    pthread_mutex_init(&ctx->first_run_lock, NULL);
    ctx->error = (char*)mpar__alloc(ctx, 1);
    if (!ctx->error) {
        mpar__context_free(ctx, 0);
        return mpar_error_set(err, MPAR_ERROR_OUT_OF_HOST_MEMORY, "out of host memory");
    }
    ctx->error[0] = '\0';
    r = mpar__create_setup(ctx, &d, err);
    if (r == MPAR_SUCCESS && getenv("MPAR_FAULT") && mpar_set_fault(ctx, getenv("MPAR_FAULT")) != MPAR_SUCCESS)
        r = mpar_error_set(err, MPAR_ERROR_INVALID_ARGUMENT, "MPAR_FAULT: %s", ctx->error);
    if (r != MPAR_SUCCESS) {
        mpar__context_free(ctx, 0);
        return r;
    }
    mpar__log(ctx, MPAR_LOG_INFO, "mpar %s: %d device(s), %d context(s)", MPAR_VERSION_STRING, ctx->device_count,
              ctx->group_count);
    ctx->live = MPAR__LIVE_CONTEXT;
    *out = ctx;
    return MPAR_SUCCESS;
}

/* Everything a context holds; keep: all but the struct (a tombstone). */
static void mpar__context_free(mpar_context* ctx, int keep) {
    int i;
    mpar__program* p;
    while (ctx->tombstones) {
        struct mpar_pipeline* next = *(struct mpar_pipeline**)ctx->tombstones; /* its first field */
        mpar__free(ctx, ctx->tombstones);
        ctx->tombstones = next;
    }
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
    for (i = 0; i < (int)(sizeof ctx->retired / sizeof ctx->retired[0]); i++) mpar__free(ctx, ctx->retired[i]);
    pthread_mutex_destroy(&ctx->first_run_lock);
    pthread_mutex_destroy(&ctx->lock);
    if (keep) {
        ctx->programs = NULL, ctx->device_count = ctx->group_count = 0, ctx->error = NULL;
        memset(ctx->retired, 0, sizeof ctx->retired);
        return;
    }
    if (ctx->allocator.free) ctx->allocator.free(ctx->allocator.user, ctx);
    else MPAR_FREE(ctx);
}

/* A context's public calls start here: live, or why not. A destroyed
   context (a tombstone under MPAR_DEBUG) has no lock or message left, so
   the answer goes to its log callback only. */
static mpar_result mpar__ctx_check(const mpar_context* ctx, const char* call) {
    if (!ctx) return MPAR_ERROR_INVALID_ARGUMENT;
    if (ctx->live == MPAR__LIVE_CONTEXT) return MPAR_SUCCESS;
    if (ctx->live == MPAR__DEAD) {
        if (ctx->log) ctx->log(ctx->log_user, MPAR_LOG_ERROR, call);
        return MPAR_ERROR_INVALID_STATE;
    }
    return MPAR_ERROR_INVALID_ARGUMENT; /* not a context */
}

MPARDEF void mpar_destroy(mpar_context* ctx) {
    if (!ctx) return;
    if (mpar__ctx_check(ctx, "mpar_destroy: the context was destroyed already; nothing done") != MPAR_SUCCESS) return;
    ctx->live = MPAR__DEAD;
#ifdef MPAR_DEBUG
    mpar__context_free(ctx, 1);
    MPAR__KEEP_TOMBSTONE(ctx);
#else
    mpar__context_free(ctx, 0);
#endif
}

MPARDEF const char* mpar_last_error(const mpar_context* ctx) {
    const char* s;
    if (!ctx) return "mpar_last_error: context is NULL";
    if (ctx->live != MPAR__LIVE_CONTEXT) return "mpar_last_error: the context was destroyed";
    pthread_mutex_lock((pthread_mutex_t*)&ctx->lock);
    s = ctx->error;
    pthread_mutex_unlock((pthread_mutex_t*)&ctx->lock);
    return s;
}

MPARDEF int mpar_device_count(const mpar_context* ctx) {
    return ctx && ctx->live == MPAR__LIVE_CONTEXT ? ctx->device_count : 0;
}

static mpar_result mpar__check_device(const mpar_context* ctx, int device) {
    MPAR__TRY(mpar__ctx_check(ctx, "a call on a destroyed context"));
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

enum { MPAR__FAULT_ALLOC = 1, MPAR__FAULT_ENQUEUE, MPAR__FAULT_TRANSFER, MPAR__FAULT_BUILD };

static int mpar__fault_field(const char** p, int* out) {
    if (**p == '*') {
        *out = -1;
        (*p)++;
        return 1;
    }
    if (!isdigit((unsigned char)**p)) return 0;
    *out = 0;
    while (isdigit((unsigned char)**p) && *out < 100000000) *out = *out * 10 + (*(*p)++ - '0');
    return !isdigit((unsigned char)**p);
}

/* An int read and written by several threads outside a lock, as a whole
   (relaxed atomics where the compiler has them). */
static int mpar__load_int(const int* v) {
#if defined(__GNUC__) || defined(__clang__)
    return __atomic_load_n(v, __ATOMIC_RELAXED);
#else
    return *(const volatile int*)v;
#endif
}
static void mpar__store_int(int* v, int x) {
#if defined(__GNUC__) || defined(__clang__)
    __atomic_store_n(v, x, __ATOMIC_RELAXED);
#else
    *(volatile int*)v = x;
#endif
}

MPARDEF mpar_result mpar_set_fault(mpar_context* ctx, const char* spec) {
    static const char* kinds[] = {"alloc", "enqueue", "transfer", "build"};
    int k, kind = 0, stage = -1, step = -1, nth = 1;
    const char* p;
    MPAR__TRY(mpar__ctx_check(ctx, "mpar_set_fault: the context was destroyed"));
    if (spec && spec[0]) {
        for (k = 0; k < 4 && !kind; k++)
            if (!strncmp(spec, kinds[k], strlen(kinds[k])) && spec[strlen(kinds[k])] == ':') kind = k + 1;
        p = kind ? spec + strlen(kinds[kind - 1]) + 1 : spec;
        if (!kind || !mpar__fault_field(&p, &stage) || *p++ != ':' || !mpar__fault_field(&p, &step) ||
            (*p == ':' && (p++, !mpar__fault_field(&p, &nth) || nth < 1)) || *p)
            return mpar__fail(ctx, MPAR_ERROR_INVALID_ARGUMENT,
                              "fault spec '%.100s': expected KIND:STAGE:STEP[:NTH], KIND alloc|enqueue|transfer|build",
                              spec);
    }
    pthread_mutex_lock(&ctx->lock);
    ctx->fault_stage = stage, ctx->fault_step = step, ctx->fault_nth = nth;
    mpar__store_int(&ctx->fault_kind, kind);
    pthread_mutex_unlock(&ctx->lock);
    return MPAR_SUCCESS;
}

/* Whether this call is the injected failure (at most once per setting). */
static int mpar__fault_hit(mpar_context* ctx, int kind, int stage, int step) {
    int hit = 0;
    if (!mpar__load_int(&ctx->fault_kind)) return 0; /* unlocked, atomic: the common case costs no lock */
    pthread_mutex_lock(&ctx->lock);
    if (ctx->fault_kind == kind && (ctx->fault_stage < 0 || ctx->fault_stage == stage) &&
        (ctx->fault_step < 0 || ctx->fault_step == step) && --ctx->fault_nth == 0) {
        hit = 1;
        mpar__store_int(&ctx->fault_kind, 0);
    }
    pthread_mutex_unlock(&ctx->lock);
    return hit;
}

MPARDEF mpar_result mpar_context_get_stats(const mpar_context* ctx, mpar_context_stats* out) {
    MPAR__TRY(mpar__ctx_check(ctx, "mpar_context_get_stats: the context was destroyed"));
    if (!out)
        return mpar__fail((mpar_context*)ctx, MPAR_ERROR_INVALID_ARGUMENT, "mpar_context_get_stats: out is NULL");
    pthread_mutex_lock((pthread_mutex_t*)&ctx->lock);
    *out = ctx->stats;
    pthread_mutex_unlock((pthread_mutex_t*)&ctx->lock);
    return MPAR_SUCCESS;
}

/* --------------------------------------------------------------------------
   3. Kernels
   -------------------------------------------------------------------------- */

/* A regular file (a folder opens with fopen too, and has no size). */
static int mpar__file_exists(const char* path) {
    struct stat st;
    return stat(path, &st) == 0 && S_ISREG(st.st_mode);
}

/* Tries every folder of a colon-separated list; appends it to `searched`. */
static int mpar__find_in_list(const char* list, const char* file, char* out, size_t out_size, char* searched,
                              size_t searched_size) {
    const char* p = list;
    while (p && *p) {
        size_t len = strcspn(p, ":");
        if (len > 0) {
            size_t used = strlen(searched);
            int w = snprintf(out, out_size, "%.*s/%s", (int)len, p, file);
            if (w < 0 || (size_t)w >= out_size) { /* a cut path could name another file */
                out[0] = '\0';
                p += len;
                if (*p == ':') p++;
                continue;
            }
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
    MPAR__TRY(mpar__ctx_check(ctx, "mpar_kernel_find: the context was destroyed"));
    if (!file || !file[0] || !out || out_size == 0)
        return mpar__fail(ctx, MPAR_ERROR_INVALID_ARGUMENT, "mpar_kernel_find: NULL or empty argument");
    if (strchr(file, '/') && mpar__file_exists(file)) {
        if (strlen(file) >= out_size)
            return mpar__fail(ctx, MPAR_ERROR_INVALID_ARGUMENT, "mpar_kernel_find: %zu bytes cannot hold '%s'", out_size,
                              file);
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
#else
    if (mpar__find_in_list(MPAR__INSTALLED_KERNEL_DIR, file, out, out_size, searched, sizeof searched))
        return MPAR_SUCCESS;
#endif
    out[0] = '\0';
    return mpar__fail(ctx, MPAR_ERROR_KERNEL_NOT_FOUND,
                      "kernel file '%s' not found; searched: %s (set MPAR_KERNEL_PATH or mpar_desc.kernel_path)", file,
                      searched[0] ? searched : "nothing");
}

/* Reads a whole file; *size receives its length. NULL on failure. */
/* A whole regular file (NUL-terminated), or NULL. trusted_only: NULL also
   for a file another user owns or that group or others may write (a
   shared cache folder must not be a way to inject code). */
static char* mpar__read_file_as(const mpar_context* ctx, const char* path, size_t* size, int trusted_only) {
    struct stat st;
    char* buf = NULL;
    size_t n, got = 0;
    int fd = mpar__open_regular(path, &st);
    if (fd < 0) return NULL;
    if (trusted_only && (st.st_uid != geteuid() || (st.st_mode & (S_IWGRP | S_IWOTH)))) {
        close(fd);
        return NULL;
    }
    n = (size_t)st.st_size;
    if ((uint64_t)st.st_size < ((uint64_t)1 << 30) && (buf = (char*)mpar__alloc(ctx, n + 1)) != NULL) {
        while (got < n) {
            ssize_t k = read(fd, buf + got, n - got);
            if (k <= 0) break;
            got += (size_t)k;
        }
        if (got != n) {
            mpar__free(ctx, buf);
            buf = NULL;
        } else {
            buf[n] = '\0';
            *size = n;
        }
    }
    close(fd);
    return buf;
}
static char* mpar__read_file(const mpar_context* ctx, const char* path, size_t* size) {
    return mpar__read_file_as(ctx, path, size, 0);
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
    {
        struct stat st;
        if (stat(file, &st) != 0) return NULL; /* no file: nothing to reject */
    }
    data = (unsigned char*)mpar__read_file_as(ctx, file, &size, 1); /* ours, writable by us alone */
    if (!data) goto reject;
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
    int ok = 1, fd;
    FILE* f = NULL;
    memset(bins, 0, sizeof bins);
    if (clGetProgramInfo(prog, CL_PROGRAM_BINARY_SIZES, sizeof(size_t) * b->n, sizes, NULL) != CL_SUCCESS) return;
    for (i = 0; i < b->n; i++) {
        if (sizes[i] == 0 || !(bins[i] = (unsigned char*)mpar__alloc(ctx, sizes[i]))) ok = 0;
    }
    if (ok && clGetProgramInfo(prog, CL_PROGRAM_BINARIES, sizeof(unsigned char*) * b->n, bins, NULL) != CL_SUCCESS)
        ok = 0;
    mpar__cache_file(ctx, b, file, sizeof file);
    if (ok && mpar__mkdirs(ctx->cache_dir) == 0 && (fd = mpar__tmp_create(file, tmp, sizeof tmp)) >= 0 &&
        ((f = fdopen(fd, "wb")) != NULL || (close(fd), remove(tmp), 0))) {
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
    MPAR__TRY(mpar__ctx_check(ctx, "mpar_kernel_create: the context was destroyed"));
    if (!name || !out) return mpar__fail(ctx, MPAR_ERROR_INVALID_ARGUMENT, "mpar_kernel_create: name or out is NULL");
    r = mpar_program_get(ctx, device, file, &prog);
    if (r != MPAR_SUCCESS) return r;
    *out = clCreateKernel(prog, name, &st);
    if (st != CL_SUCCESS)
        return mpar__fail(ctx, (mpar_result)st, "clCreateKernel('%s') from '%s' failed with %s", name, file,
                          mpar_result_string((mpar_result)st));
    return MPAR_SUCCESS;
}


/* --------------------------------------------------------------------------
   4. Model and layers
   -------------------------------------------------------------------------- */
#include <math.h>
#include <clblast_c.h>
#ifdef MPAR_USE_CBLAS
/* BLIS's cblas.h brings static helpers that a strict build flags unused. */
#if defined(__GNUC__) || defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunused-function"
#endif
#include MPAR_CBLAS_HEADER
#if defined(__GNUC__) || defined(__clang__)
#pragma GCC diagnostic pop
#endif
#endif

#define MPAR__EXEC_MAX_KERNELS 96

struct mpar_exec {
    mpar_context* ctx;
    int device;
    cl_command_queue queue;
    int kernel_count;
    struct {
        char* file;
        char* name;
        cl_kernel kernel;
    } kernels[MPAR__EXEC_MAX_KERNELS];
    /* Profiling (only when asked, so that it costs nothing otherwise): the
       events of the first and of the latest command since the last
       interval. The queue is in order, so the first starts before and the
       latest ends after every command between them, which are released at
       once. Nothing here waits: an interval is read when its commands have
       finished anyway (mpar__interval_times, at the end of a job). */
    int profiling;
    cl_event ev_first, ev_last, ev_slot;
    double clock_offset; /* host seconds minus device seconds */
    int stage;           /* for fault injection: the stage, and its step counter */
    const int* step;
    int host_route;      /* built-in kernels and GEMMs run as host code */
    int cl_pending;      /* OpenCL commands enqueued and not yet waited for */
    int gemm_ready;      /* CLBlast's caches hold this executor's device (mpar__clblast_fill_lock) */
    double host_start, host_end; /* profiling: host-route work since the last interval (0: none) */
    uint64_t launches, cl_launches; /* since the job began */
#ifdef MPAR_TEST_DEFER_COPIES
    struct {
        cl_mem src, dst;
        size_t src_off, dst_off, bytes;
        int pending;
    } deferred; /* a link copy not enqueued yet (see mpar__link_copy) */
#endif
};

static double mpar__now(void);

static int mpar__exec_fault(mpar_exec* ex, int kind) {
    return mpar__fault_hit(ex->ctx, kind, ex->stage, ex->step ? *ex->step : -1);
}

/* What a stage ran since the last interval: the first and the latest
   OpenCL command (NULL: none; last NULL: only one) and the host-route work
   (host_end 0: none). */
typedef struct mpar__interval {
    cl_event first, last;
    double host_start, host_end;
} mpar__interval;

static void mpar__interval_release(mpar__interval* iv) {
    if (iv->first) clReleaseEvent(iv->first);
    if (iv->last) clReleaseEvent(iv->last);
    iv->first = iv->last = NULL;
}

/* Hands over the interval since the last call and starts a new one; 0 when
   nothing ran. Never waits for the device: a clFinish per action would
   keep the worker from enqueueing the next action while the device runs
   this one. */
static int mpar__exec_take(mpar_exec* ex, mpar__interval* out) {
    out->first = ex->ev_first, out->last = ex->ev_last;
    out->host_start = ex->host_start, out->host_end = ex->host_end;
    ex->ev_first = ex->ev_last = NULL;
    ex->host_start = ex->host_end = 0.0;
    return out->first || out->host_end > 0.0;
}

/* The host-clock times of a taken interval, waiting for its last command
   if it has not finished (at the end of a job it has); releases its
   events. 0 when it holds nothing readable. */
static int mpar__interval_times(const mpar_exec* ex, mpar__interval* iv, double* start, double* end) {
    cl_event last = iv->last ? iv->last : iv->first;
    cl_ulong a = 0, b = 0;
    int any = 0, host = iv->host_end > 0.0;
    if (iv->first && clWaitForEvents(1, &last) == CL_SUCCESS &&
        clGetEventProfilingInfo(iv->first, CL_PROFILING_COMMAND_START, sizeof a, &a, NULL) == CL_SUCCESS &&
        clGetEventProfilingInfo(last, CL_PROFILING_COMMAND_END, sizeof b, &b, NULL) == CL_SUCCESS && b >= a) {
        *start = 1e-9 * (double)a + ex->clock_offset;
        *end = 1e-9 * (double)b + ex->clock_offset;
        any = 1;
    }
    mpar__interval_release(iv);
    if (host) {
        if (!any || iv->host_start < *start) *start = iv->host_start;
        if (!any || iv->host_end > *end) *end = iv->host_end;
    }
    return any || host;
}

/* ---- the host route: built-in kernels as C loops, GEMMs through CBLAS, on
   the memory of CL_MEM_USE_HOST_PTR buffers, in the worker thread ---- */

/* Before host code touches the stage's memory, the OpenCL commands enqueued
   before it must have finished. */
static mpar_result mpar__exec_sync(mpar_exec* ex) {
    if (!ex->cl_pending) return MPAR_SUCCESS;
    ex->cl_pending = 0;
    return mpar__cl_check(ex->ctx, clFinish(ex->queue), "clFinish", __FILE__, __LINE__);
}

/* The host memory behind a buffer mpar allocated for a host-route stage;
   NULL for any other buffer. */
static unsigned char* mpar__exec_host_ptr(const mpar_exec* ex, cl_mem m) {
    void* p = NULL;
    if (!ex->host_route || !m || clGetMemObjectInfo(m, CL_MEM_HOST_PTR, sizeof p, &p, NULL) != CL_SUCCESS) return NULL;
    return (unsigned char*)p;
}

static void mpar__exec_host_done(mpar_exec* ex, double t0) {
    ex->launches++;
    if (!ex->profiling) return;
    if (ex->host_end == 0.0) ex->host_start = t0;
    ex->host_end = mpar__now();
}

/* Copies between a stage buffer and host memory: memcpy on the host route,
   a transfer otherwise, blocking unless `later`: then the host memory must
   stay as it is until the queue finishes (the worker drains its queues
   before a job returns, so memory that outlives the job qualifies). */
static mpar_result mpar__exec_copy(mpar_exec* ex, mpar_buf b, void* host, size_t bytes, int to_device, int later) {
    unsigned char* h = mpar__exec_host_ptr(ex, b.mem);
    cl_bool blocking = later ? CL_FALSE : CL_TRUE;
    cl_int st;
    if (h) {
        MPAR__TRY(mpar__exec_sync(ex));
        if (to_device) memcpy(h + 4 * b.off, host, bytes);
        else memcpy(host, h + 4 * b.off, bytes);
        return MPAR_SUCCESS;
    }
    st = to_device ? clEnqueueWriteBuffer(ex->queue, b.mem, blocking, b.off * 4, bytes, host, 0, NULL, NULL)
                   : clEnqueueReadBuffer(ex->queue, b.mem, blocking, b.off * 4, bytes, host, 0, NULL, NULL);
    if (later) ex->cl_pending = 1;
    return mpar__cl_check(ex->ctx, st, to_device ? "clEnqueueWriteBuffer" : "clEnqueueReadBuffer", __FILE__, __LINE__);
}
static mpar_result mpar__exec_transfer(mpar_exec* ex, mpar_buf b, void* host, size_t bytes, int to_device) {
    return mpar__exec_copy(ex, b, host, bytes, to_device, 0);
}

/* Host versions of the built-in kernels (kernels/<file>.cl). Each function
   computes what the whole NDRange of its kernel computes: every global id in
   [0, g0), each with the kernel's own guard, formulas and order of
   floating-point operations inside the work-item. Work-items of these
   kernels never write the same location, so the host visits them in the
   order that reads memory contiguously. No kernel reads get_global_id(1),
   so g1 is ignored. No `restrict`: element-wise kernels allow their output
   to alias an input at the same offset, and every loop reads an element
   before writing it, as the kernel's work-item does. tests/test_host_kernels.c
   checks every one against the OpenCL kernel. */

/* One argument of a host kernel, in the order of mpar_exec_launch's letters:
   'B', 'b' (buffer + offset) and 'm' (buffer) become one pointer p, already
   moved to the offset (b.off counts 4-byte elements: floats, or int32 for
   tokens and targets; the one buffer of 8-byte elements, the ulong table of
   mpar_sumsq_layers_*, is always passed at offset 0); 'l' (a size_t count
   or offset, ulong in the kernel) -> z, 'i' -> i, 'u' -> u, 'f' -> f. */
typedef union mpar__harg { void* p; size_t z; int i; unsigned u; float f; } mpar__harg;
/* g0, g1: the global size given to mpar_exec_launch (g1 == 0: a 1-D range). */
typedef void (*mpar__host_fn)(const mpar__harg* a, size_t g0, size_t g1);

/* Contraction. OpenCL C compiles with FP_CONTRACT ON: where an expression
   adds (or subtracts) a product it computed itself, as in `s += x * y` or
   `w - lr * v`, the device compiler may fuse the two into one fma (one
   rounding). LLVM-based CPU compilers (PoCL) do so on CPUs with FMA
   (x86-64 since Haswell, ARMv8), as GPU compilers generally do. Every such
   place in the kernels is written MPAR__HK_MAD(a, b, c) = a * b + c here,
   with the operands the LLVM front end picks (clang: the left product when
   both sides of + are products; c - a * b is fma(-a, b, c); a product
   computed in an earlier statement is never fused).
   MPAR__HK_FMA 1: fmaf, correctly rounded on every machine, so
   bit-identical to PoCL on FMA CPUs, and the same bits on every host. It
   is inlined (and the element-wise loops vectorised at -O3) when compiled
   with -mfma or -march=haswell or later; a libm call per element otherwise.
   MPAR__HK_FMA 0 (default, since the host route needs to agree only with
   itself, and fmaf is a call per element unless built with -mfma): a
   separate multiply and add (what a device computes when
   it does not contract): no libm call, but up to a few ulp from the kernels
   on FMA CPUs (more where a result cancels).
   Bit-identity also needs the host compiler not to fuse on its own across
   statements, as gcc does with -ffp-contract=fast, its default in GNU modes
   (-std=gnu*), when the target has FMA (-mfma, -march=native): it fuses
   `g - sg` in layernorm_bwd_input, whose g = dy * gamma the kernel rounds.
   gcc in ISO modes (-std=c99, as mpar's Makefile) and clang's default
   (-ffp-contract=on) keep them apart. */
#ifndef MPAR__HK_FMA
#define MPAR__HK_FMA 0
#endif
#if MPAR__HK_FMA
#define MPAR__HK_MAD(a, b, c) fmaf((a), (b), (c))
#else
#define MPAR__HK_MAD(a, b, c) ((a) * (b) + (c))
#endif

/* The transcendental built-ins the kernels call (tanh, exp, log). OpenCL
   allows them a few ulp, and a device's may differ from libm's in the last
   bits; they are macros so that a test can put the device's own values in
   their place and check everything around them bit for bit. (sqrt and
   division are correctly rounded on both sides: no macro needed.) */
#ifndef MPAR__HK_TANHF
#define MPAR__HK_TANHF tanhf
#endif
#ifndef MPAR__HK_EXPF
#define MPAR__HK_EXPF expf
#endif
#ifndef MPAR__HK_LOGF
#define MPAR__HK_LOGF logf
#endif

/* Number of work-items that pass a guard `if (i >= n) return;` when the
   range is [0, g0): a padded range (g0 > n) is cut by the guard, a short one
   (g0 < n) only covers its first g0 items, as on the device. For a ulong
   count n ('l'); mpar__hk_count for an int one (rows, cols), where the
   kernels return at once for n <= 0. Products such as rows * cols are
   formed in size_t, as the kernels form them in ulong. */
static size_t mpar__hk_countz(size_t g0, size_t n) { return g0 < n ? g0 : n; }
static size_t mpar__hk_count(size_t g0, int n) { return n <= 0 ? 0 : mpar__hk_countz(g0, (size_t)n); }

/* Column sums (bias_grad, layernorm_bwd_weight, embedding_bwd_*) keep a
   block of per-column accumulators so that rows are read contiguously
   instead of with a stride; each column still adds its rows in ascending
   order starting from 0.0f, as the kernel's work-item does. */
#define MPAR__HK_COLS 64

/* ===================== elementwise.cl ===================== */

/* mpar_fill(y, n, value): "Blf" */
static void mpar__hk_fill(const mpar__harg* a, size_t g0, size_t g1) {
    float* y = (float*)a[0].p;
    size_t n = mpar__hk_countz(g0, a[1].z), i;
    float value = a[2].f;
    (void)g1;
    for (i = 0; i < n; i++) y[i] = value;
}

/* mpar_scale(y, n, alpha): never launched by mpar.h; letters "Blf" from the
   signature (y, ulong y_off, ulong n, float alpha). */
static void mpar__hk_scale(const mpar__harg* a, size_t g0, size_t g1) {
    float* y = (float*)a[0].p;
    size_t n = mpar__hk_countz(g0, a[1].z), i;
    float alpha = a[2].f;
    (void)g1;
    for (i = 0; i < n; i++) y[i] *= alpha;
}

/* mpar_axpy(x, y, n, alpha): never launched by mpar.h; letters "BBlf" from
   the signature. */
static void mpar__hk_axpy(const mpar__harg* a, size_t g0, size_t g1) {
    const float* x = (const float*)a[0].p;
    float* y = (float*)a[1].p;
    size_t n = mpar__hk_countz(g0, a[2].z), i;
    float alpha = a[3].f;
    (void)g1;
    for (i = 0; i < n; i++) y[i] = MPAR__HK_MAD(alpha, x[i], y[i]);
}

/* mpar_copy(x, y, n): "BBl". A plain loop, not memcpy: x and y may be the
   same memory (in-place), which memcpy does not allow. */
static void mpar__hk_copy(const mpar__harg* a, size_t g0, size_t g1) {
    const float* x = (const float*)a[0].p;
    float* y = (float*)a[1].p;
    size_t n = mpar__hk_countz(g0, a[2].z), i;
    (void)g1;
    for (i = 0; i < n; i++) y[i] = x[i];
}

/* bfloat16: the kernels' mpar__bf16_bits, on the host */
static uint32_t mpar__bf16_bits(float v) {
    uint32_t u;
    memcpy(&u, &v, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (u >> 16) | 0x40u;
    return (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
}
static float mpar__bf16_float(uint32_t bits) {
    float v;
    bits <<= 16;
    memcpy(&v, &bits, 4);
    return v;
}
/* Floats that hold `values` bf16 values, packed two to a float. */
static size_t mpar__bf16_floats(size_t values) { return values / 2 + values % 2; }

/* mpar_round_bf16(y, n): "Bl" */
static void mpar__hk_round_bf16(const mpar__harg* a, size_t g0, size_t g1) {
    float* y = (float*)a[0].p;
    size_t n = mpar__hk_countz(g0, a[1].z), i;
    (void)g1;
    for (i = 0; i < n; i++) y[i] = mpar__bf16_float(mpar__bf16_bits(y[i]));
}
/* mpar_pack_bf16(x, y, n): "BBl"; y holds n ushorts */
static void mpar__hk_pack_bf16(const mpar__harg* a, size_t g0, size_t g1) {
    const float* x = (const float*)a[0].p;
    uint16_t* y = (uint16_t*)a[1].p;
    size_t n = mpar__hk_countz(g0, a[2].z), i;
    (void)g1;
    for (i = 0; i < n; i++) y[i] = (uint16_t)mpar__bf16_bits(x[i]);
}
/* mpar_unpack_bf16(x, y, n): "BBl"; x holds n ushorts */
static void mpar__hk_unpack_bf16(const mpar__harg* a, size_t g0, size_t g1) {
    const uint16_t* x = (const uint16_t*)a[0].p;
    float* y = (float*)a[1].p;
    size_t n = mpar__hk_countz(g0, a[2].z), i;
    (void)g1;
    for (i = 0; i < n; i++) y[i] = mpar__bf16_float(x[i]);
}

/* mpar_add(a, b, out, n): "BBBl" */
static void mpar__hk_add(const mpar__harg* a, size_t g0, size_t g1) {
    const float* x = (const float*)a[0].p;
    const float* y = (const float*)a[1].p;
    float* out = (float*)a[2].p;
    size_t n = mpar__hk_countz(g0, a[3].z), i;
    (void)g1;
    for (i = 0; i < n; i++) out[i] = x[i] + y[i];
}

/* mpar_relu_fwd(x, y, n): "BBl". NaN and -0 give +0, as the kernel's
   `v > 0.0f ? v : 0.0f` (fmaxf would keep -0 or differ on NaN). */
/* Same constants and the same left-to-right products as the kernel's
   MPAR_GELU_K0 / MPAR_GELU_K1 expressions. */
#define MPAR__HK_GELU_K0 0.7978845608028654f
#define MPAR__HK_GELU_K1 0.044715f

/* The activations' forward formulas, shared with mpar_bias_add_act as in
   elementwise.cl. */
static float mpar__hk_relu(float v) { return v > 0.0f ? v : 0.0f; }
static float mpar__hk_gelu(float v) {
    float t = MPAR__HK_TANHF(MPAR__HK_GELU_K0 * MPAR__HK_MAD(MPAR__HK_GELU_K1 * v * v, v, v));
    return 0.5f * v * (1.0f + t);
}

static void mpar__hk_relu_fwd(const mpar__harg* a, size_t g0, size_t g1) {
    const float* x = (const float*)a[0].p;
    float* y = (float*)a[1].p;
    size_t n = mpar__hk_countz(g0, a[2].z), i;
    (void)g1;
    for (i = 0; i < n; i++) y[i] = mpar__hk_relu(x[i]);
}

/* mpar_relu_bwd(x, dy, dx, n): "BBBl" */
static void mpar__hk_relu_bwd(const mpar__harg* a, size_t g0, size_t g1) {
    const float* x = (const float*)a[0].p;
    const float* dy = (const float*)a[1].p;
    float* dx = (float*)a[2].p;
    size_t n = mpar__hk_countz(g0, a[3].z), i;
    (void)g1;
    for (i = 0; i < n; i++) dx[i] = x[i] > 0.0f ? dy[i] : 0.0f;
}


/* mpar_gelu_fwd(x, y, n): "BBl". tanhf may differ from the device's tanh in
   the last bits (OpenCL allows a few ulp). */
static void mpar__hk_gelu_fwd(const mpar__harg* a, size_t g0, size_t g1) {
    const float* x = (const float*)a[0].p;
    float* y = (float*)a[1].p;
    size_t n = mpar__hk_countz(g0, a[2].z), i;
    (void)g1;
    for (i = 0; i < n; i++) y[i] = mpar__hk_gelu(x[i]);
}

/* mpar_gelu_bwd(x, dy, dx, n): "BBBl" */
static void mpar__hk_gelu_bwd(const mpar__harg* a, size_t g0, size_t g1) {
    const float* x = (const float*)a[0].p;
    const float* dy = (const float*)a[1].p;
    float* dx = (float*)a[2].p;
    size_t n = mpar__hk_countz(g0, a[3].z), i;
    (void)g1;
    for (i = 0; i < n; i++) {
        float v = x[i];
        float t = MPAR__HK_TANHF(MPAR__HK_GELU_K0 * MPAR__HK_MAD(MPAR__HK_GELU_K1 * v * v, v, v));
        /* a + b with a and b both products: the left one is fused */
        float b = 0.5f * v * MPAR__HK_MAD(-t, t, 1.0f) * MPAR__HK_GELU_K0 *
                  MPAR__HK_MAD(3.0f * MPAR__HK_GELU_K1 * v, v, 1.0f);
        float d = MPAR__HK_MAD(0.5f, 1.0f + t, b);
        dx[i] = dy[i] * d;
    }
}

/* mpar_tanh_fwd(x, y, n): "BBl" */
static void mpar__hk_tanh_fwd(const mpar__harg* a, size_t g0, size_t g1) {
    const float* x = (const float*)a[0].p;
    float* y = (float*)a[1].p;
    size_t n = mpar__hk_countz(g0, a[2].z), i;
    (void)g1;
    for (i = 0; i < n; i++) y[i] = MPAR__HK_TANHF(x[i]);
}

/* mpar_tanh_bwd(y, dy, dx, n): "BBBl" (from the saved forward output) */
static void mpar__hk_tanh_bwd(const mpar__harg* a, size_t g0, size_t g1) {
    const float* y = (const float*)a[0].p;
    const float* dy = (const float*)a[1].p;
    float* dx = (float*)a[2].p;
    size_t n = mpar__hk_countz(g0, a[3].z), i;
    (void)g1;
    for (i = 0; i < n; i++) {
        float t = y[i];
        dx[i] = dy[i] * MPAR__HK_MAD(-t, t, 1.0f);
    }
}

/* The dropout hash, bit for bit: OpenCL uint is 32 bits and its arithmetic
   wraps, so everything is uint32_t. */
static uint32_t mpar__hk_mix32(uint32_t x) {
    x ^= x >> 16;
    x *= 0x7feb352du;
    x ^= x >> 15;
    x *= 0x846ca68bu;
    x ^= x >> 16;
    return x;
}

/* Shared body of mpar_dropout_fwd / _bwd: out[i] = in[i] * mult(i). The
   kernel recomputes key and scale per item; they do not depend on i, so they
   are hoisted (same values). Per item: keep iff !(p >= 1) && !(u < p), as in
   the kernel (a NaN p keeps everything and scales by NaN, like the kernel). */
static void mpar__hk_dropout(const mpar__harg* a, size_t g0) {
    const float* in = (const float*)a[0].p;
    float* out = (float*)a[1].p;
    size_t n = mpar__hk_countz(g0, a[2].z), i;
    float p = a[3].f;
    uint32_t key = mpar__hk_mix32(a[4].u ^ mpar__hk_mix32(a[5].u ^ 0x9e3779b9u));
    uint32_t base = (uint32_t)a[6].z; /* (uint)idx_off: the low 32 bits, as the kernel */
    int drop_all = p >= 1.0f;
    float scale = drop_all ? 0.0f : 1.0f / (1.0f - p); /* unused when p >= 1 */
    for (i = 0; i < n; i++) {
        uint32_t ctr = base + (uint32_t)i;
        uint32_t h = mpar__hk_mix32(mpar__hk_mix32(ctr ^ key) + key);
        float u = (float)(h >> 8) * (1.0f / 16777216.0f);
        float m = (drop_all || u < p) ? 0.0f : scale;
        out[i] = in[i] * m;
    }
}

/* mpar_dropout_fwd(x, y, n, p, seed_lo, seed_hi, idx_off): "BBlfuul" */
static void mpar__hk_dropout_fwd(const mpar__harg* a, size_t g0, size_t g1) {
    (void)g1;
    mpar__hk_dropout(a, g0);
}

/* mpar_dropout_bwd(dy, dx, n, p, seed_lo, seed_hi, idx_off): "BBlfuul" */
static void mpar__hk_dropout_bwd(const mpar__harg* a, size_t g0, size_t g1) {
    (void)g1;
    mpar__hk_dropout(a, g0);
}

/* mpar_bias_add(y, rows, cols, b): "BiiB". Item i adds b[i % cols]; walked
   row by row so the inner loop is contiguous (the last row may be cut short
   by a global size that is not a multiple of cols). Sizes <= 0 do nothing,
   as in the kernel. */
static void mpar__hk_bias_add(const mpar__harg* a, size_t g0, size_t g1) {
    float* y = (float*)a[0].p;
    int rows = a[1].i, cols = a[2].i;
    const float* b = (const float*)a[3].p;
    size_t n, base, c;
    (void)g1;
    if (rows <= 0 || cols <= 0) return;
    n = mpar__hk_countz(g0, (size_t)rows * (size_t)cols);
    for (base = 0; base < n; base += (size_t)cols) {
        float* yr = y + base;
        size_t m = n - base < (size_t)cols ? n - base : (size_t)cols;
        for (c = 0; c < m; c++) yr[c] += b[c];
    }
}

/* mpar_bias_add_act(y, rows, cols, b, out, act): "BiiBBi": y += b, then
   out = relu (1), gelu (2) or tanh (3) of it. */
static void mpar__hk_bias_add_act(const mpar__harg* a, size_t g0, size_t g1) {
    float* y = (float*)a[0].p;
    int rows = a[1].i, cols = a[2].i, act = a[5].i;
    const float* b = (const float*)a[3].p;
    float* out = (float*)a[4].p;
    size_t n, base, c;
    (void)g1;
    if (rows <= 0 || cols <= 0) return;
    n = mpar__hk_countz(g0, (size_t)rows * (size_t)cols);
    for (base = 0; base < n; base += (size_t)cols) {
        float *yr = y + base, *o = out + base;
        size_t m = n - base < (size_t)cols ? n - base : (size_t)cols;
        if (act == 1)
            for (c = 0; c < m; c++) yr[c] += b[c], o[c] = mpar__hk_relu(yr[c]);
        else if (act == 2)
            for (c = 0; c < m; c++) yr[c] += b[c], o[c] = mpar__hk_gelu(yr[c]);
        else
            for (c = 0; c < m; c++) yr[c] += b[c], o[c] = MPAR__HK_TANHF(yr[c]);
    }
}

/* mpar_bias_grad(dy, rows, cols, db): "BiiB". Global size cols; column c
   sums rows 0..rows-1 in order from 0.0f, then db[c] += s. */
static void mpar__hk_bias_grad(const mpar__harg* a, size_t g0, size_t g1) {
    const float* dy = (const float*)a[0].p;
    int rows = a[1].i, cols = a[2].i;
    float* db = (float*)a[3].p;
    size_t n = mpar__hk_count(g0, cols), c0, c;
    float s[MPAR__HK_COLS];
    int r;
    (void)g1;
    for (c0 = 0; c0 < n; c0 += MPAR__HK_COLS) {
        size_t m = n - c0 < MPAR__HK_COLS ? n - c0 : MPAR__HK_COLS;
        for (c = 0; c < m; c++) s[c] = 0.0f;
        for (r = 0; r < rows; r++) {
            const float* row = dy + (size_t)r * (size_t)cols + c0;
            for (c = 0; c < m; c++) s[c] += row[c];
        }
        for (c = 0; c < m; c++) db[c0 + c] += s[c];
    }
}

/* ===================== embedding.cl ===================== */

/* mpar_embedding_fwd(tokens, wte, wpe, out, rows, T, C, V): "BBBBiiii".
   Item i = row*C + c; a token outside [0, V) gives just the wpe row. */
static void mpar__hk_embedding_fwd(const mpar__harg* a, size_t g0, size_t g1) {
    const int32_t* tokens = (const int32_t*)a[0].p;
    const float* wte = (const float*)a[1].p;
    const float* wpe = (const float*)a[2].p;
    float* out = (float*)a[3].p;
    int rows = a[4].i, T = a[5].i, C = a[6].i, V = a[7].i;
    size_t n, base, c;
    int row;
    (void)g1;
    if (rows <= 0 || C <= 0 || T <= 0) return;
    n = mpar__hk_countz(g0, (size_t)rows * (size_t)C);
    for (row = 0, base = 0; base < n; row++, base += (size_t)C) {
        size_t m = n - base < (size_t)C ? n - base : (size_t)C;
        int tok = tokens[row];
        const float* pe = wpe + (size_t)(row % T) * (size_t)C;
        float* o = out + base;
        if (tok >= 0 && tok < V) {
            const float* te = wte + (size_t)tok * (size_t)C;
            for (c = 0; c < m; c++) o[c] = te[c] + pe[c];
        } else {
            for (c = 0; c < m; c++) o[c] = pe[c];
        }
    }
}

/* mpar_embedding_bwd_wte(tokens, dout, dwte, rows, C, V): "BBBiii".
   Item (v, c) sums dout[row, c] over rows with tokens[row] == v, ascending,
   and adds only if some row matched (rows of an unused token stay untouched,
   even -0.0f). The host scans the tokens once per (v, column block) instead
   of once per element; each sum keeps its order. */
static void mpar__hk_embedding_bwd_wte(const mpar__harg* a, size_t g0, size_t g1) {
    const int32_t* tokens = (const int32_t*)a[0].p;
    const float* dout = (const float*)a[1].p;
    float* dwte = (float*)a[2].p;
    int rows = a[3].i, C = a[4].i, V = a[5].i;
    size_t n, base, c0, c;
    float s[MPAR__HK_COLS];
    int v, row, hit;
    (void)g1;
    if (C <= 0 || V <= 0) return;
    n = mpar__hk_countz(g0, (size_t)V * (size_t)C);
    for (v = 0, base = 0; base < n; v++, base += (size_t)C) {
        size_t mv = n - base < (size_t)C ? n - base : (size_t)C;
        for (c0 = 0; c0 < mv; c0 += MPAR__HK_COLS) {
            size_t m = mv - c0 < MPAR__HK_COLS ? mv - c0 : MPAR__HK_COLS;
            for (c = 0; c < m; c++) s[c] = 0.0f;
            hit = 0;
            for (row = 0; row < rows; row++) {
                if (tokens[row] == v) {
                    const float* d = dout + (size_t)row * (size_t)C + c0;
                    for (c = 0; c < m; c++) s[c] += d[c];
                    hit = 1;
                }
            }
            if (hit)
                for (c = 0; c < m; c++) dwte[base + c0 + c] += s[c];
        }
    }
}

/* mpar_embedding_bwd_wpe(dout, dwpe, rows, T, C): "BBiii".
   Item (t, c): dwpe[t, c] += sum of dout[row, c], row = t, t+T, ... < rows. */
static void mpar__hk_embedding_bwd_wpe(const mpar__harg* a, size_t g0, size_t g1) {
    const float* dout = (const float*)a[0].p;
    float* dwpe = (float*)a[1].p;
    int rows = a[2].i, T = a[3].i, C = a[4].i;
    size_t n, base, c0, c;
    float s[MPAR__HK_COLS];
    int t, row;
    (void)g1;
    if (T <= 0 || C <= 0) return;
    n = mpar__hk_countz(g0, (size_t)T * (size_t)C);
    for (t = 0, base = 0; base < n; t++, base += (size_t)C) {
        size_t mt = n - base < (size_t)C ? n - base : (size_t)C;
        for (c0 = 0; c0 < mt; c0 += MPAR__HK_COLS) {
            size_t m = mt - c0 < MPAR__HK_COLS ? mt - c0 : MPAR__HK_COLS;
            for (c = 0; c < m; c++) s[c] = 0.0f;
            for (row = t; row < rows; row += T) {
                const float* d = dout + (size_t)row * (size_t)C + c0;
                for (c = 0; c < m; c++) s[c] += d[c];
            }
            for (c = 0; c < m; c++) dwpe[base + c0 + c] += s[c];
        }
    }
}

/* ===================== layernorm.cl ===================== */

/* mpar_layernorm_fwd(x, gamma, beta, y, mean, rstd, rows, cols, eps):
   "BBBBBBiif". One item per row; the shifted two-pass mean/variance of the
   kernel, same order. sqrtf is correctly rounded; the device's sqrt may be
   too (it is allowed up to 3 ulp). y may alias x: each yr[c] is written
   after its xr[c] is read, as in the kernel. */
static void mpar__hk_layernorm_fwd(const mpar__harg* a, size_t g0, size_t g1) {
    const float* x = (const float*)a[0].p;
    const float* gamma = (const float*)a[1].p;
    const float* beta = (const float*)a[2].p;
    float* y = (float*)a[3].p;
    float* mean = (float*)a[4].p;
    float* rstd = (float*)a[5].p;
    int cols = a[7].i;
    float eps = a[8].f;
    size_t n = mpar__hk_count(g0, a[6].i), r;
    int c;
    (void)g1;
    for (r = 0; r < n; r++) {
        const float* xr = x + r * (size_t)cols;
        float* yr = y + r * (size_t)cols;
        float k = xr[0]; /* the kernel reads x[0] even when cols <= 0 */
        float s = 0.0f, ms, m, v = 0.0f, rs;
        for (c = 0; c < cols; c++) s += xr[c] - k;
        ms = s / (float)cols;
        m = k + ms;
        for (c = 0; c < cols; c++) {
            float d = (xr[c] - k) - ms;
            v = MPAR__HK_MAD(d, d, v);
        }
        rs = 1.0f / sqrtf(v / (float)cols + eps);
        for (c = 0; c < cols; c++) yr[c] = MPAR__HK_MAD((xr[c] - m) * rs, gamma[c], beta[c]);
        mean[r] = m;
        rstd[r] = rs;
    }
}

/* mpar_layernorm_bwd_input(dy, x, mean, rstd, gamma, dx, rows, cols):
   "BBBBBBii". One item per row (overwrite). */
static void mpar__hk_layernorm_bwd_input(const mpar__harg* a, size_t g0, size_t g1) {
    const float* dy = (const float*)a[0].p;
    const float* x = (const float*)a[1].p;
    const float* mean = (const float*)a[2].p;
    const float* rstd = (const float*)a[3].p;
    const float* gamma = (const float*)a[4].p;
    float* dx = (float*)a[5].p;
    int cols = a[7].i;
    size_t n = mpar__hk_count(g0, a[6].i), r;
    int c;
    (void)g1;
    for (r = 0; r < n; r++) {
        const float* xr = x + r * (size_t)cols;
        const float* dyr = dy + r * (size_t)cols;
        float* dxr = dx + r * (size_t)cols;
        float m = mean[r], rs = rstd[r];
        float sg = 0.0f, sgx = 0.0f;
        for (c = 0; c < cols; c++) {
            float g = dyr[c] * gamma[c];
            sg += g;
            sgx = MPAR__HK_MAD(g, (xr[c] - m) * rs, sgx);
        }
        sg /= (float)cols;
        sgx /= (float)cols;
        for (c = 0; c < cols; c++) {
            float g = dyr[c] * gamma[c];
            float xh = (xr[c] - m) * rs;
            dxr[c] = rs * MPAR__HK_MAD(-xh, sgx, g - sg);
        }
    }
}

/* mpar_layernorm_bwd_weight(dy, x, mean, rstd, dgamma, dbeta, rows, cols):
   "BBBBBBii". Global size cols; column c sums rows in order (accumulate). */
static void mpar__hk_layernorm_bwd_weight(const mpar__harg* a, size_t g0, size_t g1) {
    const float* dy = (const float*)a[0].p;
    const float* x = (const float*)a[1].p;
    const float* mean = (const float*)a[2].p;
    const float* rstd = (const float*)a[3].p;
    float* dgamma = (float*)a[4].p;
    float* dbeta = (float*)a[5].p;
    int rows = a[6].i, cols = a[7].i;
    size_t n = mpar__hk_count(g0, cols), c0, c;
    float sg[MPAR__HK_COLS], sb[MPAR__HK_COLS];
    int r;
    (void)g1;
    for (c0 = 0; c0 < n; c0 += MPAR__HK_COLS) {
        size_t m = n - c0 < MPAR__HK_COLS ? n - c0 : MPAR__HK_COLS;
        for (c = 0; c < m; c++) sg[c] = sb[c] = 0.0f;
        for (r = 0; r < rows; r++) {
            const float* dyr = dy + (size_t)r * (size_t)cols + c0;
            const float* xr = x + (size_t)r * (size_t)cols + c0;
            float mr = mean[r], rs = rstd[r];
            for (c = 0; c < m; c++) {
                float d = dyr[c];
                float xh = (xr[c] - mr) * rs;
                sg[c] = MPAR__HK_MAD(d, xh, sg[c]);
                sb[c] += d;
            }
        }
        for (c = 0; c < m; c++) {
            dgamma[c0 + c] += sg[c];
            dbeta[c0 + c] += sb[c];
        }
    }
}

/* ===================== loss.cl ===================== */

/* mpar_xent_fwd(logits, targets, loss, rows, classes): "BBBii".
   One item per row; a target outside [0, classes) gives loss 0 and reads
   nothing. fmaxf = OpenCL fmax (NaN-ignoring); expf/logf may differ from the
   device's exp/log in the last bits. */
static void mpar__hk_xent_fwd(const mpar__harg* a, size_t g0, size_t g1) {
    const float* logits = (const float*)a[0].p;
    const int32_t* targets = (const int32_t*)a[1].p;
    float* loss = (float*)a[2].p;
    int classes = a[4].i;
    size_t n = mpar__hk_count(g0, a[3].i), r;
    int c;
    (void)g1;
    for (r = 0; r < n; r++) {
        int t = targets[r];
        const float* l = logits + r * (size_t)classes;
        float mx, s = 0.0f;
        if (t < 0 || t >= classes) {
            loss[r] = 0.0f;
            continue;
        }
        mx = l[0];
        for (c = 1; c < classes; c++) mx = fmaxf(mx, l[c]);
        for (c = 0; c < classes; c++) s += MPAR__HK_EXPF(l[c] - mx);
        loss[r] = (mx - l[t]) + MPAR__HK_LOGF(s);
    }
}

/* mpar_xent_bwd(logits, targets, dlogits, rows, classes, scale): "BBBiif".
   One item per row (overwrite). dlogits may alias logits: the last loop
   reads l[c] before writing d[c], as in the kernel. */
static void mpar__hk_xent_bwd(const mpar__harg* a, size_t g0, size_t g1) {
    const float* logits = (const float*)a[0].p;
    const int32_t* targets = (const int32_t*)a[1].p;
    float* dlogits = (float*)a[2].p;
    int classes = a[4].i;
    float scale = a[5].f;
    size_t n = mpar__hk_count(g0, a[3].i), r;
    int c;
    (void)g1;
    for (r = 0; r < n; r++) {
        int t = targets[r];
        const float* l = logits + r * (size_t)classes;
        float* d = dlogits + r * (size_t)classes;
        float mx, s = 0.0f, inv;
        if (t < 0 || t >= classes) {
            for (c = 0; c < classes; c++) d[c] = 0.0f;
            continue;
        }
        mx = l[0];
        for (c = 1; c < classes; c++) mx = fmaxf(mx, l[c]);
        for (c = 0; c < classes; c++) s += MPAR__HK_EXPF(l[c] - mx);
        inv = 1.0f / s;
        for (c = 0; c < classes; c++) {
            float p = MPAR__HK_EXPF(l[c] - mx) * inv;
            d[c] = (p - (c == t ? 1.0f : 0.0f)) * scale;
        }
    }
}

/* Sequential sum (mpar_loss_sum): only work-item
   0 does anything, so any g0 >= 1 gives one sum, and g0 == 0 none. */
static void mpar__hk_sum1(const mpar__harg* a, size_t g0) {
    const float* x = (const float*)a[0].p;
    size_t n = a[1].z, i;
    float* out = (float*)a[2].p;
    float s = 0.0f;
    if (g0 == 0) return;
    for (i = 0; i < n; i++) s += x[i];
    out[0] = s;
}

/* mpar_mse_fwd / mpar_l1_fwd(x, t, loss, rows, width): "BBBii". One item
   per row; each square its own statement, as in the kernel. */
static void mpar__hk_regress_fwd(const mpar__harg* a, size_t g0, int l1) {
    const float* x = (const float*)a[0].p;
    const float* t = (const float*)a[1].p;
    float* loss = (float*)a[2].p;
    int width = a[4].i, c;
    size_t n = mpar__hk_count(g0, a[3].i), r;
    for (r = 0; r < n; r++) {
        const float *u = x + r * (size_t)width, *v = t + r * (size_t)width;
        float s = 0.0f;
        for (c = 0; c < width; c++) {
            float d = u[c] - v[c];
            if (l1) {
                s += fabsf(d);
            } else {
                float q = d * d;
                s += q;
            }
        }
        loss[r] = s / (float)width;
    }
}
static void mpar__hk_mse_fwd(const mpar__harg* a, size_t g0, size_t g1) {
    (void)g1;
    mpar__hk_regress_fwd(a, g0, 0);
}
static void mpar__hk_l1_fwd(const mpar__harg* a, size_t g0, size_t g1) {
    (void)g1;
    mpar__hk_regress_fwd(a, g0, 1);
}

/* mpar_mse_bwd / mpar_l1_bwd(x, t, dx, n, k): "BBBlf". One item per value
   (dx may alias x). */
static void mpar__hk_mse_bwd(const mpar__harg* a, size_t g0, size_t g1) {
    const float* x = (const float*)a[0].p;
    const float* t = (const float*)a[1].p;
    float* dx = (float*)a[2].p;
    size_t n = mpar__hk_countz(g0, a[3].z), i;
    float k = a[4].f;
    (void)g1;
    for (i = 0; i < n; i++) {
        float d = x[i] - t[i];
        dx[i] = d * k;
    }
}
static void mpar__hk_l1_bwd(const mpar__harg* a, size_t g0, size_t g1) {
    const float* x = (const float*)a[0].p;
    const float* t = (const float*)a[1].p;
    float* dx = (float*)a[2].p;
    size_t n = mpar__hk_countz(g0, a[3].z), i;
    float k = a[4].f;
    (void)g1;
    for (i = 0; i < n; i++) {
        float d = x[i] - t[i];
        dx[i] = d > 0.0f ? k : d < 0.0f ? -k : 0.0f;
    }
}

/* mpar_loss_sum(x, n, out): "BlB". Global size 1. */
static void mpar__hk_loss_sum(const mpar__harg* a, size_t g0, size_t g1) {
    (void)g1;
    mpar__hk_sum1(a, g0);
}

/* ===================== optimizer.cl ===================== */

/* mpar_sgd_step(p, g, v, n, lr, momentum, weight_decay, grad_scale):
   "BBBlffff" */
static void mpar__hk_sgd_step(const mpar__harg* a, size_t g0, size_t g1) {
    float* p = (float*)a[0].p;
    const float* g = (const float*)a[1].p;
    float* v = (float*)a[2].p;
    size_t n = mpar__hk_countz(g0, a[3].z), i;
    float lr = a[4].f, momentum = a[5].f, wd = a[6].f, gs = a[7].f;
    (void)g1;
    if (wd != 0.0f) {
        for (i = 0; i < n; i++) {
            float w = p[i];
            float gr = gs * g[i];
            float vel;
            gr = MPAR__HK_MAD(wd, w, gr);
            vel = MPAR__HK_MAD(momentum, v[i], gr);
            v[i] = vel;
            p[i] = MPAR__HK_MAD(-lr, vel, w);
        }
    } else {
        for (i = 0; i < n; i++) {
            float w = p[i];
            float gr = gs * g[i];
            float vel = MPAR__HK_MAD(momentum, v[i], gr);
            v[i] = vel;
            p[i] = MPAR__HK_MAD(-lr, vel, w);
        }
    }
}

/* mpar_adamw_step(p, g, m, v, n, lr, beta1, beta2, eps, weight_decay, c1,
   c2, grad_scale): "BBBBlffffffff". 1 - beta1 and 1 - beta2 are float
   expressions of kernel arguments, the same on every item: hoisted. */
static void mpar__hk_adamw_step(const mpar__harg* a, size_t g0, size_t g1) {
    float* p = (float*)a[0].p;
    const float* g = (const float*)a[1].p;
    float* m = (float*)a[2].p;
    float* v = (float*)a[3].p;
    size_t n = mpar__hk_countz(g0, a[4].z), i;
    float lr = a[5].f, beta1 = a[6].f, beta2 = a[7].f, eps = a[8].f, wd = a[9].f;
    float c1 = a[10].f, c2 = a[11].f, gs = a[12].f;
    float omb1 = 1.0f - beta1, omb2 = 1.0f - beta2;
    (void)g1;
    for (i = 0; i < n; i++) {
        float w = p[i];
        float gr = gs * g[i];
        float mm = MPAR__HK_MAD(beta1, m[i], omb1 * gr); /* left product fused */
        float vv = MPAR__HK_MAD(beta2, v[i], omb2 * gr * gr);
        float upd;
        m[i] = mm;
        v[i] = vv;
        upd = MPAR__HK_MAD(wd, w, (mm / c1) / (sqrtf(vv / c2) + eps));
        p[i] = MPAR__HK_MAD(-lr, upd, w);
    }
}

/* ===================== attention.cl ===================== */

/* mpar_attn_fwd(qkv, out, P, B, T, C, H): "BBBiiii". One item per query row,
   gid = (b*H + h)*T + i; the P row is the softmax scratch, as in the kernel
   (scores, then exponentials, then probabilities; masked tail set to 0). */
static void mpar__hk_attn_fwd(const mpar__harg* a, size_t g0, size_t g1) {
    const float* qkv = (const float*)a[0].p;
    float* out = (float*)a[1].p;
    float* P = (float*)a[2].p;
    int B = a[3].i, T = a[4].i, C = a[5].i, H = a[6].i;
    int D;
    size_t C3, gid, n;
    float sc;
    (void)g1;
    if (B <= 0 || T <= 0 || H <= 0) return;
    n = mpar__hk_countz(g0, (size_t)B * (size_t)H * (size_t)T);
    D = C / H;
    C3 = 3 * (size_t)C;
    sc = 1.0f / sqrtf((float)D);
    for (gid = 0; gid < n; gid++) {
        int i = (int)(gid % (size_t)T), h = (int)(gid / (size_t)T % (size_t)H), j, d; /* < T, < H */
        size_t b = gid / ((size_t)T * (size_t)H), hd = (size_t)h * (size_t)D;
        const float* q = qkv + (b * (size_t)T + (size_t)i) * C3 + hd;
        const float* kbase = qkv + b * (size_t)T * C3 + (size_t)C + hd;
        const float* vbase = qkv + b * (size_t)T * C3 + 2 * (size_t)C + hd;
        float* p = P + gid * (size_t)T;
        float* o = out + (b * (size_t)T + (size_t)i) * (size_t)C + hd;
        float mx = -INFINITY, sum = 0.0f, inv;
        for (j = 0; j <= i; j++) {
            const float* k = kbase + (size_t)j * C3;
            float dot = 0.0f;
            for (d = 0; d < D; d++) dot = MPAR__HK_MAD(q[d], k[d], dot);
            dot *= sc;
            p[j] = dot;
            mx = fmaxf(mx, dot);
        }
        for (j = 0; j <= i; j++) {
            float e = MPAR__HK_EXPF(p[j] - mx);
            p[j] = e;
            sum += e;
        }
        inv = 1.0f / sum;
        for (j = 0; j <= i; j++) p[j] *= inv;
        for (j = i + 1; j < T; j++) p[j] = 0.0f;
        for (d = 0; d < D; d++) {
            float acc = 0.0f;
            for (j = 0; j <= i; j++) acc = MPAR__HK_MAD(p[j], vbase[(size_t)j * C3 + (size_t)d], acc);
            o[d] = acc;
        }
    }
}

/* mpar_attn_bwd_ds(dout, qkv, P, dS, B, T, C, H): "BBBBiiii". One item per
   row gid = (b*H + h)*T + i; the dS row first holds dP, then dS. */
static void mpar__hk_attn_bwd_ds(const mpar__harg* a, size_t g0, size_t g1) {
    const float* dout = (const float*)a[0].p;
    const float* qkv = (const float*)a[1].p;
    const float* P = (const float*)a[2].p;
    float* dS = (float*)a[3].p;
    int B = a[4].i, T = a[5].i, C = a[6].i, H = a[7].i;
    int D;
    size_t C3, gid, n;
    (void)g1;
    if (B <= 0 || T <= 0 || H <= 0) return;
    n = mpar__hk_countz(g0, (size_t)B * (size_t)H * (size_t)T);
    D = C / H;
    C3 = 3 * (size_t)C;
    for (gid = 0; gid < n; gid++) {
        int i = (int)(gid % (size_t)T), h = (int)(gid / (size_t)T % (size_t)H), j, d; /* < T, < H */
        size_t b = gid / ((size_t)T * (size_t)H), hd = (size_t)h * (size_t)D;
        const float* go = dout + (b * (size_t)T + (size_t)i) * (size_t)C + hd;
        const float* vbase = qkv + b * (size_t)T * C3 + 2 * (size_t)C + hd;
        const float* p = P + gid * (size_t)T;
        float* ds = dS + gid * (size_t)T;
        float rowdot = 0.0f;
        for (j = 0; j <= i; j++) {
            const float* v = vbase + (size_t)j * C3;
            float dp = 0.0f;
            for (d = 0; d < D; d++) dp = MPAR__HK_MAD(go[d], v[d], dp);
            ds[j] = dp;
            rowdot = MPAR__HK_MAD(dp, p[j], rowdot);
        }
        for (j = 0; j <= i; j++) ds[j] = p[j] * (ds[j] - rowdot);
        for (j = i + 1; j < T; j++) ds[j] = 0.0f;
    }
}

/* mpar_attn_bwd_qkv(dout, qkv, P, dS, dqkv, B, T, C, H): "BBBBBiiii".
   One item per element of dqkv, gid = (b*T + t)*3C + part*C + h*D + d. */
static void mpar__hk_attn_bwd_qkv(const mpar__harg* a, size_t g0, size_t g1) {
    const float* dout = (const float*)a[0].p;
    const float* qkv = (const float*)a[1].p;
    const float* P = (const float*)a[2].p;
    const float* dS = (const float*)a[3].p;
    float* dqkv = (float*)a[4].p;
    int B = a[5].i, T = a[6].i, C = a[7].i, H = a[8].i;
    int D;
    size_t C3, TC3, gid, n;
    float sc;
    (void)g1;
    if (B <= 0 || T <= 0 || C <= 0 || H <= 0) return;
    C3 = 3 * (size_t)C;
    TC3 = (size_t)T * C3;
    n = mpar__hk_countz(g0, (size_t)B * TC3);
    D = C / H;
    sc = 1.0f / sqrtf((float)D);
    for (gid = 0; gid < n; gid++) {
        size_t b = gid / TC3, rem = gid % TC3;
        int t = (int)(rem / C3), col = (int)(rem % C3); /* < T, < 3C */
        int part = col / C, hc = col % C;
        int h = hc / D, d = hc % D, j;
        size_t bh = (b * (size_t)H + (size_t)h) * (size_t)T * (size_t)T, hdd = (size_t)h * (size_t)D + (size_t)d;
        const float* xb = qkv + b * TC3 + hdd;
        float acc = 0.0f;
        if (part == 0) {
            const float* ds = dS + bh + (size_t)t * (size_t)T;
            for (j = 0; j <= t; j++) acc = MPAR__HK_MAD(ds[j], xb[(size_t)j * C3 + (size_t)C], acc);
            acc *= sc;
        } else if (part == 1) {
            const float* ds = dS + bh + (size_t)t;
            for (j = t; j < T; j++) acc = MPAR__HK_MAD(ds[(size_t)j * (size_t)T], xb[(size_t)j * C3], acc);
            acc *= sc;
        } else {
            const float* p = P + bh + (size_t)t;
            const float* go = dout + b * (size_t)T * (size_t)C + hdd;
            for (j = t; j < T; j++) acc = MPAR__HK_MAD(p[(size_t)j * (size_t)T], go[(size_t)j * (size_t)C], acc);
        }
        dqkv[gid] = acc;
    }
}

/* optimizer.cl: mpar_sumsq_layers_partial ("BBiB"): the chunks of every
   layer of a stage, each summed in element order. */
static void mpar__hk_sumsq_layers_partial(const mpar__harg* a, size_t g0, size_t g1) {
    const float* g = (const float*)a[0].p;
    const uint64_t* seg = (const uint64_t*)a[1].p; /* cl_ulong table */
    int layers = a[2].i, j;
    const uint64_t* first = seg + layers + 1;
    float* partial = (float*)a[3].p;
    uint64_t k;
    (void)g1;
    for (j = 0; j < layers; j++)
        for (k = first[j]; k < first[j + 1] && k < (uint64_t)g0; k++) {
            uint64_t begin = seg[j] + (k - first[j]) * 4096, end = begin + 4096 < seg[j + 1] ? begin + 4096 : seg[j + 1];
            uint64_t i;
            float s = 0.0f;
            for (i = begin; i < end; i++) {
                float x = g[i];
                s = MPAR__HK_MAD(x, x, s);
            }
            partial[k] = s;
        }
}
/* optimizer.cl: mpar_sumsq_layers_final ("BBiB"): each layer's chunks in order. */
static void mpar__hk_sumsq_layers_final(const mpar__harg* a, size_t g0, size_t g1) {
    const float* partial = (const float*)a[0].p;
    const uint64_t* first = (const uint64_t*)a[1].p + a[2].i + 1; /* cl_ulong table */
    float* out = (float*)a[3].p;
    uint64_t k;
    int j;
    (void)g1;
    for (j = 0; j < a[2].i && (size_t)j < g0; j++) {
        float s = 0.0f;
        for (k = first[j]; k < first[j + 1]; k++) s += partial[k];
        out[j] = s;
    }
}

/* ===================== generate.cl ===================== */

/* mpar_embed_at(tokens, pos, wte, wpe, out, rows, T, C, V): "BBBBBiiii".
   Item i = row*C + c; a position outside [0, T) skips the row. */
static void mpar__hk_embed_at(const mpar__harg* a, size_t g0, size_t g1) {
    const int32_t* tokens = (const int32_t*)a[0].p;
    const int32_t* pos = (const int32_t*)a[1].p;
    const float* wte = (const float*)a[2].p;
    const float* wpe = (const float*)a[3].p;
    float* out = (float*)a[4].p;
    int rows = a[5].i, T = a[6].i, C = a[7].i, V = a[8].i;
    size_t n, base, c;
    int row;
    (void)g1;
    if (rows <= 0 || C <= 0 || T <= 0) return;
    n = mpar__hk_countz(g0, (size_t)rows * (size_t)C);
    for (row = 0, base = 0; base < n; row++, base += (size_t)C) {
        size_t m = n - base < (size_t)C ? n - base : (size_t)C;
        int tok = tokens[row], t = pos[row];
        const float* pe;
        float* o = out + base;
        if (t < 0 || t >= T) continue;
        pe = wpe + (size_t)t * (size_t)C;
        if (tok >= 0 && tok < V) {
            const float* te = wte + (size_t)tok * (size_t)C;
            for (c = 0; c < m; c++) o[c] = te[c] + pe[c];
        } else {
            for (c = 0; c < m; c++) o[c] = pe[c];
        }
    }
}

/* mpar_kv_store(qkv, slot, pos, kc, vc, rows, C, S, L): "BBBBBiiii".
   Item gid = r*2C + col; a row out of range is skipped. */
static void mpar__hk_kv_store(const mpar__harg* a, size_t g0, size_t g1) {
    const float* qkv = (const float*)a[0].p;
    const int32_t* slot = (const int32_t*)a[1].p;
    const int32_t* pos = (const int32_t*)a[2].p;
    float* kc = (float*)a[3].p;
    float* vc = (float*)a[4].p;
    int rows = a[5].i, C = a[6].i, S = a[7].i, L = a[8].i;
    size_t n, base, c2, col;
    int row;
    (void)g1;
    if (rows <= 0 || C <= 0) return;
    c2 = 2 * (size_t)C;
    n = mpar__hk_countz(g0, (size_t)rows * c2);
    for (row = 0, base = 0; base < n; row++, base += c2) {
        size_t m = n - base < c2 ? n - base : c2;
        int s = slot[row], t = pos[row];
        const float* src = qkv + (size_t)row * 3 * (size_t)C + (size_t)C;
        size_t dst = ((size_t)s * (size_t)L + (size_t)t) * (size_t)C;
        if (s < 0 || s >= S || t < 0 || t >= L) continue;
        for (col = 0; col < m; col++) {
            if (col < (size_t)C) kc[dst + col] = src[col];
            else vc[dst + col - (size_t)C] = src[col];
        }
    }
}

/* mpar_attn_cached(qkv, slot, pos, kc, vc, out, P, rows, C, H, S, L):
   "BBBBBBBiiiii". One item per (row, head), gid = r*H + h: mpar_attn_fwd's
   arithmetic for one query row, keys and values from the cache. */
static void mpar__hk_attn_cached(const mpar__harg* a, size_t g0, size_t g1) {
    const float* qkv = (const float*)a[0].p;
    const int32_t* slot = (const int32_t*)a[1].p;
    const int32_t* pos = (const int32_t*)a[2].p;
    const float* kc = (const float*)a[3].p;
    const float* vc = (const float*)a[4].p;
    float* out = (float*)a[5].p;
    float* P = (float*)a[6].p;
    int rows = a[7].i, C = a[8].i, H = a[9].i, S = a[10].i, L = a[11].i;
    int D;
    size_t C3, gid, n;
    float sc;
    (void)g1;
    if (rows <= 0 || H <= 0 || C <= 0) return;
    n = mpar__hk_countz(g0, (size_t)rows * (size_t)H);
    D = C / H;
    C3 = 3 * (size_t)C;
    sc = 1.0f / sqrtf((float)D);
    for (gid = 0; gid < n; gid++) {
        size_t row = gid / (size_t)H, hd;
        int h = (int)(gid % (size_t)H), s = slot[row], i = pos[row], j, d;
        const float *q, *kbase, *vbase;
        float *p, *o, mx = -INFINITY, sum = 0.0f, inv;
        if (s < 0 || s >= S || i < 0 || i >= L) continue;
        hd = (size_t)h * (size_t)D;
        q = qkv + row * C3 + hd;
        kbase = kc + (size_t)s * (size_t)L * (size_t)C + hd;
        vbase = vc + (size_t)s * (size_t)L * (size_t)C + hd;
        p = P + gid * (size_t)L;
        o = out + row * (size_t)C + hd;
        for (j = 0; j <= i; j++) {
            const float* k = kbase + (size_t)j * (size_t)C;
            float dot = 0.0f;
            for (d = 0; d < D; d++) dot = MPAR__HK_MAD(q[d], k[d], dot);
            dot *= sc;
            p[j] = dot;
            mx = fmaxf(mx, dot);
        }
        for (j = 0; j <= i; j++) {
            float ex = MPAR__HK_EXPF(p[j] - mx);
            p[j] = ex;
            sum += ex;
        }
        inv = 1.0f / sum;
        for (j = 0; j <= i; j++) p[j] *= inv;
        for (d = 0; d < D; d++) {
            float acc = 0.0f;
            for (j = 0; j <= i; j++) acc = MPAR__HK_MAD(p[j], vbase[(size_t)j * (size_t)C + (size_t)d], acc);
            o[d] = acc;
        }
    }
}

/* Lookup table: kernel file and name -> host function. */
static const struct mpar__host_kernel {
    const char* file;
    const char* name;
    mpar__host_fn fn;
} mpar__host_kernels[] = {
    {"elementwise.cl", "mpar_fill", mpar__hk_fill},
    {"elementwise.cl", "mpar_scale", mpar__hk_scale},
    {"elementwise.cl", "mpar_axpy", mpar__hk_axpy},
    {"elementwise.cl", "mpar_copy", mpar__hk_copy},
    {"elementwise.cl", "mpar_add", mpar__hk_add},
    {"elementwise.cl", "mpar_round_bf16", mpar__hk_round_bf16},
    {"elementwise.cl", "mpar_pack_bf16", mpar__hk_pack_bf16},
    {"elementwise.cl", "mpar_unpack_bf16", mpar__hk_unpack_bf16},
    {"elementwise.cl", "mpar_relu_fwd", mpar__hk_relu_fwd},
    {"elementwise.cl", "mpar_relu_bwd", mpar__hk_relu_bwd},
    {"elementwise.cl", "mpar_gelu_fwd", mpar__hk_gelu_fwd},
    {"elementwise.cl", "mpar_gelu_bwd", mpar__hk_gelu_bwd},
    {"elementwise.cl", "mpar_tanh_fwd", mpar__hk_tanh_fwd},
    {"elementwise.cl", "mpar_tanh_bwd", mpar__hk_tanh_bwd},
    {"elementwise.cl", "mpar_dropout_fwd", mpar__hk_dropout_fwd},
    {"elementwise.cl", "mpar_dropout_bwd", mpar__hk_dropout_bwd},
    {"elementwise.cl", "mpar_bias_add", mpar__hk_bias_add},
    {"elementwise.cl", "mpar_bias_add_act", mpar__hk_bias_add_act},
    {"elementwise.cl", "mpar_bias_grad", mpar__hk_bias_grad},
    {"embedding.cl", "mpar_embedding_fwd", mpar__hk_embedding_fwd},
    {"embedding.cl", "mpar_embedding_bwd_wte", mpar__hk_embedding_bwd_wte},
    {"embedding.cl", "mpar_embedding_bwd_wpe", mpar__hk_embedding_bwd_wpe},
    {"layernorm.cl", "mpar_layernorm_fwd", mpar__hk_layernorm_fwd},
    {"layernorm.cl", "mpar_layernorm_bwd_input", mpar__hk_layernorm_bwd_input},
    {"layernorm.cl", "mpar_layernorm_bwd_weight", mpar__hk_layernorm_bwd_weight},
    {"loss.cl", "mpar_xent_fwd", mpar__hk_xent_fwd},
    {"loss.cl", "mpar_xent_bwd", mpar__hk_xent_bwd},
    {"loss.cl", "mpar_loss_sum", mpar__hk_loss_sum},
    {"loss.cl", "mpar_mse_fwd", mpar__hk_mse_fwd},
    {"loss.cl", "mpar_mse_bwd", mpar__hk_mse_bwd},
    {"loss.cl", "mpar_l1_fwd", mpar__hk_l1_fwd},
    {"loss.cl", "mpar_l1_bwd", mpar__hk_l1_bwd},
    {"optimizer.cl", "mpar_sgd_step", mpar__hk_sgd_step},
    {"optimizer.cl", "mpar_adamw_step", mpar__hk_adamw_step},
    {"optimizer.cl", "mpar_sumsq_layers_partial", mpar__hk_sumsq_layers_partial},
    {"optimizer.cl", "mpar_sumsq_layers_final", mpar__hk_sumsq_layers_final},
    {"attention.cl", "mpar_attn_fwd", mpar__hk_attn_fwd},
    {"attention.cl", "mpar_attn_bwd_ds", mpar__hk_attn_bwd_ds},
    {"attention.cl", "mpar_attn_bwd_qkv", mpar__hk_attn_bwd_qkv},
    {"generate.cl", "mpar_embed_at", mpar__hk_embed_at},
    {"generate.cl", "mpar_kv_store", mpar__hk_kv_store},
    {"generate.cl", "mpar_attn_cached", mpar__hk_attn_cached},
};

static mpar__host_fn mpar__host_kernel(const char* file, const char* name) {
    size_t i;
    for (i = 0; i < sizeof mpar__host_kernels / sizeof mpar__host_kernels[0]; i++)
        if (!strcmp(mpar__host_kernels[i].name, name) && !strcmp(mpar__host_kernels[i].file, file))
            return mpar__host_kernels[i].fn;
    return NULL;
}

/* 'b' passes its offset as an int: one that does not fit fails, on both
   routes, instead of wrapping. */
static mpar_result mpar__int_off_fail(mpar_exec* ex, const char* kernel, int arg, size_t off) {
    return mpar__fail(ex->ctx, MPAR_ERROR_INVALID_ARGUMENT,
                      "mpar_exec_launch(%s): argument %d ('b') has offset %zu, above INT_MAX; pass it with 'B' "
                      "(ulong offset)", kernel, arg, off);
}

/* Decodes mpar_exec_launch's arguments for a host kernel into a[] (at most
   32): 'b', 'B' (buffer + offset) and 'm' (buffer) -> p, 'i' -> i, 'u' ->
   u, 'f' -> f, 'l' -> z. *ok = 0 (and MPAR_SUCCESS) when OpenCL must run
   the launch instead: a buffer that is not host memory, or a letter it does
   not know (OpenCL's path reports it). */
static mpar_result mpar__host_args(mpar_exec* ex, const char* kernel, const char* args, va_list ap, mpar__harg* a,
                                   int* ok) {
    const char* c;
    int n = 0;
    *ok = 0;
    for (c = args; *c; c++, n++) {
        if (*c == 'b' || *c == 'B' || *c == 'm') {
            mpar_buf b;
            unsigned char* h;
            if (*c == 'm') b.mem = va_arg(ap, cl_mem), b.off = 0;
            else b = va_arg(ap, mpar_buf);
            if (*c == 'b' && b.off > (size_t)INT_MAX) return mpar__int_off_fail(ex, kernel, n, b.off);
            if (!(h = mpar__exec_host_ptr(ex, b.mem))) return MPAR_SUCCESS;
            a[n].p = h + 4 * b.off;
        } else if (*c == 'i') a[n].i = va_arg(ap, int);
        else if (*c == 'u') a[n].u = va_arg(ap, unsigned int);
        else if (*c == 'f') a[n].f = (float)va_arg(ap, double);
        else if (*c == 'l') a[n].z = va_arg(ap, size_t);
        else return MPAR_SUCCESS;
    }
    *ok = 1;
    return MPAR_SUCCESS;
}

/* Runs a launch as host code when the stage takes the host route, the
   kernel has a host version and every buffer is host memory; *done tells
   whether it did (otherwise OpenCL runs it). */
static mpar_result mpar__exec_host_launch(mpar_exec* ex, const char* file, const char* kernel, size_t g0, size_t g1,
                                          const char* args, va_list ap, int* done) {
    mpar__harg a[32];
    mpar__host_fn fn;
    int ok;
    double t0;
    *done = 0;
    if (!ex->host_route || !(fn = mpar__host_kernel(file, kernel)) || strlen(args) > 32) return MPAR_SUCCESS;
    MPAR__TRY(mpar__host_args(ex, kernel, args, ap, a, &ok));
    if (!ok) return MPAR_SUCCESS;
    *done = 1;
    if (g0 == 0) return MPAR_SUCCESS;
    if (mpar__exec_fault(ex, MPAR__FAULT_ENQUEUE))
        return mpar__fail(ex->ctx, (mpar_result)CL_OUT_OF_RESOURCES, "%s (host route): injected enqueue fault", kernel);
    MPAR__TRY(mpar__exec_sync(ex));
    t0 = ex->profiling ? mpar__now() : 0.0;
    fn(a, g0, g1);
    mpar__exec_host_done(ex, t0);
    return MPAR_SUCCESS;
}

static cl_event* mpar__exec_event_slot(mpar_exec* ex) {
    if (!ex->profiling) return NULL;
    ex->ev_slot = NULL;
    return &ex->ev_slot;
}
static void mpar__exec_event_taken(mpar_exec* ex, cl_event* slot, int ok) {
    if (!slot || !ok || !*slot) return;
    if (!ex->ev_first) {
        ex->ev_first = *slot;
        return;
    }
    if (ex->ev_last) clReleaseEvent(ex->ev_last); /* between the first and the new one: bounded by them */
    ex->ev_last = *slot;
}

static mpar_result mpar__exec_kernel(mpar_exec* ex, const char* file, const char* name, cl_kernel* out) {
    int i;
    mpar_result r;
    for (i = 0; i < ex->kernel_count; i++)
        if (!strcmp(ex->kernels[i].name, name) && !strcmp(ex->kernels[i].file, file)) {
            *out = ex->kernels[i].kernel;
            return MPAR_SUCCESS;
        }
    if (ex->kernel_count == MPAR__EXEC_MAX_KERNELS)
        return mpar__fail(ex->ctx, MPAR_ERROR_UNSUPPORTED, "more than %d distinct kernels on one stage",
                          MPAR__EXEC_MAX_KERNELS);
    if (mpar__exec_fault(ex, MPAR__FAULT_BUILD))
        return mpar__fail(ex->ctx, MPAR_ERROR_KERNEL_BUILD, "kernel build failed: file '%s' on device %d: injected fault",
                          file, ex->device);
    r = mpar_kernel_create(ex->ctx, ex->device, file, name, out);
    if (r != MPAR_SUCCESS) return r;
    i = ex->kernel_count;
    ex->kernels[i].file = mpar__strdup(ex->ctx, file);
    ex->kernels[i].name = mpar__strdup(ex->ctx, name);
    ex->kernels[i].kernel = *out;
    if (!ex->kernels[i].file || !ex->kernels[i].name) {
        mpar__free(ex->ctx, ex->kernels[i].file);
        mpar__free(ex->ctx, ex->kernels[i].name);
        clReleaseKernel(*out);
        return mpar__fail(ex->ctx, MPAR_ERROR_OUT_OF_HOST_MEMORY, "out of host memory");
    }
    ex->kernel_count++;
    return MPAR_SUCCESS;
}

static void mpar__exec_release(mpar_exec* ex) {
    mpar__interval left;
    int i;
    mpar__exec_take(ex, &left);
    mpar__interval_release(&left);
    for (i = ex->kernel_count - 1; i >= 0; i--) {
        clReleaseKernel(ex->kernels[i].kernel);
        mpar__free(ex->ctx, ex->kernels[i].file);
        mpar__free(ex->ctx, ex->kernels[i].name);
    }
    ex->kernel_count = 0;
}

static mpar_result mpar__set_args(mpar_exec* ex, cl_kernel k, const char* kernel, const char* args, va_list ap) {
    cl_uint a = 0;
    const char* p;
    for (p = args; *p; p++) {
        cl_int st;
        if (*p == 'b') {
            mpar_buf b = va_arg(ap, mpar_buf);
            int off;
            if (b.off > (size_t)INT_MAX) return mpar__int_off_fail(ex, kernel, (int)(p - args), b.off);
            off = (int)b.off;
            st = clSetKernelArg(k, a++, sizeof(cl_mem), &b.mem);
            if (st == CL_SUCCESS) st = clSetKernelArg(k, a++, sizeof off, &off);
        } else if (*p == 'B') {
            mpar_buf b = va_arg(ap, mpar_buf);
            cl_ulong off = (cl_ulong)b.off;
            st = clSetKernelArg(k, a++, sizeof(cl_mem), &b.mem);
            if (st == CL_SUCCESS) st = clSetKernelArg(k, a++, sizeof off, &off);
        } else if (*p == 'l') {
            cl_ulong v = (cl_ulong)va_arg(ap, size_t);
            st = clSetKernelArg(k, a++, sizeof v, &v);
        } else if (*p == 'm') {
            cl_mem m = va_arg(ap, cl_mem);
            st = clSetKernelArg(k, a++, sizeof m, &m);
        } else if (*p == 'i') {
            int v = va_arg(ap, int);
            st = clSetKernelArg(k, a++, sizeof v, &v);
        } else if (*p == 'u') {
            cl_uint v = va_arg(ap, unsigned int);
            st = clSetKernelArg(k, a++, sizeof v, &v);
        } else if (*p == 'f') {
            float v = (float)va_arg(ap, double);
            st = clSetKernelArg(k, a++, sizeof v, &v);
        } else {
            return mpar__fail(ex->ctx, MPAR_ERROR_INVALID_ARGUMENT, "mpar_exec_launch(%s): unknown argument letter '%c'",
                              kernel, *p);
        }
        if (st != CL_SUCCESS)
            return mpar__fail(ex->ctx, (mpar_result)st, "clSetKernelArg(%s, argument %u) failed with %s", kernel,
                              a - 1, mpar_result_string((mpar_result)st));
    }
    return MPAR_SUCCESS;
}

MPARDEF mpar_result mpar_exec_launch(mpar_exec* ex, const char* file, const char* kernel, size_t global0,
                                     size_t global1, const char* args, ...) {
    cl_kernel k;
    va_list ap;
    size_t global[2];
    mpar_result r;
    cl_int st;
    cl_event* ev;
    if (!ex) return MPAR_ERROR_INVALID_ARGUMENT;
    if (!file || !kernel || !args)
        return mpar__fail(ex->ctx, MPAR_ERROR_INVALID_ARGUMENT, "mpar_exec_launch: file, kernel or args is NULL");
    if (ex->host_route) {
        int done;
        va_start(ap, args);
        r = mpar__exec_host_launch(ex, file, kernel, global0, global1, args, ap, &done);
        va_end(ap);
        if (done || r != MPAR_SUCCESS) return r;
    }
    r = mpar__exec_kernel(ex, file, kernel, &k);
    if (r != MPAR_SUCCESS) return r;
    va_start(ap, args);
    r = mpar__set_args(ex, k, kernel, args, ap);
    va_end(ap);
    if (r != MPAR_SUCCESS) return r;
    if (global0 == 0) return MPAR_SUCCESS; /* nothing to do; a zero 2nd dimension means 1-D */
    global[0] = global0;
    global[1] = global1;
    ev = mpar__exec_event_slot(ex);
    if (mpar__exec_fault(ex, MPAR__FAULT_ENQUEUE))
        return mpar__fail(ex->ctx, (mpar_result)CL_OUT_OF_RESOURCES, "clEnqueueNDRangeKernel(%s): injected enqueue fault",
                          kernel);
    st = clEnqueueNDRangeKernel(ex->queue, k, global1 ? 2u : 1u, NULL, global, NULL, 0, NULL, ev);
    mpar__exec_event_taken(ex, ev, st == CL_SUCCESS);
    ex->cl_pending = 1;
    ex->launches++, ex->cl_launches++;
    if (st != CL_SUCCESS)
        return mpar__fail(ex->ctx, (mpar_result)st, "clEnqueueNDRangeKernel(%s from %s, %zux%zu) failed with %s",
                          kernel, file, global0, global1, mpar_result_string((mpar_result)st));
    return MPAR_SUCCESS;
}

/* CLBlast keeps process-wide caches (parameter databases, programs) that
   its first call on a device fills. Before 1.6.1 (Debian 12 ships 1.5.2)
   two threads filling them at once corrupt them (measured here: ASan
   heap-use-after-free in clblast::Database, two pipelines' first GEMMs on
   two contexts; CLBlast issue #486) or make one call fail ("object already
   in cache"). So the first CLBlast call of every executor holds this lock,
   the one lock mpar shares across contexts, for that call only; a
   pipeline's later GEMMs never take it. (It stays allocated for the
   process: CLBlast's caches do too.) */
static pthread_mutex_t* mpar__clblast_fill_lock(void) {
    static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
    return &lock;
}

MPARDEF mpar_result mpar_exec_gemm(mpar_exec* ex, int trans_a, int trans_b, size_t m, size_t n, size_t k, float alpha,
                                   mpar_buf a, size_t lda, mpar_buf b, size_t ldb, float beta, mpar_buf c,
                                   size_t ldc) {
    CLBlastStatusCode st;
    cl_event* ev;
    if (!ex) return MPAR_ERROR_INVALID_ARGUMENT;
    if (m == 0 || n == 0) return MPAR_SUCCESS;
    if (k == 0) return mpar__fail(ex->ctx, MPAR_ERROR_INVALID_ARGUMENT, "mpar_exec_gemm: k is 0");
#ifdef MPAR_USE_CBLAS
    if (ex->host_route && m <= INT_MAX && n <= INT_MAX && k <= INT_MAX && lda <= INT_MAX && ldb <= INT_MAX &&
        ldc <= INT_MAX) {
        unsigned char *ha = mpar__exec_host_ptr(ex, a.mem), *hb = mpar__exec_host_ptr(ex, b.mem),
                      *hc = mpar__exec_host_ptr(ex, c.mem);
        if (ha && hb && hc) {
            double t0;
            if (mpar__exec_fault(ex, MPAR__FAULT_ENQUEUE))
                return mpar__fail(ex->ctx, (mpar_result)CL_OUT_OF_RESOURCES, "cblas_sgemm: injected enqueue fault");
            MPAR__TRY(mpar__exec_sync(ex));
            t0 = ex->profiling ? mpar__now() : 0.0;
            cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans, trans_b ? CblasTrans : CblasNoTrans, (int)m,
                        (int)n, (int)k, alpha, (const float*)(ha + 4 * a.off), (int)lda, (const float*)(hb + 4 * b.off),
                        (int)ldb, beta, (float*)(hc + 4 * c.off), (int)ldc);
            mpar__exec_host_done(ex, t0);
            return MPAR_SUCCESS;
        }
    }
#endif
    ev = mpar__exec_event_slot(ex);
    if (mpar__exec_fault(ex, MPAR__FAULT_ENQUEUE))
        return mpar__fail(ex->ctx, (mpar_result)CL_OUT_OF_RESOURCES, "CLBlastSgemm: injected enqueue fault");
    if (!ex->gemm_ready) pthread_mutex_lock(mpar__clblast_fill_lock());
    st = CLBlastSgemm(CLBlastLayoutRowMajor, trans_a ? CLBlastTransposeYes : CLBlastTransposeNo,
                      trans_b ? CLBlastTransposeYes : CLBlastTransposeNo, m, n, k, alpha, a.mem, a.off, lda, b.mem,
                      b.off, ldb, beta, c.mem, c.off, ldc, &ex->queue, ev);
    if (!ex->gemm_ready) {
        ex->gemm_ready = st == CLBlastSuccess;
        pthread_mutex_unlock(mpar__clblast_fill_lock());
    }
    mpar__exec_event_taken(ex, ev, st == CLBlastSuccess);
    ex->cl_pending = 1;
    ex->launches++, ex->cl_launches++;
    if (st != CLBlastSuccess)
        return mpar__fail(ex->ctx, (mpar_result)st, "CLBlastSgemm(%c%c, m=%zu n=%zu k=%zu) failed with %s (%d)",
                          trans_a ? 'T' : 'N', trans_b ? 'T' : 'N', m, n, k, mpar_result_string((mpar_result)st),
                          (int)st);
    return MPAR_SUCCESS;
}

MPARDEF mpar_context* mpar_exec_context(mpar_exec* ex) { return ex ? ex->ctx : NULL; }
MPARDEF cl_command_queue mpar_exec_queue(mpar_exec* ex) {
    if (!ex) return NULL;
    ex->cl_pending = 1; /* the caller may enqueue on it */
    return ex->queue;
}
MPARDEF float* mpar_exec_host(mpar_exec* ex, mpar_buf b) {
    unsigned char* h = ex ? mpar__exec_host_ptr(ex, b.mem) : NULL;
    if (!h || mpar__exec_sync(ex) != MPAR_SUCCESS) return NULL;
    return (float*)(h + 4 * b.off);
}
MPARDEF mpar_result mpar_exec_fail(mpar_exec* ex, mpar_result code, const char* message) {
    return ex ? mpar__fail(ex->ctx, code, "%s", message ? message : "layer failure") : code;
}

/* splitmix64: small, seedable, and the same on every platform. */
static uint64_t mpar__rng_next(uint64_t* s) {
    uint64_t z = (*s += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}
static double mpar__rng_uniform(uint64_t* s) { return (double)(mpar__rng_next(s) >> 11) * (1.0 / 9007199254740992.0); }
static float mpar__rng_normal(uint64_t* s, float stddev) {
    double u1 = mpar__rng_uniform(s), u2 = mpar__rng_uniform(s);
    if (u1 < 1e-300) u1 = 1e-300;
    return (float)(stddev * sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
}
static void mpar__fill_uniform(float* p, size_t n, float bound, uint64_t* s) {
    size_t i;
    for (i = 0; i < n; i++) p[i] = (float)((2.0 * mpar__rng_uniform(s) - 1.0) * bound);
}
static void mpar__fill_value(float* p, size_t n, float v) {
    size_t i;
    for (i = 0; i < n; i++) p[i] = v;
}

static mpar_buf mpar__at(mpar_buf b, size_t floats) {
    b.off += floats;
    return b;
}

/* ---- linear: y = x·W + b, W is [in × out] row-major ---- */
static mpar_result mpar__linear_setup(mpar_layer* l, mpar_error* err) {
    size_t in = (size_t)l->in_features, out;
    if (l->desc.units <= 0)
        return mpar_error_set(err, MPAR_ERROR_INVALID_MODEL, "layer %d (linear): units must be positive, got %d",
                              l->index, l->desc.units);
    out = (size_t)l->desc.units;
    l->out_features = l->desc.units;
    l->param_count = in * out + out;
    l->flops_forward = 2.0 * (double)(in * out) + (double)out;
    l->flops_backward_input = 2.0 * (double)(in * out);
    l->flops_backward_weight = 2.0 * (double)(in * out) + (double)out;
    return MPAR_SUCCESS;
}
static void mpar__linear_init(const mpar_layer* l, float* p, uint64_t* s) {
    /* PyTorch's default: U(-1/sqrt(in), 1/sqrt(in)) for weights and bias */
    mpar__fill_uniform(p, l->param_count, (float)(1.0 / sqrt((double)l->in_features)), s);
}
static mpar_result mpar__linear_forward(mpar_exec* ex, const mpar_layer* l, const mpar_io* io) {
    size_t in = (size_t)l->in_features, out = (size_t)l->out_features;
    MPAR__TRY(mpar_exec_gemm(ex, 0, 0, (size_t)io->rows, out, in, 1.0f, io->x, in, io->params, out, 0.0f, io->y, out));
    return mpar_exec_launch(ex, "elementwise.cl", "mpar_bias_add", (size_t)io->rows * out, 0, "BiiB", io->y, io->rows,
                            l->out_features, mpar__at(io->params, in * out));
}
/* The forward of a linear layer and the activation after it; act_out is
   the activation's output (see mpar__fused_activation). */
static mpar_result mpar__linear_forward_act(mpar_exec* ex, const mpar_layer* l, const mpar_io* io, mpar_buf act_out,
                                            int act) {
    size_t in = (size_t)l->in_features, out = (size_t)l->out_features;
    MPAR__TRY(mpar_exec_gemm(ex, 0, 0, (size_t)io->rows, out, in, 1.0f, io->x, in, io->params, out, 0.0f, io->y, out));
    return mpar_exec_launch(ex, "elementwise.cl", "mpar_bias_add_act", (size_t)io->rows * out, 0, "BiiBBi", io->y,
                            io->rows, l->out_features, mpar__at(io->params, in * out), act_out, act);
}
static mpar_result mpar__linear_backward_input(mpar_exec* ex, const mpar_layer* l, const mpar_io* io) {
    size_t in = (size_t)l->in_features, out = (size_t)l->out_features;
    if (!io->need_dx) return MPAR_SUCCESS;
    return mpar_exec_gemm(ex, 0, 1, (size_t)io->rows, in, out, 1.0f, io->dy, out, io->params, out, 0.0f, io->dx, in);
}
static mpar_result mpar__linear_backward_weight(mpar_exec* ex, const mpar_layer* l, const mpar_io* io) {
    size_t in = (size_t)l->in_features, out = (size_t)l->out_features;
    MPAR__TRY(mpar_exec_gemm(ex, 1, 0, in, out, (size_t)io->rows, 1.0f, io->x, in, io->dy, out, 1.0f, io->grads, out));
    return mpar_exec_launch(ex, "elementwise.cl", "mpar_bias_grad", out, 0, "BiiB", io->dy, io->rows, l->out_features,
                            mpar__at(io->grads, in * out));
}

/* ---- shape-preserving layers share a setup ---- */
static mpar_result mpar__same_shape_setup(mpar_layer* l, mpar_error* err) {
    if (l->desc.units != 0 && l->desc.units != l->in_features)
        return mpar_error_set(err, MPAR_ERROR_INVALID_MODEL,
                              "layer %d (%s): expects width %d but the previous layer gives %d", l->index,
                              l->type->name, l->desc.units, l->in_features);
    l->out_features = l->in_features;
    l->flops_forward = l->flops_backward_input = 4.0 * l->in_features;
    return MPAR_SUCCESS;
}
static mpar_result mpar__act_forward(mpar_exec* ex, const mpar_io* io, const mpar_layer* l, const char* kernel) {
    size_t n = (size_t)io->rows * (size_t)l->in_features;
    return mpar_exec_launch(ex, "elementwise.cl", kernel, n, 0, "BBl", io->x, io->y, n);
}
static mpar_result mpar__act_backward(mpar_exec* ex, const mpar_io* io, const mpar_layer* l, const char* kernel,
                                      mpar_buf saved) {
    size_t n = (size_t)io->rows * (size_t)l->in_features;
    if (!io->need_dx) return MPAR_SUCCESS;
    return mpar_exec_launch(ex, "elementwise.cl", kernel, n, 0, "BBBl", saved, io->dy, io->dx, n);
}
static mpar_result mpar__relu_fwd(mpar_exec* ex, const mpar_layer* l, const mpar_io* io) {
    return mpar__act_forward(ex, io, l, "mpar_relu_fwd");
}
static mpar_result mpar__relu_bwd(mpar_exec* ex, const mpar_layer* l, const mpar_io* io) {
    return mpar__act_backward(ex, io, l, "mpar_relu_bwd", io->x);
}
static mpar_result mpar__gelu_fwd(mpar_exec* ex, const mpar_layer* l, const mpar_io* io) {
    return mpar__act_forward(ex, io, l, "mpar_gelu_fwd");
}
static mpar_result mpar__gelu_bwd(mpar_exec* ex, const mpar_layer* l, const mpar_io* io) {
    return mpar__act_backward(ex, io, l, "mpar_gelu_bwd", io->x);
}
static mpar_result mpar__tanh_fwd(mpar_exec* ex, const mpar_layer* l, const mpar_io* io) {
    return mpar__act_forward(ex, io, l, "mpar_tanh_fwd");
}
static mpar_result mpar__tanh_bwd(mpar_exec* ex, const mpar_layer* l, const mpar_io* io) {
    return mpar__act_backward(ex, io, l, "mpar_tanh_bwd", io->y);
}

/* ---- dropout: the mask is a hash of (seed, element index in the batch),
   so it is the same however the batch is cut into micro-batches ---- */
static mpar_result mpar__dropout_setup(mpar_layer* l, mpar_error* err) {
    if (!(l->desc.rate >= 0.0f && l->desc.rate < 1.0f))
        return mpar_error_set(err, MPAR_ERROR_INVALID_MODEL, "layer %d (dropout): rate must be in [0, 1), got %g",
                              l->index, (double)l->desc.rate);
    return mpar__same_shape_setup(l, err);
}
static mpar_result mpar__dropout_run(mpar_exec* ex, const mpar_layer* l, const mpar_io* io, const char* kernel,
                                     mpar_buf in, mpar_buf out) {
    size_t n = (size_t)io->rows * (size_t)l->in_features;
    if (!io->training || l->desc.rate == 0.0f)
        return mpar_exec_launch(ex, "elementwise.cl", "mpar_copy", n, 0, "BBl", in, out, n);
    return mpar_exec_launch(ex, "elementwise.cl", kernel, n, 0, "BBlfuul", in, out, n, (double)l->desc.rate,
                            (unsigned)(io->seed & 0xffffffffu), (unsigned)(io->seed >> 32),
                            (size_t)io->row_offset * (size_t)l->in_features);
}
static mpar_result mpar__dropout_fwd(mpar_exec* ex, const mpar_layer* l, const mpar_io* io) {
    return mpar__dropout_run(ex, l, io, "mpar_dropout_fwd", io->x, io->y);
}
static mpar_result mpar__dropout_bwd(mpar_exec* ex, const mpar_layer* l, const mpar_io* io) {
    if (!io->need_dx) return MPAR_SUCCESS;
    return mpar__dropout_run(ex, l, io, "mpar_dropout_bwd", io->dy, io->dx);
}

/* ---- layer norm over the features of a row; stash: mean, rstd ---- */
static float mpar__eps(const mpar_layer* l) { return l->desc.eps > 0.0f ? l->desc.eps : 1e-5f; }
static mpar_result mpar__layernorm_setup(mpar_layer* l, mpar_error* err) {
    MPAR__TRY(mpar__same_shape_setup(l, err));
    l->param_count = 2 * (size_t)l->in_features;
    l->stash_per_row = 2;
    l->flops_forward = 8.0 * l->in_features;
    l->flops_backward_input = 10.0 * l->in_features;
    l->flops_backward_weight = 4.0 * l->in_features;
    return MPAR_SUCCESS;
}
static void mpar__layernorm_init(const mpar_layer* l, float* p, uint64_t* s) {
    (void)s;
    mpar__fill_value(p, (size_t)l->in_features, 1.0f);
    mpar__fill_value(p + l->in_features, (size_t)l->in_features, 0.0f);
}
static mpar_result mpar__ln_fwd(mpar_exec* ex, mpar_buf x, mpar_buf gb, mpar_buf y, mpar_buf stats, int rows, int cols,
                                float eps) {
    return mpar_exec_launch(ex, "layernorm.cl", "mpar_layernorm_fwd", (size_t)rows, 0, "BBBBBBiif", x, gb,
                            mpar__at(gb, (size_t)cols), y, stats, mpar__at(stats, (size_t)rows), rows, cols,
                            (double)eps);
}
static mpar_result mpar__ln_bwd_input(mpar_exec* ex, mpar_buf dy, mpar_buf x, mpar_buf stats, mpar_buf gb, mpar_buf dx,
                                      int rows, int cols) {
    return mpar_exec_launch(ex, "layernorm.cl", "mpar_layernorm_bwd_input", (size_t)rows, 0, "BBBBBBii", dy, x, stats,
                            mpar__at(stats, (size_t)rows), gb, dx, rows, cols);
}
static mpar_result mpar__ln_bwd_weight(mpar_exec* ex, mpar_buf dy, mpar_buf x, mpar_buf stats, mpar_buf dgb, int rows,
                                       int cols) {
    return mpar_exec_launch(ex, "layernorm.cl", "mpar_layernorm_bwd_weight", (size_t)cols, 0, "BBBBBBii", dy, x, stats,
                            mpar__at(stats, (size_t)rows), dgb, mpar__at(dgb, (size_t)cols), rows, cols);
}
static mpar_result mpar__layernorm_fwd(mpar_exec* ex, const mpar_layer* l, const mpar_io* io) {
    return mpar__ln_fwd(ex, io->x, io->params, io->y, io->stash, io->rows, l->in_features, mpar__eps(l));
}
static mpar_result mpar__layernorm_bwd(mpar_exec* ex, const mpar_layer* l, const mpar_io* io) {
    if (!io->need_dx) return MPAR_SUCCESS;
    return mpar__ln_bwd_input(ex, io->dy, io->x, io->stash, io->params, io->dx, io->rows, l->in_features);
}
static mpar_result mpar__layernorm_bwd_w(mpar_exec* ex, const mpar_layer* l, const mpar_io* io) {
    return mpar__ln_bwd_weight(ex, io->dy, io->x, io->stash, io->grads, io->rows, l->in_features);
}

/* ---- token + learned position embedding; input: int32 token per row ---- */
static mpar_result mpar__embedding_setup(mpar_layer* l, mpar_error* err) {
    size_t c = (size_t)l->desc.units;
    if (l->in_features != 1)
        return mpar_error_set(err, MPAR_ERROR_INVALID_MODEL,
                              "layer %d (embedding): input must be one token per row, got width %d", l->index,
                              l->in_features);
    if (l->desc.units <= 0 || l->desc.vocab <= 0)
        return mpar_error_set(err, MPAR_ERROR_INVALID_MODEL,
                              "layer %d (embedding): units (%d) and vocab (%d) must be positive", l->index,
                              l->desc.units, l->desc.vocab);
    l->out_features = l->desc.units;
    l->param_count = ((size_t)l->desc.vocab + (size_t)l->seq_len) * c;
    l->flops_forward = (double)c;
    l->flops_backward_weight = (double)c * (double)l->desc.vocab; /* the deterministic kernel scans */
    return MPAR_SUCCESS;
}
static void mpar__embedding_init(const mpar_layer* l, float* p, uint64_t* s) {
    size_t i;
    for (i = 0; i < l->param_count; i++) p[i] = mpar__rng_normal(s, 0.02f);
}
static mpar_result mpar__embedding_fwd(mpar_exec* ex, const mpar_layer* l, const mpar_io* io) {
    int c = l->out_features, v = l->desc.vocab;
    return mpar_exec_launch(ex, "embedding.cl", "mpar_embedding_fwd", (size_t)io->rows * (size_t)c, 0, "BBBBiiii",
                            io->x, io->params, mpar__at(io->params, (size_t)v * (size_t)c), io->y, io->rows,
                            l->seq_len, c, v);
}
static mpar_result mpar__embedding_bwd(mpar_exec* ex, const mpar_layer* l, const mpar_io* io) {
    (void)ex, (void)l, (void)io; /* tokens have no gradient */
    return MPAR_SUCCESS;
}
static mpar_result mpar__embedding_bwd_w(mpar_exec* ex, const mpar_layer* l, const mpar_io* io) {
    int c = l->out_features, v = l->desc.vocab;
    MPAR__TRY(mpar_exec_launch(ex, "embedding.cl", "mpar_embedding_bwd_wte", (size_t)v * (size_t)c, 0, "BBBiii", io->x,
                               io->dy, io->grads, io->rows, c, v));
    return mpar_exec_launch(ex, "embedding.cl", "mpar_embedding_bwd_wpe", (size_t)l->seq_len * (size_t)c, 0, "BBiii",
                            io->dy, mpar__at(io->grads, (size_t)v * (size_t)c), io->rows, l->seq_len, c);
}

/* ---- softmax cross-entropy; output: the loss of each row ---- */
static mpar_result mpar__xent_setup(mpar_layer* l, mpar_error* err) {
    if (l->in_features < 2)
        return mpar_error_set(err, MPAR_ERROR_INVALID_MODEL, "layer %d (cross_entropy): needs at least 2 classes, got %d",
                              l->index, l->in_features);
    l->out_features = 1;
    l->flops_forward = 4.0 * l->in_features;
    l->flops_backward_input = 4.0 * l->in_features;
    return MPAR_SUCCESS;
}
static mpar_result mpar__xent_fwd(mpar_exec* ex, const mpar_layer* l, const mpar_io* io) {
    return mpar_exec_launch(ex, "loss.cl", "mpar_xent_fwd", (size_t)io->rows, 0, "BBBii", io->x, io->targets, io->y,
                            io->rows, l->in_features);
}
static mpar_result mpar__xent_bwd(mpar_exec* ex, const mpar_layer* l, const mpar_io* io) {
    return mpar_exec_launch(ex, "loss.cl", "mpar_xent_bwd", (size_t)io->rows, 0, "BBBiif", io->x, io->targets, io->dx,
                            io->rows, l->in_features, (double)io->loss_scale);
}

/* ---- regression losses (mean squared error, mean absolute error) on
   float targets [rows × in_features]; output: the loss of each row, the
   mean over its values; the batch's loss is the mean over its rows ---- */
static mpar_result mpar__regress_setup(mpar_layer* l, mpar_error* err) {
    if (l->in_features < 1)
        return mpar_error_set(err, MPAR_ERROR_INVALID_MODEL, "layer %d (%s): needs at least 1 input, got %d", l->index,
                              l->type->name, l->in_features);
    l->out_features = 1;
    l->flops_forward = 3.0 * l->in_features;
    l->flops_backward_input = 2.0 * l->in_features;
    return MPAR_SUCCESS;
}
static mpar_result mpar__mse_fwd(mpar_exec* ex, const mpar_layer* l, const mpar_io* io) {
    return mpar_exec_launch(ex, "loss.cl", "mpar_mse_fwd", (size_t)io->rows, 0, "BBBii", io->x, io->targets, io->y,
                            io->rows, l->in_features);
}
static mpar_result mpar__mse_bwd(mpar_exec* ex, const mpar_layer* l, const mpar_io* io) {
    size_t n = (size_t)io->rows * (size_t)l->in_features;
    float k = 2.0f * io->loss_scale / (float)l->in_features;
    return mpar_exec_launch(ex, "loss.cl", "mpar_mse_bwd", n, 0, "BBBlf", io->x, io->targets, io->dx, n, (double)k);
}
static mpar_result mpar__l1_fwd(mpar_exec* ex, const mpar_layer* l, const mpar_io* io) {
    return mpar_exec_launch(ex, "loss.cl", "mpar_l1_fwd", (size_t)io->rows, 0, "BBBii", io->x, io->targets, io->y,
                            io->rows, l->in_features);
}
static mpar_result mpar__l1_bwd(mpar_exec* ex, const mpar_layer* l, const mpar_io* io) {
    size_t n = (size_t)io->rows * (size_t)l->in_features;
    float k = io->loss_scale / (float)l->in_features;
    return mpar_exec_launch(ex, "loss.cl", "mpar_l1_bwd", n, 0, "BBBlf", io->x, io->targets, io->dx, n, (double)k);
}

/* ---- pre-norm decoder block, one layer:
     h1 = LN1(x); qkv = h1·Wqkv + bqkv; a = causal_attention(qkv);
     x2 = x + a·Wo + bo; h2 = LN2(x2); f = h2·W1 + b1; g = gelu(f);
     y = x2 + g·W2 + b2
   Offsets below are in floats, per row (stash/gstash/scratch blocks are
   column blocks of `rows` rows each). ---- */
typedef struct mpar__block_shape {
    size_t c, hd, h, t;
    /* parameters */
    size_t ln1, wqkv, bqkv, wo, bo, ln2, w1, b1, w2, b2;
    /* stash, per row */
    size_t s_st1, s_h1, s_qkv, s_p, s_a, s_x2, s_st2, s_h2, s_f, s_g, s_total;
    /* gstash, per row */
    size_t g_dh2, g_df, g_dx2, g_dqkv, g_dh1, g_total;
    /* scratch, per row */
    size_t x_dg, x_ds, x_da, x_tmp, x_total;
    /* the widths as the kernels take them (int; mpar__block_setup checks
       that 3C and the MLP width fit) */
    int ci, c3i, hdi, hi, ti;
} mpar__block_shape;

static mpar__block_shape mpar__block(const mpar_layer* l) {
    mpar__block_shape s;
    s.c = (size_t)l->in_features;
    s.hd = l->desc.hidden > 0 ? (size_t)l->desc.hidden : 4 * s.c;
    s.h = (size_t)(l->desc.heads > 0 ? l->desc.heads : 1);
    s.t = (size_t)l->seq_len;
    s.ln1 = 0, s.wqkv = 2 * s.c, s.bqkv = s.wqkv + 3 * s.c * s.c, s.wo = s.bqkv + 3 * s.c, s.bo = s.wo + s.c * s.c;
    s.ln2 = s.bo + s.c, s.w1 = s.ln2 + 2 * s.c, s.b1 = s.w1 + s.c * s.hd, s.w2 = s.b1 + s.hd, s.b2 = s.w2 + s.hd * s.c;
    s.s_st1 = 0, s.s_h1 = 2, s.s_qkv = s.s_h1 + s.c, s.s_p = s.s_qkv + 3 * s.c, s.s_a = s.s_p + s.h * s.t;
    s.s_x2 = s.s_a + s.c, s.s_st2 = s.s_x2 + s.c, s.s_h2 = s.s_st2 + 2, s.s_f = s.s_h2 + s.c, s.s_g = s.s_f + s.hd;
    s.s_total = s.s_g + s.hd;
    s.g_dh2 = 0, s.g_df = s.c, s.g_dx2 = s.g_df + s.hd, s.g_dqkv = s.g_dx2 + s.c, s.g_dh1 = s.g_dqkv + 3 * s.c;
    s.g_total = s.g_dh1 + s.c;
    s.x_dg = 0, s.x_ds = s.hd, s.x_da = s.x_ds + s.h * s.t, s.x_tmp = s.x_da + s.c, s.x_total = s.x_tmp + s.c;
    s.ci = l->in_features, s.c3i = 3 * l->in_features;
    s.hdi = l->desc.hidden > 0 ? l->desc.hidden : 4 * l->in_features;
    s.hi = l->desc.heads > 0 ? l->desc.heads : 1, s.ti = l->seq_len;
    return s;
}

static mpar_result mpar__block_setup(mpar_layer* l, mpar_error* err) {
    mpar__block_shape s;
    double c, hd, t;
    MPAR__TRY(mpar__same_shape_setup(l, err));
    if (l->desc.heads <= 0 || l->in_features % l->desc.heads != 0)
        return mpar_error_set(err, MPAR_ERROR_INVALID_MODEL,
                              "layer %d (decoder_block): heads (%d) must be positive and divide the width %d",
                              l->index, l->desc.heads, l->in_features);
    if (l->desc.hidden < 0)
        return mpar_error_set(err, MPAR_ERROR_INVALID_MODEL, "layer %d (decoder_block): hidden must not be negative",
                              l->index);
    /* the kernels take widths as int; the parameter count must fit size_t */
    hd = l->desc.hidden > 0 ? (double)l->desc.hidden : 4.0 * l->in_features;
    c = (double)l->in_features;
    if (3.0 * c > INT_MAX || hd > INT_MAX)
        return mpar_error_set(err, MPAR_ERROR_INVALID_MODEL,
                              "layer %d (decoder_block): width %d gives inner widths %.0f (QKV) and %.0f (MLP); both "
                              "must stay below 2^31", l->index, l->in_features, 3.0 * c, hd);
    if (4.0 * c * c + 2.0 * c * hd + 9.0 * c + hd >= (double)SIZE_MAX)
        return mpar_error_set(err, MPAR_ERROR_INVALID_MODEL,
                              "layer %d (decoder_block): width %d and MLP width %.0f give %.3g parameters, more than "
                              "size_t holds", l->index, l->in_features, hd, 4.0 * c * c + 2.0 * c * hd + 9.0 * c + hd);
    s = mpar__block(l);
    l->param_count = s.b2 + s.c;
    l->stash_per_row = s.s_total;
    l->gstash_per_row = s.g_total;
    l->scratch_per_row = s.x_total;
    c = (double)s.c, hd = (double)s.hd, t = (double)s.t;
    l->flops_forward = 2.0 * c * 4.0 * c + 4.0 * c * hd + 2.0 * t * c + 20.0 * c;
    l->flops_backward_input = 2.0 * c * 4.0 * c + 4.0 * c * hd + 4.0 * t * c + 30.0 * c;
    l->flops_backward_weight = 2.0 * c * 4.0 * c + 4.0 * c * hd + 10.0 * c;
    return MPAR_SUCCESS;
}

static void mpar__block_init(const mpar_layer* l, float* p, uint64_t* r) {
    mpar__block_shape s = mpar__block(l);
    size_t i;
    for (i = 0; i < l->param_count; i++) p[i] = mpar__rng_normal(r, 0.02f);
    mpar__fill_value(p + s.ln1, s.c, 1.0f), mpar__fill_value(p + s.ln1 + s.c, s.c, 0.0f);
    mpar__fill_value(p + s.ln2, s.c, 1.0f), mpar__fill_value(p + s.ln2 + s.c, s.c, 0.0f);
    mpar__fill_value(p + s.bqkv, 3 * s.c, 0.0f), mpar__fill_value(p + s.bo, s.c, 0.0f);
    mpar__fill_value(p + s.b1, s.hd, 0.0f), mpar__fill_value(p + s.b2, s.c, 0.0f);
}

/* y = x·W + b for a block's inner projection. */
static mpar_result mpar__proj(mpar_exec* ex, mpar_buf x, mpar_buf w, mpar_buf b, mpar_buf y, int rows, int in,
                              int out) {
    size_t r = (size_t)rows, i = (size_t)in, o = (size_t)out;
    MPAR__TRY(mpar_exec_gemm(ex, 0, 0, r, o, i, 1.0f, x, i, w, o, 0.0f, y, o));
    return mpar_exec_launch(ex, "elementwise.cl", "mpar_bias_add", r * o, 0, "BiiB", y, rows, out, b);
}
static mpar_result mpar__add(mpar_exec* ex, mpar_buf a, mpar_buf b, mpar_buf out, size_t n) {
    return mpar_exec_launch(ex, "elementwise.cl", "mpar_add", n, 0, "BBBl", a, b, out, n);
}

static mpar_result mpar__block_fwd(mpar_exec* ex, const mpar_layer* l, const mpar_io* io) {
    mpar__block_shape s = mpar__block(l);
    size_t rows = (size_t)io->rows, b = rows / s.t;
    mpar_buf st = io->stash, p = io->params;
    mpar_buf h1 = mpar__at(st, rows * s.s_h1), qkv = mpar__at(st, rows * s.s_qkv), pr = mpar__at(st, rows * s.s_p);
    mpar_buf a = mpar__at(st, rows * s.s_a), x2 = mpar__at(st, rows * s.s_x2), h2 = mpar__at(st, rows * s.s_h2);
    mpar_buf f = mpar__at(st, rows * s.s_f), g = mpar__at(st, rows * s.s_g);
    MPAR__TRY(mpar__ln_fwd(ex, io->x, mpar__at(p, s.ln1), h1, mpar__at(st, rows * s.s_st1), io->rows, s.ci,
                           mpar__eps(l)));
    MPAR__TRY(mpar__proj(ex, h1, mpar__at(p, s.wqkv), mpar__at(p, s.bqkv), qkv, io->rows, s.ci, s.c3i));
    MPAR__TRY(mpar_exec_launch(ex, "attention.cl", "mpar_attn_fwd", b * s.h * s.t, 0, "BBBiiii", qkv, a, pr,
                               io->rows / s.ti, s.ti, s.ci, s.hi));
    MPAR__TRY(mpar__proj(ex, a, mpar__at(p, s.wo), mpar__at(p, s.bo), io->y, io->rows, s.ci, s.ci));
    MPAR__TRY(mpar__add(ex, io->x, io->y, x2, rows * s.c));
    MPAR__TRY(mpar__ln_fwd(ex, x2, mpar__at(p, s.ln2), h2, mpar__at(st, rows * s.s_st2), io->rows, s.ci,
                           mpar__eps(l)));
    MPAR__TRY(mpar__proj(ex, h2, mpar__at(p, s.w1), mpar__at(p, s.b1), f, io->rows, s.ci, s.hdi));
    MPAR__TRY(mpar_exec_launch(ex, "elementwise.cl", "mpar_gelu_fwd", rows * s.hd, 0, "BBl", f, g, rows * s.hd));
    MPAR__TRY(mpar__proj(ex, g, mpar__at(p, s.w2), mpar__at(p, s.b2), io->y, io->rows, s.hdi, s.ci));
    return mpar__add(ex, io->y, x2, io->y, rows * s.c);
}

static mpar_result mpar__block_bwd(mpar_exec* ex, const mpar_layer* l, const mpar_io* io) {
    mpar__block_shape s = mpar__block(l);
    size_t rows = (size_t)io->rows, b = rows / s.t;
    mpar_buf st = io->stash, p = io->params, gs = io->gstash, xs = io->scratch;
    mpar_buf qkv = mpar__at(st, rows * s.s_qkv), pr = mpar__at(st, rows * s.s_p), x2 = mpar__at(st, rows * s.s_x2);
    mpar_buf f = mpar__at(st, rows * s.s_f);
    mpar_buf dh2 = mpar__at(gs, rows * s.g_dh2), df = mpar__at(gs, rows * s.g_df), dx2 = mpar__at(gs, rows * s.g_dx2);
    mpar_buf dqkv = mpar__at(gs, rows * s.g_dqkv), dh1 = mpar__at(gs, rows * s.g_dh1);
    mpar_buf dg = mpar__at(xs, rows * s.x_dg), ds = mpar__at(xs, rows * s.x_ds), da = mpar__at(xs, rows * s.x_da);
    mpar_buf tmp = mpar__at(xs, rows * s.x_tmp);
    MPAR__TRY(mpar_exec_gemm(ex, 0, 1, rows, s.hd, s.c, 1.0f, io->dy, s.c, mpar__at(p, s.w2), s.c, 0.0f, dg, s.hd));
    MPAR__TRY(mpar_exec_launch(ex, "elementwise.cl", "mpar_gelu_bwd", rows * s.hd, 0, "BBBl", f, dg, df, rows * s.hd));
    MPAR__TRY(mpar_exec_gemm(ex, 0, 1, rows, s.c, s.hd, 1.0f, df, s.hd, mpar__at(p, s.w1), s.hd, 0.0f, dh2, s.c));
    MPAR__TRY(mpar__ln_bwd_input(ex, dh2, x2, mpar__at(st, rows * s.s_st2), mpar__at(p, s.ln2), tmp, io->rows,
                                 s.ci));
    MPAR__TRY(mpar__add(ex, tmp, io->dy, dx2, rows * s.c));
    MPAR__TRY(mpar_exec_gemm(ex, 0, 1, rows, s.c, s.c, 1.0f, dx2, s.c, mpar__at(p, s.wo), s.c, 0.0f, da, s.c));
    MPAR__TRY(mpar_exec_launch(ex, "attention.cl", "mpar_attn_bwd_ds", b * s.h * s.t, 0, "BBBBiiii", da, qkv, pr, ds,
                               io->rows / s.ti, s.ti, s.ci, s.hi));
    MPAR__TRY(mpar_exec_launch(ex, "attention.cl", "mpar_attn_bwd_qkv", rows * 3 * s.c, 0, "BBBBBiiii", da, qkv, pr,
                               ds, dqkv, io->rows / s.ti, s.ti, s.ci, s.hi));
    MPAR__TRY(mpar_exec_gemm(ex, 0, 1, rows, s.c, 3 * s.c, 1.0f, dqkv, 3 * s.c, mpar__at(p, s.wqkv), 3 * s.c, 0.0f,
                             dh1, s.c));
    if (!io->need_dx) return MPAR_SUCCESS;
    MPAR__TRY(mpar__ln_bwd_input(ex, dh1, io->x, mpar__at(st, rows * s.s_st1), mpar__at(p, s.ln1), tmp, io->rows,
                                 s.ci));
    return mpar__add(ex, tmp, dx2, io->dx, rows * s.c);
}

/* Parameter gradient of one inner projection: dW += xᵀ·dy, db += Σ dy. */
static mpar_result mpar__proj_grad(mpar_exec* ex, mpar_buf x, mpar_buf dy, mpar_buf dw, mpar_buf db, int rows,
                                   int in, int out) {
    size_t r = (size_t)rows, i = (size_t)in, o = (size_t)out;
    MPAR__TRY(mpar_exec_gemm(ex, 1, 0, i, o, r, 1.0f, x, i, dy, o, 1.0f, dw, o));
    return mpar_exec_launch(ex, "elementwise.cl", "mpar_bias_grad", o, 0, "BiiB", dy, rows, out, db);
}

static mpar_result mpar__block_bwd_w(mpar_exec* ex, const mpar_layer* l, const mpar_io* io) {
    mpar__block_shape s = mpar__block(l);
    size_t rows = (size_t)io->rows;
    mpar_buf st = io->stash, gs = io->gstash, gr = io->grads;
    mpar_buf h1 = mpar__at(st, rows * s.s_h1), a = mpar__at(st, rows * s.s_a), x2 = mpar__at(st, rows * s.s_x2);
    mpar_buf h2 = mpar__at(st, rows * s.s_h2), g = mpar__at(st, rows * s.s_g);
    mpar_buf dh2 = mpar__at(gs, rows * s.g_dh2), df = mpar__at(gs, rows * s.g_df), dx2 = mpar__at(gs, rows * s.g_dx2);
    mpar_buf dqkv = mpar__at(gs, rows * s.g_dqkv), dh1 = mpar__at(gs, rows * s.g_dh1);
    MPAR__TRY(mpar__ln_bwd_weight(ex, dh1, io->x, mpar__at(st, rows * s.s_st1), mpar__at(gr, s.ln1), io->rows,
                                  s.ci));
    MPAR__TRY(mpar__proj_grad(ex, h1, dqkv, mpar__at(gr, s.wqkv), mpar__at(gr, s.bqkv), io->rows, s.ci, s.c3i));
    MPAR__TRY(mpar__proj_grad(ex, a, dx2, mpar__at(gr, s.wo), mpar__at(gr, s.bo), io->rows, s.ci, s.ci));
    MPAR__TRY(mpar__ln_bwd_weight(ex, dh2, x2, mpar__at(st, rows * s.s_st2), mpar__at(gr, s.ln2), io->rows,
                                  s.ci));
    MPAR__TRY(mpar__proj_grad(ex, h2, df, mpar__at(gr, s.w1), mpar__at(gr, s.b1), io->rows, s.ci, s.hdi));
    return mpar__proj_grad(ex, g, io->dy, mpar__at(gr, s.w2), mpar__at(gr, s.b2), io->rows, s.hdi, s.ci);
}

/* ---- the built-in type tables ---- */
static const mpar_layer_type mpar__type_linear = {"linear", 0, mpar__linear_setup, mpar__linear_init,
                                                  mpar__linear_forward, mpar__linear_backward_input,
                                                  mpar__linear_backward_weight};
static const mpar_layer_type mpar__type_relu = {"relu", 0, mpar__same_shape_setup, NULL, mpar__relu_fwd,
                                                mpar__relu_bwd, NULL};
static const mpar_layer_type mpar__type_gelu = {"gelu", 0, mpar__same_shape_setup, NULL, mpar__gelu_fwd,
                                                mpar__gelu_bwd, NULL};
static const mpar_layer_type mpar__type_tanh = {"tanh", 0, mpar__same_shape_setup, NULL, mpar__tanh_fwd,
                                                mpar__tanh_bwd, NULL};
static const mpar_layer_type mpar__type_dropout = {"dropout", 0, mpar__dropout_setup, NULL, mpar__dropout_fwd,
                                                   mpar__dropout_bwd, NULL};
static const mpar_layer_type mpar__type_layernorm = {"layernorm", 0, mpar__layernorm_setup, mpar__layernorm_init,
                                                     mpar__layernorm_fwd, mpar__layernorm_bwd, mpar__layernorm_bwd_w};
static const mpar_layer_type mpar__type_embedding = {"embedding", MPAR_LAYER_TOKEN_INPUT, mpar__embedding_setup,
                                                     mpar__embedding_init, mpar__embedding_fwd, mpar__embedding_bwd,
                                                     mpar__embedding_bwd_w};
static const mpar_layer_type mpar__type_block = {"decoder_block", 0, mpar__block_setup, mpar__block_init,
                                                 mpar__block_fwd, mpar__block_bwd, mpar__block_bwd_w};
static const mpar_layer_type mpar__type_xent = {"cross_entropy", MPAR_LAYER_LOSS, mpar__xent_setup, NULL,
                                                mpar__xent_fwd, mpar__xent_bwd, NULL};

MPARDEF const mpar_layer_type* mpar_layer_linear(void) { return &mpar__type_linear; }
MPARDEF const mpar_layer_type* mpar_layer_relu(void) { return &mpar__type_relu; }
MPARDEF const mpar_layer_type* mpar_layer_gelu(void) { return &mpar__type_gelu; }
MPARDEF const mpar_layer_type* mpar_layer_tanh(void) { return &mpar__type_tanh; }
MPARDEF const mpar_layer_type* mpar_layer_dropout(void) { return &mpar__type_dropout; }
MPARDEF const mpar_layer_type* mpar_layer_layernorm(void) { return &mpar__type_layernorm; }
MPARDEF const mpar_layer_type* mpar_layer_embedding(void) { return &mpar__type_embedding; }
MPARDEF const mpar_layer_type* mpar_layer_decoder_block(void) { return &mpar__type_block; }
static const mpar_layer_type mpar__type_mse = {"mse", MPAR_LAYER_LOSS | MPAR_LAYER_FLOAT_TARGETS, mpar__regress_setup,
                                               NULL, mpar__mse_fwd, mpar__mse_bwd, NULL};
static const mpar_layer_type mpar__type_l1 = {"l1", MPAR_LAYER_LOSS | MPAR_LAYER_FLOAT_TARGETS, mpar__regress_setup,
                                              NULL, mpar__l1_fwd, mpar__l1_bwd, NULL};
MPARDEF const mpar_layer_type* mpar_layer_cross_entropy(void) { return &mpar__type_xent; }
MPARDEF const mpar_layer_type* mpar_layer_mse(void) { return &mpar__type_mse; }
MPARDEF const mpar_layer_type* mpar_layer_l1(void) { return &mpar__type_l1; }

/* ---- the model ---- */
struct mpar_model {
    unsigned live; /* MPAR__LIVE_MODEL; MPAR__DEAD once destroyed (MPAR_DEBUG) */
    mpar_model_desc desc;
    int count, capacity;
    mpar_layer* layers;
    /* The caller's reference plus one per pipeline made from it: the last
       release frees the model, so a pipeline outlives its model's
       mpar_model_destroy. Under ref_mu: pipelines on other threads may be
       destroyed at the same time. */
    int refs;
    pthread_mutex_t ref_mu;
};

/* A pipeline's hold on its model. The count is not part of what the
   const pointer promises: the model's description and layers stay as they
   are. */
static void mpar__model_retain(const mpar_model* cm) {
    mpar_model* m = (mpar_model*)cm;
    pthread_mutex_lock(&m->ref_mu);
    m->refs++;
    pthread_mutex_unlock(&m->ref_mu);
}

static void mpar__model_release(const mpar_model* cm) {
    mpar_model* m = (mpar_model*)cm;
    mpar_allocator a;
    int left;
    pthread_mutex_lock(&m->ref_mu);
    left = --m->refs;
    pthread_mutex_unlock(&m->ref_mu);
    if (left > 0) return;
    a = m->desc.allocator; /* the model's memory holds it */
    pthread_mutex_destroy(&m->ref_mu);
    mpar__free_a(&a, m->layers);
#ifdef MPAR_DEBUG
    m->live = MPAR__DEAD, m->layers = NULL, m->count = m->capacity = 0;
    MPAR__KEEP_TOMBSTONE(m);
#else
    mpar__free_a(&a, m);
#endif
}

MPARDEF mpar_result mpar_model_create(const mpar_model_desc* desc, mpar_model** out, mpar_error* err) {
    mpar_model* m;
    if (!desc || !out) return mpar_error_set(err, MPAR_ERROR_INVALID_ARGUMENT, "mpar_model_create: NULL argument");
    *out = NULL;
    if (desc->input_features <= 0 || desc->seq_len < 0)
        return mpar_error_set(err, MPAR_ERROR_INVALID_MODEL,
                              "model input_features must be positive (got %d) and seq_len not negative (got %d)",
                              desc->input_features, desc->seq_len);
    if (!mpar__allocator_ok(&desc->allocator))
        return mpar_error_set(err, MPAR_ERROR_INVALID_ARGUMENT, "mpar_model_desc.allocator: give all three functions "
                              "or none");
    m = (mpar_model*)mpar__alloc_a(&desc->allocator, sizeof *m);
    if (!m) return mpar_error_set(err, MPAR_ERROR_OUT_OF_HOST_MEMORY, "out of host memory");
    memset(m, 0, sizeof *m);
    m->desc = *desc;
    if (m->desc.seq_len == 0) m->desc.seq_len = 1;
    m->refs = 1;
    pthread_mutex_init(&m->ref_mu, NULL);
    m->live = MPAR__LIVE_MODEL;
    *out = m;
    return MPAR_SUCCESS;
}

/* A model's public calls start here: live, or why not. */
static mpar_result mpar__model_check(const mpar_model* m, const char* call, mpar_error* err) {
    if (!m) return mpar_error_set(err, MPAR_ERROR_INVALID_ARGUMENT, "%s: model is NULL", call);
    if (m->live == MPAR__LIVE_MODEL) return MPAR_SUCCESS;
    if (m->live == MPAR__DEAD) return mpar_error_set(err, MPAR_ERROR_INVALID_STATE, "%s: the model was destroyed", call);
    return mpar_error_set(err, MPAR_ERROR_INVALID_ARGUMENT, "%s: not a model", call);
}

MPARDEF void mpar_model_destroy(mpar_model* model) {
    if (!model || model->live != MPAR__LIVE_MODEL) return; /* destroyed already: nothing to do, no sink to tell */
    model->live = MPAR__DEAD; /* the caller's handle; pipelines may still hold the model */
    mpar__model_release(model);
}

MPARDEF mpar_result mpar_model_add(mpar_model* m, const mpar_layer_desc* d, mpar_error* err) {
    mpar_layer l;
    mpar_result r;
    if (m) MPAR__TRY(mpar__model_check(m, "mpar_model_add", err));
    if (!m || !d || !d->type || !d->type->setup || !d->type->forward || !d->type->backward_input)
        return mpar_error_set(err, MPAR_ERROR_INVALID_ARGUMENT,
                              "mpar_model_add: model, layer or layer type (setup/forward/backward_input) is NULL");
    if (!isfinite(d->rate) || !isfinite(d->eps) || d->eps < 0.0f) /* a checkpoint could not hold them */
        return mpar_error_set(err, MPAR_ERROR_INVALID_MODEL, "layer %d (%s): rate %g and eps %g must be finite, eps "
                              "not negative (0: 1e-5)", m->count, d->type->name ? d->type->name : "?", (double)d->rate,
                              (double)d->eps);
    if (m->count > 0 && (m->layers[m->count - 1].type->flags & MPAR_LAYER_LOSS))
        return mpar_error_set(err, MPAR_ERROR_INVALID_MODEL, "layer %d (%s) follows the loss layer %d (%s): the loss "
                              "must be last", m->count, d->type->name, m->count - 1, m->layers[m->count - 1].type->name);
    if (m->count > 0 && (d->type->flags & MPAR_LAYER_TOKEN_INPUT))
        return mpar_error_set(err, MPAR_ERROR_INVALID_MODEL, "layer %d (%s) takes token ids and must be the first layer",
                              m->count, d->type->name);
    memset(&l, 0, sizeof l);
    l.type = d->type;
    l.desc = *d;
    l.index = m->count;
    l.seq_len = m->desc.seq_len;
    l.in_features = m->count ? m->layers[m->count - 1].out_features : m->desc.input_features;
    r = d->type->setup(&l, err);
    if (r != MPAR_SUCCESS) return r;
    if (l.out_features <= 0)
        return mpar_error_set(err, MPAR_ERROR_INVALID_MODEL, "layer %d (%s) has no outputs", l.index, d->type->name);
    if (l.param_count > 0 && !d->type->backward_weight)
        return mpar_error_set(err, MPAR_ERROR_INVALID_MODEL, "layer %d (%s) has parameters but no backward_weight",
                              l.index, d->type->name);
    if (m->count == m->capacity) {
        int cap = m->capacity ? 2 * m->capacity : 16;
        mpar_layer* grown =
            (mpar_layer*)mpar__realloc_a(&m->desc.allocator, m->layers, sizeof(mpar_layer) * (size_t)cap);
        if (!grown) return mpar_error_set(err, MPAR_ERROR_OUT_OF_HOST_MEMORY, "out of host memory");
        m->layers = grown;
        m->capacity = cap;
    }
    m->layers[m->count++] = l;
    return MPAR_SUCCESS;
}

MPARDEF mpar_result mpar_model_add_linear(mpar_model* model, int units, mpar_error* err) {
    mpar_layer_desc d;
    memset(&d, 0, sizeof d);
    d.type = mpar_layer_linear();
    d.units = units;
    return mpar_model_add(model, &d, err);
}

MPARDEF mpar_result mpar_model_add_simple(mpar_model* model, const mpar_layer_type* type, mpar_error* err) {
    mpar_layer_desc d;
    memset(&d, 0, sizeof d);
    d.type = type;
    return mpar_model_add(model, &d, err);
}

/* Internal uses (a pipeline holding a model whose caller destroyed it)
   skip the live check of the public calls. */
static mpar_result mpar__model_validate(const mpar_model* m, mpar_error* err) {
    if (m->count == 0) return mpar_error_set(err, MPAR_ERROR_INVALID_MODEL, "the model has no layers");
    if (!(m->layers[m->count - 1].type->flags & MPAR_LAYER_LOSS))
        return mpar_error_set(err, MPAR_ERROR_INVALID_MODEL, "the last layer (%d, %s) is not a loss layer",
                              m->count - 1, m->layers[m->count - 1].type->name);
    if ((m->layers[0].type->flags & MPAR_LAYER_TOKEN_INPUT) && m->desc.input_features != 1)
        return mpar_error_set(err, MPAR_ERROR_INVALID_MODEL, "a token model needs input_features = 1");
    return MPAR_SUCCESS;
}

MPARDEF mpar_result mpar_model_validate(const mpar_model* m, mpar_error* err) {
    MPAR__TRY(mpar__model_check(m, "mpar_model_validate", err));
    return mpar__model_validate(m, err);
}

MPARDEF int mpar_model_layer_count(const mpar_model* m) { return m ? m->count : 0; } /* 0 once destroyed */
/* NULL once the model is gone; a model its caller destroyed that a
   pipeline still holds keeps its description (the pipeline reads it). */
MPARDEF const mpar_model_desc* mpar_model_get_desc(const mpar_model* m) {
    return m && (m->live == MPAR__LIVE_MODEL || m->refs > 0) ? &m->desc : NULL;
}
MPARDEF const mpar_layer* mpar_model_layer(const mpar_model* m, int i) {
    return m && i >= 0 && i < m->count ? &m->layers[i] : NULL;
}
MPARDEF size_t mpar_model_param_count(const mpar_model* m) {
    size_t n = 0;
    int i;
    for (i = 0; m && i < m->count; i++) n += m->layers[i].param_count;
    return n;
}

static mpar_result mpar__model_init_params(const mpar_model* m, int layer, float* out, mpar_error* err) {
    const mpar_layer* l = mpar_model_layer(m, layer);
    uint64_t s;
    if (!l || (!out && l->param_count))
        return mpar_error_set(err, MPAR_ERROR_INVALID_ARGUMENT, "mpar_model_init_params: no layer %d or out is NULL",
                              layer);
    /* Seeded by (model seed, layer index): independent of the partition. */
    s = m->desc.seed ^ (0xD1B54A32D192ED03ULL * (uint64_t)(layer + 1));
    mpar__rng_next(&s);
    if (l->param_count == 0) return MPAR_SUCCESS;
    if (l->type->init) l->type->init(l, out, &s);
    else mpar__fill_value(out, l->param_count, 0.0f);
    return MPAR_SUCCESS;
}

MPARDEF mpar_result mpar_model_init_params(const mpar_model* m, int layer, float* out, mpar_error* err) {
    MPAR__TRY(mpar__model_check(m, "mpar_model_init_params", err));
    return mpar__model_init_params(m, layer, out, err);
}

/* ---- classification helpers: rows of logits on the host ---- */

static mpar_result mpar__rows_check(const char* fn, const void* in, const void* out, int rows, int classes,
                                    mpar_error* err) {
    if (!in || !out || rows < 0 || classes < 1)
        return mpar_error_set(err, MPAR_ERROR_INVALID_ARGUMENT, "%s: an array is NULL, or rows (%d) < 0 or classes "
                              "(%d) < 1", fn, rows, classes);
    return MPAR_SUCCESS;
}

static int32_t mpar__row_argmax(const float* x, int classes) {
    int32_t best = 0;
    int c;
    for (c = 1; c < classes; c++)
        if (x[c] > x[best] || (x[best] != x[best] && x[c] == x[c])) best = c; /* x != x: NaN */
    return best;
}

MPARDEF mpar_result mpar_softmax(const float* logits, int rows, int classes, float* probs, mpar_error* err) {
    int r, c;
    mpar_result res = mpar__rows_check("mpar_softmax", logits, probs, rows, classes, err);
    if (res != MPAR_SUCCESS) return res;
    for (r = 0; r < rows; r++) {
        const float* x = logits + (size_t)r * (size_t)classes;
        float* y = probs + (size_t)r * (size_t)classes;
        float top = x[0];
        double sum = 0.0;
        int nan = 0;
        for (c = 0; c < classes; c++) {
            nan |= x[c] != x[c];
            if (x[c] > top) top = x[c];
        }
        if (nan || top == INFINITY || top == -INFINITY) { /* no meaningful distribution */
            for (c = 0; c < classes; c++) y[c] = NAN;
            continue;
        }
        for (c = 0; c < classes; c++) sum += exp((double)x[c] - (double)top);
        for (c = 0; c < classes; c++) y[c] = (float)(exp((double)x[c] - (double)top) / sum);
    }
    return MPAR_SUCCESS;
}

MPARDEF mpar_result mpar_argmax(const float* x, int rows, int classes, int32_t* out, mpar_error* err) {
    int r;
    mpar_result res = mpar__rows_check("mpar_argmax", x, out, rows, classes, err);
    if (res != MPAR_SUCCESS) return res;
    for (r = 0; r < rows; r++) out[r] = mpar__row_argmax(x + (size_t)r * (size_t)classes, classes);
    return MPAR_SUCCESS;
}

MPARDEF mpar_result mpar_accuracy(const float* logits, const int32_t* labels, int rows, int classes, double* out,
                                  mpar_error* err) {
    int r, counted = 0, right = 0;
    mpar_result res = mpar__rows_check("mpar_accuracy", logits, out, rows, classes, err);
    if (res == MPAR_SUCCESS && !labels)
        res = mpar_error_set(err, MPAR_ERROR_INVALID_ARGUMENT, "mpar_accuracy: labels is NULL");
    if (res != MPAR_SUCCESS) return res;
    for (r = 0; r < rows; r++) {
        if (labels[r] < 0) continue; /* left out, as the loss leaves it out */
        if (labels[r] >= classes)
            return mpar_error_set(err, MPAR_ERROR_INVALID_ARGUMENT, "mpar_accuracy: label %d of row %d is not below "
                                  "%d classes", (int)labels[r], r, classes);
        counted++;
        right += mpar__row_argmax(logits + (size_t)r * (size_t)classes, classes) == labels[r];
    }
    if (counted == 0)
        return mpar_error_set(err, MPAR_ERROR_INVALID_ARGUMENT, "mpar_accuracy: none of the %d rows has a label >= 0",
                              rows);
    *out = (double)right / (double)counted;
    return MPAR_SUCCESS;
}


#ifndef MPAR_PART_PLANNER_IMPL
#define MPAR_PART_PLANNER_IMPL

/* From section 6: what the planner asks of schedules, by kind. */
static const char* mpar__sched_kind_upper(mpar_schedule_kind kind);
static int mpar__sched_kind_known(mpar_schedule_kind kind);
static int mpar__sched_kind_vstages(mpar_schedule_kind kind, int asked);
static mpar_result mpar__sched_generate(const mpar_allocator* a, mpar_schedule_kind kind, int stages,
                                        int microbatches, int virtual_stages, mpar_schedule** out, mpar_error* err);

#include <float.h>
#include <math.h>
#include <string.h>

#define MPAR__PLANNER_INF HUGE_VAL
#define MPAR__PLANNER_TOL 1e-9   /* relative band in which two objectives tie */
#define MPAR__PLANNER_PREC 1e-10 /* relative precision of the bottleneck search */

/* ---- small helpers ---- */

static int mpar__planner_bad(double x) { return !(x >= 0.0 && x <= DBL_MAX); } /* catches NaN too */

/* Bytes held in doubles (exact below 2^53) back to an integer, saturating:
   converting a double beyond the range is undefined behaviour. */
static unsigned long long mpar__planner_u64(double x) {
    if (!(x > 0.0)) return 0;
    if (x >= 18446744073709551615.0) return ~0ULL; /* that literal is 2^64 as a double */
    return (unsigned long long)x;
}

static uint64_t mpar__planner_bits(double x) {
    uint64_t u;
    memcpy(&u, &x, sizeof u);
    return u;
}

static double mpar__planner_from_bits(uint64_t u) {
    double x;
    memcpy(&x, &u, sizeof x);
    return x;
}

static const char* mpar__planner_kind_name(mpar_schedule_kind kind) { return mpar__sched_kind_upper(kind); }

MPARDEF const char* mpar_plan_binding_name(mpar_plan_binding_kind kind) {
    switch (kind) {
    case MPAR_PLAN_BINDING_COMPUTE: return "compute";
    case MPAR_PLAN_BINDING_MEMORY: return "memory";
    case MPAR_PLAN_BINDING_LINK: return "link";
    }
    return "?";
}

/* ---- in-flight counts ---- */

MPARDEF int mpar_plan_in_flight(mpar_schedule_kind kind, int stages, int microbatches, int virtual_stages,
                                int stage) {
    mpar_schedule* sc = NULL;
    int n;
    if (stages < 1 || microbatches < 1 || virtual_stages < 0 || stage < 0 || stage >= stages) return 0;
    if (mpar__sched_generate(NULL, kind, stages, microbatches, mpar__sched_kind_vstages(kind, virtual_stages), &sc,
                             NULL) != MPAR_SUCCESS)
        return 0;
    n = sc->peak_in_flight[stage] * (microbatches / sc->microbatches);
    mpar_schedule_destroy(sc);
    return n;
}

/* ---- the planning context ---- */

typedef struct mpar__planner_ctx {
    mpar_plan_desc d; /* the descriptor with defaults filled in */
    int L, P, M, V;   /* V: requested virtual stages (1 unless interleaved) */
    int pipelined;    /* 0 for SEQUENTIAL: the objective is the path */
    double* cost;     /* P rows of L+1 prefix sums of F+B+W seconds */
    double* fixed;    /* L+1 prefix sums of 2 * param + optimizer bytes */
    double* stash;    /* L+1 prefix sums of activation bytes */
    double* out;      /* L output bytes */
    double* lat2;     /* P*P: latency a->b + b->a */
    double* inv2;     /* P*P: seconds per byte a->b + b->a */
    double* cap;      /* P usable bytes, INF when unlimited */
    double* mult_tab; /* P*P: stash multiplier of stage r when k devices: [(k-1)*P + r] */
    int* place_tab;   /* P*nmax: position (0..k-1) of chunk s when k devices: [(k-1)*nmax + s] */
    double* val[2];   /* DP rows */
    double* key;      /* window keys */
    double* xb;       /* nmax-1 rows of L+1: transfer over each cut of each boundary (the path's) */
    double* xs;       /* the same, charged to the stages: 0 where the link overlaps compute */
    int* ovl;         /* P*P: links a->b and b->a both overlap compute */
    double* zero;     /* L+1 zeros: no transfer at the chain's ends */
    double scale;     /* size of the largest stage time: slack for rounding */
    int rough;        /* hill climbing: see mpar__planner_consider_rough */
    uint64_t rng;     /* random restarts of the hill climb */
    double min_sum;   /* sum over layers of the cheapest device's cost */
    double max_layer_min; /* the most expensive layer on its cheapest device */
    double limit;     /* stage-time limit of the running chain */
    int* deque;
    int* parent;      /* nmax rows of L+1 */
    int* ends;        /* nmax stage ends (exclusive) */
    int* cls;         /* P: lowest interchangeable device */
    int* orders;      /* 5 * P scratch: best, local best, current, candidate, used */
    int nmax;
    /* the device sequence being evaluated */
    int n, k, veff;
    int* dev;
    double* scap;
    double* mult;
    int ignore_memory;
    double extra_cap;
    long evaluations;
} mpar__planner_ctx;

static void mpar__planner_defaults(const mpar_plan_desc* in, mpar_plan_desc* d) {
    *d = *in;
    if (d->microbatches == 0) d->microbatches = 1;
    if (d->virtual_stages == 0) d->virtual_stages = 1;
    d->virtual_stages = mpar__sched_kind_vstages(d->schedule, d->virtual_stages);
    if (d->schedule_lists) {
        d->microbatches = d->schedule_lists->microbatches;
        d->virtual_stages = d->schedule_lists->virtual_stages;
        d->use_devices = d->schedule_lists->stages;
    }
    if (d->order_budget == 0) d->order_budget = MPAR_PLAN_DEFAULT_ORDER_BUDGET;
}

/* ---- descriptor validation ---- */

static mpar_result mpar__planner_check_basic(const mpar_plan_desc* d, mpar_error* err) {
    const mpar_result bad = MPAR_ERROR_INVALID_ARGUMENT;
    if (d->num_layers < 1 || !d->layers)
        return mpar_error_set(err, bad, "planner: need num_layers >= 1 and layers (num_layers is %d%s)", d->num_layers,
                              d->layers ? "" : ", layers is NULL");
    if (d->num_devices < 1 || !d->devices)
        return mpar_error_set(err, bad, "planner: need num_devices >= 1 and devices (num_devices is %d%s)",
                              d->num_devices, d->devices ? "" : ", devices is NULL");
    if (!mpar__sched_kind_known(d->schedule))
        return mpar_error_set(err, bad, "planner: unknown schedule kind %d", (int)d->schedule);
    if (d->microbatches < 0 || d->virtual_stages < 0 || d->order_budget < 0)
        return mpar_error_set(err, bad, "planner: microbatches (%d), virtual_stages (%d) and order_budget (%d) "
                              "must be >= 0", d->microbatches, d->virtual_stages, d->order_budget);
    if ((int)d->mode < (int)MPAR_PLAN_OPTIMAL || (int)d->mode > (int)MPAR_PLAN_MANUAL)
        return mpar_error_set(err, bad, "planner: unknown mode %d", (int)d->mode);
    if ((int)d->order < (int)MPAR_PLAN_ORDER_SEARCH || (int)d->order > (int)MPAR_PLAN_ORDER_FIXED)
        return mpar_error_set(err, bad, "planner: unknown order %d", (int)d->order);
    if (d->use_devices < 0 || d->use_devices > d->num_devices)
        return mpar_error_set(err, bad, "planner: use_devices is %d, must be 0 (choose) or 1..%d", d->use_devices,
                              d->num_devices);
    return MPAR_SUCCESS;
}

static mpar_result mpar__planner_check_layers(const mpar_plan_desc* d, mpar_error* err) {
    int l;
    for (l = 0; l < d->num_layers; ++l) {
        const mpar_plan_layer* y = &d->layers[l];
        if (mpar__planner_bad(y->flops_forward) || mpar__planner_bad(y->flops_backward_input) ||
            mpar__planner_bad(y->flops_backward_weight))
            return mpar_error_set(err, MPAR_ERROR_INVALID_ARGUMENT,
                                  "planner: layer %d: flops (%g, %g, %g) must be finite and >= 0", l,
                                  y->flops_forward, y->flops_backward_input, y->flops_backward_weight);
    }
    return MPAR_SUCCESS;
}

/* The FLOP model needs a throughput only for a part no table covers. */
static int mpar__planner_needs_flops(const mpar_plan_desc* d) {
    const double* tab[3];
    int part, l;
    tab[0] = d->measured_forward;
    tab[1] = d->measured_backward_input;
    tab[2] = d->measured_backward_weight;
    for (part = 0; part < 3; ++part) {
        if (tab[part]) continue;
        for (l = 0; l < d->num_layers; ++l) {
            const mpar_plan_layer* y = &d->layers[l];
            double f = part == 0 ? y->flops_forward : part == 1 ? y->flops_backward_input : y->flops_backward_weight;
            if (f > 0.0) return 1;
        }
    }
    return 0;
}

static mpar_result mpar__planner_check_devices(const mpar_plan_desc* d, mpar_error* err) {
    int i, need = mpar__planner_needs_flops(d);
    for (i = 0; i < d->num_devices; ++i) {
        double s = d->devices[i].flops_per_second;
        if (mpar__planner_bad(s) || (need && !(s > 0.0)))
            return mpar_error_set(err, MPAR_ERROR_INVALID_ARGUMENT,
                                  "planner: device %d: flops_per_second is %g; the FLOP model needs a finite value "
                                  "> 0 (or give measured tables for every part with flops)", i, s);
    }
    return MPAR_SUCCESS;
}

static mpar_result mpar__planner_check_tables(const mpar_plan_desc* d, mpar_error* err) {
    static const char* names[3] = {"measured_forward", "measured_backward_input", "measured_backward_weight"};
    const double* tab[3];
    int part;
    size_t i, n = (size_t)d->num_layers * (size_t)d->num_devices;
    tab[0] = d->measured_forward;
    tab[1] = d->measured_backward_input;
    tab[2] = d->measured_backward_weight;
    for (part = 0; part < 3; ++part)
        for (i = 0; tab[part] && i < n; ++i)
            if (mpar__planner_bad(tab[part][i]))
                return mpar_error_set(err, MPAR_ERROR_INVALID_ARGUMENT,
                                      "planner: %s[layer %d, device %d] is %g; seconds must be finite and >= 0",
                                      names[part], (int)(i / (size_t)d->num_devices),
                                      (int)(i % (size_t)d->num_devices), tab[part][i]);
    return MPAR_SUCCESS;
}

static mpar_result mpar__planner_check_links(const mpar_plan_desc* d, mpar_error* err) {
    int a, b, P = d->num_devices;
    for (a = 0; a < P && d->links; ++a)
        for (b = 0; b < P; ++b) {
            const mpar_plan_link* k = &d->links[a * P + b];
            if (a == b) continue;
            if (mpar__planner_bad(k->bandwidth) || mpar__planner_bad(k->latency) ||
                (k->bandwidth > 0.0 && mpar__planner_bad(1.0 / k->bandwidth)))
                return mpar_error_set(err, MPAR_ERROR_INVALID_ARGUMENT,
                                      "planner: link %d->%d: bandwidth %g (0 = unlimited, else > 0) and latency %g "
                                      "(>= 0) must be finite", a, b, k->bandwidth, k->latency);
        }
    return MPAR_SUCCESS;
}

static mpar_result mpar__planner_validate(const mpar_plan_desc* d, mpar_error* err) {
    mpar_result r = mpar__planner_check_basic(d, err);
    if (r == MPAR_SUCCESS) r = mpar__planner_check_layers(d, err);
    if (r == MPAR_SUCCESS) r = mpar__planner_check_devices(d, err);
    if (r == MPAR_SUCCESS) r = mpar__planner_check_tables(d, err);
    if (r == MPAR_SUCCESS) r = mpar__planner_check_links(d, err);
    return r;
}

/* ---- context setup ---- */

static double mpar__planner_part(const double* tab, double flops, double speed, size_t at) {
    if (tab) return tab[at];
    return flops > 0.0 ? flops / speed : 0.0;
}

static double mpar__planner_layer_cost(const mpar_plan_desc* d, int l, int dev) {
    const mpar_plan_layer* y = &d->layers[l];
    double s = d->devices[dev].flops_per_second;
    size_t at = (size_t)l * (size_t)d->num_devices + (size_t)dev;
    return mpar__planner_part(d->measured_forward, y->flops_forward, s, at) +
           mpar__planner_part(d->measured_backward_input, y->flops_backward_input, s, at) +
           mpar__planner_part(d->measured_backward_weight, y->flops_backward_weight, s, at);
}

static int mpar__planner_alloc(mpar__planner_ctx* c) {
    size_t L1 = (size_t)c->L + 1, P = (size_t)c->P, nm = (size_t)c->nmax;
    size_t nd = P * L1 + 4 * L1 + 3 * P * P + P + 2 * L1 + 2 * nm + 2 * nm * L1 + L1;
    size_t ni = L1 + nm * L1 + nm + P + 5 * P + nm + P * P + P * nm;
    double* dp = (double*)mpar__alloc_a(&c->d.allocator, nd * sizeof(double));
    int* ip = (int*)mpar__alloc_a(&c->d.allocator, ni * sizeof(int));
    if (!dp || !ip) {
        mpar__free_a(&c->d.allocator, dp);
        mpar__free_a(&c->d.allocator, ip);
        return 0;
    }
    c->cost = dp;       dp += P * L1;
    c->fixed = dp;      dp += L1;
    c->stash = dp;      dp += L1;
    c->out = dp;        dp += L1;
    c->key = dp;        dp += L1;
    c->lat2 = dp;       dp += P * P;
    c->inv2 = dp;       dp += P * P;
    c->mult_tab = dp;   dp += P * P;
    c->cap = dp;        dp += P;
    c->val[0] = dp;     dp += L1;
    c->val[1] = dp;     dp += L1;
    c->mult = dp;       dp += nm;
    c->scap = dp;       dp += nm;
    c->zero = dp;       dp += L1;
    c->xs = dp;         dp += nm * L1;
    c->xb = dp;
    c->deque = ip;      ip += L1; /* first: mpar__planner_ctx_free frees from here */
    c->parent = ip;     ip += nm * L1;
    c->ends = ip;       ip += nm;
    c->cls = ip;        ip += P;
    c->orders = ip;     ip += 5 * P;
    c->ovl = ip;        ip += P * P;
    c->place_tab = ip;  ip += P * nm;
    c->dev = ip;
    return 1;
}

static void mpar__planner_ctx_free(mpar__planner_ctx* c) {
    mpar__free_a(&c->d.allocator, c->cost);
    mpar__free_a(&c->d.allocator, c->deque);
    c->cost = NULL;
    c->deque = NULL;
}

static void mpar__planner_fill_memory(mpar__planner_ctx* c) {
    int l, i;
    c->fixed[0] = c->stash[0] = 0.0;
    for (l = 0; l < c->L; ++l) {
        const mpar_plan_layer* y = &c->d.layers[l];
        c->fixed[l + 1] = c->fixed[l] + (c->d.inference_only ? 1.0 : 2.0) * (double)y->param_bytes +
                          (double)y->optimizer_bytes;
        c->stash[l + 1] = c->stash[l] + (double)y->activation_bytes;
        c->out[l] = (double)y->output_bytes;
    }
    for (i = 0; i < c->P; ++i) {
        const mpar_plan_device* v = &c->d.devices[i];
        if (v->memory_bytes == 0) c->cap[i] = MPAR__PLANNER_INF;
        else c->cap[i] = v->memory_bytes > v->reserve_bytes ? (double)(v->memory_bytes - v->reserve_bytes) : 0.0;
    }
}

static void mpar__planner_fill_links(mpar__planner_ctx* c) {
    int a, b, P = c->P;
    for (a = 0; a < P; ++a)
        for (b = 0; b < P; ++b) {
            const mpar_plan_link* ab = c->d.links ? &c->d.links[a * P + b] : NULL;
            const mpar_plan_link* ba = c->d.links ? &c->d.links[b * P + a] : NULL;
            double lat = 0.0, inv = 0.0;
            if (ab && a != b) {
                lat = ab->latency + ba->latency;
                inv = (ab->bandwidth > 0.0 ? 1.0 / ab->bandwidth : 0.0) + (ba->bandwidth > 0.0 ? 1.0 / ba->bandwidth : 0.0);
            }
            c->lat2[a * P + b] = lat;
            c->inv2[a * P + b] = inv;
            c->ovl[a * P + b] = ab && a != b && ab->overlaps && ba->overlaps;
        }
}

/* Stash multipliers and chunk placement by devices used, from the
   schedule itself (section 6): generated once per k, not for every device
   sequence the search tries. A device with V chunks gives each chunk
   ceil(peak / V) of its peak (in chunk units) and 1/V of its memory. */
static mpar_result mpar__planner_fill_mult(mpar__planner_ctx* c, mpar_error* err) {
    int k, r;
    for (k = 1; k <= c->P; ++k) {
        mpar_schedule* sc = NULL;
        int V = k > 1 ? c->V : 1, whole;
        const mpar_schedule* given = c->d.schedule_lists;
        mpar_result res = given && given->stages == k && given->virtual_stages == V
                              ? mpar_schedule_copy(&c->d.allocator, given, &sc, err)
                              : mpar__sched_generate(&c->d.allocator, c->d.schedule, k, c->M, V, &sc, err);
        if (res != MPAR_SUCCESS) return res;
        whole = c->M / sc->microbatches; /* SEQUENTIAL: the batch is one micro-batch of M */
        if (k == 1) { /* a kind that runs the batch as one micro-batch, whatever M, does not pipeline */
            mpar_schedule* probe = NULL;
            res = mpar__sched_generate(&c->d.allocator, c->d.schedule, 1, 2, 1, &probe, err);
            if (res != MPAR_SUCCESS) {
                mpar_schedule_destroy(sc);
                return res;
            }
            c->pipelined = probe->microbatches > 1;
            mpar_schedule_destroy(probe);
        }
        for (r = 0; r < k; ++r)
            c->mult_tab[(k - 1) * c->P + r] = V > 1 ? (double)((sc->peak_in_flight[r] + V - 1) / V)
                                                    : (double)(sc->peak_in_flight[r] * whole);
        for (r = 0; r < k * V && r < c->nmax; ++r) c->place_tab[(k - 1) * c->nmax + r] = sc->placement[r];
        mpar_schedule_destroy(sc);
    }
    return MPAR_SUCCESS;
}

/* Fills prefix sums and link tables; rejects costs that overflow. */
static void mpar__planner_fill_bounds(mpar__planner_ctx* c) {
    size_t L1 = (size_t)c->L + 1;
    int d, l;
    c->min_sum = c->max_layer_min = 0.0;
    for (l = 0; l <= c->L; ++l) c->zero[l] = 0.0;
    for (l = 0; l < c->L; ++l) {
        double m = MPAR__PLANNER_INF;
        for (d = 0; d < c->P; ++d) {
            const double* C = c->cost + (size_t)d * L1;
            m = C[l + 1] - C[l] < m ? C[l + 1] - C[l] : m;
        }
        c->min_sum += m;
        c->max_layer_min = m > c->max_layer_min ? m : c->max_layer_min;
    }
    c->min_sum *= 1.0 - 1e-12; /* a bound, so keep it below rounding in the passes */
    c->max_layer_min *= 1.0 - 1e-12;
}

static mpar_result mpar__planner_fill(mpar__planner_ctx* c, mpar_error* err) {
    int d, l;
    double max_out = 0.0, max_x = 0.0, max_c = 0.0;
    size_t L1 = (size_t)c->L + 1;
    for (d = 0; d < c->P; ++d) {
        double* C = c->cost + (size_t)d * L1;
        C[0] = 0.0;
        for (l = 0; l < c->L; ++l) C[l + 1] = C[l] + mpar__planner_layer_cost(&c->d, l, d);
        if (mpar__planner_bad(C[c->L]))
            return mpar_error_set(err, MPAR_ERROR_INVALID_ARGUMENT, "planner: device %d: total compute overflows "
                                  "(%g s)", d, C[c->L]);
        if (C[c->L] > max_c) max_c = C[c->L];
    }
    mpar__planner_fill_memory(c);
    mpar__planner_fill_links(c);
    for (l = 0; l < c->L; ++l) max_out = c->out[l] > max_out ? c->out[l] : max_out;
    for (d = 0; d < c->P * c->P; ++d) {
        double x = c->lat2[d] + max_out * c->inv2[d];
        if (mpar__planner_bad(x))
            return mpar_error_set(err, MPAR_ERROR_INVALID_ARGUMENT, "planner: link %d->%d: transfer time overflows",
                                  d / c->P, d % c->P);
        max_x = x > max_x ? x : max_x;
    }
    c->scale = max_c + 2.0 * max_x;
    {
        mpar_result fr = mpar__planner_fill_mult(c, err);
        if (fr != MPAR_SUCCESS) return fr;
    }
    mpar__planner_fill_bounds(c);
    return MPAR_SUCCESS;
}

static mpar_result mpar__planner_ctx_init(mpar__planner_ctx* c, const mpar_plan_desc* desc, mpar_error* err) {
    long long nmax;
    memset(c, 0, sizeof *c);
    mpar__planner_defaults(desc, &c->d);
    c->L = c->d.num_layers;
    c->P = c->d.num_devices;
    c->M = c->d.microbatches;
    c->V = c->d.virtual_stages;
    c->rng = 0x9E3779B97F4A7C15ULL;
    if (c->V > 1 && (long long)c->M * c->V > 100000000LL)
        return mpar_error_set(err, MPAR_ERROR_INVALID_ARGUMENT, "planner: microbatches * virtual_stages (%d * %d) "
                              "is too large", c->M, c->V);
    nmax = (long long)c->P * c->V;
    if (nmax < c->P) nmax = c->P;
    c->nmax = (int)(nmax < c->L ? nmax : c->L);
    if (c->nmax < c->P) c->nmax = c->P; /* MANUAL may name more stages than layers: rejected, but sized */
    if (!mpar__planner_alloc(c))
        return mpar_error_set(err, MPAR_ERROR_OUT_OF_HOST_MEMORY, "planner: out of memory (%d layers, %d devices)",
                              c->L, c->P);
    return mpar__planner_fill(c, err);
}

/* ---- one device sequence ---- */

/* k devices in `order`; with interleaving each holds V chunks, chunk c on
   order[c % k]. Also tabulates the transfer over every possible cut of
   every boundary: the passes below read it once per layer. */
static void mpar__planner_seq(mpar__planner_ctx* c, const int* order, int k) {
    size_t L1 = (size_t)c->L + 1;
    int s, j;
    c->k = k;
    c->veff = k > 1 ? c->V : 1;
    c->n = k * c->veff;
    for (s = 0; s < c->n; ++s) {
        int at = c->place_tab[(k - 1) * c->nmax + s];
        c->dev[s] = order[at];
        c->scap[s] = c->cap[c->dev[s]] / c->veff;
        c->mult[s] = c->d.inference_only ? 1.0 : c->mult_tab[(k - 1) * c->P + at];
    }
    for (s = 0; s + 1 < c->n; ++s) {
        double* row = c->xb + (size_t)s * L1;
        size_t ab = (size_t)c->dev[s] * (size_t)c->P + (size_t)c->dev[s + 1];
        double* srow = c->xs + (size_t)s * L1;
        double lat = c->lat2[ab], inv = c->inv2[ab];
        row[0] = row[c->L] = 0.0; /* no cut there */
        for (j = 1; j < c->L; ++j) row[j] = lat + c->out[j - 1] * inv;
        for (j = 0; j <= c->L; ++j) srow[j] = c->ovl[ab] ? 0.0 : row[j];
    }
}

/* Transfers charged to stage s: over the cut before it (at layer i) and
   over the cut after it (at layer j). Zero rows at the chain's ends, and
   where the link overlaps compute. */
static const double* mpar__planner_xin_row(const mpar__planner_ctx* c, int s) {
    return s > 0 ? c->xs + (size_t)(s - 1) * ((size_t)c->L + 1) : c->zero;
}

static const double* mpar__planner_xout_row(const mpar__planner_ctx* c, int s) {
    return s + 1 < c->n ? c->xs + (size_t)s * ((size_t)c->L + 1) : c->zero;
}

/* The transfer over the cut before stage s, as the path counts it. */
static const double* mpar__planner_xpath_row(const mpar__planner_ctx* c, int s) {
    return s > 0 ? c->xb + (size_t)(s - 1) * ((size_t)c->L + 1) : c->zero;
}

static double mpar__planner_xin(const mpar__planner_ctx* c, int s, int i) { return mpar__planner_xin_row(c, s)[i]; }

static double mpar__planner_xout(const mpar__planner_ctx* c, int s, int j) { return mpar__planner_xout_row(c, s)[j]; }

static double mpar__planner_mem(const mpar__planner_ctx* c, int s, int i, int j) {
    return (c->fixed[j] - c->fixed[i]) + c->mult[s] * (c->stash[j] - c->stash[i]);
}

static int mpar__planner_fits(const mpar__planner_ctx* c, int s, int i, int j) {
    return c->ignore_memory || mpar__planner_mem(c, s, i, j) <= c->scap[s] + c->extra_cap;
}

enum { MPAR__PLANNER_FEASIBLE = 0, MPAR__PLANNER_SUM = 1, MPAR__PLANNER_CAPPED = 2 };

/* One stage of the chain DP, for FEASIBLE and SUM. A stage [i, j) takes
     t = (C[j] - C[i]) + xin[i] + xout[j]  <= limit
     <=>  key(i) = xin[i] - C[i]  <=  limit - C[j] - xout[j]
   and contributes (C[j] - C[i]) + xin[i] to the path. Start points that fit
   in memory form a window [lo(j), j-1] whose left end only moves right, so
   a monotone deque gives the least key in O(1) amortised. FEASIBLE:
   out[j] = 0 when some reachable start passes, else INF. SUM (no time
   limit): out[j] = least path. Parents go to par either way. */
static int mpar__planner_pass(mpar__planner_ctx* c, int s, const double* in, double* outv, int* par, int sum) {
    const double* C = c->cost + (size_t)c->dev[s] * ((size_t)c->L + 1);
    const double* xin = sum ? mpar__planner_xpath_row(c, s) : mpar__planner_xin_row(c, s);
    const double* xout = mpar__planner_xout_row(c, s);
    const double *fixed = c->fixed, *stash = c->stash; /* locals: the compiler cannot */
    double* key = c->key;                               /* assume c's arrays stay put  */
    int* deque = c->deque;
    double m = c->mult[s], room = c->ignore_memory ? MPAR__PLANNER_INF : c->scap[s] + c->extra_cap;
    double limit = c->limit;
    int head = 0, tail = 0, lo = 0, j, any = 0, L = c->L;
    outv[0] = MPAR__PLANNER_INF;
    for (j = 1; j <= L; ++j) {
        int i = j - 1;
        outv[j] = MPAR__PLANNER_INF;
        if (in[i] < MPAR__PLANNER_INF) {
            double k = in[i] + xin[i] - C[i];
            while (tail > head && key[tail - 1] >= k) --tail;
            deque[tail] = i;
            key[tail++] = k;
        }
        while ((fixed[j] - fixed[lo]) + m * (stash[j] - stash[lo]) > room) ++lo; /* = !mpar__planner_fits */
        while (head < tail && deque[head] < lo) ++head;
        if (head == tail || (!sum && key[head] > limit - C[j] - xout[j])) continue;
        outv[j] = sum ? C[j] + key[head] : 0.0;
        par[j] = deque[head];
        any = 1;
    }
    return any;
}

/* Least path with every stage time <= limit: the limit couples both ends
   of a stage, so this is the plain O(L^2) DP, kept to a tight inner loop
   over precomputed keys (same rearranged test as FEASIBLE). */
static int mpar__planner_pass_capped(mpar__planner_ctx* c, int s, const double* in, double* outv, int* par) {
    const double* C = c->cost + (size_t)c->dev[s] * ((size_t)c->L + 1);
    const double* xin = mpar__planner_xin_row(c, s);
    const double* xout = mpar__planner_xout_row(c, s);
    const double* xp = mpar__planner_xpath_row(c, s);
    double* g = c->key;
    int lo = 0, quick = 0, i, j, any = 0;
    for (i = 0; i <= c->L; ++i) g[i] = xin[i] - C[i];
    outv[0] = MPAR__PLANNER_INF;
    for (j = 1; j <= c->L; ++j) {
        double room = c->limit - C[j], bound = room - xout[j], best = MPAR__PLANNER_INF;
        int arg = -1;
        while (!mpar__planner_fits(c, s, lo, j)) ++lo;
        /* Compute alone over the limit: g[i] >= -C[i] > room >= bound for
           every such i (transfers are >= 0, rounding is monotone), and
           room only falls as j grows, so this start only moves right. */
        while (quick < j && -C[quick] > room) ++quick;
        for (i = lo > quick ? lo : quick; i < j; ++i)
            if (g[i] <= bound && in[i] + (xp[i] - C[i]) < best) {
                best = in[i] + (xp[i] - C[i]);
                arg = i;
            }
        outv[j] = arg >= 0 ? best + C[j] : MPAR__PLANNER_INF;
        par[j] = arg;
        any |= arg >= 0;
    }
    return any;
}

/* Runs the DP over all stages of the current sequence; returns the value at
   the last layer (INF when there is no plan). Parents are left in
   c->parent for mpar__planner_ends. */
static double mpar__planner_chain(mpar__planner_ctx* c, int mode, double limit) {
    double* in = c->val[0];
    double* outv = c->val[1];
    int s, j;
    c->limit = limit;
    for (j = 0; j <= c->L; ++j) in[j] = MPAR__PLANNER_INF;
    in[0] = 0.0;
    for (s = 0; s < c->n; ++s) {
        int* par = c->parent + (size_t)s * ((size_t)c->L + 1);
        double* t;
        int any = mode == MPAR__PLANNER_CAPPED ? mpar__planner_pass_capped(c, s, in, outv, par)
                                               : mpar__planner_pass(c, s, in, outv, par, mode == MPAR__PLANNER_SUM);
        if (!any) return MPAR__PLANNER_INF;
        t = in;
        in = outv;
        outv = t;
    }
    return in[c->L];
}

static int mpar__planner_feasible(mpar__planner_ctx* c, double limit) {
    return mpar__planner_chain(c, MPAR__PLANNER_FEASIBLE, limit) == 0.0;
}

/* Stage ends from the parents the last chain run left. */
static void mpar__planner_ends(mpar__planner_ctx* c) {
    int s;
    c->ends[c->n - 1] = c->L;
    for (s = c->n - 1; s > 0; --s) c->ends[s - 1] = c->parent[(size_t)s * ((size_t)c->L + 1) + (size_t)c->ends[s]];
}

/* Slowest stage of the plan the last successful chain run left. */
static double mpar__planner_plan_bottleneck(mpar__planner_ctx* c) {
    double worst = 0.0;
    int s;
    mpar__planner_ends(c);
    for (s = 0; s < c->n; ++s) {
        int i = s ? c->ends[s - 1] : 0, j = c->ends[s];
        const double* C = c->cost + (size_t)c->dev[s] * ((size_t)c->L + 1);
        double t = (C[j] - C[i]) + mpar__planner_xin(c, s, i) + mpar__planner_xout(c, s, j);
        worst = t > worst ? t : worst;
    }
    return worst;
}

/* No n-stage plan is faster than the fastest devices sharing the work
   evenly, nor than its most expensive layer on the fastest device. */
static double mpar__planner_lower_bound(const mpar__planner_ctx* c, int n) {
    double even = c->min_sum / (double)n;
    return even > c->max_layer_min ? even : c->max_layer_min;
}

/* Least bottleneck, to a relative MPAR__PLANNER_PREC, right after a
   successful FEASIBLE run at `limit`. Bisection between a lower bound and
   the best plan seen; a feasible probe drops the upper end to the slowest
   stage of the plan it found, not just to the probe, which saves most
   steps. */
static double mpar__planner_min_bottleneck(mpar__planner_ctx* c, double limit) {
    double hi = mpar__planner_plan_bottleneck(c), lo = mpar__planner_lower_bound(c, c->n);
    if (hi > limit) hi = limit; /* rounding between the two forms of t */
    while (hi - lo > MPAR__PLANNER_PREC * hi) {
        double mid = lo + 0.5 * (hi - lo);
        if (!(mid > lo && mid < hi)) break; /* adjacent doubles (subnormal costs) */
        if (mpar__planner_feasible(c, mid)) {
            double t = mpar__planner_plan_bottleneck(c);
            hi = t < mid ? t : mid;
        } else {
            lo = mid;
        }
    }
    return hi;
}

/* Cap for the path DP: the bottleneck plus the tie tolerance plus room for
   the rounding between the two ways stage times are summed. */
static double mpar__planner_cap_of(const mpar__planner_ctx* c, double bottleneck, int attempt) {
    double slack = 1e-12 * c->scale;
    int a;
    for (a = 0; a < attempt; ++a) slack *= 1000.0;
    return bottleneck * (1.0 + MPAR__PLANNER_TOL) + slack;
}

/* Least path among plans whose slowest stage is (about) `bottleneck`;
   parents left in c->parent. */
static double mpar__planner_capped_path(mpar__planner_ctx* c, double bottleneck) {
    int attempt;
    for (attempt = 0; attempt < 3; ++attempt) {
        double v = mpar__planner_chain(c, MPAR__PLANNER_CAPPED, mpar__planner_cap_of(c, bottleneck, attempt));
        if (v < MPAR__PLANNER_INF) return v;
    }
    return MPAR__PLANNER_INF;
}

/* ---- the search over device sequences ---- */

static int mpar__planner_veff(const mpar__planner_ctx* c, int k) { return k > 1 ? c->V : 1; }

typedef struct mpar__planner_best {
    int valid, k;
    int* order;
    double primary;   /* bottleneck (pipelined) or path (SEQUENTIAL) */
    double secondary; /* path under the bottleneck; < 0 until needed */
    int rough;        /* primary is only some plan's bottleneck (hill climb) */
} mpar__planner_best;

static void mpar__planner_adopt(mpar__planner_ctx* c, mpar__planner_best* b, const int* order, int k, double primary,
                                double secondary) {
    if (b->order != order) memcpy(b->order, order, (size_t)k * sizeof(int));
    (void)c;
    b->valid = 1;
    b->k = k;
    b->primary = primary;
    b->secondary = secondary;
    b->rough = 0;
}

/* Equal bottlenecks: the smaller path wins, then fewer devices. */
static int mpar__planner_tie(mpar__planner_ctx* c, mpar__planner_best* b, const int* order, int k, double t) {
    double path = mpar__planner_capped_path(c, t);
    if (b->secondary < 0.0) {
        mpar__planner_seq(c, b->order, b->k);
        b->secondary = mpar__planner_capped_path(c, b->primary);
    }
    if (path < b->secondary * (1.0 - MPAR__PLANNER_TOL) ||
        (path <= b->secondary * (1.0 + MPAR__PLANNER_TOL) && k < b->k)) {
        mpar__planner_adopt(c, b, order, k, t, path);
        return 1;
    }
    return 0;
}

/* Hill-climb step: a neighbour wins if it has any plan clearly faster than
   the incumbent; the plan found is its value, so there is no bisection per
   move (mpar__planner_climb tightens values before it stops). */
static int mpar__planner_consider_rough(mpar__planner_ctx* c, mpar__planner_best* b, const int* order, int k) {
    double limit = b->primary * (1.0 - MPAR__PLANNER_TOL), t;
    if (!mpar__planner_feasible(c, limit)) return 0;
    t = mpar__planner_plan_bottleneck(c);
    mpar__planner_adopt(c, b, order, k, t < limit ? t : limit, -1.0);
    b->rough = 1;
    return 1;
}

static int mpar__planner_consider_pipelined(mpar__planner_ctx* c, mpar__planner_best* b, const int* order, int k) {
    double hi = b->valid ? b->primary * (1.0 + MPAR__PLANNER_TOL) : MPAR__PLANNER_INF, t;
    if (c->rough && b->valid) return mpar__planner_consider_rough(c, b, order, k);
    /* One O(stages * layers) test rejects most sequences. */
    if (!mpar__planner_feasible(c, hi)) return 0;
    t = mpar__planner_min_bottleneck(c, hi); /* uses the plan that run found */
    if (b->valid && t >= b->primary * (1.0 - MPAR__PLANNER_TOL)) return mpar__planner_tie(c, b, order, k, t);
    mpar__planner_adopt(c, b, order, k, t, -1.0);
    return 1;
}

static int mpar__planner_consider_sequential(mpar__planner_ctx* c, mpar__planner_best* b, const int* order, int k) {
    double path = mpar__planner_chain(c, MPAR__PLANNER_SUM, MPAR__PLANNER_INF);
    if (!(path < MPAR__PLANNER_INF)) return 0;
    if (b->valid && (path > b->primary * (1.0 - MPAR__PLANNER_TOL)) &&
        !(path <= b->primary * (1.0 + MPAR__PLANNER_TOL) && k < b->k))
        return 0;
    mpar__planner_adopt(c, b, order, k, path, path);
    return 1;
}

/* Costs the sequence `order` (k devices) and makes it the incumbent if it
   beats `b`. Returns 1 when it did. */
static int mpar__planner_consider(mpar__planner_ctx* c, mpar__planner_best* b, const int* order, int k) {
    c->evaluations++;
    mpar__planner_seq(c, order, k);
    return c->pipelined ? mpar__planner_consider_pipelined(c, b, order, k)
                        : mpar__planner_consider_sequential(c, b, order, k);
}

/* Devices d and e are interchangeable when swapping them changes no cost:
   same compute row, same usable memory, and the link tables invariant. */
static int mpar__planner_same(const mpar__planner_ctx* c, int d, int e) {
    size_t L1 = (size_t)c->L + 1;
    int x, y, P = c->P;
    if (c->cap[d] != c->cap[e]) return 0;
    if (memcmp(c->cost + (size_t)d * L1, c->cost + (size_t)e * L1, L1 * sizeof(double)) != 0) return 0;
    for (x = 0; x < P; ++x)
        for (y = 0; y < P; ++y) {
            int px = x == d ? e : x == e ? d : x, py = y == d ? e : y == e ? d : y;
            if (c->lat2[px * P + py] != c->lat2[x * P + y] || c->inv2[px * P + py] != c->inv2[x * P + y] ||
                c->ovl[px * P + py] != c->ovl[x * P + y])
                return 0;
        }
    return 1;
}

static void mpar__planner_classes(mpar__planner_ctx* c) {
    int d, e;
    for (d = 0; d < c->P; ++d) {
        c->cls[d] = d;
        for (e = 0; e < d; ++e)
            if (c->cls[e] == e && mpar__planner_same(c, d, e)) {
                c->cls[d] = e;
                break;
            }
    }
}

/* Orbit representative: a device may be placed only after every lower
   interchangeable one, so identical devices appear once, in index order. */
static int mpar__planner_canonical(const mpar__planner_ctx* c, const int* used, int d) {
    int e;
    for (e = c->cls[d]; e < d; ++e)
        if (c->cls[e] == c->cls[d] && !used[e]) return 0;
    return 1;
}

static void mpar__planner_enum(mpar__planner_ctx* c, mpar__planner_best* b, int* order, int* used, int pos, int k) {
    int d;
    if (pos == k) {
        mpar__planner_consider(c, b, order, k);
        return;
    }
    for (d = 0; d < c->P; ++d) {
        if (used[d]) continue;
        if (c->d.order == MPAR_PLAN_ORDER_FIXED ? (pos > 0 && d < order[pos - 1]) : !mpar__planner_canonical(c, used, d))
            continue;
        used[d] = 1;
        order[pos] = d;
        mpar__planner_enum(c, b, order, used, pos + 1, k);
        used[d] = 0;
    }
}

/* Device sequences the exhaustive search would cost (saturates at 1e300). */
static double mpar__planner_count(const mpar__planner_ctx* c, int kmin, int kmax) {
    double total = 0.0;
    int k, i;
    for (k = kmin; k <= kmax; ++k) {
        double t = 1.0;
        for (i = 0; i < k; ++i)
            t *= c->d.order == MPAR_PLAN_ORDER_FIXED ? (double)(c->P - i) / (double)(i + 1) : (double)(c->P - i);
        total += t < 1e300 ? t : 1e300;
    }
    return total;
}

static void mpar__planner_sort_ints(int* v, int n) {
    int i, j;
    for (i = 1; i < n; ++i)
        for (j = i; j > 0 && v[j - 1] > v[j]; --j) {
            int t = v[j];
            v[j] = v[j - 1];
            v[j - 1] = t;
        }
}

static int mpar__planner_in(const int* v, int n, int x) {
    int i;
    for (i = 0; i < n; ++i)
        if (v[i] == x) return 1;
    return 0;
}

/* Costs one neighbour: 1 if it won, 0 if not, -1 when the budget is spent. */
static int mpar__planner_try(mpar__planner_ctx* c, mpar__planner_best* b, int* cand, long limit) {
    if (c->evaluations >= limit) return -1;
    if (c->d.order == MPAR_PLAN_ORDER_FIXED) mpar__planner_sort_ints(cand, b->k);
    return mpar__planner_consider(c, b, cand, b->k);
}

/* Order moves: swap two positions, or move one device to another position
   (the chain's links change at both places). */
static int mpar__planner_order_moves(mpar__planner_ctx* c, mpar__planner_best* b, const int* cur, int* cand,
                                     long limit) {
    int a, e, i, r, k = b->k;
    for (a = 0; a < k; ++a)
        for (e = 0; e < k; ++e) {
            if (e == a || (e == a - 1)) continue; /* moving to a-1 is the swap with a-1 */
            memcpy(cand, cur, (size_t)k * sizeof(int));
            if (e > a) {
                cand[a] = cur[e];
                cand[e] = cur[a];
            } else { /* cur[a] moves to e < a - 1, the ones between shift right */
                for (i = a; i > e; --i) cand[i] = cur[i - 1];
                cand[e] = cur[a];
            }
            if ((r = mpar__planner_try(c, b, cand, limit)) != 0) return r;
        }
    return 0;
}

/* One round of hill-climbing moves from b's sequence (the order moves, or
   an unused device in place of a used one); first improvement wins.
   Returns 1 after a win, 0 at a local optimum, -1 out of budget. */
static int mpar__planner_moves(mpar__planner_ctx* c, mpar__planner_best* b, int* cand, long limit) {
    int a, e, r, k = b->k;
    int* cur = c->orders + 4 * c->P; /* b->order changes when a move wins */
    memcpy(cur, b->order, (size_t)k * sizeof(int));
    if (c->d.order == MPAR_PLAN_ORDER_SEARCH && (r = mpar__planner_order_moves(c, b, cur, cand, limit)) != 0)
        return r;
    for (a = 0; a < k; ++a)
        for (e = 0; e < c->P; ++e) {
            if (mpar__planner_in(cur, k, e)) continue;
            memcpy(cand, cur, (size_t)k * sizeof(int));
            cand[a] = e;
            if ((r = mpar__planner_try(c, b, cand, limit)) != 0) return r;
        }
    return 0;
}

/* Exact bottleneck of a rough incumbent; 1 if it dropped (worth another
   round of moves). */
static int mpar__planner_tighten(mpar__planner_ctx* c, mpar__planner_best* b) {
    double before = b->primary, hi = before * (1.0 + MPAR__PLANNER_TOL);
    mpar__planner_seq(c, b->order, b->k);
    b->rough = 0;
    if (!mpar__planner_feasible(c, hi)) return 0; /* cannot happen: its plan exists */
    b->primary = mpar__planner_min_bottleneck(c, hi);
    return b->primary < before * (1.0 - MPAR__PLANNER_TOL);
}

static void mpar__planner_climb(mpar__planner_ctx* c, mpar__planner_best* global, const int* seed, int k, long per) {
    int* local_order = c->orders + c->P;
    int* cand = c->orders + 2 * c->P;
    long limit = c->evaluations + per;
    mpar__planner_best local;
    memset(&local, 0, sizeof local);
    local.order = local_order;
    memcpy(cand, seed, (size_t)k * sizeof(int));
    if (c->d.order == MPAR_PLAN_ORDER_FIXED) mpar__planner_sort_ints(cand, k);
    if (!mpar__planner_consider(c, &local, cand, k)) {
        /* An infeasible seed: adopt the first feasible neighbour. */
        local.k = k;
        memcpy(local.order, cand, (size_t)k * sizeof(int));
    }
    c->rough = 1;
    for (;;) {
        while (mpar__planner_moves(c, &local, cand, limit) > 0) {
        }
        if (!local.rough || c->evaluations >= limit || !mpar__planner_tighten(c, &local)) break;
    }
    c->rough = 0;
    if (local.valid) mpar__planner_consider(c, global, local.order, k);
}

/* A device count whose lower bound already loses needs no search. */
static int mpar__planner_skip(const mpar__planner_ctx* c, const mpar__planner_best* b, int k) {
    return c->pipelined && b->valid &&
           mpar__planner_lower_bound(c, k * mpar__planner_veff(c, k)) > b->primary * (1.0 + MPAR__PLANNER_TOL);
}

/* A random k-subset in random order (xorshift; the state lives in the
   context, so plans are reproducible and independent). */
static void mpar__planner_random_seed(mpar__planner_ctx* c, int* seed) {
    int i;
    for (i = 0; i < c->P; ++i) seed[i] = i;
    for (i = c->P - 1; i > 0; --i) {
        int j, t;
        c->rng ^= c->rng << 13;
        c->rng ^= c->rng >> 7;
        c->rng ^= c->rng << 17;
        j = (int)(c->rng % (uint64_t)(i + 1));
        t = seed[i];
        seed[i] = seed[j];
        seed[j] = t;
    }
}

/* Devices by total compute, fastest first. */
static void mpar__planner_fastest_first(const mpar__planner_ctx* c, int* fast) {
    size_t L = (size_t)c->L;
    int i, j;
    for (i = 0; i < c->P; ++i) fast[i] = i;
    for (i = 1; i < c->P; ++i)
        for (j = i; j > 0 && c->cost[(size_t)fast[j] * (L + 1) + L] < c->cost[(size_t)fast[j - 1] * (L + 1) + L]; --j) {
            int t = fast[j];
            fast[j] = fast[j - 1];
            fast[j - 1] = t;
        }
}

/* More sequences than the budget: hill climbs for every device count (most
   devices first, counts whose lower bound loses skipped) from the index
   order and the fastest-first order, then from random seeds until the
   budget is spent. */
static void mpar__planner_heuristic(mpar__planner_ctx* c, mpar__planner_best* b, int kmin, int kmax) {
    int* fast = c->orders + 3 * c->P;
    int* seed = c->orders + 4 * c->P; /* free while no climb runs */
    int i, k, climbed = 1;
    long per = c->d.order_budget / (2L * (kmax - kmin + 1));
    if (per < 16) per = 16;
    mpar__planner_fastest_first(c, fast);
    for (k = kmax; k >= kmin; --k) {
        if (mpar__planner_skip(c, b, k)) continue;
        for (i = 0; i < k; ++i) seed[i] = i;
        mpar__planner_climb(c, b, seed, k, per);
        mpar__planner_climb(c, b, fast, k, per);
    }
    while (climbed && c->evaluations < c->d.order_budget) {
        climbed = 0;
        for (k = kmax; k >= kmin && c->evaluations < c->d.order_budget; --k) {
            if (mpar__planner_skip(c, b, k)) continue;
            mpar__planner_random_seed(c, seed);
            mpar__planner_climb(c, b, seed, k, per);
            climbed = 1;
        }
    }
}

/* ---- plan assembly ---- */

static void mpar__planner_label(const mpar__planner_ctx* c, int d, char* buf, size_t size) {
    const char* name = c->d.devices[d].name;
    if (name && name[0]) snprintf(buf, size, "device %d ('%.60s')", d, name);
    else snprintf(buf, size, "device %d", d);
}

static double mpar__planner_step(const mpar__planner_ctx* c, const mpar_plan* p) {
    double slowest = 0.0;
    int d, s;
    if (!c->pipelined) return (double)c->M * p->path_seconds;
    for (d = 0; d < c->P; ++d) {
        double sum = 0.0;
        for (s = 0; s < p->num_stages; ++s)
            if (p->stages[s].device == d) sum += p->stages[s].time_seconds;
        slowest = sum > slowest ? sum : slowest;
    }
    return (double)(c->M - 1) * slowest + (p->path_seconds + (double)(c->veff - 1) * slowest) / (double)c->veff;
}

/* The slowest stage: compute-bound or link-bound. */
static void mpar__planner_bind_stage(const mpar__planner_ctx* c, mpar_plan* p) {
    mpar_plan_binding* b = &p->binding;
    int s, w = 0;
    char who[96];
    for (s = 1; s < p->num_stages; ++s)
        if (p->stages[s].time_seconds > p->stages[w].time_seconds) w = s;
    b->stage = w;
    b->device = p->stages[w].device;
    b->device_to = -1;
    mpar__planner_label(c, b->device, who, sizeof who);
    if (p->stages[w].transfer_seconds > p->stages[w].compute_seconds) {
        int before = w > 0 ? w : 1;
        double xin = w > 0 ? mpar__planner_xin(c, w, p->stages[w].first_layer) : 0.0;
        double xout = w + 1 < p->num_stages ? mpar__planner_xout(c, w, p->stages[w].last_layer + 1) : 0.0;
        if (xout >= xin) before = w + 1;
        b->kind = MPAR_PLAN_BINDING_LINK;
        b->device = p->stages[before - 1].device;
        b->device_to = p->stages[before].device;
        snprintf(b->text, sizeof b->text, "link %d->%d sets the pace: stage %d spends %.6g s per micro-batch on "
                 "transfers against %.6g s of compute", b->device, b->device_to, w, p->stages[w].transfer_seconds,
                 p->stages[w].compute_seconds);
    } else {
        b->kind = MPAR_PLAN_BINDING_COMPUTE;
        snprintf(b->text, sizeof b->text, "compute of stage %d (%s, layers %d-%d) sets the pace: %.6g s per "
                 "micro-batch, %.6g s of it transfers", w, who, p->stages[w].first_layer, p->stages[w].last_layer,
                 p->stages[w].time_seconds, p->stages[w].transfer_seconds);
    }
}

/* From p->allocator, which mpar_plan_create set. */
static int mpar__planner_plan_alloc(mpar_plan* p, int n, int P) {
    p->stages = (mpar_plan_stage*)mpar__alloc_a(&p->allocator, (size_t)n * sizeof(mpar_plan_stage));
    p->device_memory_bytes = (uint64_t*)mpar__alloc_a(&p->allocator, (size_t)P * sizeof(uint64_t));
    p->device_capacity_bytes = (uint64_t*)mpar__alloc_a(&p->allocator, (size_t)P * sizeof(uint64_t));
    if (!p->stages || !p->device_memory_bytes || !p->device_capacity_bytes) {
        mpar_plan_free(p);
        return 0;
    }
    memset(p->stages, 0, (size_t)n * sizeof(mpar_plan_stage));
    memset(p->device_memory_bytes, 0, (size_t)P * sizeof(uint64_t));
    p->num_stages = n;
    p->num_devices = P;
    return 1;
}

static void mpar__planner_cost_stage(const mpar__planner_ctx* c, int s, int i, int j, mpar_plan_stage* st) {
    const double* C = c->cost + (size_t)c->dev[s] * ((size_t)c->L + 1);
    st->device = c->dev[s];
    st->first_layer = i;
    st->last_layer = j - 1;
    st->in_flight = (int)c->mult[s];
    st->compute_seconds = C[j] - C[i];
    st->transfer_seconds = mpar__planner_xin(c, s, i) + mpar__planner_xout(c, s, j);
    st->time_seconds = st->compute_seconds + st->transfer_seconds;
    st->memory_bytes = mpar__planner_u64(mpar__planner_mem(c, s, i, j));
}

/* Memory overflow of a stage: DOES_NOT_FIT naming device and shortfall. */
static mpar_result mpar__planner_overflow(const mpar__planner_ctx* c, const mpar_plan_stage* st, int s,
                                          mpar_error* err) {
    char who[96];
    double need = mpar__planner_mem(c, s, st->first_layer, st->last_layer + 1), have = c->scap[s];
    mpar__planner_label(c, st->device, who, sizeof who);
    return mpar_error_set(err, MPAR_ERROR_DOES_NOT_FIT, "planner: stage %d (layers %d-%d) needs %llu bytes on %s "
                          "but %llu are usable%s: %llu bytes missing", s, st->first_layer, st->last_layer,
                          mpar__planner_u64(need), who, mpar__planner_u64(have),
                          c->veff > 1 ? " (1/V of the device)" : "", mpar__planner_u64(need - have));
}

/* Costs the current sequence cut at c->ends into *p. */
static mpar_result mpar__planner_build(mpar__planner_ctx* c, mpar_plan* p, mpar_error* err) {
    int s, d;
    if (!mpar__planner_plan_alloc(p, c->n, c->P))
        return mpar_error_set(err, MPAR_ERROR_OUT_OF_HOST_MEMORY, "planner: out of memory for the plan");
    for (d = 0; d < c->P; ++d)
        p->device_capacity_bytes[d] = c->cap[d] < MPAR__PLANNER_INF ? mpar__planner_u64(c->cap[d]) : 0;
    for (s = 0; s < c->n; ++s) {
        mpar_plan_stage* st = &p->stages[s];
        mpar__planner_cost_stage(c, s, s ? c->ends[s - 1] : 0, c->ends[s], st);
        if (!mpar__planner_fits(c, s, st->first_layer, st->last_layer + 1)) {
            mpar_result r = mpar__planner_overflow(c, st, s, err);
            mpar_plan_free(p);
            return r;
        }
        p->device_memory_bytes[st->device] += st->memory_bytes;
        if (p->device_memory_bytes[st->device] < st->memory_bytes) p->device_memory_bytes[st->device] = ~0ULL;
        p->path_seconds += st->compute_seconds + mpar__planner_xpath_row(c, s)[st->first_layer];
        if (st->time_seconds > p->bottleneck_seconds) p->bottleneck_seconds = st->time_seconds;
    }
    p->schedule = c->d.schedule;
    p->microbatches = c->M;
    p->virtual_stages = c->veff;
    p->step_seconds = mpar__planner_step(c, p);
    mpar__planner_bind_stage(c, p);
    return MPAR_SUCCESS;
}

/* ---- OPTIMAL ---- */

/* Before searching: a layer that fits on no device in any position. */
static mpar_result mpar__planner_check_layer_fit(mpar__planner_ctx* c, int kmin, int kmax, mpar_error* err) {
    int l, k, r, d, best_dev = 0;
    for (d = 1; d < c->P; ++d)
        if (c->cap[d] > c->cap[best_dev]) best_dev = d;
    for (l = 0; l < c->L; ++l) {
        double fixed = c->fixed[l + 1] - c->fixed[l], stash = c->stash[l + 1] - c->stash[l], need_min = 0.0;
        int fits = 0, m_min = 0;
        for (k = kmin; k <= kmax && !fits; ++k)
            for (r = 0; r < k && !fits; ++r) {
                double m = c->mult_tab[(k - 1) * c->P + r], need = fixed + m * stash;
                fits = need <= c->cap[best_dev] / mpar__planner_veff(c, k);
                if (need_min == 0.0 || need < need_min) {
                    need_min = need;
                    m_min = (int)m;
                }
            }
        if (!fits) {
            char who[96];
            mpar__planner_label(c, best_dev, who, sizeof who);
            return mpar_error_set(err, MPAR_ERROR_DOES_NOT_FIT, "planner: layer %d needs %llu bytes (%llu for "
                                  "parameters, gradients and optimizer state + %llu activations x %d in flight) but "
                                  "the most usable memory is %llu bytes on %s: it fits on no device", l,
                                  mpar__planner_u64(need_min), mpar__planner_u64(fixed), mpar__planner_u64(stash),
                                  m_min, mpar__planner_u64(c->cap[best_dev]), who);
        }
    }
    return MPAR_SUCCESS;
}

/* No plan fits: the least extra memory that would make one fit on the
   first kmax devices in index order, and the device that lacks it. */
static mpar_result mpar__planner_shortfall(mpar__planner_ctx* c, int kmax, mpar_error* err) {
    int* order = c->orders + 4 * c->P;
    int s, worst = 0;
    uint64_t lo = 0, hi;
    double over = -MPAR__PLANNER_INF;
    char who[96];
    for (s = 0; s < kmax; ++s) order[s] = s;
    mpar__planner_seq(c, order, kmax);
    hi = mpar__planner_bits(c->fixed[c->L] + (double)c->M * c->stash[c->L] + 1.0);
    while (hi - lo > 1) { /* lo: no plan, hi: a plan (bit order = value order) */
        uint64_t mid = lo + (hi - lo) / 2;
        c->extra_cap = mpar__planner_from_bits(mid);
        if (mpar__planner_feasible(c, MPAR__PLANNER_INF)) hi = mid;
        else lo = mid;
    }
    c->extra_cap = mpar__planner_from_bits(hi);
    mpar__planner_chain(c, MPAR__PLANNER_SUM, MPAR__PLANNER_INF);
    c->extra_cap = 0.0;
    mpar__planner_ends(c);
    for (s = 0; s < c->n; ++s) {
        int i = s ? c->ends[s - 1] : 0;
        double o = mpar__planner_mem(c, s, i, c->ends[s]) - c->scap[s];
        if (o > over) {
            over = o;
            worst = s;
        }
    }
    mpar__planner_label(c, c->dev[worst], who, sizeof who);
    return mpar_error_set(err, MPAR_ERROR_DOES_NOT_FIT, "planner: no plan fits in memory (%s, %d micro-batches): "
                          "even the best-fitting split over the first %d devices in index order is %llu bytes "
                          "short on %s (stage %d, layers %d-%d, needs %llu of %llu usable): %llu bytes missing",
                          mpar__planner_kind_name(c->d.schedule), c->M, kmax, mpar__planner_u64(over), who, worst,
                          worst ? c->ends[worst - 1] : 0, c->ends[worst] - 1,
                          mpar__planner_u64(mpar__planner_mem(c, worst, worst ? c->ends[worst - 1] : 0,
                                                              c->ends[worst])),
                          mpar__planner_u64(c->scap[worst]), mpar__planner_u64(over));
}

/* OPTIMAL's memory binding: would the same devices do better unlimited? */
static void mpar__planner_bind_memory(mpar__planner_ctx* c, mpar_plan* p, double primary) {
    double relaxed, worst = -1.0;
    int d, s;
    char who[96];
    c->ignore_memory = 1;
    if (c->pipelined) {
        mpar__planner_feasible(c, MPAR__PLANNER_INF); /* always true without memory limits */
        relaxed = mpar__planner_min_bottleneck(c, MPAR__PLANNER_INF);
    } else {
        relaxed = mpar__planner_chain(c, MPAR__PLANNER_SUM, MPAR__PLANNER_INF);
    }
    c->ignore_memory = 0;
    if (!(relaxed < primary * (1.0 - MPAR__PLANNER_TOL))) return;
    p->binding.kind = MPAR_PLAN_BINDING_MEMORY;
    p->binding.device_to = -1;
    for (d = 0; d < c->P; ++d) {
        double use;
        if (!(c->cap[d] < MPAR__PLANNER_INF) || p->device_memory_bytes[d] == 0) continue;
        use = c->cap[d] > 0.0 ? (double)p->device_memory_bytes[d] / c->cap[d] : 1.0;
        if (use > worst) {
            worst = use;
            p->binding.device = d;
        }
    }
    for (s = p->num_stages - 1; s >= 0; --s)
        if (p->stages[s].device == p->binding.device) p->binding.stage = s;
    mpar__planner_label(c, p->binding.device, who, sizeof who);
    snprintf(p->binding.text, sizeof p->binding.text, "memory of %s binds: %llu of %llu usable bytes (%.1f%%); "
             "without memory limits the same devices would reach %.6g s instead of %.6g s (%s)", who,
             (unsigned long long)p->device_memory_bytes[p->binding.device],
             mpar__planner_u64(c->cap[p->binding.device]), 100.0 * worst, relaxed, primary,
             c->pipelined ? "slowest stage" : "path");
}

static mpar_result mpar__planner_stage_range(mpar__planner_ctx* c, int* kmin, int* kmax, mpar_error* err) {
    int k;
    *kmin = 1;
    *kmax = 0;
    if (c->d.use_devices > 0) {
        k = c->d.use_devices;
        if ((long long)k * mpar__planner_veff(c, k) > c->L)
            return mpar_error_set(err, MPAR_ERROR_INVALID_PLAN, "planner: more stages (%d devices x %d) than layers "
                                  "(%d)", k, mpar__planner_veff(c, k), c->L);
        *kmin = *kmax = k;
        return MPAR_SUCCESS;
    }
    for (k = 1; k <= c->P; ++k)
        if ((long long)k * mpar__planner_veff(c, k) <= c->L) *kmax = k;
    return MPAR_SUCCESS;
}

static mpar_result mpar__planner_finish_optimal(mpar__planner_ctx* c, mpar__planner_best* b, int exact,
                                                mpar_plan* p, mpar_error* err) {
    mpar_result r;
    double v;
    mpar__planner_seq(c, b->order, b->k);
    v = c->pipelined ? mpar__planner_capped_path(c, b->primary)
                     : mpar__planner_chain(c, MPAR__PLANNER_SUM, MPAR__PLANNER_INF);
    if (!(v < MPAR__PLANNER_INF)) /* never seen; any plan that fits beats garbage parents */
        mpar__planner_chain(c, MPAR__PLANNER_FEASIBLE, MPAR__PLANNER_INF);
    mpar__planner_ends(c);
    r = mpar__planner_build(c, p, err);
    if (r != MPAR_SUCCESS) return r;
    p->exact = exact;
    p->orders_evaluated = c->evaluations;
    mpar__planner_bind_memory(c, p, c->pipelined ? p->bottleneck_seconds : p->path_seconds);
    return MPAR_SUCCESS;
}

static mpar_result mpar__planner_optimal(mpar__planner_ctx* c, mpar_plan* p, mpar_error* err) {
    mpar__planner_best b;
    int kmin, kmax, k, exact;
    mpar_result r = mpar__planner_stage_range(c, &kmin, &kmax, err);
    if (r == MPAR_SUCCESS) r = mpar__planner_check_layer_fit(c, kmin, kmax, err);
    if (r != MPAR_SUCCESS) return r;
    memset(&b, 0, sizeof b);
    b.order = c->orders;
    exact = mpar__planner_count(c, kmin, kmax) <= (double)c->d.order_budget;
    if (exact) {
        int* used = c->orders + 4 * c->P;
        int* order = c->orders + 2 * c->P;
        memset(used, 0, (size_t)c->P * sizeof(int));
        if (c->d.order == MPAR_PLAN_ORDER_SEARCH) mpar__planner_classes(c);
        for (k = kmax; k >= kmin; --k)
            if (!mpar__planner_skip(c, &b, k)) mpar__planner_enum(c, &b, order, used, 0, k);
    } else {
        mpar__planner_heuristic(c, &b, kmin, kmax);
    }
    if (!b.valid) return mpar__planner_shortfall(c, kmax, err);
    return mpar__planner_finish_optimal(c, &b, exact, p, err);
}

/* ---- PROPORTIONAL ---- */

static mpar_result mpar__planner_check_weights(const mpar__planner_ctx* c, mpar_error* err) {
    int d;
    double total = 0.0;
    if (!c->d.weights)
        return mpar_error_set(err, MPAR_ERROR_INVALID_ARGUMENT, "planner: PROPORTIONAL needs weights (one per device)");
    for (d = 0; d < c->P; ++d) {
        if (mpar__planner_bad(c->d.weights[d]))
            return mpar_error_set(err, MPAR_ERROR_INVALID_ARGUMENT, "planner: weight of device %d is %g, must be "
                                  "finite and >= 0", d, c->d.weights[d]);
        total += c->d.weights[d];
    }
    if (!(total > 0.0) || mpar__planner_bad(total))
        return mpar_error_set(err, MPAR_ERROR_INVALID_ARGUMENT, "planner: weights sum to %g, need a positive "
                              "finite sum", total);
    return MPAR_SUCCESS;
}

/* Cut s ends where the reference cost (the mean over devices) is nearest
   its weight share, keeping every stage at least one layer. */
static void mpar__planner_proportional_cuts(mpar__planner_ctx* c) {
    double* ref = c->val[0];
    double total_w = 0.0, cum = 0.0;
    int s, j, d;
    size_t L1 = (size_t)c->L + 1;
    for (j = 0; j <= c->L; ++j) {
        ref[j] = 0.0;
        for (d = 0; d < c->P; ++d) ref[j] += c->cost[(size_t)d * L1 + (size_t)j] / c->P;
    }
    if (!(ref[c->L] > 0.0)) /* no costs at all: split by layer count */
        for (j = 0; j <= c->L; ++j) ref[j] = (double)j;
    for (s = 0; s < c->n; ++s) total_w += c->d.weights[c->dev[s]];
    for (s = 0; s < c->n; ++s) {
        int lo = s ? c->ends[s - 1] + 1 : 1, hi = c->L - (c->n - 1 - s), best = hi;
        double target;
        cum += c->d.weights[c->dev[s]];
        target = ref[c->L] * cum / total_w;
        for (j = hi; j >= lo; --j)
            if (fabs(ref[j] - target) <= fabs(ref[best] - target)) best = j;
        c->ends[s] = best;
    }
    c->ends[c->n - 1] = c->L;
}

static mpar_result mpar__planner_proportional(mpar__planner_ctx* c, mpar_plan* p, mpar_error* err) {
    int* order = c->orders;
    int d, k = 0;
    mpar_result r = mpar__planner_check_weights(c, err);
    if (r != MPAR_SUCCESS) return r;
    for (d = 0; d < c->P; ++d)
        if (c->d.weights[d] > 0.0) order[k++] = d;
    if ((long long)k * mpar__planner_veff(c, k) > c->L)
        return mpar_error_set(err, MPAR_ERROR_INVALID_PLAN, "planner: more stages (%d devices x %d) than layers (%d)",
                              k, mpar__planner_veff(c, k), c->L);
    mpar__planner_seq(c, order, k);
    mpar__planner_proportional_cuts(c);
    return mpar__planner_build(c, p, err);
}

/* ---- MANUAL ---- */

static mpar_result mpar__planner_check_stage(const mpar_plan_stage* st, int s, int L, int P, mpar_error* err) {
    const mpar_result bad = MPAR_ERROR_INVALID_PLAN;
    if (st->device < 0 || st->device >= P)
        return mpar_error_set(err, bad, "planner: stage %d: device %d is out of range 0..%d", s, st->device, P - 1);
    if (st->first_layer < 0 || st->last_layer >= L || st->first_layer > st->last_layer)
        return mpar_error_set(err, bad, "planner: stage %d: layers %d-%d are not a range inside 0..%d", s,
                              st->first_layer, st->last_layer, L - 1);
    return MPAR_SUCCESS;
}

/* Stage s must start right after stage s - 1 ends. */
static mpar_result mpar__planner_check_next(const mpar_plan_stage* st, int s, mpar_error* err) {
    const mpar_result bad = MPAR_ERROR_INVALID_PLAN;
    int expect = s ? st[s - 1].last_layer + 1 : 0;
    if (st[s].first_layer > expect)
        return mpar_error_set(err, bad, "planner: gap: layers %d-%d are in no stage (stage %d starts at layer %d)",
                              expect, st[s].first_layer - 1, s, st[s].first_layer);
    if (st[s].first_layer == expect) return MPAR_SUCCESS;
    if (st[s].last_layer < st[s - 1].first_layer)
        return mpar_error_set(err, bad, "planner: stages out of order: stage %d (layers %d-%d) comes after stage %d "
                              "(layers %d-%d)", s, st[s].first_layer, st[s].last_layer, s - 1,
                              st[s - 1].first_layer, st[s - 1].last_layer);
    return mpar_error_set(err, bad, "planner: overlap: layers %d-%d are in both stage %d and stage %d",
                          st[s].first_layer > st[s - 1].first_layer ? st[s].first_layer : st[s - 1].first_layer,
                          st[s].last_layer < st[s - 1].last_layer ? st[s].last_layer : st[s - 1].last_layer, s - 1,
                          s);
}

static mpar_result mpar__planner_check_ranges(const mpar_plan_stage* st, int n, int L, int P, mpar_error* err) {
    int s;
    mpar_result r;
    if (n < 1) return mpar_error_set(err, MPAR_ERROR_INVALID_PLAN, "planner: the plan has no stages");
    if (n > L)
        return mpar_error_set(err, MPAR_ERROR_INVALID_PLAN, "planner: more stages (%d) than layers (%d)", n, L);
    for (s = 0; s < n; ++s)
        if ((r = mpar__planner_check_stage(&st[s], s, L, P, err)) != MPAR_SUCCESS) return r;
    for (s = 0; s < n; ++s)
        if ((r = mpar__planner_check_next(st, s, err)) != MPAR_SUCCESS) return r;
    if (st[n - 1].last_layer != L - 1)
        return mpar_error_set(err, MPAR_ERROR_INVALID_PLAN, "planner: gap: layers %d-%d are in no stage",
                              st[n - 1].last_layer + 1, L - 1);
    return MPAR_SUCCESS;
}

/* Without interleaving each device holds one stage; with V > 1 on k
   devices, stage s must be on the device of stage s mod k. Sets k. */
static mpar_result mpar__planner_check_use(const mpar__planner_ctx* c, const mpar_plan_stage* st, int n, int* k_out,
                                           mpar_error* err) {
    int s, t, k = n;
    if (c->V > 1 && n > 1) {
        if (n % c->V != 0 || n == c->V)
            return mpar_error_set(err, MPAR_ERROR_INVALID_PLAN, "planner: interleaved 1F1B with %d virtual stages "
                                  "needs (2 or more devices) x %d stages, got %d", c->V, c->V, n);
        k = n / c->V;
        for (s = k; s < n; ++s) {
            int at = c->place_tab[(k - 1) * c->nmax + s];
            if (st[s].device != st[at].device)
                return mpar_error_set(err, MPAR_ERROR_INVALID_PLAN, "planner: stage %d is on device %d but the "
                                      "%s schedule places it with stage %d, on device %d", s, st[s].device,
                                      mpar_schedule_kind_name(c->d.schedule), at, st[at].device);
        }
    }
    for (s = 0; s < k; ++s)
        for (t = 0; t < s; ++t)
            if (st[s].device == st[t].device)
                return mpar_error_set(err, MPAR_ERROR_INVALID_PLAN, "planner: device %d is used by stage %d and "
                                      "stage %d", st[s].device, t, s);
    *k_out = k;
    return MPAR_SUCCESS;
}

/* Per-layer devices -> ranges. Without interleaving a device's layers must
   be one run: round robin (0,1,2,0,...) fails at the first repeat. */
static mpar_result mpar__planner_runs(const mpar__planner_ctx* c, mpar_plan_stage* st, int* n, mpar_error* err) {
    const int* ld = c->d.manual_layer_devices;
    int l, s, count = 0;
    for (l = 0; l < c->L; ++l) {
        if (ld[l] < 0 || ld[l] >= c->P)
            return mpar_error_set(err, MPAR_ERROR_INVALID_PLAN, "planner: layer %d: device %d is out of range 0..%d",
                                  l, ld[l], c->P - 1);
        if (count > 0 && st[count - 1].device == ld[l]) {
            st[count - 1].last_layer = l;
            continue;
        }
        for (s = 0; s < count && c->V <= 1; ++s)
            if (st[s].device == ld[l])
                return mpar_error_set(err, MPAR_ERROR_INVALID_PLAN, "planner: layers not contiguous: layer %d is on "
                                      "device %d, which already holds layers %d-%d, with layer %d on device %d in "
                                      "between", l, ld[l], st[s].first_layer, st[s].last_layer, l - 1, ld[l - 1]);
        st[count].device = ld[l];
        st[count].first_layer = st[count].last_layer = l;
        ++count;
    }
    *n = count;
    return MPAR_SUCCESS;
}

static mpar_result mpar__planner_manual_cost(mpar__planner_ctx* c, const mpar_plan_stage* st, int n, mpar_plan* p,
                                             mpar_error* err) {
    int s, k = n;
    int* order = c->orders;
    mpar_result r = mpar__planner_check_ranges(st, n, c->L, c->P, err);
    if (r == MPAR_SUCCESS) r = mpar__planner_check_use(c, st, n, &k, err);
    if (r != MPAR_SUCCESS) return r;
    for (s = 0; s < k; ++s) order[s] = st[s].device;
    mpar__planner_seq(c, order, k);
    for (s = 0; s < n; ++s) c->ends[s] = st[s].last_layer + 1;
    r = mpar__planner_build(c, p, err);
    for (s = 0; r == MPAR_SUCCESS && s < n && s < p->num_stages; ++s) p->stages[s].recompute = st[s].recompute;
    return r;
}

static mpar_result mpar__planner_manual(mpar__planner_ctx* c, mpar_plan* p, mpar_error* err) {
    mpar_plan_stage* st;
    int n = 0;
    mpar_result r;
    if (c->d.manual_stages) {
        if (c->d.num_manual_stages < 1)
            return mpar_error_set(err, MPAR_ERROR_INVALID_PLAN, "planner: the plan has no stages (num_manual_stages "
                                  "is %d)", c->d.num_manual_stages);
        if (c->d.num_manual_stages > c->nmax)
            return mpar_error_set(err, MPAR_ERROR_INVALID_PLAN, "planner: %d stages: more than layers (%d) or "
                                  "devices x virtual stages allow", c->d.num_manual_stages, c->L);
        return mpar__planner_manual_cost(c, c->d.manual_stages, c->d.num_manual_stages, p, err);
    }
    if (!c->d.manual_layer_devices)
        return mpar_error_set(err, MPAR_ERROR_INVALID_ARGUMENT, "planner: MANUAL needs manual_stages or "
                              "manual_layer_devices");
    st = (mpar_plan_stage*)mpar__alloc_a(&c->d.allocator, (size_t)c->L * sizeof(mpar_plan_stage));
    if (!st) return mpar_error_set(err, MPAR_ERROR_OUT_OF_HOST_MEMORY, "planner: out of memory");
    memset(st, 0, (size_t)c->L * sizeof(mpar_plan_stage));
    r = mpar__planner_runs(c, st, &n, err);
    if (r == MPAR_SUCCESS && n > c->nmax)
        r = mpar_error_set(err, MPAR_ERROR_INVALID_PLAN, "planner: %d runs of layers, more than %d devices x %d "
                           "virtual stages", n, c->P, c->V);
    if (r == MPAR_SUCCESS) r = mpar__planner_manual_cost(c, st, n, p, err);
    mpar__free_a(&c->d.allocator, st);
    return r;
}

/* ---- entry points ---- */

MPARDEF mpar_result mpar_plan_create(const mpar_plan_desc* desc, mpar_plan* out, mpar_error* err) {
    mpar__planner_ctx c;
    mpar_result r;
    if (!out) return mpar_error_set(err, MPAR_ERROR_INVALID_ARGUMENT, "mpar_plan_create: out is NULL");
    memset(out, 0, sizeof *out);
    if (!desc) return mpar_error_set(err, MPAR_ERROR_INVALID_ARGUMENT, "mpar_plan_create: desc is NULL");
    if (!mpar__allocator_ok(&desc->allocator))
        return mpar_error_set(err, MPAR_ERROR_INVALID_ARGUMENT, "mpar_plan_desc.allocator: give all three functions "
                              "or none");
    r = mpar__planner_validate(desc, err);
    if (r != MPAR_SUCCESS) return r;
    out->allocator = desc->allocator;
    r = mpar__planner_ctx_init(&c, desc, err);
    if (r == MPAR_SUCCESS) {
        if (c.d.mode == MPAR_PLAN_PROPORTIONAL) r = mpar__planner_proportional(&c, out, err);
        else if (c.d.mode == MPAR_PLAN_MANUAL) r = mpar__planner_manual(&c, out, err);
        else r = mpar__planner_optimal(&c, out, err);
    }
    mpar__planner_ctx_free(&c);
    if (r != MPAR_SUCCESS) mpar_plan_free(out);
    return r;
}

MPARDEF void mpar_plan_free(mpar_plan* plan) {
    if (!plan) return;
    mpar__free_a(&plan->allocator, plan->stages);
    mpar__free_a(&plan->allocator, plan->device_memory_bytes);
    mpar__free_a(&plan->allocator, plan->device_capacity_bytes);
    memset(plan, 0, sizeof *plan);
}

/* ---- text form ---- */

MPARDEF int mpar_plan_to_string(const mpar_plan* plan, char* buf, size_t size) {
    size_t used = 0;
    int s;
    if (!plan || (plan->num_stages > 0 && !plan->stages)) return -1;
    if (buf && size) buf[0] = '\0';
    for (s = 0; s < plan->num_stages; ++s) {
        char item[48];
        const mpar_plan_stage* st = &plan->stages[s];
        int len = snprintf(item, sizeof item, "%s%d:%d-%d%s", s ? "," : "", st->device, st->first_layer, st->last_layer,
                           st->recompute ? "r" : "");
        if (len < 0) return -1;
        if (buf && used + (size_t)len < size) memcpy(buf + used, item, (size_t)len + 1);
        else if (buf && used < size) { /* truncate, keep the NUL */
            memcpy(buf + used, item, size - used - 1);
            buf[size - 1] = '\0';
        }
        used += (size_t)len;
    }
    return (int)used;
}

typedef struct mpar__planner_cursor {
    const char* text;
    size_t len, at;
} mpar__planner_cursor;

static int mpar__planner_peek(const mpar__planner_cursor* cur) {
    return cur->at < cur->len ? (unsigned char)cur->text[cur->at] : -1;
}

static void mpar__planner_blanks(mpar__planner_cursor* cur) {
    int ch;
    while ((ch = mpar__planner_peek(cur)) == ' ' || ch == '\t' || ch == '\n' || ch == '\r') cur->at++;
}

static mpar_result mpar__planner_expected(const mpar__planner_cursor* cur, const char* what, mpar_error* err) {
    int ch = mpar__planner_peek(cur);
    if (ch < 0)
        return mpar_error_set(err, MPAR_ERROR_INVALID_PLAN, "plan text: expected %s at offset %lu, found the end",
                              what, (unsigned long)cur->at);
    if (ch >= 32 && ch < 127)
        return mpar_error_set(err, MPAR_ERROR_INVALID_PLAN, "plan text: expected %s at offset %lu, found '%c'", what,
                              (unsigned long)cur->at, ch);
    return mpar_error_set(err, MPAR_ERROR_INVALID_PLAN, "plan text: expected %s at offset %lu, found byte 0x%02x",
                          what, (unsigned long)cur->at, ch);
}

/* A decimal number of at most 9 digits, so it always fits an int. */
static mpar_result mpar__planner_number(mpar__planner_cursor* cur, const char* what, int* v, mpar_error* err) {
    int digits = 0, ch;
    long value = 0;
    mpar__planner_blanks(cur);
    while ((ch = mpar__planner_peek(cur)) >= '0' && ch <= '9') {
        if (++digits > 9)
            return mpar_error_set(err, MPAR_ERROR_INVALID_PLAN, "plan text: %s at offset %lu is too long (at most 9 "
                                  "digits)", what, (unsigned long)(cur->at - 9));
        value = value * 10 + (ch - '0');
        cur->at++;
    }
    if (!digits) return mpar__planner_expected(cur, what, err);
    *v = (int)value;
    return MPAR_SUCCESS;
}

static mpar_result mpar__planner_symbol(mpar__planner_cursor* cur, int symbol, const char* what, mpar_error* err) {
    mpar__planner_blanks(cur);
    if (mpar__planner_peek(cur) != symbol) return mpar__planner_expected(cur, what, err);
    cur->at++;
    return MPAR_SUCCESS;
}

static mpar_result mpar__planner_parse_stage(mpar__planner_cursor* cur, mpar_plan_stage* st, int s, mpar_error* err) {
    mpar_result r = mpar__planner_number(cur, "a device number", &st->device, err);
    if (r == MPAR_SUCCESS) r = mpar__planner_symbol(cur, ':', "':' after the device", err);
    if (r == MPAR_SUCCESS) r = mpar__planner_number(cur, "a first layer", &st->first_layer, err);
    if (r != MPAR_SUCCESS) return r;
    st->last_layer = st->first_layer;
    mpar__planner_blanks(cur);
    if (mpar__planner_peek(cur) == '-') {
        cur->at++;
        r = mpar__planner_number(cur, "a last layer", &st->last_layer, err);
        if (r != MPAR_SUCCESS) return r;
    }
    if (st->first_layer > st->last_layer)
        return mpar_error_set(err, MPAR_ERROR_INVALID_PLAN, "plan text: stage %d: first layer %d is after last layer "
                              "%d", s, st->first_layer, st->last_layer);
    mpar__planner_blanks(cur);
    if (mpar__planner_peek(cur) == 'r') { /* recomputes */
        cur->at++;
        st->recompute = 1;
    }
    return MPAR_SUCCESS;
}

static mpar_result mpar__planner_parse_all(mpar__planner_cursor* cur, mpar_plan* out, mpar_error* err) {
    mpar_result r;
    mpar__planner_blanks(cur);
    if (mpar__planner_peek(cur) < 0) return mpar_error_set(err, MPAR_ERROR_INVALID_PLAN, "plan text is empty");
    for (;;) {
        r = mpar__planner_parse_stage(cur, &out->stages[out->num_stages], out->num_stages, err);
        if (r != MPAR_SUCCESS) return r;
        out->num_stages++;
        mpar__planner_blanks(cur);
        if (mpar__planner_peek(cur) < 0) return MPAR_SUCCESS;
        r = mpar__planner_symbol(cur, ',', "',' or the end", err);
        if (r != MPAR_SUCCESS) return r;
    }
}

MPARDEF mpar_result mpar_plan_parse(const char* text, size_t length, mpar_plan* out, mpar_error* err) {
    return mpar_plan_parse_with(NULL, text, length, out, err);
}

MPARDEF mpar_result mpar_plan_parse_with(const mpar_allocator* allocator, const char* text, size_t length,
                                         mpar_plan* out, mpar_error* err) {
    mpar__planner_cursor cur;
    size_t i, commas = 0;
    mpar_result r;
    if (!out) return mpar_error_set(err, MPAR_ERROR_INVALID_ARGUMENT, "mpar_plan_parse: out is NULL");
    memset(out, 0, sizeof *out);
    if (!text) return mpar_error_set(err, MPAR_ERROR_INVALID_ARGUMENT, "mpar_plan_parse: text is NULL");
    if (!mpar__allocator_ok(allocator))
        return mpar_error_set(err, MPAR_ERROR_INVALID_ARGUMENT, "mpar_plan_parse: give the allocator all three "
                              "functions or none");
    for (i = 0; i < length && text[i]; ++i) commas += text[i] == ',';
    cur.text = text;
    cur.len = i;
    cur.at = 0;
    out->allocator = mpar__allocator_copy(allocator);
    out->stages = (mpar_plan_stage*)mpar__alloc_a(&out->allocator, (commas + 1) * sizeof(mpar_plan_stage));
    if (!out->stages) return mpar_error_set(err, MPAR_ERROR_OUT_OF_HOST_MEMORY, "mpar_plan_parse: out of memory");
    memset(out->stages, 0, (commas + 1) * sizeof(mpar_plan_stage));
    out->virtual_stages = 1;
    out->microbatches = 1;
    r = mpar__planner_parse_all(&cur, out, err);
    if (r != MPAR_SUCCESS) mpar_plan_free(out);
    return r;
}

/* ---- printing ---- */

MPARDEF mpar_result mpar_plan_print(const mpar_plan* plan, FILE* f) {
    int s, d;
    if (!plan || !f || (plan->num_stages > 0 && !plan->stages)) return MPAR_ERROR_INVALID_ARGUMENT;
    fprintf(f, "plan: %d stages, %s, %d micro-batches, %d virtual stages%s%s\n", plan->num_stages,
            mpar__planner_kind_name(plan->schedule), plan->microbatches, plan->virtual_stages,
            plan->exact ? ", optimal (exact)" : "",
            plan->activation_type == MPAR_ACTIVATIONS_BF16 ? ", bf16 activations" : "");
    fprintf(f, "%5s %6s %13s %12s %12s %12s %9s %14s\n", "stage", "device", "layers", "compute_ms", "transfer_ms",
            "time_ms", "in_flight", "memory_MiB");
    for (s = 0; s < plan->num_stages; ++s) {
        const mpar_plan_stage* st = &plan->stages[s];
        char range[32];
        snprintf(range, sizeof range, "%d-%d%s", st->first_layer, st->last_layer, st->recompute ? "r" : "");
        fprintf(f, "%5d %6d %13s %12.4f %12.4f %12.4f %9d %14.2f\n", s, st->device, range, 1e3 * st->compute_seconds,
                1e3 * st->transfer_seconds, 1e3 * st->time_seconds, st->in_flight,
                (double)st->memory_bytes / 1048576.0);
    }
    for (d = 0; d < plan->num_devices && plan->device_memory_bytes && plan->device_capacity_bytes; ++d)
        if (plan->device_capacity_bytes[d])
            fprintf(f, "device %d: %.2f of %.2f MiB usable (%.1f%%)\n", d,
                    (double)plan->device_memory_bytes[d] / 1048576.0,
                    (double)plan->device_capacity_bytes[d] / 1048576.0,
                    100.0 * (double)plan->device_memory_bytes[d] / (double)plan->device_capacity_bytes[d]);
        else
            fprintf(f, "device %d: %.2f MiB (no limit)\n", d, (double)plan->device_memory_bytes[d] / 1048576.0);
    fprintf(f, "slowest stage %.4f ms, path %.4f ms, predicted step %.4f ms\n", 1e3 * plan->bottleneck_seconds,
            1e3 * plan->path_seconds, 1e3 * plan->step_seconds);
    if (plan->binding.text[0]) fprintf(f, "binding: %s\n", plan->binding.text);
    return ferror(f) ? MPAR_ERROR_IO : MPAR_SUCCESS;
}

static void mpar__planner_json_string(FILE* f, const char* s) {
    fputc('"', f);
    for (; *s; ++s) {
        unsigned char ch = (unsigned char)*s;
        if (ch == '"' || ch == '\\') fprintf(f, "\\%c", ch);
        else if (ch < 0x20) fprintf(f, "\\u%04x", ch);
        else fputc(ch, f);
    }
    fputc('"', f);
}

static void mpar__planner_json_number(FILE* f, const char* name, double v) {
    if (v >= -DBL_MAX && v <= DBL_MAX) fprintf(f, "\"%s\":%.17g", name, v);
    else fprintf(f, "\"%s\":null", name);
}

static void mpar__planner_json_stage(FILE* f, const mpar_plan_stage* st) {
    fprintf(f, "{\"device\":%d,\"first_layer\":%d,\"last_layer\":%d,\"in_flight\":%d,\"recompute\":%d,", st->device,
            st->first_layer, st->last_layer, st->in_flight, st->recompute);
    mpar__planner_json_number(f, "compute_seconds", st->compute_seconds);
    fputc(',', f);
    mpar__planner_json_number(f, "transfer_seconds", st->transfer_seconds);
    fputc(',', f);
    mpar__planner_json_number(f, "time_seconds", st->time_seconds);
    fprintf(f, ",\"memory_bytes\":%llu}", (unsigned long long)st->memory_bytes);
}

MPARDEF mpar_result mpar_plan_write_json(const mpar_plan* plan, FILE* f) {
    int s, d, ok;
    if (!plan || !f || (plan->num_stages > 0 && !plan->stages)) return MPAR_ERROR_INVALID_ARGUMENT;
    ok = plan->device_memory_bytes && plan->device_capacity_bytes;
    fprintf(f, "{\"schedule\":\"%s\",\"microbatches\":%d,\"virtual_stages\":%d,\"exact\":%s,\"orders_evaluated\":%ld,"
            "\"stages\":[", mpar__planner_kind_name(plan->schedule), plan->microbatches, plan->virtual_stages,
            plan->exact ? "true" : "false", plan->orders_evaluated);
    for (s = 0; s < plan->num_stages; ++s) {
        if (s) fputc(',', f);
        mpar__planner_json_stage(f, &plan->stages[s]);
    }
    fputs("],\"devices\":[", f);
    for (d = 0; ok && d < plan->num_devices; ++d)
        fprintf(f, "%s{\"device\":%d,\"memory_bytes\":%llu,\"capacity_bytes\":%llu}", d ? "," : "", d,
                (unsigned long long)plan->device_memory_bytes[d], (unsigned long long)plan->device_capacity_bytes[d]);
    fputs("],", f);
    mpar__planner_json_number(f, "bottleneck_seconds", plan->bottleneck_seconds);
    fputc(',', f);
    mpar__planner_json_number(f, "path_seconds", plan->path_seconds);
    fputc(',', f);
    mpar__planner_json_number(f, "step_seconds", plan->step_seconds);
    fprintf(f, ",\"binding\":{\"kind\":\"%s\",\"stage\":%d,\"device\":%d,\"device_to\":%d,\"text\":",
            mpar_plan_binding_name(plan->binding.kind), plan->binding.stage, plan->binding.device,
            plan->binding.device_to);
    mpar__planner_json_string(f, plan->binding.text);
    fputs("}}\n", f);
    return ferror(f) ? MPAR_ERROR_IO : MPAR_SUCCESS;
}

#endif /* MPAR_PART_PLANNER_IMPL */

#ifndef MPAR_PART_SCHEDULE_IMPL
#define MPAR_PART_SCHEDULE_IMPL

#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Keeps every index product (P*V*M, list lengths) far from INT_MAX. */
#define MPAR__SCHED_MAX_ITEMS (1 << 24)

static void mpar__sched_free_lists(mpar_schedule* sc) {
    int s;
    if (sc->actions) {
        for (s = 0; s < sc->stages; ++s) mpar__free_a(&sc->allocator, sc->actions[s]);
        mpar__free_a(&sc->allocator, sc->actions);
    }
    mpar__free_a(&sc->allocator, sc->action_count);
    mpar__free_a(&sc->allocator, sc->placement);
    mpar__free_a(&sc->allocator, sc->virtual_stage_of);
    mpar__free_a(&sc->allocator, sc->peak_in_flight);
    mpar__free_a(&sc->allocator, sc->chunk_peak_in_flight);
}

MPARDEF void mpar_schedule_destroy(mpar_schedule* schedule) {
    mpar_allocator a;
    if (!schedule) return;
    mpar__sched_free_lists(schedule);
    a = schedule->allocator; /* the schedule's memory holds it */
    mpar__free_a(&a, schedule);
}

/* virtual_stage_of from placement: chunk c of stage s is the c-th virtual
   stage of s in model order. The placement must give each stage V. */
static void mpar__sched_place(mpar_schedule* sc) {
    int vs, s, P = sc->stages, V = sc->virtual_stages, *seen = sc->peak_in_flight; /* scratch [P] */
    for (s = 0; s < P; ++s) seen[s] = 0;
    for (vs = 0; vs < P * V; ++vs) {
        s = sc->placement[vs];
        sc->virtual_stage_of[s * V + seen[s]++] = vs;
    }
}

/* Virtual stage of chunk c on stage s, and the chunk of a virtual stage. */
static int mpar__sched_vs(const mpar_schedule* sc, int s, int c) { return sc->virtual_stage_of[s * sc->virtual_stages + c]; }
/* The virtual stage an action works on; 0 for the optimizer step, whose
   chunk field is ignored (and so never checked). */
static int mpar__sched_action_vs(const mpar_schedule* sc, int s, const mpar_action* a) {
    return a->kind == MPAR_ACTION_OPTIMIZER_STEP ? 0 : mpar__sched_vs(sc, s, a->chunk);
}
static int mpar__sched_chunk(const mpar_schedule* sc, int vs) {
    int c, s = sc->placement[vs];
    for (c = 0; c < sc->virtual_stages && sc->virtual_stage_of[s * sc->virtual_stages + c] != vs; ++c) {}
    return c;
}

/* The facts the lists imply (see mpar_schedule), counted in list order;
   actions out of range are skipped (a custom schedule may be broken). */
static void mpar__sched_derive(mpar_schedule* sc) {
    int s, i, c, P = sc->stages, V = sc->virtual_stages, backward = 0;
    sc->split_backward = 0;
    for (c = 0; c < P * V; ++c) sc->chunk_peak_in_flight[c] = 0;
    for (s = 0; s < P; ++s) {
        int held = 0;
        sc->peak_in_flight[s] = 0;
        for (c = 0; c < V; ++c) {
            int vs = sc->virtual_stage_of[s * V + c], now = 0;
            for (i = 0; i < sc->action_count[s]; ++i) {
                const mpar_action* a = &sc->actions[s][i];
                if (a->chunk != c) continue;
                if (a->kind == MPAR_ACTION_FORWARD) {
                    if (++now > sc->chunk_peak_in_flight[vs]) sc->chunk_peak_in_flight[vs] = now;
                } else if (a->kind == MPAR_ACTION_BACKWARD || a->kind == MPAR_ACTION_BACKWARD_WEIGHT) {
                    now--;
                }
            }
        }
        for (i = 0; i < sc->action_count[s]; ++i) {
            const mpar_action* a = &sc->actions[s][i];
            if (a->kind != MPAR_ACTION_FORWARD) backward = 1;
            if (a->kind == MPAR_ACTION_BACKWARD_INPUT || a->kind == MPAR_ACTION_BACKWARD_WEIGHT) sc->split_backward = 1;
            if (a->kind == MPAR_ACTION_OPTIMIZER_STEP || a->chunk < 0 || a->chunk >= V) continue;
            if (a->kind == MPAR_ACTION_FORWARD) {
                if (++held > sc->peak_in_flight[s]) sc->peak_in_flight[s] = held;
            } else if (a->kind == MPAR_ACTION_BACKWARD || a->kind == MPAR_ACTION_BACKWARD_WEIGHT) {
                held--;
            }
        }
    }
    sc->forward_only = !backward;
}

/* A schedule with room for caps[s] actions on stage s, all lists empty. */
static mpar_schedule* mpar__sched_alloc(const mpar_allocator* a, int P, int M, int V, const int* caps) {
    int s;
    mpar_schedule* sc = (mpar_schedule*)mpar__alloc_a(a, sizeof(mpar_schedule));
    if (!sc) return NULL;
    memset(sc, 0, sizeof *sc);
    sc->allocator = mpar__allocator_copy(a);
    sc->stages = P;
    sc->microbatches = M;
    sc->virtual_stages = V;
    sc->action_count = (int*)mpar__alloc_a(a, sizeof(int) * (size_t)P);
    sc->actions = (mpar_action**)mpar__alloc_a(a, sizeof(mpar_action*) * (size_t)P);
    sc->placement = (int*)mpar__alloc_a(a, sizeof(int) * (size_t)P * (size_t)V);
    sc->virtual_stage_of = (int*)mpar__alloc_a(a, sizeof(int) * (size_t)P * (size_t)V);
    sc->peak_in_flight = (int*)mpar__alloc_a(a, sizeof(int) * (size_t)P);
    sc->chunk_peak_in_flight = (int*)mpar__alloc_a(a, sizeof(int) * (size_t)P * (size_t)V);
    if (!sc->action_count || !sc->actions || !sc->placement || !sc->virtual_stage_of || !sc->peak_in_flight ||
        !sc->chunk_peak_in_flight) {
        if (sc->actions) memset(sc->actions, 0, sizeof(mpar_action*) * (size_t)P);
        mpar_schedule_destroy(sc);
        return NULL;
    }
    for (s = 0; s < P * V; ++s) sc->placement[s] = s % P; /* interleaved; mpar__sched_place may change it */
    mpar__sched_place(sc);
    for (s = 0; s < P; ++s) {
        sc->action_count[s] = 0;
        sc->actions[s] = NULL;
    }
    for (s = 0; s < P; ++s) {
        size_t n = (size_t)(caps[s] > 0 ? caps[s] : 1);
        sc->actions[s] = (mpar_action*)mpar__alloc_a(a, sizeof(mpar_action) * n);
        if (!sc->actions[s]) {
            mpar_schedule_destroy(sc);
            return NULL;
        }
    }
    return sc;
}

static void mpar__sched_push(mpar_schedule* sc, int s, mpar_action_kind kind, int m, int chunk) {
    mpar_action* a = &sc->actions[s][sc->action_count[s]++];
    a->kind = kind;
    a->microbatch = kind == MPAR_ACTION_OPTIMIZER_STEP ? -1 : m;
    a->chunk = chunk;
}

/* ---- generators: each fills every stage's list, optimizer step last ---- */

static void mpar__sched_gen_gpipe(mpar_schedule* sc) {
    int s, m;
    for (s = 0; s < sc->stages; ++s) {
        for (m = 0; m < sc->microbatches; ++m) mpar__sched_push(sc, s, MPAR_ACTION_FORWARD, m, 0);
        for (m = 0; m < sc->microbatches; ++m) mpar__sched_push(sc, s, MPAR_ACTION_BACKWARD, m, 0);
        mpar__sched_push(sc, s, MPAR_ACTION_OPTIMIZER_STEP, 0, 0);
    }
}

static void mpar__sched_gen_1f1b(mpar_schedule* sc) {
    int s, m, P = sc->stages, M = sc->microbatches;
    for (s = 0; s < P; ++s) {
        int warmup = P - s - 1 < M ? P - s - 1 : M;
        for (m = 0; m < warmup; ++m) mpar__sched_push(sc, s, MPAR_ACTION_FORWARD, m, 0);
        for (m = 0; m < M; ++m) {
            if (warmup + m < M) mpar__sched_push(sc, s, MPAR_ACTION_FORWARD, warmup + m, 0);
            mpar__sched_push(sc, s, MPAR_ACTION_BACKWARD, m, 0);
        }
        mpar__sched_push(sc, s, MPAR_ACTION_OPTIMIZER_STEP, 0, 0);
    }
}

/* ZB-H1: 1F1B's order of F and I; stage s keeps its W's `s` micro-batches
   behind its I's and runs the deferred ones in the cool-down. */
static void mpar__sched_gen_zbh1(mpar_schedule* sc) {
    int s, m, P = sc->stages, M = sc->microbatches;
    for (s = 0; s < P; ++s) {
        int warmup = P - s - 1 < M ? P - s - 1 : M;
        int lag = s, next_w = 0;
        for (m = 0; m < warmup; ++m) mpar__sched_push(sc, s, MPAR_ACTION_FORWARD, m, 0);
        for (m = 0; m < M; ++m) {
            if (warmup + m < M) mpar__sched_push(sc, s, MPAR_ACTION_FORWARD, warmup + m, 0);
            mpar__sched_push(sc, s, MPAR_ACTION_BACKWARD_INPUT, m, 0);
            if (m >= lag) mpar__sched_push(sc, s, MPAR_ACTION_BACKWARD_WEIGHT, next_w++, 0);
        }
        while (next_w < M) mpar__sched_push(sc, s, MPAR_ACTION_BACKWARD_WEIGHT, next_w++, 0);
        mpar__sched_push(sc, s, MPAR_ACTION_OPTIMIZER_STEP, 0, 0);
    }
}

/* ZB-H2: as ZB-H1 but 2(P-s)-1 warm-up forwards, what fits on stage s
   before its first I can arrive (2P-1-s with unit costs), then I, its
   lagging W and the next F per micro-batch. The W's lag s behind the I's
   to fill the cool-down (as in ZB-H1), and 2s once M >= 2P-1: the other s
   keep cheaper W's and link delays from opening gaps in the steady state
   (with fewer micro-batches there is no steady state and they only delay
   W's; both measured). Stage s then holds 2P-1 stashes when M >= 2P-1,
   else min(M, 2P-1-s). */
static void mpar__sched_gen_zbh2(mpar_schedule* sc) {
    int s, m, P = sc->stages, M = sc->microbatches;
    for (s = 0; s < P; ++s) {
        int warmup = 2 * (P - s) - 1 < M ? 2 * (P - s) - 1 : M;
        int lag = M >= 2 * P - 1 ? 2 * s : s, next_f = warmup, next_w = 0;
        for (m = 0; m < warmup; ++m) mpar__sched_push(sc, s, MPAR_ACTION_FORWARD, m, 0);
        for (m = 0; m < M; ++m) {
            mpar__sched_push(sc, s, MPAR_ACTION_BACKWARD_INPUT, m, 0);
            if (m >= lag) mpar__sched_push(sc, s, MPAR_ACTION_BACKWARD_WEIGHT, next_w++, 0);
            if (next_f < M) mpar__sched_push(sc, s, MPAR_ACTION_FORWARD, next_f++, 0);
        }
        while (next_w < M) mpar__sched_push(sc, s, MPAR_ACTION_BACKWARD_WEIGHT, next_w++, 0);
        mpar__sched_push(sc, s, MPAR_ACTION_OPTIMIZER_STEP, 0, 0);
    }
}

/* ZB-V: the next micro-batch of `kind` (F, I or W) on `chunk`, counted in
   next[chunk][kind]; micro-batches from M on are padding, counted but left
   out of the list. */
static void mpar__sched_push_zbv(mpar_schedule* sc, int s, int next[2][4], mpar_action_kind kind, int chunk) {
    int m = next[chunk][kind]++;
    if (m < sc->microbatches) mpar__sched_push(sc, s, kind, m, chunk);
}

/* ZB-V on stage s: chunk 0 is virtual stage s, chunk 1 is 2P-1-s. With
   unit costs micro-batch 0's forward reaches chunk 1 at 2P-1-s and its
   input gradient comes back to chunk 1 at 2P+s, and each phase below fills
   the time up to such an arrival:
     warm-up   2(P-s)-1 chunk-0 F's, then s pairs F1 F0, then P-s triples
               F1 I1 W1 (chunk 1's first gradients come back 3 apart);
     steady    F0 I0 W0 F1 I1 W1 (the F0 while any is left) until every
               F1 has run: each W right after its I, so the stashes stay at
               2P chunks (P micro-batches of a whole stage);
     cool-down s pairs I0 I1, then P-s pairs I0 W0 (the input gradients
               first, as stage 0 waits for them), then the deferred W's of
               chunk 1, then those of chunk 0.
   The phases need M >= 2P-1; a smaller M is built as 2P-1 with the padding
   micro-batches dropped, which removes whole dependency chains, so the
   lists stay deadlock-free (as for the interleaved schedule). */
/* F, I, W of the next micro-batch of one chunk, back to back. */
static void mpar__sched_push_zbv_fiw(mpar_schedule* sc, int s, int next[2][4], int with_f, int chunk) {
    if (with_f) mpar__sched_push_zbv(sc, s, next, MPAR_ACTION_FORWARD, chunk);
    mpar__sched_push_zbv(sc, s, next, MPAR_ACTION_BACKWARD_INPUT, chunk);
    mpar__sched_push_zbv(sc, s, next, MPAR_ACTION_BACKWARD_WEIGHT, chunk);
}

static void mpar__sched_gen_zbv_stage(mpar_schedule* sc, int s, int padded) {
    int i, P = sc->stages, next[2][4];
    const mpar_action_kind fw = MPAR_ACTION_FORWARD, ig = MPAR_ACTION_BACKWARD_INPUT, wg = MPAR_ACTION_BACKWARD_WEIGHT;
    memset(next, 0, sizeof next);
    for (i = 0; i < 2 * (P - s) - 1; ++i) mpar__sched_push_zbv(sc, s, next, fw, 0);
    for (i = 0; i < s; ++i) {
        mpar__sched_push_zbv(sc, s, next, fw, 1);
        mpar__sched_push_zbv(sc, s, next, fw, 0);
    }
    for (i = 0; i < P - s; ++i) mpar__sched_push_zbv_fiw(sc, s, next, 1, 1);
    while (next[1][fw] < padded) {
        mpar__sched_push_zbv_fiw(sc, s, next, next[0][fw] < padded, 0);
        mpar__sched_push_zbv_fiw(sc, s, next, 1, 1);
    }
    for (i = 0; i < s; ++i) {
        mpar__sched_push_zbv(sc, s, next, ig, 0);
        mpar__sched_push_zbv(sc, s, next, ig, 1);
    }
    for (i = 0; i < P - s; ++i) {
        mpar__sched_push_zbv(sc, s, next, ig, 0);
        mpar__sched_push_zbv(sc, s, next, wg, 0);
    }
    while (next[1][wg] < padded) mpar__sched_push_zbv(sc, s, next, wg, 1);
    while (next[0][wg] < padded) mpar__sched_push_zbv(sc, s, next, wg, 0);
    mpar__sched_push(sc, s, MPAR_ACTION_OPTIMIZER_STEP, 0, 0);
}

/* ZB-V: the V placement (virtual stage vs on stage vs, and P+j on stage
   P-1-j), then each stage's list. */
static void mpar__sched_gen_zbv(mpar_schedule* sc) {
    int s, vs, P = sc->stages, padded = sc->microbatches > 2 * P - 1 ? sc->microbatches : 2 * P - 1;
    for (vs = 0; vs < 2 * P; ++vs) sc->placement[vs] = vs < P ? vs : 2 * P - 1 - vs;
    mpar__sched_place(sc);
    for (s = 0; s < P; ++s) mpar__sched_gen_zbv_stage(sc, s, padded);
}

/* k-th forward (or backward) of a stage under interleaving: micro-batches in
   groups of P; within a group all of chunk 0, then chunk 1, ... (reversed
   chunks for backward). */
static void mpar__sched_interleaved_item(int P, int V, int k, int backward, int* m, int* chunk) {
    int group = k / (P * V), in_group = k % (P * V), c = in_group / P;
    *m = group * P + in_group % P;
    *chunk = backward ? V - 1 - c : c;
}

static void mpar__sched_push_interleaved(mpar_schedule* sc, int s, int k, int backward) {
    int m, c;
    mpar__sched_interleaved_item(sc->stages, sc->virtual_stages, k, backward, &m, &c);
    if (m < sc->microbatches) /* a hole left by padding M up to a multiple of P */
        mpar__sched_push(sc, s, backward ? MPAR_ACTION_BACKWARD : MPAR_ACTION_FORWARD, m, c);
}

/* Megatron-LM's order for M a multiple of P. Any other M is padded up to
   the next multiple and the padding micro-batches dropped afterwards: that
   removes whole dependency chains, so the lists stay deadlock-free. */
static void mpar__sched_gen_interleaved(mpar_schedule* sc) {
    int s, k, P = sc->stages, V = sc->virtual_stages;
    int total = (sc->microbatches + P - 1) / P * P * V;
    for (s = 0; s < P; ++s) {
        int warmup = 2 * (P - s - 1) + (V - 1) * P;
        if (warmup > total) warmup = total;
        for (k = 0; k < warmup; ++k) mpar__sched_push_interleaved(sc, s, k, 0);
        for (k = 0; k < total; ++k) {
            if (warmup + k < total) mpar__sched_push_interleaved(sc, s, warmup + k, 0);
            mpar__sched_push_interleaved(sc, s, k, 1);
        }
        mpar__sched_push(sc, s, MPAR_ACTION_OPTIMIZER_STEP, 0, 0);
    }
}

static mpar_result mpar__sched_check_shape(const char* fn, int P, int M, int V, mpar_error* err) {
    if (P < 1) return mpar_error_set(err, MPAR_ERROR_INVALID_ARGUMENT, "%s: stages is %d, must be >= 1", fn, P);
    if (M < 1)
        return mpar_error_set(err, MPAR_ERROR_INVALID_ARGUMENT, "%s: microbatches is %d, must be >= 1", fn, M);
    if (V < 1)
        return mpar_error_set(err, MPAR_ERROR_INVALID_ARGUMENT, "%s: virtual_stages is %d, must be >= 1", fn, V);
    if ((double)P * (double)M * (double)V * 3.0 > (double)MPAR__SCHED_MAX_ITEMS)
        return mpar_error_set(err, MPAR_ERROR_INVALID_ARGUMENT,
                              "%s: %d stages x %d micro-batches x %d virtual stages is too large", fn, P, M, V);
    return MPAR_SUCCESS;
}

/* ---- what other sections ask of a kind (the only place kinds are told apart) ---- */

static const char* mpar__sched_kind_upper(mpar_schedule_kind kind) {
    switch (kind) {
    case MPAR_SCHEDULE_SEQUENTIAL: return "SEQUENTIAL";
    case MPAR_SCHEDULE_GPIPE: return "GPIPE";
    case MPAR_SCHEDULE_1F1B: return "1F1B";
    case MPAR_SCHEDULE_INTERLEAVED_1F1B: return "INTERLEAVED_1F1B";
    case MPAR_SCHEDULE_ZB_H1: return "ZB_H1";
    case MPAR_SCHEDULE_ZB_H2: return "ZB_H2";
    case MPAR_SCHEDULE_ZB_V: return "ZB_V";
    case MPAR_SCHEDULE_AUTO: return "AUTO";
    }
    return "?";
}

/* The stage a kind places virtual stage vs on (P stages, V chunks each):
   ZB-V's V (vs and 2P-1-vs on one stage), else vs mod P. */
static int mpar__sched_kind_stage(mpar_schedule_kind kind, int P, int V, int vs) {
    if (kind == MPAR_SCHEDULE_ZB_V && V == 2 && vs >= P) return 2 * P - 1 - vs;
    return vs % P;
}

/* A kind made by mpar_schedule_synthesize from measured costs (AUTO). */
static int mpar__sched_kind_synthesized(mpar_schedule_kind kind) { return kind == MPAR_SCHEDULE_AUTO; }

static int mpar__sched_kind_known(mpar_schedule_kind kind) {
    return (int)kind >= (int)MPAR_SCHEDULE_SEQUENTIAL && (int)kind <= (int)MPAR_SCHEDULE_AUTO;
}

/* Model chunks per device a kind runs with when `asked` (0 = default) was
   asked for: interleaving takes what it is given, ZB-V two, the rest one. */
static int mpar__sched_kind_vstages(mpar_schedule_kind kind, int asked) {
    if (kind == MPAR_SCHEDULE_INTERLEAVED_1F1B || kind == MPAR_SCHEDULE_AUTO) return asked < 1 ? 1 : asked;
    if (kind == MPAR_SCHEDULE_ZB_V) return 2;
    return 1;
}

/* The schedule a kind stands for when planning (before costs are known):
   AUTO is planned as ZB-H1 (split backward), or interleaved 1F1B with
   chunks, whose per-device stash counts cap what the synthesizer may use;
   a V-shaped kind on one chunk per device is ZB-H1. */
static mpar_result mpar__sched_generate(const mpar_allocator* a, mpar_schedule_kind kind, int stages,
                                        int microbatches, int virtual_stages, mpar_schedule** out, mpar_error* err) {
    if (kind == MPAR_SCHEDULE_AUTO) kind = virtual_stages > 1 ? MPAR_SCHEDULE_INTERLEAVED_1F1B : MPAR_SCHEDULE_ZB_H1;
    if (kind == MPAR_SCHEDULE_ZB_V && virtual_stages == 1) kind = MPAR_SCHEDULE_ZB_H1;
    return mpar_schedule_create_with(a, kind, stages, microbatches, virtual_stages, out, err);
}

MPARDEF mpar_result mpar_schedule_create(mpar_schedule_kind kind, int stages, int microbatches,
                                         int virtual_stages, mpar_schedule** out, mpar_error* err) {
    return mpar_schedule_create_with(NULL, kind, stages, microbatches, virtual_stages, out, err);
}

MPARDEF mpar_result mpar_schedule_create_with(const mpar_allocator* allocator, mpar_schedule_kind kind, int stages,
                                              int microbatches, int virtual_stages, mpar_schedule** out,
                                              mpar_error* err) {
    static const char fn[] = "mpar_schedule_create";
    mpar_schedule* sc;
    mpar_result r;
    int s, per_stage, *caps;
    if (!out) return mpar_error_set(err, MPAR_ERROR_INVALID_ARGUMENT, "%s: out is NULL", fn);
    *out = NULL;
    if (!mpar__allocator_ok(allocator))
        return mpar_error_set(err, MPAR_ERROR_INVALID_ARGUMENT, "%s: give the allocator all three functions or none",
                              fn);
    if (kind == MPAR_SCHEDULE_AUTO)
        return mpar_error_set(err, MPAR_ERROR_INVALID_ARGUMENT,
                              "%s: schedule 'auto' is built from measured costs: use mpar_schedule_synthesize", fn);
    if ((int)kind < (int)MPAR_SCHEDULE_SEQUENTIAL || (int)kind > (int)MPAR_SCHEDULE_ZB_V)
        return mpar_error_set(err, MPAR_ERROR_INVALID_ARGUMENT, "%s: unknown schedule kind %d", fn, (int)kind);
    r = mpar__sched_check_shape(fn, stages, microbatches, virtual_stages, err);
    if (r != MPAR_SUCCESS) return r;
    if (kind == MPAR_SCHEDULE_ZB_V && virtual_stages != 2)
        return mpar_error_set(err, MPAR_ERROR_INVALID_ARGUMENT,
                              "%s: virtual_stages is %d but schedule 'zbv' runs exactly 2 chunks per stage, in a V "
                              "(give 2)", fn, virtual_stages);
    if (virtual_stages > 1 && kind != MPAR_SCHEDULE_INTERLEAVED_1F1B && kind != MPAR_SCHEDULE_ZB_V)
        return mpar_error_set(err, MPAR_ERROR_INVALID_ARGUMENT,
                              "%s: virtual_stages is %d but only the interleaved schedule (any number) and zbv (2) "
                              "have more than one virtual stage per stage (schedule '%s' needs 1)",
                              fn, virtual_stages, mpar_schedule_kind_name(kind));
    if (kind == MPAR_SCHEDULE_SEQUENTIAL) microbatches = 1; /* the whole batch is one micro-batch */

    per_stage = (kind >= MPAR_SCHEDULE_ZB_H1 ? 3 : 2) * microbatches * virtual_stages + 1;
    caps = (int*)mpar__alloc_a(allocator, sizeof(int) * (size_t)stages);
    if (!caps) return mpar_error_set(err, MPAR_ERROR_OUT_OF_HOST_MEMORY, "%s: out of host memory", fn);
    for (s = 0; s < stages; ++s) caps[s] = per_stage;
    sc = mpar__sched_alloc(allocator, stages, microbatches, virtual_stages, caps);
    mpar__free_a(allocator, caps);
    if (!sc) return mpar_error_set(err, MPAR_ERROR_OUT_OF_HOST_MEMORY, "%s: out of host memory", fn);
    sc->kind = kind;
    switch (kind) {
    case MPAR_SCHEDULE_SEQUENTIAL:
    case MPAR_SCHEDULE_GPIPE: mpar__sched_gen_gpipe(sc); break;
    case MPAR_SCHEDULE_1F1B: mpar__sched_gen_1f1b(sc); break;
    case MPAR_SCHEDULE_INTERLEAVED_1F1B:
        if (virtual_stages == 1)
            mpar__sched_gen_1f1b(sc);
        else
            mpar__sched_gen_interleaved(sc);
        break;
    case MPAR_SCHEDULE_ZB_H1: mpar__sched_gen_zbh1(sc); break;
    case MPAR_SCHEDULE_ZB_H2: mpar__sched_gen_zbh2(sc); break;
    case MPAR_SCHEDULE_ZB_V: mpar__sched_gen_zbv(sc); break;
    default: break; /* refused above */
    }
    for (s = 0; s < stages; ++s) MPAR_ASSERT(sc->action_count[s] <= per_stage);
    mpar__sched_derive(sc);

    r = mpar_schedule_validate(sc, err); /* never hand out a broken schedule */
    if (r != MPAR_SUCCESS) {
        mpar_schedule_destroy(sc);
        return r;
    }
    *out = sc;
    return MPAR_SUCCESS;
}

MPARDEF mpar_result mpar_schedule_from_lists(int stages, int microbatches, int virtual_stages,
                                             const mpar_action* const* lists, const int* counts,
                                             mpar_schedule** out, mpar_error* err) {
    return mpar_schedule_from_lists_with(NULL, stages, microbatches, virtual_stages, lists, counts, out, err);
}

MPARDEF mpar_result mpar_schedule_from_lists_with(const mpar_allocator* allocator, int stages, int microbatches,
                                                  int virtual_stages, const mpar_action* const* lists,
                                                  const int* counts, mpar_schedule** out, mpar_error* err) {
    return mpar_schedule_from_lists_placed(allocator, stages, microbatches, virtual_stages, NULL, lists, counts, out,
                                           err);
}

MPARDEF mpar_result mpar_schedule_from_lists_placed(const mpar_allocator* allocator, int stages, int microbatches,
                                                    int virtual_stages, const int* placement,
                                                    const mpar_action* const* lists, const int* counts,
                                                    mpar_schedule** out, mpar_error* err) {
    static const char fn[] = "mpar_schedule_from_lists";
    mpar_schedule* sc;
    mpar_result r;
    int s, i;
    if (!out) return mpar_error_set(err, MPAR_ERROR_INVALID_ARGUMENT, "%s: out is NULL", fn);
    *out = NULL;
    if (!mpar__allocator_ok(allocator))
        return mpar_error_set(err, MPAR_ERROR_INVALID_ARGUMENT, "%s: give the allocator all three functions or none",
                              fn);
    r = mpar__sched_check_shape(fn, stages, microbatches, virtual_stages, err);
    if (r != MPAR_SUCCESS) return r;
    if (!lists || !counts)
        return mpar_error_set(err, MPAR_ERROR_INVALID_ARGUMENT, "%s: lists or counts is NULL", fn);
    for (s = 0; s < stages; ++s) {
        if (counts[s] < 0 || counts[s] > MPAR__SCHED_MAX_ITEMS)
            return mpar_error_set(err, MPAR_ERROR_INVALID_ARGUMENT, "%s: stage %d: count %d out of range", fn, s,
                                  counts[s]);
        if (counts[s] > 0 && !lists[s])
            return mpar_error_set(err, MPAR_ERROR_INVALID_ARGUMENT, "%s: stage %d: list is NULL", fn, s);
        for (i = 0; i < counts[s]; ++i)
            if ((int)lists[s][i].kind < (int)MPAR_ACTION_FORWARD ||
                (int)lists[s][i].kind > (int)MPAR_ACTION_OPTIMIZER_STEP)
                return mpar_error_set(err, MPAR_ERROR_INVALID_SCHEDULE, "%s: stage %d step %d: unknown action kind %d",
                                      fn, s, i, (int)lists[s][i].kind);
    }
    if (placement) {
        int vs, n, VS = stages * virtual_stages;
        for (vs = 0; vs < VS; ++vs)
            if (placement[vs] < 0 || placement[vs] >= stages)
                return mpar_error_set(err, MPAR_ERROR_INVALID_ARGUMENT,
                                      "%s: placement[%d] is %d, not a stage 0..%d", fn, vs, placement[vs], stages - 1);
        for (s = 0; s < stages; ++s) {
            for (n = 0, vs = 0; vs < VS; ++vs) n += placement[vs] == s;
            if (n != virtual_stages)
                return mpar_error_set(err, MPAR_ERROR_INVALID_ARGUMENT,
                                      "%s: placement gives stage %d %d virtual stages; each stage needs %d", fn, s, n,
                                      virtual_stages);
        }
    }
    sc = mpar__sched_alloc(allocator, stages, microbatches, virtual_stages, counts);
    if (!sc) return mpar_error_set(err, MPAR_ERROR_OUT_OF_HOST_MEMORY, "%s: out of host memory", fn);
    sc->custom = 1;
    sc->kind = MPAR_SCHEDULE_SEQUENTIAL;
    if (placement) {
        memcpy(sc->placement, placement, sizeof(int) * (size_t)stages * (size_t)virtual_stages);
        mpar__sched_place(sc);
    }
    for (s = 0; s < stages; ++s) {
        if (counts[s] > 0) memcpy(sc->actions[s], lists[s], sizeof(mpar_action) * (size_t)counts[s]);
        sc->action_count[s] = counts[s];
    }
    mpar__sched_derive(sc);
    *out = sc;
    return MPAR_SUCCESS;
}

MPARDEF mpar_result mpar_schedule_forward_only(const mpar_allocator* allocator, int stages, int microbatches,
                                               int virtual_stages, const int* placement, mpar_schedule** out,
                                               mpar_error* err) {
    static const char fn[] = "mpar_schedule_forward_only";
    mpar_schedule* sc;
    mpar_result r;
    int s, c, m, k, *caps;
    if (!out) return mpar_error_set(err, MPAR_ERROR_INVALID_ARGUMENT, "%s: out is NULL", fn);
    *out = NULL;
    r = mpar__sched_check_shape(fn, stages, microbatches, virtual_stages, err);
    if (r != MPAR_SUCCESS) return r;
    caps = (int*)mpar__alloc_a(allocator, sizeof(int) * (size_t)stages);
    if (!caps) return mpar_error_set(err, MPAR_ERROR_OUT_OF_HOST_MEMORY, "%s: out of host memory", fn);
    for (s = 0; s < stages; ++s) caps[s] = 0;
    /* an empty shell of the right shape, placed, then filled */
    {
        const mpar_action* none = NULL;
        const mpar_action** lists = (const mpar_action**)mpar__alloc_a(allocator, sizeof(mpar_action*) * (size_t)stages);
        if (!lists) {
            mpar__free_a(allocator, caps);
            return mpar_error_set(err, MPAR_ERROR_OUT_OF_HOST_MEMORY, "%s: out of host memory", fn);
        }
        for (s = 0; s < stages; ++s) lists[s] = none;
        r = mpar_schedule_from_lists_placed(allocator, stages, microbatches, virtual_stages, placement, lists, caps,
                                            &sc, err);
        mpar__free_a(allocator, (void*)lists);
    }
    mpar__free_a(allocator, caps);
    if (r != MPAR_SUCCESS) return r;
    for (s = 0; s < stages; ++s) {
        mpar_action* a = (mpar_action*)mpar__alloc_a(&sc->allocator, sizeof(mpar_action) * (size_t)microbatches *
                                                                        (size_t)virtual_stages);
        if (!a) {
            mpar_schedule_destroy(sc);
            return mpar_error_set(err, MPAR_ERROR_OUT_OF_HOST_MEMORY, "%s: out of host memory", fn);
        }
        mpar__free_a(&sc->allocator, sc->actions[s]);
        sc->actions[s] = a;
        /* keys m + vs ascending, ties by m: walk the keys, chunks in model order */
        for (k = 0; k < microbatches + stages * virtual_stages; ++k)
            for (c = virtual_stages - 1; c >= 0; --c) { /* larger vs first = smaller m on a tie */
                m = k - mpar__sched_vs(sc, s, c);
                if (m >= 0 && m < microbatches) mpar__sched_push(sc, s, MPAR_ACTION_FORWARD, m, c);
            }
    }
    sc->custom = 0;
    mpar__sched_derive(sc);
    r = mpar_schedule_validate(sc, err);
    if (r != MPAR_SUCCESS) {
        mpar_schedule_destroy(sc);
        return r;
    }
    *out = sc;
    return MPAR_SUCCESS;
}

MPARDEF mpar_result mpar_schedule_copy(const mpar_allocator* allocator, const mpar_schedule* schedule,
                                       mpar_schedule** out, mpar_error* err) {
    mpar_result r;
    if (!schedule) {
        if (out) *out = NULL;
        return mpar_error_set(err, MPAR_ERROR_INVALID_ARGUMENT, "mpar_schedule_copy: schedule is NULL");
    }
    r = mpar_schedule_from_lists_placed(allocator, schedule->stages, schedule->microbatches, schedule->virtual_stages,
                                        schedule->placement, (const mpar_action* const*)schedule->actions,
                                        schedule->action_count, out, err);
    if (r == MPAR_SUCCESS) {
        (*out)->kind = schedule->kind;
        (*out)->custom = schedule->custom;
    }
    return r;
}

MPARDEF int mpar_schedule_action_count(const mpar_schedule* schedule, int stage) {
    if (!schedule || stage < 0 || stage >= schedule->stages) return 0;
    return schedule->action_count[stage];
}

MPARDEF const mpar_action* mpar_schedule_action(const mpar_schedule* schedule, int stage, int index) {
    if (!schedule || stage < 0 || stage >= schedule->stages) return NULL;
    if (index < 0 || index >= schedule->action_count[stage]) return NULL;
    return &schedule->actions[stage][index];
}

MPARDEF int mpar_schedule_virtual_stage(const mpar_schedule* schedule, int stage, int chunk) {
    if (!schedule || stage < 0 || stage >= schedule->stages || chunk < 0 || chunk >= schedule->virtual_stages) return -1;
    return mpar__sched_vs(schedule, stage, chunk);
}

MPARDEF int mpar_schedule_stage_of(const mpar_schedule* schedule, int virtual_stage) {
    if (!schedule || virtual_stage < 0 || virtual_stage >= schedule->stages * schedule->virtual_stages) return -1;
    return schedule->placement[virtual_stage];
}

MPARDEF int mpar_schedule_chunk_of(const mpar_schedule* schedule, int virtual_stage) {
    if (!schedule || virtual_stage < 0 || virtual_stage >= schedule->stages * schedule->virtual_stages) return -1;
    return mpar__sched_chunk(schedule, virtual_stage);
}

MPARDEF int mpar_action_format(const mpar_action* action, int show_chunk, char* buf, size_t size) {
    static const char letters[] = "FBIW";
    if (!action || (int)action->kind < 0 || (int)action->kind > (int)MPAR_ACTION_OPTIMIZER_STEP)
        return snprintf(buf, size, "?");
    if (action->kind == MPAR_ACTION_OPTIMIZER_STEP) return snprintf(buf, size, "OPT");
    if (show_chunk) return snprintf(buf, size, "%c%d.%d", letters[action->kind], action->microbatch, action->chunk);
    return snprintf(buf, size, "%c%d", letters[action->kind], action->microbatch);
}

/* Label of an action in messages: chunk shown when the schedule has chunks. */
static const char* mpar__sched_label(const mpar_schedule* sc, mpar_action_kind kind, int m, int chunk, char* buf,
                                     size_t size) {
    mpar_action a;
    a.kind = kind;
    a.microbatch = m;
    a.chunk = chunk;
    mpar_action_format(&a, sc->virtual_stages > 1, buf, size);
    return buf;
}

/* ---- static checks ---- */

/* Steps (list positions) of each action per (virtual stage, micro-batch). */
typedef struct mpar__sched_steps {
    int* f;
    int* b;
    int* i;
    int* w;
} mpar__sched_steps;

static mpar_result mpar__sched_record(const mpar_schedule* sc, int* slot, int s, int step, const mpar_action* a,
                                      mpar_error* err) {
    char l[32];
    if (*slot >= 0)
        return mpar_error_set(err, MPAR_ERROR_INVALID_SCHEDULE,
                              "invalid schedule: stage %d step %d: duplicate %s (already at step %d)", s, step,
                              mpar__sched_label(sc, a->kind, a->microbatch, a->chunk, l, sizeof l), *slot);
    *slot = step;
    return MPAR_SUCCESS;
}

/* Pass 1: every action in range, recorded once; optimizer step last. */
static mpar_result mpar__sched_scan(const mpar_schedule* sc, mpar__sched_steps* st, mpar_error* err) {
    int s, i, P = sc->stages, M = sc->microbatches, V = sc->virtual_stages;
    mpar_result r = MPAR_SUCCESS;
    for (s = 0; s < P; ++s) {
        int n = sc->action_count[s];
        for (i = 0; i < n && r == MPAR_SUCCESS; ++i) {
            const mpar_action* a = &sc->actions[s][i];
            int idx;
            if ((int)a->kind < 0 || (int)a->kind > (int)MPAR_ACTION_OPTIMIZER_STEP)
                return mpar_error_set(err, MPAR_ERROR_INVALID_SCHEDULE,
                                      "invalid schedule: stage %d step %d: unknown action kind %d", s, i, (int)a->kind);
            if (a->kind == MPAR_ACTION_OPTIMIZER_STEP) {
                if (i != n - 1)
                    return mpar_error_set(err, MPAR_ERROR_INVALID_SCHEDULE,
                                          "invalid schedule: stage %d step %d: the optimizer step must be the last "
                                          "action (the list has %d)", s, i, n);
                continue;
            }
            if (a->microbatch < 0 || a->microbatch >= M)
                return mpar_error_set(err, MPAR_ERROR_INVALID_SCHEDULE,
                                      "invalid schedule: stage %d step %d: micro-batch %d out of range 0..%d", s, i,
                                      a->microbatch, M - 1);
            if (a->chunk < 0 || a->chunk >= V)
                return mpar_error_set(err, MPAR_ERROR_INVALID_SCHEDULE,
                                      "invalid schedule: stage %d step %d: chunk %d out of range 0..%d", s, i,
                                      a->chunk, V - 1);
            idx = mpar__sched_vs(sc, s, a->chunk) * M + a->microbatch;
            switch (a->kind) {
            case MPAR_ACTION_FORWARD: r = mpar__sched_record(sc, &st->f[idx], s, i, a, err); break;
            case MPAR_ACTION_BACKWARD: r = mpar__sched_record(sc, &st->b[idx], s, i, a, err); break;
            case MPAR_ACTION_BACKWARD_INPUT: r = mpar__sched_record(sc, &st->i[idx], s, i, a, err); break;
            default: r = mpar__sched_record(sc, &st->w[idx], s, i, a, err); break;
            }
        }
        if (r != MPAR_SUCCESS) return r;
        if (!sc->forward_only && (n == 0 || sc->actions[s][n - 1].kind != MPAR_ACTION_OPTIMIZER_STEP))
            return mpar_error_set(err, MPAR_ERROR_INVALID_SCHEDULE,
                                  "invalid schedule: stage %d: missing optimizer step at the end of its list "
                                  "(step %d)", s, n);
    }
    return MPAR_SUCCESS;
}

/* Pass 2: nothing missing, no B mixed with I/W, B/I after F, W after I. */
static mpar_result mpar__sched_check_pairs(const mpar_schedule* sc, const mpar__sched_steps* st, mpar_error* err) {
    int vs, m, M = sc->microbatches, VS = sc->stages * sc->virtual_stages;
    char l1[32], l2[32];
    for (vs = 0; vs < VS; ++vs) {
        int s = sc->placement[vs], c = mpar__sched_chunk(sc, vs);
        for (m = 0; m < M; ++m) {
            int k = vs * M + m, f = st->f[k], b = st->b[k], in = st->i[k], w = st->w[k];
            int back = b >= 0 ? b : in;
            const char* fl = mpar__sched_label(sc, MPAR_ACTION_FORWARD, m, c, l1, sizeof l1);
            if (f < 0)
                return mpar_error_set(err, MPAR_ERROR_INVALID_SCHEDULE,
                                      "invalid schedule: stage %d: %s is missing (virtual stage %d)%s", s, fl, vs,
                                      back >= 0 || sc->forward_only ? "" : ", and so is its backward");
            if (sc->forward_only) continue; /* inference: forwards only */
            if (b >= 0 && (in >= 0 || w >= 0))
                return mpar_error_set(err, MPAR_ERROR_INVALID_SCHEDULE,
                                      "invalid schedule: stage %d step %d: %s mixes a full backward with a split "
                                      "one (step %d)", s, b, mpar__sched_label(sc, MPAR_ACTION_BACKWARD, m, c, l2, sizeof l2),
                                      in >= 0 ? in : w);
            if (b < 0 && in < 0 && w < 0)
                return mpar_error_set(err, MPAR_ERROR_INVALID_SCHEDULE,
                                      "invalid schedule: stage %d: backward of micro-batch %d is missing (virtual "
                                      "stage %d needs B%d or I%d + W%d after %s at step %d)", s, m, vs, m, m, m, fl, f);
            if (b < 0 && (in < 0 || w < 0))
                return mpar_error_set(err, MPAR_ERROR_INVALID_SCHEDULE,
                                      "invalid schedule: stage %d step %d: %s has no matching %s", s, in >= 0 ? in : w,
                                      mpar__sched_label(sc, in >= 0 ? MPAR_ACTION_BACKWARD_INPUT : MPAR_ACTION_BACKWARD_WEIGHT,
                                                        m, c, l2, sizeof l2),
                                      in >= 0 ? "weight-gradient action W (missing)" : "input-gradient action I (missing)");
            if (back < f)
                return mpar_error_set(err, MPAR_ERROR_INVALID_SCHEDULE,
                                      "invalid schedule: stage %d step %d: %s comes before its own %s (step %d)", s,
                                      back, mpar__sched_label(sc, b >= 0 ? MPAR_ACTION_BACKWARD : MPAR_ACTION_BACKWARD_INPUT,
                                                              m, c, l2, sizeof l2), fl, f);
            if (b < 0 && w < in)
                return mpar_error_set(err, MPAR_ERROR_INVALID_SCHEDULE,
                                      "invalid schedule: stage %d step %d: %s comes before its own I%d (step %d)", s,
                                      w, mpar__sched_label(sc, MPAR_ACTION_BACKWARD_WEIGHT, m, c, l2, sizeof l2), m, in);
        }
    }
    return MPAR_SUCCESS;
}

/* Pass 3: links are queues. Across every boundary, in each direction, the
   receiver takes the micro-batches in the order the sender sends them:
   activations F(j, m) -> F(j+1, m), gradients B/I(j+1, m) -> B/I(j, m).
   `seq` has room for the longest list. */
static mpar_result mpar__sched_check_fifo(const mpar_schedule* sc, const mpar__sched_steps* st, int* seq,
                                          mpar_error* err) {
    int j, g, m, M = sc->microbatches, VS = sc->stages * sc->virtual_stages;
    char l1[32], l2[32];
    for (j = 0; j + 1 < VS; ++j)
        for (g = 0; g <= !sc->forward_only; ++g) {
            int from = g ? j + 1 : j, to = g ? j : j + 1, s = sc->placement[from], n = sc->action_count[s], i;
            int prev = -1, prev_m = -1;
            for (i = 0; i < n; ++i) seq[i] = -1;
            for (m = 0; m < M; ++m) {
                int at = g ? (st->b[from * M + m] >= 0 ? st->b[from * M + m] : st->i[from * M + m]) : st->f[from * M + m];
                seq[at] = m; /* sending order */
            }
            for (i = 0; i < n; ++i) {
                int at;
                if (seq[i] < 0) continue;
                m = seq[i];
                at = g ? (st->b[to * M + m] >= 0 ? st->b[to * M + m] : st->i[to * M + m]) : st->f[to * M + m];
                if (at < prev) {
                    mpar_action_kind kind = g ? (st->b[to * M + m] >= 0 ? MPAR_ACTION_BACKWARD
                                                                      : MPAR_ACTION_BACKWARD_INPUT)
                                              : MPAR_ACTION_FORWARD;
                    return mpar_error_set(err, MPAR_ERROR_INVALID_SCHEDULE,
                                          "invalid schedule: stage %d step %d: %s comes before %s (step %d), but the "
                                          "%s of micro-batch %d cross boundary %d after those of micro-batch %d; a "
                                          "link is a queue (first in, first out)",
                                          sc->placement[to], at,
                                          mpar__sched_label(sc, kind, m, mpar__sched_chunk(sc, to), l1, sizeof l1),
                                          mpar__sched_label(sc, kind, prev_m, mpar__sched_chunk(sc, to), l2, sizeof l2),
                                          prev, g ? "gradients" : "activations", m, j, prev_m);
                }
                prev = at, prev_m = m;
            }
        }
    return MPAR_SUCCESS;
}

static mpar_result mpar__sched_check_static(const mpar_schedule* sc, const mpar_allocator* a, mpar_error* err) {
    size_t n = (size_t)sc->stages * (size_t)sc->virtual_stages * (size_t)sc->microbatches, k;
    mpar__sched_steps st;
    mpar_result r;
    int* mem = (int*)mpar__alloc_a(a, sizeof(int) * 4 * n);
    if (!mem) return mpar_error_set(err, MPAR_ERROR_OUT_OF_HOST_MEMORY, "schedule check: out of host memory");
    for (k = 0; k < 4 * n; ++k) mem[k] = -1;
    st.f = mem;
    st.b = mem + n;
    st.i = mem + 2 * n;
    st.w = mem + 3 * n;
    r = mpar__sched_scan(sc, &st, err);
    if (r == MPAR_SUCCESS) r = mpar__sched_check_pairs(sc, &st, err);
    if (r == MPAR_SUCCESS) {
        int s, longest = 1, *seq;
        for (s = 0; s < sc->stages; ++s)
            if (sc->action_count[s] > longest) longest = sc->action_count[s];
        seq = (int*)mpar__alloc_a(a, sizeof(int) * (size_t)longest);
        r = seq ? mpar__sched_check_fifo(sc, &st, seq, err)
                : mpar_error_set(err, MPAR_ERROR_OUT_OF_HOST_MEMORY, "schedule check: out of host memory");
        mpar__free_a(a, seq);
    }
    mpar__free_a(a, mem);
    return r;
}

/* ---- the dependency walk shared by validate and simulate ---- */

/* Resolved costs; NULL in the run means all zero (validation only). */
typedef struct mpar__sched_costs {
    double* f;     /* [VS] */
    double* b;     /* [VS] */
    double* i;     /* [VS] */
    double* w;     /* [VS] */
    double* opt;   /* [P] */
    double* link;  /* [VS]: boundary j between virtual stage j and j+1 */
    double* scale; /* [M] */
    double* mem;
    int blocking; /* mpar_sim_desc.link_blocking */
} mpar__sched_costs;

typedef struct mpar__sched_run {
    const mpar_schedule* sc;
    const mpar__sched_costs* costs; /* NULL: zero costs */
    mpar_simulation* sim;           /* NULL: no outputs */
    int P, M, V, VS;
    double* f_end;  /* [VS*M] end of F, -1 while not run */
    double* bi_end; /* [VS*M] end of B or I, -1 while not run */
    int* pos;       /* [P] next step of each stage */
    int* grads;     /* [P] B's and W's done */
    int* in_flight; /* [P] */
    double* free_at;/* [P] */
    void* mem;
} mpar__sched_run;

static double mpar__sched_link(const mpar__sched_run* run, int boundary, int m) {
    if (!run->costs || run->P == 1) return 0.0; /* P == 1: every boundary is on one stage */
    return run->costs->link[boundary] * run->costs->scale[m];
}
/* The delay a message adds to its receiver's start: none with blocking
   links (the receiver pays it as busy time instead). */
static double mpar__sched_arrival(const mpar__sched_run* run, int boundary, int m) {
    return run->costs && run->costs->blocking ? 0.0 : mpar__sched_link(run, boundary, m);
}
/* Blocking links: the copies an action makes itself, in and out. */
static double mpar__sched_copies(const mpar__sched_run* run, int s, const mpar_action* a) {
    int vs = mpar__sched_action_vs(run->sc, s, a), m = a->microbatch;
    const int* at = run->sc->placement;
    double t = 0.0;
    if (!run->costs || !run->costs->blocking) return 0.0;
    if (a->kind == MPAR_ACTION_FORWARD) {
        if (vs > 0 && at[vs - 1] != s) t += mpar__sched_link(run, vs - 1, m);
        if (vs + 1 < run->VS && at[vs + 1] != s) t += mpar__sched_link(run, vs, m);
    } else if (a->kind == MPAR_ACTION_BACKWARD || a->kind == MPAR_ACTION_BACKWARD_INPUT) {
        if (vs + 1 < run->VS && at[vs + 1] != s) t += mpar__sched_link(run, vs, m);
        if (vs > 0 && at[vs - 1] != s) t += mpar__sched_link(run, vs - 1, m);
    }
    return t;
}

static double mpar__sched_duration(const mpar__sched_run* run, int s, const mpar_action* a) {
    const mpar__sched_costs* c = run->costs;
    int vs = mpar__sched_action_vs(run->sc, s, a);
    if (!c) return 0.0;
    switch (a->kind) {
    case MPAR_ACTION_FORWARD: return c->f[vs] * c->scale[a->microbatch];
    case MPAR_ACTION_BACKWARD: return c->b[vs] * c->scale[a->microbatch];
    case MPAR_ACTION_BACKWARD_INPUT: return c->i[vs] * c->scale[a->microbatch];
    case MPAR_ACTION_BACKWARD_WEIGHT: return c->w[vs] * c->scale[a->microbatch];
    default: return c->opt[s];
    }
}

/* 1 and *ready when the inputs of stage s's action a are there; 0 and the
   missing action in *need / *need_vs otherwise. */
static int mpar__sched_ready(const mpar__sched_run* run, int s, const mpar_action* a, double* ready,
                             mpar_action_kind* need, int* need_vs) {
    int M = run->M, vs = mpar__sched_action_vs(run->sc, s, a), m = a->microbatch;
    double t = 0.0;
    if (a->kind == MPAR_ACTION_OPTIMIZER_STEP) {
        *need = MPAR_ACTION_BACKWARD;
        *need_vs = -1;
        *ready = 0.0;
        return run->grads[s] == run->V * M;
    }
    if (a->kind == MPAR_ACTION_FORWARD) {
        if (vs == 0) {
            *ready = 0.0;
            return 1;
        }
        *need = MPAR_ACTION_FORWARD;
        *need_vs = vs - 1;
        if (run->f_end[(vs - 1) * M + m] < 0.0) return 0;
        t = run->f_end[(vs - 1) * M + m];
        if (run->sc->placement[vs - 1] != s) t += mpar__sched_arrival(run, vs - 1, m);
        *ready = t;
        return 1;
    }
    if (a->kind == MPAR_ACTION_BACKWARD_WEIGHT) { /* I is earlier in the same list */
        *need = MPAR_ACTION_BACKWARD_INPUT;
        *need_vs = vs;
        *ready = run->bi_end[vs * M + m];
        return *ready >= 0.0;
    }
    *need = MPAR_ACTION_FORWARD;
    *need_vs = vs;
    if (run->f_end[vs * M + m] < 0.0) return 0;
    t = run->f_end[vs * M + m];
    if (vs + 1 < run->VS) {
        double g = run->bi_end[(vs + 1) * M + m];
        *need = MPAR_ACTION_BACKWARD;
        *need_vs = vs + 1;
        if (g < 0.0) return 0;
        if (run->sc->placement[vs + 1] != s) g += mpar__sched_arrival(run, vs, m);
        if (g > t) t = g;
    }
    *ready = t;
    return 1;
}

static void mpar__sched_execute(mpar__sched_run* run, int s, const mpar_action* a, double ready) {
    int k = mpar__sched_action_vs(run->sc, s, a) * run->M + a->microbatch, step = run->pos[s];
    double start = ready > run->free_at[s] ? ready : run->free_at[s];
    double end = start + mpar__sched_duration(run, s, a) + mpar__sched_copies(run, s, a);
    switch (a->kind) {
    case MPAR_ACTION_FORWARD:
        run->f_end[k] = end;
        run->in_flight[s]++;
        break;
    case MPAR_ACTION_BACKWARD:
        run->bi_end[k] = end;
        run->grads[s]++;
        run->in_flight[s]--;
        break;
    case MPAR_ACTION_BACKWARD_INPUT: run->bi_end[k] = end; break;
    case MPAR_ACTION_BACKWARD_WEIGHT:
        run->grads[s]++;
        run->in_flight[s]--;
        break;
    default: break;
    }
    run->free_at[s] = end;
    run->pos[s]++;
    if (run->sim) {
        run->sim->start[s][step] = start;
        run->sim->end[s][step] = end;
        run->sim->busy[s] += end - start;
        if (run->in_flight[s] > run->sim->peak_in_flight[s]) run->sim->peak_in_flight[s] = run->in_flight[s];
    }
}

/* The message for a run where no stage can move: each blocked stage, its
   step, its action and what it waits for. */
static mpar_result mpar__sched_deadlock(const mpar__sched_run* run, mpar_error* err) {
    char msg[1024], l1[32], l2[32];
    size_t used = 0;
    int s, first = 1;
    used += (size_t)snprintf(msg, sizeof msg, "invalid schedule: deadlock, no stage can progress:");
    for (s = 0; s < run->P && used < sizeof msg; ++s) {
        const mpar_action* a;
        mpar_action_kind need = MPAR_ACTION_FORWARD;
        int need_vs = -1, n;
        double t;
        if (run->pos[s] >= run->sc->action_count[s]) continue;
        a = &run->sc->actions[s][run->pos[s]];
        mpar__sched_ready(run, s, a, &t, &need, &need_vs);
        mpar__sched_label(run->sc, a->kind, a->microbatch, a->chunk, l1, sizeof l1);
        if (need_vs < 0) {
            n = snprintf(msg + used, sizeof msg - used, "%s stage %d step %d (%s) waits for its own backwards",
                         first ? "" : ";", s, run->pos[s], l1);
        } else {
            /* name the upstream gradient as the kind that stage really runs */
            if (need == MPAR_ACTION_BACKWARD) {
                int d = run->sc->placement[need_vs], c = mpar__sched_chunk(run->sc, need_vs), i;
                for (i = 0; i < run->sc->action_count[d]; ++i) {
                    const mpar_action* x = &run->sc->actions[d][i];
                    if (x->microbatch == a->microbatch && x->chunk == c &&
                        (x->kind == MPAR_ACTION_BACKWARD || x->kind == MPAR_ACTION_BACKWARD_INPUT))
                        need = x->kind;
                }
            }
            mpar__sched_label(run->sc, need, a->microbatch, mpar__sched_chunk(run->sc, need_vs), l2, sizeof l2);
            n = snprintf(msg + used, sizeof msg - used, "%s stage %d step %d (%s) waits for %s from stage %d",
                         first ? "" : ";", s, run->pos[s], l1, l2, run->sc->placement[need_vs]);
        }
        if (n < 0) break;
        used += (size_t)n;
        first = 0;
    }
    return mpar_error_set(err, MPAR_ERROR_INVALID_SCHEDULE, "%s", msg);
}

/* Walks all lists; each stage advances while its next action is ready.
   Start times do not depend on the order stages are visited in: an action
   is only placed once everything it waits for has its end time. */
static mpar_result mpar__sched_walk(const mpar_schedule* sc, const mpar__sched_costs* costs, mpar_simulation* sim,
                                    const mpar_allocator* a, mpar_error* err) {
    mpar__sched_run run;
    size_t n = (size_t)sc->stages * (size_t)sc->virtual_stages * (size_t)sc->microbatches, k;
    size_t P = (size_t)sc->stages;
    int s, left = 0;
    mpar_result r = MPAR_SUCCESS;
    memset(&run, 0, sizeof run);
    run.sc = sc;
    run.costs = costs;
    run.sim = sim;
    run.P = sc->stages;
    run.M = sc->microbatches;
    run.V = sc->virtual_stages;
    run.VS = sc->stages * sc->virtual_stages;
    run.mem = mpar__alloc_a(a, sizeof(double) * (2 * n + P) + sizeof(int) * 3 * P);
    if (!run.mem) return mpar_error_set(err, MPAR_ERROR_OUT_OF_HOST_MEMORY, "schedule walk: out of host memory");
    run.f_end = (double*)run.mem;
    run.bi_end = run.f_end + n;
    run.free_at = run.bi_end + n;
    run.pos = (int*)(void*)(run.free_at + P);
    run.grads = run.pos + P;
    run.in_flight = run.grads + P;
    for (k = 0; k < 2 * n; ++k) run.f_end[k] = -1.0;
    for (s = 0; s < run.P; ++s) {
        run.free_at[s] = 0.0;
        run.pos[s] = run.grads[s] = run.in_flight[s] = 0;
        left += sc->action_count[s];
    }
    while (left > 0) {
        int progress = 0;
        for (s = 0; s < run.P; ++s) {
            while (run.pos[s] < sc->action_count[s]) {
                const mpar_action* a = &sc->actions[s][run.pos[s]];
                mpar_action_kind need;
                int need_vs;
                double ready;
                if (!mpar__sched_ready(&run, s, a, &ready, &need, &need_vs)) break;
                mpar__sched_execute(&run, s, a, ready);
                --left;
                progress = 1;
            }
        }
        if (!progress) {
            r = mpar__sched_deadlock(&run, err);
            break;
        }
    }
    mpar__free_a(a, run.mem);
    return r;
}

MPARDEF mpar_result mpar_schedule_validate(const mpar_schedule* schedule, mpar_error* err) {
    mpar_result r;
    if (!schedule) return mpar_error_set(err, MPAR_ERROR_INVALID_ARGUMENT, "mpar_schedule_validate: schedule is NULL");
    r = mpar__sched_check_static(schedule, &schedule->allocator, err);
    if (r != MPAR_SUCCESS) return r;
    return mpar__sched_walk(schedule, NULL, NULL, &schedule->allocator, err);
}

/* ---- simulation ---- */

static mpar_result mpar__sched_cost(double* out, const double* array, double scalar, int index, const char* what,
                                    mpar_error* err) {
    double x = array ? array[index] : scalar;
    if (!(x >= 0.0 && x <= 1e300))
        return mpar_error_set(err, MPAR_ERROR_INVALID_ARGUMENT, "mpar_simulate: %s %d is %g, must be finite and >= 0",
                              what, index, x);
    *out = x;
    return MPAR_SUCCESS;
}

/* F, B, I, W of one virtual stage with the defaults of mpar_sim_desc. */
static mpar_result mpar__sched_resolve_stage(const mpar_sim_desc* d, int vs, mpar__sched_costs* c, mpar_error* err) {
    double f = 0.0, b = 0.0, i = 0.0, w = 0.0;
    mpar_result r = mpar__sched_cost(&f, d->forward_per_stage, d->forward, vs, "forward cost of virtual stage", err);
    if (r == MPAR_SUCCESS)
        r = mpar__sched_cost(&b, d->backward_per_stage, d->backward, vs, "backward cost of virtual stage", err);
    if (r == MPAR_SUCCESS)
        r = mpar__sched_cost(&i, d->backward_input_per_stage, d->backward_input, vs,
                             "backward-input cost of virtual stage", err);
    if (r == MPAR_SUCCESS)
        r = mpar__sched_cost(&w, d->backward_weight_per_stage, d->backward_weight, vs,
                             "backward-weight cost of virtual stage", err);
    if (r != MPAR_SUCCESS) return r;
    if (f == 0.0) f = 1.0;
    if (b > 0.0) {
        if (i == 0.0 && w == 0.0) i = w = b / 2;
        else if (i == 0.0) i = b - w;
        else if (w == 0.0) w = b - i;
        if (i < 0.0 || w < 0.0)
            return mpar_error_set(err, MPAR_ERROR_INVALID_ARGUMENT,
                                  "mpar_simulate: virtual stage %d: backward cost %g is less than the given %s cost",
                                  vs, b, i < 0.0 ? "weight-gradient" : "input-gradient");
    } else {
        if (i == 0.0) i = f;
        if (w == 0.0) w = f;
        b = i + w;
    }
    c->f[vs] = f;
    c->b[vs] = b;
    c->i[vs] = i;
    c->w[vs] = w;
    return MPAR_SUCCESS;
}

static mpar_result mpar__sched_resolve(const mpar_schedule* sc, const mpar_sim_desc* d, mpar__sched_costs* c,
                                       mpar_error* err) {
    int P = sc->stages, M = sc->microbatches, VS = sc->stages * sc->virtual_stages, j;
    mpar_result r = MPAR_SUCCESS;
    c->mem = (double*)mpar__alloc_a(&d->allocator, sizeof(double) * (size_t)(5 * VS + P + M));
    if (!c->mem) return mpar_error_set(err, MPAR_ERROR_OUT_OF_HOST_MEMORY, "mpar_simulate: out of host memory");
    c->f = c->mem;
    c->b = c->f + VS;
    c->i = c->b + VS;
    c->w = c->i + VS;
    c->link = c->w + VS;
    c->opt = c->link + VS;
    c->scale = c->opt + P;
    for (j = 0; j < VS && r == MPAR_SUCCESS; ++j) r = mpar__sched_resolve_stage(d, j, c, err);
    for (j = 0; j < VS - 1 && r == MPAR_SUCCESS; ++j)
        r = mpar__sched_cost(&c->link[j], d->link_delay_per_boundary, d->link_delay, j, "link delay of boundary", err);
    c->link[VS - 1] = 0.0;
    c->blocking = d->link_blocking != 0;
    for (j = 0; j < P && r == MPAR_SUCCESS; ++j)
        r = mpar__sched_cost(&c->opt[j], d->optimizer_step_per_stage, d->optimizer_step, j,
                             "optimizer step cost of stage", err);
    for (j = 0; j < M && r == MPAR_SUCCESS; ++j) {
        c->scale[j] = d->microbatch_scale ? d->microbatch_scale[j] : 1.0;
        if (!(c->scale[j] > 0.0 && c->scale[j] <= 1e300))
            r = mpar_error_set(err, MPAR_ERROR_INVALID_ARGUMENT,
                               "mpar_simulate: microbatch_scale[%d] is %g, must be finite and > 0", j, c->scale[j]);
    }
    if (r != MPAR_SUCCESS) {
        mpar__free_a(&d->allocator, c->mem);
        c->mem = NULL;
    }
    return r;
}

MPARDEF void mpar_simulation_destroy(mpar_simulation* sim) {
    mpar_allocator a;
    int s;
    if (!sim) return;
    a = sim->allocator; /* the simulation's memory holds it */
    if (sim->start)
        for (s = 0; s < sim->stages; ++s) mpar__free_a(&a, sim->start[s]);
    if (sim->end)
        for (s = 0; s < sim->stages; ++s) mpar__free_a(&a, sim->end[s]);
    mpar__free_a(&a, sim->start);
    mpar__free_a(&a, sim->end);
    mpar__free_a(&a, sim->busy);
    mpar__free_a(&a, sim->peak_in_flight);
    mpar__free_a(&a, sim->action_count);
    mpar__free_a(&a, sim);
}

static mpar_simulation* mpar__sched_sim_alloc(const mpar_schedule* sc, const mpar_allocator* a) {
    int s, P = sc->stages;
    mpar_simulation* sim = (mpar_simulation*)mpar__alloc_a(a, sizeof(mpar_simulation));
    if (!sim) return NULL;
    memset(sim, 0, sizeof *sim);
    sim->allocator = *a;
    sim->busy = (double*)mpar__alloc_a(a, sizeof(double) * (size_t)P);
    sim->peak_in_flight = (int*)mpar__alloc_a(a, sizeof(int) * (size_t)P);
    sim->action_count = (int*)mpar__alloc_a(a, sizeof(int) * (size_t)P);
    sim->start = (double**)mpar__alloc_a(a, sizeof(double*) * (size_t)P);
    sim->end = (double**)mpar__alloc_a(a, sizeof(double*) * (size_t)P);
    if (!sim->busy || !sim->peak_in_flight || !sim->action_count || !sim->start || !sim->end) {
        mpar_simulation_destroy(sim);
        return NULL;
    }
    sim->stages = P;
    for (s = 0; s < P; ++s) {
        sim->start[s] = sim->end[s] = NULL;
        sim->busy[s] = 0.0;
        sim->peak_in_flight[s] = 0;
        sim->action_count[s] = sc->action_count[s];
    }
    for (s = 0; s < P; ++s) {
        size_t n = (size_t)(sc->action_count[s] > 0 ? sc->action_count[s] : 1);
        sim->start[s] = (double*)mpar__alloc_a(a, sizeof(double) * n);
        sim->end[s] = (double*)mpar__alloc_a(a, sizeof(double) * n);
        if (!sim->start[s] || !sim->end[s]) {
            mpar_simulation_destroy(sim);
            return NULL;
        }
    }
    return sim;
}

MPARDEF mpar_result mpar_simulate(const mpar_schedule* schedule, const mpar_sim_desc* desc, mpar_simulation** out,
                                  mpar_error* err) {
    mpar_sim_desc defaults;
    mpar__sched_costs costs;
    mpar_simulation* sim;
    mpar_result r;
    double total = 0.0;
    int s, i;
    if (!out) return mpar_error_set(err, MPAR_ERROR_INVALID_ARGUMENT, "mpar_simulate: out is NULL");
    *out = NULL;
    if (!schedule) return mpar_error_set(err, MPAR_ERROR_INVALID_ARGUMENT, "mpar_simulate: schedule is NULL");
    if (!desc) {
        memset(&defaults, 0, sizeof defaults);
        desc = &defaults;
    }
    if (!mpar__allocator_ok(&desc->allocator))
        return mpar_error_set(err, MPAR_ERROR_INVALID_ARGUMENT, "mpar_sim_desc.allocator: give all three functions "
                              "or none");
    r = mpar__sched_check_static(schedule, &desc->allocator, err);
    if (r != MPAR_SUCCESS) return r;
    r = mpar__sched_resolve(schedule, desc, &costs, err);
    if (r != MPAR_SUCCESS) return r;
    sim = mpar__sched_sim_alloc(schedule, &desc->allocator);
    if (!sim) {
        mpar__free_a(&desc->allocator, costs.mem);
        return mpar_error_set(err, MPAR_ERROR_OUT_OF_HOST_MEMORY, "mpar_simulate: out of host memory");
    }
    r = mpar__sched_walk(schedule, &costs, sim, &desc->allocator, err);
    mpar__free_a(&desc->allocator, costs.mem);
    if (r != MPAR_SUCCESS) {
        mpar_simulation_destroy(sim);
        return r;
    }
    for (s = 0; s < sim->stages; ++s) {
        total += sim->busy[s];
        for (i = 0; i < sim->action_count[s]; ++i)
            if (sim->end[s][i] > sim->step_time) sim->step_time = sim->end[s][i];
    }
    sim->bubble_fraction = sim->step_time > 0.0 ? 1.0 - total / ((double)sim->stages * sim->step_time) : 0.0;
    *out = sim;
    return MPAR_SUCCESS;
}

/* ---- printing ---- */

MPARDEF const char* mpar_schedule_kind_name(mpar_schedule_kind kind) {
    switch (kind) {
    case MPAR_SCHEDULE_SEQUENTIAL: return "sequential";
    case MPAR_SCHEDULE_GPIPE: return "gpipe";
    case MPAR_SCHEDULE_1F1B: return "1f1b";
    case MPAR_SCHEDULE_INTERLEAVED_1F1B: return "interleaved";
    case MPAR_SCHEDULE_ZB_H1: return "zbh1";
    case MPAR_SCHEDULE_ZB_H2: return "zbh2";
    case MPAR_SCHEDULE_ZB_V: return "zbv";
    case MPAR_SCHEDULE_AUTO: return "auto";
    }
    return "unknown";
}

MPARDEF mpar_result mpar_schedule_kind_parse(const char* name, mpar_schedule_kind* out, mpar_error* err) {
    static const struct {
        const char* name;
        mpar_schedule_kind kind;
    } names[] = {{"sequential", MPAR_SCHEDULE_SEQUENTIAL},     {"naive", MPAR_SCHEDULE_SEQUENTIAL},
                 {"gpipe", MPAR_SCHEDULE_GPIPE},               {"1f1b", MPAR_SCHEDULE_1F1B},
                 {"pipedreamflush", MPAR_SCHEDULE_1F1B},       {"interleaved", MPAR_SCHEDULE_INTERLEAVED_1F1B},
                 {"interleaved1f1b", MPAR_SCHEDULE_INTERLEAVED_1F1B}, {"zbh1", MPAR_SCHEDULE_ZB_H1},
                 {"zbh2", MPAR_SCHEDULE_ZB_H2},               {"zbv", MPAR_SCHEDULE_ZB_V},
                 {"auto", MPAR_SCHEDULE_AUTO}};
    char norm[32];
    size_t n = 0, k;
    const char* p;
    if (!name || !out)
        return mpar_error_set(err, MPAR_ERROR_INVALID_ARGUMENT, "mpar_schedule_kind_parse: name or out is NULL");
    for (p = name; *p && n + 1 < sizeof norm; ++p)
        if (*p != '-' && *p != '_' && *p != ' ') norm[n++] = (char)tolower((unsigned char)*p);
    norm[n] = '\0';
    if (!*p)
        for (k = 0; k < sizeof names / sizeof names[0]; ++k)
            if (strcmp(norm, names[k].name) == 0) {
                *out = names[k].kind;
                return MPAR_SUCCESS;
            }
    return mpar_error_set(err, MPAR_ERROR_INVALID_ARGUMENT,
                          "unknown schedule '%.64s' (expected sequential, gpipe, 1f1b, interleaved, zbh1, zbh2, zbv "
                          "or auto)", name);
}

/* "chunk c = virtual stage": which part of the model each label's .c is. */
static void mpar__sched_print_placement(const mpar_schedule* sc, FILE* out) {
    int s, c;
    fprintf(out, "chunks as virtual stages (model order):");
    for (s = 0; s < sc->stages; ++s) {
        fprintf(out, "%s stage %d:", s ? ";" : "", s);
        for (c = 0; c < sc->virtual_stages; ++c) fprintf(out, " .%d=%d", c, mpar__sched_vs(sc, s, c));
    }
    fprintf(out, "\n");
}

MPARDEF void mpar_schedule_print(const mpar_schedule* schedule, FILE* out) {
    const mpar_schedule* sc = schedule;
    int s, i, width = 3, longest = 0;
    char l[32];
    if (!sc || !out) return;
    for (s = 0; s < sc->stages; ++s) {
        if (sc->action_count[s] > longest) longest = sc->action_count[s];
        for (i = 0; i < sc->action_count[s]; ++i) {
            int n = mpar_action_format(&sc->actions[s][i], sc->virtual_stages > 1, l, sizeof l);
            if (n > width) width = n;
        }
    }
    fprintf(out, "schedule %s: %d stages, %d micro-batches, %d virtual stage%s per stage\n",
            sc->custom ? "custom" : mpar_schedule_kind_name(sc->kind), sc->stages, sc->microbatches,
            sc->virtual_stages, sc->virtual_stages == 1 ? "" : "s");
    if (sc->virtual_stages > 1) mpar__sched_print_placement(sc, out);
    fprintf(out, "step    ");
    for (i = 0; i < longest; ++i) fprintf(out, " %*d", width, i);
    fprintf(out, "\n");
    for (s = 0; s < sc->stages; ++s) {
        fprintf(out, "stage %-2d", s);
        for (i = 0; i < sc->action_count[s]; ++i) {
            mpar_action_format(&sc->actions[s][i], sc->virtual_stages > 1, l, sizeof l);
            fprintf(out, " %-*s", width, l);
        }
        fprintf(out, "\n");
    }
}

/* One Gantt row of stage s: the action kind of each column (`chunks` 0:
   its chunk instead, as a digit; ' ' where idle or the optimizer runs). */
static void mpar__sched_print_row(const mpar_simulation* sim, const mpar_schedule* sc, int s, int columns,
                                  int chunks, FILE* out) {
    static const char letters[] = "FBIWO", digits[] = "0123456789abcdefghijklmnopqrstuvwxyz";
    int i = 0, c, n = sim->action_count[s];
    for (c = 0; c < columns; ++c) {
        double t = (c + 0.5) * sim->step_time / columns;
        char ch = chunks ? ' ' : '.';
        while (i < n && sim->end[s][i] <= t) ++i;
        if (i < n && sim->start[s][i] <= t) {
            const mpar_action* a = &sc->actions[s][i];
            if (!chunks) {
                ch = letters[a->kind];
                if (a->microbatch % 2 != 0) ch = (char)tolower((unsigned char)ch);
            } else if (a->kind != MPAR_ACTION_OPTIMIZER_STEP) {
                ch = a->chunk >= 0 && a->chunk < (int)sizeof digits - 1 ? digits[a->chunk] : '+';
            }
        }
        fputc(ch, out);
    }
}

MPARDEF void mpar_simulation_print(const mpar_simulation* sim, const mpar_schedule* schedule, FILE* out,
                                   int columns) {
    int s;
    if (!sim || !schedule || !out || schedule->stages != sim->stages) return;
    if (columns <= 0) columns = 80;
    for (s = 0; s < sim->stages; ++s)
        if (sim->action_count[s] != schedule->action_count[s]) return;
    fprintf(out, "step time %g, bubble %.4f (%g time units per column)\n", sim->step_time, sim->bubble_fraction,
            sim->step_time / columns);
    if (schedule->virtual_stages > 1) mpar__sched_print_placement(schedule, out);
    for (s = 0; s < sim->stages; ++s) {
        fprintf(out, "stage %-2d |", s);
        mpar__sched_print_row(sim, schedule, s, columns, 0, out);
        fprintf(out, "| busy %g (%.1f%%), peak in flight %d\n", sim->busy[s],
                sim->step_time > 0.0 ? 100.0 * sim->busy[s] / sim->step_time : 0.0, sim->peak_in_flight[s]);
        if (schedule->virtual_stages == 1) continue;
        fprintf(out, "   chunk |");
        mpar__sched_print_row(sim, schedule, s, columns, 1, out);
        fprintf(out, "|\n");
    }
}


/* ---- synthesis (mpar_schedule_synthesize) ---- */

#define MPAR__SYNTH_EFFORT 2000

/* Weights of the list scheduler's priority terms; the highest sum wins. */
typedef struct mpar__synth_rule {
    double f, b, w; /* base priority of a forward, a backward (B or I), a weight gradient */
    double wait;    /* minus this per unit of time an action starts after the earliest one */
    double starve;  /* a forward whose downstream idles, a backward whose upstream idles */
    double memory;  /* a weight gradient while the cap blocks a forward of its stage */
    double older;   /* minus this per micro-batch index: older first */
    double deeper;  /* plus this times vs / VS: later virtual stages first */
    double noise;   /* random jitter of this size (randomised rules) */
    int split;      /* B or I (SPLIT_ANY): 0 I when I + W <= B; 1 always I; 2 I when upstream idles; 3 always B */
} mpar__synth_rule;

/* An action the list scheduler could take next. */
typedef struct mpar__synth_cand {
    mpar_action_kind kind;
    int vs, m;
    double start, end;
} mpar__synth_cand;

typedef struct mpar__synth {
    int P, M, V, VS, split, room; /* room: most actions a list can hold */
    int* cap;                     /* [P] INT_MAX when uncapped */
    int* chunk_of;                /* [VS] */
    double unit;                  /* mean action cost, the priority's time scale */
    mpar__sched_costs costs;
    mpar__sched_run run;   /* the walk's state; its arrays double as the list scheduler's */
    mpar_simulation* sim;  /* start and end of the last evaluation */
    int* dep_bound;        /* [P*room] the action waited for a dependency, not for its stage */
    int* loc;              /* [2*VS*M] s*room + step of each F, then of each B / I */
    int* crit;             /* [P*room] critical path of the current schedule, s*room + step */
    int* crit_dep;         /* [P*room] what each of those waited for, -1: its stage */
    int crit_len;
    int *next_f, *next_b, *next_w; /* [VS] list scheduler: next micro-batch of each */
    int* kind_b;                   /* [VS*M] the backward it chose */
    int* blocked;                  /* [P] a forward waits for room under the cap */
    mpar__synth_cand* cand;        /* [3*VS] */
    mpar_schedule *best, *cur, *tmp; /* lists with room; placement set */
    double best_step, best_total, cur_step, cur_total;
    int evals, budget;
    uint64_t rng;
    const mpar_allocator* a;
} mpar__synth;

static uint64_t mpar__synth_next(uint64_t* x) { /* splitmix64 */
    uint64_t z = (*x += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}
static double mpar__synth_unit(uint64_t* x) { return (double)(mpar__synth_next(x) >> 11) / 9007199254740992.0; }
static int mpar__synth_below(uint64_t* x, int n) { return n > 0 ? (int)(mpar__synth_next(x) % (uint64_t)n) : 0; }

static void mpar__synth_copy(mpar_schedule* dst, const mpar_schedule* src) {
    int s;
    for (s = 0; s < src->stages; ++s) {
        dst->action_count[s] = src->action_count[s];
        memcpy(dst->actions[s], src->actions[s], sizeof(mpar_action) * (size_t)src->action_count[s]);
    }
}

/* ---- evaluation: the simulator's walk on scratch the search keeps ---- */

/* Within the caps, and on each chunk the forwards, the backwards (B or I)
   and the weight gradients (B or W) each in micro-batch order. The first
   two keep every link a queue (mpar_schedule_validate's rule, which the
   search does not re-run per candidate); the third is what makes a
   pipeline equal one device bit for bit: the executor accumulates weight
   gradients in place, in list order, and float sums depend on order. */
static int mpar__synth_fits(const mpar__synth* y, const mpar_schedule* sc) {
    int s, i, c, last_f[64], last_b[64], last_w[64];
    for (s = 0; s < y->P; ++s) {
        int held = 0;
        for (c = 0; c < sc->virtual_stages && c < 64; ++c) last_f[c] = last_b[c] = last_w[c] = -1;
        for (i = 0; i < sc->action_count[s]; ++i) {
            const mpar_action* a = &sc->actions[s][i];
            mpar_action_kind k = a->kind;
            int m = a->microbatch, ch = a->chunk < 64 ? a->chunk : 63;
            if (k == MPAR_ACTION_OPTIMIZER_STEP) continue;
            if (k == MPAR_ACTION_FORWARD) {
                if (++held > y->cap[s] || m < last_f[ch]) return 0;
                last_f[ch] = m;
            }
            if (k == MPAR_ACTION_BACKWARD || k == MPAR_ACTION_BACKWARD_INPUT) {
                if (m < last_b[ch]) return 0;
                last_b[ch] = m;
            }
            if (k == MPAR_ACTION_BACKWARD || k == MPAR_ACTION_BACKWARD_WEIGHT) {
                held--;
                if (m < last_w[ch]) return 0;
                last_w[ch] = m;
            }
        }
    }
    return 1;
}

static void mpar__synth_reset(mpar__synth* y, const mpar_schedule* sc) {
    mpar__sched_run* run = &y->run;
    int k, n = y->VS * y->M;
    run->sc = sc;
    for (k = 0; k < n; ++k) run->f_end[k] = run->bi_end[k] = -1.0;
    for (k = 0; k < y->P; ++k) {
        run->free_at[k] = 0.0;
        run->pos[k] = run->grads[k] = run->in_flight[k] = 0;
        y->sim->busy[k] = 0.0;
        y->sim->peak_in_flight[k] = 0;
    }
}

/* Runs stage s while its next action is ready; how many it ran. */
static int mpar__synth_advance(mpar__synth* y, int s) {
    mpar__sched_run* run = &y->run;
    const mpar_schedule* sc = run->sc;
    int ran = 0;
    while (run->pos[s] < sc->action_count[s]) {
        const mpar_action* a = &sc->actions[s][run->pos[s]];
        mpar_action_kind need;
        int need_vs, at = s * y->room + run->pos[s], k;
        double ready;
        if (!mpar__sched_ready(run, s, a, &ready, &need, &need_vs)) break;
        y->dep_bound[at] = ready > run->free_at[s];
        if (a->kind != MPAR_ACTION_OPTIMIZER_STEP) {
            k = mpar__sched_vs(sc, s, a->chunk) * y->M + a->microbatch;
            if (a->kind == MPAR_ACTION_FORWARD) y->loc[k] = at;
            if (a->kind == MPAR_ACTION_BACKWARD || a->kind == MPAR_ACTION_BACKWARD_INPUT) y->loc[y->VS * y->M + k] = at;
        }
        mpar__sched_execute(run, s, a, ready);
        ++ran;
    }
    return ran;
}

/* Step time of sc as mpar_simulate computes it (the same walk, the same
   arithmetic), or -1 when it breaks a cap or deadlocks; *total: the sum
   of the stages' finish times, the tie-breaker. */
static double mpar__synth_eval(mpar__synth* y, const mpar_schedule* sc, double* total) {
    int s, left = 0;
    double step = 0.0;
    y->evals++;
    if (!mpar__synth_fits(y, sc)) return -1.0;
    mpar__synth_reset(y, sc);
    for (s = 0; s < y->P; ++s) left += sc->action_count[s];
    while (left > 0) {
        int ran = 0;
        for (s = 0; s < y->P; ++s) ran += mpar__synth_advance(y, s);
        if (!ran) return -1.0;
        left -= ran;
    }
    *total = 0.0;
    for (s = 0; s < y->P; ++s) {
        *total += y->run.free_at[s];
        if (y->run.free_at[s] > step) step = y->run.free_at[s];
    }
    return step;
}

/* Keeps sc as the best when it is shorter, or as short and its stages
   finish sooner in sum. */
static void mpar__synth_offer(mpar__synth* y, const mpar_schedule* sc, double step, double total) {
    if (step < 0.0) return;
    if (y->best_step < 0.0 || step < y->best_step || (step == y->best_step && total < y->best_total)) {
        mpar__synth_copy(y->best, sc);
        y->best_step = step;
        y->best_total = total;
    }
}

/* ---- list scheduling: lists built action by action on a simulated clock ---- */

/* The least-memory schedule: one micro-batch at a time, every chunk's
   forward in model order, then every backward in reverse. */
static void mpar__synth_one_at_a_time(mpar__synth* y, mpar_schedule* sc) {
    int s, m, vs;
    for (s = 0; s < y->P; ++s) sc->action_count[s] = 0;
    for (m = 0; m < y->M; ++m) {
        for (vs = 0; vs < y->VS; ++vs) mpar__sched_push(sc, sc->placement[vs], MPAR_ACTION_FORWARD, m, y->chunk_of[vs]);
        for (vs = y->VS - 1; vs >= 0; --vs) {
            s = sc->placement[vs];
            if (y->split == MPAR_SYNTH_SPLIT_ALWAYS) {
                mpar__sched_push(sc, s, MPAR_ACTION_BACKWARD_INPUT, m, y->chunk_of[vs]);
                mpar__sched_push(sc, s, MPAR_ACTION_BACKWARD_WEIGHT, m, y->chunk_of[vs]);
            } else {
                mpar__sched_push(sc, s, MPAR_ACTION_BACKWARD, m, y->chunk_of[vs]);
            }
        }
    }
    for (s = 0; s < y->P; ++s) mpar__sched_push(sc, s, MPAR_ACTION_OPTIMIZER_STEP, 0, 0);
}

/* Whether F(vs, m) fits its stage's cap beside the stashes its stage still
   owes older micro-batches (their forwards not yet run there). With
   micro-batches admitted in order this keeps the oldest one able to finish,
   so the list scheduler cannot deadlock when every cap is >= V. */
static int mpar__synth_room_for(const mpar__synth* y, int vs, int m) {
    const mpar_schedule* sc = y->run.sc;
    int s = sc->placement[vs], c, owed = 0;
    for (c = 0; c < y->V; ++c) {
        int v = mpar__sched_vs(sc, s, c);
        if (v != vs && y->next_f[v] < m) owed += m - y->next_f[v];
    }
    return y->run.in_flight[s] + 1 + owed <= y->cap[s];
}

/* Whether the stage that sends to (backward) or receives from (forward)
   virtual stage vs is idle by `when`. */
static int mpar__synth_neighbour_idle(const mpar__synth* y, int vs, int backward, double when) {
    const mpar_schedule* sc = y->run.sc;
    int other = backward ? vs - 1 : vs + 1;
    if (other < 0 || other >= y->VS || sc->placement[other] == sc->placement[vs]) return 0;
    return y->run.free_at[sc->placement[other]] <= when;
}

/* Adds the action to the candidates when its inputs are scheduled. */
static void mpar__synth_add(mpar__synth* y, const mpar__synth_rule* rule, mpar_action_kind kind, int vs, int m,
                            int* n) {
    mpar__synth_cand* c = &y->cand[*n];
    mpar_action a;
    mpar_action_kind need;
    int need_vs, s = y->run.sc->placement[vs];
    double ready, free_at = y->run.free_at[s];
    a.kind = kind;
    a.microbatch = m;
    a.chunk = y->chunk_of[vs];
    if (!mpar__sched_ready(&y->run, s, &a, &ready, &need, &need_vs)) return;
    c->start = ready > free_at ? ready : free_at;
    if (kind == MPAR_ACTION_BACKWARD) { /* B or I + W: the rule decides, within desc.split */
        double i = y->costs.i[vs], w = y->costs.w[vs], b = y->costs.b[vs];
        int split = y->split == MPAR_SYNTH_SPLIT_ALWAYS ||
                    (y->split == MPAR_SYNTH_SPLIT_ANY &&
                     (rule->split == 1 || (rule->split == 0 && i + w <= b) ||
                      (rule->split == 2 && mpar__synth_neighbour_idle(y, vs, 1, c->start + i))));
        if (y->next_w[vs] < m) split = 1; /* a W is still owed: a full B would add its weights first */
        if (split) a.kind = kind = MPAR_ACTION_BACKWARD_INPUT;
    }
    c->kind = kind;
    c->vs = vs;
    c->m = m;
    c->end = c->start + mpar__sched_duration(&y->run, s, &a) + mpar__sched_copies(&y->run, s, &a);
    ++*n;
}

/* Every action some stage could take next; blocked[s]: a forward of stage
   s waits for room under its cap. */
static int mpar__synth_candidates(mpar__synth* y, const mpar__synth_rule* rule, int* blocked) {
    int vs, s, n = 0, M = y->M;
    for (s = 0; s < y->P; ++s) blocked[s] = 0;
    for (vs = 0; vs < y->VS; ++vs) {
        int m = y->next_f[vs];
        if (m < M) {
            if (mpar__synth_room_for(y, vs, m)) mpar__synth_add(y, rule, MPAR_ACTION_FORWARD, vs, m, &n);
            else if (vs == 0 || y->run.f_end[(vs - 1) * M + m] >= 0.0) blocked[y->run.sc->placement[vs]] = 1;
        }
        while (y->next_w[vs] < y->next_b[vs] && y->kind_b[vs * M + y->next_w[vs]] == MPAR_ACTION_BACKWARD)
            y->next_w[vs]++;
        if (y->next_b[vs] < M) mpar__synth_add(y, rule, MPAR_ACTION_BACKWARD, vs, y->next_b[vs], &n);
        if (y->next_w[vs] < y->next_b[vs]) mpar__synth_add(y, rule, MPAR_ACTION_BACKWARD_WEIGHT, vs, y->next_w[vs], &n);
    }
    return n;
}

static double mpar__synth_priority(mpar__synth* y, const mpar__synth_rule* rule, const mpar__synth_cand* c,
                                   double earliest, const int* blocked) {
    double p;
    int s = y->run.sc->placement[c->vs];
    switch (c->kind) {
    case MPAR_ACTION_FORWARD:
        p = rule->f + (mpar__synth_neighbour_idle(y, c->vs, 0, c->end) ? rule->starve : 0.0);
        break;
    case MPAR_ACTION_BACKWARD_WEIGHT: p = rule->w + (blocked[s] ? rule->memory : 0.0); break;
    default: p = rule->b + (mpar__synth_neighbour_idle(y, c->vs, 1, c->end) ? rule->starve : 0.0); break;
    }
    p -= rule->wait * (c->start - earliest) / y->unit;
    p -= rule->older * c->m;
    p += rule->deeper * c->vs / y->VS;
    if (rule->noise > 0.0) p += rule->noise * mpar__synth_unit(&y->rng);
    return p;
}

/* Giffler-Thompson: the candidate that would end first fixes the stage;
   of that stage's candidates that could start before that end, the rule
   picks one. */
static int mpar__synth_pick(mpar__synth* y, const mpar__synth_rule* rule, int n, const int* blocked) {
    int k, first = 0, pick = -1, s;
    double earliest = 0.0, best = 0.0;
    for (k = 1; k < n; ++k)
        if (y->cand[k].end < y->cand[first].end ||
            (y->cand[k].end == y->cand[first].end && y->cand[k].start < y->cand[first].start))
            first = k;
    s = y->run.sc->placement[y->cand[first].vs];
    earliest = y->cand[first].start;
    for (k = 0; k < n; ++k)
        if (y->run.sc->placement[y->cand[k].vs] == s && y->cand[k].start < earliest) earliest = y->cand[k].start;
    for (k = 0; k < n; ++k) {
        const mpar__synth_cand* c = &y->cand[k];
        double p;
        if (y->run.sc->placement[c->vs] != s || (k != first && !(c->start < y->cand[first].end))) continue;
        p = mpar__synth_priority(y, rule, c, earliest, blocked);
        if (pick < 0 || p > best) pick = k, best = p;
    }
    return pick;
}

/* Appends the candidate to its stage's list and runs it on the clock. */
static void mpar__synth_take(mpar__synth* y, const mpar__synth_cand* c) {
    mpar_schedule* sc = (mpar_schedule*)y->run.sc; /* the list being built */
    mpar_action a;
    mpar_action_kind need;
    int need_vs, s = sc->placement[c->vs];
    double ready;
    mpar__sched_push(sc, s, c->kind, c->m, y->chunk_of[c->vs]);
    a = sc->actions[s][sc->action_count[s] - 1];
    mpar__sched_ready(&y->run, s, &a, &ready, &need, &need_vs);
    mpar__sched_execute(&y->run, s, &a, ready);
    if (c->kind == MPAR_ACTION_FORWARD) y->next_f[c->vs]++;
    else if (c->kind == MPAR_ACTION_BACKWARD_WEIGHT) y->next_w[c->vs]++;
    else y->kind_b[c->vs * y->M + y->next_b[c->vs]++] = c->kind;
}

static void mpar__synth_list_schedule(mpar__synth* y, const mpar__synth_rule* rule, mpar_schedule* sc) {
    int s, n, *blocked = y->blocked;
    for (s = 0; s < y->P; ++s) sc->action_count[s] = 0;
    mpar__synth_reset(y, sc);
    for (s = 0; s < y->VS; ++s) y->next_f[s] = y->next_b[s] = y->next_w[s] = 0;
    while ((n = mpar__synth_candidates(y, rule, blocked)) > 0) mpar__synth_take(y, &y->cand[mpar__synth_pick(y, rule, n, blocked)]);
    for (s = 0; s < y->P; ++s) mpar__sched_push(sc, s, MPAR_ACTION_OPTIMIZER_STEP, 0, 0);
}

/* Rule k: a few fixed ones, then randomised ones. */
static void mpar__synth_rule_make(mpar__synth* y, int k, mpar__synth_rule* r) {
    static const mpar__synth_rule fixed[] = {
        /*  f    b    w   wait starve memory older deeper noise split */
        {2.0, 3.0, 1.0, 1.0, 0.5, 3.0, 0.01, 0.0, 0.0, 0}, /* backward first, W in idle time (1F1B, ZB-H1) */
        {3.0, 2.0, 1.0, 1.0, 0.5, 3.0, 0.01, 0.0, 0.0, 0}, /* forward first: as deep as the caps allow */
        {1.0, 3.0, 2.0, 1.0, 0.5, 3.0, 0.01, 0.0, 0.0, 0}, /* eager W: stashes freed early */
        {2.0, 3.0, 1.0, 0.0, 0.0, 3.0, 0.01, 0.0, 0.0, 0}, /* whatever can start first */
        {2.0, 3.0, 1.0, 1.0, 0.5, 3.0, 0.01, 1.0, 0.0, 0}, /* later chunks first */
        {2.0, 3.0, 1.0, 1.0, 0.5, 3.0, 0.01, 0.0, 0.0, 3}, /* full B everywhere */
        {2.0, 3.0, 1.0, 3.0, 1.0, 3.0, 0.01, 0.0, 0.0, 2}, /* split only for an idle upstream */
    };
    const int nfixed = (int)(sizeof fixed / sizeof fixed[0]);
    if (k < nfixed) {
        *r = fixed[k];
        return;
    }
    r->f = 3.0 * mpar__synth_unit(&y->rng);
    r->b = 3.0 * mpar__synth_unit(&y->rng);
    r->w = 3.0 * mpar__synth_unit(&y->rng);
    r->wait = 2.0 * mpar__synth_unit(&y->rng);
    r->starve = 2.0 * mpar__synth_unit(&y->rng);
    r->memory = 4.0 * mpar__synth_unit(&y->rng);
    r->older = 0.1 * mpar__synth_unit(&y->rng);
    r->deeper = 2.0 * mpar__synth_unit(&y->rng) - 1.0;
    r->noise = 0.5 * mpar__synth_unit(&y->rng);
    r->split = mpar__synth_below(&y->rng, 4);
}
#define MPAR__SYNTH_FIXED_RULES 7

/* ---- local search ---- */

/* A change to one stage's list: SHIFT moves the action at `from` to `to`;
   SPLIT turns the B at `from` into I and puts its W at `to`; MERGE turns
   the I at `from` into B and drops its W from `to`. */
typedef enum { MPAR__SYNTH_SHIFT, MPAR__SYNTH_SPLIT, MPAR__SYNTH_MERGE } mpar__synth_move_kind;
typedef struct mpar__synth_move {
    mpar__synth_move_kind kind;
    int s, from, to;
} mpar__synth_move;

static void mpar__synth_shift(mpar_schedule* sc, int s, int from, int to) {
    mpar_action a = sc->actions[s][from];
    if (from < to) memmove(&sc->actions[s][from], &sc->actions[s][from + 1], sizeof(mpar_action) * (size_t)(to - from));
    else memmove(&sc->actions[s][to + 1], &sc->actions[s][to], sizeof(mpar_action) * (size_t)(from - to));
    sc->actions[s][to] = a;
}

static void mpar__synth_insert(mpar_schedule* sc, int s, int at, mpar_action a) {
    memmove(&sc->actions[s][at + 1], &sc->actions[s][at], sizeof(mpar_action) * (size_t)(sc->action_count[s] - at));
    sc->actions[s][at] = a;
    sc->action_count[s]++;
}

static void mpar__synth_remove(mpar_schedule* sc, int s, int at) {
    memmove(&sc->actions[s][at], &sc->actions[s][at + 1], sizeof(mpar_action) * (size_t)(sc->action_count[s] - at - 1));
    sc->action_count[s]--;
}

static void mpar__synth_apply(mpar_schedule* sc, const mpar__synth_move* mv, int undo) {
    mpar_action* a = &sc->actions[mv->s][mv->from];
    mpar_action w;
    switch (mv->kind) {
    case MPAR__SYNTH_SHIFT:
        if (undo) mpar__synth_shift(sc, mv->s, mv->to, mv->from);
        else mpar__synth_shift(sc, mv->s, mv->from, mv->to);
        break;
    case MPAR__SYNTH_SPLIT:
    case MPAR__SYNTH_MERGE:
        w = *a;
        w.kind = MPAR_ACTION_BACKWARD_WEIGHT;
        if ((mv->kind == MPAR__SYNTH_SPLIT) != (undo != 0)) {
            a->kind = MPAR_ACTION_BACKWARD_INPUT;
            mpar__synth_insert(sc, mv->s, mv->to, w);
        } else {
            a->kind = MPAR_ACTION_BACKWARD;
            mpar__synth_remove(sc, mv->s, mv->to);
        }
        break;
    }
}

/* Whether the action at `from` may move to `to`: not past an action of its
   own chunk and micro-batch (F before B / I before W stays), nor to or
   from the optimizer step at the end. */
static int mpar__synth_can_shift(const mpar_schedule* sc, int s, int from, int to) {
    int n = sc->action_count[s], lo, hi, i;
    const mpar_action* a = &sc->actions[s][from < 0 ? 0 : from];
    if (from == to || from < 0 || to < 0 || from >= n - 1 || to >= n - 1) return 0;
    lo = from < to ? from + 1 : to;
    hi = from < to ? to : from - 1;
    for (i = lo; i <= hi; ++i)
        if (sc->actions[s][i].microbatch == a->microbatch && sc->actions[s][i].chunk == a->chunk) return 0;
    return 1;
}

/* What the action at (s, i) of the last evaluation waited for: the list
   position of the dependency that ended last, -1 when none. */
static int mpar__synth_dependency(const mpar__synth* y, int s, int i) {
    const mpar_schedule* sc = y->run.sc;
    const mpar_action* a = &sc->actions[s][i];
    int M = y->M, n = y->VS * M, vs, k;
    double g;
    if (a->kind == MPAR_ACTION_OPTIMIZER_STEP) return -1;
    vs = mpar__sched_vs(sc, s, a->chunk);
    k = vs * M + a->microbatch;
    if (a->kind == MPAR_ACTION_FORWARD) return vs > 0 ? y->loc[k - M] : -1;
    if (a->kind == MPAR_ACTION_BACKWARD_WEIGHT) return y->loc[n + k];
    if (vs + 1 == y->VS) return y->loc[k];
    g = y->run.bi_end[k + M] + (sc->placement[vs + 1] != s ? mpar__sched_arrival(&y->run, vs, a->microbatch) : 0.0);
    return g >= y->run.f_end[k] ? y->loc[n + k + M] : y->loc[k];
}

/* The critical path of the last evaluation, from the stage that finishes
   last back to time 0: crit[] the actions, crit_dep[] what each waited for
   (-1: the action before it on its stage). */
static void mpar__synth_critical(mpar__synth* y) {
    const mpar_schedule* sc = y->run.sc;
    int s, last = 0, i;
    for (s = 1; s < y->P; ++s)
        if (y->run.free_at[s] > y->run.free_at[last]) last = s;
    y->crit_len = 0;
    s = last;
    i = sc->action_count[s] - 1;
    while (i >= 0 && y->crit_len < y->P * y->room) {
        int at = s * y->room + i, dep = y->dep_bound[at] ? mpar__synth_dependency(y, s, i) : -1;
        y->crit[y->crit_len] = at;
        y->crit_dep[y->crit_len++] = dep;
        if (dep < 0) {
            --i;
        } else {
            s = dep / y->room;
            i = dep % y->room;
        }
    }
}

/* A move on y->cur: from the critical path (run what an action waited
   for earlier; let an action pass the one it waited behind), a random
   shift, or B <-> I + W. 0 when the drawn move is not allowed. */
static int mpar__synth_propose(mpar__synth* y, mpar__synth_move* mv) {
    mpar_schedule* sc = y->cur;
    double r = mpar__synth_unit(&y->rng);
    int n, k;
    mv->kind = MPAR__SYNTH_SHIFT;
    if (r < 0.5 && y->crit_len > 0) {
        k = mpar__synth_below(&y->rng, y->crit_len);
        if (y->crit_dep[k] >= 0) {
            mv->s = y->crit_dep[k] / y->room;
            mv->from = y->crit_dep[k] % y->room;
            mv->to = mv->from - 1 - mpar__synth_below(&y->rng, 4);
        } else {
            mv->s = y->crit[k] / y->room;
            mv->from = y->crit[k] % y->room - 1;
            mv->to = mv->from + 1 + mpar__synth_below(&y->rng, 3);
        }
        return mpar__synth_can_shift(sc, mv->s, mv->from, mv->to);
    }
    mv->s = mpar__synth_below(&y->rng, y->P);
    n = sc->action_count[mv->s];
    if (n < 3) return 0;
    mv->from = mpar__synth_below(&y->rng, n - 1);
    if (r < 0.85 || y->split != MPAR_SYNTH_SPLIT_ANY) {
        k = 1 + mpar__synth_below(&y->rng, 6);
        mv->to = mpar__synth_below(&y->rng, 2) ? mv->from + k : mv->from - k;
        return mpar__synth_can_shift(sc, mv->s, mv->from, mv->to);
    }
    if (sc->actions[mv->s][mv->from].kind == MPAR_ACTION_BACKWARD) {
        mv->kind = MPAR__SYNTH_SPLIT;
        mv->to = mv->from + 1 + (mpar__synth_below(&y->rng, 2) ? 0 : mpar__synth_below(&y->rng, n - 1 - mv->from));
        return 1;
    }
    if (sc->actions[mv->s][mv->from].kind == MPAR_ACTION_BACKWARD_INPUT) {
        const mpar_action* a = &sc->actions[mv->s][mv->from];
        mv->kind = MPAR__SYNTH_MERGE;
        for (k = mv->from + 1; k < n; ++k)
            if (sc->actions[mv->s][k].microbatch == a->microbatch && sc->actions[mv->s][k].chunk == a->chunk) break;
        mv->to = k;
        return k < n;
    }
    return 0;
}

/* Hill climbing from y->best until the budget is spent: a move is kept
   when the step is no longer and the stages' finish times sum no higher
   (sideways moves let the search cross plateaus). */
static void mpar__synth_search(mpar__synth* y) {
    mpar__synth_move mv;
    double step, total = 0.0;
    mpar__synth_copy(y->cur, y->best);
    y->cur_step = mpar__synth_eval(y, y->cur, &y->cur_total);
    mpar__synth_critical(y);
    while (y->evals < y->budget) {
        if (!mpar__synth_propose(y, &mv)) {
            y->evals++; /* a refused draw costs a little, so the loop always ends */
            continue;
        }
        mpar__synth_apply(y->cur, &mv, 0);
        step = mpar__synth_eval(y, y->cur, &total);
        if (step >= 0.0 && (step < y->cur_step || (step == y->cur_step && total <= y->cur_total))) {
            y->cur_step = step;
            y->cur_total = total;
            mpar__synth_critical(y);
            mpar__synth_offer(y, y->cur, step, total);
        } else {
            mpar__synth_apply(y->cur, &mv, 1);
        }
    }
}

/* ---- seeds, setup, the entry point ---- */

/* Every built-in kind that makes this P, M, V and placement, fits the caps
   and runs backwards as desc.split allows (SEQUENTIAL changes M; AUTO is
   this function). */
static void mpar__synth_seed_builtins(mpar__synth* y) {
    static const mpar_schedule_kind kinds[] = {MPAR_SCHEDULE_GPIPE, MPAR_SCHEDULE_1F1B,
                                               MPAR_SCHEDULE_INTERLEAVED_1F1B, MPAR_SCHEDULE_ZB_H1,
                                               MPAR_SCHEDULE_ZB_H2, MPAR_SCHEDULE_ZB_V};
    size_t k;
    for (k = 0; k < sizeof kinds / sizeof kinds[0]; ++k) {
        mpar_schedule* sc = NULL;
        mpar_error ignored;
        double step, total = 0.0;
        int s, i, fused = 0, ok;
        if (mpar_schedule_create_with(y->a, kinds[k], y->P, y->M, y->V, &sc, &ignored) != MPAR_SUCCESS) continue;
        ok = sc->stages == y->P && sc->microbatches == y->M && sc->virtual_stages == y->V &&
             memcmp(sc->placement, y->best->placement, sizeof(int) * (size_t)y->VS) == 0;
        for (s = 0; ok && s < y->P; ++s) {
            ok = sc->action_count[s] <= y->room;
            for (i = 0; i < sc->action_count[s]; ++i) fused |= sc->actions[s][i].kind == MPAR_ACTION_BACKWARD;
        }
        if (ok && y->split == MPAR_SYNTH_SPLIT_NEVER) ok = !sc->split_backward;
        if (ok && y->split == MPAR_SYNTH_SPLIT_ALWAYS) ok = !fused;
        if (ok) {
            mpar__synth_copy(y->tmp, sc);
            step = mpar__synth_eval(y, y->tmp, &total);
            mpar__synth_offer(y, y->tmp, step, total);
        }
        mpar_schedule_destroy(sc);
    }
}

/* The least-memory schedule, then the list scheduler under the fixed
   rules and under random ones until a twentieth of the budget is spent
   (each of those costs several simulations' time; the local search makes
   better use of the rest). */
static void mpar__synth_seed_rules(mpar__synth* y) {
    mpar__synth_rule rule;
    double step, total = 0.0;
    int k;
    mpar__synth_one_at_a_time(y, y->tmp);
    step = mpar__synth_eval(y, y->tmp, &total);
    mpar__synth_offer(y, y->tmp, step, total);
    for (k = 0; k < MPAR__SYNTH_FIXED_RULES || y->evals < y->budget / 20; ++k) {
        mpar__synth_rule_make(y, k, &rule);
        mpar__synth_list_schedule(y, &rule, y->tmp);
        step = mpar__synth_eval(y, y->tmp, &total);
        mpar__synth_offer(y, y->tmp, step, total);
    }
}

static void mpar__synth_free(mpar__synth* y) {
    mpar_schedule_destroy(y->best);
    mpar_schedule_destroy(y->cur);
    mpar_schedule_destroy(y->tmp);
    mpar_simulation_destroy(y->sim);
    mpar__free_a(y->a, y->costs.mem);
    mpar__free_a(y->a, y->run.mem);
    mpar__free_a(y->a, y->cap);
    mpar__free_a(y->a, y->cand);
}

/* The argument checks, each naming its field. */
static mpar_result mpar__synth_check(const char* fn, const mpar_synth_desc* d, mpar_error* err) {
    int P = d->stages, M = d->microbatches, V = d->virtual_stages == 0 ? 1 : d->virtual_stages, s, vs, n;
    if (!mpar__allocator_ok(&d->allocator))
        return mpar_error_set(err, MPAR_ERROR_INVALID_ARGUMENT,
                              "%s: mpar_synth_desc.allocator: give all three functions or none", fn);
    if (P < 1)
        return mpar_error_set(err, MPAR_ERROR_INVALID_ARGUMENT, "%s: mpar_synth_desc.stages is %d, must be >= 1", fn, P);
    if (M < 1)
        return mpar_error_set(err, MPAR_ERROR_INVALID_ARGUMENT,
                              "%s: mpar_synth_desc.microbatches is %d, must be >= 1", fn, M);
    if (V < 1)
        return mpar_error_set(err, MPAR_ERROR_INVALID_ARGUMENT,
                              "%s: mpar_synth_desc.virtual_stages is %d, must be >= 1 (or 0 for 1)", fn, V);
    if ((double)P * (double)M * (double)V * 3.0 > (double)MPAR__SCHED_MAX_ITEMS)
        return mpar_error_set(err, MPAR_ERROR_INVALID_ARGUMENT,
                              "%s: mpar_synth_desc: %d stages x %d micro-batches x %d virtual stages is too large",
                              fn, P, M, V);
    if ((int)d->split < (int)MPAR_SYNTH_SPLIT_ANY || (int)d->split > (int)MPAR_SYNTH_SPLIT_ALWAYS)
        return mpar_error_set(err, MPAR_ERROR_INVALID_ARGUMENT,
                              "%s: mpar_synth_desc.split is %d, must be MPAR_SYNTH_SPLIT_ANY, _NEVER or _ALWAYS", fn,
                              (int)d->split);
    if (d->effort < 0)
        return mpar_error_set(err, MPAR_ERROR_INVALID_ARGUMENT,
                              "%s: mpar_synth_desc.effort is %d, must be >= 0 (0: default)", fn, d->effort);
    if (!d->placement) return MPAR_SUCCESS;
    for (vs = 0; vs < P * V; ++vs)
        if (d->placement[vs] < 0 || d->placement[vs] >= P)
            return mpar_error_set(err, MPAR_ERROR_INVALID_ARGUMENT,
                                  "%s: mpar_synth_desc.placement[%d] is %d, not a stage 0..%d", fn, vs,
                                  d->placement[vs], P - 1);
    for (s = 0; s < P; ++s) {
        for (n = 0, vs = 0; vs < P * V; ++vs) n += d->placement[vs] == s;
        if (n != V)
            return mpar_error_set(err, MPAR_ERROR_INVALID_ARGUMENT,
                                  "%s: mpar_synth_desc.placement gives stage %d %d virtual stages; each needs %d", fn,
                                  s, n, V);
    }
    return MPAR_SUCCESS;
}

/* Every device must hold V stashes at once (all chunks' forwards of a
   micro-batch run before its first backward). */
static mpar_result mpar__synth_check_caps(const char* fn, const mpar_synth_desc* d, int V, mpar_error* err) {
    int s;
    for (s = 0; d->max_in_flight && s < d->stages; ++s)
        if (d->max_in_flight[s] > 0 && d->max_in_flight[s] < V)
            return mpar_error_set(err, MPAR_ERROR_DOES_NOT_FIT,
                                  "%s: stage %d may hold %d activation stash%s (mpar_synth_desc.max_in_flight[%d]), "
                                  "but every schedule holds %d there at once; the least-memory schedule (one "
                                  "micro-batch at a time) needs %d on every stage",
                                  fn, s, d->max_in_flight[s], d->max_in_flight[s] == 1 ? "" : "es", s, V, V);
    return MPAR_SUCCESS;
}

/* Costs resolved as mpar_simulate resolves them; its message, with the
   field named. */
static mpar_result mpar__synth_costs(const char* fn, mpar__synth* y, const mpar_synth_desc* d, mpar_error* err) {
    mpar_sim_desc c = d->costs;
    mpar_error e;
    const char* msg = e.message;
    mpar_result r;
    int vs;
    c.allocator = *y->a;
    r = mpar__sched_resolve(y->best, &c, &y->costs, &e);
    if (r == MPAR_ERROR_OUT_OF_HOST_MEMORY) return mpar_error_set(err, r, "%s: out of host memory", fn);
    if (r != MPAR_SUCCESS) {
        if (strncmp(msg, "mpar_simulate: ", 15) == 0) msg += 15;
        return mpar_error_set(err, r, "%s: mpar_synth_desc.costs: %s", fn, msg);
    }
    y->unit = 0.0;
    for (vs = 0; vs < y->VS; ++vs) y->unit += (y->costs.f[vs] + y->costs.b[vs]) / (3.0 * y->VS);
    if (!(y->unit > 0.0)) y->unit = 1.0;
    return MPAR_SUCCESS;
}

/* The lists, the walk's state and the list scheduler's, all from one
   allocator. */
static int mpar__synth_alloc(mpar__synth* y, const int* placement, const int* max_in_flight) {
    int s, *room, P = y->P, VS = y->VS, M = y->M, n = VS * M;
    size_t ints = (size_t)P + (size_t)VS + 3 * (size_t)P * (size_t)y->room + 2 * (size_t)n + 3 * (size_t)VS +
                  (size_t)n + 2 * (size_t)P;
    y->cap = (int*)mpar__alloc_a(y->a, sizeof(int) * ints + sizeof(int) * (size_t)P);
    y->cand = (mpar__synth_cand*)mpar__alloc_a(y->a, sizeof(mpar__synth_cand) * 3 * (size_t)VS);
    y->run.mem = mpar__alloc_a(y->a, sizeof(double) * (2 * (size_t)n + (size_t)P) + sizeof(int) * 3 * (size_t)P);
    if (!y->cap || !y->cand || !y->run.mem) return 0;
    y->chunk_of = y->cap + P;
    y->dep_bound = y->chunk_of + VS;
    y->crit = y->dep_bound + (size_t)P * (size_t)y->room;
    y->crit_dep = y->crit + (size_t)P * (size_t)y->room;
    y->loc = y->crit_dep + (size_t)P * (size_t)y->room;
    y->next_f = y->loc + 2 * (size_t)n;
    y->next_b = y->next_f + VS;
    y->next_w = y->next_b + VS;
    y->kind_b = y->next_w + VS;
    y->blocked = y->kind_b + n;
    room = y->blocked + P; /* [P] list capacities, then spare */
    for (s = 0; s < P; ++s) room[s] = y->room;
    y->best = mpar__sched_alloc(y->a, P, M, y->V, room);
    y->cur = mpar__sched_alloc(y->a, P, M, y->V, room);
    y->tmp = mpar__sched_alloc(y->a, P, M, y->V, room);
    if (!y->best || !y->cur || !y->tmp) return 0;
    if (placement) {
        memcpy(y->best->placement, placement, sizeof(int) * (size_t)VS);
        memcpy(y->cur->placement, placement, sizeof(int) * (size_t)VS);
        memcpy(y->tmp->placement, placement, sizeof(int) * (size_t)VS);
        mpar__sched_place(y->best);
        mpar__sched_place(y->cur);
        mpar__sched_place(y->tmp);
    }
    for (s = 0; s < VS; ++s) y->chunk_of[s] = mpar__sched_chunk(y->best, s);
    for (s = 0; s < P; ++s) {
        y->cap[s] = max_in_flight && max_in_flight[s] > 0 ? max_in_flight[s] : INT_MAX;
        y->tmp->action_count[s] = y->room; /* the simulation's rows get room for any list */
    }
    y->sim = mpar__sched_sim_alloc(y->tmp, y->a);
    for (s = 0; s < P; ++s) y->tmp->action_count[s] = 0;
    if (!y->sim) return 0;
    y->run.f_end = (double*)y->run.mem;
    y->run.bi_end = y->run.f_end + n;
    y->run.free_at = y->run.bi_end + n;
    y->run.pos = (int*)(void*)(y->run.free_at + P);
    y->run.grads = y->run.pos + P;
    y->run.in_flight = y->run.grads + P;
    y->run.costs = &y->costs;
    y->run.sim = y->sim;
    y->run.P = P;
    y->run.M = M;
    y->run.V = y->V;
    y->run.VS = VS;
    y->run.sc = y->best;
    return 1;
}

MPARDEF mpar_result mpar_schedule_synthesize(const mpar_synth_desc* desc, mpar_schedule** out, mpar_error* err) {
    static const char fn[] = "mpar_schedule_synthesize";
    mpar__synth y;
    mpar_allocator alloc;
    mpar_result r;
    if (!out) return mpar_error_set(err, MPAR_ERROR_INVALID_ARGUMENT, "%s: out is NULL", fn);
    *out = NULL;
    if (!desc) return mpar_error_set(err, MPAR_ERROR_INVALID_ARGUMENT, "%s: desc is NULL", fn);
    r = mpar__synth_check(fn, desc, err);
    if (r != MPAR_SUCCESS) return r;
    memset(&y, 0, sizeof y);
    y.P = desc->stages;
    y.M = desc->microbatches;
    y.V = desc->virtual_stages == 0 ? 1 : desc->virtual_stages;
    y.VS = y.P * y.V;
    y.room = 3 * y.M * y.V + 1;
    y.split = (int)desc->split;
    y.budget = desc->effort > 0 ? desc->effort : MPAR__SYNTH_EFFORT;
    y.rng = desc->seed;
    y.best_step = -1.0;
    r = mpar__synth_check_caps(fn, desc, y.V, err);
    if (r != MPAR_SUCCESS) return r;
    alloc = desc->allocator;
    y.a = &alloc;
    if (!mpar__synth_alloc(&y, desc->placement, desc->max_in_flight)) {
        mpar__synth_free(&y);
        return mpar_error_set(err, MPAR_ERROR_OUT_OF_HOST_MEMORY, "%s: out of host memory", fn);
    }
    r = mpar__synth_costs(fn, &y, desc, err);
    if (r != MPAR_SUCCESS) {
        mpar__synth_free(&y);
        return r;
    }
    mpar__synth_seed_builtins(&y);
    mpar__synth_seed_rules(&y);
    mpar__synth_search(&y);
    r = mpar_schedule_from_lists_placed(y.a, y.P, y.M, y.V, y.best->placement,
                                        (const mpar_action* const*)y.best->actions, y.best->action_count, out, err);
    if (r == MPAR_SUCCESS) {
        (*out)->kind = MPAR_SCHEDULE_AUTO;
        r = mpar_schedule_validate(*out, err); /* by construction; never hand out a broken schedule */
        if (r != MPAR_SUCCESS) {
            mpar_schedule_destroy(*out);
            *out = NULL;
        }
    }
    mpar__synth_free(&y);
    return r;
}

#endif /* MPAR_PART_SCHEDULE_IMPL */


/* --------------------------------------------------------------------------
   7. Stage chain: stages, links
   -------------------------------------------------------------------------- */
#include <time.h>

#define MPAR__MAX_WORKERS 64

typedef struct mpar__link mpar__link;
struct mpar__worker;
struct mpar__vstage;

/* How a tensor crosses one stage boundary. The ring of slots (capacity,
   head, count, tags) and its waiting are shared by the transports within
   one process; a transport moves the data in and out of one slot. Those
   with `ring` 0 (MPI) carry the whole hand-off themselves. */
typedef struct mpar__transport {
    const char* name;
    mpar_link_mode mode;
    int ring;     /* slots handed over through the shared ring */
    int overlaps; /* the copy runs beside compute; no worker waits for it */
    mpar_result (*init)(struct mpar_pipeline* p, mpar__link* l, const struct mpar__vstage* from,
                        const struct mpar__vstage* to);
    mpar_result (*send)(struct mpar__worker* w, mpar__link* l, int slot, mpar_buf src, size_t floats, int mb);
    mpar_result (*recv)(struct mpar__worker* w, mpar__link* l, int slot, mpar_buf dst, size_t floats, int mb);
    void (*abort)(mpar__link* l); /* after a job (all queues finished): drop what it left */
    void (*release)(struct mpar_pipeline* p, mpar__link* l);
} mpar__transport;

struct mpar__link {
    const mpar__transport* t;
    int capacity, head, count, aborted;
    int boundary, gradient;           /* for the timeline */
    int sender_local, receiver_local; /* this process holds that end */
    int from_worker, to_worker;
    int peer;                         /* the other end's rank, for a link across processes */
    int next;                         /* sends made, to pick the next host buffer */
    int* tags;
    size_t slot_floats;
    double timeout;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    /* transport state, per slot */
    cl_mem* dev;      /* device copy, asynchronous in one context: buffers on the receiver's device */
    float** host;     /* host-staged, MPI: host memory; asynchronous across contexts: the mapped pinned buffers */
    cl_mem* pin;      /* asynchronous across contexts: pinned (CL_MEM_ALLOC_HOST_PTR) buffers, sender's context */
    cl_event* ready;  /* asynchronous: the copy into the slot */
    cl_event* freed;  /* asynchronous: the receiver's copy out of the slot */
    int cross;        /* asynchronous: the two ends are in different contexts */
    void* requests;   /* MPI_Request per host buffer (MPAR_USE_MPI) */
    int* pending;     /* MPI: a send still in flight from that buffer */
#ifdef MPAR_TEST_DEFER_COPIES
    struct mpar__late {
        cl_mem src;
        size_t off, bytes;
        int pending;
    } * late; /* per slot: a read into pinned memory not started yet */
    /* The late reads' own queue on the sender's device, empty between
       reads: a late read enqueued behind other commands of the sender's
       copy queue could hang PoCL 3.1's `basic` driver (its scheduler ran
       the read's predecessor, whose completion notified the read while
       the enqueuing thread still held the read's lock). The data is
       computed before the read is deferred, so the read needs no order. */
    cl_command_queue late_queue;
#endif
};

typedef struct mpar__vstage {
    int index, worker, chunk, device, first, last, n; /* n = layer count */
    int recompute; /* slots keep the chunk's input; its forward runs again in the backward */
    int act16;     /* slots keep bf16 activations (fp32 stashes); the layers run in the work buffers */
    size_t* param_off;  /* [n+1] */
    size_t* act_cum;    /* [n+2] cumulative widths of region 0..n (per row) */
    size_t* stash_cum;  /* [n+1] */
    size_t* gstash_cum; /* [n+1] */
    size_t scratch_per_row;
    /* The chunk's layers cut into `blocks` runs, each run's state and slot
       parts in buffers of their own (max_buffer_bytes): block b holds layers
       block_first[b] .. block_first[b+1]-1; block_of[k] is layer k's block
       (block_of[n], the output, is the last). */
    int blocks;
    int* block_first; /* [blocks+1] */
    int* block_of;    /* [n+1] */
    cl_mem *params, *grads, *opt1, *opt2; /* [blocks]; opt2 one float for SGD */
    cl_mem* work;                         /* [blocks]: recompute's working activations */
    cl_mem scratch, norms, partial, targets, losses;
    size_t target_width; /* values per row in targets (mpar__target_width) */
    /* bf16 activations: the forward links carry bfloat16, packed here
       before a send (link16_out) and received here before unpacking into
       the chunk's input (link16_in) */
    int link16_in, link16_out;
    cl_mem out16, in16;
    /* [blocks] of cl_ulong [2(n_b+1)]: the block's layer offsets in its
       grads buffer, then the first gradient-norm chunk of each layer (a
       buffer each: the host kernels take an 8-byte table at offset 0) */
    cl_mem* norm_tables;
    size_t* part_first; /* [blocks+1]: block b's first gradient-norm chunk */
    size_t partial_count;
    int slot_count, grad_slot_count;
    cl_mem* act_slots;  /* [slot * blocks + b]; with recompute [slot]: the stage input */
    cl_mem* grad_slots; /* [slot * blocks + b] */
    int* slot_mb;
    mpar__link *fwd_in, *fwd_out, *bwd_in, *bwd_out;
} mpar__vstage;

/* GRADS: the schedule without its optimizer step; STEP: that step alone
   (MPI, or apply_gradients); TRAIN: the whole schedule, step included;
   INFER: the forward-only schedule. */
/* GENERATE: mpar_pipeline_generate's micro-batches (mpar__gen_worker). */
typedef enum { MPAR__JOB_NONE, MPAR__JOB_GRADS, MPAR__JOB_STEP, MPAR__JOB_INFER, MPAR__JOB_TRAIN, MPAR__JOB_GENERATE } mpar__job;
typedef struct mpar__gen mpar__gen;
struct mpar_pipeline;
static uint64_t mpar__gen_vstage_bytes(const struct mpar_pipeline* p, int i);
static mpar_result mpar__gen_check(struct mpar_pipeline* p);
static mpar_result mpar__gen_alloc(struct mpar_pipeline* p);
static void mpar__gen_release(struct mpar_pipeline* p);

#ifdef MPAR_USE_MPI
/* How an MPI wait polls (mpar__mpi_nap). */
typedef struct mpar__mpi_polling {
    double spin_s, nap_min_s, nap_max_s;
} mpar__mpi_polling;
#endif

/* A recorded compute event (index into the worker's events) and the
   OpenCL commands that give its times. */
typedef struct mpar__pending {
    int event;
    mpar__interval iv;
} mpar__pending;

typedef struct mpar__worker {
    struct mpar_pipeline* p;
    int index, device;
    mpar_exec ex;
    pthread_t thread;
    int started, generation, in_flight, peak_in_flight;
    int serial_held;   /* holds the context's first-run lock */
    double slow_t0;    /* a timed section started (slowed device, or force_serial); 0: none */
    cl_command_queue copy_queue; /* asynchronous links: this worker's outgoing copies */
    /* Outgoing asynchronous copies still reading a buffer of this stage:
       the stage's next write to that buffer waits for them. */
    struct {
        cl_mem mem;
        cl_event ev;      /* NULL: a late copy of the test hook (link, slot) */
        mpar__link* link;
        int slot;
    } outs[32];
    int out_count;
    cl_event ahead[64]; /* markers after the last actions (run-ahead bound) */
    int ahead_count;
    mpar_result result;
    char detail[2048]; /* this thread's failure detail (mpar__fail) */
    char error[2304];  /* its message: stage, device, action, detail */
    size_t bytes;
    mpar_event* events; /* the timeline of the current step (profiling) */
    int event_count, event_cap;
    /* desc.rebalance: host seconds of this job's actions (optimizer step
       left out) and of the link waits inside them */
    double busy_s, wait_s;
    /* Compute events whose times the device has not given yet: read when
       the job has drained (mpar__worker_resolve), so that profiling never
       makes the worker wait for its device. */
    mpar__pending* pending;
    int pending_count, pending_cap;
} mpar__worker;

typedef struct mpar__rebalance mpar__rebalance;
struct mpar__guard {
    pthread_mutex_t mu;
    const char* call; /* NULL: none */
};

static mpar_result mpar__pipeline_check(const struct mpar_pipeline* p, const char* call);
struct mpar_pipeline {
    struct mpar_pipeline* tomb_next; /* first: the context's tombstone list (MPAR_DEBUG) */
    unsigned live; /* MPAR__LIVE_PIPELINE; MPAR__DEAD once destroyed */
    mpar_context* ctx;
    const mpar_model* model;
    mpar_pipeline_desc desc;
    int workers_count, vs_count, layer_count, seq_len, rows_max, mb_rows_max;
    mpar_schedule* schedule;       /* what the workers walk in training */
    mpar_schedule* infer_schedule; /* forward-only, for the last inference's micro-batch count */
    mpar__vstage* vs;
    mpar__link* links; /* [vs_count-1] forward, then [vs_count-1] backward */
    /* Bytes each device and each chunk allocate (mpar__pipeline_need); a
       dry run (mpar_pipeline_memory) stops there. */
    uint64_t need[MPAR__MAX_WORKERS];
    uint64_t need_vs[4 * MPAR__MAX_WORKERS];
    int dry_run;
    unsigned char stage_recompute[4 * MPAR__MAX_WORKERS]; /* recompute_stages, or the plan's */
    mpar__worker workers[MPAR__MAX_WORKERS];
    /* job hand-off */
    pthread_mutex_t mu;
    pthread_cond_t start_cv, done_cv;
    pthread_cond_t opt_cv; /* the optimizer step's decision is made (or a stage failed) */
    /* The public call running on the pipeline (mpar__enter): allocated
       once, kept through a re-balancing rebuild. */
    struct mpar__guard* guard;
    /* The optimizer step of a TRAIN job, under mu: stages that posted their
       norms, the decision (mpar__step_decide) and stages that stepped. */
    int opt_posted, opt_decided, opt_go, opt_stepped, opt_bad_layer;
    double opt_norm;
    char why[160]; /* another rank's failure, told to this one */
    int generation, done_count, quit;
    mpar__job job, last_job;
    /* the current batch */
    const mpar_batch* batch;
    int mb_count;
    int* mb_first;  /* [M+1] first sample of each micro-batch */
    float loss_scale;
    float* mb_loss; /* [M] */
    double* layer_sumsq;
    float* infer_out;
    /* optimizer */
    int step, grads_ready;
    float step_lr, step_scale;
    double last_loss;
    int mb_capacity, links_ready, first_failure;
    /* processes: this one's rank, how many, and who runs each stage */
    int rank, ranks, local_workers;
    int peer_failed;       /* another rank reported a failure in this job */
    int abort_generation;  /* payload of the abort messages this rank sends */
    int stage_rank[MPAR__MAX_WORKERS];
    double loss_sum; /* across processes: the batch's loss sum, agreed after the job (mpar__loss_sum) */
    int ckpt_weights; /* the checkpoint call running is mpar_pipeline_save_weights / _load_weights */
#ifdef MPAR_USE_MPI
    MPI_Comm comm;       /* our duplicate of desc.mpi_comm (comm_owned), made when every rank agreed */
    int comm_owned;
    unsigned tag_cycle;  /* job generations the link tags tell apart (mpar__mpi_tag) */
    struct mpar__agree* agree; /* an agreement on a job's outcome still in flight (mpar__mpi_settle) */
    mpar__mpi_polling mpi_polling; /* how this pipeline's links wait (mpar__mpi_wait) */
    int ckpt_calls;                /* checkpoint saves and loads so far: their rounds (mpar__xfer_recv) */
#endif
    double t0; /* host time the current step began (timeline origin) */
    uint64_t step_seed;  /* dropout seed of the current step (model seed and step) */
    int serial;          /* this job runs its kernels one stage at a time */
    int force_serial;    /* every job does (profiling single layers) */
    int damaged;         /* an optimizer step failed part-way: only a checkpoint load continues */
    int auto_pending;    /* AUTO: the next training job measures, then the schedule is synthesised */
    mpar_schedule* replaced_schedule; /* AUTO: what the last job ran, until the next one */
    int auto_measured;   /* AUTO: the last job measured; mpar__auto_finish synthesises from it */
    int auto_caps[MPAR__MAX_WORKERS]; /* AUTO: stashes each stage may hold */
    int seen_count;      /* (job, micro-batch rows) pairs already run */
    int seen[64];
    mpar__rebalance* rb; /* desc.rebalance: the stages in use and what was measured; kept across rebuilds */
    mpar_plan* plan;     /* the plan in use (mpar_pipeline_get_plan), NULL until known; kept across rebuilds */
    mpar__gen* gen;      /* desc.generate_sequences: the key/value caches and generation buffers */
};

/* Whether this process runs a stage (always, without MPI). */
static int mpar__local(const mpar_pipeline* p, int worker) { return p->stage_rank[worker] == p->rank; }

static double mpar__now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* Appends to the worker's timeline (only when profiling). */
static void mpar__record(mpar__worker* w, mpar_event_kind kind, int mb, int chunk, int boundary, int gradient,
                         double start, double end, uint64_t bytes) {
    mpar_event* e;
    if (!w->ex.profiling) return;
    if (w->event_count == w->event_cap) {
        int cap = w->event_cap ? 2 * w->event_cap : 256;
        mpar_event* grown = (mpar_event*)mpar__alloc(w->p->ctx, sizeof(mpar_event) * (size_t)cap);
        if (!grown) return; /* the timeline loses an event, training goes on */
        if (w->events) memcpy(grown, w->events, sizeof(mpar_event) * (size_t)w->event_count);
        mpar__free(w->p->ctx, w->events);
        w->events = grown, w->event_cap = cap;
    }
    e = &w->events[w->event_count++];
    e->kind = kind, e->stage = w->index, e->microbatch = mb, e->chunk = chunk;
    e->boundary = boundary, e->gradient = gradient;
    e->start = start - w->p->t0, e->end = end - w->p->t0, e->bytes = bytes;
}

/* Records the device time of the kernels enqueued since the last record:
   host-route work now, OpenCL commands when the job has drained
   (mpar__worker_resolve). */
static void mpar__record_compute(mpar__worker* w, mpar_event_kind kind, int mb, int chunk) {
    mpar__interval iv;
    double a = 0.0, b = 0.0;
    int n = w->event_count;
    if (!w->ex.profiling || !mpar__exec_take(&w->ex, &iv)) return;
    if (!iv.first) {
        mpar__record(w, kind, mb, chunk, -1, 0, iv.host_start, iv.host_end, 0);
        return;
    }
    if (w->pending_count == w->pending_cap) {
        int cap = w->pending_cap ? 2 * w->pending_cap : 256;
        mpar__pending* grown = (mpar__pending*)mpar__alloc(w->p->ctx, sizeof *grown * (size_t)cap);
        if (grown) {
            if (w->pending) memcpy(grown, w->pending, sizeof *grown * (size_t)w->pending_count);
            mpar__free(w->p->ctx, w->pending);
            w->pending = grown, w->pending_cap = cap;
        }
    }
    mpar__record(w, kind, mb, chunk, -1, 0, w->p->t0, w->p->t0, 0); /* times filled in later */
    if (w->event_count == n + 1 && w->pending_count < w->pending_cap) {
        w->pending[w->pending_count].event = n;
        w->pending[w->pending_count++].iv = iv;
        return;
    }
    /* out of host memory: wait for the times now, or lose the event */
    if (mpar__interval_times(&w->ex, &iv, &a, &b) && w->event_count == n + 1)
        w->events[n].start = a - w->p->t0, w->events[n].end = b - w->p->t0;
}

/* After the job has drained: the times of the compute events recorded
   while it ran. An event whose times cannot be read spans nothing. */
static void mpar__worker_resolve(mpar__worker* w) {
    int i;
    for (i = 0; i < w->pending_count; i++) {
        mpar__pending* q = &w->pending[i];
        double a, b;
        if (mpar__interval_times(&w->ex, &q->iv, &a, &b) && q->event < w->event_count)
            w->events[q->event].start = a - w->p->t0, w->events[q->event].end = b - w->p->t0;
    }
    w->pending_count = 0;
}

static void mpar__record_link(mpar__worker* w, const mpar__link* l, int send, int mb, double t_wait, double t_copy,
                              double t_end, size_t floats) {
    int sender = l->gradient ? l->boundary + 1 : l->boundary, receiver = l->gradient ? l->boundary : l->boundary + 1;
    int chunk = mpar_schedule_chunk_of(w->p->schedule, send ? sender : receiver);
    if (!w->ex.profiling) return;
    if (t_copy - t_wait > 1e-6) mpar__record(w, MPAR_EVENT_WAIT, mb, chunk, l->boundary, l->gradient, t_wait, t_copy, 0);
    mpar__record(w, send ? MPAR_EVENT_SEND : MPAR_EVENT_RECEIVE, mb, chunk, l->boundary, l->gradient, t_copy, t_end,
                 (uint64_t)floats * 4);
}

/* Waits on a link's condition; fails on abort or after the timeout. */
static mpar_result mpar__link_wait(mpar__link* l, double started) {
    struct timespec ts;
    double deadline;
    if (l->aborted) return MPAR_ERROR_ABORTED;
    if (mpar__now() - started > l->timeout) return MPAR_ERROR_TIMEOUT;
    clock_gettime(CLOCK_REALTIME, &ts);
    deadline = (double)ts.tv_nsec + 50e6;
    ts.tv_sec += (time_t)(deadline / 1e9);
    ts.tv_nsec = (long)fmod(deadline, 1e9);
    pthread_cond_timedwait(&l->cv, &l->mu, &ts);
    return l->aborted ? MPAR_ERROR_ABORTED : MPAR_SUCCESS;
}


static void mpar__links_abort(mpar_pipeline* p, int value);

#ifdef MPAR_USE_MPI
/* ---- links across processes: MPI point-to-point, non-blocking, polled so
   that an abort or a timeout is noticed; one tag per link direction and
   micro-batch (modulo 1024), and one for "a rank failed" ---- */
enum { MPAR__TAG_ABORT = 32767 };

/* A link message's tag: the job's generation (modulo tag_cycle, which
   MPI_TAG_UB allows: 65536 with Open MPI's ob1, 1 with the least MPI
   allows), the link (boundary and direction: at most 30) and the
   micro-batch. A message left over from a job that failed part-way can
   never be taken for one of a later job (until the generations wrap). */
static int mpar__mpi_gen_tag(const mpar_pipeline* p, int generation, const mpar__link* l, int mb) {
    unsigned gen = (unsigned)generation % (p->tag_cycle ? p->tag_cycle : 1u);
    return (int)((gen * 32u + (unsigned)(l->boundary * 2 + l->gradient)) * 1024u + (unsigned)(mb % 1024));
}
static int mpar__mpi_tag(const mpar_pipeline* p, const mpar__link* l, int mb) {
    return mpar__mpi_gen_tag(p, p->generation, l, mb);
}

/* Tells every other rank that this one failed in the current job. */
static void mpar__mpi_abort_peers(mpar_pipeline* p) {
    int r;
    p->abort_generation = p->generation;
    for (r = 0; r < p->ranks; r++) {
        MPI_Request q;
        if (r == p->rank) continue;
        if (MPI_Isend(&p->abort_generation, 1, MPI_INT, r, MPAR__TAG_ABORT, p->comm, &q) == MPI_SUCCESS)
            MPI_Request_free(&q);
    }
}

/* Whether another rank reported a failure in the current job; messages of
   earlier jobs are dropped. Matched probes keep concurrent threads apart. */
static int mpar__mpi_peer_aborted(mpar_pipeline* p) {
    for (;;) {
        int flag = 0, gen = -1;
        MPI_Message msg;
        MPI_Status st;
        if (MPI_Improbe(MPI_ANY_SOURCE, MPAR__TAG_ABORT, p->comm, &flag, &msg, &st) != MPI_SUCCESS || !flag) break;
        MPI_Mrecv(&gen, 1, MPI_INT, &msg, MPI_STATUS_IGNORE);
        if (gen == p->generation) {
            pthread_mutex_lock(&p->mu);
            p->peer_failed = 1;
            pthread_mutex_unlock(&p->mu);
        }
    }
    return p->peer_failed;
}

/* How mpar__mpi_wait polls: MPI_Test back to back for the first spin_s of a
   wait (a message due soon costs no nap), then a nap as long as the time
   already waited past spin_s (so naps double), from nap_min_s up to
   nap_max_s (so a long wait burns little CPU and is noticed within about
   nap_max_s, plus the kernel's timer slack: 50 us by default). Aborts, peer
   failures and the timeout are checked after every poll. Each pipeline
   keeps its own copy (p->mpi_polling, from mpar__mpi_polling_default);
   bench/mpi/bench_mpi_wait.c tries others on its pipeline. */
static const mpar__mpi_polling mpar__mpi_polling_default = {50e-6, 5e-6, 250e-6};

static void mpar__mpi_nap(const mpar__mpi_polling* how, double waited) {
    double nap = waited - how->spin_s;
    struct timespec ts;
    if (nap < 0) return;
    nap = nap < how->nap_min_s ? how->nap_min_s : nap > how->nap_max_s ? how->nap_max_s : nap;
    ts.tv_sec = (time_t)nap;
    ts.tv_nsec = (long)((nap - (double)ts.tv_sec) * 1e9);
    nanosleep(&ts, NULL);
}

/* Polls requests until all are done (1), `limit` seconds pass (0), or MPI
   reports an error (-1). */
static int mpar__mpi_poll(const mpar__mpi_polling* how, MPI_Request* req, int n, double limit) {
    double t0 = mpar__now();
    for (;;) {
        int done = 0;
        if (MPI_Testall(n, req, &done, MPI_STATUSES_IGNORE) != MPI_SUCCESS) return -1;
        if (done) return 1;
        if (mpar__now() - t0 > limit) return 0;
        mpar__mpi_nap(how, mpar__now() - t0);
    }
}

/* Waits for a request, polling for local aborts, peer failures and the
   timeout; an abandoned receive is cancelled, a send left to finish. */
static mpar_result mpar__mpi_wait(mpar__worker* w, mpar__link* l, MPI_Request* req, int is_send, int mb,
                                  MPI_Status* status, size_t floats) {
    mpar_pipeline* p = w->p;
    double t0 = mpar__now();
    for (;;) {
        int done = 0, aborted, rc = MPI_Test(req, &done, status ? status : MPI_STATUS_IGNORE), cls = 0;
        if (rc != MPI_SUCCESS) {
            MPI_Error_class(rc, &cls);
            if (cls == MPI_ERR_TRUNCATE)
                return mpar__fail(p->ctx, MPAR_ERROR_MISMATCH, "rank %d sent more than the %zu floats this rank "
                                  "expects for micro-batch %d on the %s link of boundary %d: the ranks disagree on "
                                  "the model or the batch", l->peer, floats, mb, l->gradient ? "gradient" : "activation",
                                  l->boundary);
            return mpar__fail(p->ctx, MPAR_ERROR_IO, "MPI_Test failed on the link to rank %d (MPI error class %d: "
                              "a rank gone, or the network)", l->peer, cls);
        }
        if (done) return MPAR_SUCCESS;
        pthread_mutex_lock(&l->mu);
        aborted = l->aborted;
        pthread_mutex_unlock(&l->mu);
        if (!aborted && mpar__mpi_peer_aborted(p)) {
            mpar__links_abort(p, 1);
            aborted = 1;
        }
        if (aborted || mpar__now() - t0 > l->timeout) {
            if (is_send) {
                MPI_Request_free(req);
            } else {
                MPI_Cancel(req);
                MPI_Wait(req, MPI_STATUS_IGNORE);
            }
            if (aborted) return MPAR_ERROR_ABORTED;
            return mpar__fail(p->ctx, MPAR_ERROR_TIMEOUT, "%s micro-batch %d %s rank %d waited over %g s",
                              is_send ? "sending" : "receiving", mb, is_send ? "to" : "from", l->peer, l->timeout);
        }
        mpar__mpi_nap(&p->mpi_polling, mpar__now() - t0);
    }
}

/* Transport functions with ring 0: `unused` is -1, the link picks its own
   host buffer. */
static mpar_result mpar__mpi_send(mpar__worker* w, mpar__link* l, int unused, mpar_buf src, size_t floats, int mb) {
    mpar_pipeline* p = w->p;
    int slot = l->next % l->capacity;
    MPI_Request* req = (MPI_Request*)l->requests + slot;
    (void)unused;
    double t_wait = mpar__now(), t_copy;
    if (l->pending[slot]) { /* the buffer's previous message must be out first */
        mpar_result r = mpar__mpi_wait(w, l, req, 1, mb, NULL, floats);
        l->pending[slot] = 0;
        if (r != MPAR_SUCCESS) return r;
    }
    t_copy = mpar__now();
    if (mpar__exec_fault(&w->ex, MPAR__FAULT_TRANSFER))
        return mpar__fail(p->ctx, (mpar_result)CL_OUT_OF_RESOURCES, "link send to rank %d: injected transfer fault",
                          l->peer);
    MPAR__TRY(mpar__exec_transfer(&w->ex, src, l->host[slot], floats * 4, 0));
    if (MPI_Isend(l->host[slot], (int)floats, MPI_FLOAT, l->peer, mpar__mpi_tag(p, l, mb), p->comm, req) !=
        MPI_SUCCESS)
        return mpar__fail(p->ctx, MPAR_ERROR_IO, "MPI_Isend of micro-batch %d to rank %d failed", mb, l->peer);
    l->pending[slot] = 1;
    l->next++;
    mpar__record_link(w, l, 1, mb, t_wait, t_copy, mpar__now(), floats);
    return MPAR_SUCCESS;
}

static mpar_result mpar__mpi_recv(mpar__worker* w, mpar__link* l, int unused, mpar_buf dst, size_t floats, int mb) {
    mpar_pipeline* p = w->p;
    MPI_Request req;
    MPI_Status st;
    double t_wait = mpar__now(), t_copy;
    mpar_result r;
    int got = -1;
    (void)unused;
    if (MPI_Irecv(l->host[0], (int)floats, MPI_FLOAT, l->peer, mpar__mpi_tag(p, l, mb), p->comm, &req) != MPI_SUCCESS)
        return mpar__fail(p->ctx, MPAR_ERROR_IO, "MPI_Irecv of micro-batch %d from rank %d failed", mb, l->peer);
    r = mpar__mpi_wait(w, l, &req, 0, mb, &st, floats);
    if (r != MPAR_SUCCESS) return r;
    if (MPI_Get_count(&st, MPI_FLOAT, &got) != MPI_SUCCESS || got != (int)floats)
        return mpar__fail(p->ctx, MPAR_ERROR_MISMATCH, "rank %d sent %d floats for micro-batch %d on the %s link of "
                          "boundary %d, where this rank expects %zu: the ranks disagree on the model or the batch",
                          l->peer, got, mb, l->gradient ? "gradient" : "activation", l->boundary, floats);
    t_copy = mpar__now();
    if (mpar__exec_fault(&w->ex, MPAR__FAULT_TRANSFER))
        return mpar__fail(p->ctx, (mpar_result)CL_OUT_OF_RESOURCES, "link receive from rank %d: injected transfer fault",
                          l->peer);
    MPAR__TRY(mpar__exec_transfer(&w->ex, dst, l->host[0], floats * 4, 1));
    mpar__record_link(w, l, 0, mb, t_wait, t_copy, mpar__now(), floats);
    return MPAR_SUCCESS;
}
#endif

/* ---- transport: device copy (one cl_context) ----
   With MPAR_TEST_DEFER_COPIES defined (tests only), a copy is not enqueued
   when asked but at the link's next wait on that queue, as an asynchronous
   copy engine may finish it late: code that skipped the wait would hand
   over a slot whose data has not arrived, and the numbers would change.
   (PoCL itself orders commands on a shared buffer across queues, so
   without this no test could see a missing wait.) */
#ifdef MPAR_TEST_DEFER_COPIES
static cl_int mpar__link_copy(mpar_exec* ex, cl_mem src, cl_mem dst, size_t src_off, size_t dst_off, size_t bytes) {
    ex->deferred.src = src, ex->deferred.dst = dst, ex->deferred.src_off = src_off, ex->deferred.dst_off = dst_off;
    ex->deferred.bytes = bytes, ex->deferred.pending = 1;
    return CL_SUCCESS;
}
static cl_int mpar__link_finish(mpar_exec* ex) {
    if (ex->deferred.pending) {
        cl_int st = clEnqueueCopyBuffer(ex->queue, ex->deferred.src, ex->deferred.dst, ex->deferred.src_off,
                                        ex->deferred.dst_off, ex->deferred.bytes, 0, NULL, NULL);
        ex->deferred.pending = 0;
        if (st != CL_SUCCESS) return st;
    }
    return clFinish(ex->queue);
}
#else
static cl_int mpar__link_copy(mpar_exec* ex, cl_mem src, cl_mem dst, size_t src_off, size_t dst_off, size_t bytes) {
    return clEnqueueCopyBuffer(ex->queue, src, dst, src_off, dst_off, bytes, 0, NULL, NULL);
}
static cl_int mpar__link_finish(mpar_exec* ex) { return clFinish(ex->queue); }
#endif

static mpar_result mpar__devcopy_send(mpar__worker* w, mpar__link* l, int slot, mpar_buf src, size_t floats, int mb) {
    (void)mb;
    MPAR__CL(w->p->ctx, mpar__link_copy(&w->ex, src.mem, l->dev[slot], src.off * 4, 0, floats * 4));
    MPAR__CL(w->p->ctx, mpar__link_finish(&w->ex)); /* the data is there before the slot is handed over */
    return MPAR_SUCCESS;
}
static mpar_result mpar__devcopy_recv(mpar__worker* w, mpar__link* l, int slot, mpar_buf dst, size_t floats, int mb) {
    (void)mb;
    MPAR__TRY(mpar__exec_sync(&w->ex)); /* host-route writes are done; kernels are ordered by the queue */
    MPAR__CL(w->p->ctx, mpar__link_copy(&w->ex, l->dev[slot], dst.mem, 0, dst.off * 4, floats * 4));
    MPAR__CL(w->p->ctx, mpar__link_finish(&w->ex)); /* before the slot is reused */
    return MPAR_SUCCESS;
}

/* ---- transport: staged through host memory (blocking on both ends) ---- */
static mpar_result mpar__staged_send(mpar__worker* w, mpar__link* l, int slot, mpar_buf src, size_t floats, int mb) {
    (void)mb;
    return mpar__exec_transfer(&w->ex, src, l->host[slot], floats * 4, 0);
}
static mpar_result mpar__staged_recv(mpar__worker* w, mpar__link* l, int slot, mpar_buf dst, size_t floats, int mb) {
    (void)mb;
    return mpar__exec_transfer(&w->ex, dst, l->host[slot], floats * 4, 1);
}

/* ---- transport: asynchronous. The sender enqueues the copy on its copy
   queue behind a marker of its compute queue and goes on; the event of
   the copy travels with the slot. In one context the receiver's copy out
   of the slot waits on that event in its queue, and the sender's next copy
   into the slot waits on the receiver's; nobody's host thread waits.
   Across contexts (events cannot cross) the slot is pinned host memory in
   the sender's context: the sender reads into it without blocking, the
   receiver waits for that read on the host (its next kernels need the
   data anyway) and writes without blocking; the sender waits for that
   write only when it comes back to the slot. ---- */

/* Test hook (MPAR_TEST_DEFER_COPIES): a read into a pinned slot starts
   only when someone waits for it, the receiver or the sender's guard, as
   a copy engine may start late. PoCL's `basic` devices otherwise run every
   command the moment it is enqueued, so no test could see a missing wait.
   Without the hook this does nothing. */
static cl_int mpar__late_start(mpar__link* l, int slot) {
#ifdef MPAR_TEST_DEFER_COPIES
    cl_int st = CL_SUCCESS;
    pthread_mutex_lock(&l->mu);
    if (l->late && l->late[slot].pending) {
        struct mpar__late* d = &l->late[slot];
        st = clEnqueueReadBuffer(l->late_queue, d->src, CL_TRUE, d->off, d->bytes, l->host[slot], 0, NULL,
                                 &l->ready[slot]);
        d->pending = 0;
    }
    pthread_mutex_unlock(&l->mu);
    return st;
#else
    (void)l, (void)slot;
    return CL_SUCCESS;
#endif
}

/* The receiver, across contexts: the read into the pinned slot is done. */
static cl_int mpar__async_wait_ready(mpar__link* l, int slot) {
    cl_int st = mpar__late_start(l, slot);
    return st == CL_SUCCESS ? clWaitForEvents(1, &l->ready[slot]) : st;
}

/* Outgoing copy i of the worker has finished reading its buffer. */
static cl_int mpar__out_wait(mpar__worker* w, int i, int on_host) {
    cl_int st;
    if (!w->outs[i].ev) /* the test hook's late copy, done when started */
        return mpar__late_start(w->outs[i].link, w->outs[i].slot);
    st = on_host ? clWaitForEvents(1, &w->outs[i].ev) : clEnqueueBarrierWithWaitList(w->ex.queue, 1, &w->outs[i].ev, NULL);
    clReleaseEvent(w->outs[i].ev);
    return st;
}

/* The sender's buffer `mem` is read by an outgoing copy until `ev`. */
static mpar_result mpar__out_track(mpar__worker* w, cl_mem mem, cl_event ev, mpar__link* l, int slot) {
    if (w->out_count == (int)(sizeof w->outs / sizeof w->outs[0])) { /* full: the oldest must be done */
        cl_int st = mpar__out_wait(w, 0, 1);
        memmove(w->outs, w->outs + 1, sizeof w->outs[0] * (size_t)(w->out_count - 1));
        w->out_count--;
        MPAR__CL(w->p->ctx, st);
    }
    if (ev) clRetainEvent(ev);
    w->outs[w->out_count].mem = mem, w->outs[w->out_count].ev = ev;
    w->outs[w->out_count].link = l, w->outs[w->out_count].slot = slot;
    w->out_count++;
    return MPAR_SUCCESS;
}

/* Before the stage writes `mem`: outgoing copies still reading it finish
   first, in the device's queue (no host wait) or, on the host route where
   the host writes, on the host. */
static mpar_result mpar__out_guard(mpar__worker* w, cl_mem mem) {
    int i = 0;
    while (i < w->out_count) {
        cl_int st;
        if (w->outs[i].mem != mem) {
            i++;
            continue;
        }
        st = mpar__out_wait(w, i, w->ex.host_route);
        w->outs[i] = w->outs[--w->out_count];
        MPAR__CL(w->p->ctx, st);
    }
    return MPAR_SUCCESS;
}

static mpar_result mpar__out_guard_all(mpar__worker* w, cl_mem* mems, int count) {
    int i;
    for (i = 0; mems && i < count; i++) MPAR__TRY(mpar__out_guard(w, mems[i]));
    return MPAR_SUCCESS;
}

static mpar_result mpar__async_send(mpar__worker* w, mpar__link* l, int slot, mpar_buf src, size_t floats, int mb) {
    mpar_context* ctx = w->p->ctx;
    cl_event wait[2], marker = NULL;
    cl_uint n = 0;
    cl_int st;
    (void)mb;
    MPAR__CL(ctx, clEnqueueMarkerWithWaitList(w->ex.queue, 0, NULL, &marker)); /* src is computed */
    wait[n++] = marker;
    if (l->freed[slot] && l->cross) { /* the receiver's write out of the pinned slot */
        st = clWaitForEvents(1, &l->freed[slot]);
        clReleaseEvent(l->freed[slot]);
        l->freed[slot] = NULL;
        if (st != CL_SUCCESS) clReleaseEvent(marker);
        MPAR__CL(ctx, st);
    } else if (l->freed[slot]) {
        wait[n++] = l->freed[slot];
    }
#ifdef MPAR_TEST_DEFER_COPIES
    if (l->cross && l->late) { /* started by whoever waits for it (mpar__late_start) */
        st = clWaitForEvents(1, &marker);
        clReleaseEvent(marker);
        if (n == 2) clReleaseEvent(l->freed[slot]), l->freed[slot] = NULL;
        MPAR__CL(ctx, st);
        pthread_mutex_lock(&l->mu);
        l->late[slot].src = src.mem;
        l->late[slot].off = src.off * 4, l->late[slot].bytes = floats * 4, l->late[slot].pending = 1;
        pthread_mutex_unlock(&l->mu);
        return mpar__out_track(w, src.mem, NULL, l, slot);
    }
#endif
    if (l->cross)
        st = clEnqueueReadBuffer(w->copy_queue, src.mem, CL_FALSE, src.off * 4, floats * 4, l->host[slot], n, wait,
                                 &l->ready[slot]);
    else
        st = clEnqueueCopyBuffer(w->copy_queue, src.mem, l->dev[slot], src.off * 4, 0, floats * 4, n, wait,
                                 &l->ready[slot]);
    clReleaseEvent(marker);
    if (n == 2) clReleaseEvent(l->freed[slot]), l->freed[slot] = NULL;
    MPAR__CL(ctx, st);
    MPAR__CL(ctx, clFlush(w->copy_queue));
    return mpar__out_track(w, src.mem, l->ready[slot], l, slot);
}

static mpar_result mpar__async_recv(mpar__worker* w, mpar__link* l, int slot, mpar_buf dst, size_t floats, int mb) {
    mpar_context* ctx = w->p->ctx;
    cl_int st;
    (void)mb;
    MPAR__TRY(mpar__out_guard(w, dst.mem));
    if (l->cross) {
        st = mpar__async_wait_ready(l, slot);
        if (st == CL_SUCCESS)
            st = clEnqueueWriteBuffer(w->ex.queue, dst.mem, CL_FALSE, dst.off * 4, floats * 4, l->host[slot], 0, NULL,
                                      &l->freed[slot]);
    } else {
        st = clEnqueueCopyBuffer(w->ex.queue, l->dev[slot], dst.mem, 0, dst.off * 4, floats * 4, 1, &l->ready[slot],
                                 &l->freed[slot]);
    }
    clReleaseEvent(l->ready[slot]);
    l->ready[slot] = NULL;
    w->ex.cl_pending = 1; /* host-route code waits for the copy */
    return mpar__cl_check(ctx, st, l->cross ? "clEnqueueWriteBuffer (asynchronous link)"
                                            : "clEnqueueCopyBuffer (asynchronous link)", __FILE__, __LINE__);
}

static void mpar__async_abort(mpar__link* l) {
    int s;
    for (s = 0; s < l->capacity; s++) {
#ifdef MPAR_TEST_DEFER_COPIES
        if (l->late) l->late[s].pending = 0;
#endif
        if (l->ready && l->ready[s]) clReleaseEvent(l->ready[s]), l->ready[s] = NULL;
        if (l->freed && l->freed[s]) clReleaseEvent(l->freed[s]), l->freed[s] = NULL;
    }
}

static mpar_result mpar__link_init_buffers(struct mpar_pipeline* p, mpar__link* l, const struct mpar__vstage* from,
                                           const struct mpar__vstage* to);
static void mpar__link_release_buffers(struct mpar_pipeline* p, mpar__link* l);

static void mpar__no_abort(mpar__link* l) { (void)l; }

static const mpar__transport mpar__transport_device_copy = {
    "device copy", MPAR_LINK_DEVICE_COPY, 1, 0, mpar__link_init_buffers, mpar__devcopy_send, mpar__devcopy_recv,
    mpar__no_abort, mpar__link_release_buffers};
static const mpar__transport mpar__transport_host_staged = {
    "host-staged", MPAR_LINK_HOST_STAGED, 1, 0, mpar__link_init_buffers, mpar__staged_send, mpar__staged_recv,
    mpar__no_abort, mpar__link_release_buffers};
static const mpar__transport mpar__transport_async = {
    "asynchronous", MPAR_LINK_ASYNC, 1, 1, mpar__link_init_buffers, mpar__async_send, mpar__async_recv,
    mpar__async_abort, mpar__link_release_buffers};
#ifdef MPAR_USE_MPI
static const mpar__transport mpar__transport_mpi = {
    "MPI", MPAR_LINK_HOST_STAGED, 0, 0, mpar__link_init_buffers, mpar__mpi_send, mpar__mpi_recv,
    mpar__no_abort, mpar__link_release_buffers};
#endif

/* Profiling: a blocking copy first waits for the commands the stage
   enqueued before it; timed from its start, their work would count as
   transfer (it counts as compute already). So the stage waits for them
   before the link's clock starts, as the copy would have anyway. */
static mpar_result mpar__link_settle(mpar__worker* w, const mpar__link* l) {
    return w->ex.profiling && !l->t->overlaps ? mpar__exec_sync(&w->ex) : MPAR_SUCCESS;
}

/* The shared ring: room for a send, then the slot is published. */
static mpar_result mpar__link_send(mpar__worker* w, mpar__link* l, mpar_buf src, size_t floats, int mb) {
    mpar_result r = MPAR_SUCCESS;
    double t0;
    int slot;
    double t_copy;
    MPAR__TRY(mpar__link_settle(w, l));
    t0 = mpar__now();
    if (!l->t->ring) return l->t->send(w, l, -1, src, floats, mb);
    pthread_mutex_lock(&l->mu);
    while (r == MPAR_SUCCESS && l->count == l->capacity) r = mpar__link_wait(l, t0);
    slot = (l->head + l->count) % l->capacity;
    pthread_mutex_unlock(&l->mu);
    t_copy = mpar__now();
    if (r == MPAR_ERROR_TIMEOUT)
        return mpar__fail(w->p->ctx, r, "link send of micro-batch %d waited over %g s for room", mb, l->timeout);
    if (r != MPAR_SUCCESS) return r;
    if (mpar__exec_fault(&w->ex, MPAR__FAULT_TRANSFER))
        return mpar__fail(w->p->ctx, (mpar_result)CL_OUT_OF_RESOURCES, "%s link send of micro-batch %d: injected "
                          "transfer fault", l->t->name, mb);
    w->wait_s += t_copy - t0;
    MPAR__TRY(l->t->send(w, l, slot, src, floats, mb));
    mpar__record_link(w, l, 1, mb, t0, t_copy, mpar__now(), floats);
    pthread_mutex_lock(&l->mu);
    l->tags[slot] = mb;
    l->count++;
    pthread_cond_broadcast(&l->cv);
    pthread_mutex_unlock(&l->mu);
    return MPAR_SUCCESS;
}

static mpar_result mpar__link_recv(mpar__worker* w, mpar__link* l, mpar_buf dst, size_t floats, int mb) {
    mpar_result r = MPAR_SUCCESS;
    double t0;
    int slot, tag;
    double t_copy;
    MPAR__TRY(mpar__link_settle(w, l));
    t0 = mpar__now();
    if (!l->t->ring) return l->t->recv(w, l, -1, dst, floats, mb);
    pthread_mutex_lock(&l->mu);
    while (r == MPAR_SUCCESS && l->count == 0) r = mpar__link_wait(l, t0);
    slot = l->head;
    tag = l->tags[slot];
    pthread_mutex_unlock(&l->mu);
    t_copy = mpar__now();
    if (r == MPAR_ERROR_TIMEOUT)
        return mpar__fail(w->p->ctx, r, "link receive of micro-batch %d waited over %g s", mb, l->timeout);
    if (r != MPAR_SUCCESS) return r;
    if (tag != mb)
        return mpar__fail(w->p->ctx, MPAR_ERROR_INVALID_SCHEDULE,
                          "link delivered micro-batch %d where the schedule expects %d", tag, mb);
    if (mpar__exec_fault(&w->ex, MPAR__FAULT_TRANSFER))
        return mpar__fail(w->p->ctx, (mpar_result)CL_OUT_OF_RESOURCES, "%s link receive of micro-batch %d: injected "
                          "transfer fault", l->t->name, mb);
    w->wait_s += t_copy - t0;
    MPAR__TRY(l->t->recv(w, l, slot, dst, floats, mb));
    mpar__record_link(w, l, 0, mb, t0, t_copy, mpar__now(), floats);
    pthread_mutex_lock(&l->mu);
    l->head = (l->head + 1) % l->capacity;
    l->count--;
    pthread_cond_broadcast(&l->cv);
    pthread_mutex_unlock(&l->mu);
    return MPAR_SUCCESS;
}

/* value 1: wake and fail every waiter; 0: a new job starts (every queue
   has finished), empty rings. */
static void mpar__links_abort(mpar_pipeline* p, int value) {
    int i;
    for (i = 0; i < 2 * (p->vs_count - 1); i++) {
        mpar__link* l = &p->links[i];
        pthread_mutex_lock(&l->mu);
        l->aborted = value;
        if (!value) {
            l->head = l->count = 0;
            if (l->t) l->t->abort(l);
        }
        pthread_cond_broadcast(&l->cv);
        pthread_mutex_unlock(&l->mu);
    }
}

/* --------------------------------------------------------------------------
   8. Executor: actions
   -------------------------------------------------------------------------- */

static int mpar__mb_samples(const mpar_pipeline* p, int mb) { return p->mb_first[mb + 1] - p->mb_first[mb]; }

/* Where region k of a slot lies (the input of layer first+k; k = n: the
   output): block b = block_of[k], and within its part of the slot, the
   inputs of the block's layers (and, in the last block, the output), then
   their stashes. One block is the layout of one buffer per slot. With
   recompute only region 0 lives in the slot (alone); the rest lives in the
   work buffers, laid out as a slot. With bf16 activations (act16) the
   layers also use the work buffers; a slot's block holds the block's
   activations packed (ceil(rows_max x width / 2) floats), then its stashes
   as floats (mpar__pack_slot). */
static size_t mpar__out_width(const mpar__vstage* v) { return v->act_cum[v->n + 1] - v->act_cum[v->n]; }
static size_t mpar__act_end(const mpar__vstage* v, int b) {
    return b == v->blocks - 1 ? (size_t)v->n + 1 : (size_t)v->block_first[b + 1];
}
static mpar_buf mpar__act(const mpar_pipeline* p, const mpar__vstage* v, int slot, int k) {
    mpar_buf b;
    int blk = v->block_of[k];
    if (v->recompute && k == 0) {
        b.mem = v->act_slots[slot], b.off = 0;
        return b;
    }
    b.mem = v->recompute || v->act16 ? v->work[blk] : v->act_slots[slot * v->blocks + blk];
    b.off = (size_t)p->mb_rows_max * (v->act_cum[k] - v->act_cum[v->block_first[blk]]);
    return b;
}
static mpar_buf mpar__stash(const mpar_pipeline* p, const mpar__vstage* v, int slot, int k) {
    mpar_buf b;
    int blk = v->block_of[k], f = v->block_first[blk];
    b.mem = v->recompute || v->act16 ? v->work[blk] : v->act_slots[slot * v->blocks + blk];
    b.off = (size_t)p->mb_rows_max * (v->act_cum[mpar__act_end(v, blk)] - v->act_cum[f] + v->stash_cum[k] -
                                      v->stash_cum[f]);
    return b;
}
static mpar_buf mpar__grad(const mpar_pipeline* p, const mpar__vstage* v, int slot, int k) {
    mpar_buf b;
    int blk = v->block_of[k];
    b.mem = v->grad_slots[(v->grad_slot_count > 1 ? slot : 0) * v->blocks + blk];
    b.off = (size_t)p->mb_rows_max * (v->act_cum[k] - v->act_cum[v->block_first[blk]]);
    return b;
}
static mpar_buf mpar__gstash(const mpar_pipeline* p, const mpar__vstage* v, int slot, int k) {
    mpar_buf b;
    int blk = v->block_of[k], f = v->block_first[blk];
    b.mem = v->grad_slots[(v->grad_slot_count > 1 ? slot : 0) * v->blocks + blk];
    b.off = (size_t)p->mb_rows_max * (v->act_cum[mpar__act_end(v, blk)] - v->act_cum[f] + v->gstash_cum[k] -
                                      v->gstash_cum[f]);
    return b;
}
/* Layer k's parameters (or gradients, moments) in its block's buffer. */
static mpar_buf mpar__state(const mpar__vstage* v, cl_mem* mems, int k) {
    mpar_buf b;
    int blk = v->block_of[k];
    b.mem = mems[blk], b.off = v->param_off[k] - v->param_off[v->block_first[blk]];
    return b;
}

/* Target values per row a chunk's buffer holds: the loss layer's width
   for float targets, else one int32 (every chunk has the buffer; only the
   last one's is used). */
static size_t mpar__target_width(const mpar_model* m, const mpar__vstage* v) {
    const mpar_layer* last = mpar_model_layer(m, mpar_model_layer_count(m) - 1);
    if (v->last != last->index || !(last->type->flags & MPAR_LAYER_FLOAT_TARGETS)) return 1;
    return (size_t)last->in_features;
}

/* The batch's targets the model's loss layer takes (int32 classes or
   floats), or NULL. */
static const void* mpar__batch_targets(const mpar_model* m, const mpar_batch* b) {
    const mpar_layer* last = mpar_model_layer(m, mpar_model_layer_count(m) - 1);
    if (!b || !(last->type->flags & MPAR_LAYER_LOSS)) return NULL;
    return (last->type->flags & MPAR_LAYER_FLOAT_TARGETS) ? (const void*)b->float_targets : (const void*)b->targets;
}

static void mpar__io(const mpar_pipeline* p, const mpar__vstage* v, int slot, int mb, int k, mpar_io* io) {
    const mpar_layer* l = mpar_model_layer(p->model, v->first + k);
    memset(io, 0, sizeof *io);
    io->rows = mpar__mb_samples(p, mb) * p->seq_len;
    io->row_offset = p->mb_first[mb] * p->seq_len;
    io->x = mpar__act(p, v, slot, k);
    io->y = mpar__act(p, v, slot, k + 1);
    io->dx = mpar__grad(p, v, slot, k);
    io->dy = mpar__grad(p, v, slot, k + 1);
    io->need_dx = v->first + k > 0;
    io->params = mpar__state(v, v->params, k);
    if (v->grads) io->grads = mpar__state(v, v->grads, k);
    io->stash = mpar__stash(p, v, slot, k);
    io->gstash = mpar__gstash(p, v, slot, k);
    io->scratch.mem = v->scratch;
    io->targets.mem = v->targets, io->targets.off = (size_t)slot * (size_t)p->mb_rows_max * v->target_width;
    io->loss_scale = p->loss_scale;
    io->seed = p->step_seed ^ (0x9E3779B97F4A7C15ULL * (uint64_t)(l->index + 1));
    io->training = p->job != MPAR__JOB_INFER;
}

/* A linear layer followed by relu (1), gelu (2) or tanh (3): the pair's
   forward runs as the GEMM and one fused bias-and-activation launch, with
   the arithmetic of the two layers' own kernels (so a cut between them
   changes no bit), one launch fewer. 0: no fusion. */
static int mpar__fused_activation(const mpar_layer* l, const mpar_layer* next) {
    if (l->type != mpar_layer_linear()) return 0;
    return next->type == mpar_layer_relu() ? 1 : next->type == mpar_layer_gelu() ? 2
         : next->type == mpar_layer_tanh() ? 3 : 0;
}

/* bf16 activations: each layer's output is rounded as it is made (so a
   chunk boundary, where the fused linear + activation cannot fuse, gives
   the bits of one device: fusion is off), loss values excepted. */
static mpar_result mpar__layers_forward(mpar__worker* w, mpar__vstage* v, int slot, int mb) {
    mpar_pipeline* p = w->p;
    int k, round16 = p->desc.activation_type == MPAR_ACTIVATIONS_BF16;
    size_t rows = (size_t)mpar__mb_samples(p, mb) * (size_t)p->seq_len;
    for (k = 0; k < v->n; k++) {
        const mpar_layer* l = mpar_model_layer(p->model, v->first + k);
        int act = k + 1 < v->n && !round16 ? mpar__fused_activation(l, mpar_model_layer(p->model, v->first + k + 1)) : 0;
        mpar_io io;
        mpar_result r;
        if (p->job == MPAR__JOB_INFER && (l->type->flags & MPAR_LAYER_LOSS) && !mpar__batch_targets(p->model, p->batch))
            break;
        mpar__io(p, v, slot, mb, k, &io);
        if (act) {
            r = mpar__linear_forward_act(&w->ex, l, &io, mpar__act(p, v, slot, k + 2), act);
            k++;
        } else {
            r = l->type->forward(&w->ex, l, &io);
        }
        if (r == MPAR_SUCCESS && round16 && !(l->type->flags & MPAR_LAYER_LOSS)) {
            size_t n = rows * (v->act_cum[k + 2] - v->act_cum[k + 1]);
            if (n) r = mpar_exec_launch(&w->ex, "elementwise.cl", "mpar_round_bf16", n, 0, "Bl", mpar__act(p, v, slot, k + 1), n);
        }
        if (r != MPAR_SUCCESS) return r;
    }
    return MPAR_SUCCESS;
}

/* bf16 activations: the work buffers into a slot (packed activations, then
   the stashes as they are), or back (unpack). The first chunk's input is
   the batch's, which may be token ids: unpacking uploads it again from the
   batch, which the caller keeps until the job returns. */
static mpar_result mpar__upload_batch(mpar__worker* w, cl_mem mem, size_t off_elems, const void* src, size_t elems);
static size_t mpar__block_act_row(const mpar__vstage* v, int b);
static size_t mpar__block_acts_row(const mpar__vstage* v, int b);
static mpar_result mpar__pack_slot(mpar__worker* w, mpar__vstage* v, int slot, int mb, int unpack) {
    mpar_pipeline* p = w->p;
    size_t rows = (size_t)p->mb_rows_max;
    int b;
    for (b = 0; b < v->blocks; b++) {
        size_t acts = rows * mpar__block_acts_row(v, b), stash = rows * mpar__block_act_row(v, b) - acts;
        mpar_buf work, packed;
        work.mem = v->work[b], work.off = 0;
        packed.mem = v->act_slots[slot * v->blocks + b], packed.off = 0;
        if (acts)
            MPAR__TRY(mpar_exec_launch(&w->ex, "elementwise.cl", unpack ? "mpar_unpack_bf16" : "mpar_pack_bf16", acts, 0,
                                       "BBl", unpack ? packed : work, unpack ? work : packed, acts));
        work.off = acts, packed.off = mpar__bf16_floats(acts);
        if (stash)
            MPAR__TRY(mpar_exec_launch(&w->ex, "elementwise.cl", "mpar_copy", stash, 0, "BBl", unpack ? packed : work,
                                       unpack ? work : packed, stash));
    }
    if (unpack && v->index == 0) {
        const mpar_layer* first = mpar_model_layer(p->model, v->first);
        size_t n = (size_t)mpar__mb_samples(p, mb) * (size_t)p->seq_len, row0 = (size_t)p->mb_first[mb] * (size_t)p->seq_len;
        mpar_buf in = mpar__act(p, v, slot, 0);
        MPAR__TRY(mpar__upload_batch(w, in.mem, in.off, (const float*)p->batch->inputs + row0 * (size_t)first->in_features,
                                     n * (size_t)first->in_features));
    }
    return MPAR_SUCCESS;
}

static mpar_buf mpar__buf0(cl_mem m) {
    mpar_buf b;
    b.mem = m, b.off = 0;
    return b;
}

static mpar_result mpar__upload_to(mpar__worker* w, cl_mem mem, size_t off_elems, const void* src, size_t elems,
                                   int later) {
    mpar_buf b;
    if (mpar__exec_fault(&w->ex, MPAR__FAULT_TRANSFER))
        return mpar__fail(w->p->ctx, (mpar_result)CL_OUT_OF_RESOURCES, "clEnqueueWriteBuffer: injected transfer fault");
    b.mem = mem, b.off = off_elems;
    return mpar__exec_copy(&w->ex, b, (void*)(uintptr_t)src, elems * 4, 1, later);
}
/* Blocking: `src` may be freed right after. */
static mpar_result mpar__upload(mpar__worker* w, cl_mem mem, size_t off_elems, const void* src, size_t elems) {
    return mpar__upload_to(w, mem, off_elems, src, elems, 0);
}
/* From the batch, which the caller keeps until the job returns: the
   worker goes on while the device copies. */
static mpar_result mpar__upload_batch(mpar__worker* w, cl_mem mem, size_t off_elems, const void* src, size_t elems) {
    return mpar__upload_to(w, mem, off_elems, src, elems, 1);
}

static int mpar__slot_of(const mpar__vstage* v, int mb) {
    int s;
    for (s = 0; s < v->slot_count; s++)
        if (v->slot_mb[s] == mb) return s;
    return -1;
}

/* PoCL (3.1, CPU devices) can abort with "pocl_release_dlhandle_cache:
   Assertion found->ref_count > 0" when two threads load the same kernel
   variant for the first time at once. Steps that run a shape for the first
   time therefore execute their kernels one stage at a time on PoCL devices,
   under the context's first-run lock (decided per device at mpar_create;
   other devices and other contexts are not held up); later steps of those
   shapes run in parallel. force_serial (profiling single layers) holds the
   lock on every device. */
static void mpar__serial_begin(mpar__worker* w) {
    mpar_pipeline* p = w->p;
    w->serial_held = p->serial && (p->force_serial || p->ctx->devices[w->device].pocl);
    if (w->serial_held) pthread_mutex_lock(&p->ctx->first_run_lock);
    /* A slowed device (stretched below), a pipeline profiling single layers
       and a host-route stage that records a timeline time the whole
       section, its dispatch on the host included: what a layer costs inside
       a stage is what the planner must add up, and on the host route the
       section's wall time is the stage's work (a one-device run pays it
       too, so counting it idle would overstate the bubble). */
    if (p->ctx->devices[w->device].info.slowdown > 1.0 || p->force_serial || (w->ex.profiling && w->ex.host_route)) {
        clFinish(w->ex.queue);
        w->slow_t0 = mpar__now();
    }
}
static mpar_result mpar__serial_end(mpar__worker* w, mpar_result r) {
    if (w->slow_t0 > 0.0) { /* mpar_desc.slow_devices: stretch the section; profiling: time all of it */
        double now;
        if (r == MPAR_SUCCESS) r = mpar__cl_check(w->p->ctx, clFinish(w->ex.queue), "clFinish", __FILE__, __LINE__);
        mpar__slow_sleep(w->p->ctx->devices[w->device].info.slowdown, mpar__now() - w->slow_t0);
        now = mpar__now();
        if (w->ex.profiling) { /* the timeline's interval covers the sleep */
            if (w->ex.host_end == 0.0 || w->slow_t0 < w->ex.host_start) w->ex.host_start = w->slow_t0;
            w->ex.host_end = now;
        }
        w->slow_t0 = 0.0;
    }
    if (!w->serial_held) return r;
    if (r == MPAR_SUCCESS) r = mpar__cl_check(w->p->ctx, clFinish(w->ex.queue), "clFinish", __FILE__, __LINE__);
    w->serial_held = 0;
    pthread_mutex_unlock(&w->p->ctx->first_run_lock);
    return r;
}

static void mpar__release_slot(mpar__worker* w, mpar__vstage* v, int slot) {
    v->slot_mb[slot] = -1;
    w->in_flight--;
}

/* The last stage reads back the micro-batch's summed loss and, when
   inferring, the loss layer's input (the model's outputs). */
static mpar_result mpar__last_stage_outputs(mpar__worker* w, mpar__vstage* v, int slot, int mb, int rows,
                                            size_t row0) {
    mpar_pipeline* p = w->p;
    const mpar_layer* last = mpar_model_layer(p->model, v->last);
    mpar_buf sum;
    if (p->job == MPAR__JOB_INFER && p->infer_out) {
        int k = (last->type->flags & MPAR_LAYER_LOSS) ? v->n - 1 : v->n;
        size_t width = v->act_cum[k + 1] - v->act_cum[k];
        MPAR__TRY(mpar__exec_copy(&w->ex, mpar__act(p, v, slot, k), p->infer_out + row0 * width,
                                  (size_t)rows * width * 4, 0, 1)); /* read when the job has drained */
    }
    if (!mpar__batch_targets(p->model, p->batch) || !(last->type->flags & MPAR_LAYER_LOSS)) return MPAR_SUCCESS;
    sum.mem = v->losses, sum.off = 0;
    MPAR__TRY(mpar_exec_launch(&w->ex, "loss.cl", "mpar_loss_sum", 1, 0, "BlB", mpar__act(p, v, slot, v->n),
                               (size_t)rows, sum));
    MPAR__TRY(mpar__exec_copy(&w->ex, sum, &p->mb_loss[mb], sizeof(float), 0, 1)); /* read when the job has drained */
    return MPAR_SUCCESS;
}

static mpar_result mpar__do_forward(mpar__worker* w, mpar__vstage* v, int mb) {
    mpar_pipeline* p = w->p;
    int slot = mpar__slot_of(v, -1), rows = mpar__mb_samples(p, mb) * p->seq_len;
    size_t row0 = (size_t)p->mb_first[mb] * (size_t)p->seq_len;
    const mpar_layer* first = mpar_model_layer(p->model, v->first);
    mpar_result r;
    if (slot < 0)
        return mpar__fail(p->ctx, MPAR_ERROR_INVALID_SCHEDULE, "no free activation slot for micro-batch %d (%d held)",
                          mb, v->slot_count);
    v->slot_mb[slot] = mb;
    if (++w->in_flight > w->peak_in_flight) w->peak_in_flight = w->in_flight;
    MPAR__TRY(mpar__out_guard_all(w, v->act_slots + (v->recompute ? slot : slot * v->blocks), v->recompute ? 1 : v->blocks));
    MPAR__TRY(mpar__out_guard_all(w, v->work, v->blocks));
    if (v->index == 0)
        MPAR__TRY(mpar__upload_batch(w, mpar__act(p, v, slot, 0).mem, 0, (const float*)p->batch->inputs + row0 * (size_t)first->in_features,
                                     (size_t)rows * (size_t)first->in_features));
    else if (v->link16_in)
        MPAR__TRY(mpar__link_recv(w, v->fwd_in, mpar__buf0(v->in16), mpar__bf16_floats((size_t)rows * v->act_cum[1]), mb));
    else
        MPAR__TRY(mpar__link_recv(w, v->fwd_in, mpar__act(p, v, slot, 0), (size_t)rows * v->act_cum[1], mb));
    if (v->index == p->vs_count - 1 && mpar__batch_targets(p->model, p->batch)) {
        size_t tw = v->target_width;
        const char* t = (const char*)mpar__batch_targets(p->model, p->batch);
        MPAR__TRY(mpar__upload_batch(w, v->targets, (size_t)slot * (size_t)p->mb_rows_max * tw, t + row0 * tw * 4,
                                     (size_t)rows * tw));
    }
    if (v->link16_out) MPAR__TRY(mpar__out_guard(w, v->out16)); /* the last send from it has been read */
    mpar__serial_begin(w);
    r = MPAR_SUCCESS;
    if (v->link16_in) {
        size_t n = (size_t)rows * v->act_cum[1];
        r = mpar_exec_launch(&w->ex, "elementwise.cl", "mpar_unpack_bf16", n, 0, "BBl", mpar__buf0(v->in16),
                             mpar__act(p, v, slot, 0), n);
    }
    if (r == MPAR_SUCCESS) r = mpar__layers_forward(w, v, slot, mb);
    if (r == MPAR_SUCCESS && v->index == p->vs_count - 1) r = mpar__last_stage_outputs(w, v, slot, mb, rows, row0);
    if (r == MPAR_SUCCESS && v->act16 && p->job != MPAR__JOB_INFER) r = mpar__pack_slot(w, v, slot, mb, 0);
    if (r == MPAR_SUCCESS && v->link16_out) {
        size_t n = (size_t)rows * mpar__out_width(v);
        r = mpar_exec_launch(&w->ex, "elementwise.cl", "mpar_pack_bf16", n, 0, "BBl", mpar__act(p, v, slot, v->n),
                             mpar__buf0(v->out16), n);
    }
    MPAR__TRY(mpar__serial_end(w, r));
    mpar__record_compute(w, MPAR_EVENT_FORWARD, mb, v->chunk);
    if (v->index < p->vs_count - 1) {
        size_t width = mpar__out_width(v);
        if (v->link16_out)
            MPAR__TRY(mpar__link_send(w, v->fwd_out, mpar__buf0(v->out16), mpar__bf16_floats((size_t)rows * width), mb));
        else
            MPAR__TRY(mpar__link_send(w, v->fwd_out, mpar__act(p, v, slot, v->n), (size_t)rows * width, mb));
    }
    /* no clFinish: the in-order queue orders whatever comes next, links and
       uploads synchronise themselves */
    if (p->job == MPAR__JOB_INFER) mpar__release_slot(w, v, slot);
    return MPAR_SUCCESS;
}

static mpar_result mpar__do_backward_input(mpar__worker* w, mpar__vstage* v, int mb, mpar_event_kind kind) {
    mpar_pipeline* p = w->p;
    int slot = mpar__slot_of(v, mb), k, rows = mpar__mb_samples(p, mb) * p->seq_len;
    mpar_result r;
    if (slot < 0)
        return mpar__fail(p->ctx, MPAR_ERROR_INVALID_SCHEDULE, "backward of micro-batch %d before its forward", mb);
    MPAR__TRY(mpar__out_guard(w, mpar__grad(p, v, slot, 0).mem));
    MPAR__TRY(mpar__out_guard_all(w, v->work, v->blocks));
    if (v->index < p->vs_count - 1) {
        size_t width = v->act_cum[v->n + 1] - v->act_cum[v->n];
        MPAR__TRY(mpar__link_recv(w, v->bwd_in, mpar__grad(p, v, slot, v->n), (size_t)rows * width, mb));
    }
    mpar__serial_begin(w);
    r = v->recompute ? mpar__layers_forward(w, v, slot, mb) : v->act16 ? mpar__pack_slot(w, v, slot, mb, 1) : MPAR_SUCCESS;
    for (k = v->n - 1; r == MPAR_SUCCESS && k >= 0; k--) {
        const mpar_layer* l = mpar_model_layer(p->model, v->first + k);
        mpar_io io;
        mpar__io(p, v, slot, mb, k, &io);
        r = l->type->backward_input(&w->ex, l, &io);
    }
    MPAR__TRY(mpar__serial_end(w, r));
    mpar__record_compute(w, kind, mb, v->chunk);
    if (v->index > 0)
        MPAR__TRY(mpar__link_send(w, v->bwd_out, mpar__grad(p, v, slot, 0), (size_t)rows * v->act_cum[1], mb));
    return MPAR_SUCCESS;
}

static mpar_result mpar__do_backward_weight(mpar__worker* w, mpar__vstage* v, int mb, int recomputed,
                                            mpar_event_kind kind) {
    mpar_pipeline* p = w->p;
    int slot = mpar__slot_of(v, mb), k;
    mpar_result r;
    if (slot < 0)
        return mpar__fail(p->ctx, MPAR_ERROR_INVALID_SCHEDULE, "weight gradient of micro-batch %d before its forward",
                          mb);
    MPAR__TRY(mpar__out_guard_all(w, v->work, v->blocks));
    mpar__serial_begin(w);
    r = recomputed ? MPAR_SUCCESS : v->recompute ? mpar__layers_forward(w, v, slot, mb)
      : v->act16 ? mpar__pack_slot(w, v, slot, mb, 1) : MPAR_SUCCESS; /* work holds another micro-batch by now */
    for (k = 0; r == MPAR_SUCCESS && k < v->n; k++) {
        const mpar_layer* l = mpar_model_layer(p->model, v->first + k);
        mpar_io io;
        if (!l->type->backward_weight || l->param_count == 0) continue;
        mpar__io(p, v, slot, mb, k, &io);
        r = l->type->backward_weight(&w->ex, l, &io);
    }
    MPAR__TRY(mpar__serial_end(w, r));
    mpar__record_compute(w, kind, mb, v->chunk);
    mpar__release_slot(w, v, slot); /* reused only by later commands of this queue */
    return MPAR_SUCCESS;
}

static mpar__vstage* mpar__vstage_of(const mpar_pipeline* p, int worker, int chunk) {
    return &p->vs[mpar_schedule_virtual_stage(p->schedule, worker, chunk)];
}

static mpar_result mpar__zero(mpar__worker* w, cl_mem mem, size_t n) {
    if (n == 0) return MPAR_SUCCESS;
    return mpar_exec_launch(&w->ex, "elementwise.cl", "mpar_fill", n, 0, "Blf", mpar__buf0(mem), n, 0.0);
}

static mpar_result mpar__layer_norms(mpar__worker* w, mpar__vstage* v) {
    mpar_pipeline* p = w->p;
    float* norms;
    int k, b;
    mpar_result r;
    /* two launches per block for all its layers, however many */
    for (b = 0; b < v->blocks; b++) {
        mpar_buf table = mpar__buf0(v->norm_tables[b]), part, out;
        int nb = v->block_first[b + 1] - v->block_first[b];
        part.mem = v->partial, part.off = v->part_first[b];
        out.mem = v->norms, out.off = (size_t)v->block_first[b];
        if (v->part_first[b + 1] > v->part_first[b])
            MPAR__TRY(mpar_exec_launch(&w->ex, "optimizer.cl", "mpar_sumsq_layers_partial",
                                       v->part_first[b + 1] - v->part_first[b], 0, "BBiB", mpar__buf0(v->grads[b]),
                                       table, nb, part));
        MPAR__TRY(mpar_exec_launch(&w->ex, "optimizer.cl", "mpar_sumsq_layers_final", (size_t)nb, 0, "BBiB", part, table,
                                   nb, out));
    }
    norms = (float*)mpar__alloc(p->ctx, sizeof(float) * (size_t)v->n);
    if (!norms) return mpar__fail(p->ctx, MPAR_ERROR_OUT_OF_HOST_MEMORY, "out of host memory");
    r = mpar__exec_transfer(&w->ex, mpar__buf0(v->norms), norms, sizeof(float) * (size_t)v->n, 0);
    for (k = 0; r == MPAR_SUCCESS && k < v->n; k++) p->layer_sumsq[v->first + k] = (double)norms[k];
    mpar__free(p->ctx, norms);
    return r;
}

/* Floats of layer state in block b. */
static size_t mpar__block_params(const mpar__vstage* v, int b) {
    return v->param_off[v->block_first[b + 1]] - v->param_off[v->block_first[b]];
}

/* Bounds how far the worker runs ahead of its device: a marker after each
   action; with max_run_ahead of them outstanding, the oldest is waited for. */
static mpar_result mpar__run_ahead(mpar__worker* w) {
    int limit = w->p->desc.max_run_ahead;
    cl_event ev;
    cl_int st;
    if (w->ex.host_route && !w->ex.cl_pending) return MPAR_SUCCESS; /* nothing runs ahead */
    if (w->ahead_count == limit) {
        st = clWaitForEvents(1, &w->ahead[0]);
        clReleaseEvent(w->ahead[0]);
        memmove(w->ahead, w->ahead + 1, sizeof w->ahead[0] * (size_t)(w->ahead_count - 1));
        w->ahead_count--;
        MPAR__CL(w->p->ctx, st);
    }
    MPAR__CL(w->p->ctx, clEnqueueMarkerWithWaitList(w->ex.queue, 0, NULL, &ev));
    w->ahead[w->ahead_count++] = ev;
    return MPAR_SUCCESS;
}

/* After a job, failed or not: everything the worker enqueued has finished
   and nothing it tracked is kept. */
static mpar_result mpar__worker_drain(mpar__worker* w) {
    cl_int st = clFinish(w->ex.queue), st2 = w->copy_queue ? clFinish(w->copy_queue) : CL_SUCCESS;
    int i;
    for (i = 0; i < w->out_count; i++)
        if (w->outs[i].ev) clReleaseEvent(w->outs[i].ev);
    for (i = 0; i < w->ahead_count; i++) clReleaseEvent(w->ahead[i]);
    w->out_count = w->ahead_count = 0;
    w->ex.cl_pending = 0;
    MPAR__CL(w->p->ctx, st);
    MPAR__CL(w->p->ctx, st2);
    return MPAR_SUCCESS;
}

static mpar_result mpar__run_action1(mpar__worker* w, const mpar_action* a);
static mpar_result mpar__run_action(mpar__worker* w, const mpar_action* a) {
    MPAR__TRY(mpar__run_action1(w, a));
    return mpar__run_ahead(w);
}
static mpar_result mpar__run_action1(mpar__worker* w, const mpar_action* a) {
    mpar__vstage* v = mpar__vstage_of(w->p, w->index, a->chunk);
    switch (a->kind) {
        case MPAR_ACTION_FORWARD: return mpar__do_forward(w, v, a->microbatch);
        case MPAR_ACTION_BACKWARD:
            MPAR__TRY(mpar__do_backward_input(w, v, a->microbatch, MPAR_EVENT_BACKWARD));
            return mpar__do_backward_weight(w, v, a->microbatch, 1, MPAR_EVENT_BACKWARD);
        case MPAR_ACTION_BACKWARD_INPUT:
            return mpar__do_backward_input(w, v, a->microbatch, MPAR_EVENT_BACKWARD_INPUT);
        case MPAR_ACTION_BACKWARD_WEIGHT:
            return mpar__do_backward_weight(w, v, a->microbatch, 0, MPAR_EVENT_BACKWARD_WEIGHT);
        default: return MPAR_SUCCESS;
    }
}

/* A job starts with every activation slot of the worker free and no
   timeline yet. */
static void mpar__job_start(mpar__worker* w) {
    int c, s;
    for (c = 0; c < w->p->desc.virtual_stages; c++) {
        mpar__vstage* v = mpar__vstage_of(w->p, w->index, c);
        for (s = 0; s < v->slot_count; s++) v->slot_mb[s] = -1;
    }
    w->in_flight = 0;
    w->event_count = 0;
    while (w->pending_count > 0) mpar__interval_release(&w->pending[--w->pending_count].iv); /* none: resolved */
    w->ex.launches = w->ex.cl_launches = 0;
    w->busy_s = w->wait_s = 0.0;
}

/* The first half of the optimizer step: this stage's squared gradient
   norms per layer, into p->layer_sumsq (its own layers only). */
static mpar_result mpar__stage_norms(mpar__worker* w) {
    mpar_pipeline* p = w->p;
    mpar_result r = MPAR_SUCCESS;
    int c;
    mpar__serial_begin(w);
    for (c = 0; r == MPAR_SUCCESS && c < p->schedule->virtual_stages; c++)
        r = mpar__layer_norms(w, mpar__vstage_of(p, w->index, c));
    MPAR__TRY(mpar__serial_end(w, r));
    mpar__record_compute(w, MPAR_EVENT_OPTIMIZER_STEP, -1, 0); /* gradient norms: the step's first half */
    return MPAR_SUCCESS;
}

static mpar_result mpar__job_step(mpar__worker* w);
static void mpar__step_decide(mpar_pipeline* p);

/* The optimizer step as an action (training jobs in one process): the
   stage posts its norms, once the last one is in the step is decided
   (NaN check, clipping: mpar__step_decide, from every layer's norm in
   layer order, so every partition decides alike), and each stage steps as
   soon as it knows. A stage never steps on another's unfinished gradients:
   the decision needs all of them. */
static mpar_result mpar__opt_action(mpar__worker* w) {
    mpar_pipeline* p = w->p;
    struct timespec until;
    double limit = mpar__now() + p->desc.timeout_seconds;
    int go;
    MPAR__TRY(mpar__stage_norms(w));
    MPAR__TRY(mpar__worker_drain(w)); /* the last stage's losses are read */
    pthread_mutex_lock(&p->mu);
    if (++p->opt_posted == p->local_workers) {
        mpar__step_decide(p);
        pthread_cond_broadcast(&p->opt_cv);
    }
    while (!p->opt_decided && p->first_failure < 0 && mpar__now() < limit) {
        double at;
        clock_gettime(CLOCK_REALTIME, &until); /* wake every 50 ms to look at the clock */
        at = (double)until.tv_nsec + 50e6;
        until.tv_sec += (time_t)(at / 1e9);
        until.tv_nsec = (long)fmod(at, 1e9);
        pthread_cond_timedwait(&p->opt_cv, &p->mu, &until);
    }
    go = p->opt_decided && p->opt_go && p->first_failure < 0;
    if (!p->opt_decided) {
        pthread_mutex_unlock(&p->mu);
        return p->first_failure >= 0
                   ? mpar__fail(p->ctx, MPAR_ERROR_ABORTED, "another stage failed before the optimizer step")
                   : mpar__fail(p->ctx, MPAR_ERROR_TIMEOUT, "waited %.0f s for the other stages' gradients",
                                p->desc.timeout_seconds);
    }
    if (go) p->opt_stepped++; /* from here this stage's parameters change */
    pthread_mutex_unlock(&p->mu);
    if (!go) return MPAR_SUCCESS; /* non-finite: nobody steps; the caller reports it */
    mpar__serial_begin(w);
    return mpar__serial_end(w, mpar__job_step(w));
}

/* Walks this worker's list of `sc`: gradients (optimizer step left out),
   training (with it) or inference (a forward-only schedule). */
static mpar_result mpar__job_walk(mpar__worker* w, const mpar_schedule* sc, int with_step, const char** failed_action,
                                  char* name, size_t name_size) {
    mpar_pipeline* p = w->p;
    int i, c, n = mpar_schedule_action_count(sc, w->index);
    mpar_result r = MPAR_SUCCESS;
    mpar__job_start(w);
    if (!sc->forward_only) {
        mpar__serial_begin(w);
        for (c = 0; r == MPAR_SUCCESS && c < sc->virtual_stages; c++) {
            mpar__vstage* v = mpar__vstage_of(p, w->index, c);
            int b;
            for (b = 0; r == MPAR_SUCCESS && b < v->blocks; b++) r = mpar__zero(w, v->grads[b], mpar__block_params(v, b));
        }
        MPAR__TRY(mpar__serial_end(w, r));
    }
    if (w->ex.profiling) {
        mpar__interval iv;
        mpar__exec_take(&w->ex, &iv); /* zeroing, or set-up before the first job, belongs to no action */
        mpar__interval_release(&iv);
    }
    for (i = 0; i < n; i++) {
        const mpar_action* a = mpar_schedule_action(sc, w->index, i);
        int opt = a->kind == MPAR_ACTION_OPTIMIZER_STEP;
        if (opt && !with_step) {
            r = mpar__stage_norms(w); /* posted to the host, which decides the step */
        } else if (!sc->forward_only && p->desc.inject_fault && p->desc.fault_stage == w->index &&
                   p->desc.fault_action == i) {
            r = mpar__fail(p->ctx, MPAR_ERROR_ABORTED, "fault injected by mpar_pipeline_desc.fault_*");
        } else {
            double t = p->rb ? mpar__now() : 0.0;
            r = opt ? mpar__opt_action(w) : mpar__run_action(w, a);
            if (p->rb && !opt) w->busy_s += mpar__now() - t; /* the step waits for every stage's norms */
        }
        if (r != MPAR_SUCCESS) {
            if (opt) snprintf(name, name_size, "optimizer step");
            else mpar_action_format(a, sc->virtual_stages > 1, name, name_size);
            *failed_action = name;
            return r;
        }
    }
    return MPAR_SUCCESS;
}

static mpar_result mpar__job_step(mpar__worker* w) {
    mpar_pipeline* p = w->p;
    const mpar_optimizer_desc* o = &p->desc.optimizer;
    int c;
    for (c = 0; c < p->desc.virtual_stages; c++) {
        mpar__vstage* v = mpar__vstage_of(p, w->index, c);
        int b;
        for (b = 0; b < v->blocks; b++) {
            size_t n = mpar__block_params(v, b);
            if (n == 0) continue;
            if (o->kind == MPAR_OPTIMIZER_SGD) {
                MPAR__TRY(mpar_exec_launch(&w->ex, "optimizer.cl", "mpar_sgd_step", n, 0, "BBBlffff",
                                           mpar__buf0(v->params[b]), mpar__buf0(v->grads[b]), mpar__buf0(v->opt1[b]), n,
                                           (double)p->step_lr, (double)o->momentum, (double)o->weight_decay,
                                           (double)p->step_scale));
            } else {
                double c1 = 1.0 - pow((double)o->beta1, (double)p->step);
                double c2 = 1.0 - pow((double)o->beta2, (double)p->step);
                MPAR__TRY(mpar_exec_launch(&w->ex, "optimizer.cl", "mpar_adamw_step", n, 0, "BBBBlffffffff",
                                           mpar__buf0(v->params[b]), mpar__buf0(v->grads[b]), mpar__buf0(v->opt1[b]),
                                           mpar__buf0(v->opt2[b]), n, (double)p->step_lr, (double)o->beta1,
                                           (double)o->beta2, (double)o->eps, (double)o->weight_decay, c1, c2,
                                           (double)p->step_scale));
            }
        }
    }
    mpar__record_compute(w, MPAR_EVENT_OPTIMIZER_STEP, -1, 0);
    MPAR__CL(p->ctx, clFinish(w->ex.queue));
    return MPAR_SUCCESS;
}

static mpar_result mpar__gen_worker(mpar__worker* w);
static void* mpar__worker_main(void* arg) {
    mpar__worker* w = (mpar__worker*)arg;
    mpar_pipeline* p = w->p;
    int own_sink = mpar__sink_add(p->ctx, w->detail, sizeof w->detail);
    for (;;) {
        mpar__job job;
        mpar_result r = MPAR_SUCCESS;
        const char* action = NULL;
        char name[32];
        int gen;
        pthread_mutex_lock(&p->mu);
        while (w->generation == p->generation && !p->quit) pthread_cond_wait(&p->start_cv, &p->mu);
        if (p->quit) {
            pthread_mutex_unlock(&p->mu);
            break;
        }
        gen = p->generation;
        job = p->job;
        pthread_mutex_unlock(&p->mu);
        w->error[0] = w->detail[0] = '\0';
        if (job == MPAR__JOB_GRADS || job == MPAR__JOB_TRAIN)
            r = mpar__job_walk(w, p->schedule, job == MPAR__JOB_TRAIN, &action, name, sizeof name);
        else if (job == MPAR__JOB_STEP) {
            mpar__serial_begin(w);
            r = mpar__serial_end(w, mpar__job_step(w));
        }
        else if (job == MPAR__JOB_INFER) r = mpar__job_walk(w, p->infer_schedule, 0, &action, name, sizeof name);
        else if (job == MPAR__JOB_GENERATE) r = mpar__gen_worker(w), action = "generation";
        {
            mpar_result d = mpar__worker_drain(w);
            if (r == MPAR_SUCCESS) r = d;
            mpar__worker_resolve(w);
        }
        if (r != MPAR_SUCCESS) {
            /* The first worker to fail is the cause; the others were woken by
               the abort below and only report that they stopped. */
            int first;
            pthread_mutex_lock(&p->mu);
            first = p->first_failure < 0;
            if (first) p->first_failure = w->index;
            pthread_cond_broadcast(&p->opt_cv); /* stages waiting at the optimizer step stop too */
            pthread_mutex_unlock(&p->mu);
            snprintf(w->error, sizeof w->error, "stage %d (device %d), action %s: %s", w->index, w->device,
                     action ? action : (job == MPAR__JOB_STEP ? "optimizer step" : "start of step"),
                     own_sink ? w->detail : "(no detail: more than 256 worker threads on this context)");
            mpar__links_abort(p, 1);
#ifdef MPAR_USE_MPI
            if (first && p->ranks > 1 && !p->peer_failed) mpar__mpi_abort_peers(p);
#endif
        }
        pthread_mutex_lock(&p->mu);
        w->result = r;
        w->generation = gen;
        p->done_count++;
        pthread_cond_broadcast(&p->done_cv);
        pthread_mutex_unlock(&p->mu);
    }
    if (own_sink) mpar__sink_remove(p->ctx, w->detail);
    return NULL;
}

/* A job whose (kind, micro-batch rows) were not run before by this
   pipeline runs its kernels one stage at a time (see mpar__serial_begin). */
static void mpar__decide_serial(mpar_pipeline* p, mpar__job job) {
    int m, k;
    p->serial = p->force_serial;
    for (m = 0; m < (job == MPAR__JOB_STEP ? 1 : p->mb_count); m++) {
        int key = (int)job << 24 | (job == MPAR__JOB_STEP ? 0 : mpar__mb_samples(p, m));
        for (k = 0; k < p->seen_count && p->seen[k] != key; k++) {}
        if (k < p->seen_count) continue;
        p->serial = 1;
        if (p->seen_count < (int)(sizeof p->seen / sizeof p->seen[0])) p->seen[p->seen_count++] = key;
    }
}

/* ---- what the ranks of a pipeline across processes compare at create ----
   Each rank sends a fixed record: "MPDG", format 1, its create result,
   its rank, and one 64-bit FNV-1a hash per part of the pipeline's
   description (little-endian). The parts are compared one by one, so a
   mismatch names what differs. Device choices are each rank's own and are
   left out. Used only with MPAR_USE_MPI (and by tests/fuzz/fuzz_digest.c). */
#if defined(__GNUC__) || defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunused-function"
#endif
enum { MPAR__DIGEST_PARTS = 7, MPAR__DIGEST_BYTES = 16 + 8 * MPAR__DIGEST_PARTS };
static const char* const mpar__digest_part_name[MPAR__DIGEST_PARTS] = {
    "mpar version", "model (layers, shapes, settings, seed)", "stages (layer ranges, ranks, recompute)",
    "schedule (its actions)", "batch shape (max_batch, micro-batches)", "data types (activation_type, "
    "inference_only)", "optimizer and step settings"};

typedef struct mpar__digest {
    int32_t result, rank;
    uint64_t part[MPAR__DIGEST_PARTS];
} mpar__digest;

static void mpar__digest_encode(const mpar__digest* d, unsigned char* out) {
    int i, k;
    uint32_t head[4];
    head[0] = 0x4744504Du, head[1] = 1u, head[2] = (uint32_t)d->result, head[3] = (uint32_t)d->rank; /* "MPDG" */
    for (k = 0; k < 4; k++)
        for (i = 0; i < 4; i++) out[4 * k + i] = (unsigned char)(head[k] >> (8 * i));
    for (k = 0; k < MPAR__DIGEST_PARTS; k++)
        for (i = 0; i < 8; i++) out[16 + 8 * k + i] = (unsigned char)(d->part[k] >> (8 * i));
}

/* 0, or -1 for a record this mpar cannot read (wrong size, magic, format,
   or a positive result or negative rank, which no mpar sends). */
static int mpar__digest_decode(const unsigned char* in, size_t size, mpar__digest* d) {
    int i, k;
    uint32_t head[4];
    if (!in || size != MPAR__DIGEST_BYTES) return -1;
    for (k = 0; k < 4; k++) {
        head[k] = 0;
        for (i = 0; i < 4; i++) head[k] |= (uint32_t)in[4 * k + i] << (8 * i);
    }
    if (head[0] != 0x4744504Du || head[1] != 1u || (int32_t)head[2] > 0 || (int32_t)head[3] < 0) return -1;
    d->result = (int32_t)head[2], d->rank = (int32_t)head[3];
    for (k = 0; k < MPAR__DIGEST_PARTS; k++) {
        d->part[k] = 0;
        for (i = 0; i < 8; i++) d->part[k] |= (uint64_t)in[16 + 8 * k + i] << (8 * i);
    }
    return 0;
}

/* The first part in which b differs from a, or -1. */
static int mpar__digest_differs(const mpar__digest* a, const mpar__digest* b) {
    int k;
    for (k = 0; k < MPAR__DIGEST_PARTS; k++)
        if (a->part[k] != b->part[k]) return k;
    return -1;
}

static uint64_t mpar__hash_ints(uint64_t h, const int* v, int n) {
    int i;
    for (i = 0; i < n; i++) {
        unsigned char b[4];
        b[0] = (unsigned char)v[i], b[1] = (unsigned char)(v[i] >> 8), b[2] = (unsigned char)(v[i] >> 16);
        b[3] = (unsigned char)((unsigned)v[i] >> 24);
        h = mpar__fnv1a(h, b, 4);
    }
    return h;
}

static uint64_t mpar__hash_floats(uint64_t h, const float* v, int n) {
    int i;
    for (i = 0; i < n; i++) {
        uint32_t u;
        int w;
        memcpy(&u, &v[i], 4);
        w = (int)u;
        h = mpar__hash_ints(h, &w, 1);
    }
    return h;
}

/* The description of a built pipeline (result: its create result). */
static void mpar__pipeline_digest(const mpar_pipeline* p, mpar_result result, int rank, mpar__digest* d) {
    const mpar_model* m = p->model;
    const mpar_optimizer_desc* o = &p->desc.optimizer;
    int i, k, v[12];
    float f[7];
    memset(d, 0, sizeof *d);
    d->result = (int32_t)result, d->rank = rank;
    d->part[0] = mpar__fnv1a(MPAR__FNV_SEED, MPAR_VERSION_STRING, sizeof MPAR_VERSION_STRING);
    if (result != MPAR_SUCCESS) return;
    v[0] = m->desc.input_features, v[1] = m->desc.seq_len, v[2] = (int)(m->desc.seed & 0x7fffffff),
    v[3] = (int)(m->desc.seed >> 31), v[4] = m->count;
    d->part[1] = mpar__hash_ints(MPAR__FNV_SEED, v, 5);
    for (i = 0; i < m->count; i++) {
        const mpar_layer* l = &m->layers[i];
        d->part[1] = mpar__fnv1a(d->part[1], l->type->name, strlen(l->type->name) + 1);
        v[0] = l->desc.units, v[1] = l->desc.vocab, v[2] = l->desc.heads, v[3] = l->desc.hidden;
        v[4] = l->in_features, v[5] = l->out_features, v[6] = l->seq_len, v[7] = (int)(l->param_count & 0x7fffffff);
        f[0] = l->desc.rate, f[1] = l->desc.eps;
        d->part[1] = mpar__hash_floats(mpar__hash_ints(d->part[1], v, 8), f, 2);
    }
    v[0] = p->vs_count, v[1] = p->workers_count, v[2] = p->ranks;
    d->part[2] = mpar__hash_ints(MPAR__FNV_SEED, v, 3);
    for (i = 0; i < p->vs_count; i++) {
        v[0] = p->vs[i].first, v[1] = p->vs[i].last, v[2] = p->vs[i].worker, v[3] = p->vs[i].recompute;
        d->part[2] = mpar__hash_ints(d->part[2], v, 4);
    }
    d->part[2] = mpar__hash_ints(d->part[2], p->stage_rank, p->workers_count);
    v[0] = (int)p->desc.schedule, v[1] = p->schedule->stages, v[2] = p->schedule->microbatches,
    v[3] = p->schedule->virtual_stages, v[4] = p->schedule->split_backward;
    d->part[3] = mpar__hash_ints(MPAR__FNV_SEED, v, 5);
    for (i = 0; i < p->schedule->stages; i++)
        for (k = 0; k < mpar_schedule_action_count(p->schedule, i); k++) {
            const mpar_action* a = mpar_schedule_action(p->schedule, i, k);
            v[0] = (int)a->kind, v[1] = a->microbatch, v[2] = a->chunk;
            d->part[3] = mpar__hash_ints(d->part[3], v, 3);
        }
    v[0] = p->desc.max_batch, v[1] = p->schedule->microbatches, v[2] = p->seq_len, v[3] = p->mb_rows_max;
    d->part[4] = mpar__hash_ints(MPAR__FNV_SEED, v, 4);
    v[0] = (int)p->desc.activation_type, v[1] = p->desc.inference_only;
    for (i = 0; i < p->vs_count && i < 10; i++) v[2 + i] = p->vs[i].act16 | p->vs[i].link16_in << 1 |
                                                           p->vs[i].link16_out << 2;
    d->part[5] = mpar__hash_ints(MPAR__FNV_SEED, v, 2 + (p->vs_count < 10 ? p->vs_count : 10));
    v[0] = (int)o->kind, v[1] = o->warmup_steps, v[2] = o->decay_steps, v[3] = p->desc.skip_nonfinite, v[4] = p->step;
    f[0] = o->lr, f[1] = o->momentum, f[2] = o->beta1, f[3] = o->beta2, f[4] = o->eps, f[5] = o->weight_decay,
    f[6] = o->clip_norm;
    d->part[6] = mpar__hash_floats(mpar__hash_ints(MPAR__FNV_SEED, v, 5), f, 7);
    d->part[6] = mpar__hash_floats(d->part[6], &o->min_lr, 1);
}
#if defined(__GNUC__) || defined(__clang__)
#pragma GCC diagnostic pop
#endif

#ifdef MPAR_USE_MPI
/* Makes a pipeline across processes collective at create: every rank that
   called mpar_pipeline_create, whether its own part was built or not
   (r), duplicates the communicator and sends its record; then every rank
   returns the same: success, MPAR_ERROR_ABORTED naming a rank that failed
   (that rank returns its own error), or MPAR_ERROR_MISMATCH naming the
   part of the description in which a rank differs from rank 0. Waits are
   bounded by timeout_seconds: a rank that never calls create leaves the
   others with MPAR_ERROR_TIMEOUT. */
static mpar_result mpar__mpi_join(mpar_pipeline* p, const mpar_pipeline_desc* desc, mpar_result r) {
    MPI_Comm user = *(const MPI_Comm*)desc->mpi_comm, c;
    MPI_Request req;
    mpar_context* ctx = p->ctx;
    double limit = (desc->timeout_seconds > 0 && desc->timeout_seconds <= 1e7) ? desc->timeout_seconds : 600.0;
    int size = 1, rank = 0, got, j, k, flag = 0, fail_rank = -1, diff_rank = -1, diff_part = -1, fail_code = 0;
    void* ub = NULL;
    mpar__digest mine, theirs, first;
    unsigned char* all;
    if (MPI_Comm_size(user, &size) != MPI_SUCCESS || MPI_Comm_rank(user, &rank) != MPI_SUCCESS || size < 2) return r;
    if (MPI_Comm_idup(user, &c, &req) != MPI_SUCCESS)
        return r != MPAR_SUCCESS ? r : mpar__fail(ctx, MPAR_ERROR_IO, "pipeline create: MPI_Comm_idup failed");
    got = mpar__mpi_poll(&mpar__mpi_polling_default, &req, 1, limit);
    if (got <= 0) /* left to MPI */
        return r != MPAR_SUCCESS ? r : mpar__fail(ctx, got ? MPAR_ERROR_TIMEOUT : MPAR_ERROR_IO,
                                                  "pipeline create on rank %d: not all %d ranks of mpi_comm joined "
                                                  "within %g s (a rank that stopped, or failed before it could join, "
                                                  "or did not call mpar_pipeline_create)", rank, size, limit);
    MPI_Comm_set_errhandler(c, MPI_ERRORS_RETURN);
    all = (unsigned char*)mpar__alloc(ctx, (size_t)size * MPAR__DIGEST_BYTES + MPAR__DIGEST_BYTES);
    if (!all) { /* cannot join: the others time out */
        MPI_Comm_free(&c);
        return r != MPAR_SUCCESS ? r : mpar__fail(ctx, MPAR_ERROR_OUT_OF_HOST_MEMORY, "out of host memory");
    }
    mpar__pipeline_digest(p, r, rank, &mine);
    if (ctx->test_skip_digest) memset(mine.part + 1, 0, sizeof mine.part - sizeof mine.part[0]);
    mpar__digest_encode(&mine, all + (size_t)size * MPAR__DIGEST_BYTES);
    if (MPI_Iallgather(all + (size_t)size * MPAR__DIGEST_BYTES, MPAR__DIGEST_BYTES, MPI_BYTE, all,
                       MPAR__DIGEST_BYTES, MPI_BYTE, c, &req) != MPI_SUCCESS) {
        mpar__free(ctx, all);
        MPI_Comm_free(&c);
        return r != MPAR_SUCCESS ? r : mpar__fail(ctx, MPAR_ERROR_IO, "pipeline create: MPI_Iallgather failed");
    }
    got = mpar__mpi_poll(&mpar__mpi_polling_default, &req, 1, limit);
    if (got <= 0) /* `all` and the communicator are left to MPI, which may still write */
        return r != MPAR_SUCCESS ? r : mpar__fail(ctx, got ? MPAR_ERROR_TIMEOUT : MPAR_ERROR_IO,
                                                  "pipeline create on rank %d: the ranks' descriptions did not all "
                                                  "arrive within %g s", rank, limit);
    memset(&first, 0, sizeof first);
    for (j = 0; j < size; j++) {
        if (mpar__digest_decode(all + (size_t)j * MPAR__DIGEST_BYTES, MPAR__DIGEST_BYTES, &theirs) != 0 ||
            theirs.rank != j || theirs.part[0] != mine.part[0]) {
            diff_rank = j, diff_part = 0;
            break;
        }
        if (theirs.result != MPAR_SUCCESS && fail_rank < 0) fail_rank = j, fail_code = theirs.result;
        if (j == 0) first = theirs;
        else if (diff_rank < 0 && first.result == MPAR_SUCCESS && theirs.result == MPAR_SUCCESS &&
                 (k = mpar__digest_differs(&first, &theirs)) >= 0)
            diff_rank = j, diff_part = k;
    }
    mpar__free(ctx, all);
    if (r != MPAR_SUCCESS || fail_rank >= 0 || diff_rank >= 0) {
        MPI_Comm_free(&c);
        if (r != MPAR_SUCCESS) return r;
        if (diff_part == 0)
            return mpar__fail(ctx, MPAR_ERROR_MISMATCH, "pipeline create: rank %d runs another mpar version (this is "
                              "%s), or sent a record this one cannot read", diff_rank, MPAR_VERSION_STRING);
        if (fail_rank >= 0)
            return mpar__fail(ctx, MPAR_ERROR_ABORTED, "pipeline create: rank %d could not create its part (%s; its "
                              "mpar_last_error says why)", fail_rank, mpar_result_string((mpar_result)fail_code));
        return mpar__fail(ctx, MPAR_ERROR_MISMATCH, "pipeline create: the ranks disagree on the %s: rank %d's differs "
                          "from rank 0's; every rank must describe the same pipeline", mpar__digest_part_name[diff_part],
                          diff_rank);
    }
    p->comm = c, p->comm_owned = 1;
    p->tag_cycle = 1;
    if (MPI_Comm_get_attr(c, MPI_TAG_UB, &ub, &flag) == MPI_SUCCESS && flag && ub) {
        long long most = (long long)*(int*)ub + 1;
        p->tag_cycle = (unsigned)(most / 32768 > 65536 ? 65536 : most / 32768 < 1 ? 1 : most / 32768);
    }
    return MPAR_SUCCESS;
}
#endif

#ifdef MPAR_USE_MPI
/* ---- agreement between ranks: non-blocking collectives, polled against a
   deadline, so that no rank waits without end for one that stopped ----

   After every job the ranks agree on its outcome. The agreement is an
   MPI_Iallreduce on the pipeline's communicator (the ranks post them in the
   same order: one per job, and a rank that refuses a job before running it
   still posts its own, saying so). A rank waits for it up to
   timeout_seconds when its own part succeeded (the others may still be
   computing), and up to MPAR__MPI_GRACE_S when it failed (the others learn
   of it from the abort message within a poll or two). A rank that stops
   waiting keeps the agreement in flight, with its own buffers: its next
   call waits for it again first (mpar__mpi_settle), so a rank that was
   only slow, or stopped and continued, joins up and the pipeline works
   again; one that is gone leaves every call returning MPAR_ERROR_TIMEOUT
   within timeout_seconds. */
#define MPAR__MPI_GRACE_S 1.0

typedef struct mpar__agree {
    MPI_Request req[2];
    int generation;
    int ints[4];     /* MAX over ranks: failed, ranks - cause, samples, -samples */
    double sums[1];  /* SUM: the batch's loss sum, then layer_count squared gradient norms */
} mpar__agree;

/* Waits for an agreement left in flight by an earlier call (its outcome
   was reported then); quiet: sets no error message. */
/* After a job that failed, once every rank is past it: receives and
   drops the link messages of its generation still addressed to this rank
   (sent before the sender learnt of the failure), so that they hold no
   memory and their senders' requests complete (a send slot still busy
   with one would otherwise wait for it in the next job). A second pass
   after a short nap catches what was still on its way. */
static void mpar__mpi_drain(mpar_pipeline* p, int generation) {
    int i, mb, pass, found = 1;
    for (pass = 0; pass < 4 && found; pass++) {
        found = 0;
        for (i = 0; p->links && i < 2 * (p->vs_count - 1); i++) {
            const mpar__link* l = &p->links[i];
            if (l->t != &mpar__transport_mpi || !l->receiver_local) continue;
            for (mb = 0; mb < 1024; mb++) {
                int flag = 0, n = 0;
                MPI_Message msg;
                MPI_Status st;
                void* junk;
                if (MPI_Improbe(l->peer, mpar__mpi_gen_tag(p, generation, l, mb), p->comm, &flag, &msg, &st) !=
                        MPI_SUCCESS || !flag)
                    continue;
                MPI_Get_count(&st, MPI_BYTE, &n);
                junk = mpar__alloc(p->ctx, n > 0 ? (size_t)n : 1);
                MPI_Mrecv(junk ? junk : NULL, junk ? n : 0, MPI_BYTE, &msg, MPI_STATUS_IGNORE);
                mpar__free(p->ctx, junk);
                found++;
            }
        }
        if (pass == 0 && !found) {
            struct timespec nap = {0, 2000000};
            nanosleep(&nap, NULL);
            found = 1;
        }
    }
}

static mpar_result mpar__mpi_settle_quiet(mpar_pipeline* p, double limit) {
    int got, gen;
    if (!p->agree) return MPAR_SUCCESS;
    got = mpar__mpi_poll(&p->mpi_polling, p->agree->req, 2, limit);
    if (got == 0) return MPAR_ERROR_TIMEOUT;
    if (got < 0) return MPAR_ERROR_IO; /* kept: MPI may still write into it */
    gen = p->agree->generation;
    mpar__free(p->ctx, p->agree);
    p->agree = NULL;
    mpar__mpi_drain(p, gen); /* a job left in flight had failed somewhere */
    return MPAR_SUCCESS;
}

static mpar_result mpar__mpi_settle(mpar_pipeline* p) {
    int gen = p->agree ? p->agree->generation : 0;
    mpar_result r = mpar__mpi_settle_quiet(p, p->desc.timeout_seconds);
    if (r == MPAR_ERROR_TIMEOUT)
        return mpar__fail(p->ctx, r, "the ranks have not all finished job %d, which failed: waited another %g s for a "
                          "rank that is stopped or gone; this pipeline cannot run until every rank answers (destroy "
                          "it if one never will)", gen, p->desc.timeout_seconds);
    if (r != MPAR_SUCCESS)
        return mpar__fail(p->ctx, r, "MPI failed while the ranks agreed on the outcome of job %d (a rank gone?); "
                          "destroy the pipeline", gen);
    return MPAR_SUCCESS;
}

/* After a job, every rank learns whether any rank failed (and which one
   caused it), and gets the loss and the gradient norms of the stages it
   does not run: sums with zeros from everyone else, so the values are
   exact (the loss is summed in micro-batch order on the last stage's rank,
   as in one process). The ranks' batch sizes are compared too. */
static mpar_result mpar__mpi_after_job(mpar_pipeline* p, mpar__job job, mpar_result r, const char** detail) {
    char* why = p->why;
    int failed = r != MPAR_SUCCESS, cause = (failed && !p->peer_failed) ? p->rank : p->ranks, i, got, first,
        samples = (job != MPAR__JOB_STEP && !failed && p->batch) ? p->batch->samples : 0;
    size_t n = 1 + (size_t)p->layer_count;
    mpar__agree* a;
    mpar_result settled = mpar__mpi_settle(p);
    if (settled != MPAR_SUCCESS) {
        if (failed) return r;
        *detail = mpar_last_error(p->ctx);
        return settled;
    }
    a = (mpar__agree*)mpar__alloc(p->ctx, sizeof *a + sizeof(double) * (n - 1));
    if (!a) return mpar__fail(p->ctx, MPAR_ERROR_OUT_OF_HOST_MEMORY, "out of host memory for the ranks' agreement");
    a->generation = p->generation;
    a->ints[0] = failed, a->ints[1] = p->ranks - cause, a->ints[2] = samples, a->ints[3] = -samples;
    a->sums[0] = 0.0;
    if (!failed && (job == MPAR__JOB_GRADS || job == MPAR__JOB_INFER))
        for (i = 0; i < p->mb_count; i++) a->sums[0] += (double)p->mb_loss[i]; /* micro-batch order, as one process */
    for (i = 0; i < p->layer_count; i++) a->sums[1 + i] = (!failed && job == MPAR__JOB_GRADS) ? p->layer_sumsq[i] : 0.0;
    if (MPI_Iallreduce(MPI_IN_PLACE, a->ints, 4, MPI_INT, MPI_MAX, p->comm, &a->req[0]) != MPI_SUCCESS ||
        MPI_Iallreduce(MPI_IN_PLACE, a->sums, (int)n, MPI_DOUBLE, MPI_SUM, p->comm, &a->req[1]) != MPI_SUCCESS) {
        mpar__free(p->ctx, a); /* (a first request posted alone would be written into freed memory: MPI failing
                                   here is taken as the end of this communicator) */
        return mpar__fail(p->ctx, MPAR_ERROR_IO, "MPI_Iallreduce failed after job %d", p->generation);
    }
    p->agree = a;
    got = mpar__mpi_poll(&p->mpi_polling, a->req, 2,
                         failed ? fmin(p->desc.timeout_seconds, MPAR__MPI_GRACE_S) : p->desc.timeout_seconds);
    if (got <= 0) { /* left in flight for the next call */
        if (failed) return r;
        snprintf(why, sizeof p->why, "%s job %d: not every rank finished it within %g s (a rank stopped, gone, or "
                 "slower than timeout_seconds allows)", got < 0 ? "MPI failed while the ranks agreed on" : "after",
                 p->generation, p->desc.timeout_seconds);
        *detail = why;
        return got < 0 ? MPAR_ERROR_IO : MPAR_ERROR_TIMEOUT;
    }
    p->agree = NULL;
    if (a->ints[0]) {
        first = p->ranks - a->ints[1];
        mpar__free(p->ctx, a);
        mpar__mpi_drain(p, p->generation);
        if (r == MPAR_SUCCESS || (p->peer_failed && r == MPAR_ERROR_ABORTED)) {
            snprintf(why, sizeof p->why, "stopped because rank %d failed (its mpar_last_error says why)",
                     first < p->ranks ? first : -1);
            *detail = why;
            return MPAR_ERROR_ABORTED;
        }
        return r;
    }
    if (a->ints[2] != -a->ints[3]) {
        snprintf(why, sizeof p->why, "the ranks were given batches of different sizes (%d to %d samples): every rank "
                 "passes the same batch size", -a->ints[3], a->ints[2]);
        mpar__free(p->ctx, a);
        *detail = why;
        return MPAR_ERROR_MISMATCH;
    }
    p->loss_sum = a->sums[0];
    if (job == MPAR__JOB_GRADS) memcpy(p->layer_sumsq, a->sums + 1, sizeof(double) * (size_t)p->layer_count);
    mpar__free(p->ctx, a);
    return MPAR_SUCCESS;
}

/* A rank that refuses a job before running it (a bad batch, say) still
   takes part, as a rank whose job failed at once: the other ranks stop
   their part of it and return MPAR_ERROR_ABORTED naming this rank, and
   every rank's next call pairs with the others' next call. The caller's
   error message is kept. */
static mpar_result mpar__mpi_refuse_job(mpar_pipeline* p, mpar__job job, mpar_result r) {
    const char* detail = NULL;
    int i;
    if (p->ranks <= 1 || !p->comm_owned) return r;
    if (mpar__mpi_settle_quiet(p, p->desc.timeout_seconds) != MPAR_SUCCESS) return r;
    pthread_mutex_lock(&p->mu);
    p->generation++; /* as the others' run_job does; the workers stay asleep */
    for (i = 0; i < p->workers_count; i++) p->workers[i].generation = p->generation;
    pthread_mutex_unlock(&p->mu);
    p->peer_failed = 0;
    mpar__mpi_abort_peers(p);
    mpar__mpi_after_job(p, job, r, &detail); /* sets no message when this rank failed */
    return r;
}
#endif

static void mpar__rebalance_measure(mpar_pipeline* p, mpar__job job);
static mpar_result mpar__rebalance_after_step(mpar_pipeline* p);
static void mpar__rebalance_stats(const mpar_pipeline* p, mpar_pipeline_stats* out);

/* Runs one job on every worker and waits for all of them. */
static mpar_result mpar__run_job(mpar_pipeline* p, mpar__job job) {
    int i, measure;
    mpar_result r = MPAR_SUCCESS;
    const char* detail = NULL;
#ifdef MPAR_USE_MPI
    if (p->ranks > 1) MPAR__TRY(mpar__mpi_settle(p)); /* an earlier job's agreement, still in flight */
#endif
    mpar__links_abort(p, 0);
    if (job != MPAR__JOB_STEP) {
        mpar_schedule_destroy(p->replaced_schedule); /* the timeline now shows this job */
        p->replaced_schedule = NULL;
        p->t0 = mpar__now();
    }
    p->step_seed = mpar__fnv1a(p->model->desc.seed ^ 0x5851F42D4C957F2DULL, &p->step, sizeof p->step);
    mpar__decide_serial(p, job);
    /* AUTO measures a training job that runs its stages at once (a job run
       one stage at a time to compile kernels times nothing real) */
    measure = p->auto_pending && !p->serial && (job == MPAR__JOB_GRADS || job == MPAR__JOB_TRAIN);
    for (i = 0; measure && i < p->workers_count; i++) p->workers[i].ex.profiling = 1;
    if (p->ranks > 1 && job != MPAR__JOB_STEP) { /* what other ranks own stays zero for the sums */
        memset(p->mb_loss, 0, sizeof(float) * (size_t)p->mb_count);
        memset(p->layer_sumsq, 0, sizeof(double) * (size_t)p->layer_count);
    }
    p->peer_failed = 0;
    pthread_mutex_lock(&p->mu);
    if (job != MPAR__JOB_STEP) p->last_job = job; /* what the timeline shows */
    p->job = job;
    p->done_count = 0;
    p->first_failure = -1;
    p->generation++;
    pthread_cond_broadcast(&p->start_cv);
    while (p->done_count < p->local_workers) pthread_cond_wait(&p->done_cv, &p->mu);
    pthread_mutex_unlock(&p->mu);
    if (p->first_failure >= 0) {
        r = p->workers[p->first_failure].result;
        detail = p->workers[p->first_failure].error;
    }
    for (i = 0; r == MPAR_SUCCESS && i < p->workers_count; i++)
        if (mpar__local(p, i)) r = p->workers[i].result;
#ifdef MPAR_USE_MPI
    if (p->ranks > 1) r = mpar__mpi_after_job(p, job, r, &detail);
#endif
    if (r != MPAR_SUCCESS) {
        mpar__links_abort(p, 0);
        return mpar__fail(p->ctx, r, "%s", detail ? detail : "a stage stopped");
    }
    p->auto_measured = measure;
    mpar__rebalance_measure(p, job);
    return MPAR_SUCCESS;
}

static mpar_result mpar__set_batch(mpar_pipeline* p, const mpar_batch* b, int mb_count, int need_targets) {
    int m, rows, floats = (mpar_model_layer(p->model, p->layer_count - 1)->type->flags & MPAR_LAYER_FLOAT_TARGETS) != 0;
    if (!b || !b->inputs || b->samples <= 0 || (need_targets && !mpar__batch_targets(p->model, b)))
        return mpar__fail(p->ctx, MPAR_ERROR_INVALID_ARGUMENT,
                          "batch: inputs%s must be given and samples positive (got %d)",
                          !need_targets ? "" : floats ? " and float_targets (the loss layer takes floats)"
                                                      : " and targets", b ? b->samples : 0);
    if (need_targets && b->samples > p->desc.max_batch)
        return mpar__fail(p->ctx, MPAR_ERROR_INVALID_ARGUMENT, "batch of %d samples exceeds max_batch %d", b->samples,
                          p->desc.max_batch);
    if (b->samples > INT_MAX / p->seq_len) /* rows are ints: row offsets and counts below */
        return mpar__fail(p->ctx, MPAR_ERROR_INVALID_ARGUMENT, "batch.samples %d: times seq_len %d the rows exceed "
                          "INT_MAX", b->samples, p->seq_len);
    if (b->samples < mb_count)
        return mpar__fail(p->ctx, MPAR_ERROR_INVALID_ARGUMENT, "batch of %d samples cannot fill %d micro-batches",
                          b->samples, mb_count);
    p->batch = b;
    p->mb_count = mb_count;
    for (m = 0; m <= mb_count; m++) /* uneven: the first (samples mod M) get one more */
        p->mb_first[m] = m * (b->samples / mb_count) + (m < b->samples % mb_count ? m : b->samples % mb_count);
    p->loss_scale = 0.0f;
    if (floats && b->float_targets) {
        const mpar_layer* last = mpar_model_layer(p->model, p->layer_count - 1);
        size_t i, n = (size_t)b->samples * (size_t)p->seq_len * (size_t)last->in_features;
        for (i = 0; i < n; i++)
            if (!isfinite(b->float_targets[i]))
                return mpar__fail(p->ctx, MPAR_ERROR_INVALID_ARGUMENT, "float target %g of row %zu, column %zu is not "
                                  "finite", (double)b->float_targets[i], i / (size_t)last->in_features,
                                  i % (size_t)last->in_features);
        p->loss_scale = 1.0f / (float)(b->samples * p->seq_len); /* every row counts */
    } else if (!floats && b->targets) {
        const mpar_layer* last = mpar_model_layer(p->model, p->layer_count - 1);
        int counted = 0, i;
        rows = b->samples * p->seq_len;
        for (i = 0; i < rows; i++) {
            if (b->targets[i] >= last->in_features)
                return mpar__fail(p->ctx, MPAR_ERROR_INVALID_ARGUMENT, "target %d of row %d is not below %d classes",
                                  (int)b->targets[i], i, last->in_features);
            counted += b->targets[i] >= 0;
        }
        p->loss_scale = counted ? 1.0f / (float)counted : 0.0f;
    }
    if (mpar_model_layer(p->model, 0)->type->flags & MPAR_LAYER_TOKEN_INPUT) {
        const int32_t* t = (const int32_t*)b->inputs;
        int i, vocab = mpar_model_layer(p->model, 0)->desc.vocab;
        for (i = 0; i < b->samples * p->seq_len; i++)
            if (t[i] < 0 || t[i] >= vocab)
                return mpar__fail(p->ctx, MPAR_ERROR_INVALID_ARGUMENT, "token %d at row %d is outside the vocabulary "
                                  "of %d", (int)t[i], i, vocab);
    }
    return MPAR_SUCCESS;
}

/* The batch's rows that count in the loss, recovered from loss_scale. */
static int mpar__counted_rows(const mpar_pipeline* p) {
    return (int)(p->loss_scale > 0.0f ? (1.0f / p->loss_scale + 0.5f) : 0.0f);
}

/* The batch's mean loss over its counted rows, from the micro-batches'
   sums in micro-batch order (0 when no row counts). */
static double mpar__loss_sum(const mpar_pipeline* p) {
    double loss = 0.0;
    int m;
    if (p->ranks > 1) return p->loss_sum; /* the same sum, made on the last stage's rank (mpar__mpi_after_job) */
    for (m = 0; m < p->mb_count; m++) loss += (double)p->mb_loss[m];
    return loss;
}

static double mpar__batch_loss(const mpar_pipeline* p) {
    int counted = mpar__counted_rows(p);
    return counted ? mpar__loss_sum(p) / counted : 0.0;
}

static mpar_result mpar__damaged(mpar_pipeline* p) {
    if (p->damaged == 2)
        return mpar__fail(p->ctx, MPAR_ERROR_INVALID_STATE, "a re-balancing move failed and the old stages could not be "
                          "rebuilt either, so the pipeline holds no stages or state: destroy it");
    return mpar__fail(p->ctx, MPAR_ERROR_INVALID_STATE,
                      "an optimizer step failed part-way, so some stages may hold updated parameters and others not; "
                      "load a checkpoint (mpar_pipeline_load_checkpoint) to continue training");
}

static mpar_result mpar__no_training(mpar_pipeline* p, const char* call) {
    return mpar__fail(p->ctx, MPAR_ERROR_INVALID_STATE,
                      "%s: the pipeline was created with inference_only, so it holds no gradients or optimizer state",
                      call);
}

/* A job this rank refuses before running it: across processes the other
   ranks must still hear of it (mpar__mpi_refuse_job). Returns r. */
static mpar_result mpar__refuse_job(mpar_pipeline* p, mpar__job job, mpar_result r) {
#ifdef MPAR_USE_MPI
    if (p->ranks > 1) return mpar__mpi_refuse_job(p, job, r);
#endif
    (void)p, (void)job;
    return r;
}

static mpar_result mpar__auto_finish(mpar_pipeline* p);
static mpar_result mpar__compute_gradients_impl(mpar_pipeline* p, const mpar_batch* batch, mpar_step_info* info) {
    mpar_result r;
    if (!p) return MPAR_ERROR_INVALID_ARGUMENT;
    if (p->desc.inference_only) return mpar__no_training(p, "mpar_pipeline_compute_gradients");
    if (p->damaged) return mpar__damaged(p);
    r = mpar__set_batch(p, batch, p->schedule->microbatches, 1);
    if (r != MPAR_SUCCESS) return mpar__refuse_job(p, MPAR__JOB_GRADS, r);
    r = mpar__run_job(p, MPAR__JOB_GRADS);
    p->grads_ready = r == MPAR_SUCCESS;
    if (r != MPAR_SUCCESS) return r;
    p->last_loss = mpar__batch_loss(p); /* apply checks it is finite */
    if (info) {
        memset(info, 0, sizeof *info);
        info->loss = p->last_loss;
        info->counted_rows = mpar__counted_rows(p);
        info->step = p->step;
    }
    return mpar__auto_finish(p);
}

static float mpar__lr_at(const mpar_optimizer_desc* o, int step) {
    double lr = o->lr;
    if (o->warmup_steps > 0 && step <= o->warmup_steps) return (float)(lr * step / o->warmup_steps);
    if (o->decay_steps > 0) {
        double t = (double)(step - o->warmup_steps) / o->decay_steps;
        if (t > 1.0) t = 1.0;
        return (float)(o->min_lr + 0.5 * (lr - o->min_lr) * (1.0 + cos(3.141592653589793 * t)));
    }
    return (float)lr;
}

/* The optimizer step's decision from every layer's squared gradient norm
   (summed in layer order: the same total, bit for bit, for every
   partition and every stage that computes it) and the loss: whether to
   step, the norm, the first non-finite layer, and for a step its number,
   learning rate and clipping scale. Host after compute_gradients, or the
   last stage to post its norms in a training job (under p->mu). */
static void mpar__step_decide(mpar_pipeline* p) {
    double sumsq = 0.0, norm;
    int i, bad = -1;
    for (i = 0; i < p->layer_count; i++) {
        if (bad < 0 && !isfinite(p->layer_sumsq[i])) bad = i;
        sumsq += p->layer_sumsq[i];
    }
    if (p->job == MPAR__JOB_TRAIN) p->last_loss = mpar__batch_loss(p); /* every stage drained before posting */
    norm = sqrt(sumsq);
    p->opt_norm = norm;
    p->opt_bad_layer = bad;
    p->opt_go = bad < 0 && isfinite(p->last_loss);
    p->opt_decided = 1;
    if (!p->opt_go) return;
    p->step++;
    p->step_lr = mpar__lr_at(&p->desc.optimizer, p->step);
    p->step_scale = (p->desc.optimizer.clip_norm > 0.0f && norm > p->desc.optimizer.clip_norm)
                        ? (float)(p->desc.optimizer.clip_norm / (norm + 1e-6)) : 1.0f;
}

/* What a decision that did not step means for the caller. */
static mpar_result mpar__step_refused(mpar_pipeline* p, mpar_step_info* info) {
    int i, bad = p->opt_bad_layer, stage = 0;
    for (i = 0; i < p->vs_count; i++)
        if (bad >= p->vs[i].first && bad <= p->vs[i].last) stage = p->vs[i].worker;
    if (p->desc.skip_nonfinite) {
        if (info) info->skipped = 1;
        return MPAR_SUCCESS;
    }
    if (bad >= 0)
        return mpar__fail(p->ctx, MPAR_ERROR_NUMERICAL, "gradient of layer %d (%s) on stage %d is not finite; "
                          "parameters left unchanged", bad, mpar_model_layer(p->model, bad)->type->name, stage);
    return mpar__fail(p->ctx, MPAR_ERROR_NUMERICAL, "loss is not finite; parameters left unchanged");
}

/* The step counter (an int, saved in checkpoints) cannot count another step. */
static mpar_result mpar__step_limit(mpar_pipeline* p) {
    return mpar__fail(p->ctx, MPAR_ERROR_INVALID_STATE, "the step counter is at its limit (%d): no further optimizer "
                      "step can be counted; mpar_pipeline_set_step can lower it", INT_MAX);
}

static mpar_result mpar__apply_gradients_impl(mpar_pipeline* p, mpar_step_info* info) {
    mpar_result r;
    if (!p) return MPAR_ERROR_INVALID_ARGUMENT;
    if (p->desc.inference_only) return mpar__no_training(p, "mpar_pipeline_apply_gradients");
    if (p->damaged) return mpar__damaged(p);
    if (p->step == INT_MAX) return mpar__step_limit(p);
    if (!p->grads_ready)
        return mpar__fail(p->ctx, MPAR_ERROR_INVALID_STATE, "apply_gradients needs a successful compute_gradients first");
    p->grads_ready = 0;
    p->job = MPAR__JOB_STEP; /* the loss is the host's already */
    mpar__step_decide(p);
    if (info) info->grad_norm = p->opt_norm;
    if (!p->opt_go) return mpar__step_refused(p, info);
    r = mpar__run_job(p, MPAR__JOB_STEP);
    if (r != MPAR_SUCCESS) {
        /* some stages may have stepped and others not */
        p->damaged = 1;
        p->step--;
        return r;
    }
    if (info) {
        info->lr = p->step_lr;
        info->step = p->step;
    }
    return mpar__rebalance_after_step(p);
}

static mpar_result mpar__train_step_impl(mpar_pipeline* p, const mpar_batch* batch, mpar_step_info* info) {
    mpar_step_info local;
    mpar_result r;
    if (!info) info = &local;
    if (p && p->desc.inference_only) return mpar__no_training(p, "mpar_pipeline_train_step");
    if (p && p->ranks > 1) { /* across processes the host decides the step between two jobs */
        r = mpar__compute_gradients_impl(p, batch, info);
        if (r != MPAR_SUCCESS) return r;
        return mpar__apply_gradients_impl(p, info);
    }
    if (!p) return MPAR_ERROR_INVALID_ARGUMENT;
    if (p->damaged) return mpar__damaged(p);
    if (p->step == INT_MAX) return mpar__step_limit(p);
    r = mpar__set_batch(p, batch, p->schedule->microbatches, 1);
    if (r != MPAR_SUCCESS) return r;
    p->grads_ready = 0;
    p->opt_posted = p->opt_decided = p->opt_go = p->opt_stepped = 0;
    r = mpar__run_job(p, MPAR__JOB_TRAIN);
    if (r != MPAR_SUCCESS) {
        if (p->opt_decided && p->opt_go) {
            p->step--;
            if (p->opt_stepped) p->damaged = 1; /* some stages may have stepped and others not */
        }
        return r;
    }
    memset(info, 0, sizeof *info);
    info->loss = p->last_loss;
    info->counted_rows = mpar__counted_rows(p);
    info->grad_norm = p->opt_norm;
    info->step = p->step;
    info->lr = p->opt_go ? p->step_lr : 0.0f;
    r = mpar__auto_finish(p); /* AUTO's first step measured: from the next one, its synthesised schedule */
    if (r != MPAR_SUCCESS) return r;
    return p->opt_go ? mpar__rebalance_after_step(p) : mpar__step_refused(p, info);
}

#define MPAR__INFER_MAX_MICROBATCHES (1 << 20)
static mpar_result mpar__infer_impl(mpar_pipeline* p, const mpar_batch* batch, float* outputs, double* loss) {
    int per_mb, count;
    mpar_result r;
    double sum = 0.0;
    if (!p) return MPAR_ERROR_INVALID_ARGUMENT;
    if (p->damaged) return mpar__damaged(p); /* mixed parameters would give answers of no model */
    if (!batch)
        return mpar__refuse_job(p, MPAR__JOB_INFER,
                                mpar__fail(p->ctx, MPAR_ERROR_INVALID_ARGUMENT, "mpar_pipeline_infer: batch is NULL"));
    if (loss && !mpar__batch_targets(p->model, batch)) /* a loss of 0 would read as a perfect model */
        return mpar__refuse_job(p, MPAR__JOB_INFER,
                                mpar__fail(p->ctx, MPAR_ERROR_INVALID_ARGUMENT, "mpar_pipeline_infer: loss asked for "
                                           "but the batch has no targets (pass loss NULL, or give batch.%s)",
                                           (mpar_model_layer(p->model, p->layer_count - 1)->type->flags &
                                            MPAR_LAYER_FLOAT_TARGETS) ? "float_targets" : "targets"));
    per_mb = p->mb_rows_max / p->seq_len;
    /* rounded up without samples + per_mb - 1, which overflows near INT_MAX */
    count = batch->samples > 0 ? batch->samples / per_mb + (batch->samples % per_mb != 0) : 0;
    if (count > MPAR__INFER_MAX_MICROBATCHES) /* as many as a pipeline's desc.microbatches may be */
        return mpar__fail(p->ctx, MPAR_ERROR_INVALID_ARGUMENT, "mpar_pipeline_infer: batch.samples %d needs %d "
                          "micro-batches of at most %d samples; one call takes at most %d", batch->samples, count,
                          per_mb, MPAR__INFER_MAX_MICROBATCHES);
    if (count > p->mb_capacity) {
        int* first = (int*)mpar__alloc(p->ctx, sizeof(int) * (size_t)(count + 1));
        float* losses = (float*)mpar__alloc(p->ctx, sizeof(float) * (size_t)count);
        if (!first || !losses) {
            mpar__free(p->ctx, first), mpar__free(p->ctx, losses);
            return mpar__refuse_job(p, MPAR__JOB_INFER,
                                    mpar__fail(p->ctx, MPAR_ERROR_OUT_OF_HOST_MEMORY, "out of host memory"));
        }
        mpar__free(p->ctx, p->mb_first), mpar__free(p->ctx, p->mb_loss);
        p->mb_first = first, p->mb_loss = losses, p->mb_capacity = count;
    }
    r = mpar__set_batch(p, batch, count, 0);
    if (r != MPAR_SUCCESS) return mpar__refuse_job(p, MPAR__JOB_INFER, r);
    if (!p->infer_schedule || p->infer_schedule->microbatches != count) {
        /* inference is a schedule too: forwards only, on the training schedule's placement */
        mpar_error err;
        mpar_schedule_destroy(p->infer_schedule);
        p->infer_schedule = NULL;
        if (mpar_schedule_forward_only(&p->ctx->allocator, p->schedule->stages, count, p->schedule->virtual_stages,
                                       p->schedule->placement, &p->infer_schedule, &err) != MPAR_SUCCESS)
            return mpar__refuse_job(p, MPAR__JOB_INFER, mpar__fail(p->ctx, err.code, "%s", err.message));
    }
    p->infer_out = outputs;
    r = mpar__run_job(p, MPAR__JOB_INFER);
    p->infer_out = NULL;
    if (r != MPAR_SUCCESS) return r;
    sum = mpar__loss_sum(p);
    if (loss) *loss = (mpar__batch_targets(p->model, batch) && p->loss_scale > 0.0f) ? sum * (double)p->loss_scale : 0.0;
    return MPAR_SUCCESS;
}

/* Finds the stage holding a layer. */
static mpar__vstage* mpar__vs_of_layer(mpar_pipeline* p, int layer, int* k) {
    int i;
    for (i = 0; i < p->vs_count; i++)
        if (layer >= p->vs[i].first && layer <= p->vs[i].last) {
            *k = layer - p->vs[i].first;
            return &p->vs[i];
        }
    return NULL;
}

static mpar_result mpar__param_io(mpar_pipeline* p, int layer, void* host, int which, int write) {
    int k;
    mpar__vstage* v;
    size_t n;
    cl_mem* mems;
    mpar_buf at;
    if (!p) return MPAR_ERROR_INVALID_ARGUMENT;
    if (p->damaged == 2) return mpar__damaged(p);
    if (which < 0 || which > (int)MPAR_STATE_MOMENT2)
        return mpar__fail(p->ctx, MPAR_ERROR_INVALID_ARGUMENT, "unknown state kind %d", which);
    v = mpar__vs_of_layer(p, layer, &k);
    if (!v) return mpar__fail(p->ctx, MPAR_ERROR_INVALID_ARGUMENT, "layer %d does not exist", layer);
    if (!mpar__local(p, v->worker))
        return mpar__fail(p->ctx, MPAR_ERROR_INVALID_ARGUMENT, "layer %d lives on rank %d, not on this rank (%d)", layer,
                          p->stage_rank[v->worker], p->rank);
    n = v->param_off[k + 1] - v->param_off[k];
    if (n == 0) return MPAR_SUCCESS;
    if (!host) return mpar__fail(p->ctx, MPAR_ERROR_INVALID_ARGUMENT, "layer %d: the host array is NULL", layer);
    if (which != MPAR_STATE_PARAMS && p->desc.inference_only)
        return mpar__fail(p->ctx, MPAR_ERROR_INVALID_STATE, "layer %d: an inference-only pipeline holds no %s", layer,
                          which == MPAR_STATE_GRADS ? "gradients" : "optimizer moments");
    mems = which == MPAR_STATE_PARAMS ? v->params : which == MPAR_STATE_GRADS ? v->grads
         : which == MPAR_STATE_MOMENT1 ? v->opt1 : v->opt2;
    if (which == MPAR_STATE_MOMENT2 && p->desc.optimizer.kind != MPAR_OPTIMIZER_ADAMW) {
        if (!write) memset(host, 0, n * sizeof(float));
        return MPAR_SUCCESS;
    }
    at = mpar__state(v, mems, k);
    if (write)
        MPAR__CL(p->ctx, clEnqueueWriteBuffer(p->workers[v->worker].ex.queue, at.mem, CL_TRUE, at.off * 4, n * 4, host, 0,
                                              NULL, NULL));
    else
        MPAR__CL(p->ctx, clEnqueueReadBuffer(p->workers[v->worker].ex.queue, at.mem, CL_TRUE, at.off * 4, n * 4, host, 0,
                                             NULL, NULL));
    return MPAR_SUCCESS;
}
static mpar_result mpar__get_params_impl(mpar_pipeline* p, int layer, float* out) {
    return mpar__param_io(p, layer, out, MPAR_STATE_PARAMS, 0);
}
static mpar_result mpar__set_params_impl(mpar_pipeline* p, int layer, const float* in) {
    return mpar__param_io(p, layer, (void*)in, MPAR_STATE_PARAMS, 1);
}
static mpar_result mpar__get_grads_impl(mpar_pipeline* p, int layer, float* out) {
    return mpar__param_io(p, layer, out, MPAR_STATE_GRADS, 0);
}
static mpar_result mpar__read_state_impl(mpar_pipeline* p, int layer, mpar_state_kind kind, float* out) {
    return mpar__param_io(p, layer, out, (int)kind, 0);
}
static mpar_result mpar__write_state_impl(mpar_pipeline* p, int layer, mpar_state_kind kind, const float* in) {
    return mpar__param_io(p, layer, (void*)in, (int)kind, 1);
}
MPARDEF int mpar_pipeline_get_step(const mpar_pipeline* p) { return p && p->live == MPAR__LIVE_PIPELINE ? p->step : 0; }
MPARDEF mpar_result mpar_pipeline_set_step(mpar_pipeline* p, int step) {
    MPAR__TRY(mpar__pipeline_check(p, "mpar_pipeline_set_step"));
    if (step < 0) return mpar__fail(p->ctx, MPAR_ERROR_INVALID_ARGUMENT, "step %d is negative", step);
    p->step = step;
    return MPAR_SUCCESS;
}
MPARDEF mpar_result mpar_pipeline_param_size(const mpar_pipeline* p, int layer, size_t* floats) {
    const mpar_layer* l;
    MPAR__TRY(mpar__pipeline_check(p, "mpar_pipeline_param_size"));
    if (!floats) return mpar__fail(p->ctx, MPAR_ERROR_INVALID_ARGUMENT, "mpar_pipeline_param_size: floats is NULL");
    l = mpar_model_layer(p->model, layer);
    if (!l)
        return mpar__fail(p->ctx, MPAR_ERROR_INVALID_ARGUMENT, "mpar_pipeline_param_size: layer %d does not exist (%d "
                          "layers)", layer, p->layer_count);
    *floats = l->param_count;
    return MPAR_SUCCESS;
}

MPARDEF mpar_result mpar_pipeline_output_size(const mpar_pipeline* p, int samples, size_t* floats) {
    MPAR__TRY(mpar__pipeline_check(p, "mpar_pipeline_output_size"));
    if (!floats || samples < 0)
        return mpar__fail(p->ctx, MPAR_ERROR_INVALID_ARGUMENT, "mpar_pipeline_output_size: floats is NULL or samples "
                          "(%d) negative", samples);
    *floats = (size_t)samples * (size_t)p->seq_len *
              (size_t)mpar_model_layer(p->model, p->layer_count - 1)->in_features; /* the loss layer's input */
    return MPAR_SUCCESS;
}

MPARDEF mpar_result mpar_pipeline_input_size(const mpar_pipeline* p, int samples, size_t* elements) {
    MPAR__TRY(mpar__pipeline_check(p, "mpar_pipeline_input_size"));
    if (!elements || samples < 0)
        return mpar__fail(p->ctx, MPAR_ERROR_INVALID_ARGUMENT, "mpar_pipeline_input_size: elements is NULL or samples "
                          "(%d) negative", samples);
    *elements = (size_t)samples * (size_t)p->seq_len * (size_t)p->model->desc.input_features;
    return MPAR_SUCCESS;
}

MPARDEF mpar_result mpar_pipeline_get_params_n(mpar_pipeline* p, int layer, float* out, size_t capacity) {
    size_t need = 0;
    mpar_result r = mpar_pipeline_param_size(p, layer, &need);
    if (r != MPAR_SUCCESS) return r;
    if (capacity < need)
        return mpar__fail(p->ctx, MPAR_ERROR_INVALID_ARGUMENT, "mpar_pipeline_get_params_n: layer %d has %llu "
                          "parameters but out holds %llu floats", layer, (unsigned long long)need,
                          (unsigned long long)capacity);
    return mpar_pipeline_get_params(p, layer, out);
}

MPARDEF mpar_result mpar_pipeline_infer_n(mpar_pipeline* p, const mpar_batch* batch, float* outputs, size_t capacity,
                                          double* loss) {
    size_t need;
    if (p && outputs && batch && batch->samples > 0) { /* anything else: infer's own checks */
        mpar_result r = mpar_pipeline_output_size(p, batch->samples, &need);
        if (r != MPAR_SUCCESS) return r;
        if (capacity < need)
            return mpar__fail(p->ctx, MPAR_ERROR_INVALID_ARGUMENT, "mpar_pipeline_infer_n: %d samples give %llu "
                              "output floats but outputs holds %llu", batch->samples, (unsigned long long)need,
                              (unsigned long long)capacity);
    }
    return mpar_pipeline_infer(p, batch, outputs, loss);
}

/* NULL for a destroyed pipeline (MPAR_DEBUG) */
MPARDEF const mpar_model* mpar_pipeline_model(const mpar_pipeline* p) {
    return p && p->live == MPAR__LIVE_PIPELINE ? p->model : NULL;
}
MPARDEF const mpar_pipeline_desc* mpar_pipeline_get_desc(const mpar_pipeline* p) {
    return p && p->live == MPAR__LIVE_PIPELINE ? &p->desc : NULL;
}
MPARDEF const mpar_schedule* mpar_pipeline_get_schedule(const mpar_pipeline* p) {
    return p && p->live == MPAR__LIVE_PIPELINE ? p->schedule : NULL;
}

static int mpar__event_order(const void* a, const void* b) {
    const mpar_event *x = (const mpar_event*)a, *y = (const mpar_event*)b;
    if (x->stage != y->stage) return x->stage < y->stage ? -1 : 1;
    if (x->start != y->start) return x->start < y->start ? -1 : 1;
    return x->end < y->end ? -1 : x->end > y->end ? 1 : 0;
}

static mpar_result mpar__tl_sim_desc(const mpar_timeline* t, const mpar_schedule* sc, mpar_sim_desc* d, void** mem,
                                     mpar_error* err);

/* The workers' events of the last job as a timeline, with the schedule
   that ran (AUTO's first step ran the one it replaced). */
static mpar_result mpar__pipeline_timeline(mpar_pipeline* p, mpar_timeline* out) {
    int i, n = 0;
    memset(out, 0, sizeof *out);
    for (i = 0; i < p->workers_count; i++) n += p->workers[i].event_count;
    out->allocator = p->ctx->allocator;
    out->events = (mpar_event*)mpar__alloc_a(&out->allocator, sizeof(mpar_event) * (size_t)(n ? n : 1));
    if (!out->events) return mpar__fail(p->ctx, MPAR_ERROR_OUT_OF_HOST_MEMORY, "out of host memory");
    {
        const mpar_schedule* ran = p->last_job == MPAR__JOB_INFER && p->infer_schedule ? p->infer_schedule
                                   : p->replaced_schedule                             ? p->replaced_schedule
                                                                                      : p->schedule;
        mpar_error err;
        if (mpar_schedule_copy(&out->allocator, ran, &out->schedule_lists, &err) != MPAR_SUCCESS) {
            mpar__free_a(&out->allocator, out->events);
            out->events = NULL;
            return mpar__fail(p->ctx, err.code, "%s", err.message);
        }
        out->microbatches = ran->microbatches;
    }
    out->stages = p->workers_count;
    out->virtual_stages = p->desc.virtual_stages;
    out->schedule = p->desc.schedule;
    for (i = 0; i < p->workers_count; i++) {
        mpar__worker* w = &p->workers[i];
        if (w->event_count) memcpy(out->events + out->event_count, w->events, sizeof(mpar_event) * (size_t)w->event_count);
        out->event_count += w->event_count;
        out->device_bytes[i] = w->bytes;
    }
    qsort(out->events, (size_t)n, sizeof(mpar_event), mpar__event_order);
    for (i = 0; i < n; i++)
        if (out->events[i].end > out->step_time) out->step_time = out->events[i].end;
    return MPAR_SUCCESS;
}

MPARDEF mpar_result mpar_pipeline_get_timeline(mpar_pipeline* p, mpar_timeline* out) {
    if (out) memset(out, 0, sizeof *out); /* safe to free whatever happens */
    MPAR__TRY(mpar__pipeline_check(p, "mpar_pipeline_get_timeline"));
    if (!out) return mpar__fail(p->ctx, MPAR_ERROR_INVALID_ARGUMENT, "mpar_pipeline_get_timeline: out is NULL");
    if (p->damaged == 2) return mpar__damaged(p);
    if (!p->desc.profile)
        return mpar__fail(p->ctx, MPAR_ERROR_INVALID_STATE, "no timeline: create the pipeline with desc.profile = 1");
    return mpar__pipeline_timeline(p, out);
}

static mpar_result mpar__pipeline_synthesize(mpar_pipeline* p, const mpar_sim_desc* measured, mpar_schedule** out);

/* AUTO after its first training job: the schedule synthesised from what
   that job measured replaces the one it ran (kept for the timeline until
   the next job). */
static mpar_result mpar__auto_finish(mpar_pipeline* p) {
    mpar_timeline t;
    mpar_sim_desc d;
    mpar_schedule* next = NULL;
    mpar_error err;
    void* mem = NULL;
    mpar_result r;
    int i;
    if (!p->auto_measured) return MPAR_SUCCESS;
    p->auto_pending = p->auto_measured = 0;
    for (i = 0; i < p->workers_count; i++) p->workers[i].ex.profiling = p->desc.profile;
    MPAR__TRY(mpar__pipeline_timeline(p, &t));
    r = mpar__tl_sim_desc(&t, t.schedule_lists, &d, &mem, &err);
    if (r != MPAR_SUCCESS) r = mpar__fail(p->ctx, r, "schedule AUTO: %s", err.message);
    if (r == MPAR_SUCCESS) r = mpar__pipeline_synthesize(p, &d, &next);
    mpar__free_a(&t.allocator, mem);
    mpar_timeline_free(&t);
    if (r != MPAR_SUCCESS) return r;
    mpar_schedule_destroy(p->replaced_schedule);
    p->replaced_schedule = p->schedule;
    p->schedule = next;
    return MPAR_SUCCESS;
}

MPARDEF void mpar_timeline_free(mpar_timeline* t) {
    if (!t) return;
    mpar__free_a(&t->allocator, t->events);
    mpar_schedule_destroy(t->schedule_lists);
    t->events = NULL;
    t->schedule_lists = NULL;
    t->event_count = 0;
}

MPARDEF mpar_result mpar_pipeline_get_stats(const mpar_pipeline* p, mpar_pipeline_stats* out) {
    int i, c;
    MPAR__TRY(mpar__pipeline_check(p, "mpar_pipeline_get_stats"));
    if (!out) return mpar__fail(p->ctx, MPAR_ERROR_INVALID_ARGUMENT, "mpar_pipeline_get_stats: out is NULL");
    memset(out, 0, sizeof *out);
    if (p->damaged == 2) return mpar__damaged((mpar_pipeline*)p);
    mpar__rebalance_stats(p, out);
    out->stages = p->workers_count;
    for (i = 0; i < p->workers_count; i++) {
        out->peak_in_flight[i] = p->workers[i].peak_in_flight;
        out->device_bytes[i] = p->workers[i].bytes;
        out->launches[i] = p->workers[i].ex.launches;
        out->opencl_launches[i] = p->workers[i].ex.cl_launches;
        for (c = 0; c < p->desc.virtual_stages; c++) out->slots[i] += mpar__vstage_of(p, i, c)->slot_count;
    }
    out->boundaries = p->vs_count - 1 < 64 ? p->vs_count - 1 : 64;
    for (i = 0; i < out->boundaries; i++) {
        out->link_modes[i] = p->links[i].t->mode;
        out->link_overlaps[i] = p->links[i].t->overlaps;
    }
    out->activation_type = p->desc.activation_type;
    return MPAR_SUCCESS;
}

/* ---- creation ---- */

static void CL_CALLBACK mpar__host_block_release(cl_mem m, void* block) {
    (void)m;
    mpar__free_aligned(block);
}

/* A buffer of a device. On the host route its memory is ours (aligned, from
   the context's allocator, freed when OpenCL deletes the buffer), so that
   host code and OpenCL kernels work on the same bytes. */
static cl_int mpar__device_buffer(mpar_context* ctx, int device, size_t floats, cl_mem* out) {
    const mpar__device* d = &ctx->devices[device];
    cl_context cc = ctx->groups[d->info.group];
    cl_int st = CL_SUCCESS;
    void* host;
    if (!d->info.host_route) {
        *out = clCreateBuffer(cc, CL_MEM_READ_WRITE, floats * 4, NULL, &st);
        return st;
    }
    host = mpar__alloc_aligned(ctx, floats * 4, d->host_align);
    if (!host) return CL_OUT_OF_HOST_MEMORY;
    *out = clCreateBuffer(cc, CL_MEM_READ_WRITE | CL_MEM_USE_HOST_PTR, floats * 4, host, &st);
    if (st == CL_SUCCESS) st = clSetMemObjectDestructorCallback(*out, mpar__host_block_release, host);
    if (st != CL_SUCCESS) {
        if (*out) clReleaseMemObject(*out);
        else mpar__free_aligned(host);
        *out = NULL;
    }
    return st;
}

static mpar_result mpar__alloc_buffer(mpar_pipeline* p, mpar__worker* w, size_t floats, cl_mem* out) {
    cl_int st;
    if (floats == 0) floats = 1;
    if (floats > SIZE_MAX / 4)
        return mpar__fail(p->ctx, MPAR_ERROR_DOES_NOT_FIT, "a buffer of %zu floats on device %d overflows size_t",
                          floats, w->device);
    if (mpar__fault_hit(p->ctx, MPAR__FAULT_ALLOC, w->index, p->step))
        *out = NULL, st = CL_MEM_OBJECT_ALLOCATION_FAILURE; /* injected */
    else
        st = mpar__device_buffer(p->ctx, w->device, floats, out);
    if (st != CL_SUCCESS)
        return mpar__fail(p->ctx, (mpar_result)st, "clCreateBuffer(%zu bytes) on device %d failed with %s", floats * 4,
                          w->device, mpar_result_string((mpar_result)st));
    w->bytes += floats * 4;
    return MPAR_SUCCESS;
}

/* Maps a device's profiling clock onto the host clock: a marker's end
   time against the host time right after it completed. */
static mpar_result mpar__clock_offset(mpar_pipeline* p, mpar__worker* w) {
    cl_event ev;
    cl_ulong end = 0;
    double host;
    MPAR__CL(p->ctx, clEnqueueMarkerWithWaitList(w->ex.queue, 0, NULL, &ev));
    MPAR__CL(p->ctx, clWaitForEvents(1, &ev));
    host = mpar__now();
    clGetEventProfilingInfo(ev, CL_PROFILING_COMMAND_END, sizeof end, &end, NULL);
    clReleaseEvent(ev);
    w->ex.clock_offset = host - 1e-9 * (double)end;
    w->ex.profiling = 1;
    return MPAR_SUCCESS;
}

static void mpar__keep_plan(mpar_pipeline* p, const mpar_plan* plan, int take);

/* The stages: given, from a given plan, or planned now. */
static mpar_result mpar__resolve_stages(mpar_pipeline* p, mpar_stage_desc* out) {
    const mpar_pipeline_desc* d = &p->desc;
    int V = d->virtual_stages, n, j;
    if (d->stages) {
        n = d->stage_count;
        if (n <= 0 || n % V != 0)
            return mpar__fail(p->ctx, MPAR_ERROR_INVALID_PLAN, "stage_count %d is not a positive multiple of "
                              "virtual_stages %d: give %d chunks per device (stages x virtual_stages, chunk j on the "
                              "device of chunk j mod stages), or set virtual_stages to 1", n, V, V);
        memcpy(out, d->stages, sizeof(mpar_stage_desc) * (size_t)n);
        for (j = 0; d->recompute_stages && j < n; j++) p->stage_recompute[j] = d->recompute_stages[j] != 0;
    } else {
        mpar_plan local;
        const mpar_plan* plan = d->plan;
        if (!plan) {
            MPAR__TRY(mpar_pipeline_plan(p->ctx, p->model, d, d->plan_options, &local));
            plan = &local;
            if (!p->dry_run) { /* the choice, and what binds it */
                char text[400];
                mpar_plan_to_string(&local, text, sizeof text);
                mpar__log(p->ctx, MPAR_LOG_INFO, "automatic plan %s: %s, predicted step %.4g ms; %s", text,
                          local.exact ? "optimal" : "heuristic", local.step_seconds * 1e3, local.binding.text);
            }
        }
        n = plan->num_stages;
        if (n <= 0 || n > 4 * MPAR__MAX_WORKERS || n % V != 0 || !plan->stages) {
            int devices = plan->stages ? plan->num_stages / (plan->virtual_stages > 0 ? plan->virtual_stages : 1) : 0;
            if (plan == &local) mpar_plan_free(&local);
            return mpar__fail(p->ctx, MPAR_ERROR_INVALID_PLAN, "the plan has %d chunk(s) on %d device(s), but "
                              "virtual_stages %d needs %d chunks per device: %s", n, devices, V, V,
                              devices < 2 ? "interleaving needs 2 or more devices; set virtual_stages to 1, or give "
                                            "explicit stages"
                                          : "plan with the same virtual_stages (mpar_plan_desc.virtual_stages), "
                                            "or set virtual_stages to the plan's");
        }
        for (j = 0; j < n; j++) {
            out[j].device = plan->stages[j].device;
            out[j].first_layer = plan->stages[j].first_layer;
            out[j].last_layer = plan->stages[j].last_layer;
            p->stage_recompute[j] = plan->stages[j].recompute != 0;
        }
        if (!p->dry_run) mpar__keep_plan(p, plan, plan == &local); /* for mpar_pipeline_get_plan */
        else if (plan == &local) mpar_plan_free(&local);
    }
    p->vs_count = n;
    p->workers_count = n / V;
    for (j = 0; j < n; j++) {
        int expect_first = j ? (out[j - 1].last_layer < p->layer_count ? out[j - 1].last_layer + 1 : p->layer_count) : 0;
        if (!d->mpi_comm && (out[j].device < 0 || out[j].device >= mpar_device_count(p->ctx)))
            return mpar__fail(p->ctx, MPAR_ERROR_INVALID_PLAN, "stage %d: device %d does not exist", j, out[j].device);
        if (out[j].first_layer != expect_first || out[j].last_layer < out[j].first_layer)
            return mpar__fail(p->ctx, MPAR_ERROR_INVALID_PLAN,
                              "stage %d covers layers %d-%d; stages must be contiguous, in order, non-empty and start "
                              "at layer %d", j, out[j].first_layer, out[j].last_layer, expect_first);
    }
    if (out[n - 1].last_layer != p->layer_count - 1)
        return mpar__fail(p->ctx, MPAR_ERROR_INVALID_PLAN, "stages end at layer %d but the model has %d layers",
                          out[n - 1].last_layer, p->layer_count);
    if (p->workers_count > MPAR__MAX_WORKERS)
        return mpar__fail(p->ctx, MPAR_ERROR_INVALID_PLAN, "at most %d stages", MPAR__MAX_WORKERS);
    return MPAR_SUCCESS;
}

/* a + b in size_t; 0 when the result would not fit. */
static int mpar__size_add(size_t a, size_t b, size_t* out) {
    if (a > SIZE_MAX - b) return 0;
    *out = a + b;
    return 1;
}

/* What a chunk's buffers depend on besides its layers. */
typedef struct mpar__mem_opts {
    size_t rows;   /* rows of the largest micro-batch */
    int split;     /* a gradient slot per activation slot (split backward) */
    int adamw;     /* two optimizer moments (SGD: one) */
    int infer;     /* inference only: no gradients, optimizer state or gradient slots */
} mpar__mem_opts;

static void mpar__mem_opts_of(const mpar_pipeline_desc* d, size_t rows, int split, mpar__mem_opts* o) {
    o->rows = rows, o->split = split;
    o->adamw = d->optimizer.kind == MPAR_OPTIMIZER_ADAMW, o->infer = d->inference_only != 0;
}

/* Per row, block b's part of an activation slot (inputs, the output in
   the last block, stashes) and of a gradient slot (gstash instead). */
static size_t mpar__block_act_row(const mpar__vstage* v, int b) {
    int f = v->block_first[b], e = v->block_first[b + 1];
    return v->act_cum[mpar__act_end(v, b)] - v->act_cum[f] + v->stash_cum[e] - v->stash_cum[f];
}
static size_t mpar__block_acts_row(const mpar__vstage* v, int b) { /* the activations alone */
    return v->act_cum[mpar__act_end(v, b)] - v->act_cum[v->block_first[b]];
}
/* Floats of block b of one activation slot (bf16: activations packed two
   to a float, then the stashes). */
static size_t mpar__slot_block_floats(const mpar__vstage* v, int b, size_t rows) {
    size_t acts = rows * mpar__block_acts_row(v, b);
    if (!v->act16) return rows * mpar__block_act_row(v, b);
    return mpar__bf16_floats(acts) + (rows * mpar__block_act_row(v, b) - acts);
}
static size_t mpar__block_grad_row(const mpar__vstage* v, int b) {
    int f = v->block_first[b], e = v->block_first[b + 1];
    return v->act_cum[mpar__act_end(v, b)] - v->act_cum[f] + v->gstash_cum[e] - v->gstash_cum[f];
}

static void mpar__vstage_layout_free(mpar_context* ctx, mpar__vstage* v) {
    mpar__free(ctx, v->gstash_cum), mpar__free(ctx, v->stash_cum), mpar__free(ctx, v->act_cum);
    mpar__free(ctx, v->param_off), mpar__free(ctx, v->block_first), mpar__free(ctx, v->block_of);
    mpar__free(ctx, v->part_first);
    v->gstash_cum = v->stash_cum = v->act_cum = v->param_off = v->part_first = NULL;
    v->block_first = v->block_of = NULL;
}

/* The layout of chunk v (first, last, n, index, device set): cumulative
   per-layer sizes, and its layers cut into blocks whose every buffer
   (parameters, a slot's part, a gradient slot's part) stays within
   `limit` bytes (0: no limit), greedily in layer order. Checks every size
   for overflow. Used alike by the executor and by mpar_pipeline_memory. */
static mpar_result mpar__vstage_layout(mpar_context* ctx, const mpar_model* model, const mpar__mem_opts* o,
                                       uint64_t limit, mpar__vstage* v) {
    int k, b, first;
    size_t n = (size_t)v->n, rows = o->rows, chunks = 0;
    const mpar_layer* last = mpar_model_layer(model, v->last);
    double widest;
    v->param_off = (size_t*)mpar__alloc(ctx, sizeof(size_t) * (n + 1));
    v->act_cum = (size_t*)mpar__alloc(ctx, sizeof(size_t) * (n + 2));
    v->stash_cum = (size_t*)mpar__alloc(ctx, sizeof(size_t) * (n + 1));
    v->gstash_cum = (size_t*)mpar__alloc(ctx, sizeof(size_t) * (n + 1));
    v->block_first = (int*)mpar__alloc(ctx, sizeof(int) * (n + 1));
    v->block_of = (int*)mpar__alloc(ctx, sizeof(int) * (n + 1));
    v->part_first = (size_t*)mpar__alloc(ctx, sizeof(size_t) * (n + 1));
    if (!v->param_off || !v->act_cum || !v->stash_cum || !v->gstash_cum || !v->block_first || !v->block_of ||
        !v->part_first)
        return mpar__fail(ctx, MPAR_ERROR_OUT_OF_HOST_MEMORY, "out of host memory");
    v->param_off[0] = v->act_cum[0] = v->stash_cum[0] = v->gstash_cum[0] = 0;
    v->scratch_per_row = 0;
    for (k = 0; k < v->n; k++) {
        const mpar_layer* l = mpar_model_layer(model, v->first + k);
        if (!mpar__size_add(v->param_off[k], l->param_count, &v->param_off[k + 1]) ||
            !mpar__size_add(v->act_cum[k], (size_t)l->in_features, &v->act_cum[k + 1]) ||
            !mpar__size_add(v->stash_cum[k], l->stash_per_row, &v->stash_cum[k + 1]) ||
            !mpar__size_add(v->gstash_cum[k], l->gstash_per_row, &v->gstash_cum[k + 1]))
            return mpar__fail(ctx, MPAR_ERROR_INVALID_MODEL,
                              "stage %d (layers %d-%d): the parameter count or a per-row size overflows size_t at "
                              "layer %d (%s, %zu parameters)", v->index, v->first, v->last, v->first + k,
                              l->type->name, l->param_count);
        if (l->scratch_per_row > v->scratch_per_row) v->scratch_per_row = l->scratch_per_row;
    }
    /* every buffer is rows x (floats per row); so are the offsets into it */
    widest = (double)v->act_cum[n] + (double)last->out_features +
             (double)(v->stash_cum[n] > v->gstash_cum[n] ? v->stash_cum[n] : v->gstash_cum[n]);
    if ((double)v->scratch_per_row > widest) widest = (double)v->scratch_per_row;
    if (!mpar__size_add(v->act_cum[n], (size_t)last->out_features, &v->act_cum[n + 1]) ||
        (double)rows * widest * 4.0 >= (double)SIZE_MAX || (double)v->param_off[n] * 4.0 >= (double)SIZE_MAX)
        return mpar__fail(ctx, MPAR_ERROR_INVALID_MODEL,
                          "stage %d (layers %d-%d): %zu rows per micro-batch x %.6g floats per row (activations, "
                          "gradients or scratch) overflow size_t", v->index, v->first, v->last, rows, widest);
    /* blocks, greedily: a layer joins the open block while all its buffers fit */
    v->blocks = 0, first = 0;
    for (k = 0; k < v->n; k++) {
        int tries;
        for (tries = 0; tries < 2; tries++) {
            double par, act, grad, most;
            v->block_first[v->blocks] = first, v->block_first[v->blocks + 1] = k + 1;
            b = v->blocks; /* measured as if it were the last block when k is the last layer */
            v->blocks += k + 1 == v->n; /* mpar__act_end: the output belongs to the last block */
            par = (double)(v->param_off[k + 1] - v->param_off[first]);
            act = (double)rows * (double)mpar__block_act_row(v, b);
            grad = o->infer ? 0.0 : (double)rows * (double)mpar__block_grad_row(v, b);
            v->blocks -= k + 1 == v->n;
            most = 4.0 * (par > act ? (par > grad ? par : grad) : (act > grad ? act : grad));
            if (!limit || most <= (double)limit) break;
            if (first == k) {
                const mpar_layer* l = mpar_model_layer(model, v->first + k);
                return mpar__fail(ctx, MPAR_ERROR_DOES_NOT_FIT,
                                  "stage %d: layer %d (%s) alone needs a buffer of %.0f bytes (%s) but device %d allows "
                                  "at most %llu in one buffer", v->index, v->first + k, l->type->name, most,
                                  most == 4.0 * par ? "its parameters" : most == 4.0 * act ? "its activations and stash"
                                                                                          : "its gradients",
                                  v->device, (unsigned long long)limit);
            }
            v->blocks++, first = k; /* close the block before layer k */
        }
    }
    v->blocks++;
    v->block_first[v->blocks] = v->n;
    for (b = 0; b < v->blocks; b++) {
        v->part_first[b] = chunks;
        for (k = v->block_first[b]; k < v->block_first[b + 1]; k++) {
            v->block_of[k] = b;
            chunks += (v->param_off[k + 1] - v->param_off[k] + 4095) / 4096;
        }
    }
    v->part_first[v->blocks] = v->partial_count = chunks;
    v->block_of[v->n] = v->blocks - 1;
    return MPAR_SUCCESS;
}

/* The buffers of one chunk, in bytes: what mpar__vstage_buffers allocates
   (a buffer of no floats takes one). */
static uint64_t mpar__at_least_one(uint64_t floats) { return floats ? floats : 1u; }
static uint64_t mpar__vstage_bytes(const mpar__vstage* v, const mpar__mem_opts* o, int slots) {
    uint64_t f = 0, rows = o->rows, gslots = o->split ? (uint64_t)slots : 1;
    int b;
    if (v->recompute) f += (uint64_t)slots * mpar__at_least_one(rows * v->act_cum[1]);
    for (b = 0; b < v->blocks; b++) {
        uint64_t pb = mpar__block_params(v, b), act = mpar__at_least_one(rows * mpar__block_act_row(v, b));
        uint64_t slot = mpar__at_least_one(mpar__slot_block_floats(v, b, (size_t)rows));
        f += v->recompute ? act : v->act16 ? (uint64_t)slots * slot + act : (uint64_t)slots * act;
        f += mpar__at_least_one(pb);
        if (!o->infer)
            f += gslots * mpar__at_least_one(rows * mpar__block_grad_row(v, b)) + 2 * mpar__at_least_one(pb) + (o->adamw ? mpar__at_least_one(pb) : 1);
    }
    f += mpar__at_least_one(rows * v->scratch_per_row) +
         mpar__at_least_one(rows * (uint64_t)slots * v->target_width) + 1; /* scratch, targets, losses */
    if (v->link16_in) f += mpar__at_least_one(mpar__bf16_floats((size_t)rows * v->act_cum[1]));
    if (v->link16_out) f += mpar__at_least_one(mpar__bf16_floats((size_t)rows * mpar__out_width(v)));
    if (!o->infer) f += (uint64_t)v->n + mpar__at_least_one(v->partial_count) + 4 * ((uint64_t)v->n + (uint64_t)v->blocks);
    return 4 * f;
}

static mpar_result mpar__vstage_buffers(mpar_pipeline* p, mpar__vstage* v, const mpar__mem_opts* o, int slots) {
    mpar__worker* w = &p->workers[v->worker];
    size_t rows = o->rows;
    int s, b, B = v->blocks;
    /* every handle array zeroed as it is made: after a failure
       mpar__vstage_release frees what exists */
    v->slot_count = slots;
    v->grad_slot_count = o->infer ? 0 : o->split ? slots : 1;
    v->act_slots = (cl_mem*)mpar__alloc_zeroed(p->ctx, sizeof(cl_mem) * (size_t)slots * (size_t)B);
    v->grad_slots = (cl_mem*)mpar__alloc_zeroed(p->ctx, sizeof(cl_mem) * ((size_t)v->grad_slot_count * (size_t)B + 1));
    v->slot_mb = (int*)mpar__alloc(p->ctx, sizeof(int) * (size_t)slots);
    v->params = (cl_mem*)mpar__alloc_zeroed(p->ctx, sizeof(cl_mem) * (size_t)B);
    if (!v->act_slots || !v->grad_slots || !v->slot_mb || !v->params)
        return mpar__fail(p->ctx, MPAR_ERROR_OUT_OF_HOST_MEMORY, "out of host memory");
    for (s = 0; s < slots; s++) {
        v->slot_mb[s] = -1;
        if (v->recompute) MPAR__TRY(mpar__alloc_buffer(p, w, rows * v->act_cum[1], &v->act_slots[s]));
        for (b = 0; b < B; b++) {
            if (!v->recompute)
                MPAR__TRY(mpar__alloc_buffer(p, w, mpar__slot_block_floats(v, b, rows), &v->act_slots[s * B + b]));
            if (s < v->grad_slot_count)
                MPAR__TRY(mpar__alloc_buffer(p, w, rows * mpar__block_grad_row(v, b), &v->grad_slots[s * B + b]));
        }
    }
    if (v->recompute || v->act16) {
        v->work = (cl_mem*)mpar__alloc_zeroed(p->ctx, sizeof(cl_mem) * (size_t)B);
        if (!v->work) return mpar__fail(p->ctx, MPAR_ERROR_OUT_OF_HOST_MEMORY, "out of host memory");
        for (b = 0; b < B; b++) MPAR__TRY(mpar__alloc_buffer(p, w, rows * mpar__block_act_row(v, b), &v->work[b]));
    }
    for (b = 0; b < B; b++) MPAR__TRY(mpar__alloc_buffer(p, w, mpar__block_params(v, b), &v->params[b]));
    if (!o->infer) {
        cl_ulong* seg;
        mpar_result r = MPAR_SUCCESS;
        v->grads = (cl_mem*)mpar__alloc_zeroed(p->ctx, sizeof(cl_mem) * (size_t)B);
        v->opt1 = (cl_mem*)mpar__alloc_zeroed(p->ctx, sizeof(cl_mem) * (size_t)B);
        v->opt2 = (cl_mem*)mpar__alloc_zeroed(p->ctx, sizeof(cl_mem) * (size_t)B);
        if (!v->grads || !v->opt1 || !v->opt2) return mpar__fail(p->ctx, MPAR_ERROR_OUT_OF_HOST_MEMORY, "out of host memory");
        for (b = 0; b < B; b++) {
            size_t pb = mpar__block_params(v, b);
            MPAR__TRY(mpar__alloc_buffer(p, w, pb, &v->grads[b]));
            MPAR__TRY(mpar__alloc_buffer(p, w, pb, &v->opt1[b]));
            MPAR__TRY(mpar__alloc_buffer(p, w, o->adamw ? pb : 1, &v->opt2[b]));
        }
        MPAR__TRY(mpar__alloc_buffer(p, w, (size_t)v->n, &v->norms));
        MPAR__TRY(mpar__alloc_buffer(p, w, v->partial_count, &v->partial));
        v->norm_tables = (cl_mem*)mpar__alloc_zeroed(p->ctx, sizeof(cl_mem) * (size_t)B);
        if (!v->norm_tables) return mpar__fail(p->ctx, MPAR_ERROR_OUT_OF_HOST_MEMORY, "out of host memory");
        /* per block: its layers' offsets in its grads buffer, then the first
           gradient-norm chunk of each, counted from the block's first */
        seg = (cl_ulong*)mpar__alloc(p->ctx, sizeof(cl_ulong) * 2 * ((size_t)v->n + 1));
        if (!seg) return mpar__fail(p->ctx, MPAR_ERROR_OUT_OF_HOST_MEMORY, "out of host memory");
        for (b = 0; r == MPAR_SUCCESS && b < B; b++) {
            int f = v->block_first[b], nb = v->block_first[b + 1] - f, j;
            size_t chunks = 0;
            for (j = 0; j <= nb; j++) {
                seg[j] = (cl_ulong)(v->param_off[f + j] - v->param_off[f]);
                seg[nb + 1 + j] = (cl_ulong)chunks;
                if (j < nb) chunks += (v->param_off[f + j + 1] - v->param_off[f + j] + 4095) / 4096;
            }
            r = mpar__alloc_buffer(p, w, 4 * ((size_t)nb + 1), &v->norm_tables[b]); /* 2(n_b+1) cl_ulong */
            if (r == MPAR_SUCCESS)
                r = mpar__exec_transfer(&w->ex, mpar__buf0(v->norm_tables[b]), seg,
                                        sizeof(cl_ulong) * 2 * ((size_t)nb + 1), 1);
        }
        mpar__free(p->ctx, seg);
        if (r != MPAR_SUCCESS) return r;
    }
    MPAR__TRY(mpar__alloc_buffer(p, w, rows * v->scratch_per_row, &v->scratch));
    MPAR__TRY(mpar__alloc_buffer(p, w, rows * (size_t)slots * v->target_width, &v->targets));
    MPAR__TRY(mpar__alloc_buffer(p, w, 1, &v->losses));
    if (v->link16_in) MPAR__TRY(mpar__alloc_buffer(p, w, mpar__bf16_floats(rows * v->act_cum[1]), &v->in16));
    if (v->link16_out) MPAR__TRY(mpar__alloc_buffer(p, w, mpar__bf16_floats(rows * mpar__out_width(v)), &v->out16));
    return MPAR_SUCCESS;
}

/* Initial parameters and zeroed optimizer state, on the device. */
static mpar_result mpar__vstage_init(mpar_pipeline* p, mpar__vstage* v) {
    mpar__worker* w = &p->workers[v->worker];
    int k, b;
    for (b = 0; !p->desc.inference_only && b < v->blocks; b++) {
        size_t n = mpar__block_params(v, b);
        MPAR__TRY(mpar__zero(w, v->opt1[b], n));
        if (p->desc.optimizer.kind == MPAR_OPTIMIZER_ADAMW) MPAR__TRY(mpar__zero(w, v->opt2[b], n));
        MPAR__TRY(mpar__zero(w, v->grads[b], n));
    }
    for (k = 0; k < v->n; k++) {
        mpar_buf at = mpar__state(v, v->params, k);
        size_t n = v->param_off[k + 1] - v->param_off[k];
        float* host;
        mpar_error err;
        if (n == 0) continue;
        host = (float*)mpar__alloc(p->ctx, n * sizeof(float));
        if (!host) return mpar__fail(p->ctx, MPAR_ERROR_OUT_OF_HOST_MEMORY, "out of host memory");
        if (mpar__model_init_params(p->model, v->first + k, host, &err) != MPAR_SUCCESS ||
            mpar__upload(w, at.mem, at.off, host, n) != MPAR_SUCCESS) {
            mpar__free(p->ctx, host);
            return mpar__fail(p->ctx, MPAR_ERROR_INVALID_MODEL, "cannot initialise layer %d", v->first + k);
        }
        mpar__free(p->ctx, host);
    }
    MPAR__CL(p->ctx, clFinish(w->ex.queue));
    return MPAR_SUCCESS;
}


/* A worker's queue for outgoing asynchronous copies, made on first use. */
static mpar_result mpar__copy_queue(mpar_pipeline* p, mpar__worker* w) {
    cl_int st = CL_SUCCESS;
    if (w->copy_queue) return MPAR_SUCCESS;
    w->copy_queue = clCreateCommandQueue(p->ctx->groups[p->ctx->devices[w->device].info.group],
                                         p->ctx->devices[w->device].id, 0, &st);
    return mpar__cl_check(p->ctx, st, "clCreateCommandQueue (copy queue)", __FILE__, __LINE__);
}

/* The transport of a link between two local devices: the user's choice,
   else asynchronous copies between two non-CPU devices (GPUs), else the
   measured PoCL choice: through host memory when either end is a CPU
   device (CPU devices live in host memory, and PoCL serialises a buffer
   shared by two of its devices). */
static mpar_link_mode mpar__link_mode_for(mpar_link_mode asked, const mpar_device_info* a, const mpar_device_info* b) {
    if (asked != MPAR_LINK_AUTO) return asked;
    return a->type != MPAR_DEVICE_CPU && b->type != MPAR_DEVICE_CPU ? MPAR_LINK_ASYNC : MPAR_LINK_HOST_STAGED;
}

static mpar_result mpar__pick_transport(mpar_pipeline* p, mpar__link* l, const mpar__device* a, const mpar__device* b,
                                        int from_device, int to_device) {
    mpar_link_mode m = mpar__link_mode_for(p->desc.link_mode, &a->info, &b->info);
    if (m == MPAR_LINK_DEVICE_COPY && a->info.group != b->info.group)
        return mpar__fail(p->ctx, MPAR_ERROR_INVALID_ARGUMENT, "link_mode DEVICE_COPY: devices %d and %d do not "
                          "share a cl_context (use ASYNC or HOST_STAGED)", from_device, to_device);
    l->t = m == MPAR_LINK_DEVICE_COPY ? &mpar__transport_device_copy
         : m == MPAR_LINK_ASYNC ? &mpar__transport_async : &mpar__transport_host_staged;
    l->cross = m == MPAR_LINK_ASYNC && a->info.group != b->info.group;
    return MPAR_SUCCESS;
}

static mpar_result mpar__link_init(mpar_pipeline* p, mpar__link* l, const mpar__vstage* from, const mpar__vstage* to,
                                   size_t floats, int capacity) {
    memset(l, 0, sizeof *l);
    pthread_mutex_init(&l->mu, NULL);
    pthread_cond_init(&l->cv, NULL);
    l->from_worker = from->worker, l->to_worker = to->worker;
    l->sender_local = mpar__local(p, from->worker);
    l->receiver_local = mpar__local(p, to->worker);
    l->peer = l->sender_local ? p->stage_rank[to->worker] : p->stage_rank[from->worker];
    l->timeout = p->desc.timeout_seconds;
    l->slot_floats = floats;
    l->capacity = capacity;
    l->t = &mpar__transport_host_staged;
    if (!l->sender_local && !l->receiver_local) return MPAR_SUCCESS; /* between two other processes */
    if (l->sender_local && l->receiver_local) {
        MPAR__TRY(mpar__pick_transport(p, l, &p->ctx->devices[from->device], &p->ctx->devices[to->device],
                                       from->device, to->device));
    } else {
#ifdef MPAR_USE_MPI
        l->t = &mpar__transport_mpi;
#endif
    }
    return l->t->init(p, l, from, to);
}

static mpar_result mpar__link_init_buffers(mpar_pipeline* p, mpar__link* l, const mpar__vstage* from,
                                           const mpar__vstage* to) {
    int s, capacity = l->capacity;
    size_t floats = l->slot_floats;
    /* each array zeroed as soon as it is made: a failure below leaves the
       link for mpar__link_release_buffers, which frees what exists */
    l->tags = (int*)mpar__alloc_zeroed(p->ctx, sizeof(int) * (size_t)capacity);
    l->dev = (cl_mem*)mpar__alloc_zeroed(p->ctx, sizeof(cl_mem) * (size_t)capacity);
    l->pin = (cl_mem*)mpar__alloc_zeroed(p->ctx, sizeof(cl_mem) * (size_t)capacity);
    l->host = (float**)mpar__alloc_zeroed(p->ctx, sizeof(float*) * (size_t)capacity);
    l->ready = (cl_event*)mpar__alloc_zeroed(p->ctx, sizeof(cl_event) * (size_t)capacity);
    l->freed = (cl_event*)mpar__alloc_zeroed(p->ctx, sizeof(cl_event) * (size_t)capacity);
    l->pending = (int*)mpar__alloc_zeroed(p->ctx, sizeof(int) * (size_t)capacity);
    if (!l->tags || !l->dev || !l->pin || !l->host || !l->ready || !l->freed || !l->pending)
        return mpar__fail(p->ctx, MPAR_ERROR_OUT_OF_HOST_MEMORY, "out of host memory");
#ifdef MPAR_USE_MPI
    if (!(l->sender_local && l->receiver_local)) {
        if (floats > INT_MAX) /* MPI_Isend / MPI_Irecv count in int */
            return mpar__fail(p->ctx, MPAR_ERROR_UNSUPPORTED,
                              "the link after layer %d carries %zu floats per micro-batch; between processes MPI "
                              "takes at most INT_MAX: use more micro-batches",
                              from->last < to->last ? from->last : to->last, floats);
        l->requests = mpar__alloc(p->ctx, sizeof(MPI_Request) * (size_t)capacity);
        if (!l->requests) return mpar__fail(p->ctx, MPAR_ERROR_OUT_OF_HOST_MEMORY, "out of host memory");
    }
#endif
    if (l->t->mode == MPAR_LINK_ASYNC) MPAR__TRY(mpar__copy_queue(p, &p->workers[from->worker]));
#ifdef MPAR_TEST_DEFER_COPIES
    if (l->t->mode == MPAR_LINK_ASYNC && l->cross) {
        l->late = (struct mpar__late*)mpar__alloc(p->ctx, sizeof *l->late * (size_t)capacity);
        if (!l->late) return mpar__fail(p->ctx, MPAR_ERROR_OUT_OF_HOST_MEMORY, "out of host memory");
        memset(l->late, 0, sizeof *l->late * (size_t)capacity);
        {
            mpar__worker* w = &p->workers[from->worker];
            cl_int st = CL_SUCCESS;
            l->late_queue = clCreateCommandQueue(p->ctx->groups[p->ctx->devices[w->device].info.group],
                                                 p->ctx->devices[w->device].id, 0, &st);
            MPAR__CL(p->ctx, st);
        }
    }
#endif
    for (s = 0; s < capacity; s++) {
        if (l->t->mode == MPAR_LINK_ASYNC && l->cross) {
            mpar__worker* w = &p->workers[from->worker];
            cl_context c = p->ctx->groups[p->ctx->devices[w->device].info.group];
            cl_int st = CL_SUCCESS;
            void* h;
            l->pin[s] = clCreateBuffer(c, CL_MEM_ALLOC_HOST_PTR, floats ? floats * 4 : 4, NULL, &st);
            MPAR__CL(p->ctx, st);
            h = clEnqueueMapBuffer(w->copy_queue, l->pin[s], CL_TRUE, CL_MAP_READ | CL_MAP_WRITE, 0,
                                   floats ? floats * 4 : 4, 0, NULL, NULL, &st);
            MPAR__CL(p->ctx, st);
            l->host[s] = (float*)h;
        } else if (l->t->mode == MPAR_LINK_DEVICE_COPY || l->t->mode == MPAR_LINK_ASYNC) {
            MPAR__TRY(mpar__alloc_buffer(p, &p->workers[to->worker], floats, &l->dev[s]));
        } else if (!(l->host[s] = (float*)mpar__alloc(p->ctx, floats * sizeof(float) + 64))) {
            return mpar__fail(p->ctx, MPAR_ERROR_OUT_OF_HOST_MEMORY, "out of host memory");
        }
    }
    return MPAR_SUCCESS;
}

static void mpar__link_release_buffers(mpar_pipeline* p, mpar__link* l) {
    int s;
#ifdef MPAR_USE_MPI
    for (s = 0; l->requests && s < l->capacity; s++) /* sends still in flight finish on their own */
        if (l->pending[s]) MPI_Request_free(&((MPI_Request*)l->requests)[s]);
    mpar__free(p->ctx, l->requests);
#endif
    if (l->ready && l->freed) mpar__async_abort(l);
    for (s = l->capacity - 1; s >= 0; s--) {
        if (l->dev && l->dev[s]) clReleaseMemObject(l->dev[s]);
        if (l->pin && l->pin[s]) {
            mpar__worker* w = &p->workers[l->from_worker];
            if (l->host[s] && w->copy_queue) {
                clEnqueueUnmapMemObject(w->copy_queue, l->pin[s], l->host[s], 0, NULL, NULL);
                clFinish(w->copy_queue);
            }
            clReleaseMemObject(l->pin[s]);
        } else if (l->host) {
            mpar__free(p->ctx, l->host[s]);
        }
    }
    mpar__free(p->ctx, l->tags), mpar__free(p->ctx, l->dev), mpar__free(p->ctx, l->pin);
    mpar__free(p->ctx, l->host), mpar__free(p->ctx, l->ready), mpar__free(p->ctx, l->freed);
    mpar__free(p->ctx, l->pending);
#ifdef MPAR_TEST_DEFER_COPIES
    mpar__free(p->ctx, l->late);
    if (l->late_queue) clReleaseCommandQueue(l->late_queue);
#endif
}

static void mpar__link_release(mpar_pipeline* p, mpar__link* l) {
    if (l->t) l->t->release(p, l);
    pthread_cond_destroy(&l->cv);
    pthread_mutex_destroy(&l->mu);
}

static void mpar__release_mems(mpar_pipeline* p, cl_mem** mems, size_t count) {
    size_t i;
    for (i = count; *mems && i > 0; i--)
        if ((*mems)[i - 1]) clReleaseMemObject((*mems)[i - 1]);
    mpar__free(p->ctx, *mems);
    *mems = NULL;
}

static void mpar__vstage_release(mpar_pipeline* p, mpar__vstage* v) {
    cl_mem* one[] = {&v->losses, &v->targets, &v->partial, &v->norms, &v->scratch, &v->in16, &v->out16};
    size_t i, B = (size_t)v->blocks;
    for (i = 0; i < sizeof one / sizeof one[0]; i++)
        if (*one[i]) clReleaseMemObject(*one[i]);
    mpar__release_mems(p, &v->norm_tables, B);
    mpar__release_mems(p, &v->opt2, B), mpar__release_mems(p, &v->opt1, B), mpar__release_mems(p, &v->grads, B);
    mpar__release_mems(p, &v->params, B), mpar__release_mems(p, &v->work, B);
    mpar__release_mems(p, &v->grad_slots, (size_t)v->grad_slot_count * B);
    mpar__release_mems(p, &v->act_slots, (size_t)v->slot_count * (v->recompute ? 1 : B));
    mpar__free(p->ctx, v->slot_mb);
    mpar__vstage_layout_free(p->ctx, v);
}

/* Everything a pipeline holds but the object itself, its plan and its
   re-balancing state: what a re-balancing move rebuilds. */
static void mpar__pipeline_release(mpar_pipeline* p) {
    int i;
    pthread_mutex_lock(&p->mu);
    p->quit = 1;
    pthread_cond_broadcast(&p->start_cv);
    pthread_mutex_unlock(&p->mu);
    for (i = p->workers_count - 1; i >= 0; i--)
        if (p->workers[i].started) pthread_join(p->workers[i].thread, NULL);
    if (p->links)
        for (i = 0; i < p->vs_count - 1; i++) {
            if (2 * i < p->links_ready) mpar__link_release(p, &p->links[i]);
            if (2 * i + 1 < p->links_ready) mpar__link_release(p, &p->links[p->vs_count - 1 + i]);
        }
    mpar__gen_release(p);
    if (p->vs)
        for (i = p->vs_count - 1; i >= 0; i--) mpar__vstage_release(p, &p->vs[i]);
#ifdef MPAR_USE_MPI
    /* an agreement still in flight may yet be written by MPI: after a short
       wait, it and the communicator are left to MPI (a rank stopped or gone) */
    if (p->agree && mpar__mpi_settle_quiet(p, fmin(p->desc.timeout_seconds, MPAR__MPI_GRACE_S)) != MPAR_SUCCESS)
        p->comm_owned = 0;
    if (p->comm_owned) MPI_Comm_free(&p->comm);
    p->comm_owned = 0;
#endif
    for (i = p->workers_count - 1; i >= 0; i--) {
        mpar__free(p->ctx, p->workers[i].events);
        mpar__free(p->ctx, p->workers[i].pending);
        mpar__exec_release(&p->workers[i].ex);
        if (p->workers[i].copy_queue) clReleaseCommandQueue(p->workers[i].copy_queue);

        if (p->workers[i].ex.queue) clReleaseCommandQueue(p->workers[i].ex.queue);
    }
    mpar_schedule_destroy(p->schedule);
    mpar_schedule_destroy(p->infer_schedule);
    mpar_schedule_destroy(p->replaced_schedule);
    mpar__free(p->ctx, p->links), mpar__free(p->ctx, p->vs), mpar__free(p->ctx, p->layer_sumsq);
    mpar__free(p->ctx, p->mb_loss), mpar__free(p->ctx, p->mb_first);
    pthread_cond_destroy(&p->done_cv), pthread_cond_destroy(&p->start_cv), pthread_cond_destroy(&p->opt_cv);
    pthread_mutex_destroy(&p->mu);
}

static void mpar__rebalance_free(mpar_pipeline* p);

/* Everything a pipeline holds; keep: all but the struct, which becomes a
   tombstone on its context's list (freed with the context). The model's
   reference goes last: the workers used its layers. */
static void mpar__pipeline_free(mpar_pipeline* p, int keep) {
    const mpar_model* model = p->model;
    mpar__pipeline_release(p);
    mpar__rebalance_free(p);
    if (p->guard) {
        pthread_mutex_destroy(&p->guard->mu);
        mpar__free(p->ctx, p->guard);
        p->guard = NULL;
    }
    if (!keep) {
        mpar__free(p->ctx, p);
    } else {
        p->model = NULL;
        pthread_mutex_lock(&p->ctx->lock);
        p->tomb_next = p->ctx->tombstones;
        p->ctx->tombstones = p;
        pthread_mutex_unlock(&p->ctx->lock);
    }
    if (model) mpar__model_release(model);
}

/* A pipeline's public calls start here: live, or why not (a destroyed
   one is only told apart from freed memory under MPAR_DEBUG). */
static mpar_result mpar__pipeline_check(const mpar_pipeline* p, const char* call) {
    if (!p) return MPAR_ERROR_INVALID_ARGUMENT;
    if (p->live == MPAR__LIVE_PIPELINE) return MPAR_SUCCESS;
    if (p->live == MPAR__DEAD) return mpar__fail(p->ctx, MPAR_ERROR_INVALID_STATE, "%s: the pipeline was destroyed", call);
    return MPAR_ERROR_INVALID_ARGUMENT; /* not a pipeline */
}

MPARDEF void mpar_pipeline_destroy(mpar_pipeline* p) {
    if (!p) return;
    if (p->live != MPAR__LIVE_PIPELINE) { /* a second destroy: nothing done, said through the context */
        mpar__pipeline_check(p, "mpar_pipeline_destroy");
        return;
    }
    p->live = MPAR__DEAD;
#ifdef MPAR_DEBUG
    mpar__pipeline_free(p, 1);
#else
    mpar__pipeline_free(p, 0);
#endif
}

/* The descriptor's activation_type is one of the enum's (create and the
   planner). */
static mpar_result mpar__check_activation_type(mpar_context* ctx, const mpar_pipeline_desc* d) {
    if ((int)d->activation_type < 0 || d->activation_type > MPAR_ACTIVATIONS_AUTO)
        return mpar__fail(ctx, MPAR_ERROR_INVALID_ARGUMENT,
                          "activation_type %d: give MPAR_ACTIVATIONS_FP32 (0), BF16 (1) or AUTO (2)",
                          (int)d->activation_type);
    return MPAR_SUCCESS;
}

/* Every optimizer setting in its range (defaults already applied): a NaN
   or an infinity would turn every parameter into NaN on the first step. */
static mpar_result mpar__check_optimizer(mpar_context* ctx, const mpar_optimizer_desc* o) {
    static const char* names[7] = {"lr", "momentum", "beta1", "beta2", "eps", "weight_decay", "clip_norm"};
    static const char* ranges[7] = {"a finite value > 0 (0: 1e-3)", "from 0 to below 1", "from 0 to below 1 (0: 0.9)",
                                    "from 0 to below 1 (0: 0.999)", "a finite value > 0 (0: 1e-8)",
                                    "a finite value >= 0", "a finite value >= 0 (0: off)"};
    float v[7];
    int ok[7], i;
    if ((int)o->kind < 0 || o->kind > MPAR_OPTIMIZER_SGD)
        return mpar__fail(ctx, MPAR_ERROR_INVALID_ARGUMENT, "optimizer.kind: unknown value %d", (int)o->kind);
    v[0] = o->lr, v[1] = o->momentum, v[2] = o->beta1, v[3] = o->beta2, v[4] = o->eps, v[5] = o->weight_decay;
    v[6] = o->clip_norm;
    ok[0] = v[0] > 0.0f && v[0] <= 1e30f, ok[1] = v[1] >= 0.0f && v[1] < 1.0f, ok[2] = v[2] >= 0.0f && v[2] < 1.0f;
    ok[3] = v[3] >= 0.0f && v[3] < 1.0f, ok[4] = v[4] > 0.0f && v[4] <= 1e30f, ok[5] = v[5] >= 0.0f && v[5] <= 1e30f;
    ok[6] = v[6] >= 0.0f && v[6] <= 1e30f;
    for (i = 0; i < 7; i++)
        if (!ok[i])
            return mpar__fail(ctx, MPAR_ERROR_INVALID_ARGUMENT, "optimizer.%s is %g; give %s", names[i], (double)v[i],
                              ranges[i]);
    if (!(o->min_lr >= 0.0f && o->min_lr <= o->lr))
        return mpar__fail(ctx, MPAR_ERROR_INVALID_ARGUMENT, "optimizer.min_lr is %g; give a value from 0 to lr (%g)",
                          (double)o->min_lr, (double)o->lr);
    if (o->warmup_steps < 0 || o->decay_steps < 0)
        return mpar__fail(ctx, MPAR_ERROR_INVALID_ARGUMENT, "optimizer.warmup_steps (%d) and decay_steps (%d) must not "
                          "be negative", o->warmup_steps, o->decay_steps);
    return MPAR_SUCCESS;
}

/* desc.rebalance and its knobs: checked, defaults filled. */
static mpar_result mpar__rebalance_defaults(mpar_context* ctx, mpar_pipeline_desc* d) {
    if (d->rebalance < 0 || d->rebalance > MPAR_REBALANCE_MANUAL)
        return mpar__fail(ctx, MPAR_ERROR_INVALID_ARGUMENT, "rebalance %d: give 0 (off), MPAR_REBALANCE_AUTO (1) or "
                          "MPAR_REBALANCE_MANUAL (2)", d->rebalance);
    if (!(d->rebalance_threshold >= 0.0 && d->rebalance_threshold < 1.0)) /* NaN too */
        return mpar__fail(ctx, MPAR_ERROR_INVALID_ARGUMENT, "rebalance_threshold %g: give the fraction of the "
                          "predicted step time a move must save, in [0, 1) (0: 0.05)", d->rebalance_threshold);
    if (d->rebalance_warmup < 0 || d->rebalance_warmup > (1 << 20))
        return mpar__fail(ctx, MPAR_ERROR_INVALID_ARGUMENT, "rebalance_warmup %d: give 0 to 2^20 steps (0: 3)",
                          d->rebalance_warmup);
    if (d->rebalance && d->mpi_comm)
        return mpar__fail(ctx, MPAR_ERROR_UNSUPPORTED, "rebalance with mpi_comm: a move would carry stages' state "
                          "between processes, which mpar does not do; re-plan and restart from a checkpoint instead");
    if (d->rebalance && d->inference_only)
        return mpar__fail(ctx, MPAR_ERROR_UNSUPPORTED, "rebalance with inference_only: re-balancing measures "
                          "training steps; plan an inference pipeline with mpar_pipeline_plan");
    if (d->rebalance_warmup == 0) d->rebalance_warmup = 3;
    if (d->rebalance_threshold == 0.0) d->rebalance_threshold = 0.05;
    return MPAR_SUCCESS;
}

static mpar_result mpar__pipeline_defaults(mpar_pipeline* p, const mpar_pipeline_desc* desc) {
    mpar_pipeline_desc* d = &p->desc;
    mpar_optimizer_desc* o = &d->optimizer;
    mpar_error err;
    *d = *desc;
    if (!d->stages && d->stage_count != 0) /* else the count is dropped and mpar plans the stages itself */
        return mpar__fail(p->ctx, MPAR_ERROR_INVALID_ARGUMENT, "mpar_pipeline_desc.stages is NULL but stage_count is "
                          "%d: give the stages, or stage_count 0 to have them planned", d->stage_count);
    if (d->schedule_lists) { /* the schedule given is the truth */
        if (mpar_schedule_validate(d->schedule_lists, &err) != MPAR_SUCCESS)
            return mpar__fail(p->ctx, err.code, "schedule_lists: %s", err.message);
        if (d->schedule_lists->forward_only)
            return mpar__fail(p->ctx, MPAR_ERROR_INVALID_SCHEDULE, "schedule_lists: a forward-only schedule cannot "
                              "train; the pipeline makes its own for mpar_pipeline_infer");
        d->microbatches = d->schedule_lists->microbatches;
        d->virtual_stages = d->schedule_lists->virtual_stages;
    }
    if (d->microbatches == 0) d->microbatches = 1;
    if (d->virtual_stages == 0 || d->virtual_stages == 1) d->virtual_stages = mpar__sched_kind_vstages(d->schedule, 1);
    if (d->timeout_seconds == 0) d->timeout_seconds = 600;
    if (!(d->timeout_seconds > 0 && d->timeout_seconds <= 1e7)) /* NaN or infinity: a wait without end */
        return mpar__fail(p->ctx, MPAR_ERROR_INVALID_ARGUMENT, "timeout_seconds is %g; give seconds from above 0 to "
                          "1e7 (0: 600)", d->timeout_seconds);
    if (d->max_run_ahead == 0) d->max_run_ahead = 4;
    if (o->lr == 0.0f) o->lr = 1e-3f;
    if (o->beta1 == 0.0f) o->beta1 = 0.9f;
    if (o->beta2 == 0.0f) o->beta2 = 0.999f;
    if (o->eps == 0.0f) o->eps = 1e-8f;
    if (mpar__model_validate(p->model, &err) != MPAR_SUCCESS) return mpar__fail(p->ctx, err.code, "%s", err.message);
    if (d->max_batch <= 0 || d->microbatches < 0 || d->virtual_stages < 0 || d->link_capacity < 0)
        return mpar__fail(p->ctx, MPAR_ERROR_INVALID_ARGUMENT, "max_batch must be positive (got %d); microbatches, "
                          "virtual_stages and link_capacity not negative", d->max_batch);
    if (d->max_batch > (1 << 24) / p->seq_len || d->microbatches > (1 << 20) || d->virtual_stages > 64)
        return mpar__fail(p->ctx, MPAR_ERROR_INVALID_ARGUMENT, "max_batch x seq_len must stay below 2^24 rows, "
                          "micro-batches below 2^20 and virtual_stages at most 64");
    if (d->microbatches > d->max_batch)
        return mpar__fail(p->ctx, MPAR_ERROR_INVALID_ARGUMENT, "%d micro-batches need max_batch >= %d (got %d)",
                          d->microbatches, d->microbatches, d->max_batch);
    if (d->max_run_ahead < 0 || d->max_run_ahead > 64)
        return mpar__fail(p->ctx, MPAR_ERROR_INVALID_ARGUMENT, "max_run_ahead %d: give 1 to 64 actions (0: 4)",
                          d->max_run_ahead);
    if ((int)d->link_mode < 0 || d->link_mode > MPAR_LINK_ASYNC)
        return mpar__fail(p->ctx, MPAR_ERROR_INVALID_ARGUMENT, "unknown link_mode %d", (int)d->link_mode);
    MPAR__TRY(mpar__check_activation_type(p->ctx, d));
    if (d->activation_type == MPAR_ACTIVATIONS_AUTO && d->mpi_comm)
        return mpar__fail(p->ctx, MPAR_ERROR_INVALID_ARGUMENT, "activation_type AUTO: each rank would choose by "
                          "its own devices; across processes give FP32 or BF16");
    MPAR__TRY(mpar__check_optimizer(p->ctx, o));
    return mpar__rebalance_defaults(p->ctx, d);
}

/* Which process runs which stage; one process unless an MPI communicator
   is given. */
static mpar_result mpar__setup_ranks(mpar_pipeline* p) {
    int i;
    p->rank = 0, p->ranks = 1;
#ifdef MPAR_USE_MPI
    p->mpi_polling = mpar__mpi_polling_default;
#endif
    if (p->desc.mpi_comm) {
#ifdef MPAR_USE_MPI
        int level = 0;
        MPI_Query_thread(&level);
        if (level < MPI_THREAD_MULTIPLE)
            return mpar__fail(p->ctx, MPAR_ERROR_UNSUPPORTED, "mpar's stage threads call MPI at once: initialise MPI "
                              "with MPI_Init_thread(..., MPI_THREAD_MULTIPLE, ...)");
        if (!p->desc.stages || p->desc.virtual_stages > 1)
            return mpar__fail(p->ctx, MPAR_ERROR_UNSUPPORTED, "pipelines across processes need explicit stages and "
                              "no interleaving");
        /* local calls: the communicator of our own (so that our tags never
           meet the application's) is made once every rank agreed
           (mpar__mpi_join) */
        if (MPI_Comm_rank(*(const MPI_Comm*)p->desc.mpi_comm, &p->rank) != MPI_SUCCESS ||
            MPI_Comm_size(*(const MPI_Comm*)p->desc.mpi_comm, &p->ranks) != MPI_SUCCESS)
            return mpar__fail(p->ctx, MPAR_ERROR_INVALID_ARGUMENT, "mpi_comm: MPI_Comm_rank or MPI_Comm_size failed");
        if (2 * p->vs_count * 1024 > 32767)
            return mpar__fail(p->ctx, MPAR_ERROR_UNSUPPORTED, "at most 15 stage boundaries across processes");
#else
        return mpar__fail(p->ctx, MPAR_ERROR_UNSUPPORTED, "mpi_comm given, but mpar was compiled without MPAR_USE_MPI");
#endif
    }
    p->local_workers = 0;
    for (i = 0; i < p->workers_count; i++) {
        p->stage_rank[i] = p->desc.stage_rank ? p->desc.stage_rank[i] : i * p->ranks / p->workers_count;
        if (p->stage_rank[i] < 0 || p->stage_rank[i] >= p->ranks)
            return mpar__fail(p->ctx, MPAR_ERROR_INVALID_PLAN, "stage %d: rank %d does not exist (%d ranks)", i,
                              p->stage_rank[i], p->ranks);
        if (!mpar__local(p, i)) continue;
        p->local_workers++;
        if (p->workers[i].device < 0 || p->workers[i].device >= mpar_device_count(p->ctx))
            return mpar__fail(p->ctx, MPAR_ERROR_INVALID_PLAN, "stage %d: device %d does not exist on rank %d", i,
                              p->workers[i].device, p->rank);
    }
    return MPAR_SUCCESS;
}

/* AUTO: a schedule synthesised for this pipeline's chunks. At creation the
   costs are not known: every action costs 1, links nothing. The first
   training step that runs all stages at once (on PoCL the first step of a
   shape runs them one at a time, to compile) then runs with profiling on
   (whatever desc.profile says)
   and its timeline gives each chunk's measured F, B, I, W, each stage's
   optimizer step and each boundary's hand-off (mpar__tl_sim_desc, what
   mpar_timeline_simulate uses); from the second step on the pipeline runs
   the schedule synthesised from those (mpar__auto_finish). Stashes are
   capped per device by desc.max_in_flight, else at what AUTO's plan's
   schedule (ZB-H1, interleaved with chunks) holds there; every chunk gets
   slots for its device's cap, so any schedule within the caps runs. */
static mpar_result mpar__pipeline_synthesize(mpar_pipeline* p, const mpar_sim_desc* measured, mpar_schedule** out) {
    const mpar_pipeline_desc* d = &p->desc;
    mpar_synth_desc sd;
    mpar_error err;
    memset(&sd, 0, sizeof sd);
    sd.stages = p->workers_count, sd.microbatches = d->microbatches, sd.virtual_stages = d->virtual_stages;
    if (measured) sd.costs = *measured;
    sd.costs.allocator = p->ctx->allocator;
    sd.max_in_flight = p->auto_caps;
    sd.allocator = p->ctx->allocator;
    if (mpar_schedule_synthesize(&sd, out, &err) != MPAR_SUCCESS)
        return mpar__fail(p->ctx, err.code, "schedule AUTO: %s", err.message);
    return MPAR_SUCCESS;
}

static mpar_result mpar__auto_start(mpar_pipeline* p) {
    const mpar_pipeline_desc* d = &p->desc;
    mpar_schedule* base = NULL;
    mpar_error err;
    int j;
    if (d->mpi_comm)
        return mpar__fail(p->ctx, MPAR_ERROR_UNSUPPORTED, "schedule AUTO measures on this process's devices; across "
                          "processes give every rank the same schedule_lists");
    if (mpar__sched_generate(&p->ctx->allocator, d->schedule, p->workers_count, d->microbatches, d->virtual_stages,
                             &base, &err) != MPAR_SUCCESS)
        return mpar__fail(p->ctx, err.code, "%s", err.message);
    for (j = 0; j < p->workers_count; j++)
        p->auto_caps[j] = d->max_in_flight && d->max_in_flight[j] > 0 ? d->max_in_flight[j] : base->peak_in_flight[j];
    mpar_schedule_destroy(base);
    p->auto_pending = 1;
    return mpar__pipeline_synthesize(p, NULL, &p->schedule);
}

/* The schedule the workers walk: the desc's, or generated from its kind.
   Then every chunk must sit on the device of its stage's first chunk. */
static mpar_result mpar__pipeline_schedule(mpar_pipeline* p, const mpar_stage_desc* stages) {
    const mpar_pipeline_desc* d = &p->desc;
    mpar_error err;
    int j, V;
    if (d->schedule_lists) {
        if (d->schedule_lists->stages != p->workers_count)
            return mpar__fail(p->ctx, MPAR_ERROR_INVALID_PLAN, "schedule_lists has %d stages but the pipeline has %d "
                              "devices (%d chunks / %d virtual stages)", d->schedule_lists->stages, p->workers_count,
                              p->vs_count, d->virtual_stages);
        if (mpar_schedule_copy(&p->ctx->allocator, d->schedule_lists, &p->schedule, &err) != MPAR_SUCCESS)
            return mpar__fail(p->ctx, err.code, "%s", err.message);
    } else if (mpar__sched_kind_synthesized(d->schedule)) {
        MPAR__TRY(mpar__auto_start(p));
    } else if (mpar_schedule_create_with(&p->ctx->allocator, d->schedule, p->workers_count, d->microbatches,
                                         d->virtual_stages, &p->schedule, &err) != MPAR_SUCCESS) {
        return mpar__fail(p->ctx, err.code, "%s", err.message);
    }
    V = p->schedule->virtual_stages;
    for (j = 0; d->max_in_flight && j < p->workers_count; j++)
        if (d->max_in_flight[j] > 0 && p->schedule->peak_in_flight[j] > d->max_in_flight[j])
            return mpar__fail(p->ctx, MPAR_ERROR_DOES_NOT_FIT, "stage %d holds up to %d micro-batch stashes under "
                              "schedule %s but max_in_flight[%d] is %d (AUTO synthesises within it)", j,
                              p->schedule->peak_in_flight[j],
                              p->schedule->custom ? "custom" : mpar_schedule_kind_name(p->schedule->kind), j,
                              d->max_in_flight[j]);
    for (j = 0; j < p->vs_count; j++) {
        int s = p->schedule->placement[j], first = p->schedule->virtual_stage_of[s * V];
        if (stages[j].device != stages[first].device)
            return mpar__fail(p->ctx, MPAR_ERROR_INVALID_PLAN, "chunk %d must run on the device of chunk %d (device "
                              "%d, not %d): the schedule puts both on stage %d", j, first, stages[first].device,
                              stages[j].device, s);
    }
    return MPAR_SUCCESS;
}

/* Messages a link between two chunks of ONE worker holds at most: the
   worker walks its list in order, so sends not yet received are counted
   there. Activations cross at F(a) -> F(b), gradients at B/I(b) -> B/I(a). */
static int mpar__self_link_need(const mpar_schedule* sc, int s, int ca, int cb) {
    int i, fwd = 0, bwd = 0, need = 1;
    for (i = 0; i < sc->action_count[s]; i++) {
        const mpar_action* a = &sc->actions[s][i];
        int back = a->kind == MPAR_ACTION_BACKWARD || a->kind == MPAR_ACTION_BACKWARD_INPUT;
        if (a->kind == MPAR_ACTION_FORWARD) fwd += a->chunk == ca ? 1 : a->chunk == cb ? -1 : 0;
        if (back) bwd += a->chunk == cb ? 1 : a->chunk == ca ? -1 : 0;
        if (fwd > need) need = fwd;
        if (bwd > need) need = bwd;
    }
    return need;
}

/* Messages the links between chunks a and b hold. */
static int mpar__link_cap(const mpar_pipeline* p, const mpar__vstage* a, const mpar__vstage* b, int peak) {
    int cap = p->desc.link_capacity ? p->desc.link_capacity : (peak > 2 ? peak : 2);
    if (a->worker == b->worker) { /* one thread sends and receives: it must never wait for room */
        int need = mpar__self_link_need(p->schedule, a->worker, a->chunk, b->chunk);
        if (need > cap) cap = need;
    }
    return cap;
}

/* Floats a forward link carries for `elems` activations. */
static size_t mpar__fwd_floats(const mpar_pipeline* p, size_t elems) {
    return p->desc.activation_type == MPAR_ACTIVATIONS_BF16 ? mpar__bf16_floats(elems) : elems;
}

/* Device bytes a link holds on its receiving device: DEVICE_COPY, and
   ASYNC within one context, keep `capacity` buffers there; the other
   transports (host-staged, pinned across contexts, MPI) hold host memory. */
static uint64_t mpar__link_device_bytes(mpar_link_mode asked, const mpar_device_info* from, const mpar_device_info* to,
                                        size_t floats, int capacity) {
    mpar_link_mode m = mpar__link_mode_for(asked, from, to);
    if (m == MPAR_LINK_DEVICE_COPY || (m == MPAR_LINK_ASYNC && from->group == to->group))
        return (uint64_t)capacity * 4u * (floats ? (uint64_t)floats : 1u);
    return 0;
}

static int mpar__vstage_slots(const mpar_pipeline* p, int i);

/* What the pipeline will allocate, by chunk (its buffers and the link
   buffers it receives into: p->need_vs) and by device (p->need), from the
   chunks' layouts; MPAR_ERROR_DOES_NOT_FIT when a device needs more than
   it has (memory_limit_bytes, else its global memory). Local stages only. */
static mpar_result mpar__pipeline_need(mpar_pipeline* p, const mpar__mem_opts* mo, int peak) {
    int i;
    memset(p->need, 0, sizeof p->need);
    for (i = 0; i < p->vs_count; i++) {
        mpar__vstage* v = &p->vs[i];
        p->need_vs[i] = mpar__local(p, v->worker) ? mpar__vstage_bytes(v, mo, mpar__vstage_slots(p, i)) : 0;
    }
    for (i = 0; i + 1 < p->vs_count; i++) { /* a boundary's two links, on their receiving devices */
        mpar__vstage *a = &p->vs[i], *b = &p->vs[i + 1];
        size_t floats = (size_t)p->mb_rows_max * b->act_cum[1];
        int cap = mpar__link_cap(p, a, b, peak);
        if (!mpar__local(p, a->worker) || !mpar__local(p, b->worker)) continue;
        p->need_vs[i + 1] += mpar__link_device_bytes(p->desc.link_mode, &p->ctx->devices[a->device].info,
                                                     &p->ctx->devices[b->device].info, mpar__fwd_floats(p, floats), cap);
        p->need_vs[i] += mpar__link_device_bytes(p->desc.link_mode, &p->ctx->devices[b->device].info,
                                                 &p->ctx->devices[a->device].info, floats, cap);
    }
    for (i = 0; i < p->vs_count; i++) p->need_vs[i] += mpar__gen_vstage_bytes(p, i); /* generation's caches */
    for (i = 0; i < p->vs_count; i++) p->need[p->vs[i].worker] += p->need_vs[i];
    for (i = 0; i < p->workers_count; i++) { /* per device: stages that share one share its memory */
        int d = p->workers[i].device, j, sharing = 0;
        uint64_t cap, need = 0;
        char stages[64];
        if (!mpar__local(p, i)) continue;
        for (j = 0; j < i; j++)
            if (mpar__local(p, j) && p->workers[j].device == d) break;
        if (j < i) continue; /* counted with the device's first stage */
        for (j = i; j < p->workers_count; j++)
            if (mpar__local(p, j) && p->workers[j].device == d) need += p->need[j], sharing++;
        if (sharing == 1) snprintf(stages, sizeof stages, "stage %d", i);
        else snprintf(stages, sizeof stages, "stages %d and %d more", i, sharing - 1);
        cap = p->desc.memory_limit_bytes ? p->desc.memory_limit_bytes : p->ctx->devices[d].info.global_mem_bytes;
        if (cap && need > cap)
            return mpar__fail(p->ctx, MPAR_ERROR_DOES_NOT_FIT,
                              "device %d (%s) needs %llu bytes (%.1f MiB) for its buffers but has %llu "
                              "(%.1f MiB): %.1f MiB short", d, stages, (unsigned long long)need,
                              (double)need / 1048576.0, (unsigned long long)cap, (double)cap / 1048576.0,
                              (double)(need - cap) / 1048576.0);
    }
    return MPAR_SUCCESS;
}

/* Activation slots chunk i gets: what its lists hold at most (whatever
   AUTO will synthesise: its device's cap); one for inference only. */
static int mpar__vstage_slots(const mpar_pipeline* p, int i) {
    int slots = p->desc.inference_only ? 1
              : p->auto_pending ? p->auto_caps[p->vs[i].worker] : p->schedule->chunk_peak_in_flight[i];
    return slots > 1 ? slots : 1;
}

/* Which chunks keep bf16 slots: with bf16 activations, those that do not
   recompute, unless the pipeline only infers. */
static void mpar__set_act16(mpar_pipeline* p) {
    int i, bf16 = p->desc.activation_type == MPAR_ACTIVATIONS_BF16;
    for (i = 0; i < p->vs_count; i++) {
        p->vs[i].act16 = bf16 && !p->vs[i].recompute && !p->desc.inference_only;
        p->vs[i].link16_in = bf16 && i > 0, p->vs[i].link16_out = bf16 && i + 1 < p->vs_count;
    }
}


static mpar_result mpar__pipeline_build(mpar_pipeline* p) {
    mpar_stage_desc stages[4 * MPAR__MAX_WORKERS];
    mpar__mem_opts mo;
    int i, peak = 1, M, act_auto = 0;
    if (p->desc.stage_count > 4 * MPAR__MAX_WORKERS || mpar_device_count(p->ctx) * p->desc.virtual_stages >
                                                           4 * MPAR__MAX_WORKERS)
        return mpar__fail(p->ctx, MPAR_ERROR_INVALID_PLAN, "too many stages");
    MPAR__TRY(mpar__resolve_stages(p, stages));
    MPAR__TRY(mpar__pipeline_schedule(p, stages));
    for (i = 0; i < p->workers_count; i++) {
        int most = p->auto_pending ? p->auto_caps[i] : p->schedule->peak_in_flight[i];
        if (most > peak) peak = most;
    }
    M = p->schedule->microbatches;
    p->mb_rows_max = ((p->desc.max_batch + M - 1) / M) * p->seq_len;
    p->mb_capacity = M;
    p->mb_first = (int*)mpar__alloc(p->ctx, sizeof(int) * (size_t)(M + 1));
    p->mb_loss = (float*)mpar__alloc(p->ctx, sizeof(float) * (size_t)M);
    p->layer_sumsq = (double*)mpar__alloc(p->ctx, sizeof(double) * (size_t)p->layer_count);
    /* zeroed at once: when a later allocation fails, mpar__pipeline_release
       walks these (it released garbage handles before) */
    p->vs = (mpar__vstage*)mpar__alloc_zeroed(p->ctx, sizeof(mpar__vstage) * (size_t)p->vs_count);
    p->links = (mpar__link*)mpar__alloc_zeroed(p->ctx, sizeof(mpar__link) * (size_t)(2 * p->vs_count));
    if (!p->mb_first || !p->mb_loss || !p->layer_sumsq || !p->vs || !p->links)
        return mpar__fail(p->ctx, MPAR_ERROR_OUT_OF_HOST_MEMORY, "out of host memory");
    memset(p->layer_sumsq, 0, sizeof(double) * (size_t)p->layer_count);
    for (i = 0; i < p->workers_count; i++) {
        mpar__worker* w = &p->workers[i];
        w->p = p, w->index = i, w->device = stages[i].device;
        w->ex.ctx = p->ctx, w->ex.device = w->device, w->ex.stage = i, w->ex.step = &p->step;
    }
    MPAR__TRY(mpar__setup_ranks(p));
    for (i = 0; i < p->vs_count; i++) {
        mpar__vstage* v = &p->vs[i];
        v->index = i, v->worker = mpar_schedule_stage_of(p->schedule, i), v->chunk = mpar_schedule_chunk_of(p->schedule, i);
        v->device = stages[i].device, v->first = stages[i].first_layer, v->last = stages[i].last_layer;
        v->n = v->last - v->first + 1;
        v->target_width = mpar__target_width(p->model, v);
        v->recompute = p->desc.recompute || p->stage_recompute[i];
    }
    if (p->desc.activation_type == MPAR_ACTIVATIONS_AUTO) p->desc.activation_type = MPAR_ACTIVATIONS_FP32, act_auto = 1;
    mpar__set_act16(p);
    mpar__mem_opts_of(&p->desc, (size_t)p->mb_rows_max, p->schedule->split_backward, &mo);
    for (i = 0; i < p->vs_count; i++) {
        mpar__vstage* v = &p->vs[i];
        uint64_t limit = 0;
        if (mpar__local(p, v->worker))
            limit = p->desc.max_buffer_bytes ? p->desc.max_buffer_bytes : p->ctx->devices[v->device].info.max_alloc_bytes;
        MPAR__TRY(mpar__vstage_layout(p->ctx, p->model, &mo, limit, v));
    }
    MPAR__TRY(mpar__gen_check(p));
    /* refuse before allocating anything: each device's buffers against its
       memory (AUTO: fp32 if that fits, else bf16) */
    {
        mpar_result fit = mpar__pipeline_need(p, &mo, peak);
        if (act_auto && fit == MPAR_ERROR_DOES_NOT_FIT) {
            p->desc.activation_type = MPAR_ACTIVATIONS_BF16;
            mpar__set_act16(p);
            fit = mpar__pipeline_need(p, &mo, peak);
        }
        MPAR__TRY(fit);
    }
    if (p->dry_run) return MPAR_SUCCESS;
    for (i = 0; i < p->workers_count; i++) {
        mpar__worker* w = &p->workers[i];
        cl_int st = CL_SUCCESS;
        if (!mpar__local(p, i)) continue;
        w->ex.host_route = p->ctx->devices[w->device].info.host_route; /* the device index is checked now */
        w->ex.queue = clCreateCommandQueue(p->ctx->groups[p->ctx->devices[w->device].info.group],
                                           p->ctx->devices[w->device].id, CL_QUEUE_PROFILING_ENABLE, &st);
        MPAR__CL(p->ctx, st);
        if (p->desc.profile || p->auto_pending) MPAR__TRY(mpar__clock_offset(p, w));
        w->ex.profiling = p->desc.profile; /* AUTO turns it on for its first step only */
    }
    for (i = 0; i < p->vs_count; i++) {
        mpar__vstage* v = &p->vs[i];
        if (!mpar__local(p, v->worker)) continue;
        MPAR__TRY(mpar__vstage_buffers(p, v, &mo, mpar__vstage_slots(p, i)));
        MPAR__TRY(mpar__vstage_init(p, v));
    }
    MPAR__TRY(mpar__gen_alloc(p));
    p->links_ready = 0;
    for (i = 0; i + 1 < p->vs_count; i++) {
        mpar__vstage *a = &p->vs[i], *b = &p->vs[i + 1];
        size_t floats = (size_t)p->mb_rows_max * b->act_cum[1];
        int cap = mpar__link_cap(p, a, b, peak);
        /* counted before its setup: a link that fails part-way is released
           with the others (its arrays and buffers are freed as far as made) */
        p->links_ready++;
        MPAR__TRY(mpar__link_init(p, &p->links[i], a, b, mpar__fwd_floats(p, floats), cap));
        p->links_ready++;
        MPAR__TRY(mpar__link_init(p, &p->links[p->vs_count - 1 + i], b, a, floats, cap));
        p->links[i].boundary = p->links[p->vs_count - 1 + i].boundary = i;
        p->links[p->vs_count - 1 + i].gradient = 1;
        a->fwd_out = b->fwd_in = &p->links[i];
        b->bwd_out = a->bwd_in = &p->links[p->vs_count - 1 + i];
    }
    return MPAR_SUCCESS;
}

/* Fills a pipeline object from a descriptor, checked and built (dry_run:
   counted, nothing allocated on the devices); whatever happens,
   mpar__pipeline_release undoes it. */
static mpar_result mpar__pipeline_init(mpar_pipeline* p, mpar_context* ctx, const mpar_model* model,
                                       const mpar_pipeline_desc* desc, int dry_run) {
    mpar_result r;
    memset(p, 0, sizeof *p);
    p->ctx = ctx, p->model = model, p->dry_run = dry_run;
    p->layer_count = mpar_model_layer_count(model);
    p->seq_len = model->desc.seq_len;
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->start_cv, NULL);
    pthread_cond_init(&p->done_cv, NULL);
    pthread_cond_init(&p->opt_cv, NULL);
    r = mpar__pipeline_defaults(p, desc);
    if (r == MPAR_SUCCESS) r = mpar__pipeline_build(p);
    return r;
}

/* A pipeline object, checked and built; *out is NULL only when it could
   not be made. */
static mpar_result mpar__pipeline_new(mpar_context* ctx, const mpar_model* model, const mpar_pipeline_desc* desc,
                                      int dry_run, mpar_pipeline** out) {
    mpar_pipeline* p = (mpar_pipeline*)mpar__alloc(ctx, sizeof *p);
    *out = p;
    if (!p) return mpar__fail(ctx, MPAR_ERROR_OUT_OF_HOST_MEMORY, "out of host memory");
    mpar__model_retain(model); /* mpar_pipeline_destroy releases it; a rebuild keeps it */
    return mpar__pipeline_init(p, ctx, model, desc, dry_run);
}

/* Starts the worker threads of a built pipeline. */
static mpar_result mpar__pipeline_start(mpar_pipeline* p) {
    int i;
    for (i = 0; i < p->workers_count; i++) {
        if (!mpar__local(p, i)) continue;
        if (pthread_create(&p->workers[i].thread, NULL, mpar__worker_main, &p->workers[i]) != 0)
            return mpar__fail(p->ctx, MPAR_ERROR_OUT_OF_HOST_MEMORY, "cannot start worker thread %d", i);
        p->workers[i].started = 1;
    }
    return MPAR_SUCCESS;
}

static mpar_result mpar__rebalance_setup(mpar_pipeline* p);

MPARDEF mpar_result mpar_pipeline_create(mpar_context* ctx, const mpar_model* model, const mpar_pipeline_desc* desc,
                                         mpar_pipeline** out) {
    mpar_pipeline* p;
    mpar_result r;
    if (out) *out = NULL;
    MPAR__TRY(mpar__ctx_check(ctx, "mpar_pipeline_create: the context was destroyed"));
    if (!model || !desc || !out) return mpar__fail(ctx, MPAR_ERROR_INVALID_ARGUMENT, "mpar_pipeline_create: "
                                                   "NULL argument");
    {
        mpar_error e; /* a model its caller destroyed (MPAR_DEBUG tells) */
        if (mpar__model_check(model, "mpar_pipeline_create", &e) != MPAR_SUCCESS)
            return mpar__fail(ctx, e.code, "%s", e.message);
    }
    r = mpar__pipeline_new(ctx, model, desc, 0, &p);
    if (!p) return r;
    if (r == MPAR_SUCCESS) r = mpar__pipeline_start(p);
    if (r == MPAR_SUCCESS) r = mpar__rebalance_setup(p);
    if (r == MPAR_SUCCESS) {
        p->guard = (struct mpar__guard*)mpar__alloc(ctx, sizeof *p->guard);
        if (!p->guard) r = mpar__fail(ctx, MPAR_ERROR_OUT_OF_HOST_MEMORY, "out of host memory");
        else pthread_mutex_init(&p->guard->mu, NULL), p->guard->call = NULL;
    }
#ifdef MPAR_USE_MPI
    if (desc->mpi_comm) r = mpar__mpi_join(p, desc, r); /* every rank returns the same */
#endif
    if (r != MPAR_SUCCESS) {
        mpar__pipeline_free(p, 0);
        return r;
    }
    p->live = MPAR__LIVE_PIPELINE;
    *out = p;
    return MPAR_SUCCESS;
}


MPARDEF mpar_result mpar_pipeline_memory(mpar_context* ctx, const mpar_model* model, const mpar_pipeline_desc* desc,
                                         mpar_pipeline_memory_info* out) {
    mpar_pipeline* p;
    mpar_result r;
    int i;
    MPAR__TRY(mpar__ctx_check(ctx, "mpar_pipeline_memory: the context was destroyed"));
    if (!model || !desc || !out)
        return mpar__fail(ctx, MPAR_ERROR_INVALID_ARGUMENT, "mpar_pipeline_memory: NULL argument");
    memset(out, 0, sizeof *out);
    {
        mpar_error e;
        if (mpar__model_check(model, "mpar_pipeline_memory", &e) != MPAR_SUCCESS)
            return mpar__fail(ctx, e.code, "%s", e.message);
    }
    r = mpar__pipeline_new(ctx, model, desc, 1, &p);
    if (!p) return r;
    if (p->vs && (r == MPAR_SUCCESS || r == MPAR_ERROR_DOES_NOT_FIT)) { /* counted either way */
        out->stages = p->workers_count, out->chunks = p->vs_count;
        for (i = 0; i < p->workers_count; i++) out->device[i] = p->workers[i].device, out->device_bytes[i] = p->need[i];
        for (i = 0; i < p->vs_count; i++) out->chunk_bytes[i] = p->need_vs[i], out->chunk_buffers[i] = p->vs[i].blocks;
    }
    mpar__pipeline_free(p, 0);
    return r;
}

/* --------------------------------------------------------------------------
   Planning a pipeline: the planner's tables from a model and a context
   -------------------------------------------------------------------------- */

MPARDEF mpar_result mpar_device_measure_gemm(mpar_context* ctx, int device, size_t m, size_t n, size_t k,
                                             double* flops) {
    mpar_exec ex;
    mpar_buf a, b, c;
    cl_mem mem[3] = {NULL, NULL, NULL};
    size_t floats[3];
    cl_int st = CL_SUCCESS;
    mpar_result r;
    double t0 = 0.0, t = 0.0;
    int i, reps = 0;
    if (!flops) return mpar__fail(ctx, MPAR_ERROR_INVALID_ARGUMENT, "mpar_device_measure_gemm: flops is NULL");
    r = mpar__check_device(ctx, device);
    if (r != MPAR_SUCCESS) return r;
    if (m == 0 || n == 0 || k == 0 || m > (1u << 20) || n > (1u << 20) || k > (1u << 20) || m * k > ((size_t)1 << 28) ||
        k * n > ((size_t)1 << 28) || m * n > ((size_t)1 << 28))
        return mpar__fail(ctx, MPAR_ERROR_INVALID_ARGUMENT,
                          "mpar_device_measure_gemm: shape %zux%zux%zu must be positive with each matrix at most 2^28 "
                          "floats", m, n, k);
    memset(&ex, 0, sizeof ex);
    ex.ctx = ctx, ex.device = device, ex.stage = -1, ex.queue = ctx->devices[device].queue;
    ex.host_route = ctx->devices[device].info.host_route;
    floats[0] = m * k, floats[1] = k * n, floats[2] = m * n;
    for (i = 0; i < 3 && st == CL_SUCCESS; i++) st = mpar__device_buffer(ctx, device, floats[i], &mem[i]);
    for (i = 0; i < 3 && st == CL_SUCCESS; i++) {
        float zero = 0.0f;
        st = clEnqueueFillBuffer(ex.queue, mem[i], &zero, sizeof zero, 0, floats[i] * 4, 0, NULL, NULL);
    }
    if (st == CL_SUCCESS) st = clFinish(ex.queue);
    r = (mpar_result)st;
    a.mem = mem[0], b.mem = mem[1], c.mem = mem[2];
    a.off = b.off = c.off = 0;
    /* the first call compiles CLBlast's kernels; then at least 3 calls and 50 ms */
    while (r == MPAR_SUCCESS && (reps < 4 || t - t0 < 0.05)) {
        if (reps == 1) t0 = mpar__now();
        r = mpar_exec_gemm(&ex, 0, 0, m, n, k, 1.0f, a, k, b, n, 0.0f, c, n);
        if (r == MPAR_SUCCESS) r = mpar__exec_sync(&ex);
        if (r == MPAR_SUCCESS) r = mpar__cl_check(ctx, clFinish(ex.queue), "clFinish", __FILE__, __LINE__);
        if (r == MPAR_SUCCESS && reps > 0) mpar__slow_sleep(ctx->devices[device].info.slowdown, mpar__now() - t);
        t = mpar__now();
        reps++;
    }
    for (i = 2; i >= 0; i--)
        if (mem[i]) clReleaseMemObject(mem[i]);
    if (r != MPAR_SUCCESS)
        return mpar__fail(ctx, r, "measuring device %d: GEMM %zux%zux%zu failed with %s", device, m, n, k,
                          mpar_result_string(r));
    *flops = (double)(reps - 1) * 2.0 * (double)m * (double)n * (double)k / (t - t0);
    return MPAR_SUCCESS;
}

MPARDEF mpar_result mpar_device_measure_flops(mpar_context* ctx, int device, double* flops) {
    if (!flops) return mpar__fail(ctx, MPAR_ERROR_INVALID_ARGUMENT, "mpar_device_measure_flops: flops is NULL");
    return mpar_device_measure_gemm(ctx, device, 512, 512, 512, flops);
}

/* Device throughputs for the planner: given, or measured (once when every
   device has the same name and driver, so equal devices get equal plans). */
static mpar_result mpar__plan_flops(mpar_context* ctx, const mpar_plan_options* o, double* out) {
    int d, n = mpar_device_count(ctx), alike = 1;
    for (d = 1; d < n; d++)
        alike &= !strcmp(ctx->devices[d].info.name, ctx->devices[0].info.name) &&
                 !strcmp(ctx->devices[d].info.driver, ctx->devices[0].info.driver);
    for (d = 0; d < n; d++) {
        if (o && o->device_flops) out[d] = o->device_flops[d];
        else if (d > 0 && alike) out[d] = out[0];
        else MPAR__TRY(mpar_device_measure_flops(ctx, d, &out[d]));
        if (!(out[d] > 0.0))
            return mpar__fail(ctx, MPAR_ERROR_INVALID_ARGUMENT, "device %d: throughput must be positive", d);
    }
    return MPAR_SUCCESS;
}

/* What the desc's schedule implies before the pipeline knows its stage
   count: whether the backward is split and how many micro-batches a step
   runs (the batch as one for SEQUENTIAL). Read from the lists. */
static mpar_result mpar__desc_schedule_facts(const mpar_allocator* a, const mpar_pipeline_desc* d, int* split, int* M,
                                             mpar_error* err) {
    mpar_schedule* sc = NULL;
    mpar_result r;
    if (d->schedule_lists) {
        *split = d->schedule_lists->split_backward, *M = d->schedule_lists->microbatches;
        return MPAR_SUCCESS;
    }
    r = mpar__sched_generate(a, d->schedule, 1, d->microbatches > 0 ? d->microbatches : 1, 1, &sc, err);
    if (r != MPAR_SUCCESS) return r;
    *split = sc->split_backward, *M = sc->microbatches;
    mpar_schedule_destroy(sc);
    return MPAR_SUCCESS;
}

/* What one micro-batch of each layer costs and holds, as the executor
   allocates it: activations and stash per in-flight micro-batch (with
   recompute, one working copy per stage instead); the backward buffer once
   per stage (per micro-batch for zero-bubble); for inference only, the
   parameters and the forward. What this per-layer form cannot say (each
   slot's copy of the stage output, recompute's stage inputs, the buffers'
   rounding) mpar_pipeline_plan settles with mpar_pipeline_memory. */
static void mpar__plan_layers(const mpar_model* model, const mpar_pipeline_desc* d, int split, int rows,
                              mpar_plan_layer* out) {
    int i;
    for (i = 0; i < model->count; i++) {
        const mpar_layer* l = &model->layers[i];
        uint64_t grad_buffer = (uint64_t)rows * ((uint64_t)l->in_features + l->gstash_per_row) * 4u;
        uint64_t moments = d->inference_only ? 0u : d->optimizer.kind == MPAR_OPTIMIZER_ADAMW ? 2u : 1u;
        uint64_t acts = (uint64_t)rows * ((uint64_t)l->in_features + l->stash_per_row) * 4u;
        int act16 = d->activation_type == MPAR_ACTIVATIONS_BF16 && !d->recompute && !d->inference_only;
        memset(&out[i], 0, sizeof out[i]);
        out[i].flops_forward = l->flops_forward * rows;
        /* forward alone; and the first layer's input gradient reaches nobody: the executor skips it */
        out[i].flops_backward_input = d->inference_only || i == 0 ? 0.0 : l->flops_backward_input * rows;
        out[i].flops_backward_weight = d->inference_only ? 0.0 : l->flops_backward_weight * rows;
        out[i].param_bytes = (uint64_t)l->param_count * 4u;
        if (d->inference_only) grad_buffer = 0;
        out[i].optimizer_bytes = (uint64_t)l->param_count * 4u * moments + (split ? 0u : grad_buffer);
        out[i].activation_bytes = (d->recompute ? 0u : acts) + (split ? grad_buffer : 0u);
        if (d->recompute) out[i].optimizer_bytes += acts; /* one working copy; the slots keep the stage input */
        if (act16) { /* one working copy; the slots keep the activations in 16 bits, the stashes in 32 */
            out[i].optimizer_bytes += acts;
            out[i].activation_bytes -= (uint64_t)rows * (uint64_t)l->in_features * 2u;
        }
        out[i].output_bytes = (uint64_t)rows * (uint64_t)l->out_features * (d->activation_type == MPAR_ACTIVATIONS_BF16 ? 2u : 4u);
    }
}

MPARDEF mpar_result mpar_pipeline_plan_layers(const mpar_model* model, const mpar_pipeline_desc* desc,
                                              mpar_plan_layer* out, mpar_error* err) {
    mpar_pipeline_desc d;
    int M;
    if (!model || !desc || !out)
        return mpar_error_set(err, MPAR_ERROR_INVALID_ARGUMENT, "mpar_pipeline_plan_layers: NULL argument");
    d = *desc;
    if (d.microbatches <= 0) d.microbatches = 1;
    if (d.max_batch <= 0 || d.max_batch > (1 << 24) / model->desc.seq_len)
        return mpar_error_set(err, MPAR_ERROR_INVALID_ARGUMENT, "max_batch must be positive and below 2^24 rows");
    {
        int split;
        mpar_result r = mpar__desc_schedule_facts(&model->desc.allocator, &d, &split, &M, err);
        if (r != MPAR_SUCCESS) return r;
        mpar__plan_layers(model, &d, split, (d.max_batch + M - 1) / M * model->desc.seq_len, out);
    }
    return MPAR_SUCCESS;
}

/* The device a plan overfills most (its bytes beyond device_capacity_bytes),
   or -1; with `capacity` given, against that instead. */
static int mpar__plan_overfills(const mpar_plan* plan, int dummy) {
    int a, over = -1;
    uint64_t worst = 0;
    (void)dummy;
    for (a = 0; a < plan->num_devices; a++)
        if (plan->device_capacity_bytes[a] && plan->device_memory_bytes[a] > plan->device_capacity_bytes[a] &&
            plan->device_memory_bytes[a] - plan->device_capacity_bytes[a] > worst)
            worst = plan->device_memory_bytes[a] - plan->device_capacity_bytes[a], over = a;
    return over;
}

static mpar_result mpar__plan_exact(mpar_context* ctx, const mpar_model* model, const mpar_pipeline_desc* d,
                                    mpar_plan* plan, mpar_error* err);

/* Plans, then weighs the plan by the executor's own accounting
   (mpar_pipeline_memory): a device the plan overfills has its capacity
   lowered by the excess (twice that the next round, ...) and the plan is
   made again. recompute_all: every stage of the plan recomputes. The
   devices' memory is put back and the plan reports their real capacity. */
static mpar_result mpar__plan_rounds(mpar_context* ctx, const mpar_model* model, const mpar_pipeline_desc* d,
                                     const mpar_plan_desc* pd, mpar_plan_device* devices, int n, int manual,
                                     int recompute_all, mpar_plan* out, mpar_error* err) {
    uint64_t capacity[MPAR__MAX_DEVICES], memory[MPAR__MAX_DEVICES];
    mpar_result r;
    int round, a, j;
    for (a = 0; a < n; a++) capacity[a] = 0, memory[a] = devices[a].memory_bytes;
    for (round = 0;; round++) {
        int over;
        r = mpar_plan_create(pd, out, err);
        if (r != MPAR_SUCCESS || d->mpi_comm) break; /* across processes the devices are the ranks' own */
        for (j = 0; recompute_all && j < out->num_stages; j++) out->stages[j].recompute = 1;
        r = mpar__plan_exact(ctx, model, d, out, err);
        if (r != MPAR_SUCCESS) {
            mpar_plan_free(out);
            break;
        }
        for (a = 0; a < n; a++) {
            if (!capacity[a]) capacity[a] = out->device_capacity_bytes[a]; /* the first round's: the real one */
            out->device_capacity_bytes[a] = capacity[a];
        }
        over = mpar__plan_overfills(out, 0);
        if (over < 0) break;
        if (round == 8 || manual) {
            r = mpar_error_set(err, MPAR_ERROR_DOES_NOT_FIT,
                               "device %d needs %llu bytes (%.1f MiB) under this plan but has %llu (%.1f MiB) after "
                               "the %llu bytes reserved: %.1f MiB short", over,
                               (unsigned long long)out->device_memory_bytes[over],
                               (double)out->device_memory_bytes[over] / 1048576.0,
                               (unsigned long long)capacity[over], (double)capacity[over] / 1048576.0,
                               (unsigned long long)devices[over].reserve_bytes,
                               (double)(out->device_memory_bytes[over] - capacity[over]) / 1048576.0);
            mpar_plan_free(out);
            break;
        }
        for (a = 0; a < n; a++) { /* every overfilled device, more each round */
            uint64_t cut;
            if (!devices[a].memory_bytes || out->device_memory_bytes[a] <= capacity[a]) continue;
            cut = (out->device_memory_bytes[a] - capacity[a]) * (uint64_t)(round + 1);
            devices[a].memory_bytes = devices[a].memory_bytes > cut ? devices[a].memory_bytes - cut : 1;
        }
        mpar_plan_free(out);
    }
    for (a = 0; a < n; a++) devices[a].memory_bytes = memory[a];
    return r;
}

/* A plan's memory by the executor's accounting: each stage's (chunk's)
   memory_bytes and each device's total replaced by what a pipeline with
   those stages allocates. */
static mpar_result mpar__plan_exact(mpar_context* ctx, const mpar_model* model, const mpar_pipeline_desc* d,
                                    mpar_plan* plan, mpar_error* err) {
    mpar_stage_desc st[4 * MPAR__MAX_WORKERS];
    int rec[4 * MPAR__MAX_WORKERS];
    mpar_pipeline_desc e = *d;
    mpar_pipeline_memory_info* info;
    mpar_result r;
    int j;
    if (plan->num_stages > 4 * MPAR__MAX_WORKERS)
        return mpar_error_set(err, MPAR_ERROR_INVALID_PLAN, "the plan has %d stages", plan->num_stages);
    for (j = 0; j < plan->num_stages; j++) {
        st[j].device = plan->stages[j].device;
        st[j].first_layer = plan->stages[j].first_layer, st[j].last_layer = plan->stages[j].last_layer;
        rec[j] = plan->stages[j].recompute;
    }
    e.stages = st, e.stage_count = plan->num_stages, e.plan = NULL, e.plan_options = NULL, e.recompute_stages = rec;
    e.virtual_stages = plan->virtual_stages > 0 ? plan->virtual_stages : 1;
    info = (mpar_pipeline_memory_info*)mpar__alloc(ctx, sizeof *info);
    if (!info) return mpar_error_set(err, MPAR_ERROR_OUT_OF_HOST_MEMORY, "out of host memory");
    r = mpar_pipeline_memory(ctx, model, &e, info);
    if (r == MPAR_SUCCESS || (r == MPAR_ERROR_DOES_NOT_FIT && info->chunks == plan->num_stages)) {
        r = MPAR_SUCCESS; /* the caller weighs the totals against the capacities */
        memset(plan->device_memory_bytes, 0, sizeof(uint64_t) * (size_t)plan->num_devices);
        for (j = 0; j < plan->num_stages; j++) {
            plan->stages[j].memory_bytes = info->chunk_bytes[j];
            plan->device_memory_bytes[plan->stages[j].device] += info->chunk_bytes[j];
        }
    } else {
        mpar_error_set(err, r, "%s", mpar_last_error(ctx));
    }
    mpar__free(ctx, info);
    return r;
}

static mpar_result mpar__plan_measured(mpar_context* ctx, const mpar_model* model, const mpar_pipeline_desc* desc,
                                       int M, double* tab, int* measured);

MPARDEF mpar_result mpar_pipeline_plan(mpar_context* ctx, const mpar_model* model, const mpar_pipeline_desc* desc,
                                       const mpar_plan_options* options, mpar_plan* out) {
    mpar_plan_options o;
    mpar_pipeline_desc d;
    mpar_plan_desc pd;
    mpar_plan_layer* layers = NULL;
    mpar_plan_stage* manual = NULL;
    double* measured_tab = NULL;
    mpar_plan_device devices[MPAR__MAX_DEVICES];
    mpar_plan_link links[MPAR__MAX_DEVICES * MPAR__MAX_DEVICES];
    double flops[MPAR__MAX_DEVICES];
    mpar_error err;
    mpar_result r;
    int n, a, b, M, act_auto;
    MPAR__TRY(mpar__ctx_check(ctx, "mpar_pipeline_plan: the context was destroyed"));
    if (!model || !desc || !out)
        return mpar__fail(ctx, MPAR_ERROR_INVALID_ARGUMENT, "mpar_pipeline_plan: NULL argument");
    if (mpar_model_validate(model, &err) != MPAR_SUCCESS) return mpar__fail(ctx, err.code, "%s", err.message);
    memset(&o, 0, sizeof o);
    if (options) o = *options;
    d = *desc;
    MPAR__TRY(mpar__check_activation_type(ctx, &d));
    act_auto = d.activation_type == MPAR_ACTIVATIONS_AUTO && !d.mpi_comm;
    if (d.activation_type == MPAR_ACTIVATIONS_AUTO) d.activation_type = MPAR_ACTIVATIONS_FP32;
    if (d.microbatches <= 0) d.microbatches = 1;
    if (d.virtual_stages <= 0) d.virtual_stages = 1;
    if (d.max_batch <= 0) return mpar__fail(ctx, MPAR_ERROR_INVALID_ARGUMENT, "planning needs max_batch > 0");
    {
        int split;
        if (mpar__desc_schedule_facts(&ctx->allocator, &d, &split, &M, &err) != MPAR_SUCCESS)
            return mpar__fail(ctx, err.code, "%s", err.message);
    }
    if (d.max_batch > (1 << 24) / model->desc.seq_len || d.microbatches > (1 << 20) || d.virtual_stages > 64)
        return mpar__fail(ctx, MPAR_ERROR_INVALID_ARGUMENT, "planning: max_batch x seq_len above 2^24, or too many "
                          "micro-batches or virtual stages");
    n = mpar_device_count(ctx);
    if (o.costs != MPAR_COSTS_MEASURED && o.costs != MPAR_COSTS_FLOPS)
        return mpar__fail(ctx, MPAR_ERROR_INVALID_ARGUMENT, "mpar_plan_options.costs: unknown value %d", (int)o.costs);
    if (o.costs == MPAR_COSTS_MEASURED && !o.device_flops && !o.measured_forward && !o.measured_backward_input &&
        !o.measured_backward_weight && !d.mpi_comm && o.mode != MPAR_PLAN_MANUAL) {
        int measured = 0;
        size_t per = (size_t)model->count * (size_t)n;
        measured_tab = (double*)mpar__alloc(ctx, sizeof(double) * 3 * per);
        if (!measured_tab) return mpar__fail(ctx, MPAR_ERROR_OUT_OF_HOST_MEMORY, "out of host memory");
        r = mpar__plan_measured(ctx, model, &d, M, measured_tab, &measured);
        if (r != MPAR_SUCCESS || !measured) {
            mpar__free(ctx, measured_tab);
            measured_tab = NULL;
            if (r != MPAR_SUCCESS) return r;
        } else {
            o.measured_forward = measured_tab;
            o.measured_backward_input = measured_tab + per;
            o.measured_backward_weight = measured_tab + 2 * per;
        }
    }
    r = mpar__plan_flops(ctx, &o, flops);
    if (r != MPAR_SUCCESS) {
        mpar__free(ctx, measured_tab);
        return r;
    }
    for (a = 0; a < n; a++) {
        devices[a].name = ctx->devices[a].info.name;
        devices[a].flops_per_second = flops[a];
        devices[a].memory_bytes = d.memory_limit_bytes ? d.memory_limit_bytes : ctx->devices[a].info.global_mem_bytes;
        devices[a].reserve_bytes = o.reserve_bytes ? o.reserve_bytes : (uint64_t)64 << 20;
        for (b = 0; b < n; b++) {
            int staged = ctx->devices[a].info.group != ctx->devices[b].info.group ||
                         ctx->devices[a].info.type == MPAR_DEVICE_CPU || ctx->devices[b].info.type == MPAR_DEVICE_CPU;
            links[a * n + b].bandwidth = o.link_bandwidth > 0 ? o.link_bandwidth : staged ? 6e9 : 12e9;
            links[a * n + b].latency = o.link_latency > 0 ? o.link_latency : 1e-4;
            links[a * n + b].overlaps = /* the transport the pipeline will choose */
                mpar__link_mode_for(d.link_mode, &ctx->devices[a].info, &ctx->devices[b].info) == MPAR_LINK_ASYNC;
        }
    }
    layers = (mpar_plan_layer*)mpar__alloc(ctx, sizeof(mpar_plan_layer) * (size_t)model->count);
    if (!layers) {
        mpar__free(ctx, measured_tab);
        return mpar__fail(ctx, MPAR_ERROR_OUT_OF_HOST_MEMORY, "out of host memory");
    }
    mpar_pipeline_plan_layers(model, &d, layers, NULL); /* arguments checked above */
    memset(&pd, 0, sizeof pd);
    pd.allocator = ctx->allocator; /* the planner's tables and the plan the caller frees */
    pd.num_layers = model->count, pd.layers = layers;
    pd.num_devices = n, pd.devices = devices, pd.links = links;
    pd.measured_forward = o.measured_forward;
    pd.measured_backward_input = o.measured_backward_input;
    pd.measured_backward_weight = o.measured_backward_weight;
    pd.schedule = d.schedule, pd.microbatches = M, pd.virtual_stages = d.virtual_stages; /* SEQUENTIAL: one */
    pd.schedule_lists = d.schedule_lists;
    pd.mode = o.mode, pd.use_devices = o.use_devices, pd.order = o.order, pd.weights = o.weights;
    pd.inference_only = d.inference_only;
    if (o.mode == MPAR_PLAN_MANUAL) { /* cost the stages the desc gives */
        int j;
        if (!d.stages || d.stage_count <= 0 || d.stage_count > 4 * MPAR__MAX_WORKERS) {
            mpar__free(ctx, layers);
            mpar__free(ctx, measured_tab);
            return mpar__fail(ctx, MPAR_ERROR_INVALID_PLAN, "MANUAL planning needs desc.stages");
        }
        manual = (mpar_plan_stage*)mpar__alloc(ctx, sizeof(mpar_plan_stage) * (size_t)d.stage_count);
        if (!manual) {
            mpar__free(ctx, layers);
            mpar__free(ctx, measured_tab);
            return mpar__fail(ctx, MPAR_ERROR_OUT_OF_HOST_MEMORY, "out of host memory");
        }
        memset(manual, 0, sizeof(mpar_plan_stage) * (size_t)d.stage_count);
        for (j = 0; j < d.stage_count; j++) {
            manual[j].device = d.stages[j].device;
            manual[j].first_layer = d.stages[j].first_layer;
            manual[j].last_layer = d.stages[j].last_layer;
            manual[j].recompute = d.recompute_stages ? d.recompute_stages[j] != 0 : 0;
        }
        pd.manual_stages = manual, pd.num_manual_stages = d.stage_count;
    }
    r = mpar__plan_rounds(ctx, model, &d, &pd, devices, n, o.mode == MPAR_PLAN_MANUAL, 0, out, &err);
    /* AUTO activations: bf16 when fp32 does not fit */
    if (r == MPAR_ERROR_DOES_NOT_FIT && act_auto) {
        mpar_error first = err;
        d.activation_type = MPAR_ACTIVATIONS_BF16;
        mpar_pipeline_plan_layers(model, &d, layers, NULL);
        r = mpar__plan_rounds(ctx, model, &d, &pd, devices, n, o.mode == MPAR_PLAN_MANUAL, 0, out, &err);
        if (r == MPAR_ERROR_DOES_NOT_FIT) err = first;
    }
    /* Memory binds: every stage recomputes (the layers modelled so), then
       each stage in turn stops recomputing where its device still fits. */
    if (r == MPAR_ERROR_DOES_NOT_FIT && !d.recompute && o.mode != MPAR_PLAN_MANUAL && !d.mpi_comm) {
        mpar_pipeline_desc dr = d;
        mpar_error first = err;
        int j;
        dr.recompute = 1;
        mpar_pipeline_plan_layers(model, &dr, layers, NULL);
        r = mpar__plan_rounds(ctx, model, &d, &pd, devices, n, 0, 1, out, &err);
        for (j = 0; r == MPAR_SUCCESS && j < out->num_stages; j++) {
            out->stages[j].recompute = 0;
            r = mpar__plan_exact(ctx, model, &d, out, &err);
            if (r == MPAR_SUCCESS && mpar__plan_overfills(out, -1) >= 0) out->stages[j].recompute = 1;
        }
        if (r == MPAR_SUCCESS) r = mpar__plan_exact(ctx, model, &d, out, &err);
        if (r != MPAR_SUCCESS) {
            if (out->stages) mpar_plan_free(out);
            if (r == MPAR_ERROR_DOES_NOT_FIT) err = first; /* the plan without recomputation says more */
        }
    }
    /* AUTO: the plan's stages with fp32 when they fit so (recomputation may
       have made room), as mpar_pipeline_create will choose */
    if (r == MPAR_SUCCESS && act_auto && d.activation_type == MPAR_ACTIVATIONS_BF16) {
        mpar_pipeline_desc d32 = d;
        d32.activation_type = MPAR_ACTIVATIONS_FP32;
        r = mpar__plan_exact(ctx, model, &d32, out, &err);
        if (r == MPAR_SUCCESS && mpar__plan_overfills(out, -1) < 0) d = d32;
        else if (r == MPAR_SUCCESS) r = mpar__plan_exact(ctx, model, &d, out, &err);
        if (r != MPAR_SUCCESS && out->stages) mpar_plan_free(out);
    }
    if (r == MPAR_SUCCESS) out->activation_type = d.activation_type;
    mpar__free(ctx, layers);
    mpar__free(ctx, manual);
    mpar__free(ctx, measured_tab);
    if (r != MPAR_SUCCESS) return mpar__fail(ctx, r, "%s", err.message);
    return MPAR_SUCCESS;
}

/* --------------------------------------------------------------------------
   Measured layer costs and the profile cache

   A device's measured costs live in <cache_dir>/profile-<device key>.txt,
   one line per layer shape:
     mpar-profile 1 <device key>
     <layer key> <forward> <backward input> <backward weight> <optimizer>
     ...
     end <checksum of every byte before this line>
   (seconds: the first three per micro-batch, the last per optimizer step,
   "%a" hexadecimal floats so they read back exactly). The device key hashes
   the device's name, driver, version, route and slowdown with mpar's
   version; a layer key the layer's type, shape, options, position (first
   or last), rows per micro-batch, activation type and optimizer. A file
   that is damaged, foreign (another device's key) or not a regular file is
   ignored, logged and replaced by the next write. Writes go to a fresh
   temporary file (mkstemp: never an existing file or link) renamed into
   place, so a reader sees the old file or the new one, never half of one.
   -------------------------------------------------------------------------- */

#define MPAR__PROFILE_MAGIC "mpar-profile 1"

typedef struct mpar__cost_entry {
    uint64_t key;
    double cost[4]; /* forward, backward input, backward weight, optimizer */
} mpar__cost_entry;

static uint64_t mpar__profile_device_key(const mpar_context* ctx, int device) {
    const mpar_device_info* d = &ctx->devices[device].info;
    /* the measuring method's version: entries measured another way are other entries */
    uint64_t h = mpar__fnv1a(MPAR__FNV_SEED, MPAR_VERSION_STRING "/sections", sizeof MPAR_VERSION_STRING "/sections");
    h = mpar__fnv1a(h, d->name, strlen(d->name) + 1);
    h = mpar__fnv1a(h, d->driver, strlen(d->driver) + 1);
    h = mpar__fnv1a(h, d->version, strlen(d->version) + 1);
    h = mpar__fnv1a(h, d->platform, strlen(d->platform) + 1);
    h = mpar__fnv1a(h, &d->host_route, sizeof d->host_route);
    h = mpar__fnv1a(h, &d->slowdown, sizeof d->slowdown);
    return h;
}

static uint64_t mpar__profile_layer_key(const mpar_model* model, int i, const mpar_pipeline_desc* d, int rows) {
    const mpar_layer* l = mpar_model_layer(model, i);
    int facts[10];
    double f[4];
    uint64_t h = mpar__fnv1a(MPAR__FNV_SEED, l->type->name, strlen(l->type->name) + 1);
    facts[0] = l->desc.units, facts[1] = l->desc.vocab, facts[2] = l->desc.heads, facts[3] = l->desc.hidden;
    facts[4] = l->in_features, facts[5] = l->out_features, facts[6] = l->seq_len;
    facts[7] = (i == 0) | (i == model->count - 1) << 1, facts[8] = rows;
    facts[9] = (int)d->activation_type | (int)d->optimizer.kind << 4;
    f[0] = l->desc.rate, f[1] = l->desc.eps, f[2] = (double)l->param_count, f[3] = l->flops_forward;
    h = mpar__fnv1a(h, facts, sizeof facts);
    return mpar__fnv1a(h, f, sizeof f);
}

static void mpar__profile_path(const mpar_context* ctx, uint64_t dev_key, char* out, size_t size) {
    snprintf(out, size, "%s/profile-%016llx.txt", ctx->cache_dir, (unsigned long long)dev_key);
}

static void mpar__profile_stat(mpar_context* ctx, int* field) {
    pthread_mutex_lock(&ctx->lock);
    (*field)++;
    pthread_mutex_unlock(&ctx->lock);
}

/* Reads a device's cache file into *out (mpar__alloc'd, *count entries).
   Missing: 0 entries. Damaged or foreign: 0 entries, logged and counted. */
static void mpar__profile_load(mpar_context* ctx, uint64_t dev_key, mpar__cost_entry** out, int* count) {
    char path[4400], head[64];
    struct stat st;
    char *buf = NULL, *line, *end;
    int n = 0, cap, ok = 0;
    size_t got = 0;
    uint64_t sum;
    *out = NULL, *count = 0;
    if (!ctx->cache_dir) return;
    mpar__profile_path(ctx, dev_key, path, sizeof path);
    if (lstat(path, &st) != 0) return; /* none yet */
    /* a regular file, without blocking on a FIFO in its place */
    buf = mpar__read_file_as(ctx, path, &got, 0);
    if (!buf) goto reject;
    snprintf(head, sizeof head, "%s %016llx\n", MPAR__PROFILE_MAGIC, (unsigned long long)dev_key);
    if (strncmp(buf, head, strlen(head)) != 0) goto reject;
    end = strstr(buf, "\nend ");
    if (!end) goto reject;
    sum = (uint64_t)strtoull(end + 5, &line, 16);
    if (line != end + 21 || *line != '\n' || line + 1 != buf + got ||
        mpar__fnv1a(MPAR__FNV_SEED, buf, (size_t)(end + 1 - buf)) != sum)
        goto reject;
    cap = 0;
    for (line = buf + strlen(head); line < end + 1; line = strchr(line, '\n') + 1) cap++;
    *out = (mpar__cost_entry*)mpar__alloc(ctx, sizeof(mpar__cost_entry) * (size_t)(cap ? cap : 1));
    if (!*out) goto reject;
    for (line = buf + strlen(head); line < end + 1; line = strchr(line, '\n') + 1) {
        mpar__cost_entry* e = &(*out)[n];
        char* p = line;
        int k;
        e->key = (uint64_t)strtoull(p, &p, 16);
        for (k = 0; k < 4; k++) {
            char* q;
            e->cost[k] = strtod(p, &q);
            if (q == p || !(e->cost[k] >= 0.0 && e->cost[k] < 1e6)) goto reject;
            p = q;
        }
        if (*p != '\n') goto reject;
        n++;
    }
    ok = 1;
reject:
    mpar__free(ctx, buf);
    if (ok) {
        *count = n;
        return;
    }
    mpar__free(ctx, *out);
    *out = NULL;
    mpar__profile_stat(ctx, &ctx->stats.profile_cache_rejected);
    mpar__log(ctx, MPAR_LOG_WARN, "ignoring unusable profile cache file %s: it will be measured and rewritten", path);
}

/* Writes entries (old ones first, then the new ones, a new one replacing
   an old one of the same key) to the device's cache file, atomically.
   Failure only costs a future measurement. */
static void mpar__profile_store(mpar_context* ctx, uint64_t dev_key, const mpar__cost_entry* old, int n_old,
                                const mpar__cost_entry* fresh, int n_fresh) {
    char path[4400], tmp[4500], *text, *at;
    size_t cap = 128 + (size_t)(n_old + n_fresh) * 160, len;
    uint64_t sum;
    int i, j, fd, ok;
    if (!ctx->cache_dir || mpar__mkdirs(ctx->cache_dir) != 0) return;
    mpar__profile_path(ctx, dev_key, path, sizeof path);
    text = (char*)mpar__alloc(ctx, cap);
    if (!text) return;
    at = text;
    at += snprintf(at, cap, "%s %016llx\n", MPAR__PROFILE_MAGIC, (unsigned long long)dev_key);
    for (i = 0; i < n_old + n_fresh; i++) {
        const mpar__cost_entry* e = i < n_old ? &old[i] : &fresh[i - n_old];
        for (j = 0; i < n_old && j < n_fresh && fresh[j].key != e->key; j++) {
        }
        if (i < n_old && j < n_fresh) continue; /* measured again */
        for (j = 0; i >= n_old && j < i - n_old && fresh[j].key != e->key; j++) {
        }
        if (i >= n_old && j < i - n_old) continue; /* a layer of the same kind: one entry */
        at += snprintf(at, cap - (size_t)(at - text), "%016llx %a %a %a %a\n", (unsigned long long)e->key, e->cost[0],
                       e->cost[1], e->cost[2], e->cost[3]);
    }
    sum = mpar__fnv1a(MPAR__FNV_SEED, text, (size_t)(at - text));
    at += snprintf(at, cap - (size_t)(at - text), "end %016llx\n", (unsigned long long)sum);
    len = (size_t)(at - text);
    fd = mpar__tmp_create(path, tmp, sizeof tmp);
    ok = fd >= 0;
    if (ok) {
        size_t put = 0;
        while (ok && put < len) {
            ssize_t k = write(fd, text + put, len - put);
            ok = k > 0;
            if (ok) put += (size_t)k;
        }
        ok = fsync(fd) == 0 && ok;
        ok = close(fd) == 0 && ok;
        if (ok && rename(tmp, path) == 0) mpar__profile_stat(ctx, &ctx->stats.profile_cache_written);
        else remove(tmp);
    }
    mpar__free(ctx, text);
}

/* Each layer's costs on one device: seconds per micro-batch of its forward,
   input-gradient and weight-gradient work, and seconds per optimizer step
   (opt may be NULL: gradients only). Every layer runs as its own stage on
   that device, one kernel at a time; one warm-up job, then the least of
   three measured ones, so a moment's interference does not count. */
static mpar_result mpar__profile_costs(mpar_context* ctx, const mpar_model* model, const mpar_pipeline_desc* desc,
                                       int device, double* forward, double* backward_input, double* backward_weight,
                                       double* opt) {
    mpar_stage_desc stages[MPAR__MAX_WORKERS];
    mpar_pipeline_desc d;
    mpar_pipeline* p = NULL;
    mpar_batch batch;
    double* tab[4];
    int L, i, k, samples, rows, width;
    void* inputs;
    int32_t* targets;
    size_t tw;
    mpar_result r;
    L = model->count;
    if (desc->max_batch <= 0 || desc->microbatches < 0)
        return mpar__fail(ctx, MPAR_ERROR_INVALID_ARGUMENT, "mpar_profile_layers: max_batch must be positive (got %d)",
                          desc->max_batch);
    if (L > MPAR__MAX_WORKERS)
        return mpar__fail(ctx, MPAR_ERROR_UNSUPPORTED, "profiling takes at most %d layers (model has %d)",
                          MPAR__MAX_WORKERS, L);
    MPAR__TRY(mpar__check_device(ctx, device));
    d = *desc;
    samples = (d.max_batch + (d.microbatches > 0 ? d.microbatches : 1) - 1) / (d.microbatches > 0 ? d.microbatches : 1);
    for (i = 0; i < L; i++) stages[i].device = device, stages[i].first_layer = stages[i].last_layer = i;
    /* zero-bubble lists keep the input and weight parts apart; every kernel
       runs alone (force_serial), so no layer's time includes another's */
    d.stages = stages, d.stage_count = L, d.plan = NULL, d.plan_options = NULL, d.schedule = MPAR_SCHEDULE_ZB_H1;
    d.schedule_lists = NULL, d.microbatches = 1, d.virtual_stages = 1, d.max_batch = samples, d.profile = 1;
    d.inject_fault = 0, d.recompute = 0, d.recompute_stages = NULL, d.inference_only = 0, d.max_in_flight = NULL;
    d.mpi_comm = NULL, d.stage_rank = NULL, d.skip_nonfinite = 1;
    d.rebalance = 0; /* every layer on one device: nothing to balance (and a shared device is refused) */
    rows = samples * model->desc.seq_len;
    width = model->desc.input_features;
    inputs = mpar__alloc(ctx, (size_t)rows * (size_t)width * 4);
    /* zeros: int32 classes, or float targets as wide as a regression loss */
    tw = (model->layers[L - 1].type->flags & MPAR_LAYER_FLOAT_TARGETS) ? (size_t)model->layers[L - 1].in_features : 1;
    targets = (int32_t*)mpar__alloc(ctx, (size_t)rows * tw * 4);
    if (!inputs || !targets) {
        mpar__free(ctx, inputs), mpar__free(ctx, targets);
        return mpar__fail(ctx, MPAR_ERROR_OUT_OF_HOST_MEMORY, "out of host memory");
    }
    memset(inputs, 0, (size_t)rows * (size_t)width * 4); /* zeros are valid tokens and inputs alike */
    memset(targets, 0, (size_t)rows * tw * 4);
    batch.inputs = inputs, batch.targets = targets, batch.samples = samples, batch.float_targets = (const float*)targets;
    tab[0] = forward, tab[1] = backward_input, tab[2] = backward_weight, tab[3] = opt;
    for (i = 0; i < L; i++)
        for (k = 0; k < 4; k++)
            if (tab[k]) tab[k][i] = 1e30;
    r = mpar_pipeline_create(ctx, model, &d, &p);
    if (r == MPAR_SUCCESS) p->force_serial = 1;
    if (r == MPAR_SUCCESS) r = mpar_pipeline_compute_gradients(p, &batch, NULL); /* compiles, warms up */
    for (k = 0; r == MPAR_SUCCESS && k < 3; k++) {
        mpar_timeline t;
        double sum[4][MPAR__MAX_WORKERS];
        int e, part;
        r = opt ? mpar_pipeline_train_step(p, &batch, NULL) : mpar_pipeline_compute_gradients(p, &batch, NULL);
        if (r == MPAR_SUCCESS) r = mpar_pipeline_get_timeline(p, &t);
        if (r != MPAR_SUCCESS) break;
        memset(sum, 0, sizeof sum);
        for (e = 0; e < t.event_count; e++) {
            const mpar_event* ev = &t.events[e];
            part = ev->kind == MPAR_EVENT_FORWARD ? 0 : ev->kind == MPAR_EVENT_BACKWARD_INPUT ? 1
                 : ev->kind == MPAR_EVENT_BACKWARD_WEIGHT ? 2 : ev->kind == MPAR_EVENT_OPTIMIZER_STEP ? 3 : -1;
            if (part >= 0 && ev->stage >= 0 && ev->stage < L) sum[part][ev->stage] += ev->end - ev->start;
        }
        mpar_timeline_free(&t);
        for (i = 0; i < L; i++)
            for (part = 0; part < 4; part++)
                if (tab[part] && sum[part][i] < tab[part][i]) tab[part][i] = sum[part][i];
    }
    if (p) mpar__pipeline_free(p, 0); /* made here: no tombstone */
    mpar__free(ctx, inputs), mpar__free(ctx, targets);
    return r;
}

MPARDEF mpar_result mpar_profile_layers(mpar_context* ctx, const mpar_model* model, const mpar_pipeline_desc* desc,
                                        int device, double* forward, double* backward_input,
                                        double* backward_weight) {
    MPAR__TRY(mpar__ctx_check(ctx, "mpar_profile_layers: the context was destroyed"));
    if (!model || !desc || !forward || !backward_input || !backward_weight)
        return mpar__fail(ctx, MPAR_ERROR_INVALID_ARGUMENT, "mpar_profile_layers: NULL argument");
    return mpar__profile_costs(ctx, model, desc, device, forward, backward_input, backward_weight, NULL);
}

/* The planner's measured tables ([layer * devices + device]) for a desc
   whose step runs M micro-batches: from the profile cache, measuring what
   is missing on one device of each kind (same device key). The optimizer
   step's time is spread over the step's micro-batches in the weight part,
   so a stage's M micro-batches cost its whole step. *measured = 0 (and
   the FLOP model plans) when a device cannot be measured, e.g. the model
   does not fit on it alone: logged. */
static mpar_result mpar__plan_measured(mpar_context* ctx, const mpar_model* model, const mpar_pipeline_desc* desc,
                                       int M, double* tab, int* measured) {
    int n = mpar_device_count(ctx), L = model->count, dev, i, k;
    size_t per = (size_t)L * (size_t)n;
    uint64_t keys[MPAR__MAX_DEVICES];
    mpar__cost_entry* fresh = (mpar__cost_entry*)mpar__alloc(ctx, sizeof(mpar__cost_entry) * (size_t)L);
    double* part = (double*)mpar__alloc(ctx, sizeof(double) * 4 * (size_t)L);
    mpar_pipeline_desc d = *desc;
    mpar_result r = MPAR_SUCCESS;
    int rows;
    *measured = 0;
    if (!fresh || !part) {
        mpar__free(ctx, fresh), mpar__free(ctx, part);
        return mpar__fail(ctx, MPAR_ERROR_OUT_OF_HOST_MEMORY, "out of host memory");
    }
    d.microbatches = M;
    rows = (d.max_batch + M - 1) / M * model->desc.seq_len;
    for (dev = 0; dev < n && r == MPAR_SUCCESS; dev++) {
        mpar__cost_entry* old = NULL;
        int n_old = 0, missing = 0, same = -1;
        keys[dev] = mpar__profile_device_key(ctx, dev);
        for (k = 0; k < dev && same < 0; k++)
            if (keys[k] == keys[dev]) same = k;
        if (same >= 0) { /* a device of the same kind: its costs */
            for (i = 0; i < L; i++)
                for (k = 0; k < 3; k++) tab[k * per + (size_t)i * n + dev] = tab[k * per + (size_t)i * n + same];
            continue;
        }
        mpar__profile_load(ctx, keys[dev], &old, &n_old);
        for (i = 0; i < L; i++) {
            uint64_t key = mpar__profile_layer_key(model, i, &d, rows);
            for (k = 0; k < n_old && old[k].key != key; k++) {
            }
            if (k == n_old) {
                missing++;
                continue;
            }
            fresh[i] = old[k];
        }
        if (missing) {
            double t0 = mpar__now();
            r = mpar__profile_costs(ctx, model, &d, dev, part, part + L, part + 2 * L, part + 3 * L);
            if (r != MPAR_SUCCESS) {
                mpar__log(ctx, MPAR_LOG_WARN, "planning from the FLOP model: device %d's layer costs could not be "
                          "measured: %s", dev, mpar_last_error(ctx));
                mpar__free(ctx, old);
                mpar__free(ctx, fresh), mpar__free(ctx, part);
                return MPAR_SUCCESS;
            }
            for (i = 0; i < L; i++) fresh[i].key = mpar__profile_layer_key(model, i, &d, rows);
            for (i = 0; i < L; i++) { /* layers of one kind (one key) share the least of their times: */
                int j;                  /* the same work, so more is interference */
                double least[4];
                for (j = 0; j < i && fresh[j].key != fresh[i].key; j++) {
                }
                if (j < i) continue;
                for (k = 0; k < 4; k++) least[k] = part[k * L + i];
                for (j = i + 1; j < L; j++)
                    if (fresh[j].key == fresh[i].key)
                        for (k = 0; k < 4; k++) least[k] = part[k * L + j] < least[k] ? part[k * L + j] : least[k];
                for (j = i; j < L; j++)
                    if (fresh[j].key == fresh[i].key)
                        for (k = 0; k < 4; k++) fresh[j].cost[k] = least[k];
            }
            mpar__profile_stat(ctx, &ctx->stats.profiles_measured);
            mpar__log(ctx, MPAR_LOG_INFO, "measured %d layer(s) on device %d (%s) in %.2f s, %d rows per micro-batch%s",
                      L, dev, ctx->devices[dev].info.name, mpar__now() - t0, rows,
                      ctx->cache_dir ? "; saved in the profile cache" : "");
            mpar__profile_store(ctx, keys[dev], old, n_old, fresh, L);
        } else {
            mpar__profile_stat(ctx, &ctx->stats.profile_cache_hits);
        }
        mpar__free(ctx, old);
        for (i = 0; i < L; i++) {
            tab[0 * per + (size_t)i * n + dev] = fresh[i].cost[0];
            tab[1 * per + (size_t)i * n + dev] = fresh[i].cost[1];
            tab[2 * per + (size_t)i * n + dev] = fresh[i].cost[2] + fresh[i].cost[3] / M;
        }
    }
    mpar__free(ctx, fresh), mpar__free(ctx, part);
    if (r == MPAR_SUCCESS) *measured = 1;
    return r;
}

/* --------------------------------------------------------------------------
   The plan in use (mpar_pipeline_get_plan) and live re-balancing
   (desc.rebalance): measured stage times -> device speeds -> the planner ->
   a move of layers between devices through host memory.
   -------------------------------------------------------------------------- */

struct mpar__rebalance {
    mpar_stage_desc stages[4 * MPAR__MAX_WORKERS]; /* the stages in use: desc.stages points here */
    int recompute[4 * MPAR__MAX_WORKERS];          /* desc.recompute_stages points here */
    int caps[MPAR__MAX_WORKERS];                   /* desc.max_in_flight, when one was given */
    mpar_plan_options options;                     /* desc.plan_options' settings (no arrays), for re-plans */
    mpar_schedule* lists;                          /* desc.schedule_lists, when one was given */
    double busy[MPAR__MAX_WORKERS];                /* compute seconds per stage: the least of `measured` steps */
    /* per context device, over the re-plans so far, each older one
       weighing half as much: planner FLOPs and measured seconds */
    double work[MPAR__MAX_DEVICES], seconds[MPAR__MAX_DEVICES];
    int measured, window;                          /* steps measured; steps before the next automatic re-plan */
    int stopped;                                   /* a failure stopped automatic re-planning */
    int moves, checks, failures;
};

/* A deep copy of a plan, its arrays from the context's allocator. */
static mpar_result mpar__plan_dup(mpar_context* ctx, const mpar_plan* src, mpar_plan* out) {
    size_t ns = src->stages && src->num_stages > 0 ? (size_t)src->num_stages : 0;
    size_t nd = src->device_memory_bytes && src->device_capacity_bytes && src->num_devices > 0
                    ? (size_t)src->num_devices : 0;
    *out = *src;
    out->allocator = ctx->allocator;
    out->stages = ns ? (mpar_plan_stage*)mpar__alloc(ctx, sizeof(mpar_plan_stage) * ns) : NULL;
    out->device_memory_bytes = nd ? (uint64_t*)mpar__alloc(ctx, sizeof(uint64_t) * nd) : NULL;
    out->device_capacity_bytes = nd ? (uint64_t*)mpar__alloc(ctx, sizeof(uint64_t) * nd) : NULL;
    if ((ns && !out->stages) || (nd && (!out->device_memory_bytes || !out->device_capacity_bytes))) {
        mpar_plan_free(out);
        return mpar__fail(ctx, MPAR_ERROR_OUT_OF_HOST_MEMORY, "out of host memory");
    }
    out->num_stages = (int)ns, out->num_devices = (int)nd;
    if (ns) memcpy(out->stages, src->stages, sizeof(mpar_plan_stage) * ns);
    if (nd) {
        memcpy(out->device_memory_bytes, src->device_memory_bytes, sizeof(uint64_t) * nd);
        memcpy(out->device_capacity_bytes, src->device_capacity_bytes, sizeof(uint64_t) * nd);
    }
    return MPAR_SUCCESS;
}

static void mpar__set_plan(mpar_pipeline* p, mpar_plan* plan) {
    if (p->plan) {
        mpar_plan_free(p->plan);
        mpar__free(p->ctx, p->plan);
    }
    p->plan = plan;
}

/* Makes `plan` the plan in use: taken over (take), else copied. Out of
   memory it is simply not kept (mpar_pipeline_get_plan costs the stages
   again). */
static void mpar__keep_plan(mpar_pipeline* p, const mpar_plan* plan, int take) {
    mpar_plan* kept = (mpar_plan*)mpar__alloc(p->ctx, sizeof *kept);
    if (kept && take) {
        *kept = *plan;
    } else if (kept && mpar__plan_dup(p->ctx, plan, kept) != MPAR_SUCCESS) {
        mpar__free(p->ctx, kept);
        kept = NULL;
    }
    if (!kept && take) mpar_plan_free((mpar_plan*)plan);
    mpar__set_plan(p, kept);
}

/* The pipeline's stages as mpar_pipeline_plan costs them (MANUAL), with
   `flops` (NULL: measured by the planner). The desc's pointers are
   replaced by the pipeline's own copies: the caller's may be gone. */
static mpar_result mpar__cost_current(mpar_pipeline* p, const double* flops, mpar_plan* out) {
    mpar_stage_desc st[4 * MPAR__MAX_WORKERS];
    int rec[4 * MPAR__MAX_WORKERS], j;
    mpar_pipeline_desc d = p->desc;
    mpar_plan_options o;
    for (j = 0; j < p->vs_count; j++) {
        st[j].device = p->vs[j].device, st[j].first_layer = p->vs[j].first, st[j].last_layer = p->vs[j].last;
        rec[j] = p->stage_recompute[j];
    }
    d.stages = st, d.stage_count = p->vs_count, d.recompute_stages = rec, d.plan = NULL, d.plan_options = NULL;
    if (d.schedule_lists) d.schedule_lists = p->schedule; /* the same lists, the pipeline's copy */
    d.max_in_flight = p->rb ? d.max_in_flight : mpar__sched_kind_synthesized(d.schedule) ? p->auto_caps : NULL;
    memset(&o, 0, sizeof o);
    o.mode = MPAR_PLAN_MANUAL, o.device_flops = flops;
    return mpar_pipeline_plan(p->ctx, p->model, &d, &o, out);
}

MPARDEF mpar_result mpar_pipeline_get_plan(mpar_pipeline* p, mpar_plan* out) {
    mpar_plan costed;
    int j;
    if (out) memset(out, 0, sizeof *out); /* safe to free whatever happens */
    MPAR__TRY(mpar__pipeline_check(p, "mpar_pipeline_get_plan"));
    if (!out) return mpar__fail(p->ctx, MPAR_ERROR_INVALID_ARGUMENT, "mpar_pipeline_get_plan: out is NULL");
    if (p->damaged == 2) return mpar__damaged(p);
    if (!p->plan && p->ranks == 1 && mpar__cost_current(p, NULL, &costed) == MPAR_SUCCESS)
        mpar__keep_plan(p, &costed, 1);
    if (p->plan) {
        MPAR__TRY(mpar__plan_dup(p->ctx, p->plan, out));
    } else { /* across processes, or the planner could not cost them: the ranges alone */
        out->allocator = p->ctx->allocator;
        out->stages = (mpar_plan_stage*)mpar__alloc(p->ctx, sizeof(mpar_plan_stage) * (size_t)p->vs_count);
        if (!out->stages) return mpar__fail(p->ctx, MPAR_ERROR_OUT_OF_HOST_MEMORY, "out of host memory");
        memset(out->stages, 0, sizeof(mpar_plan_stage) * (size_t)p->vs_count);
        out->num_stages = p->vs_count;
    }
    /* what runs, whatever the plan said */
    out->schedule = p->desc.schedule;
    out->microbatches = p->schedule->microbatches;
    out->virtual_stages = p->schedule->virtual_stages;
    out->activation_type = p->desc.activation_type;
    for (j = 0; j < out->num_stages && j < p->vs_count; j++) {
        out->stages[j].device = p->vs[j].device;
        out->stages[j].first_layer = p->vs[j].first, out->stages[j].last_layer = p->vs[j].last;
        out->stages[j].recompute = p->vs[j].recompute;
    }
    return MPAR_SUCCESS;
}

/* desc.rebalance at creation: the pipeline keeps its own stages and copies
   of what a rebuild reads again (the caller's arrays may be gone by then). */
static mpar_result mpar__rebalance_setup(mpar_pipeline* p) {
    mpar_pipeline_desc* d = &p->desc;
    mpar__rebalance* rb;
    mpar_error err;
    int i, j;
    if (!d->rebalance) return MPAR_SUCCESS;
    for (i = 0; i < p->workers_count; i++)
        for (j = 0; j < i; j++)
            if (p->workers[i].device == p->workers[j].device)
                return mpar__fail(p->ctx, MPAR_ERROR_UNSUPPORTED, "rebalance: stages %d and %d share device %d, so "
                                  "neither one's speed can be measured; give each stage a device of its own", j, i,
                                  p->workers[i].device);
    rb = (mpar__rebalance*)mpar__alloc(p->ctx, sizeof *rb);
    if (!rb) return mpar__fail(p->ctx, MPAR_ERROR_OUT_OF_HOST_MEMORY, "out of host memory");
    memset(rb, 0, sizeof *rb);
    p->rb = rb;
    for (j = 0; j < p->vs_count; j++) {
        rb->stages[j].device = p->vs[j].device;
        rb->stages[j].first_layer = p->vs[j].first, rb->stages[j].last_layer = p->vs[j].last;
        rb->recompute[j] = p->stage_recompute[j];
    }
    if (d->max_in_flight) {
        memcpy(rb->caps, d->max_in_flight, sizeof(int) * (size_t)p->workers_count);
        d->max_in_flight = rb->caps;
    }
    if (d->schedule_lists) {
        if (mpar_schedule_copy(&p->ctx->allocator, d->schedule_lists, &rb->lists, &err) != MPAR_SUCCESS)
            return mpar__fail(p->ctx, err.code, "%s", err.message);
        d->schedule_lists = rb->lists;
    }
    if (d->plan_options) { /* its scalars; the arrays it points to are the caller's */
        rb->options = *d->plan_options;
        rb->options.weights = rb->options.device_flops = NULL;
        rb->options.measured_forward = rb->options.measured_backward_input = NULL;
        rb->options.measured_backward_weight = NULL;
    }
    d->stages = rb->stages, d->stage_count = p->vs_count, d->recompute_stages = rb->recompute;
    d->plan = NULL, d->plan_options = &rb->options;
    rb->window = d->rebalance_warmup;
    return MPAR_SUCCESS;
}

static void mpar__rebalance_free(mpar_pipeline* p) {
    if (p->rb) {
        mpar_schedule_destroy(p->rb->lists);
        mpar__free(p->ctx, p->rb);
        p->rb = NULL;
    }
    mpar__set_plan(p, NULL);
}

static void mpar__rebalance_stats(const mpar_pipeline* p, mpar_pipeline_stats* out) {
    if (!p->rb) return;
    out->rebalances = p->rb->moves, out->rebalance_checks = p->rb->checks;
    out->rebalance_failures = p->rb->failures;
}

/* After a training or gradient job that ran its stages at once (a job run
   one stage at a time, compiling, times nothing real): each stage's action
   time without the link waits inside it; a stage's least over the steps
   measured is what re-planning uses. */
static void mpar__rebalance_measure(mpar_pipeline* p, mpar__job job) {
    mpar__rebalance* rb = p->rb;
    int i;
    if (!rb || p->serial || (job != MPAR__JOB_GRADS && job != MPAR__JOB_TRAIN)) return;
    for (i = 0; i < p->workers_count; i++) { /* the least: other work on the machine only adds time */
        double t = p->workers[i].busy_s - p->workers[i].wait_s;
        if (t < 0.0) t = 0.0;
        if (!rb->measured || t < rb->busy[i]) rb->busy[i] = t;
    }
    rb->measured++;
}

/* FLOP/s per context device for the planner: given, or each stage's
   planner FLOPs (its layers' F + B + W per micro-batch, times the
   micro-batches) over its measured seconds per step (the least of the
   steps measured: other work on the machine only adds time), so that the
   planner's model predicts what was measured. A device's speed does not
   depend on the stages it runs, so both sums carry over re-plans and
   moves, each older window weighing half as much: one noisy window (a
   core taken by another process) cannot swing the plan alone. Devices
   the pipeline does not use get a thousandth of the slowest: the planner
   leaves them out. */
static mpar_result mpar__rebalance_speeds(mpar_pipeline* p, const double* given, double* flops) {
    int n = mpar_device_count(p->ctx), used[MPAR__MAX_DEVICES], i, j, k;
    double slowest = DBL_MAX;
    mpar_plan_layer* layers;
    mpar_error err;
    if (given) {
        for (i = 0; i < n; i++) {
            if (!(given[i] > 0.0 && given[i] <= DBL_MAX))
                return mpar__fail(p->ctx, MPAR_ERROR_INVALID_ARGUMENT, "mpar_pipeline_rebalance: device_flops[%d] is "
                                  "%g; give every device's FLOP/s, positive and finite", i, given[i]);
            flops[i] = given[i];
        }
        return MPAR_SUCCESS;
    }
    if (!p->rb->measured)
        return mpar__fail(p->ctx, MPAR_ERROR_INVALID_STATE, "mpar_pipeline_rebalance: no training step measured since "
                          "the pipeline was built or last re-planned (a shape's first step runs one stage at a time "
                          "and is not measured); train first, or give device_flops");
    layers = (mpar_plan_layer*)mpar__alloc(p->ctx, sizeof(mpar_plan_layer) * (size_t)p->layer_count);
    if (!layers) return mpar__fail(p->ctx, MPAR_ERROR_OUT_OF_HOST_MEMORY, "out of host memory");
    if (mpar_pipeline_plan_layers(p->model, &p->desc, layers, &err) != MPAR_SUCCESS) {
        mpar__free(p->ctx, layers);
        return mpar__fail(p->ctx, err.code, "%s", err.message);
    }
    memset(used, 0, sizeof used);
    for (i = 0; i < p->workers_count; i++) {
        double work = 0.0, t = p->rb->busy[i];
        for (j = 0; j < p->vs_count; j++)
            for (k = p->vs[j].first; p->vs[j].worker == i && k <= p->vs[j].last; k++)
                work += layers[k].flops_forward + layers[k].flops_backward_input + layers[k].flops_backward_weight;
        work *= p->schedule->microbatches;
        if (!(t > 0.0) || !(work > 0.0)) {
            mpar__free(p->ctx, layers);
            return mpar__fail(p->ctx, MPAR_ERROR_INVALID_STATE, "mpar_pipeline_rebalance: stage %d measured %g s for "
                              "%g FLOPs, which gives no speed; give device_flops", i, t, work);
        }
        k = p->workers[i].device;
        p->rb->work[k] = 0.5 * p->rb->work[k] + work, p->rb->seconds[k] = 0.5 * p->rb->seconds[k] + t;
        flops[k] = p->rb->work[k] / p->rb->seconds[k], used[k] = 1;
        if (flops[k] < slowest) slowest = flops[k];
    }
    for (i = 0; i < n; i++)
        if (!used[i]) flops[i] = slowest * 1e-3;
    mpar__free(p->ctx, layers);
    return MPAR_SUCCESS;
}

/* What a rebuild keeps besides the devices' state. */
typedef struct mpar__kept {
    int step, grads_ready, force_serial;
    float step_lr, step_scale;
    double last_loss, opt_norm;
    mpar__rebalance* rb;
    mpar_plan* plan;
} mpar__kept;

/* Every layer's PARAMS, GRADS, MOMENT1 and MOMENT2, in that order, layer
   after layer, between the devices and `host`. */
static mpar_result mpar__state_all(mpar_pipeline* p, float* host, int write) {
    int l, kind;
    for (l = 0; l < p->layer_count; l++) {
        size_t n = mpar_model_layer(p->model, l)->param_count;
        for (kind = (int)MPAR_STATE_PARAMS; kind <= (int)MPAR_STATE_MOMENT2; kind++, host += n)
            MPAR__TRY(mpar__param_io(p, l, host, kind, write));
    }
    return MPAR_SUCCESS;
}

/* Tears the executor down and builds it again from `d`, in the same
   object, then writes the state back. */
static mpar_result mpar__pipeline_remake(mpar_pipeline* p, const mpar_pipeline_desc* d, const mpar__kept* k,
                                         float* host) {
    mpar_context* ctx = p->ctx;
    const mpar_model* model = p->model;
    struct mpar__guard* guard = p->guard; /* the call in progress stays in progress */
    mpar_result r;
    mpar__pipeline_release(p);
    r = mpar__pipeline_init(p, ctx, model, d, 0);
    p->guard = guard, p->live = MPAR__LIVE_PIPELINE;
    p->rb = k->rb, p->plan = k->plan;
    p->step = k->step, p->grads_ready = k->grads_ready, p->force_serial = k->force_serial;
    p->step_lr = k->step_lr, p->step_scale = k->step_scale, p->last_loss = k->last_loss, p->opt_norm = k->opt_norm;
    if (r == MPAR_SUCCESS) r = mpar__pipeline_start(p);
    if (r == MPAR_SUCCESS) r = mpar__state_all(p, host, 1);
    return r;
}

/* Moves to the stages of `next`: the state to host memory, the executor
   rebuilt with the new stages, the state back. A failure rebuilds the old
   stages with the same state; only if that fails too is the pipeline left
   without stages (damaged = 2). */
static mpar_result mpar__rebalance_move(mpar_pipeline* p, const mpar_plan* next, const char* from, const char* to) {
    mpar__rebalance* rb = p->rb;
    mpar_stage_desc old_stages[4 * MPAR__MAX_WORKERS];
    int old_rec[4 * MPAR__MAX_WORKERS], j, l, n = p->vs_count;
    mpar_pipeline_desc d = p->desc; /* its arrays are rb's */
    mpar__kept k;
    size_t total = 1;
    float* host;
    mpar_result r;
    char why[1024], why2[1024];
    for (l = 0; l < p->layer_count; l++) total += 4 * mpar_model_layer(p->model, l)->param_count;
    host = (float*)mpar__alloc(p->ctx, sizeof(float) * total);
    if (!host) return mpar__fail(p->ctx, MPAR_ERROR_OUT_OF_HOST_MEMORY, "re-balancing: no host memory for the "
                                 "%zu bytes of state to move", sizeof(float) * total);
    r = mpar__state_all(p, host, 0);
    if (r != MPAR_SUCCESS) { /* nothing changed yet */
        mpar__free(p->ctx, host);
        return r;
    }
    k.step = p->step, k.grads_ready = p->grads_ready, k.force_serial = p->force_serial;
    k.step_lr = p->step_lr, k.step_scale = p->step_scale, k.last_loss = p->last_loss, k.opt_norm = p->opt_norm;
    k.rb = p->rb, k.plan = p->plan;
    memcpy(old_stages, rb->stages, sizeof(mpar_stage_desc) * (size_t)n);
    memcpy(old_rec, rb->recompute, sizeof(int) * (size_t)n);
    for (j = 0; j < n; j++) {
        rb->stages[j].device = next->stages[j].device;
        rb->stages[j].first_layer = next->stages[j].first_layer, rb->stages[j].last_layer = next->stages[j].last_layer;
        rb->recompute[j] = next->stages[j].recompute != 0;
    }
    r = mpar__pipeline_remake(p, &d, &k, host);
    if (r == MPAR_SUCCESS) {
        mpar__free(p->ctx, host);
        return MPAR_SUCCESS;
    }
    snprintf(why, sizeof why, "%s", mpar_last_error(p->ctx));
    memcpy(rb->stages, old_stages, sizeof(mpar_stage_desc) * (size_t)n);
    memcpy(rb->recompute, old_rec, sizeof(int) * (size_t)n);
    if (mpar__pipeline_remake(p, &d, &k, host) != MPAR_SUCCESS) {
        mpar_result r2 = MPAR_ERROR_INVALID_STATE;
        snprintf(why2, sizeof why2, "%s", mpar_last_error(p->ctx));
        mpar__free(p->ctx, host);
        p->damaged = 2;
        return mpar__fail(p->ctx, r2, "re-balancing %s -> %s failed (%.400s), and rebuilding %s failed too "
                          "(%.400s): the pipeline lost its stages and state; destroy it", from, to, why, from, why2);
    }
    mpar__free(p->ctx, host);
    return mpar__fail(p->ctx, r, "re-balancing %s -> %s failed, so the pipeline goes on with its old stages and "
                      "state: %.800s", from, to, why);
}

/* One re-plan: the current stages and the planner's best on the same
   devices in the same order, both costed with the same speeds; a move when
   the gain passes the threshold. */
static mpar_result mpar__rebalance_now(mpar_pipeline* p, const double* given, int* moved) {
    mpar__rebalance* rb = p->rb;
    double flops[MPAR__MAX_DEVICES];
    mpar_pipeline_desc d = p->desc; /* desc.stages are rb->stages: the current ones */
    mpar_plan_options o;
    mpar_plan cur, next;
    mpar_result r;
    int j, same, differs = 0, rising = 1;
    char from[256], to[256];
    *moved = 0;
    MPAR__TRY(mpar__rebalance_speeds(p, given, flops));
    rb->checks++;
    memset(rb->busy, 0, sizeof rb->busy), rb->measured = 0; /* the next re-plan measures afresh */
    memset(&o, 0, sizeof o);
    o.reserve_bytes = rb->options.reserve_bytes;
    o.link_bandwidth = rb->options.link_bandwidth, o.link_latency = rb->options.link_latency;
    o.mode = MPAR_PLAN_MANUAL, o.device_flops = flops;
    r = mpar_pipeline_plan(p->ctx, p->model, &d, &o, &cur);
    if (r != MPAR_SUCCESS) {
        rb->failures++;
        return r;
    }
    for (j = 1; j < p->workers_count; j++) rising &= p->workers[j].device > p->workers[j - 1].device;
    o.mode = MPAR_PLAN_OPTIMAL, o.use_devices = p->workers_count;
    o.order = rising ? MPAR_PLAN_ORDER_FIXED : MPAR_PLAN_ORDER_SEARCH;
    r = mpar_pipeline_plan(p->ctx, p->model, &d, &o, &next);
    if (r != MPAR_SUCCESS) {
        mpar_plan_free(&cur);
        rb->failures++;
        return r;
    }
    same = next.num_stages == p->vs_count;
    for (j = 0; same && j < p->vs_count; j++) {
        same = next.stages[j].device == rb->stages[j].device;
        differs |= next.stages[j].first_layer != rb->stages[j].first_layer ||
                   next.stages[j].last_layer != rb->stages[j].last_layer ||
                   (next.stages[j].recompute != 0) != (rb->recompute[j] != 0);
    }
    mpar_plan_to_string(&cur, from, sizeof from);
    mpar_plan_to_string(&next, to, sizeof to);
    if (same && differs && next.step_seconds < cur.step_seconds * (1.0 - p->desc.rebalance_threshold)) {
        r = mpar__rebalance_move(p, &next, from, to);
        if (r == MPAR_SUCCESS) {
            *moved = 1;
            rb->moves++;
            mpar__log(p->ctx, MPAR_LOG_INFO, "re-balanced %s -> %s: predicted step %.4g s -> %.4g s", from, to,
                      cur.step_seconds, next.step_seconds);
            mpar__keep_plan(p, &next, 1); /* the plan in use now, costed with the measured speeds */
            mpar_plan_free(&cur);
            return MPAR_SUCCESS;
        }
        rb->failures++;
    } else {
        mpar__log(p->ctx, MPAR_LOG_INFO, "re-planned: %s stays (predicted step %.4g s; the planner's best on these "
                  "devices, %s, %.4g s%s)", from, cur.step_seconds, to, next.step_seconds,
                  same ? "" : ", puts the devices in another order");
    }
    mpar_plan_free(&cur);
    mpar_plan_free(&next);
    return r;
}

/* After a training step: desc.rebalance AUTO re-plans once its window of
   measured steps is full. The step itself is done; a re-plan or move that
   fails (and was undone) is logged and counted, and automatic re-planning
   stops. Only a pipeline left without stages reports it here. */
static mpar_result mpar__rebalance_after_step(mpar_pipeline* p) {
    mpar__rebalance* rb = p->rb;
    mpar_result r;
    int moved = 0, most;
    if (!rb || p->desc.rebalance != MPAR_REBALANCE_AUTO || rb->stopped || rb->measured < rb->window)
        return MPAR_SUCCESS;
    r = mpar__rebalance_now(p, NULL, &moved);
    if (r == MPAR_SUCCESS) {
        most = 64 * p->desc.rebalance_warmup;
        rb->window = rb->window > most / 2 ? most : 2 * rb->window;
        return MPAR_SUCCESS;
    }
    if (p->damaged == 2) return r;
    rb->stopped = 1;
    mpar__log(p->ctx, MPAR_LOG_WARN, "automatic re-balancing stops: %.900s", mpar_last_error(p->ctx));
    return MPAR_SUCCESS;
}

static mpar_result mpar__rebalance_impl(mpar_pipeline* p, const double* device_flops, int* moved) {
    mpar_result r;
    int local = 0;
    if (moved) *moved = 0;
    if (!p) return MPAR_ERROR_INVALID_ARGUMENT;
    if (p->damaged) return mpar__damaged(p);
    if (!p->rb)
        return mpar__fail(p->ctx, MPAR_ERROR_INVALID_STATE, "mpar_pipeline_rebalance: the pipeline was created "
                          "without desc.rebalance (MPAR_REBALANCE_AUTO or MPAR_REBALANCE_MANUAL)");
    r = mpar__rebalance_now(p, device_flops, &local);
    if (moved) *moved = local;
    return r;
}

#ifndef MPAR_PART_CHECKPOINT_IMPL
#define MPAR_PART_CHECKPOINT_IMPL

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <math.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define MPAR__CKPT_MAGIC "MPARCKPT"
#define MPAR__CKPT_END "MPAR-END"
#define MPAR__CKPT_BOM 0x01020304u
#define MPAR__CKPT_HEADER 64u
#define MPAR__CKPT_RECORD 56u
#define MPAR__CKPT_TRAILER 16u
/* header + table checksum + trailer: the smallest file with no layers */
#define MPAR__CKPT_MIN (MPAR__CKPT_HEADER + 8u + MPAR__CKPT_TRAILER)
/* the least a layer takes: a record with a 1..8-byte name, a data checksum */
#define MPAR__CKPT_LAYER_MIN (MPAR__CKPT_RECORD + 8u + 8u)
#define MPAR__CKPT_HASH_SEED 0x6D70617263686B31ULL
#define MPAR__CKPT_NO_OPTIMIZER 2u /* the optimizer kind of a weights-only file */
#ifdef O_CLOEXEC
#define MPAR__CKPT_CLOEXEC O_CLOEXEC
#else
#define MPAR__CKPT_CLOEXEC 0
#endif

/* ---- little-endian fields ---- */
static uint32_t mpar__ckpt_rd32(const unsigned char* p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}
static uint64_t mpar__ckpt_rd64(const unsigned char* p) {
    return (uint64_t)mpar__ckpt_rd32(p) | (uint64_t)mpar__ckpt_rd32(p + 4) << 32;
}
static void mpar__ckpt_wr32(unsigned char* p, uint32_t v) {
    p[0] = (unsigned char)v, p[1] = (unsigned char)(v >> 8), p[2] = (unsigned char)(v >> 16),
    p[3] = (unsigned char)(v >> 24);
}
static void mpar__ckpt_wr64(unsigned char* p, uint64_t v) {
    mpar__ckpt_wr32(p, (uint32_t)v);
    mpar__ckpt_wr32(p + 4, (uint32_t)(v >> 32));
}
static float mpar__ckpt_rdf(const unsigned char* p) {
    uint32_t u = mpar__ckpt_rd32(p);
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}
static void mpar__ckpt_wrf(unsigned char* p, float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    mpar__ckpt_wr32(p, u);
}
static int mpar__ckpt_host_le(void) {
    const uint32_t one = 1;
    unsigned char b[4];
    memcpy(b, &one, 4);
    return b[0] == 1;
}
/* float arrays <-> little-endian bytes */
static void mpar__ckpt_encode(unsigned char* out, const float* in, size_t n) {
    size_t i;
    if (mpar__ckpt_host_le()) {
        if (n) memcpy(out, in, n * 4);
        return;
    }
    for (i = 0; i < n; i++) mpar__ckpt_wrf(out + 4 * i, in[i]);
}
static void mpar__ckpt_decode(float* out, const unsigned char* in, size_t n) {
    size_t i;
    if (mpar__ckpt_host_le()) {
        if (n) memcpy(out, in, n * 4);
        return;
    }
    for (i = 0; i < n; i++) out[i] = mpar__ckpt_rdf(in + 4 * i);
}

/* ---- the "mpar64" checksum (see the format), streamable ---- */
typedef struct mpar__ckpt_hash {
    uint64_t h, length;
    unsigned char tail[8];
    unsigned pending;
} mpar__ckpt_hash;

static uint64_t mpar__ckpt_mix(uint64_t x) {
    x *= 0x9E3779B97F4A7C15ULL;
    x ^= x >> 29;
    x *= 0xBF58476D1CE4E5B9ULL;
    x ^= x >> 32;
    return x;
}
static void mpar__ckpt_hash_init(mpar__ckpt_hash* s) {
    memset(s, 0, sizeof *s);
    s->h = MPAR__CKPT_HASH_SEED;
}
static void mpar__ckpt_hash_add(mpar__ckpt_hash* s, const void* data, size_t n) {
    const unsigned char* p = (const unsigned char*)data;
    s->length += n;
    while (s->pending && n) { /* finish a word begun by the previous call */
        s->tail[s->pending++] = *p++, n--;
        if (s->pending == 8) s->h = mpar__ckpt_mix(s->h ^ mpar__ckpt_rd64(s->tail)), s->pending = 0;
    }
    for (; n >= 8; p += 8, n -= 8) s->h = mpar__ckpt_mix(s->h ^ mpar__ckpt_rd64(p));
    while (n) s->tail[s->pending++] = *p++, n--;
}
static uint64_t mpar__ckpt_hash_end(mpar__ckpt_hash* s) {
    memset(s->tail + s->pending, 0, 8 - s->pending);
    s->h = mpar__ckpt_mix(s->h ^ mpar__ckpt_rd64(s->tail));
    return mpar__ckpt_mix(s->h ^ s->length);
}
static uint64_t mpar__ckpt_checksum(const void* data, size_t n) {
    mpar__ckpt_hash s;
    mpar__ckpt_hash_init(&s);
    mpar__ckpt_hash_add(&s, data, n);
    return mpar__ckpt_hash_end(&s);
}

/* two's complement int32 -> int, without implementation-defined casts */
static int mpar__ckpt_int(uint32_t v) { return v & 0x80000000u ? -(int)(~v) - 1 : (int)v; }

static size_t mpar__ckpt_pad8(size_t n) { return (n + 7u) & ~(size_t)7u; }

/* ---- parsing ---- */

/* The header fields after the trailer checksum proved the file intact (or,
   when diagnosing a checksum failure, to find what is wrong). */
static mpar_result mpar__ckpt_header(const unsigned char* d, size_t size, mpar_checkpoint_info* in,
                                     mpar_error* err) {
    uint32_t v = mpar__ckpt_rd32(d + 8), L = mpar__ckpt_rd32(d + 32), opt = mpar__ckpt_rd32(d + 36);
    uint64_t step = mpar__ckpt_rd64(d + 40);
    uint32_t inf = mpar__ckpt_rd32(d + 56), seq = mpar__ckpt_rd32(d + 60);
    if (v != MPAR_CHECKPOINT_FORMAT_VERSION && v != MPAR_WEIGHTS_FORMAT_VERSION)
        return mpar_error_set(err, MPAR_ERROR_UNSUPPORTED, "format version %lu at offset 8; this mpar reads versions "
                              "%d (checkpoints) and %d (weights only)", (unsigned long)v, MPAR_CHECKPOINT_FORMAT_VERSION,
                              MPAR_WEIGHTS_FORMAT_VERSION);
    if (mpar__ckpt_rd32(d + 12) != MPAR__CKPT_HEADER)
        return mpar_error_set(err, MPAR_ERROR_CORRUPT, "header size %lu at offset 12, expected %u",
                              (unsigned long)mpar__ckpt_rd32(d + 12), MPAR__CKPT_HEADER);
    if (mpar__ckpt_rd32(d + 20) != MPAR__CKPT_BOM)
        return mpar_error_set(err, MPAR_ERROR_CORRUPT, "byte-order mark 0x%08lx at offset 20, expected 0x%08x",
                              (unsigned long)mpar__ckpt_rd32(d + 20), MPAR__CKPT_BOM);
    if (L == 0 || L > (size - MPAR__CKPT_MIN) / MPAR__CKPT_LAYER_MIN || L > (uint32_t)INT_MAX)
        return mpar_error_set(err, MPAR_ERROR_CORRUPT, "layer count %lu at offset 32 is impossible in %lu bytes",
                              (unsigned long)L, (unsigned long)size);
    if (v == MPAR_CHECKPOINT_FORMAT_VERSION ? opt > (uint32_t)MPAR_OPTIMIZER_SGD : opt != MPAR__CKPT_NO_OPTIMIZER)
        return mpar_error_set(err, MPAR_ERROR_CORRUPT, "optimizer kind %lu at offset 36 is not one of version %lu's",
                              (unsigned long)opt, (unsigned long)v);
    if (v == MPAR_WEIGHTS_FORMAT_VERSION && step != 0)
        return mpar_error_set(err, MPAR_ERROR_CORRUPT, "step %llu at offset 40 in a weights-only file (0 there)",
                              (unsigned long long)step);
    if (step > (uint64_t)INT_MAX)
        return mpar_error_set(err, MPAR_ERROR_CORRUPT, "step %llu at offset 40 is out of range",
                              (unsigned long long)step);
    if (inf == 0 || inf > (uint32_t)INT_MAX || seq == 0 || seq > (uint32_t)INT_MAX)
        return mpar_error_set(err, MPAR_ERROR_CORRUPT, "model input_features %lu (offset 56) or seq_len %lu (offset "
                              "60) is out of range", (unsigned long)inf, (unsigned long)seq);
    in->format_version = v;
    in->mpar_version = mpar__ckpt_rd32(d + 16);
    in->size = size;
    in->layer_count = (int)L;
    in->weights_only = v == MPAR_WEIGHTS_FORMAT_VERSION;
    in->optimizer = in->weights_only ? MPAR_OPTIMIZER_ADAMW : (mpar_optimizer_kind)opt;
    in->step = (int)step;
    in->seed = mpar__ckpt_rd64(d + 48);
    in->input_features = (int)inf;
    in->seq_len = (int)seq;
    return MPAR_SUCCESS;
}

/* One layer table record at `pos`; `end` is where the trailer begins. */
static mpar_result mpar__ckpt_record(const unsigned char* d, size_t pos, size_t end, int i, int prev_out,
                                     unsigned per, mpar_checkpoint_layer* l, size_t* next, mpar_error* err) {
    const unsigned char* r = d + pos;
    uint32_t rec, n, k, fields[6];
    uint64_t P;
    size_t j;
    if (end - pos < MPAR__CKPT_RECORD + 8u)
        return mpar_error_set(err, MPAR_ERROR_CORRUPT, "layer %d: table record at offset %lu runs past the end", i,
                              (unsigned long)pos);
    rec = mpar__ckpt_rd32(r), n = mpar__ckpt_rd32(r + 4);
    if (n == 0 || n > MPAR_CHECKPOINT_MAX_NAME)
        return mpar_error_set(err, MPAR_ERROR_CORRUPT, "layer %d: type name length %lu at offset %lu (1..%d)", i,
                              (unsigned long)n, (unsigned long)pos + 4, MPAR_CHECKPOINT_MAX_NAME);
    if (rec != MPAR__CKPT_RECORD + mpar__ckpt_pad8(n))
        return mpar_error_set(err, MPAR_ERROR_CORRUPT, "layer %d: record size %lu at offset %lu, expected %lu", i,
                              (unsigned long)rec, (unsigned long)pos, (unsigned long)(MPAR__CKPT_RECORD + mpar__ckpt_pad8(n)));
    if (end - pos < (size_t)rec + 8u)
        return mpar_error_set(err, MPAR_ERROR_CORRUPT, "layer %d: table record at offset %lu (%lu bytes) runs past "
                              "the end", i, (unsigned long)pos, (unsigned long)rec);
    for (j = 0; j < rec - MPAR__CKPT_RECORD; j++) {
        unsigned char c = r[MPAR__CKPT_RECORD + j];
        if ((j < n && c == 0) || (j >= n && c != 0))
            return mpar_error_set(err, MPAR_ERROR_CORRUPT, "layer %d: %s at offset %lu", i,
                                  j < n ? "NUL inside the type name" : "non-zero padding after the type name",
                                  (unsigned long)(pos + MPAR__CKPT_RECORD + j));
    }
    memcpy(l->type_name, r + MPAR__CKPT_RECORD, n);
    l->type_name[n] = '\0';
    for (k = 0; k < 2; k++) {
        fields[k] = mpar__ckpt_rd32(r + 8 + 4 * k);
        if (fields[k] == 0 || fields[k] > (uint32_t)INT_MAX)
            return mpar_error_set(err, MPAR_ERROR_CORRUPT, "layer %d: %s %lu at offset %lu is out of range", i,
                                  k == 0 ? "in_features" : "out_features", (unsigned long)fields[k],
                                  (unsigned long)(pos + 8 + 4 * k));
    }
    for (k = 2; k < 6; k++) fields[k] = mpar__ckpt_rd32(r + 32 + 4 * (k - 2));
    if ((int)fields[0] != prev_out)
        return mpar_error_set(err, MPAR_ERROR_CORRUPT, "layer %d: in_features %lu at offset %lu, but the layer "
                              "before gives %d", i, (unsigned long)fields[0], (unsigned long)pos + 8, prev_out);
    l->in_features = (int)fields[0], l->out_features = (int)fields[1];
    l->units = mpar__ckpt_int(fields[2]), l->vocab = mpar__ckpt_int(fields[3]);
    l->heads = mpar__ckpt_int(fields[4]), l->hidden = mpar__ckpt_int(fields[5]);
    l->rate = mpar__ckpt_rdf(r + 48), l->eps = mpar__ckpt_rdf(r + 52);
    if (!isfinite(l->rate) || !isfinite(l->eps))
        return mpar_error_set(err, MPAR_ERROR_CORRUPT, "layer %d: rate or eps at offset %lu is not finite", i,
                              (unsigned long)pos + 48);
    P = mpar__ckpt_rd64(r + 16);
    if (P > (uint64_t)(end / per)) /* per·P bytes of data must fit (12, or 4 for weights only) */
        return mpar_error_set(err, MPAR_ERROR_CORRUPT, "layer %d: parameter count %llu at offset %lu cannot fit in "
                              "the file", i, (unsigned long long)P, (unsigned long)pos + 16);
    l->param_count = (size_t)P;
    l->checksum_offset = pos; /* until the layout check: where the record is */
    *next = pos + rec;
    return MPAR_SUCCESS;
}

/* Bytes of data per parameter: PARAMS, MOMENT1, MOMENT2; PARAMS alone in
   a weights-only file. */
static unsigned mpar__ckpt_per_param(const mpar_checkpoint_info* in) { return in->weights_only ? 4u : 12u; }

/* Layout and section checksums, after the header. */
static mpar_result mpar__ckpt_layout(const unsigned char* d, size_t size, mpar_checkpoint_info* in, mpar_error* err) {
    size_t end = size - MPAR__CKPT_TRAILER, pos = MPAR__CKPT_HEADER, table_end;
    int i, prev_out = in->input_features;
    mpar_result r;
    for (i = 0; i < in->layer_count; i++) {
        r = mpar__ckpt_record(d, pos, end, i, prev_out, mpar__ckpt_per_param(in), &in->layers[i], &pos, err);
        if (r != MPAR_SUCCESS) return r;
        prev_out = in->layers[i].out_features;
    }
    table_end = pos; /* the records left room for 8 more bytes */
    if (mpar__ckpt_rd64(d + table_end) != mpar__ckpt_checksum(d, table_end))
        return mpar_error_set(err, MPAR_ERROR_CORRUPT, "header or layer table (bytes 0..%lu) does not match its "
                              "checksum at offset %lu", (unsigned long)table_end, (unsigned long)table_end);
    pos = table_end + 8;
    for (i = 0; i < in->layer_count; i++) {
        mpar_checkpoint_layer* l = &in->layers[i];
        size_t bytes = mpar__ckpt_per_param(in) * l->param_count;
        uint64_t stated = mpar__ckpt_rd64(d + l->checksum_offset + 24);
        if (stated != (uint64_t)pos)
            return mpar_error_set(err, MPAR_ERROR_CORRUPT, "layer %d (%s): data offset %llu at offset %lu, expected "
                                  "%lu", i, l->type_name, (unsigned long long)stated,
                                  (unsigned long)(l->checksum_offset + 24), (unsigned long)pos);
        l->params_offset = pos;
        if (end - pos < 8u || bytes > end - pos - 8u)
            return mpar_error_set(err, MPAR_ERROR_CORRUPT, "layer %d (%s): data at offset %lu (%lu bytes) runs past "
                                  "the end", i, l->type_name, (unsigned long)pos, (unsigned long)bytes + 8);
        l->moment1_offset = in->weights_only ? 0 : pos + 4u * l->param_count; /* 0: none */
        l->moment2_offset = in->weights_only ? 0 : pos + 8u * l->param_count;
        l->checksum_offset = pos + bytes;
        if (mpar__ckpt_rd64(d + pos + bytes) != mpar__ckpt_checksum(d + pos, bytes))
            return mpar_error_set(err, MPAR_ERROR_CORRUPT, "layer %d (%s): data (bytes %lu..%lu) does not match its "
                                  "checksum at offset %lu", i, l->type_name, (unsigned long)pos,
                                  (unsigned long)(pos + bytes), (unsigned long)(pos + bytes));
        pos += bytes + 8u;
    }
    if (pos != end)
        return mpar_error_set(err, MPAR_ERROR_CORRUPT, "%lu unexpected bytes between the last layer's data (ends at "
                              "offset %lu) and the trailer", (unsigned long)(end - pos), (unsigned long)pos);
    return MPAR_SUCCESS;
}

static mpar_result mpar__ckpt_body(const unsigned char* d, size_t size, mpar_checkpoint_info* in, mpar_error* err) {
    mpar_result r = mpar__ckpt_header(d, size, in, err);
    if (r != MPAR_SUCCESS) return r;
    /* bounded: layer_count <= size / MPAR__CKPT_LAYER_MIN */
    if ((size_t)in->layer_count > (size_t)-1 / sizeof(mpar_checkpoint_layer))
        return mpar_error_set(err, MPAR_ERROR_CORRUPT, "layer count %d is too large", in->layer_count);
    in->layers = (mpar_checkpoint_layer*)mpar__alloc_a(&in->allocator,
                                                       sizeof(mpar_checkpoint_layer) * (size_t)in->layer_count);
    if (!in->layers) return mpar_error_set(err, MPAR_ERROR_OUT_OF_HOST_MEMORY, "out of host memory");
    memset(in->layers, 0, sizeof(mpar_checkpoint_layer) * (size_t)in->layer_count);
    r = mpar__ckpt_layout(d, size, in, err);
    if (r != MPAR_SUCCESS) {
        mpar__free_a(&in->allocator, in->layers);
        in->layers = NULL;
    }
    return r;
}

MPARDEF mpar_result mpar_checkpoint_parse(const void* data, size_t size, mpar_checkpoint_info* info,
                                          mpar_error* err) {
    return mpar_checkpoint_parse_with(NULL, data, size, info, err);
}

MPARDEF mpar_result mpar_checkpoint_parse_with(const mpar_allocator* allocator, const void* data, size_t size,
                                               mpar_checkpoint_info* info, mpar_error* err) {
    const unsigned char* d = (const unsigned char*)data;
    mpar_checkpoint_info in;
    uint64_t stated;
    mpar_result r;
    if (info) memset(info, 0, sizeof *info);
    if (!data && size) return mpar_error_set(err, MPAR_ERROR_INVALID_ARGUMENT, "mpar_checkpoint_parse: data is NULL");
    if (!mpar__allocator_ok(allocator))
        return mpar_error_set(err, MPAR_ERROR_INVALID_ARGUMENT, "mpar_checkpoint_parse: give the allocator all three "
                              "functions or none");
    memset(&in, 0, sizeof in);
    in.allocator = mpar__allocator_copy(allocator);
    if (size < MPAR__CKPT_MIN)
        return mpar_error_set(err, MPAR_ERROR_CORRUPT, "truncated: the file ends at offset %lu, a checkpoint has at least %u bytes",
                              (unsigned long)size, MPAR__CKPT_MIN);
    if (memcmp(d, MPAR__CKPT_MAGIC, 8) != 0)
        return mpar_error_set(err, MPAR_ERROR_CORRUPT, "not an mpar checkpoint: bad magic at offset 0");
    stated = mpar__ckpt_rd64(d + 24);
    if (stated > (uint64_t)size)
        return mpar_error_set(err, MPAR_ERROR_CORRUPT, "truncated: the header (offset 24) says %llu bytes, there are "
                              "%lu", (unsigned long long)stated, (unsigned long)size);
    if (stated < (uint64_t)size)
        return mpar_error_set(err, MPAR_ERROR_CORRUPT, "%lu bytes of trailing garbage from offset %llu (the size "
                              "stated at offset 24)", (unsigned long)(size - (size_t)stated),
                              (unsigned long long)stated);
    if (memcmp(d + size - MPAR__CKPT_TRAILER, MPAR__CKPT_END, 8) != 0)
        return mpar_error_set(err, MPAR_ERROR_CORRUPT, "no end marker at offset %lu",
                              (unsigned long)(size - MPAR__CKPT_TRAILER));
    if (mpar__ckpt_rd64(d + size - 8) != mpar__ckpt_checksum(d, size - 8)) {
        /* Say where, when a section checksum or the layout can tell. */
        mpar_error why;
        why.message[0] = '\0';
        r = mpar__ckpt_body(d, size, &in, &why);
        if (r == MPAR_SUCCESS) mpar__free_a(&in.allocator, in.layers);
        return mpar_error_set(err, MPAR_ERROR_CORRUPT, "checksum of the whole file (at offset %lu) does not match%s%s",
                              (unsigned long)(size - 8), r == MPAR_SUCCESS ? "" : ": ", r == MPAR_SUCCESS ? "" : why.message);
    }
    r = mpar__ckpt_body(d, size, &in, err);
    if (r != MPAR_SUCCESS) return r;
    if (info) *info = in;
    else mpar__free_a(&in.allocator, in.layers);
    return MPAR_SUCCESS;
}

MPARDEF void mpar_checkpoint_info_free(mpar_checkpoint_info* info) {
    if (!info) return;
    mpar__free_a(&info->allocator, info->layers);
    info->layers = NULL;
    info->layer_count = 0;
}

MPARDEF mpar_result mpar_checkpoint_get_state(const void* data, size_t size, const mpar_checkpoint_info* info,
                                              int layer, mpar_state_kind kind, float* out, mpar_error* err) {
    const mpar_checkpoint_layer* l;
    size_t off;
    if (!data || !info || !info->layers || layer < 0 || layer >= info->layer_count)
        return mpar_error_set(err, MPAR_ERROR_INVALID_ARGUMENT, "mpar_checkpoint_get_state: NULL argument or no "
                              "layer %d", layer);
    l = &info->layers[layer];
    off = kind == MPAR_STATE_PARAMS ? l->params_offset : kind == MPAR_STATE_MOMENT1 ? l->moment1_offset
        : kind == MPAR_STATE_MOMENT2 ? l->moment2_offset : (size_t)-1;
    if (off == (size_t)-1)
        return mpar_error_set(err, MPAR_ERROR_INVALID_ARGUMENT, "a checkpoint holds no state of kind %d", (int)kind);
    if (info->weights_only && kind != MPAR_STATE_PARAMS)
        return mpar_error_set(err, MPAR_ERROR_INVALID_ARGUMENT, "a weights-only file holds no optimizer moments "
                              "(layer %d)", layer);
    if (l->param_count == 0) return MPAR_SUCCESS;
    if (!out) return mpar_error_set(err, MPAR_ERROR_INVALID_ARGUMENT, "mpar_checkpoint_get_state: out is NULL");
    if (off > size || l->param_count > (size - off) / 4u)
        return mpar_error_set(err, MPAR_ERROR_INVALID_ARGUMENT, "layer %d: state at offset %lu lies outside the %lu "
                              "bytes given", layer, (unsigned long)off, (unsigned long)size);
    mpar__ckpt_decode(out, (const unsigned char*)data + off, l->param_count);
    return MPAR_SUCCESS;
}

/* ---- model matching ---- */

/* The model's seed. mpar.h has no public getter for the model descriptor
   yet; this reads it from the implementation's struct. */
static uint64_t mpar__ckpt_model_seed(const mpar_model* m) { return mpar_model_get_desc(m)->seed; }

static int mpar__ckpt_same_float(float a, float b) { return memcmp(&a, &b, sizeof a) == 0; }

static mpar_result mpar__ckpt_match_layer(const mpar_checkpoint_layer* c, const mpar_layer* l, int i,
                                          mpar_error* err) {
    const mpar_layer_desc* d = &l->desc;
    const char* name = l->type && l->type->name ? l->type->name : "?";
    if (strcmp(c->type_name, name) != 0 || c->in_features != l->in_features || c->out_features != l->out_features ||
        c->param_count != l->param_count)
        return mpar_error_set(err, MPAR_ERROR_MISMATCH, "layer %d differs: the checkpoint has %s %d->%d with %lu "
                              "parameters, the model %s %d->%d with %lu", i, c->type_name, c->in_features,
                              c->out_features, (unsigned long)c->param_count, name, l->in_features, l->out_features,
                              (unsigned long)l->param_count);
    if (c->units != d->units || c->vocab != d->vocab || c->heads != d->heads || c->hidden != d->hidden ||
        !mpar__ckpt_same_float(c->rate, d->rate) || !mpar__ckpt_same_float(c->eps, d->eps))
        return mpar_error_set(err, MPAR_ERROR_MISMATCH, "layer %d (%s) differs: the checkpoint has units %d vocab %d "
                              "heads %d hidden %d rate %g eps %g, the model units %d vocab %d heads %d hidden %d "
                              "rate %g eps %g", i, name, c->units, c->vocab, c->heads, c->hidden, (double)c->rate,
                              (double)c->eps, d->units, d->vocab, d->heads, d->hidden, (double)d->rate, (double)d->eps);
    return MPAR_SUCCESS;
}

/* structure_only: layers, shapes and seq_len; not the seed or the optimizer. */
static mpar_result mpar__ckpt_match(const mpar_checkpoint_info* info, const mpar_model* model,
                                    mpar_optimizer_kind optimizer, int structure_only, mpar_error* err) {
    int n, i;
    const mpar_layer* first;
    if (!info || !model || !info->layers)
        return mpar_error_set(err, MPAR_ERROR_INVALID_ARGUMENT, "mpar_checkpoint_match: NULL argument");
    n = mpar_model_layer_count(model);
    for (i = 0; i < n && i < info->layer_count; i++) {
        mpar_result r = mpar__ckpt_match_layer(&info->layers[i], mpar_model_layer(model, i), i, err);
        if (r != MPAR_SUCCESS) return r;
    }
    if (n != info->layer_count)
        return mpar_error_set(err, MPAR_ERROR_MISMATCH, "the checkpoint has %d layers, the model %d: layer %d (%s) "
                              "is missing from the %s", info->layer_count, n, i,
                              n > i ? mpar_model_layer(model, i)->type->name : info->layers[i].type_name,
                              n > i ? "checkpoint" : "model");
    first = mpar_model_layer(model, 0);
    if (first && first->seq_len != info->seq_len)
        return mpar_error_set(err, MPAR_ERROR_MISMATCH, "seq_len differs: %d in the checkpoint, %d in the model",
                              info->seq_len, first->seq_len);
    if (structure_only) return MPAR_SUCCESS;
    if (info->weights_only)
        return mpar_error_set(err, MPAR_ERROR_MISMATCH, "a weights-only file holds no optimizer state or step to "
                              "resume training from");
    if (mpar__ckpt_model_seed(model) != info->seed)
        return mpar_error_set(err, MPAR_ERROR_MISMATCH, "model seed differs: %llu in the checkpoint, %llu in the model "
                              "(dropout would not resume the same stream)", (unsigned long long)info->seed,
                              (unsigned long long)mpar__ckpt_model_seed(model));
    if (optimizer != info->optimizer)
        return mpar_error_set(err, MPAR_ERROR_MISMATCH, "optimizer differs: %s in the checkpoint, %s in the pipeline",
                              info->optimizer == MPAR_OPTIMIZER_ADAMW ? "AdamW" : "SGD",
                              optimizer == MPAR_OPTIMIZER_ADAMW ? "AdamW" : "SGD");
    return MPAR_SUCCESS;
}

MPARDEF mpar_result mpar_checkpoint_match(const mpar_checkpoint_info* info, const mpar_model* model,
                                          mpar_optimizer_kind optimizer, mpar_error* err) {
    return mpar__ckpt_match(info, model, optimizer, 0, err);
}

/* ---- saving ---- */

typedef struct mpar__ckpt_out {
    int fd;
    const char* path; /* for messages */
    const char* tmp;
    mpar__ckpt_hash file; /* everything written so far */
} mpar__ckpt_out;

static mpar_result mpar__ckpt_io(mpar_error* err, const char* what, const char* path, const char* tmp, int e) {
    return mpar_error_set(err, MPAR_ERROR_IO, "checkpoint '%s': %s%s%s%s: %s", path, what, tmp ? " '" : "",
                          tmp ? tmp : "", tmp ? "'" : "", strerror(e));
}

static mpar_result mpar__ckpt_write(mpar__ckpt_out* o, const void* data, size_t n, mpar_error* err) {
    const unsigned char* p = (const unsigned char*)data;
    mpar__ckpt_hash_add(&o->file, data, n);
    while (n) {
        size_t chunk = n < ((size_t)1 << 30) ? n : ((size_t)1 << 30);
        ssize_t w = write(o->fd, p, chunk);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) return mpar__ckpt_io(err, "cannot write the temp file", o->path, o->tmp, w < 0 ? errno : EIO);
        p += w, n -= (size_t)w;
    }
    return MPAR_SUCCESS;
}

/* Header, layer table and table checksum, built in memory. */
static unsigned char* mpar__ckpt_table(mpar_pipeline* p, size_t* table_bytes, uint64_t* file_size, size_t* max_params,
                                       mpar_result* code, mpar_error* err) {
    const mpar_model* m = mpar_pipeline_model(p);
    int L = mpar_model_layer_count(m), i;
    size_t T = MPAR__CKPT_HEADER, pos;
    uint64_t data = 0;
    unsigned char* t;
    *max_params = 0;
    if (L < 1) {
        *code = mpar_error_set(err, MPAR_ERROR_INVALID_ARGUMENT, "the pipeline's model has no layers");
        return NULL;
    }
    for (i = 0; i < L; i++) {
        const mpar_layer* l = mpar_model_layer(m, i);
        size_t n = l->type && l->type->name ? strlen(l->type->name) : 0;
        if (n == 0 || n > MPAR_CHECKPOINT_MAX_NAME) {
            *code = mpar_error_set(err, MPAR_ERROR_INVALID_ARGUMENT, "layer %d: its type name must have 1..%d "
                                   "characters to be saved", i, MPAR_CHECKPOINT_MAX_NAME);
            return NULL;
        }
        T += MPAR__CKPT_RECORD + mpar__ckpt_pad8(n);
        data += (p->ckpt_weights ? 4u : 12u) * (uint64_t)l->param_count + 8u;
        if (l->param_count > *max_params) *max_params = l->param_count;
    }
    t = (unsigned char*)mpar__alloc_a(&p->ctx->allocator, T + 8);
    if (!t) {
        *code = mpar_error_set(err, MPAR_ERROR_OUT_OF_HOST_MEMORY, "out of host memory");
        return NULL;
    }
    memset(t, 0, T + 8);
    *table_bytes = T + 8;
    *file_size = (uint64_t)T + 8u + data + MPAR__CKPT_TRAILER;
    memcpy(t, MPAR__CKPT_MAGIC, 8);
    mpar__ckpt_wr32(t + 8, p->ckpt_weights ? MPAR_WEIGHTS_FORMAT_VERSION : MPAR_CHECKPOINT_FORMAT_VERSION);
    mpar__ckpt_wr32(t + 12, MPAR__CKPT_HEADER);
    mpar__ckpt_wr32(t + 16, (uint32_t)(MPAR_VERSION_MAJOR << 16 | MPAR_VERSION_MINOR << 8 | MPAR_VERSION_PATCH));
    mpar__ckpt_wr32(t + 20, MPAR__CKPT_BOM);
    mpar__ckpt_wr64(t + 24, *file_size);
    mpar__ckpt_wr32(t + 32, (uint32_t)L);
    mpar__ckpt_wr32(t + 36, p->ckpt_weights ? MPAR__CKPT_NO_OPTIMIZER : (uint32_t)mpar_pipeline_get_desc(p)->optimizer.kind);
    mpar__ckpt_wr64(t + 40, p->ckpt_weights ? 0u : (uint64_t)mpar_pipeline_get_step(p));
    mpar__ckpt_wr64(t + 48, mpar__ckpt_model_seed(m));
    mpar__ckpt_wr32(t + 56, (uint32_t)mpar_model_layer(m, 0)->in_features);
    mpar__ckpt_wr32(t + 60, (uint32_t)mpar_model_layer(m, 0)->seq_len);
    data = T + 8;
    for (i = 0, pos = MPAR__CKPT_HEADER; i < L; i++) {
        const mpar_layer* l = mpar_model_layer(m, i);
        size_t n = strlen(l->type->name);
        unsigned char* r = t + pos;
        mpar__ckpt_wr32(r, (uint32_t)(MPAR__CKPT_RECORD + mpar__ckpt_pad8(n)));
        mpar__ckpt_wr32(r + 4, (uint32_t)n);
        mpar__ckpt_wr32(r + 8, (uint32_t)l->in_features);
        mpar__ckpt_wr32(r + 12, (uint32_t)l->out_features);
        mpar__ckpt_wr64(r + 16, (uint64_t)l->param_count);
        mpar__ckpt_wr64(r + 24, data);
        mpar__ckpt_wr32(r + 32, (uint32_t)l->desc.units);
        mpar__ckpt_wr32(r + 36, (uint32_t)l->desc.vocab);
        mpar__ckpt_wr32(r + 40, (uint32_t)l->desc.heads);
        mpar__ckpt_wr32(r + 44, (uint32_t)l->desc.hidden);
        mpar__ckpt_wrf(r + 48, l->desc.rate);
        mpar__ckpt_wrf(r + 52, l->desc.eps);
        memcpy(r + MPAR__CKPT_RECORD, l->type->name, n);
        pos += MPAR__CKPT_RECORD + mpar__ckpt_pad8(n);
        data += (p->ckpt_weights ? 4u : 12u) * (uint64_t)l->param_count + 8u;
    }
    mpar__ckpt_wr64(t + T, mpar__ckpt_checksum(t, T));
    return t;
}

/* Whether layer i's stage runs in this process (always, without MPI). */
static int mpar__ckpt_layer_here(mpar_pipeline* p, int i) {
    int k;
    mpar__vstage* v = mpar__vs_of_layer(p, i, &k);
    return v && mpar__local(p, v->worker);
}

/* Layer i's data block as the file holds it (params, moment 1, moment 2:
   12·P little-endian bytes) into b, read from its device through f. */
static mpar_result mpar__ckpt_layer_bytes(mpar_pipeline* p, int i, float* f, unsigned char* b, const char* path,
                                          mpar_error* err) {
    static const mpar_state_kind kinds[3] = {MPAR_STATE_PARAMS, MPAR_STATE_MOMENT1, MPAR_STATE_MOMENT2};
    size_t n = mpar_model_layer(mpar_pipeline_model(p), i)->param_count;
    int k;
    for (k = 0; k < (p->ckpt_weights ? 1 : 3) && n; k++) { /* weights only: PARAMS */
        mpar_result r = mpar__read_state_impl(p, i, kinds[k], f);
        if (r != MPAR_SUCCESS)
            return mpar_error_set(err, r, "checkpoint '%s': reading layer %d's state from its device failed: %s", path,
                                  i, mpar_result_string(r));
        mpar__ckpt_encode(b + 4u * n * (size_t)k, f, n);
    }
    return MPAR_SUCCESS;
}

/* Every layer's data block, then the trailer. remote[i], when remote and
   it are not NULL, is layer i's block as another rank sent it (MPI); the
   others are read from this process's devices. */
static mpar_result mpar__ckpt_write_data(mpar_pipeline* p, mpar__ckpt_out* o, size_t max_params,
                                         const unsigned char* const* remote, mpar_error* err) {
    const mpar_model* m = mpar_pipeline_model(p);
    const mpar_allocator* a = &p->ctx->allocator;
    float* f = (float*)mpar__alloc_a(a, max_params ? max_params * sizeof(float) : 1);
    unsigned char* b = (unsigned char*)mpar__alloc_a(a, max_params ? 12u * max_params : 1);
    unsigned char sum[8], trailer[MPAR__CKPT_TRAILER];
    mpar_result r = MPAR_SUCCESS;
    int i;
    if (!f || !b) r = mpar_error_set(err, MPAR_ERROR_OUT_OF_HOST_MEMORY, "out of host memory");
    for (i = 0; r == MPAR_SUCCESS && i < mpar_model_layer_count(m); i++) {
        size_t n = mpar_model_layer(m, i)->param_count;
        const unsigned char* block = remote && remote[i] ? remote[i] : b;
        if (block == b) r = mpar__ckpt_layer_bytes(p, i, f, b, o->path, err);
        if (r != MPAR_SUCCESS) break;
        size_t bytes = (p->ckpt_weights ? 4u : 12u) * n; /* a block sent by a rank has 12·P: PARAMS first */
        mpar__ckpt_wr64(sum, mpar__ckpt_checksum(block, bytes));
        r = mpar__ckpt_write(o, block, bytes, err);
        if (r == MPAR_SUCCESS) r = mpar__ckpt_write(o, sum, 8, err);
    }
    if (r == MPAR_SUCCESS) {
        mpar__ckpt_hash whole;
        memcpy(trailer, MPAR__CKPT_END, 8);
        r = mpar__ckpt_write(o, trailer, 8, err);
        whole = o->file; /* everything before the checksum */
        mpar__ckpt_wr64(trailer + 8, mpar__ckpt_hash_end(&whole));
        if (r == MPAR_SUCCESS) r = mpar__ckpt_write(o, trailer + 8, 8, err);
    }
    mpar__free_a(a, f);
    mpar__free_a(a, b);
    return r;
}

/* fsync the folder holding `path`, so that the rename itself is durable. */
static int mpar__ckpt_sync_dir(const char* path) {
    char dir[4096];
    int fd, rc = 0, e = 0;
    mpar__dir_of(path, dir, sizeof dir);
    fd = open(dir, O_RDONLY);
    if (fd < 0) e = errno;
    else {
        rc = fsync(fd);
        if (rc != 0 && errno != EINVAL && errno != EBADF) e = errno; /* some file systems cannot sync folders */
        close(fd);
    }
    return e;
}

/* Writes the checkpoint (see mpar__ckpt_write_data for `remote`). */
static mpar_result mpar__ckpt_save(mpar_pipeline* p, const char* path, const unsigned char* const* remote,
                                   mpar_error* err) {
    const mpar_allocator* a;
    mpar__ckpt_out o;
    unsigned char* table;
    size_t table_bytes = 0, max_params = 0, n;
    uint64_t file_size = 0;
    char* tmp;
    mpar_result r;
    int e;
    if (!p || !path || !*path)
        return mpar_error_set(err, MPAR_ERROR_INVALID_ARGUMENT, "mpar_pipeline_save_checkpoint: NULL pipeline or path");
    table = mpar__ckpt_table(p, &table_bytes, &file_size, &max_params, &r, err);
    if (!table) return r;
    a = &p->ctx->allocator;
    n = strlen(path) + 64;
    tmp = (char*)mpar__alloc_a(a, n);
    if (!tmp) {
        mpar__free_a(a, table);
        return mpar_error_set(err, MPAR_ERROR_OUT_OF_HOST_MEMORY, "out of host memory");
    }
    o.path = path, o.tmp = tmp;
    mpar__ckpt_hash_init(&o.file);
    o.fd = mpar__tmp_create(path, tmp, n); /* never an existing file or a link */
    if (o.fd < 0) {
        r = mpar__ckpt_io(err, "cannot create the temp file", path, tmp, errno);
        mpar__free_a(a, table), mpar__free_a(a, tmp);
        return r;
    }
    r = mpar__ckpt_write(&o, table, table_bytes, err);
    mpar__free_a(a, table);
    if (r == MPAR_SUCCESS) r = mpar__ckpt_write_data(p, &o, max_params, remote, err);
    if (r == MPAR_SUCCESS && o.file.length != file_size) /* the model changed under us? */
        r = mpar_error_set(err, MPAR_ERROR_INVALID_STATE, "checkpoint '%s': wrote %llu bytes, planned %llu", path,
                           (unsigned long long)o.file.length, (unsigned long long)file_size);
    if (r == MPAR_SUCCESS && fsync(o.fd) != 0) r = mpar__ckpt_io(err, "cannot fsync the temp file", path, tmp, errno);
    if (close(o.fd) != 0 && r == MPAR_SUCCESS) r = mpar__ckpt_io(err, "cannot close the temp file", path, tmp, errno);
    if (r == MPAR_SUCCESS && rename(tmp, path) != 0)
        r = mpar__ckpt_io(err, "cannot rename the temp file", path, tmp, errno);
    if (r != MPAR_SUCCESS) {
        unlink(tmp); /* the file at `path`, if any, is untouched */
        mpar__free_a(a, tmp);
        return r;
    }
    mpar__free_a(a, tmp);
    e = mpar__ckpt_sync_dir(path);
    if (e) return mpar__ckpt_io(err, "saved, but cannot fsync its folder", path, NULL, e);
    return MPAR_SUCCESS;
}

/* ---- loading ---- */

static mpar_result mpar__ckpt_read_file(const mpar_allocator* a, const char* path, unsigned char** out, size_t* size,
                                        mpar_error* err) {
    struct stat st;
    unsigned char* d;
    size_t n, got = 0;
    int fd = mpar__open_regular(path, &st); /* a FIFO in the file's place must not block */
    *out = NULL, *size = 0;
    if (fd < 0 && errno == EINVAL) return mpar__ckpt_io(err, "not a regular file", path, NULL, EINVAL);
    if (fd < 0) return mpar__ckpt_io(err, "cannot open", path, NULL, errno);
    if ((uint64_t)st.st_size > (uint64_t)((size_t)-1 / 2)) {
        close(fd);
        return mpar__ckpt_io(err, "too large to read", path, NULL, EFBIG);
    }
    n = (size_t)st.st_size;
    d = (unsigned char*)mpar__alloc_a(a, n ? n : 1);
    if (!d) {
        close(fd);
        return mpar_error_set(err, MPAR_ERROR_OUT_OF_HOST_MEMORY, "checkpoint '%s': out of host memory for %lu bytes",
                              path, (unsigned long)n);
    }
    while (got < n) {
        ssize_t k = read(fd, d + got, n - got);
        if (k < 0 && errno == EINTR) continue;
        if (k < 0) {
            int e = errno;
            close(fd), mpar__free_a(a, d);
            return mpar__ckpt_io(err, "cannot read", path, NULL, e);
        }
        if (k == 0) break; /* shrank while reading: the parser reports the truncation */
        got += (size_t)k;
    }
    close(fd);
    *out = d, *size = got;
    return MPAR_SUCCESS;
}

/* Reads (write = 0) or writes every layer's three state arrays between the
   pipeline and `host`, laid out as in the file (12·P bytes per layer, host
   floats). Layers of stages in other processes (MPI) are skipped: their
   place in `host` is left as it is. */
static mpar_result mpar__ckpt_state_io(mpar_pipeline* p, float* host, int write) {
    const mpar_model* m = mpar_pipeline_model(p);
    int i, k;
    for (i = 0; i < mpar_model_layer_count(m); i++) {
        size_t n = mpar_model_layer(m, i)->param_count;
        if (!mpar__ckpt_layer_here(p, i)) {
            host += 3u * n;
            continue;
        }
        for (k = 0; k < 3 && n; k++) {
            mpar_state_kind kind = k == 0 ? MPAR_STATE_PARAMS : k == 1 ? MPAR_STATE_MOMENT1 : MPAR_STATE_MOMENT2;
            mpar_result r = MPAR_SUCCESS;
            if (k == 0 || !p->desc.inference_only) /* inference only: the parameters alone */
                r = write ? mpar__write_state_impl(p, i, kind, host) : mpar__read_state_impl(p, i, kind, host);
            if (r != MPAR_SUCCESS) return r;
            host += n;
        }
    }
    return MPAR_SUCCESS;
}

/* A load in two halves, so that ranks can agree between them that every
   one of them can apply it: mpar__ckpt_stage decodes this process's layers
   from the file into `next` and reads their current state into `backup`,
   changing nothing; mpar__ckpt_commit writes `next` and the step, and puts
   `backup` back if that fails. */
typedef struct mpar__ckpt_staged {
    float* next;   /* 3·P floats in the file's layout; other ranks' layers unset */
    float* backup; /* the same layout: what the devices held */
    int old_step, new_step;
} mpar__ckpt_staged;

static void mpar__ckpt_staged_free(mpar_pipeline* p, mpar__ckpt_staged* s) {
    mpar__free_a(&p->ctx->allocator, s->next);
    mpar__free_a(&p->ctx->allocator, s->backup);
    s->next = s->backup = NULL;
}

static mpar_result mpar__ckpt_stage(mpar_pipeline* p, const unsigned char* d, size_t size,
                                    const mpar_checkpoint_info* info, const char* path, mpar__ckpt_staged* s,
                                    mpar_error* err) {
    size_t total = 3u * mpar_model_param_count(mpar_pipeline_model(p)), at = 0;
    const mpar_allocator* a = &p->ctx->allocator;
    mpar_result r = MPAR_SUCCESS;
    int i;
    s->next = (float*)mpar__alloc_a(a, total ? total * sizeof(float) : 1);
    s->backup = (float*)mpar__alloc_a(a, total ? total * sizeof(float) : 1);
    s->old_step = mpar_pipeline_get_step(p), s->new_step = p->ckpt_weights ? s->old_step : info->step;
    if (!s->next || !s->backup) r = mpar_error_set(err, MPAR_ERROR_OUT_OF_HOST_MEMORY, "out of host memory");
    for (i = 0; r == MPAR_SUCCESS && i < info->layer_count; i++) {
        size_t n = info->layers[i].param_count;
        float* next = s->next + at;
        if (mpar__ckpt_layer_here(p, i)) { /* another rank's layer: that rank's to load */
            r = mpar_checkpoint_get_state(d, size, info, i, MPAR_STATE_PARAMS, next, err);
            if (p->ckpt_weights) /* weights: the optimizer starts afresh */
                memset(next + n, 0, 2 * n * sizeof(float));
            else if (r == MPAR_SUCCESS)
                r = mpar_checkpoint_get_state(d, size, info, i, MPAR_STATE_MOMENT1, next + n, err);
            if (r == MPAR_SUCCESS && !p->ckpt_weights)
                r = mpar_checkpoint_get_state(d, size, info, i, MPAR_STATE_MOMENT2, next + 2 * n, err);
        }
        at += 3u * n;
    }
    if (r == MPAR_SUCCESS) {
        r = mpar__ckpt_state_io(p, s->backup, 0);
        if (r != MPAR_SUCCESS)
            mpar_error_set(err, r, "checkpoint '%s': reading the pipeline's current state failed (%s); nothing was "
                           "changed", path, mpar_result_string(r));
    }
    if (r != MPAR_SUCCESS) mpar__ckpt_staged_free(p, s);
    return r;
}

/* Puts the state from before the load back; MPAR_SUCCESS if it could. */
static mpar_result mpar__ckpt_put_back(mpar_pipeline* p, const mpar__ckpt_staged* s) {
    mpar_result back = mpar__ckpt_state_io(p, s->backup, 1);
    mpar_pipeline_set_step(p, s->old_step);
    return back;
}

static mpar_result mpar__ckpt_commit(mpar_pipeline* p, const mpar__ckpt_staged* s, const char* path,
                                     mpar_error* err) {
    mpar_result r = mpar__ckpt_state_io(p, s->next, 1);
    if (r == MPAR_SUCCESS) r = mpar_pipeline_set_step(p, s->new_step);
    if (r != MPAR_SUCCESS) {
        mpar_result back = mpar__ckpt_put_back(p, s);
        mpar_error_set(err, r, "checkpoint '%s': writing the state to the devices failed (%s); %s", path,
                       mpar_result_string(r), back == MPAR_SUCCESS ? "the previous state was put back"
                                                                   : "the previous state could not be put back");
    }
    return r;
}

static mpar_result mpar__ckpt_apply(mpar_pipeline* p, const unsigned char* d, size_t size,
                                    const mpar_checkpoint_info* info, const char* path, mpar_error* err) {
    mpar__ckpt_staged s;
    mpar_result r = mpar__ckpt_stage(p, d, size, info, path, &s, err);
    if (r != MPAR_SUCCESS) return r;
    r = mpar__ckpt_commit(p, &s, path, err);
    mpar__ckpt_staged_free(p, &s);
    return r;
}

/* Parses a checkpoint held in memory and matches it to the pipeline's
   model and optimizer; messages name the path. On success `info` holds
   the layout (mpar_checkpoint_info_free). */
static mpar_result mpar__ckpt_check(mpar_pipeline* p, const unsigned char* d, size_t size, const char* path,
                                    mpar_checkpoint_info* info, mpar_error* err) {
    mpar_error why, detail;
    mpar_result r;
    why.message[0] = '\0';
    r = mpar_checkpoint_parse_with(&p->ctx->allocator, d, size, info, &why);
    if (r != MPAR_SUCCESS) return mpar_error_set(err, r, "checkpoint '%s': %.900s", path, why.message);
    if (info->weights_only && !p->ckpt_weights && !p->desc.inference_only) {
        mpar_checkpoint_info_free(info);
        return mpar_error_set(err, MPAR_ERROR_MISMATCH, "checkpoint '%s': is a weights-only file, with no optimizer "
                              "state or step to resume training from; load it with mpar_pipeline_load_weights", path);
    }
    /* parameters alone (weights, or a pipeline that only infers): the
       structure must match, not the seed or the optimizer */
    r = mpar__ckpt_match(info, mpar_pipeline_model(p), mpar_pipeline_get_desc(p)->optimizer.kind,
                         p->ckpt_weights || p->desc.inference_only, &detail);
    if (r == MPAR_SUCCESS) return MPAR_SUCCESS;
    mpar_checkpoint_info_free(info);
    return mpar_error_set(err, r, "checkpoint '%s': is for another model%s: %.900s", path,
                          p->ckpt_weights || p->desc.inference_only ? "" : " or optimizer", detail.message);
}

static mpar_result mpar__ckpt_load(mpar_pipeline* p, const char* path, mpar_error* err) {
    unsigned char* d;
    size_t size;
    mpar_checkpoint_info info;
    mpar_result r;
    if (!p || !path)
        return mpar_error_set(err, MPAR_ERROR_INVALID_ARGUMENT, "mpar_pipeline_load_checkpoint: NULL pipeline or path");
    r = mpar__ckpt_read_file(&p->ctx->allocator, path, &d, &size, err);
    if (r != MPAR_SUCCESS) return r;
    r = mpar__ckpt_check(p, d, size, path, &info, err);
    if (r == MPAR_SUCCESS) {
        r = mpar__ckpt_apply(p, d, size, &info, path, err);
        mpar_checkpoint_info_free(&info);
    }
    mpar__free_a(&p->ctx->allocator, d);
    return r;
}

/* ---- a model from a file's description ---- */

MPARDEF mpar_result mpar_model_from_checkpoint_data(const void* data, size_t size, const mpar_layer_type* const* types,
                                                    int type_count, mpar_model** out, mpar_error* err) {
    const mpar_layer_type* builtin[11];
    mpar_checkpoint_info info;
    mpar_model_desc md;
    mpar_model* model = NULL;
    mpar_result r;
    int i, k;
    if (out) *out = NULL;
    if (!out || type_count < 0 || (type_count > 0 && !types))
        return mpar_error_set(err, MPAR_ERROR_INVALID_ARGUMENT, "mpar_model_from_checkpoint: out is NULL, or "
                              "type_count %d does not match types", type_count);
    builtin[0] = mpar_layer_linear(), builtin[1] = mpar_layer_relu(), builtin[2] = mpar_layer_gelu();
    builtin[3] = mpar_layer_tanh(), builtin[4] = mpar_layer_dropout(), builtin[5] = mpar_layer_layernorm();
    builtin[6] = mpar_layer_embedding(), builtin[7] = mpar_layer_decoder_block(), builtin[8] = mpar_layer_cross_entropy();
    builtin[9] = mpar_layer_mse(), builtin[10] = mpar_layer_l1();
    r = mpar_checkpoint_parse(data, size, &info, err);
    if (r != MPAR_SUCCESS) return r;
    memset(&md, 0, sizeof md);
    md.input_features = info.input_features, md.seq_len = info.seq_len, md.seed = info.seed;
    r = mpar_model_create(&md, &model, err);
    for (i = 0; r == MPAR_SUCCESS && i < info.layer_count; i++) {
        const mpar_checkpoint_layer* cl = &info.layers[i];
        mpar_layer_desc ld;
        memset(&ld, 0, sizeof ld);
        for (k = 0; k < type_count && !ld.type; k++) /* the caller's types first: they may shadow a built-in name */
            if (types[k] && types[k]->name && !strcmp(types[k]->name, cl->type_name)) ld.type = types[k];
        for (k = 0; k < (int)(sizeof builtin / sizeof builtin[0]) && !ld.type; k++)
            if (!strcmp(builtin[k]->name, cl->type_name)) ld.type = builtin[k];
        if (!ld.type) {
            r = mpar_error_set(err, MPAR_ERROR_UNSUPPORTED, "layer %d has type \"%s\", which is not built in: pass "
                               "its mpar_layer_type in `types`", i, cl->type_name);
            break;
        }
        ld.units = cl->units, ld.vocab = cl->vocab, ld.heads = cl->heads, ld.hidden = cl->hidden;
        ld.rate = cl->rate, ld.eps = cl->eps;
        r = mpar_model_add(model, &ld, err);
        if (r == MPAR_SUCCESS && (mpar_model_layer(model, i)->in_features != cl->in_features ||
                                  mpar_model_layer(model, i)->out_features != cl->out_features ||
                                  mpar_model_layer(model, i)->param_count != cl->param_count))
            r = mpar_error_set(err, MPAR_ERROR_INVALID_MODEL, "layer %d (%s) built from the file's settings is "
                               "%d->%d with %lu parameters, the file says %d->%d with %lu (a user type's setup "
                               "differs from the one that wrote it?)", i, cl->type_name,
                               mpar_model_layer(model, i)->in_features, mpar_model_layer(model, i)->out_features,
                               (unsigned long)mpar_model_layer(model, i)->param_count, cl->in_features,
                               cl->out_features, (unsigned long)cl->param_count);
    }
    if (r == MPAR_SUCCESS) r = mpar_model_validate(model, err);
    mpar_checkpoint_info_free(&info);
    if (r != MPAR_SUCCESS) {
        mpar_model_destroy(model);
        return r;
    }
    *out = model;
    return MPAR_SUCCESS;
}

MPARDEF mpar_result mpar_model_from_checkpoint(const char* path, const mpar_layer_type* const* types, int type_count,
                                               mpar_model** out, mpar_error* err) {
    unsigned char* d = NULL;
    size_t size = 0;
    mpar_result r;
    if (out) *out = NULL;
    if (!path) return mpar_error_set(err, MPAR_ERROR_INVALID_ARGUMENT, "mpar_model_from_checkpoint: path is NULL");
    r = mpar__ckpt_read_file(NULL, path, &d, &size, err);
    if (r != MPAR_SUCCESS) return r;
    r = mpar_model_from_checkpoint_data(d, size, types, type_count, out, err);
    mpar__free_a(NULL, d);
    if (r != MPAR_SUCCESS && err && strncmp(err->message, "checkpoint '", 12) != 0) {
        mpar_error inner = *err;
        mpar_error_set(err, r, "checkpoint '%s': %.900s", path, inner.message);
    }
    return r;
}

#ifdef MPAR_USE_MPI
/* ---- checkpoints across processes: point-to-point transfers ----
   Rank 0 alone touches the file (no shared file system is assumed). The
   ranks talk on two tags of their own, with MPI_Isend / MPI_Irecv on the
   pipeline's communicator, every wait polled (mpar__mpi_nap) and bounded
   by timeout_seconds: no blocking collective, so a rank that never comes
   costs the others a timeout naming it, never a hang. A message is a
   header (round, result, step, payload bytes) and its payload: a rank's
   layer blocks, the file, or an error message. The round numbers the
   checkpoint call on this pipeline (every rank counts the same calls) and
   the phase within it: a message left over from a call that failed or
   timed out is dropped, never taken for a later call's. */
enum { MPAR__TAG_CKPT_UP = 32766 /* to rank 0 */, MPAR__TAG_CKPT_DOWN = 32765 /* from rank 0 */ };
enum { MPAR__XFER_HEADER = 4 * sizeof(int64_t) };

/* Waits for a request, at most limit_s seconds. A request that does not
   finish in time is freed: its buffer then belongs to MPI for good (the
   callers leak it rather than let MPI write or read freed memory). */
static mpar_result mpar__xfer_wait(mpar_pipeline* p, MPI_Request* req, double limit_s, const char* path,
                                   const char* what, int peer, mpar_error* err) {
    double t0 = mpar__now();
    for (;;) {
        int done = 0;
        if (MPI_Test(req, &done, MPI_STATUS_IGNORE) != MPI_SUCCESS)
            return mpar_error_set(err, MPAR_ERROR_IO, "checkpoint '%s': MPI_Test failed %s rank %d", path, what, peer);
        if (done) return MPAR_SUCCESS;
        if (mpar__now() - t0 > limit_s) {
            MPI_Request_free(req);
            return mpar_error_set(err, MPAR_ERROR_TIMEOUT, "checkpoint '%s': rank %d, %s rank %d, waited over %g s",
                                  path, p->rank, what, peer, limit_s);
        }
        mpar__mpi_nap(&p->mpi_polling, mpar__now() - t0);
    }
}

/* Sends (round, code, step) and `bytes` of payload to `peer`, waiting
   until the message is out. */
static mpar_result mpar__xfer_send(mpar_pipeline* p, int peer, int tag, int round, mpar_result code, int step,
                                   const void* payload, size_t bytes, const char* path, mpar_error* err) {
    const mpar_allocator* a = &p->ctx->allocator;
    size_t total = MPAR__XFER_HEADER + bytes;
    int64_t h[4];
    unsigned char* m;
    MPI_Request req;
    mpar_result r;
    if (bytes > (size_t)INT_MAX - MPAR__XFER_HEADER)
        return mpar_error_set(err, MPAR_ERROR_UNSUPPORTED, "checkpoint '%s': %lu bytes to send to rank %d; an MPI "
                              "message holds at most %d", path, (unsigned long)bytes, peer, INT_MAX);
    m = (unsigned char*)mpar__alloc_a(a, total);
    if (!m) return mpar_error_set(err, MPAR_ERROR_OUT_OF_HOST_MEMORY, "checkpoint '%s': out of host memory", path);
    h[0] = round, h[1] = (int64_t)code, h[2] = step, h[3] = (int64_t)bytes;
    memcpy(m, h, sizeof h);
    if (bytes) memcpy(m + MPAR__XFER_HEADER, payload, bytes);
    if (MPI_Isend(m, (int)total, MPI_BYTE, peer, tag, p->comm, &req) != MPI_SUCCESS) {
        mpar__free_a(a, m);
        return mpar_error_set(err, MPAR_ERROR_IO, "checkpoint '%s': MPI_Isend to rank %d failed", path, peer);
    }
    r = mpar__xfer_wait(p, &req, p->desc.timeout_seconds, path, "sending to", peer, err);
    if (r != MPAR_ERROR_TIMEOUT) mpar__free_a(a, m);
    return r;
}

/* What mpar__xfer_recv received: the whole message (free it), its payload. */
typedef struct mpar__xfer_msg {
    unsigned char* data;
    const unsigned char* payload;
    size_t bytes;
    mpar_result code;
    int step;
} mpar__xfer_msg;

/* Receives this round's message from `peer` on `tag`, waiting at most
   limit_s seconds: a matched probe is polled until one comes (messages of
   other rounds are received and dropped), then its size is checked
   against its header and, if the sender succeeded and expect >= 0,
   against `expect` payload bytes. */
static mpar_result mpar__xfer_recv(mpar_pipeline* p, int peer, int tag, int round, long long expect, double limit_s,
                                   mpar__xfer_msg* out, const char* path, mpar_error* err) {
    const mpar_allocator* a = &p->ctx->allocator;
    double t0 = mpar__now();
    memset(out, 0, sizeof *out);
    for (;;) {
        int flag = 0, count = 0;
        int64_t h[4];
        MPI_Message mm;
        MPI_Status st;
        MPI_Request req;
        unsigned char* m;
        mpar_result r;
        if (MPI_Improbe(peer, tag, p->comm, &flag, &mm, &st) != MPI_SUCCESS)
            return mpar_error_set(err, MPAR_ERROR_IO, "checkpoint '%s': MPI_Improbe for rank %d failed", path, peer);
        if (!flag) {
            if (mpar__now() - t0 > limit_s)
                return mpar_error_set(err, MPAR_ERROR_TIMEOUT, "checkpoint '%s': rank %d waited over %g s for rank %d",
                                      path, p->rank, limit_s, peer);
            mpar__mpi_nap(&p->mpi_polling, mpar__now() - t0);
            continue;
        }
        if (MPI_Get_count(&st, MPI_BYTE, &count) != MPI_SUCCESS || count < 0) count = 0;
        m = (unsigned char*)mpar__alloc_a(a, count > 0 ? (size_t)count : 1);
        if (!m) return mpar_error_set(err, MPAR_ERROR_OUT_OF_HOST_MEMORY, "checkpoint '%s': out of host memory for "
                                      "%d bytes from rank %d", path, count, peer);
        if (MPI_Imrecv(m, count, MPI_BYTE, &mm, &req) != MPI_SUCCESS) {
            mpar__free_a(a, m);
            return mpar_error_set(err, MPAR_ERROR_IO, "checkpoint '%s': MPI_Imrecv from rank %d failed", path, peer);
        }
        r = mpar__xfer_wait(p, &req, p->desc.timeout_seconds, path, "receiving from", peer, err); /* it is coming */
        if (r == MPAR_ERROR_TIMEOUT) return r; /* m stays MPI's */
        if (r != MPAR_SUCCESS) {
            mpar__free_a(a, m);
            return r;
        }
        if ((size_t)count >= MPAR__XFER_HEADER) memcpy(h, m, sizeof h);
        if ((size_t)count >= MPAR__XFER_HEADER && h[0] != round) { /* an earlier call's */
            mpar__free_a(a, m);
            continue;
        }
        if ((size_t)count < MPAR__XFER_HEADER || h[3] != (int64_t)count - (int64_t)MPAR__XFER_HEADER) {
            mpar__free_a(a, m);
            return mpar_error_set(err, MPAR_ERROR_IO, "checkpoint '%s': rank %d sent a message of %d bytes, which is "
                                  "not its %d-byte header and the payload that states", path, peer, count,
                                  (int)MPAR__XFER_HEADER);
        }
        if (h[1] == MPAR_SUCCESS && expect >= 0 && h[3] != expect) {
            mpar__free_a(a, m);
            return mpar_error_set(err, MPAR_ERROR_MISMATCH, "checkpoint '%s': rank %d sent %lld bytes of layer state, "
                                  "rank %d expected %lld: do the ranks run the same model and stages?", path, peer,
                                  (long long)h[3], p->rank, expect);
        }
        out->data = m, out->payload = m + MPAR__XFER_HEADER, out->bytes = (size_t)h[3];
        out->code = (mpar_result)h[1], out->step = (int)h[2];
        return MPAR_SUCCESS;
    }
}

/* The first failure of a call wins: `verdict` takes (r, e) if it has none. */
static void mpar__ckpt_fold(mpar_result* verdict, mpar_error* v, mpar_result r, const mpar_error* e) {
    if (*verdict != MPAR_SUCCESS || r == MPAR_SUCCESS) return;
    *verdict = r;
    mpar_error_set(v, r, "%s", e->message);
}

/* How long a rank waits for rank 0's answer: rank 0 may first wait
   timeout_seconds for the other ranks, then read its devices and write the
   file (a save) or read it (a load). */
static double mpar__ckpt_answer_s(const mpar_pipeline* p) { return 2 * p->desc.timeout_seconds; }

/* Rank 0: receives rank q's report of this round into `msg` by `deadline`
   (every rank's report is due timeout_seconds after rank 0 began to wait,
   so a late rank costs the others one timeout, not one each), folding a
   failure (its own, or the transfer's) into the verdict; MPAR_SUCCESS
   when rank q succeeded. */
static mpar_result mpar__ckpt_collect(mpar_pipeline* p, int q, int round, long long expect, double deadline,
                                      mpar__xfer_msg* msg, const char* path, mpar_result* verdict, mpar_error* v) {
    mpar_error e;
    double left = deadline - mpar__now();
    mpar_result r = mpar__xfer_recv(p, q, MPAR__TAG_CKPT_UP, round, expect, left > 0 ? left : 0, msg, path, &e);
    if (r == MPAR_SUCCESS && msg->code != MPAR_SUCCESS) {
        r = msg->code;
        mpar_error_set(&e, r, "rank %d: %.*s", q, (int)(msg->bytes < 1000 ? msg->bytes : 1000),
                       (const char*)msg->payload);
    }
    mpar__ckpt_fold(verdict, v, r, &e);
    return r;
}

/* Rank 0 sends the verdict of this round to every rank; another rank
   receives it. Every rank returns it, with its message in *v. */
static mpar_result mpar__ckpt_down(mpar_pipeline* p, int round, mpar_result verdict, const char* path,
                                   mpar_error* v) {
    mpar__xfer_msg m;
    mpar_error e;
    mpar_result r;
    int q;
    if (p->rank == 0) {
        const char* text = verdict == MPAR_SUCCESS ? "" : v->message;
        for (q = 1; q < p->ranks; q++) /* one that misses it times out on its own, naming rank 0 */
            mpar__xfer_send(p, q, MPAR__TAG_CKPT_DOWN, round, verdict, 0, text, strlen(text), path, &e);
        return verdict;
    }
    r = mpar__xfer_recv(p, 0, MPAR__TAG_CKPT_DOWN, round, -1, mpar__ckpt_answer_s(p), &m, path, &e);
    if (r != MPAR_SUCCESS) return mpar_error_set(v, r, "%s", e.message);
    r = m.code;
    if (r != MPAR_SUCCESS) mpar_error_set(v, r, "%.*s", (int)(m.bytes < 1000 ? m.bytes : 1000), (const char*)m.payload);
    mpar__free_a(&p->ctx->allocator, m.data);
    return r;
}

/* Every rank tells rank 0 its result (`mine`, with its message in *err);
   every rank returns the first failure (rank 0's, then by rank, naming
   the rank), or MPAR_SUCCESS if all succeeded. */
static mpar_result mpar__ckpt_agree(mpar_pipeline* p, int round, mpar_result mine, const char* path,
                                    mpar_error* err) {
    mpar_result verdict = MPAR_SUCCESS;
    mpar_error v, e;
    double deadline;
    int q;
    if (mine != MPAR_SUCCESS) mpar_error_set(&e, mine, "rank %d: %.900s", p->rank, err->message);
    if (p->rank != 0) {
        const char* text = mine == MPAR_SUCCESS ? "" : err->message;
        mpar_result r = mpar__xfer_send(p, 0, MPAR__TAG_CKPT_UP, round, mine, 0, text, strlen(text), path, &e);
        if (r != MPAR_SUCCESS) return mpar_error_set(err, r, "%s", e.message);
        return mpar__ckpt_down(p, round, MPAR_SUCCESS, path, err);
    }
    mpar__ckpt_fold(&verdict, &v, mine, &e);
    deadline = mpar__now() + p->desc.timeout_seconds;
    for (q = 1; q < p->ranks; q++) {
        mpar__xfer_msg m;
        mpar__ckpt_collect(p, q, round, -1, deadline, &m, path, &verdict, &v);
        mpar__free_a(&p->ctx->allocator, m.data);
    }
    if (verdict != MPAR_SUCCESS) *err = v;
    return mpar__ckpt_down(p, round, verdict, path, err);
}

/* ---- checkpoints across processes: save and load ---- */

static int mpar__ckpt_layer_rank(mpar_pipeline* p, int i) {
    int k;
    mpar__vstage* v = mpar__vs_of_layer(p, i, &k);
    return v ? p->stage_rank[v->worker] : -1;
}

/* Bytes of the layer blocks rank q owns, and the largest layer's
   parameter count. */
static size_t mpar__ckpt_rank_bytes(mpar_pipeline* p, int q, size_t* max_params) {
    const mpar_model* m = mpar_pipeline_model(p);
    size_t total = 0;
    int i;
    if (max_params) *max_params = 0;
    for (i = 0; i < mpar_model_layer_count(m); i++) {
        size_t n = mpar_model_layer(m, i)->param_count;
        if (mpar__ckpt_layer_rank(p, i) != q) continue;
        total += 12u * n;
        if (max_params && n > *max_params) *max_params = n;
    }
    return total;
}

/* This rank's layer blocks, in layer order: its part of the file. */
static unsigned char* mpar__ckpt_own_part(mpar_pipeline* p, const char* path, size_t* bytes, mpar_result* r,
                                          mpar_error* err) {
    const mpar_allocator* a = &p->ctx->allocator;
    const mpar_model* m = mpar_pipeline_model(p);
    size_t max_params, at = 0;
    unsigned char* part;
    float* f;
    int i;
    *bytes = mpar__ckpt_rank_bytes(p, p->rank, &max_params);
    part = (unsigned char*)mpar__alloc_a(a, *bytes ? *bytes : 1);
    f = (float*)mpar__alloc_a(a, max_params ? max_params * sizeof(float) : 1);
    *r = part && f ? MPAR_SUCCESS : mpar_error_set(err, MPAR_ERROR_OUT_OF_HOST_MEMORY, "out of host memory");
    for (i = 0; *r == MPAR_SUCCESS && i < mpar_model_layer_count(m); i++) {
        if (mpar__ckpt_layer_rank(p, i) != p->rank) continue;
        *r = mpar__ckpt_layer_bytes(p, i, f, part + at, path, err);
        at += 12u * mpar_model_layer(m, i)->param_count;
    }
    mpar__free_a(a, f);
    if (*r != MPAR_SUCCESS) {
        mpar__free_a(a, part);
        return NULL;
    }
    return part;
}

/* Rank 0 with every rank's part: the layer blocks by layer, the file written. */
static mpar_result mpar__ckpt_save_gathered(mpar_pipeline* p, const char* path, mpar__xfer_msg* parts,
                                            mpar_error* err) {
    const mpar_model* m = mpar_pipeline_model(p);
    int L = mpar_model_layer_count(m), i;
    size_t* at = (size_t*)mpar__alloc_a(&p->ctx->allocator, sizeof(size_t) * (size_t)p->ranks);
    const unsigned char** remote = (const unsigned char**)mpar__alloc_a(&p->ctx->allocator, sizeof(void*) * (size_t)L);
    mpar_result r;
    if (!at || !remote) r = mpar_error_set(err, MPAR_ERROR_OUT_OF_HOST_MEMORY, "out of host memory");
    else {
        memset(at, 0, sizeof(size_t) * (size_t)p->ranks);
        for (i = 0; i < L; i++) {
            int q = mpar__ckpt_layer_rank(p, i);
            remote[i] = q > 0 ? parts[q].payload + at[q] : NULL; /* rank 0's own: read here */
            if (q > 0) at[q] += 12u * mpar_model_layer(m, i)->param_count;
        }
        r = mpar__ckpt_save(p, path, remote, err);
    }
    mpar__free_a(&p->ctx->allocator, at);
    mpar__free_a(&p->ctx->allocator, (void*)remote);
    return r;
}

/* Save across ranks (see mpar_pipeline_save_checkpoint): every rank sends
   rank 0 its part; rank 0 writes the file (temp file, rename) only when
   all parts arrived, then tells every rank the outcome. */
static mpar_result mpar__ckpt_save_ranks(mpar_pipeline* p, const char* path, mpar_result mine, mpar_error* err) {
    const mpar_allocator* a = &p->ctx->allocator;
    int round = ++p->ckpt_calls * 4, q;
    const char* name = path ? path : "";
    double deadline;
    mpar_result verdict = MPAR_SUCCESS, r;
    mpar_error v, e;
    mpar__xfer_msg* parts;
    if (mine == MPAR_SUCCESS && (!path || !*path))
        mine = mpar_error_set(err, MPAR_ERROR_INVALID_ARGUMENT, "mpar_pipeline_save_checkpoint: NULL path");
    if (p->rank != 0) {
        size_t bytes = 0;
        unsigned char* part = mine == MPAR_SUCCESS ? mpar__ckpt_own_part(p, name, &bytes, &mine, err) : NULL;
        r = mine == MPAR_SUCCESS ? mpar__xfer_send(p, 0, MPAR__TAG_CKPT_UP, round, mine, p->step, part, bytes, name, &e)
                                 : mpar__xfer_send(p, 0, MPAR__TAG_CKPT_UP, round, mine, p->step, err->message,
                                                   strlen(err->message), name, &e);
        mpar__free_a(a, part);
        if (r != MPAR_SUCCESS) return mpar_error_set(err, r, "%s", e.message);
        return mpar__ckpt_down(p, round, MPAR_SUCCESS, name, err);
    }
    if (mine != MPAR_SUCCESS) {
        mpar_error_set(&e, mine, "rank 0: %.900s", err->message);
        mpar__ckpt_fold(&verdict, &v, mine, &e);
    }
    parts = (mpar__xfer_msg*)mpar__alloc_a(a, sizeof(mpar__xfer_msg) * (size_t)p->ranks);
    if (!parts) {
        mpar_error_set(&e, MPAR_ERROR_OUT_OF_HOST_MEMORY, "rank 0: out of host memory");
        mpar__ckpt_fold(&verdict, &v, MPAR_ERROR_OUT_OF_HOST_MEMORY, &e);
    }
    deadline = mpar__now() + p->desc.timeout_seconds;
    for (q = 1; parts && q < p->ranks; q++) { /* from every rank, even after a failure: none is left waiting */
        r = mpar__ckpt_collect(p, q, round, (long long)mpar__ckpt_rank_bytes(p, q, NULL), deadline, &parts[q], name,
                               &verdict, &v);
        if (r == MPAR_SUCCESS && parts[q].step != p->step) {
            mpar_error_set(&e, MPAR_ERROR_INVALID_STATE, "checkpoint '%s': rank %d is at step %d, rank 0 at step %d",
                           name, q, parts[q].step, p->step);
            mpar__ckpt_fold(&verdict, &v, MPAR_ERROR_INVALID_STATE, &e);
        }
    }
    if (verdict == MPAR_SUCCESS) { /* every part is here: only now the temp file */
        r = mpar__ckpt_save_gathered(p, name, parts, &e);
        if (r != MPAR_SUCCESS) {
            mpar_error ee = e;
            mpar_error_set(&e, r, "rank 0: %.900s", ee.message);
            mpar__ckpt_fold(&verdict, &v, r, &e);
        }
    }
    for (q = 1; parts && q < p->ranks; q++) mpar__free_a(a, parts[q].data);
    mpar__free_a(a, parts);
    if (verdict != MPAR_SUCCESS) *err = v;
    return mpar__ckpt_down(p, round, verdict, name, err);
}

/* Load across ranks (see mpar_pipeline_load_checkpoint): rank 0 reads the
   file and sends it to every rank; each checks it and stages its own
   layers; they agree; each applies; they agree again, and if any rank
   failed to apply, every rank puts its previous state back. */
static mpar_result mpar__ckpt_load_ranks(mpar_pipeline* p, const char* path, mpar_result mine, mpar_error* err) {
    const mpar_allocator* a = &p->ctx->allocator;
    int round = ++p->ckpt_calls * 4, q, staged = 0;
    const char* name = path ? path : "";
    unsigned char* file = NULL;
    const unsigned char* d = NULL;
    size_t size = 0;
    mpar__xfer_msg m;
    mpar__ckpt_staged s;
    mpar_checkpoint_info info;
    mpar_result r = mine, v;
    mpar_error e;
    memset(&m, 0, sizeof m);
    memset(&s, 0, sizeof s);
    if (r == MPAR_SUCCESS && !path)
        r = mpar_error_set(err, MPAR_ERROR_INVALID_ARGUMENT, "mpar_pipeline_load_checkpoint: NULL path");
    if (p->rank == 0) { /* the file, or why there is none, to every rank */
        if (r == MPAR_SUCCESS) r = mpar__ckpt_read_file(a, name, &file, &size, err);
        d = file;
        for (q = 1; q < p->ranks; q++) {
            const void* what = r == MPAR_SUCCESS ? (const void*)file : (const void*)err->message;
            size_t bytes = r == MPAR_SUCCESS ? size : strlen(err->message);
            mpar_result t = mpar__xfer_send(p, q, MPAR__TAG_CKPT_DOWN, round, r, 0, what, bytes, name, &e);
            if (t != MPAR_SUCCESS && r == MPAR_SUCCESS) r = mpar_error_set(err, t, "%s", e.message);
        }
    } else {
        mpar_result t = mpar__xfer_recv(p, 0, MPAR__TAG_CKPT_DOWN, round, -1, mpar__ckpt_answer_s(p), &m, name, &e);
        if (t != MPAR_SUCCESS && r == MPAR_SUCCESS) r = mpar_error_set(err, t, "%s", e.message);
        else if (t == MPAR_SUCCESS && m.code != MPAR_SUCCESS && r == MPAR_SUCCESS)
            r = mpar_error_set(err, m.code, "rank 0: %.*s", (int)(m.bytes < 1000 ? m.bytes : 1000),
                               (const char*)m.payload);
        d = m.payload, size = m.bytes;
    }
    if (r == MPAR_SUCCESS) { /* every rank checks the whole file, stages only its own layers */
        r = mpar__ckpt_check(p, d, size, name, &info, err);
        if (r == MPAR_SUCCESS) {
            r = mpar__ckpt_stage(p, d, size, &info, name, &s, err);
            staged = r == MPAR_SUCCESS;
            mpar_checkpoint_info_free(&info);
        }
    }
    mpar__free_a(a, file);
    mpar__free_a(a, m.data);
    v = mpar__ckpt_agree(p, round + 1, r, name, err); /* nothing changed anywhere yet */
    if (v == MPAR_SUCCESS) {
        r = mpar__ckpt_commit(p, &s, name, err);
        v = mpar__ckpt_agree(p, round + 2, r, name, err);
        if (v != MPAR_SUCCESS && r == MPAR_SUCCESS) {
            mpar_error ee = *err;
            r = mpar__ckpt_put_back(p, &s);
            mpar_error_set(err, v, "%.900s; %s", ee.message, r == MPAR_SUCCESS ? "every rank's previous state was "
                           "put back" : "this rank's previous state could not be put back");
        }
    }
    if (staged) mpar__ckpt_staged_free(p, &s);
    return v;
}
#endif

#endif /* MPAR_PART_CHECKPOINT_IMPL */

/* The public entry points also record the failure on the context, so that
   mpar_last_error tells it like every other call; a load also drops any
   gradients computed for the state it replaces. */
static mpar_result mpar__save_checkpoint_impl(mpar_pipeline* p, const char* path, mpar_error* err) {
    mpar_error local;
    mpar_result r = p && p->desc.inference_only /* a checkpoint without moments would resume training wrongly */
                        ? mpar_error_set(&local, MPAR_ERROR_INVALID_STATE, "checkpoint '%s': the pipeline was created "
                                         "with inference_only and holds no optimizer state to save", path ? path : "")
                    : p && p->damaged /* mixed parameters saved as a valid step would clear the guard on load */
                        ? mpar_error_set(&local, MPAR_ERROR_INVALID_STATE, "checkpoint '%s' not written: an optimizer "
                                         "step failed part-way, so the stages' parameters are of different steps; load "
                                         "a checkpoint to continue", path ? path : "")
                        : MPAR_SUCCESS;
#ifdef MPAR_USE_MPI
    if (p && p->ranks > 1) r = mpar__ckpt_save_ranks(p, path, r, &local); /* every rank takes part, even failed */
    else
#endif
    if (r == MPAR_SUCCESS) r = mpar__ckpt_save(p, path, NULL, &local);
    if (r != MPAR_SUCCESS) {
        if (p) mpar__fail(p->ctx, r, "%s", local.message);
        if (err) *err = local;
    }
    return r;
}

/* Weights files: the checkpoint calls with PARAMS alone (p->ckpt_weights
   for the call's length; one call at a time runs on a pipeline). */
static mpar_result mpar__save_weights_impl(mpar_pipeline* p, const char* path, mpar_error* err) {
    mpar_error local;
    mpar_result r = p && p->damaged /* the stages' parameters are of different steps */
                        ? mpar_error_set(&local, MPAR_ERROR_INVALID_STATE, "weights '%s' not written: an optimizer "
                                         "step failed part-way, so the stages' parameters are of different steps; load "
                                         "a checkpoint to continue", path ? path : "")
                        : MPAR_SUCCESS;
    if (!p) return MPAR_ERROR_INVALID_ARGUMENT;
    p->ckpt_weights = 1;
#ifdef MPAR_USE_MPI
    if (p->ranks > 1) r = mpar__ckpt_save_ranks(p, path, r, &local); /* every rank takes part, even failed */
    else
#endif
    if (r == MPAR_SUCCESS) r = mpar__ckpt_save(p, path, NULL, &local);
    p->ckpt_weights = 0;
    if (r != MPAR_SUCCESS) {
        mpar__fail(p->ctx, r, "%s", local.message);
        if (err) *err = local;
    }
    return r;
}

static mpar_result mpar__load_weights_impl(mpar_pipeline* p, const char* path, mpar_error* err) {
    mpar_error local;
    mpar_result r = p && p->damaged == 2 ? mpar_error_set(&local, MPAR_ERROR_INVALID_STATE, "weights '%s': the "
                                                          "pipeline lost its stages in a failed re-balancing move; "
                                                          "create a new one to load it", path ? path : "")
                                         : MPAR_SUCCESS;
    if (!p) return MPAR_ERROR_INVALID_ARGUMENT;
    p->ckpt_weights = 1;
#ifdef MPAR_USE_MPI
    if (p->ranks > 1) r = mpar__ckpt_load_ranks(p, path, r, &local); /* every rank takes part, even failed */
    else
#endif
    if (r == MPAR_SUCCESS) r = mpar__ckpt_load(p, path, &local);
    p->ckpt_weights = 0;
    if (r != MPAR_SUCCESS) {
        mpar__fail(p->ctx, r, "%s", local.message);
        if (err) *err = local;
        return r;
    }
    p->damaged = 0; /* every parameter is the file's now */
    p->grads_ready = 0;
    return MPAR_SUCCESS;
}

static mpar_result mpar__load_checkpoint_impl(mpar_pipeline* p, const char* path, mpar_error* err) {
    mpar_error local;
    mpar_result r = p && p->damaged == 2 ? mpar_error_set(&local, MPAR_ERROR_INVALID_STATE, "checkpoint '%s': the "
                                                          "pipeline lost its stages in a failed re-balancing move; "
                                                          "create a new one to load it", path ? path : "")
                                         : MPAR_SUCCESS;
#ifdef MPAR_USE_MPI
    if (p && p->ranks > 1) r = mpar__ckpt_load_ranks(p, path, r, &local); /* every rank takes part, even failed */
    else
#endif
    if (r == MPAR_SUCCESS) r = mpar__ckpt_load(p, path, &local);
    if (r != MPAR_SUCCESS) {
        if (p) mpar__fail(p->ctx, r, "%s", local.message);
        if (err) *err = local;
        return r;
    }
    p->grads_ready = 0;
    p->damaged = 0;
    return MPAR_SUCCESS;
}

#ifndef MPAR_PART_TIMELINE_IMPL
#define MPAR_PART_TIMELINE_IMPL

#include <math.h>
#include <stdlib.h>
#include <string.h>

static int mpar__tl_is_compute(mpar_event_kind k) { return k <= MPAR_EVENT_OPTIMIZER_STEP; }
static int mpar__tl_is_copy(mpar_event_kind k) { return k == MPAR_EVENT_SEND || k == MPAR_EVENT_RECEIVE; }
static int mpar__tl_is_link(mpar_event_kind k) { return k >= MPAR_EVENT_SEND && k <= MPAR_EVENT_WAIT; }
static int mpar__tl_is_backward(mpar_event_kind k) {
    return k == MPAR_EVENT_BACKWARD || k == MPAR_EVENT_BACKWARD_INPUT || k == MPAR_EVENT_BACKWARD_WEIGHT;
}
static int mpar__tl_vs_count(const mpar_timeline* t) { return t->stages * t->virtual_stages; }
static int mpar__tl_stage_of(const mpar_timeline* t, int vs);
/* The virtual stage of a compute event: the chunk-th of its stage's. */
static int mpar__tl_vstage(const mpar_timeline* t, const mpar_event* e) {
    int vs, c = 0;
    if (t->schedule_lists) return mpar_schedule_virtual_stage(t->schedule_lists, e->stage, e->chunk);
    for (vs = 0; vs < mpar__tl_vs_count(t); vs++)
        if (mpar__tl_stage_of(t, vs) == e->stage && c++ == e->chunk) return vs;
    return e->chunk * t->stages + e->stage; /* a stage with fewer chunks than the event names: interleaved */
}
/* The timeline's schedule: a copy of the one that ran, else generated. */
static mpar_result mpar__tl_schedule(const mpar_timeline* t, mpar_schedule** out, mpar_error* err) {
    if (t->schedule_lists) return mpar_schedule_copy(&t->allocator, t->schedule_lists, out, err);
    return mpar_schedule_create_with(&t->allocator, t->schedule, t->stages, t->microbatches, t->virtual_stages, out,
                                     err);
}
/* Virtual stage that sends / receives over a link event's boundary. */
static int mpar__tl_sender(const mpar_event* e) { return e->gradient ? e->boundary + 1 : e->boundary; }
static int mpar__tl_receiver(const mpar_event* e) { return e->gradient ? e->boundary : e->boundary + 1; }
static double mpar__tl_ms(double seconds) { return seconds * 1e3; }

/* Where the analysis and the printing put virtual stage vs: the schedule
   that ran when the timeline keeps it (a pipeline's always does). In a
   timeline built by hand, a copy is recorded on the stage at its own end
   of the boundary, so the events say it for every virtual stage next to a
   link; elsewhere the placement the schedule kind makes (section 6). */
static int mpar__tl_kind_stage(const mpar_timeline* t, int vs) {
    return mpar__sched_kind_stage(t->schedule, t->stages, t->virtual_stages, vs);
}
static int mpar__tl_event_vs(const mpar_event* e) {
    if (e->kind == MPAR_EVENT_SEND) return mpar__tl_sender(e);
    return e->kind == MPAR_EVENT_RECEIVE ? mpar__tl_receiver(e) : -1;
}
static int mpar__tl_stage_of(const mpar_timeline* t, int vs) {
    int i;
    if (t->schedule_lists) return mpar_schedule_stage_of(t->schedule_lists, vs);
    for (i = 0; i < t->event_count; i++)
        if (mpar__tl_event_vs(&t->events[i]) == vs) return t->events[i].stage;
    return mpar__tl_kind_stage(t, vs);
}
/* The same for all virtual stages at once, in one pass over the events:
   place[vs], then vs_of[s * V + c] (chunk c of stage s is the c-th of its
   virtual stages in model order; -1 where a stage gets fewer than V).
   NULL when out of memory; free with the timeline's allocator. */
static int* mpar__tl_placement(const mpar_timeline* t) {
    int VS = mpar__tl_vs_count(t), V = t->virtual_stages, vs, i, s, *place, *vs_of, *seen;
    place = (int*)mpar__alloc_a(&t->allocator, sizeof(int) * (2 * (size_t)VS + (size_t)t->stages));
    if (!place) return NULL;
    vs_of = place + VS, seen = vs_of + VS;
    for (vs = 0; vs < VS; vs++) place[vs] = t->schedule_lists ? mpar_schedule_stage_of(t->schedule_lists, vs) : -1;
    for (vs = 0; vs < VS; vs++) vs_of[vs] = -1;
    for (i = t->event_count - 1; !t->schedule_lists && i >= 0; i--) /* the first event wins, as in mpar__tl_stage_of */
        if ((vs = mpar__tl_event_vs(&t->events[i])) >= 0) place[vs] = t->events[i].stage;
    for (s = 0; s < t->stages; s++) seen[s] = 0;
    for (vs = 0; vs < VS; vs++) {
        if (place[vs] < 0) place[vs] = mpar__tl_kind_stage(t, vs);
        s = place[vs];
        if (seen[s] < V) vs_of[s * V + seen[s]++] = vs;
    }
    return place;
}

static const char* mpar__tl_kind_name(mpar_event_kind k) {
    static const char* names[] = {"forward", "backward", "backward_input", "backward_weight",
                                  "optimizer",  "send",     "receive",        "wait"};
    return (int)k >= 0 && k <= MPAR_EVENT_WAIT ? names[k] : "unknown";
}

/* "F3", "I3.1" (chunk shown when interleaved), "OPT", "send A3", "recv G3",
   "wait A3" (A: activations, G: gradients). */
static void mpar__tl_name(const mpar_timeline* t, const mpar_event* e, char* buf, size_t size) {
    static const char letters[] = "FBIW";
    if (e->kind == MPAR_EVENT_OPTIMIZER_STEP)
        snprintf(buf, size, "OPT");
    else if (mpar__tl_is_compute(e->kind) && t->virtual_stages > 1)
        snprintf(buf, size, "%c%d.%d", letters[e->kind], e->microbatch, e->chunk);
    else if (mpar__tl_is_compute(e->kind))
        snprintf(buf, size, "%c%d", letters[e->kind], e->microbatch);
    else
        snprintf(buf, size, "%s %c%d", e->kind == MPAR_EVENT_SEND ? "send" : e->kind == MPAR_EVENT_RECEIVE ? "recv" : "wait",
                 e->gradient ? 'G' : 'A', e->microbatch);
}

static double mpar__tl_step(const mpar_timeline* t) {
    double step = t->step_time;
    int i;
    if (step > 0.0) return step;
    for (i = 0; i < t->event_count; i++)
        if (t->events[i].end > step) step = t->events[i].end;
    return step;
}

/* Shape of the struct and of every event; the other functions rely on it. */
static mpar_result mpar__tl_check_shape(const mpar_timeline* t, const char* fn, mpar_error* err) {
    int i, VS;
    if (!t) return mpar_error_set(err, MPAR_ERROR_INVALID_ARGUMENT, "%s: timeline is NULL", fn);
    if (t->stages < 1 || t->stages > MPAR_TIMELINE_MAX_STAGES || t->virtual_stages < 1 || t->microbatches < 1 ||
        t->event_count < 0 || (t->event_count > 0 && !t->events) || t->virtual_stages > 4096 ||
        t->microbatches > (1 << 20))
        return mpar_error_set(err, MPAR_ERROR_INVALID_ARGUMENT,
                              "%s: bad timeline shape (stages %d, virtual stages %d, micro-batches %d, %d events)", fn,
                              t->stages, t->virtual_stages, t->microbatches, t->event_count);
    VS = mpar__tl_vs_count(t);
    for (i = 0; i < t->event_count; i++) {
        const mpar_event* e = &t->events[i];
        const char* bad = NULL;
        if ((int)e->kind < 0 || (int)e->kind > (int)MPAR_EVENT_WAIT) bad = "kind";
        else if (e->stage < 0 || e->stage >= t->stages) bad = "stage";
        else if (!(e->start >= -1e9 && e->start <= 1e9 && e->end >= e->start && e->end <= 1e9)) bad = "times";
        else if (e->chunk < 0 || e->chunk >= t->virtual_stages) bad = "chunk";
        else if (e->kind != MPAR_EVENT_OPTIMIZER_STEP && (e->microbatch < 0 || e->microbatch >= t->microbatches))
            bad = "micro-batch";
        else if (mpar__tl_is_link(e->kind) && (e->boundary < 0 || e->boundary >= VS - 1 || e->gradient < 0 ||
                                                e->gradient > 1))
            bad = "boundary";
        if (bad)
            return mpar_error_set(err, MPAR_ERROR_INVALID_ARGUMENT,
                                  "%s: event %d (kind %d, stage %d) has a bad %s", fn, i, (int)e->kind, e->stage, bad);
    }
    return MPAR_SUCCESS;
}

/* ---- statistics ---- */

MPARDEF mpar_result mpar_timeline_get_stats(const mpar_timeline* t, mpar_timeline_stats* out, mpar_error* err) {
    mpar_result r;
    int i, s;
    if (!out) return mpar_error_set(err, MPAR_ERROR_INVALID_ARGUMENT, "mpar_timeline_get_stats: out is NULL");
    memset(out, 0, sizeof *out);
    r = mpar__tl_check_shape(t, "mpar_timeline_get_stats", err);
    if (r != MPAR_SUCCESS) return r;
    out->stages = t->stages;
    out->step_time = mpar__tl_step(t);
    for (i = 0; i < t->event_count; i++) {
        const mpar_event* e = &t->events[i];
        mpar_timeline_stage_stats* st = &out->stage[e->stage];
        double d = e->end - e->start;
        if (mpar__tl_is_compute(e->kind)) st->busy += d, st->compute_events++;
        else if (mpar__tl_is_copy(e->kind)) st->transfer += d;
        else st->wait += d;
    }
    for (s = 0; s < t->stages; s++) {
        mpar_timeline_stage_stats* st = &out->stage[s];
        st->idle = out->step_time - st->busy - st->transfer;
        if (st->idle < 0.0) st->idle = 0.0;
        st->overhead = st->idle > st->wait ? st->idle - st->wait : 0.0;
        st->device_bytes = t->device_bytes[s];
        if (st->device_bytes > out->peak_device_bytes) out->peak_device_bytes = st->device_bytes;
        out->busy_total += st->busy;
        if (st->busy > out->stage[out->slowest_stage].busy) out->slowest_stage = s;
    }
    out->bubble_fraction = out->step_time > 0.0 ? 1.0 - out->busy_total / (t->stages * out->step_time) : 0.0;
    out->utilisation = 1.0 - out->bubble_fraction;
    return MPAR_SUCCESS;
}

MPARDEF int mpar_timeline_link_count(const mpar_timeline* t) {
    if (!t || t->stages < 1 || t->virtual_stages < 1 || t->stages > MPAR_TIMELINE_MAX_STAGES ||
        t->virtual_stages > 4096)
        return 0;
    return 2 * (mpar__tl_vs_count(t) - 1);
}

/* Index of the event of `kind` for (boundary, gradient, micro-batch) on
   stage `stage` (any stage when < 0), or -1. */
static int mpar__tl_find_link(const mpar_timeline* t, mpar_event_kind kind, int boundary, int gradient, int mb,
                              int stage) {
    int i;
    for (i = 0; i < t->event_count; i++) {
        const mpar_event* e = &t->events[i];
        if (e->kind == kind && e->boundary == boundary && e->gradient == gradient && e->microbatch == mb &&
            (stage < 0 || e->stage == stage))
            return i;
    }
    return -1;
}

/* Hand-off latency of one receive: send end -> receive start, when the
   receiver was already waiting for it (else its start says nothing about
   the link). Returns 0 when it does not apply. */
static int mpar__tl_handoff(const mpar_timeline* t, const mpar_event* recv, double* latency) {
    int si = mpar__tl_find_link(t, MPAR_EVENT_SEND, recv->boundary, recv->gradient, recv->microbatch, -1);
    int wi = mpar__tl_find_link(t, MPAR_EVENT_WAIT, recv->boundary, recv->gradient, recv->microbatch, recv->stage);
    const mpar_event *s, *w;
    if (si < 0 || wi < 0) return 0;
    s = &t->events[si], w = &t->events[wi];
    if (w->stage == s->stage || w->start > s->end || w->end > recv->start + 1e-9) return 0;
    *latency = recv->start - s->end > 0.0 ? recv->start - s->end : 0.0;
    return 1;
}

MPARDEF mpar_result mpar_timeline_get_link_stats(const mpar_timeline* t, int boundary, int gradient,
                                                 mpar_timeline_link_stats* out, mpar_error* err) {
    mpar_result r;
    int i, handoffs = 0;
    if (!out) return mpar_error_set(err, MPAR_ERROR_INVALID_ARGUMENT, "mpar_timeline_get_link_stats: out is NULL");
    memset(out, 0, sizeof *out);
    r = mpar__tl_check_shape(t, "mpar_timeline_get_link_stats", err);
    if (r != MPAR_SUCCESS) return r;
    if (boundary < 0 || boundary >= mpar__tl_vs_count(t) - 1 || gradient < 0 || gradient > 1)
        return mpar_error_set(err, MPAR_ERROR_INVALID_ARGUMENT,
                              "mpar_timeline_get_link_stats: no link at boundary %d, direction %d", boundary, gradient);
    out->boundary = boundary, out->gradient = gradient;
    out->from_stage = mpar__tl_stage_of(t, gradient ? boundary + 1 : boundary);
    out->to_stage = mpar__tl_stage_of(t, gradient ? boundary : boundary + 1);
    for (i = 0; i < t->event_count; i++) {
        const mpar_event* e = &t->events[i];
        double d = e->end - e->start, lat;
        if (!mpar__tl_is_link(e->kind) || e->boundary != boundary || e->gradient != gradient) continue;
        if (e->kind == MPAR_EVENT_SEND) {
            out->messages++, out->bytes += e->bytes, out->send_time += d;
        } else if (e->kind == MPAR_EVENT_RECEIVE) {
            out->received++, out->receive_time += d;
            if (mpar__tl_handoff(t, e, &lat)) out->handoff_latency += lat, handoffs++;
        } else if (e->stage == out->from_stage && e->stage != out->to_stage) {
            out->send_wait += d;
        } else {
            out->receive_wait += d;
        }
    }
    if (handoffs) out->handoff_latency /= handoffs;
    if (out->send_time + out->receive_time > 0.0)
        out->bandwidth = (double)out->bytes / (out->send_time + out->receive_time);
    return MPAR_SUCCESS;
}

/* ---- prediction ---- */

/* Measured mean costs per virtual stage, in mpar_sim_desc's layout. */
typedef struct mpar__tl_costs {
    double* mem;
    double *f, *b, *i, *w, *opt, *link;
    int* count; /* [4 * VS]: scheduled F, B, I, W actions per virtual stage */
} mpar__tl_costs;

/* Which part of its B a BACKWARD event is: the executor records a B as
   its input-gradient part (then sends the gradient on) and its
   weight-gradient part, two events; 0 for the first of its (stage, chunk,
   micro-batch), 1 for a later one. */
static int mpar__tl_b_part(const mpar_timeline* t, int index) {
    const mpar_event* e = &t->events[index];
    int i;
    for (i = 0; i < t->event_count; i++) {
        const mpar_event* o = &t->events[i];
        if (i != index && o->kind == MPAR_EVENT_BACKWARD && o->stage == e->stage && o->chunk == e->chunk &&
            o->microbatch == e->microbatch && (o->start < e->start || (o->start == e->start && i < index)))
            return 1;
    }
    return 0;
}

/* Host time between a stage's events (launch set-up, synchronisation) is
   part of what its actions cost: spread over its actions evenly. */
static void mpar__tl_add_host_gaps(const mpar_timeline* t, mpar__tl_costs* c) {
    int P = t->stages, VS = mpar__tl_vs_count(t), s, v, k, i;
    for (s = 0; s < P; s++) {
        double first = 0.0, last = 0.0, covered = 0.0, gap;
        int seen = 0, actions = 0;
        for (i = 0; i < t->event_count; i++) {
            const mpar_event* e = &t->events[i];
            if (e->stage != s || e->kind == MPAR_EVENT_OPTIMIZER_STEP) continue;
            if (!seen || e->start < first) first = e->start;
            if (!seen || e->end > last) last = e->end;
            seen = 1;
            covered += e->end - e->start;
        }
        for (v = 0; v < VS; v++)
            for (k = 0; k < 4 && mpar__tl_stage_of(t, v) == s; k++) actions += c->count[k * VS + v];
        gap = last - first - covered;
        if (!seen || actions == 0 || gap <= 0.0) continue;
        for (v = 0; v < VS; v++) {
            if (mpar__tl_stage_of(t, v) != s) continue;
            c->f[v] += gap / actions;
            c->b[v] += gap / actions;
            c->i[v] += gap / actions;
            c->w[v] += gap / actions;
        }
    }
}

static mpar_result mpar__tl_costs_make(const mpar_timeline* t, const mpar_schedule* sc, mpar__tl_costs* c,
                                       mpar_error* err) {
    int P = t->stages, VS = mpar__tl_vs_count(t), s, i, k;
    int* handoffs;
    c->mem = (double*)mpar__alloc_a(&t->allocator,
                                    sizeof(double) * (size_t)(6 * VS + P) + sizeof(int) * (size_t)(5 * VS));
    if (!c->mem) return mpar_error_set(err, MPAR_ERROR_OUT_OF_HOST_MEMORY, "mpar_timeline_simulate: out of host memory");
    memset(c->mem, 0, sizeof(double) * (size_t)(6 * VS + P) + sizeof(int) * (size_t)(5 * VS));
    c->f = c->mem, c->b = c->f + VS, c->i = c->b + VS, c->w = c->i + VS, c->link = c->w + VS, c->opt = c->link + VS;
    c->count = (int*)(void*)(c->opt + P);
    handoffs = c->count + 4 * VS;
    for (s = 0; s < P; s++)
        for (i = 0; i < sc->action_count[s]; i++) {
            const mpar_action* a = &sc->actions[s][i];
            if (a->kind != MPAR_ACTION_OPTIMIZER_STEP)
                c->count[(int)a->kind * VS + mpar_schedule_virtual_stage(sc, s, a->chunk)]++;
        }
    for (i = 0; i < t->event_count; i++) {
        const mpar_event* e = &t->events[i];
        double d = e->end - e->start, lat;
        int vs = mpar__tl_vstage(t, e), bwd;
        if (e->kind == MPAR_EVENT_OPTIMIZER_STEP) c->opt[e->stage] += d;
        else if (e->kind == MPAR_EVENT_FORWARD) c->f[vs] += d;
        else if (e->kind == MPAR_EVENT_BACKWARD && c->count[MPAR_ACTION_BACKWARD * VS + vs] == 0)
            (mpar__tl_b_part(t, i) == 0 ? c->i : c->w)[vs] += d; /* a B simulated as its two parts */
        else if (e->kind == MPAR_EVENT_BACKWARD) c->b[vs] += d;
        else if (e->kind == MPAR_EVENT_BACKWARD_INPUT) c->i[vs] += d;
        else if (e->kind == MPAR_EVENT_BACKWARD_WEIGHT) c->w[vs] += d;
        if (!mpar__tl_is_copy(e->kind)) continue;
        /* a copy belongs to the action that makes it: F for activations,
           B (or I when the backward is split) for gradients */
        vs = e->kind == MPAR_EVENT_SEND ? mpar__tl_sender(e) : mpar__tl_receiver(e);
        bwd = c->count[MPAR_ACTION_BACKWARD_INPUT * VS + vs] > 0 ? 2 : 1;
        (e->gradient ? (bwd == 2 ? c->i : c->b) : c->f)[vs] += d;
        if (e->kind == MPAR_EVENT_RECEIVE && mpar__tl_handoff(t, e, &lat)) c->link[e->boundary] += lat, handoffs[e->boundary]++;
    }
    for (k = 0; k < 4; k++) {
        double* arr = k == 0 ? c->f : k == 1 ? c->b : k == 2 ? c->i : c->w;
        for (s = 0; s < VS; s++) {
            int n = c->count[k * VS + s];
            arr[s] = n ? arr[s] / n : 0.0;
            if (arr[s] < 1e-12) arr[s] = 1e-12; /* the simulator reads 0 as "not given" */
        }
    }
    for (s = 0; s < VS - 1; s++) c->link[s] = handoffs[s] ? c->link[s] / handoffs[s] : 0.0;
    mpar__tl_add_host_gaps(t, c);
    return MPAR_SUCCESS;
}

/* A timeline's measured costs as mpar_simulate takes them: F, B, I, W per
   virtual stage, the optimizer step per stage, the hand-off latency per
   boundary (copies are in the actions that make them). A kind the schedule
   never ran is priced from the others: B as I + W, I and W as half a B.
   *mem holds the arrays, from the timeline's allocator. Used by
   mpar_timeline_simulate and by AUTO, which synthesises from them. */
static mpar_result mpar__tl_sim_desc(const mpar_timeline* t, const mpar_schedule* sc, mpar_sim_desc* d, void** mem,
                                     mpar_error* err) {
    mpar__tl_costs c;
    int vs, VS = mpar__tl_vs_count(t);
    mpar_result r;
    memset(&c, 0, sizeof c);
    *mem = NULL;
    r = mpar__tl_costs_make(t, sc, &c, err);
    if (r != MPAR_SUCCESS) return r;
    for (vs = 0; vs < VS; vs++) {
        int b = c.count[MPAR_ACTION_BACKWARD * VS + vs], i = c.count[MPAR_ACTION_BACKWARD_INPUT * VS + vs];
        if (!b && i) c.b[vs] = c.i[vs] + c.w[vs];
        if (b && !i) c.i[vs] = c.w[vs] = c.b[vs] / 2;
    }
    memset(d, 0, sizeof *d);
    d->allocator = t->allocator;
    d->forward_per_stage = c.f;
    d->backward_per_stage = c.b, d->backward_input_per_stage = c.i, d->backward_weight_per_stage = c.w;
    d->optimizer_step_per_stage = c.opt;
    d->link_delay_per_boundary = c.link;
    *mem = c.mem;
    return MPAR_SUCCESS;
}

/* The executor runs a B as its input part, the send of the gradient, then
   its weight part: the stage before gets the gradient before the B ends.
   When every B of the timeline was recorded as those two events, the
   schedule is simulated with each B as an I followed at once by its W
   (priced from the two parts), which is what ran; else as it is. *out is
   NULL when nothing is split. */
static mpar_result mpar__tl_split_b(const mpar_timeline* t, const mpar_schedule* sc, mpar_schedule** out,
                                    mpar_error* err) {
    int P = sc->stages, s, i, k, total = 0, bs = 0, parts[2] = {0, 0};
    mpar_action **lists, *all;
    int* counts;
    mpar_result r;
    *out = NULL;
    for (s = 0; s < P; s++)
        for (i = 0; i < sc->action_count[s]; i++) total++, bs += sc->actions[s][i].kind == MPAR_ACTION_BACKWARD;
    for (i = 0; i < t->event_count; i++)
        if (t->events[i].kind == MPAR_EVENT_BACKWARD) parts[mpar__tl_b_part(t, i)]++;
    if (bs == 0 || parts[0] != bs || parts[1] != bs) return MPAR_SUCCESS;
    lists = (mpar_action**)mpar__alloc_a(&t->allocator, sizeof(mpar_action*) * (size_t)P +
                                                            sizeof(mpar_action) * (size_t)(total + bs) +
                                                            sizeof(int) * (size_t)P);
    if (!lists) return mpar_error_set(err, MPAR_ERROR_OUT_OF_HOST_MEMORY, "mpar_timeline_simulate: out of host memory");
    all = (mpar_action*)(void*)(lists + P);
    counts = (int*)(void*)(all + total + bs);
    for (s = 0, k = 0; s < P; s++) {
        lists[s] = all + k;
        for (i = 0; i < sc->action_count[s]; i++) {
            mpar_action a = sc->actions[s][i];
            if (a.kind == MPAR_ACTION_BACKWARD) {
                a.kind = MPAR_ACTION_BACKWARD_INPUT;
                all[k++] = a;
                a.kind = MPAR_ACTION_BACKWARD_WEIGHT;
            }
            all[k++] = a;
        }
        counts[s] = (int)(all + k - lists[s]);
    }
    r = mpar_schedule_from_lists_placed(&t->allocator, P, sc->microbatches, sc->virtual_stages, sc->placement,
                                        (const mpar_action* const*)lists, counts, out, err);
    mpar__free_a(&t->allocator, lists);
    return r;
}

/* What the schedule's lists leave out, from the timeline: the step begins
   on the host and no stage starts before the first event of the step (the
   workers wake, gradients are zeroed), so the simulated step starts there;
   and the executor's optimizer step is two events per stage, the gradient
   norms and then the update, which waits for every stage's norms (the step
   is decided from all of them): with those two recorded, every stage's
   update starts when the last stage's norms end. */
static void mpar__tl_sim_adjust(const mpar_timeline* t, const mpar_schedule* sc, mpar_simulation* sim) {
    double first = 0.0, barrier = 0.0, total = 0.0, norms[MPAR_TIMELINE_MAX_STAGES], opt[MPAR_TIMELINE_MAX_STAGES];
    double norms_start[MPAR_TIMELINE_MAX_STAGES];
    int counted[MPAR_TIMELINE_MAX_STAGES], s, i, seen = 0, split = 1;
    for (s = 0; s < t->stages; s++) norms[s] = opt[s] = norms_start[s] = 0.0, counted[s] = 0;
    for (i = 0; i < t->event_count; i++) {
        const mpar_event* e = &t->events[i];
        if (!seen || e->start < first) first = e->start;
        seen = 1;
        if (e->kind != MPAR_EVENT_OPTIMIZER_STEP) continue;
        opt[e->stage] += e->end - e->start;
        if (!counted[e->stage]++ || e->start < norms_start[e->stage])
            norms_start[e->stage] = e->start, norms[e->stage] = e->end - e->start; /* the first: the norms */
    }
    for (s = 0; s < t->stages; s++) {
        int n = sc->action_count[s];
        if (counted[s] < 2 || n == 0 || sc->actions[s][n - 1].kind != MPAR_ACTION_OPTIMIZER_STEP) split = 0;
        else if (sim->start[s][n - 1] + norms[s] > barrier) barrier = sim->start[s][n - 1] + norms[s];
    }
    for (s = 0; split && s < t->stages; s++) {
        int n = sc->action_count[s];
        double end = barrier + opt[s] - norms[s];
        if (end > sim->end[s][n - 1]) sim->end[s][n - 1] = end;
    }
    if (first < 0.0) first = 0.0;
    sim->step_time = 0.0;
    for (s = 0; s < sim->stages; s++) {
        total += sim->busy[s];
        for (i = 0; i < sim->action_count[s]; i++) {
            sim->start[s][i] += first, sim->end[s][i] += first;
            if (sim->end[s][i] > sim->step_time) sim->step_time = sim->end[s][i];
        }
    }
    sim->bubble_fraction = sim->step_time > 0.0 ? 1.0 - total / ((double)sim->stages * sim->step_time) : 0.0;
}

MPARDEF mpar_result mpar_timeline_simulate(const mpar_timeline* t, mpar_schedule** schedule, mpar_simulation** sim,
                                           mpar_error* err) {
    mpar_schedule *sc = NULL, *split = NULL;
    mpar_simulation* result = NULL;
    void* mem = NULL;
    mpar_sim_desc d;
    mpar_result r;
    if (schedule) *schedule = NULL;
    if (sim) *sim = NULL;
    r = mpar__tl_check_shape(t, "mpar_timeline_simulate", err);
    if (r != MPAR_SUCCESS) return r;
    r = mpar__tl_schedule(t, &sc, err);
    if (r != MPAR_SUCCESS) return r;
    r = mpar__tl_split_b(t, sc, &split, err);
    if (r == MPAR_SUCCESS && split) {
        mpar_schedule_destroy(sc);
        sc = split;
    }
    if (r == MPAR_SUCCESS) r = mpar__tl_sim_desc(t, sc, &d, &mem, err);
    if (r != MPAR_SUCCESS) {
        mpar_schedule_destroy(sc);
        return r;
    }
    r = mpar_simulate(sc, &d, &result, err);
    mpar__free_a(&t->allocator, mem);
    if (r == MPAR_SUCCESS) mpar__tl_sim_adjust(t, sc, result);
    if (r == MPAR_SUCCESS && sim) *sim = result;
    else mpar_simulation_destroy(result);
    if (r == MPAR_SUCCESS && schedule) *schedule = sc;
    else mpar_schedule_destroy(sc);
    return r;
}

MPARDEF mpar_result mpar_timeline_predict(const mpar_timeline* t, mpar_timeline_prediction* out, mpar_error* err) {
    mpar_timeline_stats st;
    mpar_simulation* sim = NULL;
    mpar_result r;
    if (!out) return mpar_error_set(err, MPAR_ERROR_INVALID_ARGUMENT, "mpar_timeline_predict: out is NULL");
    memset(out, 0, sizeof *out);
    r = mpar_timeline_get_stats(t, &st, err);
    if (r == MPAR_SUCCESS) r = mpar_timeline_simulate(t, NULL, &sim, err);
    if (r != MPAR_SUCCESS) return r;
    out->measured_step_time = st.step_time;
    out->measured_bubble_fraction = st.bubble_fraction;
    out->step_time = sim->step_time;
    out->bubble_fraction = sim->step_time > 0.0 ? 1.0 - st.busy_total / (t->stages * sim->step_time) : 0.0;
    mpar_simulation_destroy(sim);
    return MPAR_SUCCESS;
}

/* ---- consistency ---- */

/* Per (virtual stage, micro-batch): the events the checks compare. */
typedef struct mpar__tl_slot {
    int f, bi, w, b_count, i_count, w_count, f_count; /* event indices (-1) and counts */
} mpar__tl_slot;

static int mpar__tl_cmp_stage_start(const void* a, const void* b) {
    const mpar_event *x = (const mpar_event*)a, *y = (const mpar_event*)b;
    int cx = mpar__tl_is_compute(x->kind), cy = mpar__tl_is_compute(y->kind);
    if (x->stage != y->stage) return x->stage < y->stage ? -1 : 1;
    if (cx != cy) return cx > cy ? -1 : 1;
    if (x->start != y->start) return x->start < y->start ? -1 : 1;
    return x->end < y->end ? -1 : x->end > y->end ? 1 : 0;
}

/* One clock per stage for compute events and one (the host's) for link
   events: within either, events of a stage must not overlap. */
static mpar_result mpar__tl_check_overlap(const mpar_timeline* t, mpar_error* err) {
    mpar_event* ev;
    mpar_result r = MPAR_SUCCESS;
    int i;
    if (t->event_count < 2) return MPAR_SUCCESS;
    ev = (mpar_event*)mpar__alloc_a(&t->allocator, sizeof(mpar_event) * (size_t)t->event_count);
    if (!ev) return mpar_error_set(err, MPAR_ERROR_OUT_OF_HOST_MEMORY, "mpar_timeline_check: out of host memory");
    memcpy(ev, t->events, sizeof(mpar_event) * (size_t)t->event_count);
    qsort(ev, (size_t)t->event_count, sizeof(mpar_event), mpar__tl_cmp_stage_start);
    for (i = 1; i < t->event_count && r == MPAR_SUCCESS; i++) {
        const mpar_event *a = &ev[i - 1], *b = &ev[i];
        char na[32], nb[32];
        if (a->stage != b->stage || mpar__tl_is_compute(a->kind) != mpar__tl_is_compute(b->kind)) continue;
        if (b->start >= a->end - 1e-9) continue;
        mpar__tl_name(t, a, na, sizeof na);
        mpar__tl_name(t, b, nb, sizeof nb);
        r = mpar_error_set(err, MPAR_ERROR_INVALID_SCHEDULE,
                           "stage %d: %s (%.3f-%.3f ms) overlaps %s (%.3f-%.3f ms)", a->stage, na,
                           mpar__tl_ms(a->start), mpar__tl_ms(a->end), nb, mpar__tl_ms(b->start), mpar__tl_ms(b->end));
    }
    mpar__free_a(&t->allocator, ev);
    return r;
}

/* Fills slots[vs * M + m]: the events of each and how many of each kind. */
static void mpar__tl_fill_slots(const mpar_timeline* t, mpar__tl_slot* slots) {
    int i, M = t->microbatches;
    for (i = 0; i < mpar__tl_vs_count(t) * M; i++) {
        mpar__tl_slot* sl = &slots[i];
        sl->f = sl->bi = sl->w = -1;
        sl->b_count = sl->i_count = sl->w_count = sl->f_count = 0;
    }
    for (i = 0; i < t->event_count; i++) {
        const mpar_event* e = &t->events[i];
        mpar__tl_slot* sl;
        if (!mpar__tl_is_compute(e->kind) || e->kind == MPAR_EVENT_OPTIMIZER_STEP) continue;
        sl = &slots[mpar__tl_vstage(t, e) * M + e->microbatch];
        if (e->kind == MPAR_EVENT_FORWARD) sl->f = i, sl->f_count++;
        if (e->kind == MPAR_EVENT_BACKWARD_WEIGHT) sl->w = i, sl->w_count++;
        if (e->kind == MPAR_EVENT_BACKWARD) sl->b_count++;
        if (e->kind == MPAR_EVENT_BACKWARD_INPUT) sl->i_count++;
        /* the first backward part is the one that sends the gradient on */
        if ((e->kind == MPAR_EVENT_BACKWARD || e->kind == MPAR_EVENT_BACKWARD_INPUT) &&
            (sl->bi < 0 || e->start < t->events[sl->bi].start))
            sl->bi = i;
    }
}

static mpar_result mpar__tl_fail_order(const mpar_timeline* t, const mpar_event* late, const mpar_event* early,
                                       mpar_error* err) {
    char nl[32], ne[32];
    mpar__tl_name(t, late, nl, sizeof nl);
    mpar__tl_name(t, early, ne, sizeof ne);
    return mpar_error_set(err, MPAR_ERROR_INVALID_SCHEDULE, "stage %d: %s starts at %.3f ms, before %s (stage %d) ends (%.3f ms)",
                          late->stage, nl, mpar__tl_ms(late->start), ne, early->stage, mpar__tl_ms(early->end));
}

/* Counts per (virtual stage, micro-batch): one F; for training one B (one
   or two events, the same number on every micro-batch of a virtual stage)
   or one I and a W (none only if the chunk never records one). */
static mpar_result mpar__tl_check_counts(const mpar_timeline* t, const mpar__tl_slot* slots, int training,
                                         mpar_error* err) {
    int vs, m, M = t->microbatches;
    for (vs = 0; vs < mpar__tl_vs_count(t); vs++)
        for (m = 0; m < M; m++) {
            const mpar__tl_slot *sl = &slots[vs * M + m], *s0 = &slots[vs * M];
            const char* bad = NULL;
            /* a schedule may split one backward and not another: each as it ran */
            int split = !sl->b_count && (sl->i_count > 0 || sl->w_count > 0);
            if (split != (!s0->b_count && (s0->i_count > 0 || s0->w_count > 0))) s0 = sl;
            if (sl->f_count != 1) bad = "forward";
            else if (!training && sl->b_count + sl->i_count + sl->w_count) bad = "backward";
            else if (training && !split && (sl->b_count < 1 || sl->b_count > 2 || sl->b_count != s0->b_count ||
                                            sl->i_count || sl->w_count))
                bad = "backward";
            else if (training && split && (sl->b_count || sl->i_count != 1 || sl->w_count > 1 ||
                                           sl->w_count != s0->w_count))
                bad = "input/weight gradient";
            if (bad)
                return mpar_error_set(err, MPAR_ERROR_INVALID_SCHEDULE,
                                      "virtual stage %d, micro-batch %d: %d F, %d B, %d I, %d W events (bad %s count)",
                                      vs, m, sl->f_count, sl->b_count, sl->i_count, sl->w_count, bad);
        }
    return MPAR_SUCCESS;
}

/* Dependencies in time: on a stage exactly, across clocks within tol. */
static mpar_result mpar__tl_check_deps(const mpar_timeline* t, const mpar__tl_slot* slots, int training, double tol,
                                       mpar_error* err) {
    int vs, m, M = t->microbatches, VS = mpar__tl_vs_count(t);
    const mpar_event* ev = t->events;
    for (vs = 0; vs < VS; vs++)
        for (m = 0; m < M; m++) {
            const mpar__tl_slot* sl = &slots[vs * M + m];
            const mpar_event *f = &ev[sl->f], *bi = training ? &ev[sl->bi] : NULL;
            if (vs > 0 && f->start < ev[slots[(vs - 1) * M + m].f].end - tol)
                return mpar__tl_fail_order(t, f, &ev[slots[(vs - 1) * M + m].f], err);
            if (!training) continue;
            if (bi->start < f->end - 1e-9) return mpar__tl_fail_order(t, bi, f, err);
            if (sl->w >= 0 && ev[sl->w].start < ev[sl->bi].end - 1e-9)
                return mpar__tl_fail_order(t, &ev[sl->w], bi, err);
            if (vs < VS - 1 && bi->start < ev[slots[(vs + 1) * M + m].bi].end - tol)
                return mpar__tl_fail_order(t, bi, &ev[slots[(vs + 1) * M + m].bi], err);
        }
    return MPAR_SUCCESS;
}

/* Every message: one send on the sender's stage, one receive on the
   receiver's, the receive copy after the send copy, the send after the
   compute that made the tensor and the receive before the compute that
   reads it. */
static mpar_result mpar__tl_check_links(const mpar_timeline* t, const mpar__tl_slot* slots, int training, double tol,
                                        mpar_error* err) {
    int b, g, m, i, M = t->microbatches, VS = mpar__tl_vs_count(t);
    const mpar_event* ev = t->events;
    for (b = 0; b < VS - 1; b++)
        for (g = 0; g <= training; g++)
            for (m = 0; m < M; m++) {
                int si = -1, ri = -1, ns = 0, nr = 0, from = g ? b + 1 : b, to = g ? b : b + 1, made, used;
                for (i = 0; i < t->event_count; i++) {
                    if (ev[i].boundary != b || ev[i].gradient != g || ev[i].microbatch != m) continue;
                    if (ev[i].kind == MPAR_EVENT_SEND) si = i, ns++;
                    if (ev[i].kind == MPAR_EVENT_RECEIVE) ri = i, nr++;
                }
                if (ns != 1 || nr != 1 || ev[si].stage != mpar__tl_stage_of(t, from) ||
                    ev[ri].stage != mpar__tl_stage_of(t, to))
                    return mpar_error_set(err, MPAR_ERROR_INVALID_SCHEDULE,
                                          "link %d (%s), micro-batch %d: %d sends and %d receives, expected one send on "
                                          "stage %d and one receive on stage %d",
                                          b, g ? "gradients" : "activations", m, ns, nr, mpar__tl_stage_of(t, from),
                                          mpar__tl_stage_of(t, to));
                if (ev[ri].start < ev[si].end - 1e-9) return mpar__tl_fail_order(t, &ev[ri], &ev[si], err);
                made = g ? slots[from * M + m].bi : slots[from * M + m].f;
                used = g ? slots[to * M + m].bi : slots[to * M + m].f;
                if (ev[si].start < ev[made].end - tol) return mpar__tl_fail_order(t, &ev[si], &ev[made], err);
                if (ev[used].start < ev[ri].end - tol) return mpar__tl_fail_order(t, &ev[used], &ev[ri], err);
            }
    for (i = 0; i < t->event_count; i++)
        if (!training && mpar__tl_is_link(ev[i].kind) && ev[i].gradient)
            return mpar_error_set(err, MPAR_ERROR_INVALID_SCHEDULE, "stage %d: a gradient link event in an inference "
                                  "timeline", ev[i].stage);
    return MPAR_SUCCESS;
}

MPARDEF mpar_result mpar_timeline_check(const mpar_timeline* t, double clock_tolerance, mpar_error* err) {
    mpar__tl_slot* slots;
    mpar_result r;
    int i, training = 0;
    r = mpar__tl_check_shape(t, "mpar_timeline_check", err);
    if (r != MPAR_SUCCESS) return r;
    if (!(clock_tolerance >= 0.0)) clock_tolerance = 0.0;
    for (i = 0; i < t->event_count; i++) training |= mpar__tl_is_backward(t->events[i].kind);
    r = mpar__tl_check_overlap(t, err);
    if (r != MPAR_SUCCESS) return r;
    slots = (mpar__tl_slot*)mpar__alloc_a(&t->allocator, sizeof(mpar__tl_slot) * (size_t)mpar__tl_vs_count(t) *
                                                             (size_t)t->microbatches);
    if (!slots) return mpar_error_set(err, MPAR_ERROR_OUT_OF_HOST_MEMORY, "mpar_timeline_check: out of host memory");
    mpar__tl_fill_slots(t, slots);
    r = mpar__tl_check_counts(t, slots, training, err);
    if (r == MPAR_SUCCESS) r = mpar__tl_check_deps(t, slots, training, clock_tolerance, err);
    if (r == MPAR_SUCCESS) r = mpar__tl_check_links(t, slots, training, clock_tolerance, err);
    mpar__free_a(&t->allocator, slots);
    return r;
}

/* ---- terminal Gantt chart ---- */

static char mpar__tl_mb_char(int m) {
    static const char digits[] = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";
    return m < 0 ? ' ' : digits[m % 62];
}

/* Cell of stage s over [a, b): kind letter, micro-batch and chunk characters. */
static void mpar__tl_cell(const mpar_timeline* t, int s, double a, double b, char* kind, char* mb, char* chunk) {
    static const char letters[] = "FBIWO";
    double compute = 0.0, copy = 0.0, wait = 0.0, best = 0.0, idle;
    int i, best_i = -1;
    for (i = 0; i < t->event_count; i++) {
        const mpar_event* e = &t->events[i];
        double lo = e->start > a ? e->start : a, hi = e->end < b ? e->end : b;
        if (e->stage != s || hi <= lo) continue;
        if (mpar__tl_is_compute(e->kind)) {
            compute += hi - lo;
            if (hi - lo > best) best = hi - lo, best_i = i;
        } else if (mpar__tl_is_copy(e->kind)) {
            copy += hi - lo;
        } else {
            wait += hi - lo;
        }
    }
    idle = (b - a) - compute - copy - wait;
    *mb = *chunk = ' ';
    if (best_i >= 0 && compute >= 0.5 * (b - a)) {
        const mpar_event* e = &t->events[best_i];
        *kind = letters[e->kind];
        if (e->chunk % 2) *kind = (char)(*kind - 'A' + 'a');
        *mb = mpar__tl_mb_char(e->microbatch);
        if (e->kind != MPAR_EVENT_OPTIMIZER_STEP) *chunk = mpar__tl_mb_char(e->chunk);
    } else if (copy > 0.0 && copy >= wait && copy >= idle) {
        *kind = '~';
    } else if (wait > 0.0 && wait >= idle) {
        *kind = '-';
    } else {
        *kind = '.';
    }
}

/* Axis: a label (ms) every 10 columns where it fits, '|' ticks below. */
static void mpar__tl_axis(const mpar_timeline* t, FILE* out, double step, int columns) {
    char* line = (char*)mpar__alloc_a(&t->allocator, (size_t)columns + 16);
    int c, next = 0;
    if (!line) return;
    memset(line, ' ', (size_t)columns + 15);
    line[columns + 15] = '\0';
    for (c = 0; c < columns; c += 10) {
        char label[32];
        int n = snprintf(label, sizeof label, "%.4g", mpar__tl_ms(step * c / columns));
        if (c < next || c + n > columns + 14) continue;
        memcpy(line + c, label, (size_t)n);
        next = c + n + 1;
    }
    for (c = columns + 14; c > 0 && line[c] == ' '; c--) line[c] = '\0';
    fprintf(out, "time ms   %s\n          ", line);
    for (c = 0; c < columns; c++) fputc(c % 10 == 0 ? '|' : ' ', out);
    fputc('\n', out);
    mpar__free_a(&t->allocator, line);
}

/* After the chunk line of stage s: which virtual stage each chunk is. */
static void mpar__tl_print_chunks(const mpar_timeline* t, const int* place, int s, FILE* out) {
    const int *vs_of = place + mpar__tl_vs_count(t), V = t->virtual_stages;
    int c;
    fprintf(out, " chunk = virtual stage:");
    for (c = 0; c < V && c < 8; c++) fprintf(out, "%s %d=%d", c ? "," : "", c, vs_of[s * V + c]);
    if (V > 8) fprintf(out, ", ...");
    fputc('\n', out);
}

MPARDEF void mpar_timeline_print_gantt(const mpar_timeline* t, FILE* out, int columns) {
    mpar_timeline_stats st;
    char *kinds, *mbs, *chunks;
    double step;
    int s, c, *place = NULL;
    if (!out || mpar_timeline_get_stats(t, &st, NULL) != MPAR_SUCCESS) return;
    if (columns <= 0) columns = 80;
    if (columns > 4096) columns = 4096;
    step = st.step_time;
    if (t->virtual_stages > 1 && !(place = mpar__tl_placement(t))) return;
    kinds = (char*)mpar__alloc_a(&t->allocator, 3 * (size_t)columns + 3);
    if (!kinds) {
        mpar__free_a(&t->allocator, place);
        return;
    }
    mbs = kinds + columns + 1;
    chunks = mbs + columns + 1;
    fprintf(out, "%s: %d stages x %d chunks, %d micro-batches; step %.3f ms, measured bubble %.1f%%; %.4g ms per column\n",
            mpar_schedule_kind_name(t->schedule), t->stages, t->virtual_stages, t->microbatches, mpar__tl_ms(step),
            100.0 * st.bubble_fraction, mpar__tl_ms(step / columns));
    mpar__tl_axis(t, out, step, columns);
    for (s = 0; s < t->stages; s++) {
        for (c = 0; c < columns; c++)
            mpar__tl_cell(t, s, step * c / columns, step * (c + 1) / columns, &kinds[c], &mbs[c], &chunks[c]);
        kinds[columns] = mbs[columns] = chunks[columns] = '\0';
        fprintf(out, "stage %-2d |%s| busy %.1f%%\n", s, kinds, step > 0.0 ? 100.0 * st.stage[s].busy / step : 0.0);
        fprintf(out, "         |%s|\n", mbs);
        if (!place) continue;
        fprintf(out, "   chunk |%s|", chunks);
        mpar__tl_print_chunks(t, place, s, out);
    }
    fprintf(out, "F forward  B backward  I input grad  W weight grad  O optimizer (odd chunk: lower case)\n"
                 "second line: micro-batch (0-9a-zA-Z)%s  ~ link copy  - blocked on a link  . idle\n",
            place ? ", third: chunk" : "");
    mpar__free_a(&t->allocator, kinds);
    mpar__free_a(&t->allocator, place);
}

MPARDEF void mpar_timeline_print_stats(const mpar_timeline* t, FILE* out) {
    mpar_timeline_stats st;
    mpar_timeline_prediction pr;
    int s, l;
    if (!out || mpar_timeline_get_stats(t, &st, NULL) != MPAR_SUCCESS) return;
    fprintf(out, "%s, %d stages x %d chunks, %d micro-batches: step %.3f ms, measured bubble %.1f%%",
            mpar_schedule_kind_name(t->schedule), t->stages, t->virtual_stages, t->microbatches,
            mpar__tl_ms(st.step_time), 100.0 * st.bubble_fraction);
    if (mpar_timeline_predict(t, &pr, NULL) == MPAR_SUCCESS)
        fprintf(out, "; simulated from these costs: step %.3f ms, bubble %.1f%%", mpar__tl_ms(pr.step_time),
                100.0 * pr.bubble_fraction);
    fprintf(out, "\nstage   busy ms  transfer ms  wait ms  idle ms  (no event)  device MB\n");
    for (s = 0; s < t->stages; s++)
        fprintf(out, "%-5d %9.3f %12.3f %8.3f %8.3f %11.3f %10.2f%s\n", s, mpar__tl_ms(st.stage[s].busy),
                mpar__tl_ms(st.stage[s].transfer), mpar__tl_ms(st.stage[s].wait), mpar__tl_ms(st.stage[s].idle),
                mpar__tl_ms(st.stage[s].overhead), (double)st.stage[s].device_bytes / 1048576.0,
                s == st.slowest_stage ? "  (slowest)" : "");
    fprintf(out, "link               msgs   bytes      send ms  recv ms  MB/s     hand-off ms\n");
    for (l = 0; l < mpar_timeline_link_count(t); l++) {
        mpar_timeline_link_stats ls;
        char name[40];
        if (mpar_timeline_get_link_stats(t, l / 2, l % 2, &ls, NULL) != MPAR_SUCCESS) continue;
        snprintf(name, sizeof name, "b%d %c %d->%d", ls.boundary, ls.gradient ? 'G' : 'A', ls.from_stage, ls.to_stage);
        fprintf(out, "%-18s %5d %10llu %8.3f %8.3f %8.1f %8.3f\n", name, ls.messages, (unsigned long long)ls.bytes,
                mpar__tl_ms(ls.send_time), mpar__tl_ms(ls.receive_time), ls.bandwidth / 1e6,
                mpar__tl_ms(ls.handoff_latency));
    }
}

/* ---- Chrome trace ---- */

/* Events in start order: stage tracks take every event of their stage, link
   tracks the copies of their direction. */
static int mpar__tl_cmp_start(const void* a, const void* b) {
    const mpar_event *x = (const mpar_event*)a, *y = (const mpar_event*)b;
    if (x->start != y->start) return x->start < y->start ? -1 : 1;
    return x->end < y->end ? -1 : x->end > y->end ? 1 : 0;
}

/* place: mpar__tl_placement's tables, for the virtual stage of a compute
   event (chunk c of stage s is not c*P+s in a V). */
static void mpar__tl_trace_event(FILE* out, const mpar_timeline* t, const int* place, const mpar_event* e, int tid,
                                 double end) {
    char name[32];
    double ts = floor(e->start * 1e9 + 0.5) / 1e3, te = floor(end * 1e9 + 0.5) / 1e3; /* us, rounded once */
    mpar__tl_name(t, e, name, sizeof name);
    fprintf(out, ",\n{\"name\":\"%s\",\"cat\":\"%s\",\"ph\":\"X\",\"pid\":0,\"tid\":%d,\"ts\":%.3f,\"dur\":%.3f,"
                 "\"args\":{\"stage\":%d,\"microbatch\":%d,\"chunk\":%d,\"start_us\":%.3f,\"end_us\":%.3f",
            name, mpar__tl_kind_name(e->kind), tid, ts, te > ts ? te - ts : 0.0, e->stage, e->microbatch, e->chunk,
            e->start * 1e6, e->end * 1e6);
    if (mpar__tl_is_compute(e->kind) && e->kind != MPAR_EVENT_OPTIMIZER_STEP)
        fprintf(out, ",\"virtual_stage\":%d", place[mpar__tl_vs_count(t) + e->stage * t->virtual_stages + e->chunk]);
    if (mpar__tl_is_link(e->kind))
        fprintf(out, ",\"boundary\":%d,\"direction\":\"%s\",\"bytes\":%llu", e->boundary,
                e->gradient ? "gradients" : "activations", (unsigned long long)e->bytes);
    fprintf(out, "}}");
}

/* One track: events in start order. A track is one worker (or one link
   direction) doing one thing at a time, so when a slice starts before the
   previous one ends (device times are mapped onto the host clock with an
   error of a few microseconds) the previous slice is cut there. stage < 0:
   the copies of link direction `link`, else every event of `stage`. */
static void mpar__tl_trace_track(FILE* out, const mpar_timeline* t, const int* place, const mpar_event* sorted,
                                 int stage, int link, int tid) {
    const mpar_event* pending = NULL;
    int i;
    for (i = 0; i < t->event_count; i++) {
        const mpar_event* e = &sorted[i];
        if (stage >= 0 ? e->stage != stage
                       : !mpar__tl_is_copy(e->kind) || e->boundary != link / 2 || e->gradient != link % 2)
            continue;
        if (pending)
            mpar__tl_trace_event(out, t, place, pending, tid, e->start < pending->end ? e->start : pending->end);
        pending = e;
    }
    if (pending) mpar__tl_trace_event(out, t, place, pending, tid, pending->end);
}

static void mpar__tl_trace_meta(FILE* out, int tid, const char* name) {
    fprintf(out, ",\n{\"name\":\"thread_name\",\"ph\":\"M\",\"pid\":0,\"tid\":%d,\"args\":{\"name\":\"%s\"}}"
                 ",\n{\"name\":\"thread_sort_index\",\"ph\":\"M\",\"pid\":0,\"tid\":%d,\"args\":{\"sort_index\":%d}}",
            tid, name, tid, tid);
}

/* "stage 1" and, with chunks, "stage 1 (virtual stages 1, 6)". */
static void mpar__tl_stage_name(const mpar_timeline* t, const int* place, int s, char* buf, size_t size) {
    const int* vs_of = place + mpar__tl_vs_count(t);
    int c, V = t->virtual_stages;
    size_t n = (size_t)snprintf(buf, size, "stage %d", s);
    for (c = 0; V > 1 && c < V && n + 24 < size; c++)
        n += (size_t)snprintf(buf + n, size - n, "%s%d", c ? ", " : " (virtual stages ", vs_of[s * V + c]);
    if (V > 1 && n < size) snprintf(buf + n, size - n, "%s)", c < V ? ", ..." : "");
}

MPARDEF mpar_result mpar_timeline_write_chrome_trace(const mpar_timeline* t, FILE* out) {
    mpar_timeline_stats st;
    mpar_event* ev;
    int s, l, links, P, *place;
    if (!out || mpar_timeline_get_stats(t, &st, NULL) != MPAR_SUCCESS) return MPAR_ERROR_INVALID_ARGUMENT;
    P = t->stages, links = mpar_timeline_link_count(t);
    place = mpar__tl_placement(t);
    ev = (mpar_event*)mpar__alloc_a(&t->allocator, sizeof(mpar_event) * (size_t)(t->event_count + 1));
    if (!ev || !place) {
        mpar__free_a(&t->allocator, ev);
        mpar__free_a(&t->allocator, place);
        return MPAR_ERROR_OUT_OF_HOST_MEMORY;
    }
    if (t->event_count) memcpy(ev, t->events, sizeof(mpar_event) * (size_t)t->event_count);
    qsort(ev, (size_t)t->event_count, sizeof(mpar_event), mpar__tl_cmp_start);
    fprintf(out, "{\"displayTimeUnit\":\"ms\",\"otherData\":{\"schedule\":\"%s\",\"stages\":%d,\"virtual_stages\":%d,"
                 "\"microbatches\":%d,\"step_ms\":%.6f,\"bubble_fraction\":%.6f},\n\"traceEvents\":[",
            mpar_schedule_kind_name(t->schedule), P, t->virtual_stages, t->microbatches, mpar__tl_ms(st.step_time),
            st.bubble_fraction);
    fprintf(out, "\n{\"name\":\"process_name\",\"ph\":\"M\",\"pid\":0,\"tid\":0,\"args\":{\"name\":\"mpar %s\"}}",
            mpar_schedule_kind_name(t->schedule));
    for (s = 0; s < P; s++) {
        char name[96];
        mpar__tl_stage_name(t, place, s, name, sizeof name);
        mpar__tl_trace_meta(out, s, name);
        mpar__tl_trace_track(out, t, place, ev, s, -1, s);
    }
    for (l = 0; l < links; l++) {
        char name[64];
        int b = l / 2, g = l % 2;
        snprintf(name, sizeof name, "link %d: stage %d -> %d %s", b, place[g ? b + 1 : b], place[g ? b : b + 1],
                 g ? "gradients" : "activations");
        mpar__tl_trace_meta(out, P + l, name);
        mpar__tl_trace_track(out, t, place, ev, -1, l, P + l);
    }
    fprintf(out, "\n]}\n");
    mpar__free_a(&t->allocator, ev);
    mpar__free_a(&t->allocator, place);
    return ferror(out) ? MPAR_ERROR_IO : MPAR_SUCCESS;
}

/* ---- SVG ---- */

static const char* mpar__tl_colour(mpar_event_kind k) {
    static const char* colours[] = {"#4e79a7", "#59a14f", "#76b7b2", "#edc948",
                                    "#9c755f", "#f28e2b", "#e15759", "#bab0ac"};
    return (int)k >= 0 && k <= MPAR_EVENT_WAIT ? colours[k] : "#000000";
}

/* Axis step in ms: 1, 2 or 5 times a power of ten, about 10 ticks. */
static double mpar__tl_tick(double span_ms) {
    double raw = span_ms / 10.0, mag, norm;
    if (!(raw > 0.0)) return 1.0;
    mag = pow(10.0, floor(log10(raw)));
    norm = raw / mag;
    return (norm < 1.5 ? 1.0 : norm < 3.5 ? 2.0 : norm < 7.5 ? 5.0 : 10.0) * mag;
}

enum { MPAR__TL_SVG_W = 1200, MPAR__TL_SVG_LEFT = 90, MPAR__TL_SVG_RIGHT = 30, MPAR__TL_SVG_TOP = 84,
       MPAR__TL_SVG_LANE = 48, MPAR__TL_SVG_BOX = 30 };

static void mpar__tl_svg_legend(FILE* out) {
    static const char* labels[] = {"forward", "backward", "input grad (I)", "weight grad (W)",
                                   "optimizer", "send copy", "receive copy", "blocked on link"};
    int k, x = MPAR__TL_SVG_LEFT;
    for (k = 0; k <= (int)MPAR_EVENT_WAIT; k++) {
        int thin = k >= (int)MPAR_EVENT_SEND;
        fprintf(out, "<rect x=\"%d\" y=\"%d\" width=\"14\" height=\"%d\" fill=\"%s\"/>"
                     "<text x=\"%d\" y=\"64\" font-size=\"12\">%s</text>\n",
                x, thin ? 56 : 53, thin ? 6 : 12, mpar__tl_colour((mpar_event_kind)k), x + 18, labels[k]);
        x += 18 + 6 * (int)strlen(labels[k]) + 22; /* ~6 px per character at 12 px */
    }
}

static void mpar__tl_svg_event(FILE* out, const mpar_timeline* t, const mpar_event* e, double scale) {
    char name[32];
    double x = MPAR__TL_SVG_LEFT + e->start * scale, w = (e->end - e->start) * scale;
    int y = MPAR__TL_SVG_TOP + e->stage * MPAR__TL_SVG_LANE, compute = mpar__tl_is_compute(e->kind);
    int by = compute ? y : y + MPAR__TL_SVG_BOX + 3 + (e->kind == MPAR_EVENT_WAIT ? 0 : 2);
    int bh = compute ? MPAR__TL_SVG_BOX : e->kind == MPAR_EVENT_WAIT ? 10 : 6;
    if (w < 0.5) w = 0.5;
    mpar__tl_name(t, e, name, sizeof name);
    /* later chunks lighter: chunk c of V at opacity 1 - 0.45 c / (V - 1) */
    if (compute && t->virtual_stages > 1)
        fprintf(out, "<rect x=\"%.2f\" y=\"%d\" width=\"%.2f\" height=\"%d\" fill=\"%s\" fill-opacity=\"%.2f\" "
                     "stroke=\"#ffffff\" stroke-width=\"0.5\"><title>%s, stage %d, chunk %d: %.3f-%.3f ms",
                x, by, w, bh, mpar__tl_colour(e->kind), 1.0 - 0.45 * e->chunk / (t->virtual_stages - 1), name,
                e->stage, e->chunk, mpar__tl_ms(e->start), mpar__tl_ms(e->end));
    else
        fprintf(out, "<rect x=\"%.2f\" y=\"%d\" width=\"%.2f\" height=\"%d\" fill=\"%s\"%s><title>%s, stage %d: "
                     "%.3f-%.3f ms",
                x, by, w, bh, mpar__tl_colour(e->kind), compute ? " stroke=\"#ffffff\" stroke-width=\"0.5\"" : "", name,
                e->stage, mpar__tl_ms(e->start), mpar__tl_ms(e->end));
    if (e->bytes) fprintf(out, ", %llu bytes", (unsigned long long)e->bytes);
    fprintf(out, "</title></rect>\n");
    if (compute && e->kind != MPAR_EVENT_OPTIMIZER_STEP) {
        char label[24];
        int n = t->virtual_stages > 1 ? snprintf(label, sizeof label, "%d.%d", e->microbatch, e->chunk)
                                      : snprintf(label, sizeof label, "%d", e->microbatch);
        if (w >= 7.0 * n + 2.0)
            fprintf(out, "<text x=\"%.2f\" y=\"%d\" font-size=\"12\" text-anchor=\"middle\" fill=\"%s\">%s</text>\n",
                    x + w / 2, y + MPAR__TL_SVG_BOX / 2 + 4, e->kind == MPAR_EVENT_BACKWARD_WEIGHT ? "#000000" : "#ffffff",
                    label);
    }
}

static void mpar__tl_svg_axis(FILE* out, double step, double scale, int lanes_bottom) {
    double tick = mpar__tl_tick(mpar__tl_ms(step)), v;
    fprintf(out, "<line x1=\"%d\" y1=\"%d\" x2=\"%.2f\" y2=\"%d\" stroke=\"#333333\"/>\n", MPAR__TL_SVG_LEFT,
            lanes_bottom, MPAR__TL_SVG_LEFT + step * scale, lanes_bottom);
    for (v = 0.0; v <= mpar__tl_ms(step) * (1.0 + 1e-9); v += tick) {
        double x = MPAR__TL_SVG_LEFT + v * 1e-3 * scale;
        fprintf(out, "<line x1=\"%.2f\" y1=\"%d\" x2=\"%.2f\" y2=\"%d\" stroke=\"#dddddd\"/>"
                     "<line x1=\"%.2f\" y1=\"%d\" x2=\"%.2f\" y2=\"%d\" stroke=\"#333333\"/>"
                     "<text x=\"%.2f\" y=\"%d\" font-size=\"12\" text-anchor=\"middle\">%g</text>\n",
                x, MPAR__TL_SVG_TOP - 6, x, lanes_bottom, x, lanes_bottom, x, lanes_bottom + 5, x, lanes_bottom + 19, v);
    }
    fprintf(out, "<text x=\"%d\" y=\"%d\" font-size=\"12\" text-anchor=\"middle\">time (ms)</text>\n",
            MPAR__TL_SVG_LEFT + (MPAR__TL_SVG_W - MPAR__TL_SVG_LEFT - MPAR__TL_SVG_RIGHT) / 2, lanes_bottom + 36);
}

/* Under the stage's name in its lane: its virtual stages, chunk 0 first
   ("vs 0, 7"), cut with "..." where the lane label has no room. */
static void mpar__tl_svg_chunks(FILE* out, const mpar_timeline* t, const int* place, int s) {
    const int* vs_of = place + mpar__tl_vs_count(t);
    char text[32];
    int c, V = t->virtual_stages;
    size_t n = (size_t)snprintf(text, sizeof text, "vs");
    for (c = 0; c < V && n < 14; c++) n += (size_t)snprintf(text + n, sizeof text - n, "%s %d", c ? "," : "", vs_of[s * V + c]);
    if (c < V && n < sizeof text) snprintf(text + n, sizeof text - n, ", ...");
    fprintf(out, "<text x=\"8\" y=\"%d\" font-size=\"10\" fill=\"#555555\">%s</text>\n",
            MPAR__TL_SVG_TOP + s * MPAR__TL_SVG_LANE + 40, text);
}

MPARDEF mpar_result mpar_timeline_write_svg(const mpar_timeline* t, FILE* out) {
    mpar_timeline_stats st;
    mpar_timeline_prediction pr;
    double scale;
    int s, i, bottom, height, *place = NULL, predicted;
    if (!out || mpar_timeline_get_stats(t, &st, NULL) != MPAR_SUCCESS) return MPAR_ERROR_INVALID_ARGUMENT;
    if (t->virtual_stages > 1 && !(place = mpar__tl_placement(t))) return MPAR_ERROR_OUT_OF_HOST_MEMORY;
    scale = st.step_time > 0.0 ? (MPAR__TL_SVG_W - MPAR__TL_SVG_LEFT - MPAR__TL_SVG_RIGHT) / st.step_time : 0.0;
    bottom = MPAR__TL_SVG_TOP + t->stages * MPAR__TL_SVG_LANE;
    height = bottom + 48;
    fprintf(out, "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n"
                 "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%d\" height=\"%d\" viewBox=\"0 0 %d %d\" "
                 "font-family=\"sans-serif\">\n<rect width=\"100%%\" height=\"100%%\" fill=\"#ffffff\"/>\n",
            MPAR__TL_SVG_W, height, MPAR__TL_SVG_W, height);
    fprintf(out, "<text x=\"%d\" y=\"22\" font-size=\"16\" font-weight=\"bold\">mpar timeline: %s, %d stages x %d "
                 "chunks, %d micro-batches, step %.3f ms, measured bubble %.1f%%</text>\n",
            MPAR__TL_SVG_LEFT, mpar_schedule_kind_name(t->schedule), t->stages, t->virtual_stages, t->microbatches,
            mpar__tl_ms(st.step_time), 100.0 * st.bubble_fraction);
    predicted = mpar_timeline_predict(t, &pr, NULL) == MPAR_SUCCESS;
    if (predicted || place) fprintf(out, "<text x=\"%d\" y=\"40\" font-size=\"12\">", MPAR__TL_SVG_LEFT);
    if (predicted)
        fprintf(out, "simulated from the measured costs: step %.3f ms, bubble %.1f%%; slowest stage %d%s",
                mpar__tl_ms(pr.step_time), 100.0 * pr.bubble_fraction, st.slowest_stage, place ? "; " : "");
    if (place) fprintf(out, "boxes m.c: micro-batch m, chunk c (later chunks lighter)");
    if (predicted || place) fprintf(out, "</text>\n");
    mpar__tl_svg_legend(out);
    mpar__tl_svg_axis(out, st.step_time, scale, bottom);
    for (s = 0; s < t->stages; s++)
        fprintf(out, "<text x=\"8\" y=\"%d\" font-size=\"13\">stage %d</text>"
                     "<text x=\"8\" y=\"%d\" font-size=\"10\" fill=\"#555555\">busy %.0f%%</text>\n",
                MPAR__TL_SVG_TOP + s * MPAR__TL_SVG_LANE + 14, s, MPAR__TL_SVG_TOP + s * MPAR__TL_SVG_LANE + 28,
                st.step_time > 0.0 ? 100.0 * st.stage[s].busy / st.step_time : 0.0);
    for (s = 0; place && s < t->stages; s++) mpar__tl_svg_chunks(out, t, place, s);
    for (i = 0; i < t->event_count; i++)
        if (t->events[i].kind == MPAR_EVENT_WAIT) mpar__tl_svg_event(out, t, &t->events[i], scale);
    for (i = 0; i < t->event_count; i++)
        if (t->events[i].kind != MPAR_EVENT_WAIT) mpar__tl_svg_event(out, t, &t->events[i], scale);
    fprintf(out, "</svg>\n");
    mpar__free_a(&t->allocator, place);
    return ferror(out) ? MPAR_ERROR_IO : MPAR_SUCCESS;
}

#endif /* MPAR_PART_TIMELINE_IMPL */

/* --------------------------------------------------------------------------
   One call at a time on a pipeline: a call that finds another one running
   on the same pipeline (another thread) returns MPAR_ERROR_INVALID_STATE at
   once, naming both, instead of mixing its job with the running one (two
   train_steps at once used to deadlock in the workers' job hand-off).
   -------------------------------------------------------------------------- */

static mpar_result mpar__enter(mpar_pipeline* p, const char* call) {
    MPAR__TRY(mpar__pipeline_check(p, call));
    const char* busy;
    if (!p->guard) return MPAR_SUCCESS;
    pthread_mutex_lock(&p->guard->mu);
    busy = p->guard->call;
    if (!busy) p->guard->call = call;
    pthread_mutex_unlock(&p->guard->mu);
    if (busy)
        return mpar__fail(p->ctx, MPAR_ERROR_INVALID_STATE, "%s: another thread is in %s on this pipeline; a pipeline "
                          "takes one call at a time", call, busy);
    return MPAR_SUCCESS;
}
static mpar_result mpar__leave(mpar_pipeline* p, mpar_result r) {
    if (!p->guard) return r;
    pthread_mutex_lock(&p->guard->mu);
    p->guard->call = NULL;
    pthread_mutex_unlock(&p->guard->mu);
    return r;
}

MPARDEF mpar_result mpar_pipeline_compute_gradients(mpar_pipeline* p, const mpar_batch* batch, mpar_step_info* info) {
    mpar_result r;
    if (p && (r = mpar__enter(p, "mpar_pipeline_compute_gradients")) != MPAR_SUCCESS) return r;
    r = mpar__compute_gradients_impl(p, batch, info);
    return p ? mpar__leave(p, r) : r;
}

MPARDEF mpar_result mpar_pipeline_apply_gradients(mpar_pipeline* p, mpar_step_info* info) {
    mpar_result r;
    if (p && (r = mpar__enter(p, "mpar_pipeline_apply_gradients")) != MPAR_SUCCESS) return r;
    r = mpar__apply_gradients_impl(p, info);
    return p ? mpar__leave(p, r) : r;
}

MPARDEF mpar_result mpar_pipeline_train_step(mpar_pipeline* p, const mpar_batch* batch, mpar_step_info* info) {
    mpar_result r;
    if (p && (r = mpar__enter(p, "mpar_pipeline_train_step")) != MPAR_SUCCESS) return r;
    r = mpar__train_step_impl(p, batch, info);
    return p ? mpar__leave(p, r) : r;
}

MPARDEF mpar_result mpar_pipeline_infer(mpar_pipeline* p, const mpar_batch* batch, float* outputs, double* loss) {
    mpar_result r;
    if (p && (r = mpar__enter(p, "mpar_pipeline_infer")) != MPAR_SUCCESS) return r;
    r = mpar__infer_impl(p, batch, outputs, loss);
    return p ? mpar__leave(p, r) : r;
}

MPARDEF mpar_result mpar_pipeline_get_params(mpar_pipeline* p, int layer, float* out) {
    mpar_result r;
    if (p && (r = mpar__enter(p, "mpar_pipeline_get_params")) != MPAR_SUCCESS) return r;
    r = mpar__get_params_impl(p, layer, out);
    return p ? mpar__leave(p, r) : r;
}

MPARDEF mpar_result mpar_pipeline_set_params(mpar_pipeline* p, int layer, const float* in) {
    mpar_result r;
    if (p && (r = mpar__enter(p, "mpar_pipeline_set_params")) != MPAR_SUCCESS) return r;
    r = mpar__set_params_impl(p, layer, in);
    return p ? mpar__leave(p, r) : r;
}

MPARDEF mpar_result mpar_pipeline_get_grads(mpar_pipeline* p, int layer, float* out) {
    mpar_result r;
    if (p && (r = mpar__enter(p, "mpar_pipeline_get_grads")) != MPAR_SUCCESS) return r;
    r = mpar__get_grads_impl(p, layer, out);
    return p ? mpar__leave(p, r) : r;
}

MPARDEF mpar_result mpar_pipeline_read_state(mpar_pipeline* p, int layer, mpar_state_kind kind, float* out) {
    mpar_result r;
    if (p && (r = mpar__enter(p, "mpar_pipeline_read_state")) != MPAR_SUCCESS) return r;
    r = mpar__read_state_impl(p, layer, kind, out);
    return p ? mpar__leave(p, r) : r;
}

MPARDEF mpar_result mpar_pipeline_write_state(mpar_pipeline* p, int layer, mpar_state_kind kind, const float* in) {
    mpar_result r;
    if (p && (r = mpar__enter(p, "mpar_pipeline_write_state")) != MPAR_SUCCESS) return r;
    r = mpar__write_state_impl(p, layer, kind, in);
    return p ? mpar__leave(p, r) : r;
}

MPARDEF mpar_result mpar_pipeline_rebalance(mpar_pipeline* p, const double* device_flops, int* moved) {
    mpar_result r;
    if (p && (r = mpar__enter(p, "mpar_pipeline_rebalance")) != MPAR_SUCCESS) return r;
    r = mpar__rebalance_impl(p, device_flops, moved);
    return p ? mpar__leave(p, r) : r;
}

MPARDEF mpar_result mpar_pipeline_save_checkpoint(mpar_pipeline* p, const char* path, mpar_error* err) {
    mpar_result r;
    if (p && (r = mpar__enter(p, "mpar_pipeline_save_checkpoint")) != MPAR_SUCCESS) {
        if (err) mpar_error_set(err, r, "%s", mpar_last_error(p->ctx));
        return r;
    }
    r = mpar__save_checkpoint_impl(p, path, err);
    return p ? mpar__leave(p, r) : r;
}

MPARDEF mpar_result mpar_pipeline_load_checkpoint(mpar_pipeline* p, const char* path, mpar_error* err) {
    mpar_result r;
    if (p && (r = mpar__enter(p, "mpar_pipeline_load_checkpoint")) != MPAR_SUCCESS) {
        if (err) mpar_error_set(err, r, "%s", mpar_last_error(p->ctx));
        return r;
    }
    r = mpar__load_checkpoint_impl(p, path, err);
    return p ? mpar__leave(p, r) : r;
}

MPARDEF mpar_result mpar_pipeline_save_weights(mpar_pipeline* p, const char* path, mpar_error* err) {
    mpar_result r;
    if (p && (r = mpar__enter(p, "mpar_pipeline_save_weights")) != MPAR_SUCCESS) {
        if (err) mpar_error_set(err, r, "%s", mpar_last_error(p->ctx));
        return r;
    }
    if (!p) return mpar_error_set(err, MPAR_ERROR_INVALID_ARGUMENT, "mpar_pipeline_save_weights: pipeline is NULL");
    r = mpar__save_weights_impl(p, path, err);
    return mpar__leave(p, r);
}

MPARDEF mpar_result mpar_pipeline_load_weights(mpar_pipeline* p, const char* path, mpar_error* err) {
    mpar_result r;
    if (p && (r = mpar__enter(p, "mpar_pipeline_load_weights")) != MPAR_SUCCESS) {
        if (err) mpar_error_set(err, r, "%s", mpar_last_error(p->ctx));
        return r;
    }
    if (!p) return mpar_error_set(err, MPAR_ERROR_INVALID_ARGUMENT, "mpar_pipeline_load_weights: pipeline is NULL");
    r = mpar__load_weights_impl(p, path, err);
    return mpar__leave(p, r);
}

/* --------------------------------------------------------------------------
   7-8b. Generation: each device stage's key/value caches and work buffers
   (allocated at create, counted by mpar__pipeline_need), the stages'
   inbound queues of generation micro-batches, and the sampling the last
   stage does. The workers run it as a job of its own (MPAR__JOB_GENERATE).
   -------------------------------------------------------------------------- */

typedef struct mpar__gen_stage {
    cl_mem *kc, *vc;    /* [n]: a decoder block's key and value cache, [S x L x C]; NULL for other layers */
    cl_mem act[2];      /* ping-pong activations, [G x width] */
    cl_mem stash, scratch;
    cl_mem meta;        /* int32 [3G]: a micro-batch's tokens, slots, positions (rows each, packed) */
    unsigned char* seen; /* [G+1]: row counts this stage has run (the first run holds the first-run lock) */
    double busy_s;
} mpar__gen_stage;

struct mpar__gen {
    int S, L, G;           /* sequences, context, most rows in one micro-batch */
    mpar__gen_stage* st;   /* [vs_count] */
    struct mpar__gen_run* run; /* during mpar_pipeline_generate */
};

/* Widest activation, largest stash and scratch per row of a chunk's layers. */
static void mpar__gen_widths(const mpar_pipeline* p, const mpar__vstage* v, size_t* width, size_t* stash,
                             size_t* scratch) {
    int k;
    *width = 1, *stash = 1, *scratch = 1;
    for (k = 0; k <= v->n; k++) {
        size_t w = v->act_cum[k + 1] - v->act_cum[k];
        if (w > *width) *width = w;
    }
    for (k = 0; k < v->n; k++) {
        const mpar_layer* l = mpar_model_layer(p->model, v->first + k);
        if (l->stash_per_row > *stash) *stash = l->stash_per_row;
        if (l->scratch_per_row > *scratch) *scratch = l->scratch_per_row;
    }
}

static size_t mpar__gen_kv_floats(const mpar_pipeline* p, const mpar_layer* l) {
    return (size_t)p->desc.generate_sequences * (size_t)p->desc.generate_context * (size_t)l->in_features;
}
static int mpar__gen_rows(const mpar_pipeline* p) {
    return p->desc.generate_context > p->desc.generate_sequences ? p->desc.generate_context
                                                                 : p->desc.generate_sequences;
}

/* Device bytes chunk i's generation buffers take (each at least one float,
   as mpar__alloc_buffer allocates). */
static uint64_t mpar__gen_vstage_bytes(const mpar_pipeline* p, int i) {
    const mpar__vstage* v = &p->vs[i];
    uint64_t g = (uint64_t)mpar__gen_rows(p), bytes;
    size_t width, stash, scratch;
    int k;
    if (p->desc.generate_sequences <= 0) return 0;
    mpar__gen_widths(p, v, &width, &stash, &scratch);
    bytes = 4 * (2 * g * width + g * stash + g * scratch + 3 * g);
    for (k = 0; k < v->n; k++) {
        const mpar_layer* l = mpar_model_layer(p->model, v->first + k);
        if (l->type == mpar_layer_decoder_block()) bytes += 2 * 4 * (uint64_t)mpar__gen_kv_floats(p, l);
    }
    return bytes;
}

/* What generation needs of the model and the pipeline, checked at create. */
static mpar_result mpar__gen_check(mpar_pipeline* p) {
    mpar_pipeline_desc* d = &p->desc;
    const mpar_layer* first;
    int k, last;
    if (d->generate_sequences < 0 || d->generate_sequences > (1 << 20))
        return mpar__fail(p->ctx, MPAR_ERROR_INVALID_ARGUMENT, "mpar_pipeline_desc.generate_sequences is %d: give 0 "
                          "(no generation) to 2^20", d->generate_sequences);
    if (d->generate_sequences == 0) {
        if (d->generate_context != 0)
            return mpar__fail(p->ctx, MPAR_ERROR_INVALID_ARGUMENT, "mpar_pipeline_desc.generate_context is %d but "
                              "generate_sequences is 0: give both, or neither", d->generate_context);
        return MPAR_SUCCESS;
    }
    first = mpar_model_layer(p->model, 0);
    if (first->type != mpar_layer_embedding())
        return mpar__fail(p->ctx, MPAR_ERROR_INVALID_MODEL, "generate_sequences: the model's first layer is %s; "
                          "generation needs an embedding (tokens in, positions from its table)", first->type->name);
    if (d->generate_context == 0) d->generate_context = p->seq_len;
    if (d->generate_context < 2 || d->generate_context > p->seq_len)
        return mpar__fail(p->ctx, MPAR_ERROR_INVALID_ARGUMENT, "mpar_pipeline_desc.generate_context is %d: give 2 to "
                          "the model's seq_len %d (its position table ends there; 0: seq_len)", d->generate_context,
                          p->seq_len);
    if (d->mpi_comm || d->rebalance)
        return mpar__fail(p->ctx, MPAR_ERROR_UNSUPPORTED, "generate_sequences: generation runs in one process on fixed "
                          "stages (give neither %s)", d->mpi_comm ? "mpi_comm" : "rebalance");
    if (p->vs_count != p->workers_count)
        return mpar__fail(p->ctx, MPAR_ERROR_UNSUPPORTED, "generate_sequences: a device runs %d chunks (virtual "
                          "stages); generation needs one chunk per device", p->vs_count / p->workers_count);
    last = p->layer_count - 1;
    if (mpar_model_layer(p->model, last)->type->flags & MPAR_LAYER_LOSS) last--;
    for (k = 1; k <= last; k++) {
        const mpar_layer_type* t = mpar_model_layer(p->model, k)->type;
        if (t != mpar_layer_decoder_block() && t != mpar_layer_linear() && t != mpar_layer_relu() &&
            t != mpar_layer_gelu() && t != mpar_layer_tanh() && t != mpar_layer_dropout() &&
            t != mpar_layer_layernorm())
            return mpar__fail(p->ctx, MPAR_ERROR_INVALID_MODEL, "generate_sequences: layer %d (%s) is not one "
                              "generation can run position by position (decoder blocks and row-wise built-ins)", k,
                              t->name);
    }
    if (last < 1 || mpar_model_layer(p->model, last)->out_features != first->desc.vocab)
        return mpar__fail(p->ctx, MPAR_ERROR_INVALID_MODEL, "generate_sequences: layer %d gives %d values per row "
                          "but the embedding's vocabulary has %d tokens; the logits must have one per token", last,
                          mpar_model_layer(p->model, last)->out_features, first->desc.vocab);
    for (k = 0; k < p->vs_count; k++) {
        const mpar__vstage* v = &p->vs[k];
        uint64_t limit = d->max_buffer_bytes ? d->max_buffer_bytes : p->ctx->devices[v->device].info.max_alloc_bytes;
        int j;
        for (j = 0; j < v->n; j++) {
            const mpar_layer* l = mpar_model_layer(p->model, v->first + j);
            uint64_t bytes = 4 * (uint64_t)mpar__gen_kv_floats(p, l);
            if (l->type == mpar_layer_decoder_block() && limit && bytes > limit)
                return mpar__fail(p->ctx, MPAR_ERROR_DOES_NOT_FIT, "device %d: layer %d's key cache for %d sequences "
                                  "of %d positions takes %llu bytes, above the largest buffer (%llu bytes)",
                                  v->device, v->first + j, d->generate_sequences, d->generate_context,
                                  (unsigned long long)bytes, (unsigned long long)limit);
        }
    }
    return MPAR_SUCCESS;
}

static mpar_result mpar__gen_alloc(mpar_pipeline* p) {
    mpar__gen* gen;
    int i, k, G = mpar__gen_rows(p);
    if (p->desc.generate_sequences <= 0) return MPAR_SUCCESS;
    gen = (mpar__gen*)mpar__alloc(p->ctx, sizeof *gen);
    if (!gen) return mpar__fail(p->ctx, MPAR_ERROR_OUT_OF_HOST_MEMORY, "out of host memory");
    memset(gen, 0, sizeof *gen);
    p->gen = gen;
    gen->S = p->desc.generate_sequences, gen->L = p->desc.generate_context, gen->G = G;
    gen->st = (mpar__gen_stage*)mpar__alloc(p->ctx, sizeof(mpar__gen_stage) * (size_t)p->vs_count);
    if (!gen->st) return mpar__fail(p->ctx, MPAR_ERROR_OUT_OF_HOST_MEMORY, "out of host memory");
    memset(gen->st, 0, sizeof(mpar__gen_stage) * (size_t)p->vs_count);
    for (i = 0; i < p->vs_count; i++) {
        mpar__vstage* v = &p->vs[i];
        mpar__gen_stage* s = &gen->st[i];
        mpar__worker* w = &p->workers[v->worker];
        size_t width, stash, scratch;
        s->kc = (cl_mem*)mpar__alloc(p->ctx, sizeof(cl_mem) * (size_t)v->n);
        s->vc = (cl_mem*)mpar__alloc(p->ctx, sizeof(cl_mem) * (size_t)v->n);
        s->seen = (unsigned char*)mpar__alloc(p->ctx, (size_t)G + 1);
        if (!s->kc || !s->vc || !s->seen) return mpar__fail(p->ctx, MPAR_ERROR_OUT_OF_HOST_MEMORY, "out of host memory");
        memset(s->kc, 0, sizeof(cl_mem) * (size_t)v->n), memset(s->vc, 0, sizeof(cl_mem) * (size_t)v->n);
        memset(s->seen, 0, (size_t)G + 1);
        mpar__gen_widths(p, v, &width, &stash, &scratch);
        MPAR__TRY(mpar__alloc_buffer(p, w, (size_t)G * width, &s->act[0]));
        MPAR__TRY(mpar__alloc_buffer(p, w, (size_t)G * width, &s->act[1]));
        MPAR__TRY(mpar__alloc_buffer(p, w, (size_t)G * stash, &s->stash));
        MPAR__TRY(mpar__alloc_buffer(p, w, (size_t)G * scratch, &s->scratch));
        MPAR__TRY(mpar__alloc_buffer(p, w, 3 * (size_t)G, &s->meta));
        for (k = 0; k < v->n; k++) {
            const mpar_layer* l = mpar_model_layer(p->model, v->first + k);
            if (l->type != mpar_layer_decoder_block()) continue;
            MPAR__TRY(mpar__alloc_buffer(p, w, mpar__gen_kv_floats(p, l), &s->kc[k]));
            MPAR__TRY(mpar__alloc_buffer(p, w, mpar__gen_kv_floats(p, l), &s->vc[k]));
        }
    }
    return MPAR_SUCCESS;
}

static void mpar__gen_release(mpar_pipeline* p) {
    mpar__gen* gen = p->gen;
    int i, k;
    if (!gen) return;
    for (i = 0; gen->st && i < p->vs_count; i++) {
        mpar__gen_stage* s = &gen->st[i];
        for (k = 0; k < p->vs[i].n; k++) {
            if (s->kc && s->kc[k]) clReleaseMemObject(s->kc[k]);
            if (s->vc && s->vc[k]) clReleaseMemObject(s->vc[k]);
        }
        if (s->meta) clReleaseMemObject(s->meta);
        if (s->scratch) clReleaseMemObject(s->scratch);
        if (s->stash) clReleaseMemObject(s->stash);
        if (s->act[1]) clReleaseMemObject(s->act[1]);
        if (s->act[0]) clReleaseMemObject(s->act[0]);
        mpar__free(p->ctx, s->kc), mpar__free(p->ctx, s->vc), mpar__free(p->ctx, s->seen);
    }
    mpar__free(p->ctx, gen->st);
    mpar__free(p->ctx, gen);
    p->gen = NULL;
}

/* ---- one call's run: messages between stages, and the last stage's
   bookkeeping of every sequence ---- */
enum { MPAR__GEN_PREFILL = 0, MPAR__GEN_DECODE = 1, MPAR__GEN_QUIT = 2 };

typedef struct mpar__gen_msg {
    int kind, rows, group;
    int32_t* meta; /* [3 rows]: tokens, slots (sequence indices), positions */
    float* data;   /* activations [rows x the receiving chunk's input width]; NULL into stage 0 */
} mpar__gen_msg;

typedef struct mpar__gen_pick {
    float v;
    int i;
} mpar__gen_pick;

typedef struct mpar__gen_run {
    const mpar_generate_desc* g;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    mpar__gen_msg* ring; /* [stages x cap]: stage s's inbound queue */
    int* head;
    int* count;
    int cap, aborted;
    /* the last stage's, sequence by sequence */
    int groups, in_flight, vocab, prefills_left;
    int* made;
    int* live;
    int* group_wait; /* prefills of the group not sampled yet */
    int32_t* last;   /* each sequence's latest token */
    uint64_t* rng;
    float* logits;   /* [G x vocab] */
    mpar__gen_pick* pick; /* [vocab] */
    double t0, t_prefill;
    int64_t prompt_tokens, new_tokens, decode_tokens;
} mpar__gen_run;

static int mpar__gen_max_new(const mpar_generate_desc* g, int i) {
    return g->max_new_tokens ? g->max_new_tokens[i] : g->max_new;
}

/* Queues a message to stage `s` (the queue has room for every message
   of a call: each sequence has at most one in flight, plus a quit). */
static void mpar__gen_push(mpar__gen_run* run, int s, const mpar__gen_msg* m) {
    pthread_mutex_lock(&run->mu);
    run->ring[(size_t)s * (size_t)run->cap + (size_t)((run->head[s] + run->count[s]) % run->cap)] = *m;
    run->count[s]++;
    pthread_cond_broadcast(&run->cv);
    pthread_mutex_unlock(&run->mu);
}

static mpar_result mpar__gen_pop(mpar_pipeline* p, int s, mpar__gen_msg* m) {
    mpar__gen_run* run = p->gen->run;
    double limit = mpar__now() + p->desc.timeout_seconds;
    pthread_mutex_lock(&run->mu);
    while (!run->count[s] && !run->aborted && mpar__now() < limit) {
        struct timespec until;
        double at;
        clock_gettime(CLOCK_REALTIME, &until); /* wake every 50 ms to look at the clock */
        at = (double)until.tv_nsec + 50e6;
        until.tv_sec += (time_t)(at / 1e9);
        until.tv_nsec = (long)fmod(at, 1e9);
        pthread_cond_timedwait(&run->cv, &run->mu, &until);
    }
    if (run->aborted) {
        pthread_mutex_unlock(&run->mu);
        return mpar__fail(p->ctx, MPAR_ERROR_ABORTED, "another stage failed during generation");
    }
    if (!run->count[s]) {
        pthread_mutex_unlock(&run->mu);
        return mpar__fail(p->ctx, MPAR_ERROR_TIMEOUT, "waited %.0f s for a generation micro-batch",
                          p->desc.timeout_seconds);
    }
    *m = run->ring[(size_t)s * (size_t)run->cap + (size_t)run->head[s]];
    run->head[s] = (run->head[s] + 1) % run->cap;
    run->count[s]--;
    pthread_mutex_unlock(&run->mu);
    return MPAR_SUCCESS;
}

static void mpar__gen_msg_free(mpar_pipeline* p, mpar__gen_msg* m) {
    mpar__free(p->ctx, m->meta), mpar__free(p->ctx, m->data);
    m->meta = NULL, m->data = NULL;
}

/* A decoder block's forward for rows at their own positions: the keys and
   values of the rows go into the cache, and each row attends over its
   sequence's cache up to its position (mpar__block_fwd with the
   attention read from the cache). */
static mpar_result mpar__gen_block(mpar_exec* ex, const mpar_layer* l, mpar_buf x, mpar_buf y, mpar_buf p,
                                   mpar_buf st, cl_mem kc, cl_mem vc, mpar_buf meta, int rows, int S, int L) {
    mpar__block_shape s = mpar__block(l);
    size_t r = (size_t)rows;
    mpar_buf h1 = mpar__at(st, r * s.s_h1), qkv = mpar__at(st, r * s.s_qkv), pr = mpar__at(st, r * s.s_p);
    mpar_buf a = mpar__at(st, r * s.s_a), x2 = mpar__at(st, r * s.s_x2), h2 = mpar__at(st, r * s.s_h2);
    mpar_buf f = mpar__at(st, r * s.s_f), g = mpar__at(st, r * s.s_g);
    mpar_buf slot = mpar__at(meta, r), pos = mpar__at(meta, 2 * r);
    mpar_buf kb = mpar__buf0(kc), vb = mpar__buf0(vc);
    MPAR__TRY(mpar__ln_fwd(ex, x, mpar__at(p, s.ln1), h1, mpar__at(st, r * s.s_st1), rows, s.ci, mpar__eps(l)));
    MPAR__TRY(mpar__proj(ex, h1, mpar__at(p, s.wqkv), mpar__at(p, s.bqkv), qkv, rows, s.ci, s.c3i));
    MPAR__TRY(mpar_exec_launch(ex, "generate.cl", "mpar_kv_store", r * 2 * s.c, 0, "BBBBBiiii", qkv, slot, pos, kb, vb,
                               rows, s.ci, S, L));
    MPAR__TRY(mpar_exec_launch(ex, "generate.cl", "mpar_attn_cached", r * s.h, 0, "BBBBBBBiiiii", qkv, slot, pos, kb,
                               vb, a, pr, rows, s.ci, s.hi, S, L));
    MPAR__TRY(mpar__proj(ex, a, mpar__at(p, s.wo), mpar__at(p, s.bo), y, rows, s.ci, s.ci));
    MPAR__TRY(mpar__add(ex, x, y, x2, r * s.c));
    MPAR__TRY(mpar__ln_fwd(ex, x2, mpar__at(p, s.ln2), h2, mpar__at(st, r * s.s_st2), rows, s.ci, mpar__eps(l)));
    MPAR__TRY(mpar__proj(ex, h2, mpar__at(p, s.w1), mpar__at(p, s.b1), f, rows, s.ci, s.hdi));
    MPAR__TRY(mpar_exec_launch(ex, "elementwise.cl", "mpar_gelu_fwd", r * s.hd, 0, "BBl", f, g, r * s.hd));
    MPAR__TRY(mpar__proj(ex, g, mpar__at(p, s.w2), mpar__at(p, s.b2), y, rows, s.hdi, s.ci));
    return mpar__add(ex, y, x2, y, r * s.c);
}

/* The chunk's layers on a micro-batch already uploaded (meta, and act[0]
   past stage 0); *out_k: the region holding the result, *cur its buffer. */
static mpar_result mpar__gen_layers(mpar__worker* w, const mpar__vstage* v, mpar__gen_stage* gs, int rows, int* cur,
                                    int* out_k) {
    mpar_pipeline* p = w->p;
    mpar__gen* gen = p->gen;
    mpar_buf meta = mpar__buf0(gs->meta);
    int k;
    *cur = 0;
    for (k = 0; k < v->n; k++) {
        const mpar_layer* l = mpar_model_layer(p->model, v->first + k);
        mpar_buf x = mpar__buf0(gs->act[*cur]), y = mpar__buf0(gs->act[!*cur]), prm = mpar__state(v, v->params, k);
        if (l->type->flags & MPAR_LAYER_LOSS) break;
        if (l->type == mpar_layer_embedding()) {
            size_t c = (size_t)l->out_features, voc = (size_t)l->desc.vocab;
            MPAR__TRY(mpar_exec_launch(&w->ex, "generate.cl", "mpar_embed_at", (size_t)rows * c, 0, "BBBBBiiii", meta,
                                       mpar__at(meta, 2 * (size_t)rows), prm, mpar__at(prm, voc * c), y, rows,
                                       l->seq_len, l->out_features, l->desc.vocab));
        } else if (l->type == mpar_layer_decoder_block()) {
            MPAR__TRY(mpar__gen_block(&w->ex, l, x, y, prm, mpar__buf0(gs->stash), gs->kc[k], gs->vc[k], meta, rows,
                                      gen->S, gen->L));
        } else {
            mpar_io io;
            memset(&io, 0, sizeof io);
            io.rows = rows, io.x = x, io.y = y, io.params = prm;
            io.stash = mpar__buf0(gs->stash), io.scratch = mpar__buf0(gs->scratch);
            MPAR__TRY(l->type->forward(&w->ex, l, &io));
        }
        *cur = !*cur;
    }
    *out_k = k;
    return MPAR_SUCCESS;
}

/* Largest logit first, the lower index first on a tie. */
static int mpar__gen_pick_order(const void* a, const void* b) {
    const mpar__gen_pick *x = (const mpar__gen_pick*)a, *y = (const mpar__gen_pick*)b;
    if (x->v != y->v) return x->v > y->v ? -1 : 1;
    return x->i < y->i ? -1 : x->i > y->i;
}

/* The next token from one row of logits (see mpar_generate_desc). */
static int mpar__gen_sample(mpar__gen_run* run, const float* lg, int seq) {
    const mpar_generate_desc* g = run->g;
    int V = run->vocab, k, j;
    double sum = 0.0, u, acc = 0.0;
    if (!(g->temperature > 0.0f)) {
        int32_t best = 0;
        mpar_argmax(lg, 1, V, &best, NULL);
        return (int)best;
    }
    for (j = 0; j < V; j++) run->pick[j].v = isnan(lg[j]) ? -INFINITY : lg[j], run->pick[j].i = j;
    qsort(run->pick, (size_t)V, sizeof run->pick[0], mpar__gen_pick_order);
    k = g->top_k > 0 && g->top_k < V ? g->top_k : V;
    if (!isfinite(run->pick[0].v)) return run->pick[0].i;
    for (j = 0; j < k; j++) sum += exp(((double)run->pick[j].v - (double)run->pick[0].v) / (double)g->temperature);
    u = mpar__rng_uniform(&run->rng[seq]) * sum;
    for (j = 0; j < k; j++) {
        acc += exp(((double)run->pick[j].v - (double)run->pick[0].v) / (double)g->temperature);
        if (u < acc) return run->pick[j].i;
    }
    return run->pick[k - 1].i;
}

/* Sends group `grp`'s live sequences to stage 0 as one decode micro-batch;
   nothing when none is live. */
static mpar_result mpar__gen_post_group(mpar_pipeline* p, mpar__gen_run* run, int grp) {
    const mpar_generate_desc* g = run->g;
    mpar__gen_msg m;
    int i, rows = 0;
    for (i = grp; i < g->sequences; i += run->groups) rows += run->live[i];
    if (!rows) return MPAR_SUCCESS;
    memset(&m, 0, sizeof m);
    m.kind = MPAR__GEN_DECODE, m.rows = rows, m.group = grp;
    m.meta = (int32_t*)mpar__alloc(p->ctx, sizeof(int32_t) * 3 * (size_t)rows);
    if (!m.meta) return mpar__fail(p->ctx, MPAR_ERROR_OUT_OF_HOST_MEMORY, "out of host memory");
    for (i = grp, rows = 0; i < g->sequences; i += run->groups) {
        if (!run->live[i]) continue;
        m.meta[rows] = run->last[i];
        m.meta[m.rows + rows] = i;
        m.meta[2 * m.rows + rows] = g->prompt_lengths[i] + run->made[i] - 1;
        rows++;
    }
    run->in_flight++;
    mpar__gen_push(run, 0, &m);
    return MPAR_SUCCESS;
}

/* The last stage: a token for each row of a finished micro-batch, then the
   group's next step, or the end. */
static mpar_result mpar__gen_sample_msg(mpar_pipeline* p, mpar__gen_msg* m, const float* logits) {
    mpar__gen_run* run = p->gen->run;
    const mpar_generate_desc* g = run->g;
    int r, s;
    for (r = 0; r < m->rows; r++) {
        const float* lg = logits + (m->kind == MPAR__GEN_PREFILL ? 0 : (size_t)r * (size_t)run->vocab);
        int tok, stop = 0;
        if (m->kind == MPAR__GEN_PREFILL && r < m->rows - 1) continue; /* only the prompt's last position */
        s = m->meta[m->rows + r];
        tok = mpar__gen_sample(run, lg, s);
        if (g->outputs && g->outputs[s]) g->outputs[s][run->made[s]] = tok;
        run->made[s]++, run->last[s] = tok, run->new_tokens++;
        if (m->kind == MPAR__GEN_DECODE) run->decode_tokens++;
        if (g->on_token) g->on_token(g->user, s, tok);
        for (stop = 0; stop < g->stop_count && g->stop_tokens[stop] != tok; stop++) {}
        if (stop < g->stop_count) {
            if (g->finish) g->finish[s] = MPAR_GENERATE_FINISH_STOP;
            run->live[s] = 0;
        } else if (run->made[s] >= mpar__gen_max_new(g, s)) {
            if (g->finish) g->finish[s] = MPAR_GENERATE_FINISH_LENGTH;
            run->live[s] = 0;
        } else if (g->prompt_lengths[s] + run->made[s] >= p->gen->L) {
            if (g->finish) g->finish[s] = MPAR_GENERATE_FINISH_CONTEXT;
            run->live[s] = 0;
        }
        if (g->output_lengths) g->output_lengths[s] = run->made[s];
    }
    run->in_flight--;
    if (m->kind == MPAR__GEN_PREFILL) {
        if (--run->prefills_left == 0) run->t_prefill = mpar__now();
        if (--run->group_wait[m->group] == 0) MPAR__TRY(mpar__gen_post_group(p, run, m->group));
    } else {
        MPAR__TRY(mpar__gen_post_group(p, run, m->group));
    }
    if (run->in_flight == 0) { /* every sequence is done */
        mpar__gen_msg q;
        memset(&q, 0, sizeof q);
        q.kind = MPAR__GEN_QUIT;
        mpar__gen_push(run, 0, &q);
    }
    return MPAR_SUCCESS;
}

/* One micro-batch on this worker's chunk: in, layers, out (to the next
   stage, or sampled on the last). A row count the stage has not run yet
   runs under the context's first-run lock (see mpar__serial_begin). */
static mpar_result mpar__gen_step(mpar__worker* w, mpar__gen_msg* m) {
    mpar_pipeline* p = w->p;
    mpar__vstage* v = &p->vs[w->index];
    mpar__gen_stage* gs = &p->gen->st[w->index];
    mpar__gen_run* run = p->gen->run;
    int rows = m->rows, cur = 0, k = 0, last = w->index == p->vs_count - 1, held;
    size_t width, in_width = v->act_cum[1] - v->act_cum[0];
    double t = mpar__now();
    mpar_result r;
    float* out;
    MPAR__TRY(mpar__upload(w, gs->meta, 0, m->meta, 3 * (size_t)rows));
    if (w->index > 0) MPAR__TRY(mpar__upload(w, gs->act[0], 0, m->data, (size_t)rows * in_width));
    mpar__free(p->ctx, m->data);
    m->data = NULL;
    held = !gs->seen[rows] && p->ctx->devices[w->device].pocl;
    if (held) pthread_mutex_lock(&p->ctx->first_run_lock);
    r = mpar__gen_layers(w, v, gs, rows, &cur, &k);
    if (r == MPAR_SUCCESS) r = mpar__cl_check(p->ctx, clFinish(w->ex.queue), "clFinish", __FILE__, __LINE__);
    if (held) pthread_mutex_unlock(&p->ctx->first_run_lock);
    MPAR__TRY(r);
    gs->seen[rows] = 1;
    width = v->act_cum[k + 1] - v->act_cum[k];
    if (last) {
        size_t first = m->kind == MPAR__GEN_PREFILL ? (size_t)rows - 1 : 0, n = m->kind == MPAR__GEN_PREFILL ? 1 : (size_t)rows;
        MPAR__TRY(mpar__exec_copy(&w->ex, mpar__at(mpar__buf0(gs->act[cur]), first * width), run->logits,
                                  n * width * 4, 0, 0));
        gs->busy_s += mpar__now() - t;
        r = mpar__gen_sample_msg(p, m, run->logits);
        mpar__gen_msg_free(p, m);
        return r;
    }
    out = (float*)mpar__alloc(p->ctx, sizeof(float) * (size_t)rows * width);
    if (!out) return mpar__fail(p->ctx, MPAR_ERROR_OUT_OF_HOST_MEMORY, "out of host memory");
    r = mpar__exec_copy(&w->ex, mpar__buf0(gs->act[cur]), out, (size_t)rows * width * 4, 0, 0);
    if (r != MPAR_SUCCESS) {
        mpar__free(p->ctx, out);
        return r;
    }
    m->data = out;
    gs->busy_s += mpar__now() - t;
    mpar__gen_push(run, w->index + 1, m); /* the message moves on with its meta */
    m->meta = NULL, m->data = NULL;
    return MPAR_SUCCESS;
}

/* A worker's generation job: micro-batches until the quit. */
static mpar_result mpar__gen_worker(mpar__worker* w) {
    mpar_pipeline* p = w->p;
    mpar__gen_run* run = p->gen ? p->gen->run : NULL;
    mpar_result r = MPAR_SUCCESS;
    if (!run) return mpar__fail(p->ctx, MPAR_ERROR_INVALID_STATE, "generation job without a generation call");
    for (;;) {
        mpar__gen_msg m;
        r = mpar__gen_pop(p, w->index, &m);
        if (r != MPAR_SUCCESS) break;
        if (m.kind == MPAR__GEN_QUIT) {
            if (w->index + 1 < p->vs_count) mpar__gen_push(run, w->index + 1, &m);
            break;
        }
        r = mpar__gen_step(w, &m);
        mpar__gen_msg_free(p, &m);
        if (r != MPAR_SUCCESS) break;
    }
    if (r != MPAR_SUCCESS) {
        pthread_mutex_lock(&run->mu);
        run->aborted = 1;
        pthread_cond_broadcast(&run->cv);
        pthread_mutex_unlock(&run->mu);
    }
    return r;
}

#define MPAR__GEN_BAD(p, field, ...) \
    mpar__fail((p)->ctx, MPAR_ERROR_INVALID_ARGUMENT, "mpar_generate_desc." field ": " __VA_ARGS__)

static mpar_result mpar__gen_validate(mpar_pipeline* p, const mpar_generate_desc* g) {
    const mpar_layer* emb;
    int i, j;
    if (!p->gen)
        return mpar__fail(p->ctx, MPAR_ERROR_INVALID_STATE, "mpar_pipeline_generate: the pipeline was created without "
                          "generate_sequences, so it has no key/value cache");
    if (!g) return mpar__fail(p->ctx, MPAR_ERROR_INVALID_ARGUMENT, "mpar_pipeline_generate: desc is NULL");
    if (g->sequences < 1 || g->sequences > p->gen->S)
        return MPAR__GEN_BAD(p, "sequences", "%d; give 1 to the pipeline's generate_sequences (%d)", g->sequences,
                             p->gen->S);
    if (!g->prompts) return MPAR__GEN_BAD(p, "prompts", "NULL");
    if (!g->prompt_lengths) return MPAR__GEN_BAD(p, "prompt_lengths", "NULL");
    if (!g->max_new_tokens && g->max_new < 0) return MPAR__GEN_BAD(p, "max_new", "%d is negative", g->max_new);
    if (g->stop_count < 0 || (g->stop_count > 0 && !g->stop_tokens))
        return MPAR__GEN_BAD(p, "stop_tokens", "stop_count is %d; give that many stop tokens (or 0)", g->stop_count);
    if (!(g->temperature >= 0.0f) || isinf(g->temperature))
        return MPAR__GEN_BAD(p, "temperature", "%g; give 0 (greedy) or a finite positive value",
                             (double)g->temperature);
    if (g->top_k < 0) return MPAR__GEN_BAD(p, "top_k", "%d; give 0 (every token) or more", g->top_k);
    if (g->groups < 0 || g->groups > g->sequences)
        return MPAR__GEN_BAD(p, "groups", "%d; give 0 (one per stage) to sequences (%d)", g->groups, g->sequences);
    emb = mpar_model_layer(p->model, 0);
    for (i = 0; i < g->sequences; i++) {
        int n = g->prompt_lengths[i], mx = mpar__gen_max_new(g, i);
        if (n < 1 || n >= p->gen->L)
            return MPAR__GEN_BAD(p, "prompt_lengths", "sequence %d has %d tokens; give 1 to %d (generate_context %d "
                                 "less one: a new token needs a position)", i, n, p->gen->L - 1, p->gen->L);
        if (!g->prompts[i]) return MPAR__GEN_BAD(p, "prompts", "sequence %d's prompt is NULL", i);
        for (j = 0; j < n; j++)
            if (g->prompts[i][j] < 0 || g->prompts[i][j] >= emb->desc.vocab)
                return MPAR__GEN_BAD(p, "prompts", "token %d of sequence %d is %d, outside the vocabulary of %d", j, i,
                                     (int)g->prompts[i][j], emb->desc.vocab);
        if (mx < 0) return MPAR__GEN_BAD(p, "max_new_tokens", "sequence %d: %d is negative", i, mx);
        if (mx > 0 && g->outputs && !g->outputs[i])
            return MPAR__GEN_BAD(p, "outputs", "sequence %d's array is NULL", i);
    }
    return MPAR_SUCCESS;
}

static void mpar__gen_run_free(mpar_pipeline* p, mpar__gen_run* run) {
    int s, i;
    if (run->ring)
        for (s = 0; s < p->vs_count; s++)
            for (i = 0; i < run->count[s]; i++)
                mpar__gen_msg_free(p, &run->ring[(size_t)s * (size_t)run->cap + (size_t)((run->head[s] + i) % run->cap)]);
    mpar__free(p->ctx, run->ring), mpar__free(p->ctx, run->head), mpar__free(p->ctx, run->count);
    mpar__free(p->ctx, run->made), mpar__free(p->ctx, run->live), mpar__free(p->ctx, run->group_wait);
    mpar__free(p->ctx, run->last), mpar__free(p->ctx, run->rng), mpar__free(p->ctx, run->logits);
    mpar__free(p->ctx, run->pick);
    pthread_cond_destroy(&run->cv);
    pthread_mutex_destroy(&run->mu);
}

/* The run's host state, every sequence's prefill queued to stage 0. */
static mpar_result mpar__gen_run_init(mpar_pipeline* p, const mpar_generate_desc* g, mpar__gen_run* run) {
    mpar_context* ctx = p->ctx;
    size_t S = (size_t)g->sequences, st = (size_t)p->vs_count;
    int i;
    memset(run, 0, sizeof *run);
    pthread_mutex_init(&run->mu, NULL);
    pthread_cond_init(&run->cv, NULL);
    run->g = g;
    run->vocab = mpar_model_layer(p->model, 0)->desc.vocab;
    run->groups = g->groups ? g->groups : (p->vs_count < g->sequences ? p->vs_count : g->sequences);
    run->cap = 2 * g->sequences + 2;
    run->ring = (mpar__gen_msg*)mpar__alloc(ctx, sizeof(mpar__gen_msg) * st * (size_t)run->cap);
    run->head = (int*)mpar__alloc(ctx, sizeof(int) * st), run->count = (int*)mpar__alloc(ctx, sizeof(int) * st);
    run->made = (int*)mpar__alloc(ctx, sizeof(int) * S), run->live = (int*)mpar__alloc(ctx, sizeof(int) * S);
    run->group_wait = (int*)mpar__alloc(ctx, sizeof(int) * S);
    run->last = (int32_t*)mpar__alloc(ctx, sizeof(int32_t) * S);
    run->rng = (uint64_t*)mpar__alloc(ctx, sizeof(uint64_t) * S);
    run->logits = (float*)mpar__alloc(ctx, sizeof(float) * (size_t)p->gen->G * (size_t)run->vocab);
    run->pick = (mpar__gen_pick*)mpar__alloc(ctx, sizeof(mpar__gen_pick) * (size_t)run->vocab);
    if (!run->ring || !run->head || !run->count || !run->made || !run->live || !run->group_wait || !run->last ||
        !run->rng || !run->logits || !run->pick)
        return mpar__fail(ctx, MPAR_ERROR_OUT_OF_HOST_MEMORY, "out of host memory");
    memset(run->head, 0, sizeof(int) * st), memset(run->count, 0, sizeof(int) * st);
    memset(run->group_wait, 0, sizeof(int) * S);
    for (i = 0; i < g->sequences; i++) {
        run->made[i] = 0, run->last[i] = 0;
        run->live[i] = mpar__gen_max_new(g, i) > 0;
        run->rng[i] = g->seed ^ (0x9E3779B97F4A7C15ULL * (uint64_t)(i + 1));
        mpar__rng_next(&run->rng[i]);
        if (g->output_lengths) g->output_lengths[i] = 0;
        if (g->finish) g->finish[i] = MPAR_GENERATE_FINISH_LENGTH;
    }
    run->t0 = run->t_prefill = mpar__now();
    for (i = 0; i < g->sequences; i++) {
        mpar__gen_msg m;
        int n = g->prompt_lengths[i], j;
        if (!run->live[i]) continue;
        memset(&m, 0, sizeof m);
        m.kind = MPAR__GEN_PREFILL, m.rows = n, m.group = i % run->groups;
        m.meta = (int32_t*)mpar__alloc(ctx, sizeof(int32_t) * 3 * (size_t)n);
        if (!m.meta) return mpar__fail(ctx, MPAR_ERROR_OUT_OF_HOST_MEMORY, "out of host memory");
        for (j = 0; j < n; j++) m.meta[j] = g->prompts[i][j], m.meta[n + j] = i, m.meta[2 * n + j] = j;
        run->group_wait[m.group]++, run->in_flight++, run->prefills_left++, run->prompt_tokens += n;
        mpar__gen_push(run, 0, &m);
    }
    if (run->in_flight == 0) { /* nothing to generate: the workers stop at once */
        mpar__gen_msg q;
        memset(&q, 0, sizeof q);
        q.kind = MPAR__GEN_QUIT;
        mpar__gen_push(run, 0, &q);
    }
    return MPAR_SUCCESS;
}

static mpar_result mpar__generate_impl(mpar_pipeline* p, const mpar_generate_desc* g, mpar_generate_stats* stats) {
    mpar__gen_run run;
    mpar__job last_job;
    mpar_result r;
    int i;
    if (!p) return MPAR_ERROR_INVALID_ARGUMENT;
    if (p->damaged) return mpar__damaged(p);
    MPAR__TRY(mpar__gen_validate(p, g));
    if (stats) memset(stats, 0, sizeof *stats);
    for (i = 0; i < p->vs_count; i++) p->gen->st[i].busy_s = 0.0;
    r = mpar__gen_run_init(p, g, &run);
    if (r == MPAR_SUCCESS) {
        last_job = p->last_job; /* the timeline keeps showing the last training or inference job */
        p->gen->run = &run;
        r = mpar__run_job(p, MPAR__JOB_GENERATE);
        p->gen->run = NULL;
        p->last_job = last_job;
    }
    if (stats) {
        double end = mpar__now();
        stats->prompt_tokens = run.prompt_tokens, stats->new_tokens = run.new_tokens;
        stats->decode_tokens = run.decode_tokens;
        stats->seconds = end - run.t0;
        stats->prefill_seconds = run.t_prefill - run.t0;
        stats->decode_seconds = end - run.t_prefill;
        stats->stages = p->vs_count < 64 ? p->vs_count : 64;
        for (i = 0; i < stats->stages; i++) stats->stage_busy_seconds[i] = p->gen->st[i].busy_s;
    }
    mpar__gen_run_free(p, &run);
    return r;
}

MPARDEF mpar_result mpar_pipeline_generate(mpar_pipeline* p, const mpar_generate_desc* g, mpar_generate_stats* stats) {
    mpar_result r;
    if (p && (r = mpar__enter(p, "mpar_pipeline_generate")) != MPAR_SUCCESS) return r;
    r = mpar__generate_impl(p, g, stats);
    return p ? mpar__leave(p, r) : r;
}

#endif /* MPAR_IMPLEMENTATION_DONE */
#endif /* MPAR_IMPLEMENTATION */

/*
MIT License

Copyright (c) 2026 the mpar authors

Permission is hereby granted, free of charge, to any person obtaining a copy
of this software and associated documentation files (the "Software"), to deal
in the Software without restriction, including without limitation the rights
to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all
copies or substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
SOFTWARE.
*/
