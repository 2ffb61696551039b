"""The reference: transformers' own eager model, unchanged."""

from __future__ import annotations

from typing import Any

from llmbench.backends.prepared import PreparedModel


def prepare(model: Any) -> PreparedModel:
    return PreparedModel(model=model.eval(), backend="stock",
                         details={"attention": getattr(model.config, "_attn_implementation", None)})
