/* Float32 linear layer y = x W^T + b for CPU, built for the decode batches of a serving engine.
 *
 * Why not oneDNN: at decode sizes (M = 1..64 rows) a step's GEMMs stream every weight from DRAM
 * (SmolLM2: 540 MB a step) and are compute-heavy at the same time (8.6 GFLOP at M = 32).
 * oneDNN's small-M kernels do the two one after the other: measured on the 2-core machines here,
 * all SmolLM2 linears at M = 32 took 55-60 ms where the weights alone need ~26 ms of DRAM time
 * and the FLOPs ~30 ms. This kernel overlaps them: while a thread computes panel p it prefetches
 * panel p + 1 into the cache, a slice per row tile, so DRAM streams under the FMAs.
 *
 * Layout. W [N, K] is packed once into panels of NR output columns: packed[p][k][j] =
 * W[p * NR + j][k] (zero past N), so a panel is one contiguous stream read front to back.
 * The micro-kernel keeps an R x NR block of outputs in registers (R <= MR rows) and, for each k,
 * loads NR weights and broadcasts one x value per row: AVX-512 NR = 48, MR = 8 (24 accumulators
 * of 32 registers); AVX2 NR = 16, MR = 6 (12 of 16). Threads split the panels (N), never K.
 *
 * Batch invariance: every output element is one FMA chain over k = 0..K-1 in order, started
 * from its bias (or zero). Which tile a row lands in, the batch size and the thread count change
 * none of that, so a row's result is bitwise the same alone or in any batch. This file must be
 * compiled without -ffast-math (no reassociation); -ffp-contract=fast gives the FMAs.
 */
#include <stdint.h>
#include <string.h>

#include <omp.h>
#if defined(__AVX__)
#include <immintrin.h>
#endif

#ifdef __AVX512F__
#define VW 16 /* floats per vector */
#define NV 3  /* vectors per panel row */
#define MR 8  /* most rows per tile */
#else
#define VW 8
#define NV 2
#define MR 6
#endif
#define NR (VW * NV) /* panel width (output columns) */

typedef float vf __attribute__((vector_size(VW * sizeof(float))));

int64_t linear_panel_width(void) { return NR; }

/* All lanes = s. Not `(vf){0} + s`: without fast math that is a real add (0 + -0 is +0), an
 * extra instruction per broadcast in the inner loop (and GCC then spills the accumulators). */
static inline __attribute__((always_inline)) vf splat(float s) {
#if VW == 16
    return (vf)_mm512_set1_ps(s);
#elif defined(__AVX__)
    return (vf)_mm256_set1_ps(s);
#else
    vf v;
    for (int i = 0; i < VW; i++)
        v[i] = s;
    return v;
#endif
}

/* out [ceil(N / NR), K, NR] <- w [N, K] row-major; out_bias [ceil(N / NR) * NR] <- bias [N]. */
void linear_pack_f32(float *out, float *out_bias, const float *w, const float *bias, int64_t n,
                     int64_t k) {
    int64_t panels = (n + NR - 1) / NR;
    for (int64_t p = 0; p < panels; p++) {
        float *dst = out + p * k * NR;
        for (int64_t j = 0; j < NR; j++) {
            int64_t col = p * NR + j;
            for (int64_t kk = 0; kk < k; kk++)
                dst[kk * NR + j] = col < n ? w[col * k + kk] : 0.0f;
            if (out_bias)
                out_bias[col] = col < n && bias ? bias[col] : 0.0f;
        }
    }
}

/* R rows x NR columns: y[i][0:ncols] = bias + sum_k x[i][k] * panel[k][:].
 * x rows are k apart; y rows are ldy apart. While computing, prefetches slice `tile` of `tiles`
 * contiguous slices of the next panel, one cache line at a time spread evenly over the k loop,
 * so the tiles of one panel together fetch all of it. Contiguous slices and even spacing beat
 * a strided burst (3 lines of every tiles-th panel row, the first version): all linears of a
 * step at 32 rows 72.8 -> 61.0 ms median on an AVX-512 Xeon VM, same at 1 row; the hardware
 * streamer can follow a contiguous run, and a steady trickle never fills the line-fill buffers.
 * next == NULL: nothing to prefetch. */
static inline __attribute__((always_inline)) void tile_rows(
    const int R, const float *x, const float *panel, const float *bias, int64_t k, float *y,
    int64_t ldy, int64_t ncols, const char *next, int64_t tiles, int64_t tile) {
    vf acc[MR][NV];
    for (int i = 0; i < R; i++)
        for (int j = 0; j < NV; j++) {
            if (bias)
                memcpy(&acc[i][j], bias + j * VW, sizeof(vf));
            else
                acc[i][j] = (vf){0};
        }
    /* This tile's slice: `count` lines from line `first` of the panel's k * NR * 4 / 64. One
     * line is due each time `due` (+= count per k) passes k: a Bresenham step, no division per
     * k; `left` of them are still to issue. */
    const int64_t lines = k * NR * (int64_t)sizeof(float) / 64, per = (lines + tiles - 1) / tiles;
    const int64_t first = tile * per;
    int64_t left = next && first < lines ? (lines - first < per ? lines - first : per) : 0;
    const char *line = next ? next + first * 64 : NULL;
    const int64_t count = left;
    int64_t due = 0;
    for (int64_t kk = 0; kk < k; kk++) {
        const float *wk = panel + kk * NR;
        if (left > 0) {
            for (due += count; due >= k && left > 0; due -= k, left--, line += 64)
                __builtin_prefetch(line, 0, 1); /* prefetcht2: t0/t1/t2 measured alike */
        }
        vf w[NV];
        for (int j = 0; j < NV; j++)
            memcpy(&w[j], wk + j * VW, sizeof(vf));
        for (int i = 0; i < R; i++) {
            vf xb = splat(x[i * k + kk]);
            for (int j = 0; j < NV; j++)
                acc[i][j] += xb * w[j];
        }
    }
    for (int i = 0; i < R; i++) {
        if (ncols == NR) /* a constant size: vector stores, not a call to memcpy */
            memcpy(y + i * ldy, acc[i], sizeof(acc[i]));
        else
            memcpy(y + i * ldy, acc[i], (size_t)ncols * sizeof(float));
    }
}

typedef void (*tile_fn)(const float *, const float *, const float *, int64_t, float *, int64_t,
                        int64_t, const char *, int64_t, int64_t);

#define TILE(R)                                                                                   \
    static void tile_##R(const float *x, const float *panel, const float *bias, int64_t k,       \
                         float *y, int64_t ldy, int64_t ncols, const char *next, int64_t tiles,  \
                         int64_t tile) {                                                          \
        tile_rows(R, x, panel, bias, k, y, ldy, ncols, next, tiles, tile);                        \
    }
TILE(1) TILE(2) TILE(3) TILE(4) TILE(5) TILE(6)
#if MR > 6
TILE(7) TILE(8)
#endif
static const tile_fn TILES[MR + 1] = {
    NULL, tile_1, tile_2, tile_3, tile_4, tile_5, tile_6,
#if MR > 6
    tile_7, tile_8,
#endif
};

/* y [M, N] = x [M, K] @ W^T (+ bias). packed, bias_packed: from linear_pack_f32 (bias may be
 * NULL). Rows are split into ceil(M / MR) tiles of near-equal size; each thread takes a
 * contiguous range of panels and runs every tile over each of its panels while the next panel
 * streams in. */
void linear_f32(float *y, const float *x, const float *packed, const float *bias_packed,
                int64_t m, int64_t n, int64_t k, int num_threads) {
    if (m <= 0 || n <= 0)
        return;
    int64_t panels = (n + NR - 1) / NR;
    int64_t tiles = (m + MR - 1) / MR;
#pragma omp parallel num_threads(num_threads)
    {
        int nt = omp_get_num_threads(), tid = omp_get_thread_num();
        int64_t p0 = panels * tid / nt, p1 = panels * (tid + 1) / nt;
        for (int64_t p = p0; p < p1; p++) {
            const float *panel = packed + p * k * NR;
            const float *bias = bias_packed ? bias_packed + p * NR : NULL;
            const char *next = p + 1 < p1 ? (const char *)(panel + k * NR) : NULL;
            int64_t ncols = n - p * NR < NR ? n - p * NR : NR;
            int64_t m0 = 0;
            for (int64_t t = 0; t < tiles; t++) {
                int64_t rows = (m - m0 + (tiles - t) - 1) / (tiles - t); /* ceil: balanced */
                TILES[rows](x + m0 * k, panel, bias, k, y + m0 * n + p * NR, n, ncols, next,
                            tiles, t);
                m0 += rows;
            }
        }
    }
}
