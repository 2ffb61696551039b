"""The code base stays ruff-clean (rules in pyproject.toml)."""

import subprocess
import sys

from conftest import ROOT


def test_ruff_clean():
    result = subprocess.run([sys.executable, "-m", "ruff", "check", str(ROOT)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
