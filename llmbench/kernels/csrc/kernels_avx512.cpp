// AVX-512F path.  Compiled under a target pragma; ops.cpp selects it only
// when __builtin_cpu_supports("avx512f") at run time.  (The development
// machine has no AVX-512, so this path is compile-tested only unless a test
// run happens on an AVX-512 host: tests run every supported ISA.)
#include <cstdint>
#include <cstring>

#include "common.h"

#if defined(__x86_64__) || defined(__i386__) || defined(_M_X64)
#include <immintrin.h>

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx2,fma"))), apply_to = function)
#elif defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx2,fma")
// GCC 12 false positive inside _mm512_reduce_add_ps
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif

namespace llmb {
namespace {

using V = __m512;
constexpr int W = 16;
inline V vzero() { return _mm512_setzero_ps(); }
inline V vset1(float f) { return _mm512_set1_ps(f); }
inline V vadd(V a, V b) { return _mm512_add_ps(a, b); }
inline V vmul(V a, V b) { return _mm512_mul_ps(a, b); }
inline V vfma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
inline float vhsum(V v) { return _mm512_reduce_add_ps(v); }
inline V vld_f32(const float* p) { return _mm512_loadu_ps(p); }
inline V vld_bf16(const uint16_t* p) {
  const __m512i i = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(i, 16));
}
inline V vld_i8(const int8_t* p) {
  return _mm512_cvtepi32_ps(
      _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
inline void vld_i4x32(const uint8_t* p, V* q) {
  const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  q[0] = _mm512_cvtepi32_ps(_mm512_and_si512(b, _mm512_set1_epi32(0x0F)));
  q[1] = _mm512_cvtepi32_ps(_mm512_srli_epi32(b, 4));
}

#include "gemv_impl.h"

const KernelTable kTable = LLMB_KERNEL_TABLE("avx512");

}  // namespace
}  // namespace llmb

#if defined(__clang__)
#pragma clang attribute pop
#elif defined(__GNUC__)
#pragma GCC pop_options
#endif

namespace llmb {
const KernelTable* avx512_table() { return &kTable; }
}  // namespace llmb

#else  // not x86
namespace llmb {
const KernelTable* avx512_table() { return nullptr; }
}  // namespace llmb
#endif
