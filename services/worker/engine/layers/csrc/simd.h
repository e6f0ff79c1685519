// One vector type for every kernel: AVX-512 (16 floats) or AVX2 (8 floats), picked at compile time
// (the extension is built with -march=native on the machine that runs it).
#pragma once

#include <ATen/ATen.h>
#include <immintrin.h>

#include <cstdint>

#if defined(__AVX512F__)
struct Simd {
  static constexpr int W = 16;
  using F = __m512;
  using I = __m512i;
  static F zero() { return _mm512_setzero_ps(); }
  static F set1(float v) { return _mm512_set1_ps(v); }
  static F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static F add(F a, F b) { return _mm512_add_ps(a, b); }
  static F sub(F a, F b) { return _mm512_sub_ps(a, b); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F div(F a, F b) { return _mm512_div_ps(a, b); }
  static F min(F a, F b) { return _mm512_min_ps(a, b); }
  static F max(F a, F b) { return _mm512_max_ps(a, b); }
  static bool any_nan(F v) { return _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q) != 0; }
  static F bcast(const float* p) { return _mm512_set1_ps(*p); }
  static F load(const float* p) { return _mm512_loadu_ps(p); }
  static F loadn(const float* p, int n, float fill) {  // first n lanes from p, the rest `fill`
    return _mm512_mask_loadu_ps(_mm512_set1_ps(fill), static_cast<__mmask16>((1u << n) - 1), p);
  }
  static void store(float* p, F v) { _mm512_storeu_ps(p, v); }
  static float hsum(F v) { return _mm512_reduce_add_ps(v); }
  static float hmax(F v) { return _mm512_reduce_max_ps(v); }
  static bool any_above(F v, float m) { return _mm512_cmp_ps_mask(v, _mm512_set1_ps(m), _CMP_GT_OQ) != 0; }
  static I u8(const uint8_t* p) { return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static I s8(const uint8_t* p) { return _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static I low4(I v) { return _mm512_and_si512(v, _mm512_set1_epi32(0xF)); }
  static I high4(I v) { return _mm512_srli_epi32(v, 4); }
  static F cvt(I v) { return _mm512_cvtepi32_ps(v); }
  static F half(const at::Half* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  // 16 bfloat16 pairs at p -> float32 of each pair's first (half 0) or second (half 1) value: bfloat16 is
  // float32's upper half
  static F bf16_half(const at::BFloat16* p, int half) {
    const __m512i x = _mm512_loadu_si512(p);
    return _mm512_castsi512_ps(half ? _mm512_and_si512(x, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u)))
                                    : _mm512_slli_epi32(x, 16));
  }
  struct Table {  // 16-entry code book, one permute
    F t;
    explicit Table(const float* p) : t(p ? _mm512_loadu_ps(p) : _mm512_setzero_ps()) {}
    F operator()(I idx) const { return _mm512_permutexvar_ps(idx, t); }
  };
  // exp(x) to ~1 ulp (Cephes' polynomial); scalef keeps tiny results as denormals instead of garbage.
  static F exp(F x) {
    x = _mm512_max_ps(_mm512_min_ps(x, set1(88.3762626647949f)), set1(-88.3762626647949f));
    F fx = _mm512_roundscale_ps(mul(x, set1(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    return _mm512_scalef_ps(poly(x, fx), fx);
  }
  static F poly(F x, F fx) {
    x = _mm512_fnmadd_ps(fx, set1(0.693359375f), x);
    x = _mm512_fnmadd_ps(fx, set1(-2.12194440e-4f), x);
    F y = set1(1.9875691500E-4f);
    y = fma(y, x, set1(1.3981999507E-3f));
    y = fma(y, x, set1(8.3334519073E-3f));
    y = fma(y, x, set1(4.1665795894E-2f));
    y = fma(y, x, set1(1.6666665459E-1f));
    y = fma(y, x, set1(5.0000001201E-1f));
    return fma(y, mul(x, x), add(x, set1(1.0f)));
  }
};
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
struct Simd {
  static constexpr int W = 8;
  using F = __m256;
  using I = __m256i;
  static F zero() { return _mm256_setzero_ps(); }
  static F set1(float v) { return _mm256_set1_ps(v); }
  static F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static F add(F a, F b) { return _mm256_add_ps(a, b); }
  static F sub(F a, F b) { return _mm256_sub_ps(a, b); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F div(F a, F b) { return _mm256_div_ps(a, b); }
  static F min(F a, F b) { return _mm256_min_ps(a, b); }
  static F max(F a, F b) { return _mm256_max_ps(a, b); }
  static bool any_nan(F v) { return _mm256_movemask_ps(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)) != 0; }
  static F bcast(const float* p) { return _mm256_broadcast_ss(p); }
  static F load(const float* p) { return _mm256_loadu_ps(p); }
  static I lanes_below(int n) { return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)); }
  static F loadn(const float* p, int n, float fill) {
    I m = lanes_below(n);
    return _mm256_blendv_ps(set1(fill), _mm256_maskload_ps(p, m), _mm256_castsi256_ps(m));
  }
  static void store(float* p, F v) { _mm256_storeu_ps(p, v); }
  static float hsum(F v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
  }
  static bool any_above(F v, float m) { return _mm256_movemask_ps(_mm256_cmp_ps(v, set1(m), _CMP_GT_OQ)) != 0; }
  static float hmax(F v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
  }
  static I u8(const uint8_t* p) { return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))); }
  static I s8(const uint8_t* p) { return _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))); }
  static I low4(I v) { return _mm256_and_si256(v, _mm256_set1_epi32(0xF)); }
  static I high4(I v) { return _mm256_srli_epi32(v, 4); }
  static F cvt(I v) { return _mm256_cvtepi32_ps(v); }
  static F half(const at::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static F bf16_half(const at::BFloat16* p, int half) {  // 8 pairs, as the AVX-512 one
    const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm256_castsi256_ps(half ? _mm256_and_si256(x, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u)))
                                    : _mm256_slli_epi32(x, 16));
  }
  struct Table {  // 16 entries: two 8-entry permutes, picked by bit 3 of the index
    F lo, hi;
    explicit Table(const float* p)
        : lo(p ? _mm256_loadu_ps(p) : _mm256_setzero_ps()), hi(p ? _mm256_loadu_ps(p + 8) : _mm256_setzero_ps()) {}
    F operator()(I idx) const {
      F a = _mm256_permutevar8x32_ps(lo, idx), b = _mm256_permutevar8x32_ps(hi, idx);
      return _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
    }
  };
  static F exp(F x) {  // the exponent trick needs fx in [-126, 127]
    x = _mm256_max_ps(_mm256_min_ps(x, set1(88.3762626647949f)), set1(-87.3365447505531f));
    F fx = _mm256_round_ps(mul(x, set1(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    x = _mm256_fnmadd_ps(fx, set1(0.693359375f), x);
    x = _mm256_fnmadd_ps(fx, set1(-2.12194440e-4f), x);
    F y = set1(1.9875691500E-4f);
    y = fma(y, x, set1(1.3981999507E-3f));
    y = fma(y, x, set1(8.3334519073E-3f));
    y = fma(y, x, set1(4.1665795894E-2f));
    y = fma(y, x, set1(1.6666665459E-1f));
    y = fma(y, x, set1(5.0000001201E-1f));
    y = fma(y, mul(x, x), add(x, set1(1.0f)));
    I e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
    return mul(y, _mm256_castsi256_ps(e));
  }
};
#else
#error "tokenmill's CPU kernels need AVX2 with FMA and F16C, or AVX-512"
#endif
