"""What a backend hands back: the model to run and what the report says about it (a module of
its own so that the backends import it without importing their package's dispatcher)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class PreparedModel:
    model: Any
    backend: str
    details: dict[str, Any] = field(default_factory=dict)  # recorded in the report
