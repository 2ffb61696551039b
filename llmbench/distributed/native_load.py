"""`--autotp --backend native` from a local folder of safetensors files, a layer at a time.

The model is built on the meta device (no memory). Its small tensors (embedding, norms, conv
and SSM parameters, position tables) are read whole; then each decoder layer's projections are
read from the checkpoint, made the native layer (quantized, with the weight-only flags, from
the same fp32 values one process would quantize), cut to this rank's slice, and freed before
the next layer is read. A rank's peak memory is its slice plus one whole layer, where loading
the whole model first needed the whole model (and its native copies) on every rank.

What is not streamed (the caller loads the whole model and says why in the report): a hub id
or .bin files, a GPTQ/AWQ folder, GPTQ calibration (it runs the whole model), encoder-decoder
and multimodal models, remote-code families, and checkpoints whose tensor names are not the
model's (transformers renames some families' tensors at load)."""

from __future__ import annotations

import json
import mmap
import os
import re
import time
from pathlib import Path
from typing import Any

import torch

from llmbench.distributed.shards import weight_files
from llmbench.errors import UserError

LOAD_PATH = "meta+checkpoint, layer by layer, cut by llmbench"


# safetensors' dtype names (the file format's header)
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
           "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
           "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
           "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


class CheckpointReader:
    """Tensors by the model's names from a folder's safetensors files, each mapped on its own
    (safetensors' reader maps the whole file, and every page it touched would count in the
    rank's resident memory for as long as the file stays open).

    Checkpoint names are the model's after transformers' own renaming for the family
    (transformers.conversion_mapping: e.g. Mixtral's `block_sparse_moe.experts.<e>.w1`, `w3`
    and `w2` become `mlp.experts.gate_up_proj` and `down_proj`, stacked over the experts);
    of its operations, the stacking of numbered modules and the concatenation are done here,
    and `problem` names any other a model needs."""

    def __init__(self, files: list[Path], model: Any) -> None:
        self.raw: dict[str, tuple[Path, int, dict[str, Any]]] = {}
        for path in files:
            with open(path, "rb") as handle:
                size = int.from_bytes(handle.read(8), "little")
                try:
                    header = json.loads(handle.read(size))
                except ValueError as exc:
                    raise UserError(f"{path} is not a readable safetensors file "
                                    f"(its header: {exc})") from exc
            header.pop("__metadata__", None)
            # every tensor must lie inside the file (a copy cut short would fail to map)
            end = 8 + size + max((e["data_offsets"][1] for e in header.values()), default=0)
            if path.stat().st_size < end:
                raise UserError(f"{path} is cut short: {path.stat().st_size} bytes, its "
                                f"header needs {end}")
            for name, entry in header.items():
                self.raw[name] = (path, 8 + size, entry)
        self._handles: dict[Path, Any] = {}
        self.problem: str | None = None
        # the model's name -> the checkpoint's (a plain rename), or the converter and the
        # checkpoint names of each of its source patterns, by module number
        self.where: dict[str, Any] = {}
        renamings, converters = _conversions(model)
        state = model.state_dict()
        for key in self.raw:
            if not renamings and not converters:
                self.where[key] = key
                continue
            from transformers.core_model_loading import rename_source_key

            target, pattern = rename_source_key(key, renamings, converters,
                                                model.base_model_prefix, state)
            if pattern is None:
                self.where[target] = key
                continue
            converter = next(c for c in converters if pattern in c.source_patterns)
            ops = [type(op).__name__ for op in converter.operations]
            if any(op not in ("MergeModulelist", "Concatenate") for op in ops):
                self.problem = (f"transformers converts {key} to {target} with "
                                f"{', '.join(ops)}, which the layer-by-layer load does not do")
            found = re.search(re.escape(pattern).replace(r"\*", r"(\d+)"), key)
            number = int(found.group(1)) if found and found.groups() else 0
            entry = self.where.setdefault(target, (converter, {}))
            entry[1].setdefault(pattern, []).append((number, key))

    def read(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        recipe = self.where[name]
        if isinstance(recipe, str):
            return self._read(recipe, dtype)
        converter, by_pattern = recipe
        parts = [[self._read(key, dtype) for _, key in sorted(by_pattern[pattern])]
                 for pattern in converter.source_patterns if pattern in by_pattern]
        for op in converter.operations:
            if type(op).__name__ == "MergeModulelist":  # numbered modules -> one stacked tensor
                parts = [[torch.stack(part, dim=op.dim)] for part in parts]
            else:  # Concatenate: the source patterns' tensors, in their order
                parts = [[torch.cat([part[0] for part in parts], dim=op.dim)]]
        return parts[0][0]

    def _read(self, key: str, dtype: torch.dtype) -> torch.Tensor:
        path, start, entry = self.raw[key]
        if entry["dtype"] not in _DTYPES:
            raise UserError(f"weight {key} is stored as {entry['dtype']}, which llmbench "
                            "does not read")
        if path not in self._handles:
            self._handles[path] = open(path, "rb")  # noqa: SIM115 (closed by close())
        begin, end = entry["data_offsets"]
        stored = _DTYPES[entry["dtype"]]
        if end == begin:
            return torch.empty(entry["shape"], dtype=stored).to(dtype)
        # A private mapping of just this tensor's bytes: it maps the page cache's pages (no
        # copy), and is unmapped when the tensor is freed, so only what the rank still holds
        # counts in its resident memory.
        offset = start + begin
        aligned = offset - offset % mmap.ALLOCATIONGRANULARITY
        mapping = mmap.mmap(self._handles[path].fileno(), end - begin + offset - aligned,
                            access=mmap.ACCESS_COPY, offset=aligned)
        raw = torch.frombuffer(mapping, dtype=torch.uint8, offset=offset - aligned,
                               count=end - begin)
        if (offset - aligned) % stored.itemsize:  # not on its element size: copied out
            raw = raw.clone()
        value = raw.view(stored).view(entry["shape"])
        return value.to(dtype) if value.is_floating_point() else value

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()


def _conversions(model: Any) -> tuple[list[Any], list[Any]]:
    """transformers' renamings and converters of this model's checkpoint names (none where
    this transformers has no such mapping)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming
    except ImportError:
        return [], []
    transforms = get_model_conversion_mapping(model)
    return ([t for t in transforms if isinstance(t, WeightRenaming)],
            [t for t in transforms if isinstance(t, WeightConverter)])


def _owner(model: Any, name: str) -> tuple[Any, str]:
    owner_name, _, leaf = name.rpartition(".")
    return (model.get_submodule(owner_name) if owner_name else model), leaf


class LayerStream:
    """Fills a meta HF model from its checkpoint as NativeModel takes it (the `stream` of
    NativeModel): `before` reads a layer's projection weights, `after` quantizes the native
    layer (with a scheme), cuts it to this rank's slice (tensor_parallel.Cutter) and puts
    the HF weights back on the meta device."""

    def __init__(self, model: Any, reader: CheckpointReader, comm: Any, scheme: Any,
                 dtype: torch.dtype) -> None:
        self.model, self.reader, self.comm, self.scheme, self.dtype = (
            model, reader, comm, scheme, dtype)
        # every name of each tensor (tied weights have two), by the tensor's id
        self.names: dict[int, list[str]] = {}
        for name, tensor in [*model.named_parameters(remove_duplicate=False),
                             *model.named_buffers(remove_duplicate=False)]:
            self.names.setdefault(id(tensor), []).append(name)
        self.output = model.get_output_embeddings()
        self.cutter: Any = None
        # With a scheme, the ranks share each weight's clipping search (rtn.search_shared): an
        # all-reduce per weight, so every rank must quantize every layer, in the same order.
        # A cut refused on this rank alone (a narrow expert leaving it no units) is then held
        # until every layer is quantized, and raised then.
        self.shared = scheme is not None and comm.world > 1
        self.refused: Exception | None = None
        self.formats: dict[str, Any] = {}  # kind and int8 compute of each quantized weight
        self.replaced = 0

    # ---- reading and freeing --------------------------------------------------------------

    def uncovered(self) -> list[str]:
        """Tensors of the model the checkpoint has under none of their names (persistent
        buffers the model computes itself are not asked for)."""
        return [names[0] for names in self.names.values()
                if not any(name in self.reader.where for name in names)
                and self._is_parameter(names[0])]

    def _is_parameter(self, name: str) -> bool:
        owner, leaf = _owner(self.model, name)
        return leaf in owner._parameters

    def fill(self, name: str, dtype: torch.dtype) -> None:
        """Read one tensor (under whichever of its names the checkpoint has) into every module
        that holds it, if it is still on the meta device."""
        owner, leaf = _owner(self.model, name)
        tensor = getattr(owner, leaf)
        if not tensor.is_meta:
            return
        found = self._stored_name(tensor)
        value = self.reader.read(found, dtype if tensor.is_floating_point() else tensor.dtype)
        if tuple(value.shape) != tuple(tensor.shape):
            raise UserError(f"weight {found} has shape {tuple(value.shape)} in the checkpoint, "
                            f"{tuple(tensor.shape)} in the model")
        if isinstance(tensor, torch.nn.Parameter):
            value = torch.nn.Parameter(value, requires_grad=False)
        names = self.names.pop(id(tensor))
        for alias in names:
            holder, key = _owner(self.model, alias)
            (holder._parameters if key in holder._parameters else holder._buffers)[key] = value
        self.names[id(value)] = names

    def _stored_name(self, tensor: torch.Tensor) -> str:
        """The name among the tensor's that the checkpoint has it under."""
        return next(n for n in self.names[id(tensor)] if n in self.reader.where)

    def fill_small(self) -> None:
        """Everything but the projections (nn.Linear weights and stacked expert tensors),
        which the layers read one at a time."""
        for name, tensor in [*self.model.named_parameters(), *self.model.named_buffers()]:
            owner, _ = _owner(self.model, name)
            if tensor.is_meta and not isinstance(owner, torch.nn.Linear) and not (
                    type(owner).__name__.endswith("Experts")):
                self.fill(name, self.dtype)

    def _weights(self, source: Any) -> list[tuple[str, bool]]:
        """(tensor name, quantized by the scheme) of one blocks.Source."""
        from llmbench.quant.apply import is_quantized_linear

        if source.expert is not None:  # a stacked expert tensor: every expert quantized
            return [(source.module, self.scheme is not None)]
        module = self.model.get_submodule(source.module)
        quantized = self.scheme is not None and is_quantized_linear(
            module, module is self.output, self.scheme.lm_head)
        return [(f"{source.module}.{leaf}", quantized)
                for leaf, _ in module.named_parameters(recurse=False)]

    def before(self, sources: list[Any]) -> None:
        """Read these sources' weights: in fp32 where the scheme quantizes them (one process
        quantizes the fp32 model too), else in the model's dtype."""
        for source in sources:
            for name, quantized in self._weights(source):
                self.fill(name, torch.float32 if quantized else self.dtype)

    def release(self, sources: list[Any]) -> None:
        """Put these sources' HF weights back on the meta device (the native layer holds what
        it needs); the embedding an lm_head is tied to stays."""
        for source in sources:
            for name, _ in self._weights(source):
                owner, leaf = _owner(self.model, name)
                tensor = getattr(owner, leaf)
                if tensor.is_meta or tensor is self.model.get_input_embeddings().weight:
                    continue
                empty = torch.nn.Parameter(torch.empty_like(tensor, device="meta"),
                                           requires_grad=False)
                names = self.names.pop(id(tensor))
                for alias in names:
                    holder, key = _owner(self.model, alias)
                    holder._parameters[key] = empty
                self.names[id(empty)] = names

    # ---- NativeModel's hooks ---------------------------------------------------------------

    def after(self, native: Any, index: int, layer: Any, sources: list[Any]) -> None:
        from llmbench.backends.blocks import Unsupported
        from llmbench.backends.tensor_parallel import Cutter

        if self.scheme is not None:
            self._quantize(native, sources, lambda convert: native.map_layer(index, layer,
                                                                             convert))
        for _, owner, attr in [*layer.projections(index), ("router", layer, "router")]:
            setattr(owner, attr, self._in_dtype(getattr(owner, attr)))
        try:
            if self.refused is None:
                if self.cutter is None:
                    # (encoder-decoder and multimodal models, the ones with cross-attention,
                    # are not streamed)
                    self.cutter = Cutter(native, self.comm, cross=False, first=layer)
                self.cutter.layer(index, layer)
        except Unsupported as exc:
            if not self.shared:
                raise
            self.refused = exc
        self.release(sources)

    def finish(self, native: Any) -> None:
        """The lm_head (quantized as one process would, then cut), once NativeModel is built."""
        sources = native.sources["lm_head"]
        if self.scheme is not None:
            def convert_head(convert: Any) -> None:
                native.lm_head = convert("lm_head", native.lm_head)
            self._quantize(native, sources, convert_head)
        if self.refused is not None:
            raise self.refused
        native.lm_head = self._in_dtype(native.lm_head)
        self.cutter.finish()
        self.release(sources)

    def _quantize(self, native: Any, sources: list[Any], install: Any) -> None:
        from llmbench.quant.apply import NativeConverter, projection_scheme, ready_to_run
        from llmbench.quant.rtn import quantize_weight, search_shared

        found = {}
        # (one rank: search_shared leaves the search as it is)
        with search_shared(self.comm.rank, self.comm.world, self.comm.all_reduce):
            for source in sources:
                if source.name in found:
                    continue
                if source.expert is not None:
                    found[source.name] = quantize_weight(
                        self._fp32(source.module)[source.expert], None, self.scheme)
                    continue
                module = self.model.get_submodule(source.module)
                if not self._weights(source)[0][1]:  # not quantized (too narrow)
                    continue
                found[source.name] = quantize_weight(
                    self._fp32(f"{source.module}.weight"),
                    None if getattr(module, "bias", None) is None
                    else self._fp32(f"{source.module}.bias"),
                    projection_scheme(self.scheme, module is self.output))
        found = ready_to_run(found, self.scheme, _dtype_name(self.dtype))
        self.formats.update({name: _Format(q.kind, getattr(q, "act_qmax", 0.0))
                             for name, q in found.items()})
        convert = NativeConverter(native, found)
        install(convert)
        self.replaced += convert.replaced

    def _fp32(self, name: str) -> torch.Tensor:
        """A weight as the quantizer reads it: fp32 from the checkpoint (an lm_head tied to the
        embedding holds the model's dtype, as the embedding does)."""
        owner, leaf = _owner(self.model, name)
        tensor = getattr(owner, leaf)
        if tensor.dtype == torch.float32:
            return tensor.detach()
        return self.reader.read(self._stored_name(tensor), torch.float32)

    def _in_dtype(self, linear: Any) -> Any:
        """A float projection left unquantized (or a router), in the model's dtype as one
        process has it."""
        from llmbench.backends.native import Linear

        if isinstance(linear, Linear) and linear.weight.dtype != self.dtype:
            return Linear(linear.weight.to(self.dtype), linear.bias)
        return linear


class _Format:
    """What quantization_details reads of a quantized projection (not its weights)."""

    def __init__(self, kind: str, act_qmax: float) -> None:
        self.kind, self.act_qmax = kind, act_qmax


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def stream_problem(settings: Any, scheme: Any, source: Any, request: Any) -> str | None:
    """Why this model is not loaded layer by layer (None: it is)."""
    from llmbench.models import REMOTE_CODE_FAMILIES, load_config
    from llmbench.quant.checkpoint_settings import folder_quantization

    if os.environ.get("LLMBENCH_TP_LOAD") == "whole":  # benchmarks/native_tp.py's A/B
        return "LLMBENCH_TP_LOAD=whole"
    if request is not None:
        return "a multimodal model is loaded whole"
    if source.kind == "hub":
        return "no local checkpoint files (a hub id: pass --shard-model to make a local shard)"
    files = weight_files(Path(source.path))
    if not files or any(path.suffix != ".safetensors" for path in files):
        return "the checkpoint is not in safetensors files"
    if folder_quantization(source.path) is not None:
        return "a GPTQ/AWQ folder is converted whole, then cut per rank"
    if scheme is not None and scheme.method == "gptq":
        return "GPTQ calibration runs the whole model"
    _, family = load_config(source, settings.model.config_file)
    if family.seq2seq:
        return "an encoder-decoder model is loaded whole"
    if family.model_type in REMOTE_CODE_FAMILIES:
        return "a remote-code model is loaded whole"
    return None


def load_streamed(settings: Any, scheme: Any, source: Any, conversion_seconds: float,
                  comm: Any) -> tuple[Any, Any] | str:
    """(LoadedModel, PreparedModel native and cut to this rank), or why the checkpoint can't
    be streamed (its names are not the model's). Raises blocks.Unsupported where native does
    not run this model (the caller runs stock AutoTP)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from llmbench.backends import PreparedModel, native
    from llmbench.models import LoadedModel, load_config, load_tokenizer
    from llmbench.quant.apply import lowp_description, quantization_details
    from llmbench.quant.linears import LOWP_DTYPES

    config, family = load_config(source, settings.model.config_file)
    dtype = getattr(torch, settings.model.dtype)
    start = time.perf_counter()
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()  # from_pretrained ties them, from_config doesn't
    model.eval()
    reader = CheckpointReader(weight_files(Path(source.path)), model)
    stream = LayerStream(model, reader, comm, scheme, dtype)
    try:
        if reader.problem is not None:
            return reader.problem
        missing = stream.uncovered()
        if missing:
            shown = ", ".join(missing[:3]) + (" ..." if len(missing) > 3 else "")
            return f"the checkpoint's tensor names don't cover the model's ({shown})"
        params = list(model.parameters())
        weight_bytes = sum(p.numel() * p.element_size() for p in params)
        stream.fill_small()
        built = native.NativeModel(model, settings.model.kv_cache_dtype, stream=stream)
        stream.finish(built)
    finally:
        reader.close()
    details = native.details(built, settings.model.dtype)
    if scheme is not None:
        if scheme.lowp_mode in LOWP_DTYPES and comm.rank == 0:
            print(f"note: {lowp_description(scheme.lowp_mode)}", flush=True)
        details["quantization"] = quantization_details(stream.formats, scheme) | {
            "native_projections_replaced": stream.replaced}
    embedding = model.get_input_embeddings().weight
    tied = stream.output is not None and stream.output.weight is embedding
    loaded = LoadedModel(
        model=built, tokenizer=load_tokenizer(source, False), config=config, family=family,
        source=source,
        dtype=settings.model.dtype, load_seconds=time.perf_counter() - start,
        conversion_seconds=conversion_seconds, num_parameters=sum(p.numel() for p in params),
        weight_bytes=weight_bytes,
        decode_weight_bytes=weight_bytes - (0 if tied else embedding.numel()
                                            * embedding.element_size()))
    return loaded, PreparedModel(model=built, backend="native", details=details)
