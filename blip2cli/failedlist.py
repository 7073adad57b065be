"""``--failed-list FILE``: the images that failed, one path per line (NUL-separated
with ``-0``), so they can be moved aside: ``xargs -0 mv -t rejected/ < failed.txt``.

Paths are written as the file system has them (exact bytes, not U+FFFD), each one
flushed as it fails: an interrupted run leaves the list of failures so far. The file
is created (empty) when the run starts, so an empty file means none failed.
"""

from __future__ import annotations

import os

from .errors import OutputError


class FailedList:
    """A writer wrapper: passes each record on, then lists its image if it failed."""

    def __init__(self, inner, path: str, *, null: bool = False):
        self.inner = inner
        self.path = path
        self.end = b"\0" if null else b"\n"
        self.count = 0
        self._last = None
        try:
            self._fh = open(path, "wb", buffering=0)
        except OSError as exc:
            raise OutputError(f"cannot write the failed list {path}: {exc.strerror or exc}") from exc

    def write(self, record: dict) -> None:
        self.inner.write(record)
        if record.get("error"):
            self.add(record.get("path"))

    def add(self, path) -> None:
        if not path or path == "-" or path == self._last:  # ask: one line per image, not per question
            return
        self._last = path
        try:
            self._fh.write(os.fsencode(path) + self.end)
        except OSError as exc:
            raise OutputError(f"cannot write the failed list {self.path}: {exc.strerror or exc}") from exc
        self.count += 1

    def close(self) -> None:
        self.inner.close()
        self._fh.close()


def wrapper(path, *, null: bool = False):
    """For ``Job.wrappers``; None without ``--failed-list``. Its ``planned`` file is in the
    run's output plan: checked against every input and output, and locked, before the
    file is opened (the runner opens it, after the checks)."""
    if path is None:
        return None
    from .guard import Planned

    def wrap(inner):
        return FailedList(inner, str(path), null=null)

    wrap.planned = (Planned(str(path), "the failed list", "failed_list", lock=True),)  # type: ignore[attr-defined]
    return wrap
