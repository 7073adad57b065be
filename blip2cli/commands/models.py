"""``blip2 models``: the short model names, and downloading one into the Hugging Face cache."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from .common import handles_errors

def register(parent: typer.Typer, command_cls=None) -> None:
    """Add the ``models`` group (``blip2 models``, ``blip2 models download``) to ``parent``."""
    group = typer.Typer(
        name="models",
        help="List the BLIP-2 models by short name (opt-2.7b, flan-t5-xl, itm, ...); download one.",
        no_args_is_help=False,
        rich_markup_mode=None,
        context_settings={"help_option_names": ["-h", "--help"]},
    )
    group.callback(invoke_without_command=True)(models)
    extra = {"cls": command_cls} if command_cls is not None else {}
    group.command("download", short_help="Download a model into the Hugging Face cache.", **extra)(download)
    parent.add_typer(group, name="models", short_help="List short model names; download one.")


@handles_errors
def models(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="JSON Lines instead of a table.")] = False,
) -> None:
    """List the short names --model accepts: hub id, task, size in float16, whether in the local cache.

    A short name works everywhere a model is taken (blip2 caption -m flan-t5-xl);
    a local folder of the same name wins. Download one with: blip2 models download NAME"""
    if ctx.invoked_subcommand is not None:
        return
    import json

    from ..models import CATALOGUE, cached

    rows = [
        {"name": e.name, "hub_id": e.repo_id, "task": e.task, "fp16_gb": round(e.fp16_gb, 1),
         "cached": cached(e.repo_id)}
        for e in CATALOGUE
    ]
    if as_json:
        for row in rows:
            typer.echo(json.dumps(row))
        return
    header = ("NAME", "HUB ID", "FP16", "CACHED", "TASK")
    table = [(r["name"], r["hub_id"], f"{r['fp16_gb']:.1f} GB", r["cached"], r["task"]) for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *table)]
    for line in (header, *table):
        typer.echo("  ".join(str(x).ljust(w) for x, w in zip(line, widths)).rstrip())


@handles_errors
def download(
    name: Annotated[str, typer.Argument(metavar="NAME", help="A short name (blip2 models lists them) or a hub id.",
                                        show_default=False)],
    revision: Annotated[Optional[str], typer.Option("--revision", metavar="REV", rich_help_panel="Model",
                                                    help="Branch, tag or commit.")] = None,
) -> None:
    """Download a model into the Hugging Face cache (safetensors weights, config, processor and
    tokenizer files only), with a progress bar on a terminal. Prints the snapshot folder.

    Interrupted downloads continue where they stopped when run again."""
    from ..errors import ModelError
    from ..loader import hub_download_hint, hub_reachable, offline_requested, quiet_libraries
    from ..models import DOWNLOAD_PATTERNS, entry_for
    from .. import console

    entry = entry_for(name)
    repo_id = entry.repo_id if entry else name
    if offline_requested(False):
        raise ModelError(
            f"cannot download {repo_id!r}: offline mode is on (HF_HUB_OFFLINE is set)",
            hint="unset HF_HUB_OFFLINE on a machine with network access",
        )
    quiet_libraries(hub_only=True)
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HFValidationError, RepositoryNotFoundError, RevisionNotFoundError

    if not hub_reachable():
        raise ModelError(
            f"cannot download {repo_id!r}: the Hugging Face hub ({constants.ENDPOINT}) cannot be reached",
            hint="check the network (or HTTPS_PROXY / HF_ENDPOINT); or copy the Hugging Face cache "
            "(~/.cache/huggingface/hub) from a machine that has the model and run with --offline",
        )
    size = f", about {entry.fp16_gb:.0f} GB in float16" if entry else ""
    console.message(f"downloading {repo_id}{size} into {constants.HF_HUB_CACHE}…")
    try:
        path = snapshot_download(repo_id, revision=revision, allow_patterns=DOWNLOAD_PATTERNS)
    except RepositoryNotFoundError as exc:
        raise ModelError(f"no model {repo_id!r} on the Hugging Face hub (or it is private)",
                         hint="`blip2 models` lists the short names") from exc
    except RevisionNotFoundError as exc:
        raise ModelError(f"model {repo_id!r} has no revision {revision!r}") from exc
    except HFValidationError as exc:
        raise ModelError(f"{name!r} is neither a short name nor a valid hub id",
                         hint="`blip2 models` lists the short names") from exc
    except (OSError, ValueError) as exc:  # network errors, disk full
        raise ModelError(
            f"downloading {repo_id!r} failed: {' '.join(str(exc).split())[:300]}",
            hint="run the same command again to continue; " + hub_download_hint(repo_id, revision),
        ) from exc
    typer.echo(path)
