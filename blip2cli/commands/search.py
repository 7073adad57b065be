"""``blip2 search``: rank images by BLIP-2's similarity to a text (or an image)."""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from .. import console
from .. import options as o
from .common import check_output_path, handles_errors, no_html, resolve_items
from .embed import (
    EmbedTask,
    Features,
    FeaturesOpt,
    store_settings,
    embed_into_store,
    load_for_features,
    model_key,
    open_update,
    store_summary,
)

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


def _rerank(hits, store, query: str, task: EmbedTask, embedder, batch_size: int) -> dict[int, float | None]:
    """ITM match probability for each hit (decoded again from its file); None if it cannot be read."""
    from ..decode import ImageError

    probs: dict[int, float | None] = {}
    for start in range(0, len(hits), batch_size):
        chunk = hits[start:start + batch_size]
        prepared, rows = [], []
        for hit in chunk:
            entry = store.entries[hit.row]
            try:
                prepared.append(task._decode(entry.abspath))
                rows.append(hit.row)
            except ImageError as exc:
                console.message(f"{entry.path}: cannot re-score it with ITM: {exc}")
                probs[hit.row] = None
        if not prepared:
            continue
        vision = embedder.encode_images(task.pixels(prepared))
        itm = embedder.itm_probabilities(vision.last_hidden_state, [query] * len(rows))
        probs.update({row: float(p) for row, p in zip(rows, itm.tolist())})
    return probs


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
        typer.Option("--index", metavar="FILE", rich_help_panel=SEARCH_PANEL, show_default=False,
                     help="A vector store (FILE.safetensors or FILE.npy) to search; images named as "
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
    import tempfile

    from ..embed import Embedder, pooled_query, search_schema
    from ..errors import InputError, UsageError
    from ..decode import ImageError
    from ..store import StoreMeta, VectorStore, is_store_path, top_k as store_top_k

    args = list(arguments or [])
    if image is None:
        if not args:
            raise UsageError("no query: give a text to search for, or --image FILE",
                             hint='blip2 search "a cat on a sofa" photos/')
        query, inputs = args[0], args[1:]
    else:
        query, inputs = None, args
    if rerank is not None and query is None:
        raise UsageError("--rerank scores a text against images; it does not apply to --image",
                         hint="drop --rerank")
    if rerank is not None and rerank < top_k:
        raise UsageError(f"--rerank {rerank} is less than -k {top_k}: the re-scored results are the ones printed",
                         hint=f"use --rerank {top_k} or more, or a smaller -k")
    have_images = bool(inputs or src.files_from)
    if index is not None and not is_store_path(index):
        raise UsageError(f"--index {index}: a vector store is named FILE.safetensors or FILE.npy, "
                         "or is a directory written with --layout segments")
    if ann and (index is None or have_images or rerank is not None):
        raise UsageError("--ann searches a whole vector store: give --index, without images or --rerank",
                         hint='blip2 search "a cat" --index vectors/ --ann')
    if not have_images and index is None:
        raise UsageError("nothing to search: name images (files, folders, globs, -) or a vector store with --index",
                         hint='blip2 search "a cat" photos/   or   blip2 search "a cat" --index vectors.safetensors')
    if index is not None and not have_images:
        VectorStore.open(index)  # raises if there is no store to search
    model, revision, wanted_features, pool = store_settings(index, loading.model, loading.revision, features.value, None)
    fmt_name = o.infer_format(fmt, output)
    no_html(fmt_name, "search")
    protected = [image, index]
    if index is not None and is_store_path(index):
        from ..store import index_paths

        protected.extend(index_paths(index))
    check_output_path(output, inputs=protected)
    if image is not None and not Path(image).is_file():
        raise InputError(f"--image {image}: no such file")
    items, total = (None, 0)
    if have_images:
        items, total = resolve_items(inputs, command="search", **vars(src))
        from ..guard import screen_inputs

        items = screen_inputs(items, total, [output])  # an output is never one of the inputs

    loaded = load_for_features(model, revision, loading.device, loading.dtype, loading.quantize, loading.offline, loading.allow_pickle,
                               features=wanted_features, task="search", need_text=query is not None,
                               need_itm=rerank is not None)
    embedder = Embedder(loaded, wanted_features, pool)
    batch = batch_size or o.default_batch_size(loaded.device.type)
    task = EmbedTask(loaded, embedder, preprocess.value, identity=True)

    if query is not None:
        qvec, mode = embedder.text_vectors([query])[0].numpy(), "text"
    else:
        try:
            arr = task._decode(str(image))
        except ImageError as exc:
            raise InputError(f"cannot read the query image {str(image)!r}: {exc}") from None
        qvec = pooled_query(embedder.image_vectors(task.pixels([arr]))[0].numpy())
        mode = "image"

    stats = None
    with tempfile.TemporaryDirectory(prefix="blip2-search-") as tmp:
        store_path = index if index is not None else Path(tmp) / "vectors.npy"
        wanted: dict[str, str] | None = None  # abspath -> the name this run gave it
        if items is not None:
            wanted = {}

            def remember(stream):
                for item in stream:
                    if item.error is None and isinstance(item.source, str):
                        wanted.setdefault(os.path.abspath(item.source), item.name)
                    yield item

            meta = StoreMeta(model=model_key(model), revision=revision, features=embedder.features, pool=pool,
                             dims=embedder.dims, normalized=embedder.normalized)
            with open_update(store_path, meta=meta, prune=prune, dtype_given=False) as update:
                selected = update.select(remember(items))
                if total is not None:
                    selected = list(selected)
                    total = len(selected)
                stats = embed_into_store(selected, update, task, total=total, batch_size=batch,
                                         workers=workers or o.default_workers(), quiet=quiet)
                if index is not None and not quiet:
                    console.message(store_summary(index, update.stats, stats))
        store = VectorStore.open(store_path)
        rows, names = None, {}
        if wanted is not None:
            for abspath, name in wanted.items():
                row = store.row_of(abspath)
                if row is not None:
                    names[row] = name
            rows = sorted(names)
        if ann:
            from .. import ann as ann_search

            if mode == "image" and (len(store.meta.dims) > 1 or not store.meta.normalized):
                raise UsageError("--ann with --image needs a store of one unit vector per image (--pool mean, "
                                 "itc features)", hint="drop --ann")
            hits = ann_search.search(store, ann_search.load_or_build(store, quiet=quiet), qvec, top_k)
        else:
            if store.rows >= 10_000_000 and not quiet:
                console.message(f"exact search over {store.rows:,} rows; --ann is faster (approximate)")
            hits = store_top_k(store, qvec, rerank or top_k, mode=mode, rows=rows)
        itm: dict[int, float | None] = {}
        if rerank is not None:
            itm = _rerank(hits, store, query, task, embedder, batch)
            hits.sort(key=lambda h: (itm.get(h.row) is None, -(itm.get(h.row) or 0.0), -h.score, h.row))
        records = []
        for rank, hit in enumerate(hits[:top_k], 1):
            prob = itm.get(hit.row) if rerank is not None else None
            records.append({
                "rank": rank,
                "path": names.get(hit.row, store.entries[hit.row].path),
                "score": prob if rerank is not None else hit.score,
                "itc": hit.score if mode == "text" else None,
                "itm": prob,
            })
        store.close()

    from ..writers import Sink, make_writer

    schema = search_schema()
    out = Sink(str(output) if output is not None else None)
    stream = out.open()
    try:
        writer = make_writer(fmt_name, stream, schema)
        for record in records:
            writer.write(record)
        writer.close()
    finally:
        out.close()
    if stats is not None and stats.failed:
        console.message(f"{stats.failed} of {stats.total} images failed (see the messages above); "
                        "the others were searched")
        raise typer.Exit(1)
    raise typer.Exit(0)


search.__doc__ = inspect.cleandoc(search.__doc__ or "") + EXAMPLES
