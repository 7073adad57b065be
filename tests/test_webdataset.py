"""WebDataset tar shards as input (issue 12): read streaming, records per sample with
shard/key/--carry, errors as records, -o DIR one output per shard (atomic, resumed),
--shard I/N by whole tars. Outputs read back with json, pyarrow and tarfile.

Everything runs through the CLI on the tiny checkpoints."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from blip2cli.cli import app
from blip2cli.sources import InputResolver
from blip2cli.shardfiles import expand_braces
from blip2cli.webdataset import SampleReader, split_name

runner = CliRunner()
FAST = ["--max-new-tokens", "3", "--num-beams", "1"]


def cli(*args, input=None):
    return runner.invoke(app, [*map(str, args)], input=input)


def jsonl(text: str) -> list[dict]:
    return [json.loads(l) for l in text.splitlines() if l.strip()]


def add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def make_shard(path: Path, samples: list[tuple[str, dict[str, bytes]]], mode: str = "w") -> Path:
    with tarfile.open(path, mode) as tf:
        for key, members in samples:
            for ext, data in members.items():
                add(tf, f"{key}.{ext}", data)
    return path


@pytest.fixture
def pics(example_images) -> list[bytes]:
    return [p.read_bytes() for p in example_images]  # png, png, png, jpg


@pytest.fixture
def shards(tmp_path, pics) -> Path:
    """shards/00000.tar (2 samples), 00001.tar (2 samples), each with txt + json."""
    root = tmp_path / "shards"
    root.mkdir()
    for s in range(2):
        samples = []
        for i in range(2):
            n = s * 2 + i
            ext = "jpg" if n == 3 else "png"
            samples.append((f"{s:05d}/{n:09d}", {ext: pics[n], "txt": f"alt text {n}".encode(),
                                                  "json": json.dumps({"n": n}).encode()}))
        make_shard(root / f"{s:05d}.tar", samples)
    return root


# -- the source: names, braces, keys (no model) ------------------------------------
def test_brace_ranges_keep_zero_padding_and_lists_multiply():
    assert expand_braces("s/{00000..00002}.tar") == ["s/00000.tar", "s/00001.tar", "s/00002.tar"]
    assert expand_braces("{8..10}") == ["8", "9", "10"]
    assert expand_braces("{a,b}{0..1}.tar") == ["a0.tar", "a1.tar", "b0.tar", "b1.tar"]
    assert expand_braces("plain{}.tar") == ["plain{}.tar"]


def test_key_is_up_to_the_first_dot_of_the_base_name():
    assert split_name("00042/000000123.jpg") == ("00042/000000123", "jpg")
    assert split_name("a.b/x.seg.png") == ("a.b/x", "seg.png")
    assert split_name("README") == ("README", "")


def test_folder_glob_and_braces_find_shards(shards, tmp_path):
    names = [i.name for i in InputResolver().resolve([str(shards)])]
    assert names == [str(shards / "00000.tar"), str(shards / "00001.tar")]
    by_glob = list(InputResolver().resolve([str(shards / "*.tar")]))
    assert [i.tar for i in by_glob] == [True, True]
    braces = [i.name for i in InputResolver().resolve([str(shards) + "/{00000..00001}.tar"])]
    assert braces == names
    # --ext without tar leaves the shards out of a folder walk
    assert list(InputResolver(extensions=["jpg"]).resolve([str(shards)])) == []


def test_samples_stream_with_shard_key_and_carry(shards, pics):
    items = list(SampleReader(carry=("txt", "json")).samples(str(shards / "00001.tar")))
    assert [i.name for i in items] == [f"{shards}/00001.tar#00001/000000002.png",
                                       f"{shards}/00001.tar#00001/000000003.jpg"]
    assert items[1].source == pics[3]
    assert items[1].fields == {"shard": f"{shards}/00001.tar", "key": "00001/000000003",
                               "txt": "alt text 3", "json": {"n": 3}, "carry_error": None}


# -- caption, ask, embed through the CLI -------------------------------------------
def test_caption_folder_of_shards_records_carry_old_alt_text(tiny_opt, shards):
    res = cli("caption", shards, "--model", tiny_opt, *FAST, "-f", "jsonl", "--carry", "txt,json")
    assert res.exit_code == 0, res.output
    recs = jsonl(res.stdout)
    assert [r["key"] for r in recs] == ["00000/000000000", "00000/000000001", "00001/000000002", "00001/000000003"]
    assert [r["shard"] for r in recs] == [str(shards / "00000.tar")] * 2 + [str(shards / "00001.tar")] * 2
    assert recs[0]["path"] == f"{shards}/00000.tar#00000/000000000.png"
    assert [r["txt"] for r in recs] == [f"alt text {n}" for n in range(4)]
    assert [r["json"] for r in recs] == [{"n": n} for n in range(4)]
    assert all(r["captions"] and not r.get("error") for r in recs)
    assert recs[0]["carry"] == ["txt", "json"]


def test_same_captions_from_shards_as_from_files(tiny_opt, shards, example_images, tmp_path):
    a = cli("caption", str(shards) + "/{00000..00001}.tar", "--model", tiny_opt, *FAST, "-f", "jsonl")
    b = cli("caption", *example_images, "--model", tiny_opt, *FAST, "-f", "jsonl")
    assert a.exit_code == 0 and b.exit_code == 0, a.output + b.output
    assert [r["captions"] for r in jsonl(a.stdout)] == [r["captions"] for r in jsonl(b.stdout)]


def test_ask_and_embed_read_shards(tiny_opt, tiny_itm, shards):
    res = cli("ask", str(shards / "00000.tar"), "-q", "what is it?", "--model", tiny_opt, *FAST, "-f", "jsonl")
    assert res.exit_code == 0, res.output
    recs = jsonl(res.stdout)
    assert [r["key"] for r in recs] == ["00000/000000000", "00000/000000001"] and all(r["answers"] for r in recs)
    res = cli("embed", str(shards / "*.tar"), "--model", tiny_itm, "-f", "jsonl", "--carry", "txt")
    assert res.exit_code == 0, res.output
    recs = jsonl(res.stdout)
    assert len(recs) == 4 and all(len(r["vector"]) > 0 for r in recs)
    assert recs[2]["txt"] == "alt text 2" and recs[2]["key"] == "00001/000000002"


def test_embed_store_from_shards_is_refused(tiny_itm, shards, tmp_path):
    res = cli("embed", shards, "--model", tiny_itm, "-o", tmp_path / "v.safetensors")
    assert res.exit_code == 2 and "tar shards" in res.output


# -- errors are records ------------------------------------------------------------
def test_corrupt_member_missing_image_links_and_oversize_are_error_records(tiny_opt, tmp_path, pics, monkeypatch):
    path = tmp_path / "bad.tar"
    with tarfile.open(path, "w") as tf:
        add(tf, "a.png", pics[0])
        add(tf, "b.jpg", b"not a jpeg at all")  # corrupt member
        add(tf, "c.txt", b"no image here")  # sample without an image
        link = tarfile.TarInfo("d.jpg")
        link.type = tarfile.SYMTYPE
        link.linkname = "/etc/passwd"
        tf.addfile(link)  # a link: never followed
        add(tf, "e.png", pics[1])
        add(tf, "f.png", pics[2])  # over the size budget set below
    # The read budget of an image member (images.MAX_DECODE_BYTES by default), small here.
    monkeypatch.setattr(SampleReader, "max_image", property(lambda self: len(pics[1]) + 1))
    res = cli("caption", path, "--model", tiny_opt, *FAST, "-f", "jsonl")
    assert res.exit_code == 1, res.output
    recs = {r["key"]: r for r in jsonl(res.stdout)}
    assert list(recs) == ["a", "b", "c", "d", "e", "f"]
    assert not recs["a"].get("error") and not recs["e"].get("error")
    assert recs["b"]["error"] and recs["b"]["path"].endswith("#b.jpg")
    assert "no image in this sample" in recs["c"]["error"]
    assert "symbolic link" in recs["d"]["error"]
    assert "too large" in recs["f"]["error"]


def test_truncated_tar_keeps_what_was_read_then_one_error_naming_the_offset(tiny_opt, tmp_path, pics):
    whole = make_shard(tmp_path / "whole.tar", [(f"k{i}", {"png": pics[i]}) for i in range(3)])
    data = whole.read_bytes()
    cut = tmp_path / "cut.tar"
    # cut inside the third member's data
    with tarfile.open(whole) as tf:
        third = tf.getmembers()[2]
    cut.write_bytes(data[: third.offset_data + 100])
    res = cli("caption", cut, "--model", tiny_opt, *FAST, "-f", "jsonl")
    assert res.exit_code == 1, res.output
    recs = jsonl(res.stdout)
    assert [r.get("key") for r in recs[:2]] == ["k0", "k1"] and not recs[0].get("error")
    assert len(recs) == 3 and recs[2]["path"] == str(cut) and recs[2]["shard"] == str(cut)
    assert f"at byte {third.offset}" in recs[2]["error"]


def test_gzipped_shard_and_a_missing_one_from_a_brace_range(tiny_opt, tmp_path, pics):
    make_shard(tmp_path / "s0.tar.gz", [("x", {"png": pics[0]})], mode="w:gz")
    res = cli("caption", tmp_path / "s0.tar.gz", str(tmp_path / "s{1..1}.tar"), "--model", tiny_opt, *FAST,
              "-f", "jsonl")
    recs = jsonl(res.stdout)
    assert res.exit_code == 1 and recs[0]["key"] == "x" and not recs[0].get("error")
    assert recs[1]["path"] == str(tmp_path / "s1.tar") and "no such file" in recs[1]["error"]


# -- -o DIR: one output file per shard ---------------------------------------------
def test_output_dir_one_jsonl_per_shard_then_resume_skips_done_and_continues_partial(tiny_opt, shards, tmp_path):
    out = tmp_path / "out"
    res = cli("caption", shards, "--model", tiny_opt, *FAST, "-o", f"{out}/")
    assert res.exit_code == 0, res.output
    first = {n: jsonl((out / f"{n}.jsonl").read_text()) for n in ("00000", "00001")}
    assert [r["key"] for r in first["00001"]] == ["00001/000000002", "00001/000000003"]
    assert not list((out / ".shards" / "parts").glob("*.jsonl"))  # part files promoted
    # An interrupted shard: its part file holds the first sample (marked), its output is gone.
    (out / "00001.jsonl").unlink()
    kept = dict(first["00001"][0], captions=["KEPT"], caption="KEPT")
    (out / ".shards" / "parts").mkdir(exist_ok=True)
    (out / ".shards" / "parts" / "00001.jsonl").write_text(json.dumps(kept) + "\n" + '{"path": "torn')
    done_before = (out / "00000.jsonl").stat().st_mtime_ns
    res = cli("caption", shards, "--model", tiny_opt, *FAST, "-o", out)
    assert res.exit_code == 0, res.output
    assert "1 of 2 shards already done" in res.output
    assert (out / "00000.jsonl").stat().st_mtime_ns == done_before  # a finished shard is not touched
    again = jsonl((out / "00001.jsonl").read_text())
    assert [r["captions"] for r in again] == [["KEPT"], first["00001"][1]["captions"]]
    assert not (out / ".shards" / "parts" / "00001.jsonl").exists()
    # Other settings into the same directory are refused, naming the difference.
    res = cli("caption", shards, "--model", tiny_opt, "--max-new-tokens", "4", "--num-beams", "1", "-o", out)
    assert res.exit_code == 2 and "max_new_tokens" in res.output
    # --resume is implied, as for every output directory: accepted as the no-op it is
    res = cli("caption", shards, "--model", tiny_opt, *FAST, "-o", out, "--resume")
    assert res.exit_code == 0 and "2 of 2 shards already done" in res.output, res.output


def test_output_dir_parquet_per_shard_read_by_pyarrow(tiny_opt, shards, tmp_path):
    import pyarrow.parquet as pq

    out = tmp_path / "pq"
    res = cli("caption", shards, "--model", tiny_opt, *FAST, "-o", f"{out}/", "--format", "parquet",
              "--carry", "txt,json")
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["00000.parquet", "00001.parquet"]
    rows = pq.read_table(out / "00001.parquet").to_pylist()
    assert [r["key"] for r in rows] == ["00001/000000002", "00001/000000003"]
    assert [r["txt"] for r in rows] == ["alt text 2", "alt text 3"]
    assert rows[0]["shard"] == str(shards / "00001.tar") and rows[0]["captions"]


def test_shard_option_splits_by_whole_tar_files(tiny_opt, shards, tmp_path):
    out = tmp_path / "split"
    res = cli("caption", shards, "--model", tiny_opt, *FAST, "-o", out, "--shard", "1/2")
    assert res.exit_code == 0, res.output
    assert not (out / "00000.jsonl").exists()
    assert [r["key"] for r in jsonl((out / "00001.jsonl").read_text())] == ["00001/000000002", "00001/000000003"]
    res = cli("caption", shards, "--model", tiny_opt, *FAST, "-o", out, "--shard", "0/2")
    assert res.exit_code == 0, res.output
    assert len(jsonl((out / "00000.jsonl").read_text())) == 2


def test_output_dir_refuses_plain_images_mixed_with_shards(tiny_opt, shards, example_images, tmp_path):
    res = cli("caption", shards, example_images[0], "--model", tiny_opt, "-o", f"{tmp_path}/o/")
    assert res.exit_code == 2 and "one file per shard" in res.output


# -- issue 19: bounded braces and read-ahead, carry losses said, unique identities, cut tars --
def test_brace_product_is_bounded_up_front_and_expanded_lazily(tmp_path):
    import time

    from blip2cli.errors import UsageError
    from blip2cli.shardfiles import MAX_BRACE_NAMES, count_braces, iter_braces

    for pattern in ("s-{0..9999999}{0..9}.tar", "{0..999}{0..999}"):
        t0 = time.perf_counter()
        with pytest.raises(UsageError, match=f"{MAX_BRACE_NAMES:,} names"):
            iter_braces(pattern)
        assert time.perf_counter() - t0 < 1.0
    assert count_braces("{0..999}{0..999}") == 1_000_000
    names = iter_braces("x{0..99}{0..99}")  # {0..99}: padded to 2  # lazy: a generator, the first name without the rest
    assert not isinstance(names, list) and next(names) == "x0000" and next(names) == "x0001"
    res = cli("caption", str(tmp_path / "s-{0..9999999}{0..9}.tar"), "--model", "nowhere", "-f", "jsonl")
    assert res.exit_code == 2, res.output
    assert "100,000 names" in res.output


def test_tar_read_ahead_is_bounded_by_bytes_in_flight(tmp_path, monkeypatch):
    """Twelve 2 MB members (not images) in a .tar.gz: with a 3 MB budget the reader holds
    about two of them at once, not the twelve the count bound let it read ahead. (Random
    bytes: zeros make gzip hand tarfile ~10 MB chunks, a constant that would hide the count.)"""
    import time
    import tracemalloc

    from blip2cli import webdataset
    from blip2cli.images import ImageError
    from blip2cli.pipeline import run

    member = 2 * 1024 * 1024
    path = make_shard(tmp_path / "zeros.tar.gz", [(f"k{i:02d}", {"png": os.urandom(member)}) for i in range(12)],
                      mode="w:gz")
    monkeypatch.setattr(webdataset, "MAX_INFLIGHT_BYTES", 3 * 1024 * 1024)

    class Slow:  # the decode of a non-image: it fails, after a while
        def prepare(self, item):
            time.sleep(0.05)
            raise ImageError("not an image")

        def run_batch(self, prepared):
            return prepared

        def record(self, item, result, error):
            return {"path": item.name, "error": error}

    written = []

    class Writer:
        def write(self, record):
            written.append(record)

    reader = SampleReader()
    tracemalloc.start()
    try:
        stats = run(reader.samples(str(path)), Slow(), Writer(), batch_size=4, workers=1, queue_size=256)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert stats.failed == 12 and len(written) == 12
    assert reader.budget.peak <= 3 * 1024 * 1024 + member  # the limit, plus one member read anyway
    assert peak < 5 * member, f"peak {peak / 1e6:.1f} MB"  # about 3.5 here; main: about 15
    import gc

    for _ in range(50):  # the source thread lets go of its last item as it ends
        gc.collect()
        if reader.budget.used == 0:
            break
        time.sleep(0.02)
    assert reader.budget.used == 0  # every sample's bytes given back


def test_carry_losses_are_said_in_the_record_on_stderr_and_in_the_exit_code(tiny_opt, tmp_path, pics, monkeypatch):
    from blip2cli import webdataset

    path = tmp_path / "carry.tar"
    with tarfile.open(path, "w") as tf:
        add(tf, "a.png", pics[0])
        add(tf, "a.txt", b"x" * 100)  # over the (patched) limit
        add(tf, "b.png", pics[1])
        link = tarfile.TarInfo("b.txt")
        link.type = tarfile.SYMTYPE
        link.linkname = "/etc/passwd"
        tf.addfile(link)
        add(tf, "c.png", pics[2])
        add(tf, "c.txt", b"fine")
    monkeypatch.setattr(webdataset, "MAX_CARRY_BYTES", 50)
    res = cli("caption", path, "--model", tiny_opt, *FAST, "-f", "jsonl", "--carry", "txt")
    assert res.exit_code == 1, res.output
    recs = {r["key"]: r for r in jsonl(res.stdout)}
    assert not any(r.get("error") for r in recs.values())  # the captions themselves are fine
    assert recs["a"]["txt"] is None and "too large" in recs["a"]["carry_error"]
    assert recs["b"]["txt"] is None and "symbolic link" in recs["b"]["carry_error"]
    assert recs["c"]["txt"] == "fine" and recs["c"]["carry_error"] is None
    assert "not carried" in res.stderr and "carry_error" in res.stderr


def test_repeated_key_gets_its_position_and_resume_keeps_every_sample(tiny_opt, tmp_path, pics):
    samples = [(f"k{i:02d}", {"png": pics[i % 3]}) for i in range(17)]
    samples.insert(9, ("k02", {"png": pics[1]}))  # k02 again, not adjacent: 18 samples
    path = make_shard(tmp_path / "rep.tar", samples)
    out = tmp_path / "out.jsonl"
    res = cli("caption", path, "--model", tiny_opt, *FAST, "-o", out)
    assert res.exit_code == 0, res.output
    recs = jsonl(out.read_text())
    assert len(recs) == 18 and len({r["path"] for r in recs}) == 18
    again = [r for r in recs if r["key"] == "k02"]
    assert again[0]["path"].endswith("#k02.png") and again[1]["path"].endswith("#k02.png@9")
    out.write_text("".join(line + "\n" for line in out.read_text().splitlines()[:4]))
    res = cli("caption", path, "--model", tiny_opt, *FAST, "-o", out, "--resume")
    assert res.exit_code == 0, res.output
    recs = jsonl(out.read_text())
    assert len(recs) == 18 and len({r["path"] for r in recs}) == 18


def test_tar_cut_at_a_member_boundary_is_an_error_record(tiny_opt, tmp_path, pics):
    whole = make_shard(tmp_path / "whole.tar", [(f"k{i}", {"png": pics[i % 3]}) for i in range(5)])
    with tarfile.open(whole) as tf:
        third = tf.getmembers()[2]
    cut = tmp_path / "cut.tar"
    cut.write_bytes(whole.read_bytes()[: third.offset])  # no end-of-archive blocks
    res = cli("caption", cut, "--model", tiny_opt, *FAST, "-f", "jsonl")
    assert res.exit_code == 1, res.output
    recs = jsonl(res.stdout)
    assert [r["key"] for r in recs[:2]] == ["k0", "k1"] and not recs[0].get("error")
    assert len(recs) == 3 and recs[2]["shard"] == str(cut) and "end-of-archive" in recs[2]["error"]


def test_merge_over_two_shard_runs_of_per_shard_outputs(tiny_opt, shards, tmp_path):
    """Issue 20 item 4: merge on a folder of per-shard outputs (two --shard I/2 runs)."""
    out = tmp_path / "out"
    res = cli("caption", shards, "--model", tiny_opt, *FAST, "-o", f"{out}/", "--shard", "0/2")
    assert res.exit_code == 0, res.output
    res = cli("merge", out)  # one shard still missing: named, nothing under the final name
    assert res.exit_code == 1 and "00001.tar" in res.stderr, res.output
    assert not (out / "captions.jsonl").exists()
    res = cli("caption", shards, "--model", tiny_opt, *FAST, "-o", f"{out}/", "--shard", "1/2")
    assert res.exit_code == 0, res.output
    res = cli("merge", out)
    assert res.exit_code == 0, res.output
    recs = jsonl((out / "captions.jsonl").read_text())
    assert [r["key"] for r in recs] == ["00000/000000000", "00000/000000001", "00001/000000002", "00001/000000003"]
    assert all(r["caption"] and r["error"] is None for r in recs)
