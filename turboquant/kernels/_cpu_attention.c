/* Decode attention straight from TurboQuant MSE codes, for the CPU (see cpu_attention.py).
 *
 * Plain C99 + pthreads, no Python or torch headers: it compiles in well under a second and is
 * called through ctypes with one array of int64 parameters (layout: the P_* enum below, kept in
 * sync with cpu_attention.py).
 *
 * Work split: for every (batch, kv head) the compressed tokens are cut into blocks of BLK tokens;
 * one task scores a block against the G·L query rows of that head (decoding each key once for
 * all rows), takes the block's softmax with its own max, and accumulates p·‖v‖·ŷ in the rotated
 * domain. The full-precision tokens of a head form one more task. Tasks are independent, so
 * threads take them round-robin; the blocks are then merged with the usual max rescaling
 * (flash-decoding) and the value sum rotated back once per row.
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define TQ_AVX512 1
#endif

enum {
    P_B, P_HKV, P_G, P_L, P_D, P_N, P_W, P_THREADS, P_BLOCK,
    P_Q, P_OUT,
    P_KC, P_KC_SB, P_KC_SH, P_KC_ST,
    P_KN, P_KN_SB, P_KN_SH, P_KN_ST, P_KN_TYPE,
    P_VC, P_VC_SB, P_VC_SH, P_VC_ST,
    P_VN, P_VN_SB, P_VN_SH, P_VN_ST, P_VN_TYPE,
    P_KSPEC, /* n_hi, b_hi, n_lo, b_lo, bytes_hi, cent_hi, cent_lo, table_hi, table_lo */
    P_VSPEC = P_KSPEC + 9,
    P_PK = P_VSPEC + 9, P_PV,
    P_KOFF, P_VOFF,
    P_FK, P_FV,
    P_MASK, P_MASK_TYPE, P_M_SB, P_M_SH, P_M_SL, P_M_ST,
    P_COUNT
};

#define MAX_DIM 1024

typedef struct {
    int n_hi, b_hi, n_lo, b_lo, bytes_hi;
    const float *cent_hi, *cent_lo;   /* 2^b centroids */
    const float *table_hi, *table_lo; /* (256, 8/b) centroids of every byte, or NULL (widths 3, 5, 6, 7) */
} spec_t;

typedef struct {
    int on, b, per, nbytes, PB, nch;
    unsigned tail; /* lanes of the last 16-byte chunk that hold code bytes */
    float cent16[16];
} planar_t;

typedef struct {
    const int64_t *p;
    double scaling;
    int64_t B, Hkv, G, L, M, d, N, W, block, nblk, ntasks;
    spec_t ks, vs;
    planar_t kp, vp;
    const float *qrot, *qoff, *q, *qplan;
    /* per task outputs: max, sum, compressed mass (M each) and acc (M·d) */
    float *t_max, *t_sum, *t_mass, *t_acc;
    int nthreads;
} ctx_t;

static spec_t read_spec(const int64_t *s) {
    spec_t r;
    r.n_hi = (int)s[0]; r.b_hi = (int)s[1]; r.n_lo = (int)s[2]; r.b_lo = (int)s[3]; r.bytes_hi = (int)s[4];
    r.cent_hi = (const float *)(intptr_t)s[5]; r.cent_lo = (const float *)(intptr_t)s[6];
    r.table_hi = (const float *)(intptr_t)s[7]; r.table_lo = (const float *)(intptr_t)s[8];
    return r;
}

static planar_t make_planar(const spec_t *s, int64_t d) {
    planar_t P;
    memset(&P, 0, sizeof(P));
#ifdef TQ_AVX512
    const int b = s->b_lo;
    if (s->n_hi || !(b == 1 || b == 2 || b == 4) || s->n_lo != d) return P;
    P.on = 1;
    P.b = b;
    P.per = 8 / b;
    P.nbytes = (int)((d * b + 7) / 8);
    P.PB = (P.nbytes + 15) / 16 * 16;
    P.nch = P.PB / 16;
    const int valid = P.nbytes - 16 * (P.nch - 1);
    P.tail = valid == 16 ? 0xFFFFu : (1u << valid) - 1u;
    for (int k = 0; k < (1 << b); k++) P.cent16[k] = s->cent_lo[k];
#else
    (void)s;
    (void)d;
#endif
    return P;
}

static inline float load_norm(const void *base, int type, int64_t i) {
    switch (type) {
    case 0: return ((const float *)base)[i];
    case 1: return (float)((const _Float16 *)base)[i];
    default: { /* bfloat16: the high half of a float32 */
        uint32_t bits = (uint32_t)((const uint16_t *)base)[i] << 16;
        float f;
        memcpy(&f, &bits, 4);
        return f;
    }
    }
}

/* Centroids of n codes of width b packed LSB-first from p (packing.py layout) into out. */
static inline void decode_group(const uint8_t *p, int n, int b, const float *cent, const float *table, float *out) {
    if (table) {
        const int per = 8 / b;
        const int full = n / per;
        /* fixed-size copies (a variable-size memcpy would be a libc call per byte) */
        switch (per) {
        case 1: for (int j = 0; j < full; j++) out[j] = table[p[j]]; break;
        case 2: for (int j = 0; j < full; j++) memcpy(out + 2 * j, table + 2 * (int)p[j], 8); break;
        case 4: for (int j = 0; j < full; j++) memcpy(out + 4 * j, table + 4 * (int)p[j], 16); break;
        default: for (int j = 0; j < full; j++) memcpy(out + 8 * j, table + 8 * (int)p[j], 32); break;
        }
        for (int k = full * per; k < n; k++) out[k] = table[(int)p[full] * per + (k - full * per)];
        return;
    }
    const unsigned mask = (1u << b) - 1u;
    for (int j = 0; j < n; j++) {
        const int bit = j * b, byte = bit >> 3, off = bit & 7;
        unsigned v = (unsigned)p[byte] >> off;
        if (off + b > 8) v |= (unsigned)p[byte + 1] << (8 - off);
        out[j] = cent[v & mask];
    }
}

static inline void decode(const uint8_t *p, const spec_t *s, float *out) {
    if (s->n_hi) decode_group(p, s->n_hi, s->b_hi, s->cent_hi, s->table_hi, out);
    decode_group(p + s->bytes_hi, s->n_lo, s->b_lo, s->cent_lo, s->table_lo, out + s->n_hi);
}

static inline float dot(const float *a, const float *b, int64_t d) {
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int64_t k = 0; k < d; k++) s += a[k] * b[k];
    return s;
}

static inline void axpy(float w, const float *x, float *y, int64_t d) {
#pragma omp simd
    for (int64_t k = 0; k < d; k++) y[k] += w * x[k];
}

/* Rows r of kv head (b, h) read mask row (b, h·G + r / L, r % L). */
static inline int64_t mask_row(const ctx_t *c, int64_t b, int64_t h, int64_t r) {
    const int64_t *p = c->p;
    return b * p[P_M_SB] + (h * c->G + r / c->L) * p[P_M_SH] + (r % c->L) * p[P_M_SL];
}

#ifdef TQ_AVX512
/* exp(s - mx) in place over n scores (mx finite), returns the sum. Cephes-style expf: range
 * reduction by ln 2 (two-part constant), degree-6 polynomial, scale by 2^k (~1 ulp). Inputs
 * below -87.3 (including -inf from masks) give exactly 0, as expf does. */
static inline __m512 exp512(__m512 x) {
    const __mmask16 tiny = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.33654f), _CMP_LT_OQ);
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.33654f));
    const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(k, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 y = _mm512_set1_ps(1.9875691500e-4f);
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507e-3f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073e-3f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894e-2f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459e-1f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201e-1f));
    y = _mm512_fmadd_ps(_mm512_mul_ps(y, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.f)));
    y = _mm512_scalef_ps(y, k);
    return _mm512_maskz_mov_ps((__mmask16)~tiny, y);
}

static inline float exp_sum(float *s, int64_t n, float mx) {
    const __m512 m = _mm512_set1_ps(mx);
    __m512 acc = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        const __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(s + i), m));
        _mm512_storeu_ps(s + i, e);
        acc = _mm512_add_ps(acc, e);
    }
    if (i < n) {
        const __mmask16 k = (__mmask16)((1u << (n - i)) - 1u);
        const __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, s + i), m));
        _mm512_mask_storeu_ps(s + i, k, e);
        acc = _mm512_add_ps(acc, _mm512_maskz_mov_ps(k, e));
    }
    return _mm512_reduce_add_ps(acc);
}

/* Planar layout of one code group of width b in {1, 2, 4} (single group, n_hi = 0): code s of
 * byte j (coordinate j·per + s) is lane j of plane s. Scoring permutes the centroids into that
 * order with one vpermps per 16 codes instead of unpacking; the query and the value sums are
 * kept in the same planar order ([per planes][PB bytes], zero-padded), so no shuffles are needed. */
static inline __attribute__((always_inline)) void planar_scores(
    const int R, const planar_t *P, const uint8_t *kc, int64_t st, int64_t t0, int64_t cnt,
    const float *qp, int64_t qstride, float *dots) {
    const __m512 cv = _mm512_loadu_ps(P->cent16);
    const __m512i mk = _mm512_set1_epi32((1 << P->b) - 1);
    for (int64_t i = 0; i < cnt; i++) {
        const uint8_t *c = kc + (t0 + i) * st;
        __m512 acc[4];
        for (int k = 0; k < R; k++) acc[k] = _mm512_setzero_ps();
        for (int ch = 0; ch < P->nch; ch++) {
            const __mmask16 lm = ch == P->nch - 1 ? P->tail : (__mmask16)0xFFFF;
            const __m512i idx = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(lm, c + 16 * ch));
            for (int s = 0; s < P->per; s++) {
                const __m512i code = _mm512_and_si512(_mm512_srlv_epi32(idx, _mm512_set1_epi32(s * P->b)), mk);
                const __m512 cen = _mm512_permutexvar_ps(code, cv);
                const float *qq = qp + s * P->PB + 16 * ch;
                for (int k = 0; k < R; k++) acc[k] = _mm512_fmadd_ps(_mm512_loadu_ps(qq + k * qstride), cen, acc[k]);
            }
        }
        for (int k = 0; k < R; k++) dots[k * cnt + i] = _mm512_reduce_add_ps(acc[k]);
    }
}

static inline __attribute__((always_inline)) void planar_values(
    const int R, const planar_t *P, const uint8_t *vc, int64_t st, int64_t t0, int64_t cnt,
    const float *w, float *accp) {
    const __m512 cv = _mm512_loadu_ps(P->cent16);
    const __m512i mk = _mm512_set1_epi32((1 << P->b) - 1);
    const int64_t stride = (int64_t)P->per * P->PB;
    for (int64_t i = 0; i < cnt; i++) {
        __m512 wv[4];
        int any = 0;
        for (int k = 0; k < R; k++) {
            wv[k] = _mm512_set1_ps(w[k * cnt + i]);
            any |= w[k * cnt + i] != 0.f;
        }
        if (!any) continue;
        const uint8_t *c = vc + (t0 + i) * st;
        for (int ch = 0; ch < P->nch; ch++) {
            const __mmask16 lm = ch == P->nch - 1 ? P->tail : (__mmask16)0xFFFF;
            const __m512i idx = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(lm, c + 16 * ch));
            for (int s = 0; s < P->per; s++) {
                const __m512i code = _mm512_and_si512(_mm512_srlv_epi32(idx, _mm512_set1_epi32(s * P->b)), mk);
                const __m512 cen = _mm512_permutexvar_ps(code, cv);
                float *a = accp + s * P->PB + 16 * ch;
                for (int k = 0; k < R; k++) _mm512_storeu_ps(a + k * stride, _mm512_fmadd_ps(wv[k], cen, _mm512_loadu_ps(a + k * stride)));
            }
        }
    }
}
#else
static inline float exp_sum(float *s, int64_t n, float mx) {
    float sum = 0.f;
    for (int64_t i = 0; i < n; i++) {
        s[i] = expf(s[i] - mx);
        sum += s[i];
    }
    return sum;
}
#endif

static void run_task(const ctx_t *c, int64_t task, float *scores, float *work) {
    const int64_t *p = c->p;
    const int64_t M = c->M, d = c->d;
    const int full_task = task >= c->B * c->Hkv * c->nblk;
    int64_t bh, t0, cnt;
    if (full_task) {
        bh = task - c->B * c->Hkv * c->nblk;
        t0 = 0;
        cnt = c->W;
    } else {
        bh = task / c->nblk;
        t0 = (task % c->nblk) * c->block;
        cnt = c->N - t0 < c->block ? c->N - t0 : c->block;
    }
    const int64_t b = bh / c->Hkv, h = bh % c->Hkv;
    float *t_max = c->t_max + task * M, *t_sum = c->t_sum + task * M, *t_mass = c->t_mass + task * M;
    float *t_acc = c->t_acc + task * M * d;
    float y[MAX_DIM] __attribute__((aligned(64)));
    const float scaling = (float)c->scaling;
    const int64_t col0 = full_task ? c->N : t0; /* mask column of the block's first token */

    /* 1. scores [M, cnt] (before the mask) */
    if (full_task) {
        const float *fk = (const float *)(intptr_t)p[P_FK] + bh * c->W * d;
        const float *q = c->q + bh * M * d;
        for (int64_t i = 0; i < cnt; i++)
            for (int64_t r = 0; r < M; r++) scores[r * cnt + i] = dot(q + r * d, fk + i * d, d) * scaling;
    } else {
        const uint8_t *kc = (const uint8_t *)(intptr_t)p[P_KC] + b * p[P_KC_SB] + h * p[P_KC_SH];
        const void *kn = (const void *)(intptr_t)p[P_KN];
        const int64_t kn_base = b * p[P_KN_SB] + h * p[P_KN_SH];
        const float *qoff = c->qoff + bh * M;
        float *norms = work; /* [cnt] */
        for (int64_t i = 0; i < cnt; i++) norms[i] = load_norm(kn, (int)p[P_KN_TYPE], kn_base + (t0 + i) * p[P_KN_ST]);
#ifdef TQ_AVX512
        if (c->kp.on) {
            const int64_t qs = (int64_t)c->kp.per * c->kp.PB;
            const float *qp = c->qplan + bh * M * qs;
            for (int64_t r0 = 0; r0 < M; r0 += 4) {
                const int64_t R = M - r0 < 4 ? M - r0 : 4;
                float *dots = scores + r0 * cnt;
                switch (R) {
                case 1: planar_scores(1, &c->kp, kc, p[P_KC_ST], t0, cnt, qp + r0 * qs, qs, dots); break;
                case 2: planar_scores(2, &c->kp, kc, p[P_KC_ST], t0, cnt, qp + r0 * qs, qs, dots); break;
                case 3: planar_scores(3, &c->kp, kc, p[P_KC_ST], t0, cnt, qp + r0 * qs, qs, dots); break;
                default: planar_scores(4, &c->kp, kc, p[P_KC_ST], t0, cnt, qp + r0 * qs, qs, dots); break;
                }
            }
        } else
#endif
        {
            const float *qrot = c->qrot + bh * M * d;
            for (int64_t i = 0; i < cnt; i++) {
                decode(kc + (t0 + i) * p[P_KC_ST], &c->ks, y);
                for (int64_t r = 0; r < M; r++) scores[r * cnt + i] = dot(qrot + r * d, y, d);
            }
        }
        for (int64_t r = 0; r < M; r++) {
            float *s = scores + r * cnt;
            const float off = qoff[r];
            for (int64_t i = 0; i < cnt; i++) s[i] = (s[i] * norms[i] + off) * scaling;
        }
    }
    /* 2. mask, then the block softmax with its own max (rows fully masked here: max -inf, sum 0) */
    for (int64_t r = 0; r < M; r++) {
        float *s = scores + r * cnt;
        if (p[P_MASK]) {
            const int64_t base = mask_row(c, b, h, r), mst = p[P_M_ST];
            if (p[P_MASK_TYPE] == 0) {
                const uint8_t *m = (const uint8_t *)(intptr_t)p[P_MASK] + base;
                for (int64_t i = 0; i < cnt; i++)
                    if (!m[(col0 + i) * mst]) s[i] = -INFINITY;
            } else {
                const float *m = (const float *)(intptr_t)p[P_MASK] + base;
                for (int64_t i = 0; i < cnt; i++) s[i] += m[(col0 + i) * mst];
            }
        }
        float mx = -INFINITY;
        int bad = 0; /* a NaN or +inf score makes softmax NaN, as in full-precision attention */
        for (int64_t i = 0; i < cnt; i++) {
            mx = s[i] > mx ? s[i] : mx;
            bad |= (s[i] != s[i]) | (s[i] == INFINITY);
        }
        float sum = 0.f;
        if (bad) {
            mx = sum = NAN;
            for (int64_t i = 0; i < cnt; i++) s[i] = NAN;
        } else if (mx == -INFINITY) {
            for (int64_t i = 0; i < cnt; i++) s[i] = 0.f;
        } else {
            sum = exp_sum(s, cnt, mx);
        }
        t_max[r] = mx;
        t_sum[r] = sum;
        t_mass[r] = full_task ? 0.f : sum;
    }
    /* 3. values */
    memset(t_acc, 0, sizeof(float) * M * d);
    if (full_task) {
        const float *fv = (const float *)(intptr_t)p[P_FV] + bh * c->W * d;
        for (int64_t i = 0; i < cnt; i++)
            for (int64_t r = 0; r < M; r++) axpy(scores[r * cnt + i], fv + i * d, t_acc + r * d, d);
        return;
    }
    const uint8_t *vc = (const uint8_t *)(intptr_t)p[P_VC] + b * p[P_VC_SB] + h * p[P_VC_SH];
    const void *vn = (const void *)(intptr_t)p[P_VN];
    const int64_t vn_base = b * p[P_VN_SB] + h * p[P_VN_SH];
    /* weights p·‖v‖ in place */
    for (int64_t i = 0; i < cnt; i++) {
        const float norm = load_norm(vn, (int)p[P_VN_TYPE], vn_base + (t0 + i) * p[P_VN_ST]);
        for (int64_t r = 0; r < M; r++) scores[r * cnt + i] *= norm;
    }
#ifdef TQ_AVX512
    if (c->vp.on) {
        const planar_t *P = &c->vp;
        const int64_t stride = (int64_t)P->per * P->PB;
        float *accp = work; /* [4][per·PB] */
        for (int64_t r0 = 0; r0 < M; r0 += 4) {
            const int64_t R = M - r0 < 4 ? M - r0 : 4;
            memset(accp, 0, sizeof(float) * R * stride);
            const float *wr = scores + r0 * cnt;
            switch (R) {
            case 1: planar_values(1, P, vc, p[P_VC_ST], t0, cnt, wr, accp); break;
            case 2: planar_values(2, P, vc, p[P_VC_ST], t0, cnt, wr, accp); break;
            case 3: planar_values(3, P, vc, p[P_VC_ST], t0, cnt, wr, accp); break;
            default: planar_values(4, P, vc, p[P_VC_ST], t0, cnt, wr, accp); break;
            }
            for (int64_t k = 0; k < R; k++)
                for (int s = 0; s < P->per; s++)
                    for (int64_t j = 0; j < P->nbytes; j++) {
                        const int64_t coord = j * P->per + s;
                        if (coord < d) t_acc[(r0 + k) * d + coord] = accp[k * stride + s * P->PB + j];
                    }
        }
        return;
    }
#endif
    for (int64_t i = 0; i < cnt; i++) {
        decode(vc + (t0 + i) * p[P_VC_ST], &c->vs, y);
        for (int64_t r = 0; r < M; r++) {
            const float w = scores[r * cnt + i];
            if (w != 0.f) axpy(w, y, t_acc + r * d, d);
        }
    }
}

typedef struct {
    const ctx_t *c;
    int tid;
    int err;
} worker_t;

static void *worker(void *arg) {
    worker_t *w = (worker_t *)arg;
    const ctx_t *c = w->c;
    const int64_t rows = c->block > c->W ? c->block : c->W;
    float *scores = (float *)malloc(sizeof(float) * (size_t)(c->M * (rows > 0 ? rows : 1)));
    float *work = (float *)aligned_alloc(64, sizeof(float) * (size_t)(c->block + 4 * (c->d + 128)));
    if (!scores || !work) {
        w->err = 1;
    } else {
        for (int64_t task = w->tid; task < c->ntasks; task += c->nthreads) run_task(c, task, scores, work);
    }
    free(scores);
    free(work);
    return NULL;
}

/* Returns 0 on success, 1 when out of memory. */
int tq_decode_attention(const int64_t *p, double scaling) {
    ctx_t c;
    memset(&c, 0, sizeof(c));
    c.p = p;
    c.scaling = scaling;
    c.B = p[P_B]; c.Hkv = p[P_HKV]; c.G = p[P_G]; c.L = p[P_L]; c.M = c.G * c.L; c.d = p[P_D];
    c.N = p[P_N]; c.W = p[P_W]; c.block = p[P_BLOCK];
    c.nblk = c.N ? (c.N + c.block - 1) / c.block : 0;
    const int64_t BH = c.B * c.Hkv, M = c.M, d = c.d;
    c.ntasks = BH * c.nblk + (c.W ? BH : 0);
    c.ks = read_spec(p + P_KSPEC);
    c.vs = read_spec(p + P_VSPEC);
    c.q = (const float *)(intptr_t)p[P_Q];
    const float *Pk = (const float *)(intptr_t)p[P_PK], *Pv = (const float *)(intptr_t)p[P_PV];
    const float *koff = (const float *)(intptr_t)p[P_KOFF], *voff = (const float *)(intptr_t)p[P_VOFF];

    float *qrot = (float *)malloc(sizeof(float) * (size_t)(BH * M * d));
    float *qoff = (float *)calloc((size_t)(BH * M), sizeof(float));
    const size_t nt = (size_t)(c.ntasks ? c.ntasks : 1);
    float *t_stats = (float *)malloc(sizeof(float) * nt * (size_t)M * 3);
    float *t_acc = (float *)malloc(sizeof(float) * nt * (size_t)(M * d));
    c.kp = make_planar(&c.ks, d);
    c.vp = make_planar(&c.vs, d);
    const int64_t qs = c.kp.on ? (int64_t)c.kp.per * c.kp.PB : 0;
    float *qplan = c.kp.on ? (float *)calloc((size_t)(BH * M * qs), sizeof(float)) : NULL;
    int err = !qrot || !qoff || !t_stats || !t_acc || (c.kp.on && !qplan);
    if (err) goto done;
    c.qrot = qrot; c.qoff = qoff;
    c.t_max = t_stats; c.t_sum = t_stats + nt * M; c.t_mass = t_stats + 2 * nt * M; c.t_acc = t_acc;

    /* query rotated once (Π q: rotation.rotate) and <q, μ_k> per row */
    if (c.N) {
        for (int64_t bh = 0; bh < BH; bh++)
            for (int64_t r = 0; r < M; r++) {
                const float *q = c.q + (bh * M + r) * d;
                float *qr = qrot + (bh * M + r) * d;
                for (int64_t k = 0; k < d; k++) qr[k] = dot(Pk + k * d, q, d);
                if (koff) qoff[bh * M + r] = dot(q, koff + bh * d, d);
                if (c.kp.on)
                    for (int s = 0; s < c.kp.per; s++)
                        for (int64_t j = 0; j < c.kp.nbytes; j++)
                            if (j * c.kp.per + s < d) qplan[(bh * M + r) * qs + s * c.kp.PB + j] = qr[j * c.kp.per + s];
            }
    }
    c.qplan = qplan;

    int64_t nthreads = p[P_THREADS];
    if (nthreads > c.ntasks) nthreads = c.ntasks;
    if (nthreads < 1) nthreads = 1;
    c.nthreads = (int)nthreads;
    worker_t ws[64];
    pthread_t th[64];
    if (c.nthreads > 64) c.nthreads = 64;
    int started[64] = {0};
    for (int t = 0; t < c.nthreads; t++) {
        ws[t].c = &c; ws[t].tid = t; ws[t].err = 0;
    }
    for (int t = 1; t < c.nthreads; t++) started[t] = pthread_create(&th[t], NULL, worker, &ws[t]) == 0;
    /* a thread that failed to start leaves its tasks to the calling thread */
    for (int t = 1; t < c.nthreads; t++)
        if (!started[t]) worker(&ws[t]);
    worker(&ws[0]);
    for (int t = 1; t < c.nthreads; t++)
        if (started[t]) pthread_join(th[t], NULL);
    for (int t = 0; t < c.nthreads; t++) err |= ws[t].err;
    if (err) goto done;

    /* merge blocks: rescale by exp(block max - row max); rotate the value sum back once (y Π) */
    float *out = (float *)(intptr_t)p[P_OUT];
    float acc_rot[MAX_DIM], acc_full[MAX_DIM];
    for (int64_t bh = 0; bh < BH; bh++)
        for (int64_t r = 0; r < M; r++) {
            float mx = -INFINITY;
            for (int64_t k = 0; k < c.nblk; k++) {
                const float v = c.t_max[(bh * c.nblk + k) * M + r];
                mx = v > mx ? v : mx;
            }
            const int64_t ftask = BH * c.nblk + bh;
            if (c.W) mx = c.t_max[ftask * M + r] > mx ? c.t_max[ftask * M + r] : mx;
            float denom = 0.f, mass = 0.f;
            memset(acc_rot, 0, sizeof(float) * d);
            memset(acc_full, 0, sizeof(float) * d);
            if (mx != -INFINITY) {
                for (int64_t k = 0; k < c.nblk; k++) {
                    const int64_t task = bh * c.nblk + k;
                    const float bm = c.t_max[task * M + r];
                    if (bm == -INFINITY) continue;
                    const float scale = expf(bm - mx);
                    denom += scale * c.t_sum[task * M + r];
                    mass += scale * c.t_mass[task * M + r];
                    axpy(scale, c.t_acc + (task * M + r) * d, acc_rot, d);
                }
                if (c.W && c.t_max[ftask * M + r] != -INFINITY) {
                    const float scale = expf(c.t_max[ftask * M + r] - mx);
                    denom += scale * c.t_sum[ftask * M + r];
                    axpy(scale, c.t_acc + (ftask * M + r) * d, acc_full, d);
                }
            }
            const float inv = denom > 0.f ? 1.f / denom : 1.f;
            float *o = out + (bh * M + r) * d;
            for (int64_t j = 0; j < d; j++) o[j] = acc_full[j];
            if (c.nblk) {
                for (int64_t k = 0; k < d; k++) axpy(acc_rot[k], Pv + k * d, o, d);
                if (voff) axpy(mass, voff + bh * d, o, d);
            }
            for (int64_t j = 0; j < d; j++) o[j] *= inv;
        }
done:
    free(qrot);
    free(qoff);
    free(qplan);
    free(t_stats);
    free(t_acc);
    return err;
}
