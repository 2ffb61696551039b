// The native backend's decode step, whole, in one call, for any block that
// llmbench/backends/blocks.py describes (RMSNorm or LayerNorm, sequential or
// parallel residual, RoPE / ALiBi / learned positions, gated or plain MLP).
//
// Why: a decode step of a small model is ~30 layers x ~25 small torch ops; at
// several microseconds of Python and dispatcher time each, that overhead was a
// quarter of the 135M model's step. Here the layer loop, RMSNorm, RoPE, the KV
// cache write, attention over the cache (direct, or through the beam-history
// table) and the residuals run as plain loops, and the projections go straight
// to the weight-streaming kernels (linear_rows), so a step costs about what
// reading the weights costs.
//
// Layout and semantics match llmbench/backends/native.py's Python path (which
// stays the reference and the fallback):
//   qkv projection output = [q heads | k heads | v heads] x head_dim;
//   gate_up output = [gate | up] (gated MLP) or the plain MLP's hidden layer;
//   rotate-half RoPE over the first `rot` dims of each head (tables from
//   transformers' rotary embedding, one row per absolute position);
//   optional per-head RMSNorm of q and k (qwen3) before RoPE;
//   KV caches: prompt part [B, kv, P, d] shared by a sequence's beams and
//   generated part [rows, kv, N, d], fp32 or fp8 e5m2, last dim contiguous;
//   with a beam table, generated position j of row r is read from slot
//   table[r, j]; without one, from slot r.
// Multi-head latent attention (DeepSeek; set_latent): qkv's output is
//   [q, or q's bottleneck | rotary key | compressed kv]; the cache holds one
//   latent row per token, [rotated rotary key | normed kv], as a single key
//   head that is also the value (d = rope + kv_rank); each head's query is
//   [rotated q_rope | q_nope W_uk] and its output's latent part times W_uv
//   feeds o. Routing (set_routing): softmax or sigmoid scores, a choice-only
//   bias, group-limited choice, renormalized, scaled; shared experts added.
// Encoder-decoder (T5): a relative position bias by distance (bound per
// generate(), [heads, positions]) added to the self-attention scores, and
// after self-attention a cross-attention sublayer (its own norm, q and o
// projections) over the encoder's keys/values [B, heads, E, d], computed once
// per prompt; the final norm's output may be scaled before lm_head.
// Mamba layers (jamba; add_layer with qkv = o = -1, then set_mamba): in place
// of attention, in_proj -> [x | gate], x through the causal depthwise conv
// (the row's last width-1 inputs are its conv state) and SiLU, x_proj ->
// [dt | B | C] RMS-normed, dt_proj + softplus, the SSM state advanced once,
// y = C.state + D x times SiLU(gate), out_proj. States are bound per
// generate() as [rows, inner, width-1] and [rows, inner, state] tensors.
// Only the headers used (see ops.cpp).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <ATen/ops/_int_mm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/gelu.h>
#include <ATen/ops/matmul.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/relu.h>
#include <ATen/ops/scaled_dot_product_attention.h>
#include <ATen/ops/silu.h>
#include <ATen/ops/softmax.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Float8_e5m2.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <functional>
#include <optional>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "linear.h"
#include "rowops.h"

namespace llmb {
namespace {

// fp8 e5m2 -> fp32 for all 256 codes, so reading the cache is one table load.
const float* e5m2_table() {
  static const std::vector<float> table = [] {
    std::vector<float> t(256);
    for (int i = 0; i < 256; ++i)
      t[i] = static_cast<float>(c10::Float8_e5m2(static_cast<uint8_t>(i),
                                                 c10::Float8_e5m2::from_bits()));
    return t;
  }();
  return table.data();
}

struct CacheView {  // one cache tensor, as pointer + element strides
  const void* data = nullptr;
  int64_t s_row = 0, s_head = 0, s_pos = 0;
};

CacheView view_of(const at::Tensor& t, bool fp8, const char* what) {
  TORCH_CHECK(t.dim() == 4 && t.stride(3) == 1, "decode_step: ", what,
              " must be 4-D with a contiguous last dim");
  TORCH_CHECK(t.scalar_type() == (fp8 ? at::kFloat8_e5m2 : at::kFloat), "decode_step: ", what,
              " has dtype ", t.scalar_type());
  return CacheView{t.data_ptr(), t.stride(0), t.stride(1), t.stride(2)};
}

// A projection: its kernel arguments plus how to feed it. Packed int4 pads K up
// to a whole number of groups, and GPTQ's act-order permutes the input.
struct Projection {
  LinearDesc d;
  int64_t in_features = 0;      // width of the input it receives (<= d.K)
  const int64_t* perm = nullptr;  // x's channel for each of the first perm_len positions (-1:
  int64_t perm_len = 0;           // a zero), or nullptr (act-order; -1 in a TP slice)
  at::Tensor weight;              // the same weights as a tensor, for the GEMM path
};

struct Layer {
  const float* attn_norm;
  const float* attn_norm_bias;  // LayerNorm only, may be nullptr
  const float* mlp_norm;        // nullptr: parallel block whose MLP reads the attention's norm
  const float* mlp_norm_bias;
  const float* q_norm;  // nullptr unless per-head q/k norms (qwen3)
  const float* k_norm;
  int64_t qkv, o, gate_up, down;  // indexes into DecodePlan::linears_ (MLP: -1 if MoE)
  int64_t router = -1;            // MoE: the float router [experts, hidden]
  std::vector<int64_t> expert_gate_up, expert_down;
  int64_t top_k = 0;
  bool normalize = false;         // gates of the chosen experts divided by their sum
  const float* router_bias = nullptr;  // [experts], added to the scores to choose only
  int64_t shared_gate_up = -1, shared_down = -1;  // always-on shared experts (DeepSeek)
  // MLA (see the top): q's bottleneck projection (-1: none) and norms, W_uk, W_uv.
  int64_t q_b = -1;
  const float* q_a_norm = nullptr;
  const float* kv_a_norm = nullptr;
  const float* w_uk = nullptr;  // [heads, nope, kv_rank]
  const float* w_uv = nullptr;  // [heads, v_dim, kv_rank]
  // T5's / Whisper's cross-attention (-1: none)
  const float* cross_norm = nullptr;
  const float* cross_norm_bias = nullptr;
  // mllama: a gated cross-attention layer in place of self-attention (normed by attn_norm,
  // q per-head RMS-normed; h += gate_attn * attention, then h += gate_mlp * mlp on text rows
  // that see an image tile)
  bool gated = false;
  const float* cross_q_norm = nullptr;
  float gate_attn = 0.f, gate_mlp = 0.f;
  int64_t cross_q = -1, cross_o = -1;
  // A Mamba mixer in place of attention (m_in < 0: none); see the top of the file.
  int64_t m_in = -1, m_x = -1, m_dt = -1, m_out = -1;
  const float* conv_w = nullptr;  // [inner, width]
  const float* conv_b = nullptr;  // [inner] or nullptr
  const float* a = nullptr;       // -exp(A_log) [inner, state]
  const float* d = nullptr;       // [inner]
  const float *dt_norm = nullptr, *b_norm = nullptr, *c_norm = nullptr;
  int64_t inner = 0, width = 0, state = 0, dt_rank = 0;
  int64_t mamba_slot = -1;  // which bound state pair is this layer's
};

struct Latent {  // blocks.Latent; enabled when kv_rank > 0
  int64_t q_rank = 0, kv_rank = 0, nope = 0, rope = 0, v_dim = 0;
  float eps = 0.f;
};

struct Routing {  // blocks.Experts beyond the top-k choice itself
  bool sigmoid = false;
  int64_t groups = 1, top_groups = 1;
  bool group_top2 = false;  // a group's score: its best two experts summed (else its best)
  float scale = 1.f;
};

class DecodePlan {
 public:
  DecodePlan(int64_t hidden, int64_t heads, int64_t kv_heads, int64_t head_dim,
             int64_t intermediate, double eps, double scaling, at::Tensor embed,
             const std::optional<at::Tensor>& final_norm, bool round_logits_bf16, double embed_scale,
             int64_t activation, bool layer_norm, const std::optional<at::Tensor>& final_norm_bias,
             bool parallel, bool gated, const std::optional<at::Tensor>& alibi_slopes,
             const std::optional<at::Tensor>& pos_embed, int64_t pos_offset,
             const std::optional<at::Tensor>& embed_norm,
             const std::optional<at::Tensor>& embed_norm_bias, bool post_norm,
             std::vector<int64_t> kv_map)
      : hidden_(hidden), heads_(heads), kv_heads_(kv_heads), d_(head_dim),
        inter_(intermediate), eps_(static_cast<float>(eps)),
        scaling_(static_cast<float>(scaling)), round_bf16_(round_logits_bf16),
        embed_scale_(static_cast<float>(embed_scale)), activation_(activation),
        layer_norm_(layer_norm), parallel_(parallel), gated_(gated), post_norm_(post_norm),
        pos_offset_(pos_offset) {
    TORCH_CHECK(!(post_norm && parallel), "decode_step: a post-norm block is sequential");
    TORCH_CHECK(activation >= kSiLU && activation <= kReLU,
                "decode_step: unknown activation ", activation);
    // kv_map: the KV head each query head reads, where a tensor-parallel rank's heads are not
    // whole groups of kv_heads (SmolLM2's 9 over 2 ranks: 5 + 4); else heads / kv_heads each.
    if (kv_map.empty()) {
      TORCH_CHECK(heads % kv_heads == 0, "decode_step: heads must be a multiple of kv_heads");
      for (int64_t h = 0; h < heads; ++h) kv_map.push_back(h / (heads / kv_heads));
    }
    TORCH_CHECK(static_cast<int64_t>(kv_map.size()) == heads, "decode_step: kv_map has ",
                kv_map.size(), " entries for ", heads, " heads");
    for (const int64_t g : kv_map)
      TORCH_CHECK(g >= 0 && g < kv_heads, "decode_step: kv_map entry ", g, " outside ",
                  kv_heads, " KV heads");
    kv_of_ = std::move(kv_map);
    heads_of_.resize(kv_heads);
    for (int64_t h = 0; h < heads; ++h) heads_of_[kv_of_[h]].push_back(h);
    grouped_ = heads % kv_heads == 0;
    for (int64_t h = 0; h < heads && grouped_; ++h) grouped_ = kv_of_[h] == h / (heads / kv_heads);
    TORCH_CHECK(embed.dim() == 2 && embed.size(1) == hidden && embed.is_contiguous() &&
                    (embed.scalar_type() == at::kFloat || embed.scalar_type() == at::kBFloat16),
                "decode_step: embedding must be a contiguous fp32/bf16 [V, hidden] tensor");
    embed_ = keep(embed);
    final_norm_ = opt_vec(final_norm, hidden, "final_norm");  // none: post-norm blocks
    final_norm_bias_ = opt_vec(final_norm_bias, hidden, "final_norm_bias");
    alibi_ = opt_vec(alibi_slopes, heads, "alibi_slopes");
    embed_norm_ = opt_vec(embed_norm, hidden, "embed_norm");
    embed_norm_bias_ = opt_vec(embed_norm_bias, hidden, "embed_norm_bias");
    if (pos_embed.has_value()) {
      TORCH_CHECK(pos_embed->dim() == 2 && pos_embed->size(1) == hidden &&
                      pos_embed->is_contiguous() && pos_embed->scalar_type() == at::kFloat,
                  "decode_step: pos_embed must be contiguous fp32 [positions, hidden]");
      pos_embed_ = keep(*pos_embed);
    }
  }

  int64_t add_linear(int64_t fmt, const at::Tensor& w, const std::optional<at::Tensor>& scales,
                     const std::optional<at::Tensor>& zeros, int64_t group_size,
                     const std::optional<at::Tensor>& bias, int64_t in_features,
                     const std::optional<at::Tensor>& perm, double act_qmax,
                     const std::optional<at::Tensor>& act_scale, bool act_levels,
                     bool act_per_tensor, bool act_sym, int64_t act_block) {
    TORCH_CHECK(fmt >= 0 && fmt < kNumFmt, "decode_step: unknown weight format ", fmt);
    TORCH_CHECK(w.dim() == 2 && w.is_contiguous(), "decode_step: weights must be contiguous 2-D");
    static const at::ScalarType kDtype[kNumFmt] = {at::kFloat, at::kBFloat16, at::kChar,
                                                   at::kByte};
    TORCH_CHECK(w.scalar_type() == kDtype[fmt], "decode_step: format ", fmt, " got weights of ",
                w.scalar_type());
    LinearDesc d;
    d.fmt = static_cast<Fmt>(fmt);
    d.w = keep(w).data_ptr();
    d.N = w.size(0);
    d.K = fmt == kI4 ? 2 * w.size(1) : w.size(1);
    if (fmt == kI8) {
      TORCH_CHECK(scales.has_value(), "decode_step: int8 weights need scales");
      d.scales = vec(*scales, d.N, "scales");
      if (zeros.has_value()) d.zeros = vec(*zeros, d.N, "zeros");
      d.act_qmax = static_cast<float>(act_qmax);  // 127: int8 activations (--lowp-mode INT8)
      if (act_scale.has_value()) {
        TORCH_CHECK(act_qmax > 0.0, "decode_step: act_scale needs act_qmax > 0");
        d.act_scale = vec(*act_scale, 1, "act_scale");
      }
    }
    if (fmt == kI4) {
      TORCH_CHECK(scales.has_value() && zeros.has_value() && group_size > 0 &&
                      d.K % group_size == 0,
                  "decode_step: int4 weights need scales, zeros and a group size dividing K");
      d.group_size = group_size;
      d.scales = vec(*scales, d.N * (d.K / group_size), "scales");
      d.zeros = vec(*zeros, d.N * (d.K / group_size), "zeros");
    }
    if (bias.has_value()) d.bias = vec(*bias, d.N, "bias");
    TORCH_CHECK(!(act_levels && act_qmax > 0.0), "decode_step: act_levels and act_qmax exclude "
                "each other");
    d.act.enabled = act_levels;
    d.act.per_tensor = act_per_tensor;
    d.act.sym = act_sym;
    d.act.block = act_block;
    Projection p;
    p.d = d;
    p.weight = w;
    p.in_features = in_features > 0 ? in_features : d.K;
    TORCH_CHECK(p.in_features <= d.K, "decode_step: in_features larger than the weights' K");
    if (perm.has_value()) {
      TORCH_CHECK(perm->scalar_type() == at::kLong && perm->numel() >= p.in_features &&
                      perm->numel() <= d.K && perm->is_contiguous(),
                  "decode_step: perm must be contiguous int64 [in_features..K]");
      const int64_t* idx = keep(*perm).data_ptr<int64_t>();
      for (int64_t i = 0; i < perm->numel(); ++i)
        TORCH_CHECK(idx[i] >= -1 && idx[i] < p.in_features, "decode_step: perm out of range");
      p.perm = idx;
      p.perm_len = perm->numel();
    }
    linears_.push_back(p);
    return static_cast<int64_t>(linears_.size()) - 1;
  }

  void add_layer(const at::Tensor& attn_norm, const std::optional<at::Tensor>& mlp_norm,
                 const std::optional<at::Tensor>& q_norm, const std::optional<at::Tensor>& k_norm,
                 int64_t qkv, int64_t o, int64_t gate_up, int64_t down,
                 const std::optional<at::Tensor>& attn_norm_bias,
                 const std::optional<at::Tensor>& mlp_norm_bias, int64_t router,
                 const std::vector<int64_t>& expert_gate_up,
                 const std::vector<int64_t>& expert_down, int64_t top_k, bool normalize,
                 const std::optional<at::Tensor>& router_bias, int64_t shared_gate_up,
                 int64_t shared_down, int64_t q_b, const std::optional<at::Tensor>& q_a_norm,
                 const std::optional<at::Tensor>& kv_a_norm, const std::optional<at::Tensor>& w_uk,
                 const std::optional<at::Tensor>& w_uv,
                 const std::optional<at::Tensor>& cross_norm, int64_t cross_q,
                 int64_t cross_o, const std::optional<at::Tensor>& cross_norm_bias,
                 const std::optional<at::Tensor>& cross_q_norm, bool gated, double gate_attn,
                 double gate_mlp) {
    TORCH_CHECK(mlp_norm.has_value() || parallel_,
                "decode_step: only a parallel block may share the attention's norm");
    const int64_t nq = heads_ * d_, nkv = kv_heads_ * d_;
    auto fits = [&](int64_t i, int64_t n, int64_t k) {
      return linears_.at(i).d.N == n && linears_.at(i).in_features == k;
    };
    auto fits_mlp = [&](int64_t up, int64_t dn) {
      const int64_t width = linears_.at(dn).in_features;
      return fits(up, (gated_ ? 2 : 1) * width, hidden_) && fits(dn, hidden_, width);
    };
    const bool moe = router >= 0;
    bool mlp_ok = moe ? (fits(router, static_cast<int64_t>(expert_gate_up.size()), hidden_) &&
                         expert_gate_up.size() == expert_down.size() && top_k > 0 &&
                         top_k <= static_cast<int64_t>(expert_gate_up.size()))
                      : fits_mlp(gate_up, down);
    for (size_t e = 0; moe && e < expert_gate_up.size(); ++e)
      mlp_ok = mlp_ok && fits_mlp(expert_gate_up[e], expert_down[e]);
    if (shared_gate_up >= 0) mlp_ok = mlp_ok && moe && fits_mlp(shared_gate_up, shared_down);
    bool attn_ok;
    if (qkv < 0 && o < 0) {
      attn_ok = true;  // a Mamba layer: set_mamba comes next
    } else if (lat_.kv_rank) {
      const int64_t q_width = lat_.q_rank ? lat_.q_rank : heads_ * (lat_.nope + lat_.rope);
      attn_ok = fits(qkv, q_width + d_, hidden_) && fits(o, hidden_, heads_ * lat_.v_dim) &&
                (lat_.q_rank ? q_b >= 0 && fits(q_b, heads_ * (lat_.nope + lat_.rope),
                                                  lat_.q_rank)
                             : q_b < 0) &&
                w_uk.has_value() && w_uv.has_value() && kv_a_norm.has_value();
    } else {
      attn_ok = fits(qkv, nq + 2 * nkv, hidden_) && fits(o, hidden_, nq) && q_b < 0;
    }
    if (cross_q >= 0)  // (cross-attention batches a KV head's query heads: whole groups)
      attn_ok = attn_ok && grouped_ && !parallel_ && (cross_norm.has_value() || gated) &&
                fits(cross_q, nq, hidden_) && fits(cross_o, hidden_, nq);
    if (gated) attn_ok = attn_ok && cross_q >= 0 && qkv < 0 && o < 0;
    TORCH_CHECK(attn_ok && mlp_ok,
                "decode_step: projection shapes do not match the model's dimensions");
    Layer L{vec(attn_norm, hidden_, "attn_norm"),
            opt_vec(attn_norm_bias, hidden_, "attn_norm_bias"),
            opt_vec(mlp_norm, hidden_, "mlp_norm"),
            opt_vec(mlp_norm_bias, hidden_, "mlp_norm_bias"),
            opt_vec(q_norm, d_, "q_norm"), opt_vec(k_norm, d_, "k_norm"), qkv, o,
            gate_up, down, router, expert_gate_up, expert_down, top_k,
            normalize};
    L.router_bias = opt_vec(router_bias, static_cast<int64_t>(expert_gate_up.size()),
                            "router_bias");
    L.shared_gate_up = shared_gate_up;
    L.shared_down = shared_down;
    if (cross_q >= 0) {
      L.cross_norm = opt_vec(cross_norm, hidden_, "cross_norm");
      L.cross_norm_bias = opt_vec(cross_norm_bias, hidden_, "cross_norm_bias");
      L.cross_q_norm = opt_vec(cross_q_norm, d_, "cross_q_norm");
      L.gated = gated;
      L.gate_attn = static_cast<float>(gate_attn);
      L.gate_mlp = static_cast<float>(gate_mlp);
      L.cross_q = cross_q;
      L.cross_o = cross_o;
    }
    if (lat_.kv_rank) {
      L.q_b = q_b;
      L.q_a_norm = opt_vec(q_a_norm, lat_.q_rank, "q_a_norm");
      L.kv_a_norm = vec(*kv_a_norm, lat_.kv_rank, "kv_a_norm");
      L.w_uk = vec(*w_uk, heads_ * lat_.nope * lat_.kv_rank, "w_uk");
      L.w_uv = vec(*w_uv, heads_ * lat_.v_dim * lat_.kv_rank, "w_uv");
    }
    layers_.push_back(L);
  }

  // Before add_layer: the layers are DeepSeek's multi-head latent attention.
  void set_latent(int64_t q_rank, int64_t kv_rank, int64_t nope, int64_t rope, int64_t v_dim,
                  double eps) {
    TORCH_CHECK(layers_.empty() && kv_rank > 0 && kv_heads_ == 1 && d_ == rope + kv_rank,
                "decode_step: latent attention needs one kv head of rope + kv_rank dims, set "
                "before any layer");
    lat_ = Latent{q_rank, kv_rank, nope, rope, v_dim, static_cast<float>(eps)};
  }

  void set_logit_scale(double scale) { logit_scale_ = static_cast<float>(scale); }

  // Batched decode: a step of more rows than f32_rows (fp32 weights) or bf16_rows (bf16
  // weights) multiplies those projections with torch's GEMM, as the Python step's linears do
  // above kernels.STREAM_M_MAX (many rows make the step compute-bound, where oneDNN's packed
  // GEMM beats the weight-streaming tiles); bf16_gemm: bf16 weights multiply activations
  // rounded to bf16 (CPUs with bf16 matrix math) instead of fp32 on widened weights.
  // i8_rows: int8 weights with dynamic int8 activations (--lowp-mode INT8) go to torch's
  // int8 GEMM (int8_act.gemm_rows). Other quantized projections stay on the kernels at any
  // row count. -1: never.
  void set_gemm_rows(int64_t f32_rows, int64_t bf16_rows, bool bf16_gemm, int64_t i8_rows) {
    gemm_rows_[kF32] = f32_rows;
    gemm_rows_[kBF16] = bf16_rows;
    gemm_rows_[kI8] = i8_rows;
    bf16_gemm_ = bf16_gemm;
  }

  // Tensor parallel (llmbench.backends.tensor_parallel): this plan holds one rank's slice, and
  // the partial sums of the attention output and the MLP are all-reduced inside the step.
  // `op`: a registered in-place operator (e.g. "deepspeed::inference_all_reduce_", the shared-
  // memory all-reduce) called through the dispatcher, no Python; otherwise `fn(tensor)`, a
  // Python callable (e.g. torch.distributed.all_reduce over gloo). Both empty: one rank.
  void set_all_reduce(const std::string& op, pybind11::object fn) {
    reduce_op_.reset();
    if (!op.empty())
      reduce_op_ = c10::Dispatcher::singleton().findSchemaOrThrow(op.c_str(), "");
    reduce_fn_ = std::move(fn);
    reduce_seconds_ = 0.0;
    reduce_calls_ = 0;
  }

  // (seconds spent in all-reduce, calls) since the last call; resets both.
  std::pair<double, int64_t> take_all_reduce_time() {
    auto out = std::make_pair(reduce_seconds_, reduce_calls_);
    reduce_seconds_ = 0.0;
    reduce_calls_ = 0;
    return out;
  }

  // The last layer added (with qkv = o = -1) mixes with Mamba.
  void set_mamba(int64_t in_proj, int64_t x_proj, int64_t dt_proj, int64_t out_proj,
                 const at::Tensor& conv_weight, const std::optional<at::Tensor>& conv_bias,
                 const at::Tensor& a, const at::Tensor& d, const at::Tensor& dt_norm,
                 const at::Tensor& b_norm, const at::Tensor& c_norm) {
    TORCH_CHECK(!layers_.empty() && layers_.back().qkv < 0 && layers_.back().m_in < 0,
                "decode_step: set_mamba follows add_layer(qkv=-1, o=-1)");
    TORCH_CHECK(conv_weight.dim() == 2 && a.dim() == 2 && a.size(0) == conv_weight.size(0),
                "decode_step: Mamba conv weight [inner, width] and A [inner, state] expected");
    Layer& L = layers_.back();
    L.inner = conv_weight.size(0);
    L.width = conv_weight.size(1);
    L.state = a.size(1);
    L.dt_rank = dt_norm.numel();
    auto fits = [&](int64_t i, int64_t n, int64_t k) {
      return linears_.at(i).d.N == n && linears_.at(i).in_features == k;
    };
    TORCH_CHECK(L.width >= 2 && fits(in_proj, 2 * L.inner, hidden_) &&
                    fits(x_proj, L.dt_rank + 2 * L.state, L.inner) &&
                    fits(dt_proj, L.inner, L.dt_rank) && fits(out_proj, hidden_, L.inner),
                "decode_step: Mamba projection shapes do not match");
    L.m_in = in_proj;
    L.m_x = x_proj;
    L.m_dt = dt_proj;
    L.m_out = out_proj;
    L.conv_w = vec(conv_weight.contiguous(), L.inner * L.width, "conv_weight");
    L.conv_b = opt_vec(conv_bias, L.inner, "conv_bias");
    L.a = vec(a.contiguous(), L.inner * L.state, "a");
    L.d = vec(d, L.inner, "d");
    L.dt_norm = vec(dt_norm, L.dt_rank, "dt_norm");
    L.b_norm = vec(b_norm, L.state, "b_norm");
    L.c_norm = vec(c_norm, L.state, "c_norm");
    L.mamba_slot = mamba_layers_++;
  }

  void set_routing(bool sigmoid, int64_t groups, int64_t top_groups, bool group_top2,
                   double scale) {
    TORCH_CHECK(groups >= 1 && top_groups >= 1 && top_groups <= groups,
                "decode_step: bad expert groups");
    routing_ = Routing{sigmoid, groups, top_groups, group_top2, static_cast<float>(scale)};
  }

  void set_lm_head(int64_t index) {
    TORCH_CHECK(linears_.at(index).in_features == hidden_, "decode_step: lm_head shape mismatch");
    lm_head_ = index;
  }

  // Per generate() call: the caches, RoPE tables and beam table the steps use.
  void bind(const std::vector<at::Tensor>& prompt_k, const std::vector<at::Tensor>& prompt_v,
            const std::vector<at::Tensor>& gen_k, const std::vector<at::Tensor>& gen_v,
            const at::Tensor& cos, const at::Tensor& sin, const std::optional<at::Tensor>& table,
            int64_t beams, const std::vector<at::Tensor>& cross_k,
            const std::vector<at::Tensor>& cross_v,
            const std::optional<at::Tensor>& relative_bias,
            const std::optional<at::Tensor>& cross_bias,
            const std::optional<at::Tensor>& cross_rows,
            const std::vector<at::Tensor>& mamba_conv, const std::vector<at::Tensor>& mamba_ssm,
            int64_t pos_shift) {
    pos_shift_ = pos_shift;
    const size_t n = layers_.size();
    TORCH_CHECK(prompt_k.size() == n && prompt_v.size() == n && gen_k.size() == n &&
                    gen_v.size() == n,
                "decode_step: one cache per layer expected");
    bound_.clear();
    fp8_ = gen_k[0].scalar_type() == at::kFloat8_e5m2;
    pk_.clear(); pv_.clear(); gk_.clear(); gv_.clear();
    int64_t first = -1;  // the first attention layer's caches give the sizes
    for (size_t i = 0; i < n; ++i) {
      if (layers_[i].m_in >= 0) {  // a Mamba layer has no KV cache (its entry is a placeholder)
        pk_.emplace_back(); pv_.emplace_back(); gk_.emplace_back(); gv_.emplace_back();
        continue;
      }
      if (first < 0) first = static_cast<int64_t>(i);
      pk_.push_back(view_of(bind_keep(prompt_k[i]), fp8_, "prompt keys"));
      pv_.push_back(view_of(bind_keep(prompt_v[i]), fp8_, "prompt values"));
      gk_.push_back(view_of(bind_keep(gen_k[i]), fp8_, "generated keys"));
      gv_.push_back(view_of(bind_keep(gen_v[i]), fp8_, "generated values"));
      TORCH_CHECK(prompt_k[i].size(1) == kv_heads_ && prompt_k[i].size(3) == d_,
                  "decode_step: cache shape does not match the model");
    }
    TORCH_CHECK(first >= 0, "decode_step: no attention layer");
    prompt_len_ = prompt_k[first].size(2);
    gen_capacity_ = gen_k[first].size(2);
    gen_rows_ = gen_k[first].size(0);
    prompt_rows_ = prompt_k[first].size(0);
    mconv_.clear(); mssm_.clear();
    TORCH_CHECK(static_cast<int64_t>(mamba_conv.size()) == mamba_layers_ &&
                    mamba_ssm.size() == mamba_conv.size(),
                "decode_step: one Mamba state pair per Mamba layer expected");
    for (const Layer& L : layers_) {
      if (L.m_in < 0) continue;
      const at::Tensor& c = bind_keep(mamba_conv[L.mamba_slot]);
      const at::Tensor& st = bind_keep(mamba_ssm[L.mamba_slot]);
      TORCH_CHECK(c.is_contiguous() && st.is_contiguous() && c.scalar_type() == at::kFloat &&
                      st.scalar_type() == at::kFloat &&
                      c.numel() == gen_rows_ * L.inner * (L.width - 1) &&
                      st.numel() == gen_rows_ * L.inner * L.state,
                  "decode_step: Mamba states must be contiguous fp32 [rows, inner, width-1] "
                  "and [rows, inner, state]");
      mconv_.push_back(c.data_ptr<float>());
      mssm_.push_back(st.data_ptr<float>());
    }
    TORCH_CHECK(cos.dim() == 2 && cos.sizes() == sin.sizes() && cos.is_contiguous() &&
                    sin.is_contiguous() && cos.scalar_type() == at::kFloat &&
                    sin.scalar_type() == at::kFloat && cos.size(1) <= d_ && cos.size(1) % 2 == 0,
                "decode_step: RoPE tables must be contiguous fp32 [positions, rot <= head_dim]");
    cos_ = bind_keep(cos).data_ptr<float>();
    sin_ = bind_keep(sin).data_ptr<float>();
    rot_ = cos.size(1);
    positions_ = cos.size(0);
    table_ = nullptr;
    if (table.has_value()) {
      TORCH_CHECK(table->scalar_type() == at::kLong && table->dim() == 2 &&
                      table->stride(1) == 1 && table->size(0) == gen_rows_,
                  "decode_step: beam table must be int64 [rows, new_tokens]");
      table_ = bind_keep(*table).data_ptr<int64_t>();
      table_stride_ = table->stride(0);
    }
    beams_ = beams;
    ck_.clear(); cv_.clear();
    TORCH_CHECK(cross_k.size() == cross_v.size() && (cross_k.empty() || cross_k.size() == n),
                "decode_step: one cross-attention cache per layer expected");
    ck_.resize(n);
    cv_.resize(n);
    int64_t cross_len = -1;
    for (size_t i = 0; i < cross_k.size(); ++i) {
      if (cross_k[i].numel() == 0) continue;  // no cross-attention (or no image) here
      const at::Tensor& k = bind_keep(cross_k[i]);
      const at::Tensor& v = bind_keep(cross_v[i]);
      TORCH_CHECK(k.dim() == 4 && k.is_contiguous() && v.is_contiguous() &&
                      k.sizes() == v.sizes() && k.scalar_type() == at::kFloat &&
                      v.scalar_type() == at::kFloat && k.size(0) == prompt_rows_ &&
                      k.size(1) > 0 && heads_ % k.size(1) == 0 && k.size(3) == d_,
                  "decode_step: cross keys/values must be contiguous fp32 [B, kv heads, E, d]");
      ck_[i] = k;
      cv_[i] = v;
      cross_len = k.size(2);
    }
    for (size_t i = 0; i < layers_.size(); ++i)
      TORCH_CHECK(layers_[i].cross_q < 0 || layers_[i].gated || ck_[i].defined(),
                  "decode_step: cross-attention layers need the encoder's keys and values");
    cross_bias_ = at::Tensor();
    cross_rows_ = at::Tensor();
    if (cross_bias.has_value()) {
      TORCH_CHECK(cross_bias->dim() == 2 && cross_bias->size(0) == prompt_rows_ &&
                      cross_bias->size(1) == cross_len && cross_bias->is_contiguous() &&
                      cross_bias->scalar_type() == at::kFloat,
                  "decode_step: cross bias must be contiguous fp32 [B, E]");
      cross_bias_ = bind_keep(*cross_bias);
    }
    if (cross_rows.has_value()) {
      TORCH_CHECK(cross_rows->dim() == 1 && cross_rows->size(0) == prompt_rows_ &&
                      cross_rows->is_contiguous() && cross_rows->scalar_type() == at::kFloat,
                  "decode_step: cross rows must be contiguous fp32 [B]");
      cross_rows_ = bind_keep(*cross_rows);
    }
    rel_ = nullptr;
    if (relative_bias.has_value()) {
      TORCH_CHECK(relative_bias->dim() == 2 && relative_bias->size(0) == heads_ &&
                      relative_bias->size(1) >= positions_ && relative_bias->is_contiguous() &&
                      relative_bias->scalar_type() == at::kFloat,
                  "decode_step: relative bias must be contiguous fp32 [heads, positions]");
      rel_ = bind_keep(*relative_bias).data_ptr<float>();
      rel_stride_ = relative_bias->size(1);
    }
  }

  // ids int64 [rows] at absolute position `position` (= prompt length + step):
  // returns logits fp32 [rows, vocab] and writes the step's keys and values.
  at::Tensor step(const at::Tensor& ids, int64_t position, int64_t step) {
    TORCH_CHECK(lm_head_ >= 0 && !pk_.empty(), "decode_step: plan not complete or not bound");
    TORCH_CHECK(ids.dim() == 1 && ids.scalar_type() == at::kLong, "decode_step: ids int64 [rows]");
    const int64_t R = ids.size(0);
    TORCH_CHECK(R == gen_rows_ && R == prompt_rows_ * beams_, "decode_step: ", R,
                " rows for caches of ", gen_rows_);
    TORCH_CHECK(step >= 0 && step < gen_capacity_ && position == prompt_len_ + step &&
                    position < positions_,
                "decode_step: position out of range");
    const at::Tensor ids_c = ids.contiguous();
    const int64_t* id = ids_c.data_ptr<int64_t>();
    size_rows(R);
    for (int64_t r = 0; r < R; ++r) embed_row(id[r], position, h_.data() + r * hidden_);
    run_layers(R, position, step, 0);
    return logits(R);
  }

  // Whether prefill() runs this model's prompts: attention layers with RoPE or none, no
  // position bias (ALiBi, T5's relative), no latent (MLA), Mamba, cross-attention or gated
  // layers, no post-norm blocks. The rest prefill through the Python step.
  bool prefill_supported() const {
    if (lat_.kv_rank || alibi_ || rel_ || post_norm_) return false;
    for (const Layer& L : layers_)
      if (L.m_in >= 0 || L.cross_q >= 0 || L.gated) return false;
    return true;
  }

  // The prompt, ids int64 [B, P] (B = the bound caches' sequences, P their prompt length), as
  // P rows per sequence through the same layers as step() (the Python prefill's ops: the same
  // kernels, norms and RoPE, and torch's causal scaled_dot_product_attention with `scale`);
  // writes the prompt keys and values and returns the logits of each sequence's last position
  // [B, vocab].
  at::Tensor prefill(const at::Tensor& ids, double scale) {
    TORCH_CHECK(lm_head_ >= 0 && !pk_.empty(), "decode_step: plan not complete or not bound");
    TORCH_CHECK(prefill_supported(), "decode_step: this model prefills through the Python step");
    TORCH_CHECK(ids.dim() == 2 && ids.scalar_type() == at::kLong, "decode_step: ids int64 [B, P]");
    const int64_t B = ids.size(0), P = ids.size(1), R = B * P, H = hidden_;
    TORCH_CHECK(B == prompt_rows_ && P == prompt_len_ && P > 0 && P <= positions_,
                "decode_step: a prompt of ", B, " x ", P, " for caches of ", prompt_rows_, " x ",
                prompt_len_);
    const at::Tensor ids_c = ids.contiguous();
    const int64_t* id = ids_c.data_ptr<int64_t>();
    size_rows(R);
    for (int64_t r = 0; r < R; ++r) embed_row(id[r], r % P, h_.data() + r * H);
    prompt_scale_ = scale;
    run_layers(R, 0, 0, P);
    for (int64_t b = 0; b < B; ++b)  // each sequence's last row, in place (b <= b * P + P - 1)
      std::copy_n(h_.data() + (b * P + P - 1) * H, H, h_.data() + b * H);
    return logits(B);
  }

 private:
  void size_rows(int64_t R) {
    const int64_t H = hidden_, nq = heads_ * d_, nkv = kv_heads_ * d_, nqkv = nq + 2 * nkv;
    h_.assign(R * H, 0.f);
    x_.resize(R * H);
    tmp_.resize(R * H);
    qkv_.resize(R * nqkv);
    attn_.resize(R * nq);
    gu_.resize(R * 2 * inter_);
    act_.resize(R * inter_);
    mlp_out_.resize(R * H);
    mlp_x_.resize(R * H);
  }

  // Token `id` at `position` into dst [hidden] (the embedding norm comes in run_layers).
  void embed_row(int64_t id, int64_t position, float* dst) {
    const int64_t H = hidden_, V = embed_.size(0);
    TORCH_CHECK(id >= 0 && id < V, "decode_step: token id out of range");
    if (embed_.scalar_type() == at::kFloat) {
      std::copy_n(embed_.data_ptr<float>() + id * H, H, dst);
      if (embed_scale_ != 1.f)
        for (int64_t i = 0; i < H; ++i) dst[i] *= embed_scale_;
    } else {  // scaled in bf16 (rounded), as stock multiplies in the weights' dtype
      const uint16_t* src = reinterpret_cast<const uint16_t*>(embed_.data_ptr()) + id * H;
      for (int64_t i = 0; i < H; ++i) dst[i] = c10::detail::f32_from_bits(src[i]);
      if (embed_scale_ != 1.f)
        for (int64_t i = 0; i < H; ++i)
          dst[i] = c10::detail::f32_from_bits(
              c10::detail::round_to_nearest_even(dst[i] * embed_scale_));
    }
    if (pos_embed_.defined()) {  // learned absolute positions (OPT, GPTBigCode)
      const int64_t row = position + pos_offset_ + pos_shift_;
      TORCH_CHECK(row >= 0 && row < pos_embed_.size(0), "decode_step: position ", position,
                  " past the model's learned positions");
      const float* pos = pos_embed_.data_ptr<float>() + row * H;
      for (int64_t i = 0; i < H; ++i) dst[i] += pos[i];
    }
  }

  // The layer stack over the R rows of h_. prompt == 0: one decode step, every row at
  // `position`, keys and values into the generated part at `step`. prompt == P: R / P
  // sequences of P prompt rows (row r at position r % P), keys and values into the prompt
  // part, causal attention among them.
  void run_layers(int64_t R, int64_t position, int64_t step, int64_t prompt) {
    const int64_t H = hidden_, nq = heads_ * d_, nkv = kv_heads_ * d_, nqkv = nq + 2 * nkv;
    if (embed_norm_) layer_norm_rows(h_.data(), embed_norm_, embed_norm_bias_, h_.data(), R, H,
                                     eps_);
    for (size_t li = 0; li < layers_.size(); ++li) {
      const Layer& L = layers_[li];
      if (post_norm_)
        std::copy_n(h_.data(), R * H, x_.data());
      else
        norm_rows(h_.data(), L.attn_norm, L.attn_norm_bias, x_.data(), R, H);
      if (L.gated) {  // transformers skips these layers when there is no image
        if (ck_[li].defined()) gated_cross_layer(L, li, R);
        continue;
      }
      if (L.m_in >= 0) {
        mamba_mixer(L, R);
      } else if (lat_.kv_rank) {
        latent_attention(L, li, R, position, step, nqkv);
      } else {
        project(L.qkv, x_.data(), R, qkv_.data(), nqkv);
        for (int64_t r = 0; r < R; ++r) {
          float* row = qkv_.data() + r * nqkv;
          for (int64_t hh = 0; hh < heads_ + kv_heads_; ++hh) {
            float* head = row + hh * d_;
            if (L.q_norm) rms_norm_rows(head, hh < heads_ ? L.q_norm : L.k_norm, head, 1, d_);
            if (rot_) rope(head, prompt ? r % prompt : position);
          }
          if (prompt)
            store_kv(pk_[li], pv_[li], r / prompt, r % prompt, row + nq, row + nq + nkv);
          else
            store_kv(gk_[li], gv_[li], r, step, row + nq, row + nq + nkv);
        }
        if (prompt)
          prompt_attention(R / prompt, prompt, nqkv);
        else
          attention(li, R, step, nqkv);
        project(L.o, attn_.data(), R, tmp_.data(), H);
      }
      if (parallel_) {  // the MLP reads the block's input too: h += attn + mlp
        const float* mlp_in = x_.data();
        if (L.mlp_norm) {
          norm_rows(h_.data(), L.mlp_norm, L.mlp_norm_bias, mlp_x_.data(), R, H);
          mlp_in = mlp_x_.data();
        }
        mlp(L, mlp_in, R, mlp_out_.data());
        if (tensor_parallel()) {  // one all-reduce of both partial sums
          for (int64_t i = 0; i < R * H; ++i) tmp_[i] += mlp_out_[i];
          all_reduce(tmp_.data(), R * H);
          for (int64_t i = 0; i < R * H; ++i) h_[i] += tmp_[i];
        } else {
          for (int64_t i = 0; i < R * H; ++i) h_[i] += tmp_[i] + mlp_out_[i];
        }
      } else {
        // A Mamba mixer runs whole on every rank (tensor_parallel.py): its output is whole
        if (L.m_in < 0) all_reduce(tmp_.data(), R * H);
        for (int64_t i = 0; i < R * H; ++i) h_[i] += tmp_[i];
        if (post_norm_) norm_rows(h_.data(), L.attn_norm, L.attn_norm_bias, h_.data(), R, H);
        if (L.cross_q >= 0) cross_attention(L, li, R);
        if (post_norm_)
          std::copy_n(h_.data(), R * H, x_.data());
        else
          norm_rows(h_.data(), L.mlp_norm, L.mlp_norm_bias, x_.data(), R, H);
        mlp(L, x_.data(), R, mlp_out_.data());
        all_reduce(mlp_out_.data(), R * H);
        for (int64_t i = 0; i < R * H; ++i) h_[i] += mlp_out_[i];
        if (post_norm_) norm_rows(h_.data(), L.mlp_norm, L.mlp_norm_bias, h_.data(), R, H);
      }
    }

  }

  // Final norm, logit scale and lm_head over the first R rows of h_: logits [R, vocab].
  at::Tensor logits(int64_t R) {
    const int64_t H = hidden_;
    if (final_norm_)
      norm_rows(h_.data(), final_norm_, final_norm_bias_, x_.data(), R, H);
    else
      std::copy_n(h_.data(), R * H, x_.data());
    if (logit_scale_ != 1.f)
      for (int64_t i = 0; i < R * H; ++i) x_[i] *= logit_scale_;
    const LinearDesc& head = linears_[lm_head_].d;
    at::Tensor out_t = at::empty({R, head.N}, at::kFloat);
    float* out = out_t.data_ptr<float>();
    project(lm_head_, x_.data(), R, out, head.N);
    if (round_bf16_) {  // as stock's bf16 logits are (see native.py _logits)
      for (int64_t i = 0; i < R * head.N; ++i)
        out[i] = c10::detail::f32_from_bits(c10::detail::round_to_nearest_even(out[i]));
    }
    return out_t;
  }

  // Causal attention of B sequences of P rows (qkv_ [B * P, nqkv]) into attn_ [B * P, nq]:
  // torch's scaled_dot_product_attention on the same views as the Python prefill's
  // (native.NativeModel._prompt_attention), the KV heads indexed to one per query head where
  // the query heads are not whole groups (tensor parallel's kv_map).
  void prompt_attention(int64_t B, int64_t P, int64_t nqkv) {
    const int64_t nq = heads_ * d_, nkv = kv_heads_ * d_;
    const at::Tensor all = at::from_blob(qkv_.data(), {B, P, nqkv}, at::kFloat);
    const at::Tensor q = all.narrow(2, 0, nq).view({B, P, heads_, d_}).transpose(1, 2);
    at::Tensor k = all.narrow(2, nq, nkv).view({B, P, kv_heads_, d_}).transpose(1, 2);
    at::Tensor v = all.narrow(2, nq + nkv, nkv).view({B, P, kv_heads_, d_}).transpose(1, 2);
    if (!grouped_) {
      const at::Tensor index = at::from_blob(kv_of_.data(), {heads_}, at::kLong);
      k = k.index_select(1, index);
      v = v.index_select(1, index);
    }
    const at::Tensor out = at::scaled_dot_product_attention(q, k, v, std::nullopt, 0.0, true,
                                                            prompt_scale_, true);
    at::from_blob(attn_.data(), {B, P, heads_, d_}, at::kFloat).copy_(out.transpose(1, 2));
  }

  bool tensor_parallel() const { return reduce_op_.has_value() || !reduce_fn_.is_none(); }

  void all_reduce(float* data, int64_t n) {
    if (!tensor_parallel()) return;
    const auto start = std::chrono::steady_clock::now();
    at::Tensor t = at::from_blob(data, {n}, at::kFloat);
    if (reduce_op_.has_value()) {
      torch::jit::Stack stack{c10::IValue(t)};
      // DeepSpeed's shared-memory all-reduce spins, without a timeout, until every rank has
      // arrived: without the GIL here, llmbench's peer watchdog thread can still run and end
      // this rank when a peer has died.
      pybind11::gil_scoped_release no_gil;
      reduce_op_->callBoxed(&stack);
    } else {
      reduce_fn_(t);
    }
    reduce_seconds_ +=
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    ++reduce_calls_;
  }

  const at::Tensor& keep(const at::Tensor& t) {
    owned_.push_back(t);
    return owned_.back();
  }
  const at::Tensor& bind_keep(const at::Tensor& t) {
    bound_.push_back(t);
    return bound_.back();
  }
  const float* vec(const at::Tensor& t, int64_t n, const char* what) {
    TORCH_CHECK(t.scalar_type() == at::kFloat && t.numel() == n && t.is_contiguous(),
                "decode_step: ", what, " must be contiguous fp32 with ", n, " elements");
    return keep(t).data_ptr<float>();
  }

  const float* opt_vec(const std::optional<at::Tensor>& t, int64_t n, const char* what) {
    return t.has_value() ? vec(*t, n, what) : nullptr;
  }

  void norm_rows(const float* in, const float* weight, const float* bias, float* out,
                 int64_t rows, int64_t n) const {
    if (layer_norm_)
      layer_norm_rows(in, weight, bias, out, rows, n, eps_);
    else
      llmb::rms_norm_rows(in, weight, out, rows, n, eps_);
  }

  void mlp(const Layer& L, const float* x, int64_t R, float* out) {
    if (L.router >= 0)
      experts(L, x, R, out);
    else
      dense_mlp(L.gate_up, L.down, x, R, out);
  }

  // out [rows, hidden] = down(act(gate) * up) or down(act(up)); x rows are dense.
  void dense_mlp(int64_t gate_up, int64_t down, const float* x, int64_t R, float* out) {
    const int64_t inter = linears_[down].in_features;
    const int64_t width = (gated_ ? 2 : 1) * inter;
    gu_.resize(R * width);
    act_.resize(R * inter);
    project(gate_up, x, R, gu_.data(), width);
    if (R > kLoopActRows) {  // a prompt: torch's vectorized, threaded ops, as the Python prefill
      const at::Tensor gu = at::from_blob(gu_.data(), {R, width}, at::kFloat);
      const at::Tensor gate = gu.narrow(1, 0, inter);
      at::Tensor act = at::from_blob(act_.data(), {R, inter}, at::kFloat);
      switch (activation_) {
        case kSiLU: at::silu_out(act, gate); break;
        case kGeluTanh: at::gelu_out(act, gate, "tanh"); break;
        case kGelu: at::gelu_out(act, gate); break;
        default: act.copy_(at::relu(gate));
      }
      if (gated_) act.mul_(gu.narrow(1, inter, inter));
      project(down, act_.data(), R, out, hidden_);
      return;
    }
    const KernelTable& kern = active_kernels();
    for (int64_t r = 0; r < R; ++r) {
      const float* gate = gu_.data() + r * width;
      const float* up = gated_ ? gate + inter : nullptr;
      float* o = act_.data() + r * inter;
      if (kern.act(static_cast<int>(activation_), gate, up, o, inter)) continue;
      for (int64_t i = 0; i < inter; ++i) {
        const float g = gate[i];
        float a;
        switch (activation_) {
          case kSiLU: a = g / (1.f + std::exp(-g)); break;
          case kGeluTanh: {
            constexpr float kC = 0.7978845608028654f;  // sqrt(2 / pi)
            a = 0.5f * g * (1.f + std::tanh(kC * (g + 0.044715f * g * g * g)));
            break;
          }
          case kGelu: a = 0.5f * g * (1.f + std::erf(g * 0.7071067811865476f)); break;
          default: a = g > 0.f ? g : 0.f;
        }
        o[i] = up ? a * up[i] : a;
      }
    }
    project(down, act_.data(), R, out, hidden_);
  }

  // A sparse MLP: each row through the top_k experts of its softmax gates, only their weights
  // read, summed by gate weight in ascending expert order (as transformers adds them).
  void experts(const Layer& L, const float* x, int64_t R, float* out) {
    const int64_t E = static_cast<int64_t>(L.expert_gate_up.size()), H = hidden_;
    gates_.resize(R * E);
    project(L.router, x, R, gates_.data(), E);
    std::fill_n(out, R * H, 0.f);
    expert_out_.resize(H);
    std::vector<int64_t> order(E);
    std::vector<float> choice(E);
    const Routing& rt = routing_;
    const int64_t per_group = E / rt.groups;
    std::vector<float> group_score(rt.groups);
    std::vector<int64_t> group_order(rt.groups);
    auto greater = [](const float* v) {  // descending, ties to the lower index
      return [v](int64_t a, int64_t b) { return v[a] > v[b] || (v[a] == v[b] && a < b); };
    };
    for (int64_t r = 0; r < R; ++r) {
      float* g = gates_.data() + r * E;
      if (rt.sigmoid) {
        for (int64_t e = 0; e < E; ++e) g[e] = 1.f / (1.f + std::exp(-g[e]));
      } else {
        const float top = *std::max_element(g, g + E);
        float sum = 0.f;
        for (int64_t e = 0; e < E; ++e) sum += (g[e] = std::exp(g[e] - top));
        for (int64_t e = 0; e < E; ++e) g[e] /= sum;
      }
      for (int64_t e = 0; e < E; ++e) choice[e] = g[e] + (L.router_bias ? L.router_bias[e] : 0.f);
      if (rt.groups > 1) {  // only the best top_groups groups' experts compete
        for (int64_t grp = 0; grp < rt.groups; ++grp) {
          float* c = choice.data() + grp * per_group;
          std::vector<float> sorted(c, c + per_group);
          std::sort(sorted.begin(), sorted.end(), std::greater<float>());
          group_score[grp] = rt.group_top2 && per_group > 1 ? sorted[0] + sorted[1] : sorted[0];
          group_order[grp] = grp;
        }
        std::partial_sort(group_order.begin(), group_order.begin() + rt.top_groups,
                          group_order.end(), greater(group_score.data()));
        for (int64_t grp = 0; grp < rt.groups; ++grp) {
          const bool kept = std::find(group_order.begin(), group_order.begin() + rt.top_groups,
                                      grp) != group_order.begin() + rt.top_groups;
          for (int64_t e = grp * per_group; !kept && e < (grp + 1) * per_group; ++e) {
            choice[e] = -INFINITY;
            if (!rt.sigmoid) g[e] = 0.f;  // DeepSeek-V2 zeroes the other groups' scores
          }
        }
      }
      for (int64_t e = 0; e < E; ++e) order[e] = e;
      std::partial_sort(order.begin(), order.begin() + L.top_k, order.end(),
                        greater(choice.data()));
      std::sort(order.begin(), order.begin() + L.top_k);
      float chosen = 0.f;
      for (int64_t k = 0; k < L.top_k; ++k) chosen += g[order[k]];
      for (int64_t k = 0; k < L.top_k; ++k) {
        const int64_t e = order[k];
        const float w = (L.normalize ? g[e] / (chosen + 1e-20f) : g[e]) * rt.scale;
        dense_mlp(L.expert_gate_up[e], L.expert_down[e], x + r * H, 1, expert_out_.data());
        for (int64_t i = 0; i < H; ++i) out[r * H + i] += expert_out_[i] * w;
      }
    }
    if (L.shared_gate_up >= 0) {  // shared experts: every row, added after the routed ones
      shared_out_.resize(R * H);
      dense_mlp(L.shared_gate_up, L.shared_down, x, R, shared_out_.data());
      for (int64_t i = 0; i < R * H; ++i) out[i] += shared_out_[i];
    }
  }

  // MLA for R rows at `position`: fills the cache's latent rows, attends, and leaves o's output
  // in tmp_ (see the top of the file).
  void latent_attention(const Layer& L, size_t li, int64_t R, int64_t position, int64_t step,
                        int64_t nqkv) {
    const Latent& a = lat_;
    const int64_t qd = a.nope + a.rope;  // one head's q before absorption
    const int64_t q_width = a.q_rank ? a.q_rank : heads_ * qd;
    const int64_t width = q_width + d_;
    lat_buf_.resize(R * width);
    project(L.qkv, x_.data(), R, lat_buf_.data(), width);
    qh_.resize(R * heads_ * qd);
    if (a.q_rank) {
      qa_.resize(R * a.q_rank);
      for (int64_t r = 0; r < R; ++r)
        llmb::rms_norm_rows(lat_buf_.data() + r * width, L.q_a_norm, qa_.data() + r * a.q_rank,
                            1, a.q_rank, a.eps);
      project(L.q_b, qa_.data(), R, qh_.data(), heads_ * qd);
    } else {
      for (int64_t r = 0; r < R; ++r)
        std::copy_n(lat_buf_.data() + r * width, q_width, qh_.data() + r * q_width);
    }
    for (int64_t r = 0; r < R; ++r) {
      float* kv = lat_buf_.data() + r * width + q_width;  // [rotary key | latent]
      llmb::rms_norm_rows(kv + a.rope, L.kv_a_norm, kv + a.rope, 1, a.kv_rank, a.eps);
      if (rot_) rope(kv, position);
      store_kv(gk_[li], gv_[li], r, step, kv, kv);
    }
    // q per head: [rotated q_rope | q_nope W_uk], written where attend reads q.
    at::parallel_for(0, R * heads_, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t r = i / heads_, hh = i % heads_;
        const float* src = qh_.data() + r * heads_ * qd + hh * qd;  // [rope | nope]
        float* q = qkv_.data() + r * nqkv + hh * d_;
        std::copy_n(src, a.rope, q);
        if (rot_) rope(q, position);
        float* q_lat = q + a.rope;
        std::fill_n(q_lat, a.kv_rank, 0.f);
        const float* w = L.w_uk + hh * a.nope * a.kv_rank;
        for (int64_t n = 0; n < a.nope; ++n) {
          const float qn = src[a.rope + n];
          const float* wrow = w + n * a.kv_rank;
          for (int64_t c = 0; c < a.kv_rank; ++c) q_lat[c] += qn * wrow[c];
        }
      }
    });
    attention(li, R, step, nqkv);
    // Each head's latent output (past its rotary part) -> its value space, o's input.
    up_.resize(R * heads_ * a.v_dim);
    at::parallel_for(0, R * heads_, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t r = i / heads_, hh = i % heads_;
        const float* lat = attn_.data() + r * heads_ * d_ + hh * d_ + a.rope;
        const float* w = L.w_uv + hh * a.v_dim * a.kv_rank;
        float* out = up_.data() + r * heads_ * a.v_dim + hh * a.v_dim;
        for (int64_t v = 0; v < a.v_dim; ++v) {
          float dot = 0.f;
          for (int64_t c = 0; c < a.kv_rank; ++c) dot += lat[c] * w[v * a.kv_rank + c];
          out[v] = dot;
        }
      }
    });
    project(L.o, up_.data(), R, tmp_.data(), hidden_);
  }

  // One token per row through a Mamba mixer: x_ (normed) -> tmp_ (out_proj's output),
  // advancing the rows' conv windows and SSM states in place.
  void mamba_mixer(const Layer& L, int64_t R) {
    const int64_t I = L.inner, W = L.width, N = L.state, rank = L.dt_rank;
    m_proj_.resize(R * 2 * I);
    project(L.m_in, x_.data(), R, m_proj_.data(), 2 * I);
    m_xc_.resize(R * I);
    float* conv_state = mconv_[L.mamba_slot];
    for (int64_t r = 0; r < R; ++r) {
      const float* xs = m_proj_.data() + r * 2 * I;
      for (int64_t i = 0; i < I; ++i) {
        float* window = conv_state + (r * I + i) * (W - 1);  // the last W-1 inputs
        const float* w = L.conv_w + i * W;
        float acc = L.conv_b ? L.conv_b[i] : 0.f;
        for (int64_t j = 0; j < W - 1; ++j) acc += window[j] * w[j];
        acc += xs[i] * w[W - 1];
        for (int64_t j = 0; j + 1 < W - 1; ++j) window[j] = window[j + 1];
        window[W - 2] = xs[i];
        m_xc_[r * I + i] = acc / (1.f + std::exp(-acc));  // SiLU
      }
    }
    const int64_t tw = rank + 2 * N;
    m_t_.resize(R * tw);
    project(L.m_x, m_xc_.data(), R, m_t_.data(), tw);
    m_dtn_.resize(R * rank);
    for (int64_t r = 0; r < R; ++r) {
      float* t = m_t_.data() + r * tw;
      llmb::rms_norm_rows(t, L.dt_norm, m_dtn_.data() + r * rank, 1, rank, eps_);
      llmb::rms_norm_rows(t + rank, L.b_norm, t + rank, 1, N, eps_);
      llmb::rms_norm_rows(t + rank + N, L.c_norm, t + rank + N, 1, N, eps_);
    }
    m_dt_.resize(R * I);
    project(L.m_dt, m_dtn_.data(), R, m_dt_.data(), I);
    m_y_.resize(R * I);
    float* ssm = mssm_[L.mamba_slot];
    at::parallel_for(0, R * I, 64, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) {
        const int64_t r = k / I, i = k % I;
        const float* B = m_t_.data() + r * tw + rank;
        const float* C = B + N;
        const float raw = m_dt_[k];
        const float dt = raw > 20.f ? raw : std::log1p(std::exp(raw));  // torch's softplus
        const float x = m_xc_[k];
        float* st = ssm + k * N;
        const float* a = L.a + i * N;
        float y = 0.f;
        for (int64_t n = 0; n < N; ++n) {
          st[n] = std::exp(dt * a[n]) * st[n] + dt * B[n] * x;
          y += st[n] * C[n];
        }
        const float g = m_proj_[r * 2 * I + I + i];
        m_y_[k] = (y + x * L.d[i]) * (g / (1.f + std::exp(-g)));
      }
    });
    project(L.m_out, m_y_.data(), R, tmp_.data(), hidden_);
  }

  // T5, Whisper: h += o(attention of norm(h)'s q over the encoder's keys/values).
  void cross_attention(const Layer& L, size_t li, int64_t R) {
    const int64_t H = hidden_;
    norm_rows(h_.data(), L.cross_norm, L.cross_norm_bias, x_.data(), R, H);
    cross_core(L, li, R, x_.data());
    all_reduce(tmp_.data(), R * H);
    for (int64_t i = 0; i < R * H; ++i) h_[i] += tmp_[i];
  }

  // mllama: h += gate_attn * cross attention of x_ (= attn_norm(h)); then
  // h += gate_mlp * mlp(mlp_norm(h)), zero on a sequence whose last text row sees no tile.
  void gated_cross_layer(const Layer& L, size_t li, int64_t R) {
    const int64_t H = hidden_;
    cross_core(L, li, R, x_.data());
    all_reduce(tmp_.data(), R * H);
    for (int64_t i = 0; i < R * H; ++i) h_[i] += L.gate_attn * tmp_[i];
    norm_rows(h_.data(), L.mlp_norm, L.mlp_norm_bias, x_.data(), R, H);
    mlp(L, x_.data(), R, mlp_out_.data());
    all_reduce(mlp_out_.data(), R * H);
    const float* keep = cross_rows_.defined() ? cross_rows_.data_ptr<float>() : nullptr;
    for (int64_t r = 0; r < R; ++r) {
      const float k = keep ? keep[r / beams_] : 1.f;
      for (int64_t i = 0; i < H; ++i) h_[r * H + i] += L.gate_mlp * (mlp_out_[r * H + i] * k);
    }
  }

  // tmp_ = o(attention of q(x) over layer li's cross keys/values [B, kv, E, d]); row
  // r = b * beams + j reads sequence b's. Per sequence, the queries of its beams and of the
  // heads sharing a kv head [kv, beams * group, d] meet the keys in two batched matmuls on
  // torch's GEMM: with Whisper's 1500 audio frames these are most of a step's attention
  // work, too much for scalar loops.
  void cross_core(const Layer& L, size_t li, int64_t R, const float* x) {
    const int64_t H = hidden_, nq = heads_ * d_, B = R / beams_;
    const at::Tensor& keys = ck_[li];
    const int64_t kv = keys.size(1), group = heads_ / kv, E = keys.size(2);
    cq_.resize(R * nq);
    project(L.cross_q, x, R, cq_.data(), nq);
    if (L.cross_q_norm)
      for (int64_t i = 0; i < R * heads_; ++i)
        llmb::rms_norm_rows(cq_.data() + i * d_, L.cross_q_norm, cq_.data() + i * d_, 1, d_,
                            eps_);
    const at::Tensor q = at::from_blob(cq_.data(), {B, beams_, kv, group, d_}, at::kFloat)
                             .permute({0, 2, 1, 3, 4})
                             .reshape({B, kv, beams_ * group, d_});
    at::Tensor scores = at::matmul(q, keys.transpose(-1, -2));  // [B, kv, beams * group, E]
    scores.mul_(scaling_);
    if (cross_bias_.defined()) scores.add_(cross_bias_.view({B, 1, 1, E}));
    const at::Tensor out =
        at::matmul(at::softmax(scores, -1), cv_[li]).view({B, kv, beams_, group, d_});
    if (static_cast<int64_t>(attn_.size()) < R * nq) attn_.resize(R * nq);
    at::from_blob(attn_.data(), {B, beams_, kv, group, d_}, at::kFloat)
        .copy_(out.permute({0, 2, 1, 3, 4}));
    project(L.cross_o, attn_.data(), R, tmp_.data(), H);
  }

  // y[r, :] = projection(x[r, :in_features]); x rows are dense.
  void project(int64_t index, const float* x, int64_t rows, float* y, int64_t ldy) {
    const Projection& p = linears_[index];
    const int64_t K = p.d.K, n = p.in_features;
    const bool dynamic_i8 = p.d.fmt == kI8 && p.d.act_qmax > 0.f && p.d.act_scale == nullptr;
    // (dynamic int8 activations stay in linear_rows where AMX takes them: kernels_amx.cpp)
    // bf16 on AMX-BF16 tiles from 2 rows (as native.Linear.bf16_gemm decides)
    const int64_t limit =
        (p.d.fmt == kBF16 && bf16_gemm_ && amx_bf16_takes(2, K)) ? 1 : gemm_rows_[p.d.fmt];
    const bool gemm = (p.d.fmt == kF32 || p.d.fmt == kBF16 || dynamic_i8) && !p.d.act.enabled &&
                      gemm_rows_[p.d.fmt] >= 0 && rows > limit &&
                      !(dynamic_i8 && amx_ok(p.d, rows));
    if (p.perm == nullptr && K == n) {
      if (gemm)
        gemm_rows(p, x, rows, y, ldy);
      else
        linear_rows(p.d, x, rows, n, y, ldy);
      return;
    }
    staged_.assign(rows * K, 0.f);  // zero padding past in_features
    for (int64_t r = 0; r < rows; ++r) {
      const float* src = x + r * n;
      float* dst = staged_.data() + r * K;
      if (p.perm)
        for (int64_t i = 0; i < p.perm_len; ++i)
          if (p.perm[i] >= 0) dst[i] = src[p.perm[i]];  // staged_ is zeroed
      else
        std::copy_n(src, n, dst);
    }
    if (gemm)
      gemm_rows(p, staged_.data(), rows, y, ldy);
    else
      linear_rows(p.d, staged_.data(), rows, K, y, ldy);
  }

  // y[r, :N] = x[r, :K] @ W.T (+ bias) through torch's GEMM (set_gemm_rows).
  void gemm_rows(const Projection& p, const float* x, int64_t rows, float* y, int64_t ldy) {
    if (p.d.fmt == kI8) {
      int8_gemm_rows(p, x, rows, y, ldy);
      return;
    }
    const int64_t K = p.d.K, N = p.d.N;
    if (p.d.fmt == kBF16 && bf16_gemm_ && amx_bf16_takes(rows, K)) {
      // the same bf16 GEMM on AMX tiles without torch's per-call weight reorder; the fp32
      // bias after the bf16 rounding, as below
      linear_bf16_amx(static_cast<const uint16_t*>(p.d.w), N, K, x, rows, K, nullptr, y, ldy);
      if (p.d.bias)
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t j = 0; j < N; ++j) y[r * ldy + j] += p.d.bias[j];
      return;
    }
    const at::Tensor xt = at::from_blob(const_cast<float*>(x), {rows, K}, at::kFloat);
    at::Tensor out;
    if (p.d.fmt == kF32)
      out = at::mm(xt, p.weight.t());
    else if (bf16_gemm_)
      out = at::mm(xt.to(at::kBFloat16), p.weight.t()).to(at::kFloat);
    else
      out = at::mm(xt, p.weight.t().to(at::kFloat));
    const float* src = out.data_ptr<float>();
    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        float* dst = y + r * ldy;
        if (p.d.bias)
          for (int64_t j = 0; j < N; ++j) dst[j] = src[r * N + j] + p.d.bias[j];
        else
          std::copy_n(src + r * N, N, dst);
      }
    });
  }

  // Int8 weights, dynamic per-row int8 activations, as int8_act._gemm_path computes them:
  // scale = max(absmax / 127, 1e-8), q = round-half-even(x / scale), int32 sums by
  // torch._int_mm, y = acc * (scale * wscale) (+ bias) (- sum(x) * wscale * zero).
  void int8_gemm_rows(const Projection& p, const float* x, int64_t rows, float* y,
                      int64_t ldy) {
    const int64_t K = p.d.K, N = p.d.N;
    at::Tensor xq = at::empty({rows, K}, at::kChar);
    int8_t* q = xq.data_ptr<int8_t>();
    std::vector<float> sx(rows), xsum(rows);
    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const float* row = x + r * K;
        float top = 0.f, sum = 0.f;
        for (int64_t k = 0; k < K; ++k) {
          top = std::max(top, std::fabs(row[k]));
          sum += row[k];
        }
        const float scale = std::max(top / 127.f, 1e-8f);
        for (int64_t k = 0; k < K; ++k)
          q[r * K + k] = static_cast<int8_t>(
              std::min(127.f, std::max(-127.f, std::nearbyint(row[k] / scale))));
        sx[r] = scale;
        xsum[r] = sum;
      }
    });
    const at::Tensor acc = at::_int_mm(xq, p.weight.t());
    const int32_t* a = acc.data_ptr<int32_t>();
    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        float* dst = y + r * ldy;
        for (int64_t n = 0; n < N; ++n) {
          float v = static_cast<float>(a[r * N + n]) * (sx[r] * p.d.scales[n]);
          if (p.d.bias) v += p.d.bias[n];
          if (p.d.zeros) v -= xsum[r] * p.d.scales[n] * p.d.zeros[n];
          dst[n] = v;
        }
      }
    });
  }

  void rms_norm_rows(const float* in, const float* weight, float* out, int64_t rows,
                     int64_t n) const {
    llmb::rms_norm_rows(in, weight, out, rows, n, eps_);
  }

  void rope(float* x, int64_t position) const {
    rope_head(x, cos_ + position * rot_, sin_ + position * rot_, rot_);
  }

  // One row's keys and values (every KV head) at `row` and `pos` of a layer's caches: the
  // generated part (decode: row r, pos the step) or the prompt part (prefill: the sequence, its
  // position).
  void store_kv(const CacheView& kc, const CacheView& vc, int64_t row, int64_t pos,
                const float* k, const float* v) const {
    for (int64_t g = 0; g < kv_heads_; ++g) {
      store_head(kc, row * kc.s_row + g * kc.s_head + pos * kc.s_pos, k + g * d_);
      store_head(vc, row * vc.s_row + g * vc.s_head + pos * vc.s_pos, v + g * d_);
    }
  }

  // One head's d values at element offset ofs of a cache (fp8 e5m2 or fp32).
  void store_head(const CacheView& cache, int64_t ofs, const float* src) const {
    if (fp8_) {
      uint8_t* dst = static_cast<uint8_t*>(const_cast<void*>(cache.data)) + ofs;
      for (int64_t i = 0; i < d_; ++i) dst[i] = c10::detail::fp8e5m2_from_fp32_value(src[i]);
    } else {
      std::copy_n(src, d_, static_cast<float*>(const_cast<void*>(cache.data)) + ofs);
    }
  }

  template <class T>
  static float load(const T* p, int64_t i, const float* lut) {
    if constexpr (std::is_same_v<T, float>) {
      (void)lut;
      return p[i];
    } else {
      return lut[p[i]];
    }
  }

  // Where position t of row r's sequence sits in one layer's keys (or values): the
  // prompt part, shared by the beams of sequence r / beams_, or the generated part, through
  // the beam table when there is one.
  template <class T>
  const T* entry(const CacheView& prompt, const CacheView& gen, int64_t r, int64_t g,
                 int64_t t) const {
    if (t < prompt_len_)
      return static_cast<const T*>(prompt.data) + (r / beams_) * prompt.s_row +
             g * prompt.s_head + t * prompt.s_pos;
    const int64_t j = t - prompt_len_;
    const int64_t slot = table_ ? table_[r * table_stride_ + j] : r;
    return static_cast<const T*>(gen.data) + slot * gen.s_row + g * gen.s_head + j * gen.s_pos;
  }

  // softmax(q k^T * scaling) v over the prompt and the generated positions.
  template <class T>
  void attend(size_t li, int64_t r, int64_t hh, int64_t step, int64_t nqkv, float* scores) {
    const int64_t g = kv_of_[hh];
    const float* q = qkv_.data() + r * nqkv + hh * d_;
    const int64_t total = prompt_len_ + step + 1;
    float* out = attn_.data() + r * heads_ * d_ + hh * d_;
    std::fill_n(out, d_, 0.f);
    if constexpr (std::is_same_v<T, float>) {  // fp32 caches: the ISA path's kernels
      const float sum = attend_part(li, r, hh, 0, total, total, q, scores, out).second;
      for (int64_t i = 0; i < d_; ++i) out[i] /= sum;
      return;
    }
    const float* lut = fp8_ ? e5m2_table() : nullptr;
    for (int64_t t = 0; t < total; ++t) {
      const T* key = entry<T>(pk_[li], gk_[li], r, g, t);
      float dot = 0.f;
      for (int64_t i = 0; i < d_; ++i) dot += q[i] * load(key, i, lut);
      scores[t] = dot * scaling_;
    }
    const float sum = softmax_part(hh, 0, total, total, scores).second;
    for (int64_t t = 0; t < total; ++t) {
      const T* val = entry<T>(pv_[li], gv_[li], r, g, t);
      const float p = scores[t] / sum;
      for (int64_t i = 0; i < d_; ++i) out[i] += p * load(val, i, lut);
    }
  }

  // Query head hh of row r against positions [t0, t1) of its KV head's fp32 cache (rows of
  // `total` positions), on the ISA path's kernels over runs of positions contiguous in memory:
  // adds the softmax's unnormalized output into out [d] and returns {max score, sum of exps}.
  // scores: room for t1 - t0.
  std::pair<float, float> attend_part(size_t li, int64_t r, int64_t hh, int64_t t0, int64_t t1,
                                      int64_t total, const float* q, float* scores,
                                      float* out) const {
    const AttnFns& kern = active_kernels().attn;
    const int64_t g = kv_of_[hh];
    for_runs(li, r, g, t0, t1, [&](const float* keys, const float*, int64_t ld, int64_t t,
                                   int64_t n) {
      kern.scores(q, keys, ld, n, d_, scaling_, scores + (t - t0));
    });
    const std::pair<float, float> top_sum = softmax_part(hh, t0, t1 - t0, total, scores);
    for_runs(li, r, g, t0, t1, [&](const float*, const float* values, int64_t ld, int64_t t,
                                   int64_t n) {
      kern.mix(scores + (t - t0), values, ld, n, d_, out);
    });
    return top_sum;
  }

  // scores of positions [t0, t0 + n) of a row of `total`: adds the position bias (ALiBi or
  // relative) of head hh, then exponentiates them in place less their maximum; returns
  // {maximum, sum of the exponentials}.
  std::pair<float, float> softmax_part(int64_t hh, int64_t t0, int64_t n, int64_t total,
                                       float* scores) const {
    if (alibi_)
      for (int64_t t = 0; t < n; ++t) scores[t] += alibi_[hh] * static_cast<float>(t0 + t);
    else if (rel_)  // by distance
      for (int64_t t = 0; t < n; ++t) scores[t] += rel_[hh * rel_stride_ + (total - 1 - t0 - t)];
    float top = -INFINITY;
    for (int64_t t = 0; t < n; ++t) top = std::max(top, scores[t]);
    return {top, active_kernels().attn.exp_sum(scores, n, top)};
  }

  // Calls fn(keys, values, ld, t, n) for runs of positions [t, t + n) within [begin, end) of
  // row r's KV head g whose fp32 cache rows lie ld floats apart: the prompt's, then the
  // generated positions', or these one at a time where a beam table maps each to its own slot.
  template <class Fn>
  void for_runs(size_t li, int64_t r, int64_t g, int64_t begin, int64_t end, Fn&& fn) const {
    const auto run = [&](const CacheView& ks, int64_t t, int64_t n) {
      fn(entry<float>(pk_[li], gk_[li], r, g, t), entry<float>(pv_[li], gv_[li], r, g, t),
         ks.s_pos, t, n);
    };
    if (begin < prompt_len_) run(pk_[li], begin, std::min(end, prompt_len_) - begin);
    begin = std::max(begin, prompt_len_);
    if (table_ != nullptr) {
      for (int64_t t = begin; t < end; ++t) run(gk_[li], t, 1);
    } else if (begin < end) {
      run(gk_[li], begin, end - begin);
    }
  }

  // Long contexts (fp32 cache, no position bias): each (row, KV head)'s positions in chunks, as
  // many in all as keep the threads equally busy, and per chunk and query head of that KV head
  // a softmax partial (max, sum of exps, unnormalized output), merged after. Every cached row is
  // then read from memory once: one task per query head read a KV head shared across the thread
  // split twice, and 9 heads over 2 threads ran 5:4 (SmolLM2 at 1024 positions).
  static constexpr int64_t kMinChunk = 64;  // positions per chunk, at least
  int64_t attention_chunks(int64_t R, int64_t total) const {
    if (fp8_ || alibi_ != nullptr || rel_ != nullptr) return 0;
    const int64_t threads = at::get_num_threads();
    const int64_t groups = R * kv_heads_;
    // a multiple of the threads, and about four tasks per thread where the groups are fewer
    const int64_t per_thread = (4 * threads + groups - 1) / groups / threads;
    const int64_t chunks = threads * std::max<int64_t>(1, per_thread);
    return total / chunks >= kMinChunk && threads > 1 ? chunks : 0;
  }

  void split_attention(size_t li, int64_t R, int64_t total, int64_t nqkv, int64_t chunks) {
    const int64_t span = (total + chunks - 1) / chunks, per = 2 + d_;
    part_.resize(static_cast<size_t>(R * heads_ * chunks * per));
    at::parallel_for(0, R * kv_heads_ * chunks, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> scores(static_cast<size_t>(span));
      for (int64_t i = begin; i < end; ++i) {
        const int64_t c = i % chunks, g = i / chunks % kv_heads_, r = i / chunks / kv_heads_;
        const int64_t t0 = c * span, t1 = std::min(total, t0 + span);
        for (const int64_t h : heads_of_[g]) {
          float* part = part_.data() + ((r * heads_ + h) * chunks + c) * per;
          part[0] = -INFINITY;
          part[1] = 0.f;
          std::fill_n(part + 2, d_, 0.f);
          if (t0 >= t1) continue;
          std::tie(part[0], part[1]) = attend_part(li, r, h, t0, t1, total,
                                                   qkv_.data() + r * nqkv + h * d_,
                                                   scores.data(), part + 2);
        }
      }
    });
    for (int64_t rh = 0; rh < R * heads_; ++rh) {
      const float* parts = part_.data() + rh * chunks * per;
      float top = -INFINITY;
      for (int64_t c = 0; c < chunks; ++c) top = std::max(top, parts[c * per]);
      float* out = attn_.data() + rh * d_;
      std::fill_n(out, d_, 0.f);
      float sum = 0.f;
      for (int64_t c = 0; c < chunks; ++c) {
        const float* part = parts + c * per;
        if (part[1] == 0.f) continue;  // an empty chunk
        const float w = std::exp(part[0] - top);
        sum += w * part[1];
        for (int64_t i = 0; i < d_; ++i) out[i] += w * part[2 + i];
      }
      for (int64_t i = 0; i < d_; ++i) out[i] /= sum;
    }
  }

  void attention(size_t li, int64_t R, int64_t step, int64_t nqkv) {
    const int64_t total = prompt_len_ + step + 1;
    if (const int64_t chunks = attention_chunks(R, total)) {
      split_attention(li, R, total, nqkv, chunks);
      return;
    }
    // Each (row, head) pair is independent; small contexts stay on one thread.
    const int64_t grain = std::max<int64_t>(1, 32768 / (total * d_ + 1));
    at::parallel_for(0, R * heads_, grain, [&](int64_t begin, int64_t end) {
      std::vector<float> scores(static_cast<size_t>(total));
      for (int64_t i = begin; i < end; ++i) {
        if (fp8_)
          attend<uint8_t>(li, i / heads_, i % heads_, step, nqkv, scores.data());
        else
          attend<float>(li, i / heads_, i % heads_, step, nqkv, scores.data());
      }
    });
  }

  static constexpr int64_t kSiLU = 0, kGeluTanh = 1, kGelu = 2, kReLU = 3;  // blocks.ACTIVATIONS
  // Up to this many rows (decode steps) the MLP activation is the plain loop of dense_mlp;
  // prompts run torch's ops (the loop is one thread, and ~2x slower per element).
  static constexpr int64_t kLoopActRows = 16;
  const int64_t hidden_, heads_, kv_heads_, d_, inter_;
  std::vector<int64_t> kv_of_;  // the KV head of each query head
  std::vector<std::vector<int64_t>> heads_of_;  // the query heads of each KV head
  double prompt_scale_ = 0.0;  // prefill's attention scale, as the Python prefill passes it
  bool grouped_ = true;         // kv_of_ is heads / kv_heads runs of one KV head each
  const float eps_, scaling_;
  const bool round_bf16_;
  const float embed_scale_;
  const int64_t activation_;
  // post_norm_: each sublayer's norm after its residual add (GIT's BERT-style layers): the
  // attention and the MLP read h itself, attn_norm / mlp_norm follow the adds
  const bool layer_norm_, parallel_, gated_, post_norm_;
  const int64_t pos_offset_;
  int64_t pos_shift_ = 0;  // bound: GIT's learned positions count text tokens, not its image
  at::Tensor embed_, pos_embed_;
  const float* final_norm_ = nullptr;
  const float* final_norm_bias_ = nullptr;
  const float* alibi_ = nullptr;  // ALiBi slopes [heads]: score += slope * key position
  const float* embed_norm_ = nullptr;
  const float* embed_norm_bias_ = nullptr;
  std::vector<at::Tensor> owned_;
  std::vector<Projection> linears_;
  std::vector<Layer> layers_;
  int64_t lm_head_ = -1;
  // bound per generate()
  std::vector<at::Tensor> bound_;
  std::vector<CacheView> pk_, pv_, gk_, gv_;
  bool fp8_ = false;
  int64_t prompt_len_ = 0, gen_capacity_ = 0, gen_rows_ = 0, prompt_rows_ = 0, beams_ = 1;
  const float* cos_ = nullptr;
  const float* sin_ = nullptr;
  int64_t rot_ = 0, positions_ = 0;
  const int64_t* table_ = nullptr;
  int64_t table_stride_ = 0;
  // scratch, reused across steps
  std::vector<float> h_, x_, tmp_, qkv_, attn_, gu_, act_, staged_, mlp_out_, mlp_x_, gates_,
      expert_out_, shared_out_, lat_buf_, qa_, qh_, up_, cq_, part_;
  std::vector<at::Tensor> ck_, cv_;  // bound: cross-attention keys/values per layer
  at::Tensor cross_bias_, cross_rows_;  // bound: mllama's tile mask of new tokens [B, E], [B]
  std::vector<float*> mconv_, mssm_;   // bound: Mamba states per Mamba layer
  int64_t mamba_layers_ = 0;
  std::vector<float> m_proj_, m_xc_, m_t_, m_dtn_, m_dt_, m_y_;
  const float* rel_ = nullptr;  // bound: relative bias [heads, rel_stride_] by distance
  int64_t rel_stride_ = 0;
  float logit_scale_ = 1.f;
  int64_t gemm_rows_[kNumFmt] = {-1, -1, -1, -1};  // set_gemm_rows
  bool bf16_gemm_ = false;
  Latent lat_;
  Routing routing_;
  std::optional<c10::OperatorHandle> reduce_op_;
  pybind11::object reduce_fn_ = pybind11::none();
  double reduce_seconds_ = 0.0;
  int64_t reduce_calls_ = 0;
};

}  // namespace

void register_decode(pybind11::module& m) {
  namespace py = pybind11;
  py::class_<DecodePlan>(m, "DecodePlan",
                         "A llama-like decoder's decode step over the compiled kernels")
      .def(py::init<int64_t, int64_t, int64_t, int64_t, int64_t, double, double, at::Tensor,
                    const std::optional<at::Tensor>&, bool, double, int64_t, bool,
                    const std::optional<at::Tensor>&, bool, bool,
                    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, int64_t,
                    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, bool,
                    std::vector<int64_t>>(),
           py::arg("hidden"), py::arg("heads"), py::arg("kv_heads"), py::arg("head_dim"),
           py::arg("intermediate"), py::arg("eps"), py::arg("scaling"), py::arg("embed"),
           py::arg("final_norm"), py::arg("round_logits_bf16"), py::arg("embed_scale") = 1.0,
           py::arg("activation") = 0, py::arg("layer_norm") = false,
           py::arg("final_norm_bias") = py::none(), py::arg("parallel") = false,
           py::arg("gated") = true, py::arg("alibi_slopes") = py::none(),
           py::arg("pos_embed") = py::none(), py::arg("pos_offset") = 0,
           py::arg("embed_norm") = py::none(), py::arg("embed_norm_bias") = py::none(),
           py::arg("post_norm") = false, py::arg("kv_map") = std::vector<int64_t>{})
      .def("add_linear", &DecodePlan::add_linear, py::arg("fmt"), py::arg("w"),
           py::arg("scales") = py::none(), py::arg("zeros") = py::none(),
           py::arg("group_size") = 0, py::arg("bias") = py::none(),
           py::arg("in_features") = 0, py::arg("perm") = py::none(), py::arg("act_qmax") = 0.0,
           py::arg("act_scale") = py::none(),
           py::arg("act_levels") = false, py::arg("act_per_tensor") = false,
           py::arg("act_sym") = true, py::arg("act_block") = 0)
      .def("add_layer", &DecodePlan::add_layer, py::arg("attn_norm"), py::arg("mlp_norm"),
           py::arg("q_norm"), py::arg("k_norm"), py::arg("qkv"), py::arg("o"),
           py::arg("gate_up"), py::arg("down"), py::arg("attn_norm_bias") = py::none(),
           py::arg("mlp_norm_bias") = py::none(), py::arg("router") = -1,
           py::arg("expert_gate_up") = std::vector<int64_t>{},
           py::arg("expert_down") = std::vector<int64_t>{}, py::arg("top_k") = 0,
           py::arg("normalize") = false, py::arg("router_bias") = py::none(),
           py::arg("shared_gate_up") = -1, py::arg("shared_down") = -1, py::arg("q_b") = -1,
           py::arg("q_a_norm") = py::none(), py::arg("kv_a_norm") = py::none(),
           py::arg("w_uk") = py::none(), py::arg("w_uv") = py::none(),
           py::arg("cross_norm") = py::none(), py::arg("cross_q") = -1, py::arg("cross_o") = -1,
           py::arg("cross_norm_bias") = py::none(), py::arg("cross_q_norm") = py::none(),
           py::arg("gated") = false, py::arg("gate_attn") = 0.0, py::arg("gate_mlp") = 0.0)
      .def("set_logit_scale", &DecodePlan::set_logit_scale, py::arg("scale"))
      .def("set_gemm_rows", &DecodePlan::set_gemm_rows, py::arg("f32_rows"),
           py::arg("bf16_rows"), py::arg("bf16_gemm"), py::arg("i8_rows"))
      .def("set_latent", &DecodePlan::set_latent, py::arg("q_rank"), py::arg("kv_rank"),
           py::arg("nope"), py::arg("rope"), py::arg("v_dim"), py::arg("eps"))
      .def("set_routing", &DecodePlan::set_routing, py::arg("sigmoid"), py::arg("groups"),
           py::arg("top_groups"), py::arg("group_top2"), py::arg("scale"))
      .def("set_lm_head", &DecodePlan::set_lm_head)
      .def("set_all_reduce", &DecodePlan::set_all_reduce, py::arg("op"), py::arg("fn"))
      .def("take_all_reduce_time", &DecodePlan::take_all_reduce_time)
      .def("bind", &DecodePlan::bind, py::arg("prompt_k"), py::arg("prompt_v"),
           py::arg("gen_k"), py::arg("gen_v"), py::arg("cos"), py::arg("sin"), py::arg("table"),
           py::arg("beams"), py::arg("cross_k") = std::vector<at::Tensor>{},
           py::arg("cross_v") = std::vector<at::Tensor>{},
           py::arg("relative_bias") = py::none(), py::arg("cross_bias") = py::none(),
           py::arg("cross_rows") = py::none(),
           py::arg("mamba_conv") = std::vector<at::Tensor>{},
           py::arg("mamba_ssm") = std::vector<at::Tensor>{}, py::arg("pos_shift") = 0)
      .def("set_mamba", &DecodePlan::set_mamba, py::arg("in_proj"), py::arg("x_proj"),
           py::arg("dt_proj"), py::arg("out_proj"), py::arg("conv_weight"),
           py::arg("conv_bias"), py::arg("a"), py::arg("d"), py::arg("dt_norm"),
           py::arg("b_norm"), py::arg("c_norm"))
      .def("step", &DecodePlan::step, py::arg("ids"), py::arg("position"), py::arg("step"))
      .def("prefill_supported", &DecodePlan::prefill_supported)
      .def("prefill", &DecodePlan::prefill, py::arg("ids"), py::arg("scale"));
}

}  // namespace llmb
