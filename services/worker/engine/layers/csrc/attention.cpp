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
// Per chunk of W keys: G score vectors (no horizontal sums: K is stored transposed), one online-softmax
// update per head, then P @ V with the accumulators of G heads x kDV vectors held in registers.
constexpr int kDV = 4;  // head_dim vectors per P @ V pass

template <int G>
void attend(const float* q, float* out, const Cache& c, int64_t kvh, const int32_t* table, int64_t lo, int64_t hi,
            float scale, float* acc) {
  const int64_t D = c.head_dim, BS = c.block_size;
  const float* kbase = c.k + kvh * c.blocks * D * BS;
  const float* vbase = c.v + kvh * c.blocks * BS * D;
  float m[G], l[G], corr[G];
  alignas(64) float p[G][W];
  alignas(64) float lim[W], valid[W];
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
      S::F s0[G], s1[G];
      for (int g = 0; g < G; ++g) s0[g] = s1[g] = S::zero();
      for (int64_t d = 0; d < D; d += 2) {  // two chains per head: the FMA latency, not throughput, binds here
        const float* k0 = kt + d * BS + cs;
        const S::F ka = n == W ? S::load(k0) : S::loadn(k0, n, 0.0f);
        const S::F kb = n == W ? S::load(k0 + BS) : S::loadn(k0 + BS, n, 0.0f);
        for (int g = 0; g < G; ++g) {
          s0[g] = S::fma(S::bcast(q + g * D + d), ka, s0[g]);
          s1[g] = S::fma(S::bcast(q + g * D + d + 1), kb, s1[g]);
        }
      }
      for (int i = 0; i < W; ++i) {
        const bool ok = i >= first && i < last;
        lim[i] = ok ? std::numeric_limits<float>::infinity() : kNegInf;
        valid[i] = ok ? 1.0f : 0.0f;
      }
      const S::F limv = S::load(lim), validv = S::load(valid);
      for (int g = 0; g < G; ++g) {
        const S::F sv = S::min(S::mul(S::add(s0[g], s1[g]), S::set1(scale)), limv);  // masked lanes: -inf
        const float mnew = std::max(m[g], S::hmax(sv));
        corr[g] = std::exp(m[g] - mnew);
        const S::F pv = S::mul(S::exp(S::sub(sv, S::set1(mnew))), validv);
        l[g] = l[g] * corr[g] + S::hsum(pv);
        m[g] = mnew;
        S::store(p[g], pv);
      }
      for (int64_t d0 = 0; d0 < D; d0 += kDV * W) {
        const int nv = static_cast<int>(std::min<int64_t>(kDV, (D - d0) / W));
        S::F a[G][kDV];
        for (int g = 0; g < G; ++g)
          for (int v = 0; v < kDV; ++v)
            if (v < nv) a[g][v] = S::mul(S::load(acc + g * D + d0 + v * W), S::set1(corr[g]));
        for (int i = first; i < last; ++i) {
          const float* vrow = vb + (cs + i) * D + d0;
          for (int v = 0; v < kDV; ++v) {
            if (v >= nv) break;
            const S::F vv = S::load(vrow + v * W);
            for (int g = 0; g < G; ++g) a[g][v] = S::fma(S::set1(p[g][i]), vv, a[g][v]);
          }
        }
        for (int g = 0; g < G; ++g)
          for (int v = 0; v < kDV; ++v)
            if (v < nv) S::store(acc + g * D + d0 + v * W, a[g][v]);
      }
    }
    j = start + BS;
  }
  for (int g = 0; g < G; ++g) {
    const S::F inv = S::set1(1.0f / l[g]);
    for (int64_t d = 0; d < D; d += W) S::store(out + g * D + d, S::mul(S::load(acc + g * D + d), inv));
  }
}

using AttendFn = void (*)(const float*, float*, const Cache&, int64_t, const int32_t*, int64_t, int64_t, float, float*);

AttendFn attend_for(int G) {
  switch (G) {
    case 1: return attend<1>;
    case 2: return attend<2>;
    case 3: return attend<3>;
    case 4: return attend<4>;
    case 5: return attend<5>;
    case 6: return attend<6>;
    case 7: return attend<7>;
    case 8: return attend<8>;
    default: TORCH_CHECK(false, "at most 8 query heads per KV head, got ", G);
  }
}

}  // namespace

// q [T, H * D] (row stride any), caches as above; block_tables [B, max_blocks] int32; token_seq / token_pos [T]
// int32: each token's row in block_tables and its position. Returns [T, H * D].
at::Tensor paged_attention(at::Tensor q, at::Tensor k_cache, at::Tensor v_cache, at::Tensor block_tables,
                              at::Tensor token_seq, at::Tensor token_pos, int64_t num_heads, int64_t window,
                              double scale) {
  TORCH_CHECK(q.dim() == 2 && q.stride(1) == 1 && q.scalar_type() == at::kFloat, "q: float32 [T, H * D], rows dense");
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.dim() == 4 && k_cache.is_contiguous() && v_cache.is_contiguous(),
              "caches: contiguous [kv_heads, blocks, ...]");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && block_tables.is_contiguous(), "block_tables: int32");
  TORCH_CHECK(token_seq.scalar_type() == at::kInt && token_pos.scalar_type() == at::kInt, "token_*: int32");
  const int64_t T = q.size(0), KVH = k_cache.size(0), D = k_cache.size(2), BS = k_cache.size(3);
  TORCH_CHECK(q.size(1) == num_heads * D && num_heads % KVH == 0, "q does not match the cache's heads");
  TORCH_CHECK(D % W == 0, "head_dim must be a multiple of ", W);
  const int G = static_cast<int>(num_heads / KVH);
  const AttendFn fn = attend_for(G);
  const Cache c{k_cache.data_ptr<float>(), v_cache.data_ptr<float>(), k_cache.size(1), BS, D};
  auto out = at::empty({T, num_heads * D}, q.options());
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
      fn(qp + t * qstride + h * G * D, op + t * num_heads * D + h * G * D, c, h, tables + seq[t] * tstride, lo, hi,
         static_cast<float>(scale), acc.data());
    }
  });
  return out;
}

// Write each token's K and V ([T, kv_heads * D], row stride any) into its slot (block * block_size + offset).
void write_kv(at::Tensor k, at::Tensor v, at::Tensor k_cache, at::Tensor v_cache, at::Tensor slots) {
  TORCH_CHECK(k.stride(1) == 1 && v.stride(1) == 1 && k.scalar_type() == at::kFloat, "k, v: float32, rows dense");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.is_contiguous(), "slots: int64");
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
