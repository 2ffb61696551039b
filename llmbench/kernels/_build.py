"""Build the C++ extension ``llmbench.kernels._C`` in place.

Used by ``tools/build_kernels.py`` and :func:`llmbench.kernels.build`; never
run implicitly at import time.  Uses torch.utils.cpp_extension's setuptools
``BuildExtension`` (ninja is used for parallel/incremental builds when it is
installed, otherwise the slower serial distutils path).  Objects go to
``llmbench/kernels/build/``; the module lands next to this file as
``_C.<abi-tag>.so``.

No ``-march`` flag is used: the baseline code stays portable and the AVX2 /
AVX-512 kernels are compiled through ``#pragma GCC target`` regions and picked
at run time with ``__builtin_cpu_supports``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

PKG_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(os.path.dirname(PKG_DIR))
SOURCES = [
    "ops.cpp",
    "decode_step.cpp",
    "quant_search.cpp",
    "kernels_generic.cpp",
    "kernels_avx2.cpp",
    "kernels_avx512.cpp",
    "kernels_avx512vnni.cpp",
    "kernels_amx.cpp",
    "kernels_neon.cpp",
]
BUILD_TEMP = os.path.join(PKG_DIR, "build")


class BuildError(RuntimeError):
    """Raised with a one-line, user-facing reason when the build cannot run/fails."""


def find_compiler() -> str | None:
    cxx = os.environ.get("CXX", "").strip()
    candidates = [cxx.split()[0]] if cxx else ["c++", "g++", "clang++"]
    for c in candidates:
        path = shutil.which(c)
        if path:
            return path
    return None


def _flags() -> tuple[list[str], list[str]]:
    if sys.platform == "win32":
        return ["/O2", "/openmp", "/std:c++17"], []
    if sys.platform == "darwin":  # Apple clang has no -fopenmp; parallel_for runs serially
        return ["-O3"], []
    # -g0: the interpreter's own CFLAGS, which setuptools puts first, carry -g; debug info for
    # torch's headers made decode_step.cpp take 43 s to compile instead of 29 s here.
    return ["-O3", "-g0", "-fopenmp", "-Wno-unknown-pragmas"], ["-fopenmp"]


def build(verbose: bool = True, force: bool = False) -> str:
    """Compile the extension; returns the path of the built shared object."""
    if find_compiler() is None:
        raise BuildError(
            "no C++ compiler found (install g++ / build-essential, or set CXX); "
            "llmbench.kernels will use the pure-PyTorch fallback"
        )
    try:
        import torch  # noqa: F401
        from setuptools import Distribution
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError as e:  # pragma: no cover
        raise BuildError(f"cannot import build dependencies: {e}") from e

    use_ninja = shutil.which("ninja") is not None
    cflags, ldflags = _flags()
    rel = os.path.relpath(os.path.join(PKG_DIR, "csrc"), REPO_ROOT)
    ext = CppExtension(
        name="llmbench.kernels._C",
        sources=[os.path.join(rel, s) for s in SOURCES],
        include_dirs=[os.path.join(PKG_DIR, "csrc")],
        extra_compile_args=cflags,
        extra_link_args=ldflags,
    )
    dist = Distribution(
        {
            "name": "llmbench-kernels",
            "ext_modules": [ext],
            "cmdclass": {"build_ext": BuildExtension.with_options(use_ninja=use_ninja)},
        }
    )
    dist.verbose = 1 if verbose else 0
    cmd = dist.get_command_obj("build_ext")
    cmd.inplace = True
    cmd.build_temp = BUILD_TEMP
    cmd.force = force
    old = os.getcwd()
    # Quiet: our output and the compiler subprocesses' (ninja prints every command line) go to
    # a file, shown only when the build fails.
    quiet = tempfile.TemporaryFile("w+") if not verbose else None
    try:
        os.chdir(REPO_ROOT)
        with contextlib.ExitStack() as stack:
            if quiet is not None:
                stack.enter_context(contextlib.redirect_stdout(quiet))
                stack.enter_context(_fd_to(1, quiet))
            dist.run_command("build_ext")
        out = os.path.abspath(cmd.get_ext_fullpath(ext.name))
    except SystemExit as e:  # distutils reports compile errors this way
        _show(quiet)
        raise BuildError(f"compilation failed ({e}); see the compiler output above") from None
    except Exception as e:
        name = type(e).__name__
        if name in (
            "CompileError",
            "LinkError",
            "DistutilsExecError",
            "CalledProcessError",
            "RuntimeError",
        ):
            _show(quiet)
            raise BuildError(
                f"compilation failed ({name}: {str(e).splitlines()[0] if str(e) else ''}); "
                "see the compiler output above"
            ) from None
        raise
    finally:
        os.chdir(old)
        if quiet is not None:
            quiet.close()
    return out


@contextlib.contextmanager
def _fd_to(fd: int, target: Any) -> Iterator[None]:
    """OS-level file descriptor `fd` into `target`, subprocesses' output included, then back."""
    sys.stdout.flush()
    saved = os.dup(fd)
    os.dup2(target.fileno(), fd)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, fd)
        os.close(saved)


def _show(captured: Any) -> None:
    """A quiet build's captured output, on stderr (the compiler's errors are in it)."""
    if captured is not None:
        captured.seek(0)
        sys.stderr.write(captured.read()[-20000:])
