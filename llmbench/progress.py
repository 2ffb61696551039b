"""Progress bars for the long steps (quantization, calibration, GPTQ, sweeps, shard writing):
tqdm on stderr, shown only when stderr is a terminal, so logs and CI output stay free of redraw
lines."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any


def bar(items: Iterable[Any], desc: str, total: int | None = None, unit: str = "it") -> Any:
    from tqdm import tqdm

    return tqdm(items, desc=desc, total=total, unit=unit, file=sys.stderr, disable=None,
                leave=False, dynamic_ncols=True)


def transformers_bars() -> None:
    """transformers' own bars (loading weights, writing a model's shard files) under the same
    rule: on a terminal only."""
    from transformers.utils import logging as hf_logging

    if sys.stderr.isatty():
        hf_logging.enable_progress_bar()
    else:
        hf_logging.disable_progress_bar()
