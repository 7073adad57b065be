"""The vector store's low-level pieces: its settings and rows, the ``.npy`` segment file
(header and generation trailer), the Parquet index rows, the writer's lock, durable
renames. ``store.py`` is the store built from them; nothing here knows about segments.

Only numpy and pyarrow are needed (no torch).
"""

from __future__ import annotations

import hashlib
import io
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .choices import StoreDtype, names
from .errors import Blip2Error
from .guard import Busy

COPY_BYTES = 16 << 20  # rows are copied this many bytes at a time
NPY_TRAILER_MAGIC = b"BLIP2GEN"
NPY_TRAILER_BYTES = len(NPY_TRAILER_MAGIC) + 32  # + the segment's id: 32 hex digits
INDEX_COLUMNS = ("path", "abspath", "size", "mtime_ns", "sha256")
STORE_DTYPES = names(StoreDtype)  # ("float32", "float16")
TEMP_PREFIX = ".blip2-"  # fsutil.replacing's temporary files (the faiss index's among them)
STALE_TEMP_SECONDS = 600  # a temporary file of ours untouched this long belongs to a dead process


class StoreError(Blip2Error):
    """The store cannot be read or written as asked (exit 2: nothing was embedded)."""


class StoreBusy(StoreError, Busy):
    """Another process writes the store (exit 2): a :class:`StoreError` and a ``guard.Busy``."""


# --------------------------------------------------------------------------- #
# Rows and settings
# --------------------------------------------------------------------------- #


@dataclass(slots=True)  # a million rows are a million of these: no per-object __dict__
class Entry:
    """One row of the store: which file it came from, and that file's identity."""

    path: str  # as given or found when it was embedded
    abspath: str  # the key: absolute, normalised path
    size: int
    mtime_ns: int
    sha256: str


@dataclass
class StoreMeta:
    """What the vectors are: they only compare with vectors of the same settings."""

    model: str
    features: str  # itc | vision | qformer
    pool: str  # none | mean
    dims: tuple[int, ...]  # per row
    normalized: bool  # rows (each query vector) have unit length
    dtype: str = "float32"  # storage dtype
    revision: str | None = None
    checkpoint: str | None = None  # loader.checkpoint_identity: which weights made the vectors

    def settings(self) -> dict:
        return {
            "model": self.model,
            "revision": self.revision,
            "features": self.features,
            "pool": self.pool,
            "dims": list(self.dims),
            "normalized": self.normalized,
            "dtype": self.dtype,
            **({"checkpoint": self.checkpoint} if self.checkpoint else {}),
        }

    @classmethod
    def from_settings(cls, d: dict) -> StoreMeta:
        return cls(
            model=d["model"],
            revision=d.get("revision"),
            features=d["features"],
            pool=d["pool"],
            dims=tuple(int(x) for x in d["dims"]),
            normalized=bool(d["normalized"]),
            dtype=d.get("dtype", "float32"),
            checkpoint=d.get("checkpoint"),
        )

    def differences(self, other: StoreMeta) -> list[str]:
        """Settings of ``other`` (a new run) that the vectors in ``self`` do not share."""
        out = []
        for name in ("model", "revision", "features", "pool", "dims"):
            a, b = getattr(self, name), getattr(other, name)
            if a != b:
                out.append(f"{name} {show(a)} (store) vs {show(b)} (this run)")
        # A store written before checkpoints were recorded has none: it is not compared.
        if self.checkpoint and other.checkpoint and self.checkpoint != other.checkpoint:
            out.append(f"checkpoint {show(self.checkpoint)} (store) vs {show(other.checkpoint)} (this run: "
                       "the weights at that name were replaced)")
        return out

    @property
    def row_bytes(self) -> int:
        import numpy as np

        return int(np.prod(self.dims)) * np.dtype(self.dtype).itemsize


def show(value) -> str:
    """A setting as messages print it (dims as 32x256)."""
    if isinstance(value, tuple):
        return "x".join(map(str, value))
    return repr(value)


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------- #
# A segment's vectors: .npy + a trailer naming the segment
# --------------------------------------------------------------------------- #


def npy_header(meta: StoreMeta, rows: int) -> bytes:
    import numpy as np

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": np.dtype(meta.dtype).str, "fortran_order": False, "shape": (rows, *meta.dims)}
    )
    return buf.getvalue()


def npy_trailer(segment_id: str) -> bytes:
    """40 bytes after the rows (numpy's readers never reach them): ``BLIP2GEN`` + the id."""
    raw = segment_id.encode("ascii")
    if len(raw) != 32:
        raise ValueError(f"a segment id is 32 hex digits, not {segment_id!r}")
    return NPY_TRAILER_MAGIC + raw


@dataclass
class NpyInfo:
    rows: int
    dims: tuple[int, ...]
    dtype: str
    offset: int  # where the rows start
    segment: str  # the id in the trailer

    @property
    def nbytes(self) -> int:
        import numpy as np

        return self.rows * int(np.prod(self.dims)) * np.dtype(self.dtype).itemsize


def read_npy_info(path: Path) -> NpyInfo:
    """A segment's ``.npy`` header and trailer; ``StoreError`` if it is not one."""
    import numpy as np

    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            else:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            if fortran or len(shape) < 2 or dtype.name not in STORE_DTYPES:
                raise ValueError(f"an array of shape {shape} and dtype {dtype} in {'Fortran' if fortran else 'C'} order")
            info = NpyInfo(int(shape[0]), tuple(int(x) for x in shape[1:]), dtype.name, f.tell(), "")
            end = info.offset + info.nbytes
            if size < end + NPY_TRAILER_BYTES:
                raise StoreError(f"the vector store's segment {str(path)!r} is truncated: {size} bytes on disk, "
                                 f"{end + NPY_TRAILER_BYTES} needed for its {info.rows} rows (an interrupted copy, "
                                 "or a full disk?)",
                                 hint="restore the whole store folder from one copy, or rebuild it: delete the "
                                 "folder and run blip2 embed PHOTOS -o STORE again")
            if size != end + NPY_TRAILER_BYTES:
                raise ValueError(f"{size - end - NPY_TRAILER_BYTES} unexpected bytes after its {info.rows} rows")
            f.seek(end)
            tail = f.read(NPY_TRAILER_BYTES)
            if not tail.startswith(NPY_TRAILER_MAGIC):
                raise ValueError("no BLIP2GEN trailer after its rows")
            info.segment = tail[len(NPY_TRAILER_MAGIC):].decode("ascii", "replace")
            return info
    except OSError as exc:
        raise StoreError(f"cannot read the vector store's segment {str(path)!r}: {exc.strerror or exc}") from exc
    except (ValueError, TypeError, UnicodeDecodeError) as exc:
        raise StoreError(f"{str(path)!r} is not a blip2 store segment ({exc})",
                         hint="restore the whole store folder from one copy, or rebuild it") from exc


# --------------------------------------------------------------------------- #
# A segment's index rows: Parquet
# --------------------------------------------------------------------------- #


def pyarrow_modules():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise StoreError("the vector store's index is Parquet: pyarrow is needed",
                         hint="pip install pyarrow") from None
    return pa, pq


def entries_table(entries: Sequence[Entry]):
    """The index rows of ``entries`` as an Arrow table (``INDEX_COLUMNS``, row order).

    A file name that is not valid UTF-8 (undecodable bytes on a POSIX file system,
    a surrogate escape in Python) cannot be a Parquet string: its ``path`` and
    ``abspath`` show U+FFFD in the string columns and the exact bytes go to the
    ``path_bytes`` / ``abspath_bytes`` columns (present only when needed, null elsewhere)."""
    pa, _ = pyarrow_modules()
    columns = {
        "size": pa.array([e.size for e in entries], pa.int64()),
        "mtime_ns": pa.array([e.mtime_ns for e in entries], pa.int64()),
        "sha256": pa.array([e.sha256 for e in entries], pa.string()),
    }
    extra = {}
    for name, values in (("path", [e.path for e in entries]), ("abspath", [e.abspath for e in entries])):
        try:
            columns[name] = pa.array(values, pa.string())
        except (UnicodeEncodeError, pa.ArrowInvalid, pa.ArrowTypeError):
            shown: list[str] = []
            raw: list[bytes | None] = []
            for v in values:
                try:
                    v.encode("utf-8")
                    shown.append(v)
                    raw.append(None)
                except UnicodeEncodeError:
                    b = os.fsencode(v)
                    shown.append(b.decode("utf-8", "replace"))
                    raw.append(b)
            columns[name] = pa.array(shown, pa.string())
            extra[name + "_bytes"] = pa.array(raw, pa.binary())
    ordered = {name: columns[name] for name in INDEX_COLUMNS}
    ordered.update(extra)
    return pa.table(ordered)


def column_values(table, name: str) -> list[str]:
    """The ``path`` or ``abspath`` column as Python strings (exact bytes where recorded)."""
    values = table.column(name).to_pylist()
    if name + "_bytes" in table.column_names:
        for i, raw in enumerate(table.column(name + "_bytes").to_pylist()):
            if raw is not None:
                values[i] = os.fsdecode(raw)
    return values


def entries_from_table(table) -> list[Entry]:
    """``entries_table`` read back: an Entry per row."""
    paths, abspaths = column_values(table, "path"), column_values(table, "abspath")
    cols = table.select(["size", "mtime_ns", "sha256"]).to_pydict()
    return [Entry(p, p if a == p else a, int(size), int(mtime), digest)  # one string if equal
            for p, a, size, mtime, digest in zip(paths, abspaths, cols["size"], cols["mtime_ns"], cols["sha256"])]


# --------------------------------------------------------------------------- #
# Files
# --------------------------------------------------------------------------- #


def fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def remove_stale_temp(folder: Path, *, older_than: float = STALE_TEMP_SECONDS) -> None:
    """Remove our temporary files (``.blip2-*.tmp``) in ``folder`` that nobody has written
    for ``older_than`` seconds: left by a process killed before its rename (kill -9 while
    the faiss index was saved). A live writer's file is fresh, so it is left alone."""
    now = time.time()
    try:
        names = list(folder.iterdir())
    except OSError:
        return
    for p in names:
        if p.name.startswith(TEMP_PREFIX) and p.name.endswith(".tmp"):
            try:
                if now - p.stat().st_mtime > older_than:
                    p.unlink()
            except OSError:
                pass


class FileLock:
    """An exclusive ``flock`` on a side file that also collects the new rows (POSIX; none on
    Windows). ``what``: the store's name, for the message when another process holds it."""

    def __init__(self, path: Path, what: str):
        self.path = path
        self.what = what
        self.fh: Any = None

    def acquire(self) -> None:
        from .guard import flock_open

        fd = flock_open(self.path, f"another blip2 process is writing the vector store {self.what!r}",
                        hint=f"wait for it to finish (or remove {str(self.path)!r} if no blip2 is running)",
                        error=StoreBusy, stable=True, strict=True)
        if fd is None:  # no locks here (Windows): the side file still collects the rows
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        os.ftruncate(fd, 0)
        self.fh = os.fdopen(fd, "r+b")

    def release(self, remove: bool) -> None:
        if self.fh is None:
            return
        if remove:
            unlink(self.path)
        self.fh.close()  # releases the lock
        self.fh = None


__all__ = [
    "COPY_BYTES",
    "STORE_DTYPES",
    "Entry",
    "FileLock",
    "NpyInfo",
    "StoreBusy",
    "StoreError",
    "StoreMeta",
    "column_values",
    "entries_from_table",
    "entries_table",
    "fsync_dir",
    "npy_header",
    "npy_trailer",
    "pyarrow_modules",
    "read_npy_info",
    "remove_stale_temp",
    "sha256_file",
    "show",
    "unlink",
]
