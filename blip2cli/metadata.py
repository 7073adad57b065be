"""``blip2 caption DIR --metadata``: the Hugging Face imagefolder file.

``DIR/metadata.jsonl`` holds one line per captioned image, ``{"file_name": path
relative to DIR, "caption": ...}`` (``captions`` too with ``--num-captions`` > 1),
which ``datasets.load_dataset("imagefolder", data_dir=DIR)`` reads as is: each
image with its caption column. Images that failed are left out (and counted in
the summary; ``--failed-list`` names them), as is a file name that is not valid
UTF-8 (the dataset could not name it). ``--metadata-format csv|parquet`` writes
``metadata.csv`` / ``metadata.parquet`` instead.

The file is written atomically when the run ends: a temporary hidden file in DIR
(``.blip2-*.tmp``), renamed over ``metadata.*``; an interrupted run leaves the old
file (if any) as it was.
"""

from __future__ import annotations

import atexit
import csv
import json
import os
import tempfile
from typing import Any

from . import console
from .choices import EmbedFormat, names
from .errors import OutputError, UsageError
from .fsutil import new_file_mode
from .utf8 import is_clean, original_path

FORMATS = tuple(names(EmbedFormat))  # the same three files as embed's records: jsonl, csv, parquet


def metadata_root(inputs, *, resume: bool, parts: bool) -> str:
    """The one folder a --metadata run captions (what file_name is relative to)."""
    inputs = list(inputs or [])
    if len(inputs) != 1 or not os.path.isdir(inputs[0]):
        raise UsageError("metadata=True captions one folder: name exactly one directory",
                         hint="name the folder itself (train/, not train/*.jpg)", params=["metadata"])
    if resume or parts:
        raise UsageError("metadata=True writes its file whole at the end of a run: it does not go with resume, "
                         "shard or an output directory",
                         hint="caption the folder once, in one run, with metadata=True",
                         params=["metadata", "resume", "shard"])
    return inputs[0]


class MetadataWriter:
    """A writer wrapper: passes each record on, keeps the successful ones for the file."""

    def __init__(self, inner, root: str, *, fmt: str = "jsonl", several: bool = False):
        if fmt not in FORMATS:
            raise UsageError(f"metadata_format={fmt!r}: one of {', '.join(FORMATS)}", params=["metadata_format"])
        self.inner = inner
        self.root = root
        self.fmt = fmt
        self.several = several
        self.target = os.path.join(root, "metadata." + fmt)
        self.written = self.failed = self.unnamed = 0
        self._rows: list[dict] = []  # parquet only (written at the end)
        try:
            fd, self._tmp = tempfile.mkstemp(prefix=".blip2-", suffix=".tmp", dir=root)
        except OSError as exc:
            raise OutputError(f"cannot write {self.target}: {exc.strerror or exc}") from exc
        self._fh = os.fdopen(fd, "w", encoding="utf-8", newline="")
        atexit.register(self._discard)
        self._csv: Any = None
        if fmt == "csv":
            self._csv = csv.writer(self._fh, lineterminator="\r\n")
            self._csv.writerow(["file_name", "caption", *(["captions"] if several else [])])

    def write(self, record: dict) -> None:
        self.inner.write(record)
        if record.get("error"):
            self.failed += 1
            return
        path = original_path(record) or ""
        rel = os.path.relpath(os.path.abspath(path), os.path.abspath(self.root)).replace(os.sep, "/")
        if rel.startswith("../") or not is_clean(rel):
            self.unnamed += 1
            return
        row = {"file_name": rel, "caption": record.get("caption")}
        if self.several:
            row["captions"] = list(record.get("captions") or [])
        if self.fmt == "jsonl":
            self._fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        elif self.fmt == "csv":
            self._csv.writerow([row["file_name"], row["caption"], *([json.dumps(row["captions"])] if self.several else [])])
        else:
            self._rows.append(row)
        self.written += 1

    def close(self) -> None:
        self.inner.close()
        try:
            if self.fmt == "parquet":
                self._fh.close()
                from .parquet import require_pyarrow

                pq = require_pyarrow()
                import pyarrow as pa

                columns = {"file_name": pa.string(), "caption": pa.string()}
                if self.several:
                    columns["captions"] = pa.list_(pa.string())
                pq.write_table(pa.Table.from_pylist(self._rows, schema=pa.schema(list(columns.items()))), self._tmp)
            else:
                self._fh.flush()
                os.fsync(self._fh.fileno())
                self._fh.close()
            os.chmod(self._tmp, new_file_mode())
            os.replace(self._tmp, self.target)
            atexit.unregister(self._discard)
        except OSError as exc:
            self._discard()
            raise OutputError(f"cannot write {self.target}: {exc.strerror or exc}") from exc
        note = f"{self.target}: {self.written} images"
        if self.failed:
            note += f"; {self.failed} that failed left out"
        if self.unnamed:
            note += f"; {self.unnamed} whose name is not valid UTF-8 left out"
        console.message(note)

    def _discard(self) -> None:
        try:
            if not self._fh.closed:
                self._fh.close()
        except OSError:
            pass
        try:
            os.unlink(self._tmp)
        except OSError:
            pass


def for_run(inputs, *, wanted: bool, fmt: str, several: bool, sidecar, resume: bool, parts: bool):
    """The writer wrapper of ``metadata=True`` for a caption run (None without it), once the
    options are known to go together."""
    if not wanted:
        if fmt != "jsonl":
            raise UsageError("metadata_format applies to metadata=True", hint="add metadata", params=["metadata_format",
                                                                                                     "metadata"])
        return None
    root = metadata_root(inputs, resume=resume, parts=parts)
    if sidecar is not None and sidecar.existing.value == "skip":
        raise UsageError("metadata=True with sidecar would leave out the images whose sidecar exists "
                         "(existing='skip')", hint="set existing='overwrite', or drop sidecar",
                         params=["metadata", "sidecar", "existing"])
    return wrapper(root, fmt=fmt, several=several)


def wrapper(root, *, fmt: str = "jsonl", several: bool = False):
    """For ``Job.wrappers``; its ``planned`` file (``DIR/metadata.*``) is in the run's output
    plan, checked against every input and output before anything is opened."""
    if root is None:
        return None
    if fmt not in FORMATS:
        raise UsageError(f"metadata_format={fmt!r}: one of {', '.join(FORMATS)}", params=["metadata_format"])
    from .guard import Planned

    def wrap(inner):
        return MetadataWriter(inner, root, fmt=fmt, several=several)

    wrap.planned = (Planned(os.path.join(root, "metadata." + fmt), "the metadata file", "metadata"),)  # type: ignore[attr-defined]
    return wrap
