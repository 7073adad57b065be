"""One lock primitive (``guard.flock_open``) under every lock of blip2: the output file's
lock file and its file object, the sidecar folder, the vector store's writer lock. Each
caller keeps its own message; every "another process holds it" is a ``guard.Busy``."""

from __future__ import annotations

import os

import pytest

from blip2cli import guard, storefiles


def test_flock_open_raises_the_callers_message_while_another_holds_it(tmp_path):
    path = tmp_path / "x.lock"
    fd = guard.flock_open(path, "first")
    assert fd is not None
    try:
        with pytest.raises(guard.Busy) as caught:
            guard.flock_open(path, "someone else has it", hint="wait")
        assert caught.value.message == "someone else has it" and caught.value.hint == "wait"
        assert caught.value.exit_code == 2
    finally:
        os.close(fd)
    again = guard.flock_open(path, "free again")  # closing the fd released it
    assert again is not None
    os.close(again)


def test_flock_open_leaves_what_is_not_a_regular_file_alone(tmp_path):
    assert guard.flock_open(tmp_path, "x", flags=os.O_RDONLY, regular=True) is None


def test_flock_open_does_not_keep_a_lock_file_a_holder_removed(tmp_path, monkeypatch):
    """``stable``: the file locked is the one the name holds when the lock is taken."""
    path = tmp_path / "x.lock"
    real = os.open
    calls = []

    def open_then_lose_the_race(p, flags, mode=0o777):
        fd = real(p, flags, mode)
        calls.append(fd)
        if len(calls) == 1:  # the previous holder unlinks the name right after our open
            os.unlink(p)
        return fd

    monkeypatch.setattr(os, "open", open_then_lose_the_race)
    fd = guard.flock_open(path, "busy", stable=True)
    monkeypatch.undo()
    assert fd is not None and len(calls) == 2
    st = os.fstat(fd)
    assert (st.st_dev, st.st_ino) == guard.file_id(path)
    os.close(fd)


def test_every_lock_goes_through_the_one_primitive(tmp_path, monkeypatch):
    seen = []
    real = guard.flock_open

    def spy(path, message, **kw):
        seen.append(message)
        return real(path, message, **kw)

    monkeypatch.setattr(guard, "flock_open", spy)
    out = tmp_path / "out.jsonl"
    out.write_text("")
    with guard.FileLock(out):
        pass
    with guard.FolderLock(tmp_path):
        pass
    lock = storefiles.FileLock(tmp_path / ".pending", "store")
    lock.acquire()
    lock.release(remove=True)
    assert seen == [
        f"another blip2 run is writing the output file {str(out)!r}",
        f"another blip2 run is writing the output file {str(out)!r} (under another name)",
        f"another blip2 run is writing sidecars in {str(tmp_path)!r}",
        "another blip2 process is writing the vector store 'store'",
    ]


def test_the_store_lock_is_a_store_error_and_a_busy(tmp_path):
    first = storefiles.FileLock(tmp_path / ".pending", str(tmp_path))
    first.acquire()
    try:
        with pytest.raises(storefiles.StoreError, match="another blip2 process is writing the vector store") as caught:
            storefiles.FileLock(tmp_path / ".pending", str(tmp_path)).acquire()
        assert isinstance(caught.value, guard.Busy)
        assert "wait for it to finish" in (caught.value.hint or "")
    finally:
        first.release(remove=True)
    assert not (tmp_path / ".pending").exists()
