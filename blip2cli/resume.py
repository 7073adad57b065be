"""``--resume``: carry on from a JSON Lines output an earlier run left behind.

An input is done when the file holds a successful record for it written with
the same settings (model, revision, dtype, quantization, preprocessing and
generation options). On resume:

* a torn last line (a process killed mid-write) is cut off, and that input redone;
* error records are dropped and their inputs retried (the file is rewritten
  atomically without them), so every input appears exactly once at the end;
* a file written with other settings is refused, with the differences named:
  mixing them would make the output lie about how each record was made.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

from .errors import UsageError
from .fsutil import atomic_write

SETTINGS_KEYS = ("model", "revision", "dtype", "quantize", "preprocess", "generation")


@dataclass
class ResumeState:
    done: set = field(default_factory=set)
    kept: int = 0
    retried: int = 0
    torn: bool = False

    def pending(self, items: Iterable, keys_of: Callable) -> Iterator:
        """Items with at least one key not yet done."""
        for item in items:
            if not all(k in self.done for k in keys_of(item)):
                yield item


def load_resume(path: str, settings: dict, key_of: Callable[[dict], object]) -> ResumeState:
    state = ResumeState()
    if not os.path.exists(path):
        return state
    with open(path, "rb") as fh:
        data = fh.read()
    lines = data.split(b"\n")
    tail = lines.pop()  # after the last newline: b"" when the file ends cleanly
    if tail.strip():
        state.torn = True
    keep: list[bytes] = []
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw.decode("utf-8", "surrogateescape"))
        except ValueError:
            if number == len(lines) and not tail:
                state.torn = True  # a last line cut short exactly at a newline boundary
                continue
            raise UsageError(
                f"{path} line {number} is not JSON: this is not a blip2 JSON Lines output",
                hint="resume into the file an earlier blip2 run wrote, or choose another -o",
            ) from None
        if not isinstance(record, dict) or "path" not in record:
            raise UsageError(f"{path} line {number} is not a blip2 record")
        diff = _differences(record, settings)
        if diff:
            raise UsageError(
                f"{path} was written with other settings ({diff}); resuming would mix them",
                hint="run with the same options as before, or write to a new file",
            )
        if record.get("error"):
            state.retried += 1
            continue
        key = key_of(record)
        if key in state.done:
            continue  # an earlier duplicate: keep the first
        state.done.add(key)
        keep.append(raw)
    state.kept = len(keep)
    if state.torn or state.retried or len(keep) != sum(1 for l in lines if l.strip()):
        _rewrite(path, keep)
    return state


def _differences(record: dict, settings: dict) -> str:
    out = []
    for key in SETTINGS_KEYS:
        if key in settings and record.get(key) != settings[key]:
            if isinstance(settings[key], dict) and isinstance(record.get(key), dict):
                old, new = record[key], settings[key]
                for k in sorted(set(old) | set(new)):
                    if old.get(k) != new.get(k):
                        out.append(f"{k}: {old.get(k)!r} then, {new.get(k)!r} now")
            else:
                out.append(f"{key}: {record.get(key)!r} then, {settings[key]!r} now")
    return "; ".join(out)


def _rewrite(path: str, lines: list[bytes]) -> None:
    atomic_write(path, b"".join(line + b"\n" for line in lines), fsync=True)
