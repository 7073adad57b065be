"""``blip2 tiny-checkpoint``: write a tiny random BLIP-2 checkpoint for offline tests."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .common import handles_errors


@handles_errors
def tiny_checkpoint(
    out_dir: Annotated[Path, typer.Argument(metavar="DIR", help="Folder to write the checkpoint to.")],
    kind: Annotated[str, typer.Option("--kind", metavar="[opt|t5|itm]", rich_help_panel="Checkpoint", help="opt: captioning, OPT decoder; t5: captioning, Flan-T5; itm: retrieval.")] = "opt",
    seed: Annotated[int, typer.Option(metavar="N", rich_help_panel="Checkpoint", help="Seed of the random weights.")] = 0,
) -> None:
    """Write a tiny, randomly initialised BLIP-2 checkpoint (same file layout as the
    real ones) to DIR, to test a pipeline offline: blip2 caption --model DIR ...

    Its captions are meaningless strings; they are deterministic for a seed."""
    from ..errors import UsageError
    from ..testing import KINDS, build_tiny_checkpoint

    if kind not in KINDS:
        raise UsageError(f"unknown --kind {kind!r}", hint=f"use one of {', '.join(KINDS)}")
    path = build_tiny_checkpoint(out_dir, kind=kind, seed=seed)
    typer.echo(str(path))
