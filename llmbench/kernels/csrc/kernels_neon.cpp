// Arm NEON path (AArch64, where Advanced SIMD is part of the base ISA, so no target pragma
// and no run-time check are needed): the same kernel templates as the x86 paths over
// 4-float vectors. Elsewhere this unit compiles to a table function that returns nullptr.
//
// Tested without Arm hardware by tests/test_kernels_neon.py: this file and
// kernels_generic.cpp cross-compiled for AArch64 with a small driver (tests/neon_driver.cpp)
// that runs both tables on the same inputs under qemu-user and compares them.
#include <cstdint>
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>

#include "common.h"

#if defined(__aarch64__)
#include <arm_neon.h>

#include <vector>
#if defined(__linux__)
#include <asm/hwcap.h>
#include <sys/auxv.h>
#endif

namespace llmb {
namespace {

using V = float32x4_t;
constexpr int W = 4;
inline V vzero() { return vdupq_n_f32(0.f); }
inline V vset1(float f) { return vdupq_n_f32(f); }
inline V vadd(V a, V b) { return vaddq_f32(a, b); }
inline V vmul(V a, V b) { return vmulq_f32(a, b); }
inline V vfma(V a, V b, V c) { return vfmaq_f32(c, a, b); }  // c + a * b
inline float vhsum(V v) { return vaddvq_f32(v); }
inline V vld_f32(const float* p) { return vld1q_f32(p); }
inline void vst_f32(float* p, V v) { vst1q_f32(p, v); }
// bf16 -> fp32: the 16 bits moved to the top of each 32-bit lane.
inline V vld_bf16(const uint16_t* p) { return vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(p), 16)); }
inline V vld_i8(const int8_t* p) {
  int32_t four;
  std::memcpy(&four, p, sizeof(four));  // 4 int8, widened below; no over-read past the row
  const int16x8_t h = vmovl_s8(vreinterpret_s8_s32(vdup_n_s32(four)));
  return vcvtq_f32_s32(vmovl_s16(vget_low_s16(h)));
}
// 16 packed bytes -> elements 0..31 (low nibbles = 0..15, high nibbles = 16..31)
inline void vld_i4x32(const uint8_t* p, V* q) {
  const uint8x16_t b = vld1q_u8(p);
  const uint8x16_t halves[2] = {vandq_u8(b, vdupq_n_u8(0x0F)), vshrq_n_u8(b, 4)};
  for (int h = 0; h < 2; ++h) {
    const uint16x8_t lo = vmovl_u8(vget_low_u8(halves[h]));
    const uint16x8_t hi = vmovl_u8(vget_high_u8(halves[h]));
    q[h * 4 + 0] = vcvtq_f32_u32(vmovl_u16(vget_low_u16(lo)));
    q[h * 4 + 1] = vcvtq_f32_u32(vmovl_u16(vget_high_u16(lo)));
    q[h * 4 + 2] = vcvtq_f32_u32(vmovl_u16(vget_low_u16(hi)));
    q[h * 4 + 3] = vcvtq_f32_u32(vmovl_u16(vget_high_u16(hi)));
  }
}

// 32 vector registers: room for a wider tile than AVX2's 16 allow.
#define LLMB_TILE_ACC 16

#include "gemv_impl.h"

// The integer shim of gemv_int_impl.h over 128-bit vectors (8 int16 or 4 int32 lanes), as the
// AVX2 path has it: bf16 weights read two-for-one, int8 weights against int16-rounded (or, with
// --lowp-mode INT8, int8) activations in int32 multiply-adds. int4 keeps the float kernel, as
// on AVX2. (Checked under qemu for agreement, not measured for speed: no Arm machine here.)
using VI = int32x4_t;
inline int16x8_t as_i16(VI v) { return vreinterpretq_s16_s32(v); }
inline VI vi_load(const void* p) { return vld1q_s32(static_cast<const int32_t*>(p)); }
inline V bf16_even(VI v) { return vreinterpretq_f32_s32(vshlq_n_s32(v, 16)); }
inline V bf16_odd(VI v) {
  return vreinterpretq_f32_u32(vandq_u32(vreinterpretq_u32_s32(v), vdupq_n_u32(0xFFFF0000u)));
}
inline VI vi_widen_i8(const int8_t* p) { return vreinterpretq_s32_s16(vmovl_s8(vld1_s8(p))); }
inline VI vi_widen_u8(const uint8_t* p) { return vreinterpretq_s32_u16(vmovl_u8(vld1_u8(p))); }
inline VI vi_lo_nibble(VI v) { return vreinterpretq_s32_s16(vandq_s16(as_i16(v), vdupq_n_s16(0x0F))); }
inline VI vi_hi_nibble(VI v) {
  return vreinterpretq_s32_u16(vshrq_n_u16(vreinterpretq_u16_s32(v), 4));
}
inline V vset_halves(float lo, float hi) { return vcombine_f32(vdup_n_f32(lo), vdup_n_f32(hi)); }
inline VI vi_zero() { return vdupq_n_s32(0); }
// acc + (a[2i] * b[2i] + a[2i+1] * b[2i+1]) per int32 lane, as x86's pmaddwd
inline VI vi_madd(VI acc, VI a, VI b) {
  const int32x4_t lo = vmull_s16(vget_low_s16(as_i16(a)), vget_low_s16(as_i16(b)));
  const int32x4_t hi = vmull_high_s16(as_i16(a), as_i16(b));
  return vaddq_s32(acc, vpaddq_s32(lo, hi));
}
inline VI vi_add(VI a, VI b) { return vaddq_s32(a, b); }
inline V vi_to_ps(VI v) { return vcvtq_f32_s32(v); }
// 8 floats -> 8 int16, rounded half to even, saturated (as x86's cvtps + packs)
inline void store_i16(int16_t* q, V a, V b) {
  vst1q_s16(q, vcombine_s16(vqmovn_s32(vcvtnq_s32_f32(a)), vqmovn_s32(vcvtnq_s32_f32(b))));
}
inline V vabs(V v) { return vabsq_f32(v); }
inline V vmax(V a, V b) { return vmaxq_f32(a, b); }
inline float vhmax(V v) { return vmaxvq_f32(v); }

// int4 x int8 activations (gemv_int_impl.h, LLMB_HAS_U8S8_DOT) for the neondot table only:
// a 64-weight unit is four 16-byte vectors, the low nibbles of its 32 bytes then the high ones,
// against sdot (s8 x s8: the 0..15 weights are non-negative int8 too). The tile carries the
// dotprod target (LLMB_I4Q8_ATTR); the plain neon table keeps its float int4 kernel.
#define LLMB_HAS_U8S8_DOT 1
#define LLMB_I4Q8_IN_TABLE 0
#define LLMB_I4Q8_ATTR __attribute__((target("arch=armv8.2-a+dotprod")))
constexpr int NU = 4;
inline void unit_weights(const uint8_t* p, VI* w) {
  const uint8x16_t b0 = vld1q_u8(p), b1 = vld1q_u8(p + 16), low4 = vdupq_n_u8(15);
  w[0] = vreinterpretq_s32_u8(vandq_u8(b0, low4));
  w[1] = vreinterpretq_s32_u8(vandq_u8(b1, low4));
  w[2] = vreinterpretq_s32_u8(vshrq_n_u8(b0, 4));
  w[3] = vreinterpretq_s32_u8(vshrq_n_u8(b1, 4));
}
LLMB_I4Q8_ATTR inline VI vi_dot_u8s8(VI acc, VI w, VI x) {
  return vdotq_s32(acc, vreinterpretq_s8_s32(w), vreinterpretq_s8_s32(x));
}
inline int levels16(const float* x, V scale, int8_t* q) {
  int16x4_t h[4];
  float sum = 0.f;
  for (int i = 0; i < 4; ++i) {  // round half to even (vrndnq), within +-127
    V r = vrndnq_f32(vdivq_f32(vld1q_f32(x + 4 * i), scale));
    r = vminq_f32(vmaxq_f32(r, vdupq_n_f32(-127.f)), vdupq_n_f32(127.f));
    sum += vaddvq_f32(r);  // integers: exact
    h[i] = vqmovn_s32(vcvtq_s32_f32(r));
  }
  vst1q_s8(q, vcombine_s8(vqmovn_s16(vcombine_s16(h[0], h[1])),
                          vqmovn_s16(vcombine_s16(h[2], h[3]))));
  return static_cast<int>(sum);
}

#include "gemv_int_impl.h"

const KernelTable kTable = LLMB_INT_KERNEL_TABLE("neon");

// ---- neondot: int8 weights against int8 activations with the dot-product instructions ----
// (ARMv8.2 dotprod, `sdot`: 16 int8 products summed into 4 int32 lanes per instruction; most
// Arm servers since Neoverse N1 have it.) int4 weights with symmetric int8 activations run the
// u8 x s8 tiles above (i4q8) on sdot. Int8 weights with int8 activations (--lowp-mode INT8,
// SmoothQuant W8A8) change too: x is rounded to int8 once per call
// (quantize_act_row, the same levels the other paths use) and every product is exact in
// int32. Everything else is the neon table's.

// x's int8 rows, after the M row scales (as prep_i8 lays out its int16 rows).
inline const int8_t* dot_rows(const GemvArgs& a) {
  return reinterpret_cast<const int8_t*>(a.xp + i8_rows_offset(a.M));
}

void prep_i8_dot(const GemvArgs& a, float* out) {
  if (a.act_qmax <= 0.f) {  // int16-rounded activations: the neon kernels
    prep_i8(a, out);
    return;
  }
  int8_t* q8 = reinterpret_cast<int8_t*>(out + i8_rows_offset(a.M));
  std::vector<int16_t> row(static_cast<size_t>(a.K));
  for (int64_t m = 0; m < a.M; ++m) {
    out[m] = quantize_act_row(a, m, row.data());  // levels within +-act_qmax <= 127
    for (int64_t k = 0; k < a.K; ++k) q8[m * a.K + k] = static_cast<int8_t>(row[k]);
  }
}

// R weight rows x MT activation rows. int32 lanes gain at most 4 * 127 * 127 per step of 16:
// exact for K up to about 500 000.
// (GCC 12 wants the architecture named: target("+dotprod") alone fails to inline vdotq_s32.)
template <int R, int MT>
__attribute__((target("arch=armv8.2-a+dotprod")))
void i8_dot_tile(const GemvArgs& a, int64_t n0, int64_t m0) {
  const int64_t K = a.K, KB = K - K % 16;
  const int8_t* w = static_cast<const int8_t*>(a.w) + n0 * K;
  const int8_t* x = dot_rows(a) + m0 * K;
  int32x4_t acc[R][MT];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MT; ++m) acc[r][m] = vdupq_n_s32(0);
  for (int64_t k = 0; k < KB; k += 16) {
    int8x16_t xv[MT];
    for (int m = 0; m < MT; ++m) xv[m] = vld1q_s8(x + m * K + k);
    for (int r = 0; r < R; ++r) {
      const int8x16_t wv = vld1q_s8(w + r * K + k);
      for (int m = 0; m < MT; ++m) acc[r][m] = vdotq_s32(acc[r][m], wv, xv[m]);
    }
  }
  for (int r = 0; r < R; ++r) {
    const int64_t n = n0 + r;
    for (int m = 0; m < MT; ++m) {
      int32_t s = vaddvq_s32(acc[r][m]);
      for (int64_t kk = KB; kk < K; ++kk)
        s += static_cast<int32_t>(w[r * K + kk]) * static_cast<int32_t>(x[m * K + kk]);
      float y = static_cast<float>(s) * a.xp[m0 + m] * a.scales[n];
      if (a.bias) y += a.bias[n];
      a.y[(m0 + m) * a.ldy + n] = y;
    }
  }
}

struct I8DotKern {
  static constexpr int kMT = 4;
  template <int NR, int MT>
  static void block(const GemvArgs& a, int64_t n, int64_t m0) {
    // 4 x 4 int32 accumulators, 4 weight and 4 activation vectors: 24 of the 32 registers
    if constexpr (NR == 4)
      i8_dot_tile<4, MT>(a, n, m0);
    else
      for (int i = 0; i < NR; ++i) i8_dot_tile<1, MT>(a, n + i, m0);
  }
};

void rows_i8_dot(const GemvArgs& a, int64_t n_begin, int64_t n_end) {
  if (a.act_qmax > 0.f)
    rows<I8DotKern>(a, n_begin, n_end);
  else
    rows<I8Int16Kern>(a, n_begin, n_end);
}

const KernelTable kDotTable = {
    "neondot",
    {kTable.fn[kF32], kTable.fn[kBF16], &rows_i8_dot, kTable.fn[kI4]},
    {kTable.prep[kF32], kTable.prep[kBF16], &prep_i8_dot, kTable.prep[kI4]},
    kTable.attn,
    kTable.act,
    &rows<I4Q8Kern>,
    &prep_i4q8,
    &prep_i4q8_rows};

bool cpu_has_dotprod() {
#if defined(__linux__)
  return (getauxval(AT_HWCAP) & HWCAP_ASIMDDP) != 0;
#elif defined(__ARM_FEATURE_DOTPROD)
  return true;  // built for a CPU that has it
#else
  return false;
#endif
}

}  // namespace

const KernelTable* neon_table() { return &kTable; }
const KernelTable* neondot_table() { return cpu_has_dotprod() ? &kDotTable : nullptr; }
}  // namespace llmb

#else  // not AArch64
namespace llmb {
const KernelTable* neon_table() { return nullptr; }
const KernelTable* neondot_table() { return nullptr; }
}  // namespace llmb
#endif
