// Per-row element-wise steps of a decoder layer, shared by the compiled decode step
// (decode_step.cpp) and the torch-facing ops that the Python prefill calls (ops.cpp), so both
// compute them the same way. Baseline ISA only (no target pragmas here).
#pragma once
#include <cmath>
#include <cstdint>

namespace llmb {

// transformers' RMSNorm: x * rsqrt(mean(x^2) + eps) * weight, in fp32 (squares summed in double).
inline void rms_norm_rows(const float* in, const float* weight, float* out, int64_t rows,
                          int64_t n, float eps) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* x = in + r * n;
    float* y = out + r * n;
    double ss = 0.0;
    for (int64_t i = 0; i < n; ++i) ss += static_cast<double>(x[i]) * x[i];
    const float inv = 1.f / std::sqrt(static_cast<float>(ss / n) + eps);
    for (int64_t i = 0; i < n; ++i) y[i] = x[i] * inv * weight[i];
  }
}

// torch's LayerNorm: (x - mean) * rsqrt(var + eps) * weight (+ bias), biased variance, in fp32
// (sums in double). bias may be nullptr (MPT's LayerNorm has none).
inline void layer_norm_rows(const float* in, const float* weight, const float* bias, float* out,
                            int64_t rows, int64_t n, float eps) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* x = in + r * n;
    float* y = out + r * n;
    double sum = 0.0;
    for (int64_t i = 0; i < n; ++i) sum += x[i];
    const float mean = static_cast<float>(sum / n);
    double ss = 0.0;
    for (int64_t i = 0; i < n; ++i) ss += static_cast<double>(x[i] - mean) * (x[i] - mean);
    const float inv = 1.f / std::sqrt(static_cast<float>(ss / n) + eps);
    for (int64_t i = 0; i < n; ++i) y[i] = (x[i] - mean) * inv * weight[i] + (bias ? bias[i] : 0.f);
  }
}

// rotate-half RoPE over the first rot dims of one head, in place; c and s are the position's
// rows of the cos and sin tables (rot values each).
inline void rope_head(float* x, const float* c, const float* s, int64_t rot) {
  const int64_t half = rot / 2;
  for (int64_t i = 0; i < half; ++i) {
    const float a = x[i], b = x[i + half];
    x[i] = a * c[i] - b * s[i];
    x[i + half] = b * c[i + half] + a * s[i + half];
  }
}

}  // namespace llmb
