"""Writers: one small class per output format, looked up by name in ``WRITERS``.

A record is a plain dict. Each writer writes and flushes one whole record at a
time, so a consumer reading the stream (``| jq``) or a file left behind by an
interrupted run only ever sees whole records (at most a torn last line after a
``kill -9``).

What goes into the CSV and text columns is decided by the task, through a
:class:`Schema`; JSON Lines writes the record as it is; HTML makes a contact
sheet of the records (the page itself is ``blip2cli.html``).
"""

from __future__ import annotations

import csv
import errno
import io
import json
import os
import sys
from typing import Any, Sequence

from .parquet import ParquetWriter  # its own module (pyarrow imported when used)
from .schema import Schema
from .utf8 import safe_record



_TEXT_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def escape_text(value: object) -> str:
    """Keep one record on one line: backslash-escape tabs, newlines and backslashes."""
    return ("" if value is None else str(value)).translate(_TEXT_ESCAPES)


class Writer:
    """Formats records; the sink it writes to makes each record durable as a whole."""

    format = ""
    extension = ""

    def __init__(self, stream, schema: Schema, *, header: bool = True):
        self.stream = stream
        self.schema = schema
        head = self.header() if header else ""
        if head:
            self._emit(head, record=False)  # a header is no record (a disk-full message counts records)

    def header(self) -> str:
        return ""

    def format_record(self, record: dict) -> str | None:  # pragma: no cover - abstract
        raise NotImplementedError

    def write(self, record: dict) -> None:
        text = self.format_record(safe_record(record))  # always valid UTF-8 (blip2cli.utf8)
        if text:
            self._emit(text)

    def _emit(self, text: str, *, record: bool = True) -> None:
        if hasattr(self.stream, "write_record"):
            self.stream.write_record(text) if record else self.stream.write_record(text, record=False)
        else:
            self.stream.write(text)
            self.stream.flush()

    def close(self) -> None:
        if not hasattr(self.stream, "write_record"):
            self.stream.flush()


class TextWriter(Writer):
    """``path<TAB>caption``: one line per image, for people and ``cut``/``awk``.

    Failed items are not written here (their message goes to stderr): the text
    stream holds results only. Use JSON Lines or CSV to keep error records.
    """

    format = "text"
    extension = ".txt"

    def format_record(self, record: dict) -> str | None:
        if record.get("error"):
            return None
        return "\t".join(escape_text(v) for v in self.schema.text(record)) + "\n"


class JsonlWriter(Writer):
    format = "jsonl"
    extension = ".jsonl"

    def format_record(self, record: dict) -> str:
        return json.dumps(record, ensure_ascii=False) + "\n"


# A spreadsheet takes a cell that starts with one of these as a formula (OWASP, "CSV injection").
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def neutralise_cell(value: object) -> object:
    """A text cell that a spreadsheet would run as a formula gets a leading ``'``
    (``=1+1.png`` -> ``'=1+1.png``); numbers (``-0.25``, also as text) stay as they are."""
    if isinstance(value, str) and value.startswith(FORMULA_START) and not _is_number(value):
        return "'" + value
    return value


def _is_number(text: str) -> bool:
    if text != text.strip():
        return False
    try:
        float(text)
    except ValueError:
        return False
    return True


class CsvWriter(Writer):
    """RFC 4180: a header, fields quoted where needed, CRLF line ends.

    Text cells that a spreadsheet would run as a formula (starting with ``=``, ``+``,
    ``-``, ``@``, a tab or a carriage return: file names, captions, questions, answers)
    are written with a leading ``'``, as OWASP advises, so opening the file in Excel or
    LibreOffice never runs one. ``raw=True`` writes them as they are; JSON Lines always
    does (``-f jsonl``).
    """

    format = "csv"
    extension = ".csv"

    def __init__(self, stream, schema: Schema, *, header: bool = True, raw: bool = False):
        self.raw = raw
        super().__init__(stream, schema, header=header)

    def _line(self, row: Sequence) -> str:
        buffer = io.StringIO()
        cells = ["" if v is None else v if self.raw else neutralise_cell(v) for v in row]
        csv.writer(buffer, lineterminator="\r\n").writerow(cells)
        return buffer.getvalue()

    def header(self) -> str:
        return self._line(self.schema.columns)

    def format_record(self, record: dict) -> str:
        return self._line(self.schema.row(record))


class HtmlWriter(Writer):
    """A contact sheet (``blip2cli.html``): the page head with the run's settings first,
    then one card per image, each written and flushed whole, the closing tags at
    ``close()``. A page cut after any card (an interrupted run) still shows.

    The records of one image (ask: one per question) make one card: it is written when
    it holds ``per_card`` records, or when a record of another image (or ``close()``)
    comes. Thumbnails come from ``thumbnails`` (``html.Thumbnails``, filled where the
    images are decoded), never from the records: other formats stay as they are.
    """

    format = "html"
    extension = ".html"

    def __init__(self, stream, schema: Schema, *, header: bool = True, settings: dict | None = None,
                 command: str = "", title: str | None = None, subtitle: str = "", thumbnails=None,
                 links: bool = False, root: str = ".", base: str = ".", per_card: int | None = None,
                 group: bool = True):
        from .html import Sheet

        self.sheet = Sheet(title=title or f"blip2 {command}".strip(), subtitle=subtitle, settings=settings,
                           thumbnails=thumbnails, links=links, root=root, base=base, group=group)
        self.per_card = per_card
        self._card: list[dict] = []
        super().__init__(stream, schema, header=header)

    def header(self) -> str:
        return self.sheet.head()

    def format_record(self, record: dict) -> str | None:  # cards are made in write()
        return None

    def write(self, record: dict) -> None:
        from .html import record_path

        if self._card and record_path(record) != record_path(self._card[0]):
            self._write_card()
        self._card.append(record)
        if self.per_card and len(self._card) >= self.per_card:
            self._write_card()

    def _write_card(self) -> None:
        card, self._card = self._card, []
        self._emit(self.sheet.card(card))

    def close(self) -> None:
        if self._card:
            self._write_card()
        self._emit(self.sheet.tail(), record=False)
        super().close()


WRITERS: dict[str, type[Writer]] = {w.format: w for w in (  # type: ignore[misc]
    TextWriter, JsonlWriter, CsvWriter, HtmlWriter, ParquetWriter)}
FORMATS = tuple(WRITERS)


class Sink:
    """Where formatted records go: stdout (default) or a file, as UTF-8 bytes.

    Each record is written whole, straight to the file (no buffer in between, so
    nothing is left over to fail again at ``close()``). If a write fails (disk full,
    I/O error), a file is cut back to the end of the last whole record, so what is
    left is valid output, and an :class:`OutputError` says what happened, how many
    records the file holds, and ``hint`` (what to do next: ``--resume``).
    Undecodable bytes in file names survive the round trip (surrogateescape).
    An existing image is never opened for writing (``guard.refuse_image_output``).
    """

    DEFAULT_HINT = "free some space (or fix the output), then run again"

    def __init__(self, path: str | None, *, append: bool = False, hint: str | None = None,
                 hint_params: tuple = ()):
        self.path = path if path not in (None, "-") else None
        self.append = append
        self.hint = hint or self.DEFAULT_HINT
        self.hint_params = tuple(hint_params)  # parameters the hint names (a front end respells them)
        self._fh: Any = None  # IO[bytes] once opened
        self.records = 0
        self._good = 0  # byte offset after the last whole record
        self.failed = False  # a write failed: close() stays quiet

    def open(self) -> "Sink":
        from .errors import OutputError
        from .guard import refuse_image_output

        if self.path is None:
            sys.stdout.flush()
            self._fh = sys.stdout.buffer
            return self
        refuse_image_output(self.path)
        try:
            # Unbuffered: a failed write leaves nothing behind in Python for close() to retry.
            self._fh = open(self.path, "ab" if self.append else "wb", buffering=0)
            self._good = self._fh.seek(0, os.SEEK_END)
        except OSError as exc:
            raise OutputError(
                f"cannot write the output file {self.path!r}: {exc.strerror or exc}",
                hint="check that the folder exists and is writable, or write to stdout",
            ) from exc
        return self

    def write_record(self, text: str, *, record: bool = True) -> None:
        """``record=False``: a header or a page's frame, written whole but not counted."""
        data = text.encode("utf-8", "surrogateescape")
        try:
            self._write_all(data)
            self._fh.flush()
        except BrokenPipeError:
            raise
        except OSError as exc:
            raise self._failure(exc) from exc
        self._good += len(data)
        self.records += record

    def _write_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = self._fh.write(view)
            if not isinstance(n, int):  # a stream that does not count (it took it all)
                return
            if n == 0:  # the kernel took nothing and said nothing: the disk is full
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            view = view[n:]  # a short write: the rest, or the error, comes next

    def _failure(self, exc: OSError, truncate=None):
        """The torn record cut off, and an OutputError that says what is left."""
        from .errors import OutputError

        self.failed = True
        reason = exc.strerror or str(exc)
        if self.path is None:
            return OutputError(f"cannot write to standard output: {reason}",
                               hint="check where the output goes (a full disk, a closed pipe)")
        what = f"the disk is full ({reason})" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else reason
        kept = ""
        if os.path.isfile(self.path):  # not /dev/full or a pipe: there is a file to mend
            try:
                (truncate or (lambda: self._fh.truncate(self._good)))()  # drop the torn record
                kept = f"; {self.path} holds the {self.records} whole records written before"
            except (OSError, ValueError):
                kept = f"; the last record in {self.path} may be incomplete"
        return OutputError(
            f"cannot write to {self.path}: {what}{kept}",
            hint=self.hint, params=self.hint_params,
        )

    # A plain text-stream face, for code that wants one.
    def write(self, text: str) -> None:
        self.write_record(text)

    def flush(self) -> None:
        if self._fh is not None and not self.failed:
            self._fh.flush()

    def close(self, *, quiet: bool = False) -> None:
        """``quiet``: another error is on its way out; a failure here must not hide it."""
        if self._fh is None:
            return
        fh, self._fh = self._fh, None
        try:
            if not self.failed:
                fh.flush()
            if self.path is not None:
                fh.close()
        except OSError as exc:
            if self.path is not None:
                try:
                    fh.close()
                except OSError:
                    pass
            if quiet or self.failed:
                return
            if self.path is None:
                raise
            raise self._failure(exc, truncate=lambda: os.truncate(self.path, self._good)) from exc


def make_writer(fmt: str, stream, schema: Schema, *, header: bool = True, **options) -> Writer:
    """``options``: what one format needs besides records (html: settings, thumbnails, links)."""
    return WRITERS[fmt](stream, schema, header=header, **options)


def write_records(records, fmt: str, output, schema: Schema) -> None:
    """A finished list of records (``search``, ``score``) to stdout or ``output`` in ``fmt``."""
    out = Sink(str(output) if output is not None else None)
    stream = out.open()
    try:
        writer = make_writer(fmt, stream, schema)
        for record in records:
            writer.write(record)
        writer.close()
    finally:
        out.close()
