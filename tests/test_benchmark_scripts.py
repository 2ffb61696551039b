"""The hand-run benchmarks' own flags, through the scripts (their timings are not tested: the
machines are shared and noisy): --isa holding every library to AVX2, and bench_quantize.py."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import ROOT, run_entry

from llmbench.environment import HELD_ISA_ENV


def test_isa_avx2_runs_the_script_again_with_every_library_held(tmp_path):
    """hold_isa (benchmarks' --isa): the script starts again with the variables set, so ATen,
    oneDNN, MKL and our kernels all read them before their first use."""
    script = tmp_path / "held.py"
    script.write_text(
        f"import sys\nsys.path.insert(0, {str(ROOT)!r})\n"
        "from llmbench.environment import hold_isa\n"
        "hold_isa('avx2')\n"
        "import os, torch\n"
        "from llmbench import kernels\n"
        "print(torch.backends.cpu.get_cpu_capability(), kernels.isa(),\n"
        "      os.environ['ONEDNN_MAX_CPU_ISA'], os.environ['MKL_ENABLE_INSTRUCTIONS'])\n")
    env = {k: v for k, v in os.environ.items() if k not in HELD_ISA_ENV["avx2"]}
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    aten, ours, onednn, mkl = result.stdout.split()
    assert (aten, onednn, mkl) == ("AVX2", "AVX2", "AVX2")
    assert ours in ("avx2", "torch-fallback")  # (where the kernels are not built)


def test_isa_and_precision_mistakes_are_one_line_errors():
    for script, args, needle in [
            ("benchmarks/compare_backends.py", ["--isa", "avx2", "--configs", "nope"],
             "unknown configs: nope"),  # after the run again with the ISA held
            ("benchmarks/compare_backends.py", ["--isa", "avx512"], "invalid choice"),
            ("benchmarks/native_tp.py", ["--isa", "avx512"], "invalid choice"),
            ("benchmarks/native_tp.py", ["--precisions", "fp64"], "--precisions: unknown fp64")]:
        result = run_entry(script, *args, timeout=300)
        assert result.returncode == 2, (script, args, result.stderr[-2000:])
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0], (script, args, result.stderr[-2000:])


def test_bench_quantize_prints_every_scheme_with_the_shared_search():
    result = run_entry("benchmarks/bench_quantize.py", "--rows", "96", "--cols", "256",
                       "--share", timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| INT")]
    assert len(rows) == 6, result.stdout
    assert all(len(row.split("|")) == 9 for row in rows), rows  # the two --share columns too
