"""Writing results so that a reader never sees half of one: every file or folder llmbench writes
(reports, summaries, sweeps and plots, quantized models, recipes, GPTQ folders, converted GGUF
caches, shards) is written under a temporary name in the same folder, then renamed onto its target,
which is atomic on one file system. What is left ends up with the user's usual permissions
(the umask's), not the 0600 / 0700 of a temporary file or folder.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_file(target: Path | str) -> Iterator[Path]:
    """A temporary path beside `target` for the block to write; renamed onto `target` when the
    block ends, removed if it raises."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    os.close(fd)
    temporary = Path(name)
    try:
        yield temporary
        os.chmod(temporary, 0o666 & ~_umask())
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_text(target: Path | str, text: str) -> None:
    """`text` into `target`, atomically."""
    with atomic_file(target) as temporary:
        temporary.write_text(text)


def save_png(figure: Any, target: Path | str) -> None:
    """A matplotlib figure as a PNG, atomically; the figure is closed."""
    import matplotlib.pyplot as plt

    with atomic_file(target) as temporary:
        figure.savefig(temporary, dpi=100, format="png")
    plt.close(figure)


@contextmanager
def atomic_folder(target: Path | str,
                  lost_race: Callable[[], bool] | None = None) -> Iterator[Path]:
    """A temporary folder beside `target` for the block to fill; renamed onto `target` (which may
    exist only as an empty folder) when the block ends, removed if it raises. If the rename fails
    and lost_race() says another writer put a complete `target` there first, that one stands."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield staging
        os.chmod(staging, 0o777 & ~_umask())
        os.replace(staging, target)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if lost_race is None or not lost_race():
            raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
