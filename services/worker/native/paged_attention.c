/* Paged attention for float32 on CPU: each query row attends to the first row_len tokens of
 * its sequence, K/V read straight from the paged cache through the block table (no gather into
 * a contiguous copy). A decode token is a row whose context is its whole sequence; a prefill
 * chunk's token at position p is a row whose context is the sequence's first p + 1 tokens (the
 * causal mask). Both run the same per-row arithmetic (attn_head.h), so a token's attention
 * output is bitwise the same however its prompt was chunked and whatever else is in the batch.
 *
 * Why native: the torch path copies every sequence's K/V out of the pool (index_select) and then
 * runs SDPA over the copy, i.e. each KV byte crosses memory three times per layer and step. Here
 * each byte is read once. Built and loaded by paged_attention.py (ctypes); the torch path
 * (attention.py) is the reference it is tested against.
 *
 * Layouts (all contiguous, row-major):
 *   q           [T, Hq, D]          one query row per token
 *   k_cache     [NB, BS, Hkv, D]    (one layer's K half of the pool; v_cache likewise)
 *   block_table [S, max_blocks]     int64 block ids per sequence
 *   row_table   [T]                 int64 the sequence (block_table row) of each query row;
 *                                   NULL: row i reads table row i (a decode batch)
 *   row_len     [T]                 int64 tokens the row attends to, in [1, max_blocks * BS]
 *   out         [T, Hq, D]
 * The G = Hq / Hkv query heads of a KV head are consecutive (head h reads KV head h / G).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "attn_head.h"

/* Consecutive rows of one sequence (a prefill chunk) are worked on together, block by block,
 * so each K/V block is read from memory once for up to TILE_ROWS rows (then from L1). */
#define TILE_ROWS 8

/* Prefetching the block two ahead into L2 overlaps its misses with the current block's
 * arithmetic: blocks sit at scattered addresses and one head's rows are 1/Hkv of each block's
 * bytes, a pattern the hardware prefetchers do not follow across blocks. 34 -> 23 ms per step
 * for all 30 layers of SmolLM2 at 32 sequences of ~275 tokens (AVX2 path, measured). */
#define PREFETCH_AHEAD 2

static int max_isa = ISA_AVX512;

/* Caps the ISA path (tests run every path on one machine); returns the previous cap. */
int paged_attention_set_max_isa(int isa) {
    const int before = max_isa;
    max_isa = isa;
    return before;
}

/* Which path serves a shape here: ISA_AVX512, ISA_AVX2 or ISA_SCALAR. */
int paged_attention_isa(int64_t head_dim, int64_t block_size) {
#if defined(__AVX512F__)
    if (max_isa >= ISA_AVX512 && head_dim % 64 == 0 && block_size % 16 == 0) return ISA_AVX512;
#endif
#if defined(__AVX2__) && defined(__FMA__)
    if (max_isa >= ISA_AVX2 && head_dim % 32 == 0 && block_size % 8 == 0) return ISA_AVX2;
#endif
    (void)head_dim; (void)block_size;
    return ISA_SCALAR;
}

/* Portable path: one (row, KV head) per item, plain loops; any head_dim / block_size within
 * the limits. */
static void rows_scalar(float *out, const float *q, const float *k_cache, const float *v_cache,
                        const int64_t *block_table, const int64_t *row_table,
                        const int64_t *row_len, int64_t num_rows, int64_t num_heads,
                        int64_t num_kv_heads, int64_t head_dim, int64_t block_size,
                        int64_t max_blocks, float scale, int num_threads) {
    const int64_t group = num_heads / num_kv_heads;
    const int64_t token_stride = num_kv_heads * head_dim;      /* floats between tokens */
    const int64_t block_stride = block_size * token_stride;    /* floats between blocks */
    const int64_t work = num_rows * num_kv_heads;

#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads)
    for (int64_t item = 0; item < work; item++) {
        const int64_t b = item / num_kv_heads, h = item % num_kv_heads;
        const int64_t len = row_len[b];
        const int64_t *table = block_table + (row_table ? row_table[b] : b) * max_blocks;
        const float *qh = q + (b * num_heads + h * group) * head_dim;  /* [G, D] */
        float acc[MAX_GROUP][MAX_DIM];
        float qs[MAX_GROUP][MAX_DIM];
        float s[MAX_GROUP][MAX_BLOCK];  /* this block's scores, then probabilities */
        float m[MAX_GROUP], l[MAX_GROUP];
        for (int64_t g = 0; g < group; g++) {
            m[g] = NEG_BIG;
            l[g] = 0.0f;
            for (int64_t d = 0; d < head_dim; d++) {
                acc[g][d] = 0.0f;
                qs[g][d] = qh[g * head_dim + d] * scale;
            }
        }
        for (int64_t start = 0; start < len; start += block_size) {
            const int64_t n = len - start < block_size ? len - start : block_size;
            const int64_t blk = table[start / block_size];
            const float *kb = k_cache + blk * block_stride + h * head_dim;
            const float *vb = v_cache + blk * block_stride + h * head_dim;
            for (int64_t t = 0; t < n; t++) {
                const float *kt = kb + t * token_stride;
                for (int64_t g = 0; g < group; g++) {
                    float dot = 0.0f;
                    for (int64_t d = 0; d < head_dim; d++) dot += qs[g][d] * kt[d];
                    s[g][t] = dot;
                }
            }
            /* online softmax: rescale what came before by exp(m_old - m_new) */
            for (int64_t g = 0; g < group; g++) {
                float bmax = m[g];
                for (int64_t t = 0; t < n; t++) bmax = s[g][t] > bmax ? s[g][t] : bmax;
                const float correction = expf(m[g] - bmax);
                float sum = 0.0f;
                for (int64_t t = 0; t < n; t++) {
                    s[g][t] = expf(s[g][t] - bmax);
                    sum += s[g][t];
                }
                l[g] = l[g] * correction + sum;
                m[g] = bmax;
                for (int64_t d = 0; d < head_dim; d++) acc[g][d] *= correction;
            }
            for (int64_t t = 0; t < n; t++) {
                const float *vt = vb + t * token_stride;
                for (int64_t g = 0; g < group; g++) {
                    const float p = s[g][t];
                    for (int64_t d = 0; d < head_dim; d++) acc[g][d] += p * vt[d];
                }
            }
        }
        float *oh = out + (b * num_heads + h * group) * head_dim;
        for (int64_t g = 0; g < group; g++) {
            const float inv = l[g] > 0.0f ? 1.0f / l[g] : 0.0f;
            for (int64_t d = 0; d < head_dim; d++) oh[g * head_dim + d] = acc[g][d] * inv;
        }
    }
}

#if defined(__AVX2__) && defined(__FMA__)
/* pk, pv: where this head's rows of the block PREFETCH_AHEAD on start (NULL: none). */
static inline void head_block(int isa, head_state *st, const float *kb, const float *vb,
                              int64_t n, int64_t group, int64_t head_dim, int64_t block_size,
                              int64_t token_stride, int64_t sp, const float *pk,
                              const float *pv) {
#if defined(__AVX512F__)
    if (isa == ISA_AVX512) {
        head_block_avx512(st, kb, vb, n, group, head_dim, block_size, token_stride, sp, pk, pv);
        return;
    }
#endif
    (void)isa;
    head_block_avx2(st, kb, vb, n, group, head_dim, block_size, token_stride, sp, pk, pv);
}

/* Vector paths. Work items are tiles (consecutive rows of one sequence, up to TILE_ROWS; a
 * decode row is a tile of one), with all KV heads when there are enough tiles to share out (two
 * per thread or more), else (tile, KV head) pairs. A whole-tile item walks each block once for
 * all its KV heads, so it reads the block's K (and V) rows as one contiguous run that the
 * hardware prefetchers follow; a (tile, head) item reads every Hkv-th slice of it. Read-only
 * loops over the two patterns: 18.0 vs 21.7 ms for SmolLM2's 30 layers at 32 sequences of ~275
 * tokens (measured on the AVX-512 Xeon). Either way each row's arithmetic is the same.
 * Returns 0, or 2 when scratch could not be allocated. */
static int rows_vector(int isa, float *out, const float *q, const float *k_cache,
                       const float *v_cache, const int64_t *block_table,
                       const int64_t *row_table, const int64_t *row_len, int64_t num_rows,
                       int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                       int64_t block_size, int64_t max_blocks, float scale, int num_threads) {
    const int64_t group = num_heads / num_kv_heads;
    const int64_t token_stride = num_kv_heads * head_dim;
    const int64_t block_stride = block_size * token_stride;
    const int64_t sp = (block_size + 15) / 16 * 16;
    const int64_t state_floats = head_state_floats(group, head_dim, sp);

    /* tiles[i] .. tiles[i + 1]: rows of tile i */
    int64_t *tiles = malloc((size_t)(num_rows + 1) * sizeof(int64_t));
    if (tiles == NULL) return 2;
    int64_t num_tiles = 0;
    for (int64_t r = 0; r < num_rows; r++) {
        const int same = row_table && r > 0 && row_table[r] == row_table[r - 1];
        if (!same || r - tiles[num_tiles - 1] == TILE_ROWS) tiles[num_tiles++] = r;
    }
    tiles[num_tiles] = num_rows;

    const int per_tile = num_tiles >= 2 * (int64_t)num_threads;
    const int64_t work = per_tile ? num_tiles : num_tiles * num_kv_heads;
    const int64_t heads = per_tile ? num_kv_heads : 1; /* KV heads per item */
    int failed = 0;

#pragma omp parallel num_threads(num_threads)
    {
        float *mem = aligned_alloc(64, (size_t)(heads * TILE_ROWS * state_floats) * sizeof(float));
        head_state st[TILE_ROWS * MAX_GROUP]; /* [heads][TILE_ROWS]; heads <= Hkv <= Hq */
        head_state *states = heads <= MAX_GROUP ? st : malloc(
            (size_t)(heads * TILE_ROWS) * sizeof(head_state));
        if (mem == NULL || states == NULL) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t item = 0; item < work; item++) {
            if (mem == NULL || states == NULL)
                continue;
            const int64_t t = per_tile ? item : item / num_kv_heads;
            const int64_t h0 = per_tile ? 0 : item % num_kv_heads;
            const int64_t r0 = tiles[t], nr = tiles[t + 1] - r0;
            const int64_t *table = block_table + (row_table ? row_table[r0] : r0) * max_blocks;
            int64_t len = 0, longest = 0; /* the tile's longest context, and its row */
            for (int64_t r = 0; r < nr; r++)
                if (row_len[r0 + r] > len) len = row_len[r0 + r], longest = r;
            for (int64_t j = 0; j < heads; j++)
                for (int64_t r = 0; r < nr; r++) {
                    head_state *s = &states[j * TILE_ROWS + r];
                    head_bind(s, mem + (j * TILE_ROWS + r) * state_floats, group, head_dim, sp);
                    head_init(s, q + ((r0 + r) * num_heads + (h0 + j) * group) * head_dim,
                              group, head_dim, scale);
                }
            for (int64_t start = 0; start < len; start += block_size) {
                const int64_t blk = table[start / block_size];
                const int ahead = start + PREFETCH_AHEAD * block_size < len;
                for (int64_t j = 0; j < heads; j++) {
                    /* one head's rows at a time (a whole block's worth of prefetches at once
                     * fills the core's miss queue and stalls it), by the row that reads the
                     * most blocks */
                    const int64_t off = blk * block_stride + (h0 + j) * head_dim;
                    const int64_t pf = ahead ? table[start / block_size + PREFETCH_AHEAD] *
                                                   block_stride + (h0 + j) * head_dim : 0;
                    for (int64_t r = 0; r < nr; r++) {
                        const int64_t left = row_len[r0 + r] - start;
                        if (left <= 0) continue; /* this row's context ended earlier */
                        const int fetches = r == longest && ahead;
                        head_block(isa, &states[j * TILE_ROWS + r], k_cache + off,
                                   v_cache + off, left < block_size ? left : block_size,
                                   group, head_dim, block_size, token_stride, sp,
                                   fetches ? k_cache + pf : NULL, fetches ? v_cache + pf : NULL);
                    }
                }
            }
            for (int64_t j = 0; j < heads; j++)
                for (int64_t r = 0; r < nr; r++)
                    head_finish(&states[j * TILE_ROWS + r],
                                out + ((r0 + r) * num_heads + (h0 + j) * group) * head_dim,
                                group, head_dim);
        }
        free(mem);
        if (states != st) free(states);
    }
    free(tiles);
    return failed ? 2 : 0;
}
#endif

/* Returns 0 on success, 1 when a size exceeds the limits above, 2 when scratch could not be
 * allocated. */
int paged_attention_rows_f32(float *out, const float *q, const float *k_cache,
                             const float *v_cache, const int64_t *block_table,
                             const int64_t *row_table, const int64_t *row_len, int64_t num_rows,
                             int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                             int64_t block_size, int64_t max_blocks, float scale,
                             int num_threads) {
    if (num_heads / num_kv_heads > MAX_GROUP || head_dim > MAX_DIM || block_size > MAX_BLOCK)
        return 1;
    if (num_rows == 0)
        return 0;
    const int isa = paged_attention_isa(head_dim, block_size);
#if defined(__AVX2__) && defined(__FMA__)
    if (isa != ISA_SCALAR)
        return rows_vector(isa, out, q, k_cache, v_cache, block_table, row_table, row_len,
                           num_rows, num_heads, num_kv_heads, head_dim, block_size, max_blocks,
                           scale, num_threads);
#endif
    (void)isa;
    rows_scalar(out, q, k_cache, v_cache, block_table, row_table, row_len, num_rows, num_heads,
                num_kv_heads, head_dim, block_size, max_blocks, scale, num_threads);
    return 0;
}

/* Decode: one row per sequence, row i reading table row i up to seq_lens[i]. */
int paged_decode_attention_f32(float *out, const float *q, const float *k_cache,
                               const float *v_cache, const int64_t *block_table,
                               const int64_t *seq_lens, int64_t num_seqs, int64_t num_heads,
                               int64_t num_kv_heads, int64_t head_dim, int64_t block_size,
                               int64_t max_blocks, float scale, int num_threads) {
    return paged_attention_rows_f32(out, q, k_cache, v_cache, block_table, NULL, seq_lens,
                                    num_seqs, num_heads, num_kv_heads, head_dim, block_size,
                                    max_blocks, scale, num_threads);
}

/* Scatters n new K and V rows (row_elems floats each: Hkv * D) into the paged cache halves at
 * flat slot indices (block * block_size + offset). Source row i starts at k + i * k_stride (and
 * v + i * v_stride): k and v may be row views of a wider tensor (v of the fused qkv projection).
 * One copy per row: torch's index_copy_ costs ~20-40 us per call here, mostly dispatch and thread
 * wake-up, for a few KB of data. */
void paged_kv_write_f32(float *k_cache, float *v_cache, const float *k, const float *v,
                        const int64_t *slots, int64_t n, int64_t row_elems, int64_t k_stride,
                        int64_t v_stride) {
    const size_t bytes = (size_t)row_elems * sizeof(float);
#if defined(__AVX2__) && defined(__FMA__)
    /* Streaming stores: the destination lines are cold (the pool is far larger than the
     * caches), and a normal store first reads each line from memory. */
    if (row_elems % 8 == 0 && ((uintptr_t)k_cache | (uintptr_t)v_cache) % 32 == 0) {
        for (int64_t i = 0; i < n; i++) {
            float *kd = k_cache + slots[i] * row_elems, *vd = v_cache + slots[i] * row_elems;
            const float *ks = k + i * k_stride, *vs = v + i * v_stride;
            for (int64_t j = 0; j < row_elems; j += 8) {
                _mm256_stream_ps(kd + j, _mm256_loadu_ps(ks + j));
                _mm256_stream_ps(vd + j, _mm256_loadu_ps(vs + j));
            }
        }
        _mm_sfence();  /* the attention call that follows reads these rows */
        return;
    }
#endif
    for (int64_t i = 0; i < n; i++) {
        memcpy(k_cache + slots[i] * row_elems, k + i * k_stride, bytes);
        memcpy(v_cache + slots[i] * row_elems, v + i * v_stride, bytes);
    }
}
