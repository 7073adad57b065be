"""A Parquet output survives any stop (issue 19, #5): valid from the moment it is
opened, the first row group right after the first good record, small groups early,
and the buffer written as a last group when an interrupted run closes its sink."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

pq = pytest.importorskip("pyarrow.parquet")

ROOT = Path(__file__).resolve().parents[1]


def record(i: int, error: str | None = None) -> dict:
    return {"path": f"p{i}.jpg", "caption": None if error else f"c{i}", "captions": [] if error else [f"c{i}"],
            "error": error, "model": "m", "generation": {"num_beams": 5}}


def open_writer(path, **kwargs):
    from blip2cli.caption import caption_schema
    from blip2cli.parquet import ParquetWriter
    from blip2cli.writers import Sink

    sink = Sink(str(path)).open()
    return sink, ParquetWriter(sink, caption_schema(1), **kwargs)


def test_the_file_is_valid_before_the_first_record(tmp_path):
    path = tmp_path / "out.parquet"
    sink, writer = open_writer(path)
    table = pq.read_table(path)  # what a kill -9 here leaves
    assert table.num_rows == 0 and table.schema.names[:2] == ["path", "path_bytes"]
    writer.write(record(0))
    assert pq.read_table(path).column("caption").to_pylist() == ["c0"]  # the first group at once
    writer.close()
    sink.close()
    assert pq.read_table(path).num_rows == 1


def test_an_interrupted_run_keeps_the_buffered_records(tmp_path):
    path = tmp_path / "out.parquet"
    sink, writer = open_writer(path)
    for i in range(6):  # groups: [0], [1, 2], then 3..5 wait for a group of 4
        writer.write(record(i))
    assert pq.read_table(path).num_rows == 3
    sink.close(quiet=True)  # what the runner does on Ctrl-C / SIGTERM: the writer is not closed
    table = pq.read_table(path)
    assert table.column("path").to_pylist() == [f"p{i}.jpg" for i in range(6)]


def test_the_first_group_waits_for_a_good_record_to_type_the_columns(tmp_path):
    path = tmp_path / "out.parquet"
    sink, writer = open_writer(path)
    writer.write({**record(0, "broken"), "vector": None})
    assert pq.read_table(path).num_rows == 0
    writer.write({**record(1), "vector": [0.5, 0.25]})
    table = pq.read_table(path)  # readable: the error row's vector is 2 nulls, not a null list
    import pyarrow as pa

    assert table.num_rows == 2 and table.schema.field("vector").type == pa.list_(pa.float32(), 2)
    assert table.column("vector").to_pylist() == [[None, None], [0.5, 0.25]]
    writer.close()
    sink.close()


KILLED = r'''
import os, signal, sys
sys.path.insert(0, sys.argv[2])
from blip2cli.caption import caption_schema
from blip2cli.parquet import ParquetWriter
from blip2cli.writers import Sink

sink = Sink(sys.argv[1]).open()
writer = ParquetWriter(sink, caption_schema(1))
for i in range(int(sys.argv[3])):
    writer.write({"path": f"p{i}.jpg", "caption": f"c{i}", "captions": [f"c{i}"], "error": None})
os.kill(os.getpid(), signal.SIGKILL)
'''


@pytest.mark.parametrize("records, kept", [(0, 0), (1, 1), (5, 3)])
def test_kill_9_leaves_a_valid_file_with_the_groups_written(tmp_path, records, kept):
    path = tmp_path / "killed.parquet"
    proc = subprocess.run([sys.executable, "-c", KILLED, str(path), str(ROOT), str(records)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    table = pq.read_table(path)
    assert table.column("path").to_pylist() == [f"p{i}.jpg" for i in range(kept)]


def test_an_embed_run_with_a_bad_image_is_readable(tiny_itm, example_images, tmp_path):
    """A null fixed-size vector cannot be read back from Parquet: an error row holds nulls."""
    from typer.testing import CliRunner

    from blip2cli.cli import app

    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    out = tmp_path / "vec.parquet"
    result = CliRunner().invoke(app, ["embed", str(example_images[0]), str(bad), "--model", str(tiny_itm),
                                      "--pool", "mean", "-o", str(out)])
    assert result.exit_code == 1, result.output
    table = pq.read_table(out)
    vectors, errors = table.column("vector").to_pylist(), table.column("error").to_pylist()
    assert errors[0] is None and None not in vectors[0]
    assert errors[1] and vectors[1] == [None] * len(vectors[0])


def test_a_full_disk_at_the_first_group_leaves_a_valid_empty_file(tmp_path, monkeypatch):
    import errno

    from blip2cli.errors import OutputError
    from blip2cli.parquet import ParquetWriter

    path = tmp_path / "full.parquet"
    sink, writer = open_writer(path)
    real = ParquetWriter._write_at
    failed = []

    def full(self, offset, data):
        if not failed:  # the group's data and footer; the footer put back after it goes through
            failed.append(True)
            self.fh.seek(offset)
            self.fh.write(bytes(data[:100]))  # a torn write, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, offset, data)

    monkeypatch.setattr(ParquetWriter, "_write_at", full)
    with pytest.raises(OutputError, match="holds the 0 records"):
        writer.write(record(0))
    sink.close(quiet=True)
    assert pq.read_table(path).num_rows == 0  # the empty file it was, not 4 bytes
