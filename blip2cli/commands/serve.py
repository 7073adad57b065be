"""``blip2 serve``: keep one model loaded and answer HTTP requests (``serve.py``);
and ``blip2 caption|ask|embed --server URL``: the same commands, run by a server
(``client.py``), their records written here by the usual writers."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from .. import console
from .. import options as o
from .common import handles_errors, load_options

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
def refuse_with_server(used: list[str], command: str) -> None:
    """What a run whose model is a server cannot do (the flags named)."""
    if used:
        from ..errors import UsageError

        raise UsageError(f"{', '.join(used)} {'does' if len(used) == 1 else 'do'} not work with --server",
                         hint=f"run blip2 {command} locally for that (drop --server and BLIP2_SERVER)")


def use_server(job, server: str, options: dict, *, questions: list[str] | None = None, thumbnails=None,
               compile_: bool = False, identity: bool = False):
    """Make ``job`` a run whose model is the ``blip2 serve`` at ``server``: the same runner
    (output plan, locks, resume, -o DIR, shards, sidecars, --metadata, --failed-list,
    --carry, every format, a vector store with ``identity``), the images' bytes sent to the
    server, its records written here with the settings it ran with (checked against those
    the run asks for). Returns the ``client.Remote``."""
    from .. import client

    refuse_with_server(["--compile"] if compile_ else [], job.command)
    remote = client.Remote(server, api_key=os.environ.get("BLIP2_API_KEY") or None)
    job.server = remote
    job.make_task = lambda _loaded: remote.stage(job.command, options, questions=questions, thumbnails=thumbnails,
                                                 identity=identity)
    return remote


def generation_request(dec, *, prompt=None, num_captions: int = 1, num_answers: int | None = None,
                       template=None, preprocess: str = "fast") -> dict:
    """The options a server's caption/ask endpoint gets: the CLI's names, already checked here."""
    options = {**vars(dec), "preprocess": preprocess}
    if num_answers is None:
        return {**options, "prompt": prompt, "num_captions": num_captions}
    return {**options, "num_answers": num_answers, "template": template}
