// AVX2 + FMA path.  Everything below the `target` pragma is compiled for
// AVX2/FMA regardless of the global -march; ops.cpp only selects this table
// after __builtin_cpu_supports("avx2") && ("fma") succeeded at run time.
#include <cstdint>
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <new>
#include <type_traits>

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
inline void vst_f32(float* p, V v) { _mm256_storeu_ps(p, v); }
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

// The row-at-a-time decode kernels software-prefetch 4 KiB ahead, as the AVX-512 ones do: on
// the AMX Xeon, forced onto this path (LLMBENCH_KERNELS_ISA=avx2), SmolLM2 next token bf16
// 14.4-15.0 -> 11.0-11.6 ms, INT8 9.8-10.1 -> 5.9-6.1, INT4 11.8-13.1 -> 6.0-6.5, fp32 level
// (compare_backends, alternating twice; with i8_row). The AMD machine this path was tuned on,
// whose hardware prefetchers kept up alone, has not measured it.
#define LLMB_PF_BYTES 4096
// INT4 weight-only as int4 x int16 multiply-adds (gemv_int_impl.h), with that prefetch: SmolLM2
// next token 6.0-6.3 -> 5.15-5.2 ms, first token 96-105 -> 69-71 ms against the float
// i4_tile (same machine and path, 3 runs alternating).
#define LLMB_I4_INT16 1
// fp32 prefill rows as outer products (gemv_impl.h) from one vector (8 rows) on, two vectors
// per chunk in the 16 registers: 6 weight rows x 2 vectors of rows per tile.
#define LLMB_OUTER_M_MIN 8
#define LLMB_OUTER_MV 2
#define LLMB_OUTER_REGS 16
// bf16 weights on those outer products too, each tile's rows widened once (no bf16 dot
// products here).
#define LLMB_BF16_OUTER 1
// INT4 weight-only prefill rows dequantized to fp32 once per tile, on the same outer products
// (rows_dequant_i4), for K up to 1536 (the tile's rows then stay in L1).
#define LLMB_DEQUANT_PREFILL_M 8
#define LLMB_DEQUANT_PREFILL_KMAX 1536
#include "gemv_impl.h"

using VI = __m256i;
inline VI vi_load(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }
inline V bf16_even(VI v) { return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)); }
inline V bf16_odd(VI v) {
  return _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
}
inline VI vi_widen_i8(const int8_t* p) {
  return _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline VI vi_add(VI a, VI b) { return _mm256_add_epi32(a, b); }
inline VI vi_widen_u8(const uint8_t* p) {
  return _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline VI vi_lo_nibble(VI v) { return _mm256_and_si256(v, _mm256_set1_epi16(0x0F)); }
inline VI vi_hi_nibble(VI v) { return _mm256_srli_epi16(v, 4); }
inline V vset_halves(float lo, float hi) { return _mm256_blend_ps(vset1(lo), vset1(hi), 0xF0); }
inline VI vi_zero() { return _mm256_setzero_si256(); }
inline VI vi_madd(VI acc, VI a, VI b) { return _mm256_add_epi32(acc, _mm256_madd_epi16(a, b)); }
inline V vi_to_ps(VI v) { return _mm256_cvtepi32_ps(v); }
inline void store_i16(int16_t* q, V a, V b) {
  // packs interleaves 128-bit halves: restore element order
  const __m256i packed =
      _mm256_permute4x64_epi64(_mm256_packs_epi32(_mm256_cvtps_epi32(a), _mm256_cvtps_epi32(b)), 0xD8);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), packed);
}
inline V vabs(V v) { return _mm256_andnot_ps(vset1(-0.f), v); }
inline V vmax(V a, V b) { return _mm256_max_ps(a, b); }
inline float vhmax(V v) {
  __m128 t = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  t = _mm_max_ps(t, _mm_movehl_ps(t, t));
  return std::max(_mm_cvtss_f32(t), _mm_cvtss_f32(_mm_movehdup_ps(t)));
}

// int4 x int8 activations (gemv_int_impl.h, LLMB_HAS_U8S8_DOT): a 64-weight unit is two
// vectors, its low and its high nibbles.
#define LLMB_HAS_U8S8_DOT 1
constexpr int NU = 2;
inline void unit_weights(const uint8_t* p, VI* w) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  const __m256i low4 = _mm256_set1_epi8(15);
  w[0] = _mm256_and_si256(v, low4);
  w[1] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
}
inline VI vi_dot_u8s8(VI acc, VI w, VI x) {
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1)));
}
// The outer-product form of the int4 x int8 prefill (gemv_int_impl.h, LLMB_I4Q8_OUTER):
// from 8 activation rows on.
#define LLMB_I4Q8_OUTER 8
inline VI vi_dot16_u8s8(VI acc16, VI w, VI x) {
  return _mm256_add_epi16(acc16, _mm256_maddubs_epi16(w, x));
}
// Pins an accumulator to a register at this point (see i4q8_outer_tile).
inline void vi_keep(VI& v) { __asm__("" : "+x"(v)); }
inline VI vi_widen16(VI v16) { return _mm256_madd_epi16(v16, _mm256_set1_epi16(1)); }
inline VI vi_bcast4(const uint8_t* p) {
  int32_t v;
  std::memcpy(&v, p, sizeof(v));
  return _mm256_set1_epi32(v);
}
inline V vsub(V a, V b) { return _mm256_sub_ps(a, b); }
// One row of packed int4 (16 bytes per 32 elements: low nibbles 0-15, high 16-31) -> K u8.
inline void unpack_i4_row(const uint8_t* p, int64_t K, uint8_t* out) {
  const __m128i low4 = _mm_set1_epi8(15);
  for (int64_t b = 0; b < K / 32; ++b) {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + b * 16));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + b * 32), _mm_and_si128(v, low4));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + b * 32 + 16),
                     _mm_and_si128(_mm_srli_epi16(v, 4), low4));
  }
}
inline int levels16(const float* x, V scale, int8_t* q) {
  constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  V r0 = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(x), scale), kRound);
  V r1 = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(x + 8), scale), kRound);
  r0 = _mm256_min_ps(_mm256_max_ps(r0, vset1(-127.f)), vset1(127.f));
  r1 = _mm256_min_ps(_mm256_max_ps(r1, vset1(-127.f)), vset1(127.f));
  // packs work per 128-bit lane: restore element order, then keep each lane's low 8 bytes
  const __m256i w16 = _mm256_permute4x64_epi64(
      _mm256_packs_epi32(_mm256_cvtps_epi32(r0), _mm256_cvtps_epi32(r1)), 0xD8);
  const __m256i b8 = _mm256_packs_epi16(w16, w16);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(q),
                   _mm_unpacklo_epi64(_mm256_castsi256_si128(b8), _mm256_extracti128_si256(b8, 1)));
  return static_cast<int>(vhsum(_mm256_add_ps(r0, r1)));  // integers: exact
}

#include "gemv_int_impl.h"

const KernelTable kTable = LLMB_INT_KERNEL_TABLE("avx2");

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
