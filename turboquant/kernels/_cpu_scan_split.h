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

/* Context fields of the split storage (after C_XCENT; see the enum in _cpu_scan.c). */
enum { C_SPLIT = 13, C_JOIN, C_LOW, C_LOWB, C_CODEB, C_COUNT2 };

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
    for (int64_t iq = 0; iq < nq && !rc; iq++) {
        const int64_t *c = cand + iq * L;
        for (int64_t k = 0; k < L; k++) {
            local[k] = c[k] < 0 ? -1 : k;
            fac[k] = c[k] < 0 ? 0.0f : alpha[c[k]];
            fac[L + k] = c[k] < 0 || !beta ? 0.0f : beta[c[k]];
            if (c[k] >= 0)
                code_row((const uint8_t *)ctx[C_BLOCKS], Mp, (int)ctx[C_SPLIT], (const uint8_t *)ctx[C_JOIN],
                         (const uint8_t *)ctx[C_LOW], ctx[C_LOWB], cb, c[k], rows + L * cb, rows + k * cb);
        }
        rc = tq_rescore(rows, cb, (const int32_t *)ctx[C_XCOORDS], (const float *)ctx[C_XCENT], ctx[C_XM], ctx[C_XDSUB],
                        q + iq * d, 1, d, local, L, fac, beta ? fac + L : NULL, out + iq * L);
    }
    free(rows);
    free(fac);
    free(local);
    return rc ? 1 : 0;
}

/* Exact scores of candidates (nq, L) from the split storage (the Python wrapper's rescore). */
int tq_rescore_split(const int64_t *ctx, const float *q, int64_t nq, int64_t d, const int64_t *cand, int64_t L, float *out) {
    return rescore_split(ctx, q, nq, d, cand, L, out);
}
