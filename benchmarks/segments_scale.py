"""Segmented vector store and --ann at scale, on synthetic vectors (issue 15).

    python benchmarks/segments_scale.py [--rows 1000000] [--append 1000] [--queries 20] [--dir /tmp]
                                        [--out benchmarks/results/segments_scale.md]

No model runs: random unit vectors go through ``StoreSink`` -> ``StoreUpdate.add`` ->
``commit`` (``blip2 embed -o DIR.safetensors``) and ``store.top_k`` /
``ann.search`` (``blip2 search --index DIR [--ann]``). Stages, each in a fresh
process (its own ``ru_maxrss``):

* ``write``: ``--rows`` pooled 256-d float32 rows into a new segmented store;
* ``append``: ``--append`` rows to that store, and the same rows to an empty store
  (the target: within 2x);
* ``prune``: ``--append`` rows deleted (``--prune``: row numbers in the manifest);
* ``search``: open time, exact query time, the --ann index build, ANN query time and
  recall@10 against exact search over ``--queries`` queries.
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
DIMS = (256,)


def _meta():
    from blip2cli.store import StoreMeta

    return StoreMeta(model="synthetic", features="itc", pool="mean", dims=DIMS, normalized=True)


def _pool():
    import numpy as np

    v = np.random.default_rng(0).standard_normal((4096, *DIMS), dtype=np.float32)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _write(path: Path, start: int, count: int, pool, **kw) -> dict:
    import numpy as np

    from blip2cli.commands.embed import StoreSink
    from blip2cli.store import StoreUpdate

    rng = np.random.default_rng(start)
    t0 = time.perf_counter()
    with StoreUpdate(path, _meta(), **kw) as update:
        sink = StoreSink(update)
        for i in range(start, start + count):
            # a fresh mix per row so that the top 10 are not ties
            v = pool[i % 4096] + 0.05 * pool[int(rng.integers(0, 4096))]
            name = f"/photos/{i // 1000:04d}/{i:07d}.jpg"
            sink.write({"path": name, "source": name, "vector": v / np.linalg.norm(v),
                        "ident": (100_000 + i, 1_700_000_000_000_000_000 + i, f"{i:064x}"), "error": None})
        stats = update.commit()
    return {"rows_written": count, "rows_total": stats.rows, "seconds": round(time.perf_counter() - t0, 3),
            "compacted": stats.compacted}


def stage_write(path: Path, rows: int) -> dict:
    out = _write(path, 0, rows, _pool())
    out["store_mb"] = round(sum(p.stat().st_size for p in path.iterdir()) / 2**20, 1)
    out["peak_rss_mb"] = round(common.peak_rss_mb(), 1)
    return out


def stage_append(path: Path, rows: int, append: int, empty: Path) -> dict:
    pool = _pool()
    _write(empty.with_name("warm"), 0, 10, pool)  # imports (pyarrow) before the clocks
    small = _write(empty, rows, append, pool)
    big = _write(path, rows, append, pool)
    return {"to_empty": small, "to_store": big, "ratio": round(big["seconds"] / small["seconds"], 2),
            "peak_rss_mb": round(common.peak_rss_mb(), 1)}


def stage_prune(path: Path, rows: int, append: int) -> dict:
    from blip2cli.store import StoreUpdate

    t0 = time.perf_counter()
    with StoreUpdate(path, _meta()) as up:  # drop the appended rows by number, as --prune does for gone files
        for r in range(rows, rows + append):
            up._keep[r] = False
        stats = up.commit()
    return {"rows_deleted": append, "rows_total": stats.rows, "seconds": round(time.perf_counter() - t0, 3),
            "compacted": stats.compacted, "peak_rss_mb": round(common.peak_rss_mb(), 1)}


def stage_search(path: Path, queries: int, k: int = 10) -> dict:
    import numpy as np
    import torch  # noqa: F401 - as in blip2 search

    from blip2cli import ann
    from blip2cli.store import VectorStore, top_k

    t0 = time.perf_counter()
    store = VectorStore.open(path)
    t_open = time.perf_counter() - t0
    rng = np.random.default_rng(1)
    pool = _pool()
    qs = []
    for _ in range(queries):  # queries near the data, like a text query near its images
        v = pool[int(rng.integers(0, 4096))] + 0.5 * rng.standard_normal(DIMS[0]).astype(np.float32) / 16
        qs.append((v / np.linalg.norm(v)).astype(np.float32))
    top_k(store, qs[0], k, mode="text")  # warm the page cache
    exact_t, exact = [], []
    for q in qs:
        t0 = time.perf_counter()
        exact.append([h.row for h in top_k(store, q, k, mode="text")])
        exact_t.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    index = ann.load_or_build(store)
    t_build = time.perf_counter() - t0
    t0 = time.perf_counter()
    index = ann.load_or_build(store)
    t_load = time.perf_counter() - t0
    ann_t, recalls = [], []
    for q, want in zip(qs, exact):
        t0 = time.perf_counter()
        got = [h.row for h in ann.search(store, index, q, k)]
        ann_t.append(time.perf_counter() - t0)
        recalls.append(len(set(got) & set(want)) / k)
    paths_t0 = time.perf_counter()
    _ = [store.entries[r].path for r in exact[0]]
    return {
        "rows": store.rows, "segments": len(store.segments), "open_seconds": round(t_open, 3),
        "exact_query_seconds_median": round(statistics.median(exact_t), 3),
        "first_paths_seconds": round(time.perf_counter() - paths_t0, 3),
        "ann_build_seconds": round(t_build, 1), "ann_load_seconds": round(t_load, 3),
        "ann_nprobe": ann.NPROBE, "ann_refine": ann.REFINE,
        "ann_query_seconds_median": round(statistics.median(ann_t), 4),
        "recall_at_10": round(sum(recalls) / len(recalls), 3), "queries": queries,
        "peak_rss_mb": round(common.peak_rss_mb(), 1),
    }


def run_stage(argv: list[str]) -> dict:
    return common.run_stage(__file__, argv)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--append", type=int, default=1000)
    ap.add_argument("--queries", type=int, default=20)
    ap.add_argument("--dir", default="/tmp")
    ap.add_argument("--out", default="benchmarks/results/segments_scale.md")
    ap.add_argument("--stage", help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    ap.add_argument("--empty", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.stage:
        path = Path(args.path)
        out = {"write": lambda: stage_write(path, args.rows),
               "append": lambda: stage_append(path, args.rows, args.append, Path(args.empty)),
               "prune": lambda: stage_prune(path, args.rows, args.append),
               "search": lambda: stage_search(path, args.queries)}[args.stage]()
        print(json.dumps(out))
        return
    import tempfile

    import numpy as np

    with tempfile.TemporaryDirectory(dir=args.dir, prefix="blip2-seg-") as tmp:
        path, empty = Path(tmp) / "store", Path(tmp) / "empty"
        common = ["--path", str(path), "--rows", str(args.rows), "--append", str(args.append),
                  "--queries", str(args.queries)]
        results = {"write": run_stage(["--stage", "write", *common])}
        results["append"] = run_stage(["--stage", "append", *common, "--empty", str(empty)])
        results["prune"] = run_stage(["--stage", "prune", *common])
        results["search"] = run_stage(["--stage", "search", *common])
        shutil.rmtree(path, ignore_errors=True)
    import blip2cli

    results["machine"] = {
        "platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
        "numpy": np.__version__, "blip2": blip2cli.__version__, "date": time.strftime("%Y-%m-%d"),
        "command": f"python benchmarks/segments_scale.py --rows {args.rows} --append {args.append} "
                   f"--queries {args.queries}",
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    out.write_text(render(results), encoding="utf-8")
    print(out.read_text())


def render(r: dict) -> str:
    m, w, a, p, s = r["machine"], r["write"], r["append"], r["prune"], r["search"]
    return "\n".join([
        "# Segmented vector store and --ann at scale (synthetic vectors)",
        "",
        f"Machine: {m['platform']}, {m['cpus']} CPUs (shared with other jobs), Python {m['python']}, "
        f"numpy {m['numpy']}, blip2 {m['blip2']}. Date: {m['date']}. Command: `{m['command']}`. "
        "Pooled 256-d float32 rows (`--pool mean`) through the code `blip2 embed -o vectors.safetensors` "
        "and `blip2 search --index DIR [--ann]` use after the model.",
        "",
        "| step | rows | time | peak RSS |",
        "|---|---|---|---|",
        f"| write a new store | {w['rows_written']:,} | {w['seconds']} s | {w['peak_rss_mb']:,} MB |",
        f"| append to an empty store | {a['to_empty']['rows_written']:,} | {a['to_empty']['seconds']} s | |",
        f"| append to the {w['rows_total']:,}-row store | {a['to_store']['rows_written']:,} "
        f"(-> {a['to_store']['rows_total']:,}) | {a['to_store']['seconds']} s (**{a['ratio']}x** the empty "
        f"store; compaction copied {a['to_store']['compacted']} rows) | {a['peak_rss_mb']:,} MB |",
        f"| delete rows (`--prune`) | {p['rows_deleted']:,} (-> {p['rows_total']:,}) | {p['seconds']} s "
        f"(compaction copied {p['compacted']} rows) | {p['peak_rss_mb']:,} MB |",
        f"| open for search | {s['rows']:,} in {s['segments']} segments | **{s['open_seconds']} s** | |",
        f"| exact search, per query (median, top 10) | {s['rows']:,} | {s['exact_query_seconds_median']} s | |",
        f"| paths of the top 10 (first Parquet read) | 10 | {s['first_paths_seconds']} s | |",
        f"| --ann index build (once per store version; IVF sqrt(n), SQ8) | {s['rows']:,} | "
        f"{s['ann_build_seconds']} s (reload: {s['ann_load_seconds']} s) | |",
        f"| --ann search, per query (median, nprobe {s['ann_nprobe']}, {s.get('ann_refine', 4)}x k candidates "
        f"re-scored exactly) | {s['rows']:,} | "
        f"{s['ann_query_seconds_median']} s, **recall@10 {s['recall_at_10']}** against exact over "
        f"{s['queries']} queries | {s['peak_rss_mb']:,} MB |",
        "",
        f"Store on disk: {w['store_mb']:,} MB. Opening reads the manifest, the `.npy` headers and the "
        "Parquet footers (the index rows are read when a result's path is needed), so it does not grow "
        "with the row count the way the single file's JSON Lines index did (4.51 s at 1,000,000 rows, "
        "`vector_scale.md`). An append writes one new segment; a deletion records row numbers in the "
        "manifest. Exact search is the same chunked matrix product as for a single-file store.",
        "",
    ])


if __name__ == "__main__":
    main()
