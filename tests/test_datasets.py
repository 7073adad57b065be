"""Dataset-scale inputs and outputs (issue 12), read back with the real clients:
Parquet (pyarrow, pandas, DuckDB, datasets), valid UTF-8 (pandas, DuckDB), the
Hugging Face imagefolder metadata (datasets), trainer sidecars (kohya's way of
reading a folder), --failed-list, WebDataset tar shards (tarfile).

Everything runs through the CLI on the tiny checkpoints."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import sys
from pathlib import Path

import pytest


from helpers import FAST, cli

IMAGES = ["chelsea.png", "coffee.png", "sub/astronaut.png", "sub/rocket.jpg"]


def jsonl(text: str) -> list[dict]:
    return [json.loads(l) for l in text.splitlines() if l.strip()]


# -- Parquet -----------------------------------------------------------------------
def test_caption_parquet_typed_columns_read_by_pyarrow_pandas_duckdb_datasets(tiny_opt, photos, tmp_path):
    import duckdb
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = tmp_path / "caps.parquet"
    res = cli("caption", photos, "--model", tiny_opt, "-o", out, "--num-captions", "2", "--max-new-tokens", "5", "--num-beams", "2")
    assert res.exit_code == 0, res.output
    assert out.read_bytes()[:4] == b"PAR1"
    table = pq.read_table(out)
    assert table.schema.field("captions").type == pa.list_(pa.string())
    assert table.schema.field("caption").type == pa.string()
    rows = table.to_pylist()
    assert [os.path.relpath(r["path"], photos) for r in rows] == IMAGES
    assert all(len(r["captions"]) == 2 and r["caption"] == r["captions"][0] for r in rows)
    assert json.loads(rows[0]["generation"])["num_captions"] == 2  # nested settings: JSON text

    # The same records as JSON Lines.
    ref = jsonl(cli("caption", photos, "--model", tiny_opt, "-f", "jsonl", "--num-captions", "2", "--max-new-tokens", "5", "--num-beams", "2").stdout)
    assert [r["captions"] for r in rows] == [r["captions"] for r in ref]

    frame = __import__("pandas").read_parquet(out)
    assert list(frame["caption"]) == [r["caption"] for r in ref]
    assert duckdb.sql(f"select count(*), count(caption) from '{out}'").fetchall() == [(4, 4)]
    from datasets import load_dataset

    ds = load_dataset("parquet", data_files=str(out), split="train")
    assert ds[0]["captions"] == ref[0]["captions"]


def test_ask_parquet_answers_list(tiny_opt, photos, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = tmp_path / "qa.parquet"
    res = cli("ask", photos / "chelsea.png", "-q", "what is it?", "-q", "what colour?", "--model", tiny_opt,
              "-o", out, "--num-answers", "2", "--max-new-tokens", "5", "--num-beams", "2")
    assert res.exit_code == 0, res.output
    table = pq.read_table(out)
    assert table.schema.field("answers").type == pa.list_(pa.string())
    assert [r["question"] for r in table.to_pylist()] == ["what is it?", "what colour?"]


def test_embed_parquet_vectors_are_fixed_size_float32(tiny_itm, photos, tmp_path):
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = tmp_path / "vec.parquet"
    res = cli("embed", photos, "--model", tiny_itm, "-o", out)
    assert res.exit_code == 0, res.output
    ref = jsonl(cli("embed", photos, "--model", tiny_itm).stdout)
    table = pq.read_table(out)
    size = len(ref[0]["vector"])
    assert table.schema.field("vector").type == pa.list_(pa.float32(), size)
    matrix = np.stack(table.column("vector").to_numpy(zero_copy_only=False))
    assert matrix.shape == (4, size)
    np.testing.assert_allclose(matrix, np.array([r["vector"] for r in ref], dtype=np.float32), rtol=1e-6)


def test_parquet_interrupted_run_keeps_the_row_groups_written(tiny_opt, photos, tmp_path, monkeypatch):
    """Ctrl-C after the 3rd image, row groups of at most 2: the file is valid Parquet with
    every finished record (issue 19, #5: finished records survive any stop)."""
    import pyarrow.parquet as pq

    from blip2cli import caption as caption_core
    from blip2cli.parquet import ParquetWriter

    monkeypatch.setattr(ParquetWriter, "ROWS", 2)
    real = caption_core.CaptionTask.record
    seen = []

    def record(self, item, result, error):
        seen.append(item.name)
        if len(seen) == 4:
            raise KeyboardInterrupt
        return real(self, item, result, error)

    monkeypatch.setattr(caption_core.CaptionTask, "record", record)
    out = tmp_path / "cut.parquet"
    res = cli("caption", photos, "--model", tiny_opt, "-o", out, "-b", "1", *FAST)
    assert res.exit_code == 130, res.output
    table = pq.read_table(out)  # valid: the footer of the groups so far is there
    assert table.num_rows == 3
    assert pq.ParquetFile(out).metadata.num_row_groups == 2  # the first record alone, then 2
    assert [os.path.relpath(p, photos) for p in table.column("path").to_pylist()] == IMAGES[:3]


def test_parquet_row_groups_stream_and_every_prefix_is_a_valid_file(tmp_path):
    """The writer on its own: after each group the file on disk reads back whole."""
    import pyarrow.parquet as pq

    from blip2cli.parquet import ParquetWriter
    from blip2cli.writers import Sink

    path = tmp_path / "s.parquet"
    sink = Sink(str(path)).open()
    writer = ParquetWriter(sink, None, rows=3)
    for i in range(10):
        writer.write({"path": f"p{i}", "caption": f"c{i}", "captions": [f"c{i}"], "error": None,
                      "model": "m", "generation": {"seed": None}})
        if (i + 1) % 3 == 0:
            assert pq.read_table(path).num_rows == i + 1  # readable while the run goes on
    writer.close()
    sink.close()
    table = pq.read_table(path)
    assert table.column("path").to_pylist() == [f"p{i}" for i in range(10)]
    assert pq.ParquetFile(path).metadata.num_row_groups == 5  # 1, 2, then groups of 3 (rows), 1


def test_parquet_without_pyarrow_names_the_extra(tiny_opt, photos, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    res = cli("caption", photos, "--model", tiny_opt, "-o", tmp_path / "x.parquet", *FAST)
    assert res.exit_code == 2
    assert "pip install 'blip2-cli[parquet]'" in res.output
    assert not (tmp_path / "x.parquet").exists()


def test_parquet_to_stdout_is_refused(tiny_opt, photos):
    res = cli("caption", photos, "--model", tiny_opt, "-f", "parquet", *FAST)
    assert res.exit_code == 2
    assert "-o results.parquet" in res.output


@pytest.mark.parametrize("name", ["x.json", "x.xlsx", "x.jsonl.gz"])
def test_an_output_extension_blip2_does_not_write_is_refused(tiny_opt, photos, tmp_path, name):
    res = cli("caption", photos, "--model", tiny_opt, "-o", tmp_path / name, *FAST)
    assert res.exit_code == 2, res.output
    assert "does not write" in res.output and ".jsonl" in res.output and ".parquet" in res.output
    assert not (tmp_path / name).exists()


def test_embed_refuses_an_extension_it_does_not_write(tiny_itm, photos, tmp_path):
    res = cli("embed", photos, "--model", tiny_itm, "-o", tmp_path / "v.json")
    assert res.exit_code == 2, res.output
    assert ".parquet" in res.output and ".txt" not in res.output


def test_format_given_explicitly_allows_any_name(tiny_opt, photos, tmp_path):
    out = tmp_path / "x.json"
    res = cli("caption", photos, "--model", tiny_opt, "-f", "jsonl", "-o", out, *FAST)
    assert res.exit_code == 0, res.output
    assert len(jsonl(out.read_text())) == 4


# -- always valid UTF-8 --------------------------------------------------------------
@pytest.fixture
def bad_name(tmp_path, example_images):
    """photos/ with caf\\xe9.png (Latin-1, not valid UTF-8) and ok.png."""
    root = tmp_path / "latin"
    root.mkdir()
    raw = os.fsencode(str(root)) + b"/caf\xe9.png"
    shutil.copy(example_images[0], raw)
    shutil.copy(example_images[1], root / "ok.png")
    return root, raw


def test_undecodable_path_jsonl_is_utf8_and_the_bytes_come_back(tiny_opt, bad_name, tmp_path):
    import duckdb
    import pandas as pd

    from blip2cli.utf8 import original_path

    root, raw = bad_name
    out = tmp_path / "out.jsonl"
    res = cli("caption", root, "--model", tiny_opt, "-o", out, *FAST)
    assert res.exit_code == 0, res.output
    out.read_bytes().decode("utf-8")  # strict: valid UTF-8
    frame = pd.read_json(out, lines=True)
    assert len(frame) == 2
    assert duckdb.sql(f"select count(*) from read_json_auto('{out}')").fetchall() == [(2,)]
    records = jsonl(out.read_text(encoding="utf-8"))
    bad = next(r for r in records if "path_bytes" in r)
    assert bad["path"].endswith("caf\ufffd.png")
    assert base64.b64decode(bad["path_bytes"]) == raw
    assert os.path.exists(original_path(bad))
    assert "path_bytes" not in next(r for r in records if r is not bad)


def test_undecodable_path_csv_and_parquet_are_utf8(tiny_opt, bad_name, tmp_path):
    import duckdb
    import pandas as pd
    import pyarrow.parquet as pq

    root, raw = bad_name
    csv_out = tmp_path / "out.csv"
    assert cli("caption", root, "--model", tiny_opt, "-o", csv_out, *FAST).exit_code == 0
    frame = pd.read_csv(csv_out, encoding="utf-8")
    assert any(p.endswith("caf\ufffd.png") for p in frame["path"])
    assert duckdb.sql(f"select count(*) from read_csv_auto('{csv_out}')").fetchall() == [(2,)]
    pq_out = tmp_path / "out.parquet"
    assert cli("caption", root, "--model", tiny_opt, "-o", pq_out, *FAST).exit_code == 0
    rows = pq.read_table(pq_out).to_pylist()
    bad = next(r for r in rows if r["path_bytes"])
    assert base64.b64decode(bad["path_bytes"]) == raw


def test_resume_finds_an_undecodable_path_done(tiny_opt, bad_name, tmp_path):
    root, _ = bad_name
    out = tmp_path / "out.jsonl"
    assert cli("caption", root, "--model", tiny_opt, "-o", out, *FAST).exit_code == 0
    res = cli("caption", root, "--model", tiny_opt, "-o", out, "--resume", *FAST)
    assert res.exit_code == 0, res.output
    assert "nothing left to do" in res.output
    assert len(jsonl(out.read_text())) == 2


# -- Hugging Face imagefolder ----------------------------------------------------------
@pytest.fixture
def with_bad_image(photos):
    (photos / "sub" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return photos


def test_metadata_jsonl_loads_as_an_imagefolder(tiny_opt, with_bad_image, tmp_path):
    from datasets import load_dataset

    photos = with_bad_image
    res = cli("caption", photos, "--model", tiny_opt, "--metadata", "-o", tmp_path / "all.jsonl", *FAST)
    assert res.exit_code == 1, res.output  # one image failed
    assert "1 that failed left out" in res.output
    lines = jsonl((photos / "metadata.jsonl").read_text(encoding="utf-8"))
    assert [l["file_name"] for l in lines] == IMAGES  # relative to DIR, broken.png left out
    records = {os.path.relpath(r["path"], photos): r for r in jsonl((tmp_path / "all.jsonl").read_text())}
    assert all(l["caption"] == records[l["file_name"]]["caption"] for l in lines)
    assert not [p for p in os.listdir(photos) if p.startswith(".blip2-")]  # no temporary file left

    (photos / "sub" / "broken.png").unlink()  # the dataset loader reads every image it finds
    ds = load_dataset("imagefolder", data_dir=str(photos), split="train")
    assert ds.num_rows == 4
    assert sorted(ds["caption"]) == sorted(l["caption"] for l in lines)
    assert ds[0]["image"].size[0] > 0


@pytest.mark.parametrize("kind", ["csv", "parquet"])
def test_metadata_csv_and_parquet_load_as_an_imagefolder(tiny_opt, photos, kind):
    from datasets import load_dataset

    res = cli("caption", photos, "--model", tiny_opt, "--metadata", "--metadata-format", kind, *FAST)
    assert res.exit_code == 0, res.output
    assert (photos / f"metadata.{kind}").exists() and not (photos / "metadata.jsonl").exists()
    ds = load_dataset("imagefolder", data_dir=str(photos), split="train")
    assert ds.num_rows == 4 and all(ds["caption"])


def test_metadata_needs_one_folder(tiny_opt, photos):
    res = cli("caption", photos / "chelsea.png", "--model", tiny_opt, "--metadata", *FAST)
    assert res.exit_code == 2 and "one folder" in res.output
    res = cli("caption", photos, "--model", tiny_opt, "--metadata-format", "csv", *FAST)
    assert res.exit_code == 2 and "--metadata" in res.output


def test_metadata_of_an_interrupted_run_is_not_written(tiny_opt, photos, monkeypatch):
    from blip2cli import caption as caption_core

    real = caption_core.CaptionTask.record
    seen = []

    def record(self, item, result, error):
        seen.append(item.name)
        if len(seen) == 3:
            raise KeyboardInterrupt
        return real(self, item, result, error)

    monkeypatch.setattr(caption_core.CaptionTask, "record", record)
    (photos / "metadata.jsonl").write_text('{"file_name": "chelsea.png", "caption": "old"}\n')
    res = cli("caption", photos, "--model", tiny_opt, "--metadata", "-b", "1", *FAST)
    assert res.exit_code == 130
    assert jsonl((photos / "metadata.jsonl").read_text()) == [{"file_name": "chelsea.png", "caption": "old"}]


# -- sidecars for trainers -----------------------------------------------------------
def kohya_read(folder: Path, ext: str) -> dict:
    """What kohya's merge_captions_to_metadata.py does: glob the images, read each
    image's caption file (image path with the caption extension); a missing one is an error."""
    out = {}
    for image in sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp")):
        caption_path = image.with_suffix(ext)
        with open(caption_path, encoding="utf-8") as fh:  # kohya: FileNotFoundError for a missing one
            out[image.relative_to(folder).as_posix()] = fh.readlines()[0].strip()
    return out


def test_kohya_caption_sidecars_and_failed_list(tiny_opt, with_bad_image, tmp_path):
    photos = with_bad_image
    failed = tmp_path / "failed.txt"
    res = cli("caption", photos, "--model", tiny_opt, "--sidecar", "--sidecar-ext", ".caption",
              "--failed-list", failed, "-f", "jsonl", *FAST)
    assert res.exit_code == 1, res.output
    assert failed.read_text().splitlines() == [str(photos / "sub" / "broken.png")]
    # Moved aside as the README says (xargs mv), the folder reads back the kohya way.
    rejected = tmp_path / "rejected"
    rejected.mkdir()
    for line in failed.read_text().splitlines():
        shutil.move(line, rejected)
    got = kohya_read(photos, ".caption")
    records = {os.path.relpath(r["path"], photos): r for r in jsonl(res.stdout) if not r["error"]}
    assert got == {name: records[name]["caption"] for name in IMAGES}
    assert not list(photos.rglob("*.txt"))


def test_onetrainer_txt_append_keeps_the_tags(tiny_opt, photos):
    (photos / "chelsea.txt").write_text("cat, tabby\n")
    res = cli("caption", photos, "--model", tiny_opt, "--sidecar", "--existing", "append", "-f", "jsonl", *FAST)
    assert res.exit_code == 0, res.output
    caption = next(r["caption"] for r in jsonl(res.stdout) if r["path"].endswith("chelsea.png"))
    assert (photos / "chelsea.txt").read_text() == f"cat, tabby, {caption}\n"
    assert set(kohya_read(photos, ".txt")) == set(IMAGES)


def test_failed_list_nul_separated_for_ask(tiny_opt, with_bad_image, tmp_path):
    failed = tmp_path / "failed.bin"
    res = cli("ask", with_bad_image, "-q", "a?", "-q", "b?", "--model", tiny_opt, "--failed-list", failed, "-0",
              "-f", "jsonl", *FAST)
    assert res.exit_code == 1, res.output
    assert failed.read_bytes() == os.fsencode(str(with_bad_image / "sub" / "broken.png")) + b"\0"


def test_failed_list_empty_when_nothing_failed_embed(tiny_itm, photos, tmp_path):
    failed = tmp_path / "failed.txt"
    failed.write_text("stale\n")
    res = cli("embed", photos, "--model", tiny_itm, "--failed-list", failed)
    assert res.exit_code == 0, res.output
    assert failed.read_bytes() == b""


@pytest.mark.parametrize("ext", [".txt,.caption", "a/b", ".", "..", ".txt .caption", "*.txt", ".tx;t"])
def test_sidecar_ext_must_be_one_extension(tiny_opt, photos, ext):
    res = cli("caption", photos, "--model", tiny_opt, "--sidecar", "--sidecar-ext", ext, *FAST)
    assert res.exit_code == 2, res.output
    assert "one file extension" in res.output
    assert not [p for p in photos.rglob("*") if p.is_file() and p.suffix not in (".png", ".jpg")]


@pytest.mark.parametrize("option", [["--sidecar-ext", ".caption"], ["--separator", " | "], ["--existing", "skip"],
                                    ["--existing", "append"], ["--prefix", "sks "], ["--suffix", "!"],
                                    ["--sidecar-ext", ".txt"]])
@pytest.mark.parametrize("command", ["caption", "ask"])
def test_sidecar_options_without_sidecar_are_refused(tiny_opt, photos, option, command):
    question = ["-q", "what?"] if command == "ask" else []
    res = cli(command, photos, *question, "--model", tiny_opt, *option, *FAST)
    assert res.exit_code == 2, res.output
    assert f"{option[0]} applies to sidecar files" in res.output
    assert "--sidecar" in res.output


def test_search_and_score_write_parquet(tiny_itm, photos, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = tmp_path / "hits.parquet"
    res = cli("search", "a cat", photos, "--model", tiny_itm, "-o", out)
    assert res.exit_code == 0, res.output
    table = pq.read_table(out)
    assert table.num_rows == 4 and table.schema.field("rank").type == pa.int64()
    assert table.column("rank").to_pylist() == [1, 2, 3, 4]
    out = tmp_path / "scores.parquet"
    res = cli("score", photos / "chelsea.png", "a cat", "a dog", "--model", tiny_itm, "-o", out)
    assert res.exit_code == 0, res.output
    assert pq.read_table(out).column("text").to_pylist() == ["a cat", "a dog"]
