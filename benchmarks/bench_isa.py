#!/usr/bin/env python3
"""The same kernels on two (or more) ISA paths, side by side in one run.

For the int8 and int4 weight-only linears (fp32 activations, which the kernels round to int16)
on the decode / prefill shapes of SmolLM2-135M and TinyLlama-1.1B, this times each ISA path in turn, repeat by repeat
(interleaved, so other load hits every path alike), and prints each path's median time and its
ratio to the first path. Weights cycle over --working-set-mib of copies, as in
benchmarks/bench_kernels.py, so they come from memory as in a real step.

    python benchmarks/bench_isa.py --isas avx512,avx512vnni --m 1,8,32

Run by hand on a quiet machine.
"""

from __future__ import annotations

import os
import statistics
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)
sys.path.insert(0, os.path.join(REPO_ROOT, "benchmarks"))

import torch  # noqa: E402
from bench_kernels import MODELS, make_timer, n_copies  # noqa: E402

import llmbench.kernels as K  # noqa: E402
from llmbench.cli.flags import Parser, positive_int  # noqa: E402


def variants(N: int, Kd: int, M: int, G: int, ws_mib: int) -> dict:
    """name -> (function, argument sets over the working set)."""
    g = torch.Generator().manual_seed(N * 7919 + Kd)
    w = torch.randn(N, Kd, generator=g) * 0.02
    x = torch.randn(M, Kd, generator=g)
    q8, s8 = K.quantize_int8(w)
    p4, s4, z4 = K.quantize_int4(w, G)
    out = {
        "int8": (K.linear_int8w, [(x, q8.clone(), s8)
                                  for _ in range(n_copies(N * Kd, ws_mib))]),
        "int4": (lambda a, b, c, d: K.linear_int4w(a, b, c, d, G),
                 [(x, p4.clone(), s4, z4) for _ in range(n_copies(N * Kd // 2, ws_mib))]),
    }
    return out


def main() -> int:
    ap = Parser(description="the kernels on several ISA paths, side by side")
    ap.add_argument("--isas", default="avx512,avx512vnni")
    ap.add_argument("--m", default="1,8,32", help="rows of x, comma list")
    ap.add_argument("--models", default="smollm2,tinyllama")
    ap.add_argument("--group-size", type=positive_int, default=64)
    ap.add_argument("--reps", type=positive_int, default=7)
    ap.add_argument("--working-set-mib", type=positive_int, default=160)
    args = ap.parse_args()
    isas = args.isas.split(",")
    missing = [i for i in isas if i not in K.supported_isas()]
    if missing:
        print(f"error: ISA {missing[0]} is not supported here ({K.supported_isas()})",
              file=sys.stderr)
        return 2
    print(f"threads {torch.get_num_threads()}, group {args.group_size}; median ms per call; "
          f"ratio = {isas[0]} time / path time (above 1: faster than {isas[0]})")
    header = "| model | shape | M | kind | " + " | ".join(isas) + " | " + " | ".join(
        f"{i} vs {isas[0]}" for i in isas[1:]) + " |"
    print(header)
    print("|" + "---|" * (4 + 2 * len(isas) - 1))
    for model in args.models.split(","):
        spec = MODELS[model]
        for name, N, Kd, _count in spec["shapes"]:
            for M in (int(m) for m in args.m.split(",")):
                for kind, (fn, sets) in variants(N, Kd, M, args.group_size,
                                                 args.working_set_mib).items():
                    timers = {}
                    for isa in isas:
                        K.set_isa(isa)
                        timers[isa] = make_timer(fn, sets)
                    samples: dict = {isa: [] for isa in isas}
                    for _ in range(args.reps):
                        for isa in isas:
                            K.set_isa(isa)
                            samples[isa].extend(timers[isa]())
                    med = {isa: statistics.median(samples[isa]) * 1e3 for isa in isas}
                    print(f"| {spec['title']} | {name} {N}x{Kd} | {M} | {kind} | "
                          + " | ".join(f"{med[i]:.3f}" for i in isas) + " | "
                          + " | ".join(f"{med[isas[0]] / med[i]:.2f}x" for i in isas[1:])
                          + " |", flush=True)
    K.set_isa("auto")
    return 0


if __name__ == "__main__":
    sys.exit(main())
