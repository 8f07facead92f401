/* llama.cpp's logits along its own greedy continuation, for comparing
 * engines on one model file.
 *
 *   llama_logits MODEL N_GEN IDS OUT
 *
 * Feeds the comma-separated prompt IDS one token per llama_decode call (no
 * batched prefill: some builds fail on it under hypervisors that refuse
 * AMX state), then takes N_GEN greedy tokens. OUT receives N_GEN rows of
 * the vocabulary's logits as little-endian f32, row k being the logits
 * that chose generated token k; stdout prints the generated ids,
 * comma-separated. Built by the tests against the llama.cpp tree the
 * tools come from (scripts/llama_cpp_tools.sh). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "llama.h"

static void quiet(enum ggml_log_level level, const char *text, void *data) {
    (void)data;
    if (level == GGML_LOG_LEVEL_ERROR) fputs(text, stderr);
}

static int step(struct llama_context *ctx, llama_token tok) {
    struct llama_batch b = llama_batch_get_one(&tok, 1);
    return llama_decode(ctx, b);
}

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: %s MODEL N_GEN IDS OUT\n", argv[0]);
        return 2;
    }
    int n_gen = atoi(argv[2]);
    int cap = 1, n = 0;
    for (const char *c = argv[3]; *c; c++) cap += *c == ',';
    llama_token *ids = malloc(sizeof(llama_token) * cap);
    for (char *tok = strtok(argv[3], ","); tok; tok = strtok(NULL, ",")) ids[n++] = atoi(tok);
    if (n == 0 || n_gen <= 0) {
        fprintf(stderr, "no prompt ids or nothing to generate\n");
        return 2;
    }
    llama_log_set(quiet, NULL);
    llama_backend_init();
    struct llama_model *model = llama_model_load_from_file(argv[1], llama_model_default_params());
    if (!model) {
        fprintf(stderr, "%s: llama.cpp could not load it\n", argv[1]);
        return 1;
    }
    struct llama_context_params cp = llama_context_default_params();
    cp.n_ctx = n + n_gen;
    cp.n_threads = 2;
    cp.n_threads_batch = 2;
    struct llama_context *ctx = llama_init_from_model(model, cp);
    if (!ctx) {
        fprintf(stderr, "%s: no context of %d positions\n", argv[1], n + n_gen);
        return 1;
    }
    int vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
    FILE *out = fopen(argv[4], "wb");
    if (!out) {
        perror(argv[4]);
        return 1;
    }
    for (int i = 0; i < n; i++) {
        if (step(ctx, ids[i])) {
            fprintf(stderr, "decode failed at prompt position %d\n", i);
            return 1;
        }
    }
    for (int k = 0; k < n_gen; k++) {
        const float *row = llama_get_logits_ith(ctx, -1);
        fwrite(row, sizeof(float), vocab, out);
        int best = 0;
        for (int v = 1; v < vocab; v++)
            if (row[v] > row[best]) best = v;
        printf(k ? ",%d" : "%d", best);
        if (k + 1 < n_gen && step(ctx, best)) {
            fprintf(stderr, "decode failed at generated token %d\n", k);
            return 1;
        }
    }
    printf("\n");
    fclose(out);
    llama_free(ctx);
    llama_model_free(model);
    return 0;
}
