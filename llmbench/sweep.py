"""run.py sweeps, as llama-bench runs them: comma lists for the flags in SWEEP_FLAGS, the cross
product run one config at a time, each config's steps (run.py's plan for it) in processes of
their own (so no config measures what another left in memory), one results table written as
--output-format says, and --plot's PNGs.

    python run.py --benchmark -m MODEL --dtype float32,bfloat16 --backend stock,native \
        --batch-size 1,4 --input-tokens 32,512 --output-format md,csv,json --plot

Every config's own report (JSON + markdown) stays in its folder under the sweep's folder; the
table's rows point at them. A config that fails is a row marked failed with its exit status;
the sweep goes on and exits with the first failure's status at the end.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from llmbench.atomic import save_png, write_text
from llmbench.errors import UserError

# flag -> column name. Each takes one value per config; a comma list sweeps it.
SWEEP_FLAGS = {"--dtype": "dtype", "--backend": "backend", "--batch-size": "batch",
               "--input-tokens": "input tokens", "--max-new-tokens": "new tokens",
               "--num-beams": "beams", "--weight-dtype": "weight dtype"}
OUTPUT_FORMATS = ("md", "csv", "json", "jsonl")
METRIC_COLUMNS = ("first token ms", "next token ms", "decode tokens/s", "peak RSS MiB")


def output_formats(text: str) -> list[str]:
    formats = [f.strip() for f in text.split(",") if f.strip()]
    unknown = [f for f in formats if f not in OUTPUT_FORMATS]
    if unknown or not formats:
        raise UserError(f"--output-format {text}: use a comma list of {', '.join(OUTPUT_FORMATS)}")
    return formats


def swept_values(argv: list[str]) -> dict[str, list[str]]:
    """The SWEEP_FLAGS given with comma lists in argv: flag -> its values, in argv's order."""
    lists: dict[str, list[str]] = {}
    for i, token in enumerate(argv):
        flag, eq, value = token.partition("=")
        if flag not in SWEEP_FLAGS:
            continue
        if not eq:
            value = argv[i + 1] if i + 1 < len(argv) else ""
        if "," in value:
            values = [v.strip() for v in value.split(",")]
            if any(not v for v in values) or len(set(values)) != len(values):
                raise UserError(f"{flag} {value}: a sweep list needs distinct, non-empty values")
            lists[flag] = values
    return lists


def choices(lists: dict[str, list[str]]) -> list[dict[str, str]]:
    """The cross product of swept values: one {flag: value} per config (one empty config when
    nothing is swept)."""
    return [dict(zip(lists, values, strict=True)) for values in itertools.product(*lists.values())]


def config_argv(argv: list[str], choice: dict[str, str], output_dir: Path | None = None
                ) -> list[str]:
    """argv with each swept flag set to its value for this config, --output-dir replaced when
    output_dir is given, and --token-latency (the first/next-token columns need per-step
    timestamps)."""
    replaced = set(choice) | ({"--output-dir"} if output_dir is not None else set())
    out: list[str] = []
    skip = False
    for i, token in enumerate(argv):
        if skip:
            skip = False
            continue
        flag, eq, _ = token.partition("=")
        if flag in replaced:
            skip = not eq and i + 1 < len(argv)
            continue
        out.append(token)
    for flag, value in choice.items():
        out += [flag, value]
    if "--token-latency" not in out:
        out.append("--token-latency")
    return out + ([] if output_dir is None else ["--output-dir", str(output_dir)])


def new_root(output_dir: str) -> Path:
    """The sweep's folder (created when the first config runs)."""
    return Path(output_dir) / f"sweep-{time.strftime('%Y%m%d-%H%M%S')}"


def config_folder(root: Path, index: int, choice: dict[str, str]) -> Path:
    return root / f"{index:03d}-{slug(choice)}"


@dataclass
class Config:
    choice: dict[str, str]  # swept flag -> this config's value
    folder: Path  # its --output-dir
    steps: list[Any]  # run.py's plan for it (llmbench.steps.Step)


def slug(choice: dict[str, str]) -> str:
    text = "-".join(f"{SWEEP_FLAGS[f].replace(' ', '')}{v}" for f, v in choice.items())
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text) or "config"


def report_row(folder: Path) -> dict[str, Any]:
    """The metrics of the benchmark report a config wrote (the latest, if several)."""
    reports = sorted(folder.glob("*.json"), key=lambda p: p.stat().st_mtime)
    reports = [p for p in reports if _is_report(p)]
    if not reports:
        return {}
    data = json.loads(reports[-1].read_text())
    stats = data.get("statistics") or {}
    row: dict[str, Any] = {"report": str(reports[-1])}
    first, nxt = stats.get("first_token_latency_s"), stats.get("next_token_latency_s")
    if first and first.get("count"):
        row["first token ms"] = round(first["p50"] * 1000, 3)
    if nxt and nxt.get("count"):
        row["next token ms"] = round(nxt["p50"] * 1000, 3)
        row["decode tokens/s"] = round(stats.get("batch_size", 1) / nxt["p50"], 2)
    if data.get("peak_rss_bytes"):
        row["peak RSS MiB"] = round(data["peak_rss_bytes"] / 2**20)
    return row


def _is_report(path: Path) -> bool:
    try:
        return "statistics" in json.loads(path.read_text())
    except (OSError, ValueError):
        return False


def run_sweep(configs: list[Config], root: Path, formats: list[str], plot: bool,
              run_steps: Callable[[list[Any], TextIO], int]) -> int:
    """run_steps(steps, log): one config's planned steps, their output into log; its status."""
    rows: list[dict[str, Any]] = []
    first_failure = 0
    from llmbench.progress import bar

    progress = bar(configs, "sweep", total=len(configs), unit="config")
    for config in progress:
        choice, folder = config.choice, config.folder
        progress.set_postfix_str(" ".join(f"{SWEEP_FLAGS[f]}={v}" for f, v in choice.items()))
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / "run.log", "w") as log:
            status = run_steps(config.steps, log)
        row: dict[str, Any] = {SWEEP_FLAGS[f]: v for f, v in choice.items()}
        row["status"] = "ok" if status == 0 else f"failed ({status}; {folder / 'run.log'})"
        if status == 0:
            row.update(report_row(folder))
        elif not first_failure:
            first_failure = status
        rows.append(row)
        write_outputs(root, rows, formats)  # after every config: nothing is lost
    progress.close()
    print(markdown_table(rows))
    written = [str(root / f"sweep.{fmt}") for fmt in formats]
    if plot:
        swept = [SWEEP_FLAGS[f] for f in configs[0].choice]
        written += [str(p) for p in plot_sweep(root, rows, swept)]
    print(f"sweep: {len(rows)} configs, written: {', '.join(written)}", flush=True)
    if first_failure:
        print(f"error: {sum(r['status'] != 'ok' for r in rows)} of {len(rows)} sweep configs "
              "failed (see their run.log)", file=sys.stderr, flush=True)
    return first_failure


def columns(rows: list[dict[str, Any]]) -> list[str]:
    keys = [k for k in rows[0] if k not in ("status", "report")] if rows else []
    keys += [c for c in METRIC_COLUMNS if any(c in r for r in rows)]
    return [*dict.fromkeys(keys), "status", "report"]


def markdown_table(rows: list[dict[str, Any]]) -> str:
    cols = [c for c in columns(rows) if c != "report"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c, "-")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def write_outputs(root: Path, rows: list[dict[str, Any]], formats: list[str]) -> None:
    for fmt in formats:
        if fmt == "md":
            text = markdown_table(rows) + "\n"
        elif fmt == "csv":
            buffer = io.StringIO()
            writer = csv.DictWriter(buffer, fieldnames=columns(rows), extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
            text = buffer.getvalue()
        elif fmt == "json":
            text = json.dumps({"rows": rows}, indent=1) + "\n"
        else:  # jsonl: one config per line
            text = "".join(json.dumps(r) + "\n" for r in rows)
        write_text(root / f"sweep.{fmt}", text)


def plot_sweep(root: Path, rows: list[dict[str, Any]], swept: list[str]) -> list[Path]:
    """Latency against input tokens and against batch size (one line per other setting),
    when those were swept; otherwise next-token latency per config as bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok" and "next token ms" in r]
    written = []
    for axis, metrics in (("input tokens", ("first token ms",)),
                          ("batch", ("next token ms", "decode tokens/s"))):
        if axis not in swept or not ok:
            continue
        others = [s for s in swept if s != axis]
        for metric in metrics:
            fig, ax = plt.subplots(figsize=(6, 4))
            series: dict[str, list[tuple[float, float]]] = {}
            for r in ok:
                label = ", ".join(f"{s}={r[s]}" for s in others) or metric
                series.setdefault(label, []).append((float(r[axis]), r[metric]))
            for label, points in series.items():
                points.sort()
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
            ax.set_xlabel(axis)
            ax.set_ylabel(metric)
            ax.set_title(f"{metric} vs {axis}")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
            path = root / f"{metric.split()[0]}-{metric.split()[1].strip('/')}-vs-"
            path = Path(f"{path}{axis.replace(' ', '-')}.png")
            fig.tight_layout()
            save_png(fig, path)
            written.append(path)
    if not written and ok:
        fig, ax = plt.subplots(figsize=(6, 4))
        labels = [", ".join(f"{s}={r[s]}" for s in swept) or "run" for r in ok]
        ax.barh(labels, [r["next token ms"] for r in ok])
        ax.set_xlabel("next token ms")
        fig.tight_layout()
        path = root / "next-token-ms.png"
        save_png(fig, path)
        written.append(path)
    return written
