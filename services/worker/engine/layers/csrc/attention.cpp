// Paged attention over the KV cache in place: no gathered copy of any sequence's context.
//
// Cache layout, per layer: K as [kv_heads, blocks, head_dim, block_size] (each block transposed, so the
// scores of W keys are one vector: sum_d q[d] * K[d, keys]) and V as [kv_heads, blocks, block_size,
// head_dim]. Every query token attends keys [lo, pos] of its own sequence, lo = pos - window + 1 for a
// sliding window, else 0: decodes and prefill chunks (over their cached prefix) are the same loop.
// Online softmax per block (flash-attention style); the query heads sharing a KV head share its loads.

#include "simd.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

using S = Simd;
constexpr int W = S::W;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

struct Cache {
  const float* k;
  const float* v;
  int64_t blocks, block_size, head_dim;
};

// Query heads g < G of one KV head (q rows [G, D]) over keys [lo, hi) of the sequence with `table`.
void attend(const float* q, float* out, const Cache& c, int64_t kvh, const int32_t* table, int64_t lo, int64_t hi,
            int G, float scale, float* acc) {
  const int64_t D = c.head_dim, BS = c.block_size;
  const float* kbase = c.k + kvh * c.blocks * D * BS;
  const float* vbase = c.v + kvh * c.blocks * BS * D;
  float m[16], l[16], p[16][W];
  for (int g = 0; g < G; ++g) {
    m[g] = kNegInf;
    l[g] = 0.0f;
  }
  std::fill(acc, acc + G * D, 0.0f);
  for (int64_t j = lo; j < hi;) {
    const int64_t blk = j / BS, start = blk * BS;
    const float* kt = kbase + static_cast<int64_t>(table[blk]) * D * BS;
    const float* vb = vbase + static_cast<int64_t>(table[blk]) * BS * D;
    for (int64_t cs = (j - start) / W * W; cs < BS && start + cs < hi; cs += W) {
      const int n = static_cast<int>(std::min<int64_t>(W, BS - cs));
      const int first = static_cast<int>(std::max<int64_t>(0, j - start - cs));
      const int last = static_cast<int>(std::min<int64_t>(n, hi - start - cs));
      for (int g = 0; g < G; ++g) {
        const float* qg = q + g * D;
        S::F s0 = S::zero(), s1 = S::zero();
        for (int64_t d = 0; d < D; d += 2) {
          const float* k0 = kt + d * BS + cs;
          s0 = S::fma(S::bcast(qg + d), n == W ? S::load(k0) : S::loadn(k0, n, 0.0f), s0);
          s1 = S::fma(S::bcast(qg + d + 1), n == W ? S::load(k0 + BS) : S::loadn(k0 + BS, n, 0.0f), s1);
        }
        float sc[W];
        S::store(sc, S::mul(S::add(s0, s1), S::set1(scale)));
        float mx = kNegInf;
        for (int i = first; i < last; ++i) mx = std::max(mx, sc[i]);
        const float mnew = std::max(m[g], mx);
        const float corr = std::exp(m[g] - mnew);
        S::store(p[g], S::exp(S::sub(S::load(sc), S::set1(mnew))));
        float sum = 0.0f;
        for (int i = 0; i < W; ++i) {
          if (i < first || i >= last) p[g][i] = 0.0f;
          sum += p[g][i];
        }
        l[g] = l[g] * corr + sum;
        m[g] = mnew;
        if (corr != 1.0f) {
          const S::F cv = S::set1(corr);
          for (int64_t d = 0; d < D; d += W) S::store(acc + g * D + d, S::mul(S::load(acc + g * D + d), cv));
        }
      }
      for (int i = first; i < last; ++i) {
        const float* vrow = vb + (cs + i) * D;
        for (int64_t d = 0; d < D; d += W) {
          const S::F vv = S::load(vrow + d);
          for (int g = 0; g < G; ++g) {
            float* a = acc + g * D + d;
            S::store(a, S::fma(S::set1(p[g][i]), vv, S::load(a)));
          }
        }
      }
    }
    j = start + BS;
  }
  for (int g = 0; g < G; ++g) {
    const S::F inv = S::set1(1.0f / l[g]);
    for (int64_t d = 0; d < D; d += W) S::store(out + g * D + d, S::mul(S::load(acc + g * D + d), inv));
  }
}

}  // namespace

// q [T, H * D] (row stride any), caches as above; block_tables [B, max_blocks] int32; token_seq / token_pos [T]
// int32: each token's row in block_tables and its position. Returns [T, H * D].
torch::Tensor paged_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor block_tables,
                              torch::Tensor token_seq, torch::Tensor token_pos, int64_t num_heads, int64_t window,
                              double scale) {
  TORCH_CHECK(q.dim() == 2 && q.stride(1) == 1 && q.scalar_type() == torch::kFloat32, "q: float32 [T, H * D], rows dense");
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.dim() == 4 && k_cache.is_contiguous() && v_cache.is_contiguous(),
              "caches: contiguous [kv_heads, blocks, ...]");
  TORCH_CHECK(block_tables.scalar_type() == torch::kInt32 && block_tables.is_contiguous(), "block_tables: int32");
  TORCH_CHECK(token_seq.scalar_type() == torch::kInt32 && token_pos.scalar_type() == torch::kInt32, "token_*: int32");
  const int64_t T = q.size(0), KVH = k_cache.size(0), D = k_cache.size(2), BS = k_cache.size(3);
  TORCH_CHECK(q.size(1) == num_heads * D && num_heads % KVH == 0, "q does not match the cache's heads");
  TORCH_CHECK(D % W == 0 && num_heads / KVH <= 16, "head_dim must be a multiple of ", W, ", at most 16 heads per KV head");
  const int G = static_cast<int>(num_heads / KVH);
  const Cache c{k_cache.data_ptr<float>(), v_cache.data_ptr<float>(), k_cache.size(1), BS, D};
  auto out = torch::empty({T, num_heads * D}, q.options());
  const float* qp = q.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  const int32_t* seq = token_seq.data_ptr<int32_t>();
  const int32_t* pos = token_pos.data_ptr<int32_t>();
  const int64_t qstride = q.stride(0), tstride = block_tables.size(1);
  at::parallel_for(0, T * KVH, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(G * D);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t t = item / KVH, h = item % KVH;
      const int64_t hi = pos[t] + 1, lo = window > 0 ? std::max<int64_t>(0, hi - window) : 0;
      attend(qp + t * qstride + h * G * D, op + t * num_heads * D + h * G * D, c, h, tables + seq[t] * tstride, lo,
             hi, G, static_cast<float>(scale), acc.data());
    }
  });
  return out;
}

// Write each token's K and V ([T, kv_heads * D], row stride any) into its slot (block * block_size + offset).
void write_kv(torch::Tensor k, torch::Tensor v, torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor slots) {
  TORCH_CHECK(k.stride(1) == 1 && v.stride(1) == 1 && k.scalar_type() == torch::kFloat32, "k, v: float32, rows dense");
  TORCH_CHECK(slots.scalar_type() == torch::kInt64 && slots.is_contiguous(), "slots: int64");
  const int64_t T = k.size(0), KVH = k_cache.size(0), NB = k_cache.size(1), D = k_cache.size(2), BS = k_cache.size(3);
  TORCH_CHECK(k.size(1) == KVH * D && v.size(1) == KVH * D, "k / v do not match the cache");
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  float* kc = k_cache.data_ptr<float>();
  float* vc = v_cache.data_ptr<float>();
  const int64_t* sl = slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t) {
    const int64_t blk = sl[t] / BS, off = sl[t] % BS;
    TORCH_CHECK(blk >= 0 && blk < NB, "slot out of range");
    for (int64_t h = 0; h < KVH; ++h) {
      const float* ks = kp + t * k.stride(0) + h * D;
      float* kd = kc + ((h * NB + blk) * D) * BS + off;
      for (int64_t d = 0; d < D; ++d) kd[d * BS] = ks[d];
      std::copy(vp + t * v.stride(0) + h * D, vp + t * v.stride(0) + (h + 1) * D, vc + ((h * NB + blk) * BS + off) * D);
    }
  }
}
