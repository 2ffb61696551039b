"""Quantized projections: one small class per storage format, each a callable
`x fp32 [M, K] -> fp32 [M, N]` with an `nbytes` property, so it fits both
`NativeModel.map_linears` (llama-like families on --backend native) and, wrapped in
`QuantizedLinear` (an nn.Module), any Hugging Face model whose nn.Linear modules are swapped.

INT8 and INT4 run through llmbench.kernels (AVX2 weight-streaming GEMV for decode and short
prefills, torch GEMM on the dequantized weights for long ones). NF4 and FP8 have no compiled
kernel: they dequantize in pure torch on every call (correct, not fast), and the report says so.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F

from llmbench import kernels
from llmbench.kernels import int8_act

# The 16 NormalFloat4 levels of QLoRA (Dettmers et al. 2023), as bitsandbytes ships them.
NF4_LEVELS = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0])


def _bias_bytes(bias: torch.Tensor | None) -> int:
    return 0 if bias is None else bias.numel() * bias.element_size()


def _cat_bias(parts: list[Any]) -> torch.Tensor | None:
    if all(p.bias is None for p in parts):
        return None
    return torch.cat([p.bias if p.bias is not None else torch.zeros(p.out_features)
                      for p in parts])


class Int8Linear:
    """w = (q - z) * s per output channel; z is None for symmetric weights. The zero point is
    applied after the kernel: x @ w.T = s * (x @ q.T) - sum(x) * (s * z). act_qmax 0: fp32
    activations (rounded to int16 inside the kernel); 127 (--lowp-mode INT8): activations
    quantized to int8 per row at run time, int8 x int8 products."""

    kind = "int8"
    act_qmax = 0.0
    act_levels: int8_act.ActLevels | None = None  # other --act-quant-modes (see ActLevels)

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor,
                 zeros: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> None:
        self.qweight = qweight.contiguous()
        self.scales = scales.float().contiguous()
        self.zeros = None if zeros is None else zeros.float().contiguous()
        self.zero_term = None if zeros is None else (self.scales * self.zeros)
        self.bias = None if bias is None else bias.float().contiguous()
        self.out_features, self.in_features = self.qweight.shape

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_levels is not None:
            x = self.act_levels(x)
        if self.act_qmax:
            y = int8_act.linear_w8a8(x, None, self.qweight, self.scales, self.bias)
        else:
            y = kernels.linear_int8w(x, self.qweight, self.scales, self.bias)
        if self.zero_term is not None:
            y = y - x.sum(-1, keepdim=True) * self.zero_term
        return y

    def dequantize(self) -> torch.Tensor:
        q = self.qweight.float()
        if self.zeros is not None:
            q = q - self.zeros[:, None]
        return q * self.scales[:, None]

    @property
    def nbytes(self) -> int:
        extra = 0 if self.zeros is None else 2 * self.scales.numel() * 4
        return self.qweight.numel() + self.scales.numel() * 4 + extra + _bias_bytes(self.bias)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"qweight": self.qweight, "scales": self.scales}
        if self.zeros is not None:
            out["zeros"] = self.zeros
        if self.bias is not None:
            out["bias"] = self.bias
        return out

    @classmethod
    def fuse(cls, parts: list[Int8Linear]) -> Int8Linear:
        sym = {p.zeros is None for p in parts}
        if len(sym) != 1:
            raise ValueError("cannot fuse symmetric and asymmetric int8 projections")
        zeros = None if parts[0].zeros is None else torch.cat([p.zeros for p in parts])
        fused = cls(torch.cat([p.qweight for p in parts]), torch.cat([p.scales for p in parts]),
                    zeros, _cat_bias(parts))
        fused.act_qmax, fused.act_levels = parts[0].act_qmax, parts[0].act_levels
        return fused


class Int4Linear:
    """Packed 4-bit (llmbench.kernels layout), w = (q - zero) * scale per group of `group_size`
    input channels. K is zero-padded up to a multiple of the group size (a partial last group,
    e.g. K = 576 with groups of 128); `perm` reorders the input channels (GPTQ act-order): x's
    channel perm[j] goes to position j, or a zero where perm[j] is -1 (a tensor-parallel slice's
    positions of the other ranks' channels: autotp.act_order_columns)."""

    kind = "int4"
    act_levels: int8_act.ActLevels | None = None  # --lowp-mode INT8: int8 activations

    def __init__(self, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 group_size: int, in_features: int, bias: torch.Tensor | None = None,
                 perm: torch.Tensor | None = None) -> None:
        self.packed = packed.contiguous()
        self.scales = scales.float().contiguous()
        self.zeros = zeros.float().contiguous()
        self.group_size = int(group_size)
        self.in_features = int(in_features)
        self.padded_in = 2 * self.packed.shape[1]
        self.out_features = self.packed.shape[0]
        self.bias = None if bias is None else bias.float().contiguous()
        self.perm = perm

    @property
    def perm(self) -> torch.Tensor | None:
        return self._perm

    @perm.setter
    def perm(self, perm: torch.Tensor | None) -> None:
        self._perm = None if perm is None else perm.long().contiguous()
        # the gather's index into x, which -1s point past: x then gets a zero appended
        self._gaps = self._perm is not None and bool((self._perm < 0).any())
        self._gather = (torch.where(self._perm < 0, self.in_features, self._perm) if self._gaps
                        else self._perm)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.perm is not None:
            x = (F.pad(x, (0, 1)) if self._gaps else x).index_select(-1, self._gather)
        # x stays in_features wide: linear_int4w zero-pads it up to padded_in (in C++ where
        # the kernels run: F.pad's call cost was a tenth of a 32-token INT4 prefill). The
        # activation levels come after the permutation: their blocks follow the groups.
        return kernels.linear_int4w(x, self.packed, self.scales, self.zeros,
                                    self.group_size, self.bias, act=self.act_levels)

    def dequantize(self) -> torch.Tensor:
        w = kernels.dequantize_int4(self.packed, self.scales, self.zeros, self.group_size)
        if self.perm is None:
            return w[:, : self.in_features]
        # each gathered position into the channel it reads (-1: none, in a tensor-parallel
        # slice the other ranks' channels, weighted 0)
        read = torch.nonzero(self.perm >= 0).squeeze(1)
        out = torch.zeros(w.shape[0], self.in_features, dtype=w.dtype)
        return out.index_copy_(1, self.perm[read], w[:, read])

    @property
    def nbytes(self) -> int:
        return self.packed.numel() + 2 * self.scales.numel() * 4 + _bias_bytes(self.bias)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"qweight": self.packed, "scales": self.scales, "zeros": self.zeros}
        if self.bias is not None:
            out["bias"] = self.bias
        if self.perm is not None:
            out["perm"] = self.perm
        return out

    @classmethod
    def fuse(cls, parts: list[Int4Linear]) -> Int4Linear:
        first = parts[0]
        if any(p.group_size != first.group_size or p.in_features != first.in_features
               or (p.perm is None) != (first.perm is None)
               or (p.perm is not None and not torch.equal(p.perm, first.perm)) for p in parts):
            # Different groupings or input permutations can't share one packed tensor: the
            # parts run side by side on the same input.
            return _Concat(parts)  # type: ignore[return-value]
        fused = cls(torch.cat([p.packed for p in parts]), torch.cat([p.scales for p in parts]),
                    torch.cat([p.zeros for p in parts]), first.group_size, first.in_features,
                    _cat_bias(parts), first.perm)
        fused.act_levels = first.act_levels
        return fused


class NF4Linear:
    """NormalFloat4 levels (a 16-entry lookup table) times a per-group absmax scale, dequantized
    in pure torch on every call: there is no NF4 kernel."""

    kind = "nf4"

    def __init__(self, packed: torch.Tensor, scales: torch.Tensor, group_size: int,
                 in_features: int, bias: torch.Tensor | None = None) -> None:
        self.packed = packed.contiguous()
        self.scales = scales.float().contiguous()
        self.group_size = int(group_size)
        self.in_features = int(in_features)
        self.out_features = self.packed.shape[0]
        self.bias = None if bias is None else bias.float().contiguous()

    def dequantize(self) -> torch.Tensor:
        idx = kernels.unpack_int4(self.packed).long()
        n, k = idx.shape
        w = NF4_LEVELS[idx].view(n, k // self.group_size, self.group_size)
        w = (w * self.scales[:, :, None]).view(n, k)
        return w[:, : self.in_features]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantize(), self.bias)

    @property
    def nbytes(self) -> int:
        return self.packed.numel() + self.scales.numel() * 4 + _bias_bytes(self.bias)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"qweight": self.packed, "scales": self.scales}
        if self.bias is not None:
            out["bias"] = self.bias
        return out

    @classmethod
    def fuse(cls, parts: list[NF4Linear]) -> NF4Linear:
        first = parts[0]
        return cls(torch.cat([p.packed for p in parts]), torch.cat([p.scales for p in parts]),
                   first.group_size, first.in_features, _cat_bias(parts))


class FP8Linear:
    """float8_e4m3fn weights with a per-output-channel scale, widened in pure torch on every
    call: there is no FP8 kernel."""

    kind = "fp8"

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor,
                 bias: torch.Tensor | None = None) -> None:
        self.qweight = qweight.contiguous()
        self.scales = scales.float().contiguous()
        self.bias = None if bias is None else bias.float().contiguous()
        self.out_features, self.in_features = self.qweight.shape

    def dequantize(self) -> torch.Tensor:
        return self.qweight.float() * self.scales[:, None]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantize(), self.bias)

    @property
    def nbytes(self) -> int:
        return self.qweight.numel() + self.scales.numel() * 4 + _bias_bytes(self.bias)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"qweight": self.qweight, "scales": self.scales}
        if self.bias is not None:
            out["bias"] = self.bias
        return out

    @classmethod
    def fuse(cls, parts: list[FP8Linear]) -> FP8Linear:
        return cls(torch.cat([p.qweight for p in parts]), torch.cat([p.scales for p in parts]),
                   _cat_bias(parts))


OVERFLOW = 127.5  # |x| / act_scale beyond which int8 would saturate (csrc kActOverflow)


class StaticInt8Linear:
    """SmoothQuant W8A8: the input is quantized to int8 with a static per-tensor scale found by
    calibration (the smoothing factors are already folded into the preceding norm or projection
    and into the weight), the weight is int8 per output channel. Up to the int8 kernels' row
    limit (decode, short prefills) it multiplies int8 x int8 with int32 accumulation
    (llmbench.kernels.int8_act); longer prefills run the same integer-valued numbers through
    fp32 GEMM (see int8_act.describe())."""

    kind = "w8a8"

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, act_scale: torch.Tensor,
                 bias: torch.Tensor | None = None) -> None:
        self.inner = Int8Linear(qweight, scales, None, bias)
        self.act_scale = act_scale.float().reshape(1).contiguous()
        self.out_features, self.in_features = self.inner.out_features, self.inner.in_features
        self.bias = self.inner.bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = int8_act.linear_w8a8(x, self.act_scale, self.inner.qweight, self.inner.scales,
                                 self.bias)
        # A token beyond the calibrated range (an attention-sink token's massive activations)
        # would saturate: it is recomputed with fp32 activations on the same int8 weights.
        over = x.abs().amax(dim=-1) > OVERFLOW * self.act_scale
        if bool(over.any()):
            y[over] = self.inner(x[over])
        return y

    def dequantize(self) -> torch.Tensor:
        return self.inner.dequantize()

    @property
    def nbytes(self) -> int:
        return self.inner.nbytes

    def tensors(self) -> dict[str, torch.Tensor]:
        return {**self.inner.tensors(), "act_scale": self.act_scale}

    @classmethod
    def fuse(cls, parts: list[StaticInt8Linear]) -> Any:
        if len({float(p.act_scale) for p in parts}) == 1:
            inner = Int8Linear.fuse([p.inner for p in parts])
            return cls(inner.qweight, inner.scales, parts[0].act_scale, inner.bias)
        return _Concat(parts)


class FloatLinear:
    """A projection kept in floating point (SmoothQuant's fallback layers): fp32, or bf16 when
    the model runs in bf16 (to_bf16)."""

    kind = "float"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        keep = weight.dtype == torch.bfloat16
        self.weight = (weight if keep else weight.float()).contiguous()
        self.kernel = kernels.linear_bf16w if keep else kernels.linear_f32
        self.bias = None if bias is None else bias.float().contiguous()
        self.out_features, self.in_features = self.weight.shape

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernel(x, self.weight, self.bias)

    def to_bf16(self) -> FloatLinear:
        return FloatLinear(self.weight.to(torch.bfloat16), self.bias)

    def dequantize(self) -> torch.Tensor:
        return self.weight.float()

    @property
    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size() + _bias_bytes(self.bias)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"weight": self.weight}
        if self.bias is not None:
            out["bias"] = self.bias
        return out

    @classmethod
    def fuse(cls, parts: list[FloatLinear]) -> FloatLinear:
        return cls(torch.cat([p.weight for p in parts]), _cat_bias(parts))


class _Concat:
    """Projections sharing an input that can't be fused into one tensor: applied one by one."""

    kind = "concat"

    def __init__(self, parts: list[Any]) -> None:
        self.parts = parts
        self.out_features = sum(p.out_features for p in parts)
        self.in_features = parts[0].in_features
        self.bias = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([p(x) for p in self.parts], dim=-1)

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)


class Int8GroupLinear:
    """INT8 weights with a scale (and, asymmetric, a zero point) per group of `group_size`
    input channels: w = (q - z) * s. No compiled kernel takes int8 groups, so this dequantizes
    in pure torch on every call (correct, not fast; the report says so), as NF4 does."""

    kind = "int8g"

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                 group_size: int, in_features: int, bias: torch.Tensor | None = None) -> None:
        self.qweight = qweight.contiguous()  # int8 [N, K padded to whole groups]
        self.scales = scales.float().contiguous()  # [N, groups]
        self.zeros = None if zeros is None else zeros.float().contiguous()
        self.group_size = int(group_size)
        self.in_features = int(in_features)
        self.out_features = self.qweight.shape[0]
        self.bias = None if bias is None else bias.float().contiguous()

    def dequantize(self) -> torch.Tensor:
        n, kp = self.qweight.shape
        q = self.qweight.float().view(n, kp // self.group_size, self.group_size)
        if self.zeros is not None:
            q = q - self.zeros[:, :, None]
        return (q * self.scales[:, :, None]).view(n, kp)[:, : self.in_features]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantize(), self.bias)

    @property
    def nbytes(self) -> int:
        extra = 0 if self.zeros is None else self.zeros.numel() * 4
        return (self.qweight.numel() + self.scales.numel() * 4 + extra
                + _bias_bytes(self.bias))

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"qweight": self.qweight, "scales": self.scales}
        if self.zeros is not None:
            out["zeros"] = self.zeros
        if self.bias is not None:
            out["bias"] = self.bias
        return out

    @classmethod
    def fuse(cls, parts: list[Int8GroupLinear]) -> Any:
        first = parts[0]
        if any(p.group_size != first.group_size or p.in_features != first.in_features
               or (p.zeros is None) != (first.zeros is None) for p in parts):
            return _Concat(parts)
        zeros = None if first.zeros is None else torch.cat([p.zeros for p in parts])
        return cls(torch.cat([p.qweight for p in parts]), torch.cat([p.scales for p in parts]),
                   zeros, first.group_size, first.in_features, _cat_bias(parts))


LOWP_DTYPES = {"BF16": torch.bfloat16, "FP16": torch.float16}


class LowpLinear:
    """--lowp-mode BF16|FP16 (IPEX's compute dtype of weight-only quantization): the weights
    dequantized to bf16/fp16 and multiplied with the activations rounded to that dtype, by
    torch's matmul in that dtype; the result back in fp32. Where the CPU has no bf16/fp16
    arithmetic torch emulates it (the report says so). The weights stay stored as quantized;
    this wrapper is never saved (apply.save takes the projections it wraps)."""

    def __init__(self, inner: Any, lowp_mode: str) -> None:
        self.inner = inner
        self.lowp_mode = lowp_mode
        self.dtype = LOWP_DTYPES[lowp_mode]
        self.kind = f"{inner.kind}-{lowp_mode.lower()}"
        self.in_features = inner.in_features
        self.out_features = inner.out_features
        bias = getattr(inner, "bias", None)
        self.bias = None if bias is None else bias.to(self.dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.inner.dequantize().to(self.dtype)
        return F.linear(x.to(self.dtype), weight, self.bias).float()

    def dequantize(self) -> torch.Tensor:
        return self.inner.dequantize()

    @property
    def nbytes(self) -> int:
        return self.inner.nbytes

    def tensors(self) -> dict[str, torch.Tensor]:
        return self.inner.tensors()

    @classmethod
    def fuse(cls, parts: list[LowpLinear]) -> LowpLinear:
        return cls(fuse([p.inner for p in parts]), parts[0].lowp_mode)


LINEAR_CLASSES = {cls.kind: cls for cls in (Int8Linear, Int4Linear, NF4Linear, FP8Linear,
                                            StaticInt8Linear, FloatLinear, Int8GroupLinear)}


def fuse(parts: list[Any]) -> Any:
    """One projection computing all of `parts` on the same input (outputs concatenated)."""
    if len(parts) == 1:
        return parts[0]
    kinds = {p.kind for p in parts}
    if len(kinds) != 1:
        return _Concat(parts)
    return type(parts[0]).fuse(parts)


# Per-output-row tensors of the classes above (a projection's rows are independent: every
# format quantizes along the input dimension only).
_ROW_TENSORS = ("qweight", "packed", "weight", "scales", "zeros", "zero_term", "bias")


def take_rows(linear: Any, rows: torch.Tensor) -> Any:
    """The projection computing only output rows `rows` of `linear`, in that order (the native
    backend reorders fused QKV layouts this way, float and quantized alike)."""
    if isinstance(linear, _Concat):
        raise ValueError("cannot reorder the rows of projections kept side by side")
    taken = copy.copy(linear)
    for attr, value in vars(linear).items():
        if isinstance(value, torch.Tensor) and attr in _ROW_TENSORS:
            setattr(taken, attr, value[rows].contiguous())
        elif hasattr(value, "out_features") and hasattr(value, "tensors"):
            setattr(taken, attr, take_rows(value, rows))  # a wrapped projection (`inner`)
    if isinstance(taken, StaticInt8Linear):
        taken.bias = taken.inner.bias
    taken.out_features = int(rows.numel())
    return taken


class QuantizedLinear(torch.nn.Module):
    """Drop-in for nn.Linear in a Hugging Face model: runs a quantized projection in fp32 and
    returns the input's dtype."""

    def __init__(self, inner: Any, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.inner = inner
        self.in_features = inner.in_features
        self.out_features = inner.out_features
        # Some modeling code reads `.weight.dtype` to cast activations (T5's feed-forward
        # output projection): an empty tensor of the replaced weights' dtype keeps that cast
        # what it was. It holds no values: code that multiplies by `.weight` fails loudly.
        self.register_buffer("weight", torch.empty(0, dtype=dtype), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        y = self.inner(x.float() if dtype != torch.float32 else x)
        return y if y.dtype == dtype else y.to(dtype)

    def extra_repr(self) -> str:
        return f"{self.inner.kind}, in={self.in_features}, out={self.out_features}"
