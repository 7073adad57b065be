"""blip2cli.images: safe decoding and the fast preprocessing path.

Parity is checked against transformers' own BlipImageProcessorPil (the class
BlipImageProcessor falls back to without torchvision) on the real photographs in
examples/images.
"""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from enum import Enum
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from blip2cli.decode import ImageError, open_image
from blip2cli.images import prepare
from blip2cli.imagespec import ImageSpec
from blip2cli.pixels import apply_lut, lut, reference_pixel_values, to_pixel_values

ROOT = Path(__file__).parents[1]
PHOTOS_DIR = ROOT / "examples" / "images"
PHOTOS = ["chelsea.png", "coffee.png", "astronaut.png", "rocket.jpg"]

# Same decoded pixels -> the same float32 arithmetic as the reference. Observed: 0.0
# (bit-identical) on all four photos; the tolerance leaves room for a future
# transformers changing its float order.
PARITY_MAX_ABS = 1e-6
# 4032x3024 JPEG decoded at 1/8 DCT scale (draft) then bicubic, against a full decode
# then bicubic.  Normalised units (one uint8 step is ~0.015).  Observed on the noisy
# upscaled photo: mean 0.0056, max 0.105 (7 uint8 levels on the worst pixel).
DRAFT_MEAN_ABS = 0.02
DRAFT_MAX_ABS = 0.3


# --------------------------------------------------------------------------- #
# fixtures
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="module")
def blip_processor():
    from transformers import BlipImageProcessorPil

    return BlipImageProcessorPil(size={"height": 224, "width": 224})


@pytest.fixture(scope="module")
def saved_v5_dir(tmp_path_factory, blip_processor):
    """A processor saved the v5 way: one nested processor_config.json."""
    from transformers import Blip2Processor, GPT2Tokenizer

    vocab = {"<|endoftext|>": 0, "a": 1, "b": 2, "c": 3}
    tokenizer = GPT2Tokenizer(vocab=vocab, merges=[])
    processor = Blip2Processor(image_processor=blip_processor, tokenizer=tokenizer, num_query_tokens=32)
    d = tmp_path_factory.mktemp("v5proc")
    processor.save_pretrained(d)
    assert (d / "processor_config.json").is_file()
    return d


@pytest.fixture(scope="module")
def spec(saved_v5_dir):
    return ImageSpec.from_pretrained_dir(saved_v5_dir)


@pytest.fixture(scope="module")
def big_jpeg(tmp_path_factory):
    """A 12-megapixel (4032x3024) phone-sized JPEG made from a real photo, with some
    added grain so that it carries high frequencies like a real photo does."""
    src = Image.open(PHOTOS_DIR / "rocket.jpg").convert("RGB").resize((4032, 3024), Image.BICUBIC)
    arr = np.asarray(src).astype(np.int16)
    rng = np.random.default_rng(0)
    arr = np.clip(arr + rng.normal(0, 6, arr.shape), 0, 255).astype(np.uint8)
    path = tmp_path_factory.mktemp("big") / "big.jpg"
    Image.fromarray(arr).save(path, quality=90)
    return path


def _reference(processor, pil_images):
    return processor(images=pil_images, return_tensors="pt").pixel_values


def _asym(size=(200, 100)):
    """An RGB image, blue everywhere except a red top-left quadrant."""
    w, h = size
    a = np.zeros((h, w, 3), np.uint8)
    a[..., 2] = 255
    a[: h // 2, : w // 2] = (255, 0, 0)
    return Image.fromarray(a)


def _is_red(px):
    r, g, b = (int(v) for v in px)
    return r > 200 and g < 60 and b < 60


def _is_blue(px):
    r, g, b = (int(v) for v in px)
    return b > 200 and r < 60 and g < 60


# --------------------------------------------------------------------------- #
# 1. parity with transformers' BlipImageProcessorPil
# --------------------------------------------------------------------------- #


def test_spec_from_saved_processor_matches_reference(spec, blip_processor):
    assert spec == ImageSpec.from_dict(blip_processor.to_dict())
    # BLIP-2's values are the dataclass defaults
    assert spec == ImageSpec()
    assert (spec.height, spec.width, spec.resample) == (224, 224, 3)


@pytest.mark.parametrize("name", PHOTOS)
def test_parity_real_photos(name, spec, blip_processor):
    path = PHOTOS_DIR / name
    ours = to_pixel_values([prepare(path, spec)], spec)
    ref = _reference(blip_processor, [Image.open(path).convert("RGB")])
    assert ours.shape == ref.shape == (1, 3, 224, 224)
    assert ours.dtype == ref.dtype == torch.float32
    assert ours.is_contiguous()
    diff = (ours - ref).abs().max().item()
    assert diff <= PARITY_MAX_ABS, f"{name}: max abs diff {diff}"


def test_parity_batch_and_reference_helper(spec, blip_processor):
    paths = [PHOTOS_DIR / n for n in PHOTOS]
    ours = to_pixel_values([prepare(p, spec) for p in paths], spec)
    ref = reference_pixel_values([open_image(p) for p in paths], blip_processor)
    assert ours.shape == ref.shape == (4, 3, 224, 224)
    assert (ours - ref).abs().max().item() <= PARITY_MAX_ABS


def test_parity_rgba_composited_like_reference(tmp_path, spec, blip_processor):
    a = np.asarray(Image.open(PHOTOS_DIR / "chelsea.png").convert("RGBA")).copy()
    a[:, : a.shape[1] // 2, 3] = 0
    a[:, a.shape[1] // 2 :, 3] = 128
    p = tmp_path / "rgba.png"
    Image.fromarray(a, "RGBA").save(p)
    ours = to_pixel_values([prepare(p, spec)], spec)
    ref = _reference(blip_processor, [Image.open(p)])  # the reference composites on white itself
    assert (ours - ref).abs().max().item() <= PARITY_MAX_ABS


def test_big_jpeg_draft_parity(big_jpeg, spec, blip_processor):
    im = open_image(big_jpeg, draft_size=(spec.width, spec.height))
    info = im.info.get("blip2_draft")
    assert info == {"original_size": (4032, 3024), "decoded_size": (504, 378)}  # 1/8 scale
    assert im.size == (504, 378) and im.mode == "RGB"

    ref = _reference(blip_processor, [Image.open(big_jpeg).convert("RGB")])
    fast = to_pixel_values([prepare(big_jpeg, spec, fast=True)], spec)
    d = (fast - ref).abs()
    assert d.mean().item() <= DRAFT_MEAN_ABS, d.mean().item()
    assert d.max().item() <= DRAFT_MAX_ABS, d.max().item()

    exact = to_pixel_values([prepare(big_jpeg, spec, fast=False)], spec)
    assert (exact - ref).abs().max().item() <= PARITY_MAX_ABS
    assert "blip2_draft" not in open_image(big_jpeg).info


def test_draft_policy(tmp_path, spec, blip_processor):
    assert "blip2_draft" not in open_image(PHOTOS_DIR / "rocket.jpg", draft_size=(224, 224)).info  # 640x427
    assert "blip2_draft" not in open_image(PHOTOS_DIR / "astronaut.png", draft_size=(224, 224)).info
    src = Image.open(PHOTOS_DIR / "rocket.jpg").convert("RGB")
    # 640x480: a 1/2 draft would leave < 1.5x the target, so it decodes in full: exact
    vga = tmp_path / "vga.jpg"
    src.resize((640, 480), Image.BICUBIC).save(vga, quality=90)
    assert "blip2_draft" not in open_image(vga, draft_size=(224, 224)).info
    ours = to_pixel_values([prepare(vga, spec)], spec)
    ref = _reference(blip_processor, [Image.open(vga).convert("RGB")])
    assert (ours - ref).abs().max().item() <= PARITY_MAX_ABS
    # 1920x1080: 1/2 scale keeps 960x540 >= 1.5 x 224
    hd = tmp_path / "hd.jpg"
    src.resize((1920, 1080), Image.BICUBIC).save(hd, quality=90)
    assert open_image(hd, draft_size=(224, 224)).info["blip2_draft"]["decoded_size"] == (960, 540)


def test_draft_with_exif_rotation(tmp_path):
    # stored 2000x1000, orientation 6: displayed 1000x2000
    p = tmp_path / "rot_big.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    _asym((2000, 1000)).save(p, quality=95, exif=exif.tobytes())

    im = open_image(p, draft_size=(224, 224))
    assert im.info["blip2_draft"]["decoded_size"] == (1000, 500)  # stored pixels at 1/2
    assert im.size == (500, 1000)  # upright
    assert _is_red(im.getpixel((im.width - 5, 5)))  # stored top-left -> displayed top-right
    assert _is_blue(im.getpixel((5, 5)))

    # a non-square draft size is applied in display orientation: both dims stay >= it
    im = open_image(p, draft_size=(300, 100))
    assert im.width >= 300 and im.height >= 100
    assert "blip2_draft" in im.info


def test_to_pixel_values_device_path_and_dtype(spec):
    rng = np.random.default_rng(1)
    arrays = [rng.integers(0, 256, (224, 224, 3), dtype=np.uint8) for _ in range(3)]
    cpu = to_pixel_values(arrays, spec)
    # the accelerator path (uint8 moved first, table lookup on the device), run on the CPU
    dev_path = apply_lut(torch.from_numpy(np.stack(arrays)), lut(spec, torch.device("cpu")))
    assert torch.equal(cpu, dev_path)
    assert dev_path.is_contiguous()
    half = to_pixel_values(arrays, spec, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and torch.equal(half, cpu.to(torch.bfloat16))
    # one uint8 value per channel, checked against the formula written out
    x = (np.float64(200) * spec.rescale_factor).astype(np.float32)
    expect = (x - np.float32(spec.mean[1])) / np.float32(spec.std[1])
    a = np.full((224, 224, 3), 200, np.uint8)
    assert to_pixel_values([a], spec)[0, 1, 0, 0].item() == float(expect)
    with pytest.raises(ValueError, match="size"):
        to_pixel_values([arrays[0], np.zeros((10, 10, 3), np.uint8)], spec)
    with pytest.raises(ValueError):
        to_pixel_values([], spec)


def test_prepare_is_thread_safe(spec):
    paths = [PHOTOS_DIR / n for n in PHOTOS] * 4
    serial = [prepare(p, spec) for p in paths]
    with ThreadPoolExecutor(4) as pool:
        threaded = list(pool.map(lambda p: prepare(p, spec), paths))
    for a, b in zip(serial, threaded):
        assert a.shape == (224, 224, 3) and a.dtype == np.uint8 and a.flags.c_contiguous
        assert np.array_equal(a, b)


def test_import_is_light():
    code = "import sys, blip2cli.images; print(sorted(m for m in ('torch', 'numpy', 'PIL') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --------------------------------------------------------------------------- #
# 2. bad and odd input
# --------------------------------------------------------------------------- #


def _err(source, **kw) -> str:
    with pytest.raises(ImageError) as ei:
        open_image(source, **kw)
    msg = str(ei.value)
    assert msg and "Traceback" not in msg
    return msg.lower()


def test_zero_byte_file(tmp_path):
    p = tmp_path / "empty.jpg"
    p.write_bytes(b"")
    assert "empty" in _err(p)
    assert "empty" in _err(b"")


def test_truncated_jpeg(tmp_path):
    data = (PHOTOS_DIR / "rocket.jpg").read_bytes()
    p = tmp_path / "half.jpg"
    p.write_bytes(data[: len(data) // 2])
    msg = _err(p)
    assert "truncated" in msg and "jpeg" in msg
    p.write_bytes(data[:300])  # cut inside the headers
    assert "truncated" in _err(p)


def test_truncated_png(tmp_path):
    data = (PHOTOS_DIR / "chelsea.png").read_bytes()
    p = tmp_path / "half.png"
    p.write_bytes(data[: len(data) // 2])
    msg = _err(p)
    assert "truncated" in msg and "png" in msg


def test_text_and_html_named_jpg(tmp_path):
    t = tmp_path / "notes.jpg"
    t.write_text("just some notes\nnothing to see here\n")
    msg = _err(t)
    assert "not an image" in msg and "text" in msg

    h = tmp_path / "page.jpg"
    h.write_text("<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head><body></body></html>")
    msg = _err(h)
    assert "not an image" in msg and "html" in msg

    assert "pdf" in _err(b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj")
    assert "not an image" in _err(b"\x00\x01\x02\x03" * 50)


def test_cmyk_jpeg(tmp_path):
    p = tmp_path / "cmyk.jpg"
    c = Image.new("CMYK", (64, 48), (255, 0, 0, 0))  # pure cyan
    c.save(p, quality=95)
    assert Image.open(p).mode == "CMYK"
    im = open_image(p)
    assert im.mode == "RGB" and im.size == (64, 48)
    r, g, b = im.getpixel((32, 24))
    assert r < 40 and g > 215 and b > 215
    assert prepare(p, ImageSpec()).shape == (224, 224, 3)


def test_16bit_greyscale_png_is_scaled_not_clipped(tmp_path):
    p = tmp_path / "g16.png"
    ramp = np.tile(np.linspace(0, 65535, 256).astype(np.uint16), (16, 1))
    Image.fromarray(ramp).save(p)
    assert Image.open(p).mode.startswith("I")
    a = np.asarray(open_image(p))
    assert a.shape == (16, 256, 3)
    assert (a == 255).mean() < 0.05  # Pillow's own convert("RGB") clips ~99.6% to white
    assert a[0, 0, 0] == 0 and a[0, -1, 0] == 255
    assert abs(int(a[0, 128, 0]) - 128) <= 2
    assert np.all(np.diff(a[0, :, 0].astype(int)) >= 0)


def test_palette_png_with_transparency(tmp_path):
    p = tmp_path / "pal.png"
    im = Image.new("P", (40, 20), 0)
    im.putpalette([255, 0, 0, 0, 0, 255] + [0] * (254 * 3))
    im.paste(1, (20, 0, 40, 20))
    im.save(p, transparency=0)  # index 0 (red) fully transparent
    got = open_image(p)
    assert got.mode == "RGB"
    assert got.getpixel((5, 5)) == (255, 255, 255)
    assert got.getpixel((30, 5)) == (0, 0, 255)


def test_grey_alpha_png(tmp_path):
    p = tmp_path / "la.png"
    la = np.zeros((20, 40, 2), np.uint8)
    la[:, 20:, 1] = 255  # left half transparent black, right half opaque black
    Image.fromarray(la, "LA").save(p)
    got = open_image(p)
    assert got.getpixel((5, 5)) == (255, 255, 255)
    assert got.getpixel((30, 5)) == (0, 0, 0)


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PNG"])
def test_animation_first_frame(tmp_path, fmt):
    p = tmp_path / f"anim.{fmt.lower()}"
    frames = [Image.new("RGB", (32, 32), c) for c in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    kw = {"lossless": True} if fmt == "WEBP" else {}
    frames[0].save(p, format=fmt, save_all=True, append_images=frames[1:], duration=100, loop=0, **kw)
    assert getattr(Image.open(p), "n_frames", 1) == 3
    got = open_image(p)
    assert got.mode == "RGB" and got.size == (32, 32)
    assert _is_red(got.getpixel((16, 16)))


@pytest.mark.parametrize("orientation, red_corner", [(6, "top_right"), (8, "bottom_left")])
def test_exif_rotated_jpeg(tmp_path, orientation, red_corner):
    p = tmp_path / f"rot{orientation}.jpg"
    exif = Image.Exif()
    exif[0x0112] = orientation
    _asym((200, 100)).save(p, quality=95, exif=exif.tobytes())
    assert Image.open(p).size == (200, 100)
    im = open_image(p)
    assert im.size == (100, 200)  # swapped: upright
    corners = {
        "top_left": (5, 5),
        "top_right": (im.width - 5, 5),
        "bottom_left": (5, im.height - 5),
        "bottom_right": (im.width - 5, im.height - 5),
    }
    for name, xy in corners.items():
        assert _is_red(im.getpixel(xy)) == (name == red_corner), name
    # prepare sees the upright image too
    a = prepare(p, ImageSpec())
    y, x = (5, 218) if red_corner == "top_right" else (218, 5)
    assert _is_red(a[y, x])


@pytest.mark.parametrize("size", [(1, 1), (10000, 10), (10, 10000)])
def test_extreme_sizes(tmp_path, size):
    p = tmp_path / "odd.png"
    Image.new("RGB", size, (10, 200, 30)).save(p)
    a = prepare(p, ImageSpec())
    assert a.shape == (224, 224, 3) and a.dtype == np.uint8
    assert tuple(a[100, 100]) == (10, 200, 30)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def test_decompression_bomb(tmp_path):
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    data = (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + _png_chunk(b"IEND", b"")
    )
    assert len(data) < 200
    p = tmp_path / "bomb.png"
    p.write_bytes(data)
    limit = Image.MAX_IMAGE_PIXELS
    t0 = time.perf_counter()
    msg = _err(p)
    assert time.perf_counter() - t0 < 5  # fails on the header; nothing is allocated
    assert "too large" in msg and "decompression" in msg and "100000x100000" in msg
    assert "too large" in _err(data)
    assert Image.MAX_IMAGE_PIXELS == limit  # the guard is left as it was


def test_bomb_warning_is_silent_but_limit_kept(tmp_path):
    # 10000x10000 = 1e8 pixels: above MAX_IMAGE_PIXELS (warning zone), below 2x (error)
    ihdr = struct.pack(">IIBBBBB", 10_000, 10_000, 8, 2, 0, 0, 0)
    p = tmp_path / "warn.png"
    p.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IEND", b""))
    code = (
        "import sys; from blip2cli.decode import open_image, ImageError\n"
        "try:\n    open_image(sys.argv[1])\nexcept ImageError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(p)], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stderr == ""  # no DecompressionBombWarning
    assert "corrupt png file (no image data)" in out.stdout.lower()  # passed the guard; no IDAT


def test_unreadable_file(tmp_path, monkeypatch):
    p = tmp_path / "secret.jpg"
    p.write_bytes((PHOTOS_DIR / "rocket.jpg").read_bytes())
    if os.geteuid() != 0:
        p.chmod(0)
        try:
            assert not os.access(p, os.R_OK)
            assert "permission denied" in _err(p)
        finally:
            p.chmod(0o644)
    # also when root (where chmod does not bite): the open itself is refused
    import blip2cli.decode as decode_mod  # where the file is opened

    def deny(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(decode_mod, "open", deny, raising=False)
    assert "permission denied" in _err(p)


def test_missing_broken_symlink_and_directory(tmp_path):
    assert "no such file" in _err(tmp_path / "nope.jpg")
    link = tmp_path / "dangling.jpg"
    link.symlink_to(tmp_path / "gone.jpg")
    assert "broken symbolic link" in _err(link)
    d = tmp_path / "x.jpg"
    d.mkdir()
    assert "directory" in _err(d)


def test_raw_bytes_input(spec):
    for name in ("chelsea.png", "rocket.jpg"):
        path = PHOTOS_DIR / name
        from_bytes = prepare(path.read_bytes(), spec)
        assert np.array_equal(from_bytes, prepare(path, spec))
        assert open_image(path.read_bytes()).mode == "RGB"
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "JPEG")
    assert open_image(bytearray(buf.getvalue())).size == (8, 8)


def test_other_modes_become_rgb(tmp_path):
    for mode, value in [("1", 1), ("L", 77), ("F", 0.5), ("I", 40000)]:
        im = Image.new(mode, (8, 8), value)
        got = open_image(im)
        assert got.mode == "RGB" and got.size == (8, 8), mode
    assert open_image(Image.new("F", (4, 4), 0.5)).getpixel((0, 0)) == (128, 128, 128)


# --------------------------------------------------------------------------- #
# 3. ImageSpec
# --------------------------------------------------------------------------- #


def test_spec_from_dict_variants():
    assert ImageSpec.from_dict({"size": {"height": 224, "width": 224}}) == ImageSpec()
    s = ImageSpec.from_dict(
        {
            "size": {"height": 364, "width": 300},
            "resample": 2,
            "image_mean": [0.5, 0.5, 0.5],
            "image_std": [0.25, 0.25, 0.25],
            "rescale_factor": 0.5,
            "do_normalize": False,
            "do_rescale": None,  # None means "class default" in transformers
        }
    )
    assert (s.height, s.width, s.resample) == (364, 300, 2)
    assert s.mean == (0.5,) * 3 and s.std == (0.25,) * 3 and s.rescale_factor == 0.5
    assert s.do_normalize is False and s.do_rescale is True and s.do_resize is True
    sq = ImageSpec.from_dict({"size": {"shortest_edge": 256}})
    assert (sq.height, sq.width) == (256, 256)
    assert ImageSpec.from_dict({"size": 196}).width == 196
    assert ImageSpec.from_dict({"resample": "bicubic"}).resample == 3
    assert ImageSpec.from_dict({"resample": Image.Resampling.BILINEAR}).resample == 2

    class InterpolationMode(Enum):  # torchvision's shape: string values
        BICUBIC = "bicubic"

    assert ImageSpec.from_dict({"resample": InterpolationMode.BICUBIC}).resample == 3
    # a missing size takes BlipImageProcessor's class default (384), as transformers does
    d = ImageSpec.from_dict({})
    assert (d.height, d.width) == (384, 384) and d.mean == ImageSpec().mean
    # round trip
    assert ImageSpec.from_dict(s.to_dict()) == s
    assert json.loads(json.dumps(s.to_dict())) == s.to_dict()


def test_spec_from_pretrained_dir_layouts(tmp_path, spec, blip_processor):
    # older layout: a flat preprocessor_config.json (what an image processor saves alone)
    old = tmp_path / "old"
    blip_processor.save_pretrained(old)
    assert (old / "preprocessor_config.json").is_file()
    assert ImageSpec.from_pretrained_dir(old) == spec

    # v4 layout: processor_config.json holds only processor kwargs -> fall back
    (old / "processor_config.json").write_text(json.dumps({"num_query_tokens": 32}))
    assert ImageSpec.from_pretrained_dir(old) == spec

    # v5 layout, written by hand, with a non-default value
    v5 = tmp_path / "v5"
    v5.mkdir()
    cfg = {"image_processor": {**spec.to_dict(), "size": {"height": 364, "width": 364}}, "num_query_tokens": 32}
    (v5 / "processor_config.json").write_text(json.dumps(cfg))
    got = ImageSpec.from_pretrained_dir(v5)
    assert (got.height, got.width) == (364, 364) and got.mean == spec.mean

    with pytest.raises(FileNotFoundError):
        ImageSpec.from_pretrained_dir(tmp_path / "nothing_here")
