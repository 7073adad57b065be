"""JPEG decode on the GPU (nvJPEG through ``torchvision.io.decode_jpeg(device="cuda")``).

A drop-in for ``images.ImageStage`` (same ``prepare(source, key=None)`` /
``pixels(prepared)`` contract), chosen with ``--decode gpu|cpu|auto``:

* ``prepare`` (a worker thread) reads the file's bytes and looks at the JPEG header
  with Pillow, without decoding a pixel. A plain JPEG (baseline, YCbCr or greyscale,
  complete: ends with the EOI marker, within the decode-size limit) is kept as bytes
  for the GPU; anything else -- PNG, WebP, CMYK/YCCK, progressive, MPO, a file with
  data after EOI, a header Pillow refuses, a source that is not a regular file --
  takes the CPU path unchanged (``images.prepare``: Pillow, draft mode for large
  JPEGs), so its pixels and its error messages are exactly the CPU path's.
* ``pixels`` (the main thread) decodes the batch's JPEGs in one nvJPEG call, applies
  EXIF orientation on the device (flips/rotations, ``PIL.ImageOps.exif_transpose``'s
  meaning), resizes to the checkpoint's ``ImageSpec`` with ``torch.nn.functional
  .interpolate(antialias=True)`` (bicubic or bilinear: the filters whose antialiased
  torch kernels follow Pillow's, a=-0.5 for bicubic), rounds to uint8 like Pillow,
  then rescales and normalises with the same lookup table as the CPU path
  (``pixels.apply_lut``).

Not bit-identical to Pillow: nvJPEG's chroma upsampling and IDCT differ from
libjpeg's, the resize runs in float32 (Pillow rounds to uint8 between its two
passes), and large JPEGs are decoded at full size (the CPU path's draft decodes
them at 1/2-1/8 scale first). ``benchmarks/gpu_decode.py`` measures the difference
(max / mean absolute pixel difference against both CPU variants) on the device.

Nothing heavy is imported at module import.
"""

from __future__ import annotations

import io
import os
import stat
import threading
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

__all__ = ["DECODE_CHOICES", "GpuImageStage", "JpegBytes", "available", "choose", "inspect_jpeg",
           "orient", "resize_uint8", "unavailable_reason", "nvjpeg_decoder", "pillow_decoder"]

DECODE_CHOICES = ("auto", "gpu", "cpu")
# Filters with an antialiased torch kernel that follows Pillow's (PIL numbering).
_TORCH_FILTERS = {2: "bilinear", 3: "bicubic"}
# A file larger than this is not read for the GPU (the CPU path refuses or decodes it).
_MAX_FILE_BYTES = 64 * 2**20
# Float pixels resized in one interpolate call (same-size images grouped up to this).
_RESIZE_CHUNK_PIXELS = 64_000_000
_EOI = b"\xff\xd9"

# A decoder turns a list of JPEG byte strings into (3, H, W) uint8 tensors on the
# device, in stored orientation (EXIF not applied).
Decoder = Callable[[list, Any], list]


@dataclass(frozen=True)
class JpegBytes:
    """A JPEG left for the GPU: its bytes, stored size and EXIF orientation (1-8)."""

    data: bytes
    width: int
    height: int
    orientation: int = 1


# -- availability ------------------------------------------------------------------
_reason_cache: dict[str, str | None] = {}
_reason_lock = threading.Lock()


def unavailable_reason(device) -> str | None:
    """Why the GPU decode cannot run for a model on ``device``; None when it can."""
    dev_type = getattr(device, "type", str(device).split(":")[0])
    if dev_type != "cuda":
        return f"the model runs on {device}, not on a CUDA GPU"
    with _reason_lock:
        if "cuda" not in _reason_cache:
            _reason_cache["cuda"] = _probe()
        return _reason_cache["cuda"]


def _probe() -> str | None:
    try:
        import torch
    except Exception as exc:  # pragma: no cover - torch is a dependency
        return f"torch does not import ({exc})"
    if not torch.cuda.is_available():
        return "CUDA is not available to torch"
    try:
        from torchvision.io import decode_jpeg  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - not installed, or built for another torch
        return f"torchvision is not importable here ({type(exc).__name__}: {exc})".splitlines()[0]
    return None


def available(device) -> bool:
    return unavailable_reason(device) is None


def choose(decode: str, device) -> bool:
    """``--decode``: True to decode JPEGs on the GPU. ``gpu`` when it cannot run is a
    UsageError saying why; ``auto`` takes the GPU when it can; ``cpu`` never."""
    from .errors import UsageError

    if decode not in DECODE_CHOICES:
        raise UsageError(f"decode={decode!r}: use one of {', '.join(DECODE_CHOICES)}", params=["decode"])
    if decode == "cpu":
        return False
    why = unavailable_reason(device)
    if decode == "gpu" and why is not None:
        raise UsageError(f"decode='gpu': {why}", hint="use decode='auto' (GPU when it can) or 'cpu'", params=["decode"])
    return why is None


# -- decoders ----------------------------------------------------------------------
def nvjpeg_decoder(datas: list, device) -> list:
    """torchvision's nvJPEG batch decode: (3, H, W) uint8 on ``device``, EXIF not applied."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
    out = decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device)
    return list(out) if isinstance(out, (list, tuple)) else [out]


def pillow_decoder(datas: list, device) -> list:
    """A stand-in with nvjpeg_decoder's contract, by Pillow (full size, no draft, EXIF not
    applied): the GPU path's orientation and resize logic runs on any machine with it."""
    import numpy as np
    import torch
    from PIL import Image

    out = []
    for d in datas:
        with Image.open(io.BytesIO(d)) as im:
            arr = np.asarray(im.convert("RGB"))
        out.append(torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))).to(device))
    return out


# -- header -------------------------------------------------------------------------
def inspect_jpeg(data: bytes) -> tuple[JpegBytes | None, str | None]:
    """``(JpegBytes, None)`` for a JPEG the GPU path takes, else ``(None, reason)``."""
    from . import decode

    try:
        im = decode.open_header(io.BytesIO(data))
    except Exception:  # noqa: BLE001 - the CPU path says what is wrong with it
        return None, "header not readable"
    with im:
        if im.format != "JPEG":
            return None, f"not a plain JPEG ({im.format})"
        if im.mode not in ("RGB", "L"):
            return None, f"colour mode {im.mode}"
        if im.info.get("progressive") or im.info.get("progression"):
            return None, "progressive JPEG"
        if not data.rstrip(b"\x00").endswith(_EOI):
            return None, "no end-of-image marker (truncated, or data after it)"
        w, h = im.size
        limit = decode.MAX_DECODE_BYTES
        if limit is not None and w * h * 4 > limit:
            return None, "over the decode-size limit"
        return JpegBytes(data, w, h, decode.orientation(im)), None


def _read(source) -> bytes | None:
    """The bytes of a regular file (or bytes given), else None (the CPU path decides)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source) or None
    if not isinstance(source, (str, os.PathLike)):
        return None
    try:
        with open(source, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode) or st.st_size > _MAX_FILE_BYTES:
                return None
            data = f.read(_MAX_FILE_BYTES + 1)
    except OSError:
        return None
    return data if 0 < len(data) <= _MAX_FILE_BYTES else None


# -- device arithmetic -------------------------------------------------------------
def orient(t, orientation: int):
    """EXIF orientation on a (C, H, W) tensor, as ``PIL.ImageOps.exif_transpose``."""
    import torch

    if orientation == 2:
        return t.flip(-1)
    if orientation == 3:
        return t.flip(-1).flip(-2)
    if orientation == 4:
        return t.flip(-2)
    if orientation == 5:  # TRANSPOSE
        return t.transpose(-1, -2)
    if orientation == 6:  # ROTATE_270 (90 degrees clockwise)
        return torch.rot90(t, k=-1, dims=(-2, -1))
    if orientation == 7:  # TRANSVERSE
        return t.transpose(-1, -2).flip(-1).flip(-2)
    if orientation == 8:  # ROTATE_90 (counter-clockwise)
        return torch.rot90(t, k=1, dims=(-2, -1))
    return t


def resize_uint8(batch, width: int, height: int, resample: int):
    """(B, 3, H, W) uint8 -> (B, 3, height, width) uint8, antialiased like Pillow's resize."""
    import torch
    import torch.nn.functional as F

    if batch.shape[-2:] == (height, width):
        return batch
    mode = _TORCH_FILTERS[resample]
    y = F.interpolate(batch.float(), size=(height, width), mode=mode, antialias=True, align_corners=False)
    return y.round_().clamp_(0, 255).to(torch.uint8)


# -- the stage -----------------------------------------------------------------------
class GpuImageStage:
    """``ImageStage``'s contract with JPEGs decoded on the GPU (see the module text).

    ``counts`` says how many images each path took (``gpu``, ``cpu``) and
    ``fallbacks`` why the CPU one was taken."""

    def __init__(self, loaded, decoder: Decoder | None = None):
        self.loaded = loaded
        self.spec = loaded.image_spec
        self.device = loaded.device
        self.decoder = decoder or nvjpeg_decoder
        self.counts: Counter = Counter()
        self.fallbacks: Counter = Counter()
        self._lock = threading.Lock()
        spec = self.spec
        self._why_not = None
        if not spec.do_resize:
            self._why_not = "the checkpoint does not resize"
        elif spec.resample not in _TORCH_FILTERS:
            self._why_not = f"resample filter {spec.resample} has no matching GPU kernel"

    def _count(self, path: str, reason: str | None = None) -> None:
        with self._lock:
            self.counts[path] += 1
            if reason:
                self.fallbacks[reason] += 1

    def prepare(self, source, key: str | None = None):
        from .images import prepare

        reason = self._why_not
        if reason is None:
            data = _read(source)
            if data is None:
                reason = "not a readable regular file"
            else:
                info, reason = inspect_jpeg(data)
                if info is not None:
                    self._count("gpu")
                    return info
        self._count("cpu", reason)
        return prepare(source, self.spec)

    def _decode(self, items: list) -> list:
        try:
            return self.decoder([j.data for j in items], self.device)
        except Exception:  # noqa: BLE001 - one bad file: decode one by one below
            pass
        out = []
        for j in items:
            try:
                out.append(self.decoder([j.data], self.device)[0])
            except Exception:  # noqa: BLE001 - Pillow decodes it or says why (ImageError)
                out.append(self._pillow_full(j))
        return out

    def _pillow_full(self, j: JpegBytes):
        import torch

        from .images import prepare

        arr = prepare(j.data, self.spec)  # already upright and resized
        return ("ready", torch.from_numpy(arr).permute(2, 0, 1).to(self.device))

    def uint8_batch(self, prepared: list):
        """(B, 3, H, W) uint8 on the device, upright and resized, in ``prepared``'s order."""
        import numpy as np
        import torch

        spec = self.spec
        out: list = [None] * len(prepared)
        jpeg_idx = [i for i, p in enumerate(prepared) if isinstance(p, JpegBytes)]
        for i, p in enumerate(prepared):
            if not isinstance(p, JpegBytes):
                if not isinstance(p, np.ndarray):
                    raise TypeError(f"prepared item {i}: expected JpegBytes or a uint8 array, got {type(p).__name__}")
                t = torch.from_numpy(p).permute(2, 0, 1)
                out[i] = t.pin_memory().to(self.device, non_blocking=True) if self.device.type == "cuda" \
                    else t.to(self.device)
        if jpeg_idx:
            decoded = self._decode([prepared[i] for i in jpeg_idx])
            groups: dict = {}
            for i, t in zip(jpeg_idx, decoded):
                if isinstance(t, tuple):  # the Pillow fallback: already final
                    out[i] = t[1]
                    continue
                t = orient(t, prepared[i].orientation)
                groups.setdefault(tuple(t.shape), []).append((i, t))
            for shape, members in groups.items():
                per = max(1, _RESIZE_CHUNK_PIXELS // max(1, shape[1] * shape[2]))
                for k in range(0, len(members), per):
                    chunk = members[k:k + per]
                    resized = resize_uint8(torch.stack([t for _, t in chunk]), spec.width, spec.height,
                                           spec.resample)
                    for (i, _), r in zip(chunk, resized):
                        out[i] = r
        return torch.stack(out)

    def pixels(self, prepared: list):
        from .pixels import apply_lut, lut

        batch = self.uint8_batch(prepared)  # (B, 3, H, W)
        table = lut(self.spec, self.device)
        values = apply_lut(batch.permute(0, 2, 3, 1), table)  # apply_lut takes (B, H, W, 3)
        return values.to(self.loaded.dtype)

    def describe(self) -> str:
        why = ", ".join(f"{n} {r}" for r, n in self.fallbacks.most_common())
        return f"decoded on the GPU: {self.counts['gpu']}, on the CPU: {self.counts['cpu']}" + \
            (f" ({why})" if why else "")
