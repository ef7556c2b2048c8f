/* Text generation from a checkpoint: rebuilds the model the checkpoint
   describes (no model code of its own), loads it into a pipeline over the
   devices with a key/value cache, and generates from several prompts at
   once with mpar_pipeline_generate, streaming the first prompt's text as it
   comes; then prints every sequence and the speed.

     examples/generate --checkpoint PATH [--prompt TEXT]... [--stdin]
                       [--tokens N] [--temperature X] [--top-k K] [--seed S]
                       [--groups G] [--devices SEL] [--stages D:A-B,...]

   PATH is a file written by `examples/char_gpt --checkpoint PATH`: a model
   of characters of the King James Bible, whose character set is rebuilt
   from the same text (a checkpoint holds no tokenizer). Prompts come from
   each --prompt, else one per line of standard input (--stdin), else one
   default prompt. The model's context (its seq_len) bounds a sequence; a
   longer text is generated in rounds, each prefilled with the last half
   context of the text so far.

   Ends with `new_tokens_per_s: <x>`, `decode_tokens_per_s: <x>` and one
   `stage_busy_fraction_<s>: <x>` per stage. Exit code 1 on any error. */
#define MPAR_IMPLEMENTATION
#include "mpar.h"
#include "data.h"
#include "common.h"

static int fail(const char* what, const char* msg) {
    fprintf(stderr, "generate: %s: %s\n", what, msg);
    return 1;
}

/* Rebuilds the model a parsed checkpoint describes, layer by layer (as
   examples/infer.c does). */
static mpar_result model_from_checkpoint(const mpar_checkpoint_info* ci, mpar_model** out, mpar_error* err) {
    static const struct {
        const char* name;
        const mpar_layer_type* (*type)(void);
    } known[] = {{"linear", mpar_layer_linear},       {"relu", mpar_layer_relu},
                 {"gelu", mpar_layer_gelu},           {"tanh", mpar_layer_tanh},
                 {"dropout", mpar_layer_dropout},     {"layernorm", mpar_layer_layernorm},
                 {"embedding", mpar_layer_embedding}, {"decoder_block", mpar_layer_decoder_block},
                 {"cross_entropy", mpar_layer_cross_entropy}};
    mpar_model_desc md;
    mpar_model* model = NULL;
    mpar_result r;
    int i;
    size_t k;
    memset(&md, 0, sizeof md);
    md.input_features = ci->input_features, md.seq_len = ci->seq_len, md.seed = ci->seed;
    *out = NULL;
    if ((r = mpar_model_create(&md, &model, err)) != MPAR_SUCCESS) return r;
    for (i = 0; i < ci->layer_count; i++) {
        const mpar_checkpoint_layer* cl = &ci->layers[i];
        mpar_layer_desc ld;
        memset(&ld, 0, sizeof ld);
        for (k = 0; k < sizeof known / sizeof known[0]; k++)
            if (!strcmp(cl->type_name, known[k].name)) ld.type = known[k].type();
        if (!ld.type) {
            mpar_model_destroy(model);
            return mpar_error_set(err, MPAR_ERROR_UNSUPPORTED, "layer %d has type \"%s\", which this program does "
                                  "not know (built-in types only)", i, cl->type_name);
        }
        ld.units = cl->units, ld.vocab = cl->vocab, ld.heads = cl->heads, ld.hidden = cl->hidden;
        ld.rate = cl->rate, ld.eps = cl->eps;
        if ((r = mpar_model_add(model, &ld, err)) != MPAR_SUCCESS) {
            mpar_model_destroy(model);
            return r;
        }
    }
    *out = model;
    return mpar_model_validate(model, err);
}

static int read_file(const char* path, unsigned char** data, size_t* size, char* msg, size_t msg_size) {
    FILE* f = fopen(path, "rb");
    long n;
    *data = NULL, *size = 0;
    if (!f) return snprintf(msg, msg_size, "cannot open %s: %s", path, strerror(errno)), -1;
    if (fseek(f, 0, SEEK_END) != 0 || (n = ftell(f)) < 0 || fseek(f, 0, SEEK_SET) != 0) {
        fclose(f);
        return snprintf(msg, msg_size, "cannot read %s: not a regular file", path), -1;
    }
    *data = (unsigned char*)malloc(n > 0 ? (size_t)n : 1);
    if (!*data || fread(*data, 1, (size_t)n, f) != (size_t)n) {
        fclose(f);
        free(*data), *data = NULL;
        return snprintf(msg, msg_size, "cannot read %s", path), -1;
    }
    fclose(f);
    *size = (size_t)n;
    return 0;
}

/* One round's sequences: where each one's tokens go, and which one
   streams (-1: none). */
typedef struct round_state {
    int32_t** ids;
    int* len;
    const int* target;
    int stream;
    const data_charset* cs;
} round_state;

static void on_token(void* user, int sequence, int token) {
    round_state* r = (round_state*)user;
    if (r->len[sequence] < r->target[sequence]) r->ids[sequence][r->len[sequence]++] = token;
    if (sequence == r->stream) {
        putchar(r->cs->symbols[token]);
        fflush(stdout);
    }
}

static const char usage[] =
    "usage: examples/generate --checkpoint PATH [options]\n"
    "  generates text from a char_gpt checkpoint on the devices, with a key/value cache\n"
    "  --checkpoint PATH      written by examples/char_gpt --checkpoint PATH\n"
    "  --prompt TEXT          a prompt (repeat for several sequences in flight)\n"
    "  --stdin                one prompt per line of standard input\n"
    "  --tokens N [200]       new characters per prompt\n"
    "  --temperature X [0.8]  0: greedy   --top-k K [0: all]   --seed S [1]\n"
    "  --groups G             decode groups [one per stage]\n"
    "  --devices SEL  --stages D:A-B,...   devices, and explicit stages (default: planned)\n"
    "  --help\n";

#define MAX_PROMPTS 64

int main(int argc, char** argv) {
    ex_args(argc, argv, usage, "--checkpoint= --prompt= --stdin --tokens= --temperature= --top-k= --seed= --groups= "
                               "--devices= --stages=");
    const char* path = ex_option(argc, argv, "--checkpoint");
    int tokens = ex_int(argc, argv, "--tokens", 200), top_k = ex_int(argc, argv, "--top-k", 0);
    int groups = ex_int(argc, argv, "--groups", 0), seed = ex_int(argc, argv, "--seed", 1);
    double temperature = ex_double(argc, argv, "--temperature", 0.8);
    const char* stage_text = ex_option(argc, argv, "--stages");
    char* prompts[MAX_PROMPTS];
    int n_prompts = 0, i, s, L, T, vocab, status = 1, rounds = 0;
    mpar_desc desc;
    mpar_error err;
    mpar_context* ctx = NULL;
    mpar_model* model = NULL;
    mpar_pipeline* pipe = NULL;
    mpar_checkpoint_info ci;
    mpar_pipeline_desc pd;
    mpar_stage_desc stages[64];
    mpar_generate_stats total;
    data_text text;
    data_charset cs;
    unsigned char* file = NULL;
    size_t file_size = 0;
    char msg[1400];
    int32_t** ids = NULL;
    int *len = NULL, *target = NULL;
    int prompts_owned[MAX_PROMPTS];
    double busy[64];

    memset(&total, 0, sizeof total), memset(busy, 0, sizeof busy), memset(prompts_owned, 0, sizeof prompts_owned);
    if (!path) return fail("usage", "give --checkpoint PATH (written by examples/char_gpt --checkpoint PATH)");
    if (tokens < 1 || top_k < 0 || groups < 0 || !(temperature >= 0.0))
        return fail("options", "--tokens must be at least 1; --top-k, --groups and --temperature not negative");
    for (i = 1; i < argc && n_prompts < MAX_PROMPTS; i++) { /* every --prompt, in order */
        if (!strcmp(argv[i], "--prompt") && i + 1 < argc) prompts[n_prompts++] = argv[++i];
        else if (!strncmp(argv[i], "--prompt=", 9)) prompts[n_prompts++] = argv[i] + 9;
    }
    if (ex_flag(argc, argv, "--stdin")) {
        char line[4096];
        while (n_prompts < MAX_PROMPTS && fgets(line, sizeof line, stdin)) {
            line[strcspn(line, "\r\n")] = '\0';
            if (!line[0]) continue;
            prompts[n_prompts] = (char*)malloc(strlen(line) + 1);
            if (!prompts[n_prompts]) return fail("memory", "out of host memory");
            strcpy(prompts[n_prompts], line);
            prompts_owned[n_prompts++] = 1;
        }
    }
    if (n_prompts == 0) prompts[n_prompts++] = (char*)"And God said";

    /* The checkpoint alone says what the model is; the text, its characters. */
    if (read_file(path, &file, &file_size, msg, sizeof msg) != 0) return fail("checkpoint", msg);
    if (mpar_checkpoint_parse(file, file_size, &ci, &err) != MPAR_SUCCESS) return fail(path, err.message);
    free(file);
    if (model_from_checkpoint(&ci, &model, &err) != MPAR_SUCCESS) return fail(path, err.message);
    L = mpar_model_layer_count(model);
    T = mpar_model_get_desc(model)->seq_len;
    vocab = mpar_model_layer(model, 0)->desc.vocab;
    if (data_text_load(NULL, &text, msg, sizeof msg) != DATA_OK) return fail("text", msg);
    if (data_charset_build(text.bytes, text.size, &cs, msg, sizeof msg) != DATA_OK) return fail("charset", msg);
    data_text_free(&text);
    if (mpar_model_layer(model, 0)->type != mpar_layer_embedding() || cs.size != vocab || T < 4)
        return fail(path, "not a char_gpt model: it must start with an embedding of the text's characters and have "
                          "a context of at least 4");
    printf("checkpoint %s: step %d, %d layers, %zu parameters, context %d, %d characters\n", path, ci.step, L,
           mpar_model_param_count(model), T, vocab);

    memset(&desc, 0, sizeof desc);
    desc.devices = ex_option(argc, argv, "--devices");
    desc.error = &err;
    ex_pocl_devices();
    if (mpar_create(&desc, &ctx) != MPAR_SUCCESS) return fail("devices", err.message);
    memset(&pd, 0, sizeof pd);
    pd.max_batch = 1, pd.inference_only = 1, pd.optimizer.kind = ci.optimizer;
    pd.generate_sequences = n_prompts, pd.generate_context = T;
    if (stage_text) {
        pd.stage_count = ex_parse_stages(stage_text, stages, 64);
        if (pd.stage_count <= 0) return fail("--stages", "expected D:A-B,D:A-B,... (device:first-last layer)");
        pd.stages = stages;
    } else { /* contiguous layers, one range per device (the FLOP model: no measuring) */
        static mpar_plan_options po;
        po.costs = MPAR_COSTS_FLOPS;
        pd.plan_options = &po;
    }
    if (mpar_pipeline_create(ctx, model, &pd, &pipe) != MPAR_SUCCESS) goto done_ctx;
    if (mpar_pipeline_load_checkpoint(pipe, path, &err) != MPAR_SUCCESS) {
        snprintf(msg, sizeof msg, "%s", err.message);
        goto done_msg;
    }
    {
        mpar_plan plan;
        if (mpar_pipeline_get_plan(pipe, &plan) == MPAR_SUCCESS) {
            char line[256];
            mpar_plan_to_string(&plan, line, sizeof line);
            printf("stages: %s, %d prompt(s) in flight\n", line, n_prompts);
            mpar_plan_free(&plan);
        }
    }

    /* Each sequence: its prompt's characters the text knows, then room for
       what is asked. */
    ids = (int32_t**)calloc((size_t)n_prompts, sizeof(int32_t*));
    len = (int*)calloc((size_t)n_prompts, sizeof(int));
    target = (int*)calloc((size_t)n_prompts, sizeof(int));
    if (!ids || !len || !target) return fail("memory", "out of host memory");
    for (s = 0; s < n_prompts; s++) {
        const char* c;
        ids[s] = (int32_t*)malloc(sizeof(int32_t) * (strlen(prompts[s]) + (size_t)tokens + 1));
        if (!ids[s]) return fail("memory", "out of host memory");
        for (c = prompts[s]; *c; c++)
            if (cs.index[(unsigned char)*c] >= 0) ids[s][len[s]++] = cs.index[(unsigned char)*c];
        if (len[s] == 0) ids[s][len[s]++] = cs.index[(unsigned char)' '] >= 0 ? cs.index[(unsigned char)' '] : 0;
        target[s] = len[s] + tokens;
    }
    printf("%s", prompts[0]);
    fflush(stdout);

    /* Rounds: each prefills the last T-1 (later: T/2) tokens of every
       sequence still short of its target and runs until the context is
       full or the target reached. */
    for (;;) {
        const int32_t* pr[MAX_PROMPTS];
        int32_t* rids[MAX_PROMPTS];
        int lens[MAX_PROMPTS], want[MAX_PROMPTS], idx[MAX_PROMPTS], rlen[MAX_PROMPTS], rtarget[MAX_PROMPTS], n = 0;
        mpar_generate_desc g;
        mpar_generate_stats st;
        round_state rs;
        rs.stream = -1, rs.cs = &cs;
        for (s = 0; s < n_prompts; s++) {
            int keep = len[s] < (rounds == 0 ? T - 1 : T / 2) ? len[s] : (rounds == 0 ? T - 1 : T / 2);
            if (len[s] >= target[s]) continue;
            if (s == 0) rs.stream = n;
            pr[n] = ids[s] + len[s] - keep, lens[n] = keep, want[n] = target[s] - len[s];
            rids[n] = ids[s], rlen[n] = len[s], rtarget[n] = target[s];
            idx[n++] = s;
        }
        if (n == 0) break;
        rs.ids = rids, rs.len = rlen, rs.target = rtarget;
        memset(&g, 0, sizeof g);
        g.sequences = n, g.prompts = pr, g.prompt_lengths = lens, g.max_new_tokens = want;
        g.temperature = (float)temperature, g.top_k = top_k;
        g.seed = (uint64_t)seed + 1000003u * (uint64_t)rounds;
        g.groups = groups > n ? n : groups;
        g.on_token = on_token, g.user = &rs;
        if (mpar_pipeline_generate(pipe, &g, &st) != MPAR_SUCCESS) goto done_ctx;
        for (i = 0; i < n; i++) len[idx[i]] = rlen[i];
        total.prompt_tokens += st.prompt_tokens, total.new_tokens += st.new_tokens;
        total.decode_tokens += st.decode_tokens, total.seconds += st.seconds;
        total.prefill_seconds += st.prefill_seconds, total.decode_seconds += st.decode_seconds;
        total.stages = st.stages;
        for (i = 0; i < st.stages; i++) busy[i] += st.stage_busy_seconds[i];
        rounds++;
    }
    printf("\n\n");
    for (s = 0; s < n_prompts; s++) {
        printf("[%d] ", s);
        for (i = 0; i < len[s]; i++) putchar(cs.symbols[ids[s][i]]);
        printf("\n");
    }
    printf("\n%lld new tokens for %d sequence(s) in %.2f s over %d round(s): prefill %lld tokens in %.2f s, "
           "decode %lld tokens in %.2f s\n", (long long)total.new_tokens, n_prompts, total.seconds, rounds,
           (long long)total.prompt_tokens, total.prefill_seconds, (long long)total.decode_tokens,
           total.decode_seconds);
    printf("new_tokens_per_s: %.1f\n", total.seconds > 0 ? (double)total.new_tokens / total.seconds : 0.0);
    printf("decode_tokens_per_s: %.1f\n",
           total.decode_seconds > 0 ? (double)total.decode_tokens / total.decode_seconds : 0.0);
    for (i = 0; i < total.stages; i++)
        printf("stage_busy_fraction_%d: %.2f\n", i, total.seconds > 0 ? busy[i] / total.seconds : 0.0);
    status = 0;
    goto done;

done_ctx:
    snprintf(msg, sizeof msg, "%s", mpar_last_error(ctx));
done_msg:
    fprintf(stderr, "generate: %s\n", msg);
done:
    for (s = 0; ids && s < n_prompts; s++) free(ids[s]);
    free(ids), free(len), free(target);
    for (s = 0; s < n_prompts; s++)
        if (prompts_owned[s]) free(prompts[s]);
    if (pipe) mpar_pipeline_destroy(pipe);
    mpar_model_destroy(model);
    mpar_checkpoint_info_free(&ci);
    if (ctx) mpar_destroy(ctx);
    return status;
}
