/* Per-row softmax statistics and their gradient for vocabulary-sharded fp32 logits.
 *
 * Used by erpo_mega/parallel/vocab_parallel.py (the math and the TP all-reduces live there). The
 * work is memory-bound, so each kernel touches every logit once from main memory:
 *
 *   forward:  one read of each row. Rows are cut into blocks that stay in L1; per block, the max
 *             (first sweep, from memory), then exp((x - M) / T) and exp * (x - M) / T summed
 *             against the running max M (second sweep, from L1). When a block raises M, the
 *             row's sums are rescaled once (online softmax). Block sums are fp32 over 64 lanes,
 *             accumulated across blocks in double, so a 65k-entry row keeps ~1e-7 accuracy.
 *   backward: one read of x and one write of the gradient (which may be x's own storage):
 *             g = exp(d + off) * (a + b * d) with d = (x - M) / T, plus `at` at the target column.
 *
 * Written with AVX-512 intrinsics where the target has them (on one Zen 4 core: fwd+bwd in place
 * ~90% of a copy's time), else GCC/Clang vector extensions as wide as the target's registers
 * (AVX2: ~50%); with an own exp, since libm's scalar expf does not vectorise without -ffast-math,
 * which this file must not use: -inf logits are legal (masked vocabulary) and give probability 0.
 */
#define _DEFAULT_SOURCE /* madvise */
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#if defined(__AVX512F__)
#define LANES 16 /* one zmm register */
#elif defined(__AVX__)
#define LANES 8 /* one ymm register */
#else
#define LANES 4 /* SSE / NEON width */
#endif
#define UNROLL 4
#define BLOCK 1024 /* floats per block: 4 KiB, well inside L1 */
#define EXP_FLUSH (-87.0f) /* exp of anything below is flushed to 0 (< 1.7e-38) */
#define NEG_FLOOR (-1e30f) /* as _NEG_FLOOR in vocab_parallel.py */

typedef float vf __attribute__((vector_size(LANES * 4)));
typedef int32_t vi __attribute__((vector_size(LANES * 4)));

static inline vf loadu(const float *p) {
    vf v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void storeu(float *p, vf v) { memcpy(p, &v, sizeof v); }

static inline vf splat(float a) {
    vf v;
    for (int i = 0; i < LANES; ++i) v[i] = a;
    return v;
}

/* m ? a : b, lane by lane (m: all-ones / all-zeros lanes from a vector comparison) */
static inline vf vselect(vi m, vf a, vf b) { return (vf)(((vi)a & m) | ((vi)b & ~m)); }

/* exp(t) for t <= 0 (larger t is not used here), ~1 ulp; t < EXP_FLUSH gives 0, NaN stays NaN. */
static inline vf vexp(vf t) {
    vi tiny = t < EXP_FLUSH;
    vf c = vselect(tiny, splat(EXP_FLUSH), t);
    vf k = c * 1.44269504088896341f;
    vf n = (k + 12582912.0f) - 12582912.0f; /* round to nearest for |k| < 2^22 */
    vf r = c - n * 0.693359375f;                   /* Cody-Waite: n * ln2_hi is exact */
    r = r - n * -2.12194440e-4f;
    vf p = splat(1.9875691500e-4f) * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * (r * r) + r + 1.0f;
    vi bits = (__builtin_convertvector(n, vi) + 127) << 23; /* 2^n, n in [-126, 0] */
    vf y = p * (vf)bits;
    return vselect(tiny, splat(0.0f), y);
}

static inline float vmax_lanes(vf v) {
    float m = v[0];
    for (int i = 1; i < LANES; ++i) m = v[i] > m ? v[i] : m;
    return m;
}

static inline double vsum_lanes(vf v) {
    double s = 0.0;
    for (int i = 0; i < LANES; ++i) s += v[i];
    return s;
}

/* Scalar twin of vexp for row tails. */
static inline float sexp(float t) {
    vf v = splat(t);
    return vexp(v)[0];
}

/* The hot loops over `full` elements (a multiple of LANES * UNROLL for the block ones, of LANES for
 * the gradient): AVX-512 where the compiler targets it (mask registers, max, scalef), else generic
 * vector code. Both compute the same math. */
#if defined(__AVX512F__)
static inline __m512 exp512(__m512 t, __mmask16 *tiny_out) {
    const __m512 flush = _mm512_set1_ps(EXP_FLUSH);
    const __mmask16 tiny = _mm512_cmp_ps_mask(t, flush, _CMP_LT_OQ);
    const __m512 c = _mm512_max_ps(flush, t); /* NaN t stays NaN (max returns its 2nd operand) */
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(c, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), c);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(1.9875691500e-4f), r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    if (tiny_out) *tiny_out = tiny;
    return _mm512_maskz_mov_ps((__mmask16)~tiny, _mm512_scalef_ps(p, n));
}

static inline float block_max(const float *blk, int64_t full) {
    __m512 m0 = _mm512_set1_ps(-INFINITY), m1 = m0, m2 = m0, m3 = m0;
    for (int64_t j = 0; j < full; j += LANES * UNROLL) {
        m0 = _mm512_max_ps(_mm512_loadu_ps(blk + j), m0);
        m1 = _mm512_max_ps(_mm512_loadu_ps(blk + j + LANES), m1);
        m2 = _mm512_max_ps(_mm512_loadu_ps(blk + j + 2 * LANES), m2);
        m3 = _mm512_max_ps(_mm512_loadu_ps(blk + j + 3 * LANES), m3);
    }
    return _mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(m0, m1), _mm512_max_ps(m2, m3)));
}

/* 2^k for k <= 0: n = round(k), 2^(k - n) by a degree-6 fit on [-1/2, 1/2] (rel. error 3e-9 before
 * fp32 rounding), scaled by 2^n. k below -160 gives 0; NaN stays NaN. Fewer operations than exp512:
 * the forward's hot loop is compute-bound, with the scale log2(e) / T folded into one multiply. */
static inline __m512 exp2_512(__m512 k) {
    k = _mm512_max_ps(_mm512_set1_ps(-160.0f), k); /* NaN k stays NaN (max returns its 2nd operand) */
    const __m512 n = _mm512_roundscale_ps(k, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(k, n);
    __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(1.546973217e-04f), f, _mm512_set1_ps(1.340043265e-03f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618025273e-03f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550327152e-02f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402265072e-01f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931471825e-01f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

static inline void block_sums(const float *blk, int64_t full, float m, float inv_t, double *bs, double *bsd) {
    const __m512 vm = _mm512_set1_ps(m), vt = _mm512_set1_ps(inv_t);
    const __m512 vc = _mm512_set1_ps((float)(1.44269504088896341 * (double)inv_t));
    const __m512 dmin = _mm512_set1_ps(-3.0e38f); /* -inf entries (e = 0) add 0 * dmin = 0 */
    __m512 s[UNROLL], d[UNROLL];
    for (int u = 0; u < UNROLL; ++u) s[u] = d[u] = _mm512_setzero_ps();
    if (inv_t == 1.0f) {
        for (int64_t j = 0; j < full; j += LANES * UNROLL) {
            for (int u = 0; u < UNROLL; ++u) {
                const __m512 t = _mm512_sub_ps(_mm512_loadu_ps(blk + j + u * LANES), vm);
                const __m512 e = exp2_512(_mm512_mul_ps(t, vc));
                s[u] = _mm512_add_ps(s[u], e);
                d[u] = _mm512_fmadd_ps(e, _mm512_max_ps(dmin, t), d[u]);
            }
        }
    } else {
        for (int64_t j = 0; j < full; j += LANES * UNROLL) {
            for (int u = 0; u < UNROLL; ++u) {
                const __m512 t = _mm512_sub_ps(_mm512_loadu_ps(blk + j + u * LANES), vm);
                const __m512 e = exp2_512(_mm512_mul_ps(t, vc));
                s[u] = _mm512_add_ps(s[u], e);
                d[u] = _mm512_fmadd_ps(e, _mm512_max_ps(dmin, _mm512_mul_ps(t, vt)), d[u]);
            }
        }
    }
    const __m512 st = _mm512_add_ps(_mm512_add_ps(s[0], s[1]), _mm512_add_ps(s[2], s[3]));
    const __m512 dt = _mm512_add_ps(_mm512_add_ps(d[0], d[1]), _mm512_add_ps(d[2], d[3]));
    float sl[LANES], dl[LANES];
    _mm512_storeu_ps(sl, st);
    _mm512_storeu_ps(dl, dt);
    double a = 0.0, b = 0.0;
    for (int i = 0; i < LANES; ++i) {
        a += sl[i];
        b += dl[i];
    }
    *bs = a;
    *bsd = b;
}

/* One gradient vector: 2^((x - m) c + off') (a + b' (x - m)) with x - m floored at `fl`. */
static inline __m512 grad16(const float *x, __m512 vm, __m512 vc, __m512 vo, __m512 va, __m512 vb, __m512 vfl) {
    const __m512 t = _mm512_max_ps(vfl, _mm512_sub_ps(_mm512_loadu_ps(x), vm)); /* -inf -> floor, NaN stays */
    return _mm512_mul_ps(exp2_512(_mm512_fmadd_ps(t, vc, vo)), _mm512_fmadd_ps(vb, t, va));
}

/* Gradient of one row's first `full` entries, `at` added at column `target` when it lies among them.
 * Returns whether it did. */
static inline int grad_full(const float *xr, float *gr, int64_t full, float m, float inv_t, float off, float a,
                            float b, float dfloor, int64_t target, float at) {
    /* g = 2^((x - m) c + off log2 e) (a + b' (x - m)), c = log2(e) / T, b' = b / T; x - m is floored
     * where (x - m) c = -160 (2^k is exactly 0 there, off <= 0), so -inf logits give 0, not 0 * inf. */
    const double log2e = 1.44269504088896341, c = log2e * (double)inv_t;
    const __m512 vm = _mm512_set1_ps(m), vc = _mm512_set1_ps((float)c);
    const __m512 vo = _mm512_set1_ps((float)(log2e * (double)off)), va = _mm512_set1_ps(a);
    const __m512 vb = _mm512_set1_ps(b * inv_t), vfl = _mm512_set1_ps((float)(-160.0 / c));
    (void)dfloor;
    const int64_t tj = target - target % LANES;
    const __mmask16 tlane = (__mmask16)(1u << (target % LANES));
    const __m512 vat = _mm512_set1_ps(at);
    if ((const float *)gr != xr && ((uintptr_t)gr & 63) == 0) {
        /* a separate output: streaming stores skip reading its lines first (1 read + 1 write) */
        for (int64_t j = 0; j < full; j += LANES) {
            __m512 g = grad16(xr + j, vm, vc, vo, va, vb, vfl);
            if (j == tj) g = _mm512_mask_add_ps(g, tlane, g, vat);
            _mm512_stream_ps(gr + j, g);
        }
    } else { /* in place (the lines are in cache from the load) or unaligned */
        for (int64_t j = 0; j < full; j += LANES) {
            __m512 g = grad16(xr + j, vm, vc, vo, va, vb, vfl);
            if (j == tj) g = _mm512_mask_add_ps(g, tlane, g, vat);
            _mm512_storeu_ps(gr + j, g);
        }
    }
    return target < full;
}
#else
static inline float block_max(const float *blk, int64_t full) {
    vf m0 = splat(-INFINITY), m1 = m0, m2 = m0, m3 = m0;
    for (int64_t j = 0; j < full; j += LANES * UNROLL) {
        vf a = loadu(blk + j), b = loadu(blk + j + LANES);
        vf c = loadu(blk + j + 2 * LANES), d = loadu(blk + j + 3 * LANES);
        m0 = vselect(a > m0, a, m0);
        m1 = vselect(b > m1, b, m1);
        m2 = vselect(c > m2, c, m2);
        m3 = vselect(d > m3, d, m3);
    }
    m0 = vselect(m1 > m0, m1, m0);
    m2 = vselect(m3 > m2, m3, m2);
    m0 = vselect(m2 > m0, m2, m0);
    return vmax_lanes(m0);
}

static inline void block_sums(const float *blk, int64_t full, float m, float inv_t, double *bs, double *bsd) {
    const vf vm = splat(m), vt = splat(inv_t);
    vf s[UNROLL], d[UNROLL];
    for (int u = 0; u < UNROLL; ++u) s[u] = d[u] = splat(0.0f);
    for (int64_t j = 0; j < full; j += LANES * UNROLL) {
        for (int u = 0; u < UNROLL; ++u) {
            const vf dd = (loadu(blk + j + u * LANES) - vm) * vt;
            const vf e = vexp(dd);
            s[u] += e;
            d[u] += e * vselect(dd < EXP_FLUSH, splat(0.0f), dd); /* e = 0 there; keeps -inf out */
        }
    }
    *bs = vsum_lanes((s[0] + s[1]) + (s[2] + s[3]));
    *bsd = vsum_lanes((d[0] + d[1]) + (d[2] + d[3]));
}

static inline int grad_full(const float *xr, float *gr, int64_t full, float m, float inv_t, float off, float a,
                            float b, float dfloor, int64_t target, float at) {
    (void)target;
    (void)at;
    const vf vm = splat(m), vt = splat(inv_t), vo = splat(off), va = splat(a), vb = splat(b), vfl = splat(dfloor);
    for (int64_t j = 0; j < full; j += LANES) {
        vf d = (loadu(xr + j) - vm) * vt;
        d = vselect(d < vfl, vfl, d);
        storeu(gr + j, vexp(d + vo) * (va + vb * d));
    }
    return 0; /* the caller adds `at` */
}
#endif

/* Row statistics. For each row i of x ([n, vs], row stride ld floats):
 *   row_max[i]   = max_j x_ij, floored at -1e30 (the raw logits' max, before the temperature);
 *   sum_exp[i]   = sum_j exp(d_ij),         d_ij = (x_ij - row_max[i]) * inv_t;
 *   sum_exp_d[i] = sum_j exp(d_ij) * d_ij   (-inf entries add 0).
 * A row that is -inf everywhere is treated as uniform at the floor (sum_exp = vs, sum_exp_d = 0),
 * as the torch path does. A NaN logit makes the row's sums NaN. */
void erpo_lpe_forward(const float *x, int64_t n, int64_t vs, int64_t ld, float inv_t, float *row_max,
                      double *sum_exp, double *sum_exp_d) {
    for (int64_t i = 0; i < n; ++i) {
        const float *row = x + i * ld;
        float m = NEG_FLOOR;
        double s = 0.0, sd = 0.0;
        for (int64_t b0 = 0; b0 < vs; b0 += BLOCK) {
            const int64_t len = vs - b0 < BLOCK ? vs - b0 : BLOCK;
            const float *blk = row + b0;
            const int64_t full = len - len % (LANES * UNROLL);
            /* sweep 1: block max (from memory) */
            float bm = block_max(blk, full);
            for (int64_t j = full; j < len; ++j) bm = blk[j] > bm ? blk[j] : bm;
            if (bm > m) { /* rescale the sums to the new max */
                if (s != 0.0) {
                    const double delta = ((double)bm - (double)m) * (double)inv_t;
                    const double r = exp(-delta);
                    sd = (sd - delta * s) * r;
                    s *= r;
                }
                m = bm;
            }
            /* sweep 2 (from L1): exp and exp * d against m */
            double bs, bsd;
            block_sums(blk, full, m, inv_t, &bs, &bsd);
            for (int64_t j = full; j < len; ++j) {
                const float dd = (blk[j] - m) * inv_t;
                const float e = sexp(dd);
                bs += e;
                bsd += dd < EXP_FLUSH ? 0.0f : e * dd;
            }
            s += bs;
            sd += bsd;
        }
        if (s == 0.0) { /* every entry -inf (or far below the floor): uniform at the floor */
            s = (double)vs;
            sd = 0.0;
        }
        row_max[i] = m;
        sum_exp[i] = s;
        sum_exp_d[i] = sd;
    }
}

/* Gradient rows: g_ij = exp(d_ij + off_i) * (a_i + b_i * d_ij), d_ij = (x_ij - row_max_i) * inv_t,
 * then g[i, target_i] += at_i. `b` may be NULL (no entropy gradient: b = 0). `g` may be `x` itself
 * (in place: each element is read before it is written). -inf logits get exactly 0. */
void erpo_lpe_backward(const float *x, float *g, int64_t n, int64_t vs, int64_t ldx, int64_t ldg, float inv_t,
                       const float *row_max, const float *off, const float *a, const float *b,
                       const int64_t *target, const float *at) {
    const float dfloor = EXP_FLUSH - 1.0f; /* d below this has exp(d + off) = 0 (off <= 0) */
    for (int64_t i = 0; i < n; ++i) {
        const float *xr = x + i * ldx;
        float *gr = g + i * ldg;
        const int64_t full = vs - vs % LANES;
        const int added = grad_full(xr, gr, full, row_max[i], inv_t, off[i], a[i], b ? b[i] : 0.0f, dfloor,
                                    target[i], at[i]);
        const float bi = b ? b[i] : 0.0f;
        for (int64_t j = full; j < vs; ++j) {
            float d = (xr[j] - row_max[i]) * inv_t;
            d = d < dfloor ? dfloor : d;
            gr[j] = sexp(d + off[i]) * (a[i] + bi * d);
        }
        if (!added) gr[target[i]] += at[i];
    }
#if defined(__AVX512F__)
    _mm_sfence(); /* order the streaming stores before the caller reads the gradient */
#endif
}

/* Ask for transparent huge pages on the 2 MiB-aligned interior of a fresh, untouched buffer (the
 * gradient), so that first touching it faults 2 MiB pages, not 4 KiB ones: on a VM that is ~5x less
 * time in the kernel. Advice only: returns madvise's result, 0 when the range holds no whole page. */
int erpo_lpe_advise_hugepages(void *p, int64_t nbytes) {
#if defined(MADV_HUGEPAGE)
    const uintptr_t huge = (uintptr_t)2 << 20;
    const uintptr_t first = ((uintptr_t)p + huge - 1) & ~(huge - 1);
    const uintptr_t end = ((uintptr_t)p + (uintptr_t)nbytes) & ~(huge - 1);
    if (end <= first) return 0;
    return madvise((void *)first, end - first, MADV_HUGEPAGE);
#else
    (void)p;
    (void)nbytes;
    return 0;
#endif
}
