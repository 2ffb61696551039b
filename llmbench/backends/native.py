"""The native backend: what ipex.llm.optimize does, from upstream PyTorch and our own kernels.

For llama-like decoders it replaces transformers' model by a plain one in the manner of
gpt-fast, whose whole generation path reads top to bottom here:

- weights are taken over once: fused QKV and gate/up projections, stored in the model's dtype
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
- a decode step is one call into the compiled extension (llmbench/kernels/csrc/decode_step.cpp:
  every layer's norms, RoPE, cache write, attention and residuals as plain loops around the
  weight-streaming kernels) when the kernels are built and every projection has a compiled
  kernel; otherwise the same step runs as torch ops here (`decode`), and the report says which.

Families outside NATIVE_FAMILIES run stock, and the report says so.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from llmbench import kernels, memory
from llmbench.backends import PreparedModel
from llmbench.environment import has_native_bf16
from llmbench.errors import UserError

NATIVE_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma")
# MLP activations the native step implements, by config.hidden_act; the C++ step numbers them.
ACTIVATIONS = {"silu": 0, "swish": 0, "gelu_pytorch_tanh": 1}
KV_CACHE_DTYPES = ("auto", "fp8_e5m2")
# generate() settings the native loop implements; anything else is refused, never ignored.
SUPPORTED_GENERATE_KEYS = {"input_ids", "attention_mask", "pad_token_id", "max_new_tokens",
                           "min_new_tokens", "do_sample", "num_beams", "stopping_criteria",
                           "streamer", "temperature", "top_k", "top_p", "eos_token_id",
                           "length_penalty", "early_stopping"}


# transformers' RMSNorm in fp32, one C++ call per norm (torch's F.rms_norm is not fused on CPU
# and costs ~70 us a call here; the formula in kernels.reference is six torch ops).
rms_norm = kernels.rms_norm


# Prefills of bf16 weights (more rows than the kernels stream) on CPUs with bf16 matrix math
# (AMX, AVX512-BF16, Arm BF16) run torch's bf16 GEMM on activations rounded to bf16, as stock
# bf16 does, instead of widening the weights to fp32 for an fp32 GEMM. Measured on a Xeon with
# AMX, 2 threads, SmolLM2-135M's linears at 32 rows: 28 ms against 67 ms. Elsewhere bf16 GEMM is
# emulated and slower than the widening, so it stays fp32 there.
BF16_PREFILL_GEMM = has_native_bf16()


def prefill_matmul() -> str:
    """How bf16 weights multiply prompt-length activations here (for the report)."""
    if BF16_PREFILL_GEMM:
        return "bf16 GEMM (CPU has bf16 matrix math): activations rounded to bf16, fp32 residual"
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
        if (self.weight.dtype == torch.bfloat16 and BF16_PREFILL_GEMM
                and x.numel() > kernels.STREAM_M_MAX["bf16"] * x.shape[-1]):
            return F.linear(x.bfloat16(), self.weight, self.bias_bf16).float()
        return self.kernel(x, self.weight, self.bias)

    @property
    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()


def fuse(*linears: torch.nn.Linear) -> Linear:
    weight = torch.cat([lin.weight.detach() for lin in linears], dim=0)
    biases = [lin.bias for lin in linears]
    bias = None if all(b is None for b in biases) else torch.cat(
        [b.detach() if b is not None else torch.zeros(lin.out_features, dtype=lin.weight.dtype)
         for b, lin in zip(biases, linears, strict=True)])
    return Linear(weight, bias)


@dataclass
class Layer:
    attn_norm: torch.Tensor
    qkv: Any  # Linear, or a quantized linear put in by map_linears
    o: Any
    mlp_norm: torch.Tensor
    gate_up: Any
    down: Any
    q_norm: torch.Tensor | None = None  # qwen3 normalizes each head's q and k
    k_norm: torch.Tensor | None = None


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
    row r, so reordering beams rewrites that small table instead of the cache."""

    def __init__(self, batch: int, beams: int, kv_heads: int, head_dim: int, prompt_len: int,
                 new_tokens: int, dtype: torch.dtype) -> None:
        self.dtype = dtype
        if beams == 1:
            self.k = torch.zeros(batch, kv_heads, prompt_len + new_tokens, head_dim, dtype=dtype)
            self.v = torch.zeros_like(self.k)
            self.prompt_k, self.gen_k = self.k[:, :, :prompt_len], self.k[:, :, prompt_len:]
            self.prompt_v, self.gen_v = self.v[:, :, :prompt_len], self.v[:, :, prompt_len:]
        else:
            self.prompt_k = torch.zeros(batch, kv_heads, prompt_len, head_dim, dtype=dtype)
            self.prompt_v = torch.zeros_like(self.prompt_k)
            self.gen_k = torch.zeros(batch * beams, kv_heads, new_tokens, head_dim, dtype=dtype)
            self.gen_v = torch.zeros_like(self.gen_k)


class BeamHistory:
    """The indirection table shared by all layers' caches."""

    def __init__(self, rows: int, new_tokens: int, indirect: bool) -> None:
        self.indirect = indirect
        self.table = torch.arange(rows).unsqueeze(1).repeat(1, new_tokens)
        self.length = 0  # generated positions stored so far

    def reorder(self, parents: torch.Tensor) -> None:
        # Beam row r now continues beam parents[r]: it inherits that beam's history.
        self.table[:, : self.length] = self.table[parents, : self.length]


class NativeModel:
    """A llama-like decoder over our kernels, with a generate() for the benchmark loop."""

    def __init__(self, hf_model: Any, kv_cache_dtype: str) -> None:
        config = hf_model.config
        inner = hf_model.model
        self.config = config
        self.generation_config = hf_model.generation_config
        self.rotary = inner.rotary_emb  # transformers' own: every rope type, exact same tables
        attn0 = inner.layers[0].self_attn
        self.head_dim = attn0.head_dim
        self.scaling = attn0.scaling
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.eps = config.rms_norm_eps
        self.sliding_window = getattr(config, "sliding_window", None)
        self.weight_dtype = inner.embed_tokens.weight.dtype
        # auto: the activations' dtype (fp32), so attention reads the cache without converting.
        self.kv_dtype = {"auto": torch.float32, "fp8_e5m2": torch.float8_e5m2}[kv_cache_dtype]
        self.embed = inner.embed_tokens.weight.detach()
        # Gemma's quirks, as its transformers code has them: the embedding is multiplied by
        # sqrt(hidden) (a scalar in the weights' dtype) and its RMSNorms scale by (1 + weight).
        embed_scale = getattr(inner.embed_tokens, "embed_scale", None)
        self.embed_scale = None if embed_scale is None else float(
            embed_scale.to(self.embed.dtype))
        self.norm_offset = 1.0 if config.model_type == "gemma" else 0.0
        self.final_norm = inner.norm.weight.detach().float() + self.norm_offset
        self.layers = [self._take_layer(layer) for layer in inner.layers]
        lm_head = hf_model.lm_head
        self.lm_head = Linear(lm_head.weight.detach(),
                              None if lm_head.bias is None else lm_head.bias.detach())
        self.tied = lm_head.weight.data_ptr() == self.embed.data_ptr()
        self.activation = getattr(config, "hidden_act", "silu")
        if self.activation not in ACTIVATIONS:
            raise UserError(f"native backend: activation {self.activation} not implemented")
        self.intermediate = self.layers[0].down.weight.shape[1]
        # False runs every decode step as torch ops (tests and benchmarks compare the two).
        self.use_compiled_step = True
        self._plan: Any = None  # the compiled decode step, built on first use
        self._plan_note = ""
        self._bound = False  # the plan holds this generate() call's caches
        self.placement: dict[str, Any] = {}  # place_weights' record, for the report

    def _take_layer(self, layer: Any) -> Layer:
        attn, mlp = layer.self_attn, layer.mlp
        if hasattr(attn, "qkv_proj"):  # phi3 ships them fused already
            qkv = Linear(attn.qkv_proj.weight.detach(), None)
            gate_up = Linear(mlp.gate_up_proj.weight.detach(), None)
        else:
            qkv = fuse(attn.q_proj, attn.k_proj, attn.v_proj)
            gate_up = fuse(mlp.gate_proj, mlp.up_proj)
        q_norm = getattr(attn, "q_norm", None)
        k_norm = getattr(attn, "k_norm", None)
        return Layer(
            attn_norm=layer.input_layernorm.weight.detach().float() + self.norm_offset,
            qkv=qkv,
            o=Linear(attn.o_proj.weight.detach(),
                     None if attn.o_proj.bias is None else attn.o_proj.bias.detach()),
            mlp_norm=layer.post_attention_layernorm.weight.detach().float() + self.norm_offset,
            gate_up=gate_up,
            down=Linear(mlp.down_proj.weight.detach(), None),
            q_norm=None if q_norm is None else q_norm.weight.detach().float(),
            k_norm=None if k_norm is None else k_norm.weight.detach().float(),
        )

    def map_linears(self, convert: Callable[[str, Linear], Any]) -> None:
        """Replace each projection by convert(name, linear), e.g. a quantized one: anything with
        __call__(x fp32 [M, K]) -> fp32 [M, N] and an `nbytes` property fits. Names are
        "layers.<i>.<qkv|o|gate_up|down>" and "lm_head"."""
        for index, layer in enumerate(self.layers):
            for attr in ("qkv", "o", "gate_up", "down"):
                setattr(layer, attr, convert(f"layers.{index}.{attr}", getattr(layer, attr)))
        self.lm_head = convert("lm_head", self.lm_head)
        self.place_weights()

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
        projections = [("lm_head", self.lm_head)] + [
            (f"layers.{i}.{attr}", getattr(layer, attr))
            for i, layer in enumerate(self.layers) for attr in ("qkv", "o", "gate_up", "down")]
        specs = {name: kernel_spec(p) for name, p in projections}
        missing = [name for name, spec in specs.items() if spec is None]
        if not kernels.available() or not hasattr(kernels.compiled(), "DecodePlan"):
            self._plan_note = "python step: the compiled kernels are not built"
        elif missing:
            kind = getattr(dict(projections)[missing[0]], "kind", "?")
            self._plan_note = (f"python step: {missing[0]} ({kind}) has no compiled kernel")
        if self._plan_note:
            return None
        plan = kernels.compiled().DecodePlan(
            hidden=self.embed.shape[1], heads=self.heads, kv_heads=self.kv_heads,
            head_dim=self.head_dim, intermediate=self.intermediate, eps=float(self.eps),
            scaling=float(self.scaling), embed=self.embed.contiguous(),
            final_norm=self.final_norm, embed_scale=self.embed_scale or 1.0,
            activation=ACTIVATIONS[self.activation],
            round_logits_bf16=self.weight_dtype != torch.float32)
        index = {name: plan.add_linear(**spec) for name, spec in specs.items()}
        for i, layer in enumerate(self.layers):
            plan.add_layer(layer.attn_norm, layer.mlp_norm, layer.q_norm, layer.k_norm,
                           *(index[f"layers.{i}.{attr}"] for attr in ("qkv", "o", "gate_up",
                                                                     "down")))
        plan.set_lm_head(index["lm_head"])
        self._plan = plan
        self._plan_note = (f"compiled C++ step ({kernels.isa()}) for up to "
                           f"{kernels.SMALL_M_MAX} rows; python step beyond")
        return plan

    def runtime_details(self) -> dict[str, Any]:
        """What the report should say about how decode steps run."""
        placement = {"weight_placement": memory.placement_summary(self.placement)}
        if not self.use_compiled_step:
            return {"decode_step": "python step (compiled step switched off)", **placement}
        self._compiled_plan()
        return {"decode_step": self._plan_note, **placement}

    @property
    def weight_bytes(self) -> int:
        total = sum(lin.nbytes for layer in self.layers
                    for lin in (layer.qkv, layer.o, layer.gate_up, layer.down))
        return total + self.lm_head.nbytes

    # ---- the forward pass -------------------------------------------------------------------

    def _rope_tables(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        positions = torch.arange(length).unsqueeze(0)
        cos, sin = self.rotary(torch.zeros(1, dtype=torch.float32), positions)
        return cos[0].float(), sin[0].float()  # [length, rotary_dim]

    def _qkv(self, layer: Layer, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """h [R, S, H] -> q [R, heads, S, d], k and v [R, kv, S, d], rope applied."""
        rows, seq, _ = h.shape
        x = rms_norm(h, layer.attn_norm, self.eps)
        qkv = layer.qkv(x.view(rows * seq, -1))
        d = self.head_dim
        if layer.q_norm is None:  # RoPE in place on the fused output: one call for q and k
            kernels.rope_qk_(qkv, cos, sin, self.heads, self.kv_heads, d)
        q, k, v = qkv.split([self.heads * d, self.kv_heads * d, self.kv_heads * d], dim=-1)
        q = q.view(rows, seq, self.heads, d).transpose(1, 2)
        k = k.view(rows, seq, self.kv_heads, d).transpose(1, 2)
        v = v.view(rows, seq, self.kv_heads, d).transpose(1, 2)
        if layer.q_norm is not None:  # qwen3: each head's q and k normalized before RoPE
            q = kernels.reference.rope(rms_norm(q, layer.q_norm, self.eps), cos, sin)
            k = kernels.reference.rope(rms_norm(k, layer.k_norm, self.eps), cos, sin)
        return q, k, v

    def _mlp_and_output(self, layer: Layer, h: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        rows, seq, hidden = h.shape
        h = h + layer.o(attn.reshape(rows * seq, -1)).view(rows, seq, hidden)
        x = rms_norm(h, layer.mlp_norm, self.eps).view(rows * seq, hidden)
        gate, up = layer.gate_up(x).chunk(2, dim=-1)
        if ACTIVATIONS[self.activation] == 0:
            gate = F.silu(gate)
        else:
            gate = F.gelu(gate, approximate="tanh")
        return h + layer.down(gate * up).view(rows, seq, hidden)

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(ids, self.embed)
        if self.embed_scale is not None:  # in the weights' dtype, as stock rounds it
            rows = rows * torch.tensor(self.embed_scale, dtype=rows.dtype)
        return rows.float()

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(rms_norm(h, self.final_norm, self.eps))
        if self.weight_dtype != torch.float32:
            # Stock returns logits in the weights' dtype: bf16's coarse steps turn near-ties
            # into exact ties, which argmax and top-k break by index. Rounding ours the same
            # way makes the same choices; everything before the logits stays fp32.
            logits = logits.to(self.weight_dtype).float()
        return logits

    def prefill(self, ids: torch.Tensor, caches: list[KVCache], cos: torch.Tensor,
                sin: torch.Tensor) -> torch.Tensor:
        """ids [B, P] -> logits of the last position [B, V]; fills the caches' prompt part."""
        seq = ids.shape[1]
        h = self._embed(ids)
        c, s = cos[:seq], sin[:seq]
        for layer, cache in zip(self.layers, caches, strict=True):
            q, k, v = self._qkv(layer, h, c, s)
            cache.prompt_k.copy_(k)
            cache.prompt_v.copy_(v)
            attn = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scaling,
                                                  enable_gqa=True)
            h = self._mlp_and_output(layer, h, attn.transpose(1, 2))
        return self._logits(h[:, -1])

    def decode(self, ids: torch.Tensor, caches: list[KVCache], history: BeamHistory,
               beams: int, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """One token per row: ids [B*beams] -> logits [B*beams, V]."""
        rows = ids.shape[0]
        batch = rows // beams
        position = caches[0].prompt_k.shape[2] + history.length
        step = history.length
        if self._bound:
            logits = self._plan.step(ids.contiguous(), position, step)
            history.length += 1
            return logits
        c, s = cos[position: position + 1], sin[position: position + 1]
        h = self._embed(ids).unsqueeze(1)  # [R, 1, H]
        group = self.heads // self.kv_heads
        d = self.head_dim
        for layer, cache in zip(self.layers, caches, strict=True):
            q, k, v = self._qkv(layer, h, c, s)  # q [R, heads, 1, d], k/v [R, kv, 1, d]
            cache.gen_k[:, :, step: step + 1].copy_(k)
            cache.gen_v[:, :, step: step + 1].copy_(v)
            if beams == 1:  # attend over the buffer's filled prefix
                keys, values = cache.k[:, :, : position + 1], cache.v[:, :, : position + 1]
                if keys.dtype != torch.float32:
                    keys, values = keys.float(), values.float()
                # Plain matmul-softmax-matmul: for one query row, torch's CPU SDPA (a flash
                # kernel with per-call thread set-up) costs more than the arithmetic.
                qg = q.reshape(rows, self.kv_heads, group, d)
                scores = torch.matmul(qg, keys.transpose(-1, -2)).mul_(self.scaling)
                attn = torch.matmul(torch.softmax(scores, dim=-1), values)
                h = self._mlp_and_output(layer, h, attn.reshape(rows, 1, self.heads * d))
                continue
            # Scores against the prompt, shared by the beams of a sequence: [B, kv, beams*g, P].
            qp = q.view(batch, beams, self.kv_heads, group, d).permute(0, 2, 1, 3, 4)
            qp = qp.reshape(batch, self.kv_heads, beams * group, d)
            pk, pv = cache.prompt_k, cache.prompt_v
            if pk.dtype != torch.float32:
                pk, pv = pk.float(), pv.float()
            scores_prompt = torch.matmul(qp, pk.transpose(-1, -2)) * self.scaling
            # Scores against generated tokens, read through the beam history: [R, kv, g, t].
            gk, gv = self._generated(cache, history, step + 1)
            qg = q.view(rows, self.kv_heads, group, d)
            scores_gen = torch.matmul(qg, gk.transpose(-1, -2)) * self.scaling
            scores_prompt = scores_prompt.view(batch, self.kv_heads, beams, group, -1)
            scores_prompt = scores_prompt.permute(0, 2, 1, 3, 4).reshape(rows, self.kv_heads,
                                                                         group, -1)
            probs = torch.softmax(torch.cat((scores_prompt, scores_gen), dim=-1), dim=-1)
            prompt_len = pk.shape[2]
            probs_prompt = probs[..., :prompt_len].reshape(batch, beams, self.kv_heads, group,
                                                          prompt_len)
            probs_prompt = probs_prompt.permute(0, 2, 1, 3, 4).reshape(batch, self.kv_heads,
                                                                       beams * group, prompt_len)
            out_prompt = torch.matmul(probs_prompt, pv).view(batch, self.kv_heads, beams, group, d)
            out_prompt = out_prompt.permute(0, 2, 1, 3, 4).reshape(rows, self.kv_heads, group, d)
            out = out_prompt + torch.matmul(probs[..., prompt_len:], gv)
            h = self._mlp_and_output(layer, h, out.reshape(rows, 1, self.heads * d))
        history.length += 1
        return self._logits(h[:, 0])

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
        banned = self._eos_ids(kwargs)

        batch, prompt_len = ids.shape
        total = prompt_len + new_tokens
        if self.sliding_window and total > self.sliding_window:
            raise UserError(f"native backend: {total} tokens exceed the sliding window "
                            f"({self.sliding_window})")
        cos, sin = self._rope_tables(total)
        caches = [KVCache(batch, beams, self.kv_heads, self.head_dim, prompt_len, new_tokens,
                          self.kv_dtype) for _ in self.layers]
        history = BeamHistory(batch * beams, new_tokens, indirect=beams > 1)
        if streamer is not None:
            streamer.put(ids.cpu())

        plan = (self._compiled_plan()
                if self.use_compiled_step and batch * beams <= kernels.SMALL_M_MAX else None)
        if plan is not None:
            plan.bind([c.prompt_k for c in caches], [c.prompt_v for c in caches],
                      [c.gen_k for c in caches], [c.gen_v for c in caches],
                      cos.contiguous(), sin.contiguous(),
                      history.table if history.indirect else None, beams)
        self._bound = plan is not None
        try:
            with torch.inference_mode():
                sequences = self._generate(ids, caches, history, beams, new_tokens, banned,
                                           criteria, streamer, do_sample, settings, cos, sin)
        finally:
            self._bound = False
        if streamer is not None:
            streamer.end()
        return sequences

    def _generate(self, ids, caches, history, beams, new_tokens, banned, criteria, streamer,
                  do_sample, settings, cos, sin) -> torch.Tensor:
        """Prefill, then one decode step per new token (greedy or sampling), or beam search."""
        logits = self.prefill(ids, caches, cos, sin)
        if beams > 1:
            return self._beam_search(ids, logits, caches, history, beams, new_tokens, banned,
                                     criteria, cos, sin)
        sequences = ids
        for step in range(new_tokens):
            if step:
                logits = self.decode(sequences[:, -1], caches, history, 1, cos, sin)
            token = self._pick(logits, banned, do_sample, settings)
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
        logprobs = self._log_softmax(logits, banned)  # [B, V]: all beams start the same
        scores, tokens = logprobs.topk(beams, dim=-1)  # [B, beams]
        rows = batch * beams
        generated = tokens.reshape(rows, 1)
        beam_scores = scores.reshape(rows)
        offsets = (torch.arange(batch) * beams).repeat_interleave(beams)
        full = torch.cat((ids.repeat_interleave(beams, dim=0), generated), dim=1)
        for criterion in criteria:
            criterion(full, None)
        for _ in range(1, new_tokens):
            logits = self.decode(generated[:, -1], caches, history, beams, cos, sin)
            logprobs = self._log_softmax(logits, banned) + beam_scores[:, None]
            flat = logprobs.view(batch, beams * vocab)
            top_scores, top_index = flat.topk(beams, dim=-1)
            parents = (top_index // vocab).reshape(rows) + offsets
            next_tokens = (top_index % vocab).reshape(rows)
            history.reorder(parents)
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
        eos = kwargs.get("eos_token_id", self.generation_config.eos_token_id)
        if eos is None:
            return []
        return [int(e) for e in (eos if isinstance(eos, list | tuple) else [eos])]

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


def prepare(model: Any, *, dtype: str, family: str, kv_cache_dtype: str,
            place_weights: bool = True) -> PreparedModel:
    if family not in NATIVE_FAMILIES:
        from llmbench.backends import stock

        prepared = stock.prepare(model)
        note = (f"native backend does not cover family '{family}' yet "
                f"(covered: {', '.join(NATIVE_FAMILIES)}): this run is STOCK transformers")
        return PreparedModel(model=prepared.model, backend="stock",
                             details={**prepared.details, "requested": "native",
                                      "fallback_reason": note})
    if dtype not in ("float32", "bfloat16"):
        raise UserError(f"native backend runs float32 and bfloat16 weights, not {dtype}")
    native = NativeModel(model, kv_cache_dtype)
    if place_weights:
        native.place_weights()
    return PreparedModel(model=native, backend="native", details={
        "kernels": kernels.isa(),
        "kernels_built": kernels.available(),
        "kernels_import_error": kernels.import_error(),
        "activation_dtype": "float32",
        **({"prefill_matmul": prefill_matmul()} if dtype == "bfloat16" else {}),
        "kv_cache_dtype": str(native.kv_dtype).replace("torch.", ""),
        "tied_embedding": native.tied,
        "weight_bytes_per_token": native.weight_bytes,
    })
