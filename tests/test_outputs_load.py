"""Several blip2 outputs load as one Hugging Face dataset: the Parquet ones (README, "Scale out").

JSON Lines cannot promise it: ``load_dataset("json")`` takes each column's type from the
first file, and a column that is null in every record there (``error`` in a run without
failures, ``revision``) is typed null, so a later file with a string in it fails to cast;
``generation`` (a JSON object) differs between runs with different options. The Parquet
writer types every column up front (``error`` and the settings are strings, ``generation``
one JSON string), so the files of different runs share one schema.
"""

from __future__ import annotations

import shutil

import pytest
from helpers import FAST, cli

datasets = pytest.importorskip("datasets")


def test_parquet_outputs_of_two_runs_load_as_one_dataset(tiny_opt, tmp_path, example_images):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    shutil.copy(example_images[0], a)  # the first run: no error at all
    shutil.copy(example_images[1], b)
    (b / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")  # the second: an error, other settings
    first = cli("caption", a, "-m", tiny_opt, *FAST, "-o", tmp_path / "a.parquet")
    second = cli("caption", b, "-m", tiny_opt, *FAST, "--prompt", "a photo of", "--seed", "3",
                 "-o", tmp_path / "b.parquet")
    assert (first.exit_code, second.exit_code) == (0, 1), first.output + second.output
    ds = datasets.load_dataset("parquet", data_files=[str(tmp_path / "a.parquet"), str(tmp_path / "b.parquet")],
                               split="train", cache_dir=str(tmp_path / "hf"))
    rows = ds.to_list()
    assert len(rows) == 3
    assert sum(r["error"] is not None for r in rows) == 1
    assert ds.features["error"].dtype == "string" and ds.features["revision"].dtype == "string"
    assert sum('"prompt":"a photo of"' in r["generation"] for r in rows) == 2
    assert all(r["caption"] for r in rows if r["error"] is None)
