"""The vector store's index has no header-line trap (issue 15): one row per image,
the settings where readers expect them; the documented numpy/pandas reader runs
verbatim. (The JSON Lines index of pre-release stores is not read any more: 0.1.0
has one store format.)"""

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

from blip2cli import store as st
from blip2cli.cli import app
from blip2cli.store import StoreUpdate, VectorStore

from helpers import DIMS, entry_for, make_files, unit, store_meta as meta

runner = CliRunner()


def write(path, files, vectors, **kw):
    with StoreUpdate(path, meta(), **kw) as up:
        for f, v in zip(files, vectors):
            up.add(entry_for(f), v)
        return up.commit()


def index_path(path: Path, segment: int = 0) -> Path:
    """The Parquet index of a store's segment (the first by default)."""
    head = json.loads((path / st.MANIFEST).read_text())
    return path / head["segments"][segment]["index"]


def vectors_path(path: Path, segment: int = 0) -> Path:
    head = json.loads((path / st.MANIFEST).read_text())
    return path / head["segments"][segment]["vectors"]


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
    assert not list((tmp_path / name).glob("*.jsonl"))


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
    assert sorted(Path(p).name for p in rows.path) == images and len(rows) == len(np.load(vectors_path(path)))
    assert pq.read_schema(index_path(path)).metadata[b"blip2.segment"].decode() in vectors_path(path).name
    settings = json.loads((path / st.MANIFEST).read_text())
    assert settings["rows"] == len(images) and settings["features"] == "itc"


def test_the_documented_reader_runs_verbatim(tmp_path):
    rng = np.random.default_rng(2)
    files = make_files(tmp_path / "img", [f"{i}.jpg" for i in range(6)])
    vecs = unit(rng, 6, *DIMS)
    store = tmp_path / "vectors.safetensors"
    write(store, files[:4], vecs[:4])
    write(store, files[4:], vecs[4:])
    files[1].unlink()
    write(store, [], [], prune=True)  # a deleted row in the first segment
    want = VectorStore.open(store)
    assert len(want.segments) >= 1 and want.rows == 5
    code = snippets(st.__doc__)
    assert len(code) == 1 and len(code[0].splitlines()) <= 5, code
    ns = run_snippet(code[0], tmp_path)
    assert list(ns["rows"].path) == [str(f) for i, f in enumerate(files) if i != 1]
    np.testing.assert_array_equal(ns["vectors"], np.delete(vecs, 1, axis=0))


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
