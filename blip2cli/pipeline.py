"""The pipeline: sources -> decode (thread pool) -> batches -> model -> writer.

``run()`` joins the stages. Items are decoded ahead of the model in a pool of
worker threads (Pillow releases the GIL while decoding and resizing), so the
model rarely waits; records come out in input order, a batch at a time, each
written and flushed as soon as its batch is done.

Items come from a background thread, so a slow producer (``tail -f list |
blip2 caption -``) never holds back results that are ready: when nothing is
being decoded and the source has nothing new, the partial batch is run.

A task is anything with three methods:

* ``prepare(item)`` runs in a worker thread and returns what the model needs
  (raises ``decode.ImageError`` for a bad image);
* ``run_batch(prepared_list)`` runs the model on the main thread and returns
  one result per input;
* ``record(item, result, error)`` makes the output record (or a list of
  records, e.g. one per question); an item counts as failed when one of its
  records carries an ``error`` once written.

Interruption: Ctrl-C (KeyboardInterrupt) or SIGTERM (``errors.Interrupted``,
raised by ``errors.sigterm_as_interrupt``) wherever the main thread is -- waiting
for a decode, for the source, or in the model -- ends ``run()`` at once: the
records already written stay whole, the batch in flight is dropped, nothing is
recorded for it. Both are ``BaseException``s, so no ``except Exception`` here can
take one for a bad image. Decode workers and the source are daemon threads: one
stuck in a read (a slow network file system) can never keep the process alive
after the main thread has decided to exit.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Protocol

from .sources import Item
from .workers import DecodePool


class Stage(Protocol):
    """What the pipeline runs per item and per batch (``CaptionTask``, ``AskTask``,
    ``EmbedTask``): not to be confused with ``tasks.Task``, a task's registry entry."""

    def prepare(self, item: Item) -> Any: ...

    def run_batch(self, prepared: list[Any]) -> list[Any]: ...

    def record(self, item: Item, result: Any, error: str | None) -> dict: ...


# A stage whose model is elsewhere (``client.RemoteStage``: a server) may also have
# ``submit_batch(prepared) -> Future`` and ``in_flight`` (batches sent ahead of the one
# being written): the next batches then run while earlier ones are written, in order;
# and ``close()``, called when the run ends however it ends.


@dataclass
class Stats:
    done: int = 0
    failed: int = 0
    seconds: float = 0.0
    # decode: worker time summed over threads; wait_decode: the main thread waiting for it.
    stage_seconds: dict[str, float] = field(
        default_factory=lambda: {"decode": 0.0, "wait_decode": 0.0, "model": 0.0, "write": 0.0}
    )
    batch_seconds: list[float] = field(default_factory=list)  # one model call per batch
    batch_size_reduced_to: int | None = None  # after a CUDA out-of-memory error
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add_decode(self, seconds: float) -> None:
        with self._lock:
            self.stage_seconds["decode"] += seconds

    @property
    def total(self) -> int:
        return self.done + self.failed


class _SourceThread:
    """Pulls items from an iterator on a daemon thread; exceptions are re-raised in the consumer."""

    _END = object()

    def __init__(self, items: Iterable[Item], maxsize: int = 4096):
        self.queue: queue.Queue = queue.Queue(maxsize)
        self.finished = False
        self._thread = threading.Thread(target=self._pump, args=(iter(items),), daemon=True)
        self._thread.start()

    def _pump(self, it: Iterator[Item]) -> None:
        try:
            for item in it:
                self.queue.put(item)
                del item  # not held while the source reads the next one (a tar sample holds its bytes)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            self.queue.put(_Raise(exc))
        self.queue.put(self._END)

    def get(self, block: bool) -> Item | None:
        """Next item, or None when none is ready (non-blocking) or the source is exhausted."""
        if self.finished:
            return None
        try:
            got = self.queue.get(block=block)
        except queue.Empty:
            return None
        if got is self._END:
            self.finished = True
            return None
        if isinstance(got, _Raise):
            self.finished = True
            raise got.exc
        return got


@dataclass
class _Raise:
    exc: BaseException


def _prepare(task: Stage, item: Item, stats: Stats) -> Any:
    if item.error is not None:
        from .decode import ImageError

        raise ImageError(item.error)
    t0 = time.perf_counter()
    try:
        return task.prepare(item)
    finally:
        stats.add_decode(time.perf_counter() - t0)


def _is_out_of_memory(exc: BaseException) -> bool:
    import sys

    torch = sys.modules.get("torch")  # never imported here: a run without torch (--server) has no CUDA
    return torch is not None and isinstance(exc, torch.cuda.OutOfMemoryError)


def _free_cuda_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class _Batcher:
    """One run's state: the source, the decodes in flight (``lookahead`` of them), the
    batch being filled and the batch size (halved on CUDA out-of-memory)."""

    def __init__(self, items: Iterable[Item], task: Stage, writer, *, batch_size: int, workers: int,
                 reporter, queue_size: int):
        self.task, self.writer, self.reporter = task, writer, reporter
        self.batch_size = batch_size
        self.stats = Stats()
        self.started = time.perf_counter()
        self.source = _SourceThread(items, maxsize=queue_size)
        self.lookahead = max(batch_size * 2, workers * 2, 4)
        self.pool = DecodePool(workers)
        self.pending: deque[tuple[Item, Future]] = deque()
        self.batch: list[tuple[Item, Any, str | None]] = []
        self.ready = 0  # items in ``batch`` that decoded fine
        # A stage with submit_batch (a server): batches sent ahead, written in order.
        self.ahead = int(getattr(task, "in_flight", 0)) if hasattr(task, "submit_batch") else 0
        self.sent: deque[tuple[list, list, Future | None, float]] = deque()

    def top_up(self, block: bool) -> None:
        while len(self.pending) < self.lookahead:
            item = self.source.get(block=block)
            if item is None:
                return
            self.pending.append((item, self.pool.submit(_prepare, self.task, item, self.stats)))
            block = False

    def take_next(self) -> str | None:
        """Wait for the oldest decode, add it to the batch; returns its error (None if it decoded)."""
        from .decode import ImageError

        item, future = self.pending.popleft()
        t0 = time.perf_counter()
        try:
            prepared, error = future.result(), None
        except ImageError as exc:
            prepared, error = None, str(exc)
        except Exception as exc:  # noqa: BLE001 - one bad image must not end the run
            # An interrupt is no Exception (KeyboardInterrupt, errors.Interrupted): it
            # ends the run from here, and no image is blamed for it.
            prepared, error = None, f"cannot read this image ({type(exc).__name__}: {exc})"
        self.stats.stage_seconds["wait_decode"] += time.perf_counter() - t0
        self.batch.append((item, prepared, error))
        # Held by the batch only: a failed future's traceback holds this frame, whose locals
        # would keep the item (and the bytes it holds) alive until a garbage collection.
        del item, future
        if error is None:
            self.ready += 1
        return error

    def run_model(self, prepared: list) -> list:
        """On CUDA out-of-memory: halve, retry the same images, keep the size that worked."""
        try:
            return self.task.run_batch(prepared)
        except Exception as exc:  # noqa: BLE001 - only OOM is handled, the rest re-raised
            if not _is_out_of_memory(exc) or len(prepared) == 1:
                raise
        _free_cuda_cache()
        half = (len(prepared) + 1) // 2
        if half < self.batch_size:
            self.batch_size = half
            self.stats.batch_size_reduced_to = half
            if self.reporter is not None and hasattr(self.reporter, "note"):
                self.reporter.note(f"out of GPU memory: batch size reduced to {half}")
        return self.run_model(prepared[:half]) + self.run_model(prepared[half:])

    def flush(self) -> None:
        """Run the model on the batch's good images, write every item's records in order
        (a stage with ``submit_batch``: send it, and write the oldest sent once more than
        ``in_flight`` are out)."""
        if not self.batch:
            return
        batch, self.batch, self.ready = self.batch, [], 0
        good = [(i, p) for i, (_, p, err) in enumerate(batch) if err is None]
        if self.ahead:
            future = self.task.submit_batch([p for _, p in good]) if good else None  # type: ignore[attr-defined]
            self.sent.append((batch, good, future, time.perf_counter()))
            while len(self.sent) > self.ahead:
                self.write_oldest()
            return
        results: dict[int, Any] = {}
        if good:
            t0 = time.perf_counter()
            outputs = self.run_model([p for _, p in good])
            self.model_took(time.perf_counter() - t0)
            results = {i: out for (i, _), out in zip(good, outputs)}
        self.write_batch(batch, results)

    def model_took(self, seconds: float) -> None:
        self.stats.stage_seconds["model"] += seconds
        self.stats.batch_seconds.append(seconds)

    def write_oldest(self) -> None:
        """The oldest batch sent: wait for its results, write its records."""
        batch, good, future, sent_at = self.sent.popleft()
        results: dict[int, Any] = {}
        if future is not None:
            outputs = future.result()
            self.model_took(time.perf_counter() - sent_at)  # sent to answered (overlaps the next)
            results = {i: out for (i, _), out in zip(good, outputs)}
        self.write_batch(batch, results)

    def drain(self) -> None:
        """Flush, then write every batch still out (the source is slow or done)."""
        self.flush()
        while self.sent:
            self.write_oldest()

    def write_batch(self, batch: list, results: dict) -> None:
        t0 = time.perf_counter()
        for i, (item, _, err) in enumerate(batch):
            self.write(item, results.get(i), err)
        self.stats.stage_seconds["write"] += time.perf_counter() - t0

    def write(self, item: Item, result: Any, err: str | None) -> None:
        made = self.task.record(item, result, err)
        # A task may make several records of one item (ask: one per question).
        records = made if isinstance(made, list) else [made]
        failure = None
        for record in records:
            self.writer.write(record)  # a writer may set "error" (e.g. a sidecar it could not write)
            failure = failure or record.get("error")
        if failure is None:
            self.stats.done += 1
        else:
            self.stats.failed += 1
            if self.reporter is not None:
                self.reporter.item_failed(item.name, failure)
        if self.reporter is not None:
            self.reporter.advance()

    def loop(self, fail_fast: bool) -> None:
        while True:
            self.top_up(block=False)
            if not self.pending:
                self.drain()  # the source is slow or done: don't sit on finished work
                self.top_up(block=True)
                if not self.pending:
                    break
            error = self.take_next()
            if error is not None and fail_fast:
                self.drain()
                break
            if self.ready >= self.batch_size:
                self.flush()
        self.drain()

    def close(self) -> None:
        for _, future in self.pending:
            future.cancel()
        for _, _, sent, _ in self.sent:  # an interruption: batches sent are dropped, as the one in the model
            if sent is not None:
                sent.cancel()
        self.pool.shutdown()  # never waits: a decode stuck in a read is left to its daemon thread
        self.stats.seconds = time.perf_counter() - self.started


def run(
    items: Iterable[Item],
    task: Stage,
    writer,
    *,
    batch_size: int,
    workers: int,
    reporter=None,
    fail_fast: bool = False,
    queue_size: int = 4096,
) -> Stats:
    """Run ``task`` over ``items``, writing each item's records to ``writer`` in input order;
    returns the Stats. ``queue_size``: items the source may read ahead (tar shard samples
    hold their bytes)."""
    batcher = _Batcher(items, task, writer, batch_size=batch_size, workers=workers, reporter=reporter,
                       queue_size=queue_size)
    try:
        batcher.loop(fail_fast)
    finally:
        batcher.close()
        closing = getattr(task, "close", None)  # a stage holding threads of its own (a server's)
        if closing is not None:
            closing()
    return batcher.stats


# The out-of-memory rule, public for the other batchers (blip2 serve's model thread).
is_out_of_memory = _is_out_of_memory
free_cuda_cache = _free_cuda_cache
