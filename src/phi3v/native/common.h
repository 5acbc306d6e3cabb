/* Shared by the per-ISA kernel files: limits, bf16 <-> float32, result stores, and the scalar
 * dequantization kernels (prefill: int4/int8 -> bf16 in one pass, rounded once). */
#ifndef PHI3V_NATIVE_COMMON_H
#define PHI3V_NATIVE_COMMON_H

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_ROWS 8 /* most input rows (tokens) a call takes */
#define ROW_BLOCK 16 /* output rows per scheduling unit */

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, NaN stays NaN */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline void store(void *y, int64_t i, float v, int y_bf16) {
    if (y_bf16)
        ((uint16_t *)y)[i] = f32_to_bf16(v);
    else
        ((float *)y)[i] = v;
}

/* ------------------------------------------------------------------------------------------ */
/* Dequantization to bf16 (for prefill, where the bf16 GEMM wins): one pass, rounded once.      */

int phi3v_dequant_int4_bf16(const uint8_t *w, const uint16_t *scales, const uint16_t *zeros, uint16_t *out,
                            int64_t N, int64_t K, int64_t G, int nthreads) {
    if (K % 2 || G % 2 || K % G) return -1;
    const int64_t groups = K / G;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t n = 0; n < N; n++) {
        for (int64_t g = 0; g < groups; g++) {
            float s = bf16_to_f32(scales[n * groups + g]);
            float z = bf16_to_f32(zeros[n * groups + g]);
            const uint8_t *src = w + (n * K + g * G) / 2;
            uint16_t *dst = out + n * K + g * G;
            for (int64_t j = 0; j < G / 2; j++) {
                dst[2 * j] = f32_to_bf16(((float)(src[j] & 15) - 8.0f) * s + z);
                dst[2 * j + 1] = f32_to_bf16(((float)(src[j] >> 4) - 8.0f) * s + z);
            }
        }
    }
    return 0;
}

int phi3v_dequant_int8_bf16(const int8_t *w, const float *scales, uint16_t *out, int64_t N, int64_t K,
                            int nthreads) {
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t n = 0; n < N; n++) {
        float s = scales[n];
        for (int64_t k = 0; k < K; k++) out[n * K + k] = f32_to_bf16((float)w[n * K + k] * s);
    }
    return 0;
}

#endif
