"""``blip2 export``: a store into clip-retrieval's layout (named as clip-retrieval's own
writer names its files), read back with numpy, pyarrow and faiss (flatten: the same top-10
as ``blip2 search``; mean: not), and into one matrix file (npy, safetensors)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from blip2cli.cli import app
from blip2cli.store import Entry, StoreUpdate, VectorStore, top_k
from blip2cli.storefiles import sha256_file

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
            size, mtime, digest = f.stat().st_size, f.stat().st_mtime_ns, sha256_file(str(f))
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


def test_flatten_export_gives_blip2_searchs_top_10_through_faiss(tiny_itm, store, tmp_path):
    faiss = pytest.importorskip("faiss")
    source = store
    out = tmp_path / "emb"
    res = cli("export", source, "-o", out, "--vectors", "flatten", "--rows-per-file", 100)
    assert res.exit_code == 0, res.output
    n, q = 3 + EXTRA, VectorStore.open(store).meta.dims[0]  # the query vectors per image
    vectors, meta = read_export(out)
    assert vectors.dtype == np.float32 and vectors.ndim == 2 and len(vectors) == n * q
    per_file = 100 // q  # whole images per file
    count = -(-n // per_file)
    assert len(list((out / "img_emb").glob("*.npy"))) == count > 1
    # clip-retrieval's own names: the number zero-padded to the digits of the file count
    width = len(str(count))
    assert sorted(p.name for p in (out / "img_emb").iterdir()) == [f"img_emb_{i:0{width}d}.npy" for i in range(count)]
    assert sorted(p.name for p in (out / "metadata").iterdir()) == [
        f"metadata_{i:0{width}d}.parquet" for i in range(count)]
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


def test_mean_export_does_not_rank_as_blip2_search(tiny_itm, store, tmp_path):
    """README: only --vectors flatten reproduces blip2 search's ranking (the max over the 32
    query vectors); the mean of the query vectors ranks differently."""
    faiss = pytest.importorskip("faiss")
    out = tmp_path / "emb"
    assert cli("export", store, "-o", out).exit_code == 0
    vectors, meta = read_export(out)
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    differs = []
    for text in ("a cat", "a rocket on a launch pad"):
        _, ids = index.search(text_vector(tiny_itm, text)[None], 10)
        differs.append([meta["image_path"][i] for i in ids[0]] != search_paths(tiny_itm, store, text))
    assert any(differs)


def test_absolute_paths(store, tmp_path, monkeypatch):
    src = VectorStore.open(store)
    monkeypatch.chdir(tmp_path)
    res = cli("export", store, "-o", tmp_path / "emb", "--absolute-paths", "--vectors", "flatten")
    assert res.exit_code == 0, res.output
    _, meta = read_export(tmp_path / "emb")
    q = src.meta.dims[0]
    want = [e.abspath for e in src.entries]
    assert meta["image_path"][::q] == want and all(os.path.isabs(p) for p in want)
    res = cli("export", store, "-o", tmp_path / "x.npy", "--to", "npy", "--absolute-paths")
    assert res.exit_code == 2 and "--absolute-paths" in res.stderr


@pytest.mark.parametrize("kind", ["npy", "safetensors"])
def test_to_one_matrix_file(store, tmp_path, kind):
    src = VectorStore.open(store)
    out = tmp_path / f"matrix.{kind}"
    res = cli("export", store, "-o", out, "--to", kind)
    assert res.exit_code == 0, res.output
    if kind == "npy":
        matrix = np.load(out)
    else:
        from safetensors.numpy import load_file

        matrix = load_file(str(out))["vectors"]
    np.testing.assert_array_equal(matrix, src.read_rows(0, src.rows))
    index = pq.read_table(out.with_name(out.name + ".index.parquet"))
    assert index.column("path").to_pylist() == [e.path for e in src.entries]
    settings = json.loads(index.schema.metadata[b"blip2"])
    assert settings["rows"] == src.rows and settings["dims"] == list(src.meta.dims)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary files
    res = cli("export", store, "-o", tmp_path / "x", "--to", kind, "--vectors", "flatten")
    assert res.exit_code == 2 and "--vectors" in res.stderr


def test_an_export_killed_midway_leaves_no_vectors_without_metadata(store, tmp_path, monkeypatch):
    """Issue 19: kill -9 during export left img_emb_0.npy without its metadata. Files are
    written in a temporary folder and moved metadata first; the next export removes leftovers."""
    from blip2cli import export as ex

    out = tmp_path / "emb"
    real = os.replace
    moved = []

    def replace(src, dst):
        if "img_emb" in str(dst) and len([m for m in moved if "img_emb" in m]) == 1:
            raise SystemExit("simulated kill")
        moved.append(str(dst))
        return real(src, dst)

    monkeypatch.setattr(ex.os, "replace", replace)
    src = VectorStore.open(store)
    with pytest.raises(SystemExit):
        ex.export_clip_retrieval(src, out, rows_per_file=10)
    monkeypatch.undo()
    emb = sorted(p.name[len("img_emb_"):-4] for p in (out / "img_emb").glob("img_emb_*.npy"))
    metadata = sorted(p.name[len("metadata_"):-8] for p in (out / "metadata").glob("metadata_*.parquet"))
    assert emb and set(emb) <= set(metadata)  # every vector file has its metadata
    (out / ".blip2-export-0123456789ab").mkdir()  # what a kill -9 leaves (the finally never ran)
    ex.export_clip_retrieval(src, out, rows_per_file=10)
    assert sorted(p.name for p in out.iterdir()) == ["img_emb", "metadata"]
    vectors, meta = read_export(out)
    assert len(vectors) == len(meta["image_path"]) == src.rows


def test_a_missing_store_is_a_clear_error(tmp_path):
    res = cli("export", tmp_path / "none.npy", "-o", tmp_path / "emb")
    assert res.exit_code == 2 and "no vector store" in res.stderr
    assert not (tmp_path / "emb").exists()
