#!/usr/bin/env python3
"""Round-to-nearest quantization speed: the clipping search in C++ (llmbench/kernels/csrc/
quant_search.cpp) against the torch loop it replaced (the fallback where the kernels are not
built), side by side in one process, on random weights of a TinyLlama-1.1B MLP projection
(5632 x 2048, with outliers so the search matters) per scheme; and with --share, the two-rank
shared search (rtn.search_shared) one rank does, its partner's half played beforehand.

    python benchmarks/bench_quantize.py [--threads 1] [--rows 5632] [--cols 2048] [--share]

Prints ms per weight (best of 3), the ratio, and the fraction of groups whose chosen shrink
differs between the two (near-ties: the C++ sums each group's errors in another order).
Compare ratios, on a quiet machine.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from llmbench import kernels  # noqa: E402
from llmbench.cli.flags import Parser, positive_int  # noqa: E402
from llmbench.quant.rtn import quantize_weight, search_shared  # noqa: E402
from llmbench.quant.scheme import Scheme  # noqa: E402

SCHEMES = [("INT8", -1, True), ("INT8", -1, False), ("INT8", 128, True), ("INT4", 128, True),
           ("INT4", 128, False), ("INT4", 32, False)]


def best_ms(fn, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def rank_zero_of_two(w: torch.Tensor, scheme: Scheme):
    """Rank 0's quantization of w with the search shared by two ranks, rank 1's half of the
    choices found beforehand (its all-reduce adds them)."""
    shares: list[torch.Tensor] = []
    with search_shared(1, 2, lambda t: shares.append(t.clone())):
        quantize_weight(w, None, scheme)
    (rank1,) = shares

    def rank0() -> None:
        with search_shared(0, 2, lambda t: t.add_(rank1)):
            quantize_weight(w, None, scheme)
    return rank0


def main() -> int:
    parser = Parser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--threads", type=positive_int, default=1)
    parser.add_argument("--rows", type=positive_int, default=5632)
    parser.add_argument("--cols", type=positive_int, default=2048)
    parser.add_argument("--share", action="store_true",
                        help="also time one of two ranks sharing the search")
    args = parser.parse_args()
    if not kernels.available():
        print(f"error: the compiled kernels are not available ({kernels.import_error()}): "
              "python tools/build_kernels.py", file=sys.stderr)
        return 1
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    w = torch.randn(args.rows, args.cols) * 0.02
    w[::7, ::13] *= 8  # outliers, so shrinking the range pays
    print(f"{args.rows} x {args.cols} fp32, {args.threads} thread(s), kernels {kernels.isa()}")
    header = "| scheme | torch ms | C++ ms | torch / C++ | groups chosen otherwise |"
    if args.share:
        header += " 1 of 2 ranks ms | C++ / shared |"
    print(header)
    print("|---|--:|--:|--:|--:|" + ("--:|--:|" if args.share else ""))
    for dtype, group, sym in SCHEMES:
        scheme = Scheme("woq", dtype, group, sym)
        compiled_ms = best_ms(lambda: quantize_weight(w, None, scheme))  # noqa: B023
        compiled = quantize_weight(w, None, scheme)
        with kernels.force_fallback():
            torch_ms = best_ms(lambda: quantize_weight(w, None, scheme))  # noqa: B023
            loop = quantize_weight(w, None, scheme)
        differ = float((compiled.scales != loop.scales).float().mean())
        name = f"{dtype} {'per channel' if group == -1 else f'g{group}'} {'sym' if sym else 'asym'}"
        line = (f"| {name} | {torch_ms:.0f} | {compiled_ms:.0f} | {torch_ms / compiled_ms:.1f} "
                f"| {100 * differ:.4f}% |")
        if args.share:
            shared_ms = best_ms(rank_zero_of_two(w, scheme))
            line += f" {shared_ms:.0f} | {compiled_ms / shared_ms:.2f} |"
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
