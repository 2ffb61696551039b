// The lookup-table approach to INT4 x INT8 batch-1 GEMV (T-MAC's), on AVX2, one thread, for
// benchmarks/bench_lut_int4.py, which sets it against llmbench's own u8 x s8 kernel. Not part
// of llmbench: it was tried and is not kept (docs/performance.md).
//
// y[n] = sum_g s[n,g] (sum_{k in g} q[n,k] x[k] - z[n,g] sum_{k in g} x[k]), q in 0..15.
// sum_k q x = sum_b 2^b sum_j T_j[plane_b(n, j)]: for each quad j of 4 activations, T_j holds
// the sums of its 16 subsets; bit plane b of the quad's 4 weights is the subset. T is stored as
// int8 with one scale per activation row (T-MAC's quantized tables, so the sums are not exact),
// and vpshufb looks up 32 (row, quad, plane) entries at once.
//
// usage: lut_int4_avx2 LAYERS N:K [N:K ...]   (K a multiple of 128, N of 8)
// prints: "error <mean |y - exact| / mean |exact|>" then "ms <median ms per pass>"
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

namespace {

constexpr int kGroup = 128;
constexpr int kPrefetch = 4096;  // bytes ahead in the weight stream (as llmbench's AVX2 rows)

struct Matrix {
  int N, K;
  std::vector<uint8_t> q;        // [N][K] levels, for the exact result
  std::vector<float> s, z;       // [N][K / kGroup]
  std::vector<uint8_t> planes;   // [N / 8][K / 8][32]: see lay_out
  std::vector<float> sT, zT;     // [N / 8][K / kGroup][8]
};

// Each 32 bytes hold 8 rows x 2 quads (128-bit lane = quad): for row r, byte 2r = plane 0 | plane
// 2 << 4, byte 2r + 1 = plane 1 | plane 3 << 4, so the low and high nibbles give two index
// vectors whose adjacent byte pairs weigh (1, 2) and (4, 8) in vpmaddubsw.
void lay_out(Matrix& m) {
  const int K = m.K, NG = K / kGroup;
  m.planes.resize(static_cast<size_t>(m.N) * K / 2);
  for (int rb = 0; rb < m.N / 8; ++rb)
    for (int jp = 0; jp < K / 8; ++jp)
      for (int lane = 0; lane < 2; ++lane)
        for (int r = 0; r < 8; ++r) {
          const uint8_t* w = &m.q[static_cast<size_t>(rb * 8 + r) * K + (2 * jp + lane) * 4];
          auto plane = [&](int b) {
            int p = 0;
            for (int i = 0; i < 4; ++i) p |= ((w[i] >> b) & 1) << i;
            return p;
          };
          uint8_t* o = &m.planes[(static_cast<size_t>(rb) * (K / 8) + jp) * 32 + lane * 16 + 2 * r];
          o[0] = static_cast<uint8_t>(plane(0) | plane(2) << 4);
          o[1] = static_cast<uint8_t>(plane(1) | plane(3) << 4);
        }
  m.sT.resize(m.s.size());
  m.zT.resize(m.s.size());
  for (int rb = 0; rb < m.N / 8; ++rb)
    for (int g = 0; g < NG; ++g)
      for (int r = 0; r < 8; ++r) {
        m.sT[(static_cast<size_t>(rb) * NG + g) * 8 + r] = m.s[static_cast<size_t>(rb * 8 + r) * NG + g];
        m.zT[(static_cast<size_t>(rb) * NG + g) * 8 + r] = m.z[static_cast<size_t>(rb * 8 + r) * NG + g];
      }
}

Matrix random_matrix(int N, int K, std::mt19937& rng) {
  Matrix m{N, K, {}, {}, {}, {}, {}, {}};
  m.q.resize(static_cast<size_t>(N) * K);
  m.s.resize(static_cast<size_t>(N) * K / kGroup);
  m.z.resize(m.s.size());
  for (auto& v : m.q) v = rng() % 16;
  for (size_t i = 0; i < m.s.size(); ++i) {
    m.s[i] = 0.01f + (rng() % 100) * 1e-4f;
    m.z[i] = static_cast<float>(rng() % 16);
  }
  lay_out(m);
  return m;
}

// The tables for x [K]: [K / 8][32] (lane 0 quad 2jp, lane 1 quad 2jp + 1); returns their scale.
float build_tables(const int8_t* x, int K, int8_t* t8) {
  std::vector<int> t(static_cast<size_t>(K) / 4 * 16);
  int top = 1;
  for (int j = 0; j < K / 4; ++j)
    for (int p = 0; p < 16; ++p) {
      int v = 0;
      for (int i = 0; i < 4; ++i)
        if (p >> i & 1) v += x[4 * j + i];
      t[j * 16 + p] = v;
      top = std::max(top, std::abs(v));
    }
  const float scale = top / 127.f;
  for (int j = 0; j < K / 4; ++j)
    for (int p = 0; p < 16; ++p)
      t8[(j / 2) * 32 + (j % 2) * 16 + p] = static_cast<int8_t>(std::lrint(t[j * 16 + p] / scale));
  return scale;
}

void lut_gemv(const Matrix& m, const int8_t* t8, float tscale, const float* xsum, float* y) {
  const int K = m.K, NG = K / kGroup, NJ = K / 8;
  const __m256i low = _mm256_set1_epi8(15);
  const __m256i w01 = _mm256_set1_epi16(0x0201), w23 = _mm256_set1_epi16(0x0804);
  for (int rb = 0; rb < m.N / 8; ++rb) {
    const uint8_t* idx = &m.planes[static_cast<size_t>(rb) * NJ * 32];
    __m256 tot = _mm256_setzero_ps();
    for (int g = 0; g < NG; ++g) {
      // 16 steps per group of 128: |acc| <= 16 x 127 x 15 fits int16
      __m256i acc = _mm256_setzero_si256();
      for (int jp = g * kGroup / 8; jp < (g + 1) * kGroup / 8; ++jp) {
        if (jp % 2 == 0) __builtin_prefetch(idx + static_cast<size_t>(jp) * 32 + kPrefetch, 0, 3);
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(idx + static_cast<size_t>(jp) * 32));
        const __m256i t = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(t8 + static_cast<size_t>(jp) * 32));
        const __m256i la = _mm256_shuffle_epi8(t, _mm256_and_si256(v, low));
        const __m256i lb = _mm256_shuffle_epi8(t, _mm256_and_si256(_mm256_srli_epi16(v, 4), low));
        acc = _mm256_add_epi16(acc, _mm256_add_epi16(_mm256_maddubs_epi16(w01, la),
                                                     _mm256_maddubs_epi16(w23, lb)));
      }
      const __m256i d = _mm256_add_epi32(_mm256_cvtepi16_epi32(_mm256_castsi256_si128(acc)),
                                         _mm256_cvtepi16_epi32(_mm256_extracti128_si256(acc, 1)));
      const size_t at = (static_cast<size_t>(rb) * NG + g) * 8;
      const __m256 f = _mm256_sub_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(d), _mm256_set1_ps(tscale)),
                                     _mm256_mul_ps(_mm256_loadu_ps(&m.zT[at]), _mm256_set1_ps(xsum[g])));
      tot = _mm256_fmadd_ps(f, _mm256_loadu_ps(&m.sT[at]), tot);
    }
    _mm256_storeu_ps(y + rb * 8, tot);
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr, "usage: %s LAYERS N:K [N:K ...]\n", argv[0]);
    return 2;
  }
  const int layers = std::atoi(argv[1]);
  std::vector<std::pair<int, int>> shapes;
  int kmax = 0, nmax = 0;
  for (int i = 2; i < argc; ++i) {
    int n = 0, k = 0;
    if (std::sscanf(argv[i], "%d:%d", &n, &k) != 2 || n % 8 || k % kGroup || n <= 0 || k <= 0) {
      std::fprintf(stderr, "bad shape %s (N:K, N a multiple of 8, K of %d)\n", argv[i], kGroup);
      return 2;
    }
    shapes.emplace_back(n, k);
    kmax = std::max(kmax, k);
    nmax = std::max(nmax, n);
  }
  std::mt19937 rng(1);
  std::vector<Matrix> mats;
  for (int l = 0; l < layers; ++l)
    for (auto [n, k] : shapes) mats.push_back(random_matrix(n, k, rng));
  std::vector<int8_t> x(kmax), t8(static_cast<size_t>(kmax) * 4);
  for (auto& v : x) v = static_cast<int8_t>(static_cast<int>(rng() % 255) - 127);
  std::vector<float> xsum(kmax / kGroup), y(nmax);
  auto sums = [&](int K) {
    for (int g = 0; g < K / kGroup; ++g) {
      long s = 0;
      for (int k = g * kGroup; k < (g + 1) * kGroup; ++k) s += x[k];
      xsum[g] = static_cast<float>(s);
    }
  };
  double err = 0, norm = 0;
  for (size_t i = 0; i < shapes.size(); ++i) {  // against the exact sums, first layer
    const Matrix& m = mats[i];
    sums(m.K);
    lut_gemv(m, t8.data(), build_tables(x.data(), m.K, t8.data()), xsum.data(), y.data());
    for (int n = 0; n < m.N; ++n) {
      double exact = 0;
      for (int g = 0; g < m.K / kGroup; ++g) {
        long d = 0;
        for (int k = g * kGroup; k < (g + 1) * kGroup; ++k) d += m.q[static_cast<size_t>(n) * m.K + k] * x[k];
        exact += m.s[static_cast<size_t>(n) * (m.K / kGroup) + g] *
                 (d - m.z[static_cast<size_t>(n) * (m.K / kGroup) + g] * xsum[g]);
      }
      err += std::fabs(y[n] - exact);
      norm += std::fabs(exact);
    }
  }
  std::printf("error %.3e\n", err / norm);
  auto pass = [&] {  // the tables are built per call, as a kernel would for each input
    for (auto& m : mats) {
      sums(m.K);
      lut_gemv(m, t8.data(), build_tables(x.data(), m.K, t8.data()), xsum.data(), y.data());
    }
  };
  pass();
  std::vector<double> ms;
  for (int it = 0; it < 21; ++it) {
    const auto t0 = std::chrono::steady_clock::now();
    pass();
    ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(ms.begin(), ms.end());
  std::printf("ms %.4f\n", ms[ms.size() / 2]);
  return 0;
}
