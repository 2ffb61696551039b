"""What a quantization run does, as data (saved next to the weights), and round-to-nearest
weight quantization into the formats of llmbench.quant.linears."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from llmbench import kernels
from llmbench.errors import UserError
from llmbench.kernels.int8_act import ActLevels
from llmbench.quant.linears import (
    FP8Linear,
    Int4Linear,
    Int8GroupLinear,
    Int8Linear,
    NF4Linear,
)

WEIGHT_DTYPES = ("INT8", "INT4", "NF4", "FP8")
# --act-quant-mode (IPEX's names), for --lowp-mode INT8: the scale's scope is the whole tensor
# (PER_TENSOR), each row/token (PER_BATCH), each block of input channels over all rows
# (PER_IC_BLOCK) or each block of each row (PER_BATCH_IC_BLOCK); _SYM: symmetric, else
# asymmetric with a zero point. Ours defaults to per row symmetric: on INT8 weights it is the
# int8 kernels' exact int8 x int8 path; the others run as int8 levels (int8_act.ActLevels).
ACT_QUANT_MODES = ("PER_BATCH_SYM", "PER_BATCH", "PER_TENSOR_SYM", "PER_TENSOR",
                   "PER_IC_BLOCK_SYM", "PER_IC_BLOCK", "PER_BATCH_IC_BLOCK_SYM",
                   "PER_BATCH_IC_BLOCK")
DEFAULT_ACT_QUANT_MODE = "PER_BATCH_SYM"
# Input channels per activation scale in the IC-block modes when the weights have no groups
# (with groups, the weights' group size: one activation scale per weight group).
ACT_IC_BLOCK = 128
LOWP_MODES = ("AUTO", "FP32", "BF16", "FP16", "INT8")
DEFAULT_4BIT_GROUP = 128
MIN_GROUP = 32
# Range shrink factors tried per group/row (see _clipped_grid): 4-bit steps are coarse enough
# that a coarse grid finds the best; 8-bit needs finer steps to beat the full range.
CLIP_GRID_4BIT = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)
CLIP_GRID_8BIT = tuple(1.0 - 0.01 * i for i in range(26))
# Projections narrower than this stay in floating point (e.g. mamba's dt_proj, rank 8).
MIN_IN_FEATURES = 32


@dataclass
class QuantizedWeight:
    """One linear's GPTQ result, in the original channel order (quant.gptq makes it,
    quant.scale_tuning refines its scales)."""

    q: torch.Tensor  # [N, K] int64 in 0..15
    scales: torch.Tensor  # [N, G]
    zeros: torch.Tensor  # [N, G] integers (1..15 asym, 8 sym)
    g_idx: torch.Tensor  # [K] group of each input channel
    dequantized: torch.Tensor  # [N, K] float32

    @property
    def groups(self) -> int:
        return self.scales.shape[1]


@dataclass
class Scheme:
    method: str  # "woq" (round to nearest), "gptq", "awq", "smoothquant"
    weight_dtype: str  # INT8 | INT4 | NF4 | FP8
    group_size: int  # -1: per output channel; else input channels per group
    sym: bool
    lowp_mode: str = "AUTO"
    lm_head: bool = True
    extra: dict[str, Any] = field(default_factory=dict)  # method settings (alpha, calibration)
    act_quant_mode: str = DEFAULT_ACT_QUANT_MODE  # with lowp_mode INT8

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Scheme:
        return cls(**data)

    def describe(self) -> str:
        group = "per-channel" if self.group_size == -1 else f"group {self.group_size}"
        sym = "sym" if self.sym else "asym"
        if self.method == "smoothquant":
            return f"smoothquant W8A8 (alpha {self.extra.get('alpha')})"
        compute = (f", int8 activations {self.act_quant_mode}" if self.lowp_mode == "INT8"
                   else "")
        return f"{self.method} {self.weight_dtype} {group} {sym}{compute}"


def resolve_group_size(weight_dtype: str, group_size: int) -> int:
    """--group-size: 0 = automatic (128 for 4-bit, per-channel otherwise), -1 = per-channel,
    else a power of two >= 32. Anything else, or a grouping a format can't run, is an error."""
    if group_size == 0:
        return DEFAULT_4BIT_GROUP if weight_dtype in ("INT4", "NF4") else -1
    if group_size == -1:
        return -1
    if group_size < MIN_GROUP or group_size & (group_size - 1):
        raise UserError(f"--group-size {group_size} is not allowed: use 0 (automatic), -1 "
                        f"(per-channel) or a power of two >= {MIN_GROUP}")
    if weight_dtype == "FP8":
        raise UserError(f"--group-size {group_size} with --weight-dtype FP8: our FP8 path "
                        "quantizes per output channel only; use 0 or -1")
    return group_size


def check_lowp_mode(lowp_mode: str, act_quant_mode: str | None, weight_dtype: str) -> None:
    """--lowp-mode AUTO/FP32: fp32 compute. BF16/FP16: weights dequantized to that dtype and
    multiplied in it (linears.LowpLinear; emulated where the CPU lacks it). INT8: int8
    activations against INT8 or INT4 weights; anything else is refused."""
    if lowp_mode == "INT8":
        if weight_dtype not in ("INT8", "INT4"):
            raise UserError(f"--lowp-mode INT8 runs int8 activations against INT8 or INT4 "
                            f"weights; {weight_dtype} weights compute in fp32 here: use AUTO or "
                            "FP32")
        if act_quant_mode not in (None, *ACT_QUANT_MODES):
            raise UserError(f"--act-quant-mode {act_quant_mode} is not a mode: use one of "
                            f"{', '.join(ACT_QUANT_MODES)}")
        return
    if lowp_mode not in LOWP_MODES:
        raise UserError(f"--lowp-mode {lowp_mode}: use one of {', '.join(LOWP_MODES)}")
    if act_quant_mode is not None:
        raise UserError("--act-quant-mode applies to --lowp-mode INT8; leave it out")


def act_levels_for(mode: str, weight_group: int) -> ActLevels:
    """The int8_act.ActLevels of an --act-quant-mode, for weights grouped by weight_group
    (-1 or the whole row: per channel)."""
    block = 0
    if "IC_BLOCK" in mode:
        block = weight_group if weight_group > 0 else ACT_IC_BLOCK
    return ActLevels(per_tensor=not mode.startswith("PER_BATCH"), sym=mode.endswith("_SYM"),
                     block=block)


def _padded(w: torch.Tensor, group: int) -> torch.Tensor:
    k = w.shape[1]
    pad = (-k) % group
    return torch.nn.functional.pad(w, (0, pad)) if pad else w


def effective_group(k: int, group_size: int) -> int:
    """Per-channel (-1) or a group wider than the row: one group of the (even) row."""
    if group_size == -1 or group_size >= k:
        return k + (k % 2)
    return group_size


def quantize_weight(weight: torch.Tensor, bias: torch.Tensor | None, scheme: Scheme) -> Any:
    """Round-to-nearest quantization of one [N, K] weight into a linear of the scheme."""
    w = weight.detach().float()
    b = None if bias is None else bias.detach().float()
    n, k = w.shape
    if scheme.weight_dtype == "INT8" and scheme.group_size != -1 and scheme.group_size < k:
        # Groups of input channels (IPEX's INT8 --group-size), the last one zero-padded.
        group = scheme.group_size
        wg = _padded(w, group).view(n, -1, group)
        q, s, lo = _clipped_grid(wg, 255 if not scheme.sym else 127, scheme.sym,
                                 CLIP_GRID_8BIT)
        if scheme.sym:
            return Int8GroupLinear(q.view(n, -1).to(torch.int8), s, None, group, k, b)
        z = -128.0 - lo / s
        return Int8GroupLinear((q - 128).view(n, -1).to(torch.int8), s, z, group, k, b)
    if scheme.weight_dtype == "INT8":
        # One group per row; symmetric q in [-127, 127], asymmetric stored as int8 with a zero
        # point: w = (q - z) * s with q = u - 128 for u in [0, 255].
        q, s, lo = _clipped_grid(w[:, None, :], 255 if not scheme.sym else 127, scheme.sym,
                                 CLIP_GRID_8BIT)
        s = s[:, 0]
        if scheme.sym:
            return Int8Linear(q[:, 0].to(torch.int8), s, None, b)
        z = -128.0 - lo[:, 0] / s
        return Int8Linear((q[:, 0] - 128).to(torch.int8), s, z, b)
    if scheme.weight_dtype == "FP8":
        s = (w.abs().amax(dim=1) / torch.finfo(torch.float8_e4m3fn).max).clamp_min(1e-12)
        return FP8Linear((w / s[:, None]).to(torch.float8_e4m3fn), s, b)
    group = effective_group(k, scheme.group_size)
    wp = _padded(w, group)
    kp = wp.shape[1]
    wg = wp.view(n, kp // group, group)
    if scheme.weight_dtype == "NF4":
        s = wg.abs().amax(dim=2).clamp_min(1e-12)
        from llmbench.quant.linears import NF4_LEVELS

        idx = (wg / s[:, :, None]).unsqueeze(-1).sub(NF4_LEVELS).abs().argmin(dim=-1)
        return NF4Linear(kernels.pack_int4(idx.view(n, kp).to(torch.uint8)), s, group, k, b)
    q, s, lo = _clipped_grid(wg, 7 if scheme.sym else 15, scheme.sym, CLIP_GRID_4BIT)
    if scheme.sym:
        q = q + 8
        z = torch.full_like(s, 8.0)
    else:
        # Asymmetric: the group's own [min, max] (not widened to include 0) and a real-valued
        # zero point, w = (q - z) * s. A model whose weights already lie on a 4-bit min/scale
        # grid (a Q4_1 GGUF, like the embedded one) keeps them exactly when the groups align.
        z = -lo / s
    return Int4Linear(kernels.pack_int4(q.to(torch.uint8).view(n, kp)), s, z, group, k, b)


def _clipped_grid(wg: torch.Tensor, levels: int, sym: bool, grid: tuple[float, ...],
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Round-to-nearest of [rows, groups, size] weights onto an integer grid, each group's range
    shrunk by the factor from `grid` (clipping its outliers) that gives the least squared error:
    the small search AWQ's and llama.cpp's quantizers also do. For INT8 per channel on the
    embedded model this takes the perplexity cost from +0.71% (full range) to +0.16%.
    sym: q in [-levels, levels], w ~ q * s (lo None). Else q in [0, levels], w ~ q * s + lo.
    Returns (q as float, s [rows, groups], lo [rows, groups] or None)."""
    if sym:
        amax0 = wg.abs().amax(dim=2)
    else:
        lo0, hi0 = wg.amin(dim=2), wg.amax(dim=2)
    best_q = best_s = best_lo = best_err = None
    for shrink in grid:
        if sym:
            s = (amax0 * shrink / levels).clamp_min(1e-12)
            q = torch.round(wg / s[:, :, None]).clamp_(-levels, levels)
            lo = None
            err = (q * s[:, :, None] - wg).square_().sum(dim=2)
        else:
            lo = lo0 * shrink
            s = ((hi0 * shrink - lo) / levels).clamp_min(1e-12)
            q = torch.round((wg - lo[:, :, None]) / s[:, :, None]).clamp_(0, levels)
            err = (q * s[:, :, None] + lo[:, :, None] - wg).square_().sum(dim=2)
        if best_err is None:
            best_q, best_s, best_lo, best_err = q, s, lo, err
            continue
        better = err < best_err
        best_q = torch.where(better[:, :, None], q, best_q)
        best_s = torch.where(better, s, best_s)
        best_lo = None if lo is None else torch.where(better, lo, best_lo)
        best_err = torch.minimum(err, best_err)
    return best_q, best_s, best_lo
