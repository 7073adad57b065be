"""The vector store: a binary matrix on disk plus a Parquet index.

``blip2 embed photos/ -o vectors.safetensors`` (or ``vectors.npy``) writes two files:

* the **matrix**, one row per image: shape ``[rows, *dims]`` (``[rows, 32, 256]``
  for the 32 query embeddings of BLIP-2's ITC head, ``[rows, 256]`` pooled),
  float32 or float16, C order. ``.safetensors``: one tensor named ``vectors``,
  the store's settings and generation in the header's ``__metadata__``. ``.npy``:
  numpy's format (``np.load(path, mmap_mode="r")``).
* the **index**, ``<matrix>.index.parquet`` (``vectors.safetensors.index.parquet``):
  one row per row of the matrix, in row order, and nothing else (columns ``path``,
  ``abspath``, ``size``, ``mtime_ns``, ``sha256``); the store's settings, row count,
  generation and the files that failed to embed are in the Parquet file's
  key-value metadata (key ``blip2``, a JSON object). Reading without blip2::

    import json, numpy as np, pandas as pd, pyarrow.parquet as pq
    vectors = np.load("vectors.npy", mmap_mode="r")  # [rows, 32, 256] (or [rows, 256] pooled)
    rows = pd.read_parquet("vectors.npy.index.parquet")  # rows.path[i] is the image of vectors[i]
    settings = json.loads(pq.read_schema("vectors.npy.index.parquet").metadata[b"blip2"])

  and a ``.safetensors`` store::

    import json, pandas as pd, pyarrow.parquet as pq
    from safetensors.numpy import load_file
    vectors = load_file("vectors.safetensors")["vectors"]
    rows = pd.read_parquet("vectors.safetensors.index.parquet")
    settings = json.loads(pq.read_schema("vectors.safetensors.index.parquet").metadata[b"blip2"])

  Stores written before (a JSON Lines index, ``<matrix>.index.jsonl``, whose first
  line was the settings) are still read, and their next update writes the Parquet
  index and removes the JSON Lines one (a crash in between leaves both: the
  Parquet one, complete, is read first).

Nothing is ever modified in place. An update (``StoreUpdate``) streams the new
rows to a side file while the model runs; ``commit()`` writes a complete new
matrix and a new index next to the old ones (temporary names), fsyncs them, and
renames them over the old files: the matrix first, then the index. A crash at
any point leaves either the old store or the new one, never a mix:

* the matrix's temporary file still exists -> the rename never happened: the old
  store is intact; the leftovers are removed by the next writer;
* it is gone but the index's temporary file exists -> the crash came between the
  two renames: the new matrix belongs to that index; readers use it, and the
  next writer finishes the rename (roll forward).

Every commit has a generation id, written into both files: the index's metadata,
and the matrix (``.safetensors``: its header's ``__metadata__``; ``.npy``:
a 40-byte trailer after the rows, ``BLIP2GEN`` + the id, which numpy's readers
never reach: ``np.load`` reads the rows its header announces). The matrix's
row count, dims, dtype, size on disk and generation are checked against the
index on every open, so a matrix and an index from different commits (a crash
between the renames whose new index was lost, files copied separately) are
refused, never served: same row counts are not enough, the rows may be other
images. (An ``.npy`` written before the trailer existed has no generation; it
is checked by rows alone until its next commit.) One writer at a time: a writer holds an
exclusive ``flock`` on the side file (POSIX; no lock on Windows).

Old rows are copied into the new matrix a chunk at a time, and new rows wait in
the side file, so neither an update nor a search ever holds the whole matrix
(let alone Python lists of floats) in memory. Search (``top_k``) is a matrix
product over chunks of rows with a running top-k.

Only numpy and pyarrow are needed here (no torch): this module is plain data handling.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from .choices import StoreDtype, names
from .errors import Blip2Error, UsageError

FORMAT_NAME = "blip2-vector-store"
FORMAT_VERSION = 2  # 2: the index is Parquet (1: JSON Lines with a header line, still read)
STORE_SUFFIXES = (".safetensors", ".npy")
TENSOR_NAME = "vectors"
STORE_DTYPES = names(StoreDtype)  # ("float32", "float16")
_ST_DTYPES = {"float32": "F32", "float16": "F16"}
_ST_DTYPES_BACK = {v: k for k, v in _ST_DTYPES.items()}
# Rows per chunk are chosen so that one chunk, converted to float32, is about this big.
CHUNK_BYTES = 64 << 20
_COPY_BYTES = 16 << 20


class StoreError(Blip2Error):
    """The store cannot be read or written as asked (exit 2: nothing was embedded)."""


# --------------------------------------------------------------------------- #
# Names
# --------------------------------------------------------------------------- #


def is_store_path(path: str | os.PathLike | None) -> bool:
    """A single-file store's name (FILE.safetensors, FILE.npy), or a segmented store's directory."""
    if path is None:
        return False
    from .segments import is_segmented

    return Path(path).suffix.lower() in STORE_SUFFIXES or is_segmented(path)


def open_update(path: str | os.PathLike, meta: "StoreMeta", *, prune: bool = False, dtype_given: bool = True,
                layout: str | None = None, compact: bool = False) -> "StoreUpdate":
    """An update of the store at ``path``: single-file (FILE.safetensors / FILE.npy) or,
    for a directory (``layout="segments"``, or one that holds a segmented store), segmented."""
    return StoreUpdate(path, meta, prune=prune, dtype_given=dtype_given, layout=layout, compact=compact)


def index_path(path: str | os.PathLike) -> Path:
    """The index of a single-file store: ``FILE.index.parquet`` (one row per row of the matrix)."""
    path = Path(path)
    return path.with_name(path.name + ".index.parquet")


def legacy_index_path(path: str | os.PathLike) -> Path:
    """The JSON Lines index (a settings header line, then the rows) written before 0.x:
    still read; replaced by ``FILE.index.parquet`` at the store's next update."""
    path = Path(path)
    return path.with_name(path.name + ".index.jsonl")


def index_paths(path: str | os.PathLike) -> list[Path]:
    """Every name a single-file store's index may have (the current one first)."""
    return [index_path(path), legacy_index_path(path)]


def _matrix_tmp(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


def _index_tmp(path: Path) -> Path:
    idx = index_path(path)
    return idx.with_name(idx.name + ".tmp")


def _legacy_index_tmp(path: Path) -> Path:
    idx = legacy_index_path(path)
    return idx.with_name(idx.name + ".tmp")


def _pending_path(path: Path) -> Path:
    return path.with_name(path.name + ".pending")


def _kind(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in STORE_SUFFIXES:
        raise UsageError(
            f"{str(path)!r} is not a vector store name",
            hint="name it vectors.safetensors or vectors.npy",
        )
    return suffix[1:]


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

    def to_json(self, row: int) -> dict:
        return {
            "row": row,
            "path": self.path,
            "abspath": self.abspath,
            "size": self.size,
            "mtime_ns": self.mtime_ns,
            "sha256": self.sha256,
        }

    @classmethod
    def from_json(cls, d: dict) -> "Entry":
        path, abspath = d["path"], d["abspath"]
        return cls(path, path if abspath == path else abspath, int(d["size"]), int(d["mtime_ns"]), d["sha256"])


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
    def from_settings(cls, d: dict) -> "StoreMeta":
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

    def differences(self, other: "StoreMeta") -> list[str]:
        """Settings of ``other`` (a new run) that the vectors in ``self`` do not share."""
        out = []
        for name in ("model", "revision", "features", "pool", "dims"):
            a, b = getattr(self, name), getattr(other, name)
            if a != b:
                out.append(f"{name} {_show(a)} (store) vs {_show(b)} (this run)")
        # A store written before checkpoints were recorded has none: it is not compared.
        if self.checkpoint and other.checkpoint and self.checkpoint != other.checkpoint:
            out.append(f"checkpoint {_show(self.checkpoint)} (store) vs {_show(other.checkpoint)} (this run: "
                       "the weights at that name were replaced)")
        return out


def _show(value) -> str:
    if isinstance(value, tuple):
        return "x".join(map(str, value))
    return repr(value)


def file_identity(path: str, data: bytes | None = None) -> tuple[int, int, str]:
    """(size, mtime_ns, sha256) of a file; ``data``: its bytes, if already read."""
    st = os.stat(path)
    if data is None:
        digest = sha256_file(path)
    else:
        digest = hashlib.sha256(data).hexdigest()
    return st.st_size, st.st_mtime_ns, digest


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------- #
# The matrix file: headers
# --------------------------------------------------------------------------- #


def _safetensors_header(meta: StoreMeta, rows: int, generation: str) -> bytes:
    import numpy as np

    nbytes = rows * int(np.prod(meta.dims)) * np.dtype(meta.dtype).itemsize
    metadata = {k: json.dumps(v) for k, v in meta.settings().items()}
    metadata.update(format=FORMAT_NAME, version=str(FORMAT_VERSION), generation=generation)
    header = {
        "__metadata__": metadata,
        TENSOR_NAME: {
            "dtype": _ST_DTYPES[meta.dtype],
            "shape": [rows, *meta.dims],
            "data_offsets": [0, nbytes],
        },
    }
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # keep the data 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw


NPY_TRAILER_MAGIC = b"BLIP2GEN"
NPY_TRAILER_BYTES = len(NPY_TRAILER_MAGIC) + 32  # + the generation: 32 hex digits


def _npy_trailer(generation: str) -> bytes:
    raw = generation.encode("ascii")
    if len(raw) != 32:
        raise ValueError(f"a generation id is 32 hex digits, not {generation!r}")
    return NPY_TRAILER_MAGIC + raw


def _npy_header(meta: StoreMeta, rows: int) -> bytes:
    import io

    import numpy as np

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": np.dtype(meta.dtype).str, "fortran_order": False, "shape": (rows, *meta.dims)}
    )
    return buf.getvalue()


@dataclass
class _MatrixInfo:
    rows: int
    dims: tuple[int, ...]
    dtype: str
    offset: int
    generation: str | None

    @property
    def nbytes(self) -> int:
        import numpy as np

        return self.rows * int(np.prod(self.dims)) * np.dtype(self.dtype).itemsize


def _truncated(path: Path, info: _MatrixInfo, size: int, expected: int) -> StoreError:
    return StoreError(
        f"the vector store {str(path)!r} is truncated: {size} bytes on disk, {expected} needed for the "
        f"{info.rows} rows its header announces (an interrupted copy, or a full disk?)",
        hint=f"restore it together with {str(index_path(path))!r} from where it was copied, or rebuild it: "
        f"delete both files and run blip2 embed PHOTOS -o {path} again",
    )


def _read_matrix_info(path: Path) -> _MatrixInfo:
    import numpy as np

    kind = _kind(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if kind == "npy":
                version = np.lib.format.read_magic(f)
                if version == (1, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
                else:
                    shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
                if fortran or len(shape) < 2 or dtype.name not in STORE_DTYPES:
                    raise ValueError(f"an array of shape {shape} and dtype {dtype} in {'Fortran' if fortran else 'C'} order")
                info = _MatrixInfo(int(shape[0]), tuple(int(x) for x in shape[1:]), dtype.name, f.tell(), None)
                end = info.offset + info.nbytes
                if size < end:
                    raise _truncated(path, info, size, end)
                if size == end + NPY_TRAILER_BYTES:
                    f.seek(end)
                    tail = f.read(NPY_TRAILER_BYTES)
                    if tail.startswith(NPY_TRAILER_MAGIC):
                        info.generation = tail[len(NPY_TRAILER_MAGIC):].decode("ascii", "replace")
                        return info
                if size != end:  # neither a trailer nor a store written before trailers existed
                    raise ValueError(f"{size - end} unexpected bytes after its {info.rows} rows")
                return info
            (n,) = struct.unpack("<Q", f.read(8))
            if n > 100 << 20:
                raise ValueError("header too large")
            header = json.loads(f.read(n))
            info = header.get(TENSOR_NAME)
            if not isinstance(info, dict):
                raise ValueError(f"no tensor named {TENSOR_NAME!r}")
            shape = info["shape"]
            dtype = _ST_DTYPES_BACK.get(info["dtype"])
            if dtype is None or len(shape) < 2:
                raise ValueError(f"tensor {TENSOR_NAME!r} is {info['dtype']} {shape}")
            generation = (header.get("__metadata__") or {}).get("generation")
            begin, stop = (int(x) for x in info["data_offsets"])
            matrix = _MatrixInfo(int(shape[0]), tuple(int(x) for x in shape[1:]), dtype, 8 + n + begin, generation)
            if stop - begin != matrix.nbytes:
                raise ValueError(f"its data_offsets span {stop - begin} bytes, not the {matrix.nbytes} of its shape")
            if size < matrix.offset + matrix.nbytes:
                raise _truncated(path, matrix, size, matrix.offset + matrix.nbytes)
            return matrix
    except OSError as exc:
        raise StoreError(f"cannot read the vector store {str(path)!r}: {exc.strerror or exc}") from exc
    except (ValueError, KeyError, TypeError, struct.error, UnicodeDecodeError) as exc:
        raise StoreError(
            f"{str(path)!r} is not a blip2 vector store ({exc})",
            hint="choose another -o name, or delete the file",
        ) from exc


# --------------------------------------------------------------------------- #
# The index file
# --------------------------------------------------------------------------- #


@dataclass
class _Index:
    meta: StoreMeta
    rows: int
    generation: str
    created: str | None
    entries: list[Entry]
    failed: dict = field(default_factory=dict)  # abspath -> {"path", "abspath", "error"}: no row yet


INDEX_KEY = b"blip2"  # the Parquet index's key-value metadata: the store's settings (JSON)
INDEX_COLUMNS = ("path", "abspath", "size", "mtime_ns", "sha256")
INDEX_ROW_GROUP = 65536


def _pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise StoreError("the vector store's index is Parquet: pyarrow is needed",
                         hint="pip install pyarrow") from None
    return pa, pq


def entries_table(entries: Sequence[Entry], pa=None):
    """The index rows of ``entries`` as an Arrow table (``INDEX_COLUMNS``, row order).

    A file name that is not valid UTF-8 (undecodable bytes on a POSIX file system,
    a surrogate escape in Python) cannot be a Parquet string: its ``path`` and
    ``abspath`` show U+FFFD in the string columns and the exact bytes go to the
    ``path_bytes`` / ``abspath_bytes`` columns (present only when needed, null elsewhere)."""
    if pa is None:
        pa, _ = _pyarrow()
    paths = [e.path for e in entries]
    abspaths = [e.abspath for e in entries]
    columns = {
        "size": pa.array([e.size for e in entries], pa.int64()),
        "mtime_ns": pa.array([e.mtime_ns for e in entries], pa.int64()),
        "sha256": pa.array([e.sha256 for e in entries], pa.string()),
    }
    extra = {}
    for name, values in (("path", paths), ("abspath", abspaths)):
        try:
            columns[name] = pa.array(values, pa.string())
        except (UnicodeEncodeError, pa.ArrowInvalid, pa.ArrowTypeError):
            shown, raw = [], []
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


def entries_from_table(table) -> list[Entry]:
    """``entries_table`` read back: an Entry per row."""
    cols = table.select([c for c in table.column_names
                         if c in INDEX_COLUMNS or c in ("path_bytes", "abspath_bytes")]).to_pydict()
    paths, abspaths = cols["path"], cols["abspath"]
    for name, values in (("path", paths), ("abspath", abspaths)):
        for i, raw in enumerate(cols.get(name + "_bytes") or ()):
            if raw is not None:
                values[i] = os.fsdecode(raw)
    return [Entry(p, p if a == p else a, int(size), int(mtime), digest)  # one string if equal
            for p, a, size, mtime, digest in zip(paths, abspaths, cols["size"], cols["mtime_ns"], cols["sha256"])]


def _read_head(path: Path, head) -> tuple[dict, StoreMeta, dict]:
    if not isinstance(head, dict) or head.get("format") != FORMAT_NAME:
        raise ValueError("no blip2-vector-store settings")
    if int(head.get("version", 0)) > FORMAT_VERSION:
        raise StoreError(
            f"{str(path)!r} was written by a newer blip2 (store version {head['version']})",
            hint="upgrade blip2",
        )
    meta = StoreMeta.from_settings(head)
    failed = {str(f["abspath"]): {"path": str(f["path"]), "abspath": str(f["abspath"]),
                                  "error": f.get("error")}
              for f in head.get("failed") or []}
    return head, meta, failed


def _read_index(path: Path) -> _Index:
    """Read an index: Parquet (its settings in the key-value metadata), or the legacy
    JSON Lines one (a header line, then the rows), told apart by name."""
    legacy = ".index.jsonl" in path.name
    try:
        if legacy:
            with open(path, encoding="utf-8", errors="surrogateescape") as f:
                head, meta, failed = _read_head(path, json.loads(f.readline() or "null"))
                entries = [Entry.from_json(json.loads(line)) for line in f if line.strip()]
        else:
            _, pq = _pyarrow()
            try:
                table = pq.read_table(path)
                raw = (table.schema.metadata or {}).get(INDEX_KEY)
            except OSError:
                raise
            except Exception as exc:  # pyarrow's ArrowInvalid and friends: not a complete Parquet file
                raise ValueError(str(exc)) from None
            head, meta, failed = _read_head(path, json.loads(raw) if raw else None)
            entries = entries_from_table(table)
        return _Index(meta, int(head["rows"]), str(head["generation"]), head.get("created"), entries, failed)
    except OSError as exc:
        raise StoreError(f"cannot read the store index {str(path)!r}: {exc.strerror or exc}") from exc
    except (ValueError, KeyError, TypeError) as exc:
        raise StoreError(f"the store index {str(path)!r} is damaged ({exc})") from exc


def _consistent(index: _Index, info: _MatrixInfo) -> bool:
    return (
        index.rows == info.rows == len(index.entries)
        and index.meta.dims == info.dims
        and index.meta.dtype == info.dtype
        and (info.generation is None or info.generation == index.generation)
    )


def _mismatch(path: Path, idx: Path, info: _MatrixInfo, index: _Index) -> StoreError:
    """The matrix and the index were not written by the same commit: say how they differ."""
    why = []
    if index.rows != info.rows or len(index.entries) != index.rows:
        why.append(f"the matrix has {info.rows} rows, the index {len(index.entries)}")
    if index.meta.dims != info.dims or index.meta.dtype != info.dtype:
        why.append(f"the matrix holds {info.dtype} rows of {_show(info.dims)}, the index says "
                   f"{index.meta.dtype} rows of {_show(index.meta.dims)}")
    if info.generation is not None and info.generation != index.generation:
        why.append(f"the matrix is from commit {info.generation[:12]}, the index from commit {index.generation[:12]}")
    return StoreError(
        f"the vector store {str(path)!r} and its index {str(idx)!r} do not belong together: they come "
        f"from different commits ({'; '.join(why) or 'they disagree'}). Rows would be matched to the wrong "
        "images, so the store is not used (a writer was killed between its two renames and the new "
        "index was lost, or one of the files was copied or restored without the other)",
        hint=f"restore both files from the same copy, or rebuild the store: delete {str(path)!r} and "
        f"{str(idx)!r} and run blip2 embed PHOTOS -o {path} again",
    )


def _fsync_dir(folder: Path) -> None:
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


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


# --------------------------------------------------------------------------- #
# Reading
# --------------------------------------------------------------------------- #


class VectorStore:
    """A store opened for reading: settings, entries, and a read-only memory map."""

    def __init__(self, path: Path, index: _Index, info: _MatrixInfo, index_file: Path | None = None):
        self.path = path
        self.index_file = index_file  # the file the index was read from (a legacy .index.jsonl: migrated at the next update)
        self.meta = index.meta
        self.entries = index.entries
        self.generation = index.generation
        self.created = index.created
        self.failed = index.failed  # files that failed to embed (no row): retried by the next update
        self._info = info
        self._matrix = None
        self._file = None
        self._by_abspath: dict[str, int] | None = None

    @property
    def rows(self) -> int:
        return len(self.entries)

    @classmethod
    def exists(cls, path: str | os.PathLike) -> bool:
        path = Path(path)
        if path.is_dir():
            from .segments import is_segmented

            return is_segmented(path)
        return path.exists() or any(p.exists() for p in index_paths(path))

    @classmethod
    def open(cls, path: str | os.PathLike) -> "VectorStore":
        """Open for reading (no lock); ``StoreError`` if it is missing or inconsistent.

        A directory is a segmented store (``segments.SegmentedStore``, the same interface)."""
        path = Path(path)
        if path.is_dir():
            from .segments import SegmentedStore, is_segmented

            if not is_segmented(path):
                raise StoreError(f"no vector store at {str(path)!r} (a directory without blip2-store.json)",
                                 hint=f"create one: blip2 embed PHOTOS -o {path} --layout segments")
            return SegmentedStore.open(path)
        found = [p for p in index_paths(path) if p.exists()]
        idx = found[0] if found else index_path(path)
        if not path.exists() or not found:
            missing, present = (path, idx) if not path.exists() else (idx, path)
            if not present.exists():
                raise StoreError(f"no vector store at {str(path)!r}",
                                 hint=f"create one: blip2 embed PHOTOS -o {path}")
            raise StoreError(
                f"{str(present)!r} exists but {str(missing)!r} does not: not a complete blip2 vector store",
                hint="choose another name, or delete the leftover file",
            )
        info = _read_matrix_info(path)
        index = _read_index(idx)
        if _consistent(index, info):
            return cls(path, index, info, idx)
        # The other candidates, newest first: a legacy index beside a Parquet one (an
        # update that stopped after its commit, before removing it); a writer stopped
        # (or is) between its two renames: the new matrix belongs to the new index,
        # still under its temporary name; a writer renamed its index just now.
        others = found[1:]
        if not _matrix_tmp(path).exists():
            others += [t for t in (_index_tmp(path), _legacy_index_tmp(path)) if t.exists()]
        others += index_paths(path)
        for other in others:
            try:
                newer = _read_index(other)
            except StoreError:
                continue
            if _consistent(newer, info):
                return cls(path, newer, info, other)
        raise _mismatch(path, idx, info, index)

    @property
    def matrix(self):
        """The rows as a read-only numpy memmap (None when the store is empty)."""
        if self._matrix is None and self.rows:
            import numpy as np

            self._matrix = np.memmap(
                self.path, dtype=self._info.dtype, mode="r", offset=self._info.offset,
                shape=(self.rows, *self._info.dims),
            )
        return self._matrix

    def read_rows(self, start: int, stop: int, out=None):
        """Rows ``[start, stop)`` as an array (``out``, if given, is filled), read
        with plain file I/O.

        Full scans and copies use this rather than the memory map, so that the
        process's resident memory stays at one chunk (mapped pages count as
        resident while they are touched)."""
        import numpy as np

        n = max(0, stop - start)
        elems = int(np.prod(self._info.dims))
        dtype = np.dtype(self._info.dtype)
        if self._file is None:
            self._file = open(self.path, "rb")
        self._file.seek(self._info.offset + start * elems * dtype.itemsize)
        if out is None:
            out = np.empty((n, *self._info.dims), dtype=dtype)
        elif out.shape != (n, *self._info.dims) or out.dtype != dtype or not out.flags.c_contiguous:
            raise ValueError("read_rows: out has the wrong shape or dtype")
        got = self._file.readinto(memoryview(out).cast("B")) if n else 0
        if got != out.nbytes:
            raise StoreError(f"the vector store {str(self.path)!r} is truncated (rows {start}-{stop} are missing)",
                             hint="rebuild it: delete it and its index and run blip2 embed again")
        return out

    def row_of(self, abspath: str) -> int | None:
        if self._by_abspath is None:
            self._by_abspath = {e.abspath: i for i, e in enumerate(self.entries)}
        return self._by_abspath.get(abspath)

    def vector(self, row: int):
        import numpy as np

        return np.asarray(self.matrix[row], dtype=np.float32)

    def close(self) -> None:
        self._matrix = None  # the memmap is closed when it is collected
        if self._file is not None:
            self._file.close()
            self._file = None


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
    failed: int = 0  # files that failed to embed in this run (no row; remembered in the index)
    retried: int = 0  # files that had failed before, tried again (not counted as new)
    rows: int = 0  # rows after the commit
    rewritten: bool = False  # whether the matrix was rewritten (segmented: whether anything was written)
    compacted: int = 0  # segmented stores: old rows copied by compaction in this commit


class _Lock:
    """An exclusive flock on the side file that also collects the new rows."""

    def __init__(self, path: Path):
        self.path = path
        self.fh = None

    def acquire(self) -> None:
        try:
            import fcntl
        except ImportError:  # Windows: no locking
            fcntl = None
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            if fcntl is None:
                break
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                raise StoreError(
                    f"another blip2 process is writing the vector store {str(self.path)[:-len('.pending')]!r}",
                    hint="wait for it to finish (or remove the .pending file if no blip2 is running)",
                ) from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:  # not unlinked by the previous holder meanwhile
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        self.fh = os.fdopen(fd, "r+b")

    def release(self, remove: bool) -> None:
        if self.fh is None:
            return
        if remove:
            _unlink(self.path)
        self.fh.close()  # releases the lock
        self.fh = None


class StoreUpdate:
    """One update of a store: decide what to embed, collect new rows, commit.

    Use as a context manager: leaving it without ``commit()`` discards the new
    rows and leaves the store as it was.

    ``select(items)`` filters the input items lazily (it may run in another
    thread): a file whose size and mtime, or else whose content hash, match its
    row is skipped (reused); a changed file's old row is dropped and the file is
    passed on to be embedded again. ``add(entry, vector)`` appends a row;
    ``commit()`` writes the new store.
    """

    def __new__(cls, path, *args, layout: str | None = None, **kwargs):
        if cls is StoreUpdate and (layout == "segments" or Path(path).is_dir()):
            from .segments import SegmentedUpdate

            return super().__new__(SegmentedUpdate)
        return super().__new__(cls)

    def __init__(self, path: str | os.PathLike, meta: StoreMeta, *, prune: bool = False,
                 dtype_given: bool = True, layout: str | None = None, compact: bool = False):
        import numpy as np

        self.path = Path(path)
        self.kind = _kind(self.path)
        self.meta = meta
        self.prune = prune
        self.stats = UpdateStats()
        self._lock = _Lock(_pending_path(self.path))
        self._mutex = threading.Lock()
        self._closed = False
        self._added: list[Entry] = []
        self._added_keys: set[str] = set()
        self._old: VectorStore | None = None
        self._keep: list[bool] = []
        self._touched: dict[int, Entry] = {}
        self._kinds: dict[str, str] = {}  # abspath -> "new" | "changed" | "retried", as select() counted it
        self._failed: dict[str, dict] = {}  # abspath -> what failed in this run
        self._np = np
        self._lock.acquire()
        try:
            self._recover()
            if VectorStore.exists(self.path):
                self._old = VectorStore.open(self.path)
                self._adopt(self._old, dtype_given)
                self._keep = [True] * self._old.rows
        except BaseException:
            self._lock.release(remove=False)
            raise
        self._row_elems = int(np.prod(meta.dims))
        self._row_dtype = np.dtype(self.meta.dtype)

    def _adopt(self, old, dtype_given: bool) -> None:
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
    def __enter__(self) -> "StoreUpdate":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._old is not None:
            self._old.close()
        self._lock.release(remove=True)

    def _recover(self) -> None:
        """Finish or undo what a writer that crashed left behind (we hold the lock)."""
        mtmp = _matrix_tmp(self.path)
        tmps = [(_index_tmp(self.path), index_path(self.path)),
                (_legacy_index_tmp(self.path), legacy_index_path(self.path))]  # an older blip2's
        if mtmp.exists():  # it stopped before its commit point: the old store stands
            _unlink(mtmp)
            for itmp, _ in tmps:
                _unlink(itmp)
            return
        for itmp, final in tmps:
            if not itmp.exists():
                continue
            try:
                newer = _read_index(itmp)
                ok = self.path.exists() and _consistent(newer, _read_matrix_info(self.path))
            except StoreError:
                ok = False
            if ok:  # it stopped between its two renames: finish
                os.replace(itmp, final)
                _fsync_dir(self._folder())
            else:
                _unlink(itmp)

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
        entry = self._old.entries[row]
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
        remembered in the index, so the next update retries it and says so."""
        with self._mutex:
            if self._kinds.pop(abspath, None) == "new":
                self.stats.new -= 1
            if abspath not in self._failed:
                self.stats.failed += 1
            self._failed[abspath] = {"path": path, "abspath": abspath, "error": error}

    def _failed_after(self) -> dict:
        """The failures the new index remembers: this run's, and earlier ones not tried again."""
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
        np = self._np
        arr = np.ascontiguousarray(vector, dtype=self._row_dtype)
        if arr.size != self._row_elems:
            raise ValueError(f"vector of shape {arr.shape} does not fit the store's dims {self.meta.dims}")
        if entry.abspath in self._added_keys:  # the same file twice in one run: keep the first
            return
        self._added_keys.add(entry.abspath)
        self._lock.fh.write(arr.tobytes())
        self._added.append(entry)

    # -- committing ------------------------------------------------------------
    def commit(self) -> UpdateStats:
        """Write the new store (atomically); return what changed."""
        with self._mutex:
            self._closed = True
        old = self._old
        keep = list(self._keep)
        if self.prune and old is not None:
            for row, entry in enumerate(old.entries):
                if keep[row] and not os.path.exists(entry.abspath):
                    keep[row] = False
                    self.stats.pruned += 1
        kept = [r for r, k in enumerate(keep) if k]
        old_rows = old.rows if old is not None else 0
        entries = [self._touched.get(r, old.entries[r]) for r in kept] + self._added
        self.stats.added = len(self._added)
        self.stats.rows = len(entries)
        failed = self._failed_after()
        matrix_same = old is not None and len(kept) == old_rows and not self._added
        legacy = old is not None and legacy_index_path(self.path).exists()  # read, or left by a torn migration
        if matrix_same and not self._touched and failed == old.failed and not legacy:
            return self.stats  # nothing to write
        created = old.created if old is not None else None
        if matrix_same:
            # Only mtimes (or the failures remembered) changed, or the index is in the legacy
            # format: rewrite the index alone (one atomic rename).
            self._write_index(_index_tmp(self.path), entries, old.generation, created, failed)
            os.replace(_index_tmp(self.path), index_path(self.path))
            self._drop_legacy_index()
            _fsync_dir(self._folder())
            return self.stats
        generation = uuid.uuid4().hex
        mtmp, itmp = _matrix_tmp(self.path), _index_tmp(self.path)
        committed = False
        try:
            self._write_matrix(mtmp, kept, len(entries), generation)
            self._write_index(itmp, entries, generation, created, failed)
            if old is not None:
                old.close()  # no open handle on the file being replaced
            os.replace(mtmp, self.path)  # the commit point
            committed = True
            os.replace(itmp, index_path(self.path))
            self._drop_legacy_index()
            _fsync_dir(self._folder())
        except BaseException:
            if not committed:
                _unlink(mtmp)
                _unlink(itmp)
            raise
        self.stats.rewritten = True
        return self.stats

    def _folder(self) -> Path:
        return self.path.parent if str(self.path.parent) else Path(".")

    def _drop_legacy_index(self) -> None:
        """After the Parquet index is in place: remove a JSON Lines one (the migration's last step;
        a crash before it leaves both, and readers prefer the Parquet one)."""
        _unlink(legacy_index_path(self.path))

    def _write_matrix(self, tmp: Path, kept: Sequence[int], rows: int, generation: str) -> None:
        np = self._np
        header = (
            _safetensors_header(self.meta, rows, generation) if self.kind == "safetensors"
            else _npy_header(self.meta, rows)
        )
        row_bytes = self._row_elems * self._row_dtype.itemsize
        step = max(1, _COPY_BYTES // max(1, row_bytes))
        with open(tmp, "wb") as out:
            out.write(header)
            if kept:
                src = self._old
                # copy runs of consecutive kept rows, a chunk at a time
                start = prev = kept[0]
                runs = []
                for r in kept[1:]:
                    if r != prev + 1:
                        runs.append((start, prev + 1))
                        start = r
                    prev = r
                runs.append((start, prev + 1))
                for a, b in runs:
                    for s in range(a, b, step):
                        chunk = src.read_rows(s, min(b, s + step))
                        out.write(np.ascontiguousarray(chunk, dtype=self._row_dtype).data)
            pending = self._lock.fh
            pending.flush()
            pending.seek(0)
            remaining = len(self._added) * row_bytes
            while remaining:
                block = pending.read(min(remaining, step * row_bytes))
                if not block:
                    raise StoreError("the side file of new vectors ended early")
                out.write(block)
                remaining -= len(block)
            pending.seek(0, os.SEEK_END)
            if self.kind == "npy":
                out.write(_npy_trailer(generation))  # ties the matrix to its index (see the module doc)
            out.flush()
            os.fsync(out.fileno())

    def _write_index(self, tmp: Path, entries: Sequence[Entry], generation: str, created: str | None,
                     failed: dict | None = None) -> None:
        """The index: Parquet, one row per row of the matrix, the settings (and the
        generation that ties it to the matrix) in its key-value metadata."""
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        from . import __version__

        pa, pq = _pyarrow()
        head = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "rows": len(entries),
            **self.meta.settings(),
            "matrix": self.path.name,
            "generation": generation,
            "created": created or now,
            "updated": now,
            "blip2": __version__,
            "failed": list((failed or {}).values()),
        }
        raw = json.dumps(head, ensure_ascii=True).encode("ascii")  # \u escapes: any file name fits
        table = entries_table(entries, pa).replace_schema_metadata({INDEX_KEY: raw})
        pq.write_table(table, tmp, row_group_size=INDEX_ROW_GROUP)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())


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
            view = store.read_rows(start, stop, out=raw[:n])
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
