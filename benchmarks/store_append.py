"""Appending to the default vector store costs O(new rows) (issue 18, "One store").

    python benchmarks/store_append.py [--rows 16000] [--append 50] [--dims 32x256] [--dtype float16]
                                      [--repeats 5] [--dir /tmp] [--out benchmarks/results/store_append]

The target: appending ``--append`` rows to a ``--rows``-row store (what ``blip2 embed
photos/ -o vectors.safetensors`` keeps, no layout option) writes, and costs, at most 2x
the same rows into an empty store, each net of a run that adds nothing.

No model runs: synthetic unit vectors go through the store API the command uses
(``StoreSink`` -> ``StoreUpdate.add`` -> ``commit``). Every measurement is a fresh
process (``common.run_stage``) working on a fresh hard-linked copy of a pristine store
(segments are immutable and the manifest is replaced by rename, so a linked copy is a
true copy for a writer). Per run: wall time of open + add + commit + close, and the
bytes written as ``/proc/self/io`` counts them (``wchar``: bytes handed to write();
``write_bytes``: bytes sent to storage, when the kernel accounts them) and as new file
sizes in the store folder. Medians over ``--repeats`` runs.

The defaults are real ITC rows (32 x 256 float16: 16 KB a row, 16,000 rows = 262 MB);
``--dims 32x768 --dtype float32`` gives the issue's 2 GB store (96 KB a row).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import common  # noqa: E402 (benchmarks/common.py)


def _meta(dims, dtype):
    from blip2cli.storefiles import StoreMeta

    return StoreMeta(model="synthetic", features="itc", pool="none" if len(dims) == 2 else "mean", dims=dims,
                     normalized=True, dtype=dtype)


def _io() -> dict:
    out = {}
    with open("/proc/self/io") as f:
        for line in f:
            name, value = line.split(":")
            out[name] = int(value)
    return out


def _rows(start: int, count: int, dims, dtype):
    """``count`` unit rows (a fixed pool, mixed per row so rows differ), as the store's dtype."""
    import numpy as np

    rng = np.random.default_rng(start)
    pool = np.random.default_rng(0).standard_normal((64, *dims), dtype=np.float32)
    for i in range(start, start + count):
        v = pool[i % 64] + 0.05 * pool[int(rng.integers(0, 64))]
        yield i, (v / np.linalg.norm(v, axis=-1, keepdims=True)).astype(dtype)


def _update(path: Path, start: int, count: int, dims, dtype) -> dict:
    from blip2cli.embedstore import StoreSink
    from blip2cli.store import StoreUpdate

    meta = _meta(dims, dtype)
    before_files = {p.name: p.stat().st_size for p in path.iterdir()} if path.is_dir() else {}
    io0 = _io()
    t0 = time.perf_counter()
    with StoreUpdate(path, meta) as update:
        sink = StoreSink(update)
        for i, v in _rows(start, count, dims, dtype):
            name = f"/photos/{i // 1000:04d}/{i:07d}.jpg"
            sink.write({"path": name, "source": name, "vector": v,
                        "ident": (100_000 + i, 1_700_000_000_000_000_000 + i, f"{i:064x}"), "error": None})
        stats = update.commit()
    seconds = time.perf_counter() - t0
    io1 = _io()
    new_bytes = sum(p.stat().st_size for p in path.iterdir()
                    if before_files.get(p.name) != p.stat().st_size or p.name not in before_files)
    return {"seconds": seconds, "wchar": io1["wchar"] - io0["wchar"],
            "write_bytes": io1["write_bytes"] - io0["write_bytes"], "new_file_bytes": new_bytes,
            "rows": stats.rows, "compacted": stats.compacted}


def stage_build(path: Path, rows: int, dims, dtype) -> dict:
    """The pristine stores: ``rows`` rows, and an empty one (a commit of nothing)."""
    t0 = time.perf_counter()
    out = _update(path / "big", 0, rows, dims, dtype)
    _update(path / "empty", 0, 0, dims, dtype)
    return {"rows": out["rows"], "seconds": round(time.perf_counter() - t0, 1),
            "store_mb": round(sum(p.stat().st_size for p in (path / "big").iterdir()) / 2**20, 1)}


def stage_run(path: Path, start: int, count: int, dims, dtype) -> dict:
    # Imported before the clock starts (the store imports them lazily, inside the timed update).
    import pyarrow.parquet  # noqa: F401

    from blip2cli import store  # noqa: F401

    return _update(path, start, count, dims, dtype)


def _copy(src: Path, dst: Path) -> None:
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir()
    for p in src.iterdir():
        os.link(p, dst / p.name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=16000)
    ap.add_argument("--append", type=int, default=50)
    ap.add_argument("--dims", default="32x256")
    ap.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dir", default="/tmp")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "store_append"))
    ap.add_argument("--stage", help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    ap.add_argument("--start", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    dims = tuple(int(x) for x in args.dims.split("x"))
    if args.stage:
        fn = {"build": lambda: stage_build(Path(args.path), args.rows, dims, args.dtype),
              "run": lambda: stage_run(Path(args.path), args.start, args.count, dims, args.dtype)}[args.stage]
        print(json.dumps(fn()))
        return

    load_before = os.getloadavg()
    work = Path(args.dir) / f"blip2-store-append-{os.getpid()}"
    work.mkdir(parents=True)
    common_args = ["--rows", str(args.rows), "--dims", args.dims, "--dtype", args.dtype]
    script = str(Path(__file__).resolve())
    try:
        built = common.run_stage(script, ["--stage", "build", "--path", str(work), *common_args])
        runs: dict[str, list[dict]] = {k: [] for k in ("append_to_store", "noop_on_store", "append_to_empty",
                                                       "noop_on_empty")}
        for r in range(args.repeats):
            for name, src, count in (("append_to_store", "big", args.append), ("noop_on_store", "big", 0),
                                     ("append_to_empty", "empty", args.append), ("noop_on_empty", "empty", 0)):
                copy = work / "copy"
                _copy(work / src, copy)
                start = args.rows + 1000 * r if count else 0
                runs[name].append(common.run_stage(script, ["--stage", "run", "--path", str(copy), "--start",
                                                            str(start), "--count", str(count), *common_args]))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    load_after = os.getloadavg()

    def med(name, key):
        return statistics.median(run[key] for run in runs[name])

    result = {"rows": args.rows, "append": args.append, "dims": list(dims), "dtype": args.dtype,
              "row_kb": round(built["store_mb"] * 1024 / max(1, args.rows), 1), "store_mb": built["store_mb"],
              "repeats": args.repeats, "load_before": [round(x, 2) for x in load_before],
              "load_after": [round(x, 2) for x in load_after], "python": platform.python_version(),
              "runs": runs}
    for key in ("seconds", "wchar", "write_bytes", "new_file_bytes"):
        store_net = med("append_to_store", key) - med("noop_on_store", key)
        empty_net = med("append_to_empty", key) - med("noop_on_empty", key)
        result[key] = {"store_net": store_net, "empty_net": empty_net,
                       "ratio": round(store_net / empty_net, 2) if empty_net else None}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    mb = 2**20
    lines = [
        "# Appending to the default vector store (issue 18)",
        "",
        f"`python benchmarks/store_append.py --rows {args.rows} --append {args.append} --dims {args.dims} "
        f"--dtype {args.dtype} --repeats {args.repeats}`",
        "",
        f"Synthetic {args.dims} {args.dtype} rows ({result['row_kb']} KB a row) through the store API "
        f"`blip2 embed -o vectors.safetensors` uses (no model). A {args.rows:,}-row store is "
        f"{built['store_mb']:,} MB. Each figure: the median of {args.repeats} runs, each in a fresh process "
        "on a fresh hard-linked copy of the store, net of a run that adds nothing.",
        "",
        f"| {args.append} rows into | wall (s) | wchar (MB) | write_bytes (MB) | new file bytes (MB) |",
        "|---|---:|---:|---:|---:|",
        f"| a {args.rows:,}-row store | {result['seconds']['store_net']:.3f} | {result['wchar']['store_net'] / mb:.2f} | "
        f"{result['write_bytes']['store_net'] / mb:.2f} | {result['new_file_bytes']['store_net'] / mb:.2f} |",
        f"| an empty store | {result['seconds']['empty_net']:.3f} | {result['wchar']['empty_net'] / mb:.2f} | "
        f"{result['write_bytes']['empty_net'] / mb:.2f} | {result['new_file_bytes']['empty_net'] / mb:.2f} |",
        f"| ratio (target <= 2) | {result['seconds']['ratio']} | {result['wchar']['ratio']} | "
        f"{result['write_bytes']['ratio']} | {result['new_file_bytes']['ratio']} |",
        "",
        f"Load average before {result['load_before']}, after {result['load_after']} (2 cores shared with "
        "other work: wall times are noisy; the bytes are not).",
        "",
    ]
    out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
