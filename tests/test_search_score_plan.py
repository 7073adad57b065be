"""``search`` and ``score`` write their ``-o`` file under the runner's rule (issue 19): the
file is in the run's output plan before the first write, checked by (device, inode) against
every file the run reads (the images, the query image, the store's files, the
``--files-from`` lists) and every other file it writes (the store it embeds into), and held
under one lock per file object for the whole run. A refusal is exit 2, before the model
loads, with the file as it was."""

from __future__ import annotations

import os
import shutil

import pytest

from blip2cli import guard

from helpers import cli, jsonl, snapshot


@pytest.fixture
def store(tiny_itm, example_images, tmp_path):
    """A vector store of two photos, embedded with the tiny retrieval checkpoint."""
    path = tmp_path / "vectors.safetensors"
    made = cli("embed", *example_images[:2], "--model", tiny_itm, "-o", path)
    assert made.exit_code == 0, made.output
    return path


def _store_file(store):
    return next(store.glob("seg-*.parquet"))


# -- search -o -------------------------------------------------------------------------------
def test_search_onto_an_input_image_is_refused(tiny_itm, photos, no_model):
    before = snapshot(photos)
    res = cli("search", "a cat", photos, "--model", tiny_itm, "-o", photos / "chelsea.png")
    assert res.exit_code == 2, res.output
    assert "destroy" in res.stderr
    assert snapshot(photos) == before


def test_search_onto_a_file_of_the_store_it_embeds_into_is_refused(tiny_itm, photos, store, no_model):
    victim = _store_file(store)
    before = snapshot(store)
    res = cli("search", "a cat", photos, "--index", store, "--model", tiny_itm, "-o", victim)
    assert res.exit_code == 2, res.output
    assert "--index" in res.stderr and "--output" in res.stderr  # both files of the plan named
    assert snapshot(store) == before


def test_search_onto_a_hard_link_of_a_store_file_is_refused(tiny_itm, store, tmp_path, no_model):
    link = tmp_path / "results.jsonl"
    os.link(_store_file(store), link)
    before = snapshot(store)
    res = cli("search", "a cat", "--index", store, "--model", tiny_itm, "-o", link)
    assert res.exit_code == 2, res.output
    assert "destroy" in res.stderr
    assert snapshot(store) == before


def test_search_onto_a_hard_link_of_an_input_is_refused(tiny_itm, photos, tmp_path, no_model):
    link = tmp_path / "results.jsonl"
    os.link(photos / "sub" / "rocket.jpg", link)  # not an image by its name: by its inode
    before = snapshot(photos)
    res = cli("search", "a cat", photos, "--model", tiny_itm, "-o", link)
    assert res.exit_code == 2, res.output
    assert snapshot(photos) == before


def test_search_onto_its_files_from_list_is_refused(tiny_itm, photos, tmp_path, no_model):
    listing = tmp_path / "list.txt"
    listing.write_text(f"{photos / 'chelsea.png'}\n{photos / 'coffee.png'}\n")
    before = listing.read_text()
    res = cli("search", "a cat", "--files-from", listing, "--model", tiny_itm, "-o", listing)
    assert res.exit_code == 2, res.output
    assert "also the output" in res.stderr
    assert listing.read_text() == before


def test_search_onto_the_query_image_is_refused(tiny_itm, photos, tmp_path, no_model):
    query = tmp_path / "query.png"
    shutil.copy(photos / "chelsea.png", query)
    link = tmp_path / "results.jsonl"
    os.link(query, link)
    before = query.read_bytes()
    res = cli("search", "--image", query, photos, "--model", tiny_itm, "-o", link)
    assert res.exit_code == 2, res.output
    assert query.read_bytes() == before


@pytest.mark.parametrize("hard_link", [False, True], ids=["same-name", "hard-link"])
def test_search_output_locked_by_another_run_is_refused(tiny_itm, store, tmp_path, no_model, hard_link):
    out = tmp_path / "results.jsonl"
    out.write_text('{"path": "kept"}\n')
    mine = out
    if hard_link:  # another name for the same file object: the inode lock meets it
        mine = tmp_path / "results-too.jsonl"
        os.link(out, mine)
    with guard.FileLock(out):
        res = cli("search", "a cat", "--index", store, "--model", tiny_itm, "-o", mine)
    assert res.exit_code == 2, res.output
    assert "another blip2 run is writing" in res.stderr
    assert out.read_text() == '{"path": "kept"}\n'


def test_search_writes_the_same_records_and_leaves_no_lock(tiny_itm, store, tmp_path):
    shown = cli("search", "a cat", "--index", store, "-f", "jsonl")
    assert shown.exit_code == 0, shown.output
    out = tmp_path / "results.jsonl"
    res = cli("search", "a cat", "--index", store, "-o", out)
    assert res.exit_code == 0, res.output
    assert jsonl(out.read_text()) == jsonl(shown.stdout) and len(jsonl(shown.stdout)) == 2
    with guard.FileLock(out):  # released at the end
        pass
    assert not list(tmp_path.glob(".blip2-*.lock"))


# -- score -o --------------------------------------------------------------------------------
def test_score_onto_a_hard_link_of_its_image_is_refused(tiny_itm, photos, tmp_path, no_model):
    link = tmp_path / "scores.tsv"
    os.link(photos / "chelsea.png", link)
    before = snapshot(photos)
    res = cli("score", photos / "chelsea.png", "a cat", "--model", tiny_itm, "-o", link)
    assert res.exit_code == 2, res.output
    assert "destroy" in res.stderr
    assert snapshot(photos) == before


def test_score_onto_a_file_that_is_its_image_by_inode_is_refused(tiny_itm, tmp_path, example_images, no_model):
    image = tmp_path / "cat.data"  # an image by its inode, read as the input; the output name differs
    shutil.copy(example_images[0], image)
    link = tmp_path / "scores.jsonl"
    os.link(image, link)
    before = image.read_bytes()
    res = cli("score", image, "a cat", "--model", tiny_itm, "-o", link)
    assert res.exit_code == 2, res.output
    assert image.read_bytes() == before


@pytest.mark.parametrize("hard_link", [False, True], ids=["same-name", "hard-link"])
def test_score_output_locked_by_another_run_is_refused(tiny_itm, photos, tmp_path, no_model, hard_link):
    out = tmp_path / "scores.jsonl"
    out.write_text('{"text": "kept"}\n')
    mine = out
    if hard_link:
        mine = tmp_path / "scores-too.jsonl"
        os.link(out, mine)
    with guard.FileLock(out):
        res = cli("score", photos / "chelsea.png", "a cat", "--model", tiny_itm, "-o", mine)
    assert res.exit_code == 2, res.output
    assert "another blip2 run is writing" in res.stderr
    assert out.read_text() == '{"text": "kept"}\n'


def test_score_writes_the_same_records_and_leaves_no_lock(tiny_itm, photos, tmp_path):
    args = ["score", photos / "chelsea.png", "a cat", "a dog", "--model", tiny_itm]
    shown = cli(*args, "-f", "jsonl")
    assert shown.exit_code == 0, shown.output
    out = tmp_path / "scores.jsonl"
    res = cli(*args, "-o", out)
    assert res.exit_code == 0, res.output
    assert jsonl(out.read_text()) == jsonl(shown.stdout) and len(jsonl(shown.stdout)) == 2
    with guard.FileLock(out):
        pass
    assert not list(tmp_path.glob(".blip2-*.lock"))
