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
import io
import json
import os
import sys
from dataclasses import dataclass
from typing import IO, Callable, Sequence


@dataclass(frozen=True)
class Schema:
    """How a task's records flatten into columns."""

    columns: Sequence[str]  # CSV header
    row: Callable[[dict], list]  # record -> CSV row (same length as columns)
    text: Callable[[dict], list]  # record -> fields of a text line (tab-joined)


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
            self._emit(head)

    def header(self) -> str:
        return ""

    def format_record(self, record: dict) -> str | None:  # pragma: no cover - abstract
        raise NotImplementedError

    def write(self, record: dict) -> None:
        text = self.format_record(record)
        if text:
            self._emit(text)

    def _emit(self, text: str) -> None:
        if hasattr(self.stream, "write_record"):
            self.stream.write_record(text)
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


class CsvWriter(Writer):
    """RFC 4180: a header, fields quoted where needed, CRLF line ends."""

    format = "csv"
    extension = ".csv"

    @staticmethod
    def _line(row: Sequence) -> str:
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\r\n").writerow(["" if v is None else v for v in row])
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
        self._emit(self.sheet.tail())
        super().close()


WRITERS: dict[str, type[Writer]] = {w.format: w for w in (TextWriter, JsonlWriter, CsvWriter, HtmlWriter)}
FORMATS = tuple(WRITERS)


class Sink:
    """Where formatted records go: stdout (default) or a file, as UTF-8 bytes.

    Each record is written and flushed whole. If a write fails (disk full, I/O
    error), a file is cut back to the end of the last whole record, so what is
    left is valid output, and an :class:`OutputError` says what happened.
    Undecodable bytes in file names survive the round trip (surrogateescape).
    """

    def __init__(self, path: str | None, *, append: bool = False):
        self.path = path if path not in (None, "-") else None
        self.append = append
        self._fh: IO[bytes] | None = None
        self.records = 0
        self._good = 0  # byte offset after the last whole record

    def open(self) -> "Sink":
        from .errors import OutputError

        if self.path is None:
            sys.stdout.flush()
            self._fh = sys.stdout.buffer
            return self
        try:
            self._fh = open(self.path, "ab" if self.append else "wb")
            self._good = self._fh.seek(0, os.SEEK_END)
        except OSError as exc:
            raise OutputError(
                f"cannot write the output file {self.path!r}: {exc.strerror or exc}",
                hint="check that the folder exists and is writable, or write to stdout",
            ) from exc
        return self

    def write_record(self, text: str) -> None:
        from .errors import OutputError

        data = text.encode("utf-8", "surrogateescape")
        try:
            self._fh.write(data)
            self._fh.flush()
        except BrokenPipeError:
            raise
        except OSError as exc:
            where = self.path or "standard output"
            kept = ""
            if self.path is not None:
                try:
                    self._fh.truncate(self._good)  # drop the torn record
                    kept = f"; {self.path} holds the {self.records} whole records written before"
                except OSError:
                    kept = f"; the last record in {self.path} may be incomplete"
            raise OutputError(
                f"cannot write to {where}: {exc.strerror or exc}{kept}",
                hint="free some space (or fix the output), then run again with --resume",
            ) from exc
        self._good += len(data)
        self.records += 1

    # A plain text-stream face, for code that wants one.
    def write(self, text: str) -> None:
        self.write_record(text)

    def flush(self) -> None:
        if self._fh is not None:
            self._fh.flush()

    def close(self) -> None:
        if self._fh is None:
            return
        try:
            self._fh.flush()
        finally:
            if self.path is not None:
                self._fh.close()
            self._fh = None


def make_writer(fmt: str, stream, schema: Schema, *, header: bool = True, **options) -> Writer:
    """``options``: what one format needs besides records (html: settings, thumbnails, links)."""
    return WRITERS[fmt](stream, schema, header=header, **options)
