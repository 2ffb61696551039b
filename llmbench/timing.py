"""Per-step timestamps for every decoding mode, and the statistics reported over them.

transformers calls the stopping criteria exactly once per decoding step, right after the forward
pass has produced that step's token, in greedy, beam and sampling alike. A criterion that never
stops and only records the time is therefore a per-token clock for all of them, which a streamer
(greedy, batch 1 only) is not.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from transformers import StoppingCriteria


class StepTimer(StoppingCriteria):
    """Records a timestamp after each decoding step; never stops generation."""

    def __init__(self) -> None:
        self.start_time = 0.0
        self.stamps: list[float] = []

    def start(self) -> None:
        self.stamps = []
        self.start_time = time.perf_counter()

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        self.stamps.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    def step_latencies(self) -> list[float]:
        """Seconds per step: the first covers the prompt (prefill) and the first token."""
        previous = self.start_time
        latencies = []
        for stamp in self.stamps:
            latencies.append(stamp - previous)
            previous = stamp
        return latencies


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (the numpy default), q in [0, 100]."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summarize(values: list[float]) -> dict[str, float]:
    """mean, p50, p90, p99, std (population), min, max and count of a list of seconds."""
    count = len(values)
    if count == 0:
        return {"count": 0}
    mean = sum(values) / count
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / count)
    return {
        "count": count,
        "mean": mean,
        "p50": percentile(values, 50),
        "p90": percentile(values, 90),
        "p99": percentile(values, 99),
        "std": std,
        "min": min(values),
        "max": max(values),
    }
