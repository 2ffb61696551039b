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

#include "gemv_int_impl.h"

const KernelTable kTable = LLMB_INT_KERNEL_TABLE("neon");

}  // namespace

const KernelTable* neon_table() { return &kTable; }
}  // namespace llmb

#else  // not AArch64
namespace llmb {
const KernelTable* neon_table() { return nullptr; }
}  // namespace llmb
#endif
