"""Scale-out: --shard, blip2 merge, and accelerate launch with several processes (CPU, gloo)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from blip2cli.cli import app
from blip2cli.parts import Shard, parse_shard

runner = CliRunner()
GEN = ["--max-new-tokens", "4", "--num-beams", "1"]
BIN = Path(sys.executable).parent


def cli(*args):
    return runner.invoke(app, [*map(str, args)])


def records(path: Path) -> list[dict]:
    return [json.loads(l) for l in path.read_text().splitlines()]


def essence(recs):
    return [(r["path"], r["caption"], r["error"]) for r in recs]


@pytest.fixture
def many(tmp_path, example_images):
    """24 distinct paths (hard links) in a folder, in a known sorted order."""
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(24):
        src = example_images[i % len(example_images)]
        os.link(src, folder / f"{i:03d}{src.suffix}")
    return folder


@pytest.fixture
def single_run(tiny_opt, many, tmp_path):
    out = tmp_path / "single"
    res = cli("caption", many, "--model", tiny_opt, "-o", f"{out}/", *GEN)
    assert res.exit_code == 0, res.output
    return records(out / "captions.jsonl")


def test_shard_bounds_cover_everything_once():
    for n in range(0, 40):
        for count in range(1, 9):
            seen = []
            for i in range(count):
                a, b = Shard(i, count).bounds(n)
                assert 0 <= b - a <= n // count + 1
                seen.extend(range(a, b))
            assert seen == list(range(n))  # contiguous, in order, nothing dropped
    with pytest.raises(Exception, match="numbered from 0"):
        parse_shard("3/3")
    with pytest.raises(Exception, match="expected I/N"):
        parse_shard("two")


def test_single_process_into_a_directory(single_run, many):
    assert [Path(r["path"]).name for r in single_run] == sorted(p.name for p in many.iterdir())
    assert all(r["caption"] and r["error"] is None for r in single_run)


def test_shards_then_merge_and_missing_inputs(tiny_opt, many, tmp_path, single_run):
    out = tmp_path / "sharded"
    for i in (0, 2):
        res = cli("caption", many, "--model", tiny_opt, "-o", out, "--shard", f"{i}/3", *GEN)
        assert res.exit_code == 0, res.output
        assert "blip2 merge" in res.stderr
    res = cli("merge", out)
    assert res.exit_code == 1 and "8 of 24 inputs have no record yet" in res.stderr
    assert not (out / "captions.jsonl").exists()  # nothing partial under the final name
    res = cli("caption", many, "--model", tiny_opt, "-o", out, "--shard", "1/3", *GEN)
    assert res.exit_code == 0
    res = cli("merge", out)
    assert res.exit_code == 0, res.output
    assert essence(records(out / "captions.jsonl")) == essence(single_run)


def test_directory_run_resumes_whatever_the_earlier_shape(tiny_opt, many, tmp_path, single_run, monkeypatch):
    out = tmp_path / "mixed"
    assert cli("caption", many, "--model", tiny_opt, "-o", out, "--shard", "1/4", *GEN).exit_code == 0
    # a torn last line in that part: its input is redone
    part = out / ".parts" / "part-00001-of-00004.jsonl"
    part.write_bytes(part.read_bytes()[:-25])
    res = cli("caption", many, "--model", tiny_opt, "-o", f"{out}/", *GEN)  # now one process, all inputs
    assert res.exit_code == 0, res.output
    assert "inputs already done" in res.stderr
    assert essence(records(out / "captions.jsonl")) == essence(single_run)
    # everything done: the model is not even loaded
    monkeypatch.setattr("blip2cli.loader.load", lambda *a, **k: pytest.fail("loaded the model"))
    res = cli("caption", many, "--model", tiny_opt, "-o", f"{out}/", *GEN)
    assert res.exit_code == 0 and essence(records(out / "captions.jsonl")) == essence(single_run)


def test_directory_refuses_other_inputs_settings_and_stdin(tiny_opt, many, tmp_path, example_images):
    out = tmp_path / "d"
    assert cli("caption", many, "--model", tiny_opt, "-o", f"{out}/", *GEN).exit_code == 0
    res = cli("caption", example_images[0], "--model", tiny_opt, "-o", f"{out}/", *GEN)
    assert res.exit_code == 2 and "other inputs" in res.stderr
    res = cli("caption", many, "--model", tiny_opt, "-o", f"{out}/", "--max-new-tokens", "6", "--num-beams", "1")
    assert res.exit_code == 2 and "other settings" in res.stderr
    res = runner.invoke(app, ["caption", "-", "--model", str(tiny_opt), "-o", f"{out}/"], input=str(example_images[0]))
    assert res.exit_code == 2 and "stdin cannot be split" in res.stderr


# -- real processes ----------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate(*args, **popen):
    cmd = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--mixed_precision", "no", "--dynamo_backend", "no",
           *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, **popen)


def blip2_args(tiny_opt, many, out, *extra):
    return ["-m", "blip2cli", "caption", many, "--model", tiny_opt, "-o", f"{out}/", *GEN, *extra]



@pytest.mark.slow
def test_two_processes_equal_one(tiny_opt, many, tmp_path, single_run):
    out = tmp_path / "two"
    proc = accelerate("--num_processes", "2", "--num_machines", "1", "--main_process_port", free_port(),
                      *blip2_args(tiny_opt, many, out))
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()[-3000:]
    parts = sorted(p.name for p in (out / ".parts").glob("part-*"))
    assert parts == ["part-00000-of-00002.jsonl", "part-00001-of-00002.jsonl"]
    assert essence(records(out / "captions.jsonl")) == essence(single_run)


@pytest.mark.slow
def test_kill_9_one_process_then_rerun_with_2_and_with_1(tiny_opt, example_images, tmp_path):
    import psutil

    folder = tmp_path / "lots"
    folder.mkdir()
    for i in range(160):
        src = example_images[i % len(example_images)]
        os.link(src, folder / f"{i:03d}{src.suffix}")
    reference = tmp_path / "reference"
    assert cli("caption", folder, "--model", tiny_opt, "-o", f"{reference}/", *GEN).exit_code == 0
    expected = essence(records(reference / "captions.jsonl"))

    out = tmp_path / "killed"
    proc = accelerate("--num_processes", "2", "--num_machines", "1", "--main_process_port", free_port(),
                      *blip2_args(tiny_opt, folder, out, "-b", "1", "-j", "1"))
    part1 = out / ".parts" / "part-00001-of-00002.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if part1.exists() and part1.read_bytes().count(b"\n") >= 2:
            break
        time.sleep(0.01)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    workers = [c for c in psutil.Process(proc.pid).children(recursive=True) if "blip2cli" in " ".join(c.cmdline())]
    assert len(workers) == 2
    victim = next(w for w in workers if w.environ().get("RANK") == "1")
    os.kill(victim.pid, signal.SIGKILL)
    proc.communicate(timeout=300)
    assert proc.returncode != 0  # the job failed as a whole
    assert not (out / "captions.jsonl").exists()
    done_before = sum(p.read_bytes().count(b"\n") for p in (out / ".parts").glob("part-*"))
    assert 2 <= done_before < 160
    copy = tmp_path / "killed-copy"
    shutil.copytree(out, copy)

    again = accelerate("--num_processes", "2", "--num_machines", "1", "--main_process_port", free_port(),
                       *blip2_args(tiny_opt, folder, out))
    _, err = again.communicate(timeout=300)
    assert again.returncode == 0, err.decode()[-3000:]
    assert "inputs already done" in err.decode()
    assert essence(records(out / "captions.jsonl")) == expected  # complete, exactly once, input order

    res = cli("caption", folder, "--model", tiny_opt, "-o", f"{copy}/", *GEN)  # one process this time
    assert res.exit_code == 0, res.output
    assert essence(records(copy / "captions.jsonl")) == expected


@pytest.mark.slow
def test_two_machines_times_two_processes_on_localhost(tiny_opt, many, tmp_path, single_run):
    out = tmp_path / "cluster"
    port = free_port()
    common = ["--num_processes", "4", "--num_machines", "2", "--main_process_ip", "127.0.0.1",
              "--main_process_port", port]
    machines = [accelerate(*common, "--machine_rank", rank, *blip2_args(tiny_opt, many, out)) for rank in (0, 1)]
    for m in machines:
        _, err = m.communicate(timeout=400)
        assert m.returncode == 0, err.decode()[-3000:]
    assert len(list((out / ".parts").glob("part-*-of-00004.jsonl"))) == 4
    assert essence(records(out / "captions.jsonl")) == essence(single_run)


@pytest.mark.slow
def test_three_shards_in_parallel_then_merge(tiny_opt, many, tmp_path, single_run):
    out = tmp_path / "parallel"
    exe = BIN / "blip2"
    procs = [
        subprocess.Popen([str(exe), "caption", str(many), "--model", str(tiny_opt), "-o", str(out), "--shard",
                          f"{i}/3", *GEN], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
        for i in range(3)
    ]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()[-2000:]
    merged = subprocess.run([str(exe), "merge", str(out)], capture_output=True, text=True, timeout=120)
    assert merged.returncode == 0, merged.stderr
    assert essence(records(out / "captions.jsonl")) == essence(single_run)



def test_an_empty_shard_slice_says_which(tiny_opt, example_images, tmp_path):
    """Issue 19: one input in two slices: slice 0/2 is empty, and says so (exit 0)."""
    folder = tmp_path / "one"
    folder.mkdir()
    shutil.copy(example_images[0], folder / "a.png")
    res = cli("caption", folder, "--model", tiny_opt, "-o", tmp_path / "out", "--shard", "0/2", *GEN)
    assert res.exit_code == 0, res.output
    assert "--shard 0/2 holds no inputs" in res.stderr
