"""A vector store in the layouts other tools read (``blip2 export``).

clip-retrieval's (``export_clip_retrieval``): what autofaiss, clip-retrieval's back-end
and faiss read, named as clip-retrieval's own writer names them (the file number
zero-padded to the digits of the file count: ``img_emb_0.npy`` for one file,
``img_emb_00.npy`` .. ``img_emb_11.npy`` for twelve)::

    out/img_emb/img_emb_0.npy           2-D float32 [n, D], ROWS_PER_FILE rows per file
    out/metadata/metadata_0.parquet     image_path (and caption, when known), row for row

Rows are the store's rows in order. A store of 32 query vectors per image
(``--pool none``, the default) is exported pooled (``vectors="mean"``: the mean of
the query vectors, re-normalised, one row per image: what ``--pool mean`` stores;
its ranking is *not* ``blip2 search``'s) or flattened (``vectors="flatten"``: 32 rows
per image, each with its ``image_path`` and ``query`` number: the best of an image's
rows is BLIP-2's ITC score, so a k x 32 search deduplicated by image gives
``blip2 search``'s ranking). ``image_path`` is the path as embedded, or absolute
(``absolute_paths=True``).

The export is written into a temporary folder inside ``out`` and then moved into
place, every metadata file before any vector file, so a run killed at any point
never leaves an ``img_emb`` file without its metadata (the next export removes
what a killed one left). Files left over from a bigger export are removed.

A single matrix (``export_matrix``): ``FILE.npy`` (numpy) or ``FILE.safetensors``
(one tensor ``vectors``, the settings in its header), with ``FILE.index.parquet``
beside it (the rows' paths, in order; the settings in its key-value metadata).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

ROWS_PER_FILE = 1_000_000
EXPORT_VECTORS = ("mean", "flatten")
TEMP_PREFIX = ".blip2-export-"
KINDS = {"img_emb": ("img_emb_", ".npy"), "metadata": ("metadata_", ".parquet")}


def part_name(kind: str, number: int, count: int) -> str:
    """clip-retrieval's name for file ``number`` of ``count``: zero-padded to the digits of
    ``count`` (its writer pads to ``int(log10(count)) + 1``)."""
    stem, ext = KINDS[kind]
    return f"{stem}{str(number).zfill(len(str(max(1, count))))}{ext}"


def export_clip_retrieval(store, out: str | os.PathLike, *, vectors: str = "mean",
                          rows_per_file: int = ROWS_PER_FILE, captions: dict | None = None,
                          absolute_paths: bool = False) -> int:
    """Write ``store`` (an open ``VectorStore``) in clip-retrieval's layout under ``out``;
    return the number of vector rows written.

    ``captions``: ``path -> caption`` for the ``caption`` column (omitted when None);
    ``absolute_paths``: ``image_path`` is each file's absolute path."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    if vectors not in EXPORT_VECTORS:
        raise ValueError(f"vectors must be one of {EXPORT_VECTORS}, not {vectors!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(TEMP_PREFIX + "*"):  # what a killed export left
        shutil.rmtree(stale, ignore_errors=True)
    tmp = out / f"{TEMP_PREFIX}{uuid.uuid4().hex[:12]}"
    per_query = len(store.meta.dims) == 2
    q = store.meta.dims[0] if per_query and vectors == "flatten" else 1
    step = max(1, rows_per_file // q)
    count = -(-store.rows // step)
    written = 0
    names: dict[str, list[str]] = {kind: [] for kind in KINDS}
    try:
        for kind in KINDS:
            (tmp / kind).mkdir(parents=True)
        for number, start in enumerate(range(0, store.rows, step)):
            stop = min(store.rows, start + step)
            block = store.read_rows(start, stop).astype(np.float32)
            if per_query and vectors == "mean":
                block = block.mean(axis=1)
                if store.meta.normalized:
                    block /= np.maximum(np.linalg.norm(block, axis=1, keepdims=True), 1e-12)
            elif per_query:
                block = block.reshape(-1, block.shape[-1])
            paths = store.paths(start, stop)
            shown = store.paths(start, stop, column="abspath") if absolute_paths else paths
            columns = {"image_path": [p for p in shown for _ in range(q)]}
            if q > 1:
                columns["query"] = pa.array(np.tile(np.arange(q, dtype=np.int32), stop - start))
            if captions is not None:
                columns["caption"] = [captions.get(p) for p in paths for _ in range(q)]
            emb, meta = part_name("img_emb", number, count), part_name("metadata", number, count)
            with open(tmp / "img_emb" / emb, "wb") as f:
                np.save(f, np.ascontiguousarray(block))
                f.flush()
                os.fsync(f.fileno())
            pq.write_table(pa.table(columns), tmp / "metadata" / meta)
            names["img_emb"].append(emb)
            names["metadata"].append(meta)
            written += len(block)
        # into place: every metadata file first, then the vectors (an img_emb file never lacks its metadata)
        for kind in ("metadata", "img_emb"):
            (out / kind).mkdir(exist_ok=True)
            for name in names[kind]:
                os.replace(tmp / kind / name, out / kind / name)
        for kind in ("img_emb", "metadata"):  # left over from another export
            stem, ext = KINDS[kind]
            keep = set(names[kind])
            for p in (out / kind).glob(f"{stem}*{ext}"):
                if p.name[len(stem):-len(ext)].isdigit() and p.name not in keep:
                    p.unlink()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return written


def export_matrix(store, out: str | os.PathLike, *, kind: str) -> int:
    """Write ``store``'s rows as one matrix file ``out`` (``kind``: ``npy`` or ``safetensors``)
    and its index ``out.index.parquet`` (each written under a temporary name, then renamed:
    the matrix first). Returns the rows."""
    import struct

    from .fsutil import replacing
    from .storefiles import COPY_BYTES, entries_table, npy_header, pyarrow_modules

    out = Path(out)
    meta = store.meta
    settings = {**meta.settings(), "rows": store.rows, "generation": store.generation}
    if kind == "npy":
        header = npy_header(meta, store.rows)
    elif kind == "safetensors":
        metadata = {k: json.dumps(v) for k, v in settings.items()}
        nbytes = store.rows * meta.row_bytes
        raw = json.dumps({"__metadata__": metadata,
                          "vectors": {"dtype": {"float32": "F32", "float16": "F16"}[meta.dtype],
                                      "shape": [store.rows, *meta.dims], "data_offsets": [0, nbytes]}},
                         separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # keep the data 8-byte aligned
        header = struct.pack("<Q", len(raw)) + raw
    else:
        raise ValueError(f"kind must be npy or safetensors, not {kind!r}")
    step = max(1, COPY_BYTES // max(1, meta.row_bytes))
    with replacing(out) as tmp, open(tmp, "wb") as f:
        f.write(header)
        for start in range(0, store.rows, step):
            f.write(store.read_rows(start, min(store.rows, start + step)).data)
        f.flush()
        os.fsync(f.fileno())
    _, pq = pyarrow_modules()
    table = entries_table(list(store.entries)).replace_schema_metadata({b"blip2": json.dumps(settings).encode()})
    with replacing(out.with_name(out.name + ".index.parquet")) as tmp:
        pq.write_table(table, tmp)
    return store.rows


def read_captions(path: str | os.PathLike) -> dict:
    """``path -> caption`` from the JSON Lines records of ``blip2 caption`` (records
    without a caption, error records and lines that are not JSON objects are skipped)."""
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
