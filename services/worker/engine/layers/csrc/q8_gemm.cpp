// Quantized linear layers with int8 activations: y[M, N] = q8(x)[M, K] @ dequant(W)^T on integer units.
//
// Activations are quantized per row in blocks of 32 (d = max|x| / 127, q = round(x / d)), as llama.cpp's
// Q8 activations are. Per block the dot product of the int8 activations with the weights' integer codes
// is an exact int32 sum, whichever unit computes it: AMX tiles (TDPBSUD / TDPBSSD, 16 rows x 16 columns x 32)
// for many rows, AVX512-VNNI (VPDPBUSD) for few, or AVX2's VPMADDUBSW where there is neither (q8_avx2.cpp).
// Only the float epilogue rounds, and it is the same code for all, so a row's result is bitwise independent
// of the unit, of M, and of the other rows:
//   t = float(isum) * dx[m, block];  acc = first block of the group ? t : acc + t;
//   at the group's end: out = fma(acc, scale, out) (+ fma(min, sum(x over the group), out)).
//
// Weights come in the "quad" layout (layers/quant.py): per panel of 16 output rows, the codes of 4
// consecutive input columns of one row side by side (a 32-bit lane), the 16 rows next to each other:
// 64 bytes per 4 columns, the layout of an AMX B tile and of a VPDPBUSD operand. 4-bit codes hold columns
// k..k+3 in the low nibbles and k+4..k+7 in the high nibbles of one 64-byte vector.

#include "ops.h"
#include "parallel.h"
#include "q8.h"

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <vector>

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define TOKENMILL_Q8 1
#endif
#if defined(TOKENMILL_Q8) && defined(__AMX_TILE__) && defined(__AMX_INT8__)
#define TOKENMILL_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace {

using q8::kBlock;
using q8::kPanel;

#ifdef TOKENMILL_Q8

using Q8Weights = q8::Weights;
using Q8Acts = q8::Acts;

// The shared epilogue of one block (see the top of the file): set up once per block and panel, applied per
// row to that row's 16 int32 sums.
template <bool ONE>
struct Epilogue : q8::BlockPos<ONE> {
  using Pos = q8::BlockPos<ONE>;
  using Pos::first, Pos::last, Pos::b, Pos::g, Pos::nb, Pos::ng, Pos::off;
  __m512 d, mn;
  const Q8Acts& a;
  Epilogue(const Q8Weights& w, const Q8Acts& acts, int64_t block, int64_t panel) : Pos(w, block, panel), a(acts) {
    d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.scales + off)));
    mn = w.mins ? _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.mins + off)))
                : _mm512_setzero_ps();
  }
  template <bool MIN>
  inline void apply(__m512i isum, int64_t m, __m512& acc, __m512& out) const {
    const __m512 t = _mm512_mul_ps(_mm512_cvtepi32_ps(isum), _mm512_set1_ps(a.d[m * nb + b]));
    acc = first ? t : _mm512_add_ps(acc, t);
    if (last) {
      out = _mm512_fmadd_ps(acc, d, out);
      if constexpr (MIN) out = _mm512_fmadd_ps(mn, _mm512_set1_ps(a.xsum[m * ng + g]), out);
    }
  }
};

inline void store_row(float* y, const __m512& out, const float* bias) {
  _mm512_storeu_ps(y, bias ? _mm512_add_ps(out, _mm512_loadu_ps(bias)) : out);
}

// VPDPBUSD: one panel x MT rows, one block of 32 columns at a time.
template <int BITS, bool MIN, bool ONE, bool PREFETCH, int MT>
void vnni_tile(const Q8Weights& w, const Q8Acts& a, int64_t p, int64_t m0, float* y, int64_t ldy, const float* bias) {
  __m512 acc[MT], out[MT];
  for (int m = 0; m < MT; ++m) acc[m] = out[m] = _mm512_setzero_ps();
  const __m512i low = _mm512_set1_epi8(0x0F);
  const uint8_t* codes = w.codes + p * w.pstride();
  for (int64_t b = 0; b < w.K / kBlock; ++b) {
    if constexpr (PREFETCH) q8::prefetch_block<BITS>(codes, b);
    __m512i isum[MT];
    for (int m = 0; m < MT; ++m) isum[m] = _mm512_setzero_si512();
    const int8_t* xb = a.q + m0 * a.K + b * kBlock;
    if constexpr (BITS == 4) {
      for (int j = 0; j < 4; ++j) {  // 8 columns per 64-byte vector
        const __m512i raw = _mm512_loadu_si512(codes + (b * 4 + j) * 64);
        const __m512i lo = _mm512_and_si512(raw, low), hi = _mm512_and_si512(_mm512_srli_epi16(raw, 4), low);
        for (int m = 0; m < MT; ++m) {
          const int8_t* x = xb + m * a.K + j * 8;
          isum[m] = _mm512_dpbusd_epi32(isum[m], lo, _mm512_set1_epi32(*reinterpret_cast<const int32_t*>(x)));
          isum[m] = _mm512_dpbusd_epi32(isum[m], hi, _mm512_set1_epi32(*reinterpret_cast<const int32_t*>(x + 4)));
        }
      }
    } else {  // signed codes: x + 128 (q8_linear_raw's offset rows) as the unsigned operand, then per block
      __m512i wsum = _mm512_setzero_si512();  // 128 * sum(w) taken back off: the same exact int32 sums as x . w
      for (int j = 0; j < 8; ++j) {
        const __m512i raw = _mm512_loadu_si512(codes + (b * 8 + j) * 64);
        wsum = _mm512_dpbusd_epi32(wsum, _mm512_set1_epi8(1), raw);
        for (int m = 0; m < MT; ++m) {
          const __m512i x = _mm512_set1_epi32(*reinterpret_cast<const int32_t*>(xb + m * a.K + j * 4));
          isum[m] = _mm512_dpbusd_epi32(isum[m], x, raw);
        }
      }
      const __m512i off = _mm512_slli_epi32(wsum, 7);
      for (int m = 0; m < MT; ++m) isum[m] = _mm512_sub_epi32(isum[m], off);
    }
    const Epilogue<ONE> ep(w, a, b, p);
    for (int m = 0; m < MT; ++m) ep.template apply<MIN>(isum[m], m0 + m, acc[m], out[m]);
  }
  for (int m = 0; m < MT; ++m)
    store_row(y + (m0 + m) * ldy + p * kPanel, out[m], bias ? bias + p * kPanel : nullptr);
}

// The tile for the mt (<= MT) rows left. Only a panel's first row tile prefetches (in a decode the only one):
// a branch in every tile's block loop cost the many-row case ~2 %.
template <int BITS, bool MIN, bool ONE, int MT>
void vnni_rows(const Q8Weights& w, const Q8Acts& a, int64_t p, int64_t m0, int64_t mt, float* y, int64_t ldy,
               const float* bias) {
  if constexpr (MT > 1)
    if (mt < MT) return vnni_rows<BITS, MIN, ONE, MT - 1>(w, a, p, m0, mt, y, ldy, bias);
  if (m0 == 0) vnni_tile<BITS, MIN, ONE, true, MT>(w, a, p, m0, y, ldy, bias);
  else vnni_tile<BITS, MIN, ONE, false, MT>(w, a, p, m0, y, ldy, bias);
}

// One panel at a time, even at 1 or 2 rows: with the prefetch, 4 panels side by side (4 streams) read a 2-row
// decode's weights 1.3x (q4_1 layers) to 1.5x (q8_0 LM head) slower on Zen 4 (a variant, 2026-12-06).
template <int BITS, bool MIN, bool ONE>
void vnni_gemm(const Q8Weights& w, const Q8Acts& a, int64_t M, float* y, const float* bias) {
  constexpr int MT = 4;  // 6 or 8 rows (registers allow 8) measured the same
  const int64_t ldy = w.P * kPanel;
  tokenmill::parallel_for(0, w.P, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p)
      for (int64_t m0 = 0; m0 < M; m0 += MT)
        vnni_rows<BITS, MIN, ONE, MT>(w, a, p, m0, std::min<int64_t>(MT, M - m0), y, ldy, bias);
  });
}

#ifdef TOKENMILL_AMX

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// tmm0..3: C (row tile r, panel q) = tmm(2r + q); tmm4, tmm5: A row tiles; tmm6, tmm7: B panels.
void load_tile_config() {
  TileConfig c;
  for (int t = 0; t < 4; ++t) c.rows[t] = 16, c.colsb[t] = 64;
  for (int t = 4; t < 6; ++t) c.rows[t] = 16, c.colsb[t] = kBlock;
  for (int t = 6; t < 8; ++t) c.rows[t] = kBlock / 4, c.colsb[t] = 64;
  _tile_loadconfig(&c);
}

// Two panels x 32 rows per step; 4-bit panels are unpacked to bytes once per call, then reused by every row tile.
template <int BITS, bool MIN, bool ONE>
void amx_gemm(const Q8Weights& w, const Q8Acts& a, int64_t M, float* y, const float* bias) {
  const int64_t ldy = w.P * kPanel, nb = w.K / kBlock, pairs = (w.P + 1) / 2;
  tokenmill::parallel_for(0, pairs, 1, [&](int64_t begin, int64_t end) {
    load_tile_config();
    std::vector<uint8_t> unpacked(BITS == 4 ? 2 * nb * 512 : 0);
    alignas(64) int32_t c[4][16][16];
    __m512 acc[32][2], out[32][2];
    for (int64_t pair = begin; pair < end; ++pair) {
      const int64_t p0 = pair * 2, np = std::min<int64_t>(2, w.P - p0);
      const uint8_t* bsrc[2];
      for (int q = 0; q < np; ++q) {
        const uint8_t* codes = w.codes + (p0 + q) * w.pstride();
        if constexpr (BITS == 4) {
          uint8_t* dst = unpacked.data() + q * nb * 512;
          const __m512i low = _mm512_set1_epi8(0x0F);
          for (int64_t v = 0; v < nb * 4; ++v) {
            const __m512i raw = _mm512_loadu_si512(codes + v * 64);
            _mm512_storeu_si512(dst + v * 128, _mm512_and_si512(raw, low));
            _mm512_storeu_si512(dst + v * 128 + 64, _mm512_and_si512(_mm512_srli_epi16(raw, 4), low));
          }
          bsrc[q] = dst;
        } else {
          bsrc[q] = codes;
        }
      }
      for (int64_t m0 = 0; m0 < M; m0 += 32) {
        const int rt = M - m0 > 16 ? 2 : 1;
        for (int i = 0; i < 32; ++i) acc[i][0] = acc[i][1] = out[i][0] = out[i][1] = _mm512_setzero_ps();
        for (int64_t b = 0; b < nb; ++b) {
          _tile_zero(0);
          _tile_zero(1);
          _tile_zero(2);
          _tile_zero(3);
          const int8_t* xa = a.q + m0 * a.K + b * kBlock;
          _tile_loadd(4, xa, a.K);
          _tile_loadd(6, bsrc[0] + b * 512, 64);
          if (np == 2) _tile_loadd(7, bsrc[1] + b * 512, 64);
          if (rt == 2) _tile_loadd(5, xa + 16 * a.K, a.K);
          if constexpr (BITS == 4) {
            _tile_dpbsud(0, 4, 6);
            if (np == 2) _tile_dpbsud(1, 4, 7);
            if (rt == 2) _tile_dpbsud(2, 5, 6);
            if (rt == 2 && np == 2) _tile_dpbsud(3, 5, 7);
          } else {
            _tile_dpbssd(0, 4, 6);
            if (np == 2) _tile_dpbssd(1, 4, 7);
            if (rt == 2) _tile_dpbssd(2, 5, 6);
            if (rt == 2 && np == 2) _tile_dpbssd(3, 5, 7);
          }
          _tile_stored(0, c[0], 64);
          if (np == 2) _tile_stored(1, c[1], 64);
          if (rt == 2) _tile_stored(2, c[2], 64);
          if (rt == 2 && np == 2) _tile_stored(3, c[3], 64);
          const int64_t rows = std::min<int64_t>(32, M - m0);
          for (int q = 0; q < np; ++q) {
            const Epilogue<ONE> ep(w, a, b, p0 + q);
            for (int64_t i = 0; i < rows; ++i)
              ep.template apply<MIN>(_mm512_load_si512(c[2 * (i / 16) + q][i % 16]), m0 + i, acc[i][q], out[i][q]);
          }
        }
        for (int64_t i = 0; i < std::min<int64_t>(32, M - m0); ++i)
          for (int q = 0; q < np; ++q)
            store_row(y + (m0 + i) * ldy + (p0 + q) * kPanel, out[i][q], bias ? bias + (p0 + q) * kPanel : nullptr);
      }
    }
    _tile_release();
  });
}

#endif  // TOKENMILL_AMX

#endif  // TOKENMILL_Q8

// One row's activations in blocks of 32: d = max|x| / 127 per block, q = round(x / d) (half to even, as
// torch.round). max is exact and each lane rounds alone, so the AVX-512 and AVX2 versions give the same bytes.
// offset: stored as q + 128 (q ^ 0x80, unsigned), the operand VNNI takes against 8-bit codes (vnni_tile).
void quantize_row(const float* x, int64_t K, int8_t* q, float* d, bool offset) {
  for (int64_t b = 0; b < K / kBlock; ++b, x += kBlock, q += kBlock) {
#if defined(__AVX512F__)
    const __m512 v0 = _mm512_loadu_ps(x), v1 = _mm512_loadu_ps(x + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
#else
    __m256 v[4], m = _mm256_setzero_ps();
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (int i = 0; i < 4; ++i) v[i] = _mm256_loadu_ps(x + 8 * i), m = _mm256_max_ps(m, _mm256_andnot_ps(sign, v[i]));
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    const float amax = _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
#endif
    const float inv = amax >= 1.17549435e-38f ? 127.0f / amax : 0.0f;  // FLT_MIN
    d[b] = amax / 127.0f;
#if defined(__AVX512F__)
    const __m512 s = _mm512_set1_ps(inv);
    const __m128i flip = _mm_set1_epi8(offset ? static_cast<char>(0x80) : 0);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q),
                     _mm_xor_si128(_mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(v0, s))), flip));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + 16),
                     _mm_xor_si128(_mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(v1, s))), flip));
#else
    const __m256 s = _mm256_set1_ps(inv);
    __m256i i32[4];
    for (int i = 0; i < 4; ++i) i32[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], s));
    const __m256i i16 = _mm256_packs_epi16(_mm256_packs_epi32(i32[0], i32[1]), _mm256_packs_epi32(i32[2], i32[3]));
    // the packs interleave 128-bit lanes: put the 4-byte groups back in order
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q),
                        _mm256_xor_si256(_mm256_permutevar8x32_epi32(i16, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)),
                                         _mm256_set1_epi8(offset ? static_cast<char>(0x80) : 0)));
#endif
  }
}

}  // namespace

// Ask the OS for the AMX tile state (Linux: arch_prctl ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA); true when granted.
bool amx_enable() {
#ifdef TOKENMILL_AMX
  static const bool granted = syscall(SYS_arch_prctl, 0x1023, 18) == 0;
  return granted;
#else
  return false;
#endif
}

// The integer units this build has, best first: "amx,vnni,avx2", "vnni,avx2" or "avx2".
std::string q8_units() {
#if defined(TOKENMILL_AMX)
  return "amx,vnni,avx2";
#elif defined(TOKENMILL_Q8)
  return "vnni,avx2";
#else
  return "avx2";
#endif
}

// The integer unit's issue rate, for bench kernels' roofs: on every torch thread, `iters` rounds of 8 independent
// dot-product instructions on register data (-1, AVX2: VPMADDUBSW + VPADDW, as q8_avx2.cpp accumulates a block;
// 0, VNNI: VPDPBUSD). Returns the multiply-adds done over all threads.
int64_t q8_peak(int64_t unit, int64_t iters) {
  TORCH_CHECK(unit == -1 || unit == 0, "q8_peak: unit -1 (AVX2) or 0 (VNNI)");
#ifndef TOKENMILL_Q8
  TORCH_CHECK(unit == -1, "this build has no AVX512-VNNI");
#endif
  static volatile int32_t sink;  // the sums go somewhere, so the loop is not optimised away
  const int64_t threads = at::get_num_threads();
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      if (unit == -1) {
        __m256i acc[8], w[8], x = _mm256_set1_epi8(static_cast<char>(t + 1));
        for (int k = 0; k < 8; ++k) acc[k] = _mm256_setzero_si256(), w[k] = _mm256_set1_epi8(static_cast<char>(k));
        for (int64_t i = 0; i < iters; ++i) {
          for (int k = 0; k < 8; ++k) acc[k] = _mm256_add_epi16(acc[k], _mm256_maddubs_epi16(w[k], x));
          __asm__ volatile("" : "+x"(x));  // x may have changed: nothing is hoisted out of the loop
        }
        for (int k = 0; k < 8; ++k) sink = _mm256_extract_epi32(acc[k], 0);
      } else {
#ifdef TOKENMILL_Q8
        __m512i acc[8], w[8], x = _mm512_set1_epi8(static_cast<char>(t + 1));
        for (int k = 0; k < 8; ++k) acc[k] = _mm512_setzero_si512(), w[k] = _mm512_set1_epi8(static_cast<char>(k));
        for (int64_t i = 0; i < iters; ++i) {
          for (int k = 0; k < 8; ++k) acc[k] = _mm512_dpbusd_epi32(acc[k], w[k], x);
          __asm__ volatile("" : "+v"(x));
        }
        for (int k = 0; k < 8; ++k) sink = _mm_cvtsi128_si32(_mm512_castsi512_si128(acc[k]));
#endif
      }
    }
  });
  return threads * iters * 8 * (unit == -1 ? 32 : 64);
}

// x [M, K] float32; codes uint8 [P, ...] in quad layout; scales / mins float16 [P, K / G, 16]; returns
// [M, P * 16]. unit: > 0 AMX tiles from that many rows (VNNI below), 0 VNNI, -1 AVX2. All give the same bits.
at::Tensor q8_linear(at::Tensor x, at::Tensor codes, at::Tensor scales, c10::optional<at::Tensor> mins,
                     c10::optional<at::Tensor> bias, int64_t bits, int64_t group, int64_t unit) {
  TORCH_CHECK(x.dim() == 2 && codes.dim() == 2, "x: [M, K]; codes: [P, *]");
  at::Tensor y = at::empty({x.size(0), codes.size(0) * kPanel}, x.options());
  q8_linear_into(x, codes, scales, mins, bias, bits, group, unit, y);
  return y;
}

void q8_linear_into(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                    const c10::optional<at::Tensor>& mins, const c10::optional<at::Tensor>& bias, int64_t bits,
                    int64_t group, int64_t unit, const at::Tensor& y) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x: contiguous float32 [M, K]");
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.is_contiguous() && codes.dim() == 2, "codes: uint8 [P, *]");
  TORCH_CHECK(scales.scalar_type() == at::kHalf && scales.is_contiguous(), "scales: contiguous float16");
  TORCH_CHECK(bits == 4 || bits == 8, "bits must be 4 or 8");
  const int64_t M = x.size(0), K = x.size(1), P = codes.size(0);
  TORCH_CHECK(K % kBlock == 0 && group % kBlock == 0 && K % group == 0, "K and the group must be multiples of 32");
  TORCH_CHECK(codes.size(1) == K * bits / 8 * kPanel, "codes do not match K");
  TORCH_CHECK(scales.numel() == P * (K / group) * kPanel, "scales do not match K / group");
  const bool has_min = mins.has_value() && mins->defined();
  TORCH_CHECK(has_min == (bits == 4), "4-bit codes need mins (q4_1, int4); 8-bit codes are symmetric");
  if (has_min) TORCH_CHECK(mins->scalar_type() == at::kHalf && mins->is_contiguous() && mins->numel() == scales.numel());
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias)
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == P * kPanel,
                "bias: float32 [P * 16]");
  TORCH_CHECK(unit >= -1, "unit: rows from which AMX serves (> 0), 0 for VNNI, -1 for AVX2");
  const bool amx = unit > 0 && M >= unit;
#ifndef TOKENMILL_AMX
  TORCH_CHECK(unit <= 0, "this build has no AMX");
#else
  TORCH_CHECK(!amx || amx_enable(), "the OS did not grant the AMX tile state");
#endif
#ifndef TOKENMILL_Q8
  TORCH_CHECK(unit == -1, "this build has no AVX512-VNNI: use unit -1 (AVX2)");
#endif

  TORCH_CHECK(y.scalar_type() == at::kFloat && y.is_contiguous() && y.dim() == 2 && y.size(0) == M &&
              y.size(1) == P * kPanel, "out: contiguous float32 [M, P * 16]");
  q8_linear_raw(packed_weights(codes, scales, mins, c10::nullopt, bits, group), x.data_ptr<float>(), M,
                has_bias ? bias->data_ptr<float>() : nullptr, unit, y.data_ptr<float>());
}

// q8_linear_into's work once its operands are checked (the C++ decoder checks a layer's weights once, at
// add_layer: reading each weight tensor's metadata a call cost cache misses, the weight stream having evicted it).
void q8_linear_raw(const q8::Weights& w, const float* xp, int64_t M, const float* b, int64_t unit, float* yp) {
  if (M == 0) return;
  const int64_t K = w.K, group = w.G, bits = w.bits;
  const bool has_min = w.mins != nullptr, amx = unit > 0 && M >= unit;
  // VNNI over 8-bit codes takes x + 128 (x ^ 0x80: unsigned) times the signed codes, one VPDPBUSD a row and 4
  // columns instead of negating x where w < 0 (vnni_tile); AMX and AVX2 take x as it is
  const bool offset = bits == 8 && unit >= 0 && !amx;
  // The quantized activations live in this thread's scratch, reused call to call (a decode step makes ~200
  // calls: 3 allocations and a 32-row memset each were ~4 % of it). AMX reads whole 16-row tiles: its
  // padding rows are zeroed (their sums are never stored).
  const int64_t nb = K / kBlock, ng = K / group, rows = amx ? (M + 31) / 32 * 32 : M;
  thread_local std::vector<int8_t> q;
  thread_local std::vector<float> d, xsum;
  q.resize(rows * K), d.resize(M * nb), xsum.resize(has_min ? M * ng : 0);
  std::fill(q.begin() + M * K, q.end(), 0);
  int8_t* qp = q.data();
  float *dp = d.data(), *sp = xsum.data();
  tokenmill::parallel_for(0, M, 16, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      quantize_row(xp + m * K, K, qp + m * K, dp + m * nb, offset);
      if (has_min) {  // summed in order, as the fp32 kernel does
        for (int64_t g = 0; g < ng; ++g) {
          float s = 0.0f;
          for (int64_t k = 0; k < group; ++k) s += xp[m * K + g * group + k];
          sp[m * ng + g] = s;
        }
      }
    }
  });
  const q8::Acts a{qp, dp, has_min ? sp : nullptr, K};
  if (unit == -1) {
    q8::avx2_gemm(w, a, M, yp, b);
    return;
  }
  const bool one = group == kBlock;  // q4_1, q8_0: a block is a whole group
#ifdef TOKENMILL_AMX
  if (amx) {
    if (bits == 8) one ? amx_gemm<8, false, true>(w, a, M, yp, b) : amx_gemm<8, false, false>(w, a, M, yp, b);
    else one ? amx_gemm<4, true, true>(w, a, M, yp, b) : amx_gemm<4, true, false>(w, a, M, yp, b);
    return;
  }
#endif
#ifdef TOKENMILL_Q8
  if (bits == 8) one ? vnni_gemm<8, false, true>(w, a, M, yp, b) : vnni_gemm<8, false, false>(w, a, M, yp, b);
  else one ? vnni_gemm<4, true, true>(w, a, M, yp, b) : vnni_gemm<4, true, false>(w, a, M, yp, b);
#endif
}
