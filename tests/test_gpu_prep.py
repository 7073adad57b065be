"""GPU-side preparation without a GPU: the JPEG decode path's selection and fallbacks,
its orientation and resize arithmetic (against Pillow), the decoder contract through
torchvision where it imports, and bench's --decode / --qformer-dtype options."""

from __future__ import annotations

import io
import json
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image, ImageOps
from typer.testing import CliRunner

from blip2cli import gpudecode
from blip2cli.cli import app
from blip2cli.errors import UsageError
from blip2cli.decode import ImageError
from blip2cli.images import prepare
from blip2cli.imagespec import ImageSpec
from blip2cli.pixels import to_pixel_values

runner = CliRunner()
torch = pytest.importorskip("torch")


def _photo(example_images, size=(320, 240)) -> Image.Image:
    return Image.open(example_images[0]).convert("RGB").resize(size, Image.BICUBIC)


def _jpeg(im: Image.Image, **save) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=92, **save)
    return buf.getvalue()


def _exif(orientation: int):
    ex = Image.Exif()
    ex[0x0112] = orientation
    return ex


@pytest.fixture
def files(tmp_path, example_images):
    im = _photo(example_images)
    made = {
        "upright": _jpeg(im),
        "rotated6": _jpeg(im, exif=_exif(6)),
        "mirrored2": _jpeg(im, exif=_exif(2)),
        "grey": _jpeg(im.convert("L")),
        "cmyk": _jpeg(im.convert("CMYK")),
        "progressive": _jpeg(im, progressive=True),
    }
    png = io.BytesIO()
    im.save(png, "PNG")
    made["png"] = png.getvalue()
    made["trailer"] = made["upright"] + b"camera trailer"
    made["truncated"] = made["upright"][: len(made["upright"]) // 2]
    paths = {}
    for name, data in made.items():
        p = tmp_path / f"{name}.{'png' if name == 'png' else 'jpg'}"
        p.write_bytes(data)
        paths[name] = p
    return paths


def _loaded(spec: ImageSpec | None = None):
    return SimpleNamespace(image_spec=spec or ImageSpec(), device=torch.device("cpu"), dtype=torch.float32)


# -- arithmetic --------------------------------------------------------------------
@pytest.mark.parametrize("orientation", range(1, 9))
def test_orient_matches_pillow_exif_transpose(orientation):
    rng = np.random.default_rng(orientation)
    arr = rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)  # not square: a swap shows
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG", exif=_exif(orientation))
    want = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(buf.getvalue()))).convert("RGB"))
    got = gpudecode.orient(torch.from_numpy(arr).permute(2, 0, 1), orientation).permute(1, 2, 0).numpy()
    assert got.shape == want.shape
    assert np.array_equal(got, want)


@pytest.mark.parametrize("resample", [2, 3])
def test_resize_follows_pillow_antialiased_filters(example_images, resample):
    big = Image.open(example_images[0]).convert("RGB")  # 640 px wide: a 3x reduction
    want = np.asarray(big.resize((224, 224), resample=resample)).astype(int)
    t = torch.from_numpy(np.array(big)).permute(2, 0, 1)[None]
    got = gpudecode.resize_uint8(t, 224, 224, resample)[0].permute(1, 2, 0).numpy().astype(int)
    diff = np.abs(got - want)
    assert diff.max() <= 3 and diff.mean() < 0.3, (diff.max(), diff.mean())


# -- selection ----------------------------------------------------------------------
def test_inspect_takes_plain_jpegs_and_leaves_the_rest(files):
    takes = {}
    for name, p in files.items():
        info, reason = gpudecode.inspect_jpeg(p.read_bytes())
        takes[name] = (info is not None, reason)
    assert takes["upright"] == (True, None)
    assert takes["grey"] == (True, None)
    info, _ = gpudecode.inspect_jpeg(files["rotated6"].read_bytes())
    assert (info.orientation, info.width, info.height) == (6, 320, 240)
    assert takes["png"] == (False, "not a plain JPEG (PNG)")
    assert takes["cmyk"] == (False, "colour mode CMYK")
    assert takes["progressive"] == (False, "progressive JPEG")
    assert not takes["trailer"][0] and "end-of-image" in takes["trailer"][1]
    assert not takes["truncated"][0]


def test_choose_decode(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert gpudecode.choose("cpu", cuda) is False
    assert gpudecode.choose("auto", cpu) is False
    with pytest.raises(UsageError, match="not on a CUDA GPU"):
        gpudecode.choose("gpu", cpu)
    with pytest.raises(UsageError, match="use one of"):
        gpudecode.choose("fast", cpu)

    monkeypatch.setattr(gpudecode, "_reason_cache", {})
    monkeypatch.setattr(gpudecode, "_probe", lambda: None)
    assert gpudecode.choose("auto", cuda) is True and gpudecode.choose("gpu", cuda) is True

    monkeypatch.setattr(gpudecode, "_reason_cache", {})
    monkeypatch.setattr(gpudecode, "_probe", lambda: "torchvision is not importable here (ImportError: x)")
    assert gpudecode.choose("auto", cuda) is False
    with pytest.raises(UsageError, match="torchvision is not importable"):
        gpudecode.choose("gpu", cuda)


def test_probe_here_names_a_reason_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert gpudecode._probe() == "CUDA is not available to torch"


# -- the stage, with Pillow standing in for nvJPEG ------------------------------------
def test_stage_routes_and_matches_the_cpu_path(files):
    stage = gpudecode.GpuImageStage(_loaded(), decoder=gpudecode.pillow_decoder)
    names = ["upright", "png", "rotated6", "cmyk", "grey", "progressive", "trailer", "mirrored2"]
    prepared = [stage.prepare(str(files[n])) for n in names]
    on_gpu = [isinstance(p, gpudecode.JpegBytes) for p in prepared]
    assert on_gpu == [True, False, True, False, True, False, False, True]
    assert stage.counts == {"gpu": 4, "cpu": 4}
    assert stage.fallbacks["colour mode CMYK"] == 1 and stage.fallbacks["progressive JPEG"] == 1

    batch = stage.uint8_batch(prepared)
    assert batch.dtype == torch.uint8 and tuple(batch.shape) == (8, 3, 224, 224)
    for i, n in enumerate(names):  # Pillow, full decode (no draft), EXIF applied, bicubic
        want = prepare(str(files[n]), ImageSpec(), fast=False).astype(int)
        got = batch[i].permute(1, 2, 0).numpy().astype(int)
        diff = np.abs(got - want)
        assert diff.max() <= 3 and diff.mean() < 0.3, (n, diff.max(), diff.mean())

    values = stage.pixels(prepared)
    arrays = [a.permute(1, 2, 0).contiguous().numpy() for a in batch]
    assert torch.equal(values, to_pixel_values(arrays, ImageSpec()))  # same lookup table


def test_stage_errors_are_the_cpu_paths(files, tmp_path):
    stage = gpudecode.GpuImageStage(_loaded(), decoder=gpudecode.pillow_decoder)
    for source in (str(files["truncated"]), str(tmp_path / "missing.jpg"), str(tmp_path)):
        with pytest.raises(ImageError) as ours:
            stage.prepare(source)
        with pytest.raises(ImageError) as cpu:
            prepare(source, ImageSpec())
        assert str(ours.value) == str(cpu.value)
    assert stage.counts["gpu"] == 0


def test_stage_without_a_gpu_filter_uses_the_cpu_path(files):
    stage = gpudecode.GpuImageStage(_loaded(ImageSpec(resample=1)), decoder=gpudecode.pillow_decoder)  # Lanczos
    assert isinstance(stage.prepare(str(files["upright"])), np.ndarray)
    assert "resample filter 1" in next(iter(stage.fallbacks))


def test_a_batch_the_decoder_refuses_is_decoded_one_by_one(files):
    calls = []

    def picky(datas, device):
        calls.append(len(datas))
        if len(datas) > 1:
            raise RuntimeError("nvjpeg batch failed")
        return gpudecode.pillow_decoder(datas, device)

    stage = gpudecode.GpuImageStage(_loaded(), decoder=picky)
    prepared = [stage.prepare(str(files[n])) for n in ("upright", "rotated6")]
    batch = stage.uint8_batch(prepared)
    assert calls == [2, 1, 1] and tuple(batch.shape) == (2, 3, 224, 224)


def test_nvjpeg_decoder_contract_with_torchvision_on_the_cpu(files):
    try:
        import torchvision.io  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - PyPI's torchvision does not import beside every torch
        pytest.skip(f"torchvision does not import here ({type(exc).__name__})")
    out = gpudecode.nvjpeg_decoder([files["rotated6"].read_bytes(), files["grey"].read_bytes()], "cpu")
    assert [tuple(t.shape) for t in out] == [(3, 240, 320), (3, 240, 320)]  # stored orientation
    assert all(t.dtype == torch.uint8 for t in out)


# -- bench ----------------------------------------------------------------------------
def test_bench_decode_gpu_without_cuda_is_refused_before_loading(tmp_path):
    res = runner.invoke(app, ["bench", "--model", str(tmp_path / "nothing-here"), "--device", "cpu",
                              "--decode", "gpu", "--synthetic", "1"])
    assert res.exit_code == 2 and "--decode gpu" in res.stderr and "CUDA" in res.stderr


@pytest.mark.parametrize("args, words", [(["--decode", "nvjpeg"], "--decode"),
                                         (["--qformer-dtype", "int8"], "--qformer-dtype")])
def test_bench_option_values(tiny_opt, args, words):
    res = runner.invoke(app, ["bench", "--model", str(tiny_opt), "--synthetic", "1", *args])
    assert res.exit_code == 2 and words in res.stderr


def test_bench_qformer_dtype_and_gpu_stage(tiny_opt, monkeypatch):
    common = ["bench", "--model", str(tiny_opt), "--synthetic", "4", "--size", "320x240", "-b", "2",
              "--repeat", "1", "--json", "--max-new-tokens", "2", "--dtype", "bfloat16"]
    res = runner.invoke(app, common)
    assert res.exit_code == 0, res.output
    row = json.loads(res.stdout)["rows"][0]
    assert row["qformer_dtype"] == "bfloat16" and row["decode"] == "cpu" and row["warmup_s"] > 0

    # The GPU stage wired in (Pillow standing in for nvJPEG), the Q-Former put in float32.
    monkeypatch.setattr(gpudecode, "choose", lambda decode, device: True)
    monkeypatch.setattr(gpudecode, "nvjpeg_decoder", gpudecode.pillow_decoder)
    res = runner.invoke(app, common + ["--qformer-dtype", "float32", "--baseline"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    row = data["rows"][0]
    assert row["qformer_dtype"] == "float32" and row["decode"] == "gpu"
    assert row["note"].startswith("decoded on the GPU: ") and "on the CPU: 0" in row["note"]
    assert data["meta"]["qformer_dtype"] == "float32"
    assert data["baseline"]["plain_batched_generate_images_per_s"] > 0


# -- the GPU script's serve group (benchmarks/gpu_run.py serve), on the CPU ------------------
def _gpu_bench(name: str):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_blip2_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


METRICS_BEFORE = """blip2_batch_size_bucket{le="1"} 1
blip2_batch_size_bucket{le="2"} 1
blip2_batch_size_bucket{le="4"} 1
blip2_batch_size_bucket{le="+Inf"} 1
blip2_batch_size_sum 1
blip2_batch_size_count 1
blip2_images_total 1
"""
METRICS_AFTER = """blip2_batch_size_bucket{le="1"} 2
blip2_batch_size_bucket{le="2"} 2
blip2_batch_size_bucket{le="4"} 4
blip2_batch_size_bucket{le="+Inf"} 5
blip2_batch_size_sum 17
blip2_batch_size_count 5
"""


def test_serve_group_reads_the_servers_batch_sizes_from_metrics():
    run = _gpu_bench("gpu_run")
    before, after = run.batch_histogram(METRICS_BEFORE), run.batch_histogram(METRICS_AFTER)
    assert before == {"1": 1, "2": 1, "4": 1, "+Inf": 1, "sum": 1.0, "count": 1.0}
    # four calls since: one of 1 image, two of 3-4, one above 4 (16 images in all)
    assert run.batch_sizes(before, after) == {"model_calls": 4, "images": 16, "mean_batch": 4.0,
                                              "calls_by_batch_size": {"<=1": 1, "<=4": 2, "<=+Inf": 1}}


def test_gpu_report_has_the_serve_rows_and_section_naming_the_card(tmp_path, monkeypatch):
    report = _gpu_bench("gpu_report")
    batches = {"model_calls": 2, "images": 64, "mean_batch": 32.0, "calls_by_batch_size": {"<=32": 2}}
    steps = [{"step": "serve_64_concurrent_chat", "requests": 64, "concurrency": 64, "images_per_s": 320.0,
              "tokens_per_s": 6400.0, "server_max_batch_size": 64, "batch_wait_ms": 20, "server_batches": batches},
             {"step": "serve_64_one_by_one_chat", "requests": 64, "concurrency": 1, "images_per_s": 40.0,
              "tokens_per_s": 800.0, "server_batches": batches, "answers_equal": "63/64"},
             {"step": "serve_sigterm", "exit_code_after_sigterm": 0, "stop_s": 1.0}]
    (tmp_path / "serve.json").write_text(json.dumps({"group": "serve", "smoke": False, "steps": steps}))
    (tmp_path / "card.txt").write_text("NVIDIA H100 80GB HBM3, 81559 MiB, 580.1\n")
    import sys

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # not imported into the test process
    monkeypatch.setattr(sys, "argv", ["gpu_report.py", str(tmp_path), str(tmp_path / "out"),
                                      "--gpu-txt", str(tmp_path / "card.txt")])
    assert report.main() == 0
    md = (tmp_path / "out" / "gpu.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| serve_64_concurrent_chat"))
    assert "blip2 serve on NVIDIA H100 80GB HBM3" in row and "| 320.0 |" in row and "8.00x" in row
    assert "2 model calls, mean batch 32.0" in row
    assert "answers equal to the concurrent ones: 63/64" in md and "exit code 0" in md
    section = md.split("## blip2 serve", 1)[1]
    assert "On NVIDIA H100 80GB HBM3" in section and "8.0x from batching" in section
    assert json.loads((tmp_path / "out" / "gpu.json").read_text())["groups"]["serve"]["steps"] == steps


@pytest.mark.slow  # starts one blip2 serve process (it pays the torch import)
def test_serve_group_on_the_cpu(tiny_opt, tmp_path, monkeypatch):
    """The group as gpu.sh runs it, with the tiny checkpoint and 4 requests: the server
    starts, answers all at once and one by one with equal answers, ends with exit code 0."""
    run = _gpu_bench("gpu_run")
    monkeypatch.setattr(run, "SMOKE", True)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    rec = run.Recorder(tmp_path, "serve", 120)
    run.group_serve(rec, tmp_path, model=str(tiny_opt), requests=4)
    steps = {s["step"]: s for s in json.loads((tmp_path / "serve.json").read_text())["steps"]}
    assert not [s for s in steps.values() if "error" in s or "skipped" in s], steps
    many, one = steps["serve_4_concurrent_chat"], steps["serve_4_one_by_one_chat"]
    assert many["images_per_s"] > 0 and one["images_per_s"] > 0
    assert many["server_batches"]["images"] == 4 and one["server_batches"] == {
        "model_calls": 4, "images": 4, "mean_batch": 1.0, "calls_by_batch_size": {"<=1": 4}}
    assert one["answers_equal"] == "4/4" and one["all_answers_equal"] is True
    assert many["tokens_per_s"] == pytest.approx(20 * 4 / many["wall_s"])  # exactly 20 tokens each
    assert steps["serve_sigterm"]["exit_code_after_sigterm"] == 0


@pytest.mark.slow  # a blip2 serve process that fails to start
def test_serve_group_records_a_server_that_does_not_start(tmp_path, monkeypatch):
    from pathlib import Path

    run = _gpu_bench("gpu_run")
    monkeypatch.setattr(run, "SMOKE", True)
    rec = run.Recorder(tmp_path, "serve", 60)
    run.group_serve(rec, tmp_path, model=str(tmp_path / "no-such-checkpoint"), requests=1)
    (start,) = json.loads((tmp_path / "serve.json").read_text())["steps"]
    assert start["step"] == "serve_start" and "blip2 serve exited with 2" in start["error"]
    left = []  # no server left behind: no process names the checkpoint
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if b"no-such-checkpoint" in cmdline.read_bytes():
                left.append(cmdline.parent.name)
        except OSError:
            pass
    assert left == []
