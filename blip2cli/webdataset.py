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

With ``-o DIR`` (see :func:`run_per_shard`) each input shard gets its own output,
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
SHARD_STATE = ".shards"  # DIR/.shards: the manifest and the part file of each unfinished shard


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
    from .decode import megabytes as mb

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
            from .decode import MAX_DECODE_BYTES

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
        from .decode import ImageError, open_regular

        try:
            fh, _ = open_regular(path)
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


# -- -o DIR: one output per shard -------------------------------------------------
class _Switch:
    """The writer the pipeline writes to: the current shard's writer (swapped per shard)."""

    def __init__(self):
        self.inner = None

    def write(self, record: dict) -> None:
        self.inner.write(record)

    def close(self) -> None:
        pass


def run_per_shard(job, items: list, guard, result):
    """``-o DIR`` with shard inputs: each shard's records into ``DIR/<name>.<ext>``.

    The run always resumes, as ``-o DIR`` does: a shard whose output exists is done
    (delete the file to redo it); a shard with a part file in ``DIR/.shards`` goes on
    after its last whole record (its failed samples retried); the settings are
    compared with those the directory was started with (and with each part's
    records). ``--shard I/N`` and launcher ranks take whole shards (contiguous slices
    of the sorted shard list)."""
    from pathlib import Path

    from . import console
    from .errors import UsageError, sigterm_as_interrupt
    from .job import QUEUE_SAMPLES, _Recorded, _SkipDone
    from .loader import load, plan
    from .parts import PartsDir, Shard, launched_shard, local_device, parse_shard
    from .pipeline import Stats, run
    from .resume import load_resume
    from .writers import Sink, make_writer

    plain = [i.name for i in items if not getattr(i, "tar", False)]
    if plain:
        raise UsageError(
            f"-o {job.output} with tar shards writes one file per shard; {plain[0]!r} is not a shard",
            hint="caption the shards and the other images in separate runs",
        )
    if job.sidecar is not None:
        raise UsageError("sidecar does not work with tar shards as inputs (their images are no files)",
                         params=["sidecar"])
    if job.fmt not in ("jsonl", "parquet"):
        raise UsageError(f"per-shard outputs are JSON Lines or Parquet, not {job.fmt}",
                         hint="drop format, or use format='parquet'", params=["format"])
    if job.fmt == "parquet":
        from .parquet import require_pyarrow

        require_pyarrow()
    ext = ".parquet" if job.fmt == "parquet" else ".jsonl"
    names = [i.name for i in items]
    stems: dict[str, str] = {}
    for name in names:
        stem = shard_stem(name)
        if stem in stems and stems[stem] != name:
            raise UsageError(f"{stems[stem]!r} and {name!r} would both write {stem}{ext}",
                             hint="give each shard a different file name, or run them into separate directories")
        stems[stem] = name
    shard = parse_shard(job.shard) if job.shard is not None else launched_shard()
    if shard is None:
        shard = Shard(0, 1, launched=True)
    job.load_options.device = local_device(shard, job.load_options.device)
    kwargs = {"architectures": job.architectures} if job.architectures else {}
    load_plan = plan(job.load_options, task=job.command, **kwargs)
    settings = {**load_plan.settings(), **job.extra_settings}

    root = Path(job.output)
    state = PartsDir(root, job.command)
    state.parts = root / SHARD_STATE
    if not job.dry_run:
        state.write_manifest(names, settings)  # refuses another command, other inputs
    state.check_settings(settings)
    start, end = shard.bounds(len(names))
    todo = []  # (shard path, final, part, done keys)
    finished = 0
    locked: set = set()
    for name in names[start:end]:
        final = root / f"{shard_stem(name)}{ext}"
        part = state.parts / "parts" / f"{shard_stem(name)}.jsonl"  # not beside manifest.json, inputs.jsonl
        if final.exists():
            finished += 1
            if job.dry_run:
                job._dry_line("skip", str(final), name)
            continue
        done: set = set()
        if part.exists():
            if not job.dry_run:
                guard.lock_output(part, what="the part file")  # before its records are read
                locked.add(part)
            done = load_resume(str(part), settings, job.key_of_record).done
        todo.append((name, final, part, done))
        if job.dry_run:
            job._dry_line(job.command, name, str(final))
    result.resumed = finished
    if finished:
        console.message(f"{finished} of {end - start} shards already done in {root}")
    if job.dry_run:
        console.message(f"dry run: {len(todo)} shards to {job.command}, {finished} done")
        return result
    if not todo:
        _meet(shard)
        return result

    loaded = load(job.load_options, load_plan=load_plan)
    if job.seed is not None:
        import torch

        torch.manual_seed(job.seed)
    task = _Recorded(job.make_task(loaded), settings, None)
    from .console import Reporter
    from .defaults import default_batch_size, default_workers

    reader = job.samples or SampleReader()
    reporter = Reporter(quiet=job.quiet, total=None, description=job.description)
    switch = _Switch()
    outer = switch
    for wrap in job.wrappers:
        outer = wrap(outer)
    total = Stats()
    batch_size = job.batch_size or default_batch_size(loaded.device.type)
    try:
        for name, final, part, done in todo:
            part.parent.mkdir(parents=True, exist_ok=True)
            if part not in locked:
                guard.lock_output(part, what="the part file")
            sink = Sink(str(part), append=part.exists(),
                        hint="free some space, then run the same command again: it carries on after "
                        "the last whole record").open()
            failed = True
            try:
                writer = make_writer("jsonl", sink, job.schema)
                switch.inner = _SkipDone(writer, done, job.key_of_record) if done else writer
                pending = (s for s in reader.samples(name)
                           if not all(k in done for k in job.keys_of_item(s)))
                with sigterm_as_interrupt():
                    stats = run(pending, task, outer, batch_size=batch_size,
                                workers=job.workers or default_workers(), reporter=reporter,
                                fail_fast=job.fail_fast, queue_size=QUEUE_SAMPLES)
                failed = False
            finally:
                sink.close(quiet=failed)
            _add(total, stats)
            _promote(part, final, job.fmt, job.schema)
            if job.fail_fast and stats.failed:
                break
        outer.close()
    finally:
        reporter.close()
        result.stats = total
    console.message(f"{len(todo)} shard outputs written in {root}") if not job.quiet else None
    _meet(shard)
    return result


def _meet(shard) -> None:
    if shard.launched and shard.count > 1:
        from .parts import wait_for_everyone

        wait_for_everyone()


def _add(total, stats) -> None:
    total.done += stats.done
    total.failed += stats.failed
    total.seconds += stats.seconds
    for k, v in stats.stage_seconds.items():
        total.stage_seconds[k] = total.stage_seconds.get(k, 0.0) + v
    total.batch_seconds += stats.batch_seconds
    total.batch_size_reduced_to = stats.batch_size_reduced_to or total.batch_size_reduced_to


def _promote(part, final, fmt: str, schema) -> None:
    """A finished shard's part file into place, atomically (JSON Lines: renamed; Parquet:
    written beside the final name from the part's records, then renamed)."""
    if fmt == "jsonl":
        with open(part, "rb") as f:
            os.fsync(f.fileno())
        os.replace(part, final)
        return
    from .fsutil import replacing
    from .parquet import ParquetWriter
    from .writers import Sink

    with replacing(final) as tmp:
        sink = Sink(tmp).open()
        try:
            writer = ParquetWriter(sink, schema)
            with open(part, "rb") as f:
                for raw in f:
                    if raw.strip():
                        writer.write(json.loads(raw.decode("utf-8", "surrogateescape")))
            writer.close()
        finally:
            sink.close()
    os.unlink(part)


def with_fields(item: Item, **fields) -> Item:
    return replace(item, fields={**(item.fields or {}), **fields})


def configure(job, carry, ext) -> None:
    """The command's --carry and --ext for shard inputs; --carry is a setting of the run."""
    names = parse_carry(carry)
    job.samples = SampleReader(carry=names, extensions=ext)
    if names:
        job.extra_settings["carry"] = list(names)
