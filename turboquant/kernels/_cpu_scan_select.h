/* Top-L selection of the fast scan (included by _cpu_scan.c): a buffer of 2L candidates cut back
 * to the best L by a branchless quickselect. */

/* Candidates above the current threshold go to a buffer of 2L; a full buffer is cut back to its
 * best L by quickselect, whose L-th entry becomes the threshold. Order: higher score first, then
 * smaller index, so the kept set is exactly the top-L of one pass in index order. */
typedef struct {
    float s;
    int64_t i;
} cand_t;

static inline int better(cand_t a, cand_t b) { return a.s > b.s || (a.s == b.s && a.i < b.i); }

/* The k-th largest of x[0..n) (1 <= k <= n), by quickselect with branchless partitions (random
 * scores make a branchy partition mispredict on every other element). x and y (scratch, n) are
 * both overwritten. */
static float kth_largest(float *x, float *y, int64_t n, int64_t k) {
    for (;;) {
        if (n <= 8) { /* selection sort of the few left, descending */
            for (int64_t i = 0; i < k; i++)
                for (int64_t j = i + 1; j < n; j++)
                    if (x[j] > x[i]) {
                        float t = x[i];
                        x[i] = x[j];
                        x[j] = t;
                    }
            return x[k - 1];
        }
        float a = x[0], b = x[n / 2], c = x[n - 1]; /* median of three */
        float p = a > b ? (b > c ? b : (a > c ? c : a)) : (a > c ? a : (b > c ? c : b));
        int64_t lo = 0, hi = n; /* y[0..lo): > p, y[hi..n): < p */
        for (int64_t i = 0; i < n; i++) {
            float v = x[i];
            y[lo] = v;
            y[hi - 1] = v;
            lo += v > p;
            hi -= v < p;
        }
        if (k <= lo) {
            n = lo;
        } else if (k <= hi) {
            return p;
        } else {
            k -= hi;
            n -= hi;
            y += hi;
        }
        float *t = x;
        x = y;
        y = t;
    }
}

typedef struct {
    cand_t *buf; /* 2L */
    float *tmp;  /* 4L scratch */
    int64_t size, L;
    cand_t worst; /* the L-th best once the buffer was cut (threshold), else -inf */
} topl_t;

/* Keep the best L of the buffer: those scoring above the L-th largest score, then those equal to
 * it by smallest index. Branchless compaction. */
static void topl_cut(topl_t *t) {
    int64_t n = t->size, L = t->L;
    for (int64_t k = 0; k < n; k++) t->tmp[k] = t->buf[k].s;
    float thr = kth_largest(t->tmp, t->tmp + n, n, L);
    int64_t kept = 0, nt = 0;
    cand_t *tie = (cand_t *)alloca(sizeof(cand_t) * (size_t)n);
    for (int64_t k = 0; k < n; k++) {
        cand_t c = t->buf[k];
        t->buf[kept] = c;
        tie[nt] = c;
        kept += c.s > thr;
        nt += c.s == thr;
    }
    /* ties at the threshold: the smallest indices win (few in practice: repeated minimum) */
    int64_t worst_i = INT64_MIN;
    for (int64_t r = 0; kept < L; r++) {
        int64_t best = r;
        for (int64_t k = r + 1; k < nt; k++)
            if (tie[k].i < tie[best].i) best = k;
        cand_t x = tie[best];
        tie[best] = tie[r];
        tie[r] = x;
        t->buf[kept++] = x;
        worst_i = x.i;
    }
    t->size = kept;
    t->worst.s = thr;
    t->worst.i = worst_i; /* the last tie taken is the worst kept; none taken: any index loses to thr's */
}

static inline void topl_push(topl_t *t, float s, int64_t i) {
    cand_t c = {s, i};
    if (!better(c, t->worst)) return;
    t->buf[t->size++] = c;
    if (t->size == 2 * t->L) topl_cut(t);
}

