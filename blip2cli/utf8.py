"""Records are always valid UTF-8, and an undecodable file name can still be recovered.

A file name that is not valid UTF-8 reaches Python with its bad bytes as lone
surrogates (``surrogateescape``). Written as they are, those bytes make a JSON
Lines or CSV file that pandas, DuckDB and jq refuse whole. So every string of a
record is written with U+FFFD (``�``) in their place, and a record whose
``path`` had such bytes gets ``path_bytes``: the exact bytes of the original path,
base64-encoded. To get the file back::

    jq -j 'select(.path_bytes) | .path_bytes' out.jsonl | base64 -d     # one path
    python -c 'import base64,os,sys; print(os.fsdecode(base64.b64decode(sys.argv[1])))' BASE64

(:func:`original_path` does it for a record; ``--resume`` uses it.)
"""

from __future__ import annotations

import base64
import os

PATH_BYTES = "path_bytes"


def is_clean(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def clean(text: str) -> str:
    """``text`` with each undecodable byte (or stray surrogate) as U+FFFD."""
    if is_clean(text):
        return text
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raw = text.encode("utf-8", "surrogatepass")
    return raw.decode("utf-8", "replace")


def _dirty(value) -> bool:
    if isinstance(value, str):
        return not is_clean(value)
    if isinstance(value, dict):
        return any(_dirty(k) or _dirty(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return any(_dirty(v) for v in value)
    return False


def _cleaned(value):
    if isinstance(value, str):
        return clean(value)
    if isinstance(value, dict):
        return {clean(k) if isinstance(k, str) else k: _cleaned(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_cleaned(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_cleaned(v) for v in value)
    return value


def path_bytes(path: str) -> str:
    """The exact bytes of ``path`` (as the file system has them), base64."""
    try:
        raw = os.fsencode(path)
    except UnicodeEncodeError:
        raw = path.encode("utf-8", "surrogatepass")
    return base64.b64encode(raw).decode("ascii")


def safe_record(record: dict) -> dict:
    """``record`` itself when it is valid UTF-8; else a copy with U+FFFD in place of
    the bad bytes, and ``path_bytes`` (right after ``path``) when the path had some."""
    if not _dirty(record):
        return record
    out = {}
    for key, value in record.items():
        out[key] = _cleaned(value)
        if key == "path" and isinstance(value, str) and not is_clean(value):
            out[PATH_BYTES] = path_bytes(value)
    return out


def original_path(record: dict) -> str | None:
    """The path as the run saw it (undecodable bytes as surrogates again)."""
    raw = record.get(PATH_BYTES)
    if raw:
        return os.fsdecode(base64.b64decode(raw))
    return record.get("path")
