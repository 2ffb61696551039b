#!/usr/bin/env python3
"""Quantize a model (weight-only INT8/INT4/NF4/FP8, round to nearest), measure its quality
against fp32, and save it to --output-dir (best_model.safetensors + best_model.json)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llmbench.cli.quantize import main  # noqa: E402
from llmbench.errors import run_main  # noqa: E402

if __name__ == "__main__":
    run_main(main)
