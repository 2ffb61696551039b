#!/usr/bin/env python3
"""Prefill-sized linears (M rows of activations): our compiled kernels vs torch's GEMM on a
float copy of the weights, per weight format, side by side in one run. This is what sets
llmbench.kernels.STREAM_M_MAX (up to how many rows each format uses the kernels).

    python benchmarks/bench_prefill.py [--m 16,32,64,128,256] [--threads 1] [--cold-mib 200]

By default the weights are re-used across calls (hot in cache), which favours torch's path: in a
real prefill the conversion also streams the weights from memory. With --cold-mib each call
takes the next of enough copies of the weights to fill that many MiB per format, so they come
from memory as in a model's prefill. Compare ratios, on a quiet machine.
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from llmbench import kernels  # noqa: E402
from llmbench.cli.flags import Parser, non_negative_int, positive_int  # noqa: E402

SHAPES = [(960, 576), (3072, 576), (576, 1536)]  # SmolLM2-135M: qkv, gate_up, down


def best_ms(fn, repeats: int = 5, calls: int = 5) -> float:
    for _ in range(2):
        fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return best * 1e3


def copies_of(t: torch.Tensor, cold_mib: int):
    """A function returning t, or with cold_mib > 0 the next of enough copies of t to fill
    cold_mib MiB (so that each call reads its weights from memory)."""
    count = math.ceil(cold_mib * 2**20 / (t.numel() * t.element_size())) if cold_mib else 1
    return itertools.cycle([t] + [t.clone() for _ in range(count - 1)]).__next__


def candidates(compiled, x: torch.Tensor, w: torch.Tensor, cold_mib: int) -> dict:
    """Per format: (our kernel on the stored weights, torch's GEMM on a float copy)."""
    f32 = copies_of(w, cold_mib)
    bf16 = copies_of(w.bfloat16(), cold_mib)
    q8, s8 = kernels.quantize_int8(w)
    p4, s4, z4 = kernels.quantize_int4(w, 32)
    i8, i4 = copies_of(q8, cold_mib), copies_of(p4, cold_mib)
    return {
        "f32": (lambda: compiled.linear_f32(x, f32()), lambda: x @ f32().T),
        "bf16": (lambda: compiled.linear_bf16w(x, bf16()), lambda: x @ bf16().float().T),
        "int8": (lambda: compiled.linear_int8w(x, i8(), s8),
                 lambda: x @ kernels.dequantize_int8(i8(), s8).T),
        "int4": (lambda: compiled.linear_int4w(x, i4(), s4, z4, 32),
                 lambda: x @ kernels.dequantize_int4(i4(), s4, z4, 32).T),
    }


def row_counts(text: str) -> list[int]:
    """--m: comma-separated positive integers."""
    try:
        return [positive_int(v.strip()) for v in text.split(",")]
    except argparse.ArgumentTypeError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: {exc}") from None


def main() -> int:
    parser = Parser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--m", type=row_counts, default=row_counts("16,32,64,128,256"),
                        help="comma-separated activation row counts")
    parser.add_argument("--threads", type=positive_int, default=1)
    parser.add_argument("--cold-mib", type=non_negative_int, default=0,
                        help="cycle through copies of the weights filling this many MiB")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    compiled = kernels.compiled()
    if compiled is None:
        print(f"kernels not built: {kernels.import_error()}")
        return 1
    weights = f"cold ({args.cold_mib} MiB of copies)" if args.cold_mib else "hot"
    print(f"threads={args.threads} isa={kernels.isa()} weights {weights}; ms per call, "
          "kernel / torch (ratio > 1: the kernel is faster)")
    print(f"{'M':>4} {'N x K':>10} | {'f32':>20} | {'bf16':>20} | {'int8':>20} | "
          f"{'int4 g32':>20}")
    for m in args.m:
        for n, k in SHAPES:
            pairs = candidates(compiled, torch.randn(m, k), torch.randn(n, k), args.cold_mib)
            cells = []
            for ours, theirs in pairs.values():
                a, b = best_ms(ours), best_ms(theirs)
                cells.append(f"{a:6.2f} / {b:6.2f} {b / a:4.1f}x")
            print(f"{m:>4} {f'{n}x{k}':>10} | " + " | ".join(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
