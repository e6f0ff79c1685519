// The small per-layer ops of the decoder, one pass each: RMSNorm (fused with the residual add),
// rotary embedding in place, SiLU(gate) * up; and greedy sampling's argmax. Rounding follows transformers' modules op for op
// (x1*cos - x2*sin, not an FMA), so the fp32 path stays within an ulp of the reference model.

#include "ops.h"
#include "simd.h"

#include "parallel.h"

#include <algorithm>
#include <cmath>
#include <limits>

namespace {
using S = Simd;
constexpr int W = S::W;
}  // namespace

// out = weight * (r / sqrt(mean(r^2) + eps)) per row, r = x (+ residual, written back to `residual`).
at::Tensor rms_norm(at::Tensor x, at::Tensor weight, double eps, c10::optional<at::Tensor> residual) {
  TORCH_CHECK(x.dim() == 2, "x: float32 [T, N], rows dense");
  at::Tensor out = at::empty({x.size(0), x.size(1)}, x.options());
  rms_norm_into(x, weight, eps, residual, out);
  return out;
}

void rms_norm_into(const at::Tensor& x, const at::Tensor& weight, double eps, const c10::optional<at::Tensor>& residual,
                   const at::Tensor& out) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && x.scalar_type() == at::kFloat, "x: float32 [T, N], rows dense");
  const int64_t T = x.size(0), N = x.size(1);
  TORCH_CHECK(weight.numel() == N && weight.is_contiguous() && weight.scalar_type() == at::kFloat, "weight: [N]");
  const bool add = residual.has_value() && residual->defined();
  if (add) TORCH_CHECK(residual->is_contiguous() && residual->sizes() == x.sizes(), "residual: contiguous, like x");
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.is_contiguous() && out.sizes() == x.sizes(),
              "out: contiguous float32, like x");
  rms_norm_raw(x.data_ptr<float>(), x.stride(0), weight.data_ptr<float>(), eps, add ? residual->data_ptr<float>() : nullptr,
               out.data_ptr<float>(), T, N);
}

void rms_norm_raw(const float* x, int64_t x_stride, const float* w, double eps, float* residual, float* out, int64_t T,
                  int64_t N) {
  const bool add = residual != nullptr;
  tokenmill::parallel_for(0, T, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* xr = x + t * x_stride;
      float* r = add ? residual + t * N : const_cast<float*>(xr);
      float* o = out + t * N;
      // the sum of squares lane by lane (one serial chain over a 576-wide row was ~0.5 us, 61 calls a step)
      S::F acc = S::zero();
      int64_t i = 0;
      for (; i + W <= N; i += W) {
        const S::F v = add ? S::add(S::load(r + i), S::load(xr + i)) : S::load(xr + i);
        if (add) S::store(r + i, v);
        acc = S::add(acc, S::mul(v, v));
      }
      float ss = S::hsum(acc);
      for (; i < N; ++i) {
        const float v = add ? r[i] + xr[i] : xr[i];
        if (add) r[i] = v;
        ss += v * v;
      }
      const float inv = 1.0f / std::sqrt(ss / static_cast<float>(N) + static_cast<float>(eps));
      const S::F iv = S::set1(inv);
      for (i = 0; i + W <= N; i += W) S::store(o + i, S::mul(S::load(w + i), S::mul(S::load(r + i), iv)));
      for (; i < N; ++i) o[i] = w[i] * (r[i] * inv);
    }
  });
}

// x [T, heads * D] (row stride any; wider rows: their first heads * D columns), in place: neox-style halves, cos / sin [positions, D / 2].
void rotary(at::Tensor x, int64_t heads, at::Tensor positions, at::Tensor cos, at::Tensor sin) {
  TORCH_CHECK(x.stride(1) == 1 && x.scalar_type() == at::kFloat, "x: float32, rows dense");
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.is_contiguous(), "positions: int64");
  const int64_t T = x.size(0), half = cos.size(1), D = 2 * half;
  TORCH_CHECK(x.size(1) >= heads * D && cos.is_contiguous() && sin.is_contiguous(), "x is narrower than heads * D");
  const int64_t* pos = positions.data_ptr<int64_t>();
  TORCH_CHECK(T == 0 || *std::max_element(pos, pos + T) < cos.size(0), "position beyond the rotary table");
  tokenmill::parallel_for(0, T, 8, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* c = cos.data_ptr<float>() + pos[t] * half;
      const float* s = sin.data_ptr<float>() + pos[t] * half;
      for (int64_t h = 0; h < heads; ++h) {
        float* a = x.data_ptr<float>() + t * x.stride(0) + h * D;
        float* b = a + half;
        int64_t i = 0;
        for (; i + W <= half; i += W) {
          const S::F x1 = S::load(a + i), x2 = S::load(b + i), cv = S::load(c + i), sv = S::load(s + i);
          S::store(a + i, S::sub(S::mul(x1, cv), S::mul(x2, sv)));
          S::store(b + i, S::add(S::mul(x2, cv), S::mul(x1, sv)));
        }
        for (; i < half; ++i) {
          const float x1 = a[i], x2 = b[i];
          a[i] = x1 * c[i] - x2 * s[i];
          b[i] = x2 * c[i] + x1 * s[i];
        }
      }
    }
  });
}

// gate_up [T, 2 * I] -> silu(gate) * up, [T, I]. Work items are spans of a row whose length is a multiple of the
// vector width, so only a row's last few elements take the scalar exp, however the items are chunked.
at::Tensor silu_mul(at::Tensor gate_up) {
  TORCH_CHECK(gate_up.dim() == 2, "gate_up: contiguous float32 [T, 2 * I]");
  at::Tensor out = at::empty({gate_up.size(0), gate_up.size(1) / 2}, gate_up.options());
  silu_mul_into(gate_up, out);
  return out;
}

void silu_mul_into(const at::Tensor& gate_up, const at::Tensor& out) {
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.is_contiguous() && gate_up.scalar_type() == at::kFloat,
              "gate_up: contiguous float32 [T, 2 * I]");
  const int64_t T = gate_up.size(0), I = gate_up.size(1) / 2;
  constexpr int64_t kSpan = 16 * W;
  const int64_t spans = (I + kSpan - 1) / kSpan;
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.is_contiguous() && out.dim() == 2 && out.size(0) == T &&
              out.size(1) == I, "out: contiguous float32 [T, I]");
  tokenmill::parallel_for(0, T * spans, 4096 / kSpan, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t t = item / spans, i = item % spans * kSpan, n = std::min(kSpan, I - i);
      const float* g = gate_up.data_ptr<float>() + t * 2 * I + i;
      const float* u = g + I;
      float* o = out.data_ptr<float>() + t * I + i;
      int64_t j = 0;
      for (; j + W <= n; j += W) {
        const S::F gv = S::load(g + j);
        const S::F sig = S::div(gv, S::add(S::set1(1.0f), S::exp(S::sub(S::zero(), gv))));
        S::store(o + j, S::mul(sig, S::load(u + j)));
      }
      for (; j < n; ++j) o[j] = g[j] / (1.0f + std::exp(-g[j])) * u[j];
    }
  });
}

// Per row of x [T, N]: the index of its largest value, the first one where several tie; a NaN counts as the
// largest (torch.argmax's contract). One vector pass for the maximum, one scan for its first index: ~4x
// torch.argmax over a vocabulary row.
at::Tensor argmax_rows(at::Tensor x) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kFloat && x.size(1) > 0,
              "x: contiguous float32 [T, N], N > 0");
  const int64_t T = x.size(0), N = x.size(1);
  auto out = at::empty({T}, x.options().dtype(at::kLong));
  int64_t* o = out.data_ptr<int64_t>();
  tokenmill::parallel_for(0, T, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* r = x.data_ptr<float>() + t * N;
      S::F m = S::set1(-std::numeric_limits<float>::infinity());
      bool nan = false;
      int64_t i = 0;
      for (; i + W <= N; i += W) {
        const S::F v = S::load(r + i);
        nan = nan || S::any_nan(v);
        m = S::max(m, v);
      }
      float best = S::hmax(m);
      for (; i < N; ++i) {
        nan = nan || std::isnan(r[i]);
        best = std::max(best, r[i]);
      }
      int64_t at = 0;
      if (!nan && best > -std::numeric_limits<float>::infinity()) {  // skip the vectors below the maximum
        const float below = std::nextafter(best, -std::numeric_limits<float>::infinity());
        while (at + W <= N && !S::any_above(S::load(r + at), below)) at += W;
      }
      while (at < N && !(nan ? std::isnan(r[at]) : r[at] == best)) ++at;
      o[t] = at;
    }
  });
  return out;
}
