/* Codes stored once: the scan's blocked nibbles plus a row-major plane of the bits the scan drops.
 *
 * Included by _cpu_scan.c after tq_rescore. turboquant/kernels/scan_split.py builds the tables:
 * mode 1 (the scan reads the full codes): code byte m = nib(2m) | nib(2m+1) << 4, no low plane;
 * mode 2 (nibble m holds the top half of each code of byte m): code byte m = join[nib(m) | lo(m) << 4],
 * lo(m) the m-th nibble of the vector's low-plane row (two per byte, low nibble first). */

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

/* One full code row (code_bytes) of vector g. nib: scratch of Mp bytes. */
static inline void code_row(const uint8_t *blocks, int64_t Mp, int mode, const uint8_t *join, const uint8_t *low,
                            int64_t low_bytes, int64_t code_bytes, int64_t g, uint8_t *nib, uint8_t *out) {
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
