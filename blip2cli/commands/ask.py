"""``blip2 ask``: every question asked of every image, one record per (image, question)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .. import options as o
from ..ask import ASK_MAX_NEW_TOKENS, ASK_MIN_NEW_TOKENS, DEFAULT_TEMPLATE
from .common import check_output_path, configure_job, finish, handles_errors, html_output, load_options, resolve_items, sidecar_policy
from .questions import gather_questions

EXAMPLES = """

Examples:

\b
  blip2 ask cat.jpg "how many cats are there?"
  blip2 ask photos/ -q "what is in the picture?" -q "is it indoors?" -f jsonl
  blip2 ask photos/ --questions-file questions.txt -o answers.csv
  find . -name '*.png' | blip2 ask - "what color is the car?"
  blip2 ask img.jpg "Describe the image in detail." --raw --max-new-tokens 40
  blip2 ask photos/ -q "is it blurry?" -q "is there a person?" -o answers.html
"""

QUESTIONS = "Questions"

Arguments = Annotated[
    Optional[list[str]],
    typer.Argument(
        metavar="[IMAGES]... [QUESTION]",
        help="Image files, directories, quoted globs or - (stdin), then the question. "
        "With -q or --questions-file, every argument is an input.",
        show_default=False,
    ),
]
# ask's -q is --question, so its --quiet has no short form.
QuietLong = Annotated[bool, typer.Option("--quiet", rich_help_panel=o.OUTPUT, help="No progress bar and no summary line; errors still show.")]


@handles_errors
@o.expands
def ask(
    arguments: Arguments = None,
    question: Annotated[
        Optional[list[str]],
        typer.Option("--question", "-q", metavar="QUESTION", rich_help_panel=QUESTIONS, show_default=False,
                     help="A question to ask of every image (repeatable)."),
    ] = None,
    questions_file: Annotated[
        Optional[str],
        typer.Option("--questions-file", metavar="FILE", rich_help_panel=QUESTIONS, show_default=False,
                     help="Read questions from FILE, one per line (- for stdin); blank lines skipped."),
    ] = None,
    template: Annotated[
        Optional[str],
        typer.Option("--template", metavar="TEXT", rich_help_panel=QUESTIONS, show_default=False,
                     help=f'Prompt template; must contain {{question}}. Default: "{DEFAULT_TEMPLATE}".'),
    ] = None,
    raw: Annotated[
        bool, typer.Option("--raw", rich_help_panel=QUESTIONS, help="Send each question as is, without a template.")
    ] = False,
    loading: o.Bundle = o.LOADING,
    src: o.Bundle = o.SOURCES,
    carry: o.Carry = None,
    image_column: o.ImageColumn = None,
    dec: o.Bundle = o.DECODING.but(max_new_tokens=(o.MaxNewTokens, ASK_MAX_NEW_TOKENS),
                                    min_new_tokens=(o.MinNewTokens, ASK_MIN_NEW_TOKENS)),
    num_answers: Annotated[
        int, typer.Option(metavar="N", min=1, rich_help_panel=o.GENERATION, help="Answers per question (best beams, or samples).")
    ] = 1,
    fmt: o.FormatOpt = None,
    output: o.Output = None,
    html_links: o.HtmlLinks = False,
    quiet: QuietLong = False,
    perf: o.Bundle = o.COMPUTE,
    sidecars: o.Bundle = o.SIDECAR_FILES,
    running: o.Bundle = o.RUNNING,
    server: o.ServerOpt = None,
) -> None:
    """Ask questions about images: one record per image and question, streamed in input order."""
    from ..caption import GenerationOptions
    from ..errors import UsageError

    gen = GenerationOptions(num_captions=num_answers, static_cache=perf.compile_, **vars(dec))
    gen.validate(count_name="num_answers")
    prompt_template = _prompt_template(raw, template)
    inputs, questions = gather_questions(arguments or [], question or [], questions_file, src.files_from)
    policy = sidecar_policy(**vars(sidecars))
    fmt_name = o.infer_format(fmt, output)
    # One card per image: the answers to all its questions.
    thumbnails, html = html_output(fmt_name, html_links, output, per_card=len(questions))
    if policy is not None and len(questions) != 1:
        raise UsageError(
            f"--sidecar holds the answer to one question; {len(questions)} were given",
            hint="ask one question per sidecar run (use --sidecar-ext to keep several answers apart)",
        )
    job = _ask_job(gen, questions, prompt_template, thumbnails, loading=loading, perf=perf, running=running,
                   num_answers=num_answers, fmt_name=fmt_name, output=output, quiet=quiet, policy=policy,
                   seed=dec.seed, html=html)
    if server:  # a running `blip2 serve` is the model; the run is the same
        from .serve import generation_request, use_server

        use_server(job, server, generation_request(dec, num_answers=num_answers, template=prompt_template,
                                                   preprocess=perf.preprocess.value),
                   questions=questions, thumbnails=thumbnails, compile_=perf.compile_)
    if job.parts_mode() and fmt is None:
        job.fmt = "jsonl"
    configure_job(job, carry=carry, src=src, image_column=image_column, failed_list=running.failed_list)
    if not running.dry_run and not job.parts_mode():
        check_output_path(output)
    items, total = resolve_items(inputs, command="ask", **vars(src))
    finish(job.run(items, total), output=output, quiet=quiet, job=job)


def _prompt_template(raw: bool, template: str | None) -> str | None:
    """The checked prompt template; None with --raw (each question sent as is)."""
    from ..ask import check_template
    from ..errors import UsageError

    if raw and template is not None:
        raise UsageError("--raw and --template contradict each other", hint="use one of them")
    return None if raw else check_template(template if template is not None else DEFAULT_TEMPLATE)


def _ask_job(gen, questions: list[str], prompt_template: str | None, thumbnails, *, loading, perf, running,
             num_answers: int, fmt_name: str, output: Path | None, quiet: bool, policy, seed, html):
    """The Job that asks every question of every image (one record per image and question)."""
    from ..ask import AskTask, Asker, PAIRS_PER_IMAGE, answer_schema
    from ..images import ImageStage
    from ..job import Job
    from ..tasks import run_settings

    return Job(
        command="ask",
        load_options=load_options(**vars(loading)),
        make_task=lambda loaded: AskTask(
            Asker(loaded, gen, pairs_per_call=(perf.batch_size or o.default_batch_size(loaded.device.type)) * PAIRS_PER_IMAGE),
            ImageStage(loaded, perf.preprocess.value, thumbnails),
            questions,
            prompt_template,
        ),
        schema=answer_schema(num_answers),
        fmt=fmt_name,
        output=output,
        extra_settings=run_settings("ask", preprocess=perf.preprocess.value, gen=gen, template=prompt_template),
        quiet=quiet,
        batch_size=perf.batch_size,
        workers=perf.workers,
        sidecar=policy,
        resume=running.resume,
        dry_run=running.dry_run,
        fail_fast=running.fail_fast,
        keys_of_item=lambda item: [(item.name, q) for q in questions],
        description="answering",
        seed=seed,
        shard=running.shard,
        html=html,
    )


ask.__doc__ = (ask.__doc__ or "") + EXAMPLES
