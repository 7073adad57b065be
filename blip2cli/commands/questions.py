"""The questions of ``blip2 ask`` (positional, ``-q``, ``--questions-file``), read apart from the
inputs: shared by the local command and its ``--server`` client (commands/serve.remote)."""

from __future__ import annotations

from pathlib import Path


def gather_questions(arguments: list[str], flags: list[str], questions_file: str | None, files_from) -> tuple[list[str], list[str]]:
    """(inputs, questions): the positional question first, then -q in order, then the file's lines."""
    import os
    import sys

    from ..ask import parse_questions, split_arguments
    from ..errors import InputError, UsageError

    others = bool(flags) or questions_file is not None
    inputs, positional = split_arguments(arguments, others)
    questions = [positional] if positional is not None else []
    questions += flags
    if questions_file is not None:
        if questions_file == "-":
            if "-" in inputs or "-" in list(files_from or []):
                raise UsageError("stdin cannot hold both the inputs and the questions",
                                 hint="put the questions in a file")
            text = sys.stdin.read()
        else:
            try:
                text = Path(questions_file).read_text(encoding="utf-8", errors="surrogateescape")
            except OSError as exc:
                raise InputError(f"cannot read the questions file {questions_file!r}: {exc.strerror or exc}") from exc
        from_file = parse_questions(text)
        if not from_file:
            raise UsageError(f"the questions file {questions_file!r} holds no questions")
        questions += from_file
    questions = [q.strip() for q in questions]
    if not questions or not all(questions):
        raise UsageError(
            "no question to ask" if not questions else "a question is empty",
            hint='blip2 ask photo.jpg "what is in the picture?"   or   -q QUESTION / --questions-file FILE',
        )
    if others and inputs and not _looks_like_input(inputs[-1]):
        # `blip2 ask img.jpg "how many?" -q "what color?"`: with -q every argument is an
        # input, so the last one would become an error record; say so up front.
        raise UsageError(
            f"{inputs[-1]!r} is not a file: with -q or --questions-file, every argument is an input",
            hint=f"pass that question with -q too: -q {inputs[-1]!r}",
        )
    if positional is not None and inputs and os.path.isfile(positional) and _is_image_name(positional):
        # `blip2 ask a.jpg b.png`: the question was forgotten and b.png would be asked of a.jpg.
        raise UsageError(
            f"the last argument {positional!r} is an image file, taken as the question: the question is missing",
            hint=f'blip2 ask {" ".join(inputs)} {positional} "your question"   (or -q QUESTION)',
        )
    if not others and not files_from and len(arguments) == 1 and os.path.exists(arguments[0]):
        raise UsageError(
            f"{arguments[0]!r} was taken as the question, which leaves no inputs",
            hint=f'blip2 ask {arguments[0]} "your question"',
        )
    return inputs, questions


def _is_image_name(path: str) -> bool:
    from ..sources import DEFAULT_EXTENSIONS, PARQUET_SUFFIXES
    from ..shardfiles import is_shard_path

    lower = path.lower()
    return (lower.rsplit(".", 1)[-1] in DEFAULT_EXTENSIONS or is_shard_path(lower)
            or lower.endswith(PARQUET_SUFFIXES))


def _looks_like_input(arg: str) -> bool:
    """False for what is surely a question: no such path, words with spaces, no slash or star."""
    import os

    if arg == "-" or os.path.exists(arg) or "/" in arg or "*" in arg or os.sep in arg:
        return True
    return not (len(arg.split()) > 1)
