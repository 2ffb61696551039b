"""What machine, versions, threads and settings produced a number: recorded in every report."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parent.parent

# ISA features that decide which kernels can run (x86 and Arm names as /proc/cpuinfo spells them).
ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl",
             "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8",
             "amx_fp16", "avx_vnni", "asimd", "asimdhp", "asimddp", "bf16", "i8mm", "sve", "sve2",
             "fphp")
RUNTIME_ENV_VARS = ("OMP_NUM_THREADS", "KMP_AFFINITY", "KMP_BLOCKTIME", "KMP_TPAUSE",
                    "KMP_SETTINGS", "LD_PRELOAD", "MALLOC_CONF", "OMP_PROC_BIND", "OMP_PLACES",
                    "DNNL_MAX_CPU_ISA", "ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY",
                    "MKL_ENABLE_INSTRUCTIONS", "LLMBENCH_KERNELS_ISA")
# What benchmarks' --isa sets: every library held to one ISA (our kernels, ATen's CPU kernels,
# oneDNN, MKL), so that a CPU with more runs the code paths a CPU with only that one would (its
# memory system stays its own).
HELD_ISA_ENV = {"avx2": {"LLMBENCH_KERNELS_ISA": "avx2", "ATEN_CPU_CAPABILITY": "avx2",
                         "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}}


def hold_isa(name: str | None) -> None:
    """Run this script again with every library held to `name` (HELD_ISA_ENV), unless it is
    already: the libraries read these variables once, at their first use."""
    if not name:
        return
    wanted = HELD_ISA_ENV[name]
    if any(os.environ.get(key) != value for key, value in wanted.items()):
        sys.stdout.flush()
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **wanted})


def held_isa_text(name: str | None) -> str:
    """The sentence a benchmark's header gives a held ISA ("" for none)."""
    if not name:
        return ""
    return (f"Every library held to {name.upper()} ("
            + ", ".join(f"{k}={v}" for k, v in HELD_ISA_ENV[name].items()) + ")")


PACKAGES = ("torch", "transformers", "accelerate", "gguf", "numpy", "safetensors", "tokenizers",
            "psutil", "deepspeed", "lm_eval", "torchao", "intel_extension_for_pytorch")


def cpu_info() -> dict[str, Any]:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "Model", "CPU part") and model in ("", platform.machine(),
                                                                           platform.processor()):
                    model = value.strip()
                elif key in ("flags", "Features"):
                    flags.update(value.split())
    except OSError:
        pass
    return {"model": model, "machine": platform.machine(),
            "isa": [flag for flag in ISA_FLAGS if flag in flags]}


def machine_slug(cpu: dict[str, Any] | None = None) -> str:
    """A short file-name tag for the kind of machine: vendor and product line, then the widest
    vector ISA the kernels use ("intel-xeon-amx", "amd-epyc-avx2", "arm-neon"). benchmarks/
    keeps one baseline per machine and model under such names."""
    cpu = cpu or cpu_info()
    words = re.sub(r"\((R|TM|tm|r)\)", "", cpu["model"]).lower().split()
    isa = set(cpu["isa"])
    widest = next((tag for tag, flag in (("amx", "amx_tile"), ("avx512", "avx512f"),
                                          ("avx2", "avx2"), ("neon", "asimd"))
                   if flag in isa), cpu["machine"])
    name = "-".join(re.sub(r"[^a-z0-9]+", "", word) for word in words[:2]) or cpu["machine"]
    return f"{name}-{widest}"


def has_native_bf16() -> bool:
    isa = set(cpu_info()["isa"])
    return bool(isa & {"avx512_bf16", "amx_bf16", "bf16"})


def has_int8_matmul() -> bool:
    """int8 matrix instructions torch's int8 GEMM (oneDNN) uses at full rate: AMX-INT8."""
    return "amx_int8" in set(cpu_info()["isa"])


def has_native_fp16() -> bool:
    isa = set(cpu_info()["isa"])
    return bool(isa & {"avx512_fp16", "amx_fp16", "asimdhp", "fphp"})


def numa_binding() -> dict[str, Any]:
    binding: dict[str, Any] = {}
    if hasattr(os, "sched_getaffinity"):
        binding["cpu_affinity"] = sorted(os.sched_getaffinity(0))
    nodes = Path("/sys/devices/system/node")
    if nodes.is_dir():
        binding["numa_nodes"] = len(list(nodes.glob("node[0-9]*")))
    if shutil.which("numactl"):
        try:
            shown = subprocess.run(["numactl", "--show"], capture_output=True, text=True,
                                   timeout=5).stdout
            binding["numactl_show"] = shown.strip().splitlines()
        except (OSError, subprocess.SubprocessError):
            pass
    return binding


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name.replace("_", "-"))
        except importlib.metadata.PackageNotFoundError:
            try:
                versions[name] = importlib.metadata.version(name)
            except importlib.metadata.PackageNotFoundError:
                versions[name] = None
    return versions


def git_revision() -> str | None:
    try:
        revision = subprocess.run(["git", "-C", str(PROJECT_ROOT), "rev-parse", "HEAD"],
                                  capture_output=True, text=True, timeout=5)
        if revision.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(PROJECT_ROOT), "status", "--porcelain",
                                "--untracked-files=no"], capture_output=True, text=True, timeout=5)
        return revision.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def peak_rss_bytes() -> int:
    # ru_maxrss is in KiB on Linux, bytes on macOS.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def collect_environment() -> dict[str, Any]:
    import psutil
    import torch

    return {
        "cpu": cpu_info(),
        "cores_physical": psutil.cpu_count(logical=False),
        "cores_logical": psutil.cpu_count(logical=True),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "binding": numa_binding(),
        "memory_total_bytes": psutil.virtual_memory().total,
        "os": platform.platform(),
        "python": platform.python_version(),
        "packages": package_versions(),
        "runtime_env": {name: os.environ[name] for name in RUNTIME_ENV_VARS if name in os.environ},
        "git_revision": git_revision(),
        "command_line": [sys.executable, *sys.argv],
        "hostname": platform.node(),
    }
