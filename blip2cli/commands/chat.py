"""``blip2 chat``: a conversation about one image, as in the BLIP-2 chat demo.

On a terminal: line editing and history (readline), a prompt and messages on
stderr, answers on stdout. Otherwise (a pipe or a file on stdin): one question
per line in, one answer per line out (or one JSON record per turn), so scripts
and tests can drive it. The ``/`` commands work in both modes; what they say goes
to stderr, so stdout holds answers only.
"""

from __future__ import annotations

import io
import os
import sys
from enum import Enum
from pathlib import Path
from typing import IO, Annotated, Callable, Optional

import typer

from .. import console
from .. import options as o
from ..ask import ASK_MIN_NEW_TOKENS, CHAT_MAX_NEW_TOKENS, DEFAULT_TEMPLATE
from ..errors import sigterm_as_interrupt
from .common import handles_errors, load_options, stdin_is_terminal

EXAMPLES = """

Examples:

\b
  blip2 chat photo.jpg                      # type questions; /help for commands, Ctrl-D to end
  printf 'what is this?\\nwhy?\\n' | blip2 chat photo.jpg
  blip2 chat photo.jpg -f jsonl < questions.txt > turns.jsonl
"""

HELP = """commands:
  /image PATH   talk about another image (a fresh context)
  /reset        forget the conversation so far (same image)
  /save FILE    write the transcript (every turn so far) as JSON Lines
  /help         this help
  /quit         end the chat (or Ctrl-D)
Each question carries the earlier turns of the conversation; the oldest are
dropped when they no longer fit the model's context."""

PROMPT = "> "


class ChatFormat(str, Enum):
    text = "text"
    jsonl = "jsonl"


class ChatLoop:
    """Reads lines, runs commands and turns, writes answers. No model code here."""

    def __init__(self, session, out: IO[str], *, fmt: str = "text", interactive: bool = False,
                 notify: Callable[[str], None] = console.message):
        self.session = session
        self.out = out
        self.fmt = fmt
        self.interactive = interactive
        self.notify = notify
        self.failures = 0

    def run(self, read_line: Callable[[], Optional[str]]) -> int:
        """Until /quit or end of input; returns the number of failures (bad image,
        question too long, transcript not saved)."""
        while True:
            try:
                line = read_line()
            except KeyboardInterrupt:
                if not self.interactive:
                    raise
                sys.stderr.write("\n")  # Ctrl-C at the prompt: a fresh prompt, as shells do
                continue
            if line is None:
                return self.failures
            line = line.strip()
            if not line:
                continue
            try:
                if not self.handle(line):
                    return self.failures
            except KeyboardInterrupt:
                if not self.interactive:
                    raise
                self.notify("interrupted")

    def handle(self, line: str) -> bool:
        """One line; False ends the chat."""
        if line.startswith("/"):
            name, _, arg = line.partition(" ")
            return self.command(name.lower(), arg.strip())
        self.turn(line)
        return True

    def command(self, name: str, arg: str) -> bool:
        from ..ask import transcript_lines
        from ..decode import ImageError

        session = self.session
        if name in ("/quit", "/exit", "/q"):
            return False
        if name == "/help":
            sys.stderr.write(HELP + "\n")
        elif name == "/reset":
            session.reset()
            self.notify("context cleared")
        elif name == "/image":
            path = _unquote(arg)
            if not path:
                self.notify("usage: /image PATH")
                return True
            try:
                session.set_image(os.path.expanduser(path), path)
            except ImageError as exc:
                self.failures += 1
                self.notify(f"{path}: {exc} (still talking about {session.image})")
            else:
                self.notify(f"now talking about {path} (a fresh context)")
        elif name == "/save":
            path = _unquote(arg)
            if not path:
                self.notify("usage: /save FILE")
                return True
            try:
                with open(os.path.expanduser(path), "w", encoding="utf-8", errors="surrogateescape") as f:
                    f.writelines(transcript_lines(session.transcript))
            except OSError as exc:
                self.failures += 1
                self.notify(f"cannot write {path}: {exc.strerror or exc}")
            else:
                self.notify(f"saved {len(session.transcript)} turns to {path}")
        else:
            self.notify(f"unknown command {name} (try /help)")
        return True

    def turn(self, question: str) -> None:
        import json

        from ..writers import escape_text

        turn = self.session.ask(question)
        if turn.dropped:
            self.notify(
                f"the conversation no longer fits the model's context ({self.session.limit} tokens): "
                f"dropped the {_plural(turn.dropped, 'oldest turn')}"
            )
        if turn.error:
            self.failures += 1
            self.notify(f"error: {turn.error}")
        if self.fmt == "jsonl":
            self.out.write(json.dumps(turn.record(), ensure_ascii=False) + "\n")
        elif turn.error is None or not self.interactive:
            # One line per question, even for a failed one, so answers stay in step.
            self.out.write(escape_text(turn.answer) + "\n")
        self.out.flush()


def _plural(n: int, word: str) -> str:
    return word if n == 1 else f"{n} {word}s"


def _unquote(arg: str) -> str:
    if len(arg) >= 2 and arg[0] == arg[-1] and arg[0] in "'\"":
        return arg[1:-1]
    return arg


def history_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "blip2" / "chat_history"


def terminal_reader() -> tuple[Callable[[], Optional[str]], Callable[[], None]]:
    """input() with readline line editing and a history file; (read_line, save_history)."""
    try:
        import readline
    except ImportError:  # e.g. Windows without pyreadline: plain input()
        readline = None  # type: ignore[assignment]
    path = history_path()
    if readline is not None:
        try:
            readline.read_history_file(path)
        except OSError:
            pass
        readline.set_history_length(1000)

    def read_line() -> Optional[str]:
        try:
            return _terminal_input(PROMPT)
        except EOFError:  # Ctrl-D
            sys.stderr.write("\n")
            return None

    def save() -> None:
        if readline is None:
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            readline.write_history_file(path)
        except OSError:
            pass

    return read_line, save


def _terminal_input(prompt: str) -> str:
    """input() whose prompt (and line editing) stays on the terminal when stdout is not.

    Python's input() uses readline only when stdin and stdout are both terminals,
    and writes the prompt to stdout. With stdout redirected (``blip2 chat x.jpg >
    answers.txt``), fd 1 is pointed at the terminal (stderr) for the duration of
    the read, so the prompt never lands in the data."""
    if _isatty(sys.stdout) or not _isatty(sys.stderr):
        if not _isatty(sys.stdout):
            sys.stderr.write(prompt)
            sys.stderr.flush()
            return input()
        return input(prompt)
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        return input(prompt)
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def pipe_reader() -> Callable[[], Optional[str]]:
    """One line at a time from stdin (answers are written as each question arrives)."""
    stream = io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8", errors="surrogateescape") \
        if hasattr(sys.stdin, "buffer") else sys.stdin

    def read_line() -> Optional[str]:
        line = stream.readline()
        return line if line else None

    return read_line


@handles_errors
@o.expands
def chat(
    image: Annotated[str, typer.Argument(metavar="IMAGE", help="The image to talk about (switch with /image PATH).", show_default=False)],
    template: Annotated[
        Optional[str],
        typer.Option("--template", metavar="TEXT", rich_help_panel="Questions", show_default=False,
                     help=f'Prompt template of a turn; must contain {{question}}. Default: "{DEFAULT_TEMPLATE}".'),
    ] = None,
    context_tokens: Annotated[
        Optional[int],
        typer.Option("--context-tokens", metavar="N", min=1, rich_help_panel="Questions", show_default=False,
                     help="At most N prompt tokens per turn (older turns dropped beyond). Default: what the model holds."),
    ] = None,
    loading: o.Bundle = o.LOADING,
    dec: o.Bundle = o.DECODING.but(max_new_tokens=(o.MaxNewTokens, CHAT_MAX_NEW_TOKENS),
                                    min_new_tokens=(o.MinNewTokens, ASK_MIN_NEW_TOKENS)),
    fmt: Annotated[
        ChatFormat,
        typer.Option("--format", "-f", metavar="[text|jsonl]", rich_help_panel=o.OUTPUT, case_sensitive=False,
                     help="text: one answer per line; jsonl: one record per turn."),
    ] = ChatFormat.text,
    preprocess: o.PreprocessOpt = o.Preprocess.fast,
    server: o.ServerOpt = None,
) -> None:
    """Talk about an image: each question carries the earlier turns, the image is encoded once."""
    from ..ask import Asker, ChatSession, check_template
    from ..caption import GenerationOptions
    from ..errors import EXIT_ITEMS_FAILED, EXIT_OK, InputError, UsageError
    from ..decode import ImageError, open_image
    from ..images import ImageStage
    from ..loader import load

    gen = GenerationOptions(**vars(dec))
    gen.validate()
    turn_template = check_template(template if template is not None else DEFAULT_TEMPLATE)
    if image == "-":
        raise UsageError("chat reads its questions from stdin: name an image file", hint="blip2 chat photo.jpg")
    if not os.path.isfile(image):
        raise InputError(f"no such image file: {image!r}")
    try:  # a cheap check before the weights are read
        open_image(image, draft_size=(224, 224))
    except ImageError as exc:
        console.message(f"error: {image}: {exc}")
        raise typer.Exit(EXIT_ITEMS_FAILED) from None

    interactive = stdin_is_terminal()
    if server:  # a running `blip2 serve` answers; the conversation is the same
        session = _remote_session(server, gen, turn_template, context_tokens, preprocess.value)
        model_name = str(session.remote.settings().get("model") or server)
    else:
        loaded = load(
            load_options(**vars(loading)),
            task="chat",
        )
        if dec.seed is not None:
            import torch

            torch.manual_seed(dec.seed)
        session = ChatSession(Asker(loaded, gen), ImageStage(loaded, preprocess.value), template=turn_template,
                              limit=context_tokens or 0)
        model_name = loading.model
    session.set_image(image, image)

    out = io.TextIOWrapper(sys.stdout.buffer, encoding="utf-8", errors="surrogateescape", newline="\n",
                           write_through=True)
    loop = ChatLoop(session, out, fmt=fmt.value, interactive=interactive)
    try:
        with sigterm_as_interrupt():
            if interactive:
                read_line, save_history = terminal_reader()
                console.message(f"talking about {image} ({model_name}); /help for commands, Ctrl-D to end")
                try:
                    failures = loop.run(read_line)
                finally:
                    save_history()
            else:
                failures = loop.run(pipe_reader())
    finally:
        out.flush()
        out.detach()  # leave sys.stdout itself open
    raise typer.Exit(EXIT_ITEMS_FAILED if failures else EXIT_OK)


def _remote_session(server: str, gen, template: str, context_tokens: int | None, preprocess: str):
    """``blip2 chat --server URL``: the session whose turns a `blip2 serve` answers."""
    from ..client import Remote, RemoteChat, chat_request

    remote = Remote(server, api_key=os.environ.get("BLIP2_API_KEY") or None)
    remote.settings()  # reach it now: an unreachable server is said before the first question
    return RemoteChat(remote, chat_request(gen), template=template, context_tokens=context_tokens,
                      preprocess=preprocess)


chat.__doc__ = (chat.__doc__ or "") + EXAMPLES
