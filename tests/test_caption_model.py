"""Captioning on tiny random checkpoints, loaded through the loader a user runs.

Random weights make the words meaningless, so these tests assert structure,
determinism, and exact token agreement with transformers' documented usage
(processor + generate on each image alone).
"""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from blip2cli.caption import Captioner, GenerationOptions
from blip2cli.cli import app
from blip2cli.loader import LoadOptions, load

from helpers import reference_tokens

runner = CliRunner()


# -- the reference: transformers' documented per-image usage -----------------


def our_tokens(loaded, images, gen: GenerationOptions):
    from blip2cli.images import prepare
    from blip2cli.pixels import to_pixel_values

    arrays = [prepare(p, loaded.image_spec) for p in images]
    pixels = to_pixel_values(arrays, loaded.image_spec, device=loaded.device, dtype=loaded.dtype)
    return Captioner(loaded, gen).generate_ids(pixels)


@pytest.mark.parametrize("kind", ["opt", "t5"])
@pytest.mark.parametrize("prompt", [None, "a photo of"])
@pytest.mark.parametrize("num_beams", [1, 3])
def test_batched_tokens_equal_documented_per_image_usage(
    kind, prompt, num_beams, request, example_images
):
    """All example photos (different sizes) in one batch vs each alone through transformers."""
    path = request.getfixturevalue(f"tiny_{kind}")
    loaded = request.getfixturevalue(f"loaded_{kind}")
    gen = GenerationOptions(prompt=prompt, num_beams=num_beams, max_new_tokens=12, min_new_tokens=2)
    ours = our_tokens(loaded, example_images, gen)
    for image, got in zip(example_images, ours):
        want = reference_tokens(
            path, image, prompt, num_beams=num_beams, max_new_tokens=12, min_new_tokens=2
        )[0]
        assert got == want, f"{kind} {image.name}: {got} != {want}"
    # the model sees the images: not every photo gets the same tokens
    assert len({tuple(t) for t in ours}) > 1


def test_prompt_changes_the_output(loaded_opt, example_images):
    plain = our_tokens(loaded_opt, example_images[:2], GenerationOptions(num_beams=1, max_new_tokens=8))
    prompted = our_tokens(
        loaded_opt, example_images[:2], GenerationOptions(prompt="a photo of", num_beams=1, max_new_tokens=8)
    )
    assert plain != prompted


def test_num_captions_returns_distinct_beams(loaded_opt, example_images):
    gen = GenerationOptions(num_beams=4, num_captions=3, max_new_tokens=8)
    ids = our_tokens(loaded_opt, example_images[:2], gen)
    assert len(ids) == 6
    assert len({tuple(r) for r in ids[:3]}) == 3


# -- through the CLI, as a user types it ---------------------------------------
def run_cli(*args, input=None):
    return runner.invoke(app, ["caption", *map(str, args)], input=input)


def test_cli_jsonl_one_record_per_image_in_input_order(tiny_opt, example_images):
    result = run_cli(*example_images, "--model", tiny_opt, "-f", "jsonl", "-b", "3", "--max-new-tokens", "8")
    assert result.exit_code == 0, result.output
    records = [json.loads(l) for l in result.stdout.splitlines()]
    assert [r["path"] for r in records] == [str(p) for p in example_images]
    for r in records:
        assert r["error"] is None
        assert isinstance(r["caption"], str) and r["caption"] == r["caption"].strip() and r["caption"]
        assert r["captions"] == [r["caption"]]


def test_cli_batch_size_and_workers_do_not_change_results(tiny_opt, example_images):
    common = [*example_images, "--model", tiny_opt, "-f", "jsonl", "--max-new-tokens", "8", "--num-beams", "2"]
    one = run_cli(*common, "-b", "1", "-j", "1")
    many = run_cli(*common, "-b", "4", "-j", "3")
    assert one.exit_code == many.exit_code == 0
    assert one.stdout == many.stdout


def test_cli_captions_match_transformers_greedy(tiny_opt, example_images):
    from transformers import Blip2Processor

    tok = Blip2Processor.from_pretrained(tiny_opt).tokenizer
    result = run_cli(*example_images, "--model", tiny_opt, "-f", "jsonl", "--num-beams", "1",
                     "--max-new-tokens", "10", "--min-new-tokens", "0")
    got = [json.loads(l)["caption"] for l in result.stdout.splitlines()]
    want = [
        tok.decode(reference_tokens(tiny_opt, p, None, max_new_tokens=10, min_new_tokens=0)[0],
                   skip_special_tokens=True).strip()
        for p in example_images
    ]
    assert got == want


def test_cli_reference_preprocess_agrees_with_fast(tiny_opt, example_images):
    common = [*example_images, "--model", tiny_opt, "-f", "jsonl", "--max-new-tokens", "8"]
    fast = run_cli(*common)
    ref = run_cli(*common, "--preprocess", "reference")
    assert fast.exit_code == ref.exit_code == 0
    fast_records = [json.loads(l) for l in fast.stdout.splitlines()]
    ref_records = [json.loads(l) for l in ref.stdout.splitlines()]
    assert [r["captions"] for r in fast_records] == [r["captions"] for r in ref_records]
    assert {r["preprocess"] for r in fast_records} == {"fast"}
    assert {r["preprocess"] for r in ref_records} == {"reference"}


def test_cli_bad_file_is_an_error_record_and_the_rest_goes_on(tiny_opt, example_images, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"<html>not an image</html>")
    inputs = [example_images[0], bad, example_images[1]]
    result = run_cli(*inputs, "--model", tiny_opt, "-f", "jsonl", "--max-new-tokens", "6", "-b", "2")
    assert result.exit_code == 1
    records = [json.loads(l) for l in result.stdout.splitlines()]
    assert [r["path"] for r in records] == [str(p) for p in inputs]
    assert records[1]["caption"] is None and "not an image" in records[1]["error"]
    assert records[0]["error"] is None and records[2]["error"] is None
    assert f"{bad}:" in result.stderr and "1 of 3 images failed" in result.stderr


def test_cli_text_and_csv_formats(tiny_opt, example_images, tmp_path):
    import csv

    text = run_cli(*example_images[:2], "--model", tiny_opt, "--max-new-tokens", "6")
    lines = text.stdout.splitlines()
    assert [l.split("\t")[0] for l in lines] == [str(p) for p in example_images[:2]]
    out = tmp_path / "caps.csv"
    res = run_cli(*example_images[:2], "--model", tiny_opt, "--max-new-tokens", "6", "-o", out)
    assert res.exit_code == 0 and res.stdout == ""
    rows = list(csv.DictReader(out.open(newline="")))
    assert [r["path"] for r in rows] == [str(p) for p in example_images[:2]]
    assert [r["caption"] for r in rows] == [l.split("\t")[1] for l in lines]


def test_cli_directory_and_stdin_paths(tiny_opt, example_images, tmp_path):
    folder = tmp_path / "photos" / "sub"
    folder.mkdir(parents=True)
    for p in example_images:
        shutil.copy(p, folder / p.name)
    by_dir = run_cli(tmp_path / "photos", "--model", tiny_opt, "--max-new-tokens", "6")
    listed = "\n".join(str(folder / p.name) for p in sorted(example_images, key=lambda p: p.name)) + "\n"
    by_stdin = run_cli("-", "--model", tiny_opt, "--max-new-tokens", "6", input=listed)
    assert by_dir.exit_code == by_stdin.exit_code == 0
    assert by_dir.stdout == by_stdin.stdout
    assert len(by_dir.stdout.splitlines()) == len(example_images)


def test_cli_raw_bytes_on_stdin(tiny_opt, example_images):
    data = example_images[0].read_bytes()
    piped = run_cli("-", "--model", tiny_opt, "-f", "jsonl", "--max-new-tokens", "6", input=data)
    named = run_cli(example_images[0], "--model", tiny_opt, "-f", "jsonl", "--max-new-tokens", "6")
    assert piped.exit_code == 0
    rec = json.loads(piped.stdout)
    assert rec["path"] == "-" and rec["caption"] == json.loads(named.stdout)["caption"]


def test_cli_sampling_is_reproducible_with_seed(tiny_opt, example_images):
    common = [*example_images[:2], "--model", tiny_opt, "-f", "jsonl", "--sample", "--num-captions", "2",
              "--max-new-tokens", "8", "--temperature", "1.5"]
    a = run_cli(*common, "--seed", "7")
    b = run_cli(*common, "--seed", "7")
    assert a.exit_code == 0 and a.stdout == b.stdout
    assert all(len(json.loads(l)["captions"]) == 2 for l in a.stdout.splitlines())


def test_t5_refuses_float16_with_a_reason(tiny_t5, example_images):
    result = run_cli(example_images[0], "--model", tiny_t5, "--dtype", "float16")
    assert result.exit_code == 2
    assert "Flan-T5" in result.stderr and "overflow" in result.stderr


def test_t5_auto_dtype_on_cpu_is_float32(loaded_t5):
    import torch

    assert loaded_t5.dtype == torch.float32 and loaded_t5.checkpoint.is_t5


def test_interrupt_keeps_finished_records_whole(tiny_opt, example_images, tmp_path, monkeypatch):
    calls = {"n": 0}
    original = Captioner.caption

    def caption_then_ctrl_c(self, pixels):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(self, pixels)

    monkeypatch.setattr(Captioner, "caption", caption_then_ctrl_c)
    out = tmp_path / "out.jsonl"
    result = run_cli(*example_images, "--model", tiny_opt, "-b", "2", "-o", out, "--max-new-tokens", "6")
    assert result.exit_code == 130
    records = [json.loads(l) for l in out.read_text().splitlines()]
    assert [r["path"] for r in records] == [str(p) for p in example_images[:2]]


def test_bitsandbytes_missing_is_explained(tiny_opt, example_images, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    result = run_cli(example_images[0], "--model", tiny_opt, "--quantize", "8bit")
    assert result.exit_code == 2
    assert "bitsandbytes" in result.stderr and "pip install" in result.stderr


@pytest.mark.parametrize("bits", ["8bit", "4bit"])
def test_quantized_load_on_cpu(tiny_opt, example_images, bits):
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb
    import torch

    loaded = load(LoadOptions(model=str(tiny_opt), device="cpu", quantize=bits))
    model = loaded.model
    quant_cls = bnb.nn.Linear8bitLt if bits == "8bit" else bnb.nn.Linear4bit
    lm_linears = [m for n, m in model.language_model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert lm_linears and all(isinstance(m, quant_cls) for m in lm_linears if m is not model.language_model.get_output_embeddings())
    for part in (model.vision_model, model.qformer, model.language_projection):
        assert not any(isinstance(m, quant_cls) for m in part.modules()), "must stay unquantized"
    ids = our_tokens(loaded, example_images, GenerationOptions(num_beams=1, max_new_tokens=6))
    assert len(ids) == len(example_images) and all(ids)
    result = run_cli(*example_images[:2], "--model", tiny_opt, "--quantize", bits, "-f", "jsonl",
                     "--max-new-tokens", "6")
    assert result.exit_code == 0, result.output
    assert all(json.loads(l)["caption"] is not None for l in result.stdout.splitlines())


def test_allow_pickle_is_the_only_way_to_load_bin_weights(tiny_opt, example_images, tmp_path):
    import torch
    from safetensors.torch import load_file

    ck = tmp_path / "pickled"
    shutil.copytree(tiny_opt, ck)
    torch.save(load_file(ck / "model.safetensors"), ck / "pytorch_model.bin")
    (ck / "model.safetensors").unlink()
    refused = run_cli(example_images[0], "--model", ck, "-f", "jsonl", "--max-new-tokens", "4")
    assert refused.exit_code == 2 and "--allow-pickle" in refused.stderr
    allowed = run_cli(example_images[0], "--model", ck, "-f", "jsonl", "--max-new-tokens", "4", "--allow-pickle")
    assert allowed.exit_code == 0, allowed.output
    safe = run_cli(example_images[0], "--model", tiny_opt, "-f", "jsonl", "--max-new-tokens", "4")
    assert json.loads(allowed.stdout)["caption"] == json.loads(safe.stdout)["caption"]


def test_explicit_dtype_is_used_and_recorded(tiny_opt, example_images):
    res = run_cli(example_images[0], "--model", tiny_opt, "-f", "jsonl", "--max-new-tokens", "4",
                  "--dtype", "bfloat16", "--num-beams", "1")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["dtype"] == "bfloat16"
    loaded = load(LoadOptions(model=str(tiny_opt), device="cpu", dtype="bfloat16"))
    assert next(loaded.model.language_model.parameters()).dtype.__str__() == "torch.bfloat16"


@pytest.mark.parametrize("kind", ["opt", "t5"])
def test_compile_static_cache_gives_the_same_tokens(kind, request, example_images):
    """--compile (a static KV cache) must not change a single token, greedy or beam."""
    path = request.getfixturevalue(f"tiny_{kind}")
    for beams in ("1", "3"):
        common = [*example_images, "--model", path, "-f", "jsonl", "--num-beams", beams, "--max-new-tokens", "10"]
        plain = run_cli(*common)
        static = run_cli(*common, "--compile")
        assert plain.exit_code == static.exit_code == 0, static.output
        assert [json.loads(l)["captions"] for l in plain.stdout.splitlines()] == \
            [json.loads(l)["captions"] for l in static.stdout.splitlines()]
    from blip2cli.caption import GenerationOptions as G

    assert G(static_cache=True).generate_kwargs()["cache_implementation"] == "static"
    assert "static_cache" not in G(static_cache=True).describe()  # resumable either way


def test_ask_compile_gives_the_same_answers(tiny_opt, example_images):
    common = ["ask", *map(str, example_images[:2]), "-q", "what is it?", "-q", "and where is this?",
              "--model", str(tiny_opt), "-f", "jsonl", "--num-beams", "2", "--max-new-tokens", "6"]
    plain = runner.invoke(app, common)
    static = runner.invoke(app, [*common, "--compile"])
    assert plain.exit_code == static.exit_code == 0, static.output
    assert plain.stdout == static.stdout
