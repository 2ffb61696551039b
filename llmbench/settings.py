"""What a run was asked to do, as data: frozen groups of settings that llmbench.cli builds once
from the command line. The library takes these (or single values from them), never the parsed
argparse object, so a program can also be driven without a command line.

Field names are the flags' argparse destinations (`--weight-dtype` -> `weight_dtype`), and the
defaults are the flags' defaults, so a group built from any entry script's flags means the same
thing everywhere (llmbench/cli/flags.py defines each flag once).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ModelSettings:
    model_name_or_path: str | None = None  # None: the embedded default model
    dtype: str = "float32"
    config_file: str | None = None
    backend: str = "stock"
    ipex: bool = False  # the examples' --ipex: backend "ipex"
    kv_cache_dtype: str = "auto"


# --input-mode values, as the Xeon examples number them (docs/multimodal.md).
INPUT_MODES = {0: "text", 1: "vision", 2: "speech", 3: "vision+speech"}


@dataclass(frozen=True)
class PromptSettings:
    input_tokens: int | None = None
    prompt: str | None = None
    batch_size: int = 1
    input_mode: int | None = None  # multimodal: 0 text, 1 image, 2 audio, 3 both
    image_url: str | None = None
    audio: str | None = None


@dataclass(frozen=True)
class DecodingSettings:
    greedy: bool = False
    sample: bool = False
    num_beams: int = 4
    max_new_tokens: int = 32
    seed: int = 0
    generation_config: str | None = None
    streaming: bool = False


@dataclass(frozen=True)
class MeasurementSettings:
    num_iter: int = 10
    num_warmup: int = 2
    token_latency: bool = False
    profile: bool = False
    output_dir: str = "./saved_results"


@dataclass(frozen=True)
class QuantizationSettings:
    ipex_weight_only_quantization: bool = False
    weight_dtype: str = "INT8"
    group_size: int = 0
    woq_sym_quant_weight: bool = False
    lowp_mode: str = "AUTO"
    quant_with_amp: bool = False
    gptq: bool = False
    act_quant_mode: str | None = None
    low_precision_checkpoint: str | None = None
    ipex_smooth_quant: bool = False
    alpha: str = "0.5"
    dataset: str | None = None
    calib_len: int = 512
    calib_iters: int = 32
    calib_shuffle: bool = False
    calib_padding: bool = False
    fallback_add: str | None = None
    qconfig_summary_file: str | None = None
    quantized_model_path: str | None = None
    skip_quality: bool = False  # run_quantization.py: don't measure quality against fp32


@dataclass(frozen=True)
class DistributionSettings:
    autotp: bool = False
    shard_model: bool = False
    max_shard_size: str = "500MB"
    local_rank: int | None = None
    dist_timeout: float = 1800.0


@dataclass(frozen=True)
class AccuracySettings:
    tasks: str | None = None
    tasks_file: str | None = None
    lambada_file: str | None = None
    limit: int | float | None = None
    # the examples' `--dtype int8|int4` in the accuracy scripts: the weight type the quantized
    # model must hold (llmbench.cli maps it onto weight-only quantization); None: a float dtype
    expect_weight_dtype: str | None = None


@dataclass(frozen=True)
class Settings:
    """One run's settings. `flags` is every flag as the user gave it (after the older
    examples' flags were mapped onto today's), which the reports record as `config`."""

    model: ModelSettings = ModelSettings()
    prompt: PromptSettings = PromptSettings()
    decoding: DecodingSettings = DecodingSettings()
    measurement: MeasurementSettings = MeasurementSettings()
    quantization: QuantizationSettings = QuantizationSettings()
    distribution: DistributionSettings = DistributionSettings()
    accuracy: AccuracySettings = AccuracySettings()
    flags: dict[str, Any] = field(default_factory=dict, compare=False)


# Settings' groups: field name -> class (llmbench.cli fills each from the flags of its names)
GROUPS = {"model": ModelSettings, "prompt": PromptSettings, "decoding": DecodingSettings,
          "measurement": MeasurementSettings, "quantization": QuantizationSettings,
          "distribution": DistributionSettings, "accuracy": AccuracySettings}
