"""blip2 ask: questions and templates, the shared image pass, parity with
transformers' documented per-pair usage, and the command through Typer's runner.

Random tiny weights make the answers meaningless; the tests assert exact token
agreement with ``processor(images=img, text=prompt)`` + ``model.generate`` for each
(image, question) pair alone, and the structure of the records.
"""

from __future__ import annotations

import csv
import json

import pytest
from typer.testing import CliRunner

from blip2cli.ask import (
    DEFAULT_TEMPLATE,
    Asker,
    AskTask,
    ImageStage,
    answer_record,
    check_template,
    parse_questions,
    render_prompt,
    split_arguments,
)
from blip2cli.caption import GenerationOptions
from blip2cli.cli import app
from blip2cli.errors import UsageError

from helpers import reference_tokens

runner = CliRunner()

# Different lengths in tokens, so a batch needs padding.
QUESTIONS = [
    "what is this?",
    "how many cats are sitting on the red sofa next to the window in this picture?",
    "why",
]


# -- questions and templates: pure ------------------------------------------------
def test_render_prompt_template_and_raw():
    assert render_prompt("how many cats?") == "Question: how many cats? Answer:"
    assert render_prompt("x", "Q: {question} Short answer:") == "Q: x Short answer:"
    assert render_prompt("as is", None) == "as is"
    # braces in a question are text, not format fields
    assert render_prompt("what is {this}?") == "Question: what is {this}? Answer:"


def test_template_must_hold_the_placeholder():
    assert check_template(DEFAULT_TEMPLATE) == DEFAULT_TEMPLATE
    with pytest.raises(UsageError, match=r"\{question\}"):
        check_template("Question: {} Answer:")


def test_parse_questions_file_lines():
    assert parse_questions("what?\n\n  why?  \r\nwho\n") == ["what?", "why?", "who"]


def test_last_positional_is_the_question_unless_others_are_given():
    assert split_arguments(["a.jpg", "b/", "how many?"], False) == (["a.jpg", "b/"], "how many?")
    assert split_arguments(["a.jpg", "b/"], True) == (["a.jpg", "b/"], None)
    assert split_arguments([], False) == ([], None)


def test_error_item_gives_one_error_record_per_question():
    from blip2cli.sources import Item

    task = AskTask.__new__(AskTask)
    task.questions = ["q1", "q2"]
    records = task.record(Item("bad.jpg", "bad.jpg"), None, "truncated JPEG file")
    assert records == [
        answer_record("bad.jpg", "q1", None, "truncated JPEG file"),
        answer_record("bad.jpg", "q2", None, "truncated JPEG file"),
    ]
    assert records[0] == {"path": "bad.jpg", "question": "q1", "answer": None, "answers": [],
                          "error": "truncated JPEG file"}


# -- the reference: transformers' documented per-pair usage --------------------------


def ask_ids(loaded, images, prompts, gen: GenerationOptions, pairs_per_call=16):
    """Our path: one image pass for the batch, then every pair, as AskTask runs it."""
    stage = ImageStage(loaded)
    asker = Asker(loaded, gen, pairs_per_call=pairs_per_call)
    features = asker.image_features(stage.pixels([stage.prepare(p) for p in images]))
    pairs = [(b, p) for b in range(len(images)) for p in prompts]
    return asker.generate_ids(features, pairs)


@pytest.mark.parametrize("kind", ["opt", "t5"])
@pytest.mark.parametrize("num_beams", [1, 3])
def test_pair_tokens_equal_documented_per_pair_usage(kind, num_beams, request, example_images):
    """Three images x three questions of different lengths, pairs in chunks of 4 (so
    chunks mix images and lengths), against each pair alone through transformers."""
    path = request.getfixturevalue(f"tiny_{kind}")
    loaded = request.getfixturevalue(f"loaded_{kind}")
    images = example_images[:3]
    prompts = [render_prompt(q) for q in QUESTIONS]
    lengths = {len(loaded.tokenizer(p)["input_ids"]) for p in prompts}
    assert len(lengths) == len(prompts), "the questions must differ in length"
    gen = GenerationOptions(num_beams=num_beams, max_new_tokens=8, min_new_tokens=2)
    ours = ask_ids(loaded, images, prompts, gen, pairs_per_call=4)
    kwargs = dict(num_beams=num_beams, max_new_tokens=8, min_new_tokens=2)
    i = 0
    for image in images:
        for prompt in prompts:
            want = reference_tokens(path, image, prompt, **kwargs)
            assert ours[i] == want, f"{kind} {image.name} {prompt!r}: {ours[i]} != {want}"
            i += 1
    assert len({tuple(t[0]) for t in ours}) > len(images), "answers must depend on image and question"


def test_opt_parity_holds_with_repetition_penalty(tiny_opt, loaded_opt, example_images):
    """The padded slots of a left-padded row must not change what the penalty sees."""
    prompts = [render_prompt(q) for q in QUESTIONS]
    gen = GenerationOptions(num_beams=1, max_new_tokens=8, repetition_penalty=1.5)
    ours = ask_ids(loaded_opt, example_images[1:3], prompts, gen)
    want = [reference_tokens(tiny_opt, img, p, num_beams=1, max_new_tokens=8, min_new_tokens=1,
                             repetition_penalty=1.5)
            for img in example_images[1:3] for p in prompts]
    assert ours == want


def test_several_answers_per_question_are_the_best_beams(tiny_opt, loaded_opt, example_images):
    prompts = [render_prompt(QUESTIONS[0])]
    gen = GenerationOptions(num_beams=3, num_captions=3, max_new_tokens=6)
    ours = ask_ids(loaded_opt, example_images[:1], prompts, gen)
    want = reference_tokens(tiny_opt, example_images[0], prompts[0], num_beams=3,
                            num_return_sequences=3, max_new_tokens=6, min_new_tokens=1)
    assert ours == [want] and len({tuple(r) for r in want}) == 3


def test_image_pass_runs_once_per_image(loaded_opt, example_images):
    """Four images, three questions: the vision tower sees each image once, in one call."""
    seen = []
    handle = loaded_opt.model.vision_model.register_forward_hook(
        lambda module, args, output: seen.append(output.last_hidden_state.shape[0])
    )
    try:
        asker = Asker(loaded_opt, GenerationOptions(num_beams=2, max_new_tokens=4), pairs_per_call=5)
        task = AskTask(asker, ImageStage(loaded_opt), QUESTIONS, DEFAULT_TEMPLATE)
        result = task.run_batch([task.prepare(_item(p)) for p in example_images])
    finally:
        handle.remove()
    assert seen == [len(example_images)]
    assert [len(r) for r in result] == [len(QUESTIONS)] * len(example_images)


def _item(path):
    from blip2cli.sources import Item

    return Item(str(path), str(path))


# -- the command, as a user types it ----------------------------------------------
def run_ask(*args, input=None):
    return runner.invoke(app, ["ask", *map(str, args)], input=input)


def test_cli_records_image_major_in_input_order(tiny_opt, example_images):
    result = run_ask(*example_images, "--model", tiny_opt, "-q", QUESTIONS[0], "-q", QUESTIONS[2],
                     "-f", "jsonl", "-b", "3", "--max-new-tokens", "5", "--num-beams", "2")
    assert result.exit_code == 0, result.output
    records = [json.loads(l) for l in result.stdout.splitlines()]
    assert [(r["path"], r["question"]) for r in records] == [
        (str(p), q) for p in example_images for q in (QUESTIONS[0], QUESTIONS[2])
    ]
    for r in records:
        assert r["error"] is None and r["answer"] == r["answer"].strip() and r["answers"] == [r["answer"]]
        assert not r["answer"].startswith("Question")  # the prompt is never echoed


def test_cli_answers_equal_transformers_per_pair(tiny_opt, example_images):
    from transformers import Blip2Processor

    tok = Blip2Processor.from_pretrained(tiny_opt).tokenizer
    result = run_ask(example_images[0], QUESTIONS[1], "--model", tiny_opt, "-f", "jsonl",
                     "--max-new-tokens", "6")
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout)["answer"]
    ids = reference_tokens(tiny_opt, example_images[0], render_prompt(QUESTIONS[1]),
                           num_beams=5, max_new_tokens=6, min_new_tokens=1)[0]
    assert got == tok.decode(ids, skip_special_tokens=True).strip()


def test_cli_template_and_raw_decide_the_prompt(tiny_opt, example_images):
    common = [example_images[0], "--model", tiny_opt, "-f", "jsonl", "--max-new-tokens", "5", "--num-beams", "1"]

    def answer(*args):
        result = run_ask(*common, *args)
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)["answer"]

    default = answer("what is this?")
    assert answer("what is this?", "--template", "Question: {question} Answer:") == default
    assert answer("Question: what is this? Answer:", "--raw") == default
    assert answer("what is this?", "--raw") != default
    assert answer("what is this?", "--template", "Q: {question} Short answer:") != default


def test_cli_questions_file_and_flags_together(tiny_opt, example_images, tmp_path):
    qfile = tmp_path / "questions.txt"
    qfile.write_text("what is this?\n\nwhy\n", encoding="utf-8")
    result = run_ask(example_images[0], "--questions-file", qfile, "-q", "who", "--model", tiny_opt,
                     "-f", "jsonl", "--max-new-tokens", "4", "--num-beams", "1")
    assert result.exit_code == 0, result.output
    assert [json.loads(l)["question"] for l in result.stdout.splitlines()] == ["who", "what is this?", "why"]


def test_cli_text_and_csv(tiny_opt, example_images, tmp_path):
    common = [*example_images[:2], "-q", "what is this?", "-q", "why", "--model", tiny_opt,
              "--max-new-tokens", "4", "--num-beams", "1"]
    text = run_ask(*common)
    assert text.exit_code == 0, text.output
    lines = [l.split("\t") for l in text.stdout.splitlines()]
    assert [(l[0], l[1]) for l in lines] == [(str(p), q) for p in example_images[:2] for q in ("what is this?", "why")]
    assert all(len(l) == 3 for l in lines)
    out = tmp_path / "answers.csv"
    res = run_ask(*common, "-o", out)
    assert res.exit_code == 0 and res.stdout == ""
    rows = list(csv.DictReader(out.open(newline="")))
    assert list(rows[0]) == ["path", "question", "answer", "error"]
    assert [r["answer"] for r in rows] == [l[2] for l in lines]


def test_cli_bad_image_gives_error_records_and_exit_1(tiny_opt, example_images, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"<html>not an image</html>")
    inputs = [example_images[0], bad, example_images[1]]
    result = run_ask(*inputs, "-q", "what?", "-q", "why", "--model", tiny_opt, "-f", "jsonl",
                     "--max-new-tokens", "4", "--num-beams", "1", "-b", "2")
    assert result.exit_code == 1
    records = [json.loads(l) for l in result.stdout.splitlines()]
    assert [(r["path"], r["question"]) for r in records] == [(str(p), q) for p in inputs for q in ("what?", "why")]
    assert [r["error"] is None for r in records] == [True, True, False, False, True, True]
    assert records[2]["answer"] is None and "not an image" in records[2]["error"]
    assert "1 of 3 images failed" in result.stderr


@pytest.mark.parametrize(
    "args, words",
    [
        (["img.png"], "taken as the question"),
        (["img.png", "what?", "--template", "no placeholder"], "{question}"),
        (["img.png", "what?", "--raw", "--template", "Q: {question}"], "contradict"),
        (["img.png", "how many cats?", "-q", "what color?"], "with -q or --questions-file"),
        (["img.png", "what?", "--num-answers", "3", "--num-beams", "2"], "--num-answers 3"),
        (["img.png", "--questions-file", "missing.txt"], "cannot read the questions file"),
        (["img.png", "  "], "empty"),
    ],
)
def test_usage_errors_exit_2_before_loading(tmp_path, monkeypatch, args, words):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "img.png").write_bytes(b"not used")
    result = run_ask(*args, "--model", tmp_path / "no-model")
    assert result.exit_code == 2, result.output
    assert words in result.stderr


def test_num_answers_above_beams_names_the_ask_option(tiny_opt, example_images):
    from typer.testing import CliRunner

    from blip2cli.cli import app

    res = CliRunner().invoke(app, ["ask", str(example_images[0]), "what?", "--model", str(tiny_opt),
                                   "--num-answers", "3", "--num-beams", "2"])
    assert res.exit_code == 2
    assert "--num-answers 3 needs at least as many beams" in res.stderr and "varied answers" in res.stderr
