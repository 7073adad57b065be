"""Every closed set of choices, declared once.

The core checks values against these (``names(Dtype)``); ``options.py`` hands
the same ``str`` enums to Typer, so ``--dtype``'s choices, the loader's check
and the library's check cannot drift apart. Importing this module is free
(``enum`` only).
"""

from __future__ import annotations

from enum import Enum


class Dtype(str, Enum):
    """Weights dtype of the loader (``auto``: float16 on GPUs for OPT, bfloat16 for Flan-T5, float32 on the CPU)."""

    auto = "auto"
    float32 = "float32"
    float16 = "float16"
    bfloat16 = "bfloat16"


class Quantize(str, Enum):
    """Quantization of the language model: 8bit/4bit through bitsandbytes, int8 (weight-only) through torchao."""

    none = "none"
    q8 = "8bit"
    q4 = "4bit"
    int8 = "int8"


class Format(str, Enum):
    """Record formats (``writers.WRITERS`` has one writer per member)."""

    text = "text"
    jsonl = "jsonl"
    csv = "csv"
    html = "html"
    parquet = "parquet"


class Preprocess(str, Enum):
    """fast: our decode + resize; reference: the checkpoint's transformers image processor."""

    fast = "fast"
    reference = "reference"


class Features(str, Enum):
    """Which vectors ``embed`` makes (``auto``: itc on a retrieval checkpoint, qformer otherwise)."""

    auto = "auto"
    itc = "itc"
    vision = "vision"
    qformer = "qformer"


class Pool(str, Enum):
    """none: every query embedding per image; mean: their mean, one vector per image."""

    none = "none"
    mean = "mean"


class EmbedFormat(str, Enum):
    """The record formats of ``embed`` (vectors have no text or html form)."""

    jsonl = "jsonl"
    csv = "csv"
    parquet = "parquet"


class ExportLayout(str, Enum):
    """What ``blip2 export`` writes from a vector store."""

    clip_retrieval = "clip-retrieval"
    npy = "npy"
    safetensors = "safetensors"


class StoreDtype(str, Enum):
    """The dtype of a vector store's matrix."""

    float32 = "float32"
    float16 = "float16"


def names(enum: type[Enum]) -> tuple[str, ...]:
    """The values of a choice, in order: ``names(Dtype) == ("auto", "float32", ...)``."""
    return tuple(member.value for member in enum)


__all__ = ["Dtype", "EmbedFormat", "Features", "Format", "Pool", "Preprocess", "Quantize", "StoreDtype",
           "ExportLayout", "names"]
