"""Comparing saved accuracy reports (tools/accuracy_table.py): one row per run, the deltas of
each against the float32, stock, unquantized run of the same model and task."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llmbench.accuracy.single_instance import ACCURACY_SCHEMA
from llmbench.errors import UserError

DTYPE_ORDER = {"float32": 0, "bfloat16": 1, "float16": 2}


def quantization_label(quantization: Any) -> str:
    if not quantization:
        return "none"
    if isinstance(quantization, dict):
        return str(quantization.get("scheme") or quantization.get("name")
                   or json.dumps(quantization, sort_keys=True))
    return str(quantization)


def read_reports(paths: list[str]) -> list[dict[str, Any]]:
    """Every complete accuracy report in these files and folders (folders searched recursively);
    benchmark reports beside them are passed over."""
    files: list[Path] = []
    for name in paths:
        path = Path(name).expanduser()
        if path.is_dir():
            files += sorted(path.rglob("*.json"))
        elif path.is_file():
            files.append(path)
        else:
            raise UserError(f"{name}: no such file or folder")
    reports = []
    for file in files:
        try:
            report = json.loads(file.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue
        if (isinstance(report, dict) and report.get("schema") == ACCURACY_SCHEMA
                and report.get("status") == "complete"):
            report["_file"] = str(file)
            reports.append(report)
    if not reports:
        raise UserError(f"no accuracy results ({ACCURACY_SCHEMA} JSON) in {', '.join(paths)}")
    return reports


def accuracy_rows(reports: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (run, task): the metrics lm-eval reported, by plain name."""
    rows = []
    for report in reports:
        for task, values in report["lm_eval"]["results"].items():
            metrics = {key.split(",")[0]: value for key, value in values.items()
                       if "," in key and "_stderr" not in key and isinstance(value, int | float)}
            rows.append({
                "model": report["model"]["name"],
                "dtype": report["model"]["dtype"],
                "backend": report["backend"]["name"],
                "quantization": quantization_label(report.get("quantization")),
                "task": task,
                "n": values.get("sample_len", report["lm_eval"].get("n-samples", {})
                                .get(task, {}).get("effective")),
                "metrics": metrics,
                "created": report.get("created", ""),
                "file": Path(report["_file"]).name,
            })
    rows.sort(key=lambda r: (r["model"], r["task"], r["n"] or 0, r["quantization"] != "none",
                             r["quantization"], DTYPE_ORDER.get(r["dtype"], 9),
                             r["backend"] != "stock", r["backend"], r["created"]))
    return rows


def _number(value: Any, digits: int = 4, sign: bool = False) -> str:
    if not isinstance(value, int | float):
        return ""
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def delta(metrics: dict[str, float], base: dict[str, float], name: str) -> str:
    return _number(metrics[name] - base[name], sign=True) if name in metrics and name in base \
        else ""


def comparison_table(reports: list[dict[str, Any]]) -> str:
    """Markdown, one row per run and task; Δ columns against the float32 / stock / unquantized
    run of the same model, task and document count (the newest one, when there are several)."""
    rows = accuracy_rows(reports)
    baselines = {}
    for row in rows:  # sorted oldest first within a configuration: the newest wins
        if (row["dtype"], row["backend"], row["quantization"]) == ("float32", "stock", "none"):
            baselines[(row["model"], row["task"], row["n"])] = row

    lines = ["| model | dtype | backend | quantization | task | n | acc | Δ acc | perplexity "
             "| Δ ppl | other metrics | file |",
             "|---|---|---|---|---|--:|--:|--:|--:|--:|---|---|"]
    for row in rows:
        metrics = row["metrics"]
        base = baselines.get((row["model"], row["task"], row["n"]))
        base_metrics = base["metrics"] if base is not None and base is not row else {}
        other = ", ".join(f"{name}={_number(value)}" for name, value in sorted(metrics.items())
                          if name not in ("acc", "perplexity"))
        cells = [row["model"], row["dtype"], row["backend"], row["quantization"], row["task"],
                 row["n"] if row["n"] is not None else "", _number(metrics.get("acc")),
                 delta(metrics, base_metrics, "acc"), _number(metrics.get("perplexity")),
                 delta(metrics, base_metrics, "perplexity"), other,
                 row["file"]]
        lines.append("| " + " | ".join(str(cell).replace("|", "/") for cell in cells) + " |")
    return "\n".join(lines) + "\n"
