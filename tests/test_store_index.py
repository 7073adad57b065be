"""The vector store's index has no header-line trap (issue 15): one row per image,
the settings where readers expect them; the documented numpy/pandas readers run
verbatim; stores written with the old JSON Lines index still open and migrate."""

from __future__ import annotations

import json
import os
import re
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from blip2cli import segments as sg
from blip2cli import store as st
from blip2cli.cli import app
from blip2cli.store import StoreUpdate, VectorStore, index_path, legacy_index_path

from helpers import DIMS, entry_for, make_files, unit, store_meta as meta

runner = CliRunner()


def write(path, files, vectors, **kw):
    with StoreUpdate(path, meta(), **kw) as up:
        for f, v in zip(files, vectors):
            up.add(entry_for(f), v)
        return up.commit()


def snippets(doc: str) -> list[str]:
    """The code blocks of a docstring that import something (reST ``::`` blocks)."""
    out = []
    for block in re.findall(r"::\n\n((?:(?: {4,}.*)?\n)+)", doc):
        code = textwrap.dedent(block).strip()
        if code.startswith(("import", "from")):
            out.append(code)
    return out


def run_snippet(code: str, folder: Path) -> dict:
    here = os.getcwd()
    os.chdir(folder)
    try:
        ns: dict = {}
        exec(compile(code, "<reader>", "exec"), ns)
        return ns
    finally:
        os.chdir(here)


@pytest.mark.parametrize("name", ["vectors.npy", "vectors.safetensors"])
def test_a_fresh_index_is_one_row_per_image_with_a_path_column(tmp_path, name):
    files = make_files(tmp_path / "img", ["a.jpg", "b.jpg", "c.jpg"])
    write(tmp_path / name, files, unit(np.random.default_rng(0), 3, *DIMS))
    rows = pd.read_parquet(index_path(tmp_path / name))
    assert len(rows) == 3  # no header row
    assert list(rows.path) == [str(f) for f in files]
    assert list(rows.columns) == ["path", "abspath", "size", "mtime_ns", "sha256"]
    assert not legacy_index_path(tmp_path / name).exists()


def test_embed_through_the_cli_gives_a_plain_parquet_index(tiny_itm, example_images, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for p in example_images[:3]:
        (photos / p.name).write_bytes(p.read_bytes())
    path = tmp_path / "vectors.npy"
    res = runner.invoke(app, ["embed", str(photos), "-m", str(tiny_itm), "-o", str(path)])
    assert res.exit_code == 0, res.output
    rows = pd.read_parquet(index_path(path))
    images = sorted(p.name for p in photos.iterdir())
    assert sorted(Path(p).name for p in rows.path) == images and len(rows) == len(np.load(path))
    settings = json.loads(pq.read_schema(index_path(path)).metadata[b"blip2"])
    assert settings["rows"] == len(images) and settings["features"] == "itc"


@pytest.mark.parametrize("name", ["vectors.npy", "vectors.safetensors"])
def test_the_documented_single_file_reader_runs_verbatim(tmp_path, name):
    rng = np.random.default_rng(1)
    files = make_files(tmp_path / "img", ["a.jpg", "b.jpg", "c.jpg"])
    vecs = unit(rng, 3, *DIMS)
    write(tmp_path / name, files, vecs)
    code = [c for c in snippets(st.__doc__) if f'"{name}"' in c]
    assert len(code) == 1 and len(code[0].splitlines()) <= 5, code
    ns = run_snippet(code[0], tmp_path)
    assert list(ns["rows"].path) == [str(f) for f in files]
    np.testing.assert_array_equal(np.asarray(ns["vectors"]), vecs)
    assert ns["settings"]["rows"] == 3 and ns["settings"]["dims"] == list(DIMS)


def test_the_documented_segmented_reader_runs_verbatim(tmp_path):
    rng = np.random.default_rng(2)
    files = make_files(tmp_path / "img", [f"{i}.jpg" for i in range(6)])
    vecs = unit(rng, 6, *DIMS)
    store = tmp_path / "vectors"
    write(store, files[:4], vecs[:4], layout="segments")
    write(store, files[4:], vecs[4:], layout="segments")
    files[1].unlink()
    write(store, [], [], layout="segments", prune=True)  # a deleted row in the first segment
    want = VectorStore.open(store)
    assert len(want.segments) >= 1 and want.rows == 5
    code = snippets(sg.__doc__)
    assert len(code) == 1 and len(code[0].splitlines()) <= 5, code
    ns = run_snippet(code[0], tmp_path)
    assert list(ns["rows"].path) == [str(f) for i, f in enumerate(files) if i != 1]
    np.testing.assert_array_equal(ns["vectors"], np.delete(vecs, 1, axis=0))


# --------------------------------------------------------------------------- #
# Stores written with the JSON Lines index (a header line, then the rows)
# --------------------------------------------------------------------------- #


def to_legacy(path: Path) -> None:
    """Rewrite a store's index as blip2 wrote it before the Parquet index."""
    index = st._read_index(index_path(path))
    head = {"format": "blip2-vector-store", "version": 1, "rows": index.rows, **index.meta.settings(),
            "matrix": path.name, "generation": index.generation, "created": index.created}
    with open(legacy_index_path(path), "w", encoding="utf-8") as f:
        f.write(json.dumps(head) + "\n")
        for row, e in enumerate(index.entries):
            f.write(json.dumps(e.to_json(row)) + "\n")
    index_path(path).unlink()


@pytest.mark.parametrize("name", ["v.npy", "v.safetensors"])
def test_an_old_jsonl_store_opens_and_its_next_update_migrates_it(tmp_path, name):
    rng = np.random.default_rng(3)
    files = make_files(tmp_path / "img", ["a.jpg", "b.jpg", "c.jpg"])
    vecs = unit(rng, 3, *DIMS)
    path = tmp_path / name
    write(path, files[:2], vecs[:2])
    generation = VectorStore.open(path).generation
    to_legacy(path)
    store = VectorStore.open(path)
    assert [e.path for e in store.entries] == [str(f) for f in files[:2]] and store.generation == generation
    store.close()
    # an update with nothing to embed still moves the index to Parquet (the matrix is untouched)
    before = path.read_bytes()
    write(path, [], [])
    assert not legacy_index_path(path).exists() and path.read_bytes() == before
    assert list(pd.read_parquet(index_path(path)).path) == [str(f) for f in files[:2]]
    assert VectorStore.open(path).generation == generation
    # and one that adds rows
    to_legacy(path)
    write(path, files[2:], vecs[2:])
    assert not legacy_index_path(path).exists()
    store = VectorStore.open(path)
    assert [e.path for e in store.entries] == [str(f) for f in files]
    np.testing.assert_array_equal(np.asarray(store.matrix), vecs)


def test_a_migration_torn_at_any_rename_leaves_a_whole_store(tmp_path, monkeypatch):
    rng = np.random.default_rng(4)
    files = make_files(tmp_path / "img", ["a.jpg", "b.jpg"])
    vecs = unit(rng, 2, *DIMS)
    path = tmp_path / "v.npy"
    real = os.replace
    for which in (1, 2):  # killed at the matrix's rename (before the commit point), or at the index's
        if path.exists():
            path.unlink()
            index_path(path).unlink()
        write(path, files[:1], vecs[:1])
        to_legacy(path)
        calls = {"n": 0}

        def replace(src, dst):
            calls["n"] += 1
            if calls["n"] == which:
                raise SystemExit("simulated kill")
            return real(src, dst)

        monkeypatch.setattr(st.os, "replace", replace)
        with pytest.raises(SystemExit):
            write(path, files[1:], vecs[1:])
        monkeypatch.undo()
        store = VectorStore.open(path)
        want = 1 if which == 1 else 2  # the old store, or the new one rolled forward
        assert store.rows == want and [e.path for e in store.entries] == [str(f) for f in files[:want]]
        np.testing.assert_array_equal(np.asarray(store.matrix), vecs[:want])
        store.close()
        write(path, [], [])  # the next writer cleans up and finishes the migration
        assert sorted(p.name for p in tmp_path.iterdir()) == ["img", "v.npy", "v.npy.index.parquet"]
        assert VectorStore.open(path).rows == want


def test_a_stale_jsonl_beside_the_parquet_index_is_not_read(tmp_path):
    rng = np.random.default_rng(5)
    files = make_files(tmp_path / "img", ["a.jpg", "b.jpg"])
    path = tmp_path / "v.safetensors"
    write(path, files[:1], unit(rng, 1, *DIMS))
    to_legacy(path)
    stale = legacy_index_path(path).read_bytes()
    write(path, files[1:], unit(rng, 1, *DIMS))
    legacy_index_path(path).write_bytes(stale)  # as a crash after the index's rename leaves it
    assert VectorStore.open(path).rows == 2


def test_an_index_from_another_commit_is_refused_in_either_format(tmp_path):
    rng = np.random.default_rng(6)
    files = make_files(tmp_path / "img", ["a.jpg", "b.jpg"])
    a, b = tmp_path / "a.npy", tmp_path / "b.npy"
    write(a, files, unit(rng, 2, *DIMS))
    write(b, files[::-1], unit(rng, 2, *DIMS))
    to_legacy(b)
    index_path(a).unlink()
    legacy_index_path(a).write_bytes(legacy_index_path(b).read_bytes())
    with pytest.raises(st.StoreError, match="different commits"):
        VectorStore.open(a)


def test_an_undecodable_file_name_round_trips_and_the_index_stays_utf8(tmp_path):
    rng = np.random.default_rng(7)
    good = make_files(tmp_path / "img", ["a.jpg"])[0]
    bad = Path(os.fsdecode(os.fsencode(str(tmp_path / "img")) + b"/caf\xe9.jpg"))
    try:
        bad.write_bytes(b"latin-1 name")
    except (OSError, UnicodeEncodeError):
        pytest.skip("the file system refuses undecodable names")
    path = tmp_path / "v.npy"
    write(path, [good, bad], unit(rng, 2, *DIMS))
    store = VectorStore.open(path)
    assert [e.path for e in store.entries] == [str(good), str(bad)]
    assert store.row_of(os.path.abspath(bad)) == 1
    rows = pd.read_parquet(index_path(path))
    assert rows.path[1].endswith("caf\ufffd.jpg") and rows.path_bytes[1] == os.fsencode(str(bad))
    assert rows.path_bytes[0] is None
