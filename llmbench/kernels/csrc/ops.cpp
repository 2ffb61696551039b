// Torch bindings, argument checks, run-time ISA dispatch and threading for
// the llmbench weight-streaming GEMV kernels (small-M linear layers).
// Only the headers used, not <torch/extension.h>: it parses all of libtorch's C++ API (22 s
// per file here); these take about 9 s.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <string>
#include <memory>
#include <vector>

#include "common.h"
#include "linear.h"
#include "rowops.h"

namespace llmb {

void quantize_act_levels(const ActQuant& q, const float* x, int64_t M, int64_t ldx, int64_t K,
                         float* out) {
  const int64_t block = (q.block > 0 && q.block < K) ? q.block : K;
  const int64_t rows_per_scale = q.per_tensor ? M : 1;
  for (int64_t m0 = 0; m0 < M; m0 += rows_per_scale) {
    for (int64_t k0 = 0; k0 < K; k0 += block) {
      const int64_t k1 = std::min(K, k0 + block);
      // The range always holds 0 (as torch's observers), so a zero input stays exactly 0.
      float lo = 0.f, hi = 0.f;
      for (int64_t m = m0; m < m0 + rows_per_scale; ++m)
        for (int64_t k = k0; k < k1; ++k) {
          lo = std::min(lo, x[m * ldx + k]);
          hi = std::max(hi, x[m * ldx + k]);
        }
      float scale, zero = 0.f, qlo = -127.f, qhi = 127.f;
      if (q.sym) {
        scale = std::max(std::max(hi, -lo) / 127.f, 1e-8f);
      } else {
        scale = std::max((hi - lo) / 255.f, 1e-8f);
        zero = std::nearbyint(-lo / scale);
        qlo = 0.f;
        qhi = 255.f;
      }
      for (int64_t m = m0; m < m0 + rows_per_scale; ++m)
        for (int64_t k = k0; k < k1; ++k) {
          const float v = std::nearbyint(x[m * ldx + k] / scale) + zero;
          out[m * K + k] = ((v > qhi ? qhi : (v < qlo ? qlo : v)) - zero) * scale;
        }
    }
  }
}

namespace {

// int8 activations on AMX-INT8, bf16 on AMX-BF16 (below, after linear_rows' other helpers).
void linear_amx(const LinearDesc& d, const float* x, int64_t M, int64_t ldx, float* y,
                int64_t ldy);

bool cpu_has_avx2() {
#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

bool cpu_has_avx512() {
#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx2") &&
         __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

bool cpu_has_avx512vnni() {
#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
  return cpu_has_avx512() && __builtin_cpu_supports("avx512vnni");
#else
  return false;
#endif
}

const KernelTable* table_for(const std::string& name) {
  if (name == "generic") return generic_table();
  if (name == "avx2") return (avx2_table() && cpu_has_avx2()) ? avx2_table() : nullptr;
  if (name == "avx512") return (avx512_table() && cpu_has_avx512()) ? avx512_table() : nullptr;
  if (name == "avx512vnni")
    return (avx512vnni_table() && cpu_has_avx512vnni()) ? avx512vnni_table() : nullptr;
  if (name == "neon") return neon_table();  // AArch64 only, where NEON is always present
  if (name == "neondot") return neondot_table();  // and the dotprod extension
  return nullptr;
}

const KernelTable* best_table() {
  if (auto* t = table_for("avx512vnni")) return t;
  if (auto* t = table_for("avx512")) return t;
  if (auto* t = table_for("avx2")) return t;
  if (auto* t = table_for("neondot")) return t;
  if (auto* t = table_for("neon")) return t;
  return generic_table();
}

const KernelTable*& active_table() {
  static const KernelTable* t = best_table();
  return t;
}

std::vector<std::string> supported_isas() {
  std::vector<std::string> out{"generic"};
  if (table_for("avx2")) out.push_back("avx2");
  if (table_for("avx512")) out.push_back("avx512");
  if (table_for("avx512vnni")) out.push_back("avx512vnni");
  if (table_for("neon")) out.push_back("neon");
  if (table_for("neondot")) out.push_back("neondot");
  return out;
}

std::string isa() { return active_table()->name; }

std::string set_isa(const std::string& name) {
  const KernelTable* t = (name == "auto") ? best_table() : table_for(name);
  TORCH_CHECK(t != nullptr, "llmbench.kernels: ISA '", name,
              "' is not supported on this CPU/build (supported: auto, ",
              c10::Join(", ", supported_isas()), ")");
  active_table() = t;
  return t->name;
}

void run_rows(RowsFn fn, PrepFn prep, GemvArgs a, double weight_bytes_per_row,
              PrepRowsFn prep_rows = nullptr);

// Splits the N output rows over the intra-op thread pool (OpenMP; honours
// torch.set_num_threads) in chunks that are multiples of the 4-row block.
void run(Fmt fmt, GemvArgs a, double weight_bytes_per_row) {  // a copy: prep sets a.xp
  if (a.N == 0 || a.M == 0) return;
  const KernelTable* table = active_table();
  const RowsFn fn = table->fn[fmt];
  std::vector<float> levels;
  if (a.act_qmax > 0.f && table->prep[fmt] == nullptr) {
    // int8 activations on a path that reads x as floats (generic): hand it the rounded
    // levels times their scale, which its fp32 arithmetic multiplies exactly enough.
    std::vector<int16_t> q(static_cast<size_t>(a.K));
    levels.resize(static_cast<size_t>(a.M * a.K));
    for (int64_t m = 0; m < a.M; ++m) {
      const float scale = quantize_act_row(a, m, q.data());
      for (int64_t k = 0; k < a.K; ++k) levels[m * a.K + k] = q[k] * scale;
    }
    a.x = levels.data();
    a.ldx = a.K;
  }
  run_rows(fn, table->prep[fmt], a, weight_bytes_per_row);
}

// run's prep and thread split for one kernel (a copy of a: prep sets a.xp).
void run_rows(RowsFn fn, PrepFn prep, GemvArgs a, double weight_bytes_per_row,
              PrepRowsFn prep_rows) {
  if (prep != nullptr) {
    // Done once per call, before the threads split the rows: every thread reads it.
    // Room for per-row scales, for padded row chunks (kPrepRowsPad), and to start on a 64-byte
    // boundary: full-width loads from it then never straddle cache lines (the fp32 outer
    // products at 32 rows ran 20% slower from a 16-byte-aligned buffer). Grown, never zeroed:
    // decode alternates K = 576 and 1536 every layer.
    thread_local std::unique_ptr<float[]> prepared;
    thread_local size_t capacity = 0;
    const size_t need = static_cast<size_t>((a.M + kPrepRowsPad) * a.K + 64 + 16);
    if (need > capacity) {
      prepared.reset(new float[need]);
      capacity = need;
    }
    const uintptr_t start = reinterpret_cast<uintptr_t>(prepared.get());
    float* aligned = reinterpret_cast<float*>((start + 63) & ~static_cast<uintptr_t>(63));
    if (prep_rows != nullptr && a.M >= 16) {
      // over the threads, 8 rows at a time: done by one, it left the other waiting for 4-7%
      // of an INT4 --lowp-mode INT8 prefill on the AVX2 path
      at::parallel_for(0, (a.M + 7) / 8, 1, [&](int64_t b, int64_t e) {
        prep_rows(a, aligned, b * 8, std::min<int64_t>(e * 8, a.M));
      });
    } else {
      prep(a, aligned);
    }
    a.xp = aligned;
  }
  const int64_t nquads = (a.N + 3) / 4;
  // Each task streams at least ~64 KiB of weights so that tiny matrices do
  // not pay the fork/join cost for nothing.
  const int64_t grain =
      std::max<int64_t>(1, static_cast<int64_t>(65536.0 / (4.0 * weight_bytes_per_row + 1.0)));
  at::parallel_for(0, nquads, grain, [&](int64_t b, int64_t e) {
    fn(a, b * 4, std::min<int64_t>(e * 4, a.N));
  });
}

// Type problems raise TypeError, shape/value problems ValueError (same as the
// Python fallback).  Non-contiguous inputs are copied (the Python wrappers pass
// contiguous tensors; weights should be contiguous to avoid a per-call copy).
at::Tensor prep_x(const at::Tensor& x, const char* fn) {
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat, fn, ": x must be float32, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.device().is_cpu(), fn, ": x must be a CPU tensor");
  TORCH_CHECK_VALUE(x.dim() >= 1, fn, ": x must be [..., K], got a 0-d tensor");
  at::Tensor x2 = x.dim() == 2 ? x : x.reshape({-1, x.size(-1)});
  if (x2.size(1) > 1 && x2.stride(1) != 1) x2 = x2.contiguous();
  return x2;
}

at::Tensor prep_w(const at::Tensor& w, at::ScalarType dt, int64_t cols, const char* fn,
                  const char* name) {
  TORCH_CHECK_TYPE(w.scalar_type() == dt && w.dim() == 2, fn, ": ", name, " must be a 2-D ", dt,
                   " tensor, got ", w.scalar_type(), " ", w.sizes());
  TORCH_CHECK_VALUE(w.device().is_cpu(), fn, ": ", name, " must be a CPU tensor");
  TORCH_CHECK_VALUE(w.size(1) == cols, fn, ": x has shape [..., ", (dt == at::kByte ? 2 * cols : cols),
                    "] but ", name, " has shape ", w.sizes());
  return w.is_contiguous() ? w : w.contiguous();
}

at::Tensor prep_vec(const at::Tensor& t, int64_t n, const char* what, const char* fn) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, fn, ": ", what, " must be float32, got ",
                   t.scalar_type());
  TORCH_CHECK_VALUE(t.device().is_cpu() && t.numel() == n, fn, ": ", what, " must be a CPU tensor with ",
                    n, " elements, got ", t.sizes());
  return t.is_contiguous() ? t : t.contiguous();
}

// Holds (possibly copied) inputs alive for the duration of the call.
struct Prepared {
  at::Tensor x, w, bias, y, y_view;
  GemvArgs a{};
};

void prepare(Prepared& p, const at::Tensor& x, const at::Tensor& w, at::ScalarType wdt,
             int64_t wcols_per_k2, const std::optional<at::Tensor>& bias, const char* fn,
             const char* wname) {
  p.x = prep_x(x, fn);
  const int64_t K = p.x.size(1);
  int64_t wcols = K;
  if (wcols_per_k2) {  // int4: [N, K/2]
    TORCH_CHECK_VALUE(K % 2 == 0, fn, ": K must be even for packed int4, got ", K);
    wcols = K / 2;
  }
  p.w = prep_w(w, wdt, wcols, fn, wname);
  const int64_t N = p.w.size(0);
  GemvArgs& a = p.a;
  a.x = p.x.data_ptr<float>();
  a.M = p.x.size(0);
  a.K = K;
  a.ldx = a.M > 1 ? p.x.stride(0) : K;
  a.w = p.w.data_ptr();
  a.N = N;
  if (bias.has_value() && bias->defined()) {
    p.bias = prep_vec(*bias, N, "bias", fn);
    a.bias = p.bias.data_ptr<float>();
  }
  p.y = at::empty({a.M, N}, p.x.options());
  a.y = p.y.data_ptr<float>();
  a.ldy = N;
  if (x.dim() != 2) {  // y has x's leading dims
    std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
    shape.back() = N;
    p.y_view = p.y.view(shape);
  } else {
    p.y_view = p.y;
  }
}

// Per-group activation sums for int4's zero-point term (M*K adds; negligible).
void group_sums(const float* x, int64_t M, int64_t ldx, int64_t group_size, int64_t NG,
                float* xsum) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < NG; ++g) {
      const float* q = x + m * ldx + g * group_size;
      float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
      int64_t k = 0;
      for (; k + 4 <= group_size; k += 4) {
        s0 += q[k];
        s1 += q[k + 1];
        s2 += q[k + 2];
        s3 += q[k + 3];
      }
      for (; k < group_size; ++k) s0 += q[k];
      xsum[m * NG + g] = (s0 + s1) + (s2 + s3);
    }
}

at::Tensor linear_f32(const at::Tensor& x, const at::Tensor& w,
                      const std::optional<at::Tensor>& bias) {
  Prepared p;
  prepare(p, x, w, at::kFloat, 0, bias, "linear_f32", "w");
  run(kF32, p.a, 4.0 * p.a.K);
  return p.y_view;
}

at::Tensor linear_bf16w(const at::Tensor& x, const at::Tensor& w,
                        const std::optional<at::Tensor>& bias) {
  Prepared p;
  prepare(p, x, w, at::kBFloat16, 0, bias, "linear_bf16w", "w");
  run(kBF16, p.a, 2.0 * p.a.K);
  return p.y_view;
}

// act_qmax 0: weight-only int8 (activations rounded to int16). 127: int8 activations, with
// act_scale's static scales (1 or M of them) or, without it, max-abs per row.
at::Tensor linear_int8w(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                        const std::optional<at::Tensor>& bias, double act_qmax,
                        const std::optional<at::Tensor>& act_scale) {
  const char* fn = "linear_int8w";
  Prepared p;
  prepare(p, x, qweight, at::kChar, 0, bias, fn, "qweight");
  const at::Tensor s = prep_vec(scales, p.a.N, "scales", fn);
  p.a.scales = s.data_ptr<float>();
  TORCH_CHECK_VALUE(act_qmax == 0.0 || (act_qmax >= 1.0 && act_qmax <= 127.0), fn,
                    ": act_qmax must be 0 (int16 activations) or in [1, 127], got ", act_qmax);
  p.a.act_qmax = static_cast<float>(act_qmax);
  at::Tensor act;
  if (act_scale.has_value() && act_scale->defined()) {
    TORCH_CHECK_VALUE(act_qmax > 0.0, fn, ": act_scale needs act_qmax > 0");
    act = act_scale->to(at::kFloat).contiguous();
    TORCH_CHECK_VALUE(act.numel() == 1 || act.numel() == p.a.M, fn,
                      ": act_scale must have 1 or M elements, got ", act.numel());
    p.a.act_scale = act.data_ptr<float>();
    p.a.act_scale_n = act.numel();
  }
  LinearDesc d;
  d.fmt = kI8;
  d.K = p.a.K;
  d.act_qmax = p.a.act_qmax;
  d.act_scale = p.a.act_scale;
  if (amx_ok(d, p.a.M)) {
    d.w = p.a.w;
    d.N = p.a.N;
    d.scales = p.a.scales;
    d.bias = p.a.bias;
    linear_amx(d, p.a.x, p.a.M, p.a.ldx, p.a.y, p.a.ldy);
    return p.y_view;
  }
  run(kI8, p.a, 1.0 * p.a.K);
  return p.y_view;
}

void check_int4_group(int64_t K, int64_t group_size, const char* fn) {
  TORCH_CHECK_VALUE(group_size == K || (group_size >= 32 && (group_size & (group_size - 1)) == 0 &&
                                        K % group_size == 0),
                    fn, ": group_size must be K or a power of two >= 32 dividing K (K=", K,
                    ", group_size=", group_size, ")");
}

// x [..., k] -> [..., K] with zero columns k..K-1 (a row narrower than int4's whole groups).
at::Tensor pad_columns(const at::Tensor& x, int64_t K) {
  const int64_t k = x.size(-1);
  const at::Tensor x2 = x.reshape({-1, k}).contiguous();
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = K;
  at::Tensor out = at::empty(shape, x.options());
  const float* src = x2.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  for (int64_t r = 0; r < x2.size(0); ++r) {
    std::copy_n(src + r * k, k, dst + r * K);
    std::fill(dst + r * K + k, dst + (r + 1) * K, 0.f);
  }
  return out;
}

at::Tensor linear_int4w(const at::Tensor& x_in, const at::Tensor& qweight,
                        const at::Tensor& scales, const at::Tensor& zeros, int64_t group_size,
                        const std::optional<at::Tensor>& bias, bool act_levels,
                        bool act_per_tensor, bool act_sym, int64_t act_block) {
  const char* fn = "linear_int4w";
  // A row narrower than the packed one by less than a group (K padded up to whole groups):
  // zeros past its end. Anything else is a shape error (prepare says so).
  const bool narrow = x_in.scalar_type() == at::kFloat && x_in.dim() >= 1 &&
                      qweight.dim() == 2 && x_in.size(-1) < 2 * qweight.size(1) &&
                      x_in.size(-1) > 2 * qweight.size(1) - group_size;
  const at::Tensor x = narrow ? pad_columns(x_in, 2 * qweight.size(1)) : x_in;
  Prepared p;
  prepare(p, x, qweight, at::kByte, 1, bias, fn, "qweight");
  GemvArgs& a = p.a;
  const int64_t K = a.K;
  check_int4_group(K, group_size, fn);
  const int64_t NG = K / group_size;
  const at::Tensor s = prep_vec(scales, a.N * NG, "scales", fn);
  const at::Tensor z = prep_vec(zeros, a.N * NG, "zeros", fn);
  a.scales = s.data_ptr<float>();
  a.zeros = z.data_ptr<float>();
  a.group_size = group_size;
  a.ngroups = NG;
  if (act_levels) {  // int8 activations (--lowp-mode INT8): linear_rows quantizes x itself
    TORCH_CHECK_VALUE(act_block >= 0, fn, ": act_block must be >= 0, got ", act_block);
    LinearDesc d;
    d.fmt = kI4;
    d.w = a.w;
    d.N = a.N;
    d.K = K;
    d.scales = a.scales;
    d.zeros = a.zeros;
    d.group_size = group_size;
    d.bias = a.bias;
    d.act.enabled = true;
    d.act.per_tensor = act_per_tensor;
    d.act.sym = act_sym;
    d.act.block = act_block;
    linear_rows(d, a.x, a.M, a.ldx, a.y, a.ldy);
    return p.y_view;
  }
  std::vector<float> xsum(static_cast<size_t>(a.M * NG));
  group_sums(a.x, a.M, a.ldx, group_size, NG, xsum.data());
  a.xsum = xsum.data();
  run(kI4, a, 0.5 * K + 8.0 * NG);
  return p.y_view;
}

// The torch-facing form of quantize_act_levels: x [..., K] -> its int8 levels, same shape.
at::Tensor act_levels(const at::Tensor& x, bool per_tensor, bool sym, int64_t block) {
  const char* fn = "act_levels";
  at::Tensor x2 = prep_x(x, fn).contiguous();
  at::Tensor out = at::empty_like(x2);
  ActQuant q;
  q.enabled = true;
  q.per_tensor = per_tensor;
  q.sym = sym;
  q.block = block;
  TORCH_CHECK_VALUE(block >= 0, fn, ": block must be >= 0, got ", block);
  quantize_act_levels(q, x2.data_ptr<float>(), x2.size(0), x2.size(1), x2.size(1),
                      out.data_ptr<float>());
  return out.view(x.sizes());
}

}  // namespace

const KernelTable& active_kernels() { return *active_table(); }

namespace {

// int4 / int8 weights with symmetric dynamic int8 activations (--lowp-mode INT8) on AMX-INT8
// (kernels_amx.cpp) from this many rows on (set_amx_rows; 0: never). Below it the GEMV
// kernels run: decode reads each weight once either way. SmolLM2's 30 layers of projections,
// 2 threads (docs/performance.md): int4 at 2 rows 4.6 ms on the u8 x s8 kernels against 4.9
// on the tiles, at 3 rows 5.4 against 5.2; int8 at 2 rows 8.7 ms on the kernels against 5.3.
int64_t& amx_min_rows() {
  static int64_t rows = amx_int8_ready() ? 2 : 0;
  return rows;
}

// int4 groups in whole 64-element units (a tile row, a u8 x s8 unit) and int8-activation
// blocks made of whole groups: what both int4 x int8 kernels need.
bool i4_units_fit(const LinearDesc& d) {
  const int64_t G = d.group_size, block = d.act.block;
  return G % 64 == 0 && d.K % G == 0 &&
         (block <= 0 || block >= d.K || (block % G == 0 && d.K % block == 0));
}

}  // namespace

bool amx_ok(const LinearDesc& d, int64_t M) {
  const int64_t rows = amx_min_rows();
  // Only on the path that is AMX's CPU's best (a forced --isa / LLMBENCH_KERNELS_ISA means
  // those kernels), and with K in whole 64-byte tile rows.
  if (rows <= 0 || M < rows || active_table() != avx512vnni_table() || d.K % 64 != 0)
    return false;
  if (d.fmt == kI8)  // dynamic per-row scales (SmoothQuant's static ones guard against overflow)
    return d.act_qmax == 127.f && d.act_scale == nullptr && !d.act.enabled;
  // int4: symmetric levels (an asymmetric level minus its zero point needs 9 bits)
  return d.fmt == kI4 && d.act.enabled && d.act.sym && i4_units_fit(d);
}

namespace {

void linear_amx(const LinearDesc& d, const float* x, int64_t M, int64_t ldx, float* y,
                int64_t ldy) {
  AmxArgs a{};
  a.fmt = d.fmt;
  a.w = d.w;
  a.N = d.N;
  a.K = d.K;
  a.M = M;
  a.Mpad = (M + 15) / 16 * 16;
  a.group_size = d.fmt == kI4 ? d.group_size : d.K;
  a.scales = d.scales;
  a.zeros = d.zeros;
  a.bias = d.bias;
  a.y = y;
  a.ldy = ldy;
  const int64_t NG = d.K / a.group_size;
  thread_local std::vector<int8_t> xb;
  thread_local std::vector<float> sums;
  xb.resize(static_cast<size_t>(a.Mpad * d.K * (d.fmt == kBF16 ? 2 : 1) + 64));
  sums.resize(static_cast<size_t>(2 * NG * a.Mpad));
  a.xb = xb.data() + (64 - reinterpret_cast<uintptr_t>(xb.data()) % 64) % 64;
  a.sx = sums.data();
  a.xsum = sums.data() + NG * a.Mpad;
  const bool per_tensor = d.fmt == kI4 && d.act.per_tensor;
  const int64_t block = d.fmt == kI4 ? d.act.block : 0;
  if (per_tensor) amx_tensor_scales(a, x, ldx, block);
  at::parallel_for(0, a.Mpad / 16, 1, [&](int64_t b, int64_t e) {
    amx_pack_x(a, x, ldx, per_tensor, block, b, e);
  });
  at::parallel_for(0, (d.N + 15) / 16, 1, [&](int64_t b, int64_t e) { amx_rows(a, b, e); });
}

}  // namespace

// The u8 x s8 int4 kernels on (the default) or off (set_i4q8: A/B runs against the int16
// kernels on the int8 levels).
bool& i4q8_on() {
  static bool on = true;
  return on;
}

// int4 with symmetric int8 activations in whole 64-element units: the path's u8 x s8 kernels
// where it has them (set_i4q8), on the int8 levels themselves.
bool i4q8_ok(const LinearDesc& d) {
  return d.fmt == kI4 && d.act.enabled && d.act.sym && active_table()->i4q8 != nullptr &&
         i4q8_on() && i4_units_fit(d);
}

// Whether linear_int4w with int8 activations of these settings (--lowp-mode INT8) runs on
// AMX-INT8 tiles ("amx", any M), the path's u8 x s8 kernels ("u8s8") or the weight-only
// kernels on the int8 levels ("levels").
std::string i4_act_kernel(int64_t M, int64_t K, int64_t group_size, bool sym, int64_t block) {
  LinearDesc d;
  d.fmt = kI4;
  d.K = K;
  d.group_size = group_size;
  d.act.enabled = true;
  d.act.sym = sym;
  d.act.block = block;
  return amx_ok(d, M) ? "amx" : i4q8_ok(d) ? "u8s8" : "levels";
}

bool set_i4q8(int64_t on) {
  if (on >= 0) i4q8_on() = on != 0;
  return i4q8_on() && active_table()->i4q8 != nullptr;
}

int64_t set_outer_rows(int64_t min_rows) {
  if (min_rows >= -1) f32_outer_rows_setting() = min_rows;
  return f32_outer_rows_setting();
}

int64_t set_amx_rows(int64_t min_rows) {
  if (min_rows >= 0) amx_min_rows() = amx_int8_ready() ? min_rows : 0;
  return amx_min_rows();
}

bool amx_i4_takes(int64_t M, int64_t K, int64_t group_size, bool sym, int64_t block) {
  return i4_act_kernel(M, K, group_size, sym, block) == "amx";
}

// Whether bf16 weights with K in_features multiply M rows on AMX-BF16 (amx_linear_bf16): the
// CPU has it, the avx512vnni path is active, the AMX kernels are on (set_amx_rows), and M is
// at most kAmxBf16MaxRows: past that torch's blocked bf16 GEMM won (SmolLM2's projections,
// hot weights, 2 threads: 256 rows 1.89 ms on the tiles against 2.14 ms, 512 rows 3.87
// against 3.17, 1024 rows 7.48 against 6.44; its per-call weight reorder is amortized there).
constexpr int64_t kAmxBf16MaxRows = 256;

bool amx_bf16_takes(int64_t M, int64_t K) {
  return amx_bf16_ready() && amx_min_rows() > 0 && active_table() == avx512vnni_table() &&
         K % 32 == 0 && M <= kAmxBf16MaxRows;
}

// y [..., N] fp32 = bf16(x) @ w.T (+ bias), fp32 sums, rounded to bf16 values: a bf16 GEMM's
// result without torch's per-call weight reorder (kernels_amx.cpp).
void linear_bf16_amx(const uint16_t* w, int64_t N, int64_t K, const float* x, int64_t M,
                     int64_t ldx, const float* bias, float* y, int64_t ldy) {
  LinearDesc d;
  d.fmt = kBF16;
  d.w = w;
  d.N = N;
  d.K = K;
  d.bias = bias;
  linear_amx(d, x, M, ldx, y, ldy);
}

at::Tensor amx_linear_bf16(const at::Tensor& x, const at::Tensor& w,
                           const std::optional<at::Tensor>& bias) {
  const char* fn = "amx_linear_bf16";
  Prepared p;
  prepare(p, x, w, at::kBFloat16, 0, bias, fn, "w");
  TORCH_CHECK_VALUE(amx_bf16_ready() && p.a.K % 32 == 0, fn,
                    ": AMX-BF16 is not usable here for K = ", p.a.K);
  linear_bf16_amx(static_cast<const uint16_t*>(p.a.w), p.a.N, p.a.K, p.a.x, p.a.M, p.a.ldx,
                  p.a.bias, p.a.y, p.a.ldy);
  return p.y_view;
}

// The same for int8 weights with dynamic per-row int8 activations.
bool amx_i8_takes(int64_t M, int64_t K) {
  LinearDesc d;
  d.fmt = kI8;
  d.K = K;
  d.act_qmax = 127.f;
  return amx_ok(d, M);
}

void linear_rows(const LinearDesc& d, const float* x, int64_t M, int64_t ldx, float* y,
                 int64_t ldy) {
  thread_local std::vector<float> levels;
  if (amx_ok(d, M)) {
    linear_amx(d, x, M, ldx, y, ldy);
    return;
  }
  const bool i8_levels = i4q8_ok(d);
  if (d.act.enabled && !i8_levels) {  // everything below, zero-point sums included, sees the int8 levels
    levels.resize(static_cast<size_t>(M * d.K));
    quantize_act_levels(d.act, x, M, ldx, d.K, levels.data());
    x = levels.data();
    ldx = d.K;
  }
  GemvArgs a{};
  a.x = x;
  a.ldx = ldx;
  a.M = M;
  a.K = d.K;
  a.w = d.w;
  a.N = d.N;
  a.scales = d.scales;
  a.zeros = d.zeros;
  a.bias = d.bias;
  a.y = y;
  a.ldy = ldy;
  a.act_qmax = d.act_qmax;
  switch (d.fmt) {
    case kF32: run(kF32, a, 4.0 * d.K); break;
    case kBF16: run(kBF16, a, 2.0 * d.K); break;
    case kI8: {
      if (d.act_scale != nullptr) {
        // SmoothQuant's static scale; a row beyond its range (an attention-sink token) would
        // saturate, so it runs with int16 activations instead, as StaticInt8Linear does.
        a.act_scale = d.act_scale;
        a.act_scale_n = 1;
        const float limit = kActOverflow * d.act_scale[0];
        for (int64_t m = 0; m < M; ++m) {
          GemvArgs row = a;
          row.x = x + m * ldx;
          row.y = y + m * ldy;
          row.M = 1;
          float top = 0.f;
          for (int64_t k = 0; k < d.K; ++k) top = std::max(top, std::fabs(row.x[k]));
          if (top > limit) row.act_qmax = 0.f;
          run(kI8, row, 1.0 * d.K);
        }
      } else {
        run(kI8, a, 1.0 * d.K);
      }
      // Asymmetric rows, w = (q - z) * s: x @ w.T = s * (x @ q.T) - sum(x) * s * z.
      if (d.zeros != nullptr) {
        std::vector<float> xsum(static_cast<size_t>(M));
        group_sums(x, M, ldx, d.K, 1, xsum.data());  // one group: the whole row
        for (int64_t m = 0; m < M; ++m) {
          float* row = y + m * ldy;
          for (int64_t n = 0; n < d.N; ++n) row[n] -= xsum[m] * d.scales[n] * d.zeros[n];
        }
      }
      break;
    }
    case kI4: {
      a.group_size = d.group_size;
      a.ngroups = d.K / d.group_size;
      if (i8_levels) {  // the u8 x s8 kernels quantize x themselves (prep_i4q8)
        a.act_per_tensor = d.act.per_tensor;
        a.act_block = d.act.block;
        run_rows(active_table()->i4q8, active_table()->i4q8_prep, a, 0.5 * d.K + 8.0 * a.ngroups,
                 a.act_per_tensor ? nullptr : active_table()->i4q8_prep_rows);
        break;
      }
      std::vector<float> xsum(static_cast<size_t>(M * a.ngroups));
      group_sums(x, M, ldx, d.group_size, a.ngroups, xsum.data());
      a.xsum = xsum.data();
      run(kI4, a, 0.5 * d.K + 8.0 * a.ngroups);
      break;
    }
    default: TORCH_CHECK(false, "linear_rows: unknown weight format ", static_cast<int>(d.fmt));
  }
}

// The Python layer step's RMSNorm (prefill, and decode without the compiled step): x [..., n]
// fp32 -> a new tensor, rows split over threads. One call instead of six torch ops.
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat,
              "rms_norm: x and weight must be float32");
  TORCH_CHECK(x.dim() >= 1 && weight.dim() == 1 && weight.size(0) == x.size(-1),
              "rms_norm: weight [", weight.numel(), "] does not match x's last dim");
  const at::Tensor xc = x.contiguous(), wc = weight.contiguous();
  at::Tensor out = at::empty_like(xc);
  const int64_t n = xc.size(-1), rows = n ? xc.numel() / n : 0;
  const float* xp = xc.data_ptr<float>();
  const float* wp = wc.data_ptr<float>();
  float* yp = out.data_ptr<float>();
  at::parallel_for(0, rows, 16, [&](int64_t b, int64_t e) {
    rms_norm_rows(xp + b * n, wp, yp + b * n, e - b, n, static_cast<float>(eps));
  });
  return out;
}

// RoPE on the q and k heads of a fused qkv projection's output, in place: qkv [T, (heads +
// 2 * kv_heads) * d] fp32 contiguous, token t at row t % S of cos and sin [S, rot] (T = rows x
// S tokens, row-major). v is left alone.
void rope_qk_(at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
              int64_t heads, int64_t kv_heads, int64_t head_dim) {
  TORCH_CHECK(qkv.scalar_type() == at::kFloat && qkv.is_contiguous() && qkv.dim() == 2,
              "rope_qk_: qkv must be a contiguous 2-D float32 tensor");
  TORCH_CHECK(qkv.size(1) == (heads + 2 * kv_heads) * head_dim, "rope_qk_: qkv has ",
              qkv.size(1), " columns, expected (heads + 2 * kv_heads) * head_dim");
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat &&
                  cos.dim() == 2 && cos.sizes() == sin.sizes(),
              "rope_qk_: cos and sin must be float32 [S, rot] of one shape");
  const int64_t S = cos.size(0), rot = cos.size(1), T = qkv.size(0);
  TORCH_CHECK(S > 0 && T % S == 0 && rot <= head_dim && rot % 2 == 0,
              "rope_qk_: ", T, " tokens are not rows of ", S, " positions, or rot ", rot,
              " does not fit head_dim ", head_dim);
  const at::Tensor cc = cos.contiguous(), sc = sin.contiguous();
  const float* cp = cc.data_ptr<float>();
  const float* sp = sc.data_ptr<float>();
  float* base = qkv.data_ptr<float>();
  const int64_t width = qkv.size(1), rotated = heads + kv_heads;
  at::parallel_for(0, T, 8, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const int64_t s = t % S;
      for (int64_t h = 0; h < rotated; ++h)
        rope_head(base + t * width + h * head_dim, cp + s * rot, sp + s * rot, rot);
    }
  });
}

void register_decode(pybind11::module& m);  // decode_step.cpp
void register_quant_search(pybind11::module& m);  // quant_search.cpp

}  // namespace llmb

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.doc() = "llmbench small-M (decode) linear kernels: AVX-512/AVX2/generic, run-time dispatch";
  m.def("linear_f32", &llmb::linear_f32, py::arg("x"), py::arg("w"), py::arg("bias") = py::none());
  m.def("linear_bf16w", &llmb::linear_bf16w, py::arg("x"), py::arg("w"),
        py::arg("bias") = py::none());
  m.def("linear_int8w", &llmb::linear_int8w, py::arg("x"), py::arg("qweight"), py::arg("scales"),
        py::arg("bias") = py::none(), py::arg("act_qmax") = 0.0,
        py::arg("act_scale") = py::none());
  m.def("linear_int4w", &llmb::linear_int4w, py::arg("x"), py::arg("qweight"), py::arg("scales"),
        py::arg("zeros"), py::arg("group_size"), py::arg("bias") = py::none(),
        py::arg("act_levels") = false, py::arg("act_per_tensor") = false,
        py::arg("act_sym") = true, py::arg("act_block") = 0);
  m.def("amx_i4_takes", &llmb::amx_i4_takes, py::arg("rows"), py::arg("k"),
        py::arg("group_size"), py::arg("sym"), py::arg("block"));
  m.def("set_i4q8", &llmb::set_i4q8, py::arg("on") = -1,
        "int4 x int8-activation u8 x s8 kernels of the active path on (1) or off (0; -1: "
        "unchanged); returns whether they run");
  m.def("i4_act_kernel", &llmb::i4_act_kernel, py::arg("rows"), py::arg("k"),
        py::arg("group_size"), py::arg("sym"), py::arg("block"));
  m.def("amx_bf16_takes", &llmb::amx_bf16_takes, py::arg("rows"), py::arg("k"));
  m.def("amx_linear_bf16", &llmb::amx_linear_bf16, py::arg("x"), py::arg("w"),
        py::arg("bias") = py::none());
  m.def("amx_i8_takes", &llmb::amx_i8_takes, py::arg("rows"), py::arg("k"));
  m.def("set_amx_rows", &llmb::set_amx_rows, py::arg("min_rows") = -1,
        "int8 / int4 x int8-activation linears from min_rows rows on run on AMX-INT8 (0: "
        "never; -1: unchanged); returns the setting, 0 where AMX-INT8 is unavailable");
  m.def("set_outer_rows", &llmb::set_outer_rows, py::arg("min_rows") = -2,
        "fp32 linears from min_rows rows on multiply as outer products where the path has "
        "them (-1: the path's own threshold, 0: never, -2: unchanged); returns the setting");
  m.def("act_levels", &llmb::act_levels, py::arg("x"), py::arg("per_tensor"), py::arg("sym"),
        py::arg("block"));
  m.def("rms_norm", &llmb::rms_norm, py::arg("x"), py::arg("weight"), py::arg("eps"));
  m.def("rope_qk_", &llmb::rope_qk_, py::arg("qkv"), py::arg("cos"), py::arg("sin"),
        py::arg("heads"), py::arg("kv_heads"), py::arg("head_dim"));
  m.def("isa", &llmb::isa, "name of the active kernel path");
  m.def("set_isa", &llmb::set_isa, py::arg("name"),
        "force 'generic'/'avx2'/'avx512'/'avx512vnni' or 'auto'; returns the active name");
  m.def("supported_isas", &llmb::supported_isas);
  llmb::register_decode(m);
  llmb::register_quant_search(m);
}
