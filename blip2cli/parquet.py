"""``--format parquet``: records as typed Parquet columns, valid after every row group.

Columns are typed from what the records hold: ``captions``/``answers`` are
``list<string>``, an embedding's ``vector`` is ``fixed_size_list<float32>`` (its
length the first vector's; a record without one, an error, gets that many nulls),
``dims`` ``list<int32>``, numbers int64/float64, the settings a record carries
(nested, like ``generation``) a JSON string each. The schema is fixed by the first
row group: a column first seen later is dropped.

The file is a valid Parquet file from the moment it is opened (an empty one with
the task's columns) and after every row group. Records are buffered and written
as row groups early and then regularly: the first as soon as a record without an
error is in (its types fix the schema), then groups of 2, 4, 8, ... records up to
``rows`` (1000), or whatever is buffered after ``seconds`` (10 s). The file's
footer is written again after each group. A run stopped by Ctrl-C or SIGTERM
keeps every finished record (the buffer is written as a last group when the
run's sink closes), one stopped by ``kill -9`` or a full disk keeps the records
up to the last row group (all but the newest few early on): readable by pyarrow,
pandas, DuckDB and ``datasets``. How: each group is written by pyarrow's own
writer into memory, as if it started at the end of the data already in the file
(so its offsets are absolute), its bytes replace the old footer, and the footer
of all groups so far (``FileMetaData.append_row_groups``) follows.

pyarrow is needed (``pip install 'blip2-cli[parquet]'``): :func:`require_pyarrow`
says so before a model is loaded.
"""

from __future__ import annotations

import io
import json
import struct
import time
from typing import Any

from .errors import OutputError, UsageError

MAGIC = b"PAR1"
HINT = "pip install 'blip2-cli[parquet]'"


def require_pyarrow():
    """pyarrow.parquet, or a UsageError that says how to install it."""
    try:
        import pyarrow  # noqa: F401
        import pyarrow.parquet as pq
    except ImportError:
        raise UsageError("Parquet output needs pyarrow, which is not installed", hint=HINT) from None
    return pq


# Known result columns and their types (names a task's records use).
def _known_types(pa) -> dict:
    text_list = pa.list_(pa.string())
    return {
        "path": pa.string(), "path_bytes": pa.string(), "shard": pa.string(), "key": pa.string(),
        "carry_error": pa.string(),
        "caption": pa.string(), "captions": text_list, "question": pa.string(), "answer": pa.string(),
        "answers": text_list, "text": pa.string(), "dims": pa.list_(pa.int32()), "error": pa.string(),
        "sidecar": pa.string(), "rank": pa.int64(), "score": pa.float64(), "itc": pa.float64(),
        "itm": pa.float64(),
        # the loader's settings (tasks.LOADER_SETTINGS): strings, also where a run has none
        "model": pa.string(), "revision": pa.string(), "checkpoint": pa.string(), "dtype": pa.string(),
        "quantize": pa.string(), "preprocess": pa.string(),
    }


def column_types(rows: list[dict], columns=(), types=None) -> tuple:
    """``(pyarrow.Schema, {column: converter})`` for these records, as ``--format parquet`` types them.

    Columns in the order the records first show them (``columns`` when there are no
    records), ``path_bytes`` right after ``path``; the known result columns get their
    fixed types, ``vector`` a ``fixed_size_list<float32>`` as long as the first vector
    (a plain ``list<float32>`` without one), anything else is typed from its values
    (``_infer``: bool, int64, float64, nested values as one JSON string, else string),
    unless ``types`` (``schema.Schema.types``) fixes it up front.
    """
    import pyarrow as pa

    known = _known_types(pa)
    names: list[str] = list(columns)
    for row in rows:
        for key in row:
            if key not in names:
                names.append(key)
    for name in types or ():  # declared columns are there even when no record has them yet
        if name not in names:
            names.append(name)
    if "path" in names and "path_bytes" not in names:
        names.insert(names.index("path") + 1, "path_bytes")
    fields: list = []
    convert: dict = {}
    for name in names:
        values: list = [r.get(name) for r in rows if r.get(name) is not None]
        if name == "vector":
            size = len(values[0]) if values else 0
            typ = pa.list_(pa.float32(), size) if size else pa.list_(pa.float32())
            convert[name] = _vector(size)
        elif name in known:
            typ = known[name]
            convert[name] = _as(typ, pa)
        elif types and name in types:
            typ, convert[name] = _declared(types[name], pa)
        else:
            typ, convert[name] = _infer(values, pa)
        fields.append(pa.field(name, typ))
    return pa.schema(fields), convert


def arrow_schema(records: list[dict], columns=()):
    """The ``pyarrow.Schema`` ``--format parquet`` writes for a file whose first row
    group holds ``records`` (see :func:`column_types`)."""
    return column_types(records, columns)[0]


class _Memory(io.RawIOBase):
    """Where pyarrow writes one row group (a whole small file) in memory."""

    def __init__(self):
        super().__init__()
        self.data = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self.data += bytes(b)
        return len(b)


# -- the footer's offsets (Thrift compact protocol) ---------------------------------
# pyarrow writes a group's offsets from the start of its own small file; in ours the
# group starts further on. These read the footer's Thrift, add the shift to each
# offset, and write it back; pyarrow then joins the footers (append_row_groups).
_BOOL_TRUE, _BOOL_FALSE, _BYTE, _I16, _I32, _I64, _DOUBLE, _BINARY, _LIST, _SET, _MAP, _STRUCT = range(1, 13)


class _Reader:
    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def byte(self) -> int:
        self.pos += 1
        return self.data[self.pos - 1]

    def varint(self) -> int:
        shift = out = 0
        while True:
            b = self.byte()
            out |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                return out

    def zigzag(self) -> int:
        n = self.varint()
        return (n >> 1) ^ -(n & 1)

    def value(self, typ: int):
        if typ in (_BOOL_TRUE, _BOOL_FALSE):  # in a list: one byte
            return self.byte() == _BOOL_TRUE
        if typ == _BYTE:
            return self.byte()
        if typ in (_I16, _I32, _I64):
            return self.zigzag()
        if typ == _DOUBLE:
            self.pos += 8
            return self.data[self.pos - 8:self.pos]
        if typ == _BINARY:
            n = self.varint()
            self.pos += n
            return self.data[self.pos - n:self.pos]
        if typ in (_LIST, _SET):
            head = self.byte()
            size, elem = head >> 4, head & 0x0F
            if size == 15:
                size = self.varint()
            return (elem, [self.value(elem) for _ in range(size)])
        if typ == _MAP:
            size = self.varint()
            kinds = self.byte() if size else 0
            k, v = kinds >> 4, kinds & 0x0F
            return (k, v, [(self.value(k), self.value(v)) for _ in range(size)])
        if typ == _STRUCT:
            fields: list = []
            last = 0
            while True:
                head = self.byte()
                if head == 0:
                    return fields
                delta, kind = head >> 4, head & 0x0F
                fid = last + delta if delta else self.zigzag()
                last = fid
                value = kind == _BOOL_TRUE if kind in (_BOOL_TRUE, _BOOL_FALSE) else self.value(kind)
                fields.append([fid, kind, value])
        raise ValueError(f"unknown thrift type {typ}")


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        if n < 0x80:
            out.append(n)
            return bytes(out)
        out.append((n & 0x7F) | 0x80)
        n >>= 7


def _zigzag(n: int) -> bytes:
    return _varint((n << 1) ^ (n >> 63))


def _encode(typ: int, value) -> bytes:
    if typ in (_BOOL_TRUE, _BOOL_FALSE):
        return bytes([_BOOL_TRUE if value else _BOOL_FALSE])
    if typ == _BYTE:
        return bytes([value])
    if typ in (_I16, _I32, _I64):
        return _zigzag(value)
    if typ == _DOUBLE:
        return bytes(value)
    if typ == _BINARY:
        return _varint(len(value)) + bytes(value)
    if typ in (_LIST, _SET):
        elem, items = value
        head = bytes([(len(items) << 4) | elem]) if len(items) < 15 else bytes([0xF0 | elem]) + _varint(len(items))
        return head + b"".join(_encode(elem, v) for v in items)
    if typ == _MAP:
        k, v, items = value
        return _varint(len(items)) + (bytes([(k << 4) | v]) if items else b"") + b"".join(
            _encode(k, a) + _encode(v, b) for a, b in items)
    if typ == _STRUCT:
        out, last = bytearray(), 0
        for fid, kind, val in value:
            if kind in (_BOOL_TRUE, _BOOL_FALSE):
                kind = _BOOL_TRUE if val else _BOOL_FALSE
            delta = fid - last
            out += bytes([(delta << 4) | kind]) if 0 < delta <= 15 else bytes([kind]) + _zigzag(fid)
            last = fid
            if kind not in (_BOOL_TRUE, _BOOL_FALSE):
                out += _encode(kind, val)
        return bytes(out + b"\0")
    raise ValueError(f"unknown thrift type {typ}")


def _field(struct: list, fid: int):
    return next((f for f in struct if f[0] == fid), None)


def _add(struct: list, fids, shift: int) -> None:
    for fid in fids:
        f = _field(struct, fid)
        if f is not None:
            f[2] += shift


def shift_footer(footer: bytes, shift: int) -> bytes:
    """A FileMetaData (Thrift) with every offset into the file moved by ``shift``."""
    meta = _Reader(footer).value(_STRUCT)
    groups = _field(meta, 4)  # FileMetaData.row_groups
    for group in (groups[2][1] if groups else []):
        _add(group, (5,), shift)  # RowGroup.file_offset
        chunks = _field(group, 1)
        for chunk in (chunks[2][1] if chunks else []):
            _add(chunk, (2, 4, 6), shift)  # ColumnChunk: file_offset, offset/column index offsets
            column = _field(chunk, 3)  # ColumnMetaData: data, index, dictionary pages, bloom filter
            if column is not None:
                _add(column[2], (9, 10, 11, 14), shift)
    return _encode(_STRUCT, meta)


class ParquetWriter:
    """A writer (``writers.WRITERS["parquet"]``) over an opened ``writers.Sink`` with a file."""

    format = "parquet"
    extension = ".parquet"
    ROWS = 1000  # records per row group (at most)
    SECONDS = 10.0  # a row group at least this often while records come

    def __init__(self, stream, schema=None, *, header: bool = True, rows: int | None = None,
                 seconds: float | None = None):
        self.pq = require_pyarrow()
        import pyarrow as pa

        self.pa = pa
        self.sink = stream
        fh = getattr(stream, "_fh", None)
        if getattr(stream, "path", None) is None or fh is None:
            raise UsageError("Parquet output needs a file", hint="name one: -o results.parquet")
        if not header:
            raise UsageError("a Parquet file cannot be appended to", hint="write a new file")
        self.fh = fh
        self.rows = rows or self.ROWS
        self.seconds = self.SECONDS if seconds is None else seconds
        self.columns = list(getattr(schema, "columns", None) or [])  # for a file without records
        self.types = dict(getattr(schema, "types", None) or {})  # extra columns typed up front
        self._buffer: list[dict] = []
        self._since = time.monotonic()
        self._schema: Any = None
        self._convert: dict = {}
        self._metas: list = []
        self._first: bytes | None = None  # the first group's footer bytes: the base of every footer
        self._data_end = len(MAGIC)
        self._footer = b""
        self._due = 1  # records in the next row group: 1, 2, 4, ... up to ``rows``
        self.records = 0
        self._write_at(0, MAGIC)
        self.fh.truncate(len(MAGIC))
        self._write_empty()
        self._flush_when_closed(stream)

    def _write_empty(self) -> None:
        """A valid empty file (the known columns, no rows) until the first group: a
        run stopped before it leaves a file every Parquet reader opens."""
        schema, _ = column_types([], self.columns, self.types)
        memory = _Memory()
        self.pq.ParquetWriter(memory, schema).close()
        footer = bytes(memory.data)[len(MAGIC):]  # the footer, its length, PAR1
        self._write_at(len(MAGIC), footer)
        self.fh.truncate(len(MAGIC) + len(footer))
        self._footer = footer  # what a failed first group puts back

    def _flush_when_closed(self, stream) -> None:
        """The records still buffered go out as a last row group when the sink closes.

        A run that is interrupted (Ctrl-C, SIGTERM) or fails does not close its
        writer (an HTML page is left without its closing tags), but it always closes
        its sink: so the finished records in the buffer survive any stop but
        ``kill -9`` and a full disk."""
        close = getattr(stream, "close", None)
        if close is None:
            return

        def close_after_flush(*args, quiet: bool = False, **kwargs):
            try:
                if self._buffer and not getattr(stream, "failed", False):
                    self.flush()
            except Exception:
                if not quiet:
                    close(*args, quiet=True, **kwargs)
                    raise
            return close(*args, quiet=quiet, **kwargs)

        stream.close = close_after_flush

    # -- the writer face ------------------------------------------------------
    def write(self, record: dict) -> None:
        from .utf8 import safe_record

        self._buffer.append(safe_record(record))
        if time.monotonic() - self._since >= self.seconds or len(self._buffer) >= self.rows:
            self.flush()
        elif len(self._buffer) >= self._due and (self._schema is not None or not record.get("error")):
            # The first group waits for a record without an error: its values type the columns.
            self.flush()

    def close(self) -> None:
        self.flush()
        if self._schema is None:  # no record at all: still a valid (empty) file
            self._write_group([])

    # -- row groups -----------------------------------------------------------
    def flush(self) -> None:
        if self._buffer:
            rows, self._buffer = self._buffer, []
            self._write_group(rows)
            self._due = min(self.rows, self._due * 2)
        self._since = time.monotonic()

    def _make_schema(self, rows: list[dict]):
        schema, self._convert = column_types(rows, columns=() if rows else self.columns, types=self.types)
        return schema

    def _write_group(self, rows: list[dict]) -> None:
        pa, pq = self.pa, self.pq
        if self._schema is None:
            self._schema = self._make_schema(rows)
        columns = {
            name: [self._convert[name](r.get(name)) for r in rows] for name in self._schema.names
        }
        table = pa.Table.from_pydict(columns, schema=self._schema)
        memory = _Memory()
        writer = pq.ParquetWriter(memory, self._schema, write_page_index=False)
        writer.write_table(table, row_group_size=max(1, len(rows)))
        writer.close()
        data = bytes(memory.data)
        (length,) = struct.unpack("<I", data[-8:-4])
        body = data[len(MAGIC):len(data) - 8 - length]
        footer = shift_footer(data[len(data) - 8 - length:-8], self._data_end - len(MAGIC))
        data = MAGIC + footer + struct.pack("<I", len(footer)) + MAGIC  # the group's footer, moved
        if rows or self._first is None:
            self._metas.append(pq.read_metadata(pa.BufferReader(data)))
        if self._first is None:
            self._first = data
        meta = pq.read_metadata(pa.BufferReader(self._first))  # the first group, the schema
        for other in self._metas[1:]:
            meta.append_row_groups(other)
        out = pa.BufferOutputStream()
        meta.write_metadata_file(out)
        footer = out.getvalue().to_pybytes()[len(MAGIC):]  # the footer, its length, PAR1
        self._commit(body, footer, len(rows))

    def _commit(self, body: bytes, footer: bytes, n: int) -> None:
        """The new group over the old footer, then the new footer: one write."""
        old_end, old_footer = self._data_end, self._footer
        try:
            self._write_at(old_end, body + footer)
            self.fh.truncate(old_end + len(body) + len(footer))
        except OSError as exc:
            try:  # back to the file as it was: the groups before this one
                self.fh.truncate(old_end)
                self._write_at(old_end, old_footer)
            except OSError:
                pass
            self.sink.failed = True
            raise OutputError(
                f"cannot write to {self.sink.path}: {exc.strerror or exc}; it holds the "
                f"{self.records} records of the row groups written before",
                hint="free some space (or fix the output), then run again",
            ) from exc
        self._data_end = old_end + len(body)
        self._footer = footer
        self.records += n
        self.sink.records = self.records

    def _write_at(self, offset: int, data: bytes) -> None:
        self.fh.seek(offset)
        view = memoryview(data)
        while view:
            n = self.fh.write(view)
            if n is None:
                break
            if n == 0:
                import errno
                import os

                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            view = view[n:]
        self.fh.flush()


def _as(typ, pa):
    if pa.types.is_list(typ):
        return lambda v: None if v is None else [None if x is None else _plain(x, typ.value_type, pa) for x in v]
    return lambda v: None if v is None else _plain(v, typ, pa)


def _plain(value, typ, pa):
    if pa.types.is_string(typ):
        return value if isinstance(value, str) else str(value)
    if pa.types.is_integer(typ):
        return int(value)
    if pa.types.is_floating(typ):
        return float(value)
    return value


def _vector(size: int):
    def convert(value):
        if size and (value is None or len(value) != size):
            # No vector (an error record), or another length, which cannot share the
            # column's fixed size: ``size`` nulls. A null fixed-size list cannot be read
            # back from Parquet (pyarrow 25: "Expected all lists to be of size=N"), so
            # one such row would make the whole file unreadable.
            return [None] * size
        return None if value is None else [float(x) for x in value]

    return convert


def _json(value):
    return None if value is None else json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _declared(kind: str, pa):
    """(type, converter) of a column whose type is known up front (a number or a flag only
    where every input agreed on it; anything else is a string column, which keeps any value)."""
    if kind == "bool":
        return pa.bool_(), lambda v: v if isinstance(v, bool) or v is None else None
    if kind == "int64":
        return pa.int64(), lambda v: v if isinstance(v, int) and not isinstance(v, bool) else None
    if kind == "float64":
        return pa.float64(), lambda v: float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None
    return pa.string(), lambda v: None if v is None else v if isinstance(v, str) else _json(v)


def _infer(values: list, pa):
    """(type, converter) of a column the records fill with settings or extras."""
    if values and all(isinstance(v, bool) for v in values):
        return pa.bool_(), lambda v: None if v is None else bool(v)
    if values and all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return pa.int64(), lambda v: v if isinstance(v, int) and not isinstance(v, bool) else None
    if values and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return pa.float64(), lambda v: float(v) if isinstance(v, (int, float)) else None
    if values and all(isinstance(v, (dict, list, tuple)) for v in values):
        return pa.string(), _json  # nested settings (generation): one JSON string
    return pa.string(), lambda v: None if v is None else v if isinstance(v, str) else _json(v)
