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
    const int64_t *p;
    double scaling;
    int64_t B, Hkv, G, L, M, d, N, W, block, nblk, ntasks;
    spec_t ks, vs;
    const float *qrot, *qoff, *q;
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
        for (int j = 0; j < full; j++) memcpy(out + j * per, table + (int)p[j] * per, sizeof(float) * per);
        const int rest = n - full * per;
        if (rest) memcpy(out + full * per, table + (int)p[full] * per, sizeof(float) * rest);
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

/* additive mask value of (row r of kv head h in batch b, column t) */
static inline float mask_at(const ctx_t *c, int64_t b, int64_t h, int64_t r, int64_t t) {
    const int64_t *p = c->p;
    if (!p[P_MASK]) return 0.f;
    const int64_t g = r / c->L, l = r % c->L, hq = h * c->G + g;
    const int64_t off = b * p[P_M_SB] + hq * p[P_M_SH] + l * p[P_M_SL] + t * p[P_M_ST];
    if (p[P_MASK_TYPE] == 0) return ((const uint8_t *)(intptr_t)p[P_MASK])[off] ? 0.f : -INFINITY;
    return ((const float *)(intptr_t)p[P_MASK])[off];
}

static void run_task(const ctx_t *c, int64_t task, float *scores) {
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

    /* scores [M, cnt] */
    if (full_task) {
        const float *fk = (const float *)(intptr_t)p[P_FK] + bh * c->W * d;
        const float *q = c->q + bh * M * d;
        for (int64_t i = 0; i < cnt; i++)
            for (int64_t r = 0; r < M; r++)
                scores[r * cnt + i] = dot(q + r * d, fk + i * d, d) * scaling + mask_at(c, b, h, r, c->N + i);
    } else {
        const uint8_t *kc = (const uint8_t *)(intptr_t)p[P_KC] + b * p[P_KC_SB] + h * p[P_KC_SH];
        const void *kn = (const void *)(intptr_t)p[P_KN];
        const int64_t kn_base = b * p[P_KN_SB] + h * p[P_KN_SH];
        const float *qrot = c->qrot + bh * M * d, *qoff = c->qoff + bh * M;
        for (int64_t i = 0; i < cnt; i++) {
            const int64_t t = t0 + i;
            decode(kc + t * p[P_KC_ST], &c->ks, y);
            const float norm = load_norm(kn, (int)p[P_KN_TYPE], kn_base + t * p[P_KN_ST]);
            for (int64_t r = 0; r < M; r++)
                scores[r * cnt + i] = (dot(qrot + r * d, y, d) * norm + qoff[r]) * scaling + mask_at(c, b, h, r, t);
        }
    }
    /* block softmax with its own max (rows fully masked here keep max = -inf, sum = 0) */
    for (int64_t r = 0; r < M; r++) {
        float *s = scores + r * cnt;
        float mx = -INFINITY;
        for (int64_t i = 0; i < cnt; i++) mx = s[i] > mx ? s[i] : mx;
        t_max[r] = mx;
        float sum = 0.f;
        if (mx == -INFINITY) {
            for (int64_t i = 0; i < cnt; i++) s[i] = 0.f;
        } else {
            for (int64_t i = 0; i < cnt; i++) {
                s[i] = expf(s[i] - mx);
                sum += s[i];
            }
        }
        t_sum[r] = sum;
        t_mass[r] = full_task ? 0.f : sum;
    }
    memset(t_acc, 0, sizeof(float) * M * d);
    if (full_task) {
        const float *fv = (const float *)(intptr_t)p[P_FV] + bh * c->W * d;
        for (int64_t i = 0; i < cnt; i++)
            for (int64_t r = 0; r < M; r++) axpy(scores[r * cnt + i], fv + i * d, t_acc + r * d, d);
    } else {
        const uint8_t *vc = (const uint8_t *)(intptr_t)p[P_VC] + b * p[P_VC_SB] + h * p[P_VC_SH];
        const void *vn = (const void *)(intptr_t)p[P_VN];
        const int64_t vn_base = b * p[P_VN_SB] + h * p[P_VN_SH];
        for (int64_t i = 0; i < cnt; i++) {
            const int64_t t = t0 + i;
            const float norm = load_norm(vn, (int)p[P_VN_TYPE], vn_base + t * p[P_VN_ST]);
            decode(vc + t * p[P_VC_ST], &c->vs, y);
            for (int64_t r = 0; r < M; r++) {
                const float w = scores[r * cnt + i] * norm;
                if (w != 0.f) axpy(w, y, t_acc + r * d, d);
            }
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
    if (!scores) {
        w->err = 1;
        return NULL;
    }
    for (int64_t task = w->tid; task < c->ntasks; task += c->nthreads) run_task(c, task, scores);
    free(scores);
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
    int err = !qrot || !qoff || !t_stats || !t_acc;
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
            }
    }

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
        if (!started[t]) {
            const ctx_t *cc = &c;
            float *scores = (float *)malloc(sizeof(float) * (size_t)(M * (c.block > c.W ? c.block : (c.W ? c.W : 1))));
            if (!scores) { err = 1; continue; }
            for (int64_t task = t; task < c.ntasks; task += c.nthreads) run_task(cc, task, scores);
            free(scores);
        }
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
    free(t_stats);
    free(t_acc);
    return err;
}
