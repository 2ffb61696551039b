"""Round-to-nearest weight quantization into the formats of llmbench.quant.linears, and the
result type GPTQ fills (the settings are llmbench.quant.scheme's)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from llmbench import kernels
from llmbench.quant.linears import (
    FP8Linear,
    Int4Linear,
    Int8GroupLinear,
    Int8Linear,
    NF4Linear,
)
from llmbench.quant.scheme import CLIP_GRID_4BIT, CLIP_GRID_8BIT, Scheme, effective_group


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


def _padded(w: torch.Tensor, group: int) -> torch.Tensor:
    k = w.shape[1]
    pad = (-k) % group
    return torch.nn.functional.pad(w, (0, pad)) if pad else w


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


# Rows of the weight searched at a time: about 2 MB of fp32 per working tensor, so the grid's
# passes run from cache. Measured on a 16384 x 2048 weight (INT8 per channel, 26 shrinks): the
# whole-tensor search with a torch.where per shrink took 8.8-9.4 s, this one 0.85-1.6 s, same
# results bit for bit (BLOOM's 250880 x 2048 lm_head went from minutes to seconds).
_SEARCH_ELEMENTS = 1 << 19


# Set by search_shared: (rank, world, all_reduce) of ranks that quantize the same weights.
_SEARCH_SHARE: tuple[int, int, Callable[[torch.Tensor], Any]] | None = None


@contextlib.contextmanager
def search_shared(rank: int, world: int, all_reduce: Callable[[torch.Tensor], Any],
                  ) -> Iterator[None]:
    """Within it, ranks that each quantize the same weights in the same order (tensor-parallel
    ranks loading one model, each then keeping its slice) share the clipping search: each
    searches its 1/world of every weight's rows, and the chosen shrinks are summed across the
    ranks (all_reduce: in place, over a float32 tensor; one call per weight on every rank,
    compiled kernels or not), so every rank ends with the whole result, bit for bit what one
    process finds."""
    global _SEARCH_SHARE
    _SEARCH_SHARE = (rank, world, all_reduce) if world > 1 else None
    try:
        yield
    finally:
        _SEARCH_SHARE = None


def _clipped_grid(wg: torch.Tensor, levels: int, sym: bool, grid: tuple[float, ...],
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Round-to-nearest of [rows, groups, size] weights onto an integer grid, each group's range
    shrunk by the factor from `grid` (clipping its outliers) that gives the least squared error:
    the small search AWQ's and llama.cpp's quantizers also do. For INT8 per channel on the
    embedded model this takes the perplexity cost from +0.71% (full range) to +0.16%.
    sym: q in [-levels, levels], w ~ q * s (lo None). Else q in [0, levels], w ~ q * s + lo.
    Returns (q: int16 where the compiled search ran, else float; s [rows, groups]; lo [rows,
    groups] or None)."""
    wg = wg.contiguous()  # (so that every block of rows is too)
    rows = max(1, _SEARCH_ELEMENTS // max(1, wg.shape[1] * wg.shape[2]))
    compiled = kernels.compiled() is not None and len(grid) > 1
    # the same float32 shrink values as each search step's, so s and lo are its own
    shrinks = torch.tensor(grid, dtype=torch.float32)
    # the compiled search writes the levels into one tensor: no float copy of the weights, no cat
    q = torch.empty(wg.shape, dtype=torch.int16) if compiled else None
    chosen = None
    if _SEARCH_SHARE is not None:  # this rank's rows searched, everyone's choices summed
        rank, world, all_reduce = _SEARCH_SHARE
        first, last = wg.shape[0] * rank // world, wg.shape[0] * (rank + 1) // world
        summed = torch.zeros(wg.shape[:2], dtype=torch.float32)
        for i in range(first, last, rows):
            end = min(i + rows, last)
            block = _GroupRanges(wg[i:end], levels, sym)
            found = block.search(grid, None) if compiled else block.torch_search(grid)
            summed[i:end] = found.float()
        all_reduce(summed)
        chosen = summed.long()
    parts = []
    for i in range(0, wg.shape[0], rows):
        block = _GroupRanges(wg[i:i + rows], levels, sym)
        out = None if q is None else q[i:i + rows]
        if chosen is not None:
            parts.append(block.grid_of(shrinks[chosen[i:i + rows]], out))
        elif compiled:  # the levels written as it searches
            parts.append(block.grid_of(shrinks[block.search(grid, out)], out, written=True))
        else:
            parts.append(block.grid_of(shrinks[block.torch_search(grid)], None))

    def joined(index: int) -> torch.Tensor:
        return parts[0][index] if len(parts) == 1 else torch.cat([p[index] for p in parts])

    return (q if q is not None else joined(0), joined(1), None if sym else joined(2))


class _GroupRanges:
    """One block of rows of [rows, groups, size] weights, its groups' ranges found: the scale
    (and low) of any shrink of them, and the search over shrinks."""

    def __init__(self, wg: torch.Tensor, levels: int, sym: bool) -> None:
        compiled = kernels.compiled()
        self.wg, self.levels, self.sym = wg, levels, sym
        self.lo0, self.hi0 = (torch.aminmax(wg, dim=2) if compiled is None
                              else compiled.group_ranges(wg))
        self.amax0 = torch.maximum(-self.lo0, self.hi0) if sym else None  # = max |wg|, exactly

    def scale_and_low(self, shrink: float | torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.sym:
            return (self.amax0 * shrink / self.levels).clamp_min(1e-12), None
        lo = self.lo0 * shrink
        return ((self.hi0 * shrink - lo) / self.levels).clamp_min(1e-12), lo

    def search(self, grid: tuple[float, ...], levels_out: torch.Tensor | None) -> torch.Tensor:
        """The compiled search (quant_search.cpp: the same fp32 steps per element as torch's,
        only the group sums add in another order): the best shrink's index per group, its
        levels written into levels_out (int16, the block's shape) where given."""
        found = [self.scale_and_low(shrink) for shrink in grid]
        return kernels.compiled().clip_search(
            self.wg, torch.stack([f[0] for f in found]),
            None if self.sym else torch.stack([f[1] for f in found]), float(self.levels),
            levels_out)

    def grid_of(self, shrink: torch.Tensor, levels_out: torch.Tensor | None,
                written: bool = False,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(q, s, lo) of each group's given shrink (float32 [rows, groups]): the levels in
        levels_out (int16, written by the compiled kernel unless `written` already), else a
        float tensor from torch."""
        s, lo = self.scale_and_low(shrink)
        if levels_out is None:
            return self.on_grid(s, lo, torch.empty_like(self.wg)), s, lo
        if not written:
            kernels.compiled().clip_search(self.wg, s[None], None if lo is None else lo[None],
                                           float(self.levels), levels_out)
        return levels_out, s, lo

    def on_grid(self, s: torch.Tensor, lo: torch.Tensor | None, out: torch.Tensor
                ) -> torch.Tensor:
        levels = self.levels
        if lo is None:
            torch.div(self.wg, s[:, :, None], out=out)
            return out.round_().clamp_(-levels, levels)
        torch.sub(self.wg, lo[:, :, None], out=out)
        return out.div_(s[:, :, None]).round_().clamp_(0, levels)

    def torch_search(self, grid: tuple[float, ...]) -> torch.Tensor:
        """The search in torch (no compiled kernels): the squared error of every shrink into
        one reused buffer, keeping only the index of the best shrink per group (the first one
        on ties). Returns that index, int64 [rows, groups]."""
        wg = self.wg
        buffer = torch.empty_like(wg)
        best_err = best_index = None
        for index, shrink in enumerate(grid):
            s, lo = self.scale_and_low(shrink)
            rebuilt = self.on_grid(s, lo, buffer).mul_(s[:, :, None])
            if lo is not None:
                rebuilt.add_(lo[:, :, None])
            err = rebuilt.sub_(wg).square_().sum(dim=2)
            if best_err is None:
                best_err, best_index = err, torch.zeros(err.shape, dtype=torch.long)
                continue
            best_index[err < best_err] = index
            best_err = torch.minimum(err, best_err)
        return best_index
