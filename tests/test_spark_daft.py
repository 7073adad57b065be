"""README's Spark and Daft recipes ("Scale out"), the same code on img2dataset-style Parquet and a tiny checkpoint:
the same per-item records as ``blip2 caption``, every row back, a broken image an error row.

Daft runs in process (fast tier with the model tests); Spark needs a JVM and starts one
(about 40 s here), so it is ``slow``. Each skips when its engine is not installed
(``.ci/run`` installs both: the ``test`` extra); without java the Spark test skips, and
fails when ``CI`` is set.
"""

from __future__ import annotations

import os
import shutil
import sys

import pytest
from helpers import FAST, cli, jsonl

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

OPTIONS = {"max_new_tokens": 5, "num_beams": 1}  # = FAST


@pytest.fixture
def img2dataset_dir(tmp_path, example_images):
    """One img2dataset --output_format parquet file: key, jpg, caption (alt text), url; the last jpg broken."""
    jpgs = [p.read_bytes() for p in example_images] + [b"\xff\xd8 broken"]
    root = tmp_path / "pq"
    root.mkdir()
    pq.write_table(pa.table({
        "key": [f"{i:09d}" for i in range(len(jpgs))],
        "jpg": pa.array(jpgs, type=pa.binary()),
        "caption": [f"alt text {i}" for i in range(len(jpgs))],
        "url": [f"https://example.com/{i}.jpg" for i in range(len(jpgs))],
    }), root / "00000.parquet")
    return root


def cli_captions(tiny, example_images) -> list[str]:
    result = cli("caption", *example_images, "-m", tiny, *FAST, "-f", "jsonl")
    assert result.exit_code == 0, result.output
    return [r["caption"] for r in jsonl(result.stdout)]


def check(rows: list[dict], expected: list[str], alt_text: str) -> None:
    rows = sorted(rows, key=lambda r: r["key"])
    assert [r["key"] for r in rows] == [f"{i:09d}" for i in range(len(expected) + 1)]
    assert [r[alt_text] for r in rows] == [f"alt text {i}" for i in range(len(rows))]
    assert [r["error"] is None for r in rows] == [True] * len(expected) + [False]
    assert [r["caption" if alt_text != "caption" else "blip2_caption"] for r in rows[:-1]] == expected
    assert all("jpg" not in r for r in rows)  # drop_image


def test_daft_class_udf(tiny_opt, img2dataset_dir, example_images):
    daft = pytest.importorskip("daft")
    import blip2cli.ray as adapters

    fields = adapters.task_fields("caption")

    @daft.cls
    class Caption:
        def __init__(self, model: str, **options):
            self.captioner = adapters.Captioner(model, column="image", drop_image=True, **options)

        @daft.method.batch(return_dtype=daft.DataType.from_arrow_type(pa.struct(fields)), unnest=True)
        def __call__(self, images):
            table = self.captioner(pa.table({"image": images.to_arrow()}))
            return table.to_struct_array().combine_chunks()

    caption = Caption(str(tiny_opt), device="cpu", **OPTIONS)
    df = daft.read_parquet(str(img2dataset_dir / "*.parquet"))
    df = df.select("key", df["caption"].alias("alt_text"), "url", caption(df["jpg"]))
    check(df.to_arrow().to_pylist(), cli_captions(tiny_opt, example_images), "alt_text")


@pytest.mark.slow
def test_spark_map_in_pandas(tiny_opt, img2dataset_dir, example_images, tmp_path, monkeypatch):
    pytest.importorskip("pyspark")
    if shutil.which("java") is None:  # Spark runs on a JVM (Java 17 or newer)
        message = "Spark needs java on PATH (Debian: apt-get install openjdk-17-jre-headless)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    from pyspark.sql import SparkSession
    from pyspark.sql.pandas.types import from_arrow_schema, to_arrow_schema

    import blip2cli.ray as adapters

    monkeypatch.setenv("PYSPARK_PYTHON", sys.executable)  # the workers import this checkout
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in sys.path if p))
    spark = (SparkSession.builder.master("local[1]").appName("blip2-test")
             .config("spark.ui.enabled", "false").config("spark.sql.execution.arrow.pyspark.enabled", "true")
             .getOrCreate())
    try:
        model = str(tiny_opt)
        df = spark.read.parquet(str(img2dataset_dir))
        schema = adapters.output_schema("caption", to_arrow_schema(df.schema), column="jpg", drop_image=True)

        def caption(batches):
            captioner = adapters.Captioner(model, column="jpg", drop_image=True, device="cpu", **OPTIONS)
            for batch in batches:
                yield captioner(batch)

        df.mapInPandas(caption, from_arrow_schema(schema)).write.parquet(str(tmp_path / "out"))
    finally:
        spark.stop()
    table = pq.read_table(tmp_path / "out")
    assert table.schema.names == schema.names
    check(table.to_pylist(), cli_captions(tiny_opt, example_images), "caption")
