"""``blip2 sheet``: the HTML contact sheet of an earlier run's JSON Lines output."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .. import options as o
from .common import check_output_path, handles_errors

EXAMPLES = """

Each image is decoded again for its thumbnail (embedded as a small JPEG), or linked
relative to the page with --html-links; cards are grouped by folder (search results
keep their ranking), error records and missing images show as such.

Examples:

\b
  blip2 sheet captions.jsonl -o sheet.html
  blip2 sheet answers.jsonl -o answers.html --html-links
  blip2 search "a red car" photos/ -f jsonl | blip2 sheet - -o cars.html
  blip2 sheet /data/run/captions.jsonl --root /data/run -o sheet.html
"""


@handles_errors
def sheet(
    source: Annotated[
        str,
        typer.Argument(
            metavar="FILE",
            help="JSON Lines records of blip2 caption, ask, chat, search or score (- for stdin).",
            show_default=False,
        ),
    ],
    output: Annotated[
        Optional[Path],
        typer.Option("--output", "-o", metavar="FILE", rich_help_panel=o.OUTPUT, show_default=False,
                     help="Write the page to FILE (sheet.html) instead of stdout."),
    ] = None,
    html_links: Annotated[
        bool,
        typer.Option("--html-links", rich_help_panel=o.OUTPUT,
                     help="Link each image relative to the page instead of embedding a thumbnail "
                     "(no decoding; the images must stay where they are)."),
    ] = False,
    root: Annotated[
        Optional[Path],
        typer.Option("--root", metavar="DIR", rich_help_panel=o.INPUT, show_default=False, file_okay=False,
                     help="Folder the records' paths are relative to. Default: the current folder."),
    ] = None,
    title: Annotated[
        Optional[str],
        typer.Option("--title", metavar="TEXT", rich_help_panel=o.OUTPUT, show_default=False, help="Page title. Default: FILE's name."),
    ] = None,
    workers: Annotated[
        Optional[int],
        typer.Option("--workers", "-j", metavar="N", min=1, rich_help_panel=o.PERFORMANCE, show_default=False,
                     help="Threads decoding images for thumbnails. Default: the CPU count, at most 8."),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", rich_help_panel=o.OUTPUT, help="No summary on stderr.")] = False,
) -> None:
    """An HTML contact sheet of earlier results: thumbnails with their captions, answers or scores."""
    import contextlib

    from ..errors import InputError
    from ..html import read_records

    fh = _open_records(source)
    lock = None
    if str(output or "-") != "-":
        try:
            check_output_path(output)
            lock = _guard_output(source, fh, output)  # type: ignore[arg-type]  # a file here
        except BaseException:
            fh.close()
            raise
    bad: list[int] = []
    with fh, (lock or contextlib.nullcontext()):
        records = read_records(fh, on_bad_line=bad.append)
        first = next(records, None)
        if first is None and bad:
            raise InputError(f"{source!r} holds no JSON Lines records (line {bad[0]} is not a JSON object)",
                             hint="blip2 sheet reads the -f jsonl output of caption, ask or search")
        page = _write_page(first, records, source=source, output=output, html_links=html_links, root=root,
                           title=title, workers=workers)
    _report(page, bad, output, quiet)
    raise typer.Exit(0)


def _open_records(source: str):
    """The records file (``-``: stdin), text read as UTF-8 with undecodable bytes kept."""
    import io
    import sys

    from ..errors import InputError

    if source == "-":
        return io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8", errors="surrogateescape")
    try:
        return open(source, encoding="utf-8", errors="surrogateescape")
    except OSError as exc:
        raise InputError(f"cannot read {source!r}: {exc.strerror or exc}",
                         hint="pass the -o file of blip2 caption, ask or search (JSON Lines)") from exc


def _write_page(first, records, *, source: str, output: Path | None, html_links: bool, root: Path | None,
                title: str | None, workers: int | None):
    """Render ``first`` then ``records`` as one page to ``output`` (stdout); returns the page's tally."""
    import os
    from itertools import chain

    from ..html import Thumbnails, kind_of, render_records, settings_of
    from ..writers import Sink, make_writer

    kind = kind_of(first) if first is not None else "records"
    base = output.parent if output is not None and str(output) != "-" else Path(".")
    thumbnails = Thumbnails()
    sink = Sink(str(output) if output is not None else None).open()
    failed = True
    try:
        writer = make_writer(
            "html", sink, None,  # type: ignore[arg-type]  # a page needs no schema
            settings=settings_of(first) if first is not None else {},
            title=title or ("standard input" if source == "-" else os.path.basename(source)),
            subtitle=f"{kind}, blip2 sheet",
            thumbnails=thumbnails,
            links=html_links,
            root=str(root) if root is not None else ".",
            base=str(base),
            group=kind != "search results",  # a ranking keeps its order
        )
        stream = records if first is None else chain([first], records)
        render_records(stream, writer, thumbnails, root=str(root or "."), links=html_links,
                       workers=workers or o.default_workers())
        writer.close()
        failed = False
    finally:
        sink.close(quiet=failed)  # never hides the error on its way out
    return writer.sheet  # type: ignore[attr-defined]  # an HtmlWriter


def _report(page, bad: list[int], output: Path | None, quiet: bool) -> None:
    from .. import console

    if bad:
        console.message(f"skipped {len(bad)} lines that are not JSON records (first: line {bad[0]})")
    if not quiet:
        notes = [f"{page.errors} failed"] if page.errors else []
        if page.missing:
            notes.append(f"{page.missing} images not found")
        if page.unreadable:
            notes.append(f"{page.unreadable} files not readable as images")
        where = f"{output}: " if output is not None and str(output) != "-" else ""
        console.message(f"{where}{page.cards} images" + (f" ({', '.join(notes)})" if notes else ""))


def _guard_output(source: str, fh, output: Path):
    """The page never replaces its own input (compared by inode: ./x, links) nor an image,
    and one writer at a time: returns the lock held while the page is written."""
    import os

    from ..errors import UsageError
    from ..guard import file_id, lock_output, refuse_image_output

    try:
        st = os.fstat(fh.fileno())  # the file read, also when it is stdin (< big.jsonl)
        ident = (st.st_dev, st.st_ino)
    except (AttributeError, OSError, ValueError):
        ident = file_id(source) if source != "-" else None  # type: ignore[assignment]
    if ident is not None and ident == file_id(output):
        raise UsageError(f"the input {source!r} is also the output {str(output)!r}: writing would destroy it",
                         hint="name another page: -o sheet.html")
    refuse_image_output(output)
    return lock_output(output)  # a second writer of the same page is refused (exit 2)


sheet.__doc__ = (sheet.__doc__ or "") + EXAMPLES
