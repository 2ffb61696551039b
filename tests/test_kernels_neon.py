"""The Arm NEON kernel paths (llmbench/kernels/csrc/kernels_neon.cpp) without Arm hardware: the
NEON and portable kernel tables cross-compiled for AArch64 with tests/neon_driver.cpp and run
under qemu-user, every weight format compared on the same inputs, and so the neondot table (int8
weights against int8 activations with the dotprod instructions) where the CPU has dotprod. On
an AArch64 host the driver is compiled and run natively (and test_kernels.py runs the NEON path
through torch as well).

tools/env_setup.sh installs the cross compiler and qemu-user (Debian: g++-aarch64-linux-gnu,
qemu-user) where apt-get is usable; without them this test is skipped, saying so."""

from __future__ import annotations

import platform
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "llmbench" / "kernels" / "csrc"


def toolchain() -> tuple[str, list[str]] | None:
    """(compiler, how to run the binary) for an AArch64 build here, or None."""
    if platform.machine() in ("aarch64", "arm64") and shutil.which("g++"):
        return "g++", []
    compiler, qemu = shutil.which("aarch64-linux-gnu-g++"), shutil.which("qemu-aarch64")
    if compiler and qemu:
        return compiler, [qemu]
    return None


def test_neon_kernels_match_the_portable_ones(tmp_path):
    tools = toolchain()
    if tools is None:
        pytest.skip("no AArch64 compiler + qemu-aarch64 here (apt-get install "
                    "g++-aarch64-linux-gnu qemu-user)")
    compiler, runner = tools
    binary = tmp_path / "neon_driver"
    build = subprocess.run(
        [compiler, "-O2", "-std=c++17", "-static", f"-I{CSRC}", str(ROOT / "tests" /
         "neon_driver.cpp"), str(CSRC / "kernels_generic.cpp"), str(CSRC / "kernels_neon.cpp"),
         "-o", str(binary)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-3000:]
    result = subprocess.run([*runner, str(binary)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "tables: generic, neon" in result.stdout
    if runner:  # qemu's emulated CPU has every extension: the dotprod table runs too
        assert "tables: generic, neon, neondot" in result.stdout
        # ... with its int4 x int8-activation sdot kernels (the neon table has none)
        assert "int4 x int8 activations (i4q8) on 1 table(s)" in result.stdout
    assert "cases agree" in result.stdout.splitlines()[-1]
