"""Wall time of `blip2 --help` / `blip2 caption --help` / completion, against `import torch`.

    python benchmarks/startup.py [--runs 5] [--out benchmarks/results/startup.md]

The CLI must not import torch or transformers for help and completion; this
shows what that saves, measured in the same run on the same machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path


def timed(cmd: list[str], env: dict | None = None, runs: int = 5) -> float:
    samples = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False,
                       env={**os.environ, **(env or {})})
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/results/startup.md")
    args = ap.parse_args()
    blip2 = shutil.which("blip2") or str(Path(sys.executable).with_name("blip2"))
    rows = [
        ("blip2 --help", timed([blip2, "--help"], runs=args.runs)),
        ("blip2 caption --help", timed([blip2, "caption", "--help"], runs=args.runs)),
        ("completion (bash, `blip2 caption --d<TAB>`)", timed(
            [blip2], env={"_BLIP2_COMPLETE": "complete_bash", "COMP_WORDS": "blip2 caption --d", "COMP_CWORD": "2"},
            runs=args.runs)),
        ("python -c 'import torch, transformers' (what they would cost)", timed(
            [sys.executable, "-c", "import torch, transformers; transformers.Blip2ForConditionalGeneration"],
            runs=max(1, args.runs // 2))),
    ]
    lines = [
        "# Start-up time",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"{platform.system()} (no GPU needed). Median of {args.runs} runs, wall clock.",
        f"Command: `python benchmarks/startup.py --runs {args.runs}`",
        "",
        "| command | seconds |",
        "|---|---|",
        *[f"| {name} | {sec:.3f} |" for name, sec in rows],
        "",
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
