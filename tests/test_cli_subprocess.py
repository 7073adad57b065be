"""A few real `blip2` processes: pipes, signals. Each pays the torch import, so few."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def blip2_cmd() -> list[str]:
    exe = Path(sys.executable).with_name("blip2")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "blip2cli"]


def test_find_pipe_into_blip2_jsonl(tiny_opt, example_images, tmp_path):
    listing = "".join(f"{p}\n" for p in example_images)
    proc = subprocess.run(
        [*blip2_cmd(), "caption", "-", "--model", str(tiny_opt), "--format", "jsonl", "--max-new-tokens", "6"],
        input=listing.encode(), capture_output=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    records = [json.loads(l) for l in proc.stdout.decode().splitlines()]
    assert [r["path"] for r in records] == [str(p) for p in example_images]
    assert all(r["caption"] and r["error"] is None for r in records)
    # No chatter and no progress bar off a terminal: the one closing summary line only.
    err = proc.stderr.decode()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"blip2: captioned {len(example_images)} images in ") and "\r" not in err, err


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_stops_with_whole_records(tiny_opt, example_images, tmp_path, sig, code):
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(400):  # hard links: distinct paths, no disk cost
        os.link(example_images[i % len(example_images)], folder / f"{i:04d}{example_images[i % 4].suffix}")
    out = tmp_path / "out.jsonl"
    proc = subprocess.Popen(
        [*blip2_cmd(), "caption", str(folder), "--model", str(tiny_opt), "-o", str(out),
         "-b", "1", "-j", "1", "--max-new-tokens", "20", "--min-new-tokens", "20", "--num-beams", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if out.exists() and out.read_bytes().count(b"\n") >= 2:
            break
        if proc.poll() is not None:
            pytest.fail(f"finished before the signal: {proc.stderr.read().decode()}")
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err.decode()
    data = out.read_bytes()
    assert data.endswith(b"\n")
    records = [json.loads(l) for l in data.decode().splitlines()]
    assert 2 <= len(records) < 400
    assert [r["path"] for r in records] == [str(folder / f"{i:04d}{example_images[i % 4].suffix}") for i in range(len(records))]
    assert "interrupted" in err.decode()


def test_closed_pipe_stops_quietly(tiny_opt, example_images):
    """`blip2 caption ... | head -1`: no traceback when the reader goes away."""
    proc = subprocess.run(
        ["bash", "-c", " ".join([*blip2_cmd(), "caption", *map(str, example_images * 50), "--model",
                                 str(tiny_opt), "-b", "1", "--max-new-tokens", "4", "--num-beams", "1",
                                 "| head -n 1; exit ${PIPESTATUS[0]}"])],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.stdout.count("\n") == 1
    assert "Traceback" not in proc.stderr and "Error" not in proc.stderr, proc.stderr
    assert proc.returncode == 141


def test_progress_bar_only_on_a_terminal(tiny_opt, example_images):
    """stderr on a pseudo-terminal gets a progress bar; stdout stays pure data."""
    import pty

    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [*blip2_cmd(), "caption", *map(str, example_images), "--model", str(tiny_opt), "-f", "jsonl",
         "--max-new-tokens", "4"],
        stdout=subprocess.PIPE, stderr=slave, stdin=subprocess.DEVNULL,
    )
    os.close(slave)
    out, _ = proc.communicate(timeout=300)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    err = b"".join(chunks).decode(errors="replace")
    assert proc.returncode == 0
    assert [json.loads(l)["path"] for l in out.decode().splitlines()] == [str(p) for p in example_images]
    assert "img/s" in err and f"{len(example_images)}/{len(example_images)}" in err


def test_hub_id_loads_from_the_hugging_face_cache_offline(tiny_opt, example_images, tmp_path):
    """A hub id resolves through the HF cache (the real from_pretrained path), no network."""
    cache = tmp_path / "hub"
    snap = cache / "models--blip2-test--tiny-opt" / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(tiny_opt, snap)
    (cache / "models--blip2-test--tiny-opt" / "refs").mkdir()
    (cache / "models--blip2-test--tiny-opt" / "refs" / "main").write_text(snap.name)
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [*blip2_cmd(), "caption", str(example_images[0]), "--model", "blip2-test/tiny-opt", "-f", "jsonl",
         "--max-new-tokens", "4"],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert proc.returncode == 0, proc.stderr
    rec = json.loads(proc.stdout)
    assert rec["model"] == "blip2-test/tiny-opt" and rec["caption"]
    missing = subprocess.run(
        [*blip2_cmd(), "caption", str(example_images[0]), "--model", "blip2-test/not-here"],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert missing.returncode == 2 and "hf download blip2-test/not-here" in missing.stderr


def test_busy_daemon_threads_do_not_abort_the_exit():
    """Python 3.11-3.13 end a daemon thread waking in shutdown with pthread_exit, and
    one inside torch's C++ code aborts the process (SIGABRT after "interrupted: finished
    records were written"). `blip2` leaves with its own exit code instead."""
    script = (
        "import sys, threading, time, numpy as np, torch\n"
        "def work():\n"
        "    a = torch.from_numpy(np.ones((64, 64), dtype='float32'))\n"
        "    while True:\n"
        "        (a @ a).sum()\n"
        "for _ in range(2):\n"
        "    threading.Thread(target=work, daemon=True).start()\n"
        "time.sleep(0.3)\n"
        "sys.argv = ['blip2', 'caption', '--no-such-option']\n"
        "from blip2cli.cli import main\n"
        "main()\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert "terminate called" not in proc.stderr, proc.stderr
    assert proc.returncode == 2, proc.stderr
    assert "--no-such-option" in proc.stderr
