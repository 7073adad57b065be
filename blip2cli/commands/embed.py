"""``blip2 embed``: BLIP-2's own vectors for images (and texts), as records or a vector store.

Also the pieces ``search`` and ``score`` share: loading a model for features,
the ``EmbedTask`` the pipeline runs, and embedding items into a store.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .. import console
from .. import options as o
from ..choices import EmbedFormat, Features, Pool, StoreDtype  # declared once, in the core
from ..embed import EmbedTask, model_key
from ..embedstore import StoreOutput, store_settings
from .common import check_output_path, configure_job, finish, handles_errors, load_options, resolve_items

FEATURES_PANEL = "Features"

EXAMPLES = """

Examples:

\b
  blip2 embed photos/ -o vectors.safetensors     # a vector store: the folder vectors.safetensors/
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
    image_column: o.ImageColumn = None,
    fmt: Annotated[
        Optional[EmbedFormat],
        typer.Option("--format", "-f", metavar=o.choices(EmbedFormat), rich_help_panel=o.OUTPUT, case_sensitive=False,
                     show_default=False, help="jsonl | csv | parquet. Default: from the -o extension; .safetensors or .npy write a vector store."),
    ] = None,
    output: Annotated[
        Optional[Path],
        typer.Option("--output", "-o", metavar="PATH", rich_help_panel=o.OUTPUT, show_default=False, parser=o.output_path,
                     help="Write to FILE instead of stdout. NAME.safetensors or NAME.npy (or an existing store): "
                     "a vector store, the folder NAME.safetensors/, updated incrementally (appends write only "
                     "the new rows)."),
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
    compact: Annotated[
        bool,
        typer.Option("--compact", rich_help_panel=o.OUTPUT,
                     help="Vector store: merge all its segments into one, dropping deleted rows."),
    ] = False,
    quiet: o.Quiet = False,
    batch_size: o.BatchSize = None,
    workers: o.Workers = None,
    preprocess: o.PreprocessOpt = o.Preprocess.fast,
    resume: o.Resume = False,
    fail_fast: o.FailFast = False,
    shard: o.ShardOpt = None,
    failed_list: o.FailedListOpt = None,
    server: o.ServerOpt = None,
) -> None:
    """Embed images (and texts) with BLIP-2: one vector record per image, or a vector store."""
    to_store = _check_flags(output, fmt, compact, prune, store_dtype)
    fmt_name = "jsonl" if to_store else o.infer_format(fmt, output, formats=tuple(e.value for e in EmbedFormat))
    texts, have_images = _texts(text, texts_file, inputs, src.files_from, to_store)
    if not (shard is not None or _wants_directory(output)):
        check_output_path(output)
    model, revision, features_name, pool_name = store_settings(
        output if to_store else None, loading.model, loading.revision, features.value, pool.value if pool is not None else None
    )
    items, total = resolve_items(inputs, command="embed", **vars(src)) if have_images else ([], 0)
    _refuse_mixes(inputs, output, items if total is not None else [], to_store=to_store, texts=texts,
                  failed_list=failed_list, resume=resume, shard=shard, fail_fast=fail_fast)
    opts = load_options(**vars(loading)) if server else check_for_features(  # a server checks its own
        model, revision, loading.device, loading.dtype, loading.quantize, loading.offline, loading.allow_pickle,
        features=features_name, need_text=bool(texts))
    job = _embed_job(
        opts, features_name, pool_name, preprocess.value, texts,
        fmt="jsonl" if (fmt is None and (shard is not None or _wants_directory(output))) else fmt_name,
        output=output, quiet=quiet, batch_size=batch_size, workers=workers, resume=resume, fail_fast=fail_fast,
        shard=shard,
        store=_store_output(output, model, revision, pool_name, store_dtype, prune, compact) if to_store else None,
    )
    if server:
        _embed_on_server(job, server, features_name, pool_name, preprocess.value, texts, store_dtype)
    configure_job(job, carry=carry, src=src, image_column=image_column, failed_list=failed_list)
    result = job.run(items, total)
    if not have_images:
        raise typer.Exit(0)
    if to_store:
        finish_store(result.stats)
    finish(result, output=output, quiet=quiet, job=job)


def _embed_job(opts, features_name: str, pool_name: str, preprocess: str, texts: list[str], *, store, **job_options):
    """The Job that embeds the images (into ``store`` when given), its texts' records first."""
    from ..embed import Embedder, embed_schema
    from ..job import Job
    from ..loader import ALL_ARCHITECTURES
    from ..tasks import run_settings

    return Job(
        command="embed", load_options=opts, architectures=ALL_ARCHITECTURES,
        make_task=lambda loaded: EmbedTask(loaded, Embedder(loaded, features_name, pool_name), preprocess,
                                           identity=store is not None),
        schema=embed_schema(),
        extra_settings=run_settings("embed", preprocess=preprocess, features=features_name, pool=pool_name),
        description="embedding",
        lead=(lambda task: _text_records(task.embedder, texts)) if texts else None,
        store=store, **job_options,
    )


def _check_flags(output, fmt, compact, prune, store_dtype) -> bool:
    """Whether -o names a vector store; refuses the store options without one (and --format with one)."""
    from ..errors import UsageError
    from ..store import is_store_path

    to_store = is_store_path(output)
    if compact and not to_store:
        raise UsageError("--compact applies to a vector store",
                         hint="blip2 embed photos/ -o vectors.safetensors --compact")
    if to_store and fmt is not None:
        raise UsageError(f"-o {output} writes a vector store; --format {fmt.value} does not apply",
                         hint="drop --format, or name a .jsonl/.csv output")
    if not to_store and (prune or store_dtype is not None):
        raise UsageError("--prune and --store-dtype apply to a vector store",
                         hint="name one with -o vectors.safetensors (or .npy)")
    return to_store


def _texts(text, texts_file, inputs, files_from, to_store: bool) -> tuple[list[str], bool]:
    """(the texts to embed, whether images were named); refuses a run with neither."""
    from ..errors import UsageError

    if texts_file is not None and str(texts_file) == "-" and "-" in [*(inputs or []), *(files_from or [])]:
        raise UsageError("stdin cannot hold both the texts (--texts-file -) and the images (-)")
    texts = _read_texts(text, texts_file)
    if texts and to_store:
        raise UsageError("a vector store holds images; texts go to JSON Lines or CSV",
                         hint="embed the texts in a separate run: blip2 embed --text ... -f jsonl")
    have_images = bool(inputs or files_from)
    if not texts and not have_images:
        raise UsageError(
            "nothing to embed: name images (files, folders, globs, -) or give --text",
            hint="blip2 embed photos/ -o vectors.safetensors   or   blip2 embed --text 'a cat'",
        )
    return texts, have_images


def _refuse_mixes(inputs, output, items, *, to_store: bool, texts, failed_list, resume, shard, fail_fast) -> None:
    """What a vector store (or a run with --text) cannot be given."""
    if to_store:
        _refuse_store_as_input(inputs, output)
    if to_store or texts:
        _refuse_for_store_or_texts(items, failed_list if texts else None, resume, shard, fail_fast)


def _refuse_for_store_or_texts(items, failed_list, resume, shard, fail_fast) -> None:
    """What a vector store or a run with --text does not do."""
    from ..errors import UsageError
    from ..webdataset import refuse_with_shards

    refuse_with_shards(items, "a vector store or --text",
                       hint="write image records from the shards: -o vectors.jsonl (or .parquet, or -o DIR/)")
    if failed_list is not None:
        raise UsageError("--failed-list lists images that failed, not texts",
                         hint="embed the images and the texts in separate runs")
    if resume or shard is not None or fail_fast:
        raise UsageError(
            "--resume, --shard and --fail-fast apply to image records (JSON Lines or CSV); "
            "a vector store is incremental by itself, and texts are quick to redo",
            hint="drop the option, or embed images and texts in separate runs",
        )


def _text_records(embedder, texts: list[str]):
    from ..embed import text_record

    for t, v in zip(texts, embedder.text_vectors(texts).numpy()):
        yield text_record(t, v)


def _refuse_store_as_input(inputs, output) -> None:
    """The store folder (or a file in it) named as an input: refused with a clearer message than
    the output plan's (which compares every file of the store by inode)."""
    from ..errors import UsageError
    from ..store import inside

    for given in inputs or []:
        if str(given) != "-" and inside(output, given):
            raise UsageError(f"the input {str(given)!r} is also the output {str(output)!r}: writing "
                             "would destroy it", hint="name the images, not the vector store")


def _store_output(output, model, revision, pool_name, store_dtype, prune, compact):
    """The vector store as the run's output: its settings are the embedder's, known once loaded."""
    def meta(task):
        e = task.embedder
        return _store_meta(model, revision, pool_name, store_dtype, features=e.features, dims=e.dims,
                           normalized=e.normalized, checkpoint=e.loaded.identity)  # hashed once, by the load plan

    return StoreOutput(output, meta, prune=prune, dtype_given=store_dtype is not None, compact=compact)


def _embed_on_server(job, server: str, features_name: str, pool_name: str, preprocess: str, texts: list[str],
                     store_dtype) -> None:
    """The job's model a `blip2 serve` (``--server``): its image vectors, its texts' vectors
    first, and a vector store's settings from it."""
    from .serve import use_server

    remote = use_server(job, server, {"features": features_name, "pool": pool_name, "preprocess": preprocess},
                        identity=job.store is not None)
    if job.store is not None:
        job.store.meta = _remote_store_meta(remote, pool_name, store_dtype)
    if texts:
        job.lead = lambda stage: stage.text_records(texts)


def _remote_store_meta(remote, pool_name, store_dtype):
    """A vector store's settings when a server embeds (``--server``): its model, revision and
    checkpoint, and what its vectors are (asked before the first image)."""
    def meta(task):
        described, settings = task.describe(), remote.settings()
        return _store_meta(settings.get("model"), settings.get("revision"), pool_name, store_dtype,
                           features=described["features"], dims=tuple(described["dims"]),
                           normalized=bool(described["normalized"]), checkpoint=settings.get("checkpoint"))

    return meta


def _store_meta(model, revision, pool_name, store_dtype, *, features, dims, normalized, checkpoint):
    """A vector store's settings (``storefiles.StoreMeta``), whoever embeds: the model as the
    store records it, the storage dtype asked for (float32 by default)."""
    from ..storefiles import StoreMeta

    return StoreMeta(model=model_key(model), revision=revision, features=features, pool=pool_name, dims=dims,
                     normalized=normalized, dtype=store_dtype.value if store_dtype is not None else "float32",
                     checkpoint=checkpoint)


embed.__doc__ = (embed.__doc__ or "") + EXAMPLES
