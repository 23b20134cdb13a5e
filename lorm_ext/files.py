"""Writing files atomically: readers see the old file or the complete new one, never a part."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def default_mode(mode: int) -> int:
    """``mode`` under the process umask: what open() or mkdir() would give (mkstemp/mkdtemp give 0600/0700)."""
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """``write(temporary path)`` in ``path``'s folder, then fsync it, rename it over ``path`` and fsync the folder:
    after a crash ``path`` is the old file or the new one, and the new one is on disk once this returns. The
    temporary file (a hidden ``.NAME.*.tmp``, with the mode open() would give) is removed on any error."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, default_mode(0o666))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_folder(path.parent)


def fsync_folder(folder: str | os.PathLike) -> None:
    """Make a rename or a new entry in ``folder`` durable (its directory entry flushed to disk)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
