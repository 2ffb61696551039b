// Shared declarations for the llmbench GEMV kernels.
//
// This header deliberately includes nothing from torch: the ISA-specific
// translation units (kernels_*.cpp) are compiled under `#pragma GCC target`
// regions and must not instantiate any torch/std inline code with wider ISA
// flags (that would be an ODR hazard on CPUs lacking the ISA).
#pragma once
#include <cstdint>

namespace llmb {

// y[m, n] = sum_k x[m, k] * dequant(w)[n, k]  (+ bias[n])
struct GemvArgs {
  const float* x;        // [M, K], row stride ldx
  int64_t ldx;
  int64_t M;
  int64_t K;
  const void* w;         // f32/bf16/int8: [N, K] contiguous; int4: [N, K/2] packed
  int64_t N;
  const float* scales;   // int8: [N]; int4: [N, ngroups]
  const float* zeros;    // int4: [N, ngroups]
  int64_t group_size;    // int4 only (power of two >= 32, or K)
  int64_t ngroups;       // int4 only: K / group_size
  const float* xsum;     // int4 only: [M, ngroups], sum of x over each group
  const float* bias;     // [N] or nullptr
  float* y;              // [M, N], row stride ldy
  int64_t ldy;
  const float* xp;       // x rearranged by the table's prep function (row stride K), if any
};

enum Fmt { kF32 = 0, kBF16 = 1, kI8 = 2, kI4 = 3, kNumFmt = 4 };

// Computes output columns (weight rows) [n_begin, n_end) for all M rows of x.
using RowsFn = void (*)(const GemvArgs&, int64_t n_begin, int64_t n_end);

// Rearranges x [M, K] once per call into `out` (room for M * K + 64 floats) for
// kernels that read activations in another order or format than memory (see
// the avx2 bf16 and int8 kernels).
using PrepFn = void (*)(const GemvArgs&, float* out);

struct KernelTable {
  const char* name;
  RowsFn fn[kNumFmt];
  PrepFn prep[kNumFmt];  // nullptr: the kernel reads x as it is
};

const KernelTable* generic_table();
const KernelTable* avx2_table();    // nullptr when not compiled (non-x86)
const KernelTable* avx512_table();  // nullptr when not compiled (non-x86)

}  // namespace llmb
