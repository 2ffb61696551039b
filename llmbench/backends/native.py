"""The native backend: what ipex.llm.optimize does, from upstream PyTorch and our own kernels.

For every family llmbench.backends.blocks describes (the block's parts: norm kind, residual
layout, positions, MLP and experts, attention or latent attention or Mamba, cross-attention;
the HF module tree mapped onto them once) it replaces transformers'
model by a plain one in the manner of gpt-fast, whose whole generation path reads top to bottom
here:

- weights are taken over once: fused QKV (every family's layout reordered to [q | k | v]) and
  gate/up projections, stored in the model's dtype
  (fp32 or bf16) and multiplied by llmbench.kernels, which stream the weights at close to the
  memory bandwidth for decode (M <= 16) and use torch's GEMM for prefill; activations are fp32,
  so bf16 weights never mean bf16 arithmetic on CPUs without it (only the logits are rounded to
  bf16, as stock's are, so both break near-ties alike and pick the same tokens); where the CPU
  has bf16 matrix math, bf16 prefills multiply in bf16 as stock's do (BF16_PREFILL_GEMM);
- those weights (and the quantized ones `map_linears` puts in) live in one arena on 2 MiB pages
  where the OS allows, in the order a decode step reads them (llmbench.memory: 4 KiB pages cost
  about a fifth of the bandwidth on short rows); the report says how much landed on huge pages;
- the KV cache is preallocated from prompt + output length; the prompt's keys and values are
  computed and stored once per sequence, not once per beam;
- beam search never copies the cache: each beam keeps a table of which cache slot holds its key
  at each generated position (IPEX's "indirect access KV cache"), and attention reads through it;
- `--kv-cache-dtype fp8_e5m2` stores keys and values in fp8;
- DeepSeek's latent attention caches one latent row per token (keys = values, stored once);
  jamba's Mamba layers keep a conv window and an SSM state per row instead of a KV cache;
  T5's encoder runs transformers' module once per prompt, and its keys/values for the
  decoder's cross-attention are computed then, once per sequence;
- a decode step is one call into the compiled extension (llmbench/kernels/csrc/decode_step.cpp:
  every layer's norms, RoPE, cache write, attention and residuals as plain loops around the
  weight-streaming kernels) when the kernels are built and every projection has a compiled
  kernel; otherwise the same step runs as torch ops here (`decode`), and the report says which.
  Batches of up to 16 rows run compiled: past the kernels' row limits (kernels.STREAM_M_MAX)
  its fp32 and bf16 projections (and --lowp-mode INT8 ones where the CPU has AMX-INT8) use
  torch's GEMM, as the torch-op step's do; more rows run the torch-op step, measured faster
  there (benchmarks/batch_sweep.py);
- prompt attention is torch's SDPA (flash kernel), in bf16 for bf16 models where the CPU has
  bf16 matrix math (as stock bf16 attends), else in fp32.

Families outside blocks.NATIVE_FAMILIES (or settings blocks.py does not implement) run stock,
and the report says why (`fallback_reason`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from llmbench import kernels, memory
from llmbench.backends import blocks
from llmbench.backends.blocks import ACTIVATIONS
from llmbench.backends.prepared import PreparedModel
from llmbench.environment import has_native_bf16
from llmbench.errors import UserError
from llmbench.kernels import int8_act

KV_CACHE_DTYPES = ("auto", "fp8_e5m2")
# generate() settings the native loop implements; anything else is refused, never ignored.
SUPPORTED_GENERATE_KEYS = {"input_ids", "attention_mask", "pad_token_id", "max_new_tokens",
                           "min_new_tokens", "do_sample", "num_beams", "stopping_criteria",
                           "streamer", "temperature", "top_k", "top_p", "eos_token_id",
                           "length_penalty", "early_stopping", "inputs_embeds",
                           "suppress_tokens", "begin_suppress_tokens", "cross_kv",
                           "cross_bias", "cross_rows", "prefix_len"}


# transformers' RMSNorm in fp32, one C++ call per norm (torch's F.rms_norm is not fused on CPU
# and costs ~70 us a call here; the formula in kernels.reference is six torch ops).
rms_norm = kernels.rms_norm


# Prefills of bf16 weights (more rows than the kernels stream) on CPUs with bf16 matrix math
# (AMX, AVX512-BF16, Arm BF16) run torch's bf16 GEMM on activations rounded to bf16, as stock
# bf16 does, instead of widening the weights to fp32 for an fp32 GEMM. Measured on a Xeon with
# AMX, 2 threads, SmolLM2-135M's linears at 32 rows: 28 ms against 67 ms. Elsewhere bf16 GEMM is
# emulated and slower than the widening, so it stays fp32 there. Kernels forced onto the avx2 or
# generic path (LLMBENCH_KERNELS_ISA) stand for a CPU without bf16 math, whose prefill this then
# runs (the AVX2 comparisons in docs/performance.md: before, they timed the bf16-math prefill's
# Python layers on the AVX2 kernels, which no CPU runs).
BF16_PREFILL_GEMM = has_native_bf16() and not kernels.path_without_matrix_units()


def prefill_matmul() -> str:
    """How bf16 weights multiply prompt-length activations here (for the report)."""
    if BF16_PREFILL_GEMM and kernels.amx_bf16_takes(2, 64):
        return ("bf16 GEMM on AMX-BF16 tiles (llmbench kernels) up to 256 rows, torch's above: "
                "activations rounded to bf16, fp32 sums, fp32 residual")
    if BF16_PREFILL_GEMM:
        return "bf16 GEMM (CPU has bf16 matrix math): activations rounded to bf16, fp32 residual"
    if has_native_bf16():
        return f"fp32 GEMM on weights widened from bf16 (kernels forced onto {kernels.isa()})"
    return "fp32 GEMM on weights widened from bf16 (CPU lacks bf16 matrix math)"


class Linear:
    """y = x @ W.T (+ b) with W kept in its storage dtype; x and y are fp32."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        self.weight = weight.contiguous()
        self.bias = None if bias is None else bias.detach().float().contiguous()
        self.bias_bf16 = None
        if self.weight.dtype == torch.float32:
            self.kernel = kernels.linear_f32
        elif self.weight.dtype == torch.bfloat16:
            self.kernel = kernels.linear_bf16w
            self.bias_bf16 = None if bias is None else self.bias.bfloat16()
        else:
            raise UserError(f"native backend: no kernel for {self.weight.dtype} weights")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.bf16_gemm(x):
            if self._amx_bf16(x):  # already fp32 holding bf16 values
                return self._amx_out(x)
            return self.bf16_out(x).float()
        return self.kernel(x.float(), self.weight, self.bias)

    def _amx_bf16(self, x: torch.Tensor) -> bool:
        """Whether the bf16 GEMM runs on our AMX-BF16 tiles (kernels_amx.cpp): the same
        products and fp32 sums as torch's bf16 GEMM, without its per-call weight reorder
        (SmolLM2's 30 layers at 32 rows: 29.4 -> 16.9 ms, outputs identical here)."""
        return kernels.amx_bf16_takes(x.numel() // x.shape[-1], self.weight.shape[1])

    def _amx_out(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias_bf16 is None else self.bias_bf16.float()
        return kernels.compiled().amx_linear_bf16(x.float(), self.weight, bias)

    def bf16_gemm(self, x: torch.Tensor) -> bool:
        """Whether x multiplies on the bf16 GEMM (BF16_PREFILL_GEMM): above the kernels' row
        limit, or from 2 rows where our AMX-BF16 tiles run it (SmolLM2's 30 layers, 2
        threads: 2 rows 10.8 ms against 15.6 on the kernels, 8 rows 11.8 against 29.0)."""
        if self.weight.dtype != torch.bfloat16 or not BF16_PREFILL_GEMM:
            return False
        rows = 1 if self._amx_bf16(x) else kernels.STREAM_M_MAX["bf16"]
        return x.numel() > rows * x.shape[-1]

    def bf16_out(self, x: torch.Tensor) -> torch.Tensor:
        """The bf16 GEMM's output as it comes, in bf16 (for a caller that stays in bf16)."""
        if self._amx_bf16(x):
            return self._amx_out(x).bfloat16()
        return F.linear(x.bfloat16(), self.weight, self.bias_bf16)

    @property
    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()


@dataclass
class Expert:
    gate_up: Any
    down: Any


@dataclass
class Mamba:
    """A jamba Mamba mixer (blocks.MambaParts) over native projections."""

    in_proj: Any
    x_proj: Any
    dt_proj: Any
    out_proj: Any
    conv_weight: torch.Tensor  # [inner, width]
    conv_bias: torch.Tensor | None
    a: torch.Tensor  # [inner, state]
    d: torch.Tensor
    dt_norm: torch.Tensor
    b_norm: torch.Tensor
    c_norm: torch.Tensor
    dt_rank: int
    state: int

    PROJECTIONS = ("in_proj", "x_proj", "dt_proj", "out_proj")


class MambaState:
    """One Mamba layer's recurrent state per row (batch x beams rows): the last width-1 conv
    inputs [rows, inner, width-1] and the SSM state [rows, inner, state]. The prompt's state is
    written to every beam of its sequence; after a beam reorder the rows are gathered in place
    (the buffers stay where the compiled step was pointed; they are small: no table)."""

    def __init__(self, mamba: Mamba, rows: int) -> None:
        inner, width = mamba.conv_weight.shape
        self.conv = torch.zeros(rows, inner, width - 1)
        self.ssm = torch.zeros(rows, inner, mamba.state)

    def select(self, rows: torch.Tensor) -> None:
        self.conv.copy_(self.conv[rows])
        self.ssm.copy_(self.ssm[rows])


@dataclass
class Layer:
    attn_norm: torch.Tensor
    qkv: Any  # Linear, or a quantized linear put in by map_linears
    o: Any
    mlp_norm: torch.Tensor | None  # None: parallel block, the MLP reads the attention's norm
    gate_up: Any  # [gate | up] for a gated MLP, the input projection of a plain one
    down: Any  # (gate_up and down are None in a mixture-of-experts layer)
    attn_norm_bias: torch.Tensor | None = None  # LayerNorm biases
    mlp_norm_bias: torch.Tensor | None = None
    q_norm: torch.Tensor | None = None  # qwen3 normalizes each head's q and k
    k_norm: torch.Tensor | None = None
    router: Any = None  # MoE: a float Linear [experts, hidden]
    router_bias: torch.Tensor | None = None  # DeepSeek-V3: added to scores to choose experts
    experts: list[Expert] = field(default_factory=list)
    shared: Expert | None = None  # DeepSeek: shared experts, run for every token
    # Multi-head latent attention (blocks.Latent): q's bottleneck projection and norms, and
    # kv_b absorbed into fp32 per-head matrices: w_uk [heads, nope, kv_rank] (keys),
    # w_uv [heads, v_dim, kv_rank] (values).
    q_b: Any = None
    q_a_norm: torch.Tensor | None = None
    kv_a_norm: torch.Tensor | None = None
    w_uk: torch.Tensor | None = None
    w_uv: torch.Tensor | None = None
    mamba: Mamba | None = None  # jamba's Mamba layers (qkv and o are None there)
    cross_norm: torch.Tensor | None = None  # T5, Whisper: attention to the encoder's states
    cross_norm_bias: torch.Tensor | None = None
    cross_q: Any = None
    cross_kv: Any = None  # run once per prompt, on the encoder's states
    cross_o: Any = None
    cross_q_norm: torch.Tensor | None = None  # mllama: per-head RMSNorm of the cross q and k
    cross_k_norm: torch.Tensor | None = None
    gates: tuple[float, float] | None = None  # mllama: a gated cross-attention layer

    def projections(self, index: int) -> list[tuple[str, Any, str]]:
        """(name, owner, attribute) of every projection a step may read, in step order; names
        are "layers.<i>.<qkv|q_b|o|gate_up|down>", "layers.<i>.experts.<e>.<gate_up|down>"
        and "layers.<i>.shared.<gate_up|down>"."""
        found = [(f"layers.{index}.{attr}", self, attr)
                 for attr in ("qkv", "q_b", "o", "cross_q", "cross_kv", "cross_o", "gate_up",
                              "down")
                 if getattr(self, attr) is not None]
        for e, expert in enumerate(self.experts):
            found += [(f"layers.{index}.experts.{e}.{attr}", expert, attr)
                      for attr in ("gate_up", "down")]
        if self.shared is not None:
            found += [(f"layers.{index}.shared.{attr}", self.shared, attr)
                      for attr in ("gate_up", "down")]
        if self.mamba is not None:
            found = [(f"layers.{index}.mamba.{attr}", self.mamba, attr)
                     for attr in Mamba.PROJECTIONS] + found
        return found


# Formats the compiled decode step runs, in llmbench.kernels' numbering (csrc/common.h Fmt).
_FMT_F32, _FMT_BF16, _FMT_I8, _FMT_I4 = 0, 1, 2, 3


def kernel_spec(projection: Any) -> dict[str, Any] | None:
    """The compiled decode step's arguments for one projection, or None when it has no
    compiled kernel (NF4/FP8, or projections SmoothQuant couldn't fuse): then the Python step
    runs."""
    kind = getattr(projection, "kind", None)
    if isinstance(projection, Linear) or kind == "float":  # "float": SmoothQuant's fallbacks
        fmt = _FMT_F32 if projection.weight.dtype == torch.float32 else _FMT_BF16
        return {"fmt": fmt, "w": projection.weight, "bias": projection.bias}
    if kind == "w8a8":  # SmoothQuant: int8 activations at the calibrated static scale
        inner = projection.inner
        return {"fmt": _FMT_I8, "w": inner.qweight, "scales": inner.scales, "zeros": None,
                "bias": inner.bias, "act_qmax": 127.0, "act_scale": projection.act_scale}
    if kind == "int8":
        return {"fmt": _FMT_I8, "w": projection.qweight, "scales": projection.scales,
                "zeros": projection.zeros, "bias": projection.bias,
                "act_qmax": float(projection.act_qmax), **_act_levels_spec(projection)}
    if kind == "int4":
        return {"fmt": _FMT_I4, "w": projection.packed, "scales": projection.scales,
                "zeros": projection.zeros, "group_size": projection.group_size,
                "bias": projection.bias, "in_features": projection.in_features,
                "perm": projection.perm, **_act_levels_spec(projection)}
    return None


def _act_levels_spec(projection: Any) -> dict[str, Any]:
    spec = getattr(projection, "act_levels", None)
    if spec is None:
        return {}
    return {"act_levels": True, "act_per_tensor": spec.per_tensor, "act_sym": spec.sym,
            "act_block": spec.block}


class KVCache:
    """One layer's keys and values: the prompt's once per sequence [B, kv, P, d], the generated
    tokens' per beam slot [B*beams, kv, N, d]. With one beam both are views of one buffer
    [B, kv, P+N, d], so a decode step attends over a plain prefix of it. With several,
    `BeamHistory.table[r, j]` is the slot whose entry at generated position j belongs to beam
    row r, so reordering beams rewrites that small table instead of the cache. With
    `shared_values` (MLA's latent rows are both key and value) v is k: stored once."""

    def __init__(self, batch: int, beams: int, kv_heads: int, head_dim: int, prompt_len: int,
                 new_tokens: int, dtype: torch.dtype, shared_values: bool = False) -> None:
        self.dtype = dtype
        # Encoder-decoder: the encoder's keys and values [B, heads, E, d] (NativeModel._encode).
        self.cross_k: torch.Tensor | None = None
        self.cross_v: torch.Tensor | None = None
        self.cross_bias: torch.Tensor | None = None  # mllama's tile mask (attach_cross_kv)
        self.cross_rows: torch.Tensor | None = None

        def values_of(keys: torch.Tensor) -> torch.Tensor:
            return keys if shared_values else torch.zeros_like(keys)

        if beams == 1:
            self.k = torch.zeros(batch, kv_heads, prompt_len + new_tokens, head_dim, dtype=dtype)
            self.v = values_of(self.k)
            self.prompt_k, self.gen_k = self.k[:, :, :prompt_len], self.k[:, :, prompt_len:]
            self.prompt_v, self.gen_v = self.v[:, :, :prompt_len], self.v[:, :, prompt_len:]
        else:
            self.prompt_k = torch.zeros(batch, kv_heads, prompt_len, head_dim, dtype=dtype)
            self.prompt_v = values_of(self.prompt_k)
            self.gen_k = torch.zeros(batch * beams, kv_heads, new_tokens, head_dim, dtype=dtype)
            self.gen_v = values_of(self.gen_k)


class BeamHistory:
    """The indirection table shared by all layers' caches."""

    def __init__(self, rows: int, new_tokens: int, indirect: bool, prompt_len: int) -> None:
        self.indirect = indirect
        self.prompt_len = prompt_len
        self.table = torch.arange(rows).unsqueeze(1).repeat(1, new_tokens)
        self.length = 0  # generated positions stored so far

    def reorder(self, parents: torch.Tensor) -> None:
        # Beam row r now continues beam parents[r]: it inherits that beam's history.
        self.table[:, : self.length] = self.table[parents, : self.length]


class NativeModel:
    """Any decoder that llmbench.backends.blocks describes, over our kernels, with a generate()
    for the benchmark loop."""

    def __init__(self, hf_model: Any, kv_cache_dtype: str, stream: Any = None) -> None:
        """stream: for a model loaded layer by layer (llmbench.distributed.native_load), what
        fills each layer's weights just before the layer is taken (`before`), and gets the
        layer just after (`after`: quantize, cut and free it); None: every weight is there."""
        parts = blocks.map_model(hf_model)  # raises blocks.Unsupported
        block = parts.block
        config = hf_model.config
        self.config = config
        self.block = block
        self.generation_config = hf_model.generation_config
        modules = dict(hf_model.named_modules())
        self.rope_tables = parts.rope_tables
        self.head_dim = block.head_dim
        self.scaling = block.scaling
        self.heads = block.heads
        self.kv_heads = block.kv_heads
        self.eps = block.eps
        self.sliding_window = block.sliding_window
        self.alibi_slopes = parts.alibi_slopes
        self.relative_bias = parts.relative_bias
        # Encoder-decoder: the encoder stays transformers' module, run once per prompt.
        self.encoder = None if parts.encoder is None else modules[parts.encoder]
        self.stock_modules = {} if parts.encoder is None else {parts.encoder: self.encoder}
        self.decoder_start = parts.decoder_start
        self.logit_scale = parts.logit_scale
        self.embed = modules[parts.embed].weight.detach()
        self.weight_dtype = self.embed.dtype
        # auto: the activations' dtype (fp32), so attention reads the cache without converting.
        self.kv_dtype = {"auto": torch.float32, "fp8_e5m2": torch.float8_e5m2}[kv_cache_dtype]
        # Gemma multiplies the embedding by sqrt(hidden), a scalar in the weights' dtype.
        self.embed_scale = parts.embed_scale
        self.embed_norm = parts.embed_norm
        self.pos_embed = (None if parts.pos_embed is None
                          else modules[parts.pos_embed].weight.detach())
        self.pos_offset = parts.pos_offset
        # This generate() call's shift of learned positions: GIT's count the prompt's text
        # tokens only, not the image rows that lead it (-prefix_len).
        self._pos_shift = 0
        self.final_norm = None if parts.final_norm is None else parts.final_norm.weight
        self.final_norm_bias = None if parts.final_norm is None else parts.final_norm.bias
        self.post_norm = block.residual == "post"
        # Which HF rows make each projection (install_native quantizes through the same map).
        self.sources: dict[str, list[blocks.Source]] = {}
        self.layers = []
        for index, layer_parts in enumerate(parts.layers):
            sources = layer_parts.sources() if stream is not None else []
            if stream is not None:
                stream.before(sources)
            layer = self._take_layer(hf_model, index, layer_parts)
            if stream is not None:
                stream.after(self, index, layer, sources)
            self.layers.append(layer)
        lm_head = modules[parts.lm_head]
        self.sources["lm_head"] = [blocks.Source(parts.lm_head)]
        if stream is not None:
            stream.before(self.sources["lm_head"])
        self.lm_head = Linear(lm_head.weight.detach(),
                              None if lm_head.bias is None else lm_head.bias.detach())
        self.tied = lm_head.weight.data_ptr() == self.embed.data_ptr()
        self.activation = block.activation
        first = self.layers[0]
        down = first.down if first.down is not None else first.experts[0].down
        # (quantized already, and cut, when a stream loaded it)
        self.intermediate = getattr(down, "in_features", None) or down.weight.shape[1]
        # False runs every decode step as torch ops (tests and benchmarks compare the two).
        self.use_compiled_step = True
        # False keeps bound prompts on the Python prefill too (A/B runs: compiled_prefill()).
        self.use_compiled_prefill = True
        self._plan: Any = None  # the compiled decode step, built on first use
        self._plan_note = ""
        self._prefill_rows: int | None = None  # the compiled prefill's row limit (None: any)
        # generate()'s last caches and RoPE tables by shape, reused by the next call of that
        # shape (_generate_caches, _rope_tables)
        self._cache_pool: tuple[tuple[int, ...], list[Any]] | None = None
        self._rope_memo: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._bound = False  # the plan holds this generate() call's caches
        self.placement: dict[str, Any] = {}  # place_weights' record, for the report
        # Tensor parallel (backends.tensor_parallel.shard): how this rank all-reduces, and the
        # vocabulary (size, first, end) of its lm_head slice; None for one process.
        self.comm: Any = None
        self.vocab: tuple[int, int, int] | None = None
        # The KV head each query head reads, where a rank's query heads are not whole groups
        # (tensor_parallel.shard); None: heads // kv_heads per KV head.
        self.kv_map: list[int] | None = None
        self._kv_index: torch.Tensor | None = None  # kv_map as an index
        self.all_reduce_seconds = 0.0  # Python-side all-reduces (prefill, logits gathers)
        self.all_reduce_calls = 0

    def _take_layer(self, hf_model: Any, index: int, parts: blocks.LayerParts) -> Layer:
        def take(name: str, sources: list[blocks.Source] | None) -> Linear | None:
            if sources is None:
                return None
            self.sources[name] = sources
            return Linear(*blocks.source_weights(hf_model, sources))

        projections = {attr: take(f"layers.{index}.{attr}", getattr(parts, attr))
                       for attr in ("qkv", "o", "gate_up", "down", "cross_q", "cross_kv",
                                    "cross_o")}
        experts = [Expert(take(f"layers.{index}.experts.{e}.gate_up", gate_up),
                          take(f"layers.{index}.experts.{e}.down", down))
                   for e, (gate_up, down) in enumerate(parts.experts)]
        router = (None if parts.router is None
                  else Linear(*blocks.source_weights(hf_model, parts.router)))
        shared = (None if parts.shared is None
                  else Expert(take(f"layers.{index}.shared.gate_up", parts.shared[0]),
                              take(f"layers.{index}.shared.down", parts.shared[1])))
        mlp_norm = parts.mlp_norm
        mamba = None
        if parts.mamba is not None:
            m = parts.mamba
            mamba = Mamba(**{attr: take(f"layers.{index}.mamba.{attr}", getattr(m, attr))
                             for attr in Mamba.PROJECTIONS},
                          conv_weight=m.conv_weight, conv_bias=m.conv_bias, a=m.a, d=m.d,
                          dt_norm=m.dt_norm, b_norm=m.b_norm, c_norm=m.c_norm,
                          dt_rank=m.dt_rank, state=m.state)
        layer = Layer(attn_norm=parts.attn_norm.weight, attn_norm_bias=parts.attn_norm.bias,
                      mlp_norm=None if mlp_norm is None else mlp_norm.weight,
                      mlp_norm_bias=None if mlp_norm is None else mlp_norm.bias,
                      q_norm=parts.q_norm, k_norm=parts.k_norm, router=router,
                      router_bias=parts.router_bias, experts=experts, shared=shared,
                      q_b=take(f"layers.{index}.q_b", parts.q_b), q_a_norm=parts.q_a_norm,
                      kv_a_norm=parts.kv_a_norm, mamba=mamba,
                      cross_norm=None if parts.cross_norm is None else parts.cross_norm.weight,
                      cross_norm_bias=None if parts.cross_norm is None else parts.cross_norm.bias,
                      cross_q_norm=parts.cross_q_norm, cross_k_norm=parts.cross_k_norm,
                      gates=parts.gates,
                      **projections)
        if parts.kv_b is not None:
            self.sources[f"layers.{index}.kv_b"] = parts.kv_b
            self._absorb(layer, blocks.source_weights(hf_model, parts.kv_b)[0])
        return layer

    def _absorb(self, layer: Layer, kv_b: torch.Tensor) -> None:
        """MLA: split kv_b [heads * (nope + v), kv_rank] into the per-head matrices the
        absorbed attention multiplies by (fp32, from the weights as stored or dequantized)."""
        latent = self.block.latent
        per_head = kv_b.float().view(self.heads, latent.nope_dim + latent.v_dim, -1)
        layer.w_uk = per_head[:, : latent.nope_dim].contiguous()
        layer.w_uv = per_head[:, latent.nope_dim:].contiguous()

    def map_linears(self, convert: Callable[[str, Linear], Any]) -> None:
        """Replace each projection by convert(name, linear), e.g. a quantized one: anything with
        __call__(x fp32 [M, K]) -> fp32 [M, N] and an `nbytes` property fits. Names are
        Layer.projections' names and "lm_head" (MoE routers stay float)."""
        for index, layer in enumerate(self.layers):
            self.map_layer(index, layer, convert)
        self.lm_head = convert("lm_head", self.lm_head)
        self.place_weights()

    def map_layer(self, index: int, layer: Layer, convert: Callable[[str, Linear], Any]) -> None:
        """map_linears for one layer (a model loaded layer by layer converts each as it comes)."""
        for name, owner, attr in layer.projections(index):
            setattr(owner, attr, convert(name, getattr(owner, attr)))
        if layer.w_uk is not None:  # MLA's kv_b: absorbed from what quantization made of it
            kv_b = torch.cat((layer.w_uk, layer.w_uv), dim=1).flatten(0, 1)
            converted = convert(f"layers.{index}.kv_b", Linear(kv_b))
            self._absorb(layer, converted.dequantize() if hasattr(converted, "dequantize")
                         else converted.weight)

    def place_weights(self) -> None:
        """Copy the decode weights into one huge-page arena, in the order a step reads them
        (llmbench.memory says why); the projections and the embedding then point into it."""
        self._plan, self._plan_note = None, ""  # rebuilt over the moved weights
        self.placement = memory.place_in_arena([*self.layers, self.lm_head, self])

    # ---- the compiled decode step -----------------------------------------------------------

    def _compiled_plan(self) -> Any:
        """The extension's DecodePlan over this model's weights, or None (reason in
        self._plan_note)."""
        if self._plan is not None or self._plan_note:
            return self._plan
        projections = [("lm_head", self.lm_head)]
        for i, layer in enumerate(self.layers):
            projections += [(name, getattr(owner, attr))
                            for name, owner, attr in layer.projections(i)]
            if layer.router is not None:
                projections.append((f"layers.{i}.router", layer.router))
        specs = {name: kernel_spec(p) for name, p in projections}
        # Prompts of more rows than the quantized kernels take: the Python layers dequantize
        # to torch's GEMM there, which the C++ prefill's projections would not (SmolLM2, 1024
        # tokens, one noisy evening: INT4 3.7 s on the C++ path against 2.0, INT8 2.0 against
        # 1.7).
        def row_limit(spec: dict[str, Any]) -> int:
            if spec["fmt"] == _FMT_I8:
                return kernels.STREAM_M_MAX["int8"]
            return kernels.int4_stream_rows(bool(spec.get("act_levels") and spec.get("act_sym")))

        self._prefill_rows = min((row_limit(spec) for spec in specs.values()
                                  if spec and spec["fmt"] in (_FMT_I8, _FMT_I4)), default=None)
        missing = [name for name, spec in specs.items() if spec is None]
        if not kernels.available() or not hasattr(kernels.compiled(), "DecodePlan"):
            self._plan_note = "python step: the compiled kernels are not built"
        elif missing:
            kind = getattr(dict(projections)[missing[0]], "kind", "?")
            self._plan_note = (f"python step: {missing[0]} ({kind}) has no compiled kernel")
        if self._plan_note:
            return None
        block = self.block
        embed_norm = self.embed_norm
        plan = kernels.compiled().DecodePlan(
            hidden=self.embed.shape[1], heads=self.heads, kv_heads=self.kv_heads,
            head_dim=self.head_dim, intermediate=self.intermediate, eps=float(self.eps),
            scaling=float(self.scaling), embed=self.embed.contiguous(),
            final_norm=self.final_norm, embed_scale=self.embed_scale or 1.0,
            activation=ACTIVATIONS[self.activation],
            round_logits_bf16=self.weight_dtype != torch.float32,
            layer_norm=block.norm == "layer", final_norm_bias=self.final_norm_bias,
            parallel=block.residual == "parallel", gated=block.mlp == "gated",
            alibi_slopes=self.alibi_slopes,
            pos_embed=None if self.pos_embed is None else self.pos_embed.float().contiguous(),
            pos_offset=self.pos_offset,
            embed_norm=None if embed_norm is None else embed_norm.weight,
            embed_norm_bias=None if embed_norm is None else embed_norm.bias,
            post_norm=self.post_norm, kv_map=self.kv_map or [])
        index = {name: plan.add_linear(**spec) for name, spec in specs.items()}
        routing = block.experts
        latent = block.latent
        if latent is not None:
            plan.set_latent(q_rank=latent.q_rank, kv_rank=latent.kv_rank, nope=latent.nope_dim,
                            rope=latent.rope_dim, v_dim=latent.v_dim, eps=latent.norm_eps)
        if self.logit_scale is not None:
            plan.set_logit_scale(self.logit_scale)
        if routing is not None:
            plan.set_routing(sigmoid=routing.scoring == "sigmoid", groups=routing.groups,
                             top_groups=routing.top_groups,
                             group_top2=routing.group_score == "top2", scale=routing.scale)
        for i, layer in enumerate(self.layers):
            moe = layer.router is not None
            shared = layer.shared is not None
            plan.add_layer(
                layer.attn_norm, layer.mlp_norm, layer.q_norm, layer.k_norm,
                index.get(f"layers.{i}.qkv", -1), index.get(f"layers.{i}.o", -1),
                -1 if moe else index[f"layers.{i}.gate_up"],
                -1 if moe else index[f"layers.{i}.down"],
                attn_norm_bias=layer.attn_norm_bias, mlp_norm_bias=layer.mlp_norm_bias,
                router=index[f"layers.{i}.router"] if moe else -1,
                expert_gate_up=[index[f"layers.{i}.experts.{e}.gate_up"]
                                for e in range(len(layer.experts))],
                expert_down=[index[f"layers.{i}.experts.{e}.down"]
                             for e in range(len(layer.experts))],
                top_k=routing.top_k if moe else 0,
                normalize=bool(moe and routing.normalize), router_bias=layer.router_bias,
                shared_gate_up=index[f"layers.{i}.shared.gate_up"] if shared else -1,
                shared_down=index[f"layers.{i}.shared.down"] if shared else -1,
                q_b=index[f"layers.{i}.q_b"] if layer.q_b is not None else -1,
                q_a_norm=layer.q_a_norm, kv_a_norm=layer.kv_a_norm, w_uk=layer.w_uk,
                w_uv=layer.w_uv, cross_norm=layer.cross_norm, cross_norm_bias=layer.cross_norm_bias,
                cross_q_norm=layer.cross_q_norm, gated=layer.gates is not None,
                gate_attn=layer.gates[0] if layer.gates else 0.0,
                gate_mlp=layer.gates[1] if layer.gates else 0.0,
                cross_q=index[f"layers.{i}.cross_q"] if layer.cross_q is not None else -1,
                cross_o=index[f"layers.{i}.cross_o"] if layer.cross_o is not None else -1)
            if layer.mamba is not None:
                m = layer.mamba
                plan.set_mamba(**{attr: index[f"layers.{i}.mamba.{attr}"]
                                  for attr in Mamba.PROJECTIONS},
                               conv_weight=m.conv_weight, conv_bias=m.conv_bias, a=m.a, d=m.d,
                               dt_norm=m.dt_norm, b_norm=m.b_norm, c_norm=m.c_norm)
        plan.set_lm_head(index["lm_head"])
        # Batched decode: above the rows where the Python step's linears hand fp32 / bf16
        # weights to torch's GEMM, the compiled step does too (same numerics either way).
        plan.set_gemm_rows(kernels.STREAM_M_MAX["f32"], kernels.STREAM_M_MAX["bf16"],
                           BF16_PREFILL_GEMM,
                           int8_act.gemm_rows() if int8_act.INT8_GEMM else -1)
        if self.comm is not None:
            plan.set_all_reduce(self.comm.op, None if self.comm.op else self.comm.all_reduce)
        self._plan = plan
        bf16_rows = ("bf16 of 2 rows or more on AMX-BF16 tiles" if BF16_PREFILL_GEMM
                     and kernels.amx_bf16_takes(2, 64) else
                     f"bf16 of more than {kernels.STREAM_M_MAX['bf16']} rows on torch's GEMM")
        self._plan_note = (f"compiled C++ step ({kernels.isa()}) for up to "
                           f"{kernels.SMALL_M_MAX} rows (fp32 projections of more than "
                           f"{kernels.STREAM_M_MAX['f32']} rows on torch's GEMM, {bf16_rows}); "
                           "python step beyond")
        return plan

    def runtime_details(self) -> dict[str, Any]:
        """What the report should say about how decode steps run."""
        placement = {"weight_placement": memory.placement_summary(self.placement)}
        if self.comm is not None:
            placement["tensor_parallel"] = {"rank": self.comm.rank, "world": self.comm.world,
                                            "all_reduce": self.comm.description,
                                            **getattr(self, "tp_split", {})}
        if not self.use_compiled_step:
            return {"decode_step": "python step (compiled step switched off)",
                    "prefill": "python layers (compiled step switched off)", **placement}
        self._compiled_plan()
        return {"decode_step": self._plan_note, "prefill": self._prefill_note(), **placement}

    def _prefill_note(self) -> str:
        """How prompts run, for the report (see compiled_prefill)."""
        if self.compiled_prefill():
            rows = ("" if self._prefill_rows is None else
                    f", prompts of up to {self._prefill_rows} rows (the quantized kernels' limit)")
            return (f"compiled C++ prefill (the decode step's layers over the prompt's rows) "
                    f"where generate() binds the compiled step (up to {kernels.SMALL_M_MAX} "
                    f"sequences x beams{rows}); python layers beyond and for prompt embeddings")
        if self._plan is None:
            return "python layers (no compiled step)"
        if not self.use_compiled_prefill:
            return "python layers (compiled prefill switched off)"
        if not self._plan.prefill_supported():
            return ("python layers (the compiled prefill has no position bias, latent "
                    "attention, Mamba, cross-attention or post-norm layers)")
        return "python layers (bf16 activations between ops, as stock bf16 computes them)"

    def _all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Tensor parallel: the sum over ranks of this rank's partial x, in place; x as it is
        for one process."""
        if self.comm is None:
            return x
        start = time.perf_counter()
        x = x.contiguous()
        self.comm.all_reduce(x)
        self.all_reduce_seconds += time.perf_counter() - start
        self.all_reduce_calls += 1
        return x

    def take_all_reduce_time(self) -> tuple[float, int]:
        """(seconds, calls) of all-reduce since the last call, the compiled step's and the
        Python path's together; resets both."""
        seconds, calls = self.all_reduce_seconds, self.all_reduce_calls
        self.all_reduce_seconds, self.all_reduce_calls = 0.0, 0
        if self._plan is not None and self.comm is not None:
            step_seconds, step_calls = self._plan.take_all_reduce_time()
            seconds, calls = seconds + step_seconds, calls + step_calls
        return seconds, calls

    def _gather_logits(self, logits: torch.Tensor) -> torch.Tensor:
        if self.comm is None:
            return logits
        vocab, first, last = self.vocab
        full = torch.zeros(logits.shape[0], vocab, dtype=logits.dtype)
        full[:, first:last] = logits
        return self._all_reduce(full)

    @property
    def weight_bytes(self) -> int:
        """Bytes one decode step of one sequence reads: every projection, but of a sparse MLP
        the router and the top-k experts it routes to (all experts of a layer are one size)."""
        total = self.lm_head.nbytes
        for index, layer in enumerate(self.layers):
            # (Mamba's: below; T5's cross_kv runs once per prompt, not per token)
            dense = [getattr(owner, attr) for _, owner, attr in layer.projections(index)
                     if (owner is layer or owner is layer.shared) and attr != "cross_kv"]
            total += sum(p.nbytes for p in dense)
            if layer.w_uk is not None:  # MLA's absorbed kv_b
                total += layer.w_uk.nbytes + layer.w_uv.nbytes
            if layer.mamba is not None:
                m = layer.mamba
                total += sum(getattr(m, attr).nbytes for attr in Mamba.PROJECTIONS)
                total += m.conv_weight.nbytes + m.a.nbytes + m.d.nbytes
            if layer.experts:
                per_expert = layer.experts[0].gate_up.nbytes + layer.experts[0].down.nbytes
                total += layer.router.nbytes + self.block.experts.top_k * per_expert
        return total

    # ---- the forward pass -------------------------------------------------------------------

    def _rope_tables(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [length, rotary_dim]; zero-width for families without RoPE, so the same
        code (and the compiled step) runs them with nothing to rotate."""
        if self.rope_tables is None:
            empty = torch.zeros(length, 0)
            return empty, empty.clone()
        # Memoized by length (dynamic RoPE scaling makes the tables depend on it, so no
        # slicing of longer ones); callers only read them.
        if length not in self._rope_memo:
            if len(self._rope_memo) >= 4:
                self._rope_memo.clear()
            self._rope_memo[length] = self.rope_tables(length)
        return self._rope_memo[length]

    def _norm(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
        if self.block.norm == "rms":
            return rms_norm(x, weight, self.eps)
        return F.layer_norm(x, (x.shape[-1],), weight, bias, self.eps)

    def _attention_input(self, layer: Layer, h: torch.Tensor) -> torch.Tensor:
        """What a layer's attention reads: norm(h), or h itself in a post-norm block."""
        return h if self.post_norm else self._norm(h, layer.attn_norm, layer.attn_norm_bias)

    def _qkv(self, layer: Layer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """normed x [R, S, H] -> q [R, heads, S, d], k and v [R, kv, S, d], rope applied."""
        if self.block.latent is not None:
            return self._latent_qkv(layer, x, cos, sin)
        rows, seq, _ = x.shape
        qkv = layer.qkv(x.reshape(rows * seq, -1))
        d = self.head_dim
        if layer.q_norm is None and cos.shape[-1]:  # RoPE in place: one call for q and k
            kernels.rope_qk_(qkv, cos, sin, self.heads, self.kv_heads, d)
        q, k, v = qkv.split([self.heads * d, self.kv_heads * d, self.kv_heads * d], dim=-1)
        q = q.view(rows, seq, self.heads, d).transpose(1, 2)
        k = k.view(rows, seq, self.kv_heads, d).transpose(1, 2)
        v = v.view(rows, seq, self.kv_heads, d).transpose(1, 2)
        if layer.q_norm is not None:  # qwen3: each head's q and k normalized before RoPE
            q = kernels.reference.rope(rms_norm(q, layer.q_norm, self.eps), cos, sin)
            k = kernels.reference.rope(rms_norm(k, layer.k_norm, self.eps), cos, sin)
        return q, k, v

    def _latent_qkv(self, layer: Layer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """MLA, absorbed: normed x [R, S, H] -> q [R, heads, S, d] and one key/value head
        [R, 1, S, d] with d = rope_dim + kv_rank: key = value = [rotated k_rope | normed c];
        q = [rotated q_rope | q_nope W_uk]. (The value's rotary part is dropped after the
        attention, in _block_output.)"""
        latent = self.block.latent
        rows, seq, _ = x.shape
        fused = layer.qkv(x.reshape(rows * seq, -1))
        kv_width = latent.rope_dim + latent.kv_rank
        q, kv = fused.split([fused.shape[-1] - kv_width, kv_width], dim=-1)
        if layer.q_b is not None:
            q = layer.q_b(rms_norm(q.contiguous(), layer.q_a_norm, latent.norm_eps))
        q = q.view(rows, seq, self.heads, -1).transpose(1, 2)
        q_rope, q_nope = q.split([latent.rope_dim, latent.nope_dim], dim=-1)
        k_rope, c = kv.view(rows, 1, seq, kv_width).split([latent.rope_dim, latent.kv_rank], -1)
        c = rms_norm(c.contiguous(), layer.kv_a_norm, latent.norm_eps)
        rope = kernels.reference.rope
        q = torch.cat((rope(q_rope, cos, sin), torch.matmul(q_nope, layer.w_uk)), dim=-1)
        k = torch.cat((rope(k_rope, cos, sin), c), dim=-1)
        return q, k, k

    def _mlp(self, layer: Layer, x: torch.Tensor) -> torch.Tensor:
        if layer.router is not None:
            return self._experts(layer, x)
        return self._dense_mlp(layer.gate_up, layer.down, x)

    def _experts(self, layer: Layer, x: torch.Tensor) -> torch.Tensor:
        """x [N, H]: each row through its top-k experts, summed by gate weight in ascending
        expert order (as transformers adds them up)."""
        weights, chosen = self._route(layer, x)
        out = torch.zeros_like(x)
        for e in chosen.unique().tolist():
            rows, slot = (chosen == e).nonzero(as_tuple=True)
            expert = layer.experts[e]
            y = self._dense_mlp(expert.gate_up, expert.down, x[rows])
            out.index_add_(0, rows, y * weights[rows, slot, None])
        if layer.shared is not None:
            out = out + self._dense_mlp(layer.shared.gate_up, layer.shared.down, x)
        return out

    def _route(self, layer: Layer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, H] -> (weights, experts) [N, top_k], as blocks.Experts describes."""
        routing = self.block.experts
        logits = layer.router(x)
        scores = (torch.softmax(logits, dim=-1) if routing.scoring == "softmax"
                  else torch.sigmoid(logits))
        choice = scores if layer.router_bias is None else scores + layer.router_bias
        if routing.groups > 1:
            grouped = choice.view(-1, routing.groups, routing.count // routing.groups)
            group_scores = (grouped.max(dim=-1).values if routing.group_score == "max"
                            else grouped.topk(2, dim=-1).values.sum(dim=-1))
            best = group_scores.topk(routing.top_groups, dim=-1).indices
            keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
            keep = keep.repeat_interleave(routing.count // routing.groups, dim=1)
            choice = choice.masked_fill(~keep, -math.inf)
            if routing.scoring == "softmax":  # DeepSeek-V2 zeroes the other groups' scores
                scores = scores.masked_fill(~keep, 0.0)
        chosen = choice.topk(routing.top_k, dim=-1).indices
        weights = scores.gather(1, chosen)
        if routing.normalize:  # (the epsilon is DeepSeek-V3's; it never changes fp32 sums ~1)
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * routing.scale, chosen

    def _dense_mlp(self, gate_up: Any, down: Any, x: torch.Tensor) -> torch.Tensor:
        if isinstance(gate_up, Linear) and isinstance(down, Linear) and gate_up.bf16_gemm(x):
            # bf16 GEMM prefill: the MLP's inner activations stay in bf16 between its two
            # GEMMs, as stock bf16 computes them (two fp32 round trips of the widest
            # activations were a tenth of a 1024-token prefill).
            up = gate_up.bf16_out(x)
        else:
            up = gate_up(x)
        if self.block.mlp == "gated":
            gate, up = up.chunk(2, dim=-1)
        else:
            gate, up = up, None
        kind = ACTIVATIONS[self.activation]
        if kind == 0:
            gate = F.silu(gate)
        elif kind == 1:
            gate = F.gelu(gate, approximate="tanh")
        elif kind == 2:
            gate = F.gelu(gate)
        else:
            gate = F.relu(gate)
        return down(gate if up is None else gate * up)

    def _block_output(self, layer: Layer, h: torch.Tensor, x: torch.Tensor,
                      attn: torch.Tensor, cache: Any = None) -> torch.Tensor:
        """The residual stream after one block: h [R, S, H] its input, x = attention norm(h),
        attn [R, S, heads * d] the attention's output before the o projection."""
        rows, seq, hidden = h.shape
        if layer.w_uv is not None:  # MLA: each head's latent output -> its value space
            latent = attn.reshape(rows, seq, self.heads, -1)[..., self.block.latent.rope_dim:]
            attn = torch.matmul(latent.transpose(1, 2), layer.w_uv.transpose(1, 2)).transpose(1, 2)
        mamba = layer.o is None
        if mamba:  # its output is projected already, and whole on every rank (no all-reduce)
            out = attn.reshape(rows, seq, hidden)
        else:
            out = layer.o(attn.reshape(rows * seq, -1)).view(rows, seq, hidden)
        if self.post_norm:  # GIT: each sublayer reads h, its norm follows the residual add
            h = self._norm(h + self._all_reduce(out), layer.attn_norm, layer.attn_norm_bias)
            mlp = self._mlp(layer, h.reshape(rows * seq, hidden)).view(rows, seq, hidden)
            return self._norm(h + self._all_reduce(mlp), layer.mlp_norm, layer.mlp_norm_bias)
        if self.block.residual == "parallel":  # both branches read the block's input
            mlp_in = x if layer.mlp_norm is None else self._norm(h, layer.mlp_norm,
                                                                 layer.mlp_norm_bias)
            mlp = self._mlp(layer, mlp_in.reshape(rows * seq, hidden)).view(rows, seq, hidden)
            return h + self._all_reduce(out + mlp)
        h = h + (out if mamba else self._all_reduce(out))
        if layer.cross_q is not None:
            h = h + self._all_reduce(self._cross_attention(layer, h, cache))
        x = self._norm(h, layer.mlp_norm, layer.mlp_norm_bias).view(rows * seq, hidden)
        return h + self._all_reduce(self._mlp(layer, x)).view(rows, seq, hidden)

    def _cross_attention(self, layer: Layer, h: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """T5, Whisper: h [R, S, H] attends to the encoder's keys and values."""
        return self._cross_core(layer, self._norm(h, layer.cross_norm, layer.cross_norm_bias),
                                cache, None)

    def _cross_core(self, layer: Layer, x: torch.Tensor, cache: KVCache,
                    bias: torch.Tensor | None) -> torch.Tensor:
        """Normed x [R, S, H] -> the cross-attention's output [R, S, H] over cache.cross_k/v
        [B, kv, E, d] (computed once per prompt; beams read their sequence's), plus `bias`
        [B, S, E] (mllama's image-tile mask) if given."""
        rows, seq, hidden = x.shape
        q = layer.cross_q(x.reshape(rows * seq, hidden)).view(rows, seq, self.heads, -1)
        if layer.cross_q_norm is not None:
            q = rms_norm(q.contiguous(), layer.cross_q_norm, self.eps)
        q = q.transpose(1, 2)
        k, v = cache.cross_k, cache.cross_v
        if k.shape[1] != self.heads:  # grouped: each kv head serves heads / kv queries
            k = k.repeat_interleave(self.heads // k.shape[1], dim=1)
            v = v.repeat_interleave(self.heads // v.shape[1], dim=1)
        if k.shape[0] != rows:  # beams: row r continues sequence r // beams
            k = k.repeat_interleave(rows // k.shape[0], dim=0)
            v = v.repeat_interleave(rows // v.shape[0], dim=0)
            bias = None if bias is None else bias.repeat_interleave(rows // bias.shape[0], 0)
        scores = torch.matmul(q, k.transpose(-1, -2)) * self.scaling
        if bias is not None:
            scores = scores + bias[:, None]
        out = torch.matmul(torch.softmax(scores, dim=-1), v).transpose(1, 2)
        return layer.cross_o(out.reshape(rows * seq, -1)).view(rows, seq, hidden)

    def _gated_cross_layer(self, layer: Layer, h: torch.Tensor, x: torch.Tensor,
                           cache: KVCache, decoding: bool) -> torch.Tensor:
        """mllama's cross-attention layer (blocks._map_mllama) on h [R, S, H], x its norm;
        without an image (no cross keys) transformers skips the layer, and so does this."""
        if cache.cross_k is None:
            return h
        rows, seq, hidden = h.shape
        bias, keep = cache.cross_bias, cache.cross_rows  # [B, P, E], [B, P]
        if decoding:  # a new token reads the prompt's last row, as transformers extends them
            bias = None if bias is None else bias[:, -1:]
            keep = None if keep is None else keep[:, -1:]
        h = h + layer.gates[0] * self._all_reduce(self._cross_core(layer, x, cache, bias))
        mlp = self._mlp(layer, self._norm(h, layer.mlp_norm, None).reshape(rows * seq, hidden))
        mlp = self._all_reduce(mlp).view(rows, seq, hidden)
        if keep is not None:  # text rows that see no image tile get no MLP update
            mlp = mlp * keep.repeat_interleave(rows // keep.shape[0], 0)[..., None]
        return h + layer.gates[1] * mlp

    def _encode(self, ids: torch.Tensor, mask: torch.Tensor | None) -> list[tuple[Any, Any]]:
        """Encoder-decoder: run the encoder once; each layer's cross keys/values."""
        return self.cross_kv(self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state)

    def cross_kv(self, states: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        """Each layer's cross-attention keys and values [B, kv, E, d] of the encoder's (or the
        image's) states [B, E, H], computed once per prompt (generate(cross_kv=...) takes
        them); None for a layer without cross-attention."""
        states = states.float()
        batch, length, hidden = states.shape
        found: list[tuple[torch.Tensor, torch.Tensor] | None] = []
        with torch.inference_mode():
            for layer in self.layers:
                if layer.cross_kv is None:
                    found.append(None)
                    continue
                kv = layer.cross_kv(states.reshape(batch * length, hidden))
                k, v = kv.view(batch, length, 2, -1, self.head_dim).permute(2, 0, 3, 1, 4)
                if layer.cross_k_norm is not None:
                    k = rms_norm(k.contiguous(), layer.cross_k_norm, self.eps)
                found.append((k.contiguous(), v.contiguous()))
        return found

    @staticmethod
    def attach_cross_kv(caches: list[Any], cross_kv: list[tuple[Any, Any] | None],
                        bias: torch.Tensor | None = None, rows: torch.Tensor | None = None
                        ) -> None:
        """Point the caches at cross_kv's keys/values; mllama's image-tile mask for the
        prompt: bias [B, P, E] (additive) and rows [B, P] (0: the text row sees no tile)."""
        for cache, kv in zip(caches, cross_kv, strict=True):
            if kv is not None:
                cache.cross_k, cache.cross_v = kv
                cache.cross_bias = None if bias is None else bias.float()
                cache.cross_rows = None if rows is None else rows.float()

    def _embed(self, ids: torch.Tensor, position: int) -> torch.Tensor:
        """ids [R, S] starting at absolute `position` -> fp32 [R, S, H]."""
        rows = F.embedding(ids, self.embed)
        if self.embed_scale is not None:  # in the weights' dtype, as stock rounds it
            rows = rows * torch.tensor(self.embed_scale, dtype=rows.dtype)
        rows = rows.float()
        if self.pos_embed is not None:  # learned absolute positions (OPT, GPTBigCode)
            start = position + self.pos_offset + self._pos_shift
            rows = rows + self.pos_embed[start: start + ids.shape[1]].float()
        if self.embed_norm is not None:  # bloom
            rows = F.layer_norm(rows, (rows.shape[-1],), self.embed_norm.weight,
                                self.embed_norm.bias, self.eps)
        return rows

    def _position_bias(self, query_positions: torch.Tensor, keys: int) -> torch.Tensor | None:
        """The attention scores' bias [heads, queries, keys], minus infinity past the query:
        ALiBi's slope * key position (softmax ignores a per-row constant, so BLOOM's absolute
        and MPT's relative forms give the same weights), or T5's relative bias; None for
        neither."""
        key_positions = torch.arange(keys, dtype=torch.float32)
        if self.alibi_slopes is not None:
            bias = self.alibi_slopes[:, None, None] * key_positions
        elif self.relative_bias is not None:
            bias = self.relative_bias(len(query_positions), keys, int(query_positions[0]))
        else:
            return None
        future = key_positions[None, :] > query_positions[:, None]
        return bias.masked_fill(future, -math.inf)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        x = h if self.final_norm is None else self._norm(h, self.final_norm, self.final_norm_bias)
        if self.logit_scale is not None:  # T5: d_model^-0.5 before the (tied) lm_head
            x = x * self.logit_scale
        logits = self._gather_logits(self.lm_head(x))
        if self.weight_dtype != torch.float32:
            # Stock returns logits in the weights' dtype: bf16's coarse steps turn near-ties
            # into exact ties, which argmax and top-k break by index. Rounding ours the same
            # way makes the same choices; everything before the logits stays fp32.
            logits = logits.to(self.weight_dtype).float()
        return logits

    def prompt_logits(self, ids: torch.Tensor,
                      cross_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None
                      ) -> torch.Tensor:
        """The next-token logits [B, V] after ids [B, P], from a prefill into fresh caches
        (Whisper's language detection reads them)."""
        batch, length = ids.shape
        caches = self.new_caches(batch, 1, length, 1)
        if cross_kv is not None:
            self.attach_cross_kv(caches, cross_kv)
        cos, sin = self._rope_tables(length + 1)
        with torch.inference_mode():
            return self.prefill(ids, caches, cos, sin)

    def prefill(self, ids: torch.Tensor, caches: list[KVCache], cos: torch.Tensor,
                sin: torch.Tensor, embeds: torch.Tensor | None = None,
                prefix: int = 0) -> torch.Tensor:
        """ids [B, P] -> logits of the last position [B, V]; fills the caches' prompt part.
        `embeds` [B, P, H]: the prompt's input embeddings as given (a multimodal model's, with
        the image features in place of its image tokens) instead of the ids' own; with
        `prefix`, its first `prefix` rows (GIT's image tokens) attend to each other both ways."""
        if embeds is None and not prefix and self._bound and self.compiled_prefill(ids.numel()):
            return self._gather_logits(self._plan.prefill(ids.contiguous(), float(self.scaling)))
        h = self._embed(ids, 0) if embeds is None else embeds.float()
        seq = h.shape[1]
        c, s = cos[:seq], sin[:seq]
        alibi = self._position_bias(torch.arange(seq), seq)
        if prefix:  # causal, except inside the prefix: an additive mask [seq, seq]
            allowed = torch.ones(seq, seq, dtype=torch.bool).tril_()
            allowed[:prefix, :prefix] = True
            alibi = torch.zeros(seq, seq).masked_fill_(~allowed, -math.inf)
        for layer, cache in zip(self.layers, caches, strict=True):
            x = self._attention_input(layer, h)
            if layer.gates is not None:
                h = self._gated_cross_layer(layer, h, x, cache, decoding=False)
                continue
            if layer.mamba is not None:
                h = self._block_output(layer, h, x, self._mamba_prefill(layer.mamba, x, cache))
                continue
            q, k, v = self._qkv(layer, x, c, s)
            cache.prompt_k.copy_(k)
            cache.prompt_v.copy_(v)
            attn = self._prompt_attention(q, k, v, alibi, keep_bf16=isinstance(layer.o, Linear)
                                          and layer.w_uv is None)
            h = self._block_output(layer, h, x, attn.transpose(1, 2), cache)
        return self._logits(h[:, -1])

    def compiled_prefill(self, rows: int | None = None) -> bool:
        """Whether a prompt of `rows` rows (batch x length) whose generate() bound the compiled
        step runs through its C++ prefill (DecodePlan.prefill: the same kernels, norms, RoPE
        and torch attention as the layers below, one call instead of ~15 torch ops per layer).
        Not for bf16 weights on CPUs with bf16 matrix math, whose prefill keeps activations in
        bf16 between ops as stock bf16 does, nor for the layers prefill_supported() excludes,
        nor past _prefill_rows; nor as prompt embeddings."""
        plan = self._compiled_plan() if self.use_compiled_step else None
        return (plan is not None and self.use_compiled_prefill and plan.prefill_supported()
                and not (self.weight_dtype == torch.bfloat16 and BF16_PREFILL_GEMM)
                and (rows is None or self._prefill_rows is None or rows <= self._prefill_rows))

    def _prompt_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          alibi: torch.Tensor | None, keep_bf16: bool = False) -> torch.Tensor:
        """Causal attention of the prompt [B, heads, P, d] -> fp32 (bf16 if it ran in bf16
        and keep_bf16: the o projection takes either). A bf16 model on a CPU with bf16 matrix
        math attends in bf16, as stock bf16 does (torch's flash kernel: 2.8x faster than in
        fp32 at 1024 tokens here, and nearly half of a 1024-token native bf16 prefill was fp32
        attention); the cache keeps the fp32 keys and values."""
        k, v = self._per_head(k), self._per_head(v)
        if self.weight_dtype == torch.bfloat16 and BF16_PREFILL_GEMM:
            q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
            alibi = None if alibi is None else alibi.bfloat16()
            if keep_bf16:
                return self._sdpa(q, k, v, alibi)
        return self._sdpa(q, k, v, alibi).float()

    def set_kv_map(self, kv_map: list[int] | None) -> None:
        self.kv_map = kv_map
        self._kv_index = None if kv_map is None else torch.tensor(kv_map)

    def _per_head(self, t: torch.Tensor) -> torch.Tensor:
        """Keys or values [.., kv, ..] as one KV head per query head [.., heads, ..] where
        this rank's query heads are not whole groups (kv_map); else as they are."""
        return t if self.kv_map is None else t.index_select(1, self._kv_index)

    def _sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              alibi: torch.Tensor | None) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=alibi, is_causal=alibi is None,
                                              scale=self.scaling, enable_gqa=True)

    def decode(self, ids: torch.Tensor, caches: list[KVCache], history: BeamHistory,
               beams: int, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """One token per row: ids [B*beams] -> logits [B*beams, V]."""
        rows = ids.shape[0]
        batch = rows // beams
        position = history.prompt_len + history.length
        step = history.length
        if self._bound:
            logits = self._gather_logits(self._plan.step(ids.contiguous(), position, step))
            history.length += 1
            return logits
        c, s = cos[position: position + 1], sin[position: position + 1]
        h = self._embed(ids.unsqueeze(1), position)  # [R, 1, H]
        # A rank whose query heads are not whole groups of its KV heads (tensor_parallel's
        # kv_map) reads each query head's KV head as if it were its own: groups of one.
        kvh, group = ((self.heads, 1) if self.kv_map is not None
                      else (self.kv_heads, self.heads // self.kv_heads))
        d = self.head_dim
        alibi = self._position_bias(torch.tensor([position]), position + 1)  # [heads, 1, keys]
        for layer, cache in zip(self.layers, caches, strict=True):
            x = self._attention_input(layer, h)
            if layer.gates is not None:
                h = self._gated_cross_layer(layer, h, x, cache, decoding=True)
                continue
            if layer.mamba is not None:
                out = self._mamba_step(layer.mamba, x[:, 0], cache)
                h = self._block_output(layer, h, x, out.unsqueeze(1))
                continue
            q, k, v = self._qkv(layer, x, c, s)  # q [R, heads, 1, d], k/v [R, kv, 1, d]
            cache.gen_k[:, :, step: step + 1].copy_(k)
            cache.gen_v[:, :, step: step + 1].copy_(v)
            if beams == 1:  # attend over the buffer's filled prefix
                keys = self._per_head(cache.k[:, :, : position + 1])
                values = self._per_head(cache.v[:, :, : position + 1])
                if keys.dtype != torch.float32:
                    keys, values = keys.float(), values.float()
                # Plain matmul-softmax-matmul: for one query row, torch's CPU SDPA (a flash
                # kernel with per-call thread set-up) costs more than the arithmetic.
                qg = q.reshape(rows, kvh, group, d)
                scores = torch.matmul(qg, keys.transpose(-1, -2)).mul_(self.scaling)
                if alibi is not None:
                    scores = scores + alibi.view(kvh, group, -1)
                attn = torch.matmul(torch.softmax(scores, dim=-1), values)
                h = self._block_output(layer, h, x, attn.reshape(rows, 1, self.heads * d), cache)
                continue
            # Scores against the prompt, shared by the beams of a sequence: [B, kv, beams*g, P].
            qp = q.view(batch, beams, kvh, group, d).permute(0, 2, 1, 3, 4)
            qp = qp.reshape(batch, kvh, beams * group, d)
            pk, pv = self._per_head(cache.prompt_k), self._per_head(cache.prompt_v)
            if pk.dtype != torch.float32:
                pk, pv = pk.float(), pv.float()
            scores_prompt = torch.matmul(qp, pk.transpose(-1, -2)) * self.scaling
            # Scores against generated tokens, read through the beam history: [R, kv, g, t].
            gk, gv = map(self._per_head, self._generated(cache, history, step + 1))
            qg = q.view(rows, kvh, group, d)
            scores_gen = torch.matmul(qg, gk.transpose(-1, -2)) * self.scaling
            scores_prompt = scores_prompt.view(batch, kvh, beams, group, -1)
            scores_prompt = scores_prompt.permute(0, 2, 1, 3, 4).reshape(rows, kvh,
                                                                         group, -1)
            scores = torch.cat((scores_prompt, scores_gen), dim=-1)
            if alibi is not None:
                scores = scores + alibi.view(kvh, group, -1)
            probs = torch.softmax(scores, dim=-1)
            prompt_len = pk.shape[2]
            probs_prompt = probs[..., :prompt_len].reshape(batch, beams, kvh, group,
                                                          prompt_len)
            probs_prompt = probs_prompt.permute(0, 2, 1, 3, 4).reshape(batch, kvh,
                                                                       beams * group, prompt_len)
            out_prompt = torch.matmul(probs_prompt, pv).view(batch, kvh, beams, group, d)
            out_prompt = out_prompt.permute(0, 2, 1, 3, 4).reshape(rows, kvh, group, d)
            out = out_prompt + torch.matmul(probs[..., prompt_len:], gv)
            h = self._block_output(layer, h, x, out.reshape(rows, 1, self.heads * d), cache)
        history.length += 1
        return self._logits(h[:, 0])

    def _mamba_ssm_inputs(self, m: Mamba, xs: torch.Tensor):
        """Conv'd inputs xs [N, inner] -> dt [N, inner] (softplus'd), B and C [N, state]."""
        dt, b, c = m.x_proj(xs).split([m.dt_rank, m.state, m.state], dim=-1)
        dt = rms_norm(dt.contiguous(), m.dt_norm, self.eps)
        b = rms_norm(b.contiguous(), m.b_norm, self.eps)
        c = rms_norm(c.contiguous(), m.c_norm, self.eps)
        return F.softplus(m.dt_proj(dt)), b, c

    def _mamba_prefill(self, m: Mamba, x: torch.Tensor, state: MambaState) -> torch.Tensor:
        """x [B, S, H] normed -> the mixer's output [B, S, H]; leaves each row's conv window
        and SSM state in `state`. The scan is the recurrence, token by token, as transformers'
        PyTorch path computes it."""
        batch, seq, hidden = x.shape
        width = m.conv_weight.shape[1]
        xs, gate = m.in_proj(x.reshape(batch * seq, hidden)).view(batch, seq, -1).chunk(2, -1)
        xs = xs.transpose(1, 2)  # [B, inner, S]
        padded = F.pad(xs, (width - 1, 0))  # the last width-1 inputs, zeros before the prompt
        beams = state.conv.shape[0] // batch  # every beam starts from its sequence's state
        state.conv.copy_(padded[:, :, padded.shape[2] - (width - 1):]
                         .repeat_interleave(beams, dim=0))
        xs = F.silu(F.conv1d(xs, m.conv_weight.unsqueeze(1), m.conv_bias, padding=width - 1,
                             groups=xs.shape[1])[:, :, :seq])
        xs = xs.transpose(1, 2).reshape(batch * seq, -1)  # [B*S, inner]
        dt, b, c = self._mamba_ssm_inputs(m, xs)
        dt = dt.view(batch, seq, -1)
        b, c = b.view(batch, seq, -1), c.view(batch, seq, -1)
        xs = xs.view(batch, seq, -1)
        ssm = torch.zeros(batch, m.a.shape[0], m.state)
        ys = []
        for t in range(seq):
            decay = torch.exp(m.a * dt[:, t, :, None])
            ssm = decay * ssm + dt[:, t, :, None] * b[:, t, None, :] * xs[:, t, :, None]
            ys.append(torch.matmul(ssm, c[:, t, :, None])[..., 0])
        state.ssm.copy_(ssm.repeat_interleave(beams, dim=0))
        y = (torch.stack(ys, dim=1) + xs * m.d) * F.silu(gate)
        return m.out_proj(y.reshape(batch * seq, -1)).view(batch, seq, hidden)

    def _mamba_step(self, m: Mamba, x: torch.Tensor, state: MambaState) -> torch.Tensor:
        """One token per row: x [R, H] normed -> [R, H]; advances the row's state."""
        xs, gate = m.in_proj(x).chunk(2, dim=-1)
        window = torch.cat((state.conv, xs[:, :, None]), dim=-1)  # [R, inner, width]
        state.conv.copy_(window[:, :, 1:])
        xs = F.silu(F.conv1d(window, m.conv_weight.unsqueeze(1), m.conv_bias,
                             groups=xs.shape[1])[:, :, -1])
        dt, b, c = self._mamba_ssm_inputs(m, xs)
        state.ssm.copy_(torch.exp(dt[..., None] * m.a) * state.ssm
                        + dt[..., None] * b[:, None, :] * xs[..., None])
        y = (torch.matmul(state.ssm, c[..., None])[..., 0] + xs * m.d) * F.silu(gate)
        return m.out_proj(y)

    def bind_compiled_step(self, caches: list[Any], history: BeamHistory, beams: int,
                           cos: torch.Tensor, sin: torch.Tensor) -> bool:
        """Point the compiled step at this generate() call's caches (and, for T5, the encoder's
        keys/values and the relative bias by distance); decode() then runs it. False when
        there is no compiled step for this model (the reason is in runtime_details)."""
        plan = self._compiled_plan()
        if plan is not None:
            total = cos.shape[0]
            attention = [c if isinstance(c, KVCache) else None for c in caches]
            none = torch.empty(0)  # a Mamba layer's place in the per-layer cache lists

            def each(attr: str) -> list[torch.Tensor]:
                return [none if c is None else getattr(c, attr) for c in attention]

            states = [c for c in caches if isinstance(c, MambaState)]
            plan.bind(each("prompt_k"), each("prompt_v"), each("gen_k"), each("gen_v"),
                      cos.contiguous(), sin.contiguous(),
                      history.table if history.indirect else None, beams,
                      cross_k=[none if c is None or c.cross_k is None else c.cross_k
                               for c in attention],
                      cross_v=[none if c is None or c.cross_v is None else c.cross_v
                               for c in attention],
                      cross_bias=next((c.cross_bias[:, -1].contiguous() for c in attention
                                       if c and c.cross_bias is not None), None),
                      cross_rows=next((c.cross_rows[:, -1].contiguous() for c in attention
                                       if c and c.cross_rows is not None), None),
                      relative_bias=None if self.relative_bias is None else
                      self.relative_bias(1, total, total - 1)[:, 0].flip(-1).contiguous(),
                      mamba_conv=[state.conv for state in states],
                      mamba_ssm=[state.ssm for state in states], pos_shift=self._pos_shift)
        self._bound = plan is not None
        return self._bound

    def _generate_caches(self, batch: int, beams: int, prompt_len: int,
                         new_tokens: int) -> list[Any]:
        """generate()'s caches: the previous call's again when the shapes match (a static
        cache, as llama.cpp keeps its own), fresh ones otherwise. Allocating SmolLM2's 60 cache
        tensors took 1.5 ms warm and up to 25 ms right after a decode, inside the first token.
        Every position a call reads it has written first (the prompt part in the prefill, each
        generated position before attention reaches it), so stale entries are never read;
        cross-attention inputs are attached afresh. Mamba states start from zero: not reused."""
        key = (batch, beams, prompt_len, new_tokens)
        if self._cache_pool is not None and self._cache_pool[0] == key:
            caches = self._cache_pool[1]
            for cache in caches:
                cache.cross_k = cache.cross_v = cache.cross_bias = cache.cross_rows = None
            return caches
        caches = self.new_caches(*key)
        if not any(isinstance(cache, MambaState) for cache in caches):
            self._cache_pool = (key, caches)
        return caches

    def new_caches(self, batch: int, beams: int, prompt_len: int, new_tokens: int) -> list[Any]:
        """Per layer: a KVCache, or a MambaState for a Mamba layer."""
        return [MambaState(layer.mamba, batch * beams) if layer.mamba is not None
                else KVCache(batch, beams, self.kv_heads, self.head_dim, prompt_len, new_tokens,
                             self.kv_dtype, shared_values=self.block.latent is not None)
                for layer in self.layers]

    def _generated(self, cache: KVCache, history: BeamHistory, length: int):
        k, v = cache.gen_k[:, :, :length], cache.gen_v[:, :, :length]
        if history.indirect:
            # k[r, :, j] = gen_k[table[r, j], :, j]: gather through the beam history.
            slots = history.table[:, :length]
            positions = torch.arange(length)
            k = cache.gen_k[slots, :, positions].transpose(1, 2)
            v = cache.gen_v[slots, :, positions].transpose(1, 2)
        if k.dtype != torch.float32:
            k, v = k.float(), v.float()
        return k, v

    # ---- generate() -------------------------------------------------------------------------

    def generate(self, **kwargs: Any) -> torch.Tensor:
        unsupported = sorted(set(kwargs) - SUPPORTED_GENERATE_KEYS)
        if unsupported:
            raise UserError(f"native backend: generation settings not implemented: "
                            f"{', '.join(unsupported)}")
        ids: torch.Tensor = kwargs["input_ids"]
        mask = kwargs.get("attention_mask")
        if mask is not None and not bool(mask.all()):
            raise UserError("native backend: padded prompts are not supported")
        new_tokens = int(kwargs["max_new_tokens"])
        if int(kwargs.get("min_new_tokens") or 0) != new_tokens:
            raise UserError("native backend generates a fixed number of tokens "
                            "(min_new_tokens == max_new_tokens)")
        beams = int(kwargs.get("num_beams") or 1)
        do_sample = bool(kwargs.get("do_sample"))
        if beams > 1 and do_sample:
            raise UserError("native backend: beam sampling is not implemented")
        criteria = kwargs.get("stopping_criteria") or []
        streamer = kwargs.get("streamer")
        settings = self._sampling_settings(kwargs)
        # Tokens never chosen: end-of-sequence (min_new_tokens == max_new_tokens) and the
        # generation config's suppress_tokens; begin_suppress_tokens only for the first new
        # token, as transformers' logits processors do.
        defaults = self.generation_config
        banned = self._eos_ids(kwargs) + _token_list(
            kwargs.get("suppress_tokens", defaults.suppress_tokens))
        first_banned = banned + _token_list(
            kwargs.get("begin_suppress_tokens", defaults.begin_suppress_tokens))

        embeds = kwargs.get("inputs_embeds")
        prefix = int(kwargs.get("prefix_len") or 0)
        if prefix:  # GIT: embeds are the layer stack's whole input, [prefix rows | the ids']
            if (embeds is None or self.alibi_slopes is not None
                    or embeds.shape[:2] != (ids.shape[0], prefix + ids.shape[1])):
                raise UserError("native backend: prefix_len needs inputs_embeds of prefix_len "
                                "+ prompt rows, and no ALiBi")
        elif embeds is not None and (self.encoder is not None or self.pos_embed is not None
                                     or self.embed_norm is not None
                                     or embeds.shape[:2] != ids.shape):
            raise UserError("native backend: inputs_embeds are taken for a decoder-only model "
                            "without learned positions, one row per prompt token")
        cross = kwargs.get("cross_kv")
        if self.block.cross_attention and self.encoder is None and cross is None:
            raise UserError("native backend: this decoder reads its encoder's states; "
                            "generate() needs cross_kv=NativeModel.cross_kv(states)")
        encoder_ids = None
        if self.encoder is not None:  # the prompt is the encoder's; the decoder starts afresh
            encoder_ids = ids
            ids = torch.full((ids.shape[0], 1), self.decoder_start, dtype=ids.dtype)
        batch, prompt_len = ids.shape[0], ids.shape[1] + prefix
        total = prompt_len + new_tokens
        self._pos_shift = -prefix
        if self.sliding_window and total > self.sliding_window:
            raise UserError(f"native backend: {total} tokens exceed the sliding window "
                            f"({self.sliding_window})")
        if (self.pos_embed is not None
                and total + self.pos_offset + self._pos_shift > self.pos_embed.shape[0]):
            raise UserError(f"native backend: {total} tokens exceed the model's "
                            f"{self.pos_embed.shape[0] - self.pos_offset} learned positions")
        cos, sin = self._rope_tables(total)
        caches = self._generate_caches(batch, beams, prompt_len, new_tokens)
        history = BeamHistory(batch * beams, new_tokens, indirect=beams > 1,
                              prompt_len=prompt_len)
        if encoder_ids is not None:
            with torch.inference_mode():
                cross = self._encode(encoder_ids, mask)
        if cross is not None:
            self.attach_cross_kv(caches, cross, kwargs.get("cross_bias"),
                                 kwargs.get("cross_rows"))
        if streamer is not None:
            streamer.put(ids.cpu())

        # Past SMALL_M_MAX rows the torch-op step measured faster than the compiled one (its
        # batched attention and elementwise ops; benchmarks/batch_sweep.py with the -torchstep
        # configs, SmolLM2, 2 threads, AMX Xeon: 32 rows fp32 65.6 vs 74.7 ms, bf16 44.4 vs
        # 46.4; 64 rows 121.6 vs 131.1 and 62.7 vs 72.8; level at 16).
        if self.use_compiled_step and batch * beams <= kernels.SMALL_M_MAX:
            self.bind_compiled_step(caches, history, beams, cos, sin)
        try:
            with torch.inference_mode():
                sequences = self._generate(ids, caches, history, beams, new_tokens,
                                           (first_banned, banned), criteria, streamer,
                                           do_sample, settings, cos, sin, embeds, prefix)
        finally:
            self._bound = False
        if streamer is not None:
            streamer.end()
        return sequences

    def _generate(self, ids, caches, history, beams, new_tokens, banned, criteria, streamer,
                  do_sample, settings, cos, sin, embeds=None, prefix=0) -> torch.Tensor:
        """Prefill, then one decode step per new token (greedy or sampling), or beam search.
        banned: (tokens never chosen first, tokens never chosen later)."""
        logits = self.prefill(ids, caches, cos, sin, embeds, prefix)
        if beams > 1:
            return self._beam_search(ids, logits, caches, history, beams, new_tokens, banned,
                                     criteria, cos, sin)
        sequences = ids
        for step in range(new_tokens):
            if step:
                logits = self.decode(sequences[:, -1], caches, history, 1, cos, sin)
            token = self._pick(logits, banned[min(step, 1)], do_sample, settings)
            sequences = torch.cat((sequences, token[:, None]), dim=1)
            if streamer is not None:
                streamer.put(token.cpu())
            for criterion in criteria:
                criterion(sequences, None)
        return sequences

    def _beam_search(self, ids, logits, caches, history, beams, new_tokens, banned, criteria,
                     cos, sin) -> torch.Tensor:
        """Beam search over a fixed length: every hypothesis ends at the same length, so the
        best is the one with the highest summed log-probability (length penalty can't reorder
        them), as in transformers' beam search with min_new_tokens == max_new_tokens."""
        batch = ids.shape[0]
        vocab = logits.shape[-1]
        first_banned, banned = banned
        logprobs = self._log_softmax(logits, first_banned)  # [B, V]: all beams start the same
        scores, tokens = logprobs.topk(beams, dim=-1)  # [B, beams]
        rows = batch * beams
        generated = tokens.reshape(rows, 1)
        beam_scores = scores.reshape(rows)
        offsets = (torch.arange(batch) * beams).repeat_interleave(beams)
        full = torch.cat((ids.repeat_interleave(beams, dim=0), generated), dim=1)
        for criterion in criteria:
            criterion(full, None)
        states = [c for c in caches if isinstance(c, MambaState)]
        for _ in range(1, new_tokens):
            logits = self.decode(generated[:, -1], caches, history, beams, cos, sin)
            logprobs = self._log_softmax(logits, banned) + beam_scores[:, None]
            flat = logprobs.view(batch, beams * vocab)
            top_scores, top_index = flat.topk(beams, dim=-1)
            parents = (top_index // vocab).reshape(rows) + offsets
            next_tokens = (top_index % vocab).reshape(rows)
            history.reorder(parents)
            for state in states:
                state.select(parents)
            generated = torch.cat((generated[parents], next_tokens[:, None]), dim=1)
            beam_scores = top_scores.reshape(rows)
            full = torch.cat((ids.repeat_interleave(beams, dim=0), generated), dim=1)
            for criterion in criteria:
                criterion(full, None)
        best = beam_scores.view(batch, beams).argmax(dim=-1) + torch.arange(batch) * beams
        return torch.cat((ids, generated[best]), dim=1)

    @staticmethod
    def _log_softmax(logits: torch.Tensor, banned: list[int]) -> torch.Tensor:
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        if banned:
            logprobs[:, banned] = -math.inf
        return logprobs

    def _eos_ids(self, kwargs: dict[str, Any]) -> list[int]:
        return _token_list(kwargs.get("eos_token_id", self.generation_config.eos_token_id))

    def _sampling_settings(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        # transformers' defaults apply when sampling (top_k 50), as in stock generate().
        defaults = self.generation_config
        return {"temperature": kwargs.get("temperature", defaults.temperature or 1.0),
                "top_k": kwargs.get("top_k", defaults.top_k if defaults.top_k is not None else 50),
                "top_p": kwargs.get("top_p", defaults.top_p if defaults.top_p is not None else 1.0)}

    @staticmethod
    def _pick(logits: torch.Tensor, banned: list[int], do_sample: bool,
              settings: dict[str, Any]) -> torch.Tensor:
        logits = logits.float()
        if banned:  # min_new_tokens: end-of-sequence can't be chosen before the last token
            logits[:, banned] = -math.inf
        if not do_sample:
            return logits.argmax(dim=-1)
        logits = logits / settings["temperature"]
        top_k = int(settings["top_k"] or 0)
        if 0 < top_k < logits.shape[-1]:
            kth = logits.topk(top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, -math.inf)
        top_p = float(settings["top_p"])
        if top_p < 1.0:
            ordered, order = logits.sort(dim=-1, descending=False)
            cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
            remove = cumulative <= 1 - top_p
            remove[:, -1] = False
            logits = logits.masked_fill(remove.scatter(1, order, remove), -math.inf)
        return torch.multinomial(torch.softmax(logits, dim=-1), 1)[:, 0]


def _token_list(tokens: Any) -> list[int]:
    """A generation setting's token ids (None, an id or a list) as a list."""
    if tokens is None:
        return []
    return [int(t) for t in (tokens if isinstance(tokens, list | tuple) else [tokens])]


def prepare(model: Any, *, dtype: str, family: str, kv_cache_dtype: str,
            place_weights: bool = True) -> PreparedModel:
    if dtype not in ("float32", "bfloat16"):
        raise UserError(f"native backend runs float32 and bfloat16 weights, not {dtype}")
    try:
        native = NativeModel(model, kv_cache_dtype)
    except blocks.Unsupported as reason:
        from llmbench.backends import stock

        prepared = stock.prepare(model)
        note = f"{reason}: this run is STOCK transformers"
        return PreparedModel(model=prepared.model, backend="stock",
                             details={**prepared.details, "requested": "native",
                                      "fallback_reason": note})
    if place_weights:
        native.place_weights()
    return PreparedModel(model=native, backend="native", details=details(native, dtype))


def details(native: NativeModel, dtype: str) -> dict[str, Any]:
    """The report's backend section for a native model running `dtype` weights."""
    return {
        "kernels": kernels.isa(),
        "kernels_built": kernels.available(),
        "kernels_import_error": kernels.import_error(),
        "activation_dtype": "float32",
        **({"prefill_matmul": prefill_matmul()} if dtype == "bfloat16" else {}),
        "kv_cache_dtype": str(native.kv_dtype).replace("torch.", ""),
        **({"encoder": "transformers' own module (stock), once per prompt; the decoder is "
                       "native"} if native.encoder is not None else {}),
        "tied_embedding": native.tied,
        "block": native.block.describe(),
        "weight_bytes_per_token": native.weight_bytes,
    }
