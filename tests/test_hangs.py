"""Never hang, never swallow a signal, bounded memory.

* an interrupt (Ctrl-C, SIGTERM) while the main thread waits for a decode stops the
  run (130/143), keeps the finished records and blames no image for it;
* a decode stuck in a read cannot keep an interrupted process alive;
* named pipes and devices among the inputs are error records, never opened;
* a huge file or a header that claims a huge image is refused before it is read
  whole or decoded.

Nothing here can hang CI: every blocking read is given a way out (a watchdog that
opens the other end of a pipe, a timeout on every subprocess).
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import threading
import time
import tracemalloc
import zlib
from contextlib import contextmanager
from pathlib import Path

import pytest

import blip2cli.decode as safe_decode
from blip2cli.decode import ImageError, open_image
from blip2cli.errors import Interrupted, sigterm_as_interrupt
from blip2cli.pipeline import run
from blip2cli.sources import InputResolver, Item

from helpers import cli, jsonl

FAST = ["--max-new-tokens", "4", "--num-beams", "1"]


class ListWriter:
    def __init__(self):
        self.records = []

    def write(self, record):
        self.records.append(record)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def huge_bilevel_png(side: int = 13000) -> bytes:
    """A valid side x side 1-bit PNG, all black: about 20 KB on disk, 845 MB decoded to RGB."""
    row = b"\x00" * (1 + (side + 7) // 8)  # filter byte + packed bits
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


@contextmanager
def fifo_watch(path: Path):
    """Yields a dict whose "opened" turns True if anything opens ``path`` (a FIFO) to read.

    A watchdog keeps trying a non-blocking open of the write end, which only succeeds
    while a reader has the pipe open (or waits in its open): then it closes it again at
    once, so the reader sees the end of the data instead of waiting for ever. Code that
    opens the pipe is caught; it cannot hang the test."""
    seen = {"opened": False}
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            try:
                fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as exc:
                if exc.errno != errno.ENXIO:  # ENXIO: no reader
                    raise
            else:
                seen["opened"] = True
                os.close(fd)
            stop.wait(0.02)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        stop.set()
        thread.join(5)


# -- case 8: an interrupt while the main thread waits for a decode ------------------
class BlockingTask:
    """Items named "stuck" block in prepare (until released, 30 s at most); others are numbers."""

    def __init__(self):
        self.stuck_started = threading.Event()
        self.release = threading.Event()

    def prepare(self, item):
        if item.name == "stuck":
            self.stuck_started.set()
            if not self.release.wait(30):
                raise ImageError("released by the test's timeout")
            return 0
        return int(item.name)

    def run_batch(self, prepared):
        return [p * 2 for p in prepared]

    def record(self, item, result, error):
        return {"path": item.name, "value": result, "error": error}


def _main_thread_waits_on_a_future() -> bool:
    frame = sys._current_frames().get(threading.main_thread().ident)
    while frame is not None:
        if frame.f_code.co_name == "result" and "concurrent" in frame.f_code.co_filename:
            return True
        frame = frame.f_back
    return False


def signal_when_waiting(sig, task: BlockingTask, writer: ListWriter, written: int) -> threading.Thread:
    """Send ``sig`` once ``written`` records are out and the main thread waits on the stuck decode."""

    def send():
        task.stuck_started.wait(30)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if len(writer.records) >= written and _main_thread_waits_on_a_future():
                break
            time.sleep(0.01)
        os.kill(os.getpid(), sig)

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread


def test_sigterm_while_waiting_for_a_decode_stops_the_run():
    """The signal lands in future.result(): the run stops with Interrupted, no false error record."""
    task = BlockingTask()
    writer = ListWriter()
    names = ["1", "2", "stuck", "4", "5"]

    sender = signal_when_waiting(signal.SIGTERM, task, writer, 2)
    try:
        with pytest.raises(Interrupted) as info:
            with sigterm_as_interrupt():
                run([Item(n, n) for n in names], task, writer, batch_size=1, workers=1)
    finally:
        task.release.set()
        sender.join(30)
    assert info.value.exit_code == 143
    assert writer.records == [
        {"path": "1", "value": 2, "error": None},
        {"path": "2", "value": 4, "error": None},
    ]  # the finished records, and nothing for the image that was waited on


@pytest.mark.parametrize("interrupt", [Interrupted(signal.SIGTERM), KeyboardInterrupt()])
def test_an_interrupt_raised_in_prepare_ends_the_run(interrupt):
    """An interrupt is never an image's error record, wherever it comes from."""

    class Task(BlockingTask):
        def prepare(self, item):
            if item.name == "3":
                raise interrupt
            return int(item.name)

    writer = ListWriter()
    with pytest.raises(type(interrupt)):
        run([Item(str(i), str(i)) for i in range(6)], Task(), writer, batch_size=1, workers=1)
    assert [r["path"] for r in writer.records] == ["0", "1", "2"]
    assert all(r["error"] is None for r in writer.records)


def test_interrupted_is_no_exception():
    """So no `except Exception` anywhere (a loader, a library) can swallow SIGTERM."""
    assert not isinstance(Interrupted(signal.SIGTERM), Exception)
    assert isinstance(Interrupted(signal.SIGTERM), BaseException)


# -- case 8 + 9 in a real process: a decode stuck in a read ---------------------------
# The real CLI, with one change: the decode of a file named "*stuck*" blocks in a read
# of a pipe nobody writes to (as a read on a dead network file system does).
STUCK_HARNESS = textwrap.dedent(
    """
    import os, sys
    import blip2cli.images as images

    real = images.open_image
    read_end, write_end = os.pipe()  # write_end stays open and silent: the read never returns

    def open_image(source, **kw):
        if isinstance(source, str) and "stuck" in os.path.basename(source):
            os.read(read_end, 1)
        return real(source, **kw)

    images.open_image = open_image
    from blip2cli.cli import main

    sys.argv = ["blip2", *sys.argv[1:]]
    main()
    """
)


def same_package_env() -> dict:
    """The child imports the blip2cli this test imported (not another install of it)."""
    import blip2cli

    root = str(Path(blip2cli.__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_while_a_decode_is_stuck_exits_at_once(tiny_opt, example_images, tmp_path, sig, code):
    folder = tmp_path / "photos"
    folder.mkdir()
    for name, src in zip(["a.png", "b.png", "c-stuck.png", "d.png"], example_images):
        shutil.copy(src, folder / name)
    harness = tmp_path / "harness.py"
    harness.write_text(STUCK_HARNESS)
    out = tmp_path / "out.jsonl"
    proc = subprocess.Popen(
        [sys.executable, str(harness), "caption", str(folder), "--model", str(tiny_opt), "-o", str(out),
         "-b", "1", "-j", "1", *FAST],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=same_package_env(),
    )
    try:
        deadline = time.monotonic() + 240
        while not (out.exists() and out.read_bytes().count(b"\n") >= 2):
            if proc.poll() is not None:
                pytest.fail(f"ended before the stuck image: {proc.stderr.read().decode()}")
            if time.monotonic() > deadline:
                pytest.fail("the first two images were never captioned")
            time.sleep(0.05)
        time.sleep(0.5)  # let the main thread reach the wait for c-stuck.png
        proc.send_signal(sig)
        try:
            _, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail("the process lives on after the signal (a decode thread holds it)")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    err = err.decode()
    assert proc.returncode == code, err
    assert "interrupted" in err
    records = jsonl(out.read_text())
    assert [os.path.basename(r["path"]) for r in records] == ["a.png", "b.png"]
    assert all(r["error"] is None and r["caption"] for r in records)  # no false error record
    assert "stuck" not in err  # no image was blamed for the interrupt


# -- case 9: named pipes and devices ------------------------------------------------
def test_fifo_and_device_are_refused_without_being_opened(tmp_path, monkeypatch):
    fifo = tmp_path / "x.jpg"
    os.mkfifo(fifo)
    with fifo_watch(fifo) as seen:
        with pytest.raises(ImageError, match="named pipe") as info:
            open_image(fifo)
        with pytest.raises(ImageError, match="named pipe"):
            safe_decode.read_image_file(fifo)
        with pytest.raises(ImageError, match="named pipe"):
            open_image(fifo, draft_size=(224, 224))
    assert not seen["opened"]
    assert "stdin" in str(info.value)  # says what to do instead
    if os.path.exists("/dev/zero"):
        dev = tmp_path / "zero.jpg"
        dev.symlink_to("/dev/zero")  # endless: reading it whole would never finish
        with pytest.raises(ImageError, match="character device"):
            open_image(dev)
        with pytest.raises(ImageError, match="character device"):
            safe_decode.read_image_file(dev)


def test_a_file_swapped_for_a_pipe_after_the_stat_does_not_block(tmp_path, monkeypatch, example_images):
    """The stat said "regular file", then the path became a FIFO: the open must not wait
    for a writer (O_NONBLOCK), and the opened descriptor is checked again (fstat)."""
    fifo = tmp_path / "race.jpg"
    os.mkfifo(fifo)
    real_stat = os.stat
    regular = real_stat(example_images[0])

    def racy_stat(path, *args, **kwargs):
        return regular if os.fspath(path) == str(fifo) else real_stat(path, *args, **kwargs)

    monkeypatch.setattr(safe_decode.os, "stat", racy_stat)
    outcome = {}

    def decode():
        try:
            open_image(fifo)
        except BaseException as exc:  # noqa: BLE001 - looked at below
            outcome["error"] = exc

    thread = threading.Thread(target=decode, daemon=True)
    thread.start()
    thread.join(20)  # a hang guard, not a measurement: a non-blocking open returns at once
    blocked = thread.is_alive()
    if blocked:  # free it: open the write end, which ends the reader's open
        os.close(os.open(fifo, os.O_WRONLY))
        thread.join(20)
    assert not blocked, "the open of a FIFO waited for a writer"
    assert isinstance(outcome.get("error"), ImageError) and "named pipe" in str(outcome["error"])


def test_folder_with_a_fifo_named_jpg_completes(tiny_opt, example_images, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    shutil.copy(example_images[0], folder / "a.png")
    shutil.copy(example_images[3], folder / "b.jpg")
    os.mkfifo(folder / "pipe.jpg")
    shutil.copy(example_images[1], folder / "z.png")
    with fifo_watch(folder / "pipe.jpg") as seen:
        res = cli("caption", folder, "--model", tiny_opt, "-f", "jsonl", "-b", "2", *FAST)
    assert not seen["opened"], "the FIFO was opened (without the watchdog the run would hang)"
    assert res.exit_code == 1, res.output
    records = {os.path.basename(r["path"]): r for r in jsonl(res.stdout)}
    assert list(records) == ["a.png", "b.jpg", "pipe.jpg", "z.png"]
    assert "named pipe" in records["pipe.jpg"]["error"]
    assert all(records[n]["error"] is None and records[n]["caption"] for n in ("a.png", "b.jpg", "z.png"))


def test_decode_workers_are_daemon_threads():
    """A decode stuck in a read must not keep the interpreter alive once the run is over."""
    daemon = {}

    class Task(BlockingTask):
        def prepare(self, item):
            daemon[item.name] = threading.current_thread().daemon
            return super().prepare(item)

    task = Task()
    writer = ListWriter()
    sender = signal_when_waiting(signal.SIGINT, task, writer, 1)
    try:
        with pytest.raises(KeyboardInterrupt):
            run([Item(n, n) for n in ["1", "stuck", "3"]], task, writer, batch_size=1, workers=2)
        # the run is over, the stuck decode still waits: its thread may not hold the exit
        alive = [t for t in threading.enumerate() if t.name.startswith("blip2-decode") and t.is_alive()]
        assert alive and all(t.daemon for t in alive)
    finally:
        task.release.set()
        sender.join(30)
    assert daemon and all(daemon.values())


# -- case 10: bounded memory ------------------------------------------------------------
@contextmanager
def traced_peak():
    """The peak of memory allocated through Python (bytes objects, numpy arrays) inside."""
    peak = {}
    tracemalloc.start()
    try:
        yield peak
    finally:
        peak["bytes"] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()


def sparse(path: Path, head: bytes, size: int = 1 << 30) -> Path:
    with open(path, "wb") as f:
        f.write(head)
        f.truncate(size)  # a hole: no disk used, reads as zeros
    return path


def test_store_mode_never_reads_a_gigabyte_non_image(tiny_itm, example_images, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    shutil.copy(example_images[0], folder / "a.png")
    sparse(folder / "big.jpg", b"")
    store = tmp_path / "v.npy"
    with traced_peak() as peak:
        res = cli("embed", folder, "-m", tiny_itm, "-o", store)
    assert res.exit_code == 1, res.output
    assert "big.jpg" in res.stderr and "not an image file" in res.stderr
    assert peak["bytes"] < 200e6, f"{peak['bytes'] / 1e6:.0f} MB allocated: the file was read whole"


def test_read_image_file_refuses_from_the_header(tmp_path, example_images):
    """The header is enough: a huge image claimed by a PNG, a JPEG followed by a gigabyte."""
    png = huge_bilevel_png()
    claim = sparse(tmp_path / "claim.png", png)  # the real PNG, then a gigabyte of zeros
    jpeg = sparse(tmp_path / "long.jpg", example_images[3].read_bytes())
    with traced_peak() as peak:
        with pytest.raises(ImageError, match=r"13000x13000.*too large|too large.*13000x13000"):
            safe_decode.read_image_file(claim)
        with pytest.raises(ImageError, match="file too large"):
            safe_decode.read_image_file(jpeg)
    assert peak["bytes"] < 50e6
    data, st = safe_decode.read_image_file(example_images[3])
    assert data == example_images[3].read_bytes() and st.st_size == len(data)


def test_huge_png_header_is_refused_before_decoding(tmp_path, monkeypatch):
    path = tmp_path / "huge.png"
    path.write_bytes(huge_bilevel_png())
    assert path.stat().st_size < 100_000
    from PIL import ImageFile

    loads = []
    real_load = ImageFile.ImageFile.load

    def counting_load(self):
        loads.append(self.size)
        return real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", counting_load)
    for source in (path, path.read_bytes()):
        with pytest.raises(ImageError) as info:
            open_image(source)
        message = str(info.value)
        assert "too large" in message and "13000x13000" in message and "500 MB" in message
    assert loads == []  # refused from the header: no pixel decoded


def test_decode_budget_is_after_the_draft(tmp_path, monkeypatch):
    """A big JPEG that the draft decodes small is not refused; without the draft it is."""
    from PIL import Image

    path = tmp_path / "big.jpg"
    Image.new("RGB", (4000, 3000), (10, 120, 200)).save(path, quality=50)
    monkeypatch.setattr(safe_decode, "MAX_DECODE_BYTES", 4000 * 3000 * 4 - 1)  # just under the full decode
    with pytest.raises(ImageError, match="too large to decode"):
        open_image(path)
    assert open_image(path, draft_size=(224, 224)).size[0] < 4000


def test_image_bytes_on_stdin_are_read_up_to_the_budget(monkeypatch, example_images):
    import io

    data = example_images[3].read_bytes()
    monkeypatch.setattr(safe_decode, "MAX_DECODE_BYTES", len(data) - 1)
    [item] = list(InputResolver(stdin=io.BytesIO(data)).resolve(["-"]))
    assert item.error and "too large" in item.error
    monkeypatch.setattr(safe_decode, "MAX_DECODE_BYTES", len(data))
    [item] = list(InputResolver(stdin=io.BytesIO(data)).resolve(["-"]))
    assert item.error is None and item.source == data
