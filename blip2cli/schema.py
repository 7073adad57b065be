"""How a task's records flatten into CSV and text columns: a :class:`Schema`.

Its own small module, below both the tasks that declare their schema (``caption``,
``ask``, ``embed``) and the writers that use it, so neither imports the other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence


@dataclass(frozen=True)
class Schema:
    """How a task's records flatten into columns."""

    columns: Sequence[str]  # CSV header
    row: Callable[[dict], list]  # record -> CSV row (same length as columns)
    text: Callable[[dict], list]  # record -> fields of a text line (tab-joined)
