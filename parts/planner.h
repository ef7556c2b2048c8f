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
     A copy is charged as blocking on BOTH ends (a host-staged copy keeps the
     sender's and the receiver's worker busy; nothing overlaps), so X is
     added to the stage before and to the stage after the cut:
        t_s = compute_s + X(cut before s) + X(cut after s)
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
   devices. For one device sequence the search is exact: the bottleneck is
   found by bisection over the doubles with an O(stages * layers) sliding-
   window feasibility test (memory windows only move right), then the path
   by an O(stages * layers^2) DP capped at that bottleneck. Device
   sequences: with order == FIXED, every subsequence of the index order;
   with SEARCH, every ordered subset (identical devices deduplicated). When
   there are more of those than order_budget (default 4096: every order of
   up to 6 devices) a hill climb (swap two, replace one) from the given and
   the fastest-first orders takes over, and plan.exact is 0.
   ========================================================================== */
#ifndef MPAR_PART_PLANNER_DECL
#define MPAR_PART_PLANNER_DECL

#include <stdio.h> /* FILE, for the print functions */

#ifdef __cplusplus
extern "C" {
#endif

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
} mpar_plan_link;

/* One stage of a plan. MANUAL input reads device, first_layer, last_layer. */
typedef struct mpar_plan_stage {
    int device;              /* index into desc.devices */
    int first_layer;         /* inclusive, 0-based */
    int last_layer;          /* inclusive */
    int in_flight;           /* stash multiplier used for memory */
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
    int virtual_stages;                   /* V; 0 -> 1; only INTERLEAVED_1F1B uses V > 1 */
    mpar_plan_mode mode;                  /* default OPTIMAL */
    int use_devices;                      /* OPTIMAL: 0 = choose (fewer if faster), n = exactly n */
    mpar_plan_order order;                /* OPTIMAL: default SEARCH */
    int order_budget;                     /* OPTIMAL: 0 -> MPAR_PLAN_DEFAULT_ORDER_BUDGET */
    const double* weights;                /* PROPORTIONAL: num_devices weights >= 0, index order */
    const mpar_plan_stage* manual_stages; /* MANUAL: ranges in pipeline order ... */
    int num_manual_stages;
    const int* manual_layer_devices;      /* ... or MANUAL: a device per layer */
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

/* "device:first-last,..." e.g. "0:0-5,1:6-11". snprintf-like: writes at
   most size bytes (NUL-terminated if size > 0) and returns the length the
   whole text needs, or -1 for a NULL plan. */
MPARDEF int mpar_plan_to_string(const mpar_plan* plan, char* buf, size_t size);

/* Reads the text form (at most `length` bytes, stopping at a NUL; blanks
   between tokens allowed; "d:a" means "d:a-a") into a plan holding only the
   ranges: feed its stages to MANUAL to validate and cost them. Any input is
   safe. Errors: MPAR_ERROR_INVALID_ARGUMENT (NULL), MPAR_ERROR_INVALID_PLAN
   with the offset of the fault, MPAR_ERROR_OUT_OF_HOST_MEMORY. */
MPARDEF mpar_result mpar_plan_parse(const char* text, size_t length, mpar_plan* out, mpar_error* err);

/* A table for people, and JSON for programs. MPAR_ERROR_IO if writing fails. */
MPARDEF mpar_result mpar_plan_print(const mpar_plan* plan, FILE* f);
MPARDEF mpar_result mpar_plan_write_json(const mpar_plan* plan, FILE* f);

MPARDEF const char* mpar_plan_binding_name(mpar_plan_binding_kind kind);

#ifdef __cplusplus
}
#endif
#endif /* MPAR_PART_PLANNER_DECL */

#ifdef MPAR_IMPLEMENTATION
#ifndef MPAR_PART_PLANNER_IMPL
#define MPAR_PART_PLANNER_IMPL

#include <float.h>
#include <math.h>
#include <string.h>

#define MPAR__PLANNER_INF HUGE_VAL
#define MPAR__PLANNER_TOL 1e-9

/* ---- small helpers ---- */

static int mpar__planner_bad(double x) { return !(x >= 0.0 && x <= DBL_MAX); } /* catches NaN too */

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

static const char* mpar__planner_kind_name(mpar_schedule_kind kind) {
    switch (kind) {
    case MPAR_SCHEDULE_SEQUENTIAL: return "SEQUENTIAL";
    case MPAR_SCHEDULE_GPIPE: return "GPIPE";
    case MPAR_SCHEDULE_1F1B: return "1F1B";
    case MPAR_SCHEDULE_INTERLEAVED_1F1B: return "INTERLEAVED_1F1B";
    case MPAR_SCHEDULE_ZB_H1: return "ZB_H1";
    }
    return "?";
}

MPARDEF const char* mpar_plan_binding_name(mpar_plan_binding_kind kind) {
    switch (kind) {
    case MPAR_PLAN_BINDING_COMPUTE: return "compute";
    case MPAR_PLAN_BINDING_MEMORY: return "memory";
    case MPAR_PLAN_BINDING_LINK: return "link";
    }
    return "?";
}

/* ---- in-flight counts ---- */

/* Real (not padding) item of Megatron's interleaved order, as section 6
   generates it: groups of P micro-batches, chunk-major inside a group. */
static int mpar__planner_item_real(int P, int V, int M, long long k) {
    long long group = k / ((long long)P * V), in_group = k % ((long long)P * V);
    return group * P + in_group % P < M;
}

static int mpar__planner_interleaved_peak(int P, int M, int V, int s) {
    long long total = ((long long)M + P - 1) / P * P * V, warm = 2LL * (P - s - 1) + (long long)(V - 1) * P;
    long long k, n = 0, peak = 0;
    if (warm > total) warm = total;
    for (k = 0; k < warm; ++k) n += mpar__planner_item_real(P, V, M, k);
    peak = n;
    for (k = 0; k < total; ++k) {
        if (warm + k < total) n += mpar__planner_item_real(P, V, M, warm + k);
        if (n > peak) peak = n;
        n -= mpar__planner_item_real(P, V, M, k);
    }
    return (int)peak;
}

MPARDEF int mpar_plan_in_flight(mpar_schedule_kind kind, int stages, int microbatches, int virtual_stages,
                                int stage) {
    int P = stages, M = microbatches, V = virtual_stages == 0 ? 1 : virtual_stages;
    if (P < 1 || M < 1 || V < 1 || stage < 0 || stage >= P) return 0;
    switch (kind) {
    case MPAR_SCHEDULE_SEQUENTIAL:
    case MPAR_SCHEDULE_GPIPE: return M;
    case MPAR_SCHEDULE_1F1B: return M < P - stage ? M : P - stage;
    case MPAR_SCHEDULE_ZB_H1: return M < P ? M : P;
    case MPAR_SCHEDULE_INTERLEAVED_1F1B:
        if (V == 1) return M < P - stage ? M : P - stage;
        if ((long long)M * V > 100000000LL) return 0; /* the walk below is O(MV) */
        return mpar__planner_interleaved_peak(P, M, V, stage);
    }
    return 0;
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
    double* val[2];   /* DP rows */
    double* key;      /* window keys */
    double scale;     /* size of the largest stage time: slack for rounding */
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
    if (d->schedule != MPAR_SCHEDULE_INTERLEAVED_1F1B) d->virtual_stages = 1;
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
    if ((int)d->schedule < (int)MPAR_SCHEDULE_SEQUENTIAL || (int)d->schedule > (int)MPAR_SCHEDULE_ZB_H1)
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
    size_t nd = P * L1 + 4 * L1 + 3 * P * P + P + 2 * L1 + 2 * nm;
    size_t ni = L1 + nm * L1 + nm + P + 5 * P + nm;
    double* dp = (double*)MPAR_MALLOC(nd * sizeof(double));
    int* ip = (int*)MPAR_MALLOC(ni * sizeof(int));
    if (!dp || !ip) {
        MPAR_FREE(dp);
        MPAR_FREE(ip);
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
    c->scap = dp;
    c->deque = ip;      ip += L1;
    c->parent = ip;     ip += nm * L1;
    c->ends = ip;       ip += nm;
    c->cls = ip;        ip += P;
    c->orders = ip;     ip += 5 * P;
    c->dev = ip;
    return 1;
}

static void mpar__planner_ctx_free(mpar__planner_ctx* c) {
    MPAR_FREE(c->cost);
    MPAR_FREE(c->deque);
    c->cost = NULL;
    c->deque = NULL;
}

static void mpar__planner_fill_memory(mpar__planner_ctx* c) {
    int l, i;
    c->fixed[0] = c->stash[0] = 0.0;
    for (l = 0; l < c->L; ++l) {
        const mpar_plan_layer* y = &c->d.layers[l];
        c->fixed[l + 1] = c->fixed[l] + 2.0 * (double)y->param_bytes + (double)y->optimizer_bytes;
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
        }
}

/* Stash multipliers by (devices used, position): the interleaved walk is
   O(MV), too slow to repeat for every device sequence the search tries. */
static void mpar__planner_fill_mult(mpar__planner_ctx* c) {
    int k, r;
    for (k = 1; k <= c->P; ++k)
        for (r = 0; r < k; ++r) {
            double m;
            if (c->V > 1 && k > 1) {
                int chunk_units = mpar_plan_in_flight(c->d.schedule, k, c->M, c->V, r);
                m = (double)((chunk_units + c->V - 1) / c->V);
            } else {
                m = (double)mpar_plan_in_flight(c->d.schedule == MPAR_SCHEDULE_INTERLEAVED_1F1B ? MPAR_SCHEDULE_1F1B
                                                                                                : c->d.schedule,
                                                k, c->M, 1, r);
            }
            c->mult_tab[(k - 1) * c->P + r] = m;
        }
}

/* Fills prefix sums and link tables; rejects costs that overflow. */
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
    mpar__planner_fill_mult(c);
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
    c->pipelined = c->d.schedule != MPAR_SCHEDULE_SEQUENTIAL;
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
   order[c % k]. */
static void mpar__planner_seq(mpar__planner_ctx* c, const int* order, int k) {
    int s;
    c->k = k;
    c->veff = k > 1 ? c->V : 1;
    c->n = k * c->veff;
    for (s = 0; s < c->n; ++s) {
        c->dev[s] = order[s % k];
        c->scap[s] = c->cap[c->dev[s]] / c->veff;
        c->mult[s] = c->mult_tab[(k - 1) * c->P + (c->veff > 1 ? s % k : s)];
    }
}

/* Forward + backward transfer over the cut between stage s and s + 1 that
   falls before layer j. */
static double mpar__planner_xfer(const mpar__planner_ctx* c, int s, int j) {
    size_t ab = (size_t)c->dev[s] * (size_t)c->P + (size_t)c->dev[s + 1];
    return c->lat2[ab] + c->out[j - 1] * c->inv2[ab];
}

static double mpar__planner_xin(const mpar__planner_ctx* c, int s, int i) {
    return s > 0 && i > 0 ? mpar__planner_xfer(c, s - 1, i) : 0.0;
}

static double mpar__planner_xout(const mpar__planner_ctx* c, int s, int j) {
    return s + 1 < c->n && j < c->L ? mpar__planner_xfer(c, s, j) : 0.0;
}

static double mpar__planner_mem(const mpar__planner_ctx* c, int s, int i, int j) {
    return (c->fixed[j] - c->fixed[i]) + c->mult[s] * (c->stash[j] - c->stash[i]);
}

static int mpar__planner_fits(const mpar__planner_ctx* c, int s, int i, int j) {
    return c->ignore_memory || mpar__planner_mem(c, s, i, j) <= c->scap[s] + c->extra_cap;
}

/* One stage of the chain DP. Start points i whose range [i, j) fits in
   memory form a window [lo(j), j-1] whose left end only moves right, so a
   monotone deque gives the minimum key in O(1) amortised. With `par`:
   out[j] = least path to end stage s at j. Without: out[j] = 0 when some
   start gives a stage time <= limit (feasibility), else INF. */
static int mpar__planner_pass(mpar__planner_ctx* c, int s, const double* in, double* outv, int* par, double limit) {
    const double* C = c->cost + (size_t)c->dev[s] * ((size_t)c->L + 1);
    int head = 0, tail = 0, lo = 0, j, any = 0;
    outv[0] = MPAR__PLANNER_INF;
    for (j = 1; j <= c->L; ++j) {
        int i = j - 1;
        outv[j] = MPAR__PLANNER_INF;
        if (in[i] < MPAR__PLANNER_INF) {
            double key = in[i] + mpar__planner_xin(c, s, i) - C[i];
            while (tail > head && c->key[tail - 1] >= key) --tail;
            c->deque[tail] = i;
            c->key[tail++] = key;
        }
        while (!mpar__planner_fits(c, s, lo, j)) ++lo;
        while (head < tail && c->deque[head] < lo) ++head;
        if (head == tail) continue;
        if (par) {
            outv[j] = C[j] + c->key[head];
            par[j] = c->deque[head];
            any = 1;
        } else if (c->key[head] <= limit - C[j] - mpar__planner_xout(c, s, j)) {
            outv[j] = 0.0;
            any = 1;
        }
    }
    return any;
}

/* Least path with every stage time <= limit: the constraint couples both
   ends of a stage, so this one is the plain O(L^2) DP. */
static int mpar__planner_pass_capped(mpar__planner_ctx* c, int s, const double* in, double* outv, int* par,
                                     double limit) {
    const double* C = c->cost + (size_t)c->dev[s] * ((size_t)c->L + 1);
    int lo = 0, i, j, any = 0;
    outv[0] = MPAR__PLANNER_INF;
    for (j = 1; j <= c->L; ++j) {
        double best = MPAR__PLANNER_INF, xout = mpar__planner_xout(c, s, j);
        while (!mpar__planner_fits(c, s, lo, j)) ++lo;
        for (i = lo; i < j; ++i) {
            double comp, xin, v;
            if (!(in[i] < MPAR__PLANNER_INF)) continue;
            comp = C[j] - C[i];
            xin = mpar__planner_xin(c, s, i);
            if (comp + xin + xout > limit) continue;
            v = in[i] + comp + xin;
            if (v < best) {
                best = v;
                par[j] = i;
            }
        }
        outv[j] = best;
        any |= best < MPAR__PLANNER_INF;
    }
    return any;
}

enum { MPAR__PLANNER_FEASIBLE = 0, MPAR__PLANNER_SUM = 1, MPAR__PLANNER_CAPPED = 2 };

/* Runs the DP over all stages of the current sequence; returns the value at
   the last layer (INF when no plan). Parents are left in c->parent. */
static double mpar__planner_chain(mpar__planner_ctx* c, int mode, double limit) {
    double* in = c->val[0];
    double* outv = c->val[1];
    int s, j;
    for (j = 0; j <= c->L; ++j) in[j] = MPAR__PLANNER_INF;
    in[0] = 0.0;
    for (s = 0; s < c->n; ++s) {
        int* par = c->parent + (size_t)s * ((size_t)c->L + 1);
        double* t;
        int any = mode == MPAR__PLANNER_CAPPED ? mpar__planner_pass_capped(c, s, in, outv, par, limit)
                                               : mpar__planner_pass(c, s, in, outv, mode ? par : NULL, limit);
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

/* Smallest double bottleneck that is feasible, given a feasible `hi`:
   bisection over the bit patterns, which order like the non-negative
   doubles, so it ends on the exact threshold in at most 64 steps. */
static double mpar__planner_min_bottleneck(mpar__planner_ctx* c, double hi) {
    uint64_t lo_b = 0, hi_b = mpar__planner_bits(hi);
    if (mpar__planner_feasible(c, 0.0)) return 0.0;
    while (hi_b - lo_b > 1) {
        uint64_t mid = lo_b + (hi_b - lo_b) / 2;
        if (mpar__planner_feasible(c, mpar__planner_from_bits(mid))) hi_b = mid;
        else lo_b = mid;
    }
    return mpar__planner_from_bits(hi_b);
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

typedef struct mpar__planner_best {
    int valid, k;
    int* order;
    double primary;   /* bottleneck (pipelined) or path (SEQUENTIAL) */
    double secondary; /* path under the bottleneck; < 0 until needed */
} mpar__planner_best;

static void mpar__planner_adopt(mpar__planner_ctx* c, mpar__planner_best* b, const int* order, int k, double primary,
                                double secondary) {
    if (b->order != order) memcpy(b->order, order, (size_t)k * sizeof(int));
    (void)c;
    b->valid = 1;
    b->k = k;
    b->primary = primary;
    b->secondary = secondary;
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

static int mpar__planner_consider_pipelined(mpar__planner_ctx* c, mpar__planner_best* b, const int* order, int k) {
    double hi = b->valid ? b->primary * (1.0 + MPAR__PLANNER_TOL) : MPAR__PLANNER_INF, t;
    /* One O(stages * layers) test rejects most sequences. */
    if (!mpar__planner_feasible(c, hi)) return 0;
    t = mpar__planner_min_bottleneck(c, hi);
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
            if (c->lat2[px * P + py] != c->lat2[x * P + y] || c->inv2[px * P + py] != c->inv2[x * P + y]) return 0;
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

/* One round of hill-climbing moves from b's sequence (swap two positions,
   or put an unused device in one); first improvement wins. */
static int mpar__planner_moves(mpar__planner_ctx* c, mpar__planner_best* b, int* cand, long limit) {
    int a, e, k = b->k, fixed = c->d.order == MPAR_PLAN_ORDER_FIXED;
    int* cur = c->orders + 4 * c->P; /* b->order changes when a move wins */
    memcpy(cur, b->order, (size_t)k * sizeof(int));
    for (a = 0; a < k && !fixed; ++a)
        for (e = a + 1; e < k; ++e) {
            if (c->evaluations >= limit) return 0;
            memcpy(cand, cur, (size_t)k * sizeof(int));
            cand[a] = cur[e];
            cand[e] = cur[a];
            if (mpar__planner_consider(c, b, cand, k)) return 1;
        }
    for (a = 0; a < k; ++a)
        for (e = 0; e < c->P; ++e) {
            if (mpar__planner_in(cur, k, e)) continue;
            if (c->evaluations >= limit) return 0;
            memcpy(cand, cur, (size_t)k * sizeof(int));
            cand[a] = e;
            if (fixed) mpar__planner_sort_ints(cand, k);
            if (mpar__planner_consider(c, b, cand, k)) return 1;
        }
    return 0;
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
    while (c->evaluations < limit && mpar__planner_moves(c, &local, cand, limit)) {
    }
    if (local.valid) mpar__planner_consider(c, global, local.order, k);
}

/* More sequences than the budget: hill climbs for every device count from
   the index order and from the fastest-first order. */
static void mpar__planner_heuristic(mpar__planner_ctx* c, mpar__planner_best* b, int kmin, int kmax) {
    int* fast = c->orders + 3 * c->P;
    int i, j, k;
    long per = c->d.order_budget / (2L * (kmax - kmin + 1));
    size_t L = (size_t)c->L;
    if (per < 16) per = 16;
    for (i = 0; i < c->P; ++i) fast[i] = i;
    for (i = 1; i < c->P; ++i) /* by total compute, fastest first */
        for (j = i; j > 0 && c->cost[(size_t)fast[j] * (L + 1) + L] < c->cost[(size_t)fast[j - 1] * (L + 1) + L]; --j) {
            int t = fast[j];
            fast[j] = fast[j - 1];
            fast[j - 1] = t;
        }
    for (k = kmax; k >= kmin; --k) {
        int* ident = c->orders + 4 * c->P; /* free while no climb runs */
        for (i = 0; i < k; ++i) ident[i] = i;
        mpar__planner_climb(c, b, ident, k, per);
        mpar__planner_climb(c, b, fast, k, per);
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

static int mpar__planner_plan_alloc(mpar_plan* p, int n, int P) {
    p->stages = (mpar_plan_stage*)MPAR_MALLOC((size_t)n * sizeof(mpar_plan_stage));
    p->device_memory_bytes = (uint64_t*)MPAR_MALLOC((size_t)P * sizeof(uint64_t));
    p->device_capacity_bytes = (uint64_t*)MPAR_MALLOC((size_t)P * sizeof(uint64_t));
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
    st->memory_bytes = (uint64_t)mpar__planner_mem(c, s, i, j);
}

/* Memory overflow of a stage: DOES_NOT_FIT naming device and shortfall. */
static mpar_result mpar__planner_overflow(const mpar__planner_ctx* c, const mpar_plan_stage* st, int s,
                                          mpar_error* err) {
    char who[96];
    double need = (double)st->memory_bytes, have = c->scap[s];
    mpar__planner_label(c, st->device, who, sizeof who);
    return mpar_error_set(err, MPAR_ERROR_DOES_NOT_FIT, "planner: stage %d (layers %d-%d) needs %llu bytes on %s "
                          "but %llu are usable%s: %llu bytes missing", s, st->first_layer, st->last_layer,
                          (unsigned long long)need, who, (unsigned long long)have,
                          c->veff > 1 ? " (1/V of the device)" : "", (unsigned long long)(need - have));
}

/* Costs the current sequence cut at c->ends into *p. */
static mpar_result mpar__planner_build(mpar__planner_ctx* c, mpar_plan* p, mpar_error* err) {
    int s, d;
    if (!mpar__planner_plan_alloc(p, c->n, c->P))
        return mpar_error_set(err, MPAR_ERROR_OUT_OF_HOST_MEMORY, "planner: out of memory for the plan");
    for (d = 0; d < c->P; ++d)
        p->device_capacity_bytes[d] = c->cap[d] < MPAR__PLANNER_INF ? (uint64_t)c->cap[d] : 0;
    for (s = 0; s < c->n; ++s) {
        mpar_plan_stage* st = &p->stages[s];
        mpar__planner_cost_stage(c, s, s ? c->ends[s - 1] : 0, c->ends[s], st);
        if (!mpar__planner_fits(c, s, st->first_layer, st->last_layer + 1)) {
            mpar_result r = mpar__planner_overflow(c, st, s, err);
            mpar_plan_free(p);
            return r;
        }
        p->device_memory_bytes[st->device] += st->memory_bytes;
        p->path_seconds += st->compute_seconds + mpar__planner_xin(c, s, st->first_layer);
        if (st->time_seconds > p->bottleneck_seconds) p->bottleneck_seconds = st->time_seconds;
    }
    p->schedule = c->d.schedule;
    p->microbatches = c->M;
    p->virtual_stages = c->veff;
    p->step_seconds = mpar__planner_step(c, p);
    mpar__planner_bind_stage(c, p);
    return MPAR_SUCCESS;
}

/* Stage ends from the parents the last chain run left. */
static void mpar__planner_ends(mpar__planner_ctx* c) {
    int s;
    c->ends[c->n - 1] = c->L;
    for (s = c->n - 1; s > 0; --s) c->ends[s - 1] = c->parent[(size_t)s * ((size_t)c->L + 1) + (size_t)c->ends[s]];
}

/* ---- OPTIMAL ---- */

static int mpar__planner_veff(const mpar__planner_ctx* c, int k) { return k > 1 ? c->V : 1; }

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
                                  (unsigned long long)need_min, (unsigned long long)fixed,
                                  (unsigned long long)stash, m_min, (unsigned long long)c->cap[best_dev], who);
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
                          mpar__planner_kind_name(c->d.schedule), c->M, kmax, (unsigned long long)over, who, worst,
                          worst ? c->ends[worst - 1] : 0, c->ends[worst] - 1,
                          (unsigned long long)mpar__planner_mem(c, worst, worst ? c->ends[worst - 1] : 0,
                                                                c->ends[worst]),
                          (unsigned long long)c->scap[worst], (unsigned long long)over);
}

/* OPTIMAL's memory binding: would the same devices do better unlimited? */
static void mpar__planner_bind_memory(mpar__planner_ctx* c, mpar_plan* p, double primary) {
    double relaxed, worst = -1.0;
    int d, s;
    char who[96];
    c->ignore_memory = 1;
    relaxed = c->pipelined ? mpar__planner_min_bottleneck(c, MPAR__PLANNER_INF)
                           : mpar__planner_chain(c, MPAR__PLANNER_SUM, MPAR__PLANNER_INF);
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
             (unsigned long long)c->cap[p->binding.device], 100.0 * worst, relaxed, primary,
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
    mpar__planner_seq(c, b->order, b->k);
    if (c->pipelined) mpar__planner_capped_path(c, b->primary);
    else mpar__planner_chain(c, MPAR__PLANNER_SUM, MPAR__PLANNER_INF);
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
        for (k = kmin; k <= kmax; ++k) mpar__planner_enum(c, &b, order, used, 0, k);
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
        for (s = k; s < n; ++s)
            if (st[s].device != st[s % k].device)
                return mpar_error_set(err, MPAR_ERROR_INVALID_PLAN, "planner: stage %d is on device %d but the "
                                      "interleaved order puts device %d there (stage s on the device of stage s mod "
                                      "%d)", s, st[s].device, st[s % k].device, k);
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
    return mpar__planner_build(c, p, err);
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
    st = (mpar_plan_stage*)MPAR_MALLOC((size_t)c->L * sizeof(mpar_plan_stage));
    if (!st) return mpar_error_set(err, MPAR_ERROR_OUT_OF_HOST_MEMORY, "planner: out of memory");
    memset(st, 0, (size_t)c->L * sizeof(mpar_plan_stage));
    r = mpar__planner_runs(c, st, &n, err);
    if (r == MPAR_SUCCESS && n > c->nmax)
        r = mpar_error_set(err, MPAR_ERROR_INVALID_PLAN, "planner: %d runs of layers, more than %d devices x %d "
                           "virtual stages", n, c->P, c->V);
    if (r == MPAR_SUCCESS) r = mpar__planner_manual_cost(c, st, n, p, err);
    MPAR_FREE(st);
    return r;
}

/* ---- entry points ---- */

MPARDEF mpar_result mpar_plan_create(const mpar_plan_desc* desc, mpar_plan* out, mpar_error* err) {
    mpar__planner_ctx c;
    mpar_result r;
    if (!out) return mpar_error_set(err, MPAR_ERROR_INVALID_ARGUMENT, "mpar_plan_create: out is NULL");
    memset(out, 0, sizeof *out);
    if (!desc) return mpar_error_set(err, MPAR_ERROR_INVALID_ARGUMENT, "mpar_plan_create: desc is NULL");
    r = mpar__planner_validate(desc, err);
    if (r != MPAR_SUCCESS) return r;
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
    MPAR_FREE(plan->stages);
    MPAR_FREE(plan->device_memory_bytes);
    MPAR_FREE(plan->device_capacity_bytes);
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
        int len = snprintf(item, sizeof item, "%s%d:%d-%d", s ? "," : "", st->device, st->first_layer, st->last_layer);
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
    mpar__planner_cursor cur;
    size_t i, commas = 0;
    mpar_result r;
    if (!out) return mpar_error_set(err, MPAR_ERROR_INVALID_ARGUMENT, "mpar_plan_parse: out is NULL");
    memset(out, 0, sizeof *out);
    if (!text) return mpar_error_set(err, MPAR_ERROR_INVALID_ARGUMENT, "mpar_plan_parse: text is NULL");
    for (i = 0; i < length && text[i]; ++i) commas += text[i] == ',';
    cur.text = text;
    cur.len = i;
    cur.at = 0;
    out->stages = (mpar_plan_stage*)MPAR_MALLOC((commas + 1) * sizeof(mpar_plan_stage));
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
    fprintf(f, "plan: %d stages, %s, %d micro-batches, %d virtual stages%s\n", plan->num_stages,
            mpar__planner_kind_name(plan->schedule), plan->microbatches, plan->virtual_stages,
            plan->exact ? ", optimal (exact)" : "");
    fprintf(f, "%5s %6s %13s %12s %12s %12s %9s %14s\n", "stage", "device", "layers", "compute_ms", "transfer_ms",
            "time_ms", "in_flight", "memory_MiB");
    for (s = 0; s < plan->num_stages; ++s) {
        const mpar_plan_stage* st = &plan->stages[s];
        char range[32];
        snprintf(range, sizeof range, "%d-%d", st->first_layer, st->last_layer);
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
    fprintf(f, "{\"device\":%d,\"first_layer\":%d,\"last_layer\":%d,\"in_flight\":%d,", st->device, st->first_layer,
            st->last_layer, st->in_flight);
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
#endif /* MPAR_IMPLEMENTATION */
