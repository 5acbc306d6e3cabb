/* Per-token int8 quantization of activations for W8A8 (quant/w8a8_native.py builds and calls it).

   For each row m of x (M, K), bf16 or fp32:
     amax  = max_k |x[m, k]|                                (at least 1e-30)
     s[m]  = bf16_round_nearest_even((amax / 127) * (1 + 2^-7))   a bf16 value >= amax / 127
     q[m, k] = round_half_even(x[m, k] * (1 / s[m])) + 128   as uint8 (|x| / s <= 127: no clamp)
   Exactly the float operations of quant/w8a8_kernel.py's torch version, in the same order, so
   both give identical bytes (built with -ffp-contract=off: no fused multiply-adds).
   One read of each row for amax while it is still in cache, one pass to write: ~memory speed,
   where torch needs five passes and temporaries.  Rows are split among `threads` OpenMP threads. */

#include <stdint.h>
#include <string.h>

static inline float bf16_bits_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline float round_to_bf16(float v) { /* round to nearest even, finite v */
    uint32_t u;
    memcpy(&u, &v, 4);
    u += 0x7FFFu + ((u >> 16) & 1u);
    u &= 0xFFFF0000u;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* nearbyint for |v| <= 127.5 (round half to even, default rounding mode): adding and removing
   1.5 * 2^23 leaves no fraction bits; unlike nearbyintf it vectorizes without -ffast-math (which
   this file must never get: it would fold the two additions away). */
static inline float round_even(float v) {
    return (v + 12582912.0f) - 12582912.0f;
}

int phi3v_w8a8_quantize_rows(const void *x, int x_is_bf16, uint8_t *q, float *scales, int64_t M, int64_t K,
                             int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t m = 0; m < M; m++) {
        uint8_t *qr = q + m * K;
        /* max |x| as the largest sign-cleared bit pattern: for non-NaN floats the integer order of
           those patterns is the order of the magnitudes, and integer max vectorizes. */
        float amax;
        if (x_is_bf16) {
            const uint16_t *r = (const uint16_t *)x + m * K;
            uint16_t top = 0;
            for (int64_t k = 0; k < K; k++) {
                uint16_t a = r[k] & 0x7FFFu;
                top = a > top ? a : top;
            }
            amax = bf16_bits_to_f32(top);
        } else {
            const uint32_t *r = (const uint32_t *)x + m * K;
            uint32_t top = 0;
            for (int64_t k = 0; k < K; k++) {
                uint32_t a = r[k] & 0x7FFFFFFFu;
                top = a > top ? a : top;
            }
            memcpy(&amax, &top, 4);
        }
        amax = amax > 1e-30f ? amax : 1e-30f;
        float s = round_to_bf16((amax / 127.0f) * 1.0078125f);
        float inv = 1.0f / s;
        scales[m] = s;
        if (x_is_bf16) {
            const uint16_t *r = (const uint16_t *)x + m * K;
            for (int64_t k = 0; k < K; k++) qr[k] = (uint8_t)(int32_t)(round_even(bf16_bits_to_f32(r[k]) * inv) + 128.0f);
        } else {
            const float *r = (const float *)x + m * K;
            for (int64_t k = 0; k < K; k++) qr[k] = (uint8_t)(int32_t)(round_even(r[k] * inv) + 128.0f);
        }
    }
    return 0;
}

static inline uint16_t f32_to_bf16_bits(float v) { /* round to nearest even, finite v */
    uint32_t u;
    memcpy(&u, &v, 4);
    u += 0x7FFFu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* The W8A8 epilogue, in place: y[m, n] = y[m, n] * s[m] (+ bias[n]), computed in fp32 and
   rounded once to y's dtype.  y (M, N) and bias (N,) are both bf16 or both fp32; bias may be NULL.
   One pass at memory speed, where torch needs a broadcast multiply (and an addcmul for the bias). */
int phi3v_w8a8_scale_rows(void *y, int y_is_bf16, const float *scales, const void *bias, int64_t M, int64_t N,
                          int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t m = 0; m < M; m++) {
        const float s = scales[m];
        if (y_is_bf16) {
            uint16_t *r = (uint16_t *)y + m * N;
            const uint16_t *b = (const uint16_t *)bias;
            if (b)
                for (int64_t n = 0; n < N; n++)
                    r[n] = f32_to_bf16_bits(bf16_bits_to_f32(r[n]) * s + bf16_bits_to_f32(b[n]));
            else
                for (int64_t n = 0; n < N; n++) r[n] = f32_to_bf16_bits(bf16_bits_to_f32(r[n]) * s);
        } else {
            float *r = (float *)y + m * N;
            const float *b = (const float *)bias;
            if (b)
                for (int64_t n = 0; n < N; n++) r[n] = r[n] * s + b[n];
            else
                for (int64_t n = 0; n < N; n++) r[n] = r[n] * s;
        }
    }
    return 0;
}
