"""Shared fixtures. Tests run the same entry points users run: `run.py` and the scripts as
subprocesses where exit status and stderr matter, their main(argv) in-process elsewhere."""

from __future__ import annotations

import contextlib
import fcntl
import io
import os
import pickle
import shlex
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

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


def once_per_run(tmp_path_factory: pytest.TempPathFactory, name: str,
                 build: Callable[[Path], Any]) -> Any:
    """build(folder) once per test run, by whichever xdist worker asks first; the others wait
    for it and get the same (pickled) result, the folder shared. A module fixture runs once
    per worker, and work stealing often puts a module's tests on both workers: for a 2-rank
    launch or a scoring run that cost its whole time a second time."""
    root = tmp_path_factory.getbasetemp()
    if WORKERS > 1:
        root = root.parent  # the run's folder, above each worker's own
    folder, done = root / f"once-{name}", root / f"once-{name}" / "result.pickle"
    with open(root / f"once-{name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if done.is_file():
                return pickle.loads(done.read_bytes())
            folder.mkdir(parents=True, exist_ok=True)
            result = build(folder)
            done.write_bytes(pickle.dumps(result))
            return result
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Setup (module fixtures included), call and teardown of a test under the machine share."""
    with machine_share(exclusive=item.get_closest_marker("quiet") is not None):
        yield


def entry_points() -> dict[str, Callable[[list[str]], int]]:
    """The main(argv) behind each entry script."""
    from llmbench import generation
    from llmbench.accuracy import single_instance
    from llmbench.cli import gptq, quantize, tools
    from llmbench.cli import run as dispatch

    return {"run.py": dispatch.main,
            "single_instance/run_generation.py": generation.main,
            "single_instance/run_accuracy.py": single_instance.main,
            "single_instance/run_quantization.py": quantize.main,
            "utils/create_shard_model.py": tools.shard_main,
            "utils/run_gptq.py": gptq.main}


def call(script: str, argv: list[str]) -> tuple[int, str, str]:
    """The script's main(argv) in this process, as run_main runs it: (status, stdout, stderr)."""
    from llmbench.errors import UserError

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = entry_points()[script](argv)
        except UserError as exc:
            print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
            status = 2
        except SystemExit as exc:  # argparse
            status = exc.code if isinstance(exc.code, int) else 1
    return status, out.getvalue(), err.getvalue()


def run_step_here(step) -> int:
    """llmbench.steps.run_step, in this process: the step's main with the argv run.py built."""
    print(f"running {step.name}: {step.script} {shlex.join(step.argv)}", flush=True)
    status, out, err = call(step.script, step.argv)
    sys.stdout.write(out)
    sys.stderr.write(err)
    return status


def run_in_process(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    """run_entry's result without its processes: the script's main here, and run.py's steps
    too. Each process start costs 2-3 s of imports on these 2 cores, so tests whose point is
    not the process itself (exit status, one-line errors: those use run_entry) run this way."""
    from unittest import mock

    from llmbench import steps

    with mock.patch.object(steps, "run_step", run_step_here):
        status, out, err = call(script, list(args))
    return subprocess.CompletedProcess([script, *args], status, out, err)


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
