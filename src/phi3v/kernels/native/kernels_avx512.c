/* One-token (and few-token) matrix-vector kernels for decode on x86-64 CPUs with AVX-512 BF16
 * (kernels_avx2.c has the same entry points for AVX2 + FMA CPUs).
 *
 * Decode reads every weight once per token and does 1-8 multiply-adds with it, so it is bound by
 * memory bandwidth: these kernels stream each weight row once, keep the few input rows in cache,
 * and do the arithmetic in registers.  Built on first use by phi3v/kernels/native/__init__.py (cc -O3
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
#include "common.h"

/* Weight rows per block for M input rows (bf16): R * M accumulators, R + M loads per R * M
 * dot-product steps; measured on Zen 4 (L2-resident: M = 4 and 8 reach ~70 GMAC/s per core). */
#define BF16_R2 4
#define BF16_R3 4
#define BF16_R4 4
#define BF16_R8 2
#define INT8_PREFETCH_BYTES 4096
#define INT8_PREFETCH_HINT _MM_HINT_T1
#define INT4_PREFETCH_BYTES 4096
#define INT4_PREFETCH_HINT _MM_HINT_T0

/* ------------------------------------------------------------------------------------------ */
/* bf16 weights.  R output rows at a time, M input rows: R*M independent accumulator chains.    */

static inline __attribute__((always_inline)) void bf16_block(const uint16_t *w, const uint16_t *x, void *y,
                                                              int64_t n, int64_t N, int64_t K, int y_bf16,
                                                              const int R, const int M) {
    __m512 acc[24]; /* R * M <= 24: each x load serves R weight rows, each w load M inputs */
    for (int i = 0; i < R * M; i++) acc[i] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 32) {
        __m512bh xv[MAX_ROWS]; /* loaded once per step, used by all R weight rows */
        for (int m = 0; m < M; m++) xv[m] = (__m512bh)_mm512_loadu_si512(x + m * K + k);
        for (int r = 0; r < R; r++) {
            /* Several rows make a block compute-heavy enough that the hardware prefetcher falls
             * behind: fetch the same columns of the next block into L2 (M = 8 from DRAM: ~7 -> ~4
             * ms per 16384x3072 matrix on Zen 4). */
            if (M > 1) _mm_prefetch((const char *)(w + (n + r + R) * K + k), _MM_HINT_T1);
            __m512bh wv = (__m512bh)_mm512_loadu_si512(w + (n + r) * K + k);
            for (int m = 0; m < M; m++) acc[r * M + m] = _mm512_dpbf16_ps(acc[r * M + m], xv[m], wv);
        }
    }
    for (int r = 0; r < R; r++)
        for (int m = 0; m < M; m++) store(y, m * N + n + r, _mm512_reduce_add_ps(acc[r * M + m]), y_bf16);
}

/* One input row: one weight row at a time (a single sequential stream per thread, which the
 * hardware prefetcher follows best) with four independent accumulator chains. */
static inline void bf16_row_m1(const uint16_t *w, const uint16_t *x, void *y, int64_t n, int64_t K, int y_bf16) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    const uint16_t *wr = w + n * K;
    int64_t k = 0;
    for (; k + 128 <= K; k += 128) {
        a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(x + k), (__m512bh)_mm512_loadu_si512(wr + k));
        a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512(x + k + 32), (__m512bh)_mm512_loadu_si512(wr + k + 32));
        a2 = _mm512_dpbf16_ps(a2, (__m512bh)_mm512_loadu_si512(x + k + 64), (__m512bh)_mm512_loadu_si512(wr + k + 64));
        a3 = _mm512_dpbf16_ps(a3, (__m512bh)_mm512_loadu_si512(x + k + 96), (__m512bh)_mm512_loadu_si512(wr + k + 96));
    }
    for (; k < K; k += 32)
        a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(x + k), (__m512bh)_mm512_loadu_si512(wr + k));
    store(y, n, _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3))), y_bf16);
}

#define BF16_RANGE(R, M)                                                                   \
    for (; n + (R) <= n1; n += (R)) bf16_block(w, x, y, n, N, K, y_bf16, (R), (M));        \
    for (; n < n1; n++) bf16_block(w, x, y, n, N, K, y_bf16, 1, (M));

static void bf16_rows(const uint16_t *w, const uint16_t *x, void *y, int64_t M, int64_t N, int64_t K,
                      int y_bf16, int64_t n0, int64_t n1) {
    int64_t n = n0;
    switch (M) {
        case 1:
            for (; n < n1; n++) bf16_row_m1(w, x, y, n, K, y_bf16);
            break;
        case 2: BF16_RANGE(BF16_R2, 2) break;
        case 3: BF16_RANGE(BF16_R3, 3) break;
        case 4: BF16_RANGE(BF16_R4, 4) break;
        case 5: BF16_RANGE(BF16_R8, 5) break;
        case 6: BF16_RANGE(BF16_R8, 6) break;
        case 7: BF16_RANGE(BF16_R8, 7) break;
        default: BF16_RANGE(BF16_R8, 8) break;
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
            const int8_t *src = w + (n + r) * K + k;
            __m128i q = _mm_loadu_si128((const __m128i *)src);
            __m512 wv = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q));
            for (int m = 0; m < M; m++)
                acc[r * M + m] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + m * K + k), acc[r * M + m]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int m = 0; m < M; m++)
            store(y, m * N + n + r, scales[n + r] * _mm512_reduce_add_ps(acc[r * M + m]), y_bf16);
}

static inline void int8_row_m1(const int8_t *w, const float *scales, const float *x, void *y, int64_t n, int64_t K,
                               int y_bf16) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    const int8_t *wr = w + n * K;
    int64_t k = 0;
#define INT8_STEP(acc, off) \
    acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(wr + k + off)))), \
                          _mm512_loadu_ps(x + k + off), acc)
    for (; k + 64 <= K; k += 64) {
        _mm_prefetch((const char *)(wr + k) + INT8_PREFETCH_BYTES, INT8_PREFETCH_HINT);
        INT8_STEP(a0, 0);
        INT8_STEP(a1, 16);
        INT8_STEP(a2, 32);
        INT8_STEP(a3, 48);
    }
    for (; k < K; k += 16) INT8_STEP(a0, 0);
#undef INT8_STEP
    store(y, n, scales[n] * _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3))), y_bf16);
}

#define INT8_RANGE(R, M)                                                                           \
    for (; n + (R) <= n1; n += (R)) int8_block(w, scales, x, y, n, N, K, y_bf16, (R), (M));        \
    for (; n < n1; n++) int8_block(w, scales, x, y, n, N, K, y_bf16, 1, (M));

static void int8_rows(const int8_t *w, const float *scales, const float *x, void *y, int64_t M, int64_t N,
                      int64_t K, int y_bf16, int64_t n0, int64_t n1) {
    int64_t n = n0;
    switch (M) {
        case 1:
            for (; n < n1; n++) int8_row_m1(w, scales, x, y, n, K, y_bf16);
            break;
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
        __m512 acc[MAX_ROWS], acc_hi[MAX_ROWS]; /* two chains per output: low and high nibbles */
        for (int i = 0; i < R * M; i++) acc[i] = acc_hi[i] = _mm512_setzero_ps();
        for (int64_t k = g * G; k < (g + 1) * G; k += 64) {
            for (int r = 0; r < R; r++) {
                const uint8_t *src = w + ((n + r) * K + k) / 2;
                _mm_prefetch((const char *)src + INT4_PREFETCH_BYTES, INT4_PREFETCH_HINT);
                __m256i bytes = _mm256_loadu_si256((const __m256i *)src);
                __m512i words = _mm512_cvtepu8_epi16(bytes);
                /* (words & 0xf) | 0x4300  and  (words >> 4) | 0x4300 */
                __m512bh lo = (__m512bh)_mm512_ternarylogic_epi32(words, low_mask, bias, 0xEA);
                __m512bh hi = (__m512bh)_mm512_or_si512(_mm512_srli_epi16(words, 4), bias);
                for (int m = 0; m < M; m++) {
                    const uint16_t *xk = xp + m * K + k;
                    acc[r * M + m] = _mm512_dpbf16_ps(acc[r * M + m], (__m512bh)_mm512_loadu_si512(xk), lo);
                    acc_hi[r * M + m] = _mm512_dpbf16_ps(acc_hi[r * M + m], (__m512bh)_mm512_loadu_si512(xk + 32), hi);
                }
            }
        }
        for (int r = 0; r < R; r++) {
            float s = bf16_to_f32(scales[(n + r) * groups + g]);
            float c = bf16_to_f32(zeros[(n + r) * groups + g]) - 136.0f * s;
            __m512 sv = _mm512_set1_ps(s);
            for (int m = 0; m < M; m++) {
                total[r * M + m] = _mm512_fmadd_ps(_mm512_add_ps(acc[r * M + m], acc_hi[r * M + m]), sv, total[r * M + m]);
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
    if (M > 4) {
        /* Two passes over this block of weight rows (it stays in L1/L2 for the second): inputs
         * 0-3, then 4..M-1, each with two weight rows per x load (fewer loads per VDPBF16PS). */
        int4_rows(w, scales, zeros, xp, xs, y, 4, N, K, G, y_bf16, n0, n1);
        char *y_rest = (char *)y + 4 * N * (y_bf16 ? 2 : 4);
        int4_rows(w, scales, zeros, xp + 4 * K, xs + 4 * (K / G), y_rest, M - 4, N, K, G, y_bf16, n0, n1);
        return;
    }
    switch (M) {
        case 1: INT4_RANGE(1, 1) break; /* one row at a time: one stream per thread */
        case 2: INT4_RANGE(4, 2) break;
        case 3: INT4_RANGE(2, 3) break;
        default: INT4_RANGE(2, 4) break;
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
/* Attention of one new token over a KV cache (decode).                                         */
/* q (B, H, D) bf16; k, v (B, KVH, cap, D) bf16 (slots [0, length) filled); out (B, H, D) bf16. */
/* valid (B, valid_stride) uint8 or NULL: 0 hides a slot from that row (left padding).          */
/* Query head h reads key/value head h / (H / KVH).  Scores and softmax in float32, the value   */
/* sum accumulated in float32 and rounded to bf16 once.                                         */

static inline __m512 exp512(__m512 x) { /* e^x for x <= 0 (softmax), relative error ~2e-7 */
    const __m512 log2e = _mm512_set1_ps(1.44269504088896341f), ln2_hi = _mm512_set1_ps(0.693359375f),
                 ln2_lo = _mm512_set1_ps(-2.12194440e-4f);
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, ln2_hi, x);
    r = _mm512_fnmadd_ps(n, ln2_lo, r);
    /* Taylor/Cephes polynomial of e^r on |r| <= ln2/2 */
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n); /* p * 2^n */
}

static inline __attribute__((always_inline)) void attend_one_head(const uint16_t *q, const uint16_t *k,
                                                                   const uint16_t *v, uint16_t *out, int64_t D,
                                                                   int64_t length, float scale,
                                                                   const uint8_t *valid, float *scores) {
    /* scores[i] = scale * q . k_i  (-inf where valid[i] == 0) */
    float best = -INFINITY;
    for (int64_t i = 0; i < length; i++) {
        if (valid && !valid[i]) {
            scores[i] = -INFINITY;
            continue;
        }
        const uint16_t *ki = k + i * D;
        __m512 acc = _mm512_setzero_ps();
        for (int64_t d = 0; d < D; d += 32) {
            __mmask32 m = D - d >= 32 ? (__mmask32)0xffffffffu : (__mmask32)((1u << (D - d)) - 1);
            acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_maskz_loadu_epi16(m, q + d),
                                   (__m512bh)_mm512_maskz_loadu_epi16(m, ki + d));
        }
        float s = scale * _mm512_reduce_add_ps(acc);
        scores[i] = s;
        if (s > best) best = s;
    }
    if (best == -INFINITY) { /* nothing visible (cannot happen for a real query): output zeros */
        for (int64_t d = 0; d < D; d++) out[d] = 0;
        return;
    }
    /* softmax numerators and their sum */
    __m512 sumv = _mm512_setzero_ps();
    const __m512 bestv = _mm512_set1_ps(best);
    int64_t i = 0;
    for (; i + 16 <= length; i += 16) {
        __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(scores + i), bestv));
        _mm512_storeu_ps(scores + i, e);
        sumv = _mm512_add_ps(sumv, e);
    }
    if (i < length) {
        __mmask16 m = (__mmask16)((1u << (length - i)) - 1);
        __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, scores + i), bestv));
        e = _mm512_maskz_mov_ps(m, e);
        _mm512_mask_storeu_ps(scores + i, m, e);
        sumv = _mm512_add_ps(sumv, e);
    }
    const float inv = 1.0f / _mm512_reduce_add_ps(sumv);
    /* out = sum_i p_i v_i, 16 dims at a time in float32 registers (D <= 256: 16 registers) */
    __m512 acc[16];
    const int64_t chunks = (D + 15) / 16;
    for (int64_t c = 0; c < chunks; c++) acc[c] = _mm512_setzero_ps();
    for (int64_t j = 0; j < length; j++) {
        const __m512 p = _mm512_set1_ps(scores[j]);
        const uint16_t *vj = v + j * D;
        for (int64_t c = 0; c < chunks; c++) {
            int64_t left = D - c * 16;
            __mmask16 m = left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1);
            __m512i h = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, vj + c * 16));
            acc[c] = _mm512_fmadd_ps(p, _mm512_castsi512_ps(_mm512_slli_epi32(h, 16)), acc[c]);
        }
    }
    for (int64_t c = 0; c < chunks; c++) {
        float tmp[16];
        _mm512_storeu_ps(tmp, _mm512_mul_ps(acc[c], _mm512_set1_ps(inv)));
        for (int64_t e = 0; e < 16 && c * 16 + e < D; e++) out[c * 16 + e] = f32_to_bf16(tmp[e]);
    }
}

#include "attention_driver.h"

#ifdef PHI3V_AMX
#include "int4_amx.h" /* int4 x 2-64 rows on AMX tiles (the avx512amx build) */
#endif

int phi3v_isa(void) { return 512; }
