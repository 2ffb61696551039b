#!/usr/bin/env python3
"""Compare two benchmark results side by side (llmbench/compare_reports.py says how; the
command line is llmbench.cli.tools')."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llmbench.cli.tools import compare_reports_main as main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
