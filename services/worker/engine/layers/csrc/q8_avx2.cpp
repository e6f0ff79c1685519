// The int8-activation kernel on AVX2 alone (no VNNI, e.g. AMD Zen 1-3, Intel before Ice Lake): the same exact
// int32 block sums as q8_gemm.cpp's AMX and VNNI paths, from VPMADDUBSW (u8 x s8, pairs summed into int16)
// and VPMADDWD (int16 pairs into int32), and the same float epilogue lane by lane, so a row's result is
// bitwise that of the other units.
//
// No int16 sum saturates. 4-bit codes (<= 15) times |x| (<= 127): a lane's 16 products over a block of 32
// columns sum to at most 16 x 1,905 = 30,480, so they stay in int16 for the whole block and widen once.
// 8-bit codes go in as |w| (<= 128) with w's sign moved onto x (VPSIGNB); a pair is at most 32,512, so
// every VPMADDUBSW widens at once.

#include "q8.h"

#include "parallel.h"
#include <immintrin.h>

#include <algorithm>

namespace {

using q8::kBlock;
using q8::kPanel;

inline __m256i bcast4(const int8_t* x) { return _mm256_set1_epi32(*reinterpret_cast<const int32_t*>(x)); }

// q8_gemm.cpp's Epilogue, on the two 8-column halves of a panel. ONE: every block is a whole group (no
// division per block, no running sum across blocks).
template <bool ONE>
struct Epilogue : q8::BlockPos<ONE> {
  using Pos = q8::BlockPos<ONE>;
  using Pos::first, Pos::last, Pos::b, Pos::g, Pos::nb, Pos::ng, Pos::off;
  __m256 d[2], mn[2];
  const q8::Acts& a;
  Epilogue(const q8::Weights& w, const q8::Acts& acts, int64_t block, int64_t panel)
      : Pos(w, block, panel), a(acts) {
    for (int h = 0; h < 2; ++h) {
      d[h] = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w.scales + off + 8 * h)));
      mn[h] = w.mins ? _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w.mins + off + 8 * h)))
                     : _mm256_setzero_ps();
    }
  }
  template <bool MIN>
  inline void apply(__m256i isum, int h, int64_t m, __m256& acc, __m256& out) const {
    const __m256 t = _mm256_mul_ps(_mm256_cvtepi32_ps(isum), _mm256_set1_ps(a.d[m * nb + b]));
    acc = first ? t : _mm256_add_ps(acc, t);
    if (last) {
      out = _mm256_fmadd_ps(acc, d[h], out);
      if constexpr (MIN) out = _mm256_fmadd_ps(mn[h], _mm256_set1_ps(a.xsum[m * ng + g]), out);
    }
  }
};

// One panel (16 columns, two halves) x MT rows, one block of 32 input columns at a time.
template <int BITS, bool MIN, bool ONE, bool PREFETCH, int MT>
void tile(const q8::Weights& w, const q8::Acts& a, int64_t p, int64_t m0, float* y, int64_t ldy, const float* bias) {
  __m256 acc[MT][2], out[MT][2];
  for (int m = 0; m < MT; ++m)
    for (int h = 0; h < 2; ++h) acc[m][h] = out[m][h] = _mm256_setzero_ps();
  const __m256i low = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  const uint8_t* codes = w.codes + p * w.pstride();
  for (int64_t b = 0; b < w.K / kBlock; ++b) {
    if constexpr (PREFETCH) q8::prefetch_block<BITS>(codes, b);
    __m256i isum[MT][2];
    const int8_t* xb = a.q + m0 * a.K + b * kBlock;
    if constexpr (BITS == 4) {
      __m256i s16[MT][2];
      for (int m = 0; m < MT; ++m) s16[m][0] = s16[m][1] = _mm256_setzero_si256();
      for (int j = 0; j < 4; ++j) {  // 8 columns per 64 bytes: k..k+3 low nibbles, k+4..k+7 high
        __m256i lo[2], hi[2];
        for (int h = 0; h < 2; ++h) {
          const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + (b * 4 + j) * 64 + 32 * h));
          lo[h] = _mm256_and_si256(raw, low), hi[h] = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low);
        }
        for (int m = 0; m < MT; ++m) {
          const int8_t* x = xb + m * a.K + j * 8;
          const __m256i x0 = bcast4(x), x1 = bcast4(x + 4);
          for (int h = 0; h < 2; ++h) {
            s16[m][h] = _mm256_add_epi16(s16[m][h], _mm256_add_epi16(_mm256_maddubs_epi16(lo[h], x0),
                                                                     _mm256_maddubs_epi16(hi[h], x1)));
            // Integer adds reassociate freely: without this GCC sums each lane's 8 products as a tree after
            // computing all 64 of a block, spilling them to the stack (~1.13x slower on Zen 1).
            __asm__("" : "+x"(s16[m][h]));
          }
        }
      }
      for (int m = 0; m < MT; ++m)
        for (int h = 0; h < 2; ++h) isum[m][h] = _mm256_madd_epi16(s16[m][h], ones);
    } else {
      for (int m = 0; m < MT; ++m) isum[m][0] = isum[m][1] = _mm256_setzero_si256();
      for (int j = 0; j < 8; ++j) {  // 4 columns per 64 bytes
        for (int h = 0; h < 2; ++h) {
          const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + (b * 8 + j) * 64 + 32 * h));
          const __m256i mag = _mm256_abs_epi8(raw);
          for (int m = 0; m < MT; ++m) {
            const __m256i x = _mm256_sign_epi8(bcast4(xb + m * a.K + j * 4), raw);
            isum[m][h] = _mm256_add_epi32(isum[m][h], _mm256_madd_epi16(_mm256_maddubs_epi16(mag, x), ones));
          }
        }
      }
    }
    const Epilogue<ONE> ep(w, a, b, p);
    for (int m = 0; m < MT; ++m)
      for (int h = 0; h < 2; ++h) ep.template apply<MIN>(isum[m][h], h, m0 + m, acc[m][h], out[m][h]);
  }
  for (int m = 0; m < MT; ++m) {
    float* row = y + (m0 + m) * ldy + p * kPanel;
    for (int h = 0; h < 2; ++h) {
      const __m256 o = bias ? _mm256_add_ps(out[m][h], _mm256_loadu_ps(bias + p * kPanel + 8 * h)) : out[m][h];
      _mm256_storeu_ps(row + 8 * h, o);
    }
  }
}

// The tile for the mt (<= MT) rows left; only a panel's first row tile prefetches (q8_gemm.cpp's vnni_rows).
template <int BITS, bool MIN, bool ONE, int MT>
void rows(const q8::Weights& w, const q8::Acts& a, int64_t p, int64_t m0, int64_t mt, float* y, int64_t ldy,
          const float* bias) {
  if constexpr (MT > 1)
    if (mt < MT) return rows<BITS, MIN, ONE, MT - 1>(w, a, p, m0, mt, y, ldy, bias);
  if (m0 == 0) tile<BITS, MIN, ONE, true, MT>(w, a, p, m0, y, ldy, bias);
  else tile<BITS, MIN, ONE, false, MT>(w, a, p, m0, y, ldy, bias);
}

template <int BITS, bool MIN, bool ONE>
void gemm(const q8::Weights& w, const q8::Acts& a, int64_t M, float* y, const float* bias) {
  // 4-bit: 8 int16 accumulators of the 16 registers. 8-bit holds 2 int32 accumulators and a broadcast of x a row,
  // and the codes with their magnitudes: at 4 rows it spills (3 rows: 1.04x). Float sums live in L1.
  constexpr int MT = BITS == 4 ? 4 : 3;
  const int64_t ldy = w.P * kPanel;
  tokenmill::parallel_for(0, w.P, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p)
      for (int64_t m0 = 0; m0 < M; m0 += MT)
        rows<BITS, MIN, ONE, MT>(w, a, p, m0, std::min<int64_t>(MT, M - m0), y, ldy, bias);
  });
}

}  // namespace

void q8::avx2_gemm(const Weights& w, const Acts& a, int64_t M, float* y, const float* bias) {
  const bool one = w.G == kBlock;  // q4_1, q8_0: a block is a whole group, so no partial sum crosses blocks
  if (w.bits == 8) one ? gemm<8, false, true>(w, a, M, y, bias) : gemm<8, false, false>(w, a, M, y, bias);
  else one ? gemm<4, true, true>(w, a, M, y, bias) : gemm<4, true, false>(w, a, M, y, bias);
}
