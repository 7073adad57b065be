"""What every command does the same way: map our errors to messages and exit
codes, resolve inputs, build the sidecar policy, and sum up a run."""

from __future__ import annotations

import functools
import os
import sys
import traceback
from pathlib import Path
from typing import Callable

import typer

from .. import console
from ..errors import (
    EXIT_BROKEN_PIPE,
    EXIT_INTERRUPTED,
    EXIT_ITEMS_FAILED,
    EXIT_USAGE,
    EXIT_OK,
    Blip2Error,
    Interrupted,
    OutputError,
)


def handles_errors(func: Callable) -> Callable:
    """The one place where exceptions become messages and exit codes.

    Our own errors print their message and a hint; anything unexpected prints
    one line (set BLIP2_DEBUG=1 for the traceback).
    """

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except typer.Exit:
            raise
        except Blip2Error as exc:
            if exc.params:
                exc = exc.reworded(flag_spelling)  # the core names parameters; say the flags
            console.message(f"error: {exc.message}")
            if exc.hint:
                console.message(f"hint: {exc.hint}")
            if os.environ.get("BLIP2_DEBUG"):
                traceback.print_exc()
            raise typer.Exit(exc.exit_code) from None
        except BrokenPipeError:
            # The reader went away (`blip2 caption ... | head -1`): stop quietly,
            # as other Unix tools do, with the shell's code for SIGPIPE.
            _silence_stdout()
            raise typer.Exit(EXIT_BROKEN_PIPE) from None
        except (KeyboardInterrupt, Interrupted) as exc:
            code = exc.exit_code if isinstance(exc, Interrupted) else EXIT_INTERRUPTED
            console.message("interrupted: finished records were written")
            raise typer.Exit(code) from None
        except Exception as exc:  # noqa: BLE001
            if os.environ.get("BLIP2_DEBUG"):
                traceback.print_exc()
            console.message(f"error: {type(exc).__name__}: {console.one_line(exc)}")
            console.message("hint: set BLIP2_DEBUG=1 to see the traceback")
            raise typer.Exit(EXIT_ITEMS_FAILED) from None

    return wrapper


def flag_spelling(name: str, value: str | None) -> str:
    """A parameter as the CLI spells it: ``num_beams`` -> ``--num-beams``,
    ``num_beams=3`` -> ``--num-beams 3``, ``sample=True`` -> ``--sample``; a value the
    shell would split is quoted (``template='Q: {question}'`` -> ``--template 'Q: {question}'``)."""
    import shlex

    flag = "--" + name.replace("_", "-")
    return flag if value in (None, "True") else f"{flag} {shlex.quote(value)}"


def load_options(model, revision, device, dtype, quantize, offline, allow_pickle):
    """The loader's ``LoadOptions`` from the shared loader flags as Typer hands them over
    (choices as enums or strings)."""
    from ..loader import LoadOptions

    return LoadOptions(model=model, revision=revision, device=device, dtype=getattr(dtype, "value", dtype),
                       quantize=getattr(quantize, "value", quantize), offline=offline, allow_pickle=allow_pickle)


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush cannot fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # not a real file (e.g. a test runner)
        pass


def check_output_path(output: Path | None, *, inputs=()) -> None:
    """Fail before loading the model if the output cannot be written, or if writing it
    would destroy an input: one of ``inputs`` (paths, compared by inode) or any image."""
    if output is None or str(output) == "-":
        return
    from ..errors import UsageError
    from ..guard import file_id, refuse_image_output

    refuse_image_output(output)
    out_id = file_id(output)
    if out_id is not None:
        for path in inputs:
            if path is not None and str(path) != "-" and file_id(path) == out_id:
                raise UsageError(
                    f"the input {str(path)!r} is also the output {str(output)!r}: writing would destroy it",
                    hint="name another output file with -o",
                )
    parent = output.parent if str(output.parent) else Path(".")
    if output.is_dir():
        raise OutputError(f"the output {str(output)!r} is a directory", hint="name a file with -o")
    if not parent.is_dir():
        raise OutputError(
            f"cannot write {str(output)!r}: the folder {str(parent)!r} does not exist",
            hint=f"create it first (mkdir -p {parent})",
        )
    if not os.access(parent, os.W_OK) or (output.exists() and not os.access(output, os.W_OK)):
        raise OutputError(f"cannot write {str(output)!r}: permission denied")


def resolve_items(inputs, files_from, *, recursive: bool, ext, null: bool, command: str):
    """Inputs -> (items, total). A list (total known, for the ETA) unless stdin is read."""
    from ..errors import UsageError
    from ..sources import InputResolver

    inputs = list(inputs or [])
    files_from = list(files_from or [])
    if not inputs and not files_from:
        raise UsageError(
            "no inputs: name image files, folders or globs, or - to read from stdin",
            hint=f"blip2 {command} photos/   or   find . -name '*.jpg' | blip2 {command} -",
        )
    resolver = InputResolver(recursive=recursive, extensions=ext, null_separated=null)
    items = resolver.resolve(inputs, files_from)
    if InputResolver.reads_stdin(inputs, files_from):
        return items, None
    listed = list(items)
    return listed, len(listed)


def html_output(fmt: str, links: bool, output: Path | None, *, per_card: int | None = None):
    """``--format html``: (the thumbnail store the image stage fills, the html writer's options).

    Thumbnails are made where each image is decoded for the model (no second decode);
    with ``--html-links`` none are made, the page links the images relative to its folder
    (the current folder when the page goes to stdout). (None, {}) for other formats."""
    from ..errors import UsageError

    if fmt != "html":
        if links:
            raise UsageError("--html-links applies to --format html", hint="add -f html, or write to -o sheet.html")
        return None, {}
    from ..html import Thumbnails

    thumbnails = None if links else Thumbnails()
    base = output.parent if output is not None and str(output) != "-" else Path(".")
    return thumbnails, {"thumbnails": thumbnails, "links": links, "base": str(base), "per_card": per_card}


def no_html(fmt: str, command: str) -> None:
    """Commands whose records are no contact sheet by themselves: say how to make one."""
    if fmt == "html":
        from ..errors import UsageError

        raise UsageError(
            f"blip2 {command} writes no HTML itself",
            hint=f"write JSON Lines (-o {command}.jsonl), then: blip2 sheet {command}.jsonl -o {command}.html",
        )


SIDECAR_ONLY = (("sidecar_ext", "--sidecar-ext"), ("existing", "--existing"), ("prefix", "--prefix"),
                ("suffix", "--suffix"), ("separator", "--separator"))


def _given(name: str, value, default) -> bool:
    """Was the option typed on the command line (not just its default)? Asked of the
    running command's context (typer's own click, or click); else: is it not the default."""
    for module in ("typer._click.globals", "click.globals"):
        try:
            get = __import__(module, fromlist=["get_current_context"]).get_current_context
            ctx = get(silent=True)
            source = ctx.get_parameter_source(name) if ctx is not None else None
        except (ImportError, AttributeError, KeyError):
            continue
        if source is not None:
            return getattr(source, "name", str(source)) not in ("DEFAULT", "DEFAULT_MAP")
    return value != default


def check_sidecar_ext(ext: str) -> str:
    """One extension: ``.caption`` or ``caption``; no separators, path or shell characters."""
    import re

    from ..errors import UsageError

    if not re.fullmatch(r"\.?[A-Za-z0-9][A-Za-z0-9_+-]*", ext or ""):
        raise UsageError(
            f"--sidecar-ext {ext!r} is not one file extension (letters, digits, _ + -, after one dot)",
            hint="one extension per run, e.g. --sidecar-ext .caption (run again for a second one)",
        )
    return ext if ext.startswith(".") else "." + ext


def sidecar_policy(sidecar, sidecar_ext, output_dir, existing, prefix, suffix, separator):
    """The SidecarPolicy for the sidecar options, or None without --sidecar/--output-dir.

    Options that only mean something for sidecar files (--sidecar-ext, --existing,
    --prefix, --suffix, --separator) are refused without --sidecar, all alike."""
    from ..errors import UsageError
    from ..sidecar import Existing, SidecarPolicy

    if not sidecar and output_dir is None:
        defaults = {"sidecar_ext": ".txt", "existing": "skip", "prefix": "", "suffix": "", "separator": ", "}
        values = {"sidecar_ext": sidecar_ext, "existing": getattr(existing, "value", existing), "prefix": prefix,
                  "suffix": suffix, "separator": separator}
        used = [flag for name, flag in SIDECAR_ONLY if _given(name, values[name], defaults[name])]
        if used:
            raise UsageError(
                f"{' and '.join(used)} {'applies' if len(used) == 1 else 'apply'} to sidecar files",
                hint="add --sidecar (or --output-dir DIR)",
            )
        return None
    ext = check_sidecar_ext(sidecar_ext)
    return SidecarPolicy(
        ext=ext,
        output_dir=str(output_dir) if output_dir is not None else None,
        existing=Existing(existing.value),
        prefix=prefix,
        suffix=suffix,
        separator=separator,
    )


# The summary's verb per command ("captioned 120 images in 14.2 s ...").
def configure_job(job, *, carry, src, image_column, failed_list) -> None:
    """The input readers' options (--carry, --ext, --image-column), the Job's own checks,
    then the --failed-list writer: what caption, ask and embed do before ``job.run``."""
    from ..failedlist import wrapper as failed_wrapper
    from ..webdataset import configure

    configure(job, carry, src.ext, image_column)
    job.check()
    job.wrappers += [w for w in (failed_wrapper(failed_list, null=src.null),) if w]


VERBS = {"caption": "captioned", "ask": "answered questions about", "embed": "embedded"}


def finish(result, *, output: Path | None, quiet: bool, job=None, fmt: str | None = None,
           command: str | None = None) -> None:
    """Summary on stderr and the exit code: 0 all done, 1 some failed.

    A successful run ends on one line (unless --quiet) that says how many images
    were done, how fast, and where the results went; a run with failures says how
    many failed and where to read why: the file's error records, or the messages
    above when the format keeps none (text). ``job`` (or ``fmt``/``command``)
    tells the format, the sidecars and the part files apart."""
    stats = getattr(result, "stats", result)
    if getattr(result, "dry_run", False):
        raise typer.Exit(EXIT_OK)
    missing = getattr(result, "missing", 0)
    if missing:
        raise typer.Exit(EXIT_ITEMS_FAILED)
    if job is not None:
        fmt, command = fmt or job.fmt, command or job.command
    sidecar = getattr(job, "sidecar", None)
    parts = job is not None and job.parts_mode()
    if stats is not None and stats.failed:
        console.message(f"{stats.failed} of {stats.total} images failed; "
                        + _failures_where(output, fmt, sidecar, parts))
        raise typer.Exit(EXIT_ITEMS_FAILED)
    lost = getattr(getattr(job, "samples", None), "warned", 0)  # --carry members not carried
    if lost:
        console.message(f"{lost} samples lost a --carry member (too large, a link, ...): "
                        "their records say which in carry_error")
        raise typer.Exit(EXIT_ITEMS_FAILED)
    if (stats is None or stats.total == 0) and not (
        getattr(result, "skipped_existing", 0) or getattr(result, "resumed", 0)
        or getattr(result, "merged", None)
    ):
        shard = getattr(job, "shard", None)
        if shard is not None:  # --shard I/N: this slice of the inputs holds nothing
            console.message(f"the slice --shard {shard} holds no inputs (fewer inputs than slices?)")
        elif getattr(job, "tar_inputs", None) is not None:  # named inputs (not stdin) without an image
            console.message("no images found in the inputs: name image files, folders holding images "
                            "(see --ext, --recursive), tar shards or Parquet files")
            raise typer.Exit(EXIT_USAGE)
        else:
            console.message("no images found in the inputs")
    elif stats is None or stats.total == 0:
        console.message("nothing left to do")
    elif not quiet:
        console.message(_done_line(stats, command, output, sidecar, parts))
    raise typer.Exit(EXIT_OK)


def _images(n: int) -> str:
    return f"{n} image" if n == 1 else f"{n} images"


def _done_line(stats, command: str | None, output: Path | None, sidecar, parts: bool) -> str:
    """``captioned 120 images in 14.2 s (8.4/s) -> out.jsonl``"""
    line = f"{VERBS.get(command or '', 'processed')} {_images(stats.done)}"
    seconds = getattr(stats, "seconds", 0.0) or 0.0
    if seconds > 0:
        line += f" in {seconds:.1f} s ({stats.done / seconds:.1f}/s)"
    places = []
    if sidecar is not None:
        places.append(f"sidecars ({sidecar.ext}) under {sidecar.output_dir}" if sidecar.output_dir
                      else f"sidecars ({sidecar.ext}) beside the images")
    if parts:
        places.append(f"part files in {output}")
    elif output is not None and str(output) != "-":
        places.append(str(output))
    return line + (" -> " + " and ".join(places) if places else "")


def _failures_where(output: Path | None, fmt: str | None, sidecar, parts: bool) -> str:
    """Where a user reads why the images failed."""
    to_file = output is not None and str(output) != "-"
    if parts:
        where = f"error records are in the part files in {output}"
    elif fmt == "text":
        where = "see the messages above (text output keeps no error records)"
    elif fmt == "html":
        where = f"they are marked as errors in {output}" if to_file else "they are marked as errors on the page"
    elif fmt is None and not to_file:
        where = "see the messages above"
    else:
        where = f"error records are in {output}" if to_file else "error records are in the output (stdout)"
    if sidecar is not None:
        where += "; no sidecar was written for them"
    return where


def stdin_is_terminal() -> bool:
    try:
        return sys.stdin.isatty()
    except (AttributeError, ValueError):
        return False
