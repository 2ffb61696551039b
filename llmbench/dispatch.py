"""run.py: validate the whole command line once, then run each step as a subprocess with the
flags that step understands, and exit with the status of the first step that fails."""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from dataclasses import dataclass

from llmbench import flags
from llmbench.environment import PROJECT_ROOT
from llmbench.errors import UserError

DESCRIPTION = "Run a benchmark step (as the Xeon LLM example run.py does)."


@dataclass
class Step:
    name: str
    script: str  # relative to the project root
    argv: list[str]


def add_dispatch_flags(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    group = parser.add_argument_group("what to run")
    group.add_argument("--benchmark", action="store_true",
                       help="run the generation benchmark (single_instance/run_generation.py)")
    return group


def build_parser() -> flags.Parser:
    parser = flags.build_parser("run.py", DESCRIPTION, flags.generation_groups())
    add_dispatch_flags(parser)
    return parser


def plan_steps(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[Step]:
    generation_parser = flags.build_parser("run_generation.py", "", flags.generation_groups())
    generation_dests = [action.dest for action in generation_parser._actions]
    steps = []
    if args.benchmark:
        steps.append(Step("benchmark", "single_instance/run_generation.py",
                          flags.forward_argv(parser, args, generation_dests)))
    if not steps:
        raise UserError("nothing to run: pass --benchmark")
    return steps


def run_step(step: Step) -> int:
    command = [sys.executable, str(PROJECT_ROOT / step.script), *step.argv]
    print(f"running {step.name}: {shlex.join(command)}", flush=True)
    return subprocess.run(command, check=False).returncode


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for step in plan_steps(parser, args):
        status = run_step(step)
        if status != 0:
            print(f"error: step '{step.name}' failed with exit status {status}", file=sys.stderr,
                  flush=True)
            return status
    return 0
