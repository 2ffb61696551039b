// AVX2 + FMA path.  Everything below the `target` pragma is compiled for
// AVX2/FMA regardless of the global -march; ops.cpp only selects this table
// after __builtin_cpu_supports("avx2") && ("fma") succeeded at run time.
#include <cstdint>
#include <algorithm>
#include <cmath>
#include <cstring>

#include "common.h"

#if defined(__x86_64__) || defined(__i386__) || defined(_M_X64)
#include <immintrin.h>

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#elif defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif

namespace llmb {
namespace {

using V = __m256;
constexpr int W = 8;
inline V vzero() { return _mm256_setzero_ps(); }
inline V vset1(float f) { return _mm256_set1_ps(f); }
inline V vadd(V a, V b) { return _mm256_add_ps(a, b); }
inline V vmul(V a, V b) { return _mm256_mul_ps(a, b); }
inline V vfma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
inline float vhsum(V v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline V vld_f32(const float* p) { return _mm256_loadu_ps(p); }
// bf16 -> fp32 is a 16-bit left shift of the zero-extended bits.
inline V vld_bf16(const uint16_t* p) {
  const __m256i i = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(i, 16));
}
inline V vld_i8(const int8_t* p) {
  return _mm256_cvtepi32_ps(
      _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
// 16 packed bytes -> elements 0..31 (low nibbles = 0..15, high nibbles = 16..31)
inline void vld_i4x32(const uint8_t* p, V* q) {
  const __m256i mask = _mm256_set1_epi32(0x0F);
  const __m256i b0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  const __m256i b1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8)));
  q[0] = _mm256_cvtepi32_ps(_mm256_and_si256(b0, mask));
  q[1] = _mm256_cvtepi32_ps(_mm256_and_si256(b1, mask));
  q[2] = _mm256_cvtepi32_ps(_mm256_srli_epi32(b0, 4));
  q[3] = _mm256_cvtepi32_ps(_mm256_srli_epi32(b1, 4));
}

#include "gemv_impl.h"

// bf16 weights, two-for-one: a 32-byte load holds 16 bf16 values, and as 8
// 32-bit lanes each lane is (odd element << 16 | even element). Shifting left
// by 16 gives the even elements as fp32, masking the low half gives the odd
// ones, so 16 weights cost one load and two ALU ops (the generic path widens 8
// at a time with a cross-lane shuffle). The activations are deinterleaved to
// match once per call (prep_bf16): per 16-block, 8 evens then 8 odds.
void prep_bf16(const GemvArgs& a, float* out) {
  const int64_t K = a.K, K16 = K & ~int64_t{15};
  for (int64_t m = 0; m < a.M; ++m) {
    const float* x = a.x + m * a.ldx;
    float* o = out + m * K;
    for (int64_t k = 0; k < K16; k += 16)
      for (int i = 0; i < 8; ++i) {
        o[k + i] = x[k + 2 * i];
        o[k + 8 + i] = x[k + 2 * i + 1];
      }
    for (int64_t k = K16; k < K; ++k) o[k] = x[k];
  }
}

template <int R, int MT>
inline void bf16_tile(const GemvArgs& a, int64_t n0, int64_t m0) {
  const int64_t K = a.K, K16 = K & ~int64_t{15};
  const uint16_t* w = static_cast<const uint16_t*>(a.w) + n0 * K;
  const float* xp = a.xp + m0 * K;
  const __m256i odd_mask = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  V acc[R][MT];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MT; ++m) acc[r][m] = vzero();
  for (int64_t k = 0; k < K16; k += 16) {
    for (int r = 0; r < R; ++r) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + r * K + k));
      const V even = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
      const V odd = _mm256_castsi256_ps(_mm256_and_si256(v, odd_mask));
      for (int m = 0; m < MT; ++m) {
        acc[r][m] = vfma(even, vld_f32(xp + m * K + k), acc[r][m]);
        acc[r][m] = vfma(odd, vld_f32(xp + m * K + k + 8), acc[r][m]);
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    const int64_t n = n0 + r;
    for (int m = 0; m < MT; ++m) {
      float s = vhsum(acc[r][m]);
      for (int64_t kk = K16; kk < K; ++kk)  // the tail is in x's own order
        s += bf16_bits_to_f32(w[r * K + kk]) * xp[m * K + kk];
      if (a.bias) s += a.bias[n];
      a.y[(m0 + m) * a.ldy + n] = s;
    }
  }
}

// Batch-1 decode: one row at a time, in memory order (see dense_row).
inline void bf16_row(const GemvArgs& a, int64_t n) {
  const int64_t K = a.K, K32 = K & ~int64_t{31}, K16 = K & ~int64_t{15};
  const uint16_t* w = static_cast<const uint16_t*>(a.w) + n * K;
  const float* xp = a.xp;
  const __m256i odd_mask = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  V acc0 = vzero(), acc1 = vzero(), acc2 = vzero(), acc3 = vzero();
  int64_t k = 0;
  for (; k < K32; k += 32) {
    const __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k));
    const __m256i v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k + 16));
    acc0 = vfma(_mm256_castsi256_ps(_mm256_slli_epi32(v0, 16)), vld_f32(xp + k), acc0);
    acc1 = vfma(_mm256_castsi256_ps(_mm256_and_si256(v0, odd_mask)), vld_f32(xp + k + 8), acc1);
    acc2 = vfma(_mm256_castsi256_ps(_mm256_slli_epi32(v1, 16)), vld_f32(xp + k + 16), acc2);
    acc3 = vfma(_mm256_castsi256_ps(_mm256_and_si256(v1, odd_mask)), vld_f32(xp + k + 24), acc3);
  }
  for (; k < K16; k += 16) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k));
    acc0 = vfma(_mm256_castsi256_ps(_mm256_slli_epi32(v, 16)), vld_f32(xp + k), acc0);
    acc1 = vfma(_mm256_castsi256_ps(_mm256_and_si256(v, odd_mask)), vld_f32(xp + k + 8), acc1);
  }
  float s = vhsum(vadd(vadd(acc0, acc1), vadd(acc2, acc3)));
  for (; k < K; ++k) s += bf16_bits_to_f32(w[k]) * xp[k];
  if (a.bias) s += a.bias[n];
  a.y[n] = s;
}

struct BF16PairKern {
  template <int NR, int MT>
  static void block(const GemvArgs& a, int64_t n, int64_t m0) {
    if constexpr (MT == 1) {
      if (a.M == 1) {
        for (int i = 0; i < NR; ++i) bf16_row(a, n + i);
        return;
      }
    }
    constexpr int RMAX = (MT <= 3) ? 4 : 2;
    constexpr int R = NR < RMAX ? NR : RMAX;
    for (int i = 0; i < NR; i += R) bf16_tile<R, MT>(a, n + i, m0);
  }
};

// int8 weights against int16 activations: x is rounded once per call to int16
// with one scale per row (|error| <= max|x| / 65534, far below the int8
// weights' own rounding), so 16 weights cost a widening load and one
// multiply-add of int16 pairs into int32 (vpmaddwd) instead of 2 x (widen to
// int32, convert to float, FMA). Layout of the prepared buffer: M float row
// scales, then from float offset M rounded up to 8 (32 bytes), M rows of K
// int16 (M * K / 2 floats: the buffer has room for M * K + 64).
inline int64_t i8_rows_offset(int64_t M) { return (M + 7) & ~int64_t{7}; }

void prep_i8(const GemvArgs& a, float* out) {
  const int64_t K = a.K, K16 = K & ~int64_t{15};
  int16_t* q = reinterpret_cast<int16_t*>(out + i8_rows_offset(a.M));
  const V sign = vset1(-0.f);
  for (int64_t m = 0; m < a.M; ++m) {
    const float* x = a.x + m * a.ldx;
    V vtop = vzero();
    int64_t k = 0;
    for (; k + W <= K; k += W) vtop = _mm256_max_ps(vtop, _mm256_andnot_ps(sign, vld_f32(x + k)));
    __m128 t4 = _mm_max_ps(_mm256_castps256_ps128(vtop), _mm256_extractf128_ps(vtop, 1));
    t4 = _mm_max_ps(t4, _mm_movehl_ps(t4, t4));
    float top = std::max(_mm_cvtss_f32(t4), _mm_cvtss_f32(_mm_movehdup_ps(t4)));
    for (; k < K; ++k) top = std::max(top, std::fabs(x[k]));
    const float scale = top > 0.f ? top / 32767.f : 1.f;
    const float inv = 1.f / scale;
    const V vinv = vset1(inv);
    int16_t* qm = q + m * K;
    for (k = 0; k < K16; k += 16) {  // round to nearest even, as lrintf
      const __m256i i0 = _mm256_cvtps_epi32(vmul(vld_f32(x + k), vinv));
      const __m256i i1 = _mm256_cvtps_epi32(vmul(vld_f32(x + k + 8), vinv));
      // packs interleaves 128-bit halves: restore element order
      const __m256i packed = _mm256_permute4x64_epi64(_mm256_packs_epi32(i0, i1), 0xD8);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(qm + k), packed);
    }
    for (; k < K; ++k)
      qm[k] = static_cast<int16_t>(std::lrintf(std::min(32767.f, std::max(-32767.f, x[k] * inv))));
    out[m] = scale;
  }
}

template <int R, int MT>
inline void i8_tile(const GemvArgs& a, int64_t n0, int64_t m0) {
  const int64_t K = a.K, K16 = K & ~int64_t{15};
  const int8_t* w = static_cast<const int8_t*>(a.w) + n0 * K;
  const int16_t* xq = reinterpret_cast<const int16_t*>(a.xp + i8_rows_offset(a.M)) + m0 * K;
  // int32 lanes gain at most 2 * 127 * 32767 per step: flush to float every
  // 128 steps (2048 columns), far below overflow.
  constexpr int64_t kFlush = 128 * 16;
  V total[R][MT];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MT; ++m) total[r][m] = vzero();
  for (int64_t k0 = 0; k0 < K16; k0 += kFlush) {
    const int64_t k1 = std::min(K16, k0 + kFlush);
    __m256i acc[R][MT];
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < MT; ++m) acc[r][m] = _mm256_setzero_si256();
    for (int64_t k = k0; k < k1; k += 16) {
      for (int r = 0; r < R; ++r) {
        const __m256i w16 = _mm256_cvtepi8_epi16(
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + r * K + k)));
        for (int m = 0; m < MT; ++m) {
          const __m256i x16 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + m * K + k));
          acc[r][m] = _mm256_add_epi32(acc[r][m], _mm256_madd_epi16(w16, x16));
        }
      }
    }
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < MT; ++m) total[r][m] = vadd(total[r][m], _mm256_cvtepi32_ps(acc[r][m]));
  }
  for (int r = 0; r < R; ++r) {
    const int64_t n = n0 + r;
    for (int m = 0; m < MT; ++m) {
      float s = vhsum(total[r][m]);
      for (int64_t kk = K16; kk < K; ++kk)
        s += static_cast<float>(w[r * K + kk]) * static_cast<float>(xq[m * K + kk]);
      s *= a.xp[m0 + m] * a.scales[n];
      if (a.bias) s += a.bias[n];
      a.y[(m0 + m) * a.ldy + n] = s;
    }
  }
}

struct I8Int16Kern {
  template <int NR, int MT>
  static void block(const GemvArgs& a, int64_t n, int64_t m0) {
    constexpr int RMAX = (MT == 1) ? 1 : (MT <= 3) ? 4 : 2;
    constexpr int R = NR < RMAX ? NR : RMAX;
    for (int i = 0; i < NR; i += R) i8_tile<R, MT>(a, n + i, m0);
  }
};

const KernelTable kTable = {
    "avx2",
    {&rows<DenseKern<FmtF32>>, &rows<BF16PairKern>, &rows<I8Int16Kern>, &rows_i4},
    {nullptr, &prep_bf16, &prep_i8, nullptr}};

}  // namespace
}  // namespace llmb

#if defined(__clang__)
#pragma clang attribute pop
#elif defined(__GNUC__)
#pragma GCC pop_options
#endif

namespace llmb {
const KernelTable* avx2_table() { return &kTable; }
}  // namespace llmb

#else  // not x86
namespace llmb {
const KernelTable* avx2_table() { return nullptr; }
}  // namespace llmb
#endif
