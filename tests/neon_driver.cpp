// Cross-compiled for AArch64 by tests/test_kernels_neon.py with llmbench's kernels_generic.cpp
// and kernels_neon.cpp, and run under qemu-user: the NEON table against the portable one on the
// same inputs, every weight format, shapes with K tails, several activation rows, bias, int4
// group sizes, int8 weights with float and with int8 (--lowp-mode INT8) activations, and a
// row range split in two (as the thread pool splits it). Each table is called as ops.cpp's
// run() calls it (its prep function first; int8 activations as rounded levels for a table
// that reads x as floats); and the decode attention kernels (AttnFns) and MLP activations. Prints one line per mismatch and "neon: N cases agree" at the end;
// exit status 1 on any mismatch.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

#include "common.h"

namespace {

uint64_t state = 0x9E3779B97F4A7C15ull;
float uniform() {  // [-1, 1)
  state = state * 6364136223846793005ull + 1442695040888963407ull;
  return static_cast<float>((state >> 40) & 0xFFFFFF) / 8388608.f - 1.f;
}
uint32_t bits() {
  state = state * 6364136223846793005ull + 1442695040888963407ull;
  return static_cast<uint32_t>(state >> 32);
}

uint16_t to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return static_cast<uint16_t>(u >> 16);
}

struct Case {
  llmb::Fmt fmt;
  int64_t M, K, N, group;
  bool bias;
  float act_qmax = 0.f;  // int8 weights: > 0 for int8 activations
  // int4 weights with symmetric int8 activations (a table's i4q8 kernels, where it has them),
  // one scale per row or over all rows, per block of input channels (0: the row)
  bool i4q8 = false;
  bool per_tensor = false;
  int64_t block = 0;
};

// x's symmetric int8 levels as ops.cpp's quantize_act_levels computes them (and the i4q8
// prep functions must), times their scale: what the portable table multiplies.
std::vector<float> levels_of(const std::vector<float>& x, int64_t M, int64_t K, bool per_tensor,
                             int64_t block) {
  const int64_t bk = block > 0 && block < K ? block : K, rows = per_tensor ? M : 1;
  std::vector<float> out(x.size());
  for (int64_t m0 = 0; m0 < M; m0 += rows)
    for (int64_t k0 = 0; k0 < K; k0 += bk) {
      float top = 0.f;
      for (int64_t m = m0; m < m0 + rows; ++m)
        for (int64_t k = k0; k < k0 + bk; ++k) top = std::fmax(top, std::fabs(x[m * K + k]));
      const float scale = std::fmax(top / 127.f, 1e-8f);
      for (int64_t m = m0; m < m0 + rows; ++m)
        for (int64_t k = k0; k < k0 + bk; ++k) {
          const float v = std::nearbyint(x[m * K + k] / scale);
          out[m * K + k] = std::fmin(127.f, std::fmax(-127.f, v)) * scale;
        }
    }
  return out;
}

// What ops.cpp's run() does around a table's row function, for rows [begin, end) in `parts`
// calls (two: as two threads would split them).
void run(const llmb::KernelTable& table, llmb::Fmt fmt, llmb::GemvArgs a, int parts) {
  std::vector<float> levels, prepared;
  if (a.act_qmax > 0.f && table.prep[fmt] == nullptr) {
    std::vector<int16_t> q(a.K);
    levels.resize(a.M * a.K);
    for (int64_t m = 0; m < a.M; ++m) {
      const float scale = llmb::quantize_act_row(a, m, q.data());
      for (int64_t k = 0; k < a.K; ++k) levels[m * a.K + k] = q[k] * scale;
    }
    a.x = levels.data();
    a.ldx = a.K;
  }
  if (table.prep[fmt] != nullptr) {
    prepared.resize(a.M * a.K + 64);
    table.prep[fmt](a, prepared.data());
    a.xp = prepared.data();
  }
  const int64_t split = parts > 1 && a.N > 4 ? (a.N / 2) / 4 * 4 : a.N;
  table.fn[fmt](a, 0, split);
  if (split < a.N) table.fn[fmt](a, split, a.N);
}

// Runs one case on both tables; returns false (and prints why) when they disagree.
bool check(const llmb::KernelTable& ref, const llmb::KernelTable& neon, const Case& c) {
  const int64_t M = c.M, K = c.K, N = c.N;
  const int64_t G = c.fmt == llmb::kI4 ? c.group : K, NG = K / G;
  std::vector<float> x(M * K), bias(N), scales(N * NG), zeros(N * NG), xsum(M * NG);
  for (auto& v : x) v = uniform();
  std::vector<float> x_levels;  // i4q8: the portable table's input
  if (c.i4q8) x_levels = levels_of(x, M, K, c.per_tensor, c.block);
  const std::vector<float>& x_ref = c.i4q8 ? x_levels : x;
  for (auto& v : bias) v = uniform();
  for (auto& v : scales) v = 0.01f + 0.05f * (uniform() + 1.f);
  for (auto& v : zeros) v = 8.f + 4.f * uniform();
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < NG; ++g) {
      float s = 0.f;
      for (int64_t k = g * G; k < (g + 1) * G; ++k) s += x_ref[m * K + k];
      xsum[m * NG + g] = s;
    }
  std::vector<float> wf;
  std::vector<uint16_t> wb;
  std::vector<int8_t> wi8;
  std::vector<uint8_t> wi4;
  const void* w = nullptr;
  float wmax = 1.f;
  switch (c.fmt) {
    case llmb::kF32:
      wf.resize(N * K);
      for (auto& v : wf) v = uniform();
      w = wf.data();
      break;
    case llmb::kBF16:
      wb.resize(N * K);
      for (auto& v : wb) v = to_bf16(uniform());
      w = wb.data();
      break;
    case llmb::kI8:
      wi8.resize(N * K);
      for (auto& v : wi8) v = static_cast<int8_t>(static_cast<int>(bits() % 255) - 127);
      w = wi8.data();
      wmax = 127.f * 0.11f;
      break;
    default:
      wi4.resize(N * K / 2);
      for (auto& v : wi4) v = static_cast<uint8_t>(bits() & 0xFF);
      w = wi4.data();
      wmax = 15.f * 0.11f;
      break;
  }
  std::vector<float> y_ref(M * N, NAN), y_neon(M * N, NAN);
  llmb::GemvArgs a{};
  a.x = x.data();
  a.ldx = K;
  a.M = M;
  a.K = K;
  a.w = w;
  a.N = N;
  a.scales = (c.fmt == llmb::kI8 || c.fmt == llmb::kI4) ? scales.data() : nullptr;
  a.zeros = c.fmt == llmb::kI4 ? zeros.data() : nullptr;
  a.group_size = G;
  a.ngroups = NG;
  a.xsum = c.fmt == llmb::kI4 ? xsum.data() : nullptr;
  a.bias = c.bias ? bias.data() : nullptr;
  a.ldy = N;
  a.act_qmax = c.act_qmax;
  a.y = y_ref.data();
  a.x = x_ref.data();
  run(ref, c.fmt, a, 1);
  a.x = x.data();
  a.y = y_neon.data();
  if (c.i4q8) {  // as ops.cpp's linear_rows runs them: prep, then the rows in two parts
    a.act_per_tensor = c.per_tensor;
    a.act_block = c.block;
    std::vector<float> prepared(M * K + 64);
    neon.i4q8_prep(a, prepared.data());
    a.xp = prepared.data();
    const int64_t split = N > 4 ? (N / 2) / 4 * 4 : N;
    neon.i4q8(a, 0, split);
    if (split < N) neon.i4q8(a, split, N);
  } else {
    run(neon, c.fmt, a, 2);
  }
  float tol = 2e-6f * static_cast<float>(K) * wmax + 1e-5f;
  if (c.fmt == llmb::kI8 && c.act_qmax == 0.f && neon.prep[c.fmt] != nullptr)
    // x rounded to int16 with a per-row scale: each product off by at most max|x| / 65534
    tol += static_cast<float>(K) * wmax / 65534.f;
  for (int64_t i = 0; i < M * N; ++i) {
    if (!(std::fabs(y_ref[i] - y_neon[i]) <= tol)) {
      std::printf("mismatch: fmt %d M %lld K %lld N %lld group %lld bias %d act_qmax %g at "
                  "%lld: generic %g %s %g\n",
                  static_cast<int>(c.fmt), static_cast<long long>(M), static_cast<long long>(K),
                  static_cast<long long>(N), static_cast<long long>(G), c.bias ? 1 : 0,
                  static_cast<double>(c.act_qmax), static_cast<long long>(i), y_ref[i],
                  neon.name, y_neon[i]);
      return false;
    }
  }
  return true;
}

}  // namespace

// A table's decode attention kernels against the portable ones: n positions of d values, rows
// ld floats apart (d < ld, as one head of a [heads, positions, d] cache is not).
bool check_attention(const llmb::KernelTable& ref, const llmb::KernelTable& t, int64_t n,
                     int64_t d) {
  const int64_t ld = d + 3;
  std::vector<float> q(d), keys(n * ld), values(n * ld), p(n), a(n), b(n), oa(d), ob(d);
  for (auto& v : q) v = uniform();
  for (auto& v : keys) v = uniform();
  for (auto& v : values) v = uniform();
  for (auto& v : p) v = uniform();
  for (int64_t i = 0; i < d; ++i) oa[i] = ob[i] = uniform();
  ref.attn.scores(q.data(), keys.data(), ld, n, d, 0.125f, a.data());
  t.attn.scores(q.data(), keys.data(), ld, n, d, 0.125f, b.data());
  ref.attn.mix(p.data(), values.data(), ld, n, d, oa.data());
  t.attn.mix(p.data(), values.data(), ld, n, d, ob.data());
  bool ok = true;
  for (int64_t i = 0; i < n; ++i) ok = ok && std::fabs(a[i] - b[i]) <= 1e-4f * (1.f + std::fabs(a[i]));
  // the softmax's exponentials: both tables against libm, scores down to 200 below their top
  float top = -1e30f;
  for (int64_t i = 0; i < n; ++i) {
    a[i] = b[i] = 100.f * uniform() - 100.f;
    top = std::max(top, a[i]);
  }
  float want = 0.f;
  for (int64_t i = 0; i < n; ++i) want += std::exp(a[i] - top);
  const float sa = ref.attn.exp_sum(a.data(), n, top), sb = t.attn.exp_sum(b.data(), n, top);
  ok = ok && std::fabs(sa - want) <= 1e-5f * want && std::fabs(sb - want) <= 1e-5f * want;
  // the MLP activations (SiLU, tanh-GELU) times up, against libm
  for (int kind = 0; kind < 2; ++kind) {
    for (int64_t i = 0; i < n; ++i) a[i] = 12.f * uniform();  // gate
    for (int64_t i = 0; i < n; ++i) p[i] = uniform();  // up
    std::vector<float> ga(n), gb(n);
    ok = ok && ref.act(kind, a.data(), p.data(), ga.data(), n) && t.act(kind, a.data(), p.data(), gb.data(), n);
    for (int64_t i = 0; i < n; ++i) {
      const float g = a[i];
      const float want_i = p[i] * (kind == 0 ? g / (1.f + std::exp(-g))
                                             : 0.5f * g * (1.f + std::tanh(0.7978845608f * (g + 0.044715f * g * g * g))));
      ok = ok && std::fabs(ga[i] - want_i) <= 1e-5f * (1.f + std::fabs(want_i)) &&
           std::fabs(gb[i] - want_i) <= 1e-5f * (1.f + std::fabs(want_i));
    }
  }
  for (int64_t i = 0; i < d; ++i) ok = ok && std::fabs(oa[i] - ob[i]) <= 1e-4f * (1.f + std::fabs(oa[i]));
  if (!ok) std::printf("%s: attention n=%lld d=%lld disagrees\n", t.name,
                       static_cast<long long>(n), static_cast<long long>(d));
  return ok;
}

int main() {
  const llmb::KernelTable* ref = llmb::generic_table();
  const llmb::KernelTable* neon = llmb::neon_table();
  if (neon == nullptr) {
    std::printf("neon: table not compiled (not an AArch64 build)\n");
    return 1;
  }
  // neondot where the CPU (qemu's emulated one: all features) has dotprod
  std::vector<const llmb::KernelTable*> tables{neon};
  if (const llmb::KernelTable* dot = llmb::neondot_table()) tables.push_back(dot);
  std::printf("tables: %s", ref->name);
  for (const auto* t : tables) std::printf(", %s", t->name);
  std::printf("\n");
  std::vector<Case> cases;
  const int64_t Ms[] = {1, 2, 3, 4, 5, 8, 13};
  const int64_t Ns[] = {1, 3, 4, 7, 16, 37};
  for (llmb::Fmt fmt : {llmb::kF32, llmb::kBF16, llmb::kI8})
    for (int64_t K : {4, 60, 64, 100, 256, 576})
      for (int64_t M : Ms)
        for (int64_t N : Ns) {
          cases.push_back({fmt, M, K, N, K, (M + N) % 2 == 0});
          if (fmt == llmb::kI8) cases.push_back({fmt, M, K, N, K, (M + N) % 2 == 1, 127.f});
        }
  for (int64_t K : {128, 256, 576})
    for (int64_t group : {int64_t{32}, int64_t{64}, int64_t{128}, K})
      for (int64_t M : Ms)
        for (int64_t N : Ns)
          if (K % group == 0) cases.push_back({llmb::kI4, M, K, N, group, (M + N) % 2 == 1});
  for (int64_t M : Ms)  // per-channel int4 with a K that is not a multiple of 32
    cases.push_back({llmb::kI4, M, 80, 7, 80, true});
  for (int64_t K : {128, 256, 576})  // int8 activations: groups of whole 64-element units
    for (int64_t group : {int64_t{64}, int64_t{128}, K})
      for (int64_t M : Ms)
        for (int64_t N : Ns)
          if (K % group == 0 && group % 64 == 0)
            for (int mode = 0; mode < 3; ++mode)  // per row; per tensor; per row and group
              cases.push_back({llmb::kI4, M, K, N, group, (M + N + mode) % 2 == 1, 0.f, true,
                               mode == 1, mode == 2 ? group : 0});
  int bad = 0;
  for (const auto* table : tables) {
    int table_bad = 0;
    for (const Case& c : cases)
      if (!c.i4q8 || table->i4q8 != nullptr) table_bad += check(*ref, *table, c) ? 0 : 1;
    for (int64_t n : {1, 3, 4, 9, 130})
      for (int64_t d : {4, 6, 16, 24, 64, 80, 128}) table_bad += check_attention(*ref, *table, n, d) ? 0 : 1;
    if (table_bad) std::printf("%s: %d of %zu cases disagree\n", table->name, table_bad,
                               cases.size());
    bad += table_bad;
  }
  if (bad) return 1;
  int i4q8_tables = 0;
  for (const auto* t : tables) i4q8_tables += t->i4q8 != nullptr;
  std::printf("int4 x int8 activations (i4q8) on %d table(s)\n", i4q8_tables);
  std::printf("neon: %zu cases agree, on each of %zu tables\n", cases.size(), tables.size());
  return 0;
}
