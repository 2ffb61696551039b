"""Every command-line flag, defined once, in groups.

The entry scripts build their parsers from these groups, and run.py reuses the same groups both
to validate a command line and to forward it to the step it runs, so a flag means the same thing
everywhere. Names and defaults follow the Xeon LLM example scripts users already know.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from llmbench.errors import USER_ERROR_EXIT
from llmbench.settings import INPUT_MODES

DTYPES = ("float32", "bfloat16", "float16")
# The accuracy scripts' --dtype also takes the examples' int8 / int4: weight-only quantization
# (llmbench.cli.settings_from maps it onto the quantization settings).
ACCURACY_DTYPES = (*DTYPES, "int8", "int4")
# Where an older example's flag leaves its one-line note (see CompatFlag).
COMPAT_NOTES = "compat_notes"
BACKENDS = ("stock", "native", "ipex")
KV_CACHE_DTYPES = ("auto", "fp8_e5m2")


class Parser(argparse.ArgumentParser):
    """argparse that reports bad flags as one `error: ...` line and exits 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"error: {self.prog}: {message}", file=sys.stderr, flush=True)
        sys.exit(USER_ERROR_EXIT)

    def parse_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                   namespace: argparse.Namespace | None = None) -> argparse.Namespace:
        """argparse's, then one `note: ...` line per older-example flag given (CompatFlag)."""
        parsed = super().parse_args(args, namespace)
        for note in getattr(parsed, COMPAT_NOTES, None) or []:
            print(f"note: {note}", flush=True)
        return parsed


class CompatFlag(argparse.Action):
    """A flag of the older example scripts (IPEX v2.1's README and before): it sets today's
    equivalent settings (`sets`, possibly none) and leaves a one-line note that Parser prints,
    so it is never accepted silently. It is never forwarded itself (forward_argv skips it): run.py
    passes its steps today's flags."""

    def __init__(self, option_strings: Sequence[str], dest: str, *, note: str,
                 sets: dict[str, object] | None = None, help: str | None = None,
                 **kwargs: object) -> None:
        super().__init__(option_strings, dest=COMPAT_NOTES, nargs=0, default=None,
                         help=help or note)
        self.note = note
        self.sets = dict(sets or {})

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: object, option_string: str | None = None) -> None:
        for dest, value in self.sets.items():
            setattr(namespace, dest, value)
        notes = list(getattr(namespace, COMPAT_NOTES, None) or [])
        note = f"{option_string}: {self.note}"
        if note not in notes:
            notes.append(note)
        setattr(namespace, COMPAT_NOTES, notes)


def add_dataset_flag(group: argparse._ArgumentGroup) -> None:
    """--dataset, as GPTQ (utils/run_gptq.py) and SmoothQuant (llmbench/cli/flags.py) take it."""
    group.add_argument("--dataset", default=None, metavar="FILE",
                       help="calibration text: a .txt, JSONL with a 'text' field, or a hub "
                            "dataset id (default: the shipped texts, see "
                            "llmbench/quant/calibration.py)")


def add_compat_flag(group: argparse._ArgumentGroup, name: str, note: str,
                    sets: dict[str, object] | None = None) -> None:
    group.add_argument(name, action=CompatFlag, note=note, sets=sets)


def positive_int(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None


# Each group is a function that adds its flags to a parser and returns the argparse group, so a
# caller can later find which flags belong to which group (see forward_argv).
GroupAdder = Callable[[argparse.ArgumentParser], argparse._ArgumentGroup]


MODEL_FLAG_NAMES = ("-m", "--model-name-or-path", "--model-id", "--model")
MODEL_HELP = "hub id, local folder, or .gguf file; omitted: the embedded SmolLM2-135M-Instruct"
NOT_COMPILED_NOTE = ("not used: the v2.1 scripts' TorchScript path is IPEX's; the model runs as "
                     "--backend says (native: our compiled decode step)")


def add_model_flags(parser: argparse.ArgumentParser,
                    dtypes: Sequence[str] = DTYPES) -> argparse._ArgumentGroup:
    group = parser.add_argument_group("model")
    group.add_argument(*MODEL_FLAG_NAMES, dest="model_name_or_path", default=None,
                       help=MODEL_HELP)
    extra = (" (int8/int4: weight-only quantization, see --ipex-weight-only-quantization)"
             if "int8" in dtypes else "")
    group.add_argument("--dtype", choices=dtypes, default="float32",
                       help=f"dtype of the weights and of the computation (default float32)"
                            f"{extra}")
    group.add_argument("--config-file", default=None,
                       help="JSON whose keys override the model's config (see utils/model_config/)")
    group.add_argument("--backend", choices=BACKENDS, default="stock",
                       help="stock: transformers eager (default); native: our fused model and "
                            "kernels; ipex: ipex.llm.optimize (must import)")
    group.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default="auto",
                       help="native backend: KV cache in fp32, the activations' dtype "
                            "(auto), or fp8_e5m2")
    group.add_argument("--ipex", action="store_true",
                       help="same as --backend ipex (Intel Extension for PyTorch)")
    add_compat_flag(group, "--deployment-mode", NOT_COMPILED_NOTE)
    add_compat_flag(group, "--jit", NOT_COMPILED_NOTE)
    return group


def add_accuracy_model_flags(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """The model group of the accuracy scripts: --dtype also takes int8 / int4."""
    return add_model_flags(parser, ACCURACY_DTYPES)


def add_generation_flags(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    group = parser.add_argument_group("generation")
    group.add_argument("--input-tokens", type=positive_int, default=None,
                       help="prompt of exactly N tokens from prompt.json (default 32)")
    group.add_argument("--prompt", default=None, help="use this prompt text instead")
    group.add_argument("--max-new-tokens", type=positive_int, default=32,
                       help="tokens generated per iteration, exactly (default 32)")
    group.add_argument("--batch-size", type=positive_int, default=1,
                       help="the prompt replicated N times (default 1)")
    mode = group.add_mutually_exclusive_group()
    mode.add_argument("--greedy", action="store_true",
                      help="greedy search (default: 4-beam search)")
    mode.add_argument("--sample", action="store_true", help="multinomial sampling (seeded)")
    group.add_argument("--num-beams", type=positive_int, default=4,
                       help="beams for beam search, the default decoding mode (default 4)")
    group.add_argument("--seed", type=int, default=0, help="random seed for sampling (default 0)")
    group.add_argument("--generation-config", default=None, metavar="K=V,...",
                       help="extra generation settings, e.g. temperature=0.7,top_k=50")
    group.add_argument("--streaming", action="store_true",
                       help="print tokens as they are generated (one beam, batch 1)")
    return group




def input_mode(text: str) -> int:
    value = _int(text)
    if value not in INPUT_MODES:
        choices = ", ".join(f"{key} {name}" for key, name in INPUT_MODES.items())
        raise argparse.ArgumentTypeError(f"must be one of {choices}; got {value}")
    return value


def add_multimodal_flags(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """What a multimodal model reads besides the prompt (llmbench.multimodal)."""
    group = parser.add_argument_group("multimodal input (docs/multimodal.md)")
    group.add_argument("--input-mode", type=input_mode, default=None, metavar="{0,1,2,3}",
                       help="0 text, 1 vision (prompt + image), 2 speech (audio), 3 vision + "
                            "speech (default: 0, or what --image-url/--audio or a speech "
                            "model imply)")
    group.add_argument("--image-url", default=None, metavar="URL|PATH",
                       help="the image: an http(s) URL (fetched) or a local file (default: "
                            "the project's llmbench/data/sample_image.png)")
    group.add_argument("--audio", default=None, metavar="FILE.wav",
                       help="the audio: a local WAV file (default: the project's "
                            "llmbench/data/sample_audio.wav)")
    return group


def add_benchmark_flags(parser: argparse.ArgumentParser,
                        output_dir: bool = True) -> argparse._ArgumentGroup:
    group = parser.add_argument_group("benchmark")
    group.add_argument("--num-iter", type=positive_int, default=10,
                       help="measured iterations (default 10)")
    group.add_argument("--num-warmup", type=non_negative_int, default=2,
                       help="warm-up iterations, run first and never counted (default 2)")
    group.add_argument("--token-latency", action="store_true",
                       help="time every decoding step: first-token and next-token latency")
    group.add_argument("--profile", action="store_true",
                       help="profile one extra iteration: operator table and a trace file")
    if output_dir:
        group.add_argument("--output-dir", default="./saved_results",
                           help="where reports are written (default ./saved_results)")
    return group


def add_benchmark_run_flags(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """The benchmark group of run_quantization.py --benchmark (its --output-dir is its own)."""
    return add_benchmark_flags(parser, output_dir=False)


def add_benchmark_noop_flag(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """--benchmark on a script that does nothing else (run.py's means: run this script)."""
    group = parser.add_argument_group("compatibility")
    add_compat_flag(group, "--benchmark", "this script always runs the benchmark")
    return group


def generation_groups() -> tuple[GroupAdder, ...]:
    """The flags of single_instance/run_generation.py (multimodal input aside: see
    single_generation_groups)."""
    return (add_model_flags, add_generation_flags, add_benchmark_flags)


def single_generation_groups() -> tuple[GroupAdder, ...]:
    """The flags of the single-instance benchmark: generation_groups() and multimodal input,
    which the distributed benchmark does not take yet."""
    return (*generation_groups(), add_multimodal_flags)


def eval_limit(text: str) -> int | float:
    """lm-eval's --limit: N documents per task, or a fraction of each task when below 1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value >= 1 and value == int(value):
        return int(value)
    if 0 < value < 1:
        return value
    raise argparse.ArgumentTypeError(f"must be a whole number >= 1 or a fraction in (0, 1), "
                                     f"got {text}")


def add_accuracy_flags(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """What single_instance/run_accuracy.py evaluates (run.py forwards them with --accuracy-only).
    --batch-size and --output-dir are shared with the benchmark: see add_accuracy_run_flags."""
    group = parser.add_argument_group("accuracy (lm-eval)")
    group.add_argument("--tasks", default=None, metavar="NAME,...",
                       help="lm-eval task names, comma-separated, e.g. lambada_openai,hellaswag "
                            "(default: the shipped llmbench/data/lambada_local.jsonl, offline)")
    group.add_argument("--tasks-file", default=None, metavar="FILE.yaml",
                       help="an lm-eval task definition (YAML) to evaluate as well")
    group.add_argument("--lambada-file", default=None, metavar="FILE.jsonl",
                       help='{"text": ...} per line, scored as lambada_openai: last-word '
                            "accuracy and perplexity")
    group.add_argument("--limit", type=eval_limit, default=None,
                       help="evaluate the first N documents of each task (or a fraction < 1)")
    return group


def add_accuracy_run_flags(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """The accuracy script's own --batch-size and --output-dir; in run.py these two come from the
    generation and benchmark groups, with the same defaults, and mean the same thing."""
    group = parser.add_argument_group("accuracy run")
    group.add_argument("--batch-size", type=positive_int, default=1,
                       help="documents per forward pass (default 1)")
    group.add_argument("--output-dir", default="./saved_results",
                       help="where results are written (default ./saved_results)")
    add_compat_flag(group, "--accuracy-only", "this script always measures accuracy")
    return group


def accuracy_groups() -> tuple[GroupAdder, ...]:
    """The flags of single_instance/run_accuracy.py."""
    return (add_accuracy_model_flags, add_accuracy_flags, add_accuracy_run_flags,
            add_quantization_flags)


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def add_distributed_flags(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """run.py's distributed switches (launched by `deepspeed ... run.py --autotp`)."""
    group = parser.add_argument_group("distributed (DeepSpeed AutoTP)")
    group.add_argument("--autotp", action="store_true",
                       help="run the benchmark tensor parallel across the launcher's ranks "
                            "(distributed/run_generation_with_deepspeed.py)")
    group.add_argument("--shard-model", action="store_true",
                       help="first write the weights as small files to "
                            "--output-dir/<family>_local_shard and run from there")
    group.add_argument("--max-shard-size", default="500MB",
                       help="largest file --shard-model writes (default 500MB)")
    return group


def add_rank_flags(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """What a launcher passes every rank, and how long a rank waits for the others."""
    group = parser.add_argument_group("ranks")
    group.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, default=None,
                       help="set by the launcher (the LOCAL_RANK variable takes precedence)")
    group.add_argument("--dist-timeout", type=positive_float, default=1800.0,
                       help="seconds a rank waits for the others before failing (default 1800)")
    return group


def alpha_value(text: str) -> str:
    """SmoothQuant's --alpha: a number in [0, 1] or "auto"."""
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number or 'auto': {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1] or 'auto', got {text}")
    return text


def add_quantization_flags(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """Quantization (llmbench/quant): run.py's two steps, single_instance/run_quantization.py,
    and run_generation.py --quantized-model-path. Names follow the Xeon example scripts."""
    group = parser.add_argument_group("quantization")
    group.add_argument("--ipex-weight-only-quantization", action="store_true",
                       help="weight-only quantization (round to nearest), saved to --output-dir")
    group.add_argument("--weight-dtype", choices=("INT8", "INT4", "NF4", "FP8"), default="INT8",
                       help="weight-only storage type (default INT8)")
    group.add_argument("--group-size", type=int, default=0,
                       help="input channels per scale: 0 automatic (128 for 4-bit, per-channel "
                            "otherwise), -1 per-channel, or a power of two >= 32")
    group.add_argument("--woq-sym-quant-weight", action="store_true",
                       help="symmetric weights (no zero points)")
    group.add_argument("--lowp-mode", choices=("AUTO", "FP32", "BF16", "FP16", "INT8"),
                       default="AUTO", help="compute of quantized projections: AUTO/FP32 "
                            "fp32; INT8 int8 activations (INT8 or INT4 weights)")
    group.add_argument("--quant-with-amp", action="store_true",
                       help="bf16 for the layers that are not quantized (same as --dtype "
                            "bfloat16)")
    add_compat_flag(group, "--int8-bf16-mixed", "v2.1's name for --quant-with-amp: INT8 "
                    "quantization with bf16 for the layers that are not quantized",
                    {"quant_with_amp": True})
    add_compat_flag(group, "--int8", "v2.1's INT8 with fp32 for the layers that are not "
                    "quantized: today's default (no --quant-with-amp)")
    group.add_argument("--gptq", action="store_true",
                       help="with --ipex-weight-only-quantization: INT4 weights by GPTQ "
                            "(utils/run_gptq.py's algorithm, calibrated on --dataset or the "
                            "shipped text) instead of round to nearest")
    group.add_argument("--act-quant-mode", default=None,
                       help="int8 activations for --lowp-mode INT8: PER_BATCH_SYM (per row, "
                            "symmetric; the default), PER_BATCH, PER_TENSOR[_SYM], "
                            "PER_IC_BLOCK[_SYM], PER_BATCH_IC_BLOCK[_SYM] (no _SYM: "
                            "asymmetric)")
    group.add_argument("--low-precision-checkpoint", default=None, metavar="FILE",
                       help="a GPTQ/AWQ INT4 checkpoint (safetensors) for the model")
    group.add_argument("--ipex-smooth-quant", action="store_true",
                       help="SmoothQuant static INT8 (weights and activations), calibrated")
    group.add_argument("--alpha", type=alpha_value, default="0.5",
                       help="SmoothQuant migration strength in [0, 1], or auto (default 0.5)")
    group.add_argument("--calib-len", type=positive_int, default=512,
                       help="tokens per calibration sample (default 512)")
    group.add_argument("--calib-iters", type=positive_int, default=32,
                       help="calibration samples (default 32)")
    group.add_argument("--calib-shuffle", action="store_true",
                       help="shuffle the calibration samples (seeded)")
    group.add_argument("--calib-padding", action="store_true",
                       help="pad every calibration sample to --calib-len")
    group.add_argument("--fallback-add", default=None, metavar="NAME,...",
                       help="SmoothQuant: projections kept in fp32 besides the automatic ones "
                            "(module names or name suffixes, e.g. lm_head,down_proj)")
    add_dataset_flag(group)
    group.add_argument("--qconfig-summary-file", default=None, metavar="FILE.json",
                       help="SmoothQuant recipe: reused when the file exists, else written")
    group.add_argument("--quantized-model-path", default=None, metavar="FILE",
                       help="a saved quantized model (best_model.safetensors) to benchmark; "
                            "run.py then skips the quantization step")
    return group


def build_parser(prog: str, description: str, groups: Sequence[GroupAdder]) -> Parser:
    parser = Parser(prog=prog, description=description)
    for add in groups:
        add(parser)
    return parser


def group_dests(parser: argparse.ArgumentParser, group: argparse._ArgumentGroup) -> list[str]:
    return [action.dest for action in group._group_actions]


def forward_argv(parser: argparse.ArgumentParser, args: argparse.Namespace,
                 dests: Sequence[str]) -> list[str]:
    """Rebuild the command-line flags for `dests` that differ from their defaults.

    run.py uses this to pass a step exactly the flags the user gave it, in canonical form.
    """
    argv: list[str] = []
    for action in parser._actions:
        if (action.dest not in dests or isinstance(action, argparse._HelpAction | CompatFlag)
                or not action.option_strings):
            continue
        value = getattr(args, action.dest)
        if value == action.default:
            continue
        flag = max(action.option_strings, key=len)
        if isinstance(action, argparse._StoreTrueAction):
            argv.append(flag)
        else:
            argv += [flag, str(value)]
    return argv
