"""Sources: turn what the user typed into a stream of items, in a stable order.

One resolver for every command. An argument is

* ``-``: standard input. Raw image bytes (``curl ... | blip2 caption -``) are
  recognised by their magic number; anything else is read as a list of paths,
  one per line (or NUL-separated with ``-0``, as ``find -print0`` writes).
* an existing file: always tried, whatever its extension;
* an existing directory: walked depth-first (recursively unless
  ``recursive=False``), each directory's entries in code-point order of their
  names; hidden entries (``.name``) skipped; only files whose extension is in
  ``extensions``; symlinked directories followed once (loops survived);
* otherwise, a pattern with ``*``, ``?`` or ``[``: expanded by the tool
  (``**`` crosses directories), matches in the same order as a walk,
  filtered by extension;
* otherwise, a name with a brace group (``shards/{00000..00099}.tar``,
  ``{a,b}.jpg``): expanded by the tool (``webdataset.expand_braces``: zero-padded
  numeric ranges and comma lists), each name then taken as above;
* otherwise, a path that does not exist: it becomes an item that fails with a
  clear error, so the rest of the run goes on.

A tar file (``.tar``, ``.tar.gz``, ``.tgz``) named, matched or found in a folder
is a WebDataset shard: an item with ``tar=True`` that ``webdataset.SampleReader``
expands into its samples as the run reads it (folders yield their tar files
unless ``--ext`` is given without ``tar``).

Items come out in argument order, duplicates (the same file reached twice)
removed. Nothing here opens an image. Stdin is the only stream read: a named
pipe, socket or device among the files is refused by the decode without being
opened (``images.open_image``); raw image bytes on stdin are read up to one
image's budget (``images.MAX_DECODE_BYTES``), not without end.
"""

from __future__ import annotations

import glob
import os
import sys
from dataclasses import dataclass, field
from typing import BinaryIO, Iterable, Iterator

DEFAULT_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")

# Magic numbers of the formats we accept as raw bytes on stdin.
_MAGIC = (
    b"\xff\xd8\xff",  # JPEG
    b"\x89PNG\r\n\x1a\n",  # PNG
    b"GIF87a",
    b"GIF89a",
    b"BM",  # BMP
    b"II*\x00",  # TIFF, little-endian
    b"MM\x00*",  # TIFF, big-endian
)

STDIN_NAME = "-"


@dataclass(frozen=True)
class Item:
    """One input. ``name`` is what records show; ``source`` is a path or raw bytes."""

    name: str
    source: str | bytes
    # Set for an input that is known to fail before any decoding (e.g. a
    # pattern that matched nothing); the pipeline turns it into an error record.
    error: str | None = None
    # The folder argument (or the fixed prefix of a glob) this item was found
    # under; sidecars under --output-dir mirror the tree below it.
    root: str | None = None
    # A WebDataset shard (a tar file), expanded into samples by webdataset.SampleReader.
    tar: bool = False
    # Fields every record of this item carries (a shard sample: shard, key, --carry members).
    fields: dict | None = field(default=None, compare=False, hash=False)


def parse_extensions(values: Iterable[str] | None) -> tuple[str, ...]:
    """``["jpg,png", ".WEBP"]`` -> ``("jpg", "png", "webp")``; empty -> the defaults."""
    out: list[str] = []
    for value in values or ():
        for part in value.split(","):
            part = part.strip().lower().lstrip(".")
            if part and part not in out:
                out.append(part)
    return tuple(out) or DEFAULT_EXTENSIONS


def looks_like_image_bytes(head: bytes) -> bool:
    if head.startswith(_MAGIC):
        return True
    return head[:4] == b"RIFF" and head[8:12] == b"WEBP"


def _has_magic(arg: str) -> bool:
    return glob.has_magic(arg)


def _is_shard(path: str) -> bool:
    from .webdataset import is_shard_path

    return is_shard_path(path)


def _has_braces(arg: str) -> bool:
    from .webdataset import has_braces

    return has_braces(arg)


def _expand_braces(arg: str) -> list[str]:
    from .webdataset import expand_braces

    return expand_braces(arg)


def _glob_root(pattern: str) -> str:
    """The folder part of a pattern before its first wildcard: ``a/b/**/*.jpg`` -> ``a/b``."""
    parts = pattern.split(os.sep)
    fixed = []
    for part in parts[:-1]:
        if glob.has_magic(part):
            break
        fixed.append(part)
    return os.sep.join(fixed) or ("/" if pattern.startswith("/") else ".")


class InputResolver:
    """Resolves arguments into :class:`Item` objects (see the module docstring)."""

    def __init__(
        self,
        *,
        recursive: bool = True,
        extensions: Iterable[str] | None = None,
        null_separated: bool = False,
        stdin: BinaryIO | None = None,
    ):
        self.recursive = recursive
        self.extensions = frozenset(parse_extensions(extensions))
        # Tar shards are picked up in folders and globs unless --ext leaves tar out.
        self.shards = not extensions or bool(self.extensions & {"tar", "tgz", "tar.gz"})
        self.null_separated = null_separated
        self._stdin = stdin
        self._seen: set[str] = set()

    # -- public ------------------------------------------------------------
    def resolve(self, args: Iterable[str], files_from: Iterable[str] = ()) -> Iterator[Item]:
        for arg in args:
            if arg == STDIN_NAME:
                yield from self._from_stdin()
            else:
                yield from self._from_arg(arg, expand=True)
        for list_file in files_from:
            yield from self._from_list_file(list_file)

    @staticmethod
    def reads_stdin(args: Iterable[str], files_from: Iterable[str] = ()) -> bool:
        return STDIN_NAME in list(args) or STDIN_NAME in list(files_from)

    # -- helpers -----------------------------------------------------------
    def _stdin_stream(self) -> BinaryIO:
        return self._stdin if self._stdin is not None else sys.stdin.buffer

    def _from_stdin(self) -> Iterator[Item]:
        stream = self._stdin_stream()
        head = stream.read(12)
        if looks_like_image_bytes(head):
            from .decode import MAX_DECODE_BYTES, megabytes

            # Bounded: a stream that never ends is not held in memory whole.
            limit = MAX_DECODE_BYTES
            chunks, size = [head], len(head)
            while limit is None or size <= limit:
                chunk = stream.read(1 << 20)  # not read(limit): that would allocate the limit at once
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
            data = b"".join(chunks)
            del chunks
            if limit is not None and len(data) > limit:
                yield Item(name=STDIN_NAME, source=STDIN_NAME,
                           error=f"image on stdin too large (more than {megabytes(limit)})")
                return
            yield Item(name=STDIN_NAME, source=data)
            return
        yield from self._from_path_list(head, stream)

    def _from_list_file(self, list_file: str) -> Iterator[Item]:
        if list_file == STDIN_NAME:
            yield from self._from_path_list(b"", self._stdin_stream())
            return
        from .errors import InputError

        try:
            stream = open(list_file, "rb")
        except OSError as exc:
            raise InputError(
                f"cannot read the list of files {list_file!r}: {exc.strerror or exc}"
            ) from exc
        with stream:
            yield from self._from_path_list(b"", stream)

    def _from_path_list(self, head: bytes, stream: BinaryIO) -> Iterator[Item]:
        sep = b"\0" if self.null_separated else b"\n"
        buffer, eof = head, False
        while True:
            *lines, buffer = buffer.split(sep)
            if eof and buffer:
                lines.append(buffer)  # a last path without a terminator
            for raw in lines:
                if not self.null_separated and raw.endswith(b"\r"):
                    raw = raw[:-1]
                if raw:
                    # Paths from a list are taken literally: no pattern expansion.
                    yield from self._from_arg(os.fsdecode(raw), expand=False)
            if eof:
                return
            # read1: return what the producer has written so far, don't wait for a full buffer
            chunk = stream.read1(65536) if hasattr(stream, "read1") else stream.read(65536)
            eof = not chunk
            buffer += chunk

    def _from_arg(self, arg: str, *, expand: bool) -> Iterator[Item]:
        if os.path.isdir(arg):
            yield from self._walk(arg)
        elif os.path.lexists(arg):
            yield from self._emit(arg)
        elif expand and _has_braces(arg):
            for name in _expand_braces(arg):
                yield from self._from_arg(name, expand=True)
        elif expand and _has_magic(arg):
            # Sorted component by component: the same order a directory walk gives.
            matches = sorted(glob.glob(arg, recursive=True), key=lambda p: p.split(os.sep))
            found = False
            root = _glob_root(arg)
            for match in matches:
                if os.path.isdir(match):
                    for item in self._walk(match, root=root):
                        found = True
                        yield item
                elif self._wanted(match):
                    found = True
                    yield from self._emit(match, root=root)
            if not found:
                yield Item(name=arg, source=arg, error="no image files match this pattern")
        else:
            # Missing: let it fail as an item, so the rest of the run goes on.
            yield from self._emit(arg)

    def _wanted(self, path: str) -> bool:
        ext = os.path.splitext(path)[1].lower().lstrip(".")
        return ext in self.extensions or (self.shards and _is_shard(path))

    def _emit(self, path: str, root: str | None = None) -> Iterator[Item]:
        key = os.path.realpath(path)
        if key in self._seen:
            return
        self._seen.add(key)
        yield Item(name=path, source=path, root=root, tar=_is_shard(path))

    def _walk(self, top: str, root: str | None = None) -> Iterator[Item]:
        root = top if root is None else root
        visited: set[tuple[int, int]] = set()

        def walk(directory: str) -> Iterator[Item]:
            try:
                st = os.stat(directory)
            except OSError:
                return
            ident = (st.st_dev, st.st_ino)
            if ident in visited:  # a symlink loop, or a directory reached twice
                return
            visited.add(ident)
            try:
                with os.scandir(directory) as it:
                    entries = sorted(it, key=lambda e: e.name)
            except OSError as exc:
                yield Item(
                    name=directory,
                    source=directory,
                    error=f"cannot list this directory: {exc.strerror or exc}",
                )
                return
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                path = os.path.join(directory, entry.name)
                try:
                    is_dir = entry.is_dir()  # follows symlinks
                except OSError:
                    is_dir = False
                if is_dir:
                    if self.recursive:
                        yield from walk(path)
                elif self._wanted(path):
                    # Broken symlinks with an image extension are kept: they
                    # fail as items, so the user learns about them.
                    yield from self._emit(path, root=root)

        yield from walk(top)
