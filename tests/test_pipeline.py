"""The pipeline on a fake task: order, streaming, out-of-memory back-off."""

from __future__ import annotations

import torch

from blip2cli.decode import ImageError
from blip2cli.pipeline import run
from blip2cli.sources import Item


class ListWriter:
    def __init__(self):
        self.records = []

    def write(self, record):
        self.records.append(record)


class FakeTask:
    """Doubles numbers; a model that runs out of memory above ``limit`` items per call."""

    def __init__(self, limit=None, bad=()):
        self.limit = limit
        self.bad = set(bad)
        self.calls = []

    def prepare(self, item):
        if item.name in self.bad:
            raise ImageError("broken on purpose")
        return int(item.name)

    def run_batch(self, prepared):
        self.calls.append(list(prepared))
        if self.limit is not None and len(prepared) > self.limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (fake)")
        return [p * 2 for p in prepared]

    def record(self, item, result, error):
        return {"path": item.name, "value": result, "error": error}


def items(n):
    return [Item(name=str(i), source=str(i)) for i in range(n)]


def test_records_in_input_order_with_errors_in_place():
    writer = ListWriter()
    stats = run(items(23), FakeTask(bad={"5", "17"}), writer, batch_size=4, workers=3)
    assert [r["path"] for r in writer.records] == [str(i) for i in range(23)]
    assert [r["value"] for r in writer.records if not r["error"]] == [2 * i for i in range(23) if i not in (5, 17)]
    assert stats.done == 21 and stats.failed == 2
    assert len(stats.batch_seconds) == 6  # 21 good images in batches of 4


def test_out_of_memory_halves_the_batch_and_loses_nothing():
    task = FakeTask(limit=3)
    writer = ListWriter()
    stats = run(items(20), task, writer, batch_size=8, workers=2)
    assert [r["value"] for r in writer.records] == [2 * i for i in range(20)]  # none lost, none twice
    assert stats.batch_size_reduced_to == 2
    done_calls = [c for c in task.calls if len(c) <= 3]
    assert sorted(x for c in done_calls for x in c) == list(range(20))
    # after the first failure the remembered size is used: later calls never exceed it
    first_ok = next(i for i, c in enumerate(task.calls) if len(c) <= 3)
    assert all(len(c) <= 2 for c in task.calls[first_ok + 3:])


def test_other_errors_are_not_swallowed():
    class Boom(FakeTask):
        def run_batch(self, prepared):
            raise RuntimeError("not an OOM")

    try:
        run(items(3), Boom(), ListWriter(), batch_size=2, workers=1)
    except RuntimeError as exc:
        assert "not an OOM" in str(exc)
    else:
        raise AssertionError("the error was swallowed")
