"""Per-item records for in-memory data: ``Model.caption_records`` / ``ask_records`` /
``embed_records`` give the CLI's JSON Lines records, one per item in order, an error
record (never an exception) for a bad image; and the public Arrow schema of them."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from helpers import reference_model, reference_tokens
from typer.testing import CliRunner

import blip2cli
from blip2cli.cli import app

runner = CliRunner()
GEN = dict(num_beams=2, max_new_tokens=5, min_new_tokens=2)


def cli(*args) -> list[dict]:
    result = runner.invoke(app, [*map(str, args)])
    assert result.exit_code in (0, 1), result.output
    return [json.loads(line) for line in result.stdout.splitlines()]


@pytest.fixture(scope="module")
def model(tiny_opt):
    return blip2cli.load(tiny_opt, device="cpu")


@pytest.fixture(scope="module")
def retr(tiny_itm):
    return blip2cli.load(str(tiny_itm), device="cpu")


def jpeg_bytes(path) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.open(path).convert("RGB").save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def mixed(example_images):
    """[path, corrupt bytes, jpeg bytes, PIL image, b"", array]: the 2nd and 5th cannot be decoded."""
    from PIL import Image

    jpeg = jpeg_bytes(example_images[1])
    pil = Image.open(example_images[2]).convert("RGB")
    array = np.asarray(Image.open(example_images[3]).convert("RGB"))
    return [str(example_images[0]), b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, jpeg, pil, b"", array]


IDS = ["a", "b", "c", "d", "e", "f"]


def test_caption_records_mixed_inputs_in_order_with_ids_and_error_records(tiny_opt, model, mixed, tmp_path):
    records = list(model.caption_records(mixed, ids=IDS, batch_size=2, workers=2, **GEN))
    assert [r["id"] for r in records] == IDS
    assert [bool(r["error"]) for r in records] == [False, True, False, False, True, False]
    assert records[4]["error"] == "empty data (0 bytes)" and records[1]["caption"] is None
    assert records[0]["path"] == mixed[0] and all(r["path"] is None for r in records[1:])
    good = [0, 2, 3, 5]
    captions = model.caption([mixed[i] for i in good], **GEN)
    assert [records[i]["caption"] for i in good] == captions
    # each one what transformers' documented per-image usage gives
    processor, _ = reference_model(tiny_opt)
    for i in good:
        image_path = tmp_path / f"{i}.png"
        image = mixed[i]
        if isinstance(image, bytes):
            image_path.write_bytes(image)
        elif isinstance(image, str):
            image_path = image
        else:
            from PIL import Image

            (image if hasattr(image, "save") else Image.fromarray(image)).save(image_path)
        want = reference_tokens(tiny_opt, image_path, None, num_beams=2, max_new_tokens=5, min_new_tokens=2)
        assert records[i]["caption"] == processor.tokenizer.batch_decode(want, skip_special_tokens=True)[0].strip()


def test_records_have_the_clis_keys_and_settings(tiny_opt, model, example_images):
    want = cli("caption", example_images[0], "--model", tiny_opt, "-f", "jsonl", "--num-beams", 2,
               "--max-new-tokens", 5, "--min-new-tokens", 2)
    ours = list(model.caption_records([example_images[0]], **GEN))
    assert ours == want  # same keys, same order, same values (settings included)
    with_ids = list(model.caption_records([example_images[0]], ids=np.array([7]), **GEN))
    assert list(with_ids[0]) == ["id", *want[0]] and with_ids[0]["id"] == 7
    assert type(with_ids[0]["id"]) is int  # a numpy id (a Ray/pandas column) as a plain value


def test_caption_files_are_the_records_over_paths(model, example_images):
    paths = [str(p) for p in example_images]
    assert list(blip2cli.caption_files(paths, model=model, **GEN)) == list(model.caption_records(paths, **GEN))


def test_ask_records_per_image_and_question_in_the_clis_order(tiny_opt, model, example_images):
    questions = ["what is it?", "is it red?"]
    images = [str(example_images[0]), b"broken", str(example_images[1])]
    records = list(model.ask_records(images, questions, ids=[1, 2, 3], num_beams=1, max_new_tokens=4))
    assert [(r["id"], r["question"]) for r in records] == [(i, q) for i in (1, 2, 3) for q in questions]
    assert [bool(r["error"]) for r in records] == [False, False, True, True, False, False]
    want = cli("ask", example_images[0], example_images[1], "-q", questions[0], "-q", questions[1],
               "--model", tiny_opt, "-f", "jsonl", "--num-beams", 1, "--max-new-tokens", 4)
    assert [{k: v for k, v in r.items() if k != "id"} for r in records if not r["error"]] == want
    answers = model.ask([example_images[0], example_images[1]], questions, num_beams=1, max_new_tokens=4)
    assert [r["answer"] for r in records if not r["error"]] == [a for per in answers for a in per]


def test_embed_records_equal_the_cli_and_embed_images(tiny_itm, retr, example_images):
    images = [str(example_images[0]), b"", example_images[1].read_bytes()]
    records = list(retr.embed_records(images, ids=["x", "y", "z"], pool="mean"))
    assert [r["id"] for r in records] == ["x", "y", "z"] and records[1]["error"] and records[1]["vector"] is None
    vectors = retr.embed_images([images[0], images[2]], pool="mean")
    for record, vector in zip([records[0], records[2]], vectors):
        assert record["dims"] == list(vector.shape)
        np.testing.assert_array_equal(np.asarray(record["vector"], dtype=np.float32), vector.reshape(-1))
    want = cli("embed", example_images[0], "--model", tiny_itm, "-f", "jsonl", "--pool", "mean")
    assert [{k: v for k, v in records[0].items() if k != "id"}] == want


def test_ids_of_another_length_are_refused_naming_ids(model, example_images):
    with pytest.raises(blip2cli.OptionError, match="ids has 1 values for 2 images") as info:
        model.caption_records(example_images[:2], ids=["only one"])
    assert "ids" in info.value.params
    with pytest.raises(blip2cli.OptionError, match="ids must be a list"):
        model.caption_records(example_images[:1], ids="a")


def test_a_bad_item_of_any_kind_is_an_error_record(model, example_images):
    bad = [42, np.zeros((0, 0, 3), np.uint8), np.zeros((4, 4, 3), np.float32), "/no/such/file.png"]
    records = list(model.caption_records([*bad, example_images[0]], num_beams=1, max_new_tokens=3))
    assert [bool(r["error"]) for r in records] == [True, True, True, True, False]
    assert "got int" in records[0]["error"] and "no pixels" in records[1]["error"]


def test_records_can_stop_early(model, example_images):
    for record in model.caption_records([str(p) for p in example_images], num_beams=1, max_new_tokens=3,
                                        batch_size=1):
        break
    assert record["caption"]
    assert isinstance(model.caption(example_images[0], num_beams=1, max_new_tokens=3), str)


# -- the Arrow schema ------------------------------------------------------------------------------
def write_parquet(tmp_path, records):
    from blip2cli.parquet import ParquetWriter
    from blip2cli.writers import Sink

    path = tmp_path / "out.parquet"
    sink = Sink(str(path)).open()
    writer = ParquetWriter(sink)
    for record in records:
        writer.write(dict(record))
    writer.close()
    sink.close()
    import pyarrow.parquet as pq

    return pq.read_table(path)


@pytest.mark.parametrize("task", ["caption", "ask"])
def test_the_public_schema_is_what_parquet_writes(model, example_images, tmp_path, task):
    if task == "caption":
        records = list(model.caption_records(example_images[:2], ids=[1, 2], **GEN))
    else:
        records = list(model.ask_records(example_images[:2], "what?", ids=[1, 2], num_beams=1, max_new_tokens=3))
    table = write_parquet(tmp_path, records)
    schema = blip2cli.record_schema(task, id_type=int)
    assert table.schema.equals(schema, check_metadata=False), (table.schema, schema)
    assert model.record_schema(task, id_type=int).equals(schema)
    assert table.column("id").to_pylist() == [r["id"] for r in records]
    assert blip2cli.record_schema(task).names == schema.names[1:]  # no ids: no id column


def test_the_embed_schema_has_the_models_vector_length(retr, example_images, tmp_path):
    import pyarrow as pa

    records = list(retr.embed_records(example_images[:2], ids=["a", "b"]))
    table = write_parquet(tmp_path, records)
    schema = retr.record_schema("embed", id_type=str)
    assert table.schema.equals(schema, check_metadata=False), (table.schema, schema)
    assert schema.field("vector").type == pa.list_(pa.float32(), len(records[0]["vector"]))
    assert blip2cli.record_schema("embed").field("vector").type == pa.list_(pa.float32())
    with pytest.raises(blip2cli.OptionError, match="task must be one of"):
        blip2cli.record_schema("chat")
