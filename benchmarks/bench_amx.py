#!/usr/bin/env python3
"""The AMX tile kernels (llmbench/kernels/csrc/kernels_amx.cpp) against what runs without them,
side by side in one process: SmolLM2-135M's 30 layers of projections (random weights), 2
threads, ms per pass over all of them at each row count M.

    python benchmarks/bench_amx.py [--m 1,2,4,8,16,32,128,512] [--threads 2]

- int4 g128, --lowp-mode INT8 (per-row symmetric levels): AMX tiles / u8 x s8 kernels /
  int16 kernels on the int8 levels;
- int8, --lowp-mode INT8 (dynamic per-row scales): AMX tiles / int16 kernels (up to 64 rows) /
  torch._int_mm;
- bf16: AMX tiles / bf16 GEMV kernels (up to 32 rows) / torch's bf16 GEMM (x rounded to bf16).
The AMX columns need a CPU with AMX (avx512vnni path); elsewhere they print "-". These are
the measurements behind the row thresholds in ops.cpp and native.Linear. Compare ratios, on a
quiet machine.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from bench_prefill import best_ms, row_counts  # noqa: E402

from llmbench import kernels  # noqa: E402
from llmbench.cli.flags import Parser, positive_int  # noqa: E402
from llmbench.kernels import int8_act  # noqa: E402
from llmbench.kernels.int8_act import ActLevels  # noqa: E402

LAYERS = 30
SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # qkv, o, gate_up, down
GROUP = 128


def main() -> int:
    parser = Parser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--m", type=row_counts, default=row_counts("1,2,4,8,16,32,128,512"),
                        help="comma-separated activation row counts")
    parser.add_argument("--threads", type=positive_int, default=2)
    args = parser.parse_args()
    compiled = kernels.compiled()
    if compiled is None:
        print(f"kernels not built: {kernels.import_error()}")
        return 1
    torch.set_num_threads(args.threads)
    amx_default = compiled.set_amx_rows()
    layers = []
    for _ in range(LAYERS):
        layer = []
        for n, k in SHAPES:
            w = torch.randn(n, k)
            k4 = (k + GROUP - 1) // GROUP * GROUP  # int4 rows padded to whole groups, as
            # Int4Linear packs them (x stays k wide: linear_int4w pads it)
            layer.append({"int4": kernels.quantize_int4(F.pad(w, (0, k4 - k)), GROUP),
                          "int8": kernels.quantize_int8(w), "bf16": w.bfloat16()})
        layers.append(layer)
    act = ActLevels(per_tensor=False, sym=True, block=0)

    def int4(x):
        for layer in layers:
            for (_, k), w in zip(SHAPES, layer, strict=True):
                kernels.linear_int4w(x[k], *w["int4"], GROUP, act=act)

    def int8(x, via_int_mm=False):
        for layer in layers:
            for (_, k), w in zip(SHAPES, layer, strict=True):
                q, s = w["int8"]
                if via_int_mm:
                    int8_act._gemm_path(x[k], int8_act.dynamic_scales(x[k]), q, s, None)
                else:
                    compiled.linear_int8w(x[k], q, s, None, 127.0, None)

    def bf16(x, how):
        for layer in layers:
            for (_, k), w in zip(SHAPES, layer, strict=True):
                if how == "amx":
                    compiled.amx_linear_bf16(x[k], w["bf16"])
                elif how == "kernels":
                    compiled.linear_bf16w(x[k], w["bf16"])
                else:
                    F.linear(x[k].bfloat16(), w["bf16"])

    def timed(fn, amx_rows: int, i4q8: int = 1) -> float:
        compiled.set_amx_rows(amx_rows)
        compiled.set_i4q8(i4q8)
        try:
            return best_ms(fn, repeats=5, calls=1)
        finally:
            compiled.set_amx_rows(amx_default)
            compiled.set_i4q8(1)

    amx = amx_default > 0
    print(f"threads={args.threads} isa={kernels.isa()} AMX={'on' if amx else 'not here'}; "
          f"ms per pass over {LAYERS} layers of SmolLM2's projections")
    print(f"{'M':>4} | {'int4 lowp: amx / u8s8 / int16':>31} | {'int8 lowp: amx / kernels / _int_mm':>36}"
          f" | {'bf16: amx / kernels / torch':>29}")
    dash = f"{'-':>7}"

    def cell(fn, x, *args, amx_rows: int = 0, i4q8: int = 1, runs: bool = True) -> str:
        return f"{timed(functools.partial(fn, x, *args), amx_rows, i4q8):7.2f}" if runs else dash

    for m in args.m:
        x = {k: torch.randn(m, k) for k in {k for _, k in SHAPES}}
        i4 = [cell(int4, x, amx_rows=1, runs=amx), cell(int4, x), cell(int4, x, i4q8=0)]
        i8 = [cell(int8, x, amx_rows=1, runs=amx),
              cell(int8, x, runs=m <= kernels.STREAM_M_MAX["int8"]), cell(int8, x, True)]
        b16 = [cell(bf16, x, "amx", runs=kernels.amx_bf16_takes(2, 64)),
               cell(bf16, x, "kernels", runs=m <= 32), cell(bf16, x, "torch")]
        print(f"{m:>4} | {' / '.join(i4):>31} | {' / '.join(i8):>36} | {' / '.join(b16):>29}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
