"""Each family's decoder block, described by its parts, and the map from a Hugging Face module
tree onto that description.

The native backend (native.py: the torch-op step and the prefill; kernels/csrc/decode_step.cpp:
the compiled decode step) runs any `Block` below, so a new family is a new `_map_<family>`
function that names its modules and says which parts it has, not a new model class:

- norm: RMSNorm or LayerNorm (with or without bias), gemma's (1 + weight) offset;
- residual: sequential (attention, then MLP, each with its own pre-norm) or parallel (both read
  the block's input: one shared norm as GPT-J / Falcon-7B / Phi-2 / CodeGen, or two as GPT-NeoX
  and Falcon-40B's new decoder architecture);
- positions: rotary (full or partial; GPT-J / CodeGen's interleaved pairs are turned into the
  rotate-half layout by permuting q's and k's output rows once, which leaves q.k unchanged),
  ALiBi (BLOOM, MPT), learned absolute positions (OPT, GPTBigCode), or none;
- attention: MHA / GQA / MQA from the fused projection's shape; every fused QKV layout (NeoX's
  and BLOOM's per-head [q k v], Falcon's grouped [q.. k v], CodeGen's four [q v k] shards) is
  reordered once into [q heads | k heads | v heads], biases with it;
- mixer: attention, or (jamba) a Mamba selective state-space layer (`MambaParts`);
- attention: or DeepSeek's multi-head latent attention (`Latent`), run in its absorbed form:
  the cache holds one latent row per token ([rotary key | normed compressed kv], shared by
  every head as a single key/value head), q's no-position part is multiplied into the latent
  space by kv_b's key half and the attention's output out of it by kv_b's value half;
- MLP: gated (act(gate) * up) or plain (act(fc1 x + b)), SiLU / GELU (erf or tanh) / ReLU;
  or a mixture of experts (`Experts`: a float router, top-k of softmax or sigmoid scores,
  optionally group-limited and bias-corrected (DeepSeek), renormalized or not, scaled, each
  expert a gated MLP, plus always-on shared experts; a decode step reads only the experts it
  routes to). Dense and expert layers may alternate (DeepSeek's first dense layers).

Projections are described as `Source`s: which HF modules, and which of their output rows in
which order, make a native projection. The float path reads the modules' weights through them;
quantization (llmbench.quant.apply.install_native) takes the same rows of the quantized
modules, so both always agree on the layout. Settings a family has but the step does not
implement raise `Unsupported` with the reason, and the model runs stock with that reason in the
report (`fallback_reason`), never silently different.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


class Unsupported(Exception):
    """This model's settings are outside what the native step implements (the message says
    which); it runs stock instead, and the report says why."""


# MLP activations the native step implements, in the C++ step's numbering (decode_step.cpp).
ACTIVATIONS = {"silu": 0, "swish": 0, "gelu_pytorch_tanh": 1, "gelu_new": 1, "gelu_fast": 1,
               "gelu": 2, "relu": 3}


@dataclass(frozen=True)
class Experts:
    """A sparse MLP: router logits = W_router x, scores = softmax (or sigmoid) of them; the
    top_k experts by score (plus a per-layer correction bias, for choosing only) run as gated
    MLPs, summed weighted by their scores (divided by the chosen scores' sum when `normalize`,
    times `scale`). Group-limited routing first keeps the `top_groups` best of `groups` equal
    groups of experts, a group scored by its best expert ("max") or best two ("top2")."""

    count: int
    top_k: int
    normalize: bool
    scoring: str = "softmax"  # "softmax" | "sigmoid"
    groups: int = 1
    top_groups: int = 1
    group_score: str = "max"  # "max" | "top2"
    scale: float = 1.0


@dataclass(frozen=True)
class Latent:
    """Multi-head latent attention (DeepSeek-V2/V3): q from one projection or through a
    q_rank bottleneck (RMS-normed); keys and values from one compressed kv_rank latent
    (RMS-normed) plus a rope_dim rotary key shared by all heads. Per head: q.k = q_rope.k_rope
    + q_nope.(W_uk c), value W_uv c."""

    q_rank: int  # 0: q comes from one projection
    kv_rank: int
    nope_dim: int
    rope_dim: int
    v_dim: int
    norm_eps: float  # the latents' RMSNorms


@dataclass(frozen=True)
class Block:
    """What one decoder block computes (the same for every layer of a model)."""

    family: str
    norm: str  # "rms" | "layer"
    eps: float
    # "sequential" | "parallel" | "post" (GIT's BERT-style layers: each sublayer reads h and its
    # norm follows the residual add; no final norm)
    residual: str
    position: str  # "rope" | "alibi" | "learned" | "relative" (T5's bucketed bias) | "none"
    mlp: str  # "gated" | "plain"
    activation: str  # a key of ACTIVATIONS
    heads: int
    kv_heads: int
    head_dim: int
    scaling: float  # multiplies q.k
    norm_offset: float = 0.0  # gemma: RMSNorm scales by (1 + weight)
    rotary_dim: int = 0
    rope_interleaved: bool = False  # GPT-J pairs, permuted to rotate-half at load
    qk_norm: bool = False  # qwen3: per-head RMSNorm of q and k before RoPE
    embed_norm: bool = False  # bloom: LayerNorm right after the embedding
    sliding_window: int | None = None
    experts: Experts | None = None  # MoE layers' routing (the layers with a router use it)
    mamba_layers: tuple[int, ...] = ()  # jamba: these layers mix with a Mamba SSM, not attention
    cross_attention: bool = False  # T5, Whisper: each layer also attends to the encoder's states
    # mllama: these layers are gated cross-attention layers (to the image) in place of
    # self-attention (LayerParts.gates)
    cross_layers: tuple[int, ...] = ()
    latent: Latent | None = None  # MLA: heads share one latent key/value head of head_dim

    def describe(self) -> dict[str, Any]:
        """The report's account of the block."""
        return {key: dict(value.__dict__) if isinstance(value, Experts | Latent) else value
                for key, value in self.__dict__.items() if key != "family"}


@dataclass(frozen=True)
class Source:
    """Output rows of one HF linear module (all of them when rows is None); with `expert`, the
    module is a 3-D expert parameter ([experts, out, in]) and the source is that expert's
    matrix. `name` is the key quantization files use for it."""

    module: str
    rows: torch.Tensor | None = None
    expert: int | None = None

    @property
    def name(self) -> str:
        return self.module if self.expert is None else f"{self.module}.{self.expert}"


@dataclass
class Norm:
    weight: torch.Tensor  # fp32, offset already added
    bias: torch.Tensor | None = None


@dataclass
class MambaParts:
    """Jamba's Mamba mixer: in_proj -> [x | gate]; x through a causal depthwise conv (width
    `conv_weight.shape[1]`) and SiLU; x_proj -> [dt (RMS-normed) | B | C (both RMS-normed)];
    dt_proj (+ bias) then softplus; state = exp(dt A) state + dt B x; y = C.state + D x, times
    SiLU(gate); out_proj."""

    in_proj: list[Source]
    x_proj: list[Source]
    dt_proj: list[Source]
    out_proj: list[Source]
    conv_weight: torch.Tensor  # [inner, width] fp32
    conv_bias: torch.Tensor | None
    a: torch.Tensor  # -exp(A_log) [inner, state] fp32
    d: torch.Tensor  # [inner]
    dt_norm: torch.Tensor
    b_norm: torch.Tensor
    c_norm: torch.Tensor
    dt_rank: int
    state: int


@dataclass
class LayerParts:
    attn_norm: Norm
    mlp_norm: Norm | None  # None: a parallel block whose MLP reads the attention's norm
    qkv: list[Source] | None  # (qkv and o are None in a Mamba layer)
    o: list[Source] | None
    gate_up: list[Source] | None  # [gate | up] for a gated MLP, a plain one's input projection
    down: list[Source] | None  # (both None in a mixture-of-experts layer)
    q_norm: torch.Tensor | None = None
    k_norm: torch.Tensor | None = None
    router: list[Source] | None = None  # MoE layers: the router, kept float
    router_bias: torch.Tensor | None = None  # added to the scores for choosing experts only
    experts: list[tuple[list[Source], list[Source]]] = field(default_factory=list)
    shared: tuple[list[Source], list[Source]] | None = None  # an always-on gated MLP
    # MLA: qkv is [q (or q's bottleneck) | rotary key | compressed kv]; q_b lifts the
    # bottleneck to the heads' q; kv_b is absorbed (never run as a projection).
    q_b: list[Source] | None = None
    q_a_norm: torch.Tensor | None = None
    kv_a_norm: torch.Tensor | None = None
    kv_b: list[Source] | None = None
    mamba: MambaParts | None = None  # jamba's Mamba layers, in place of attention
    # Encoder-decoder (T5): attention to the encoder's states between self-attention and MLP.
    cross_norm: Norm | None = None
    cross_q: list[Source] | None = None
    cross_kv: list[Source] | None = None  # [k | v] of the encoder's states, once per prompt
    cross_o: list[Source] | None = None
    # mllama's cross-attention layers: per-head RMSNorm weights of the cross q and k, and
    # tanh(attention gate), tanh(MLP gate) (the layer's norm is attn_norm; qkv and o are None)
    cross_q_norm: torch.Tensor | None = None
    cross_k_norm: torch.Tensor | None = None
    gates: tuple[float, float] | None = None

    def sources(self) -> list[Source]:
        """Every HF weight this layer's projections (router and kv_b included) are made of."""
        lists = [self.qkv, self.o, self.gate_up, self.down, self.router, self.q_b, self.kv_b,
                 self.cross_q, self.cross_kv, self.cross_o]
        for gate_up, down in [*self.experts, *([self.shared] if self.shared else [])]:
            lists += [gate_up, down]
        if self.mamba is not None:
            lists += [self.mamba.in_proj, self.mamba.x_proj, self.mamba.dt_proj,
                      self.mamba.out_proj]
        return [source for found in lists if found for source in found]


@dataclass
class ModelParts:
    block: Block
    embed: str  # the token embedding module's name
    layers: list[LayerParts]
    final_norm: Norm | None  # None: post-norm blocks end normed
    lm_head: str
    embed_scale: float | None = None  # gemma: sqrt(hidden), in the weights' dtype
    embed_norm: Norm | None = None
    pos_embed: str | None = None  # learned positions: this embedding module ...
    pos_offset: int = 0  # ... read at position + offset (OPT's 2)
    alibi_slopes: torch.Tensor | None = None  # [heads] fp32
    rope_tables: Callable[[int], tuple[torch.Tensor, torch.Tensor]] | None = None
    # T5: the bias [heads, queries, keys] for `queries` positions from `start` over `keys` keys
    relative_bias: Callable[[int, int, int], torch.Tensor] | None = None
    # encoder-decoder: the encoder module, run stock once per prompt (None with cross-attention:
    # the caller runs it and hands generate() its states, as multimodal.NativeMultimodal does)
    encoder: str | None = None
    decoder_start: int | None = None  # ... and the token the decoder starts from
    logit_scale: float | None = None  # T5 scales the final norm's output by d_model^-0.5
    notes: list[str] = field(default_factory=list)


# ---- helpers ------------------------------------------------------------------------------------

def _cfg(config: Any, *names: str, default: Any = None) -> Any:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def _norm(module: Any, offset: float = 0.0) -> Norm:
    bias = getattr(module, "bias", None)
    return Norm(module.weight.detach().float() + offset,
                None if bias is None else bias.detach().float())


def _rows(*blocks: torch.Tensor) -> torch.Tensor:
    return torch.cat([b.reshape(-1) for b in blocks]).long()


def _per_head_qkv_rows(heads: int, d: int) -> torch.Tensor:
    """A fused projection laid out per head [q k v] (NeoX, BLOOM, multi-head Falcon and
    GPTBigCode): the row order that makes it [q heads | k heads | v heads]."""
    per_head = torch.arange(3 * heads * d).view(heads, 3, d)
    return _rows(per_head[:, 0], per_head[:, 1], per_head[:, 2])


def _interleaved_to_half(head_dim: int, rotary_dim: int) -> torch.Tensor:
    """Within one head: the even dims of the rotary part, then its odd dims, then the rest.
    Rotating pairs (2i, 2i+1) is then rotate-half RoPE over the first rotary_dim dims."""
    rot = torch.arange(rotary_dim)
    return torch.cat((rot[0::2], rot[1::2], torch.arange(rotary_dim, head_dim)))


def _permute_heads(rows: torch.Tensor, heads: int, head_dim: int,
                   order: torch.Tensor) -> torch.Tensor:
    return rows.view(heads, head_dim)[:, order].reshape(-1)


def _module_rope(rotary: Any) -> Callable[[int], tuple[torch.Tensor, torch.Tensor]]:
    """transformers' own rotary embedding: every rope type, exactly its tables."""
    def tables(length: int) -> tuple[torch.Tensor, torch.Tensor]:
        positions = torch.arange(length).unsqueeze(0)
        cos, sin = rotary(torch.zeros(1, dtype=torch.float32), positions)
        return cos[0].float().contiguous(), sin[0].float().contiguous()
    return tables


def _complex_rope(rotary: Any) -> Callable[[int], tuple[torch.Tensor, torch.Tensor]]:
    """DeepSeek-V2's rotary embedding returns e^(i theta) per pair: its tables in rotate-half
    form (the pairs are de-interleaved at load as GPT-J's are)."""
    def tables(length: int) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = rotary(torch.zeros(1, dtype=torch.float32), torch.arange(length).unsqueeze(0))[0]
        cos, sin = freqs.real.float(), freqs.imag.float()
        return torch.cat((cos, cos), -1).contiguous(), torch.cat((sin, sin), -1).contiguous()
    return tables


def _sinusoid_rope(buffer: torch.Tensor) -> Callable[[int], tuple[torch.Tensor, torch.Tensor]]:
    """GPT-J / CodeGen's table ([positions, rot] = sin | cos per pair), in rotate-half form."""
    half = buffer.shape[1] // 2

    def tables(length: int) -> tuple[torch.Tensor, torch.Tensor]:
        if length > buffer.shape[0]:
            raise Unsupported(f"{length} positions exceed the model's {buffer.shape[0]}")
        sin, cos = buffer[:length, :half].float(), buffer[:length, half:].float()
        return torch.cat((cos, cos), -1).contiguous(), torch.cat((sin, sin), -1).contiguous()
    return tables


def _refuse(condition: Any, reason: str) -> None:
    if condition:
        raise Unsupported(reason)


# ---- the families -------------------------------------------------------------------------------

def _map_llama_like(model: Any) -> ModelParts:
    """llama, mistral, qwen2, qwen3, phi3, gemma, stablelm and mixtral: llama's module names."""
    config, inner = model.config, model.model
    family = config.model_type
    layer0 = inner.layers[0]
    attn0 = layer0.self_attn
    heads = config.num_attention_heads
    d = attn0.head_dim
    kv = _cfg(config, "num_key_value_heads", default=heads)
    gemma = family == "gemma"
    offset = 1.0 if gemma else 0.0
    layer_norm = isinstance(layer0.input_layernorm, torch.nn.LayerNorm)
    parallel = bool(getattr(config, "use_parallel_residual", False))
    _refuse(getattr(config, "qk_layernorm", False),
            f"{family}: per-head q/k LayerNorm (qk_layernorm) is not implemented")
    rotary_dim = int(_module_rope(inner.rotary_emb)(1)[0].shape[-1])
    layers = []
    for i, layer in enumerate(inner.layers):
        attn = layer.self_attn
        prefix = f"model.layers.{i}"
        experts: list[tuple[list[Source], list[Source]]] = []
        router = None
        gate_up: list[Source] | None
        down: list[Source] | None = [Source(f"{prefix}.mlp.down_proj")]
        if hasattr(attn, "qkv_proj"):  # phi3 ships them fused already
            qkv = [Source(f"{prefix}.self_attn.qkv_proj")]
            gate_up = [Source(f"{prefix}.mlp.gate_up_proj")]
        else:
            qkv = [Source(f"{prefix}.self_attn.{p}") for p in ("q_proj", "k_proj", "v_proj")]
            gate_up = [Source(f"{prefix}.mlp.{p}") for p in ("gate_proj", "up_proj")]
        if family == "mixtral":  # every layer a sparse MLP over 3-D expert tensors
            router = [Source(f"{prefix}.mlp.gate")]
            stacked = f"{prefix}.mlp.experts"
            experts = [([Source(f"{stacked}.gate_up_proj", expert=e)],
                        [Source(f"{stacked}.down_proj", expert=e)])
                       for e in range(config.num_local_experts)]
            gate_up = down = None
        q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
        post = getattr(layer, "post_attention_layernorm", None)
        layers.append(LayerParts(
            attn_norm=_norm(layer.input_layernorm, offset),
            mlp_norm=None if parallel or post is None else _norm(post, offset),
            qkv=qkv, o=[Source(f"{prefix}.self_attn.o_proj")], gate_up=gate_up, down=down,
            q_norm=None if q_norm is None else q_norm.weight.detach().float(),
            k_norm=None if k_norm is None else k_norm.weight.detach().float(),
            router=router, experts=experts))
    embed_scale = getattr(inner.embed_tokens, "embed_scale", None)
    block = Block(family=family, norm="layer" if layer_norm else "rms",
                  eps=_cfg(config, "rms_norm_eps", "layer_norm_eps"),
                  residual="parallel" if parallel else "sequential", position="rope",
                  mlp="gated", activation=getattr(config, "hidden_act", "silu"), heads=heads,
                  kv_heads=kv, head_dim=d, scaling=attn0.scaling, norm_offset=offset,
                  rotary_dim=rotary_dim, qk_norm=layers[0].q_norm is not None,
                  sliding_window=getattr(config, "sliding_window", None),
                  experts=None if family != "mixtral" else Experts(
                      config.num_local_experts, config.num_experts_per_tok, normalize=True))
    return ModelParts(
        block=block, embed="model.embed_tokens", layers=layers,
        final_norm=_norm(inner.norm, offset), lm_head="lm_head",
        embed_scale=None if embed_scale is None else float(
            embed_scale.to(inner.embed_tokens.weight.dtype)),
        rope_tables=_module_rope(inner.rotary_emb))


def _map_gptj(model: Any) -> ModelParts:
    """GPT-J and CodeGen: parallel block with one LayerNorm, interleaved partial RoPE."""
    config, inner = model.config, model.transformer
    family = config.model_type
    heads, hidden = config.n_head, config.n_embd
    d = hidden // heads
    rot = config.rotary_dim or d
    order = _interleaved_to_half(d, rot)
    ident = torch.arange(d)
    layers = []
    for i in range(len(inner.h)):
        prefix = f"transformer.h.{i}"
        if family == "codegen":
            # qkv_proj rows: 4 shards of [q | v | k], each holding heads/4 heads.
            mp = 4
            local = heads // mp * d
            shards = torch.arange(3 * hidden).view(mp, 3, local)
            q_rows, v_rows, k_rows = shards[:, 0], shards[:, 1], shards[:, 2]
            rows = _rows(_permute_heads(q_rows.reshape(-1), heads, d, order),
                         _permute_heads(k_rows.reshape(-1), heads, d, order),
                         _permute_heads(v_rows.reshape(-1), heads, d, ident))
            qkv = [Source(f"{prefix}.attn.qkv_proj", rows)]
        else:
            permuted = _permute_heads(torch.arange(hidden), heads, d, order)
            qkv = [Source(f"{prefix}.attn.q_proj", permuted),
                   Source(f"{prefix}.attn.k_proj", permuted), Source(f"{prefix}.attn.v_proj")]
        layers.append(LayerParts(
            attn_norm=_norm(inner.h[i].ln_1), mlp_norm=None, qkv=qkv,
            o=[Source(f"{prefix}.attn.out_proj")], gate_up=[Source(f"{prefix}.mlp.fc_in")],
            down=[Source(f"{prefix}.mlp.fc_out")]))
    block = Block(family=family, norm="layer", eps=config.layer_norm_epsilon,
                  residual="parallel", position="rope", mlp="plain",
                  activation=config.activation_function, heads=heads, kv_heads=heads,
                  head_dim=d, scaling=1.0 / math.sqrt(d), rotary_dim=rot, rope_interleaved=True)
    return ModelParts(block=block, embed="transformer.wte", layers=layers,
                      final_norm=_norm(inner.ln_f), lm_head="lm_head",
                      rope_tables=_sinusoid_rope(inner.h[0].attn.embed_positions))


def _map_gpt_neox(model: Any) -> ModelParts:
    config, inner = model.config, model.gpt_neox
    heads, hidden = config.num_attention_heads, config.hidden_size
    d = hidden // heads
    parallel = bool(config.use_parallel_residual)
    rows = _per_head_qkv_rows(heads, d)
    layers = []
    for i, layer in enumerate(inner.layers):
        prefix = f"gpt_neox.layers.{i}"
        layers.append(LayerParts(
            attn_norm=_norm(layer.input_layernorm), mlp_norm=_norm(layer.post_attention_layernorm),
            qkv=[Source(f"{prefix}.attention.query_key_value", rows)],
            o=[Source(f"{prefix}.attention.dense")],
            gate_up=[Source(f"{prefix}.mlp.dense_h_to_4h")],
            down=[Source(f"{prefix}.mlp.dense_4h_to_h")]))
    tables = _module_rope(inner.rotary_emb)
    block = Block(family="gpt_neox", norm="layer", eps=config.layer_norm_eps,
                  residual="parallel" if parallel else "sequential", position="rope",
                  mlp="plain", activation=config.hidden_act, heads=heads, kv_heads=heads,
                  head_dim=d, scaling=1.0 / math.sqrt(d), rotary_dim=int(tables(1)[0].shape[-1]))
    return ModelParts(block=block, embed="gpt_neox.embed_in", layers=layers,
                      final_norm=_norm(inner.final_layer_norm), lm_head="embed_out"
                      if hasattr(model, "embed_out") else "lm_head", rope_tables=tables)


def _map_falcon(model: Any) -> ModelParts:
    config, inner = model.config, model.transformer
    heads, hidden = config.num_attention_heads, config.hidden_size
    d = hidden // heads
    _refuse(config.alibi, "falcon: the ALiBi variant is not implemented")
    new_arch = bool(config.new_decoder_architecture)
    if new_arch:
        kv = config.num_kv_heads
        group = heads // kv
        grouped = torch.arange((heads + 2 * kv) * d).view(kv, group + 2, d)
        rows = _rows(grouped[:, :group], grouped[:, group], grouped[:, group + 1])
    elif config.multi_query:
        kv, rows = 1, None  # [q heads | k | v]
    else:
        kv = heads
        rows = _per_head_qkv_rows(heads, d)
    layers = []
    for i, layer in enumerate(inner.h):
        prefix = f"transformer.h.{i}"
        if new_arch and getattr(layer, "ln_attn", None) is not None:
            attn_norm, mlp_norm = _norm(layer.ln_attn), _norm(layer.ln_mlp)
        elif config.parallel_attn or new_arch:
            attn_norm, mlp_norm = _norm(layer.input_layernorm), None
        else:
            attn_norm = _norm(layer.input_layernorm)
            mlp_norm = _norm(layer.post_attention_layernorm)
        layers.append(LayerParts(
            attn_norm=attn_norm, mlp_norm=mlp_norm,
            qkv=[Source(f"{prefix}.self_attention.query_key_value", rows)],
            o=[Source(f"{prefix}.self_attention.dense")],
            gate_up=[Source(f"{prefix}.mlp.dense_h_to_4h")],
            down=[Source(f"{prefix}.mlp.dense_4h_to_h")]))
    parallel = new_arch or config.parallel_attn
    block = Block(family="falcon", norm="layer", eps=config.layer_norm_epsilon,
                  residual="parallel" if parallel else "sequential", position="rope",
                  mlp="plain", activation=getattr(config, "activation", "gelu"), heads=heads,
                  kv_heads=kv, head_dim=d, scaling=1.0 / math.sqrt(d), rotary_dim=d)
    return ModelParts(block=block, embed="transformer.word_embeddings", layers=layers,
                      final_norm=_norm(inner.ln_f), lm_head="lm_head",
                      rope_tables=_module_rope(inner.rotary_emb))


def _map_opt(model: Any) -> ModelParts:
    config, decoder = model.config, model.model.decoder
    _refuse(not config.do_layer_norm_before, "opt: post-norm blocks (do_layer_norm_before=False, "
            "OPT-350M) are not implemented")
    _refuse(decoder.project_in is not None or decoder.final_layer_norm is None,
            "opt: word_embed_proj_dim != hidden_size is not implemented")
    heads, hidden = config.num_attention_heads, config.hidden_size
    d = hidden // heads
    layers = []
    for i, layer in enumerate(decoder.layers):
        prefix = f"model.decoder.layers.{i}"
        layers.append(LayerParts(
            attn_norm=_norm(layer.self_attn_layer_norm), mlp_norm=_norm(layer.final_layer_norm),
            qkv=[Source(f"{prefix}.self_attn.{p}") for p in ("q_proj", "k_proj", "v_proj")],
            o=[Source(f"{prefix}.self_attn.out_proj")], gate_up=[Source(f"{prefix}.fc1")],
            down=[Source(f"{prefix}.fc2")]))
    block = Block(family="opt", norm="layer", eps=1e-5, residual="sequential",
                  position="learned", mlp="plain", activation=config.activation_function,
                  heads=heads, kv_heads=heads, head_dim=d, scaling=d ** -0.5)
    return ModelParts(block=block, embed="model.decoder.embed_tokens", layers=layers,
                      final_norm=_norm(decoder.final_layer_norm), lm_head="lm_head",
                      pos_embed="model.decoder.embed_positions",
                      pos_offset=int(getattr(decoder.embed_positions, "offset", 2)))


def _map_bloom(model: Any) -> ModelParts:
    from transformers.models.bloom import modeling_bloom

    config, inner = model.config, model.transformer
    _refuse(config.apply_residual_connection_post_layernorm,
            "bloom: apply_residual_connection_post_layernorm is not implemented")
    heads, hidden = config.n_head, config.hidden_size
    d = hidden // heads
    rows = _per_head_qkv_rows(heads, d)
    layers = []
    for i, layer in enumerate(inner.h):
        prefix = f"transformer.h.{i}"
        layers.append(LayerParts(
            attn_norm=_norm(layer.input_layernorm), mlp_norm=_norm(layer.post_attention_layernorm),
            qkv=[Source(f"{prefix}.self_attention.query_key_value", rows)],
            o=[Source(f"{prefix}.self_attention.dense")],
            gate_up=[Source(f"{prefix}.mlp.dense_h_to_4h")],
            down=[Source(f"{prefix}.mlp.dense_4h_to_h")]))
    block = Block(family="bloom", norm="layer", eps=config.layer_norm_epsilon,
                  residual="sequential", position="alibi", mlp="plain",
                  activation="gelu_pytorch_tanh", heads=heads, kv_heads=heads, head_dim=d,
                  scaling=1.0 / math.sqrt(d), embed_norm=True)
    slopes = modeling_bloom._get_alibi_slopes(heads, torch.device("cpu")).float()
    return ModelParts(block=block, embed="transformer.word_embeddings", layers=layers,
                      final_norm=_norm(inner.ln_f), lm_head="lm_head",
                      embed_norm=_norm(inner.word_embeddings_layernorm), alibi_slopes=slopes)


def _map_gpt_bigcode(model: Any) -> ModelParts:
    config, inner = model.config, model.transformer
    heads, hidden = config.n_head, config.n_embd
    d = hidden // heads
    if config.multi_query:
        kv, rows = 1, None  # c_attn rows: [q heads | k | v]
    else:
        kv = heads
        rows = _per_head_qkv_rows(heads, d)
    _refuse(not config.scale_attn_weights, "gpt_bigcode: scale_attn_weights=False")
    layers = []
    for i, layer in enumerate(inner.h):
        prefix = f"transformer.h.{i}"
        layers.append(LayerParts(
            attn_norm=_norm(layer.ln_1), mlp_norm=_norm(layer.ln_2),
            qkv=[Source(f"{prefix}.attn.c_attn", rows)], o=[Source(f"{prefix}.attn.c_proj")],
            gate_up=[Source(f"{prefix}.mlp.c_fc")], down=[Source(f"{prefix}.mlp.c_proj")]))
    block = Block(family="gpt_bigcode", norm="layer", eps=config.layer_norm_epsilon,
                  residual="sequential", position="learned", mlp="plain",
                  activation=config.activation_function, heads=heads, kv_heads=kv, head_dim=d,
                  scaling=1.0 / math.sqrt(d))
    return ModelParts(block=block, embed="transformer.wte", layers=layers,
                      final_norm=_norm(inner.ln_f), lm_head="lm_head", pos_embed="transformer.wpe")


def _map_mpt(model: Any) -> ModelParts:
    from transformers.models.mpt import modeling_mpt

    config, inner = model.config, model.transformer
    attn_config = config.attn_config
    _refuse(not attn_config.alibi, "mpt: models without ALiBi are not implemented")
    _refuse(attn_config.clip_qkv, "mpt: clip_qkv is not implemented")
    _refuse(attn_config.qk_ln, "mpt: qk_ln is not implemented")
    heads, hidden = config.n_heads, config.d_model
    d = hidden // heads
    layers = []
    for i, layer in enumerate(inner.blocks):
        prefix = f"transformer.blocks.{i}"
        layers.append(LayerParts(
            attn_norm=_norm(layer.norm_1), mlp_norm=_norm(layer.norm_2),
            qkv=[Source(f"{prefix}.attn.Wqkv")], o=[Source(f"{prefix}.attn.out_proj")],
            gate_up=[Source(f"{prefix}.ffn.up_proj")], down=[Source(f"{prefix}.ffn.down_proj")]))
    scale = attn_config.softmax_scale or 1.0 / math.sqrt(d)
    block = Block(family="mpt", norm="layer", eps=config.layer_norm_epsilon,
                  residual="sequential", position="alibi", mlp="plain", activation="gelu",
                  heads=heads, kv_heads=heads, head_dim=d, scaling=scale)
    alibi = modeling_mpt.build_mpt_alibi_tensor(heads, 2, attn_config.alibi_bias_max)
    slopes = -alibi.reshape(heads, 2)[:, 0].float()  # slope * (key - query) at key = query - 1
    return ModelParts(block=block, embed="transformer.wte", layers=layers,
                      final_norm=_norm(inner.norm_f), lm_head="lm_head", alibi_slopes=slopes)


def _map_phi(model: Any) -> ModelParts:
    config, inner = model.config, model.model
    _refuse(config.qk_layernorm, "phi: qk_layernorm is not implemented")
    heads, hidden = config.num_attention_heads, config.hidden_size
    attn0 = inner.layers[0].self_attn
    d = attn0.head_dim
    kv = _cfg(config, "num_key_value_heads", default=heads)
    layers = []
    for i, layer in enumerate(inner.layers):
        prefix = f"model.layers.{i}"
        layers.append(LayerParts(
            attn_norm=_norm(layer.input_layernorm), mlp_norm=None,
            qkv=[Source(f"{prefix}.self_attn.{p}") for p in ("q_proj", "k_proj", "v_proj")],
            o=[Source(f"{prefix}.self_attn.dense")], gate_up=[Source(f"{prefix}.mlp.fc1")],
            down=[Source(f"{prefix}.mlp.fc2")]))
    tables = _module_rope(inner.rotary_emb)
    block = Block(family="phi", norm="layer", eps=config.layer_norm_eps, residual="parallel",
                  position="rope", mlp="plain", activation=config.hidden_act, heads=heads,
                  kv_heads=kv, head_dim=d, scaling=attn0.scaling,
                  rotary_dim=int(tables(1)[0].shape[-1]))
    del hidden
    return ModelParts(block=block, embed="model.embed_tokens", layers=layers,
                      final_norm=_norm(inner.final_layernorm), lm_head="lm_head",
                      rope_tables=tables)


def _map_deepseek(model: Any) -> ModelParts:
    """DeepSeek-V2 / V2.5 / V3 / R1: multi-head latent attention; dense gated MLPs in the first
    layers, then routed experts (3-D tensors) plus shared experts."""
    config, inner = model.config, model.model
    family = config.model_type
    heads = config.num_attention_heads
    nope, rope, v_dim = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
    q_rank, kv_rank = config.q_lora_rank or 0, config.kv_lora_rank
    attn0 = inner.layers[0].self_attn
    # V2's complex rotation and V3's rope_interleave rotate pairs (2i, 2i+1): de-interleave q's
    # and the rotary key's rows (q.k unchanged); each head's q becomes [rotary | no-position].
    interleaved = family == "deepseek_v2" or bool(getattr(config, "rope_interleave", False))
    rope_order = _interleaved_to_half(rope, rope) if interleaved else torch.arange(rope)
    per_head = torch.arange(heads * (nope + rope)).view(heads, nope + rope)
    q_rows = torch.cat((per_head[:, nope:][:, rope_order], per_head[:, :nope]), 1).reshape(-1)
    kv_rows = torch.cat((kv_rank + rope_order, torch.arange(kv_rank)))  # [rotary key | latent]
    count = _cfg(config, "n_routed_experts", "num_local_experts", "num_experts")
    if family == "deepseek_v2":
        method = config.topk_method
        _refuse(method not in ("greedy", "group_limited_greedy"),
                f"deepseek_v2: expert routing '{method}' is not implemented")
        limited = method == "group_limited_greedy"
        routing = Experts(count, config.num_experts_per_tok, normalize=False,
                          groups=config.n_group if limited else 1,
                          top_groups=config.topk_group if limited else 1,
                          scale=float(config.routed_scaling_factor))
    else:
        routing = Experts(count, config.num_experts_per_tok, normalize=bool(config.norm_topk_prob),
                          scoring="sigmoid", groups=config.n_group or 1,
                          top_groups=config.topk_group or 1, group_score="top2",
                          scale=float(config.routed_scaling_factor))
    layers = []
    for i, layer in enumerate(inner.layers):
        prefix = f"model.layers.{i}"
        attn, mlp = f"{prefix}.self_attn", f"{prefix}.mlp"
        kv_a = Source(f"{attn}.kv_a_proj_with_mqa", kv_rows)
        if q_rank:
            qkv, q_b = [Source(f"{attn}.q_a_proj"), kv_a], [Source(f"{attn}.q_b_proj", q_rows)]
        else:
            qkv, q_b = [Source(f"{attn}.q_proj", q_rows), kv_a], None
        parts = LayerParts(
            attn_norm=_norm(layer.input_layernorm), mlp_norm=_norm(layer.post_attention_layernorm),
            qkv=qkv, o=[Source(f"{attn}.o_proj")], gate_up=None, down=None, q_b=q_b,
            q_a_norm=None if not q_rank else layer.self_attn.q_a_layernorm.weight.detach().float(),
            kv_a_norm=layer.self_attn.kv_a_layernorm.weight.detach().float(),
            kv_b=[Source(f"{attn}.kv_b_proj")])
        if hasattr(layer.mlp, "experts"):
            bias = getattr(layer.mlp.gate, "e_score_correction_bias", None)
            parts.router = [Source(f"{mlp}.gate")]
            parts.router_bias = None if bias is None else bias.detach().float()
            parts.experts = [([Source(f"{mlp}.experts.gate_up_proj", expert=e)],
                              [Source(f"{mlp}.experts.down_proj", expert=e)])
                             for e in range(count)]
            shared = f"{mlp}.shared_experts"
            parts.shared = ([Source(f"{shared}.gate_proj"), Source(f"{shared}.up_proj")],
                            [Source(f"{shared}.down_proj")])
        else:
            parts.gate_up = [Source(f"{mlp}.gate_proj"), Source(f"{mlp}.up_proj")]
            parts.down = [Source(f"{mlp}.down_proj")]
        layers.append(parts)
    latent = Latent(q_rank=q_rank, kv_rank=kv_rank, nope_dim=nope, rope_dim=rope, v_dim=v_dim,
                    norm_eps=float(attn0.kv_a_layernorm.variance_epsilon))
    block = Block(family=family, norm="rms", eps=config.rms_norm_eps, residual="sequential",
                  position="rope", mlp="gated", activation=config.hidden_act, heads=heads,
                  kv_heads=1, head_dim=rope + kv_rank, scaling=attn0.scaling, rotary_dim=rope,
                  latent=latent, experts=routing if any(p.router for p in layers) else None)
    tables = (_complex_rope if family == "deepseek_v2" else _module_rope)(inner.rotary_emb)
    return ModelParts(block=block, embed="model.embed_tokens", layers=layers,
                      final_norm=_norm(inner.norm), lm_head="lm_head", rope_tables=tables)


def _map_jamba(model: Any) -> ModelParts:
    """Jamba: attention layers without positions (GQA) and Mamba layers, each followed by a
    gated MLP or a sparse one (softmax top-k, not renormalized)."""
    config, inner = model.config, model.model
    _refuse(config.hidden_act != "silu", "jamba: the Mamba mixer with an activation other "
            "than SiLU is not implemented")
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    d = getattr(config, "head_dim", None) or config.hidden_size // heads
    layers, mamba_layers = [], []
    for i, layer in enumerate(inner.layers):
        prefix = f"model.layers.{i}"
        ff = f"{prefix}.feed_forward"
        parts = LayerParts(attn_norm=_norm(layer.input_layernorm),
                           mlp_norm=_norm(layer.pre_ff_layernorm), qkv=None, o=None,
                           gate_up=None, down=None)
        mixer = getattr(layer, "mamba", None)
        if mixer is not None:
            m = f"{prefix}.mamba"
            conv = mixer.conv1d
            parts.mamba = MambaParts(
                in_proj=[Source(f"{m}.in_proj")], x_proj=[Source(f"{m}.x_proj")],
                dt_proj=[Source(f"{m}.dt_proj")], out_proj=[Source(f"{m}.out_proj")],
                conv_weight=conv.weight.detach().float()[:, 0].contiguous(),
                conv_bias=None if conv.bias is None else conv.bias.detach().float(),
                a=-torch.exp(mixer.A_log.detach().float()), d=mixer.D.detach().float(),
                dt_norm=mixer.dt_layernorm.weight.detach().float(),
                b_norm=mixer.b_layernorm.weight.detach().float(),
                c_norm=mixer.c_layernorm.weight.detach().float(),
                dt_rank=mixer.time_step_rank, state=mixer.ssm_state_size)
            mamba_layers.append(i)
        else:
            attn = f"{prefix}.self_attn"
            parts.qkv = [Source(f"{attn}.{p}") for p in ("q_proj", "k_proj", "v_proj")]
            parts.o = [Source(f"{attn}.o_proj")]
        if hasattr(layer.feed_forward, "router"):
            parts.router = [Source(f"{ff}.router")]
            parts.experts = [([Source(f"{ff}.experts.gate_up_proj", expert=e)],
                              [Source(f"{ff}.experts.down_proj", expert=e)])
                             for e in range(config.num_experts)]
        else:
            parts.gate_up = [Source(f"{ff}.gate_proj"), Source(f"{ff}.up_proj")]
            parts.down = [Source(f"{ff}.down_proj")]
        layers.append(parts)
    block = Block(family="jamba", norm="rms", eps=config.rms_norm_eps, residual="sequential",
                  position="none", mlp="gated", activation=config.hidden_act, heads=heads,
                  kv_heads=kv, head_dim=d, scaling=d ** -0.5,
                  experts=Experts(config.num_experts, config.num_experts_per_tok,
                                  normalize=False) if any(p.router for p in layers) else None,
                  mamba_layers=tuple(mamba_layers))
    return ModelParts(block=block, embed="model.embed_tokens", layers=layers,
                      final_norm=_norm(inner.final_layernorm), lm_head="lm_head")


def _decoder_start(model: Any) -> int:
    """The decoder's first token as transformers' generate() picks it: the generation config's
    decoder_start_token_id, else its bos_token_id."""
    generation = model.generation_config
    start = _cfg(generation, "decoder_start_token_id", "bos_token_id")
    _refuse(start is None, f"{model.config.model_type}: no decoder_start_token_id or "
            "bos_token_id to start the decoder from")
    return int(start[0] if isinstance(start, list | tuple) else start)


def _map_t5(model: Any) -> ModelParts:
    """T5 / Flan-T5's decoder (the encoder runs stock, once per prompt): RMS-style norms,
    bucketed relative position bias from the first layer shared by all, unscaled q.k, cross-
    attention to the encoder, ReLU or gated-GELU MLP."""
    config, decoder = model.config, model.decoder
    heads, d = config.num_heads, config.d_kv
    layers = []
    for i, block in enumerate(decoder.block):
        p = f"decoder.block.{i}.layer"
        self_attn, cross, ff = block.layer
        dense = f"{p}.2.DenseReluDense"
        layers.append(LayerParts(
            attn_norm=_norm(self_attn.layer_norm), mlp_norm=_norm(ff.layer_norm),
            qkv=[Source(f"{p}.0.SelfAttention.{x}") for x in "qkv"],
            o=[Source(f"{p}.0.SelfAttention.o")],
            gate_up=([Source(f"{dense}.wi_0"), Source(f"{dense}.wi_1")] if config.is_gated_act
                     else [Source(f"{dense}.wi")]),
            down=[Source(f"{dense}.wo")], cross_norm=_norm(cross.layer_norm),
            cross_q=[Source(f"{p}.1.EncDecAttention.q")],
            cross_kv=[Source(f"{p}.1.EncDecAttention.{x}") for x in "kv"],
            cross_o=[Source(f"{p}.1.EncDecAttention.o")]))
    biased = decoder.block[0].layer[0].SelfAttention

    def relative_bias(queries: int, keys: int, start: int) -> torch.Tensor:
        with torch.no_grad():  # transformers' own buckets and table
            return biased.compute_bias(queries, keys, past_seen_tokens=start)[0].float()

    block = Block(family="t5", norm="rms", eps=config.layer_norm_epsilon, residual="sequential",
                  position="relative", mlp="gated" if config.is_gated_act else "plain",
                  activation=config.dense_act_fn, heads=heads, kv_heads=heads, head_dim=d,
                  scaling=1.0, cross_attention=True)
    return ModelParts(block=block, embed="decoder.embed_tokens", layers=layers,
                      final_norm=_norm(decoder.final_layer_norm), lm_head="lm_head",
                      relative_bias=relative_bias, encoder="encoder",
                      decoder_start=_decoder_start(model),
                      logit_scale=config.d_model ** -0.5 if config.scale_decoder_outputs
                      else None)


def _map_mllama(model: Any) -> ModelParts:
    """Llama-3.2-Vision's text model (multimodal.language_model's view: `model` the text model,
    `lm_head`): llama self-attention layers and, at config.cross_attention_layers, gated
    cross-attention layers in their place. Such a layer: RMSNorm; q (per-head RMSNorm) over the
    image's keys (per-head RMSNorm, once per prompt) and values, GQA, no positions; added times
    tanh(attention gate); then the MLP, zeroed on text rows that see no image tile, added times
    tanh(MLP gate). Without an image transformers skips these layers, and so does native."""
    config, inner = model.config, model.model
    crossing = set(config.cross_attention_layers)
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    d = config.hidden_size // heads
    layers = []
    for i, layer in enumerate(inner.layers):
        p = f"model.layers.{i}"
        common = {"attn_norm": _norm(layer.input_layernorm),
                  "mlp_norm": _norm(layer.post_attention_layernorm),
                  "gate_up": [Source(f"{p}.mlp.{x}_proj") for x in ("gate", "up")],
                  "down": [Source(f"{p}.mlp.down_proj")]}
        if i not in crossing:
            layers.append(LayerParts(**common,
                                     qkv=[Source(f"{p}.self_attn.{x}_proj") for x in "qkv"],
                                     o=[Source(f"{p}.self_attn.o_proj")]))
            continue
        attn = layer.cross_attn
        gates = (layer.cross_attn_attn_gate, layer.cross_attn_mlp_gate)
        layers.append(LayerParts(
            **common, qkv=None, o=None, cross_q=[Source(f"{p}.cross_attn.q_proj")],
            cross_kv=[Source(f"{p}.cross_attn.{x}_proj") for x in "kv"],
            cross_o=[Source(f"{p}.cross_attn.o_proj")],
            cross_q_norm=attn.q_norm.weight.detach().float(),
            cross_k_norm=attn.k_norm.weight.detach().float(),
            gates=tuple(float(g.detach().float().tanh()) for g in gates)))
    rope = _module_rope(inner.rotary_emb)
    block = Block(family="mllama", norm="rms", eps=config.rms_norm_eps, residual="sequential",
                  position="rope", mlp="gated", activation=config.hidden_act, heads=heads,
                  kv_heads=kv, head_dim=d, scaling=d ** -0.5,
                  rotary_dim=int(rope(1)[0].shape[-1]), cross_layers=tuple(sorted(crossing)))
    return ModelParts(block=block, embed="model.embed_tokens", layers=layers,
                      final_norm=_norm(inner.norm), lm_head="lm_head", rope_tables=rope)


def _map_git(model: Any) -> ModelParts:
    """GIT's text decoder (multimodal.language_model's view: encoder, embeddings, output):
    BERT-style post-norm layers (LayerNorm with bias after each residual add), q/k/v and dense
    projections with biases, GELU MLP, learned positions with a LayerNorm after the embedding,
    no final norm. The image tokens lead the prompt and attend to each other both ways
    (generate(prefix_len=...)); new tokens' positions count them, as transformers' do."""
    config = model.config
    heads = config.num_attention_heads
    d = config.hidden_size // heads
    layers = []
    for i, layer in enumerate(model.encoder.layer):
        p = f"encoder.layer.{i}"
        layers.append(LayerParts(
            attn_norm=_norm(layer.attention.output.LayerNorm),
            mlp_norm=_norm(layer.output.LayerNorm),
            qkv=[Source(f"{p}.attention.self.{x}") for x in ("query", "key", "value")],
            o=[Source(f"{p}.attention.output.dense")], gate_up=[Source(f"{p}.intermediate.dense")],
            down=[Source(f"{p}.output.dense")]))
    block = Block(family="git", norm="layer", eps=config.layer_norm_eps, residual="post",
                  position="learned", mlp="plain", activation=config.hidden_act, heads=heads,
                  kv_heads=heads, head_dim=d, scaling=d ** -0.5, embed_norm=True)
    return ModelParts(block=block, embed="embeddings.word_embeddings", layers=layers,
                      final_norm=None, lm_head="output",
                      embed_norm=_norm(model.embeddings.LayerNorm),
                      pos_embed="embeddings.position_embeddings")


def _map_whisper(model: Any) -> ModelParts:
    """Whisper's decoder (the audio encoder runs stock, once per prompt, and its states come in
    with generate()): pre-LayerNorm blocks with biases (k_proj has none), learned positions,
    q scaled by head_dim^-0.5, cross-attention to the audio, GELU MLP, proj_out over the tied
    embedding. Reads a WhisperForConditionalGeneration or multimodal.language_model's view of
    one (decoder and proj_out at the top)."""
    config = model.config
    prefix = "decoder" if hasattr(model, "decoder") else "model.decoder"
    decoder = model.get_submodule(prefix)
    heads = config.decoder_attention_heads
    d = config.d_model // heads
    layers = []
    for i, layer in enumerate(decoder.layers):
        p = f"{prefix}.layers.{i}"
        layers.append(LayerParts(
            attn_norm=_norm(layer.self_attn_layer_norm), mlp_norm=_norm(layer.final_layer_norm),
            qkv=[Source(f"{p}.self_attn.{x}_proj") for x in "qkv"],
            o=[Source(f"{p}.self_attn.out_proj")], gate_up=[Source(f"{p}.fc1")],
            down=[Source(f"{p}.fc2")], cross_norm=_norm(layer.encoder_attn_layer_norm),
            cross_q=[Source(f"{p}.encoder_attn.q_proj")],
            cross_kv=[Source(f"{p}.encoder_attn.{x}_proj") for x in "kv"],
            cross_o=[Source(f"{p}.encoder_attn.out_proj")]))
    block = Block(family="whisper", norm="layer", eps=decoder.layer_norm.eps,
                  residual="sequential", position="learned", mlp="plain",
                  activation=config.activation_function, heads=heads, kv_heads=heads,
                  head_dim=d, scaling=d ** -0.5, cross_attention=True)
    return ModelParts(block=block, embed=f"{prefix}.embed_tokens", layers=layers,
                      final_norm=_norm(decoder.layer_norm),
                      lm_head="proj_out",
                      pos_embed=f"{prefix}.embed_positions",
                      decoder_start=_decoder_start(model))


MAPPERS: dict[str, Callable[[Any], ModelParts]] = {
    **{family: _map_llama_like
       for family in ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "stablelm",
                      "mixtral")},
    "gptj": _map_gptj,
    "codegen": _map_gptj,
    "gpt_neox": _map_gpt_neox,
    "falcon": _map_falcon,
    "opt": _map_opt,
    "bloom": _map_bloom,
    "gpt_bigcode": _map_gpt_bigcode,
    "mpt": _map_mpt,
    "phi": _map_phi,
    "deepseek_v2": _map_deepseek,
    "deepseek_v3": _map_deepseek,
    "jamba": _map_jamba,
    "t5": _map_t5,
    "whisper": _map_whisper,
    "mllama_text_model": _map_mllama,
    "git": _map_git,
}
NATIVE_FAMILIES = tuple(MAPPERS)


def map_model(model: Any) -> ModelParts:
    """The model's block description and where each part lives; Unsupported if the family or
    one of its settings is outside what the native step implements."""
    family = model.config.model_type
    mapper = MAPPERS.get(family)
    if mapper is None:
        raise Unsupported(f"native backend does not cover family '{family}' yet "
                          f"(covered: {', '.join(NATIVE_FAMILIES)})")
    parts = mapper(model)
    if parts.block.activation not in ACTIVATIONS:
        raise Unsupported(f"{family}: activation {parts.block.activation} is not implemented")
    return parts


def source_weights(model: Any, sources: list[Source]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The float weight [N, K] and bias [N] (or None) that `sources` describe."""
    modules = dict(model.named_modules())
    weights, biases = [], []
    for source in sources:
        if source.expert is not None:
            weight, bias = model.get_parameter(source.module).detach()[source.expert], None
        else:
            module = modules[source.module]
            weight = module.weight.detach()
            bias = getattr(module, "bias", None)
            bias = None if bias is None else bias.detach()
        if source.rows is not None:
            weight = weight[source.rows]
            bias = None if bias is None else bias[source.rows]
        weights.append(weight)
        biases.append(bias)
    if all(b is None for b in biases):
        bias_out = None
    else:
        bias_out = torch.cat([b if b is not None else torch.zeros(w.shape[0], dtype=w.dtype)
                              for b, w in zip(biases, weights, strict=True)])
    weight_out = weights[0] if len(weights) == 1 else torch.cat(weights)
    return weight_out.contiguous(), bias_out


def expert_matrices(model: Any) -> dict[str, torch.Tensor]:
    """Every expert's matrix of the models blocks maps with 3-D expert tensors, by Source.name
    (what weight-only quantization quantizes besides the nn.Linear modules)."""
    try:
        parts = map_model(model)
    except Unsupported:
        return {}
    found = {}
    for layer in parts.layers:
        for gate_up, down in layer.experts:
            for source in (*gate_up, *down):
                found[source.name] = model.get_parameter(source.module).detach()[source.expert]
    return found


__all__ = ["ACTIVATIONS", "Block", "Experts", "LayerParts", "Latent", "MambaParts", "ModelParts",
           "NATIVE_FAMILIES", "Norm", "Source", "Unsupported", "expert_matrices", "map_model",
           "source_weights"]
