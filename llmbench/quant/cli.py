"""single_instance/run_quantization.py: quantize a model, measure what it costs in quality, and
save it to --output-dir as best_model.safetensors + best_model.json (run.py's first step)."""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path
from typing import Any

from llmbench import flags
from llmbench.errors import UserError
from llmbench.quant.scheme import (
    DEFAULT_ACT_QUANT_MODE,
    Scheme,
    check_lowp_mode,
    resolve_group_size,
)

DESCRIPTION = ("Quantize a causal LM (weight-only round to nearest, or SmoothQuant W8A8) and "
               "save it.")


def add_output_flags(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    group = parser.add_argument_group("output")
    group.add_argument("--output-dir", default="./saved_results",
                       help="where best_model.safetensors and best_model.json go")
    group.add_argument("--skip-quality", action="store_true",
                       help="don't measure perplexity and greedy agreement against fp32")
    return group


def build_parser(prog: str = "run_quantization.py") -> flags.Parser:
    return flags.build_parser(prog, DESCRIPTION, (flags.add_model_flags,
                                                  flags.add_quantization_flags,
                                                  add_output_flags))


def method_of(args: argparse.Namespace) -> str | None:
    chosen = [name for name, on in (("woq", args.ipex_weight_only_quantization),
                                    ("smoothquant", args.ipex_smooth_quant)) if on]
    if len(chosen) > 1:
        raise UserError("--ipex-weight-only-quantization and --ipex-smooth-quant exclude each "
                        "other: pick one")
    if args.low_precision_checkpoint is not None:
        if args.ipex_smooth_quant:
            raise UserError("--low-precision-checkpoint is an INT4 weight-only checkpoint; it "
                            "does not combine with --ipex-smooth-quant")
        return "checkpoint"
    return chosen[0] if chosen else None


def scheme_from_args(args: argparse.Namespace) -> Scheme | None:
    """The scheme the flags ask for (None: no quantization flag given); bad combinations are
    refused here, before anything is loaded."""
    method = method_of(args)
    if method is None:
        return None
    check_lowp_mode(args.lowp_mode, args.act_quant_mode,
                    "INT4" if method == "checkpoint" else args.weight_dtype)
    if method == "checkpoint":  # INT4 GPTQ/AWQ: the file's own settings decide
        return checkpoint_scheme(args)
    if method == "smoothquant":
        from llmbench.quant.calibration import check_dataset_arg

        if args.weight_dtype != "INT8" or args.group_size not in (0, -1):
            raise UserError("--ipex-smooth-quant is static INT8 per-channel: --weight-dtype and "
                            "--group-size don't apply")
        check_dataset_arg(args.dataset)
        if args.act_quant_mode is not None:
            raise UserError("--act-quant-mode doesn't apply to --ipex-smooth-quant: its "
                            "activations are int8 per tensor with calibrated static scales")
        return Scheme("smoothquant", "INT8", -1, True, args.lowp_mode, True,
                      {"alpha": args.alpha})
    group = resolve_group_size(args.weight_dtype, args.group_size)
    sym = args.woq_sym_quant_weight or args.weight_dtype in ("NF4", "FP8")
    return Scheme("woq", args.weight_dtype, group, sym, args.lowp_mode,
                  act_quant_mode=act_quant_mode_of(args))


def act_quant_mode_of(args: argparse.Namespace) -> str:
    return args.act_quant_mode or DEFAULT_ACT_QUANT_MODE


def checkpoint_scheme(args: argparse.Namespace) -> Scheme:
    """--low-precision-checkpoint: INT4 GPTQ/AWQ whose settings the file gives (read in step 1);
    --weight-dtype INT8, the flag's default, is ignored, NF4 / FP8 contradict it."""
    if args.weight_dtype in ("NF4", "FP8"):
        raise UserError(f"--low-precision-checkpoint holds INT4 GPTQ/AWQ weights, not "
                        f"--weight-dtype {args.weight_dtype}")
    return Scheme("checkpoint", "INT4", 0, False, args.lowp_mode,
                  act_quant_mode=act_quant_mode_of(args),
                  extra={"checkpoint_file": str(Path(args.low_precision_checkpoint)
                                                .expanduser().resolve())})


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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    scheme = scheme_from_args(args)
    if scheme is None:
        raise UserError("nothing to quantize: pass --ipex-weight-only-quantization, "
                        "--ipex-smooth-quant or --low-precision-checkpoint")
    if args.quantized_model_path is not None:
        raise UserError("--quantized-model-path is already quantized: benchmark it with "
                        "run_generation.py (or run.py --benchmark)")
    if args.backend == "ipex" or args.ipex:
        raise UserError("quantization runs on our kernels (--backend stock or native), not IPEX")

    from llmbench.models import load_model
    from llmbench.quant import apply, quality

    start = time.perf_counter()
    loaded = load_model(args.model_name_or_path, "float32", args.config_file)
    if loaded.quantized is not None:
        raise UserError(f"{loaded.source.display_name} is already quantized "
                        f"({loaded.quantized[1].describe()}): benchmark it with -m directly")
    identity = apply.model_identity(loaded)
    model, tokenizer = loaded.model, loaded.tokenizer
    print(f"model: {loaded.source.display_name} | family {loaded.family.model_type} | "
          f"quantizing: {scheme.describe()}", flush=True)
    reference = None if args.skip_quality else quality.measure_reference(model, tokenizer)

    extra: dict[str, Any] = {}
    float_overrides: dict[str, Any] = {}
    recipe = None
    if scheme.method == "woq":
        qlinears = apply.quantize_rtn(model, scheme)
    elif scheme.method == "checkpoint":
        from llmbench.quant.checkpoint import load_low_precision

        qlinears, file_scheme = load_low_precision(args.low_precision_checkpoint, model)
        scheme = dataclasses.replace(file_scheme, lowp_mode=scheme.lowp_mode,
                                     act_quant_mode=scheme.act_quant_mode)
        if args.group_size not in (0, scheme.group_size):
            raise UserError(f"--group-size {args.group_size}: the checkpoint's group size is "
                            f"{scheme.group_size}")
        print(f"checkpoint: {scheme.describe()} (desc_act {scheme.extra['desc_act']}, settings "
              f"{scheme.extra['settings_from']})", flush=True)
    elif scheme.method == "smoothquant":
        from llmbench.quant import smoothquant

        qlinears, float_overrides, result_sq = smoothquant.quantize(loaded, args, identity)
        recipe, extra["smoothquant"] = result_sq["recipe"], result_sq["info"]
        fallback = extra["smoothquant"]["fallback"]
        print(f"smoothquant: alpha {scheme.extra['alpha']} (mean over groups "
              f"{extra['smoothquant']['alpha_mean']}); {len(fallback)} projection(s) kept in "
              f"float: {', '.join(fallback) or 'none'}", flush=True)
    else:  # refused in scheme_from_args; kept for when they land
        raise UserError(f"{scheme.method} is not implemented yet")
    quantize_seconds = time.perf_counter() - start
    apply.set_float_tensors(model, float_overrides)
    apply.set_compute(qlinears, scheme)  # quality is measured as the benchmark will compute
    apply.install_hf(model, qlinears)

    result = None
    if reference is not None:
        result = quality.compare(reference, model, tokenizer)
        print(f"quality ({scheme.describe()}): {quality.summary(result)}", flush=True)
    extra["quantize_seconds"] = quantize_seconds
    path = apply.save(args.output_dir, qlinears, scheme, identity, result, float_overrides,
                      extra)
    weight_bytes = sum(q.nbytes for q in qlinears.values())
    print(f"quantized {len(qlinears)} projections ({weight_bytes / 2**20:.1f} MiB) in "
          f"{quantize_seconds:.1f} s", flush=True)
    print(f"saved: {path} and {apply.meta_path_for(path).name}", flush=True)
    if recipe is not None and extra["smoothquant"]["recipe"]["state"] == "written":
        from llmbench.quant.smoothquant import write_recipe

        write_recipe(args.qconfig_summary_file, recipe)
        print(f"smoothquant recipe: {args.qconfig_summary_file}", flush=True)
    return 0


def prepare_saved(args: argparse.Namespace, loaded: Any, backend: str) -> Any:
    """run_generation.py --quantized-model-path: the saved projections put into the loaded
    float model, after checking it is the model and the scheme they were made for. Also -m
    of a GPTQ/AWQ folder: the projections load_model converted (loaded.quantized)."""
    from llmbench.quant import apply

    path = args.quantized_model_path
    if loaded.quantized is not None:
        return prepare_checkpoint_folder(args, loaded, backend)
    wanted = scheme_from_args(args)
    qlinears, scheme, meta, floats = apply.load(path)
    check_saved_scheme(scheme, wanted, path)
    if args.lowp_mode != "AUTO":  # how to compute is this run's choice, not the saved weights'
        check_lowp_mode(args.lowp_mode, args.act_quant_mode, scheme.weight_dtype)
        scheme = dataclasses.replace(scheme, lowp_mode=args.lowp_mode,
                                     act_quant_mode=act_quant_mode_of(args))
    apply.check_identity(meta["source_model"], apply.model_identity(loaded), path)
    apply.check_against_model(qlinears, loaded.model, path)
    prepared = apply.prepare_quantized(loaded, qlinears, backend=backend, dtype=args.dtype,
                                       kv_cache_dtype=args.kv_cache_dtype, scheme=scheme,
                                       float_overrides=floats)
    prepared.details["quantization"].update({"path": str(path), "quality": meta.get("quality")})
    if "smoothquant" in meta:  # alphas, calibration, which projections stayed float and why
        prepared.details["quantization"]["smoothquant"] = meta["smoothquant"]
    print(f"quantized: {scheme.describe()} from {path} "
          f"({prepared.details['weight_bytes_per_token'] / 2**20:.1f} MiB read per token)",
          flush=True)
    return prepared


def prepare_checkpoint_folder(args: argparse.Namespace, loaded: Any, backend: str) -> Any:
    """-m DIR of a GPTQ/AWQ folder: its int4 projections, converted at load, put in."""
    from llmbench.quant import apply

    if args.quantized_model_path is not None or scheme_from_args(args) is not None:
        raise UserError(f"-m {loaded.source.display_name} is already a quantized GPTQ/AWQ "
                        "checkpoint: drop the quantization flags")
    qlinears, scheme = loaded.quantized
    prepared = apply.prepare_quantized(loaded, qlinears, backend=backend, dtype=args.dtype,
                                       kv_cache_dtype=args.kv_cache_dtype, scheme=scheme)
    prepared.details["quantization"].update({
        "path": loaded.source.path, "checkpoint": {key: scheme.extra[key] for key in (
            "bits", "desc_act", "checkpoint_format")} | {"method": scheme.method,
                                                         "group_size": scheme.group_size}})
    print(f"quantized: {scheme.describe()} (desc_act {scheme.extra['desc_act']}) checkpoint "
          f"{loaded.source.path} ({prepared.details['weight_bytes_per_token'] / 2**20:.1f} MiB "
          "read per token)", flush=True)
    return prepared
