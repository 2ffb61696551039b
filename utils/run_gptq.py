#!/usr/bin/env python3
"""GPTQ INT4 (our implementation of Frantar et al. 2022) of a model with a local calibration
text: writes a Hugging Face GPTQ folder (-m loads it) and gptq_checkpoint.safetensors
(--low-precision-checkpoint), and prints perplexity of fp32 vs GPTQ vs round to nearest."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llmbench.cli.gptq import main  # noqa: E402
from llmbench.errors import run_main  # noqa: E402

if __name__ == "__main__":
    run_main(main)
