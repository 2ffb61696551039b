"""The quantization settings' Scheme (checked once, before anything loads), and the quantization
steps the benchmark, accuracy and rank programs share: quantizing in their own process, loading
a saved model or a low-precision checkpoint. The run_quantization.py program itself is
llmbench.quantize; the flags' checks that need the command line are llmbench.cli's."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

from llmbench.errors import UserError
from llmbench.quant.scheme import (
    DEFAULT_ACT_QUANT_MODE,
    Scheme,
    check_lowp_mode,
    resolve_group_size,
)
from llmbench.settings import QuantizationSettings, Settings


def method_of(q: QuantizationSettings) -> str | None:
    chosen = [name for name, on in (("woq", q.ipex_weight_only_quantization),
                                    ("smoothquant", q.ipex_smooth_quant)) if on]
    if q.gptq and chosen != ["woq"]:
        raise UserError("--gptq applies with --ipex-weight-only-quantization (INT4 weights by "
                        "GPTQ)")
    if len(chosen) > 1:
        raise UserError("--ipex-weight-only-quantization and --ipex-smooth-quant exclude each "
                        "other: pick one")
    if q.low_precision_checkpoint is not None:
        if q.ipex_smooth_quant:
            raise UserError("--low-precision-checkpoint is an INT4 weight-only checkpoint; it "
                            "does not combine with --ipex-smooth-quant")
        return "checkpoint"
    return chosen[0] if chosen else None


def scheme_of(q: QuantizationSettings) -> Scheme | None:
    """The scheme the flags ask for (None: no quantization flag given); bad combinations are
    refused here, before anything is loaded."""
    method = method_of(q)
    if method is None:
        return None
    check_lowp_mode(q.lowp_mode, q.act_quant_mode,
                    "INT4" if method == "checkpoint" else q.weight_dtype)
    if method == "checkpoint":  # INT4 GPTQ/AWQ: the file's own settings decide
        return checkpoint_scheme(q)
    if method == "smoothquant":
        from llmbench.quant.calibration import check_dataset_arg

        if q.weight_dtype != "INT8" or q.group_size not in (0, -1):
            raise UserError("--ipex-smooth-quant is static INT8 per-channel: --weight-dtype and "
                            "--group-size don't apply")
        check_dataset_arg(q.dataset)
        if q.act_quant_mode is not None:
            raise UserError("--act-quant-mode doesn't apply to --ipex-smooth-quant: its "
                            "activations are int8 per tensor with calibrated static scales")
        return Scheme("smoothquant", "INT8", -1, True, q.lowp_mode, True, {"alpha": q.alpha})
    if q.gptq:
        # v2.1's --gptq: INT4 weights by GPTQ (the --weight-dtype default INT8 is the old
        # scripts' too, and meant INT4 there with --gptq)
        if q.weight_dtype not in ("INT8", "INT4"):
            raise UserError(f"--gptq makes INT4 weights, not --weight-dtype {q.weight_dtype}")
        group = resolve_group_size("INT4", q.group_size)
        return Scheme("gptq", "INT4", group, q.woq_sym_quant_weight, q.lowp_mode,
                      act_quant_mode=act_quant_mode_of(q))
    group = resolve_group_size(q.weight_dtype, q.group_size)
    sym = q.woq_sym_quant_weight or q.weight_dtype in ("NF4", "FP8")
    return Scheme("woq", q.weight_dtype, group, sym, q.lowp_mode,
                  act_quant_mode=act_quant_mode_of(q))


def act_quant_mode_of(q: QuantizationSettings) -> str:
    return q.act_quant_mode or DEFAULT_ACT_QUANT_MODE


def checkpoint_scheme(q: QuantizationSettings) -> Scheme:
    """--low-precision-checkpoint: INT4 GPTQ/AWQ whose settings the file gives (read in step 1);
    --weight-dtype INT8, the flag's default, is ignored, NF4 / FP8 contradict it. The path is
    the one llmbench.cli resolved (resolve_checkpoint_path)."""
    if q.weight_dtype in ("NF4", "FP8"):
        raise UserError(f"--low-precision-checkpoint holds INT4 GPTQ/AWQ weights, not "
                        f"--weight-dtype {q.weight_dtype}")
    assert q.low_precision_checkpoint is not None
    return Scheme("checkpoint", "INT4", 0, False, q.lowp_mode,
                  act_quant_mode=act_quant_mode_of(q),
                  extra={"checkpoint_file": str(Path(q.low_precision_checkpoint)
                                                .expanduser().resolve())})


def resolve_checkpoint_path(path: str) -> Path:
    """--low-precision-checkpoint as IPEX v2.1's README writes it, saved_results/
    gptq_checkpoint_g128.pt (its utils/run_gptq.py's torch file): where that file doesn't exist
    and our utils/run_gptq.py's gptq_checkpoint.safetensors is beside it, that one (with a
    note)."""
    given = Path(path).expanduser()
    if given.exists() or given.suffix not in (".pt", ".pth", ".bin"):
        return given
    ours = given.with_name("gptq_checkpoint.safetensors")
    if ours.is_file():
        print(f"note: --low-precision-checkpoint {path}: IPEX's torch checkpoint is not made "
              f"here; using {ours}, which utils/run_gptq.py wrote", flush=True)
        return ours
    return given


def check_saved_scheme(saved: Scheme, wanted: Scheme | None, path: str) -> None:
    """A saved model must be what the flags ask for (when they ask for something)."""
    if wanted is None:
        return
    if wanted.method == "checkpoint":  # run.py's benchmark step: the model step 1 saved
        if saved.extra.get("checkpoint_file") != wanted.extra["checkpoint_file"]:
            raise UserError(f"{path} was not made from --low-precision-checkpoint "
                            f"{wanted.extra['checkpoint_file']}: pass one of them")
        return
    same = (saved.method == wanted.method or (saved.method in ("gptq", "awq")
                                              and wanted.method == "woq"))
    if wanted.method == "woq":
        same = same and (saved.weight_dtype, saved.group_size, saved.sym) == (
            wanted.weight_dtype, wanted.group_size, wanted.sym)
    if wanted.method == "smoothquant":
        same = same and str(saved.extra.get("alpha")) == str(wanted.extra.get("alpha"))
    if not same:
        raise UserError(f"{path} holds {saved.describe()}, but the flags ask for "
                        f"{wanted.describe()}")


def quantize_gptq(q: QuantizationSettings, loaded: Any, scheme: Scheme
                  ) -> tuple[dict[str, Any], dict[str, Any]]:
    """--gptq: GPTQ (llmbench.quant.gptq, utils/run_gptq.py's algorithm) over the decoder
    layers, calibrated on --calib-iters windows of --calib-len tokens of --dataset (default: the
    shipped text); the lm_head INT8 per channel as for INT4 round to nearest."""
    import torch

    from llmbench.quant import apply
    from llmbench.quant.calibration import load_texts
    from llmbench.quant.gptq import GPTQSettings, calibration_ids, int4_linears, quantize_model
    from llmbench.quant.rtn import quantize_weight

    texts, source = load_texts(q.dataset)
    gptq = GPTQSettings(group_size=scheme.group_size, sym=scheme.sym)
    torch.manual_seed(0)
    calib, _ = calibration_ids(loaded.tokenizer, texts, q.calib_iters, q.calib_len, 0)
    start = time.perf_counter()
    results = quantize_model(loaded.model, calib, gptq, log=lambda line: None)
    qlinears = int4_linears(loaded.model, results)
    output = loaded.model.get_output_embeddings()
    for name, module in apply.linear_modules(loaded.model).items():
        if module is output and name not in qlinears:
            qlinears[name] = quantize_weight(module.weight, module.bias,
                                             apply.projection_scheme(scheme, True))
    info = {"calibration": {"source": source, "nsamples": q.calib_iters, "seqlen": q.calib_len},
            "layers": len(results), "seconds": round(time.perf_counter() - start, 2)}
    print(f"gptq: {len(results)} projections, calibration {q.calib_iters} x {q.calib_len} tokens "
          f"of {source}, in {info['seconds']:.1f} s", flush=True)
    return qlinears, info


def quantize_in_process(settings: Settings, loaded: Any, scheme: Scheme,
                        backend: str, announce: bool = True) -> Any:
    """Weight-only quantization of the loaded fp32 model in this process (nothing saved): what
    the accuracy scripts (and each rank of --autotp --backend native) do for `--dtype
    int8|int4` / --ipex-weight-only-quantization without a saved model. The float layers then
    run in settings.model.dtype. announce: print what ran."""
    import torch

    from llmbench.quant import apply

    dtype = settings.model.dtype
    if scheme.method == "gptq":
        qlinears, _ = quantize_gptq(settings.quantization, loaded, scheme)
    else:
        qlinears = apply.quantize_rtn(loaded.model, scheme)
    if dtype != "float32":
        loaded.model.to(getattr(torch, dtype))
        loaded.dtype = dtype
    prepared = apply.prepare_quantized(loaded, qlinears, backend=backend, dtype=dtype,
                                       kv_cache_dtype=settings.model.kv_cache_dtype, scheme=scheme)
    if announce:
        print(f"quantized: {scheme.describe()} in this process, not saved "
              f"({prepared.details['weight_bytes_per_token'] / 2**20:.1f} MiB read per token)",
              flush=True)
    return prepared


def prepare_saved(settings: Settings, loaded: Any, backend: str) -> Any:
    """run_generation.py --quantized-model-path: the saved projections put into the loaded
    float model, after checking it is the model and the scheme they were made for. Also -m
    of a GPTQ/AWQ folder: the projections load_model converted (loaded.quantized)."""
    from llmbench.quant import apply

    q = settings.quantization
    path = q.quantized_model_path
    if loaded.quantized is not None:
        return prepare_checkpoint_folder(settings, loaded, backend)
    wanted = scheme_of(q)
    qlinears, scheme, meta, floats = apply.load(path)
    check_saved_scheme(scheme, wanted, path)
    if q.lowp_mode != "AUTO":  # how to compute is this run's choice, not the saved weights'
        check_lowp_mode(q.lowp_mode, q.act_quant_mode, scheme.weight_dtype)
        scheme = dataclasses.replace(scheme, lowp_mode=q.lowp_mode,
                                     act_quant_mode=act_quant_mode_of(q))
    apply.check_identity(meta["source_model"], apply.model_identity(loaded), path)
    apply.check_against_model(qlinears, loaded.model, path)
    prepared = apply.prepare_quantized(loaded, qlinears, backend=backend,
                                       dtype=settings.model.dtype,
                                       kv_cache_dtype=settings.model.kv_cache_dtype, scheme=scheme,
                                       float_overrides=floats)
    prepared.details["quantization"].update({"path": str(path), "quality": meta.get("quality")})
    if "smoothquant" in meta:  # alphas, calibration, which projections stayed float and why
        prepared.details["quantization"]["smoothquant"] = meta["smoothquant"]
    print(f"quantized: {scheme.describe()} from {path} "
          f"({prepared.details['weight_bytes_per_token'] / 2**20:.1f} MiB read per token)",
          flush=True)
    return prepared


def prepare_checkpoint_folder(settings: Settings, loaded: Any, backend: str,
                              announce: bool = True) -> Any:
    """-m DIR of a GPTQ/AWQ folder: its int4 projections, converted at load, put in.
    announce: print what the folder holds and what runs (False: the other ranks of a
    tensor-parallel run, whose rank 0 says it)."""
    from llmbench.quant import apply

    q = settings.quantization
    qlinears, scheme = loaded.quantized
    wanted = None if q.quantized_model_path is not None else scheme_of(q)
    if q.quantized_model_path is not None or (wanted is not None and (
            wanted.method not in ("woq", "gptq") or wanted.weight_dtype not in ("INT8", "INT4")
            or q.group_size not in (0, scheme.group_size))):
        raise UserError(f"-m {loaded.source.display_name} is already a quantized GPTQ/AWQ "
                        f"checkpoint ({scheme.describe()}): drop the quantization flags, or pass "
                        "only --ipex-weight-only-quantization [--weight-dtype INT4] "
                        "[--lowp-mode ...] as the examples do")
    if wanted is not None:
        # The examples' `-m <INT4 checkpoint> --ipex-weight-only-quantization --weight-dtype
        # INT4 --lowp-mode BF16`: the checkpoint's weights are used; the flags choose how to
        # compute.
        if announce:
            print(f"note: -m {loaded.source.display_name} holds {scheme.describe()} weights: "
                  "they are used as they are (--ipex-weight-only-quantization quantizes nothing "
                  f"more; --lowp-mode {wanted.lowp_mode} sets the compute)", flush=True)
        scheme = dataclasses.replace(scheme, lowp_mode=wanted.lowp_mode,
                                     act_quant_mode=wanted.act_quant_mode)
    prepared = apply.prepare_quantized(loaded, qlinears, backend=backend,
                                       dtype=settings.model.dtype,
                                       kv_cache_dtype=settings.model.kv_cache_dtype, scheme=scheme)
    prepared.details["quantization"].update({
        "path": loaded.source.path, "checkpoint": {key: scheme.extra[key] for key in (
            "bits", "desc_act", "checkpoint_format")} | {"method": scheme.method,
                                                         "group_size": scheme.group_size}})
    if scheme.extra.get("float_int8_weights"):
        note = (f"{scheme.extra['float_int8_weights']} int8 weights of the checkpoint that are "
                "not linear layers here (fused MoE experts) run dequantized, in float")
        prepared.details["quantization"]["note"] = note
        if announce:
            print(f"note: {note}", flush=True)
    if announce:
        print(f"quantized: {scheme.describe()} (desc_act {scheme.extra['desc_act']}) checkpoint "
              f"{loaded.source.path} ({prepared.details['weight_bytes_per_token'] / 2**20:.1f} "
              "MiB read per token)", flush=True)
    return prepared
