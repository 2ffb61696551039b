"""Shared fixtures. Tests run the same entry points users run: `run.py` and the scripts as
subprocesses where exit status and stderr matter, their main(argv) in-process elsewhere."""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Tests never reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

# pytest-xdist (addopts: -n auto, at most 2 workers) runs tests side by side. Each worker, and
# every process it starts, gets its share of the cores as OpenMP threads: two processes of two
# spinning threads each on two cores run some tests 5-8x slower than one after the other.
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
CORES = len(os.sched_getaffinity(0))
if WORKERS > 1:
    os.environ["OMP_NUM_THREADS"] = str(max(1, CORES // WORKERS))


def pytest_xdist_auto_num_workers(config) -> int:
    return max(1, min(2, CORES))


@contextlib.contextmanager
def machine_share(exclusive: bool) -> Iterator[None]:
    """A readers-writer lock across the xdist workers: every test holds it shared, a `quiet`
    test alone. A worker waiting for it alone closes the gate first, so the other worker's next
    test waits instead of overtaking it."""
    if WORKERS <= 1:
        yield
        return
    base = f"/tmp/llmbench-tests-{os.environ.get('PYTEST_XDIST_TESTRUNUID', 'run')}"
    with open(base + ".gate", "a") as gate, open(base + ".lock", "a") as lock:
        if exclusive:
            fcntl.flock(gate, fcntl.LOCK_EX)
            fcntl.flock(lock, fcntl.LOCK_EX)
            fcntl.flock(gate, fcntl.LOCK_UN)
        else:
            fcntl.flock(gate, fcntl.LOCK_SH)
            fcntl.flock(gate, fcntl.LOCK_UN)
            fcntl.flock(lock, fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Setup (module fixtures included), call and teardown of a test under the machine share."""
    with machine_share(exclusive=item.get_closest_marker("quiet") is not None):
        yield


def run_entry(script: str, *args: str, env: dict[str, str] | None = None,
              timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run an entry script (relative to the repo root) as a user would."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True,
                          text=True, env=full_env, timeout=timeout, cwd=ROOT)


@pytest.fixture(scope="session")
def embedded_model_dir() -> Path:
    """The embedded SmolLM2-135M, converted from GGUF once into the llmbench cache."""
    from llmbench.models import materialize_gguf, resolve_source

    source, _ = materialize_gguf(resolve_source(None))
    return Path(source.path)
