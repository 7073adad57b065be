"""The vector store: a folder of immutable segments and one manifest.

``blip2 embed photos/ -o vectors.safetensors`` (any name; ``.safetensors`` and ``.npy``
name a new store, an existing store folder is recognised by its manifest) writes the
folder ``vectors.safetensors/``::

    blip2-store.json     the manifest: settings, generation, the segments (and the files that failed)
    seg-<id>.npy         a segment's rows: [rows, *dims] float32/float16, C order (np.load reads it)
    seg-<id>.parquet     its index: path, abspath, size, mtime_ns, sha256 (one row per row, in order)

Segment files are written once, under names never used before, and never
modified. An update streams its new rows to a side file (``.pending``, which also
holds the writer's ``flock``: one writer at a time) while the model runs; its
commit writes them as one new segment, records deleted rows (changed files,
``--prune``) as row numbers in the manifest, and renames a new manifest over the
old one: the single commit point. A crash (kill -9, a full disk) before it leaves
the old manifest, which does not name the new files (the next writer deletes
them); after it, the new store. Appending N rows writes N rows (and a manifest),
whatever the store's size.

The ties between the files: each segment's id is written into its ``.npy`` (a
40-byte ``BLIP2GEN`` trailer after the rows, which numpy's readers never reach)
and into its Parquet file's key-value metadata (``blip2.segment``); the manifest
names each segment by id with its row count and a checksum of its rows and
paths. Ids and counts are checked on every open (files from another commit or
another store are refused); the checksum when a store is served
(``VectorStore.verify``: ``blip2 search``, ``blip2 export``) and when compaction
copies a segment, so rows swapped or edited inside a segment are refused, never
matched to the wrong images. A segment whose files still have the inode, size,
mtime and ctime its commit recorded is not re-hashed (a write changes the ctime,
and a ctime cannot be set back).

Compaction: a segment whose rows are more than half deleted is rewritten at the
next commit; adjacent trailing segments are merged while the older one is at
most twice the size of the newer one (so there are O(log rows) segments and each
row is copied O(log rows) times over its life); ``--compact`` merges everything
into one segment.

Reading without blip2 (numpy + pandas): the live rows of each segment, in order::

    import json, numpy as np, pandas as pd
    m = json.load(open("vectors.safetensors/blip2-store.json"))
    segs = [(pd.read_parquet(f"vectors.safetensors/{s['index']}").drop(index=s["deleted"]), s) for s in m["segments"]]
    rows = pd.concat([r for r, _ in segs], ignore_index=True)  # rows.path[i] is the image of vectors[i]
    vectors = np.concatenate([np.load(f"vectors.safetensors/{s['vectors']}", mmap_mode="r")[r.index] for r, s in segs])

Search (``top_k``) is a matrix product over chunks of rows with a running top-k;
neither an update nor a search ever holds the whole matrix in memory. Only numpy
and pyarrow are needed here (no torch). The low-level pieces are ``storefiles.py``.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UsageError
from .storefiles import (
    COPY_BYTES,
    Entry,
    FileLock,
    StoreError,
    StoreMeta,
    column_values,
    entries_from_table,
    entries_table,
    fsync_dir,
    npy_header,
    npy_trailer,
    pyarrow_modules,
    read_npy_info,
    remove_stale_temp,
    sha256_file,
    show,
    unlink,
)

MANIFEST = "blip2-store.json"
FORMAT_NAME = "blip2-vector-store"
FORMAT_VERSION = 1
NEW_STORE_SUFFIXES = (".safetensors", ".npy")  # an -o name with these suffixes is a (new) store folder
PENDING = ".pending"  # the writer's side file and lock
DELETED_FRACTION = 0.5  # a segment more deleted than this is rewritten at the next commit
TAIL_RATIO = 2  # merge the last two segments while the older is at most this times the newer
PARQUET_KEY = b"blip2.segment"
ROW_GROUP = 16384  # rows per Parquet row group: reading one entry reads one group
# Rows per search chunk are chosen so that one chunk, converted to float32, is about this big.
CHUNK_BYTES = 64 << 20


# --------------------------------------------------------------------------- #
# Names
# --------------------------------------------------------------------------- #


def exists(path: str | os.PathLike | None) -> bool:
    """Whether ``path`` is a store folder (it holds a manifest)."""
    return path is not None and (Path(path) / MANIFEST).is_file()


def is_store_path(path: str | os.PathLike | None) -> bool:
    """A name for a new store (``NAME.safetensors``, ``NAME.npy``) or an existing store folder."""
    if path is None:
        return False
    return Path(path).suffix.lower() in NEW_STORE_SUFFIXES or exists(path)


def store_files(path: str | os.PathLike) -> list[Path]:
    """The store folder and every file in it: what no run may read as an input or write as
    another output (guards compare them by inode)."""
    path = Path(path)
    return [path, *path.iterdir()] if path.is_dir() else [path]


def inside(store: str | os.PathLike, path: str | os.PathLike) -> bool:
    """Whether ``path`` is the store folder or lies in it."""
    s, p = os.path.realpath(store), os.path.realpath(path)
    return p == s or p.startswith(s.rstrip(os.sep) + os.sep)


def _ours(name: str) -> bool:
    """A file name a store folder may hold before its first commit (or after a crash)."""
    return (name.startswith(("seg-", "ann-", ".blip2-")) or name in (PENDING, MANIFEST + ".tmp"))


def _not_a_store(path: Path) -> StoreError:
    if path.is_file():
        return StoreError(
            f"{str(path)!r} is a file, not a blip2 vector store (a store is a folder; a single-file "
            "store written by a pre-release blip2 is not read any more)",
            hint=f"choose another -o name, or delete {str(path)!r} (and {path.name}.index.parquet beside it) "
            "and embed again")
    return StoreError(f"no vector store at {str(path)!r} (no {MANIFEST} in it)",
                      hint=f"create one: blip2 embed PHOTOS -o {path}")


# --------------------------------------------------------------------------- #
# Segments and the manifest
# --------------------------------------------------------------------------- #


@dataclass
class Segment:
    """One immutable pair of files, and which of its rows are deleted."""

    id: str
    rows: int  # physical rows in the files
    deleted: Any  # sorted int64 numpy array of deleted physical rows
    checksum: str = ""  # sha256 of its rows' bytes, then its paths (see ``_Checksum``)
    written: str = ""  # the two files as the commit left them (``_fingerprint``): unchanged -> not re-hashed
    offset: int = 0  # where the rows start in the .npy
    base: int = 0  # its first live row's number in the store
    _live: Any = field(default=None, repr=False)

    @property
    def vectors(self) -> str:
        return f"seg-{self.id}.npy"

    @property
    def index(self) -> str:
        return f"seg-{self.id}.parquet"

    @property
    def live_rows(self) -> int:
        return self.rows - len(self.deleted)

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

    def copy(self) -> Segment:
        return Segment(self.id, self.rows, self.deleted.copy(), self.checksum, self.written, self.offset, self.base)

    def to_json(self) -> dict:
        return {"id": self.id, "rows": self.rows, "vectors": self.vectors, "index": self.index,
                "checksum": self.checksum, "written": self.written, "deleted": [int(x) for x in self.deleted]}

    @classmethod
    def from_json(cls, d: dict) -> Segment:
        import numpy as np

        deleted = np.unique(np.asarray(d.get("deleted") or [], dtype=np.int64))
        return cls(str(d["id"]), int(d["rows"]), deleted, str(d["checksum"]), str(d.get("written") or ""))


def _fingerprint(folder: Path, seg: Segment) -> str:
    """Inode, size, mtime and ctime of a segment's two files. Any write to a file changes its
    mtime and ctime (and nobody can set a ctime back), so a segment whose fingerprint is the
    one its commit recorded holds the bytes that were hashed; a copied or restored one
    (new inode) is hashed again."""
    parts = []
    for name in (seg.vectors, seg.index):
        st = os.stat(folder / name)
        parts.append(f"{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}")
    return "/".join(parts)


class _Checksum:
    """A segment's checksum: sha256 over its rows' bytes in order, then each row's
    ``path`` and ``abspath`` (NUL-terminated, UTF-8 with surrogate escapes)."""

    def __init__(self):
        self.h = hashlib.sha256()

    def rows(self, data) -> None:
        self.h.update(data)

    def paths(self, table) -> str:
        for name in ("path", "abspath"):
            for value in column_values(table, name):
                self.h.update(value.encode("utf-8", "surrogateescape") + b"\0")
        return "sha256:" + self.h.hexdigest()


def _read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    try:
        data = json.loads(path.read_text(encoding="utf-8", errors="surrogateescape"))
        if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
            raise ValueError(f"not a {FORMAT_NAME} manifest")
        if int(data.get("version", 0)) > FORMAT_VERSION:
            raise StoreError(f"{str(path)!r} was written by a newer blip2 (store version {data['version']})",
                             hint="upgrade blip2")
        data["segments"] = [Segment.from_json(d) for d in data.get("segments") or []]
        return data
    except OSError as exc:
        raise StoreError(f"cannot read the store manifest {str(path)!r}: {exc.strerror or exc}") from exc
    except (ValueError, KeyError, TypeError) as exc:
        raise StoreError(f"the store manifest {str(path)!r} is damaged ({exc})") from exc


def _damaged(folder: Path, seg: Segment, why: str) -> StoreError:
    return StoreError(
        f"the vector store {str(folder)!r} is damaged: segment {seg.vectors} {why}. Rows would be matched "
        "to the wrong images, so the store is not used (files edited, or copied or restored from different "
        "commits?)",
        hint=f"restore the whole folder from one copy, or rebuild it: delete {str(folder)!r} and run "
        f"blip2 embed PHOTOS -o {folder} again",
    )


def _check_segment(folder: Path, seg: Segment, meta: StoreMeta, pq) -> None:
    """The ties: the .npy and the .parquet both name this segment, with its rows."""
    vec, idx = folder / seg.vectors, folder / seg.index
    if not vec.exists() or not idx.exists():
        raise FileNotFoundError(vec if not vec.exists() else idx)
    info = read_npy_info(vec)
    if info.segment != seg.id:
        raise _damaged(folder, seg, f"has vectors from commit {info.segment[:12]}")
    if info.rows != seg.rows or info.dims != meta.dims or info.dtype != meta.dtype:
        raise _damaged(folder, seg, f"holds {info.rows} {info.dtype} rows of {show(info.dims)}, the manifest says "
                                    f"{seg.rows} {meta.dtype} rows of {show(meta.dims)}")
    try:
        md = pq.read_metadata(idx)
    except Exception as exc:  # pyarrow raises its own ArrowInvalid (a ValueError) or OSError
        raise _damaged(folder, seg, f"has an unreadable index ({exc})") from None
    tag = (md.metadata or {}).get(PARQUET_KEY, b"").decode("ascii", "replace")
    if tag != seg.id or md.num_rows != seg.rows:
        raise _damaged(folder, seg, f"has an index from commit {tag[:12] or '?'} with {md.num_rows} rows")
    seg.offset = info.offset


# --------------------------------------------------------------------------- #
# Reading
# --------------------------------------------------------------------------- #


class _Entries:
    """``store.entries``: an Entry per live row, read from the Parquet files when asked."""

    def __init__(self, store: VectorStore):
        self._store = store
        self._tables: dict[str, Any] = {}
        self._groups: dict[str, tuple] = {}  # segment id -> (ParquetFile, group starts, groups read)

    def __len__(self) -> int:
        return self._store.rows

    def table(self, seg: Segment):
        if seg.id not in self._tables:
            _, pq = pyarrow_modules()
            self._tables[seg.id] = pq.read_table(self._store.path / seg.index)
        return self._tables[seg.id]

    def _one(self, seg: Segment, phys: int) -> Entry:
        if seg.id in self._tables:
            return entries_from_table(self._tables[seg.id].slice(phys, 1))[0]
        # one row group, not the whole index: a search prints 10 paths
        import bisect

        if seg.id not in self._groups:
            _, pq = pyarrow_modules()
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
        return entries_from_table(cache[group].slice(phys - starts[group], 1))[0]

    def __getitem__(self, row):
        if isinstance(row, slice):
            return [self[r] for r in range(*row.indices(len(self)))]
        if row < 0:
            row += len(self)
        if not 0 <= row < len(self):
            raise IndexError(row)
        return self._one(*self._store.locate(row))

    def __iter__(self) -> Iterator[Entry]:
        for seg in self._store.segments:
            entries = entries_from_table(self.table(seg))
            live = range(seg.rows) if seg.live is None else seg.live.tolist()
            for i in live:
                yield entries[i]

    def column(self, seg: Segment, name: str) -> list:
        return column_values(self.table(seg), name)


class _Matrix:
    """``store.matrix``: rows by number (an int, a slice, an array of row numbers)."""

    def __init__(self, store: VectorStore):
        self._store = store
        self.maps: dict[str, Any] = {}

    @property
    def shape(self) -> tuple:
        return (self._store.rows, *self._store.meta.dims)

    def __len__(self) -> int:
        return self._store.rows

    def __array__(self, dtype=None, copy=None):
        out = self._store.read_rows(0, self._store.rows)
        return out if dtype is None else out.astype(dtype)

    def map(self, seg: Segment):
        import numpy as np

        if seg.id not in self.maps:
            meta = self._store.meta
            self.maps[seg.id] = np.memmap(self._store.path / seg.vectors, dtype=meta.dtype, mode="r",
                                          offset=seg.offset, shape=(seg.rows, *meta.dims))
        return self.maps[seg.id]

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
            return self.map(seg)[phys]
        rows = np.asarray(key, dtype=np.int64)
        out = np.empty((len(rows), *store.meta.dims), dtype=store.meta.dtype)
        segs, phys = store.locate_many(rows)
        for si in np.unique(segs):
            pick = segs == si
            out[pick] = self.map(store.segments[si])[phys[pick]]
        return out


class VectorStore:
    """A store opened for reading: its settings, ``entries`` (one per row), ``matrix``
    (rows by number) and ``read_rows``; no lock (readers never block the writer).

    Opening reads the manifest, the ``.npy`` headers and the Parquet footers only;
    index rows are read when asked for (``entries[row]``, ``row_of``), a segment at a
    time. ``VectorStore(path, meta, segments)`` reads segments it is handed (compaction)."""

    def __init__(self, path: Path, meta: StoreMeta, segments: list[Segment], *, generation: str = "",
                 created: str | None = None, failed: dict | None = None):
        import numpy as np

        self.path = Path(path)
        self.meta = meta
        self.generation = generation
        self.created = created
        self.failed = failed or {}  # abspath -> {"path", "abspath", "error"}: no row yet, retried next time
        self.segments = segments
        base = 0
        for seg in segments:
            seg.base = base
            base += seg.live_rows
        self.rows = base
        self._bases = np.asarray([s.base for s in segments], dtype=np.int64)
        self.entries = _Entries(self)
        self._mx = _Matrix(self)
        self._files: dict[str, Any] = {}
        self._by_abspath: dict[str, int] | None = None

    @classmethod
    def open(cls, path: str | os.PathLike) -> VectorStore:
        """Open for reading; ``StoreError`` if it is missing or its files do not belong together."""
        path = Path(path)
        if not exists(path):
            raise _not_a_store(path)
        _, pq = pyarrow_modules()
        for attempt in (0, 1):
            manifest = _read_manifest(path)
            meta = StoreMeta.from_settings(manifest)
            segments = manifest["segments"]
            try:
                for seg in segments:
                    _check_segment(path, seg, meta, pq)
            except FileNotFoundError as exc:
                if attempt == 0:  # a writer replaced the manifest and removed old segments just now
                    continue
                raise StoreError(f"the vector store {str(path)!r} is incomplete: {exc.args[0]} is missing",
                                 hint=f"restore the whole folder from one copy, or rebuild it: delete "
                                 f"{str(path)!r} and run blip2 embed PHOTOS -o {path}") from None
            failed = {str(f["abspath"]): {"path": str(f["path"]), "abspath": str(f["abspath"]),
                                          "error": f.get("error")} for f in manifest.get("failed") or []}
            return cls(path, meta, segments, generation=str(manifest["generation"]),
                       created=manifest.get("created"), failed=failed)
        raise AssertionError("unreachable")

    @property
    def matrix(self):
        """Rows by number (None when the store is empty), read on demand."""
        return self._mx if self.rows else None

    # -- the checksums ----------------------------------------------------------
    def verify(self, segments: Iterable[Segment] | None = None, *, full: bool = False) -> None:
        """Check each segment's rows and paths against its checksum (reading them all);
        ``StoreError`` naming the first segment that differs. A segment whose files are
        still the very files its commit wrote (``_fingerprint``) is not read again unless
        ``full``: an ``--ann`` search stays milliseconds."""
        for seg in self.segments if segments is None else segments:
            if not full and seg.written and _fingerprint(self.path, seg) == seg.written:
                continue
            check = _Checksum()
            total = seg.rows * self.meta.row_bytes
            with open(self.path / seg.vectors, "rb") as f:
                f.seek(seg.offset)
                while total:
                    block = f.read(min(total, COPY_BYTES))
                    if not block:
                        break
                    check.rows(block)
                    total -= len(block)
            if check.paths(self.entries.table(seg)) != seg.checksum:
                raise _damaged(self.path, seg, "does not match its checksum (its rows or paths were changed "
                               "after it was written)")

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
            self._by_abspath = {name: row for row, name in self.abspaths()}
        return self._by_abspath.get(abspath)

    def paths(self, start: int, stop: int, *, column: str = "path") -> list[str]:
        """The ``path`` (or ``abspath``) of rows ``[start, stop)``: a column read, not an Entry per row."""
        out: list[str] = []
        for seg in self.segments:
            a, b = max(start, seg.base), min(stop, seg.base + seg.live_rows)
            if a >= b:
                continue
            names = self.entries.column(seg, column)
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
    def read_physical(self, seg: Segment, a: int, b: int, out) -> None:
        """Physical rows ``[a, b)`` of ``seg`` into ``out`` (plain file I/O)."""
        f = self._files.get(seg.id)
        if f is None:
            f = self._files[seg.id] = open(self.path / seg.vectors, "rb")
        f.seek(seg.offset + a * self.meta.row_bytes)
        got = f.readinto(memoryview(out).cast("B")) if b > a else 0
        if got != out.nbytes:
            raise StoreError(f"the vector store {str(self.path)!r} is truncated (segment {seg.vectors})",
                             hint="rebuild it: delete the folder and run blip2 embed again")

    def read_rows(self, start: int, stop: int, out=None):
        """Rows ``[start, stop)`` read with plain file I/O (``out`` is filled, if given), so
        that resident memory stays at one chunk during full scans and copies."""
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
                self.read_physical(seg, a, b, dst)
            else:
                phys = seg.live[a:b]
                lo, hi = int(phys[0]), int(phys[-1]) + 1
                if hi - lo == b - a:
                    self.read_physical(seg, lo, hi, dst)
                else:
                    tmp = np.empty((hi - lo, *dims), dtype=dtype)
                    self.read_physical(seg, lo, hi, tmp)
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
        self._mx.maps = {}


# --------------------------------------------------------------------------- #
# Writing
# --------------------------------------------------------------------------- #


@dataclass
class UpdateStats:
    new: int = 0  # files not in the store before
    changed: int = 0  # in the store, but their content changed: embedded again
    unchanged: int = 0  # same size and mtime, or same content hash: reused
    pruned: int = 0  # rows of files that are gone, dropped (--prune)
    added: int = 0  # rows written by this run
    failed: int = 0  # files that failed to embed in this run (no row; remembered in the manifest)
    retried: int = 0  # files that had failed before, tried again (not counted as new)
    rows: int = 0  # rows after the commit
    rewritten: bool = False  # whether the commit wrote anything
    compacted: int = 0  # old rows copied by compaction in this commit


def _write_segment(folder: Path, meta: StoreMeta, parts, entries=None, pending=None,
                   pending_rows: int = 0) -> Segment:
    """Write a new segment: the vectors of ``parts`` (``(reader, segment, physical rows)``:
    old rows copied a chunk at a time), then ``pending_rows`` rows from ``pending``
    (an iterator of row blocks as bytes). Its index: ``entries`` (one per row), or
    else the index rows of ``parts``. Files are removed again if it fails."""
    import numpy as np

    pa, pq = pyarrow_modules()
    seg_id = uuid.uuid4().hex
    rows = sum(len(p[2]) for p in parts) + pending_rows
    if entries is not None and len(entries) != rows:
        raise ValueError(f"{len(entries)} index rows for {rows} vectors")
    step = max(1, COPY_BYTES // max(1, meta.row_bytes))
    header = npy_header(meta, rows)
    seg = Segment(seg_id, rows, np.empty(0, np.int64), offset=len(header))
    check = _Checksum()
    tables = []
    try:
        with open(folder / seg.vectors, "wb") as out:
            out.write(header)
            for reader, old, phys in parts:
                for s in range(0, len(phys), step):
                    pick = phys[s:s + step]
                    lo, hi = int(pick[0]), int(pick[-1]) + 1
                    if hi - lo == len(pick):
                        block = np.empty((hi - lo, *meta.dims), dtype=meta.dtype)
                        reader.read_physical(old, lo, hi, block)
                    else:
                        block = np.ascontiguousarray(reader._mx.map(old)[pick])
                    check.rows(block.data)
                    out.write(block.data)
                if entries is None:
                    table = reader.entries.table(old)
                    tables.append(table if len(phys) == old.rows else table.take(pa.array(phys)))
            written = 0
            for block in pending or ():
                check.rows(block)
                out.write(block)
                written += len(block)
            if written != pending_rows * meta.row_bytes:
                raise StoreError("the side file of new vectors ended early")
            out.write(npy_trailer(seg_id))
            out.flush()
            os.fsync(out.fileno())
        if entries:  # entries is None: the parts' own index rows (compaction)
            tables.append(entries_table(entries))
        table = (pa.concat_tables(tables, promote_options="default") if tables
                 else entries_table([]))
        seg.checksum = check.paths(table)
        table = table.replace_schema_metadata({PARQUET_KEY: seg_id.encode("ascii"),
                                               b"blip2.dims": json.dumps(list(meta.dims)).encode()})
        idx = folder / seg.index
        pq.write_table(table, idx, row_group_size=ROW_GROUP)
        with open(idx, "rb+") as f:
            os.fsync(f.fileno())
        seg.written = _fingerprint(folder, seg)
    except BaseException:
        unlink(folder / seg.vectors)
        unlink(folder / seg.index)
        raise
    return seg


class StoreUpdate:
    """One update of the store at ``path`` (a folder, created if needed): decide what
    to embed, collect new rows, commit. The one way to write a store.

    Use as a context manager: leaving it without ``commit()`` discards the new rows
    and leaves the store as it was.

    ``select(items)`` filters the input items lazily (it may run in another thread):
    a file whose size and mtime, or else whose content hash, match its row is skipped
    (reused); a changed file's old row is dropped and the file is passed on to be
    embedded again. ``add(entry, vector)`` appends a row to the side file,
    ``fail(path, abspath, error)`` remembers a file that could not be embedded,
    ``pending_rows`` counts the rows added, ``commit()`` writes the new generation
    and returns ``UpdateStats``. ``prune``: drop the rows of files that are gone;
    ``compact``: merge every segment into one; ``dtype_given=False``: an existing
    store keeps its own dtype.
    """

    def __init__(self, path: str | os.PathLike, meta: StoreMeta, *, prune: bool = False,
                 dtype_given: bool = True, compact: bool = False):
        import numpy as np

        self.path = Path(path)
        self.meta = meta
        self.prune = prune
        self.compact = compact
        self.stats = UpdateStats()
        if self.path.exists() and not self.path.is_dir():
            raise _not_a_store(self.path)
        pyarrow_modules()
        if not exists(self.path) and self.path.is_dir():
            strangers = [p.name for p in self.path.iterdir() if not _ours(p.name)]
            if strangers:
                raise StoreError(f"{str(self.path)!r} is a folder that is not a blip2 vector store "
                                 f"(it holds {strangers[0]!r})",
                                 hint="name a new folder (or an existing store) as the output")
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock = FileLock(self.path / PENDING, str(self.path))
        self._mutex = threading.Lock()
        self._closed = False
        self._added: list[Entry] = []
        self._added_keys: set[str] = set()
        self._old: VectorStore | None = None
        self._keep = np.ones(0, dtype=bool)
        self._touched: dict[int, Entry] = {}
        self._kinds: dict[str, str] = {}  # abspath -> "new" | "changed" | "retried", as select() counted it
        self._failed: dict[str, dict] = {}  # abspath -> what failed in this run
        self._lock.acquire()
        recovered = False
        try:
            self._recover()
            recovered = True
            if exists(self.path):
                self._old = VectorStore.open(self.path)
                self._adopt(self._old, dtype_given)
                self._keep = np.ones(self._old.rows, dtype=bool)
        except BaseException:
            # Refused after recovery (other settings, a torn store): the side file holds nothing a
            # later run needs, so a refused run leaves the store folder as it found it.
            self._lock.release(remove=recovered)
            raise
        self._row_elems = int(np.prod(meta.dims))
        self._row_dtype = np.dtype(self.meta.dtype)

    def _adopt(self, old: VectorStore, dtype_given: bool) -> None:
        """Refuse a run whose vectors would not compare with the store's; keep its dtype."""
        meta = self.meta
        diffs = old.meta.differences(meta)
        if diffs:
            raise UsageError(
                f"the vector store {str(self.path)!r} holds other vectors: " + "; ".join(diffs),
                hint="run with the settings the store was made with, or write a new store elsewhere",
            )
        if old.meta.dtype != meta.dtype:
            if dtype_given:
                raise UsageError(
                    f"the vector store {str(self.path)!r} is {old.meta.dtype}, not {meta.dtype}",
                    hint=f"leave store_dtype out (the store keeps {old.meta.dtype}), or write a new store elsewhere",
                    params=["store_dtype"],
                )
            self.meta.dtype = old.meta.dtype

    # -- lifecycle ---------------------------------------------------------
    def __enter__(self) -> StoreUpdate:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._old is not None:
            self._old.close()
        self._lock.release(remove=True)

    def _recover(self) -> None:
        """Delete what a writer that stopped before its commit point left (we hold the lock):
        files the manifest does not name, a manifest's temporary file, and our stale
        temporary files (a faiss index being saved when its process was killed)."""
        unlink(self.path / (MANIFEST + ".tmp"))
        named: set[str] = set()
        if exists(self.path):
            for seg in _read_manifest(self.path)["segments"]:
                named.update((seg.vectors, seg.index))
        for p in self.path.iterdir():
            if p.name.startswith("seg-") and p.name not in named:
                unlink(p)
        remove_stale_temp(self.path)

    # -- deciding what to embed ---------------------------------------------
    @property
    def old(self) -> VectorStore | None:
        return self._old

    def select(self, items: Iterable) -> Iterator:
        """Yield the items that need embedding; count and skip the rest."""
        for item in items:
            with self._mutex:
                if self._closed:  # committed (e.g. after Ctrl-C): stop deciding
                    return
                reuse = item.error is None and isinstance(item.source, str) and self._reusable(item.source)
            if not reuse:
                yield item

    def _reusable(self, source: str) -> bool:
        """True if the file's row can stay; otherwise count it as new or changed."""
        abspath = os.path.abspath(source)
        row = self._old.row_of(abspath) if self._old is not None else None
        if row is None or not self._keep[row]:
            if self._old is not None and abspath in self._old.failed:
                self.stats.retried += 1  # failed before: tried again, but not new
                self._kinds[abspath] = "retried"
            else:
                self.stats.new += 1
                self._kinds[abspath] = "new"
            return False
        entry = self._old.entries[row]  # type: ignore[union-attr]  # row is not None: there is an old store
        try:
            st = os.stat(abspath)
        except OSError:  # gone or unreadable: the pipeline reports it
            self.stats.changed += 1
            self._keep[row] = False
            return False
        if st.st_size == entry.size and st.st_mtime_ns == entry.mtime_ns:
            self.stats.unchanged += 1
            return True
        if st.st_size == entry.size:
            try:
                same = sha256_file(abspath) == entry.sha256
            except OSError:
                same = False
            if same:  # touched, not changed: keep the row, note the new mtime
                self._touched[row] = Entry(entry.path, entry.abspath, st.st_size, st.st_mtime_ns, entry.sha256)
                self.stats.unchanged += 1
                return True
        self.stats.changed += 1
        self._keep[row] = False
        return False

    def fail(self, path: str, abspath: str, error: str | None) -> None:
        """A file that could not be embedded: counted as failed (not new) and
        remembered in the manifest, so the next update retries it and says so."""
        with self._mutex:
            if self._kinds.pop(abspath, None) == "new":
                self.stats.new -= 1
            if abspath not in self._failed:
                self.stats.failed += 1
            self._failed[abspath] = {"path": path, "abspath": abspath, "error": error}

    def _failed_after(self) -> dict:
        """The failures the new manifest remembers: this run's, and earlier ones not tried again."""
        out = {}
        if self._old is not None:
            for abspath, info in self._old.failed.items():
                if abspath in self._added_keys:
                    continue  # embedded this time
                if self.prune and not os.path.exists(abspath):
                    continue
                out[abspath] = info
        for abspath, info in self._failed.items():
            if abspath not in self._added_keys:
                out[abspath] = info
        return dict(sorted(out.items()))

    # -- collecting rows -------------------------------------------------------
    @property
    def pending_rows(self) -> int:
        return len(self._added)

    def add(self, entry: Entry, vector) -> None:
        """Append one row (``vector`` shaped like ``meta.dims``) to the side file."""
        import numpy as np

        arr = np.ascontiguousarray(vector, dtype=self._row_dtype)
        if arr.size != self._row_elems:
            raise ValueError(f"vector of shape {arr.shape} does not fit the store's dims {self.meta.dims}")
        if entry.abspath in self._added_keys:  # the same file twice in one run: keep the first
            return
        try:
            self._lock.fh.write(arr.tobytes())
        except OSError as exc:
            raise self._not_written(exc) from None
        self._added_keys.add(entry.abspath)
        self._added.append(entry)

    def _not_written(self, exc: OSError) -> StoreError:
        """A write failed before the commit point: the store on disk is the old one."""
        rows = self._old.rows if self._old is not None else 0
        if exc.errno == errno.ENOSPC:
            need = max(1, (len(self._added) + 1) * self.meta.row_bytes >> 20)
            return StoreError(
                f"the disk is full: the vector store {str(self.path)!r} was not updated. It is intact: its "
                f"previous version ({rows:,} rows) is unchanged and nothing of this run was kept",
                hint=f"free some disk space (this run needs about {need:,} MB more than the store has) and "
                "run the same command again: the images already in the store are skipped")
        return StoreError(
            f"cannot write the vector store {str(self.path)!r} ({exc.strerror or exc}): it was not updated. "
            f"It is intact: its previous version ({rows:,} rows) is unchanged",
            hint="fix the cause and run the same command again: the images already in the store are skipped")

    # -- committing ------------------------------------------------------------
    def commit(self) -> UpdateStats:
        """Write the new generation (atomically: the manifest's rename); return what changed."""
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
        before = {p.name for p in self.path.iterdir()}
        try:
            segments = self._write_generation(old, keep, gone, moved, new_entries, failed)
        except OSError as exc:  # before the commit point (the manifest's rename): the old store stands
            for p in self.path.iterdir():
                if p.name.startswith("seg-") and p.name not in before:
                    unlink(p)
            unlink(self.path / (MANIFEST + ".tmp"))
            raise self._not_written(exc) from None
        if old is not None:
            old.close()
        named = {n for s in segments for n in (s.vectors, s.index)}
        for p in self.path.iterdir():
            if p.name.startswith("seg-") and p.name not in named:
                unlink(p)
        self.stats.rewritten = True
        return self.stats

    def _write_generation(self, old, keep, gone, moved, new_entries, failed) -> list[Segment]:
        import numpy as np

        segments = [] if old is None else [s.copy() for s in old.segments]
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
        segments, merged = self._compaction(segments)
        self.stats.compacted = merged
        self._write_manifest(segments, failed, old)
        return segments

    def _pending_blocks(self):
        pending = self._lock.fh
        pending.flush()
        pending.seek(0)
        row_bytes = self._row_elems * self._row_dtype.itemsize
        remaining = len(self._added) * row_bytes
        step = max(1, COPY_BYTES // max(1, row_bytes)) * row_bytes
        while remaining:
            block = pending.read(min(remaining, step))
            if not block:
                raise StoreError("the side file of new vectors ended early")
            yield block
            remaining -= len(block)
        pending.seek(0, os.SEEK_END)

    def _compaction(self, segments: list[Segment]) -> tuple[list[Segment], int]:
        """Rewrite what the policy (module doc) says; return the new list and the rows copied.
        A segment is checked against its checksum before its rows are copied (a damaged
        one is refused, never given a fresh checksum)."""
        import numpy as np

        copied = 0
        reader = VectorStore(self.path, self.meta, [])  # reads any segment it is handed, named or not yet

        def merge(group: list[Segment]) -> Segment:
            nonlocal copied
            reader.verify(group)
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
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
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
        fsync_dir(self.path)  # the segment files' names are durable before the manifest names them
        os.replace(tmp, self.path / MANIFEST)  # the commit point
        fsync_dir(self.path)


# --------------------------------------------------------------------------- #
# Search
# --------------------------------------------------------------------------- #


@dataclass(order=True)
class Hit:
    score: float
    row: int = field(compare=False)


def chunk_rows_for(store_dims: Sequence[int]) -> int:
    import numpy as np

    return max(1, CHUNK_BYTES // (4 * int(np.prod(store_dims))))


def _as_float32(src, dst):
    """``src`` as float32, converted into the preallocated ``dst`` when it is not already.

    The conversion is exact whoever does it; torch's (when the caller has already
    imported it: the search command runs a model) is about 3x faster than
    numpy's for float16, which dominates a search over a float16 store."""
    import sys

    import numpy as np

    if src.dtype == np.float32:
        return src
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.from_numpy(dst).copy_(torch.from_numpy(src))
    else:
        np.copyto(dst, src)
    return dst


def _normalise(x, axis=-1):
    import numpy as np

    norm = np.linalg.norm(x, axis=axis, keepdims=True)
    return x / np.maximum(norm, 1e-12)


def score_rows(block, query, *, mode: str):
    """Scores of a block of rows ``[n, *dims]`` (float32) against ``query``.

    ``mode="text"``: BLIP-2's ITC similarity, the maximum over the query
    embeddings of the dot product with a text embedding ``[D]`` (a pooled row
    is one dot product). ``mode="image"``: cosine similarity of mean-pooled
    rows with a pooled query ``[D]`` (unit length).
    """
    if mode == "text":
        if block.ndim == 3:
            n, q, d = block.shape
            return (block.reshape(n * q, d) @ query).reshape(n, q).max(axis=1)
        return block @ query
    if mode == "image":
        pooled = block.mean(axis=1) if block.ndim == 3 else block
        return _normalise(pooled) @ query  # a cosine, even for float16-rounded rows
    raise ValueError(f"unknown search mode {mode!r}")


def top_k(store: VectorStore, query, k: int, *, mode: str, rows=None, chunk_rows: int | None = None) -> list[Hit]:
    """The ``k`` best rows for ``query``, best first (ties: lower row first).

    The matrix is read ``chunk_rows`` rows at a time (about 64 MB as float32 by
    default), scored with one matrix product per chunk, and the best ``k`` are
    kept as the chunks go. ``rows``: restrict to these row numbers.
    """
    import numpy as np

    if k <= 0 or store.rows == 0:
        return []
    query = np.asarray(query, dtype=np.float32)
    chunk = chunk_rows or chunk_rows_for(store.meta.dims)
    subset = None if rows is None else np.unique(np.asarray(list(rows), dtype=np.int64))
    best_scores = np.empty(0, dtype=np.float32)
    best_rows = np.empty(0, dtype=np.int64)
    # buffers reused by every chunk (fresh 64 MB arrays would page-fault each time)
    shape = (min(chunk, store.rows), *store.meta.dims)
    raw = np.empty(shape, dtype=store.meta.dtype) if subset is None else None
    f32 = np.empty(shape, dtype=np.float32) if subset is None and store.meta.dtype != "float32" else None
    for start in range(0, store.rows, chunk):
        stop = min(store.rows, start + chunk)
        if subset is None:
            idx = None
            n = stop - start
            view = store.read_rows(start, stop, out=raw[:n])  # type: ignore[index]  # allocated when subset is None
            block = _as_float32(view, None if f32 is None else f32[:n])
        else:  # only the pages of the wanted rows are read, through the memory map
            lo, hi = np.searchsorted(subset, [start, stop])
            if lo == hi:
                continue
            idx = subset[lo:hi]
            block = np.asarray(store.matrix[idx], dtype=np.float32)
        scores = np.asarray(score_rows(block, query, mode=mode),
                            dtype=np.float32)
        row_ids = np.arange(start, stop, dtype=np.int64) if idx is None else idx
        if len(scores) > k:
            # the k best, and every row tied with the k-th (ties go to the lower row)
            kth = -np.partition(-scores, k - 1)[k - 1]
            part = scores >= kth
            scores, row_ids = scores[part], row_ids[part]
        best_scores = np.concatenate([best_scores, scores])
        best_rows = np.concatenate([best_rows, row_ids])
        if len(best_scores) > k:
            order = np.lexsort((best_rows, -best_scores))[:k]
            best_scores, best_rows = best_scores[order], best_rows[order]
    order = np.lexsort((best_rows, -best_scores))[:k]
    return [Hit(float(best_scores[i]), int(best_rows[i])) for i in order]
