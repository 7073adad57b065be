"""Approximate search with faiss (``blip2 search --ann``; ``pip install 'blip2-cli[ann]'``).

An inverted-file index (``IVF{nlist},SQ8``: sqrt(n) lists, 8-bit scalar-quantised
vectors, inner product) is built from the store on first use and saved beside it
(``STORE/ann-<generation>.faiss`` in the store's folder); it is reused while the store's
generation is the same, and rebuilt (the old one removed) after the store changes. A
store of fewer than ``FLAT_BELOW`` vectors gets an exact flat index instead (k-means
over a handful of points is pointless, and faiss warns about it). A store of 32 query vectors
per image is indexed flattened (32 vectors per row). The index proposes
candidates (``REFINE`` x k images); they are re-scored exactly from the store's own
vectors (BLIP-2's max over the query vectors), so the scores printed are exact and
only the candidate set is approximate.

Exact search stays the default: below ``ANN_AUTO_ROWS`` rows it is fast enough
(0.19 s per query over 1,000,000 pooled rows), and above it ``--ann`` is used
only when asked (``blip2 search`` says so). ``benchmarks/ann_recall.py`` measures
recall@10 against exact search.
"""

from __future__ import annotations

import math
from pathlib import Path

ANN_AUTO_ROWS = 10_000_000  # documented: below this, exact search is the recommendation
NPROBE = 32
FLAT_BELOW = 39 * 16  # vectors: faiss wants 39 training points per list; below this, no lists at all
REFINE = 4  # candidates per wanted result, re-scored exactly from the store


def _faiss():
    from .storefiles import StoreError

    try:
        import faiss
    except ImportError:
        raise StoreError("ann=True needs faiss", hint="pip install 'blip2-cli[ann]' (faiss-cpu), or search without ann",
                         params=["ann"]) from None
    return faiss


def index_file(store) -> Path:
    return Path(store.path) / f"ann-{store.generation}.faiss"


def _per_row(store) -> int:
    return store.meta.dims[0] if len(store.meta.dims) == 2 else 1


def build(store, *, nlist: int | None = None, chunk_rows: int = 65536):
    """Train and fill an IVF index over the store's vectors (flattened: ``rows x Q``)."""
    import numpy as np

    from .storefiles import StoreError

    faiss = _faiss()
    d, q = store.meta.dims[-1], _per_row(store)
    n = store.rows * q
    if not n:
        raise StoreError(f"the vector store {str(store.path)!r} is empty: there is nothing to index or search",
                         hint="embed images into it first: blip2 embed PHOTOS -o STORE")
    if nlist is None and n < FLAT_BELOW:
        index = faiss.index_factory(d, "Flat", faiss.METRIC_INNER_PRODUCT)
    else:
        nlist = nlist or max(1, min(int(math.sqrt(n)), n // 39))
        index = faiss.index_factory(d, f"IVF{nlist},SQ8", faiss.METRIC_INNER_PRODUCT)
        sample_rows = np.unique(np.linspace(0, store.rows - 1,
                                            num=min(store.rows, max(1, nlist * 64 // q))).astype(np.int64))
        train = np.asarray(store.matrix[sample_rows], dtype=np.float32).reshape(-1, d)
        index.train(train)
    for start in range(0, store.rows, chunk_rows):
        block = store.read_rows(start, min(store.rows, start + chunk_rows)).astype(np.float32)
        index.add(np.ascontiguousarray(block.reshape(-1, d)))
    return index


def load_or_build(store, *, quiet: bool = True):
    """The saved index for the store's generation, or a new one (saved; stale ones removed)."""
    from .storefiles import remove_stale_temp

    faiss = _faiss()
    path = index_file(store)
    remove_stale_temp(path.parent)  # an index being saved when its process was killed
    if path.exists():
        return faiss.read_index(str(path))
    if not quiet:
        from . import console

        console.message(f"building the approximate (faiss) index for {store.rows:,} rows "
                        f"(once per store version): {path}")
    index = build(store)
    from .fsutil import replacing

    with replacing(path) as tmp:
        faiss.write_index(index, tmp)
    for old in path.parent.glob(path.name.split("ann-")[0] + "ann-*.faiss"):
        if old != path:
            old.unlink(missing_ok=True)
    return index


def search(store, index, query, k: int, *, nprobe: int = NPROBE, refine: int = REFINE):
    """The ``k`` best rows, best first: ``refine x k`` candidates from the index, re-scored
    exactly from the store's own vectors (the scores are those of exact search)."""
    import numpy as np

    from .store import Hit, score_rows

    faiss = _faiss()
    q = _per_row(store)
    if store.rows == 0:
        return []
    try:
        faiss.extract_index_ivf(index).nprobe = nprobe
    except RuntimeError:  # a flat index (a small store): exact, nothing to probe
        pass
    query = np.asarray(query, dtype=np.float32).reshape(-1)
    want = min(store.rows * q, max(k, refine * k) * q)
    _, ids = index.search(query.reshape(1, -1), want)
    ids = ids[0][ids[0] >= 0]
    rows = np.unique(ids // q)
    if not len(rows):
        return []
    block = np.asarray(store.matrix[rows], dtype=np.float32)
    scores = np.asarray(score_rows(block, query, mode="text"), dtype=np.float32)
    order = np.lexsort((rows, -scores))[:k]
    return [Hit(float(scores[i]), int(rows[i])) for i in order]
