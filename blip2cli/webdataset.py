"""WebDataset shards as input: tar files read as a stream of samples, never extracted.

A *shard* is a ``.tar`` (or ``.tar.gz`` / ``.tgz``) file named as an input, matched
by a glob or a brace range (``shards/{00000..00999}.tar``, expanded by
:func:`expand_braces`), or found in a folder. It is read front to back with
``tarfile`` in stream mode (``"r|*"``): no seek, no temporary files, nothing
written to disk. Member names are only ever strings in records: never a path
that is opened or created.

Samples follow the WebDataset rule: a member's *key* is its name up to the first
dot of its base name (``00042/000000123.jpg`` -> ``00042/000000123``, extension
``jpg``); consecutive members with the same key are one sample. The sample's
image is its member with an image extension (the first of ``--ext``'s order,
default jpg, jpeg, png, webp, ...). Its record carries ``shard`` (the tar's
path), ``key``, and ``path`` = ``shard#member``; ``--carry txt,json`` copies
those members into the record (``json`` parsed; anything else as text).

Bounded memory: a member's size is read from its header before its data; an
image larger than ``images.MAX_DECODE_BYTES`` or a carried member larger than
``MAX_CARRY_BYTES`` is refused without being read (an error record). Members
that are not regular files (symbolic and hard links, devices, FIFOs) are never
followed: as a sample's image they make an error record, otherwise they are
ignored. A sample without an image, a member that does not decode and a
truncated or corrupt tar are error records; the rest of the run goes on (a
truncated tar: the samples read before the break, then one error record naming
the shard and the byte offset).

With ``-o DIR`` (the runner's ``Job._run_per_shard`` in ``job.py``) each input shard gets its own output,
``DIR/<shard name>.jsonl`` (or ``.parquet``), written to ``DIR/.shards/parts/<name>.jsonl``
as records come and moved into place (atomically) when the shard is finished.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
from dataclasses import replace
from typing import Iterable, Iterator

from .sources import DEFAULT_EXTENSIONS, Item

SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
MAX_CARRY_BYTES = 16 * 1024 * 1024  # one carried member (txt, json) at most


def is_shard_path(path: str) -> bool:
    return path.lower().endswith(SHARD_SUFFIXES)


def shard_stem(path: str) -> str:
    """``shards/00042.tar`` -> ``00042`` (the name of its output file)."""
    base = os.path.basename(path)
    for suffix in SHARD_SUFFIXES:
        if base.lower().endswith(suffix):
            return base[: -len(suffix)]
    return base


# -- brace ranges ---------------------------------------------------------------
_BRACE = re.compile(r"\{([^{}]*)\}")


def has_braces(text: str) -> bool:
    m = _BRACE.search(text)
    return m is not None and (".." in m.group(1) or "," in m.group(1))


def expand_braces(text: str) -> list[str]:
    """``a{00..02}.tar`` -> ``a00.tar a01.tar a02.tar``; ``{x,y}`` -> ``x y``; several groups
    multiply, left to right. A numeric range keeps the zero padding of its bounds (the
    wider of the two); a group that is neither (``{}``, ``{a..b}``) is kept as it is."""
    for m in _BRACE.finditer(text):
        body = m.group(1)
        head, tail = text[: m.start()], text[m.end():]
        r = re.fullmatch(r"(-?\d+)\.\.(-?\d+)", body)
        if r:
            a, b = r.group(1), r.group(2)
            lo, hi = int(a), int(b)
            width = max(len(a), len(b)) if (a.lstrip("-").startswith("0") or b.lstrip("-").startswith("0")) else 0
            step = 1 if hi >= lo else -1
            if abs(hi - lo) > 10_000_000:
                from .errors import UsageError

                raise UsageError(f"the brace range {{{body}}} is too large (more than 10,000,000 names)")
            values = [str(n).zfill(width) for n in range(lo, hi + step, step)]
        elif "," in body:
            values = body.split(",")
        else:
            continue
        out: list[str] = []
        rests = expand_braces(tail)
        for v in values:  # as bash: the first group varies slowest
            out.extend(head + v + rest for rest in rests)
        return out
    return [text]


# -- samples ------------------------------------------------------------------
_KEY = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # WebDataset: key = up to the first dot of the base name


def split_name(name: str) -> tuple[str, str]:
    """``00042/000000123.seg.png`` -> (``00042/000000123``, ``seg.png``); no dot -> (name, "")."""
    m = _KEY.match(name)
    if m is None:
        return name, ""
    return m.group(1), m.group(2)


def _kind(member: tarfile.TarInfo) -> str | None:
    """Why a member is no regular file (None for one)."""
    if member.isreg():
        return None
    if member.issym():
        return f"a symbolic link (to {member.linkname!r})"
    if member.islnk():
        return f"a hard link (to {member.linkname!r})"
    if member.ischr() or member.isblk():
        return "a device"
    if member.isfifo():
        return "a named pipe"
    return "not a regular file"


def _megabytes(n: int) -> str:
    from .images import _megabytes as mb

    return mb(n)


class _Sample:
    def __init__(self, key: str):
        self.key = key
        self.data: dict[str, bytes] = {}  # extension -> bytes (the members we keep)
        self.names: dict[str, str] = {}  # extension -> member name
        self.problems: dict[str, str] = {}  # extension -> why it was not read
        self.members: list[str] = []


class SampleReader:
    """Turns shard items into sample items (other items pass through)."""

    def __init__(self, carry: Iterable[str] = (), extensions: Iterable[str] | None = None,
                 max_image_bytes: int | None = -1, max_carry_bytes: int = MAX_CARRY_BYTES):
        from .sources import parse_extensions

        self.carry = tuple(carry)
        self.image_exts = tuple(e for e in parse_extensions(extensions) if e not in ("tar", "tgz", "tar.gz"))
        if not self.image_exts:
            self.image_exts = DEFAULT_EXTENSIONS
        self._max_image = max_image_bytes
        self.max_carry = max_carry_bytes

    @property
    def max_image(self) -> int | None:
        if self._max_image == -1:
            from .images import MAX_DECODE_BYTES

            return MAX_DECODE_BYTES
        return self._max_image

    def expand(self, items: Iterable[Item]) -> Iterator[Item]:
        for item in items:
            if getattr(item, "tar", False) and item.error is None:
                yield from self.samples(item.name)
            else:
                yield item

    # -- one shard -----------------------------------------------------------
    def samples(self, path: str) -> Iterator[Item]:
        """The samples of one tar, in order; errors as items that fail (see the module doc)."""
        from .images import ImageError, _open_regular

        try:
            fh, _ = _open_regular(path)
        except ImageError as exc:
            yield self._shard_error(path, f"cannot read this shard: {exc}")
            return
        except TypeError:
            yield self._shard_error(path, "cannot read this shard")
            return
        with fh:
            try:
                tf = tarfile.open(fileobj=fh, mode="r|*")
            except (tarfile.TarError, OSError, EOFError) as exc:
                yield self._shard_error(path, f"not a readable tar file ({exc})")
                return
            sample: _Sample | None = None
            at = 0
            try:
                while True:
                    member = tf.next()
                    if member is None:
                        break
                    at = member.offset
                    if member.isdir():
                        continue
                    key, ext = split_name(member.name)
                    if sample is None or key != sample.key:
                        if sample is not None:
                            yield self._item(path, sample)
                        sample = _Sample(key)
                    sample.members.append(member.name)
                    ext = ext.lower()
                    is_image = ext in self.image_exts
                    if not is_image and ext not in self.carry:
                        continue
                    if ext in sample.data or ext in sample.problems:
                        continue  # the same extension twice in one sample: the first wins
                    sample.names[ext] = member.name
                    why = _kind(member)
                    if why is not None:
                        sample.problems[ext] = f"the member {member.name!r} is {why}: not followed"
                        continue
                    limit = self.max_image if is_image else self.max_carry
                    if limit is not None and member.size > limit:
                        sample.problems[ext] = (f"the member {member.name!r} is too large "
                                                f"({_megabytes(member.size)}; the limit is {_megabytes(limit)})")
                        continue
                    data = tf.extractfile(member).read()
                    if is_image and member.size > (1 << 20):
                        problem = _check_head(data)
                        if problem:
                            sample.problems[ext] = problem
                            continue
                    sample.data[ext] = data
            except (tarfile.TarError, OSError, EOFError, ValueError) as exc:
                # What was read before the break stands; the sample cut in two is dropped.
                yield self._shard_error(
                    path, f"truncated or corrupt tar at byte {at}: {exc}; the samples before it were read")
                return
            if sample is not None:
                yield self._item(path, sample)

    def _shard_error(self, path: str, message: str) -> Item:
        return Item(name=path, source=path, error=message, fields={"shard": path, "key": None,
                                                                   **{c: None for c in self.carry}})

    def _item(self, path: str, sample: _Sample) -> Item:
        fields: dict = {"shard": path, "key": sample.key}
        for ext in self.carry:
            fields[ext] = _carried(ext, sample.data.get(ext))
        for ext in self.image_exts:
            if ext in sample.data:
                return Item(name=f"{path}#{sample.names[ext]}", source=sample.data[ext], fields=fields)
            if ext in sample.problems:
                return Item(name=f"{path}#{sample.names[ext]}", source=path, error=sample.problems[ext],
                            fields=fields)
        shown = ", ".join(sample.members[:5]) + (", ..." if len(sample.members) > 5 else "")
        return Item(name=f"{path}#{sample.key}", source=path, fields=fields,
                    error=f"no image in this sample (members: {shown}; images are {', '.join(self.image_exts)})")


def _carried(ext: str, data: bytes | None):
    if data is None:
        return None
    text = data.decode("utf-8", "replace")
    if ext == "json" or ext.endswith(".json"):
        try:
            return json.loads(text)
        except ValueError:
            return text  # not JSON: kept as its text
    return text


def _check_head(data: bytes) -> str | None:
    """A large image member's header against the decode budget, before it is queued."""
    from .images import ImageError, _check_decode_budget, _pil

    Image = _pil()
    try:
        im = Image.open(io.BytesIO(data))
        if im.format != "JPEG":  # a JPEG's decoded size is settled by the draft
            _check_decode_budget(im)
    except ImageError as exc:
        return str(exc)
    except Exception:  # noqa: BLE001 - the decode says what is wrong with it
        return None
    return None


# -- options ------------------------------------------------------------------
def parse_carry(values: Iterable[str] | None) -> tuple[str, ...]:
    """``["txt,json"]`` -> ``("txt", "json")``; refuses names that are record fields."""
    from .errors import UsageError
    from .resume import record_fields

    out: list[str] = []
    for value in values or ():
        for part in value.split(","):
            part = part.strip().lower().lstrip(".")
            if not part:
                continue
            if not re.fullmatch(r"[a-z0-9_][a-z0-9_.-]*", part):
                raise UsageError(f"carry={part!r} is not a member extension (e.g. txt, json, cls)", params=["carry"])
            if part in record_fields() or part in ("carry",):
                raise UsageError(f"carry={part!r}: a record already has a field {part!r}",
                                 hint="carry other members (txt, json, cls, ...)", params=["carry"])
            if part not in out:
                out.append(part)
    return tuple(out)


def has_shards(items: Iterable) -> bool:
    return any(getattr(i, "tar", False) for i in items)


def refuse_with_shards(items: Iterable, what: str, hint: str | None = None) -> None:
    if has_shards(items):
        from .errors import UsageError

        raise UsageError(f"{what} does not work with tar shards as inputs", hint=hint)


def with_fields(item: Item, **fields) -> Item:
    return replace(item, fields={**(item.fields or {}), **fields})


def configure(job, carry, ext) -> None:
    """The command's --carry and --ext for shard inputs; --carry is a setting of the run."""
    names = parse_carry(carry)
    job.samples = SampleReader(carry=names, extensions=ext)
    if names:
        job.extra_settings["carry"] = list(names)
