"""--sample samples: one beam unless --num-beams is given, --seed reproducible, seeds differ.

Random tiny checkpoints have fairly flat next-token distributions; a temperature of
2 flattens them further, so four images x eight sampled tokens under two seeds are
all but certain to differ somewhere, and the seed makes each run deterministic
(same seed -> identical output, asserted), so the test cannot flake.
"""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from blip2cli.caption import GenerationOptions
from blip2cli.cli import app

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [*map(str, args)])


@pytest.fixture
def generate_calls(monkeypatch):
    """The keyword arguments of every generate call: of Blip2ForConditionalGeneration (caption)
    under "blip2", of its language model (which that generate calls, and ask calls directly) under "lm"."""
    from transformers import Blip2ForConditionalGeneration, GenerationMixin

    calls: dict[str, list[dict]] = {"blip2": [], "lm": []}
    caption_generate = Blip2ForConditionalGeneration.generate
    lm_generate = GenerationMixin.generate

    def spy_caption(self, *args, **kwargs):
        calls["blip2"].append(kwargs)
        return caption_generate(self, *args, **kwargs)

    def spy_lm(self, *args, **kwargs):
        if not isinstance(self, Blip2ForConditionalGeneration):
            calls["lm"].append(kwargs)
        return lm_generate(self, *args, **kwargs)

    monkeypatch.setattr(Blip2ForConditionalGeneration, "generate", spy_caption)
    monkeypatch.setattr(GenerationMixin, "generate", spy_lm)
    return calls


# -- the options ------------------------------------------------------------------
def test_sample_defaults_to_one_beam_and_beam_search_to_five():
    assert GenerationOptions().generate_kwargs()["num_beams"] == 5
    sampled = GenerationOptions(sample=True).generate_kwargs()
    assert sampled["num_beams"] == 1 and sampled["do_sample"] is True
    assert sampled["temperature"] == 1.0 and sampled["top_p"] == 0.9
    beam_sample = GenerationOptions(sample=True, num_beams=3).generate_kwargs()
    assert beam_sample["num_beams"] == 3 and beam_sample["do_sample"] is True
    # the effective width is what the records carry
    assert GenerationOptions(sample=True).describe()["num_beams"] == 1
    assert GenerationOptions().describe()["num_beams"] == 5


def test_num_captions_with_sampling_needs_no_beams():
    GenerationOptions(sample=True, num_captions=4).validate()
    with pytest.raises(ValueError, match=r"num_captions 6 needs at least as many beams \(num_beams 5\)"):
        GenerationOptions(num_captions=6).validate()


# -- through the CLI ---------------------------------------------------------------
def test_cli_sample_uses_one_beam(tiny_opt, example_images, generate_calls):
    result = run("caption", *example_images[:2], "--model", tiny_opt, "-f", "jsonl", "--sample",
                 "--max-new-tokens", "4", "--seed", "1")
    assert result.exit_code == 0, result.output
    calls = generate_calls["blip2"] + generate_calls["lm"]
    assert generate_calls["blip2"] and all(c["num_beams"] == 1 and c["do_sample"] is True for c in calls)
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert all(r["generation"]["num_beams"] == 1 and r["generation"]["sample"] for r in records)


def test_cli_explicit_beams_with_sample_is_beam_sample(tiny_opt, example_images, generate_calls):
    result = run("caption", example_images[0], "--model", tiny_opt, "-f", "jsonl", "--sample",
                 "--num-beams", "3", "--max-new-tokens", "4", "--seed", "1")
    assert result.exit_code == 0, result.output
    assert [(c["num_beams"], c["do_sample"]) for c in generate_calls["blip2"]] == [(3, True)]
    assert json.loads(result.stdout)["generation"]["num_beams"] == 3


def test_cli_default_is_still_five_beams(tiny_opt, example_images, generate_calls):
    result = run("caption", example_images[0], "--model", tiny_opt, "-f", "jsonl", "--max-new-tokens", "4")
    assert result.exit_code == 0, result.output
    assert [(c["num_beams"], c["do_sample"]) for c in generate_calls["blip2"]] == [(5, False)]
    assert json.loads(result.stdout)["generation"]["num_beams"] == 5


def test_cli_ask_sample_uses_one_beam(tiny_opt, example_images, generate_calls):
    result = run("ask", example_images[0], "what is it?", "--model", tiny_opt, "-f", "jsonl", "--sample",
                 "--max-new-tokens", "4", "--seed", "1")
    assert result.exit_code == 0, result.output
    calls = generate_calls["lm"]
    assert calls and all(c["num_beams"] == 1 and c["do_sample"] is True for c in calls)
    assert json.loads(result.stdout)["generation"]["num_beams"] == 1
    plain = run("ask", example_images[0], "what is it?", "--model", tiny_opt, "-f", "jsonl", "--max-new-tokens", "4")
    assert json.loads(plain.stdout)["generation"]["num_beams"] == 5


@pytest.mark.parametrize("command", ["caption", "ask"])
def test_cli_seed_reproduces_and_different_seeds_differ(command, tiny_opt, example_images):
    question = ["what is in the picture?"] if command == "ask" else []
    common = [*example_images, *question, "--model", tiny_opt, "-f", "jsonl", "--sample",
              "--temperature", "2.0", "--max-new-tokens", "8"]
    key = "answer" if command == "ask" else "caption"

    def texts(seed):
        result = run(command, *common, "--seed", seed)
        assert result.exit_code == 0, result.output
        return [json.loads(line)[key] for line in result.stdout.splitlines()]

    first = texts(7)
    assert len(first) == len(example_images)
    assert texts(7) == first  # the same seed: the same samples
    others = [texts(12345), texts(99)]
    assert all(other != first for other in others), (first, others)


def test_cli_chat_sample_uses_one_beam(tiny_opt, example_images, generate_calls):
    result = runner.invoke(app, ["chat", str(example_images[0]), "--model", str(tiny_opt), "--sample",
                                 "--max-new-tokens", "3", "--seed", "1"], input="what is it?\nwhy?\n")
    assert result.exit_code == 0, result.output
    assert len(result.stdout.splitlines()) == 2
    calls = generate_calls["lm"]
    assert len(calls) == 2 and all(c["num_beams"] == 1 and c["do_sample"] is True for c in calls)
