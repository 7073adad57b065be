"""``blip2 search``: rank images by BLIP-2's similarity to a text (or an image)."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Annotated, Optional

import typer

from .. import console
from .. import options as o
from .common import check_output_path, handles_errors, no_html, resolve_items
from ..choices import Features
from ..embed import EmbedTask
from ..embedstore import store_settings
from .embed import FeaturesOpt, load_for_features

SEARCH_PANEL = "Search"

EXAMPLES = """

Examples:

\b
  blip2 search "a cat on a sofa" photos/                 # embed photos/ in memory, rank
  blip2 search "a cat on a sofa" photos/ --index vectors.safetensors -k 20   # cached
  blip2 search "a cat on a sofa" --index vectors.safetensors --rerank 50     # ITM re-scoring
  blip2 search --image query.jpg photos/ --index vectors.safetensors        # image to image
  blip2 search "a red car" --index vectors.safetensors -f jsonl | jq -r .path
"""


def _split_arguments(arguments, image) -> tuple[str | None, list[str]]:
    """(the query text, the image inputs) of the positional arguments."""
    from ..errors import UsageError

    args = list(arguments or [])
    if image is not None:
        return None, args
    if not args:
        raise UsageError("no query: give a text to search for, or --image FILE",
                         hint='blip2 search "a cat on a sofa" photos/')
    return args[0], args[1:]


def _check_flags(query, *, have_images: bool, index, top_k: int, rerank, ann: bool) -> None:
    """Refuse the combinations of flags that cannot run (before any model is loaded)."""
    from ..errors import UsageError
    from ..retrieval import ann_fits
    from ..store import VectorStore, is_store_path

    if rerank is not None and query is None:
        raise UsageError("--rerank scores a text against images; it does not apply to --image",
                         hint="drop --rerank")
    if rerank is not None and rerank < top_k:
        raise UsageError(f"--rerank {rerank} is less than -k {top_k}: the re-scored results are the ones printed",
                         hint=f"use --rerank {top_k} or more, or a smaller -k")
    if index is not None and not is_store_path(index):
        raise UsageError(f"--index {index}: not a vector store (a folder written by blip2 embed -o "
                         "NAME.safetensors, holding blip2-store.json)", hint="name what blip2 embed -o wrote")
    if ann and (index is None or have_images or rerank is not None):
        raise UsageError("--ann searches a whole vector store: give --index, without images or --rerank",
                         hint='blip2 search "a cat" --index vectors.safetensors --ann')
    if not have_images and index is None:
        raise UsageError("nothing to search: name images (files, folders, globs, -) or a vector store with --index",
                         hint='blip2 search "a cat" photos/   or   blip2 search "a cat" --index vectors.safetensors')
    if index is not None and not have_images:
        opened = VectorStore.open(index)  # raises if there is no store to search
        empty, meta = opened.rows == 0, opened.meta
        opened.close()
        if ann and empty:
            from ..storefiles import StoreError

            raise StoreError(f"the vector store {str(index)!r} is empty: there is nothing to search",
                             hint=f"embed images into it first: blip2 embed PHOTOS -o {index}")
        if ann and query is None and not ann_fits(meta):
            raise UsageError("--ann with --image needs a store of one unit vector per image (--pool mean, "
                             "itc features)", hint="drop --ann")


def _guard(guard, output, image, index, files_from, items):
    """The run's output plan (the ``-o`` file, locked for the run; the store when images are
    embedded into it) checked against itself, against every file the run reads (the query
    image, the store's files, the ``--files-from`` lists, the images) and held: before the
    model loads and before anything is written. Returns the screened items."""
    from ..errors import InputError
    from ..guard import OutputPlan
    from ..store import store_files

    check_output_path(output)  # a file in a folder that exists and is writable
    stored = store_files(index) if index is not None else []
    plan = OutputPlan()
    plan.add(output, "the output file", "output", lock=True)
    if items is not None:  # the images are embedded into the store first: it is written too
        for path in stored:
            plan.add(path, "the vector store", "index")
        stored = []
    guard.plan(plan)
    guard.refuse_inputs([image, *stored, *(files_from or [])])  # no file the run only reads is the output
    if image is not None and not Path(image).is_file():
        raise InputError(f"--image {image}: no such file")
    items = guard.screen(items) if items is not None else None
    guard.hold()
    return items


def _exit(stats) -> None:
    """Exit 1 when images failed to embed (the others were searched), else 0."""
    if stats is not None and stats.failed:
        console.message(f"{stats.failed} of {stats.total} images failed (see the messages above); "
                        "the others were searched")
        raise typer.Exit(1)
    raise typer.Exit(0)


def _write(records, fmt_name: str, output) -> None:
    from ..embed import search_schema
    from ..writers import write_records

    write_records(records, fmt_name, output, search_schema())


@handles_errors
@o.expands
def search(
    arguments: Annotated[
        Optional[list[str]],
        typer.Argument(
            metavar="[QUERY] [IMAGES]...",
            help="The QUERY text, then the images to search (files, folders, globs, -). "
            "With --image, only images.",
            show_default=False,
        ),
    ] = None,
    image: Annotated[
        Optional[Path],
        typer.Option("--image", metavar="FILE", rich_help_panel=SEARCH_PANEL, show_default=False,
                     help="Search by image: rank by similarity to this image instead of a text."),
    ] = None,
    index: Annotated[
        Optional[Path],
        typer.Option("--index", metavar="STORE", rich_help_panel=SEARCH_PANEL, show_default=False,
                     help="A vector store (what blip2 embed -o NAME.safetensors wrote) to search; images named as "
                     "inputs that it lacks (or that changed) are embedded into it first."),
    ] = None,
    top_k: Annotated[
        int, typer.Option("--top-k", "-k", metavar="N", min=1, rich_help_panel=SEARCH_PANEL, help="How many results to print."),
    ] = 10,
    rerank: Annotated[
        Optional[int],
        typer.Option("--rerank", metavar="N", min=1, rich_help_panel=SEARCH_PANEL, show_default=False,
                     help="Re-score the N best with the image-text matching head and rank them by "
                     "its match probability (N >= -k; text queries, retrieval checkpoints)."),
    ] = None,
    features: FeaturesOpt = Features.auto,
    loading: o.Bundle = o.RETRIEVAL_LOADING,
    src: o.Bundle = o.SOURCES,
    fmt: o.FormatOpt = None,
    output: o.Output = None,
    prune: Annotated[
        bool, typer.Option("--prune", rich_help_panel=SEARCH_PANEL,
                           help="--index: drop the rows of files that no longer exist."),
    ] = False,
    ann: Annotated[
        bool, typer.Option("--ann", rich_help_panel=SEARCH_PANEL,
                           help="--index: approximate search with faiss (pip install 'blip2-cli[ann]'): an "
                           "IVF index built once per store version and saved beside it. For stores of "
                           "10,000,000+ rows; exact search is the default."),
    ] = False,
    quiet: o.Quiet = False,
    batch_size: o.BatchSize = None,
    workers: o.Workers = None,
    preprocess: o.PreprocessOpt = o.Preprocess.fast,
) -> None:
    """Rank images by BLIP-2's similarity to a text (ITC: the maximum over the 32
    query embeddings of the dot product with the text embedding) or to an image
    (--image: cosine of the mean-pooled embeddings). The model defaults to the one
    that built --index, else Salesforce/blip2-itm-vit-g."""
    from ..guard import RunGuard

    query, inputs = _split_arguments(arguments, image)
    have_images = bool(inputs or src.files_from)
    _check_flags(query, have_images=have_images, index=index, top_k=top_k, rerank=rerank, ann=ann)
    model, revision, wanted_features, pool = store_settings(index, loading.model, loading.revision, features.value, None)
    fmt_name = o.infer_format(fmt, output)
    no_html(fmt_name, "search")
    items, total = resolve_items(inputs, command="search", **vars(src)) if have_images else (None, 0)
    guard = RunGuard(streaming=have_images and total is None)
    try:
        items = _guard(guard, output, image, index, src.files_from, items)
        found = _search(query, image, index, items, total, model, revision, wanted_features, pool, loading,
                        top_k=top_k, rerank=rerank, ann=ann, prune=prune, quiet=quiet, batch_size=batch_size,
                        workers=workers, preprocess=preprocess)
        _write(found.records, fmt_name, output)
    finally:
        guard.release()
    _exit(found.stats)


def _search(query, image, index, items, total, model, revision, wanted_features, pool, loading, *, top_k, rerank,
            ann, prune, quiet, batch_size, workers, preprocess):
    """Load the model, embed the images (into --index, else a temporary store), rank."""
    from ..embed import Embedder
    from ..retrieval import search_images

    loaded = load_for_features(model, revision, loading.device, loading.dtype, loading.quantize, loading.offline, loading.allow_pickle,
                               features=wanted_features, task="search", need_text=query is not None,
                               need_itm=rerank is not None)
    embedder = Embedder(loaded, wanted_features, pool)
    batch = batch_size or o.default_batch_size(loaded.device.type)
    task = EmbedTask(loaded, embedder, preprocess.value, identity=True)
    found = search_images(task=task, embedder=embedder, query=query, image=image, index=index, items=items,
                          total=total, model=model, revision=revision, pool=pool, top_k=top_k, rerank_k=rerank,
                          ann=ann, prune=prune, batch_size=batch, workers=workers or o.default_workers(), quiet=quiet,
                          slow_note="exact search over {rows:,} rows; --ann is faster (approximate)")
    return found


search.__doc__ = inspect.cleandoc(search.__doc__ or "") + EXAMPLES
