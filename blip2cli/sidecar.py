"""Sidecar captions: ``photo.txt`` beside ``photo.jpg`` (or under ``--output-dir``).

Existing captions are never destroyed by accident: the default policy is
``skip``, decided before an image is even decoded, so an interrupted folder
run resumes by running the same command again. Every file is written
atomically (a temporary file in the same folder, then a rename), and a
sidecar never lands outside the image's folder or the chosen output folder.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from enum import Enum

from .errors import UsageError
from .fsutil import atomic_write


class Existing(str, Enum):
    skip = "skip"
    overwrite = "overwrite"
    append = "append"
    prepend = "prepend"


class SidecarError(Exception):
    """This image cannot have a sidecar (the reason is for the user)."""


@dataclass
class SidecarPolicy:
    ext: str = ".txt"
    output_dir: str | None = None
    existing: Existing = Existing.skip
    prefix: str = ""
    suffix: str = ""
    separator: str = ", "

    def __post_init__(self):
        ext = self.ext if self.ext.startswith(".") else "." + self.ext
        if ext in (".", "") or os.sep in ext or (os.altsep and os.altsep in ext):
            raise UsageError(f"sidecar_ext={self.ext!r} is not a file extension", hint="e.g. .txt or .caption",
                             params=["sidecar_ext"])
        self.ext = ext
        self._claimed: dict[str, str] = {}  # sidecar path -> image that claimed it in this run

    # -- where ---------------------------------------------------------------
    def path_for(self, item) -> str:
        """The sidecar path of an item; raises SidecarError when it cannot have one."""
        if isinstance(item.source, (bytes, bytearray)):
            raise SidecarError("image bytes from stdin have no file name to put a sidecar beside")
        image = item.name
        stem = os.path.splitext(os.path.basename(image))[0]
        if not stem or stem in (".", ".."):
            raise SidecarError("this file name cannot have a sidecar")
        name = stem + self.ext
        if self.output_dir is None:
            folder = os.path.dirname(image)
            path = os.path.join(folder, name)
        else:
            rel_dir = os.path.dirname(_relative_to_root(image, item.root))
            base = os.path.abspath(self.output_dir)
            path = os.path.normpath(os.path.join(base, rel_dir, name))
            if os.path.commonpath([base, path]) != base:  # belt and braces: never outside
                raise SidecarError(f"its sidecar would land outside {self.output_dir}")
            # A symlinked folder (or sidecar) inside the output folder must not lead out of it.
            real_base = os.path.realpath(base)
            if os.path.commonpath([real_base, os.path.realpath(path)]) != real_base:
                raise SidecarError(
                    f"its sidecar {path} would land outside {self.output_dir} (through a symbolic link)"
                )
        if os.path.abspath(path) == os.path.abspath(image):
            raise SidecarError(f"its sidecar would be the image itself (it already ends in {self.ext})")
        limit = _name_max(os.path.dirname(path))
        if len(os.fsencode(name)) > limit:  # known now: a dry run says fail, a run fails before decoding
            raise SidecarError(f"its sidecar name {name!r} is too long for the file system "
                               f"({len(os.fsencode(name))} bytes, at most {limit})")
        return path

    def lock_folder(self, path: str) -> tuple[str, bool]:
        """(the folder a run holds while it writes ``path``, whether to create it):
        the output folder, or the image's folder (nothing is created there)."""
        if self.output_dir is not None:
            return os.path.abspath(self.output_dir), True
        return os.path.dirname(path) or ".", False

    def action(self, path: str) -> str:
        """What a run would do to ``path``: write, skip, overwrite, append or prepend."""
        if not os.path.lexists(path):
            return "write"
        return self.existing.value

    def claim(self, path: str, image: str) -> None:
        """Two images of one stem (a.jpg, a.png) would share a.txt: the second one fails."""
        owner = self._claimed.get(path)
        if owner is not None and owner != image:
            raise SidecarError(f"its sidecar {path} is also the sidecar of {owner}; rename one of them")
        self._claimed[path] = image

    # -- what ----------------------------------------------------------------
    def text(self, captions: list[str], path: str) -> str:
        new = "\n".join(f"{self.prefix}{c}{self.suffix}" for c in captions)
        action = self.action(path)
        if action in ("append", "prepend"):
            with open(path, encoding="utf-8", errors="surrogateescape") as fh:
                old = fh.read().strip()
            if old:
                new = f"{old}{self.separator}{new}" if action == "append" else f"{new}{self.separator}{old}"
        return new + "\n"


def _name_max(folder: str) -> int:
    """The longest file name the folder's file system takes (255 where it cannot say)."""
    while folder and not os.path.isdir(folder):  # an output folder not created yet: its parent
        parent = os.path.dirname(folder)
        if parent == folder:
            break
        folder = parent
    try:
        return os.pathconf(folder or ".", "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        return 255


def _relative_to_root(image: str, root: str | None) -> str:
    """The image path below its input root, with no way out of it."""
    if root is not None:
        rel = os.path.relpath(os.path.abspath(image), os.path.abspath(root))
    else:
        rel = os.path.relpath(os.path.abspath(image), os.getcwd())
    if rel.startswith(os.pardir + os.sep) or rel == os.pardir or os.path.isabs(rel):
        rel = os.path.basename(image)  # outside the root: keep the file name only
    return rel


def write_atomic(path: str, text: str) -> None:
    """Write a sidecar: a reader sees the old file or the new one, never half."""
    atomic_write(path, text)


class SidecarWriter:
    """Writes each successful record's captions to its sidecar, then passes the
    record (with ``sidecar`` set) on to the stream writer."""

    def __init__(self, policy: SidecarPolicy, inner, *, text_of=lambda r: r.get("captions") or [], guard=None):
        self.policy = policy
        self.inner = inner
        self.text_of = text_of
        self.guard = guard  # guard.RunGuard: an input or an image is never overwritten

    def write(self, record: dict) -> None:
        if not record.get("error"):
            path = record.get("sidecar")
            try:
                if path is None:
                    raise SidecarError("no sidecar path")
                problem = self.guard.sidecar_problem(path) if self.guard is not None else None
                if problem:  # checked again at the last moment: stdin may have named it since
                    record.pop("sidecar", None)
                    raise SidecarError(problem)
                write_atomic(path, self.policy.text(list(self.text_of(record)), path))
            except (OSError, SidecarError) as exc:
                reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
                record["error"] = reason if "sidecar" not in record else f"cannot write the sidecar {path}: {reason}"
        self.inner.write(record)

    def close(self) -> None:
        self.inner.close()


def plan(items, policy: SidecarPolicy, on_skip, *, guard=None):
    """Yield the items that need a sidecar written.

    Items whose sidecar exists are dropped under ``--existing skip`` before any
    decoding (``on_skip(item, path)`` is told); an item that cannot have a
    sidecar comes out with its ``error`` set, so it becomes an error record.
    With a ``guard`` (``guard.RunGuard``): a sidecar path that is an input of the
    run or an image is such an error, whatever ``--existing`` says; and the folder
    of each sidecar is locked against a second run before its state is looked at
    (a second run over a known list is refused; on stdin, its item fails).
    """
    for item in items:
        if item.error is not None:
            yield item
            continue
        try:
            path = policy.path_for(item)
            problem = guard.sidecar_problem(path) if guard is not None else None
            if problem:
                raise SidecarError(problem)
            policy.claim(path, item.name)
        except SidecarError as exc:
            yield replace(item, error=str(exc))
            continue
        if guard is not None:
            folder, create = policy.lock_folder(path)
            busy = guard.lock_folder(folder, create=create)
            if busy:
                yield replace(item, error=busy)
                continue
        if policy.action(path) == "skip":
            on_skip(item, path)
            continue
        yield item
