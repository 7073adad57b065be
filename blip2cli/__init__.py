"""blip2: Salesforce BLIP-2 vision-language models at a shell prompt, and as a Python library.

    import blip2cli
    model = blip2cli.load("Salesforce/blip2-opt-2.7b")
    model.caption("photo.jpg")

Nothing heavy is imported here: ``blip2 --help`` and shell completion must stay
instant, so torch, transformers and Pillow are imported inside the functions that
need them, and the library's names (``load``, ``Model``, ``caption_files``, the
errors) are resolved on first use (module ``__getattr__``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the submodule that defines it
_EXPORTS = {
    "load": "api",
    "Model": "api",
    "Chat": "api",
    "ImageInput": "api",
    "caption_files": "api",
    "ask_files": "api",
    "record_schema": "api",
    "quiet": "api",
    "GenerationOptions": "caption",
    "ImageError": "decode",
    "Blip2Error": "errors",
    "ModelError": "errors",
    "DeviceError": "errors",
    "OptionError": "errors",
}

__all__ = ["__version__", *_EXPORTS]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time, __getattr__ below
    from .api import Chat, ImageInput, Model, ask_files, caption_files, load, quiet, record_schema
    from .caption import GenerationOptions
    from .decode import ImageError
    from .errors import Blip2Error, DeviceError, ModelError, OptionError


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # resolved once
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
