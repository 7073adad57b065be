"""``blip2 export STORE -o DIR``: a vector store in the layout other tools read."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from .. import options as o
from ..choices import StoreLayout
from .common import handles_errors


ExportLayout = StoreLayout  # what ``blip2 export`` writes: the layouts of a store directory


class ExportVectors(str, Enum):
    """How a store of 32 query vectors per image becomes 2-D rows."""

    mean = "mean"
    flatten = "flatten"


EXAMPLES = """

--to clip-retrieval writes DIR/img_emb/img_emb_N.npy (2-D float32) and
DIR/metadata/metadata_N.parquet (image_path; caption with --captions; query with
--vectors flatten), row for row: what autofaiss build_index, clip-retrieval's back-end
and faiss read. --to segments copies a single-file store into a new segmented store
(blip2 embed -o DIR then appends to it in O(new rows)); the source is not changed.

Examples:

\b
  blip2 export vectors.safetensors -o emb/                 # pooled: one row per image
  blip2 export vectors.safetensors -o emb/ --vectors flatten --captions captions.jsonl
  autofaiss build_index --embeddings emb/img_emb --index_path knn.index
  blip2 export vectors.safetensors -o vectors/ --to segments
"""


@handles_errors
def export(
    store: Annotated[
        Path,
        typer.Argument(metavar="STORE", show_default=False,
                       help="A vector store: FILE.safetensors, FILE.npy or a segmented store's directory."),
    ],
    output: Annotated[
        Path,
        typer.Option("--output", "-o", metavar="DIR", rich_help_panel=o.OUTPUT, show_default=False,
                     help="The directory to write (created if needed)."),
    ],
    to: Annotated[
        ExportLayout,
        typer.Option("--to", metavar=o.choices(ExportLayout), rich_help_panel=o.OUTPUT, case_sensitive=False,
                     help="clip-retrieval: img_emb/ + metadata/ for autofaiss and clip-retrieval; "
                     "segments: a segmented blip2 store (DIR new or empty)."),
    ] = ExportLayout.clip_retrieval,
    vectors: Annotated[
        ExportVectors,
        typer.Option("--vectors", metavar=o.choices(ExportVectors), rich_help_panel=o.OUTPUT, case_sensitive=False,
                     help="A store of 32 query vectors per image: mean (one re-normalised row per image) or "
                     "flatten (32 rows per image, each with its image_path and query number). "
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
    quiet: Annotated[bool, typer.Option("--quiet", "-q", rich_help_panel=o.OUTPUT, help="No summary on stderr.")] = False,
) -> None:
    """Write a vector store in clip-retrieval's layout, or copy it into a segmented store."""
    from .. import console
    from ..errors import UsageError
    from ..export import export_clip_retrieval, export_segments, read_captions
    from ..segments import is_segmented
    from ..store import StoreError, VectorStore

    if not VectorStore.exists(store):
        raise StoreError(f"no vector store at {str(store)!r}",
                         hint="pass what blip2 embed -o wrote: FILE.safetensors, FILE.npy or a directory")
    if output.exists() and not output.is_dir():
        raise UsageError(f"{str(output)!r} is a file; the export is a directory", hint="name a directory with -o")
    if to == ExportLayout.segments:
        if captions is not None or vectors != ExportVectors.mean:
            raise UsageError("--captions and --vectors apply to --to clip-retrieval",
                             hint="drop them with --to segments")
        if is_segmented(store):
            raise UsageError(f"{str(store)!r} is already a segmented store", hint="pass a FILE.safetensors or FILE.npy")
    src = VectorStore.open(store)
    try:
        if to == ExportLayout.segments:
            rows = export_segments(src, output)
            if not quiet:
                console.message(f"copied {rows:,} rows into the segmented store {output}")
            return
        names = read_captions(captions) if captions is not None else None
        written = export_clip_retrieval(src, output, vectors=vectors.value, rows_per_file=rows_per_file,
                                        captions=names)
        if not quiet:
            per = "" if written == src.rows else f" ({written // max(1, src.rows)} per image)"
            console.message(f"exported {src.rows:,} images as {written:,} vector rows{per} to "
                            f"{output / 'img_emb'} and {output / 'metadata'}")
    finally:
        src.close()


export.__doc__ = (export.__doc__ or "") + EXAMPLES
