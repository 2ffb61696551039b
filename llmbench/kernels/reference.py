"""Pure-PyTorch reference implementations of the llmbench kernels.

These define the semantics of every function in :mod:`llmbench.kernels`; the
compiled kernels must agree with them up to floating-point reassociation.  They
are also the fallback used when the C++ extension is not built, and the path
used for large M (prefill), where torch/oneDNN's compute-bound GEMM is good.

All math is float32: weights are dequantized/widened to float32, activations
are never rounded to a lower precision.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "linear_f32",
    "linear_bf16w",
    "linear_int8w",
    "linear_int4w",
    "dequantize_int8",
    "dequantize_int4",
    "quantize_int8",
    "quantize_int4",
    "pack_int4",
    "unpack_int4",
    "rms_norm",
    "rope",
    "rope_qk_",
]

INT4_BLOCK = 32  # elements per packed block (16 bytes)


def linear_f32(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return F.linear(x, w, bias)


def linear_bf16w(
    x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    return F.linear(x, w.float(), bias)


def dequantize_int8(qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """int8 [N, K] * float32 scales [N] -> float32 [N, K]."""
    if scales.numel() != qweight.shape[0]:
        raise ValueError(
            f"int8: scales must have {qweight.shape[0]} elements, got {tuple(scales.shape)}"
        )
    return qweight.float() * scales.float().unsqueeze(1)


def linear_int8w(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    return F.linear(x, dequantize_int8(qweight, scales), bias)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit values q (uint8 in [0, 15], shape [N, K], K even) -> uint8 [N, K/2].

    Layout, per row: every full block of 32 elements (k0 = 32*b) becomes 16
    bytes; byte i of the block holds element k0+i in its low nibble and
    element k0+16+i in its high nibble.  A trailing partial block of (even)
    length L holds element k0+i (low) and k0+L/2+i (high) in byte i.  With
    this layout AVX2 unpacks 8 bytes into 8 lanes (vpmovzxbd) and gets 16
    consecutive elements from one AND and one shift -- no shuffles.
    """
    if q.dim() != 2:
        raise ValueError(f"pack_int4: expected a 2-D [N, K] tensor, got shape {tuple(q.shape)}")
    N, K = q.shape
    if K % 2:
        raise ValueError(f"pack_int4: K must be even, got {K}")
    if q.dtype.is_floating_point or q.dtype.is_complex or q.dtype == torch.bool:
        raise TypeError(f"pack_int4: expected an integer tensor (uint8 in [0, 15]), got {q.dtype}")
    if q.numel() and (int(q.min()) < 0 or int(q.max()) > 15):
        raise ValueError("pack_int4: values must be in [0, 15]")
    q = q.to(torch.uint8)
    kf = (K // INT4_BLOCK) * INT4_BLOCK
    parts = []
    if kf:
        blk = q[:, :kf].reshape(N, kf // INT4_BLOCK, 2, INT4_BLOCK // 2)
        parts.append((blk[:, :, 0] | (blk[:, :, 1] << 4)).reshape(N, kf // 2))
    L = K - kf
    if L:
        t = q[:, kf:]
        parts.append(t[:, : L // 2] | (t[:, L // 2 :] << 4))
    if not parts:
        return torch.empty((N, 0), dtype=torch.uint8)
    return torch.cat(parts, dim=1).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: uint8 [N, K/2] -> uint8 [N, K] with values in [0, 15]."""
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise TypeError("unpack_int4: expected a 2-D uint8 tensor")
    N, Kh = packed.shape
    K = 2 * Kh
    kf = (K // INT4_BLOCK) * INT4_BLOCK
    parts = []
    if kf:
        blk = packed[:, : kf // 2].reshape(N, kf // INT4_BLOCK, INT4_BLOCK // 2)
        parts.append(torch.stack([blk & 15, blk >> 4], dim=2).reshape(N, kf))
    if K - kf:
        t = packed[:, kf // 2 :]
        parts.append(torch.cat([t & 15, t >> 4], dim=1))
    if not parts:
        return torch.empty((N, 0), dtype=torch.uint8)
    return torch.cat(parts, dim=1)


def check_int4_group(K: int, group_size: int) -> int:
    """Validate group_size for K and return the number of groups."""
    if K % 2:
        raise ValueError(f"int4: K must be even, got {K}")
    ok = group_size == K or (
        group_size >= 32 and (group_size & (group_size - 1)) == 0 and K % group_size == 0
    )
    if not ok:
        raise ValueError(
            "int4: group_size must be K or a power of two >= 32 dividing K "
            f"(K={K}, group_size={group_size})"
        )
    return K // group_size


def dequantize_int4(
    qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int
) -> torch.Tensor:
    """Packed int4 [N, K/2] -> float32 [N, K] with w = (q - zero) * scale per group."""
    q = unpack_int4(qweight).float()
    N, K = q.shape
    G = check_int4_group(K, group_size)
    for name, t in (("scales", scales), ("zeros", zeros)):
        if t.numel() != N * G:
            raise ValueError(f"int4: {name} must have shape [{N}, {G}], got {tuple(t.shape)}")
    q = q.view(N, G, K // G)
    w = (q - zeros.float().view(N, G, 1)) * scales.float().view(N, G, 1)
    return w.view(N, K)


def linear_int4w(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    return F.linear(x, dequantize_int4(qweight, scales, zeros, group_size), bias)


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: returns (qweight int8 [N, K], scales float32 [N])."""
    w = w.float()
    scales = (w.abs().amax(dim=1) / 127.0).clamp_min(1e-12)
    q = torch.round(w / scales.unsqueeze(1)).clamp_(-127, 127).to(torch.int8)
    return q.contiguous(), scales.contiguous()


def quantize_int4(
    w: torch.Tensor, group_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric group-wise int4 (min/max).  Returns (packed uint8 [N, K/2],
    scales float32 [N, K/group_size], zeros float32 [N, K/group_size]) with
    w ~= (q - zero) * scale; zeros are integers in [0, 15] stored as float32."""
    w = w.float()
    N, K = w.shape
    G = check_int4_group(K, group_size)
    wg = w.view(N, G, K // G)
    lo = wg.amin(dim=2).clamp(max=0.0)
    hi = wg.amax(dim=2).clamp(min=0.0)
    scales = ((hi - lo) / 15.0).clamp_min(1e-12)
    zeros = torch.round(-lo / scales).clamp_(0, 15)
    q = torch.round(wg / scales.unsqueeze(2) + zeros.unsqueeze(2)).clamp_(0, 15).to(torch.uint8)
    return pack_int4(q.view(N, K)), scales.contiguous(), zeros.contiguous()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' RMSNorm in fp32."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True).add_(eps)) * weight


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE: x [..., S, d], cos and sin [S, rot] with rot <= d (the first rot dims
    rotate, the rest pass through)."""
    rot = cos.shape[-1]
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    half = rot // 2
    rotated = torch.cat((-x_rot[..., half:], x_rot[..., :half]), dim=-1)
    out = x_rot * cos + rotated * sin
    return out if x_pass.shape[-1] == 0 else torch.cat((out, x_pass), dim=-1)


def rope_qk_(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, kv_heads: int,
             head_dim: int) -> None:
    """RoPE on the q and k heads of qkv [rows * S, (heads + 2 * kv_heads) * head_dim] in place,
    token t at position row t % S of cos and sin [S, rot]."""
    seq = cos.shape[0]
    qk = qkv.view(-1, seq, heads + 2 * kv_heads, head_dim)[:, :, : heads + kv_heads]
    qk.copy_(rope(qk.transpose(1, 2), cos, sin).transpose(1, 2))
