"""Compare two benchmark results side by side and flag changes beyond the runs' own spread.

    python tools/compare_reports.py BEFORE AFTER [--fail-above PCT] [--min-change PCT]
    llmbench-compare-reports BEFORE AFTER ...     (the same, installed by tools/env_setup.sh)

BEFORE and AFTER are each a report JSON of run.py / single_instance/run_generation.py, a folder
of them (a set of runs: configs are matched by model, dtype, backend, quantization, decoding,
prompt length, batch and new tokens), or the JSON of benchmarks/compare_backends.py or
benchmarks/batch_sweep.py (rows matched by config and batch size).

For each metric present on both sides (first token, next token, whole iteration) it prints the
medians, their ratio and each side's spread, and calls the change real only when it is larger
than both --min-change and the noisier run's own spread ((p90 - p10) / median over its
iterations: each iteration's first token, its median decode step, its whole time; single
decode steps jitter far more than their median moves between iterations). compare_backends /
batch_sweep rows keep medians only: --min-change alone decides there. With --fail-above PCT
the exit status is 1 when a flagged slowdown exceeds PCT percent (for CI); bad input exits 2.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

from llmbench.timing import percentile

METRICS = ("first_token_ms", "next_token_ms", "iteration_ms")


class InputError(Exception):
    pass


def metric(samples: list[float], per_iteration: list[float] | None = None
           ) -> dict[str, float] | None:
    """Median of samples in seconds, reported in ms, and the relative spread of the
    per-iteration values (the samples themselves when each iteration gives one)."""
    if not samples:
        return None
    median = statistics.median(samples)
    spreading = per_iteration or samples
    spread = ((percentile(spreading, 90) - percentile(spreading, 10)) / median
              if median else 0.0)
    return {"median": median * 1000.0, "spread": spread, "count": len(samples)}


def report_entry(report: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """A run.py report: (its config key, {metric: median/spread})."""
    model, stats = report["model"], report["statistics"]
    quant = report["backend"].get("quantization") or report.get("quantization") or {}
    scheme = quant.get("scheme") or {}
    scheme_text = "-".join(str(scheme[k]) for k in ("weight_dtype", "group_size", "lowp_mode")
                           if scheme.get(k) is not None) or "none"
    threads = (report.get("environment") or {}).get("torch_threads")
    key = (f"{model.get('name')} {model.get('dtype')} {report['backend']['name']} "
           f"quant={scheme_text} {report['decoding']['mode']} in={report['prompt']['tokens']} "
           f"batch={stats.get('batch_size')} out={stats.get('new_tokens_per_sequence')} "
           f"threads={threads}")
    iterations = report.get("iterations") or []
    steps = [it["step_latencies_s"] for it in iterations if it.get("step_latencies_s")]
    values = {"first_token_ms": metric([s[0] for s in steps]),
              "next_token_ms": metric([t for s in steps for t in s[1:]],
                                      [statistics.median(s[1:]) for s in steps if s[1:]]),
              "iteration_ms": metric([it["seconds"] for it in iterations])}
    return key, {name: v for name, v in values.items() if v}


def row_entries(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """compare_backends / batch_sweep rows: medians only (spread unknown: 0)."""
    out = {}
    for row in data["rows"]:
        if "error" in row:
            continue
        key = f"{data.get('model', '?')} {row['config']} batch={row.get('batch_size', 1)}"
        out[key] = {name: {"median": row[name], "spread": 0.0, "count": 1}
                    for name in ("first_token_ms", "next_token_ms") if name in row}
    return out


def load(path: Path) -> dict[str, dict[str, Any]]:
    """Every config in a report, a folder of reports, or a benchmark script's JSON."""
    if path.is_dir():
        files = sorted(path.glob("*.json"))
        if not files:
            raise InputError(f"{path}: no .json reports in this folder")
    elif path.is_file():
        files = [path]
    else:
        raise InputError(f"{path}: no such file or folder")
    entries: dict[str, dict[str, Any]] = {}
    for file in files:
        try:
            data = json.loads(file.read_text())
        except (OSError, ValueError) as exc:
            raise InputError(f"{file}: not a JSON file ({exc})") from None
        if isinstance(data, dict) and "rows" in data:
            entries.update(row_entries(data))
        elif isinstance(data, dict) and "statistics" in data and "model" in data:
            if data.get("status") == "failed":
                continue
            key, values = report_entry(data)
            if key in entries:  # several runs of one config in a folder: the later one wins
                print(f"note: {file.name}: a second run of {key}; using it", file=sys.stderr)
            entries[key] = values
        else:
            raise InputError(f"{file}: neither an llmbench report nor a benchmark table")
    return entries


def compare(before: dict[str, dict[str, Any]], after: dict[str, dict[str, Any]],
            min_change: float) -> list[dict[str, Any]]:
    rows = []
    for key in sorted(set(before) & set(after)):
        for name in METRICS:
            a, b = before[key].get(name), after[key].get(name)
            if not a or not b:
                continue
            ratio = b["median"] / a["median"]
            noise = max(min_change, a["spread"], b["spread"])
            verdict = "same"
            if abs(ratio - 1.0) > noise:
                verdict = "slower" if ratio > 1.0 else "faster"
            rows.append({"config": key, "metric": name, "before_ms": a["median"],
                         "after_ms": b["median"], "ratio": ratio, "noise": noise,
                         "verdict": verdict})
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| config | metric | before ms | after ms | after / before | noise band | verdict |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        mark = f"**{r['verdict']}**" if r["verdict"] != "same" else "same"
        lines.append(f"| {r['config']} | {r['metric']} | {r['before_ms']:.3f} | "
                     f"{r['after_ms']:.3f} | {r['ratio']:.3f}x | +-{100 * r['noise']:.0f}% | "
                     f"{mark} |")
    return "\n".join(lines)
