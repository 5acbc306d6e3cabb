/* One-token (and few-token) matrix-vector kernels for decode on x86-64 CPUs with AVX-512 BF16.
 *
 * Decode reads every weight once per token and does 1-8 multiply-adds with it, so it is bound by
 * memory bandwidth: these kernels stream each weight row once, keep the few input rows in cache,
 * and do the arithmetic in registers.  Built on first use by phi3v/native/__init__.py (cc -O3
 * -mavx512bf16 -fopenmp) and called through ctypes; every entry point has a torch fallback there.
 *
 * Shapes (row-major, contiguous):  W (N, K) weight, X (M, K) inputs, Y (M, N) = X W^T.
 *   bf16   W bf16, X bf16                                     -> Y float32 or bf16
 *   int8   W int8 with a float32 scale per row (W ~ q * s)    X float32 -> Y
 *   int4   W as (N, K/2) bytes, byte j = input 2j (low nibble) | input 2j+1 (high nibble);
 *          per row and group of G inputs a bf16 scale s and zero z: W ~ (q - 8) * s + z.
 *          X bf16 pre-permuted per 64 inputs into [32 even | 32 odd] (so the nibbles of 32 bytes
 *          line up with two 32-lane vectors), plus XS (M, K/G) float32 = sum of X over each group.
 *
 * The int4 trick: the bf16 bit pattern 0x4300 | q is exactly 128 + q for q in 0..15, so a nibble
 * becomes a bf16 number with one OR and the dot product runs on VDPBF16PS.  Per group,
 *   sum_k x_k W_k = s * sum_k x_k (128 + q_k) + (z - 136 s) * sum_k x_k.
 *
 * Threads: rows are split over an OpenMP team of `nthreads`; the library links the libgomp that
 * torch already loaded, so both share one thread pool.
 */
#include <immintrin.h>
#include <stdint.h>
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
/* bf16 weights.  R output rows at a time, M input rows: R*M independent accumulator chains.    */

static inline __attribute__((always_inline)) void bf16_block(const uint16_t *w, const uint16_t *x, void *y,
                                                              int64_t n, int64_t N, int64_t K, int y_bf16,
                                                              const int R, const int M) {
    __m512 acc[MAX_ROWS];
    for (int i = 0; i < R * M; i++) acc[i] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 32) {
        for (int r = 0; r < R; r++) {
            __m512bh wv = (__m512bh)_mm512_loadu_si512(w + (n + r) * K + k);
            for (int m = 0; m < M; m++) {
                __m512bh xv = (__m512bh)_mm512_loadu_si512(x + m * K + k);
                acc[r * M + m] = _mm512_dpbf16_ps(acc[r * M + m], xv, wv);
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int m = 0; m < M; m++) store(y, m * N + n + r, _mm512_reduce_add_ps(acc[r * M + m]), y_bf16);
}

#define BF16_RANGE(R, M)                                                                   \
    for (; n + (R) <= n1; n += (R)) bf16_block(w, x, y, n, N, K, y_bf16, (R), (M));        \
    for (; n < n1; n++) bf16_block(w, x, y, n, N, K, y_bf16, 1, (M));

static void bf16_rows(const uint16_t *w, const uint16_t *x, void *y, int64_t M, int64_t N, int64_t K,
                      int y_bf16, int64_t n0, int64_t n1) {
    int64_t n = n0;
    switch (M) {
        case 1: BF16_RANGE(4, 1) break;
        case 2: BF16_RANGE(4, 2) break;
        case 3: BF16_RANGE(2, 3) break;
        case 4: BF16_RANGE(2, 4) break;
        case 5: BF16_RANGE(1, 5) break;
        case 6: BF16_RANGE(1, 6) break;
        case 7: BF16_RANGE(1, 7) break;
        default: BF16_RANGE(1, 8) break;
    }
}

/* Returns 0 on success, -1 for shapes it does not take (K % 32, M out of 1..8). */
int phi3v_gemv_bf16(const uint16_t *w, const uint16_t *x, void *y, int64_t M, int64_t N, int64_t K, int y_bf16,
                    int nthreads) {
    if (K % 32 || M < 1 || M > MAX_ROWS) return -1;
    int64_t blocks = (N + ROW_BLOCK - 1) / ROW_BLOCK;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t b = 0; b < blocks; b++) {
        int64_t n0 = b * ROW_BLOCK, n1 = n0 + ROW_BLOCK < N ? n0 + ROW_BLOCK : N;
        bf16_rows(w, x, y, M, N, K, y_bf16, n0, n1);
    }
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* int8 weights, float32 inputs: 16 weights -> int32 -> float32 -> FMA; row scale at the end.   */

static inline __attribute__((always_inline)) void int8_block(const int8_t *w, const float *scales, const float *x,
                                                              void *y, int64_t n, int64_t N, int64_t K,
                                                              int y_bf16, const int R, const int M) {
    __m512 acc[MAX_ROWS];
    for (int i = 0; i < R * M; i++) acc[i] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 16) {
        for (int r = 0; r < R; r++) {
            __m128i q = _mm_loadu_si128((const __m128i *)(w + (n + r) * K + k));
            __m512 wv = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q));
            for (int m = 0; m < M; m++)
                acc[r * M + m] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + m * K + k), acc[r * M + m]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int m = 0; m < M; m++)
            store(y, m * N + n + r, scales[n + r] * _mm512_reduce_add_ps(acc[r * M + m]), y_bf16);
}

#define INT8_RANGE(R, M)                                                                           \
    for (; n + (R) <= n1; n += (R)) int8_block(w, scales, x, y, n, N, K, y_bf16, (R), (M));        \
    for (; n < n1; n++) int8_block(w, scales, x, y, n, N, K, y_bf16, 1, (M));

static void int8_rows(const int8_t *w, const float *scales, const float *x, void *y, int64_t M, int64_t N,
                      int64_t K, int y_bf16, int64_t n0, int64_t n1) {
    int64_t n = n0;
    switch (M) {
        case 1: INT8_RANGE(4, 1) break;
        case 2: INT8_RANGE(4, 2) break;
        case 3: INT8_RANGE(2, 3) break;
        case 4: INT8_RANGE(2, 4) break;
        case 5: INT8_RANGE(1, 5) break;
        case 6: INT8_RANGE(1, 6) break;
        case 7: INT8_RANGE(1, 7) break;
        default: INT8_RANGE(1, 8) break;
    }
}

int phi3v_gemv_int8(const int8_t *w, const float *scales, const float *x, void *y, int64_t M, int64_t N,
                    int64_t K, int y_bf16, int nthreads) {
    if (K % 16 || M < 1 || M > MAX_ROWS) return -1;
    int64_t blocks = (N + ROW_BLOCK - 1) / ROW_BLOCK;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t b = 0; b < blocks; b++) {
        int64_t n0 = b * ROW_BLOCK, n1 = n0 + ROW_BLOCK < N ? n0 + ROW_BLOCK : N;
        int8_rows(w, scales, x, y, M, N, K, y_bf16, n0, n1);
    }
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* int4 weights (see the header for the layout and the 0x4300 | q trick).                      */

static inline __attribute__((always_inline)) void int4_block(const uint8_t *w, const uint16_t *scales,
                                                              const uint16_t *zeros, const uint16_t *xp,
                                                              const float *xs, void *y, int64_t n, int64_t N,
                                                              int64_t K, int64_t G, int y_bf16, const int R,
                                                              const int M) {
    const int64_t groups = K / G;
    const __m512i low_mask = _mm512_set1_epi16(0x000f);
    const __m512i bias = _mm512_set1_epi16(0x4300);
    __m512 total[MAX_ROWS];
    float corr[MAX_ROWS];
    for (int i = 0; i < R * M; i++) {
        total[i] = _mm512_setzero_ps();
        corr[i] = 0.0f;
    }
    for (int64_t g = 0; g < groups; g++) {
        __m512 acc[MAX_ROWS];
        for (int i = 0; i < R * M; i++) acc[i] = _mm512_setzero_ps();
        for (int64_t k = g * G; k < (g + 1) * G; k += 64) {
            for (int r = 0; r < R; r++) {
                __m256i bytes = _mm256_loadu_si256((const __m256i *)(w + ((n + r) * K + k) / 2));
                __m512i words = _mm512_cvtepu8_epi16(bytes);
                /* (words & 0xf) | 0x4300  and  (words >> 4) | 0x4300 */
                __m512bh lo = (__m512bh)_mm512_ternarylogic_epi32(words, low_mask, bias, 0xEA);
                __m512bh hi = (__m512bh)_mm512_or_si512(_mm512_srli_epi16(words, 4), bias);
                for (int m = 0; m < M; m++) {
                    const uint16_t *xk = xp + m * K + k;
                    acc[r * M + m] = _mm512_dpbf16_ps(acc[r * M + m], (__m512bh)_mm512_loadu_si512(xk), lo);
                    acc[r * M + m] = _mm512_dpbf16_ps(acc[r * M + m], (__m512bh)_mm512_loadu_si512(xk + 32), hi);
                }
            }
        }
        for (int r = 0; r < R; r++) {
            float s = bf16_to_f32(scales[(n + r) * groups + g]);
            float c = bf16_to_f32(zeros[(n + r) * groups + g]) - 136.0f * s;
            __m512 sv = _mm512_set1_ps(s);
            for (int m = 0; m < M; m++) {
                total[r * M + m] = _mm512_fmadd_ps(acc[r * M + m], sv, total[r * M + m]);
                corr[r * M + m] += c * xs[m * groups + g];
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int m = 0; m < M; m++)
            store(y, m * N + n + r, _mm512_reduce_add_ps(total[r * M + m]) + corr[r * M + m], y_bf16);
}

#define INT4_RANGE(R, M)                                                                                 \
    for (; n + (R) <= n1; n += (R)) int4_block(w, scales, zeros, xp, xs, y, n, N, K, G, y_bf16, (R), (M)); \
    for (; n < n1; n++) int4_block(w, scales, zeros, xp, xs, y, n, N, K, G, y_bf16, 1, (M));

static void int4_rows(const uint8_t *w, const uint16_t *scales, const uint16_t *zeros, const uint16_t *xp,
                      const float *xs, void *y, int64_t M, int64_t N, int64_t K, int64_t G, int y_bf16,
                      int64_t n0, int64_t n1) {
    int64_t n = n0;
    switch (M) {
        case 1: INT4_RANGE(4, 1) break;
        case 2: INT4_RANGE(4, 2) break;
        case 3: INT4_RANGE(2, 3) break;
        case 4: INT4_RANGE(2, 4) break;
        case 5: INT4_RANGE(1, 5) break;
        case 6: INT4_RANGE(1, 6) break;
        case 7: INT4_RANGE(1, 7) break;
        default: INT4_RANGE(1, 8) break;
    }
}

int phi3v_gemv_int4(const uint8_t *w, const uint16_t *scales, const uint16_t *zeros, const uint16_t *xp,
                    const float *xs, void *y, int64_t M, int64_t N, int64_t K, int64_t G, int y_bf16,
                    int nthreads) {
    if (G % 64 || K % G || M < 1 || M > MAX_ROWS) return -1;
    int64_t blocks = (N + ROW_BLOCK - 1) / ROW_BLOCK;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t b = 0; b < blocks; b++) {
        int64_t n0 = b * ROW_BLOCK, n1 = n0 + ROW_BLOCK < N ? n0 + ROW_BLOCK : N;
        int4_rows(w, scales, zeros, xp, xs, y, M, N, K, G, y_bf16, n0, n1);
    }
    return 0;
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
