"""``blip2 caption``: one caption per image, streamed as each batch ends."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from .. import options as o
from ..caption import CaptionTask
from .common import check_output_path, finish, handles_errors, html_output, load_options, resolve_items, sidecar_policy

EXAMPLES = """

Examples:

\b
  blip2 caption photos/                     # a folder, recursively
  blip2 caption 'photos/**/*.jpg' -o captions.jsonl
  find . -name '*.png' | blip2 caption - -f csv
  curl -s https://example.com/cat.jpg | blip2 caption -
  blip2 caption img.jpg --prompt "a photo of" --num-beams 5 --num-captions 3
  blip2 caption photos/ -o sheet.html          # a contact sheet to look through
  blip2 caption photos/ -o captions.parquet     # typed columns, row groups as it goes
  blip2 caption train/ --metadata              # train/metadata.jsonl for load_dataset("imagefolder")
  blip2 caption train/ --sidecar --sidecar-ext .caption --failed-list failed.txt   # kohya
  blip2 caption 'shards/{00000..00099}.tar' -o out/ --carry txt,json   # WebDataset: out/00000.jsonl ...
"""


@handles_errors
@o.expands
def caption(
    inputs: o.Inputs = None,
    loading: o.Bundle = o.LOADING,
    src: o.Bundle = o.SOURCES,
    carry: o.Carry = None,
    image_column: o.ImageColumn = None,
    prompt: Annotated[
        Optional[str],
        typer.Option(metavar="TEXT", rich_help_panel=o.GENERATION, help='Text the caption continues, e.g. "a photo of".'),
    ] = None,
    dec: o.Bundle = o.DECODING,
    num_captions: Annotated[
        int, typer.Option(metavar="N", min=1, rich_help_panel=o.GENERATION, help="Captions per image (best beams, or samples).")
    ] = 1,
    fmt: o.FormatOpt = None,
    output: o.Output = None,
    html_links: o.HtmlLinks = False,
    quiet: o.Quiet = False,
    perf: o.Bundle = o.COMPUTE,
    sidecars: o.Bundle = o.SIDECAR_FILES,
    running: o.Bundle = o.RUNNING,
    metadata: o.Metadata = False,
    metadata_format: o.MetadataFormat = "jsonl",
    server: o.ServerOpt = None,
) -> None:
    """Caption images: one record per image, streamed in input order."""
    from ..caption import Captioner, GenerationOptions, caption_schema
    from ..job import Job
    from ..tasks import run_settings

    gen = GenerationOptions(prompt=prompt, num_captions=num_captions, static_cache=perf.compile_, **vars(dec))
    gen.validate()
    fmt_name = o.infer_format(fmt, output)
    thumbnails, html = html_output(fmt_name, html_links, output, per_card=1)
    policy = sidecar_policy(**vars(sidecars))
    job = Job(
        command="caption",
        load_options=load_options(**vars(loading)),
        make_task=lambda loaded: CaptionTask(loaded, Captioner(loaded, gen), perf.preprocess.value, thumbnails),
        schema=caption_schema(gen.num_captions),
        fmt=fmt_name,
        output=output,
        extra_settings=run_settings("caption", preprocess=perf.preprocess.value, gen=gen),
        quiet=quiet,
        batch_size=perf.batch_size,
        workers=perf.workers,
        sidecar=policy,
        resume=running.resume,
        dry_run=running.dry_run,
        fail_fast=running.fail_fast,
        description="captioning",
        seed=dec.seed,
        shard=running.shard,
        html=html,
    )
    if server:  # a running `blip2 serve` is the model; the run is the same
        from .serve import generation_request, use_server

        use_server(job, server, generation_request(dec, prompt=gen.prompt, num_captions=gen.num_captions,
                                                   preprocess=perf.preprocess.value),
                   thumbnails=thumbnails, compile_=perf.compile_)
    if job.parts_mode() and fmt is None:
        job.fmt = "jsonl"  # an output directory holds JSON Lines part files
    from .. import failedlist
    from .. import metadata as hf_metadata
    from ..webdataset import configure, refuse_with_shards

    configure(job, carry, src.ext, image_column)
    job.check()
    job.wrappers += [w for w in (
        hf_metadata.for_run(inputs, wanted=metadata, fmt=metadata_format, several=gen.num_captions > 1,
                            sidecar=policy, resume=running.resume, parts=job.parts_mode()),
        failedlist.wrapper(running.failed_list, null=src.null),
    ) if w]
    if not running.dry_run and not job.parts_mode():
        check_output_path(output)
    items, total = resolve_items(inputs, command="caption", **vars(src))
    if metadata and total is not None:
        refuse_with_shards(items, "--metadata", hint="write records instead: -o DIR (one file per shard)")
    result = job.run(items, total)
    finish(result, output=output, quiet=quiet, job=job)


caption.__doc__ = (caption.__doc__ or "") + EXAMPLES
