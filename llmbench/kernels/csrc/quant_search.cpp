// The clipping search of round-to-nearest quantization (llmbench.quant.rtn._clipped_grid_rows)
// in one pass per group: for each range shrink, the squared error of the group rebuilt from
// its grid, kept in registers. In torch each shrink is ~10 passes over a [rows, groups, size]
// buffer (div, round, clamp, mul, sub, square, sum, compare), which made INT8's 26-shrink
// search about 20 M weights/s per thread: a minute for a 1B model, on every rank under
// tensor parallel.
//
// The scales (and lows) of every shrink come from torch, so they are the torch search's bit
// for bit; each element is rebuilt with the same fp32 operations in the same order (no fused
// multiply-add: the pragma below, and one operation per statement for compilers that ignore
// it), so a weight that lies on its grid rebuilds exactly, as in torch. Only the sum of each
// group's squared errors is added in another order than torch's reduction, which can change
// the choice between two shrinks whose errors tie to the last bits.
#pragma GCC optimize("fp-contract=off")

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <cmath>
#include <optional>

namespace llmb {
namespace {

constexpr int kLanes = 16;  // partial sums per group: the vector width the loop is written for
// 1.5 * 2^23: adding and subtracting it rounds a float of magnitude < 2^22 to the nearest
// integer, ties to even (as torch.round), in vectorizable code
constexpr float kRound = 12582912.0f;

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define LLMB_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define LLMB_CLONES
#endif

// One weight's squared error once rebuilt on the grid of scale s (and low lo when asymmetric:
// q in [qmin, levels]), in torch's steps: (w - lo) / s, rounded, clamped, * s + lo.
inline float rebuilt_error(float w, float s, float lo, bool asym, float qmin, float levels) {
  float t = w;
  if (asym) t = t - lo;
  t = t / s;
  // clamped before rounding (the same as after, for integer bounds), so |t| < 2^22
  t = std::min(std::max(t, qmin), levels);
  t = t + kRound;
  t = t - kRound;
  float r = t * s;
  if (asym) r = r + lo;
  const float d = r - w;
  return d * d;
}

// Squared error of one group of n weights (q in [0, levels] asymmetric, else [-levels,
// levels]): kLanes partial sums, then added in lane order.
LLMB_CLONES float group_error(const float* w, int64_t n, float s, float lo, bool asym,
                              float levels) {
  const float qmin = asym ? 0.f : -levels;
  float acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l)
      acc[l] = acc[l] + rebuilt_error(w[i + l], s, lo, asym, qmin, levels);
  float total = 0.f;
  for (int l = 0; l < kLanes; ++l) total = total + acc[l];
  for (; i < n; ++i) total = total + rebuilt_error(w[i], s, lo, asym, qmin, levels);
  return total;
}

}  // namespace

// wg [rows, groups, size] fp32; scales [shrinks, rows, groups] fp32 (and lows, asymmetric).
// Returns the index of each group's best shrink, int64 [rows, groups]: the least squared
// error, the first shrink on ties (as the torch search).
at::Tensor clip_search(const at::Tensor& wg, const at::Tensor& scales,
                       const std::optional<at::Tensor>& lows, double levels) {
  TORCH_CHECK(wg.dim() == 3 && wg.scalar_type() == at::kFloat && wg.is_contiguous(),
              "clip_search: wg must be a contiguous float32 [rows, groups, size] tensor");
  const int64_t rows = wg.size(0), groups = wg.size(1), size = wg.size(2);
  TORCH_CHECK(scales.dim() == 3 && scales.scalar_type() == at::kFloat &&
                  scales.is_contiguous() && scales.size(1) == rows && scales.size(2) == groups,
              "clip_search: scales must be a contiguous float32 [shrinks, rows, groups] tensor");
  const bool asym = lows.has_value();
  if (asym)
    TORCH_CHECK(lows->sizes() == scales.sizes() && lows->scalar_type() == at::kFloat &&
                    lows->is_contiguous(),
                "clip_search: lows must be shaped and typed as scales");
  const int64_t shrinks = scales.size(0), cells = rows * groups;
  at::Tensor best = at::empty({rows, groups}, wg.options().dtype(at::kLong));
  const float* w = wg.data_ptr<float>();
  const float* s = scales.data_ptr<float>();
  const float* lo = asym ? lows->data_ptr<float>() : nullptr;
  int64_t* out = best.data_ptr<int64_t>();
  const float lv = static_cast<float>(levels);
  // about 64 K weights of work per task
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, size));
  at::parallel_for(0, cells, grain, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      float best_err = 0.f;
      int64_t index = 0;
      for (int64_t k = 0; k < shrinks; ++k) {
        const float err = group_error(w + c * size, size, s[k * cells + c],
                                      asym ? lo[k * cells + c] : 0.f, asym, lv);
        if (k == 0 || err < best_err) {
          best_err = err;
          index = k;
        }
      }
      out[c] = index;
    }
  });
  return best;
}

void register_quant_search(pybind11::module& m) {
  namespace py = pybind11;
  m.def("clip_search", &clip_search, py::arg("wg"), py::arg("scales"),
        py::arg("lows") = py::none(), py::arg("levels"),
        "index of each group's least-error range shrink (llmbench.quant.rtn's search)");
}

}  // namespace llmb
