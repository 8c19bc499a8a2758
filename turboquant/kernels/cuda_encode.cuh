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
  const float* roff;  // [R, D] Pi @ off (rotated coordinates) with a bf16 input and no scale (XP = 1), or null
  int64_t roff_sr;
  const void* frag;   // rotation fragments [PP, D/16, D/16, 32] x 16 bytes
  const void* cells;  // bucketize cells [ncells] x {float boundary or +inf, uint32 code below it}
  int ncells, cell_base8;  // cell of |y|: max(((bits >> 21) & 0x3ff) * 8 - cell_base8, 0) bytes
  int rows, tokens, start;
  int jobs_per_row, jobs;  // set by the launch from rows, tokens and the kernel's tokens per warp job
  int x_kind;  // 2 fp32, 3 fp16, 4 bf16
  int n_kind;  // 2 fp32, 3 fp16
  float pb[8];   // positive boundaries b[H + j], j < H - 1; pb[7] = the middle boundary b[H - 1]
  float c2[16];  // squared centroid of each code (norm correction)
};

}  // namespace tqe
