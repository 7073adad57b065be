"""No thread of ours can keep an interrupted run alive: the contact sheet's thumbnail
decoders are daemon threads, and the library's record iterators do not wait for a
pipeline stuck in a read when the caller is interrupted."""

from __future__ import annotations

import threading


from blip2cli import api, html, pipeline


class _ListWriter:
    def __init__(self):
        self.records = []

    def write(self, record):
        self.records.append(record)


def test_sheet_thumbnails_are_decoded_in_daemon_threads(monkeypatch, tmp_path):
    seen = []

    def fake_thumbnail(path, size):
        seen.append(threading.current_thread().daemon)
        return None

    monkeypatch.setattr(html, "_sheet_thumbnail", fake_thumbnail)
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        (tmp_path / name).write_bytes(b"x")
    records = [{"path": name, "caption": "x"} for name in ("a.jpg", "b.jpg", "c.jpg")]
    writer = _ListWriter()
    written = html.render_records(records, writer, html.Thumbnails(), root=str(tmp_path), links=False, workers=2)
    assert written == 3 and [r["path"] for r in writer.records] == ["a.jpg", "b.jpg", "c.jpg"]
    assert seen == [True, True, True]


def test_an_interrupted_caller_does_not_wait_for_a_stuck_pipeline(monkeypatch):
    stuck = threading.Event()

    def fake_run(items, task, writer, **kwargs):
        writer.write({"path": "a.jpg"})
        stuck.wait()  # a decode blocked in a read that never returns

    monkeypatch.setattr(pipeline, "run", fake_run)
    gen = api._pipeline_records([], None, settings={}, batch_size=1, workers=1, seed=None)
    assert next(gen)["path"] == "a.jpg"
    outcome = []

    def interrupt():
        try:
            gen.throw(KeyboardInterrupt)
        except KeyboardInterrupt:
            outcome.append("raised")

    thread = threading.Thread(target=interrupt, daemon=True)
    thread.start()
    thread.join(timeout=10)
    stuck.set()
    assert outcome == ["raised"], "the interrupt waited for the stuck pipeline thread"


def test_waiting_for_threads_at_exit_passes_over_threads_it_cannot_join():
    """`blip2`'s exit (and the test session's end) waits for other threads; a thread started
    by native code ("dummy" to `threading`) cannot be joined and must not make that wait
    raise, while a live Python thread is reported."""
    import _thread
    import threading

    from blip2cli.workers import wait_for_threads

    seen, release = threading.Event(), threading.Event()

    def native():
        threading.current_thread()  # registers a dummy thread
        seen.set()
        release.wait(10)

    _thread.start_new_thread(native, ())
    busy = threading.Thread(target=release.wait, args=(10,), daemon=True)
    busy.start()
    assert seen.wait(5)
    try:
        alive = wait_for_threads(0.2)  # other tests may have left threads too: only ours are asserted
        assert busy in alive and not any(isinstance(t, threading._DummyThread) for t in alive)
    finally:
        release.set()
    busy.join(5)
    assert busy not in wait_for_threads(1.0)
