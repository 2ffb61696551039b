"""The installed commands (pyproject.toml's [project.scripts]; tools/env_setup.sh installs the
checkout in editable mode). Each runs the same main() as the script at the path users of the
example scripts know, which stays as a thin shim: `llmbench` is run.py, `llmbench-generate`
single_instance/run_generation.py, and so on. The rank scripts under distributed/ have no
command: the DeepSpeed launcher starts a script path on every rank."""

from __future__ import annotations

import sys
from importlib import import_module

from llmbench.errors import run_main


def _run(module: str, function: str = "main") -> None:
    run_main(getattr(import_module(module), function))


def run() -> None:
    _run("llmbench.cli.run")


def generate() -> None:
    _run("llmbench.generation")


def quantize() -> None:
    _run("llmbench.cli.quantize")


def accuracy() -> None:
    _run("llmbench.accuracy.single_instance")


def gptq() -> None:
    _run("llmbench.cli.gptq")


def shard() -> None:
    _run("llmbench.cli.tools", "shard_main")


def accuracy_table() -> None:
    _run("llmbench.cli.tools", "accuracy_table_main")


def compare_reports() -> None:
    from llmbench.cli.tools import compare_reports_main as main

    sys.exit(main())
