"""Optimization backends: each takes a loaded model and returns the model to run.

stock: transformers eager, as loaded. native: our own model over llmbench.kernels (native.py).
ipex: ipex.llm.optimize, only where it imports.
A backend that can't run here stops with a message; nothing silently runs something else.
"""

from __future__ import annotations

from typing import Any

from llmbench.backends.prepared import PreparedModel
from llmbench.errors import UserError

__all__ = ["PreparedModel", "prepare", "requested"]


def requested(backend: str, ipex: bool) -> str:
    """The backend --backend / --ipex ask for; IPEX is checked here, so that a machine without
    it says so in one line before anything loads. (Light on purpose: run.py calls it before any
    step starts, without importing torch.)"""
    if ipex and backend not in ("stock", "ipex"):
        raise UserError(f"--ipex contradicts --backend {backend}")
    backend = "ipex" if ipex else backend
    if backend == "ipex":
        from llmbench.backends.ipex import require_ipex

        require_ipex()
    return backend


def prepare(model: Any, *, backend: str, dtype: str, family: str,
            kv_cache_dtype: str = "auto", place_weights: bool = True) -> PreparedModel:
    """place_weights=False: the caller replaces the native projections next (quantization),
    and their placement happens then, so the float weights are not copied for nothing."""
    if kv_cache_dtype != "auto" and backend != "native":
        raise UserError(f"--kv-cache-dtype {kv_cache_dtype} needs --backend native")
    if backend == "native":
        from llmbench.backends import native

        return native.prepare(model, dtype=dtype, family=family, kv_cache_dtype=kv_cache_dtype,
                              place_weights=place_weights)
    if backend == "stock":
        from llmbench.backends import stock

        return stock.prepare(model)
    if backend == "ipex":
        from llmbench.backends import ipex

        return ipex.prepare(model, dtype=dtype, family=family)
    raise UserError(f"unknown backend {backend!r}")
