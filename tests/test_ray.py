"""blip2cli.ray on a local Ray: Dataset.map_batches(Captioner / Embedder) over
read_binary_files, read_images and img2dataset-style Parquet, equal to the CLI's records.

One local Ray per module (2 CPUs, no dashboard); the actors load the tiny checkpoints
on the CPU. These tests are heavy (Ray starts workers): keep them few.
"""

from __future__ import annotations

import shutil

import pytest
from helpers import FAST, cli, jsonl

ray = pytest.importorskip("ray")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

OPTIONS = {"max_new_tokens": 5, "num_beams": 1}  # = FAST
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.data.context")


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             ignore_reinit_error=True)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.verbose_progress = False
    yield
    ray.shutdown()


@pytest.fixture
def folder(tmp_path, example_images):
    """4 photos, a truncated JPEG and a text file named .png."""
    root = tmp_path / "in"
    root.mkdir()
    for image in example_images:
        shutil.copy(image, root / image.name)
    data = example_images[3].read_bytes()
    (root / "corrupt.jpg").write_bytes(data[: len(data) // 3])
    (root / "notes.png").write_text("not an image\n")
    return root


def cli_captions(tiny, paths) -> dict[str, str]:
    result = cli("caption", *paths, "-m", tiny, *FAST, "-f", "jsonl")
    assert result.exit_code == 0, result.output
    return {r["path"].rsplit("/", 1)[-1]: r["caption"] for r in jsonl(result.stdout)}


def test_read_binary_files_gives_a_row_per_file_and_error_rows(local_ray, tiny_opt, folder, example_images):
    import blip2cli.ray

    ds = ray.data.read_binary_files(str(folder), include_paths=True)
    ds = ds.map_batches(blip2cli.ray.Captioner, fn_constructor_kwargs={"model": str(tiny_opt), **OPTIONS},
                        concurrency=1, batch_size=4, batch_format="numpy")
    rows = {r["path"].rsplit("/", 1)[-1]: r for r in ds.take_all()}
    assert len(rows) == 6
    errors = {name for name, r in rows.items() if r["error"] is not None}
    assert errors == {"corrupt.jpg", "notes.png"}
    assert all(rows[name]["caption"] is None for name in errors)
    expected = cli_captions(tiny_opt, example_images)
    assert {name: rows[name]["caption"] for name in expected} == expected
    row = rows["rocket.jpg"]
    assert list(row["captions"]) == [row["caption"]]
    assert isinstance(row["bytes"], bytes) and row["bytes"] == example_images[3].read_bytes()  # passed through
    assert row["model"] and row["preprocess"] == "fast"
    assert '"num_beams":1' in row["generation"] and '"max_new_tokens":5' in row["generation"]
    # the device: what Ray gave the worker (no GPU here: the CPU); the driver keeps the library's auto
    assert ray.get(ray.remote(num_gpus=0)(blip2cli.ray.actor_device).remote()) == "cpu"
    assert blip2cli.ray.actor_device() == "auto"


def test_read_images_gives_the_same_captions_in_every_batch_format(local_ray, tiny_opt, tmp_path, example_images):
    import blip2cli.ray

    pngs = [p for p in example_images if p.suffix == ".png"]
    root = tmp_path / "png"
    root.mkdir()
    for p in pngs:
        shutil.copy(p, root / p.name)
    expected = cli_captions(tiny_opt, pngs)
    for batch_format in ("numpy", "pandas", "pyarrow"):
        ds = ray.data.read_images(str(root), include_paths=True, mode="RGB")
        ds = ds.map_batches(blip2cli.ray.Captioner,
                            fn_constructor_kwargs={"model": str(tiny_opt), "drop_image": True, **OPTIONS},
                            concurrency=1, batch_size=2, batch_format=batch_format)
        rows = ds.take_all()
        assert {r["path"].rsplit("/", 1)[-1]: r["caption"] for r in rows} == expected, batch_format
        assert all(r["error"] is None for r in rows)
        assert "image" not in rows[0]  # drop_image


def test_img2dataset_parquet_keeps_every_row_and_column(local_ray, tiny_opt, tmp_path, example_images):
    import blip2cli.ray

    jpgs = [p.read_bytes() for p in example_images] + [b"\xff\xd8broken", None]
    table = pa.table({
        "key": [f"{i:09d}" for i in range(len(jpgs))],
        "jpg": pa.array(jpgs, type=pa.binary()),
        "caption": [f"alt text {i}" for i in range(len(jpgs))],
        "url": [f"https://example.com/{i}.jpg" for i in range(len(jpgs))],
    })
    pq.write_table(table, tmp_path / "00000.parquet")
    ds = ray.data.read_parquet(str(tmp_path / "00000.parquet"))
    ds = ds.map_batches(blip2cli.ray.Captioner,
                        fn_constructor_kwargs={"model": str(tiny_opt), "column": "jpg", **OPTIONS},
                        concurrency=1, batch_size=3, batch_format="pyarrow")
    out = tmp_path / "out"
    ds.write_parquet(str(out))
    back = pa.concat_tables([pq.read_table(f) for f in sorted(out.glob("*.parquet"))]).sort_by("key")
    assert back.num_rows == len(jpgs)
    for name in ("key", "jpg", "caption", "url"):  # every input column as it was
        assert back.column(name).to_pylist() == table.column(name).to_pylist(), name
    rows = back.to_pylist()
    errors = [r["key"] for r in rows if r["error"] is not None]
    assert errors == ["000000004", "000000005"]
    expected = cli_captions(tiny_opt, example_images)
    got = {p.name: r["blip2_caption"] for p, r in zip(example_images, rows)}  # img2dataset's caption kept
    assert got == expected


def test_embedder_mean_vectors_equal_the_cli(local_ray, tiny_itm, example_images):
    import numpy as np

    import blip2cli.ray

    result = cli("embed", *example_images, "-m", tiny_itm, "--pool", "mean", "-f", "jsonl")
    assert result.exit_code == 0, result.output
    expected = {r["path"].rsplit("/", 1)[-1]: np.asarray(r["vector"], dtype=np.float32)
                for r in jsonl(result.stdout)}
    ds = ray.data.from_items([{"path": str(p)} for p in example_images])
    ds = ds.map_batches(blip2cli.ray.Embedder, fn_constructor_kwargs={"model": str(tiny_itm), "pool": "mean"},
                        concurrency=1, batch_size=4)
    rows = ds.take_all()
    assert len(rows) == 4
    for row in rows:
        assert row["error"] is None and row["pool"] == "mean"
        got = np.asarray(row["vector"], dtype=np.float32)
        want = expected[row["path"].rsplit("/", 1)[-1]]
        assert got.shape == want.shape and float(np.abs(got - want).max()) < 1e-4


def test_asker_per_row_questions_and_the_declared_schema(tiny_opt, example_images):
    """The adapters are plain callables (Spark, Daft): an Arrow batch in, an Arrow batch out,
    of the schema output_schema() declares without a model."""
    import blip2cli
    import blip2cli.ray

    model = blip2cli.load(str(tiny_opt), device="cpu")
    asker = blip2cli.ray.Asker(model, question_column="q", **OPTIONS)
    table = pa.table({"path": [str(p) for p in example_images[:3]], "q": ["what is it?", None, "where is it?"]})
    out = asker(table)
    assert out.schema == asker.schema(table.schema) == blip2cli.ray.output_schema("ask", table.schema)
    rows = out.to_pylist()
    assert [r["path"] for r in rows] == table.column("path").to_pylist()
    assert rows[1]["error"] and rows[1]["answer"] is None and rows[1]["template"] == rows[0]["template"]
    assert rows[0]["error"] is None and rows[2]["error"] is None
    assert rows[0]["answer"] == model.ask(example_images[0], "what is it?", **OPTIONS)
    assert rows[2]["answer"] == model.ask(example_images[2], "where is it?", **OPTIONS)


def test_declared_schema_without_a_model_and_no_ray_import():
    """output_schema names the columns (img2dataset's caption kept, blip2's beside it) and
    picks the image column by name; importing blip2cli.ray imports neither Ray nor torch."""
    import subprocess
    import sys

    import blip2cli.ray

    source = pa.schema([("key", pa.string()), ("jpg", pa.binary()), ("caption", pa.string()), ("url", pa.string())])
    schema = blip2cli.ray.output_schema("caption", source, drop_image=True)
    assert schema.names == ["key", "caption", "url", "blip2_caption", "captions", "error", "model", "revision",
                            "checkpoint", "dtype", "quantize", "preprocess", "generation"]
    assert schema.field("captions").type == pa.list_(pa.string()) and schema.field("generation").type == pa.string()
    embed = blip2cli.ray.output_schema("embed", pa.schema([("path", pa.string())]), vector_size=256)
    assert embed.names[:3] == ["path", "dims", "vector"] and embed.field("vector").type.list_size == 256
    with pytest.raises(KeyError, match="column="):
        blip2cli.ray.output_schema("caption", pa.schema([("key", pa.string())]))
    code = "import sys, blip2cli.ray; print(sorted(m for m in ('ray', 'torch') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
