// int4 and int8 weights x int8 activations on AMX-INT8 (Sapphire Rapids and later): the
// prompt and batched rows of --lowp-mode INT8. The int16 GEMV kernels (gemv_int_impl.h) widen
// every weight again for every tile of activation rows, which makes a 32-token INT4 prefill
// compute-bound at a few GMAC/s; here the int32 sums come from tile multiply-adds (16 x 16 x 64
// per instruction), as oneDNN's int8 GEMM (torch._int_mm) computes them for int8 weights, but
// without a separate quantization pass and GEMM call per projection, and for int4 without a
// dequantized copy: each group's sums are scaled once, as llama.cpp's q4_0 x q8_0 dot products
// are, for 16 x 16 outputs at a time.
//
//   int4: y[m, n] = sum_g sx[m, g] * s[n, g] * (sum_{k in g} q[n, k] xq[m, k] - z[n, g] isum[m, g])
//   int8: y[m, n] = sx[m] * s[n] * sum_k q[n, k] xq[m, k] - sum_k x[m, k] * s[n] * z[n]
//
// with xq the activations' int8 levels (symmetric: the scale and round-half-even of
// quantize_act_levels / quantize_act_row, so y is what the other paths compute on the levels,
// with exact int32 sums), isum[m, g] = sum_{k in g} xq[m, k], w = (q - z) * s per group.
//
// Roles: A (weights) = 16 output rows x 64 k (int4 unpacked to bytes 0..15, which signed
// tiles take as they are; int8 read in place); B (activations) = 16 rows of 4-k groups x 16
// activation rows, the VNNI layout of tdpbssd; C = [16 n, 16 m] int32. For int4 the k order
// inside each 64-k unit follows the packed layout (csrc/gemv_impl.h: byte i of a 32-block
// holds elements i and 16 + i): low nibbles of the unit's 32 bytes first, then the high
// nibbles; the activations are permuted to match when they are packed (a dot product doesn't
// care about the order of k).
//
// Linux hands out the AMX tile state only on request (arch_prctl ARCH_REQ_XCOMP_PERM):
// amx_int8_ready() asks once and says no where the CPU, kernel or compiler can't.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "common.h"

#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__) && !defined(__clang__) && \
    defined(__linux__) && __GNUC__ >= 11
#define LLMB_HAVE_AMX 1
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#else
#define LLMB_HAVE_AMX 0
#endif

namespace llmb {

#if LLMB_HAVE_AMX

namespace {

constexpr int kArchReqXcompPerm = 0x1023;  // arch_prctl: ask for an xstate component
constexpr int kXfeatureXtiledata = 18;     // the AMX tile data component

// CPUID leaf 7 EDX bit: 22 AMX-BF16, 24 AMX-TILE, 25 AMX-INT8; the tile state is granted
// once per process for both.
bool ask_for_amx(int feature_bit) {
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
  if (!((edx >> 24) & 1) || !((edx >> feature_bit) & 1)) return false;
  if (!__builtin_cpu_supports("avx512f") || !__builtin_cpu_supports("avx512bw")) return false;
  // (AMX-BF16 CPUs have AVX512-BF16, whose conversions the bf16 packing uses)
  if (feature_bit == 22 && !__builtin_cpu_supports("avx512bf16")) return false;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
}

}  // namespace

bool amx_int8_ready() {
  static const bool ready = ask_for_amx(25);
  return ready;
}

bool amx_bf16_ready() {
  static const bool ready = ask_for_amx(22);
  return ready;
}

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512bf16,avx2,fma,amx-tile,amx-int8,amx-bf16")

namespace {

struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// 16 int8 levels of 16 floats: round half to even of x / scale (as std::nearbyint in the
// default rounding mode), clamped to +-127.
inline __m128i levels16(const float* x, __m512 scale) {
  __m512 q = _mm512_roundscale_ps(_mm512_div_ps(_mm512_loadu_ps(x), scale),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  q = _mm512_min_ps(_mm512_max_ps(q, _mm512_set1_ps(-127.f)), _mm512_set1_ps(127.f));
  return _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(q));
}

inline float absmax(const float* x, int64_t n) {
  __m512 top = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= n; k += 16) top = _mm512_max_ps(top, _mm512_abs_ps(_mm512_loadu_ps(x + k)));
  float t = _mm512_reduce_max_ps(top);
  for (; k < n; ++k) t = std::max(t, std::fabs(x[k]));
  return t;
}

}  // namespace

namespace {

// bf16: x [M, K] rounded to bf16 (round to nearest even, as torch's .to(bfloat16)) into B
// tiles of 32 k: tile row kk holds, per activation row m, elements 2 kk and 2 kk + 1.
void pack_bf16(const AmxArgs& a, const float* x, int64_t ldx, int64_t mb_begin, int64_t mb_end) {
  const int64_t K = a.K, U = K / 32;
  std::memset(a.xb + mb_begin * U * 1024, 0, static_cast<size_t>((mb_end - mb_begin) * U * 1024));
  for (int64_t m = mb_begin * 16; m < std::min(mb_end * 16, a.M); ++m) {
    int8_t* tiles = a.xb + (m / 16) * U * 1024 + (m % 16) * 4;
    for (int64_t u = 0; u < U; ++u) {
      alignas(64) uint16_t pairs[32];
      const __m512 lo = _mm512_loadu_ps(x + m * ldx + u * 32);
      const __m512 hi = _mm512_loadu_ps(x + m * ldx + u * 32 + 16);
      _mm512_store_si512(pairs, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
      int8_t* tile = tiles + u * 1024;
      for (int kk = 0; kk < 16; ++kk) std::memcpy(tile + kk * 64, pairs + 2 * kk, 4);
    }
  }
}

}  // namespace

void amx_tensor_scales(const AmxArgs& a, const float* x, int64_t ldx, int64_t block) {
  const int64_t K = a.K, G = a.group_size;
  const int64_t bk = (block > 0 && block < K) ? block : K;  // a multiple of G (amx_ok)
  for (int64_t b = 0; b < K / bk; ++b) {
    float top = 0.f;
    for (int64_t m = 0; m < a.M; ++m) top = std::max(top, absmax(x + m * ldx + b * bk, bk));
    for (int64_t g = b * bk / G; g < (b + 1) * bk / G; ++g)
      for (int64_t m = 0; m < a.M; ++m) a.sx[g * a.Mpad + m] = std::max(top / 127.f, 1e-8f);
  }
}

void amx_pack_x(const AmxArgs& a, const float* x, int64_t ldx, bool per_tensor, int64_t block,
                int64_t mb_begin, int64_t mb_end) {
  if (a.fmt == kBF16) {
    pack_bf16(a, x, ldx, mb_begin, mb_end);
    return;
  }
  const int64_t K = a.K, G = a.group_size, NG = K / G, U = K / 64, Mpad = a.Mpad;
  const int64_t bk = (block > 0 && block < K) ? block : K;
  const bool i4 = a.fmt == kI4;
  float* sx = a.sx;  // [NG, Mpad]
  std::memset(a.xb + mb_begin * U * 1024, 0, static_cast<size_t>((mb_end - mb_begin) * U * 1024));
  for (int64_t m = mb_begin * 16; m < mb_end * 16; ++m) {
    if (m >= a.M) {  // padding rows: zero levels and sums, scale 1 (outputs never written)
      for (int64_t g = 0; g < NG; ++g) {
        sx[g * Mpad + m] = 1.f;
        a.xsum[g * Mpad + m] = 0.f;
      }
      continue;
    }
    const float* row = x + m * ldx;
    if (!per_tensor)  // the same ranges as quantize_act_levels, which also counts 0
      for (int64_t b = 0; b < K / bk; ++b) {
        const float scale = std::max(absmax(row + b * bk, bk) / 127.f, 1e-8f);
        for (int64_t g = b * bk / G; g < (b + 1) * bk / G; ++g) sx[g * Mpad + m] = scale;
      }
    // B tiles: unit u of row block mb at xb + (mb * U + u) * 1024; within it row kk, bytes
    // 4 * (m % 16) .. + 3 are the unit's elements 4 kk .. 4 kk + 3 (int4: permuted).
    int8_t* tiles = a.xb + (m / 16) * U * 1024 + (m % 16) * 4;
    for (int64_t g = 0; g < NG; ++g) {
      const __m512 scale = _mm512_set1_ps(sx[g * Mpad + m]);
      __m512i sum = _mm512_setzero_si512();
      __m512 fsum = _mm512_setzero_ps();
      for (int64_t u = g * G / 64; u < (g + 1) * G / 64; ++u) {
        // int4's order: elements 0-15 and 32-47 (its blocks' low nibbles), then 16-31, 48-63.
        alignas(64) int8_t ordered[64];
        const float* src = row + u * 64;
        const int second = i4 ? 32 : 16, third = i4 ? 16 : 32;
        const __m128i p0 = levels16(src, scale), p1 = levels16(src + second, scale);
        const __m128i p2 = levels16(src + third, scale), p3 = levels16(src + 48, scale);
        _mm_store_si128(reinterpret_cast<__m128i*>(ordered), p0);
        _mm_store_si128(reinterpret_cast<__m128i*>(ordered + 16), p1);
        _mm_store_si128(reinterpret_cast<__m128i*>(ordered + 32), p2);
        _mm_store_si128(reinterpret_cast<__m128i*>(ordered + 48), p3);
        if (i4) {
          sum = _mm512_add_epi32(sum, _mm512_cvtepi8_epi32(p0));
          sum = _mm512_add_epi32(sum, _mm512_cvtepi8_epi32(p1));
          sum = _mm512_add_epi32(sum, _mm512_cvtepi8_epi32(p2));
          sum = _mm512_add_epi32(sum, _mm512_cvtepi8_epi32(p3));
        } else if (a.zeros != nullptr) {
          for (int j = 0; j < 4; ++j) fsum = _mm512_add_ps(fsum, _mm512_loadu_ps(src + 16 * j));
        }
        int8_t* tile = tiles + u * 1024;
        for (int kk = 0; kk < 16; ++kk) std::memcpy(tile + kk * 64, ordered + 4 * kk, 4);
      }
      a.xsum[g * Mpad + m] = i4 ? static_cast<float>(_mm512_reduce_add_epi32(sum))
                                : _mm512_reduce_add_ps(fsum);
    }
  }
}

// Activation row blocks per pass over the weights: about 512 KiB of B tiles, so that they stay
// in L2 while every weight block passes (past that each weight block re-read them from L3:
// a 2048-row bf16 prefill ran 2.7x slower than torch's blocked GEMM). Even: pairs stay whole.
inline int64_t chunk_mbs(int64_t tile_bytes_per_mb) {
  return std::max<int64_t>(2, (512 * 1024) / tile_bytes_per_mb) & ~int64_t{1};
}

namespace {

// C tile = A (tmm1) x B (tmm2) over the 64-byte units [u0, u1); A rows at a + u * 64 with
// stride lda bytes, B tiles at b + u * 1024; tdpbf16ps (BF16) or tdpbssd. GCC's tile
// intrinsics paste the tile number into the instruction's text, so it can't be a template
// parameter: one function per C tile.
// Two row blocks of activations against one A: C tmm0 (B tmm2 at b) and tmm3 (B tmm5 at
// b + bnext), stored to c0 and c3.
template <bool BF16>
inline void tile_sums_two(const int8_t* a, int64_t lda, const int8_t* b, int64_t bnext,
                          int64_t u0, int64_t u1, void* c0, void* c3) {
  _tile_zero(0);
  _tile_zero(3);
  for (int64_t u = u0; u < u1; ++u) {
    _tile_loadd(1, a + u * 64, lda);
    _tile_loadd(2, b + u * 1024, 64);
    if constexpr (BF16) _tile_dpbf16ps(0, 1, 2); else _tile_dpbssd(0, 1, 2);
    _tile_loadd(5, b + bnext + u * 1024, 64);
    if constexpr (BF16) _tile_dpbf16ps(3, 1, 5); else _tile_dpbssd(3, 1, 5);
  }
  _tile_stored(0, c0, 64);
  _tile_stored(3, c3, 64);
}

// One row block: C tmm0 or tmm3 (so that two calls in a row overlap), stored to c; a macro
// makes both, the tile number reaching the intrinsics as a literal token.
#define LLMB_TILE_SUMS(C)                                                                   \
  template <bool BF16>                                                                      \
  inline void tile_sums_##C(const int8_t* a, int64_t lda, const int8_t* b, int64_t u0,       \
                            int64_t u1, void* c) {                                           \
    _tile_zero(C);                                                                          \
    for (int64_t u = u0; u < u1; ++u) {                                                     \
      _tile_loadd(1, a + u * 64, lda);                                                      \
      _tile_loadd(2, b + u * 1024, 64);                                                     \
      if constexpr (BF16) _tile_dpbf16ps(C, 1, 2); else _tile_dpbssd(C, 1, 2);              \
    }                                                                                       \
    _tile_stored(C, c, 64);                                                                 \
  }
LLMB_TILE_SUMS(0)
LLMB_TILE_SUMS(3)
#undef LLMB_TILE_SUMS

// out [16 rows x 16 m] -> y[m0 + m, n0 + r] for the rows and the m_end activation rows there.
inline void store_block(const AmxArgs& a, const float* out, int64_t m0, int64_t n0, int64_t rows,
                        int64_t m_end) {
  for (int64_t m = 0; m < m_end; ++m) {
    float* y = a.y + (m0 + m) * a.ldy + n0;
    for (int64_t r = 0; r < rows; ++r) y[r] = out[r * 16 + m];
  }
}

// int8 or bf16 weights, read in place as A tiles (16 rows x 64 bytes), one C tile per 16 x 16
// outputs over all of K, then the epilogue: int8 scales the int32 sums (and subtracts the
// zero-point term); bf16 rounds the fp32 sums to bf16 values (as a bf16 GEMM's output is).
template <bool BF16>
void rows_dense(const AmxArgs& a, int64_t nb_begin, int64_t nb_end, int8_t* wb) {
  const int64_t row_bytes = a.K * (BF16 ? 2 : 1), U = row_bytes / 64, N = a.N, M = a.M;
  const int64_t MB = a.Mpad / 16, MC = chunk_mbs(U * 1024);
  const int8_t* w = static_cast<const int8_t*>(a.w);
  alignas(64) int32_t c[2][16 * 16];
  for (int64_t mc = 0; mc < MB; mc += MC)
  for (int64_t nb = nb_begin; nb < nb_end; ++nb) {
    const int64_t n0 = nb * 16, rows = std::min<int64_t>(16, N - n0);
    const int64_t mc_end = std::min(MB, mc + MC);
    const int8_t* wt = w + n0 * row_bytes;
    if (rows < 16) {  // the last, partial block: zero rows past N
      std::memset(wb, 0, static_cast<size_t>(16 * row_bytes));
      std::memcpy(wb, wt, static_cast<size_t>(rows * row_bytes));
      wt = wb;
    }
    for (int64_t mb = mc; mb < mc_end; mb += 2) {
      const bool two = mb + 1 < mc_end;
      const int8_t* xb = a.xb + mb * U * 1024;
      if (two)
        tile_sums_two<BF16>(wt, row_bytes, xb, U * 1024, 0, U, c[0], c[1]);
      else
        tile_sums_0<BF16>(wt, row_bytes, xb, 0, U, c[0]);
      for (int64_t h = 0; h < (two ? 2 : 1); ++h) {
        const int64_t m0 = (mb + h) * 16, m_end = std::min<int64_t>(16, M - m0);
        if (m_end <= 0) break;
        // int8: the rows' activation scales and sums (no such arrays for bf16)
        const __m512 sxv = BF16 ? _mm512_setzero_ps() : _mm512_loadu_ps(a.sx + m0);
        const __m512 xsv = BF16 || !a.zeros ? _mm512_setzero_ps() : _mm512_loadu_ps(a.xsum + m0);
        alignas(64) float out[16 * 16];
        for (int r = 0; r < rows; ++r) {
          __m512 v;
          if constexpr (BF16) {
            v = _mm512_load_ps(reinterpret_cast<const float*>(c[h]) + r * 16);
            if (a.bias) v = _mm512_add_ps(v, _mm512_set1_ps(a.bias[n0 + r]));
            // round to bf16 and back: the value a bf16 output holds
            const __m256i b = (__m256i)_mm512_cvtneps_pbh(v);
            v = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16));
          } else {
            const float s = a.scales[n0 + r];
            v = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_load_si512(c[h] + r * 16)),
                              _mm512_mul_ps(sxv, _mm512_set1_ps(s)));
            if (a.bias) v = _mm512_add_ps(v, _mm512_set1_ps(a.bias[n0 + r]));
            if (a.zeros)
              v = _mm512_fnmadd_ps(xsv, _mm512_set1_ps(s * a.zeros[n0 + r]), v);
          }
          _mm512_store_ps(out + r * 16, v);
        }
        store_block(a, out, m0, n0, rows, m_end);
      }
    }
  }
}

// int4 weights: 16 rows unpacked to bytes once per block of outputs, then per group of k a C
// tile (two alternate, so that one group's scaling overlaps the next group's multiply-adds).
void rows_i4(const AmxArgs& a, int64_t nb_begin, int64_t nb_end, int8_t* wb) {
  const int64_t K = a.K, G = a.group_size, NG = K / G, U = K / 64, UG = G / 64;
  const int64_t N = a.N, M = a.M, Mpad = a.Mpad;
  alignas(64) int32_t c[2][16 * 16];
  alignas(64) float out[16 * 16];
  const __m256i low4 = _mm256_set1_epi8(15);
  const int64_t MB = Mpad / 16, MC = chunk_mbs(U * 1024);
  for (int64_t mc = 0; mc < MB; mc += MC)
  for (int64_t nb = nb_begin; nb < nb_end; ++nb) {
    const int64_t n0 = nb * 16, rows = std::min<int64_t>(16, N - n0);
    const uint8_t* packed = static_cast<const uint8_t*>(a.w) + n0 * (K / 2);
    for (int64_t r = 0; r < 16; ++r) {
      int8_t* dst = wb + r * K;
      if (r >= rows) {
        std::memset(dst, 0, static_cast<size_t>(K));
        continue;
      }
      for (int64_t u = 0; u < U; ++u) {
        const __m256i v = _mm256_loadu_si256(
            reinterpret_cast<const __m256i*>(packed + r * (K / 2) + u * 32));
        _mm256_store_si256(reinterpret_cast<__m256i*>(dst + u * 64), _mm256_and_si256(v, low4));
        _mm256_store_si256(reinterpret_cast<__m256i*>(dst + u * 64 + 32),
                           _mm256_and_si256(_mm256_srli_epi16(v, 4), low4));
      }
    }
    const float* s = a.scales + n0 * NG;
    const float* z = a.zeros + n0 * NG;
    for (int64_t mb = mc; mb < std::min(MB, mc + MC); ++mb) {
      __m512 acc[16];
      for (int r = 0; r < 16; ++r) acc[r] = _mm512_setzero_ps();
      const int8_t* xb = a.xb + mb * U * 1024;
      auto scale_group = [&](const int32_t* cg, int64_t g) {
        const __m512 sxv = _mm512_loadu_ps(a.sx + g * Mpad + mb * 16);
        const __m512 isv = _mm512_loadu_ps(a.xsum + g * Mpad + mb * 16);
        for (int r = 0; r < rows; ++r) {
          __m512 t = _mm512_cvtepi32_ps(_mm512_load_si512(cg + r * 16));
          t = _mm512_fnmadd_ps(_mm512_set1_ps(z[r * NG + g]), isv, t);
          acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(s[r * NG + g]), _mm512_mul_ps(t, sxv), acc[r]);
        }
      };
      for (int64_t g = 0; g < NG; g += 2) {
        tile_sums_0<false>(wb, K, xb, g * UG, (g + 1) * UG, c[0]);
        if (g + 1 < NG) tile_sums_3<false>(wb, K, xb, (g + 1) * UG, (g + 2) * UG, c[1]);
        scale_group(c[0], g);
        if (g + 1 < NG) scale_group(c[1], g + 1);
      }
      for (int r = 0; r < rows; ++r)
        _mm512_store_ps(out + r * 16, a.bias ? _mm512_add_ps(acc[r], _mm512_set1_ps(a.bias[n0 + r]))
                                             : acc[r]);
      store_block(a, out, mb * 16, n0, rows, std::min<int64_t>(16, M - mb * 16));
    }
  }
}

}  // namespace

void amx_rows(const AmxArgs& a, int64_t nb_begin, int64_t nb_end) {
  // 16 unpacked (int4) or padded (int8, bf16) weight rows; malloc: no std containers under
  // the target pragma.
  const int64_t row_bytes = a.K * (a.fmt == kBF16 ? 2 : 1);
  int8_t* wb = static_cast<int8_t*>(std::aligned_alloc(64, static_cast<size_t>(16 * row_bytes)));
  TileConfig cfg;
  for (int t = 0; t < 6; ++t) {  // C: tmm0, tmm3; A: tmm1; B: tmm2, tmm5; 16 rows x 64 bytes
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  _tile_loadconfig(&cfg);
  if (a.fmt == kI4)
    rows_i4(a, nb_begin, nb_end, wb);
  else if (a.fmt == kBF16)
    rows_dense<true>(a, nb_begin, nb_end, wb);
  else
    rows_dense<false>(a, nb_begin, nb_end, wb);
  _tile_release();
  std::free(wb);
}

#pragma GCC pop_options

#else  // no AMX here: never ready, and the entry points are never called

bool amx_int8_ready() { return false; }
bool amx_bf16_ready() { return false; }
void amx_tensor_scales(const AmxArgs&, const float*, int64_t, int64_t) {}
void amx_pack_x(const AmxArgs&, const float*, int64_t, bool, int64_t, int64_t, int64_t) {}
void amx_rows(const AmxArgs&, int64_t, int64_t) {}

#endif

}  // namespace llmb
