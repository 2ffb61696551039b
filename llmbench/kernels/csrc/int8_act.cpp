// int8 activations x int8 weights for SmoothQuant W8A8 (and dynamic per-row int8), small M.
//
//   y[m, n] = (sum_k xq[m, k] * w[n, k]) * act_scale[m or 0] * wscale[n] (+ bias[n])
//   xq = clamp(round_half_even(x / act_scale), -127, 127)
//
// The activations are quantized once per call into an int16 buffer; the AVX2 path widens 16
// weights to int16 (vpmovsxbw) and multiplies with _mm256_madd_epi16, which adds adjacent
// int16 x int16 products into int32 without saturation (_mm256_maddubs_epi16 would saturate
// at int16 and needs unsigned x). Products are <= 127 * 127, so int32 accumulation is exact for
// any K below ~130k. Registered with TORCH_LIBRARY_FRAGMENT(llmbench): torch.ops.llmbench.*,
// so this file needs nothing from ops.cpp.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/torch.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define LLMB_W8A8_X86 1
#endif

namespace llmb_w8a8 {

// Computes int32 dot products for weight rows [n0, n1) and all M rows of xq.
using DotFn = void (*)(const int16_t* xq, int64_t M, int64_t K, const int8_t* w, int64_t n0,
                       int64_t n1, int32_t* acc /* [M, N] */, int64_t N);

void dot_generic(const int16_t* xq, int64_t M, int64_t K, const int8_t* w, int64_t n0,
                 int64_t n1, int32_t* acc, int64_t N) {
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* wr = w + n * K;
    for (int64_t m = 0; m < M; ++m) {
      const int16_t* xr = xq + m * K;
      int32_t s = 0;
      for (int64_t k = 0; k < K; ++k) s += static_cast<int32_t>(wr[k]) * xr[k];
      acc[m * N + n] = s;
    }
  }
}

#ifdef LLMB_W8A8_X86
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#elif defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif
namespace {

inline int32_t hsum_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

// R weight rows x MT activation rows: R * MT accumulators + R weight registers.
template <int R, int MT>
inline void tile(const int16_t* xq, int64_t K, const int8_t* w, int64_t n, int64_t m0,
                 int32_t* acc, int64_t N) {
  __m256i a[R][MT];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MT; ++m) a[r][m] = _mm256_setzero_si256();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    __m256i wv[R];
    for (int r = 0; r < R; ++r)
      wv[r] = _mm256_cvtepi8_epi16(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + (n + r) * K + k)));
    for (int m = 0; m < MT; ++m) {
      const __m256i xv =
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + (m0 + m) * K + k));
      for (int r = 0; r < R; ++r) a[r][m] = _mm256_add_epi32(a[r][m], _mm256_madd_epi16(wv[r], xv));
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MT; ++m) {
      int32_t s = hsum_epi32(a[r][m]);
      for (int64_t kk = k; kk < K; ++kk)  // K tail (K not a multiple of 16)
        s += static_cast<int32_t>(w[(n + r) * K + kk]) * xq[(m0 + m) * K + kk];
      acc[(m0 + m) * N + n + r] = s;
    }
}

template <int R>
inline void rows(const int16_t* xq, int64_t M, int64_t K, const int8_t* w, int64_t n,
                 int32_t* acc, int64_t N) {
  int64_t m = 0;
  for (; m + 2 <= M; m += 2) tile<R, 2>(xq, K, w, n, m, acc, N);
  if (m < M) tile<R, 1>(xq, K, w, n, m, acc, N);
}

void dot_avx2(const int16_t* xq, int64_t M, int64_t K, const int8_t* w, int64_t n0, int64_t n1,
              int32_t* acc, int64_t N) {
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) rows<4>(xq, M, K, w, n, acc, N);
  for (; n < n1; ++n) rows<1>(xq, M, K, w, n, acc, N);
}

}  // namespace
#if defined(__clang__)
#pragma clang attribute pop
#elif defined(__GNUC__)
#pragma GCC pop_options
#endif
#endif  // LLMB_W8A8_X86

bool cpu_has_avx2() {
#if defined(LLMB_W8A8_X86) && defined(__GNUC__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

std::string& active() {
  static std::string name = cpu_has_avx2() ? "avx2" : "generic";
  return name;
}

DotFn dot_fn() {
#ifdef LLMB_W8A8_X86
  if (active() == "avx2") return dot_avx2;
#endif
  return dot_generic;
}

// "" reports the active path; "generic", "avx2" or "auto" selects one.
std::string isa(const std::string& name) {
  if (name == "auto") {
    active() = cpu_has_avx2() ? "avx2" : "generic";
  } else if (name == "generic") {
    active() = name;
  } else if (name == "avx2") {
    TORCH_CHECK(cpu_has_avx2(), "w8a8: avx2 is not supported on this CPU/build");
    active() = name;
  } else {
    TORCH_CHECK(name.empty(), "w8a8: unknown ISA '", name, "' (auto, generic, avx2)");
  }
  return active();
}

at::Tensor linear_w8a8(const at::Tensor& x, const at::Tensor& act_scale, const at::Tensor& qweight,
                       const at::Tensor& wscales, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat, "linear_w8a8: x must be float32");
  TORCH_CHECK_TYPE(qweight.scalar_type() == at::kChar && qweight.dim() == 2,
                   "linear_w8a8: qweight must be a 2-D int8 tensor");
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) == qweight.size(1), "linear_w8a8: x is ",
                    x.sizes(), ", qweight is ", qweight.sizes());
  const int64_t K = qweight.size(1), N = qweight.size(0);
  const at::Tensor x2 = x.reshape({-1, K}).contiguous();
  const int64_t M = x2.size(0);
  const at::Tensor s = act_scale.to(at::kFloat).contiguous();
  TORCH_CHECK_VALUE(s.numel() == 1 || s.numel() == M,
                    "linear_w8a8: act_scale must have 1 or M elements");
  const at::Tensor ws = wscales.to(at::kFloat).contiguous();
  TORCH_CHECK_VALUE(ws.numel() == N, "linear_w8a8: wscales must have N elements");
  const at::Tensor w = qweight.contiguous();
  at::Tensor b;
  if (bias.has_value() && bias->defined()) {
    b = bias->to(at::kFloat).contiguous();
    TORCH_CHECK_VALUE(b.numel() == N, "linear_w8a8: bias must have N elements");
  }

  // Quantize the activations once (round half to even, as torch.round).
  std::vector<int16_t> xq(static_cast<size_t>(M * K));
  const float* xp = x2.data_ptr<float>();
  const float* sp = s.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m) {
    const float sc = sp[s.numel() == 1 ? 0 : m];
    for (int64_t k = 0; k < K; ++k) {
      float q = std::nearbyint(xp[m * K + k] / sc);
      q = q > 127.f ? 127.f : (q < -127.f ? -127.f : q);
      xq[m * K + k] = static_cast<int16_t>(q);
    }
  }
  std::vector<int32_t> acc(static_cast<size_t>(M * N));
  const DotFn fn = dot_fn();
  const int8_t* wp = w.data_ptr<int8_t>();
  const int64_t quads = (N + 3) / 4;
  // each task reads at least ~64 KiB of weights, so small matrices skip the fork/join
  const int64_t grain = std::max<int64_t>(1, 65536 / (4 * K + 1));
  at::parallel_for(0, quads, grain, [&](int64_t q0, int64_t q1) {
    fn(xq.data(), M, K, wp, q0 * 4, std::min<int64_t>(q1 * 4, N), acc.data(), N);
  });

  at::Tensor y = at::empty({M, N}, x2.options());
  float* yp = y.data_ptr<float>();
  const float* wsp = ws.data_ptr<float>();
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  for (int64_t m = 0; m < M; ++m) {
    const float sc = sp[s.numel() == 1 ? 0 : m];
    for (int64_t n = 0; n < N; ++n) {
      float v = static_cast<float>(acc[m * N + n]) * (sc * wsp[n]);
      yp[m * N + n] = bp ? v + bp[n] : v;
    }
  }
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  return y.view(shape);
}

}  // namespace llmb_w8a8

TORCH_LIBRARY_FRAGMENT(llmbench, m) {
  m.def("linear_w8a8(Tensor x, Tensor act_scale, Tensor qweight, Tensor wscales, "
        "Tensor? bias=None) -> Tensor");
  m.def("w8a8_isa(str name=\"\") -> str", &llmb_w8a8::isa);
}

TORCH_LIBRARY_IMPL(llmbench, CPU, m) { m.impl("linear_w8a8", &llmb_w8a8::linear_w8a8); }
