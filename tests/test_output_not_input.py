"""search and score write records too: their -o is refused, before the model loads, when
it is one of their inputs (an image, a listed file, a vector store's index)."""

from __future__ import annotations

import shutil

from typer.testing import CliRunner

from blip2cli.cli import app


def _run(args):
    return CliRunner().invoke(app, args)


def test_score_into_its_own_image_is_refused_before_the_model(example_images, tmp_path):
    photo = tmp_path / "cat.png"
    shutil.copy(example_images[0], photo)
    before = photo.read_bytes()
    result = _run(["score", str(photo), "a cat", "--model", str(tmp_path / "no-such-model"), "-o", str(photo)])
    assert result.exit_code == 2
    assert "destroy" in result.stderr and "no-such-model" not in result.stderr  # refused before the load
    assert photo.read_bytes() == before


def test_search_into_one_of_its_listed_inputs_is_refused(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me\n")
    link = tmp_path / "same-notes.txt"
    link.hardlink_to(notes)
    result = _run(["search", "a cat", str(notes), "--model", str(tmp_path / "no-such-model"), "-o", str(link)])
    assert result.exit_code == 2
    assert "also the output" in result.stderr
    assert notes.read_text() == "keep me\n"


def test_search_into_the_index_of_its_store_is_refused(tiny_itm, example_images, tmp_path):
    store = tmp_path / "vectors.safetensors"
    made = _run(["embed", *map(str, example_images[:2]), "--model", str(tiny_itm), "-o", str(store)])
    assert made.exit_code == 0, made.stderr
    index = next(store.glob("seg-*.parquet"))  # a file of the store (a folder)
    assert index.exists()
    before = index.read_bytes()
    result = _run(["search", "a cat", "--index", str(store), "--model", str(tiny_itm), "-o", str(index)])
    assert result.exit_code == 2, result.stderr
    assert "destroy" in result.stderr
    assert index.read_bytes() == before
