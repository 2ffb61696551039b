"""The native backend across ranks (`--autotp --backend native`): each rank keeps a slice of
every projection of a NativeModel, Megatron-style, and the partial sums are all-reduced inside
the decode step (the compiled C++ step calls the all-reduce itself, DecodePlan.set_all_reduce).

How a model is cut for `world` ranks:
- attention by KV-head groups: each rank takes a run of whole KV heads (as even as the count
  allows: SmolLM2's 3 over 2 ranks is 2 + 1) with the query heads that read them; qkv is cut by
  rows (column parallel), o by those heads' input columns (row parallel, bias on rank 0 only);
- the MLP's hidden units as evenly as whole grains allow (32 units, or the quantization group
  of `down`); gate_up by rows, down by columns (bias on rank 0 only); a mixture-of-experts
  layer cuts every expert (and shared expert) so, with its router whole on every rank;
- lm_head by vocabulary rows; the logits are gathered with one all-reduce (zeros elsewhere), so
  every rank picks the same token;
- the embedding, the norms and the RoPE tables whole on every rank.
Weight-only INT8 / INT4 projections are cut from the single-instance quantization (rows of a
quantized matrix, or whole groups of its input channels), so a rank computes with the very
integers and scales one process would.

Not cut (Unsupported: the run falls back to DeepSpeed AutoTP, with the reason in the report):
multi-head latent attention, Mamba layers, encoder-decoders, and fewer KV heads than ranks.
"""

from __future__ import annotations

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


def _units(inter: int, world: int, grain: int) -> list[int]:
    """The MLP's hidden units per rank: as even as whole grains allow. (Not evened out against
    uneven attention: the ranks meet at an all-reduce after attention and again after the MLP,
    so each part's slowest rank sets the step time; shifting MLP units to the rank with fewer
    heads measured slower on SmolLM2, 3 KV heads over 2 ranks.)"""
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
    block = native.block
    reasons = []
    if block.latent is not None:
        reasons.append("multi-head latent attention")
    if any(layer.mamba is not None for layer in native.layers):
        reasons.append("Mamba layers")
    if native.encoder is not None:
        reasons.append("an encoder-decoder")
    if reasons:
        raise Unsupported(f"tensor parallel native does not cut {', '.join(reasons)} yet")
    if native.kv_heads < world:
        raise Unsupported(f"tensor parallel native: {native.kv_heads} KV heads for {world} "
                          "ranks (each rank takes whole KV heads)")


def _down_of(layer: Any) -> Any:
    return layer.down if layer.down is not None else layer.experts[0].down


def _grain(native: Any) -> int:
    group = getattr(_down_of(native.layers[0]), "group_size", 0)
    return group if group and group > 0 else 32


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


def shard(native: Any, comm: Communicator) -> None:
    """Cut `native` (a NativeModel, float or with quantized projections installed) to this
    rank's slice, in place, and make its steps all-reduce through `comm`."""
    world, rank = comm.world, comm.rank
    check(native, world)
    d = native.head_dim
    group = native.heads // native.kv_heads
    kv_split = _even(native.kv_heads, world)
    kv_first = sum(kv_split[:rank])
    kv = kv_split[rank]
    heads = kv * group
    nq, nkv = native.heads * d, native.kv_heads * d
    q_rows = torch.arange(kv_first * group * d, (kv_first + kv) * group * d)
    k_rows = nq + torch.arange(kv_first * d, (kv_first + kv) * d)
    qkv_rows = torch.cat((q_rows, k_rows, k_rows + nkv))
    grain = _grain(native)
    units = _units(_width(_down_of(native.layers[0])), world, grain)
    gated = native.block.mlp == "gated"
    q_start = kv_first * group * d
    width = 0
    for i, layer in enumerate(native.layers):
        layer.qkv = _rows(layer.qkv, qkv_rows, f"layers.{i}.qkv")
        layer.o = _columns(layer.o, q_start, heads * d, rank == 0, f"layers.{i}.o")
        # A mixture-of-experts layer: every expert cut like a dense MLP (its units shared out
        # over the ranks), the router whole on every rank, so each rank routes alike
        mlps = ([(layer, f"layers.{i}")] if layer.down is not None else
                [(expert, f"layers.{i}.experts.{e}") for e, expert in enumerate(layer.experts)])
        if layer.shared is not None:
            mlps.append((layer.shared, f"layers.{i}.shared"))
        for owner, name in mlps:
            kept = _cut_mlp(owner, rank, world, grain, gated, name)
            width = width or kept
    vocab = (native.lm_head.out_features if hasattr(native.lm_head, "out_features")
             else native.lm_head.weight.shape[0])
    per = -(-vocab // world)
    first, last = rank * per, min(vocab, (rank + 1) * per)
    native.lm_head = _rows(native.lm_head, torch.arange(first, last), "lm_head")
    native.vocab = (vocab, first, last)
    if native.alibi_slopes is not None:
        native.alibi_slopes = native.alibi_slopes[kv_first * group:
                                                  (kv_first + kv) * group].contiguous()
    native.heads, native.kv_heads, native.intermediate = heads, kv, width
    native.comm = comm
    native.tp_split = {"kv_heads": kv_split, "heads": [k * group for k in kv_split],
                       "mlp_units": units}
    native._plan, native._plan_note = None, ""  # rebuilt over the slices


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
