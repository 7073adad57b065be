"""Writing files so that a reader sees the old content or the new, never half of it."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def replacing(path: str | os.PathLike, *, mode: int | None = None) -> Iterator[str]:
    """A temporary file beside ``path`` for the block to fill; renamed over ``path`` when
    the block ends, removed if it raises (a reader sees the old file or the new one).

    ``mode``: the permission bits (default: those of the file replaced, else 0666 less
    the umask). The temporary name is short and of fixed length, so any legal final
    name (up to 255 bytes) works.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    if mode is None:
        try:
            mode = os.stat(path).st_mode & 0o777
        except OSError:
            mode = new_file_mode()
    fd, tmp = tempfile.mkstemp(prefix=".blip2-", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def atomic_write(path: str | os.PathLike, data: str | bytes, *, fsync: bool = False,
                 mode: int | None = None) -> None:
    """Write ``data`` to a temporary file beside ``path``, then rename it over ``path``.

    Text is UTF-8 with surrogateescape (undecodable file names survive). ``mode``: as
    for :func:`replacing`. ``fsync``: make the data durable before the rename (for files
    whose loss would cost a rerun, not for one small sidecar among thousands).
    """
    with replacing(path, mode=mode) as tmp, open(tmp, "wb") as fh:
        fh.write(data if isinstance(data, bytes) else data.encode("utf-8", "surrogateescape"))
        if fsync:
            fh.flush()
            os.fsync(fh.fileno())


def new_file_mode() -> int:
    """The permission bits a new file gets here: 0666 less the process's umask."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask
