/* The exported decode-attention entry point, shared by both builds: include it after the
 * build's `attend_one_head` (one query head over `length` cached keys/values).  Heads are split over
 * the OpenMP team; each thread has its own score scratch of `length` floats. */
#ifndef PHI3V_NATIVE_ATTENTION_DRIVER_H
#define PHI3V_NATIVE_ATTENTION_DRIVER_H

int phi3v_decode_attention(const uint16_t *q, const uint16_t *k, const uint16_t *v, const uint8_t *valid,
                           int64_t valid_stride, uint16_t *out, int64_t B, int64_t H, int64_t KVH, int64_t cap,
                           int64_t D, int64_t length, float scale, int nthreads) {
    if (D > 256 || H % KVH || length < 1 || length > cap) return -1;
    const int64_t group = H / KVH;
    int failed = 0;
#pragma omp parallel num_threads(nthreads) reduction(| : failed)
    {
        float *scores = (float *)malloc(sizeof(float) * (size_t)(length + 16)); /* this thread's scratch */
#pragma omp for schedule(static)
        for (int64_t bh = 0; bh < B * H; bh++) {
            int64_t b = bh / H, h = bh % H, kvh = h / group;
            const uint16_t *kb = k + (b * KVH + kvh) * cap * D, *vb = v + (b * KVH + kvh) * cap * D;
            const uint8_t *vrow = valid ? valid + b * valid_stride : NULL;
            if (!scores)
                failed = 1;
            else if (D == 96) /* Phi-3's head size: constant trip counts keep the sums in registers */
                attend_one_head(q + bh * D, kb, vb, out + bh * D, 96, length, scale, vrow, scores);
            else
                attend_one_head(q + bh * D, kb, vb, out + bh * D, D, length, scale, vrow, scores);
        }
        free(scores);
    }
    return failed ? -2 : 0;
}

#endif
