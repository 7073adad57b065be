"""embed / search / score on tiny random checkpoints, against transformers' documented usage.

The reference is ``Blip2ForImageTextRetrieval`` called as its docstring shows,
one image at a time: ``model(**processor(images=img, text=t, return_tensors="pt"),
use_image_text_matching_head=False/True)``. Ours runs batches with the fast
preprocessing. Tolerance: 1e-5 absolute on unit vectors, cosines and
probabilities (float32 on the CPU; batching changes the summation order only).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from blip2cli.cli import app
from blip2cli.embed import Embedder, itc_similarity
from blip2cli.loader import LoadOptions, load

runner = CliRunner()
ATOL = 1e-5
TEXTS = ["a photo of a cat", "a dog", "an astronaut in a white suit next to a flag", "coffee"]


@pytest.fixture(scope="module")
def loaded_itm(tiny_itm):
    from blip2cli.loader import ALL_ARCHITECTURES

    return load(LoadOptions(model=str(tiny_itm), device="cpu"), architectures=ALL_ARCHITECTURES, task="embed")


@pytest.fixture(scope="module")
def reference(tiny_itm):
    from transformers import Blip2ForImageTextRetrieval, Blip2Processor

    processor = Blip2Processor.from_pretrained(tiny_itm)
    model = Blip2ForImageTextRetrieval.from_pretrained(tiny_itm).eval()
    return processor, model


def ref_outputs(reference, image_path, text, itm: bool):
    import torch
    from PIL import Image

    processor, model = reference
    image = Image.open(image_path).convert("RGB")
    inputs = processor(images=image, text=text, return_tensors="pt")
    with torch.inference_mode():
        return model(**inputs, use_image_text_matching_head=itm)


def our_pixels(loaded, paths):
    from blip2cli.images import prepare
    from blip2cli.pixels import to_pixel_values

    return to_pixel_values([prepare(p, loaded.image_spec) for p in paths], loaded.image_spec,
                           device=loaded.device, dtype=loaded.dtype)


# -- the core, against transformers --------------------------------------------
def test_image_embeddings_equal_transformers_per_image(loaded_itm, reference, example_images):
    ours = Embedder(loaded_itm, "itc", "none").image_vectors(our_pixels(loaded_itm, example_images)).numpy()
    config = loaded_itm.model.config
    assert ours.shape == (len(example_images), config.num_query_tokens, config.image_text_hidden_size)
    for path, got in zip(example_images, ours):
        want = ref_outputs(reference, path, "a photo", itm=False).image_embeds[0].numpy()
        np.testing.assert_allclose(got, want, atol=ATOL, rtol=0, err_msg=path.name)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=-1), 1.0, atol=1e-6)
    assert not np.allclose(ours[0], ours[1], atol=1e-3)  # the model sees the images


def test_text_embeddings_and_itc_equal_transformers(loaded_itm, reference, example_images):
    embedder = Embedder(loaded_itm, "itc", "none")
    texts = embedder.text_vectors(TEXTS).numpy()  # one padded batch of different lengths
    image = embedder.image_vectors(our_pixels(loaded_itm, example_images[:1]))[0]
    sims = itc_similarity(image, texts).numpy()
    for i, text in enumerate(TEXTS):
        out = ref_outputs(reference, example_images[0], text, itm=False)
        np.testing.assert_allclose(texts[i], out.text_embeds[0].numpy(), atol=ATOL, rtol=0, err_msg=text)
        np.testing.assert_allclose(sims[i], out.logits_per_image[0, 0].item(), atol=ATOL, rtol=0)


def test_itm_probabilities_equal_transformers(loaded_itm, reference, example_images):
    embedder = Embedder(loaded_itm, "itc", "none")
    vision = embedder.encode_images(our_pixels(loaded_itm, example_images))
    for i, path in enumerate(example_images):
        states = vision.last_hidden_state[i:i + 1]
        probs = embedder.itm_probabilities(states, TEXTS).numpy()  # one image, several texts
        for j, text in enumerate(TEXTS):
            out = ref_outputs(reference, path, text, itm=True)
            want = out.logits_per_image.softmax(dim=-1)[0, 1].item()
            np.testing.assert_allclose(probs[j], want, atol=ATOL, rtol=0, err_msg=f"{path.name} {text}")
    # pairs, one text per image
    paired = embedder.itm_probabilities(vision.last_hidden_state, TEXTS).numpy()
    for i, path in enumerate(example_images):
        want = ref_outputs(reference, path, TEXTS[i], itm=True).logits_per_image.softmax(-1)[0, 1].item()
        np.testing.assert_allclose(paired[i], want, atol=ATOL, rtol=0)


def test_mean_pool_is_the_renormalised_mean(loaded_itm, example_images):
    pixels = our_pixels(loaded_itm, example_images)
    full = Embedder(loaded_itm, "itc", "none").image_vectors(pixels).numpy()
    pooled = Embedder(loaded_itm, "itc", "mean").image_vectors(pixels).numpy()
    want = full.mean(axis=1)
    want /= np.linalg.norm(want, axis=-1, keepdims=True)
    np.testing.assert_allclose(pooled, want, atol=1e-6)


def test_captioning_checkpoint_features_equal_transformers(tiny_opt, example_images):
    import torch
    from transformers import Blip2ForConditionalGeneration, Blip2Processor
    from PIL import Image

    loaded = load(LoadOptions(model=str(tiny_opt), device="cpu"))
    pixels = our_pixels(loaded, example_images)
    vision = Embedder(loaded, "vision").image_vectors(pixels).numpy()
    qformer = Embedder(loaded, "auto").image_vectors(pixels).numpy()  # auto: qformer here
    processor = Blip2Processor.from_pretrained(tiny_opt)
    model = Blip2ForConditionalGeneration.from_pretrained(tiny_opt).eval()
    for i, path in enumerate(example_images):
        inputs = processor(images=Image.open(path).convert("RGB"), return_tensors="pt")
        with torch.inference_mode():
            out = model.get_image_features(**inputs)
        np.testing.assert_allclose(vision[i], out.vision_outputs.pooler_output[0].numpy(), atol=ATOL, rtol=0)
        np.testing.assert_allclose(qformer[i], out.qformer_outputs.last_hidden_state[0].numpy(), atol=ATOL, rtol=0)
    with pytest.raises(Exception, match="retrieval checkpoint"):
        Embedder(loaded, "vision").text_vectors(["a cat"])


# -- blip2 embed ----------------------------------------------------------------
def cli(*args, input=None):
    return runner.invoke(app, [*map(str, args)], input=input)


def test_cli_embed_jsonl_records(tiny_itm, loaded_itm, example_images):
    result = cli("embed", *example_images, "--text", "a cat", "--text", "a dog", "-m", tiny_itm, "-b", "3")
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r.get("text") for r in records[:2]] == ["a cat", "a dog"]
    assert [r["path"] for r in records[2:]] == [str(p) for p in example_images]
    embedder = Embedder(loaded_itm, "itc", "none")
    want = embedder.image_vectors(our_pixels(loaded_itm, example_images)).numpy()
    for r, w in zip(records[2:], want):
        assert r["error"] is None and r["dims"] == list(w.shape)
        np.testing.assert_allclose(np.array(r["vector"], np.float32).reshape(r["dims"]), w, atol=ATOL)
    np.testing.assert_allclose(np.array(records[0]["vector"]), embedder.text_vectors(["a cat"])[0].numpy(), atol=1e-6)


def test_cli_embed_texts_file(tiny_itm, tmp_path):
    texts = tmp_path / "texts.txt"
    texts.write_text("a cat\n\na dog on a sofa\n", encoding="utf-8")
    result = cli("embed", "--texts-file", texts, "-m", tiny_itm, "-f", "csv")
    assert result.exit_code == 0, result.output
    rows = result.stdout.splitlines()
    assert rows[0] == "path,text,dims,vector,error" and len(rows) == 3
    assert rows[1].startswith(",a cat,[16],")


def test_cli_embed_csv_pooled_and_error_records(tiny_itm, example_images, tmp_path):
    import csv

    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"<html>not an image</html>")
    out = tmp_path / "v.csv"
    result = cli("embed", example_images[0], bad, "-m", tiny_itm, "--pool", "mean", "-o", out)
    assert result.exit_code == 1
    rows = list(csv.DictReader(out.open(newline="")))
    assert rows[0]["path"] == str(example_images[0]) and json.loads(rows[0]["dims"]) == [16]
    assert len(json.loads(rows[0]["vector"])) == 16
    assert rows[1]["path"] == str(bad) and "HTML" in rows[1]["error"] and rows[1]["vector"] == ""


def test_cli_embed_texts_need_a_retrieval_checkpoint(tiny_opt):
    result = cli("embed", "--text", "a cat", "-m", tiny_opt)
    assert result.exit_code == 2
    assert "Salesforce/blip2-itm-vit-g" in result.stderr


class CountingEmbedder:
    """Counts the images the model is run on (through the class, so the CLI's instance counts)."""

    def __init__(self, monkeypatch):
        self.images = 0
        real = Embedder.image_vectors

        def counted(this, pixel_values=None, *, vision=None):
            out = real(this, pixel_values, vision=vision)
            self.images += out.shape[0]
            return out

        monkeypatch.setattr(Embedder, "image_vectors", counted)


@pytest.fixture
def photos(tmp_path, example_images) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    for p in example_images[:3]:
        shutil.copy(p, folder / p.name)
    return folder


def store_rows(path) -> list[str]:
    from blip2cli.store import VectorStore

    return [Path(e.path).name for e in VectorStore.open(path).entries]


def test_cli_store_is_incremental(tiny_itm, loaded_itm, photos, example_images, tmp_path, monkeypatch):
    from blip2cli.store import VectorStore

    counter = CountingEmbedder(monkeypatch)
    store = tmp_path / "v.safetensors"
    args = ["embed", photos, "-m", tiny_itm, "-o", store, "-b", "2"]
    result = cli(*args)
    assert result.exit_code == 0, result.output
    assert counter.images == 3 and result.stdout == ""
    assert "3 rows (3 new, 0 changed, 0 unchanged)" in result.stderr
    # the stored rows equal a direct embedding
    want = Embedder(loaded_itm, "itc", "none").image_vectors(
        our_pixels(loaded_itm, sorted(photos.iterdir()))).numpy()
    np.testing.assert_allclose(np.asarray(VectorStore.open(store).matrix), want, atol=ATOL)

    counter.images = 0
    assert cli(*args).exit_code == 0 and counter.images == 0  # nothing new
    result = cli("embed", photos, "-o", store)  # the store's model is the default
    assert result.exit_code == 0 and counter.images == 0, result.output
    first = sorted(photos.iterdir())[0]
    os.utime(first, ns=(time.time_ns(), time.time_ns() + 10**9))  # touched, same content
    result = cli(*args)
    assert counter.images == 0 and "3 rows (0 new, 0 changed, 3 unchanged)" in result.stderr  # same hash
    shutil.copy(example_images[3], first)  # changed content
    shutil.copy(example_images[3], photos / "new.jpg")  # a new file
    result = cli(*args)
    assert result.exit_code == 0 and counter.images == 2
    assert "4 rows (1 new, 1 changed, 2 unchanged)" in result.stderr
    assert store_rows(store)[-2:] == [first.name, "new.jpg"]

    (photos / "new.jpg").unlink()
    counter.images = 0
    assert cli(*args).exit_code == 0 and len(store_rows(store)) == 4  # kept without --prune
    result = cli(*args, "--prune")
    assert result.exit_code == 0 and counter.images == 0
    assert "new.jpg" not in store_rows(store) and "1 pruned" in result.stderr


def test_cli_store_refuses_other_settings(tiny_itm, tiny_opt, photos, tmp_path):
    store = tmp_path / "v.npy"
    assert cli("embed", photos, "-m", tiny_itm, "-o", store).exit_code == 0
    result = cli("embed", photos, "-m", tiny_itm, "-o", store, "--pool", "mean")
    assert result.exit_code == 2 and "pool none (store) vs mean" in result.stderr
    result = cli("embed", photos, "-m", tiny_opt, "-o", store, "--features", "vision")
    assert result.exit_code == 2 and "model" in result.stderr
    result = cli("embed", "--text", "x", "-m", tiny_itm, "-o", store)
    assert result.exit_code == 2


def test_cli_interrupted_store_run_keeps_finished_rows(tiny_itm, photos, tmp_path, monkeypatch):
    from blip2cli.store import VectorStore

    store = tmp_path / "v.safetensors"
    real = Embedder.image_vectors
    calls = {"n": 0}

    def interrupted(this, pixel_values=None, *, vision=None):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(this, pixel_values, vision=vision)

    monkeypatch.setattr(Embedder, "image_vectors", interrupted)
    result = cli("embed", photos, "-m", tiny_itm, "-o", store, "-b", "1", "-j", "1")
    assert result.exit_code == 130
    assert VectorStore.open(store).rows == 1  # the first batch was saved, whole
    monkeypatch.undo()
    result = cli("embed", photos, "-m", tiny_itm, "-o", store)
    assert result.exit_code == 0 and "3 rows (2 new, 0 changed, 1 unchanged)" in result.stderr


def test_cli_raw_bytes_on_stdin_cannot_go_into_a_store(tiny_itm, example_images, tmp_path):
    result = cli("embed", "-", "-m", tiny_itm, "-o", tmp_path / "v.npy", input=example_images[0].read_bytes())
    assert result.exit_code == 1 and "raw image bytes" in result.stderr


# -- blip2 search -------------------------------------------------------------------
def test_cli_search_ranks_like_brute_force(tiny_itm, loaded_itm, example_images, tmp_path):
    embedder = Embedder(loaded_itm, "itc", "none")
    images = embedder.image_vectors(our_pixels(loaded_itm, example_images))
    query = "a photo of a cat"
    text = embedder.text_vectors([query])
    sims = np.array([itc_similarity(v, text)[0].item() for v in images])
    want = [str(example_images[i]) for i in np.argsort(-sims)]

    result = cli("search", query, *example_images, "-m", tiny_itm, "-k", "3")
    assert result.exit_code == 0, result.output
    lines = [line.split("\t") for line in result.stdout.splitlines()]
    assert [p for p, _ in lines] == want[:3]
    np.testing.assert_allclose([float(s) for _, s in lines], np.sort(sims)[::-1][:3], atol=1e-5)

    # the same through a cached index, which the second search does not re-embed
    index = tmp_path / "v.safetensors"
    result = cli("search", query, *example_images, "-m", tiny_itm, "--index", index, "-f", "jsonl", "-k", "10")
    assert [json.loads(line)["path"] for line in result.stdout.splitlines()] == want
    result = cli("search", query, "--index", index, "-f", "csv")  # model taken from the index
    assert result.exit_code == 0, result.output
    assert [row.split(",")[1] for row in result.stdout.splitlines()[1:]] == want


def test_cli_search_prints_paths_as_given_in_this_run(tiny_itm, example_images, tmp_path, monkeypatch):
    index = tmp_path / "v.npy"
    assert cli("search", "a cat", *example_images, "-m", tiny_itm, "--index", index).exit_code == 0
    monkeypatch.chdir(example_images[0].parent)
    result = cli("search", "a cat", ".", "--index", index, "-k", "2")  # rows already there
    assert result.exit_code == 0, result.output
    assert all(line.startswith("./") for line in result.stdout.splitlines())
    result = cli("search", "a cat", "--index", index, "-k", "2")  # the whole store: stored paths
    assert all(line.startswith(str(example_images[0].parent)) for line in result.stdout.splitlines())


def test_cli_search_rerank_orders_by_itm(tiny_itm, reference, example_images):
    query = "a photo of a cat"
    probs = {str(p): ref_outputs(reference, p, query, itm=True).logits_per_image.softmax(-1)[0, 1].item()
             for p in example_images}
    result = cli("search", query, *example_images, "-m", tiny_itm, "--rerank", "4", "-k", "4", "-f", "jsonl")
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["path"] for r in records] == sorted(probs, key=lambda p: -probs[p])
    for r in records:
        assert r["score"] == r["itm"]
        np.testing.assert_allclose(r["itm"], probs[r["path"]], atol=ATOL)
    assert cli("search", query, *example_images, "-m", tiny_itm, "--rerank", "2", "-k", "3").exit_code == 2


def test_cli_search_by_image(tiny_itm, loaded_itm, example_images):
    embedder = Embedder(loaded_itm, "itc", "mean")
    pooled = embedder.image_vectors(our_pixels(loaded_itm, example_images)).numpy()
    sims = pooled @ pooled[1]
    result = cli("search", "--image", example_images[1], *example_images, "-m", tiny_itm, "-f", "jsonl")
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["path"] for r in records] == [str(example_images[i]) for i in np.argsort(-sims)]
    assert records[0]["path"] == str(example_images[1])
    np.testing.assert_allclose(records[0]["score"], 1.0, atol=1e-5)


def test_cli_search_usage_errors(tiny_itm, tmp_path):
    assert "nothing to search" in cli("search", "a cat", "-m", tiny_itm).stderr
    assert cli("search").exit_code == 2
    result = cli("search", "a cat", "--index", tmp_path / "missing.safetensors")
    assert result.exit_code == 2 and "no vector store" in result.stderr


# -- blip2 score ----------------------------------------------------------------------
def test_cli_score_equals_transformers(tiny_itm, reference, example_images):
    image = example_images[0]
    result = cli("score", image, *TEXTS[:3], "-m", tiny_itm, "-f", "jsonl")
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["text"] for r in records] == TEXTS[:3]
    for r in records:
        itm = ref_outputs(reference, image, r["text"], itm=True).logits_per_image.softmax(-1)[0, 1].item()
        itc = ref_outputs(reference, image, r["text"], itm=False).logits_per_image[0, 0].item()
        np.testing.assert_allclose([r["itm"], r["itc"]], [itm, itc], atol=ATOL)
    text = cli("score", image, "a cat", "-m", tiny_itm)
    assert text.exit_code == 0 and text.stdout.count("\t") == 2


def test_cli_score_refuses_a_captioning_checkpoint(tiny_opt, example_images):
    result = cli("score", example_images[0], "a cat", "-m", tiny_opt)
    assert result.exit_code == 2 and "Salesforce/blip2-itm-vit-g" in result.stderr


def test_cli_embed_resume_and_shards_through_the_common_job(tiny_itm, example_images, tmp_path):
    """Image records to JSON Lines resume (issue 6) and split into shards (issue 7) like caption."""
    import json as _json

    from typer.testing import CliRunner as _Runner

    from blip2cli.cli import app as _app

    run = _Runner().invoke
    out = tmp_path / "vec.jsonl"
    full = run(_app, ["embed", *map(str, example_images), "--model", str(tiny_itm), "-o", str(out)])
    assert full.exit_code == 0, full.output
    lines = out.read_text().splitlines(keepends=True)
    out.write_text(lines[0] + lines[1][:10])  # killed mid-record
    res = run(_app, ["embed", *map(str, example_images), "--model", str(tiny_itm), "-o", str(out), "--resume"])
    assert res.exit_code == 0, res.output
    recs = [_json.loads(l) for l in out.read_text().splitlines()]
    assert sorted(r["path"] for r in recs) == sorted(map(str, example_images))
    want = {_json.loads(l)["path"]: _json.loads(l)["vector"] for l in lines}
    assert all(r["vector"] == want[r["path"]] for r in recs)

    d = tmp_path / "shards"
    for i in range(2):
        res = run(_app, ["embed", *map(str, example_images), "--model", str(tiny_itm), "-o", str(d), "--shard", f"{i}/2"])
        assert res.exit_code == 0, res.output
    assert run(_app, ["merge", str(d)]).exit_code == 0
    merged = [_json.loads(l) for l in (d / "embeddings.jsonl").read_text().splitlines()]
    assert [r["path"] for r in merged] == list(map(str, example_images))
    assert all(r["vector"] == want[r["path"]] for r in merged)
    res = run(_app, ["embed", str(example_images[0]), "--model", str(tiny_itm), "--text", "a cat", "--resume",
                     "-o", str(tmp_path / "t.jsonl")])
    assert res.exit_code == 2
