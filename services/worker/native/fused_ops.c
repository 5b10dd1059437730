/* Fused elementwise ops of a decoder layer for float32 on CPU: residual add + RMSNorm, SwiGLU,
 * and RoPE that writes q and k as separate contiguous tensors.
 *
 * Why native: at decode batch sizes each of these is a few torch ops on a few KB per row, and
 * their cost is dispatch, temporaries and extra passes over memory, not arithmetic. Measured on
 * the 2-core machine at 32 decode rows of SmolLM2 (30 layers): norms 6.1 ms, RoPE 3.5 ms, SwiGLU
 * 3.2 ms of a ~100 ms step. Each row is computed by the same loop whatever the batch, so a row's
 * result does not depend on what else is in the batch (batch invariance). The torch versions in
 * layers.py / rope.py are the references the tests compare these with.
 *
 * Plain loops: -O3 -march=native -ffast-math vectorizes them (expf through libmvec). Rows are
 * split over threads only when a step has enough of them to pay for waking a thread.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

/* Rows below which a call stays on the calling thread (measured: waking the second thread costs
 * about what 8 rows of RMSNorm at hidden 576 do). */
#define PARALLEL_ROWS 8

/* out_res = x + res (when res is given); out = out_res * rsqrt(mean(out_res^2) + eps) * w.
 * x, res, out_res, out: [rows, dim] contiguous; w: [dim]. res and out_res may be NULL together
 * (a plain norm of x). */
void add_rms_norm_f32(float *out, float *out_res, const float *x, const float *res,
                      const float *w, int64_t rows, int64_t dim, float eps, int num_threads) {
#pragma omp parallel for schedule(static) num_threads(num_threads) if (rows >= PARALLEL_ROWS)
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * dim;
        float *o = out + r * dim;
        const float *src = xr;
        if (res) {
            const float *rr = res + r * dim;
            float *s = out_res + r * dim;
            for (int64_t i = 0; i < dim; i++) s[i] = xr[i] + rr[i];
            src = s;
        }
        float ss = 0.0f;
        for (int64_t i = 0; i < dim; i++) ss += src[i] * src[i];
        const float inv = 1.0f / sqrtf(ss / (float)dim + eps);
        for (int64_t i = 0; i < dim; i++) o[i] = src[i] * inv * w[i];
    }
}

/* out[r, i] = silu(x[r, i]) * x[r, inter + i]; x: [rows, 2 * inter], out: [rows, inter]. */
void silu_and_mul_f32(float *out, const float *x, int64_t rows, int64_t inter,
                      int num_threads) {
#pragma omp parallel for schedule(static) num_threads(num_threads) if (rows >= PARALLEL_ROWS)
    for (int64_t r = 0; r < rows; r++) {
        const float *g = x + r * 2 * inter, *u = g + inter;
        float *o = out + r * inter;
        for (int64_t i = 0; i < inter; i++) o[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
    }
}

/* Rotates the q and k heads of each row of the fused qkv projection into q_out and k_out.
 *
 * qkv: [rows, row_stride] (q heads, then k heads, then v; v is not touched);
 * cos, sin: [rows, rot / 2], this row's position already looked up;
 * q_out: [rows, hq, d]; k_out: [rows, hkv, d], contiguous.
 * "Rotate half" layout: dims i and i + rot/2 form a pair (i < rot/2); dims past rot are copied.
 */
void rope_qk_f32(float *q_out, float *k_out, const float *qkv, const float *cos,
                 const float *sin, int64_t rows, int64_t row_stride, int64_t hq, int64_t hkv,
                 int64_t d, int64_t rot, int num_threads) {
    const int64_t half = rot / 2;
#pragma omp parallel for schedule(static) num_threads(num_threads) if (rows >= PARALLEL_ROWS)
    for (int64_t r = 0; r < rows; r++) {
        const float *c = cos + r * half, *s = sin + r * half;
        for (int64_t h = 0; h < hq + hkv; h++) {
            const float *x = qkv + r * row_stride + h * d;
            float *o = h < hq ? q_out + (r * hq + h) * d : k_out + (r * hkv + h - hq) * d;
            for (int64_t i = 0; i < half; i++) {
                const float x1 = x[i], x2 = x[i + half];
                o[i] = x1 * c[i] - x2 * s[i];
                o[i + half] = x2 * c[i] + x1 * s[i];
            }
            if (rot < d) memcpy(o + rot, x + rot, (size_t)(d - rot) * sizeof(float));
        }
    }
}
