"""The Python library (``blip2cli.load`` and friends) on tiny random checkpoints.

For the same options the library's captions and answers equal the CLI's output and
transformers' documented per-image usage (the reference helpers of the model tests);
``import blip2cli`` stays light; errors name the input or the parameter; the README's
"Python library" examples run.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import reference_answer, reference_model, reference_tokens
from test_embed import TEXTS, ref_outputs, reference  # noqa: F401 (reference is a fixture)
from typer.testing import CliRunner

import blip2cli
from blip2cli.cli import app

ROOT = Path(__file__).parents[1]
runner = CliRunner()
ATOL = 1e-5


def cli(*args) -> list[dict]:
    result = runner.invoke(app, [*map(str, args)])
    assert result.exit_code in (0, 1), result.output
    return [json.loads(line) for line in result.stdout.splitlines()]


def decode(path, rows) -> list[str]:
    processor, _ = reference_model(path)
    return [t.strip() for t in processor.tokenizer.batch_decode(rows, skip_special_tokens=True)]


@pytest.fixture(scope="module")
def model(tiny_opt):
    return blip2cli.load(tiny_opt, device="cpu")


@pytest.fixture(scope="module")
def model_t5(tiny_t5):
    return blip2cli.load(str(tiny_t5), device="cpu")


@pytest.fixture(scope="module")
def retr(tiny_itm):
    return blip2cli.load(str(tiny_itm), device="cpu")


# -- caption -----------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["opt", "t5"])
@pytest.mark.parametrize("options", [dict(num_beams=1), dict(num_beams=3, prompt="a photo of")])
def test_captions_equal_the_cli_and_transformers_per_image(kind, options, request, example_images):
    path = request.getfixturevalue(f"tiny_{kind}")
    lib = request.getfixturevalue("model" if kind == "opt" else "model_t5")
    gen = dict(options, max_new_tokens=8, min_new_tokens=2)
    ours = lib.caption(example_images, batch_size=3, **gen)
    assert isinstance(ours, list) and len(ours) == len(example_images)
    flags = ["--num-beams", gen["num_beams"], "--max-new-tokens", 8, "--min-new-tokens", 2]
    if "prompt" in gen:
        flags += ["--prompt", gen["prompt"]]
    records = cli("caption", *example_images, "--model", path, "-f", "jsonl", *flags)
    assert ours == [r["caption"] for r in records]
    for image, caption in zip(example_images, ours):
        want = reference_tokens(path, image, gen.get("prompt"), num_beams=gen["num_beams"],
                                max_new_tokens=8, min_new_tokens=2)
        assert caption == decode(path, want)[0], image.name
    assert len(set(ours)) > 1  # the model sees the images


def test_defaults_are_the_clis_five_beams_and_thirty_tokens(tiny_opt, model, example_images):
    image = example_images[1]
    ours = model.caption(image)
    assert isinstance(ours, str)
    assert ours == cli("caption", image, "--model", tiny_opt, "-f", "jsonl")[0]["caption"]
    want = reference_tokens(tiny_opt, image, None, num_beams=5, max_new_tokens=30, min_new_tokens=1)
    assert ours == decode(tiny_opt, want)[0]


def test_every_kind_of_image_gives_the_same_caption(model, example_images):
    from PIL import Image

    path = example_images[0]  # a PNG: a path, its bytes, PIL and numpy hold the same pixels
    pil = Image.open(path).convert("RGB")
    kinds = [str(path), path, path.read_bytes(), pil, np.asarray(pil)]
    captions = model.caption(kinds, num_beams=1, max_new_tokens=6)
    assert len(set(captions)) == 1, captions
    assert model.caption(np.asarray(pil), num_beams=1, max_new_tokens=6) == captions[0]


def test_result_shapes_follow_the_input(model, example_images):
    two = example_images[:2]
    assert isinstance(model.caption(two[0], num_beams=1, max_new_tokens=4), str)
    several = model.caption(two, num_beams=3, num_captions=2, max_new_tokens=4)
    assert [len(c) for c in several] == [2, 2] and all(isinstance(t, str) for c in several for t in c)
    assert model.caption(two[0], num_beams=3, num_captions=2, max_new_tokens=4) == several[0]
    assert model.caption([], num_beams=1) == []


def test_sampling_is_seeded_like_the_cli(tiny_opt, model, example_images):
    gen = dict(sample=True, temperature=2.0, max_new_tokens=6, seed=5, batch_size=4)
    ours = model.caption(example_images, **gen)
    assert model.caption(example_images, **gen) == ours
    assert model.caption(example_images, **{**gen, "seed": 6}) != ours
    records = cli("caption", *example_images, "--model", tiny_opt, "-f", "jsonl", "--sample", "--temperature", "2.0",
                  "--max-new-tokens", "6", "--seed", "5", "-b", "4")
    assert [r["caption"] for r in records] == ours


# -- ask and chat --------------------------------------------------------------------
def test_answers_equal_the_cli_and_transformers_per_pair(tiny_opt, model, example_images):
    images, questions = example_images[:3], ["what is it?", "how many animals are in the picture?"]
    ours = model.ask(images, questions, num_beams=2, max_new_tokens=6)
    assert [len(per_image) for per_image in ours] == [2, 2, 2]
    records = cli("ask", *images, "-q", questions[0], "-q", questions[1], "--model", tiny_opt, "-f", "jsonl",
                  "--num-beams", 2, "--max-new-tokens", 6)
    assert [a for per_image in ours for a in per_image] == [r["answer"] for r in records]
    for image, per_image in zip(images, ours):
        for question, answer in zip(questions, per_image):
            want = reference_tokens(tiny_opt, image, f"Question: {question} Answer:", num_beams=2,
                                    max_new_tokens=6, min_new_tokens=1)
            assert answer == decode(tiny_opt, want)[0]
    # one image, one question: a string; one image, several: one per question
    assert model.ask(images[0], questions[0], num_beams=2, max_new_tokens=6) == ours[0][0]
    assert model.ask(images[0], questions, num_beams=2, max_new_tokens=6) == ours[0]
    assert model.ask(images, questions[1], num_beams=2, max_new_tokens=6) == [a[1] for a in ours]


def test_chat_carries_the_turns_and_resets(tiny_opt, model, example_images):
    image = example_images[0]
    gen = dict(num_beams=1, max_new_tokens=4, min_new_tokens=1)
    chat = model.chat(image, **gen)
    first = chat.ask("what is this?")
    second = chat.ask("why")
    assert first == reference_answer(tiny_opt, image, "Question: what is this? Answer:", **gen)
    assert second == reference_answer(
        tiny_opt, image, f"Question: what is this? Answer: {first}. Question: why Answer:", **gen)
    assert chat.history == [("what is this?", first), ("why", second)]
    assert [t["answer"] for t in chat.transcript] == [first, second]
    chat.reset()
    assert chat.history == []
    assert chat.ask("what is this?") == first  # a fresh context: the first turn again


# -- features --------------------------------------------------------------------------
def test_embeddings_and_scores_equal_the_cli_and_transformers(tiny_itm, retr, reference, example_images):
    images = example_images[:3]
    vectors = retr.embed_images(images)
    assert vectors.dtype == np.float32 and vectors.shape[0] == 3 and vectors.ndim == 3
    records = cli("embed", *images, "-m", tiny_itm, "-f", "jsonl")
    for row, record in zip(vectors, records):
        np.testing.assert_allclose(row, np.asarray(record["vector"], np.float32).reshape(record["dims"]), atol=ATOL)
    pooled = retr.embed_images(images, pool="mean")
    assert pooled.shape == (3, vectors.shape[2])
    np.testing.assert_allclose(retr.embed_images(images[0]), vectors[0], atol=ATOL)
    texts = retr.embed_texts(TEXTS[:2])
    assert texts.dtype == np.float32 and texts.shape == (2, vectors.shape[2])
    assert retr.embed_texts(TEXTS[0]).shape == (vectors.shape[2],)
    scores = retr.score(images[0], TEXTS[:3])
    assert isinstance(scores, list) and all(isinstance(s, float) for s in scores)
    for text, got in zip(TEXTS[:3], scores):
        want = ref_outputs(reference, images[0], text, itm=True).logits_per_image.softmax(-1)[0, 1].item()
        assert got == pytest.approx(want, abs=ATOL)
        ref = ref_outputs(reference, images[0], text, itm=False)
        np.testing.assert_allclose(texts[0] if text == TEXTS[0] else retr.embed_texts(text),
                                   ref.text_embeds[0].numpy(), atol=ATOL)
    assert retr.score(images[0], TEXTS[0]) == pytest.approx(scores[0], abs=ATOL)


def test_a_captioning_checkpoint_has_features_but_no_text_side(model, example_images):
    assert model.embed_images(example_images[0], features="vision").ndim == 1
    with pytest.raises(blip2cli.ModelError, match="retrieval"):
        model.embed_texts(["a cat"])
    with pytest.raises(blip2cli.ModelError, match="retrieval"):
        model.embed_images(example_images[0], features="itc")


# -- the *_files iterators: the CLI's pipeline -----------------------------------------------
@pytest.fixture
def photos(tmp_path, example_images) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    for p in example_images:
        (folder / p.name).write_bytes(p.read_bytes())
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    return folder


def test_caption_files_yields_the_clis_records(tiny_opt, model, photos):
    ours = list(blip2cli.caption_files([photos], model=model, num_beams=2, max_new_tokens=5, batch_size=2))
    assert ours == cli("caption", photos, "--model", tiny_opt, "-f", "jsonl", "--num-beams", 2,
                       "--max-new-tokens", 5, "-b", 2)
    errors = [r for r in ours if r["error"]]
    assert [Path(r["path"]).name for r in errors] == ["broken.png"] and errors[0]["caption"] is None
    assert len(ours) == 5


def test_caption_files_can_stop_early(model, photos):
    for record in blip2cli.caption_files(str(photos), model=model, num_beams=1, max_new_tokens=3, batch_size=1):  # noqa: B007 - read after the loop
        break
    assert record["path"].endswith(".png")
    # the pipeline thread has ended: the model is free for the next call
    assert isinstance(model.caption(photos / "chelsea.png", num_beams=1, max_new_tokens=3), str)


def test_ask_files_yields_the_clis_records(tiny_opt, model, photos):
    questions = ["what is it?", "is it red?"]
    ours = list(blip2cli.ask_files(photos, questions, model=model, num_beams=1, max_new_tokens=4))
    assert ours == cli("ask", photos, "-q", questions[0], "-q", questions[1], "--model", tiny_opt, "-f", "jsonl",
                       "--num-beams", 1, "--max-new-tokens", 4)
    assert len(ours) == 10 and sum(1 for r in ours if r["error"]) == 2


# -- errors: ordinary exceptions that name the input or the parameter ------------------------------
def test_a_bad_image_raises_image_error_naming_the_input(model, example_images, tmp_path):
    bad = tmp_path / "notes.jpg"
    bad.write_text("not a photo")
    with pytest.raises(blip2cli.ImageError, match=r"notes\.jpg.*not an image") as info:
        model.caption([example_images[0], bad], num_beams=1, max_new_tokens=3)
    assert info.value.index == 1
    with pytest.raises(blip2cli.ImageError, match=r"^image 1 \(bytes\): "):
        model.caption([example_images[0], b"GIF89a broken"], num_beams=1)
    with pytest.raises(blip2cli.ImageError, match=r"^image 0 \(ndarray\): expected an HxWx3 uint8 array"):
        model.caption(np.zeros((8, 8, 3), dtype=np.float32))
    with pytest.raises(blip2cli.ImageError, match="no such file"):
        model.ask(tmp_path / "missing.png", "what?")
    with pytest.raises(blip2cli.ImageError, match="notes.jpg"):
        model.chat(bad)
    with pytest.raises(TypeError, match="expected a PIL image, a path, bytes"):
        model.caption([42])


@pytest.mark.parametrize(
    "call, words",
    [
        (lambda m, img: m.caption(img, num_beams=0), "num_beams must be at least 1"),
        (lambda m, img: m.caption(img, max_new_tokens=0), "max_new_tokens must be at least 1"),
        (lambda m, img: m.caption(img, num_beams=2, num_captions=3),
         "num_captions 3 needs at least as many beams (num_beams 2)"),
        (lambda m, img: m.caption(img, sample=True, temperature=0), "temperature must be greater than 0"),
        (lambda m, img: m.caption(img, batch_size=0), "batch_size must be at least 1"),
        (lambda m, img: m.caption(img, preprocess="slow"), "preprocess must be one of"),
        (lambda m, img: m.ask(img, "q", num_answers=0), "num_answers must be at least 1"),
        (lambda m, img: m.ask(img, "q", template="Q:"), "template must contain {question}"),
        (lambda m, img: m.ask(img, []), "questions is empty"),
        (lambda m, img: m.embed_images(img, pool="max"), "pool must be one of"),
        (lambda m, img: blip2cli.load("x", dtype="float8"), "dtype must be one of"),
        (lambda m, img: blip2cli.load("x", quantize="2bit"), "quantize must be None, '8bit', '4bit' or 'int8'"),
        # values of the wrong type name the parameter too (issue 19, #17)
        (lambda m, img: m.caption(img, num_beams="5"), "num_beams must be an integer or None (got '5')"),
        (lambda m, img: m.caption(img, num_beams=2.5), "num_beams must be an integer or None (got 2.5)"),
        (lambda m, img: m.caption(img, prompt=5), "prompt must be a string or None (got 5)"),
        (lambda m, img: m.caption(img, seed="x"), "seed must be an integer or None (got 'x')"),
        (lambda m, img: m.caption(img, max_new_tokens=True), "max_new_tokens must be an integer (got True)"),
        (lambda m, img: m.caption(img, temperature="hot", sample=True), "temperature must be a number"),
        (lambda m, img: m.caption(img, batch_size=1.5), "batch_size must be an integer or None"),
        (lambda m, img: m.ask(img, 42), "questions must be a string or a list of strings (got 42)"),
        (lambda m, img: m.ask(img, "q", num_answers="2"), "num_answers must be an integer (got '2')"),
        (lambda m, img: m.caption_records([img], workers="4"), "workers must be an integer or None"),
        # beyond the model's positions (issue 19, #16)
        (lambda m, img: m.caption(img, max_new_tokens=100000), "max_new_tokens 100000 is beyond the model's context"),
        (lambda m, img: m.ask(img, "q", max_new_tokens=100000), "max_new_tokens 100000 is beyond the model's context"),
    ],
)
def test_errors_are_value_errors_naming_the_parameter(model, example_images, call, words):
    with pytest.raises(ValueError) as info:
        call(model, example_images[0])
    assert words in str(info.value)
    assert isinstance(info.value, blip2cli.OptionError)
    assert "--" not in str(info.value)  # parameters, not the CLI's flags
    assert words.split()[0] in info.value.params or words.startswith(("num_captions", "min_new"))


def test_an_empty_array_is_an_image_error(model):
    with pytest.raises(blip2cli.ImageError, match=r"image 0 \(ndarray\): empty image"):
        model.caption(np.zeros((0, 0, 3), np.uint8), num_beams=1)
    from PIL import Image

    with pytest.raises(blip2cli.ImageError, match="empty image"):
        model.caption(Image.new("RGB", (0, 0)), num_beams=1)


def test_max_new_tokens_beyond_the_context_is_a_usage_error_naming_the_flag(tiny_opt, model, example_images):
    limit = model.loaded.model.config.text_config.max_position_embeddings
    room = limit - model.loaded.model.config.num_query_tokens - 1  # the image's tokens and bos
    assert model.caption(example_images[0], num_beams=1, max_new_tokens=room, min_new_tokens=room) is not None
    with pytest.raises(blip2cli.OptionError, match=f"so at most {room} new tokens"):
        model.caption(example_images[0], num_beams=1, max_new_tokens=room + 1)
    for command in (["caption"], ["ask", "-q", "what?"]):
        result = runner.invoke(app, [command[0], str(example_images[0]), *command[1:], "--model", str(tiny_opt),
                                     "--max-new-tokens", "100000"])
        assert result.exit_code == 2, result.output
        assert "--max-new-tokens 100000 is beyond the model's context" in result.stderr
        assert f"it holds {limit} tokens" in result.stderr and result.stdout == ""


def test_the_hint_names_parameters_and_the_cli_names_flags(tiny_opt, model, example_images):
    with pytest.raises(ValueError) as info:
        model.caption(example_images[0], num_beams=2, num_captions=3)
    assert info.value.hint == "add num_beams=3, or sample=True for varied captions"
    result = runner.invoke(app, ["caption", str(example_images[0]), "--model", str(tiny_opt),
                                 "--num-beams", "2", "--num-captions", "3"])
    assert result.exit_code == 2
    assert "--num-captions 3 needs at least as many beams (--num-beams 2)" in result.stderr
    assert "add --num-beams 3, or --sample for varied captions" in result.stderr


def test_model_errors_are_ordinary_exceptions(tiny_opt, retr, tmp_path, example_images):
    with pytest.raises(blip2cli.ModelError, match="does not exist"):
        blip2cli.load(tmp_path / "no-model")
    with pytest.raises(blip2cli.ModelError, match="Blip2ForImageTextRetrieval") as info:
        retr.caption(example_images[0])
    assert "Salesforce/blip2-opt-2.7b" in info.value.hint
    with pytest.raises(ValueError, match="quantize='8bit': a retrieval checkpoint"):
        blip2cli.load(retr.loaded.options.model, quantize="8bit", device="cpu")
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "config.json").write_text((Path(tiny_opt) / "config.json").read_text())
    (tmp_path / "pickled" / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(blip2cli.ModelError) as pickled:
        blip2cli.load(tmp_path / "pickled")
    assert "allow_pickle" in pickled.value.hint and "--allow-pickle" not in pickled.value.hint


# -- import cost ---------------------------------------------------------------------------
def test_import_is_light_and_names_resolve_lazily():
    code = (
        "import json, sys\n"
        "import blip2cli\n"
        "before = sorted(m for m in ('torch', 'transformers', 'PIL', 'numpy', 'typer') if m in sys.modules)\n"
        "names = [blip2cli.load, blip2cli.Model, blip2cli.Chat, blip2cli.caption_files, blip2cli.ask_files,\n"
        "         blip2cli.ImageError, blip2cli.ModelError, blip2cli.OptionError, blip2cli.GenerationOptions]\n"
        "after = sorted(m for m in ('torch', 'transformers', 'PIL', 'numpy', 'typer') if m in sys.modules)\n"
        "print(json.dumps({'before': before, 'after': after, 'dir': 'load' in dir(blip2cli),\n"
        "                  'image_error': blip2cli.ImageError.__module__}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got == {"before": [], "after": [], "dir": True, "image_error": "blip2cli.decode"}
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        blip2cli.nope  # noqa: B018


def test_the_package_is_typed():
    assert (ROOT / "blip2cli" / "py.typed").is_file()
    assert 'blip2cli = ["py.typed"]' in (ROOT / "pyproject.toml").read_text()


# -- the README's examples -------------------------------------------------------------------
HUB_IDS = {"Salesforce/blip2-opt-2.7b": "tiny_opt", "Salesforce/blip2-itm-vit-g": "tiny_itm"}


def readme_python_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    match = re.search(r"^## Python library\n(.*?)(?=^## )", text, flags=re.S | re.M)
    assert match, 'README.md has no "## Python library" section'
    return re.findall(r"^```python\n(.*?)^```", match.group(1), flags=re.S | re.M)


def test_readme_python_examples_run(request, monkeypatch):
    """Every python block of the README's "Python library" section, in order, in one namespace,
    from the repository root (the examples use examples/images/); each hub id the README
    names is replaced by the tiny checkpoint of the same kind."""
    blocks = readme_python_blocks()
    assert len(blocks) >= 2
    monkeypatch.chdir(ROOT)
    namespace: dict = {}
    for block in blocks:
        for hub_id, fixture in HUB_IDS.items():
            block = block.replace(f'"{hub_id}"', repr(str(request.getfixturevalue(fixture))))
        assert "Salesforce/" not in block, "a hub id the test does not map to a tiny checkpoint"
        exec(compile(block, "README.md", "exec"), namespace)
    assert isinstance(namespace["model"], blip2cli.Model)
