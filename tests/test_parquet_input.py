"""img2dataset's Parquet output as input (issue 20 item 3): rows with image bytes read row by
row, records with shard/key/--carry (a clashing column under source_NAME), broken rows as
error records, -o DIR/ one output per file (resumable), merge over it.

Everything runs through the CLI on the tiny checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from blip2cli.cli import app
from blip2cli.webdataset import SampleReader

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

runner = CliRunner()
FAST = ["--max-new-tokens", "3", "--num-beams", "1"]


def cli(*args, input=None):
    return runner.invoke(app, [*map(str, args)], input=input)


def jsonl(text: str) -> list[dict]:
    return [json.loads(l) for l in text.splitlines() if l.strip()]


def write_parquet(path: Path, rows: list[dict], row_group_size: int = 2) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=row_group_size)
    return path


@pytest.fixture
def pics(example_images) -> list[bytes]:
    return [p.read_bytes() for p in example_images]  # png, png, png, jpg


@pytest.fixture
def pq_dir(tmp_path, pics) -> Path:
    """img2dataset-style: key, caption, url, jpg bytes; 00000 holds a broken and a null row."""
    root = tmp_path / "pq_out"
    rows0 = [{"key": f"0000000{i}", "caption": f"alt {i}", "url": f"http://x/{i}.jpg", "jpg": pics[i],
              "status": "success"} for i in range(3)]
    rows0.append({"key": "00000003", "caption": "broken", "url": "http://x/3", "jpg": b"not an image",
                  "status": "success"})
    rows0.append({"key": "00000004", "caption": None, "url": "http://x/4", "jpg": None, "status": "failed"})
    write_parquet(root / "00000.parquet", rows0)
    write_parquet(root / "00001.parquet", [{"key": "00010000", "caption": "alt 10", "url": "http://x/10",
                                            "jpg": pics[3], "status": "success"}])
    (root / "00000_stats.json").write_text("{}")  # img2dataset writes these beside
    return root


def test_rows_stream_as_samples_with_key_and_carried_columns(pq_dir, pics):
    reader = SampleReader(carry=("caption", "url"))
    items = list(reader.samples(str(pq_dir / "00000.parquet")))
    assert [i.name for i in items] == [f"{pq_dir}/00000.parquet#0000000{i}" for i in range(5)]
    assert items[0].source == pics[0]
    assert items[0].fields == {"shard": f"{pq_dir}/00000.parquet", "key": "00000000",
                               "source_caption": "alt 0", "url": "http://x/0.jpg", "carry_error": None}
    assert items[4].error and "null" in items[4].error


def test_caption_parquet_folder_carries_columns_and_broken_rows_are_errors(tiny_opt, pq_dir, example_images):
    res = cli("caption", pq_dir, "--model", tiny_opt, *FAST, "-f", "jsonl", "--carry", "caption,url")
    assert res.exit_code == 1, res.output
    recs = jsonl(res.stdout)
    assert [r["key"] for r in recs] == ["00000000", "00000001", "00000002", "00000003", "00000004", "00010000"]
    assert [bool(r["error"]) for r in recs] == [False, False, False, True, True, False]
    assert recs[0]["source_caption"] == "alt 0" and recs[0]["url"] == "http://x/0.jpg"
    assert recs[0]["path"] == f"{pq_dir}/00000.parquet#00000000" and recs[0]["shard"] == f"{pq_dir}/00000.parquet"
    assert recs[0]["carry"] == ["source_caption", "url"]
    # the same captions as from the image files
    files = cli("caption", *example_images, "--model", tiny_opt, *FAST, "-f", "jsonl")
    by_file = [r["caption"] for r in jsonl(files.stdout)]
    assert [r["caption"] for r in recs if not r["error"]] == by_file


def test_no_key_column_names_rows_by_number_and_repeated_keys_are_unique(tmp_path, pics):
    path = write_parquet(tmp_path / "nokey.parquet", [{"image": pics[0]}, {"image": pics[1]}])
    items = list(SampleReader().samples(str(path)))
    assert [i.name for i in items] == [f"{path}#0", f"{path}#1"] and items[0].fields["key"] is None
    path = write_parquet(tmp_path / "rep.parquet", [{"key": "a", "png": pics[0]}, {"key": "b", "png": pics[1]},
                                                    {"key": "a", "png": pics[2]}])
    names = [i.name for i in SampleReader().samples(str(path))]
    assert names == [f"{path}#a", f"{path}#b", f"{path}#a@2"]


def test_image_column_option_and_files_without_one(tiny_opt, tmp_path, pics):
    path = write_parquet(tmp_path / "custom.parquet", [{"key": "k", "pixels_blob": pics[0]}])
    res = cli("caption", path, "--model", tiny_opt, *FAST, "-f", "jsonl")  # named: no image column
    assert res.exit_code == 1 and "--image-column" in jsonl(res.stdout)[0]["error"]
    res = cli("caption", path, "--model", tiny_opt, *FAST, "-f", "jsonl", "--image-column", "pixels_blob")
    assert res.exit_code == 0, res.output
    assert jsonl(res.stdout)[0]["key"] == "k" and jsonl(res.stdout)[0]["caption"]
    # in a folder, a binary column of another name: left out with a note; nothing else -> exit 2
    only = tmp_path / "only"
    write_parquet(only / "blobs.parquet", [{"key": "k", "pixels_blob": pics[0]}])
    res = cli("caption", only, "--model", tiny_opt, *FAST, "-f", "jsonl")
    assert res.exit_code == 2, res.output
    assert "no images found" in res.stderr and "left out" in res.stderr


def test_blip2s_own_parquet_outputs_beside_the_images_are_not_inputs(tiny_opt, tiny_itm, tmp_path, example_images):
    """captions.parquet or an imagefolder metadata.parquet in the photo folder (no binary column):
    not a shard file, so --metadata and vector stores still work on that folder."""
    import shutil

    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(example_images[0], photos / "a.png")
    write_parquet(photos / "captions.parquet", [{"path": "a.png", "caption": "x", "error": None}])
    write_parquet(photos / "metadata.parquet", [{"file_name": "a.png", "text": "x"}])
    res = cli("caption", photos, "--model", tiny_opt, *FAST, "-f", "jsonl")
    assert res.exit_code == 0, res.output
    assert [r["path"] for r in jsonl(res.stdout)] == [str(photos / "a.png")]
    res = cli("embed", photos, "--model", tiny_itm, "-o", tmp_path / "v.safetensors")
    assert res.exit_code == 0, res.output


def test_truncated_parquet_file_is_an_error_record(tiny_opt, tmp_path, pics):
    good = write_parquet(tmp_path / "good.parquet", [{"jpg": pics[i]} for i in range(3)])
    cut = tmp_path / "cut.parquet"
    cut.write_bytes(good.read_bytes()[:-40])
    res = cli("caption", cut, "--model", tiny_opt, *FAST, "-f", "jsonl")
    assert res.exit_code == 1
    (rec,) = jsonl(res.stdout)
    assert rec["shard"] == str(cut) and "not a readable Parquet file" in rec["error"]


def test_output_dir_one_file_per_parquet_resumable_then_merge(tiny_opt, pq_dir, tmp_path):
    out = tmp_path / "out"
    res = cli("caption", pq_dir, "--model", tiny_opt, *FAST, "-o", f"{out}/", "--carry", "caption,url")
    assert res.exit_code == 1, res.output  # the broken rows
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["00000.jsonl", "00001.jsonl"]
    assert len(jsonl((out / "00000.jsonl").read_text())) == 5
    res = cli("caption", pq_dir, "--model", tiny_opt, *FAST, "-o", f"{out}/", "--carry", "caption,url")
    assert res.exit_code == 0 and "2 of 2 shards already done" in res.stderr, res.output
    res = cli("merge", out)
    assert res.exit_code == 0, res.output
    recs = jsonl((out / "captions.jsonl").read_text())
    assert [r["key"] for r in recs][-1] == "00010000" and len(recs) == 6


def test_parquet_rows_share_the_read_ahead_budget(tmp_path, pics, monkeypatch):
    from blip2cli import webdataset

    path = write_parquet(tmp_path / "many.parquet", [{"jpg": pics[i % 3]} for i in range(8)])
    monkeypatch.setattr(webdataset, "MAX_INFLIGHT_BYTES", 1)
    reader = SampleReader()
    first = next(iter(reader.samples(str(path))))
    assert reader.budget.used == len(first.source)
    del first
    assert reader.budget.used == 0


def test_ask_and_embed_read_parquet_and_per_file_parquet_outputs_merge(tiny_opt, tiny_itm, pq_dir, tmp_path):
    one = pq_dir / "00001.parquet"
    res = cli("ask", one, "-q", "what is it?", "--model", tiny_opt, *FAST, "-f", "jsonl", "--carry", "url")
    assert res.exit_code == 0, res.output
    (rec,) = jsonl(res.stdout)
    assert rec["key"] == "00010000" and rec["answers"] and rec["url"] == "http://x/10"
    res = cli("embed", one, "--model", tiny_itm, "-f", "jsonl", "--carry", "caption")
    assert res.exit_code == 0, res.output
    (rec,) = jsonl(res.stdout)
    assert len(rec["vector"]) > 0 and rec["source_caption"] == "alt 10"
    # per-file outputs as Parquet, then merged into one JSON Lines file
    out = tmp_path / "pqout"
    res = cli("caption", pq_dir, "--model", tiny_opt, *FAST, "-o", f"{out}/", "-f", "parquet", "--carry", "caption")
    assert res.exit_code == 1, res.output
    assert pq.read_table(out / "00000.parquet").num_rows == 5
    res = cli("merge", out)
    assert res.exit_code == 0, res.output
    recs = jsonl((out / "captions.jsonl").read_text())
    assert len(recs) == 6 and recs[0]["source_caption"] == "alt 0"


def test_an_oversized_carried_column_is_said_not_dropped_silently(tiny_opt, tmp_path, pics, monkeypatch):
    from blip2cli import webdataset

    path = write_parquet(tmp_path / "big.parquet", [{"key": "a", "jpg": pics[0], "txt": "x" * 100},
                                                    {"key": "b", "jpg": pics[1], "txt": "short"}])
    monkeypatch.setattr(webdataset, "MAX_CARRY_BYTES", 50)
    res = cli("caption", path, "--model", tiny_opt, *FAST, "-f", "jsonl", "--carry", "txt")
    assert res.exit_code == 1, res.output
    a, b = jsonl(res.stdout)
    assert a["txt"] is None and "too large" in a["carry_error"] and not a["error"]
    assert b["txt"] == "short" and b["carry_error"] is None


def test_carried_columns_keep_their_type_whatever_the_first_row_holds(tiny_opt, tmp_path, pics):
    """--format parquet types a carried column before the first record: from the input
    Parquet files' schema (all agreeing), else a string. The first row with a null width
    used to make the column a string in that output only, so the per-file outputs of one
    dataset had different schemas and could not be read as one table."""
    import duckdb

    width = pa.int64()
    src = tmp_path / "in"
    src.mkdir()
    for n, widths in ((0, [None, 640]), (1, [480, 320])):
        table = pa.table({"key": [f"{n}{i}" for i in range(2)], "jpg": pics[:2], "width": pa.array(widths, width),
                          "score": pa.array([None, 0.5] if n == 0 else [0.25, 1.0], pa.float64()),
                          "ok": pa.array([None, True]), "when": pa.array(["2024", None])})
        pq.write_table(table, src / f"0000{n}.parquet")
    out = tmp_path / "out"
    result = cli("caption", src, "-m", tiny_opt, *FAST, "--carry", "width,score,ok,when", "-o", f"{out}/",
                 "-f", "parquet")
    assert result.exit_code == 0, result.output
    for name in ("00000.parquet", "00001.parquet"):
        schema = pq.read_schema(out / name)
        assert (schema.field("width").type, schema.field("score").type, schema.field("ok").type,
                schema.field("when").type) == (pa.int64(), pa.float64(), pa.bool_(), pa.string()), name
    rows = duckdb.sql(f"select key, width, score from read_parquet('{out}/*.parquet') order by key").fetchall()
    assert rows == [("00", None, None), ("01", 640, 0.5), ("10", 480, 0.25), ("11", 320, 1.0)]


def test_carried_tar_members_are_strings_in_parquet_even_when_the_first_is_a_number(tiny_opt, tmp_path, pics):
    """A json member holding 3 first and an object later: one string column, no value lost."""
    import io
    import tarfile

    shard = tmp_path / "00000.tar"
    with tarfile.open(shard, "w") as tar:
        for i, (meta, ext) in enumerate(((b"3", "png"), (b'{"n": 1}', "png"))):
            for member, data in ((f"s{i}.{ext}", pics[i]), (f"s{i}.json", meta)):
                info = tarfile.TarInfo(member)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    out = tmp_path / "out.parquet"
    result = cli("caption", shard, "-m", tiny_opt, *FAST, "--carry", "json", "-o", out)
    assert result.exit_code == 0, result.output
    table = pq.read_table(out)
    assert table.schema.field("json").type == pa.string()
    assert table.column("json").to_pylist() == ["3", '{"n":1}']
