"""Putting quantized projections into a model, and the saved format.

Quantized projections are keyed by their Hugging Face module name ("model.layers.0.self_attn.
q_proj", "lm_head"). They go into a model one of two ways:
- `--backend native` on a llama-like family: NativeModel.map_linears, the fused qkv / gate_up
  projections built by concatenating the quantized parts along the output dimension;
- anything else: each nn.Linear module swapped for a QuantizedLinear calling the same kernels.

Saved: `best_model.safetensors` (the quantized tensors, "<module>.<tensor>", plus any float
weight a method changed, e.g. SmoothQuant's norms, as "float.<parameter>") and
`best_model.json` (format, scheme, per-projection layout, the source model's identity, quality).
Both are written to temp files and renamed at the end, so a failed run leaves neither.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from llmbench import kernels
from llmbench.atomic import atomic_file, write_text
from llmbench.errors import UserError
from llmbench.kernels import int8_act
from llmbench.quant.linears import (
    LINEAR_CLASSES,
    LOWP_DTYPES,
    FloatLinear,
    Int4Linear,
    Int8GroupLinear,
    Int8Linear,
    LowpLinear,
    NF4Linear,
    QuantizedLinear,
    fuse,
    take_rows,
)
from llmbench.quant.rtn import quantize_weight
from llmbench.quant.scheme import MIN_IN_FEATURES, Scheme, act_levels_for

FORMAT = "llmbench.quantized/1"
MODEL_FILE = "best_model.safetensors"
META_FILE = "best_model.json"
FLOAT_PREFIX = "float."
# Config keys that say how a model was loaded or saved, not what it is.
_VOLATILE_CONFIG_KEYS = {"transformers_version", "torch_dtype", "dtype", "_name_or_path",
                         "_commit_hash", "_attn_implementation", "_attn_implementation_internal",
                         "quantization_config", "use_cache", "output_attentions",
                         "output_hidden_states", "return_dict"}


def linear_modules(model: torch.nn.Module, lm_head: bool = True) -> dict[str, torch.nn.Linear]:
    """The nn.Linear modules quantization covers, by name: every one at least MIN_IN_FEATURES
    wide (and, unless lm_head, not the output projection)."""
    output = model.get_output_embeddings()
    return {name: module for name, module in model.named_modules()
            if is_quantized_linear(module, module is output, lm_head)}


def is_quantized_linear(module: Any, is_output: bool, lm_head: bool) -> bool:
    """Whether weight-only quantization covers this module (linear_modules' rule)."""
    return (isinstance(module, torch.nn.Linear) and module.in_features >= MIN_IN_FEATURES
            and (lm_head or not is_output))


def projection_scheme(scheme: Scheme, is_output: bool) -> Scheme:
    """The scheme one projection is quantized with: the scheme itself, but for the output
    projection (lm_head) of a 4-bit scheme INT8 per channel: it is the projection most
    sensitive to 4-bit error (llama.cpp likewise keeps output.weight at 6+ bits)."""
    if is_output and scheme.weight_dtype in ("INT4", "NF4"):
        return Scheme(scheme.method, "INT8", -1, True)
    return scheme


def quantize_rtn(model: torch.nn.Module, scheme: Scheme) -> dict[str, Any]:
    """Every projection in the scheme's format (the lm_head per projection_scheme), and every
    expert matrix of a mixture-of-experts model kept in 3-D tensors (named
    "<parameter>.<expert>", see backends.blocks.expert_matrices)."""
    from llmbench.backends.blocks import expert_matrices
    from llmbench.progress import bar

    output = model.get_output_embeddings()
    modules = linear_modules(model, scheme.lm_head)
    found = {name: quantize_weight(module.weight, module.bias,
                                   projection_scheme(scheme, module is output))
             for name, module in bar(modules.items(), f"quantizing to {scheme.weight_dtype}",
                                     total=len(modules), unit="linear")}
    for name, weight in expert_matrices(model).items():
        found[name] = quantize_weight(weight, None, scheme)
    return found


# ---- identity of the source model ----------------------------------------------------------

def config_sha256(config: Any) -> str:
    data = {k: v for k, v in config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def weights_fingerprint(model: torch.nn.Module) -> str:
    """A hash of a strided sample of every linear weight, rounded to bf16 so an fp32 and a bf16
    load of the same model agree. Taken before any module is swapped."""
    digest = hashlib.sha256()
    for name, module in sorted(linear_modules(model).items()):
        flat = module.weight.detach().reshape(-1)
        step = max(1, flat.numel() // 4096)
        sample = flat[::step][:4096].to(torch.bfloat16).view(torch.int16)
        digest.update(name.encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()


def model_identity(loaded: Any) -> dict[str, Any]:
    return {"name": loaded.source.display_name, "kind": loaded.source.kind,
            "path": loaded.source.path, "gguf_sha256": loaded.source.gguf_sha256,
            "family": loaded.family.model_type, "config_sha256": config_sha256(loaded.config),
            "weights_fingerprint": weights_fingerprint(loaded.model)}


def check_identity(saved: dict[str, Any], current: dict[str, Any], path: str) -> None:
    for key, what in (("config_sha256", "config"), ("weights_fingerprint", "weights")):
        if saved.get(key) != current.get(key):
            raise UserError(f"{path} was quantized from another model ({saved.get('name')}, "
                            f"{what} differ from {current.get('name')}): quantize this model "
                            "again, or pass the -m it was made from")


# ---- installing ------------------------------------------------------------------------------

def install_hf(model: torch.nn.Module, qlinears: dict[str, Any]) -> None:
    """Swap each quantized nn.Linear in. An expert matrix of a 3-D expert tensor has no module
    to swap: its dequantized weights are written into the tensor instead, so stock computes
    the quantized model's numbers (from float storage: no memory saved there)."""
    modules = dict(model.named_modules())
    for name, linear in qlinears.items():
        if name in modules:
            model.set_submodule(name, QuantizedLinear(linear, modules[name].weight.dtype))
            continue
        parameter, expert = name.rsplit(".", 1)
        tensor = model.get_parameter(parameter)
        with torch.no_grad():
            tensor[int(expert)] = linear.dequantize().to(tensor.dtype)


def install_native(native: Any, qlinears: dict[str, Any]) -> int:
    """Map quantized projections into a NativeModel through its `sources` (which HF modules,
    which rows, in which order: llmbench.backends.blocks); returns how many projections it
    replaced. A projection whose parts are not all quantized stays float."""
    convert = NativeConverter(native, qlinears)
    native.map_linears(convert)
    return convert.replaced


class NativeConverter:
    """What NativeModel.map_linears / map_layer call for each projection: the quantized one
    fused from `qlinears` by the projection's sources, or the float one where they are not all
    quantized. `replaced` counts the projections replaced."""

    def __init__(self, native: Any, qlinears: dict[str, Any]) -> None:
        self.native, self.qlinears, self.replaced = native, qlinears, 0

    def __call__(self, name: str, linear: Any) -> Any:
        sources = self.native.sources[name]
        if not all(source.name in self.qlinears for source in sources):
            return linear
        self.replaced += 1
        return fuse([self.qlinears[source.name] if source.rows is None
                     else take_rows(self.qlinears[source.name], source.rows)
                     for source in sources])


def float_bytes_outside(model: torch.nn.Module, swapped: set[str]) -> int:
    """Bytes of float parameters a decode step reads that are not in swapped modules (the input
    embedding is read one row per token, so it doesn't count)."""
    embedding = model.get_input_embeddings().weight
    total = 0
    for name, param in model.named_parameters():
        owner = name.rsplit(".", 1)[0]
        if owner in swapped or param.data_ptr() == embedding.data_ptr():
            continue
        total += param.numel() * param.element_size()
    return total


def set_float_tensors(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy float parameters a method changed (SmoothQuant's norms) into the model."""
    params = dict(model.named_parameters())
    for name, tensor in tensors.items():
        if name not in params or params[name].shape != tensor.shape:
            raise UserError(f"saved float tensor {name} does not match the model")
        with torch.no_grad():
            params[name].copy_(tensor.to(params[name].dtype))


def with_compute(linear: Any, scheme: Scheme) -> Any:
    """One projection set to compute as --lowp-mode says. INT8: the INT8 and INT4 projections
    quantize their activations to int8 at run time as --act-quant-mode says (check_lowp_mode
    allows no other weights); per row symmetric on INT8 weights is the int8 kernels' exact
    int8 x int8 path (act_qmax), every other case hands the kernels the int8 levels
    (ActLevels). BF16/FP16: wrapped in LowpLinear (bf16/fp16 matmul on the dequantized weights).
    Otherwise fp32 activations. Returns the projection to run (the same object unless
    wrapped)."""
    if isinstance(linear, LowpLinear):
        linear = linear.inner
    int8_compute = scheme.lowp_mode == "INT8"
    if isinstance(linear, Int8Linear):
        exact = int8_compute and scheme.act_quant_mode == "PER_BATCH_SYM"
        linear.act_qmax = int8_act.INT8_MAX if exact else 0.0
        linear.act_levels = (act_levels_for(scheme.act_quant_mode, -1)
                             if int8_compute and not exact else None)
    elif isinstance(linear, Int4Linear):
        linear.act_levels = (act_levels_for(scheme.act_quant_mode, linear.group_size)
                             if int8_compute else None)
    if scheme.lowp_mode in LOWP_DTYPES and linear.kind != "float":
        return LowpLinear(linear, scheme.lowp_mode)
    return linear


def set_compute(qlinears: dict[str, Any], scheme: Scheme) -> dict[str, Any]:
    """with_compute for every projection; returns what to run (save the projections given,
    never the returned ones: a LowpLinear is a way of computing, not a stored format)."""
    return {name: with_compute(linear, scheme) for name, linear in qlinears.items()}


# The same command line means another computation than in IPEX's scripts: say so in the report.
AUTO_LOWP_NOTE = ("AUTO: fp32 activations. IPEX's scripts took AUTO as int8 activations for "
                  "INT4 weights (and GPTQ checkpoints) and bf16 for INT8 weights; --lowp-mode "
                  "INT8 or BF16 asks for those")


def lowp_description(lowp_mode: str) -> str:
    from llmbench.environment import has_native_bf16, has_native_fp16

    name = "bf16" if lowp_mode == "BF16" else "fp16"
    native = has_native_bf16() if lowp_mode == "BF16" else has_native_fp16()
    how = ("native on this CPU" if native else
           f"emulated: this CPU has no {name} arithmetic, torch widens it")
    return (f"--lowp-mode {lowp_mode}: weights dequantized to {name} and multiplied with {name} "
            f"activations by torch's {name} matmul ({how}); no weight-streaming kernel, the "
            "model runs torch ops")


def compute_description(qlinears: dict[str, Any], scheme: Scheme) -> str | None:
    """What the report's quantization.compute says about int8 activations (None: there are
    none), by projection kind."""
    exact = sorted({q.kind for q in qlinears.values()
                    if q.kind == "w8a8" or getattr(q, "act_qmax", 0.0)})
    parts = [f"{'/'.join(exact)} projections: {int8_act.describe()}"] if exact else []
    if scheme.lowp_mode in LOWP_DTYPES:
        parts.append(lowp_description(scheme.lowp_mode))
    by_kind: dict[str, set[str]] = {}
    int4_kernels: dict[str, int] = {}  # projections per kernel of their prompt rows
    for q in qlinears.values():
        spec = getattr(q, "act_levels", None)
        if spec is not None:
            by_kind.setdefault(q.kind, set()).add(spec.describe())
            if q.kind == "int4":
                kernel = _int4_act_kernel(q, spec)
                int4_kernels[kernel] = int4_kernels.get(kernel, 0) + 1
    for kind, specs in sorted(by_kind.items()):
        levels = (f"{kind} projections: {scheme.act_quant_mode} int8 activations "
                  f"({'; '.join(sorted(specs))}), ")
        if kind == "int4" and set(int4_kernels) != {"levels"}:
            parts.append(levels + "; ".join(
                f"{count} of them: {INT4_ACT_KERNELS[kernel]}"
                for kernel, count in sorted(int4_kernels.items())))
        else:
            parts.append(levels + f"their int8 levels through the weight-only kernels "
                         f"({kernels.isa()}): fp32 or int16 arithmetic, no int8 speed-up")
    return " | ".join(parts) or None


INT4_ACT_KERNELS = {
    "amx": "int8 x int4 -> int32 per group on AMX-INT8 tiles for prompts and batches "
           "(llmbench kernels), u8 x s8 dot products for one row",
    "u8s8": "int8 x int4 -> int32 per group, u8 x s8 dot products (llmbench kernels)",
    "levels": "their int8 levels through the weight-only kernels, fp32 or int16 arithmetic",
}


def _int4_act_kernel(q: Any, spec: Any) -> str:
    """Which kernel an int4 projection's int8-activation rows run on (INT4_ACT_KERNELS)."""
    k = getattr(q, "padded_in", None)
    if not kernels.available() or k is None:
        return "levels"
    rows = max(kernels.amx_rows(), 2)
    return str(kernels.compiled().i4_act_kernel(rows, k, q.group_size, spec.sym, spec.block))


def quantization_details(qlinears: dict[str, Any], scheme: Scheme) -> dict[str, Any]:
    """The report's `quantization` section: the scheme, how many projections, their formats,
    and how they compute (shared by the single-instance and the AutoTP benchmarks)."""
    kinds = sorted({q.kind for q in qlinears.values()})
    details: dict[str, Any] = {"scheme": scheme.to_dict(), "description": scheme.describe(),
                               "quantized_projections": len(qlinears), "formats": kinds}
    compute = compute_description(qlinears, scheme)
    if compute is not None:
        details["compute"] = compute
    if scheme.lowp_mode == "AUTO" and scheme.weight_dtype in ("INT8", "INT4"):
        details["lowp_mode"] = AUTO_LOWP_NOTE
    pure_torch = [k for k in kinds if k.split("-")[0] in ("nf4", "fp8", "int8g")]
    if pure_torch:
        details["note"] = (f"{', '.join(pure_torch)} weights are dequantized in pure torch on "
                           "every call (no kernel): correct, not fast")
    return details


def ready_to_run(qlinears: dict[str, Any], scheme: Scheme, dtype: str) -> dict[str, Any]:
    """The projections as a model in `dtype` runs them: fallback (float) projections in that
    dtype, each set to compute as --lowp-mode says (set_compute)."""
    if dtype == "bfloat16":
        qlinears = {n: q.to_bf16() if isinstance(q, FloatLinear) else q
                    for n, q in qlinears.items()}
    return set_compute(qlinears, scheme)


def prepare_quantized(loaded: Any, qlinears: dict[str, Any], *, backend: str, dtype: str,
                      kv_cache_dtype: str, scheme: Scheme,
                      float_overrides: dict[str, torch.Tensor] | None = None) -> Any:
    """The loaded float model with its projections replaced, on `backend` (native or stock).
    Returns a backends.PreparedModel whose details describe the quantization."""
    from llmbench import backends

    if backend == "ipex":
        raise UserError("quantized models run on --backend stock or native here; IPEX's own "
                        "quantization path is not wired in")
    model = loaded.model
    set_float_tensors(model, float_overrides or {})
    qlinears = ready_to_run(qlinears, scheme, dtype)
    if scheme.lowp_mode in LOWP_DTYPES:
        print(f"note: {lowp_description(scheme.lowp_mode)}", flush=True)
    swapped = set(qlinears)
    stock_bytes = float_bytes_outside(model, swapped) + sum(q.nbytes for q in qlinears.values())
    prepared = backends.prepare(model, backend=backend, dtype=dtype, place_weights=False,
                                family=loaded.family.model_type, kv_cache_dtype=kv_cache_dtype)
    details = quantization_details(qlinears, scheme)
    if prepared.backend == "native":
        details["native_projections_replaced"] = install_native(prepared.model, qlinears)
        for prefix, module in prepared.model.stock_modules.items():  # e.g. T5's encoder
            install_hf(module, {name[len(prefix) + 1:]: linear for name, linear in qlinears.items()
                                if name.startswith(prefix + ".")})
        weight_bytes = prepared.model.weight_bytes
    else:
        install_hf(prepared.model, qlinears)
        weight_bytes = stock_bytes
    details["weight_bytes_per_token"] = weight_bytes
    loaded.decode_weight_bytes = weight_bytes
    prepared.details.update({"quantization": details, "weight_bytes_per_token": weight_bytes})
    return prepared


# ---- saving and loading ----------------------------------------------------------------------

def _layout(linear: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {"kind": linear.kind, "in_features": linear.in_features,
                             "out_features": linear.out_features}
    if isinstance(linear, Int4Linear | NF4Linear | Int8GroupLinear):
        entry["group_size"] = linear.group_size
    return entry


def save(output_dir: str | Path, qlinears: dict[str, Any], scheme: Scheme,
         identity: dict[str, Any], quality: dict[str, Any] | None = None,
         float_overrides: dict[str, torch.Tensor] | None = None,
         extra: dict[str, Any] | None = None) -> Path:
    """Write best_model.safetensors and best_model.json atomically; returns the model path."""
    from safetensors.torch import save_file

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for name, linear in qlinears.items():
        for key, tensor in linear.tensors().items():
            tensors[f"{name}.{key}"] = tensor.contiguous()
    for name, tensor in (float_overrides or {}).items():
        tensors[f"{FLOAT_PREFIX}{name}"] = tensor.detach().float().contiguous()
    meta = {"format": FORMAT, "scheme": scheme.to_dict(), "description": scheme.describe(),
            "source_model": identity, "layout": {n: _layout(q) for n, q in qlinears.items()},
            "float_tensors": sorted(float_overrides or {}),
            "weight_bytes": sum(q.nbytes for q in qlinears.values()),
            "quality": quality, **(extra or {})}
    with atomic_file(out / MODEL_FILE) as weights:
        save_file(tensors, str(weights), metadata={"format": FORMAT})
    write_text(out / META_FILE, json.dumps(meta, indent=1, default=str) + "\n")
    return out / MODEL_FILE


def resolve_model_path(model_path: str | Path) -> Path:
    """--quantized-model-path as the examples write it: a folder, best_model.safetensors, or
    IPEX's best_model.pt (a TorchScript file we don't write): a .pt/.bin path that doesn't exist
    but has our best_model.safetensors beside it means that one, with a note saying so."""
    path = Path(model_path)
    if path.is_dir():
        return path / MODEL_FILE
    if not path.exists() and path.suffix in (".pt", ".pth", ".bin"):
        ours = path.with_name(MODEL_FILE)
        if ours.is_file():
            print(f"note: --quantized-model-path {path}: IPEX's TorchScript {path.name} is not "
                  f"made here; using {ours}, which run.py / run_quantization.py saved",
                  flush=True)
            return ours
        raise UserError(f"--quantized-model-path {path}: no such file (llmbench saves "
                        f"{MODEL_FILE} + {META_FILE}; IPEX's TorchScript .pt files don't load "
                        "here)")
    return path


def meta_path_for(model_path: str | Path) -> Path:
    path = Path(model_path)
    if path.is_dir():
        path = path / MODEL_FILE
    return path.with_suffix(".json")


def load(model_path: str | Path) -> tuple[dict[str, Any], Scheme, dict[str, Any],
                                          dict[str, torch.Tensor]]:
    """Read a saved quantized model: (projections by module name, scheme, metadata, float
    tensors). Refuses files that aren't ours or don't agree with their metadata."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = resolve_model_path(model_path)
    meta_file = meta_path_for(path)
    if not path.is_file():
        raise UserError(f"--quantized-model-path {path}: no such file")
    if not meta_file.is_file():
        raise UserError(f"--quantized-model-path {path}: its scheme file {meta_file.name} is "
                        "missing")
    try:
        meta = json.loads(meta_file.read_text())
        tensors = load_file(str(path))
    except (OSError, json.JSONDecodeError, SafetensorError) as exc:
        raise UserError(f"cannot read the quantized model {path}: {exc}") from exc
    if meta.get("format") != FORMAT:
        raise UserError(f"{meta_file} is not an llmbench quantized model (format "
                        f"{meta.get('format')!r})")
    scheme = Scheme.from_dict(meta["scheme"])
    qlinears = {}
    for name, entry in meta["layout"].items():
        parts = {key[len(name) + 1:]: t for key, t in tensors.items()
                 if key.startswith(name + ".") and "." not in key[len(name) + 1:]}
        qlinears[name] = build_linear(entry, parts, name)
    floats = {key[len(FLOAT_PREFIX):]: t for key, t in tensors.items()
              if key.startswith(FLOAT_PREFIX)}
    return qlinears, scheme, meta, floats


def build_linear(entry: dict[str, Any], parts: dict[str, torch.Tensor], name: str) -> Any:
    kind = entry["kind"]
    if kind not in LINEAR_CLASSES:
        raise UserError(f"saved projection {name} has unknown format {kind!r}")
    try:
        if kind == "int4":
            linear = Int4Linear(parts["qweight"], parts["scales"], parts["zeros"],
                                entry["group_size"], entry["in_features"], parts.get("bias"),
                                parts.get("perm"))
        elif kind == "nf4":
            linear = NF4Linear(parts["qweight"], parts["scales"], entry["group_size"],
                               entry["in_features"], parts.get("bias"))
        elif kind == "float":
            linear = FloatLinear(parts["weight"], parts.get("bias"))
        elif kind == "int8g":
            linear = Int8GroupLinear(parts["qweight"], parts["scales"], parts.get("zeros"),
                                     entry["group_size"], entry["in_features"],
                                     parts.get("bias"))
        elif kind == "w8a8":
            linear = LINEAR_CLASSES[kind](parts["qweight"], parts["scales"], parts["act_scale"],
                                          parts.get("bias"))
        elif kind == "int8":
            linear = LINEAR_CLASSES[kind](parts["qweight"], parts["scales"], parts.get("zeros"),
                                          parts.get("bias"))
        else:
            linear = LINEAR_CLASSES[kind](parts["qweight"], parts["scales"], parts.get("bias"))
    except KeyError as exc:
        raise UserError(f"saved projection {name} lacks its tensor {exc}") from exc
    if (linear.out_features, linear.in_features) != (entry["out_features"],
                                                     entry["in_features"]):
        raise UserError(f"saved projection {name} does not match its recorded shape")
    return linear


def check_against_model(qlinears: dict[str, Any], model: torch.nn.Module, source: str) -> None:
    """Every quantized projection must name a linear (or an expert matrix) of the model with
    the same shape."""
    from llmbench.backends.blocks import expert_matrices

    modules = dict(model.named_modules())
    experts = expert_matrices(model) if any(name not in modules for name in qlinears) else {}
    for name, linear in qlinears.items():
        module = modules.get(name)
        if isinstance(module, torch.nn.Linear):
            shape = (module.out_features, module.in_features)
        elif name in experts:
            shape = tuple(experts[name].shape)
        else:
            raise UserError(f"{source}: {name} is not a linear layer of this model")
        if shape != (linear.out_features, linear.in_features):
            raise UserError(f"{source}: {name} is {linear.out_features}x{linear.in_features}, "
                            f"the model's is {shape[0]}x{shape[1]}")
