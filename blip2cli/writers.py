"""Writers: one small class per output format, looked up by name in ``WRITERS``.

A record is a plain dict. Each writer writes and flushes one whole record at a
time, so a consumer reading the stream (``| jq``) or a file left behind by an
interrupted run only ever sees whole records (at most a torn last line after a
``kill -9``).

What goes into the CSV and text columns is decided by the task, through a
:class:`Schema`; JSON Lines writes the record as it is.
"""

from __future__ import annotations

import csv
import io
import json
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
    format = ""
    extension = ""

    def __init__(self, stream: IO[str], schema: Schema):
        self.stream = stream
        self.schema = schema

    def write(self, record: dict) -> None:
        self._write(record)
        self.stream.flush()

    def _write(self, record: dict) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def close(self) -> None:
        self.stream.flush()


class TextWriter(Writer):
    """``path<TAB>caption``: one line per image, for people and ``cut``/``awk``.

    Failed items are not written here (their message goes to stderr): the text
    stream holds results only. Use JSON Lines or CSV to keep error records.
    """

    format = "text"
    extension = ".txt"

    def _write(self, record: dict) -> None:
        if record.get("error"):
            return
        self.stream.write("\t".join(escape_text(v) for v in self.schema.text(record)) + "\n")


class JsonlWriter(Writer):
    format = "jsonl"
    extension = ".jsonl"

    def _write(self, record: dict) -> None:
        self.stream.write(json.dumps(record, ensure_ascii=False) + "\n")


class CsvWriter(Writer):
    """RFC 4180: a header, fields quoted where needed, CRLF line ends."""

    format = "csv"
    extension = ".csv"

    def __init__(self, stream: IO[str], schema: Schema):
        super().__init__(stream, schema)
        self._csv = csv.writer(stream, lineterminator="\r\n")
        self._csv.writerow(schema.columns)
        self.stream.flush()

    def _write(self, record: dict) -> None:
        self._csv.writerow(["" if v is None else v for v in self.schema.row(record)])


WRITERS: dict[str, type[Writer]] = {w.format: w for w in (TextWriter, JsonlWriter, CsvWriter)}
FORMATS = tuple(WRITERS)


class Output:
    """Where records go: stdout (default) or a file, as UTF-8.

    Undecodable bytes in file names survive the round trip (surrogateescape)
    instead of crashing the run on its last step.
    """

    def __init__(self, path: str | None):
        self.path = path if path not in (None, "-") else None
        self.stream: IO[str] | None = None

    def open(self) -> IO[str]:
        from .errors import OutputError

        if self.path is None:
            sys.stdout.flush()
            buffer = sys.stdout.buffer
            self.stream = io.TextIOWrapper(
                buffer, encoding="utf-8", errors="surrogateescape", newline="", write_through=True
            )
        else:
            try:
                self.stream = open(
                    self.path, "w", encoding="utf-8", errors="surrogateescape", newline=""
                )
            except OSError as exc:
                raise OutputError(
                    f"cannot write the output file {self.path!r}: {exc.strerror or exc}",
                    hint="check that the folder exists and is writable, or write to stdout",
                ) from exc
        return self.stream

    def close(self) -> None:
        if self.stream is None:
            return
        try:
            self.stream.flush()
        finally:
            if self.path is None:
                self.stream.detach()  # leave sys.stdout itself open
            else:
                self.stream.close()
            self.stream = None


def make_writer(fmt: str, stream: IO[str], schema: Schema) -> Writer:
    return WRITERS[fmt](stream, schema)
