"""Settings and stores never mix or tear.

* ``--resume`` and output directories compare every setting a run records
  (caption, ask, embed), a setting missing on either side included;
* ``blip2 merge`` compares every record of every part file with the manifest
  and refuses a mix, naming the part file, the line and the setting;
* a vector store's segments are tied to their index and manifest by an id, and checked
  against a checksum of their rows and paths: a commit killed at any point leaves the old
  store, and files mixed, copied or edited are refused, never served;
* the errors around these say what happened and what to do next;
* a file that fails to embed into a store is counted as failed, not new.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from blip2cli import store as st
from blip2cli.sources import Item
from blip2cli.store import StoreUpdate, VectorStore, top_k

from helpers import DIMS, cli, crash_at_the_commit_point, entry_for, make_files, unit, store_meta as meta

FAST = ["--max-new-tokens", "4", "--num-beams", "1"]


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def write_records(path: Path, recs: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))


@pytest.fixture
def photos(tmp_path, example_images) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    for p in example_images[:3]:
        shutil.copy(p, folder / p.name)
    return folder


# --------------------------------------------------------------------------- #
# --resume compares every setting (issue 11: template, features, pool)
# --------------------------------------------------------------------------- #

# What each command records as its settings; a setting dropped from the records
# (so never compared) fails here first.
SETTINGS = {
    "caption": {"model", "revision", "checkpoint", "dtype", "quantize", "preprocess", "generation"},
    "ask": {"model", "revision", "checkpoint", "dtype", "quantize", "preprocess", "template", "generation"},
    "embed": {"model", "revision", "checkpoint", "dtype", "quantize", "preprocess", "features", "pool"},
}


def command_args(command: str, model: Path, photos: Path, out: Path) -> list:
    if command == "caption":
        return ["caption", photos, "-m", model, "-o", out, *FAST]
    if command == "ask":
        return ["ask", photos, "-q", "what is it?", "-m", model, "-o", out, *FAST]
    return ["embed", photos, "-m", model, "-o", out]


@pytest.fixture(scope="module")
def first_runs(tmp_path_factory, tiny_opt, tiny_itm, example_images):
    """One complete JSON Lines output per command (made once), to resume from."""
    root = tmp_path_factory.mktemp("runs")
    photos = root / "photos"
    photos.mkdir()
    for p in example_images[:2]:
        shutil.copy(p, photos / p.name)
    outs = {}
    for command in SETTINGS:
        model = tiny_itm if command == "embed" else tiny_opt
        out = root / f"{command}.jsonl"
        res = cli(*command_args(command, model, photos, out))
        assert res.exit_code == 0, res.output
        outs[command] = (model, photos, out)
    return outs


def _other(value):
    if isinstance(value, dict):
        return {**value, "max_new_tokens": (value.get("max_new_tokens") or 0) + 1}
    if isinstance(value, bool):
        return not value
    if value is None:
        return "something-else"
    return f"{value}-other"


def _resume_with_edited_file(first_runs, tmp_path, command, edit):
    model, photos, made = first_runs[command]
    out = tmp_path / made.name
    recs = records(made)
    write_records(out, [edit(dict(r)) for r in recs])
    before = out.read_bytes()
    res = cli(*command_args(command, model, photos, out), "--resume")
    return res, out.read_bytes() == before


@pytest.mark.parametrize("command, key", [(c, k) for c in SETTINGS for k in sorted(SETTINGS[c])])
def test_resume_refuses_a_file_made_with_any_other_setting(first_runs, tmp_path, command, key):
    assert set(records(first_runs[command][2])[0]) >= SETTINGS[command]

    def changed(r):
        r[key] = _other(r[key])
        return r

    res, untouched = _resume_with_edited_file(first_runs, tmp_path, command, changed)
    assert res.exit_code == 2, res.output
    assert "other settings" in res.stderr and key in res.stderr
    assert untouched  # nothing appended, nothing rewritten


@pytest.mark.parametrize("command, key", [(c, k) for c in SETTINGS for k in sorted(SETTINGS[c])])
def test_resume_refuses_a_file_that_lacks_a_setting(first_runs, tmp_path, command, key):
    def dropped(r):
        del r[key]
        return r

    res, untouched = _resume_with_edited_file(first_runs, tmp_path, command, dropped)
    assert res.exit_code == 2, res.output
    assert f"{key}: not recorded then" in res.stderr
    assert untouched


@pytest.mark.parametrize("command", sorted(SETTINGS))
def test_resume_refuses_a_file_with_a_setting_this_run_lacks(first_runs, tmp_path, command):
    def extra(r):
        r["future_setting"] = 3
        return r

    res, untouched = _resume_with_edited_file(first_runs, tmp_path, command, extra)
    assert res.exit_code == 2, res.output
    assert "future_setting: 3 then, not set now" in res.stderr
    assert untouched


@pytest.mark.parametrize("command, change, named", [
    ("ask", ["--template", "Q: {question} A:"], "template"),  # issue 11: appended before
    ("ask", ["--raw"], "template"),
    ("embed", ["--pool", "mean"], "pool"),  # issue 11: 1-D vectors appended to 2-D ones before
    ("embed", ["--features", "qformer"], "features"),
    ("caption", ["--max-new-tokens", "6"], "max_new_tokens"),
    ("caption", ["--prompt", "a photo of"], "prompt"),
    ("caption", ["--preprocess", "reference"], "preprocess"),
    ("caption", ["--dtype", "bfloat16"], "dtype"),
    ("ask", ["--num-answers", "2", "--num-beams", "2"], "num_"),  # num_captions or num_answers
])
def test_resume_refuses_a_changed_option(first_runs, tmp_path, command, change, named):
    model, photos, made = first_runs[command]
    out = tmp_path / made.name
    shutil.copy(made, out)
    before = out.read_bytes()
    res = cli(*command_args(command, model, photos, out), *change, "--resume")
    assert res.exit_code == 2, res.output
    assert "other settings" in res.stderr and named in res.stderr
    assert out.read_bytes() == before


def test_resume_with_the_same_settings_still_resumes(first_runs, tmp_path, monkeypatch):
    model, photos, made = first_runs["ask"]
    out = tmp_path / made.name
    shutil.copy(made, out)
    monkeypatch.setattr("blip2cli.loader.load", lambda *a, **k: pytest.fail("loaded the model"))
    res = cli(*command_args("ask", model, photos, out), "--resume")
    assert res.exit_code == 0, res.output
    assert out.read_bytes() == made.read_bytes()


# --------------------------------------------------------------------------- #
# Output directories and blip2 merge: every record against the manifest (case 4)
# --------------------------------------------------------------------------- #


def test_merge_refuses_a_part_made_with_other_settings(tiny_opt, photos, tmp_path):
    out, other = tmp_path / "out", tmp_path / "other"
    for i in (0, 1):
        assert cli("caption", photos, "-m", tiny_opt, "-o", out, "--shard", f"{i}/3", *FAST).exit_code == 0
    # shard 2 was started elsewhere (in parallel, say) with another --max-new-tokens
    res = cli("caption", photos, "-m", tiny_opt, "-o", other, "--shard", "2/3", "--max-new-tokens", "6",
              "--num-beams", "1")
    assert res.exit_code == 0, res.output
    name = "part-00002-of-00003.jsonl"
    shutil.copy(other / ".parts" / name, out / ".parts" / name)
    res = cli("merge", out)
    assert res.exit_code == 2, res.output
    assert name in res.stderr and "line 1" in res.stderr
    assert "max_new_tokens: 6 in the part, 4 in the manifest" in res.stderr
    assert not (out / "captions.jsonl").exists()  # nothing written

    # a record that lost its model (edited, or written by something else)
    part = out / ".parts" / name
    shutil.copy(out / ".parts" / "part-00001-of-00003.jsonl", part)  # same settings: would merge
    recs = records(part)
    del recs[0]["model"]
    write_records(part, recs)
    res = cli("merge", out)
    assert res.exit_code == 2 and name in res.stderr and "model" in res.stderr, res.output
    assert not (out / "captions.jsonl").exists()


def test_a_shard_with_other_settings_is_refused_before_any_record_exists(tiny_opt, photos, tmp_path):
    out = tmp_path / "out"
    assert cli("caption", photos, "-m", tiny_opt, "-o", out, "--shard", "0/3", *FAST).exit_code == 0
    # the shards were started together: no part holds a record yet, only the manifest
    for part in (out / ".parts").glob("part-*"):
        part.unlink()
    res = cli("caption", photos, "-m", tiny_opt, "-o", out, "--shard", "1/3", "--max-new-tokens", "6",
              "--num-beams", "1")
    assert res.exit_code == 2, res.output
    assert "started with other settings" in res.stderr and "max_new_tokens: 4 then, 6 now" in res.stderr
    assert not list((out / ".parts").glob("part-*"))


def test_a_directory_run_names_the_part_with_other_settings(tiny_opt, photos, tmp_path):
    out = tmp_path / "out"
    assert cli("caption", photos, "-m", tiny_opt, "-o", out, "--shard", "0/2", *FAST).exit_code == 0
    part = out / ".parts" / "part-00000-of-00002.jsonl"
    recs = records(part)
    recs[-1]["preprocess"] = "reference"
    write_records(part, recs)
    res = cli("caption", photos, "-m", tiny_opt, "-o", out, "--shard", "1/2", *FAST)
    assert res.exit_code == 2, res.output
    assert f"{part} line {len(recs)}" in res.stderr and "preprocess: 'reference' in the part" in res.stderr


def test_merge_names_a_line_that_is_not_a_blip2_record(tiny_opt, photos, tmp_path):
    out = tmp_path / "out"
    assert cli("caption", photos, "-m", tiny_opt, "-o", out, "--shard", "0/1", *FAST).exit_code == 0
    part = out / ".parts" / "part-00000-of-00001.jsonl"
    lines = part.read_text().splitlines()
    lines.insert(1, json.dumps({"caption": "no path here"}))
    part.write_text("\n".join(lines) + "\n")
    res = cli("merge", out)
    assert res.exit_code == 2, res.output
    assert f"{part} line 2 is not a blip2 record" in res.stderr and "KeyError" not in res.stderr
    lines[1] = "[1, 2]"
    part.write_text("\n".join(lines) + "\n")
    res = cli("merge", out)
    assert res.exit_code == 2 and "line 2 is not a blip2 record" in res.stderr, res.output


# --------------------------------------------------------------------------- #
# Vector stores: ids and checksums tie segments, indexes and the manifest (case 5; issue 19 #12)
# --------------------------------------------------------------------------- #


def add_rows(path, files, vectors):
    with StoreUpdate(path, meta()) as up:
        for f, v in zip(files, vectors):
            up.add(entry_for(f), v)
        up.commit()


def segment(path: Path, n: int = -1) -> dict:
    return json.loads((path / st.MANIFEST).read_text())["segments"][n]


def test_a_commit_killed_at_its_commit_point_is_read_as_the_old_store(tmp_path, monkeypatch):
    """A store of a, b, c whose update (b changed: rows a, c, b') was killed at its one
    commit point (the manifest's rename): the old store is served whole, never a mix."""
    rng = np.random.default_rng(11)
    files = make_files(tmp_path / "img", ["a.jpg", "b.jpg", "c.jpg"])
    path = tmp_path / "v.safetensors"
    old = unit(rng, 3, *DIMS)
    add_rows(path, files, old)
    files[1].write_bytes(b"b, changed")
    crash_at_the_commit_point(monkeypatch)
    with StoreUpdate(path, meta()) as up:
        assert [i.name for i in up.select([Item(str(f), str(f)) for f in files])] == [str(files[1])]
        up.add(entry_for(files[1]), unit(rng, 1, *DIMS)[0])
        with pytest.raises(SystemExit):
            up.commit()
    monkeypatch.undo()
    store = VectorStore.open(path)
    assert [Path(e.path).name for e in store.entries] == ["a.jpg", "b.jpg", "c.jpg"]
    np.testing.assert_array_equal(np.asarray(store.matrix), old)
    # searching for c's own vector finds c, not another image at 1.000
    (best,) = top_k(store, old[2].mean(axis=0) / np.linalg.norm(old[2].mean(axis=0)), 1, mode="image")
    assert Path(store.entries[best.row].path).name == "c.jpg"
    store.close()


@pytest.mark.parametrize("name", ["v.npy", "v.safetensors"])
def test_an_index_from_another_commit_is_refused_even_with_the_same_rows(tmp_path, tiny_itm, name):
    rng = np.random.default_rng(13)
    files = make_files(tmp_path / "img", ["a.jpg", "b.jpg"])
    a, b = tmp_path / ("a-" + name), tmp_path / ("b-" + name)
    add_rows(a, files, unit(rng, 2, *DIMS))
    add_rows(b, files[::-1], unit(rng, 2, *DIMS))
    shutil.copy(b / segment(b)["index"], a / segment(a)["index"])  # restored from another backup
    with pytest.raises(st.StoreError, match="has an index from commit") as info:
        VectorStore.open(a)
    assert "matched to the wrong images" in str(info.value) and "delete" in info.value.hint
    with pytest.raises(st.StoreError, match="from commit"):
        StoreUpdate(a, meta())
    res = cli("search", "a cat", "--index", a, "-m", tiny_itm)
    assert res.exit_code == 2 and "from commit" in res.stderr, res.output


def test_a_segment_is_a_plain_npy_file_tied_to_its_manifest(tmp_path):
    rng = np.random.default_rng(12)
    files = make_files(tmp_path / "img", ["a.jpg", "b.jpg"])
    path = tmp_path / "v.npy"
    vecs = unit(rng, 2, *DIMS)
    add_rows(path, files, vecs)
    seg = segment(path)
    npy = path / seg["vectors"]
    np.testing.assert_array_equal(np.load(npy), vecs)
    np.testing.assert_array_equal(np.load(npy, mmap_mode="r"), vecs)
    assert npy.read_bytes().endswith(b"BLIP2GEN" + seg["id"].encode())
    assert pq.read_schema(path / seg["index"]).metadata[b"blip2.segment"] == seg["id"].encode()
    npy.write_bytes(npy.read_bytes() + b"junk")  # neither a trailer nor none
    with pytest.raises(st.StoreError, match="not a blip2 store segment .4 unexpected bytes after its 2 rows"):
        VectorStore.open(path)


def swap_rows(npy: Path, a: int, b: int) -> None:
    """Swap two rows of a segment's .npy in place, its header and trailer kept."""
    arr = np.load(npy, mmap_mode="r+")
    arr[[a, b]] = arr[[b, a]]
    arr.flush()
    del arr


def test_rows_or_paths_swapped_inside_a_segment_are_refused_not_served(tiny_itm, photos, tmp_path):
    """Issue 19 #12: two rows swapped in a segment file (its metadata kept) used to be served
    (search --image p0 found p1 at 1.000); the segment's checksum catches rows and paths."""
    import pyarrow as pa

    path = tmp_path / "v.safetensors"
    assert cli("embed", photos, "-m", tiny_itm, "-o", path).exit_code == 0
    query = sorted(photos.iterdir())[0]
    res = cli("search", "--image", query, "--index", path, "-m", tiny_itm, "-k", "1", "-f", "jsonl")
    assert res.exit_code == 0 and json.loads(res.stdout)["path"].endswith(query.name), res.output
    seg = segment(path)
    original = (path / seg["vectors"]).read_bytes()
    swap_rows(path / seg["vectors"], 0, 1)
    for args in (["search", "--image", query, "--index", path], ["search", "a cat", "--index", path],
                 ["export", path, "-o", tmp_path / "emb"]):
        res = cli(*args, *(["-m", tiny_itm] if args[0] == "search" else []))
        assert res.exit_code == 2, res.output
        assert seg["vectors"] in res.stderr and "checksum" in res.stderr and "Traceback" not in res.stderr
        assert res.stdout == ""
    (path / seg["vectors"]).write_bytes(original)
    # the paths swapped instead (the Parquet file rewritten with its metadata)
    table = pq.read_table(path / seg["index"])
    names = table.column("path").to_pylist()
    names[0], names[1] = names[1], names[0]
    table = table.set_column(0, "path", pa.array(names, pa.string()))
    pq.write_table(table, path / seg["index"])
    with pytest.raises(st.StoreError, match="does not match its checksum"):
        VectorStore.open(path).verify()
    res = cli("search", "a cat", "--index", path, "-m", tiny_itm)
    assert res.exit_code == 2 and seg["vectors"] in res.stderr, res.output


def test_disk_full_during_a_store_update_says_the_store_is_intact(tiny_itm, photos, tmp_path, monkeypatch):
    """Issue 19 #18: "OSError: [Errno 28]" and a debug hint before; now what happened, that
    the store is intact (verified here) and what to do, exit 2, no traceback hint."""
    import errno

    path = tmp_path / "v.safetensors"
    first = sorted(photos.iterdir())[0]
    assert cli("embed", first, "-m", tiny_itm, "-o", path).exit_code == 0
    before = np.asarray(VectorStore.open(path).matrix).copy()

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(st, "_write_segment", full)
    res = cli("embed", photos, "-m", tiny_itm, "-o", path)
    assert res.exit_code == 2, res.output
    assert "the disk is full" in res.stderr and "It is intact" in res.stderr and "free some disk space" in res.stderr
    assert "BLIP2_DEBUG" not in res.stderr and "Errno" not in res.stderr
    monkeypatch.undo()
    store = VectorStore.open(path)
    store.verify()
    assert store.rows == 1 and np.array_equal(np.asarray(store.matrix), before)


# --------------------------------------------------------------------------- #
# Clear errors (case 13)
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("name", ["v.npy", "v.safetensors"])
def test_a_truncated_store_is_a_clear_error(tiny_itm, photos, tmp_path, name):
    path = tmp_path / name
    assert cli("embed", photos, "-m", tiny_itm, "-o", path).exit_code == 0
    npy = path / segment(path)["vectors"]
    with open(npy, "r+b") as f:
        f.truncate(npy.stat().st_size - 700)
    with pytest.raises(st.StoreError, match="is truncated") as info:
        VectorStore.open(path)
    assert "rebuild" in info.value.hint
    for args in (["search", "a cat", "--index", path], ["search", "a cat", photos, "--index", path],
                 ["embed", photos, "-o", path]):
        res = cli(*args, "-m", tiny_itm)
        assert res.exit_code == 2, res.output
        assert "is truncated" in res.stderr and "mmap" not in res.stderr and "ValueError" not in res.stderr


def test_a_pre_release_single_file_store_is_refused_before_the_model_loads(tiny_itm, photos, tmp_path, monkeypatch):
    old = tmp_path / "vectors.safetensors"
    old.write_bytes(b"a single-file store of a pre-release blip2")
    (tmp_path / "vectors.safetensors.index.parquet").write_bytes(b"PAR1")
    monkeypatch.setattr("blip2cli.loader.load", lambda *a, **k: pytest.fail("the model must not be loaded"))
    for args in (["embed", photos, "-o", old], ["search", "a cat", "--index", old]):
        res = cli(*args, "-m", tiny_itm)
        assert res.exit_code == 2, res.output
        assert "is a file, not a blip2 vector store" in res.stderr and "delete" in res.stderr
    assert old.read_bytes() == b"a single-file store of a pre-release blip2"


def test_rows_that_do_not_match_say_what_to_do(tmp_path):
    rng = np.random.default_rng(14)
    files = make_files(tmp_path / "img", ["a.jpg", "b.jpg", "c.jpg"])
    a, b = tmp_path / "a.npy", tmp_path / "b.npy"
    for path, n in ((a, 2), (b, 3)):
        add_rows(path, files[:n], unit(rng, n, *DIMS))
    shutil.copy(b / segment(b)["index"], a / segment(a)["index"])
    with pytest.raises(st.StoreError) as info:
        VectorStore.open(a)
    message = str(info.value)
    assert "is damaged" in message and "with 3 rows" in message and segment(a)["vectors"] in message
    assert "restore the whole folder from one copy" in info.value.hint


# --------------------------------------------------------------------------- #
# Friction: a file that fails to embed is counted as failed, not new
# --------------------------------------------------------------------------- #


def test_a_failed_file_is_counted_as_failed_and_retried_openly(tiny_itm, photos, tmp_path):
    (photos / "broken.jpg").write_bytes(b"not an image at all")
    path = tmp_path / "v.safetensors"
    res = cli("embed", photos, "-m", tiny_itm, "-o", path)
    assert res.exit_code == 1
    assert "3 rows (3 new, 0 changed, 0 unchanged, 1 failed)" in res.stderr, res.stderr
    res = cli("embed", photos, "-m", tiny_itm, "-o", path)
    assert res.exit_code == 1
    assert "3 rows (0 new, 0 changed, 3 unchanged, 1 failed; 1 failed before, retried)" in res.stderr, res.stderr
    # fixed: embedded now, no longer remembered as failed
    shutil.copy(photos / "chelsea.png", photos / "broken.jpg")
    res = cli("embed", photos, "-m", tiny_itm, "-o", path)
    assert res.exit_code == 0, res.output
    assert "4 rows (0 new, 0 changed, 3 unchanged; 1 failed before, retried)" in res.stderr, res.stderr
    assert VectorStore.open(path).failed == {}
    res = cli("embed", photos, "-m", tiny_itm, "-o", path)
    assert "4 rows (0 new, 0 changed, 4 unchanged)" in res.stderr, res.stderr
