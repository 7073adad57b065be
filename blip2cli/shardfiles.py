"""Shard files by name: which inputs are tar shards or Parquet files, what a shard's output is
called, brace ranges (``shard-{00000..00099}.tar``) and whether a Parquet file holds image bytes.

A low module (it imports nothing of blip2cli): ``sources`` uses it to tell a shard file from an
image, ``webdataset`` to read shards, ``parts`` and the runner to name per-shard outputs.
"""

from __future__ import annotations

import os
import re
from typing import Iterator

PARQUET_SUFFIXES = (".parquet",)
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")


def is_shard_path(path: str) -> bool:
    return path.lower().endswith(SHARD_SUFFIXES)


def shard_stem(path: str) -> str:
    """``shards/00042.tar`` -> ``00042`` (the name of its output file); ``00042.parquet`` too."""
    base = os.path.basename(path)
    for suffix in (*SHARD_SUFFIXES, ".parquet"):
        if base.lower().endswith(suffix):
            return base[: -len(suffix)]
    return base


# -- brace ranges ---------------------------------------------------------------
_BRACE = re.compile(r"\{([^{}]*)\}")


def has_braces(text: str) -> bool:
    m = _BRACE.search(text)
    return m is not None and (".." in m.group(1) or "," in m.group(1))


MAX_BRACE_NAMES = 100_000  # names one brace pattern may stand for (all its groups multiplied)


def _brace_values(body: str) -> tuple[int, object] | None:
    """A group's size and a function yielding its values lazily; None: not a group."""
    r = re.fullmatch(r"(-?\d+)\.\.(-?\d+)", body)
    if r:
        a, b = r.group(1), r.group(2)
        lo, hi = int(a), int(b)
        width = max(len(a), len(b)) if (a.lstrip("-").startswith("0") or b.lstrip("-").startswith("0")) else 0
        step = 1 if hi >= lo else -1
        return abs(hi - lo) + 1, lambda: (str(n).zfill(width) for n in range(lo, hi + step, step))
    if "," in body:
        values = body.split(",")
        return len(values), lambda: iter(values)
    return None


def _brace_groups(text: str) -> list:
    """``text`` cut at its groups: literal strings and (size, values) pairs, in order."""
    pieces: list = []
    at = 0
    for m in _BRACE.finditer(text):
        group = _brace_values(m.group(1))
        if group is None:
            continue  # kept as it is
        pieces.append(text[at:m.start()])
        pieces.append(group)
        at = m.end()
    pieces.append(text[at:])
    return pieces


def count_braces(text: str) -> int:
    """How many names ``text`` expands to (the product of its groups' sizes), without expanding."""
    n = 1
    for piece in _brace_groups(text):
        if not isinstance(piece, str):
            n *= piece[0]
    return n


def check_braces(text: str) -> None:
    """Refuse a pattern standing for more than :data:`MAX_BRACE_NAMES` names, before any is made."""
    n = count_braces(text)
    if n > MAX_BRACE_NAMES:
        from .errors import UsageError

        raise UsageError(
            f"the brace pattern {text!r} stands for {n:,} names; the limit is {MAX_BRACE_NAMES:,} names",
            hint="name a folder of shards, a glob, or a list of files with files_from instead",
            params=["files_from"])


def iter_braces(text: str) -> Iterator[str]:
    """The names of :func:`expand_braces`, one at a time (bounded memory), after :func:`check_braces`."""
    check_braces(text)
    pieces = _brace_groups(text)

    def walk(i: int, prefix: str) -> Iterator[str]:
        if i == len(pieces):
            yield prefix
            return
        piece = pieces[i]
        if isinstance(piece, str):
            yield from walk(i + 1, prefix + piece)
            return
        for value in piece[1]():  # as bash: the first group varies slowest
            yield from walk(i + 1, prefix + value)

    return walk(0, "")


def expand_braces(text: str) -> list[str]:
    """``a{00..02}.tar`` -> ``a00.tar a01.tar a02.tar``; ``{x,y}`` -> ``x y``; several groups
    multiply, left to right. A numeric range keeps the zero padding of its bounds (the
    wider of the two); a group that is neither (``{}``, ``{a..b}``) is kept as it is. A
    pattern standing for more than :data:`MAX_BRACE_NAMES` names (all groups multiplied) is
    a ``UsageError`` before any name is made; :func:`iter_braces` yields them lazily."""
    return list(iter_braces(text))


# -- samples ------------------------------------------------------------------


IMAGE_COLUMNS = ("jpg", "png", "webp", "image")


def is_parquet_path(path: str) -> bool:
    return path.lower().endswith(PARQUET_SUFFIXES)


def find_column(names: list[str], wanted: str) -> str | None:
    """``wanted`` among ``names``: exactly, else without regard to case."""
    if wanted in names:
        return wanted
    for name in names:
        if name.lower() == wanted.lower():
            return name
    return None


def find_image_column(names: list[str], wanted: str | None) -> str | None:
    if wanted:
        return find_column(names, wanted)
    for candidate in IMAGE_COLUMNS:
        found = find_column(names, candidate)
        if found is not None:
            return found
    return None


def open_regular_file(path: str):
    """A regular file opened for reading; a FIFO, device or socket refused without blocking."""
    import stat

    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(0, "not a regular file (a pipe, device or socket is not read)")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def holds_image_bytes(path: str) -> bool:
    """Is ``path`` a Parquet file with a column that can hold image bytes (binary, or a struct with
    binary ``bytes``)? Only its footer is read. Asked of Parquet files found in folders and by
    globs: blip2's own outputs (captions, metadata, embeddings) hold none and are not inputs. A
    file that cannot be read says yes: the reader then makes it an error record."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        return True
    try:
        with open_regular_file(path) as fh:
            schema = pq.read_schema(fh)
    except OSError as exc:
        return exc.errno != 0  # not a regular file (errno 0, ours): not an input; else report it
    except Exception:  # noqa: BLE001 - not Parquet after all: the reader says so
        return True

    def binary(t) -> bool:
        if pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t):
            return True
        return pa.types.is_struct(t) and any(binary(t.field(i).type) for i in range(t.num_fields))

    return any(binary(field.type) for field in schema)
