"""Multimodal models (--input-mode 1/2/3): which inputs a run reads, and how the model's own
processor turns them, with the prompt, into generate()'s inputs.

The model loads with transformers' Auto class for its kind and runs through the same timing
loop as a text model (llmbench.bench.run_benchmark), so the first-token latency includes the
vision or audio encoder (timed apart by EncoderTimer). Weight-only quantization and
--backend native apply to the language model part (LanguageModel gives it a text model's
module names); the encoders stay transformers' own (docs/multimodal.md).
"""

from __future__ import annotations

import io
import time
import wave
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmbench.errors import UserError
from llmbench.models import Family, LoadedModel, family_for, read_config_dict, read_config_file
from llmbench.settings import INPUT_MODES, ModelSettings, PromptSettings, Settings

DATA_DIR = Path(__file__).resolve().parent / "data"
SAMPLE_IMAGE = DATA_DIR / "sample_image.png"
SAMPLE_AUDIO = DATA_DIR / "sample_audio.wav"
URL_TIMEOUT_S = 30
# What each mode reads besides the prompt.
MODE_NEEDS = {0: (), 1: ("vision",), 2: ("speech",), 3: ("vision", "speech")}
# The prompt a family reads when --prompt is not given ({image} is the processor's image token);
# None: no prompt (GIT captions the image from its start token).
DEFAULT_PROMPTS: dict[str, str | None] = {
    "llava": "{image}\nDescribe this image.",
    "git": None,
    "mllama": "{image}Describe this image.",
}


@dataclass(frozen=True)
class Layout:
    """Where a family's language model and encoders sit in transformers' module tree."""

    # (attribute, module path): the language model's parts under the names a text model of its
    # kind has; the last one is the output projection
    language: tuple[tuple[str, str], ...]
    encoders: tuple[str, ...]  # the vision / audio modules run before the language model


LAYOUTS = {
    "llava": Layout((("model", "model.language_model"), ("lm_head", "lm_head")),
                    ("model.vision_tower", "model.multi_modal_projector")),
    "mllama": Layout((("model", "model.language_model"), ("lm_head", "lm_head")),
                     ("model.vision_model", "model.multi_modal_projector")),
    "git": Layout((("encoder", "git.encoder"), ("embeddings", "git.embeddings"),
                   ("output", "output")),
                  ("git.image_encoder", "git.visual_projection")),
    "whisper": Layout((("decoder", "model.decoder"), ("proj_out", "proj_out")),
                      ("model.encoder",)),
}
# Quantization of a multimodal model: weight-only round-to-nearest, in this process.
QUANT_METHODS = ("woq",)


@dataclass
class ImageInput:
    pixels: Any  # PIL.Image, RGB
    source: str
    default_sample: bool

    def record(self) -> dict[str, Any]:
        width, height = self.pixels.size
        return {"source": self.source, "width": width, "height": height,
                "size": f"{width}x{height}", "default_sample": self.default_sample}


@dataclass
class AudioInput:
    samples: Any  # numpy float32, mono, in [-1, 1]
    sampling_rate: int
    source: str
    default_sample: bool

    @property
    def seconds(self) -> float:
        return len(self.samples) / self.sampling_rate

    def record(self) -> dict[str, Any]:
        return {"source": self.source, "seconds": round(self.seconds, 4),
                "sampling_rate": self.sampling_rate, "default_sample": self.default_sample}


@dataclass
class Request:
    """What a multimodal run reads, checked before the model loads."""

    mode: int
    family: Family
    image: ImageInput | None
    audio: AudioInput | None

    def record(self) -> dict[str, Any]:
        return {"mode": self.mode, "mode_name": INPUT_MODES[self.mode],
                "image": self.image.record() if self.image else None,
                "audio": self.audio.record() if self.audio else None}

    def describe(self) -> str:
        parts = [f"input mode {self.mode} ({INPUT_MODES[self.mode]})"]
        if self.image is not None:
            width, height = self.image.pixels.size
            parts.append(f"image {self.image.source} ({width}x{height}"
                         + (", the project's sample: --image-url not given"
                            if self.image.default_sample else "") + ")")
        if self.audio is not None:
            parts.append(f"audio {self.audio.source} ({self.audio.seconds:.2f} s, "
                         f"{self.audio.sampling_rate} Hz"
                         + (", the project's sample: --audio not given"
                            if self.audio.default_sample else "") + ")")
        return " | ".join(parts)


def flags_given(settings: Settings) -> bool:
    return (settings.prompt.input_mode is not None or settings.prompt.image_url is not None
            or settings.prompt.audio is not None)


def model_family(model: ModelSettings) -> Family | None:
    """The family of -m from its config alone (no weights); None for a GGUF file or the
    embedded model, which are text models."""
    from llmbench.models import resolve_source

    source = resolve_source(model.model_name_or_path)
    if source.gguf_file is not None:
        return None
    model_type = read_config_dict(source).get("model_type")
    if model.config_file:
        model_type = read_config_file(model.config_file).get("model_type", model_type)
    return family_for(model_type)


def resolve_mode(prompt: PromptSettings, family: Family | None) -> int:
    """--input-mode, or what the other flags and the model imply when it is not given."""
    if prompt.input_mode is not None:
        mode = prompt.input_mode
        if prompt.image_url is not None and "vision" not in MODE_NEEDS[mode]:
            raise UserError(f"--image-url is read in --input-mode 1 or 3, not {mode}")
        if prompt.audio is not None and "speech" not in MODE_NEEDS[mode]:
            raise UserError(f"--audio is read in --input-mode 2 or 3, not {mode}")
        return mode
    if prompt.image_url is not None or prompt.audio is not None:
        return (1 if prompt.image_url is not None else 0) + (2 if prompt.audio is not None else 0)
    if family is not None and family.modalities == ("speech",):
        return 2  # a speech-only model reads its audio (the sample without --audio)
    return 0


def check_request(settings: Settings) -> Request | None:
    """The multimodal inputs of this run, read and checked (one-line errors), or None for a
    plain text run. run.py calls it too, so bad input fails before any step starts."""
    if not flags_given(settings) and settings.model.model_name_or_path is None:
        return None  # the embedded model: text
    family = model_family(settings.model)
    mode = resolve_mode(settings.prompt, family)
    if family is None or not family.multimodal:
        if mode == 0:
            return None
        name = settings.model.model_name_or_path or "the embedded model"
        kind = family.model_type if family is not None else "a GGUF text model"
        raise UserError(f"--input-mode {mode} ({INPUT_MODES[mode]}) needs a model that reads "
                        f"{' and '.join(MODE_NEEDS[mode])}; {name} ({kind}) reads text only")
    missing = [what for what in MODE_NEEDS[mode] if what not in family.modalities]
    if missing:
        raise UserError(f"--input-mode {mode} ({INPUT_MODES[mode]}) needs a model that reads "
                        f"{' and '.join(missing)}; {family.model_type} models read "
                        f"{' and '.join(family.modalities)}")
    if "text" not in family.modalities and mode == 0:
        raise UserError(f"{family.model_type} models read {' and '.join(family.modalities)}, "
                        f"not text alone: pass --input-mode "
                        f"{2 if 'speech' in family.modalities else 1}")
    if (mode == 0 and settings.prompt.prompt is None
            and DEFAULT_PROMPTS.get(family.model_type) is None):
        raise UserError(f"{family.model_type} with --input-mode 0 reads text only: pass --prompt")
    refuse_unimplemented(settings)
    image = read_image(settings.prompt.image_url) if "vision" in MODE_NEEDS[mode] else None
    audio = read_audio(settings.prompt.audio) if "speech" in MODE_NEEDS[mode] else None
    return Request(mode, family, image, audio)


def refuse_unimplemented(settings: Settings) -> None:
    """What a multimodal run does not do yet: say so in one line instead of ignoring it."""
    if settings.model.ipex or settings.model.backend == "ipex":
        from llmbench.backends.ipex import require_ipex

        require_ipex()  # absent: the same line as for a text model
        raise UserError("--ipex with a multimodal model is not implemented; run it with "
                        "--backend stock or native (docs/multimodal.md)")
    from llmbench.quant.workflow import scheme_of

    scheme = scheme_of(settings.quantization)
    if settings.quantization.quantized_model_path is not None or (
            scheme is not None and scheme.method not in QUANT_METHODS):
        raise UserError("a multimodal model is quantized weight-only (round to nearest) in the "
                        "benchmark's own process: --ipex-weight-only-quantization [--weight-dtype "
                        "INT8|INT4] [--group-size N]; saved models, GPTQ, SmoothQuant and "
                        "checkpoints are not implemented for it yet (docs/multimodal.md)")
    if settings.prompt.input_tokens is not None:
        raise UserError("--input-tokens builds a text prompt of N tokens; a multimodal model "
                        "reads --prompt (or its family's default prompt) with its inputs")
    if settings.decoding.streaming:
        raise UserError("--streaming with a multimodal model is not implemented yet")


# ---- inputs ----------------------------------------------------------------------------------


def read_image(where: str | None) -> ImageInput:
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        raise UserError("reading images needs Pillow: pip install -r requirements.txt") from None
    if where is None:
        where, default = str(SAMPLE_IMAGE), True
    else:
        default = False
    if where.startswith(("http://", "https://")):
        data = fetch(where)
    else:
        data = read_file(where, "--image-url")
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError, ValueError):
        raise UserError(f"--image-url {where} is not an image (Pillow cannot read it)") from None
    shown = SAMPLE_IMAGE.name if default else where
    return ImageInput(image.convert("RGB"), shown, default)


def fetch(url: str) -> bytes:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=URL_TIMEOUT_S) as response:
            return response.read()
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise UserError(f"--image-url {url} could not be fetched ({reason})") from None


def read_file(path: str, flag: str) -> bytes:
    try:
        return Path(path).expanduser().read_bytes()
    except OSError as exc:
        raise UserError(f"{flag} {path} cannot be read ({exc.strerror or exc})") from None


def read_audio(path: str | None) -> AudioInput:
    """A WAV file (PCM 8/16/24/32-bit, any rate, channels averaged to mono), read with the
    standard library: no audio package is needed for the formats speech benchmarks use."""
    import numpy as np

    if path is None:
        path, default = str(SAMPLE_AUDIO), True
    else:
        default = False
    data = read_file(path, "--audio")
    try:
        with wave.open(io.BytesIO(data)) as handle:
            channels, width = handle.getnchannels(), handle.getsampwidth()
            rate, frames = handle.getframerate(), handle.readframes(handle.getnframes())
    except (wave.Error, EOFError) as exc:
        raise UserError(f"--audio {path} is not a WAV audio file (only PCM WAV is read: "
                        f"{exc})") from None
    if width == 1:  # 8-bit WAV is unsigned
        samples = (np.frombuffer(frames, np.uint8).astype(np.float32) - 128) / 128
    elif width == 3:  # 24-bit: widen each little-endian triple to int32
        raw = np.frombuffer(frames, np.uint8).reshape(-1, 3)
        wide = (raw[:, 0].astype(np.int32) | raw[:, 1].astype(np.int32) << 8
                | raw[:, 2].astype(np.int32) << 16)
        samples = (np.where(wide >= 1 << 23, wide - (1 << 24), wide) / (1 << 23))
    elif width in (2, 4):
        dtype = "<i2" if width == 2 else "<i4"
        samples = np.frombuffer(frames, dtype).astype(np.float32) / (1 << (8 * width - 1))
    else:
        raise UserError(f"--audio {path}: {8 * width}-bit WAV samples are not supported")
    samples = np.asarray(samples, np.float32).reshape(-1, channels).mean(axis=1)
    if not len(samples):
        raise UserError(f"--audio {path} holds no samples")
    shown = SAMPLE_AUDIO.name if default else path
    return AudioInput(samples, rate, shown, default)


def resampled(audio: AudioInput, rate: int) -> Any:
    """The samples at `rate` (linear interpolation): feature extractors refuse other rates."""
    import numpy as np

    if audio.sampling_rate == rate:
        return audio.samples
    count = int(round(len(audio.samples) * rate / audio.sampling_rate))
    positions = np.arange(count) * (audio.sampling_rate / rate)
    return np.interp(positions, np.arange(len(audio.samples)), audio.samples).astype(np.float32)


# ---- model -----------------------------------------------------------------------------------


def load(settings: Settings, request: Request, dtype: str | None = None
         ) -> tuple[LoadedModel, Any]:
    """The model (with the Auto class of its kind) in `dtype` (default --dtype) and its
    processor."""
    import torch
    from transformers import (
        AutoModelForImageTextToText,
        AutoModelForSpeechSeq2Seq,
        AutoProcessor,
    )
    from transformers.utils import logging as hf_logging

    from llmbench.models import decode_step_bytes, load_config, resolve_source

    hf_logging.disable_progress_bar()
    source = resolve_source(settings.model.model_name_or_path)
    config, family = load_config(source, settings.model.config_file)
    auto_class = (AutoModelForSpeechSeq2Seq if family.modalities == ("speech",)
                  else AutoModelForImageTextToText)
    start = time.perf_counter()
    try:
        processor = AutoProcessor.from_pretrained(source.path)
        model = auto_class.from_pretrained(source.path, config=config,
                                           dtype=getattr(torch, dtype or settings.model.dtype))
    except Exception as exc:
        raise UserError(f"cannot load {source.display_name}: {exc}") from exc
    load_seconds = time.perf_counter() - start
    model.eval()
    tokenizer = processor.tokenizer
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    params = list(model.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in params)
    loaded = LoadedModel(
        model=model, tokenizer=tokenizer, config=config, family=family, source=source,
        dtype=dtype or settings.model.dtype, load_seconds=load_seconds, conversion_seconds=0.0,
        num_parameters=sum(p.numel() for p in params), weight_bytes=weight_bytes,
        decode_weight_bytes=decode_step_bytes(model, model.get_decoder()))
    return loaded, processor


def build_inputs(processor: Any, request: Request, prompt_text: str | None,
                 batch_size: int, dtype: str = "float32") -> Any:
    """generate()'s inputs, from the processor: the prompt (or the family's default) with the
    image and/or audio, replicated batch_size times; pixels and audio features in `dtype`."""
    import torch

    from llmbench.prompts import Prompt

    family = request.family.model_type
    kwargs: dict[str, Any] = {"return_tensors": "pt"}
    text = None
    default = DEFAULT_PROMPTS.get(family)
    if "text" in request.family.modalities and (prompt_text is not None or default is not None):
        image_token = getattr(processor, "image_token", "") or ""
        text = prompt_text if prompt_text is not None else default.format(
            image=image_token if request.image is not None else "").strip()
        if request.image is not None and image_token and image_token not in text:
            text = f"{image_token}\n{text}"  # the processor places the image features there
        kwargs["text"] = [text] * batch_size
    if request.image is not None:
        kwargs["images"] = [[request.image.pixels]] * batch_size  # one image per prompt
    if request.audio is not None:
        rate = processor.feature_extractor.sampling_rate
        kwargs["audio"] = [resampled(request.audio, rate)] * batch_size
        kwargs["sampling_rate"] = rate
    try:
        inputs = dict(processor(**kwargs))
    except Exception as exc:  # the processor's own check, e.g. an image token count mismatch
        raise UserError(f"the {family} processor could not build the inputs: {exc}") from exc
    for name, value in inputs.items():
        # processors give float32; not every model casts them to its weights' dtype (Whisper's
        # encoder does not)
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            inputs[name] = value.to(getattr(torch, dtype))
    input_ids = inputs.pop("input_ids", None)
    attention_mask = inputs.pop("attention_mask", None)
    if input_ids is not None:
        tokens = input_ids.shape[-1]
        shown = text or ""  # as written: the processor repeats the image token per patch
        offset = None
    else:  # no text: generate() starts from the start token(s), which a decoder-only model
        # returns in its output and Whisper (seq2seq) does not
        tokens, shown, offset = 0, "", 0 if request.family.seq2seq else 1
        if prompt_text is not None:
            try:  # a speech model's prompt is previous text, which the decoder reads first
                inputs["prompt_ids"] = processor.get_prompt_ids(prompt_text, return_tensors="pt")
                tokens = inputs["prompt_ids"].shape[-1]
            except Exception as exc:
                raise UserError(f"the {family} processor could not use --prompt: {exc}") from exc
            shown = prompt_text
    source = "--prompt" if prompt_text is not None else f"default ({family})"
    return Prompt(input_ids=input_ids, attention_mask=attention_mask, text=shown, tokens=tokens,
                  source=source, extra_inputs=inputs, output_offset=offset)


# ---- the language model part: quantization and --backend native ------------------------------


def language_model(model: Any, family: str) -> Any:
    """The language model part of `model` as a text model (LanguageModel)."""
    import torch

    class LanguageModel(torch.nn.Module):
        """The modules (shared, not copied) under the names a text model of its kind has, so
        that quantization (llmbench.quant.apply) and the native backend's family map
        (llmbench.backends.blocks) read it as they read a text model, and what they swap in
        is what the multimodal model runs."""

        def __init__(self) -> None:
            super().__init__()
            layout = LAYOUTS[family]
            for attribute, path in layout.language:
                self.add_module(attribute, model.get_submodule(path))
            self.output_name = layout.language[-1][0]
            self.config = getattr(model.config, "text_config", None) or model.config
            self.generation_config = model.generation_config

        def get_output_embeddings(self) -> Any:
            return self.get_submodule(self.output_name)

        def get_input_embeddings(self) -> Any:
            return model.get_input_embeddings()

        def write_back(self) -> None:
            """Put a part swapped on this view itself (set_submodule of its own attribute,
            e.g. a quantized lm_head) into the multimodal model; deeper swaps are shared."""
            for attribute, path in LAYOUTS[family].language:
                if model.get_submodule(path) is not self.get_submodule(attribute):
                    model.set_submodule(path, self.get_submodule(attribute))

    return LanguageModel()


class _Captured(Exception):
    pass


class NativeMultimodal:
    """--backend native for a multimodal model: its encoders, and what transformers makes of
    their features for the language model, run as transformers runs them, once per prompt;
    the language model's prefill and decode steps are the native model's
    (llmbench.backends.native). LLaVA's image features replace the image tokens' embeddings;
    Llama-3.2-Vision's feed its cross-attention layers' keys and values; GIT's lead the
    prompt."""

    def __init__(self, model: Any, language: Any, native: Any) -> None:
        self.model = model
        self.language = language  # the module whose inputs the native model takes over
        self.native = native

    def runtime_details(self) -> dict[str, Any]:
        return self.native.runtime_details()

    def generate(self, **kwargs: Any) -> Any:
        import torch

        from llmbench.backends.native import SUPPORTED_GENERATE_KEYS

        media = {key: kwargs.pop(key) for key in list(kwargs)
                 if key not in SUPPORTED_GENERATE_KEYS}
        if kwargs.get("input_ids") is None:  # no prompt (GIT captioning): the start token
            batch = next(iter(media.values())).shape[0] if media else 1
            kwargs["input_ids"] = torch.full((batch, 1), self.start_token(), dtype=torch.long)
        if media:
            kwargs.update(self.language_inputs(kwargs["input_ids"],
                                               kwargs.get("attention_mask"), media))
        return self.native.generate(**kwargs)

    def start_token(self) -> int:
        """What transformers' generate() starts a prompt-less decoder from: its bos token."""
        start = self.model.generation_config.bos_token_id
        if start is None:
            raise UserError("native backend: no prompt and no bos_token_id to start from")
        return int(start[0] if isinstance(start, list | tuple) else start)

    def language_inputs(self, ids: Any, mask: Any, media: dict[str, Any]) -> dict[str, Any]:
        """What transformers' own forward hands its language model, as native generate()
        settings: the encoders run, then the call stops (a pre-hook on the language model), so
        nothing of the language model runs stock. LLaVA: the prompt's embeddings with the image
        features in place of the image tokens. mllama: the image states' cross keys/values and
        the tile mask (additive bias and text rows that see a tile), as transformers prepared
        them. GIT: the layer stack's whole input (image features, then the prompt's embeddings
        with their positions and LayerNorm), the image part attending both ways."""
        captured: dict[str, Any] = {}

        def capture(module: Any, args: Any, kwargs: dict[str, Any]) -> None:
            captured.update(kwargs, args=args)
            raise _Captured

        handle = self.language.register_forward_pre_hook(capture, with_kwargs=True)
        try:
            self.model(input_ids=ids, attention_mask=mask, **media)
        except _Captured:
            pass
        finally:
            handle.remove()
        states = captured.get("cross_attention_states")
        if states is not None:
            batch = ids.shape[0]
            found: dict[str, Any] = {
                "cross_kv": self.native.cross_kv(states.reshape(batch, -1, states.shape[-1]))}
            bias = captured.get("cross_attention_mask")  # [B, 1, P, E]
            rows = captured.get("full_text_row_masked_out_mask")  # [B, 1, P, 1]
            if bias is not None:
                found["cross_bias"] = bias[:, 0]
            if rows is not None:
                found["cross_rows"] = rows[:, 0, :, 0]
            return found
        if captured.get("inputs_embeds") is not None:
            return {"inputs_embeds": captured["inputs_embeds"]}
        stack_input = (captured.get("args") or (None,))[0]
        if stack_input is None:
            raise UserError("native backend: the model's forward did not hand its language "
                            "model input embeddings or image states")
        return {"inputs_embeds": stack_input, "prefix_len": stack_input.shape[1] - ids.shape[1]}


def prepare(settings: Settings, loaded: LoadedModel, backend: str, *,
            place_weights: bool = True, announce: bool = True) -> Any:
    """The loaded multimodal model on `backend`, its language model quantized if asked (in this
    process, round to nearest); the encoders stay transformers' own. A backends.PreparedModel.
    place_weights=False: a native model's weights stay where they are (tensor parallel places
    its slices once cut); announce=False: no console line of the quantization."""
    import torch

    from llmbench import backends
    from llmbench.models import decode_step_bytes, is_cross_kv
    from llmbench.quant import apply
    from llmbench.quant.workflow import scheme_of

    dtype = settings.model.dtype
    family = loaded.family.model_type
    layout = LAYOUTS[family]
    model = loaded.model
    language = language_model(model, family)
    scheme = scheme_of(settings.quantization)
    qlinears = None
    if scheme is not None:
        qlinears = apply.quantize_rtn(language, scheme)  # from the fp32 weights load gave
        if dtype != loaded.dtype:
            model.to(getattr(torch, dtype))
            loaded.dtype = dtype
        qlinears = apply.set_compute(
            {n: q.to_bf16() if isinstance(q, apply.FloatLinear) and dtype == "bfloat16"
             else q for n, q in qlinears.items()}, scheme)
    encoders = (f"{', '.join(layout.encoders)}: transformers' own modules (stock), once per "
                "prompt")
    fallback = None
    prepared = None
    if backend == "native":
        candidate = backends.prepare(language, backend="native", dtype=dtype,
                                     family=language.config.model_type,
                                     kv_cache_dtype=settings.model.kv_cache_dtype,
                                     place_weights=place_weights and qlinears is None)
        if candidate.backend == "native":
            prepared = candidate
        else:
            fallback = candidate.details["fallback_reason"]
    details: dict[str, Any] = {"encoders": encoders}
    if prepared is not None:
        native = prepared.model
        if qlinears is not None:
            details["native_projections_replaced"] = apply.install_native(native, qlinears)
        # The native model holds the decoder layers now; the stock ones would be a second copy
        # in memory (the forward that builds the prompt's embeddings stops before them).
        stack = language.get_submodule(layout.language[0][0])
        setattr(stack, "layers" if hasattr(stack, "layers") else "layer", torch.nn.ModuleList())
        model.set_submodule(layout.language[-1][1], torch.nn.Identity())
        weight_bytes = native.weight_bytes
        if family == "whisper":  # the encoder's states feed the native decoder's cross-attention
            from llmbench.backends.native_whisper import NativeWhisper

            runner: Any = NativeWhisper(model, native)
        else:  # the encoders' features enter the native decoder's prompt embeddings
            runner = NativeMultimodal(model, language.get_submodule(layout.language[0][0]),
                                      native)
        result = backends.PreparedModel(
            model=runner, backend="native", details={**prepared.details, **details,
                                       "language_model": language.config.model_type})
    else:
        if backend == "native":
            details.update({"requested": "native", "fallback_reason": fallback})
        if qlinears is not None:
            apply.install_hf(language, qlinears)
            language.write_back()
        weight_bytes = decode_step_bytes(model, model.get_decoder()) + sum(
            q.nbytes for name, q in (qlinears or {}).items() if not is_cross_kv(name))
        result = backends.PreparedModel(model=model.eval(), backend="stock", details={
            "attention": getattr(model.config, "_attn_implementation", None), **details})
    if qlinears is not None:
        quantization = apply.quantization_details(qlinears, scheme)
        quantization["part"] = "the language model (the encoders stay float)"
        quantization["saved"] = False
        result.details["quantization"] = quantization
        if announce:
            print(f"quantized: {scheme.describe()} of the language model in this process, "
                  f"not saved ({weight_bytes / 2**20:.1f} MiB read per token)", flush=True)
    result.details["weight_bytes_per_token"] = weight_bytes
    loaded.decode_weight_bytes = weight_bytes
    return result


class EncoderTimer:
    """When a multimodal model runs its vision / audio encoder modules during one generate()
    (forward hooks), so that the first token's latency splits into encoder time and language
    prefill time."""

    def __init__(self, model: Any, family: str) -> None:
        self.intervals: list[tuple[float, float]] = []
        self._open: dict[int, float] = {}
        for path in LAYOUTS[family].encoders:
            module = model.get_submodule(path)
            module.register_forward_pre_hook(
                lambda m, a: self._open.__setitem__(id(m), time.perf_counter()))
            module.register_forward_hook(
                lambda m, a, o: self.intervals.append((self._open.pop(id(m)),
                                                       time.perf_counter())))

    def start(self) -> None:
        self.intervals = []

    def seconds_before(self, stamp: float | None) -> float:
        """Encoder seconds that ended before `stamp` (None: all of them)."""
        return sum(end - start for start, end in self.intervals
                   if stamp is None or end <= stamp)
