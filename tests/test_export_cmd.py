"""``blip2 export``: any store (single-file or segmented) into clip-retrieval's layout,
read back with numpy, pyarrow and faiss (the same top-10 as ``blip2 search``), and a
single-file store copied into a segmented one."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from blip2cli import store as st
from blip2cli.cli import app
from blip2cli.store import Entry, StoreUpdate, VectorStore, top_k

runner = CliRunner()
EXTRA = 40  # rows added beside the real photos, so that a top-10 means something


def cli(*args):
    return runner.invoke(app, [*map(str, args)])


@pytest.fixture
def store(tiny_itm, example_images, tmp_path) -> Path:
    """A real store of the tiny ITM model (3 photos, its query vectors each) plus EXTRA rows."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for p in example_images[:3]:
        shutil.copy(p, photos / p.name)
    path = tmp_path / "vectors.safetensors"
    res = cli("embed", photos, "-m", tiny_itm, "-o", path)
    assert res.exit_code == 0, res.output
    meta = VectorStore.open(path).meta
    rng = np.random.default_rng(0)
    extra = tmp_path / "extra"
    extra.mkdir()
    with StoreUpdate(path, meta) as up:
        for i in range(EXTRA):
            f = extra / f"{i:02d}.jpg"
            f.write_bytes(b"%d" % i)
            size, mtime, digest = st.file_identity(str(f))
            v = rng.standard_normal(meta.dims).astype(np.float32)
            up.add(Entry(str(f), os.path.abspath(f), size, mtime, digest), v / np.linalg.norm(v, axis=-1, keepdims=True))
        up.commit()
    return path


def read_export(out: Path):
    files = sorted((out / "img_emb").glob("img_emb_*.npy"), key=lambda p: int(p.stem.split("_")[-1]))
    vectors = np.concatenate([np.load(p) for p in files])
    meta = sorted((out / "metadata").glob("metadata_*.parquet"), key=lambda p: int(p.stem.split("_")[-1]))
    tables = [pq.read_table(p) for p in meta]
    return vectors, {name: sum((t.column(name).to_pylist() for t in tables), []) for name in tables[0].column_names}


def text_vector(tiny_itm, text: str):
    res = cli("embed", "--text", text, "-m", tiny_itm, "-f", "jsonl")
    assert res.exit_code == 0, res.output
    return np.asarray(json.loads(res.stdout.splitlines()[0])["vector"], dtype=np.float32)


def search_paths(tiny_itm, store: Path, text: str, k: int = 10) -> list[str]:
    res = cli("search", text, "--index", store, "-m", tiny_itm, "-k", k, "-f", "jsonl")
    assert res.exit_code == 0, res.output
    return [json.loads(line)["path"] for line in res.stdout.splitlines()]


@pytest.mark.parametrize("layout", ["single", "segments"])
def test_flatten_export_gives_blip2_searchs_top_10_through_faiss(tiny_itm, store, tmp_path, layout):
    faiss = pytest.importorskip("faiss")
    source = store
    if layout == "segments":
        source = tmp_path / "seg"
        res = cli("export", store, "-o", source, "--to", "segments")
        assert res.exit_code == 0, res.output
    out = tmp_path / "emb"
    res = cli("export", source, "-o", out, "--vectors", "flatten", "--rows-per-file", 100)
    assert res.exit_code == 0, res.output
    n, q = 3 + EXTRA, VectorStore.open(store).meta.dims[0]  # the query vectors per image
    vectors, meta = read_export(out)
    assert vectors.dtype == np.float32 and vectors.ndim == 2 and len(vectors) == n * q
    per_file = 100 // q  # whole images per file
    assert len(list((out / "img_emb").glob("*.npy"))) == -(-n // per_file) > 1
    assert meta["query"] == list(range(q)) * n and len(meta["image_path"]) == n * q
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    for text in ("a cat", "a rocket on a launch pad"):
        _, ids = index.search(text_vector(tiny_itm, text)[None], 10 * q)
        ranked = list(dict.fromkeys(meta["image_path"][i] for i in ids[0]))  # best row of each image
        assert ranked[:10] == search_paths(tiny_itm, source, text)


def test_mean_export_is_the_pooled_cosine_search(store, tmp_path):
    faiss = pytest.importorskip("faiss")
    out = tmp_path / "emb"
    res = cli("export", store, "-o", out)
    assert res.exit_code == 0, res.output
    assert "exported 43 images as 43 vector rows" in res.stderr
    vectors, meta = read_export(out)
    src = VectorStore.open(store)
    assert vectors.shape == (src.rows, src.meta.dims[-1]) and set(meta) == {"image_path"}
    assert meta["image_path"] == [e.path for e in src.entries]
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1, rtol=1e-5)
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    for row in (0, 2, 17):
        query = vectors[row]
        _, ids = index.search(query[None], 10)
        assert [int(i) for i in ids[0]] == [h.row for h in top_k(src, query, 10, mode="image")]


def test_captions_fill_the_caption_column(store, tmp_path, example_images):
    src = VectorStore.open(store)
    first = src.entries[0].path
    captions = tmp_path / "captions.jsonl"
    captions.write_text(json.dumps({"path": first, "caption": "a cat on a sofa"}) + "\n"
                        + json.dumps({"path": "elsewhere.jpg", "error": "x"}) + "\nnot json\n")
    out = tmp_path / "emb"
    res = cli("export", store, "-o", out, "--captions", captions)
    assert res.exit_code == 0, res.output
    _, meta = read_export(out)
    assert meta["caption"][0] == "a cat on a sofa" and meta["caption"][1:] == [None] * (src.rows - 1)


def test_to_segments_copies_rows_settings_and_failures(store, tmp_path):
    src = VectorStore.open(store)
    seg = tmp_path / "seg"
    res = cli("export", store, "-o", seg, "--to", "segments")
    assert res.exit_code == 0, res.output
    new = VectorStore.open(seg)
    assert new.meta == src.meta and new.rows == src.rows
    assert [e for e in new.entries] == list(src.entries)
    np.testing.assert_array_equal(new.read_rows(0, new.rows), src.read_rows(0, src.rows))
    assert store.exists()  # the source is left as it was
    # refused: a directory that is not empty, a segmented source, options of the other layout
    assert cli("export", store, "-o", seg, "--to", "segments").exit_code == 2
    assert cli("export", seg, "-o", tmp_path / "again", "--to", "segments").exit_code == 2
    res = cli("export", store, "-o", tmp_path / "x", "--to", "segments", "--vectors", "flatten")
    assert res.exit_code == 2 and "--vectors" in res.stderr


def test_a_missing_store_is_a_clear_error(tmp_path):
    res = cli("export", tmp_path / "none.npy", "-o", tmp_path / "emb")
    assert res.exit_code == 2 and "no vector store" in res.stderr
    assert not (tmp_path / "emb").exists()
