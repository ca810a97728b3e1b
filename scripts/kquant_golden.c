/* Golden bytes for deltamerge's k-quant port: ggml's own row quantizers run on given rows.
 *
 * Built by scripts/kquant_golden.py together with ggml/src/ggml-quants.c of a llama.cpp source
 * tree. Usage: kquant_golden TYPE N_VALUES IN.f32 OUT.bin [REPEATS]
 * quantizes N_VALUES float32 values (whole rows, one after another) with quantize_row_TYPE_ref,
 * the functions llama-quantize uses without an importance matrix, and writes the blocks. With
 * REPEATS it quantizes that many times and prints the CPU seconds taken, for a throughput figure.
 */
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "ggml-quants.h"  /* and through it ggml-common.h: the block structs */

/* ggml-quants.c refers to these only on paths not taken here (row validation, errors). */
void ggml_abort(const char * file, int line, const char * fmt, ...) {
    va_list args;
    va_start(args, fmt);
    fprintf(stderr, "%s:%d: ", file, line);
    vfprintf(stderr, fmt, args);
    va_end(args);
    abort();
}
size_t ggml_row_size(enum ggml_type type, int64_t ne) { (void) type; (void) ne; abort(); }
size_t ggml_type_size(enum ggml_type type) { (void) type; abort(); }
const char * ggml_type_name(enum ggml_type type) { (void) type; abort(); }

typedef void (*quantizer)(const float *, void *, int64_t);

static const struct { const char * name; quantizer fn; int block; size_t size; } TYPES[] = {
    {"Q4_0", (quantizer) quantize_row_q4_0_ref, QK4_0, sizeof(block_q4_0)},
    {"Q4_1", (quantizer) quantize_row_q4_1_ref, QK4_1, sizeof(block_q4_1)},
    {"Q5_0", (quantizer) quantize_row_q5_0_ref, QK5_0, sizeof(block_q5_0)},
    {"Q5_1", (quantizer) quantize_row_q5_1_ref, QK5_1, sizeof(block_q5_1)},
    {"Q8_0", (quantizer) quantize_row_q8_0_ref, QK8_0, sizeof(block_q8_0)},
    {"Q2_K", (quantizer) quantize_row_q2_K_ref, QK_K, sizeof(block_q2_K)},
    {"Q3_K", (quantizer) quantize_row_q3_K_ref, QK_K, sizeof(block_q3_K)},
    {"Q4_K", (quantizer) quantize_row_q4_K_ref, QK_K, sizeof(block_q4_K)},
    {"Q5_K", (quantizer) quantize_row_q5_K_ref, QK_K, sizeof(block_q5_K)},
    {"Q6_K", (quantizer) quantize_row_q6_K_ref, QK_K, sizeof(block_q6_K)},
};

int main(int argc, char ** argv) {
    if (argc != 5 && argc != 6) {
        fprintf(stderr, "usage: %s TYPE N_VALUES IN.f32 OUT.bin [REPEATS]\n", argv[0]);
        return 2;
    }
    int t = -1;
    for (size_t i = 0; i < sizeof(TYPES) / sizeof(TYPES[0]); ++i) {
        if (!strcmp(argv[1], TYPES[i].name)) t = (int) i;
    }
    long long n = atoll(argv[2]);
    if (t < 0 || n <= 0 || n % TYPES[t].block) {
        fprintf(stderr, "unknown type %s or bad count %s\n", argv[1], argv[2]);
        return 2;
    }
    float * x = malloc(n * sizeof(float));
    size_t out_size = n / TYPES[t].block * TYPES[t].size;
    void * y = malloc(out_size);
    FILE * f = fopen(argv[3], "rb");
    if (!f || fread(x, sizeof(float), n, f) != (size_t) n) {
        fprintf(stderr, "cannot read %lld float32 values from %s\n", n, argv[3]);
        return 1;
    }
    fclose(f);
    int repeats = argc == 6 ? atoi(argv[5]) : 1;
    struct timespec t0, t1;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t0);
    for (int r = 0; r < repeats; ++r) TYPES[t].fn(x, y, n);
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t1);
    if (argc == 6) printf("%.6f\n", (t1.tv_sec - t0.tv_sec) + 1e-9 * (t1.tv_nsec - t0.tv_nsec));
    f = fopen(argv[4], "wb");
    if (!f || fwrite(y, 1, out_size, f) != out_size || fclose(f)) {
        fprintf(stderr, "cannot write %s\n", argv[4]);
        return 1;
    }
    free(x);
    free(y);
    return 0;
}
