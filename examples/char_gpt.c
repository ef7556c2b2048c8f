/* A character-level GPT (token + position embedding, decoder blocks, final
   layer norm, linear head) trained on the King James Bible from Debian's
   bible-kjv-text, split across the OpenCL devices; reports training and
   validation loss against the text's unigram entropy, then writes a sample
   (mpar_pipeline_generate, with a key/value cache).

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

static void put_char(void* user, int sequence, int token) {
    const data_charset* cs = (const data_charset*)user;
    (void)sequence;
    putchar(cs->symbols[token]);
}

/* Writes `count` characters after `prompt` (temperature 0.8), streamed
   as mpar_pipeline_generate makes them with the pipeline's key/value
   cache. A sequence holds at most the context (T), so a longer sample is
   made in rounds, each prefilled with the last T/2 characters so far. */
static int generate(mpar_pipeline* p, const data_charset* cs, const char* prompt, int count, int T, uint64_t seed) {
    int32_t* ids = (int32_t*)malloc(sizeof(int32_t) * (strlen(prompt) + (size_t)count + 1));
    int len = 0, made = 0, round = 0, i;
    if (!ids) return -1;
    for (i = 0; prompt[i]; i++)
        if (cs->index[(unsigned char)prompt[i]] >= 0) ids[len++] = cs->index[(unsigned char)prompt[i]];
    if (len == 0) ids[len++] = cs->index[(unsigned char)' '] >= 0 ? cs->index[(unsigned char)' '] : 0;
    printf("sample: %s", prompt);
    while (made < count) {
        mpar_generate_desc g;
        int keep = len < (round == 0 ? T - 1 : T / 2) ? len : (round == 0 ? T - 1 : T / 2), want = count - made, got = 0;
        const int32_t* pr = ids + len - keep;
        int32_t* out = ids + len;
        memset(&g, 0, sizeof g);
        g.sequences = 1, g.prompts = &pr, g.prompt_lengths = &keep, g.max_new_tokens = &want;
        g.temperature = 0.8f, g.seed = seed + (uint64_t)round++;
        g.outputs = &out, g.output_lengths = &got;
        g.on_token = put_char, g.user = (void*)cs;
        if (mpar_pipeline_generate(p, &g, NULL) != MPAR_SUCCESS) {
            free(ids);
            return -1;
        }
        len += got, made += got;
    }
    printf("\n");
    free(ids);
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
    /* the sample at the end: a key/value cache for one sequence (generation
       needs one chunk per device; interleaved schedules sample from a
       pipeline of their own) */
    if (pd.virtual_stages <= 1 && pd.schedule != MPAR_SCHEDULE_ZB_V) pd.generate_sequences = 1;
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
    {
        mpar_pipeline* sampler = pipe;
        int l, ok = 1;
        if (!pd.generate_sequences) { /* one device, the trained parameters */
            mpar_pipeline_desc sd;
            mpar_stage_desc one;
            memset(&sd, 0, sizeof sd);
            one.device = 0, one.first_layer = 0, one.last_layer = mpar_model_layer_count(model) - 1;
            sd.stages = &one, sd.stage_count = 1, sd.max_batch = 1, sd.inference_only = 1, sd.generate_sequences = 1;
            if (mpar_pipeline_create(ctx, model, &sd, &sampler) != MPAR_SUCCESS) return die("sampler", ctx, NULL);
            for (l = 0; ok && l < mpar_model_layer_count(model); l++) {
                size_t n = mpar_model_layer(model, l)->param_count;
                float* w = (float*)malloc(sizeof(float) * (n ? n : 1));
                ok = w && mpar_pipeline_get_params(pipe, l, w) == MPAR_SUCCESS &&
                     mpar_pipeline_set_params(sampler, l, w) == MPAR_SUCCESS;
                free(w);
            }
        }
        if (!ok || generate(sampler, &cs, prompt ? prompt : "And God said", ex_int(argc, argv, "--sample", 200), T,
                            md.seed + 7) != 0)
            return die("sample", ctx, NULL);
        if (sampler != pipe) mpar_pipeline_destroy(sampler);
    }
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
