"""Weight-streaming linear kernels for small-M (decode) LLM inference on CPU.

``y = x @ W.T (+ bias)`` for activations x float32 [..., K] and weights W
[N, K] stored as float32, bfloat16, int8 (per-row scale) or packed int4
(group-wise scale/zero).  All math is float32 (weights are widened in
registers), results are float32 [..., N].

Public API (all accept x of shape [K] or [..., K]; M = number of rows of x):

  linear_f32(x, w, bias=None)                    w float32 [N, K]
  linear_bf16w(x, w, bias=None)                  w bfloat16 [N, K]
  linear_int8w(x, qweight, scales, bias=None)    qweight int8 [N, K], scales float32 [N]
                                                 y = (x @ q.T) * scales (+ bias)
  linear_int4w(x, qweight, scales, zeros, group_size, bias=None)
        qweight uint8 [N, K/2] from pack_int4 (K even); scales, zeros float32
        [N, K/group_size]; group_size = K or a power of two >= 32 dividing K.
        w = (q - zeros) * scales, group-wise along K.
  pack_int4(q) / unpack_int4(packed)             q uint8 in [0, 15], [N, K] <-> [N, K/2]
  quantize_int8(w) -> (qweight, scales); quantize_int4(w, group_size) -> (packed, scales, zeros)
  dequantize_int8(...), dequantize_int4(...)     -> float32 [N, K]

int4 packing layout (per row): each full block of 32 elements is 16 bytes, and
byte i of a block holds element i in its low nibble and element i+16 in its
high nibble; a trailing partial block of even length L (only when K is not a
multiple of 32, i.e. per-channel group_size == K) holds elements i / i+L/2.

Dispatch: for 1 <= M <= STREAM_M_MAX[format] (32 for fp32 and bf16
weights, 64 for int8, 256 for int4; bf16 8 on the avx512 path) the
compiled kernels run (memory bound for decode:
weights streamed once, OpenMP over blocks of 4 output rows, honours
torch.set_num_threads; compute-bound tiles for short prefills).  Above that the
weights are widened/dequantized to float32 and torch's GEMM (oneDNN/MKL) is
used -- the same code as the pure-PyTorch reference
(:mod:`llmbench.kernels.reference`).
The float32 dequantized copy is NOT cached; callers doing many large-M calls
should dequantize once and call torch themselves.

When the extension ``llmbench.kernels._C`` is not built (or fails to import,
or LLMBENCH_NO_KERNELS=1), every function falls back to the reference with
identical semantics and ``available()`` is False.  Build it with
``python tools/build_kernels.py`` (or ``llmbench.kernels.build()``); importing
this package never compiles anything.

The ISA path is chosen at run time (avx512vnni > avx512 > avx2 > neondot > neon > generic);
force one with ``set_isa(name)`` or the env var
LLMBENCH_KERNELS_ISA=generic|avx2|avx512|avx512vnni|neon|neondot. avx512vnni is the avx512 code
with AVX512-VNNI's vpdpwssd for the int16 multiply-adds; neondot is the neon code with the
dotprod instructions for int8 weights against int8 activations.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import warnings

import torch
import torch.nn.functional as F

from . import reference
from .reference import (
    dequantize_int4,
    dequantize_int8,
    pack_int4,
    quantize_int4,
    quantize_int8,
    unpack_int4,
)

__all__ = [
    "available",
    "isa",
    "supported_isas",
    "set_isa",
    "build",
    "import_error",
    "compiled",
    "force_fallback",
    "SMALL_M_MAX",
    "STREAM_M_MAX",
    "int4_stream_rows",
    "linear_f32",
    "linear_bf16w",
    "linear_int8w",
    "linear_int4w",
    "pack_int4",
    "unpack_int4",
    "quantize_int8",
    "quantize_int4",
    "dequantize_int8",
    "dequantize_int4",
    "rms_norm",
    "rope_qk_",
    "reference",
]

SMALL_M_MAX = 16
# Up to how many rows of x each format runs on the compiled kernels rather than torch's GEMM.
# Above SMALL_M_MAX the kernels are tiles of 4 activation rows that keep each block of weight
# rows in L1 while every row of x passes, so the weights still stream from memory once; torch
# needs a float copy of non-fp32 weights first (bf16: a widening pass; int4: a dequantization
# that costs ~8x the GEMM itself). Measured on whole 32-token prefills, 2 threads
# (native prefill, SmolLM2-135M fp32 / bf16: 114 / 81 ms on the kernels vs 134 / 139 ms with
# torch; the TinyLlama-1.1B shape fp32: ~0.75 s vs ~1.3 s) and per call
# (benchmarks/bench_prefill.py, hot weights: int8 breaks even near M = 64-128, int4 beyond
# 512).
# Those were measured on AMD with AVX2. On an Intel Xeon with AVX-512 (Sapphire Rapids class,
# 2 threads) the avx512 paths hand bf16 over sooner (whole native bf16 32-token prefill: 87.7
# ms with 8 vs 96.1 ms with 32), and keep fp32 up to 128 rows: from 12 rows their fp32 tiles are
# outer products (gemv_impl.h), and torch's GEMM took 1.3-1.5x their time at 64 rows, 1.0-1.1x
# at 128 and less beyond (benchmarks/bench_prefill.py --threads 2 --cold-mib 200; whole native
# fp32 prefills of 64 / 128 tokens: 78.8 / 143.7 ms against 101.3 / 150.6 ms with 32).
# INT4 with --lowp-mode INT8's symmetric levels ("int4_lowp") has a limit of its own. The AVX2
# path runs them as u8 x s8 outer products (gemv_int_impl.h, LLMB_I4Q8_OUTER), faster than
# torch's GEMM on dequantized weights at every row count measured (10 layers of SmolLM2's
# projections, 2 threads, 300 / 512 / 1024 rows: 64-72 / 127-130 / 292-298 ms against 193-212 /
# 298-301 / 396-441), so it has none there. The avx512 path without AMX (dot-product tiles) wins
# at 300 rows (136-139 against 225 ms) and loses at 1024 (562 against 422-443): it keeps 256.
# AMX takes any row count anyway (amx_i4_takes).
STREAM_M_MAX_BASE = {"f32": 32, "bf16": 32, "int8": 64, "int4": 256, "int4_lowp": 256}
STREAM_M_MAX_BY_ISA = {"avx512": {"bf16": 8, "f32": 128}, "avx512vnni": {"bf16": 8, "f32": 128},
                       "avx2": {"int4_lowp": 1 << 40}}
# The active path's limits (updated in place by set_isa, so readers may keep a reference).
STREAM_M_MAX = dict(STREAM_M_MAX_BASE)


def int4_stream_rows(sym_int8_levels: bool) -> int:
    """Up to how many rows INT4 weights run on the kernels: with --lowp-mode INT8's symmetric
    levels (sym_int8_levels) the "int4_lowp" limit, else "int4"."""
    return STREAM_M_MAX["int4_lowp" if sym_int8_levels else "int4"]


def _update_stream_limits() -> None:
    STREAM_M_MAX.clear()
    STREAM_M_MAX.update(STREAM_M_MAX_BASE)
    if _C is not None:
        STREAM_M_MAX.update(STREAM_M_MAX_BY_ISA.get(_C.isa(), {}))

_C = None
_IMPORT_ERROR: str | None = None
_FORCE_FALLBACK = False


def _load() -> None:
    global _C, _IMPORT_ERROR
    if os.environ.get("LLMBENCH_NO_KERNELS", "") not in ("", "0"):
        _C, _IMPORT_ERROR = None, "disabled by LLMBENCH_NO_KERNELS"
        return
    try:
        _C = importlib.import_module("._C", __name__)
        _IMPORT_ERROR = None
    except Exception as e:  # not built, or built against another torch (ABI)
        _C, _IMPORT_ERROR = None, f"{type(e).__name__}: {e}"
        return
    want = os.environ.get("LLMBENCH_KERNELS_ISA", "").strip().lower()
    if want:
        try:
            _C.set_isa(want)
        except RuntimeError as e:
            warnings.warn(
                f"LLMBENCH_KERNELS_ISA={want!r} ignored: {e}", RuntimeWarning, stacklevel=2
            )
    amx = os.environ.get("LLMBENCH_KERNELS_AMX_ROWS", "").strip()
    if amx:  # 0: the AMX tiles off (int8, int4 and bf16; A/B runs); N: int8 from N rows on
        try:
            _C.set_amx_rows(int(amx))
        except ValueError:
            warnings.warn(f"LLMBENCH_KERNELS_AMX_ROWS={amx!r} ignored: not a row count",
                          RuntimeWarning, stacklevel=2)
    _update_stream_limits()


_load()


def available() -> bool:
    """True when the compiled kernels are importable (and not forced off)."""
    return _C is not None and not _FORCE_FALLBACK


def isa() -> str:
    """Active path: "avx512vnni", "avx512", "avx2", "neondot", "neon", "generic", or
    "torch-fallback"."""
    return _C.isa() if available() else "torch-fallback"


def path_without_matrix_units() -> bool:
    """The active path is avx2 or generic: on a CPU with bf16 math or AMX-INT8 that means the
    kernels were forced there (LLMBENCH_KERNELS_ISA) to stand for a CPU without them, and the
    torch paths chosen for those units follow (native.BF16_PREFILL_GEMM, int8_act.INT8_GEMM),
    so that such a run times what that CPU would run."""
    return isa() in ("avx2", "generic")


def supported_isas() -> list[str]:
    """ISA paths usable on this CPU with this build ([] without the extension)."""
    return list(_C.supported_isas()) if _C is not None else []


def set_isa(name: str) -> str:
    """Force a compiled path ("generic", "avx2", "avx512", "avx512vnni", "neon", "neondot", or
    "auto")."""
    if _C is None:
        raise RuntimeError(f"llmbench.kernels extension not available ({_IMPORT_ERROR})")
    active = _C.set_isa(name)
    _update_stream_limits()
    return active


def compiled():
    """The extension module (for C++ entry points beyond the linears, e.g. DecodePlan), or
    None when it is not available."""
    return _C if available() else None


def import_error() -> str | None:
    """Why the extension could not be imported (None when it was)."""
    return _IMPORT_ERROR


def build(verbose: bool = True, force: bool = False) -> str:
    """Compile the extension in place (explicit; see tools/build_kernels.py) and load it."""
    from ._build import build as _build

    path = _build(verbose=verbose, force=force)
    _load()
    return path


@contextlib.contextmanager
def force_fallback(enabled: bool = True):
    """Context manager: route every call to the pure-PyTorch path (tests/benchmarks)."""
    global _FORCE_FALLBACK
    old = _FORCE_FALLBACK
    _FORCE_FALLBACK = enabled
    try:
        yield
    finally:
        _FORCE_FALLBACK = old


# ---------------------------------------------------------------------------
# wrappers
# ---------------------------------------------------------------------------


# Fast path: x [..., K] with 1 <= M <= SMALL_M_MAX rows goes straight to C++,
# which flattens the leading dims, does all dtype/shape checks (raising
# TypeError/ValueError like the fallback) and copies non-contiguous inputs.
# Everything else takes _slow().


def _prep_x(x: torch.Tensor, K: int, fn: str) -> torch.Tensor:
    if x.dtype != torch.float32:
        raise TypeError(f"{fn}: x must be float32, got {x.dtype}")
    if x.dim() == 0 or x.shape[-1] != K:
        raise ValueError(f"{fn}: x has shape {tuple(x.shape)}, expected [..., {K}]")
    return x.reshape(-1, K)


def _check_w(w: torch.Tensor, dtype: torch.dtype, fn: str, name: str) -> None:
    if w.dtype != dtype or w.dim() != 2:
        raise TypeError(
            f"{fn}: {name} must be a 2-D {dtype} tensor, got {w.dtype} {tuple(w.shape)}"
        )


def _slow(fn: str, x, w, wdtype, K: int, ref, *rest):
    """Validated pure-torch path: M == 0, M > SMALL_M_MAX (prefill), or no extension."""
    _check_w(w, wdtype, fn, "qweight" if wdtype in (torch.int8, torch.uint8) else "w")
    y = ref(_prep_x(x, K, fn), w, *rest)
    return y.reshape(*x.shape[:-1], w.shape[0])


def linear_f32(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x float32 [..., K], w float32 [N, K] -> float32 [..., N]."""
    if (
        _C is not None
        and not _FORCE_FALLBACK
        and x.dim()
        and 0 < x.numel() <= STREAM_M_MAX["f32"] * x.shape[-1]
    ):
        return _C.linear_f32(x, w, bias)
    return _slow("linear_f32", x, w, torch.float32, w.shape[-1], reference.linear_f32, bias)


def linear_bf16w(
    x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x float32 [..., K], w bfloat16 [N, K] -> float32 [..., N] (fp32 math)."""
    if (
        _C is not None
        and not _FORCE_FALLBACK
        and x.dim()
        and 0 < x.numel() <= STREAM_M_MAX["bf16"] * x.shape[-1]
    ):
        return _C.linear_bf16w(x, w, bias)
    return _slow("linear_bf16w", x, w, torch.bfloat16, w.shape[-1], reference.linear_bf16w, bias)


def linear_int8w(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x float32 [..., K], qweight int8 [N, K], scales float32 [N] -> float32 [..., N]."""
    if (
        _C is not None
        and not _FORCE_FALLBACK
        and x.dim()
        and 0 < x.numel() <= STREAM_M_MAX["int8"] * x.shape[-1]
    ):
        return _C.linear_int8w(x, qweight, scales, bias)
    return _slow(
        "linear_int8w",
        x,
        qweight,
        torch.int8,
        qweight.shape[-1],
        reference.linear_int8w,
        scales,
        bias,
    )


def amx_rows() -> int:
    """From how many rows int8 activations (--lowp-mode INT8) against int8 / int4 weights run
    on the AMX-INT8 tile kernels (csrc/kernels_amx.cpp); 0: never (no AMX-INT8 here, another
    path forced, or the fallback)."""
    if not available() or isa() != "avx512vnni":
        return 0
    return int(_C.set_amx_rows())


def amx_bf16_takes(rows: int, k: int) -> bool:
    """Whether bf16 weights with k input features multiply `rows` rows on our AMX-BF16 tiles
    (amx_linear_bf16): the CPU has them, the avx512vnni path is active, the AMX kernels are on
    (LLMBENCH_KERNELS_AMX_ROWS), k is a multiple of 32 and rows at most 256 (ops.cpp)."""
    return available() and bool(_C.amx_bf16_takes(int(rows), int(k)))


def linear_int4w(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
    act=None,
) -> torch.Tensor:
    """x float32 [..., K], packed uint8 [N, K/2], scales/zeros float32 [N, K/group_size].
    x may be narrower than K by less than a group (the row padded up to whole groups): the
    missing columns are zeros.
    act: an int8_act.ActLevels (--lowp-mode INT8): the product of x's int8 levels. Symmetric
    levels run on AMX-INT8 at any row count where the CPU has it (amx_i4_takes)."""
    K = 2 * qweight.shape[-1] if qweight.dim() == 2 else 0
    rows = x.numel() // x.shape[-1] if x.dim() and x.shape[-1] else 0
    if _C is not None and not _FORCE_FALLBACK and x.dim() and rows:
        if act is not None and x.dtype == torch.float32 and (
                rows <= int4_stream_rows(act.sym)
                or _C.amx_i4_takes(rows, K, int(group_size), act.sym, act.block)):
            return _C.linear_int4w(x, qweight, scales, zeros, group_size, bias, True,
                                   act.per_tensor, act.sym, act.block)
        if act is None and rows <= STREAM_M_MAX["int4"]:
            return _C.linear_int4w(x, qweight, scales, zeros, group_size, bias)
    if x.dim() and K - int(group_size) < x.shape[-1] < K:
        x = F.pad(x, (0, K - x.shape[-1]))
    if act is not None:
        x = act(x)
    _check_w(qweight, torch.uint8, "linear_int4w", "qweight")
    reference.check_int4_group(K, int(group_size))
    return _slow(
        "linear_int4w",
        x,
        qweight,
        torch.uint8,
        K,
        reference.linear_int4w,
        scales,
        zeros,
        int(group_size),
        bias,
    )


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' RMSNorm of fp32 x [..., n] (one C++ call instead of six torch ops)."""
    if available() and x.dtype == torch.float32 and weight.dtype == torch.float32:
        return _C.rms_norm(x, weight, eps)
    return reference.rms_norm(x, weight, eps)


def rope_qk_(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, kv_heads: int,
             head_dim: int) -> torch.Tensor:
    """Rotate-half RoPE of the q and k heads of a fused projection's output, in place:
    qkv [rows * S, (heads + 2 * kv_heads) * head_dim] fp32, cos and sin [S, rot]. Returns qkv."""
    if available() and qkv.dtype == torch.float32 and qkv.is_contiguous():
        _C.rope_qk_(qkv, cos, sin, heads, kv_heads, head_dim)
    else:
        reference.rope_qk_(qkv, cos, sin, heads, kv_heads, head_dim)
    return qkv
