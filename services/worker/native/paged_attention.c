/* Paged decode attention for float32 on CPU: one query token per sequence, K/V read straight
 * from the paged cache through the block table (no gather into a contiguous copy).
 *
 * Why native: the torch path copies every sequence's K/V out of the pool (index_select) and then
 * runs SDPA over the copy, i.e. each KV byte crosses memory three times per layer and step. Here
 * each byte is read once. Built and loaded by paged_attention.py (ctypes); the torch path
 * (attention.py) is the reference it is tested against.
 *
 * Layouts (all contiguous, row-major):
 *   q           [B, Hq, D]
 *   k_cache     [NB, BS, Hkv, D]   (one layer's K half of the pool; v_cache likewise)
 *   block_table [B, max_blocks]    int64 block ids
 *   seq_lens    [B]                int64 context length (tokens to attend to, the new one included)
 *   out         [B, Hq, D]
 * The G = Hq / Hkv query heads of a KV head are consecutive (head h reads KV head h / G).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_GROUP 16   /* query heads per KV head */
#define MAX_DIM 256    /* head_dim */
#define MAX_BLOCK 64   /* tokens per block */

/* Running max starts here instead of -inf: the library is built with -ffast-math (finite math),
 * which vectorizes exp via libmvec; exp(NEG_BIG - x) underflows to 0 exactly like exp(-inf). */
#define NEG_BIG (-1e30f)

/* Portable path: any head_dim / block_size within the limits. */
static void decode_scalar(float *out, const float *q, const float *k_cache,
                               const float *v_cache, const int64_t *block_table,
                               const int64_t *seq_lens, int64_t num_seqs, int64_t num_heads,
                               int64_t num_kv_heads, int64_t head_dim, int64_t block_size,
                               int64_t max_blocks, float scale, int num_threads) {
    const int64_t group = num_heads / num_kv_heads;
    const int64_t token_stride = num_kv_heads * head_dim;      /* floats between tokens */
    const int64_t block_stride = block_size * token_stride;    /* floats between blocks */
    const int64_t work = num_seqs * num_kv_heads;

#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads)
    for (int64_t item = 0; item < work; item++) {
        const int64_t b = item / num_kv_heads, h = item % num_kv_heads;
        const int64_t len = seq_lens[b];
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
            const int64_t blk = block_table[b * max_blocks + start / block_size];
            const float *kb = k_cache + blk * block_stride + h * head_dim;
            const float *vb = v_cache + blk * block_stride + h * head_dim;
            /* scores: each K row is loaded once and dotted with the G queries */
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
            /* weighted values: each V row is loaded once for the G queries */
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
#include <immintrin.h>

/* [sum(v0), ..., sum(v7)]: eight horizontal sums with six hadds and a lane swap. */
static inline __m256 hsum8(__m256 v0, __m256 v1, __m256 v2, __m256 v3, __m256 v4, __m256 v5,
                           __m256 v6, __m256 v7) {
    const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(v0, v1), _mm256_hadd_ps(v2, v3));
    const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(v4, v5), _mm256_hadd_ps(v6, v7));
    /* u0 = [v0..v3 low-half sums | v0..v3 high-half sums]; likewise u1 for v4..v7 */
    return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20),
                         _mm256_permute2f128_ps(u0, u1, 0x31));
}

/* Decode attention reads each K/V row once, so it runs at the speed memory delivers rows.
 * Blocks sit at scattered addresses and one head's rows are 1/Hkv of each block's bytes (a
 * strided pattern the hardware prefetchers do not follow across blocks): left alone, a core waits
 * on each block's misses and reads ~6 GB/s. Prefetching the block two ahead into L2 overlaps
 * those misses with the current block's arithmetic: 34 -> 23 ms per step for all 30 layers of
 * SmolLM2 at 32 sequences of ~275 tokens on the 2-core machine (L1 hints and one block ahead
 * gave less; measured). */
#define PREFETCH_AHEAD 2

/* Prefetches into L2 the rows of block `blk` that a work item reads: each token's `width` floats
 * starting `offset` floats into the row (one KV head, or all of them). */
static inline void prefetch_rows(const float *k_cache, const float *v_cache, int64_t blk,
                                 int64_t block_stride, int64_t token_stride, int64_t offset,
                                 int64_t width, int64_t block_size) {
    const char *k = (const char *)(k_cache + blk * block_stride + offset);
    const char *v = (const char *)(v_cache + blk * block_stride + offset);
    const int64_t row = token_stride * (int64_t)sizeof(float);
    for (int64_t t = 0; t < block_size; t++)
        for (int64_t off = 0; off < width * (int64_t)sizeof(float); off += 64) {
            _mm_prefetch(k + t * row + off, _MM_HINT_T1);
            _mm_prefetch(v + t * row + off, _MM_HINT_T1);
        }
}

/* Online-softmax state of one KV head's G queries over the blocks read so far. */
typedef struct {
    float qs[MAX_GROUP][MAX_DIM] __attribute__((aligned(32))); /* q * scale */
    float acc[MAX_GROUP][MAX_DIM] __attribute__((aligned(32)));
    float s[MAX_GROUP][MAX_BLOCK] __attribute__((aligned(32))); /* a block's scores, then p */
    float m[MAX_GROUP], l[MAX_GROUP], corr[MAX_GROUP];
} head_state;

static inline void head_init(head_state *st, const float *qh, int64_t group, int64_t head_dim,
                             float scale) {
    for (int64_t g = 0; g < group; g++) {
        st->m[g] = NEG_BIG;
        st->l[g] = 0.0f;
        for (int64_t d = 0; d < head_dim; d++) {
            st->qs[g][d] = qh[g * head_dim + d] * scale;
            st->acc[g][d] = 0.0f;
        }
    }
}

/* For G queries (G <= 3): acc[g] = acc[g] * corr[g] + sum_{t < n} s[g][t] * v_t, 32 dims a
 * pass. v_t = vb + t * token_stride; dv = head_dim / 8. Keeping the whole group's accumulators
 * in registers reads each V row once for all G queries and gives G * 4 independent FMA chains
 * (one query at a time leaves 4, bound by FMA latency). */
static inline __attribute__((always_inline)) void v_update(
    const int G, float (*acc)[MAX_DIM], float (*s)[MAX_BLOCK], const float *corr,
    const float *vb, int64_t token_stride, int64_t n, int64_t dv) {
    for (int64_t c0 = 0; c0 < dv; c0 += 4) {
        __m256 r[3][4];
        for (int g = 0; g < G; g++) {
            const __m256 cv = _mm256_set1_ps(corr[g]);
            for (int c = 0; c < 4; c++)
                r[g][c] = _mm256_mul_ps(_mm256_load_ps(&acc[g][(c0 + c) * 8]), cv);
        }
        for (int64_t t = 0; t < n; t++) {
            const float *vt = vb + t * token_stride + c0 * 8;
            for (int g = 0; g < G; g++) {
                const __m256 p = _mm256_set1_ps(s[g][t]);
                for (int c = 0; c < 4; c++)
                    r[g][c] = _mm256_fmadd_ps(p, _mm256_loadu_ps(vt + c * 8), r[g][c]);
            }
        }
        for (int g = 0; g < G; g++)
            for (int c = 0; c < 4; c++)
                _mm256_store_ps(&acc[g][(c0 + c) * 8], r[g][c]);
    }
}

/* Folds one block (n valid rows of block_size at kb / vb) into a head's state. Scores are
 * computed for the whole block; those of rows past the sequence end (stale or zero memory) are
 * overwritten with NEG_BIG before the softmax, and the value sum stops at the sequence end, so
 * stale rows never reach the output, whatever they hold. */
static inline void head_block(head_state *st, const float *kb, const float *vb, int64_t n,
                              int64_t group, int64_t head_dim, int64_t block_size,
                              int64_t token_stride) {
    const int64_t dv = head_dim / 8; /* vectors per row */
    /* scores, 8 tokens at a time: 8 independent FMA chains, then one 8-way reduction */
    for (int64_t g = 0; g < group; g++) {
        for (int64_t t0 = 0; t0 < block_size; t0 += 8) {
            __m256 a[8];
            for (int j = 0; j < 8; j++) a[j] = _mm256_setzero_ps();
            for (int64_t c = 0; c < dv; c++) {
                const __m256 qv = _mm256_load_ps(&st->qs[g][c * 8]);
                for (int j = 0; j < 8; j++)
                    a[j] = _mm256_fmadd_ps(
                        qv, _mm256_loadu_ps(kb + (t0 + j) * token_stride + c * 8), a[j]);
            }
            _mm256_store_ps(&st->s[g][t0], hsum8(a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]));
        }
        for (int64_t t = n; t < block_size; t++) st->s[g][t] = NEG_BIG;
    }
    /* online softmax (the compiler vectorizes exp through libmvec) */
    for (int64_t g = 0; g < group; g++) {
        float bmax = st->m[g];
        for (int64_t t = 0; t < block_size; t++) bmax = st->s[g][t] > bmax ? st->s[g][t] : bmax;
        const float correction = expf(st->m[g] - bmax);
        float sum = 0.0f;
        for (int64_t t = 0; t < block_size; t++) {
            st->s[g][t] = expf(st->s[g][t] - bmax);
            sum += st->s[g][t];
        }
        st->l[g] = st->l[g] * correction + sum;
        st->m[g] = bmax;
        st->corr[g] = correction;
    }
    switch (group) {
    case 1: v_update(1, st->acc, st->s, st->corr, vb, token_stride, n, dv); break;
    case 2: v_update(2, st->acc, st->s, st->corr, vb, token_stride, n, dv); break;
    case 3: v_update(3, st->acc, st->s, st->corr, vb, token_stride, n, dv); break;
    default:
        for (int64_t g = 0; g < group; g++)
            v_update(1, st->acc + g, st->s + g, st->corr + g, vb, token_stride, n, dv);
    }
}

static inline void head_finish(const head_state *st, float *oh, int64_t group,
                               int64_t head_dim) {
    for (int64_t g = 0; g < group; g++) {
        const float inv = st->l[g] > 0.0f ? 1.0f / st->l[g] : 0.0f;
        for (int64_t d = 0; d < head_dim; d++) oh[g * head_dim + d] = st->acc[g][d] * inv;
    }
}

/* AVX2 path for head_dim % 32 == 0 and block_size % 8 == 0.
 *
 * Work items: whole sequences when there are enough to share out (two per thread or more),
 * else (sequence, KV head) pairs. A sequence item walks each block once for all its KV heads,
 * so it reads the block's K (and V) rows as one contiguous run that the hardware prefetchers
 * follow; a (sequence, head) item reads every Hkv-th slice of it. Read-only loops over the two
 * patterns: 18.0 vs 21.7 ms for SmolLM2's 30 layers at 32 sequences of ~275 tokens (measured on
 * the AVX-512 Xeon). Either way each head's arithmetic is the same, so the output does not
 * depend on the choice (or on the thread count).
 * Returns 0, or 2 when the per-thread scratch could not be allocated. */
static int decode_avx2(float *out, const float *q, const float *k_cache, const float *v_cache,
                       const int64_t *block_table, const int64_t *seq_lens, int64_t num_seqs,
                       int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                       int64_t block_size, int64_t max_blocks, float scale, int num_threads) {
    const int64_t group = num_heads / num_kv_heads;
    const int64_t token_stride = num_kv_heads * head_dim;
    const int64_t block_stride = block_size * token_stride;
    const int per_seq = num_seqs >= 2 * (int64_t)num_threads;
    const int64_t work = per_seq ? num_seqs : num_seqs * num_kv_heads;
    const int64_t heads = per_seq ? num_kv_heads : 1; /* KV heads per item */
    int failed = 0;

#pragma omp parallel num_threads(num_threads)
    {
        head_state *st = aligned_alloc(64, (size_t)heads * sizeof(head_state));
        if (st == NULL) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t item = 0; item < work; item++) {
            if (st == NULL)
                continue;
            const int64_t b = per_seq ? item : item / num_kv_heads;
            const int64_t h0 = per_seq ? 0 : item % num_kv_heads;
            const int64_t len = seq_lens[b];
            const int64_t *table = block_table + b * max_blocks;
            for (int64_t j = 0; j < heads; j++)
                head_init(&st[j], q + (b * num_heads + (h0 + j) * group) * head_dim, group,
                          head_dim, scale);
            for (int64_t start = 0; start < len; start += block_size) {
                const int64_t n = len - start < block_size ? len - start : block_size;
                const int64_t blk = table[start / block_size];
                const int ahead = start + PREFETCH_AHEAD * block_size < len;
                for (int64_t j = 0; j < heads; j++) {
                    /* one head's rows at a time: a whole block's worth of prefetches at once
                     * fills the core's miss queue and stalls it */
                    if (ahead)
                        prefetch_rows(k_cache, v_cache, table[start / block_size + PREFETCH_AHEAD],
                                      block_stride, token_stride, (h0 + j) * head_dim, head_dim,
                                      block_size);
                    const int64_t off = blk * block_stride + (h0 + j) * head_dim;
                    head_block(&st[j], k_cache + off, v_cache + off, n, group, head_dim,
                               block_size, token_stride);
                }
            }
            for (int64_t j = 0; j < heads; j++)
                head_finish(&st[j], out + (b * num_heads + (h0 + j) * group) * head_dim, group,
                            head_dim);
        }
        free(st);
    }
    return failed ? 2 : 0;
}
#endif

/* Returns 0 on success, 1 when a size exceeds the static scratch limits above, 2 when the
 * scratch could not be allocated. */
int paged_decode_attention_f32(float *out, const float *q, const float *k_cache,
                               const float *v_cache, const int64_t *block_table,
                               const int64_t *seq_lens, int64_t num_seqs, int64_t num_heads,
                               int64_t num_kv_heads, int64_t head_dim, int64_t block_size,
                               int64_t max_blocks, float scale, int num_threads) {
    if (num_heads / num_kv_heads > MAX_GROUP || head_dim > MAX_DIM || block_size > MAX_BLOCK)
        return 1;
#if defined(__AVX2__) && defined(__FMA__)
    if (head_dim % 32 == 0 && block_size % 8 == 0) {
        return decode_avx2(out, q, k_cache, v_cache, block_table, seq_lens, num_seqs,
                           num_heads, num_kv_heads, head_dim, block_size, max_blocks, scale,
                           num_threads);
    }
#endif
    decode_scalar(out, q, k_cache, v_cache, block_table, seq_lens, num_seqs, num_heads,
                  num_kv_heads, head_dim, block_size, max_blocks, scale, num_threads);
    return 0;
}

/* Which path serves a shape (for tests): 1 = AVX2, 0 = portable. */
int paged_decode_attention_uses_avx2(int64_t head_dim, int64_t block_size) {
#if defined(__AVX2__) && defined(__FMA__)
    return head_dim % 32 == 0 && block_size % 8 == 0;
#else
    (void)head_dim; (void)block_size;
    return 0;
#endif
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
