"""int8 activations x int8 weights: SmoothQuant's W8A8 (static scales) and --lowp-mode INT8
(dynamic per-row scales), with a pure-torch fallback of the same numerics.

    linear_w8a8(x fp32 [..., K], act_scale fp32 [1] (static) or [M] (per row) or None
                (dynamic: max|x row| / 127), qweight int8 [N, K], wscales fp32 [N], bias=None)
    xq = clamp(round(x / act_scale), -127, 127);  y = (xq @ qweight.T) * act_scale * wscales + b

Up to the int8 kernels' row limit (kernels.STREAM_M_MAX["int8"]: decode and short prefills)
the weight-only int8 kernels of llmbench.kernels run with their activations rounded to int8
instead of int16 (`act_qmax=127`): int8 x int8 products summed exactly in int32 (vpmaddwd on
AVX2/AVX-512; the generic path multiplies the rounded levels in fp32). Dynamic per-row scales
(--lowp-mode INT8) on CPUs with AMX-INT8 run our AMX kernels (csrc/kernels_amx.cpp) from 2
rows on, at any row count: SmolLM2's 30 layers of projections, 2 threads, M = 32: 10.8 ms
against 32.0 ms through torch._int_mm and 47.9 ms on the GEMV kernels; M = 512: 81 against
340 ms (the ops' own quantization, GEMM call and scaling included). Otherwise, longer prefills:
- on CPUs with int8 matrix instructions (INT8_GEMM: AMX-INT8), torch._int_mm, oneDNN's int8
  GEMM, the same exact int32 sums: measured on a Xeon with AMX, 2 threads, K = 576,
  N = 1536, M = 512: 0.5 ms against 2.6 ms for the fp32 GEMM (which also needs the weights
  widened first);
- elsewhere fp32 GEMM on the integer-valued activations and weights: torch._int_mm measured
  30-50x slower than fp32 GEMM on an AVX2 EPYC (M = 32..512, K = 576, N = 1728, one thread).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmbench import kernels
from llmbench.environment import has_int8_matmul

INT8_MAX = 127.0
# (not with the kernels forced onto avx2 or generic: those stand for a CPU without AMX-INT8,
# whose oneDNN int8 GEMM is 30-50x slower than fp32 GEMM; before 2026-12-07 such runs timed
# this CPU's AMX _int_mm in their INT8-lowp prefill)
INT8_GEMM = has_int8_matmul() and not kernels.path_without_matrix_units()
# Above how many rows dynamic int8 activations go to torch._int_mm where INT8_GEMM holds (the
# compiled decode step too: DecodePlan.set_gemm_rows). SmolLM2's 30 layers of int8
# projections, 2 threads, AMX Xeon: 8 rows 15.3 ms on the kernels vs 15.7 on _int_mm, 16 rows
# 25.3 vs 17.3, 32 rows 43.6 vs 22.1.
INT8_GEMM_ROWS = 8


def gemm_rows() -> int:
    """Rows above which dynamic int8 activations run on a GEMM instead of the kernels."""
    return INT8_GEMM_ROWS if INT8_GEMM else kernels.STREAM_M_MAX["int8"]


def describe() -> str:
    """How dynamic int8 activations against int8 weights compute (the report's
    quantization.compute); static SmoothQuant scales keep the kernels and the GEMM beyond."""
    amx = kernels.amx_rows()
    if amx:
        return (f"int8 x int8 -> int32 for M < {amx} ({kernels.isa()}); more rows: AMX-INT8 "
                "tiles (llmbench kernels)")
    longer = ("oneDNN int8 GEMM (torch._int_mm)" if INT8_GEMM
              else "int8 numerics, fp32 GEMM compute" + (
                  f" (kernels forced onto {kernels.isa()})" if has_int8_matmul() else ""))
    return (f"int8 x int8 -> int32 for M <= {gemm_rows()} ({kernels.isa()}); "
            f"more rows: {longer}")


@dataclass(frozen=True)
class ActLevels:
    """int8 activations for the --act-quant-modes the int8 kernels' exact per-row symmetric
    path (act_qmax) doesn't cover, and for INT4 weights: x is replaced by its int8 levels,
    (q - zero) * scale, and the weight-only kernels run on those. The activations are int8
    values exactly; the arithmetic is the kernels' own (fp32, or int16 levels on the integer
    paths: within 1/516 of an int8 step). csrc/linear.h ActQuant is the same in C++."""

    per_tensor: bool  # one scale over all rows (per block); else one per row
    sym: bool  # q in [-127, 127]; else [0, 255] with a zero point
    block: int  # input channels per scale; 0 = the whole row

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if kernels.available() and x.dtype == torch.float32 and x.numel():
            return kernels.compiled().act_levels(x, self.per_tensor, self.sym, self.block)
        return reference_levels(x, self)

    def describe(self) -> str:
        scope = "per tensor" if self.per_tensor else "per row"
        block = f", blocks of {self.block} input channels" if self.block else ""
        return f"{scope}{block}, {'symmetric' if self.sym else 'asymmetric'}"


def reference_levels(x: torch.Tensor, spec: ActLevels) -> torch.Tensor:
    """ActLevels in pure torch (the fallback, and what the C++ op must equal)."""
    k = x.shape[-1]
    rows = x.reshape(-1, k).float()
    block = spec.block if 0 < spec.block < k else k
    out = torch.empty_like(rows)
    for k0 in range(0, k, block):
        part = rows[:, k0:k0 + block]
        dims = (0, 1) if spec.per_tensor else (1,)
        lo = part.amin(dim=dims, keepdim=True).clamp_max(0.0)
        hi = part.amax(dim=dims, keepdim=True).clamp_min(0.0)
        if spec.sym:
            scale = (torch.maximum(hi, -lo) / 127.0).clamp_min(1e-8)
            zero, qlo, qhi = torch.zeros_like(scale), -127.0, 127.0
        else:
            scale = ((hi - lo) / 255.0).clamp_min(1e-8)
            zero, qlo, qhi = torch.round(-lo / scale), 0.0, 255.0
        q = torch.clamp(torch.round(part / scale) + zero, qlo, qhi)
        out[:, k0:k0 + block] = (q - zero) * scale
    return out.reshape(x.shape).to(x.dtype)


def quantize_activations(x: torch.Tensor, act_scale: torch.Tensor) -> torch.Tensor:
    """Integer values in [-127, 127] (as float32), round half to even."""
    scale = act_scale if act_scale.numel() == 1 else act_scale.reshape(-1, 1)
    return torch.clamp(torch.round(x / scale), -127, 127)


def reference(x: torch.Tensor, act_scale: torch.Tensor, qweight: torch.Tensor,
              wscales: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Exact integer semantics (int64 accumulation): what the kernel must match."""
    k = qweight.shape[1]
    x2 = x.reshape(-1, k).float()
    s = act_scale.float().reshape(-1)
    xq = quantize_activations(x2, s).to(torch.int64)
    acc = (xq @ qweight.to(torch.int64).T).float()
    y = acc * (s.reshape(-1, 1) * wscales.float()) if s.numel() > 1 else acc * (s * wscales)
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], qweight.shape[0])


def _gemm_path(x: torch.Tensor, act_scale: torch.Tensor, qweight: torch.Tensor,
               wscales: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """More rows than the kernels take: the int32 sums by torch._int_mm where INT8_GEMM holds,
    else by fp32 GEMM on the integer values (exact below 2**24)."""
    k = qweight.shape[1]
    x2 = x.reshape(-1, k)
    s = act_scale.reshape(-1)
    xq = quantize_activations(x2, s)
    if INT8_GEMM:
        acc = torch._int_mm(xq.to(torch.int8), qweight.t()).float()
    else:
        acc = xq @ qweight.float().T
    scale = s.reshape(-1, 1) * wscales if s.numel() > 1 else s * wscales
    y = torch.addcmul(bias, acc, scale) if bias is not None else acc * scale
    return y.reshape(*x.shape[:-1], qweight.shape[0])


def linear_w8a8(x: torch.Tensor, act_scale: torch.Tensor | None, qweight: torch.Tensor,
                wscales: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    rows = x.numel() // max(1, x.shape[-1])
    kernel_rows = kernels.STREAM_M_MAX["int8"] if act_scale is not None else gemm_rows()
    if kernels.available() and x.dtype == torch.float32 and 0 < rows and (
            rows <= kernel_rows
            or act_scale is None and kernels.compiled().amx_i8_takes(rows, x.shape[-1])):
        return kernels.compiled().linear_int8w(x, qweight, wscales, bias, INT8_MAX, act_scale)
    if act_scale is None:
        act_scale = dynamic_scales(x)
    return _gemm_path(x.float(), act_scale, qweight, wscales, bias)


def dynamic_scales(x: torch.Tensor) -> torch.Tensor:
    """Per-row symmetric scales (absmax / 127) for dynamic int8 activations."""
    return (x.reshape(-1, x.shape[-1]).abs().amax(dim=1) / 127.0).clamp_min(1e-8)
