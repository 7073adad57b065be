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
    A DIR of per-shard outputs (-o DIR/ with tar or Parquet inputs) is merged the same way,
    shard by shard. Exit 1, writing nothing, when some inputs or shards have no record yet."""
    from .. import console
    from ..errors import EXIT_ITEMS_FAILED, UsageError
    from ..parts import RECORD_KEYS, PartsDir

    if not directory.is_dir():
        raise UsageError(f"{directory} is not a directory", hint="pass the -o directory of the shard runs")
    from ..parts import merge_shard_outputs, shard_outputs_dir

    if shard_outputs_dir(directory):  # -o DIR/ with tar or Parquet inputs: one output per shard file
        final, written, missing = merge_shard_outputs(directory)
        if missing:
            console.message(f"{len(missing)} shards have no output yet (first: {missing[0]}); "
                            f"nothing written to {final}")
            console.message("rerun the same command (with the same --shard I/N) to finish them")
            raise typer.Exit(EXIT_ITEMS_FAILED)
        console.message(f"merged {written} records from the shard outputs into {final}")
        return
    command = PartsDir(directory, "caption").read_command()
    parts = PartsDir(directory, command)
    written, missing = parts.merge(RECORD_KEYS.get(command, RECORD_KEYS["caption"]))
    if not missing:
        console.message(f"merged {written} records from {len(parts.part_files())} part files into {parts.final}")
    if missing:
        names = parts.read_inputs()
        console.message(f"{len(missing)} of {len(names)} inputs have no record yet (first: {missing[0]}); "
                        f"nothing written to {parts.final}")
        console.message("rerun the shards that did not finish (same command); done inputs are skipped")
        raise typer.Exit(EXIT_ITEMS_FAILED)
