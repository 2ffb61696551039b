"""A program step that run.py (and run_quantization.py --benchmark) runs: one of the entry
scripts, as a subprocess of its own, so each step starts from a clean process (its own
threads, memory and imports), as the original examples' run.py does."""

from __future__ import annotations

import shlex
import subprocess
import sys
from dataclasses import dataclass
from typing import TextIO

from llmbench.environment import PROJECT_ROOT


@dataclass
class Step:
    name: str
    script: str  # relative to the project root
    argv: list[str]


def run_step(step: Step, log: TextIO | None = None) -> int:
    """One step as a subprocess; its output to ours, or into `log` (a sweep's config)."""
    command = [sys.executable, str(PROJECT_ROOT / step.script), *step.argv]
    if log is None:
        print(f"running {step.name}: {shlex.join(command)}", flush=True)
        return subprocess.run(command, check=False).returncode
    log.write(f"$ {shlex.join(command)}\n")
    log.flush()
    return subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=False).returncode


def run_steps(steps: list[Step], log: TextIO | None = None) -> int:
    """The steps in order; the status of the first that fails (said on stderr or in log)."""
    for step in steps:
        status = run_step(step) if log is None else run_step(step, log)
        if status != 0:
            print(f"error: step '{step.name}' failed with exit status {status}",
                  file=log or sys.stderr, flush=True)
            return status
    return 0
