/* int4 weights x 2-64 input rows on AMX tiles (CPUs with AMX-BF16: Sapphire Rapids and later).
 * Included by kernels_avx512.c when built with -DPHI3V_AMX (the "avx512amx" build).
 *
 * Why: with several input rows the AVX-512 kernel is bound by its dot-product instructions (two
 * VDPBF16PS per 64 weights per input row), not by memory.  Here each weight is unpacked once into
 * an L1 buffer and one TDPBF16PS multiplies 16 weight rows x 32 inputs with up to 16 input rows
 * (8192 multiply-adds), so 8 rows cost little more than the weight stream of one.
 *
 * Shapes (same weight layout and numerics as phi3v_gemv_int4):
 *   W  (N, K/2) bytes: byte j of a row = input 2j (low nibble) | input 2j+1 (high nibble)
 *   scales, zeros (N, K/G) bf16: W ~ (q - 8) s + z
 *   XT (K/2, M, 2) bf16: the inputs, per 64 permuted into [32 evens | 32 odds] (the order one
 *      32-byte load unpacks the nibbles in: low nibbles, then high), then in AMX's pair layout:
 *      XT[j][m] = (Xp[m][2j], Xp[m][2j+1]) for the permuted rows Xp
 *   XS (K/G, M) float32: sum of X[m] over each group (transposed: one group's row is a vector of m)
 *   Y  (M, N) float32 or bf16
 * The tile product is A = 16 weight rows (128 + q as bf16, exact) x B = XT block, so per group
 *   y[m][n] += s * C[n][m] + (z - 136 s) * XS[g][m]      (C accumulated in fp32 by the tiles)
 *
 * Measured (one core, 9216x3072 from DRAM): 8 rows ~2.0 ms against ~1.4-1.6 ms for one row on the
 * streaming kernel (which needs ~5.8 ms for 8 rows), 64 rows ~6 ms (dequantize + GEMM ~12 ms).
 *
 * Tiles: 0 = A (16 x 64 bytes), 1 = B (16 pairs x 16 rows), 6 = B of the last, partial block of
 * input rows, 2..5 = C for input rows 0-15, 16-31, 32-47, 48-63 (16 weight rows x up to 16 inputs).
 */
#include <sys/syscall.h>
#include <unistd.h>

#define AMX_MAX_ROWS 64
#define AMX_PIECE 256 /* inputs unpacked per pass: 8 chunks of 32 (8 KB of bf16 in L1) */

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} amx_tile_config;

/* Ask Linux (>= 5.16) for the AMX tile state once per process; 0 on success. */
int phi3v_amx_init(void) { return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) ? -1 : 0; }

static void amx_configure(int64_t M) {
    amx_tile_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    cfg.rows[0] = 16, cfg.colsb[0] = 64; /* A: 16 weight rows x 32 bf16 */
    cfg.rows[1] = 16, cfg.colsb[1] = 64; /* B: 16 input pairs x 16 rows x 2 bf16 */
    const int64_t rest = M % 16;
    cfg.rows[6] = 16, cfg.colsb[6] = (uint16_t)((rest ? rest : 16) * 4);
    for (int64_t b = 0; b < (M + 15) / 16; b++) {
        int64_t cols = M - 16 * b < 16 ? M - 16 * b : 16;
        cfg.rows[2 + b] = 16, cfg.colsb[2 + b] = (uint16_t)(cols * 4);
    }
    _tile_loadconfig(&cfg);
}

/* 32 packed bytes (64 inputs) of one weight row -> two A-tile rows of 32 bf16 words 0x4300 | q:
 * lo = the 32 even inputs, hi = the 32 odd ones (XT is permuted to match, see the header). */
static inline void int4_unpack64(const uint8_t *src, uint16_t *lo, uint16_t *hi) {
    __m512i words = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)src));
    const __m512i bias = _mm512_set1_epi16(0x4300);
    _mm512_store_si512(lo, _mm512_ternarylogic_epi32(words, _mm512_set1_epi16(0x000f), bias, 0xEA));
    _mm512_store_si512(hi, _mm512_or_si512(_mm512_srli_epi16(words, 4), bias));
}

/* C tile (2 + b) += A x B, with B the input-row block b at pair row j0 (tile numbers are immediates). */
static inline void amx_dot(int b, int partial, const uint16_t *xt, int64_t j0, int64_t M) {
    const uint16_t *src = xt + (j0 * M + 16 * b) * 2;
    if (partial) {
        _tile_loadd(6, src, M * 4);
        switch (b) {
            case 0: _tile_dpbf16ps(2, 0, 6); break;
            case 1: _tile_dpbf16ps(3, 0, 6); break;
            case 2: _tile_dpbf16ps(4, 0, 6); break;
            default: _tile_dpbf16ps(5, 0, 6); break;
        }
    } else {
        _tile_loadd(1, src, M * 4);
        switch (b) {
            case 0: _tile_dpbf16ps(2, 0, 1); break;
            case 1: _tile_dpbf16ps(3, 0, 1); break;
            case 2: _tile_dpbf16ps(4, 0, 1); break;
            default: _tile_dpbf16ps(5, 0, 1); break;
        }
    }
}

static inline void amx_store(int b, float *dst) {
    switch (b) {
        case 0: _tile_stored(2, dst, 64); _tile_zero(2); break;
        case 1: _tile_stored(3, dst, 64); _tile_zero(3); break;
        case 2: _tile_stored(4, dst, 64); _tile_zero(4); break;
        default: _tile_stored(5, dst, 64); _tile_zero(5); break;
    }
}

/* Unpack piece p (AMX_PIECE inputs or a group's remainder) of weight rows n0 .. n0+nr-1 into buf. */
static inline void amx_unpack_piece(const uint8_t *w, uint16_t (*buf)[16][32], int64_t n0, int64_t nr, int64_t K,
                                    int64_t k0, int64_t chunks) {
    for (int64_t r = 0; r < nr; r++) { /* each weight row's piece: one contiguous stream */
        const uint8_t *src = w + ((n0 + r) * K + k0) / 2;
        for (int64_t c = 0; c < chunks; c += 2) int4_unpack64(src + 16 * c, buf[c][r], buf[c + 1][r]);
    }
}

/* Output rows n0 .. n0+nr-1 (nr <= 16) for all M inputs.  A software pipeline over pieces of the
 * input axis with two A buffers: the tile products of piece p are issued, then piece p+1 is
 * unpacked (its stores drain and the products' latency passes meanwhile), then a group that
 * ends with piece p is scaled into the totals. */
static void int4_amx_block(const uint8_t *w, const uint16_t *scales, const uint16_t *zeros, const uint16_t *xt,
                           const float *xs, void *y, int64_t n0, int64_t nr, int64_t M, int64_t N, int64_t K,
                           int64_t G, int y_bf16, float *sf, float *cf) {
    const int64_t groups = K / G, blocks = (M + 15) / 16;
    const int64_t per_group = (G + AMX_PIECE - 1) / AMX_PIECE, pieces = groups * per_group;
    const int partial_last = (M % 16) != 0;
    uint16_t abuf[2][AMX_PIECE / 32][16][32] __attribute__((aligned(64)));
    float cbuf[16][16] __attribute__((aligned(64)));
    float total[16][AMX_MAX_ROWS] __attribute__((aligned(64))); /* [weight row][input row] */
    if (nr < 16) memset(abuf, 0, sizeof abuf);                   /* missing weight rows stay 0 */
    memset(total, 0, sizeof total);
    memset(cbuf, 0, sizeof cbuf); /* a partial block's store leaves its last columns untouched */
    for (int64_t r = 0; r < nr; r++) /* float scales s and zero terms z - 136 s of these rows, [r][g] */
        for (int64_t g = 0; g < groups; g++) {
            float s = bf16_to_f32(scales[(n0 + r) * groups + g]);
            sf[r * groups + g] = s;
            cf[r * groups + g] = bf16_to_f32(zeros[(n0 + r) * groups + g]) - 136.0f * s;
        }
    for (int64_t b = 0; b < blocks; b++) switch (b) {
            case 0: _tile_zero(2); break;
            case 1: _tile_zero(3); break;
            case 2: _tile_zero(4); break;
            default: _tile_zero(5); break;
        }
#define PIECE_AT(p, k0, chunks)                                                                  \
    const int64_t k0 = ((p) / per_group) * G + ((p) % per_group) * AMX_PIECE;                   \
    const int64_t chunks = (G - ((p) % per_group) * AMX_PIECE < AMX_PIECE ? G - ((p) % per_group) * AMX_PIECE \
                                                                          : AMX_PIECE) / 32;
    {
        PIECE_AT(0, k_first, chunks_first)
        amx_unpack_piece(w, abuf[0], n0, nr, K, k_first, chunks_first);
    }
    /* the next block's weights (the next 16 rows: contiguous bytes) into L2, spread over the
     * pieces, so the weight stream runs ahead of the arithmetic as one sequential read (from
     * DRAM, 8 rows: ~2.6 -> ~2.0 ms per 9216x3072 matrix on one core) */
    const char *next = (const char *)(w + (n0 + 16) * K / 2);
    const int64_t next_lines = n0 + 16 < N ? (N - n0 - 16 < 16 ? N - n0 - 16 : 16) * K / 128 : 0;
    const int64_t lines_per_piece = (next_lines + pieces - 1) / pieces;
    for (int64_t p = 0; p < pieces; p++) {
        PIECE_AT(p, k0, chunks)
        for (int64_t l = p * lines_per_piece; l < (p + 1) * lines_per_piece && l < next_lines; l++)
            _mm_prefetch(next + 64 * l, _MM_HINT_T1);
        for (int64_t c = 0; c < chunks; c++) {
            _tile_loadd(0, abuf[p & 1][c], 64);
            for (int64_t b = 0; b < blocks; b++) amx_dot((int)b, partial_last && b == blocks - 1, xt, (k0 + 32 * c) / 2, M);
        }
        if (p + 1 < pieces) {
            PIECE_AT(p + 1, k_next, chunks_next)
            amx_unpack_piece(w, abuf[(p + 1) & 1], n0, nr, K, k_next, chunks_next);
        }
        if ((p + 1) % per_group) continue;
        /* end of group g: scale the tile sums into the fp32 totals, add the zero-point term */
        const int64_t g = p / per_group;
        const float *xsg = xs + g * M;
        for (int64_t b = 0; b < blocks; b++) {
            amx_store((int)b, &cbuf[0][0]);
            const int64_t cols = M - 16 * b < 16 ? M - 16 * b : 16;
            const __mmask16 mask = (__mmask16)((1u << cols) - 1);
            const __m512 xsv = _mm512_maskz_loadu_ps(mask, xsg + 16 * b);
            for (int64_t r = 0; r < nr; r++) {
                __m512 t = _mm512_load_ps(&total[r][16 * b]);
                t = _mm512_fmadd_ps(_mm512_load_ps(cbuf[r]), _mm512_set1_ps(sf[r * groups + g]), t);
                _mm512_store_ps(&total[r][16 * b], _mm512_fmadd_ps(xsv, _mm512_set1_ps(cf[r * groups + g]), t));
            }
        }
    }
#undef PIECE_AT
    for (int64_t m = 0; m < M; m++)
        for (int64_t r = 0; r < nr; r++) store(y, m * N + n0 + r, total[r][m], y_bf16);
}

/* Returns 0 on success, -1 for shapes it does not take (G % 64, K % G, M out of 1..64). */
int phi3v_gemv_int4_amx(const uint8_t *w, const uint16_t *scales, const uint16_t *zeros, const uint16_t *xt,
                        const float *xs, void *y, int64_t M, int64_t N, int64_t K, int64_t G, int y_bf16,
                        int nthreads) {
    if (G % 64 || K % G || M < 1 || M > AMX_MAX_ROWS) return -1;
    const int64_t nblocks = (N + 15) / 16;
    int failed = 0;
#pragma omp parallel num_threads(nthreads) reduction(| : failed)
    {
        amx_configure(M); /* tile configuration is per thread */
        float *sf = malloc(sizeof(float) * 32 * (K / G)); /* this thread's block scales: 2 x (16, K/G) */
#pragma omp for schedule(static)
        for (int64_t i = 0; i < nblocks; i++) {
            int64_t n0 = i * 16, nr = N - n0 < 16 ? N - n0 : 16;
            if (sf) int4_amx_block(w, scales, zeros, xt, xs, y, n0, nr, M, N, K, G, y_bf16, sf, sf + 16 * (K / G));
        }
        if (!sf) failed = 1;
        free(sf);
        _tile_release();
    }
    return failed ? -1 : 0;
}
