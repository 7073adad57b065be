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


class SentAheadTask(FakeTask):
    """A stage whose model is elsewhere: batches are sent ahead (``submit_batch``) and come
    back in any order (here: each later batch first); it is closed when the run ends."""

    in_flight = 2

    def __init__(self, bad=()):
        super().__init__(bad=bad)
        self.futures = []
        self.closed = False
        self.most_out = 0

    def submit_batch(self, prepared):
        from concurrent.futures import Future

        future = Future()
        future.prepared = list(prepared)
        self.futures.append(future)
        out = [f for f in self.futures if not f.done()]
        self.most_out = max(self.most_out, len(out))
        original = future.result

        def result(timeout=None):
            for f in reversed([f for f in self.futures if not f.done()]):  # the newest answered first
                f.set_result(self.run_batch(f.prepared))
            return original(timeout)

        future.result = result
        return future

    def close(self):
        self.closed = True


def test_batches_sent_ahead_are_written_in_input_order():
    task = SentAheadTask(bad={"3", "10"})
    writer = ListWriter()
    stats = run(items(30), task, writer, batch_size=4, workers=2)
    assert [r["path"] for r in writer.records] == [str(i) for i in range(30)]
    assert [r["value"] for r in writer.records if not r["error"]] == [2 * i for i in range(30) if i not in (3, 10)]
    assert stats.done == 28 and stats.failed == 2
    assert task.most_out == 3  # in_flight batches out, plus the one just sent
    assert task.closed


def test_batches_sent_ahead_are_written_before_waiting_on_a_slow_source():
    """A source that pauses: what was sent is written before the pipeline waits for more."""
    import threading
    import time

    task = SentAheadTask()
    writer = ListWriter()
    gate = threading.Event()
    seen = []

    def slow():
        yield from items(6)
        gate.wait(10)  # the source pauses until the watcher has looked

    def watch():
        deadline = time.monotonic() + 5
        while len(writer.records) < 6 and time.monotonic() < deadline:
            time.sleep(0.01)
        seen.append(len(writer.records))
        gate.set()

    watcher = threading.Thread(target=watch)
    watcher.start()
    run(slow(), task, writer, batch_size=4, workers=1)
    watcher.join()
    assert seen == [6] and [r["value"] for r in writer.records] == [2 * i for i in range(6)]
