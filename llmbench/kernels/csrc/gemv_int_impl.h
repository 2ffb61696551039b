// Kernel templates that need integer vector operations: bf16 weights read
// two-for-one, and int8 weights against int16-rounded activations.
//
// Like gemv_impl.h this is NOT a normal header: it is #included inside the
// anonymous namespace of an ISA translation unit (kernels_avx2.cpp,
// kernels_avx512.cpp), after gemv_impl.h and after the unit has defined, on
// top of gemv_impl.h's float shim (V, W, ...), an integer shim:
//
//   using VI = <integer vector as wide as V>;
//   VI vi_load(const void* p);                 // unaligned full-width load
//   V  bf16_even(VI v); V bf16_odd(VI v);      // 2W bf16 -> their even / odd elements as fp32
//   VI vi_widen_i8(const int8_t* p);           // 2W int8 -> 2W int16
//   VI vi_widen_u8(const uint8_t* p);          // 2W uint8 -> 2W int16 (zero-extended)
//   VI vi_lo_nibble(VI v); VI vi_hi_nibble(VI v);  // int16 lanes of bytes: & 15, >> 4
//   V  vset_halves(float lo, float hi);        // lanes [0, W/2) = lo, [W/2, W) = hi
//   VI vi_zero(); VI vi_madd(VI acc, VI a, VI b);  // acc + pairwise int16 products, as int32
//   VI vi_add(VI a, VI b);                     // int32 lanes
//   V  vi_to_ps(VI v);                         // W int32 -> W floats
//   void store_i16(int16_t* q, V a, V b);      // 2W floats -> 2W int16, rounded, in order
//   V vabs(V); V vmax(V, V); float vhmax(V);
//
// bf16 weights, two-for-one: a full-width load holds 2W bf16 values, and as W
// 32-bit lanes each lane is (odd element << 16 | even element). Shifting left
// by 16 gives the even elements as fp32, masking the low half gives the odd
// ones, so 2W weights cost one load and two ALU ops (the generic path widens W
// at a time with a cross-lane shuffle). The activations are deinterleaved to
// match once per call (prep_bf16): per 2W-block, W evens then W odds.
//
// int8 weights against int16 activations: x is rounded once per call to int16
// with one scale per row (|error| <= max|x| / 65534, far below the int8
// weights' own rounding), so 2W weights cost a widening load and one
// multiply-add of int16 pairs into int32 (vpmaddwd) instead of 2 x (widen to
// int32, convert to float, FMA). Layout of the prepared buffer: M float row
// scales, then from float offset M rounded up to 16 (64 bytes), M rows of K
// int16 (M * K / 2 floats: the buffer has room for M * K + 64).
//
// With int8 activations (a.act_qmax > 0: SmoothQuant W8A8, --lowp-mode INT8)
// prep_i8 rounds x to +-127 instead (quantize_act_row) and the same kernels
// multiply int8 by int8 exactly, accumulating in int32.

constexpr int W2 = 2 * W;  // elements per full-width bf16 / int16 vector

void prep_bf16(const GemvArgs& a, float* out) {
  const int64_t K = a.K, KB = K - K % W2;
  for (int64_t m = 0; m < a.M; ++m) {
    const float* x = a.x + m * a.ldx;
    float* o = out + m * K;
    for (int64_t k = 0; k < KB; k += W2)
      for (int i = 0; i < W; ++i) {
        o[k + i] = x[k + 2 * i];
        o[k + W + i] = x[k + 2 * i + 1];
      }
    for (int64_t k = KB; k < K; ++k) o[k] = x[k];
  }
}

template <int R, int MT>
inline void bf16_tile(const GemvArgs& a, int64_t n0, int64_t m0) {
  const int64_t K = a.K, KB = K - K % W2;
  const uint16_t* w = static_cast<const uint16_t*>(a.w) + n0 * K;
  const float* xp = a.xp + m0 * K;
  V acc[R][MT];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MT; ++m) acc[r][m] = vzero();
  for (int64_t k = 0; k < KB; k += W2) {
    for (int r = 0; r < R; ++r) {
      const VI v = vi_load(w + r * K + k);
      const V even = bf16_even(v), odd = bf16_odd(v);
      for (int m = 0; m < MT; ++m) {
        acc[r][m] = vfma(even, vld_f32(xp + m * K + k), acc[r][m]);
        acc[r][m] = vfma(odd, vld_f32(xp + m * K + k + W), acc[r][m]);
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    const int64_t n = n0 + r;
    for (int m = 0; m < MT; ++m) {
      float s = vhsum(acc[r][m]);
      for (int64_t kk = KB; kk < K; ++kk)  // the tail is in x's own order
        s += bf16_bits_to_f32(w[r * K + kk]) * xp[m * K + kk];
      if (a.bias) s += a.bias[n];
      a.y[(m0 + m) * a.ldy + n] = s;
    }
  }
}

// Batch-1 decode: one row at a time, in memory order (see dense_row).
inline void bf16_row(const GemvArgs& a, int64_t n) {
  const int64_t K = a.K, KB = K - K % W2, KB2 = K - K % (2 * W2);
  const uint16_t* w = static_cast<const uint16_t*>(a.w) + n * K;
  const float* xp = a.xp;
  V acc0 = vzero(), acc1 = vzero(), acc2 = vzero(), acc3 = vzero();
  int64_t k = 0;
  for (; k < KB2; k += 2 * W2) {
    prefetch_ahead<2 * W2 * 2>(w + k);
    const VI v0 = vi_load(w + k), v1 = vi_load(w + k + W2);
    acc0 = vfma(bf16_even(v0), vld_f32(xp + k), acc0);
    acc1 = vfma(bf16_odd(v0), vld_f32(xp + k + W), acc1);
    acc2 = vfma(bf16_even(v1), vld_f32(xp + k + W2), acc2);
    acc3 = vfma(bf16_odd(v1), vld_f32(xp + k + W2 + W), acc3);
  }
  for (; k < KB; k += W2) {
    const VI v = vi_load(w + k);
    acc0 = vfma(bf16_even(v), vld_f32(xp + k), acc0);
    acc1 = vfma(bf16_odd(v), vld_f32(xp + k + W), acc1);
  }
  float s = vhsum(vadd(vadd(acc0, acc1), vadd(acc2, acc3)));
  for (; k < K; ++k) s += bf16_bits_to_f32(w[k]) * xp[k];
  if (a.bias) s += a.bias[n];
  a.y[n] = s;
}

struct BF16PairKern {
  static constexpr int kMT = 4;
  template <int NR, int MT>
  static void block(const GemvArgs& a, int64_t n, int64_t m0) {
    if constexpr (MT == 1) {
      if (a.M == 1) {
        for (int i = 0; i < NR; ++i) bf16_row(a, n + i);
        return;
      }
    }
    constexpr int RMAX = (MT <= 3) ? 4 : 2;
    constexpr int R = NR < RMAX ? NR : RMAX;
    for (int i = 0; i < NR; i += R) bf16_tile<R, MT>(a, n + i, m0);
  }
};


inline int64_t i8_rows_offset(int64_t M) { return (M + 15) & ~int64_t{15}; }

// Rounds x [K] to int16 with the scale max|x| / 32767 (returned), round to
// nearest even as lrintf. CHUNKED: in prep_i4's order (per chunk of 4 float
// vectors, their low-nibble halves first), else in memory order.
template <bool CHUNKED>
float round_row_i16(const float* x, int64_t K, int16_t* q) {
  const int64_t KB = K - K % W2;
  V vtop = vzero();
  int64_t k = 0;
  for (; k + W <= K; k += W) vtop = vmax(vtop, vabs(vld_f32(x + k)));
  float top = vhmax(vtop);
  for (; k < K; ++k) top = std::max(top, std::fabs(x[k]));
  const float scale = top > 0.f ? top / 32767.f : 1.f;
  const float inv = 1.f / scale;
  const V vinv = vset1(inv);
  if constexpr (CHUNKED) {  // K is a multiple of the chunk here (i4_int_ok)
    for (k = 0; k < K; k += 2 * W2) {
      const V v0 = vmul(vld_f32(x + k), vinv), v1 = vmul(vld_f32(x + k + W), vinv);
      const V v2 = vmul(vld_f32(x + k + 2 * W), vinv), v3 = vmul(vld_f32(x + k + 3 * W), vinv);
      if constexpr (W >= 16) {  // a vector is half a 32-block: v0, v2 low halves
        store_i16(q + k, v0, v2);
        store_i16(q + k + W2, v1, v3);
      } else {  // a chunk is one 32-block: memory order
        store_i16(q + k, v0, v1);
        store_i16(q + k + W2, v2, v3);
      }
    }
    return scale;
  }
  for (k = 0; k < KB; k += W2) store_i16(q + k, vmul(vld_f32(x + k), vinv), vmul(vld_f32(x + k + W), vinv));
  for (; k < K; ++k)
    q[k] = static_cast<int16_t>(std::lrintf(std::min(32767.f, std::max(-32767.f, x[k] * inv))));
  return scale;
}

void prep_i8(const GemvArgs& a, float* out) {
  int16_t* q = reinterpret_cast<int16_t*>(out + i8_rows_offset(a.M));
  if (a.act_qmax > 0.f) {  // int8 activations: the same kernels, on values within +-127
    for (int64_t m = 0; m < a.M; ++m) out[m] = quantize_act_row(a, m, q + m * a.K);
    return;
  }
  for (int64_t m = 0; m < a.M; ++m) out[m] = round_row_i16<false>(a.x + m * a.ldx, a.K, q + m * a.K);
}

template <int R, int MT>
inline void i8_tile(const GemvArgs& a, int64_t n0, int64_t m0) {
  const int64_t K = a.K, KB = K - K % W2;
  const int8_t* w = static_cast<const int8_t*>(a.w) + n0 * K;
  const int16_t* xq = reinterpret_cast<const int16_t*>(a.xp + i8_rows_offset(a.M)) + m0 * K;
  // int32 lanes gain at most 2 * 127 * 32767 per step: flush to float every
  // 128 steps, far below overflow.
  constexpr int64_t kFlush = 128 * W2;
  V total[R][MT];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MT; ++m) total[r][m] = vzero();
  for (int64_t k0 = 0; k0 < KB; k0 += kFlush) {
    const int64_t k1 = std::min(KB, k0 + kFlush);
    VI acc[R][MT];
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < MT; ++m) acc[r][m] = vi_zero();
    for (int64_t k = k0; k < k1; k += W2) {
      if constexpr (R == 1 && MT == 1) prefetch_ahead<W2>(w + k);
      for (int r = 0; r < R; ++r) {
        const VI w16 = vi_widen_i8(w + r * K + k);
        for (int m = 0; m < MT; ++m) acc[r][m] = vi_madd(acc[r][m], w16, vi_load(xq + m * K + k));
      }
    }
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < MT; ++m) total[r][m] = vadd(total[r][m], vi_to_ps(acc[r][m]));
  }
  for (int r = 0; r < R; ++r) {
    const int64_t n = n0 + r;
    for (int m = 0; m < MT; ++m) {
      float s = vhsum(total[r][m]);
      for (int64_t kk = KB; kk < K; ++kk)
        s += static_cast<float>(w[r * K + kk]) * static_cast<float>(xq[m * K + kk]);
      s *= a.xp[m0 + m] * a.scales[n];
      if (a.bias) s += a.bias[n];
      a.y[(m0 + m) * a.ldy + n] = s;
    }
  }
}

// Batch-1 decode: one weight row, 4 vectors per loop step into two accumulators (i8_tile's
// single chain did one vector per step, its loop overhead and prefetch per 16 bytes on AVX2).
inline void i8_row(const GemvArgs& a, int64_t n) {
  const int64_t K = a.K, KB = K - K % W2;
  const int8_t* w = static_cast<const int8_t*>(a.w) + n * K;
  const int16_t* xq = reinterpret_cast<const int16_t*>(a.xp + i8_rows_offset(1));
  constexpr int64_t kFlush = 128 * W2;  // as i8_tile: each accumulator takes half the steps
  V total = vzero();
  for (int64_t k0 = 0; k0 < KB; k0 += kFlush) {
    const int64_t k1 = std::min(KB, k0 + kFlush);
    VI acc0 = vi_zero(), acc1 = vi_zero();
    int64_t k = k0;
    for (; k + 4 * W2 <= k1; k += 4 * W2) {
      prefetch_ahead<4 * W2>(w + k);
      acc0 = vi_madd(acc0, vi_widen_i8(w + k), vi_load(xq + k));
      acc1 = vi_madd(acc1, vi_widen_i8(w + k + W2), vi_load(xq + k + W2));
      acc0 = vi_madd(acc0, vi_widen_i8(w + k + 2 * W2), vi_load(xq + k + 2 * W2));
      acc1 = vi_madd(acc1, vi_widen_i8(w + k + 3 * W2), vi_load(xq + k + 3 * W2));
    }
    for (; k < k1; k += W2) acc0 = vi_madd(acc0, vi_widen_i8(w + k), vi_load(xq + k));
    total = vadd(total, vadd(vi_to_ps(acc0), vi_to_ps(acc1)));
  }
  float s = vhsum(total);
  for (int64_t kk = KB; kk < K; ++kk) s += static_cast<float>(w[kk]) * static_cast<float>(xq[kk]);
  s *= a.xp[0] * a.scales[n];
  if (a.bias) s += a.bias[n];
  a.y[n] = s;
}

struct I8Int16Kern {
  static constexpr int kMT = 4;
  template <int NR, int MT>
  static void block(const GemvArgs& a, int64_t n, int64_t m0) {
    if constexpr (MT == 1) {
      if (a.M == 1) {
        for (int i = 0; i < NR; ++i) i8_row(a, n + i);
        return;
      }
    }
    constexpr int RMAX = (MT == 1) ? 1 : (MT <= 3) ? 4 : 2;
    constexpr int R = NR < RMAX ? NR : RMAX;
    for (int i = 0; i < NR; i += R) i8_tile<R, MT>(a, n + i, m0);
  }
};

// int4 weights against int16 activations. A load of W2 / 2 bytes holds W2 / 16
// packed 32-blocks (layout in gemv_impl.h); widened to int16 lanes, its low
// nibbles are each block's elements 0..15 and its high nibbles 16..31. x is
// rounded to int16 as for int8 (round_row_i16) and laid out per chunk of CH =
// 2 * W2 elements to match: the blocks' first halves, then their second
// halves (memory order on AVX2, where a chunk is one block). Then 2 * W2
// weights cost a widening load, an AND, a shift and two vpmaddwd, where the
// float kernel (i4_tile) converts and multiplies each value in fp32; each
// group's int32 sums are scaled once. Each int32 lane sums products of a single
// block, so when a group is half a chunk (groups of 32 on AVX-512) the two
// halves of the lanes take their own group's scale. The zero-point term is
// i4_tile's (fp32 x sums, ops.cpp). Other shapes run i4_tile.
//
// Knob LLMB_I4_INT16 (set by the including unit before gemv_impl.h): 1 puts
// these kernels in the table, 0 keeps i4_tile. On the Intel Xeon (2 threads,
// benchmarks/bench_kernels.py) AVX-512 gained (TinyLlama-shape int4 decode
// linears 34-40 -> 32-34 ms, SmolLM2's 5.7-5.9 -> 5.2-5.4). The AVX2 path had
// measured them slower (13-14 ms against 11-12 for SmolLM2's linears) until it
// got the 4 KiB software prefetch; since then (kernels_avx2.cpp) they win there
// too.
#ifndef LLMB_I4_INT16
#define LLMB_I4_INT16 0
#endif
constexpr int64_t CH = 2 * W2;

inline bool i4_int_ok(const GemvArgs& a) {
  const int64_t G = a.group_size;
  // int32 lanes gain at most 4 * 15 * 32767 per chunk: at most 512 chunks per group
  return G % 32 == 0 && a.K % G == 0 && a.K % CH == 0 && (G % CH == 0 || CH == 2 * G) &&
         G <= 512 * CH;
}

void prep_i4(const GemvArgs& a, float* out) {
  if (!i4_int_ok(a)) return;
  int16_t* q = reinterpret_cast<int16_t*>(out + i8_rows_offset(a.M));
  for (int64_t m = 0; m < a.M; ++m) out[m] = round_row_i16<true>(a.x + m * a.ldx, a.K, q + m * a.K);
}

template <int R, int MT>
inline void i4i_tile(const GemvArgs& a, int64_t n0, int64_t m0) {
  const int64_t K = a.K, G = a.group_size, NG = a.ngroups, rowb = K / 2;
  const uint8_t* w = static_cast<const uint8_t*>(a.w) + n0 * rowb;
  const int16_t* xq = reinterpret_cast<const int16_t*>(a.xp + i8_rows_offset(a.M)) + m0 * K;
  const float* sc = a.scales + n0 * NG;
  V tot[R][MT];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MT; ++m) tot[r][m] = vzero();
  // Chunks [c0, c1) into fresh int32 accumulators. Batch 1 keeps a second one for the high
  // nibbles, so that its two multiply-adds don't wait on each other (tiles have MT chains).
  constexpr int A2 = (R == 1 && MT == 1) ? 1 : 0;
  auto chunks = [&](int64_t c0, int64_t c1, VI (&acc)[R][MT]) {
    VI acc2 = vi_zero();
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < MT; ++m) acc[r][m] = vi_zero();
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t k = c * CH;
      if constexpr (A2) prefetch_ahead<CH / 2>(w + k / 2);
      for (int r = 0; r < R; ++r) {
        const VI v = vi_widen_u8(w + r * rowb + k / 2);
        const VI lo = vi_lo_nibble(v), hi = vi_hi_nibble(v);
        for (int m = 0; m < MT; ++m) {
          acc[r][m] = vi_madd(acc[r][m], lo, vi_load(xq + m * K + k));
          if constexpr (A2) {
            acc2 = vi_madd(acc2, hi, vi_load(xq + k + W2));
          } else {
            acc[r][m] = vi_madd(acc[r][m], hi, vi_load(xq + m * K + k + W2));
          }
        }
      }
    }
    if constexpr (A2) acc[0][0] = vi_add(acc[0][0], acc2);
  };
  VI acc[R][MT];
  if (G % CH == 0) {
    const int64_t per_group = G / CH;
    for (int64_t g = 0; g < NG; ++g) {
      chunks(g * per_group, (g + 1) * per_group, acc);
      for (int r = 0; r < R; ++r) {
        const V s = vset1(sc[r * NG + g]);
        for (int m = 0; m < MT; ++m) tot[r][m] = vfma(vi_to_ps(acc[r][m]), s, tot[r][m]);
      }
    }
  } else {  // two groups per chunk
    for (int64_t c = 0; c < K / CH; ++c) {
      chunks(c, c + 1, acc);
      for (int r = 0; r < R; ++r) {
        const V s = vset_halves(sc[r * NG + 2 * c], sc[r * NG + 2 * c + 1]);
        for (int m = 0; m < MT; ++m) tot[r][m] = vfma(vi_to_ps(acc[r][m]), s, tot[r][m]);
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    const int64_t n = n0 + r;
    for (int m = 0; m < MT; ++m) {
      float s = vhsum(tot[r][m]) * a.xp[m0 + m];  // the row's int16 scale
      s -= dot3(sc + r * NG, a.zeros + n * NG, a.xsum + (m0 + m) * NG, NG);
      if (a.bias) s += a.bias[n];
      a.y[(m0 + m) * a.ldy + n] = s;
    }
  }
}

struct I4Int16Kern {
  static constexpr int kMT = 4;
  template <int NR, int MT>
  static void block(const GemvArgs& a, int64_t n, int64_t m0) {
    // batch 1: one row at a time, in memory order; tiles: <= 16 accumulators on AVX-512
    constexpr int RMAX = (MT == 1) ? 1 : (W >= 16 ? 2 : (MT <= 2 ? 2 : 1));
    constexpr int R = NR < RMAX ? NR : RMAX;
    for (int i = 0; i < NR; i += R) i4i_tile<R, MT>(a, n + i, m0);
  }
};

// x for the int4 x int16 kernels, or for the outer products where dequantized rows run them
// (rows_dequant_i4: the prefill rows of dequant_prefill).
void prep_i4_int(const GemvArgs& a, float* out) {
#if defined(LLMB_WIDENED_OUTER)
  if (dequant_prefill(a) && outer_m(a) > 0) return prep_f32(a, out);
#endif
  prep_i4(a, out);
}

void rows_i4_int(const GemvArgs& a, int64_t n_begin, int64_t n_end) {
  if (i4_int_ok(a) && !dequant_prefill(a)) {
    rows<I4Int16Kern>(a, n_begin, n_end);
  } else {
    rows_i4(a, n_begin, n_end);
  }
}

#ifdef LLMB_HAS_U8S8_DOT
// int4 weights x int8 activations (--lowp-mode INT8 with symmetric levels): the unit also
// defines (x86: u8 weights x s8 activations; NEON's sdot multiplies s8 x s8, which 0..15
// weights are too)
//   constexpr int NU;                               // vectors per 64-element unit
//   void unit_weights(const uint8_t* p, VI* w);     // 32 packed bytes -> NU vectors of u8
//   VI vi_dot_u8s8(VI acc, VI w, VI x);             // acc + sums of 4 u8 x s8 products
//   int levels16(const float* x, V scale, int8_t* q);  // 16 int8 levels, returns their sum
// Each 64-element unit (32 packed bytes, two 32-blocks) is unpacked in the order the AMX
// kernels use (kernels_amx.cpp): the low nibbles of its 32 bytes (elements 0-15 of each
// block), then the high ones (16-31); prep_i4q8 lays the activations out to match, as int8
// levels (ActQuant's symmetric rounding: round half to even of x / scale within +-127). A
// 64-weight unit then costs one load and three ALU ops, shared by the tile's activation rows,
// and NU u8 x s8 dot products per row (vpdpbusd on AVX512-VNNI; vpmaddubsw + vpmaddwd
// elsewhere: 2 * 15 * 127 fits int16), where the int16 kernels above need 2 x 32 int16
// products and twice the activation bytes. Each group's int32 sums are scaled once:
//   y[m, n] = sum_g s[n, g] sx[m, g] (sum_{k in g} q[n, k] xq[m, k] - z[n, g] isum[m, g]).
// Prepared buffer (floats): sx [M, NG], isum [M, NG], then from q8_levels_offset the levels
// [M, K] as bytes.
inline int64_t q8_levels_offset(const GemvArgs& a) { return (2 * a.M * a.ngroups + 15) & ~int64_t{15}; }

// The activation scales sx [M, NG] of rows [m0, m1): per row, per block of the row
// (act_block), or one for all (act_per_tensor: the top of all M rows).
void act_scales_i4q8(const GemvArgs& a, float* sx, int64_t m0, int64_t m1) {
  const int64_t M = a.M, K = a.K, G = a.group_size, NG = a.ngroups;
  const int64_t bk = (a.act_block > 0 && a.act_block < K) ? a.act_block : K;  // whole groups
  auto absmax = [&](const float* x, int64_t n) {
    V top = vzero();
    for (int64_t k = 0; k < n; k += W) top = vmax(top, vabs(vld_f32(x + k)));
    return vhmax(top);  // n is a multiple of 64
  };
  for (int64_t b = 0; b < K / bk; ++b) {  // the ranges quantize_act_levels takes (0 included)
    float tensor_top = 0.f;
    if (a.act_per_tensor)
      for (int64_t m = 0; m < M; ++m)
        tensor_top = std::max(tensor_top, absmax(a.x + m * a.ldx + b * bk, bk));
    for (int64_t m = m0; m < m1; ++m) {
      const float top = a.act_per_tensor ? tensor_top : absmax(a.x + m * a.ldx + b * bk, bk);
      for (int64_t g = b * bk / G; g < (b + 1) * bk / G; ++g)
        sx[m * NG + g] = std::max(top / 127.f, 1e-8f);
    }
  }
}

// Rows [m0, m1) of the prepared buffer (PrepRowsFn, common.h).
void prep_i4q8_rows(const GemvArgs& a, float* out, int64_t m0, int64_t m1) {
  const int64_t M = a.M, K = a.K, G = a.group_size, NG = a.ngroups;
  float* sx = out;
  float* isum = out + M * NG;
  int8_t* q = reinterpret_cast<int8_t*>(out + q8_levels_offset(a));
  act_scales_i4q8(a, sx, m0, m1);
  for (int64_t m = m0; m < m1; ++m) {
    const float* x = a.x + m * a.ldx;
    for (int64_t g = 0; g < NG; ++g) {
      const V scale = vset1(sx[m * NG + g]);
      int sum = 0;
      for (int64_t k = g * G; k < (g + 1) * G; k += 64) {
        int8_t* dst = q + m * K + k;
        sum += levels16(x + k, scale, dst) + levels16(x + k + 32, scale, dst + 16) +
               levels16(x + k + 16, scale, dst + 32) + levels16(x + k + 48, scale, dst + 48);
      }
      isum[m * NG + g] = static_cast<float>(sum);
    }
  }
}

void prep_i4q8(const GemvArgs& a, float* out) { prep_i4q8_rows(a, out, 0, a.M); }

// ROW: one activation scale per row (no act_block): it is applied once, at the end, so each
// group's scaling is one broadcast per weight row instead of one product per tile entry.
#ifndef LLMB_I4Q8_ATTR  // NEON: the dotprod target the tile's vi_dot_u8s8 needs
#define LLMB_I4Q8_ATTR
#endif
template <int R, int MT, bool ROW>
LLMB_I4Q8_ATTR inline void i4q8_tile(const GemvArgs& a, int64_t n0, int64_t m0) {
  constexpr int VB = static_cast<int>(sizeof(VI));  // activation bytes per vector
  const int64_t K = a.K, NG = a.ngroups, UG = a.group_size / 64, rowb = K / 2;
  const uint8_t* w = static_cast<const uint8_t*>(a.w) + n0 * rowb;
  const float* sx = a.xp + m0 * NG;
  const float* isum = a.xp + a.M * NG + m0 * NG;
  const int8_t* xq = reinterpret_cast<const int8_t*>(a.xp + q8_levels_offset(a)) + m0 * K;
  const float* sc = a.scales + n0 * NG;
  V tot[R][MT];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MT; ++m) tot[r][m] = vzero();
  for (int64_t g = 0; g < NG; ++g) {
    VI acc[R][MT];
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < MT; ++m) acc[r][m] = vi_zero();
    for (int64_t u = g * UG; u < (g + 1) * UG; ++u) {
      for (int r = 0; r < R; ++r) {
        if constexpr (MT == 1) prefetch_ahead<32>(w + r * rowb + u * 32);
        VI wv[NU];
        unit_weights(w + r * rowb + u * 32, wv);
        for (int m = 0; m < MT; ++m)
          for (int j = 0; j < NU; ++j)
            acc[r][m] = vi_dot_u8s8(acc[r][m], wv[j], vi_load(xq + m * K + u * 64 + j * VB));
      }
    }
    for (int r = 0; r < R; ++r) {
      if constexpr (ROW) {
        const V s = vset1(sc[r * NG + g]);
        for (int m = 0; m < MT; ++m) tot[r][m] = vfma(vi_to_ps(acc[r][m]), s, tot[r][m]);
      } else {
        for (int m = 0; m < MT; ++m)
          tot[r][m] = vfma(vi_to_ps(acc[r][m]), vset1(sc[r * NG + g] * sx[m * NG + g]), tot[r][m]);
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    const int64_t n = n0 + r;
    for (int m = 0; m < MT; ++m) {
      float s = vhsum(tot[r][m]), zero_term = 0.f;
      for (int64_t g = 0; g < NG; ++g)
        zero_term += sc[r * NG + g] * a.zeros[n * NG + g] * (ROW ? 1.f : sx[m * NG + g]) *
                     isum[m * NG + g];
      s -= zero_term;
      if constexpr (ROW) s *= sx[m * NG];
      if (a.bias) s += a.bias[n];
      a.y[(m0 + m) * a.ldy + n] = s;
    }
  }
}

struct I4Q8Kern {
  static constexpr int kMT = 4;
  template <int NR, int MT>
  static void block(const GemvArgs& a, int64_t n, int64_t m0) {
    // 2 x R x MT accumulators: batch 1 takes four rows (more loads in flight), tiles two on
    // AVX-512 (32 registers), one on AVX2 (16).
    constexpr int RMAX = (MT == 1) ? 4 : (W >= 16 ? 2 : 1);
    constexpr int R = NR < RMAX ? NR : RMAX;
    if (a.act_block <= 0 || a.act_block >= a.K) {
      for (int i = 0; i < NR; i += R) i4q8_tile<R, MT, true>(a, n + i, m0);
    } else {
      for (int i = 0; i < NR; i += R) i4q8_tile<R, MT, false>(a, n + i, m0);
    }
  }
};

#if defined(LLMB_I4Q8_OUTER)
// From LLMB_I4Q8_OUTER activation rows on, the u8 x s8 products run as outer products, as the
// fp32 prefill does: 4 weights of one row (u8, unpacked once per tile into an L1 buffer) are
// broadcast against a vector holding 4 int8 levels of each of 8 activation rows, so one
// vpmaddubsw serves 8 rows, with no horizontal sums; int16 sums of up to 8 such steps (8 x 2 x
// 15 x 127 < 32768) are widened once into fp32 per-group sums, scaled per group at its end:
//   y[m, n] = sum_g s[n, g] sx[m, g] (sum_{k in g} q[n, k] xq[m, k] - z[n, g] isum[m, g]).
// prep keeps prep_i4q8's room (sx [M, NG] at its start, the rest unused), then lays out per chunk
// of 8 rows: sx and isum transposed [NG][8], then the levels [K / 4][8 rows][4] (rows past M
// zero).
inline bool i4q8_outer(const GemvArgs& a) {
  return a.M >= LLMB_I4Q8_OUTER && a.group_size % 32 == 0;
}
inline int64_t i4q8_outer_offset(const GemvArgs& a) {
  return q8_levels_offset(a) + (a.M * a.K + 63) / 64 * 16;
}
inline int64_t i4q8_chunk_floats(const GemvArgs& a) { return 16 * a.ngroups + 2 * a.K; }

// The levels of chunks [c0, c1) in their place, 4 at a time (only this layout is read:
// rows_i4q8_outer); the scales of their rows are in sx already.
void i4q8_outer_levels(const GemvArgs& a, float* out, int64_t c0, int64_t c1) {
  const int64_t M = a.M, K = a.K, G = a.group_size, NG = a.ngroups;
  const float* sx = out;  // [M, NG], as prep_i4q8 lays it out
  for (int64_t c = c0; c < c1; ++c) {
    float* sxT = out + i4q8_outer_offset(a) + c * i4q8_chunk_floats(a);
    float* isT = sxT + 8 * NG;
    int8_t* xo = reinterpret_cast<int8_t*>(isT + 8 * NG);
    for (int j = 0; j < 8; ++j) {
      const int64_t m = c * 8 + j;
      if (m >= M) {  // padding rows: zero levels and scales
        for (int64_t g = 0; g < NG; ++g) sxT[g * 8 + j] = isT[g * 8 + j] = 0.f;
        for (int64_t k = 0; k < K; k += 4) std::memset(xo + k * 8 + j * 4, 0, 4);
        continue;
      }
      const float* x = a.x + m * a.ldx;
      for (int64_t g = 0; g < NG; ++g) {
        const V scale = vset1(sx[m * NG + g]);
        int sum = 0;
        for (int64_t k = g * G; k < (g + 1) * G; k += 16) {
          alignas(16) int8_t lv[16];
          sum += levels16(x + k, scale, lv);
          for (int i = 0; i < 16; i += 4) std::memcpy(xo + (k + i) * 8 + j * 4, lv + i, 4);
        }
        sxT[g * 8 + j] = sx[m * NG + g];
        isT[g * 8 + j] = static_cast<float>(sum);
      }
    }
  }
}

void prep_i4q8_outer_rows(const GemvArgs& a, float* out, int64_t m0, int64_t m1) {
  if (!i4q8_outer(a)) return prep_i4q8_rows(a, out, m0, m1);
  act_scales_i4q8(a, out, m0, m1);
  i4q8_outer_levels(a, out, m0 / 8, (m1 + 7) / 8);
}

void prep_i4q8_outer(const GemvArgs& a, float* out) { prep_i4q8_outer_rows(a, out, 0, a.M); }

// R weight rows (u8 levels at wb, K each) x the 8-row chunks [c0, c0 + CC).
// Registers (16 on AVX2): R x CC int16 step sums and R x CC int32 group sums; the fp32 totals
// live in `acc` (L1), updated once per group. The 8 steps of a sum are unrolled with each
// accumulator pinned (vi_keep), or the compiler reassociates the int16 adds into a tree and
// spills every product; as a loop with a variable bound it copied each accumulator every step.
template <int R, int CC>
inline void i4q8_outer_tile(const GemvArgs& a, int64_t n0, const uint8_t* wb, int64_t c0) {
  const int64_t K = a.K, NG = a.ngroups, QG = a.group_size / 4;
  const float* base = a.xp + i4q8_outer_offset(a) + c0 * i4q8_chunk_floats(a);
  const float* sxT[CC];
  const float* isT[CC];
  const int8_t* xo[CC];
  for (int c = 0; c < CC; ++c) {
    sxT[c] = base + c * i4q8_chunk_floats(a);
    isT[c] = sxT[c] + 8 * NG;
    xo[c] = reinterpret_cast<const int8_t*>(isT[c] + 8 * NG);
  }
  alignas(32) float acc[R][CC][8] = {};
  for (int64_t g = 0; g < NG; ++g) {
    VI gs[R][CC];
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < CC; ++c) gs[r][c] = vi_zero();
    for (int64_t q0 = g * QG; q0 < (g + 1) * QG; q0 += 8) {  // QG % 8 == 0 (i4q8_outer)
      VI part[R][CC];
      for (int r = 0; r < R; ++r)
        for (int c = 0; c < CC; ++c) part[r][c] = vi_zero();
      const uint8_t* wq = wb + q0 * 4;
#pragma GCC unroll 8
      for (int st = 0; st < 8; ++st) {
        VI xv[CC];
        for (int c = 0; c < CC; ++c) xv[c] = vi_load(xo[c] + (q0 + st) * 32);
        for (int r = 0; r < R; ++r) {
          const VI w = vi_bcast4(wq + r * K + st * 4);
          for (int c = 0; c < CC; ++c) {
            part[r][c] = vi_dot16_u8s8(part[r][c], w, xv[c]);
            vi_keep(part[r][c]);
          }
        }
      }
      for (int r = 0; r < R; ++r)
        for (int c = 0; c < CC; ++c) gs[r][c] = vi_add(gs[r][c], vi_widen16(part[r][c]));
    }
    for (int r = 0; r < R; ++r) {
      const V s = vset1(a.scales[(n0 + r) * NG + g]), z = vset1(a.zeros[(n0 + r) * NG + g]);
      for (int c = 0; c < CC; ++c) {
        const V f = vsub(vi_to_ps(gs[r][c]), vmul(z, vld_f32(isT[c] + g * 8)));
        vst_f32(acc[r][c], vfma(f, vmul(s, vld_f32(sxT[c] + g * 8)), vld_f32(acc[r][c])));
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < CC; ++c)
      for (int j = 0; j < 8; ++j) {
        const int64_t m = (c0 + c) * 8 + j;
        if (m < a.M) a.y[m * a.ldy + n0 + r] = acc[r][c][j] + (a.bias ? a.bias[n0 + r] : 0.f);
      }
}

template <int R>
inline void i4q8_outer_rows(const GemvArgs& a, int64_t n, uint8_t* wb) {
  const uint8_t* packed = static_cast<const uint8_t*>(a.w) + n * (a.K / 2);
  for (int r = 0; r < R; ++r) unpack_i4_row(packed + r * (a.K / 2), a.K, wb + r * a.K);
  const int64_t C = (a.M + 7) / 8;
  int64_t c = 0;
  for (; c + 2 <= C; c += 2) i4q8_outer_tile<R, 2>(a, n, wb, c);
  if (c < C) i4q8_outer_tile<R, 1>(a, n, wb, c);
}

void rows_i4q8_outer(const GemvArgs& a, int64_t n_begin, int64_t n_end) {
  if (!i4q8_outer(a)) return rows<I4Q8Kern>(a, n_begin, n_end);
  uint8_t* wb = static_cast<uint8_t*>(std::malloc(3 * a.K));
  if (wb == nullptr) throw std::bad_alloc();  // prep laid x out for the outer products only
  int64_t n = n_begin;
  for (; n + 3 <= n_end; n += 3) i4q8_outer_rows<3>(a, n, wb);
  for (; n < n_end; ++n) i4q8_outer_rows<1>(a, n, wb);
  std::free(wb);
}
#define LLMB_I4Q8_ROWS &rows_i4q8_outer
#define LLMB_I4Q8_PREP &prep_i4q8_outer
#define LLMB_I4Q8_PREP_ROWS &prep_i4q8_outer_rows
#else
#define LLMB_I4Q8_ROWS &rows<I4Q8Kern>
#define LLMB_I4Q8_PREP &prep_i4q8
#define LLMB_I4Q8_PREP_ROWS &prep_i4q8_rows
#endif

#ifndef LLMB_I4Q8_IN_TABLE  // 0: the unit puts them in a table of its own (neondot)
#define LLMB_I4Q8_IN_TABLE 1
#endif
#if LLMB_I4Q8_IN_TABLE
#define LLMB_I4Q8_FNS , LLMB_I4Q8_ROWS, LLMB_I4Q8_PREP, LLMB_I4Q8_PREP_ROWS
#else
#define LLMB_I4Q8_FNS
#endif
#else
#define LLMB_I4Q8_FNS
#endif

// The table of a unit that has both shims: these kernels for bf16, int8 and int4.
#if defined(LLMB_BF16_OUTER)
// bf16 weights on the fp32 outer products from their row threshold on (gemv_impl.h), on the
// pair tiles below it; x is laid out for whichever runs.
void rows_bf16_int(const GemvArgs& a, int64_t n_begin, int64_t n_end) {
  if (!rows_bf16_outer(a, n_begin, n_end)) rows<BF16PairKern>(a, n_begin, n_end);
}
void prep_bf16_int(const GemvArgs& a, float* out) {
  if (outer_m(a) > 0)
    prep_f32(a, out);
  else
    prep_bf16(a, out);
}
#define LLMB_INT_BF16_ROWS &rows_bf16_int
#define LLMB_INT_BF16_PREP &prep_bf16_int
#else
#define LLMB_INT_BF16_ROWS &rows<BF16PairKern>
#define LLMB_INT_BF16_PREP &prep_bf16
#endif

#define LLMB_INT_KERNEL_TABLE(NAME)                                                    \
  {                                                                                    \
    NAME, {LLMB_F32_ROWS, LLMB_INT_BF16_ROWS, &rows<I8Int16Kern>,                      \
           LLMB_I4_INT16 ? &rows_i4_int : &rows_i4},                                   \
    {LLMB_F32_PREP, LLMB_INT_BF16_PREP, &prep_i8, LLMB_I4_INT16 ? &prep_i4_int : nullptr} \
    LLMB_STEP_FNS LLMB_I4Q8_FNS                                                        \
  }
