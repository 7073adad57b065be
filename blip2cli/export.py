"""clip-retrieval's layout: what autofaiss, clip-retrieval's back-end and faiss read.

``blip2 embed photos/ -o out/ --layout clip-retrieval`` keeps a segmented store in
``out/`` (``blip2-store.json`` + ``seg-*`` files: incremental, crash-safe, what
``blip2 search --index out/`` reads) and, after each commit, writes from it::

    out/img_emb/img_emb_0.npy           2-D float32 [n, D], one file per 1,000,000 rows
    out/metadata/metadata_0.parquet     image_path (and caption, when known), row for row

Rows are the store's rows in order. A store of 32 query vectors per image
(``--pool none``, the default) is exported pooled by default
(``vectors="mean"``: the mean of the query vectors, re-normalised, one row per
image: what ``--pool mean`` stores) or flattened (``vectors="flatten"``: 32 rows
per image, each with its ``image_path`` and ``query`` number: the best of an
image's rows is BLIP-2's ITC score, so a k x 32 search deduplicated by image is
exact). The export is rewritten whole at each run (a copy of the store: O(rows));
each file is written under a temporary name and renamed, and files left over
from a bigger export are removed.
"""

from __future__ import annotations

import os
from pathlib import Path

ROWS_PER_FILE = 1_000_000
EXPORT_VECTORS = ("mean", "flatten")


def export_clip_retrieval(store, out: str | os.PathLike, *, vectors: str = "mean",
                          rows_per_file: int = ROWS_PER_FILE, captions: dict | None = None) -> int:
    """Write ``store`` (an open ``VectorStore`` or ``SegmentedStore``) in clip-retrieval's
    layout under ``out``; return the number of vector rows written.

    ``captions``: ``path -> caption`` for the ``caption`` column (omitted when None)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    if vectors not in EXPORT_VECTORS:
        raise ValueError(f"vectors must be one of {EXPORT_VECTORS}, not {vectors!r}")
    out = Path(out)
    emb_dir, meta_dir = out / "img_emb", out / "metadata"
    emb_dir.mkdir(parents=True, exist_ok=True)
    meta_dir.mkdir(parents=True, exist_ok=True)
    per_query = len(store.meta.dims) == 2
    q = store.meta.dims[0] if per_query and vectors == "flatten" else 1
    step = max(1, rows_per_file // q)
    written = files = 0
    for files, start in enumerate(range(0, store.rows, step)):
        stop = min(store.rows, start + step)
        block = store.read_rows(start, stop).astype(np.float32)
        if per_query and vectors == "mean":
            block = block.mean(axis=1)
            if store.meta.normalized:
                block /= np.maximum(np.linalg.norm(block, axis=1, keepdims=True), 1e-12)
        elif per_query:
            block = block.reshape(-1, block.shape[-1])
        paths = store.paths(start, stop) if hasattr(store, "paths") else [e.path for e in store.entries[start:stop]]
        columns = {"image_path": [p for p in paths for _ in range(q)]}
        if q > 1:
            columns["query"] = pa.array(np.tile(np.arange(q, dtype=np.int32), stop - start))
        if captions is not None:
            columns["caption"] = [captions.get(p) for p in paths for _ in range(q)]
        _replace(emb_dir / f"img_emb_{files}.npy", lambda f: np.save(f, np.ascontiguousarray(block)))
        _replace(meta_dir / f"metadata_{files}.parquet", lambda f: pq.write_table(pa.table(columns), f))
        written += len(block)
    count = files + 1 if store.rows else 0
    for folder, stem, ext in ((emb_dir, "img_emb_", ".npy"), (meta_dir, "metadata_", ".parquet")):
        for p in folder.glob(f"{stem}*{ext}"):  # left over from a bigger export
            number = p.name[len(stem):-len(ext)]
            if number.isdigit() and int(number) >= count:
                p.unlink()
    return written


def _replace(path: Path, write) -> None:
    from .fsutil import replacing

    with replacing(path) as tmp, open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def export_segments(store, out: str | os.PathLike) -> int:
    """Copy ``store`` (a single-file store, typically) into a new segmented store at
    ``out`` (a directory that does not exist yet, or is empty): the same rows in the
    same order, its settings, and the files it remembers as failed. Returns the rows.

    The migration path to ``--layout segments``: the single-file store is read, not
    changed (delete it when the new one serves)."""
    import dataclasses

    import numpy as np

    from .errors import UsageError
    from .segments import SegmentedUpdate
    from .store import _COPY_BYTES

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"{str(out)!r} exists and is not an empty directory",
                         hint="name a new directory for the segmented store")
    row_bytes = int(np.prod(store.meta.dims)) * np.dtype(store.meta.dtype).itemsize
    step = max(1, _COPY_BYTES // max(1, row_bytes))
    with SegmentedUpdate(out, dataclasses.replace(store.meta), layout="segments") as update:
        for start in range(0, store.rows, step):
            stop = min(store.rows, start + step)
            block = store.read_rows(start, stop)
            entries = store.entries[start:stop] if isinstance(store.entries, list) else \
                [store.entries[r] for r in range(start, stop)]
            for entry, row in zip(entries, block):
                update.add(entry, row)
        for info in store.failed.values():
            update.fail(info["path"], info["abspath"], info.get("error"))
        update.commit()
    return store.rows


def read_captions(path: str | os.PathLike) -> dict:
    """``path -> caption`` from the JSON Lines records of ``blip2 caption`` (records
    without a caption, error records and lines that are not JSON objects are skipped)."""
    import json

    captions = {}
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and isinstance(rec.get("path"), str) and isinstance(rec.get("caption"), str):
                captions[rec["path"]] = rec["caption"]
    return captions
