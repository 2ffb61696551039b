#!/usr/bin/env python3
"""Tensor parallel native (`--autotp --backend native`) against one native process, side by
side in one run: N ranks x 1 thread vs 1 process x N threads, per precision, plus the
all-reduce called from the C++ step through Python instead of through the dispatcher, and
stock AutoTP, so the ratios the docs quote come from one command.

Run by hand on a quiet machine (nothing else busy):

    python benchmarks/native_tp.py                          # embedded SmolLM2-135M
    python benchmarks/native_tp.py --model tinyllama-1b     # random weights, TinyLlama shape

Each config is one `run.py --benchmark` (under `deepspeed --bind_cores_to_rank` for the ranks),
greedy, `--token-latency`; the table (p50 next token, first token, all-reduce ms per token,
ratio to the one-process run of the same precision) is written as markdown and JSON into
--output-dir.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

from llmbench.atomic import write_text  # noqa: E402
from llmbench.cli.flags import Parser, positive_int  # noqa: E402
from llmbench.environment import (  # noqa: E402
    HELD_ISA_ENV,
    held_isa_text,
    hold_isa,
    machine_slug,
)

PRECISIONS = {"fp32": [], "bf16": ["--dtype", "bfloat16"],
              "int8": ["--ipex-weight-only-quantization", "--weight-dtype", "INT8"]}
MS = 1000.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(model: str | None, flags: list[str], ranks: int, args: argparse.Namespace,
        env: dict[str, str] | None = None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as out:
        common = ["--benchmark", *(["-m", model] if model else []), "--greedy", "--token-latency",
                  "--max-new-tokens", str(args.max_new_tokens), "--input-tokens",
                  str(args.input_tokens), "--num-iter", str(args.num_iter), "--num-warmup",
                  str(args.num_warmup), "--output-dir", out, *flags]
        if ranks > 1:
            launcher = shutil.which("deepspeed") or str(Path(sys.executable).parent / "deepspeed")
            command = [launcher, "--num_accelerators", str(ranks), "--bind_cores_to_rank",
                       "--master_port", str(free_port()), str(ROOT / "run.py"), "--autotp",
                       *common]
        elif "--ipex-weight-only-quantization" in flags:
            # quantize and benchmark in one step, without the quality check (a random model
            # of another vocabulary than the tokenizer's, as tinyllama-1b, can't be scored)
            command = [sys.executable, str(ROOT / "single_instance" / "run_quantization.py"),
                       *common, "--skip-quality"]
        else:
            command = [sys.executable, str(ROOT / "run.py"), *common]
        full_env = {**os.environ, "DS_ACCELERATOR": "cpu", **(env or {})}
        result = subprocess.run(command, capture_output=True, text=True, env=full_env)
        if result.returncode != 0:
            raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
        # the report, not a quantize step's best_model.json
        (path,) = [p for p in Path(out).glob("*.json") if not p.name.startswith("best_model")]
        return json.loads(path.read_text())


def summarize(name: str, precision: str, report: dict[str, Any]) -> dict[str, Any]:
    stats = report["statistics"]
    dist = report.get("distributed", {})
    ranks = dist.get("ranks", [])
    next_s = stats["next_token_latency_s"]
    return {"config": name, "precision": precision, "backend": report["backend"]["name"],
            "first_ms": stats["first_token_latency_s"]["p50"] * MS,
            "next_ms": next_s["p50"] * MS,
            # what one decoding step reads (all ranks together), back from the report's GB/s
            "weight_bytes": stats["decode_weight_read_gb_per_s"] * next_s["mean"] * 1e9,
            "all_reduce_ms": dist.get("all_reduce_ms_per_token"),
            # the largest rank's peak resident memory, and how the ranks loaded the model
            "peak_rss_mib": max(r["peak_rss_bytes"] for r in ranks) / 2**20 if ranks else None,
            "load_s": report["model"].get("load_seconds"),
            "load_path": dist.get("load_path"),
            "tokens": report.get("generated_text")}  # both reports hold it


def main() -> int:
    parser = Parser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--model", default="smollm2",
                        help="smollm2 (embedded), tinyllama-1b (random weights) or any -m value")
    parser.add_argument("--ranks", type=positive_int, default=2)
    parser.add_argument("--precisions", default=",".join(PRECISIONS))
    parser.add_argument("--num-iter", type=int, default=3)
    parser.add_argument("--num-warmup", type=int, default=1)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--input-tokens", type=int, default=32)
    parser.add_argument("--no-stock", action="store_true", help="skip the stock AutoTP row")
    parser.add_argument("--isa", choices=sorted(HELD_ISA_ENV),
                        help="hold every library to this ISA, this process and every run "
                        "(llmbench.environment.HELD_ISA_ENV)")
    parser.add_argument("--output-dir", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    unknown = [p for p in args.precisions.split(",") if p not in PRECISIONS]
    if unknown:
        parser.error(f"--precisions: unknown {', '.join(unknown)} (use {', '.join(PRECISIONS)})")
    hold_isa(args.isa)
    import torch
    from compare_backends import read_bandwidth_gb_per_s, resolve_model

    model = resolve_model(args.model)
    # the floor every config is held to: one read of the weights at the machine's read
    # bandwidth with as many threads as the ranks have together, measured before the runs
    torch.set_num_threads(args.ranks)
    bandwidth = max(read_bandwidth_gb_per_s().values())
    print(f"read bandwidth {bandwidth:.1f} GB/s ({args.ranks} threads)", flush=True)
    rows: list[dict[str, Any]] = []
    for precision in args.precisions.split(","):
        flags = ["--backend", "native", *PRECISIONS[precision]]
        single = summarize(f"1 process x {args.ranks} threads", precision,
                           run(model, flags, 1, args, {"OMP_NUM_THREADS": str(args.ranks)}))
        tp = summarize(f"{args.ranks} ranks x 1 thread", precision,
                       run(model, flags, args.ranks, args))
        found = [single, tp]
        if precision == "fp32":
            found.append(summarize(f"{args.ranks} ranks, all-reduce through Python", precision,
                                   run(model, flags, args.ranks, args,
                                       {"LLMBENCH_TP_ALL_REDUCE": "python"})))
            # the same ranks with the whole model loaded on each, then cut (the memory and
            # load time the layer-by-layer load saves)
            found.append(summarize(f"{args.ranks} ranks, whole model loaded per rank",
                                   precision, run(model, flags, args.ranks, args,
                                                  {"LLMBENCH_TP_LOAD": "whole"})))
        if not args.no_stock:
            found.append(summarize(f"{args.ranks} ranks, stock AutoTP", precision,
                                   run(model, PRECISIONS[precision], args.ranks, args)))
        for row in found:
            row["vs_one_process"] = row["next_ms"] / single["next_ms"]
            # the single process's bytes: a rank's report counts what all ranks read together
            row["x_floor"] = row["next_ms"] / (single["weight_bytes"] / bandwidth / 1e6)
            row["same_tokens"] = (row["tokens"] == single["tokens"]
                                  if row is not single and row["tokens"] else None)
            print(f"{precision} {row['config']}: next {row['next_ms']:.2f} ms "
                  f"({row['vs_one_process']:.2f}x one process), first {row['first_ms']:.1f} ms"
                  + (f", all-reduce {row['all_reduce_ms']:.2f} ms/token"
                     if row["all_reduce_ms"] is not None else ""), flush=True)
        rows += found
    # the measure: how many times faster than stock AutoTP in fp32 on the same ranks
    stock_fp32 = next((r for r in rows if r["backend"] != "native" and r["precision"] == "fp32"),
                      None)
    for r in rows:
        r["stock_fp32_over_this"] = stock_fp32["next_ms"] / r["next_ms"] if stock_fp32 else None
    from llmbench.environment import collect_environment

    env = collect_environment()
    held = f". {held_isa_text(args.isa)}" if args.isa else ""
    command = "python benchmarks/native_tp.py " + " ".join(sys.argv[1:])
    lines = [f"# native tensor parallel: {time.strftime('%Y-%m-%d %H:%M')}", "",
             f"{env['cpu']['model']} ({', '.join(env['cpu']['isa'])}), model {args.model}, "
             f"{args.input_tokens} in / {args.max_new_tokens} out, greedy, p50 of "
             f"{args.num_iter} iterations after {args.num_warmup} warm-up; read bandwidth "
             f"{bandwidth:.1f} GB/s ({args.ranks} threads), `x floor` = next token over the "
             f"one process's weight bytes per token read at that rate{held}", "",
             f"`{command.strip()}`", "",
             "| precision | config | backend | next ms | x one process | x floor | "
             "stock fp32 AutoTP / this | first ms | all-reduce ms/token | "
             "same text as one process | rank peak RSS MiB | load s |",
             "|---|---|---|--:|--:|--:|--:|--:|--:|---|--:|--:|"]
    for r in rows:
        reduce = "" if r["all_reduce_ms"] is None else f"{r['all_reduce_ms']:.2f}"
        same = {True: "yes", False: "**no**", None: ""}[r["same_tokens"]]
        stock = "" if r["stock_fp32_over_this"] is None else f"{r['stock_fp32_over_this']:.2f}"
        rss = "" if r["peak_rss_mib"] is None else f"{r['peak_rss_mib']:.0f}"
        load = "" if r["peak_rss_mib"] is None or r["load_s"] is None else f"{r['load_s']:.1f}"
        lines.append(f"| {r['precision']} | {r['config']} | {r['backend']} | {r['next_ms']:.2f} "
                     f"| {r['vs_one_process']:.2f} | {r['x_floor']:.2f} | {stock} "
                     f"| {r['first_ms']:.1f} | {reduce} | {same} "
                     f"| {rss} | {load} |")
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    held_tag = f"-{args.isa}" if args.isa else ""
    # replaces the baseline of the same model, machine and held ISA
    stem = args.output_dir / f"native-tp-{args.model}-{machine_slug()}{held_tag}"
    write_text(Path(f"{stem}.md"), text)
    for r in rows:
        r.pop("tokens", None)
    write_text(Path(f"{stem}.json"), json.dumps(rows, indent=1) + "\n")
    print(f"written: {stem}.md and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
