"""What a quantization run does, as data (saved next to the weights), and the checks of its
settings. No torch here: run.py validates a command line with it before any step starts
(round-to-nearest quantization itself is llmbench.quant.rtn)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from llmbench.errors import UserError

if TYPE_CHECKING:
    from llmbench.kernels.int8_act import ActLevels

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
    from llmbench.kernels.int8_act import ActLevels

    block = 0
    if "IC_BLOCK" in mode:
        block = weight_group if weight_group > 0 else ACT_IC_BLOCK
    return ActLevels(per_tensor=not mode.startswith("PER_BATCH"), sym=mode.endswith("_SYM"),
                     block=block)


def effective_group(k: int, group_size: int) -> int:
    """Per-channel (-1) or a group wider than the row: one group of the (even) row."""
    if group_size == -1 or group_size >= k:
        return k + (k % 2)
    return group_size
