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

/* float32 x 8 -> bf16 bit patterns (round to nearest even) in the low half of 32-bit lanes.  The
 * same arithmetic as f32_to_bf16 for finite values (weights are finite). */
static inline __m256i f32x8_to_bf16_u32(__m256 v) {
    __m256i u = _mm256_castps_si256(v);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    return _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), lsb)), 16);
}

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
            const __m256 sv = _mm256_set1_ps(s), zv = _mm256_set1_ps(z), eight = _mm256_set1_ps(8.0f);
            int64_t j = 0;
            for (; j + 8 <= G / 2; j += 8) { /* 8 bytes -> inputs 2j .. 2j+15 */
                __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(src + j)));
                __m256 lo = _mm256_cvtepi32_ps(_mm256_and_si256(b, _mm256_set1_epi32(15)));
                __m256 hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4));
                __m256i lo16 = f32x8_to_bf16_u32(_mm256_fmadd_ps(_mm256_sub_ps(lo, eight), sv, zv));
                __m256i hi16 = f32x8_to_bf16_u32(_mm256_fmadd_ps(_mm256_sub_ps(hi, eight), sv, zv));
                /* little-endian: the 32-bit word j holds input 2j (low half) and 2j+1 (high half) */
                _mm256_storeu_si256((__m256i *)(dst + 2 * j), _mm256_or_si256(lo16, _mm256_slli_epi32(hi16, 16)));
            }
            for (; j < G / 2; j++) {
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
        const float s = scales[n];
        const __m256 sv = _mm256_set1_ps(s);
        const int8_t *src = w + n * K;
        uint16_t *dst = out + n * K;
        int64_t k = 0;
        for (; k + 16 <= K; k += 16) {
            __m128i q = _mm_loadu_si128((const __m128i *)(src + k));
            __m256i a = f32x8_to_bf16_u32(_mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), sv));
            __m256i b = f32x8_to_bf16_u32(
                _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(q, 8))), sv));
            /* packus interleaves 128-bit halves: a0-3 b0-3 a4-7 b4-7 -> reorder the 64-bit quarters */
            __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(a, b), 0xD8);
            _mm256_storeu_si256((__m256i *)(dst + k), packed);
        }
        for (; k < K; k++) dst[k] = f32_to_bf16((float)src[k] * s);
    }
    return 0;
}

#endif
