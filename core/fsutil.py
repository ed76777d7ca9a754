"""Files that are replaced whole: readers see the old or the new, never a part."""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

__all__ = ["fsync_directory", "write_file_atomic"]


def write_file_atomic(path: Path, data: bytes, mode: int) -> None:
    """Replace `path` with `data` so readers see the old or the new file, never a part.

    The temporary file is created with O_EXCL and `mode` from the start, so a private
    key is never readable by others, not even briefly; then it is renamed into place.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, mode)
    try:
        try:
            os.fchmod(fd, mode)  # the umask may have narrowed it; be exact
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_directory(path.parent)


def fsync_directory(directory: Path) -> None:
    """Make a rename durable; best effort (some filesystems refuse fsync on a dir)."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)
