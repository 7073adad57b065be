"""The model loads honestly, fast and quietly (issue 13, case 7 and the loader frictions; issue 14's
--from-config sizing).

- weights that do not fit the architecture (missing layers, unknown tensors, wrong sizes) are a
  load error naming them, exit 2, never random layers;
- an unreachable hub fails at once with one clear message (or falls back to the cache), without
  huggingface_hub's half minute of retry lines;
- a library warning (bitsandbytes' "MatMul8bitLt: inputs will be cast…" on every matmul) is
  printed once;
- short model names (opt-2.7b, flan-t5-xl, itm, ...) and ``blip2 models``;
- ``bench --from-config`` builds its random model directly in the requested dtype.
"""

from __future__ import annotations

import collections
import io
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from blip2cli.cli import app

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()
FAST = ["--max-new-tokens", "3", "--num-beams", "1"]


def cli(*args):
    return runner.invoke(app, [*map(str, args)])


def _copy_with_weights(src: Path, dst: Path, edit) -> Path:
    """A copy of a tiny checkpoint whose model.safetensors is rewritten by ``edit(state_dict)``."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    sd = load_file(str(dst / "model.safetensors"))
    save_file(edit(dict(sd)), str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


# -- case 7: the weights must fit the architecture ---------------------------------------
@pytest.mark.parametrize("kind", ["opt", "t5", "itm"])
def test_the_tiny_checkpoints_load_cleanly(kind, request):
    """No false alarm: tied weights (OPT's lm_head, T5's shared embeddings) and buffers pass."""
    from blip2cli.loader import ALL_ARCHITECTURES, LoadOptions, load

    folder = request.getfixturevalue(f"tiny_{kind}")
    loaded = load(LoadOptions(model=str(folder), device="cpu"), architectures=ALL_ARCHITECTURES)
    assert loaded.model is not None


def test_config_with_more_layers_than_the_weights_is_refused(tiny_opt, tmp_path, example_images):
    """The audit's case: config.json says 4 decoder layers, the weights hold 2."""
    folder = tmp_path / "four-layers"
    shutil.copytree(tiny_opt, folder)
    config = json.loads((folder / "config.json").read_text())
    layers = config["text_config"]["num_hidden_layers"]
    config["text_config"]["num_hidden_layers"] = layers + 2
    (folder / "config.json").write_text(json.dumps(config))
    res = cli("caption", example_images[0], "--model", folder, *FAST)
    assert res.exit_code == 2, res.output
    assert res.stdout == ""
    assert "missing from the checkpoint" in res.stderr
    assert f"language_model.model.decoder.layers.{layers}." in res.stderr
    assert "in all)" in res.stderr  # first few names + the count
    assert "hint:" in res.stderr


def test_removed_layer_is_refused_naming_it(tiny_opt, tmp_path, example_images):
    folder = _copy_with_weights(tiny_opt, tmp_path / "no-layer-1",
                                lambda sd: {k: v for k, v in sd.items() if "decoder.layers.1." not in k})
    removed = 16  # a tiny OPT decoder layer: q, k, v, out proj, fc1, fc2 (weight + bias), 2 layer norms
    res = cli("caption", example_images[0], "--model", folder, *FAST)
    assert res.exit_code == 2, res.output
    assert f"{removed} weights missing" in res.stderr
    assert "language_model.model.decoder.layers.1.fc1.bias" in res.stderr


def test_unknown_extra_tensor_is_refused(tiny_opt, tmp_path, example_images):
    import torch

    extra = "language_model.model.decoder.layers.9.fc1.weight"
    folder = _copy_with_weights(tiny_opt, tmp_path / "extra", lambda sd: {**sd, extra: torch.zeros(3, 3)})
    res = cli("caption", example_images[0], "--model", folder, *FAST)
    assert res.exit_code == 2, res.output
    assert "1 unexpected weight" in res.stderr and extra in res.stderr


def _grow(sd, key="language_model.model.decoder.layers.0.fc1.weight"):
    import torch

    sd[key] = torch.zeros(sd[key].shape[0] + 1, sd[key].shape[1])
    return sd


@pytest.mark.parametrize("quantize", ["none", "8bit"])
def test_mis_sized_tensor_is_refused(tiny_opt, tmp_path, example_images, quantize):
    """transformers raises a RuntimeError pointing at a report our users never see (none), and
    its 8-bit loader does not notice at all: both become our error naming the tensor."""
    if quantize != "none":
        pytest.importorskip("bitsandbytes")
    folder = _copy_with_weights(tiny_opt, tmp_path / "grown", _grow)
    res = cli("caption", example_images[0], "--model", folder, "--quantize", quantize, *FAST)
    assert res.exit_code == 2, res.output
    assert "1 weight of the wrong size" in res.stderr
    assert "language_model.model.decoder.layers.0.fc1.weight" in res.stderr
    assert "(checkpoint (129, 64), model (128, 64))" in res.stderr or "checkpoint (" in res.stderr


def test_retrieval_checkpoint_with_a_missing_tensor_is_refused(tiny_itm, tmp_path, example_images):
    folder = _copy_with_weights(tiny_itm, tmp_path / "itm-missing",
                                lambda sd: {k: v for k, v in sd.items() if not k.startswith("vision_projection")})
    res = cli("embed", example_images[0], "--model", folder)
    assert res.exit_code == 2, res.output
    assert "vision_projection" in res.stderr and "missing" in res.stderr


def test_loading_report_rules():
    from blip2cli.errors import ModelError
    from blip2cli.loader import check_loading_info

    clean = {"missing_keys": set(), "unexpected_keys": set(), "mismatched_keys": set(), "error_msgs": []}
    check_loading_info("m", clean)
    # old checkpoints' recomputed buffers are tolerated
    check_loading_info("m", {**clean, "unexpected_keys": {"qformer.embeddings.position_ids"}})
    many = {f"language_model.layers.{i}.weight" for i in range(12)}
    with pytest.raises(ModelError) as err:
        check_loading_info("m", {**clean, "missing_keys": many})
    assert "12 weights missing" in err.value.message and "(12 in all)" in err.value.message
    assert err.value.message.count("language_model.layers.") == 3  # the first few, not all twelve


def test_partial_weights_can_be_allowed_explicitly(tiny_opt, tmp_path, example_images, monkeypatch):
    folder = _copy_with_weights(tiny_opt, tmp_path / "allowed",
                                lambda sd: {k: v for k, v in sd.items() if "decoder.layers.1." not in k})
    monkeypatch.setenv("BLIP2_ALLOW_PARTIAL_WEIGHTS", "1")
    res = cli("caption", example_images[0], "--model", folder, *FAST)
    assert res.exit_code == 0, res.output
    assert "warning:" in res.stderr and "16 weights missing" in res.stderr


# -- the hub: fail fast and clearly -------------------------------------------------------
def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the block ends: connections are refused


def _hub_env(tmp_path: Path) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_")) and k != "BLIP2_DEBUG"}
    env.update(HF_HOME=str(tmp_path / "hf-home"), HF_ENDPOINT=f"http://127.0.0.1:{_closed_port()}",
               PYTHONPATH=str(ROOT))
    return env


@pytest.mark.slow
def test_unreachable_hub_fails_at_once_with_one_clear_message(tmp_path, example_images):
    """Before: five retries with a back-off, about 24 s of warning lines, then the message."""
    env = _hub_env(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "blip2cli", "caption", str(example_images[0])],
                          capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) <= 3, proc.stderr  # the error and its hint; no retry lines
    assert "Retry" not in proc.stderr and "thrown while requesting" not in proc.stderr
    assert "cannot reach the Hugging Face hub" in lines[0]
    assert "'Salesforce/blip2-opt-2.7b' is not in the local cache" in lines[0]
    assert "blip2 models download" in proc.stderr and "--offline" in proc.stderr and "local folder" in proc.stderr


@pytest.mark.slow
def test_unreachable_hub_uses_the_cached_copy(tiny_opt, tmp_path, example_images):
    env = _hub_env(tmp_path)
    repo = Path(env["HF_HOME"]) / "hub" / "models--blip2-test--tiny-opt"
    snap = repo / "snapshots" / ("ab" * 20)
    shutil.copytree(tiny_opt, snap)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(snap.name)
    proc = subprocess.run([sys.executable, "-m", "blip2cli", "caption", str(example_images[0]), "-m",
                           "blip2-test/tiny-opt", "-f", "jsonl", *FAST],
                          capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["model"] == "blip2-test/tiny-opt"
    assert "cannot be reached: using the cached copy of blip2-test/tiny-opt" in proc.stderr
    assert "Retry" not in proc.stderr


def test_models_download_fails_clearly_without_the_hub(monkeypatch):
    import blip2cli.loader as loader

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(loader, "hub_reachable", lambda timeout=5.0: False)
    res = cli("models", "download", "flan-t5-xl")
    assert res.exit_code == 2
    assert "cannot download 'Salesforce/blip2-flan-t5-xl'" in res.stderr and "cannot be reached" in res.stderr
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    res = cli("models", "download", "itm")
    assert res.exit_code == 2 and "offline mode is on" in res.stderr


# -- library warnings once ------------------------------------------------------------------
@pytest.mark.slow
def test_8bit_caption_prints_each_library_warning_once(tiny_opt, example_images, tmp_path):
    """bitsandbytes logs "MatMul8bitLt: inputs will be cast…" on every matmul (60 lines for
    four images on the tiny model, 33,121 in one real bench)."""
    pytest.importorskip("bitsandbytes")
    env = {k: v for k, v in os.environ.items() if k != "BLIP2_DEBUG"}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run(
        [sys.executable, "-m", "blip2cli", "caption", *map(str, example_images), "-m", str(tiny_opt),
         "--quantize", "8bit", "-f", "jsonl", "--max-new-tokens", "5", "--batch-size", "2"],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.splitlines()) == len(example_images)
    counts = collections.Counter(l for l in proc.stderr.splitlines() if l.strip())
    assert sum(1 for l in counts if "MatMul8bitLt" in l) <= 1, proc.stderr[:2000]
    repeated = {l: n for l, n in counts.items() if n > 1}
    assert not repeated, repeated


def test_logging_flood_is_deduplicated(monkeypatch):
    import logging

    from blip2cli.loader import quiet_libraries

    monkeypatch.delenv("BLIP2_DEBUG", raising=False)
    quiet_libraries()
    # Once per process is the rule: forget what earlier tests in this process already showed.
    for name in ("bitsandbytes", "accelerate"):
        for handler in logging.getLogger(name).handlers:
            for f in handler.filters:
                getattr(f, "seen", set()).clear()
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    log = logging.getLogger("bitsandbytes.autograd._functions")
    for _ in range(50):
        log.warning("MatMul8bitLt: inputs will be cast from %s to float16 during quantization", "torch.float32")
    logging.getLogger("bitsandbytes.backends.cpu.ops").warning("Failed to load CPU gemm_4bit_forward: %s", "x")
    logging.getLogger("bitsandbytes.backends.cpu.ops").warning("Failed to load CPU gemm_4bit_forward: %s", "x")
    lines = stream.getvalue().splitlines()
    assert sum("MatMul8bitLt" in l for l in lines) == 1
    assert sum("gemm_4bit_forward" in l for l in lines) == 1


# -- status while loading -------------------------------------------------------------------
class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_loading_status_line_on_a_terminal_only(tiny_opt, monkeypatch):
    from blip2cli.loader import LoadOptions, load

    for stream, shown in ((_Tty(), True), (io.StringIO(), False)):
        monkeypatch.setattr(sys, "stderr", stream)
        load(LoadOptions(model=str(tiny_opt), device="cpu", dtype="bfloat16"))
        text = stream.getvalue()
        assert (f"blip2: loading {tiny_opt} (bfloat16, cpu)…" in text) is shown, text


# -- short names ----------------------------------------------------------------------------
def test_short_names_map_to_hub_ids(tmp_path, monkeypatch):
    from blip2cli.models import BY_NAME, resolve

    monkeypatch.chdir(tmp_path)
    assert resolve("opt-2.7b") == "Salesforce/blip2-opt-2.7b"
    assert resolve("flan-t5-xxl") == "Salesforce/blip2-flan-t5-xxl"
    assert resolve("itm") == "Salesforce/blip2-itm-vit-g"
    assert resolve("opt-6.7b-coco") == "Salesforce/blip2-opt-6.7b-coco"
    assert resolve("someone/else") == "someone/else"
    assert set(BY_NAME) >= {"opt-2.7b", "opt-6.7b", "flan-t5-xl", "flan-t5-xxl", "itm", "opt-2.7b-coco",
                            "opt-6.7b-coco", "flan-t5-xl-coco"}
    (tmp_path / "itm").mkdir()
    assert resolve("itm") == "itm"  # a local folder of that name wins


def test_short_name_reaches_the_hub_lookup(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    res = cli("caption", tmp_path, "--model", "flan-t5-xl")
    assert res.exit_code == 2
    assert "'Salesforce/blip2-flan-t5-xl' is not in the Hugging Face cache" in res.stderr


def test_local_folder_named_like_a_short_name_wins(tiny_opt, tmp_path, monkeypatch, example_images):
    shutil.copytree(tiny_opt, tmp_path / "opt-2.7b")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    res = cli("caption", example_images[0], "--model", "opt-2.7b", "-f", "jsonl", *FAST)
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["model"] == "opt-2.7b"


def test_short_name_is_recorded_as_its_hub_id(tiny_opt, tmp_path, monkeypatch):
    """Records, --resume and merge see one name for one model."""
    import huggingface_hub.constants as hub_constants

    from blip2cli.loader import plan, LoadOptions

    cache = tmp_path / "hub"
    repo = cache / "models--Salesforce--blip2-opt-2.7b"
    snap = repo / "snapshots" / ("cd" * 20)
    shutil.copytree(tiny_opt, snap)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(snap.name)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    p = plan(LoadOptions(model="opt-2.7b", device="cpu"))
    assert p.settings()["model"] == "Salesforce/blip2-opt-2.7b"
    res = cli("models", "--json")
    assert res.exit_code == 0, res.output
    rows = {r["name"]: r for r in map(json.loads, res.stdout.splitlines())}
    assert rows["opt-2.7b"]["cached"] == "yes" and rows["opt-2.7b"]["hub_id"] == "Salesforce/blip2-opt-2.7b"
    assert rows["flan-t5-xl"]["cached"] == "no"
    assert rows["opt-2.7b"]["fp16_gb"] > 7 and rows["itm"]["task"].startswith("embed")


def test_models_table_lists_every_short_name(monkeypatch):
    from blip2cli.models import CATALOGUE

    res = cli("models")
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert lines[0].split()[:3] == ["NAME", "HUB", "ID"]
    for e in CATALOGUE:
        assert any(l.split()[:2] == [e.name, e.repo_id] for l in lines[1:]), e.name


# -- bench --from-config: built in the requested dtype ----------------------------------------
def _tiny_blip2_config():
    from transformers import Blip2Config, Blip2QFormerConfig, Blip2VisionConfig, OPTConfig

    return Blip2Config(
        vision_config=Blip2VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, image_size=32, patch_size=8).to_dict(),
        qformer_config=Blip2QFormerConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=2, encoder_hidden_size=32,
                                          vocab_size=50).to_dict(),
        text_config=OPTConfig(vocab_size=99, hidden_size=32, word_embed_proj_dim=32, ffn_dim=64,
                              num_hidden_layers=2, num_attention_heads=2).to_dict(),
        num_query_tokens=4,
    )


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_random_model_is_built_directly_in_the_requested_dtype(monkeypatch, dtype):
    """No float32 copy: every parameter is created in the dtype (bytes created == bytes kept),
    except what transformers keeps in float32 under float16, as load() does (the Q-Former)."""
    import torch
    from transformers import Blip2ForConditionalGeneration

    from blip2cli.bench import build_random

    want = getattr(torch, dtype)
    created = []
    original_new = torch.nn.Parameter.__new__

    def spy(cls, data=None, requires_grad=True):
        param = original_new(cls, data, requires_grad)
        created.append((param.dtype, param.numel() * param.element_size()))
        return param

    monkeypatch.setattr(torch.nn.Parameter, "__new__", spy)
    model = build_random(Blip2ForConditionalGeneration, _tiny_blip2_config(), want, torch.device("cpu"))
    monkeypatch.setattr(torch.nn.Parameter, "__new__", original_new)
    kept = {n: p for n, p in model.named_parameters()}
    kept_bytes = sum(p.numel() * p.element_size() for p in kept.values())
    fp32 = {n for n, p in kept.items() if p.dtype == torch.float32}
    if want == torch.bfloat16:
        assert not fp32
    else:  # as from_pretrained(dtype=float16): the Q-Former and the query tokens stay float32
        assert fp32 and all(n.startswith(("qformer.", "query_tokens")) for n in fp32)
    assert all(p.dtype == want for n, p in kept.items() if n not in fp32)
    created_bytes = sum(b for dt, b in created)
    # before: every parameter made in float32 first (4 bytes), then converted: 3x the bytes kept
    assert created_bytes <= kept_bytes * 1.25, (created_bytes, kept_bytes)


def test_from_config_dtypes_match_a_real_load(tiny_opt):
    """The random model of --from-config has the dtypes load() gives a real checkpoint."""
    import torch
    from transformers import Blip2ForConditionalGeneration

    from blip2cli.bench import build_random
    from blip2cli.loader import LoadOptions, load

    loaded = load(LoadOptions(model=str(tiny_opt), device="cpu", dtype="float16"))
    built = build_random(Blip2ForConditionalGeneration, loaded.model.config, torch.float16, torch.device("cpu"))
    real = {n: p.dtype for n, p in loaded.model.named_parameters()}
    assert {n: p.dtype for n, p in built.named_parameters()} == real


def test_download_progress_bars_on_a_terminal_only(monkeypatch):
    from huggingface_hub.utils import are_progress_bars_disabled

    from blip2cli.loader import quiet_libraries

    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    for stream, disabled in ((_Tty(), False), (io.StringIO(), True)):
        monkeypatch.setattr(sys, "stderr", stream)
        quiet_libraries()
        assert are_progress_bars_disabled() is disabled


# -- issue 19 #10: a checkpoint replaced at the same path is noticed ------------------------
def _nudged(name):
    """An edit of the state dict: one tensor changed a little, as a fine-tune changes it."""
    def edit(sd):
        sd[name] = sd[name] * 1.01 + 0.001
        return sd
    return edit


def test_checkpoint_identity_is_content_not_path_or_time(tiny_opt, tmp_path):
    import time

    from blip2cli.loader import LoadOptions, plan

    first = plan(LoadOptions(model=str(tiny_opt), device="cpu")).settings()["checkpoint"]
    assert first and first.startswith("sha256:")
    copy = tmp_path / "copy"
    shutil.copytree(tiny_opt, copy)  # a copy (new path, new times) is the same checkpoint
    time.sleep(0.01)
    os.utime(copy / "model.safetensors")
    assert plan(LoadOptions(model=str(copy), device="cpu")).identity == first
    from safetensors import safe_open

    with safe_open(str(tiny_opt / "model.safetensors"), framework="pt") as f:
        names = sorted(f.keys())
    for name in (names[0], names[len(names) // 2], names[-1]):  # a tensor anywhere in the file
        changed = _copy_with_weights(tiny_opt, tmp_path / f"changed-{names.index(name)}", _nudged(name))
        assert plan(LoadOptions(model=str(changed), device="cpu")).identity != first, name


def test_hub_checkpoint_identity_is_its_commit(tmp_path):
    from blip2cli.loader import Checkpoint, checkpoint_identity

    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = tmp_path / "models--Salesforce--blip2-opt-2.7b" / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    ckpt = Checkpoint("Salesforce/blip2-opt-2.7b", snapshot, {}, "Blip2ForConditionalGeneration", "opt")
    assert checkpoint_identity(ckpt) == f"commit:{commit}"


def test_resume_after_the_checkpoint_was_replaced_is_refused(tiny_opt, tmp_path, example_images):
    """`--resume` mixed two models' captions in one file, exit 0 (issue 19 #10)."""
    folder = tmp_path / "model"
    shutil.copytree(tiny_opt, folder)
    out = tmp_path / "out.jsonl"
    res = cli("caption", *example_images[:2], "--model", folder, "-o", out, *FAST)
    assert res.exit_code == 0, res.output
    before = out.read_text()
    assert all(json.loads(line)["checkpoint"].startswith("sha256:") for line in before.splitlines())
    replaced = _copy_with_weights(tiny_opt, tmp_path / "other", _nudged("language_projection.weight"))
    shutil.copy(replaced / "model.safetensors", folder / "model.safetensors")  # same path, other weights
    res = cli("caption", *example_images, "--model", folder, "-o", out, "--resume", *FAST)
    assert res.exit_code == 2, res.output
    assert "checkpoint" in res.stderr
    assert out.read_text() == before, "nothing appended from the other model"


def test_embed_into_a_store_made_by_a_replaced_checkpoint_is_refused(tiny_itm, tmp_path, example_images):
    """`embed` into an existing store appended rows from another model (issue 19 #10)."""
    folder = tmp_path / "itm"
    shutil.copytree(tiny_itm, folder)
    store = tmp_path / "vectors.safetensors"
    res = cli("embed", *example_images[:2], "-m", folder, "-o", store, "-b", "2")
    assert res.exit_code == 0, res.output
    def contents():  # the store is a folder: every file in it, byte for byte
        return {p.name: p.read_bytes() for p in sorted(store.iterdir()) if p.is_file()}

    before = contents()
    replaced = _copy_with_weights(tiny_itm, tmp_path / "other", _nudged("vision_projection.weight"))
    shutil.copy(replaced / "model.safetensors", folder / "model.safetensors")
    res = cli("embed", *example_images, "-m", folder, "-o", store, "-b", "2")
    assert res.exit_code == 2, res.output
    assert "checkpoint" in res.stderr
    assert contents() == before
