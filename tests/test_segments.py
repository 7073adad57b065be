"""Issue 15 / 18: the vector store's segments (appends cost O(new rows), pruning without
rewriting, compaction, crash safety, a Parquet index readable without blip2), the
clip-retrieval export read back by numpy/pyarrow/faiss, --ann, and the streaming merge."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from blip2cli import store as st
from blip2cli.sources import Item
from blip2cli.store import StoreUpdate, VectorStore, top_k

from helpers import DIMS, entry_for, make_files, unit, store_meta as meta

pytest.importorskip("pyarrow")


def add(path, files, vectors, m=None, **kw) -> st.UpdateStats:
    with StoreUpdate(path, m or meta(), **kw) as up:
        for f, v in zip(files, vectors):
            up.add(entry_for(f), v)
        return up.commit()


def seg_files(path: Path) -> set[str]:
    return {p.name for p in path.iterdir() if p.name.startswith("seg-")}


def manifest(path: Path) -> dict:
    return json.loads((path / st.MANIFEST).read_text())


def names(store) -> list[str]:
    return [Path(e.path).name for e in store.entries]


# --------------------------------------------------------------------------- #
# Segments
# --------------------------------------------------------------------------- #


def test_an_append_writes_a_new_segment_and_leaves_the_old_files_alone(tmp_path):
    rng = np.random.default_rng(0)
    files = make_files(tmp_path / "img", [f"{i:02d}.jpg" for i in range(12)])
    vecs = unit(rng, 12, *DIMS)
    path = tmp_path / "store"
    add(path, files[:10], vecs[:10])
    before = {n: ((path / n).stat().st_mtime_ns, (path / n).read_bytes()) for n in seg_files(path)}
    stats = add(path, files[10:], vecs[10:])  # 2 rows after 10: no merge (10 > 2 x 2)
    assert stats.added == 2 and stats.rows == 12 and stats.compacted == 0
    after = seg_files(path)
    assert set(before) < after and len(after) == 4  # the old pair untouched, one new pair
    for n, (mtime, data) in before.items():
        assert (path / n).stat().st_mtime_ns == mtime and (path / n).read_bytes() == data
    store = VectorStore.open(path)
    assert [s.rows for s in store.segments] == [10, 2]
    np.testing.assert_array_equal(np.asarray(store.matrix), vecs)
    assert names(store) == [f.name for f in files]
    assert store.row_of(os.path.abspath(files[11])) == 11


def test_the_index_and_vectors_read_without_blip2(tmp_path):
    """The README's five-line reader (numpy + pandas), and pyarrow alone."""
    pd = pytest.importorskip("pandas")
    import pyarrow.parquet as pq

    rng = np.random.default_rng(1)
    files = make_files(tmp_path / "img", [f"{i}.jpg" for i in range(6)])
    vecs = unit(rng, 6, *DIMS)
    path = tmp_path / "store"
    add(path, files[:4], vecs[:4])
    add(path, files[4:], vecs[4:])
    files[1].unlink()
    with StoreUpdate(path, meta(), prune=True) as up:
        up.commit()
    got_paths, got_vecs = [], []
    m = json.load(open(path / "blip2-store.json"))
    for seg in m["segments"]:
        rows = pd.read_parquet(path / seg["index"]).drop(index=seg["deleted"])
        vectors = np.load(path / seg["vectors"], mmap_mode="r")[rows.index]
        got_paths += list(rows["path"])
        got_vecs.append(vectors)
    assert got_paths == [str(f) for i, f in enumerate(files) if i != 1]
    np.testing.assert_array_equal(np.concatenate(got_vecs), vecs[[0, 2, 3, 4, 5]])
    table = pq.read_table(path / m["segments"][0]["index"])  # no header line to skip
    assert table.column_names == ["path", "abspath", "size", "mtime_ns", "sha256"]
    assert table.num_rows == m["segments"][0]["rows"]


def test_prune_and_changed_files_do_not_rewrite_untouched_segments(tmp_path):
    rng = np.random.default_rng(2)
    files = make_files(tmp_path / "img", [f"{i:02d}.jpg" for i in range(44)])
    vecs = unit(rng, 44, *DIMS)
    path = tmp_path / "store"
    add(path, files[:40], vecs[:40])
    add(path, files[40:], vecs[40:])
    big = VectorStore.open(path).segments[0]
    big_bytes = (path / big.vectors).read_bytes()
    # 3 of the big segment's 40 files are deleted, one changed, one touched (same bytes)
    for i in (2, 5, 9):
        files[i].unlink()
    files[7].write_bytes(b"changed!")
    os.utime(files[8], ns=(files[8].stat().st_atime_ns, files[8].stat().st_mtime_ns + 5_000_000_000))
    items = [Item(str(f), str(f)) for f in files if f.exists()]
    fresh = unit(rng, 1, *DIMS)[0]
    with StoreUpdate(path, meta(), prune=True) as up:
        todo = [i.name for i in up.select(items)]
        assert todo == [str(files[7])]
        up.add(entry_for(files[7]), fresh)
        stats = up.commit()
    assert (stats.pruned, stats.changed, stats.unchanged, stats.added) == (3, 1, 40, 1)
    assert (path / big.vectors).read_bytes() == big_bytes  # rows removed by number, not rewritten
    store = VectorStore.open(path)
    assert store.rows == 41 and stats.rows == 41
    deleted = {s.id: list(s.deleted) for s in store.segments}
    assert deleted[big.id] == [2, 5, 7, 8, 9]  # 8 moved (its new mtime), 7 changed
    want = {f.name: vecs[i] for i, f in enumerate(files) if i not in (2, 5, 9)}
    want[files[7].name] = fresh
    got = dict(zip(names(store), np.asarray(store.matrix)))
    assert sorted(got) == sorted(want)
    for name, v in want.items():
        np.testing.assert_array_equal(got[name], v)
    e8 = store.entries[store.row_of(os.path.abspath(files[8]))]
    assert e8.mtime_ns == files[8].stat().st_mtime_ns
    q = unit(rng, 8)
    exact = sorted(want, key=lambda n: -float((want[n] @ q).max()))[:5]
    assert [names(store)[h.row] for h in top_k(store, q, 5, mode="text", chunk_rows=3)] == exact
    subset = [0, 4, 9, 16, 40]
    hits = top_k(store, q, 2, mode="image", rows=subset)
    pooled = np.asarray(store.matrix)[subset].mean(axis=1)
    pooled /= np.linalg.norm(pooled, axis=1, keepdims=True)
    assert [h.row for h in hits] == [subset[i] for i in np.argsort(-(pooled @ q), kind="stable")[:2]]


def test_compaction_is_amortised_and_explicit(tmp_path):
    rng = np.random.default_rng(3)
    n = 64
    files = make_files(tmp_path / "img", [f"{i:03d}.jpg" for i in range(n)])
    vecs = unit(rng, n, *DIMS)
    path = tmp_path / "store"
    copied = 0
    for i in range(0, n, 2):  # 32 appends of 2 rows
        copied += add(path, files[i:i + 2], vecs[i:i + 2]).compacted
        segs = VectorStore.open(path).segments
        assert len(segs) <= 2 + int(np.log2(i + 2))  # O(log rows) segments
    assert copied <= n * (1 + int(np.log2(n)))  # each row copied O(log rows) times
    store = VectorStore.open(path)
    np.testing.assert_array_equal(np.asarray(store.matrix), vecs)
    assert names(store) == [f.name for f in files]
    # a segment more than half deleted is rewritten at the next commit
    for f in files[:60]:
        f.unlink()
    with StoreUpdate(path, meta(), prune=True) as up:
        assert up.commit().pruned == 60
    store = VectorStore.open(path)
    assert all(len(s.deleted) <= st.DELETED_FRACTION * s.rows for s in store.segments)
    np.testing.assert_array_equal(np.asarray(store.matrix), vecs[60:])
    # --compact: one segment, no deleted rows
    add(path, [], [], compact=True)
    store = VectorStore.open(path)
    assert len(store.segments) == 1 and not len(store.segments[0].deleted)
    assert len(seg_files(path)) == 2
    np.testing.assert_array_equal(np.asarray(store.matrix), vecs[60:])


def test_failures_are_remembered_and_an_unchanged_store_is_not_written(tmp_path):
    files = make_files(tmp_path / "img", ["a.jpg", "b.jpg"])
    path = tmp_path / "store"
    with StoreUpdate(path, meta()) as up:
        up.add(entry_for(files[0]), unit(np.random.default_rng(4), *DIMS))
        up.fail(str(files[1]), os.path.abspath(files[1]), "cannot decode")
        assert up.commit().failed == 1
    assert list(VectorStore.open(path).failed) == [os.path.abspath(files[1])]
    before = (path / st.MANIFEST).read_bytes()
    with StoreUpdate(path, meta()) as up:
        assert [i.name for i in up.select([Item(str(f), str(f)) for f in files])] == [str(files[1])]
        up.fail(str(files[1]), os.path.abspath(files[1]), "cannot decode")
        up.commit()
        assert up.stats.retried == 1
    assert (path / st.MANIFEST).read_bytes() == before


def test_an_empty_store(tmp_path):
    path = tmp_path / "store"
    add(path, [], [])
    store = VectorStore.open(path)
    assert store.rows == 0 and store.matrix is None and top_k(store, np.ones(8, np.float32), 3, mode="text") == []
    assert st.is_store_path(path) and not st.is_store_path(tmp_path)


def test_other_settings_are_refused(tmp_path):
    from blip2cli.errors import UsageError

    path = tmp_path / "store"
    add(path, make_files(tmp_path / "img", ["a.jpg"]), unit(np.random.default_rng(5), 1, *DIMS))
    with pytest.raises(UsageError, match="model 'tiny' .store. vs 'other'"):
        StoreUpdate(path, meta(model="other"))
    with pytest.raises(st.StoreError, match="another blip2 process"):
        with StoreUpdate(path, meta()):
            StoreUpdate(path, meta())


# --------------------------------------------------------------------------- #
# Crash safety and the generation tie
# --------------------------------------------------------------------------- #


def test_a_crash_before_the_manifest_rename_leaves_the_old_store(tmp_path, monkeypatch):
    rng = np.random.default_rng(6)
    files = make_files(tmp_path / "img", [f"{i}.jpg" for i in range(8)])
    vecs = unit(rng, 8, *DIMS)
    path = tmp_path / "store"
    add(path, files[:6], vecs[:6])
    old_manifest, old_files = (path / st.MANIFEST).read_bytes(), seg_files(path)
    real = os.replace

    def replace(src, dst):
        if str(dst).endswith(st.MANIFEST):
            raise KeyboardInterrupt("simulated kill at the commit point")
        return real(src, dst)

    monkeypatch.setattr(st.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        add(path, files[6:], vecs[6:])
    monkeypatch.undo()
    assert (path / st.MANIFEST).read_bytes() == old_manifest
    assert seg_files(path) > old_files  # the new segment's files are left behind ...
    store = VectorStore.open(path)  # ... and ignored by readers
    np.testing.assert_array_equal(np.asarray(store.matrix), vecs[:6])
    with StoreUpdate(path, meta()) as up:  # ... and removed by the next writer
        up.commit()
    assert seg_files(path) == old_files


def test_a_segment_from_another_commit_is_refused(tmp_path):
    rng = np.random.default_rng(7)
    files = make_files(tmp_path / "img", ["a.jpg", "b.jpg"])
    a, b = tmp_path / "a", tmp_path / "b"
    add(a, files, unit(rng, 2, *DIMS))
    add(b, files[::-1], unit(rng, 2, *DIMS))
    seg_a, seg_b = manifest(a)["segments"][0], manifest(b)["segments"][0]
    # same row count, same dims: only the tie tells them apart
    (a / seg_a["vectors"]).write_bytes((b / seg_b["vectors"]).read_bytes())
    with pytest.raises(st.StoreError, match="has vectors from commit"):
        VectorStore.open(a)
    (a / seg_a["vectors"]).unlink()
    with pytest.raises(st.StoreError, match="is incomplete"):
        VectorStore.open(a)
    add(b, [], [])
    (b / seg_b["index"]).write_bytes((a / seg_a["index"]).read_bytes())
    with pytest.raises(st.StoreError, match="has an index from commit"):
        VectorStore.open(b)


KILLER = textwrap.dedent("""
    import os, sys
    import numpy as np
    from blip2cli.store import Entry, StoreMeta, StoreUpdate
    path, start = sys.argv[1], int(sys.argv[2])
    meta = StoreMeta(model="tiny", features="itc", pool="mean", dims=(64,), normalized=True)
    i = start
    while True:
        with StoreUpdate(path, meta) as up:
            for j in range(i, i + 50):
                p = f"/img/{j:06d}.jpg"
                up.add(Entry(p, p, j, j, f"{j:064x}"), np.full(64, j, np.float32))
            up.commit()
        i += 50
        print(i, flush=True)
""")


@pytest.mark.slow
def test_kill_9_during_updates_leaves_the_old_or_the_new_store(tmp_path):
    path = tmp_path / "store"
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    rows = 0
    for attempt in range(4):
        proc = subprocess.Popen([sys.executable, str(script), str(path), str(rows)], stdout=subprocess.PIPE,
                                env=env, text=True)
        try:
            proc.stdout.readline()  # at least one commit made by this process
            time.sleep(0.05 + 0.1 * attempt)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        store = VectorStore.open(path)
        assert store.rows % 50 == 0 and store.rows >= rows + 50
        matrix = np.asarray(store.matrix)
        np.testing.assert_array_equal(matrix[:, 0], np.arange(store.rows, dtype=np.float32))
        assert [e.size for e in store.entries] == list(range(store.rows))
        rows = store.rows
    with StoreUpdate(path, meta(dims=(64,))) as up:  # leftovers removed; the store is whole
        up.commit()
    named = {n for s in manifest(path)["segments"] for n in (s["vectors"], s["index"])}
    assert seg_files(path) == named


# --------------------------------------------------------------------------- #
# The command line: the default store, --compact, --prune, --ann, the clip-retrieval export
# --------------------------------------------------------------------------- #


@pytest.fixture
def many_photos(tmp_path, example_images):
    """12 different images (the examples, cropped and flipped)."""
    from PIL import Image

    folder = tmp_path / "photos"
    folder.mkdir()
    for i, src in enumerate(example_images * 3):
        with Image.open(src) as im:
            im = im.convert("RGB")
            w, h = im.size
            im = im.crop((w * (i % 3) // 10, 0, w, h - h * (i // 4) // 10))
            if i % 2:
                im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            im.save(folder / f"{i:02d}-{src.stem}.png")
    return folder


def cli(*args):
    from typer.testing import CliRunner

    from blip2cli.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def text_vector(model, text) -> np.ndarray:
    res = cli("embed", "--text", text, "-m", model, "-f", "jsonl")
    assert res.exit_code == 0, res.output
    return np.asarray(json.loads(res.stdout.splitlines()[0])["vector"], np.float32)


def search_paths(*args) -> list[str]:
    res = cli("search", *args, "-f", "jsonl")
    assert res.exit_code == 0, res.output
    return [Path(json.loads(line)["path"]).name for line in res.stdout.splitlines()]


@pytest.mark.parametrize("pool, vectors", [("mean", "mean"), ("none", "flatten")])
def test_clip_retrieval_export_is_read_by_numpy_pyarrow_and_faiss(tiny_itm, many_photos, tmp_path, pool, vectors):
    faiss = pytest.importorskip("faiss")
    import pyarrow.parquet as pq

    store, out = tmp_path / "vectors.safetensors", tmp_path / "clip"
    res = cli("embed", many_photos, "-m", tiny_itm, "-o", store, "--pool", pool)
    assert res.exit_code == 0, res.output
    res = cli("export", store, "-o", out, "--vectors", vectors)
    assert res.exit_code == 0, res.output
    emb = np.load(out / "img_emb" / "img_emb_0.npy")
    meta_table = pq.read_table(out / "metadata" / "metadata_0.parquet")
    q = 1 if vectors == "mean" else emb.shape[0] // 12
    assert emb.dtype == np.float32 and emb.ndim == 2 and emb.shape[0] == 12 * q
    assert meta_table.num_rows == emb.shape[0]
    paths = meta_table.column("image_path").to_pylist()
    assert sorted({Path(p).name for p in paths}) == sorted(p.name for p in many_photos.iterdir())
    index = faiss.IndexFlatIP(emb.shape[1])
    index.add(emb)
    query = text_vector(tiny_itm, "a cat on a sofa")
    _, ids = index.search(query[None], 10 * q)
    ranked = []
    for i in ids[0]:
        name = Path(paths[i]).name
        if name not in ranked:
            ranked.append(name)
    assert ranked[:10] == search_paths("a cat on a sofa", "--index", store, "-m", tiny_itm)
    # the store is incremental (a second run embeds nothing); exporting again removes leftovers
    res = cli("embed", many_photos, "-m", tiny_itm, "-o", store)
    assert res.exit_code == 0 and "0 new" in res.stderr, res.output
    (out / "img_emb" / "img_emb_7.npy").write_bytes(b"left over")
    assert cli("export", store, "-o", out, "--vectors", vectors).exit_code == 0
    assert not (out / "img_emb" / "img_emb_7.npy").exists()


def test_the_default_store_on_the_command_line(tiny_itm, many_photos, tmp_path):
    """README's first store example, no layout option: a folder of segments; appends add a
    segment, --prune --compact leave one."""
    out = tmp_path / "vectors.safetensors"
    res = cli("embed", *sorted(many_photos.iterdir())[:10], "-m", tiny_itm, "-o", out)
    assert res.exit_code == 0, res.output
    assert out.is_dir() and (out / st.MANIFEST).is_file()
    first = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name.startswith("seg-")}
    res = cli("embed", many_photos, "-m", tiny_itm, "-o", out)  # 2 more: a new segment, the old one kept
    assert res.exit_code == 0 and "2 new" in res.stderr, res.output
    assert all((out / n).stat().st_mtime_ns == t for n, t in first.items())
    assert len(VectorStore.open(out).segments) == 2
    exact = search_paths("a red rocket", "--index", out, "-m", tiny_itm, "-k", "5")
    assert len(exact) == 5
    for p in sorted(many_photos.iterdir())[:3]:
        p.unlink()
    res = cli("embed", many_photos, "-m", tiny_itm, "-o", out, "--prune", "--compact")
    assert res.exit_code == 0, res.output
    assert "9 rows" in res.stderr and "3 pruned" in res.stderr
    store = VectorStore.open(out)
    assert len(store.segments) == 1 and store.rows == 9
    res = cli("embed", many_photos, "-m", tiny_itm, "-o", tmp_path / "x.jsonl", "--compact")
    assert res.exit_code == 2 and "vector store" in res.stderr
    res = cli("embed", many_photos, "-m", tiny_itm, "-o", out, "--layout", "segments")
    assert res.exit_code == 2  # the option is gone: there is one store


def test_ann_search_finds_the_exact_top_k_on_a_small_store(tiny_itm, many_photos, tmp_path):
    pytest.importorskip("faiss")
    out = tmp_path / "vectors.npy"
    assert cli("embed", many_photos, "-m", tiny_itm, "-o", out).exit_code == 0
    exact = search_paths("a cat", "--index", out, "-m", tiny_itm, "-k", "5")
    assert search_paths("a cat", "--index", out, "-m", tiny_itm, "-k", "5", "--ann") == exact
    gen = VectorStore.open(out).generation
    assert (out / f"ann-{gen}.faiss").exists()  # saved for the next search
    res = cli("search", "a cat", many_photos, "--index", out, "-m", tiny_itm, "--ann")
    assert res.exit_code == 2 and "--ann searches a whole vector store" in res.stderr


def test_ann_on_an_empty_store_is_a_clear_message(tiny_itm, tmp_path):
    """Issue 19 #15: "TypeError: 'NoneType' object is not subscriptable" before."""
    pytest.importorskip("faiss")
    out = tmp_path / "empty.safetensors"
    add(out, [], [], meta(dims=(8,), pool="mean"))
    res = cli("search", "a cat", "--index", out, "-m", tiny_itm, "--ann")
    assert res.exit_code == 2, res.output
    assert "is empty" in res.stderr and "TypeError" not in res.stderr and "Traceback" not in res.stderr
    from blip2cli import ann

    with pytest.raises(st.StoreError, match="is empty"):
        ann.build(VectorStore.open(out))


def test_ann_on_a_tiny_store_prints_no_faiss_warning(tmp_path, capfd):
    """Issue 19: faiss printed "WARNING clustering 8 points to 1 centroids" on tiny stores."""
    pytest.importorskip("faiss")
    from blip2cli import ann

    rng = np.random.default_rng(30)
    files = make_files(tmp_path / "img", [f"{i}.jpg" for i in range(8)])
    vecs = unit(rng, 8, 8)
    path = tmp_path / "v.npy"
    add(path, files, vecs, meta(dims=(8,), pool="mean"))
    store = VectorStore.open(path)
    hits = ann.search(store, ann.load_or_build(store), vecs[5], 3)
    assert [h.row for h in hits] == [h.row for h in top_k(store, vecs[5], 3, mode="text")] and hits[0].row == 5
    assert "WARNING" not in capfd.readouterr().err
    # a bigger store still gets the inverted-file index
    many = unit(rng, 700, 8)
    big = tmp_path / "big.npy"
    add(big, make_files(tmp_path / "many", [f"{i}.jpg" for i in range(700)]), many, meta(dims=(8,), pool="mean"))
    import faiss

    index = ann.build(VectorStore.open(big))
    assert faiss.extract_index_ivf(index).nlist > 1


# --------------------------------------------------------------------------- #
# blip2 merge streams (same output as the in-memory merge it replaces)
# --------------------------------------------------------------------------- #


def reference_merge(names, part_lines, key_of):
    """The in-memory algorithm merge used before (issue 15): the output must not change."""
    by_path: dict = {}
    for lines in part_lines:
        for line in lines:
            record = json.loads(line)
            slot = by_path.setdefault(record["path"], {})
            key = key_of(record)
            best = slot.get(key)
            if best is None or (best.get("error") and not record.get("error")):
                slot[key] = record
    out, missing = [], []
    for name in names:
        slot = by_path.get(name)
        if not slot:
            missing.append(name)
            continue
        out += [json.dumps(r, ensure_ascii=False) + "\n" for r in slot.values()]
    return "".join(out), missing


@pytest.mark.parametrize("command", ["caption", "ask"])
def test_streaming_merge_gives_the_same_output(tmp_path, command):
    from blip2cli.parts import RECORD_KEYS, PartsDir

    rng = np.random.default_rng(20)
    root = tmp_path / "out"
    parts = PartsDir(root, command)
    names = [f"img/{i:03d}-\u00e9\u2028.jpg" for i in range(60)]
    settings = {"model": "m", "max_new_tokens": 4}
    parts.write_manifest(names, settings)
    part_lines = []
    for shard in range(3):  # shards in any order, errors redone later, duplicates, questions
        lines = []
        for _ in range(80):
            name = names[int(rng.integers(0, 55))]  # the last 5 inputs have no record
            rec = {"path": name, "caption": f"c{rng.integers(0, 9)}", **settings,
                   "error": "boom" if rng.random() < 0.3 else None}
            if command == "ask":
                rec["question"] = ["what?", "who?"][int(rng.integers(0, 2))]
            lines.append(json.dumps(rec, ensure_ascii=False) + "\n")
        part_lines.append(lines)
        body = "".join(lines) + ('{"path": "torn' if shard == 1 else "")
        (parts.parts / f"part-{shard:05d}-of-00003.jsonl").write_text(body, encoding="utf-8")
    want, want_missing = reference_merge(names, part_lines, RECORD_KEYS[command])
    written, missing = parts.merge(RECORD_KEYS[command])
    # inputs missing: they are named, and nothing is written under the final name (issue 19)
    assert not parts.final.exists() and written == 0
    assert missing == want_missing and names[-5:] == missing[-5:]
    assert sorted(p.name for p in parts.parts.iterdir() if p.name.startswith(".")) == []  # no temporary files
    # the missing inputs' records arrive in one more part: the in-memory merge's output exactly
    late = [json.dumps({"path": name, "caption": "late", **settings, "error": None,
                        **({"question": "what?"} if command == "ask" else {})}, ensure_ascii=False) + "\n"
            for name in want_missing]
    (parts.parts / "part-00003-of-00004.jsonl").write_text("".join(late), encoding="utf-8")
    part_lines.append(late)
    want, want_missing = reference_merge(names, part_lines, RECORD_KEYS[command])
    written, missing = parts.merge(RECORD_KEYS[command])
    assert parts.final.read_text(encoding="utf-8") == want
    assert missing == want_missing == []
    assert written == want.count("\n")
    assert sorted(p.name for p in parts.parts.iterdir() if p.name.startswith(".")) == []  # no temporary files


@pytest.mark.parametrize("command", ["caption", "ask"])
def test_merge_copies_lines_as_bytes_only_when_they_are_what_it_would_write(tmp_path, command):
    """Lines already in merge's own form are copied as bytes; any other spelling of the same
    JSON (\\u escapes, compact separators, another key order) is written the way merge writes it."""
    from blip2cli.parts import RECORD_KEYS, PartsDir

    rng = np.random.default_rng(21)
    root = tmp_path / "out"
    parts = PartsDir(root, command)
    names = [f"img/{i:03d}-\u00e9-\udcff.jpg" for i in range(40)]  # \udcff: an undecodable byte
    settings = {"model": "m", "max_new_tokens": 4}
    parts.write_manifest(names, settings)
    spellings = [
        lambda r: json.dumps(r, ensure_ascii=False),
        lambda r: json.dumps(r),  # \u00e9, \udcff
        lambda r: json.dumps(r, ensure_ascii=False, separators=(",", ":")),
        lambda r: json.dumps(dict(reversed(list(r.items()))), ensure_ascii=False),
    ]
    part_lines = []
    for shard in range(2):
        lines = []
        for i in range(60):
            rec = {"path": names[int(rng.integers(0, 38))], "caption": f"c\u2028{i}", **settings,
                   "error": "boom" if rng.random() < 0.3 else None}
            if command == "ask":
                rec["question"] = ["what?", "who?"][int(rng.integers(0, 2))]
            lines.append(spellings[i % len(spellings)](rec) + "\n")
        part_lines.append(lines)
        (parts.parts / f"part-{shard:05d}-of-00002.jsonl").write_bytes(
            "".join(lines).encode("utf-8", "surrogateescape"))
    # every input needs a record for merge to write the file (issue 19): the rest in a last part
    _, absent = reference_merge(names, part_lines, RECORD_KEYS[command])
    late = [spellings[i % len(spellings)]({"path": name, "caption": "late", **settings, "error": None,
                                           **({"question": "what?"} if command == "ask" else {})}) + "\n"
            for i, name in enumerate(absent)]
    part_lines.append(late)
    (parts.parts / "part-00002-of-00003.jsonl").write_bytes("".join(late).encode("utf-8", "surrogateescape"))
    want, want_missing = reference_merge(names, part_lines, RECORD_KEYS[command])
    written, missing = parts.merge(RECORD_KEYS[command])
    assert absent and want_missing == []
    assert parts.final.read_bytes() == want.encode("utf-8", "surrogateescape")
    assert missing == want_missing and written == want.count("\n")
