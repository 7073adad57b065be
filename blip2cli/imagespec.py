"""The checkpoint's image processor as plain values (:class:`ImageSpec`): size,
resample filter, rescale factor, mean and std, read from its
``preprocessor_config.json`` (or a processor's dict) with transformers' defaults
for what it leaves out. No Pillow, numpy or torch.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["BLIP_DEFAULT_SIZE", "CLIP_MEAN", "CLIP_STD", "ImageSpec"]

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
