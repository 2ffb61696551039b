// One linear layer's weights as raw pointers, and the threaded small-M GEMV
// over them, for C++ callers inside the extension (decode_step.cpp). The
// torch-facing linear_* functions in ops.cpp go through the same entry point.
#pragma once
#include <cstdint>

#include "common.h"

namespace llmb {

// --act-quant-mode other than the int8 kernels' exact per-row symmetric path (act_qmax): x is
// replaced by its int8 levels, (q - zero) * scale, before the kernel runs, so every format and
// path computes on the int8-valued activations. block 0: the whole row (or tensor).
struct ActQuant {
  bool enabled = false;
  bool per_tensor = false;  // one scale (and zero) over all M rows, per block
  bool sym = true;          // q in [-127, 127]; else q in [0, 255] with a zero point
  int64_t block = 0;        // input channels per scale; 0: all K
};

// Writes x's int8 levels (row stride K) into out [M, K].
void quantize_act_levels(const ActQuant& q, const float* x, int64_t M, int64_t ldx, int64_t K,
                         float* out);

// |x| / static act_scale beyond which int8 would saturate (llmbench/quant/linears.py OVERFLOW).
constexpr float kActOverflow = 127.5f;

struct LinearDesc {
  Fmt fmt = kF32;
  const void* w = nullptr;  // [N, K] (f32/bf16/int8) or [N, K/2] packed int4
  int64_t N = 0;
  int64_t K = 0;
  const float* scales = nullptr;  // int8: [N]; int4: [N, K/group_size]
  const float* zeros = nullptr;   // int4: [N, K/group_size]; int8: [N] or nullptr (symmetric)
  int64_t group_size = 0;         // int4 only
  const float* bias = nullptr;    // [N] or nullptr
  float act_qmax = 0.f;           // int8: 127 rounds activations to int8 per row (GemvArgs)
  const float* act_scale = nullptr;  // int8 with act_qmax: a static scale [1] (SmoothQuant)
  ActQuant act;                   // any format: x replaced by its int8 levels first
};

// Whether linear_rows runs d on AMX-INT8 for M rows (int8 activations: kernels_amx.cpp).
bool amx_ok(const LinearDesc& d, int64_t M);

// bf16 weights [N, K] on AMX-BF16 (when amx_bf16_takes(M, K)): y = bf16(x) @ w.T (+ bias),
// fp32 sums rounded to bf16 values, rows split over the threads.
bool amx_bf16_takes(int64_t M, int64_t K);
void linear_bf16_amx(const uint16_t* w, int64_t N, int64_t K, const float* x, int64_t M,
                     int64_t ldx, const float* bias, float* y, int64_t ldy);

// y[m, :N] = x[m, :K] @ dequant(w).T (+ bias) for m < M, on the active ISA
// path, split over the intra-op thread pool.
void linear_rows(const LinearDesc& d, const float* x, int64_t M, int64_t ldx, float* y,
                 int64_t ldy);

// The active ISA path's table (its decode attention kernels and MLP activation too).
const KernelTable& active_kernels();

}  // namespace llmb
