// TurboQuant MSE encode straight into a preallocated code buffer (issue 9: "encode at bandwidth").
//
// Layout written (docs/DESIGN.md): one LSB-first bit stream of W-bit Lloyd-Max codes per vector,
// codes [R, S, code_bytes] uint8 with contiguous rows, norms [R, S] fp16 or fp32. One integer
// width 2, 3 or 4; head_dim 64 or 128 (every other config goes to the Triton encode).
//
// Structure (one warp = 8*NTILE consecutive tokens of one row at a time, persistent grid):
//  * rotation y = Pi x as mma.m16n8k16 (bf16 operands, fp32 accumulation) with the output
//    coordinates as M (Pi from shared memory, one 16-byte load per fragment), the input
//    coordinates as K and 8 tokens as N. Both coordinate orders are free: lane (g, t) loads the
//    8-coordinate chunks x[32c + 8t, 32c + 8t + 8) of token g (16-byte loads straight into its B
//    registers; one load instruction of the warp reads 64 contiguous bytes of each of its 8 tokens)
//    and receives outputs COG*g + [0, COG) of tokens 2t, 2t + 1, so its codes are one contiguous
//    slice of each code row (8 bytes at 4 bits, d = 128). The host permutes Pi into fragment order
//    once (cuda_encode.py, rotation_fragments); each CTA copies it to shared memory.
//  * exactness: for the Hadamard rotation at power-of-two d, Pi = H D2 H D1 / d has entries k/(d/2)
//    with |k| < 64, exact in bf16, so a bf16 input needs ONE product (XP = 1, PP = 1) and gives
//    the fp32 rotation of the exact input. Other inputs are split x = hi + lo in bf16 (XP = 2,
//    16 significant bits), other rotations Pi = hi + lo (PP = 2); lo * lo is dropped.
//    A bf16 input with an offset mu (the cache's centred keys, XP = 3) stays one product: y = Pi x - Pi mu,
//    the accumulator starting at -Pi mu (roff, from the host), the norm ||x - mu|| from x and mu.
//  * the norm is ||x|| in fp32 (quad reduction); y is scaled by 1/||x|| after the product.
//  * bucketize by table (METHOD 1, the default; METHOD 2 the same with one 4-byte word per cell, code_word): the exponent and top two mantissa bits of |y| index
//    a cell (clamped below); the Lloyd-Max boundaries grow by >= 1.27x from one to the next, so a cell
//    (width ratio <= 1.25) holds at most one (checked on the host): one 8-byte shared load gives the
//    cell's boundary and the code below it, one compare adds 1, the sign bit mirrors the code
//    (odd-symmetric codebook). METHOD 0: branchless binary search of |y| over the positive
//    boundaries (W-1 compares, 2^(W-1)-1 selects), kept for comparison.
//  * optional norm correction (CORR: norm / ||y_hat||, y_hat the reconstruction, paper Thm. 1's
//    E||y_hat||^2 = 1 - D): the squared centroid of each code from a shared table, summed per token.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "cuda_encode.cuh"

namespace tqe {

constexpr int kMaxCells = 576;  // cells of the table bucketize (cuda_encode.py checks ncells <= this)

__device__ __forceinline__ void mma_bf16(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
                                         uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t pack_bf16(float a, float b) {
  __nv_bfloat162 v = __floats2bfloat162_rn(a, b);
  return *reinterpret_cast<uint32_t*>(&v);
}

__device__ __forceinline__ float bf16_lo(uint32_t w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float bf16_hi(uint32_t w) { return __uint_as_float(w & 0xffff0000u); }

// code of y (ALU way): count of boundaries below y; m = count of positive boundaries below |y|
template <int W>
__device__ __forceinline__ uint32_t code_alu(float y, const Params& p, int& m) {
  constexpr int H = 1 << (W - 1);
  const float a = fabsf(y);
  if constexpr (W == 2) {
    m = a > p.pb[0];
  } else if constexpr (W == 3) {
    const bool t0 = a > p.pb[1];
    const bool t1 = a > (t0 ? p.pb[2] : p.pb[0]);
    m = (t0 ? 2 : 0) + (t1 ? 1 : 0);
  } else {
    const bool t0 = a > p.pb[3];
    const bool t1 = a > (t0 ? p.pb[5] : p.pb[1]);
    const bool t2 = a > (t0 ? (t1 ? p.pb[6] : p.pb[4]) : (t1 ? p.pb[2] : p.pb[0]));
    m = (t0 ? 4 : 0) + (t1 ? 2 : 0) + (t2 ? 1 : 0);
  }
  return uint32_t(H + m) ^ (y > p.pb[7] ? 0u : uint32_t(2 * H - 1));
}

// code of y by table (METHOD 1): cells = {float boundary or +inf, uint32 code below it} in shared memory
template <int W>
__device__ __forceinline__ uint32_t code_table(float y, const uint2* cells, int base8) {
  constexpr uint32_t FLIP = (1u << W) - 1u;
  const uint32_t u = __float_as_uint(y);
  const int key = max(int((u >> 18) & 0x1FF8u) - base8, 0);  // (exponent * 4 + 2 mantissa bits) * 8 bytes
  const uint2 e = *reinterpret_cast<const uint2*>(reinterpret_cast<const char*>(cells) + key);
  // + 1 above the cell's boundary: the sign bit of (boundary - |y|)
  const uint32_t code = e.y + (__float_as_uint(__uint_as_float(e.x) - fabsf(y)) >> 31);
  return code ^ (uint32_t(int(u) >> 31) & FLIP);
}

// code of y by word table (METHOD 2): one 4-byte word per cell key (all 1024 of them, no clamp), holding the
// code of the cell's lowest value (bits 24-27) and the low 21 bits of the boundary inside the cell (0x1FFFFF:
// none). |y| and the boundary share the key's bits, so comparing the low 21 bits is comparing the floats. A
// warp's loads of different cells share a bank only 32 keys (8 octaves) apart (8-byte cells: 16 keys).
template <int W>
__device__ __forceinline__ uint32_t code_word(float y, const uint32_t* words) {
  constexpr uint32_t FLIP = (1u << W) - 1u;
  const uint32_t u = __float_as_uint(y);
  const uint32_t e = words[(u >> 21) & 0x3FFu];
  const uint32_t above = ((e & 0x1FFFFFu) - (u & 0x1FFFFFu)) >> 31;
  return ((e >> 24) + above) ^ (uint32_t(int(u) >> 31) & FLIP);
}

// add code c of coordinate i (W bits at bit W*i) to the thread's words (i compile-time after unrolling)
template <int W>
__device__ __forceinline__ void put_code(uint32_t* w, int i, uint32_t c) {
  const int bit = W * i, k = bit >> 5, s = bit & 31;
  w[k] += c * (1u << s);
  if (s + W > 32) w[k + 1] += __umulhi(c, 1u << s);
}

// Element offset of coordinate i of lane t's part of a token: chunk i / 8 of 8 coordinates at 32 * chunk + 8 * t
// (cuda_encode.py's input_order)
__device__ __forceinline__ int lane_coord(int t, int i) { return 32 * (i / 8) + 8 * t + i % 8; }

template <int D>
__device__ __forceinline__ void load_row(const Params& p, int row, int tok, int t, bool ok, float (&v)[D / 4]) {
  constexpr int CPT = D / 4;
  if (!ok) {
#pragma unroll
    for (int i = 0; i < CPT; ++i) v[i] = 0.0f;
    return;
  }
  const int64_t e0 = row * p.x_sr + tok * p.x_st;
  if (p.x_kind == 2) {
    const float* s = static_cast<const float*>(p.x) + e0;
#pragma unroll
    for (int j = 0; j < CPT / 4; ++j) {
      const float4 q = __ldg(reinterpret_cast<const float4*>(s + lane_coord(t, 4 * j)));
      v[4 * j] = q.x, v[4 * j + 1] = q.y, v[4 * j + 2] = q.z, v[4 * j + 3] = q.w;
    }
  } else {
    const uint16_t* s = static_cast<const uint16_t*>(p.x) + e0;
#pragma unroll
    for (int j = 0; j < CPT / 8; ++j) {
      const uint4 q = __ldg(reinterpret_cast<const uint4*>(s + lane_coord(t, 8 * j)));
      const uint32_t u[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
      for (int h = 0; h < 4; ++h) {
        if (p.x_kind == 4) {
          v[8 * j + 2 * h] = bf16_lo(u[h]), v[8 * j + 2 * h + 1] = bf16_hi(u[h]);
        } else {
          const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&u[h]));
          v[8 * j + 2 * h] = f.x, v[8 * j + 2 * h + 1] = f.y;
        }
      }
    }
  }
  if (p.off != nullptr || p.inv_scale != nullptr) {
#pragma unroll
    for (int j = 0; j < CPT / 4; ++j) {
      if (p.off != nullptr) {
        const float4 o = __ldg(reinterpret_cast<const float4*>(p.off + row * p.off_sr + lane_coord(t, 4 * j)));
        v[4 * j] -= o.x, v[4 * j + 1] -= o.y, v[4 * j + 2] -= o.z, v[4 * j + 3] -= o.w;
      }
      if (p.inv_scale != nullptr) {
        const float4 s = __ldg(reinterpret_cast<const float4*>(p.inv_scale + row * p.sc_sr + lane_coord(t, 4 * j)));
        v[4 * j] *= s.x, v[4 * j + 1] *= s.y, v[4 * j + 2] *= s.z, v[4 * j + 3] *= s.w;
      }
    }
  }
}

// raw bf16 words of the thread's slice (XP = 1 or 3: bf16 input, no scale); zeros past the end
template <int D>
__device__ __forceinline__ void load_bf16(const Params& p, int row, int tok, int t, bool ok, uint32_t (&a)[D / 8]) {
  constexpr int CPT = D / 4;
  if (!ok) {
#pragma unroll
    for (int i = 0; i < CPT / 2; ++i) a[i] = 0u;
    return;
  }
  const uint16_t* s = static_cast<const uint16_t*>(p.x) + row * p.x_sr + tok * p.x_st;
#pragma unroll
  for (int j = 0; j < CPT / 8; ++j) {
    const uint4 q = __ldg(reinterpret_cast<const uint4*>(s + lane_coord(t, 8 * j)));
    a[4 * j] = q.x, a[4 * j + 1] = q.y, a[4 * j + 2] = q.z, a[4 * j + 3] = q.w;
  }
}

template <int D>
__device__ __forceinline__ float sum_squares_bf16(const uint32_t (&a)[D / 8]) {
  float ss = 0.0f;
#pragma unroll
  for (int i = 0; i < D / 8; ++i) {
    const float lo = bf16_lo(a[i]), hi = bf16_hi(a[i]);
    ss = fmaf(lo, lo, fmaf(hi, hi, ss));
  }
  return ss;
}

// sum of (x - mu)^2 over the thread's part of a token: raw bf16 words of x, fp32 offset row mu (XP = 3)
template <int D>
__device__ __forceinline__ float sum_squares_centered(const uint32_t (&a)[D / 8], const float* mu, int t) {
  float ss = 0.0f;
#pragma unroll
  for (int j = 0; j < D / 16; ++j) {  // coordinates 4j .. 4j + 3 of the part: words 2j, 2j + 1
    const float4 m = __ldg(reinterpret_cast<const float4*>(mu + lane_coord(t, 4 * j)));
    const float d0 = bf16_lo(a[2 * j]) - m.x, d1 = bf16_hi(a[2 * j]) - m.y;
    const float d2 = bf16_lo(a[2 * j + 1]) - m.z, d3 = bf16_hi(a[2 * j + 1]) - m.w;
    ss = fmaf(d0, d0, fmaf(d1, d1, fmaf(d2, d2, fmaf(d3, d3, ss))));
  }
  return ss;
}

template <int BYTES>
__device__ __forceinline__ void store_codes(uint8_t* dst, const uint32_t* w) {
  if constexpr (BYTES == 8) {
    *reinterpret_cast<uint2*>(dst) = make_uint2(w[0], w[1]);
  } else if constexpr (BYTES == 4) {
    *reinterpret_cast<uint32_t*>(dst) = w[0];
  } else if constexpr (BYTES == 6) {  // 3 bits, d = 128: 2-byte aligned
    uint16_t* d = reinterpret_cast<uint16_t*>(dst);
    d[0] = uint16_t(w[0]), d[1] = uint16_t(w[0] >> 16), d[2] = uint16_t(w[1]);
  } else if constexpr (BYTES == 3) {  // 3 bits, d = 64
    dst[0] = uint8_t(w[0]), dst[1] = uint8_t(w[0] >> 8), dst[2] = uint8_t(w[0] >> 16);
  } else {
    static_assert(BYTES == 2, "code slice size");
    *reinterpret_cast<uint16_t*>(dst) = uint16_t(w[0]);
  }
}

__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  v += __shfl_xor_sync(0xffffffffu, v, 2);
  return v;
}

// One warp: NTILE groups of 8 tokens (the N dimension) of one row at a time. Lane (g, t) loads slice t
// of token g of each group (B operand: its two registers of a k-chunk are one token's pair of words)
// and receives, per 16-coordinate m-tile mt, outputs COG*g + 2*mt + {0, 1} of tokens 2t and 2t + 1.
template <int D, int W, int XP, int PP, int NTILE, int METHOD, bool CORR, int NW, int MINB>
__global__ void __launch_bounds__(NW * 32, MINB) encode_kernel(const __grid_constant__ Params p) {
  constexpr int CPT = D / 4;   // input coordinates per lane (a quarter of the token)
  constexpr int COG = D / 8;   // output coordinates per lane (an eighth of the token)
  constexpr int KK = D / 16;   // k chunks of the product
  constexpr int MT = D / 16;   // m tiles (16 output coordinates each)
  constexpr int AW = CPT / 2;  // B words per token and part
  constexpr int CW = (W * COG + 31) / 32 + 1;  // code words per token (+1: straddling writes)
  constexpr int BYTES = W * COG / 8;
  extern __shared__ __align__(16) uint4 frag_smem[];  // Pi fragments
  __shared__ uint2 cell_smem[METHOD == 1 ? kMaxCells : 1];
  __shared__ uint32_t word_smem[METHOD == 2 ? 1024 : 1];
  __shared__ float c2_smem[1 << W];

  constexpr int NFRAG = PP * MT * KK * 32;
  for (int i = threadIdx.x; i < NFRAG; i += NW * 32) frag_smem[i] = static_cast<const uint4*>(p.frag)[i];
  if constexpr (METHOD == 1) {
    for (int i = threadIdx.x; i < p.ncells; i += NW * 32)
      cell_smem[i] = static_cast<const uint2*>(p.cells)[i];
  }
  if constexpr (METHOD == 2) {
    for (int i = threadIdx.x; i < 1024; i += NW * 32) word_smem[i] = static_cast<const uint32_t*>(p.cells)[i];
  }
  if (threadIdx.x < (1 << W)) c2_smem[threadIdx.x] = p.c2[threadIdx.x];
  __syncthreads();

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;

  for (int job = blockIdx.x * NW + warp; job < p.jobs; job += gridDim.x * NW) {
    const int row = job / p.jobs_per_row;
    const int tok0 = (job - row * p.jobs_per_row) * (8 * NTILE);
    uint32_t b[NTILE][XP == 2 ? 2 : 1][AW];
    if constexpr (XP != 2) {
#pragma unroll
      for (int nt = 0; nt < NTILE; ++nt) load_bf16<D>(p, row, tok0 + 8 * nt + g, t, tok0 + 8 * nt + g < p.tokens, b[nt][0]);
    }
    float inv[NTILE][2], nrm[NTILE][2];  // of tokens 2t + e of each group
#pragma unroll
    for (int nt = 0; nt < NTILE; ++nt) {
      const int tok = tok0 + 8 * nt + g;
      const bool ok = tok < p.tokens;
      float ss;
      if constexpr (XP != 2) {
        ss = XP == 3 ? sum_squares_centered<D>(b[nt][0], p.off + row * p.off_sr, t) : sum_squares_bf16<D>(b[nt][0]);
      } else {
        float v[CPT];
        load_row<D>(p, row, tok, t, ok, v);
        ss = 0.0f;
#pragma unroll
        for (int i = 0; i < CPT; i += 2) {
          ss = fmaf(v[i], v[i], fmaf(v[i + 1], v[i + 1], ss));
          const uint32_t hi = pack_bf16(v[i], v[i + 1]);
          b[nt][0][i / 2] = hi;
          b[nt][1][i / 2] = pack_bf16(v[i] - bf16_lo(hi), v[i + 1] - bf16_hi(hi));
        }
      }
      const float n = sqrtf(quad_sum(ss));  // of token g
      const float r = n > 0.0f ? 1.0f / n : 0.0f;
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        nrm[nt][e] = __shfl_sync(0xffffffffu, n, (2 * t + e) * 4);
        inv[nt][e] = __shfl_sync(0xffffffffu, r, (2 * t + e) * 4);
      }
    }
    uint32_t cw[NTILE][2][CW];
    float sq[NTILE][2];
#pragma unroll
    for (int nt = 0; nt < NTILE; ++nt)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        sq[nt][e] = 0.0f;
#pragma unroll
        for (int k = 0; k < CW; ++k) cw[nt][e][k] = 0u;
      }

#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      // XP = 3: y = Pi x - Pi mu, the products of the exact bf16 input accumulated onto -Pi mu (roff, output
      // coordinates COG*g + 2*mt + h)
      float2 r0 = make_float2(0.0f, 0.0f);
      if constexpr (XP == 3) {
        const float2 r = __ldg(reinterpret_cast<const float2*>(p.roff + row * p.roff_sr + COG * g + 2 * mt));
        r0 = make_float2(-r.x, -r.y);
      }
      uint32_t a[PP][KK][4];
#pragma unroll
      for (int pp = 0; pp < PP; ++pp)
#pragma unroll
        for (int kk = 0; kk < KK; ++kk) {
          const uint4 q = frag_smem[((pp * MT + mt) * KK + kk) * 32 + lane];
          a[pp][kk][0] = q.x, a[pp][kk][1] = q.y, a[pp][kk][2] = q.z, a[pp][kk][3] = q.w;
        }
#pragma unroll
      for (int nt = 0; nt < NTILE; ++nt) {
        float c[4] = {r0.x, r0.x, r0.y, r0.y};  // c[2h + e]: coordinate h, token e
#pragma unroll
        for (int kk = 0; kk < KK; ++kk) {
          mma_bf16(c, a[0][kk][0], a[0][kk][1], a[0][kk][2], a[0][kk][3], b[nt][0][2 * kk], b[nt][0][2 * kk + 1]);
          if constexpr (XP == 2)
            mma_bf16(c, a[0][kk][0], a[0][kk][1], a[0][kk][2], a[0][kk][3], b[nt][1][2 * kk], b[nt][1][2 * kk + 1]);
          if constexpr (PP == 2)
            mma_bf16(c, a[1][kk][0], a[1][kk][1], a[1][kk][2], a[1][kk][3], b[nt][0][2 * kk], b[nt][0][2 * kk + 1]);
        }
        // c[2h + e]: output coordinate COG*g + 2*mt + h of token 2t + e
#pragma unroll
        for (int e = 0; e < 2; ++e) {
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const float y = c[2 * h + e] * inv[nt][e];
            uint32_t code;
            if constexpr (METHOD == 1) {
              code = code_table<W>(y, cell_smem, p.cell_base8);
            } else if constexpr (METHOD == 2) {
              code = code_word<W>(y, word_smem);
            } else {
              int m;
              code = code_alu<W>(y, p, m);
            }
            if constexpr (CORR) sq[nt][e] += c2_smem[code];
            put_code<W>(cw[nt][e], 2 * mt + h, code);
          }
        }
      }
    }

#pragma unroll
    for (int nt = 0; nt < NTILE; ++nt) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int tok = tok0 + 8 * nt + 2 * t + e;
        float s = sq[nt][e];
        if constexpr (CORR) {
          s += __shfl_xor_sync(0xffffffffu, s, 4);
          s += __shfl_xor_sync(0xffffffffu, s, 8);
          s += __shfl_xor_sync(0xffffffffu, s, 16);
        }
        if (tok >= p.tokens) continue;
        const int64_t pos = int64_t(p.start) + tok;
        store_codes<BYTES>(p.codes + row * p.c_sr + pos * p.c_st + BYTES * g, cw[nt][e]);
        if (g == 0) {
          float n = nrm[nt][e];
          if constexpr (CORR) n = n / fmaxf(sqrtf(s), 1e-12f);
          const int64_t ni = row * p.n_sr + pos * p.n_st;
          if (p.n_kind == 3)
            static_cast<__half*>(p.norms)[ni] = __float2half_rn(n);
          else
            static_cast<float*>(p.norms)[ni] = n;
        }
      }
    }  }
}

template <int D, int W, int XP, int PP, int NTILE, int METHOD, bool CORR, int NW, int MINB>
cudaError_t launch(const Params& p, int ctas_per_sm, int sms, cudaStream_t s, int* info) {
  auto k = encode_kernel<D, W, XP, PP, NTILE, METHOD, CORR, NW, MINB>;
  const int smem = PP * D * D * 2;
  cudaError_t err = cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  int blocks = 0;
  err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, k, NW * 32, smem);
  if (err != cudaSuccess) return err;
  if (info != nullptr) {
    cudaFuncAttributes at;
    err = cudaFuncGetAttributes(&at, k);
    info[0] = at.numRegs, info[1] = (int)at.localSizeBytes, info[2] = blocks, info[3] = smem;
    return err;
  }
  if (ctas_per_sm > 0 && ctas_per_sm < blocks) blocks = ctas_per_sm;
  Params q = p;  // a warp job: NTILE groups of 8 tokens of one row
  q.jobs_per_row = (q.tokens + 8 * NTILE - 1) / (8 * NTILE);
  q.jobs = q.jobs_per_row * q.rows;
  int grid = blocks * sms;
  const int need = (q.jobs + NW - 1) / NW;
  if (grid > need) grid = need;
  if (grid < 1) grid = 1;
  k<<<grid, NW * 32, smem, s>>>(q);
  return cudaGetLastError();
}

// variant = {NTILE, METHOD, NW, MINB}; 0 = the default: the table bucketize, 4 warps per CTA; bf16 input
// (with or without a rotated offset), one-part rotation: 4 groups of 8 tokens per warp (half the shared-memory reads of Pi per token of 2
// groups), 3 CTAs per SM; 2 groups and 4 CTAs with the norm correction or a two-part rotation (4 groups
// would spill); other inputs: 1 group, 4 CTAs
template <int D, int W, int XP, int PP, bool CORR>
cudaError_t by_variant(const Params& p, const int* v, int cps, int sms, cudaStream_t s, int* info) {
  if (v[0] == 0) {
    if constexpr (XP != 2 && PP == 1 && !CORR) return launch<D, W, XP, PP, 4, 1, CORR, 4, 3>(p, cps, sms, s, info);
    if constexpr (XP != 2) return launch<D, W, XP, PP, 2, 1, CORR, 4, 4>(p, cps, sms, s, info);
    return launch<D, W, XP, PP, 1, 1, CORR, 4, 4>(p, cps, sms, s, info);
  }
#ifdef TQ_TUNE
#define TQE_V(N, M, W_, B) \
  if (v[0] == N && v[1] == M && v[2] == W_ && v[3] == B) return launch<D, W, XP, PP, N, M, CORR, W_, B>(p, cps, sms, s, info);
  if constexpr (D == 128 && XP == 1 && PP == 1) {
    TQE_V(4, 0, 4, 3) TQE_V(2, 1, 4, 4) TQE_V(2, 0, 4, 4) TQE_V(4, 1, 8, 1) TQE_V(8, 1, 4, 2) TQE_V(4, 1, 4, 2)
    TQE_V(4, 2, 4, 3) TQE_V(2, 2, 4, 4)
  }
#undef TQE_V
#endif
  return cudaErrorInvalidConfiguration;
}

template <int D, int W>
cudaError_t by_parts(const Params& p, int xp, int pp, bool corr, const int* v, int cps, int sms, cudaStream_t s,
                     int* info) {
#define TQE_P(X, P)                                                          \
  if (xp == X && pp == P)                                                    \
    return corr ? by_variant<D, W, X, P, true>(p, v, cps, sms, s, info)     \
                : by_variant<D, W, X, P, false>(p, v, cps, sms, s, info);
  TQE_P(1, 1) TQE_P(2, 1) TQE_P(3, 1) TQE_P(1, 2) TQE_P(2, 2) TQE_P(3, 2)
#undef TQE_P
  return cudaErrorInvalidConfiguration;
}

}  // namespace tqe

cudaError_t tq_encode_dispatch(const tqe::Params& p, int d, int w, int xp, int pp, bool corr, const int* variant,
                               int cps, int sms, cudaStream_t s, int* info) {
  using namespace tqe;
  const int* v = variant;
  if (d == 128 && w == 4) return by_parts<128, 4>(p, xp, pp, corr, v, cps, sms, s, info);
  if (d == 128 && w == 3) return by_parts<128, 3>(p, xp, pp, corr, v, cps, sms, s, info);
  if (d == 128 && w == 2) return by_parts<128, 2>(p, xp, pp, corr, v, cps, sms, s, info);
  if (d == 64 && w == 4) return by_parts<64, 4>(p, xp, pp, corr, v, cps, sms, s, info);
  if (d == 64 && w == 3) return by_parts<64, 3>(p, xp, pp, corr, v, cps, sms, s, info);
  if (d == 64 && w == 2) return by_parts<64, 2>(p, xp, pp, corr, v, cps, sms, s, info);
  return cudaErrorInvalidConfiguration;
}
