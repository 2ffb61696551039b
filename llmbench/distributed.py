"""Distributed inference with DeepSpeed AutoTP (tensor parallel), and model sharding.

One process per rank, started by a launcher (`deepspeed`, `torchrun`, mpirun): each builds the
model on the meta device, and `deepspeed.init_inference` loads the checkpoint shard by shard,
keeping only this rank's slice of every Linear layer. Generation, timing and the report are those
of the single-instance benchmark; rank 0 prints the summary and writes the report, which adds
the world size, every rank's cores and peak RSS, and the communication backend.

DeepSpeed pitfalls on CPU, each guarded here so a user can't hit them:
- without Intel's oneCCL bindings DeepSpeed uses gloo plus its shared-memory all-reduce op, whose
  C++ side reads LOCAL_SIZE; a launcher that doesn't set it (torchrun) made that op segfault, so
  LOCAL_SIZE is set from the launcher's own variables (`setup_environment`), and when the ranks
  are not all on one machine the shared-memory path is switched off (`guard_shm_all_reduce`);
- a checkpoint passed to init_inference is silently not loaded into a model whose weights are not
  on the meta device, and not at all with one rank: `init_autotp` asserts both;
- files written by init_inference's `save_mp_checkpoint_path` can't be loaded back on CPU: never
  used, and refused if someone passes it;
- weights DeepSpeed's loader doesn't know are left on the meta device, and non-persistent buffers
  (rotary inv_freq) are cast or emptied: both are put back from the checkpoint / the model.

A rank that fails prints `error: rank N: ...` and exits at once (`run_rank`); the launcher then
stops the other ranks, and a rank waiting on a dead peer fails after --dist-timeout at the latest.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import io
import json
import os
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from datetime import timedelta
from pathlib import Path
from typing import Any

from llmbench import flags
from llmbench.atomic import atomic_folder
from llmbench.errors import USER_ERROR_EXIT, UserError

SHARD_SUFFIX = "_local_shard"
SHARD_MARKER = "llmbench_shard.json"
SHARD_SCHEMA = "llmbench.shard/1"
# A testing aid: the rank named here fails on purpose right after joining the process group, so
# the tests can check that one failing rank fails the whole run instead of hanging the others.
FAIL_RANK_ENV = "LLMBENCH_FAIL_RANK"
BACKEND_NAME = "deepspeed-autotp"

DESCRIPTION = ("Generation latency benchmark, tensor parallel across ranks with DeepSpeed AutoTP "
               "(one process per rank: launch with `deepspeed` or through run.py --autotp).")
SHARD_DESCRIPTION = ("Write a model's weights resharded into small safetensors files, for "
                     "distributed runs to load shard by shard (pass the folder as -m).")


# ---------------------------------------------------------------------------------------------
# Ranks and the process group


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


SHM_WORKSPACE_DIR = Path("/dev/shm")


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
    sys.exit(0)


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


# ---------------------------------------------------------------------------------------------
# Where a model's weights are, and the GGUF cache under a lock


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock between the ranks of one machine (a GGUF is converted once, not once per
    rank)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def resolve_local(name_or_path: str | None) -> tuple[Any, float]:
    """models.resolve_source, with a GGUF converted (once per machine) to its cached folder."""
    from llmbench.models import cache_root, materialize_gguf, resolve_source

    source = resolve_source(name_or_path)
    seconds = 0.0
    if source.gguf_file is not None:
        with file_lock(cache_root() / "gguf" / ".convert.lock"):
            source, seconds = materialize_gguf(source)
    return source, seconds


def weight_files(folder: Path) -> list[Path]:
    """The checkpoint files of a model folder: safetensors if any, else PyTorch .bin files."""
    for pattern in ("*.safetensors", "*.bin"):
        files = sorted(path for path in folder.glob(pattern) if path.is_file()
                       and not path.name.startswith("training_args"))
        if files:
            return files
    return []


def safetensors_keys(files: list[Path]) -> dict[str, Path]:
    from safetensors import safe_open

    keys: dict[str, Path] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                keys[key] = path
    return keys


# ---------------------------------------------------------------------------------------------
# Sharding (utils/create_shard_model.py, run.py --shard-model)


def shard_folder_name(model_type: str | None) -> str:
    """`<family>_local_shard`, the family from the registry (config.model_type), never the path."""
    name = (model_type or "model").strip().replace("/", "_") or "model"
    return f"{name}{SHARD_SUFFIX}"


def default_shard_path(name_or_path: str | None, output_dir: str,
                       config_file: str | None = None) -> Path:
    from llmbench.models import load_config

    source, _ = resolve_local(name_or_path)
    _, family = load_config(source, config_file)
    return Path(output_dir) / shard_folder_name(family.model_type)


def shard_identity(source: Any, config_file: str | None, dtype: str,
                   max_shard_size: str) -> dict[str, Any]:
    """What makes two shards the same: the same weights, overrides, dtype and file size."""
    origin = source.gguf_sha256 or (str(Path(source.path).resolve()) if source.kind != "hub"
                                    else source.path)
    return {"origin": origin,
            "config_file": str(Path(config_file).resolve()) if config_file else None,
            "dtype": dtype, "max_shard_size": max_shard_size}


def read_shard_marker(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / SHARD_MARKER).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def existing_shard(save_path: Path, identity: dict[str, Any]) -> bool:
    """True if save_path holds this very shard; refuse to overwrite anything else."""
    if not save_path.exists():
        return False
    marker = read_shard_marker(save_path)
    if marker is None:
        raise UserError(f"{save_path} exists and is not a shard written by llmbench; remove it or "
                        "choose another --save-path / --output-dir")
    if marker.get("identity") != identity:
        raise UserError(f"{save_path} already holds a shard of {marker.get('source')} "
                        f"({marker.get('identity')}); remove it or choose another --save-path "
                        "/ --output-dir")
    return True


def create_shard(name_or_path: str | None, save_path: Path, *, dtype: str = "auto",
                 max_shard_size: str = "500MB", config_file: str | None = None) -> Path:
    """Load the model once and save it as safetensors files of at most max_shard_size, with its
    tokenizer, config (overrides applied) and a marker; written to a staging folder and renamed,
    so a half-written shard is never used."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    from llmbench.models import REMOTE_CODE_FAMILIES, load_config
    from llmbench.progress import transformers_bars

    transformers_bars()  # writing the shard files is the long part: a bar on a terminal
    source, _ = resolve_local(name_or_path)
    identity = shard_identity(source, config_file, dtype, max_shard_size)
    if existing_shard(save_path, identity):
        print(f"shard: {save_path} already holds this model's shard; reusing it", flush=True)
        return save_path
    config, family = load_config(source, config_file)
    remote = family.model_type in REMOTE_CODE_FAMILIES
    auto_class = AutoModelForSeq2SeqLM if family.seq2seq else AutoModelForCausalLM
    start = time.perf_counter()
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.path, trust_remote_code=remote)
        model = auto_class.from_pretrained(
            source.path, config=config, trust_remote_code=remote,
            dtype="auto" if dtype == "auto" else getattr(torch, dtype))
    except Exception as exc:
        raise UserError(f"cannot load {source.display_name} to shard it: {exc}") from exc
    # another machine may write the same shard at the same time: a complete one that won stands
    with atomic_folder(save_path, lambda: existing_shard(save_path, identity)) as staging:
        model.save_pretrained(staging, max_shard_size=max_shard_size, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        files = [path.name for path in weight_files(staging)]
        marker = {"schema": SHARD_SCHEMA, "source": source.display_name, "identity": identity,
                  "family": family.model_type, "dtype": str(model.dtype).replace("torch.", ""),
                  "files": files, "seconds": round(time.perf_counter() - start, 3),
                  "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        (staging / SHARD_MARKER).write_text(json.dumps(marker, indent=1) + "\n")
    print(f"shard: wrote {len(files)} files of at most {max_shard_size} to {save_path} "
          f"in {time.perf_counter() - start:.1f} s", flush=True)
    return save_path


def wait_for_shard(name_or_path: str | None, save_path: Path, identity_args: dict[str, Any],
                   timeout_s: float, local_rank: int) -> Path:
    """The other ranks of a machine wait for its local rank 0 to write the shard."""
    from llmbench.models import resolve_source

    source = resolve_source(name_or_path)
    print(f"shard: local rank {local_rank} waits for local rank 0 to write {save_path}",
          flush=True)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if (save_path / SHARD_MARKER).is_file():
            if source.gguf_file is None:  # a GGUF's identity is its hash: read the converted one
                existing_shard(save_path, shard_identity(source, **identity_args))
            return save_path
        time.sleep(0.5)
    raise UserError(f"local rank 0 did not write the shard {save_path} within {timeout_s:.0f} s "
                    "(--dist-timeout)")


def build_shard_parser(prog: str = "create_shard_model.py") -> flags.Parser:
    parser = flags.Parser(prog=prog, description=SHARD_DESCRIPTION)
    parser.add_argument(*flags.MODEL_FLAG_NAMES, dest="model_name_or_path", default=None,
                        help=flags.MODEL_HELP)
    parser.add_argument("model", nargs="?", default=None, metavar="MODEL",
                        help="the model, as the v2.1 example passes it (the same as -m)")
    parser.add_argument("--save-path", default=None,
                        help="folder to write (default: --output-dir/<family>_local_shard)")
    parser.add_argument("--output-dir", default="./saved_results",
                        help="where the default --save-path goes (default ./saved_results)")
    parser.add_argument("--dtype", choices=("auto", *flags.DTYPES), default="auto",
                        help="dtype of the saved weights (default auto: as stored)")
    parser.add_argument("--max-shard-size", default="500MB",
                        help="largest file written, e.g. 500MB or 2GB (default 500MB)")
    parser.add_argument("--config-file", default=None,
                        help="JSON whose keys override the model's config (saved with the shard)")
    flags.add_rank_flags(parser)
    return parser


def shard_main(argv: list[str] | None = None) -> int:
    args = build_shard_parser().parse_args(argv)
    if args.model is not None:
        if args.model_name_or_path not in (None, args.model):
            raise UserError(f"two models given: -m {args.model_name_or_path} and {args.model}; "
                            "pass one")
        args.model_name_or_path = args.model
    save_path = (Path(args.save_path) if args.save_path else
                 default_shard_path(args.model_name_or_path, args.output_dir, args.config_file))
    local_rank = env_int("LOCAL_RANK")
    if local_rank is None:
        local_rank = args.local_rank or 0
    if local_rank != 0:
        wait_for_shard(args.model_name_or_path, save_path,
                       {"config_file": args.config_file, "dtype": args.dtype,
                        "max_shard_size": args.max_shard_size}, args.dist_timeout, local_rank)
        return 0
    create_shard(args.model_name_or_path, save_path, dtype=args.dtype,
                 max_shard_size=args.max_shard_size, config_file=args.config_file)
    print(f"shard: {save_path}", flush=True)
    return 0


# ---------------------------------------------------------------------------------------------
# The model, tensor parallel


@dataclass
class AutoTPModel:
    """What load_autotp_model returns: a models.LoadedModel (model is the sharded module) plus
    how it was loaded."""

    loaded: Any
    load_path: str  # "meta+checkpoint" or "whole model per rank"
    checkpoint_files: list[str] = field(default_factory=list)
    local_weight_bytes: int = 0  # this rank's slice
    notes: list[str] = field(default_factory=list)
    checkpoint: Any = None  # a GPTQ/AWQ folder: (whole projections by name, its scheme)
    # a multimodal model: its language model (multimodal.language_model), the part sharded and
    # quantized; None: the whole model is
    language: Any = None

    @property
    def sharded(self) -> Any:
        return self.loaded.model if self.language is None else self.language


def _module_and_leaf(model: Any, name: str) -> tuple[Any, str]:
    owner_name, _, leaf = name.rpartition(".")
    return (model.get_submodule(owner_name) if owner_name else model), leaf


def meta_load_problem(model: Any, files: list[Path]) -> str | None:
    """Why DeepSpeed could not load this meta model from these files (None: it can): the files'
    names must cover every parameter, and the first parameter (what `model.device` reports) must
    be one DeepSpeed's loader fills, or init_inference would empty the loaded weights again."""
    from deepspeed.module_inject.auto_tp import Loading
    from deepspeed.module_inject.replace_module import skip_level_0_prefix

    if not files or any(path.suffix != ".safetensors" for path in files):
        return "the checkpoint is not in safetensors files"
    available = safetensors_keys(files)
    if skip_level_0_prefix(model, available):
        return "DeepSpeed would look its tensors up without their first prefix (bloom, opt)"
    by_tensor: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        by_tensor.setdefault(id(param), []).append(name)
    missing = [names[0] for names in by_tensor.values()
               if not any(name in available for name in names)]
    if missing:
        shown = ", ".join(missing[:3]) + (" ..." if len(missing) > 3 else "")
        return f"the checkpoint's tensor names don't cover the model's ({shown})"
    first_name = next(iter(model.named_parameters()))[0]
    owner, _ = _module_and_leaf(model, first_name)
    if not Loading.is_load_module(owner):
        return f"DeepSpeed's loader does not know {type(owner).__name__}"
    return None


def fill_from_checkpoint(module: Any, files: list[Path], dtype: Any) -> list[str]:
    """Put in the weights DeepSpeed's loader left on the meta device (modules it doesn't know;
    they are never tensor-parallel, so the whole tensor is the right one). Returns their names."""
    import torch
    from safetensors import safe_open

    left = [(name, tensor) for name, tensor in
            [*module.named_parameters(remove_duplicate=False), *module.named_buffers()]
            if tensor.is_meta]
    if not left:
        return []
    available = safetensors_keys(files) if files else {}
    filled = []
    for name, tensor in left:
        if name not in available:
            raise UserError(f"weight {name} was not loaded and is not in the checkpoint")
        with safe_open(str(available[name]), framework="pt") as handle:
            value = handle.get_tensor(name)
        if tuple(value.shape) != tuple(tensor.shape):
            raise UserError(f"weight {name} has shape {tuple(value.shape)} in the checkpoint, "
                            f"{tuple(tensor.shape)} in the tensor-parallel model")
        owner, leaf = _module_and_leaf(module, name)
        value = value.to(tensor.dtype if tensor.is_floating_point() else value.dtype)
        if isinstance(tensor, torch.nn.Parameter):
            setattr(owner, leaf, torch.nn.Parameter(value, requires_grad=False))
        else:
            owner._buffers[leaf] = value
        filled.append(name)
    return filled


def init_autotp(model: Any, *, world_size: int, dtype: Any, checkpoint_json: str | None,
                options: dict[str, Any] | None = None) -> Any:
    """deepspeed.init_inference with AutoTP, never in a way that silently loses the weights.
    `options` are more init_inference settings (e.g. for weight-only quantization later)."""
    import deepspeed

    refuse_unsupported_inference_options(options or {})
    if checkpoint_json is not None:
        not_meta = [name for name, param in model.named_parameters() if not param.is_meta]
        assert not not_meta, (
            "a checkpoint is only loaded into weights on the meta device; these are not: "
            f"{not_meta[:3]}")
        assert world_size > 1, "with one rank init_inference ignores the checkpoint"
    kwargs: dict[str, Any] = {
        "tensor_parallel": {"tp_size": world_size},
        "dtype": dtype,  # DeepSpeed's default would be float16
        "replace_with_kernel_inject": False,  # AutoTP; the injected kernels are GPU-only
        "keep_module_on_host": True,  # CPU anyway; lets fill_from_checkpoint see what's left
    }
    kwargs.update(options or {})
    if checkpoint_json is not None:
        kwargs["checkpoint"] = checkpoint_json
    quiet = io.StringIO()
    rank = env_int("RANK") or 0
    with contextlib.redirect_stdout(quiet if rank != 0 else sys.stdout), compact_each_shard():
        engine = deepspeed.init_inference(model, **kwargs)
    compact_storage(engine.module)
    return engine.module


def compact_storage(module: Any) -> int:
    """Give every weight memory of its own, so what DeepSpeed loaded from is freed. AutoTP's
    slices are views of the whole tensors they were cut from, and the weights it keeps whole
    (norms) are views into the memory-mapped checkpoint file; either keeps every rank at the
    whole model's size. A view of a tensor that is itself kept whole (a tied embedding) stays.
    Returns the number of tensors copied."""
    import torch

    tensors = [t for t in [*module.parameters(), *module.buffers()] if not t.is_meta]

    def own_bytes(t: torch.Tensor) -> int:
        return t.numel() * t.element_size()

    mapped = checkpoint_mappings()
    whole = {t.untyped_storage().data_ptr() for t in tensors
             if t.untyped_storage().nbytes() == own_bytes(t)}
    copied = 0
    for tensor in tensors:
        storage = tensor.untyped_storage()
        pointer = storage.data_ptr()
        in_file = any(start <= pointer < end for start, end in mapped)
        if in_file or (storage.nbytes() > own_bytes(tensor) and pointer not in whole):
            tensor.data = tensor.data.clone()
            copied += 1
    return copied


def checkpoint_mappings() -> list[tuple[int, int]]:
    """Address ranges of the checkpoint files mapped into this process (Linux)."""
    ranges = []
    try:
        with open("/proc/self/maps") as handle:
            for line in handle:
                parts = line.split()
                if len(parts) >= 6 and parts[5].endswith((".safetensors", ".bin")):
                    start, end = (int(value, 16) for value in parts[0].split("-"))
                    ranges.append((start, end))
    except OSError:
        pass
    return ranges


@contextlib.contextmanager
def compact_each_shard() -> Iterator[None]:
    """DeepSpeed loads a checkpoint one file at a time (module_inject.replace_module); compact
    after each file, so a rank's peak memory is its slice plus one file, not the whole model."""
    import gc

    from deepspeed.module_inject import replace_module as target

    original = getattr(target, "replace_module", None)
    if original is None:  # another DeepSpeed layout: compact once at the end only
        yield
        return

    def replace_then_compact(model: Any, *args: Any, **kwargs: Any) -> Any:
        result = original(model, *args, **kwargs)
        compact_storage(model)
        gc.collect()
        return result

    target.replace_module = replace_then_compact
    try:
        yield
    finally:
        target.replace_module = original


def refuse_unsupported_inference_options(options: dict[str, Any]) -> None:
    if options.get("save_mp_checkpoint_path"):
        raise UserError("save_mp_checkpoint_path is not supported: DeepSpeed's tensor-parallel "
                        "checkpoints can't be loaded back on CPU; use --shard-model instead")


def load_autotp_model(name_or_path: str | None, dtype: str, config_file: str | None,
                      info: RankInfo) -> AutoTPModel:
    """The model, tensor parallel over the process group's ranks.

    A local folder of safetensors (a --shard-model shard, a converted GGUF, a downloaded model)
    is built on the meta device and loaded by DeepSpeed shard by shard, each rank keeping its
    slice; anything else (a hub id, .bin files, names DeepSpeed can't match) is loaded whole on
    every rank and then sliced, which needs the whole model's memory on each rank."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from llmbench.models import REMOTE_CODE_FAMILIES, LoadedModel, load_config

    hf_logging.disable_progress_bar()
    torch_dtype = getattr(torch, dtype)
    notes: list[str] = []
    # One rank per machine converts a GGUF; the others then find it in the cache.
    if info.local_rank == 0:
        source, conversion_seconds = resolve_local(name_or_path)
    barrier()
    if info.local_rank != 0:
        source, conversion_seconds = resolve_local(name_or_path)
    config, family = load_config(source, config_file)
    remote = family.model_type in REMOTE_CODE_FAMILIES
    auto_class = AutoModelForSeq2SeqLM if family.seq2seq else AutoModelForCausalLM
    start = time.perf_counter()
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.path, trust_remote_code=remote)
    except Exception as exc:
        raise UserError(f"cannot load the tokenizer of {source.display_name}: {exc}") from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    files = weight_files(Path(source.path)) if source.kind != "hub" else []
    model = None
    checkpoint = None
    problem = "one rank: nothing to split" if info.world_size == 1 else None
    from llmbench.quant.checkpoint_settings import folder_quantization

    if source.kind != "hub" and folder_quantization(source.path) is not None:
        # A GPTQ/AWQ folder: converted whole by the single-instance loader (the float model
        # holds the dequantized weights), sliced by AutoTP, then each rank's INT4 slices are
        # cut from the checkpoint's own tensors (quant.autotp.slice_checkpoint_autotp).
        from llmbench.models import load_model

        whole = load_model(source.path, dtype, config_file)
        model, checkpoint = whole.model, whole.quantized
        problem = "a GPTQ/AWQ folder is converted whole, then cut per rank"
        notes.append(f"loading the whole model on every rank: {problem}")
        files = []
    elif problem is None and not files:
        problem = "no local checkpoint files (a hub id: pass --shard-model to make a local shard)"
    if problem is None:
        with init_empty_weights(include_buffers=False):
            model = auto_class.from_config(config, dtype=torch_dtype, trust_remote_code=remote)
        model.tie_weights()  # from_pretrained ties them, from_config doesn't
        problem = meta_load_problem(model, files)
        if problem is not None:
            model = None
    if checkpoint is not None:
        load_path = "whole model per rank"
    elif model is not None:
        load_path = "meta+checkpoint"
    else:
        load_path = "whole model per rank"
        if info.world_size > 1:
            notes.append(f"loading the whole model on every rank: {problem}")
        try:
            model = auto_class.from_pretrained(source.path, config=config, dtype=torch_dtype,
                                               trust_remote_code=remote)
        except Exception as exc:
            raise UserError(f"cannot load {source.display_name}: {exc}") from exc
    model.eval()

    params = list(model.parameters())
    num_parameters = sum(p.numel() for p in params)
    weight_bytes = sum(p.numel() * p.element_size() for p in params)
    embedding = model.get_input_embeddings().weight
    output = model.get_output_embeddings()
    tied = output is not None and output.weight is embedding
    decode_weight_bytes = weight_bytes - (0 if tied else embedding.numel()
                                          * embedding.element_size())
    # Computed at construction, not saved in checkpoints: init_inference casts (or empties) them.
    kept_buffers = {name: buffer.clone() for name, buffer in model.named_buffers()
                    if not buffer.is_meta and _is_non_persistent(model, name)}

    checkpoint_json = None
    if load_path == "meta+checkpoint":
        fd, checkpoint_json = tempfile.mkstemp(prefix="llmbench-ds-checkpoint-", suffix=".json")
        with os.fdopen(fd, "w") as handle:
            json.dump({"type": "ds_model", "checkpoints": [str(p) for p in files],
                       "version": 1.0}, handle)
    try:
        module = init_autotp(model, world_size=info.world_size, dtype=torch_dtype,
                             checkpoint_json=checkpoint_json)
    finally:
        if checkpoint_json is not None:
            os.unlink(checkpoint_json)
    filled = fill_from_checkpoint(module, files if load_path == "meta+checkpoint" else [],
                                  torch_dtype)
    if filled:
        notes.append(f"{len(filled)} weights DeepSpeed's loader skipped were loaded by llmbench")
    for name, buffer in kept_buffers.items():
        owner, leaf = _module_and_leaf(module, name)
        owner._buffers[leaf] = buffer
    module.eval()
    left = [name for name, tensor in [*module.named_parameters(), *module.named_buffers()]
            if tensor.is_meta]
    if left:
        raise UserError(f"weights were not loaded: {', '.join(left[:3])}")
    load_seconds = time.perf_counter() - start

    values: dict[str, Any] = dict(
        model=module, tokenizer=tokenizer, config=config, family=family, source=source,
        dtype=dtype, load_seconds=load_seconds, conversion_seconds=conversion_seconds,
        num_parameters=num_parameters, weight_bytes=weight_bytes,
        decode_weight_bytes=decode_weight_bytes)
    known = {item.name for item in fields(LoadedModel)}
    loaded = LoadedModel(**{key: value for key, value in values.items() if key in known})
    local = sum(p.numel() * p.element_size() for p in module.parameters())
    return AutoTPModel(loaded=loaded, load_path=load_path,
                       checkpoint_files=[str(p) for p in files] if checkpoint_json else [],
                       local_weight_bytes=local, notes=notes, checkpoint=checkpoint)


def load_autotp_multimodal(args: argparse.Namespace, request: Any, info: RankInfo
                           ) -> tuple[AutoTPModel, Any]:
    """A multimodal model whole on every rank, its language model then sharded by AutoTP (the
    vision / audio encoders run replicated, once per prompt on every rank), and the prompt its
    processor builds. Returns (AutoTPModel, Prompt)."""
    import torch

    from llmbench import multimodal
    from llmbench.models import decode_step_bytes

    loaded, processor = multimodal.load(args, request)
    # what all ranks read per step together: the float language model, as single instance
    # (counted before it is cut: the ranks' slices summed would count replicated parts twice)
    loaded.decode_weight_bytes = decode_step_bytes(loaded.model, loaded.model.get_decoder())
    start = time.perf_counter()
    language = multimodal.language_model(loaded.model, loaded.family.model_type)
    init_autotp(language, world_size=info.world_size, dtype=getattr(torch, args.dtype),
                checkpoint_json=None)
    language.write_back()  # AutoTP's lm_head replacement, made on the view, into the model
    loaded.load_seconds += time.perf_counter() - start
    local = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
    prompt = multimodal.build_inputs(processor, request, args.prompt, args.batch_size,
                                     args.dtype)
    notes = ["a multimodal model loads whole on every rank; its language model is sharded, "
             f"the encoders ({', '.join(multimodal_encoders(request))}) run whole on every "
             "rank"]
    return AutoTPModel(loaded=loaded, load_path="whole model per rank",
                       local_weight_bytes=local, notes=notes, language=language), prompt


def load_native_tp(args: argparse.Namespace, scheme: Any, info: RankInfo,
                   shared_memory: bool, request: Any = None
                   ) -> tuple[AutoTPModel | None, Any, Any, str | None]:
    """--autotp --backend native: the model whole on every rank (quantized whole, as one
    process would, when asked), made a NativeModel (a multimodal model's language model: its
    encoders stay transformers' own, run whole on every rank), then cut to this rank's slice
    (backends.tensor_parallel). Returns (AutoTPModel, PreparedModel, Prompt of a multimodal
    request or None, None), or (None, None, None, reason) on every rank alike when this model
    or setting is not cut natively (the caller runs AutoTP stock)."""
    from llmbench.backends import tensor_parallel
    from llmbench.backends.blocks import Unsupported

    if info.local_rank == 0:
        source, _ = resolve_local(args.model_name_or_path)
    barrier()
    if info.local_rank != 0:
        source, _ = resolve_local(args.model_name_or_path)
    path = source.path if source.kind != "hub" else args.model_name_or_path
    loaded, prepared, prompt, reason = _native_whole(args, scheme, path, request)
    native = None
    if reason is None:
        native = getattr(prepared.model, "native", prepared.model)  # a multimodal runner's
        comm = tensor_parallel.communicator(info.rank, info.world_size, shared_memory)
        try:
            start = time.perf_counter()
            tensor_parallel.shard(native, comm)
            loaded.load_seconds += time.perf_counter() - start
        except Unsupported as exc:
            reason = str(exc)
    # Every rank must take the same path: one rank on stock AutoTP and another on the native
    # step would wait for each other's collectives forever (a slice can be refused on one rank
    # only, e.g. a narrow expert that leaves a rank no units).
    refused = [r for r in gather(reason) if r is not None]
    if refused:
        return None, None, None, refused[0]
    native.place_weights()
    local = native.weight_bytes
    loaded.decode_weight_bytes = sum(gather(local))
    prepared.details["weight_bytes_per_token"] = loaded.decode_weight_bytes
    prepared.details["weight_bytes_per_token_this_rank"] = local
    prepared.details["all_reduce"] = comm.description
    if "quantization" in prepared.details:
        prepared.details["quantization"].update({
            "applied": "quantized whole on every rank as one process would, then each rank "
                       "cut its slices of the integers and scales",
            "weight_bytes_per_token": loaded.decode_weight_bytes})
    notes = []
    if request is not None:
        notes.append("a multimodal model loads whole on every rank; its language model runs "
                     "native, cut across the ranks; the encoders ("
                     f"{', '.join(multimodal_encoders(request))}) run whole on every rank")
    return (AutoTPModel(loaded=loaded, load_path="whole model per rank, cut by llmbench",
                        local_weight_bytes=local, notes=notes), prepared, prompt, None)


def multimodal_encoders(request: Any) -> tuple[str, ...]:
    from llmbench.multimodal import LAYOUTS

    return LAYOUTS[request.family.model_type].encoders


def _native_whole(args: argparse.Namespace, scheme: Any, path: str, request: Any
                  ) -> tuple[Any, Any, Any, str | None]:
    """load_native_tp's first part: (LoadedModel, PreparedModel native and uncut, the
    multimodal prompt or None, None), or (.., reason) when native does not run it."""
    from llmbench import backends

    if request is not None:
        from llmbench import multimodal
        from llmbench.generation import load_multimodal

        loaded, prompt = load_multimodal(args, request)
        start = time.perf_counter()
        prepared = multimodal.prepare(args, loaded, "native", place_weights=False,
                                      announce=False)
    else:
        from llmbench.models import load_model

        # quantization reads the fp32 weights; the model then runs in --dtype
        loaded = load_model(path, "float32" if scheme is not None else args.dtype,
                            args.config_file)
        prompt = None
        if loaded.quantized is not None:
            return loaded, None, None, "a GPTQ/AWQ folder is cut by the stock AutoTP path"
        start = time.perf_counter()
        if scheme is not None:
            from llmbench.quant.cli import quantize_in_process

            # the whole model, as one process quantizes it (rank 0 says what ran, once cut)
            prepared = quantize_in_process(args, loaded, scheme, "native", announce=False)
        else:
            prepared = backends.prepare(loaded.model, backend="native", dtype=args.dtype,
                                        family=loaded.family.model_type,
                                        kv_cache_dtype=args.kv_cache_dtype,
                                        place_weights=False)
    loaded.load_seconds += time.perf_counter() - start
    if prepared.backend != "native":
        return loaded, None, None, prepared.details["fallback_reason"].split(": this run is")[0]
    loaded.model = prepared.model
    return loaded, prepared, prompt, None


def _is_non_persistent(model: Any, name: str) -> bool:
    owner, leaf = _module_and_leaf(model, name)
    return leaf in owner._non_persistent_buffers_set


# ---------------------------------------------------------------------------------------------
# The benchmark on every rank


class RecordingModel:
    """Passes generate() through and keeps its last output, so the report can hold the token
    ids every rank generated (the test compares them with a single-instance run)."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.last_output: Any = None

    def generate(self, **kwargs: Any) -> Any:
        kill_at = kill_step()
        if kill_at is not None:  # tests: this rank dies mid-run, as a crashed rank would
            kwargs["stopping_criteria"] = [*(kwargs.get("stopping_criteria") or []),
                                           KillAtStep(kill_at)]
        self.last_output = self.model.generate(**kwargs)
        return self.last_output


class KillAtStep:
    """A stopping criterion that SIGKILLs this process at its `step`-th call (tests)."""

    def __init__(self, step: int) -> None:
        self.step, self.calls = step, 0

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import signal

        import torch

        self.calls += 1
        if self.calls == self.step:
            os.kill(os.getpid(), signal.SIGKILL)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


def kill_step() -> int | None:
    """LLMBENCH_FAIL_RANK=R@N: rank R kills itself at its N-th decoding step (tests)."""
    wanted = os.environ.get(FAIL_RANK_ENV, "")
    if "@" not in wanted:
        return None
    rank, step = wanted.split("@", 1)
    return int(step) if rank.strip() == str(current_rank()) else None


def build_parser(prog: str = "run_generation_with_deepspeed.py") -> flags.Parser:
    # The quantization group as a whole (one definition of each flag); what does not run per
    # rank is refused by llmbench.quant.cli.autotp_scheme.
    return flags.build_parser(prog, DESCRIPTION, (*flags.generation_groups(),
                                                  flags.add_multimodal_flags,
                                                  flags.add_rank_flags,
                                                  flags.add_quantization_flags,
                                                  flags.add_benchmark_noop_flag))


def rank_record(info: RankInfo, tp: AutoTPModel, token_ids: list[list[int]],
                quant: Any = None) -> dict[str, Any]:
    import torch

    from llmbench.environment import peak_rss_bytes

    return {
        "rank": info.rank,
        "local_rank": info.local_rank,
        "host": socket.gethostname(),
        # the launcher's machine index (DeepSpeed's CROSS_RANK): tells apart "machines" that
        # share a host name, as the two-address test's do
        "node_rank": env_int("CROSS_RANK"),
        "pid": os.getpid(),
        "cpu_affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
        else None,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "torch_threads": torch.get_num_threads(),
        "peak_rss_bytes": peak_rss_bytes(),
        "local_weight_bytes": tp.local_weight_bytes,
        "load_seconds": tp.loaded.load_seconds,
        **({} if quant is None else {
            "quantized_projections": len(quant.qlinears),
            "float_projections": len(quant.left_float),
            "empty_slices": len(quant.empty_slices),
            "quantized_weight_bytes": quant.nbytes,
            "quantize_seconds": quant.seconds}),
        "generated_token_ids": token_ids,
    }


def all_reduce_record(native: Any, run: Any, args: argparse.Namespace) -> dict[str, Any]:
    """This rank's all-reduce time per generated token over every iteration it ran (warm-up
    included), measured around each call, and its weights' read rate at its own mean
    next-token latency."""
    seconds, calls = native.take_all_reduce_time()
    iterations = len(run.iterations) + len(run.warmup_seconds)
    tokens = max(1, iterations * args.max_new_tokens)
    steps = [s for it in run.iterations if it.step_latencies for s in it.step_latencies[1:]]
    record: dict[str, Any] = {
        "all_reduce_ms_per_token": 1000.0 * seconds / tokens,
        "all_reduce_calls_per_token": calls / tokens,
        "weight_bytes_per_token": native.weight_bytes}
    if steps:
        record["decode_read_gb_per_s"] = native.weight_bytes / (sum(steps) / len(steps)) / 1e9
    return record


def gather(obj: Any) -> list[Any]:
    import torch.distributed as dist

    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def quantize_rank(tp: AutoTPModel, scheme: Any, args: argparse.Namespace) -> tuple[Any, Any]:
    """This rank's quantized projections: cut from a GPTQ/AWQ folder's own (-m of one; the
    weight-only flags then only choose how to compute, as single instance), or quantized from
    its float slice (--ipex-weight-only-quantization). Returns (TPQuantization, scheme)."""
    import dataclasses

    from llmbench.quant import autotp as tp_quant

    if tp.checkpoint is None:
        quant = tp_quant.quantize_autotp(tp.sharded, scheme)
        if tp.language is not None:
            tp.language.write_back()  # a quantized lm_head, swapped on the view
        return quant, scheme
    qlinears, folder_scheme = tp.checkpoint
    if scheme is not None:
        if scheme.weight_dtype not in ("INT8", "INT4") or args.group_size not in (
                0, folder_scheme.group_size):
            raise UserError(f"-m {tp.loaded.source.display_name} is already a quantized "
                            f"checkpoint ({folder_scheme.describe()}): drop the quantization "
                            "flags, or pass only --ipex-weight-only-quantization [--weight-dtype "
                            "INT4] [--lowp-mode ...]")
        folder_scheme = dataclasses.replace(folder_scheme, lowp_mode=scheme.lowp_mode,
                                            act_quant_mode=scheme.act_quant_mode)
    quant = tp_quant.slice_checkpoint_autotp(tp.loaded.model, qlinears, folder_scheme)
    return quant, folder_scheme


def check_args(parser: flags.Parser, args: argparse.Namespace) -> Any:
    """What a rank refuses before joining the others (every rank alike), and the weight-only
    scheme it quantizes its slice with (None: float)."""
    from llmbench.quant.cli import autotp_scheme

    scheme = autotp_scheme(parser, args)
    backend = "ipex" if getattr(args, "ipex", False) else getattr(args, "backend", "stock")
    if backend == "ipex":
        from llmbench.backends.ipex import require_ipex

        require_ipex()  # IPEX absent: one line saying so
    if args.quant_with_amp:
        args.dtype = "bfloat16"  # the layers left unquantized run in bf16, as single-instance
    if backend not in ("stock", "native"):
        raise UserError(f"--autotp runs --backend stock or native, not {backend}")
    if getattr(args, "kv_cache_dtype", "auto") != "auto" and backend != "native":
        raise UserError("--kv-cache-dtype needs --backend native")
    return scheme


def main(argv: list[str] | None = None) -> int:
    from llmbench.atomic import write_text
    from llmbench.backends import PreparedModel
    from llmbench.bench import BenchmarkRun, run_benchmark
    from llmbench.decoding import decoding_settings
    from llmbench.generation import base_report
    from llmbench.models import resolve_source
    from llmbench.precision import check_dtype
    from llmbench.prompts import build_prompt
    from llmbench.quant import autotp as tp_quant
    from llmbench.report import (
        ReportWriter,
        compute_statistics,
        markdown,
        report_stem,
        summary_lines,
    )

    parser = build_parser()
    args = parser.parse_args(argv)
    scheme = check_args(parser, args)
    mode, generate_kwargs = decoding_settings(
        greedy=args.greedy, sample=args.sample, num_beams=args.num_beams,
        max_new_tokens=args.max_new_tokens, generation_config=args.generation_config)
    if args.streaming and (generate_kwargs["num_beams"] > 1 or args.batch_size > 1):
        raise UserError("--streaming needs one beam (--greedy or --sample) and --batch-size 1")
    notes = check_dtype(args.dtype)

    resolve_source(args.model_name_or_path)  # every rank stops here alike on a wrong -m
    info = setup_environment(args.local_rank)
    comm_backend = init_process_group(info, args.dist_timeout)
    watchdog = PeerWatchdog(info)
    inject_failure(info)
    is_root = info.rank == 0
    if info.world_size == 1:
        notes.append("one rank: nothing is tensor parallel; launch with `deepspeed "
                     "--num_accelerators N --bind_cores_to_rank run.py --autotp ...`")
    affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()
    if info.local_size > 1 and len(affinity) >= (os.cpu_count() or 1) > 1:
        notes.append("the ranks on this machine share all its cores: bind each to its own "
                     "(deepspeed --bind_cores_to_rank, or numactl)")

    from llmbench import multimodal

    request = multimodal.check_request(args)  # None: a text model
    encoder_timer = None
    native_prepared = None
    fallback = None
    if args.backend == "native":
        shared_memory = all_reduce_path("float32", info) == "deepspeed shared-memory all-reduce"
        tp, native_prepared, prompt, fallback = load_native_tp(args, scheme, info,
                                                               shared_memory, request)
        if native_prepared is not None and request is not None and (
                request.image is not None or request.audio is not None):
            encoder_timer = multimodal.EncoderTimer(native_prepared.model.model,
                                                    request.family.model_type)
    if fallback is not None:
        fallback = f"{fallback}: this run is STOCK transformers under DeepSpeed AutoTP"
        notes.append(fallback)
    if native_prepared is None and request is None:
        tp = load_autotp_model(args.model_name_or_path, args.dtype, args.config_file, info)
    elif native_prepared is None:
        tp, prompt = load_autotp_multimodal(args, request, info)
        if request.image is not None or request.audio is not None:
            encoder_timer = multimodal.EncoderTimer(tp.loaded.model, request.family.model_type)
    loaded = tp.loaded
    notes += tp.notes
    quant = None
    decode_bytes = getattr(loaded, "decode_weight_bytes", loaded.weight_bytes)
    if native_prepared is None and (scheme is not None or tp.checkpoint is not None):
        start = time.perf_counter()
        quant, scheme = quantize_rank(tp, scheme, args)
        quant.seconds = time.perf_counter() - start
        tp.local_weight_bytes = tp_quant.weight_bytes(loaded.model)
        # The GB/s figure: what all ranks read per decoding step together, their quantized
        # slices (the float model's decode_weight_bytes would overstate it 2-7x).
        decode_bytes = sum(gather(tp_quant.decode_weight_bytes(tp.sharded)))
        loaded.decode_weight_bytes = decode_bytes
    if request is None:
        prompt = build_prompt(loaded.tokenizer, loaded.config, loaded.family.model_type,
                              input_tokens=args.input_tokens, prompt_text=args.prompt,
                              batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                              seq2seq=loaded.family.seq2seq)
    all_reduce = all_reduce_path(args.dtype, info)
    if native_prepared is not None:
        prepared = native_prepared
        all_reduce = prepared.details["all_reduce"]
        prepared.details.update({"tp_size": info.world_size,
                                 "communication_backend": comm_backend,
                                 "load_path": tp.load_path})
    else:
        prepared = PreparedModel(model=loaded.model, backend=BACKEND_NAME, details={
            "tp_size": info.world_size, "communication_backend": comm_backend,
            "all_reduce": all_reduce, "load_path": tp.load_path,
            "attention": getattr(loaded.config, "_attn_implementation", None)})
        if args.backend == "native":
            prepared.details.update({"requested": "native", "fallback_reason": fallback})
    backend_name = BACKEND_NAME if native_prepared is None else "native-autotp"
    if quant is not None:
        prepared.details["quantization"] = quant.details() | {
            "weight_bytes_per_token": decode_bytes, "quantize_seconds": quant.seconds}
        prepared.details["weight_bytes_per_token"] = decode_bytes
        if "note" in prepared.details["quantization"]:
            notes.append(prepared.details["quantization"]["note"])
    if is_root:
        for note in notes:
            print(f"note: {note}", flush=True)
        print(f"model: {loaded.source.display_name} | family {loaded.family.model_type} | "
              f"{args.dtype} | {backend_name} x{info.world_size} ({comm_backend}, {all_reduce}) "
              f"| {mode} | load {loaded.load_seconds:.2f} s ({tp.load_path})", flush=True)
        if request is not None:
            print(f"input: {request.describe()}", flush=True)
        if quant is not None:
            splits = prepared.details["quantization"]["splits_per_rank"]
            print(f"quantized: {scheme.describe()}, {quant.applied}: "
                  f"{len(quant.qlinears)} projections per rank ("
                  + ", ".join(f"{n} {k}" for k, n in splits.items() if n)
                  + f"), {len(quant.left_float)} left float, in {quant.seconds:.1f} s; "
                  f"{decode_bytes / 2**20:.1f} MiB read per token over all ranks", flush=True)
        print(f"---- Prompt size: {prompt.tokens}", flush=True)

    writer = None
    if is_root:
        writer = ReportWriter(args.output_dir, report_stem(
            loaded.family.model_type, args.dtype, f"autotp{info.world_size}", mode),
            base_report(args, loaded, prepared, prompt, mode, generate_kwargs, notes))
        writer.report["input"] = (request.record() if request is not None else
                                  {"mode": 0, "mode_name": "text", "image": None, "audio": None})
        writer.report["distributed"] = {
            "world_size": info.world_size, "communication_backend": comm_backend,
            "all_reduce": all_reduce, "load_path": tp.load_path,
            "checkpoint_files": tp.checkpoint_files,
            "launcher_env": {name: os.environ[name] for name in (
                "MASTER_ADDR", "MASTER_PORT", "LOCAL_SIZE", "CROSS_SIZE", "DS_ACCELERATOR",
                "CCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME") if name in os.environ}}
        watchdog.on_abort = writer.fail

    def stats_of(run: BenchmarkRun) -> dict[str, Any]:
        return compute_statistics(run, args.batch_size, decode_bytes)

    recorder = RecordingModel(loaded.model)
    native = None if native_prepared is None else getattr(loaded.model, "native", loaded.model)
    if native is not None:
        native.take_all_reduce_time()  # from here on: the benchmark's iterations
    try:
        run = run_benchmark(
            recorder, loaded.tokenizer, prompt, generate_kwargs,
            seq2seq=loaded.family.seq2seq, num_iter=args.num_iter, num_warmup=args.num_warmup,
            token_latency=args.token_latency, streaming=args.streaming and is_root,
            profile=args.profile, seed=args.seed,
            trace_dir=writer.json_path.parent if writer else None,
            on_iteration=(lambda partial: writer.update("running", partial, stats_of(partial)))
            if writer else None, encoder_timer=encoder_timer)
        token_ids = recorder.last_output.tolist() if recorder.last_output is not None else []
        record = rank_record(info, tp, token_ids, quant)
        record["all_reduce"] = all_reduce
        if native is not None:
            record.update(all_reduce_record(native, run, args))
        ranks = gather(record)
    except BaseException as exc:
        if writer is not None:
            writer.fail(" ".join(str(exc).split()) if isinstance(exc, UserError)
                        else f"{type(exc).__name__}: {exc}")
        raise
    if writer is not None:
        agree = all(record["generated_token_ids"] == token_ids for record in ranks)
        writer.report["distributed"].update(ranks=ranks, ranks_agree=agree)
        if native_prepared is not None:
            writer.report["distributed"]["all_reduce_ms_per_token"] = max(
                record["all_reduce_ms_per_token"] for record in ranks)
        writer.update("complete", run, stats_of(run), profile_trace=run.trace_path,
                      generated_token_ids=token_ids)
        if not agree:  # tensor parallel went wrong: the numbers measure something broken
            message = "the ranks generated different tokens (see the report's distributed.ranks)"
            writer.fail(message)
            raise UserError(message)
        write_text(writer.markdown_path, markdown(writer.report) + rank_table(writer.report))
        if run.profile_table:
            print(run.profile_table)
            if run.trace_path:
                print(f"profile trace: {run.trace_path}")
        print(f"generated (first sequence): {run.generated_text[0]!r}")
        for line in summary_lines(stats_of(run)):
            print(line)
        print(f"Model load: {loaded.load_seconds:.2f} s ({tp.load_path})")
        for record in ranks:
            print(f"Rank {record['rank']}: cores {compact_cores(record['cpu_affinity'])}, "
                  f"peak RSS {record['peak_rss_bytes'] / 2**20:.0f} MiB, "
                  f"{record['local_weight_bytes'] / 2**20:.0f} MiB of weights")
        print(f"report: {writer.json_path}")
        print(f"summary: {writer.markdown_path}", flush=True)
    watchdog.stop()
    barrier()
    import torch.distributed as dist

    dist.destroy_process_group()
    return 0


def compact_cores(cores: list[int] | None) -> str:
    """[0, 1, 2, 5] -> '0-2,5'."""
    if not cores:
        return "?"
    spans: list[list[int]] = []
    for core in cores:
        if spans and core == spans[-1][1] + 1:
            spans[-1][1] = core
        else:
            spans.append([core, core])
    return ",".join(f"{a}-{b}" if a != b else f"{a}" for a, b in spans)


def rank_table(report: dict[str, Any]) -> str:
    dist_info = report["distributed"]
    quant = report.get("backend", {}).get("quantization")
    lines = ["", f"## {dist_info['world_size']} ranks: {dist_info['communication_backend']}, "
                 f"{dist_info['all_reduce']}, {dist_info['load_path']}", ""]
    if quant is not None:  # the summary table above has no quantization row; say what ran
        lines += [f"Quantization: {quant['description']}, {quant['applied']}; "
                  f"{quant['weight_bytes_per_token'] / 2**20:.1f} MiB read per token over all "
                  "ranks.", ""]
    header = "| rank | host | cores | threads | peak RSS | weights |"
    lines += [header + (" quantized / float projections |" if quant else ""),
              "|---|---|---|---|---|---|" + ("---|" if quant else "")]
    for record in dist_info.get("ranks", []):
        line = (f"| {record['rank']} | {record['host']} | "
                f"{compact_cores(record['cpu_affinity'])} | {record['torch_threads']} | "
                f"{record['peak_rss_bytes'] / 2**20:.0f} MiB | "
                f"{record['local_weight_bytes'] / 2**20:.0f} MiB |")
        if quant:
            line += (f" {record.get('quantized_projections')} / "
                     f"{record.get('float_projections')} |")
        lines.append(line)
    return "\n".join(lines) + "\n"
