"""The vector store without a model: format, append, incremental decisions, atomic
commits, locking, and chunked search against brute force."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from blip2cli import store as st
from blip2cli.errors import UsageError
from blip2cli.sources import Item
from blip2cli.store import StoreUpdate, VectorStore, top_k

from helpers import DIMS, crash_at_the_commit_point, entry_for, make_files, unit, store_meta as meta


def manifest(path: Path) -> dict:
    """The store's manifest: its settings, generation and segments."""
    return json.loads((path / st.MANIFEST).read_text())


def write_store(path: Path, files, vectors, m=None, prune=False) -> st.UpdateStats:
    with StoreUpdate(path, m or meta(), prune=prune) as up:
        for f, v in zip(files, vectors):
            up.add(entry_for(f), v)
        return up.commit()


@pytest.mark.parametrize("name", ["v.safetensors", "v.npy"])
def test_round_trip_and_standard_readers(tmp_path, name):
    rng = np.random.default_rng(0)
    files = make_files(tmp_path / "img", ["a.jpg", "b.jpg", "c.jpg"])
    vecs = unit(rng, 3, *DIMS)
    path = tmp_path / name
    stats = write_store(path, files, vecs)
    assert stats.rows == 3 and stats.added == 3 and stats.rewritten
    store = VectorStore.open(path)
    assert store.rows == 3 and store.meta.dims == DIMS
    np.testing.assert_array_equal(np.asarray(store.matrix), vecs)
    assert [e.path for e in store.entries] == [str(f) for f in files]
    # the store is a folder named by -o; its segment is a plain .npy for other tools
    assert path.is_dir()
    head = manifest(path)
    assert head["format"] == "blip2-vector-store" and head["rows"] == 3 and head["dims"] == list(DIMS)
    (seg,) = head["segments"]
    np.testing.assert_array_equal(np.load(path / seg["vectors"]), vecs)
    # the index: Parquet, one row per row (no header row)
    import pyarrow.parquet as pq

    table = pq.read_table(path / seg["index"])
    assert table.column("path").to_pylist() == [str(f) for f in files]
    # no leftovers (the writer's side file is gone)
    assert sorted(p.name for p in path.iterdir()) == sorted([st.MANIFEST, seg["vectors"], seg["index"]])


def test_append_keeps_old_rows_and_float16(tmp_path):
    rng = np.random.default_rng(1)
    files = make_files(tmp_path / "img", [f"{i}.jpg" for i in range(5)])
    vecs = unit(rng, 5, *DIMS)
    path = tmp_path / "v.safetensors"
    write_store(path, files[:3], vecs[:3], meta(dtype="float16"))
    with StoreUpdate(path, meta(), dtype_given=False) as up:  # keeps the store's dtype
        for f, v in zip(files[3:], vecs[3:]):
            up.add(entry_for(f), v)
        up.commit()
    store = VectorStore.open(path)
    assert store.meta.dtype == "float16" and store.rows == 5
    np.testing.assert_allclose(np.asarray(store.matrix, dtype=np.float32), vecs, atol=1e-3)
    assert [e.path for e in store.entries] == [str(f) for f in files]
    with pytest.raises(UsageError, match="float16"):
        StoreUpdate(path, meta(dtype="float32"), dtype_given=True)


def test_empty_store(tmp_path):
    path = tmp_path / "v.safetensors"
    write_store(path, [], [])
    store = VectorStore.open(path)
    assert store.rows == 0 and store.matrix is None
    assert top_k(store, np.ones(8, np.float32), 3, mode="text") == []


def test_select_reuses_unchanged_redoes_changed_and_prunes(tmp_path):
    rng = np.random.default_rng(2)
    folder = tmp_path / "img"
    files = make_files(folder, ["a.jpg", "b.jpg", "c.jpg", "d.jpg"])
    path = tmp_path / "v.npy"
    vecs = unit(rng, 4, *DIMS)
    write_store(path, files, vecs)

    # a: untouched; b: touched (new mtime, same bytes); c: changed; d: deleted; e: new
    os.utime(files[1], ns=(files[1].stat().st_atime_ns, files[1].stat().st_mtime_ns + 5_000_000_000))
    files[2].write_bytes(b"other content!")
    files[3].unlink()
    new = make_files(folder, ["e.jpg"])[0]
    items = [Item(str(p), str(p)) for p in (files[0], files[1], files[2], new)]
    with StoreUpdate(path, meta(), prune=False) as up:
        todo = [i.name for i in up.select(items)]
        assert todo == [str(files[2]), str(new)]
        assert (up.stats.new, up.stats.changed, up.stats.unchanged) == (1, 1, 2)
        fresh = unit(rng, 2, *DIMS)
        up.add(entry_for(files[2]), fresh[0])
        up.add(entry_for(new), fresh[1])
        up.commit()
    store = VectorStore.open(path)
    # kept rows first (a and d: no --prune), then the touched one (its row moves with its new
    # mtime: old segments are never rewritten) and the new ones in order
    assert [Path(e.path).name for e in store.entries] == ["a.jpg", "d.jpg", "b.jpg", "c.jpg", "e.jpg"]
    np.testing.assert_array_equal(np.asarray(store.matrix[:3]), vecs[[0, 3, 1]])
    np.testing.assert_array_equal(np.asarray(store.matrix[3:]), fresh)
    assert store.entries[2].mtime_ns == files[1].stat().st_mtime_ns  # the touch was recorded

    with StoreUpdate(path, meta(), prune=True) as up:
        assert list(up.select(items)) == []  # everything is current now
        stats = up.commit()
    assert stats.pruned == 1 and stats.rows == 4
    assert "d.jpg" not in {Path(e.path).name for e in VectorStore.open(path).entries}


def test_unchanged_store_is_not_rewritten(tmp_path):
    files = make_files(tmp_path / "img", ["a.jpg"])
    path = tmp_path / "v.safetensors"
    write_store(path, files, unit(np.random.default_rng(3), 1, *DIMS))
    before = {p.name: p.stat().st_mtime_ns for p in path.iterdir()}
    with StoreUpdate(path, meta()) as up:
        assert list(up.select([Item(str(files[0]), str(files[0]))])) == []
        stats = up.commit()
    assert not stats.rewritten
    assert {p.name: p.stat().st_mtime_ns for p in path.iterdir()} == before


def test_other_settings_are_refused(tmp_path):
    files = make_files(tmp_path / "img", ["a.jpg"])
    path = tmp_path / "v.safetensors"
    write_store(path, files, unit(np.random.default_rng(4), 1, *DIMS))
    with pytest.raises(UsageError, match="model 'tiny' .store. vs 'other'"):
        StoreUpdate(path, meta(model="other"))
    with pytest.raises(UsageError, match="pool"):
        StoreUpdate(path, meta(dims=(8,), pool="mean"))


def test_one_writer_at_a_time(tmp_path):
    path = tmp_path / "v.safetensors"
    with StoreUpdate(path, meta()):
        with pytest.raises(st.StoreError, match="another blip2 process"):
            StoreUpdate(path, meta())
    with StoreUpdate(path, meta()) as up:  # released
        up.commit()


def seg_files(path: Path) -> set[str]:
    return {p.name for p in path.iterdir() if p.name.startswith("seg-")}


def state(path: Path) -> tuple:
    """The store as a reader sees it: the manifest's bytes and the named files' bytes."""
    head = manifest(path)
    named = sorted(n for s in head["segments"] for n in (s["vectors"], s["index"]))
    return (path / st.MANIFEST).read_bytes(), [(n, (path / n).read_bytes()) for n in named]


@pytest.mark.parametrize("name", ["v.safetensors", "v.npy"])
def test_crash_before_the_commit_point_leaves_the_old_store(tmp_path, monkeypatch, name):
    rng = np.random.default_rng(5)
    files = make_files(tmp_path / "img", ["a.jpg", "b.jpg"])
    path = tmp_path / name
    old = unit(rng, 1, *DIMS)
    write_store(path, files[:1], old)
    old_state, old_files = state(path), seg_files(path)

    # a crash while the new segment is being written (the copy loop fails)
    real_write_segment = st._write_segment

    def broken(*a, **k):
        real_write_segment(*a, **k)
        raise KeyboardInterrupt("simulated crash after writing the new segment")

    monkeypatch.setattr(st, "_write_segment", broken)
    with pytest.raises(KeyboardInterrupt):
        write_store(path, files[1:], unit(rng, 1, *DIMS))
    monkeypatch.undo()
    assert state(path) == old_state

    # a crash at the commit point (the manifest's rename; kill -9 would leave the new files behind)
    crash_at_the_commit_point(monkeypatch)
    with pytest.raises(SystemExit):
        write_store(path, files[1:], unit(rng, 1, *DIMS))
    monkeypatch.undo()
    assert state(path) == old_state
    store = VectorStore.open(path)
    np.testing.assert_array_equal(np.asarray(store.matrix), old)

    # kill -9 while writing: half-written files are left behind; readers ignore them and
    # the next writer removes them
    (path / ("seg-" + "f" * 32 + ".npy")).write_bytes(b"half a segment")
    (path / (st.MANIFEST + ".tmp")).write_bytes(b'{"half a manifest')
    np.testing.assert_array_equal(np.asarray(VectorStore.open(path).matrix), old)
    with StoreUpdate(path, meta()) as up:
        up.commit()
    assert seg_files(path) == old_files and not (path / (st.MANIFEST + ".tmp")).exists()
    assert state(path) == old_state


def test_a_file_or_a_foreign_folder_is_not_a_store(tmp_path):
    """0.1.0 has one store format: a single-file store of a pre-release blip2 is refused with
    what to do, never read, and a folder of other files is never written into."""
    old = tmp_path / "old.safetensors"
    old.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    with pytest.raises(st.StoreError, match="is a file, not a blip2 vector store"):
        VectorStore.open(old)
    with pytest.raises(st.StoreError, match="is a file, not a blip2 vector store"):
        StoreUpdate(old, meta())
    plain = tmp_path / "plain.npy"
    np.save(plain, np.zeros((2, 3), np.float32))
    with pytest.raises(st.StoreError, match="is a file"):
        VectorStore.open(plain)
    photos = tmp_path / "photos.npy"
    make_files(photos, ["a.jpg"])
    with pytest.raises(st.StoreError, match="not a blip2 vector store"):
        StoreUpdate(photos, meta())
    assert sorted(p.name for p in photos.iterdir()) == ["a.jpg"]
    with pytest.raises(st.StoreError, match="no vector store"):
        VectorStore.open(tmp_path / "missing.npy")


def brute_force(matrix, query, mode, rows=None):
    m = np.asarray(matrix, dtype=np.float64)
    q = np.asarray(query, dtype=np.float64)
    if mode == "text":
        scores = (m @ q).max(axis=1) if m.ndim == 3 else m @ q
    else:
        pooled = m.mean(axis=1) if m.ndim == 3 else m
        pooled = pooled / np.linalg.norm(pooled, axis=1, keepdims=True)
        scores = pooled @ q
    ids = np.arange(len(m)) if rows is None else np.asarray(sorted(rows))
    order = sorted(ids, key=lambda i: (-scores[i], i))
    return [int(i) for i in order], scores


@pytest.mark.parametrize("dims, mode", [((4, 8), "text"), ((8,), "text"), ((4, 8), "image"), ((8,), "image")])
@pytest.mark.parametrize("chunk", [1, 7, 1000])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_chunked_search_equals_brute_force(tmp_path, dims, mode, chunk, dtype):
    rng = np.random.default_rng(9)
    n = 50
    files = make_files(tmp_path / "img", [f"{i}.jpg" for i in range(n)])
    vecs = unit(rng, n, *dims).astype(dtype).astype(np.float32)  # what the store holds
    path = tmp_path / "v.npy"
    write_store(path, files, vecs, meta(dims=dims, dtype=dtype))
    store = VectorStore.open(path)
    query = unit(rng, dims[-1])
    want, scores = brute_force(vecs, query, mode)
    for k in (1, 5, n + 3):
        hits = top_k(store, query, k, mode=mode, chunk_rows=chunk)
        assert [h.row for h in hits] == want[:k]
        np.testing.assert_allclose([h.score for h in hits], scores[want[:k]], rtol=1e-5, atol=1e-6)
    subset = [3, 17, 18, 40, 49]
    want_sub, _ = brute_force(vecs, query, mode, rows=subset)
    assert [h.row for h in top_k(store, query, 3, mode=mode, rows=subset, chunk_rows=chunk)] == want_sub[:3]


def test_ties_go_to_the_lower_row(tmp_path):
    files = make_files(tmp_path / "img", [f"{i}.jpg" for i in range(6)])
    vecs = np.zeros((6, 8), np.float32)
    vecs[:, 0] = [0.5, 1, 1, 0.5, 1, 0.2]
    path = tmp_path / "v.npy"
    write_store(path, files, vecs, meta(dims=(8,), normalized=False))
    q = np.eye(8, dtype=np.float32)[0]
    assert [h.row for h in top_k(VectorStore.open(path), q, 4, mode="text", chunk_rows=2)] == [1, 2, 4, 0]


def test_float16_conversion_is_the_same_with_or_without_torch(monkeypatch):
    import sys

    src = np.random.default_rng(10).standard_normal((5, 4, 8)).astype(np.float16)
    want = src.astype(np.float32)
    pytest.importorskip("torch")
    got_torch = st._as_float32(src, np.empty(src.shape, np.float32))
    monkeypatch.delitem(sys.modules, "torch")
    got_numpy = st._as_float32(src, np.empty(src.shape, np.float32))
    np.testing.assert_array_equal(got_torch, want)
    np.testing.assert_array_equal(got_numpy, want)


def test_disk_full_during_an_update_keeps_the_old_store_and_says_so(tmp_path, monkeypatch):
    """Issue 19 #18: ENOSPC while the new segment (or the side file) is written: a StoreError
    that says the store is intact and what to do; nothing half-written is left."""
    import errno

    rng = np.random.default_rng(20)
    files = make_files(tmp_path / "img", ["a.jpg", "b.jpg", "c.jpg"])
    path = tmp_path / "v.safetensors"
    write_store(path, files[:1], unit(rng, 1, *DIMS))
    before = state(path)
    real_write_segment = st._write_segment

    def full(folder, *a, **k):
        real_write_segment(folder, *a, **k)  # its files are on disk ...
        raise OSError(errno.ENOSPC, "No space left on device")  # ... then the index (say) does not fit

    monkeypatch.setattr(st, "_write_segment", full)
    with pytest.raises(st.StoreError, match="disk is full.*It is intact: its previous version .1 rows") as info:
        write_store(path, files[1:], unit(rng, 2, *DIMS))
    assert "free some disk space" in info.value.hint and "run the same command again" in info.value.hint
    monkeypatch.undo()
    assert state(path) == before and len(seg_files(path)) == 2
    assert not (path / ".pending").exists()

    class Full:
        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    with StoreUpdate(path, meta()) as up:  # the side file of new rows fills the disk
        up._lock.fh, real = Full(), up._lock.fh
        with pytest.raises(st.StoreError, match="disk is full.*intact"):
            up.add(entry_for(files[1]), unit(rng, 1, *DIMS)[0])
        up._lock.fh = real
    assert state(path) == before


def test_stale_temporary_files_of_ours_are_removed_by_the_next_writer(tmp_path):
    """Issue 19: kill -9 while the faiss index was saved left a .blip2-*.tmp that no later
    run removed. The next writer removes ours once they are stale, never a fresh one."""
    path = tmp_path / "v.npy"
    write_store(path, [], [])
    stale, fresh = path / ".blip2-abc123.tmp", path / ".blip2-def456.tmp"
    stale.write_bytes(b"half an index")
    fresh.write_bytes(b"being written now")
    old = os.stat(stale).st_mtime - 3600
    os.utime(stale, (old, old))
    other = path / "notes.tmp"
    other.write_bytes(b"not ours")
    with StoreUpdate(path, meta()) as up:
        up.commit()
    assert not stale.exists() and fresh.exists() and other.exists()


def test_verify_rehashes_only_a_segment_that_is_not_the_file_its_commit_wrote(tmp_path, monkeypatch):
    """A served store is checked against its checksums (issue 19 #12), but an unchanged
    segment (same inode, size, mtime and ctime as its commit recorded) is not read again: an
    --ann query stays milliseconds. Any write changes the ctime, which nobody can set back."""
    import time

    rng = np.random.default_rng(21)
    files = make_files(tmp_path / "img", [f"{i}.jpg" for i in range(4)])
    path = tmp_path / "v.npy"
    write_store(path, files, unit(rng, 4, *DIMS))
    store = VectorStore.open(path)
    calls = []
    real = st._Checksum.paths
    monkeypatch.setattr(st._Checksum, "paths", lambda self, table: calls.append(1) or real(self, table))
    store.verify()
    assert calls == []  # the files are the ones written: trusted
    store.verify(full=True)
    assert calls == [1]
    # rows swapped in place, the file's mtime set back: the ctime still tells
    time.sleep(0.05)
    (seg,) = store.segments
    npy = path / seg.vectors
    before = npy.stat()
    arr = np.load(npy, mmap_mode="r+")
    arr[[0, 1]] = arr[[1, 0]]
    arr.flush()
    del arr
    os.utime(npy, ns=(before.st_atime_ns, before.st_mtime_ns))
    with pytest.raises(st.StoreError, match=f"{seg.vectors} does not match its checksum"):
        VectorStore.open(path).verify()
