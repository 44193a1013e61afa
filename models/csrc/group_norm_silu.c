/* GroupNorm followed by SiLU, forward and backward, over channels-last fp32 tensors.
 *
 * Built and loaded by models/cpu_kernels.py (plain C, no torch headers: it compiles in under a
 * second). Layout: x is (n, p, c) with p = h * w pixels and the c channels of a pixel contiguous,
 * i.e. an NCHW tensor in channels_last memory; the g groups are runs of c / g channels.
 *
 * Why: torch's native GroupNorm is 1.45-2.4x slower on channels_last tensors than on contiguous ones
 * on CPU (its backward 4x with 2 channels per group), and SiLU is one more pass over memory each
 * way. Here the forward is two passes over x (per-channel sums, then normalise + SiLU) and the
 * backward two (per-channel sums of dz and dz * x with dz written into dx, then dx in place), every
 * inner loop running along the channels, where the compiler vectorises it.
 *
 * Work is split into tasks of (sample, pixel chunk); each task keeps its own per-channel partial
 * sums (a block of 64 pixels in fp32, then into fp64), which are added up per group afterwards in
 * a fixed order. The chunks are set by the sample's size alone (models/cpu_kernels.py), so the
 * result does not depend on the threads, how OpenMP schedules the tasks, or the batch size.
 * The sums are taken about a shift per (sample, channel), the mean of the sample's first block of
 * pixels: close to the channel's mean, so that fp32 keeps the variance of activations whose mean is
 * large against their spread, and not one pixel, which may be an outlier.
 *
 * Per-task scratch (4 c floats) comes from the caller, not the thread's stack: no channel count can
 * overflow a small OpenMP stack.
 */
#include <math.h>
#include <stdint.h>

#define BLOCK 64

/* exp for the vector loops: libm's expf is a scalar call that stops the compiler vectorising them.
 * Cody-Waite reduction to [-ln2/2, ln2/2] and a degree-6 polynomial (Cephes' coefficients), about
 * 2 ulp. Called with arguments <= 0 only (exp(-|z|)); clamped below at -87, where it is 1.6e-38. */
static inline float vexp(float x) {
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    float t = x * 1.44269504088896341f + 12582912.0f; /* round to nearest by the float's own rounding */
    float n = t - 12582912.0f;
    float r = x - n * 0.693359375f;
    r = r + n * 2.12194440e-4f;
    float q = 1.9875691500e-4f;
    q = q * r + 1.3981999507e-3f;
    q = q * r + 8.3334519073e-3f;
    q = q * r + 4.1665795894e-2f;
    q = q * r + 1.6666665459e-1f;
    q = q * r + 5.0000001201e-1f;
    q = q * r * r + r + 1.0f;
    union { int32_t i; float f; } u;
    u.i = ((int32_t)n + 127) << 23;
    return q * u.f;
}

/* 1 / x for x in [1, 2] (here 1 + exp(-|z|)): a first guess from the float's bits and three Newton
 * steps, within 4e-7 relative; vectorised, it runs at several times the rate of a division. */
static inline float vrcp(float x) {
    union { int32_t i; float f; } u;
    u.f = x;
    u.i = 0x7EF311C7 - u.i;
    float y = u.f;
    y = y * (2.0f - x * y);
    y = y * (2.0f - x * y);
    y = y * (2.0f - x * y);
    return y;
}

/* sigmoid(z) and 1 - sigmoid(z), each from exp(-|z|) <= 1, so neither overflows nor cancels:
 * for z >= 0 they are 1 / (1 + e) and e / (1 + e), for z < 0 the other way round. */
static inline void sigmoid2(float z, float *sg, float *sgc) {
    const float e = vexp(-fabsf(z));
    const float r = vrcp(1.0f + e);
    const float er = e * r;
    *sg = z >= 0.0f ? r : er;
    *sgc = z >= 0.0f ? er : r;
}

static inline void chunk(int64_t p, int64_t chunks, int64_t k, int64_t *p0, int64_t *p1) {
    *p0 = p * k / chunks;
    *p1 = p * (k + 1) / chunks;
}

/* shift (n, c): per sample and channel, the mean of the sample's first min(p, BLOCK) pixels. */
static void shifts(const float *x, int64_t n, int64_t p, int64_t c, float *shift) {
    const int64_t m = p < BLOCK ? p : BLOCK;
    for (int64_t i = 0; i < n; i++) {
        float *h = shift + i * c;
        const float *xi = x + i * p * c;
        for (int64_t k = 0; k < c; k++) h[k] = 0.0f;
        for (int64_t j = 0; j < m; j++)
            for (int64_t k = 0; k < c; k++) h[k] += xi[j * c + k];
        for (int64_t k = 0; k < c; k++) h[k] /= (float)m;
    }
}

/* Per channel of one sample, its group's mean mu and the scale a: the normalised, affine output is
 * z = (x - mu) a + beta (not x a + (beta - mu a), which cancels where the mean is large). */
static void scale_mean(const float *gamma, const float *mean, const float *rstd, int64_t c, int64_t cg,
                       float *a, float *mu) {
    for (int64_t k = 0; k < c; k++) {
        a[k] = rstd[k / cg] * gamma[k];
        mu[k] = mean[k / cg];
    }
}

/* y = silu(group_norm(x)); mean and rstd (n, g) are written for the backward.
 * work: n * chunks * 2 * c doubles; scratch: n * chunks * 4 * c floats; shift: n * c floats. */
void gn_silu_forward(const float *x, const float *gamma, const float *beta, float *y, float *mean,
                     float *rstd, int64_t n, int64_t p, int64_t c, int64_t g, double eps, int threads,
                     int64_t chunks, double *work, float *scratch, float *shift) {
    const int64_t cg = c / g, tasks = n * chunks;
    shifts(x, n, p, c, shift);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t t = 0; t < tasks; t++) {
        int64_t p0, p1;
        chunk(p, chunks, t % chunks, &p0, &p1);
        double *s = work + t * 2 * c, *q = s + c;
        float *fs = scratch + t * 4 * c, *fq = fs + c;
        for (int64_t k = 0; k < c; k++) s[k] = q[k] = 0.0;
        const float *xi = x + (t / chunks) * p * c, *sh = shift + (t / chunks) * c;
        for (int64_t a = p0; a < p1; a += BLOCK) {
            const int64_t e = a + BLOCK < p1 ? a + BLOCK : p1;
            for (int64_t k = 0; k < c; k++) fs[k] = fq[k] = 0.0f;
            for (int64_t j = a; j < e; j++) {
                const float *r = xi + j * c;
#pragma omp simd
                for (int64_t k = 0; k < c; k++) {
                    const float d = r[k] - sh[k];
                    fs[k] += d;
                    fq[k] += d * d;
                }
            }
            for (int64_t k = 0; k < c; k++) {
                s[k] += fs[k];
                q[k] += fq[k];
            }
        }
    }
    const double m = (double)(p * cg);
    for (int64_t i = 0; i < n; i++)
        for (int64_t gi = 0; gi < g; gi++) {
            /* per channel k with shift h: sum (x - h) = S_k, sum (x - h)^2 = Q_k; the group's sums of x
             * and squares about h0 are sum_k S_k + p d and Q_k + 2 d S_k + p d^2 with d = h - h0, in fp64 */
            const double h0 = shift[i * c + gi * cg];
            double S = 0.0, Q = 0.0;
            for (int64_t k = gi * cg; k < (gi + 1) * cg; k++) {
                double Sk = 0.0, Qk = 0.0;
                for (int64_t ch = 0; ch < chunks; ch++) {
                    const double *s = work + (i * chunks + ch) * 2 * c, *q = s + c;
                    Sk += s[k];
                    Qk += q[k];
                }
                const double d = (double)shift[i * c + k] - h0;
                S += Sk + (double)p * d;
                Q += Qk + 2.0 * d * Sk + (double)p * d * d;
            }
            const double mu = h0 + S / m;
            double var = Q / m - (S / m) * (S / m);
            if (var < 0.0) var = 0.0;
            mean[i * g + gi] = (float)mu;
            /* squares past fp32's range (|x| ~ 1e19): NaN, as torch's kernel gives, not a finite rstd of 0
             * that would turn the group into silu(beta) and hide the divergence */
            rstd[i * g + gi] = var < INFINITY ? (float)(1.0 / sqrt(var + eps)) : NAN;
        }
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t t = 0; t < tasks; t++) {
        const int64_t i = t / chunks;
        int64_t p0, p1;
        chunk(p, chunks, t % chunks, &p0, &p1);
        float *a = scratch + t * 4 * c, *mu = a + c;
        scale_mean(gamma, mean + i * g, rstd + i * g, c, cg, a, mu);
        const float *xi = x + i * p * c;
        float *yi = y + i * p * c;
        for (int64_t j = p0; j < p1; j++) {
            const float *r = xi + j * c;
            float *o = yi + j * c;
#pragma omp simd
            for (int64_t k = 0; k < c; k++) {
                const float z = (r[k] - mu[k]) * a[k] + beta[k];
                float sg, sgc;
                sigmoid2(z, &sg, &sgc);
                o[k] = z * sg;
            }
        }
    }
}

/* dx, dgamma, dbeta from dy and the forward's input and statistics. dx must not alias dy or x.
 * work: n * chunks * 2 * c doubles; scratch: n * chunks * 4 * c floats; shift: n * c floats;
 * coef: 2 * n * g floats. */
void gn_silu_backward(const float *dy, const float *x, const float *gamma, const float *beta,
                      const float *mean, const float *rstd, float *dx, float *dgamma, float *dbeta,
                      int64_t n, int64_t p, int64_t c, int64_t g, int threads, int64_t chunks,
                      double *work, float *scratch, float *shift, float *coef) {
    const int64_t cg = c / g, tasks = n * chunks;
    shifts(x, n, p, c, shift);
    /* pass 1: dz = dy * silu'(z) into dx, and per-channel sums of dz and dz * (x - shift) */
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t t = 0; t < tasks; t++) {
        const int64_t i = t / chunks;
        int64_t p0, p1;
        chunk(p, chunks, t % chunks, &p0, &p1);
        double *s1 = work + t * 2 * c, *s2 = s1 + c;
        float *a = scratch + t * 4 * c, *mu = a + c, *f1 = mu + c, *f2 = f1 + c;
        scale_mean(gamma, mean + i * g, rstd + i * g, c, cg, a, mu);
        for (int64_t k = 0; k < c; k++) s1[k] = s2[k] = 0.0;
        const float *xi = x + i * p * c, *dyi = dy + i * p * c, *sh = shift + i * c;
        float *dxi = dx + i * p * c;
        for (int64_t u = p0; u < p1; u += BLOCK) {
            const int64_t e = u + BLOCK < p1 ? u + BLOCK : p1;
            for (int64_t k = 0; k < c; k++) f1[k] = f2[k] = 0.0f;
            for (int64_t j = u; j < e; j++) {
                const float *r = xi + j * c, *d = dyi + j * c;
                float *o = dxi + j * c;
#pragma omp simd
                for (int64_t k = 0; k < c; k++) {
                    const float z = (r[k] - mu[k]) * a[k] + beta[k];
                    float sg, sgc;
                    sigmoid2(z, &sg, &sgc);
                    const float dz = d[k] * sg * (1.0f + z * sgc); /* silu'(z) = sg (1 + z (1 - sg)) */
                    o[k] = dz;
                    f1[k] += dz;
                    f2[k] += dz * (r[k] - sh[k]);
                }
            }
            for (int64_t k = 0; k < c; k++) {
                s1[k] += f1[k];
                s2[k] += f2[k];
            }
        }
    }
    /* per (sample, group): dx = rstd * gamma * dz + k2 * (x - mean) + k3; per channel: dgamma, dbeta */
    float *k2 = coef, *k3 = coef + n * g;
    const double m = (double)(p * cg);
    for (int64_t gi = 0; gi < g; gi++)
        for (int64_t k = gi * cg; k < (gi + 1) * cg; k++) {
            double dg = 0.0, db = 0.0;
            for (int64_t i = 0; i < n; i++) {
                double S1 = 0.0, S2 = 0.0;
                for (int64_t ch = 0; ch < chunks; ch++) {
                    const double *s1 = work + (i * chunks + ch) * 2 * c, *s2 = s1 + c;
                    S1 += s1[k];
                    S2 += s2[k];
                }
                /* S2 = sum dz (x - h): sum dz (x - mean) = S2 - (mean - h) S1. The first task's slots
                 * of sample i hold the channel's totals from here on. */
                S2 -= ((double)mean[i * g + gi] - (double)shift[i * c + k]) * S1;
                work[i * chunks * 2 * c + k] = S1;
                work[i * chunks * 2 * c + c + k] = S2;
                db += S1;
                dg += S2 * (double)rstd[i * g + gi];
            }
            dgamma[k] = (float)dg;
            dbeta[k] = (float)db;
        }
    for (int64_t i = 0; i < n; i++)
        for (int64_t gi = 0; gi < g; gi++) {
            const double r = rstd[i * g + gi];
            double A = 0.0, B = 0.0; /* sums over the group of dxhat and dxhat * xhat */
            for (int64_t k = gi * cg; k < (gi + 1) * cg; k++) {
                A += gamma[k] * work[i * chunks * 2 * c + k];
                B += gamma[k] * work[i * chunks * 2 * c + c + k] * r;
            }
            k2[i * g + gi] = (float)(-r * r * B / m);
            k3[i * g + gi] = (float)(-r * A / m);
        }
    /* pass 2 */
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t t = 0; t < tasks; t++) {
        const int64_t i = t / chunks;
        int64_t p0, p1;
        chunk(p, chunks, t % chunks, &p0, &p1);
        float *a = scratch + t * 4 * c, *mu = a + c, *q2 = mu + c, *q3 = q2 + c;
        scale_mean(gamma, mean + i * g, rstd + i * g, c, cg, a, mu);
        for (int64_t k = 0; k < c; k++) {
            q2[k] = k2[i * g + k / cg];
            q3[k] = k3[i * g + k / cg];
        }
        const float *xi = x + i * p * c;
        float *dxi = dx + i * p * c;
        for (int64_t j = p0; j < p1; j++) {
            const float *r = xi + j * c;
            float *o = dxi + j * c;
#pragma omp simd
            for (int64_t k = 0; k < c; k++) o[k] = a[k] * o[k] + q2[k] * (r[k] - mu[k]) + q3[k];
        }
    }
}
