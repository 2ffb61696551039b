"""Where a model's weights are (the GGUF cache under a lock between ranks, safetensors files)
and resharding a model into small files that ranks load one at a time
(utils/create_shard_model.py, run.py --shard-model)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llmbench.atomic import atomic_folder
from llmbench.errors import UserError

SHARD_SUFFIX = "_local_shard"
SHARD_MARKER = "llmbench_shard.json"
SHARD_SCHEMA = "llmbench.shard/1"
SHARD_DESCRIPTION = ("Write a model's weights resharded into small safetensors files, for "
                     "distributed runs to load shard by shard (pass the folder as -m).")


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
