// Portable scalar path (any CPU, e.g. Arm or x86 without AVX2).  Compiled with
// the baseline flags only; the blocked loops still give the compiler several
// independent accumulators to work with.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "common.h"

namespace llmb {
namespace {

using V = float;
constexpr int W = 1;
inline V vzero() { return 0.f; }
inline V vset1(float f) { return f; }
inline V vadd(V a, V b) { return a + b; }
inline V vmul(V a, V b) { return a * b; }
inline V vfma(V a, V b, V c) { return a * b + c; }
inline float vhsum(V v) { return v; }
inline V vld_f32(const float* p) { return *p; }
inline void vst_f32(float* p, V v) { *p = v; }
inline V vld_bf16(const uint16_t* p) {
  const uint32_t u = static_cast<uint32_t>(*p) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}
inline V vld_i8(const int8_t* p) { return static_cast<float>(*p); }
inline void vld_i4x32(const uint8_t* p, V* q) {
  for (int i = 0; i < 16; ++i) {
    q[i] = static_cast<float>(p[i] & 15);
    q[16 + i] = static_cast<float>(p[i] >> 4);
  }
}

#include "gemv_impl.h"

const KernelTable kTable = LLMB_KERNEL_TABLE("generic");

}  // namespace

const KernelTable* generic_table() { return &kTable; }

int64_t& f32_outer_rows_setting() {
  static int64_t rows = -1;
  return rows;
}

// Declared in common.h; here, in the baseline-ISA unit without torch, so that every path's
// int8-activation branch and the NEON test driver link the one definition.
float quantize_act_row(const GemvArgs& a, int64_t m, int16_t* q) {
  const float* x = a.x + m * a.ldx;
  const float qmax = a.act_qmax;
  float scale;
  if (a.act_scale != nullptr) {
    scale = a.act_scale[a.act_scale_n == 1 ? 0 : m];
  } else {
    float top = 0.f;
    for (int64_t k = 0; k < a.K; ++k) top = std::max(top, std::fabs(x[k]));
    scale = std::max(top / qmax, 1e-8f);  // as dynamic_scales() in llmbench/kernels/int8_act.py
  }
  for (int64_t k = 0; k < a.K; ++k) {
    const float v = std::nearbyint(x[k] / scale);
    q[k] = static_cast<int16_t>(v > qmax ? qmax : (v < -qmax ? -qmax : v));
  }
  return scale;
}

}  // namespace llmb
