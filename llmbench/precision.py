"""Can this CPU compute in the requested dtype, and does it do so natively or by emulation?"""

from __future__ import annotations

from llmbench.environment import has_native_bf16, has_native_fp16
from llmbench.errors import UserError


def probe_dtype(dtype: str) -> None:
    """Run the operations generation needs (matmul, softmax, layer norm) in `dtype`."""
    import torch

    torch_dtype = getattr(torch, dtype)
    x = torch.randn(4, 64).to(torch_dtype)
    w = torch.randn(64, 64).to(torch_dtype)
    y = torch.nn.functional.linear(x, w)
    torch.softmax(y, dim=-1)
    torch.nn.functional.layer_norm(y, (64,))
    torch.nn.functional.scaled_dot_product_attention(y[None, None], y[None, None], y[None, None])


def check_dtype(dtype: str) -> list[str]:
    """Stop if `dtype` can't run here; return notes for the report when it runs emulated."""
    try:
        probe_dtype(dtype)
    except Exception as exc:  # the CPU or this torch build lacks kernels for the dtype
        raise UserError(f"--dtype {dtype} can't run on this CPU with this torch build: "
                        f"{type(exc).__name__}: {exc}") from exc
    notes = []
    if dtype == "bfloat16" and not has_native_bf16():
        notes.append("bfloat16 arithmetic is emulated on this CPU (no avx512_bf16/amx_bf16/bf16): "
                     "weights take half the bytes, but prefill computes slower than float32")
    if dtype == "float16" and not has_native_fp16():
        notes.append("float16 arithmetic is emulated on this CPU (no avx512_fp16/amx_fp16/fphp)")
    return notes
