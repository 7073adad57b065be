"""The Typer app: parses arguments and hands over to the commands.

Kept light on purpose: torch and transformers are imported only inside the
commands that run a model, so ``blip2 --help`` and shell completion are instant.
"""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from . import __version__
from .commands import ask as ask_cmd
from .commands import bench as bench_cmd
from .commands import caption as caption_cmd
from .commands import merge as merge_cmd
from .commands import embed as embed_cmd
from .commands import score as score_cmd
from .commands import search as search_cmd
from .commands import sheet as sheet_cmd
from .commands import chat as chat_cmd
from .commands import tiny as tiny_cmd

app = typer.Typer(
    name="blip2",
    help="Salesforce BLIP-2 vision-language models at a shell prompt.\n\n"
    "Data goes to stdout (text, JSON Lines, CSV or an HTML contact sheet), messages and progress to stderr.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"blip2 {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        Optional[bool],
        typer.Option("--version", "-V", callback=_version, is_eager=True, help="Show the version and exit."),
    ] = None,
) -> None:
    """Salesforce BLIP-2 vision-language models at a shell prompt."""


app.command("caption", no_args_is_help=False)(caption_cmd.caption)
app.command("embed", no_args_is_help=False)(embed_cmd.embed)
app.command("search", no_args_is_help=False)(search_cmd.search)
app.command("score")(score_cmd.score)
app.command("ask", no_args_is_help=False)(ask_cmd.ask)
app.command("chat")(chat_cmd.chat)
app.command("bench")(bench_cmd.bench)
app.command("merge")(merge_cmd.merge)
app.command("sheet")(sheet_cmd.sheet)
app.command("tiny-checkpoint")(tiny_cmd.tiny_checkpoint)


def main() -> None:
    app(prog_name="blip2")


if __name__ == "__main__":  # pragma: no cover
    main()
