"""BLIP-2's own features: the ITC embeddings, the ITM head, raw vision / Q-Former output.

Plain Python over a loaded model (``loader.load``); no Typer here.

With a retrieval checkpoint (``Blip2ForImageTextRetrieval``, e.g.
``Salesforce/blip2-itm-vit-g``) ``Embedder`` computes exactly what transformers'
``Blip2ForImageTextRetrieval.forward`` computes (``modeling_blip_2.py``), with the
same modules in the same order, but for each side alone and for a whole batch:

* images, ``features="itc"``: vision tower -> Q-Former over the query tokens
  (cross-attending to the image) -> ``vision_projection`` -> L2 normalise:
  ``[num_query_tokens, image_text_hidden_size]`` per image ([32, 256] for the
  real checkpoint); ``pool="mean"`` averages the query embeddings and
  re-normalises;
* texts: Q-Former over the text alone -> ``text_projection`` of the first
  ([CLS]) token -> L2 normalise: ``[image_text_hidden_size]``;
* ITC similarity: the maximum over the query embeddings of the dot product with
  the text embedding (raw cosines, no temperature), as ``logits_per_image``;
* ITM: the query tokens and the text through the Q-Former together,
  ``itm_head`` on the query positions, averaged: ``[no match, match]`` logits;
  the match probability is ``softmax(logits)[1]``.

Text ids are built as the tokenizer builds them (``[CLS] text [SEP]``, right
padding with an attention mask). ``Blip2Processor`` prepends ``<image>`` x
``num_query_tokens`` when it gets images and text, and the model drops them
again when ``config.image_token_index`` is set, so the ids the Q-Former sees are
the same.

Any BLIP-2 checkpoint, captioning ones included, gives ``features="vision"``
(the vision tower's pooled output: ``post_layernorm`` of the class token,
``[vision hidden]``; as ``Blip2Model.get_image_features(...).pooler_output``) and
``features="qformer"`` (the Q-Former's last hidden state over the query tokens,
``[num_query_tokens, qformer hidden]``; as ``Blip2Model.get_qformer_features``).
These are not normalised and have no text side.
"""

from __future__ import annotations

from typing import Sequence

from .choices import Features, Pool, names
from .errors import ModelError, OptionError, UsageError
from .loader import RETRIEVAL
from .writers import Schema

DEFAULT_RETRIEVAL_MODEL = "Salesforce/blip2-itm-vit-g"
FEATURES = names(Features)  # ("auto", "itc", "vision", "qformer")
POOLS = names(Pool)  # ("none", "mean")
TEXT_BATCH = 64


def no_text_side_hint() -> str:
    """Where texts and ITM come from (no flag or parameter named: the CLI and the library both show it)."""
    return f"use a retrieval checkpoint such as {DEFAULT_RETRIEVAL_MODEL}"


def resolve_features(requested: str, architecture: str) -> str:
    """``auto``: ITC embeddings on a retrieval checkpoint, the Q-Former output otherwise."""
    if requested == "auto":
        return "itc" if architecture in RETRIEVAL else "qformer"
    if requested == "itc" and architecture not in RETRIEVAL:
        raise OptionError(
            f"features=itc needs a retrieval checkpoint; this one is {architecture}, "
            "which has no image-text projection",
            hint=f"{no_text_side_hint()}, or use features=vision or features=qformer with this one",
            params=["features", "model"],
        )
    if requested not in FEATURES:
        raise OptionError(f"unknown features {requested!r}", hint="use itc, vision or qformer", params=["features"])
    return requested


class Embedder:
    """Vectors and scores from a loaded BLIP-2 model (``loader.LoadedModel``)."""

    def __init__(self, loaded, features: str = "auto", pool: str = "none"):
        if pool not in POOLS:
            raise OptionError(f"unknown pool {pool!r}", hint="use none or mean", params=["pool"])
        self.loaded = loaded
        self.model = loaded.model
        self.architecture = loaded.checkpoint.architecture
        self.features = resolve_features(features, self.architecture)
        self.pool = pool
        config = self.model.config
        self.num_query_tokens = int(config.num_query_tokens)
        if self.features == "itc":
            width = int(config.image_text_hidden_size)
        elif self.features == "qformer":
            width = int(config.qformer_config.hidden_size)
        else:
            width = int(config.vision_config.hidden_size)
        self.width = width
        if self.features == "vision":
            self.dims: tuple[int, ...] = (width,)
        else:
            self.dims = (width,) if pool == "mean" else (self.num_query_tokens, width)

    # -- properties ------------------------------------------------------------
    @property
    def has_text(self) -> bool:
        return self.features == "itc"

    @property
    def normalized(self) -> bool:
        return self.features == "itc"

    def require_text(self, what: str = "text embeddings") -> None:
        if self.has_text:
            return
        if self.architecture not in RETRIEVAL:
            raise OptionError(
                f"{what} need a retrieval checkpoint: {self.loaded.options.model!r} is a "
                f"{self.architecture} checkpoint, which has no text side",
                hint=no_text_side_hint(), params=["model"],
            )
        raise OptionError(f"{what} need features=itc (the image-text space), not features={self.features}",
                          params=["features"])

    def require_itm(self) -> None:
        if self.architecture not in RETRIEVAL:
            raise OptionError(
                f"image-text matching needs a retrieval checkpoint: {self.loaded.options.model!r} "
                f"is a {self.architecture} checkpoint",
                hint=no_text_side_hint(), params=["model"],
            )

    # -- the image side --------------------------------------------------------
    def _vision(self, pixel_values):
        return self.model.vision_model(pixel_values=pixel_values, return_dict=True)

    def _queries(self, image_embeds):
        """Q-Former over the query tokens, cross-attending to the image (as transformers)."""
        import torch

        image_attention_mask = torch.ones(image_embeds.size()[:-1], dtype=torch.long, device=image_embeds.device)
        query_tokens = self.model.query_tokens.expand(image_embeds.shape[0], -1, -1)
        out = self.model.qformer(
            query_embeds=query_tokens,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_attention_mask,
            return_dict=True,
        )
        return out.last_hidden_state

    def encode_images(self, pixel_values):
        """The vision tower's output for a batch (``image_vectors``/``itm_logits`` reuse it)."""
        import torch

        with torch.inference_mode():
            return self._vision(pixel_values)

    def image_vectors(self, pixel_values=None, *, vision=None):
        """``[B, *dims]`` float32 on the CPU, for a batch of pixel values (or of
        vision outputs from ``encode_images``)."""
        import torch
        from torch import nn

        with torch.inference_mode():
            if vision is None:
                vision = self._vision(pixel_values)
            if self.features == "vision":
                return vision.pooler_output.float().cpu()
            queries = self._queries(vision.last_hidden_state)
            if self.features == "qformer":
                out = queries.float()
                if self.pool == "mean":
                    out = out.mean(dim=1)
                return out.cpu()
            model = self.model
            queries = queries.to(dtype=model.vision_projection.weight.dtype)
            embeds = nn.functional.normalize(model.vision_projection(queries), dim=-1).float()
            if self.pool == "mean":
                embeds = nn.functional.normalize(embeds.mean(dim=1), dim=-1)
            return embeds.cpu()

    # -- the text side -----------------------------------------------------------
    def tokenize(self, texts: Sequence[str]):
        """``[CLS] text [SEP]`` ids and mask, right-padded, on the model's device."""
        tokenizer = self.loaded.tokenizer
        max_len = int(self.model.config.qformer_config.max_position_embeddings)
        enc = tokenizer(
            list(texts),
            padding=True,
            truncation=True,
            max_length=max_len,
            padding_side="right",
            return_tensors="pt",
            return_token_type_ids=False,
        )
        device = self.loaded.device
        return enc["input_ids"].to(device), enc["attention_mask"].to(device)

    def text_vectors(self, texts: Sequence[str]):
        """``[T, D]`` float32 on the CPU: projected, normalised [CLS] embeddings."""
        import torch
        from torch import nn

        self.require_text()
        texts = list(texts)
        if not texts:
            return torch.empty(0, self.width)
        model = self.model
        outs = []
        with torch.inference_mode():
            for start in range(0, len(texts), TEXT_BATCH):
                ids, mask = self.tokenize(texts[start:start + TEXT_BATCH])
                embeds = model.embeddings(input_ids=ids)
                out = model.qformer(query_embeds=embeds, query_length=0, attention_mask=mask, return_dict=True)
                hidden = out.last_hidden_state.to(dtype=model.text_projection.weight.dtype)
                outs.append(nn.functional.normalize(model.text_projection(hidden[:, 0, :]), dim=-1).float().cpu())
        return torch.cat(outs)

    # -- matching ------------------------------------------------------------------
    def itm_logits(self, image_states, texts: Sequence[str]):
        """ITM logits ``[N, 2]`` for N (image, text) pairs. ``image_states``: the vision
        tower's last hidden state (``encode_images(...).last_hidden_state``),
        ``[N, P, H]``, or ``[1, P, H]`` shared by every text."""
        import torch

        self.require_itm()
        model = self.model
        texts = list(texts)
        outs = []
        with torch.inference_mode():
            for start in range(0, len(texts), TEXT_BATCH):
                chunk = texts[start:start + TEXT_BATCH]
                ids, mask = self.tokenize(chunk)
                n = len(chunk)
                states = image_states[start:start + n] if image_states.shape[0] > 1 else image_states.expand(n, -1, -1)
                image_attention_mask = torch.ones(states.size()[:-1], dtype=torch.long, device=states.device)
                query_tokens = model.query_tokens.expand(n, -1, -1)
                query_mask = torch.ones(query_tokens.size()[:-1], dtype=mask.dtype, device=mask.device)
                query_embeds = model.embeddings(input_ids=ids, query_embeds=query_tokens)
                out = model.qformer(
                    query_embeds=query_embeds,
                    query_length=query_tokens.shape[1],
                    attention_mask=torch.cat([query_mask, mask], dim=1),
                    encoder_hidden_states=states,
                    encoder_attention_mask=image_attention_mask,
                    return_dict=True,
                )
                hidden = out.last_hidden_state.to(dtype=model.itm_head.weight.dtype)
                logits = model.itm_head(hidden[:, : query_tokens.size(1), :]).mean(dim=1)
                outs.append(logits.float().cpu())
        return torch.cat(outs) if outs else torch.empty(0, 2)

    def itm_probabilities(self, image_states, texts: Sequence[str]):
        """Match probability (``softmax(itm logits)[1]``) per (image, text) pair, ``[N]``."""
        return self.itm_logits(image_states, texts).softmax(dim=-1)[:, 1]


def itc_similarity(image_vectors, text_vectors):
    """BLIP-2's ITC similarity: ``[Q, D]`` (or pooled ``[D]``) image vs ``[T, D]`` texts -> ``[T]``."""
    import torch

    image_vectors = torch.as_tensor(image_vectors, dtype=torch.float32)
    text_vectors = torch.as_tensor(text_vectors, dtype=torch.float32)
    sims = image_vectors.reshape(-1, image_vectors.shape[-1]) @ text_vectors.T  # [Q, T]
    return sims.max(dim=0).values


def pooled_query(vectors, normalise: bool = True):
    """An image's vectors ``[Q, D]`` or ``[D]`` -> one unit vector ``[D]`` (image-to-image search)."""
    import numpy as np

    v = np.asarray(vectors, dtype=np.float32)
    if v.ndim == 2:
        v = v.mean(axis=0)
    if normalise:
        v = v / max(float(np.linalg.norm(v)), 1e-12)
    return v


# -- the checkpoint and the pipeline's task -----------------------------------------
def model_key(model: str) -> str:
    """What a store records as its model: a local folder as an absolute path, else the hub id
    (a short name such as ``itm`` as the hub id it stands for)."""
    import os

    from .models import resolve

    expanded = os.path.expanduser(model)
    return os.path.abspath(expanded) if os.path.isdir(expanded) else resolve(model)


def check_for_features(opts, *, features: str, need_text: bool = False, need_itm: bool = False):
    """Check the checkpoint of ``opts`` (``loader.LoadOptions``) against what a features run
    needs (text side, ITM head, the features it asks for), before any weights are read."""
    from .loader import RETRIEVAL as RETRIEVAL_ARCHS, resolve_checkpoint

    ckpt = resolve_checkpoint(opts)
    retrieval = ckpt.architecture in RETRIEVAL_ARCHS
    if (need_text or need_itm) and not retrieval:
        what = "image-text matching" if need_itm else "text embeddings"
        raise ModelError(
            f"{what} need a retrieval checkpoint: {opts.model!r} is a {ckpt.architecture} checkpoint, "
            "which has no text side",
            hint=no_text_side_hint(),
        )
    resolved = resolve_features(features, ckpt.architecture)
    if need_text and resolved != "itc":
        raise OptionError(f"texts live in the image-text (itc) space, not in features={resolved}",
                          hint="drop features, or use features=itc", params=["features"])
    if retrieval and opts.quantize != "none":
        raise OptionError(
            f"quantize={opts.quantize}: a retrieval checkpoint has no language model to quantize",
            hint="drop quantize (use dtype=float16 or dtype=bfloat16 on a GPU to save memory)",
            params=["quantize", "dtype"],
        )
    return opts


def load_for_features(opts, *, features: str, task: str, need_text: bool = False, need_itm: bool = False):
    """``check_for_features``, then load the weights (any BLIP-2 architecture)."""
    from .loader import ALL_ARCHITECTURES, load

    check_for_features(opts, features=features, need_text=need_text, need_itm=need_itm)
    return load(opts, architectures=ALL_ARCHITECTURES, task=task)


class EmbedTask:
    """Joins the image stage and the embedder for the pipeline.

    ``identity=True`` (vector stores): ``prepare`` reads the file once, hashes its
    bytes and decodes the same bytes, so the row records what was embedded.
    """

    def __init__(self, loaded, embedder, preprocess: str, *, identity: bool = False):
        from .images import ImageStage

        self.stage = ImageStage(loaded, preprocess)
        self.embedder = embedder
        self.identity = identity

    def decode(self, source):
        """One image (a path or its bytes) decoded and resized for ``pixels``; ``ImageError`` if it cannot be."""
        return self.stage.prepare(source)

    _decode = decode  # the name blip2 search used before

    def prepare(self, item):
        from .decode import ImageError

        if not self.identity:
            return self.decode(item.source), None
        if not isinstance(item.source, str):
            raise ImageError("raw image bytes on stdin cannot go into a vector store (its rows are "
                             "files); pass paths, or use -f jsonl")
        import hashlib

        from .decode import read_image_file

        # Not a regular file, not an image, a header over the budget: refused before it is read whole.
        data, st = read_image_file(item.source)
        digest = hashlib.sha256(data).hexdigest()
        return self.decode(data), (st.st_size, st.st_mtime_ns, digest)

    def pixels(self, prepared):
        return self.stage.pixels(prepared)

    def run_batch(self, prepared):
        vectors = self.embedder.image_vectors(self.pixels([p for p, _ in prepared])).numpy()
        return [(vectors[i], ident) for i, (_, ident) in enumerate(prepared)]

    def record(self, item, result, error):
        vector, ident = result if result is not None else (None, None)
        if self.identity:
            return {"path": item.name, "source": item.source, "vector": vector, "ident": ident, "error": error}
        return image_record(item.name, vector, error)


# -- records ---------------------------------------------------------------------
def image_record(path: str, vector, error: str | None) -> dict:
    """``{"path", "dims", "vector", "error"}``: ``vector`` flat (row-major), ``dims`` its shape."""
    if vector is None:
        return {"path": path, "dims": None, "vector": None, "error": error}
    return {"path": path, "dims": list(vector.shape), "vector": vector.reshape(-1).tolist(), "error": None}


def text_record(text: str, vector) -> dict:
    return {"text": text, "dims": list(vector.shape), "vector": vector.reshape(-1).tolist()}


def _json(value) -> str:
    import json

    return "" if value is None else json.dumps(value, separators=(",", ":"))


def embed_schema() -> Schema:
    """CSV: ``path,text,dims,vector,error``; ``dims`` and ``vector`` as JSON arrays."""
    return Schema(
        columns=["path", "text", "dims", "vector", "error"],
        row=lambda r: [r.get("path"), r.get("text"), _json(r.get("dims")), _json(r.get("vector")), r.get("error")],
        text=lambda r: [r.get("path") or r.get("text"), _json(r.get("vector"))],
    )


def score_schema() -> Schema:
    return Schema(
        columns=["path", "text", "itm", "itc", "error"],
        row=lambda r: [r["path"], r["text"], r["itm"], r["itc"], r.get("error")],
        text=lambda r: [r["text"], _fmt(r["itm"]), _fmt(r["itc"])],
    )


def search_schema() -> Schema:
    return Schema(
        columns=["rank", "path", "score", "itc", "itm"],
        row=lambda r: [r["rank"], r["path"], r["score"], r["itc"], r["itm"]],
        text=lambda r: [r["path"], _fmt(r["score"])],
    )


def _fmt(value) -> str:
    return "" if value is None else f"{value:.6f}"
