"""The native backend across ranks (`--autotp --backend native`): each rank keeps a slice of
every projection of a NativeModel, Megatron-style, and the partial sums are all-reduced inside
the decode step (the compiled C++ step calls the all-reduce itself, DecodePlan.set_all_reduce).

How a model is cut for `world` ranks:
- attention by query heads, as evenly as the count allows, each rank with the KV heads its
  query heads read (SmolLM2's 9 heads and 3 KV heads over 2 ranks: 5 + 4 query heads, KV
  heads 0-1 and 1-2, the middle one computed and cached on both); qkv is cut by rows (column
  parallel), o by those heads' input columns (row parallel, bias on rank 0 only);
- the MLP's hidden units as evenly as whole grains allow (32 units, or the quantization group
  of `down`); gate_up by rows, down by columns (bias on rank 0 only); a mixture-of-experts
  layer cuts every expert (and shared expert) so, with its router whole on every rank;
- lm_head by vocabulary rows; the logits are gathered with one all-reduce (zeros elsewhere), so
  every rank picks the same token;
- the embedding, the norms and the RoPE tables whole on every rank.
Weight-only INT8 / INT4 projections are cut from the single-instance quantization (rows of a
quantized matrix, or whole groups of its input channels), so a rank computes with the very
integers and scales one process would.

- multi-head latent attention (DeepSeek) by query heads: q (or q's bottleneck-up q_b) by the
  heads' rows, the absorbed per-head W_uk / W_uv by heads, o by columns; the compressed latent
  (kv_a and its norm) is one "KV head" that every head reads, so every rank computes and caches
  it whole;
- cross-attention (T5, Whisper, mllama) by the same KV-head groups as self-attention: q by
  rows, the encoder's k and v by rows (so each rank computes, once per prompt, only its heads'
  keys and values), o by columns; T5's relative position bias keeps this rank's heads;
- Mamba layers (Jamba) are not cut: every rank runs the mixer whole (its output is then whole,
  with no all-reduce), so a Jamba rank reads its Mamba weights in full.
The encoder of an encoder-decoder runs whole on every rank, once per prompt.

- fewer KV heads than ranks (multi-query attention: Falcon-7B, StarCoder): each KV head is
  replicated on world / kv_heads ranks, which share out its query heads; each of those ranks
  computes and caches that KV head whole (it is small: one head of keys and values).
Not cut (Unsupported: the run falls back to DeepSpeed AutoTP, with the reason in the report):
fewer query heads than ranks, and a KV-head count that does not divide the ranks when it is
smaller.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from llmbench.backends.blocks import Unsupported


@dataclass
class Communicator:
    """How a rank sums partial results with the others."""

    rank: int
    world: int
    # an in-place operator the compiled step calls through the dispatcher (no Python), e.g.
    # "deepspeed::inference_all_reduce_" (DeepSpeed's shared-memory all-reduce); "" for none
    op: str
    all_reduce: Callable[[torch.Tensor], Any]  # in place, from Python (the torch-op path)
    description: str


def _even(count: int, world: int) -> list[int]:
    """count split into world runs as even as possible, the larger first."""
    return [count // world + (1 if r < count % world else 0) for r in range(world)]


def _even_steps(count: int, world: int, step: int) -> list[int]:
    """count split into world runs as even as possible in whole steps (every run but the last
    a multiple of `step`, the remainder on the last); plain _even where that leaves a run
    empty."""
    if step <= 1 or count // step < world:
        return _even(count, world)
    runs = [n * step for n in _even(count // step, world)]
    runs[-1] += count - sum(runs)
    return runs


def _units(inter: int, world: int, grain: int) -> list[int]:
    """The MLP's hidden units per rank: as even as whole grains allow. (Not evened out against
    uneven attention: the ranks meet at an all-reduce after attention and again after the MLP,
    so each part's slowest rank sets the step time; shifting MLP units to the rank with fewer
    heads measured slower on SmolLM2, 3 KV heads over 2 ranks.) grain 0: float weights, cut
    in 32s, or in halves of that down to 8 where an MLP (a small expert) is narrower than 32
    per rank; else the quantization group, which a cut cannot split."""
    if grain == 0:
        grain = 32
        while grain > 8 and inter // grain < world:
            grain //= 2
    grains = _even(inter // grain, world)
    units = [g * grain for g in grains]
    units[-1] += inter - sum(units)
    return units


def _rows(linear: Any, index: torch.Tensor, name: str) -> Any:
    from llmbench.backends.native import Linear
    from llmbench.quant.autotp import rows_of
    from llmbench.quant.linears import Int4Linear, Int8Linear

    if isinstance(linear, Linear):
        bias = None if linear.bias is None else linear.bias[index]
        return Linear(linear.weight[index].contiguous(), bias)
    if isinstance(linear, Int8Linear | Int4Linear):
        sliced = rows_of(linear, index.tolist())
        _copy_compute(linear, sliced)
        return sliced
    if getattr(linear, "kind", None) == "concat":  # parts that could not be fused (act-order
        # INT4 with a permutation each): each part's own rows of `index`, in order
        if not torch.equal(index, torch.sort(index).values):
            raise Unsupported(f"tensor parallel native: {name} is cut out of order")
        parts, first = [], 0
        for part in linear.parts:
            mine = index[(index >= first) & (index < first + part.out_features)] - first
            if mine.numel():
                parts.append(_rows(part, mine, name))
            first += part.out_features
        return type(linear)(parts)
    raise Unsupported(f"tensor parallel native: {name} is {getattr(linear, 'kind', linear)}, "
                      "which is not cut across ranks (float, INT8 and INT4 are)")


def _columns(linear: Any, start: int, width: int, keep_bias: bool, name: str) -> Any:
    from llmbench.backends.native import Linear
    from llmbench.quant.autotp import columns_of
    from llmbench.quant.linears import Int4Linear, Int8Linear

    if isinstance(linear, Linear):
        bias = linear.bias if keep_bias else None
        return Linear(linear.weight[:, start:start + width].contiguous(), bias)
    if isinstance(linear, Int8Linear | Int4Linear):
        if isinstance(linear, Int8Linear) and linear.scales.dim() != 1:
            raise Unsupported(f"tensor parallel native: {name} is grouped INT8")
        sliced = columns_of(linear, start, width, name)
        sliced.bias = linear.bias if keep_bias else None
        _copy_compute(linear, sliced)
        return sliced
    raise Unsupported(f"tensor parallel native: {name} is {getattr(linear, 'kind', linear)}, "
                      "which is not cut across ranks (float, INT8 and INT4 are)")


def _copy_compute(source: Any, target: Any) -> None:
    """How the projection computes (--lowp-mode's int8 activations) carries over to its slice."""
    for attr in ("act_qmax", "act_levels"):
        if hasattr(source, attr):
            setattr(target, attr, getattr(source, attr))


def check(native: Any, world: int) -> None:
    """Unsupported (with the reason) when this model is not cut across `world` ranks."""
    if native.heads < world:
        raise Unsupported(f"tensor parallel native: {native.heads} attention heads for "
                          f"{world} ranks (each rank takes whole heads)")
    if native.block.latent is not None or native.kv_heads >= world:
        return
    if world % native.kv_heads:
        raise Unsupported(f"tensor parallel native: {native.kv_heads} KV heads for {world} "
                          "ranks (with fewer KV heads than ranks, each KV head is replicated on "
                          "the same number of ranks, which split its query heads)")


def head_step(native: Any, o_group: int) -> int:
    """Query heads per rank boundary so that the output projection's column cut falls on its
    quantization groups (o_group input channels; 0: float, any head): SmolLM2's 64-wide heads
    with INT4 groups of 128 cut at even heads."""
    if o_group <= 0:
        return 1
    width = native.block.latent.v_dim if native.block.latent is not None else native.head_dim
    return o_group // math.gcd(o_group, width)


def attention_split(native: Any, world: int, cross: bool,
                    step: int = 1) -> list[tuple[int, int, int, int]]:
    """Per rank: (first KV head, KV heads, first query head, query heads). Latent attention:
    query heads, the latent (one KV head every head reads) whole on every rank. KV heads >=
    ranks: the query heads as evenly as the count allows, each rank with the KV heads its
    query heads read; where a KV head's group straddles two ranks, both compute and cache it
    (SmolLM2's 9 heads over 2 ranks: 5 + 4, KV heads 0-1 and 1-2; cut by whole KV heads, 2 + 1,
    one rank waited for the other after every attention). Models with cross-attention keep
    whole groups per rank (its batched GEMMs need them). Fewer KV heads than ranks: each KV
    head on world / kv_heads ranks, which split its query heads as evenly as the count allows
    (Falcon-7B's 71 over 2: 36 + 35). step: query heads between rank boundaries (head_step),
    where the count allows."""
    if native.block.latent is not None:
        split = _even_steps(native.heads, world, step)
        return [(0, 1, sum(split[:r]), split[r]) for r in range(world)]
    group = native.heads // native.kv_heads
    if native.kv_heads >= world:
        if cross:
            split = _even(native.kv_heads, world)
            return [(sum(split[:r]), split[r], sum(split[:r]) * group, split[r] * group)
                    for r in range(world)]
        heads = _even_steps(native.heads, world, step)
        out = []
        for r in range(world):
            q_first = sum(heads[:r])
            first, last = q_first // group, (q_first + heads[r] - 1) // group
            out.append((first, last - first + 1, q_first, heads[r]))
        return out
    share = world // native.kv_heads
    counts = _even(group, share)  # query heads per rank within each KV head's group
    return [(r // share, 1, (r // share) * group + sum(counts[:r % share]), counts[r % share])
            for r in range(world)]


def kv_map(native: Any, split: tuple[int, int, int, int]) -> list[int] | None:
    """The local KV head each of a rank's query heads reads, or None where they are whole
    groups of its KV heads (the compiled step's and the torch path's usual grouping)."""
    if native.block.latent is not None:
        return None
    first, count, q_first, heads = split
    group = native.heads // native.kv_heads
    local = [(q_first + h) // group - first for h in range(heads)]
    if heads % count == 0 and local == [h // (heads // count) for h in range(heads)]:
        return None
    return local


def _down_of(layer: Any) -> Any:
    return layer.down if layer.down is not None else layer.experts[0].down


def _grain(layer: Any) -> int:
    group = getattr(_down_of(layer), "group_size", 0)
    return group if group and group > 0 else 0


def _width(down: Any) -> int:
    return down.in_features if hasattr(down, "in_features") else down.weight.shape[1]


def _cut_mlp(owner: Any, rank: int, world: int, grain: int, gated: bool, name: str) -> int:
    """owner.gate_up / owner.down (a dense MLP, an expert, a shared expert) cut to this rank's
    hidden units; returns how many it keeps."""
    inter = _width(owner.down)
    units = _units(inter, world, grain)
    start, width = sum(units[:rank]), units[rank]
    if width == 0:
        raise Unsupported(f"tensor parallel native: {name} is too narrow for {world} ranks")
    rows = torch.arange(start, start + width)
    owner.gate_up = _rows(owner.gate_up, torch.cat((rows, rows + inter)) if gated else rows,
                          f"{name}.gate_up")
    owner.down = _columns(owner.down, start, width, rank == 0, f"{name}.down")
    return width


@dataclass
class _HeadSlice:
    """T5's relative position bias (a callable giving [heads, queries, keys]) for a run of
    heads."""

    bias: Callable[..., torch.Tensor]
    first: int
    count: int

    def __call__(self, *args: Any) -> torch.Tensor:
        return self.bias(*args)[self.first:self.first + self.count]


def _cut_latent(layer: Any, native: Any, latent: Any, q_first: int, heads: int, rank: int,
                name: str) -> None:
    """Multi-head latent attention: this rank's query heads of q (or of q_b, when q goes
    through its bottleneck: the fused qkv [q_a | kv_a] stays whole), of the absorbed W_uk and
    W_uv, and o's columns of their values."""
    qd = latent.nope_dim + latent.rope_dim
    q_rows = torch.arange(q_first * qd, (q_first + heads) * qd)
    if layer.q_b is not None:
        layer.q_b = _rows(layer.q_b, q_rows, f"{name}.q_b")
    else:  # qkv = [q of every head | rotary key and latent]: this rank's q, the latent whole
        kv_width = latent.rope_dim + latent.kv_rank
        kv_rows = native.heads * qd + torch.arange(kv_width)
        layer.qkv = _rows(layer.qkv, torch.cat((q_rows, kv_rows)), f"{name}.qkv")
    layer.w_uk = layer.w_uk[q_first:q_first + heads].contiguous()
    layer.w_uv = layer.w_uv[q_first:q_first + heads].contiguous()
    layer.o = _columns(layer.o, q_first * latent.v_dim, heads * latent.v_dim, rank == 0,
                       f"{name}.o")


def _cut_cross(layer: Any, native: Any, first: int, count: int, q_first: int, heads: int,
               rank: int, name: str) -> None:
    """Cross-attention: the same KV heads and query heads as the layer's self-attention."""
    d = native.head_dim
    kv_heads = _rows_out(layer.cross_kv) // (2 * d)
    if kv_heads != native.kv_heads:
        raise Unsupported(f"tensor parallel native: {name}'s cross-attention has {kv_heads} "
                          f"KV heads, its self-attention {native.kv_heads}")
    k_rows = torch.arange(first * d, (first + count) * d)
    layer.cross_kv = _rows(layer.cross_kv, torch.cat((k_rows, k_rows + kv_heads * d)),
                           f"{name}.cross_kv")
    layer.cross_q = _rows(layer.cross_q, torch.arange(q_first * d, (q_first + heads) * d),
                          f"{name}.cross_q")
    layer.cross_o = _columns(layer.cross_o, q_first * d, heads * d, rank == 0,
                             f"{name}.cross_o")


def _rows_out(linear: Any) -> int:
    return linear.out_features if hasattr(linear, "out_features") else linear.weight.shape[0]


class Cutter:
    """One rank's cut of a NativeModel, a layer at a time: `layer` cuts one decoder layer
    (before the next is even loaded, when the model is loaded layer by layer:
    llmbench.distributed.native_load), `finish` the lm_head and the model's own sizes."""

    def __init__(self, native: Any, comm: Communicator, cross: bool, first: Any) -> None:
        """native: the model's sizes (heads, kv_heads, head_dim, block) set, its layers not
        needed yet; cross: its layers have cross-attention (whole KV-head groups per rank);
        first: the first decoder layer, quantized as it will run (the output projection's
        groups set where ranks may split the heads)."""
        world, rank = comm.world, comm.rank
        check(native, world)
        self.native, self.comm, self.world, self.rank = native, comm, world, rank
        d = native.head_dim
        self.latent = native.block.latent
        o_group = getattr(first.o, "group_size", 0) if first.o is not None else 0
        self.split = attention_split(native, world, cross,
                                     head_step(native, o_group if o_group > 0 else 0))
        first, count, q_first, heads = self.split[rank]
        self.local_kv = kv_map(native, self.split[rank])
        q_rows = torch.arange(q_first * d, (q_first + heads) * d)
        k_rows = native.heads * d + torch.arange(first * d, (first + count) * d)
        self.qkv_rows = torch.cat((q_rows, k_rows, k_rows + native.kv_heads * d))
        self.gated = native.block.mlp == "gated"
        self.grain = self.units = None  # from the first layer cut
        self.width = 0

    def layer(self, index: int, layer: Any) -> None:
        """Cut one decoder layer (float, or with quantized projections installed) in place."""
        native, rank, world = self.native, self.rank, self.world
        d = native.head_dim
        first, count, q_first, heads = self.split[rank]
        if self.grain is None:
            self.grain = _grain(layer)
            self.units = _units(_width(_down_of(layer)), world, self.grain)
        if self.latent is not None:
            _cut_latent(layer, native, self.latent, q_first, heads, rank, f"layers.{index}")
        elif layer.qkv is not None:  # (a Mamba layer has none: it runs whole on every rank)
            layer.qkv = _rows(layer.qkv, self.qkv_rows, f"layers.{index}.qkv")
            layer.o = _columns(layer.o, q_first * d, heads * d, rank == 0, f"layers.{index}.o")
        if layer.cross_q is not None:
            _cut_cross(layer, native, first, count, q_first, heads, rank, f"layers.{index}")
        # A mixture-of-experts layer: every expert cut like a dense MLP (its units shared out
        # over the ranks), the router whole on every rank, so each rank routes alike
        mlps = ([(layer, f"layers.{index}")] if layer.down is not None else
                [(expert, f"layers.{index}.experts.{e}") for e, expert in enumerate(layer.experts)])
        if layer.shared is not None:
            mlps.append((layer.shared, f"layers.{index}.shared"))
        for owner, name in mlps:
            kept = _cut_mlp(owner, rank, world, self.grain, self.gated, name)
            self.width = self.width or kept

    def finish(self) -> None:
        """The lm_head's vocabulary rows, the position biases' heads, and the model's sizes
        and all-reduce: call once every layer is cut."""
        native, rank, world, split = self.native, self.rank, self.world, self.split
        _, count, q_first, heads = split[rank]
        vocab = _rows_out(native.lm_head)
        per = -(-vocab // world)
        first, last = rank * per, min(vocab, (rank + 1) * per)
        native.lm_head = _rows(native.lm_head, torch.arange(first, last), "lm_head")
        native.vocab = (vocab, first, last)
        if native.alibi_slopes is not None:
            native.alibi_slopes = native.alibi_slopes[q_first:q_first + heads].contiguous()
        if native.relative_bias is not None:  # T5: [heads, queries, keys] -> this rank's heads
            native.relative_bias = _HeadSlice(native.relative_bias, q_first, heads)
        native.heads, native.intermediate = heads, self.width
        if self.latent is None:
            native.kv_heads = count
            native.set_kv_map(self.local_kv)
        native.comm = self.comm
        native.tp_split = {"kv_heads": [kv for _, kv, _, _ in split],
                           "heads": [n for _, _, _, n in split], "mlp_units": self.units}
        share = 1 if self.latent is not None else max(1, world // native.block.kv_heads)
        if share > 1:  # ranks per KV head
            native.tp_split["kv_replicated_on_ranks"] = share
        shared = sum(kv for _, kv, _, _ in split) - native.block.kv_heads
        if self.latent is None and share == 1 and shared > 0:  # groups straddling two ranks
            native.tp_split["kv_heads_on_two_ranks"] = shared
        if any(layer.mamba is not None for layer in native.layers):
            native.tp_split["mamba"] = "whole on every rank"
        native._plan, native._plan_note = None, ""  # rebuilt over the slices


def shard(native: Any, comm: Communicator) -> None:
    """Cut `native` (a NativeModel, float or with quantized projections installed) to this
    rank's slice, in place, and make its steps all-reduce through `comm`."""
    cutter = Cutter(native, comm, any(layer.cross_q is not None for layer in native.layers),
                    native.layers[0])
    for index, layer in enumerate(native.layers):
        cutter.layer(index, layer)
    cutter.finish()


def communicator(rank: int, world: int, shared_memory: bool) -> Communicator:
    """The all-reduce a rank uses: DeepSpeed's shared-memory operator when every rank is on
    this machine and it is built, called by the C++ step through the dispatcher; else the
    process group's (gloo, or oneCCL where installed), which the step calls back into Python
    for. LLMBENCH_TP_ALL_REDUCE=python makes the step call the shared-memory operator through
    Python too (benchmarks/native_tp.py compares the two)."""
    import os

    import torch.distributed as dist

    if shared_memory:
        op = torch.ops.deepspeed.inference_all_reduce_
        if os.environ.get("LLMBENCH_TP_ALL_REDUCE", "dispatcher") == "python":
            return Communicator(rank, world, "", op, "deepspeed shared-memory all-reduce, "
                                "called from the C++ step through Python")
        return Communicator(rank, world, "deepspeed::inference_all_reduce_", op,
                            "deepspeed shared-memory all-reduce, called inside the C++ step")
    return Communicator(rank, world, "", dist.all_reduce,
                        f"{dist.get_backend()} process group all-reduce, called from the C++ "
                        "step through Python")


__all__ = ["Communicator", "check", "communicator", "shard"]
