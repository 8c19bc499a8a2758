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
//  * decoders: the default is a table in shared memory indexed by a code byte (below: one fp16 pair
//    per 4-bit byte / 3-bit 6-bit field, two pairs per 2-bit byte). The byte-permute (prmt) register
//    decoders (tables in registers; 4-bit uses the odd symmetry c[15-i] = -c[i], 3-bit spreads the
//    codes of a 3-byte group to nibbles, 2-bit builds the prmt selector pair (c, c+4) with one
//    multiply-add) remain as sweep variants and for mixes of the two pipes (key_table).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "cuda_attention.cuh"

namespace tq {

// Shared-memory decoder (DEC = 1): row `byte` (256 B) of the table holds, for keys (first 128 B)
// and values (last 128 B), the fp16 pair (c[byte & 15], c[byte >> 4]) once per lane, so that lane
// l always reads bank l (no conflicts whatever the codes). The table is the first thing in dynamic
// shared memory, which starts at SMEM_BASE in the CTA's window (checked at load: smem_base_probe),
// so one prmt makes the whole address: byte 1 = code byte, byte 0 = lane * 4 (+ 128 for values),
// byte 3 = the CTA's rank bits of the shared window (lane_off's byte 3), and SMEM_BASE is the load's
// immediate offset (no add per lookup).
extern __shared__ __align__(16) uint32_t tq_smem[];

__device__ __forceinline__ uint32_t lut(uint32_t addr) {
  uint32_t v;
  asm volatile("ld.shared.u32 %0, [%1+%2];" : "=r"(v) : "r"(addr), "n"(SMEM_BASE));
  return v;
}

// 2-bit codes: a table row holds 8-byte entries, 16 per half (an 8-byte load is served per half-warp, so lane l
// reading bank pair l % 16 is conflict-free too); the entry of byte x (codes x0..x3, LSB first) is two fp16 pairs,
// (c[x0], c[x1]), (c[x2], c[x3]) for keys and (c[x0], c[x2]), (c[x1], c[x3]) for values (table_entry).
__device__ __forceinline__ uint2 lut64(uint32_t addr) {
  uint2 v;
  asm volatile("ld.shared.v2.u32 {%0, %1}, [%2+%3];" : "=r"(v.x), "=r"(v.y) : "r"(addr), "n"(SMEM_BASE));
  return v;
}

// lane_off of lut_byte: the window's high byte (CTA rank in its cluster) | the lane's column (+ 128: value table)
template <int BITS>
__device__ __forceinline__ uint32_t table_lane_offset(int lane, bool values) {
  const uint32_t col = BITS == 2 ? uint32_t(lane & 15) * 8u : uint32_t(lane) * 4u;
  return (uint32_t(__cvta_generic_to_shared(tq_smem)) & 0xFF000000u) | (col + (values ? 128u : 0u));
}

// One 16-byte quarter-row of the table for `byte`: the 4-byte entry (c[byte & 15], c[byte >> 4]) of 4-bit codes
// and 3-bit values (spread to nibbles first), (c[byte & 7], c[byte >> 3]) of 3-bit keys (a 6-bit field of the
// code stream), four times; or the 8-byte entry of 2-bit codes twice.
template <int BITS>
__device__ __forceinline__ uint4 table_entry(const unsigned short* c, int byte, bool values) {
  if constexpr (BITS == 2) {
    const int s1 = values ? 4 : 2, s2 = values ? 2 : 4;  // shifts of the codes paired with x0 and x2
    const uint32_t x = uint32_t(c[byte & 3]) | (uint32_t(c[(byte >> s1) & 3]) << 16);
    const uint32_t y = uint32_t(c[(byte >> s2) & 3]) | (uint32_t(c[(byte >> 6) & 3]) << 16);
    return make_uint4(x, y, x, y);
  } else {
    // 3-bit keys: a 6-bit field (two codes) indexes the row; 3-bit values: two nibbles (spread3)
    constexpr uint32_t m = BITS == 4 ? 15u : 7u;
    const int hi = (BITS == 3 && !values) ? 3 : 4;
    const uint32_t e = uint32_t(c[byte & m]) | (uint32_t(c[(byte >> hi) & m]) << 16);
    return make_uint4(e, e, e, e);
  }
}

// Dynamic shared memory's offset in the window of a kernel with no static shared memory (as decode_kernel).
__global__ void smem_base_probe(uint32_t* out) {
  out[0] = uint32_t(__cvta_generic_to_shared(tq_smem)) & 0x00FFFFFFu;
}

__device__ __forceinline__ uint32_t prmt(uint32_t a, uint32_t b, uint32_t s) {
  uint32_t d;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(s));
  return d;
}

// fp16 pair of code byte k of x from the shared table (lane_off: table_lane_offset)
__device__ __forceinline__ uint32_t lut_byte(uint32_t x, uint32_t lane_off, int k) {
  return lut(prmt(x, lane_off, 0x7504u | (uint32_t(k) << 4)));
}
// the two fp16 pairs of 2-bit code byte k of x (table_entry<2>)
__device__ __forceinline__ uint2 lut_byte2(uint32_t x, uint32_t lane_off, int k) {
  return lut64(prmt(x, lane_off, 0x7504u | (uint32_t(k) << 4)));
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

// Byte m of E = (low nibble of a's byte m, low nibble of b's byte m), of O the two high nibbles: the table bytes
// of code pairs taken from two words (two tokens' values, or two score rows' 2-bit keys).
// (x & m) | (y & ~m) in one LOP3 (ptxas emits an AND and a LOP3 for the expression written out)
__device__ __forceinline__ uint32_t bit_select(uint32_t x, uint32_t y, uint32_t m) {
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, 0xE4;" : "=r"(d) : "r"(x), "r"(y), "r"(m));  // 0xE4 = (0xF0 & 0xAA) | (0xCC & ~0xAA)
  return d;
}

// SELECT: one LOP3 each (raw code words); else the plain expression, which ptxas merges with spread3's last step
// when a and b come from it (3 bits: 26 instructions fewer per loop than the LOP3 form)
template <bool SELECT>
__device__ __forceinline__ void nibble_pairs(uint32_t a, uint32_t b, uint32_t& E, uint32_t& O) {
  if constexpr (SELECT) {
    E = bit_select(b << 4, a, 0xF0F0F0F0u);
    O = bit_select(a >> 4, b, 0x0F0F0F0Fu);
  } else {
    E = (a & 0x0F0F0F0Fu) | ((b << 4) & 0xF0F0F0F0u);
    O = ((a >> 4) & 0x0F0F0F0Fu) | (b & 0xF0F0F0F0u);
  }
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

// Which code words go through the shared table (MIO pipe) and which through the prmt register
// decoder (ALU pipe): DEC 0 all registers, 1 all table, 2 keys registers + values table, 3 keys
// split (even words table) + values table, 4 keys table + values registers, 5 keys table + values
// split, 6 both split. Splitting balances the two pipes.
template <int DEC>
__host__ __device__ constexpr bool key_table(int word) {
  return DEC == 1 || DEC == 4 || DEC == 5 || ((DEC == 3 || DEC == 6) && word % 2 == 0);
}
template <int DEC>
__host__ __device__ constexpr bool value_table(int block) {
  return DEC == 1 || DEC == 2 || DEC == 3 || ((DEC == 5 || DEC == 6) && block % 2 == 0);
}

// Head-dim coordinate of the query value that pairs with key fragment (k-step s, half h, element e).
// 2-bit words decoded by dec2 (not the table, decode_keys) pair c_j with c_{j+4}.
template <int BITS, int D, int DEC>
__device__ __forceinline__ int key_coord(int t4, int s, int h, int e) {
  if (BITS == 2 && !key_table<DEC>(s / 4)) return (D / 4) * t4 + 16 * (s / 4) + 8 * h + (s % 4) + 4 * e;
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

// Key fragments of one token, 3 or 4 bits (2 bits: decode_keys): kp[s][h] = fp16 pair for k-step s, A-operand
// half h (see key_coord).
template <int BITS, int D, int DEC>
__device__ __forceinline__ void decode_key(const uint32_t (&w)[Geo<BITS, D>::KW], int t4, const uint32_t (&tab)[4],
                                           uint32_t lane_off, uint32_t (&kp)[Geo<BITS, D>::KS][2]) {
  static_assert(BITS == 3 || BITS == 4, "2-bit keys are decoded by decode_keys");
  // 3 bits: the thread's 96 / 48 code bits from bit 0 of r (d = 64: its 6 bytes start 0 or 2 bytes into w[0])
  uint32_t r[3] = {0u, 0u, 0u};
  if constexpr (BITS == 3 && D == 128) {
    r[0] = w[0]; r[1] = w[1]; r[2] = w[2];
  } else if constexpr (BITS == 3) {
    const uint32_t sh = (t4 & 1) ? 16u : 0u;
    r[0] = __funnelshift_r(w[0], w[1], sh); r[1] = w[1] >> sh;
  }
  // 8 codes per 32-bit word (4 bits) or per 24-bit group of r spread to nibbles (3 bits; the register decoder and
  // the table's value-style rows)
  uint32_t x[D / 32];
#pragma unroll
  for (int i = 0; i < D / 32; ++i) {
    const int bit = 24 * i, wi = bit / 32, b = bit % 32;
    if constexpr (BITS == 4) x[i] = w[i];
    else x[i] = spread3((b + 24 > 32 ? __funnelshift_r(r[wi], r[wi + 1], b) : r[wi] >> b) & 0xFFFFFFu);
  }
#pragma unroll
  for (int i = 0; i < D / 32; ++i) {
    uint32_t o[4];
    if (BITS == 3 && key_table<DEC>(i)) {
      // 3 bits: the table's key rows are indexed by a 6-bit field (two codes), shifted straight from the code
      // words to the address's byte 1 (no spread3)
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const int bit = 6 * (4 * i + k), wi = bit / 32, b = bit % 32;  // field at bits [b, b + 6) of r[wi]
        const uint32_t t = b + 6 > 32 ? __funnelshift_r(r[wi], r[wi + 1], b - 8)
                                      : (b >= 8 ? r[wi] >> (b - 8) : r[wi] << (8 - b));
        o[k] = lut((t & 0x3F00u) | lane_off);
      }
    } else if (key_table<DEC>(i)) {
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

// Key fragments of a tile's two score rows (k0: row gid, k1: row gid + 8). 2-bit words through the table are
// decoded for both rows at once: a byte of E holds two codes of each row, so one 8-byte entry is the mma's A
// registers (row gid, row gid + 8) of one k-half, with no register moves.
template <int BITS, int D, int DEC>
__device__ __forceinline__ void decode_keys(const uint32_t (&w0)[Geo<BITS, D>::KW], const uint32_t (&w1)[Geo<BITS, D>::KW],
                                            int t4, const uint32_t (&tab)[4], uint32_t lane_off,
                                            uint32_t (&k0)[Geo<BITS, D>::KS][2], uint32_t (&k1)[Geo<BITS, D>::KS][2]) {
  if constexpr (BITS == 2) {
    // word i of a row by dec2: kp[4i + j] = (X[j], Y[j]) (key_coord's order for such words)
    auto reg_word = [&](uint32_t w, int i, uint32_t (&kp)[Geo<BITS, D>::KS][2]) {
      uint32_t X[4], Y[4];
      dec2(w, tab, X, Y);
#pragma unroll
      for (int j = 0; j < 4; ++j) { kp[4 * i + j][0] = X[j]; kp[4 * i + j][1] = Y[j]; }
    };
#pragma unroll
    for (int i = 0; i < D / 64; ++i) {
      if (key_table<DEC>(i)) {
        // byte m of E = codes (4m, 4m+1) of row gid, then of row gid + 8; of O the codes (4m+2, 4m+3)
        uint32_t E, O;
        nibble_pairs<true>(w0[i], w1[i], E, O);
#pragma unroll
        for (int m = 0; m < 4; ++m) {
          const uint2 e = lut_byte2(E, lane_off, m), o = lut_byte2(O, lane_off, m);
          k0[4 * i + m][0] = e.x; k1[4 * i + m][0] = e.y; k0[4 * i + m][1] = o.x; k1[4 * i + m][1] = o.y;
        }
      } else {  // the register decoder, one row at a time
        reg_word(w0[i], i, k0);
        reg_word(w1[i], i, k1);
      }
    }
  } else {
    decode_key<BITS, D, DEC>(w0, t4, tab, lane_off, k0);
    decode_key<BITS, D, DEC>(w1, t4, tab, lane_off, k1);
  }
}

// Value fragments of a token pair (a, b): vp[slot] = (v_a, v_b) at coordinate (D/8)*gid + slot.
template <int BITS, int D, int DEC>
__device__ __forceinline__ void decode_value_pair(const uint32_t (&a)[Geo<BITS, D>::VW],
                                                  const uint32_t (&b)[Geo<BITS, D>::VW], int gid,
                                                  const uint32_t (&tab)[4], uint32_t lane_off, uint32_t (&vp)[D / 8]) {
  if constexpr (BITS == 2) {
    if (value_table<DEC>(0)) {
      // byte m of E = crumbs (a_4m, a_4m+1, b_4m, b_4m+1), of O the next two of each: table_entry<2> pairs them
      uint32_t E, O;
      nibble_pairs<true>(a[0], b[0], E, O);
#pragma unroll
      for (int m = 0; m < D / 32; ++m) {
        const uint2 e = lut_byte2(E, lane_off, m), o = lut_byte2(O, lane_off, m);
        vp[4 * m] = e.x; vp[4 * m + 1] = e.y; vp[4 * m + 2] = o.x; vp[4 * m + 3] = o.y;
      }
      return;
    }
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
      if (value_table<DEC>(i)) {
        // byte m of E = (a_{2m}, b_{2m}) nibbles, of O = (a_{2m+1}, b_{2m+1})
        uint32_t E, O;
        nibble_pairs<BITS == 4>(xa[i], xb[i], E, O);
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

// Loads of read-only inputs given in several dtypes: the raw bits first, the conversion separate, so a run of
// loads stays in flight together (a conversion inside the dtype branch would wait for each load in turn).
// Tensor kinds 2 fp32, 3 fp16, 4 bf16; mask kinds add 1 bool/uint8 (nonzero = attend; the others are additive).
__device__ __forceinline__ uint32_t load_bits(const void* ptr, long long off, int kind) {
  if (kind == 2) return __ldg(reinterpret_cast<const unsigned int*>(ptr) + off);
  if (kind == 1) return __ldg(reinterpret_cast<const unsigned char*>(ptr) + off);
  return __ldg(reinterpret_cast<const unsigned short*>(ptr) + off);
}

__device__ __forceinline__ float bits_to_f(uint32_t r, int kind) {
  if (kind == 2) return __uint_as_float(r);
  if (kind == 3) return __half2float(__ushort_as_half((unsigned short)r));
  return __uint_as_float(r << 16);
}

// A mask element as an additive base-2 logit term: 0 or -inf for a bool mask, x * log2(e) for a float one.
__device__ __forceinline__ float mask_from_bits(uint32_t r, int kind) {
  if (kind == 1) return r ? 0.f : -INFINITY;
  return bits_to_f(r, kind) * 1.4426950408889634f;
}

__device__ __forceinline__ float load_mask(const Params& p, long long off, int kind) {
  return mask_from_bits(load_bits(p.mask, off, kind), kind);
}

// Which tokens of an iteration (16*T tokens from its base) a thread holds, chosen so that every load of a warp
// reads one contiguous run of code rows (no cache line fetched twice). Score row r of tile j is token
// 16*j + row_token(r), row_token(r) = r/2 (r even) or r/2 + 4 (r odd) within each half of 8 rows; so key i of
// thread (gid, t4) (row gid + 8*(i % 2) of tile i / 2) is token 8*i + row_token(gid): the 8 lanes' rows of one
// key load are 8 consecutive tokens (512 bytes at 4 bits, d = 128). The value product's A operand needs, at
// k-index 2*t4 + {0, 1, 8, 9}, the tokens of those score rows: 16*j + t4 + {0, 4, 8, 12}, i.e. value i of thread
// t4 is token 4*i + t4, and one value load covers 4 consecutive tokens.
__device__ __forceinline__ constexpr int row_token(int r) { return (r & 8) + (r & 7) / 2 + 4 * (r & 1); }
__device__ __forceinline__ constexpr int key_token(int i) { return 8 * i; }    // + row_token(gid)
__device__ __forceinline__ constexpr int value_token(int i) { return 4 * i; }  // + t4

// Raw codes and norms of one iteration (16*T tokens) for one thread.
template <int KBITS, int VBITS, int D, int T>
struct Raw {
  uint32_t k[2 * T][Geo<KBITS, D>::KW];  // key tokens base + row_token(gid) + key_token(i)
  uint32_t v[4 * T][Geo<VBITS, D>::VW];  // value tokens base + t4 + value_token(i)
  __half kn[2 * T], vn[2 * T];           // key and value norms of the key tokens
};

// Pointers of one thread, advanced by one iteration at a time (all offsets inside an iteration are immediates).
struct Ptrs {
  const uint8_t* k;   // key row of token base + row_token(gid), + the thread's byte offset
  const uint8_t* v;   // value row of token base + t4, + the thread's byte offset
  const __half* kn;   // key norm of token base + row_token(gid)
  const __half* vn;   // value norm of token base + row_token(gid)
};

// left: tokens of the warp's range from the iteration's base (FULL: all 16*T of them).
// Keys and key norms (the score part's inputs) of one iteration:
template <int KBITS, int VBITS, int D, int T, bool FULL>
__device__ __forceinline__ void load_keys(Raw<KBITS, VBITS, D, T>& r, const Ptrs& q, int left, int gid) {
#pragma unroll
  for (int i = 0; i < 2 * T; ++i) {
    if (FULL || key_token(i) + row_token(gid) < left) {
      load_k<KBITS, D>(q.k + key_token(i) * Geo<KBITS, D>::ROW, r.k[i]);
      r.kn[i] = __ldg(q.kn + key_token(i));
    } else {
#pragma unroll
      for (int x = 0; x < Geo<KBITS, D>::KW; ++x) r.k[i][x] = 0;
      r.kn[i] = __float2half(0.f);
    }
  }
}

// Values and value norms (the value part's inputs; the norms are of the thread's key tokens):
template <int KBITS, int VBITS, int D, int T, bool FULL>
__device__ __forceinline__ void load_values(Raw<KBITS, VBITS, D, T>& r, const Ptrs& q, int left, int gid, int t4) {
#pragma unroll
  for (int i = 0; i < 2 * T; ++i)
    r.vn[i] = (FULL || key_token(i) + row_token(gid) < left) ? __ldg(q.vn + key_token(i)) : __float2half(0.f);
#pragma unroll
  for (int i = 0; i < 4 * T; ++i) {
    if (FULL || value_token(i) + t4 < left) {
      load_v<VBITS, D>(q.v + value_token(i) * Geo<VBITS, D>::ROW, r.v[i]);
    } else {
#pragma unroll
      for (int x = 0; x < Geo<VBITS, D>::VW; ++x) r.v[i][x] = 0;
    }
  }
}

template <int KBITS, int VBITS, int D, int T, bool FULL>
__device__ __forceinline__ void load_iter(Raw<KBITS, VBITS, D, T>& r, const Ptrs& q, int left, int gid, int t4) {
  load_keys<KBITS, VBITS, D, T, FULL>(r, q, left, gid);
  load_values<KBITS, VBITS, D, T, FULL>(r, q, left, gid, t4);
}

template <int KBITS, int D>
struct State {
  uint32_t qf[Geo<KBITS, D>::KS][2];  // query B fragments (row gid)
  float qo[2];                        // <q, mu_k> * scale2 of rows 2*t4, 2*t4 + 1
  float m[2], l[2];                   // running max (base 2) and this thread's part of the sum
  float acc[D / 16][4];               // value accumulator: coordinate rows (gid, gid+8) x query rows (2*t4, +1)
};

// One iteration (16*T tokens) of a warp. kw(i, words) / vw(i, words) give the code words of the thread's
// key token i / value token i; kn / vn the norms;
// the hooks run after the score part (keys consumed), before and after the value part.
template <int KBITS, int VBITS, int D, int T, bool FULL, bool MASK, int DEC, class KW, class VW, class H1, class H2, class H3>
__device__ __forceinline__ void compute_core(const Params& p, KW&& kw, VW&& vw, const __half (&kn)[2 * T],
                                             const __half (&vn)[2 * T], State<KBITS, D>& st, int base, int stop,
                                             int gid, int t4, const long long (&mrow)[2], const bool (&rowok)[2],
                                             uint32_t lane_k, uint32_t lane_v, H1&& after_keys, H2&& before_values,
                                             H3&& after_values) {
  constexpr int KWN = Geo<KBITS, D>::KW, VWN = Geo<VBITS, D>::VW;
  constexpr int KS = Geo<KBITS, D>::KS;
  constexpr int VT = D / 16;
  float sc[T][2][2];  // [tile][token row gid / gid + 8][query row 2*t4 + e]
#pragma unroll
  for (int j = 0; j < T; ++j) {
    uint32_t k0[KS][2], k1[KS][2];
    {
      uint32_t w0[KWN], w1[KWN];
      kw(2 * j, w0);
      kw(2 * j + 1, w1);
      decode_keys<KBITS, D, DEC>(w0, w1, t4, p.ktab, lane_k, k0, k1);
    }
    float c[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int s = 0; s < KS; ++s) mma16816(c, k0[s][0], k1[s][0], k0[s][1], k1[s][1], st.qf[s][0], st.qf[s][1]);
#pragma unroll
    for (int t = 0; t < 2; ++t) {
      const float knorm = __half2float(kn[2 * j + t]);
      const int tok = base + 16 * j + row_token(gid + 8 * t);  // row gid + 8*t of tile j
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        float x = fmaf(c[2 * t + e], knorm, st.qo[e]);
        if (MASK) {
          if (rowok[e] && (FULL || tok < stop)) x += load_mask(p, mrow[e] + tok * p.sm_t, p.mask_kind);
        }
        if (!FULL && tok >= stop) x = -INFINITY;
        sc[j][t][e] = x;
      }
    }
  }
  after_keys();
  // online softmax (base 2); the 8 lanes with one t4 hold all tokens of query rows 2*t4, 2*t4 + 1
  // The state is rescaled only when some row's maximum grew (a warp-uniform branch): otherwise every
  // factor would be ex2(0) = 1 exactly (or scale a still-empty state), so skipping it changes no bit.
  float mx[2], msafe[2];
  bool grew = false;
#pragma unroll
  for (int e = 0; e < 2; ++e) {
    mx[e] = st.m[e];
#pragma unroll
    for (int j = 0; j < T; ++j) mx[e] = fmaxf(mx[e], fmaxf(sc[j][0][e], sc[j][1][e]));
    mx[e] = fmaxf(mx[e], __shfl_xor_sync(0xffffffffu, mx[e], 4));
    mx[e] = fmaxf(mx[e], __shfl_xor_sync(0xffffffffu, mx[e], 8));
    mx[e] = fmaxf(mx[e], __shfl_xor_sync(0xffffffffu, mx[e], 16));
    msafe[e] = (mx[e] == -INFINITY) ? 0.f : mx[e];
    grew |= mx[e] > st.m[e];
  }
  if (__any_sync(0xffffffffu, grew)) {
    float alpha[2];
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      alpha[e] = ex2(st.m[e] - msafe[e]);
      st.m[e] = mx[e];
      st.l[e] *= alpha[e];
    }
#pragma unroll
    for (int i = 0; i < VT; ++i) {
      st.acc[i][0] *= alpha[0]; st.acc[i][1] *= alpha[1];
      st.acc[i][2] *= alpha[0]; st.acc[i][3] *= alpha[1];
    }
  }
  before_values();
#pragma unroll
  for (int j = 0; j < T; ++j) {
    uint32_t pb[2];
#pragma unroll
    for (int t = 0; t < 2; ++t) {
      const float p0 = ex2(sc[j][t][0] - msafe[0]);
      const float p1 = ex2(sc[j][t][1] - msafe[1]);
      st.l[0] += p0;
      st.l[1] += p1;
      const float vnorm = __half2float(vn[2 * j + t]);
      // 8x8 block (token row, query col) -> transposed: (query row gid, tokens 2*t4, 2*t4 + 1)
      pb[t] = movtrans(pack_half2(p0 * vnorm, p1 * vnorm));
    }
    // k index (2*t4, 2*t4+1) = values 4j, 4j+1; (8+2*t4, 9+2*t4) = 4j+2, 4j+3: the tokens of those score rows
    uint32_t vp0[D / 8], vp1[D / 8];
    {
      uint32_t a0[VWN], b0[VWN], a1[VWN], b1[VWN];
      vw(4 * j, a0);
      vw(4 * j + 1, b0);
      vw(4 * j + 2, a1);
      vw(4 * j + 3, b1);
      decode_value_pair<VBITS, D, DEC>(a0, b0, gid, p.vtab, lane_v, vp0);
      decode_value_pair<VBITS, D, DEC>(a1, b1, gid, p.vtab, lane_v, vp1);
    }
#pragma unroll
    for (int i = 0; i < VT; ++i) mma16816(st.acc[i], vp0[2 * i], vp0[2 * i + 1], vp1[2 * i], vp1[2 * i + 1], pb[0], pb[1]);
  }
  after_values();
}

// after_keys / after_values: run once the iteration's keys / values are decoded (PF = 3 loads the next ones there)
template <int KBITS, int VBITS, int D, int T, bool FULL, bool MASK, int DEC, class H1, class H3>
__device__ __forceinline__ void compute_iter(const Params& p, Raw<KBITS, VBITS, D, T>& r, State<KBITS, D>& st,
                                             int base, int stop, int gid, int t4, const long long (&mrow)[2],
                                             const bool (&rowok)[2], uint32_t lane_k, uint32_t lane_v,
                                             H1&& after_keys, H3&& after_values) {
  constexpr int KWN = Geo<KBITS, D>::KW, VWN = Geo<VBITS, D>::VW;
  auto kw = [&](int i, uint32_t (&w)[KWN]) {
#pragma unroll
    for (int x = 0; x < KWN; ++x) w[x] = r.k[i][x];
  };
  auto vw = [&](int i, uint32_t (&w)[VWN]) {
#pragma unroll
    for (int x = 0; x < VWN; ++x) w[x] = r.v[i][x];
  };
  auto none = [] {};
  compute_core<KBITS, VBITS, D, T, FULL, MASK, DEC>(p, kw, vw, r.kn, r.vn, st, base, stop, gid, t4, mrow, rowok, lane_k,
                                                    lane_v, after_keys, none, after_values);
}

template <int KBITS, int VBITS, int D, int T, bool FULL, bool MASK, int DEC>
__device__ __forceinline__ void compute_iter(const Params& p, Raw<KBITS, VBITS, D, T>& r, State<KBITS, D>& st,
                                             int base, int stop, int gid, int t4, const long long (&mrow)[2],
                                             const bool (&rowok)[2], uint32_t lane_k, uint32_t lane_v) {
  auto none = [] {};
  compute_iter<KBITS, VBITS, D, T, FULL, MASK, DEC>(p, r, st, base, stop, gid, t4, mrow, rowok, lane_k, lane_v, none, none);
}

// The CTA's 8 query rows (zero past the last), as raw bits: element threadIdx.x + u * NT of the [8][D] block.
template <int D, int NT>
__device__ __forceinline__ void load_query_rows(const void* q, int kind, int m, int bh, int rb, uint32_t (&bits)[8 * D / NT]) {
  static_assert(8 * D % NT == 0, "query row load");
#pragma unroll
  for (int u = 0; u < 8 * D / NT; ++u) {
    const int i = threadIdx.x + u * NT, row = rb * 8 + i / D;
    bits[u] = row < m ? load_bits(q, ((long long)bh * m + row) * D + i % D, kind) : 0u;
  }
}

__device__ __forceinline__ void store_f(void* ptr, long long off, int kind, float v) {
  if (kind == 2) reinterpret_cast<float*>(ptr)[off] = v;
  else if (kind == 3) reinterpret_cast<__half*>(ptr)[off] = __float2half_rn(v);
  else reinterpret_cast<__nv_bfloat16*>(ptr)[off] = __float2bfloat16_rn(v);
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}
__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// [8][D] rows x (shared) times a [D, D] fp32 matrix, one output column j = thread % D per thread:
// o[r] = row (thread / D) * RPT + r of x @ mat. The prologue's query rotation and the finish's Pi_v.
template <int D, int NT>
__device__ __forceinline__ void rows_times_matrix(const float* x, const float* mat, float (&o)[8 / (NT / D)]) {
  constexpr int RPT = 8 / (NT / D);
  const int j = threadIdx.x % D, rg = threadIdx.x / D;
#pragma unroll
  for (int r = 0; r < RPT; ++r) o[r] = 0.f;
  // 32 matrix loads in flight per batch (4 L2 round trips at d = 128; the sums' order is the same at any unroll)
#pragma unroll 32
  for (int c = 0; c < D; ++c) {
    const float m = __ldg(mat + c * D + j);
#pragma unroll
    for (int r = 0; r < RPT; ++r) o[r] = fmaf(x[(rg * RPT + r) * D + c], m, o[r]);
  }
}

// The two-stage randomized Hadamard rotation of rows 0..rows-1 of x ([8][D], shared), one warp per row:
// rotate (INVERSE false) = fwht(fwht(x * s0) * s1), unrotate = fwht(fwht(x) * s1) * s0 (paper Algorithm 1's Pi for
// rotation="hadamard", rotation.py), fwht unnormalised (the two stages' 1/D is part of scale). Lane l holds
// coordinates [E*l, E*l + E), E = D/32: butterflies of span h < E inside a lane, larger ones with lane l ^ (h/E).
// store(row, c, value * scale) receives every output. No memory read but x and the 2 x D/32 sign words.
template <int D, int NW, bool INVERSE, class Store>
__device__ __forceinline__ void rows_hadamard(const float* x, int rows, const uint32_t (&sign)[2][4], float scale,
                                              Store&& store) {
  constexpr int E = D / 32;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  uint32_t sw[2];  // this lane's E sign bits of each stage, at bit 0
#pragma unroll
  for (int st = 0; st < 2; ++st) sw[st] = (sign[st][(E * lane) / 32] >> ((E * lane) % 32)) & ((1u << E) - 1u);
  for (int row = warp; row < rows; row += NW) {
    float v[E];
#pragma unroll
    for (int e = 0; e < E; ++e) v[e] = x[row * D + E * lane + e];
    auto flip = [&](uint32_t bits) {
#pragma unroll
      for (int e = 0; e < E; ++e) v[e] = __int_as_float(__float_as_int(v[e]) ^ int(((bits >> e) & 1u) << 31));
    };
    auto butterflies = [&] {
#pragma unroll
      for (int h = 1; h < E; h *= 2)
#pragma unroll
        for (int e = 0; e < E; ++e)
          if ((e & h) == 0) {
            const float a = v[e], b = v[e + h];
            v[e] = a + b;
            v[e + h] = a - b;
          }
#pragma unroll
      for (int m = 1; m < 32; m *= 2)
#pragma unroll
        for (int e = 0; e < E; ++e) {
          const float o = __shfl_xor_sync(0xffffffffu, v[e], m);
          v[e] = (lane & m) ? o - v[e] : v[e] + o;
        }
    };
    if (!INVERSE) flip(sw[0]);
    butterflies();
    flip(sw[1]);
    butterflies();
    if (INVERSE) flip(sw[0]);
#pragma unroll
    for (int e = 0; e < E; ++e) store(row, E * lane + e, v[e] * scale);
  }
}

// Shared-memory bytes of the merge (per-warp partials) and of the fused finish ([8][D] acc, out, max/sum).
template <int D, int NW>
__host__ __device__ constexpr int merge_bytes() {
  return NW * 8 * (D + 1) * 4 + NW * 64;
}
template <int D>
__host__ __device__ constexpr int finish_bytes() {
  return (2 * 8 * D + 16 + 4) * 4;  // acc, out, max/sum, the last-arrival flag (no static shared memory: SMEM_BASE)
}
template <int D, int NW, int DEC>
__host__ __device__ constexpr int main_bytes() {
  return (DEC >= 1 && 65536 > merge_bytes<D, NW>() + finish_bytes<D>()) ? 65536 : merge_bytes<D, NW>() + finish_bytes<D>();
}

// After the main region: [2][8][D] fp32 raw and rotated query rows.
template <int D, int NW, int DEC>
__host__ __device__ constexpr int qs_offset() {
  return main_bytes<D, NW, DEC>();
}

// Last CTA of a (batch, kv head, row block): merge the partials of all splits (read through L2)
// into fin_acc [8][D] (rotated domain, unnormalised) and fin_ml [8][2] (max base 2, sum).
template <int D, int NW>
__device__ __forceinline__ void merge_splits(const Params& p, int bh, int rb, int rows, int first, int count, float* fin_acc,
                                             float* fin_ml) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const long long rs = p.ac + 2;
  const long long ss = (long long)p.m * rs;
  const float* base = p.part + ((long long)bh * (p.splits + p.wchunks) + first) * ss + (long long)(rb * 8) * rs;
  for (int row = warp; row < rows; row += NW) {
    const float* pr = base + row * rs + p.ac;
    float mt = -INFINITY;
    for (int s = lane; s < count; s += 32) mt = fmaxf(mt, __ldcg(pr + s * ss));
    mt = warp_max(mt);
    const float ms = (mt == -INFINITY) ? 0.f : mt;
    float l = 0.f;
    for (int s = lane; s < count; s += 32) l += ex2(__ldcg(pr + s * ss) - ms) * __ldcg(pr + s * ss + 1);
    l = warp_sum(l);
    if (lane == 0) { fin_ml[2 * row] = mt; fin_ml[2 * row + 1] = l; }
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < rows * D; idx += NW * 32) {
    const int row = idx / D, col = idx % D;
    const float mt = fin_ml[2 * row];
    const float ms = (mt == -INFINITY) ? 0.f : mt;
    const float* pr = base + row * rs;
    float a = 0.f;
#pragma unroll 8
    for (int s = 0; s < count; ++s) a += ex2(__ldcg(pr + s * ss + p.ac) - ms) * __ldcg(pr + s * ss + p.ac - D + col);
    fin_acc[row * D + col] = a;
  }
}

// Window chunk ``wi`` (done by compressed split ``wi % splits`` before its own tokens): attention of the
// CTA's query rows over WINDOW_TOKENS full-precision tokens, written as one more partial after the splits'
// (unrotated domain: merged after the finish rotates the compressed mass back).
template <int D, int NW, bool MASK>
__device__ __noinline__ void window_chunk(const Params& p, int b, int h, int bh, int rb, int rows, int wi, float* smem) {
  constexpr int NT = NW * 32, WT = WINDOW_TOKENS, DL = D / 32, TPW = WT / NW, TG = NT / D, TPT = WT / TG;
  static_assert(WT == 32 && NT % D == 0 && WT % TG == 0 && NW <= WT, "window chunk mapping");
  static_assert((8 * D + 8 * WT + 16 + TG * 8 * D) * 4 <= merge_bytes<D, NW>(), "below the finish's buffers");
  float* qraw = smem;                // [8][D]
  float* wsc = qraw + 8 * D;         // [8][WT] mask, then scores, then probabilities
  float* wml = wsc + 8 * WT;         // [8][2] max (base 2), sum
  float* wpart = wml + 16;           // [TG][8][D] value partials of the token groups
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  // every Params field once, up front: p is reached through a generic pointer here, and a field read inside
  // a conditional load would be one more dependent round trip per element
  const void *const fk = p.fk, *const fv = p.fv, *const mask = p.mask;
  const int q_kind = p.q_kind, fk_kind = p.fk_kind, fv_kind = p.fv_kind, mask_kind = p.mask_kind;
  const long long fk_sw = p.fk_sw, fv_sw = p.fv_sw, sm_t = p.sm_t;
  const int w0 = wi * WT, cnt = min(WT, p.w - w0);
  const bool wm = MASK || p.wmask;  // wmask: the mask covers the window tokens only
  const long long fkb = b * p.fk_sb + h * p.fk_sh + (long long)w0 * fk_sw;
  const long long fvb = b * p.fv_sb + h * p.fv_sh + (long long)w0 * fv_sw;
  const int qg = p.g, ql = p.l;
  const long long sm_h = p.sm_h, sm_l = p.sm_l;
  const long long mbase = b * p.sm_b + (long long)h * qg * sm_h + (long long)((MASK ? p.n : 0) + w0) * sm_t;
  const float scale2 = p.scale2;
  // every global load into registers first (raw bits), the conversions and shared stores after: the whole
  // chunk costs one memory round trip
  constexpr int QPT = 8 * D / NT, MPT = 8 * WT / NT;
  static_assert(8 * WT % NT == 0, "window chunk loads");
  uint32_t qv[QPT];
  load_query_rows<D, NT>(p.q, q_kind, p.m, bh, rb, qv);
  uint32_t kv[TPW][DL];
#pragma unroll
  for (int u = 0; u < TPW; ++u)
#pragma unroll
    for (int k = 0; k < DL; ++k) {
      const int t = warp + u * NW;
      kv[u][k] = t < cnt ? load_bits(fk, fkb + (long long)t * fk_sw + lane + 32 * k, fk_kind) : 0u;
    }
  const int j = threadIdx.x % D, tg = threadIdx.x / D;  // the value pass: one column, every TG-th token
  uint32_t v[TPT];
  auto load_values = [&] {
#pragma unroll
    for (int u = 0; u < TPT; ++u) {
      const int t = tg + u * TG;
      v[u] = t < cnt ? load_bits(fv, fvb + (long long)t * fv_sw + j, fv_kind) : 0u;
    }
  };
  // with 4 warps a thread would hold 8 query, 32 key and 32 value elements at once: the values wait for the scores
  constexpr bool EARLY_V = NW >= 8;
  if (EARLY_V) load_values();
  uint32_t mb[MPT];  // the mask's bits (in the window and the CTA's rows)
#pragma unroll
  for (int u = 0; u < MPT; ++u) {
    const int i = threadIdx.x + u * NT, r = i / WT, t = i % WT, qrow = rb * 8 + r;
    mb[u] = 0u;
    if (wm && t < cnt && r < rows)
      mb[u] = load_bits(mask, mbase + (long long)(qrow / ql) * sm_h + (long long)(qrow % ql) * sm_l + t * sm_t, mask_kind);
  }
#pragma unroll
  for (int u = 0; u < QPT; ++u) qraw[threadIdx.x + u * NT] = bits_to_f(qv[u], q_kind);
#pragma unroll
  for (int u = 0; u < MPT; ++u) {  // 0 without a mask, -inf past the window or the CTA's rows
    const int i = threadIdx.x + u * NT, r = i / WT, t = i % WT;
    const bool in = t < cnt && r < rows;
    wsc[i] = !in ? -INFINITY : wm ? mask_from_bits(mb[u], mask_kind) : 0.f;
  }
  __syncthreads();
#pragma unroll
  for (int u = 0; u < TPW; ++u) {
    const int t = warp + u * NW;
#pragma unroll
    for (int r = 0; r < 8; ++r) {
      if (r >= rows) break;
      float d = 0.f;
#pragma unroll
      for (int k = 0; k < DL; ++k) d = fmaf(qraw[r * D + lane + 32 * k], bits_to_f(kv[u][k], fk_kind), d);
      d = warp_sum(d);
      if (lane == 0 && t < cnt) wsc[r * WT + t] += d * scale2;
    }
  }
  if (!EARLY_V) load_values();
  __syncthreads();
  for (int r = warp; r < 8; r += NW) {  // WT == 32: one token per lane
    const float x = wsc[r * WT + lane];
    const float mx = warp_max(x), ms = (mx == -INFINITY) ? 0.f : mx;
    const float e = ex2(x - ms);
    wsc[r * WT + lane] = e;
    const float l = warp_sum(e);
    if (lane == 0) {
      wml[2 * r] = mx;
      wml[2 * r + 1] = l;
    }
  }
  __syncthreads();
  {
    float a[8];
#pragma unroll
    for (int r = 0; r < 8; ++r) a[r] = 0.f;
#pragma unroll
    for (int u = 0; u < TPT; ++u) {
      const float vu = bits_to_f(v[u], fv_kind);
#pragma unroll
      for (int r = 0; r < 8; ++r) a[r] = fmaf(wsc[r * WT + tg + u * TG], vu, a[r]);
    }
#pragma unroll
    for (int r = 0; r < 8; ++r) wpart[(tg * 8 + r) * D + j] = a[r];
  }
  __syncthreads();
  const int ac = p.ac;
  float* out = p.part + ((long long)bh * (p.splits + p.wchunks) + p.splits + wi) * p.m * (ac + 2);
  for (int idx = threadIdx.x; idx < rows * (D + 2); idx += NT) {
    const int r = idx / (D + 2), col = idx % (D + 2);
    float* o = out + (long long)(rb * 8 + r) * (ac + 2);
    if (col < D) {
      float a = 0.f;
#pragma unroll
      for (int g = 0; g < TG; ++g) a += wpart[(g * 8 + r) * D + col];
      o[ac - D + col] = a;
    } else {
      o[ac + col - D] = wml[2 * r + col - D];
    }
  }
}

// Fused finish of one (batch, kv head, row block) from fin_acc / fin_ml: out = (acc @ Pi_v + l * voff,
// merged with the window partials) / l, written in the query dtype. Rows with no mass (fully masked) give 0.
template <int D, int NW>
__device__ __forceinline__ void finish(const Params& p, int bh, int rb, int rows, float* fin_acc, float* fin_ml,
                                       float* fin_out, float* scratch) {
  constexpr int NT = NW * 32;
  constexpr int RG = NT / D, RPT = 8 / RG;  // row groups of D threads (one output column each), rows per thread
  static_assert(NT % D == 0 && RG >= 1 && RG <= 8, "finish mapping");
  static_assert((8 * D + 16) * 4 <= merge_bytes<D, NW>(), "window merge fits the merge area");
  if (p.wchunks > 0) merge_splits<D, NW>(p, bh, rb, rows, p.splits, p.wchunks, scratch, scratch + 8 * D);
  if (p.fwht) {  // acc @ Pi_v as butterflies
    const float* voff = p.voff != nullptr ? p.voff + (long long)bh * D : nullptr;
    rows_hadamard<D, NW, true>(fin_acc, rows, p.vsign, 1.f / D, [&](int row, int c, float v) {
      fin_out[row * D + c] = fmaf(fin_ml[2 * row + 1], voff != nullptr ? __ldg(voff + c) : 0.f, v);
    });
  } else {
    const int j = threadIdx.x % D, rg = threadIdx.x / D;
    float o[RPT];
    rows_times_matrix<D, NT>(fin_acc, p.pv, o);
    const float vo = p.voff != nullptr ? __ldg(p.voff + (long long)bh * D + j) : 0.f;
#pragma unroll
    for (int r = 0; r < RPT; ++r) {
      const int row = rg * RPT + r;
      if (row < rows) fin_out[row * D + j] = fmaf(fin_ml[2 * row + 1], vo, o[r]);
    }
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < rows * D; idx += NT) {
    const int row = idx / D;
    float a = fin_out[idx], l = fin_ml[2 * row + 1];
    if (p.wchunks > 0) {  // two partials (compressed, window), each with its own maximum
      const float* wml = scratch + 8 * D;
      const float mc = fin_ml[2 * row], mw = wml[2 * row], mt = fmaxf(mc, mw), ms = (mt == -INFINITY) ? 0.f : mt;
      const float fc = ex2(mc - ms), fw = ex2(mw - ms);
      a = a * fc + scratch[idx] * fw;
      l = l * fc + wml[2 * row + 1] * fw;
    }
    store_f(p.out, ((long long)bh * p.m + rb * 8) * D + idx, p.out_kind, a / (l > 0.f ? l : 1.f));
  }
}

// After a CTA wrote its partial: the last CTA of its (batch, kv head, row block) merges and finishes.
template <int D, int NW>
__device__ __forceinline__ void arrive_and_finish(const Params& p, int bh, int rb, int rows, bool direct) {
  float* fin_acc = reinterpret_cast<float*>(reinterpret_cast<char*>(tq_smem) + merge_bytes<D, NW>());  // [8][D]
  float* fin_out = fin_acc + 8 * D;                                                                     // [8][D]
  float* fin_ml = fin_out + 8 * D;                                                                      // [8][2]
  if (!direct) {
    // threadfence reduction: the last CTA to arrive reads every partial (through L2)
    int* is_last = reinterpret_cast<int*>(fin_ml + 16);
    __threadfence();
    __syncthreads();
    int* cnt = p.counter + (long long)bh * gridDim.z + rb;
    if (threadIdx.x == 0) *is_last = atomicAdd(cnt, 1) == p.splits - 1;
    __syncthreads();
    if (!*is_last) return;
    __threadfence();
    merge_splits<D, NW>(p, bh, rb, rows, 0, p.splits, fin_acc, fin_ml);
    if (threadIdx.x == 0) *cnt = 0;  // ready for the next launch (and the next graph replay)
  }
  __syncthreads();
  finish<D, NW>(p, bh, rb, rows, fin_acc, fin_ml, fin_out, reinterpret_cast<float*>(tq_smem));
}

// PF: 0 loads at the top of each iteration, 3 the next iteration's keys / values loaded into the one register set
// once this iteration's are decoded (a second register set and cp.async staging measured slower: kernel_notes).
// MINB: CTAs per SM the registers are capped for (0: the compiler's own choice).
template <int KBITS, int VBITS, int D, int NW, int T, bool MASK, int PF, int DEC, int MINB>
__global__ void __launch_bounds__(NW * 32, MINB) decode_kernel(const __grid_constant__ Params p) {
  static_assert(PF == 0 || PF == 3, "prefetch modes: 0 or 3");
  constexpr int KS = Geo<KBITS, D>::KS;
  constexpr int VT = D / 16;
  constexpr int TOK = 16 * T;
  constexpr int NT = NW * 32;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int gid = lane >> 2, t4 = lane & 3;
  const int split = blockIdx.x, bh = blockIdx.y, rb = blockIdx.z;
  const int b = bh / p.hkv, h = bh % p.hkv;
  // this split's share of the window partials, first: the decode table then takes the shared memory
  for (int wi = split; wi < p.wchunks; wi += p.splits) {
    window_chunk<D, NW, MASK>(p, b, h, bh, rb, min(8, p.m - rb * 8), wi, reinterpret_cast<float*>(tq_smem));
    __syncthreads();
  }
  // the query rows' loads first, their latency hidden by the decode table
  constexpr int QPT = 8 * D / NT;
  constexpr bool EARLY_Q = QPT == 4;  // (at 2 per thread, d = 64, the early loads cost 33 registers)
  uint32_t qb[EARLY_Q ? QPT : 1];
  if constexpr (EARLY_Q) load_query_rows<D, NT>(p.q, p.q_kind, p.m, bh, rb, qb);
  const int start = split * p.tps;
  const int nval = p.n_dev != nullptr ? max(0, min(*p.n_dev, p.n)) : p.n;  // a CUDA graph replays with the current count
  const int stop = min(start + p.tps, nval);
  const int per = ((p.tps + NW - 1) / NW + TOK - 1) / TOK * TOK;
  const int wstart = start + warp * per;
  const int wstop = min(wstart + per, stop);

  constexpr int KROW = Geo<KBITS, D>::ROW, VROW = Geo<VBITS, D>::ROW;
  auto first_ptrs = [&] {
    const uint8_t* krows = p.kc + b * p.kc_sb + h * p.kc_sh;  // this (batch, kv head)'s code rows
    const uint8_t* vrows = p.vc + b * p.vc_sb + h * p.vc_sh;
    const int k0 = wstart + row_token(gid), v0 = wstart + t4;  // key_token / value_token offsets from here
    Ptrs q;
    q.k = krows + (long long)k0 * KROW + key_byte_offset<KBITS, D>(t4);
    q.v = vrows + (long long)v0 * VROW + value_byte_offset<VBITS, D>(gid);
    q.kn = p.kn + b * p.kn_sb + h * p.kn_sh + k0;
    q.vn = p.vn + b * p.vn_sb + h * p.vn_sh + k0;
    return q;
  };
  Ptrs ptr = first_ptrs();
  auto advance = [&]() {
    ptr.k += TOK * KROW;
    ptr.v += TOK * VROW;
    ptr.kn += TOK;
    ptr.vn += TOK;
  };
  using R = Raw<KBITS, VBITS, D, T>;
  // left = tokens of the warp's range from this iteration's base; full iterations need no predicates
  auto load_any = [&](R& r, int left) {
    if (left >= TOK) load_iter<KBITS, VBITS, D, T, true>(r, ptr, TOK, gid, t4);
    else load_iter<KBITS, VBITS, D, T, false>(r, ptr, left, gid, t4);
  };
  // the first iteration's keys are requested before the prologue (decode table, query rotation), which then
  // runs while they are in flight (its values too, or the masked kernel's, would take the registers over 128)
  constexpr bool EARLY_K = PF == 0 && !MASK;
  R r;
  if (EARLY_K && wstart + TOK <= wstop) load_keys<KBITS, VBITS, D, T, true>(r, ptr, TOK, gid);

  const uint32_t lane_k = table_lane_offset<KBITS>(lane, false), lane_v = table_lane_offset<VBITS>(lane, true);
  if (DEC >= 1) {
    // decode table: row = code byte (256 B), keys then values, each entry once per lane (bank = lane)
    for (int i = threadIdx.x; i < 256 * 16; i += NT) {
      const int byte = i >> 4;
      reinterpret_cast<uint4*>(tq_smem)[i] =
          (i >> 3) & 1 ? table_entry<VBITS>(p.vcent, byte, true) : table_entry<KBITS>(p.kcent, byte, false);
    }
  }
  // query rotation in the prologue (no separate launch): the CTA's 8 rows, q @ Pi_k^T * scale2
  float* qs = reinterpret_cast<float*>(reinterpret_cast<char*>(tq_smem) + qs_offset<D, NW, DEC>());
  if constexpr (EARLY_Q) {
#pragma unroll
    for (int u = 0; u < QPT; ++u) qs[threadIdx.x + u * NT] = bits_to_f(qb[u], p.q_kind);
  } else {
    for (int i = threadIdx.x; i < 8 * D; i += NT) {
      const int row = rb * 8 + i / D;
      qs[i] = row < p.m ? bits_to_f(load_bits(p.q, ((long long)bh * p.m + row) * D + i % D, p.q_kind), p.q_kind) : 0.f;
    }
  }
  __syncthreads();
  if (p.fwht) {  // q @ Pi_k^T as butterflies
    float* qr = qs + 8 * D;
    rows_hadamard<D, NW, false>(qs, 8, p.ksign, p.scale2 / D, [&](int row, int c, float v) { qr[row * D + c] = v; });
  } else {
    constexpr int RG = NT / D, RPT = 8 / RG;
    const int j = threadIdx.x % D, rg = threadIdx.x / D;
    float o[RPT];
    rows_times_matrix<D, NT>(qs, p.rt, o);
#pragma unroll
    for (int r = 0; r < RPT; ++r) qs[8 * D + (rg * RPT + r) * D + j] = o[r] * p.scale2;
  }
  __syncthreads();
  if constexpr (!EARLY_K) ptr = first_ptrs();  // (computed here, the pointers take no registers in the prologue)
  State<KBITS, D> st;
  {
    const float* qrow = qs + 8 * D + gid * D;
#pragma unroll
    for (int s = 0; s < KS; ++s)
#pragma unroll
      for (int hh = 0; hh < 2; ++hh)
        st.qf[s][hh] = pack_half2(qrow[key_coord<KBITS, D, DEC>(t4, s, hh, 0)], qrow[key_coord<KBITS, D, DEC>(t4, s, hh, 1)]);
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

  if constexpr (PF == 3) {
    // one register set: the keys of iteration i+1 are loaded once the keys of i are decoded (their time in
    // flight is the value part of i), the values of i+1 once the values of i are (the score part of i+1)
    int base = wstart;
    if (base < wstop) load_any(r, wstop - base);
    for (; base + TOK <= wstop; base += TOK) {
      const int nleft = wstop - base - TOK;  // tokens left after this iteration
      Ptrs nxt = ptr;
      nxt.k += TOK * KROW; nxt.v += TOK * VROW; nxt.kn += TOK; nxt.vn += TOK;
      auto next_keys = [&] {
        if (nleft >= TOK) load_keys<KBITS, VBITS, D, T, true>(r, nxt, TOK, gid);
        else if (nleft > 0) load_keys<KBITS, VBITS, D, T, false>(r, nxt, nleft, gid);
      };
      auto next_values = [&] {
        if (nleft >= TOK) load_values<KBITS, VBITS, D, T, true>(r, nxt, TOK, gid, t4);
        else if (nleft > 0) load_values<KBITS, VBITS, D, T, false>(r, nxt, nleft, gid, t4);
      };
      compute_iter<KBITS, VBITS, D, T, true, MASK, DEC>(p, r, st, base, wstop, gid, t4, mrow, rowok, lane_k, lane_v,
                                                        next_keys, next_values);
      advance();
    }
    if (base < wstop)
      compute_iter<KBITS, VBITS, D, T, false, MASK, DEC>(p, r, st, base, wstop, gid, t4, mrow, rowok, lane_k, lane_v);
  } else {
    int base = wstart;
    for (; base + TOK <= wstop; base += TOK) {
      if (!EARLY_K || base != wstart) load_keys<KBITS, VBITS, D, T, true>(r, ptr, TOK, gid);  // the first: above
      load_values<KBITS, VBITS, D, T, true>(r, ptr, TOK, gid, t4);
      compute_iter<KBITS, VBITS, D, T, true, MASK, DEC>(p, r, st, base, wstop, gid, t4, mrow, rowok, lane_k, lane_v);
      advance();
    }
    if (base < wstop) {
      load_any(r, wstop - base);
      compute_iter<KBITS, VBITS, D, T, false, MASK, DEC>(p, r, st, base, wstop, gid, t4, mrow, rowok, lane_k, lane_v);
    }
  }

  // ---- merge the warps of this CTA (the only barrier after the loop), then one partial per CTA
  if (DEC >= 1) __syncthreads();  // the table is reused for the merge
  float(*sm_acc)[8][D + 1] = reinterpret_cast<float(*)[8][D + 1]>(tq_smem);
  float(*sm_ml)[8][2] = reinterpret_cast<float(*)[8][2]>(reinterpret_cast<float*>(tq_smem) + NW * 8 * (D + 1));
  float* fin_acc = reinterpret_cast<float*>(reinterpret_cast<char*>(tq_smem) + merge_bytes<D, NW>());  // [8][D]
  float* fin_out = fin_acc + 8 * D;                                                                     // [8][D]
  float* fin_ml = fin_out + 8 * D;                                                                      // [8][2]
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
  const bool direct = p.fused && p.splits == 1;  // one split: finish straight from shared memory
  float* out = p.part + ((long long)bh * (p.splits + p.wchunks) + split) * p.m * (p.ac + 2);
  for (int idx = threadIdx.x; idx < rows * (D + 2); idx += NT) {
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
      if (direct) fin_acc[row * D + col] = a;
      else o[p.ac - D + col] = a;
    } else if (col == D) {
      if (direct) fin_ml[2 * row] = mt;
      else o[p.ac] = mt;
    } else {
      float l = 0.f;
#pragma unroll
      for (int w = 0; w < NW; ++w) l += ex2(sm_ml[w][row][0] - ms) * sm_ml[w][row][1];
      if (direct) fin_ml[2 * row + 1] = l;
      else o[p.ac + 1] = l;
    }
  }
  if (!p.fused) return;
  arrive_and_finish<D, NW>(p, bh, rb, rows, direct);
}

}  // namespace tq

// ------------------------------------------------------------------------------ host side
namespace tq {
template <int D, int NW, int DEC>
constexpr int smem_bytes() {
  return qs_offset<D, NW, DEC>() + 2 * 8 * D * 4;
}
}  // namespace tq

template <int KB, int VB, int D, int NW, int T, bool MASK, int PF, int DEC, int MINB>
static cudaError_t tq_run(const tq::Params& p, int bh, int rblocks, cudaStream_t stream, int* info) {
  auto fn = tq::decode_kernel<KB, VB, D, NW, T, MASK, PF, DEC, MINB>;
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

// Variant = (warps per CTA, 16-token tiles per iteration, prefetch 0 none / 3 next
// iteration in the one register set, decoder 0 = prmt registers / 1 = shared table / 2..6 mixes (key_table),
// CTAs per SM the registers are capped for). The library build holds the defaults of each width; -DTQ_TUNE
// adds the variants the benchmark sweeps (d = 128, no mask).
template <int KB, int VB, int D, bool MASK>
static cudaError_t tq_variant(const tq::Params& p, int bh, int rb, int nw, int tiles, int pf, int dec, int ctas,
                              cudaStream_t s, int* info) {
  constexpr bool TWO = (KB == 2 || VB == 2);
#define TQ_V(NW, T, PF, DEC, MB)                                          \
  if (nw == NW && tiles == T && pf == PF && dec == DEC && ctas == MB) \
    return tq_run<KB, VB, D, NW, T, MASK, PF, DEC, MB>(p, bh, rb, s, info);
  TQ_V(8, 2, 0, 1, 0)  // the default of every width: measured best on an H200 (docs/kernel_notes.md)
#ifdef TQ_TUNE
  if constexpr (!MASK && D == 128) {
    if constexpr (TWO) {
      TQ_V(8, 2, 0, 0, 0) TQ_V(4, 4, 0, 0, 0) TQ_V(8, 2, 0, 2, 0) TQ_V(8, 2, 0, 3, 0) TQ_V(8, 2, 0, 4, 0)
      TQ_V(4, 4, 0, 1, 0)
    } else {
      TQ_V(8, 2, 3, 1, 2) TQ_V(8, 1, 3, 1, 2) TQ_V(8, 1, 0, 1, 2) TQ_V(8, 4, 0, 1, 0) TQ_V(8, 2, 0, 3, 0)
      TQ_V(8, 2, 0, 5, 0)
    }
  }
#endif
#undef TQ_V
  return cudaErrorInvalidValue;
}

template <int KB, int VB, int D>
static cudaError_t tq_mask(const tq::Params& p, int bh, int rb, int nw, int tiles, bool mask, int pf, int dec,
                           int ctas, cudaStream_t s, int* info) {
  return mask ? tq_variant<KB, VB, D, true>(p, bh, rb, nw, tiles, pf, dec, ctas, s, info)
              : tq_variant<KB, VB, D, false>(p, bh, rb, nw, tiles, pf, dec, ctas, s, info);
}

// Offset of dynamic shared memory in the window of a kernel without static shared memory (host: SMEM_BASE check).
cudaError_t tq_smem_base(unsigned* out_dev, cudaStream_t s) {
  tq::smem_base_probe<<<1, 1, 16, s>>>(out_dev);
  return cudaGetLastError();
}

// Launch one decode variant (info == nullptr), or fill info = {registers, spill bytes, CTAs per SM, smem bytes}.
cudaError_t tq_decode_dispatch(const tq::Params& p, int kbits, int vbits, int d, int bh, int rblocks, int nw,
                               int tiles, bool mask, int prefetch, int dec, int ctas, cudaStream_t s, int* info) {
#define TQ_CASE(KB, VB, D)                    \
  if (kbits == KB && vbits == VB && d == D) \
    return tq_mask<KB, VB, D>(p, bh, rblocks, nw, tiles, mask, prefetch, dec, ctas, s, info);
  TQ_CASE(4, 4, 128) TQ_CASE(3, 3, 128) TQ_CASE(2, 2, 128)
  TQ_CASE(4, 4, 64) TQ_CASE(3, 3, 64) TQ_CASE(2, 2, 64)
#undef TQ_CASE
  return cudaErrorInvalidValue;
}
