// What the int8-activation kernels share: q8_gemm.cpp (activation quantisation, AMX tiles, AVX512-VNNI and
// the entry point) and q8_avx2.cpp (the same integer sums on AVX2 alone). See the top of q8_gemm.cpp.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace q8 {

constexpr int kPanel = 16, kBlock = 32;

struct Weights {
  const uint8_t* codes;    // [P, K * bits / 8 * 16], quad layout
  const at::Half* scales;  // [P, K / G, 16]
  const at::Half* mins;    // [P, K / G, 16] or null
  int64_t K, G, P, bits;
  int64_t pstride() const { return K * bits / 8 * kPanel; }
};

struct Acts {
  const int8_t* q;     // [rows (padded to 32), K], each in [-127, 127]
  const float* d;      // [M, K / 32]
  const float* xsum;   // [M, K / G] or null
  int64_t K;
};

// y [M, P * 16] from VPMADDUBSW / VPMADDWD: bitwise the result of the VNNI and AMX paths.
void avx2_gemm(const Weights& w, const Acts& a, int64_t M, float* y, const float* bias);

}  // namespace q8
