/* The decode kernels of kernels_avx512.c for x86-64 CPUs with AVX2 + FMA but no AVX-512 BF16
 * (most laptop CPUs).  Same entry points and shapes; the arithmetic is float32 FMA on 8 lanes:
 *
 *   bf16   W bf16 (widened with a 16-bit shift), X float32 (the bf16 activations, widened)
 *   int8   W int8 -> float32, X float32, row scale at the end
 *   int4   W (N, K/2) bytes as in kernels_avx512.c; X float32 pre-permuted per 16 inputs into
 *          [8 even | 8 odd] (the low and high nibbles of 8 bytes), XS (M, K/G) = sum of X per group:
 *          sum_k x_k W_k = s * sum_k x_k q_k + (z - 8 s) * sum_k x_k
 *   attention  q, k, v bf16 as in kernels_avx512.c, float32 scores / softmax / sums
 *
 * Weight rows are streamed once, one row at a time per thread (one sequential stream, which the
 * hardware prefetcher follows best), with several accumulator chains per row.
 */
#include "common.h"

static inline __m256 bf16x8_to_f32(const uint16_t *p) {
    __m256i h = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(h, 16));
}

static inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* ------------------------------------------------------------------------------------------ */
/* bf16 weights */

static inline __attribute__((always_inline)) void bf16_row(const uint16_t *w, const float *x, void *y, int64_t n,
                                                            int64_t N, int64_t K, int y_bf16, const int M) {
    __m256 acc[2 * MAX_ROWS]; /* two chains per input row */
    for (int i = 0; i < 2 * M; i++) acc[i] = _mm256_setzero_ps();
    const uint16_t *wr = w + n * K;
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
        __m256 w0 = bf16x8_to_f32(wr + k), w1 = bf16x8_to_f32(wr + k + 8);
        for (int m = 0; m < M; m++) {
            acc[2 * m] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + m * K + k), acc[2 * m]);
            acc[2 * m + 1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + m * K + k + 8), acc[2 * m + 1]);
        }
    }
    for (int m = 0; m < M; m++) {
        float sum = hsum256(_mm256_add_ps(acc[2 * m], acc[2 * m + 1]));
        for (int64_t j = k; j < K; j++) sum += bf16_to_f32(wr[j]) * x[m * K + j];
        store(y, m * N + n, sum, y_bf16);
    }
}

int phi3v_gemv_bf16(const uint16_t *w, const float *x, void *y, int64_t M, int64_t N, int64_t K, int y_bf16,
                    int nthreads) {
    if (M < 1 || M > MAX_ROWS) return -1;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t n = 0; n < N; n++) {
        switch (M) {
            case 1: bf16_row(w, x, y, n, N, K, y_bf16, 1); break;
            case 2: bf16_row(w, x, y, n, N, K, y_bf16, 2); break;
            case 3: bf16_row(w, x, y, n, N, K, y_bf16, 3); break;
            case 4: bf16_row(w, x, y, n, N, K, y_bf16, 4); break;
            case 5: bf16_row(w, x, y, n, N, K, y_bf16, 5); break;
            case 6: bf16_row(w, x, y, n, N, K, y_bf16, 6); break;
            case 7: bf16_row(w, x, y, n, N, K, y_bf16, 7); break;
            default: bf16_row(w, x, y, n, N, K, y_bf16, 8); break;
        }
    }
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* int8 weights */

static inline __attribute__((always_inline)) void int8_row(const int8_t *w, const float *scales, const float *x,
                                                            void *y, int64_t n, int64_t N, int64_t K, int y_bf16,
                                                            const int M) {
    __m256 acc[2 * MAX_ROWS];
    for (int i = 0; i < 2 * M; i++) acc[i] = _mm256_setzero_ps();
    const int8_t *wr = w + n * K;
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
        __m128i q = _mm_loadu_si128((const __m128i *)(wr + k));
        __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q));
        __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(q, 8)));
        for (int m = 0; m < M; m++) {
            acc[2 * m] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + m * K + k), acc[2 * m]);
            acc[2 * m + 1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + m * K + k + 8), acc[2 * m + 1]);
        }
    }
    for (int m = 0; m < M; m++) {
        float sum = hsum256(_mm256_add_ps(acc[2 * m], acc[2 * m + 1]));
        for (int64_t j = k; j < K; j++) sum += (float)wr[j] * x[m * K + j];
        store(y, m * N + n, scales[n] * sum, y_bf16);
    }
}

int phi3v_gemv_int8(const int8_t *w, const float *scales, const float *x, void *y, int64_t M, int64_t N,
                    int64_t K, int y_bf16, int nthreads) {
    if (M < 1 || M > MAX_ROWS) return -1;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t n = 0; n < N; n++) {
        switch (M) {
            case 1: int8_row(w, scales, x, y, n, N, K, y_bf16, 1); break;
            case 2: int8_row(w, scales, x, y, n, N, K, y_bf16, 2); break;
            case 3: int8_row(w, scales, x, y, n, N, K, y_bf16, 3); break;
            case 4: int8_row(w, scales, x, y, n, N, K, y_bf16, 4); break;
            case 5: int8_row(w, scales, x, y, n, N, K, y_bf16, 5); break;
            case 6: int8_row(w, scales, x, y, n, N, K, y_bf16, 6); break;
            case 7: int8_row(w, scales, x, y, n, N, K, y_bf16, 7); break;
            default: int8_row(w, scales, x, y, n, N, K, y_bf16, 8); break;
        }
    }
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* int4 weights */

static inline __attribute__((always_inline)) void int4_row(const uint8_t *w, const uint16_t *scales,
                                                            const uint16_t *zeros, const float *xp, const float *xs,
                                                            void *y, int64_t n, int64_t N, int64_t K, int64_t G,
                                                            int y_bf16, const int M) {
    const int64_t groups = K / G;
    const __m256i low_mask = _mm256_set1_epi32(15);
    __m256 total[MAX_ROWS];
    float corr[MAX_ROWS];
    for (int m = 0; m < M; m++) {
        total[m] = _mm256_setzero_ps();
        corr[m] = 0.0f;
    }
    const uint8_t *wr = w + n * K / 2;
    for (int64_t g = 0; g < groups; g++) {
        __m256 lo_acc[MAX_ROWS], hi_acc[MAX_ROWS];
        for (int m = 0; m < M; m++) lo_acc[m] = hi_acc[m] = _mm256_setzero_ps();
        for (int64_t k = g * G; k < (g + 1) * G; k += 16) {
            __m256i bytes = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(wr + k / 2)));
            __m256 lo = _mm256_cvtepi32_ps(_mm256_and_si256(bytes, low_mask));
            __m256 hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(bytes, 4));
            for (int m = 0; m < M; m++) {
                lo_acc[m] = _mm256_fmadd_ps(lo, _mm256_loadu_ps(xp + m * K + k), lo_acc[m]);
                hi_acc[m] = _mm256_fmadd_ps(hi, _mm256_loadu_ps(xp + m * K + k + 8), hi_acc[m]);
            }
        }
        float s = bf16_to_f32(scales[n * groups + g]);
        float c = bf16_to_f32(zeros[n * groups + g]) - 8.0f * s;
        __m256 sv = _mm256_set1_ps(s);
        for (int m = 0; m < M; m++) {
            total[m] = _mm256_fmadd_ps(_mm256_add_ps(lo_acc[m], hi_acc[m]), sv, total[m]);
            corr[m] += c * xs[m * groups + g];
        }
    }
    for (int m = 0; m < M; m++) store(y, m * N + n, hsum256(total[m]) + corr[m], y_bf16);
}

int phi3v_gemv_int4(const uint8_t *w, const uint16_t *scales, const uint16_t *zeros, const float *xp,
                    const float *xs, void *y, int64_t M, int64_t N, int64_t K, int64_t G, int y_bf16,
                    int nthreads) {
    if (G % 16 || K % G || M < 1 || M > MAX_ROWS) return -1;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t n = 0; n < N; n++) {
        switch (M) {
            case 1: int4_row(w, scales, zeros, xp, xs, y, n, N, K, G, y_bf16, 1); break;
            case 2: int4_row(w, scales, zeros, xp, xs, y, n, N, K, G, y_bf16, 2); break;
            case 3: int4_row(w, scales, zeros, xp, xs, y, n, N, K, G, y_bf16, 3); break;
            case 4: int4_row(w, scales, zeros, xp, xs, y, n, N, K, G, y_bf16, 4); break;
            case 5: int4_row(w, scales, zeros, xp, xs, y, n, N, K, G, y_bf16, 5); break;
            case 6: int4_row(w, scales, zeros, xp, xs, y, n, N, K, G, y_bf16, 6); break;
            case 7: int4_row(w, scales, zeros, xp, xs, y, n, N, K, G, y_bf16, 7); break;
            default: int4_row(w, scales, zeros, xp, xs, y, n, N, K, G, y_bf16, 8); break;
        }
    }
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* Attention of one new token over a KV cache (see kernels_avx512.c for the layout).           */

static inline __m256 exp256(__m256 x) { /* e^x for x <= 0 (softmax), relative error ~2e-7 */
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e)); /* p * 2^n */
}

static inline __attribute__((always_inline)) void attend_one_head(const uint16_t *q, const uint16_t *k,
                                                                   const uint16_t *v, uint16_t *out, int64_t D,
                                                                   int64_t length, float scale,
                                                                   const uint8_t *valid, float *scores) {
    const int64_t D8 = D / 8 * 8;
    float best = -INFINITY;
    for (int64_t i = 0; i < length; i++) {
        if (valid && !valid[i]) {
            scores[i] = -INFINITY;
            continue;
        }
        const uint16_t *ki = k + i * D;
        __m256 acc = _mm256_setzero_ps();
        for (int64_t d = 0; d < D8; d += 8) acc = _mm256_fmadd_ps(bf16x8_to_f32(q + d), bf16x8_to_f32(ki + d), acc);
        float s = hsum256(acc);
        for (int64_t d = D8; d < D; d++) s += bf16_to_f32(q[d]) * bf16_to_f32(ki[d]);
        s *= scale;
        scores[i] = s;
        if (s > best) best = s;
    }
    if (best == -INFINITY) {
        for (int64_t d = 0; d < D; d++) out[d] = 0;
        return;
    }
    __m256 sumv = _mm256_setzero_ps();
    const __m256 bestv = _mm256_set1_ps(best);
    int64_t i = 0;
    for (; i + 8 <= length; i += 8) {
        __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(scores + i), bestv));
        _mm256_storeu_ps(scores + i, e);
        sumv = _mm256_add_ps(sumv, e);
    }
    float sum = hsum256(sumv);
    for (; i < length; i++) {
        scores[i] = expf(scores[i] - best);
        sum += scores[i];
    }
    const float inv = 1.0f / sum;
    __m256 acc[32]; /* D <= 256 */
    const int64_t chunks = D8 / 8;
    for (int64_t c = 0; c < chunks; c++) acc[c] = _mm256_setzero_ps();
    float tail[8] = {0};
    for (int64_t j = 0; j < length; j++) {
        const __m256 p = _mm256_set1_ps(scores[j]);
        const uint16_t *vj = v + j * D;
        for (int64_t c = 0; c < chunks; c++) acc[c] = _mm256_fmadd_ps(p, bf16x8_to_f32(vj + c * 8), acc[c]);
        for (int64_t d = D8; d < D; d++) tail[d - D8] += scores[j] * bf16_to_f32(vj[d]);
    }
    for (int64_t c = 0; c < chunks; c++) {
        float tmp[8];
        _mm256_storeu_ps(tmp, _mm256_mul_ps(acc[c], _mm256_set1_ps(inv)));
        for (int e = 0; e < 8; e++) out[c * 8 + e] = f32_to_bf16(tmp[e]);
    }
    for (int64_t d = D8; d < D; d++) out[d] = f32_to_bf16(tail[d - D8] * inv);
}

#include "attention_driver.h"

int phi3v_isa(void) { return 2; }
