/* Block sums of the fast scan, one implementation per instruction set (included by _cpu_scan.c,
 * which defines BV, FLUSH, PREFETCH, TQ_VNNI, slot_of and includes the intrinsics). Each defines
 * QB (queries per pass over a block) and block_sums(blk, lut, Mp, out, nqg): the uint32 sums
 * out[64k + v] = sum_m lut[k][16m + nibble_m(v)] of the block's 64 vectors for nqg <= QB queries. */

#if defined(TQ_VNNI)
#define QB 4
/* Sums of the 64 vectors of a block (4 sub-blocks of 16) for nqg queries: out[64k + v]. Rows
 * outer, sub-blocks inner: 4·nqg independent accumulators hide vpdpbusd's latency. */
static inline __attribute__((always_inline)) void block_sums(const uint8_t *blk, const uint8_t *const *lut,
                                                             int64_t Mp, uint32_t *out, const int nqg) {
    const __m512i mask = _mm512_set1_epi8(0x0f), tsel = _mm512_set1_epi32(0x30201000), ones = _mm512_set1_epi8(1);
    const int64_t rows = Mp / 8, sub = rows * 64;
    if (nqg == 1) { /* one query: 8 accumulators (sub-block x lo/hi), rows in order within each sub-block */
        __m512i a[4][2];
        for (int s = 0; s < 4; s++) a[s][0] = a[s][1] = _mm512_setzero_si512();
        for (int64_t r = 0; r < rows; r++) {
            __m512i tl = _mm512_loadu_si512((const void *)(lut[0] + r * 128));
            __m512i th = _mm512_loadu_si512((const void *)(lut[0] + r * 128 + 64));
#pragma GCC unroll 4
            for (int s = 0; s < 4; s++) {
                const uint8_t *row = blk + s * sub + r * 64;
                _mm_prefetch((const char *)(row + PREFETCH), _MM_HINT_T0);
                __m512i c = _mm512_loadu_si512((const void *)row);
                __m512i lo = _mm512_ternarylogic_epi32(c, mask, tsel, 0xEA);
                __m512i hi = _mm512_ternarylogic_epi32(_mm512_srli_epi16(c, 4), mask, tsel, 0xEA);
                a[s][0] = _mm512_dpbusd_epi32(a[s][0], _mm512_permutexvar_epi8(lo, tl), ones);
                a[s][1] = _mm512_dpbusd_epi32(a[s][1], _mm512_permutexvar_epi8(hi, th), ones);
            }
        }
        for (int s = 0; s < 4; s++) _mm512_storeu_si512((void *)(out + 16 * s), _mm512_add_epi32(a[s][0], a[s][1]));
        return;
    }
    __m512i acc[QB][4];
    for (int k = 0; k < nqg; k++) acc[k][0] = acc[k][1] = acc[k][2] = acc[k][3] = _mm512_setzero_si512();
    for (int64_t r = 0; r < rows; r++) {
#pragma GCC unroll 4
        for (int s = 0; s < 4; s++) {
            const uint8_t *row = blk + s * sub + r * 64;
            _mm_prefetch((const char *)(row + PREFETCH), _MM_HINT_T0);
            __m512i c = _mm512_loadu_si512((const void *)row);
            __m512i lo = _mm512_ternarylogic_epi32(c, mask, tsel, 0xEA); /* (c & 15) | 16t */
            __m512i hi = _mm512_ternarylogic_epi32(_mm512_srli_epi16(c, 4), mask, tsel, 0xEA);
#pragma GCC unroll 4
            for (int k = 0; k < nqg; k++) {
                __m512i tl = _mm512_loadu_si512((const void *)(lut[k] + r * 128));
                __m512i th = _mm512_loadu_si512((const void *)(lut[k] + r * 128 + 64));
                acc[k][s] = _mm512_dpbusd_epi32(acc[k][s], _mm512_permutexvar_epi8(lo, tl), ones);
                acc[k][s] = _mm512_dpbusd_epi32(acc[k][s], _mm512_permutexvar_epi8(hi, th), ones);
            }
        }
    }
    for (int k = 0; k < nqg; k++)
        for (int s = 0; s < 4; s++) _mm512_storeu_si512((void *)(out + BV * k + 16 * s), acc[k][s]);
}
#elif defined(__AVX512BW__)
#define QB 4 /* queries per pass over a block: the code nibbles are extracted once for all */
/* u16 even/odd accumulators of 64 vectors -> u32 sums in vector order, added to out[0..64) */
static inline void fold512(__m512i a0, __m512i a1, __m512i *t) {
    __m512i e = _mm512_sub_epi16(a0, _mm512_slli_epi16(a1, 8));
    __m512i lo = _mm512_unpacklo_epi16(e, a1), hi = _mm512_unpackhi_epi16(e, a1);
    t[0] = _mm512_add_epi32(t[0], _mm512_cvtepu16_epi32(_mm512_castsi512_si256(lo)));
    t[1] = _mm512_add_epi32(t[1], _mm512_cvtepu16_epi32(_mm512_castsi512_si256(hi)));
    t[2] = _mm512_add_epi32(t[2], _mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(lo, 1)));
    t[3] = _mm512_add_epi32(t[3], _mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(hi, 1)));
}

static inline __attribute__((always_inline)) void block_sums(const uint8_t *blk, const uint8_t *const *lut,
                                                             int64_t Mp, uint32_t *out, const int nqg) {
    const __m512i mask = _mm512_set1_epi8(0x0f);
    __m512i tot[QB][4];
    for (int k = 0; k < nqg; k++) tot[k][0] = tot[k][1] = tot[k][2] = tot[k][3] = _mm512_setzero_si512();
    for (int64_t p0 = 0; p0 < Mp / 2; p0 += FLUSH / 2) {
        int64_t p1 = p0 + FLUSH / 2 < Mp / 2 ? p0 + FLUSH / 2 : Mp / 2;
        __m512i a0[QB], a1[QB];
        for (int k = 0; k < nqg; k++) a0[k] = a1[k] = _mm512_setzero_si512();
        for (int64_t p = p0; p < p1; p++) {
            _mm_prefetch((const char *)(blk + p * BV + PREFETCH), _MM_HINT_T0);
            __m512i c = _mm512_loadu_si512((const void *)(blk + p * BV));
            __m512i lo = _mm512_and_si512(c, mask), hi = _mm512_and_si512(_mm512_srli_epi16(c, 4), mask);
#pragma GCC unroll 4
            for (int k = 0; k < nqg; k++) {
                __m512i tl = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)(lut[k] + p * 32)));
                __m512i th = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)(lut[k] + p * 32 + 16)));
                __m512i rl = _mm512_shuffle_epi8(tl, lo), rh = _mm512_shuffle_epi8(th, hi);
                a0[k] = _mm512_add_epi16(a0[k], _mm512_add_epi16(rl, rh));
                a1[k] = _mm512_add_epi16(a1[k], _mm512_add_epi16(_mm512_srli_epi16(rl, 8), _mm512_srli_epi16(rh, 8)));
            }
        }
        for (int k = 0; k < nqg; k++) fold512(a0[k], a1[k], tot[k]);
    }
    for (int k = 0; k < nqg; k++)
        for (int r = 0; r < 4; r++) _mm512_storeu_si512((void *)(out + BV * k + 16 * r), tot[k][r]);
}
#elif defined(__AVX2__)
#define QB 2
/* u16 accumulators of 32 vectors (one 32-byte half row) -> u32 sums added to out[0..32) */
static inline void fold256(__m256i a0, __m256i a1, uint32_t *out) {
    __m256i e = _mm256_sub_epi16(a0, _mm256_slli_epi16(a1, 8));
    __m256i lo = _mm256_unpacklo_epi16(e, a1), hi = _mm256_unpackhi_epi16(e, a1);
    __m256i parts[4] = {_mm256_cvtepu16_epi32(_mm256_castsi256_si128(lo)),
                        _mm256_cvtepu16_epi32(_mm256_extracti128_si256(lo, 1)),
                        _mm256_cvtepu16_epi32(_mm256_castsi256_si128(hi)),
                        _mm256_cvtepu16_epi32(_mm256_extracti128_si256(hi, 1))};
    for (int r = 0; r < 4; r++)
        _mm256_storeu_si256((__m256i *)(out + 8 * r),
                            _mm256_add_epi32(_mm256_loadu_si256((const __m256i *)(out + 8 * r)), parts[r]));
}

/* One position pair of 32 vectors: look the 32 code bytes c up in the tables of positions 2p (tl, low
 * nibbles) and 2p+1 (th, high nibbles), add to the uint16 accumulators (a0: both bytes, a1: odd bytes). */
static inline __attribute__((always_inline)) void lookup_add256(__m256i c, __m256i tl, __m256i th, __m256i *a0,
                                                                __m256i *a1) {
    const __m256i mask = _mm256_set1_epi8(0x0f);
    __m256i lo = _mm256_and_si256(c, mask), hi = _mm256_and_si256(_mm256_srli_epi16(c, 4), mask);
    __m256i rl = _mm256_shuffle_epi8(tl, lo), rh = _mm256_shuffle_epi8(th, hi);
    *a0 = _mm256_add_epi16(*a0, _mm256_add_epi16(rl, rh));
    *a1 = _mm256_add_epi16(*a1, _mm256_add_epi16(_mm256_srli_epi16(rl, 8), _mm256_srli_epi16(rh, 8)));
}

/* The two tables of position pair p, each broadcast to both 128-bit lanes. */
static inline __attribute__((always_inline)) void tables256(const uint8_t *lut, int64_t p, __m256i *tl, __m256i *th) {
    *tl = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(lut + p * 32)));
    *th = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(lut + p * 32 + 16)));
}

static inline __attribute__((always_inline)) void block_sums(const uint8_t *blk, const uint8_t *const *lut,
                                                             int64_t Mp, uint32_t *out, const int nqg) {
    memset(out, 0, (size_t)nqg * BV * sizeof(uint32_t));
    if (nqg == 1) { /* one query: each table pair loaded once for both halves, four accumulators */
        for (int64_t p0 = 0; p0 < Mp / 2; p0 += FLUSH / 2) {
            int64_t p1 = p0 + FLUSH / 2 < Mp / 2 ? p0 + FLUSH / 2 : Mp / 2;
            __m256i a0[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()}, a1[2] = {a0[0], a0[0]};
            for (int64_t p = p0; p < p1; p++) {
                _mm_prefetch((const char *)(blk + p * BV + PREFETCH), _MM_HINT_T0);
                __m256i tl, th;
                tables256(lut[0], p, &tl, &th);
#pragma GCC unroll 2
                for (int half = 0; half < 2; half++)
                    lookup_add256(_mm256_loadu_si256((const __m256i *)(blk + p * BV + 32 * half)), tl, th, &a0[half],
                                  &a1[half]);
            }
            fold256(a0[0], a1[0], out);
            fold256(a0[1], a1[1], out + 32);
        }
        return;
    }
    for (int half = 0; half < 2; half++) { /* vectors 0..31 in bytes 0..31, 32..63 in bytes 32..63 */
        for (int64_t p0 = 0; p0 < Mp / 2; p0 += FLUSH / 2) {
            int64_t p1 = p0 + FLUSH / 2 < Mp / 2 ? p0 + FLUSH / 2 : Mp / 2;
            __m256i a0[QB], a1[QB];
            for (int k = 0; k < nqg; k++) a0[k] = a1[k] = _mm256_setzero_si256();
            for (int64_t p = p0; p < p1; p++) {
                _mm_prefetch((const char *)(blk + p * BV + 32 * half + PREFETCH), _MM_HINT_T0);
                __m256i c = _mm256_loadu_si256((const __m256i *)(blk + p * BV + 32 * half));
#pragma GCC unroll 2
                for (int k = 0; k < nqg; k++) {
                    __m256i tl, th;
                    tables256(lut[k], p, &tl, &th);
                    lookup_add256(c, tl, th, &a0[k], &a1[k]);
                }
            }
            for (int k = 0; k < nqg; k++) fold256(a0[k], a1[k], out + BV * k + 32 * half);
        }
    }
}
#else
#define QB 1
static inline __attribute__((always_inline)) void block_sums(const uint8_t *blk, const uint8_t *const *lut,
                                                             int64_t Mp, uint32_t *out, const int nqg) {
    (void)nqg; /* QB = 1 */
    memset(out, 0, BV * sizeof(uint32_t));
    for (int64_t p = 0; p < Mp / 2; p++) {
        const uint8_t *row = blk + p * BV, *t = lut[0] + p * 32;
        for (int v = 0; v < BV; v++) {
            uint8_t b = row[slot_of(v)];
            out[v] += (uint32_t)t[b & 15] + t[16 + (b >> 4)];
        }
    }
}
#endif

