"""Shell completion scripts, generated from the app (bash, zsh, fish).

The scripts in ``completions/`` are produced by ``python -m blip2cli.completion
completions/``; a test regenerates them and fails when they are stale. At
completion time the shell calls ``blip2`` with ``_BLIP2_COMPLETE`` set, which
goes through the same light imports as ``--help`` (no torch).
"""

from __future__ import annotations

import sys
from pathlib import Path

FILES = {"bash": "blip2.bash", "zsh": "_blip2", "fish": "blip2.fish"}


def script(shell: str) -> str:
    from typer._completion_shared import get_completion_script

    return get_completion_script(prog_name="blip2", complete_var="_BLIP2_COMPLETE", shell=shell) + "\n"


def write_all(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for shell, name in FILES.items():
        path = folder / name
        path.write_text(script(shell), encoding="utf-8")
        written.append(path)
    return written


if __name__ == "__main__":  # pragma: no cover
    for p in write_all(sys.argv[1] if len(sys.argv) > 1 else "completions"):
        print(p)
