"""Settings and stores never mix or tear.

* ``--resume`` and output directories compare every setting a run records
  (caption, ask, embed), a setting missing on either side included;
* ``blip2 merge`` compares every record of every part file with the manifest
  and refuses a mix, naming the part file, the line and the setting;
* a vector store's matrix and index are tied by a generation id in both formats:
  a commit torn between its two renames is rolled forward or refused, never served;
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
from blip2cli.store import StoreUpdate, VectorStore, index_path, top_k

from helpers import DIMS, cli, crash_between_the_renames, entry_for, make_files, unit, store_meta as meta

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
# Vector stores: a generation ties matrix and index (case 5)
# --------------------------------------------------------------------------- #


@pytest.fixture(params=["v.npy", "v.safetensors"])
def torn(request, tmp_path, monkeypatch):
    """A store of a, b, c whose update (b changed: rows a, c, b') was killed between
    its renames: same row count, but row 1 and 2 are other images in the new matrix."""
    rng = np.random.default_rng(11)
    files = make_files(tmp_path / "img", ["a.jpg", "b.jpg", "c.jpg"])
    path = tmp_path / request.param
    old = unit(rng, 3, *DIMS)
    with StoreUpdate(path, meta()) as up:
        for f, v in zip(files, old):
            up.add(entry_for(f), v)
        up.commit()
    files[1].write_bytes(b"b, changed")
    new_b = unit(rng, 1, *DIMS)[0]
    crash_between_the_renames(monkeypatch)
    with StoreUpdate(path, meta()) as up:
        assert [i.name for i in up.select([Item(str(f), str(f)) for f in files])] == [str(files[1])]
        up.add(entry_for(files[1]), new_b)
        with pytest.raises(SystemExit):
            up.commit()
    monkeypatch.undo()
    assert st._index_tmp(path).exists()
    return path, files, old, new_b


def test_a_torn_commit_is_read_as_the_new_store(torn):
    path, files, old, new_b = torn
    store = VectorStore.open(path)
    assert [Path(e.path).name for e in store.entries] == ["a.jpg", "c.jpg", "b.jpg"]
    np.testing.assert_array_equal(np.asarray(store.matrix), np.stack([old[0], old[2], new_b]))
    # searching for c's own vector finds c, not another image at 1.000
    (best,) = top_k(store, old[2].mean(axis=0) / np.linalg.norm(old[2].mean(axis=0)), 1, mode="image")
    assert Path(store.entries[best.row].path).name == "c.jpg"
    store.close()
    # the next writer finishes the rename
    with StoreUpdate(path, meta()) as up:
        up.commit()
    assert not st._index_tmp(path).exists()
    assert [Path(e.path).name for e in VectorStore.open(path).entries] == ["a.jpg", "c.jpg", "b.jpg"]


def test_a_torn_commit_whose_new_index_is_lost_is_refused(torn, tiny_itm):
    path, *_ = torn
    st._index_tmp(path).unlink()  # the new index is gone: the old one does not describe the new rows
    with pytest.raises(st.StoreError, match="come from different commits") as info:
        VectorStore.open(path)
    assert "do not belong together" in str(info.value)
    assert "delete" in info.value.hint
    with pytest.raises(st.StoreError, match="different commits"):
        StoreUpdate(path, meta())
    res = cli("search", "a cat", "--index", path, "-m", tiny_itm)
    assert res.exit_code == 2 and "different commits" in res.stderr, res.output


def test_npy_store_is_still_a_plain_npy_file(tmp_path):
    rng = np.random.default_rng(12)
    files = make_files(tmp_path / "img", ["a.jpg", "b.jpg"])
    path = tmp_path / "v.npy"
    vecs = unit(rng, 2, *DIMS)
    with StoreUpdate(path, meta()) as up:
        for f, v in zip(files, vecs):
            up.add(entry_for(f), v)
        up.commit()
    np.testing.assert_array_equal(np.load(path), vecs)
    np.testing.assert_array_equal(np.load(path, mmap_mode="r"), vecs)
    head = json.loads(pq.read_schema(index_path(path)).metadata[b"blip2"])
    assert path.read_bytes().endswith(b"BLIP2GEN" + head["generation"].encode())
    assert VectorStore.open(path).generation == head["generation"]


def test_an_npy_store_written_before_the_trailer_still_opens_and_gains_one(tmp_path):
    rng = np.random.default_rng(15)
    files = make_files(tmp_path / "img", ["a.jpg", "b.jpg"])
    path = tmp_path / "v.npy"
    vecs = unit(rng, 2, *DIMS)
    with StoreUpdate(path, meta()) as up:
        up.add(entry_for(files[0]), vecs[0])
        up.commit()
    path.write_bytes(path.read_bytes()[:-st.NPY_TRAILER_BYTES])  # as an older blip2 wrote it
    store = VectorStore.open(path)
    np.testing.assert_array_equal(np.asarray(store.matrix), vecs[:1])
    store.close()
    with StoreUpdate(path, meta()) as up:
        up.add(entry_for(files[1]), vecs[1])
        up.commit()
    assert VectorStore.open(path).generation == json.loads(pq.read_schema(index_path(path)).metadata[b"blip2"])["generation"]
    assert path.read_bytes()[-st.NPY_TRAILER_BYTES:].startswith(b"BLIP2GEN")
    path.write_bytes(path.read_bytes() + b"junk")  # neither a trailer nor none
    with pytest.raises(st.StoreError, match="not a blip2 vector store .44 unexpected bytes after its 2 rows"):
        VectorStore.open(path)


@pytest.mark.parametrize("name", ["v.npy", "v.safetensors"])
def test_an_index_from_another_commit_is_refused_even_with_the_same_rows(tmp_path, name):
    rng = np.random.default_rng(13)
    files = make_files(tmp_path / "img", ["a.jpg", "b.jpg"])
    a, b = tmp_path / ("a-" + name), tmp_path / ("b-" + name)
    for path in (a, b):
        with StoreUpdate(path, meta()) as up:
            for f, v in zip(files if path is a else files[::-1], unit(rng, 2, *DIMS)):
                up.add(entry_for(f), v)
            up.commit()
    shutil.copy(index_path(b), index_path(a))  # restored from another backup
    with pytest.raises(st.StoreError, match="different commits"):
        VectorStore.open(a)


# --------------------------------------------------------------------------- #
# Clear errors (case 13)
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("name", ["v.npy", "v.safetensors"])
def test_a_truncated_store_is_a_clear_error(tiny_itm, photos, tmp_path, name):
    path = tmp_path / name
    assert cli("embed", photos, "-m", tiny_itm, "-o", path).exit_code == 0
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 700)
    with pytest.raises(st.StoreError, match="is truncated") as info:
        VectorStore.open(path)
    assert "rebuild" in info.value.hint
    for args in (["search", "a cat", "--index", path], ["search", "a cat", photos, "--index", path],
                 ["embed", photos, "-o", path]):
        res = cli(*args, "-m", tiny_itm)
        assert res.exit_code == 2, res.output
        assert "is truncated" in res.stderr and "mmap" not in res.stderr and "ValueError" not in res.stderr


def test_rows_that_do_not_match_say_what_to_do(tmp_path):
    rng = np.random.default_rng(14)
    files = make_files(tmp_path / "img", ["a.jpg", "b.jpg", "c.jpg"])
    a, b = tmp_path / "a.npy", tmp_path / "b.npy"
    for path, n in ((a, 2), (b, 3)):
        with StoreUpdate(path, meta()) as up:
            for f, v in zip(files[:n], unit(rng, n, *DIMS)):
                up.add(entry_for(f), v)
            up.commit()
    shutil.copy(index_path(b), index_path(a))
    with pytest.raises(st.StoreError) as info:
        VectorStore.open(a)
    message = str(info.value)
    assert "come from different commits" in message and "the matrix has 2 rows, the index 3" in message
    assert "restore both files from the same copy" in info.value.hint


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
