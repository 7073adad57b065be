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

A Parquet file (img2dataset's ``--output_format parquet``) is a shard file too: its
rows are its samples (see "Parquet files" below).

With ``-o DIR`` (the runner's ``Job._run_per_shard`` in ``job.py``) each input shard gets its own output,
``DIR/<shard name>.jsonl`` (or ``.parquet``), written to ``DIR/.shards/parts/<name>.jsonl``
as records come and moved into place (atomically) when the shard is finished.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from dataclasses import replace
from typing import Iterable, Iterator

from .shardfiles import IMAGE_COLUMNS, find_column, find_image_column, is_parquet_path, open_regular_file
from .sources import DEFAULT_EXTENSIONS, Item

MAX_CARRY_BYTES = 16 * 1024 * 1024  # one carried member (txt, json) at most
MAX_CARRY_WARNINGS = 20  # lines on stderr for members not carried (every record says it in carry_error)


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


def megabytes(n: int) -> str:
    from .decode import megabytes as mb

    return mb(n)


class _Sample:
    def __init__(self, key: str, position: int, repeated: bool):
        self.key = key
        self.position = position  # the index of its first member in the tar
        self.repeated = repeated  # its key came earlier in this shard (not adjacent)
        self.data: dict[str, bytes] = {}  # extension -> bytes (the members we keep)
        self.names: dict[str, str] = {}  # extension -> member name
        self.problems: dict[str, str] = {}  # extension -> why it was not read
        self.members: list[str] = []
        self.reserved = 0  # bytes taken from the read-ahead budget for this sample


# Sample bytes alive at once (read from the tars but not yet done with), all shards together.
MAX_INFLIGHT_BYTES = 512 * 1024 * 1024
_WAIT_RELEASE = 0.25  # seconds the reader waits for bytes to be given back before it reads on anyway


class ByteBudget:
    """The read-ahead of tar samples, bounded by the bytes they hold, not by their count.

    The reader ``take``s a member's size (from its header) before reading its data, and
    the bytes are given back when the sample's item is garbage (``weakref.finalize``):
    so what is counted is what is alive anywhere (queued, decoding, in a batch). A
    member that does not fit waits until bytes are given back; when none are for
    ``_WAIT_RELEASE`` seconds, the consumer is waiting for the reader (it holds only
    finished items), and the member is read anyway: the budget never deadlocks a run,
    and memory stays near ``limit`` plus about one member."""

    def __init__(self, limit: int | None = None):
        import threading

        self._limit = limit
        self.used = 0
        self.peak = 0
        self._cond = threading.Condition()

    @property
    def limit(self) -> int:
        return self._limit if self._limit is not None else MAX_INFLIGHT_BYTES

    def take(self, n: int) -> None:
        with self._cond:
            while self.used and self.used + n > self.limit:
                if not self._cond.wait(_WAIT_RELEASE):
                    break  # nothing given back: the pipeline waits for us
            self.used += n
            self.peak = max(self.peak, self.used)

    def give(self, n: int) -> None:
        with self._cond:
            self.used -= n
            self._cond.notify_all()


class _TarInfo(tarfile.TarInfo):
    """Records why ``tarfile`` stopped: end-of-archive blocks, or the data just ending."""

    @classmethod
    def fromtarfile(cls, tf):
        try:
            return super().fromtarfile(tf)
        except tarfile.EOFHeaderError:  # a zero block: the archive's proper end
            tf.blip2_end = "end"
            raise
        except tarfile.EmptyHeaderError:  # no more data where a header should be
            tf.blip2_end = "cut"
            raise
        except tarfile.HeaderError as exc:
            tf.blip2_end = f"bad header ({exc})"
            raise


class SampleReader:
    """Turns shard items into sample items (other items pass through)."""

    def __init__(self, carry: Iterable[str] = (), extensions: Iterable[str] | None = None,
                 max_image_bytes: int | None = -1, max_carry_bytes: int | None = None,
                 budget: ByteBudget | None = None, image_column: str | None = None):
        from .sources import parse_extensions

        self.carry = tuple(carry)
        self.image_exts = tuple(e for e in parse_extensions(extensions) if e not in ("tar", "tgz", "tar.gz"))
        if not self.image_exts:
            self.image_exts = DEFAULT_EXTENSIONS
        self._max_image = max_image_bytes
        self.max_carry = MAX_CARRY_BYTES if max_carry_bytes is None else max_carry_bytes
        self.budget = budget or ByteBudget()
        self.image_column = image_column  # Parquet inputs: the image-bytes column (None: found by name)
        self.warned = 0  # carried members that were not carried (too large, a link, ...)

    @property
    def max_image(self) -> int | None:
        if self._max_image == -1:
            from .decode import MAX_DECODE_BYTES

            return MAX_DECODE_BYTES
        return self._max_image

    def carry_types(self, items: list[Item] | None) -> dict[str, str]:
        """``{record field: "string" | "int64" | "float64" | "bool"}`` of the carried values,
        fixed before the first record (``--format parquet`` types its columns with them, so
        every output of a dataset has the same schema whatever its first row holds).

        A column of Parquet inputs keeps its type where every input known up front has it
        with the same (integer, floating point, boolean); everything else, tar members
        included (``json`` as its JSON text), is a string."""
        kinds: dict[str, set[str]] = {name: set() for name in self.carry}
        for item in items or ():
            if not getattr(item, "tar", False) or item.error is not None:
                continue
            if not is_parquet_path(item.name):
                for found in kinds.values():
                    found.add("string")  # a tar's members: text
                continue
            for name, kind in _parquet_kinds(item.name, self.carry).items():
                kinds[name].add(kind)
        if items is None:  # streamed inputs: nothing known up front
            return {carry_field(name): "string" for name in self.carry}
        return {carry_field(name): (found.pop() if len(found) == 1 else "string") for name, found in kinds.items()}

    def expand(self, items: Iterable[Item]) -> Iterator[Item]:
        """Shard files (a tar, a Parquet file) become their samples as they are read."""
        for item in items:
            if getattr(item, "tar", False) and item.error is None:
                yield from self.samples(item.name, found=item.root is not None)
            else:
                yield item

    def samples(self, path: str, found: bool = False) -> Iterator[Item]:
        """The samples of one shard file (a tar or a Parquet file), in order. ``found``: it came
        from a folder or a glob (a Parquet file without an image column is then left out)."""
        if is_parquet_path(path):
            return parquet_samples(self, path, found=found)
        return self.tar_samples(path)

    # -- one shard -----------------------------------------------------------
    def tar_samples(self, path: str) -> Iterator[Item]:
        """The samples of one tar, in order; errors as items that fail (see the module doc)."""
        from .decode import ImageError, open_regular

        try:
            fh, _ = open_regular(path)
        except ImageError as exc:
            yield self.shard_error(path, f"cannot read this shard: {exc}")
            return
        except TypeError:
            yield self.shard_error(path, "cannot read this shard")
            return
        with fh:
            try:
                tf = tarfile.open(fileobj=fh, mode="r|*", tarinfo=_TarInfo)
            except (tarfile.TarError, OSError, EOFError) as exc:
                yield self.shard_error(path, f"not a readable tar file ({exc})")
                return
            sample: _Sample | None = None
            seen: set[str] = set()  # keys of this shard so far: a repeated one gets its position
            at = 0
            position = -1
            try:
                while True:
                    member = tf.next()
                    if member is None:
                        end = getattr(tf, "blip2_end", "end")
                        if end != "end":  # every member whole, but the archive's end is missing
                            if sample is not None:
                                yield self._item(path, sample)
                            what = ("no end-of-archive blocks after the last member (cut short?)"
                                    if end == "cut" else end)
                            yield self.shard_error(path, f"truncated or corrupt tar at byte {tf.offset}: "
                                                    f"{what}; the samples before it were read")
                            return
                        break
                    at = member.offset
                    position += 1
                    if member.isdir():
                        continue
                    key, ext = split_name(member.name)
                    if sample is None or key != sample.key:
                        if sample is not None:
                            yield self._item(path, sample)
                        sample = _Sample(key, position, key in seen)
                        seen.add(key)
                    sample.members.append(member.name)
                    self._read_into(sample, tf, member, ext.lower())
            except (tarfile.TarError, OSError, EOFError, ValueError) as exc:
                # What was read before the break stands; the sample cut in two is dropped.
                if sample is not None and sample.reserved:
                    self.budget.give(sample.reserved)
                yield self.shard_error(
                    path, f"truncated or corrupt tar at byte {at}: {exc}; the samples before it were read")
                return
            if sample is not None:
                yield self._item(path, sample)

    def _read_into(self, sample: _Sample, tf, member, ext: str) -> None:
        """Read ``member`` (extension ``ext``) into ``sample`` when it is an image or a carried
        file: its bytes, or the problem that kept them out (a link, too large, a bad head)."""
        is_image = ext in self.image_exts
        if not is_image and ext not in self.carry:
            return
        if ext in sample.data or ext in sample.problems:
            return  # the same extension twice in one sample: the first wins
        sample.names[ext] = member.name
        why = _kind(member)
        if why is not None:
            sample.problems[ext] = f"the member {member.name!r} is {why}: not followed"
            return
        limit = self.max_image if is_image else self.max_carry
        if limit is not None and member.size > limit:
            sample.problems[ext] = (f"the member {member.name!r} is too large "
                                    f"({megabytes(member.size)}; the limit is {megabytes(limit)})")
            return
        self.budget.take(member.size)
        sample.reserved += member.size
        sample.data[ext] = _read_member(tf.extractfile(member), member.size)
        if is_image and member.size > (1 << 20):
            problem = _check_head(sample.data[ext])
            if problem:
                del sample.data[ext]
                sample.problems[ext] = problem
        # (no local variable holds the bytes: the sample, then its item, alone do)

    def shard_error(self, path: str, message: str) -> Item:
        fields = {"shard": path, "key": None, **{carry_field(c): None for c in self.carry}}
        if self.carry:
            fields["carry_error"] = None
        return Item(name=path, source=path, error=message, fields=fields)

    def carry_fields(self, values: dict, problems: dict[str, str], sample_name: str) -> dict:
        """The ``--carry`` fields of one sample (``carry_error`` says what could not be carried)."""
        fields: dict = {}
        lost = []
        for ext in self.carry:
            fields[carry_field(ext)] = values.get(ext)
            if ext in problems:
                lost.append(f"{ext}: {problems[ext]}")
        if self.carry:
            fields["carry_error"] = "; ".join(lost) if lost else None
        if lost:
            from . import console

            self.warned += 1
            if self.warned <= MAX_CARRY_WARNINGS:
                console.message(f"warning: {sample_name}: not carried: " + "; ".join(lost))
            elif self.warned == MAX_CARRY_WARNINGS + 1:
                console.message("warning: more members not carried; each record says why in carry_error")
        return fields

    def _item(self, path: str, sample: _Sample) -> Item:
        fields: dict = {"shard": path, "key": sample.key}
        carried = {ext: _carried(ext, sample.data.get(ext)) for ext in self.carry}
        carry_problems = {ext: sample.problems[ext] for ext in self.carry if ext in sample.problems}
        at = f"@{sample.position}" if sample.repeated else ""  # a key seen before in this shard
        fields.update(self.carry_fields(carried, carry_problems, f"{path}#{sample.key}{at}"))
        item = self._make_item(path, sample, fields, at)
        if sample.reserved:
            import weakref

            weakref.finalize(item, self.budget.give, sample.reserved)
        return item

    def _make_item(self, path: str, sample: _Sample, fields: dict, at: str) -> Item:
        for ext in self.image_exts:
            if ext in sample.data:
                return Item(name=f"{path}#{sample.names[ext]}{at}", source=sample.data[ext], fields=fields)
            if ext in sample.problems:
                return Item(name=f"{path}#{sample.names[ext]}{at}", source=path, error=sample.problems[ext],
                            fields=fields)
        shown = ", ".join(sample.members[:5]) + (", ..." if len(sample.members) > 5 else "")
        return Item(name=f"{path}#{sample.key}{at}", source=path, fields=fields,
                    error=f"no image in this sample (members: {shown}; images are {', '.join(self.image_exts)})")


def _read_member(f, size: int) -> bytes:
    """A member's data in 1 MB reads into a ``BytesIO`` (whose ``getvalue`` hands over its buffer):
    about one copy of the member at its peak, where ``read()`` of a gzip stream held three and
    joining the pieces two."""
    if size <= (1 << 20):
        return f.read()
    buffer = io.BytesIO()
    while True:
        chunk = f.read(1 << 20)
        if not chunk:
            break
        buffer.write(chunk)
        del chunk
    data = buffer.getvalue()
    buffer.close()
    return data


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
    from .decode import ImageError, check_decode_budget, open_header

    try:
        im = open_header(io.BytesIO(data))
        if im.format != "JPEG":  # a JPEG's decoded size is settled by the draft
            check_decode_budget(im)
    except ImageError as exc:
        return str(exc)
    except Exception:  # noqa: BLE001 - the decode says what is wrong with it
        return None
    return None


# -- options ------------------------------------------------------------------
CARRY_PREFIX = "source_"  # a carried name that is a record field or a setting lands under source_<name>


def _taken_names() -> frozenset:
    from .resume import record_fields
    from .tasks import settings_keys

    return frozenset({*record_fields(), *settings_keys(), "carry", "carry_error"})


def carry_field(name: str) -> str:
    """The record field a carried member or column goes to: its own name, or ``source_<name>``
    when that is a record field or a setting (img2dataset's ``caption``: ``source_caption``)."""
    return CARRY_PREFIX + name if name in _taken_names() else name


def parse_carry(values: Iterable[str] | None) -> tuple[str, ...]:
    """``["txt,json"]`` -> ``("txt", "json")`` (member extensions or Parquet columns)."""
    from .errors import UsageError

    out: list[str] = []
    for value in values or ():
        for part in value.split(","):
            part = part.strip().lower().lstrip(".")
            if not part:
                continue
            if not re.fullmatch(r"[a-z0-9_][a-z0-9_.-]*", part):
                raise UsageError(f"carry={part!r} is not a member extension or a column name "
                                 "(e.g. txt, json, cls, url)", params=["carry"])
            if part not in out:
                out.append(part)
    fields = [carry_field(p) for p in out]
    for name, field_name in zip(out, fields):
        if field_name != name and field_name in out:
            raise UsageError(f"carry={name!r} lands under {field_name!r} (a record already has a field "
                             f"{name!r}), which is carried as well", params=["carry"])
    return tuple(out)


def has_shards(items: Iterable) -> bool:
    return any(getattr(i, "tar", False) for i in items)


def refuse_with_shards(items: Iterable, what: str, hint: str | None = None) -> None:
    if has_shards(items):
        from .errors import UsageError

        raise UsageError(f"{what} does not work with tar shards as inputs", hint=hint)


def with_fields(item: Item, **fields) -> Item:
    return replace(item, fields={**(item.fields or {}), **fields})


def configure(job, carry, ext, image_column: str | None = None) -> None:
    """The command's --carry, --ext and --image-column for shard inputs (tars, Parquet files);
    --carry is a setting of the run."""
    names = parse_carry(carry)
    job.samples = SampleReader(carry=names, extensions=ext, image_column=image_column)
    if names:  # the fields as records carry them (resume and merge tell them from settings by this)
        job.extra_settings["carry"] = [carry_field(n) for n in names]


# -- Parquet files (img2dataset's --output_format parquet) ------------------------------
# Parquet files as input: img2dataset's ``--output_format parquet``, read row by row.
#
# A Parquet file named as an input, matched by a glob or found in a folder is a
# *shard file* like a tar (its item has ``tar=True``): ``SampleReader``
# turns it into one sample per row as the run reads it, so everything that works
# for tar shards works for it (records with ``shard`` and ``key``, ``--carry``,
# ``-o DIR/`` with one output per input file, resumable, ``--shard I/N`` by whole
# files).
#
# * The image is the row's bytes in the first column named ``jpg``, ``png``,
#   ``webp`` or ``image`` (or ``--image-column NAME``); a struct with a ``bytes``
#   field (a Hugging Face ``Image`` feature) works too. A file without one is an
#   error record when named explicitly; in a folder or a glob only files with a
#   binary column are inputs at all (``holds_image_bytes``: blip2's own Parquet
#   outputs and Hugging Face ``metadata.parquet`` files, beside the images, are
#   not), and one whose binary column has another name is left out with a note.
# * ``key``: the row's ``key`` column (img2dataset's), else none; ``path`` is
#   ``file.parquet#KEY``, or ``file.parquet#ROW`` (the row number, from 0) without
#   a key; a key seen before in the same file gets ``@ROW`` (unique within the file).
# * ``--carry caption,url``: those columns (matched without regard to case) copied
#   into the record; a column whose name is a record field or a setting
#   (img2dataset's ``caption``) lands under ``source_<name>`` (``source_caption``).
#   A carried column the file lacks is null, said once on stderr.
# * Streamed: ``pyarrow``'s ``iter_batches`` reads a few rows at a time (only the
#   columns needed), never the whole file; the bytes in flight share the tar
#   reader's budget (``ByteBudget``).
# * A null image, an image over the size budget, a value that is not bytes: an
#   error record for that row; a file that cannot be read: one error record naming
#   it; a read error half-way: the rows before it, then one error record.

ROWS_PER_READ = 16  # rows converted to Python at a time


def _plain(value):
    """A carried value as JSON can hold it (bytes as text, dates and decimals as strings)."""
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", "replace")
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value)


def _parquet_kinds(path: str, carry: tuple[str, ...]) -> dict[str, str]:
    """``{carried name: kind}`` of the columns a Parquet file has (its footer alone is read);
    nothing for a file that cannot be read (its error record says why)."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq

        with open_regular_file(path) as fh:
            schema = pq.read_schema(fh)
    except Exception:  # noqa: BLE001 - read again for its samples: the error is said there
        return {}
    kinds = {}
    for name in carry:
        column = find_column(list(schema.names), name)
        if column is None:
            continue
        typ = schema.field(column).type
        if pa.types.is_boolean(typ):
            kinds[name] = "bool"
        elif pa.types.is_integer(typ) and not pa.types.is_uint64(typ):
            kinds[name] = "int64"
        elif pa.types.is_floating(typ):
            kinds[name] = "float64"
        else:
            kinds[name] = "string"
    return kinds


def parquet_samples(reader, path: str, found: bool = False) -> Iterator[Item]:
    """The rows of one Parquet file as sample items (see the module doc).

    ``reader``: the ``webdataset.SampleReader`` (carry, size limits, byte budget,
    image column); ``found``: the file came from a folder or a glob, not by name."""
    from . import console

    try:
        import pyarrow.parquet as pq
    except ImportError:
        yield reader.shard_error(path, "reading Parquet files needs pyarrow: pip install pyarrow")
        return
    try:
        fh = open_regular_file(path)
    except OSError as exc:
        yield reader.shard_error(path, f"cannot read this Parquet file: {exc.strerror or exc}")
        return
    with fh:
        try:
            # buffered reads of each column chunk (not the whole chunk at once): img2dataset writes
            # a shard as one row group; this streams its pages (a 180 MB one: 82 MB, not 255 MB, at
            # the first rows)
            pf = pq.ParquetFile(fh, buffer_size=1 << 20, pre_buffer=False)
            names = list(pf.schema_arrow.names)
        except Exception as exc:  # noqa: BLE001 - pyarrow's errors vary; the file is the problem
            yield reader.shard_error(path, f"not a readable Parquet file ({type(exc).__name__}: {exc})")
            return
        column = find_image_column(names, reader.image_column)
        if column is None:
            wanted = reader.image_column or ", ".join(IMAGE_COLUMNS)
            if found:
                console.message(f"note: {path} left out: a Parquet file without an image column ({wanted})")
                return
            yield reader.shard_error(
                path, f"no image column in this Parquet file (looked for {wanted}; it has "
                f"{', '.join(names[:12])}{', ...' if len(names) > 12 else ''}); name it with image_column (--image-column on the command line)")
            return
        key_column = find_column(names, "key")
        carried = {c: find_column(names, c) for c in reader.carry}
        missing = [c for c, col in carried.items() if col is None]
        if missing:
            console.message(f"warning: {path} has no column {', '.join(missing)} to carry (null in its records)")
        columns = list(dict.fromkeys([column, *([key_column] if key_column else []),
                                      *(c for c in carried.values() if c)]))
        seen: set[str] = set()
        row = 0
        limit = reader.max_image
        try:
            for batch in pf.iter_batches(batch_size=ROWS_PER_READ, columns=columns):
                data = batch.to_pydict()
                del batch
                for i in range(len(data[column])):
                    value = data[column][i]
                    data[column][i] = None  # the batch's copy goes as soon as the item holds it
                    key = data[key_column][i] if key_column else None
                    key = None if key is None else str(key)
                    item = _row_item(reader, path, row, key, value, seen, limit,
                                     {c: (data[col][i] if col else None) for c, col in carried.items()},
                                     carry_field)
                    value = None  # the item alone holds the bytes while it is out
                    yield item
                    del item  # the consumer alone holds the item (and its bytes) now
                    row += 1
        except Exception as exc:  # noqa: BLE001 - a damaged page or row group: the rows before it stand
            yield reader.shard_error(
                path, f"cannot read this Parquet file after row {row} ({type(exc).__name__}: {exc}); "
                "the rows before it were read")


def _row_item(reader, path, row, key, value, seen, limit, carried, carry_field) -> Item:
    ident = key if key is not None else str(row)
    name = f"{path}#{ident}" + (f"@{row}" if key is not None and key in seen else "")
    if key is not None:
        seen.add(key)
    fields: dict = {"shard": path, "key": key}
    problems = {}
    for c, v in carried.items():  # the carried member limit holds for columns too
        if isinstance(v, (str, bytes, bytearray)) and len(v) > reader.max_carry:
            problems[c] = f"the column {c!r} is too large here ({megabytes(len(v))}; the limit is " \
                f"{megabytes(reader.max_carry)})"
    fields.update(reader.carry_fields({c: None if c in problems else _plain(v) for c, v in carried.items()},
                                      problems, name))
    if isinstance(value, dict):  # a Hugging Face Image feature: {"bytes": ..., "path": ...}
        value = value.get("bytes")
    if value is None:
        return Item(name=name, source=path, fields=fields, error="no image in this row (its image column is null)")
    if isinstance(value, str):
        return Item(name=name, source=path, fields=fields,
                    error="the image column holds text, not image bytes (a path or URL is not fetched)")
    if not isinstance(value, (bytes, bytearray)):
        return Item(name=name, source=path, fields=fields,
                    error=f"the image column holds {type(value).__name__}, not image bytes")
    if limit is not None and len(value) > limit:
        return Item(name=name, source=path, fields=fields,
                    error=f"the image is too large ({megabytes(len(value))}; the limit is {megabytes(limit)})")
    size = len(value)
    reader.budget.take(size)
    item = Item(name=name, source=bytes(value), fields=fields)
    import weakref

    weakref.finalize(item, reader.budget.give, size)
    return item
