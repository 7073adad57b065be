"""Helpers the benchmark scripts share (run as `python benchmarks/NAME.py`, so this folder
is on `sys.path`)."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time


def best_of(fn, repeats: int) -> float:
    """The fastest of ``repeats`` timed calls of ``fn``, in seconds."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_stage(script: str, argv: list[str]) -> dict:
    """Run one stage of ``script`` in a fresh process (its own peak memory) and return the
    JSON object it prints last."""
    proc = subprocess.run([sys.executable, script, *argv], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"stage {argv} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
