#!/usr/bin/env python3
"""Multimodal models of released models' layer shapes (random weights), stock vs native and
per precision, side by side in one run: first token split into encoder and language prefill,
next token, and the ratio to stock fp32.

Run by hand on a quiet machine (nothing else busy):

    python benchmarks/multimodal_shapes.py                      # llava and whisper, every config
    python benchmarks/multimodal_shapes.py --families llava --configs stock-fp32,native-fp32

The shapes are tests/tiny_multimodal.py's `--shape real` (LLaVA-1.5's CLIP ViT-L/14-336 vision
tower with a SmolLM2-360M-shaped llama; Whisper-small), built once into --work-dir. Each config
is one `run.py --benchmark` process (the program users run), on the project's sample image or
audio; the table is written as markdown and JSON into --output-dir.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from llmbench.atomic import write_text  # noqa: E402
from llmbench.environment import machine_slug  # noqa: E402

CONFIGS = {  # name -> run.py flags
    "stock-fp32": ["--backend", "stock"],
    "native-fp32": ["--backend", "native"],
    "stock-bf16": ["--backend", "stock", "--dtype", "bfloat16"],
    "native-bf16": ["--backend", "native", "--dtype", "bfloat16"],
    "stock-int8": ["--backend", "stock", "--ipex-weight-only-quantization",
                   "--weight-dtype", "INT8"],
    "native-int8": ["--backend", "native", "--ipex-weight-only-quantization",
                    "--weight-dtype", "INT8"],
}
MODES = {"llava": "1", "whisper": "2", "mllama": "1"}
MS = 1000.0


def build(family: str, work_dir: Path) -> Path:
    from tiny_multimodal import embedded_tokenizer_dir, make_tiny_multimodal

    folder = work_dir / f"real-{family}"
    if not (folder / "config.json").exists():
        print(f"building {family} (real shape) in {folder}", flush=True)
        make_tiny_multimodal(family, folder, embedded_tokenizer_dir(), "real")
    return folder


def run_config(model: Path, family: str, flags: list[str], args: argparse.Namespace
               ) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, str(ROOT / "run.py"), "--benchmark", "-m", str(model),
                   "--input-mode", MODES[family], "--greedy", "--token-latency",
                   "--max-new-tokens", str(args.max_new_tokens), "--num-iter", str(args.num_iter),
                   "--num-warmup", str(args.num_warmup), "--output-dir", out, *flags]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
        (path,) = Path(out).glob("*.json")
        return json.loads(path.read_text())


def row(family: str, config: str, report: dict[str, Any], base: dict[str, Any] | None
        ) -> dict[str, Any]:
    stats = report["statistics"]
    first = stats["first_token_latency_s"]["p50"] * MS
    nxt = stats["next_token_latency_s"]["p50"] * MS
    return {
        "family": family, "config": config, "ran": report["backend"]["name"],
        "fallback_reason": report["backend"].get("fallback_reason"),
        "prompt_tokens": report["prompt"]["tokens"],
        "first_ms": first,
        "encoder_ms": stats["first_token_encoder_s"]["p50"] * MS,
        "prefill_ms": stats["first_token_language_prefill_s"]["p50"] * MS,
        "next_ms": nxt,
        "decode_mib": report["model"]["decode_weight_bytes"] / 2**20,
        "first_vs_stock_fp32": None if base is None else base["first_ms"] / first,
        "next_vs_stock_fp32": None if base is None else base["next_ms"] / nxt,
    }


def markdown(rows: list[dict[str, Any]], environment: str, command: str) -> str:
    lines = [f"# multimodal shapes: {time.strftime('%Y-%m-%d %H:%M')}", "", environment, "",
             f"`{command}`", "",
             "| family | config | ran | prompt tokens | first ms | encoder ms | LM prefill ms "
             "| next ms | MiB/token | first x | next x |",
             "|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for r in rows:
        speed = ["" if r[k] is None else f"{r[k]:.2f}" for k in ("first_vs_stock_fp32",
                                                                   "next_vs_stock_fp32")]
        lines.append(f"| {r['family']} | {r['config']} | {r['ran']} | {r['prompt_tokens']} | "
                     f"{r['first_ms']:.1f} | {r['encoder_ms']:.1f} | {r['prefill_ms']:.1f} | "
                     f"{r['next_ms']:.2f} | {r['decode_mib']:.0f} | {speed[0]} | {speed[1]} |")
    notes = sorted({f"{r['family']}: {r['fallback_reason']}" for r in rows
                    if r["fallback_reason"]})
    lines += ["", "p50 over iterations; x: speed-up over stock fp32 (higher is faster).",
              *[f"- {note}" for note in notes]]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--families", default="llava,whisper,mllama")
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--num-iter", type=int, default=3)
    parser.add_argument("--num-warmup", type=int, default=1)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "llmbench")
    parser.add_argument("--output-dir", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    configs = args.configs.split(",")
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown config(s) {unknown}; choose from {', '.join(CONFIGS)}")
    rows = []
    environment = ""
    for family in args.families.split(","):
        model = build(family, args.work_dir)
        base = None
        for config in configs:
            report = run_config(model, family, CONFIGS[config], args)
            env = report["environment"]
            environment = (f"{env['cpu']['model']} ({', '.join(env['cpu']['isa'])}), "
                           f"{env['torch_threads']} threads, torch {env['packages']['torch']}")
            result = row(family, config, report, base)
            if config == "stock-fp32":
                base = result
            rows.append(result)
            print(f"{family} {config}: first {result['first_ms']:.1f} ms (encoder "
                  f"{result['encoder_ms']:.1f}), next {result['next_ms']:.2f} ms "
                  f"[{result['ran']}]", flush=True)
    command = "python benchmarks/multimodal_shapes.py " + " ".join(sys.argv[1:])
    text = markdown(rows, environment, command.strip())
    print("\n" + text)
    families = "_".join(args.families.split(","))
    stem = args.output_dir / f"multimodal-{families}-{machine_slug()}"  # replaces the baseline
    write_text(Path(f"{stem}.md"), text)
    write_text(Path(f"{stem}.json"), json.dumps(rows, indent=1) + "\n")
    print(f"written: {stem}.md and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
