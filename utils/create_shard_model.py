#!/usr/bin/env python3
"""Write a model's weights resharded into small safetensors files (default
--output-dir/<family>_local_shard), for distributed runs to load shard by shard: pass the folder
as -m. Under a launcher, local rank 0 writes it and the other ranks of the machine wait."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llmbench.cli.tools import shard_main  # noqa: E402
from llmbench.errors import run_main  # noqa: E402

if __name__ == "__main__":
    run_main(shard_main)
