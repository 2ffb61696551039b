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
  // int8 weights only. 0: x is rounded to int16 with a per-row max-abs scale (weight-only
  // int8: an error far below the weights' own). > 0: int8 activations, x rounded to integers
  // in [-act_qmax, act_qmax] (127) with the scales act_scale gives (act_scale_n = 1 for the
  // whole tensor or M, one per row: SmoothQuant's static scale) or, when act_scale is null,
  // max|x row| / act_qmax (dynamic per row: --lowp-mode INT8).
  float act_qmax;
  const float* act_scale;
  int64_t act_scale_n;
  // int4 weights only: symmetric int8 activations (--lowp-mode INT8), one scale per row (all
  // rows: act_per_tensor) and block of act_block input channels (0: the row; else whole
  // groups), as ActQuant rounds them; the table's i4q8 kernels run (KernelTable::i4q8).
  bool act_per_tensor;
  int64_t act_block;
};

// Rounds row m of a.x to integers in [-a.act_qmax, a.act_qmax] (round half to even, x / scale
// as torch computes it) into q; returns the row's scale. Defined once, in kernels_generic.cpp
// (baseline ISA), for every path's int8-activation branch.
float quantize_act_row(const GemvArgs& a, int64_t m, int16_t* q);

enum Fmt { kF32 = 0, kBF16 = 1, kI8 = 2, kI4 = 3, kNumFmt = 4 };

// Computes output columns (weight rows) [n_begin, n_end) for all M rows of x.
using RowsFn = void (*)(const GemvArgs&, int64_t n_begin, int64_t n_end);

// Rearranges x [M, K] once per call into `out` (room for (M + kPrepRowsPad) * K + 64
// floats) for kernels that read activations in another order or format than memory (see the
// avx2 bf16 and int8 kernels, and the fp32 outer products, whose chunks pad M).
using PrepFn = void (*)(const GemvArgs&, float* out);
constexpr int64_t kPrepRowsPad = 64;
// The same for rows [m0, m1) only (m0 a multiple of 8, m1 too or M), where each row's
// preparation depends on that row alone: run_rows splits it over the threads.
using PrepRowsFn = void (*)(const GemvArgs&, float* out, int64_t m0, int64_t m1);

// fp32 weights multiply x as outer products (gemv_impl.h) from this many rows on: -1 (the
// default) the path's own threshold, LLMB_OUTER_M_MIN; 0 never (set_outer_rows: A/B runs).
int64_t& f32_outer_rows_setting();

// Decode attention over a run of n cached positions of one KV head (d floats each, rows ld
// floats apart), for one query head q: scores[t] = scale * <q, keys[t]>; and out[:d] +=
// sum_t p[t] * values[t]; and the softmax's exponentials (gemv_impl.h attn_*).
struct AttnFns {
  void (*scores)(const float* q, const float* keys, int64_t ld, int64_t n, int64_t d,
                 float scale, float* scores);
  void (*mix)(const float* p, const float* values, int64_t ld, int64_t n, int64_t d,
              float* out);
  // scores[t] = exp(scores[t] - top) (scores <= top); returns their sum
  float (*exp_sum)(float* scores, int64_t n, float top);
};

struct KernelTable {
  const char* name;
  RowsFn fn[kNumFmt];
  PrepFn prep[kNumFmt];  // nullptr: the kernel reads x as it is
  AttnFns attn;
  // A decode row's MLP activation, out = act(gate) (* up): true where `kind` (decode_step's
  // kSiLU, kGeluTanh, ...) has a vector form here (gemv_impl.h act_rows)
  bool (*act)(int kind, const float* gate, const float* up, float* out, int64_t n);
  // int4 weights x int8 activations (u8 x s8 dot products; GemvArgs::act_per_tensor): K and
  // the group size in whole 64-element units. nullptr where the path has none: the int8
  // levels then go through fn[kI4] as floats.
  RowsFn i4q8 = nullptr;
  PrepFn i4q8_prep = nullptr;
  PrepRowsFn i4q8_prep_rows = nullptr;  // i4q8_prep by rows: not for act_per_tensor
};

// int4 / int8 weights x int8 activations on AMX-INT8, and bf16 weights on AMX-BF16
// (kernels_amx.cpp): see amx_ok and amx_bf16_takes in ops.cpp for the shapes they take. The
// buffers are the caller's, sized by Mpad (M rounded up to 16). bf16 uses only w, N, K, M,
// Mpad, bias, xb (K / 32 tiles per 16 rows), y and ldy: x rounded to bf16, fp32 sums, y
// rounded to bf16 values (what a bf16 GEMM returns, in fp32).
struct AmxArgs {
  Fmt fmt;               // kI4, kI8 or kBF16
  const void* w;         // int4: packed [N, K/2]; int8: [N, K]
  int64_t N, K, M, Mpad;
  int64_t group_size;    // int4: a multiple of 64 dividing K; int8: K (one group)
  const float* scales;   // int4: [N, K / group_size]; int8: [N]
  const float* zeros;    // int4: [N, K / group_size]; int8: [N] or nullptr (symmetric)
  const float* bias;     // [N] or nullptr
  int8_t* xb;            // Mpad / 16 * K / 64 tiles of 1 KiB (amx_pack_x)
  float* sx;             // [K / group_size, Mpad]: activation scale per row and group
  // [K / group_size, Mpad]. int4: the sum of the row's int8 levels over the group. int8: the
  // row's fp32 sum (asymmetric int8 weights subtract sum(x) * s * z, as the other paths do).
  float* xsum;
  float* y;              // [M, N], row stride ldy
  int64_t ldy;
};
bool amx_int8_ready();  // the CPU has AMX-INT8 and the OS granted its tile state
// Quantizes rows [16 mb_begin, 16 mb_end) of x [M, K] (row stride ldx) to int8 levels,
// symmetric (round half to even of x / scale, within +-127), one scale per row and block of
// input channels (0: the whole row), into a.xb/sx/xsum. per_tensor: the scales are one over
// all rows, already set by amx_tensor_scales.
void amx_tensor_scales(const AmxArgs& a, const float* x, int64_t ldx, int64_t block);
void amx_pack_x(const AmxArgs& a, const float* x, int64_t ldx, bool per_tensor, int64_t block,
                int64_t mb_begin, int64_t mb_end);
// Output columns [16 nb_begin, 16 nb_end) for all M rows.
void amx_rows(const AmxArgs& a, int64_t nb_begin, int64_t nb_end);
bool amx_bf16_ready();  // the CPU has AMX-BF16 (and AVX512-BF16) and the tile state

const KernelTable* generic_table();
const KernelTable* avx2_table();    // nullptr when not compiled (non-x86)
const KernelTable* avx512_table();  // nullptr when not compiled (non-x86)
const KernelTable* avx512vnni_table();  // nullptr when not compiled (non-x86)
const KernelTable* neon_table();    // nullptr when not compiled (not AArch64)
const KernelTable* neondot_table();  // nullptr when not AArch64 or the CPU lacks dotprod

}  // namespace llmb
