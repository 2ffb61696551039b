"""The small tools' command lines: utils/create_shard_model.py (run.py --shard-model's step),
tools/accuracy_table.py and tools/compare_reports.py."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from llmbench import compare_reports
from llmbench.cli import flags
from llmbench.distributed import shards
from llmbench.distributed.ranks import env_int
from llmbench.errors import UserError


def build_shard_parser(prog: str = "create_shard_model.py") -> flags.Parser:
    parser = flags.Parser(prog=prog, description=shards.SHARD_DESCRIPTION)
    parser.add_argument(*flags.MODEL_FLAG_NAMES, dest="model_name_or_path", default=None,
                        help=flags.MODEL_HELP)
    parser.add_argument("model", nargs="?", default=None, metavar="MODEL",
                        help="the model, as the v2.1 example passes it (the same as -m)")
    parser.add_argument("--save-path", default=None,
                        help="folder to write (default: --output-dir/<family>_local_shard)")
    parser.add_argument("--output-dir", default="./saved_results",
                        help="where the default --save-path goes (default ./saved_results)")
    parser.add_argument("--dtype", choices=("auto", *flags.DTYPES), default="auto",
                        help="dtype of the saved weights (default auto: as stored)")
    parser.add_argument("--max-shard-size", default="500MB",
                        help="largest file written, e.g. 500MB or 2GB (default 500MB)")
    parser.add_argument("--config-file", default=None,
                        help="JSON whose keys override the model's config (saved with the shard)")
    flags.add_rank_flags(parser)
    return parser


def shard_main(argv: list[str] | None = None) -> int:
    args = build_shard_parser().parse_args(argv)
    if args.model is not None:
        if args.model_name_or_path not in (None, args.model):
            raise UserError(f"two models given: -m {args.model_name_or_path} and {args.model}; "
                            "pass one")
        args.model_name_or_path = args.model
    save_path = (Path(args.save_path) if args.save_path else shards.default_shard_path(
        args.model_name_or_path, args.output_dir, args.config_file))
    local_rank = env_int("LOCAL_RANK")
    if local_rank is None:
        local_rank = args.local_rank or 0
    if local_rank != 0:
        shards.wait_for_shard(args.model_name_or_path, save_path,
                       {"config_file": args.config_file, "dtype": args.dtype,
                        "max_shard_size": args.max_shard_size}, args.dist_timeout, local_rank)
        return 0
    shards.create_shard(args.model_name_or_path, save_path, dtype=args.dtype,
                 max_shard_size=args.max_shard_size, config_file=args.config_file)
    print(f"shard: {save_path}", flush=True)
    return 0


def accuracy_table_main(argv: list[str] | None = None) -> int:
    parser = flags.Parser(prog="accuracy_table.py", description=(
        "One markdown row per saved accuracy run (fp32 vs bf16 vs quantized at a glance)."))
    parser.add_argument("paths", nargs="*", default=["./saved_results"],
                        help="result JSON files or folders (default ./saved_results)")
    args = parser.parse_args(argv)
    from llmbench.accuracy.compare import comparison_table, read_reports

    print(comparison_table(read_reports(args.paths)), end="")
    return 0


def compare_reports_main(argv: list[str] | None = None) -> int:
    from llmbench.compare_reports import InputError, compare, load, table

    parser = argparse.ArgumentParser(description=compare_reports.__doc__.split("\n\n")[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--min-change", type=float, default=5.0,
                        help="percent: smaller changes are never flagged (default 5)")
    parser.add_argument("--fail-above", type=float, default=None,
                        help="percent: exit 1 when a flagged slowdown is larger than this")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead")
    args = parser.parse_args(argv)
    try:
        if args.min_change < 0 or (args.fail_above is not None and args.fail_above < 0):
            raise InputError("--min-change and --fail-above are percentages >= 0")
        before, after = load(args.before), load(args.after)
        rows = compare(before, after, args.min_change / 100.0)
        if not rows:
            raise InputError("no config and metric measured on both sides")
    except InputError as exc:
        print(f"error: compare_reports: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(rows, indent=1) if args.json else table(rows))
    unmatched = (set(before) ^ set(after))
    if unmatched and not args.json:
        print(f"\n{len(unmatched)} config(s) measured on one side only", file=sys.stderr)
    if args.fail_above is not None:
        worst = [r for r in rows if r["verdict"] == "slower"
                 and 100 * (r["ratio"] - 1) > args.fail_above]
        if worst:
            r = max(worst, key=lambda r: r["ratio"])
            print(f"error: compare_reports: {r['config']} {r['metric']} is "
                  f"{100 * (r['ratio'] - 1):.0f}% slower (above --fail-above "
                  f"{args.fail_above:g}%)", file=sys.stderr)
            return 1
    return 0
