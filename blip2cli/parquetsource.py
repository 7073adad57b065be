"""Parquet files as input: img2dataset's ``--output_format parquet``, read row by row.

A Parquet file named as an input, matched by a glob or found in a folder is a
*shard file* like a tar (its item has ``tar=True``): ``webdataset.SampleReader``
turns it into one sample per row as the run reads it, so everything that works
for tar shards works for it (records with ``shard`` and ``key``, ``--carry``,
``-o DIR/`` with one output per input file, resumable, ``--shard I/N`` by whole
files).

* The image is the row's bytes in the first column named ``jpg``, ``png``,
  ``webp`` or ``image`` (or ``--image-column NAME``); a struct with a ``bytes``
  field (a Hugging Face ``Image`` feature) works too. A file without one is an
  error record when named explicitly, and left out (with a note) when it was
  found in a folder or by a glob (blip2's own Parquet outputs live in folders too).
* ``key``: the row's ``key`` column (img2dataset's), else none; ``path`` is
  ``file.parquet#KEY``, or ``file.parquet#ROW`` (the row number, from 0) without
  a key; a key seen before in the same file gets ``@ROW`` (unique within the file).
* ``--carry caption,url``: those columns (matched without regard to case) copied
  into the record; a column whose name is a record field or a setting
  (img2dataset's ``caption``) lands under ``source_<name>`` (``source_caption``).
  A carried column the file lacks is null, said once on stderr.
* Streamed: ``pyarrow``'s ``iter_batches`` reads a few rows at a time (only the
  columns needed), never the whole file; the bytes in flight share the tar
  reader's budget (``webdataset.ByteBudget``).
* A null image, an image over the size budget, a value that is not bytes: an
  error record for that row; a file that cannot be read: one error record naming
  it; a read error half-way: the rows before it, then one error record.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from .sources import PARQUET_SUFFIXES, Item

IMAGE_COLUMNS = ("jpg", "png", "webp", "image")
ROWS_PER_READ = 16  # rows converted to Python at a time


def is_parquet_path(path: str) -> bool:
    return path.lower().endswith(PARQUET_SUFFIXES)


def find_column(names: list[str], wanted: str) -> str | None:
    """``wanted`` among ``names``: exactly, else without regard to case."""
    if wanted in names:
        return wanted
    for name in names:
        if name.lower() == wanted.lower():
            return name
    return None


def image_column(names: list[str], wanted: str | None) -> str | None:
    if wanted:
        return find_column(names, wanted)
    for candidate in IMAGE_COLUMNS:
        found = find_column(names, candidate)
        if found is not None:
            return found
    return None


def open_regular_file(path: str):
    """A regular file opened for reading; a FIFO, device or socket refused without blocking."""
    import stat

    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(0, "not a regular file (a pipe, device or socket is not read)")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


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


def parquet_samples(reader, path: str, found: bool = False) -> Iterator[Item]:
    """The rows of one Parquet file as sample items (see the module doc).

    ``reader``: the ``webdataset.SampleReader`` (carry, size limits, byte budget,
    image column); ``found``: the file came from a folder or a glob, not by name."""
    from . import console
    from .webdataset import carry_field

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
        column = image_column(names, reader.image_column)
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
                    item = None
                    row += 1
        except Exception as exc:  # noqa: BLE001 - a damaged page or row group: the rows before it stand
            yield reader.shard_error(
                path, f"cannot read this Parquet file after row {row} ({type(exc).__name__}: {exc}); "
                "the rows before it were read")


def _row_item(reader, path, row, key, value, seen, limit, carried, carry_field) -> Item:
    from .webdataset import megabytes

    ident = key if key is not None else str(row)
    name = f"{path}#{ident}" + (f"@{row}" if key is not None and key in seen else "")
    if key is not None:
        seen.add(key)
    fields: dict = {"shard": path, "key": key}
    fields.update(reader.carry_fields({c: _plain(v) for c, v in carried.items()}, {}, name))
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


__all__ = ["IMAGE_COLUMNS", "find_column", "image_column", "is_parquet_path", "parquet_samples"]
