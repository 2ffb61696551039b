"""Weight-only quantization under DeepSpeed AutoTP: every rank quantizes its own slice.

As IPEX's DeepSpeed script does, each rank first loads its tensor-parallel slice of the float
model (llmbench.distributed.model.load_autotp_model), then quantizes that slice
round-to-nearest with the single-instance code (rtn.quantize_weight, apply.projection_scheme).
No quantized model
is saved or loaded: a saved quantized model is whole, and would have to be cut the way AutoTP
cuts the float one.

DeepSpeed 0.19.8 replaces each nn.Linear it splits by one of three layers (module_inject/
layers.py); each is replaced here by a module that runs our quantized linear and then does the
collective the DeepSpeed layer did:
- LinearLayer (column parallel: this rank's slice of the output features; no collective in
  inference) -> QuantizedLinear on the slice, bias included;
- LinearAllreduce (row parallel: this rank's slice of the input features) -> the partial
  product, `deepspeed.comm.inference_all_reduce` over the layer's mp_group, then the bias;
- LmHeadLinearAllreduce (row parallel, cuts its own input slice) -> the same after cutting.
A plain nn.Linear AutoTP kept whole is quantized the single-instance way. Any other DeepSpeed
tensor-parallel layer class is refused (`UserError`): its forward is not one of the three above,
and running it in float would benchmark a partly quantized model.

Grouping: quantization groups of a row-parallel layer are over the rank's slice of the input
channels. Where every slice width is a multiple of the group size, the slices start on group
boundaries and the groups are the whole model's; otherwise quantize_weight would zero-pad a
partial last group per slice, a grouping the single-instance model does not have, so that is
refused with a group size that fits. Per-channel scales (INT8, FP8, the 4-bit schemes' INT8
lm_head) of a row-parallel layer cover the rank's slice of the row, not the whole row: the
report says so.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from llmbench.errors import UserError
from llmbench.quant.apply import projection_scheme, quantization_details, with_compute
from llmbench.quant.linears import Int4Linear, Int8Linear, QuantizedLinear
from llmbench.quant.rtn import quantize_weight
from llmbench.quant.scheme import MIN_GROUP, MIN_IN_FEATURES, Scheme

APPLIED = "quantized per rank after sharding"
CHECKPOINT_APPLIED = "the checkpoint's INT4 projections, each rank's slice cut from them"


# ---- the tensor-parallel modules -------------------------------------------------------------


class RowParallelQuantized(torch.nn.Module):
    """DeepSpeed's LinearAllreduce with a quantized weight: this rank's partial product over its
    slice of the input features, summed over the ranks, then the (replicated) bias, as
    LinearAllreduce.forward does in inference."""

    def __init__(self, inner: Any, mp_group: Any, bias: torch.Tensor | None,
                 in_features: int) -> None:
        from deepspeed import comm as dist
        from deepspeed.comm import pg_utils

        super().__init__()
        self.all_reduce = dist.inference_all_reduce  # what LinearAllreduce calls in inference
        self.linear = QuantizedLinear(inner)  # no bias inside: it is added after the sum
        self.mp_group = mp_group
        self.parallel = pg_utils.is_parallel(mp_group)
        self.bias = (None if bias is None else
                     torch.nn.Parameter(bias.detach().clone(), requires_grad=False))
        self.in_features = in_features  # the whole layer's
        self.out_features = inner.out_features

    def local_input(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(self.local_input(x))
        if self.parallel:
            self.all_reduce(y, group=self.mp_group)
        if self.bias is not None:
            y += self.bias
        return y

    def extra_repr(self) -> str:
        return f"{self.linear.inner.kind} slice, all-reduced"


class LmHeadRowParallelQuantized(RowParallelQuantized):
    """DeepSpeed's LmHeadLinearAllreduce with a quantized weight: it gets the whole hidden state
    and cuts this rank's slice itself."""

    def __init__(self, inner: Any, mp_group: Any, bias: torch.Tensor | None, in_features: int,
                 offset: int) -> None:
        super().__init__(inner, mp_group, bias, in_features)
        self.offset = offset
        self.width = inner.in_features

    def local_input(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise RuntimeError(f"lm_head was split for {self.in_features} input features, got "
                               f"{x.shape[-1]}")
        return x[..., self.offset:self.offset + self.width].contiguous()


# ---- quantizing a rank's model ---------------------------------------------------------------


@dataclass
class Projection:
    """One linear layer of the rank's model and how it is split."""

    name: str
    module: Any
    split: str  # "column", "row", "lm_head" (row, cuts its own input), "whole"
    in_features: int  # of the whole layer
    partition_sizes: tuple[int, ...] = ()  # row splits: every rank's slice width
    tp_index: int = 0


@dataclass
class TPQuantization:
    """What quantize_autotp did on this rank."""

    scheme: Scheme
    qlinears: dict[str, Any] = field(default_factory=dict)
    splits: dict[str, str] = field(default_factory=dict)  # quantized name -> split
    left_float: dict[str, str] = field(default_factory=dict)  # name -> why
    row_slices: dict[str, list[int]] = field(default_factory=dict)  # layer pattern -> widths
    row_per_channel: list[str] = field(default_factory=list)  # scales over the rank's slice
    empty_slices: list[str] = field(default_factory=list)  # row-parallel, width 0 on this rank
    seconds: float = 0.0  # set by the caller: how long quantizing took
    applied: str = APPLIED  # or CHECKPOINT_APPLIED

    def details(self) -> dict[str, Any]:
        """The report's quantization section: the single-instance one, plus the split."""
        details = quantization_details(self.qlinears, self.scheme)
        counts = {kind: sum(1 for split in self.splits.values() if split == kind)
                  for kind in ("column", "row", "lm_head", "whole")}
        details.update({
            "applied": self.applied,
            "quantized_projections_per_rank": len(self.qlinears),
            "float_projections_per_rank": len(self.left_float),
            "float_projections": dict(self.left_float),
            "empty_slices_on_this_rank": list(self.empty_slices),
            "splits_per_rank": counts,
            "row_parallel_slice_widths": dict(self.row_slices),
        })
        if self.row_per_channel:
            details["row_parallel_scales"] = (
                f"the per-channel scales of {len(self.row_per_channel)} row-parallel "
                "projection(s) cover "
                "each rank's slice of the input channels (a single instance's cover the whole "
                "row)")
        return details

    @property
    def nbytes(self) -> int:
        return sum(q.nbytes for q in self.qlinears.values())


def _pattern(name: str) -> str:
    """model.layers.3.mlp.down_proj -> model.layers.*.mlp.down_proj (the report groups layers)."""
    return re.sub(r"\.\d+\.", ".*.", name)


def find_projections(model: torch.nn.Module) -> list[Projection]:
    """Every linear layer of the rank's model, with its split; refuses DeepSpeed layer classes
    whose forward is not one this module reproduces."""
    from deepspeed.module_inject import layers as ds

    found = []
    for name, module in model.named_modules():
        kind = type(module)
        if kind in (ds.LinearLayer, ds.LinearAllreduce, ds.LmHeadLinearAllreduce):
            if getattr(module, "defer_collectives_to_compiler", False) or getattr(
                    module, "gather_output", False):
                raise UserError(f"--autotp with weight-only quantization: {name} "
                                f"({kind.__name__}) defers or gathers its collectives, which "
                                "llmbench does not reproduce")
            if kind is ds.LinearLayer:
                found.append(Projection(name, module, "column", module.weight.shape[1]))
            else:
                sizes = tuple(int(s) for s in module._partition_sizes)
                found.append(Projection(name, module,
                                        "lm_head" if kind is ds.LmHeadLinearAllreduce else "row",
                                        sum(sizes), sizes, int(module.tp_index)))
        elif isinstance(module, ds.TensorParallel_Layer):
            if isinstance(module, ds.VocabParallelEmbedding | ds.HiddenParallelEmbedding):
                continue  # embeddings are never quantized, tensor parallel or not
            raise UserError(f"--autotp with weight-only quantization: {name} is DeepSpeed's "
                            f"{kind.__name__}, which llmbench can't quantize per rank (only "
                            "LinearLayer, LinearAllreduce and LmHeadLinearAllreduce); run it "
                            "without --autotp, or without quantization")
        elif isinstance(module, torch.nn.Linear):
            found.append(Projection(name, module, "whole", module.in_features))
    return found


def check_row_groups(projections: list[Projection], scheme: Scheme, output: Any) -> None:
    """Refuse group-wise quantization of a row-parallel slice whose width is not a multiple of
    the group size (see the module docstring). Every rank's widths are known on every rank, so
    all ranks refuse alike, before anything is quantized."""
    grouped = [(p, projection_scheme(scheme, p.module is output).group_size) for p in projections
               if p.split in ("row", "lm_head") and p.in_features >= MIN_IN_FEATURES]
    bad = [(p, group, width) for p, group in grouped if group != -1
           for width in p.partition_sizes if width % group]
    if not bad:
        return
    projection, group, width = bad[0]
    widths = [w for p, g in grouped if g != -1 for w in p.partition_sizes]
    common = math.gcd(*widths)
    fits = [g for g in (MIN_GROUP << b for b in range(9)) if common % g == 0]
    suggestion = (f"--group-size {fits[-1]}" if fits else "--group-size -1 (per channel)")
    raise UserError(f"--group-size {group}: the row-parallel slices of {projection.name} are "
                    f"{'/'.join(str(w) for w in projection.partition_sizes)} input channels "
                    f"wide, and {width} is not a multiple of {group}, so a rank's groups would "
                    f"not be the whole model's; use {suggestion}")


def quantize_autotp(model: torch.nn.Module, scheme: Scheme) -> TPQuantization:
    """Quantize this rank's slice of every linear layer in place (see the module docstring)."""
    import gc

    output = model.get_output_embeddings()
    projections = find_projections(model)
    check_row_groups(projections, scheme, output)
    result = TPQuantization(scheme)
    for p in projections:
        if p.in_features < MIN_IN_FEATURES:  # the single-instance rule, on the whole layer
            result.left_float[p.name] = f"{p.in_features} input features < {MIN_IN_FEATURES}"
            continue
        if p.module is output and not scheme.lm_head:
            result.left_float[p.name] = "output projection not in the scheme"
            continue
        own = projection_scheme(scheme, p.module is output)
        module = p.module
        if p.split in ("column", "whole"):
            inner = with_compute(quantize_weight(module.weight, module.bias, own), scheme)
            replacement: torch.nn.Module = QuantizedLinear(inner)
        else:
            if module.weight.shape[1] == 0:
                # DeepSpeed splits in grains of 64 input channels, so a layer narrower than
                # ranks x 64 leaves some rank nothing; its layer (an empty matmul, zeros, then
                # the all-reduce and the bias) stays as it is, holding no weight to quantize.
                result.empty_slices.append(p.name)
                continue
            inner = with_compute(quantize_weight(module.weight, None, own), scheme)
            if p.split == "lm_head":
                offset = sum(p.partition_sizes[:p.tp_index])
                replacement = LmHeadRowParallelQuantized(inner, module.mp_group, module.bias,
                                                         p.in_features, offset)
            else:
                replacement = RowParallelQuantized(inner, module.mp_group, module.bias,
                                                   p.in_features)
            result.row_slices.setdefault(_pattern(p.name), list(p.partition_sizes))
            if own.group_size == -1 and module.weight.shape[1] != p.in_features:
                result.row_per_channel.append(p.name)
        result.qlinears[p.name] = inner
        result.splits[p.name] = p.split
        model.set_submodule(p.name, replacement)
    gc.collect()  # the float slices are gone with the DeepSpeed layers
    return result


# ---- a GPTQ/AWQ folder under AutoTP ----------------------------------------------------------


def _row_keys(weight: torch.Tensor) -> list[bytes]:
    rows = weight.detach().float().contiguous()
    return [row.numpy().tobytes() for row in rows]


def rows_of(linear: Any, rows: list[int]) -> Any:
    index = torch.tensor(rows, dtype=torch.long)
    bias = None if linear.bias is None else linear.bias[index]
    if isinstance(linear, Int8Linear):  # a channel INT8 folder
        zeros = None if linear.zeros is None else linear.zeros[index]
        return Int8Linear(linear.qweight[index], linear.scales[index], zeros, bias)
    return Int4Linear(linear.packed[index], linear.scales[index], linear.zeros[index],
                      linear.group_size, linear.in_features, bias, linear.perm)


def columns_of(linear: Any, offset: int, width: int, name: str) -> Any:
    """This rank's input channels [offset, offset + width) of a checkpoint projection: whole
    groups of its integers, scales and zero points (no bias: it is added after the sum). INT8
    per channel: the columns, with each row's scale as it is."""
    if isinstance(linear, Int8Linear):
        return Int8Linear(linear.qweight[:, offset:offset + width].contiguous(), linear.scales,
                          linear.zeros, None)
    group = linear.group_size
    if linear.perm is not None:
        return act_order_columns(linear, offset, width, name)
    end = offset + width
    if offset % group or (width % group and end != linear.in_features):
        raise UserError(f"--autotp: {name} is split at input channel {offset} (+{width}), not on "
                        f"the checkpoint's groups of {group}; run it single instance")
    from llmbench import kernels

    q = kernels.unpack_int4(linear.packed)
    padded_end = linear.padded_in if end == linear.in_features else end
    padded_end += (-(padded_end - offset)) % group
    part = q[:, offset:padded_end]
    groups = slice(offset // group, -(-padded_end // group))
    return Int4Linear(kernels.pack_int4(part.contiguous()), linear.scales[:, groups],
                      linear.zeros[:, groups], group, width)


def act_order_columns(linear: Int4Linear, offset: int, width: int, name: str) -> Int4Linear:
    """columns_of for an act-order (desc_act) projection: its groups gather input channels from
    the whole row, so this rank's channels sit in every group and no run of whole groups holds
    them. The rank keeps every group, with the other ranks' channels weighted exactly zero (their
    level set to their group's zero point) and gathered as zeros (-1 in its permutation): the
    same sums of its own channels, for reading the whole projection instead of its share."""
    from llmbench import kernels

    q = kernels.unpack_int4(linear.packed)  # [N, padded_in], in the permuted order
    positions = torch.arange(linear.perm.numel())
    own = (linear.perm >= offset) & (linear.perm < offset + width)
    others = positions[~own]
    zeros = linear.zeros[:, others // linear.group_size]
    if others.numel() and (not torch.equal(zeros, zeros.round()) or zeros.min() < 0
                           or zeros.max() > 15):
        raise UserError(f"--autotp with an act-order (desc_act) checkpoint: {name}'s zero "
                        "points are not all 4-bit levels, so the other ranks' input channels "
                        "can't be weighted zero in this rank's slice; run it single instance, "
                        "or use a checkpoint made without act-order")
    q[:, others] = zeros.to(q.dtype)
    perm = torch.where(own, linear.perm - offset, torch.full_like(linear.perm, -1))
    return Int4Linear(kernels.pack_int4(q.contiguous()), linear.scales, linear.zeros,
                      linear.group_size, width, None, perm)


def slice_checkpoint_autotp(model: torch.nn.Module, whole: dict[str, Any],
                            scheme: Scheme) -> TPQuantization:
    """-m of a GPTQ/AWQ folder under --autotp: every rank loaded the folder (its projections
    converted, the float model holding their dequantized weights) and AutoTP sliced the float
    model; each INT4 projection of this rank is now cut from the checkpoint's own integers,
    scales and zero points, so the ranks together run exactly the single-instance weights.
    Column-parallel slices are found by matching their rows against the dequantized checkpoint
    (this also covers layers DeepSpeed reorders, e.g. fused qkv); row-parallel slices must
    start and end on the checkpoint's groups."""
    result = TPQuantization(scheme, applied=CHECKPOINT_APPLIED)
    for p in find_projections(model):
        linear = whole.get(p.name)
        if linear is None:  # e.g. the lm_head, which GPTQ/AWQ folders keep in float
            result.left_float[p.name] = "not quantized in the checkpoint"
            continue
        module = p.module
        reference = linear.dequantize().to(module.weight.dtype)
        if p.split == "whole":
            inner: Any = linear
            replacement: torch.nn.Module = QuantizedLinear(with_compute(inner, scheme))
        elif p.split == "column":
            where = {key: i for i, key in enumerate(_row_keys(reference))}
            try:
                rows = [where[key] for key in _row_keys(module.weight)]
            except KeyError:
                raise UserError(f"--autotp: a row of {p.name} on this rank is not a row of the "
                                "checkpoint's projection") from None
            inner = rows_of(linear, rows)
            replacement = QuantizedLinear(with_compute(inner, scheme))
        else:
            if module.weight.shape[1] == 0:
                result.empty_slices.append(p.name)
                continue
            offset = sum(p.partition_sizes[:p.tp_index])
            width = module.weight.shape[1]
            if not torch.equal(reference[:, offset:offset + width], module.weight):
                raise UserError(f"--autotp: {p.name}'s slice on this rank is not input channels "
                                f"{offset}..{offset + width} of the checkpoint's projection")
            inner = columns_of(linear, offset, width, p.name)
            computing = with_compute(inner, scheme)
            if p.split == "lm_head":
                replacement = LmHeadRowParallelQuantized(computing, module.mp_group,
                                                         module.bias, p.in_features, offset)
            else:
                replacement = RowParallelQuantized(computing, module.mp_group, module.bias,
                                                   p.in_features)
            result.row_slices.setdefault(_pattern(p.name), list(p.partition_sizes))
        result.qlinears[p.name] = inner
        result.splits[p.name] = p.split
        model.set_submodule(p.name, replacement)
    if not result.qlinears:
        raise UserError("--autotp: none of the checkpoint's quantized projections is a linear "
                        "layer of the sliced model")
    return result


def weight_bytes(model: torch.nn.Module) -> int:
    """This rank's weights as stored: float parameters plus the quantized projections (which
    are not parameters)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            total += module.inner.nbytes
    return total


def decode_weight_bytes(model: torch.nn.Module) -> int:
    """What this rank reads per decoding step: its weights, less the input embedding (one row of
    it is read per token) unless the output projection reads that very tensor."""
    embedding = model.get_input_embeddings().weight
    output = model.get_output_embeddings()
    tied = getattr(output, "weight", None) is embedding
    return weight_bytes(model) - (0 if tied else embedding.numel() * embedding.element_size())
