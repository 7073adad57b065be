"""``--quantize int8`` (issue 22): torchao's int8 weight-only Linear layers in the language model,
through transformers' ``TorchAoConfig``, for every model command, the library and ``bench``; and
nothing remote is loaded by a quantized run (issue 19's bitsandbytes "publisher trust" friction).

On the tiny random checkpoints the logits sit close together, so int8 keeps each image's first
tokens and then may take another near-tied token: what is tested is what holds there (every
image's first token equal, the first-step logits within a few percent); the 8 real-width images
are measured in benchmarks/cpu_account.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from blip2cli.cli import app

pytest.importorskip("torchao")

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()
FAST = ["--max-new-tokens", "3", "--num-beams", "1"]


def cli(*args):
    return runner.invoke(app, [*map(str, args)])


def _is_int8(module) -> bool:
    return type(getattr(module, "weight", None)).__name__ == "Int8Tensor"


@pytest.mark.parametrize("kind", ["opt", "t5"])
def test_int8_quantizes_the_language_model_linears_only(kind, request):
    import torch

    from blip2cli.loader import LoadOptions, load

    folder = request.getfixturevalue(f"tiny_{kind}")
    loaded = load(LoadOptions(model=str(folder), device="cpu", quantize="int8"))
    model = loaded.model
    head = model.language_model.get_output_embeddings()
    lm = [m for m in model.language_model.modules() if isinstance(m, torch.nn.Linear) and m is not head]
    assert lm and all(_is_int8(m) for m in lm)
    assert not _is_int8(head)
    for part in (model.vision_model, model.qformer, model.language_projection):
        assert not any(_is_int8(m) for m in part.modules()), "kept in full precision"
    assert loaded.quantize == "int8" and loaded.describe()["quantize"] == "int8"


@pytest.mark.parametrize("kind", ["opt", "t5"])
def test_int8_captions_agree_with_float32(kind, request, example_images):
    """Every image's first token is float32's, and the first step's logits differ by a few percent."""
    import torch
    from PIL import Image

    import blip2cli
    from blip2cli.loader import LoadOptions, load

    folder = request.getfixturevalue(f"tiny_{kind}")
    full, int8 = blip2cli.load(folder, device="cpu"), blip2cli.load(folder, device="cpu", quantize="int8")
    first = full.caption(example_images, max_new_tokens=1, min_new_tokens=1)
    assert int8.caption(example_images, max_new_tokens=1, min_new_tokens=1) == first
    ref = load(LoadOptions(model=str(folder), device="cpu"))
    q = load(LoadOptions(model=str(folder), device="cpu", quantize="int8"))
    inputs = ref.processor(images=[Image.open(p).convert("RGB") for p in example_images], return_tensors="pt")
    kw = {"max_new_tokens": 1, "num_beams": 1, "do_sample": False, "output_logits": True,
          "return_dict_in_generate": True}
    with torch.inference_mode():
        a = ref.model.generate(**inputs, **kw).logits[0]
        b = q.model.generate(**inputs, **kw).logits[0]
    assert not torch.equal(a, b), "the int8 model must really differ (quantized)"
    assert ((a - b).norm() / a.norm()).item() < 0.15
    assert torch.equal(a.argmax(-1), b.argmax(-1))


def test_int8_caption_records_and_resume_refuses_a_mix(tiny_opt, example_images, tmp_path):
    out = tmp_path / "out.jsonl"
    res = cli("caption", *example_images[:2], "-m", tiny_opt, "--quantize", "int8", "-o", out, *FAST)
    assert res.exit_code == 0, res.output
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 2 and all(r["quantize"] == "int8" and r["caption"] for r in records)
    # the same settings resume (nothing to do), float32 into an int8 file is refused
    again = cli("caption", *example_images[:3], "-m", tiny_opt, "--quantize", "int8", "-o", out, "--resume", *FAST)
    assert again.exit_code == 0, again.output
    assert len(out.read_text().splitlines()) == 3
    mixed = cli("caption", *example_images, "-m", tiny_opt, "-o", out, "--resume", *FAST)
    assert mixed.exit_code == 2, mixed.output
    assert "quantize" in mixed.stderr
    assert len(out.read_text().splitlines()) == 3, "the refused run wrote nothing"


def test_int8_ask_and_library(tiny_opt, example_images):
    import blip2cli

    res = cli("ask", example_images[0], "what is it?", "-m", tiny_opt, "--quantize", "int8", "-f", "jsonl", *FAST)
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout.splitlines()[0])["quantize"] == "int8"
    model = blip2cli.load(tiny_opt, device="cpu", quantize="int8")
    assert model.settings()["quantize"] == "int8"
    assert isinstance(model.caption(example_images[0], max_new_tokens=3), str)


def test_bench_quantize_int8(tiny_opt):
    res = runner.invoke(app, ["bench", "--model", str(tiny_opt), "--quantize", "int8", "--synthetic", "2",
                              "--size", "320x240", "-b", "2", "--repeat", "1", "--json", "--max-new-tokens", "3"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)["rows"]
    assert rows and all(r["quantize"] == "int8" and r["images_per_s"] > 0 for r in rows)


def test_bench_from_config_refuses_bitsandbytes_but_names_int8(tiny_opt):
    res = runner.invoke(app, ["bench", "--from-config", "opt-2.7b", "--quantize", "8bit", "--synthetic", "1"])
    assert res.exit_code == 2 and "--quantize int8" in res.stderr


def test_torchao_missing_names_the_extra(tiny_opt, example_images, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else real(name, *a))
    res = cli("caption", example_images[0], "-m", tiny_opt, "--quantize", "int8", *FAST)
    assert res.exit_code == 2
    assert "torchao" in res.stderr and "pip install 'blip2-cli[int8]'" in res.stderr


def test_int8_is_a_declared_choice_and_extra():
    from blip2cli.choices import Quantize, names

    assert "int8" in names(Quantize)
    text = (ROOT / "pyproject.toml").read_text()
    assert 'int8 = ["torchao' in text
    test_extra = next(line for line in text.splitlines() if line.startswith("test = "))
    assert "torchao" in test_extra


# -- nothing remote is loaded, and the host's logging is left as it was ------------------
@pytest.mark.parametrize("quantize", ["none", "int8", "8bit"])
def test_from_pretrained_never_runs_remote_code(tiny_opt, monkeypatch, quantize):
    """No trust_remote_code, and transformers' hub kernels (on by default when the `kernels`
    package is installed) are turned off."""
    if quantize == "8bit":
        pytest.importorskip("bitsandbytes")
    import transformers

    from blip2cli.loader import LoadOptions, load

    seen = {}
    real = transformers.Blip2ForConditionalGeneration.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        seen.update(kwargs)
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(transformers.Blip2ForConditionalGeneration, "from_pretrained", classmethod(spy))
    load(LoadOptions(model=str(tiny_opt), device="cpu", quantize=quantize))
    assert seen["use_kernels"] is False
    assert not seen.get("trust_remote_code")
    sources = "\n".join(p.read_text() for p in (ROOT / "blip2cli").rglob("*.py"))
    assert "trust_remote_code=True" not in sources and "trust_remote_code=" not in sources


def test_quantized_runs_fetch_no_hub_kernel_and_print_no_trust_warning(tiny_opt, example_images):
    """bitsandbytes 0.50 asks the `kernels` package for a kernel from the hub on import (CPUs with
    AVX-512-BF16) and logs "could not verify publisher trust status. Set trust_remote_code=True"
    when it cannot: blip2 hides `kernels` during that import, so neither happens. A fresh process:
    bitsandbytes is imported once per process."""
    pytest.importorskip("bitsandbytes")
    script = f"""
import logging, sys
logging.basicConfig(level=logging.WARNING)
calls = []
try:
    import kernels
    kernels.get_kernel = lambda *a, **k: calls.append(a)
except ImportError:
    pass
from blip2cli.loader import LoadOptions, load
torchao_filters = list(logging.getLogger("torchao").filters)
load(LoadOptions(model={str(tiny_opt)!r}, device="cpu", quantize="8bit"))
load(LoadOptions(model={str(tiny_opt)!r}, device="cpu", quantize="int8"))
assert not calls, calls
assert "bitsandbytes" in sys.modules
assert sys.modules.get("kernels", "absent") is not None, "kernels is importable again afterwards"
assert logging.getLogger("torchao").filters == torchao_filters, "the host's logging is restored"
assert logging.getLogger("bitsandbytes.backends.cpu.ops").filters == []
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "ok"
    for noise in ("publisher trust", "trust_remote_code", "kernels-community", "Failed to load",
                  "is an Enum subclass"):
        assert noise not in proc.stderr, proc.stderr[-3000:]
