/* A character-level GPT (token + position embedding, decoder blocks, final
   layer norm, linear head) trained on the King James Bible from Debian's
   bible-kjv-text, split across the OpenCL devices; reports training and
   validation loss against the text's unigram entropy, then writes a sample.

     examples/char_gpt [--devices SEL] [--schedule 1f1b|gpipe|zbh1|zbh2|zbv|interleaved|auto|sequential]
                       [--microbatches M] [--stages D:A-B,...] [--activations fp32|bf16] [--steps N] [--batch B]
                       [--seq T] [--width C] [--layers L] [--heads H] [--lr X]
                       [--prompt TEXT] [--sample N] [--seed S] [--plan optimal|proportional --weights W,W]
                       [--checkpoint PATH [--resume]] [--trace PATH]

   --checkpoint saves the training state every 100 steps and at the end;
   --resume continues from it. --trace writes the last step's timeline.

   Ends with `val_loss: <nats/char>` and `unigram_entropy: <nats/char>`. */
#define MPAR_IMPLEMENTATION
#include "mpar.h"
#include "data.h"
#include "common.h"

#include <math.h>

static int die(const char* what, mpar_context* ctx, const char* msg) {
    fprintf(stderr, "char_gpt: %s: %s\n", what, ctx ? mpar_last_error(ctx) : msg);
    return 1;
}

/* Random windows of T+1 characters: inputs are the first T, targets the
   next T. */
static void fill_batch(const int32_t* ids, size_t n, int batch, int T, data_rng* rng, int32_t* x, int32_t* y) {
    int b, t;
    for (b = 0; b < batch; b++) {
        size_t at = (size_t)data_rng_below(rng, (uint32_t)(n - (size_t)T - 1));
        for (t = 0; t < T; t++) {
            x[b * T + t] = ids[at + (size_t)t];
            y[b * T + t] = ids[at + (size_t)t + 1];
        }
    }
}

/* Mean loss over `windows` fixed windows of a split. */
static double evaluate(mpar_pipeline* p, const int32_t* ids, size_t n, int windows, int T, int32_t* x, int32_t* y) {
    data_rng rng;
    mpar_batch b;
    double loss = 0.0;
    data_rng_seed(&rng, 12345);
    fill_batch(ids, n, windows, T, &rng, x, y);
    b.inputs = x, b.targets = y, b.samples = windows;
    if (mpar_pipeline_infer(p, &b, NULL, &loss) != MPAR_SUCCESS) return -1.0;
    return loss;
}

/* Samples `count` characters after `prompt` (temperature 0.8). */
static int generate(mpar_pipeline* p, const data_charset* cs, const char* prompt, int count, int T, int vocab,
                    uint64_t seed) {
    int32_t* ctx_ids = (int32_t*)calloc((size_t)T, sizeof(int32_t));
    float* logits = (float*)malloc(sizeof(float) * (size_t)T * (size_t)vocab);
    int len = 0, i, k;
    data_rng rng;
    data_rng_seed(&rng, seed);
    for (i = 0; prompt[i] && len < T; i++)
        if (cs->index[(unsigned char)prompt[i]] >= 0) ctx_ids[len++] = cs->index[(unsigned char)prompt[i]];
    printf("sample: %s", prompt);
    for (i = 0; i < count && len > 0; i++) {
        mpar_batch b;
        double sum = 0.0, r, max = -1e30;
        float* row;
        b.inputs = ctx_ids, b.targets = NULL, b.samples = 1;
        if (mpar_pipeline_infer(p, &b, logits, NULL) != MPAR_SUCCESS) break;
        row = logits + (size_t)(len - 1) * (size_t)vocab; /* causal: later padding is not seen */
        for (k = 0; k < vocab; k++) max = row[k] > max ? row[k] : max;
        for (k = 0; k < vocab; k++) sum += exp((row[k] - max) / 0.8);
        r = data_rng_float(&rng) * sum;
        for (k = 0; k < vocab - 1; k++) {
            r -= exp((row[k] - max) / 0.8);
            if (r <= 0) break;
        }
        putchar(cs->symbols[k]);
        if (len == T) {
            memmove(ctx_ids, ctx_ids + 1, sizeof(int32_t) * (size_t)(T - 1));
            len--;
        }
        ctx_ids[len++] = k;
    }
    printf("\n");
    free(ctx_ids), free(logits);
    return 0;
}

static const char usage[] =
    "usage: examples/char_gpt [options]\n"
    "  trains a character-level GPT on the King James Bible across the devices\n"
    "  --devices SEL          which OpenCL devices (see README: Devices)\n"
    "  --schedule S           1f1b (default), gpipe, zbh1, zbh2, zbv, interleaved, auto or sequential\n"
    "  --microbatches M       micro-batches per step [4]\n"
    "  --stages D:A-B,...     explicit stages (device:first-last layer); default: planned\n"
    "  --plan optimal|proportional [--weights W,W]   how to plan without --stages\n"
    "  --activations fp32|bf16\n"
    "  --steps N [600]  --batch B [16]  --seq T [64]  --width C [96]  --layers L [3]  --heads H [4]\n"
    "  --lr X [3e-3]  --seed S\n"
    "  --prompt TEXT  --sample N      the sample written at the end\n"
    "  --checkpoint PATH [--resume]   save every 100 steps and at the end; continue from it\n"
    "  --trace PATH           write the last step's timeline (Chrome trace and SVG)\n"
    "  --help\n";

int main(int argc, char** argv) {
    ex_args(argc, argv, usage, "--devices= --schedule= --microbatches= --stages= --plan= --weights= --activations= --steps= --batch= --seq= --width= --layers= --heads= --lr= --seed= --prompt= --sample= --checkpoint= --resume --trace=");
    mpar_desc desc;
    mpar_error err;
    mpar_context* ctx = NULL;
    mpar_model* model = NULL;
    mpar_model_desc md;
    mpar_layer_desc ld;
    mpar_pipeline_desc pd;
    mpar_pipeline* pipe = NULL;
    mpar_stage_desc stages[64];
    data_text text;
    data_charset cs;
    data_rng rng;
    char msg[512];
    int32_t *ids, *x, *y;
    size_t n_train, n_val;
    int T = ex_int(argc, argv, "--seq", 64), C = ex_int(argc, argv, "--width", 96);
    int L = ex_int(argc, argv, "--layers", 3), H = ex_int(argc, argv, "--heads", 4);
    int batch = ex_int(argc, argv, "--batch", 16), steps = ex_int(argc, argv, "--steps", 600), i;
    int eval_windows = 64;
    double entropy = 0.0, t0, train_loss = 0.0, val_loss;
    const char* bad;
    const char* prompt = ex_option(argc, argv, "--prompt");
    const char* ckpt = ex_option(argc, argv, "--checkpoint");
    const char* trace = ex_option(argc, argv, "--trace");
    mpar_plan_options plan_options;
    double weights[64];
    int first = 0;

    if (data_text_load(NULL, &text, msg, sizeof msg) != DATA_OK) return die("text", NULL, msg);
    if (data_charset_build(text.bytes, text.size, &cs, msg, sizeof msg) != DATA_OK) return die("charset", NULL, msg);
    ids = (int32_t*)malloc(sizeof(int32_t) * text.size);
    data_charset_encode(&cs, text.bytes, text.size, ids, msg, sizeof msg);
    n_train = text.size * 9 / 10, n_val = text.size - n_train;
    data_unigram_entropy(text.bytes, n_train, &entropy, msg, sizeof msg);

    memset(&desc, 0, sizeof desc);
    desc.devices = ex_option(argc, argv, "--devices");
    desc.error = &err;
    ex_pocl_devices();
    if (mpar_create(&desc, &ctx) != MPAR_SUCCESS) return die("devices", NULL, err.message);
    memset(&md, 0, sizeof md);
    md.input_features = 1, md.seq_len = T, md.seed = (uint64_t)ex_int(argc, argv, "--seed", 1);
    if (mpar_model_create(&md, &model, &err) != MPAR_SUCCESS) return die("model", NULL, err.message);
    memset(&ld, 0, sizeof ld);
    ld.type = mpar_layer_embedding(), ld.units = C, ld.vocab = cs.size;
    if (mpar_model_add(model, &ld, &err) != MPAR_SUCCESS) return die("model", NULL, err.message);
    for (i = 0; i < L; i++) {
        memset(&ld, 0, sizeof ld);
        ld.type = mpar_layer_decoder_block(), ld.heads = H;
        if (mpar_model_add(model, &ld, &err) != MPAR_SUCCESS) return die("model", NULL, err.message);
    }
    if (mpar_model_add_simple(model, mpar_layer_layernorm(), &err) || mpar_model_add_linear(model, cs.size, &err) ||
        mpar_model_add_simple(model, mpar_layer_cross_entropy(), &err))
        return die("model", NULL, err.message);

    memset(&pd, 0, sizeof pd);
    if ((bad = ex_pipeline_options(argc, argv, 4, &pd, stages, &plan_options, weights)) != NULL)
        return die("options", NULL, bad);
    pd.max_batch = batch > eval_windows ? batch : eval_windows;
    pd.optimizer.kind = MPAR_OPTIMIZER_ADAMW;
    pd.optimizer.lr = (float)ex_double(argc, argv, "--lr", 3e-3);
    pd.optimizer.weight_decay = 0.01f;
    pd.optimizer.clip_norm = 1.0f;
    pd.optimizer.warmup_steps = steps / 20;
    pd.optimizer.decay_steps = steps - steps / 20;
    pd.optimizer.min_lr = pd.optimizer.lr * 0.1f;
    if (mpar_pipeline_create(ctx, model, &pd, &pipe) != MPAR_SUCCESS) return die("pipeline", ctx, NULL);
    if (ckpt && ex_flag(argc, argv, "--resume")) {
        if (mpar_pipeline_load_checkpoint(pipe, ckpt, NULL) != MPAR_SUCCESS) return die("--resume", ctx, NULL);
        first = mpar_pipeline_get_step(pipe);
        printf("resumed from %s at step %d\n", ckpt, first);
    }
    printf("char_gpt: %zu characters (%d distinct), %d layers (%d decoder blocks, width %d, %d heads, context %d), "
           "%zu parameters, %s, M=%d, %d device(s)\n",
           text.size, cs.size, mpar_model_layer_count(model), L, C, H, T, mpar_model_param_count(model),
           mpar_schedule_kind_name(pd.schedule), pd.microbatches, mpar_device_count(ctx));
    {
        mpar_plan plan;
        if (mpar_pipeline_get_plan(pipe, &plan) == MPAR_SUCCESS) { /* the plan in use, given or planned */
            mpar_plan_print(&plan, stdout);
            mpar_plan_free(&plan);
        }
    }

    x = (int32_t*)malloc(sizeof(int32_t) * (size_t)pd.max_batch * (size_t)T);
    y = (int32_t*)malloc(sizeof(int32_t) * (size_t)pd.max_batch * (size_t)T);
    data_rng_seed(&rng, md.seed + (uint64_t)first);
    t0 = ex_seconds();
    for (i = first; i < steps; i++) {
        mpar_batch b;
        mpar_step_info info;
        fill_batch(ids, n_train, batch, T, &rng, x, y);
        b.inputs = x, b.targets = y, b.samples = batch;
        if (mpar_pipeline_train_step(pipe, &b, &info) != MPAR_SUCCESS) return die("train", ctx, NULL);
        train_loss = i > first ? 0.95 * train_loss + 0.05 * info.loss : info.loss;
        if (i % 10 == 0 || i + 1 == steps)
            ex_progress(i + 1, steps, train_loss, (double)(i + 1 - first) * batch * T / (ex_seconds() - t0),
                        ex_seconds() - t0);
        if (ckpt && ((i + 1) % 100 == 0 || i + 1 == steps) &&
            mpar_pipeline_save_checkpoint(pipe, ckpt, NULL) != MPAR_SUCCESS)
            return die("checkpoint", ctx, NULL);
    }
    if (trace) ex_report_timeline(pipe, trace);
    val_loss = evaluate(pipe, ids + n_train, n_val, eval_windows, T, x, y);
    if (val_loss < 0) return die("evaluate", ctx, NULL);
    printf("trained %d steps in %.1f s (%.0f characters/s)\n", steps - first, ex_seconds() - t0,
           (double)(steps - first) * batch * T / (ex_seconds() - t0));
    generate(pipe, &cs, prompt ? prompt : "And God said", ex_int(argc, argv, "--sample", 200), T, cs.size,
             md.seed + 7);
    printf("train_loss: %.4f\n", evaluate(pipe, ids, n_train, eval_windows, T, x, y));
    printf("val_loss: %.4f\n", val_loss);
    printf("unigram_entropy: %.4f\n", entropy);
    free(ids), free(x), free(y);
    data_text_free(&text);
    mpar_pipeline_destroy(pipe);
    mpar_model_destroy(model);
    mpar_destroy(ctx);
    return 0;
}
