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


class Task(Protocol):
    def prepare(self, item: Item) -> Any: ...

    def run_batch(self, prepared: list[Any]) -> list[Any]: ...

    def record(self, item: Item, result: Any, error: str | None) -> dict: ...


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


class DecodePool:
    """``workers`` daemon threads running ``submit``ted calls, each answered through a Future.

    Not a ThreadPoolExecutor: its threads are joined when the interpreter exits, so
    one blocked in a read would hold an interrupted run alive for ever. These are
    daemon threads: ``shutdown`` lets idle ones end, and a stuck one is simply
    left behind when the process exits."""

    _STOP = None

    def __init__(self, workers: int, name: str = "blip2-decode"):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True) for i in range(max(1, workers))
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, fn, *args) -> Future:
        future: Future = Future()
        self._jobs.put((future, fn, args))
        return future

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is self._STOP:
                return
            future, fn, args = job
            del job
            if future.set_running_or_notify_cancel():
                try:
                    result = fn(*args)
                except BaseException as exc:  # noqa: BLE001 - handed to whoever waits on the future
                    future.set_exception(exc)
                else:
                    future.set_result(result)
                    del result
            del future, fn, args  # hold nothing (a decoded image) while idle

    def shutdown(self) -> None:
        """Pending calls not started are cancelled by the caller; idle threads end."""
        for _ in self._threads:
            self._jobs.put(self._STOP)


def _prepare(task: Task, item: Item, stats: Stats) -> Any:
    if item.error is not None:
        from .decode import ImageError

        raise ImageError(item.error)
    t0 = time.perf_counter()
    try:
        return task.prepare(item)
    finally:
        stats.add_decode(time.perf_counter() - t0)


def _is_out_of_memory(exc: BaseException) -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover
        return False
    return isinstance(exc, torch.cuda.OutOfMemoryError)


def _free_cuda_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run(
    items: Iterable[Item],
    task: Task,
    writer,
    *,
    batch_size: int,
    workers: int,
    reporter=None,
    fail_fast: bool = False,
    queue_size: int = 4096,
) -> Stats:
    """``queue_size``: items the source may read ahead (tar shard samples hold their bytes)."""
    from .decode import ImageError

    stats = Stats()
    started = time.perf_counter()
    source = _SourceThread(items, maxsize=queue_size)
    lookahead = max(batch_size * 2, workers * 2, 4)
    pool = DecodePool(workers)
    pending: deque[tuple[Item, Future]] = deque()
    batch: list[tuple[Item, Any, str | None]] = []
    ready = 0  # items in ``batch`` that decoded fine

    def top_up(block: bool) -> None:
        while len(pending) < lookahead:
            item = source.get(block=block)
            if item is None:
                return
            pending.append((item, pool.submit(_prepare, task, item, stats)))
            block = False

    def run_model(prepared: list) -> list:
        """On CUDA out-of-memory: halve, retry the same images, keep the size that worked."""
        nonlocal batch_size
        try:
            return task.run_batch(prepared)
        except Exception as exc:  # noqa: BLE001 - only OOM is handled, the rest re-raised
            if not _is_out_of_memory(exc) or len(prepared) == 1:
                raise
        _free_cuda_cache()
        half = (len(prepared) + 1) // 2
        if half < batch_size:
            batch_size = half
            stats.batch_size_reduced_to = half
            if reporter is not None and hasattr(reporter, "note"):
                reporter.note(f"out of GPU memory: batch size reduced to {half}")
        return run_model(prepared[:half]) + run_model(prepared[half:])

    def flush() -> None:
        nonlocal batch, ready
        if not batch:
            return
        good = [(i, p) for i, (_, p, err) in enumerate(batch) if err is None]
        results: dict[int, Any] = {}
        if good:
            t0 = time.perf_counter()
            outputs = run_model([p for _, p in good])
            took = time.perf_counter() - t0
            stats.stage_seconds["model"] += took
            stats.batch_seconds.append(took)
            results = {i: out for (i, _), out in zip(good, outputs)}
        t0 = time.perf_counter()
        for i, (item, _, err) in enumerate(batch):
            made = task.record(item, results.get(i), err)
            # A task may make several records of one item (ask: one per question).
            records = made if isinstance(made, list) else [made]
            failure = None
            for record in records:
                writer.write(record)  # a writer may set "error" (e.g. a sidecar it could not write)
                failure = failure or record.get("error")
            if failure is None:
                stats.done += 1
            else:
                stats.failed += 1
                if reporter is not None:
                    reporter.item_failed(item.name, failure)
            if reporter is not None:
                reporter.advance()
        stats.stage_seconds["write"] += time.perf_counter() - t0
        batch, ready = [], 0

    try:
        while True:
            top_up(block=False)
            if not pending:
                flush()  # the source is slow or done: don't sit on finished work
                top_up(block=True)
                if not pending:
                    break
            item, future = pending.popleft()
            t0 = time.perf_counter()
            try:
                prepared, error = future.result(), None
            except ImageError as exc:
                prepared, error = None, str(exc)
            except Exception as exc:  # noqa: BLE001 - one bad image must not end the run
                # An interrupt is no Exception (KeyboardInterrupt, errors.Interrupted): it
                # ends the run from here, and no image is blamed for it.
                prepared, error = None, f"cannot read this image ({type(exc).__name__}: {exc})"
            stats.stage_seconds["wait_decode"] += time.perf_counter() - t0
            batch.append((item, prepared, error))
            if error is None:
                ready += 1
            elif fail_fast:
                flush()
                break
            if ready >= batch_size:
                flush()
        flush()
    finally:
        for _, future in pending:
            future.cancel()
        pool.shutdown()  # never waits: a decode stuck in a read is left to its daemon thread
        stats.seconds = time.perf_counter() - started
    return stats
