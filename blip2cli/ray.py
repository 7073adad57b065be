"""Ray Data adapters: caption, ask and embed a ``ray.data.Dataset`` with ``map_batches``.

::

    import ray, blip2cli.ray

    ds = ray.data.read_binary_files("s3://bucket/photos/", include_paths=True)
    ds = ds.map_batches(blip2cli.ray.Captioner,
                        fn_constructor_kwargs={"model": "Salesforce/blip2-opt-2.7b", "num_beams": 1},
                        concurrency=4, num_gpus=1, batch_size=64)
    ds.write_parquet("captions/")

* one model per actor, loaded in the actor's constructor on the device Ray gave
  it (``cuda`` when the actor holds a GPU, else ``cpu``; ``device=`` wins);
* the image column is found by name (``image``: the arrays of ``read_images``;
  ``bytes``: ``read_binary_files``; img2dataset's ``jpg``/``png``/``webp``;
  ``path``: files the workers can read) or named with ``column=``;
* the task's columns are added (``caption``, ``captions``, ``error`` and the
  settings the CLI's records carry; ``question``, ``answer``, ``answers`` for
  :class:`Asker`; ``dims``, ``vector`` for :class:`Embedder`); ``error`` is null
  when the row is fine and says why when its image is not: a bad image is an
  error row, never an exception, so one corrupt file cannot abort the job;
* every other input column passes through unchanged; ``drop_image=True`` drops
  the image column (the bytes are rarely wanted in the output); a task column
  whose name an input column already has (img2dataset's ``caption``) is written
  as ``blip2_<name>`` (``blip2_caption``) and the input column is kept;
* the options are the library's keyword options (``num_beams``, ``prompt``,
  ``batch_size``, ``pool``, ...); for the same images and settings the values
  are the CLI's records (``generation`` is a JSON string, as ``--format parquet``
  writes it).

The classes take numpy, pandas and pyarrow batches (``batch_format=``) and
return the same kind. Nothing here imports Ray: the same classes serve Spark's
``mapInPandas`` and Daft (see README, "Scale out").
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = ["IMAGE_COLUMNS", "Asker", "Captioner", "Embedder", "actor_device", "output_schema", "task_fields"]

#: Where an image is looked for when ``column=`` is not given, in this order.
IMAGE_COLUMNS = ("image", "bytes", "jpg", "png", "webp", "path")

# Keys of a record that say which input it came from: the row itself says that here.
_INPUT_KEYS = ("path", "path_bytes", "original_path", "id")
# What load() takes; every other keyword is the task's option.
_LOAD_KEYS = ("device", "dtype", "quantize", "revision", "offline", "allow_pickle")
_PREFIX = "blip2_"


def actor_device() -> str:
    """``"cuda"`` in a Ray actor or task that holds a GPU (Ray sets ``CUDA_VISIBLE_DEVICES``
    to it), ``"cpu"`` in one that holds none, ``"auto"`` elsewhere (a Ray driver, Spark, Daft)."""
    try:
        import ray
    except ImportError:
        return "auto"
    try:
        if not ray.is_initialized():
            return "auto"
        context = ray.get_runtime_context()
        if context.get_actor_id() is None and context.get_task_id() is None:
            return "auto"  # the driver: Ray assigned it nothing
        return "cuda" if ray.get_gpu_ids() else "cpu"
    except Exception:  # noqa: BLE001 - not in a worker: the library's own choice
        return "auto"


# -- batches: numpy dicts, pandas frames, Arrow tables ---------------------------------
def _kind(batch) -> str:
    if isinstance(batch, dict):
        return "numpy"
    if hasattr(batch, "schema") and hasattr(batch, "column_names"):
        return "pyarrow"
    if hasattr(batch, "columns") and hasattr(batch, "iloc"):
        return "pandas"
    raise TypeError(f"a batch must be a dict of numpy arrays, a pandas DataFrame or a pyarrow Table, "
                    f"got {type(batch).__name__}")


def _names(batch, kind: str) -> list[str]:
    if kind == "numpy":
        return list(batch)
    if kind == "pyarrow":
        return list(batch.column_names)
    return [str(c) for c in batch.columns]


def _values(batch, kind: str, name: str) -> list:
    """One column as a list of Python values (an image as bytes, a path or an array)."""
    if kind == "numpy":
        return list(batch[name])
    if kind == "pandas":
        column = batch[name]
        try:
            return list(column.to_numpy())
        except Exception:  # noqa: BLE001 - an extension type without to_numpy
            return list(column)
    column = batch.column(name)
    import pyarrow as pa

    if isinstance(column.type, pa.ExtensionType):  # Ray's tensor columns (read_images)
        array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
        return list(array.to_numpy(zero_copy_only=False))
    return column.to_pylist()


def _is_null(value) -> bool:
    if value is None:
        return True
    return isinstance(value, float) and math.isnan(value)  # pandas' NaN for a missing value


# -- the adapters ------------------------------------------------------------------------
class _Adapter:
    task = ""

    def __init__(self, model: Any, *, column: str | None = None, drop_image: bool = False, **options):
        from .api import Model, load

        load_options = {k: options.pop(k) for k in _LOAD_KEYS if k in options}
        if isinstance(model, Model):
            if load_options:
                raise TypeError(f"{', '.join(load_options)}: a loaded Model is used as it is; pass a checkpoint "
                                f"name to have each worker load it")
            self.model = model
        else:
            device = load_options.pop("device", None) or actor_device()
            self.model = load(model, device=device, **load_options)
        self.column = column
        self.drop_image = drop_image
        self.options = options
        self._check_options()
        self.fields = task_fields(self.task, self._record_schema())

    # what a subclass supplies
    def _check_options(self) -> None:
        list(self._records([]))  # the library checks the options before any image

    def _record_schema(self):
        return self.model.record_schema(self.task)

    def _records(self, images: list) -> Iterable[dict]:
        raise NotImplementedError

    def _batch_records(self, batch, kind: str, images: list) -> list[dict]:
        return list(self._records(images))

    # the Ray face
    def image_column(self, names: Sequence[str]) -> str:
        """The column the images are read from: ``column=``, else the first of :data:`IMAGE_COLUMNS`."""
        return _image_column(names, self.column)

    def schema(self, input_schema):
        """The ``pyarrow.Schema`` of the batches this returns for batches of ``input_schema``
        (Spark's ``mapInPandas`` wants it up front)."""
        return _output_schema(self.fields, input_schema, self.image_column(input_schema.names), self.drop_image)

    def __call__(self, batch):
        kind = _kind(batch)
        names = _names(batch, kind)
        column = self.image_column(names)
        images = _values(batch, kind, column)
        missing = [i for i, image in enumerate(images) if _is_null(image)]
        for i in missing:
            images[i] = b""  # an error record with the run's settings; its reason is set below
        records = self._batch_records(batch, kind, images)
        for i in missing:
            records[i] = {**records[i], "error": f"no image in column {column!r} (null)"}
        return self._join(batch, kind, names, column, records)

    def _join(self, batch, kind: str, names: list[str], column: str, records: list[dict]):
        kept = [n for n in names if not (self.drop_image and n == column)]
        columns = {(_PREFIX + f.name if f.name in kept else f.name): (f, [_cell(r.get(f.name)) for r in records])
                   for f in self.fields}
        if kind == "numpy":
            import numpy as np

            out = {n: batch[n] for n in kept}
            for name, (_, values) in columns.items():
                array = np.empty(len(values), dtype=object)
                array[:] = values
                out[name] = array
            return out
        if kind == "pandas":
            out = batch[kept].copy() if len(kept) != len(names) else batch.copy()
            for name, (_, values) in columns.items():
                out[name] = values
            return out
        import pyarrow as pa

        out = batch.select(kept) if len(kept) != len(names) else batch
        for name, (field, values) in columns.items():
            out = out.append_column(pa.field(name, field.type), pa.array(values, type=field.type))
        return out


def _image_column(names: Sequence[str], column: str | None) -> str:
    if column is not None:
        if column not in names:
            raise KeyError(f"column={column!r} is not a column of the dataset (columns: {', '.join(names)})")
        return column
    for name in IMAGE_COLUMNS:
        if name in names:
            return name
    raise KeyError(f"no image column among {', '.join(names)}: expected one of {', '.join(IMAGE_COLUMNS)}; "
                   f"name it with column=")


def task_fields(task: str, record_schema=None) -> list:
    """The columns an adapter adds for ``task`` (``caption``, ``ask``, ``embed``): the fields
    of :func:`blip2cli.record_schema` but those naming the input (``path``, ``id``)."""
    if record_schema is None:
        from .api import record_schema as schema_of

        record_schema = schema_of(task)
    return [f for f in record_schema if f.name not in _INPUT_KEYS]


def _output_schema(fields: list, input_schema, column: str, drop_image: bool):
    import pyarrow as pa

    kept = [f for f in input_schema if not (drop_image and f.name == column)]
    names = {f.name for f in kept}
    return pa.schema([*kept, *(pa.field(_PREFIX + f.name if f.name in names else f.name, f.type) for f in fields)])


def output_schema(task: str, input_schema, *, column: str | None = None, drop_image: bool = False,
                  vector_size: int | None = None):
    """The ``pyarrow.Schema`` an adapter for ``task`` returns for batches of ``input_schema``
    (without loading a model: for Spark's ``mapInPandas``, Daft's ``return_dtype``).

    ``vector_size``: ``embed``'s values per vector (256 with ``pool="mean"`` on ITC);
    ``None``: a plain ``list<float32>``.
    """
    from .api import record_schema

    fields = task_fields(task, record_schema(task, vector_size=vector_size))
    return _output_schema(fields, input_schema, _image_column(input_schema.names, column), drop_image)


def _cell(value):
    """A record value as a column holds it: nested settings (``generation``) as JSON, as Parquet has them."""
    if isinstance(value, dict):
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return value


class Captioner(_Adapter):
    """``map_batches(Captioner, fn_constructor_kwargs={"model": ..., **caption_options})``.

    Adds ``caption`` (the best caption), ``captions`` (all of them), ``error`` and the
    settings (``model``, ``revision``, ``dtype``, ``quantize``, ``preprocess``,
    ``generation``). Options: those of :meth:`blip2cli.Model.caption` (``prompt``,
    ``num_beams``, ``max_new_tokens``, ``num_captions``, ``sample``, ``seed``,
    ``batch_size``, ...) and of :func:`blip2cli.load` (``dtype``, ``quantize``, ``device``).
    """

    task = "caption"

    def _records(self, images):
        return self.model.caption_records(images, **self.options)


class Embedder(_Adapter):
    """``map_batches(Embedder, fn_constructor_kwargs={"model": ..., "pool": "mean"})``.

    Adds ``dims``, ``vector`` (flat float32, row-major), ``error`` and the settings
    (``preprocess``, ``features``, ``pool`` beside the model's). Options: those of
    :meth:`blip2cli.Model.embed_images` (``pool``, ``features``, ``batch_size``).
    """

    task = "embed"

    def _records(self, images):
        return self.model.embed_records(images, **self.options)

    def _record_schema(self):
        features, pool = self.options.get("features", "auto"), self.options.get("pool", "none")
        return self.model.record_schema("embed", features=features, pool=pool)


class Asker(_Adapter):
    """``map_batches(Asker, fn_constructor_kwargs={"model": ..., "question": "what is it?"})``.

    One question for every row (``question=``) or each row's own (``question_column=``);
    one output row per input row. Adds ``question``, ``answer``, ``answers``, ``error``
    and the settings. Options: those of :meth:`blip2cli.Model.ask`.
    """

    task = "ask"

    def __init__(self, model: Any, *, question: str | None = None, question_column: str | None = None, **options):
        if (question is None) == (question_column is None):
            raise TypeError("Asker needs question= (one question for every row) or question_column= (not both)")
        if question is not None and not isinstance(question, str):
            raise TypeError("question= is one question (a str); use question_column= for one per row")
        self.question = question
        self.question_column = question_column
        super().__init__(model, **options)

    def _check_options(self) -> None:
        list(self.model.ask_records([], self.question or "?", **self.options))

    def _batch_records(self, batch, kind, images):
        if self.question is not None:
            return list(self.model.ask_records(images, self.question, **self.options))
        names = _names(batch, kind)
        if self.question_column not in names:
            raise KeyError(f"question_column={self.question_column!r} is not a column (columns: {', '.join(names)})")
        questions = _values(batch, kind, self.question_column)
        out: list[dict | None] = [None] * len(images)
        by_question: dict[str, list[int]] = {}
        for i, q in enumerate(questions):
            if isinstance(q, str) and q.strip():
                by_question.setdefault(q, []).append(i)
        for q, rows in by_question.items():
            for i, record in zip(rows, self.model.ask_records([images[i] for i in rows], q, **self.options)):
                out[i] = record
        unasked = [i for i, record in enumerate(out) if record is None]
        if unasked:  # an error record with the run's settings
            blank = next(iter(self.model.ask_records([b""], "?", **self.options)))
            for i in unasked:
                out[i] = {**blank, "question": None, "error": f"no question in column {self.question_column!r}"}
        return out  # type: ignore[return-value]
