#!/usr/bin/env python3
"""Build llmbench's C++ GEMV kernels (llmbench/kernels/_C*.so) in place.

Usage: python tools/build_kernels.py [--force] [--quiet]

Exits non-zero with a one-line message when no C++ compiler is available or
the compilation fails; the rest of llmbench then uses the pure-PyTorch
fallback (llmbench.kernels.available() is False).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--force", action="store_true", help="rebuild all objects")
    ap.add_argument("--quiet", action="store_true", help="hide the compiler command lines")
    args = ap.parse_args()

    try:
        from llmbench.kernels import _build
    except Exception as e:  # e.g. torch missing
        print(
            f"build_kernels: error: cannot import llmbench.kernels ({type(e).__name__}: {e})",
            file=sys.stderr,
        )
        return 1
    t0 = time.time()
    try:
        path = _build.build(verbose=not args.quiet, force=args.force)
    except _build.BuildError as e:
        print(f"build_kernels: error: {e}", file=sys.stderr)
        return 1
    import llmbench.kernels as k

    k._load()
    if not k.available():
        print(
            f"build_kernels: error: built {path} but it does not import: {k.import_error()}",
            file=sys.stderr,
        )
        return 1
    print(
        f"build_kernels: built {os.path.relpath(path, REPO_ROOT)} in {time.time() - t0:.1f}s; "
        f"active ISA: {k.isa()} (supported: {', '.join(k.supported_isas())})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
