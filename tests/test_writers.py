"""Writers: whole records, flushed one at a time; CSV and text round trips."""

from __future__ import annotations

import csv
import io
import json

import pytest

from blip2cli.caption import caption_record, caption_schema
from blip2cli.writers import WRITERS, Sink, escape_text, make_writer

NASTY = ['photos/a, b "c".jpg', "new\nline.jpg", "tab\there.jpg", "ünï cödé 猫.png", "back\\slash.jpg"]


class CountingStream(io.StringIO):
    def __init__(self):
        super().__init__()
        self.flushes = []

    def flush(self):
        self.flushes.append(self.getvalue())
        super().flush()


def records():
    out = [caption_record(p, [f"a caption for {p}", "second, \"quoted\"\nline"], None) for p in NASTY]
    out.append(caption_record("broken.jpg", None, "truncated JPEG"))
    return out


def test_writers_keyed_by_format():
    assert set(WRITERS) == {"text", "jsonl", "csv", "html", "parquet"}
    assert all(w.format == name for name, w in WRITERS.items())


def test_csv_round_trips_through_pythons_csv_module():
    stream = io.StringIO()
    writer = make_writer("csv", stream, caption_schema(2))
    for r in records():
        writer.write(r)
    rows = list(csv.reader(io.StringIO(stream.getvalue(), newline="")))
    assert rows[0] == ["path", "caption", "caption_2", "error"]
    assert [r[0] for r in rows[1:]] == NASTY + ["broken.jpg"]
    assert rows[1][2] == "second, \"quoted\"\nline"
    assert rows[-1] == ["broken.jpg", "", "", "truncated JPEG"]
    assert "\r\n" in stream.getvalue()  # RFC 4180 line ends


def test_jsonl_one_object_per_line_with_error_field():
    stream = io.StringIO()
    writer = make_writer("jsonl", stream, caption_schema(1))
    for r in records():
        writer.write(r)
    lines = stream.getvalue().splitlines()
    assert len(lines) == len(NASTY) + 1
    parsed = [json.loads(line) for line in lines]
    assert [p["path"] for p in parsed] == NASTY + ["broken.jpg"]
    assert parsed[0]["error"] is None and parsed[0]["caption"] == parsed[0]["captions"][0]
    assert parsed[-1] == {"path": "broken.jpg", "caption": None, "captions": [], "error": "truncated JPEG"}


def test_text_one_line_per_image_escaped_and_errors_left_to_stderr():
    stream = io.StringIO()
    writer = make_writer("text", stream, caption_schema(1))
    for r in records():
        writer.write(r)
    lines = stream.getvalue().split("\n")
    assert lines[-1] == ""
    lines = lines[:-1]
    assert len(lines) == len(NASTY)  # the failed one is not a caption line
    assert all(line.count("\t") == 1 for line in lines)
    assert lines[1].startswith("new\\nline.jpg\t")
    assert lines[2].startswith("tab\\there.jpg\t")
    assert lines[4].startswith("back\\\\slash.jpg\t")
    assert escape_text("a\tb\nc\\") == "a\\tb\\nc\\\\"


@pytest.mark.parametrize("fmt", ["text", "jsonl", "csv"])
def test_each_record_is_flushed_whole(fmt):
    stream = CountingStream()
    writer = make_writer(fmt, stream, caption_schema(1))
    before = len(stream.flushes)
    for i, r in enumerate(records()[:3]):
        writer.write(r)
        # after every write, what has been flushed ends on a record boundary
        assert len(stream.flushes) > before + i
        assert stream.flushes[-1].endswith("\n")


def test_output_file_and_unwritable_path(tmp_path):
    from blip2cli.errors import OutputError

    out = Sink(str(tmp_path / "x.jsonl"))
    stream = out.open()
    stream.write("surrogate \udcff kept\n")
    out.close()
    assert (tmp_path / "x.jsonl").read_bytes() == b"surrogate \xff kept\n"
    with pytest.raises(OutputError, match="cannot write"):
        Sink(str(tmp_path / "no" / "such" / "dir.jsonl")).open()
