"""blip2cli.testing: tiny random BLIP-2 checkpoints, checked through the plain transformers API.

The checkpoints come from the session fixtures in conftest.py (``tiny_opt``,
``tiny_t5``, ``tiny_itm``), which call ``build_tiny_checkpoint`` once each.
"""

from __future__ import annotations

import json
import subprocess
import sys
from itertools import combinations
from pathlib import Path

import pytest

from blip2cli.testing import KINDS, TinyCheckpointError, build_tiny_checkpoint, verify_tiny_checkpoint

REPO = Path(__file__).parents[1]
PROMPT = "Question: what is in the picture? Answer:"
GENERATIVE = ("opt", "t5")

_CACHE: dict = {}


def checkpoint(request, kind: str) -> Path:
    return request.getfixturevalue(f"tiny_{kind}")


def load(path: Path):
    """processor and model through the documented transformers API (cached per folder)."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval, Blip2Processor

    key = str(path)
    if key not in _CACHE:
        config = Blip2Config.from_pretrained(path)
        cls = (
            Blip2ForImageTextRetrieval
            if config.architectures == ["Blip2ForImageTextRetrieval"]
            else Blip2ForConditionalGeneration
        )
        model = cls.from_pretrained(path, use_safetensors=True).eval()
        _CACHE[key] = (Blip2Processor.from_pretrained(path), model)
    return _CACHE[key]


def open_rgb(path):
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


def generate_new_tokens(path: Path, image_path, prompt=None, max_new_tokens=10) -> list[int]:
    """The documented usage, one image: processor(...) + generate; new tokens only."""
    import torch

    processor, model = load(path)
    image = open_rgb(image_path)
    if prompt is None:
        inputs = processor(images=image, return_tensors="pt")
    else:
        inputs = processor(images=image, text=prompt, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens)
    if not model.config.is_encoder_decoder:
        # decoder-only output repeats the input: [<image>]*N [bos] [prompt]
        n = inputs["input_ids"].shape[1] if prompt is not None else model.config.num_query_tokens + 1
        out = out[:, n:]
    return out[0].tolist()


# -- file layout ---------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_file_layout_matches_a_v5_hub_checkpoint(request, kind):
    path = checkpoint(request, kind)
    names = {p.name for p in path.iterdir()}
    expected = {"config.json", "model.safetensors", "processor_config.json", "tokenizer.json", "tokenizer_config.json"}
    if kind in GENERATIVE:
        expected.add("generation_config.json")
    assert expected <= names, sorted(names)
    assert "pytorch_model.bin" not in names
    assert not any(n.endswith((".bin", ".pt", ".pth")) for n in names)
    total = sum(p.stat().st_size for p in path.iterdir())
    assert total < 5 * 2**20, f"checkpoint is {total} bytes"

    proc = json.loads((path / "processor_config.json").read_text())
    assert proc["processor_class"] == "Blip2Processor"
    assert proc["num_query_tokens"] == 8
    ip = proc["image_processor"]
    assert ip["image_processor_type"] == "BlipImageProcessor"  # as the real checkpoints
    assert ip["size"] == {"height": 224, "width": 224}
    assert ip["resample"] == 3  # bicubic
    assert ip["do_convert_rgb"] is True
    assert ip["image_mean"] == pytest.approx([0.48145466, 0.4578275, 0.40821073])
    assert ip["image_std"] == pytest.approx([0.26862954, 0.26130258, 0.27577711])

    config = json.loads((path / "config.json").read_text())
    arch = "Blip2ForImageTextRetrieval" if kind == "itm" else "Blip2ForConditionalGeneration"
    assert config["architectures"] == [arch]
    assert config["vision_config"]["image_size"] == 224
    assert config["vision_config"]["patch_size"] == 32


def test_only_safetensors_in_the_folder(tiny_opt):
    from safetensors import safe_open

    with safe_open(tiny_opt / "model.safetensors", framework="pt") as f:
        keys = list(f.keys())
    assert any(k.startswith("vision_model.") for k in keys)
    assert any(k.startswith("qformer.") for k in keys)
    assert any(k.startswith("language_model.") for k in keys)
    assert "query_tokens" in keys


# -- config values and the processor --------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_processor_tokens_and_config_agree(request, kind):
    from transformers import AutoProcessor, Blip2Processor

    path = checkpoint(request, kind)
    processor, model = load(path)
    config = model.config
    tok = processor.tokenizer
    image_id = tok.convert_tokens_to_ids("<image>")
    assert image_id != tok.unk_token_id
    assert config.image_token_index == image_id == len(tok) - 1
    # missing num_query_tokens on the processor silently drops the image from prompts
    assert processor.num_query_tokens == config.num_query_tokens == 8
    if kind == "itm":
        assert config.qformer_config.use_qformer_text_input is True
        assert config.image_text_hidden_size == 16
        assert len(tok) <= config.qformer_config.vocab_size
    else:
        assert len(tok) <= config.text_config.vocab_size
    # AutoProcessor finds the same thing; without torchvision the PIL backend is used
    auto = AutoProcessor.from_pretrained(path)
    assert isinstance(auto, Blip2Processor)
    assert type(auto.image_processor).__name__ in ("BlipImageProcessor", "BlipImageProcessorPil")
    assert auto.num_query_tokens == 8


def test_opt_ids_mirror_the_real_checkpoint(tiny_opt):
    processor, model = load(tiny_opt)
    tok = processor.tokenizer
    newline = tok("\n", add_special_tokens=False)["input_ids"]
    assert newline == [tok.convert_tokens_to_ids("\u010a")]
    # blip2-opt-2.7b: bos 2 ("</s>"), pad 1, eos "\n" in both text and generation config
    assert model.config.text_config.bos_token_id == tok.bos_token_id == 2
    assert model.config.text_config.pad_token_id == tok.pad_token_id == 1
    assert model.config.text_config.eos_token_id == newline[0]
    assert model.generation_config.eos_token_id == newline[0]
    assert model.generation_config.bos_token_id == 2
    assert model.generation_config.pad_token_id == 1
    # the processor prompt layout: [<image>]*N [bos] [prompt]
    ids = processor(images=open_rgb(REPO / "examples/images/chelsea.png"), text="a photo of", return_tensors="pt")[
        "input_ids"
    ][0].tolist()
    assert ids[:9] == [model.config.image_token_index] * 8 + [2]
    assert tok.decode(ids[9:]) == "a photo of"
    # words are single tokens
    assert len(tok(" cat on a table", add_special_tokens=False)["input_ids"]) == 4


def test_t5_ids_mirror_the_real_checkpoint(tiny_t5):
    processor, model = load(tiny_t5)
    tok = processor.tokenizer
    text = model.config.text_config
    assert text.bos_token_id == 1  # missing from v5 T5 configs; needed without a prompt
    assert text.pad_token_id == tok.pad_token_id == 0
    assert text.eos_token_id == tok.eos_token_id == 1
    assert text.decoder_start_token_id == 0
    assert model.generation_config.decoder_start_token_id == 0
    assert model.generation_config.eos_token_id == 1
    ids = processor(images=open_rgb(REPO / "examples/images/chelsea.png"), text="a photo of", return_tensors="pt")[
        "input_ids"
    ][0].tolist()
    assert ids[:8] == [model.config.image_token_index] * 8
    assert ids[-1] == 1  # T5 appends </s>
    assert tok.decode(ids[8:], skip_special_tokens=True) == "a photo of"


@pytest.mark.parametrize("kind", GENERATIVE)
def test_every_id_decodes_to_readable_text(request, kind):
    """Every id the model can emit is a token, and none decodes to U+FFFD (bytes >= 128)."""
    processor, model = load(checkpoint(request, kind))
    tok = processor.tokenizer
    ids = range(model.config.text_config.vocab_size)
    assert None not in tok.convert_ids_to_tokens(list(ids))
    assert all("\ufffd" not in tok.decode([i]) for i in ids)
    # whole words decode with their space
    assert tok.decode(tok(" a cat on a table", add_special_tokens=False)["input_ids"]).strip() == "a cat on a table"


# -- determinism -------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_same_seed_same_weights_other_seed_other_weights(tmp_path, kind):
    from safetensors.torch import load_file

    a = build_tiny_checkpoint(tmp_path / "a", kind, seed=3, verify=False)
    b = build_tiny_checkpoint(tmp_path / "b", kind, seed=3, verify=False)
    c = build_tiny_checkpoint(tmp_path / "c", kind, seed=4, verify=False)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    for name in ("config.json", "tokenizer.json", "processor_config.json"):
        assert (a / name).read_text() == (b / name).read_text()
    ta, tc = load_file(a / "model.safetensors"), load_file(c / "model.safetensors")
    assert ta.keys() == tc.keys()
    assert not all((ta[k] == tc[k]).all() for k in ta if ta[k].numel() > 1)


def test_fixture_equals_a_fresh_build(tmp_path, tiny_opt):
    fresh = build_tiny_checkpoint(tmp_path / "again", "opt", seed=0, verify=False)
    assert (fresh / "model.safetensors").read_bytes() == (tiny_opt / "model.safetensors").read_bytes()


def test_weights_are_not_the_default_tiny_init(tiny_opt):
    """The default 0.02 init leaves a tiny model blind to its input; ours is larger."""
    _, model = load(tiny_opt)
    proj = model.language_projection.weight
    assert proj.std().item() > 0.2
    assert model.query_tokens.std().item() > 0.5  # not zeros: queries must differ


# -- the documented usage: captions --------------------------------------------------


@pytest.mark.parametrize("kind", GENERATIVE)
@pytest.mark.parametrize("prompt", [None, PROMPT], ids=["no-prompt", "prompt"])
def test_different_images_give_different_tokens_and_text(request, example_images, kind, prompt):
    path = checkpoint(request, kind)
    processor, _ = load(path)
    tokens = [generate_new_tokens(path, p, prompt) for p in example_images]
    assert all(len(t) > 0 for t in tokens)
    texts = [processor.decode(t, skip_special_tokens=True) for t in tokens]
    for (i, ti), (j, tj) in combinations(enumerate(tokens), 2):
        assert ti != tj, f"{example_images[i].name} and {example_images[j].name} gave the same tokens {ti}"
        assert texts[i] != texts[j], f"different tokens {ti} / {tj} decode to the same text {texts[i]!r}"


@pytest.mark.parametrize("kind", GENERATIVE)
def test_generation_is_deterministic(request, example_images, kind):
    path = checkpoint(request, kind)
    assert generate_new_tokens(path, example_images[0], PROMPT) == generate_new_tokens(
        path, example_images[0], PROMPT
    )


@pytest.mark.parametrize("kind", GENERATIVE)
def test_prompt_changes_the_output(request, example_images, kind):
    path = checkpoint(request, kind)
    assert generate_new_tokens(path, example_images[0], None) != generate_new_tokens(
        path, example_images[0], PROMPT
    )


def test_opt_output_repeats_the_prompt_before_the_new_tokens(tiny_opt, example_images):
    import torch

    processor, model = load(tiny_opt)
    inputs = processor(images=open_rgb(example_images[1]), text=PROMPT, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=5, min_new_tokens=5)
    n = inputs["input_ids"].shape[1]
    assert out.shape[1] == n + 5
    assert out[0, :n].tolist() == inputs["input_ids"][0].tolist()


# -- retrieval ------------------------------------------------------------------------


def test_itm_embeddings_and_scores_follow_the_image(tiny_itm, example_images):
    import torch

    processor, model = load(tiny_itm)
    images = [open_rgb(p) for p in example_images]
    texts = ["a photo of a cat", "a cup of coffee", "an astronaut", "a rocket launching"]
    with torch.inference_mode():
        # ITC: one text against every image
        inputs = processor(images=images, text=[texts[0]] * len(images), return_tensors="pt", padding=True)
        itc = model(**inputs, use_image_text_matching_head=False)
        itm = model(**inputs, use_image_text_matching_head=True)
        # and several texts against one image
        per_text = processor(images=[images[0]] * 4, text=texts, return_tensors="pt", padding=True)
        itc_text = model(**per_text, use_image_text_matching_head=False)

    assert itc.image_embeds.shape == (4, 8, 16)  # [B, num_query_tokens, image_text_hidden_size]
    assert torch.allclose(itc.image_embeds.norm(dim=-1), torch.ones(4, 8), atol=1e-5)
    assert itm.logits_per_image.shape == (4, 2)
    for i, j in combinations(range(4), 2):
        assert not torch.allclose(itc.image_embeds[i], itc.image_embeds[j], atol=1e-3)
        assert not torch.allclose(itm.logits_per_image[i], itm.logits_per_image[j], atol=1e-3)
    assert itc_text.text_embeds.shape == (4, 16)
    for i, j in combinations(range(4), 2):
        assert not torch.allclose(itc_text.text_embeds[i], itc_text.text_embeds[j], atol=1e-3)


# -- the self-check -----------------------------------------------------------------------


def test_verify_catches_a_model_blind_to_the_image(tmp_path):
    """Zero the projection into the language model: every image looks the same."""
    import torch
    from transformers import Blip2ForConditionalGeneration

    path = build_tiny_checkpoint(tmp_path / "blind", "t5", verify=False)
    model = Blip2ForConditionalGeneration.from_pretrained(path, use_safetensors=True)
    with torch.no_grad():
        model.language_projection.weight.zero_()
        model.language_projection.bias.zero_()
    model.save_pretrained(path)
    with pytest.raises(TinyCheckpointError, match="same tokens"):
        verify_tiny_checkpoint(path)


def test_verify_catches_a_processor_without_num_query_tokens(tmp_path):
    path = build_tiny_checkpoint(tmp_path / "noq", "itm", verify=False)
    cfg_file = path / "processor_config.json"
    cfg = json.loads(cfg_file.read_text())
    del cfg["num_query_tokens"]
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(TinyCheckpointError, match="num_query_tokens"):
        verify_tiny_checkpoint(path)


def test_num_query_tokens_option(tmp_path):
    path = build_tiny_checkpoint(tmp_path / "q4", "opt", num_query_tokens=4, seed=1)
    processor, model = load(path)
    assert model.config.num_query_tokens == processor.num_query_tokens == 4
    assert model.query_tokens.shape == (1, 4, 32)
    ids = processor(images=open_rgb(REPO / "examples/images/coffee.png"), text="a", return_tensors="pt")["input_ids"]
    assert ids[0, :5].tolist() == [model.config.image_token_index] * 4 + [2]


@pytest.mark.parametrize("bad", [{"kind": "llama"}, {"num_query_tokens": 0}])
def test_bad_arguments(tmp_path, bad):
    with pytest.raises(ValueError):
        build_tiny_checkpoint(tmp_path / "x", **bad)


# -- the module stays light, and its command works -----------------------------------------


def test_importing_the_module_does_not_import_torch():
    code = "import sys, blip2cli.testing; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


@pytest.mark.slow
def test_python_m_blip2cli_testing(tmp_path):
    out = tmp_path / "cli-t5"
    result = subprocess.run(
        [sys.executable, "-m", "blip2cli.testing", str(out), "--kind", "t5", "--seed", "2"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == str(out)
    assert (out / "model.safetensors").is_file()
    assert json.loads((out / "config.json").read_text())["text_config"]["model_type"] == "t5"
    # the same call in-process gives the same bytes
    again = build_tiny_checkpoint(tmp_path / "in-process", "t5", seed=2, verify=False)
    assert (again / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
