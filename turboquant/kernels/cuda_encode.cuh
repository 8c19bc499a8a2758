// Parameters of the CUDA encode kernel (cuda_encode.cu), shared with the C++ binding in cuda_encode.py.
#pragma once
#include <stdint.h>

namespace tqe {

struct Params {
  const void* x;
  int64_t x_sr, x_st;  // elements
  uint8_t* codes;
  int64_t c_sr, c_st;  // bytes
  void* norms;
  int64_t n_sr, n_st;  // elements
  const float* off;    // [R, D] subtracted before the rotation, or null
  int64_t off_sr;
  const float* inv_scale;  // [R, D] multiplied after the offset, or null
  int64_t sc_sr;
  const void* frag;  // rotation fragments [PP, D/8, D/32, 32] x 16 bytes
  int tokens, start, jobs_per_row, jobs;
  int x_kind;  // 2 fp32, 3 fp16, 4 bf16
  int n_kind;  // 2 fp32, 3 fp16
  int correct;
  float pb[8];    // positive boundaries b[H + j], j < H - 1; pb[7] = the middle boundary b[H - 1]
  float pbh[8];   // pb * 2^40 (FMA rows); pbh[7] = b[H - 1] * 2^100
  float cm2[8];   // squared centroid magnitudes c[H + m]^2
  float dcm2[8];  // cm2[j + 1] - cm2[j]
};

}  // namespace tqe
