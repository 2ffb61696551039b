// AVX2 + FMA path.  Everything below the `target` pragma is compiled for
// AVX2/FMA regardless of the global -march; ops.cpp only selects this table
// after __builtin_cpu_supports("avx2") && ("fma") succeeded at run time.
#include <cstdint>
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

struct BF16PairKern {
  template <int NR, int MT>
  static void block(const GemvArgs& a, int64_t n, int64_t m0) {
    constexpr int RMAX = (MT <= 3) ? 4 : 2;
    constexpr int R = NR < RMAX ? NR : RMAX;
    for (int i = 0; i < NR; i += R) bf16_tile<R, MT>(a, n + i, m0);
  }
};

const KernelTable kTable = {
    "avx2",
    {&rows<DenseKern<FmtF32>>, &rows<BF16PairKern>, &rows<DenseKern<FmtI8>>, &rows_i4},
    {nullptr, &prep_bf16, nullptr, nullptr}};

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
