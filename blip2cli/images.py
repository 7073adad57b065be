"""Image decoding and preprocessing for BLIP-2.

Two jobs:

* ``open_image``: turn a path or bytes into an upright, fully loaded RGB
  ``PIL.Image`` -- or raise :class:`ImageError` with a reason a user understands
  (empty file, truncated JPEG, "not an image file (looks like HTML)", image too
  large, permission denied, ...).
* ``prepare`` + ``to_pixel_values``: the fast preprocessing path.  ``prepare``
  (decode + resize to ``uint8`` HxWx3) is the CPU part and is safe to run in a
  thread pool (Pillow releases the GIL while decoding and resampling);
  ``to_pixel_values`` stacks a batch and does rescale + normalise on the target
  device, moving ``uint8`` (4x less data than float32) before converting.

The arithmetic reproduces transformers' ``BlipImageProcessorPil`` exactly:

1. ``convert_to_rgb`` (alpha composited on white), ``PIL.Image.resize`` of the
   **uint8** RGB image to (height, width) with the configured filter
   (bicubic for BLIP/BLIP-2), ``reducing_gap=None``;
2. rescale: ``(uint8.astype(float64) * rescale_factor).astype(float32)``;
3. normalise in float32: ``(x - float32(mean)) / float32(std)``.

Steps 2-3 are a per-channel function of the uint8 value, so they are done with
a 3x256 lookup table computed by exactly that numpy arithmetic: the result is
bit-identical to the reference for the same decoded pixels, on any device.

Nothing heavy is imported at module import time (``blip2 --help`` must stay
instant): Pillow, numpy and torch are imported inside the functions.
"""

from __future__ import annotations

import functools
import json
import math
import os
import stat
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "ImageError",
    "ImageSpec",
    "open_image",
    "prepare",
    "make_thumbnail",
    "Thumbnail",
    "to_pixel_values",
    "reference_pixel_values",
]

# transformers.image_utils.OPENAI_CLIP_MEAN / OPENAI_CLIP_STD (BLIP / BLIP-2 defaults)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# BlipImageProcessor's class default size (BLIP-2 checkpoints set 224 in their config).
BLIP_DEFAULT_SIZE = 384

_PIL_BICUBIC = 3
_RESAMPLE_NAMES = {
    "nearest": 0,
    "lanczos": 1,
    "antialias": 1,
    "bilinear": 2,
    "linear": 2,
    "bicubic": 3,
    "cubic": 3,
    "box": 4,
    "hamming": 5,
}

# Pillow's ExifTags.Base.Orientation
_EXIF_ORIENTATION = 0x0112
# open_image(draft_size=...) decodes a JPEG at a reduced DCT scale only while both
# decoded dims stay >= DRAFT_MARGIN x draft_size.  Measured against a full decode
# (bicubic to 224, normalised units): margin 1 drafts a 640x480 JPEG to 320x240 with
# mean/max abs diff 0.015/0.47; margin 1.5 leaves it alone, drafts 1920x1080 to
# 960x540 (0.003/0.07) and 4032x3024 to 504x378 (0.005/0.11, 4.5x faster).
DRAFT_MARGIN = 1.5
# Orientations whose transposition swaps width and height.
_SWAPPING_ORIENTATIONS = (5, 6, 7, 8)
# The most memory one image may take while it is decoded: its pixels as Pillow
# stores them plus the copies made on the way to RGB (estimated from the header,
# after a JPEG's draft, before any pixel is decoded; see _decode_bytes). A 100-
# megapixel RGB photo (400 MB) passes; a 13000x13000 1-bit PNG (845 MB) does not.
# Decode memory is then at most this much per image in flight (one per decode
# worker, --workers). None: no limit (Pillow's decompression-bomb guard stays).
MAX_DECODE_BYTES: int | None = 500_000_000
# Formats whose decoded size the draft (reduced DCT scale) may still shrink.
_DRAFTABLE = ("JPEG", "MPO")


class ImageError(Exception):
    """A per-image failure with a message a user understands.

    The message is a reason only (``"empty file (0 bytes)"``, ``"truncated JPEG
    file (the data ends early)"``, ``"not an image file (looks like HTML)"``, ...);
    the caller adds the file name.
    """


# --------------------------------------------------------------------------- #
# ImageSpec
# --------------------------------------------------------------------------- #


def _three_floats(value: Any, default: tuple[float, float, float]) -> tuple[float, float, float]:
    if value is None:
        return default
    if isinstance(value, (int, float)):
        return (float(value),) * 3
    values = tuple(float(v) for v in value)
    if len(values) == 1:
        return values * 3
    if len(values) != 3:
        raise ValueError(f"expected 3 values (one per RGB channel), got {len(values)}: {value!r}")
    return values  # type: ignore[return-value]


def _parse_size(size: Any) -> tuple[int, int]:
    """(height, width) from an image-processor ``size`` entry."""
    if size is None:
        return BLIP_DEFAULT_SIZE, BLIP_DEFAULT_SIZE
    if isinstance(size, bool):
        raise ValueError(f"invalid image size {size!r}")
    if isinstance(size, (int, float)):
        return int(size), int(size)
    if isinstance(size, (list, tuple)):
        if len(size) == 1:
            return int(size[0]), int(size[0])
        if len(size) == 2:
            return int(size[0]), int(size[1])
        raise ValueError(f"invalid image size {size!r}")
    if isinstance(size, dict):
        if size.get("height") is not None and size.get("width") is not None:
            return int(size["height"]), int(size["width"])
        # BLIP's vision tower takes a fixed square input; BlipImageProcessor sets
        # default_to_square=True, so a bare edge length means a square.
        for key in ("shortest_edge", "longest_edge"):
            if size.get(key) is not None:
                return int(size[key]), int(size[key])
        if size.get("max_height") is not None and size.get("max_width") is not None:
            return int(size["max_height"]), int(size["max_width"])
    raise ValueError(f"invalid image size {size!r}")


def _parse_resample(value: Any) -> int:
    if value is None:
        return _PIL_BICUBIC
    if isinstance(value, bool):
        raise ValueError(f"invalid resample filter {value!r}")
    if isinstance(value, int):  # includes PIL.Image.Resampling / PILImageResampling
        return int(value)
    if not isinstance(value, str) and hasattr(value, "value"):
        # another enum, e.g. torchvision's InterpolationMode.BICUBIC (value "bicubic")
        inner = value.value
        value = inner if isinstance(inner, (int, str)) else getattr(value, "name", str(value))
        if isinstance(value, int):
            return value
    if isinstance(value, str):
        name = value.strip().lower().rsplit(".", 1)[-1]
        if name.isdigit():
            return int(name)
        if name in _RESAMPLE_NAMES:
            return _RESAMPLE_NAMES[name]
    raise ValueError(f"invalid resample filter {value!r}")


def _flag(d: dict, key: str, default: bool = True) -> bool:
    # transformers treats a None value as "use the class default".
    value = d.get(key)
    return default if value is None else bool(value)


@dataclass(frozen=True)
class ImageSpec:
    """What the checkpoint's image processor does, as plain values."""

    height: int = 224
    width: int = 224
    resample: int = _PIL_BICUBIC
    do_resize: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    do_convert_rgb: bool = True

    @classmethod
    def from_dict(cls, d: dict) -> "ImageSpec":
        """From an image-processor config dict (``preprocessor_config.json`` contents,
        or the ``"image_processor"`` entry of a v5 ``processor_config.json``).

        A missing key takes BlipImageProcessor's class default (note: size 384x384,
        not 224; real BLIP-2 checkpoints always set 224)."""
        if not isinstance(d, dict):
            raise TypeError(f"expected an image-processor config dict, got {type(d).__name__}")
        height, width = _parse_size(d.get("size"))
        if height <= 0 or width <= 0:
            raise ValueError(f"invalid image size {d.get('size')!r}")
        rescale_factor = d.get("rescale_factor")
        return cls(
            height=height,
            width=width,
            resample=_parse_resample(d.get("resample")),
            do_resize=_flag(d, "do_resize"),
            do_rescale=_flag(d, "do_rescale"),
            rescale_factor=float(1 / 255 if rescale_factor is None else rescale_factor),
            do_normalize=_flag(d, "do_normalize"),
            mean=_three_floats(d.get("image_mean"), CLIP_MEAN),
            std=_three_floats(d.get("image_std"), CLIP_STD),
            do_convert_rgb=_flag(d, "do_convert_rgb"),
        )

    @classmethod
    def from_pretrained_dir(cls, path: str | os.PathLike) -> "ImageSpec":
        """Read a local checkpoint/processor directory.

        v5 layout: ``processor_config.json`` with the image processor nested under
        ``"image_processor"``. Older layout: ``preprocessor_config.json`` (flat).
        """
        root = Path(path)
        if root.is_file():
            root = root.parent
        proc = root / "processor_config.json"
        if proc.is_file():
            data = _read_json(proc)
            nested = data.get("image_processor") if isinstance(data, dict) else None
            if isinstance(nested, dict):
                return cls.from_dict(nested)
        pre = root / "preprocessor_config.json"
        if pre.is_file():
            data = _read_json(pre)
            if isinstance(data, dict) and isinstance(data.get("image_processor"), dict):
                data = data["image_processor"]
            return cls.from_dict(data)
        raise FileNotFoundError(
            f"no image processor config in {str(root)!r} "
            "(looked for processor_config.json with an 'image_processor' entry, "
            "and preprocessor_config.json)"
        )

    def to_dict(self) -> dict:
        """An image-processor config dict (the shape ``from_dict`` reads)."""
        return {
            "do_convert_rgb": self.do_convert_rgb,
            "do_normalize": self.do_normalize,
            "do_rescale": self.do_rescale,
            "do_resize": self.do_resize,
            "image_mean": list(self.mean),
            "image_std": list(self.std),
            "resample": self.resample,
            "rescale_factor": self.rescale_factor,
            "size": {"height": self.height, "width": self.width},
        }


def _read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# --------------------------------------------------------------------------- #
# Decoding
# --------------------------------------------------------------------------- #

_init_lock = threading.Lock()
_initialised = False


def _pil():
    """Import Pillow once: register all plugins (thread-safe) and silence the
    decompression-bomb *warning* (the error threshold, 2x MAX_IMAGE_PIXELS, stays)."""
    global _initialised
    from PIL import Image

    if not _initialised:
        with _init_lock:
            if not _initialised:
                import warnings

                warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
                Image.init()
                _initialised = True
    return Image


def _bomb_message(exc: BaseException) -> str:
    from PIL import Image

    size = None
    tb = exc.__traceback__
    while tb is not None:  # the innermost frame is Image._decompression_bomb_check(size)
        if tb.tb_frame.f_code.co_name == "_decompression_bomb_check":
            size = tb.tb_frame.f_locals.get("size")
        tb = tb.tb_next
    limit = Image.MAX_IMAGE_PIXELS
    limit_txt = f"{2 * limit} pixels" if limit else "Pillow's pixel limit"
    if isinstance(size, tuple) and len(size) == 2:
        w, h = size
        return (
            f"image too large: {w}x{h} pixels exceeds the decompression-bomb limit of "
            f"{limit_txt}"
        )
    return f"image too large: exceeds the decompression-bomb limit of {limit_txt} ({exc})"


def _sniff(head: bytes) -> str:
    """A reason for data that Pillow could not identify."""
    h = head.lstrip(b"\xef\xbb\xbf")  # UTF-8 BOM
    stripped = h.lstrip()
    low = stripped[:512].lower()
    if h.startswith(b"%PDF"):
        return "not an image file (looks like a PDF document)"
    if h[4:8] == b"ftyp":
        brand = h[8:12]
        if brand in (b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1"):
            return "unsupported image format (HEIC/HEIF; Pillow cannot read it without a plugin)"
        if brand in (b"avif", b"avis"):
            return "unsupported or corrupt AVIF image"
        return "not an image file (looks like a video/MP4 container)"
    if low.startswith((b"<!doctype html", b"<html", b"<head", b"<body", b"<meta", b"<script")) or (
        low.startswith(b"<") and b"<html" in low
    ):
        return "not an image file (looks like HTML)"
    if low.startswith(b"<svg") or (low.startswith(b"<?xml") and b"<svg" in head.lower()):
        return "unsupported image format (SVG vector graphics)"
    if low.startswith(b"<?xml"):
        return "not an image file (looks like XML)"
    if h.startswith(b"PK\x03\x04"):
        return "not an image file (looks like a ZIP archive)"
    if h.startswith(b"\x1f\x8b"):
        return "not an image file (looks like gzip-compressed data)"
    if h.startswith((b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"RIFF", b"BM", b"II*\x00", b"MM\x00*")):
        return "corrupt image file (unreadable header)"
    if h.startswith((b"ID3", b"OggS", b"fLaC")) or (h.startswith(b"RIFF") and h[8:12] == b"WAVE"):
        return "not an image file (looks like audio)"
    if b"\x00" not in h[:4096]:
        try:
            text = h[:4096].decode("utf-8", errors="strict")
        except UnicodeDecodeError as e:
            # a multi-byte character cut at the end of the sample is still text
            text = h[: e.start].decode("utf-8") if e.start > len(h[:4096]) - 4 else None
        if text is not None:
            printable = sum(c.isprintable() or c in "\r\n\t\f" for c in text)
            if text and printable >= 0.95 * len(text):
                if stripped[:1] in (b"{", b"["):
                    return "not an image file (looks like JSON/text)"
                return "not an image file (looks like text)"
    return "not an image file (unrecognised format)"


def _megabytes(n: int) -> str:
    return f"{n / 1e6:,.0f} MB" if n >= 10e6 else f"{n / 1e6:.1f} MB"


def _decode_bytes(im) -> int:
    """About the most memory decoding ``im`` (opened, not loaded) and making it RGB takes.

    Pillow keeps 1, L and P images in one byte per pixel, I;16 in two and every
    other mode in four (RGB included). On top of that: nothing for plain RGB, the
    RGB copy (4) for other modes, and for alpha (RGBA copy, white background,
    composite, RGB) or 16/32-bit and float greyscale (numpy scaling) 16; plus
    one more stored copy when EXIF says the image is rotated."""
    w, h = im.size
    mode = im.mode
    if mode in ("1", "L", "P"):
        stored = 1
    elif mode.startswith("I;16"):
        stored = 2
    else:
        stored = 4
    has_alpha = any(b in ("A", "a") for b in im.getbands()) or im.info.get("transparency") is not None
    if mode == "RGB" and not has_alpha:
        extra = 0
    elif has_alpha or mode.startswith("I") or mode == "F":
        extra = 16
    else:
        extra = 4
    # (A PNG's getexif() decodes the image to look for EXIF after the pixels: not here.)
    if not (im.format == "PNG" and "exif" not in im.info) and _orientation(im) != 1:
        extra += stored  # exif_transpose makes the turned copy before it drops the first
    return w * h * (stored + extra)


def _check_decode_budget(im) -> None:
    """Refuse an image whose decode would take more than ``MAX_DECODE_BYTES``, from its header."""
    limit = MAX_DECODE_BYTES
    if limit is None:
        return
    need = _decode_bytes(im)
    if need > limit:
        w, h = im.size
        raise ImageError(
            f"image too large to decode: {w}x{h} pixels (mode {im.mode}) would take about "
            f"{_megabytes(need)} of memory; the limit is {_megabytes(limit)} per image"
        )


def _decode_error(exc: BaseException, fmt: str | None) -> ImageError:
    from PIL import Image

    if isinstance(exc, Image.DecompressionBombError):
        return ImageError(_bomb_message(exc))
    name = fmt or "image"
    if isinstance(exc, MemoryError):
        return ImageError("image too large to decode (out of memory)")
    msg = str(exc)
    low = msg.lower()
    if isinstance(exc, EOFError) or "truncated" in low or "premature end" in low:
        return ImageError(f"truncated {name} file (the data ends early)")
    if "cannot load this image" in low:
        return ImageError(f"corrupt {name} file (no image data)")
    if "broken data stream" in low:
        return ImageError(f"corrupt {name} file (broken data stream)")
    if "decompressing data" in low or "crc" in low:
        return ImageError(f"corrupt {name} file ({msg})")
    detail = f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__
    return ImageError(f"corrupt or unsupported {name} image ({detail})")


def _orientation(im) -> int:
    try:
        value = im.getexif().get(_EXIF_ORIENTATION, 1)
        return int(value) if value in (1, 2, 3, 4, 5, 6, 7, 8) else 1
    except Exception:  # malformed EXIF: treat as upright rather than failing the image
        return 1


def _scale_to_uint8(arr, *, integer_16bit: bool):
    """Map a single-channel high-bit-depth array to uint8 (0..255) without clipping."""
    import numpy as np

    if integer_16bit:
        # exact rounding of v * 255 / 65535 == v / 257
        return ((arr.astype(np.uint32) + 128) // 257).astype(np.uint8)
    a = arr.astype(np.float64)
    finite = np.isfinite(a)
    if not finite.all():
        a = np.where(finite, a, 0.0)
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if np.issubdtype(arr.dtype, np.floating):
        if lo >= 0.0 and hi <= 1.0:
            return np.rint(a * 255.0).astype(np.uint8)
        if lo >= 0.0 and hi <= 255.0:
            return np.rint(a).astype(np.uint8)
    else:
        if lo >= 0 and hi <= 255:
            return a.astype(np.uint8)
        if lo >= 0 and hi <= 65535:
            return ((a.astype(np.uint32) + 128) // 257).astype(np.uint8)
    if hi <= lo:
        return np.zeros(a.shape, np.uint8)
    return np.rint((a - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def _composite_on_white(im):
    Image = _pil()
    rgba = im.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _to_rgb(im):
    """Any Pillow mode -> RGB, like transformers' convert_to_rgb (alpha composited
    on white), except that 16/32-bit and float greyscale is scaled, not clipped."""
    mode = im.mode
    if mode == "RGB" and im.info.get("transparency") is None:
        return im
    if mode.startswith("I") or mode == "F":
        import numpy as np

        Image = _pil()
        arr = np.asarray(im)
        grey = _scale_to_uint8(arr, integer_16bit=mode.startswith("I;16"))
        out = Image.fromarray(np.ascontiguousarray(grey), mode="L")
        transparency = im.info.get("transparency")
        if isinstance(transparency, int) and not isinstance(transparency, bool):
            alpha = Image.fromarray(np.where(arr == transparency, 0, 255).astype(np.uint8), mode="L")
            la = Image.merge("LA", (out, alpha))
            return _composite_on_white(la)
        return out.convert("RGB")
    has_alpha = any(b in ("A", "a") for b in im.getbands()) or im.info.get("transparency") is not None
    if has_alpha:
        return _composite_on_white(im)
    return im.convert("RGB")


def _open_and_load(fp, draft_size):
    """Image.open + optional draft + load + EXIF transpose + RGB -> an RGB image."""
    Image = _pil()
    from PIL import ImageOps

    fmt = None
    try:
        im = Image.open(fp)
    except Image.DecompressionBombError as e:
        raise ImageError(_bomb_message(e)) from None
    except Image.UnidentifiedImageError:
        try:
            fp.seek(0)
            head = fp.read(4096)
        except Exception:
            head = b""
        raise ImageError(_sniff(head)) from None
    except Exception as e:
        raise _decode_error(e, None) from None

    try:
        fmt = im.format
        draft_info = None
        if draft_size is not None and fmt in ("JPEG", "MPO"):
            dw, dh = int(draft_size[0]), int(draft_size[1])
            if _orientation(im) in _SWAPPING_ORIENTATIONS:
                dw, dh = dh, dw  # the draft applies to the stored (pre-rotation) pixels
            # Ask for DRAFT_MARGIN x the target: the final resize then still
            # downsamples by >= 1.5x, which keeps the result close to a full decode.
            rw, rh = math.ceil(dw * DRAFT_MARGIN), math.ceil(dh * DRAFT_MARGIN)
            w, h = im.size
            if dw > 0 and dh > 0 and w >= 2 * rw and h >= 2 * rh:
                original = im.size
                im.draft("RGB", (rw, rh))
                if im.size != original:
                    draft_info = {"original_size": original, "decoded_size": im.size}
        _check_decode_budget(im)  # from the header (after the draft): no pixel decoded yet
        im.load()
        try:
            ImageOps.exif_transpose(im, in_place=True)
        except Exception:
            pass  # malformed EXIF/XMP: keep the stored orientation rather than fail
        out = _to_rgb(im)
    except ImageError:
        raise
    except Exception as e:
        raise _decode_error(e, fmt) from None
    if draft_info is not None:
        out.info["blip2_draft"] = draft_info
    return out


def open_image(source, *, draft_size: tuple[int, int] | None = None):
    """Decode ``source`` (a path, or the file's bytes) into an upright, fully
    loaded RGB ``PIL.Image.Image``.

    * EXIF orientation applied; the first frame of animations;
    * every mode to RGB: alpha / transparency composited on white, palette,
      16-bit greyscale scaled to 8 bit, CMYK, 1-bit, float;
    * Pillow's decompression-bomb limit kept (its warning silenced);
    * an image whose decode would take more than ``MAX_DECODE_BYTES`` is refused
      from its header (after the draft), before any pixel is decoded;
    * only regular files are opened (a named pipe or device is refused from ``stat``);
    * ``draft_size=(w, h)`` (the size the caller will resize to): a JPEG much
      larger than that is decoded at a reduced DCT scale (1/2, 1/4 or 1/8) -- the
      strongest reduction that keeps both dims >= ``DRAFT_MARGIN`` (1.5) x the draft size, in
      display orientation (EXIF rotation accounted for); ``image.info["blip2_draft"]``
      then records ``{"original_size", "decoded_size"}`` (sizes of the stored,
      unrotated pixels).

    Every failure raises :class:`ImageError`.
    """
    import io

    _pil()
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if not data:
            raise ImageError("empty data (0 bytes)")
        return _open_and_load(io.BytesIO(data), draft_size)

    if hasattr(source, "mode") and hasattr(source, "getbands") and hasattr(source, "size"):
        # already a PIL image: just normalise it (never modified in place)
        try:
            source.load()
            im = source
            if _orientation(source) != 1:
                from PIL import ImageOps

                im = ImageOps.exif_transpose(source)
            return _to_rgb(im)
        except ImageError:
            raise
        except Exception as e:
            raise _decode_error(e, getattr(source, "format", None)) from None

    f, _ = _open_regular(source)
    with f:
        try:
            return _open_and_load(f, draft_size)
        except ImageError:
            raise
        except OSError as e:  # an I/O error while reading (EIO, ...)
            raise ImageError(f"cannot read file ({e.strerror or e})") from None


_NOT_REGULAR = (
    (stat.S_ISFIFO, "a named pipe"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


def _not_regular(st: os.stat_result) -> ImageError | None:
    """The reason a file that is no regular file is never opened (None for a regular file).

    Opening a named pipe blocks until something writes to it, a device can be endless
    (``/dev/zero``): only regular files are read; a stream goes to stdin (``-``)."""
    if stat.S_ISREG(st.st_mode):
        return None
    if stat.S_ISDIR(st.st_mode):
        return ImageError("is a directory")
    for test, kind in _NOT_REGULAR:
        if test(st.st_mode):
            return ImageError(f"not a regular file ({kind}), not opened: only regular files are read "
                              "(send a stream on stdin, as -)")
    return ImageError("not a regular file")


def _open_regular(source):
    """``(binary file, its fstat)`` of an image path, or :class:`ImageError`.

    Only regular files are opened: a named pipe, socket or device is refused from
    ``stat`` without an ``open``. The open itself is non-blocking and the opened
    descriptor is checked again (``fstat``), so a file swapped for a pipe between
    the two cannot hang a decode worker."""
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"expected a path or bytes, got {type(source).__name__}")
    path = os.fspath(source)
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            try:
                target = os.readlink(path)
            except OSError:
                target = "?"
            raise ImageError(f"broken symbolic link (points to {target!r}, which does not exist)") from None
        raise ImageError("no such file") from None
    except NotADirectoryError:
        raise ImageError("no such file (a parent in the path is not a directory)") from None
    except PermissionError:
        raise ImageError("permission denied") from None
    except OSError as e:
        raise ImageError(f"cannot access file ({e.strerror or e})") from None

    refused = _not_regular(st)
    if refused is not None:
        raise refused
    if st.st_size == 0:
        raise ImageError("empty file (0 bytes)")

    try:
        f = open(path, "rb", opener=_open_nonblocking)
    except PermissionError:
        raise ImageError("permission denied") from None
    except IsADirectoryError:
        raise ImageError("is a directory") from None
    except OSError as e:
        raise ImageError(f"cannot read file ({e.strerror or e})") from None
    try:
        fd = f.fileno()
        st = os.fstat(fd)
        refused = _not_regular(st)
        if refused is not None:
            raise refused
        if st.st_size == 0:
            raise ImageError("empty file (0 bytes)")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)  # a regular file: no read waits for a writer
        return f, st
    except OSError as e:
        f.close()
        raise ImageError(f"cannot read file ({e.strerror or e})") from None
    except BaseException:
        f.close()
        raise


def _open_nonblocking(path, flags):
    """``open``'s opener: O_NONBLOCK (a pipe swapped in after the stat cannot block
    the open), no controlling terminal."""
    return os.open(path, flags | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))


def read_image_file(source, *, max_bytes: int | None = None) -> tuple[bytes, os.stat_result]:
    """``(the bytes of an image file, its stat)``, for a caller that keeps the bytes
    (a vector store hashes exactly what it decodes).

    Refused (:class:`ImageError`) before the rest of the file is read: anything
    but a regular file (never opened), a file that Pillow does not recognise from
    its first bytes (the reason says what it looks like), a header over the
    decompression-bomb limit or, for formats decoded at full size, over
    ``MAX_DECODE_BYTES``, and a file larger than ``max_bytes`` (default
    ``MAX_DECODE_BYTES``). The decode of the bytes checks the rest."""
    Image = _pil()
    limit = MAX_DECODE_BYTES if max_bytes is None else max_bytes
    f, st = _open_regular(source)
    with f:
        try:
            try:
                im = Image.open(f)
            except Image.DecompressionBombError as e:
                raise ImageError(_bomb_message(e)) from None
            except Image.UnidentifiedImageError:
                f.seek(0)
                raise ImageError(_sniff(f.read(4096))) from None
            except ImageError:
                raise
            except Exception as e:
                raise _decode_error(e, None) from None
            if im.format not in _DRAFTABLE:  # a JPEG's decoded size is settled by the draft
                _check_decode_budget(im)
            if limit is not None and st.st_size > limit:
                raise ImageError(
                    f"file too large to read as one image ({_megabytes(st.st_size)}; "
                    f"the limit is {_megabytes(limit)})"
                )
            f.seek(0)
            # read() allocates what it is asked for first: ask for the file's size (+1 to see growth)
            data = f.read((st.st_size if limit is None else min(st.st_size, limit)) + 1)
        except OSError as e:
            raise ImageError(f"cannot read file ({e.strerror or e})") from None
    if not data:
        raise ImageError("empty file (0 bytes)")
    if limit is not None and len(data) > limit:  # grew while read
        raise ImageError(f"file too large to read as one image (the limit is {_megabytes(limit)})")
    return data, st


# --------------------------------------------------------------------------- #
# Preprocessing
# --------------------------------------------------------------------------- #


# Contact-sheet thumbnails (``--format html``): longest side and JPEG quality.
# 160 px at quality 70 is about 5-8 KB per photo, 7-11 KB as a base64 data URI.
THUMBNAIL_SIZE = 160
THUMBNAIL_QUALITY = 70


@dataclass(frozen=True)
class Thumbnail:
    """A small JPEG of an image, aspect ratio kept."""

    jpeg: bytes
    width: int
    height: int

    def data_uri(self) -> str:
        import base64

        return "data:image/jpeg;base64," + base64.b64encode(self.jpeg).decode("ascii")


def make_thumbnail(im, size: int = THUMBNAIL_SIZE, quality: int = THUMBNAIL_QUALITY) -> Thumbnail:
    """A decoded RGB image (``open_image``) -> a JPEG whose longest side is at most ``size``.

    ``im`` is not modified: the model's input is made from it as if no thumbnail were taken."""
    import io

    Image = _pil()
    w, h = im.size
    scale = min(1.0, size / max(w, h, 1))
    tw, th = max(1, round(w * scale)), max(1, round(h * scale))
    small = im if (tw, th) == (w, h) else im.resize((tw, th), Image.Resampling.LANCZOS, reducing_gap=3.0)
    buffer = io.BytesIO()
    small.convert("RGB").save(buffer, "JPEG", quality=quality, optimize=True)
    return Thumbnail(buffer.getvalue(), tw, th)


def prepare(source, spec: ImageSpec, *, fast: bool = True, thumbnail: int | None = None):
    """Decode ``source`` and resize it to ``spec`` -> ``uint8`` array (H, W, 3),
    C-contiguous. ``fast`` lets large JPEGs decode at reduced DCT scale (draft).

    ``thumbnail=N``: return ``(array, Thumbnail)`` instead, the thumbnail (longest
    side N) made from the same decoded image, so a contact sheet costs no second
    decode; ``None`` in place of the thumbnail if it could not be made.

    Thread-safe; Pillow releases the GIL in decode and resize.
    """
    import numpy as np

    draft = (spec.width, spec.height) if (fast and spec.do_resize) else None
    im = open_image(source, draft_size=draft)
    thumb = _try_thumbnail(im, thumbnail) if thumbnail else None
    if spec.do_resize and im.size != (spec.width, spec.height):
        try:
            im = im.resize((spec.width, spec.height), resample=spec.resample)
        except Exception as e:
            raise _decode_error(e, None) from None
    arr = np.asarray(im)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:  # pragma: no cover - defensive
        raise ImageError(f"unexpected decoded image layout {arr.shape} {arr.dtype}")
    if not arr.flags.c_contiguous or not arr.flags.writeable:
        arr = np.array(arr, copy=True, order="C")
    return (arr, thumb) if thumbnail else arr


def _try_thumbnail(im, size: int) -> Thumbnail | None:
    try:
        return make_thumbnail(im, size)
    except Exception:  # noqa: BLE001 - a missing preview must not fail the image
        return None


@functools.lru_cache(maxsize=32)
def _lut_cpu(do_rescale: bool, rescale_factor: float, do_normalize: bool, mean: tuple, std: tuple):
    """float32 (3, 256) table: the reference processor's rescale + normalise of
    every uint8 value, computed with the same numpy arithmetic."""
    import numpy as np
    import torch

    v = np.arange(256, dtype=np.uint8)[None, :].repeat(3, axis=0)  # (3, 256), channel-first
    if do_rescale:
        # transformers.image_transforms.rescale: float64 multiply, then float32
        x = (v.astype(np.float64) * rescale_factor).astype(np.float32)
    else:
        x = v.astype(np.float32)
    if do_normalize:
        # transformers.image_transforms.normalize: float32 (x - mean) / std
        m = np.array(mean, dtype=np.float32)[:, None]
        s = np.array(std, dtype=np.float32)[:, None]
        x = (x - m) / s
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))


_lut_device_cache: dict = {}
_lut_device_lock = threading.Lock()


def _lut(spec: ImageSpec, device):
    key = (spec.do_rescale, float(spec.rescale_factor), spec.do_normalize, tuple(spec.mean), tuple(spec.std))
    lut = _lut_cpu(*key)
    if device.type == "cpu":
        return lut
    dkey = (key, str(device))
    cached = _lut_device_cache.get(dkey)
    if cached is None:
        with _lut_device_lock:
            cached = _lut_device_cache.get(dkey)
            if cached is None:
                cached = lut.to(device)
                _lut_device_cache[dkey] = cached
    return cached


def to_pixel_values(arrays, spec: ImageSpec, *, device="cpu", dtype=None):
    """Stack uint8 (H, W, 3) arrays into a [B, 3, H, W] float tensor, rescaled and
    normalised exactly like transformers' BlipImageProcessorPil (float32 arithmetic,
    bit-identical for the same pixels), on ``device``, cast to ``dtype`` if given.

    The uint8 batch is moved first (pinned + non_blocking for CUDA) and converted
    on the device."""
    import numpy as np
    import torch

    arrays = list(arrays)
    if not arrays:
        raise ValueError("to_pixel_values needs at least one image")
    first = arrays[0]
    for i, a in enumerate(arrays):
        if not isinstance(a, np.ndarray) or a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3:
            desc = f"{a.dtype} {a.shape}" if isinstance(a, np.ndarray) else type(a).__name__
            raise ValueError(f"image {i}: expected a uint8 (H, W, 3) array, got {desc}")
        if a.shape != first.shape:
            raise ValueError(
                f"image {i} is {a.shape[1]}x{a.shape[0]} but image 0 is {first.shape[1]}x{first.shape[0]}: "
                "a batch needs one size (resize them: ImageSpec.do_resize)"
            )
    stacked = np.stack(arrays)  # (B, H, W, 3) uint8, fresh and writable
    dev = torch.device(device)
    lut = _lut(spec, dev)  # (3, 256) float32 on dev
    if dev.type == "cpu":
        # numpy fancy indexing with uint8 indices: no index conversion, one pass
        table = lut.numpy()
        out_np = np.empty((stacked.shape[0], 3) + stacked.shape[1:3], dtype=np.float32)
        for c in range(3):
            out_np[:, c] = table[c][stacked[..., c]]
        out = torch.from_numpy(out_np)
    else:
        batch = torch.from_numpy(stacked)
        if dev.type == "cuda":
            batch = batch.pin_memory().to(dev, non_blocking=True)
        else:
            batch = batch.to(dev)
        out = _apply_lut(batch, lut)
    if dtype is not None:
        out = out.to(dtype)
    return out


def _apply_lut(batch, lut):
    """(B, H, W, 3) uint8 tensor -> (B, 3, H, W) float32 via the (3, 256) table,
    on the tensors' device (the accelerator path of ``to_pixel_values``)."""
    import torch

    offsets = torch.tensor([0, 256, 512], dtype=torch.int32, device=batch.device)
    idx = batch.permute(0, 3, 1, 2).to(torch.int32, memory_format=torch.contiguous_format)
    idx += offsets.view(1, 3, 1, 1)
    return lut.reshape(-1)[idx]  # gather -> (B, 3, H, W) float32, contiguous


def reference_pixel_values(images, image_processor):
    """The checkpoint's own transformers image processor on decoded images
    (``--preprocess reference``)."""
    return image_processor(images=list(images), return_tensors="pt").pixel_values


class ImageStage:
    """Decode/resize (``prepare``, thread-safe) and normalise on the device (``pixels``),
    with the fast path or the checkpoint's own image processor (``--preprocess reference``).

    With ``thumbnails`` (an ``html.Thumbnails``, for ``--format html``), ``prepare(source,
    key=name)`` also leaves a small JPEG of the decoded image there under ``key``,
    for the writer to take; the model's input is the same either way."""

    def __init__(self, loaded, preprocess: str = "fast", thumbnails=None):
        self.loaded = loaded
        self.reference = preprocess == "reference"
        self.spec = loaded.image_spec
        self.thumbnails = thumbnails

    def prepare(self, source, key: str | None = None):
        want = self.thumbnails is not None and key is not None
        if self.reference:
            im = open_image(source)
            if want:
                self.thumbnails.put(key, _try_thumbnail(im, self.thumbnails.size))
            return im
        if not want:
            return prepare(source, self.spec)
        arr, thumb = prepare(source, self.spec, thumbnail=self.thumbnails.size)
        self.thumbnails.put(key, thumb)
        return arr

    def pixels(self, prepared: list):
        loaded = self.loaded
        if self.reference:
            values = reference_pixel_values(prepared, loaded.processor.image_processor)
            return values.to(loaded.device, loaded.dtype)
        return to_pixel_values(prepared, self.spec, device=loaded.device, dtype=loaded.dtype)
