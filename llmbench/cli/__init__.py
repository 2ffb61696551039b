"""The command line, read once: the parsed flags become llmbench.settings.Settings here, and the
checks that need the command line itself (which flags were given, for the one-line refusals)
are made here. The rest of the library takes Settings, never the argparse namespace.

Normalizations made once, on the way in:
- --low-precision-checkpoint names IPEX's torch file where ours sits beside it: the path is
  resolved (with a note) so every later step and forwarded command line names the real file;
- the accuracy scripts' `--dtype int8|int4` (the examples' spelling) is weight-only
  quantization of that weight type, the float layers in fp32;
- --quant-with-amp (v2.1: --int8-bf16-mixed) runs the layers left unquantized in bf16.
The report's `config` records the flags after these.
"""

from __future__ import annotations

import argparse
from dataclasses import fields, replace

from llmbench.cli import flags
from llmbench.errors import UserError
from llmbench.quant.scheme import Scheme
from llmbench.quant.workflow import resolve_checkpoint_path, scheme_of
from llmbench.settings import GROUPS, Settings


def settings_from(args: argparse.Namespace) -> Settings:
    """The Settings of these parsed flags (a parser without a group leaves its defaults)."""
    if getattr(args, "low_precision_checkpoint", None) is not None:
        resolved = str(resolve_checkpoint_path(args.low_precision_checkpoint))
        args.low_precision_checkpoint = resolved  # forwarded steps name the real file too
    given = dict(vars(args))
    expect_weight = None
    if given.get("dtype") in ("int8", "int4"):
        expect_weight = given["dtype"].upper()
        if given["ipex_weight_only_quantization"] and given["weight_dtype"] not in ("INT8",
                                                                                  expect_weight):
            raise UserError(f"--dtype {given['dtype']} contradicts --weight-dtype "
                            f"{given['weight_dtype']}")
        if given["quantized_model_path"] is None and given["low_precision_checkpoint"] is None:
            given.update(ipex_weight_only_quantization=True, weight_dtype=expect_weight)
        given["dtype"] = "float32"
    if given.get("quant_with_amp"):
        given["dtype"] = "bfloat16"  # the layers left unquantized run in bf16
    groups = {name: cls(**{f.name: given[f.name] for f in fields(cls) if f.name in given})
              for name, cls in GROUPS.items()}
    groups["accuracy"] = replace(groups["accuracy"], expect_weight_dtype=expect_weight)
    return Settings(**groups, flags=given)


# The quantization flags that weight-only quantization per rank uses; the group's others
# belong to SmoothQuant or to saved/checkpoint models.
WOQ_DESTS = ("ipex_weight_only_quantization", "weight_dtype", "group_size",
             "woq_sym_quant_weight", "lowp_mode", "quant_with_amp", "act_quant_mode")
WHOLE_MODEL_REASON = ("is not split per rank; quantize per rank with "
                      "--ipex-weight-only-quantization")


def autotp_scheme(parser: argparse.ArgumentParser, args: argparse.Namespace,
                  settings: Settings) -> Scheme | None:
    """The weight-only scheme an --autotp run quantizes each rank's slice with (None: no
    quantization), refusing in one line what can't run per rank. Used by run.py before the
    launch and by the rank script itself; `settings` are settings_from(args)."""
    if args.ipex_smooth_quant:
        raise UserError("--ipex-smooth-quant does not run with --autotp: its calibration and "
                        "smoothing are of the whole model; use --ipex-weight-only-quantization")
    if args.quantized_model_path is not None:
        raise UserError(f"--quantized-model-path does not run with --autotp: a saved quantized "
                        f"model {WHOLE_MODEL_REASON}")
    if args.low_precision_checkpoint is not None:
        raise UserError(f"--low-precision-checkpoint does not run with --autotp: a whole-model "
                        f"checkpoint {WHOLE_MODEL_REASON}")
    scratch = flags.Parser()
    group = flags.group_dests(scratch, flags.add_quantization_flags(scratch))
    other = [flag for flag in flags.forward_argv(parser, args,
                                                 [d for d in group if d not in WOQ_DESTS])
             if flag.startswith("--")]
    if other:
        raise UserError(f"{other[0]} does not apply with --autotp: it is a SmoothQuant setting, "
                        "and --autotp runs weight-only quantization only")
    if not args.ipex_weight_only_quantization:
        given = [flag for flag in flags.forward_argv(parser, args, list(WOQ_DESTS))
                 if flag.startswith("--")]
        if given:
            raise UserError(f"{given[0]} only applies with --ipex-weight-only-quantization")
        return None
    return scheme_of(settings.quantization)


def rank_settings(parser: argparse.ArgumentParser, args: argparse.Namespace
                  ) -> tuple[Settings, Scheme | None]:
    """What a rank refuses before joining the others (every rank alike): its Settings, and
    the weight-only scheme it quantizes its slice with (None: float)."""
    settings = settings_from(args)
    scheme = autotp_scheme(parser, args, settings)
    backend = "ipex" if settings.model.ipex else settings.model.backend
    if backend == "ipex":
        from llmbench.backends.ipex import require_ipex

        require_ipex()  # IPEX absent: one line saying so
    if backend not in ("stock", "native"):
        raise UserError(f"--autotp runs --backend stock or native, not {backend}")
    if settings.model.kv_cache_dtype != "auto" and backend != "native":
        raise UserError("--kv-cache-dtype needs --backend native")
    return settings, scheme
