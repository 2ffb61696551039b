// AVX-512 (F + BW) path.  Compiled under a target pragma; ops.cpp selects it
// only when __builtin_cpu_supports("avx512f") and ("avx512bw") at run time.
// Tests run every supported ISA, so an AVX-512 host tests this path and the
// AVX2 one side by side.
//
// kernels_avx512vnni.cpp compiles this file again with LLMB_AVX512_VNNI set:
// the "avx512vnni" path, for CPUs with AVX512-VNNI (Cascade Lake and later),
// whose int16 multiply-adds (int8 / int4 weights against int16 or int8
// activations, gemv_int_impl.h) are one vpdpwssd instead of vpmaddwd +
// vpaddd. Everything else is the same code.
#ifndef LLMB_AVX512_VNNI
#define LLMB_AVX512_VNNI 0
#endif
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "common.h"

#if defined(__x86_64__) || defined(__i386__) || defined(_M_X64)
#include <immintrin.h>

// (the pragmas take literal strings: GCC does not expand a macro there)
#if defined(__clang__) && LLMB_AVX512_VNNI
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vnni,avx2,fma"))), apply_to = function)
#elif defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx2,fma"))), apply_to = function)
#elif defined(__GNUC__)
#pragma GCC push_options
#if LLMB_AVX512_VNNI
#pragma GCC target("avx512f,avx512bw,avx512vnni,avx2,fma")
#else
#pragma GCC target("avx512f,avx512bw,avx2,fma")
#endif
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
inline void vst_f32(float* p, V v) { _mm512_storeu_ps(p, v); }
// Four horizontal sums at once: halves, then quarters, of pairs of vectors are added
// before the in-lane reduction, 14 instructions instead of four reduce_add sequences.
#define LLMB_HAS_VHSUM4 1
inline void vhsum4(V a, V b, V c, V d, float* out) {
  const V ab = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
  const V cd = _mm512_add_ps(_mm512_shuffle_f32x4(c, d, 0x44), _mm512_shuffle_f32x4(c, d, 0xEE));
  // lane j (128 bits) now holds four partial sums of a, b, c, d for j = 0..3
  V u = _mm512_add_ps(_mm512_shuffle_f32x4(ab, cd, 0x88), _mm512_shuffle_f32x4(ab, cd, 0xDD));
  u = _mm512_add_ps(u, _mm512_shuffle_ps(u, u, 0x4E));
  u = _mm512_add_ps(u, _mm512_shuffle_ps(u, u, 0xB1));
  const V first = _mm512_permutexvar_ps(_mm512_set_epi32(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 12, 8, 4, 0), u);
  _mm_storeu_ps(out, _mm512_castps512_ps128(first));
}
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

// Tuned on an Intel Xeon with AMX (Sapphire Rapids class, 2 threads), measured
// with benchmarks/bench_kernels.py, whole SmolLM2 / TinyLlama decode steps:
// - the row-at-a-time kernels software-prefetch 4 KiB ahead into L2: one core
//   there keeps too few misses in flight for the hardware prefetcher alone
//   (bf16 15.5 -> 12.9 ms, int8 8.5 -> 7.3 ms, int4 TinyLlama 85 -> 36 ms);
// - fp32 batch-1 reads one row at a time too (dense_row), now that the weights sit on 2 MiB
//   pages in the order a step reads them (llmbench/memory.py): SmolLM2 fp32 steps 20.0-21.2
//   against 21.6-22.2 ms for four rows at a time (dense_tile_wide), alternating 4 times each
//   (2026-12-06); TinyLlama's layer shapes a tie (both 28-29 GB/s). Before the arena, the
//   four-row tiles had measured faster (22.7 vs 24.3 ms).
#define LLMB_ROW_DECODE 1
#define LLMB_PF_BYTES 4096
#define LLMB_PF_LOC 2
#define LLMB_I4_INT16 1  // int4 x int16 multiply-adds (gemv_int_impl.h)
// - fp32 prefill tiles of 4 weight rows x 6 activation rows (24 of the 32 registers), the
//   next weight rows prefetched while the tiles reuse the current ones: SmolLM2's linears at
//   32 rows, weights from memory, 0.71x to 0.88x of torch's GEMM time (it was 1.1x to 1.3x;
//   benchmarks/bench_prefill.py --m 32 --threads 2 --cold-mib 200).
#define LLMB_TILE_ACC 24
#define LLMB_DENSE_MT 6
#define LLMB_TILE_PREFETCH 1
// - fp32 from 12 rows on as outer products (gemv_impl.h), up to 64 rows (4 vectors) per
//   chunk in the 32 registers.
#define LLMB_OUTER_M_MIN 12
#define LLMB_OUTER_MV 4
#define LLMB_OUTER_REGS 32
// - int4 prefills of 12 rows or more dequantize 4 weight rows at a time and run the fp32 tiles
//   when K <= 1536: SmolLM2's qkv, gate_up and down at 32 rows 1.25-1.30 ms against 1.61 ms on
//   the int4 x int16 tiles, at 12 rows 0.55 against 0.64-0.73 ms; a tie at 8 (weights from
//   memory). TinyLlama's K = 2048 and 5632 ran 4-11% slower that way (the rows outgrow L1).
#define LLMB_DEQUANT_PREFILL_M 12
#define LLMB_DEQUANT_PREFILL_KMAX 1536
#include "gemv_impl.h"

using VI = __m512i;
inline VI vi_load(const void* p) { return _mm512_loadu_si512(p); }
inline V bf16_even(VI v) { return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)); }
inline V bf16_odd(VI v) {
  return _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
}
inline VI vi_widen_i8(const int8_t* p) {
  return _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline VI vi_add(VI a, VI b) { return _mm512_add_epi32(a, b); }
inline VI vi_widen_u8(const uint8_t* p) {
  return _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline VI vi_lo_nibble(VI v) { return _mm512_and_si512(v, _mm512_set1_epi16(0x0F)); }
inline VI vi_hi_nibble(VI v) { return _mm512_srli_epi16(v, 4); }
inline V vset_halves(float lo, float hi) {
  return _mm512_mask_blend_ps(static_cast<__mmask16>(0xFF00), vset1(lo), vset1(hi));
}
inline VI vi_zero() { return _mm512_setzero_si512(); }
#if LLMB_AVX512_VNNI
inline VI vi_madd(VI acc, VI a, VI b) { return _mm512_dpwssd_epi32(acc, a, b); }
#else
inline VI vi_madd(VI acc, VI a, VI b) { return _mm512_add_epi32(acc, _mm512_madd_epi16(a, b)); }
#endif
inline V vi_to_ps(VI v) { return _mm512_cvtepi32_ps(v); }
inline void store_i16(int16_t* q, V a, V b) {  // vpmovsdw keeps element order
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), _mm512_cvtsepi32_epi16(_mm512_cvtps_epi32(a)));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + W),
                      _mm512_cvtsepi32_epi16(_mm512_cvtps_epi32(b)));
}
inline V vabs(V v) { return _mm512_abs_ps(v); }
inline V vmax(V a, V b) { return _mm512_max_ps(a, b); }
inline float vhmax(V v) { return _mm512_reduce_max_ps(v); }

// - bf16 batch-1 decode reads one row at a time, 4 KiB prefetched ahead (bf16_row), as fp32
//   does. Tiles of 8 rows, each row prefetched 512 bytes ahead into L1, had measured faster
//   before the weights moved to one 2 MiB-page arena in step order; since then SmolLM2 bf16
//   steps 10.5-11.0 ms against 11.9-12.5 in tiles (alternating 3 times, 2026-12-06), and
//   TinyLlama's layer shapes a tie (27.4-27.7 GB/s both).

// int4 x int8 activations (gemv_int_impl.h, LLMB_HAS_U8S8_DOT): a 64-weight unit is one vector.
#define LLMB_HAS_U8S8_DOT 1
constexpr int NU = 1;
inline void unit_weights(const uint8_t* p, VI* w) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  const __m256i low4 = _mm256_set1_epi8(15);
  w[0] = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(v, low4)),
                            _mm256_and_si256(_mm256_srli_epi16(v, 4), low4), 1);
}
#if LLMB_AVX512_VNNI
inline VI vi_dot_u8s8(VI acc, VI w, VI x) { return _mm512_dpbusd_epi32(acc, w, x); }
#else
inline VI vi_dot_u8s8(VI acc, VI w, VI x) {
  return _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(w, x), _mm512_set1_epi16(1)));
}
#endif
inline int levels16(const float* x, V scale, int8_t* q) {
  V r = _mm512_roundscale_ps(_mm512_div_ps(_mm512_loadu_ps(x), scale),
                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  r = _mm512_min_ps(_mm512_max_ps(r, vset1(-127.f)), vset1(127.f));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(q), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(r)));
  return static_cast<int>(_mm512_reduce_add_ps(r));  // integers: exact
}
#include "gemv_int_impl.h"

#if LLMB_AVX512_VNNI
const KernelTable kTable = LLMB_INT_KERNEL_TABLE("avx512vnni");
#else
const KernelTable kTable = LLMB_INT_KERNEL_TABLE("avx512");
#endif

}  // namespace
}  // namespace llmb

#if defined(__clang__)
#pragma clang attribute pop
#elif defined(__GNUC__)
#pragma GCC pop_options
#endif

#if LLMB_AVX512_VNNI
#define LLMB_AVX512_TABLE_FN avx512vnni_table
#else
#define LLMB_AVX512_TABLE_FN avx512_table
#endif

namespace llmb {
const KernelTable* LLMB_AVX512_TABLE_FN() { return &kTable; }
}  // namespace llmb

#else  // not x86
namespace llmb {
#if LLMB_AVX512_VNNI
const KernelTable* avx512vnni_table() { return nullptr; }
#else
const KernelTable* avx512_table() { return nullptr; }
#endif
}  // namespace llmb
#endif
