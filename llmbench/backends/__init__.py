"""Optimization backends: each takes a loaded model and returns the model to run.

stock: transformers eager, as loaded. ipex: ipex.llm.optimize, only where it imports.
A backend that can't run here stops with a message; nothing silently runs something else.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from llmbench.errors import UserError


@dataclass
class PreparedModel:
    model: Any
    backend: str
    details: dict[str, Any] = field(default_factory=dict)  # recorded in the report


def prepare(model: Any, *, backend: str, dtype: str, family: str) -> PreparedModel:
    if backend == "stock":
        from llmbench.backends import stock

        return stock.prepare(model)
    if backend == "ipex":
        from llmbench.backends import ipex

        return ipex.prepare(model, dtype=dtype, family=family)
    raise UserError(f"unknown backend {backend!r}")
