// Warp-level decode attention straight from packed TurboQuant codes (issue 9).
//
// Layout read (docs/DESIGN.md, unchanged): one LSB-first bit stream of b-bit codes per vector,
// codes [B, Hkv, S, code_bytes] uint8 (any byte strides, 4-byte aligned rows), norms [B, Hkv, S]
// fp16. Integer widths 2, 3 and 4 at head_dim 64 and 128 (every other config goes to Triton).
//
// Structure (one warp = one independent stream of tokens, no barrier inside the loop):
//  * every warp of a CTA owns a contiguous token range of one (batch, kv head); it keeps its own
//    online-softmax state (max, sum) and accumulator in registers; the CTA's warps merge once at
//    the end through shared memory and write one partial (acc, max, sum) per CTA, in the format of
//    the Triton combine kernel (triton_attention.py), which merges the splits, rotates the value
//    accumulator back (acc @ Pi_v), adds the value offset and attends over the full-precision window.
//  * scores: mma.m16n8k16 with the 16 tokens of a tile as M and the (up to 8) query rows of a GQA
//    group as N; the key codes are decoded straight into the A-operand registers. The head-dim (K)
//    order of the product is free, so the query fragment is loaded in whatever coordinate order the
//    decoder emits its fp16 pairs (key_coord below), and every thread reads one contiguous slice
//    of each key row (16-byte loads for 4-bit d=128).
//  * softmax in base 2 (scale * log2 e folded into q); the row max needs 3 shuffles per 16*TILES
//    tokens; exp2 via ex2.approx; p * ||v|| converted to fp16 and transposed into the B operand of
//    the value product with movmatrix (no shared memory).
//  * values: mma with the head dims as M (D/16 tiles), query rows as N, tokens as K: the A operand
//    needs fp16 pairs of *two tokens* at one coordinate, so the code bytes of two tokens are
//    interleaved with one prmt before decoding and the decoder emits (token a, token b) pairs.
//  * decoders: byte-permute (prmt) lookups with the fp16 centroid tables in registers; 4-bit uses
//    the odd symmetry c[15-i] = -c[i] (8-entry magnitude tables + a sign mask), 3-bit spreads the
//    8 codes of a 3-byte group to nibbles and uses 8-entry tables, 2-bit builds the prmt selector
//    pair (c, c+4) with one multiply-add.
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "cuda_attention.cuh"

namespace tq {

// Shared-memory decoder (DEC = 1): row `byte` (256 B) of the table holds, for keys (first 128 B)
// and values (last 128 B), the fp16 pair (c[byte & 15], c[byte >> 4]) once per lane, so that lane
// l always reads bank l (no conflicts whatever the codes). One prmt turns a code byte into the
// address: byte 1 = code byte, byte 0 = lane * 4 (+ 128 for values).
extern __shared__ __align__(16) uint32_t tq_smem[];

__device__ __forceinline__ uint32_t lut(uint32_t off) {
  // 32-bit shared address: the table base stays in a uniform register (LDS [R + UR])
  uint32_t v;
  asm volatile("ld.shared.u32 %0, [%1];" : "=r"(v) : "r"(off + (uint32_t)__cvta_generic_to_shared(tq_smem)));
  return v;
}

__device__ __forceinline__ uint32_t prmt(uint32_t a, uint32_t b, uint32_t s) {
  uint32_t d;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(s));
  return d;
}

// fp16 pair of code byte k of x from the shared table (lane_off = lane * 4, + 128 for values)
__device__ __forceinline__ uint32_t lut_byte(uint32_t x, uint32_t lane_off, int k) {
  return lut(prmt(x, lane_off, 0x5504u | (uint32_t(k) << 4)));
}

__device__ __forceinline__ float ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ void mma16816(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                         uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t movtrans(uint32_t x) {
  uint32_t y;
  asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;" : "=r"(y) : "r"(x));
  return y;
}

__device__ __forceinline__ uint32_t pack_half2(float lo, float hi) {
  __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}

// ---------------------------------------------------------------------------------- decoders
// Output pairing of the 8-code decoders (selectors of the final lo/hi byte interleave):
//   ADJ:   (c0,c1) (c2,c3) (c4,c5) (c6,c7)      -- keys
//   CROSS: (c0,c2) (c1,c3) (c4,c6) (c5,c7)      -- values, input bytes interleaved from two tokens
constexpr uint32_t ADJ_A = 0x5140, ADJ_B = 0x7362, CROSS_A = 0x6240, CROSS_B = 0x7351;

// Eight 4-bit codes (nibble i = code i) -> four fp16 pairs. tab = magnitude low bytes (2 regs),
// magnitude high bytes (2 regs) of c[8..15]. Negative codes c < 8 use index 7 - c and a sign bit.
template <uint32_t SA, uint32_t SB>
__device__ __forceinline__ void dec4(uint32_t x, const uint32_t (&tab)[4], uint32_t (&o)[4]) {
  const uint32_t t = ((~x) >> 3) & 0x11111111u;
  const uint32_t r = (x ^ (t * 7u)) & 0x77777777u;
  const uint32_t y = x << 4;
  const uint32_t s0 = prmt(y, x, 0xD9C8);  // 0xFF per byte where code 0..3 >= 8 (positive)
  const uint32_t s1 = prmt(y, x, 0xFBEA);  // codes 4..7
  const uint32_t lo = prmt(tab[0], tab[1], r);
  const uint32_t hi = prmt(tab[2], tab[3], r) | (~s0 & 0x80808080u);
  const uint32_t rh = r >> 16;
  const uint32_t lo2 = prmt(tab[0], tab[1], rh);
  const uint32_t hi2 = prmt(tab[2], tab[3], rh) | (~s1 & 0x80808080u);
  o[0] = prmt(lo, hi, SA);
  o[1] = prmt(lo, hi, SB);
  o[2] = prmt(lo2, hi2, SA);
  o[3] = prmt(lo2, hi2, SB);
}

// Eight 3-bit codes already spread to nibbles (bit 3 of each nibble zero) -> four fp16 pairs.
// tab = low bytes of c[0..7] (2 regs), high bytes (2 regs).
template <uint32_t SA, uint32_t SB>
__device__ __forceinline__ void dec3(uint32_t u, const uint32_t (&tab)[4], uint32_t (&o)[4]) {
  const uint32_t lo = prmt(tab[0], tab[1], u);
  const uint32_t hi = prmt(tab[2], tab[3], u);
  const uint32_t uh = u >> 16;
  const uint32_t lo2 = prmt(tab[0], tab[1], uh);
  const uint32_t hi2 = prmt(tab[2], tab[3], uh);
  o[0] = prmt(lo, hi, SA);
  o[1] = prmt(lo, hi, SB);
  o[2] = prmt(lo2, hi2, SA);
  o[3] = prmt(lo2, hi2, SB);
}

// 24-bit group of eight 3-bit codes -> nibble i = code i.
__device__ __forceinline__ uint32_t spread3(uint32_t x) {
  uint32_t y = (x & 0x00000FFFu) | ((x << 4) & 0x0FFF0000u);
  uint32_t z = (y & 0x003F003Fu) | ((y << 2) & 0x3F003F00u);
  return (z & 0x07070707u) | ((z << 1) & 0x70707070u);
}

// Sixteen 2-bit codes (crumb i = code i) -> eight fp16 pairs: X[j] = (c_j, c_{4+j}),
// Y[j] = (c_{8+j}, c_{12+j}). tab[0] = low bytes of c[0..3], tab[1] = high bytes.
__device__ __forceinline__ void dec2(uint32_t w, const uint32_t (&tab)[4], uint32_t (&X)[4], uint32_t (&Y)[4]) {
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const uint32_t v = (w >> (2 * j)) & 0x03030303u;
    const uint32_t s = v * 0x11u + 0x40404040u;  // byte c -> selector nibbles (c, c + 4)
    X[j] = prmt(tab[0], tab[1], s);
    Y[j] = prmt(tab[0], tab[1], s >> 16);
  }
}

// ------------------------------------------------------------------------ per-config geometry
// Keys: thread t4 (lane % 4) owns D/4 consecutive coordinates of each key row: KB bytes at t4*KB.
// Values: thread gid (lane / 4) owns D/8 consecutive coordinates of each value row: VB bytes.
template <int BITS, int D>
struct Geo {
  static constexpr int KB = D * BITS / 32;          // key bytes per thread per token
  static constexpr int VB = D * BITS / 64;          // value bytes per thread per token
  static constexpr int KW = (KB + 3) / 4 + ((BITS == 3 && D == 64) ? 1 : 0);  // words held
  static constexpr int VW = (VB + 3) / 4 + ((BITS == 3 && D == 128) ? 1 : 0);
  static constexpr int ROW = D * BITS / 8;          // code bytes per vector (token stride, contiguous rows)
  static constexpr int KS = D / 16;                 // k-steps of the score product
  static constexpr int VT = D / 16;                 // m-tiles of the value product
};

// Head-dim coordinate of the query value that pairs with key fragment (k-step s, half h, element e).
template <int BITS, int D>
__device__ __forceinline__ int key_coord(int t4, int s, int h, int e) {
  if (BITS == 2) return (D / 4) * t4 + 16 * (s / 4) + 8 * h + (s % 4) + 4 * e;
  return (D / 4) * t4 + 4 * s + 2 * h + e;
}

// Load KB bytes (as words, LSB first) of one key row for thread t4.
template <int BITS, int D>
__device__ __forceinline__ void load_k(const uint8_t* p, uint32_t (&w)[Geo<BITS, D>::KW]) {
  constexpr int KB = Geo<BITS, D>::KB;
  if constexpr (KB == 16) {
    uint4 x = __ldg(reinterpret_cast<const uint4*>(p));
    w[0] = x.x; w[1] = x.y; w[2] = x.z; w[3] = x.w;
  } else if constexpr (KB == 8) {
    uint2 x = __ldg(reinterpret_cast<const uint2*>(p));
    w[0] = x.x; w[1] = x.y;
  } else if constexpr (KB == 4) {
    w[0] = __ldg(reinterpret_cast<const uint32_t*>(p));
  } else if constexpr (KB == 12) {
    const uint32_t* u = reinterpret_cast<const uint32_t*>(p);
    w[0] = __ldg(u); w[1] = __ldg(u + 1); w[2] = __ldg(u + 2);
  } else {  // KB == 6 (3-bit, d = 64): two aligned words, shifted by 0 or 16 bits later
    const uint32_t* u = reinterpret_cast<const uint32_t*>(p);  // p = row + ((6 * t4) & ~3)
    w[0] = __ldg(u); w[1] = __ldg(u + 1);
  }
}

template <int BITS, int D>
__device__ __forceinline__ void load_v(const uint8_t* p, uint32_t (&w)[Geo<BITS, D>::VW]) {
  constexpr int VB = Geo<BITS, D>::VB;
  if constexpr (VB == 8) {
    uint2 x = __ldg(reinterpret_cast<const uint2*>(p));
    w[0] = x.x; w[1] = x.y;
  } else if constexpr (VB == 4) {
    w[0] = __ldg(reinterpret_cast<const uint32_t*>(p));
  } else if constexpr (VB == 2) {
    w[0] = __ldg(reinterpret_cast<const unsigned short*>(p));
  } else if constexpr (VB == 6) {  // 3-bit, d = 128
    const uint32_t* u = reinterpret_cast<const uint32_t*>(p);  // p = row + ((6 * gid) & ~3)
    w[0] = __ldg(u); w[1] = __ldg(u + 1);
  } else {  // VB == 3 (3-bit, d = 64): bytes one by one (the row is 24 bytes, a word could overrun it)
        w[0] = uint32_t(__ldg(p)) | (uint32_t(__ldg(p + 1)) << 8) | (uint32_t(__ldg(p + 2)) << 16);
  }
}

template <int BITS, int D>
__device__ __forceinline__ int key_byte_offset(int t4) {
  constexpr int KB = Geo<BITS, D>::KB;
  return (KB == 6) ? ((6 * t4) & ~3) : KB * t4;
}
template <int BITS, int D>
__device__ __forceinline__ int value_byte_offset(int gid) {
  constexpr int VB = Geo<BITS, D>::VB;
  return (VB == 6) ? ((6 * gid) & ~3) : VB * gid;
}

// Key fragments of one token: kp[s][h] = fp16 pair for k-step s, A-operand half h (see key_coord).
template <int BITS, int D, int DEC>
__device__ __forceinline__ void decode_key(const uint32_t (&w)[Geo<BITS, D>::KW], int t4, const uint32_t (&tab)[4],
                                           uint32_t lane_off, uint32_t (&kp)[Geo<BITS, D>::KS][2]) {
  if constexpr (BITS == 2) {
#pragma unroll
    for (int i = 0; i < D / 64; ++i) {
      uint32_t X[4], Y[4];
      dec2(w[i], tab, X, Y);
#pragma unroll
      for (int j = 0; j < 4; ++j) { kp[4 * i + j][0] = X[j]; kp[4 * i + j][1] = Y[j]; }
    }
  } else {
    // 8 codes per 32-bit word (4 bits) or per 3-byte group spread to nibbles (3 bits)
    uint32_t x[D / 32];
    if constexpr (BITS == 4) {
#pragma unroll
      for (int i = 0; i < D / 32; ++i) x[i] = w[i];
    } else if constexpr (D == 128) {
      x[0] = spread3(w[0] & 0xFFFFFFu);
      x[1] = spread3(__funnelshift_r(w[0], w[1], 24) & 0xFFFFFFu);
      x[2] = spread3(__funnelshift_r(w[1], w[2], 16) & 0xFFFFFFu);
      x[3] = spread3(w[2] >> 8);
    } else {
      const uint32_t sh = (t4 & 1) ? 16u : 0u;
      const uint32_t a = __funnelshift_r(w[0], w[1], sh);
      const uint32_t b = w[1] >> sh;
      x[0] = spread3(a & 0xFFFFFFu);
      x[1] = spread3(__funnelshift_r(a, b, 24) & 0xFFFFFFu);
    }
#pragma unroll
    for (int i = 0; i < D / 32; ++i) {
      uint32_t o[4];
      if constexpr (DEC == 1) {
#pragma unroll
        for (int k = 0; k < 4; ++k) o[k] = lut_byte(x[i], lane_off, k);
      } else if constexpr (BITS == 4) {
        dec4<ADJ_A, ADJ_B>(x[i], tab, o);
      } else {
        dec3<ADJ_A, ADJ_B>(x[i], tab, o);
      }
      kp[2 * i][0] = o[0]; kp[2 * i][1] = o[1];
      kp[2 * i + 1][0] = o[2]; kp[2 * i + 1][1] = o[3];
    }
  }
}

// Value fragments of a token pair (a, b): vp[slot] = (v_a, v_b) at coordinate (D/8)*gid + slot.
template <int BITS, int D, int DEC>
__device__ __forceinline__ void decode_value_pair(const uint32_t (&a)[Geo<BITS, D>::VW],
                                                  const uint32_t (&b)[Geo<BITS, D>::VW], int gid,
                                                  const uint32_t (&tab)[4], uint32_t lane_off, uint32_t (&vp)[D / 8]) {
  if constexpr (BITS == 2) {
    uint32_t X[4], Y[4];
    dec2(prmt(a[0], b[0], 0x5140), tab, X, Y);
#pragma unroll
    for (int j = 0; j < 4; ++j) { vp[j] = X[j]; vp[4 + j] = Y[j]; }
    if constexpr (D == 128) {
      dec2(prmt(a[0], b[0], 0x7362), tab, X, Y);
#pragma unroll
      for (int j = 0; j < 4; ++j) { vp[8 + j] = X[j]; vp[12 + j] = Y[j]; }
    }
  } else {
    // per token D/64 nibble words (8 codes each)
    uint32_t xa[D / 64], xb[D / 64];
    if constexpr (BITS == 4) {
#pragma unroll
      for (int i = 0; i < D / 64; ++i) { xa[i] = a[i]; xb[i] = b[i]; }
    } else if constexpr (D == 128) {
      const uint32_t sh = (gid & 1) ? 16u : 0u;
      const uint32_t a0 = __funnelshift_r(a[0], a[1], sh), a1 = a[1] >> sh;
      const uint32_t b0 = __funnelshift_r(b[0], b[1], sh), b1 = b[1] >> sh;
      xa[0] = spread3(a0 & 0xFFFFFFu); xa[1] = spread3(__funnelshift_r(a0, a1, 24) & 0xFFFFFFu);
      xb[0] = spread3(b0 & 0xFFFFFFu); xb[1] = spread3(__funnelshift_r(b0, b1, 24) & 0xFFFFFFu);
    } else {
      xa[0] = spread3(a[0]); xb[0] = spread3(b[0]);
    }
#pragma unroll
    for (int i = 0; i < D / 64; ++i) {
      if constexpr (DEC == 1) {
        // byte m of E = (a_{2m}, b_{2m}) nibbles, of O = (a_{2m+1}, b_{2m+1})
        const uint32_t E = (xa[i] & 0x0F0F0F0Fu) | ((xb[i] << 4) & 0xF0F0F0F0u);
        const uint32_t O = ((xa[i] >> 4) & 0x0F0F0F0Fu) | (xb[i] & 0xF0F0F0F0u);
#pragma unroll
        for (int m = 0; m < 4; ++m) {
          vp[8 * i + 2 * m] = lut_byte(E, lane_off, m);
          vp[8 * i + 2 * m + 1] = lut_byte(O, lane_off, m);
        }
      } else {
        uint32_t o[4];
        if constexpr (BITS == 4) dec4<CROSS_A, CROSS_B>(prmt(xa[i], xb[i], 0x5140), tab, o);
        else dec3<CROSS_A, CROSS_B>(prmt(xa[i], xb[i], 0x5140), tab, o);
        vp[8 * i + 0] = o[0]; vp[8 * i + 1] = o[1]; vp[8 * i + 2] = o[2]; vp[8 * i + 3] = o[3];
        if constexpr (BITS == 4) dec4<CROSS_A, CROSS_B>(prmt(xa[i], xb[i], 0x7362), tab, o);
        else dec3<CROSS_A, CROSS_B>(prmt(xa[i], xb[i], 0x7362), tab, o);
        vp[8 * i + 4] = o[0]; vp[8 * i + 5] = o[1]; vp[8 * i + 6] = o[2]; vp[8 * i + 7] = o[3];
      }
    }
  }
}

__device__ __forceinline__ float load_mask(const Params& p, long long off, int kind) {
  if (kind == 1) return reinterpret_cast<const uint8_t*>(p.mask)[off] ? 0.f : -INFINITY;
  if (kind == 2) return reinterpret_cast<const float*>(p.mask)[off] * 1.4426950408889634f;
  if (kind == 3) return __half2float(reinterpret_cast<const __half*>(p.mask)[off]) * 1.4426950408889634f;
  const unsigned short raw = reinterpret_cast<const unsigned short*>(p.mask)[off];
  return __uint_as_float(uint32_t(raw) << 16) * 1.4426950408889634f;
}

// Raw codes and norms of one iteration (16*T tokens) for one thread.
template <int KBITS, int VBITS, int D, int T>
struct Raw {
  uint32_t k[2 * T][Geo<KBITS, D>::KW];  // key tokens base + 2T*gid + i
  uint32_t v[4 * T][Geo<VBITS, D>::VW];  // value tokens base + 4T*t4 + i
  __half kn[2 * T], vn[2 * T];           // key and value norms of the key tokens
};

// Pointers of one thread, advanced by one iteration at a time (all offsets inside an iteration are immediates).
struct Ptrs {
  const uint8_t* k;   // key row of token base + 2T*gid, + the thread's byte offset
  const uint8_t* v;   // value row of token base + 4T*t4, + the thread's byte offset
  const __half* kn;   // key norm of token base + 2T*gid
  const __half* vn;   // value norm of token base + 2T*gid
};

template <int KBITS, int VBITS, int D, int T, bool FULL>
__device__ __forceinline__ void load_iter(Raw<KBITS, VBITS, D, T>& r, const Ptrs& q, int kleft, int vleft, int gid,
                                          int t4) {
  // kleft / vleft: tokens of this warp's range left from this thread's first key / value token
#pragma unroll
  for (int i = 0; i < 2 * T; ++i) {
    if (FULL || i < kleft) {
      load_k<KBITS, D>(q.k + i * Geo<KBITS, D>::ROW, r.k[i]);
      r.kn[i] = __ldg(q.kn + i);
      r.vn[i] = __ldg(q.vn + i);
    } else {
#pragma unroll
      for (int x = 0; x < Geo<KBITS, D>::KW; ++x) r.k[i][x] = 0;
      r.kn[i] = __float2half(0.f);
      r.vn[i] = __float2half(0.f);
    }
  }
#pragma unroll
  for (int i = 0; i < 4 * T; ++i) {
    if (FULL || i < vleft) {
      load_v<VBITS, D>(q.v + i * Geo<VBITS, D>::ROW, r.v[i]);
    } else {
#pragma unroll
      for (int x = 0; x < Geo<VBITS, D>::VW; ++x) r.v[i][x] = 0;
    }
  }
}

template <int KBITS, int D>
struct State {
  uint32_t qf[Geo<KBITS, D>::KS][2];  // query B fragments (row gid)
  float qo[2];                        // <q, mu_k> * scale2 of rows 2*t4, 2*t4 + 1
  float m[2], l[2];                   // running max (base 2) and this thread's part of the sum
  float acc[D / 16][4];               // value accumulator: coordinate rows (gid, gid+8) x query rows (2*t4, +1)
};

template <int KBITS, int VBITS, int D, int T, bool FULL, bool MASK, int DEC>
__device__ __forceinline__ void compute_iter(const Params& p, const Raw<KBITS, VBITS, D, T>& r, State<KBITS, D>& st,
                                             int base, int stop, int gid, int t4, const long long (&mrow)[2],
                                             const bool (&rowok)[2], uint32_t lane_k, uint32_t lane_v) {
  constexpr int KS = Geo<KBITS, D>::KS;
  constexpr int VT = D / 16;
  float sc[T][2][2];  // [tile][token row gid / gid + 8][query row 2*t4 + e]
#pragma unroll
  for (int j = 0; j < T; ++j) {
    uint32_t k0[KS][2], k1[KS][2];
    decode_key<KBITS, D, DEC>(r.k[2 * j], t4, p.ktab, lane_k, k0);
    decode_key<KBITS, D, DEC>(r.k[2 * j + 1], t4, p.ktab, lane_k, k1);
    float c[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int s = 0; s < KS; ++s) mma16816(c, k0[s][0], k1[s][0], k0[s][1], k1[s][1], st.qf[s][0], st.qf[s][1]);
#pragma unroll
    for (int t = 0; t < 2; ++t) {
      const float kn = __half2float(r.kn[2 * j + t]);
      const int tok = base + 2 * T * gid + 2 * j + t;
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        float x = fmaf(c[2 * t + e], kn, st.qo[e]);
        if (MASK) {
          if (rowok[e] && (FULL || tok < stop)) x += load_mask(p, mrow[e] + tok * p.sm_t, p.mask_kind);
        }
        if (!FULL && tok >= stop) x = -INFINITY;
        sc[j][t][e] = x;
      }
    }
  }
  // online softmax (base 2); the 8 lanes with one t4 hold all tokens of query rows 2*t4, 2*t4 + 1
  float alpha[2], msafe[2];
#pragma unroll
  for (int e = 0; e < 2; ++e) {
    float mx = st.m[e];
#pragma unroll
    for (int j = 0; j < T; ++j) mx = fmaxf(mx, fmaxf(sc[j][0][e], sc[j][1][e]));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 4));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 8));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 16));
    msafe[e] = (mx == -INFINITY) ? 0.f : mx;
    alpha[e] = ex2(st.m[e] - msafe[e]);
    st.m[e] = mx;
    st.l[e] *= alpha[e];
  }
#pragma unroll
  for (int i = 0; i < VT; ++i) {
    st.acc[i][0] *= alpha[0]; st.acc[i][1] *= alpha[1];
    st.acc[i][2] *= alpha[0]; st.acc[i][3] *= alpha[1];
  }
#pragma unroll
  for (int j = 0; j < T; ++j) {
    uint32_t pb[2];
#pragma unroll
    for (int t = 0; t < 2; ++t) {
      const float p0 = ex2(sc[j][t][0] - msafe[0]);
      const float p1 = ex2(sc[j][t][1] - msafe[1]);
      st.l[0] += p0;
      st.l[1] += p1;
      const float vn = __half2float(r.vn[2 * j + t]);
      // 8x8 block (token row, query col) -> transposed: (query row gid, tokens 2*t4, 2*t4 + 1)
      pb[t] = movtrans(pack_half2(p0 * vn, p1 * vn));
    }
    // k index (2*t4, 2*t4+1) = tokens v[2j], v[2T+2j]; (8+2*t4, 9+2*t4) = v[2j+1], v[2T+2j+1]
    uint32_t vp0[D / 8], vp1[D / 8];
    decode_value_pair<VBITS, D, DEC>(r.v[2 * j], r.v[2 * T + 2 * j], gid, p.vtab, lane_v, vp0);
    decode_value_pair<VBITS, D, DEC>(r.v[2 * j + 1], r.v[2 * T + 2 * j + 1], gid, p.vtab, lane_v, vp1);
#pragma unroll
    for (int i = 0; i < VT; ++i) mma16816(st.acc[i], vp0[2 * i], vp0[2 * i + 1], vp1[2 * i], vp1[2 * i + 1], pb[0], pb[1]);
  }
}

template <int KBITS, int VBITS, int D, int NW, int T, bool MASK, bool PREFETCH, int DEC>
__global__ void __launch_bounds__(NW * 32) decode_kernel(const Params p) {
  constexpr int KS = Geo<KBITS, D>::KS;
  constexpr int VT = D / 16;
  constexpr int TOK = 16 * T;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int gid = lane >> 2, t4 = lane & 3;
  const int split = blockIdx.x, bh = blockIdx.y, rb = blockIdx.z;
  const int b = bh / p.hkv, h = bh % p.hkv;
  const int start = split * p.tps;
  const int stop = min(start + p.tps, p.n);
  const int per = ((p.tps + NW - 1) / NW + TOK - 1) / TOK * TOK;
  const int wstart = start + warp * per;
  const int wstop = min(wstart + per, stop);

  const uint32_t lane_k = uint32_t(lane) * 4u, lane_v = lane_k + 128u;
  if (DEC == 1) {
    // decode table: row = code byte (256 B), keys then values, each entry once per lane (bank = lane)
    const uint32_t km = KBITS == 4 ? 15u : 7u, vm = VBITS == 4 ? 15u : 7u;
    for (int i = threadIdx.x; i < 256 * 16; i += NW * 32) {
      const int byte = i >> 4, half = (i >> 3) & 1;
      const unsigned short* c = half ? p.vcent : p.kcent;
      const uint32_t mk = half ? vm : km;
      const uint32_t e = uint32_t(c[byte & mk]) | (uint32_t(c[(byte >> 4) & mk]) << 16);
      reinterpret_cast<uint4*>(tq_smem)[i] = make_uint4(e, e, e, e);
    }
    __syncthreads();
  }
  State<KBITS, D> st;
  {
    const int row = rb * 8 + gid;
    const float* qrow = p.q + ((long long)bh * p.m + row) * D;
#pragma unroll
    for (int s = 0; s < KS; ++s)
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        float x0 = 0.f, x1 = 0.f;
        if (row < p.m) {
          x0 = qrow[key_coord<KBITS, D>(t4, s, hh, 0)] * p.scale2;
          x1 = qrow[key_coord<KBITS, D>(t4, s, hh, 1)] * p.scale2;
        }
        st.qf[s][hh] = pack_half2(x0, x1);
      }
  }
  long long mrow[2] = {0, 0};
  bool rowok[2];
#pragma unroll
  for (int e = 0; e < 2; ++e) {
    const int row = rb * 8 + 2 * t4 + e;
    rowok[e] = row < p.m;
    st.qo[e] = (p.qoff != nullptr && rowok[e]) ? p.qoff[(long long)bh * p.m + row] * p.scale2 : 0.f;
    if (MASK && rowok[e]) mrow[e] = b * p.sm_b + (long long)(h * p.g + row / p.l) * p.sm_h + (long long)(row % p.l) * p.sm_l;
    st.m[e] = -INFINITY;
    st.l[e] = 0.f;
  }
#pragma unroll
  for (int i = 0; i < VT; ++i) st.acc[i][0] = st.acc[i][1] = st.acc[i][2] = st.acc[i][3] = 0.f;

  constexpr int KROW = Geo<KBITS, D>::ROW, VROW = Geo<VBITS, D>::ROW;
  Ptrs ptr;
  {
    const int k0 = wstart + 2 * T * gid, v0 = wstart + 4 * T * t4;
    ptr.k = p.kc + b * p.kc_sb + h * p.kc_sh + (long long)k0 * KROW + key_byte_offset<KBITS, D>(t4);
    ptr.v = p.vc + b * p.vc_sb + h * p.vc_sh + (long long)v0 * VROW + value_byte_offset<VBITS, D>(gid);
    ptr.kn = p.kn + b * p.kn_sb + h * p.kn_sh + k0;
    ptr.vn = p.vn + b * p.vn_sb + h * p.vn_sh + k0;
  }
  auto advance = [&]() {
    ptr.k += TOK * KROW;
    ptr.v += TOK * VROW;
    ptr.kn += TOK;
    ptr.vn += TOK;
  };
  using R = Raw<KBITS, VBITS, D, T>;
  // left = tokens of the warp's range from this iteration's base; full iterations need no predicates
  auto load_any = [&](R& r, int left) {
    if (left >= TOK) load_iter<KBITS, VBITS, D, T, true>(r, ptr, 0, 0, gid, t4);
    else load_iter<KBITS, VBITS, D, T, false>(r, ptr, left - 2 * T * gid, left - 4 * T * t4, gid, t4);
  };
  auto compute_any = [&](const R& r, int base) {
    if (base + TOK <= wstop) compute_iter<KBITS, VBITS, D, T, true, MASK, DEC>(p, r, st, base, wstop, gid, t4, mrow, rowok, lane_k, lane_v);
    else compute_iter<KBITS, VBITS, D, T, false, MASK, DEC>(p, r, st, base, wstop, gid, t4, mrow, rowok, lane_k, lane_v);
  };
  if (PREFETCH) {
    // two register buffers used alternately (no copies): load iteration i+1 while computing i
    R ra, rb2;
    int base = wstart;
    if (base < wstop) load_any(ra, wstop - base);
    while (base < wstop) {
      advance();
      if (base + TOK < wstop) load_any(rb2, wstop - base - TOK);
      compute_any(ra, base);
      base += TOK;
      if (base >= wstop) break;
      advance();
      if (base + TOK < wstop) load_any(ra, wstop - base - TOK);
      compute_any(rb2, base);
      base += TOK;
    }
  } else {
    int base = wstart;
    for (; base + TOK <= wstop; base += TOK) {
      R r;
      load_iter<KBITS, VBITS, D, T, true>(r, ptr, 0, 0, gid, t4);
      compute_iter<KBITS, VBITS, D, T, true, MASK, DEC>(p, r, st, base, wstop, gid, t4, mrow, rowok, lane_k, lane_v);
      advance();
    }
    if (base < wstop) {
      R r;
      load_any(r, wstop - base);
      compute_iter<KBITS, VBITS, D, T, false, MASK, DEC>(p, r, st, base, wstop, gid, t4, mrow, rowok, lane_k, lane_v);
    }
  }

  // ---- merge the warps of this CTA (the only barrier), write one partial
  if (DEC == 1) __syncthreads();  // the table is reused for the merge
  float(*sm_acc)[8][D + 1] = reinterpret_cast<float(*)[8][D + 1]>(tq_smem);
  float(*sm_ml)[8][2] = reinterpret_cast<float(*)[8][2]>(reinterpret_cast<float*>(tq_smem) + NW * 8 * (D + 1));
#pragma unroll
  for (int e = 0; e < 2; ++e) {
    float l = st.l[e];
    l += __shfl_xor_sync(0xffffffffu, l, 4);
    l += __shfl_xor_sync(0xffffffffu, l, 8);
    l += __shfl_xor_sync(0xffffffffu, l, 16);
    if (gid == 0) {
      sm_ml[warp][2 * t4 + e][0] = st.m[e];
      sm_ml[warp][2 * t4 + e][1] = l;
    }
  }
#pragma unroll
  for (int i = 0; i < VT; ++i) {
    const int c0 = (D / 8) * gid + 2 * i;  // value coordinates of accumulator rows gid / gid + 8 of tile i
    sm_acc[warp][2 * t4][c0] = st.acc[i][0];
    sm_acc[warp][2 * t4 + 1][c0] = st.acc[i][1];
    sm_acc[warp][2 * t4][c0 + 1] = st.acc[i][2];
    sm_acc[warp][2 * t4 + 1][c0 + 1] = st.acc[i][3];
  }
  __syncthreads();
  const int rows = min(8, p.m - rb * 8);
  float* out = p.part + ((long long)bh * p.splits + split) * p.m * (p.ac + 2);
  for (int idx = threadIdx.x; idx < rows * (D + 2); idx += NW * 32) {
    const int row = idx / (D + 2), col = idx % (D + 2);
    float mt = -INFINITY;
#pragma unroll
    for (int w = 0; w < NW; ++w) mt = fmaxf(mt, sm_ml[w][row][0]);
    const float ms = (mt == -INFINITY) ? 0.f : mt;
    float* o = out + (long long)(rb * 8 + row) * (p.ac + 2);
    if (col < D) {
      float a = 0.f;
#pragma unroll
      for (int w = 0; w < NW; ++w) a += ex2(sm_ml[w][row][0] - ms) * sm_acc[w][row][col];
      o[p.ac - D + col] = a;
    } else if (col == D) {
      o[p.ac] = mt;
    } else {
      float l = 0.f;
#pragma unroll
      for (int w = 0; w < NW; ++w) l += ex2(sm_ml[w][row][0] - ms) * sm_ml[w][row][1];
      o[p.ac + 1] = l;
    }
  }
}

}  // namespace tq

// ------------------------------------------------------------------------------ host side
namespace tq {
template <int D, int NW, int DEC>
constexpr int smem_bytes() {
  return (DEC == 1 && 65536 > NW * 8 * (D + 1) * 4 + NW * 64) ? 65536 : NW * 8 * (D + 1) * 4 + NW * 64;
}
}  // namespace tq

template <int KB, int VB, int D, int NW, int T, bool MASK, bool PF, int DEC>
static cudaError_t tq_run(const tq::Params& p, int bh, int rblocks, cudaStream_t stream, int* info) {
  auto fn = tq::decode_kernel<KB, VB, D, NW, T, MASK, PF, DEC>;
  constexpr int smem = tq::smem_bytes<D, NW, DEC>();
  static bool configured = false;  // the opt-in for > 48 KB of dynamic shared memory, once per variant
  if (!configured) {
    cudaError_t err = cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (err != cudaSuccess) return err;
    configured = true;
  }
  if (info != nullptr) {  // registers, local (spill) bytes, CTAs per SM, shared bytes
    cudaFuncAttributes a;
    cudaError_t err = cudaFuncGetAttributes(&a, fn);
    if (err != cudaSuccess) return err;
    info[0] = a.numRegs;
    info[1] = int(a.localSizeBytes);
    info[3] = smem;
    return cudaOccupancyMaxActiveBlocksPerMultiprocessor(&info[2], fn, NW * 32, smem);
  }
  dim3 grid((unsigned)p.splits, (unsigned)bh, (unsigned)rblocks);
  fn<<<grid, NW * 32, smem, stream>>>(p);
  return cudaGetLastError();
}

// Variant = (warps per CTA, 16-token tiles per iteration, register prefetch, decoder 0 = prmt / 1 = shared table).
// The library build holds the default of each width (nw = 0 asks for it); -DTQ_TUNE adds the variants
// the benchmark sweeps.
template <int KB, int VB, int D, bool MASK>
static cudaError_t tq_variant(const tq::Params& p, int bh, int rb, int nw, int tiles, bool pf, int dec,
                              cudaStream_t s, int* info) {
  constexpr bool TWO = (KB == 2 || VB == 2);  // 2-bit streams: prmt decoder (already cheap), 4 warps x 4 tiles
  constexpr int DNW = TWO ? 4 : 8, DT = TWO ? 4 : 2, DDEC = TWO ? 0 : 1;
  if (nw == 0) { nw = DNW; tiles = DT; pf = false; dec = DDEC; }
  if (nw == DNW && tiles == DT && !pf && dec == DDEC) return tq_run<KB, VB, D, DNW, DT, MASK, false, DDEC>(p, bh, rb, s, info);
#ifdef TQ_TUNE
#define TQ_V(NW, T, PF, DEC) \
  if (nw == NW && tiles == T && pf == PF && dec == DEC) return tq_run<KB, VB, D, NW, T, false, PF, DEC>(p, bh, rb, s, info);
  if (!MASK) {
    TQ_V(4, 4, false, 0) TQ_V(8, 2, false, 0) TQ_V(4, 2, false, 0) TQ_V(8, 4, false, 0)
    if constexpr (!TWO) {
      TQ_V(4, 4, false, 1) TQ_V(4, 2, false, 1) TQ_V(8, 4, false, 1) TQ_V(8, 2, true, 1) TQ_V(4, 2, true, 1)
    }
  }
#undef TQ_V
#endif
  return cudaErrorInvalidValue;
}

template <int KB, int VB, int D>
static cudaError_t tq_mask(const tq::Params& p, int bh, int rb, int nw, int tiles, bool mask, bool pf, int dec,
                           cudaStream_t s, int* info) {
  return mask ? tq_variant<KB, VB, D, true>(p, bh, rb, nw, tiles, pf, dec, s, info)
              : tq_variant<KB, VB, D, false>(p, bh, rb, nw, tiles, pf, dec, s, info);
}

// Launch one decode variant (info == nullptr), or fill info = {registers, spill bytes, CTAs per SM, smem bytes}.
// dec < 0: the default decoder of the widths.
cudaError_t tq_decode_dispatch(const tq::Params& p, int kbits, int vbits, int d, int bh, int rblocks, int nw,
                               int tiles, bool mask, bool prefetch, int dec, cudaStream_t s, int* info) {
#define TQ_CASE(KB, VB, D) \
  if (kbits == KB && vbits == VB && d == D) return tq_mask<KB, VB, D>(p, bh, rblocks, nw, tiles, mask, prefetch, dec, s, info);
  TQ_CASE(4, 4, 128) TQ_CASE(3, 3, 128) TQ_CASE(2, 2, 128)
  TQ_CASE(4, 4, 64) TQ_CASE(3, 3, 64) TQ_CASE(2, 2, 64)
#undef TQ_CASE
  return cudaErrorInvalidValue;
}
