"""The image stage for BLIP-2: decode + resize on CPU threads, normalise on the device.

The stages live in their own modules (import their names from there); this one
puts them together:

* :mod:`blip2cli.decode` -- the safe decode (``open_image``, ``read_image_file``,
  :class:`ImageError`, the decode budget ``MAX_DECODE_BYTES``);
* :mod:`blip2cli.imagespec` -- the checkpoint's image processor as values
  (:class:`ImageSpec`);
* :mod:`blip2cli.pixels` -- the tensor path (``to_pixel_values``, its lookup
  table, ``reference_pixel_values``);
* here: ``prepare`` (decode + resize to ``uint8`` HxWx3, the CPU part, safe in a
  thread pool: Pillow releases the GIL while decoding and resampling), contact-sheet
  thumbnails made from the same decode, and :class:`ImageStage`, which the tasks use.

The arithmetic reproduces transformers' ``BlipImageProcessorPil`` exactly:

1. ``convert_to_rgb`` (alpha composited on white), ``PIL.Image.resize`` of the
   **uint8** RGB image to (height, width) with the configured filter
   (bicubic for BLIP/BLIP-2), ``reducing_gap=None``;
2. rescale: ``(uint8.astype(float64) * rescale_factor).astype(float32)``;
3. normalise in float32: ``(x - float32(mean)) / float32(std)``.

Nothing heavy is imported at module import time (``blip2 --help`` must stay
instant): Pillow, numpy and torch are imported inside the functions.
"""

from __future__ import annotations

from dataclasses import dataclass

from .decode import ImageError, decode_error, open_image, pil
from .imagespec import ImageSpec
from .pixels import reference_pixel_values, to_pixel_values

__all__ = ["ImageStage", "Thumbnail", "make_thumbnail", "prepare"]


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

    Image = pil()
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
            raise decode_error(e, None) from None
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
