"""Ranks and the process group: the launcher's environment, gloo or oneCCL, DeepSpeed's
shared-memory all-reduce and when it is safe, and failing fast: a rank that fails ends the run
(`run_rank`), and a rank whose peer died stops waiting (`PeerWatchdog`)."""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from llmbench.errors import USER_ERROR_EXIT, UserError, exit_now

# A testing aid: the rank named here fails on purpose right after joining the process group, so
# the tests can check that one failing rank fails the whole run instead of hanging the others.
FAIL_RANK_ENV = "LLMBENCH_FAIL_RANK"
SHM_WORKSPACE_DIR = Path("/dev/shm")


@dataclass(frozen=True)
class RankInfo:
    rank: int
    world_size: int
    local_rank: int
    local_size: int


def env_int(*names: str) -> int | None:
    for name in names:
        value = os.environ.get(name, "")
        if value.strip().isdigit():
            return int(value)
    return None


def setup_environment(local_rank_flag: int | None = None) -> RankInfo:
    """Fill in what the launcher left out, before DeepSpeed reads it. Without a launcher this is
    a one-rank run (useful to check a command line); with one, LOCAL_SIZE is what DeepSpeed's
    shared-memory all-reduce needs (the `deepspeed` launcher sets it, torchrun and mpirun don't)."""
    rank = env_int("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK")
    world = env_int("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")
    if rank is None or world is None:
        rank, world = 0, 1
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    local_rank = env_int("LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID")
    if local_rank is None:
        local_rank = local_rank_flag if local_rank_flag is not None else rank
    local_size = env_int("LOCAL_SIZE", "LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE",
                         "MPI_LOCALNRANKS")
    if local_size is None:
        local_size = world
    if not 0 <= rank < world:
        raise UserError(f"RANK {rank} is outside WORLD_SIZE {world}")
    for name, value in (("RANK", rank), ("WORLD_SIZE", world), ("LOCAL_RANK", local_rank),
                        ("LOCAL_SIZE", local_size)):
        os.environ[name] = str(value)
    if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        raise UserError("MASTER_ADDR and MASTER_PORT are not set: start the ranks with a launcher "
                        "(deepspeed, torchrun, mpirun)")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # a CPU benchmark, even on a GPU machine
    return RankInfo(rank=rank, world_size=world, local_rank=local_rank, local_size=local_size)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def current_rank() -> int | None:
    return env_int("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK")


def init_process_group(info: RankInfo, timeout_s: float) -> str:
    """deepspeed.init_distributed with a timeout, so a rank waiting on a dead peer gives up.
    Returns the communication backend (ccl with oneCCL's bindings, else gloo)."""
    import logging

    import deepspeed
    import torch.distributed as dist

    deepspeed.utils.logger.setLevel(logging.WARNING)
    deepspeed.init_distributed(timeout=timedelta(seconds=timeout_s), verbose=False,
                               auto_mpi_discovery=False)
    if dist.get_world_size() != info.world_size or dist.get_rank() != info.rank:
        raise UserError(f"the process group has rank {dist.get_rank()} of "
                        f"{dist.get_world_size()}, the environment said {info.rank} of "
                        f"{info.world_size}")
    guard_shm_all_reduce(info)
    release_shm_workspace(info)
    return str(dist.get_backend())


def shm_workspace_name(rank: int) -> str:
    """The /dev/shm name of one rank's workspace for DeepSpeed's shared-memory all-reduce, as
    its C++ side builds it (deepspeed/ops/csrc/cpu/comm/shm.cpp, shm_initialize)."""
    return (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{rank}")


def release_shm_workspace(info: RankInfo) -> None:
    """DeepSpeed creates one /dev/shm file per rank for that all-reduce and never removes it:
    69 MB per rank per run, in RAM, until reboot (a few hundred test runs filled this 24 GiB
    machine). init_distributed returns only once this rank has mapped every peer's file, so
    after a barrier no rank opens one again: each removes its own name, and the memory lives on
    in the mappings until the last rank exits, however it exits."""
    from deepspeed.comm import comm

    if getattr(comm.cdb, "shm_comm_op", None) is None or info.local_size != info.world_size:
        return
    barrier()
    with contextlib.suppress(FileNotFoundError):
        (SHM_WORKSPACE_DIR / shm_workspace_name(info.rank)).unlink()


def guard_shm_all_reduce(info: RankInfo) -> None:
    """DeepSpeed's shared-memory all-reduce (the gloo path) only works when every rank is on this
    machine; otherwise its C++ side is never initialized and would crash: fall back to the process
    group's own all-reduce. (oneCCL's backend does this check itself.)"""
    from deepspeed.comm import comm

    backend = comm.cdb
    if getattr(backend, "shm_comm_op", None) is not None and info.local_size != info.world_size:
        backend.shm_vector_kernel_level = 0


def all_reduce_path(dtype: str, info: RankInfo) -> str:
    """How AutoTP's all-reduces run, as DeepSpeed will choose (deepspeed/comm/torch.py)."""
    import torch.distributed as dist
    from deepspeed.comm import comm

    backend = comm.cdb
    if info.world_size == 1:
        return "none (one rank)"
    if getattr(backend, "shm_comm_op", None) is None:
        return f"{dist.get_backend()} process group"
    level = getattr(backend, "shm_vector_kernel_level", 0)
    needed = 1 if dtype == "float32" else 2  # bf16/fp16 kernels need avx512bw
    if level >= needed:
        return "deepspeed shared-memory all-reduce"
    return f"{dist.get_backend()} process group (shared-memory kernel unavailable for {dtype})"


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def run_rank(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> None:
    """The entry guard of a rank: any failure becomes `error: rank N: <one line>` (a bug also
    shows its traceback first) and the process exits at once, without waiting in the process
    group's teardown, so the launcher sees the failure and stops the other ranks."""
    status = 1
    try:
        status = main(argv)
    except UserError as exc:
        _rank_error(" ".join(str(exc).split()))
        status = USER_ERROR_EXIT
    except KeyboardInterrupt:
        _rank_error("interrupted")
        status = 130
    except SystemExit as exc:  # argparse's own exit (--help, bad flags)
        status = exc.code if isinstance(exc.code, int) else 1
    except BaseException as exc:
        text = " ".join(str(exc).split()) or "(no message)"
        if is_peer_failure(exc):
            _rank_error(f"lost another rank (it failed or was stopped): {text[:300]}")
        else:
            traceback.print_exc()
            _rank_error(f"{type(exc).__name__}: {text}")
        status = 1
    sys.stdout.flush()
    sys.stderr.flush()
    if status != 0:
        os._exit(status)
    exit_now(0)


def is_peer_failure(exc: BaseException) -> bool:
    """A collective that failed because another rank died or never answered: not a bug here."""
    text = str(exc)
    return (type(exc).__name__ in ("DistBackendError", "DistNetworkError")
            or "Connection closed by peer" in text or "Connection reset by peer" in text
            or ("gloo" in text.lower() and "timed out" in text.lower()))


class PeerWatchdog:
    """DeepSpeed's shared-memory all-reduce waits on flags in shared memory, with no timeout: if a
    rank on this machine dies, its peers would spin forever. This thread checks every second that
    the other ranks of the machine are alive, and ends this rank if one is gone before the run
    is over (`stop()` before the final barrier, which every rank must enter before any exits).

    The launcher stops the remaining ranks with SIGTERM when one fails. A rank handles it rather
    than dying on the spot, so that it can say why in its report: between Python steps the
    handler raises (the run's error handling marks the report failed); while the main thread
    waits inside the compiled step's all-reduce (no Python runs there), this thread, which finds
    the dead peer within a second, does."""

    def __init__(self, info: RankInfo) -> None:
        import signal
        import threading

        self.peers = {record["rank"]: record["pid"] for record in
                      gather({"rank": info.rank, "host": socket.gethostname(),
                              "pid": os.getpid()})
                      if record["host"] == socket.gethostname() and record["rank"] != info.rank}
        self.stopped = threading.Event()
        self.on_abort: Callable[[str], None] | None = None  # e.g. mark the report failed
        self.previous_sigterm = signal.signal(signal.SIGTERM, self._terminated)
        self.thread = threading.Thread(target=self._watch, name="llmbench-peer-watchdog",
                                       daemon=True)
        self.thread.start()

    def _dead_peer(self) -> str | None:
        for rank, pid in self.peers.items():
            if not _alive(pid):
                return (f"rank {rank} (pid {pid}) on this machine has exited before the run was "
                        "over; stopping")
        return None

    def _terminated(self, signum: int, frame: Any) -> None:
        raise UserError(self._dead_peer() or "stopped by SIGTERM (a launcher stops every rank "
                        "when one fails)")

    def _watch(self) -> None:
        while not self.stopped.wait(1.0):
            message = self._dead_peer()
            if message is not None and not self.stopped.is_set():
                with contextlib.suppress(Exception):
                    if self.on_abort is not None:
                        self.on_abort(message)
                _rank_error(message)
                os._exit(1)

    def stop(self) -> None:
        import signal

        self.stopped.set()
        signal.signal(signal.SIGTERM, self.previous_sigterm)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped by its parent) is gone too
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _rank_error(message: str) -> None:
    rank = current_rank()
    where = f"rank {rank}: " if rank is not None else ""
    print(f"error: {where}{message}", file=sys.stderr, flush=True)


def inject_failure(info: RankInfo) -> None:
    wanted = os.environ.get(FAIL_RANK_ENV)
    if wanted is not None and "@" not in wanted and wanted.strip() == str(info.rank):
        raise UserError(f"failure injected on purpose ({FAIL_RANK_ENV}={wanted})")


def gather(obj: Any) -> list[Any]:
    import torch.distributed as dist

    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered
