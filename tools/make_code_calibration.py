#!/usr/bin/env python3
"""Writes llmbench/data/code_local.jsonl: the code half of the default calibration text of GPTQ
and SmoothQuant (llmbench/quant/calibration.py). It is llmbench's own Python source, cut at line
boundaries into pieces about as long as the shipped prose texts, up to as many characters as
the prose has, so that the two halves weigh the same. Frozen in a file (rather than read from
the installed sources at run time) so that calibration stays the same from one version to the
next; run this again only to refresh it on purpose."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llmbench.quant.calibration import CODE_FILE as OUT  # noqa: E402
from llmbench.quant.calibration import PROSE_FILE, read_file  # noqa: E402


def main() -> int:
    prose = read_file(PROSE_FILE)
    budget = sum(len(text) for text in prose)
    piece_len = budget // len(prose)
    pieces, current = [], ""
    for path in sorted((ROOT / "llmbench").rglob("*.py")):
        for line in path.read_text().splitlines(keepends=True):
            current += line
            if len(current) >= piece_len:
                pieces.append(current)
                current = ""
                budget -= len(pieces[-1])
                if budget <= 0:
                    break
        if budget <= 0:
            break
    with open(OUT, "w") as handle:
        for piece in pieces:
            handle.write(json.dumps({"text": piece}) + "\n")
    print(f"wrote {OUT.relative_to(ROOT)}: {len(pieces)} pieces, "
          f"{sum(map(len, pieces))} characters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
