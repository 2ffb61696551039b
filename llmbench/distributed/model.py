"""The model, tensor parallel: AutoTP's slice of each Linear on this rank (stock), or this
rank's cut of the native model (`load_native_tp`), and weight-only quantization of a slice."""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from llmbench.distributed.ranks import RankInfo, barrier, env_int, gather
from llmbench.distributed.shards import resolve_local, safetensors_keys, weight_files
from llmbench.errors import UserError
from llmbench.settings import Settings

BACKEND_NAME = "deepspeed-autotp"


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
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM
    from transformers.utils import logging as hf_logging

    from llmbench.models import REMOTE_CODE_FAMILIES, LoadedModel, load_config, load_tokenizer

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
    tokenizer = load_tokenizer(source, remote)

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


def load_autotp_multimodal(settings: Settings, request: Any, info: RankInfo
                           ) -> tuple[AutoTPModel, Any]:
    """A multimodal model whole on every rank, its language model then sharded by AutoTP (the
    vision / audio encoders run replicated, once per prompt on every rank), and the prompt its
    processor builds. Returns (AutoTPModel, Prompt)."""
    import torch

    from llmbench import multimodal
    from llmbench.models import decode_step_bytes

    loaded, processor = multimodal.load(settings, request)
    # what all ranks read per step together: the float language model, as single instance
    # (counted before it is cut: the ranks' slices summed would count replicated parts twice)
    loaded.decode_weight_bytes = decode_step_bytes(loaded.model, loaded.model.get_decoder())
    start = time.perf_counter()
    language = multimodal.language_model(loaded.model, loaded.family.model_type)
    init_autotp(language, world_size=info.world_size, dtype=getattr(torch, settings.model.dtype),
                checkpoint_json=None)
    language.write_back()  # AutoTP's lm_head replacement, made on the view, into the model
    loaded.load_seconds += time.perf_counter() - start
    local = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
    prompt = multimodal.build_inputs(processor, request, settings.prompt.prompt,
                                     settings.prompt.batch_size, settings.model.dtype)
    notes = ["a multimodal model loads whole on every rank; its language model is sharded, "
             f"the encoders ({', '.join(multimodal_encoders(request))}) run whole on every "
             "rank"]
    return AutoTPModel(loaded=loaded, load_path="whole model per rank",
                       local_weight_bytes=local, notes=notes, language=language), prompt


def load_native_tp(settings: Settings, scheme: Any, info: RankInfo,
                   shared_memory: bool, request: Any = None
                   ) -> tuple[AutoTPModel | None, Any, Any, str | None]:
    """--autotp --backend native: from a local folder of safetensors, the model read layer by
    layer, each layer made native (quantized as one process would, when asked) and cut to this
    rank's slice before the next is read (distributed.native_load); otherwise the model whole
    on every rank (quantized whole), made a NativeModel (a multimodal model's language model:
    its encoders stay transformers' own, run whole on every rank), then cut
    (backends.tensor_parallel). Returns (AutoTPModel, PreparedModel, Prompt of a multimodal
    request or None, None), or (None, None, None, reason) on every rank alike when this model
    or setting is not cut natively (the caller runs AutoTP stock)."""
    from llmbench.backends import tensor_parallel
    from llmbench.backends.blocks import Unsupported
    from llmbench.distributed import native_load

    if info.local_rank == 0:
        source, conversion_seconds = resolve_local(settings.model.model_name_or_path)
    barrier()
    if info.local_rank != 0:
        source, conversion_seconds = resolve_local(settings.model.model_name_or_path)
    path = source.path if source.kind != "hub" else settings.model.model_name_or_path
    comm = tensor_parallel.communicator(info.rank, info.world_size, shared_memory)
    # Layer by layer where the checkpoint allows (each rank then holds its slice and one layer),
    # else the whole model on every rank, then cut.
    problem = native_load.stream_problem(settings, scheme, source, request)
    reason = native = prompt = None
    if problem is None:
        try:
            streamed = native_load.load_streamed(settings, scheme, source, conversion_seconds,
                                                 comm)
        except Unsupported as exc:
            streamed = None
            reason = str(exc)
        if isinstance(streamed, str):
            problem = streamed
        elif streamed is not None:
            loaded, prepared = streamed
            native = prepared.model
    if problem is not None:
        loaded, prepared, prompt, reason = _native_whole(settings, scheme, path, request,
                                                         comm, announce=info.rank == 0)
        if reason is None:
            native = getattr(prepared.model, "native", prepared.model)  # a multimodal runner's
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
            "applied": ("the checkpoint's INT4 weights loaded whole on every rank" if
                        loaded.quantized is not None else "quantized whole on every rank as "
                        "one process would" if problem is not None else "each layer quantized "
                        "whole on every rank as one process would, as it was read") +
                       ", then each rank cut its slices of the integers and scales",
            "weight_bytes_per_token": loaded.decode_weight_bytes})
    notes = []
    if problem is not None:
        notes.append(f"loading the whole model on every rank: {problem}")
    if request is not None:
        notes.append("a multimodal model loads whole on every rank; its language model runs "
                     "native, cut across the ranks; the encoders ("
                     f"{', '.join(multimodal_encoders(request))}) run whole on every rank")
    load_path = ("whole model per rank, cut by llmbench" if problem is not None
                 else native_load.LOAD_PATH)
    return (AutoTPModel(loaded=loaded, load_path=load_path, local_weight_bytes=local,
                        notes=notes), prepared, prompt, None)


def multimodal_encoders(request: Any) -> tuple[str, ...]:
    from llmbench.multimodal import LAYOUTS

    return LAYOUTS[request.family.model_type].encoders


def _native_whole(settings: Settings, scheme: Any, path: str, request: Any, comm: Any,
                  announce: bool) -> tuple[Any, Any, Any, str | None]:
    """load_native_tp's first part: (LoadedModel, PreparedModel native and uncut, the
    multimodal prompt or None, None), or (.., reason) when native does not run it. announce:
    print what a GPTQ/AWQ folder holds, as one process does (rank 0). comm: the ranks share
    round to nearest's clipping search through it (every rank quantizes the same model)."""
    from llmbench import backends

    if request is not None:
        from llmbench import multimodal
        from llmbench.generation import load_multimodal

        loaded, prompt = load_multimodal(settings, request)
        start = time.perf_counter()
        prepared = multimodal.prepare(settings, loaded, "native", place_weights=False,
                                      announce=False)
    else:
        from llmbench.models import load_model

        # quantization reads the fp32 weights; the model then runs in --dtype
        loaded = load_model(path, "float32" if scheme is not None else settings.model.dtype,
                            settings.model.config_file)
        prompt = None
        start = time.perf_counter()
        if loaded.quantized is not None:  # -m of a GPTQ/AWQ folder: its INT4 weights as they are
            from llmbench.quant.workflow import prepare_checkpoint_folder

            prepared = prepare_checkpoint_folder(settings, loaded, "native", announce=announce)
        elif scheme is not None:
            from llmbench.quant.rtn import search_shared
            from llmbench.quant.workflow import quantize_in_process

            # the whole model, as one process quantizes it (rank 0 says what ran, once cut)
            with search_shared(comm.rank, comm.world, comm.all_reduce):
                prepared = quantize_in_process(settings, loaded, scheme, "native",
                                               announce=False)
        else:
            prepared = backends.prepare(loaded.model, backend="native",
                                        dtype=settings.model.dtype,
                                        family=loaded.family.model_type,
                                        kv_cache_dtype=settings.model.kv_cache_dtype,
                                        place_weights=False)
    loaded.load_seconds += time.perf_counter() - start
    if prepared.backend != "native":
        return loaded, None, None, prepared.details["fallback_reason"].split(": this run is")[0]
    loaded.model = prepared.model
    return loaded, prepared, prompt, None


def _is_non_persistent(model: Any, name: str) -> bool:
    owner, leaf = _module_and_leaf(model, name)
    return leaf in owner._non_persistent_buffers_set


def quantize_rank(tp: AutoTPModel, scheme: Any, group_size: int) -> tuple[Any, Any]:
    """This rank's quantized projections: cut from a GPTQ/AWQ folder's own (-m of one; the
    weight-only flags then only choose how to compute, as single instance), or quantized from
    its float slice (--ipex-weight-only-quantization). group_size: the one the flags ask for (0:
    any). Returns (TPQuantization, scheme)."""
    import dataclasses

    from llmbench.quant import autotp as tp_quant

    if tp.checkpoint is None:
        quant = tp_quant.quantize_autotp(tp.sharded, scheme)
        if tp.language is not None:
            tp.language.write_back()  # a quantized lm_head, swapped on the view
        return quant, scheme
    qlinears, folder_scheme = tp.checkpoint
    if scheme is not None:
        if scheme.weight_dtype not in ("INT8", "INT4") or group_size not in (
                0, folder_scheme.group_size):
            raise UserError(f"-m {tp.loaded.source.display_name} is already a quantized "
                            f"checkpoint ({folder_scheme.describe()}): drop the quantization "
                            "flags, or pass only --ipex-weight-only-quantization [--weight-dtype "
                            "INT4] [--lowp-mode ...]")
        folder_scheme = dataclasses.replace(folder_scheme, lowp_mode=scheme.lowp_mode,
                                            act_quant_mode=scheme.act_quant_mode)
    quant = tp_quant.slice_checkpoint_autotp(tp.loaded.model, qlinears, folder_scheme)
    return quant, folder_scheme
