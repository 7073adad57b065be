"""``blip2 export STORE -o DIR``: a vector store in the layout other tools read."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from .. import options as o
from ..choices import ExportLayout
from .common import handles_errors


class ExportVectors(str, Enum):
    """How a store of 32 query vectors per image becomes 2-D rows."""

    mean = "mean"
    flatten = "flatten"


EXAMPLES = """

--to clip-retrieval writes DIR/img_emb/img_emb_N.npy (2-D float32) and
DIR/metadata/metadata_N.parquet (image_path; caption with --captions; query with
--vectors flatten), row for row, N zero-padded as clip-retrieval's own writer does:
what autofaiss build_index, clip-retrieval's back-end and faiss read. --vectors flatten
(32 rows per image; the best row of each image is its score) ranks as blip2 search
does; mean (one row per image) is smaller and ranks differently. --to npy|safetensors
writes one matrix FILE and FILE.index.parquet (the rows' paths) beside it.

Examples:

\b
  blip2 export vectors.safetensors -o emb/                 # pooled: one row per image
  blip2 export vectors.safetensors -o emb/ --vectors flatten --captions captions.jsonl
  autofaiss build_index --embeddings emb/img_emb --index_path knn.index
  blip2 export vectors.safetensors -o matrix.npy --to npy
"""


@handles_errors
def export(
    store: Annotated[
        Path,
        typer.Argument(metavar="STORE", show_default=False,
                       help="A vector store: the folder blip2 embed -o wrote."),
    ],
    output: Annotated[
        Path,
        typer.Option("--output", "-o", metavar="DIR|FILE", rich_help_panel=o.OUTPUT, show_default=False,
                     help="clip-retrieval: the directory to write (created if needed); npy, safetensors: the file."),
    ],
    to: Annotated[
        ExportLayout,
        typer.Option("--to", metavar=o.choices(ExportLayout), rich_help_panel=o.OUTPUT, case_sensitive=False,
                     help="clip-retrieval: img_emb/ + metadata/ for autofaiss and clip-retrieval; "
                     "npy, safetensors: one matrix file (+ FILE.index.parquet)."),
    ] = ExportLayout.clip_retrieval,
    vectors: Annotated[
        ExportVectors,
        typer.Option("--vectors", metavar=o.choices(ExportVectors), rich_help_panel=o.OUTPUT, case_sensitive=False,
                     help="A store of 32 query vectors per image: mean (one re-normalised row per image) or "
                     "flatten (32 rows per image, each with its image_path and query number: ranks as blip2 "
                     "search does). "
                     "Pooled stores have one row per image either way."),
    ] = ExportVectors.mean,
    captions: Annotated[
        Optional[Path],
        typer.Option("--captions", metavar="FILE", rich_help_panel=o.INPUT, show_default=False, dir_okay=False,
                     help="JSON Lines of blip2 caption: each image's caption goes to the metadata's caption "
                     "column (matched by path; empty where none)."),
    ] = None,
    rows_per_file: Annotated[
        int,
        typer.Option("--rows-per-file", metavar="N", min=1, rich_help_panel=o.OUTPUT,
                     help="Vector rows per img_emb_N.npy file."),
    ] = 1_000_000,
    absolute_paths: Annotated[
        bool,
        typer.Option("--absolute-paths", rich_help_panel=o.OUTPUT,
                     help="clip-retrieval: image_path is each file's absolute path (default: the path as embedded)."),
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", rich_help_panel=o.OUTPUT, help="No summary on stderr.")] = False,
) -> None:
    """Write a vector store in clip-retrieval's layout, or as one matrix file."""
    from .. import console
    from ..errors import UsageError
    from ..export import export_clip_retrieval, export_matrix, read_captions
    from ..store import VectorStore

    src = VectorStore.open(store)  # StoreError (exit 2) if there is none
    try:
        src.verify(full=True)  # rows or paths changed inside a segment: refused, never exported
        if to != ExportLayout.clip_retrieval:
            if captions is not None or vectors != ExportVectors.mean or absolute_paths:
                raise UsageError(f"--captions, --vectors and --absolute-paths apply to --to clip-retrieval, "
                                 f"not --to {to.value}", hint="drop them")
            if output.is_dir():
                raise UsageError(f"{str(output)!r} is a directory; --to {to.value} writes one file",
                                 hint=f"name a file: -o vectors.{to.value}")
            rows = export_matrix(src, output, kind=to.value)
            if not quiet:
                console.message(f"exported {rows:,} rows to {output} and {output}.index.parquet")
            return
        if output.exists() and not output.is_dir():
            raise UsageError(f"{str(output)!r} is a file; the export is a directory", hint="name a directory with -o")
        names = read_captions(captions) if captions is not None else None
        written = export_clip_retrieval(src, output, vectors=vectors.value, rows_per_file=rows_per_file,
                                        captions=names, absolute_paths=absolute_paths)
        if not quiet:
            per = "" if written == src.rows else f" ({written // max(1, src.rows)} per image)"
            console.message(f"exported {src.rows:,} images as {written:,} vector rows{per} to "
                            f"{output / 'img_emb'} and {output / 'metadata'}")
    finally:
        src.close()


export.__doc__ = (export.__doc__ or "") + EXAMPLES
