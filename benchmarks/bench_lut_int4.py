#!/usr/bin/env python3
"""INT4 x INT8 batch-1 decode linears: llmbench's u8 x s8 kernel (what --lowp-mode INT8 runs on
INT4 weights) against the lookup-table approach of T-MAC, one thread, SmolLM2-135M's 30 layers
of projections (random weights, group 128, weights streamed from memory), side by side in one
run, alternating.

    python benchmarks/bench_lut_int4.py [--repeats 3] [--isa avx2]

The lookup-table kernel (benchmarks/csrc/lut_int4_avx2.cpp, AVX2) is compiled here with g++;
it is a prototype for this comparison, not part of llmbench. Its tables are int8 as T-MAC's,
so its sums are not exact: the run prints its error against the exact sums, which our kernel
computes (int32). Our pass includes a Python call per linear; its cost, measured on a tiny
matrix, is printed and taken off. Compare ratios, on a quiet machine.
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from llmbench import kernels  # noqa: E402
from llmbench.cli.flags import Parser, positive_int  # noqa: E402
from llmbench.kernels.int8_act import ActLevels  # noqa: E402

LAYERS = 30
GROUP = 128
SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # qkv, o, gate_up, down
SOURCE = Path(__file__).resolve().parent / "csrc" / "lut_int4_avx2.cpp"


def padded(k: int) -> int:
    return (k + GROUP - 1) // GROUP * GROUP  # whole groups, as Int4Linear packs them


def build_lut_binary(where: Path) -> Path:
    binary = where / "lut_int4_avx2"
    subprocess.run(["g++", "-O3", "-mavx2", "-mfma", "-std=c++17", "-o", str(binary), str(SOURCE)],
                   check=True)
    return binary


def run_lut(binary: Path) -> tuple[float, float]:
    shapes = [f"{n}:{padded(k)}" for n, k in SHAPES]
    out = subprocess.run([str(binary), str(LAYERS), *shapes], check=True, capture_output=True,
                         text=True).stdout.split()
    fields = dict(zip(out[::2], map(float, out[1::2]), strict=True))
    return fields["ms"], fields["error"]


def ours_ms(seconds: float = 4.0) -> float:
    act = ActLevels(per_tensor=False, sym=True, block=0)
    layers = [[kernels.quantize_int4(F.pad(torch.randn(n, k), (0, padded(k) - k)), GROUP)
               for n, k in SHAPES] for _ in range(LAYERS)]
    x = {k: torch.randn(1, k) for _, k in SHAPES}

    def one_pass():
        for layer in layers:
            for (_, k), w in zip(SHAPES, layer, strict=True):
                kernels.linear_int4w(x[k], *w, GROUP, act=act)

    one_pass()
    times = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        start = time.perf_counter()
        one_pass()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def call_overhead_ms() -> float:
    """Per linear_int4w call on an 8 x 128 matrix: what a pass pays per linear beyond the
    kernel's own work."""
    act = ActLevels(per_tensor=False, sym=True, block=0)
    w = kernels.quantize_int4(torch.randn(8, GROUP), GROUP)
    x = torch.randn(1, GROUP)
    for _ in range(500):
        kernels.linear_int4w(x, *w, GROUP, act=act)
    calls = 5000
    start = time.perf_counter()
    for _ in range(calls):
        kernels.linear_int4w(x, *w, GROUP, act=act)
    return (time.perf_counter() - start) / calls * 1e3


def main() -> int:
    parser = Parser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument("--isa", default="avx2",
                        help="our kernels' path (the lookup-table prototype is AVX2)")
    args = parser.parse_args()
    if kernels.compiled() is None:
        print(f"kernels not built: {kernels.import_error()}")
        return 1
    if "avx2" not in kernels.supported_isas() or shutil.which("g++") is None:
        print("needs an AVX2 CPU and g++")
        return 1
    kernels.set_isa(args.isa)
    torch.set_num_threads(1)
    calls = LAYERS * len(SHAPES)
    overhead = call_overhead_ms() * calls
    print(f"1 thread, our kernels on {kernels.isa()}; {LAYERS} layers x {len(SHAPES)} linears, "
          f"batch 1; our pass includes {calls} Python calls, ~{overhead:.2f} ms, taken off in "
          "the last column")
    print("run | lookup tables ms | ours ms | lookup tables / ours (>1: ours faster)")
    with tempfile.TemporaryDirectory() as tmp:
        binary = build_lut_binary(Path(tmp))
        error = 0.0
        for i in range(args.repeats):
            lut, error = run_lut(binary)
            ours = ours_ms()
            print(f"{i + 1:3d} | {lut:16.2f} | {ours:7.2f} | {lut / (ours - overhead):.2f}x")
    print(f"lookup tables' error against the exact sums (mean |dy| / mean |y|): {error:.2e}; "
          "ours: exact int32 sums of the same int8 levels")
    return 0


if __name__ == "__main__":
    sys.exit(main())
