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
 * Written with GCC/Clang vector extensions (16 fp32 lanes: one AVX-512 register, two AVX2 ones)
 * and an own exp, since libm's scalar expf does not vectorise without -ffast-math, which this
 * file must not use: -inf logits are legal (masked vocabulary) and give probability 0.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define LANES 16
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
static inline vf select(vi m, vf a, vf b) { return (vf)(((vi)a & m) | ((vi)b & ~m)); }

/* exp(t) for t <= 0 (larger t is not used here), ~1 ulp; t < EXP_FLUSH gives 0, NaN stays NaN. */
static inline vf vexp(vf t) {
    vi tiny = t < EXP_FLUSH;
    vf c = select(tiny, splat(EXP_FLUSH), t);
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
    return select(tiny, splat(0.0f), y);
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

/* Row statistics. For each row i of x ([n, vs], row stride ld floats):
 *   row_max[i]   = max_j x_ij, floored at -1e30 (the raw logits' max, before the temperature);
 *   sum_exp[i]   = sum_j exp(d_ij),         d_ij = (x_ij - row_max[i]) * inv_t;
 *   sum_exp_d[i] = sum_j exp(d_ij) * d_ij   (-inf entries add 0).
 * A row that is -inf everywhere is treated as uniform at the floor (sum_exp = vs, sum_exp_d = 0),
 * as the torch path does. A NaN logit makes the row's sums NaN. */
void erpo_lpe_forward(const float *x, int64_t n, int64_t vs, int64_t ld, float inv_t, float *row_max,
                      double *sum_exp, double *sum_exp_d) {
    const float ninf = -INFINITY;
    for (int64_t i = 0; i < n; ++i) {
        const float *row = x + i * ld;
        float m = NEG_FLOOR;
        double s = 0.0, sd = 0.0;
        for (int64_t b0 = 0; b0 < vs; b0 += BLOCK) {
            const int64_t len = vs - b0 < BLOCK ? vs - b0 : BLOCK;
            const float *blk = row + b0;
            const int64_t full = len - len % (LANES * UNROLL);
            /* sweep 1: block max */
            vf m0 = splat(ninf), m1 = m0, m2 = m0, m3 = m0;
            for (int64_t j = 0; j < full; j += LANES * UNROLL) {
                vf a = loadu(blk + j), b = loadu(blk + j + LANES);
                vf c = loadu(blk + j + 2 * LANES), d = loadu(blk + j + 3 * LANES);
                m0 = select(a > m0, a, m0);
                m1 = select(b > m1, b, m1);
                m2 = select(c > m2, c, m2);
                m3 = select(d > m3, d, m3);
            }
            m0 = select(m1 > m0, m1, m0);
            m2 = select(m3 > m2, m3, m2);
            m0 = select(m2 > m0, m2, m0);
            float bm = vmax_lanes(m0);
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
            const vf vm = splat(m), vt = splat(inv_t);
            vf s0 = splat(0.0f), s1 = s0, s2 = s0, s3 = s0, d0 = s0, d1 = s0, d2 = s0, d3 = s0;
#define LPE_ACC(S, D, OFF)                                                                          \
    do {                                                                                            \
        vf dd = (loadu(blk + j + (OFF)) - vm) * vt;                                                 \
        vf e = vexp(dd);                                                                            \
        S += e;                                                                                     \
        D += e * select(dd < EXP_FLUSH, splat(0.0f), dd); /* e = 0 there; keeps -inf out */         \
    } while (0)
            for (int64_t j = 0; j < full; j += LANES * UNROLL) {
                LPE_ACC(s0, d0, 0);
                LPE_ACC(s1, d1, LANES);
                LPE_ACC(s2, d2, 2 * LANES);
                LPE_ACC(s3, d3, 3 * LANES);
            }
#undef LPE_ACC
            double bs = vsum_lanes((s0 + s1) + (s2 + s3)), bsd = vsum_lanes((d0 + d1) + (d2 + d3));
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
        const vf vm = splat(row_max[i]), vt = splat(inv_t), vo = splat(off[i]), va = splat(a[i]);
        const vf vb = splat(b ? b[i] : 0.0f), vfl = splat(dfloor);
        const int64_t full = vs - vs % LANES;
        if (b) {
            for (int64_t j = 0; j < full; j += LANES) {
                vf d = (loadu(xr + j) - vm) * vt;
                d = select(d < vfl, vfl, d);
                storeu(gr + j, vexp(d + vo) * (va + vb * d));
            }
        } else {
            for (int64_t j = 0; j < full; j += LANES) {
                vf d = (loadu(xr + j) - vm) * vt;
                d = select(d < vfl, vfl, d);
                storeu(gr + j, vexp(d + vo) * va);
            }
        }
        const float bi = b ? b[i] : 0.0f;
        for (int64_t j = full; j < vs; ++j) {
            float d = (xr[j] - row_max[i]) * inv_t;
            d = d < dfloor ? dfloor : d;
            gr[j] = sexp(d + off[i]) * (a[i] + bi * d);
        }
        gr[target[i]] += at[i];
    }
}
