"""The segmented vector store: a directory of immutable segments and one manifest.

``blip2 embed photos/ -o vectors/ --layout segments`` (later runs: ``-o vectors/``
alone; the manifest says what it is) writes::

    vectors/blip2-store.json        the manifest: settings, generation, the segments
    vectors/seg-<id>.npy            a segment's rows: [rows, *dims], float32/float16, C order
    vectors/seg-<id>.parquet        its index: path, abspath, size, mtime_ns, sha256 (one row per row)

Segment files are written once, under names never used before, and never
modified. An update writes its new rows (and rows it moves) to a new segment,
records deleted rows (changed files, ``--prune``) as row numbers in the
manifest, and commits by renaming a new manifest over the old one: the single
commit point. A crash before it leaves the old manifest, which does not name the
new files (the next writer deletes them); after it, the new store. Appending N
rows writes N rows, whatever the store's size.

The tie between data and index: each segment's id is written into its ``.npy``
(the 40-byte ``BLIP2GEN`` trailer of the single-file format, after the rows) and
into its Parquet file's key-value metadata (``blip2.segment``), and the manifest
names each segment by id with its row count; all three are checked when the
store is opened, so files from another commit or another store are refused.

Compaction: a segment whose rows are more than half deleted is rewritten at the
next commit; adjacent trailing segments are merged while the older one is at
most twice the size of the newer one (so there are O(log rows) segments and each
row is copied O(log rows) times over its life); ``--compact`` merges everything
into one segment.

Reading without blip2 (numpy + pandas): the live rows of each segment, in order::

    import json, numpy as np, pandas as pd
    m = json.load(open("vectors/blip2-store.json"))
    segs = [(pd.read_parquet(f"vectors/{s['index']}").drop(index=s["deleted"]), s) for s in m["segments"]]
    rows = pd.concat([r for r, _ in segs], ignore_index=True)  # rows.path[i] is the image of vectors[i]
    vectors = np.concatenate([np.load(f"vectors/{s['vectors']}", mmap_mode="r")[r.index] for r, s in segs])
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .errors import UsageError
from .store import (
    Entry,
    StoreError,
    StoreMeta,
    StoreUpdate,
    UpdateStats,
    _COPY_BYTES,
    _fsync_dir,
    _Lock,
    _npy_header,
    _npy_trailer,
    _read_matrix_info,
    _show,
    _unlink,
)

MANIFEST = "blip2-store.json"
SEGMENTED_FORMAT = "blip2-segmented-store"
SEGMENTED_VERSION = 1
DELETED_FRACTION = 0.5  # a segment more deleted than this is rewritten at the next commit
TAIL_RATIO = 2  # merge the last two segments while the older is at most this times the newer
PARQUET_KEY = b"blip2.segment"
ROW_GROUP = 16384  # rows per Parquet row group: reading one entry reads one group


def is_segmented(path) -> bool:
    return path is not None and (Path(path) / MANIFEST).is_file()


def _need_pyarrow():
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise StoreError("a segmented vector store needs pyarrow (its index is Parquet)",
                         hint="pip install pyarrow") from None
    import pyarrow as pa
    import pyarrow.parquet as pq

    return pa, pq


# --------------------------------------------------------------------------- #
# Segments
# --------------------------------------------------------------------------- #


@dataclass
class Segment:
    """One immutable pair of files, and which of its rows are deleted."""

    id: str
    rows: int  # physical rows in the files
    deleted: "object"  # sorted int64 numpy array of deleted physical rows
    offset: int = 0  # where the rows start in the .npy
    base: int = 0  # its first live row's number in the store

    @property
    def vectors(self) -> str:
        return f"seg-{self.id}.npy"

    @property
    def index(self) -> str:
        return f"seg-{self.id}.parquet"

    @property
    def live_rows(self) -> int:
        return self.rows - len(self.deleted)

    _live = None

    @property
    def live(self):
        """Physical row numbers of the live rows (None: all of them)."""
        import numpy as np

        if not len(self.deleted):
            return None
        if self._live is None:
            mask = np.ones(self.rows, dtype=bool)
            mask[self.deleted] = False
            self._live = np.flatnonzero(mask)
        return self._live

    def to_json(self) -> dict:
        return {"id": self.id, "rows": self.rows, "vectors": self.vectors, "index": self.index,
                "deleted": [int(x) for x in self.deleted]}


def _segment_from_json(d: dict) -> Segment:
    import numpy as np

    deleted = np.unique(np.asarray(d.get("deleted") or [], dtype=np.int64))
    return Segment(str(d["id"]), int(d["rows"]), deleted)


def _read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    try:
        data = json.loads(path.read_text(encoding="utf-8", errors="surrogateescape"))
        if not isinstance(data, dict) or data.get("format") != SEGMENTED_FORMAT:
            raise ValueError(f"not a {SEGMENTED_FORMAT} manifest")
        if int(data.get("version", 0)) > SEGMENTED_VERSION:
            raise StoreError(f"{str(path)!r} was written by a newer blip2 (store version {data['version']})",
                             hint="upgrade blip2")
        return data
    except OSError as exc:
        raise StoreError(f"cannot read the store manifest {str(path)!r}: {exc.strerror or exc}") from exc
    except (ValueError, KeyError, TypeError) as exc:
        raise StoreError(f"the store manifest {str(path)!r} is damaged ({exc})") from exc


def _torn(folder: Path, seg: Segment, why: str) -> StoreError:
    return StoreError(
        f"the vector store {str(folder)!r} is damaged: segment {seg.id[:12]} {why}. Rows would be matched "
        "to the wrong images, so the store is not used (files copied or restored from different commits?)",
        hint=f"restore the whole directory from one copy, or rebuild it: delete {str(folder)!r} and run "
        f"blip2 embed PHOTOS -o {folder} --layout segments again",
    )


def _check_segment(folder: Path, seg: Segment, meta: StoreMeta, pq) -> None:
    """The generation tie: the .npy and the .parquet both name this segment, with its rows."""
    vec, idx = folder / seg.vectors, folder / seg.index
    if not vec.exists() or not idx.exists():
        raise FileNotFoundError(vec if not vec.exists() else idx)
    info = _read_matrix_info(vec)
    if info.generation != seg.id:
        raise _torn(folder, seg, f"has vectors from commit {str(info.generation)[:12]}")
    if info.rows != seg.rows or info.dims != meta.dims or info.dtype != meta.dtype:
        raise _torn(folder, seg, f"holds {info.rows} {info.dtype} rows of {_show(info.dims)}, the manifest says "
                                 f"{seg.rows} {meta.dtype} rows of {_show(meta.dims)}")
    try:
        md = pq.read_metadata(idx)
    except Exception as exc:  # pyarrow raises its own ArrowInvalid (a ValueError) or OSError
        raise _torn(folder, seg, f"has an unreadable index ({exc})") from None
    tag = (md.metadata or {}).get(PARQUET_KEY, b"").decode("ascii", "replace")
    if tag != seg.id or md.num_rows != seg.rows:
        raise _torn(folder, seg, f"has an index from commit {tag[:12] or '?'} with {md.num_rows} rows")
    seg.offset = info.offset


# --------------------------------------------------------------------------- #
# Reading
# --------------------------------------------------------------------------- #


class _Entries:
    """``store.entries``: an Entry per live row, read from the Parquet files when asked."""

    def __init__(self, store: "SegmentedStore"):
        self._store = store
        self._tables: dict[str, object] = {}
        self._groups: dict[str, tuple] = {}  # segment id -> (ParquetFile, group starts, groups read)

    def __len__(self) -> int:
        return self._store.rows

    def table(self, seg: Segment):
        if seg.id not in self._tables:
            _, pq = _need_pyarrow()
            self._tables[seg.id] = pq.read_table(self._store.path / seg.index)
        return self._tables[seg.id]

    def __getitem__(self, row: int) -> Entry:
        if row < 0:
            row += len(self)
        if not 0 <= row < len(self):
            raise IndexError(row)
        seg, phys = self._store.locate(row)
        if seg.id in self._tables:
            return _entry(self._tables[seg.id].slice(phys, 1).to_pylist()[0])
        # one row group, not the whole index: a search prints 10 paths
        import bisect

        if seg.id not in self._groups:
            _, pq = _need_pyarrow()
            pf = pq.ParquetFile(self._store.path / seg.index)
            starts, n = [], 0
            for g in range(pf.metadata.num_row_groups):
                starts.append(n)
                n += pf.metadata.row_group(g).num_rows
            self._groups[seg.id] = (pf, starts, {})
        pf, starts, cache = self._groups[seg.id]
        group = bisect.bisect_right(starts, phys) - 1
        if group not in cache:
            cache[group] = pf.read_row_group(group)
        return _entry(cache[group].slice(phys - starts[group], 1).to_pylist()[0])

    def __iter__(self) -> Iterator[Entry]:
        for seg in self._store.segments:
            cols = self.table(seg).to_pydict()
            live = range(seg.rows) if seg.live is None else seg.live.tolist()
            for i in live:
                yield Entry(cols["path"][i], cols["abspath"][i], cols["size"][i], cols["mtime_ns"][i],
                            cols["sha256"][i])

    def column(self, seg: Segment, name: str) -> list:
        return self.table(seg).column(name).to_pylist()


def _entry(rec: dict) -> Entry:
    return Entry(rec["path"], rec["abspath"], int(rec["size"]), int(rec["mtime_ns"]), rec["sha256"])


class _Matrix:
    """``store.matrix``: rows by number (an int, a slice, an array of row numbers)."""

    def __init__(self, store: "SegmentedStore"):
        self._store = store
        self._maps: dict[str, object] = {}

    @property
    def shape(self) -> tuple:
        return (self._store.rows, *self._store.meta.dims)

    def __len__(self) -> int:
        return self._store.rows

    def __array__(self, dtype=None, copy=None):
        out = self._store.read_rows(0, self._store.rows)
        return out if dtype is None else out.astype(dtype)

    def _map(self, seg: Segment):
        import numpy as np

        if seg.id not in self._maps:
            meta = self._store.meta
            self._maps[seg.id] = np.memmap(self._store.path / seg.vectors, dtype=meta.dtype, mode="r",
                                           offset=seg.offset, shape=(seg.rows, *meta.dims))
        return self._maps[seg.id]

    def __getitem__(self, key):
        import numpy as np

        store = self._store
        if isinstance(key, slice):
            start, stop, step = key.indices(store.rows)
            if step == 1:
                return store.read_rows(start, max(start, stop))
            key = np.arange(start, stop, step)
        if isinstance(key, (int, np.integer)):
            row = int(key) + (store.rows if key < 0 else 0)
            seg, phys = store.locate(row)
            return self._map(seg)[phys]
        rows = np.asarray(key, dtype=np.int64)
        out = np.empty((len(rows), *store.meta.dims), dtype=store.meta.dtype)
        segs, phys = store.locate_many(rows)
        for si in np.unique(segs):
            pick = segs == si
            out[pick] = self._map(store.segments[si])[phys[pick]]
        return out


class SegmentedStore:
    """A segmented store opened for reading: the same interface as ``store.VectorStore``.

    Opening reads the manifest, the ``.npy`` headers and the Parquet footers
    only; the index rows are read when they are asked for (``entries[row]``,
    ``row_of``), a segment at a time."""

    def __init__(self, path: Path, manifest: dict, segments: list[Segment]):
        import numpy as np

        self.path = path
        self.meta = StoreMeta.from_settings(manifest)
        self.generation = str(manifest["generation"])
        self.created = manifest.get("created")
        self.failed = {str(f["abspath"]): {"path": str(f["path"]), "abspath": str(f["abspath"]),
                                           "error": f.get("error")} for f in manifest.get("failed") or []}
        self.segments = segments
        base = 0
        for seg in segments:
            seg.base = base
            base += seg.live_rows
        self.rows = base
        self._bases = np.asarray([s.base for s in segments], dtype=np.int64)
        self.entries = _Entries(self)
        self._mx = _Matrix(self)
        self._files: dict[str, object] = {}
        self._by_abspath: dict[str, int] | None = None

    @classmethod
    def open(cls, path) -> "SegmentedStore":
        path = Path(path)
        _, pq = _need_pyarrow()
        for attempt in (0, 1):
            manifest = _read_manifest(path)
            meta = StoreMeta.from_settings(manifest)
            segments = [_segment_from_json(d) for d in manifest.get("segments") or []]
            try:
                for seg in segments:
                    _check_segment(path, seg, meta, pq)
            except FileNotFoundError as exc:
                if attempt == 0:  # a writer replaced the manifest and removed old segments just now
                    continue
                raise StoreError(f"the vector store {str(path)!r} is incomplete: {exc.args[0]} is missing",
                                 hint=f"restore the whole directory from one copy, or rebuild it: delete "
                                 f"{str(path)!r} and run blip2 embed PHOTOS -o {path} --layout segments") from None
            return cls(path, manifest, segments)
        raise AssertionError("unreachable")

    @property
    def matrix(self):
        """Rows by number (None when the store is empty), read on demand."""
        return self._mx if self.rows else None

    # -- row numbers ------------------------------------------------------------
    def locate(self, row: int) -> tuple[Segment, int]:
        import numpy as np

        si = int(np.searchsorted(self._bases, row, side="right")) - 1
        seg = self.segments[si]
        local = row - seg.base
        return seg, (local if seg.live is None else int(seg.live[local]))

    def locate_many(self, rows):
        """(segment numbers, physical rows) for an array of row numbers."""
        import numpy as np

        segs = np.searchsorted(self._bases, rows, side="right") - 1
        phys = rows - self._bases[segs]
        for si in np.unique(segs):
            live = self.segments[si].live
            if live is not None:
                pick = segs == si
                phys[pick] = live[phys[pick]]
        return segs, phys

    def row_of(self, abspath: str) -> int | None:
        if self._by_abspath is None:
            table: dict[str, int] = {}
            for seg in self.segments:
                names = self.entries.column(seg, "abspath")
                live = range(seg.rows) if seg.live is None else seg.live.tolist()
                for n, i in enumerate(live):
                    table[names[i]] = seg.base + n
            self._by_abspath = table
        return self._by_abspath.get(abspath)

    def paths(self, start: int, stop: int) -> list[str]:
        """The ``path`` of rows ``[start, stop)`` (a column read, not an Entry per row)."""
        out: list[str] = []
        for seg in self.segments:
            a, b = max(start, seg.base), min(stop, seg.base + seg.live_rows)
            if a >= b:
                continue
            names = self.entries.column(seg, "path")
            live = range(seg.rows) if seg.live is None else seg.live.tolist()
            out.extend(names[i] for i in live[a - seg.base:b - seg.base])
        return out

    def abspaths(self) -> Iterator[tuple[int, str]]:
        for seg in self.segments:
            names = self.entries.column(seg, "abspath")
            live = range(seg.rows) if seg.live is None else seg.live.tolist()
            for n, i in enumerate(live):
                yield seg.base + n, names[i]

    # -- rows ------------------------------------------------------------------
    def _read_physical(self, seg: Segment, a: int, b: int, out) -> None:
        import numpy as np

        f = self._files.get(seg.id)
        if f is None:
            f = self._files[seg.id] = open(self.path / seg.vectors, "rb")
        row_bytes = int(np.prod(self.meta.dims)) * np.dtype(self.meta.dtype).itemsize
        f.seek(seg.offset + a * row_bytes)
        got = f.readinto(memoryview(out).cast("B")) if b > a else 0
        if got != out.nbytes:
            raise StoreError(f"the vector store {str(self.path)!r} is truncated (segment {seg.id[:12]})",
                             hint="rebuild it: delete the directory and run blip2 embed again")

    def read_rows(self, start: int, stop: int, out=None):
        """Rows ``[start, stop)`` read with plain file I/O (``out`` is filled, if given)."""
        import numpy as np

        n = max(0, stop - start)
        dims, dtype = self.meta.dims, np.dtype(self.meta.dtype)
        if out is None:
            out = np.empty((n, *dims), dtype=dtype)
        elif out.shape != (n, *dims) or out.dtype != dtype or not out.flags.c_contiguous:
            raise ValueError("read_rows: out has the wrong shape or dtype")
        pos = start
        while pos < stop:
            seg, _ = self.locate(pos)
            a, b = pos - seg.base, min(stop, seg.base + seg.live_rows) - seg.base
            dst = out[pos - start:pos - start + (b - a)]
            if seg.live is None:
                self._read_physical(seg, a, b, dst)
            else:
                phys = seg.live[a:b]
                lo, hi = int(phys[0]), int(phys[-1]) + 1
                if hi - lo == b - a:
                    self._read_physical(seg, lo, hi, dst)
                else:
                    tmp = np.empty((hi - lo, *dims), dtype=dtype)
                    self._read_physical(seg, lo, hi, tmp)
                    dst[...] = tmp[phys - lo]
            pos += b - a
        return out

    def vector(self, row: int):
        import numpy as np

        return np.asarray(self.matrix[row], dtype=np.float32)

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files = {}
        self._mx._maps = {}


# --------------------------------------------------------------------------- #
# Writing
# --------------------------------------------------------------------------- #


def _write_segment(folder: Path, meta: StoreMeta, parts, entries=None, pending=None,
                   pending_rows: int = 0) -> Segment:
    """Write a new segment: the vectors of ``parts`` (``(reader, segment, physical rows)``:
    old rows copied a chunk at a time), then ``pending_rows`` rows from ``pending``
    (an iterator of row blocks as bytes). Its index: ``entries`` (one per row), or
    else the index rows of ``parts``."""
    import numpy as np

    pa, pq = _need_pyarrow()
    seg_id = uuid.uuid4().hex
    rows = sum(len(p[2]) for p in parts) + pending_rows
    if entries is not None and len(entries) != rows:
        raise ValueError(f"{len(entries)} index rows for {rows} vectors")
    row_bytes = int(np.prod(meta.dims)) * np.dtype(meta.dtype).itemsize
    step = max(1, _COPY_BYTES // max(1, row_bytes))
    header = _npy_header(meta, rows)
    seg = Segment(seg_id, rows, np.empty(0, np.int64), offset=len(header))
    tables = []
    with open(folder / seg.vectors, "wb") as out:
        out.write(header)
        for reader, old, phys in parts:
            mm = reader._mx._map(old)
            for s in range(0, len(phys), step):
                pick = phys[s:s + step]
                lo, hi = int(pick[0]), int(pick[-1]) + 1
                if hi - lo == len(pick):
                    block = np.empty((hi - lo, *meta.dims), dtype=meta.dtype)
                    reader._read_physical(old, lo, hi, block)
                else:
                    block = np.ascontiguousarray(mm[pick])
                out.write(block.data)
            if entries is None:
                table = reader.entries.table(old)
                tables.append(table if len(phys) == old.rows else table.take(pa.array(phys)))
        written = 0
        for block in pending or ():
            out.write(block)
            written += len(block)
        if written != pending_rows * row_bytes:
            raise StoreError("the side file of new vectors ended early")
        out.write(_npy_trailer(seg_id))
        out.flush()
        os.fsync(out.fileno())
    schema = pa.schema([("path", pa.string()), ("abspath", pa.string()), ("size", pa.int64()),
                        ("mtime_ns", pa.int64()), ("sha256", pa.string())])
    if entries:  # entries is None: the parts' own index rows (compaction)
        tables.append(pa.table({
            "path": [e.path for e in entries],
            "abspath": [e.abspath for e in entries],
            "size": pa.array([e.size for e in entries], pa.int64()),
            "mtime_ns": pa.array([e.mtime_ns for e in entries], pa.int64()),
            "sha256": [e.sha256 for e in entries],
        }, schema=schema))
    table = pa.concat_tables([t.select(schema.names).cast(schema) for t in tables]) if tables else schema.empty_table()
    table = table.replace_schema_metadata({PARQUET_KEY: seg_id.encode("ascii"),
                                           b"blip2.dims": json.dumps(list(meta.dims)).encode()})
    idx = folder / seg.index
    pq.write_table(table, idx, row_group_size=ROW_GROUP)
    with open(idx, "rb+") as f:
        os.fsync(f.fileno())
    return seg


class SegmentedUpdate(StoreUpdate):
    """``StoreUpdate`` for a segmented store: same decisions (``select``, ``add``,
    ``fail``), a commit that writes only new rows (and what compaction merges)."""

    def __init__(self, path, meta: StoreMeta, *, prune: bool = False, dtype_given: bool = True,
                 layout: str | None = None, compact: bool = False):
        import numpy as np

        self.path = Path(path)
        self.kind = "segments"
        self.meta = meta
        self.prune = prune
        self.compact = compact
        self.stats = UpdateStats()
        if self.path.exists() and not self.path.is_dir():
            raise UsageError(f"{str(self.path)!r} is a file; a segmented vector store is a directory",
                             hint="name a new directory as the output, or drop layout='segments'",
                             params=["layout"])
        _need_pyarrow()
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock = _Lock(self.path / ".pending")
        self._mutex = threading.Lock()
        self._closed = False
        self._added: list[Entry] = []
        self._added_keys: set[str] = set()
        self._old: SegmentedStore | None = None
        self._keep: list[bool] = []
        self._touched: dict[int, Entry] = {}
        self._kinds: dict[str, str] = {}
        self._failed: dict[str, dict] = {}
        self._np = np
        self._lock.acquire()
        try:
            self._recover()
            if is_segmented(self.path):
                self._old = SegmentedStore.open(self.path)
                self._adopt(self._old, dtype_given)
                self._keep = np.ones(self._old.rows, dtype=bool)  # read and set by row, as a list
        except BaseException:
            self._lock.release(remove=False)
            raise
        self._row_elems = int(np.prod(meta.dims))
        self._row_dtype = np.dtype(self.meta.dtype)

    def _recover(self) -> None:
        """Delete what a writer that crashed before its commit point left: files the manifest does not name."""
        _unlink(self.path / (MANIFEST + ".tmp"))
        named: set[str] = set()
        if (self.path / MANIFEST).exists():
            for d in _read_manifest(self.path).get("segments") or []:
                seg = _segment_from_json(d)
                named.update((seg.vectors, seg.index))
        for p in self.path.iterdir():
            if p.name.startswith("seg-") and p.name not in named:
                _unlink(p)

    def commit(self) -> UpdateStats:
        import numpy as np

        with self._mutex:
            self._closed = True
        old = self._old
        keep = np.array(self._keep, dtype=bool)
        if self.prune and old is not None:
            for row, abspath in old.abspaths():
                if keep[row] and not os.path.exists(abspath):
                    keep[row] = False
                    self.stats.pruned += 1
        moved = sorted(r for r in self._touched if keep[r])  # new mtimes: the rows move to the new segment
        for r in moved:
            keep[r] = False
        new_entries = [self._touched[r] for r in moved] + self._added
        gone = np.flatnonzero(~keep)
        self.stats.added = len(self._added)
        self.stats.rows = (old.rows if old is not None else 0) - len(gone) + len(new_entries)
        failed = self._failed_after()
        changed = bool(len(gone) or new_entries)
        if old is not None and not changed and not self.compact and failed == old.failed:
            return self.stats
        segments = [] if old is None else [Segment(s.id, s.rows, s.deleted.copy(), s.offset, s.base)
                                           for s in old.segments]
        if len(gone):
            segs, phys = old.locate_many(gone)
            for si in np.unique(segs):
                s = segments[si]
                s.deleted = np.union1d(s.deleted, phys[segs == si])
                s._live = None
        # the new segment: moved rows (their vectors copied), then the new ones from the side file
        written: list[Segment] = []
        if new_entries:
            parts = []
            if moved:
                segs, phys = old.locate_many(np.asarray(moved, dtype=np.int64))
                for si in np.unique(segs):  # moved is sorted: segment by segment, in row order
                    parts.append((old, old.segments[si], phys[segs == si]))
            written.append(_write_segment(self.path, self.meta, parts, new_entries, self._pending_blocks(),
                                          len(self._added)))
            segments.append(written[-1])
        segments, merged = self._compaction(segments, old, written)
        self.stats.compacted = merged
        self._write_manifest(segments, failed, old)
        if old is not None:
            old.close()
        named = {n for s in segments for n in (s.vectors, s.index)}
        for p in self.path.iterdir():
            if p.name.startswith("seg-") and p.name not in named:
                _unlink(p)
        self.stats.rewritten = True
        return self.stats

    def _pending_blocks(self):
        pending = self._lock.fh
        pending.flush()
        pending.seek(0)
        row_bytes = self._row_elems * self._row_dtype.itemsize
        remaining = len(self._added) * row_bytes
        step = max(1, _COPY_BYTES // max(1, row_bytes)) * row_bytes
        while remaining:
            block = pending.read(min(remaining, step))
            if not block:
                raise StoreError("the side file of new vectors ended early")
            yield block
            remaining -= len(block)
        pending.seek(0, os.SEEK_END)

    def _compaction(self, segments: list[Segment], old, written: list[Segment]) -> tuple[list[Segment], int]:
        """Rewrite what the policy (module doc) says; return the new list and the rows copied."""
        import numpy as np

        copied = 0
        reader = _Reader(self.path, self.meta)  # reads any segment it is handed, named or not yet

        def merge(group: list[Segment]) -> Segment:
            nonlocal copied
            parts = []
            for s in group:
                phys = np.arange(s.rows, dtype=np.int64) if s.live is None else s.live
                if len(phys):
                    parts.append((reader, s, phys))
            copied += sum(len(p[2]) for p in parts)
            return _write_segment(self.path, self.meta, parts)

        try:
            segments = [s for s in segments if s.live_rows > 0]
            if self.compact:
                if len(segments) > 1 or any(len(s.deleted) for s in segments):
                    segments = [merge(segments)]
                return segments, copied
            out = []
            for s in segments:
                out.append(merge([s]) if len(s.deleted) > DELETED_FRACTION * s.rows else s)
            while len(out) >= 2 and out[-2].live_rows <= TAIL_RATIO * out[-1].live_rows:
                out[-2:] = [merge(out[-2:])]
            return out, copied
        finally:
            reader.close()

    def _write_manifest(self, segments: list[Segment], failed: dict, old) -> None:
        from . import __version__

        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        body = {
            "format": SEGMENTED_FORMAT,
            "version": SEGMENTED_VERSION,
            "generation": uuid.uuid4().hex,
            "rows": sum(s.live_rows for s in segments),
            **self.meta.settings(),
            "created": (old.created if old is not None else None) or now,
            "updated": now,
            "blip2": __version__,
            "segments": [s.to_json() for s in segments],
            "failed": list(failed.values()),
        }
        tmp = self.path / (MANIFEST + ".tmp")
        with open(tmp, "w", encoding="utf-8", errors="surrogateescape", newline="\n") as f:
            f.write(json.dumps(body, ensure_ascii=False, indent=1) + "\n")
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(self.path)  # the segment files' names are durable before the manifest names them
        os.replace(tmp, self.path / MANIFEST)  # the commit point
        _fsync_dir(self.path)


class _Reader(SegmentedStore):
    """Reads the segments it is handed (compaction: old ones, and those this commit wrote)."""

    def __init__(self, path: Path, meta: StoreMeta):
        super().__init__(path, {**meta.settings(), "generation": ""}, [])
