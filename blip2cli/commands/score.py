"""``blip2 score``: how well each text matches an image (ITM probability and ITC similarity)."""

from __future__ import annotations

import inspect
from typing import Annotated, Optional

import typer

from .. import console
from .. import options as o
from ..embed import DEFAULT_RETRIEVAL_MODEL, EmbedTask
from .common import check_output_path, handles_errors, no_html
from .embed import Features, load_for_features

EXAMPLES = """

Examples:

\b
  blip2 score cat.jpg "a cat" "a dog"                  # text<TAB>itm<TAB>itc per text
  blip2 score cat.jpg "a cat on a sofa" -f jsonl
  curl -s https://example.com/cat.jpg | blip2 score - "a cat" "a dog"
"""


@handles_errors
@o.expands
def score(
    image: Annotated[str, typer.Argument(metavar="IMAGE", help="An image file, or - for image bytes on stdin.", show_default=False)],
    texts: Annotated[
        Optional[list[str]], typer.Argument(metavar="TEXTS", help="Texts to score against the image.", show_default=False)
    ] = None,
    loading: o.Bundle = o.RETRIEVAL_LOADING.without("quantize"),
    fmt: o.FormatOpt = None,
    output: o.Output = None,
    preprocess: o.PreprocessOpt = o.Preprocess.fast,
    server: o.ServerOpt = None,
) -> None:
    """Score texts against an image: the image-text matching (ITM) head's match
    probability, and the ITC similarity (max over the query embeddings of the
    cosine with the text embedding), one line per text."""
    from ..embed import score_schema
    from ..errors import UsageError
    from ..guard import OutputPlan, RunGuard
    from ..writers import write_records

    texts = list(texts or [])
    if not texts:
        raise UsageError("no texts to score", hint='blip2 score img.jpg "a cat" "a dog"')
    fmt_name = o.infer_format(fmt, output)
    no_html(fmt_name, "score")
    check_output_path(output)  # a file in a folder that exists and is writable
    plan = OutputPlan()
    plan.add(output, "the output file", "output", lock=True)
    guard = RunGuard()
    try:  # the plan checked against the image and held, before the model loads
        guard.plan(plan)
        guard.refuse_inputs([image])
        guard.hold()
        if server:  # a running `blip2 serve` (a retrieval checkpoint) scores; the records are the same
            records, error = _score_remote(image, texts, server, preprocess)
        else:
            records, error = _score(image, texts, loading, preprocess)
        write_records(records, fmt_name, output, score_schema())
    finally:
        guard.release()
    raise typer.Exit(1 if error else 0)


def _score(image: str, texts: list[str], loading, preprocess) -> tuple[list[dict], str | None]:
    """(one record per text, the image's error or None)."""
    import sys

    from ..decode import ImageError
    from ..embed import Embedder, itc_similarity

    loaded = load_for_features(loading.model or DEFAULT_RETRIEVAL_MODEL, loading.revision, loading.device, loading.dtype, o.Quantize.none,
                               loading.offline, loading.allow_pickle, features="itc", task="score", need_text=True,
                               need_itm=True)
    embedder = Embedder(loaded, Features.itc.value, "none")
    task = EmbedTask(loaded, embedder, preprocess.value)
    error = None
    try:
        source = sys.stdin.buffer.read() if image == "-" else image
        prepared = task.decode(source)
    except ImageError as exc:
        error = str(exc)
    if error is None:
        vision = embedder.encode_images(task.pixels([prepared]))
        image_vectors = embedder.image_vectors(vision=vision)[0]
        itc = itc_similarity(image_vectors, embedder.text_vectors(texts)).tolist()
        itm = embedder.itm_probabilities(vision.last_hidden_state, texts).tolist()
        records = [{"path": image, "text": t, "itm": m, "itc": c, "error": None} for t, m, c in zip(texts, itm, itc)]
    else:
        console.message(f"{image}: {error}")
        records = [{"path": image, "text": t, "itm": None, "itc": None, "error": error} for t in texts]
    return records, error


def _score_remote(image: str, texts: list[str], server: str, preprocess) -> tuple[list[dict], str | None]:
    """``_score`` with the model on a server: the image's bytes read here, its records from there."""
    import base64
    import os
    import sys

    from ..client import Client, ServerError
    from ..decode import ImageError, read_image_file

    try:
        data = sys.stdin.buffer.read() if image == "-" else read_image_file(image)[0]
        entry = {"name": image, "data": base64.b64encode(data).decode("ascii")}
    except ImageError as exc:
        entry = {"name": image, "error": str(exc)}  # the server makes its records, as for any bad image
    got = Client(server, api_key=os.environ.get("BLIP2_API_KEY") or None).request(
        "POST", "/v1/blip2/score", {"images": [entry], "texts": texts, "options": {"preprocess": preprocess.value}})
    records = got.get("records") if isinstance(got, dict) else None
    if not isinstance(records, list) or len(records) != len(texts):
        raise ServerError(f"the server at {server} answered {len(records or [])} records for {len(texts)} texts")
    error = records[0].get("error") if records else None
    if error:
        console.message(f"{image}: {error}")
    return records, error


score.__doc__ = inspect.cleandoc(score.__doc__ or "") + EXAMPLES
