"""utils/run_gptq.py's command line: the GPTQ flags, checked, as llmbench.quant.gptq's
GPTQSettings, ScaleTuning and GPTQJob."""

from __future__ import annotations

import argparse
from pathlib import Path

from llmbench.cli import flags
from llmbench.errors import UserError
from llmbench.quant.gptq import TUNE_DEFAULTS, TUNE_NSAMPLES, GPTQJob, GPTQSettings
from llmbench.quant.scale_tuning import ScaleTuning
from llmbench.quant.scheme import MIN_GROUP

DESCRIPTION = ("GPTQ INT4 (our implementation of Frantar et al. 2022) with a local calibration "
               "text; writes a Hugging Face GPTQ folder that -m loads and "
               "gptq_checkpoint.safetensors for --low-precision-checkpoint.")


def add_gptq_flags(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    group = parser.add_argument_group("GPTQ")
    group.add_argument(*flags.MODEL_FLAG_NAMES, dest="model_name_or_path", default=None,
                       help="float model: hub id, local folder or .gguf (default: the embedded "
                            "SmolLM2-135M-Instruct)")
    group.add_argument("--output-dir", default="./saved_results/gptq",
                       help="the GPTQ folder to write (new or empty)")
    group.add_argument("--wbits", type=int, default=4, help="weight bits (only 4)")
    group.add_argument("--group-size", type=int, default=128,
                       help="input channels per scale: a power of two >= 32, or -1 per-channel")
    group.add_argument("--sym", dest="sym", action="store_true", default=False,
                       help="symmetric weights (zero point 8)")
    group.add_argument("--asym", dest="sym", action="store_false",
                       help="asymmetric weights, an integer zero point per group (default)")
    group.add_argument("--act-order", action="store_true",
                       help="quantize columns in decreasing Hessian diagonal order (desc_act)")
    group.add_argument("--static-groups", action="store_true",
                       help="every group's scale and zero from the weights before GPTQ's error "
                            "updates, groups in channel order (with --act-order: no input "
                            "permutation at run time)")
    group.add_argument("--percdamp", type=float, default=0.01,
                       help="Hessian dampening, a fraction of its mean diagonal (default 0.01)")
    group.add_argument("--nsamples", type=flags.positive_int, default=32,
                       help="calibration windows (default 32)")
    group.add_argument("--seqlen", type=flags.positive_int, default=256,
                       help="tokens per calibration window (default 256)")
    flags.add_dataset_flag(group)
    group.add_argument("--seed", type=int, default=0, help="seed of the window sampling")
    group.add_argument("--tune-scales", action="store_true",
                       help="after GPTQ, tune its group scales end to end (integers fixed) by "
                            "the KL divergence to the float model on calibration windows; "
                            "needs a second float copy of the model in memory")
    group.add_argument("--tune-epochs", type=flags.positive_int, default=None,
                       help=f"passes over the tuning windows (default {TUNE_DEFAULTS.epochs})")
    group.add_argument("--tune-nsamples", type=flags.positive_int, default=None,
                       help=f"tuning windows of --seqlen tokens, another draw than GPTQ's "
                            f"(default {TUNE_NSAMPLES})")
    group.add_argument("--tune-lr", type=float, default=None,
                       help=f"Adam learning rate on log(scale) (default {TUNE_DEFAULTS.lr})")
    group.add_argument("--skip-rtn", action="store_true",
                       help="don't measure round-to-nearest for comparison")
    return group


def build_parser(prog: str = "run_gptq.py") -> flags.Parser:
    return flags.build_parser(prog, DESCRIPTION, (add_gptq_flags,))


def settings_from_args(args: argparse.Namespace) -> GPTQSettings:
    if args.wbits != 4:
        raise UserError(f"--wbits {args.wbits}: only 4-bit GPTQ runs here (our int4 kernel)")
    group = args.group_size
    if group != -1 and (group < MIN_GROUP or group & (group - 1)):
        raise UserError(f"--group-size {group}: use -1 (per-channel) or a power of two >= "
                        f"{MIN_GROUP}")
    if not 0 < args.percdamp < 1:
        raise UserError(f"--percdamp {args.percdamp}: use a fraction in (0, 1)")
    return GPTQSettings(group_size=group, sym=args.sym, act_order=args.act_order,
                        percdamp=args.percdamp, static_groups=args.static_groups)


def tuning_from_args(args: argparse.Namespace) -> ScaleTuning | None:
    given = [flag for flag, value in (("--tune-epochs", args.tune_epochs),
                                      ("--tune-nsamples", args.tune_nsamples),
                                      ("--tune-lr", args.tune_lr)) if value is not None]
    if not args.tune_scales:
        if given:
            raise UserError(f"{given[0]} needs --tune-scales")
        return None
    if args.tune_lr is not None and not 0 < args.tune_lr < 1:
        raise UserError(f"--tune-lr {args.tune_lr}: use a rate in (0, 1)")
    return ScaleTuning(epochs=args.tune_epochs or TUNE_DEFAULTS.epochs,
                       lr=args.tune_lr or TUNE_DEFAULTS.lr)


def main(argv: list[str] | None = None) -> int:
    from llmbench.quant import gptq

    args = build_parser().parse_args(argv)
    settings = settings_from_args(args)
    tuning = tuning_from_args(args)
    job = GPTQJob(model_name_or_path=args.model_name_or_path, output_dir=Path(args.output_dir),
                  dataset=args.dataset, nsamples=args.nsamples, seqlen=args.seqlen,
                  seed=args.seed, skip_rtn=args.skip_rtn, tune_nsamples=args.tune_nsamples)
    return gptq.run(job, settings, tuning)
