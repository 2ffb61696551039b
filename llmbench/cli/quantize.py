"""single_instance/run_quantization.py's command line: quantize (llmbench.quantize) and save,
then with --benchmark run_generation.py's step on the saved model."""

from __future__ import annotations

import argparse

from llmbench.cli import flags, settings_from
from llmbench.errors import UserError

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
    from llmbench.quantize import quantize_and_save

    path = quantize_and_save(settings)
    if args.benchmark:
        return run_benchmark(parser, args, str(path))
    return 0
