"""Helpers shared by the test files (import them: ``from helpers import cli, jsonl``).

Fixtures shared by several files are in conftest.py (``photos``, ``loaded_opt``,
``loaded_t5``); plain functions and constants are here.
"""

from __future__ import annotations

import json

from typer.testing import CliRunner

from blip2cli.cli import app

runner = CliRunner()
FAST = ["--max-new-tokens", "5", "--num-beams", "1"]  # a short greedy run on the tiny checkpoints


def cli(*args, input=None):
    """``blip2 ARGS`` in process (paths as strings), with ``input`` on stdin."""
    return runner.invoke(app, [*map(str, args)], input=input)


def jsonl(text: str) -> list[dict]:
    """Every line a JSON record (a blank or broken line fails the test)."""
    return [json.loads(line) for line in text.splitlines()]


# -- the reference: transformers' documented per-image usage ------------------------
_REF_CACHE: dict = {}


def reference_model(path):
    """``(Blip2Processor, Blip2ForConditionalGeneration)`` of a checkpoint folder, loaded once."""
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    key = str(path)
    if key not in _REF_CACHE:
        processor = Blip2Processor.from_pretrained(path)
        model = Blip2ForConditionalGeneration.from_pretrained(path).eval()
        _REF_CACHE[key] = (processor, model)
    return _REF_CACHE[key]


def reference_tokens(path, image_path, prompt, **gen):
    """processor(images=Image.open(p).convert('RGB'), text=prompt) + generate, one image
    (``prompt=None``: the image alone); the new tokens of each sequence, cut at EOS."""
    import torch
    from PIL import Image

    from blip2cli.caption import trim_at_eos

    processor, model = reference_model(path)
    image = Image.open(image_path).convert("RGB")
    inputs = processor(images=image, text=prompt, return_tensors="pt") if prompt else processor(
        images=image, return_tensors="pt"
    )
    with torch.inference_mode():
        out = model.generate(**inputs, **gen)
    if not model.config.text_config.is_encoder_decoder:
        n = inputs["input_ids"].shape[1] if prompt else model.config.num_query_tokens + 1
        out = out[:, n:]
    eos = model.generation_config.eos_token_id
    eos = set(eos) if isinstance(eos, (list, tuple)) else {eos}
    return [trim_at_eos(row, eos) for row in out.tolist()]


def reference_answer(path, image, prompt, **gen):
    """The documented usage for one prompt: processor(images, text) + generate -> the
    decoded answer (a chat turn's reference)."""
    import torch
    from PIL import Image

    from blip2cli.caption import trim_at_eos

    processor, model = reference_model(path)
    inputs = processor(images=Image.open(image).convert("RGB"), text=prompt, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**inputs, **gen)[:, inputs["input_ids"].shape[1]:]
    ids = trim_at_eos(out[0].tolist(), {model.generation_config.eos_token_id})
    return processor.tokenizer.decode(ids, skip_special_tokens=True).strip()


# -- vector stores: small settings, unit vectors, files and their index entries ------
DIMS = (4, 8)  # a store row: 4 query vectors of 8 numbers (BLIP-2's is 32 x 256)


def store_meta(dims=DIMS, **kw):
    """A store's settings for the tiny vectors: pooled (``mean``) when ``dims`` is one number."""
    from blip2cli.storefiles import StoreMeta

    base = dict(model="tiny", features="itc", pool="none" if len(dims) == 2 else "mean", dims=dims, normalized=True)
    base.update(kw)
    return StoreMeta(**base)


def unit(rng, *shape):
    """Random float32 vectors of length 1 along the last axis."""
    import numpy as np

    v = rng.standard_normal(shape).astype(np.float32)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def make_files(folder, names, content=b"x") -> list:
    """Small files ``folder/name`` (each ``content + name``, so all differ)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for n in names:
        p = folder / n
        p.write_bytes(content + n.encode())
        out.append(p)
    return out


def entry_for(path):
    """The store's index entry of a file as it is now (size, mtime, sha256)."""
    import os

    from blip2cli.storefiles import Entry, sha256_file

    st = os.stat(path)
    return Entry(str(path), os.path.abspath(path), st.st_size, st.st_mtime_ns, sha256_file(str(path)))


def crash_at_the_commit_point(monkeypatch):
    """The process 'dies' (kill -9) just before the manifest's rename, the store's commit point:
    the new segment files are written, the manifest is not replaced."""
    from blip2cli import store as st

    def replace(src, dst):
        raise SystemExit("simulated kill at the commit point")

    monkeypatch.setattr(st.os, "replace", replace)


def snapshot(folder) -> dict[str, bytes]:
    """Every file under ``folder``, byte for byte (what a refused run must leave as it was)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
