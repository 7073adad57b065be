"""The tensor path: decoded ``uint8`` HxWx3 arrays -> the model's ``pixel_values``.

``to_pixel_values`` stacks a batch and does rescale + normalise on the target
device, moving ``uint8`` (4x less data than float32) before converting. Rescale
and normalise are a per-channel function of the uint8 value, so they are a 3x256
lookup table computed with transformers' own numpy arithmetic (``lut``): the
result is bit-identical to ``BlipImageProcessorPil`` for the same decoded pixels,
on any device. ``reference_pixel_values`` runs the checkpoint's own processor
(``preprocess="reference"``).
"""

from __future__ import annotations

import functools
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .imagespec import ImageSpec

__all__ = ["reference_pixel_values", "to_pixel_values"]


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


def lut(spec: ImageSpec, device):
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
    lookup = lut(spec, dev)  # (3, 256) float32 on dev
    if dev.type == "cpu":
        # numpy fancy indexing with uint8 indices: no index conversion, one pass
        table = lookup.numpy()
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
        out = apply_lut(batch, lookup)
    if dtype is not None:
        out = out.to(dtype)
    return out


def apply_lut(batch, lut):
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
