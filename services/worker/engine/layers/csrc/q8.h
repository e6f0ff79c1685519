// What the int8-activation kernels share: q8_gemm.cpp (activation quantisation, AMX tiles, AVX512-VNNI and
// the entry point) and q8_avx2.cpp (the same integer sums on AVX2 alone). See the top of q8_gemm.cpp.
#pragma once

#include "ops.h"

#include <ATen/ATen.h>

#include <cstdint>

namespace q8 {

constexpr int kPanel = kPanelRows, kBlock = 32;

using Weights = PackedWeights;  // codes in the quad layout, no table

struct Acts {
  const int8_t* q;     // [M (AMX: padded to 32), K], each in [-127, 127] (VNNI over 8-bit codes: x ^ 0x80, x + 128)
  const float* d;      // [M, K / 32]
  const float* xsum;   // [M, K / G] or null
  int64_t K;
};

// Where block `block` of a panel sits among its weight groups: the float epilogue's bookkeeping, the same for
// every unit. ONE: every block is a whole group (q4_1, q8_0: G == 32), so no division and no running sum.
template <bool ONE>
struct BlockPos {
  bool first, last;  // the block opens / closes its weight group
  int64_t b, g, nb, ng;
  int64_t off;  // the panel's 16 scales (and mins) of group g
  BlockPos(const Weights& w, int64_t block, int64_t panel) : b(block), nb(w.K / kBlock) {
    if constexpr (ONE) {
      ng = nb, g = block, first = last = true;
    } else {
      const int64_t k0 = block * kBlock;
      ng = w.K / w.G, g = k0 / w.G, first = k0 % w.G == 0, last = (k0 + kBlock) % w.G == 0;
    }
    off = (panel * ng + g) * kPanel;
  }
};

// A panel's first row tile streams its codes from memory (in a decode, the only one): ask for them kAhead blocks
// early, past the panel's end into the next one. The hardware prefetcher alone leaves a 1-row pass well short
// of the core's read rate (bench/measured/q8-avx2-cpu-2026-12-06.json, q8-vnni-cpu-2026-12-06.json).
constexpr int kAhead = 16;
template <int BITS>
inline void prefetch_block(const uint8_t* panel_codes, int64_t b) {
  const char* p = reinterpret_cast<const char*>(panel_codes + (b + kAhead) * BITS * 64);
  for (int i = 0; i < BITS * 64; i += 64) __builtin_prefetch(p + i, 0, 3);
}

// y [M, P * 16] from VPMADDUBSW / VPMADDWD: bitwise the result of the VNNI and AMX paths.
void avx2_gemm(const Weights& w, const Acts& a, int64_t M, float* y, const float* bias);

}  // namespace q8

// q8_linear_into (ops.h) without its checks, for weights already checked: y [M, P * 16] = q8(x [M, K]) @ w.
void q8_linear_raw(const q8::Weights& w, const float* x, int64_t M, const float* bias, int64_t unit, float* y);
