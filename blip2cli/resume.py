"""``--resume``: carry on from a JSON Lines output an earlier run left behind.

An input is done when the file holds a successful record for it written with
the same settings (model, revision, dtype, quantization, preprocessing and
generation options). On resume:

* a torn last line (a process killed mid-write) is cut off, and that input redone;
* error records are dropped and their inputs retried (the file is rewritten
  atomically without them), so every input appears exactly once at the end;
* a file written with other settings is refused, with the differences named:
  mixing them would make the output lie about how each record was made.

The settings compared are every key of the run's settings dict (whatever the
command records: model, revision, dtype, quantization, preprocessing,
generation options, ask's template, embed's features and pool, ...), not a
list kept here: a setting added to a command is compared without touching this
module. A setting missing from a record, or one a record has that this run does
not, is a difference too. Everything in a record that is not a result field
(``record_fields()``) counts as a setting.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

from .errors import UsageError
from .fsutil import atomic_write

_MISSING = object()


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
            raise UsageError(
                f"{path} line {number} is not a blip2 record (no \"path\")",
                hint="resume into the file an earlier blip2 run wrote, or choose another -o",
            )
        diff = differences(record, settings)
        if diff:
            raise UsageError(
                f"{path} was written with other settings (line {number}: {'; '.join(diff)}); "
                "resuming would mix them",
                hint="run with the same options as before, or write to a new file",
            )
        if record.get("error"):
            state.retried += 1
            continue
        if record.get("path_bytes"):  # a path that is not UTF-8, as the run saw it (blip2cli.utf8)
            from .utf8 import original_path

            record["path"] = original_path(record)
        key = key_of(record)
        if key in state.done:
            continue  # an earlier duplicate: keep the first
        state.done.add(key)
        keep.append(raw)
    state.kept = len(keep)
    if state.torn or state.retried or len(keep) != sum(1 for l in lines if l.strip()):
        _rewrite(path, keep)
    return state


def record_fields() -> frozenset:
    """The keys of a record that are results, not settings: those of every task's
    record (taken from the record functions themselves) and the sidecar path."""
    global _FIELDS
    if _FIELDS is None:
        from .ask import answer_record
        from .caption import caption_record
        from .embed import image_record

        _FIELDS = frozenset(
            {*caption_record("", None, None), *answer_record("", "", None, None), *image_record("", None, None),
             "sidecar", "path_bytes", "shard", "key", "carry_error"}
        )
    return _FIELDS


_FIELDS: frozenset | None = None


def plain(value):
    """A value as it reads back from JSON (tuples become lists, str enums strings)."""
    return json.loads(json.dumps(value, ensure_ascii=False))


def settings_of(record: dict) -> dict:
    """The settings a record carries: everything that is not a result field."""
    fields = record_fields() | set(record.get("carry") or ())  # --carry: members of a shard's sample
    return {k: v for k, v in record.items() if k not in fields}


def differences(record: dict, settings: dict, *, then: str = "then", now: str = "now") -> list[str]:
    """Each setting where ``record`` (written earlier) and ``settings`` (this run) differ.

    Every key of ``settings`` is compared; a key the record lacks, or a setting
    the record has that ``settings`` lacks, is a difference. Nested dicts (the
    generation options) are compared key by key."""
    settings = plain(settings)
    out = []
    for key in sorted(settings):
        new = settings[key]
        old = record.get(key, _MISSING)
        if old is _MISSING:
            out.append(f"{key}: not recorded {then}, {_show(new)} {now}")
        elif isinstance(old, dict) and isinstance(new, dict):
            old = _renamed(old, new)
            for k in sorted(set(old) | set(new)):
                if old.get(k) != new.get(k):
                    out.append(f"{key}.{k}: {_show(old.get(k))} {then}, {_show(new.get(k))} {now}")
        elif old != new:
            out.append(f"{key}: {_show(old)} {then}, {_show(new)} {now}")
    for key in sorted(set(settings_of(record)) - set(settings)):
        out.append(f"{key}: {_show(record[key])} {then}, not set {now}")
    return out


# Nested settings renamed since files were written: (then, now). Ask records said
# generation.num_captions before they said num_answers, as the option does.
_RENAMED = (("num_captions", "num_answers"),)


def _renamed(old: dict, new: dict) -> dict:
    """``old`` with its keys under their current names, where ``new`` uses those."""
    for then, now in _RENAMED:
        if now in new and then in old and now not in old:
            old = {(now if k == then else k): v for k, v in old.items()}
    return old


def _show(value) -> str:
    return "unset" if value is None else repr(value)


def _rewrite(path: str, lines: list[bytes]) -> None:
    atomic_write(path, b"".join(line + b"\n" for line in lines), fsync=True)
