#!/usr/bin/env python3
"""One-click dispatcher: builds each step's command line, runs it, passes its exit status on."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from llmbench.cli.run import main  # noqa: E402
from llmbench.errors import run_main  # noqa: E402

if __name__ == "__main__":
    run_main(main)
