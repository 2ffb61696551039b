"""run.py: validate the whole command line once, then run each step as a subprocess with the
flags that step understands, and exit with the status of the first step that fails."""

from __future__ import annotations

import argparse
import sys

from llmbench import sweep
from llmbench.cli import autotp_scheme, flags, settings_from
from llmbench.errors import UserError
from llmbench.settings import Settings
from llmbench.steps import Step, run_steps

DESCRIPTION = "Run a benchmark step (as the Xeon LLM example run.py does)."


def add_dispatch_flags(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    group = parser.add_argument_group("what to run")
    group.add_argument("--benchmark", action="store_true",
                       help="run the generation benchmark (single_instance/run_generation.py)")
    group.add_argument("--accuracy-only", action="store_true",
                       help="run lm-eval accuracy (single_instance/run_accuracy.py)")
    sweep_group = parser.add_argument_group(
        "sweeps (llmbench/sweep.py): comma lists for " + ", ".join(sweep.SWEEP_FLAGS)
        + " run the cross product with --benchmark, one config per process")
    sweep_group.add_argument("--output-format", default=None, metavar="md,csv,json,jsonl",
                             help="the sweep's results table formats (default md,json)")
    sweep_group.add_argument("--plot", action="store_true",
                             help="the sweep's PNGs: latency vs input tokens / batch size")
    return group


def build_parser() -> flags.Parser:
    parser = flags.build_parser("run.py", DESCRIPTION, flags.single_generation_groups())
    add_dispatch_flags(parser)
    flags.add_accuracy_flags(parser)
    flags.add_distributed_flags(parser)
    flags.add_rank_flags(parser)
    flags.add_quantization_flags(parser)
    return parser


def plan_steps(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[Step]:
    generation_parser = flags.build_parser("run_generation.py", "", (
        *flags.single_generation_groups(), flags.add_quantization_flags))
    generation_dests = [action.dest for action in generation_parser._actions]
    settings = settings_from(args)
    multimodal_checks(args, settings)
    steps = autotp_steps(parser, args, settings)
    if not args.autotp:
        from llmbench.backends import requested

        requested(args.backend, args.ipex)  # --ipex without IPEX: one line, before any step
    quantized_argv = quantization_steps(parser, args, settings, steps)
    if args.benchmark and not args.autotp:
        steps.append(Step("benchmark", "single_instance/run_generation.py",
                          flags.forward_argv(parser, args, generation_dests) + quantized_argv))
    accuracy_steps(parser, args, steps, quantized_argv)
    if not steps:
        raise UserError("nothing to run: pass --benchmark and/or --accuracy-only")
    return steps


def multimodal_checks(args: argparse.Namespace, settings: Settings) -> None:
    """--input-mode / --image-url / --audio: read and checked here (model family, files, what
    is not implemented yet), so that bad input is one line before any step starts."""
    from llmbench import multimodal

    if not multimodal.flags_given(settings):
        return
    if args.ipex or args.backend == "ipex":
        from llmbench.backends.ipex import require_ipex

        require_ipex()  # absent: the same line as for a text model, before anything else
    if not args.benchmark:
        raise UserError("--input-mode, --image-url and --audio apply to --benchmark")
    multimodal.check_request(settings)


def quantization_steps(parser: argparse.ArgumentParser, args: argparse.Namespace,
                       settings: Settings, steps: list[Step]) -> list[str]:
    """--ipex-weight-only-quantization (or another scheme): first quantize and save to
    --output-dir (single_instance/run_quantization.py), then the benchmark loads the saved model;
    --quantized-model-path skips the first step. Returns what the benchmark step adds.
    With --autotp there is no step: every rank quantizes its own slice."""
    from pathlib import Path

    from llmbench.cli import quantize
    from llmbench.quant.workflow import scheme_of

    if args.autotp:
        # Each rank quantizes its own slice after sharding (llmbench.quant.autotp): no step
        # here; the rank step gets the flags (its parser has them) and this refuses, before
        # the launch, what can't run per rank.
        autotp_scheme(parser, args, settings)
        return []
    scheme = scheme_of(settings.quantization)  # refuses bad combinations before anything runs
    if scheme is not None and args.benchmark and not args.accuracy_only:
        from llmbench import multimodal

        if multimodal.check_request(settings) is not None:
            return []  # the benchmark step quantizes a multimodal model's language model
    path = args.quantized_model_path
    if scheme is None and path is None:
        scratch = flags.Parser()
        only_quant = flags.group_dests(scratch, flags.add_quantization_flags(scratch))
        given = [flag for flag in flags.forward_argv(parser, args, only_quant)
                 if flag.startswith("--")]
        if given:
            raise UserError(f"{given[0]} only applies with --ipex-weight-only-quantization, "
                            "--ipex-smooth-quant or --quantized-model-path")
        return []
    if path is not None:
        return []
    from llmbench.quant.checkpoint_settings import folder_quantization

    if scheme.method != "checkpoint" and folder_quantization(args.model_name_or_path):
        return []  # -m is a GPTQ/AWQ folder: the benchmark step runs its weights as they are
    quantize_dests = quantize.quantize_only_dests()
    steps.append(Step("quantize", "single_instance/run_quantization.py",
                      flags.forward_argv(parser, args, quantize_dests)))
    return ["--quantized-model-path", str(Path(args.output_dir) / "best_model.safetensors")]


def accuracy_steps(parser: argparse.ArgumentParser, args: argparse.Namespace,
                   steps: list[Step], quantized_argv: list[str]) -> None:
    """--accuracy-only adds the lm-eval step (of the quantized model when one is made or
    given); its flags without it would do nothing, so refuse."""
    accuracy_parser = flags.build_parser("run_accuracy.py", "", flags.accuracy_groups())
    accuracy_dests = [action.dest for action in accuracy_parser._actions]
    if args.accuracy_only:
        steps.append(Step("accuracy", "single_instance/run_accuracy.py",
                          flags.forward_argv(parser, args, accuracy_dests) + quantized_argv))
        return
    scratch = flags.Parser()
    only_accuracy = flags.group_dests(scratch, flags.add_accuracy_flags(scratch))
    given = flags.forward_argv(parser, args, only_accuracy)
    if given:
        raise UserError(f"{given[0]} only applies with --accuracy-only")


def autotp_steps(parser: argparse.ArgumentParser, args: argparse.Namespace,
                 settings: Settings) -> list[Step]:
    """--autotp: the benchmark on every rank of a `deepspeed` launch (run.py runs on each rank and
    starts the rank's script), after --shard-model's step; their flags without it are refused."""
    scratch = flags.Parser()
    only_distributed = [*flags.group_dests(scratch, flags.add_distributed_flags(scratch)),
                        *flags.group_dests(scratch, flags.add_rank_flags(scratch))]
    given = [flag for flag in flags.forward_argv(parser, args, only_distributed)
             if flag.startswith("--")]
    if not args.autotp:
        if args.local_rank is not None:
            raise UserError("run.py was started on several ranks (--local_rank) without --autotp: "
                            "add --autotp, or run it without the distributed launcher")
        if given:
            raise UserError(f"{given[0]} only applies with --autotp")
        return []
    if not args.benchmark:
        raise UserError("--autotp runs the generation benchmark: pass --benchmark")
    if getattr(args, "accuracy_only", False):
        raise UserError("--autotp runs the generation benchmark only; run --accuracy-only "
                        "without it")
    if args.max_shard_size != "500MB" and not args.shard_model:
        raise UserError("--max-shard-size only applies with --shard-model")
    if args.ipex or args.backend == "ipex":
        from llmbench.backends.ipex import require_ipex

        require_ipex()  # IPEX absent: one line saying so
        raise UserError("--autotp with --ipex: ipex.llm.optimize of a DeepSpeed AutoTP model is "
                        "not wired in here; run --autotp without --ipex (transformers' model)")
    if args.backend not in ("stock", "native"):
        raise UserError("--autotp runs --backend stock or native")
    from llmbench.distributed.benchmark import build_parser as rank_parser

    rank_dests = [action.dest for action in rank_parser()._actions]
    rank_flags = flags.forward_argv(parser, args, ["local_rank", "dist_timeout"])
    steps = []
    from llmbench import multimodal

    shard = args.shard_model
    if shard and multimodal.check_request(settings) is not None:
        # Said, not ignored: the ranks load the multimodal model whole and shard its language
        # model in memory (llmbench.distributed.model.load_autotp_multimodal)
        print("note: --shard-model: a multimodal model is not pre-sharded; every rank loads it "
              "whole and AutoTP shards its language model in memory", flush=True)
        shard = False
    if shard:
        from llmbench.distributed.shards import default_shard_path

        save_path = str(default_shard_path(args.model_name_or_path, args.output_dir,
                                           args.config_file))
        shard_argv = ["--save-path", save_path, "--max-shard-size", args.max_shard_size]
        if args.model_name_or_path is not None:
            shard_argv += ["-m", args.model_name_or_path]
        if args.config_file is not None:  # applied once, saved in the shard's config
            shard_argv += ["--config-file", args.config_file]
        steps.append(Step("shard", "utils/create_shard_model.py", shard_argv + rank_flags))
        rank_dests = [dest for dest in rank_dests
                      if dest not in ("model_name_or_path", "config_file")]
        steps.append(Step("benchmark", "distributed/run_generation_with_deepspeed.py",
                          ["-m", save_path, *flags.forward_argv(parser, args, rank_dests)]))
    else:
        steps.append(Step("benchmark", "distributed/run_generation_with_deepspeed.py",
                          flags.forward_argv(parser, args, rank_dests)))
    return steps


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    lists = sweep.swept_values(argv)  # comma lists would not parse as single values
    if lists:
        return run_sweep(parser, argv, lists)
    args = parser.parse_args(argv)
    if args.output_format is not None or args.plot:  # a sweep of one config
        return run_sweep(parser, argv, lists)
    return run_steps(plan_steps(parser, args))


def run_sweep(parser: flags.Parser, argv: list[str], lists: dict[str, list[str]]) -> int:
    """Every config's command line is parsed and planned before the first one runs, so a bad
    value stops the sweep at once, in one line."""
    choices = sweep.choices(lists)
    first = parser.parse_args(sweep.config_argv(argv, choices[0]))
    if not first.benchmark or first.accuracy_only or first.autotp:
        raise UserError("a sweep runs --benchmark alone, single-instance (no --accuracy-only, "
                        "no --autotp)")
    formats = sweep.output_formats(first.output_format or "md,json")
    root = sweep.new_root(first.output_dir)
    configs = []
    for index, choice in enumerate(choices):
        folder = sweep.config_folder(root, index, choice)
        args = parser.parse_args(sweep.config_argv(argv, choice, folder))
        configs.append(sweep.Config(choice, folder, plan_steps(parser, args)))
    return sweep.run_sweep(configs, root, formats, first.plot, run_steps)
