// Quantized linear layers for CPUs: y[M, N] = x[M, K] @ dequant(W)^T, with fp32 activations.
//
// Weights arrive in a panel layout (see layers/quant.py): 16 output rows per panel; inside a panel,
// per group of G input columns, the codes of 16 rows for one column (8-bit) or a pair of columns
// (4-bit, low nibble = even column) sit next to each other, so one load gives one weight per row
// and a broadcast activation multiplies all 16 rows at once. No horizontal sums, and the
// dequantisation of a weight vector is shared by every activation row of the tile.
//
// Per group the kernel accumulates sum_k x[k] * c[k] (c = code, or the NF4 table entry) and then
// adds scale * that (+ min * sum_k x[k] for asymmetric formats): the same arithmetic as
// sum_k x[k] * (scale * c[k] + min), in fp32, one rounding order apart.
//
// Compiled with -march=native for the machine it runs on: AVX-512 or AVX2 (+F16C, FMA).

#include "ops.h"
#include "simd.h"

#include "parallel.h"

#include <algorithm>
#include <vector>

namespace {

constexpr int kPanel = kPanelRows;

constexpr int RV = kPanel / Simd::W;  // vectors per panel

using Weights = PackedWeights;

// One tile: PN panels x MT activation rows, y[m, p*16 + r] for the tile's panels.
template <int BITS, bool MIN, bool TABLE, int PN, int MT>
void tile(const Weights& w, int64_t p0, const float* x, int64_t ldx, const float* xsum, float* y, int64_t ldy,
          const float* bias) {
  using S = Simd;
  const int64_t ng = w.K / w.G;
  const int64_t pstride = w.K * BITS / 8 * kPanel;  // code bytes per panel
  const S::Table table(TABLE ? w.table : nullptr);
  typename S::F out[PN][RV][MT];
  for (int p = 0; p < PN; ++p)
    for (int h = 0; h < RV; ++h)
      for (int m = 0; m < MT; ++m) out[p][h][m] = S::zero();

  for (int64_t g = 0; g < ng; ++g) {
    typename S::F acc[PN][RV][MT];
    for (int p = 0; p < PN; ++p)
      for (int h = 0; h < RV; ++h)
        for (int m = 0; m < MT; ++m) acc[p][h][m] = S::zero();
    const int64_t k0 = g * w.G;
    if constexpr (BITS == 4) {
      for (int64_t k = k0; k < k0 + w.G; k += 2) {
        for (int p = 0; p < PN; ++p) {
          const uint8_t* c = w.codes + (p0 + p) * pstride + k * 8;
          for (int h = 0; h < RV; ++h) {
            typename S::I raw = S::u8(c + h * S::W);
            typename S::F w0, w1;
            if constexpr (TABLE) {
              w0 = table(S::low4(raw));
              w1 = table(S::high4(raw));
            } else {
              w0 = S::cvt(S::low4(raw));
              w1 = S::cvt(S::high4(raw));
            }
            for (int m = 0; m < MT; ++m) {
              acc[p][h][m] = S::fma(w0, S::bcast(x + m * ldx + k), acc[p][h][m]);
              acc[p][h][m] = S::fma(w1, S::bcast(x + m * ldx + k + 1), acc[p][h][m]);
            }
          }
        }
      }
    } else {
      for (int64_t k = k0; k < k0 + w.G; ++k) {
        for (int p = 0; p < PN; ++p) {
          const uint8_t* c = w.codes + (p0 + p) * pstride + k * kPanel;
          for (int h = 0; h < RV; ++h) {
            typename S::F w0 = S::cvt(S::s8(c + h * S::W));
            for (int m = 0; m < MT; ++m) acc[p][h][m] = S::fma(w0, S::bcast(x + m * ldx + k), acc[p][h][m]);
          }
        }
      }
    }
    for (int p = 0; p < PN; ++p) {
      const int64_t off = ((p0 + p) * ng + g) * kPanel;
      for (int h = 0; h < RV; ++h) {
        typename S::F d = S::half(w.scales + off + h * S::W);
        typename S::F mn = MIN ? S::half(w.mins + off + h * S::W) : S::zero();
        for (int m = 0; m < MT; ++m) {
          out[p][h][m] = S::fma(acc[p][h][m], d, out[p][h][m]);
          if constexpr (MIN) out[p][h][m] = S::fma(mn, S::bcast(xsum + m * ng + g), out[p][h][m]);
        }
      }
    }
  }
  for (int p = 0; p < PN; ++p)
    for (int h = 0; h < RV; ++h) {
      const int64_t n = (p0 + p) * kPanel + h * S::W;
      typename S::F b = bias ? S::load(bias + n) : S::zero();
      for (int m = 0; m < MT; ++m) S::store(y + m * ldy + n, bias ? S::add(out[p][h][m], b) : out[p][h][m]);
    }
}

// Tile shapes: enough independent accumulators to hide FMA latency, few enough to stay in registers.
constexpr int kPanelsNarrow = 4;  // M <= 2: memory-bound, spread over panels
#if defined(__AVX512F__)
constexpr int kPanelsWide = 2, kRowsWide = 6;
#else
constexpr int kPanelsWide = 1, kRowsWide = 3;
#endif

template <int BITS, bool MIN, bool TABLE, int PN>
void rows(const Weights& w, int64_t p0, const float* x, int64_t ldx, const float* xsum, float* y, int64_t ldy,
          const float* bias, int64_t mt) {
  auto run = [&](auto MT) { tile<BITS, MIN, TABLE, PN, decltype(MT)::value>(w, p0, x, ldx, xsum, y, ldy, bias); };
  switch (mt) {
    case 1: run(std::integral_constant<int, 1>{}); break;
    case 2: run(std::integral_constant<int, 2>{}); break;
    case 3: run(std::integral_constant<int, 3>{}); break;
#if defined(__AVX512F__)
    case 4: run(std::integral_constant<int, 4>{}); break;
    case 5: run(std::integral_constant<int, 5>{}); break;
    case 6: run(std::integral_constant<int, 6>{}); break;
#endif
    default: TORCH_CHECK(false, "bad row tile ", mt);
  }
}

template <int BITS, bool MIN, bool TABLE>
void gemm(const Weights& w, const float* x, int64_t M, const float* xsum, float* y, const float* bias) {
  const int64_t ldx = w.K, ldy = w.P * kPanel, ng = w.K / w.G;
  const bool narrow = M <= 2;
  const int64_t pn = narrow ? kPanelsNarrow : kPanelsWide;
  const int64_t mt = narrow ? M : kRowsWide;
  const int64_t tiles = (w.P + pn - 1) / pn;
  tokenmill::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t p0 = t * pn, np = std::min(pn, w.P - p0);
      for (int64_t m0 = 0; m0 < M; m0 += mt) {
        const int64_t rm = std::min(mt, M - m0);
        const float* xm = x + m0 * ldx;
        const float* sm = xsum ? xsum + m0 * ng : nullptr;
        float* ym = y + m0 * ldy;
        for (int64_t p = p0; p < p0 + np;) {  // full tiles of pn panels, the rest one panel at a time
          if (p + pn <= p0 + np && pn == kPanelsNarrow) {
            rows<BITS, MIN, TABLE, kPanelsNarrow>(w, p, xm, ldx, sm, ym, ldy, bias, rm);
            p += pn;
          } else if (p + pn <= p0 + np && pn == kPanelsWide) {
            rows<BITS, MIN, TABLE, kPanelsWide>(w, p, xm, ldx, sm, ym, ldy, bias, rm);
            p += pn;
          } else {
            rows<BITS, MIN, TABLE, 1>(w, p, xm, ldx, sm, ym, ldy, bias, rm);
            p += 1;
          }
        }
      }
    }
  });
}

}  // namespace

// x [M, K] float32; codes uint8 [P, ...]; scales / mins float16 [P, K / G, 16]; returns [M, P * 16].
at::Tensor quant_linear(at::Tensor x, at::Tensor codes, at::Tensor scales, c10::optional<at::Tensor> mins,
                           c10::optional<at::Tensor> table, c10::optional<at::Tensor> bias, int64_t bits,
                           int64_t group) {
  TORCH_CHECK(x.dim() == 2 && codes.dim() == 2, "x: [M, K]; codes: [P, *]");
  at::Tensor y = at::empty({x.size(0), codes.size(0) * kPanel}, x.options());
  quant_linear_into(x, codes, scales, mins, table, bias, bits, group, y);
  return y;
}

void quant_linear_into(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                       const c10::optional<at::Tensor>& mins, const c10::optional<at::Tensor>& table,
                       const c10::optional<at::Tensor>& bias, int64_t bits, int64_t group, const at::Tensor& y) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x: contiguous float32 [M, K]");
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.is_contiguous() && codes.dim() == 2, "codes: uint8 [P, *]");
  TORCH_CHECK(scales.scalar_type() == at::kHalf && scales.is_contiguous(), "scales: contiguous float16");
  TORCH_CHECK(bits == 4 || bits == 8, "bits must be 4 or 8");
  const int64_t M = x.size(0), K = x.size(1), P = codes.size(0);
  TORCH_CHECK(group > 0 && K % group == 0 && group % 2 == 0, "K must be a multiple of the group size");
  TORCH_CHECK(codes.size(1) == K * bits / 8 * kPanel, "codes do not match K");
  TORCH_CHECK(scales.numel() == P * (K / group) * kPanel, "scales do not match K / group");
  const bool has_min = mins.has_value() && mins->defined();
  const bool has_table = table.has_value() && table->defined();
  TORCH_CHECK(!has_table || (bits == 4 && table->numel() == 16 && table->scalar_type() == at::kFloat),
              "table: 16 float32 entries, 4-bit codes only");
  TORCH_CHECK(!(has_table && has_min), "a table format has no mins");
  if (has_min) TORCH_CHECK(mins->scalar_type() == at::kHalf && mins->is_contiguous() && mins->numel() == scales.numel());
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias)
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == P * kPanel,
                "bias: float32 [P * 16]");

  TORCH_CHECK(y.scalar_type() == at::kFloat && y.is_contiguous() && y.dim() == 2 && y.size(0) == M &&
              y.size(1) == P * kPanel, "out: contiguous float32 [M, P * 16]");
  TORCH_CHECK(bits == 4 || (!has_min && !has_table), "8-bit codes are symmetric: no mins, no table");
  quant_linear_raw(packed_weights(codes, scales, mins, table, bits, group), x.data_ptr<float>(), M,
                   has_bias ? bias->data_ptr<float>() : nullptr, y.data_ptr<float>());
}

PackedWeights packed_weights(const at::Tensor& codes, const at::Tensor& scales, const c10::optional<at::Tensor>& mins,
                             const c10::optional<at::Tensor>& table, int64_t bits, int64_t group) {
  return {codes.data_ptr<uint8_t>(), scales.data_ptr<at::Half>(),
          mins.has_value() && mins->defined() ? mins->data_ptr<at::Half>() : nullptr,
          table.has_value() && table->defined() ? table->data_ptr<float>() : nullptr,
          codes.size(1) * 8 / (bits * kPanel), group, codes.size(0), bits};
}

void quant_linear_raw(const PackedWeights& w, const float* xp, int64_t M, const float* b, float* yp) {
  if (M == 0) return;
  const int64_t K = w.K, group = w.G;
  // per row and group: summed in order here, so a row's result never depends on M (this thread's scratch,
  // reused call to call)
  thread_local std::vector<float> xsum;
  if (w.mins != nullptr) {
    xsum.resize(M * (K / group));
    for (int64_t i = 0; i < M * (K / group); ++i) {
      float acc = 0.0f;
      for (int64_t k = 0; k < group; ++k) acc += xp[i * group + k];
      xsum[i] = acc;
    }
  }
  if (w.bits == 8) gemm<8, false, false>(w, xp, M, nullptr, yp, b);
  else if (w.table != nullptr) gemm<4, false, true>(w, xp, M, nullptr, yp, b);
  else if (w.mins != nullptr) gemm<4, true, false>(w, xp, M, xsum.data(), yp, b);
  else gemm<4, false, false>(w, xp, M, nullptr, yp, b);
}
