"""``blip2 merge DIR``: join the part files of ``--shard`` runs into one output."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .common import handles_errors


@handles_errors
def merge(
    directory: Annotated[Path, typer.Argument(metavar="DIR", help="The -o directory the shards wrote to.")],
) -> None:
    """Merge DIR/.parts/part-*.jsonl into DIR/captions.jsonl (answers.jsonl, embeddings.jsonl):
    input order, each input once (a success beats an earlier error), written atomically.
    Exit 1 when some inputs have no record yet (say which shards to rerun)."""
    from .. import console
    from ..errors import EXIT_ITEMS_FAILED, UsageError
    from ..parts import RECORD_KEYS, PartsDir

    if not directory.is_dir():
        raise UsageError(f"{directory} is not a directory", hint="pass the -o directory of the shard runs")
    command = PartsDir(directory, "caption").read_command()
    parts = PartsDir(directory, command)
    written, missing = parts.merge(RECORD_KEYS.get(command, RECORD_KEYS["caption"]))
    console.message(f"merged {written} records from {len(parts.part_files())} part files into {parts.final}")
    if missing:
        names = parts.read_inputs()
        console.message(f"{len(missing)} of {len(names)} inputs have no record yet (first: {missing[0]})")
        console.message("rerun the shards that did not finish (same command); done inputs are skipped")
        raise typer.Exit(EXIT_ITEMS_FAILED)
