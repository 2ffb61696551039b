"""Progress bars for the long steps (quantization, calibration, GPTQ, sweeps): tqdm on stderr,
shown only when stderr is a terminal, so logs and CI output stay free of redraw lines."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any


def bar(items: Iterable[Any], desc: str, total: int | None = None, unit: str = "it") -> Any:
    from tqdm import tqdm

    return tqdm(items, desc=desc, total=total, unit=unit, file=sys.stderr, disable=None,
                leave=False, dynamic_ncols=True)
