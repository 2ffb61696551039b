"""INT4 checkpoints made elsewhere, in the GPTQ and AWQ tensor layouts, read into Int4Linear.

Two ways in:
- `-m DIR`, a Hugging Face folder whose config.json has a `quantization_config` with
  `quant_method` "gptq" (AutoGPTQ / GPTQModel) or "awq" (AutoAWQ, GEMM version): transformers
  can't load these without optimum / gptqmodel / autoawq, so `load_hf_folder` builds the model
  from its config (the quantization_config dropped), fills it from the safetensors files and
  converts every quantized projection;
- `--low-precision-checkpoint FILE`: a safetensors file of such tensors keyed by the float model's
  linear names (`model.layers.0.self_attn.q_proj.qweight`), for the float model given by -m
  (`load_low_precision`).

Layouts (4 bits, int32 words holding 8 values, value j of a word in bits 4j..4j+3):
- GPTQ: `qweight` [K/8, N] packs 8 consecutive input channels (k = 8 * row + j); `qzeros`
  [G, N/8] packs 8 consecutive output channels; `scales` [G, N]; `g_idx` [K] the group of each
  input channel (act-order checkpoints permute it); optional `bias` [N]. checkpoint_format
  "gptq" (AutoGPTQ's v1, the default) stores zero - 1, "gptq_v2" stores the zero itself.
- AWQ GEMM: `qweight` [K, N/8] packs 8 output channels in the interleaved order
  (0, 2, 4, 6, 1, 3, 5, 7): bits 4j hold channel 8c + ORDER[j]; `qzeros` [G, N/8] likewise;
  `scales` [G, N]; groups are consecutive (no g_idx); zeros stored as they are.
In both, w[n, k] = (q[k, n] - zero[g(k), n]) * scale[g(k), n].

Our Int4Linear wants groups contiguous along K, all of one size (a power of two >= 32, or one
group per row): an act-order g_idx becomes Int4Linear's input permutation (channels sorted by
group). The float weights of converted projections are set to the dequantized ones, so the
model is also correct as a plain float model (the backends build from it, then swap in the
int4 projections); that costs float memory while loading, as any float model does.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from llmbench import kernels
from llmbench.errors import UserError
from llmbench.quant.checkpoint_settings import (
    METHODS,
    describe_settings,
)
from llmbench.quant.linears import Int4Linear
from llmbench.quant.scheme import MIN_GROUP, Scheme, effective_group

TENSOR_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx", "bias")
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # bits 4j of an AWQ word hold output channel AWQ_ORDER[j]
PACK = 8  # 4-bit values per int32 word
CHECKPOINT_FILE = "gptq_checkpoint.safetensors"


# ---- unpacking and packing the int32 words -----------------------------------------------

def unpack_words(words: torch.Tensor, dim: int, order: tuple[int, ...] | None = None
                 ) -> torch.Tensor:
    """int32 words -> their 4-bit values (int64) spread along `dim` (8 per word). `order[j]`:
    the position within the 8 that bits 4j hold (None: position j)."""
    words = words.to(torch.int32)
    values = [(words >> (4 * j)) & 0xF for j in range(PACK)]  # arithmetic shift, then masked
    if order is not None:
        at = {position: j for j, position in enumerate(order)}
        values = [values[at[position]] for position in range(PACK)]
    stacked = torch.stack(values, dim=dim + 1)  # [..., words, 8, ...]
    shape = list(words.shape)
    shape[dim] *= PACK
    return stacked.reshape(shape).long()


def pack_words(values: torch.Tensor, dim: int) -> torch.Tensor:
    """4-bit values -> int32 words along `dim` (value j of each 8 in bits 4j): the GPTQ
    order. Used to write GPTQ checkpoints (utils/run_gptq.py)."""
    values = values.to(torch.int64) & 0xF
    shape = list(values.shape)
    shape[dim : dim + 1] = [shape[dim] // PACK, PACK]
    grouped = values.reshape(shape)
    shifts = (torch.arange(PACK, dtype=torch.int64) * 4).reshape(
        [PACK if i == dim + 1 else 1 for i in range(len(shape))])
    return _to_int32((grouped << shifts).sum(dim=dim + 1))


def _to_int32(word: torch.Tensor) -> torch.Tensor:
    """Unsigned 32-bit values held in int64 -> int32 with the same bits."""
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)


# ---- one projection ----------------------------------------------------------------------

def _expect(tensors: dict[str, torch.Tensor], key: str, shape: tuple[int, ...], name: str,
            source: str) -> torch.Tensor:
    if key not in tensors:
        raise UserError(f"{source}: {name}.{key} is missing")
    tensor = tensors[key]
    if tuple(tensor.shape) != shape:
        raise UserError(f"{source}: {name}.{key} has shape {list(tensor.shape)}, this model needs "
                        f"{list(shape)}")
    return tensor


def group_of_count(k: int, groups: int, declared: int | None = None) -> int:
    """The group size behind `groups` scale rows for K = k input channels: the declared one when
    it agrees, else -1 (per-channel) for one group, else the smallest power of two >= 32 with
    ceil(k / size) == groups (how quantizers size a partial last group)."""
    if declared is not None and declared != -1 and math.ceil(k / declared) == groups:
        return declared
    if groups == 1:
        return -1
    size = MIN_GROUP
    while size < k:
        if math.ceil(k / size) == groups:
            return size
        size *= 2
    return -2  # no such size: the caller names the offending tensor


def to_int4_linear(q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor,
                   g_idx: torch.Tensor, bias: torch.Tensor | None, name: str,
                   source: str) -> Int4Linear:
    """q [N, K] in 0..15, zeros / scales [G, N] (zero points as numbers, conventions already
    undone), g_idx [K] -> Int4Linear (groups made contiguous by an input permutation when the
    checkpoint's g_idx is not sorted)."""
    n, k = q.shape
    groups = scales.shape[0]
    g_idx = g_idx.long()
    if int(g_idx.min()) < 0 or int(g_idx.max()) >= groups:
        raise UserError(f"{source}: {name}.g_idx names groups outside 0..{groups - 1}")
    perm = None
    if bool((g_idx[1:] < g_idx[:-1]).any()):  # act-order: channels sorted by their group
        perm = torch.argsort(g_idx, stable=True)
        q = q.index_select(1, perm)
        g_idx = g_idx[perm]
    counts = torch.bincount(g_idx, minlength=groups)
    if groups == 1:
        size = effective_group(k, -1)
    else:
        size = int(counts[0])
        uniform = bool((counts[:-1] == size).all()) and 0 < int(counts[-1]) <= size
        if not uniform or size < MIN_GROUP or size & (size - 1):
            raise UserError(f"{source}: {name} has groups of {sorted(set(counts.tolist()))} "
                            f"input channels; our int4 kernel needs equal groups of a power of "
                            f"two >= {MIN_GROUP} (or one group per row)")
    padded = groups * size if groups > 1 else size
    if padded != k:
        q = torch.nn.functional.pad(q, (0, padded - k))
    packed = kernels.pack_int4(q.to(torch.uint8).contiguous())
    return Int4Linear(packed, scales.t().float(), zeros.t().float(), size, k,
                      None if bias is None else bias.float(), perm)


def _scales_and_zeros(tensors: dict[str, torch.Tensor], n: int, name: str,
                      source: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    """`scales` [G, n] and packed `qzeros` [G, n / 8], as GPTQ and AWQ both store them; G is
    however many groups the file has."""
    scales = tensors.get("scales")
    if scales is None or scales.dim() != 2:
        raise UserError(f"{source}: {name}.scales is missing or not 2-D")
    groups = scales.shape[0]
    _expect(tensors, "scales", (groups, n), name, source)
    qzeros = _expect(tensors, "qzeros", (groups, n // PACK), name, source)
    return scales, qzeros, groups


def gptq_linear(tensors: dict[str, torch.Tensor], k: int, n: int, name: str, source: str,
                zero_minus_one: bool = True, declared_group: int | None = None) -> Int4Linear:
    """A GPTQ-layout projection of the model's [N, K] linear `name`."""
    if k % PACK or n % PACK:
        raise UserError(f"{source}: {name} is {n}x{k}; packed 4-bit layouts need both divisible "
                        f"by {PACK}")
    qweight = _expect(tensors, "qweight", (k // PACK, n), name, source)
    scales, qzeros, groups = _scales_and_zeros(tensors, n, name, source)
    if "g_idx" in tensors:
        g_idx = _expect(tensors, "g_idx", (k,), name, source)
    else:
        size = group_of_count(k, groups, declared_group)
        if size == -2:
            raise UserError(f"{source}: {name}.scales has {groups} groups, which no group size "
                            f"gives for {k} input channels")
        g_idx = torch.arange(k) // (k if size == -1 else size)
    bias = tensors.get("bias")
    if bias is not None:
        bias = _expect(tensors, "bias", (n,), name, source)
    q = unpack_words(qweight, 0).t()  # [N, K]
    zeros = unpack_words(qzeros, 1).float()
    if zero_minus_one:  # AutoGPTQ v1 stored zero - 1 (a zero of 0 wrapped to 15, read as 16)
        zeros = zeros + 1
    return to_int4_linear(q, zeros, scales.float(), g_idx, bias, name, source)


def awq_linear(tensors: dict[str, torch.Tensor], k: int, n: int, name: str, source: str,
               declared_group: int | None = None) -> Int4Linear:
    """An AWQ GEMM-layout projection of the model's [N, K] linear `name`."""
    if n % PACK:
        raise UserError(f"{source}: {name} has {n} outputs; AWQ packs them by {PACK}")
    qweight = _expect(tensors, "qweight", (k, n // PACK), name, source)
    scales, qzeros, groups = _scales_and_zeros(tensors, n, name, source)
    size = group_of_count(k, groups, declared_group)
    if size == -2:
        raise UserError(f"{source}: {name}.scales has {groups} groups, which no group size "
                        f"gives for {k} input channels")
    bias = tensors.get("bias")
    if bias is not None:
        bias = _expect(tensors, "bias", (n,), name, source)
    q = unpack_words(qweight, 1, AWQ_ORDER).t()
    zeros = unpack_words(qzeros, 1, AWQ_ORDER).float()
    g_idx = torch.arange(k) // (k if size == -1 else size)
    return to_int4_linear(q, zeros, scales.float(), g_idx, bias, name, source)


def infer_method(tensors: dict[str, torch.Tensor], k: int, n: int) -> str | None:
    """GPTQ or AWQ from the qweight's shape against the model's [N, K] linear: GPTQ packs along
    K ([K/8, N]), AWQ along N ([K, N/8]); the two never coincide. None: neither fits."""
    shape = tuple(tensors["qweight"].shape) if "qweight" in tensors else None
    if "g_idx" in tensors or shape == (k // PACK, n):
        return "gptq"
    if shape == (k, n // PACK):
        return "awq"
    return None


# ---- what a checkpoint says about itself --------------------------------------------------

def scheme_of(settings: dict[str, Any], source: str, **extra: Any) -> Scheme:
    weight_dtype = "INT8" if settings["quant_method"] == "int8" else "INT4"
    return Scheme(settings["quant_method"], weight_dtype, settings["group_size"], settings["sym"],
                  extra={"bits": settings["bits"], "desc_act": settings["desc_act"],
                         "checkpoint_format": settings["checkpoint_format"], "source": source,
                         **extra})


def convert_all(grouped: dict[str, dict[str, torch.Tensor]], model: torch.nn.Module,
                settings: dict[str, Any] | None, source: str
                ) -> tuple[dict[str, Int4Linear], dict[str, Any]]:
    """Every quantized projection of a checkpoint (tensors grouped by module name), checked
    against the model's linears in name order; the first that doesn't fit is named in the
    error. `settings` None: the method is inferred from the first projection's shapes."""
    modules = dict(model.named_modules())
    qlinears: dict[str, Int4Linear] = {}
    for name in sorted(grouped):
        tensors = grouped[name]
        module = modules.get(name)
        first_key = f"{name}.{sorted(tensors)[0]}"
        if not isinstance(module, torch.nn.Linear):
            raise UserError(f"{source}: {first_key} names no linear layer of this model")
        n, k = module.out_features, module.in_features
        if settings is None:
            method = infer_method(tensors, k, n)
            if method is None:
                got = list(tensors["qweight"].shape) if "qweight" in tensors else None
                raise UserError(f"{source}: {name}.qweight has shape {got}, neither GPTQ's "
                                f"[{k // PACK}, {n}] nor AWQ's [{k}, {n // PACK}] for this "
                                f"model's {n}x{k} {name}")
            settings = describe_settings({"quant_method": method, "bits": 4, "group_size": -1})
            settings["group_size"] = None  # inferred from the scales below
        declared = settings["group_size"]
        if settings["quant_method"] == "awq":
            linear = awq_linear(tensors, k, n, name, source, declared)
        else:
            linear = gptq_linear(tensors, k, n, name, source,
                                 settings["checkpoint_format"] == "gptq", declared)
        if settings["group_size"] is None:
            settings["group_size"] = -1 if linear.group_size >= k else linear.group_size
        if linear.perm is not None:
            settings["desc_act"] = True
        qlinears[name] = linear
    if not qlinears:
        raise UserError(f"{source}: no quantized projections (no '.qweight' tensors) in it")
    assert settings is not None
    return qlinears, settings


def group_by_module(keys_tensors: dict[str, torch.Tensor], source: str,
                    allow_other: bool) -> tuple[dict[str, dict[str, torch.Tensor]],
                                                dict[str, torch.Tensor]]:
    """Split tensors into those of quantized projections (by module name: every module with a
    qweight) and the rest (float tensors). allow_other False: a tensor that belongs to no
    quantized projection is an error naming it."""
    modules = {key.rsplit(".", 1)[0] for key in keys_tensors if key.endswith(".qweight")}
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    rest: dict[str, torch.Tensor] = {}
    for key in sorted(keys_tensors):
        owner, _, suffix = key.rpartition(".")
        if owner in modules and suffix in TENSOR_SUFFIXES:
            grouped.setdefault(owner, {})[suffix] = keys_tensors[key]
        elif owner in modules and suffix == "weight":
            raise UserError(f"{source}: {key} is a float weight of a quantized projection")
        elif allow_other:
            rest[key] = keys_tensors[key]
        else:
            raise UserError(f"{source}: {key} is not a GPTQ/AWQ tensor of a projection (expected "
                            f"<module>.{'|'.join(TENSOR_SUFFIXES)})")
    return grouped, rest


# ---- --low-precision-checkpoint FILE --------------------------------------------------------

def read_safetensors(path: Path, what: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise UserError(f"{what} {path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (OSError, SafetensorError) as exc:
        raise UserError(f"cannot read {what} {path}: {exc}") from exc
    return tensors, metadata


def load_low_precision(path: str, model: torch.nn.Module) -> tuple[dict[str, Int4Linear], Scheme]:
    """--low-precision-checkpoint FILE: the GPTQ/AWQ projections it holds for `model`, checked
    key by key. Method, group size, desc_act, sym and checkpoint_format come from the file's
    safetensors metadata (`quant_method`, ...) when present; else the method is inferred from
    the qweight shapes (GPTQ [K/8, N], AWQ [K, N/8]), the group size from the number of scale
    rows (g_idx when there is one), and a GPTQ file is taken as AutoGPTQ's v1 format."""
    file = Path(path).expanduser()
    source = f"--low-precision-checkpoint {path}"
    tensors, metadata = read_safetensors(file, "--low-precision-checkpoint")
    grouped, _ = group_by_module(tensors, source, allow_other=False)
    settings = None
    if metadata.get("quant_method"):
        settings = describe_settings(metadata)
        if settings["quant_method"] not in METHODS:
            raise UserError(f"{source}: quant_method {settings['quant_method']!r} is not gptq or "
                            "awq")
        if "group_size" not in metadata and "q_group_size" not in metadata:
            settings["group_size"] = None
    qlinears, settings = convert_all(grouped, model, settings, source)
    return qlinears, scheme_of(settings, str(file), checkpoint_file=str(file.resolve()),
                               settings_from="metadata" if metadata.get("quant_method")
                               else "inferred from shapes")


# ---- -m DIR with a quantization_config --------------------------------------------------------

def folder_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a folder's model.safetensors or its shards (index json)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise UserError(f"{folder}: a GPTQ/AWQ folder needs model.safetensors (or an index of "
                        "safetensors shards); .bin checkpoints are not read")
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        part, _ = read_safetensors(folder / name, "checkpoint file")
        tensors.update(part)
    return tensors


def channel_int8_by_module(tensors: dict[str, torch.Tensor]
                           ) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """A channel INT8 folder's tensors: (module -> {weight, weight_scale[, bias]}) for every
    module with an int8 weight and a weight_scale, and the float rest."""
    modules = {key[: -len(".weight_scale")] for key in tensors if key.endswith(".weight_scale")}
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    rest: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        owner, _, suffix = key.rpartition(".")
        if owner in modules and suffix in ("weight", "weight_scale", "bias"):
            grouped.setdefault(owner, {})[suffix] = tensor
        else:
            rest[key] = tensor
    return grouped, rest


def convert_channel_int8(grouped: dict[str, dict[str, torch.Tensor]], model: torch.nn.Module,
                         source: str) -> dict[str, Any]:
    """Every channel INT8 projection as our symmetric per-channel Int8Linear (the same numbers:
    q int8, one scale per output channel), checked against the model's linears."""
    from llmbench.quant.linears import Int8Linear

    modules = dict(model.named_modules())
    qlinears: dict[str, Any] = {}
    for name in sorted(grouped):
        parts = grouped[name]
        module = modules.get(name)
        if not isinstance(module, torch.nn.Linear):
            raise UserError(f"{source}: {name}.weight_scale names no linear layer of this model")
        n, k = module.out_features, module.in_features
        weight, scale = parts.get("weight"), parts["weight_scale"]
        if weight is None or weight.dtype != torch.int8 or tuple(weight.shape) != (n, k):
            got = None if weight is None else f"{weight.dtype} {list(weight.shape)}"
            raise UserError(f"{source}: {name}.weight is {got}, expected int8 [{n}, {k}] beside "
                            "its weight_scale")
        if scale.numel() != n:
            raise UserError(f"{source}: {name}.weight_scale has {scale.numel()} values, expected "
                            f"one per output channel ({n})")
        qlinears[name] = Int8Linear(weight, scale.reshape(n).float(), None, parts.get("bias"))
    if not qlinears:
        raise UserError(f"{source}: quant_method int8 but no '.weight_scale' tensors in it")
    return qlinears


def load_channel_int8_folder(path: Path, config: Any, auto_class: Any, dtype: str,
                             settings: dict[str, Any]) -> tuple[Any, dict[str, Any], Scheme]:
    """A channel INT8 folder: its int8 weights dequantized (w = q * scale) into a float state
    dict that transformers loads as it loads any checkpoint (its key conversions included: e.g.
    deepseek_v3's per-expert weights become the fused expert tensors), then every projection
    that is an nn.Linear of the model runs as our Int8Linear on the folder's own integers.
    Weights that are not nn.Linear modules here (fused MoE experts) stay in float, and the
    report says how many."""
    source = str(path)
    tensors = folder_tensors(path)
    grouped, floats = channel_int8_by_module(tensors)
    state = dict(floats)
    for name, parts in grouped.items():
        weight = parts.get("weight")
        if weight is None or weight.dtype != torch.int8:
            raise UserError(f"{source}: {name}.weight_scale without an int8 {name}.weight")
        scale = parts["weight_scale"].float().reshape(-1, 1)
        state[f"{name}.weight"] = weight.float() * scale
        if "bias" in parts:
            state[f"{name}.bias"] = parts["bias"]
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model_class = type(auto_class.from_config(config)) if not hasattr(
        auto_class, "_model_mapping") else auto_class._model_mapping[type(config)]
    try:
        model = model_class.from_pretrained(None, config=config, state_dict=state,
                                            dtype=getattr(torch, dtype))
    except Exception as exc:
        raise UserError(f"cannot load {source} as a channel INT8 checkpoint: {exc}") from exc
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    qlinears = convert_channel_int8({n: g for n, g in grouped.items() if n in linears}, model,
                                    source)
    model.eval()
    left = len(grouped) - len(qlinears)
    return model, qlinears, scheme_of(settings, source, float_int8_weights=left)


def load_hf_folder(folder: str, config: Any, auto_class: Any, dtype: str,
                   settings: dict[str, Any]) -> tuple[Any, dict[str, Any], Scheme]:
    """Build the model of a GPTQ/AWQ folder from its config (without the quantization_config),
    fill its float tensors from the safetensors files, and convert each quantized projection
    (its float weight set to the dequantized one). Returns (model, projections, scheme)."""
    path = Path(folder)
    source = str(path)
    if settings["quant_method"] == "int8":
        return load_channel_int8_folder(path, config, auto_class, dtype, settings)
    tensors = folder_tensors(path)
    grouped, floats = group_by_module(tensors, source, allow_other=True)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # transformers would look for optimum / autoawq
    model = auto_class.from_config(config, dtype=getattr(torch, dtype))
    qlinears, settings = convert_all(grouped, model, dict(settings), source)
    modules = dict(model.named_modules())
    state = dict(floats)
    for name, linear in qlinears.items():
        state[f"{name}.weight"] = linear.dequantize()
        if linear.bias is not None:
            state[f"{name}.bias"] = linear.bias
        elif modules[name].bias is not None:
            raise UserError(f"{source}: {name}.bias is missing")
    params = dict(model.state_dict())
    for key in sorted(state):
        if key not in params:
            raise UserError(f"{source}: {key} is not a tensor of this {config.model_type} model")
        if tuple(params[key].shape) != tuple(state[key].shape):
            raise UserError(f"{source}: {key} has shape {list(state[key].shape)}, the model's is "
                            f"{list(params[key].shape)}")
    missing = [key for key in params if key not in state]
    tied = getattr(config, "tie_word_embeddings", False) or getattr(
        getattr(config, "get_text_config", lambda: config)(), "tie_word_embeddings", False)
    output = model.get_output_embeddings()
    head_keys = {f"{n}.weight" for n, m in modules.items() if m is output} if tied else set()
    missing = [key for key in missing if key not in head_keys and not _is_buffer(model, key)]
    if missing:
        raise UserError(f"{source}: {missing[0]} is missing from the checkpoint")
    with torch.no_grad():
        model.load_state_dict(state, strict=False)
    if tied:
        model.tie_weights()
    model.eval()
    return model, qlinears, scheme_of(settings, source)


def _is_buffer(model: torch.nn.Module, key: str) -> bool:
    return key in dict(model.named_buffers())


# ---- writing a GPTQ checkpoint (utils/run_gptq.py) ---------------------------------------

def gptq_tensors(q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor,
                 g_idx: torch.Tensor, bias: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """One projection in the GPTQ v1 layout: q [N, K] ints 0..15, zeros / scales [N, G]
    (integer zero points in 1..15: v1 stores zero - 1 in 4 bits, so a zero of 0 can't be
    written), g_idx [K]. Scales are stored fp16, as GPTQ checkpoints do."""
    out = {"qweight": pack_words(q.t().contiguous(), 0),
           "qzeros": pack_words((zeros.t().round().long() - 1).contiguous(), 1),
           "scales": scales.t().contiguous().to(torch.float16),
           "g_idx": g_idx.to(torch.int32).contiguous()}
    if bias is not None:
        out["bias"] = bias.detach().float().contiguous()
    return out
