#!/usr/bin/env python3
"""Generation latency benchmark, single instance: fp32 / bf16 / fp16, stock or --ipex."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llmbench.errors import run_main  # noqa: E402
from llmbench.generation import main  # noqa: E402

if __name__ == "__main__":
    run_main(main)
