"""Embedding images into a vector store: the pipeline's sink, the run that commits
what it has on an interruption, and an existing store's settings as the defaults.

Shared by ``blip2 embed -o STORE`` and ``blip2 search --index`` (and the
benchmarks); the store itself (file format, updater, search) is ``store.py``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from . import console
from .embed import DEFAULT_RETRIEVAL_MODEL, model_key


class StoreSink:
    """The pipeline's writer for a vector store: each good row goes to the update."""

    def __init__(self, update):
        self.update = update

    def write(self, record: dict) -> None:
        from .storefiles import Entry

        if record.get("error") or record.get("vector") is None:
            if isinstance(record.get("source"), str):  # counted as failed, retried next time
                path, abspath = record["path"], os.path.abspath(record["source"])
                self.update.fail(path, abspath, record.get("error"))
            return
        size, mtime_ns, digest = record["ident"]
        path, abspath = record["path"], os.path.abspath(record["source"])
        entry = Entry(path, path if abspath == path else abspath, size, mtime_ns, digest)  # one string if equal
        self.update.add(entry, record["vector"])

    def close(self) -> None:
        pass


def save_on_interrupt(update) -> None:
    """Ctrl-C or SIGTERM: the rows finished so far are committed (atomically) before the
    interruption goes on, so a long run is never lost."""
    if update.pending_rows:
        console.message("interrupted: saving the vectors embedded so far")
    update.commit()


def embed_into_store(items, update, task, *, total, batch_size: int, workers: int, quiet: bool,
                     description: str = "embedding"):
    """Embed what the store lacks, then commit; returns the pipeline's Stats (for
    ``blip2 search`` and the benchmarks; ``blip2 embed -o STORE`` runs a :class:`StoreOutput`
    through the runner). An interruption commits the rows finished so far."""
    from .console import Reporter
    from .job import run_pipeline

    stats = run_pipeline(items, task, StoreSink(update), batch_size=batch_size, workers=workers,
                         reporter=Reporter(quiet=quiet, total=total, description=description),
                         on_interrupt=lambda: save_on_interrupt(update))
    update.commit()
    return stats


@dataclass
class StoreOutput:
    """A vector store as a run's output plan (``blip2 embed -o vectors.safetensors``): the
    store and its index are planned outputs (never an input; the store holds its own lock);
    the store selects the items it lacks, the runner embeds them, the store commits (also
    on an interruption)."""

    path: Path
    meta: Callable[[Any], Any]  # the pipeline task (its embedder) -> store.StoreMeta
    prune: bool = False
    dtype_given: bool = False
    compact: bool = False

    def planned(self) -> list:
        from .guard import Planned
        from .store import store_files

        return [Planned(os.fspath(p), "the vector store", "output") for p in store_files(self.path)]

    def fill(self, items, task, total, run) -> Any:
        """``run(selected, total, writer, on_interrupt=...)``: the runner's pipeline."""
        inner = getattr(task, "task", task)  # the runner's recording wrapper, or the task itself
        from .store import StoreUpdate

        with StoreUpdate(self.path, self.meta(inner), prune=self.prune, dtype_given=self.dtype_given,
                         compact=self.compact) as update:
            selected: Any = update.select(items)  # a list once counted
            if total is not None:
                selected = list(selected)
                total = len(selected)
            stats = run(selected, total, StoreSink(update), on_interrupt=lambda: save_on_interrupt(update))
            update.commit()
            console.message(store_summary(self.path, update.stats, stats))
        return stats


def store_settings(path, model, revision, features: str, pool: str | None):
    """(model, revision, features, pool) for a run on the store at ``path``.

    An existing store supplies the defaults (its vectors only compare with vectors
    made the same way); an option that contradicts it is refused before any
    weights are read. Without a store: the retrieval checkpoint, pool ``none``.
    """
    from .errors import UsageError
    from .store import VectorStore, exists

    if path is None or not (exists(path) or os.path.isfile(path)):  # a file: refused below, before the model
        return model or DEFAULT_RETRIEVAL_MODEL, revision, features, pool or "none"
    store = VectorStore.open(path)
    meta = store.meta
    store.close()
    diffs = []
    if model is not None and model_key(model) != meta.model:
        diffs.append(f"model {meta.model!r} (store) vs {model_key(model)!r}")
    if revision is not None and revision != meta.revision:
        diffs.append(f"revision {meta.revision!r} (store) vs {revision!r}")
    if features != "auto" and features != meta.features:
        diffs.append(f"features {meta.features} (store) vs {features}")
    if pool is not None and pool != meta.pool:
        diffs.append(f"pool {meta.pool} (store) vs {pool}")
    if diffs:
        raise UsageError(
            f"the vector store {str(path)!r} holds other vectors: " + "; ".join(diffs),
            hint="drop those options (the store's settings are the defaults), or write a new store with -o",
        )
    return meta.model, meta.revision, meta.features, meta.pool


def store_summary(path, ustats, stats) -> str:
    parts = [f"{ustats.new} new", f"{ustats.changed} changed", f"{ustats.unchanged} unchanged"]
    if ustats.pruned:
        parts.append(f"{ustats.pruned} pruned")
    if stats is not None and stats.failed:
        parts.append(f"{stats.failed} failed")
    retried = f"; {ustats.retried} failed before, retried" if ustats.retried else ""
    return f"{path}: {ustats.rows} rows ({', '.join(parts)}{retried})"


__all__ = ["StoreOutput", "StoreSink", "embed_into_store", "save_on_interrupt", "store_settings",
           "store_summary"]
