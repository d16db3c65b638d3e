/* Decode-step kernels of the embedded rollout engine (erpo_mega/models/engine_native.py).
 *
 * Why: on CPU a decode step of a small model is a handful of GEMMs plus many tiny elementwise
 * ops; as torch ops each of the latter costs a dispatch, an allocation and a pass over memory.
 * Here each is one call over raw fp32 buffers, single-threaded (the GEMMs keep torch's threads).
 * Every kernel has a plain-torch reference in the tests; numerics are fp32 throughout, with one
 * local exp (below) so loops vectorise without -ffast-math.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define EK_MAX_D 1024

/* GNU vector extensions (gcc >= 12, clang): 16 fp32 lanes, split by the compiler into what the
 * CPU has (one AVX-512 register, two AVX ones, ...). */
typedef float ek_v16 __attribute__((vector_size(64)));
typedef float ek_v8 __attribute__((vector_size(32)));
typedef float ek_v4 __attribute__((vector_size(16)));

static inline ek_v16 ek_ld(const float *p) { ek_v16 v; memcpy(&v, p, sizeof v); return v; }
static inline void ek_st(float *p, ek_v16 v) { memcpy(p, &v, sizeof v); }

#if defined(__has_builtin)
#if __has_builtin(__builtin_shufflevector)
#define EK_HAVE_SHUFFLE 1
#endif
#endif

static inline float ek_hsum(ek_v16 v) {
#ifdef EK_HAVE_SHUFFLE
    ek_v8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
              __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
    ek_v4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
    return (b[0] + b[2]) + (b[1] + b[3]);
#else  /* older compilers: the same pairwise tree through memory */
    float a[16];
    memcpy(a, &v, sizeof a);
    for (int w = 8; w > 0; w /= 2)
        for (int j = 0; j < w; j++) a[j] += a[j + w];
    return a[0];
#endif
}

/* exp(x) in fp32, ~1-2 ulp, vectorisable: 2^n * p(r), r = x - n ln2 in [-ln2/2, ln2/2].
 * x <= -87.3 (including -inf) gives 0, x >= 88.7 gives +inf; NaN propagates. */
static inline float ek_exp(float x) {
    const float lo = -87.33654f, hi = 88.72283f;
    float xc = x < lo ? lo : (x > hi ? hi : x);
    float n = rintf(xc * 1.44269504088896341f);
    float r = xc - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    /* 2^n in two halves so n = 128 (x near hi) stays finite until the last multiply */
    int32_t ni = (int32_t)n;
    int32_t n1 = ni / 2, n2 = ni - ni / 2;
    union { int32_t i; float f; } s1, s2;
    s1.i = (n1 + 127) << 23;
    s2.i = (n2 + 127) << 23;
    float out = p * s1.f * s2.f;
    out = x < lo ? 0.0f : out;
    out = x > hi ? INFINITY : out;
    return x != x ? x : out;
}

/* Lane-wise reductions: 16 independent accumulators vectorise without reassociating a sum
 * (no -ffast-math); the lanes are added at the end. */
static inline float ek_hsum16(float *acc) {
    for (int w = 8; w > 0; w /= 2)
        for (int j = 0; j < w; j++) acc[j] += acc[j + w];
    return acc[0];
}

static inline __attribute__((always_inline)) float ek_dot(const float *a, const float *b, int64_t n) {
    ek_v16 acc = {0};
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) acc += ek_ld(a + i) * ek_ld(b + i);
    float s = 0.0f;
    for (; i < n; i++) s += a[i] * b[i];
    return s + ek_hsum(acc);
}
static inline float ek_sum(const float *a, int64_t n) {
    float acc[16] = {0};
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        for (int j = 0; j < 16; j++) acc[j] += a[i + j];
    float s = 0.0f;
    for (; i < n; i++) s += a[i];
    return s + ek_hsum16(acc);
}

static inline float ek_max(const float *a, int64_t n) {
    float acc[16];
    for (int j = 0; j < 16; j++) acc[j] = -INFINITY;
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        for (int j = 0; j < 16; j++) acc[j] = a[i + j] > acc[j] ? a[i + j] : acc[j];
    float m = -INFINITY;
    for (; i < n; i++) m = a[i] > m ? a[i] : m;
    for (int j = 0; j < 16; j++) m = acc[j] > m ? acc[j] : m;
    return m;
}

/* out[r] = w * x[r] / sqrt(mean(x[r]^2) + eps), rows x h (HF Qwen2RMSNorm in fp32). */
void ek_rmsnorm(const float *x, const float *w, float *out, int64_t rows, int64_t h, float eps) {
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * h;
        float *o = out + r * h;
        float ss = ek_dot(xr, xr, h);
        float inv = 1.0f / sqrtf(ss / (float)h + eps);
        for (int64_t i = 0; i < h; i++) o[i] = w[i] * (xr[i] * inv);
    }
}

/* gu: rows x (2*inter), [gate | up]; out[r, i] = silu(gate) * up (rows x inter). */
void ek_silu_mul(const float *gu, float *out, int64_t rows, int64_t inter) {
    for (int64_t r = 0; r < rows; r++) {
        const float *g = gu + r * 2 * inter, *u = g + inter;
        float *o = out + r * inter;
        for (int64_t i = 0; i < inter; i++) o[i] = g[i] / (1.0f + ek_exp(-g[i])) * u[i];
    }
}

static inline __attribute__((always_inline)) void
rope(const float *restrict x, const float *restrict c, const float *restrict s, float *restrict out, const int64_t d) {
    int64_t half = d / 2;
    for (int64_t i = 0; i < half; i++) out[i] = x[i] * c[i] - x[i + half] * s[i];
    for (int64_t i = half; i < d; i++) out[i] = x[i] * c[i] + x[i - half] * s[i];
}

/* One decode token per row b in [0, B): qkv rows hold [q heads | k heads | v heads] (each d wide).
 * Rope q and k at position pos[b] (cos/sin tables: [positions, d]), write k and v into the slot
 * cache at [b, kv head, pos[b]] (cache: [slots, nkv, cap, d]), then attend each query head over
 * its kv head's keys [0, pos[b]] (causal, own token included): out[b] = [nh * d].
 * Row b uses cache slot slot[b] (slot == NULL: slot b). Rows run in order, so a prompt's tokens
 * given in increasing positions (the native prefill) attend to the keys written by earlier rows.
 * The query heads sharing a kv head are handled together, so each cached key and value is read
 * once per kv head. scratch: at least nh / nkv * (pos max + 1) floats. */
static inline __attribute__((always_inline)) void
decode_attention_d(const float *restrict qkv, int64_t B, int64_t nh, int64_t nkv, const int64_t d,
                   const float *restrict cos_t, const float *restrict sin_t, const int64_t *restrict pos,
                   const int64_t *restrict slot, float *restrict kc, float *restrict vc, int64_t cap, float scale, float *restrict out,
                   float *restrict scratch) {
    int64_t width = (nh + 2 * nkv) * d, groups = nh / nkv;
    float q[EK_MAX_D];
    for (int64_t b = 0; b < B; b++) {
        int64_t p = pos[b], n = p + 1;
        const float *row = qkv + b * width, *c = cos_t + p * d, *s = sin_t + p * d;
        for (int64_t g = 0; g < nkv; g++) {
            int64_t sb = slot ? slot[b] : b;
            float *kbase = kc + ((sb * nkv + g) * cap) * d, *vbase = vc + ((sb * nkv + g) * cap) * d;
            rope(row + (nh + g) * d, c, s, kbase + p * d, d);
            memcpy(vbase + p * d, row + (nh + nkv + g) * d, (size_t)d * sizeof(float));
            for (int64_t j = 0; j < groups; j++) {
                int64_t hq = g * groups + j;
                float *sc = scratch + j * n;
                rope(row + hq * d, c, s, q, d);
                for (int64_t i = 0; i < d; i++) q[i] *= scale;
                for (int64_t t = 0; t < n; t++) sc[t] = ek_dot(q, kbase + t * d, d);
                float m = ek_max(sc, n);
                for (int64_t t = 0; t < n; t++) sc[t] = ek_exp(sc[t] - m);
                float inv = 1.0f / ek_sum(sc, n);
                for (int64_t t = 0; t < n; t++) sc[t] *= inv;
                float *o = out + b * nh * d + hq * d;
                if (d % 16 == 0 && d <= 128) {  /* accumulators stay in registers */
                    ek_v16 acc[8] = {{0}};
                    for (int64_t t = 0; t < n; t++) {
                        const float *v = vbase + t * d;
                        for (int64_t k = 0; k < d / 16; k++) acc[k] += sc[t] * ek_ld(v + 16 * k);
                    }
                    for (int64_t k = 0; k < d / 16; k++) ek_st(o + 16 * k, acc[k]);
                } else {
                    for (int64_t i = 0; i < d; i++) o[i] = 0.0f;
                    for (int64_t t = 0; t < n; t++)
                        for (int64_t i = 0; i < d; i++) o[i] += sc[t] * vbase[t * d + i];
                }
            }
        }
    }
}

void ek_decode_attention(const float *qkv, int64_t B, int64_t nh, int64_t nkv, int64_t d,
                         const float *cos_t, const float *sin_t, const int64_t *pos, const int64_t *slot,
                         float *kc, float *vc, int64_t cap, float scale, float *out, float *scratch) {
    /* constant head sizes let the compiler unroll the per-head loops */
    switch (d) {
    case 32: decode_attention_d(qkv, B, nh, nkv, 32, cos_t, sin_t, pos, slot, kc, vc, cap, scale, out, scratch); break;
    case 64: decode_attention_d(qkv, B, nh, nkv, 64, cos_t, sin_t, pos, slot, kc, vc, cap, scale, out, scratch); break;
    case 128: decode_attention_d(qkv, B, nh, nkv, 128, cos_t, sin_t, pos, slot, kc, vc, cap, scale, out, scratch); break;
    default: decode_attention_d(qkv, B, nh, nkv, d, cos_t, sin_t, pos, slot, kc, vc, cap, scale, out, scratch);
    }
}

#define EK_BLOCK 16

/* Next token for each row of logits [B, V] (already edited by bias/penalties/bans; -inf allowed):
 * greedy[b] != 0: argmax (first of equal maxima), log-prob = log_softmax(logits)[token];
 * otherwise s = logits / temp[b], draw by inverse CDF with u[b] in [0, 1) over exp(s - max)
 * (the first index whose cumulative mass exceeds u * total, never a zero-probability one),
 * log-prob = log_softmax(s)[token]. scratch: at least 2 * V + V / 16 + 1 floats.
 * A row with no finite maximum gets token -1. */
void ek_sample(const float *logits, int64_t B, int64_t V, const float *temp, const uint8_t *greedy,
               const double *u, int64_t *tok_out, float *lp_out, float *scratch) {
    int64_t nblk = (V + EK_BLOCK - 1) / EK_BLOCK;
    float *sc = scratch, *e = scratch + V, *bsum = scratch + 2 * V;
    for (int64_t b = 0; b < B; b++) {
        const float *x = logits + b * V;
        float t = greedy[b] ? 1.0f : temp[b];
        for (int64_t i = 0; i < V; i++) sc[i] = x[i] / t;
        float m = ek_max(sc, V);
        if (!(m > -INFINITY && m < INFINITY)) { tok_out[b] = -1; lp_out[b] = NAN; continue; }
        for (int64_t i = 0; i < V; i++) e[i] = ek_exp(sc[i] - m);
        for (int64_t k = 0; k < nblk; k++) {
            int64_t lo = k * EK_BLOCK, hi = lo + EK_BLOCK < V ? lo + EK_BLOCK : V;
            float acc = 0.0f;
            for (int64_t i = lo; i < hi; i++) acc += e[i];
            bsum[k] = acc;
        }
        float total = ek_sum(bsum, nblk);
        int64_t tok = -1;
        if (greedy[b]) {
            for (int64_t i = 0; i < V; i++)
                if (sc[i] == m) { tok = i; break; }
        } else {
            float target = (float)u[b] * total;
            /* cumulative mass block by block, then inside the block: the first index with
             * cdf > target; if rounding leaves none, the last index with positive mass */
            float cdf = 0.0f;
            int64_t k = 0;
            while (k < nblk - 1 && cdf + bsum[k] <= target) cdf += bsum[k++];
            int64_t lo = k * EK_BLOCK, hi = lo + EK_BLOCK < V ? lo + EK_BLOCK : V;
            for (int64_t i = lo; i < hi; i++) {
                cdf += e[i];
                if (cdf > target && e[i] > 0.0f) { tok = i; break; }
            }
            for (int64_t i = hi - 1; tok < 0 && i >= 0; i--)
                if (e[i] > 0.0f) tok = i;
        }
        tok_out[b] = tok;
        lp_out[b] = (sc[tok] - m) - logf(total);
    }
}

/* ---- a whole decode step in one call, for small models --------------------------------------
 * Why: at the tiny model sizes an RL job on CPU uses, a step is ~30 small ops per row part; as
 * separate Python calls their overhead (and, with row workers, the GIL handoffs between them)
 * cost as much as the GEMMs. The GEMMs here call the BLAS `sgemm_` whose address the caller
 * passes (torch's own MKL), so the numbers are those of torch's linear layers.
 */
typedef void (*ek_sgemm_t)(const char *, const char *, const int *, const int *, const int *, const float *,
                           const float *, const int *, const float *, const int *, const float *, float *,
                           const int *);

/* y[m, n] = beta * y + x[m, k] @ w[n, k]^T (row-major; column-major sgemm on the transposes) */
static void ek_linear(ek_sgemm_t gemm, const float *x, const float *w, float *y, int64_t m, int64_t n,
                      int64_t k, float beta) {
    const char tw = 'T', tx = 'N';
    const float one = 1.0f;
    int M = (int)n, N = (int)m, K = (int)k;
    gemm(&tw, &tx, &M, &N, &K, &one, w, &K, x, &K, &beta, y, &M);
}

static void ek_rows_set_bias(float *y, const float *bias, int64_t rows, int64_t n) {
    for (int64_t r = 0; r < rows; r++) memcpy(y + r * n, bias, (size_t)n * sizeof(float));
}

static void ek_rows_add_bias(float *y, const float *bias, int64_t rows, int64_t n) {
    for (int64_t r = 0; r < rows; r++)
        for (int64_t i = 0; i < n; i++) y[r * n + i] += bias[i];
}

/* Embedding -> layers -> final norm for n token rows (slot NULL: row r in slot r, else slot[r]);
 * returns the normed hidden states [n, hidden] inside work (layout in ek_decode_step). */
static const float *ek_stack(void *gemm_fn, int64_t n, const int64_t *dims, const int64_t *tokens,
                             const float *embed, const int64_t *lw, const float *final_norm, float eps,
                             const float *cos_t, const float *sin_t, const int64_t *pos, const int64_t *slot,
                             const int64_t *kc, const int64_t *vc, int64_t cap, float *work) {
    ek_sgemm_t gemm = (ek_sgemm_t)gemm_fn;
    int64_t hid = dims[0], nh = dims[1], nkv = dims[2], d = dims[3], inter = dims[4];
    int64_t layers = dims[6], wq = (nh + 2 * nkv) * d;
    float *x = work, *h = x + n * hid, *qkv = h + n * hid, *att = qkv + n * wq, *gu = att + n * nh * d;
    float *act = gu + n * 2 * inter, *scratch = act + n * inter;
    float scale = 1.0f / sqrtf((float)d);
    for (int64_t r = 0; r < n; r++) memcpy(x + r * hid, embed + tokens[r] * hid, (size_t)hid * sizeof(float));
    for (int64_t l = 0; l < layers; l++) {
        const int64_t *w = lw + 8 * l;
        ek_rmsnorm(x, (const float *)w[0], h, n, hid, eps);
        if (w[2]) ek_rows_set_bias(qkv, (const float *)w[2], n, wq);
        ek_linear(gemm, h, (const float *)w[1], qkv, n, wq, hid, w[2] ? 1.0f : 0.0f);
        ek_decode_attention(qkv, n, nh, nkv, d, cos_t, sin_t, pos, slot, (float *)kc[l], (float *)vc[l], cap,
                            scale, att, scratch);
        ek_linear(gemm, att, (const float *)w[3], x, n, hid, nh * d, 1.0f);
        if (w[4]) ek_rows_add_bias(x, (const float *)w[4], n, hid);
        ek_rmsnorm(x, (const float *)w[5], h, n, hid, eps);
        ek_linear(gemm, h, (const float *)w[6], gu, n, 2 * inter, hid, 0.0f);
        ek_silu_mul(gu, act, n, inter);
        ek_linear(gemm, act, (const float *)w[7], x, n, hid, inter, 1.0f);
    }
    ek_rmsnorm(x, final_norm, h, n, hid, eps);
    return h;
}

/* Logits [n, vocab] for n token rows (embedding -> layers -> final norm -> lm_head).
 * dims: hidden, heads, kv heads, head dim, intermediate, vocab, layers.
 * lw: per layer 8 addresses: input norm, qkv weight [(h + 2 kv) d, hidden], qkv bias (0: none),
 *     o weight [hidden, h d], o bias (0: none), post norm, gate|up weight [2 inter, hidden],
 *     down weight [hidden, inter].
 * kc/vc: per layer the cache address of this call's slot 0 (see ek_decode_attention; slot NULL).
 * work: at least n * (2 hidden + (h + 2 kv) d + h d + 3 inter) + (h / kv) * cap floats.
 * sample_out != NULL: also draw each row's next token (ek_sample with temp/greedy/u, scratch
 * sample_scratch) into sample_out (int64 tokens) and lp_out. */
void ek_decode_step(void *gemm_fn, int64_t n, const int64_t *dims, const int64_t *tokens, const float *embed,
                    const int64_t *lw, const float *final_norm, const float *lm_head, float eps,
                    const float *cos_t, const float *sin_t, const int64_t *pos, const int64_t *kc,
                    const int64_t *vc, int64_t cap, float *work, float *logits,
                    const float *temp, const uint8_t *greedy, const double *u, int64_t *sample_out,
                    float *lp_out, float *sample_scratch) {
    const float *h = ek_stack(gemm_fn, n, dims, tokens, embed, lw, final_norm, eps, cos_t, sin_t, pos, NULL, kc, vc,
                              cap, work);
    int64_t vocab = dims[5];
    ek_linear((ek_sgemm_t)gemm_fn, h, lm_head, logits, n, vocab, dims[0], 0.0f);
    if (sample_out) ek_sample(logits, n, vocab, temp, greedy, u, sample_out, lp_out, sample_scratch);
}

/* Prompt tokens as n flat rows (row r: token tokens[r] at position pos[r] of slot slot[r]; the
 * rows of one slot in increasing positions) through the whole model in chunks of `chunk` rows
 * (activations stay in L2; a chunk's keys/values are in the cache before the next chunk attends
 * to them); the final normed hidden states into out [n, hidden]. kc/vc: per layer the cache
 * address of slot 0. work: as ek_decode_step for `chunk` rows. */
void ek_prefill_rows(void *gemm_fn, int64_t n, int64_t chunk, const int64_t *dims, const int64_t *tokens,
                     const float *embed, const int64_t *lw, const float *final_norm, float eps, const float *cos_t,
                     const float *sin_t, const int64_t *pos, const int64_t *slot, const int64_t *kc,
                     const int64_t *vc, int64_t cap, float *work, float *out) {
    int64_t hid = dims[0];
    for (int64_t r0 = 0; r0 < n; r0 += chunk) {
        int64_t m = n - r0 < chunk ? n - r0 : chunk;
        const float *h = ek_stack(gemm_fn, m, dims, tokens + r0, embed, lw, final_norm, eps, cos_t, sin_t, pos + r0,
                                  slot + r0, kc, vc, cap, work);
        memcpy(out + r0 * hid, h, (size_t)(m * hid) * sizeof(float));
    }
}

/* `steps` decode steps of the same n rows in one call (the runner's multi-step decode: no stop
 * can fire inside the window, so Python is needed only once per window, not per token). Step k
 * reads the tokens step k-1 drew, row r's uniform u[k * stride + r], writes its token and
 * log-prob to sample_out / lp_out[k * stride + r] (stride: the whole batch's row count, so the
 * row parts of several threads share one [steps, stride] output), and advances pos[r] by one
 * (the caller's cache lengths). Other arguments as ek_decode_step (sampling required).
 * Returns the steps done: fewer than `steps` when a row drew no token (-1: no finite logit),
 * which must not be embedded as the next input. */
int64_t ek_decode_steps(int64_t steps, int64_t stride, void *gemm_fn, int64_t n, const int64_t *dims,
                     const int64_t *tokens, const float *embed, const int64_t *lw, const float *final_norm,
                     const float *lm_head, float eps, const float *cos_t, const float *sin_t, int64_t *pos,
                     const int64_t *kc, const int64_t *vc, int64_t cap, float *work, float *logits,
                     const float *temp, const uint8_t *greedy, const double *u, int64_t *sample_out,
                     float *lp_out, float *sample_scratch) {
    for (int64_t k = 0; k < steps; k++) {
        const int64_t *in = k ? sample_out + (k - 1) * stride : tokens;
        ek_decode_step(gemm_fn, n, dims, in, embed, lw, final_norm, lm_head, eps, cos_t, sin_t, pos, kc, vc, cap,
                       work, logits, temp, greedy, u + k * stride, sample_out + k * stride, lp_out + k * stride,
                       sample_scratch);
        int64_t bad = 0;
        for (int64_t r = 0; r < n; r++) {
            pos[r]++;
            bad |= sample_out[k * stride + r] < 0;
        }
        if (bad) return k + 1;
    }
    return steps;
}
