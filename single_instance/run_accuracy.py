#!/usr/bin/env python3
"""Accuracy with lm-eval, single instance: the benchmark's model, dtype and backend, scored."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llmbench.accuracy.single_instance import main  # noqa: E402
from llmbench.errors import run_main  # noqa: E402

if __name__ == "__main__":
    run_main(main)
