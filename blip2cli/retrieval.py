"""Ranking images by BLIP-2's similarity to a text or an image: the core of ``blip2 search``.

:func:`search_images` embeds the images it is given into a vector store (the one named, or
a temporary one), ranks the store's rows (exact, or approximate with faiss), optionally
re-scores the best with the image-text matching head, and returns the result records (the
keys of :func:`blip2cli.embed.search_schema`). Flag checks and the output stay in the command.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from . import console
from .embed import EmbedTask, model_key
from .embedstore import embed_into_store, store_summary


SLOW_NOTE = "exact search over {rows:,} rows; approximate search (ann=True) is faster"


@dataclass
class SearchResult:
    """What :func:`search_images` found: the records, best first, and the embed run's Stats
    (None when no image was embedded)."""

    records: list[dict[str, Any]]
    stats: Any = None


def query_vector(embedder, task: EmbedTask, query: str | None, image) -> tuple[Any, str]:
    """The query's vector and the search mode: ``text`` for a text, else ``image`` (the
    pooled embedding of the image file ``image``)."""
    from .decode import ImageError
    from .embed import pooled_query
    from .errors import InputError

    if query is not None:
        return embedder.text_vectors([query])[0].numpy(), "text"
    try:
        arr = task._decode(str(image))
    except ImageError as exc:
        raise InputError(f"cannot read the query image {str(image)!r}: {exc}") from None
    return pooled_query(embedder.image_vectors(task.pixels([arr]))[0].numpy()), "image"


def rerank(hits, store, query: str, task: EmbedTask, embedder, batch_size: int) -> dict[int, float | None]:
    """ITM match probability for each hit (decoded again from its file); None if it cannot be read."""
    from .decode import ImageError

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


def _embed_into(store_path, items, total, task: EmbedTask, embedder, *, model: str, revision, pool,
                prune: bool, batch_size: int, workers: int, quiet: bool, summarize: bool):
    """Embed ``items`` that the store lacks; returns (abspath -> the name this run gave it, Stats)."""
    from .store import StoreMeta, StoreUpdate

    wanted: dict[str, str] = {}

    def remember(stream):
        for item in stream:
            if item.error is None and isinstance(item.source, str):
                wanted.setdefault(os.path.abspath(item.source), item.name)
            yield item

    meta = StoreMeta(model=model_key(model), revision=revision, features=embedder.features, pool=pool,
                     dims=embedder.dims, normalized=embedder.normalized)
    with StoreUpdate(store_path, meta, prune=prune, dtype_given=False) as update:
        selected: Iterable[Any] = update.select(remember(items))
        if total is not None:
            listed = list(selected)
            selected, total = listed, len(listed)
        stats = embed_into_store(selected, update, task, total=total, batch_size=batch_size,
                                 workers=workers, quiet=quiet)
        if summarize and not quiet:
            console.message(store_summary(store_path, update.stats, stats))
    return wanted, stats


def ann_fits(meta) -> bool:
    """Whether approximate search can rank a store by an image: one unit vector per row."""
    return len(meta.dims) == 1 and bool(meta.normalized)


def _rank(store, qvec, mode: str, *, k: int, ann: bool, rows, quiet: bool, slow_note: str):
    """The ``k`` best rows of ``store`` (of ``rows`` when given) for the query vector."""
    from .errors import UsageError
    from .store import top_k as store_top_k

    if ann:
        from . import ann as ann_search

        if mode == "image" and not ann_fits(store.meta):
            raise UsageError("ann=True with a query image needs a store of one unit vector per row (pool='mean', "
                             "itc features)", hint="drop ann", params=["ann", "pool"])
        return ann_search.search(store, ann_search.load_or_build(store, quiet=quiet), qvec, k)
    if store.rows >= 10_000_000 and not quiet:
        console.message(slow_note.format(rows=store.rows))
    return store_top_k(store, qvec, k, mode=mode, rows=rows)


def _records(hits, store, names: dict[int, str], itm: dict[int, float | None] | None, mode: str,
             top_k: int) -> list[dict[str, Any]]:
    """The result records of the ``top_k`` first hits (``itm``: the re-scores, None without --rerank)."""
    records = []
    for rank, hit in enumerate(hits[:top_k], 1):
        prob = itm.get(hit.row) if itm is not None else None
        records.append({
            "rank": rank,
            "path": names.get(hit.row, store.entries[hit.row].path),
            "score": prob if itm is not None else hit.score,
            "itc": hit.score if mode == "text" else None,
            "itm": prob,
        })
    return records


def search_images(*, task: EmbedTask, embedder, query: str | None, image=None, index=None, items=None,
                  total=None, model: str, revision, pool, top_k: int = 10, rerank_k: int | None = None,
                  ann: bool = False, prune: bool = False, batch_size: int, workers: int,
                  quiet: bool = False, slow_note: str = SLOW_NOTE) -> SearchResult:
    """Rank images by similarity to ``query`` (a text) or to ``image`` (a file).

    ``items`` (the resolved inputs, or None) are embedded first: into the vector store
    ``index`` when given (added and kept), else into a temporary store. Without items the
    whole store ``index`` is searched. ``rerank_k``: re-score that many best with ITM and
    rank by its probability. ``slow_note``: said before an exact search of 10,000,000+ rows
    (``{rows}``: their number). Returns the ``top_k`` records, best first."""
    qvec, mode = query_vector(embedder, task, query, image)
    stats = None
    with tempfile.TemporaryDirectory(prefix="blip2-search-") as tmp:
        store_path = index if index is not None else Path(tmp) / "vectors.safetensors"
        wanted: dict[str, str] | None = None
        if items is not None:
            wanted, stats = _embed_into(store_path, items, total, task, embedder, model=model, revision=revision,
                                        pool=pool, prune=prune, batch_size=batch_size, workers=workers,
                                        quiet=quiet, summarize=index is not None)
        from .store import VectorStore

        store = VectorStore.open(store_path)
        if index is not None:
            store.verify()  # rows or paths changed inside a segment: refused, never served
        rows, names = None, {}
        if wanted is not None:
            for abspath, name in wanted.items():
                row = store.row_of(abspath)
                if row is not None:
                    names[row] = name
            rows = sorted(names)
        hits = _rank(store, qvec, mode, k=rerank_k or top_k, ann=ann, rows=rows, quiet=quiet, slow_note=slow_note)
        itm: dict[int, float | None] | None = None
        if rerank_k is not None:
            probs = rerank(hits, store, query, task, embedder, batch_size)  # type: ignore[arg-type]  # needs a query
            hits.sort(key=lambda h: (probs.get(h.row) is None, -(probs.get(h.row) or 0.0), -h.score, h.row))
            itm = probs
        records = _records(hits, store, names, itm, mode, top_k)
        store.close()
    return SearchResult(records, stats)
