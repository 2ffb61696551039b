// ISA-agnostic GEMV kernel templates.
//
// NOT a normal header: it is #included *inside* an anonymous namespace of each
// ISA translation unit (kernels_generic.cpp / kernels_avx2.cpp /
// kernels_avx512.cpp), after that unit has defined its vector shim:
//
//   using V = <vector of W floats>;  constexpr int W;
//   V vzero(); V vset1(float); V vadd(V, V); V vmul(V, V); V vfma(V a, V b, V c) /* a*b+c */;
//   float vhsum(V);
//   V vld_f32(const float*);  V vld_bf16(const uint16_t*);  V vld_i8(const int8_t*);
//   void vst_f32(float*, V);
//   optional: void vhsum4(V, V, V, V, float* out) with #define LLMB_HAS_VHSUM4 (a generic
//   one from four vhsum calls otherwise)
//   void vld_i4x32(const uint8_t* p, V* q);  // 16 bytes -> 32 floats in [0,15],
//                                            // q[j] = elements [j*W, (j+1)*W)
//
// Because of the anonymous namespace every instantiation has internal linkage,
// so the same template compiled with different `#pragma GCC target` flags in
// different TUs never gets merged by the linker.
//
// Blocking: each call computes a tile of R weight rows x MT activation rows,
// holding R*MT vector accumulators in registers; weights are streamed once
// per tile, activations are re-read from L1.  Rows are processed in blocks of
// 4 (so 4 independent weight streams are in flight), then a 1-row tail.
// M is tiled in chunks of <= 4; for M > 4 the weight block is re-read from
// L1/L2 for each M chunk (it is small: 4 rows).

// Per-ISA tuning knobs, defined by the including unit before this header:
//   LLMB_ROW_DECODE  1: batch-1 dense decode reads one weight row at a time
//                    (dense_row), 0: four rows at a time (dense_tile);
//   LLMB_PF_BYTES    software prefetch distance of the row-at-a-time loops
//                    (0 or undefined: none), LLMB_PF_LOC its locality hint.
#ifndef LLMB_ROW_DECODE
#define LLMB_ROW_DECODE 1
#endif
#ifndef LLMB_TILE_ACC  // vector accumulators one dense tile may hold (AVX2 has 16 registers)
#define LLMB_TILE_ACC 12
#endif
#ifndef LLMB_TILE_PREFETCH  // 1: prefill tiles prefetch the next weight rows (dense_tile)
#define LLMB_TILE_PREFETCH 0
#endif
#ifndef LLMB_TILE_PF_LOC
#define LLMB_TILE_PF_LOC 3
#endif
#ifndef LLMB_DENSE_MT  // activation rows per dense tile
#define LLMB_DENSE_MT 4
#endif
#ifndef LLMB_PF_LOC
#define LLMB_PF_LOC 2
#endif
#ifndef LLMB_PF_BYTES
#define LLMB_PF_BYTES 0
#endif

// Prefetch the BYTES that a loop step starting at p reads, LLMB_PF_BYTES ahead.
template <int BYTES>
inline void prefetch_ahead(const void* p) {
  if constexpr (LLMB_PF_BYTES > 0)
    for (int off = 0; off < BYTES; off += 64)
      __builtin_prefetch(static_cast<const char*>(p) + LLMB_PF_BYTES + off, 0, LLMB_PF_LOC);
}

// ---------------------------------------------------------------------------
// element formats for the dense kernels (f32, bf16, int8)
// ---------------------------------------------------------------------------
inline float bf16_bits_to_f32(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

struct FmtF32 {
  using T = float;
  static constexpr bool kRowScale = false;
  static V load(const T* p) { return vld_f32(p); }
  static float scalar(const T* p) { return *p; }
};
struct FmtBF16 {
  using T = uint16_t;
  static constexpr bool kRowScale = false;
  static V load(const T* p) { return vld_bf16(p); }
  static float scalar(const T* p) { return bf16_bits_to_f32(*p); }
};
struct FmtI8 {  // per-output-row scale applied after the dot product
  using T = int8_t;
  static constexpr bool kRowScale = true;
  static V load(const T* p) { return vld_i8(p); }
  static float scalar(const T* p) { return static_cast<float>(*p); }
};

#ifndef LLMB_HAS_VHSUM4
inline void vhsum4(V a, V b, V c, V d, float* out) {
  out[0] = vhsum(a);
  out[1] = vhsum(b);
  out[2] = vhsum(c);
  out[3] = vhsum(d);
}
#endif

template <class F, int R, int MT>
inline void dense_tile(const GemvArgs& a, int64_t n0, int64_t m0) {
  const int64_t K = a.K, ldx = a.ldx;
  const typename F::T* w = static_cast<const typename F::T*>(a.w) + n0 * K;
  const float* x = a.x + m0 * ldx;
  V acc[R][MT];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MT; ++m) acc[r][m] = vzero();
  int64_t k = 0;
  for (; k + W <= K; k += W) {
    for (int r = 0; r < R; ++r) {
      const V wv = F::load(w + r * K + k);
      for (int m = 0; m < MT; ++m)
        acc[r][m] = vfma(wv, vld_f32(x + m * ldx + k), acc[r][m]);
    }
  }
  for (int r = 0; r < R; ++r) {
    const int64_t n = n0 + r;
    for (int m = 0; m < MT; ++m) {
      float s = vhsum(acc[r][m]);
      for (int64_t kk = k; kk < K; ++kk)  // scalar K tail
        s += F::scalar(w + r * K + kk) * x[m * ldx + kk];
      if (F::kRowScale) s *= a.scales[n];
      if (a.bias) s += a.bias[n];
      a.y[(m0 + m) * a.ldy + n] = s;
    }
  }
}

// The same tile for register files that hold more than 4 activation rows' accumulators
// (LLMB_DENSE_MT > 4: AVX-512), tuned for short prefills. (Kept apart from dense_tile: the
// AVX2 build of the shared version measured its batch-1 fp32 GEMV 26-52% slower on the Xeon
// (the whole decode step 6-13%) with an identical inner loop, so AVX2 keeps its code as it was.)
template <class F, int R, int MT, bool PF = true>
inline void dense_tile_wide(const GemvArgs& a, int64_t n0, int64_t m0) {
  const int64_t K = a.K, ldx = a.ldx;
  const typename F::T* w = static_cast<const typename F::T*>(a.w) + n0 * K;
  const float* x = a.x + m0 * ldx;
  V acc[R][MT];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MT; ++m) acc[r][m] = vzero();
  // Prefill (several activation tiles over the same weight rows): the tiles spread over
  // their steps the prefetch of the next R weight rows (contiguous in memory), so the weights
  // stream from memory all the time instead of only while the first tile runs; the later tiles
  // reuse the current rows from L1. x86 prefetches never fault, past the end included.
  const int64_t chunks = (a.M + LLMB_DENSE_MT - 1) / LLMB_DENSE_MT;
  const int64_t steps = K / W;
  const char* next = reinterpret_cast<const char*>(w + R * K);
  const int64_t lines = (R * K * static_cast<int64_t>(sizeof(typename F::T)) + 63) / 64;
  const int64_t per_step = (PF && LLMB_TILE_PREFETCH && chunks > 1 && steps > 0)
                               ? (lines + chunks * steps - 1) / (chunks * steps)
                               : 0;
  int64_t line = (m0 / LLMB_DENSE_MT) * steps * per_step;
  int64_t k = 0;
  for (; k + W <= K; k += W) {
    for (int64_t p = 0; p < per_step && line < lines; ++p, ++line)
      __builtin_prefetch(next + line * 64, 0, LLMB_TILE_PF_LOC);
    // Each activation vector is loaded once per step and reused for all R weight rows:
    // with R * MT accumulators the loads then stay well below the multiply-adds.
    V xv[MT];
    for (int m = 0; m < MT; ++m) xv[m] = vld_f32(x + m * ldx + k);
    for (int r = 0; r < R; ++r) {
      const V wv = F::load(w + r * K + k);
      for (int m = 0; m < MT; ++m) acc[r][m] = vfma(wv, xv[m], acc[r][m]);
    }
  }
  // Horizontal sums, four accumulators at a time where the ISA has a cheaper way
  // (vhsum4): for prefill tiles the reductions are otherwise a sizeable share.
  constexpr int NACC = R * MT, NACC4 = NACC / 4 * 4;
  const V* flat = &acc[0][0];
  float sums[NACC];
  for (int i = 0; i < NACC4; i += 4) vhsum4(flat[i], flat[i + 1], flat[i + 2], flat[i + 3], sums + i);
  for (int i = NACC4; i < NACC; ++i) sums[i] = vhsum(flat[i]);
  for (int r = 0; r < R; ++r) {
    const int64_t n = n0 + r;
    for (int m = 0; m < MT; ++m) {
      float s = sums[r * MT + m];
      for (int64_t kk = k; kk < K; ++kk)  // scalar K tail
        s += F::scalar(w + r * K + kk) * x[m * ldx + kk];
      if (F::kRowScale) s *= a.scales[n];
      if (a.bias) s += a.bias[n];
      a.y[(m0 + m) * a.ldy + n] = s;
    }
  }
}

// One weight row against one activation row, four accumulators: the weights
// are then read strictly in memory order, which the hardware prefetchers
// follow far better than several interleaved short rows (measured on AVX2:
// int8 rows of 576 bytes read 2x faster one at a time than four at a time).
template <class F>
inline void dense_row(const GemvArgs& a, int64_t n) {
  const int64_t K = a.K;
  const typename F::T* w = static_cast<const typename F::T*>(a.w) + n * K;
  const float* x = a.x;
  V acc0 = vzero(), acc1 = vzero(), acc2 = vzero(), acc3 = vzero();
  int64_t k = 0;
  for (; k + 4 * W <= K; k += 4 * W) {
    prefetch_ahead<4 * W * sizeof(typename F::T)>(w + k);
    acc0 = vfma(F::load(w + k), vld_f32(x + k), acc0);
    acc1 = vfma(F::load(w + k + W), vld_f32(x + k + W), acc1);
    acc2 = vfma(F::load(w + k + 2 * W), vld_f32(x + k + 2 * W), acc2);
    acc3 = vfma(F::load(w + k + 3 * W), vld_f32(x + k + 3 * W), acc3);
  }
  for (; k + W <= K; k += W) acc0 = vfma(F::load(w + k), vld_f32(x + k), acc0);
  float s = vhsum(vadd(vadd(acc0, acc1), vadd(acc2, acc3)));
  for (; k < K; ++k) s += F::scalar(w + k) * x[k];
  if (F::kRowScale) s *= a.scales[n];
  if (a.bias) s += a.bias[n];
  a.y[n] = s;
}

template <class F, bool PF = true>
struct DenseKern {
  static constexpr int kMT = LLMB_DENSE_MT;
  template <int NR, int MT>
  static void block(const GemvArgs& a, int64_t n, int64_t m0) {
    if constexpr (MT == 1 && LLMB_ROW_DECODE) {
      if (a.M == 1) {  // batch-1 decode: x is row 0, y is row 0
        for (int i = 0; i < NR; ++i) dense_row<F>(a, n + i);
        return;
      }
    }
    // R divides NR (4 or 1) and R * MT stays within the register budget.
    constexpr int RMAX = (4 * MT <= LLMB_TILE_ACC) ? 4 : (2 * MT <= LLMB_TILE_ACC ? 2 : 1);
    constexpr int R = NR < RMAX ? NR : RMAX;
    for (int i = 0; i < NR; i += R) {
      if constexpr (LLMB_DENSE_MT > 4)
        dense_tile_wide<F, R, MT, PF>(a, n + i, m0);
      else
        dense_tile<F, R, MT>(a, n + i, m0);
    }
  }
};

// ---------------------------------------------------------------------------
// int4, asymmetric, group-wise.  Packed layout (see kernels/__init__.py):
// per row, each full block of 32 elements is 16 bytes; byte i holds element
// i in its low nibble and element i+16 in its high nibble.  A trailing
// partial block of (even) length L stores element i (low) and i+L/2 (high)
// in byte i.
//
// Math: y = sum_g s_g * (sum_{k in g} x_k q_k  -  z_g * sum_{k in g} x_k)
// The inner dot runs on raw q (0..15) in per-group vector accumulators, the
// scale is applied once per group with one FMA per accumulator, and the
// zero-point term is one vectorized dot over groups per output,
// sum_g s_g z_g xsum_g, with the per-group activation sums xsum precomputed
// once per call (ops.cpp).
// ---------------------------------------------------------------------------
// sum_g s[g] * z[g] * xs[g]
inline float dot3(const float* s, const float* z, const float* xs, int64_t n) {
  V acc = vzero();
  int64_t g = 0;
  for (; g + W <= n; g += W) acc = vfma(vmul(vld_f32(s + g), vld_f32(z + g)), vld_f32(xs + g), acc);
  float t = vhsum(acc);
  for (; g < n; ++g) t += s[g] * z[g] * xs[g];
  return t;
}

// NB: full 32-element blocks per group if known at compile time (1, 2, 4 for
// group_size 32/64/128), else 0 = read from a.group_size at run time.
template <int R, int MT, int NA, int NB>
inline void i4_tile(const GemvArgs& a, int64_t n0, int64_t m0) {
  constexpr int NV = 32 / W;
  const int64_t K = a.K, ldx = a.ldx, G = a.group_size, NG = a.ngroups;
  const int64_t rowb = K / 2;
  const uint8_t* wp = static_cast<const uint8_t*>(a.w) + n0 * rowb;
  const float* x = a.x + m0 * ldx;
  const float* sc = a.scales + n0 * NG;
  const float* zp = a.zeros + n0 * NG;
  const float* xsum = a.xsum + m0 * NG;
  const int64_t nblk = NB ? NB : G / 32;  // full blocks per group
  V tot[R][MT];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MT; ++m) tot[r][m] = vzero();
  for (int64_t g = 0; g < NG; ++g) {
    V ga[R][MT][NA];
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < MT; ++m)
        for (int i = 0; i < NA; ++i) ga[r][m][i] = vzero();
    const uint8_t* pg = wp + g * (G / 2);
    const float* xg = x + g * G;
    if constexpr (R == 1 && MT == 1) {  // batch-1: one row, read in memory order
      for (int64_t off = 0; off < G / 2; off += 64) prefetch_ahead<64>(pg + off);
    }
    for (int64_t b = 0; b < nblk; ++b) {
      for (int r = 0; r < R; ++r) {
        V q[NV];
        vld_i4x32(pg + r * rowb + b * 16, q);
        for (int j = 0; j < NV; ++j)
          for (int m = 0; m < MT; ++m)
            ga[r][m][j % NA] =
                vfma(q[j], vld_f32(xg + m * ldx + b * 32 + j * W), ga[r][m][j % NA]);
      }
    }
    for (int r = 0; r < R; ++r) {
      const V s = vset1(sc[r * NG + g]);
      for (int m = 0; m < MT; ++m) {
        V t = ga[r][m][0];
        for (int i = 1; i < NA; ++i) t = vadd(t, ga[r][m][i]);
        tot[r][m] = vfma(s, t, tot[r][m]);
      }
    }
  }
  // Partial trailing block: only possible when group_size == K (NG == 1).
  const int64_t kt = nblk * 32;
  const int64_t L = NB ? 0 : G - kt;
  for (int r = 0; r < R; ++r) {
    const int64_t n = n0 + r;
    for (int m = 0; m < MT; ++m) {
      float s = vhsum(tot[r][m]);
      if (L > 0) {
        const float* xm = x + m * ldx;
        const uint8_t* p = wp + r * rowb + kt / 2;
        const int64_t h = L / 2;
        float t = 0.f;
        for (int64_t i = 0; i < h; ++i)
          t += static_cast<float>(p[i] & 15) * xm[kt + i] +
               static_cast<float>(p[i] >> 4) * xm[kt + h + i];
        s += t * sc[r * NG];
      }
      s -= dot3(sc + r * NG, zp + r * NG, xsum + m * NG, NG);  // zero-point term
      if (a.bias) s += a.bias[n];
      a.y[(m0 + m) * a.ldy + n] = s;
    }
  }
}

template <int NB>
struct I4Kern {
  static constexpr int kMT = 4;
  template <int NR, int MT>
  static void block(const GemvArgs& a, int64_t n, int64_t m0) {
    // accumulators: R*MT*NA (group) + R*MT (total) <= 12
    // batch-1 decode: one row at a time, in memory order (see dense_row)
    constexpr int RMAX = (MT == 1) ? 1 : (MT <= 3 ? 2 : 1);
    constexpr int NA = (MT == 1) ? 4 : 1;
    constexpr int R = NR < RMAX ? NR : RMAX;
    for (int i = 0; i < NR; i += R) i4_tile<R, MT, NA, NB>(a, n + i, m0);
  }
};

// ---------------------------------------------------------------------------
// row-range driver
// ---------------------------------------------------------------------------
// The last LEFT (< Kern::kMT) activation rows, as one tile of exactly that many.
template <class Kern, int NR, int MT>
inline void m_tail(const GemvArgs& a, int64_t n, int64_t m0, int64_t left) {
  if constexpr (MT >= 1) {
    if (left == MT)
      Kern::template block<NR, MT>(a, n, m0);
    else
      m_tail<Kern, NR, MT - 1>(a, n, m0, left);
  }
}

// Activation rows [m_begin, M) against weight rows [n, n + NR).
template <class Kern, int NR>
inline void all_m(const GemvArgs& a, int64_t n, int64_t m_begin = 0) {
  constexpr int MT = Kern::kMT;
  int64_t m0 = m_begin;
  for (; a.M - m0 >= MT; m0 += MT) Kern::template block<NR, MT>(a, n, m0);
  if constexpr (MT == 4) {  // as it always was (see dense_tile_wide on AVX2 code layout)
    switch (a.M - m0) {
      case 3: Kern::template block<NR, 3>(a, n, m0); break;
      case 2: Kern::template block<NR, 2>(a, n, m0); break;
      case 1: Kern::template block<NR, 1>(a, n, m0); break;
      default: break;
    }
  } else {
    m_tail<Kern, NR, MT - 1>(a, n, m0, a.M - m0);
  }
}

template <class Kern>
void rows(const GemvArgs& a, int64_t n_begin, int64_t n_end) {
  int64_t n = n_begin;
  for (; n + 4 <= n_end; n += 4) all_m<Kern, 4>(a, n);
  for (; n < n_end; ++n) all_m<Kern, 1>(a, n);
}

// ---------------------------------------------------------------------------
// fp32 prefill as outer products
// ---------------------------------------------------------------------------
// From LLMB_OUTER_M_MIN activation rows on (0: never), fp32 weights multiply x the other way
// round: prep_f32 lays x out once per call as chunks of kOuterChunk rows, each [K][width] with
// width the chunk's rows rounded up to W (row m of the chunk in lane m, the padding zero), and a tile of R weight rows x MV vectors of
// rows broadcasts one weight per row and step k into R * MV fused multiply-adds. The sums then
// sit in lanes of output rows: no horizontal sums per output, and each weight is loaded once
// per chunk instead of once per vector. Measured on the Xeon with AVX-512 (1 thread, hot
// weights, N 3072 x K 576): 32 rows 0.75 ms against 1.12 on dense_tile_wide, 16 rows 0.50
// against 0.65, a tie near 12, slower below (the broadcasts then cost as much as the FMAs).
#ifndef LLMB_OUTER_M_MIN
#define LLMB_OUTER_M_MIN 0
#endif
#if LLMB_OUTER_M_MIN > 0
#ifndef LLMB_OUTER_MV  // activation vectors per chunk
#define LLMB_OUTER_MV 4
#endif
#ifndef LLMB_OUTER_PF  // 1: each tile prefetches the next one's weight rows
#define LLMB_OUTER_PF 1
#endif
#ifndef LLMB_OUTER_PF_LOC
#define LLMB_OUTER_PF_LOC 2
#endif
#ifndef LLMB_OUTER_REGS  // vector registers the tiles may use
#define LLMB_OUTER_REGS 16
#endif
constexpr int kOuterChunk = LLMB_OUTER_MV * W;
static_assert(kOuterChunk <= kPrepRowsPad, "prep buffers pad M by kPrepRowsPad rows");

// Weight rows per tile for MV vectors: R * MV accumulators + MV activations + one broadcast
// fit the registers; 8 at most (more measured no faster: the broadcasts are loads).
constexpr int outer_r(int mv) {
  return (LLMB_OUTER_REGS - mv - 1) / mv < 8 ? (LLMB_OUTER_REGS - mv - 1) / mv : 8;
}

// The activation rows that run as outer products (0: none, x stays on the dense tiles):
//  - from the threshold (set_outer_rows) to one vector, all of them, the last vector padded;
//  - none between one and two vectors: one vector's outer products are load-bound (a
//    broadcast per FMA), and with the rest on the dense tiles or padded to two vectors they
//    ran 0.76-0.93x of the dense tiles alone at 20-28 rows;
//  - from two vectors on, whole vectors, and the last M % W rows on the dense tiles against
//    the same weight rows while they are in L1, unless that vector is mostly full (padded).
// (SmolLM2's 30 layers, weights from memory, 2 threads.)
inline int64_t outer_m(const GemvArgs& a) {
  const int64_t set = f32_outer_rows_setting();
  if (set == 0 || a.M < (set < 0 ? LLMB_OUTER_M_MIN : set)) return 0;
  if (a.M <= W) return a.M;
  if (a.M < 2 * W) return 0;
  const int64_t left = a.M % W;
  return left == 0 || left >= 3 * W / 4 ? a.M : a.M - left;
}

void prep_f32(const GemvArgs& a, float* out) {
  if (outer_m(a) == 0) return;
  const int64_t K = a.K, C = kOuterChunk, M = outer_m(a);
  for (int64_t m0 = 0; m0 < M; m0 += C) {
    float* o = out + m0 * K;  // chunk m0 / C
    const int64_t rows = M - m0 < C ? M - m0 : C, width = (rows + W - 1) / W * W;
    // W rows at a time, so each step writes W consecutive floats
    for (int64_t j0 = 0; j0 < rows; j0 += W) {
      const float* src[W];
      for (int j = 0; j < W; ++j) src[j] = j0 + j < rows ? a.x + (m0 + j0 + j) * a.ldx : nullptr;
      for (int64_t k = 0; k < K; ++k) {
        float* d = o + k * width + j0;
        for (int j = 0; j < W; ++j) d[j] = src[j] ? src[j][k] : 0.f;
      }
    }
  }
}

// The bytes a tile prefetches while it computes (the next tile's weight rows): the tiles read
// their rows 4 bytes per row and step, too slowly for the hardware prefetchers to stream them.
struct Ahead {
  const char* p = nullptr;  // null: nothing
  int64_t bytes = 0;        // of which a tile covers R * K * 4 at most (R lines per 16 steps)
};

// Weight rows [n0, n0 + R) x the `rows` activation rows of the chunk at xt (first row m0).
template <int R, int MV>
inline void outer_tile(const GemvArgs& a, int64_t n0, const float* xt, int64_t m0, int64_t rows,
                       Ahead next) {
  const int64_t K = a.K;
  const float* w = static_cast<const float*>(a.w) + n0 * K;
  V acc[R][MV];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < MV; ++j) acc[r][j] = vzero();
  for (int64_t k = 0; k < K; ++k) {
    if (LLMB_OUTER_PF && next.p != nullptr && k % 16 == 0)
      for (int r = 0; r < R; ++r) {
        const int64_t off = (k / 16 * R + r) * 64;
        if (off < next.bytes) __builtin_prefetch(next.p + off, 0, LLMB_OUTER_PF_LOC);
      }
    V xv[MV];
    for (int j = 0; j < MV; ++j) xv[j] = vld_f32(xt + k * (MV * W) + j * W);
    for (int r = 0; r < R; ++r) {
      const V b = vset1(w[r * K + k]);
      for (int j = 0; j < MV; ++j) acc[r][j] = vfma(b, xv[j], acc[r][j]);
    }
  }
  float sums[R][MV * W];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < MV; ++j) vst_f32(&sums[r][j * W], acc[r][j]);
  for (int64_t m = 0; m < rows; ++m) {
    float* y = a.y + (m0 + m) * a.ldy + n0;
    for (int r = 0; r < R; ++r) y[r] = sums[r][m] + (a.bias ? a.bias[n0 + r] : 0.f);
  }
}

// R weight rows at n against every chunk of the first M = outer_m(a) rows (the weight rows
// stay in L1 from one chunk to the next), then against the rows past M on the dense tiles.
template <int R>
inline void outer_rows_tile(const GemvArgs& a, int64_t n, int64_t M, Ahead next) {
  for (int64_t m0 = 0; m0 < M; m0 += kOuterChunk) {
    const int64_t rows = M - m0 < kOuterChunk ? M - m0 : kOuterChunk;
    const float* xt = a.xp + m0 * a.K;
    switch ((rows + W - 1) / W) {
      case 1: outer_tile<R, 1>(a, n, xt, m0, rows, next); break;
      case 2: if constexpr (LLMB_OUTER_MV >= 2) outer_tile<R, 2>(a, n, xt, m0, rows, next); break;
      case 3: if constexpr (LLMB_OUTER_MV >= 3) outer_tile<R, 3>(a, n, xt, m0, rows, next); break;
      default: if constexpr (LLMB_OUTER_MV >= 4) outer_tile<R, LLMB_OUTER_MV>(a, n, xt, m0, rows, next); break;
    }
  }
  if (M < a.M) {
    int r = 0;
    for (; r + 4 <= R; r += 4) all_m<DenseKern<FmtF32, false>, 4>(a, n + r, M);
    for (; r < R; ++r) all_m<DenseKern<FmtF32, false>, 1>(a, n + r, M);
  }
}

template <int R>
inline void outer_rows(const GemvArgs& a, int64_t n_begin, int64_t n_end, int64_t M) {
  // the next tile's rows are contiguous after these
  auto ahead = [&](int64_t n, int rows) {
    return Ahead{reinterpret_cast<const char*>(static_cast<const float*>(a.w) + (n + rows) * a.K),
                 rows * a.K * static_cast<int64_t>(sizeof(float))};
  };
  int64_t n = n_begin;
  for (; n + R <= n_end; n += R) outer_rows_tile<R>(a, n, M, ahead(n, R));
  if constexpr (R > 4)
    for (; n + 4 <= n_end; n += 4) outer_rows_tile<4>(a, n, M, ahead(n, 4));
  for (; n < n_end; ++n) outer_rows_tile<1>(a, n, M, ahead(n, 1));
}

void rows_f32(const GemvArgs& a, int64_t n_begin, int64_t n_end) {
  const int64_t M = outer_m(a);
  if (M == 0 || a.xp == nullptr) return rows<DenseKern<FmtF32>>(a, n_begin, n_end);
  // the register budget of the first chunk's width (every chunk but the last is full)
  switch ((M < kOuterChunk ? M + W - 1 : kOuterChunk) / W) {
    case 1: outer_rows<outer_r(1)>(a, n_begin, n_end, M); break;
    case 2: outer_rows<outer_r(2)>(a, n_begin, n_end, M); break;
    case 3: outer_rows<outer_r(3)>(a, n_begin, n_end, M); break;
    default: outer_rows<outer_r(LLMB_OUTER_MV)>(a, n_begin, n_end, M); break;
  }
}
#define LLMB_F32_ROWS &rows_f32
#define LLMB_F32_PREP &prep_f32

// Weights of other formats on these outer products, tile by tile: each tile's R weight rows
// are made fp32 once (widen(n, out): row n's K floats) into `buf`, which stays in L1, and the
// outer products run on it against every chunk of rows, where the formats' own tiles convert
// every weight again for each tile of activation rows. buf holds 8 rows of K floats. The
// source rows (row_bytes each from a.w) of the next tile are prefetched while one computes:
// without, widening bf16 rows waited on memory for a quarter of SmolLM2's bf16 prefill.
template <int R, class Widen>
inline void widened_outer(const GemvArgs& a, int64_t n_begin, int64_t n_end, int64_t M,
                          float* buf, int64_t row_bytes, const Widen& widen) {
  GemvArgs b = a;  // the fp32 tiles on buf: its rows 0..R-1 are weight rows n..n+R-1
  b.w = buf;
  b.scales = nullptr;
  int64_t n = n_begin;
  auto tile = [&](auto rows_const) {
    constexpr int RT = decltype(rows_const)::value;
    for (int r = 0; r < RT; ++r) widen(n + r, buf + r * a.K);
    b.y = a.y + n;
    b.bias = a.bias ? a.bias + n : nullptr;
    outer_rows_tile<RT>(b, 0, M, Ahead{static_cast<const char*>(a.w) + (n + RT) * row_bytes,
                                       RT * row_bytes});
    n += RT;
  };
  while (n + R <= n_end) tile(std::integral_constant<int, R>{});
  if constexpr (R > 4)
    while (n + 4 <= n_end) tile(std::integral_constant<int, 4>{});
  while (n < n_end) tile(std::integral_constant<int, 1>{});
}

// False (nothing computed) where x is not laid out for the outer products (prep_f32) or the
// buffer can't be had: the caller runs its format's own tiles.
template <class Widen>
bool rows_widened_outer(const GemvArgs& a, int64_t n_begin, int64_t n_end, int64_t row_bytes,
                        const Widen& widen) {
  const int64_t M = outer_m(a);
  if (M == 0 || a.xp == nullptr) return false;
  // malloc, not a std container: this header is compiled under ISA target pragmas.
  float* buf = static_cast<float*>(std::malloc(sizeof(float) * 8 * a.K));
  if (buf == nullptr) return false;
  switch ((M < kOuterChunk ? M + W - 1 : kOuterChunk) / W) {
    case 1: widened_outer<outer_r(1)>(a, n_begin, n_end, M, buf, row_bytes, widen); break;
    case 2: widened_outer<outer_r(2)>(a, n_begin, n_end, M, buf, row_bytes, widen); break;
    case 3: widened_outer<outer_r(3)>(a, n_begin, n_end, M, buf, row_bytes, widen); break;
    default: widened_outer<outer_r(LLMB_OUTER_MV)>(a, n_begin, n_end, M, buf, row_bytes, widen); break;
  }
  std::free(buf);
  return true;
}
#define LLMB_WIDENED_OUTER 1

// bf16 weights from as many rows on as fp32 ones (LLMB_BF16_OUTER: paths without bf16 dot
// products).
#if defined(LLMB_BF16_OUTER)
bool rows_bf16_outer(const GemvArgs& a, int64_t n_begin, int64_t n_end) {
  const int64_t K = a.K, kv = K / W * W;
  return rows_widened_outer(a, n_begin, n_end, 2 * K, [&](int64_t n, float* o) {
    const uint16_t* w = static_cast<const uint16_t*>(a.w) + n * K;
    for (int64_t k = 0; k < kv; k += W) vst_f32(o + k, FmtBF16::load(w + k));
    for (int64_t k = kv; k < K; ++k) o[k] = bf16_bits_to_f32(w[k]);
  });
}
#endif
#else
#define LLMB_F32_ROWS &rows<DenseKern<FmtF32>>
#define LLMB_F32_PREP nullptr
#endif

// ---------------------------------------------------------------------------
// decode attention (decode_step.cpp attend): one query head against a run of n cached
// positions of its KV head, each d floats, rows ld floats apart. The plain loops they replace
// could not be vectorized (a float sum keeps its order without -ffast-math) and took ~40% of
// a SmolLM2 fp32 step at 1024 positions.
// ---------------------------------------------------------------------------
// scores[t] = scale * <q, keys[t]>, four positions at a time (one horizontal sum of four).
void attn_scores(const float* q, const float* keys, int64_t ld, int64_t n, int64_t d,
                 float scale, float* scores) {
  const int64_t dv = d / W * W;
  int64_t t = 0;
  for (; t + 4 <= n; t += 4) {
    const float* k = keys + t * ld;
    V a0 = vzero(), a1 = vzero(), a2 = vzero(), a3 = vzero();
    for (int64_t i = 0; i < dv; i += W) {
      const V qv = vld_f32(q + i);
      a0 = vfma(qv, vld_f32(k + i), a0);
      a1 = vfma(qv, vld_f32(k + ld + i), a1);
      a2 = vfma(qv, vld_f32(k + 2 * ld + i), a2);
      a3 = vfma(qv, vld_f32(k + 3 * ld + i), a3);
    }
    float sums[4];
    vhsum4(a0, a1, a2, a3, sums);
    for (int j = 0; j < 4; ++j) {
      float v = sums[j];
      for (int64_t i = dv; i < d; ++i) v += q[i] * k[j * ld + i];
      scores[t + j] = v * scale;
    }
  }
  for (; t < n; ++t) {
    const float* k = keys + t * ld;
    V a = vzero();
    for (int64_t i = 0; i < dv; i += W) a = vfma(vld_f32(q + i), vld_f32(k + i), a);
    float v = vhsum(a);
    for (int64_t i = dv; i < d; ++i) v += q[i] * k[i];
    scores[t] = v * scale;
  }
}

// out[i0, i0 + NV * W) += sum_t p[t] * values[t][same], two positions per pass.
template <int NV>
inline void attn_mix_block(const float* p, const float* values, int64_t ld, int64_t n,
                           float* out) {
  V a[NV], b[NV];
  for (int j = 0; j < NV; ++j) {
    a[j] = vld_f32(out + j * W);
    b[j] = vzero();
  }
  int64_t t = 0;
  for (; t + 2 <= n; t += 2) {
    const V p0 = vset1(p[t]), p1 = vset1(p[t + 1]);
    const float* v = values + t * ld;
    for (int j = 0; j < NV; ++j) {
      a[j] = vfma(p0, vld_f32(v + j * W), a[j]);
      b[j] = vfma(p1, vld_f32(v + ld + j * W), b[j]);
    }
  }
  if (t < n) {
    const V p0 = vset1(p[t]);
    for (int j = 0; j < NV; ++j) a[j] = vfma(p0, vld_f32(values + t * ld + j * W), a[j]);
  }
  for (int j = 0; j < NV; ++j) vst_f32(out + j * W, vadd(a[j], b[j]));
}

// out[:d] += sum_t p[t] * values[t][:d]
void attn_mix(const float* p, const float* values, int64_t ld, int64_t n, int64_t d,
              float* out) {
  int64_t i = 0;
  for (; i + 4 * W <= d; i += 4 * W) attn_mix_block<4>(p, values + i, ld, n, out + i);
  switch ((d - i) / W) {
    case 3: attn_mix_block<3>(p, values + i, ld, n, out + i); break;
    case 2: attn_mix_block<2>(p, values + i, ld, n, out + i); break;
    case 1: attn_mix_block<1>(p, values + i, ld, n, out + i); break;
    default: break;
  }
  for (i += (d - i) / W * W; i < d; ++i) {
    float acc = out[i];
    for (int64_t t = 0; t < n; ++t) acc += p[t] * values[t * ld + i];
    out[i] = acc;
  }
}
// exp(x), x clamped to [-87, 88] (2^k then stays a normal float: exp(-87) is 1.6e-38, exp(88)
// 1.7e38), as a polynomial that the compiler vectorizes at the unit's width inside a loop
// (libm's expf is a call per element): exp(x) = 2^k exp(r), k = round(x / ln 2), r = x - k ln 2
// in two parts, exp(r) to degree 6 (relative error ~1e-7 on |r| <= ln 2 / 2).
inline float exp_poly(float x) {
  x = std::min(std::max(x, -87.f), 88.f);
  const float k = (x * 1.44269504f + 12582912.f) - 12582912.f;  // round to nearest
  const float r = (x - k * 0.693145752f) - k * 1.42860677e-6f;
  float p = 1.f / 720.f;
  p = p * r + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// scores[t] = exp(scores[t] - top) for t < n (all scores <= top), returning their sum (libm's
// expf took a fifth of the attention at 1024 positions).
float attn_exp_sum(float* scores, int64_t n, float top) {
  for (int64_t t = 0; t < n; ++t) scores[t] = exp_poly(scores[t] - top);
  V acc = vzero();
  int64_t t = 0;
  for (; t + W <= n; t += W) acc = vadd(acc, vld_f32(scores + t));
  float sum = vhsum(acc);
  for (; t < n; ++t) sum += scores[t];
  return sum;
}

// The MLP's activation of a decode row: out[i] = act(gate[i]) (* up[i] when up is given), for
// SiLU (kind 0) and tanh-GELU (kind 1, tanh(u) = 1 - 2 / (exp(2u) + 1)); false for the others
// (the caller's loop). A plain loop over libm was 9 us of each SmolLM2 layer per row.
bool act_rows(int kind, const float* gate, const float* up, float* out, int64_t n) {
  if (kind == 0) {
    for (int64_t i = 0; i < n; ++i) out[i] = gate[i] / (1.f + exp_poly(-gate[i]));
  } else if (kind == 1) {
    constexpr float kC = 0.7978845608028654f;  // sqrt(2 / pi)
    for (int64_t i = 0; i < n; ++i) {
      const float g = gate[i], u = kC * (g + 0.044715f * g * g * g);
      out[i] = 0.5f * g * (2.f - 2.f / (exp_poly(2.f * u) + 1.f));
    }
  } else {
    return false;
  }
  if (up != nullptr)
    for (int64_t i = 0; i < n; ++i) out[i] *= up[i];
  return true;
}
#define LLMB_STEP_FNS , {&attn_scores, &attn_mix, &attn_exp_sum}, &act_rows

// ---------------------------------------------------------------------------
// prefill on quantized weights: dequantize, then the fp32 tiles
// ---------------------------------------------------------------------------
// From LLMB_DEQUANT_PREFILL_M activation rows on (0: never) and for K up to
// LLMB_DEQUANT_PREFILL_KMAX, int4 weights are dequantized 4 rows at a time into an fp32
// buffer that stays in L1, and the fp32 dense tiles run on it: every activation tile then
// reuses fp32 rows instead of unpacking and converting the same weights again, and the weights
// are the reference's, (q - zero) * scale. (int8 weights gain nothing from it on the AVX-512
// machine measured: its int16 kernels are as fast from 12 rows on, so they keep them.)
#ifndef LLMB_DEQUANT_PREFILL_M
#define LLMB_DEQUANT_PREFILL_M 0
#endif
#ifndef LLMB_DEQUANT_PREFILL_KMAX
#define LLMB_DEQUANT_PREFILL_KMAX 0
#endif

// Weight row n of packed int4 weights: (q - zero) * scale per group (layout above).
inline void dequant_row_i4(const GemvArgs& a, int64_t n, float* out) {
  constexpr int NV = 32 / W;
  const int64_t K = a.K, G = a.group_size, NG = a.ngroups;
  const uint8_t* p = static_cast<const uint8_t*>(a.w) + n * (K / 2);
  const float* sc = a.scales + n * NG;
  const float* zp = a.zeros + n * NG;
  const int64_t full = K / 32 * 32;
  for (int64_t k = 0; k < full; k += 32) {
    const int64_t g = k / G;
    const V s = vset1(sc[g]), negz = vset1(-zp[g]);
    V q[NV];
    vld_i4x32(p + k / 2, q);
    for (int j = 0; j < NV; ++j) vst_f32(out + k + j * W, vmul(vadd(q[j], negz), s));
  }
  const int64_t half = (K - full) / 2;  // a partial block: only when group_size == K
  const uint8_t* pb = p + full / 2;
  for (int64_t i = 0; i < half; ++i) {
    out[full + i] = (static_cast<float>(pb[i] & 15) - zp[0]) * sc[0];
    out[full + half + i] = (static_cast<float>(pb[i] >> 4) - zp[0]) * sc[0];
  }
}

inline bool dequant_prefill(const GemvArgs& a) {
  return LLMB_DEQUANT_PREFILL_M > 0 && a.M >= LLMB_DEQUANT_PREFILL_M &&
         a.K <= LLMB_DEQUANT_PREFILL_KMAX;
}

// False (nothing computed) when the buffer can't be allocated: the caller runs its own tiles.
// Where x is laid out for the outer products (prep_i4_int), the dequantized rows run them
// (rows_widened_outer), else 4 rows at a time on the dense fp32 tiles.
bool rows_dequant_i4(const GemvArgs& a, int64_t n_begin, int64_t n_end) {
#if defined(LLMB_WIDENED_OUTER)
  if (rows_widened_outer(a, n_begin, n_end, a.K / 2,
                         [&](int64_t n, float* out) { dequant_row_i4(a, n, out); }))
    return true;
#endif
  const int64_t K = a.K;
  // malloc, not a std container: this header is compiled under ISA target pragmas.
  float* buf = static_cast<float*>(std::malloc(sizeof(float) * 4 * K));
  if (buf == nullptr) return false;
  GemvArgs b = a;  // the fp32 tiles on buf: rows 0..3 of b are weight rows n..n+3
  b.w = buf;
  b.scales = nullptr;
  for (int64_t n = n_begin; n < n_end; n += 4) {
    const int64_t rows = n_end - n < 4 ? n_end - n : 4;
    for (int64_t r = 0; r < rows; ++r) dequant_row_i4(a, n + r, buf + r * K);
    b.y = a.y + n;
    b.bias = a.bias ? a.bias + n : nullptr;
    if (rows == 4) {
      all_m<DenseKern<FmtF32, false>, 4>(b, 0);
    } else {
      for (int64_t r = 0; r < rows; ++r) all_m<DenseKern<FmtF32, false>, 1>(b, r);
    }
  }
  std::free(buf);
  return true;
}

void rows_i4(const GemvArgs& a, int64_t n_begin, int64_t n_end) {
  if (dequant_prefill(a) && rows_dequant_i4(a, n_begin, n_end)) return;
  switch (a.group_size) {
    case 32: rows<I4Kern<1>>(a, n_begin, n_end); break;
    case 64: rows<I4Kern<2>>(a, n_begin, n_end); break;
    case 128: rows<I4Kern<4>>(a, n_begin, n_end); break;
    default: rows<I4Kern<0>>(a, n_begin, n_end); break;
  }
}

#define LLMB_KERNEL_TABLE(NAME)                                        \
  {                                                                    \
    NAME, {                                                            \
      LLMB_F32_ROWS, &rows<DenseKern<FmtBF16>>,                        \
          &rows<DenseKern<FmtI8>>, &rows_i4                            \
    }, { LLMB_F32_PREP, nullptr, nullptr, nullptr }                    \
    LLMB_STEP_FNS                                                      \
  }
