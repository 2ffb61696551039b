#!/usr/bin/env python3
"""Batched decoding throughput: next-token latency and aggregate decode tokens/s against batch
size, per precision, side by side in one run.

    python benchmarks/batch_sweep.py                                   # SmolLM2-135M, native
    python benchmarks/batch_sweep.py --configs native-fp32,stock-fp32 --batch-sizes 1,16
    python benchmarks/batch_sweep.py --model tinyllama-1b --batch-sizes 1,4,16

A decode step reads the weights once for all rows, so until the arithmetic catches up with the
weight reads, rows come almost free: aggregate tokens/s = batch / next-token latency, and the
table gives its ratio to batch 1 of the same config. Each config runs in a process of its own
(compare_backends' configs, loaded once there, then every batch size in turn, largest last).
Run by hand on a quiet machine; compare ratios.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import compare_backends as cb  # noqa: E402
import torch  # noqa: E402

from llmbench import kernels  # noqa: E402
from llmbench.atomic import write_text  # noqa: E402
from llmbench.cli.flags import Parser, non_negative_int, positive_int  # noqa: E402
from llmbench.environment import collect_environment, machine_slug  # noqa: E402

DEFAULT_CONFIGS = "native-fp32,native-bf16,native-int8,native-int4"
ROW_MARK = "batch_sweep row: "


def positive_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


def sweep_config(model_arg: str | None, config: str, args: argparse.Namespace) -> None:
    """In the child: load once, measure every batch size, one row per line on stdout."""
    try:
        loaded, prepared = cb.load_config(model_arg, config)
    except Exception as exc:
        print(ROW_MARK + json.dumps({"config": config, "error": " ".join(str(exc).split())}),
              flush=True)
        return
    for batch in args.batch_sizes:
        try:
            row = cb.measure_loaded(loaded, prepared, config, args, batch_size=batch)
            row["batch_size"] = batch
        except Exception as exc:
            row = {"config": config, "batch_size": batch,
                   "error": " ".join(str(exc).split())[:120]}
        print(ROW_MARK + json.dumps(row, default=str), flush=True)


def sweep_isolated(model_arg: str | None, config: str, args: argparse.Namespace
                   ) -> list[dict[str, Any]]:
    command = [sys.executable, __file__, "--one-config", config, "--model-path",
               model_arg or "", "--batch-sizes", ",".join(map(str, args.batch_sizes)),
               "--input-tokens", str(args.input_tokens), "--max-new-tokens",
               str(args.max_new_tokens), "--num-iter", str(args.num_iter), "--num-warmup",
               str(args.num_warmup)]
    done = subprocess.run(command, capture_output=True, text=True)
    rows = [json.loads(line[len(ROW_MARK):]) for line in done.stdout.splitlines()
            if line.startswith(ROW_MARK)]
    if not rows:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        rows = [{"config": config, "error": f"child exited {done.returncode}: {last}"[:120]}]
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| config | batch | first token ms | next token ms | decode tokens/s "
             "| tokens/s x batch 1 | next-token ms x batch 1 | decode step |",
             "|---|---|---|---|---|---|---|---|"]
    base: dict[str, dict[str, Any]] = {}
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['config']} | {r.get('batch_size', '-')} | not run: "
                         f"{r['error']} |" + " |" * 5)
            continue
        batch = r["batch_size"]
        rate = batch * 1000.0 / r["next_token_ms"]
        one = base.setdefault(r["config"], r if batch == 1 else {})
        if one:
            ratio = f"{rate / (1000.0 / one['next_token_ms']):.2f}x"
            slower = f"{r['next_token_ms'] / one['next_token_ms']:.2f}x"
        else:
            ratio = slower = "-"
        step = r["backend_details"].get("decode_step", "transformers")
        if step.startswith("compiled"):  # the plan's note: compiled up to SMALL_M_MAX rows
            step = "compiled" if batch <= kernels.SMALL_M_MAX else "python step"
        else:
            step = step.split(" (")[0]
        lines.append(f"| {r['config']} | {batch} | {r['first_token_ms']:.1f} | "
                     f"{r['next_token_ms']:.2f} | {rate:.1f} | {ratio} | {slower} | {step} |")
    return "\n".join(lines)


def main() -> int:
    parser = Parser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2",
                        help="as compare_backends --model: smollm2, tinyllama-1b, "
                        "FAMILY-shape, or any -m value")
    parser.add_argument("--configs", default=DEFAULT_CONFIGS,
                        help=f"comma-separated compare_backends configs, from: "
                        f"{', '.join(cb.CONFIGS)}")
    parser.add_argument("--batch-sizes", type=positive_list,
                        default=positive_list("1,2,4,8,16,32,64"))
    parser.add_argument("--input-tokens", type=positive_int, default=32)
    parser.add_argument("--max-new-tokens", type=positive_int, default=16)
    parser.add_argument("--num-iter", type=positive_int, default=3)
    parser.add_argument("--num-warmup", type=non_negative_int, default=1)
    parser.add_argument("--output-dir", default=str(cb.ROOT / "benchmarks" / "results"))
    parser.add_argument("--one-config", help=argparse.SUPPRESS)
    parser.add_argument("--model-path", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.batch_sizes = sorted(set(args.batch_sizes))
    if args.one_config:
        sweep_config(args.model_path or None, args.one_config, args)
        return 0
    configs = args.configs.split(",")
    unknown = [c for c in configs if c not in cb.CONFIGS]
    if unknown:
        parser.error(f"unknown configs: {', '.join(unknown)}")
    model_arg = cb.resolve_model(args.model)
    rows: list[dict[str, Any]] = []
    for config in configs:
        for row in sweep_isolated(model_arg, config, args):
            rows.append(row)
            shown = {k: v for k, v in row.items() if k not in ("backend_details", "text")}
            print(json.dumps(shown), flush=True)
    markdown = (f"# batch_sweep: {args.model}, {args.input_tokens} in / {args.max_new_tokens} "
                f"out, greedy, {torch.get_num_threads()} threads\n\n"
                "Latencies are medians over "
                f"{args.num_iter} iterations after {args.num_warmup} warm-up; decode tokens/s = "
                "batch / next-token latency. Each config in a process of its own.\n\n"
                + table(rows) + "\n")
    print(markdown)
    out = Path(args.output_dir)
    stem = f"batch-{args.model.replace('/', '_')}-{machine_slug()}"  # replaces the baseline
    write_text(out / f"{stem}.md", markdown)
    write_text(out / f"{stem}.json", json.dumps(
        {"model": args.model, "rows": rows, "settings": vars(args),
         "environment": collect_environment()}, indent=1, default=str))
    print(f"written: {out / stem}.md and .json")
    if all("error" in r for r in rows):
        print(f"error: batch_sweep: no config ran ({rows[0]['error']})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
