"""Everything meant for people goes to stderr: messages and the progress bar.

The progress bar (rich) appears only when stderr is a terminal and ``--quiet``
is off; a pipeline's stdout only ever holds data.
"""

from __future__ import annotations

import sys
from typing import IO, Any


def _stderr() -> IO[str]:
    return sys.stderr


def message(text: str) -> None:
    print(f"blip2: {text}", file=_stderr(), flush=True)


def one_line(text: str) -> str:
    return " ".join(str(text).split())


class Reporter:
    """Per-item failures (one line each) and a progress bar."""

    def __init__(self, *, quiet: bool = False, total: int | None = None, description: str = "captioning"):
        self.quiet = quiet
        self.failed = 0
        self._progress = None
        self._task: Any = None
        stream = _stderr()
        if not quiet and hasattr(stream, "isatty") and stream.isatty():
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            class _Rate(TextColumn):
                def render(self, task):  # images/s
                    speed = task.finished_speed or task.speed
                    from rich.text import Text

                    return Text(f"{speed:.1f} img/s" if speed else "… img/s")

            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                _Rate(""),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                console=Console(file=stream),
                transient=False,
            )
            self._progress.start()
            self._task = self._progress.add_task(description, total=total)

    def item_failed(self, name: str, error: str) -> None:
        self.failed += 1
        if self._progress is not None:
            self._progress.console.print(f"blip2: {one_line(name)}: {one_line(error)}", markup=False, highlight=False)
        else:
            message(f"{one_line(name)}: {one_line(error)}")

    def note(self, text: str) -> None:
        if self._progress is not None:
            self._progress.console.print(f"blip2: {text}", markup=False, highlight=False)
        else:
            message(text)

    def advance(self, n: int = 1) -> None:
        if self._progress is not None:
            self._progress.advance(self._task, n)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


def status(text: str) -> None:
    """What is happening before any progress bar exists (a model located, downloaded
    or built), on one line: on a terminal only, so logs and pipes stay quiet."""
    stream = _stderr()
    if hasattr(stream, "isatty") and stream.isatty():
        message(text)
