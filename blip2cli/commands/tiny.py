"""``blip2 tiny-checkpoint``: write a tiny random BLIP-2 checkpoint for offline tests."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .common import handles_errors


@handles_errors
def tiny_checkpoint(
    out_dir: Annotated[Path, typer.Argument(help="Folder to write the checkpoint to.")],
    kind: Annotated[str, typer.Option("--kind", help="opt | t5 | itm")] = "opt",
    seed: Annotated[int, typer.Option(help="Seed of the random weights.")] = 0,
) -> None:
    """Write a tiny, randomly initialised BLIP-2 checkpoint (same file layout as the
    real ones) to OUT_DIR, to test a pipeline offline: blip2 caption --model OUT_DIR ...

    Its captions are meaningless strings; they are deterministic for a seed."""
    from ..errors import UsageError
    from ..testing import KINDS, build_tiny_checkpoint

    if kind not in KINDS:
        raise UsageError(f"unknown --kind {kind!r}", hint=f"use one of {', '.join(KINDS)}")
    path = build_tiny_checkpoint(out_dir, kind=kind, seed=seed)
    typer.echo(str(path))
