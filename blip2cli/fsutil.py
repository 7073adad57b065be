"""Writing files so that a reader sees the old content or the new, never half of it."""

from __future__ import annotations

import os
import tempfile


def atomic_write(path: str | os.PathLike, data: str | bytes, *, fsync: bool = False,
                 mode: int | None = None) -> None:
    """Write ``data`` to a temporary file beside ``path``, then rename it over ``path``.

    Text is UTF-8 with surrogateescape (undecodable file names survive). ``mode``:
    the permission bits (default: those of the file replaced, else 0644 less the
    umask). ``fsync``: make the data durable before the rename (for files whose loss
    would cost a rerun, not for one small sidecar among thousands).
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    if mode is None:
        try:
            mode = os.stat(path).st_mode & 0o777
        except OSError:
            mode = 0o666 & ~_umask()
    # A short temporary name of fixed length: any legal final name (up to 255 bytes) works.
    fd, tmp = tempfile.mkstemp(prefix=".blip2-", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data if isinstance(data, bytes) else data.encode("utf-8", "surrogateescape"))
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
