/* Fast-scan of 4-bit nibble codes with 8-bit lookup tables and a per-vector factor.
 *
 * Layout (built by tq_scan_pack): vectors in blocks of 64; a block holds Mp/2 rows of 64 bytes
 * (Mp even, padding nibbles 0). Row p holds positions 2p (low nibbles) and 2p+1 (high nibbles)
 * of the block's 64 vectors, one byte per vector, in the order the SIMD fold emits them (see
 * slot_of): four 16-byte lanes of 16 vectors each. One byte shuffle with a lane-broadcast table
 * then does 64 (AVX2: two lanes) or 128 (AVX-512: four lanes, two nibbles) lookups of different
 * vectors, so no lanes need to be summed at the end of a block.
 *
 * Per query, a table LUT[m][v] (16 entries per position) is quantized to uint8 with one scale
 * per query and a bias per position (tq_scan_luts); lookups are summed in uint16 (even and odd
 * bytes: a0 += r, a1 += r >> 8, even = a0 - (a1 << 8)) and folded into uint32 every 256
 * positions, so sums never overflow at any M. The score of vector i is
 *     s_i = alpha_i * (sum_i * inv_a + bias) + beta_i
 * (alpha: the stored norm, or norm/||y_hat||; beta: -||x||^2 for L2, else absent), applied in the
 * scan, so one pass over all vectors yields the top-L by the norm-aware score. Floating-point
 * operations are plain IEEE float ops (the file is built with -ffp-contract=off): the scalar and
 * SIMD paths give bit-identical scores, and a numpy reference can reproduce them exactly.
 * Ties are broken towards the smaller vector index, so splitting the vectors into ranges and
 * merging gives the same result as one pass. Selection: candidates at or above the current
 * threshold are buffered and the buffer cut back to the best L by quickselect when full.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <alloca.h>

#if defined(TQ_SCALAR)
#undef __AVX2__
#undef __AVX512BW__
#endif
#if defined(__AVX2__) || defined(__AVX512BW__)
#include <immintrin.h>
#endif
/* Layout 1 (AVX-512 VBMI + VNNI; TQ_NO_VNNI keeps layout 0 for tests): 16-vector sub-blocks whose
 * 64-byte rows hold 8 positions of 16 vectors (byte 4i + t: vector i, low nibble position 8r + t,
 * high nibble 8r + 4 + t). One vpermb with a 64-byte table (4 positions x 16 entries) looks up 64
 * nibbles of 16 vectors at 4 positions, and vpdpbusd adds each vector's 4 bytes into its uint32
 * sum: 4 ops per 128 lookups instead of 8, no uint16 flushes, no even/odd fold. */
#if defined(__AVX512VBMI__) && defined(__AVX512VNNI__) && defined(__AVX512BW__) && !defined(TQ_NO_VNNI)
#define TQ_VNNI 1
#define MPAD 8 /* positions padded to whole rows of 8 */
#else
#define MPAD 2
#endif

#define BV 64      /* vectors per block */
#define FLUSH 256  /* positions summed in uint16 before folding into uint32 */
#define PREFETCH 4096 /* bytes ahead: a single query streams the codes from L3 (d=384: 2x faster) */

/* Positions per row of the layout: the caller pads M to a multiple of it (zero tables). */
int tq_scan_mpad(void) { return MPAD; }

int tq_scan_isa(void) {
#if defined(TQ_VNNI)
    return 513;
#elif defined(__AVX512BW__)
    return 512;
#elif defined(__AVX2__)
    return 256;
#else
    return 0;
#endif
}

/* Byte of a 64-byte row that holds vector v of the block: vector v = 16q + 8h + i comes out of
 * the fold's u32 register q from (q odd: high, even: low) unpacked words of lane 2*(q/2) + h. */
static inline int slot_of(int v) {
    int q = v >> 4, h = (v >> 3) & 1, i = v & 7;
    return 16 * (2 * (q >> 1) + h) + 8 * (q & 1) + i;
}

/* Nibble m < M of a source row: two per byte (low first), or with a table one per source byte,
 * table[src[m]] (a stored code byte mapped to the nibble it scans); 0 past M (padding). */
static inline uint8_t nibble_at(const uint8_t *src, int64_t m, int64_t M, const uint8_t *table, int64_t row_bytes) {
    if (m >= M || (table ? m : m >> 1) >= row_bytes) return 0; /* padding nibbles past the row */
    return table ? table[src[m]] : (uint8_t)((src[m >> 1] >> (4 * (m & 1))) & 15);
}

/* Write vectors first..first+rows-1 (source row r at src + r*row_bytes, nibbles as nibble_at reads
 * them) into the blocked layout. Blocks touched must exist; their other vectors are left as they are. */
void tq_scan_pack(const uint8_t *src0, int64_t rows, int64_t row_bytes, int64_t M, int64_t Mp, int64_t first,
                  uint8_t *blocks, const uint8_t *table) {
#if defined(TQ_VNNI)
    for (int64_t r = 0; r < rows; r++) {
        int64_t g = first + r, v = g % BV;
        uint8_t *sub = blocks + (g / BV) * (Mp / 2) * BV + (v / 16) * (Mp / 8) * 64 + 4 * (v % 16);
        const uint8_t *src = src0 + r * row_bytes;
        for (int64_t row = 0; row < Mp / 8; row++)
            for (int t = 0; t < 4; t++) {
                int64_t ml = 8 * row + t;
                sub[row * 64 + t] = (uint8_t)(nibble_at(src, ml, M, table, row_bytes) | (nibble_at(src, ml + 4, M, table, row_bytes) << 4));
            }
    }
    return;
#endif
    for (int64_t r = 0; r < rows; r++) {
        int64_t g = first + r;
        uint8_t *blk = blocks + (g / BV) * (Mp / 2) * BV + slot_of((int)(g % BV));
        const uint8_t *src = src0 + r * row_bytes;
        for (int64_t p = 0; p < Mp / 2; p++) /* positions 2p, 2p+1 */
            blk[p * BV] = (uint8_t)(nibble_at(src, 2 * p, M, table, row_bytes) | (nibble_at(src, 2 * p + 1, M, table, row_bytes) << 4));
    }
}

/* Float tables of one query: lutf[m][v] = sum_s q[coords[m,s]] * cent[m,s,v] (coords -1: none), added
 * in s order. cent is (M, dsub, 16): a position's 16 entries are contiguous, so the loops vectorize. */
static void float_tables(const float *qq, const int32_t *coords, const float *cent, int64_t M, int64_t dsub,
                         float *lutf) {
    for (int64_t m = 0; m < M; m++) {
        float row[16];
        for (int v = 0; v < 16; v++) row[v] = 0.0f;
        for (int64_t s = 0; s < dsub; s++) {
            int32_t c = coords[m * dsub + s];
            if (c < 0) continue;
            float x = qq[c];
            const float *ce = cent + (m * dsub + s) * 16;
            for (int v = 0; v < 16; v++) row[v] = row[v] + x * ce[v];
        }
        memcpy(lutf + m * 16, row, sizeof(row));
    }
}

/* Quantized tables of nq queries: lutf[m][v] = sum_s q[coords[m,s]] * cent[m,s,v] (coords -1: none),
 * qlut = round((lutf - min_v lutf[m]) * a) with a = 255 / max_m(range of lutf[m]),
 * inv_a = 1/a as range/255, bias = sum_m min_v lutf[m]. qlut: (nq, Mp, 16); rows m >= M are 0. */
int tq_scan_luts(const float *q, int64_t nq, int64_t d, const int32_t *coords, const float *cent, int64_t M,
                 int64_t dsub, int64_t Mp, uint8_t *qlut, float *inv_a, float *bias) {
    float *lutf = (float *)malloc(sizeof(float) * (size_t)(M * 16 + 2 * M));
    if (!lutf) return 1;
    float *mn = lutf + M * 16, *mx = mn + M;
    for (int64_t iq = 0; iq < nq; iq++) {
        const float *qq = q + iq * d;
        float range = 0.0f;
        float_tables(qq, coords, cent, M, dsub, lutf);
        for (int64_t m = 0; m < M; m++) {
            const float *row = lutf + m * 16;
            float lo = row[0], hi = row[0];
            for (int v = 1; v < 16; v++) {
                lo = row[v] < lo ? row[v] : lo;
                hi = row[v] > hi ? row[v] : hi;
            }
            mn[m] = lo;
            mx[m] = hi;
            float r = hi - lo;
            range = r > range ? r : range;
        }
        float a = range > 0.0f ? 255.0f / range : 1.0f;
        inv_a[iq] = range > 0.0f ? range / 255.0f : 1.0f;
        double b = 0.0;
        uint8_t *out = qlut + iq * Mp * 16;
        for (int64_t m = 0; m < M; m++) {
            b += mn[m];
            for (int v = 0; v < 16; v++) {
                float t = (lutf[m * 16 + v] - mn[m]) * a;
                t = t + 0.5f;
                int u = (int)t;
                out[m * 16 + v] = (uint8_t)(u > 255 ? 255 : (u < 0 ? 0 : u));
            }
        }
        memset(out + M * 16, 0, (size_t)((Mp - M) * 16));
        bias[iq] = (float)b;
    }
    free(lutf);
    return 0;
}

/* ------------------------------------------------------------------ sums of one block */

#include "_cpu_scan_sums.h"

/* Sums of a group of nqg <= QB queries, with the group size a compile-time constant in each branch. */
static void group_sums(const uint8_t *blk, const uint8_t *const *lut, int64_t Mp, uint32_t *out, int nqg) {
    switch (nqg) {
#if QB >= 4
    case 4: block_sums(blk, lut, Mp, out, 4); break;
    case 3: block_sums(blk, lut, Mp, out, 3); break;
#endif
#if QB >= 2
    case 2: block_sums(blk, lut, Mp, out, 2); break;
#endif
    default: block_sums(blk, lut, Mp, out, 1); break;
    }
}

/* Tables of queries g..g+QB-1 (a last, smaller group repeats query nq-1 in unused slots). */
static inline void group_luts(const uint8_t *qlut, int64_t g, int64_t nq, int64_t lut_bytes, const uint8_t **lut) {
    for (int k = 0; k < QB; k++) lut[k] = qlut + (g + k < nq ? g + k : nq - 1) * lut_bytes;
}

/* Raw uint32 sums of nq queries over nblocks blocks, out (nq, nblocks*BV) (tests compare them with
 * integer references). */
void tq_scan_sums(const uint8_t *blocks, int64_t nblocks, int64_t Mp, const uint8_t *qlut, int64_t nq, uint32_t *out) {
    uint32_t sums[QB * BV];
    const uint8_t *lut[QB];
    for (int64_t g = 0; g < nq; g += QB) {
        group_luts(qlut, g, nq, Mp * 16, lut);
        int nqg = nq - g < QB ? (int)(nq - g) : QB;
        for (int64_t b = 0; b < nblocks; b++) {
            group_sums(blocks + b * (Mp / 2) * BV, lut, Mp, sums, nqg);
            for (int k = 0; k < nqg; k++) memcpy(out + (g + k) * nblocks * BV + b * BV, sums + BV * k, BV * 4);
        }
    }
}

/* ------------------------------------------------------------------ scores of one block */

/* sc[j] = al[j] * ((float)sums[j] * ia + bs) (+ be[j]) for j < 64; returns the mask of sc[j] >= thr.
 * Every path does the same IEEE float operations in the same order (no FMA contraction). */
static inline uint64_t block_scores(const uint32_t *sums, const float *al, const float *be, float ia, float bs, float thr,
                                    float *sc) {
    uint64_t mask = 0;
#if defined(__AVX512BW__)
    for (int h = 0; h < BV / 16; h++) {
        __m512 t = _mm512_cvtepi32_ps(_mm512_loadu_si512((const void *)(sums + 16 * h)));
        t = _mm512_add_ps(_mm512_mul_ps(t, _mm512_set1_ps(ia)), _mm512_set1_ps(bs));
        t = _mm512_mul_ps(_mm512_loadu_ps(al + 16 * h), t);
        if (be) t = _mm512_add_ps(t, _mm512_loadu_ps(be + 16 * h));
        _mm512_storeu_ps(sc + 16 * h, t);
        mask |= (uint64_t)_mm512_cmp_ps_mask(t, _mm512_set1_ps(thr), _CMP_GE_OQ) << (16 * h);
    }
#elif defined(__AVX2__)
    for (int h = 0; h < BV / 8; h++) {
        __m256 t = _mm256_cvtepi32_ps(_mm256_loadu_si256((const __m256i *)(sums + 8 * h)));
        t = _mm256_add_ps(_mm256_mul_ps(t, _mm256_set1_ps(ia)), _mm256_set1_ps(bs));
        t = _mm256_mul_ps(_mm256_loadu_ps(al + 8 * h), t);
        if (be) t = _mm256_add_ps(t, _mm256_loadu_ps(be + 8 * h));
        _mm256_storeu_ps(sc + 8 * h, t);
        mask |= (uint64_t)(uint32_t)_mm256_movemask_ps(_mm256_cmp_ps(t, _mm256_set1_ps(thr), _CMP_GE_OQ)) << (8 * h);
    }
#else
    for (int j = 0; j < BV; j++) {
        float t = (float)(int32_t)sums[j] * ia;
        t = t + bs;
        t = al[j] * t;
        if (be) t = t + be[j];
        sc[j] = t;
        mask |= (uint64_t)(t >= thr) << j;
    }
#endif
    return mask;
}

/* ------------------------------------------------------------------ top-L selection */

#include "_cpu_scan_select.h"

#define SAMPLE_STEP 16   /* every 16th block of a long range is scored first to estimate the threshold */
#define SAMPLE_MIN_L 128 /* below, the running threshold's cuts cost less than the sample (50k vectors, d = 96) */

/* Top-L of vectors [v0, v1) (v0 a multiple of BV) for nq queries with tables qlut (nq, Mp, 16).
 * Output (nq, L) scores and indices, unordered; slots beyond the range size hold -inf / -1.
 * Blocks are visited in chunks that stay in cache while every query scans them.
 *
 * With sample (L >= SAMPLE_MIN_L, ranges of at least 64 L vectors): every SAMPLE_STEP-th block is scored first and
 * the r-th best sampled score, r set so that ~3L vectors of the range are expected above it,
 * becomes the starting threshold. Without it the running threshold starts at -inf and the buffer
 * is cut ~L ln(n / L) / L times (for L = 250 over 50k vectors that selection cost as much as the
 * scan). The result is still the exact top-L: at least L vectors at or above the estimate mean
 * the L-th best is above it too; a query with fewer (an unlucky sample) is scanned again from -inf. */
static int scan_search(const uint8_t *blocks, int64_t v0, int64_t v1, int64_t Mp, const float *alpha, const float *beta,
                       const uint8_t *qlut, const float *inv_a, const float *bias, int64_t nq, int64_t L, float *out_s,
                       int64_t *out_i, int sample) {
    if (v0 % BV) return 2;
    topl_t *tops = (topl_t *)calloc((size_t)(nq > 0 ? nq : 1), sizeof(topl_t));
    cand_t *bufs = (cand_t *)malloc(sizeof(cand_t) * (size_t)(nq > 0 ? nq : 1) * 2 * (size_t)L);
    float *tmps = (float *)malloc(sizeof(float) * (size_t)(nq > 0 ? nq : 1) * 4 * (size_t)L);
    if (!tops || !bufs || !tmps) {
        free(tops);
        free(bufs);
        free(tmps);
        return 1;
    }
    for (int64_t q = 0; q < nq; q++) {
        tops[q].buf = bufs + q * 2 * L;
        tops[q].tmp = tmps + q * 4 * L;
        tops[q].L = L;
        tops[q].worst.s = -INFINITY;
        tops[q].worst.i = INT64_MAX;
    }
    int64_t block_bytes = (Mp / 2) * BV, lut_bytes = Mp * 16;
    int64_t chunk = (1 << 17) / block_bytes;
    if (chunk < 1) chunk = 1;
    int64_t b_first = v0 / BV, b_end = (v1 + BV - 1) / BV;
    uint32_t sums[QB * BV] __attribute__((aligned(64)));
    float sc[BV] __attribute__((aligned(64)));
    float al_tail[BV], be_tail[BV];
    const uint8_t *lut[QB];
    int64_t ns_blocks = (b_end - b_first - 1) / SAMPLE_STEP; /* full blocks only: the last one may be partial */
    sample = sample && L >= SAMPLE_MIN_L && v1 - v0 >= 64 * L && ns_blocks >= 4;
    if (sample) {
        int64_t ns = ns_blocks * BV, r = (3 * L * ns + (v1 - v0) - 1) / (v1 - v0);
        r = r < 1 ? 1 : (r > ns ? ns : r);
        float *smp = (float *)malloc(sizeof(float) * (size_t)(2 * ns));
        if (!smp) {
            sample = 0;
        } else {
            for (int64_t g = 0; g < nq; g += QB) {
                group_luts(qlut, g, nq, lut_bytes, lut);
                int nqg = nq - g < QB ? (int)(nq - g) : QB;
                /* one pass over the sampled blocks per group of queries, scores kept per query */
                float *per = (float *)malloc(sizeof(float) * (size_t)(nqg * ns));
                if (!per) continue;
                for (int64_t sbk = 0; sbk < ns_blocks; sbk++) {
                    int64_t b = b_first + sbk * SAMPLE_STEP;
                    group_sums(blocks + b * block_bytes, lut, Mp, sums, nqg);
                    for (int k = 0; k < nqg; k++)
                        block_scores(sums + BV * k, alpha + b * BV, beta ? beta + b * BV : NULL, inv_a[g + k], bias[g + k],
                                     -INFINITY, per + k * ns + sbk * BV);
                }
                for (int k = 0; k < nqg; k++) {
                    memcpy(smp, per + k * ns, sizeof(float) * (size_t)ns);
                    tops[g + k].worst.s = kth_largest(smp, smp + ns, ns, r);
                }
                free(per);
            }
            free(smp);
        }
    }
    for (int64_t c0 = b_first; c0 < b_end; c0 += chunk) {
        int64_t c1 = c0 + chunk < b_end ? c0 + chunk : b_end;
        for (int64_t g = 0; g < nq; g += QB) {
            group_luts(qlut, g, nq, lut_bytes, lut);
            int nqg = nq - g < QB ? (int)(nq - g) : QB;
            for (int64_t b = c0; b < c1; b++) {
                if (nqg == 1) /* one query (the single-query search): inlined, no call per block */
                    block_sums(blocks + b * block_bytes, lut, Mp, sums, 1);
                else
                    group_sums(blocks + b * block_bytes, lut, Mp, sums, nqg);
                int64_t base = b * BV, cnt = v1 - base < BV ? v1 - base : BV;
                const float *al = alpha + base, *be = beta ? beta + base : NULL;
                if (cnt < BV) { /* last partial block: factors padded so the vector code reads BV */
                    for (int j = 0; j < BV; j++) {
                        al_tail[j] = j < cnt ? al[j] : 0.0f;
                        be_tail[j] = j < cnt && be ? be[j] : 0.0f;
                    }
                    al = al_tail;
                    be = be ? be_tail : NULL;
                }
                for (int k = 0; k < QB && g + k < nq; k++) {
                    topl_t *t = tops + g + k;
                    uint64_t hit = block_scores(sums + BV * k, al, be, inv_a[g + k], bias[g + k], t->worst.s, sc);
                    if (cnt < BV) hit &= (1ull << cnt) - 1;
                    while (hit) {
                        int j = __builtin_ctzll(hit);
                        hit &= hit - 1;
                        topl_push(t, sc[j], base + j);
                    }
                }
            }
        }
    }
    int rc = 0;
    for (int64_t q = 0; q < nq; q++) {
        topl_t *t = tops + q;
        if (t->size > L) topl_cut(t);
        if (sample && t->size < L) { /* fewer than L at or above the estimate: scan this query from -inf */
            rc |= scan_search(blocks, v0, v1, Mp, alpha, beta, qlut + q * lut_bytes, inv_a + q, bias + q, 1, L,
                              out_s + q * L, out_i + q * L, 0);
            continue;
        }
        for (int64_t k = 0; k < L; k++) {
            out_s[q * L + k] = k < t->size ? t->buf[k].s : -INFINITY;
            out_i[q * L + k] = k < t->size ? t->buf[k].i : -1;
        }
    }
    free(tops);
    free(bufs);
    free(tmps);
    return rc;
}

int tq_scan_search(const uint8_t *blocks, int64_t v0, int64_t v1, int64_t Mp, const float *alpha, const float *beta,
                   const uint8_t *qlut, const float *inv_a, const float *bias, int64_t nq, int64_t L, float *out_s,
                   int64_t *out_i, int64_t sample) {
    return scan_search(blocks, v0, v1, Mp, alpha, beta, qlut, inv_a, bias, nq, L, out_s, out_i, (int)sample);
}

/* Fields of the context array (kept by the Python wrapper, refreshed when the mirror grows); the
 * split storage's fields follow (_cpu_scan_split.h). */
enum { C_BLOCKS, C_MP, C_M, C_DSUB, C_COORDS, C_CENT, C_ALPHA, C_BETA, C_D, C_XM, C_XDSUB, C_XCOORDS, C_XCENT };

/* ------------------------------------------------------------------ exact re-scoring */

/* Exact scores of shortlisted rows: out[q,c] = alpha_i * sum_m lutf[m][nibble_im] + beta_i, i = cand[q,c]
 * (skipped when i < 0), where rows (n, row_bytes) hold the nibbles of an exact plan (no bits dropped,
 * e.g. the stored 4-bit codes themselves) and lutf is the float table of that plan (no quantization). */
#if defined(__AVX512F__) && defined(__AVX512DQ__) && !defined(TQ_SCALAR)
/* Nibble n of byte b of a gathered dword (one candidate per lane) as a vpermps index (low 4 bits). */
#define NIB(g, b, n) _mm512_srli_epi32((g), 8 * (b) + 4 * (n))

/* The scalar loop below for 16 candidates at once (lanes = candidates, M = 2 * row_bytes): the
 * same float additions in the same order (acc0: even positions, acc1: odd), so the scores are
 * bit-identical; vpermps looks a position's 16-float table up for all 16 candidates. */
/* Score of 16 candidates from their even/odd position sums: alpha_i * (acc0 + acc1) (+ beta_i), -inf for
 * invalid candidates (v0/v1: the valid lanes of the two 8-candidate halves c0/c1). */
static inline void rescore16_finish(__m512 acc0, __m512 acc1, __m512i c0, __m512i c1, __mmask8 v0, __mmask8 v1,
                                    const float *alpha, const float *beta, float *out) {
    __mmask16 valid = (__mmask16)(v0 | ((unsigned)v1 << 8));
    __m512i ids = _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtepi64_epi32(c0)), _mm512_cvtepi64_epi32(c1), 1);
    __m512 sc = _mm512_mul_ps(_mm512_i32gather_ps(ids, alpha, 4), _mm512_add_ps(acc0, acc1));
    if (beta) sc = _mm512_add_ps(sc, _mm512_i32gather_ps(ids, beta, 4));
    _mm512_storeu_ps(out, _mm512_mask_blend_ps(valid, _mm512_set1_ps(-INFINITY), sc));
}

static void rescore16(const uint8_t *rows, int64_t row_bytes, const float *lutf, const int64_t *cand,
                      const float *alpha, const float *beta, float *out) {
    __m512i c0 = _mm512_loadu_si512((const void *)cand), c1 = _mm512_loadu_si512((const void *)(cand + 8));
    __mmask8 v0 = _mm512_cmpge_epi64_mask(c0, _mm512_setzero_si512()), v1 = _mm512_cmpge_epi64_mask(c1, _mm512_setzero_si512());
    c0 = _mm512_maskz_mov_epi64(v0, c0); /* invalid (-1) candidates read row 0, their score is -inf */
    c1 = _mm512_maskz_mov_epi64(v1, c1);
    __m512i o0 = _mm512_mullo_epi64(c0, _mm512_set1_epi64(row_bytes)), o1 = _mm512_mullo_epi64(c1, _mm512_set1_epi64(row_bytes));
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    for (int64_t p = 0; p < row_bytes; p += 4) {
        int64_t at = p + 4 <= row_bytes ? p : row_bytes - 4, skip = p - at; /* a last dword overlaps: skip done bytes */
        __m512i off0 = _mm512_add_epi64(o0, _mm512_set1_epi64(at)), off1 = _mm512_add_epi64(o1, _mm512_set1_epi64(at));
        __m512i g = _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_i64gather_epi32(off0, (const void *)rows, 1)),
                                       _mm512_i64gather_epi32(off1, (const void *)rows, 1), 1);
        for (int64_t b = skip; b < 4; b++) {
            const float *t = lutf + 2 * (at + b) * 16;
            acc0 = _mm512_add_ps(acc0, _mm512_permutexvar_ps(NIB(g, b, 0), _mm512_loadu_ps(t)));
            acc1 = _mm512_add_ps(acc1, _mm512_permutexvar_ps(NIB(g, b, 1), _mm512_loadu_ps(t + 16)));
        }
    }
    rescore16_finish(acc0, acc1, c0, c1, v0, v1, alpha, beta, out);
}
#endif

int tq_rescore(const uint8_t *rows, int64_t row_bytes, const int32_t *coords, const float *cent, int64_t M,
               int64_t dsub, const float *q, int64_t nq, int64_t d, const int64_t *cand, int64_t L,
               const float *alpha, const float *beta, float *out) {
    float *lutf = (float *)malloc(sizeof(float) * (size_t)(M * 16));
    if (!lutf) return 1;
    for (int64_t iq = 0; iq < nq; iq++) {
        float_tables(q + iq * d, coords, cent, M, dsub, lutf);
        int64_t k = 0;
#if defined(__AVX512F__) && defined(__AVX512DQ__) && !defined(TQ_SCALAR)
        if (M == 2 * row_bytes && row_bytes >= 4)
            for (; k + 16 <= L; k += 16) rescore16(rows, row_bytes, lutf, cand + iq * L + k, alpha, beta, out + iq * L + k);
#endif
        for (; k < L; k++) {
            int64_t i = cand[iq * L + k];
            if (i < 0) {
                out[iq * L + k] = -INFINITY;
                continue;
            }
            const uint8_t *r = rows + i * row_bytes;
            float acc0 = 0.0f, acc1 = 0.0f;
            int64_t m = 0;
            for (; m + 1 < M; m += 2) {
                uint8_t b = r[m >> 1];
                acc0 += lutf[m * 16 + (b & 15)];
                acc1 += lutf[(m + 1) * 16 + (b >> 4)];
            }
            if (m < M) acc0 += lutf[m * 16 + (r[m >> 1] & 15)];
            float s = alpha[i] * (acc0 + acc1);
            out[iq * L + k] = beta ? s + beta[i] : s;
        }
    }
    free(lutf);
    return 0;
}

#include "_cpu_scan_split.h"

/* ------------------------------------------------------------------ query rotation */

/* out (nq, d) = q (nq, d) @ rt (d, d) for a few queries, on the calling thread: a threaded BLAS
 * GEMV stalls on a busy machine, and a blocked one copies strided column blocks. */
void tq_rotate(const float *q, int64_t nq, int64_t d, const float *rt, float *out) {
    memset(out, 0, sizeof(float) * (size_t)(nq * d));
    int64_t i = 0;
    for (; i + 4 <= d; i += 4) { /* four rows per pass: a quarter of the output loads and stores */
        const float *r0 = rt + i * d, *r1 = r0 + d, *r2 = r1 + d, *r3 = r2 + d;
        for (int64_t iq = 0; iq < nq; iq++) {
            const float *x = q + iq * d + i;
            float *o = out + iq * d;
            for (int64_t j = 0; j < d; j++) o[j] = o[j] + (((x[0] * r0[j] + x[1] * r1[j]) + x[2] * r2[j]) + x[3] * r3[j]);
        }
    }
    for (; i < d; i++) {
        const float *row = rt + i * d;
        for (int64_t iq = 0; iq < nq; iq++) {
            float x = q[iq * d + i], *o = out + iq * d;
            for (int64_t j = 0; j < d; j++) o[j] = o[j] + x * row[j];
        }
    }
}

/* ------------------------------------------------------------------ one call per query chunk */


/* The best k of n (score, index) pairs, sorted (higher score first, then smaller index): insertion
 * into a sorted prefix, n * k steps at most (n: a shortlist, k: the results asked for). -inf /
 * -1 fill slots beyond n. */
static void best_sorted(const float *s, const int64_t *idx, int64_t n, int64_t k, float *out_s, int64_t *out_i) {
    int64_t kept = 0;
    for (int64_t c = 0; c < n; c++) {
        cand_t x = {s[c], idx[c]};
        if (x.i < 0 || (kept == k && !better(x, (cand_t){out_s[k - 1], out_i[k - 1]}))) continue;
        int64_t at = kept < k ? kept++ : k - 1;
        while (at > 0 && better(x, (cand_t){out_s[at - 1], out_i[at - 1]})) {
            out_s[at] = out_s[at - 1];
            out_i[at] = out_i[at - 1];
            at--;
        }
        out_s[at] = x.s;
        out_i[at] = x.i;
    }
    for (; kept < k; kept++) {
        out_s[kept] = -INFINITY;
        out_i[kept] = -1;
    }
}

/* Tables, scan of [v0, v1) and (with codes: the stored rows of the exact plan) exact re-scoring of nq
 * queries q (nq, d), rotated first by rot_t (d, d) when given; row_bytes < 0: the codes are the context's
 * split storage (codes NULL). kout = 0: out (nq, L) scores and
 * positions, unordered; kout > 0 (with codes): the best kout of the L re-scored, sorted, out (nq, kout).
 * With rot_t the queries are checked here too: returns 3 when one holds NaN/Inf or its squared norm
 * overflows float32. */
int tq_scan_topl(const int64_t *ctx, const float *q, int64_t nq, int64_t L, int64_t v0, int64_t v1,
                 const uint8_t *codes, int64_t row_bytes, float *out_s, int64_t *out_i, const float *rot_t, int64_t kout) {
    int64_t Mp = ctx[C_MP], d = ctx[C_D];
    if (rot_t) { /* q not checked or rotated yet (a few queries): here, saving Python calls per query */
        for (int64_t iq = 0; iq < nq; iq++) {
            float s = 0.f;
            for (int64_t j = 0; j < d; j++) s += q[iq * d + j] * q[iq * d + j];
            if (!isfinite(s)) return 3;
        }
        float *qr = (float *)malloc(sizeof(float) * (size_t)(nq * d));
        if (!qr) return 1;
        tq_rotate(q, nq, d, rot_t, qr);
        int rc = tq_scan_topl(ctx, qr, nq, L, v0, v1, codes, row_bytes, out_s, out_i, NULL, kout);
        free(qr);
        return rc;
    }
    int own = row_bytes < 0;
    if (kout > 0 && !codes && !own) return 2;
    uint8_t *lut = (uint8_t *)malloc((size_t)(nq * Mp * 16));
    float *ia = (float *)malloc(sizeof(float) * (size_t)(2 * nq));
    float *sl_s = kout > 0 ? (float *)malloc(sizeof(float) * (size_t)(nq * L)) : out_s;
    int64_t *sl_i = kout > 0 ? (int64_t *)malloc(sizeof(int64_t) * (size_t)(nq * L)) : out_i;
    int rc = !lut || !ia || !sl_s || !sl_i;
    if (!rc)
        rc = tq_scan_luts(q, nq, d, (const int32_t *)ctx[C_COORDS], (const float *)ctx[C_CENT], ctx[C_M], ctx[C_DSUB], Mp,
                          lut, ia, ia + nq);
    if (!rc)
        rc = tq_scan_search((const uint8_t *)ctx[C_BLOCKS], v0, v1, Mp, (const float *)ctx[C_ALPHA],
                            (const float *)ctx[C_BETA], lut, ia, ia + nq, nq, L, sl_s, sl_i, 1);
    if (!rc && own)
        rc = rescore_split(ctx, q, nq, d, sl_i, L, sl_s);
    else if (!rc && codes)
        rc = tq_rescore(codes, row_bytes, (const int32_t *)ctx[C_XCOORDS], (const float *)ctx[C_XCENT], ctx[C_XM],
                        ctx[C_XDSUB], q, nq, d, sl_i, L, (const float *)ctx[C_ALPHA], (const float *)ctx[C_BETA], sl_s);
    if (!rc && kout > 0)
        for (int64_t iq = 0; iq < nq; iq++)
            best_sorted(sl_s + iq * L, sl_i + iq * L, L, kout, out_s + iq * kout, out_i + iq * kout);
    free(lut);
    free(ia);
    if (kout > 0) {
        free(sl_s);
        free(sl_i);
    }
    return rc;
}
