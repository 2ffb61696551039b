"""The installed commands (pyproject.toml's [project.scripts], installed by tools/env_setup.sh)
run the same main() as the scripts at the example paths."""

from __future__ import annotations

import subprocess
import sysconfig
import tomllib
from importlib import import_module
from pathlib import Path

from conftest import ROOT

# command -> the script at the example path that it stands for
SCRIPT_OF = {
    "llmbench": "run.py",
    "llmbench-generate": "single_instance/run_generation.py",
    "llmbench-quantize": "single_instance/run_quantization.py",
    "llmbench-accuracy": "single_instance/run_accuracy.py",
    "llmbench-gptq": "utils/run_gptq.py",
    "llmbench-shard": "utils/create_shard_model.py",
    "llmbench-accuracy-table": "tools/accuracy_table.py",
    "llmbench-compare-reports": "tools/compare_reports.py",
}


def declared() -> dict[str, str]:
    with open(ROOT / "pyproject.toml", "rb") as handle:
        return tomllib.load(handle)["project"]["scripts"]


def test_every_command_is_declared_installed_and_has_its_script():
    commands = declared()
    assert set(commands) == set(SCRIPT_OF)
    scripts = Path(sysconfig.get_path("scripts"))
    for command, target in commands.items():
        module, function = target.split(":")
        assert callable(getattr(import_module(module), function)), target
        assert (scripts / command).is_file(), f"{command} is not installed in {scripts}"
        assert (ROOT / SCRIPT_OF[command]).is_file()


def test_commands_run_as_their_scripts(tmp_path):
    scripts = Path(sysconfig.get_path("scripts"))
    usage = subprocess.run([scripts / "llmbench", "--help"], capture_output=True, text=True,
                           cwd=tmp_path)
    assert usage.returncode == 0 and usage.stdout.startswith("usage: run.py")
    assert "--benchmark" in usage.stdout
    missing = str(tmp_path / "missing.json")
    bad = subprocess.run([scripts / "llmbench-compare-reports", missing, missing],
                         capture_output=True, text=True, cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "error:" in bad.stderr
    bad_run = subprocess.run([scripts / "llmbench", "--benchmark", "--num-iter", "0"],
                             capture_output=True, text=True, cwd=tmp_path)
    assert bad_run.returncode == 2 and bad_run.stderr.startswith("error:")
