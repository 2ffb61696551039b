"""single_instance/run_quantization.py: quantize a model, measure what it costs in quality, and
save it to --output-dir as best_model.safetensors + best_model.json (run.py's first step);
with --benchmark, then benchmark the saved model (run_generation.py's step)."""

from __future__ import annotations

import argparse
import dataclasses
import time
from typing import Any

from llmbench import flags
from llmbench.cli import settings_from
from llmbench.errors import UserError
from llmbench.quant.workflow import quantize_gptq, scheme_of
from llmbench.settings import Settings

DESCRIPTION = ("Quantize a causal LM (weight-only round to nearest, or SmoothQuant W8A8) and "
               "save it.")


def add_output_flags(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    group = parser.add_argument_group("output")
    group.add_argument("--output-dir", default="./saved_results",
                       help="where best_model.safetensors and best_model.json go")
    group.add_argument("--skip-quality", action="store_true",
                       help="don't measure perplexity and greedy agreement against fp32")
    group.add_argument("--benchmark", action="store_true",
                       help="then benchmark the saved model (run_generation.py's flags); with "
                            "--quantized-model-path, only benchmark it")
    return group


def build_parser(prog: str = "run_quantization.py") -> flags.Parser:
    return flags.build_parser(prog, DESCRIPTION, (flags.add_model_flags,
                                                  flags.add_quantization_flags,
                                                  add_output_flags, flags.add_generation_flags,
                                                  flags.add_benchmark_run_flags))


def quantize_only_dests() -> list[str]:
    """What run.py passes its quantization step (the benchmark step gets the rest)."""
    parser = flags.build_parser("run_quantization.py", "", (
        flags.add_model_flags, flags.add_quantization_flags, add_output_flags))
    return [action.dest for action in parser._actions if action.dest != "benchmark"]


def benchmark_argv(parser: argparse.ArgumentParser, args: argparse.Namespace,
                   model_path: str) -> list[str]:
    """run_generation.py's command line for --benchmark of the saved model."""
    from llmbench.generation import build_parser as generation_parser

    dests = [action.dest for action in generation_parser()._actions
             if action.dest != "quantized_model_path"]
    return flags.forward_argv(parser, args, dests) + ["--quantized-model-path", model_path]


def check_benchmark_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.benchmark:
        return
    scratch = flags.Parser()
    only = [*flags.group_dests(scratch, flags.add_generation_flags(scratch)),
            *flags.group_dests(scratch, flags.add_benchmark_run_flags(scratch))]
    given = [flag for flag in flags.forward_argv(parser, args, only) if flag.startswith("--")]
    if given:
        raise UserError(f"{given[0]} only applies with --benchmark")


def run_benchmark(parser: argparse.ArgumentParser, args: argparse.Namespace,
                  model_path: str) -> int:
    from llmbench.steps import Step, run_step

    return run_step(Step("benchmark", "single_instance/run_generation.py",
                         benchmark_argv(parser, args, model_path)))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_benchmark_flags(parser, args)
    settings = settings_from(args)
    saved = settings.quantization.quantized_model_path
    if saved is not None:
        if not args.benchmark:
            raise UserError("--quantized-model-path is already quantized: benchmark it with "
                            "--benchmark, run_generation.py or run.py --benchmark")
        from llmbench.quant.apply import resolve_model_path

        return run_benchmark(parser, args, str(resolve_model_path(saved)))
    path = quantize_and_save(settings)
    if args.benchmark:
        return run_benchmark(parser, args, str(path))
    return 0


def quantize_and_save(settings: Settings) -> Any:
    """Quantize the model of these settings, measure the quality cost (unless skipped), save it
    to the output folder; the saved model's path."""
    model_settings, q = settings.model, settings.quantization
    scheme = scheme_of(q)
    if scheme is None:
        raise UserError("nothing to quantize: pass --ipex-weight-only-quantization, "
                        "--ipex-smooth-quant or --low-precision-checkpoint")
    if model_settings.backend == "ipex" or model_settings.ipex:
        raise UserError("quantization runs on our kernels (--backend stock or native), not IPEX")

    from llmbench.models import load_model
    from llmbench.quant import apply, quality

    start = time.perf_counter()
    loaded = load_model(model_settings.model_name_or_path, "float32", model_settings.config_file)
    if loaded.quantized is not None:
        raise UserError(f"{loaded.source.display_name} is already quantized "
                        f"({loaded.quantized[1].describe()}): benchmark it with -m directly")
    identity = apply.model_identity(loaded)
    model, tokenizer = loaded.model, loaded.tokenizer
    print(f"model: {loaded.source.display_name} | family {loaded.family.model_type} | "
          f"quantizing: {scheme.describe()}", flush=True)
    reference = None
    if loaded.family.seq2seq and not q.skip_quality:
        # quality's perplexity and greedy checks score a causal LM's next-token predictions
        print("note: quality check skipped: it scores decoder-only models, and "
              f"{loaded.family.model_type} is an encoder-decoder", flush=True)
    elif not q.skip_quality:
        reference = quality.measure_reference(model, tokenizer)

    extra: dict[str, Any] = {}
    float_overrides: dict[str, Any] = {}
    recipe = None
    if scheme.method == "woq":
        qlinears = apply.quantize_rtn(model, scheme)
    elif scheme.method == "gptq":
        qlinears, extra["gptq"] = quantize_gptq(q, loaded, scheme)
    elif scheme.method == "checkpoint":
        from llmbench.quant.checkpoint import load_low_precision

        qlinears, file_scheme = load_low_precision(q.low_precision_checkpoint, model)
        scheme = dataclasses.replace(file_scheme, lowp_mode=scheme.lowp_mode,
                                     act_quant_mode=scheme.act_quant_mode)
        if q.group_size not in (0, scheme.group_size):
            raise UserError(f"--group-size {q.group_size}: the checkpoint's group size is "
                            f"{scheme.group_size}")
        print(f"checkpoint: {scheme.describe()} (desc_act {scheme.extra['desc_act']}, settings "
              f"{scheme.extra['settings_from']})", flush=True)
    elif scheme.method == "smoothquant":
        from llmbench.quant import smoothquant

        qlinears, float_overrides, result_sq = smoothquant.quantize(loaded, q, identity)
        recipe, extra["smoothquant"] = result_sq["recipe"], result_sq["info"]
        fallback = extra["smoothquant"]["fallback"]
        print(f"smoothquant: alpha {scheme.extra['alpha']} (mean over groups "
              f"{extra['smoothquant']['alpha_mean']}); {len(fallback)} projection(s) kept in "
              f"float: {', '.join(fallback) or 'none'}", flush=True)
    else:  # refused in scheme_of; kept for when they land
        raise UserError(f"{scheme.method} is not implemented yet")
    quantize_seconds = time.perf_counter() - start
    apply.set_float_tensors(model, float_overrides)
    # quality is measured as the benchmark will compute; the projections saved are qlinears
    apply.install_hf(model, apply.set_compute(qlinears, scheme))

    result = None
    if reference is not None:
        result = quality.compare(reference, model, tokenizer)
        print(f"quality ({scheme.describe()}): {quality.summary(result)}", flush=True)
    extra["quantize_seconds"] = quantize_seconds
    path = apply.save(settings.measurement.output_dir, qlinears, scheme, identity, result,
                      float_overrides, extra)
    weight_bytes = sum(linear.nbytes for linear in qlinears.values())
    print(f"quantized {len(qlinears)} projections ({weight_bytes / 2**20:.1f} MiB) in "
          f"{quantize_seconds:.1f} s", flush=True)
    print(f"saved: {path} and {apply.meta_path_for(path).name}", flush=True)
    if recipe is not None and extra["smoothquant"]["recipe"]["state"] == "written":
        from llmbench.quant.smoothquant import write_recipe

        write_recipe(q.qconfig_summary_file, recipe)
        print(f"smoothquant recipe: {q.qconfig_summary_file}", flush=True)
    return path


