#!/usr/bin/env python3
"""One markdown row per saved accuracy run: fp32 vs bf16 vs quantized, with deltas to fp32."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llmbench.cli.tools import accuracy_table_main as table_main  # noqa: E402
from llmbench.errors import run_main  # noqa: E402

if __name__ == "__main__":
    run_main(table_main)
