// Parameters of the warp-level decode kernel (cuda_attention.cu); shared with the torch binding.
#pragma once
#include <cuda_fp16.h>
#include <stdint.h>

namespace tq {

// Offset of dynamic shared memory in the CTA's shared window when a kernel declares no static shared
// memory: the 1 KB the hardware reserves per CTA (sm_80 and later). The decode table's loads use it as an
// immediate; cuda_attention.py checks it once per process with smem_base_probe (mirrored there).
constexpr uint32_t SMEM_BASE = 0x400;

// Full-precision tokens per window chunk (one partial each, by split chunk % splits; mirrored in cuda_attention.py)
constexpr int WINDOW_TOKENS = 32;

struct Params {
  const void* q;       // [BH, M, D] query as given (kind q_kind), rotated in the kernel's prologue
  int q_kind;          // 2 fp32, 3 fp16, 4 bf16
  const float* rt;     // [D, D] fp32 Pi_k^T: q @ rt is the rotated query (natural coordinate order)
  const float* qoff;   // [BH, M] fp32 <q, mu_k> or nullptr
  float scale2;        // softmax scale * log2(e)
  const uint8_t* kc;   // key codes
  long long kc_sb, kc_sh, kc_sn;  // byte strides
  const __half* kn;    // key norms
  long long kn_sb, kn_sh, kn_sn;  // element strides
  const uint8_t* vc;
  long long vc_sb, vc_sh, vc_sn;
  const __half* vn;
  long long vn_sb, vn_sh, vn_sn;
  const void* mask;    // [B, Hq, L, N + W] view (element strides), or nullptr
  long long sm_b, sm_h, sm_l, sm_t;
  int mask_kind;       // 0 none, 1 bool/uint8 (nonzero = attend), 2 fp32, 3 fp16, 4 bf16 (additive)
  float* part;         // [BH, splits + wchunks, M, AC + 2]: acc columns (VHI_C offset), then max (base 2), then sum
  int ac;              // AC = 16 + D (16 unused columns of the absent high-width stream)
  int n, hkv, m, l, g, tps, splits;
  const int* n_dev;    // device count of compressed tokens to attend (<= n; the rest of the buffer is ignored), or nullptr
  // fwht != 0: both rotations are the two-stage randomized Hadamard H D2 H D1 / D (power-of-two D): the prologue and
  // the finish apply them as in-warp Walsh-Hadamard butterflies from these sign bits (bit c of word c / 32 of
  // stage s set: coordinate c's sign is -1) instead of the dense rt / pv
  int fwht;
  uint32_t ksign[2][4], vsign[2][4];
  int wmask;           // 1: the mask covers the W full-precision tokens only (read by the finish; MASK is false)
  uint32_t ktab[4];    // key decoder tables for the register (prmt) decoders (fp16 low/high bytes)
  uint32_t vtab[4];
  unsigned short kcent[16], vcent[16];  // fp16 centroids (shared-memory table decoder)
  // fused finish (fused != 0): the last CTA of each (batch, kv head, row block) merges the splits,
  // rotates back (acc @ Pi_v), adds the value offset, attends over the full-precision window and
  // writes the output; otherwise the partials go to the Triton combine kernel.
  int fused;
  int* counter;        // [BH * row blocks] int32, zero between launches (the last CTA resets its entry)
  const float* pv;     // [D, D] fp32 Pi_v
  const float* voff;   // [BH, D] fp32 or nullptr
  const void* fk;      // [B, Hkv, W, D] window keys (element strides, last stride 1)
  const void* fv;
  long long fk_sb, fk_sh, fk_sw, fv_sb, fv_sh, fv_sw;
  int w, fk_kind, fv_kind;  // window length; dtype kinds 2 fp32, 3 fp16, 4 bf16
  int wchunks;         // window chunks: one partial each, after the splits' (fused only)
  void* out;           // [BH, M, D] output
  int out_kind;
};

}  // namespace tq
