// The clipping search of round-to-nearest quantization (llmbench.quant.rtn._clipped_grid,
// _GroupRanges) in one pass per group: for each range shrink, the squared error of the group rebuilt from
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
#include <tuple>

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

// One weight's level on the grid of scale s (and low lo when asymmetric: q in [qmin, levels]),
// in torch's steps: (w - lo) / s, rounded (half to even), clamped.
inline float level_of(float w, float s, float lo, bool asym, float qmin, float levels) {
  float t = w;
  if (asym) t = t - lo;
  t = t / s;
  // clamped before rounding (the same as after, for integer bounds), so |t| < 2^22
  t = std::min(std::max(t, qmin), levels);
  t = t + kRound;
  return t - kRound;
}

// Its squared error once rebuilt: q * s + lo.
inline float rebuilt_error(float w, float s, float lo, bool asym, float qmin, float levels) {
  float r = level_of(w, s, lo, asym, qmin, levels) * s;
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

// The levels of one group of n weights on the chosen grid, as int16.
LLMB_CLONES void group_levels(const float* w, int64_t n, float s, float lo, bool asym,
                              float levels, int16_t* q) {
  const float qmin = asym ? 0.f : -levels;
  for (int64_t i = 0; i < n; ++i)
    q[i] = static_cast<int16_t>(level_of(w[i], s, lo, asym, qmin, levels));
}

// The least and largest of n > 0 weights (min and max are exact in any order).
LLMB_CLONES void group_range(const float* w, int64_t n, float* lo, float* hi) {
  float mn[kLanes], mx[kLanes];
  for (int l = 0; l < kLanes; ++l) mn[l] = mx[l] = w[0];
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) {
      mn[l] = std::min(mn[l], w[i + l]);
      mx[l] = std::max(mx[l], w[i + l]);
    }
  for (; i < n; ++i) {
    mn[0] = std::min(mn[0], w[i]);
    mx[0] = std::max(mx[0], w[i]);
  }
  for (int l = 1; l < kLanes; ++l) {
    mn[0] = std::min(mn[0], mn[l]);
    mx[0] = std::max(mx[0], mx[l]);
  }
  *lo = mn[0];
  *hi = mx[0];
}

}  // namespace

// wg [rows, groups, size] fp32; scales [shrinks, rows, groups] fp32 (and lows, asymmetric).
// Returns the index of each group's best shrink, int64 [rows, groups]: the least squared
// error, the first shrink on ties (as the torch search). With `levels_out` (int16, wg's shape)
// each group's levels on its best shrink's grid are written there, as torch would round them.
at::Tensor clip_search(const at::Tensor& wg, const at::Tensor& scales,
                       const std::optional<at::Tensor>& lows, double levels,
                       const std::optional<at::Tensor>& levels_out) {
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
  if (levels_out)
    TORCH_CHECK(levels_out->sizes() == wg.sizes() && levels_out->scalar_type() == at::kShort &&
                    levels_out->is_contiguous(),
                "clip_search: levels_out must be a contiguous int16 tensor shaped as wg");
  const int64_t shrinks = scales.size(0), cells = rows * groups;
  int16_t* q = levels_out ? levels_out->data_ptr<int16_t>() : nullptr;
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
      if (q != nullptr)
        group_levels(w + c * size, size, s[index * cells + c], asym ? lo[index * cells + c] : 0.f,
                     asym, lv, q + c * size);
    }
  });
  return best;
}

// Each group's least and largest weight, [rows, groups] each (torch.aminmax over the last
// dimension, which ran at under 2 GB/s here: a fifth of the compiled quantization's time).
std::tuple<at::Tensor, at::Tensor> group_ranges(const at::Tensor& wg) {
  TORCH_CHECK(wg.dim() == 3 && wg.scalar_type() == at::kFloat && wg.is_contiguous() &&
                  wg.size(2) > 0,
              "group_ranges: wg must be a contiguous float32 [rows, groups, size > 0] tensor");
  const int64_t cells = wg.size(0) * wg.size(1), size = wg.size(2);
  at::Tensor lo = at::empty({wg.size(0), wg.size(1)}, wg.options());
  at::Tensor hi = at::empty({wg.size(0), wg.size(1)}, wg.options());
  const float* w = wg.data_ptr<float>();
  float* lp = lo.data_ptr<float>();
  float* hp = hi.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / size);
  at::parallel_for(0, cells, grain, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) group_range(w + c * size, size, lp + c, hp + c);
  });
  return {lo, hi};
}

void register_quant_search(pybind11::module& m) {
  namespace py = pybind11;
  m.def("clip_search", &clip_search, py::arg("wg"), py::arg("scales"),
        py::arg("lows") = py::none(), py::arg("levels"), py::arg("levels_out") = py::none(),
        "index of each group's least-error range shrink (llmbench.quant.rtn's search)");
  m.def("group_ranges", &group_ranges, py::arg("wg"), "each group's (min, max)");
}

}  // namespace llmb
