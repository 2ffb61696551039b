#!/usr/bin/env python3
"""Accuracy with lm-eval, tensor parallel with DeepSpeed AutoTP: one process per rank.

Launch it with `deepspeed --num_accelerators N --bind_cores_to_rank <this script> ...` (the
flags of single_instance/run_accuracy.py); rank 0 prints the table and writes the results.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llmbench.accuracy.tensor_parallel import rank_main  # noqa: E402
from llmbench.distributed.ranks import run_rank  # noqa: E402

if __name__ == "__main__":
    run_rank(rank_main)
