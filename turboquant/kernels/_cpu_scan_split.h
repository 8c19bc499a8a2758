/* Codes stored once: the scan's blocked nibbles plus a row-major plane of the bits the scan drops.
 *
 * Included by _cpu_scan.c after tq_rescore. turboquant/kernels/scan_split.py builds the tables:
 * mode 1 (the scan reads the full codes): code byte m = nib(2m) | nib(2m+1) << 4, no low plane;
 * modes 2 and 3 (nibble m holds the top half of each code of byte m): code byte m = join[nib(m) | lo(m) << 4],
 * lo(m) the m-th nibble of the vector's low-plane row (two per byte, low nibble first); mode 2: two 4-bit
 * codes per byte (top 2 bits scanned), mode 3: four 2-bit codes per byte (top bit scanned), which the
 * VNNI layout's path below joins eight bytes at a time without the table. */

/* The Mp nibbles of vector g, one per byte of nib (the inverse of tq_scan_pack). */
static inline void nibbles_of(const uint8_t *blocks, int64_t Mp, int64_t g, uint8_t *nib) {
    const uint8_t *blk = blocks + (g / BV) * (Mp / 2) * BV;
    int v = (int)(g % BV);
#if defined(TQ_VNNI)
    const uint8_t *sub = blk + (v / 16) * (Mp / 8) * 64 + 4 * (v % 16);
    for (int64_t row = 0; row < Mp / 8; row++)
        for (int t = 0; t < 4; t++) {
            uint8_t b = sub[row * 64 + t];
            nib[8 * row + t] = b & 15;
            nib[8 * row + t + 4] = b >> 4;
        }
#else
    const uint8_t *at = blk + slot_of(v);
    for (int64_t p = 0; p < Mp / 2; p++) {
        uint8_t b = at[p * BV];
        nib[2 * p] = b & 15;
        nib[2 * p + 1] = b >> 4;
    }
#endif
}

#if defined(TQ_VNNI)
#define REP8(b) (0x0101010101010101ull * (b))
/* Bits 0-3 of each byte of x spread to the even bits 0, 2, 4, 6. */
static inline uint64_t spread_even(uint64_t x) {
    x = (x | (x << 2)) & REP8(0x33);
    return (x | (x << 1)) & REP8(0x55);
}

/* code_row for the VNNI layout: row r of the vector's 16-vector sub-block holds 4 bytes, nibbles
 * 8r..8r+3 (low) and 8r+4..8r+7 (high); joined with SWAR operations, 4 (mode 1) or 8 code bytes per row. */
static inline void code_row_vnni(const uint8_t *blocks, int64_t Mp, int mode, const uint8_t *low, int64_t low_bytes,
                                 int64_t cb, int64_t g, uint8_t *out) {
    int v = (int)(g % BV);
    const uint8_t *sub = blocks + (g / BV) * (Mp / 2) * BV + (v / 16) * (Mp / 8) * 64 + 4 * (v % 16);
    const uint8_t *lo = low + g * low_bytes;
    for (int64_t r = 0; r < Mp / 8; r++) {
        uint32_t w;
        memcpy(&w, sub + r * 64, 4);
        uint8_t tmp[8];
        int64_t at, len;
        if (mode == 1) { /* code byte 4r+i = nib(8r+2i) | nib(8r+2i+1) << 4 */
            uint32_t a = w & 0x0F0F0F0Fu, b = (w >> 4) & 0x0F0F0F0Fu;
            a |= a >> 4;
            b |= b >> 4;
            tmp[0] = (uint8_t)a, tmp[1] = (uint8_t)(a >> 16), tmp[2] = (uint8_t)b, tmp[3] = (uint8_t)(b >> 16);
            at = 4 * r, len = 4;
        } else { /* H, L: the scanned and the low nibble of code bytes 8r..8r+7, one per byte */
            uint64_t H = (uint64_t)(w & 0x0F0F0F0Fu) | ((uint64_t)((w >> 4) & 0x0F0F0F0Fu) << 32);
            uint32_t lw = 0;
            int64_t avail = low_bytes - 4 * r;
            if (avail >= 4) /* fixed-size copies compile to one load; the variable ones call memcpy */
                memcpy(&lw, lo + 4 * r, 4);
            else
                for (int64_t i = 0; i < avail; i++) lw |= (uint32_t)lo[4 * r + i] << (8 * i);
            uint64_t L = _pdep_u64(lw, REP8(0x0F));
            uint64_t c;
            if (mode == 2) /* two 4-bit codes: (top 2 bits << 2) | low 2 bits, for each nibble half */
                c = ((H & REP8(0x03)) << 2) | (L & REP8(0x03)) | ((H & REP8(0x0C)) << 4) | ((L & REP8(0x0C)) << 2);
            else /* four 2-bit codes: the top bit of code j at bit 2j + 1, the low bit at 2j */
                c = (spread_even(H) << 1) | spread_even(L);
            memcpy(tmp, &c, 8);
            at = 8 * r, len = 8;
        }
        if (at + len <= cb) {
            if (len == 8)
                memcpy(out + at, tmp, 8);
            else
                memcpy(out + at, tmp, 4);
        } else {
            for (int64_t i = 0; at + i < cb; i++) out[at + i] = tmp[i];
        }
    }
}
#endif

/* One full code row (code_bytes) of vector g. nib: scratch of Mp bytes. */
static inline void code_row(const uint8_t *blocks, int64_t Mp, int mode, const uint8_t *join, const uint8_t *low,
                            int64_t low_bytes, int64_t code_bytes, int64_t g, uint8_t *nib, uint8_t *out) {
#if defined(TQ_VNNI)
    code_row_vnni(blocks, Mp, mode, low, low_bytes, code_bytes, g, out);
    return;
#endif
    nibbles_of(blocks, Mp, g, nib);
    if (mode == 1) {
        for (int64_t m = 0; m < code_bytes; m++) out[m] = (uint8_t)(nib[2 * m] | (nib[2 * m + 1] << 4));
        return;
    }
    const uint8_t *lo = low + g * low_bytes;
    for (int64_t m = 0; m < code_bytes; m++) out[m] = join[nib[m] | (((lo[m >> 1] >> (4 * (m & 1))) & 15) << 4)];
}

/* Full code rows (rows, code_bytes) of vectors pos[r] (first + r when pos is NULL); pos < 0: a zero row.
 * Returns 1 when out of memory. */
int tq_scan_codes(const uint8_t *blocks, int64_t Mp, int64_t mode, const uint8_t *join, const uint8_t *low,
                  int64_t low_bytes, int64_t code_bytes, const int64_t *pos, int64_t first, int64_t rows, uint8_t *out) {
    uint8_t *nib = (uint8_t *)malloc((size_t)Mp);
    if (!nib) return 1;
    for (int64_t r = 0; r < rows; r++) {
        int64_t g = pos ? pos[r] : first + r;
        if (g < 0)
            memset(out + r * code_bytes, 0, (size_t)code_bytes);
        else
            code_row(blocks, Mp, (int)mode, join, low, low_bytes, code_bytes, g, nib, out + r * code_bytes);
    }
    free(nib);
    return 0;
}

/* The low plane (rows, low_bytes) of code rows (rows, row_bytes), modes 2 and 3: nibble m of a row is the
 * low half of each code of byte m (mode 2: the low 2 bits of two 4-bit codes, mode 3: the low bit of four
 * 2-bit codes), two nibbles per byte, low nibble first. */
void tq_scan_low(const uint8_t *src, int64_t rows, int64_t row_bytes, int64_t mode, uint8_t *low, int64_t low_bytes) {
    for (int64_t r = 0; r < rows; r++) {
        const uint8_t *c = src + r * row_bytes;
        uint8_t *o = low + r * low_bytes;
        memset(o, 0, (size_t)low_bytes);
        for (int64_t m = 0; m < row_bytes; m++) {
            uint8_t b = c[m];
            uint8_t n = mode == 2 ? (uint8_t)((b & 3) | ((b >> 2) & 12))
                                  : (uint8_t)((b & 1) | ((b >> 1) & 2) | ((b >> 2) & 4) | ((b >> 3) & 8));
            o[m >> 1] |= (uint8_t)(n << (4 * (m & 1)));
        }
    }
}

/* Context fields of the split storage (after C_XCENT; see the enum in _cpu_scan.c). */
enum { C_SPLIT = 13, C_JOIN, C_LOW, C_LOWB, C_CODEB, C_COUNT2 };

#if defined(TQ_VNNI)
/* rescore16 straight from the split storage of the VNNI layout (no rows rebuilt): per row r of the
 * candidates' sub-blocks one dword gather of their scanned nibbles (and, modes 2-3, one of their
 * low-plane nibbles) gives code bytes 8r..8r+7 (mode 1: 4r..4r+3), whose two nibbles are looked up
 * in the same order as rescore16 reads the stored rows: bit-identical scores. Needs the rows to cover
 * the code bytes exactly (code_bytes a multiple of 8, 4 in mode 1; low_bytes = code_bytes / 2). */
#define LANE16(lo, hi) _mm512_inserti64x4(_mm512_castsi256_si512(lo), (hi), 1)
static void rescore16_split(const int64_t *ctx, const float *lutf, const int64_t *cand, float *out) {
    int64_t Mp = ctx[C_MP], cb = ctx[C_CODEB], lb = ctx[C_LOWB];
    int mode = (int)ctx[C_SPLIT];
    const uint8_t *blocks = (const uint8_t *)ctx[C_BLOCKS], *low = (const uint8_t *)ctx[C_LOW];
    const float *alpha = (const float *)ctx[C_ALPHA], *beta = (const float *)ctx[C_BETA];
    __m512i c0 = _mm512_loadu_si512((const void *)cand), c1 = _mm512_loadu_si512((const void *)(cand + 8));
    __mmask8 v0 = _mm512_cmpge_epi64_mask(c0, _mm512_setzero_si512()), v1 = _mm512_cmpge_epi64_mask(c1, _mm512_setzero_si512());
    c0 = _mm512_maskz_mov_epi64(v0, c0);
    c1 = _mm512_maskz_mov_epi64(v1, c1);
    /* byte offset of each candidate's first row: block, 16-vector sub-block, 4 bytes per vector */
    __m512i m63 = _mm512_set1_epi64(63), m15 = _mm512_set1_epi64(15);
    __m512i o0 = _mm512_add_epi64(_mm512_add_epi64(_mm512_mullo_epi64(_mm512_srli_epi64(c0, 6), _mm512_set1_epi64(Mp / 2 * BV)),
                                                   _mm512_mullo_epi64(_mm512_srli_epi64(_mm512_and_si512(c0, m63), 4), _mm512_set1_epi64(Mp / 8 * 64))),
                                  _mm512_slli_epi64(_mm512_and_si512(c0, m15), 2));
    __m512i o1 = _mm512_add_epi64(_mm512_add_epi64(_mm512_mullo_epi64(_mm512_srli_epi64(c1, 6), _mm512_set1_epi64(Mp / 2 * BV)),
                                                   _mm512_mullo_epi64(_mm512_srli_epi64(_mm512_and_si512(c1, m63), 4), _mm512_set1_epi64(Mp / 8 * 64))),
                                  _mm512_slli_epi64(_mm512_and_si512(c1, m15), 2));
    __m512i l0 = _mm512_mullo_epi64(c0, _mm512_set1_epi64(lb)), l1 = _mm512_mullo_epi64(c1, _mm512_set1_epi64(lb));
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    const __m512i f = _mm512_set1_epi32(15);
    int per = mode == 1 ? 4 : 8;
    for (int64_t r = 0; r * per < cb; r++) {
        __m512i w = LANE16(_mm512_i64gather_epi32(_mm512_add_epi64(o0, _mm512_set1_epi64(r * 64)), (const void *)blocks, 1),
                           _mm512_i64gather_epi32(_mm512_add_epi64(o1, _mm512_set1_epi64(r * 64)), (const void *)blocks, 1));
        if (mode == 1) { /* code byte 4r+i = nib(8r+2i) | nib(8r+2i+1) << 4; nib(8r+t): byte t & 3, high half when t >= 4 */
            static const int sh[4][2] = {{0, 8}, {16, 24}, {4, 12}, {20, 28}};
            for (int i = 0; i < 4; i++) {
                const float *t = lutf + 2 * (4 * r + i) * 16;
                __m512i lo = _mm512_and_si512(_mm512_srli_epi32(w, sh[i][0]), f), hi = _mm512_and_si512(_mm512_srli_epi32(w, sh[i][1]), f);
                acc0 = _mm512_add_ps(acc0, _mm512_permutexvar_ps(lo, _mm512_loadu_ps(t)));
                acc1 = _mm512_add_ps(acc1, _mm512_permutexvar_ps(hi, _mm512_loadu_ps(t + 16)));
            }
            continue;
        }
        __m512i lw = LANE16(_mm512_i64gather_epi32(_mm512_add_epi64(l0, _mm512_set1_epi64(4 * r)), (const void *)low, 1),
                            _mm512_i64gather_epi32(_mm512_add_epi64(l1, _mm512_set1_epi64(4 * r)), (const void *)low, 1));
        for (int j = 0; j < 8; j++) {
            const float *t = lutf + 2 * (8 * r + j) * 16;
            __m512i h = _mm512_and_si512(_mm512_srli_epi32(w, j < 4 ? 8 * j : 8 * (j - 4) + 4), f);
            __m512i l = _mm512_and_si512(_mm512_srli_epi32(lw, 4 * j), f);
            __m512i lo, hi;
            if (mode == 2) { /* coord 2m: (top 2 bits << 2) | low 2 bits; coord 2m+1 likewise from the upper halves */
                lo = _mm512_or_si512(_mm512_slli_epi32(_mm512_and_si512(h, _mm512_set1_epi32(3)), 2), _mm512_and_si512(l, _mm512_set1_epi32(3)));
                hi = _mm512_or_si512(_mm512_and_si512(h, _mm512_set1_epi32(12)), _mm512_and_si512(_mm512_srli_epi32(l, 2), _mm512_set1_epi32(3)));
            } else { /* four 2-bit codes: code j' = (top bit j' << 1) | low bit j'; low nibble codes 0-1, high 2-3 */
                __m512i one = _mm512_set1_epi32(1);
                lo = _mm512_or_si512(_mm512_or_si512(_mm512_and_si512(l, one), _mm512_slli_epi32(_mm512_and_si512(h, one), 1)),
                                     _mm512_or_si512(_mm512_slli_epi32(_mm512_and_si512(l, _mm512_set1_epi32(2)), 1),
                                                     _mm512_slli_epi32(_mm512_and_si512(h, _mm512_set1_epi32(2)), 2)));
                hi = _mm512_or_si512(_mm512_or_si512(_mm512_and_si512(_mm512_srli_epi32(l, 2), one), _mm512_and_si512(_mm512_srli_epi32(h, 1), _mm512_set1_epi32(2))),
                                     _mm512_or_si512(_mm512_srli_epi32(_mm512_and_si512(l, _mm512_set1_epi32(8)), 1), _mm512_and_si512(h, _mm512_set1_epi32(8))));
            }
            acc0 = _mm512_add_ps(acc0, _mm512_permutexvar_ps(lo, _mm512_loadu_ps(t)));
            acc1 = _mm512_add_ps(acc1, _mm512_permutexvar_ps(hi, _mm512_loadu_ps(t + 16)));
        }
    }
    rescore16_finish(acc0, acc1, c0, c1, v0, v1, alpha, beta, out);
}
#endif

/* tq_rescore over the vectors' codes reassembled from the split storage: per query, its L candidates'
 * rows are rebuilt into a scratch buffer and re-scored with their own factors, the same float
 * operations in the same order as on the stored rows (bit-identical scores). */
static int rescore_split(const int64_t *ctx, const float *q, int64_t nq, int64_t d, const int64_t *cand, int64_t L,
                         float *out) {
    int64_t cb = ctx[C_CODEB], Mp = ctx[C_MP];
    const float *alpha = (const float *)ctx[C_ALPHA], *beta = (const float *)ctx[C_BETA];
    uint8_t *rows = (uint8_t *)malloc((size_t)(L * cb + Mp));
    float *fac = (float *)malloc(sizeof(float) * (size_t)(2 * L));
    int64_t *local = (int64_t *)malloc(sizeof(int64_t) * (size_t)L);
    int rc = !rows || !fac || !local;
#if defined(TQ_VNNI)
    int mode = (int)ctx[C_SPLIT];
    int fused = ctx[C_XM] == 2 * cb && cb % (mode == 1 ? 4 : 8) == 0 && (mode == 1 || 2 * ctx[C_LOWB] == cb) &&
                Mp / 8 * (mode == 1 ? 4 : 8) >= cb;
    float *lutf = fused ? (float *)malloc(sizeof(float) * (size_t)(ctx[C_XM] * 16)) : NULL;
    rc |= fused && !lutf;
#endif
    for (int64_t iq = 0; iq < nq && !rc; iq++) {
        const int64_t *c = cand + iq * L;
        int64_t k0 = 0;
#if defined(TQ_VNNI)
        if (fused) { /* 16 candidates at a time straight from the split storage */
            float_tables(q + iq * d, (const int32_t *)ctx[C_XCOORDS], (const float *)ctx[C_XCENT], ctx[C_XM], ctx[C_XDSUB],
                         lutf);
            for (; k0 + 16 <= L; k0 += 16) rescore16_split(ctx, lutf, c + k0, out + iq * L + k0);
        }
#endif
        int64_t rest = L - k0; /* the others: rows rebuilt into the scratch buffer, then tq_rescore */
        if (!rest) continue;
        for (int64_t k = 0; k < rest; k++) {
            int64_t g = c[k0 + k];
            local[k] = g < 0 ? -1 : k;
            fac[k] = g < 0 ? 0.0f : alpha[g];
            fac[L + k] = g < 0 || !beta ? 0.0f : beta[g];
            if (g >= 0)
                code_row((const uint8_t *)ctx[C_BLOCKS], Mp, (int)ctx[C_SPLIT], (const uint8_t *)ctx[C_JOIN],
                         (const uint8_t *)ctx[C_LOW], ctx[C_LOWB], cb, g, rows + L * cb, rows + k * cb);
        }
        rc = tq_rescore(rows, cb, (const int32_t *)ctx[C_XCOORDS], (const float *)ctx[C_XCENT], ctx[C_XM], ctx[C_XDSUB],
                        q + iq * d, 1, d, local, rest, fac, beta ? fac + L : NULL, out + iq * L + k0);
    }
#if defined(TQ_VNNI)
    free(lutf);
#endif
    free(rows);
    free(fac);
    free(local);
    return rc ? 1 : 0;
}

/* Exact scores of candidates (nq, L) from the split storage (the Python wrapper's rescore). */
int tq_rescore_split(const int64_t *ctx, const float *q, int64_t nq, int64_t d, const int64_t *cand, int64_t L, float *out) {
    return rescore_split(ctx, q, nq, d, cand, L, out);
}
