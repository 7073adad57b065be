"""``blip2 embed``: BLIP-2's own vectors for images (and texts), as records or a vector store.

Also the pieces ``search`` and ``score`` share: loading a model for features,
the ``EmbedTask`` the pipeline runs, and embedding items into a store.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from .. import console
from .. import options as o
from ..choices import EmbedFormat, Features, Pool, StoreDtype, StoreLayout  # declared once, in the core
from ..embed import DEFAULT_RETRIEVAL_MODEL
from ..errors import sigterm_as_interrupt
# The core of embed, search and score (re-exported: older imports keep working).
from ..embed import EmbedTask, model_key  # noqa: F401
from ..embedstore import StoreSink, embed_into_store, open_update, store_settings, store_summary  # noqa: F401
from .common import check_output_path, finish, handles_errors, load_options, resolve_items

FEATURES_PANEL = "Features"

EXAMPLES = """

Examples:

\b
  blip2 embed photos/ -o vectors.safetensors     # a vector store (+ vectors.safetensors.index.parquet)
  blip2 embed photos/ -o vectors.safetensors --prune   # again later: only new/changed files
  blip2 embed cat.jpg -f jsonl | jq .dims
  blip2 embed --text "a cat on a sofa" --text "a dog"
  blip2 embed photos/ --pool mean -f csv -o vectors.csv
  blip2 embed photos/ -m Salesforce/blip2-opt-2.7b --features vision -o vision.npy
"""


FeaturesOpt = Annotated[
    Features,
    typer.Option(
        "--features", metavar=o.choices(Features), rich_help_panel=FEATURES_PANEL, case_sensitive=False,
        help="itc: BLIP-2's image-text embeddings (retrieval checkpoints); vision: the vision "
        "tower's pooled output; qformer: the Q-Former's query outputs. auto: itc on a retrieval "
        "checkpoint, qformer on a captioning one.",
    ),
]
PoolOpt = Annotated[
    Optional[Pool],
    typer.Option(
        "--pool", metavar=o.choices(Pool), rich_help_panel=FEATURES_PANEL, case_sensitive=False, show_default=False,
        help="none (default): every query embedding per image (32 x 256 for ITC); mean: their "
        "mean (re-normalised for ITC), one vector per image. An existing store keeps its own.",
    ),
]


def _wants_directory(output) -> bool:
    return output is not None and (output.is_dir() or getattr(output, "wants_directory", False))


def check_for_features(model: str, revision, device, dtype, quantize, offline, allow_pickle, *,
                       features: str, need_text: bool = False, need_itm: bool = False):
    """The LoadOptions of the loader flags, once the checkpoint is known to fit (no weights read)."""
    from ..embed import check_for_features as check

    opts = load_options(model, revision, device, dtype, quantize, offline, allow_pickle)
    return check(opts, features=features, need_text=need_text, need_itm=need_itm)


def load_for_features(model: str, revision, device, dtype, quantize, offline, allow_pickle, *,
                      features: str, task: str, need_text: bool = False, need_itm: bool = False):
    """Check the checkpoint against what the command needs (before any weights), then load."""
    from ..embed import load_for_features as load

    opts = load_options(model, revision, device, dtype, quantize, offline, allow_pickle)
    return load(opts, features=features, task=task, need_text=need_text, need_itm=need_itm)


def finish_store(stats) -> None:
    """Exit 1 if some images failed (their messages are above), else 0."""
    from ..errors import EXIT_ITEMS_FAILED, EXIT_OK

    if stats.failed:
        console.message(f"{stats.failed} of {stats.total} images failed (see the messages above)")
        raise typer.Exit(EXIT_ITEMS_FAILED)
    raise typer.Exit(EXIT_OK)


def _read_texts(texts, texts_file) -> list[str]:
    import sys

    from ..errors import InputError

    out = list(texts or [])
    if texts_file is not None:
        try:
            if str(texts_file) == "-":
                data = sys.stdin.read()
            else:
                data = Path(texts_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"cannot read --texts-file {str(texts_file)!r}: {exc}") from exc
        out.extend(line.rstrip("\r") for line in data.split("\n") if line.strip())
    return out


@handles_errors
@o.expands
def embed(
    inputs: o.Inputs = None,
    text: Annotated[
        Optional[list[str]],
        typer.Option("--text", "-t", metavar="TEXT", rich_help_panel=FEATURES_PANEL, show_default=False,
                     help="A text to embed in the image-text space (repeatable)."),
    ] = None,
    texts_file: Annotated[
        Optional[Path],
        typer.Option("--texts-file", metavar="FILE", rich_help_panel=FEATURES_PANEL, show_default=False,
                     help="Embed each non-empty line of FILE as a text (- for stdin)."),
    ] = None,
    features: FeaturesOpt = Features.auto,
    pool: PoolOpt = None,
    loading: o.Bundle = o.RETRIEVAL_LOADING,
    src: o.Bundle = o.SOURCES,
    carry: o.Carry = None,
    fmt: Annotated[
        Optional[EmbedFormat],
        typer.Option("--format", "-f", metavar=o.choices(EmbedFormat), rich_help_panel=o.OUTPUT, case_sensitive=False,
                     show_default=False, help="jsonl | csv | parquet. Default: from the -o extension; .safetensors or .npy write a vector store."),
    ] = None,
    output: Annotated[
        Optional[Path],
        typer.Option("--output", "-o", metavar="PATH", rich_help_panel=o.OUTPUT, show_default=False, parser=o.output_path,
                     help="Write to FILE instead of stdout. FILE.safetensors or FILE.npy: a vector store "
                     "with its index beside it (FILE.safetensors.index.parquet), updated incrementally."),
    ] = None,
    prune: Annotated[
        bool,
        typer.Option("--prune", rich_help_panel=o.OUTPUT,
                     help="Vector store: drop the rows of files that no longer exist."),
    ] = False,
    store_dtype: Annotated[
        Optional[StoreDtype],
        typer.Option("--store-dtype", metavar=o.choices(StoreDtype), rich_help_panel=o.OUTPUT, case_sensitive=False, show_default=False,
                     help="Vector store: float32 (default for a new store) or float16 (half the size)."),
    ] = None,
    layout: Annotated[
        Optional[StoreLayout],
        typer.Option("--layout", metavar=o.choices(StoreLayout), rich_help_panel=o.OUTPUT, case_sensitive=False,
                     show_default=False,
                     help="Vector store in the -o DIR: segments (appends write only the new rows; for big "
                     "collections), clip-retrieval (segments + img_emb/*.npy and metadata/*.parquet for "
                     "autofaiss and clip-retrieval, rewritten at each run). An existing DIR keeps its own."),
    ] = None,
    compact: Annotated[
        bool,
        typer.Option("--compact", rich_help_panel=o.OUTPUT,
                     help="Segmented store: merge all segments into one, dropping deleted rows."),
    ] = False,
    quiet: o.Quiet = False,
    batch_size: o.BatchSize = None,
    workers: o.Workers = None,
    preprocess: o.PreprocessOpt = o.Preprocess.fast,
    resume: o.Resume = False,
    fail_fast: o.FailFast = False,
    shard: o.ShardOpt = None,
    failed_list: o.FailedListOpt = None,
) -> None:
    """Embed images (and texts) with BLIP-2: one vector record per image, or a vector store."""
    from ..embed import Embedder, embed_schema, text_record
    from ..errors import UsageError
    from ..store import StoreMeta, is_store_path

    to_store = is_store_path(output) or (layout is not None and output is not None)
    if (layout is not None or compact) and not to_store:
        raise UsageError("--layout and --compact apply to a vector store directory",
                         hint="blip2 embed photos/ -o vectors/ --layout segments")
    from ..segments import is_segmented  # clip-retrieval: a store whose DIR holds img_emb/
    clip = layout == StoreLayout.clip_retrieval or (is_segmented(output) and (output / "img_emb").is_dir())
    if to_store and fmt is not None:
        raise UsageError(f"-o {output} writes a vector store; --format {fmt.value} does not apply",
                         hint="drop --format, or name a .jsonl/.csv output")
    if not to_store and (prune or store_dtype is not None):
        raise UsageError("--prune and --store-dtype apply to a vector store",
                         hint="name one with -o vectors.safetensors (or .npy)")
    fmt_name = "jsonl" if to_store else o.infer_format(fmt, output, formats=tuple(e.value for e in EmbedFormat))
    if texts_file is not None and str(texts_file) == "-" and "-" in [*(inputs or []), *(src.files_from or [])]:
        raise UsageError("stdin cannot hold both the texts (--texts-file -) and the images (-)")
    texts = _read_texts(text, texts_file)
    if texts and to_store:
        raise UsageError("a vector store holds images; texts go to JSON Lines or CSV",
                         hint="embed the texts in a separate run: blip2 embed --text ... -f jsonl")
    have_images = bool(inputs or src.files_from)
    if not texts and not have_images:
        raise UsageError(
            "nothing to embed: name images (files, folders, globs, -) or give --text",
            hint="blip2 embed photos/ -o vectors.safetensors   or   blip2 embed --text 'a cat'",
        )
    if not (shard is not None or _wants_directory(output)):
        check_output_path(output)
    model, revision, features_name, pool_name = store_settings(
        output if to_store else None, loading.model, loading.revision, features.value, pool.value if pool is not None else None
    )
    items, total = (None, 0)
    if have_images:
        items, total = resolve_items(inputs, command="embed", **vars(src))
        from ..guard import screen_inputs  # no output (a store and its index too) is an input
        from ..store import index_paths

        items = screen_inputs(items, total, [output, *index_paths(output)] if to_store else [output])

    if not to_store and not texts:
        # Image records to JSON Lines / CSV: the common job (--resume, -o DIR, --shard).
        from ..job import Job
        from ..loader import ALL_ARCHITECTURES

        opts = check_for_features(model, revision, loading.device, loading.dtype, loading.quantize, loading.offline, loading.allow_pickle,
                                  features=features_name)
        job = Job(
            command="embed",
            load_options=opts,
            architectures=ALL_ARCHITECTURES,
            make_task=lambda loaded: EmbedTask(loaded, Embedder(loaded, features_name, pool_name), preprocess.value),
            schema=embed_schema(),
            fmt="jsonl" if (fmt is None and (shard is not None or _wants_directory(output))) else fmt_name,
            output=output,
            extra_settings={"preprocess": preprocess.value, "features": features_name, "pool": pool_name},
            quiet=quiet,
            batch_size=batch_size,
            workers=workers,
            resume=resume,
            fail_fast=fail_fast,
            description="embedding",
            shard=shard,
        )
        from ..webdataset import configure

        configure(job, carry, src.ext)
        job.check()
        from ..failedlist import wrapper as failed_wrapper

        job.wrappers += [w for w in (failed_wrapper(failed_list, null=src.null),) if w]
        finish(job.run(items, total), output=output, quiet=quiet, job=job)
    if have_images and total is not None:
        from ..webdataset import refuse_with_shards

        refuse_with_shards(items, "a vector store or --text" if to_store or texts else "this output",
                           hint="write image records from the shards: -o vectors.jsonl (or .parquet, or -o DIR/)")
    if failed_list is not None:
        raise UsageError("--failed-list applies to image records (JSON Lines, CSV or Parquet), not yet to a "
                         "vector store or a run with --text", hint="the store's summary names the failures")
    if resume or shard is not None or fail_fast:
        raise UsageError(
            "--resume, --shard and --fail-fast apply to image records (JSON Lines or CSV); "
            "a vector store is incremental by itself, and texts are quick to redo",
            hint="drop the option, or embed images and texts in separate runs",
        )

    loaded = load_for_features(model, revision, loading.device, loading.dtype, loading.quantize, loading.offline, loading.allow_pickle,
                               features=features_name, task="embed", need_text=bool(texts))
    embedder = Embedder(loaded, features_name, pool_name)
    batch = batch_size or o.default_batch_size(loaded.device.type)
    jobs = workers or o.default_workers()

    if to_store:
        from ..loader import checkpoint_identity

        meta = StoreMeta(
            model=model_key(model), revision=revision, features=embedder.features, pool=pool_name,
            dims=embedder.dims, normalized=embedder.normalized,
            dtype=(store_dtype.value if store_dtype is not None else "float32"),
            checkpoint=checkpoint_identity(loaded.checkpoint),
        )
        with open_update(output, meta=meta, prune=prune, dtype_given=store_dtype is not None,
                         layout=None if layout is None else "segments", compact=compact) as update:
            selected = update.select(items)
            if total is not None:
                selected = list(selected)
                total = len(selected)
            task = EmbedTask(loaded, embedder, preprocess.value, identity=True)
            stats = embed_into_store(selected, update, task, total=total, batch_size=batch, workers=jobs,
                                     quiet=quiet)
            console.message(store_summary(output, update.stats, stats))
        if clip:
            from ..export import export_clip_retrieval
            from ..store import VectorStore

            with_store = VectorStore.open(output)
            export_clip_retrieval(with_store, output)
            with_store.close()
        finish_store(stats)

    from ..console import Reporter
    from ..pipeline import Stats, run
    from ..writers import Sink, make_writer

    out = Sink(str(output) if output is not None else None)
    stream = out.open()
    stats = Stats()
    try:
        writer = make_writer(fmt_name, stream, embed_schema())
        if texts:
            vectors = embedder.text_vectors(texts).numpy()
            for t, v in zip(texts, vectors):
                writer.write(text_record(t, v))
        if have_images:
            reporter = Reporter(quiet=quiet, total=total, description="embedding")
            try:
                with sigterm_as_interrupt():
                    stats = run(items, EmbedTask(loaded, embedder, preprocess.value), writer,
                                batch_size=batch, workers=jobs, reporter=reporter)
            finally:
                reporter.close()
        writer.close()
    finally:
        out.close()
    if not have_images:
        raise typer.Exit(0)
    finish(stats, output=output, quiet=quiet, fmt=fmt_name, command="embed")


embed.__doc__ = (embed.__doc__ or "") + EXAMPLES
