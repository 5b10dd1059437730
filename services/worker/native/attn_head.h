/* Per-row attention arithmetic for paged_attention.c: one query row's G heads (the query heads
 * that share a KV head) folded into an online-softmax state one KV block at a time.
 *
 * Every work split in paged_attention.c (decode rows, prefill tiles, per-sequence or per-head
 * items, any thread count) drives these same functions, and each is compiled once (noinline),
 * so a row's result depends only on its query, its context and the ISA path: never on the
 * batch, the chunking of a prompt, or whether the row was a decode or a prefill row.
 */
#ifndef SWITCHYARD_ATTN_HEAD_H
#define SWITCHYARD_ATTN_HEAD_H

#include <math.h>
#include <stdint.h>

#define MAX_GROUP 16   /* query heads per KV head */
#define MAX_DIM 256    /* head_dim */
#define MAX_BLOCK 64   /* tokens per block */

/* Running max starts here instead of -inf: the library is built with -ffast-math (finite math);
 * exp(NEG_BIG - x) underflows to 0 exactly like exp(-inf). */
#define NEG_BIG (-1e30f)

enum { ISA_SCALAR = 0, ISA_AVX2 = 1, ISA_AVX512 = 2 };

/* One row's state for one KV head. Arrays are views into per-thread scratch, rows 64-byte
 * aligned: qs, acc [G, D]; s [G, SP] (a block's scores, then probabilities; SP = block size
 * rounded up to 16); m, l, corr [G]. */
typedef struct {
    float *qs, *acc, *s, *m, *l, *corr;
} head_state;

/* Floats of scratch one head_state needs (a multiple of 16, so states stay 64-byte aligned). */
static inline int64_t head_state_floats(int64_t group, int64_t head_dim, int64_t sp) {
    return 2 * group * head_dim + group * sp + 3 * 16;
}

static inline void head_bind(head_state *st, float *mem, int64_t group, int64_t head_dim,
                             int64_t sp) {
    st->qs = mem;
    st->acc = mem + group * head_dim;
    st->s = st->acc + group * head_dim;
    st->m = st->s + group * sp;
    st->l = st->m + 16;
    st->corr = st->l + 16;
}

static inline void head_init(head_state *st, const float *qh, int64_t group, int64_t head_dim,
                             float scale) {
    for (int64_t g = 0; g < group; g++) {
        st->m[g] = NEG_BIG;
        st->l[g] = 0.0f;
        for (int64_t d = 0; d < head_dim; d++) {
            st->qs[g * head_dim + d] = qh[g * head_dim + d] * scale;
            st->acc[g * head_dim + d] = 0.0f;
        }
    }
}

static inline void head_finish(const head_state *st, float *oh, int64_t group,
                               int64_t head_dim) {
    for (int64_t g = 0; g < group; g++) {
        const float inv = st->l[g] > 0.0f ? 1.0f / st->l[g] : 0.0f;
        for (int64_t d = 0; d < head_dim; d++)
            oh[g * head_dim + d] = st->acc[g * head_dim + d] * inv;
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

/* AVX2 (head_dim % 32 == 0, block_size % 8 == 0). For G queries (G <= 3):
 * acc[g] = acc[g] * corr[g] + sum_{t < n} p[g][t] * v_t, 32 dims a pass. Keeping the group's
 * accumulators in registers reads each V row once for all G queries and gives G * 4
 * independent FMA chains (one query at a time leaves 4, bound by FMA latency). */
static inline __attribute__((always_inline)) void v_update8(
    const int G, float *acc, const float *p, const float *corr, const float *vb,
    int64_t token_stride, int64_t n, int64_t head_dim, int64_t sp) {
    for (int64_t c0 = 0; c0 < head_dim; c0 += 32) {
        __m256 r[3][4];
        for (int g = 0; g < G; g++) {
            const __m256 cv = _mm256_set1_ps(corr[g]);
            for (int c = 0; c < 4; c++)
                r[g][c] = _mm256_mul_ps(_mm256_load_ps(acc + g * head_dim + c0 + c * 8), cv);
        }
        for (int64_t t = 0; t < n; t++) {
            const float *vt = vb + t * token_stride + c0;
            for (int g = 0; g < G; g++) {
                const __m256 pv = _mm256_set1_ps(p[g * sp + t]);
                for (int c = 0; c < 4; c++)
                    r[g][c] = _mm256_fmadd_ps(pv, _mm256_loadu_ps(vt + c * 8), r[g][c]);
            }
        }
        for (int g = 0; g < G; g++)
            for (int c = 0; c < 4; c++)
                _mm256_store_ps(acc + g * head_dim + c0 + c * 8, r[g][c]);
    }
}

/* Folds one block (n valid rows of block_size at kb / vb) into a row's state. Scores are
 * computed for the whole block; those of rows past the row's context (stale or zero memory,
 * or later tokens of the same prompt) are overwritten with NEG_BIG before the softmax, and the
 * value sum stops at n, so those rows never reach the output, whatever they hold.
 * pk, pv (or NULL): this head's rows in a later block, prefetched into L2 during the scores
 * (as in head_block_avx512; built with -march=haswell and A/B'd in one process on the Xeon,
 * 39.6-40.8 -> 37.8-39.7 ms against a burst before the block). */
static __attribute__((noinline)) void head_block_avx2(
    head_state *st, const float *kb, const float *vb, int64_t n, int64_t group,
    int64_t head_dim, int64_t block_size, int64_t token_stride, int64_t sp, const float *pk,
    const float *pv) {
    const int64_t dv = head_dim / 8; /* vectors per row */
    /* scores, 8 tokens at a time: 8 independent FMA chains, then one 8-way reduction */
    for (int64_t g = 0; g < group; g++) {
        float *s = st->s + g * sp;
        for (int64_t t0 = 0; t0 < block_size; t0 += 8) {
            __m256 a[8];
            for (int j = 0; j < 8; j++) a[j] = _mm256_setzero_ps();
            for (int64_t c = 0; c < dv; c++) {
                const __m256 qv = _mm256_load_ps(st->qs + g * head_dim + c * 8);
                const int fetch = pk && g == 0 && c % 2 == 0; /* a line is two vectors */
                for (int j = 0; j < 8; j++) {
                    a[j] = _mm256_fmadd_ps(
                        qv, _mm256_loadu_ps(kb + (t0 + j) * token_stride + c * 8), a[j]);
                    if (fetch) {
                        _mm_prefetch((const char *)(pk + (t0 + j) * token_stride + c * 8),
                                     _MM_HINT_T1);
                        _mm_prefetch((const char *)(pv + (t0 + j) * token_stride + c * 8),
                                     _MM_HINT_T1);
                    }
                }
            }
            _mm256_storeu_ps(s + t0, hsum8(a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]));
        }
        for (int64_t t = n; t < block_size; t++) s[t] = NEG_BIG;
    }
    /* online softmax (the compiler vectorizes exp through libmvec) */
    for (int64_t g = 0; g < group; g++) {
        float *s = st->s + g * sp;
        float bmax = st->m[g];
        for (int64_t t = 0; t < block_size; t++) bmax = s[t] > bmax ? s[t] : bmax;
        const float correction = expf(st->m[g] - bmax);
        float sum = 0.0f;
        for (int64_t t = 0; t < block_size; t++) {
            s[t] = expf(s[t] - bmax);
            sum += s[t];
        }
        st->l[g] = st->l[g] * correction + sum;
        st->m[g] = bmax;
        st->corr[g] = correction;
    }
    for (int64_t g0 = 0; g0 < group; g0 += 3) {
        const float *p = st->s + g0 * sp, *corr = st->corr + g0;
        float *acc = st->acc + g0 * head_dim;
        switch (group - g0) {
        case 1: v_update8(1, acc, p, corr, vb, token_stride, n, head_dim, sp); break;
        case 2: v_update8(2, acc, p, corr, vb, token_stride, n, head_dim, sp); break;
        default: v_update8(3, acc, p, corr, vb, token_stride, n, head_dim, sp); break;
        }
    }
}
#endif /* AVX2 */

#if defined(__AVX512F__)
/* e^x for float32 lanes: x = n ln2 + r with |r| <= ln2 / 2, e^r by Cephes' degree-7 expf
 * polynomial (1 + r + r^2 P(r)), then scaled by 2^n. About 1 ulp; lanes below -87 (where expf
 * reaches the denormals) give exactly 0, so NEG_BIG scores weigh nothing. libmvec has no
 * 16-lane expf the compiler would pick here (it prefers 256-bit vectors on this target). */
static inline __m512 exp16(__m512 x) {
    const __mmask16 live = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_GE_OQ);
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_maskz_mov_ps(live, _mm512_scalef_ps(p, n));
}

/* The 16 lanes of v folded to 8 (lane i + lane i + 8). */
static inline __m256 fold16(__m512 v) {
    return _mm256_add_ps(_mm512_castps512_ps256(v),
                         _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
}

/* Scores of 16 tokens for G <= 3 queries: s[g][t] = qs[g] . k_t. Each K row is loaded once
 * for the G queries; 8 tokens at a time keep 8 * G accumulators in registers. */
static inline __attribute__((always_inline)) void scores16(
    const int G, const float *qs, float *s, const float *kb, int64_t token_stride,
    int64_t head_dim, int64_t sp, const float *pk, const float *pv) {
    for (int t0 = 0; t0 < 16; t0 += 8) {
        __m512 a[3][8];
        for (int g = 0; g < G; g++)
            for (int j = 0; j < 8; j++) a[g][j] = _mm512_setzero_ps();
        for (int64_t c = 0; c < head_dim; c += 16) {
            __m512 qv[3];
            for (int g = 0; g < G; g++) qv[g] = _mm512_load_ps(qs + g * head_dim + c);
            for (int j = 0; j < 8; j++) {
                const __m512 kv = _mm512_loadu_ps(kb + (t0 + j) * token_stride + c);
                if (pk) { /* the same line of a later block's K and V rows */
                    _mm_prefetch((const char *)(pk + (t0 + j) * token_stride + c), _MM_HINT_T1);
                    _mm_prefetch((const char *)(pv + (t0 + j) * token_stride + c), _MM_HINT_T1);
                }
                for (int g = 0; g < G; g++) a[g][j] = _mm512_fmadd_ps(qv[g], kv, a[g][j]);
            }
        }
        for (int g = 0; g < G; g++)
            _mm256_storeu_ps(s + g * sp + t0,
                             hsum8(fold16(a[g][0]), fold16(a[g][1]), fold16(a[g][2]),
                                   fold16(a[g][3]), fold16(a[g][4]), fold16(a[g][5]),
                                   fold16(a[g][6]), fold16(a[g][7])));
    }
}

/* acc[g] = acc[g] * corr[g] + sum_{t < n} p[g][t] * v_t for G <= 3, 64 dims a pass. */
static inline __attribute__((always_inline)) void v_update16(
    const int G, float *acc, const float *p, const float *corr, const float *vb,
    int64_t token_stride, int64_t n, int64_t head_dim, int64_t sp) {
    for (int64_t c0 = 0; c0 < head_dim; c0 += 64) {
        __m512 r[3][4];
        for (int g = 0; g < G; g++) {
            const __m512 cv = _mm512_set1_ps(corr[g]);
            for (int c = 0; c < 4; c++)
                r[g][c] = _mm512_mul_ps(_mm512_load_ps(acc + g * head_dim + c0 + c * 16), cv);
        }
        for (int64_t t = 0; t < n; t++) {
            const float *vt = vb + t * token_stride + c0;
            for (int g = 0; g < G; g++) {
                const __m512 pv = _mm512_set1_ps(p[g * sp + t]);
                for (int c = 0; c < 4; c++)
                    r[g][c] = _mm512_fmadd_ps(pv, _mm512_loadu_ps(vt + c * 16), r[g][c]);
            }
        }
        for (int g = 0; g < G; g++)
            for (int c = 0; c < 4; c++)
                _mm512_store_ps(acc + g * head_dim + c0 + c * 16, r[g][c]);
    }
}

/* AVX-512 (head_dim % 64 == 0, block_size % 16 == 0): the block in 16-token chunks, each one
 * online-softmax step; n valid rows as in head_block_avx2.
 *
 * pk, pv (or NULL): this head's rows in a block read later, prefetched into L2 a line per K
 * load, spread over the score arithmetic rather than issued as one burst before the block: a
 * decode step of 32 sequences x 30 layers 39.5-40.9 -> 36.4-38.6 ms (the two builds A/B in one
 * process, outputs bitwise equal; without any prefetch 48 ms). */
static __attribute__((noinline)) void head_block_avx512(
    head_state *st, const float *kb, const float *vb, int64_t n, int64_t group,
    int64_t head_dim, int64_t block_size, int64_t token_stride, int64_t sp, const float *pk,
    const float *pv) {
    (void)sp; /* chunks of 16: one score row of 16 per query */
    for (int64_t t0 = 0; t0 < block_size; t0 += 16) {
        const float *kc = kb + t0 * token_stride, *vc = vb + t0 * token_stride;
        const float *pkc = pk ? pk + t0 * token_stride : NULL;
        const float *pvc = pk ? pv + t0 * token_stride : NULL;
        if (t0 >= n) { /* past this row's context: only the prefetches remain */
            if (pk)
                for (int64_t t = 0; t < 16; t++)
                    for (int64_t c = 0; c < head_dim; c += 16) {
                        _mm_prefetch((const char *)(pkc + t * token_stride + c), _MM_HINT_T1);
                        _mm_prefetch((const char *)(pvc + t * token_stride + c), _MM_HINT_T1);
                    }
            continue;
        }
        const int64_t nn = n - t0 < 16 ? n - t0 : 16;
        for (int64_t g0 = 0; g0 < group; g0 += 3) {
            const float *qs = st->qs + g0 * head_dim;
            float *s = st->s + g0 * 16;
            const float *a = g0 == 0 ? pkc : NULL, *b = g0 == 0 ? pvc : NULL;
            switch (group - g0) {
            case 1: scores16(1, qs, s, kc, token_stride, head_dim, 16, a, b); break;
            case 2: scores16(2, qs, s, kc, token_stride, head_dim, 16, a, b); break;
            default: scores16(3, qs, s, kc, token_stride, head_dim, 16, a, b); break;
            }
        }
        const __mmask16 valid = (__mmask16)((1u << nn) - 1u);
        for (int64_t g = 0; g < group; g++) {
            float *s = st->s + g * 16;
            const __m512 sv = _mm512_mask_blend_ps(valid, _mm512_set1_ps(NEG_BIG),
                                                   _mm512_loadu_ps(s));
            const float smax = _mm512_reduce_max_ps(sv);
            const float bmax = smax > st->m[g] ? smax : st->m[g];
            const __m512 prob = exp16(_mm512_sub_ps(sv, _mm512_set1_ps(bmax)));
            const float correction = _mm512_cvtss_f32(exp16(_mm512_set1_ps(st->m[g] - bmax)));
            _mm512_storeu_ps(s, prob);
            st->l[g] = st->l[g] * correction + _mm512_reduce_add_ps(prob);
            st->m[g] = bmax;
            st->corr[g] = correction;
        }
        for (int64_t g0 = 0; g0 < group; g0 += 3) {
            const float *p = st->s + g0 * 16, *corr = st->corr + g0;
            float *acc = st->acc + g0 * head_dim;
            switch (group - g0) {
            case 1: v_update16(1, acc, p, corr, vc, token_stride, nn, head_dim, 16); break;
            case 2: v_update16(2, acc, p, corr, vc, token_stride, nn, head_dim, 16); break;
            default: v_update16(3, acc, p, corr, vc, token_stride, nn, head_dim, 16); break;
            }
        }
    }
}
#endif /* AVX-512 */

#endif /* SWITCHYARD_ATTN_HEAD_H */
