"""``blip2 serve``: keep one model loaded and answer HTTP requests (``serve.py``);
and ``blip2 caption|ask|embed --server URL``: the same commands, run by a server
(``client.py``), their records written here by the usual writers."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from .. import console
from .. import options as o
from .common import (
    check_output_path,
    finish,
    handles_errors,
    load_options,
    resolve_items,
)

SERVER = "Server"

EXAMPLES = """

Examples:

\b
  blip2 serve -m opt-2.7b                        # http://127.0.0.1:8000, OpenAI-compatible
  blip2 serve --host 0.0.0.0 --api-key "$KEY"     # on the network: always with a key
  blip2 caption photos/ --server http://127.0.0.1:8000 -o captions.jsonl
  curl -s localhost:8000/v1/chat/completions -H 'content-type: application/json' -d @request.json
"""


@handles_errors
@o.expands
def serve(
    loading: o.Bundle = o.LOADING,
    host: Annotated[str, typer.Option("--host", metavar="ADDR", rich_help_panel=SERVER,
                                      help="Address to listen on. Anything but loopback needs --api-key to be safe.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", "-p", metavar="N", min=0, max=65535, rich_help_panel=SERVER,
                                      help="TCP port.")] = 8000,
    api_key: Annotated[Optional[str], typer.Option(
        "--api-key", metavar="KEY", envvar="BLIP2_API_KEY", show_envvar=True, rich_help_panel=SERVER, show_default=False,
        help="Every endpoint but /health then needs Authorization: Bearer KEY.")] = None,
    max_batch_size: Annotated[int, typer.Option("--max-batch-size", metavar="N", min=1, rich_help_panel=SERVER,
                                                help="Images per model call, across requests.")] = 16,
    batch_wait_ms: Annotated[float, typer.Option("--batch-wait-ms", metavar="MS", min=0, rich_help_panel=SERVER,
                                                 help="How long the model waits for more requests to batch.")] = 10.0,
    max_queue: Annotated[int, typer.Option("--max-queue", metavar="N", min=1, rich_help_panel=SERVER,
                                           help="Images waiting for the model, at most; beyond: 503 with Retry-After.")] = 256,
    max_body_mb: Annotated[float, typer.Option("--max-body-mb", metavar="MB", min=0.001, rich_help_panel=SERVER,
                                               help="Largest request body accepted (413 beyond).")] = 32.0,
    allow_urls: Annotated[bool, typer.Option("--allow-urls", rich_help_panel=SERVER,
                                             help="Let requests name http(s) image URLs, fetched by the server.")] = False,
    allow_files: Annotated[Optional[Path], typer.Option(
        "--allow-files", metavar="DIR", rich_help_panel=SERVER, show_default=False, file_okay=False,
        help="Let requests name image files (paths or file: URLs) under DIR, and nowhere else.")] = None,
    workers: o.Workers = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", rich_help_panel=o.OUTPUT,
                                        help="No line per request on stderr.")] = False,
) -> None:
    """Keep a model loaded and answer HTTP requests: OpenAI chat completions, the CLI's records."""
    from .. import serve as core
    from ..api import Model
    from ..defaults import default_workers
    from ..loader import ALL_ARCHITECTURES, load, plan

    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        from ..errors import UsageError

        raise UsageError(f"blip2 serve needs {exc.name}", hint="pip install 'blip2[serve]'") from None
    config = core.ServeConfig(
        host=host, port=port, api_key=api_key or None, max_batch_size=max_batch_size, batch_wait_ms=batch_wait_ms,
        max_queue=max_queue, max_body_mb=max_body_mb, allow_urls=allow_urls,
        allow_files=str(allow_files) if allow_files is not None else None,
        workers=workers or default_workers(), quiet=quiet, model_name=loading.model,
    )
    config.validate()
    if not core.is_loopback(host) and not config.api_key:
        console.message(f"warning: listening on {host} without --api-key: anyone who can reach this port "
                        "can use the model (set --api-key or BLIP2_API_KEY)")
    sock = core.bind(host, port)  # a port in use is said before anything heavy is imported
    try:
        options = load_options(**vars(loading))
        load_plan = plan(options, architectures=ALL_ARCHITECTURES, task="serve")  # no weights read yet
    except BaseException:
        sock.close()
        raise

    def load_model():
        return Model(load(options, load_plan=load_plan), load_plan)

    def ready(address):
        console.message(f"{loading.model} ready on http://{_url_host(address[0])}:{address[1]}")

    console.message(f"loading {loading.model} ...")
    core.serve(config, load_model, on_ready=ready, sock=sock)
    raise typer.Exit(0)


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


serve.__doc__ = (serve.__doc__ or "") + EXAMPLES


# -- the client side: blip2 caption|ask|embed --server URL --------------------------------------
def _refuse(used: list[str], command: str) -> None:
    if used:
        from ..errors import UsageError

        raise UsageError(f"{', '.join(used)} {'does' if len(used) == 1 else 'do'} not work with --server yet",
                         hint=f"run blip2 {command} locally for that (drop --server and BLIP2_SERVER)")


def remote(command: str, server: str, params: dict) -> None:
    """Run ``blip2 COMMAND`` on a server: the parameters the command got (its locals at
    the top), the inputs read and sent here, the server's records written as locally."""
    from .. import client

    ns = dict(params)
    _refuse_local_only(command, ns)
    output, quiet = ns.get("output"), bool(ns.get("quiet"))
    fmt_name = _remote_format(command, ns.get("fmt"), output)
    src = ns["src"]
    inputs, questions = _remote_inputs(command, ns, src)
    options, schema = _options(command, ns, questions)
    items, total = resolve_items(inputs, command=command, **vars(src))
    perf, running = ns.get("perf"), ns.get("running")
    batch = (perf.batch_size if perf is not None else ns.get("batch_size")) or client.DEFAULT_CHUNK
    workers = (perf.workers if perf is not None else ns.get("workers")) or client.DEFAULT_CONCURRENCY
    api = client.Client(server, api_key=os.environ.get("BLIP2_API_KEY") or None)
    failed_list = running.failed_list if running is not None else ns.get("failed_list")
    records = api.records(command, items, options, questions=questions, chunk=batch, concurrency=workers)
    stats = _write_remote(records, command, fmt_name, schema, output=output, quiet=quiet, total=total,
                          failed_list=failed_list, null=src.null)
    finish(stats, output=output, quiet=quiet, fmt=fmt_name, command=command)


def _refuse_local_only(command: str, ns: dict) -> None:
    """Refuse the flags that only a local run has."""
    used = []
    sidecars, running = ns.get("sidecars"), ns.get("running")
    if sidecars is not None and (sidecars.sidecar or sidecars.output_dir is not None):
        used.append("--sidecar")
    if running is not None:
        used += [flag for flag, on in (("--resume", running.resume), ("--dry-run", running.dry_run),
                                       ("--shard", running.shard is not None), ("--fail-fast", running.fail_fast))
                 if on]
    for name, flag in (("metadata", "--metadata"), ("carry", "--carry"), ("html_links", "--html-links"),
                       ("resume", "--resume"), ("shard", "--shard"), ("fail_fast", "--fail-fast"),
                       ("text", "--text"), ("texts_file", "--texts-file"), ("prune", "--prune"),
                       ("compact", "--compact"), ("store_dtype", "--store-dtype")):
        if ns.get(name):
            used.append(flag)
    _refuse(used, command)


def _remote_format(command: str, fmt, output) -> str:
    """The output format; refuses what a client cannot write (HTML, a vector store)."""
    from ..choices import EmbedFormat, names

    formats = tuple(names(EmbedFormat)) if command == "embed" else ()
    fmt_name = o.infer_format(fmt, output, formats=formats)
    if fmt_name == "html":
        _refuse(["--format html"], command)
    if command == "embed":
        from ..store import is_store_path

        if is_store_path(output) or (output is not None and (output.is_dir() or getattr(output, "wants_directory", False))):
            _refuse(["a vector store or -o DIR"], command)
    check_output_path(output)
    return fmt_name


def _remote_inputs(command: str, ns: dict, src) -> tuple[Any, list[str] | None]:
    """(the inputs, ask's questions or None)."""
    if command != "ask":
        return ns.get("inputs"), None
    from .questions import gather_questions

    if ns.get("raw") and ns.get("template") is not None:
        from ..errors import UsageError

        raise UsageError("--raw and --template contradict each other", hint="use one of them")
    return gather_questions(ns.get("arguments") or [], ns.get("question") or [], ns.get("questions_file"),
                            src.files_from)


def _write_remote(records, command: str, fmt_name: str, schema, *, output, quiet: bool, total,
                  failed_list, null: bool):
    """Write the server's records (one list per item) as a local run would; returns the Stats."""
    import time

    from ..console import Reporter
    from ..failedlist import wrapper as failed_wrapper
    from ..pipeline import Stats  # pipeline.py imports nothing heavy at its top
    from ..writers import Sink, make_writer

    stats = Stats()
    sink = Sink(str(output) if output is not None else None).open()
    reporter = Reporter(quiet=quiet, total=total, description={"caption": "captioning", "ask": "answering"}.get(
        command, "embedding"))
    failed = True
    started = time.perf_counter()
    try:
        writer = make_writer(fmt_name, sink, schema)
        wrapped = failed_wrapper(failed_list, null=null) if failed_list is not None else None
        if wrapped:
            writer = wrapped(writer)
        for item_records in records:
            failure = None
            for record in item_records:
                writer.write(record)
                failure = failure or record.get("error")
            if failure is None:
                stats.done += 1
            else:
                stats.failed += 1
                reporter.item_failed(item_records[0]["path"], failure)
            reporter.advance()
        writer.close()
        failed = False
    finally:
        reporter.close()
        sink.close(quiet=failed)
        stats.seconds = time.perf_counter() - started
    return stats


def _options(command: str, ns: dict, questions) -> tuple[dict, Any]:
    """The options the server gets (the CLI's names), checked here first, and the writers' schema."""
    from ..caption import GenerationOptions

    perf = ns.get("perf")
    preprocess = perf.preprocess if perf is not None else ns.get("preprocess")
    preprocess = getattr(preprocess, "value", preprocess) or "fast"
    if command == "embed":
        from ..embed import embed_schema

        features = getattr(ns.get("features"), "value", ns.get("features")) or "auto"
        pool = getattr(ns.get("pool"), "value", ns.get("pool")) or "none"
        return {"features": features, "pool": pool, "preprocess": preprocess}, embed_schema()
    dec = vars(ns["dec"])
    if command == "caption":
        from ..caption import caption_schema

        gen = GenerationOptions(prompt=ns.get("prompt"), num_captions=ns.get("num_captions", 1), **dec)
        gen.validate()
        options = {**dec, "prompt": gen.prompt, "num_captions": gen.num_captions, "preprocess": preprocess}
        return options, caption_schema(gen.num_captions)
    from ..ask import DEFAULT_TEMPLATE, answer_schema, check_template

    num_answers = ns.get("num_answers", 1)
    gen = GenerationOptions(num_captions=num_answers, **dec)
    gen.validate(count_name="num_answers")
    template = None if ns.get("raw") else check_template(ns.get("template") or DEFAULT_TEMPLATE)
    return {**dec, "num_answers": num_answers, "template": template, "preprocess": preprocess}, answer_schema(num_answers)
