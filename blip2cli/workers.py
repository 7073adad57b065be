"""Daemon worker threads answering calls through Futures (``DecodePool``).

A low module (it imports nothing of blip2cli): the pipeline decodes items in it and the
contact sheet (``html``) its thumbnails, without the sheet importing the pipeline.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future


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


def wait_for_threads(seconds: float) -> list[threading.Thread]:
    """Give the other threads of this process up to ``seconds`` (in all) to end; returns
    those still alive. Threads started outside ``threading`` (its "dummy" threads: native
    code calling into Python) cannot be joined or waited for, and are left out."""
    import time

    others = [t for t in threading.enumerate()
              if t is not threading.main_thread() and not isinstance(t, threading._DummyThread)]
    deadline = time.monotonic() + seconds
    for thread in others:
        thread.join(timeout=max(0.0, deadline - time.monotonic()))
    return [t for t in others if t.is_alive()]

