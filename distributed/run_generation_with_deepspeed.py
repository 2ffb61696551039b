#!/usr/bin/env python3
"""Generation latency benchmark, tensor parallel with DeepSpeed AutoTP: one process per rank.

Launch it with `deepspeed --bind_cores_to_rank run.py --benchmark --autotp ...` (run.py starts
this script on every rank), or directly with `deepspeed --bind_cores_to_rank <this script> ...`.
"""

import os
import sys
from pathlib import Path

if os.environ.get("RANK", "0") != "0":  # read when tqdm is imported: one set of progress bars
    os.environ.setdefault("TQDM_DISABLE", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llmbench.distributed.benchmark import main  # noqa: E402
from llmbench.distributed.ranks import run_rank  # noqa: E402

if __name__ == "__main__":
    run_rank(main)
