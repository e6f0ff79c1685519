// Paged attention over the KV cache in place: no gathered copy of any sequence's context.
//
// Cache layout, per layer (float32, or float16 / bfloat16 with --kv-cache-dtype: converted to float32 as it is
// loaded, so only the stored values round; except bfloat16 on a CPU with avx512_bf16, below): K as [kv_heads,
// blocks, head_dim, block_size] (each block transposed, so the scores of W keys are one vector: sum_d q[d] *
// K[d, keys]) and V as [kv_heads, blocks, block_size, head_dim]. bfloat16 stores pairs, the operand layout of
// vdpbf16ps: K as [kv_heads, blocks, head_dim / 2, block_size, 2] (dimensions 2p, 2p + 1 of a key side by side)
// and V as [kv_heads, blocks, block_size / 2, head_dim, 2] (keys 2i, 2i + 1 of a dimension side by side), each
// held as a 4-dim tensor (the last two dimensions merged); block_size even. Every query token attends keys [lo, pos] of its own sequence, lo = pos - window + 1 for a
// sliding window, else 0: decodes and prefill chunks (over their cached prefix) are the same loop.
//
// A row is one query head of one token. The rows of up to kTileRows (a tile: consecutive tokens of one
// sequence, the query heads of one KV head) share each group of kGroup keys while it is in L1: scores of
// the tile's rows, one online-softmax update per row (flash-attention style), then P @ V. Each row's
// arithmetic is fixed: it visits the groups that meet its [lo, pos] in order, with the same accumulation
// order whatever else is in its tile or register block, so a token's output does not depend on the
// batch, on how its prompt was chunked, or on the tile it lands in (a decode is a tile of one token).
//
// A bfloat16 cache on a CPU with avx512_bf16 multiplies in bfloat16 (vdpbf16ps: pairs of exact products summed
// in float32, 4x the fp32 FMA rate on Zen 5), as llama.cpp's flash attention does in its cache's type: q is
// rounded to bfloat16 for q . K, the softmax weights p for p @ V (l sums the rounded p). Rows stay fixed-order.

#include "ops.h"
#include "simd.h"

#include "parallel.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

using S = Simd;
constexpr int W = S::W;
constexpr int kGroup = 16;           // keys per softmax update (within one block)
constexpr int kNK = kGroup / W;      // vectors per group: 2 on AVX2, 1 on AVX-512
constexpr int kChains = 2 / kNK;     // QK accumulators per row: 2 vectors or 2 chains over d
constexpr int kRB = 6;               // rows per register block
constexpr int kTileRows = 48;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

struct Row {
  const float* q;
  const uint32_t* qb;  // q in bfloat16 pairs (the bfloat16 dot path only)
  float* o;       // the output row, the P @ V accumulator until the end
  int64_t lo, hi;  // keys [lo, hi)
  float m;
  int first, last;  // this group's valid lanes
  float corr;
  union {  // the group's scores, then its softmax weights p (in bfloat16 on the bfloat16 dot path)
    alignas(64) float s[kGroup];
    uint16_t pb[kGroup];
  };
  alignas(64) float l[W];  // the softmax denominator, lane by lane (one horizontal sum at the end)
};

inline S::F load(const float* p) { return S::load(p); }
inline S::F load(const at::Half* p) { return S::half(p); }

template <typename T>
struct Group {  // kGroup keys [pos, pos + n) of one block, at kt (transposed K) and vb (V)
  const T* kt;
  const T* vb;
  int64_t stride;  // the K block's row stride: block_size
  int n;
};

template <typename T>
constexpr bool kPaired = std::is_same_v<T, at::BFloat16>;  // the pair layout above

template <typename T>
S::F load_keys(const Group<T>& g, int64_t d, int v) {
  const int n = std::min(W, g.n - v * W);
  const int64_t pair = kPaired<T> ? 2 : 1;  // bfloat16: key i of dimension d at 2 i + d % 2 of its pair row
  const T* p = kPaired<T> ? g.kt + (d / 2) * 2 * g.stride + 2 * v * W + d % 2 : g.kt + d * g.stride + v * W;
  if (n >= W) {
    if constexpr (kPaired<T>) return S::bf16_half(p - d % 2, d % 2);
    else return load(p);
  }
  if constexpr (std::is_same_v<T, float>) return S::loadn(p, std::max(n, 0), 0.0f);
  alignas(64) float tmp[W] = {};  // a block shorter than a vector: 16-bit keys one by one
  for (int i = 0; i < n; ++i) tmp[i] = static_cast<float>(p[i * pair]);
  return S::load(tmp);
}

// The bfloat16 dot path, for Cache<at::BFloat16> where the CPU has avx512_bf16 (kDot<T>): Dot<T> is defined
// only then, and used only under `if constexpr (kDot<T>)`.
template <typename T>
struct Dot;
#if defined(__AVX512BF16__)
constexpr bool kBf16Dot = true;
template <>
struct Dot<at::BFloat16> {
  using B = at::BFloat16;
  // 16 pairs. A plain load wherever the mask is full: with masked loads only, a decode over blocks that lie in
  // order ran 1.8x slower on Zen 5 (the hardware prefetcher seemingly does not follow them)
  static __m512i load_pairs(const B* p, __mmask32 m) {
    return m == ~0u ? _mm512_loadu_si512(p) : _mm512_maskz_loadu_epi16(m, p);
  }
  static __m512 dot(__m512 acc, __m512i a, __m512i b) { return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b); }
  static __m512i bcast(const uint16_t* pair) {
    uint32_t w;
    std::memcpy(&w, pair, sizeof w);
    return _mm512_set1_epi32(static_cast<int>(w));
  }
  static __m512 rounded(__m512 x, uint16_t* out) {  // x to bfloat16 at out (nearest even); returns those values
    const __m256i b = (__m256i)_mm512_cvtneps_pbh(x);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), b);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16));
  }
  static void round_q(const float* q, int64_t D, uint32_t* out) {
    for (int64_t d = 0; d < D; d += 16) rounded(_mm512_loadu_ps(q + d), reinterpret_cast<uint16_t*>(out) + d);
  }
  template <int RB>
  static void scores(Row* const* rows, const Group<B>& g, int64_t D, float scale) {
    const uint32_t* q[RB];
    __m512 acc[RB][2];
#pragma GCC unroll 8
    for (int r = 0; r < RB; ++r) {
      q[r] = rows[r]->qb;
      acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    }
    const __mmask32 m = g.n >= 16 ? ~0u : (1u << (2 * g.n)) - 1;  // the group's keys
    for (int64_t d = 0; d < D; d += 4) {  // two chains, each over every other pair of dimensions
      __m512i k[2];
#pragma GCC unroll 2
      for (int a = 0; a < 2; ++a) k[a] = load_pairs(g.kt + (d / 2 + a) * 2 * g.stride, m);
#pragma GCC unroll 8
      for (int r = 0; r < RB; ++r)
#pragma GCC unroll 2
        for (int a = 0; a < 2; ++a) acc[r][a] = dot(acc[r][a], _mm512_set1_epi32(static_cast<int>(q[r][d / 2 + a])), k[a]);
    }
#pragma GCC unroll 8
    for (int r = 0; r < RB; ++r)
      _mm512_store_ps(rows[r]->s, _mm512_mul_ps(_mm512_add_ps(acc[r][0], acc[r][1]), _mm512_set1_ps(scale)));
  }
  // o[d0, d0 + 16 NV) = o * corr + p @ V over keys [first, last) in pairs (i, i + 1), i even: a key outside the
  // range has p = 0 and its V half zeroed (an unwritten slot may hold a NaN).
  template <int RB, int NV>
  static void accumulate(float* const* o, const uint16_t* const* p, const float* corr, const Group<B>& g,
                         int64_t D, int64_t d0, int first, int last) {
    __m512 a[RB][NV];
#pragma GCC unroll 8
    for (int r = 0; r < RB; ++r)
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v) a[r][v] = _mm512_mul_ps(_mm512_loadu_ps(o[r] + d0 + v * 16), _mm512_set1_ps(corr[r]));
    for (int i = first & ~1; i < last; i += 2) {
      const B* v0 = g.vb + i * D + 2 * d0;  // keys i, i + 1 (i even: their pair row starts at i * D)
      const __mmask32 m = (i >= first ? 0x55555555u : 0u) | (i + 1 < last ? 0xAAAAAAAAu : 0u);
      __m512i vv[NV];
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v) vv[v] = load_pairs(v0 + v * 32, m);
#pragma GCC unroll 8
      for (int r = 0; r < RB; ++r) {
        const __m512i pp = bcast(p[r] + i);
#pragma GCC unroll 2
        for (int v = 0; v < NV; ++v) a[r][v] = dot(a[r][v], pp, vv[v]);
      }
    }
#pragma GCC unroll 8
    for (int r = 0; r < RB; ++r)
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v) _mm512_storeu_ps(o[r] + d0 + v * 16, a[r][v]);
  }
};
#else
constexpr bool kBf16Dot = false;
#endif
template <typename T>
constexpr bool kDot = kBf16Dot && std::is_same_v<T, at::BFloat16>;

// Raw scores q . K of RB rows into row.s (scaled).
template <int RB, typename T>
void scores(Row* const* rows, const Group<T>& g, int64_t D, float scale) {
  if constexpr (kDot<T>) {
    Dot<T>::template scores<RB>(rows, g, D, scale);
    return;
  }
  constexpr int A = kChains * kNK;  // accumulators per row: always 2
  const float* q[RB];
  S::F acc[RB][A];
#pragma GCC unroll 8
  for (int r = 0; r < RB; ++r) {
    q[r] = rows[r]->q;
    acc[r][0] = acc[r][1] = S::zero();
  }
  for (int64_t d = 0; d < D; d += kChains) {
    S::F k[A];
#pragma GCC unroll 2
    for (int a = 0; a < A; ++a) k[a] = load_keys(g, d + a / kNK, a % kNK);
#pragma GCC unroll 8
    for (int r = 0; r < RB; ++r) {
      const S::F q0 = S::bcast(q[r] + d);
      const S::F q1 = kChains == 2 ? S::bcast(q[r] + d + 1) : q0;
      acc[r][0] = S::fma(q0, k[0], acc[r][0]);
      acc[r][1] = S::fma(q1, k[1], acc[r][1]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < RB; ++r) {
    if constexpr (kChains == 2) {
      S::store(rows[r]->s, S::mul(S::add(acc[r][0], acc[r][1]), S::set1(scale)));
    } else {
      S::store(rows[r]->s, S::mul(acc[r][0], S::set1(scale)));
      S::store(rows[r]->s + W, S::mul(acc[r][1], S::set1(scale)));
    }
  }
}

// One online-softmax update: s becomes p = exp(s - m) on the valid lanes, exactly 0 elsewhere (and pb p in
// bfloat16, with l summing those values, on the bfloat16 dot path).
template <typename T>
void softmax(Row& r) {
  constexpr float kInf = std::numeric_limits<float>::infinity();
  alignas(64) float lim[kGroup], valid[kGroup];
  const bool full = r.first == 0 && r.last == kGroup;
  if (!full)
    for (int i = 0; i < kGroup; ++i) {
      const bool ok = i >= r.first && i < r.last;
      lim[i] = ok ? kInf : kNegInf;
      valid[i] = ok ? 1.0f : 0.0f;
    }
  S::F sv[kNK];
  float mnew = r.m;
  for (int v = 0; v < kNK; ++v) {
    sv[v] = S::load(r.s + v * W);
    if (!full) sv[v] = S::min(sv[v], S::load(lim + v * W));  // masked lanes -inf, even where a key is NaN
    if (S::any_above(sv[v], r.m)) mnew = std::max(mnew, S::hmax(sv[v]));  // a compare, not a reduction, mostly
  }
  r.corr = mnew == r.m ? 1.0f : std::exp(r.m - mnew);  // the max rarely moves: skip the libm call (exp(0) = 1)
  S::F sum = S::mul(S::load(r.l), S::set1(r.corr));
  for (int v = 0; v < kNK; ++v) {
    S::F p = S::exp(S::sub(sv[v], S::set1(mnew)));
    if (!full) p = S::mul(p, S::load(valid + v * W));
    if constexpr (kDot<T>) p = Dot<T>::rounded(p, r.pb + v * W);  // s is read: pb may take its place
    else S::store(r.s + v * W, p);
    sum = S::add(sum, p);
  }
  S::store(r.l, sum);
  r.m = mnew;
}

// o[d0, d0 + NV W) = o * corr + sum over keys [first, last) of p[i] * V[i], for RB rows.
template <int RB, int NV, typename T>
void accumulate_slice(float* const* o, const float* const* p, const float* corr, const Group<T>& g, int64_t D,
                      int64_t d0, int first, int last) {
  S::F a[RB][NV];
#pragma GCC unroll 8
  for (int r = 0; r < RB; ++r)
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) a[r][v] = S::mul(S::load(o[r] + d0 + v * W), S::set1(corr[r]));
  for (int i = first; i < last; ++i) {
    S::F vv[NV];
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) {
      if constexpr (kPaired<T>) vv[v] = S::bf16_half(g.vb + (i & ~1) * D + 2 * (d0 + v * W), i % 2);
      else vv[v] = load(g.vb + i * D + d0 + v * W);
    }
#pragma GCC unroll 8
    for (int r = 0; r < RB; ++r) {
      const S::F pi = S::bcast(p[r] + i);
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v) a[r][v] = S::fma(pi, vv[v], a[r][v]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < RB; ++r)
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) S::store(o[r] + d0 + v * W, a[r][v]);
}

// P @ V for RB rows with the same valid lanes, in slices of two head_dim vectors (and one odd one).
template <int RB, typename T>
void accumulate(Row* const* rows, const Group<T>& g, int64_t D) {
  const float* p[RB];
  float* o[RB];
  float corr[RB];
#pragma GCC unroll 8
  for (int r = 0; r < RB; ++r) {
    p[r] = rows[r]->s;
    o[r] = rows[r]->o;
    corr[r] = rows[r]->corr;
  }
  const int first = rows[0]->first, last = rows[0]->last;
  int64_t d0 = 0;
  if constexpr (kDot<T>) {
    const uint16_t* pb[RB];
#pragma GCC unroll 8
    for (int r = 0; r < RB; ++r) pb[r] = rows[r]->pb;
    for (; d0 + 2 * W <= D; d0 += 2 * W) Dot<T>::template accumulate<RB, 2>(o, pb, corr, g, D, d0, first, last);
    if (d0 < D) Dot<T>::template accumulate<RB, 1>(o, pb, corr, g, D, d0, first, last);
    return;
  }
  for (; d0 + 2 * W <= D; d0 += 2 * W) accumulate_slice<RB, 2, T>(o, p, corr, g, D, d0, first, last);
  if (d0 < D) accumulate_slice<RB, 1, T>(o, p, corr, g, D, d0, first, last);
}

template <template <int> class Op, typename... A>
void in_blocks(Row* const* rows, int n, A&&... args) {  // Op over rows in register blocks of up to kRB
  for (; n >= kRB; rows += kRB, n -= kRB) Op<kRB>::run(rows, args...);
  switch (n) {
    case 5: Op<5>::run(rows, args...); break;
    case 4: Op<4>::run(rows, args...); break;
    case 3: Op<3>::run(rows, args...); break;
    case 2: Op<2>::run(rows, args...); break;
    case 1: Op<1>::run(rows, args...); break;
    default: break;
  }
}
template <int RB>
struct Scores {
  template <typename T>
  static void run(Row* const* rows, const Group<T>& g, int64_t D, float scale) { scores<RB>(rows, g, D, scale); }
};
template <int RB>
struct Accumulate {
  template <typename T>
  static void run(Row* const* rows, const Group<T>& g, int64_t D) { accumulate<RB>(rows, g, D); }
};

template <typename T>
struct Cache {
  const T* k;
  const T* v;
  int64_t blocks, block_size, head_dim;
};

// A thread's buffers, reused by every tile it takes (no allocation per tile, chunk, layer and step).
struct Scratch {
  std::vector<Row> tile;
  std::vector<Row*> all, active, full, part;  // the tile; the rows that meet a group; with all or some of its keys
  std::vector<uint32_t> qb;              // the rows' q in bfloat16 pairs (the bfloat16 dot path)
};

// All rows of one tile (same sequence, same KV head) over the groups of keys any of them attends.
template <typename T>
void attend_tile(Scratch& sc, const Cache<T>& c, int64_t kvh, const int32_t* table, float scale) {
  std::vector<Row>& tile = sc.tile;
  std::vector<Row*>& active = sc.active;
  std::vector<Row*>& full = sc.full;
  std::vector<Row*>& part = sc.part;
  const int64_t D = c.head_dim, BS = c.block_size;
  int64_t lo = tile[0].lo, hi = tile[0].hi;
  for (Row& r : tile) {
    lo = std::min(lo, r.lo);
    hi = std::max(hi, r.hi);
    r.m = kNegInf;
    S::store(r.l, S::zero());
    std::fill(r.o, r.o + D, 0.0f);
  }
  if constexpr (kDot<T>) {
    sc.qb.resize(tile.size() * D / 2);
    for (size_t i = 0; i < tile.size(); ++i) {
      Dot<T>::round_q(tile[i].q, D, sc.qb.data() + i * D / 2);
      tile[i].qb = sc.qb.data() + i * D / 2;
    }
  }
  int64_t max_lo = tile[0].lo, min_hi = tile[0].hi;  // keys [max_lo, min_hi): every row's
  for (Row& r : tile) {
    max_lo = std::max(max_lo, r.lo);
    min_hi = std::min(min_hi, r.hi);
  }
  sc.all.clear();
  for (Row& r : tile) sc.all.push_back(&r);
  for (int64_t start = lo / BS * BS; start < hi; start += BS) {
    const int64_t blk = start / BS;
    for (int64_t off = (std::max(lo, start) - start) / kGroup * kGroup; off < BS && start + off < hi; off += kGroup) {
      const int64_t g0 = start + off;
      if (off == 0 && start + BS < hi) {  // the next block's K and V into L1 while this one computes: a decode
        const int64_t next = (kvh * c.blocks + table[blk + 1]) * D * BS;  // reads each block once, cold, and
        const char* kn = reinterpret_cast<const char*>(c.k + next);    // the hardware prefetchers stop at
        const char* vn = reinterpret_cast<const char*>(c.v + next);    // its end (4 KiB fp32)
        for (int64_t b = 0; b < D * BS * static_cast<int64_t>(sizeof(T)); b += 64) {
          _mm_prefetch(kn + b, _MM_HINT_T0);
          _mm_prefetch(vn + b, _MM_HINT_T0);
        }
      }
      const Group<T> g{c.k + ((kvh * c.blocks + table[blk]) * D) * BS + (kPaired<T> ? 2 * off : off),
                    c.v + ((kvh * c.blocks + table[blk]) * BS + off) * D, BS,
                    static_cast<int>(std::min<int64_t>(kGroup, BS - off))};
      if (g0 >= max_lo && g0 + g.n <= min_hi) {  // every row attends every key of the group (most groups)
        for (Row& r : tile) r.first = 0, r.last = g.n;
        in_blocks<Scores>(sc.all.data(), static_cast<int>(sc.all.size()), g, D, scale);
        for (Row& r : tile) softmax<T>(r);
        in_blocks<Accumulate>(sc.all.data(), static_cast<int>(sc.all.size()), g, D);
        continue;
      }
      active.clear();
      full.clear();
      part.clear();
      for (Row& r : tile) {
        if (r.hi <= g0 || r.lo >= g0 + g.n) continue;
        r.first = static_cast<int>(std::max<int64_t>(0, r.lo - g0));
        r.last = static_cast<int>(std::min<int64_t>(g.n, r.hi - g0));
        active.push_back(&r);
        (r.first == 0 && r.last == g.n ? full : part).push_back(&r);  // P @ V in blocks of equal lanes
      }
      in_blocks<Scores>(active.data(), static_cast<int>(active.size()), g, D, scale);
      for (Row* r : active) softmax<T>(*r);
      in_blocks<Accumulate>(full.data(), static_cast<int>(full.size()), g, D);
      for (Row* r : part) accumulate<1>(&r, g, D);
    }
  }
  for (Row& r : tile) {
    const S::F inv = S::set1(1.0f / S::hsum(S::load(r.l)));
    for (int64_t d = 0; d < D; d += W) S::store(r.o + d, S::mul(S::load(r.o + d), inv));
  }
}

}  // namespace

// head_dim and block_size of a K / V cache pair (dtypes checked by the caller; bfloat16 in pairs, above).
static std::pair<int64_t, int64_t> cache_geometry(const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(k.dim() == 4 && v.dim() == 4 && k.is_contiguous() && v.is_contiguous(),
              "caches: contiguous [kv_heads, blocks, ...]");
  const bool paired = k.scalar_type() == at::kBFloat16;
  const int64_t D = paired ? 2 * k.size(2) : k.size(2), BS = paired ? k.size(3) / 2 : k.size(3);
  const bool ok = paired ? k.size(3) % 2 == 0 && v.size(2) * 2 == BS && v.size(3) == 2 * D
                         : v.size(2) == BS && v.size(3) == D;
  TORCH_CHECK(ok && v.size(0) == k.size(0) && v.size(1) == k.size(1),
              "K and V caches do not match each other (bfloat16: in pairs, an even block size)");
  return {D, BS};
}

CacheView cache_view(const at::Tensor& k, const at::Tensor& v) {
  const auto dtype = k.scalar_type();
  TORCH_CHECK((dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16) && v.scalar_type() == dtype,
              "caches: float32, float16 or bfloat16, both the same");
  const auto [D, BS] = cache_geometry(k, v);
  return {k.data_ptr(), v.data_ptr(), dtype, k.size(0), k.size(1), D, BS};
}

// q [T, H * D] (row stride any; wider rows: their first H * D columns, as in a fused qkv row), caches as above; block_tables [B, max_blocks] int32; token_seq / token_pos [T]
// int32: each token's row in block_tables and its position. Returns [T, H * D].
at::Tensor paged_attention(at::Tensor q, at::Tensor k_cache, at::Tensor v_cache, at::Tensor block_tables,
                           at::Tensor token_seq, at::Tensor token_pos, int64_t num_heads, int64_t window,
                           double scale) {
  TORCH_CHECK(q.dim() == 2, "q: float32 [T, H * D], rows dense");
  const int64_t D = cache_geometry(k_cache, v_cache).first;
  at::Tensor out = at::empty({q.size(0), num_heads * D}, q.options());
  paged_attention_into(q, k_cache, v_cache, block_tables, token_seq, token_pos, num_heads, window, scale, out);
  return out;
}

void paged_attention_into(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                          const at::Tensor& block_tables, const at::Tensor& token_seq, const at::Tensor& token_pos,
                          int64_t num_heads, int64_t window, double scale, const at::Tensor& out) {
  TORCH_CHECK(q.dim() == 2 && q.stride(1) == 1 && q.scalar_type() == at::kFloat, "q: float32 [T, H * D], rows dense");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && block_tables.is_contiguous(), "block_tables: int32");
  TORCH_CHECK(token_seq.scalar_type() == at::kInt && token_pos.scalar_type() == at::kInt, "token_*: int32");
  const CacheView c = cache_view(k_cache, v_cache);
  check_attention(c, num_heads);
  const int64_t T = q.size(0), D = c.head_dim;
  TORCH_CHECK(q.size(1) >= num_heads * D, "q does not match the cache's heads");
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.is_contiguous() && out.dim() == 2 && out.size(0) == T &&
              out.size(1) == num_heads * D, "out: contiguous float32 [T, H * D]");
  paged_attention_raw(q.data_ptr<float>(), q.stride(0), T, num_heads, c, block_tables.data_ptr<int32_t>(),
                      block_tables.size(1), token_seq.data_ptr<int32_t>(), token_pos.data_ptr<int32_t>(), window, scale,
                      out.data_ptr<float>());
}

void check_attention(const CacheView& c, int64_t num_heads) {
  TORCH_CHECK(num_heads % c.kv_heads == 0, "q does not match the cache's heads");
  TORCH_CHECK(c.head_dim % W == 0, "head_dim must be a multiple of ", W);
}

void paged_attention_raw(const float* qp, int64_t qstride, int64_t T, int64_t num_heads, const CacheView& cv,
                         const int32_t* tables, int64_t tstride, const int32_t* seq, const int32_t* pos, int64_t window,
                         double scale, float* op) {
  const int64_t KVH = cv.kv_heads, D = cv.head_dim, BS = cv.block_size, G = num_heads / KVH;
  // Tiles: runs of consecutive tokens of one sequence, at most max(1, kTileRows / G) tokens each.
  const int64_t per_tile = std::max<int64_t>(1, kTileRows / G);
  std::vector<int64_t> tiles{0};
  for (int64_t t = 1; t < T; ++t)
    if (seq[t] != seq[t - 1] || t - tiles.back() == per_tile) tiles.push_back(t);
  tiles.push_back(T);
  const int64_t n_tiles = static_cast<int64_t>(tiles.size()) - 1;
  auto attend_all = [&](const auto& c) {  // c: the cache as Cache<float>, Cache<at::Half> or Cache<at::BFloat16>
    tokenmill::parallel_for(0, n_tiles * KVH, 1, [&](int64_t begin, int64_t end) {
      thread_local Scratch sc;  // the pool's threads live as long as the process
      std::vector<Row>& tile = sc.tile;
      for (int64_t item = begin; item < end; ++item) {
        // tiles zigzag (first, last, second, ...): a causal prompt's late tiles cost the most, and the
        // threads take contiguous chunks of items
        const int64_t z = item / KVH, h = item % KVH, ti = z % 2 == 0 ? z / 2 : n_tiles - 1 - z / 2;
        tile.clear();
        for (int64_t t = tiles[ti]; t < tiles[ti + 1]; ++t) {
          const int64_t hi = pos[t] + 1, lo = window > 0 ? std::max<int64_t>(0, hi - window) : 0;
          for (int64_t g = 0; g < G; ++g) {
            Row r;
            r.q = qp + t * qstride + (h * G + g) * D;
            r.o = op + t * num_heads * D + (h * G + g) * D;
            r.lo = lo;
            r.hi = hi;
            tile.push_back(r);
          }
        }
        attend_tile(sc, c, h, tables + seq[tiles[ti]] * tstride, static_cast<float>(scale));
      }
    });
  };
  if (cv.dtype == at::kHalf)
    attend_all(Cache<at::Half>{static_cast<const at::Half*>(cv.k), static_cast<const at::Half*>(cv.v), cv.blocks, BS, D});
  else if (cv.dtype == at::kBFloat16)
    attend_all(Cache<at::BFloat16>{static_cast<const at::BFloat16*>(cv.k), static_cast<const at::BFloat16*>(cv.v),
                                   cv.blocks, BS, D});
  else
    attend_all(Cache<float>{static_cast<const float*>(cv.k), static_cast<const float*>(cv.v), cv.blocks, BS, D});
}

// Write each token's K and V (float32 rows: K at kp, V at vp, ks / vs apart) into its slot (block * block_size +
// offset) of a float32, float16 or bfloat16 cache (rounded to nearest even; bfloat16 in pairs).
template <typename T>
static void store_kv(const float* kp, int64_t ks, const float* vp, int64_t vs, int64_t rows, const CacheView& c,
                     const int64_t* sl) {
  const int64_t KVH = c.kv_heads, NB = c.blocks, D = c.head_dim, BS = c.block_size;
  T* kc = static_cast<T*>(c.k);
  T* vc = static_cast<T*>(c.v);
  for (int64_t t = 0; t < rows; ++t) {
    const int64_t blk = sl[t] / BS, off = sl[t] % BS;
    TORCH_CHECK(blk >= 0 && blk < NB, "slot out of range");
    for (int64_t h = 0; h < KVH; ++h) {
      const float* kr = kp + t * ks + h * D;
      const float* vr = vp + t * vs + h * D;
      T* kd = kc + ((h * NB + blk) * D) * BS;  // the block
      T* vd = vc + ((h * NB + blk) * BS) * D;
      if constexpr (kPaired<T>) {
        for (int64_t d = 0; d < D; ++d) kd[(d / 2) * 2 * BS + 2 * off + d % 2] = static_cast<T>(kr[d]);
        for (int64_t d = 0; d < D; ++d) vd[(off / 2) * 2 * D + 2 * d + off % 2] = static_cast<T>(vr[d]);
      } else {
        for (int64_t d = 0; d < D; ++d) kd[d * BS + off] = static_cast<T>(kr[d]);
        for (int64_t d = 0; d < D; ++d) vd[off * D + d] = static_cast<T>(vr[d]);
      }
    }
  }
}

void write_kv_raw(const float* kp, int64_t ks, const float* vp, int64_t vs, int64_t rows, const CacheView& c,
                  const int64_t* slots) {
  if (c.dtype == at::kHalf) store_kv<at::Half>(kp, ks, vp, vs, rows, c, slots);
  else if (c.dtype == at::kBFloat16) store_kv<at::BFloat16>(kp, ks, vp, vs, rows, c, slots);
  else store_kv<float>(kp, ks, vp, vs, rows, c, slots);
}

void write_kv(at::Tensor k, at::Tensor v, at::Tensor k_cache, at::Tensor v_cache, at::Tensor slots) {
  TORCH_CHECK(k.stride(1) == 1 && v.stride(1) == 1 && k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat,
              "k, v: float32, rows dense");
  const CacheView c = cache_view(k_cache, v_cache);
  TORCH_CHECK(k.size(1) == c.kv_heads * c.head_dim && v.sizes() == k.sizes(), "k / v do not match the cache");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.is_contiguous() && slots.numel() >= k.size(0), "slots: int64");
  write_kv_raw(k.data_ptr<float>(), k.stride(0), v.data_ptr<float>(), v.stride(0), k.size(0), c,
               slots.data_ptr<int64_t>());
}
