/* The kill test's model (tests/ckpt_tool.c, tests/mpi/kill_mpi.c): one
   model, so that ckpt_tool verify checks the files of both. Include
   mpar.h first. */
enum { VOCAB = 20000, BATCH = 32 };

/* A token model whose state is mostly a large embedding table: a cheap
   step and a large (~16 MB) checkpoint, so that many kills land in a save. */
static mpar_model* big_model(void) {
    mpar_model* m = NULL;
    mpar_model_desc md;
    mpar_layer_desc drop, emb;
    memset(&md, 0, sizeof md);
    md.input_features = 1;
    md.seed = 2024;
    memset(&drop, 0, sizeof drop);
    drop.type = mpar_layer_dropout();
    drop.rate = 0.1f;
    memset(&emb, 0, sizeof emb);
    emb.type = mpar_layer_embedding();
    emb.vocab = VOCAB;
    emb.units = 64;
    if (mpar_model_create(&md, &m, NULL) != MPAR_SUCCESS) return NULL;
    mpar_model_add(m, &emb, NULL);
    mpar_model_add_linear(m, 64, NULL);
    mpar_model_add(m, &drop, NULL);
    mpar_model_add_simple(m, mpar_layer_relu(), NULL);
    mpar_model_add_linear(m, 10, NULL);
    if (mpar_model_add_simple(m, mpar_layer_cross_entropy(), NULL) != MPAR_SUCCESS) return NULL;
    return m;
}
