"""A task's columns: how its records flatten into CSV and text lines.

A low module (it imports nothing of blip2cli): the tasks (caption, ask, embed) declare
their schema here and the writers read it, without either importing the other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence


@dataclass(frozen=True)
class Schema:
    """How a task's records flatten into columns."""

    columns: Sequence[str]  # CSV header
    row: Callable[[dict], list]  # record -> CSV row (same length as columns)
    text: Callable[[dict], list]  # record -> fields of a text line (tab-joined)
    # Parquet: the types of extra columns known before the first record ("string", "int64",
    # "float64", "bool"; carried columns); the others are typed from the first row group.
    types: Mapping[str, str] = field(default_factory=dict)
