"""Names of inputs: brace ranges (``shards/{00000..00999}.tar``) and shard suffixes.

A low module (it imports nothing of blip2cli at import time): the input resolver
(``sources``) expands and classifies names with it, the WebDataset reader names its
outputs with it, and neither imports the other for that.
"""

from __future__ import annotations

import re

SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")


def is_shard_path(path: str) -> bool:
    return path.lower().endswith(SHARD_SUFFIXES)


# -- brace ranges ---------------------------------------------------------------
_BRACE = re.compile(r"\{([^{}]*)\}")


def has_braces(text: str) -> bool:
    m = _BRACE.search(text)
    return m is not None and (".." in m.group(1) or "," in m.group(1))


def expand_braces(text: str) -> list[str]:
    """``a{00..02}.tar`` -> ``a00.tar a01.tar a02.tar``; ``{x,y}`` -> ``x y``; several groups
    multiply, left to right. A numeric range keeps the zero padding of its bounds (the
    wider of the two); a group that is neither (``{}``, ``{a..b}``) is kept as it is."""
    for m in _BRACE.finditer(text):
        body = m.group(1)
        head, tail = text[: m.start()], text[m.end():]
        r = re.fullmatch(r"(-?\d+)\.\.(-?\d+)", body)
        if r:
            a, b = r.group(1), r.group(2)
            lo, hi = int(a), int(b)
            width = max(len(a), len(b)) if (a.lstrip("-").startswith("0") or b.lstrip("-").startswith("0")) else 0
            step = 1 if hi >= lo else -1
            if abs(hi - lo) > 10_000_000:
                from .errors import UsageError

                raise UsageError(f"the brace range {{{body}}} is too large (more than 10,000,000 names)")
            values = [str(n).zfill(width) for n in range(lo, hi + step, step)]
        elif "," in body:
            values = body.split(",")
        else:
            continue
        out: list[str] = []
        rests = expand_braces(tail)
        for v in values:  # as bash: the first group varies slowest
            out.extend(head + v + rest for rest in rests)
        return out
    return [text]


# -- samples ------------------------------------------------------------------
