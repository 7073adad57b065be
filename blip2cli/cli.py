"""The Typer app: parses arguments and hands over to the commands.

Kept light on purpose: torch and transformers are imported only inside the
commands that run a model, so ``blip2 --help`` and shell completion are instant.
"""

from __future__ import annotations

import os
import sys
from typing import Annotated, Optional

import typer
from typer import _click as click
from typer.core import TyperCommand

from . import __version__
from .commands import ask as ask_cmd
from .commands import bench as bench_cmd
from .commands import caption as caption_cmd
from .commands import merge as merge_cmd
from .commands import export as export_cmd
from .commands import embed as embed_cmd
from .commands import score as score_cmd
from .commands import search as search_cmd
from .commands import serve as serve_cmd
from .commands import sheet as sheet_cmd
from .commands import chat as chat_cmd
from .commands import tiny as tiny_cmd

from . import options as o


class Command(TyperCommand):
    """Plain-text help in sections: each option's ``rich_help_panel`` names its
    section (Inputs, Model, Generation, ...), and the usage line writes the
    arguments as click does (``IMAGE``, ``[IMAGES]...``), from their metavars."""

    FIRST = (o.INPUT,)
    LAST = (o.LOADER, o.GENERATION, o.OUTPUT, o.SIDECARS, o.FAULTS, o.PERFORMANCE)
    OTHER = "Options"  # --help, and any option without a section

    def collect_usage_pieces(self, ctx: click.Context) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        pieces += [usage_name(p) for p in self.get_params(ctx) if p.param_type_name == "argument"]
        return pieces

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        arguments: list = []
        panels: dict = {}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is None:
                continue
            if param.param_type_name == "argument":
                arguments.append((usage_name(param).replace("[", "").replace("]", ""), record[1]))
            else:
                panels.setdefault(getattr(param, "rich_help_panel", None) or self.OTHER, []).append(record)
        if arguments:
            with formatter.section("Arguments"):
                formatter.write_dl(arguments)
        own = [p for p in panels if p not in (*self.FIRST, *self.LAST, self.OTHER)]
        for title in (*self.FIRST, *own, *self.LAST, self.OTHER):
            if title in panels:
                with formatter.section(title):
                    formatter.write_dl(panels[title])


def usage_name(param: click.Parameter) -> str:
    """An argument on the usage line: its metavar (verbatim when it already says
    how many, e.g. ``[IMAGES]... [QUESTION]``), else NAME, [NAME] or [NAME]...."""
    name = param.metavar or param.name.upper()
    if "..." in name or " " in name:
        return name
    if not param.required:
        name = f"[{name}]"
    return name + ("..." if param.nargs != 1 else "")


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
    # The CLI's choice, not the library's: library chatter (transformers, huggingface_hub,
    # bitsandbytes, Python warnings) is quieted for our users (BLIP2_DEBUG=1 shows it).
    from .loader import quiet_on_load

    quiet_on_load()


# The one-line summaries of `blip2 --help` (and of shell completion): short
# enough for an 80-column terminal, where click would cut the docstring with "...".
SUMMARIES = {
    "caption": "Caption images: one record per image.",
    "embed": "Embed images and texts: vectors or a vector store.",
    "search": "Rank images by similarity to a text or an image.",
    "score": "Score texts against an image (ITM and ITC).",
    "ask": "Ask questions about images: one record per answer.",
    "chat": "Talk about an image, question after question.",
    "bench": "Measure throughput on this machine.",
    "merge": "Join the part files of sharded runs.",
    "export": "A vector store in the layout faiss tools read.",
    "sheet": "An HTML contact sheet of earlier results.",
    "tiny-checkpoint": "Write a tiny random checkpoint for tests.",
    "serve": "Keep a model loaded and answer HTTP requests.",
}


def _command(name: str, func, **kwargs) -> None:
    app.command(name, cls=Command, short_help=SUMMARIES[name], **kwargs)(func)


_command("caption", caption_cmd.caption, no_args_is_help=False)
_command("embed", embed_cmd.embed, no_args_is_help=False)
_command("search", search_cmd.search, no_args_is_help=False)
_command("score", score_cmd.score)
_command("ask", ask_cmd.ask, no_args_is_help=False)
_command("chat", chat_cmd.chat)
_command("bench", bench_cmd.bench)
_command("merge", merge_cmd.merge)
_command("export", export_cmd.export)
_command("sheet", sheet_cmd.sheet)
_command("tiny-checkpoint", tiny_cmd.tiny_checkpoint)
_command("serve", serve_cmd.serve)

from .commands import models as models_cmd  # noqa: E402  (a group: `models`, `models download`)

models_cmd.register(app, Command)


def main() -> None:
    try:
        app(prog_name="blip2")
    except SystemExit as exc:
        _leave(exc)
        raise


def _leave(exc: SystemExit) -> None:
    """End the process without Python's shutdown when daemon threads are still busy.

    Python 3.11-3.13 end a daemon thread that wakes during interpreter shutdown with
    ``pthread_exit``; one inside torch's C++ code then aborts the whole process
    ("terminate called without an active exception", SIGABRT) after the run has
    already said how it ended: an interrupted run's decode worker did that. Idle
    workers get a moment to end; if any thread is still alive, the atexit handlers
    run, the standard streams are flushed and the process leaves with its own code.
    """
    from .workers import wait_for_threads

    if not wait_for_threads(0.5):
        return
    import atexit

    code = exc.code
    if code is None:
        code = 0
    elif not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


if __name__ == "__main__":  # pragma: no cover
    main()
