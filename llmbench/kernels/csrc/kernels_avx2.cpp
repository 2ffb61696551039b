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

const KernelTable kTable = LLMB_KERNEL_TABLE("avx2");

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
